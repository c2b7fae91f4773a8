"""The Triton backend: our multi-tensor AdamW kernel, one launch per (device, dtype) (``fused=True`` on CUDA).

Mirrors :mod:`adamw._math`; the kernel (:mod:`adamw.backends._triton_kernels`) states the order of
operations, which is torch's.

What happens on the host, per step of a group:

1. DTensor params (FSDP2) are replaced by their local shards (``to_local()`` views), complex ones by
   ``view_as_real`` views.
2. The group's *plan* is looked up (:mod:`adamw.backends._plans`: by the group, checked against
   the fingerprint of every tensor: params, grads, states, step counters). Building a plan (on a
   miss) groups the tensors by device and dtype, checks them, and copies to the device one int64
   table per group: a row of addresses and sizes per tensor and, per chunk of ``BLOCK`` elements,
   the tensor it belongs to. The copy comes from pinned memory without a sync.
3. Per (device, dtype): one launch of the AdamW kernel over all chunks, then one launch that bumps
   the step counters (``step += 1 - found_inf``, as torch does around its fused kernels).

Nothing is read back on the host: lr (a Tensor on the params' device), the step counters, the bias
corrections, ``grad_scale`` and ``found_inf`` are all read by the kernel, so a step can be captured
in a CUDA graph. A plan built or used while a graph is captured is kept for as long as the process
lives (the graph's replays read its table); one built during capture copies its table from a
pinned buffer set aside by an earlier eager step, since pinned memory cannot be allocated while a
graph is captured. So take an eager step before capturing (torch's warm-up recipe does).

CPU tensors run under Triton's interpreter: set ``TRITON_INTERPRET=1`` in the environment before
this module is first imported (that is, before the first step with ``backend="triton"``);
``tests/conftest.py`` does so where no GPU is present. It is slow, and meant for tests::

    TRITON_INTERPRET=1 python -m pytest tests/test_triton.py       # what CI runs
    TRITON_INTERPRET=1 python -c "import torch, adamw
    p = torch.zeros(300, requires_grad=True); p.grad = torch.ones(300)
    adamw.AdamW([p], backend='triton').step(); print(p[:3])"

A plan is used while every tensor keeps its address, number of values, dtype, device and layout:
memory that stays where it was but is read differently (``p.data = p.data.view(torch.float16)``)
gets a new plan, checked. Params whose memory is not dense, or whose grad or states are laid out
differently, are stepped through contiguous copies held by the plan (correct, and slower). Plans are
kept as :class:`adamw.backends._plans.PlanCache` says: those with such copies among the newest only,
others while their tables fit a budget of device memory, so a step in backward (a group, and a plan,
per param) finds every param's plan again on the next step.

Groups in a low-bit format (``state_precision``/``param_update`` other than torch's) run
:func:`step_low_bit`: the kernel of :mod:`adamw.backends._triton_low_bit_kernels`, one launch per
(device, param dtype, grad dtype, moment storage, param_update), bit for bit
:func:`adamw.backends.forloop.reference_step`. Its table is filled every step (the step numbers, bias
corrections and rounding keys in it change) from a static table kept while the group's memory stays
where it was (its fingerprint is checked each step), after reading the step counters and
``found_inf`` on the host: the low-bit step syncs once per step and is not capturable.
"""

from __future__ import annotations

import math
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from itertools import accumulate, chain
from types import ModuleType
from typing import Any, cast

import torch
from torch import Tensor

from ..states.formats import INT4, INT8
from ..states.quantize import BLOCK_SIZE
from ..states.rounding import (
    PURPOSE_EXP_AVG,
    PURPOSE_EXP_AVG_SQ,
    PURPOSE_MAX_EXP_AVG_SQ,
    PURPOSE_PARAM,
    hash32,
    signed32,
    stream_key,
)
from ._common import PLAIN_TYPES, Hyper, dtype_of, is_cpu, is_cuda
from ._plans import Memory, PlanCache
from .forloop import reference_step
from .low_bit import (
    KERNEL_DTYPES,
    KernelParam,
    StorageFormat,
    bump_steps,
    code_tables,
    group_memory,
    host_scalars,
    plan_key,
    sort_group,
)
from .low_bit import real_view as _real

