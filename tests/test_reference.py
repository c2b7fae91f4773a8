"""Every backend against the float64 reference (:func:`adamw._math.reference_step`) and against torch.

Each backend is compared with the torch.optim.AdamW implementation it stands in for (for-loop,
foreach, or fused=True): on the same random data, our params and every moment are within the dtype's
tolerance of the reference, and no farther from it than torch's (zero slack for the mirror backends,
which are bit-identical; :data:`FUSED_SLACK_ULPS` for fused kernels). A backend whose module is not
there yet is skipped, so a new kernel gets these tests the day it lands.
"""

from __future__ import annotations

import pytest
import torch

import adamw
from _helpers import (
    DTYPES,
    ENTRIES,
    MIRROR_BACKENDS,
    REFERENCE_TOL,
    backend_params,
    fused_slack,
    make_params,
    reference_entries,
    run_reference,
    run_steps,
    skip_unsupported,
    torch_counterpart,
)

# Large enough that every term shows: eps is comparable with sqrt(v) of the small-grad param, the
# betas make the bias corrections far from 1, weight decay moves params visibly.
HYPER = {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1}
STEPS = 5


def _max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "maximize"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", backend_params())
def test_error_vs_reference_no_worse_than_torch(
    backend: str, dtype: torch.dtype, amsgrad: bool, maximize: bool
) -> None:
    skip_unsupported(backend, dtype)
    flags = {"amsgrad": amsgrad, "maximize": maximize, **HYPER}
    refs = run_reference(make_params(dtype), STEPS, amsgrad=amsgrad, maximize=maximize, **HYPER)
    ours_params, their_params = make_params(dtype), make_params(dtype)
    ours = run_steps(lambda ps: adamw.AdamW(ps, backend=backend, **flags), ours_params, STEPS)
    theirs = run_steps(lambda ps: torch.optim.AdamW(ps, **torch_counterpart(backend), **flags), their_params, STEPS)

    tol = REFERENCE_TOL[dtype]
    ours_pairs = reference_entries(ours, ours_params, refs)
    their_pairs = reference_entries(theirs, their_params, refs)
    for name in ENTRIES:
        assert len(ours_pairs[name]) == len(their_pairs[name]), f"{name}: ours has state where torch has none"
        for i, ((actual, ref), (torch_actual, _)) in enumerate(zip(ours_pairs[name], their_pairs[name], strict=True)):
            what = f"{backend} {dtype} {name} of param {i}"
            torch.testing.assert_close(actual, ref, atol=tol.atol, rtol=tol.rtol, msg=lambda m, w=what: f"{w}: {m}")
            slack = 0.0 if backend in MIRROR_BACKENDS else fused_slack(dtype, ref)
            ours_error, torch_error = _max_abs(actual - ref), _max_abs(torch_actual - ref)
            assert ours_error <= torch_error + slack, (
                f"{what}: error {ours_error:.3e} > torch's {torch_error:.3e} + {slack:.1e}"
            )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "flags", [{"foreach": False}, {"foreach": True}, {"fused": True}], ids=["forloop", "foreach", "fused"]
)
def test_torch_itself_within_table(flags: dict[str, bool], dtype: torch.dtype) -> None:
    """The tolerance table is torch's own error with margin: check it still holds for torch."""
    if flags.get("fused") and dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        pytest.skip("torch's fused AdamW takes real floating dtypes only")
    params = make_params(dtype)
    refs = run_reference(make_params(dtype), STEPS, amsgrad=True, maximize=False, **HYPER)
    opt = run_steps(lambda ps: torch.optim.AdamW(ps, amsgrad=True, **flags, **HYPER), params, STEPS)
    tol = REFERENCE_TOL[dtype]
    for name, pairs in reference_entries(opt, params, refs).items():
        for i, (actual, ref) in enumerate(pairs):
            if flags.get("fused") and name == "param" and not _is_dense(params[i]):
                # torch 2.13's fused CPU kernel walks a non-dense param (a strided slice) as if it were
                # contiguous memory: it updates the wrong elements. Ours must not: see the test above.
                continue
            torch.testing.assert_close(actual, ref, atol=tol.atol, rtol=tol.rtol)


def _is_dense(t: torch.Tensor) -> bool:
    """Contiguous up to a transpose: the layouts torch's fused CPU kernel handles (ours has no such limit)."""
    return t.is_contiguous() or (t.dim() == 2 and t.t().is_contiguous())
