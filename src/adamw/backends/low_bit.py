"""What the low-bit kernels share: a group's storage format and host scalars, the layout of a param's
state, and their hosts' work around the kernel (sorting a group's params between the kernel and the
reference, the key and fingerprint of the group's plan, the step counters). The low-bit step in torch
ops, which they mirror and hand the params they do not take: :mod:`adamw.backends.forloop`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from itertools import chain, repeat
from operator import is_

import torch
from torch import Tensor

from ..states import KAHAN_KEY
from ..states.formats import ABSMAX_SUFFIX, INT4, INT8, MOMENTS, BlockwiseFormat, StateFormat, format_for
from ..states.rounding import effective_param_update
from ._common import PLAIN_TYPES, Hyper, host_value
from ._plans import Memory


@dataclass(frozen=True)
class StorageFormat:
    """How a group stores its moments and writes its bfloat16 params (each moment's encoding is a
    :class:`adamw.states.formats.StateFormat`, chosen per param from ``state_precision``)."""

    state_precision: str
    param_update: str
    seed: int


def host_scalars(hyper: Hyper) -> tuple[float, float, float] | None:
    """lr, beta1 and beta2 as Python floats, or None when GradScaler's ``found_inf`` is nonzero: then
    the step is skipped, its counters included (as the fused kernels do)."""
    lr, beta1, beta2 = (float(host_value(x)) for x in hyper.scalar_lr_betas())  # type: ignore[arg-type]
    if hyper.found_inf is not None and float(hyper.found_inf.item()) != 0.0:
        return None
    return lr, beta1, beta2


def real_view(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # of the params and grads the kernels take


@dataclass
class KernelParam:
    """A param a low-bit kernel steps, with its columns: param, grad, three moments, three absmaxes
    and the Kahan buffer (real views, contiguous; None where unused)."""

    position: int  # in the group
    columns: list[Tensor | None]
    param_update: str
    unscale: bool  # the kernel divides the grad by grad_scale
    fmt: StateFormat  # how its moments are stored (the layout of its moment columns)

    @property
    def code_bits(self) -> int | None:
        """4 or 8 for quantized moments, None for plain ones."""
        return self.fmt.bits if isinstance(self.fmt, BlockwiseFormat) else None

    @property
    def grad(self) -> Tensor:
        grad = self.columns[1]
        assert grad is not None
        return grad


@dataclass
class SortedGroup:
    """A low-bit group's params, sorted between the kernel and the reference before anything changes."""

    kernel: list[KernelParam]
    reference: list[tuple[int, Tensor]]  # position, and the grad (unscaled) the reference steps with
    written_back: list[tuple[Tensor, Tensor]]  # (contiguous copy, original) to copy back after the step
    reusable: bool  # nothing copied, divided on the host or left to the reference: its plan can be kept


def sort_group(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    steps: list[Tensor],
    hyper: Hyper,
    storage: StorageFormat,
    takes: Callable[[Tensor, Tensor], bool],
    quantized: tuple[BlockwiseFormat, ...] = (INT8,),
) -> SortedGroup:
    """Sort every param to the kernel, where :func:`_kernel_columns` lays it out (in a plain format or
    one of the blockwise formats ``quantized``) and ``takes(param, step counter)`` (which may raise for
    a device the kernel does not run), else to the reference."""
    scale = hyper.grad_scale
    sorted_group = SortedGroup([], [], [], reusable=True)
    for i, (param, grad, state, step) in enumerate(zip(params, grads, states, steps, strict=True)):
        param_update = effective_param_update(param, storage.param_update)
        # Float32 grads are unscaled in the kernel (a correctly rounded division, as torch's). Others
        # are divided here by the reference's own op, whose result dtype and rounding (a reciprocal
        # for bfloat16 on the CPU, complex division) depend on the operands: a new grad every step.
        unscale = scale is not None and grad.dtype == torch.float32 and scale.dtype == torch.float32
        if scale is not None and not unscale:
            grad = grad / scale.to(grad.device)
            sorted_group.reusable = False
        fmt = format_for(param, storage.state_precision)
        columns = _kernel_columns(param, grad, state, fmt, hyper.amsgrad, param_update, quantized)
        if columns is None or not takes(param, step):
            unscaled = grad / scale.to(grad.device) if unscale and scale is not None else grad
            sorted_group.reference.append((i, unscaled))
            sorted_group.reusable = False
            continue
        # Contiguous stand-ins for non-contiguous columns: the kernels run over flat memory, and the
        # reference's blocks and random counters follow the flat (row-major) order.
        staged = list(columns)
        for column, t in enumerate(columns):
            if t is not None and not t.is_contiguous():
                copy = staged[column] = t.contiguous()
                sorted_group.reusable = False  # copies, made anew every step
                if column != 1:  # the grad's is only read
                    sorted_group.written_back.append((copy, t))
        sorted_group.kernel.append(KernelParam(i, staged, param_update, unscale, fmt))
    return sorted_group


