"""Checkpoints: the state a param keeps in memory, the layout its state dict holds, and the
conversion of a loaded (or changed) state to the format its group asks for.

In memory a moment has one name whatever its storage (``exp_avg``: the param's dtype, bfloat16, or
uint8 codes beside ``exp_avg_absmax``), because the kernels' host code and the reference read each
moment by that name. A state dict holds 8-bit codes under ``exp_avg_codes`` (``exp_avg_sq_codes``,
``max_exp_avg_sq_codes``) instead: ``torch.optim.AdamW`` casts every state tensor it loads to the
param's dtype, so codes under ``exp_avg`` would load as moments (values 0 to 255) and train. Under
a name torch does not read, its first step fails (``KeyError: 'exp_avg'``) instead. The rename
happens only here, at the boundary (``AdamW.state_dict``/``load_state_dict``), so the layout the
kernels read stays one; a tool that copies a state dict into ``optimizer.state`` itself, past
``load_state_dict`` (``ZeroRedundancyOptimizer.load_state_dict``), gets the codes under their
checkpoint name, and an 8-bit step then fails on the missing ``exp_avg`` rather than run on them.
``full_precision_state_dict()`` is the way to hand a checkpoint to torch. Loading reads both
layouts, so checkpoints written with codes under ``exp_avg`` (and its absmax) still load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .formats import ABSMAX_SUFFIX, INT8, MOMENTS, StateFormat, compute_dtype, convert_state, format_for, stored_format
from .reference import KAHAN_KEY, is_dtensor, like_param

CODES_SUFFIX = "_codes"
"""A state dict's name for 8-bit codes: ``exp_avg`` + ``"_codes"``."""

# Options that are ours, not torch's, at their defaults: a state dict leaves them out, so that one
# written with default options is key for key what torch.optim.AdamW writes.
OWN_GROUP_DEFAULTS: dict[str, Any] = {"backend": None, "state_precision": "param", "param_update": "round", "seed": 0}


class KeepAsIs:
    """A state tensor in transit through torch's loader, which must not cast it to its param's dtype
    (8-bit codes, absmaxes, float32 moments of a bfloat16 param): torch passes unknown objects
    through as they are. Never installed: :func:`from_checkpoint` unwraps it."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


def shield_from_cast(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with each param's state tensors but the step wrapped in :class:`KeepAsIs`.

    Applied after every user pre-hook (which see the checkpoint's tensors), right before torch's
    loader; entries that belong to no param pass as they are. A state dict without ``state`` or
    ``param_groups`` is returned unchanged, for torch to reject.
    """
    if not isinstance(state_dict.get("state"), Mapping) or not isinstance(state_dict.get("param_groups"), list):
        return state_dict
    ids = {i for group in state_dict["param_groups"] for i in group.get("params", ())}
    state = {
        index: (
            {k: KeepAsIs(v) if k != "step" and isinstance(v, Tensor) else v for k, v in entry.items()}
            if index in ids and isinstance(entry, Mapping)
            else entry
        )
        for index, entry in state_dict["state"].items()
    }
    return {**state_dict, "state": state}


def to_checkpoint(state: Mapping[str, Any], param: Tensor, *, decode_8bit: bool) -> dict[str, Any]:
    """One param's state as a state dict holds it (a new dict): 8-bit codes under ``<moment>_codes``,
    or, with ``decode_8bit``, 8-bit moments decoded (see :func:`decode_8bit_moments`)."""
    if decode_8bit:
        return decode_8bit_moments(state, param)
    return {(k + CODES_SUFFIX if k in MOMENTS and k + ABSMAX_SUFFIX in state else k): v for k, v in state.items()}


def decode_8bit_moments(state: Mapping[str, Any], param: Tensor) -> dict[str, Any]:
    """``state`` (a new dict) with its 8-bit moments decoded to the compute dtype, shaped (and, for a
    DTensor, sharded) like ``param``, so that torch.distributed.checkpoint can reshard them (the
    absmaxes of a shard cannot be); other entries as they are."""
    out = dict(state)
    for key in MOMENTS:
        if key + ABSMAX_SUFFIX not in state:
            continue
        codes = state[key].to_local() if is_dtensor(state[key]) else state[key]
        value = INT8.decode({key: codes, key + ABSMAX_SUFFIX: out.pop(key + ABSMAX_SUFFIX)}, key, compute_dtype(param))
        out[key] = like_param(key, value, param)
    return out


