"""Checkpoints and the state behind them: a param's state as created for its group, the layout its
state dict holds (written and read by ``AdamW``'s state-dict hooks), and the conversion of a loaded
(or changed) state to the format its group asks for.

In memory a moment has one name whatever its storage (``exp_avg``: the param's dtype, bfloat16, or
uint8 codes beside ``exp_avg_absmax``), because the kernels' host code and the reference read each
moment by that name. A state dict holds 8-bit codes under ``exp_avg_codes`` (``exp_avg_sq_codes``,
``max_exp_avg_sq_codes``) instead: ``torch.optim.AdamW`` casts every state tensor it loads to the
param's dtype, so codes under ``exp_avg`` would load as moments (values 0 to 255) and train. Under
a name torch does not read, its first step fails (``KeyError: 'exp_avg'``) instead;
``full_precision_state_dict()`` is the way to hand a checkpoint to torch. The rename happens only at
the boundary (:func:`write_checkpoint_layout`, :func:`from_checkpoint`), so the layout the kernels
read stays one; an entry that a loader copies into ``optimizer.state`` itself, past
``load_state_dict`` (``ZeroRedundancyOptimizer``), is read by ``AdamW._init_group`` the same way.
Loading reads both layouts, so checkpoints written with codes under ``exp_avg`` still load.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..backends._common import run_eagerly
from ..options import FUSED_BACKENDS, check_storage_options, is_low_bit
from .entries import KAHAN_KEY, init_low_bit_state, is_dtensor, like_param
from .formats import (
    ABSMAX_SUFFIX,
    MOMENTS,
    StateFormat,
    compute_dtype,
    convert_state,
    format_for,
    full_precision_state,
    stored_format,
)
from .rounding import effective_param_update

if TYPE_CHECKING:
    from torch.optim import Optimizer

CODES_SUFFIX = "_codes"
"""A state dict's name for 8-bit codes: ``exp_avg`` + ``"_codes"``."""

# Options that are ours, not torch's, at their defaults: a state dict leaves them out, so that one
# written with default options is key for key what torch.optim.AdamW writes.
OWN_GROUP_DEFAULTS: dict[str, Any] = {"backend": None, "state_precision": "param", "param_update": "round", "seed": 0}
# A checkpoint without these (torch's, or ours at the defaults) keeps the live group's values.
_OWN_GROUP_KEYS = ("backend", "seed")
# How state is stored is this run's memory decision, not the checkpoint's: these always keep the live
# group's value, and a loaded state is converted to them.
_STORAGE_GROUP_KEYS = ("state_precision", "param_update")
# torch's options that older checkpoints may lack, at their defaults.
_TORCH_GROUP_DEFAULTS: dict[str, Any] = {
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
}


@dataclass(eq=False, slots=True)
class KeepAsIs:
    """A state tensor in transit through torch's loader, which must not cast it to its param's dtype
    (8-bit codes, absmaxes, float32 moments of a bfloat16 param): torch passes unknown objects
    through as they are. Never installed: :func:`from_checkpoint` unwraps it."""

    tensor: Tensor