def _kernel_columns(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    fmt: StateFormat,
    amsgrad: bool,
    param_update: str,
    quantized: tuple[BlockwiseFormat, ...],
) -> list[Tensor | None] | None:
    """A param's columns (see :class:`KernelParam`: the moments padded to three, laid out as ``fmt``
    says), or None where the kernels do not take it (the reference then steps the param, and raises
    if its state does not fit its format)."""
    if type(param) not in PLAIN_TYPES or type(grad) not in PLAIN_TYPES:
        return None  # e.g. DTensors: the reference runs their torch ops
    real, real_grad = real_view(param), real_view(grad)
    if real.dtype not in KERNEL_DTYPES or real_grad.dtype not in KERNEL_DTYPES:
        return None
    if real_grad.shape != real.shape or real_grad.device != real.device:
        return None
    keys = MOMENTS if amsgrad else MOMENTS[:2]
    if any(key not in state or type(state[key]) not in (Tensor, torch.nn.Parameter) for key in keys):
        return None
    moments = [real_view(state[key]) for key in keys]
    absmaxes: list[Tensor | None] = [None, None, None]
    if isinstance(fmt, BlockwiseFormat):
        if fmt not in quantized:
            return None
        layout = {key: fmt.layout(real, key) for key in keys}
        for j, key in enumerate(keys):
            codes, absmax = state[key], state.get(key + ABSMAX_SUFFIX)
            (codes_dtype, codes_shape), (_, absmax_shape) = layout[key].values()
            if codes.dtype != codes_dtype or tuple(codes.shape) != codes_shape or codes.device != real.device:
                return None
            if absmax is None or absmax.dtype != torch.float32 or tuple(absmax.shape) != absmax_shape:
                return None
            absmaxes[j] = absmax
    else:
        # The dtype fmt stores a moment in; None for the formats the kernels lack.
        stored = {"param": real.dtype, "float32": torch.float32, "bf16": torch.bfloat16}.get(fmt.name)
        if any(m.dtype != stored or m.shape != real.shape or m.device != real.device for m in moments):
            return None
    comp = None
    if param_update == "kahan":
        comp = state.get(KAHAN_KEY)
        if comp is None or comp.dtype != torch.bfloat16 or comp.shape != param.shape:
            return None
    return [real, real_grad, *moments, *([None] * (3 - len(moments))), *absmaxes, comp]


def code_tables(device: torch.device | str = "cpu") -> Tensor:
    """The code tables both low-bit kernels read, as one float32 tensor: for the 8-bit format, then the
    4-bit one, exp_avg's (signed) values and midpoints, then exp_avg_sq's (unsigned; max_exp_avg_sq
    takes the same). Built from the formats each call, so a test that swaps a table sees it."""
    parts = []
    for fmt in (INT8, INT4):
        assert fmt.codes["max_exp_avg_sq"] is fmt.codes["exp_avg_sq"]  # the kernels read one unsigned table
        parts += [*fmt.codes["exp_avg"].tables(device), *fmt.codes["exp_avg_sq"].tables(device)]
    codes = torch.cat(parts)
    assert codes.dtype == torch.float32 and codes.numel() == 256 + 127 + 256 + 255 + 16 + 7 + 16 + 15
    return codes.contiguous()


def plan_key(params: list[Tensor], hyper: Hyper, storage: StorageFormat) -> Hashable:
    """A low-bit group's plan key: its first param and size, and the options a plan depends on."""
    scale_dtype = None if hyper.grad_scale is None else hyper.grad_scale.dtype
    return id(params[0]), len(params), storage, hyper.amsgrad, scale_dtype


def group_memory(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]], steps: list[Tensor], streams: list[int]
) -> Memory | None:
    """A low-bit group's :class:`adamw.backends._plans.Memory`: its params, every entry of their
    states, its step counters and grads (but for the grads' addresses, passed anew each step), with
    the entries' names and its streams. None (never kept) where a state entry is not a tensor, or
    some tensor is not a plain one (a DTensor's memory is not its own)."""
    fixed = [*params, *chain.from_iterable(map(dict.values, states))]
    if not all(map(is_, steps, map(dict.get, states, repeat("step")))):
        fixed += steps  # else each is its state's "step" entry, among those already
    if not set(map(type, fixed)) <= PLAIN_TYPES or not set(map(type, grads)) <= PLAIN_TYPES:
        return None
    return Memory(fixed, grads, extra=(list(chain.from_iterable(states)), list(streams)))


def bump_steps(state_steps: list[Tensor]) -> list[int]:
    """``step += 1`` for every counter (as the reference, before the update), read back as ints."""
    numbers = [0] * len(state_steps)
    by_kind: dict[tuple[torch.device, torch.dtype, torch.Size], list[int]] = {}
    for i, step in enumerate(state_steps):
        by_kind.setdefault((step.device, step.dtype, step.shape), []).append(i)
    for positions in by_kind.values():  # usually one: the counters of a group are alike
        counters = [state_steps[i] for i in positions]
        torch._foreach_add_(counters, 1)
        values = torch.stack(counters).reshape(-1).tolist()  # one read (one sync on a GPU)
        for i, value in zip(positions, values, strict=True):
            numbers[i] = int(value)
    return numbers
