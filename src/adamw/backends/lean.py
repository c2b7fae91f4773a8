"""The lean backend: bf16 or 8-bit moments and bf16 params without a master copy, in torch ops.

Runs :func:`adamw.states.lean_step` (the reference the lean kernels are tested against) one param at
a time. Used for every group whose ``state_precision``/``param_update`` is not torch's
(``"param"``/``"round"``), unless the group's fused kernel has a lean variant of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..states import lean_step
from ._common import Hyper, host_value


@dataclass(frozen=True)
class Lean:
    """How a group stores its moments and writes its bfloat16 params."""

    state_precision: str
    param_update: str
    seed: int


def effective_param_update(param: Tensor, param_update: str) -> str:
    """``param_update`` applies to bfloat16 params; params of other dtypes are written as usual."""
    return param_update if param.dtype == torch.bfloat16 else "round"


def step(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    state_steps: list[Tensor],
    streams: list[int],
    hyper: Hyper,
    lean: Lean,
) -> None:
    lr, beta1, beta2 = (float(host_value(x)) for x in hyper.scalar_lr_betas())  # type: ignore[arg-type]
    if hyper.found_inf is not None and float(hyper.found_inf.item()) != 0.0:
        return  # GradScaler found an inf: skip the step, counters included (as the fused kernels do)
    for param, grad, state, step_t, stream in zip(params, grads, states, state_steps, streams, strict=True):
        if hyper.grad_scale is not None:
            grad = grad / hyper.grad_scale.to(grad.device)
        step_t += 1
        lean_step(
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
            step=int(step_t.item()),
            state_precision=lean.state_precision,
            param_update=effective_param_update(param, lean.param_update),
            seed=lean.seed,
            stream=stream,
        )
