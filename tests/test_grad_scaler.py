"""torch.amp.GradScaler with every backend and storage format: grads unscaled, an overflow skipped.

GradScaler drives a step in one of two ways. An optimizer that declares ``_step_supports_amp_scaling``
(the fused kernels, as torch's fused AdamW) is handed ``grad_scale`` and ``found_inf``: its step
divides the grads by the scale (storing them back unscaled, as torch's fused kernels do) and skips
itself when an inf was found. For any other optimizer GradScaler unscales the grads itself and skips
``step()``. The low-bit reference takes the first way too, where an optimizer declares it.

Either way the run must be the one an optimizer that never saw the scale or the overflow takes: a
twin stepped with the unscaled grads, and not at all on the overflowing step, bit for bit (the
scale is a power of two: scaling and unscaling are exact). In torch's storage format the run is
also torch's counterpart's (for-loop, foreach, fused) with its own GradScaler: the same scales, the
same grads, and the same params and states (bit for bit for the mirror backends).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import adamw
from _helpers import (
    CLOSE,
    CLOSE_ULPS,
    FORMATS,
    FUSED_BACKENDS,
    MIRROR_BACKENDS,
    Tol,
    assert_bitwise,
    assert_same_run,
    backend_device,
    backend_params,
    leaves,
    make_params,
    torch_counterpart,
)

# A small model: one thread is faster by far.
pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
OVERFLOW = 2  # the step whose grads hold an inf
# maximize: the kernels negate the grads they unscale
OPTIONS: dict[str, Any] = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True, "maximize": True}

# (storage format, param dtype, autocast dtype, how close a fused kernel's params land to torch's in
# torch's format: for float32 params its moments too, for bf16 ones not: relative to bf16's precision,
# moments near 0 would differ wholly). Stochastic rounding applies to bf16 params.
CASES: dict[str, tuple[str, torch.dtype, torch.dtype, Tol | None]] = {
    "param-float32-fp16": ("param", torch.float32, torch.float16, CLOSE["fused kernel vs torch's, float32 model"]),
    "param-float32-bf16": (
        "param",
        torch.float32,
        torch.bfloat16,
        CLOSE["fused kernel vs torch's, float32 model, bf16 autocast"],
    ),
    "param-bfloat16": (
        "param",
        torch.bfloat16,
        torch.bfloat16,
        CLOSE_ULPS["fused kernel vs torch's, GradScaler"].tol(torch.bfloat16),
    ),
    "8bit-float32": ("8bit", torch.float32, torch.float16, None),
    "8bit-stochastic-bfloat16": ("8bit-stochastic", torch.bfloat16, torch.bfloat16, None),
    "4bit-float32": ("4bit", torch.float32, torch.float16, None),
}


def _cases() -> list[Any]:
    """backend x case x path: the fused kernels always take the scale in their step; the others
    leave it to GradScaler, and in a low-bit format also take it in step when declared (torch's
    for-loop and foreach refuse a grad_scale: so do ours)."""
    out = []
    for backend in backend_params(on_backend_device=True):
        name = backend.values[0]
        for case, (storage, *_) in CASES.items():
            paths = ["in-step"] if name in FUSED_BACKENDS else ["scaler"] + (["in-step"] if storage != "param" else [])
            for path in paths:
                out.append(pytest.param(name, case, path, id=f"{name}-{case}-{path}", marks=backend.marks))
    return out


def _weights(storage: str, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    """A two-layer model's weights. For 8-bit and 4-bit moments the first layer's weight is just large
    enough (4096 values); the overflow lands in it. Otherwise small: Triton's interpreter steps slowly."""
    gen = torch.Generator().manual_seed(0)
    width = 64 if storage.startswith(("8bit", "4bit")) else 24
    shapes = [(width, 64), (width,), (4, width), (4,)]
    return leaves([(torch.randn(s, generator=gen) / 8).to(dtype) for s in shapes], device)


