"""The lean CPU kernel (``adamw.backends.cpu_lean.step_lean``) against the lean reference, bit for bit.

Two AdamW optimizers on copies of the same params, one with ``fused=True`` (the C kernel) and one
with ``backend="forloop"`` (which runs :func:`adamw.states.lean_step`), same ``state_precision``,
``param_update`` and ``seed``; after every step the params and every state entry must be equal bit
for bit, with no tolerance (tests/test_lean_reproducible.py holds every backend to the same).

The helpers and the FLAGS table are shared with tests/test_triton_lean.py
(tests/_lean_kernel_cases.py); each file keeps its own CASES and param shapes.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
from torch import Tensor

import adamw
from _lean_kernel_cases import (
    FLAGS,
    STEPS,
    Case,
    LeanKernel,
    assert_bitwise,
    assert_same_run,
    check_codes_on_midpoints,
    check_grad_scale_and_found_inf,
    make_grads,
)
from adamw.backends import cpu_lean
from adamw.states import SIGNED_CODE, quantize

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16

# Per case: state_precision, param_update, and the dtypes of the params (shapes in SHAPES):
# 4196 values (8-bit: a short last block), a transposed 64x72 (run through contiguous copies), a
# 7x5 (float32 moments under "8bit": a group mixing 8-bit and float32 moments) and 5000 values.
# Extras test what the kernel routes elsewhere: a float64 param (the reference steps it) and a
# complex64 one (its real view).
CASES: dict[str, Case] = {
    "8bit": ("8bit", "round", [f32, f32, f32, torch.complex64]),
    "bf16": ("bf16", "round", [f32, bf16, f16, torch.float64]),
    "param-stochastic": ("param", "stochastic", [bf16, bf16, f16, bf16]),  # float16: moments in float16
    "param-kahan": ("param", "kahan", [bf16, bf16, f32, bf16]),  # float32: plain, float32 moments
    "8bit-stochastic": ("8bit", "stochastic", [bf16, f32, bf16, bf16]),
    "8bit-kahan": ("8bit", "kahan", [bf16, f16, bf16, f32]),  # float16: rounded to nearest
}
SHAPES: list[tuple[int, ...]] = [(4196,), (72, 64), (7, 5), (5000,)]
KERNEL = LeanKernel(options={"fused": True}, device=torch.device("cpu"), cases=CASES, shapes=SHAPES)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of params each kernel call took (so a test fails if the kernel never ran)."""
    calls: list[int] = []
    library = cpu_lean.library()
    original = library.step_fn

    def counting(table: int, n: int, *args: Any) -> int:
        calls.append(n)
        return original(table, n, *args)

    counted = dataclasses.replace(library, step_fn=counting)
    monkeypatch.setattr(cpu_lean, "library", lambda: counted)
    return calls


@pytest.mark.parametrize("flags", FLAGS.values(), ids=FLAGS.keys())
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case: str, flags: dict[str, Any], kernel_calls: list[int]) -> None:
    ours, ref, params, ref_params, grads = KERNEL.run_both(case, flags)
    for step, step_grads in enumerate(grads, 1):
        KERNEL.step_both(ours, ref, params, ref_params, step_grads)
        assert_same_run(ours, ref, params, ref_params, step)
    expected = sum(p.dtype != torch.float64 for p in params)
    assert kernel_calls == [expected] * STEPS, "one kernel call per step, for every param it takes"


@pytest.mark.parametrize("case", ["8bit", "8bit-stochastic"])
def test_grad_scale_and_found_inf(case: str) -> None:
    """See :func:`_lean_kernel_cases.check_grad_scale_and_found_inf`."""
    check_grad_scale_and_found_inf(KERNEL, case)


def test_codes_on_midpoints() -> None:
    """See :func:`_lean_kernel_cases.check_codes_on_midpoints`."""
    check_codes_on_midpoints(KERNEL)


def test_unsigned_codes_over_the_range() -> None:
    """exp_avg_sq's codes over its whole ladder (2^-32 .. 1 of the absmax, and below): with beta1 = 0
    and beta2 = 0 the new exp_avg_sq is g*g, and grads spread over 2^-17 .. 1 hit every code."""
    n = 32 * 256
    block = torch.exp2(torch.linspace(-17.0, 0.0, 256))  # the largest is 1: the absmax of its block
    jitter = torch.exp2(torch.rand(32, 256, generator=torch.Generator().manual_seed(2)) / 8)  # within a step
    grad = (block * jitter).clamp(max=1.0).reshape(-1)
    grad = grad * torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0)
    init = [torch.randn(n)]
    flags = dict(betas=(0.0, 0.0), weight_decay=0.0)
    ours, ref, params, ref_params = KERNEL.pair(init, "8bit", "round", **flags)
    KERNEL.step_both(ours, ref, params, ref_params, [grad])
    assert len(torch.unique(ref.state[ref_params[0]]["exp_avg_sq"])) > 200
    assert_same_run(ours, ref, params, ref_params, 1)


