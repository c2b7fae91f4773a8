"""The CPU backend (``fused=True`` on CPU tensors): our C kernel, one call per group and dtype.

Mirrors :mod:`adamw._math` in the operation order of torch's CPU fused kernel (see the comment at
the top of ``adamw_cpu.c``). Float32 and float64 params compute in their own type, bfloat16 and
float16 params in float32; the states are in the param's dtype, as in torch's fused path.

**Build.** ``adamw_cpu.c`` is compiled on first use (about a second), cached, checked and loaded
by :mod:`adamw.backends._native`, which says how (compiler, flags, cache directory, trust).
:class:`adamw.AdamW` loads it, through :func:`adamw.functional.check_kernel`, before its first step
changes anything.

**Without a compiler** (or when the build fails) that first ``step`` of an optimizer that asked for
``fused=True`` on CPU tensors (or ``backend="cpu"``) raises a ``RuntimeError`` that names the compiler
and its error, before any param or state has changed. It does not silently fall back: the user asked
for this kernel, and the for-loop or foreach path is one flag away (``fused=None`` or
``foreach=True``).

**Threads:** ``torch.get_num_threads()`` per call. The library links ``libgomp.so.1``, the OpenMP
runtime torch itself loads, so both share one thread pool (no oversubscription).

**GradScaler.** As torch's fused optimizers: grads are divided by ``grad_scale`` in the kernel (and
stored back unscaled); when ``found_inf`` is nonzero nothing changes, the step counters included.
"""

from __future__ import annotations

import array
import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

import torch
from torch import Tensor

from . import _native
from ._common import PLAIN_TYPES, Hyper, host_value

SOURCE = Path(__file__).with_name("adamw_cpu.c")
ABI_VERSION = 1

# The kernel's dtype codes (the enum in adamw_common.h).
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_STEP_CODES = {torch.float32: 0, torch.float64: 1}


# --------------------------------------------------------------------------------------------------
# the library


def library() -> _native.Library:
    """The kernel, compiled on first use (or found in the cache) and loaded once per process."""
    return _native.load(KERNEL)


def _bind(lib: ctypes.CDLL) -> Callable[..., int]:
    if lib.adamw_abi_version() != ABI_VERSION:
        raise RuntimeError(f"adamw's CPU kernel has ABI {lib.adamw_abi_version()}, expected {ABI_VERSION}")
    fn = lib.adamw_step
    ptr, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    # dtype, n, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, numels, steps, step_dtype,
    # lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, unscale, grad_scale, num_threads
    fn.argtypes = [i32, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, f64, f64, f64, f64, f64, i32, i32, i32, f64, i32]
    fn.restype = i32
    return fn


KERNEL = _native.Kernel(SOURCE, _bind, "fused CPU kernel (fused=True on CPU tensors)", "fused=None or foreach=True")


# the step

_dtype = attrgetter("dtype")
_is_cpu = attrgetter("is_cpu")
_nbytes = attrgetter("nbytes")
_numel = Tensor.numel
_data_ptr = Tensor.data_ptr
_is_contiguous = Tensor.is_contiguous


