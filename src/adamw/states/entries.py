"""A param's low-bit state entries: those it starts with, the Kahan buffer's among them, and how a
sharded (DTensor) param holds them ("Sharded params" below)."""

from __future__ import annotations

import torch
from torch import Tensor

from .formats import ABSMAX_SUFFIX, MOMENTS, StateFormat, format_for
from .rounding import check_param_update

KAHAN_KEY = "kahan_comp"
"""State entry of the Kahan compensation buffer (bfloat16, shaped like the param)."""


def init_low_bit_state(
    param: Tensor, *, amsgrad: bool, state_precision: str, param_update: str, fmt: StateFormat | None = None
) -> dict[str, Tensor]:
    """A param's state at step 0 (without ``step``, which the optimizer keeps as torch does); a
    DTensor param's as "Sharded params" below says."""
    check_param_update(param_update, param.dtype)
    fmt = fmt or format_for(param, state_precision)  # a DTensor's: the 4096-value rule on the global numel
    local = param.to_local() if is_dtensor(param) else param  # type: ignore[attr-defined]
    state: dict[str, Tensor] = {}
    for key in MOMENTS if amsgrad else MOMENTS[:2]:
        state.update(fmt.zeros(local, key))
    if param_update == "kahan":
        state[KAHAN_KEY] = torch.zeros_like(local, memory_format=torch.preserve_format)
    return {k: like_param(k, v, param) for k, v in state.items()}


# Sharded params (FSDP2 DTensors, sharded on dim 0). The low-bit step (backends/forloop.py) is
# elementwise except for the 8-bit blocks, so each rank steps its local shard, and the rules that must
# not depend on the world size are judged on the whole param: whether it is quantized at all (4096
# values) is decided on the global numel. What does depend on the sharding, by design:
# * the 256-value blocks (and their absmax) are cut from the LOCAL shard, so a block never spans two
#   ranks and a step needs no communication; a sharded 8-bit run therefore quantizes slightly
#   differently from a single-process one (within the format's rounding), and the absmax of a
#   shard cannot be resharded: a checkpoint of it is written in float32 (AdamW.state_dict).
# * stochastic rounding counts elements from the start of the local shard, so a low-bit run's bits
#   depend on the sharding (each rounding is still unbiased; results agree within tolerance).
# State entries shaped like the param (bf16 moments, 8-bit codes, float32 moments, the Kahan
# buffer) are DTensors with the param's mesh and placements, so DCP saves and reshards them; an
# absmax is a plain tensor of this rank's blocks.


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (without importing torch.distributed where it is absent)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def like_param(key: str, local: Tensor, param: Tensor) -> Tensor:
    """State entry ``key`` as a DTensor sharded like ``param`` where it is shaped like ``param``'s
    local shard (see "Sharded params"); an absmax and the step stay plain tensors."""
    if not is_dtensor(param) or is_dtensor(local) or key == "step" or key.endswith(ABSMAX_SUFFIX):
        return local
    if local.shape != param.to_local().shape:  # type: ignore[attr-defined]
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local,
        param.device_mesh,  # type: ignore[attr-defined]
        param.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )
