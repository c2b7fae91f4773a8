"""A seeded low-bit run is the same run, bit for bit, on every backend.

The same params, grads, options and ``seed`` stepped by the for-loop backend (the low-bit reference,
:func:`adamw.backends.forloop.reference_step`), the foreach backend, the low-bit CPU kernel (``fused=True``) and, where
Triton imports, the low-bit Triton kernel (under Triton's interpreter without a GPU): after every step
the params and every state entry (moments, 8-bit or 4-bit codes and absmaxes, Kahan buffers, step
counters) must be equal bit for bit, with no tolerance. Over every low-bit format, the flags,
GradScaler's ``grad_scale`` (and a step its ``found_inf`` skips), a Tensor lr and every param dtype,
on random data and a group of odd shapes: one past 4096 values (quantized, a short last block), a
non-contiguous one large enough to be quantized, a small transposed one, a 0-d one and an empty one.

The Triton interpreter is slow, so it runs a cut of the grid (every format once, every flag set, and
float32, float16, bfloat16 and complex64 params; float64 ones both kernels hand to the reference);
tests/test_low_bit_kernels.py holds it to the reference over more cases.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
from typing import Any

import pytest
import torch
from torch import Tensor

import adamw
from _helpers import LOW_BIT_FLAGS, as_real, assert_same_run, leaves

STEPS = 3
SEED = 77
CPU = torch.device("cpu")

f32, f16, bf16, f64, c64 = torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64

# Every low-bit (state_precision, param_update): all but ("param", "round"), which is torch's own path.
# param_update applies to bfloat16 params; params of other dtypes are written back to nearest.
FORMATS = [
    (precision, update)
    for precision, update in itertools.product(("param", "bf16", "8bit", "4bit"), ("round", "stochastic", "kahan"))
    if (precision, update) != ("param", "round")
]

FLAGS: dict[str, dict[str, Any]] = {
    **LOW_BIT_FLAGS,
    # GradScaler's in-step unscaling: grads 1024 times too large, divided by grad_scale in the step
    "grad-scale": dict(amsgrad=False, maximize=True, weight_decay=0.1, betas=(0.9, 0.999), grad_scale=1024.0),
    # A Tensor lr, and GradScaler's found_inf (per step) skipping the second step: counters included
    "tensor-lr-skip": dict(
        amsgrad=True, weight_decay=0.1, lr=torch.tensor(0.02), grad_scale=64.0, found_inf=[0.0, 1.0, 0.0]
    ),
}

DTYPES = [f32, f16, bf16, f64, c64]

# (shape, stepped as a transposed view): 8-bit and 4-bit apply to the first two (>= 4096 values); 4099
# is odd (4-bit: the last byte holds one code) and neither is a whole number of blocks.
SHAPES: list[tuple[tuple[int, ...], bool]] = [
    ((4099,), False),
    ((70, 65), True),
    ((9, 7), True),
    ((), False),
    ((0,), False),
]

BACKENDS: dict[str, dict[str, Any]] = {
    "foreach": {"backend": "foreach"},
    "cpu": {"fused": True},
    "triton": {"backend": "triton"},
}
# Without a GPU, under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1); with one,
# tests/test_low_bit_kernels.py runs the kernel on CUDA tensors against the reference on CPU copies.
TRITON_INTERPRETED = (
    importlib.util.find_spec("triton") is not None
    and not torch.cuda.is_available()
    and os.environ.get("TRITON_INTERPRET") == "1"
)


def _dtype_id(value: object) -> str | None:
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


def make_params(dtype: torch.dtype) -> list[Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape, transposed in SHAPES:
        stored = tuple(reversed(shape)) if transposed else shape
        p = torch.randn(stored, generator=gen, dtype=c64 if dtype.is_complex else f32).to(dtype)
        params.append(p.t() if transposed else p)
    return params


def make_grads(params: list[Tensor], scale: float) -> list[list[Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        [
            (torch.randn(p.shape, generator=gen, dtype=c64 if p.is_complex() else f32) * scale).to(p.dtype)
            for p in params
        ]
        for _ in range(STEPS)
    ]


def run_against_forloop(
    backends: list[str],
    precision: str,
    update: str,
    flags: dict[str, Any],
    dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Steps each of ``backends`` and the for-loop reference side by side, comparing after every step."""
    flags = dict(flags)
    grad_scale = flags.pop("grad_scale", None)
    found_inf = flags.pop("found_inf", [0.0] * STEPS)
    init = make_params(dtype)
    assert not init[1].is_contiguous() and init[1].numel() > 4096
    options = {"lr": 1e-2, "state_precision": precision, "param_update": update, "seed": SEED, **flags}
    ref_params = leaves(init, CPU)
    ref = adamw.AdamW(ref_params, **options, backend="forloop")
    runs = []
    for backend in backends:
        params = leaves(init, CPU)
        runs.append((adamw.AdamW(params, **options, **BACKENDS[backend]), params))
    fallbacks = count_fallbacks(backends, monkeypatch)
    for step, grads in enumerate(make_grads(init, grad_scale or 1.0), 1):
        for opt, params in [(ref, ref_params), *runs]:
            if grad_scale is not None:
                opt.grad_scale, opt.found_inf = torch.tensor(grad_scale), torch.tensor(found_inf[step - 1])
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
        for opt, params in runs:
            assert_same_run(opt, ref, params, ref_params, f"step {step}")
    # The params moved (a run that stepped nothing would agree trivially).
    assert not torch.equal(as_real(ref_params[0].detach()), as_real(init[0]))
    # The kernels stepped every param they take (float64 ones are the reference's, by design).
    expected = sum(f == 0 for f in found_inf) * len(init) if dtype == f64 else 0
    assert all(n == expected for n in fallbacks.values()), fallbacks


