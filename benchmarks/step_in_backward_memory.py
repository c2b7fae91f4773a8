"""Peak memory of a GPT-2-small training step: the standard step against the step in backward.

    python benchmarks/step_in_backward_memory.py [--backends forloop foreach cpu] [--seq-len 128]

Each (backend, mode) runs in a fresh process: build the model (GPT-2 small, 124M float32 params, the
real architecture with the tied embedding), take one warm-up step (which creates the AdamW state),
then measure the next steps. Two measures of the memory on top of what the step starts with
(params, AdamW state), both over the measured steps only:

* ``torch``: the peak of the bytes allocated by torch's CPU allocator during the steps, as torch's
  profiler accounts them (``profile_memory=True``: every allocation and free, exactly; it counts
  only tensors, not the allocator's or Python's overhead);
* ``rss``: the peak resident memory of the process (``VmHWM``, reset through ``/proc/self/clear_refs``
  before the steps) minus the resident memory before them: what the machine sees. glibc's mmap
  threshold is fixed (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors go back to the system; with
  its default dynamic threshold, freed blocks below 32 MiB stay in the heap and the RSS keeps them.

The saving is reported against the model's gradient bytes, together with the most a step in
backward can save by freeing gradients: all gradient bytes but the largest gradient, which has to
exist whole while its parameter is stepped (GPT-2's tied embedding: 31% of the gradient bytes).
What the standard step allocates on top of the gradients (its temporaries) differs by backend:
foreach computes ``sqrt(v)`` for every parameter at once, the for-loop one parameter at a time, the
C kernel none. The final parameters of both modes are compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import adamw
from adamw.cli.bench.workloads import GPT2_SMALL, GPT2Size

MODES = ("standard", "in_backward")
WARMUP_STEPS = 1
MEASURED_STEPS = 1
MMAP_THRESHOLD = 128 * 1024


# --------------------------------------------------------------------------------------------------
# GPT-2 small in plain torch, its sizes from the one GPT-2 table (adamw.cli.bench.workloads: the shapes
# of Hugging Face's "gpt2", 124,439,808 params)


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, 4 * width)
        self.mlp_proj = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    def __init__(self, size: GPT2Size = GPT2_SMALL) -> None:
        super().__init__()
        self.wte = nn.Embedding(size.vocab, size.width)
        self.wpe = nn.Embedding(size.context, size.width)
        self.blocks = nn.ModuleList(Block(size.width, size.width // 64) for _ in range(size.layers))
        self.ln_f = nn.LayerNorm(size.width)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T  # the output layer is the embedding (tied)


# --------------------------------------------------------------------------------------------------
# one (backend, mode) in this process


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _torch_peak(prof: torch.profiler.profile, trace_dir: Path) -> int:
    """The peak of "Total Allocated" over the CPU memory events of a profile (bytes)."""
    path = trace_dir / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    path.unlink()
    totals = [
        e["args"]["Total Allocated"]
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0  # 0: CPU
    ]
    return max(totals, default=0)


def run_one(backend: str, mode: str, seq_len: int, params_out: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = GPT2()
    options: dict[str, Any] = dict(lr=3e-4, weight_decay=0.1, backend=backend)
    opt = (
        adamw.step_in_backward(model, **options)
        if mode == "in_backward"
        else adamw.AdamW(model.parameters(), **options)
    )
    generator = torch.Generator().manual_seed(1)

    def train_step() -> None:
        tokens = torch.randint(0, 50257, (1, seq_len + 1), generator=generator)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), tokens[0, 1:])
        del logits
        loss.backward()
        if mode == "standard":
            opt.step()
            opt.zero_grad()

    for _ in range(WARMUP_STEPS):
        train_step()
    rss_before = _rss_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    with tempfile.TemporaryDirectory() as trace_dir:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(MEASURED_STEPS):
                train_step()
        rss_peak = _rss_bytes("VmHWM") - rss_before
        torch_peak = _torch_peak(prof, Path(trace_dir))
    params = list(model.parameters())
    torch.save([p.detach() for p in params], params_out)
    return {
        "torch_peak": torch_peak,
        "rss_peak": rss_peak,
        "grad_bytes": sum(p.numel() * p.element_size() for p in params),
        "largest_grad_bytes": max(p.numel() * p.element_size() for p in params),
        "num_params": sum(p.numel() for p in params),
    }


# --------------------------------------------------------------------------------------------------
# the comparison


def _run_in_subprocess(backend: str, mode: str, seq_len: int, params_out: Path) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    command = [
        sys.executable,
        __file__,
        "--one",
        backend,
        mode,
        "--seq-len",
        str(seq_len),
        "--params-out",
        str(params_out),
    ]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("{")))


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def compare(backends: list[str], seq_len: int, required: float) -> int:
    print(
        f"GPT-2 small, float32, batch 1 x {seq_len} tokens, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"peak memory on top of params + AdamW state, {MEASURED_STEPS} step(s) after {WARMUP_STEPS} warm-up, MiB\n")
    print(
        "| backend | measure | standard | in backward | saving | saving / gradient bytes "
        f"| bound: all but the largest gradient | saving >= {required:.0%} of gradient bytes | final params |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|---|")
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            results = {mode: _run_in_subprocess(backend, mode, seq_len, Path(tmp) / f"{mode}.pt") for mode in MODES}
            standard, in_backward = (torch.load(Path(tmp) / f"{mode}.pt") for mode in MODES)
            diffs = [(a - b).abs().max().item() for a, b in zip(standard, in_backward, strict=True)]
            same = "bit for bit" if all(d == 0 for d in diffs) else f"max diff {max(diffs):.2e}"
            del standard, in_backward
            grad_bytes = results["standard"]["grad_bytes"]
            bound = grad_bytes - results["standard"]["largest_grad_bytes"]
            for measure in ("torch_peak", "rss_peak"):
                saving = results["standard"][measure] - results["in_backward"][measure]
                meets = saving >= required * grad_bytes
                print(
                    f"| {backend} | {measure.split('_')[0]} | {_mib(results['standard'][measure])} "
                    f"| {_mib(results['in_backward'][measure])} | {_mib(saving)} | {saving / grad_bytes:.0%} "
                    f"| {bound / grad_bytes:.0%} | {'yes' if meets else 'no'} | {same} |"
                )
                if not meets:
                    failures.append(f"{backend} ({measure.split('_')[0]}): saving {saving / grad_bytes:.0%}")
            if same != "bit for bit":
                failures.append(f"{backend}: final params differ ({same})")
    print(
        f"\ngradient bytes: {_mib(grad_bytes)} MiB ({results['standard']['num_params']:,} float32 params); "
        f"largest gradient (the tied embedding): {_mib(results['standard']['largest_grad_bytes'])} MiB"
    )
    if failures:
        print(f"below the requirement ({required:.0%} of gradient bytes) or not identical: " + "; ".join(failures))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["forloop", "foreach", "cpu"])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument(
        "--require-saving",
        type=float,
        default=0.8,
        help="exit 1 when a backend saves less than this fraction of the gradient bytes (default 0.8)",
    )
    parser.add_argument("--one", nargs=2, metavar=("BACKEND", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--params-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        backend, mode = args.one
        print(json.dumps(run_one(backend, mode, args.seq_len, args.params_out)))
        return 0
    return compare(args.backends, args.seq_len, args.require_saving)


if __name__ == "__main__":
    sys.exit(main())