def step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hyper: Hyper,
) -> None:
    if not params:
        return
    if hyper.differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if hyper.has_complex:
        raise RuntimeError("the fused CPU kernel does not support complex params")
    fn = library().step_fn
    if hyper.found_inf is not None and float(hyper.found_inf) != 0.0:
        return  # torch's contract: steps go +1 then -found_inf; nothing else changes
    lr, beta1, beta2 = (float(host_value(x)) for x in hyper.scalar_lr_betas())
    unscale = hyper.grad_scale is not None
    scalars = (
        lr,
        beta1,
        beta2,
        float(hyper.eps),
        float(hyper.weight_decay),
        int(hyper.amsgrad),
        int(hyper.maximize),
        int(unscale),
        float(hyper.grad_scale) if hyper.grad_scale is not None else 1.0,
        torch.get_num_threads(),
    )
    tensors = [params, grads, exp_avgs, exp_avg_sqs, *([max_exp_avg_sqs] if hyper.amsgrad else [])]
    if not set(map(type, params)) <= PLAIN_TYPES:
        tensors, state_steps = _to_local(tensors), _to_local([state_steps])[0]
    dtypes = set(map(_dtype, tensors[0]))
    if len(dtypes) == 1:
        _step_one_dtype(fn, tensors, state_steps, scalars)
        return
    for dtype in sorted(dtypes, key=str):  # torch's fused path too makes one call per dtype
        index = [i for i, p in enumerate(tensors[0]) if p.dtype == dtype]
        _step_one_dtype(fn, [[lst[i] for i in index] for lst in tensors], [state_steps[i] for i in index], scalars)


def _step_one_dtype(
    fn: Callable[..., int], tensors: list[list[Tensor]], steps: list[Tensor], scalars: tuple[float, ...]
) -> None:
    copies: list[tuple[int, Tensor, Tensor]] = []
    if not all(all(map(_is_contiguous, lst)) for lst in tensors):
        tensors, copies = _contiguous(tensors)
    plan = _plan(tensors, steps)
    rc = fn(plan.dtype_code, plan.count, *plan.pointer_args, plan.step_code, *scalars)
    if rc != 0:
        raise RuntimeError(f"adamw's CPU kernel failed with code {rc}")
    unscaled = bool(scalars[7])
    for which, original, copy in copies:
        if which != 1 or unscaled:  # a grad changes only when it is unscaled
            original.copy_(copy)


@dataclass
class _Plan:
    """One group's validated layout: what the kernel call needs beyond the grads' pointers."""

    count: int
    dtype: torch.dtype  # of every param, grad and state
    dtype_code: int
    step_dtype: torch.dtype
    step_code: int
    nbytes: list[int]  # each param's
    state_ptrs: list[int]  # params, states and steps, in that order
    numels: array.array
    pointers: array.array  # the pointer arrays the kernel reads, one after another
    pointer_args: tuple[int | None, ...] = ()


# Plans of the groups stepped lately, keyed by their first param; a hit is checked pointer by pointer.
_plans: dict[tuple[int, int, int], _Plan] = {}
# Enough for a step in backward, which steps each param as its own group (a plan holds pointers only).
_MAX_PLANS = 4096


def _plan(tensors: list[list[Tensor]], steps: list[Tensor]) -> _Plan:
    """The group's plan: reused while it fits the tensors (see :func:`_fits`), else built after a full check."""
    params, grads = tensors[0], tensors[1]
    count = len(params)
    key = (id(params[0]), count, len(tensors))
    ptrs = list(map(_data_ptr, params))
    for lst in tensors[2:]:
        ptrs += map(_data_ptr, lst)
    ptrs += map(_data_ptr, steps)
    grad_ptrs = list(map(_data_ptr, grads))
    plan = _plans.get(key)
    if plan is None or not _fits(plan, tensors, steps, ptrs):
        plan = _build_plan(tensors, steps, ptrs)
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        _plans[key] = plan
    plan.pointers[count : 2 * count] = array.array("Q", grad_ptrs)
    return plan


def _fits(plan: _Plan, tensors: list[list[Tensor]], steps: list[Tensor], ptrs: list[int]) -> bool:
    """Whether every tensor still has what the plan was checked for and the kernel relies on: its
    pointer, dtype, size in bytes (with the dtype: its number of values) and device; the caller has
    checked contiguity and passes params of one dtype. A pointer and a size can stay while the rest
    changes: ``p.data = p.data.view(torch.float16)`` keeps both, and a checkpoint loaded into another
    model may reuse freed memory. Each property is read in one C-level pass per list (``map``), each
    about as costly as reading the pointers."""
    return (
        plan.state_ptrs == ptrs
        and tensors[0][0].dtype == plan.dtype
        and all(list(map(_nbytes, lst)) == plan.nbytes for lst in tensors)
        and all(set(map(_dtype, lst)) == {plan.dtype} for lst in tensors[1:])
        and set(map(_dtype, steps)) == {plan.step_dtype}
        and all(all(map(_is_cpu, lst)) for lst in tensors)
        and all(map(_is_cpu, steps))
    )