# Elements per program (a power of two). On GPUs: enough bytes in flight per program to stream at
# full bandwidth (tune with benchmarks/gpu_check.sh). Under the interpreter every program is one
# Python iteration, so small test tensors still span several chunks and both code paths.
CUDA_BLOCK = 2048
CUDA_NUM_WARPS = 8
# No contracted multiply-adds: each operation rounds on its own, as under the interpreter. Left to
# the compiler, which products fuse depends on the rest of the kernel, so one specialization rounds
# v = beta2 * v + (1 - beta2) * g * g differently from another: on an H200 the step that unscales
# GradScaler's grads itself drifted an ulp from the same step on grads unscaled beforehand.
FP_FUSION = False
INTERPRETER_BLOCK = 128
_BUMP_BLOCK = 1024  # step counters per program of the bump kernel
_SPARES_PER_SIZE = 2  # pinned buffers set aside, per table size, for plans built during capture
_MAX_GRID = 2**31 - 1

_spare_pinned: dict[int, list[Tensor]] = {}


@dataclass
class _Staged:
    """A tensor stepped through contiguous copies (its memory is not dense, or its layouts differ)."""

    position: int  # in the group's lists
    buffers: list[Tensor]  # param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq]


@dataclass
class _Launch:
    """The tensors of one (device, dtype) of a group: one kernel launch."""

    device: torch.device
    dtype: torch.dtype
    n_tensors: int
    n_chunks: int
    block: int
    aligned: bool  # every address a multiple of 16 bytes: vector loads
    table: Tensor  # int64, ROW per tensor
    chunk_tensor: Tensor  # int32, the tensor index of every chunk
    staged: list[_Staged]
    pinned_source: Tensor | None = None  # copied by a captured graph at every replay: kept alive


# A group's plan: its launches (see the module docstring).
_plans: PlanCache[list[_Launch]] = PlanCache()


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
    kernels = _kernels()
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if hyper.amsgrad else [], state_steps]
    lists = _local_views(lists, hyper.has_complex)
    capturing = _is_capturing(lists[0][0].device)
    key = (id(params[0]), len(params), CUDA_BLOCK, INTERPRETER_BLOCK)
    memory = Memory(list(chain.from_iterable(lists)))
    plan = _plans.get(key, memory, pin=capturing)
    if plan is None:
        plan = _build_plan(lists, hyper.amsgrad, capturing, kernels)
        # Its device tables count against the byte budget; staged copies, as large as the tensors,
        # against the count of plans that may hold them.
        nbytes = sum(launch.table.nbytes + launch.chunk_tensor.nbytes for launch in plan)
        staged = any(launch.staged for launch in plan)
        _plans.put(key, memory, plan, nbytes=nbytes, staged=staged, pin=capturing)
    for launch in plan:
        with _current(launch.device):
            _run(launch, lists, hyper, kernels)


# --------------------------------------------------------------------------------------------------
# the launch