@pytest.mark.parametrize("flags", FLAGS.values(), ids=FLAGS.keys())
def test_codes_of_random_bit_patterns(flags: dict[str, Any]) -> None:
    """Whole blocks of arbitrary float32 magnitudes in [0, 1] (random bit patterns: every exponent,
    subnormals and zeros included), each block's absmax 1 so that y = x: the kernel's codes are
    quantize()'s, over three steps (decoding what it encoded)."""
    gen = torch.Generator().manual_seed(3)
    n = 64 * 256
    grads = []
    for _ in range(STEPS):
        raw = torch.randint(0, 0x3F800001, (n,), generator=gen, dtype=torch.int32).view(torch.float32)
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        g = (raw * sign).reshape(-1, 256)
        g[:, 0] = 1.0
        g[1::7] = 0.0  # whole zero blocks
        grads.append([g.reshape(-1)])
    init = [torch.randn(n, generator=gen)]
    ours, ref, params, ref_params = KERNEL.pair(init, "8bit", "round", **{**flags, "betas": (0.0, 0.0)})
    for step, step_grads in enumerate(grads, 1):
        KERNEL.step_both(ours, ref, params, ref_params, step_grads)
        assert_same_run(ours, ref, params, ref_params, step)
        if not flags["maximize"]:
            codes, _ = quantize(step_grads[0], SIGNED_CODE)
            assert_bitwise(ours.state[params[0]]["exp_avg"], codes, f"step {step}, codes")


@pytest.mark.parametrize("flags", FLAGS.values(), ids=FLAGS.keys())
def test_non_finite_and_extreme_values(flags: dict[str, Any]) -> None:
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
        grads.append([g])
    init = [torch.randn(n, generator=gen)]
    ours, ref, params, ref_params = KERNEL.pair(init, "8bit", "round", **flags)
    for step, step_grads in enumerate(grads, 1):
        KERNEL.step_both(ours, ref, params, ref_params, step_grads)
        assert_same_run(ours, ref, params, ref_params, step)


def test_codes_near_midpoints_of_any_absmax() -> None:
    """Blocks whose absmax is not a power of two (y = x / absmax is rounded) with values a few ulps
    either side of midpoint * absmax: the codes of the correctly rounded quotient, as quantize()."""
    gen = torch.Generator().manual_seed(5)
    _, mids = SIGNED_CODE.tables()
    blocks = []
    for _ in range(48):
        absmax = 1.0 + torch.rand(1, generator=gen) * (1 - 2**-20)
        absmax = absmax * 2.0 ** torch.randint(-20, 20, (1,), generator=gen).float()
        pick = mids[torch.randint(0, len(mids), (255,), generator=gen)]
        x = (pick * absmax).view(torch.int32) + torch.randint(-4, 5, (255,), generator=gen, dtype=torch.int32)
        x = x.view(torch.float32) * torch.where(torch.rand(255, generator=gen) < 0.5, -1.0, 1.0)
        blocks.append(torch.cat([absmax, x]))
    grad = torch.cat(blocks)
    init = [torch.randn(grad.numel(), generator=gen)]
    for flags in ({"betas": (0.0, 0.0), "amsgrad": True}, {"betas": (0.0, 0.999)}):
        ours, ref, params, ref_params = KERNEL.pair(init, "8bit", "round", weight_decay=0.0, **flags)
        KERNEL.step_both(ours, ref, params, ref_params, [grad])
        codes, absmax = quantize(grad, SIGNED_CODE)
        assert_bitwise(ours.state[params[0]]["exp_avg"], codes, "codes")
        assert_bitwise(ours.state[params[0]]["exp_avg_absmax"], absmax, "absmax")
        assert_same_run(ours, ref, params, ref_params, 1)


# --------------------------------------------------------------------------------------------------
# the group's table, kept from step to step


