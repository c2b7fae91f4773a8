"""Choose the 4-bit moment format by training with candidate designs.

Each candidate is a block size and two code tables (``exp_avg``: signed; ``exp_avg_sq``: unsigned,
zero-free). Every candidate trains two models from the same weights on the same batches, with float32
params (4-bit moments alone) and with bfloat16 params and stochastic rounding (the leanest setup),
against ``torch.optim.AdamW`` in float32 and against our 8-bit moments:

* ``demo``: ``adamw demo``'s character-level transformer on Shakespeare;
* ``gru``: a character-level GRU language model on Python source (modules of the standard library
  of the running interpreter), a different architecture and different text.

The candidates run on the torch-ops reference (``backend="forloop"``), which steps any format this
script installs as ``adamw.states.formats.INT4``; the kernels follow the format chosen.

    python benchmarks/four_bit_designs.py --model gru --lr 1e-2 [--designs A,E] [--leanest E] [--json out.json]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import adamw
from adamw.cli.demo.model import CharTransformer, Corpus, ModelConfig, batch_starts, get_batch, load_text
from adamw.cli.demo.train import lr_at
from adamw.states import formats, state_nbytes
from adamw.states.quantize import Code, _ladder


@dataclass(frozen=True)
class Design:
    key: str
    description: str
    block_size: int
    signed: Code
    unsigned: Code

    def install(self) -> None:
        codes = {"exp_avg": self.signed, "exp_avg_sq": self.unsigned, "max_exp_avg_sq": self.unsigned}
        formats.INT4 = formats.BlockwiseFormat("4bit", 4, self.block_size, codes)


def _signed(steps_per_octave: float) -> Code:
    return Code("s", tuple([0.0] + _ladder(7, steps_per_octave)[::-1]), signed=True, bits=4)


def _unsigned(steps_per_octave: float) -> Code:
    return Code("u", tuple(_ladder(16, steps_per_octave)[::-1]), signed=False, bits=4)


LINEAR_UNSIGNED = Code("linear", tuple((k + 1) / 16 for k in range(16)), signed=False, bits=4)

DESIGNS = {
    d.key: d
    for d in (
        Design("A", "block 128, m: sign + {0, 2^-k}, v: 2^-k", 128, _signed(1), _unsigned(1)),
        Design("B", "block 64, m: sign + {0, 2^-k}, v: 2^-k", 64, _signed(1), _unsigned(1)),
        Design("C", "block 128, m: sign + {0, 2^-k}, v: 2^(-k/2)", 128, _signed(1), _unsigned(2)),
        Design("D", "block 128, m: sign + {0, 2^-k}, v: linear (k+1)/16", 128, _signed(1), LINEAR_UNSIGNED),
        Design("E", "block 128, m: sign + {0, 2^(-k/2)}, v: 2^-k", 128, _signed(2), _unsigned(1)),
        Design("F", "block 32, m: sign + {0, 2^-k}, v: 2^-k", 32, _signed(1), _unsigned(1)),
        Design("G", "block 128, m: sign + {0, 2^(-k/2)}, v: 2^(-k/2)", 128, _signed(2), _unsigned(2)),
        Design("H", "block 128, m: sign + {0, 2^(-2k/3)}, v: 2^-k", 128, _signed(1.5), _unsigned(1)),
        Design("I", "block 128, m: sign + {0, 2^(-k/3)}, v: 2^-k", 128, _signed(3), _unsigned(1)),
    )
}


class CharGRU(nn.Module):
    def __init__(self, vocab: int, width: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.gru = nn.GRU(width, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        out, _ = self.gru(self.embed(idx))
        return self.head(out)


def python_source_text() -> str:
    """A few hundred KB of the standard library's own source, ASCII only."""
    import argparse as a
    import dataclasses as d
    import email.message as e
    import inspect as i
    import pathlib as p
    import textwrap as t

    text = "".join(inspect.getsource(m) for m in (a, d, e, i, p, t))
    return text.encode("ascii", "ignore").decode("ascii")


def workload(model_name: str) -> tuple[Corpus, Callable[[], nn.Module], int]:
    if model_name == "demo":
        config = ModelConfig()
        corpus = Corpus.from_text(load_text())
        return corpus, lambda: CharTransformer(len(corpus.vocab), config), config.context
    corpus = Corpus.from_text(python_source_text())
    return corpus, lambda: CharGRU(len(corpus.vocab)), 64


def train(
    model_name: str, setup: str, steps: int, seed: int, design: Design | None, lr: float = 1e-3
) -> dict[str, object]:
    """``setup``: "torch", "8bit", "leanest-8bit", "4bit" or "leanest-4bit"; ``lr`` is the peak of
    the demo's schedule (warm-up, cosine decay)."""
    corpus, make_model, context = workload(model_name)
    starts = batch_starts(len(corpus.tokens), context, steps, 16, seed)
    torch.manual_seed(seed)
    bf16 = setup.startswith("leanest")
    model = make_model().to(torch.bfloat16 if bf16 else torch.float32)
    params = list(model.parameters())
    hyper = {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
    if design is not None:
        design.install()
    if setup == "torch":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, **hyper)
    else:
        precision = setup.rsplit("-", 1)[-1]
        update = "stochastic" if bf16 else "round"
        opt = adamw.AdamW(params, **hyper, state_precision=precision, param_update=update, seed=seed, backend="forloop")
    losses = []
    begin = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        x, y = get_batch(corpus.tokens, starts[step], context, torch.device("cpu"))
        logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
    tail = max(1, min(20, steps // 5))
    num = sum(p.numel() for p in params)
    state = sum(state_nbytes(s) for s in opt.state.values())
    return {
        "model": model_name,
        "setup": setup,
        "design": design.key if design else "",
        "final_loss": sum(losses[-tail:]) / tail,
        "state_bytes_per_param": state / num,
        "bytes_per_param": (state + sum(p.numel() * p.element_size() for p in params)) / num,
        "seconds": time.perf_counter() - begin,
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("demo", "gru"), default="demo")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3, the demo's)")
    parser.add_argument("--designs", default=",".join(DESIGNS), help="designs run with float32 params")
    parser.add_argument("--leanest", default="E", help="designs also run with bf16 params (slow on CPUs without bf16)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs: list[tuple[str, Design | None]] = [("torch", None), ("8bit", None)]
    runs += [("4bit", DESIGNS[k]) for k in args.designs.split(",") if k]
    leanest = [k for k in args.leanest.split(",") if k]
    runs += [("leanest-8bit", None)] * bool(leanest) + [("leanest-4bit", DESIGNS[k]) for k in leanest]
    results = []
    baseline = None
    print(f"{'model':6} {'setup':14} {'design':6} {'loss':>8} {'vs torch':>9} {'state B/p':>9} {'all B/p':>8}  design")
    for setup, design in runs:
        r = train(args.model, setup, args.steps, args.seed, design, args.lr)
        if setup == "torch":
            baseline = r["final_loss"]
        vs = "" if baseline is None else f"{r['final_loss'] / baseline - 1:+.2%}"
        print(
            f"{r['model']:6} {setup:14} {r['design']:6} {r['final_loss']:8.4f} {vs:>9} "
            f"{r['state_bytes_per_param']:9.3f} {r['bytes_per_param']:8.3f}  {design.description if design else ''}",
            flush=True,
        )
        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