def _run(launch: _Launch, lists: list[list[Tensor]], hyper: Hyper, kernels: ModuleType) -> None:
    device = launch.device
    lr, beta1, beta2 = hyper.scalar_lr_betas()
    lr_value, lr_ptr = _number_or_device_tensor(lr, device)
    beta1_value, beta1_ptr = _number_or_device_tensor(beta1, device)
    beta2_value, beta2_ptr = _number_or_device_tensor(beta2, device)
    if (beta1_ptr is None) != (beta2_ptr is None):  # one on the device, one a number: read both here
        beta1_value, beta1_ptr = float(beta1), None
        beta2_value, beta2_ptr = float(beta2), None
    grad_scale = _on_device(hyper.grad_scale, device)
    found_inf = _on_device(hyper.found_inf, device)

    for staged in launch.staged:
        for buffer, tensor in zip(staged.buffers, _role_tensors(lists, staged.position), strict=True):
            buffer.copy_(tensor)
    if launch.n_chunks:
        kernels.adamw_kernel[(launch.n_chunks,)](
            launch.table,
            launch.chunk_tensor,
            lr_ptr,
            beta1_ptr,
            beta2_ptr,
            grad_scale,
            found_inf,
            lr_value,
            beta1_value,
            beta2_value,
            _log(beta1_value),
            _log(beta2_value),
            float(hyper.eps),
            float(hyper.weight_decay),
            BLOCK=launch.block,
            AMSGRAD=hyper.amsgrad,
            MAXIMIZE=hyper.maximize,
            HAS_WEIGHT_DECAY=hyper.weight_decay != 0,
            LR_ON_DEVICE=lr_ptr is not None,
            BETAS_ON_DEVICE=beta1_ptr is not None,
            HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            ALIGNED=launch.aligned,
            DTYPE=_triton_dtype(launch.dtype, kernels),
            ACC=kernels.tl.float64 if launch.dtype == torch.float64 else kernels.tl.float32,
            num_warps=CUDA_NUM_WARPS,
            enable_fp_fusion=FP_FUSION,
        )
    kernels.bump_steps_kernel[(_cdiv(launch.n_tensors, _BUMP_BLOCK),)](
        launch.table,
        found_inf,
        launch.n_tensors,
        HAS_FOUND_INF=found_inf is not None,
        BLOCK=_BUMP_BLOCK,
        num_warps=4,
    )
    for staged in launch.staged:
        written = zip(staged.buffers, _role_tensors(lists, staged.position), strict=True)
        for role, (buffer, tensor) in enumerate(written):
            if role != 1 or grad_scale is not None:  # the grad is written only when unscaled
                tensor.copy_(buffer)


def _number_or_device_tensor(x: float | Tensor, device: torch.device) -> tuple[float, Tensor | None]:
    """A hyper-parameter as the kernel takes it: a number, or a tensor it reads on ``device``.

    A CPU tensor for CUDA params is read here (no device sync), as torch's fused kernels do.
    """
    if not isinstance(x, Tensor):
        return float(x), None
    if x.device == device:
        return 0.0, x
    if x.device.type == "cpu":
        return float(x.item()), None
    return 0.0, x.to(device, non_blocking=True)


def _current(device: torch.device) -> AbstractContextManager[Any]:
    """Triton launches on the current CUDA device."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def _on_device(x: Tensor | None, device: torch.device) -> Tensor | None:
    return x if x is None or x.device == device else x.to(device, non_blocking=True)


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


def _triton_dtype(dtype: torch.dtype, kernels: ModuleType) -> Any:
    return getattr(kernels.tl, str(dtype).removeprefix("torch."))  # tl.float32 for torch.float32, ...


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _chunk_map(numels: list[int], chunk: int, kernel: str) -> tuple[list[int], Tensor]:
    """Each tensor's first chunk of ``chunk`` elements, and the tensor (int32) of every chunk."""
    counts = [_cdiv(numel, chunk) for numel in numels]
    if sum(counts) > _MAX_GRID:
        raise RuntimeError(f"the {kernel} takes at most {_MAX_GRID} chunks of {chunk} per launch")
    first_chunks = list(accumulate(counts, initial=0))[:-1]
    tensors = torch.arange(len(numels), dtype=torch.int32)
    return first_chunks, torch.repeat_interleave(tensors, torch.tensor(counts, dtype=torch.int64))


def _role_tensors(lists: list[list[Tensor]], position: int) -> list[Tensor]:
    """param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq] of one tensor of the group."""
    return [lst[position] for lst in lists[:5] if lst]


# --------------------------------------------------------------------------------------------------
# plans


def _build_plan(lists: list[list[Tensor]], amsgrad: bool, capturing: bool, kernels: ModuleType) -> list[_Launch]:
    params = lists[0]
    interpreted = _is_interpreted_kernel(kernels.adamw_kernel)
    by_device_dtype: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, param in enumerate(params):
        _check_tensor(lists, i, interpreted)
        by_device_dtype.setdefault((param.device, param.dtype), []).append(i)
    return [
        _build_launch(lists, positions, device, dtype, amsgrad, capturing, kernels)
        for (device, dtype), positions in by_device_dtype.items()
    ]