def shield_from_cast(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Load-state-dict pre-hook, run after every user pre-hook: each param's state tensors but the
    step wrapped in :class:`KeepAsIs`. Entries of no param pass as they are; a state dict without
    ``state`` or ``param_groups`` is returned unchanged, for torch to reject."""
    if not isinstance(state_dict.get("state"), Mapping) or not isinstance(state_dict.get("param_groups"), list):
        return state_dict
    ids = {i for group in state_dict["param_groups"] for i in group.get("params", ())}
    state = dict(state_dict["state"])
    for index, entry in state.items():
        if index in ids and isinstance(entry, Mapping):
            state[index] = {k: KeepAsIs(v) if k != "step" and isinstance(v, Tensor) else v for k, v in entry.items()}
    return {**state_dict, "state": state}


def decode_quantized_moments(state: Mapping[str, Any], param: Tensor) -> dict[str, Any]:
    """``state`` (a new dict) with its 8-bit and 4-bit moments decoded to the compute dtype, shaped (and, for a
    DTensor, sharded) like ``param``, so that torch.distributed.checkpoint can reshard them (the
    absmaxes of a shard cannot be); other entries as they are."""
    out = dict(state)
    for key in MOMENTS:
        if key + ABSMAX_SUFFIX not in state:
            continue
        codes = state[key].to_local() if is_dtensor(state[key]) else state[key]
        local = param.to_local() if is_dtensor(param) else param  # type: ignore[attr-defined]
        moment = {key: codes, key + ABSMAX_SUFFIX: out.pop(key + ABSMAX_SUFFIX)}
        shape = tuple(torch.view_as_real(local).shape if local.is_complex() else local.shape)
        value = stored_format(moment, key, local).decode(moment, key, compute_dtype(param), shape)
        out[key] = like_param(key, value, param)
    return out


def from_checkpoint(entry: Mapping[str, Any], param: Tensor) -> dict[str, Any]:
    """One param's loaded state in the in-memory layout (a new dict): tensors unwrapped and moved to
    ``param``'s device, codes under ``exp_avg`` whichever name the checkpoint used. Raises ValueError
    for a state that cannot be read."""
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


def adopt_for_group(state: dict[str, Any], param: Tensor, group: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` as ``group`` keeps it (behind ``load_state_dict`` and a format changed in a live group):
    moments in its ``state_precision``'s format, a Kahan buffer where its ``param_update`` is "kahan"
    for ``param`` (kept, or started at zero) and none otherwise, the step on ``param``'s device as
    float32 where :func:`step_on_device`. ``state`` itself where nothing changes, else a new dict;
    raises ValueError for a state that does not fit ``param``."""
    out = state
    step = state.get("step")
    wanted = (param.device, torch.float32)
    if isinstance(step, Tensor) and step_on_device(group) and (step.device, step.dtype) != wanted:
        out = {**out, "step": step.to(dtype=torch.float32, device=param.device)}
    if not any(k in out for k in MOMENTS):
        return out
    # A DTensor's local shards are converted, in the format of the whole param (see adamw.states.entries).
    fmt = format_for(param, group["state_precision"])
    if is_dtensor(param):
        local_param = param.to_local()  # type: ignore[attr-defined]
        local = {k: v.to_local() if is_dtensor(v) else v for k, v in out.items()}
    else:
        local_param, local = param, out
    if not stored_as(local, local_param, fmt):
        converted = convert_state(local, local_param, group["state_precision"], target=fmt)
        out = {k: like_param(k, v, param) for k, v in converted.items()}
    kahan = effective_param_update(param, group["param_update"]) == "kahan"
    if kahan and KAHAN_KEY not in out:
        out = {**out, KAHAN_KEY: torch.zeros_like(param, memory_format=torch.preserve_format)}
    elif not kahan and KAHAN_KEY in out:
        out = {k: v for k, v in out.items() if k != KAHAN_KEY}
    return out


def stored_as(state: dict[str, Any], param: Tensor, fmt: StateFormat) -> bool:
    """Whether every moment in ``state`` is stored as ``fmt`` stores it for ``param``; raises
    ValueError for a moment that no format stores (see ``stored_format``)."""
    for key in MOMENTS:
        if key not in state:
            continue
        stored_format(state, key, param)
        for name, (dtype, shape) in fmt.layout(param, key).items():
            value = state.get(name)
            if not isinstance(value, Tensor) or value.dtype != dtype or tuple(value.shape) != shape:
                return False
    return True


# ----------------------------------------------------------------------------------------------
# a group's state: created, converted to the group's format, written and loaded


def step_dtype(fused: bool | None) -> torch.dtype:
    """dtype of the ``step`` counter, as torch stores it (so checkpoints match)."""
    return torch.float64 if not fused and torch.get_default_dtype() == torch.float64 else torch.float32


def step_on_device(group: Mapping[str, Any]) -> bool:
    """Whether the group's step counters live on the param's device (capturable or a fused kernel)."""
    return bool(group["capturable"] or group["fused"] or group["backend"] in FUSED_BACKENDS)


def new_state(param: Tensor, group: Mapping[str, Any]) -> dict[str, Any]:
    """A param's state before its first step, in the format its group keeps (torch's key order)."""
    # The step lives on the CPU unless a kernel or graph capture needs it on the device: reading a
    # CPU scalar costs no device sync and no kernel launch.
    device = param.device if step_on_device(group) else "cpu"
    state: dict[str, Any] = {"step": torch.zeros((), dtype=step_dtype(group["fused"]), device=device)}
    if is_low_bit(group):
        param_update = effective_param_update(param, group["param_update"])
        low_bit = init_low_bit_state(
            param, amsgrad=group["amsgrad"], state_precision=group["state_precision"], param_update=param_update
        )
        return {**state, **low_bit}
    for key in MOMENTS if group["amsgrad"] else MOMENTS[:2]:
        state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


class StoredFormats:
    """Each param group's ``state_precision`` and ``param_update`` as its params' state was last
    stored, so that a step converts the state of a group whose options were set since
    (``opt.param_groups[0]["state_precision"] = "8bit"``), as loading a checkpoint does."""

    def __init__(self, groups: Iterable[dict[str, Any]] = ()) -> None:
        # By id, with the group itself: a dict is not hashable, and its id may be reused once it is gone.
        self._by_id: dict[int, tuple[dict[str, Any], str, str]] = {}
        for group in groups:
            self.remember(group)

    def remember(self, group: dict[str, Any]) -> None:
        self._by_id[id(group)] = (group, group["state_precision"], group["param_update"])

    def _stored(self, group: dict[str, Any]) -> tuple[str, str] | None:
        """The options ``group``'s state was last stored with; None for a group not remembered."""
        stored = self._by_id.get(id(group))
        return stored[1:] if stored is not None and stored[0] is group else None

    # Eager, as torch's _init_group (see run_eagerly): it looks up this optimizer's groups.
    @run_eagerly
    def convert_changed(self, groups: list[dict[str, Any]], state: MutableMapping[Tensor, dict[str, Any]]) -> None:
        """Convert in ``state`` the params' states of each group of ``groups`` whose format changed;
        an invalid option or a state that cannot be converted raises before any change. A group not
        remembered (step_in_backward's one-param view of a group) has its params' states checked
        instead, and is not remembered."""
        changed = [(i, g) for i, g in enumerate(groups) if self._stored(g) != (g["state_precision"], g["param_update"])]
        for index, group in changed:
            try:
                check_storage_options(group)
            except ValueError as exc:
                raise ValueError(f"param group {index}: {exc}") from exc
        converted = {}
        for index, group in changed:
            for position, p in enumerate(group["params"]):
                p_state = state.get(p)
                if not p_state:
                    continue
                try:
                    new = adopt_for_group(p_state, p, group)
                except ValueError as exc:
                    raise ValueError(
                        f"param group {index}: cannot convert the state of its param {position}: {exc}"
                    ) from exc
                if new is not p_state:
                    converted[p] = new
        state.update(converted)
        for _, group in changed:
            if self._stored(group) is not None:
                self.remember(group)


def complete_group(group: dict[str, Any]) -> None:
    """Fill the options a checkpoint may lack (older torch's, or ours at their defaults) with defaults."""
    for key, default in {**_TORCH_GROUP_DEFAULTS, **OWN_GROUP_DEFAULTS}.items():
        group.setdefault(key, default)
    group["decoupled_weight_decay"] = True


def upgrade_number_step(state: dict[str, Any], param: Tensor, group: Mapping[str, Any]) -> None:
    """Checkpoints from old torch versions store the step as a Python number: make it torch's tensor."""
    step = state.get("step")
    if step is not None and not torch.is_tensor(step):
        device = param.device if group["capturable"] or group["fused"] else "cpu"
        state["step"] = torch.tensor(float(step), dtype=step_dtype(group["fused"]), device=device)


def prepare_load(state: dict[str, Any], live_groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The groups and state that ``load_state_dict`` installs: the checkpoint's groups (with our own
    keys from the live ones) and each param's state read and converted to its group's format.
    Raises (ValueError) before anything is installed."""
    new_groups = state.get("param_groups", [])
    if len(live_groups) == len(new_groups):
        for new, live in zip(new_groups, live_groups, strict=True):
            new.update({key: live[key] for key in _OWN_GROUP_KEYS if key not in new and key in live})
            new.update({key: live[key] for key in _STORAGE_GROUP_KEYS if key in live})
    for group in new_groups:
        complete_group(group)
    loaded = state.get("state", {})
    adopted = {}
    for index, (p, group) in enumerate((p, g) for g in new_groups for p in g["params"]):
        entry = loaded.get(p)
        if isinstance(entry, dict):
            try:
                p_state = from_checkpoint(entry, p)
                upgrade_number_step(p_state, p, group)
                adopted[p] = adopt_for_group(p_state, p, group)
            except ValueError as exc:
                raise ValueError(f"cannot load the state of param {index}: {exc}") from exc
    new_state: defaultdict[Any, Any] = defaultdict(dict, loaded)  # with the entries of no param
    new_state.update(adopted)
    return {**state, "state": new_state, "param_groups": new_groups}


def _each_param_state(
    state_dict: dict[str, Any], params: list[Tensor], convert: Callable[[dict[str, Any], Tensor], dict[str, Any]]
) -> dict[str, Any]:
    """``state_dict`` with ``convert(entry, param)`` applied to each param's state. torch keeps the
    entries that a hook put in ``optimizer.state`` under their own keys: those pass as they are."""
    state = {
        i: convert(entry, params[i]) if type(i) is int and 0 <= i < len(params) and isinstance(entry, dict) else entry
        for i, entry in state_dict["state"].items()
    }
    return {**state_dict, "state": state}


def write_checkpoint_layout(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """State-dict post-hook, run first: each param's state as a checkpoint holds it (8-bit codes under
    ``<moment>_codes``, or decoded: see AdamW.state_dict), and our own group options only where they
    differ from their defaults."""
    everywhere = getattr(optimizer, "reshardable_state_dict", False)

    def to_checkpoint(entry: dict[str, Any], p: Tensor) -> dict[str, Any]:
        if everywhere or is_dtensor(p):
            return decode_quantized_moments(entry, p)
        return {(k + CODES_SUFFIX if k in MOMENTS and k + ABSMAX_SUFFIX in entry else k): v for k, v in entry.items()}

    params = [p for g in optimizer.param_groups for p in g["params"]]
    groups = [
        {k: v for k, v in group.items() if not (k in OWN_GROUP_DEFAULTS and _at_default(k, v))}
        for group in state_dict["param_groups"]
    ]
    return {**_each_param_state(state_dict, params, to_checkpoint), "param_groups": groups}


def full_precision_state_dict(state_dict: dict[str, Any], params: list[Tensor]) -> dict[str, Any]:
    """``state_dict`` (written by ``AdamW.state_dict`` for ``params``, in order) with every moment in
    its param's dtype and only torch's state keys."""

    def to_full_precision(entry: dict[str, Any], p: Tensor) -> dict[str, Any]:
        entry = from_checkpoint(entry, p)
        return full_precision_state(entry, p) if any(k in entry for k in MOMENTS) else entry

    return _each_param_state(state_dict, params, to_full_precision)


def _at_default(key: str, value: Any) -> bool:
    default = OWN_GROUP_DEFAULTS[key]
    return value is None if default is None else type(value) is type(default) and value == default
