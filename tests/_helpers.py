"""Shared test helpers: random params and grads, running two optimizers side by side, snapshots,
the one tolerance table, and the one place that decides which of our backends a test can run."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

from adamw._math import ReferenceState, reference_step
from adamw.options import BACKENDS, FUSED_BACKENDS

# --------------------------------------------------------------------------------------------------
# dtypes, backends, skip logic (the only place tests decide what can run)

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64)
# torch.optim.AdamW(fused=True) on the CPU takes these; our fused kernels are held to the same set.
FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# The backends that mirror torch op for op and must match it bit for bit.
MIRROR_BACKENDS = ("forloop", "foreach")

# Storage formats by name: AdamW's state_precision and param_update. "param" is torch's (states in
# the param's dtype, params rounded to nearest); the others are the low-bit formats (adamw.states),
# whose param_update applies to bfloat16 params (others are written back to nearest).
FORMATS: dict[str, dict[str, str]] = {
    "param": {"state_precision": "param", "param_update": "round"},
    "bf16": {"state_precision": "bf16", "param_update": "round"},
    "8bit": {"state_precision": "8bit", "param_update": "round"},
    "param-stochastic": {"state_precision": "param", "param_update": "stochastic"},
    "param-kahan": {"state_precision": "param", "param_update": "kahan"},
    "bf16-stochastic": {"state_precision": "bf16", "param_update": "stochastic"},
    "bf16-kahan": {"state_precision": "bf16", "param_update": "kahan"},
    "8bit-stochastic": {"state_precision": "8bit", "param_update": "stochastic"},
    "8bit-kahan": {"state_precision": "8bit", "param_update": "kahan"},
    "4bit": {"state_precision": "4bit", "param_update": "round"},
    "4bit-stochastic": {"state_precision": "4bit", "param_update": "stochastic"},
    "4bit-kahan": {"state_precision": "4bit", "param_update": "kahan"},
}


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


# Where a GPU is, Triton's interpreter is off (tests/conftest.py) and the Triton backend steps CUDA
# tensors only: a test that steps CPU tensors skips it there.
_TRITON_ON_CPU_TENSORS = "with a GPU, the Triton backend steps CUDA tensors; this test's are CPU tensors"


def backend_params(names: Iterable[str] = BACKENDS, *, on_backend_device: bool = False) -> list[Any]:
    """``pytest.param`` per backend, skipped (with the reason) where its module does not import, and
    Triton skipped where a GPU is unless the test puts its params on :func:`backend_device`
    (``on_backend_device=True``)."""
    out = []
    for name in names:
        reason = _missing_reason(name)
        if reason is None and name == "triton" and torch.cuda.is_available() and not on_backend_device:
            reason = _TRITON_ON_CPU_TENSORS
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        out.append(pytest.param(name, id=name, marks=marks))
    return out


def available_backends() -> list[str]:
    """Names of our backends whose modules import on this machine."""
    return [name for name in BACKENDS if _missing_reason(name) is None]


def skip_unsupported(
    backend: str, dtype: torch.dtype, *, differentiable: bool = False, lr: float | Tensor = 0.0, **_: Any
) -> None:
    """Skip a (backend, dtype, flags) combination that the backend rejects by design (as torch does).

    Takes AdamW's options; those that decide nothing here are ignored.
    """
    if backend in FUSED_BACKENDS and dtype not in FUSED_DTYPES:
        pytest.skip(f"fused kernels take {[str(d) for d in FUSED_DTYPES]} only, as torch's fused AdamW")
    if backend != "forloop" and differentiable:
        pytest.skip("only the for-loop path is differentiable (torch's foreach asserts, fused raises)")
    if backend == "foreach" and isinstance(lr, Tensor):
        pytest.skip("a Tensor lr needs capturable=True with foreach (CUDA only), in torch and ours alike")


def backend_device(backend: str) -> torch.device:
    """Where a backend's params live in tests: CUDA for Triton where there is a GPU, else the CPU
    (Triton's interpreter runs CPU tensors: tests/conftest.py sets TRITON_INTERPRET=1 without a GPU)."""
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


# torch's thread count when the tests start (a test may lower it: see one_thread).
THREADS = torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch (and the C kernels, which split their work as torch does) on ``n`` threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_thread() -> contextlib.AbstractContextManager[None]:
    """torch on one thread: on small tensors faster by far, and immune to a busy machine's other jobs
    (on two contended cores a step of a few thousand values can take 20x longer on two threads)."""
    return torch_threads(1)


def torch_counterpart(backend: str) -> dict[str, Any]:
    """The torch.optim.AdamW flags that run the implementation our ``backend`` is compared with."""
    if backend == "forloop":
        return {"foreach": False}
    if backend == "foreach":
        return {"foreach": True}
    return {"fused": True}


# Flag sets of the low-bit tests (the kernels against the reference, every backend's reproducibility).
LOW_BIT_FLAGS: dict[str, dict[str, Any]] = {
    "plain": dict(amsgrad=False, maximize=False, weight_decay=0.0, betas=(0.9, 0.999)),
    "amsgrad-wd": dict(amsgrad=True, maximize=False, weight_decay=0.1, betas=(0.9, 0.999)),
    # beta1 = 0.3: torch's lerp takes its other form (weight 0.7 >= 0.5)
    "maximize-amsgrad-lerp": dict(amsgrad=True, maximize=True, weight_decay=0.01, betas=(0.3, 0.99)),
}

# --------------------------------------------------------------------------------------------------
# the tolerance table: every tolerance a test allows, with its reason (and what was seen, where measured)


@dataclass(frozen=True)
class Tol:
    """|actual - expected| <= atol + rtol * |expected|, elementwise."""

    atol: float
    rtol: float
    reason: str

    def assert_close(self, actual: Tensor, expected: Tensor, what: str = "") -> None:
        torch.testing.assert_close(
            actual, expected, atol=self.atol, rtol=self.rtol, msg=lambda m: f"{what}: {m} ({self.reason})"
        )


@dataclass(frozen=True)
class Ulps:
    """A bound in units in the last place of a dtype, at a scale the user of the entry names."""

    ulps: float
    reason: str

    def of(self, dtype: torch.dtype, scale: float = 1.0) -> float:
        return self.ulps * torch.finfo(dtype.to_real()).eps * scale

    def tol(self, dtype: torch.dtype) -> Tol:
        """As a relative tolerance of ``dtype`` (no absolute part)."""
        return Tol(0.0, self.of(dtype), self.reason)


@dataclass(frozen=True)
class Drift:
    """A bound on how far a run drifts from another, relative to how far the params moved."""

    bound: float
    reason: str


@dataclass(frozen=True)
class RoundTrip:
    """|actual - expected| <= rel * |expected| + near_zero * max |expected| + 1e-12: relative to each
    value and, near 0, to a fraction of the tensor's largest (a code is relative to its block's absmax)."""

    rel: float
    reason: str
    near_zero: float | None = None  # default: rel / 100

    def assert_close(self, actual: Tensor, expected: Tensor, what: str = "") -> None:
        near_zero = self.rel / 100 if self.near_zero is None else self.near_zero
        atol = 1e-12 + near_zero * expected.abs().max().item()
        torch.testing.assert_close(
            actual, expected, atol=atol, rtol=self.rel, msg=lambda m: f"{what}: {m} ({self.reason})"
        )


# How far torch.optim.AdamW's own result (params and every moment) lands from the float64 reference
# after the 5 steps of test_reference.py (|actual - ref| <= atol + rtol * |ref|); ours is held to the
# same bound (and, more sharply, to no more error than torch's). Measured with each of torch's
# implementations over every flag set of test_reference.py (which re-checks it), then about 4x margin.
REFERENCE_TOL: dict[torch.dtype, Tol] = {
    torch.float64: Tol(2e-15, 2e-15, "float64 throughout; only the order of operations differs (seen 4.5e-16)"),
    torch.float32: Tol(1e-6, 1e-6, "float32 rounding of ~10 ops per step over 5 steps (seen 2.6e-7)"),
    torch.complex64: Tol(5e-7, 5e-7, "float32 per real component (view_as_real), as float32 (seen 1.5e-7)"),
    torch.bfloat16: Tol(4e-2, 4e-2, "8-bit mantissa, params and moments stored in bf16 each step (seen 1.0e-2)"),
    torch.float16: Tol(2.2e-2, 2.2e-2, "11-bit mantissa, moments stored in fp16 each step (seen 5.6e-3)"),
}


def reference_tol(dtype: torch.dtype, eps: float) -> Tol | None:
    """:data:`REFERENCE_TOL`, or None where no bound but torch's own error holds: where ``eps`` is 0 in
    the dtype (1e-8 in float16), a second moment that underflows to 0 makes torch's for-loop and
    foreach divide by zero (params go to inf), and ours with them."""
    if torch.tensor(eps, dtype=dtype.to_real()).item() == 0.0:
        return None
    return REFERENCE_TOL[dtype]


_MIRROR = Ulps(0, "torch's ops in torch's order: the bits of the torch implementation it mirrors")

# How far a backend's error against the float64 reference may exceed torch's on the same data
# (test_reference.py), per tensor and state entry, in ulps of the dtype at the largest reference value.
# Seen: over every flag set of test_reference.py, Triton under its interpreter.
SLACK: dict[str, dict[torch.dtype, Ulps]] = {
    "forloop": {dtype: _MIRROR for dtype in DTYPES},
    "foreach": {dtype: _MIRROR for dtype in DTYPES},
    "cpu": {
        torch.float32: Ulps(
            1, "torch's scalar tail (numel % vector width) rounds v = v*b2 + c*g*g twice, we fuse it (seen 0.49)"
        ),
        torch.float64: Ulps(1, "as float32: the tail's one extra rounding of the second moment (seen 0)"),
        torch.bfloat16: Ulps(
            1, "float32 math as torch; a last-bit float32 difference can flip a bf16 rounding (seen 0)"
        ),
        torch.float16: Ulps(1, "as bfloat16, with fp16's rounding (seen 0)"),
    },
    "triton": {
        torch.float64: Ulps(4, "float64 math in both; lerp vs mul+add rounds a few ulps apart (seen 1.2)"),
        torch.float32: Ulps(4, "torch's kernel keeps some products in double; on a GPU ours FMAs (seen 0.83)"),
        # Rounding of the stored states dominates and is the same (to nearest even); float32
        # intermediates rounded differently (FMAs on GPUs) can flip a stored value by one ulp.
        torch.bfloat16: Ulps(2, "storage rounding, as torch's; a flipped ulp allowed (seen 0)"),
        torch.float16: Ulps(2, "storage rounding, as torch's; a flipped ulp allowed (seen 0)"),
    },
}


def slack(backend: str, dtype: torch.dtype, ref: Tensor) -> float:
    """:data:`SLACK` as an absolute error, at the largest value of ``ref``."""
    largest = ref.abs().max().item() if ref.numel() else 0.0
    return SLACK[backend][dtype].of(dtype, largest)


# Our result against torch's (or ours against ours) where the two differ by design, each named for
# the comparison it bounds.
CLOSE: dict[str, Tol] = {
    "fused kernel vs torch's, float32 model": Tol(
        1e-6, 1e-5, "a few steps of a small float32 model; the kernels round a last bit apart (test_reference.py)"
    ),
    "fused kernel vs torch's, float32 model, bf16 autocast": Tol(
        1e-3, 1e-3, "a last-bit difference in a param flips bf16 roundings of the next forward (seen 1.1e-4)"
    ),
    "fused kernel vs torch's, after a checkpoint": Tol(
        1e-7, 1e-6, "three steps of float32 params of order 1 from the same state; last-bit roundings"
    ),
    "triton, tensor betas vs float betas": Tol(
        0.0, 2e-7, "in-kernel log(beta) vs the host's: equal to float64 rounding, so float32 results agree"
    ),
    "triton vs float64 reference, float32": Tol(1e-6, 1e-6, "float32 rounding over a few steps of order-1 params"),
    "triton vs for-loop, complex64": Tol(1e-7, 1e-6, "float32 math per real component, in another order"),
    "captured training vs eager": Tol(1e-6, 1e-5, "cuBLAS may pick other matmul kernels under capture than eagerly"),
    "triton vs torch's fused on a GPU, float32": Tol(
        1e-6, 1e-6, "torch's kernel computes in double, ours in float32: a few ulps apart"
    ),
    "triton vs torch's fused on a GPU, bfloat16": Tol(1.6e-2, 1.6e-2, "as float32, then one bf16 rounding apart"),
    "exp_avg_sq after five format conversions": Tol(
        0.0, 0.1, "two 8-bit passes, each within the ladder's half-gap of sqrt(v) squared, and bf16's 2^-8"
    ),
    "C kernel from the cache vs torch's for-loop": Tol(
        1e-5, 1.3e-6, "torch's float32 default: a check that a loaded library steps (accuracy: test_reference.py)"
    ),
    "low-bit C kernel from the cache vs its reference": Tol(
        1e-5, 1e-4, "a check that a loaded library steps, 8-bit (the bits: test_low_bit_kernels.py)"
    ),
}


# |distributed - single process| <= ulps * float32 eps * max |single process|, per tensor and format
# (test_distributed.py: params and every state entry, 8-bit moments decoded). The runs differ only in
# how the gradient of the mean loss is summed (two half batches averaged over ranks vs one batch), a
# difference of float32 rounding that Adam carries on; low-bit formats amplify it (a flipped rounding
# is a whole bf16 step or 8-bit code), and under FSDP2 their stochastic-rounding counters and 8-bit
# blocks follow the local shard.
DISTRIBUTED_TOL: dict[str, Ulps] = {
    "param": Ulps(32, "float32 rounding of the gradient reduction, 4 steps (seen 19.6 ulps, exp_avg)"),
    "bf16": Ulps(16 * 2**16, "flipped stochastic roundings of bf16 moments (seen 8.5 bf16 steps, exp_avg)"),
    "8bit": Ulps(2**19, "per-shard blocks and flipped codes (seen 3.3e5 ulps = 4% of max, exp_avg)"),
    "4bit": Ulps(2**21, "per-shard blocks and flipped 4-bit codes (seen 9.7e5 ulps = 12% of max)"),
    "bf16-stochastic": Ulps(48 * 2**16, "flipped roundings of bf16 params and moments (seen 20.4 bf16 steps)"),
    "bf16-kahan": Ulps(32 * 2**16, "flipped roundings of bf16 params and moments (seen 13.9 bf16 steps)"),
}


# How far a low-bit format drifts from float32 AdamW (test_low_bit_optimizer.py), per (format, run):
# in norm after 50 steps of row-scaled grads (1e-2 .. 1e2, with a drift), and in the largest element
# per param of a group of odd shapes after 20 steps. Each run is seeded: what was seen is what runs.
DRIFT: dict[tuple[str, str], Drift] = {
    ("bf16", "row-scaled"): Drift(0.01, "bf16 moments: ~2^-9 relative noise per step (seen 0.0035)"),
    ("8bit", "row-scaled"): Drift(0.04, "the ladder's error: <= 4.3% in m, <= 2.2% in sqrt(v) (seen 0.036)"),
    ("param-stochastic", "row-scaled"): Drift(0.04, "bf16 params carry ~2^-9 of |p| each step (seen 0.015)"),
    ("param-kahan", "row-scaled"): Drift(0.01, "compensated bf16 params: the moments' bf16 noise (seen 0.0041)"),
    ("8bit-stochastic", "row-scaled"): Drift(0.06, "both errors above (seen 0.039)"),
    ("bf16", "odd-shapes"): Drift(0.05, "bf16 moments: 2^-8 per stored value, partly averaged (seen 0.0065)"),
    ("8bit", "odd-shapes"): Drift(0.15, "8-bit codes: ~4% relative error on m, ~2% on sqrt(v) (seen 0.073)"),
    ("param-stochastic", "odd-shapes"): Drift(
        0.8,
        "each store loses up to 2^-8 of |p| ~ 1 >> lr: unbiased, noisy (seen 0.53; the largest element's "
        "error is a max of random walks: 0.44-1.12 over seeds 0-7; params rounded to nearest: 1.12)",
    ),
    ("param-kahan", "odd-shapes"): Drift(0.1, "compensated bf16 params: the moments' bf16 noise (seen 0.092)"),
    ("8bit-stochastic", "odd-shapes"): Drift(0.8, "as param-stochastic, with 8-bit codes' error on top (seen 0.58)"),
    ("4bit", "row-scaled"): Drift(0.25, "4-bit codes: <= 17% relative error in m, <= 18% in sqrt(v) (seen 0.208)"),
    ("4bit-stochastic", "row-scaled"): Drift(0.25, "4-bit codes' error; bf16 params' noise is far below it (seen 0.210)"),
    ("4bit", "odd-shapes"): Drift(0.5, "4-bit codes: m under 1/16 of its block's absmax stored as 0 (seen 0.37)"),
    ("4bit-stochastic", "odd-shapes"): Drift(0.8, "as param-stochastic, with 4-bit codes' error on top (seen 0.63)"),
}

# A torch checkpoint converted into a low-bit format and back, against torch's own values.
ROUND_TRIP: dict[str, RoundTrip] = {
    "8bit": RoundTrip(0.05, "the codes' relative half-gap (4.3%)"),
    "4bit": RoundTrip(
        0.34, "v's octave ladder: <= 1/3 relative; m under 1/16 of its block's absmax stored as 0", near_zero=1 / 16
    ),
    "bf16": RoundTrip(0.01, "bf16's 2^-8 relative rounding"),
}

# As CLOSE, relative to the dtype's precision (Ulps.tol(dtype)): comparisons over several dtypes.
CLOSE_ULPS: dict[str, Ulps] = {
    "fused kernel vs torch's, mixed dtypes": Ulps(4, "one group of float32, bfloat16 and float64 params, 3 steps"),
    "fused kernel vs torch's, GradScaler": Ulps(2, "unscaled in the kernel as torch's; a last-bit rounding apart"),
}

# --------------------------------------------------------------------------------------------------
# params and grads

# Gradient magnitude per param: the small one makes sqrt(v) comparable with eps (so where eps applies
# shows), the large one makes the second moment dominate.
_GRAD_SCALES = (1.0, 0.05, 3.0, 1.0, 0.5, 2.0)


def randn(shape: Sequence[int], dtype: torch.dtype, gen: torch.Generator) -> Tensor:
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
        randn((), dtype, gen),
        randn((0, 3), dtype, gen),
        randn((3, 4), dtype, gen),
        randn((4, 3), dtype, gen).t(),
        randn((6, 5), dtype, gen)[::2, 1:],
        randn((5,), dtype, gen),
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
        g = randn(p.shape, p.dtype, gen) * _GRAD_SCALES[i % len(_GRAD_SCALES)]
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


def as_real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def bits(t: Tensor) -> Tensor:
    """The bytes of ``t``'s values, on the CPU: equal bits, so NaN payloads and the sign of zero count."""
    return as_real(t.detach().cpu()).reshape(-1).contiguous().view(torch.uint8)


def assert_bitwise(actual: Tensor, expected: Tensor, what: str, *, same_device: bool = True) -> None:
    """The same dtype, shape, device and bits. With ``same_device`` off (a CUDA run against the CPU
    reference) a NaN's sign and payload are the hardware's, not ours (x86 makes inf - inf a negative
    NaN, CUDA a positive one): there NaNs must sit at the same places, every other value bit for bit."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if same_device:
        assert actual.device == expected.device, f"{what}: device {actual.device} != {expected.device}"
    a = as_real(actual.detach().cpu())
    b = as_real(expected.detach().cpu())
    if not same_device and a.is_floating_point():
        both_nan = a.isnan() & b.isnan()
        a, b = a.masked_fill(both_nan, 0), b.masked_fill(both_nan, 0)
    if not torch.equal(bits(a), bits(b)):
        differ = (bits(a).view(-1, a.element_size()) != bits(b).view(-1, b.element_size())).any(1).sum().item()
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        nan_places = (a64.isnan() != b64.isnan()).sum().item()
        neither_nan = ~(a64.isnan() | b64.isnan())
        diff = (a64 - b64)[neither_nan].abs().max().item() if neither_nan.any() else 0.0
        raise AssertionError(
            f"{what}: not bitwise equal, {differ} of {a.numel()} differ (max |diff| where neither is NaN "
            f"{diff:.3e}; NaN in one only at {nan_places})"
        )


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
    what: str = "",
    *,
    same_device: bool = True,
) -> None:
    """Params (and their strides) and every state entry (step, moments, 8-bit codes and absmaxes,
    Kahan buffers) bit for bit; ``same_device=False`` where one run is on a GPU, the other the CPU."""
    prefix = f"{what}, " if what else ""
    for i, (a, b) in enumerate(zip(our_params, their_params, strict=True)):
        assert_bitwise(a, b, f"{prefix}param {i}", same_device=same_device)
        assert a.stride() == b.stride(), f"{prefix}param {i}: stride {a.stride()} != {b.stride()}"
        state_a, state_b = ours.state.get(a, {}), theirs.state.get(b, {})
        assert state_a.keys() == state_b.keys(), f"{prefix}param {i}: state keys {set(state_a)} != {set(state_b)}"
        for key in state_b:
            if isinstance(state_b[key], Tensor) and not same_device:
                assert_bitwise(state_a[key], state_b[key], f"{prefix}param {i} state[{key!r}]", same_device=False)
            else:
                assert_same_value(state_a[key], state_b[key], f"{prefix}param {i} state[{key!r}]")


def leaves(init: Sequence[Tensor], device: torch.device | str = "cpu") -> list[Tensor]:
    """Parameters with ``init``'s values and layout on ``device`` (a transposed view stays transposed, a
    strided slice keeps its strides)."""
    out = []
    for p in init:
        copy = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=device).copy_(p)
        out.append(torch.nn.Parameter(copy))
    return out


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
    return as_real(t.detach()).to(torch.float64)


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
