"""The low-bit storage formats in torch ops (bf16 or 8-bit moments, bf16 params without a master
copy), and what the low-bit kernels share: the layout of a param's state, the tables they keep.

:func:`step` runs :func:`adamw.states.low_bit_step` (the reference the low-bit kernels are tested
against) one param at a time: for every group whose ``state_precision``/``param_update`` is not
torch's (``"param"``/``"round"``) on the for-loop and foreach backends, and for DTensor params on any
(:mod:`adamw.functional` routes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter
from typing import Generic, Protocol, TypeVar

import torch
from torch import Tensor

from ..states import KAHAN_KEY, low_bit_step
from ..states.formats import ABSMAX_SUFFIX, MOMENTS, Int8Format, StateFormat
from ..states.quantize import num_blocks
from ..states.rounding import effective_param_update
from ._common import PLAIN_TYPES, Hyper, host_value


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


def step(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    state_steps: list[Tensor],
    streams: list[int],
    hyper: Hyper,
    storage: StorageFormat,
) -> None:
    scalars = host_scalars(hyper)
    if scalars is None:
        return
    lr, beta1, beta2 = scalars
    for param, grad, state, step_t, stream in zip(params, grads, states, state_steps, streams, strict=True):
        if hyper.grad_scale is not None:
            grad = grad / hyper.grad_scale.to(grad.device)
        step_t += 1
        reference_step(param, grad, state, int(step_t.item()), stream, hyper, storage, lr, beta1, beta2)


def reference_step(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    step: int,
    stream: int,
    hyper: Hyper,
    storage: StorageFormat,
    lr: float,
    beta1: float,
    beta2: float,
) -> None:
    """One param's low-bit step in torch ops (also the low-bit kernels' fallback for params they do
    not take)."""
    low_bit_step(
        param,
        grad,
        state,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=hyper.eps,
        weight_decay=hyper.weight_decay,
        amsgrad=hyper.amsgrad,
        maximize=hyper.maximize,
        step=step,
        state_precision=storage.state_precision,
        param_update=effective_param_update(param, storage.param_update),
        seed=storage.seed,
        stream=stream,
    )


def state_columns(
    real: Tensor, param: Tensor, state: dict[str, Tensor], fmt: StateFormat, amsgrad: bool, param_update: str
) -> list[Tensor | None] | None:
    """For a low-bit kernel: a param's moments (padded to three), their absmaxes and its Kahan buffer
    (None where unused), laid out as ``fmt`` says and beside ``real`` (the param's real view); or None
    where the state does not fit, and the reference steps the param (and raises if it must)."""
    keys = MOMENTS if amsgrad else MOMENTS[:2]
    if any(key not in state or type(state[key]) not in (Tensor, torch.nn.Parameter) for key in keys):
        return None
    moments = [real_view(state[key]) for key in keys]
    expected = stored_dtype(fmt, real.dtype)
    if any(m.dtype != expected or m.shape != real.shape or m.device != real.device for m in moments):
        return None
    absmaxes: list[Tensor | None] = [None, None, None]
    if isinstance(fmt, Int8Format):
        for j, key in enumerate(keys):
            absmax = state.get(key + ABSMAX_SUFFIX)
            if absmax is None or absmax.dtype != torch.float32 or absmax.numel() != num_blocks(real.numel()):
                return None
            absmaxes[j] = absmax
    comp = None
    if param_update == "kahan":
        comp = state.get(KAHAN_KEY)
        if comp is None or comp.dtype != torch.bfloat16 or comp.shape != param.shape:
            return None
    return [*moments, *([None] * (3 - len(moments))), *absmaxes, comp]


def stage_contiguous(columns: list[Tensor | None]) -> tuple[list[Tensor | None], list[tuple[Tensor, Tensor]]]:
    """Contiguous stand-ins for a kernel's non-contiguous columns (param, grad, moments, ...): the
    kernels run over flat memory, and the reference's blocks and random counters follow the flat
    (row-major) order. Returns the columns and the (copy, original) pairs to write back after the
    step (all but the grad's, which is only read)."""
    staged: list[Tensor | None] = []
    written_back: list[tuple[Tensor, Tensor]] = []
    for column, t in enumerate(columns):
        if t is None or t.is_contiguous():
            staged.append(t)
            continue
        copy = t.contiguous()
        staged.append(copy)
        if column != 1:
            written_back.append((copy, t))
    return staged, written_back


def stored_dtype(fmt: StateFormat, param_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype ``fmt`` stores a moment in (uint8: 8-bit codes); None for formats kernels lack."""
    if isinstance(fmt, Int8Format):
        return torch.uint8
    if fmt.name == "param":
        return param_dtype
    return {"float32": torch.float32, "bf16": torch.bfloat16}.get(fmt.name)


def real_view(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


# --------------------------------------------------------------------------------------------------
# what a low-bit kernel's table of a group depends on, to keep the table from one step to the next


def kernel_state_keys(fmt: StateFormat, amsgrad: bool, param_update: str) -> tuple[str, ...]:
    """The state entries a low-bit kernel reads for a param (those :func:`state_columns` takes)."""
    keys = list(MOMENTS if amsgrad else MOMENTS[:2])
    if isinstance(fmt, Int8Format):
        keys += [key + ABSMAX_SUFFIX for key in keys]
    if param_update == "kahan":
        keys.append(KAHAN_KEY)
    return tuple(keys)


_data_ptr = Tensor.data_ptr
_is_contiguous = Tensor.is_contiguous
# -1 on the CPU, else the device's index: tells apart the devices the low-bit kernels run (the CPU and
# CUDA devices) at half the cost of reading .device.
_get_device = Tensor.get_device
_dtype = attrgetter("dtype")
_nbytes = attrgetter("nbytes")
# data pointers, sizes in bytes, dtypes, devices (with the dtypes, the sizes give the numbers of values)
Layout = tuple[list[int], list[int], list[torch.dtype], list[int]]


def _layout(tensors: list[Tensor]) -> Layout:
    return (
        list(map(_data_ptr, tensors)),
        list(map(_nbytes, tensors)),
        list(map(_dtype, tensors)),
        list(map(_get_device, tensors)),
    )


def _grad_layout(grads: list[Tensor]) -> Layout:
    """A grad is a new tensor each step: all but its pointer (the kernels take it anew)."""
    return [], list(map(_nbytes, grads)), list(map(_dtype, grads)), list(map(_get_device, grads))


@dataclass(eq=False)
class KeptLayout:
    """The memory a low-bit kernel's table for a group was built from, to check a later step against.

    It holds no tensors (a kept table must not keep a dropped model's memory alive): a step fits when
    the params, the state entries the kernel reads and the step counters have the pointers, sizes,
    dtypes, devices and contiguity they had, the grads the same sizes, dtypes, devices and
    contiguity, and the group the same streams and ``config`` (the options the table depends on).
    Everything else a table row says follows from those (its format from the param's dtype and size,
    its number of values from its dtype and size in bytes). Checking costs a few C-level calls per
    tensor: about 1.5 ms for 1000 8-bit params, where building a table costs ~30 ms.
    """

    config: tuple[object, ...]
    streams: list[int]
    state_keys: list[tuple[str, ...]]  # per param
    layout: Layout = field(default_factory=lambda: ([], [], [], []))  # params, then state entries, then steps
    grad_layout: Layout = field(default_factory=lambda: ([], [], [], []))

    @classmethod
    def capture(
        cls,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Tensor]],
        steps: list[Tensor],
        streams: list[int],
        config: tuple[object, ...],
        state_keys: list[tuple[str, ...]],
    ) -> KeptLayout:
        kept = cls(config, list(streams), state_keys)
        entries = [state[key] for state, keys in zip(states, state_keys, strict=True) for key in keys]
        kept.layout = _layout([*params, *entries, *steps])
        kept.grad_layout = _grad_layout(grads)
        return kept

    def fits(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Tensor]],
        steps: list[Tensor],
        streams: list[int],
        config: tuple[object, ...],
    ) -> bool:
        if config != self.config or streams != self.streams or len(states) != len(self.state_keys):
            return False
        try:
            entries = [state[key] for state, keys in zip(states, self.state_keys, strict=True) for key in keys]
        except KeyError:
            return False
        current = [*params, *entries, *steps]
        if not set(map(type, current)) <= PLAIN_TYPES:  # e.g. a DTensor, whose memory is not its own
            return False
        if _layout(current) != self.layout or not all(map(_is_contiguous, current)):
            return False
        return _grad_layout(grads) == self.grad_layout and all(map(_is_contiguous, grads))


class _Kept(Protocol):
    @property
    def kept(self) -> KeptLayout | None: ...


Entry = TypeVar("Entry", bound=_Kept)


class KeptTables(Generic[Entry]):
    """What a low-bit kernel keeps per group between steps (a table, launches), found again by the
    group's first param, size and options while its :class:`KeptLayout` fits.

    Up to ``limit`` entries (a step in backward makes a group of every param); past that all are
    dropped and rebuilt as used. Entries hold no tensors, only what KeptLayout records.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries: dict[tuple[int, int, tuple[object, ...]], Entry] = {}

    @staticmethod
    def config(storage: StorageFormat, hyper: Hyper) -> tuple[object, ...]:
        """The options a kept table depends on beyond the memory KeptLayout checks."""
        return (storage, hyper.amsgrad, None if hyper.grad_scale is None else hyper.grad_scale.dtype)

    def find(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Tensor]],
        steps: list[Tensor],
        streams: list[int],
        config: tuple[object, ...],
    ) -> Entry | None:
        entry = self.entries.get((id(params[0]), len(params), config))
        if entry is None or entry.kept is None or not entry.kept.fits(params, grads, states, steps, streams, config):
            return None
        return entry

    def keep(self, params: list[Tensor], config: tuple[object, ...], entry: Entry) -> None:
        if len(self.entries) >= self.limit:
            self.entries.clear()
        self.entries[(id(params[0]), len(params), config)] = entry
