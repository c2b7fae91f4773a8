"""Every backend against the float64 reference (:func:`adamw._math.reference_step`) and against torch.

One property, over backend x dtype x flags: on the same random data, our params and every moment
land within the dtype's tolerance of the reference (:data:`REFERENCE_TOL`), and no farther from it
than those of the torch.optim.AdamW implementation the backend stands in for (for-loop, foreach or
``fused=True``), but for the backend's :data:`SLACK` (none for the mirror backends). A backend whose
module does not import is skipped, so a new kernel gets these tests the day it lands.

This is the storage format torch has (states in the param's dtype). The low-bit formats have no torch
run to compare with: each kernel is held bit for bit to the for-loop reference
(test_low_bit_kernels.py, test_low_bit_reproducible.py), and that reference near float32 AdamW
(test_low_bit_optimizer.py).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

import adamw
from _helpers import (
    DTYPES,
    ENTRIES,
    THREADS,
    backend_device,
    backend_params,
    leaves,
    make_grads,
    make_params,
    randn,
    reference_entries,
    reference_tol,
    run_reference,
    skip_unsupported,
    slack,
    torch_counterpart,
    torch_threads,
)
from adamw._math import ReferenceState

# Small tensors: one thread is faster by far (but for the C kernel's step, below).
pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 5

# Two regimes. In the first every term shows: eps is comparable with sqrt(v) of the small-grad
# params (where eps applies shows), the betas make the bias corrections far from 1, weight decay moves
# params visibly. The second is torch's betas and eps: eps far below sqrt(v), the second moment
# dominates. Each flag set changes one of them.
HYPER: dict[str, Any] = {"lr": 0.05, "betas": (0.8, 0.9), "eps": 1e-3, "weight_decay": 0.1}
SMALL_EPS: dict[str, Any] = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
FLAGS: dict[str, dict[str, Any]] = {
    "adam": HYPER,
    "amsgrad": {**HYPER, "amsgrad": True},
    "maximize": {**HYPER, "maximize": True},
    "amsgrad-maximize": {**HYPER, "amsgrad": True, "maximize": True},
    "small-eps": SMALL_EPS,
    "small-eps-amsgrad": {**SMALL_EPS, "amsgrad": True},
    "small-eps-maximize-no-decay": {**SMALL_EPS, "maximize": True, "weight_decay": 0.0},
    "small-eps-amsgrad-maximize": {**SMALL_EPS, "amsgrad": True, "maximize": True},
    # float64: the same lr as the float one (a float32 tensor would be another lr for float64 params)
    "small-eps-tensor-lr": {**SMALL_EPS, "lr": torch.tensor(1e-2, dtype=torch.float64)},
    # beta1 = 0.3: torch's lerp takes its other form (weight 0.7 >= 0.5)
    "small-eps-small-beta1-amsgrad": {**SMALL_EPS, "betas": (0.3, 0.9), "amsgrad": True},
}

# Beyond make_params' awkward layouts, shapes where the kernels split their work: several Triton
# chunks with a partial one, exactly one chunk (the interpreter's chunk is 128 values), a transposed
# view over several chunks.
SHAPES: list[tuple[int, ...]] = [(200,), (128,)]
TRANSPOSED_SHAPES: list[tuple[int, ...]] = [(20, 7)]
# A contiguous param whose grad is transposed (autograd can give one): the kernel reads each layout.
TRANSPOSED_GRAD_SHAPE = (5, 6)
# The C kernel's own: an odd size (its vector loop and scalar tail) and one over its 32768-value
# threshold for splitting a step across threads. Only there: the Triton interpreter is slow, and
# torch's ops have neither.
BACKEND_SHAPES: dict[str, list[tuple[int, ...]]] = {"cpu": [(37, 5), (3, 12_000)]}


def _init(backend: str, dtype: torch.dtype) -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    extra = [randn(shape, dtype, gen) for shape in SHAPES + BACKEND_SHAPES.get(backend, [])]
    extra += [randn(shape, dtype, gen).t() for shape in TRANSPOSED_SHAPES]
    return make_params(dtype) + extra + [randn(TRANSPOSED_GRAD_SHAPE, dtype, gen)]


def _reference(init: list[Tensor], options: dict[str, Any]) -> list[ReferenceState]:
    return run_reference(
        init,
        STEPS,
        lr=float(options["lr"]),
        betas=options["betas"],
        eps=options["eps"],
        weight_decay=options["weight_decay"],
        amsgrad=options.get("amsgrad", False),
        maximize=options.get("maximize", False),
    )


def _run(opt: torch.optim.Optimizer, params: list[Tensor], *, transposed_last_grad: bool) -> None:
    for step in range(STEPS):
        for p, g in zip(params, make_grads(params, step), strict=True):
            if g is not None and transposed_last_grad and p is params[-1]:
                g = g.t().contiguous().t()
            p.grad = None if g is None else g.to(p.device)
        opt.step()


# Triton's interpreter is slow: the Triton kernel leaves out two flag sets that take no path of its
# own here. A Tensor lr has its own test (test_triton.py); beta1 < 0.5 is the other side of torch's
# lerp, which the C kernel mirrors and the Triton kernel does not (it multiplies and adds).
SLOW_FLAGS = {"triton": ("small-eps-tensor-lr", "small-eps-small-beta1-amsgrad")}


def _cases() -> list[Any]:
    """backend x dtype x flags, but for each backend's :data:`SLOW_FLAGS`."""
    out = []
    for backend in backend_params(on_backend_device=True):
        name = backend.values[0]
        for dtype in DTYPES:
            for flags, options in FLAGS.items():
                if flags not in SLOW_FLAGS.get(name, ()):
                    ids = f"{name}-{str(dtype).removeprefix('torch.')}-{flags}"
                    out.append(pytest.param(name, dtype, options, id=ids, marks=backend.marks))
    return out


