"""The fused kernels as PyTorch custom ops (namespace ``adamw``), so that ``torch.compile`` puts each
kernel call in its graph as one opaque op instead of breaking the graph around it.

One op per kernel entry (``cpu_step``, ``triton_step``, ``cpu_low_bit``, ``triton_low_bit``, defined
below with their devices), each with the host code of its backend as its implementation, and a fake
one: the ops return nothing, they write in place the tensors their schemas mark ``!``. A schema
holds tensors, lists of them and scalars, so the :class:`~adamw.backends._common.Hyper` record
travels as a list of its numbers, one of its flags and one of its tensors (:func:`hyper_args`), and
the low-bit steps' state dicts as one flat list of their tensors with a bit mask per param saying
which of :data:`STATE_KEYS` it holds. Defining the ops loads neither the C kernels nor Triton.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..states import KAHAN_KEY
from ..states.formats import ABSMAX_SUFFIX, MOMENTS
from ._common import Hyper, imported_on_call
from .low_bit import StorageFormat

# The state entries a low-bit kernel may read or write, in the order the flat list holds them.
STATE_KEYS: tuple[str, ...] = (*MOMENTS, *(key + ABSMAX_SUFFIX for key in MOMENTS), KAHAN_KEY)


def _hyper(scalars: list[float], flags: list[bool], scalar_tensors: list[Tensor | None]) -> Hyper:
    """The record :func:`hyper_args` took apart."""
    lr, beta1, beta2, eps, weight_decay = scalars
    amsgrad, maximize, capturable, has_complex = flags
    lr_tensor, beta1_tensor, beta2_tensor, grad_scale, found_inf = scalar_tensors
    return Hyper(
        lr=lr if lr_tensor is None else lr_tensor,
        beta1=beta1 if beta1_tensor is None else beta1_tensor,
        beta2=beta2 if beta2_tensor is None else beta2_tensor,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        capturable=capturable,
        differentiable=False,
        has_complex=has_complex,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


def hyper_args(hyper: Hyper) -> tuple[list[float], list[bool], list[Tensor | None]]:
    """The op arguments that carry ``hyper`` (the last three of every op's schema): its numbers, its
    flags, and its tensors (``lr``, ``beta1``, ``beta2`` where given as tensors, ``grad_scale``,
    ``found_inf``; None where absent)."""
    lr_betas = (hyper.lr, hyper.beta1, hyper.beta2)
    scalars = [0.0 if isinstance(x, Tensor) else float(x) for x in lr_betas]
    scalars += [float(hyper.eps), float(hyper.weight_decay)]
    flags = [bool(hyper.amsgrad), bool(hyper.maximize), bool(hyper.capturable), bool(hyper.has_complex)]
    tensors = [x if isinstance(x, Tensor) else None for x in lr_betas]
    return scalars, flags, [*tensors, hyper.grad_scale, hyper.found_inf]


_LIBRARY = torch.library.Library("adamw", "DEF")


def _define(name: str, schema: str, device_types: Sequence[str], kernel: Callable[..., None]) -> Callable[..., None]:
    """Define ``adamw::name``: ``kernel`` on each device type, and a fake that does nothing.

    Defined through ``torch.library.Library`` rather than ``torch.library.custom_op``: a custom_op
    adds Python autograd and version-bump layers that unpack every list of tensors once more on each
    call, which costs a compiled step of a few hundred params more than the kernel itself; the
    dispatcher's own fallbacks do those jobs in C++. (The step runs under ``no_grad``: the ops have no
    autograd formula.)"""
    _LIBRARY.define(name + schema)
    for device_type in device_types:
        _LIBRARY.impl(name, kernel, _DISPATCH_KEYS[device_type])
    torch.library.register_fake(f"adamw::{name}", lambda *args: None, lib=_LIBRARY)
    op: Callable[..., None] = getattr(torch.ops.adamw, name).default
    return op


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


# --------------------------------------------------------------------------------------------------
# the full-precision steps (torch's storage format)

# The arguments every op ends with: hyper_args(hyper).
_HYPER_SCHEMA = "float[] scalars, bool[] flags, Tensor?[] scalar_tensors"
_FULL_PRECISION_SCHEMA = (
    "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
    f"Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, {_HYPER_SCHEMA}) -> ()"
)


def _define_full_precision(name: str, device_types: Sequence[str], run: Callable[..., None]) -> Callable[..., None]:
    def kernel(*args: Any) -> None:
        *lists, scalars, flags, scalar_tensors = args  # as _FULL_PRECISION_SCHEMA orders them
        run(*lists, _hyper(scalars, flags, scalar_tensors))

    return _define(name, _FULL_PRECISION_SCHEMA, device_types, kernel)


cpu_step = _define_full_precision("cpu_step", ("cpu",), imported_on_call("cpu", "step"))
triton_step = _define_full_precision("triton_step", ("cuda", "cpu"), imported_on_call("triton", "step"))
FULL_PRECISION_OPS: dict[str, Callable[..., None]] = {"cpu": cpu_step, "triton": triton_step}


def step(
    name: str,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hyper: Hyper,
) -> None:
    """The full-precision step of fused backend ``name`` through its op."""
    FULL_PRECISION_OPS[name](params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *hyper_args(hyper))


# --------------------------------------------------------------------------------------------------
# the low-bit steps (moments in the params' state dicts)


def flatten_states(states: list[dict[str, Tensor]]) -> tuple[list[Tensor], list[int]]:
    """The state dicts' entries of :data:`STATE_KEYS` in one list, and per param the mask of the keys
    it holds (bit ``j``: ``STATE_KEYS[j]``)."""
    tensors: list[Tensor] = []
    masks: list[int] = []
    for state in states:
        mask = 0
        for j, key in enumerate(STATE_KEYS):
            value = state.get(key)
            if isinstance(value, Tensor):
                tensors.append(value)
                mask |= 1 << j
        masks.append(mask)
    return tensors, masks


def unflatten_states(tensors: list[Tensor], masks: list[int], state_steps: list[Tensor]) -> list[dict[str, Tensor]]:
    """The state dicts :func:`flatten_states` took apart (with each param's ``step``)."""
    states: list[dict[str, Tensor]] = []
    entries = iter(tensors)
    for mask, step_t in zip(masks, state_steps, strict=True):
        state = {key: next(entries) for j, key in enumerate(STATE_KEYS) if mask >> j & 1}
        state["step"] = step_t
        states.append(state)
    return states


# The grads are only read: a scaled one is divided into a new tensor. (The full-precision kernels
# write an unscaled grad back, as torch's fused kernels do.)
_LOW_BIT_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_tensors, int[] state_masks, "
    "Tensor(c!)[] state_steps, int[] streams, str state_precision, str param_update, int seed, "
    f"{_HYPER_SCHEMA}) -> ()"
)


