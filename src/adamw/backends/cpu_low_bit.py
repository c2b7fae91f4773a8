"""The low-bit CPU kernel (``fused=True`` on CPU with bf16/8-bit moments or bf16 params without a master
copy): ``adamw_cpu_low_bit.c``, one call per group and step.

Mirrors :func:`adamw.states.low_bit_step` bit for bit (see the comment at the top of the C source for
the operation order and the storage rules). Built, cached, checked and loaded on first use by
:mod:`adamw.backends._native`, as the CPU kernel is; a missing compiler fails as that kernel's does.

Params the kernel does not take (float64 or complex128, a state laid out other than its format says,
or a step counter that is not a float32 or float64 CPU scalar) run the reference itself.

**Per step** the host passes the grads' pointers and nothing else per param: the kernel increments
the step counters and derives each tensor's step size and rounding keys from them. The table of
everything else (pointers, sizes, formats, stream keys) is kept per group and reused while the same
tensors are stepped, which a check of their identities, pointers, sizes, dtypes and layouts
confirms each step (a few C-level calls per tensor: ~1.5 ms for 1000 params, against ~30 ms to
rebuild the table).

**GradScaler.** As :mod:`adamw.backends.low_bit`: a nonzero ``found_inf`` skips the step, counters
included; float32 grads are divided by ``grad_scale`` in the kernel (a correctly rounded division,
as torch's), others by torch's op on the host, whose rounding for reduced types differs.
"""

from __future__ import annotations

import array
import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..states.formats import StateFormat, format_for
from ..states.quantize import BLOCK_SIZE, SIGNED_CODE, UNSIGNED_CODE, num_blocks
from ..states.rounding import (
    PURPOSE_EXP_AVG,
    PURPOSE_EXP_AVG_SQ,
    PURPOSE_MAX_EXP_AVG_SQ,
    PURPOSE_PARAM,
    stream_key,
)
from . import _native
from ._common import Hyper
from .low_bit import (
    KeptLayout,
    KeptTables,
    StorageFormat,
    effective_param_update,
    host_scalars,
    kernel_state_keys,
    reference_step,
    stage_contiguous,
    state_columns,
)
from .low_bit import real_view as _real

SOURCE = Path(__file__).with_name("adamw_cpu_low_bit.c")
ABI_VERSION = 2
QBLOCK = 256  # the C source's QBLOCK

# The kernel's dtype codes (its enum); float64 and complex128 params run the reference.
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 2, torch.float16: 3, torch.uint8: 4}
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


# --------------------------------------------------------------------------------------------------
# the library


def library() -> _native.Library:
    """The low-bit kernel, compiled on first use (or found in the cache) and loaded once per process."""
    return _native.load(KERNEL)


def _bind(lib: ctypes.CDLL) -> Callable[..., int]:
    if lib.adamw_low_bit_abi_version() != ABI_VERSION:
        raise RuntimeError(
            f"adamw's low-bit CPU kernel has ABI {lib.adamw_low_bit_abi_version()}, expected {ABI_VERSION}"
        )
    fn = lib.adamw_low_bit_step
    ptr, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    # tensors, n, total_blocks, grads, codes, lr, beta1, beta2, decay, eps, grad_scale,
    # amsgrad, maximize, weight_decay, num_threads
    fn.argtypes = [ptr, i64, i64, ptr, ptr, f64, f64, f64, f64, f64, f64, i32, i32, i32, i32]
    fn.restype = i32
    return fn


KERNEL = _native.Kernel(
    SOURCE,
    _bind,
    "low-bit CPU kernel (fused=True on CPU tensors with state_precision/param_update other than torch's)",
    "fused=None",
)


def _codes() -> Tensor:
    """Both code tables, values then midpoints (the C source's layout of ``codes``)."""
    parts = [*SIGNED_CODE.tables("cpu"), *UNSIGNED_CODE.tables("cpu")]
    return torch.cat([t.to(torch.float32) for t in parts]).contiguous()


_CODES = _codes()
assert _CODES.numel() == 256 + 127 + 256 + 255 and BLOCK_SIZE == QBLOCK


# --------------------------------------------------------------------------------------------------
# the step


def step_low_bit(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    state_steps: list[Tensor],
    streams: list[int],
    hyper: Hyper,
    storage: StorageFormat,
) -> None:
    """The low-bit step of :mod:`adamw.backends.low_bit` in one kernel call per group."""
    if not params:
        return
    fn = library().step_fn
    scalars = host_scalars(hyper)
    if scalars is None:
        return
    lr, beta1, beta2 = scalars
    config = _tables.config(storage, hyper)
    table = _tables.find(params, grads, states, state_steps, streams, config)
    built: _Built | None = None
    if table is None:
        built = _build(params, grads, states, state_steps, streams, hyper, storage, config, lr, beta1, beta2)
        table = built.table
        if table.kept is not None:
            _tables.keep(params, config, table)
    table.grad_ptrs[:] = array.array("Q", map(_data_ptr, grads if built is None else built.grads))
    if table.count:
        scale = hyper.grad_scale
        rc = fn(
            table.rows_address,
            table.count,
            table.total_blocks,
            table.grad_ptrs.buffer_info()[0],
            _CODES.data_ptr(),
            lr,
            beta1,
            beta2,
            1 - lr * hyper.weight_decay,
            hyper.eps,
            float(scale.item()) if scale is not None else 1.0,
            int(hyper.amsgrad),
            int(hyper.maximize),
            int(hyper.weight_decay != 0),
            torch.get_num_threads(),
        )
        if rc != 0:
            raise RuntimeError(f"adamw's low-bit CPU kernel failed with code {rc}")
    if built is not None:
        for copy, original in built.written_back:
            original.copy_(copy)