def count_fallbacks(backends: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Per kernel backend, the number of param steps it hands to the torch-ops reference."""
    counts: dict[str, int] = {}
    for backend, module_name in (("cpu", "adamw.backends.cpu_low_bit"), ("triton", "adamw.backends.triton")):
        if backend not in backends:
            continue
        module = importlib.import_module(module_name)
        original = module.reference_step
        counts[backend] = 0

        def counting(*args: Any, _backend: str = backend, _original: Any = original) -> None:
            counts[_backend] += 1
            _original(*args)

        monkeypatch.setattr(module, "reference_step", counting)
    return counts


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("flags", FLAGS.values(), ids=FLAGS.keys())
@pytest.mark.parametrize(("precision", "update"), FORMATS)
def test_cpu_backends_are_the_forloop_run(
    precision: str, update: str, flags: dict[str, Any], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    backends = ["cpu"] if isinstance(flags.get("lr"), Tensor) else ["foreach", "cpu"]  # foreach: no Tensor lr, as torch
    run_against_forloop(backends, precision, update, flags, dtype, monkeypatch)


# The Triton interpreter's cut of the grid: every format once, each with its own flag set and dtype
# (bfloat16 params where the format's param_update needs them).
TRITON_CASES = [
    ("bf16", "round", "plain", f32),
    ("8bit", "round", "amsgrad-wd", f16),
    ("param", "stochastic", "grad-scale", bf16),
    ("param", "kahan", "maximize-amsgrad-lerp", bf16),
    ("bf16", "stochastic", "amsgrad-wd", bf16),
    ("bf16", "kahan", "grad-scale", bf16),
    ("8bit", "stochastic", "maximize-amsgrad-lerp", bf16),
    ("8bit", "kahan", "plain", c64),
]


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="no triton, a GPU, or TRITON_INTERPRET is not 1")
@pytest.mark.parametrize(("precision", "update", "flags", "dtype"), TRITON_CASES, ids=_dtype_id)
def test_triton_interpreter_is_the_forloop_run(
    precision: str, update: str, flags: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_against_forloop(["triton"], precision, update, FLAGS[flags], dtype, monkeypatch)