def _define_low_bit(name: str, device_types: Sequence[str], run: Callable[..., None]) -> Callable[..., None]:
    def kernel(
        params: list[Tensor],
        grads: list[Tensor],
        state_tensors: list[Tensor],
        state_masks: list[int],
        state_steps: list[Tensor],
        streams: list[int],
        state_precision: str,
        param_update: str,
        seed: int,
        scalars: list[float],
        flags: list[bool],
        scalar_tensors: list[Tensor | None],
    ) -> None:
        hyper = _hyper(scalars, flags, scalar_tensors)
        states = unflatten_states(state_tensors, state_masks, state_steps)
        storage = StorageFormat(state_precision=state_precision, param_update=param_update, seed=seed)
        run(params, grads, states, state_steps, streams, hyper, storage)

    return _define(name, _LOW_BIT_SCHEMA, device_types, kernel)


cpu_low_bit = _define_low_bit("cpu_low_bit", ("cpu",), imported_on_call("cpu_low_bit", "step_low_bit"))
triton_low_bit = _define_low_bit("triton_low_bit", ("cuda", "cpu"), imported_on_call("triton", "step_low_bit"))
LOW_BIT_OPS: dict[str, Callable[..., None]] = {"cpu": cpu_low_bit, "triton": triton_low_bit}


def step_low_bit(
    name: str,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    state_steps: list[Tensor],
    streams: list[int],
    hyper: Hyper,
    storage: StorageFormat,
) -> None:
    """The low-bit step of fused backend ``name`` through its op."""
    state_tensors, masks = flatten_states(states)
    storage_args = (storage.state_precision, storage.param_update, storage.seed)
    LOW_BIT_OPS[name](params, grads, state_tensors, masks, state_steps, streams, *storage_args, *hyper_args(hyper))
