"""Shared test helpers: random params and grads, running two optimizers side by side, snapshots,
the one tolerance table, and the one place that decides which of our backends a test can run."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

from adamw._math import ReferenceState, reference_step
from adamw.functional import BACKENDS, FUSED_BACKENDS

# --------------------------------------------------------------------------------------------------
# dtypes, backends, skip logic (the only place tests decide what can run)

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64)
# torch.optim.AdamW(fused=True) on the CPU takes these; our fused kernels are held to the same set.
FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# The backends that mirror torch op for op and must match it bit for bit.
MIRROR_BACKENDS = ("forloop", "foreach")


def _missing_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or None when its module imports.

    Only a module that does not exist yet (or its optional dependency, triton) is a skip; any
    other import error is left to fail the test that uses the backend.
    """
    module = f"adamw.backends.{name}"
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name in (module, "triton") or (exc.name or "").startswith("triton."):
            return f"{module} is not available: {exc}"
    except Exception:
        return None  # a broken backend must fail its tests, not be skipped
    return None


def backend_params(names: Iterable[str] = BACKENDS) -> list[Any]:
    """``pytest.param`` per backend, skipped (with the reason) where its module does not import."""
    out = []
    for name in names:
        reason = _missing_reason(name)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        out.append(pytest.param(name, id=name, marks=marks))
    return out


def available_backends() -> list[str]:
    """Names of our backends whose modules import on this machine."""
    return [name for name in BACKENDS if _missing_reason(name) is None]


def skip_unsupported(backend: str, dtype: torch.dtype, *, differentiable: bool = False) -> None:
    """Skip a (backend, dtype, flags) combination that the backend rejects by design (as torch does)."""
    if backend in FUSED_BACKENDS and dtype not in FUSED_DTYPES:
        pytest.skip(f"fused kernels take {[str(d) for d in FUSED_DTYPES]} only, as torch's fused AdamW")
    if backend != "forloop" and differentiable:
        pytest.skip("only the for-loop path is differentiable (torch's foreach asserts, fused raises)")


def torch_counterpart(backend: str) -> dict[str, Any]:
    """The torch.optim.AdamW flags that run the implementation our ``backend`` is compared with."""
    if backend == "forloop":
        return {"foreach": False}
    if backend == "foreach":
        return {"foreach": True}
    return {"fused": True}


# --------------------------------------------------------------------------------------------------
# tolerances


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float
    reason: str


# How far torch.optim.AdamW's own result (params and every moment) lands from the float64 reference
# after the 5 steps of these tests (|actual - ref| <= atol + rtol * |ref|); ours is held to the same
# bound. Measured over every flag combination of test_reference, then about 4x margin.
REFERENCE_TOL: dict[torch.dtype, Tol] = {
    torch.float64: Tol(1e-15, 1e-15, "float64 throughout; only the order of operations differs (seen 1.5e-16)"),
    torch.float32: Tol(5e-7, 5e-7, "float32 rounding of ~10 ops per step over 5 steps (seen 1.3e-7)"),
    torch.complex64: Tol(5e-7, 5e-7, "float32 per real component (view_as_real), as float32 (seen 8.4e-8)"),
    torch.bfloat16: Tol(4e-2, 4e-2, "8-bit mantissa, params and moments stored in bf16 each step (seen 9.6e-3)"),
    torch.float16: Tol(6e-3, 6e-3, "11-bit mantissa, moments stored in fp16 each step (seen 1.7e-3)"),
}

# A fused kernel may round differently from torch's fused kernel (e.g. the final store): its error
# against the float64 reference may exceed torch's by this many units in the last place of the
# largest reference value, and no more.
FUSED_SLACK_ULPS = 1.0


def fused_slack(dtype: torch.dtype, ref: Tensor) -> float:
    largest = ref.abs().max().item() if ref.numel() else 0.0
    return FUSED_SLACK_ULPS * torch.finfo(dtype.to_real()).eps * largest


# --------------------------------------------------------------------------------------------------
# params and grads

# Gradient magnitude per param: the small one makes sqrt(v) comparable with eps (so where eps applies
# shows), the large one makes the second moment dominate.
_GRAD_SCALES = (1.0, 0.05, 3.0, 1.0, 0.5, 2.0)


