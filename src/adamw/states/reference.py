"""The low-bit step in torch ops: the reference that the C and Triton low-bit kernels are compared against.

Mirrors :mod:`adamw.backends.forloop` (itself :mod:`adamw._math` in torch's order) with the storage
taken out of the math: decode the moments to float32, update them and the param in float32, write
the param back with ``param_update`` and re-encode the moments (8-bit: absmax after the update).
Order, as torch: weight decay first (``p * (1 - lr*wd)``); ``m`` by ``lerp``; ``v*b2 + (1-b2)*g*g``;
``denom = sqrt(v) / sqrt(1 - b2^t) + eps``; ``p += -(lr / (1 - b1^t)) * m / denom``. The square root
is correctly rounded (:func:`sqrt_rn`), as the low-bit kernels' is, so that a seeded low-bit run is the same
bits on every backend. With ``state_precision="param"``, ``param_update="round"`` and float32 (or
float64) params every other operation is the for-loop backend's, on the same tensors: the two agree bit
for bit in float64, and in float32 wherever torch's ``sqrt`` rounds correctly (tests/test_states.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .formats import ABSMAX_SUFFIX, MOMENTS, StateFormat, compute_dtype, format_for
from .rounding import (
    PURPOSE_EXP_AVG,
    PURPOSE_EXP_AVG_SQ,
    PURPOSE_MAX_EXP_AVG_SQ,
    PURPOSE_PARAM,
    check_param_update,
    kahan_store,
    kahan_value,
    rounding_key,
    stochastic_round_to_bf16,
)

KAHAN_KEY = "kahan_comp"
"""State entry of the Kahan compensation buffer (bfloat16, shaped like the param)."""

_PURPOSES = {"exp_avg": PURPOSE_EXP_AVG, "exp_avg_sq": PURPOSE_EXP_AVG_SQ, "max_exp_avg_sq": PURPOSE_MAX_EXP_AVG_SQ}


def init_low_bit_state(
    param: Tensor, *, amsgrad: bool, state_precision: str, param_update: str, fmt: StateFormat | None = None
) -> dict[str, Tensor]:
    """A param's state at step 0 (without ``step``, which the optimizer keeps as torch does).

    For a DTensor param (FSDP2), see "Sharded params" at the end of this module: entries shaped like
    the param are DTensors sharded like it; an 8-bit absmax is a plain tensor of the local shard's blocks.
    """
    check_param_update(param_update, param.dtype)
    if is_dtensor(param):
        local = init_low_bit_state(
            param.to_local(),  # type: ignore[attr-defined]
            amsgrad=amsgrad,
            state_precision=state_precision,
            param_update=param_update,
            fmt=format_for(param, state_precision),  # the 4096-value rule on the global numel
        )
        return {k: like_param(k, v, param) for k, v in local.items()}
    fmt = fmt or format_for(param, state_precision)
    state: dict[str, Tensor] = {}
    for key in MOMENTS if amsgrad else MOMENTS[:2]:
        state.update(fmt.zeros(param, key))
    if param_update == "kahan":
        state[KAHAN_KEY] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


def low_bit_step(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    step: int,
    state_precision: str,
    param_update: str,
    seed: int = 0,
    stream: int = 0,
    fmt: StateFormat | None = None,
) -> None:
    """One AdamW step of one param (in place), its moments stored in ``state_precision``.

    ``step`` is this step's number (1 for the first). ``seed`` and ``stream`` (e.g. the param's index
    in the optimizer) key stochastic rounding, of the param and of bf16 moments, through
    :func:`adamw.states.rounding.rounding_key`: the same seed replays the same run, on any backend.
    ``fmt`` overrides the format ``state_precision`` picks for ``param`` (a shard: see below).

    A DTensor param (FSDP2) steps its local shard: see "Sharded params" at the end of this module.
    """
    check_param_update(param_update, param.dtype)
    if is_dtensor(param):
        # to_local() returns views: the in-place updates below land in the DTensors' shards.
        local_state = {k: v.to_local() if is_dtensor(v) else v for k, v in state.items()}  # type: ignore[attr-defined]
        low_bit_step(
            param.to_local(),  # type: ignore[attr-defined]
            grad.to_local() if is_dtensor(grad) else grad,  # type: ignore[attr-defined]
            local_state,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            step=step,
            state_precision=state_precision,
            param_update=param_update,
            seed=seed,
            stream=stream,
            fmt=format_for(param, state_precision),  # the 4096-value rule on the global numel
        )
        return
    fmt = fmt or format_for(param, state_precision)
    dtype = compute_dtype(param)
    real_param = torch.view_as_real(param) if param.is_complex() else param
    g = (torch.view_as_real(grad) if grad.is_complex() else grad).to(dtype)
    if maximize:
        g = -g

    if param_update == "kahan":
        p = kahan_value(real_param, state[KAHAN_KEY])
    else:
        p = real_param.to(dtype)  # the param itself when it is already of the compute dtype
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)

    exp_avg = fmt.decode(state, "exp_avg", dtype)
    exp_avg_sq = fmt.decode(state, "exp_avg_sq", dtype)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)

    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    if amsgrad:
        max_exp_avg_sq = fmt.decode(state, "max_exp_avg_sq", dtype)
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        denom = (sqrt_rn(max_exp_avg_sq) / bias_correction2_sqrt).add_(eps)
    else:
        denom = (sqrt_rn(exp_avg_sq) / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)

    if param_update == "kahan":
        kahan_store(real_param, state[KAHAN_KEY], p)
    elif param_update == "stochastic":
        real_param.copy_(stochastic_round_to_bf16(p, rounding_key(seed, step, stream, PURPOSE_PARAM)))
    elif p.data_ptr() != real_param.data_ptr():
        real_param.copy_(p)

    updated = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if amsgrad:
        updated["max_exp_avg_sq"] = max_exp_avg_sq
    for key, value in updated.items():
        fmt.encode(state, key, value, rounding_key(seed, step, stream, _PURPOSES[key]))


def sqrt_rn(x: Tensor) -> Tensor:
    """``sqrt(x)`` correctly rounded, as the low-bit kernels take it (C ``sqrtf``, Triton ``sqrt_rn``).

    torch's CPU float32 ``sqrt`` (MKL's vector math) is within 1 ulp but not always correctly
    rounded, which would move a param by an ulp of its update against the kernels. Taken in float64
    and rounded to float32 it is: a float32's exact root is either a float32 or at least 2^-51
    (relative) away from every midpoint between two float32s, and torch's float64 sqrt errs by less
    than a float64 ulp (2^-52), so the rounding to float32 goes the way the exact root's would.
    """
    if x.dtype != torch.float32:
        return torch.sqrt(x)
    return x.double().sqrt_().to(torch.float32)


# Sharded params (FSDP2 DTensors, sharded on dim 0). The low-bit step is elementwise except for the
# 8-bit blocks, so each rank steps its local shard, and the rules that must not depend on the world
# size are judged on the whole param: whether it is quantized at all (4096 values) is decided on the
# global numel. What does depend on the sharding, by design:
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
    local shard (moments, codes, Kahan buffer); an absmax and the step stay plain tensors."""
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