def _build_launch(
    lists: list[list[Tensor]],
    positions: list[int],
    device: torch.device,
    dtype: torch.dtype,
    amsgrad: bool,
    capturing: bool,
    kernels: ModuleType,
) -> _Launch:
    row_width = int(kernels.ROW)
    block = INTERPRETER_BLOCK if device.type == "cpu" else CUDA_BLOCK
    columns: list[list[Tensor]] = []
    staged: list[_Staged] = []
    for position in positions:
        tensors = _role_tensors(lists, position)
        if not _flat_compatible(tensors):
            buffers = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
            staged.append(_Staged(position, buffers))
            tensors = buffers
        columns.append(tensors)
    first_chunks, chunk_tensor = _chunk_map([t[0].numel() for t in columns], block, "Triton AdamW kernel")
    rows: list[list[int]] = []
    for position, tensors, first_chunk in zip(positions, columns, first_chunks, strict=True):
        addresses = [t.data_ptr() for t in tensors] + ([] if amsgrad else [0])
        rows.append([*addresses, lists[5][position].data_ptr(), tensors[0].numel(), first_chunk])
    aligned = all(address % 16 == 0 for row in rows for address in row[:5])

    n_tensors, n_chunks = len(positions), chunk_tensor.numel()
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1)
    assert table.numel() == n_tensors * row_width
    # One buffer, one copy: the table, then the chunk map as int32 pairs (padded to whole int64s).
    if n_chunks % 2:
        chunk_tensor = torch.cat([chunk_tensor, chunk_tensor.new_zeros(1)])
    host = torch.cat([table, chunk_tensor.view(torch.int64)])
    buffer, pinned_source = _to_device(host, device, capturing)
    return _Launch(
        device=device,
        dtype=dtype,
        n_tensors=n_tensors,
        n_chunks=n_chunks,
        block=block,
        aligned=aligned,
        table=buffer[: table.numel()],
        chunk_tensor=buffer[table.numel() :].view(torch.int32),
        staged=staged,
        pinned_source=pinned_source,
    )


def _to_device(host: Tensor, device: torch.device, capturing: bool) -> tuple[Tensor, Tensor | None]:
    """Copy a plan's table to ``device`` without a host sync; the pinned source too if captured."""
    if device.type == "cpu":
        return host, None
    size = host.numel()
    spares = _spare_pinned.setdefault(size, [])
    if not capturing:
        buffer = host.pin_memory().to(device, non_blocking=True)
        while len(spares) < _SPARES_PER_SIZE:
            spares.append(torch.empty(size, dtype=torch.int64, pin_memory=True))
        return buffer, None
    if not spares:
        raise RuntimeError(
            "the Triton AdamW kernel needs a new table while a CUDA graph is being captured, and no "
            "pinned buffer was set aside for it: take one eager optimizer step with the same params "
            "before capturing (torch's warm-up iterations do)"
        )
    pinned = spares.pop()
    pinned.copy_(host)
    buffer = torch.empty(size, dtype=torch.int64, device=device)
    buffer.copy_(pinned, non_blocking=True)  # a memcpy node: every replay copies `pinned` again
    return buffer, pinned


def clear_plans() -> None:
    """Forget every plan, including those CUDA graphs captured (only safe once those graphs are gone)."""
    _plans.clear()
    _low_bit_plans.clear()
    _spare_pinned.clear()


# --------------------------------------------------------------------------------------------------
# checks and views