_data_ptr = Tensor.data_ptr


@dataclass(eq=False)
class _Table:
    """A group's kernel rows (pointers, sizes, formats, stream keys), and the layout they were built
    from (None: built from staged copies, host-divided grads or with params the reference stepped,
    so not reusable)."""

    rows: ctypes.Array[_Tensor]
    rows_address: int  # taken once: torch.compile cannot trace ctypes.addressof (a graph break and a warning)
    count: int
    total_blocks: int
    grad_ptrs: array.array[int]
    kept: KeptLayout | None = None


_tables: KeptTables[_Table] = KeptTables(limit=4096)  # a step in backward keeps one per param


@dataclass
class _Built:
    """A table just built, with what this one step needs besides it."""

    table: _Table
    grads: list[Tensor]  # the grad each row reads (unscaled or contiguous copies where needed)
    written_back: list[tuple[Tensor, Tensor]]  # (contiguous copy, original) to copy back after the step
    keep_alive: list[Tensor]  # staged copies the rows point into


def _build(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    state_steps: list[Tensor],
    streams: list[int],
    hyper: Hyper,
    storage: StorageFormat,
    config: tuple[object, ...],
    lr: float,
    beta1: float,
    beta2: float,
) -> _Built:
    """Check every param and lay out its row. Params the kernel does not take are stepped here by
    the reference (their grads unscaled first); a table with any of them is not reused."""
    scale = hyper.grad_scale
    rows: list[_Tensor] = []
    row_grads: list[Tensor] = []
    written_back: list[tuple[Tensor, Tensor]] = []
    keep_alive: list[Tensor] = []
    state_keys: list[tuple[str, ...]] = []
    reusable = True
    total_blocks = 0
    for param, grad, state, step_t, stream in zip(params, grads, states, state_steps, streams, strict=True):
        param_update = effective_param_update(param, storage.param_update)
        fmt = format_for(param, storage.state_precision)
        unscale = scale is not None and grad.dtype == torch.float32 and scale.dtype == torch.float32
        if scale is not None and not unscale:
            grad = grad / scale.to(grad.device)
            reusable = False  # a new grad every step
        columns = _columns(param, grad, state, fmt, hyper.amsgrad, param_update)
        if columns is None or not _kernel_counts(step_t):
            if unscale:
                grad = grad / scale.to(grad.device)  # type: ignore[union-attr]
            step_t += 1
            reference_step(param, grad, state, int(step_t.item()), stream, hyper, storage, lr, beta1, beta2)
            reusable = False
            continue
        staged, back = stage_contiguous(columns)
        written_back += back
        if any(new is not old for new, old in zip(staged, columns, strict=True)):
            reusable = False  # contiguous copies, made anew every step
        keep_alive += [t for t in staged if t is not None]
        real, real_grad = staged[0], staged[1]
        assert real is not None and real_grad is not None and staged[2] is not None
        row = _Tensor()
        row.param = real.data_ptr()
        for j in range(3):
            moment, absmax = staged[2 + j], staged[5 + j]
            row.moment[j] = 0 if moment is None else moment.data_ptr()
            row.absmax[j] = 0 if absmax is None else absmax.data_ptr()
        comp = staged[8]
        row.comp = 0 if comp is None else comp.data_ptr()
        row.step, row.step_dtype = step_t.data_ptr(), _STEP_CODES[step_t.dtype]
        row.numel, row.first_block = real.numel(), total_blocks
        for j, purpose in enumerate(_PURPOSES):
            row.stream_key[j] = stream_key(storage.seed, stream, purpose)
        row.param_dtype, row.grad_dtype = _DTYPE_CODES[real.dtype], _DTYPE_CODES[real_grad.dtype]
        row.moment_dtype = _DTYPE_CODES[staged[2].dtype]
        row.param_update, row.unscale = _UPDATE_CODES[param_update], int(unscale)
        rows.append(row)
        row_grads.append(real_grad)
        total_blocks += num_blocks(real.numel())
        state_keys.append(kernel_state_keys(fmt, hyper.amsgrad, param_update))
    table_rows = (_Tensor * len(rows))(*rows)
    table = _Table(
        rows=table_rows,
        rows_address=ctypes.addressof(table_rows),
        count=len(rows),
        total_blocks=total_blocks,
        grad_ptrs=array.array("Q", [0] * len(rows)),
    )
    if reusable:
        table.kept = KeptLayout.capture(params, grads, states, state_steps, streams, config, state_keys)
    return _Built(table, row_grads, written_back, keep_alive)


def _kernel_counts(step: Tensor) -> bool:
    """Whether the kernel can increment this step counter in place."""
    return step.is_cpu and step.dtype in _STEP_CODES and step.numel() == 1 and step.is_contiguous()


def _columns(
    param: Tensor, grad: Tensor, state: dict[str, Tensor], fmt: StateFormat, amsgrad: bool, param_update: str
) -> list[Tensor | None] | None:
    """param, grad, the three moments, their absmaxes and the Kahan buffer (None: unused), or None
    where the kernel does not take the param (the reference then steps it, and raises if its state
    does not fit its format)."""
    real, real_grad = _real(param), _real(grad)
    if real.dtype not in _DTYPE_CODES or real_grad.dtype not in _DTYPE_CODES or real.dtype == torch.uint8:
        return None
    if real_grad.dtype == torch.uint8 or real_grad.shape != real.shape or not real.is_cpu or not real_grad.is_cpu:
        return None
    columns = state_columns(real, param, state, fmt, amsgrad, param_update)
    return None if columns is None else [real, real_grad, *columns]
