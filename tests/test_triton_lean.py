"""The lean Triton kernel (``step_lean``) against the lean reference, bit for bit.

Two AdamW optimizers on copies of the same params, one with ``backend="triton"`` and one with
``backend="forloop"`` (which runs :func:`adamw.states.lean_step`), same ``state_precision``,
``param_update`` and ``seed``; after every step the params and every state entry must be equal bit
for bit. Where no GPU is, the kernel runs on CPU tensors under Triton's interpreter
(tests/conftest.py sets ``TRITON_INTERPRET=1``); on a GPU it runs on CUDA tensors and the reference on
CPU copies (the reference is torch's CPU ops). No tolerance: both round every operation as the
reference does (tests/test_lean_reproducible.py holds every backend to the same).

The helpers and the FLAGS table are shared with tests/test_cpu_lean.py
(tests/_lean_kernel_cases.py); each file keeps its own CASES and param shapes.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from _lean_kernel_cases import (  # noqa: E402
    FLAGS,
    Case,
    LeanKernel,
    assert_same_run,
    check_codes_on_midpoints,
    check_grad_scale_and_found_inf,
    make_grads,
)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)", allow_module_level=True)


f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16

# Per case: state_precision, param_update, and the dtypes of three params (shapes in SHAPES):
# 4196 values (8-bit: the last program has a short block and one wholly past the end), a transposed
# 64x72 (run through contiguous copies) and a 7x5 (float32 moments under "8bit"). Extras test what
# the kernel routes elsewhere: a float64 param (the reference steps it) and a complex64 one (its real
# view, 8-bit).
CASES: dict[str, Case] = {
    "8bit": ("8bit", "round", [f32, f32, f32, torch.complex64]),
    "bf16": ("bf16", "round", [f32, bf16, f16, torch.float64]),
    "param-stochastic": ("param", "stochastic", [bf16, bf16, f16]),  # float16: rounded, moments in float16
    "param-kahan": ("param", "kahan", [bf16, bf16, f32]),  # float32: plain, float32 moments
    "8bit-stochastic": ("8bit", "stochastic", [bf16, f32, bf16]),
}
SHAPES: list[tuple[int, ...]] = [(4196,), (72, 64), (7, 5), (2100,)]
KERNEL = LeanKernel(options={"backend": "triton"}, device=DEVICE, cases=CASES, shapes=SHAPES)


# --------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("flags", FLAGS.values(), ids=FLAGS.keys())
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case: str, flags: dict[str, Any]) -> None:
    ours, ref, params, ref_params, grads = KERNEL.run_both(case, flags)
    for step, step_grads in enumerate(grads, 1):
        KERNEL.step_both(ours, ref, params, ref_params, step_grads)
        assert_same_run(ours, ref, params, ref_params, step)


@pytest.mark.parametrize("case", ["8bit", "8bit-stochastic"])
def test_grad_scale_and_found_inf(case: str) -> None:
    """See :func:`_lean_kernel_cases.check_grad_scale_and_found_inf`."""
    check_grad_scale_and_found_inf(KERNEL, case)


def test_codes_on_midpoints() -> None:
    """See :func:`_lean_kernel_cases.check_codes_on_midpoints`."""
    check_codes_on_midpoints(KERNEL)


# --------------------------------------------------------------------------------------------------
# compiled for a GPU (no GPU needed: Triton compiles to PTX on the CPU)

_COMPILE_CHECK = textwrap.dedent(
    r"""
    import os, re
    os.environ.pop("TRITON_INTERPRET", None)
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from adamw.backends import _triton_lean_kernels as K, triton as backend

    def lean_ptx(param, grad, moments, update, amsgrad, flags):
        constants = dict(BLOCKS=backend.LEAN_CUDA_BLOCKS, PARAM_DTYPE=param, GRAD_DTYPE=grad, MOMENT_DTYPE=moments,
                         PARAM_UPDATE=update, AMSGRAD=amsgrad, MAXIMIZE=flags, HAS_WEIGHT_DECAY=flags,
                         HAS_GRAD_SCALE=flags)
        floats = {n: "fp32" for n in ["decay", "lerp_coeff", "beta2", "one_minus_beta2", "eps"]}
        signature = {"table_ptr": "*i64", "chunk_tensor_ptr": "*i32", "codes_ptr": "*fp32",
                     "grad_scale_ptr": "*fp32", "lerp_small": "i32", **floats}
        signature.update({name: "constexpr" for name in constants})
        source = triton.compiler.ASTSource(fn=K.lean_kernel, signature=signature, constexprs=constants)
        options = {"num_warps": backend.LEAN_CUDA_NUM_WARPS, "enable_fp_fusion": backend.LEAN_FP_FUSION}
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

    variants = [
        (tl.float32, tl.float32, tl.uint8, 0, True, True),
        (tl.bfloat16, tl.bfloat16, tl.uint8, 1, True, False),
        (tl.bfloat16, tl.bfloat16, tl.bfloat16, 2, True, True),
        (tl.float16, tl.float16, tl.float16, 0, False, False),
        (tl.bfloat16, tl.float32, tl.float32, 1, False, True),
    ]
    for variant in variants:
        ptx = lean_ptx(*variant)
        # Per element: one sqrt and the reference's two FMAs (lerp, addcmul), and no other FMA
        # (the log2 guess of the 8-bit codes has its own, flushing subnormals: it only guesses).
        fmas, sqrts = len(re.findall(r"\bfma\.rn\.f32\b", ptx)), len(re.findall(r"\bsqrt\.rn\.f32\b", ptx))
        assert sqrts > 0 and fmas == 2 * sqrts, (variant, fmas, sqrts)
        assert not re.search(r"\b(mad\S*\.f32|div\.(approx|full)|sqrt\.approx|rsqrt)\b", ptx), variant
        assert not re.search(r"\b(add|sub|mul|div|sqrt|max|min)\.\S*ftz", ptx), variant
    print("ok")
    """
)


# --------------------------------------------------------------------------------------------------
# the launches kept from step to step


@pytest.fixture
def launch_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of params of each launch table built (a kept launch is not built again)."""
    from adamw.backends import triton as triton_backend

    builds: list[int] = []
    original = triton_backend._lean_launch

    def counting(key: Any, positions: list[int], *args: Any) -> Any:
        builds.append(len(positions))
        return original(key, positions, *args)

    monkeypatch.setattr(triton_backend, "_lean_launch", counting)
    return builds