def _check_tensor(lists: list[list[Tensor]], position: int, interpreted: bool) -> None:
    param = lists[0][position]
    _check_device(param, interpreted)
    if param.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise RuntimeError(f"backend='triton' steps float64/32/16 and bfloat16 params, not {param.dtype}")
    names = ("grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    for name, lst in zip(names, lists[1:5], strict=True):
        if not lst:
            continue
        t = lst[position]
        if t.dtype != param.dtype or t.device != param.device or t.shape != param.shape:
            raise RuntimeError(
                f"backend='triton' needs each {name} to match its param in dtype, device and shape: "
                f"param {param.dtype} {tuple(param.shape)} on {param.device}, "
                f"{name} {t.dtype} {tuple(t.shape)} on {t.device}"
            )
    step = lists[5][position]
    if step.dtype != torch.float32 or step.device != param.device or step.numel() != 1:
        raise RuntimeError(
            "backend='triton' needs each step counter to be a float32 scalar on its param's device "
            f"(as AdamW(fused=True) creates them), but got {step.dtype} {tuple(step.shape)} on {step.device}"
        )


def check_params(params: list[Tensor], low_bit: bool) -> None:
    """Raise what a step of ``params`` would raise for want of Triton or for a device the kernel (the
    low-bit one for a low-bit format) does not run: :class:`adamw.AdamW` calls it before it changes
    anything. A low-bit step leaves to the torch-ops reference the params its kernel does not take
    (DTensors, float64 and complex128), on any device; one param per kind is checked."""
    kernel = _low_bit_kernels().low_bit_kernel if low_bit else _kernels().adamw_kernel
    interpreted = _is_interpreted_kernel(kernel)
    kinds: dict[tuple[Any, ...], Tensor]
    if all(map(is_cuda, params)) or all(map(is_cpu, params)):  # one device type: no param's device read (1 us)
        kinds = dict(zip(zip(map(type, params), map(dtype_of, params), strict=True), params, strict=True))
    else:
        kinds = {(type(p), p.device, p.dtype): p for p in params}
    for (kind, *_, dtype), param in kinds.items():
        if low_bit and (kind not in PLAIN_TYPES or dtype.to_real() not in KERNEL_DTYPES):
            continue
        _check_device(param, interpreted)


def _check_device(param: Tensor, interpreted: bool) -> None:
    device = param.device  # read once: a microsecond each
    if device.type == "cuda" and interpreted:
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set when adamw.backends.triton was imported: Triton's interpreter "
            "runs CPU tensors only. Unset it to run the kernel on CUDA tensors"
        )
    if device.type == "cpu" and not interpreted:
        raise RuntimeError(
            "backend='triton' runs CPU tensors only under Triton's interpreter: set TRITON_INTERPRET=1 "
            "in the environment before the first step (before adamw.backends.triton is imported)"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"backend='triton' runs CUDA tensors (and CPU ones under the interpreter), not {device}"
        )