def _loss(params: list[Tensor], x: Tensor, autocast: torch.dtype) -> Tensor:
    w1, b1, w2, b2 = params
    with torch.autocast(x.device.type, dtype=autocast):
        hidden = torch.nn.functional.linear(x, w1, b1).tanh()
        return torch.nn.functional.linear(hidden, w2, b2).float().square().mean()


class _Run:
    """An optimizer, its params and its GradScaler, stepped on scaled grads."""

    def __init__(self, optimizer: type[torch.optim.Optimizer], params: list[Tensor], **options: Any) -> None:
        self.params = params
        self.opt = optimizer(params, **OPTIONS, **options)
        device = params[0].device.type
        self.scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)

    def step(self, x: Tensor, autocast: torch.dtype, overflow: bool) -> list[Tensor] | None:
        """One scaled step; the unscaled grads it should have stepped (None where it should not)."""
        self.opt.zero_grad()
        self.scaler.scale(_loss(self.params, x, autocast)).backward()
        if overflow:
            self.params[0].grad[3, 5] = float("inf")
        scale = self.scaler.get_scale()
        unscaled = None if overflow else [p.grad / scale for p in self.params]  # a power of two: exact
        self.scaler.step(self.opt)
        self.scaler.update()
        return unscaled


def _scaler_unscales(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether GradScaler's unscale kernel takes grads of ``dtype`` on ``device`` (torch 2.11's CUDA
    kernel has no bfloat16)."""
    grads = [torch.ones(2, dtype=dtype, device=device)]
    found_inf = torch.zeros(1, device=device)
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, torch.ones(1, device=device))
    except (NotImplementedError, RuntimeError):
        return False
    return True


@pytest.mark.parametrize(("backend", "case", "path"), _cases())
def test_grad_scaler_unscales_and_skips_an_overflow(backend: str, case: str, path: str) -> None:
    storage, dtype, autocast, close_to_torch = CASES[case]
    device = backend_device(backend)
    if not _scaler_unscales(dtype, device):
        pytest.skip(f"torch {torch.__version__}'s GradScaler does not unscale {dtype} grads on {device.type}")
    options = {"backend": backend, **FORMATS[storage], "seed": 5}
    ours = _Run(adamw.AdamW, _weights(storage, dtype, device), **options)
    if path == "in-step":
        ours.opt._step_supports_amp_scaling = True  # the fused kernels declare it themselves
    # In a low-bit format every backend steps the reference's bits (test_low_bit_kernels.py), so the
    # twin is the reference on the CPU; in torch's format a kernel rounds as itself, so the twin is it.
    twin_backend = backend if storage == "param" else "forloop"
    twin_params = _weights(storage, dtype, backend_device(twin_backend))
    twin = adamw.AdamW(twin_params, **OPTIONS, **{**options, "backend": twin_backend})
    same_device = twin_params[0].device == device
    theirs = _Run(torch.optim.AdamW, _weights(storage, dtype, device), **torch_counterpart(backend))
    gen = torch.Generator().manual_seed(1)
    scales = []
    for step in range(STEPS):
        x = torch.randn(8, 64, generator=gen).to(device)
        unscaled = ours.step(x, autocast, overflow=step == OVERFLOW)
        if unscaled is not None:
            for p, g in zip(twin_params, unscaled, strict=True):
                p.grad = g.to(p.device)
            twin.step()
            if path == "scaler" or storage == "param":  # GradScaler's unscale_, or torch's fused contract
                for i, (p, q) in enumerate(zip(ours.params, twin_params, strict=True)):
                    what = f"step {step}, the grad of param {i} is stored back unscaled"
                    assert_bitwise(p.grad, q.grad, what, same_device=same_device)
        assert_same_run(ours.opt, twin, ours.params, twin_params, f"step {step}", same_device=same_device)
        scales.append(ours.scaler.get_scale())
        if storage == "param":
            theirs.step(x, autocast, overflow=step == OVERFLOW)
            assert ours.scaler.get_scale() == theirs.scaler.get_scale(), f"step {step}"
            if backend in MIRROR_BACKENDS:  # a fused kernel's params, so the next grads, differ in last bits
                for i, (p, q) in enumerate(zip(ours.params, theirs.params, strict=True)):
                    assert_bitwise(p.grad, q.grad, f"step {step}, the grad of param {i} as torch leaves it")

    assert scales[OVERFLOW] == scales[OVERFLOW - 1] / 2, f"the inf was seen: the scale backs off ({scales})"
    assert all(ours.opt.state[p]["step"].item() == STEPS - 1 for p in ours.params)
    if storage.startswith(("8bit", "4bit")):
        assert ours.opt.state[ours.params[0]]["exp_avg"].dtype == torch.uint8, "quantized moments were stepped"
    if storage == "param":
        declared = [getattr(run.opt, "_step_supports_amp_scaling", False) for run in (ours, theirs)]
        assert declared[0] == declared[1] == (backend in FUSED_BACKENDS), declared
        if backend in MIRROR_BACKENDS:
            assert_same_run(ours.opt, theirs.opt, ours.params, theirs.params)
        else:
            assert close_to_torch is not None
            for i, (p, q) in enumerate(zip(ours.params, theirs.params, strict=True)):
                close_to_torch.assert_close(p.detach(), q.detach(), f"param {i}")
                for key, value in theirs.opt.state[q].items() if dtype == torch.float32 else ():
                    close_to_torch.assert_close(ours.opt.state[p][key], value, f"param {i} state[{key!r}]")


# GradScaler sets found_inf to 0 or 1; torch's fused kernels read any other value too.
_NOT_ONE_IN_C = pytest.mark.xfail(
    strict=True, reason="the C kernel skips the step on any nonzero found_inf; torch's steps and subtracts it"
)


@pytest.mark.parametrize("found_inf", [1.0, 2.0], ids=["skip", "not-one"])
@pytest.mark.parametrize("backend", backend_params(FUSED_BACKENDS, on_backend_device=True))
def test_fused_kernels_read_found_inf_as_torch_fused(
    backend: str, found_inf: float, request: pytest.FixtureRequest
) -> None:
    """1.0 leaves params, states, grads and step counters exactly as they were; any other nonzero
    value steps and still subtracts it from the counter, as torch's fused kernels do."""
    if backend == "cpu" and found_inf != 1.0:
        request.applymarker(_NOT_ONE_IN_C)
    device = backend_device(backend)
    init = [p.contiguous() for p in make_params(torch.float32)]
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(init)]

    def scaled_steps(optimizer: type[torch.optim.Optimizer], found: float, **options: Any) -> tuple[Any, list[Tensor]]:
        params = leaves(init, device)
        opt = optimizer(params, **options)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(device)
        opt.step()  # a plain step first, so that states are nonzero
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(device) * 8.0
        opt.grad_scale = torch.tensor(8.0, device=device)
        opt.found_inf = torch.tensor(found, device=device)
        opt.step()
        return opt, params

    opt, params = scaled_steps(adamw.AdamW, found_inf, backend=backend)
    torch_opt, torch_params = scaled_steps(torch.optim.AdamW, found_inf, fused=True)
    for p, q in zip(params, torch_params, strict=True):
        assert opt.state[p]["step"].item() == torch_opt.state[q]["step"].item() == 2.0 - found_inf
    if found_inf == 1.0:  # the plain step alone
        expected_params = leaves(init, device)
        expected_opt = adamw.AdamW(expected_params, backend=backend)
        for p, g in zip(expected_params, grads, strict=True):
            p.grad = g.to(device)
        expected_opt.step()
    else:  # found_inf only moves the counter: the states of found_inf = 0
        expected_opt, expected_params = scaled_steps(adamw.AdamW, 0.0, backend=backend)
    for i, (p, q) in enumerate(zip(params, expected_params, strict=True)):
        assert_bitwise(p, q, f"param {i}")
        for key in ("exp_avg", "exp_avg_sq"):
            assert_bitwise(opt.state[p][key], expected_opt.state[q][key], f"param {i} {key}")
        assert torch.equal(p.grad, grads[i].to(device) * 8.0 if found_inf == 1.0 else grads[i].to(device))