def _randn(shape: Sequence[int], dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    if dtype.is_complex:
        return torch.randn(tuple(shape), dtype=dtype, generator=gen)
    # float32 first, then cast: the same values (up to rounding) for every real dtype.
    return torch.randn(tuple(shape), generator=gen).to(dtype)


def make_params(dtype: torch.dtype, *, seed: int = 0, requires_grad: bool = False) -> list[Tensor]:
    """Random leaf params of awkward shapes and layouts (identical for identical arguments).

    0-d, empty, contiguous, a transposed view and a strided slice (both non-contiguous leaves).
    ``requires_grad`` is off by default: with ``differentiable=True`` the step runs under autograd,
    and an in-place update of a leaf that requires grad is an error in torch and ours alike.
    """
    gen = torch.Generator().manual_seed(seed)
    params = [
        _randn((), dtype, gen),
        _randn((0, 3), dtype, gen),
        _randn((3, 4), dtype, gen),
        _randn((4, 3), dtype, gen).t(),
        _randn((6, 5), dtype, gen)[::2, 1:],
        _randn((5,), dtype, gen),
    ]
    return [p.detach().requires_grad_(requires_grad) for p in params]


def has_grad(index: int, step: int) -> bool:
    """Every param misses its grad on some step (of any 4 consecutive steps, exactly one)."""
    return (index + step) % 4 != 3


def make_grads(params: Sequence[Tensor], step: int, *, seed: int = 0, all_steps: bool = False) -> list[Tensor | None]:
    """Random grads for ``step`` (None where :func:`has_grad` says so, unless ``all_steps``)."""
    gen = torch.Generator().manual_seed(1000 * seed + step + 1)
    grads: list[Tensor | None] = []
    for i, p in enumerate(params):
        g = _randn(p.shape, p.dtype, gen) * _GRAD_SCALES[i % len(_GRAD_SCALES)]
        # The grad takes the param's layout, as autograd gives it (transposed grad for a transposed param).
        grads.append(torch.empty_like(p).copy_(g) if (all_steps or has_grad(i, step)) else None)
    return grads


def set_grads(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.clone()


# --------------------------------------------------------------------------------------------------
# running optimizers

OptFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


def run_steps(
    factory: OptFactory,
    params: list[Tensor],
    steps: int,
    *,
    seed: int = 0,
    all_steps: bool = False,
) -> torch.optim.Optimizer:
    """Build an optimizer over ``params`` and take ``steps`` steps on the deterministic grads."""
    opt = factory(params)
    drive(opt, params, range(steps), seed=seed, all_steps=all_steps)
    return opt


def drive(
    opt: torch.optim.Optimizer,
    params: Sequence[Tensor],
    steps: Iterable[int],
    *,
    seed: int = 0,
    all_steps: bool = False,
) -> None:
    for step in steps:
        set_grads(params, make_grads(params, step, seed=seed, all_steps=all_steps))
        opt.step()


def two_groups(params: list[Tensor], *, tensor_lr: bool = False, **group1: Any) -> list[dict[str, Any]]:
    """Split ``params`` into two groups; the second has its own hyper-parameters (and ``group1``)."""
    lr: float | Tensor = torch.tensor(0.03) if tensor_lr else 0.03
    second = {"params": params[3:], "lr": lr, "betas": (0.8, 0.95), "eps": 1e-4, "weight_decay": 0.3, **group1}
    return [{"params": params[:3]}, second]


# --------------------------------------------------------------------------------------------------
# comparisons


def assert_bitwise(actual: Tensor, expected: Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.device == expected.device, f"{what}: device {actual.device} != {expected.device}"
    if not torch.equal(actual.detach(), expected.detach()):
        diff = (
            actual.detach().to(torch.complex128 if actual.is_complex() else torch.float64)
            - expected.detach().to(torch.complex128 if expected.is_complex() else torch.float64)
        ).abs()
        raise AssertionError(f"{what}: not bitwise equal, max |diff| = {diff.max().item():.3e}")


def assert_same_value(actual: Any, expected: Any, what: str) -> None:
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor), f"{what}: {type(actual)} is not a Tensor"
        assert_bitwise(actual, expected, what)
    elif isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), f"{what}: {actual!r} != {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_value(a, e, f"{what}[{i}]")
    else:
        assert actual == expected, f"{what}: {actual!r} != {expected!r}"


def assert_same_run(
    ours: torch.optim.Optimizer,
    theirs: torch.optim.Optimizer,
    our_params: Sequence[Tensor],
    their_params: Sequence[Tensor],
) -> None:
    """Params and every state entry (step, exp_avg, exp_avg_sq, max_exp_avg_sq) bit for bit."""
    for i, (a, b) in enumerate(zip(our_params, their_params, strict=True)):
        assert_bitwise(a, b, f"param {i}")
        assert a.stride() == b.stride(), f"param {i}: stride {a.stride()} != {b.stride()}"
        state_a, state_b = ours.state.get(a, {}), theirs.state.get(b, {})
        assert state_a.keys() == state_b.keys(), f"param {i}: state keys {set(state_a)} != {set(state_b)}"
        for key in state_b:
            assert_same_value(state_a[key], state_b[key], f"param {i} state[{key!r}]")


@dataclass
class Snapshot:
    params: list[Tensor]
    state: list[dict[str, Any]]
    groups: list[dict[str, Any]]


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def snapshot(opt: torch.optim.Optimizer | None, params: Sequence[Tensor]) -> Snapshot:
    """Copies of params, their optimizer state, and every group's options (the number of its params)."""
    state = [] if opt is None else [{k: _clone(v) for k, v in opt.state.get(p, {}).items()} for p in params]
    groups = (
        []
        if opt is None
        else [{k: (len(v) if k == "params" else _clone(v)) for k, v in g.items()} for g in opt.param_groups]
    )
    return Snapshot([_clone(p) for p in params], state, groups)


def assert_unchanged(opt: torch.optim.Optimizer | None, params: Sequence[Tensor], before: Snapshot) -> None:
    after = snapshot(opt, params)
    for i, (a, b) in enumerate(zip(after.params, before.params, strict=True)):
        assert_bitwise(a, b, f"param {i} changed")
    for i, (sa, sb) in enumerate(zip(after.state, before.state, strict=True)):
        assert sa.keys() == sb.keys(), f"param {i}: state keys changed: {set(sb)} -> {set(sa)}"
        for key in sb:
            assert_same_value(sa[key], sb[key], f"param {i} state[{key!r}] changed")
    assert len(after.groups) == len(before.groups), "param groups were added or removed"
    for i, (ga, gb) in enumerate(zip(after.groups, before.groups, strict=True)):
        assert ga.keys() == gb.keys(), f"group {i} keys changed"
        for key in gb:
            assert_same_value(ga[key], gb[key], f"group {i}[{key!r}] changed")


def catch(fn: Callable[[], Any]) -> BaseException:
    """The exception ``fn`` raises (fails the test if it raises none)."""
    try:
        fn()
    except Exception as exc:
        return exc  # of any type: the caller compares it with torch's
    raise AssertionError(f"{fn} raised nothing")


# --------------------------------------------------------------------------------------------------
# float64 reference


ENTRIES = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def as_real64(t: Tensor) -> Tensor:
    t = t.detach()
    return (torch.view_as_real(t) if t.is_complex() else t).to(torch.float64)


def run_reference(
    params: Sequence[Tensor],
    steps: int,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    seed: int = 0,
) -> list[ReferenceState]:
    """:func:`adamw._math.reference_step` in float64 on the same params and grads as :func:`drive`."""
    states = [ReferenceState.from_param(p) for p in params]
    for step in range(steps):
        for state, grad in zip(states, make_grads(params, step, seed=seed), strict=True):
            if grad is not None:
                reference_step(
                    state,
                    grad,
                    lr=lr,
                    beta1=betas[0],
                    beta2=betas[1],
                    eps=eps,
                    weight_decay=weight_decay,
                    amsgrad=amsgrad,
                    maximize=maximize,
                )
    return states


def reference_entries(
    opt: torch.optim.Optimizer, params: Sequence[Tensor], refs: Sequence[ReferenceState]
) -> dict[str, list[tuple[Tensor, Tensor]]]:
    """(actual as float64, reference) pairs per entry name, over every param with state."""
    pairs: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in ENTRIES}
    for p, ref in zip(params, refs, strict=True):
        pairs["param"].append((as_real64(p), ref.param))
        state = opt.state.get(p, {})
        for name in ENTRIES[1:]:
            if name in state:
                pairs[name].append((as_real64(state[name]), getattr(ref, name)))
    return pairs


def max_error(pairs: list[tuple[Tensor, Tensor]]) -> float:
    errors = [(a - r).abs().max().item() for a, r in pairs if r.numel()]
    return max(errors, default=0.0)