@pytest.fixture
def table_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of params each table build took (a reused table is not built)."""
    builds: list[int] = []
    original = cpu_lean._build

    def counting(params: list[Tensor], *args: Any) -> Any:
        builds.append(len(params))
        return original(params, *args)

    monkeypatch.setattr(cpu_lean, "_build", counting)
    return builds


def run_contiguous(case: str, flags: dict[str, Any]) -> tuple[Any, Any, list[Tensor], list[Tensor]]:
    """As KERNEL.run_both, with every param contiguous (so that nothing needs a staged copy)."""
    state_precision, param_update, dtypes = CASES[case]
    init = [p.contiguous() for p in KERNEL.make_params(dtypes)]
    ours, ref, params, ref_params = KERNEL.pair(init, state_precision, param_update, **flags)
    return ours, ref, params, ref_params


REUSABLE_CASES = [case for case, (_, _, dtypes) in CASES.items() if torch.float64 not in dtypes]


@pytest.mark.parametrize("flags", FLAGS.values(), ids=FLAGS.keys())
@pytest.mark.parametrize("case", REUSABLE_CASES)
def test_a_kept_table_matches_reference(
    case: str, flags: dict[str, Any], table_builds: list[int], kernel_calls: list[int]
) -> None:
    """Built on the first step, reused on the next four: the kernel derives each step's scalars and
    rounding keys from the counters, bit for bit as the reference does."""
    ours, ref, params, ref_params = run_contiguous(case, flags)
    for step, step_grads in enumerate(make_grads(params, 5), 1):
        KERNEL.step_both(ours, ref, params, ref_params, step_grads)
        assert_same_run(ours, ref, params, ref_params, step)
    assert table_builds == [len(params)]
    assert kernel_calls == [len(params)] * 5


def _contiguous_but_transposed(g: Tensor) -> Tensor:
    """``g``'s values in column-major memory (a non-contiguous tensor of the same shape)."""
    return torch.empty_strided(g.shape, (1, g.shape[0]), dtype=g.dtype).copy_(g)


CHANGES = {
    # new state tensors, loaded from a checkpoint (a copy: loading the live state dict keeps its tensors)
    "load_state_dict": lambda opt, params: opt.load_state_dict(copy.deepcopy(opt.state_dict())),
    # a param moved to new memory (as some wrappers do with .data)
    "param.data": lambda opt, params: setattr(params[0], "data", params[0].data.clone()),
    # a moment replaced by hand
    "state entry": lambda opt, params: opt.state[params[3]].__setitem__(
        "exp_avg", opt.state[params[3]]["exp_avg"].clone()
    ),
    # float64 step counters (e.g. from a checkpoint of another optimizer)
    "float64 steps": lambda opt, params: [s.__setitem__("step", s["step"].double()) for s in opt.state.values()],
}


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("case", ["8bit", "8bit-kahan", "param-stochastic"])
def test_a_table_is_rebuilt_when_memory_moves(case: str, change: str, table_builds: list[int]) -> None:
    """Whatever moves a param or state entry (or changes a counter's dtype) between steps makes the
    next step build a new table; stepping stays bitwise the reference's."""
    ours, ref, params, ref_params = run_contiguous(case, FLAGS["amsgrad-wd"])
    grads = make_grads(params, 5)
    for step in (1, 2):
        KERNEL.step_both(ours, ref, params, ref_params, grads[step - 1])
    assert table_builds == [len(params)]
    CHANGES[change](ours, params)
    CHANGES[change](ref, ref_params)
    for step in (3, 4, 5):
        KERNEL.step_both(ours, ref, params, ref_params, grads[step - 1])
        assert_same_run(ours, ref, params, ref_params, step)
    assert table_builds == [len(params)] * 2, "rebuilt once, after the change, then kept"


def test_a_non_contiguous_grad_is_staged_for_its_step_only(table_builds: list[int]) -> None:
    ours, ref, params, ref_params = run_contiguous("8bit", FLAGS["plain"])
    assert params[1].dim() == 2
    grads = make_grads(params, 4)
    grads[2][1] = _contiguous_but_transposed(grads[2][1])
    for step, step_grads in enumerate(grads, 1):
        for p, q, g in zip(params, ref_params, step_grads, strict=True):
            p.grad, q.grad = g.clone(memory_format=torch.preserve_format), g.clone()
        assert params[1].grad.is_contiguous() == (step != 3)
        ours.step()
        ref.step()
        assert_same_run(ours, ref, params, ref_params, step)
    # built on step 1, then for the staged grad of step 3 (not kept); step 4 fits step 1's again
    assert table_builds == [len(params)] * 2


def test_kept_tables_hold_no_tensors() -> None:
    """A table cached for reuse keeps pointers, not tensors: dropping the model frees its memory."""
    import gc
    import weakref

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
