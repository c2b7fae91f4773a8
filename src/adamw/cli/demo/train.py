"""The runs of ``adamw demo``: every mode trains the same model (:mod:`.model`, ~420k parameters by
default) from the same initial weights on the same batches. Each run reports its final training loss
(mean of the last steps), the bytes of optimizer state and params, and the time per step;
:func:`check_acceptance` holds each low-bit mode to torch's loss and state size.

The bfloat16-param modes run the model in bfloat16 (``model.bfloat16()``, loss in float32), as one
trains without a master copy; their moments are bfloat16 (``state_precision="param"``) except the
leanest ones' (8-bit and 4-bit).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from adamw.states import state_nbytes

from .model import CharTransformer, Corpus, ModelConfig, batch_starts, get_batch, load_text
from .report import plot_losses


@dataclass(frozen=True)
class Mode:
    """One optimizer configuration of the demo; ``key`` names it in ``--modes``."""

    key: str
    name: str
    optimizer: str  # "torch", "adamw" or "low-bit" (adamw.AdamW with the options below)
    param_dtype: torch.dtype = torch.float32
    state_precision: str = "param"
    param_update: str = "round"


MODES: tuple[Mode, ...] = (
    Mode("torch", "torch", "torch"),  # float32 params and moments: the baseline
    Mode("adamw", "adamw", "adamw"),  # adamw.AdamW's defaults: equal to torch bit for bit
    Mode("bf16", "bf16 moments", "low-bit", state_precision="bf16"),
    Mode("8bit", "8-bit moments", "low-bit", state_precision="8bit"),
    # bf16 params with no master copy, rounded to nearest as torch does: the contrast to the next two
    Mode("round", "bf16 params, round", "low-bit", torch.bfloat16, param_update="round"),
    Mode("stochastic", "bf16 params, stochastic", "low-bit", torch.bfloat16, param_update="stochastic"),
    Mode("kahan", "bf16 params, Kahan", "low-bit", torch.bfloat16, param_update="kahan"),
    Mode("leanest", "leanest", "low-bit", torch.bfloat16, state_precision="8bit", param_update="stochastic"),
    Mode("4bit", "4-bit moments", "low-bit", state_precision="4bit"),
    Mode("leanest4", "leanest 4-bit", "low-bit", torch.bfloat16, state_precision="4bit", param_update="stochastic"),
)
MODE_KEYS = {m.key: m.name for m in MODES}

# What a low-bit mode must reach: its final loss within a fraction of torch's, its state bytes at most
# a fraction of torch's.
LOSS_TOLERANCES = {
    "bf16 moments": 0.02,
    "8-bit moments": 0.02,
    "4-bit moments": 0.02,
    "leanest 4-bit": 0.02,
    "bf16 params, stochastic": 0.03,
    "bf16 params, Kahan": 0.03,
}
# The state bytes of a quantized mode at most this fraction of torch's (the demo's small params, under
# 4096 values, keep float32 moments).
STATE_RATIOS = {"8-bit moments": 0.30, "4-bit moments": 0.20}


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


REFERENCE = "torch ops (the low-bit reference)"


def implementation_of(mode: Mode, device: torch.device) -> str:
    """What runs ``mode`` on ``device``; for a low-bit mode our fused kernel (the C one on CPU, Triton on
    CUDA) where it builds or imports here, else the torch-ops reference it is tested against bit for bit."""
    if mode.optimizer != "low-bit":
        return f"{'torch.optim' if mode.optimizer == 'torch' else 'adamw'}.AdamW, default flags"
    try:
        if device.type == "cpu":
            from adamw.backends import cpu_low_bit

            cpu_low_bit.library()
            return "the C kernel (fused=True)"
        if device.type == "cuda":
            from adamw.backends import triton

            triton._low_bit_kernels()
            return "the Triton kernel (fused=True)"
    except (ImportError, RuntimeError):
        pass
    return REFERENCE


def make_optimizer(
    mode: Mode, params: list[Tensor], *, lr: float, weight_decay: float, seed: int
) -> torch.optim.Optimizer:
    """torch's AdamW or ours with the mode's options, fused where :func:`implementation_of` says so."""
    hyper: dict[str, Any] = {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": weight_decay}
    if mode.optimizer == "torch":
        return torch.optim.AdamW(params, **hyper)
    from adamw import AdamW

    fused = mode.optimizer == "low-bit" and implementation_of(mode, params[0].device) != REFERENCE
    options: dict[str, Any] = {"state_precision": mode.state_precision, "param_update": mode.param_update, "seed": seed}
    return AdamW(params, **hyper, **options, fused=True if fused else None)


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
    config: ModelConfig,
    device: torch.device,
    *,
    seed: int,
    lr: float,
    weight_decay: float,
    progress: Any = None,
) -> RunResult:
    """Train one fresh model (same initial weights for every mode: seeded) and measure it."""
    torch.manual_seed(seed)
    model = CharTransformer(len(corpus.vocab), config).to(device=device, dtype=mode.param_dtype)
    params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(mode, params, lr=lr, weight_decay=weight_decay, seed=seed)
    steps = starts.shape[0]
    if progress is not None:
        progress.set_description(mode.name)
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
        if device.type == "cuda":  # the backward's kernels end before the optimizer's time begins
            torch.cuda.synchronize(device)
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
    return RunResult(
        mode=mode.name,
        losses=losses,
        final_loss=sum(losses[-tail:]) / tail,
        state_bytes=sum(state_nbytes(s) for s in optimizer.state.values()),
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        num_params=sum(p.numel() for p in params),
        ms_per_step=1000 * step_time / max(timed, 1),
        optimizer_ms_per_step=1000 * optimizer_time / max(timed, 1),
        implementation=implementation_of(mode, device),
    )


def check_acceptance(results: list[RunResult]) -> dict[str, bool]:
    """Each low-bit mode that ran against torch's run: loss and state bytes (keyed by a readable description)."""
    by_name = {r.mode: r for r in results}
    torch_result = by_name.get("torch")
    if torch_result is None:
        return {}
    for r in results:
        r.vs_torch = r.final_loss / torch_result.final_loss - 1
    checks = {
        f"{name}: final loss within {tolerance:.0%} of torch": abs(by_name[name].vs_torch or 0.0) <= tolerance
        for name, tolerance in LOSS_TOLERANCES.items()
        if name in by_name
    }
    for name, most in STATE_RATIOS.items():
        if name in by_name:
            ratio = by_name[name].state_bytes / torch_result.state_bytes
            checks[f"{name}: state bytes {ratio:.1%} of torch's (<= {most:.0%})"] = ratio <= most
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
    started = time.perf_counter()
    try:
        results = [
            train(mode, corpus, starts, config, device, seed=seed, lr=lr, weight_decay=weight_decay, progress=progress)
            for mode in selected
        ]
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
    by_key = {key: m for m in MODES for key in (m.key, m.name)}
    keys = list(modes)
    unknown = [key for key in keys if key not in by_key]
    if unknown:
        raise ValueError(f"unknown mode {unknown[0]!r}: choose from {', '.join(MODE_KEYS)}")
    return [by_key[key] for key in keys]


def _progress_bar(total: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety: the demo runs without it
        return None
    return tqdm(total=total, unit="step", dynamic_ncols=True)