def _contiguous_pair(case: str, flags: dict[str, Any]) -> tuple[Any, Any, list[torch.Tensor], list[torch.Tensor]]:
    """As KERNEL.run_both, with every param contiguous (so that nothing needs a staged copy)."""
    state_precision, param_update, dtypes = CASES[case]
    init = [p.contiguous() for p in KERNEL.make_params(dtypes)]
    return KERNEL.pair(init, state_precision, param_update, **flags)


@pytest.mark.parametrize("case", [c for c, (_, _, dtypes) in CASES.items() if torch.float64 not in dtypes])
def test_kept_launches_match_reference(case: str, launch_builds: list[int]) -> None:
    """Built on the first step and kept for the next three: only the grads' addresses, the rounding
    keys and the step scalars change, bit for bit as the reference computes them."""
    ours, ref, params, ref_params = _contiguous_pair(case, FLAGS["maximize-amsgrad-lerp"])
    for step, step_grads in enumerate(make_grads(params, 4), 1):
        KERNEL.step_both(ours, ref, params, ref_params, step_grads)
        assert_same_run(ours, ref, params, ref_params, step)
        if step == 1:
            first = list(launch_builds)
    assert sum(first) == len(params) and launch_builds == first


MOVES = {
    # new state tensors, loaded from a checkpoint (a copy: loading the live state dict keeps its tensors)
    "load_state_dict": lambda opt, params: opt.load_state_dict(copy.deepcopy(opt.state_dict())),
    # a param moved to new memory (as some wrappers do with .data)
    "param.data": lambda opt, params: setattr(params[0], "data", params[0].data.clone()),
    # a moment replaced by hand
    "state entry": lambda opt, params: opt.state[params[2]].__setitem__(
        "exp_avg", opt.state[params[2]]["exp_avg"].clone()
    ),
}


@pytest.mark.parametrize("move", MOVES)
def test_kept_launches_are_rebuilt_when_memory_moves(move: str, launch_builds: list[int]) -> None:
    ours, ref, params, ref_params = _contiguous_pair("8bit-stochastic", FLAGS["amsgrad-wd"])
    grads = make_grads(params, 4)
    for step in (1, 2):
        KERNEL.step_both(ours, ref, params, ref_params, grads[step - 1])
    built = list(launch_builds)
    MOVES[move](ours, params)
    MOVES[move](ref, ref_params)
    for step in (3, 4):
        KERNEL.step_both(ours, ref, params, ref_params, grads[step - 1])
        assert_same_run(ours, ref, params, ref_params, step)
    assert launch_builds == built * 2, "rebuilt once, after the move, then kept"


def test_kernel_compiles_for_hopper_rounding_as_the_reference() -> None:
    """The real compiler (not the interpreter) accepts the storage variants for sm_90, and rounds as
    the reference does: correctly rounded division and sqrt, no flushed subnormals, and exactly the
    reference's two FMAs per element (what bit-for-bit equality on a GPU rests on)."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas) and shutil.which("ptxas") is None:
        pytest.skip("no ptxas to compile for a GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_CHECK], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
