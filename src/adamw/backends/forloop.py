"""The for-loop backend: one parameter at a time, in torch ops.

Mirrors :mod:`adamw._math` step for step. The order of every floating-point operation is the order of
``torch.optim.AdamW``'s single-tensor path, so that a user who swaps the import sees not one bit
change: e.g. the moment update is ``lerp_`` (not ``mul_``+``add_``), the denominator is
``sqrt(v) / sqrt(1 - beta2^t) + eps``, and the step size ``lr / (1 - beta1^t)`` is applied through
``addcdiv_``'s ``value``. Where the order looks odd, torch's result depends on it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import Hyper, check_capturable_devices, host_value


def step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hyper: Hyper,
) -> None:
    if hyper.grad_scale is not None or hyper.found_inf is not None:
        raise RuntimeError(
            "the for-loop backend does not take grad_scale/found_inf; GradScaler unscales "
            "gradients itself for it (use fused=True for in-kernel unscaling)"
        )
    lr, beta1, beta2 = hyper.scalar_lr_betas()
    if hyper.capturable:
        check_capturable_devices(params, state_steps)
    # A Tensor beta1 is moved once per (device, dtype), as lerp_ needs its weight there.
    beta1_by_key: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    for i, param in enumerate(params):
        grad = grads[i] if not hyper.maximize else -grads[i]
        exp_avg = exp_avgs[i]
        exp_avg_sq = exp_avg_sqs[i]
        step_t = state_steps[i]
        step_t += 1

        if hyper.weight_decay != 0:
            param.mul_(1 - lr * hyper.weight_decay)

        if torch.is_complex(param):
            grad = torch.view_as_real(grad)
            exp_avg = torch.view_as_real(exp_avg)
            exp_avg_sq = torch.view_as_real(exp_avg_sq)
            if hyper.amsgrad:
                max_exp_avg_sqs[i] = torch.view_as_real(max_exp_avg_sqs[i])
            param = torch.view_as_real(param)

        if isinstance(beta1, Tensor):
            key = (param.device, param.dtype)
            if key not in beta1_by_key:
                beta1_by_key[key] = beta1.to(device=param.device, dtype=param.dtype, non_blocking=True)
            device_beta1: float | Tensor = beta1_by_key[key]
        else:
            device_beta1 = beta1

        exp_avg.lerp_(grad, 1 - device_beta1)
        if hyper.differentiable and isinstance(beta2, Tensor) and beta2.requires_grad:
            # v*b2 + g^2*(1-b2) == lerp(v, g^2, 1-b2): addcmul_'s value cannot carry autograd.
            exp_avg_sq.lerp_(torch.square(grad), weight=1 - beta2)
        else:
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # type: ignore[arg-type]

        if hyper.capturable or hyper.differentiable:
            _update_param_with_tensor_step(
                param, exp_avg, exp_avg_sq, max_exp_avg_sqs, i, step_t, lr, beta1, beta2, hyper
            )
        else:
            t = host_value(step_t)
            bias_correction1 = 1 - beta1**t
            bias_correction2 = 1 - beta2**t
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5
            if hyper.amsgrad:
                torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
                denom = (max_exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(hyper.eps)
            else:
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(hyper.eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)  # type: ignore[arg-type]

        if hyper.amsgrad and torch.is_complex(params[i]):
            max_exp_avg_sqs[i] = torch.view_as_complex(max_exp_avg_sqs[i])


def _update_param_with_tensor_step(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sqs: list[Tensor],
    i: int,
    step_t: Tensor,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    hyper: Hyper,
) -> None:
    """The step as tensor math: no host sync (capturable) and a graph autograd can follow."""
    differentiable = hyper.differentiable
    # .clone() where a beta carries grad: pow's backward must not see step_t's later in-place +1.
    step = step_t.clone() if differentiable and _requires_grad(beta1) else step_t
    bias_correction1 = 1 - beta1**step
    step = step_t.clone() if differentiable and _requires_grad(beta2) else step_t
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    step_size_neg = step_size.neg()  # type: ignore[union-attr]
    bias_correction2_sqrt = bias_correction2.sqrt()  # type: ignore[union-attr]
    if hyper.amsgrad:
        max_exp_avg_sq = max_exp_avg_sqs[i].clone() if differentiable else max_exp_avg_sqs[i]
        max_exp_avg_sqs[i].copy_(torch.maximum(max_exp_avg_sq, exp_avg_sq))
        v = max_exp_avg_sqs[i]
    else:
        v = exp_avg_sq
    # The 1-element step size is folded into the denominator (addcdiv_'s value must be a number):
    # param += exp_avg / ((sqrt(v) / sqrt(bc2) + eps) * (-lr / bc1)), in torch's order.
    denom = (v.sqrt() / (bias_correction2_sqrt * step_size_neg)).add_(hyper.eps / step_size_neg)
    param.addcdiv_(exp_avg.clone() if differentiable else exp_avg, denom)


def _requires_grad(x: float | Tensor) -> bool:
    return isinstance(x, Tensor) and x.requires_grad