def from_checkpoint(entry: Mapping[str, Any], param: Tensor) -> dict[str, Any]:
    """One param's loaded state in the in-memory layout (a new dict): tensors unwrapped and moved to
    ``param``'s device, codes under ``exp_avg`` whether the checkpoint wrote ``exp_avg_codes`` or
    (earlier versions) ``exp_avg``. Raises ValueError for a state that cannot be read."""
    for key in MOMENTS:
        codes = key + CODES_SUFFIX
        if codes not in entry:
            continue
        if key in entry:
            raise ValueError(f"state holds both {key!r} and {codes!r}: one moment stored twice")
        if key + ABSMAX_SUFFIX not in entry:
            raise ValueError(
                f"state[{codes!r}] holds 8-bit codes but no {key + ABSMAX_SUFFIX!r}: the checkpoint is incomplete"
            )
    names = {key + CODES_SUFFIX: key for key in MOMENTS}
    state = {names.get(k, k): v.tensor.to(param.device) if isinstance(v, KeepAsIs) else v for k, v in entry.items()}
    if "step" not in state and any(key in state for key in MOMENTS):
        raise ValueError("state holds moments but no 'step': the checkpoint is incomplete")
    return state


def adopt_state(
    state: dict[str, Any], param: Tensor, state_precision: str, *, kahan: bool, step_on_device: bool
) -> dict[str, Any]:
    """``state`` as its group keeps it: moments in ``state_precision``'s format for ``param``, a Kahan
    buffer where ``kahan`` (kept, or started at zero) and none otherwise, the step on ``param``'s
    device as float32 where ``step_on_device`` (a state without moments only has its step placed).
    ``state`` itself where nothing changes, else a new dict; raises ValueError (from the conversion)
    for a state that does not fit ``param``.

    The one conversion behind ``load_state_dict`` and a ``state_precision``/``param_update`` changed
    in a live group.
    """
    out = state
    step = state.get("step")
    if step_on_device and isinstance(step, Tensor) and (step.device != param.device or step.dtype != torch.float32):
        out = {**out, "step": step.to(dtype=torch.float32, device=param.device)}
    if not any(k in out for k in MOMENTS):
        return out
    if is_dtensor(param):
        # Convert the local shards, in the format the whole param takes (see adamw.states.reference).
        fmt = format_for(param, state_precision)
        local_param = param.to_local()  # type: ignore[attr-defined]
        local = {k: v.to_local() if is_dtensor(v) else v for k, v in out.items()}
        if not stored_as(local, local_param, state_precision, fmt):
            local = convert_state(local, local_param, state_precision, target=fmt)
            out = {k: like_param(k, v, param) for k, v in local.items()}
    elif not stored_as(out, param, state_precision):
        out = convert_state(out, param, state_precision)
    if kahan and KAHAN_KEY not in out:
        out = {**out, KAHAN_KEY: torch.zeros_like(param, memory_format=torch.preserve_format)}
    elif not kahan and KAHAN_KEY in out:
        out = {k: v for k, v in out.items() if k != KAHAN_KEY}
    return out


def stored_as(state: dict[str, Any], param: Tensor, state_precision: str, fmt: StateFormat | None = None) -> bool:
    """Whether every moment in ``state`` is stored as ``state_precision`` (or ``fmt``) stores it for
    ``param``; raises ValueError for a moment that no format stores (see ``stored_format``)."""
    fmt = fmt or format_for(param, state_precision)
    for key in MOMENTS:
        if key not in state:
            continue
        stored_format(state, key, param)
        for name, (dtype, shape) in fmt.layout(param, key).items():
            value = state.get(name)
            if not isinstance(value, Tensor) or value.dtype != dtype or tuple(value.shape) != shape:
                return False
    return True