def _flat_compatible(tensors: list[Tensor]) -> bool:
    """Whether the kernel can run over the tensors' memory as flat arrays, element i with element i."""
    if all(t.is_contiguous() for t in tensors):
        return True
    stride = tensors[0].stride()
    return all(t.stride() == stride for t in tensors) and _dense(tensors[0])


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots in some dim order."""
    expected = 1
    dims = sorted(((st, s) for s, st in zip(t.shape, t.stride(), strict=True) if s != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _local_views(lists: list[list[Tensor]], has_complex: bool) -> list[list[Tensor]]:
    """DTensors replaced by their local shards and complex tensors by real views (same memory)."""
    if not set(map(type, lists[0])) <= PLAIN_TYPES:  # a DTensor param has DTensor grads and states
        lists = [[_to_local(t) for t in lst] for lst in lists]
    if has_complex:
        lists = [[torch.view_as_real(t) if t.is_complex() else t for t in lst] for lst in lists[:5]] + [lists[5]]
    return lists


def _to_local(t: Tensor) -> Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor's (FSDP2's params, grads and states)
    return to_local() if callable(to_local) else t


def _is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _is_interpreted_kernel(kernel: Any) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def _kernels() -> ModuleType:
    kernels = sys.modules.get(f"{__package__}._triton_kernels")
    if kernels is not None:  # imported: the import statement below costs microseconds a step
        return kernels
    try:
        from . import _triton_kernels
    except ModuleNotFoundError as error:
        if error.name is not None and error.name.split(".")[0] == "triton":
            raise RuntimeError(
                "fused=True on CUDA (backend='triton') runs a Triton kernel, and Triton is not "
                "installed: pip install 'adamw[triton]'"
            ) from error
        raise
    return _triton_kernels


# --------------------------------------------------------------------------------------------------
# the low-bit step: bf16, 8-bit or 4-bit moments, bf16 params written by stochastic rounding or Kahan

# Values per program, in blocks of 256 (a power of two; 4-bit moments take twice as many blocks of
# 128). On GPUs a program streams 1024 values (tune on a GPU). Under the interpreter 512: fewer
# (slow) programs, and a test tensor still ends in a program with a short block, or with a block
# wholly past its end.
LOW_BIT_CUDA_BLOCKS = 2
LOW_BIT_CUDA_NUM_WARPS = 4
LOW_BIT_INTERPRETER_BLOCKS = 2
# No FMA but the two the reference has (tl.fma): contracting any other multiply-add would round
# differently from torch's kernels.
LOW_BIT_FP_FUSION = False

_UPDATES = {"round": 0, "stochastic": 1, "kahan": 2}  # the kernel's UPDATE_* switches
_KEY_PURPOSES = (PURPOSE_PARAM, PURPOSE_EXP_AVG, PURPOSE_EXP_AVG_SQ, PURPOSE_MAX_EXP_AVG_SQ)  # table column order
_low_bit_codes: dict[torch.device, Tensor] = {}
_MASK32 = 0xFFFFFFFF


@dataclass(eq=False)
class _LowBitLaunch:
    """One low-bit launch of a group: a static table and chunk map, and where its params sit in the group."""

    key: tuple[Any, ...]  # device, param dtype, grad dtype, moment dtype, code bits, param_update, unscale
    positions: list[int]  # of its params in the group
    table: Tensor  # host int64 [rows, ROW]: addresses (the grad's filled per step), numel, first chunk
    stream_keys: Tensor  # host int32 [rows, 4]: the rounding keys' step-independent part
    chunks: Tensor | None  # on the device: the tensor of each chunk (None: no chunk)
    n_chunks: int
    blocks: int
    aligned: bool  # every param, moment and comp address a multiple of 16 bytes (the grads' are checked per step)


# A group's low-bit plan: its launches' static tables (see _LowBitLaunch).
_low_bit_plans: PlanCache[list[_LowBitLaunch]] = PlanCache()


def step_low_bit(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    state_steps: list[Tensor],
    streams: list[int],
    hyper: Hyper,
    storage: StorageFormat,
) -> None:
    """The low-bit step (see the module docstring). Params the kernel does not take (float64 or
    complex128, or state laid out other than their format says) run
    :func:`adamw.backends.forloop.reference_step` itself."""
    if not params:
        return
    scalars = host_scalars(hyper)
    if scalars is None:
        return
    kernels = _low_bit_kernels()
    key, memory = plan_key(params, hyper, storage), group_memory(params, grads, states, state_steps, streams)
    plan = _low_bit_plans.get(key, memory)
    if plan is not None:
        step_numbers = bump_steps(state_steps)
        for launch in plan:
            _launch_low_bit(launch, [_real(grads[i]) for i in launch.positions], step_numbers, hyper, *scalars, kernels)
        return

    interpreted = _is_interpreted_kernel(kernels.low_bit_kernel)

    def takes(param: Tensor, step: Tensor) -> bool:
        _check_device(param, interpreted)  # raises before anything changes
        return True

    group = sort_group(params, grads, states, state_steps, hyper, storage, takes, quantized=(INT8, INT4))
    step_numbers = bump_steps(state_steps)
    for i, grad in group.reference:
        reference_step(params[i], grad, states[i], step_numbers[i], streams[i], hyper, storage, *scalars)
    by_launch: dict[tuple[Any, ...], list[KernelParam]] = {}
    for kernel_param in group.kernel:
        real, real_grad, moment = kernel_param.columns[:3]
        assert real is not None and real_grad is not None and moment is not None
        dtypes = (real.dtype, real_grad.dtype, moment.dtype)
        bits = kernel_param.code_bits or 8  # the kernel's CODE_BITS (unused for plain moments)
        launch_key = (real.device, *dtypes, bits, kernel_param.param_update, kernel_param.unscale)
        by_launch.setdefault(launch_key, []).append(kernel_param)
    plan = []
    for launch_key, entries in by_launch.items():
        positions, columns = [entry.position for entry in entries], [entry.columns for entry in entries]
        launch = _low_bit_launch(launch_key, positions, columns, streams, storage.seed, kernels)
        plan.append(launch)
        _launch_low_bit(launch, [entry.grad for entry in entries], step_numbers, hyper, *scalars, kernels)
    for copy, original in group.written_back:
        original.copy_(copy)
    if group.reusable:
        nbytes = sum(launch.table.nbytes + launch.stream_keys.nbytes + 4 * launch.n_chunks for launch in plan)
        _low_bit_plans.put(key, memory, plan, nbytes=nbytes)


def _launch_low_bit(
    launch: _LowBitLaunch,
    grads: list[Tensor],
    step_numbers: list[int],
    hyper: Hyper,
    lr: float,
    beta1: float,
    beta2: float,
    kernels: ModuleType,
) -> None:
    if launch.n_chunks == 0:
        return  # empty params only
    device, dtype, grad_dtype, moment_dtype, bits, param_update, unscale = launch.key
    table = _low_bit_step_table(launch, grads, [step_numbers[i] for i in launch.positions], lr, beta1, beta2, kernels)
    table, _ = _to_device(table.reshape(-1), device, capturing=False)
    grad_scale = _on_device(hyper.grad_scale, device) if unscale else None
    with _current(device):
        kernels.low_bit_kernel[(launch.n_chunks,)](
            table,
            launch.chunks,
            _codes_on(device),
            grad_scale,
            *_low_bit_scalars(lr, beta1, beta2, hyper),
            BLOCKS=launch.blocks,
            PARAM_DTYPE=_triton_dtype(dtype, kernels),
            GRAD_DTYPE=_triton_dtype(grad_dtype, kernels),
            MOMENT_DTYPE=_triton_dtype(moment_dtype, kernels),
            CODE_BITS=bits,
            PARAM_UPDATE=_UPDATES[param_update],
            AMSGRAD=hyper.amsgrad,
            MAXIMIZE=hyper.maximize,
            HAS_WEIGHT_DECAY=hyper.weight_decay != 0,
            HAS_GRAD_SCALE=grad_scale is not None,
            ALIGNED=launch.aligned and all(grad.data_ptr() % 16 == 0 for grad in grads),
            num_warps=LOW_BIT_CUDA_NUM_WARPS,
            enable_fp_fusion=LOW_BIT_FP_FUSION,
        )


def _low_bit_scalars(lr: float, beta1: float, beta2: float, hyper: Hyper) -> list[float | int]:
    """The group's scalars, each the float32 that torch makes of the reference's Python number."""
    decay = _float32(1 - lr * hyper.weight_decay)
    weight = _float32(1 - beta1)
    small = abs(weight) < 0.5  # torch's lerp: w * (end - start) + start, else (w - 1) * (end - start) + end
    coeff = weight if small else weight - 1  # exact for w in [0.5, 1], as torch's float32 w - 1
    return [decay, coeff, int(small), _float32(beta2), _float32(1 - beta2), _float32(hyper.eps)]


def _float32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float64).to(torch.float32))


def _low_bit_launch(
    key: tuple[Any, ...],
    positions: list[int],
    columns: list[list[Tensor | None]],
    streams: list[int],
    seed: int,
    kernels: ModuleType,
) -> _LowBitLaunch:
    """A launch's static table (a row per tensor; see the kernel module), its stream keys and its chunk
    map on the device."""
    device, bits = key[0], key[4]
    values = BLOCK_SIZE * (LOW_BIT_INTERPRETER_BLOCKS if device.type == "cpu" else LOW_BIT_CUDA_BLOCKS)
    blocks = values // (INT4.block_size if bits == 4 else BLOCK_SIZE)  # the kernel's rows
    numels = [tensor_columns[0].numel() for tensor_columns in columns]  # type: ignore[union-attr]
    first_chunks, chunk_tensor = _chunk_map(numels, values, "low-bit Triton kernel")
    n_chunks = chunk_tensor.numel()
    rows: list[list[int]] = []
    stream_keys: list[list[int]] = []
    for position, tensor_columns, numel, first_chunk in zip(positions, columns, numels, first_chunks, strict=True):
        addresses = [0 if t is None else t.data_ptr() for t in tensor_columns]
        addresses[int(kernels.COL_GRAD)] = 0  # filled per step
        rows.append([*addresses, numel, first_chunk])
        stream_keys.append([signed32(stream_key(seed, streams[position], p)) for p in _KEY_PURPOSES])
    table = torch.zeros((len(rows), int(kernels.ROW)), dtype=torch.int64)
    if rows:
        table[:, : len(rows[0])] = torch.tensor(rows, dtype=torch.int64)
    # the columns the kernel reads and writes in vectors when aligned: param, moments, comp
    vector_columns = [int(kernels.COL_PARAM), *range(int(kernels.COL_EXP_AVG), int(kernels.COL_MAX) + 1)]
    vector_columns.append(int(kernels.COL_COMP))
    aligned = bool((table[:, vector_columns] % 16 == 0).all())
    chunks_on_device = None
    if n_chunks:
        chunks_on_device = (
            chunk_tensor if device.type == "cpu" else chunk_tensor.pin_memory().to(device, non_blocking=True)
        )
    return _LowBitLaunch(
        key=key,
        positions=positions,
        table=table,
        stream_keys=torch.tensor(stream_keys, dtype=torch.int32).reshape(len(rows), len(_KEY_PURPOSES)),
        chunks=chunks_on_device,
        n_chunks=n_chunks,
        blocks=blocks,
        aligned=aligned,
    )


def _low_bit_step_table(
    launch: _LowBitLaunch,
    grads: list[Tensor],
    steps: list[int],
    lr: float,
    beta1: float,
    beta2: float,
    kernels: ModuleType,
) -> Tensor:
    """The launch's table for this step: its static table with the grads' addresses, the rounding
    keys (``rounding_key`` of each row's stream and step, vectorized) and the step scalars (as the
    reference computes them, in float64 on the host, once per distinct step) filled in."""
    table = launch.table.clone()
    table[:, int(kernels.COL_GRAD)] = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
    step = torch.tensor(steps, dtype=torch.int64)
    mix = ((step ^ (step >> 32)) & _MASK32).to(torch.int32)
    first_key = int(kernels.COL_KEY_PARAM)
    keys = hash32(launch.stream_keys ^ mix[:, None]).to(torch.int64) & _MASK32
    table[:, first_key : first_key + len(_KEY_PURPOSES)] = keys
    distinct = sorted(set(steps))
    scalars = [[-(lr / (1 - beta1**t)), (1 - beta2**t) ** 0.5] for t in distinct]
    packed = torch.tensor(scalars, dtype=torch.float64).to(torch.float32).view(torch.int64).reshape(-1)
    table[:, int(kernels.COL_SCALARS)] = packed[torch.searchsorted(torch.tensor(distinct, dtype=torch.int64), step)]
    return table


def _codes_on(device: torch.device) -> Tensor:
    """The code tables of the 8-bit and 4-bit formats, each signed then unsigned, values then
    midpoints, as one float32 tensor (the kernel's CODE_* and CODE4_* offsets)."""
    if device not in _low_bit_codes:
        _low_bit_codes[device] = code_tables(device)
    return _low_bit_codes[device]


def _low_bit_kernels() -> ModuleType:
    kernels = sys.modules.get(f"{__package__}._triton_low_bit_kernels")
    if getattr(kernels, "checked_against_the_host", False):  # imported and checked: no import statement
        return cast(ModuleType, kernels)
    _kernels()  # the same error when Triton is missing
    from . import _triton_low_bit_kernels

    assert int(_triton_low_bit_kernels.QBLOCK) == BLOCK_SIZE
    assert int(_triton_low_bit_kernels.QBLOCK_4BIT) == INT4.block_size
    assert _codes_on(torch.device("cpu")).numel() == int(_triton_low_bit_kernels.CODE_SIZE)
    _triton_low_bit_kernels.checked_against_the_host = True
    return _triton_low_bit_kernels