def _build_plan(tensors: list[list[Tensor]], steps: list[Tensor], ptrs: list[int]) -> _Plan:
    """Check every tensor (CPU, contiguous, the param's dtype and size) and lay out the pointers."""
    params = tensors[0]
    dtype = params[0].dtype
    if dtype not in _DTYPE_CODES:
        raise RuntimeError(f"the fused CPU kernel supports {list(_DTYPE_CODES)}, but got params of {dtype}")
    numels = list(map(_numel, params))
    nbytes = list(map(_nbytes, params))
    names = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
    for name, lst in zip(names, tensors, strict=False):
        if not all(map(_is_cpu, lst)):
            raise RuntimeError(f"the fused CPU kernel needs every tensor on the CPU, but some {name} are not")
        if set(map(_dtype, lst)) != {dtype}:
            raise RuntimeError(f"the fused CPU kernel needs {name} of the params' dtype {dtype}")
        if list(map(_numel, lst)) != numels:
            raise RuntimeError(f"the fused CPU kernel needs {name} of the params' sizes")
        if not all(map(_is_contiguous, lst)):
            raise RuntimeError(f"the fused CPU kernel needs contiguous {name}")
    step_dtypes = set(map(_dtype, steps))
    if len(step_dtypes) != 1 or not step_dtypes <= _STEP_CODES.keys() or not all(map(_is_cpu, steps)):
        raise RuntimeError(f"the fused CPU kernel needs float32 or float64 step counters on the CPU, got {step_dtypes}")
    if any(n != 1 for n in map(_numel, steps)):
        raise RuntimeError("the fused CPU kernel needs one-element step counters")

    count = len(params)
    # Laid out as the kernel's arguments: params, grads, the states, then the steps.
    layout = ptrs[:count] + [0] * count + ptrs[count:]
    pointers = array.array("Q", layout)
    base, item = pointers.buffer_info()[0], pointers.itemsize
    lists = [base + k * count * item for k in range(len(tensors))]
    numel_array = array.array("q", numels)
    pointer_args = (
        *lists[:4],
        lists[4] if len(tensors) == 5 else None,
        numel_array.buffer_info()[0],
        base + len(tensors) * count * item,
    )
    step_dtype = next(iter(step_dtypes))
    return _Plan(
        count=count,
        dtype=dtype,
        dtype_code=_DTYPE_CODES[dtype],
        step_dtype=step_dtype,
        step_code=_STEP_CODES[step_dtype],
        nbytes=nbytes,
        state_ptrs=ptrs,
        numels=numel_array,
        pointers=pointers,
        pointer_args=pointer_args,
    )


def _contiguous(lists: list[list[Tensor]]) -> tuple[list[list[Tensor]], list[tuple[int, Tensor, Tensor]]]:
    """Contiguous stand-ins for non-contiguous tensors, as (list index, original, copy) to copy back."""
    copies: list[tuple[int, Tensor, Tensor]] = []
    out = []
    for which, lst in enumerate(lists):
        new = []
        for t in lst:
            if t.is_contiguous():
                new.append(t)
            else:
                c = t.contiguous()
                copies.append((which, t, c))
                new.append(c)
        out.append(new)
    return out, copies


def _to_local(lists: list[list[Tensor]]) -> list[list[Tensor]]:
    """DTensor (FSDP2) params and states are stepped through their local shards."""
    from torch.distributed.tensor import DTensor

    return [[t.to_local() if isinstance(t, DTensor) else t for t in lst] for lst in lists]
