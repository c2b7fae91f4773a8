"""The runs of ``adamw demo``: each mode trains the same model, and the checks compare them with torch.

A character-level transformer (2 layers, d_model 128, context 64: ~420k parameters; see
:mod:`.model`) learns the shipped text for a fixed number of steps, from the same initial weights and
on the same batches for every mode. Each run reports its final training loss (mean of the last
steps), the bytes of optimizer state and params, and the time per step; :func:`check_acceptance`
holds each low-bit mode to torch's loss and state size.

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
    """One optimizer configuration of the demo."""

    name: str
    optimizer: str  # "torch", "adamw" or "low-bit"
    param_dtype: torch.dtype = torch.float32
    state_precision: str = "param"
    param_update: str = "round"


MODES: tuple[Mode, ...] = (
    Mode("torch", "torch"),
    Mode("adamw", "adamw"),
    Mode("bf16 moments", "low-bit", state_precision="bf16"),
    Mode("8-bit moments", "low-bit", state_precision="8bit"),
    Mode("bf16 params, round", "low-bit", torch.bfloat16, param_update="round"),
    Mode("bf16 params, stochastic", "low-bit", torch.bfloat16, param_update="stochastic"),
    Mode("bf16 params, Kahan", "low-bit", torch.bfloat16, param_update="kahan"),
    Mode("leanest", "low-bit", torch.bfloat16, state_precision="8bit", param_update="stochastic"),
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

# What a low-bit mode must reach, as fractions of torch's final loss (and of its state bytes).
MOMENTS_TOLERANCE = 0.02  # bf16 and 8-bit moments
BF16_PARAMS_TOLERANCE = 0.03  # bf16 params with stochastic rounding or Kahan
INT8_STATE_RATIO = 0.30  # 8-bit state bytes / torch's


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
    """torch's AdamW or ours with the mode's options; low-bit modes run our fused kernel where it is
    available on the params' device (see :func:`low_bit_implementation`)."""
    betas = (0.9, 0.999)
    if mode.optimizer == "torch":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay)
    from adamw import AdamW

    fused = mode.optimizer == "low-bit" and low_bit_implementation(params[0].device) != REFERENCE
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


REFERENCE = "torch ops (the low-bit reference)"


def low_bit_implementation(device: torch.device) -> str:
    """What runs the low-bit modes on ``device``: our fused kernel (the C one on CPU, Triton on CUDA) where
    it builds or imports here, else the torch-ops reference it is tested against bit for bit."""
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


def implementation_of(mode: Mode, device: torch.device) -> str:
    if mode.optimizer == "torch":
        return "torch.optim.AdamW, default flags"
    if mode.optimizer == "adamw":
        return "adamw.AdamW, default flags"
    return low_bit_implementation(device)


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


def check_acceptance(results: list[RunResult]) -> dict[str, bool]:
    """Each low-bit mode that ran against torch's run: loss and state bytes (keyed by a readable description)."""
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
