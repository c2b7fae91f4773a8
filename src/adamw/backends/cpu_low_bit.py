"""The low-bit CPU kernel (``fused=True`` on CPU with bf16, 8-bit or 4-bit moments or bf16 params without a
master copy): ``adamw_cpu_low_bit.c``, one call per group and step.

Mirrors :func:`adamw.backends.forloop.reference_step` bit for bit (the C source's header states the
operation order and the storage rules). Built on first use by :mod:`adamw.backends._native`, as the
CPU kernel is. Params it does not take (float64 or complex128, a state laid out other than its format
says, a step counter that is not a float32 or float64 CPU scalar) run the reference itself, as
:func:`adamw.backends.low_bit.sort_group` sorts them (GradScaler's grads too).

**Per step** the host passes the grads' pointers and nothing else per param: the kernel increments
the step counters and derives each tensor's step size and rounding keys from them. The table of
everything else (pointers, sizes, formats, stream keys) is kept per group while the group's
fingerprint (:mod:`adamw.backends._plans`) is the one it was built for.
"""

from __future__ import annotations

import array
import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..states.formats import INT4, INT8
from ..states.quantize import num_blocks
from ..states.rounding import (
    PURPOSE_EXP_AVG,
    PURPOSE_EXP_AVG_SQ,
    PURPOSE_MAX_EXP_AVG_SQ,
    PURPOSE_PARAM,
    stream_key,
)
from . import _native
from ._common import Hyper
from ._plans import PlanCache
from .forloop import reference_step
from .low_bit import (
    KernelParam,
    StorageFormat,
    bump_steps,
    code_tables,
    group_memory,
    host_scalars,
    plan_key,
    sort_group,
)

SOURCE = Path(__file__).with_name("adamw_cpu_low_bit.c")
ABI_VERSION = 4
QBLOCK, QBLOCK4 = 256, 128  # the C source's QBLOCK and QBLOCK4

# The kernel's dtype codes (its enum); float64 and complex128 params run the reference.
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 2, torch.float16: 3, torch.uint8: 4}
_UINT4X2 = 5  # DTYPE_UINT4X2: 4-bit moments, two codes a byte (uint8 tensors, told apart by their format)
_STEP_CODES = {torch.float32: 0, torch.float64: 1}  # the step counters the kernel increments
_UPDATE_CODES = {"round": 0, "stochastic": 1, "kahan": 2}
_PURPOSES = (PURPOSE_PARAM, PURPOSE_EXP_AVG, PURPOSE_EXP_AVG_SQ, PURPOSE_MAX_EXP_AVG_SQ)  # LowBitTensor.key order


