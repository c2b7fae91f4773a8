"""Shared by the lean kernels' bitwise tests (tests/test_cpu_lean.py and tests/test_triton_lean.py).

Each runs its kernel and the lean reference (``backend="forloop"``, which runs
:func:`adamw.states.lean_step` on the CPU) side by side on copies of the same params and compares
params and state bit for bit. What differs between the two files is a :class:`LeanKernel`: the AdamW
options that pick the kernel, the device its params live on, and each file's cases and param shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import adamw
from adamw.states import SIGNED_CODE, quantize

STEPS = 3
SEED = 1234

CPU = torch.device("cpu")
REFERENCE: dict[str, Any] = {"backend": "forloop"}

# Per case: state_precision, param_update, and the dtypes of the params (their shapes: LeanKernel.shapes).
Case = tuple[str, str, list[torch.dtype]]

FLAGS: dict[str, dict[str, Any]] = {
    "plain": dict(amsgrad=False, maximize=False, weight_decay=0.0, betas=(0.9, 0.999)),
    "amsgrad-wd": dict(amsgrad=True, maximize=False, weight_decay=0.1, betas=(0.9, 0.999)),
    # beta1 = 0.3: torch's lerp takes its other form (weight 0.7 >= 0.5)
    "maximize-amsgrad-lerp": dict(amsgrad=True, maximize=True, weight_decay=0.01, betas=(0.3, 0.99)),
}


def make_grads(params: list[Tensor], steps: int, scale: float = 1.0) -> list[list[Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        grads = []
        for p in params:
            g = torch.randn(p.shape, generator=gen, dtype=torch.complex64 if p.is_complex() else torch.float32)
            grads.append((g * scale).to(p.dtype))
        out.append(grads)
    return out


def leaves(init: list[Tensor], device: torch.device) -> list[Tensor]:
    """Copies of ``init`` on ``device``, with the same layout (the transposed view stays transposed)."""
    out = []
    for p in init:
        copy = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=device).copy_(p)
        out.append(torch.nn.Parameter(copy))
    return out


def optimizer(
    params: list[Tensor], options: dict[str, Any], state_precision: str, param_update: str, **flags: Any
) -> Any:
    """An AdamW whose ``options`` pick the implementation (a kernel's, or :data:`REFERENCE`)."""
    return adamw.AdamW(
        params,
        lr=1e-2,
        state_precision=state_precision,
        param_update=param_update,
        seed=SEED,
        **options,
        **flags,
    )


def as_real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def bits(t: Tensor) -> Tensor:
    t = as_real(t.detach().cpu())
    return t.reshape(-1).contiguous().view(torch.uint8)


def assert_bitwise(ours: Tensor, ref: Tensor, what: str) -> None:
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, f"{what}: {ours.dtype} {ours.shape} vs {ref.dtype}"
    if not torch.equal(bits(ours), bits(ref)):
        a, b = as_real(ours.detach().cpu()).double(), as_real(ref.detach().cpu()).double()
        differ = (a != b).sum().item()
        raise AssertionError(f"{what}: {differ} of {ref.numel()} differ, max |diff| {(a - b).abs().max().item():.3g}")


def assert_same_run(ours: Any, ref: Any, params: list[Tensor], ref_params: list[Tensor], step: int) -> None:
    for i, (p, q) in enumerate(zip(params, ref_params, strict=True)):
        assert_bitwise(p, q, f"step {step}, param {i}")
        mine, theirs = ours.state[p], ref.state[q]
        assert set(mine) == set(theirs), f"param {i}: state keys {sorted(mine)} vs {sorted(theirs)}"
        for key in theirs:
            assert_bitwise(mine[key], theirs[key], f"step {step}, param {i}, state[{key!r}]")


@dataclass(frozen=True)
class LeanKernel:
    """One lean kernel under test: ``options`` pick it in AdamW (``fused=True``, ``backend="triton"``),
    its params live on ``device`` (the reference's on the CPU), ``cases`` name a :data:`Case` each
    and ``shapes`` are the params' shapes (the second one is stepped as a transposed view)."""

    options: dict[str, Any]
    device: torch.device
    cases: dict[str, Case]
    shapes: list[tuple[int, ...]]

    def make_params(self, dtypes: list[torch.dtype]) -> list[Tensor]:
        gen = torch.Generator().manual_seed(0)
        params = []
        for dtype, shape in zip(dtypes, self.shapes, strict=False):
            p = torch.randn(shape, generator=gen, dtype=torch.complex64 if dtype.is_complex else torch.float32)
            params.append(p.to(dtype))
        params[1] = params[1].t()  # a transposed view
        return params

    def pair(
        self, init: list[Tensor], state_precision: str, param_update: str, **flags: Any
    ) -> tuple[Any, Any, list[Tensor], list[Tensor]]:
        """The kernel's optimizer and the reference's, each on its own copies of ``init``."""
        params, ref_params = leaves(init, self.device), leaves(init, CPU)
        ours = optimizer(params, self.options, state_precision, param_update, **flags)
        ref = optimizer(ref_params, REFERENCE, state_precision, param_update, **flags)
        return ours, ref, params, ref_params

    def run_both(
        self, case: str, flags: dict[str, Any], steps: int = STEPS, grad_scale: float | None = None
    ) -> tuple[Any, Any, list[Tensor], list[Tensor], list[list[Tensor]]]:
        state_precision, param_update, dtypes = self.cases[case]
        init = self.make_params(dtypes)
        ours, ref, params, ref_params = self.pair(init, state_precision, param_update, **flags)
        grads = make_grads(init, steps, scale=grad_scale or 1.0)
        if grad_scale is not None:
            ours.grad_scale, ref.grad_scale = torch.tensor(grad_scale, device=self.device), torch.tensor(grad_scale)
            ours.found_inf, ref.found_inf = torch.tensor(0.0, device=self.device), torch.tensor(0.0)
        return ours, ref, params, ref_params, grads

    def step_both(
        self, ours: Any, ref: Any, params: list[Tensor], ref_params: list[Tensor], grads: list[Tensor]
    ) -> None:
        for p, q, g in zip(params, ref_params, grads, strict=True):
            p.grad, q.grad = g.to(self.device, copy=True), g.clone()
        ours.step()
        ref.step()


# ------------------------------------------------------------------------------------------------
# checks both kernels run (each test module calls them with its KERNEL)


def check_grad_scale_and_found_inf(kernel: LeanKernel, case: str) -> None:
    """GradScaler's contract as the reference reads it: grads divided by grad_scale (float32 grads in
    the kernel, others by torch's op), and a nonzero found_inf skips the step, counters included."""
    ours, ref, params, ref_params, grads = kernel.run_both(case, FLAGS["amsgrad-wd"], steps=2, grad_scale=1024.0)
    kernel.step_both(ours, ref, params, ref_params, grads[0])
    assert_same_run(ours, ref, params, ref_params, 1)

    before = [(p.detach().clone(), {k: v.clone() for k, v in ours.state[p].items()}) for p in params]
    ours.found_inf.fill_(1.0)
    for p, g in zip(params, grads[1], strict=True):
        p.grad = g.to(kernel.device, copy=True)
    ours.step()
    for i, (p, (value, state)) in enumerate(zip(params, before, strict=True)):
        assert_bitwise(p, value, f"skipped step, param {i}")
        for key, entry in state.items():
            assert_bitwise(ours.state[p][key], entry, f"skipped step, param {i}, state[{key!r}]")


def check_codes_on_midpoints(kernel: LeanKernel) -> None:
    """Values exactly on the signed code's float32 midpoints (which take the smaller magnitude) and
    one float32 step either side: the kernel's codes are quantize()'s, the definition. With beta1 = 0
    the new exp_avg is the grad itself, in the kernel and in the reference."""
    _, mids = SIGNED_CODE.tables()
    up, down = torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(0.0))
    one, zero = torch.ones(1), torch.zeros(1)
    blocks = [  # 256 values each, whose largest magnitude is a power of two: y = x / absmax is exact
        torch.cat([one, mids, up, zero]),
        torch.cat([-one, -mids, -down, -zero]),
        torch.cat([one, down, -mids, -one]),
        torch.cat([one / 2, up / 2, -down / 2, one / 4]),
    ]
    grad = torch.cat(blocks * 5)[:4100]  # 17 blocks, the last one short
    init = [torch.randn(grad.numel())]
    flags = dict(betas=(0.0, 0.999), weight_decay=0.0)
    ours, ref, params, ref_params = kernel.pair(init, "8bit", "round", **flags)
    kernel.step_both(ours, ref, params, ref_params, [grad])
    codes, absmax = quantize(grad, SIGNED_CODE)
    assert_bitwise(ours.state[params[0]]["exp_avg"], codes, "codes")
    assert_bitwise(ours.state[params[0]]["exp_avg_absmax"], absmax, "absmax")
    assert_same_run(ours, ref, params, ref_params, 1)
