"""The low-bit kernels (the C one, ``fused=True`` on CPU tensors; the Triton one, ``backend="triton"``)
against the low-bit reference, bit for bit.

Two AdamW optimizers on copies of the same params, one running a kernel and one with
``backend="forloop"`` (the reference, :func:`adamw.backends.forloop.reference_step`), same ``state_precision``,
``param_update`` and ``seed``; after every step the params and every state entry must be equal bit for
bit, with no tolerance (tests/test_low_bit_reproducible.py holds every backend to the same). Both kernels
round every operation as the reference does.

Where no GPU is, the Triton kernel runs on CPU tensors under Triton's interpreter (tests/conftest.py
sets ``TRITON_INTERPRET=1``), slowly: it takes fewer and smaller cases, and the exhaustive code checks
run for it on a GPU only. On a GPU its params are CUDA tensors and the reference's CPU copies.
After the shared tests, each kernel's own: the C kernel's kept tables and calls, the Triton kernel's
kept launches and its GPU compilation.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import gc
import os
import shutil
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

import adamw
from _helpers import (
    LOW_BIT_FLAGS,
    assert_bitwise,
    assert_same_run,
    backend_device,
    backend_params,
    leaves,
    one_thread,
)
from adamw.states.formats import INT4, INT8, BlockwiseFormat
from adamw.states.quantize import Code, unpack_nibbles

STEPS = 3
SEED = 1234
CPU = torch.device("cpu")
CUDA = torch.cuda.is_available()

f32, bf16, f16, f64, c64 = torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64


# Per case: state_precision, param_update, and the dtypes of the params (their shapes: Kernel.shapes).
Case = tuple[str, str, list[torch.dtype]]


@dataclass(frozen=True)
class Kernel:
    """A low-bit kernel under test: ``options`` pick it in AdamW, its params live on ``device`` (the
    reference's on the CPU), ``cases`` name a :data:`Case` each and ``shapes`` are the params' shapes
    (the second one is stepped as a transposed view, run through contiguous copies)."""

    name: str
    options: dict[str, Any]
    device: torch.device
    cases: dict[str, Case]
    shapes: list[tuple[int, ...]]

    def make_params(self, dtypes: list[torch.dtype]) -> list[Tensor]:
        gen = torch.Generator().manual_seed(0)
        params = []
        for dtype, shape in zip(dtypes, self.shapes, strict=False):
            p = torch.randn(shape, generator=gen, dtype=c64 if dtype.is_complex else f32)
            params.append(p.to(dtype))
        params[1] = params[1].t()
        return params

    def pair(self, init: list[Tensor], state_precision: str, param_update: str, **flags: Any) -> tuple[Any, ...]:
        """The kernel's optimizer and the reference's, each on its own copies of ``init``."""
        params, ref_params = leaves(init, self.device), leaves(init, CPU)
        options = dict(lr=1e-2, state_precision=state_precision, param_update=param_update, seed=SEED, **flags)
        ours = adamw.AdamW(params, **options, **self.options)
        ref = adamw.AdamW(ref_params, **options, backend="forloop")
        return ours, ref, params, ref_params

    def contiguous_pair(self, case: str, flags: dict[str, Any]) -> tuple[Any, ...]:
        """As :meth:`pair` for ``case``, with every param contiguous (nothing needs a staged copy)."""
        state_precision, param_update, dtypes = self.cases[case]
        init = [p.contiguous() for p in self.make_params(dtypes)]
        return self.pair(init, state_precision, param_update, **flags)

    def step_both(
        self, ours: Any, ref: Any, params: list[Tensor], ref_params: list[Tensor], grads: list[Tensor]
    ) -> None:
        for p, q, g in zip(params, ref_params, grads, strict=True):
            p.grad, q.grad = g.to(self.device, copy=True), g.clone()
        ours.step()  # on torch's threads: the C kernel splits its work across them
        with one_thread():
            ref.step()

    def assert_same_run(self, ours: Any, ref: Any, params: list[Tensor], ref_params: list[Tensor], step: int) -> None:
        assert_same_run(ours, ref, params, ref_params, f"step {step}", same_device=self.device == CPU)

    def run_against_reference(self, case: str, flags: str) -> list[Tensor]:
        """STEPS steps of ``case`` with ``flags``, the kernel against the reference after every step;
        the kernel's params."""
        state_precision, param_update, dtypes = self.cases[case]
        init = self.make_params(dtypes)
        ours, ref, params, ref_params = self.pair(init, state_precision, param_update, **LOW_BIT_FLAGS[flags])
        for step, step_grads in enumerate(make_grads(init, STEPS), 1):
            self.step_both(ours, ref, params, ref_params, step_grads)
            self.assert_same_run(ours, ref, params, ref_params, step)
        return params


# Shapes: 4196 values (8-bit: a short last block; for Triton the last program has a short block and
# one wholly past the end), a transposed 64x72, a small one (float32 moments under "8bit" and "4bit": a
# group mixing quantized and float32 moments; on the CPU 21x13, a whole 256-value block and a short
# one, so that float32 moments take the C kernel's fast path too), and a fourth param (on the CPU of an odd size, 5003: its last
# 256 values are a whole 4-bit block and a short one, whose last byte holds one code). Extras test
# what the kernels route elsewhere: a float64 param (the reference steps it) and a complex64 one (its
# real view, quantized).
KERNELS = {
    "cpu": Kernel(
        "cpu",
        {"fused": True},
        CPU,
        {
            "8bit": ("8bit", "round", [f32, f32, f32, c64]),
            "bf16": ("bf16", "round", [f32, bf16, f16, f64]),
            "param-stochastic": ("param", "stochastic", [bf16, bf16, f16, bf16]),  # float16: moments in float16
            "param-kahan": ("param", "kahan", [bf16, bf16, f32, bf16]),  # float32: plain, float32 moments
            "8bit-stochastic": ("8bit", "stochastic", [bf16, f32, bf16, bf16]),
            "8bit-kahan": ("8bit", "kahan", [bf16, f16, bf16, f32]),  # float16: rounded to nearest
            "4bit": ("4bit", "round", [f32, c64, f32, f32]),  # the complex64 one transposed
            "4bit-stochastic": ("4bit", "stochastic", [bf16, f32, bf16, bf16]),
            "4bit-kahan": ("4bit", "kahan", [bf16, f16, bf16, f16]),
        },
        [(4196,), (72, 64), (21, 13), (5003,)],
    ),
    # The interpreter is slow: three params where the fourth adds no route, and no 8bit-kahan or
    # 4bit-kahan. The first param has 4197 values: odd, so its last 4-bit block is short and its last
    # byte holds one code.
    "triton": Kernel(
        "triton",
        {"backend": "triton"},
        backend_device("triton"),
        {
            "8bit": ("8bit", "round", [f32, f32, f32, c64]),
            # a float64 param is stepped by the torch-ops reference on its own device, whose addcdiv
            # rounds differently on CUDA than the CPU reference's: on a GPU the case leaves it out
            "bf16": ("bf16", "round", [f32, bf16, f16] if CUDA else [f32, bf16, f16, f64]),
            "param-stochastic": ("param", "stochastic", [bf16, bf16, f16]),
            "param-kahan": ("param", "kahan", [bf16, bf16, f32]),
            "8bit-stochastic": ("8bit", "stochastic", [bf16, f32, bf16]),
            "4bit": ("4bit", "round", [f32, f32, f32]),
            "4bit-stochastic": ("4bit", "stochastic", [bf16, f16, bf16]),  # float16: rounded to nearest
        },
        [(4197,), (72, 64), (7, 5), (2100,)],
    ),
}

# Kernels for the exhaustive code checks: Triton's interpreter would take minutes over them.
EXHAUSTIVE = ["cpu", "triton"] if CUDA else ["cpu"]

# The quantized formats the code checks run over, by state_precision.
QUANTIZED: dict[str, BlockwiseFormat] = {"8bit": INT8, "4bit": INT4}


def stored_codes(precision: str, x: Tensor, key: str = "exp_avg") -> tuple[Tensor, Tensor]:
    """Moment ``key``'s codes and absmaxes as the state holds them for the float32 values ``x``: the
    definition (:mod:`adamw.states.quantize`), through the format's own encoder."""
    fmt = QUANTIZED[precision]
    entries = fmt.zeros(x, key)
    fmt.encode(entries, key, x)
    return entries[key], entries[key + "_absmax"]


def code_numbers(precision: str, codes: Tensor, numel: int) -> Tensor:
    """One code per value, flat (4-bit codes unpacked)."""
    return unpack_nibbles(codes.reshape(-1), numel) if precision == "4bit" else codes.reshape(-1)


def kernel_params(names: list[str], each: Callable[[Kernel], list[tuple[Any, ...]]] = lambda k: [()]) -> list[Any]:
    """``pytest.param(kernel, *rest)`` for every ``rest`` of ``each(kernel)``, skipped where the
    kernel's backend does not import (no triton)."""
    out = []
    for backend in backend_params(names, on_backend_device=True):
        kernel = KERNELS[backend.values[0]]
        for rest in each(kernel):
            ids = "-".join([kernel.name, *(str(r) for r in rest)])
            out.append(pytest.param(kernel, *rest, id=ids, marks=backend.marks))
    return out


def make_grads(params: list[Tensor], steps: int, scale: float = 1.0) -> list[list[Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        grads = []
        for p in params:
            g = torch.randn(p.shape, generator=gen, dtype=c64 if p.is_complex() else f32)
            grads.append((g * scale).to(p.dtype))
        out.append(grads)
    return out


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of params each call of the C kernel took (so a test fails if it never ran)."""
    from adamw.backends import cpu_low_bit

    counted: list[int] = []
    library = cpu_low_bit.library()
    original = library.step_fn

    def counting(table: int, n: int, *args: Any) -> int:
        counted.append(n)
        return original(table, n, *args)

    monkeypatch.setattr(cpu_low_bit, "library", lambda: dataclasses.replace(library, step_fn=counting))
    return counted


@pytest.fixture
def no_fallback(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The C kernel steps every param itself: a param handed to the reference fails the test (where
    the reference's run would agree with itself trivially)."""
    if request.getfixturevalue("kernel").name != "cpu":
        return
    from adamw.backends import cpu_low_bit

    def refuse(*args: Any) -> None:
        raise AssertionError("the C kernel handed a param to the reference")

    monkeypatch.setattr(cpu_low_bit, "reference_step", refuse)


@pytest.fixture
def builds(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of params of each table (C) or launch (Triton) built: a kept one is not built again."""
    kernel: Kernel = request.getfixturevalue("kernel")
    counted: list[int] = []
    if kernel.name == "cpu":
        from adamw.backends import cpu_low_bit as module

        name = "_build"

        def count(params: list[Tensor], *args: Any) -> int:
            return len(params)
    else:
        from adamw.backends import triton as module

        name = "_low_bit_launch"

        def count(key: Any, positions: list[int], *args: Any) -> int:
            return len(positions)

    original = getattr(module, name)

    def counting(*args: Any) -> Any:
        counted.append(count(*args))
        return original(*args)

    monkeypatch.setattr(module, name, counting)
    return counted


# --------------------------------------------------------------------------------------------------
# both kernels


def _case_flags(kernel: Kernel) -> list[tuple[str, str]]:
    return [(case, flags) for case in kernel.cases for flags in LOW_BIT_FLAGS]


@pytest.mark.parametrize(("kernel", "case", "flags"), kernel_params(["cpu", "triton"], _case_flags))
def test_matches_reference(kernel: Kernel, case: str, flags: str, request: pytest.FixtureRequest) -> None:
    counted = request.getfixturevalue("calls" if kernel.name == "cpu" else "builds")
    params = kernel.run_against_reference(case, flags)
    expected = sum(p.dtype != f64 for p in params)
    if kernel.name == "cpu":
        assert counted == [expected] * STEPS, "one kernel call per step, for every param it takes"
    else:  # launches built anew every step (the transposed param is staged: nothing is kept)
        assert sum(counted) == expected * STEPS, "launched every step for every param it takes"


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize(("kernel", "precision"), kernel_params(["cpu", "triton"], lambda k: [(p,) for p in QUANTIZED]))
def test_codes_on_midpoints(kernel: Kernel, precision: str) -> None:
    """Values exactly on the signed code's float32 midpoints (which take the smaller magnitude) and
    one float32 step either side: the kernel's codes are quantize()'s, the definition. With beta1 = 0
    the new exp_avg is the grad itself, in the kernel and in the reference."""
    _, mids = QUANTIZED[precision].codes["exp_avg"].tables()
    up, down = torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(0.0))
    one, zero = torch.ones(1), torch.zeros(1)
    pieces = [  # each a block of 256 (8-bit) or 16 (4-bit, so that every block of 128 holds all four)
        torch.cat([one, mids, up, zero]),
        torch.cat([-one, -mids, -down, -zero]),
        torch.cat([one, down, -mids, -one]),
        torch.cat([one / 2, up / 2, -down / 2, one / 4]),
    ]  # every block's largest magnitude is 1: y = x / absmax is exact
    grad = torch.cat(pieces * (4100 // (4 * len(pieces[0])) + 1))[:4100]  # the last block short
    init = [torch.randn(grad.numel())]
    ours, ref, params, ref_params = kernel.pair(init, precision, "round", betas=(0.0, 0.999), weight_decay=0.0)
    kernel.step_both(ours, ref, params, ref_params, [grad])
    codes, absmax = stored_codes(precision, grad)
    assert_bitwise(ours.state[params[0]]["exp_avg"].cpu(), codes, "codes")
    assert_bitwise(ours.state[params[0]]["exp_avg_absmax"].cpu(), absmax, "absmax")
    kernel.assert_same_run(ours, ref, params, ref_params, 1)


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize(("kernel", "precision"), kernel_params(EXHAUSTIVE, lambda k: [(p,) for p in QUANTIZED]))
def test_unsigned_codes_over_the_range(kernel: Kernel, precision: str) -> None:
    """exp_avg_sq's codes over its whole ladder (8-bit: 2^-32 .. 1 of the absmax, 4-bit: 2^-15 .. 1,
    and below): with beta1 = 0 and beta2 = 0 the new exp_avg_sq is g*g, and grads spread over
    2^-17 .. 1 hit every code."""
    n, size = 32 * 256, QUANTIZED[precision].block_size
    block = torch.exp2(torch.linspace(-17.0, 0.0, size))  # the largest is 1: the absmax of its block
    jitter = torch.exp2(torch.rand(n // size, size, generator=torch.Generator().manual_seed(2)) / 8)  # within a step
    grad = (block * jitter).clamp(max=1.0).reshape(-1)
    grad = grad * torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0)
    init = [torch.randn(n)]
    ours, ref, params, ref_params = kernel.pair(init, precision, "round", betas=(0.0, 0.0), weight_decay=0.0)
    kernel.step_both(ours, ref, params, ref_params, [grad])
    codes = code_numbers(precision, ref.state[ref_params[0]]["exp_avg_sq"], n)
    assert len(torch.unique(codes)) > (200 if precision == "8bit" else 15)
    kernel.assert_same_run(ours, ref, params, ref_params, 1)


def _flags_and_formats(kernel: Kernel) -> list[tuple[str, str]]:
    return [(flags, precision) for flags in LOW_BIT_FLAGS for precision in QUANTIZED]


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize(("kernel", "flags", "precision"), kernel_params(EXHAUSTIVE, _flags_and_formats))
def test_codes_of_random_bit_patterns(kernel: Kernel, flags: str, precision: str) -> None:
    """Whole blocks of arbitrary float32 magnitudes in [0, 1] (random bit patterns: every exponent,
    subnormals and zeros included), each block's absmax 1 so that y = x: the kernel's codes are
    quantize()'s, over three steps (decoding what it encoded)."""
    gen = torch.Generator().manual_seed(3)
    n = 64 * 256
    grads = []
    for _ in range(STEPS):
        raw = torch.randint(0, 0x3F800001, (n,), generator=gen, dtype=torch.int32).view(torch.float32)
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        g = (raw * sign).reshape(-1, QUANTIZED[precision].block_size)
        g[:, 0] = 1.0
        g[1::7] = 0.0  # whole zero blocks
        grads.append([g.reshape(-1)])
    init = [torch.randn(n, generator=gen)]
    options = {**LOW_BIT_FLAGS[flags], "betas": (0.0, 0.0)}
    ours, ref, params, ref_params = kernel.pair(init, precision, "round", **options)
    for step, step_grads in enumerate(grads, 1):
        kernel.step_both(ours, ref, params, ref_params, step_grads)
        kernel.assert_same_run(ours, ref, params, ref_params, step)
        if not LOW_BIT_FLAGS[flags]["maximize"]:
            codes, _ = stored_codes(precision, step_grads[0])
            assert_bitwise(ours.state[params[0]]["exp_avg"].cpu(), codes, f"step {step}, codes")


def test_a_cuda_run_is_compared_with_the_reference_up_to_nan_payloads() -> None:
    """test_non_finite_and_extreme_values compares a CUDA run with the CPU reference: a NaN's sign and
    payload there are the hardware's (x86 makes inf - inf a negative NaN, CUDA a positive one), every
    other bit, the sign of zero and where the NaNs sit included, still counts."""
    a = torch.tensor([1.0, float("nan"), 2.0])
    negative_nan = a.clone()
    negative_nan.view(torch.int32)[1] |= -(2**31)
    assert_bitwise(a, negative_nan, "NaN signs", same_device=False)
    with pytest.raises(AssertionError, match="1 of 3 differ"):
        assert_bitwise(a, negative_nan, "on one device, NaN signs")
    zero, negative_zero = a.clone(), a.clone()
    zero[2], negative_zero[2] = 0.0, -0.0
    with pytest.raises(AssertionError, match="1 of 3 differ"):
        assert_bitwise(zero, negative_zero, "signed zeros", same_device=False)
    moved = a.clone()
    moved[0] = float("nan")
    with pytest.raises(AssertionError, match="NaN in one only at 1"):
        assert_bitwise(moved, a, "a NaN elsewhere", same_device=False)


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize(("kernel", "flags", "precision"), kernel_params(EXHAUSTIVE, _flags_and_formats))
def test_non_finite_and_extreme_values(kernel: Kernel, flags: str, precision: str) -> None:
    """NaN, infinities, huge (v overflows), tiny and subnormal grads and signed zeros in whole blocks
    (and a short last one): a NaN or infinity propagates to the block's absmax as in the reference,
    and every output stays bitwise."""
    gen = torch.Generator().manual_seed(4)
    n = 24 * 256 + 100
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38, -1e30, 1e-40, -1e-45, 0.0, -0.0, 1e-20])
    grads = []
    for _ in range(STEPS):
        g = torch.randn(n, generator=gen)
        where = torch.randint(0, n, (40,), generator=gen)
        g[where] = specials[torch.randint(0, len(specials), (40,), generator=gen)]
        g[5 * 256 : 6 * 256] = 0.0
        g[7 * 256 : 8 * 256] = -0.0
        g[9 * 256 : 10 * 256] *= 1e-30
        g[11 * 256 : 12 * 256] *= 1e-39  # subnormal moments, and a subnormal absmax
        grads.append([g])
    init = [torch.randn(n, generator=gen)]
    ours, ref, params, ref_params = kernel.pair(init, precision, "round", **LOW_BIT_FLAGS[flags])
    for step, step_grads in enumerate(grads, 1):
        kernel.step_both(ours, ref, params, ref_params, step_grads)
        kernel.assert_same_run(ours, ref, params, ref_params, step)


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize(("kernel", "precision"), kernel_params(EXHAUSTIVE, lambda k: [(p,) for p in QUANTIZED]))
def test_codes_near_midpoints_of_any_absmax(kernel: Kernel, precision: str) -> None:
    """Blocks whose absmax is not a power of two (y = x / absmax is rounded) with values a few ulps
    either side of midpoint * absmax: the codes of the correctly rounded quotient, as quantize()."""
    gen = torch.Generator().manual_seed(5)
    fmt = QUANTIZED[precision]
    _, mids = fmt.codes["exp_avg"].tables()
    size = fmt.block_size - 1  # values beside each block's absmax
    blocks = []
    for _ in range(48 * 256 // fmt.block_size):
        absmax = 1.0 + torch.rand(1, generator=gen) * (1 - 2**-20)
        absmax = absmax * 2.0 ** torch.randint(-20, 20, (1,), generator=gen).float()
        pick = mids[torch.randint(0, len(mids), (size,), generator=gen)]
        x = (pick * absmax).view(torch.int32) + torch.randint(-4, 5, (size,), generator=gen, dtype=torch.int32)
        x = x.view(torch.float32) * torch.where(torch.rand(size, generator=gen) < 0.5, -1.0, 1.0)
        blocks.append(torch.cat([absmax, x]))
    grad = torch.cat(blocks)
    init = [torch.randn(grad.numel(), generator=gen)]
    for flags in ({"betas": (0.0, 0.0), "amsgrad": True}, {"betas": (0.0, 0.999)}):
        ours, ref, params, ref_params = kernel.pair(init, precision, "round", weight_decay=0.0, **flags)
        kernel.step_both(ours, ref, params, ref_params, [grad])
        codes, absmax = stored_codes(precision, grad)
        assert_bitwise(ours.state[params[0]]["exp_avg"].cpu(), codes, "codes")
        assert_bitwise(ours.state[params[0]]["exp_avg_absmax"].cpu(), absmax, "absmax")
        kernel.assert_same_run(ours, ref, params, ref_params, 1)


# --------------------------------------------------------------------------------------------------
# what each kernel keeps from step to step: the C kernel a table per group, the Triton kernel its
# launches (built on the first step, then only the grads' addresses, the rounding keys and the step
# scalars change, derived from the counters bit for bit as the reference does)


def _reusable(kernel: Kernel) -> list[str]:
    return [case for case, (_, _, dtypes) in kernel.cases.items() if f64 not in dtypes]


def _kept_cases(kernel: Kernel) -> list[tuple[str, str]]:
    # The C kernel over every flag set; the interpreter over one.
    flags = list(LOW_BIT_FLAGS) if kernel.name == "cpu" else ["maximize-amsgrad-lerp"]
    return [(case, f) for case in _reusable(kernel) for f in flags]


@pytest.mark.parametrize(("kernel", "case", "flags"), kernel_params(["cpu", "triton"], _kept_cases))
def test_kept_from_the_first_step_match_reference(
    kernel: Kernel, case: str, flags: str, builds: list[int], request: pytest.FixtureRequest
) -> None:
    counted = request.getfixturevalue("calls") if kernel.name == "cpu" else None
    steps = 5 if kernel.name == "cpu" else 4
    ours, ref, params, ref_params = kernel.contiguous_pair(case, LOW_BIT_FLAGS[flags])
    for step, step_grads in enumerate(make_grads(params, steps), 1):
        kernel.step_both(ours, ref, params, ref_params, step_grads)
        kernel.assert_same_run(ours, ref, params, ref_params, step)
        if step == 1:
            first = list(builds)
    assert sum(first) == len(params) and builds == first, "built on the first step for every param, then kept"
    if counted is not None:
        assert first == [len(params)], "one table for the group"
        assert counted == [len(params)] * steps


MOVES: dict[str, Callable[[Any, list[Tensor]], Any]] = {
    # new state tensors, loaded from a checkpoint (a copy: loading the live state dict keeps its tensors)
    "load_state_dict": lambda opt, params: opt.load_state_dict(copy.deepcopy(opt.state_dict())),
    # a param moved to new memory (as some wrappers do with .data)
    "param.data": lambda opt, params: setattr(params[0], "data", params[0].data.clone()),
    # a moment replaced by hand
    "state entry": lambda opt, params: opt.state[params[-1]].__setitem__(
        "exp_avg", opt.state[params[-1]]["exp_avg"].clone()
    ),
    # float64 step counters (e.g. from a checkpoint of another optimizer)
    "float64 steps": lambda opt, params: [s.__setitem__("step", s["step"].double()) for s in opt.state.values()],
}


def _move_cases(kernel: Kernel) -> list[tuple[str, str]]:
    if kernel.name == "cpu":
        return [(case, move) for case in ("8bit", "8bit-kahan", "4bit", "param-stochastic") for move in MOVES]
    return [("8bit-stochastic", move) for move in MOVES if move != "float64 steps"]


@pytest.mark.parametrize(("kernel", "case", "move"), kernel_params(["cpu", "triton"], _move_cases))
def test_kept_are_rebuilt_when_memory_moves(kernel: Kernel, case: str, move: str, builds: list[int]) -> None:
    """Whatever moves a param or state entry (or changes a counter's dtype) between steps makes the
    next step build anew; stepping stays bitwise the reference's."""
    ours, ref, params, ref_params = kernel.contiguous_pair(case, LOW_BIT_FLAGS["amsgrad-wd"])
    grads = make_grads(params, 5 if kernel.name == "cpu" else 4)
    for step in (1, 2):
        kernel.step_both(ours, ref, params, ref_params, grads[step - 1])
    built = list(builds)
    assert built == [len(params)] if kernel.name == "cpu" else sum(built) == len(params)
    MOVES[move](ours, params)
    MOVES[move](ref, ref_params)
    for step in range(3, len(grads) + 1):
        kernel.step_both(ours, ref, params, ref_params, grads[step - 1])
        kernel.assert_same_run(ours, ref, params, ref_params, step)
    assert builds == built * 2, "rebuilt once, after the move, then kept"


# --------------------------------------------------------------------------------------------------
# the C kernel's own


def _contiguous_but_transposed(g: Tensor) -> Tensor:
    """``g``'s values in column-major memory (a non-contiguous tensor of the same shape)."""
    return torch.empty_strided(g.shape, (1, g.shape[0]), dtype=g.dtype).copy_(g)


@pytest.mark.parametrize("kernel", kernel_params(["cpu"]))
def test_a_non_contiguous_grad_is_staged_for_its_step_only(kernel: Kernel, builds: list[int]) -> None:
    ours, ref, params, ref_params = kernel.contiguous_pair("8bit", LOW_BIT_FLAGS["plain"])
    assert params[1].dim() == 2
    grads = make_grads(params, 4)
    grads[2][1] = _contiguous_but_transposed(grads[2][1])
    for step, step_grads in enumerate(grads, 1):
        for p, q, g in zip(params, ref_params, step_grads, strict=True):
            p.grad, q.grad = g.clone(memory_format=torch.preserve_format), g.clone()
        assert params[1].grad.is_contiguous() == (step != 3)
        ours.step()
        with one_thread():
            ref.step()
        kernel.assert_same_run(ours, ref, params, ref_params, step)
    # built on step 1, then for the staged grad of step 3 (not kept); step 4 fits step 1's again
    assert builds == [len(params)] * 2


def test_kept_tables_hold_no_tensors() -> None:
    """A C kernel's table cached for reuse keeps pointers, not tensors: dropping the model frees its memory."""
    params = [torch.nn.Parameter(torch.randn(5000)) for _ in range(3)]
    opt = adamw.AdamW(params, fused=True, state_precision="8bit")
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    watched = [weakref.ref(params[0]), weakref.ref(opt.state[params[0]]["exp_avg"]), weakref.ref(params[0].grad)]
    del params, opt, p
    gc.collect()
    assert all(ref() is None for ref in watched)


@pytest.mark.parametrize("kernel", kernel_params(["cpu"]))
@pytest.mark.usefixtures("no_fallback")
def test_any_4bit_table(kernel: Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel takes the 4-bit tables at run time and encodes any ascending table exactly: here
    tables that are no ladder (several midpoints an octave), values on and beside their midpoints, a
    NaN, a block whose absmax is infinite and one of subnormals (the last two take the quotients)."""
    from adamw.backends import cpu_low_bit

    signed = Code("test-signed", (0.0, 0.07, 0.15, 0.25, 0.33, 0.5, 0.7, 1.0), signed=True, bits=4)
    unsigned = Code("test-unsigned", tuple((k + 1) / 16 for k in range(16)), signed=False, bits=4)
    for key, code in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), (signed, unsigned, unsigned), strict=True):
        monkeypatch.setitem(INT4.codes, key, code)
    monkeypatch.setattr(cpu_low_bit, "_CODES", cpu_low_bit.code_tables())
    gen = torch.Generator().manual_seed(6)
    _, mids = signed.tables()
    near = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(0.0))])
    n = 40 * 128 + 77
    grads = []
    for _ in range(STEPS):
        g = torch.randn(n, generator=gen).clamp(-1.0, 1.0)
        on = near[torch.randint(0, len(near), (n,), generator=gen)]
        on = on * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        g = torch.where(torch.rand(n, generator=gen) < 0.5, on, g)
        g[::128] = 1.0  # every block's absmax is 1 (y = x: values exactly on midpoints)
        g[: 3 * 128] = 0.0
        g[5 * 128 + 7], g[7 * 128 + 3] = float("nan"), float("inf")
        g[9 * 128 : 10 * 128] *= 1e-40
        grads.append([g])
    for betas in ((0.0, 0.0), (0.9, 0.999)):
        init = [torch.randn(n, generator=gen)]
        ours, ref, params, ref_params = kernel.pair(init, "4bit", "round", betas=betas, amsgrad=True)
        for step, step_grads in enumerate(grads, 1):
            kernel.step_both(ours, ref, params, ref_params, step_grads)
            kernel.assert_same_run(ours, ref, params, ref_params, step)
            if betas == (0.0, 0.0) and step == 1:  # exp_avg is the grad: inf is NaN (lerp's 0 * inf)
                grad = step_grads[0]
                codes, _ = stored_codes("4bit", torch.where(grad.isinf(), float("nan"), grad))
                assert_bitwise(ours.state[params[0]]["exp_avg"], codes, f"step {step}, codes")
                assert len(torch.unique(code_numbers("4bit", codes, n))) == 16


@pytest.fixture(scope="module")
def step_fn_without_fast_path(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The C kernel's step built as it is but without its vector fast path (compiled once per module)."""
    from adamw.backends import _native, cpu_low_bit

    library = cpu_low_bit.library()
    target = tmp_path_factory.mktemp("no-fast-path") / "adamw_cpu_low_bit-no-fast-path.so"
    flags = (*library.flags, "-DADAMW_NO_FAST_PATH")
    error = _native._compile(_native.compiler(cpu_low_bit.KERNEL), flags, target, cpu_low_bit.SOURCE)
    assert error is None, error
    return cpu_low_bit.KERNEL.bind(ctypes.CDLL(str(target)))


@pytest.fixture
def without_fast_path(step_fn_without_fast_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every block through step_block: the kernel without its fast path in place of the library's."""
    from adamw.backends import cpu_low_bit

    library = dataclasses.replace(cpu_low_bit.library(), step_fn=step_fn_without_fast_path)
    monkeypatch.setattr(cpu_low_bit, "library", lambda: library)


@pytest.mark.parametrize(("kernel", "case", "flags"), kernel_params(["cpu"], _case_flags))
@pytest.mark.usefixtures("without_fast_path")
def test_step_block_alone_matches_reference(kernel: Kernel, case: str, flags: str, calls: list[int]) -> None:
    """step_block, the generic path (the fast paths' fallback, and what steps the blocks they leave),
    holds on whole blocks too, in every format: the kernel's fast paths and its generic path give the
    same bits."""
    params = kernel.run_against_reference(case, flags)
    assert calls == [sum(p.dtype != f64 for p in params)] * STEPS


# --------------------------------------------------------------------------------------------------
# the Triton kernel's own: its 4-bit tables read at run time, and compiled for a GPU (no GPU needed:
# Triton compiles to PTX on the CPU)


@pytest.mark.parametrize("kernel", kernel_params(["triton"]))
def test_triton_4bit_codes_follow_the_tables_it_is_given(
    kernel: Kernel, builds: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 4-bit tables are the kernel's input, not compiled in: with other ascending tables installed
    in the format (no ladder; the unsigned one linear), values on the signed table's midpoints and one
    float32 step either side encode as quantize() does, and every moment (amsgrad) decodes and steps
    bitwise as the reference."""
    from adamw.backends import triton as backend
    from adamw.states.formats import MOMENTS
    from adamw.states.quantize import Code

    signed = Code("signed-test", (0.0, 0.03, 0.1, 0.2, 0.3, 0.55, 0.8, 1.0), signed=True, bits=4)
    unsigned = Code("unsigned-test", tuple((k + 1) / 16 for k in range(16)), signed=False, bits=4)
    for key, code in zip(MOMENTS, (signed, unsigned, unsigned), strict=True):
        monkeypatch.setitem(INT4.codes, key, code)
    monkeypatch.setattr(backend, "_low_bit_codes", {})
    _, mids = signed.tables()
    up, down = torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(0.0))
    one, zero = torch.ones(1), torch.zeros(1)
    pieces = [torch.cat([one, mids, up, zero]), torch.cat([-one, -down, -mids, -zero])]  # 16 values each
    grads = [torch.cat(pieces * 132)[:4197]]  # every block's absmax is 1: y = x / absmax is exact
    grads += [step_grads[0] for step_grads in make_grads(grads, 2)]
    init = [torch.randn(4197)]
    ours, ref, params, ref_params = kernel.pair(init, "4bit", "round", betas=(0.0, 0.9), amsgrad=True)
    for step, grad in enumerate(grads, 1):
        kernel.step_both(ours, ref, params, ref_params, [grad])
        if step == 1:
            codes, _ = stored_codes("4bit", grad)
            assert_bitwise(ours.state[params[0]]["exp_avg"].cpu(), codes, "codes")
            for opt in (ours, ref):  # from now on exp_avg's decoded values count
                opt.param_groups[0]["betas"] = (0.5, 0.9)
        kernel.assert_same_run(ours, ref, params, ref_params, step)
    assert sum(builds) == 1, "the kernel stepped the param"


_COMPILE_CHECK = textwrap.dedent(
    r"""
    import os, re
    os.environ.pop("TRITON_INTERPRET", None)
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from adamw.backends import _triton_low_bit_kernels as K, triton as backend

    def low_bit_ptx(param, grad, moments, bits, update, amsgrad, flags, aligned=True):
        blocks = backend.LOW_BIT_CUDA_BLOCKS * (2 if bits == 4 else 1)  # as the host: blocks of 128 for 4-bit
        constants = dict(BLOCKS=blocks, PARAM_DTYPE=param, GRAD_DTYPE=grad, MOMENT_DTYPE=moments, CODE_BITS=bits,
                         PARAM_UPDATE=update, AMSGRAD=amsgrad, MAXIMIZE=flags, HAS_WEIGHT_DECAY=flags,
                         HAS_GRAD_SCALE=flags, ALIGNED=aligned)
        floats = {n: "fp32" for n in ["decay", "lerp_coeff", "beta2", "one_minus_beta2", "eps"]}
        signature = {"table_ptr": "*i64", "chunk_tensor_ptr": "*i32", "codes_ptr": "*fp32",
                     "grad_scale_ptr": "*fp32", "lerp_small": "i32", **floats}
        signature.update({name: "constexpr" for name in constants})
        source = triton.compiler.ASTSource(fn=K.low_bit_kernel, signature=signature, constexprs=constants)
        options = {"num_warps": backend.LOW_BIT_CUDA_NUM_WARPS, "enable_fp_fusion": backend.LOW_BIT_FP_FUSION}
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

    variants = [
        (tl.float32, tl.float32, tl.uint8, 8, 0, True, True),
        (tl.bfloat16, tl.bfloat16, tl.uint8, 8, 1, True, False),
        (tl.float32, tl.float32, tl.uint8, 4, 0, True, True),
        (tl.bfloat16, tl.bfloat16, tl.uint8, 4, 2, False, False),
        (tl.bfloat16, tl.bfloat16, tl.bfloat16, 8, 2, True, True),
        (tl.float16, tl.float16, tl.float16, 8, 0, False, False),
        (tl.bfloat16, tl.float32, tl.float32, 8, 1, False, True),
    ]
    for variant in variants:
        ptx = low_bit_ptx(*variant)
        # Per element: one sqrt and the reference's two FMAs (lerp, addcmul), and no other FMA
        # (the log2 guess of the 8-bit codes has its own, flushing subnormals: it only guesses).
        fmas, sqrts = len(re.findall(r"\bfma\.rn\.f32\b", ptx)), len(re.findall(r"\bsqrt\.rn\.f32\b", ptx))
        assert sqrts > 0 and fmas == 2 * sqrts, (variant, fmas, sqrts)
        assert not re.search(r"\b(mad\S*\.f32|div\.(approx|full)|sqrt\.approx|rsqrt)\b", ptx), variant
        assert not re.search(r"\b(add|sub|mul|div|sqrt|max|min)\.\S*ftz", ptx), variant
        # 16-byte aligned tensors: full chunks move the params and grads 8 or 16 bytes per access
        assert re.search(r"ld\.global(\.\w+)*\.v[24]\.b32", ptx), variant
        assert re.search(r"st\.global(\.\w+)*\.v[24]\.b32", ptx), variant
    unaligned = low_bit_ptx(*variants[1], aligned=False)
    assert not re.search(r"(ld|st)\.global(\.\w+)*\.v[24]\.", unaligned), "unaligned tensors must not take vector accesses"
    print("ok")
    """
)


@pytest.mark.parametrize("kernel", kernel_params(["triton"]))
def test_triton_kernel_compiles_for_hopper_rounding_as_the_reference(kernel: Kernel) -> None:
    """The real compiler (not the interpreter) accepts the storage variants for sm_90, and rounds as
    the reference does: correctly rounded division and sqrt, no flushed subnormals, and exactly the
    reference's two FMAs per element (what bit-for-bit equality on a GPU rests on). Aligned tensors
    take vector loads and stores, unaligned ones none."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas) and shutil.which("ptxas") is None:
        pytest.skip("no ptxas to compile for a GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_CHECK], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


_INTERPRETED_FMA_CHECK = textwrap.dedent(
    r"""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    from fractions import Fraction
    import numpy as np, torch, triton, triton.language as tl
    from adamw.backends._triton_low_bit_kernels import _fma

    @triton.jit
    def fma_kernel(a_ptr, b_ptr, c_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        mask = i < n
        a, b, c = tl.load(a_ptr + i, mask=mask), tl.load(b_ptr + i, mask=mask), tl.load(c_ptr + i, mask=mask)
        tl.store(out_ptr + i, _fma(a, b, c), mask=mask)

    def rounded_once(a, b, c):
        # a * b + c rounded to float32 once: the nearest float32 to the exact value, ties to even
        if not all(np.isfinite([a, b, c])):  # IEEE's infinities and NaNs
            return np.float32(np.float64(a) * np.float64(b) + np.float64(c))
        exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
        if exact == 0:  # signed zeros, as IEEE adds them
            return np.float32(np.float64(a) * np.float64(b) + np.float64(c))
        limit = Fraction(2**128 - 2**103)  # halfway from the largest float32 to the next power of two
        if abs(exact) >= limit:
            return np.float32(np.inf if exact > 0 else -np.inf)
        best = np.float32(float(exact))  # within an ulp: float() rounds once to float64, float32() again
        best = np.float32(np.finfo(np.float32).max) * np.sign(best) if np.isinf(best) else best
        for other in (np.nextafter(best, np.float32(np.inf)), np.nextafter(best, np.float32(-np.inf))):
            d_best, d_other = abs(Fraction(float(best)) - exact), abs(Fraction(float(other)) - exact)
            if np.isfinite(other) and (d_other < d_best or (d_other == d_best and other.view(np.int32) % 2 == 0)):
                best = other
        return best

    rng = np.random.default_rng(0)
    u = 2.0**-23
    # a * b + c a hair below a float32 midpoint, which float64 rounds onto it and to even from there
    crafted = [(2.0 ** (j - 12) * (1 + u), s * 2.0 ** (j - 12) * (1 - u), s * 2.0**k * (1 + u))
               for k, j in ((0, 0), (10, 5), (-20, -10), (40, 20)) for s in (1, -1)]
    for a, b, c in crafted:  # they tell one rounding from two
        assert np.float32(np.float64(a) * np.float64(b) + np.float64(c)) != rounded_once(a, b, c)
    n = 4000
    a = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    b = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    c = (rng.standard_normal(n) * 2.0 ** rng.integers(-60, 60, n)).astype(np.float32)
    c[: n // 4] = -(a[: n // 4] * b[: n // 4])  # cancellation: what remains is the product's rounding error
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 2.0**-140, -(2.0**-149), 3e38, 1.0], np.float32)
    sa, sb, sc = (x.ravel() for x in np.meshgrid(specials, specials, specials))
    a, b, c = (np.concatenate([x, np.array(y, np.float32), z]) for x, y, z in zip((a, b, c), zip(*crafted), (sa, sb, sc)))
    out = torch.empty(len(a))
    block = triton.next_power_of_2(len(a))
    fma_kernel[(1,)](torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c), out, len(a), BLOCK=block)
    got = out.numpy()
    wrong = [i for i in range(len(a)) if got[i].view(np.int32) != rounded_once(a[i], b[i], c[i]).view(np.int32)
             and not (np.isnan(got[i]) and np.isnan(rounded_once(a[i], b[i], c[i])))]
    assert not wrong, [(a[i], b[i], c[i], got[i], rounded_once(a[i], b[i], c[i])) for i in wrong[:5]]
    print("ok", len(a))
    """
)


@pytest.mark.parametrize("kernel", kernel_params(["triton"]))
def test_triton_multiply_add_rounds_once_under_the_interpreter(kernel: Kernel) -> None:
    """The kernel's two multiply-adds (torch's lerp and addcmul) round once under Triton's interpreter
    too, where ``tl.fma`` itself multiplies then adds in some Triton releases (3.6 among them): against
    the exact value rounded to float32, on random values, cancellations, the specials, and values a
    hair below a float32 midpoint (where rounding to float64 first, then to float32, is wrong)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _INTERPRETED_FMA_CHECK], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