@pytest.mark.parametrize(("backend", "dtype", "options"), _cases())
def test_error_vs_reference_no_worse_than_torch(backend: str, dtype: torch.dtype, options: dict[str, Any]) -> None:
    skip_unsupported(backend, dtype, **options)
    init = _init(backend, dtype)
    refs = _reference(init, options)
    device = backend_device(backend)
    ours_params = leaves(init, device)
    ours = adamw.AdamW(ours_params, backend=backend, **options)
    with torch_threads(THREADS if backend == "cpu" else 1):  # the C kernel splits its work across threads
        _run(ours, ours_params, transposed_last_grad=True)
    # torch steps contiguous copies with contiguous grads of the same values: its fused CPU kernel
    # (torch 2.13) walks a non-dense param, or a grad laid out unlike its param, as if it were
    # contiguous, and steps the wrong elements. Its error is then the yardstick it should be.
    their_params = [p.contiguous() for p in init]
    theirs = torch.optim.AdamW(their_params, **torch_counterpart(backend), **options)
    _run(theirs, their_params, transposed_last_grad=False)

    tol = reference_tol(dtype, options["eps"])
    for i, (p, q, ref) in enumerate(zip(ours_params, their_params, refs, strict=True)):
        what = f"{backend} {dtype}, param {i}"
        assert p.stride() == init[i].stride() and p.device == device, f"{what}: its layout, so stepped in place"
        assert ours.state[p].keys() == theirs.state[q].keys(), f"{what}: state keys"
        step = ours.state[p]["step"] if ours.state[p] else None
        if step is not None:
            assert step.dtype == torch.float32 and step.device == device, f"{what}: step counter {step}"
            assert step.item() == theirs.state[q]["step"].item() == ref.step, f"{what}: step counter"
        for name in ENTRIES[1:]:
            if name in ours.state[p]:
                assert ours.state[p][name].dtype == dtype, f"{what}: {name} keeps the param's dtype, as torch"
    ours_pairs = reference_entries(ours, ours_params, refs)
    their_pairs = reference_entries(theirs, their_params, refs)
    for name in ENTRIES:
        for i, ((actual, ref), (torch_actual, _)) in enumerate(zip(ours_pairs[name], their_pairs[name], strict=True)):
            what = f"{backend} {dtype}, {name} of param {i}"
            if tol is not None:
                tol.assert_close(actual.cpu(), ref, what)
            ours_error, torch_error = _max_abs(actual.cpu() - ref), _max_abs(torch_actual - ref)
            bound = torch_error + slack(backend, dtype, ref)
            assert ours_error <= bound, f"{what}: error {ours_error:.3e} > torch's {torch_error:.3e} + slack"


@pytest.mark.parametrize("options", FLAGS.values(), ids=FLAGS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["forloop", "foreach", "cpu"])
def test_torch_itself_within_table(backend: str, dtype: torch.dtype, options: dict[str, Any]) -> None:
    """The tolerance table is torch's own error with margin: check it still holds for torch.

    Each of torch's implementations (for-loop, foreach, fused) on the data of the test above.
    """
    skip_unsupported(backend, dtype, **options)
    tol = reference_tol(dtype, options["eps"])
    if tol is None:
        pytest.skip(f"no table entry: eps {options['eps']} is 0 in {dtype}")
    init = _init(backend, dtype)
    refs = _reference(init, options)
    params = [p.contiguous() for p in init]  # contiguous: see the test above
    opt = torch.optim.AdamW(params, **torch_counterpart(backend), **options)
    _run(opt, params, transposed_last_grad=False)
    for name, pairs in reference_entries(opt, params, refs).items():
        for i, (actual, ref) in enumerate(pairs):
            tol.assert_close(actual, ref, f"torch {backend} {dtype}, {name} of param {i}")


def _max_abs(t: Tensor) -> float:
    """The largest error, NaN counted as infinite: where torch's own result is NaN (float16 with an eps
    that is 0 in float16, see reference_tol), ours may be too, and no worse."""
    return t.abs().nan_to_num(nan=math.inf).max().item() if t.numel() else 0.0