class _Tensor(ctypes.Structure):
    """The C source's ``LowBitTensor``, field for field."""

    _fields_ = [
        ("param", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("moment", ctypes.c_void_p * 3),
        ("absmax", ctypes.c_void_p * 3),
        ("comp", ctypes.c_void_p),
        ("step", ctypes.c_void_p),
        ("numel", ctypes.c_int64),
        ("first_block", ctypes.c_int64),
        ("stream_key", ctypes.c_uint32 * 4),
        ("key", ctypes.c_uint32 * 4),
        ("neg_step_size", ctypes.c_double),
        ("bc2_sqrt", ctypes.c_double),
        ("param_dtype", ctypes.c_int32),
        ("grad_dtype", ctypes.c_int32),
        ("moment_dtype", ctypes.c_int32),
        ("param_update", ctypes.c_int32),
        ("unscale", ctypes.c_int32),
        ("step_dtype", ctypes.c_int32),
    ]


def library() -> _native.Library:
    """The low-bit kernel, compiled on first use (or found in the cache) and loaded once per process."""
    return _native.load(KERNEL)


def _bind(lib: ctypes.CDLL) -> Callable[..., int]:
    if (abi := lib.adamw_low_bit_abi_version()) != ABI_VERSION:
        raise RuntimeError(f"adamw's low-bit CPU kernel has ABI {abi}, expected {ABI_VERSION}")
    fn = lib.adamw_low_bit_step
    ptr, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    # tensors, n, total_blocks, grads, codes, lr, beta1, beta2, decay, eps, grad_scale,
    # amsgrad, maximize, weight_decay, num_threads
    fn.argtypes = [ptr, i64, i64, ptr, ptr, f64, f64, f64, f64, f64, f64, i32, i32, i32, i32]
    fn.restype = i32
    return fn


_WHAT = "low-bit CPU kernel (fused=True on CPU tensors with state_precision/param_update other than torch's)"
KERNEL = _native.Kernel(SOURCE, _bind, _WHAT, "fused=None")


_CODES = code_tables("cpu")  # the kernel's ``codes``: the tables are fixed once the formats are made
assert (INT8.block_size, INT4.block_size) == (QBLOCK, QBLOCK4)


def step_low_bit(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    state_steps: list[Tensor],
    streams: list[int],
    hyper: Hyper,
    storage: StorageFormat,
) -> None:
    """The low-bit step of :mod:`adamw.backends.forloop` in one kernel call per group."""
    if not params:
        return
    fn = library().step_fn
    scalars = host_scalars(hyper)
    if scalars is None:
        return
    key, memory = plan_key(params, hyper, storage), group_memory(params, grads, states, state_steps, streams)
    table = _tables.get(key, memory)
    group = None
    if table is None:
        group = sort_group(params, grads, states, state_steps, hyper, storage, _takes, quantized=(INT8, INT4))
        reference = [state_steps[i] for i, _ in group.reference]
        for (i, grad), number in zip(group.reference, bump_steps(reference), strict=True):
            reference_step(params[i], grad, states[i], number, streams[i], hyper, storage, *scalars)
        table = _build(group.kernel, state_steps, streams, storage.seed)
        if group.reusable:
            _tables.put(key, memory, table, nbytes=ctypes.sizeof(table.rows) + 8 * table.count)
        grads = [kernel_param.grad for kernel_param in group.kernel]  # unscaled or contiguous copies where needed
    table.grad_ptrs[:] = array.array("Q", map(_data_ptr, grads))
    if table.count:
        lr, beta1, beta2 = scalars
        grad_scale = 1.0 if hyper.grad_scale is None else float(hyper.grad_scale.item())
        flags = (int(hyper.amsgrad), int(hyper.maximize), int(hyper.weight_decay != 0), torch.get_num_threads())
        rows = (table.rows_address, table.count, table.total_blocks, table.grad_ptrs.buffer_info()[0])
        rc = fn(*rows, _CODES.data_ptr(), lr, beta1, beta2, 1 - lr * hyper.weight_decay, hyper.eps, grad_scale, *flags)
        if rc != 0:
            raise RuntimeError(f"adamw's low-bit CPU kernel failed with code {rc}")
    if group is not None:
        for copy, original in group.written_back:
            original.copy_(copy)


_data_ptr = Tensor.data_ptr


@dataclass(eq=False)
class _Table:
    """A group's kernel rows: pointers, sizes, formats, stream keys."""

    rows: ctypes.Array[_Tensor]
    rows_address: int  # taken once: torch.compile cannot trace ctypes.addressof (a graph break and a warning)
    count: int
    total_blocks: int
    grad_ptrs: array.array[int]


_tables: PlanCache[_Table] = PlanCache()


def _build(kernel_params: list[KernelParam], state_steps: list[Tensor], streams: list[int], seed: int) -> _Table:
    """Lay out the row of every param the kernel takes."""
    rows: list[_Tensor] = []
    total_blocks = 0
    for kernel_param in kernel_params:
        real, real_grad, *states = kernel_param.columns
        moments, absmaxes, comp = states[:3], states[3:6], states[6]
        assert real is not None and real_grad is not None and moments[0] is not None
        step_t, stream = state_steps[kernel_param.position], streams[kernel_param.position]
        row = _Tensor()
        row.param = real.data_ptr()
        for j in range(3):
            row.moment[j] = _address(moments[j])
            row.absmax[j] = _address(absmaxes[j])
        row.comp = _address(comp)
        row.step, row.step_dtype = step_t.data_ptr(), _STEP_CODES[step_t.dtype]
        row.numel, row.first_block = real.numel(), total_blocks
        for j, purpose in enumerate(_PURPOSES):
            row.stream_key[j] = stream_key(seed, stream, purpose)
        row.param_dtype, row.grad_dtype = _DTYPE_CODES[real.dtype], _DTYPE_CODES[real_grad.dtype]
        row.moment_dtype = _UINT4X2 if kernel_param.code_bits == 4 else _DTYPE_CODES[moments[0].dtype]
        row.param_update, row.unscale = _UPDATE_CODES[kernel_param.param_update], int(kernel_param.unscale)
        rows.append(row)
        total_blocks += num_blocks(real.numel())
    table_rows = (_Tensor * len(rows))(*rows)
    grad_ptrs = array.array("Q", [0] * len(rows))
    return _Table(table_rows, ctypes.addressof(table_rows), len(rows), total_blocks, grad_ptrs)


def _address(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _takes(param: Tensor, step: Tensor) -> bool:
    """Whether the kernel takes a param of a kind both low-bit kernels take: one on the CPU, whose
    step counter it can increment in place."""
    return param.is_cpu and step.is_cpu and step.dtype in _STEP_CODES and step.numel() == 1 and step.is_contiguous()
