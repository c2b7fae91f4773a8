"""The CPU backend (``fused=True`` on CPU tensors): our C kernel, one call per group and dtype.

Mirrors :mod:`adamw._math` in the operation order of torch's CPU fused kernel (see the comment at
the top of ``adamw_cpu.c``). Float32 and float64 params compute in their own type, bfloat16 and
float16 params in float32; the states are in the param's dtype, as in torch's fused path.

``adamw_cpu.c`` is built on first use by :mod:`adamw.backends._native`, before the first step
changes anything (:func:`adamw.functional.check_kernel`). Without a compiler, or when the build
fails, that step raises; it does not silently fall back: the user asked for this kernel, and the
for-loop or foreach path is one flag away (``fused=None`` or ``foreach=True``).

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
from itertools import chain
from pathlib import Path

import torch
from torch import Tensor

from . import _native
from ._common import PLAIN_TYPES, Hyper, dtype_of, host_value, is_cpu
from ._plans import Memory, PlanCache

SOURCE = Path(__file__).with_name("adamw_cpu.c")
ABI_VERSION = 1

# The kernel's dtype codes (the enum in adamw_common.h).
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_STEP_CODES = {torch.float32: 0, torch.float64: 1}


def library() -> _native.Library:
    """The kernel, compiled on first use (or found in the cache) and loaded once per process."""
    return _native.load(KERNEL)


def _bind(lib: ctypes.CDLL) -> Callable[..., int]:
    if (abi := lib.adamw_abi_version()) != ABI_VERSION:
        raise RuntimeError(f"adamw's CPU kernel has ABI {abi}, expected {ABI_VERSION}")
    fn = lib.adamw_step
    ptr, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    # dtype, n, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, numels, steps, step_dtype,
    # lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, unscale, grad_scale, num_threads
    fn.argtypes = [i32, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, f64, f64, f64, f64, f64, i32, i32, i32, f64, i32]
    fn.restype = i32
    return fn


KERNEL = _native.Kernel(SOURCE, _bind, "fused CPU kernel (fused=True on CPU tensors)", "fused=None or foreach=True")

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
    eps, weight_decay = float(hyper.eps), float(hyper.weight_decay)
    flags = (int(hyper.amsgrad), int(hyper.maximize), int(hyper.grad_scale is not None))
    grad_scale = 1.0 if hyper.grad_scale is None else float(hyper.grad_scale)
    # The kernel's arguments from lr on (see _bind); _step_one_dtype reads the unscale flag, [7].
    scalars = (lr, beta1, beta2, eps, weight_decay, *flags, grad_scale, torch.get_num_threads())
    tensors = [params, grads, exp_avgs, exp_avg_sqs, *([max_exp_avg_sqs] if hyper.amsgrad else [])]
    if not set(map(type, params)) <= PLAIN_TYPES:
        tensors, state_steps = _to_local(tensors), _to_local([state_steps])[0]
    memory = _memory(tensors, state_steps)
    plan = _plans.get(_key(tensors), memory)  # kept for a group of one dtype, every tensor contiguous
    if plan is None:
        dtypes = set(memory.fingerprint[2][: len(params)])
        if len(dtypes) > 1:
            for dtype in sorted(dtypes, key=str):  # torch's fused path too makes one call per dtype
                index = [i for i, p in enumerate(tensors[0]) if p.dtype == dtype]
                some, steps = [[lst[i] for i in index] for lst in tensors], [state_steps[i] for i in index]
                some_memory = _memory(some, steps)
                _step_one_dtype(fn, some, steps, scalars, some_memory, _plans.get(_key(some), some_memory))
            return
    _step_one_dtype(fn, tensors, state_steps, scalars, memory, plan)


def _memory(tensors: list[list[Tensor]], steps: list[Tensor]) -> Memory:
    """The tensors of a plan: params, states and steps in its order; grads moving."""
    return Memory([*tensors[0], *chain.from_iterable(tensors[2:]), *steps], tensors[1])


def _key(tensors: list[list[Tensor]]) -> tuple[int, int, int]:
    return id(tensors[0][0]), len(tensors[0]), len(tensors)


def _step_one_dtype(
    fn: Callable[..., int],
    tensors: list[list[Tensor]],
    steps: list[Tensor],
    scalars: tuple[float, ...],
    memory: Memory,
    plan: _Plan | None,
) -> None:
    """One kernel call over tensors of one dtype, by ``plan`` (the kept one) or one built here."""
    copies: list[tuple[int, Tensor, Tensor]] = []
    if plan is None and memory.fingerprint[4] is None:  # every tensor contiguous: a plan to keep
        plan = _build_plan(tensors, steps)
        _plans.put(_key(tensors), memory, plan, nbytes=8 * (len(plan.pointers) + plan.count))  # pointers, numels
    elif plan is None:  # stepped through contiguous copies, made anew each step: a plan for this step only
        tensors, copies = _contiguous(tensors)
        plan = _build_plan(tensors, steps)
    plan.pointers[plan.count : 2 * plan.count] = array.array("Q", map(_data_ptr, tensors[1]))
    rc = fn(*plan.args, *scalars)
    if rc != 0:
        raise RuntimeError(f"adamw's CPU kernel failed with code {rc}")
    unscaled = bool(scalars[7])
    for which, original, copy in copies:
        if which != 1 or unscaled:  # a grad changes only when it is unscaled
            original.copy_(copy)


@dataclass
class _Plan:
    """One group's checked layout: what the kernel call needs beyond the grads' pointers."""

    count: int
    numels: array.array  # read by the kernel through args: kept alive here
    pointers: array.array  # the pointer arrays the kernel reads, one after another
    args: tuple[int | None, ...]  # the kernel's arguments up to the step counters' dtype


_plans: PlanCache[_Plan] = PlanCache()


def _build_plan(tensors: list[list[Tensor]], steps: list[Tensor]) -> _Plan:
    """Check every tensor (CPU, contiguous, the param's dtype and size) and lay out the pointers."""
    params = tensors[0]
    dtype = params[0].dtype
    if dtype not in _DTYPE_CODES:
        raise RuntimeError(f"the fused CPU kernel supports {list(_DTYPE_CODES)}, but got params of {dtype}")
    numels = list(map(_numel, params))
    names = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
    for name, lst in zip(names, tensors, strict=False):
        if not all(map(is_cpu, lst)):
            raise RuntimeError(f"the fused CPU kernel needs every tensor on the CPU, but some {name} are not")
        if set(map(dtype_of, lst)) != {dtype}:
            raise RuntimeError(f"the fused CPU kernel needs {name} of the params' dtype {dtype}")
        if list(map(_numel, lst)) != numels:
            raise RuntimeError(f"the fused CPU kernel needs {name} of the params' sizes")
        if not all(map(_is_contiguous, lst)):
            raise RuntimeError(f"the fused CPU kernel needs contiguous {name}")
    step_dtypes = set(map(dtype_of, steps))
    if len(step_dtypes) != 1 or not step_dtypes <= _STEP_CODES.keys() or not all(map(is_cpu, steps)):
        raise RuntimeError(f"the fused CPU kernel needs float32 or float64 step counters on the CPU, got {step_dtypes}")
    if any(n != 1 for n in map(_numel, steps)):
        raise RuntimeError("the fused CPU kernel needs one-element step counters")

    count = len(params)
    # Laid out as the kernel's arguments: params, grads, the states, then the steps.
    layout = [*map(_data_ptr, params), *[0] * count, *map(_data_ptr, chain(*tensors[2:], steps))]
    pointers = array.array("Q", layout)
    base, item = pointers.buffer_info()[0], pointers.itemsize
    lists = [base + k * count * item for k in range(len(tensors) + 1)]  # the last: the steps'
    numel_array = array.array("q", numels)
    max_exp_avg_sqs, step_code = lists[4] if len(tensors) == 5 else None, _STEP_CODES[step_dtypes.pop()]
    args = (_DTYPE_CODES[dtype], count, *lists[:4], max_exp_avg_sqs, numel_array.buffer_info()[0], lists[-1], step_code)
    return _Plan(count, numel_array, pointers, args)


def _contiguous(lists: list[list[Tensor]]) -> tuple[list[list[Tensor]], list[tuple[int, Tensor, Tensor]]]:
    """Contiguous stand-ins for non-contiguous tensors, as (list index, original, copy) to copy back."""
    copies: list[tuple[int, Tensor, Tensor]] = []
    out = []
    for which, lst in enumerate(lists):
        out.append([t if t.is_contiguous() else t.contiguous() for t in lst])
        copies += [(which, t, c) for t, c in zip(lst, out[-1], strict=True) if c is not t]
    return out, copies


def _to_local(lists: list[list[Tensor]]) -> list[list[Tensor]]:
    """DTensor (FSDP2) params and states are stepped through their local shards."""
    from torch.distributed.tensor import DTensor

    return [[t.to_local() if isinstance(t, DTensor) else t for t in lst] for lst in lists]
