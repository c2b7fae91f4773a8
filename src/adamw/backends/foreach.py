"""The foreach backend: lists of tensors grouped by device and dtype, in ``torch._foreach_*`` ops.

Mirrors :mod:`adamw._math` and keeps the order of ``torch.optim.AdamW``'s foreach path operation
for operation, so both give identical bits (e.g. exp_avg by ``_foreach_lerp_``; the step size
``-lr / (1 - beta1^t)`` passed per tensor to ``_foreach_addcdiv_``; with capturable, the whole
step as device-tensor math with no host sync).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor
from torch.optim import Optimizer

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
    if not params:
        return
    hyper.refuse_grad_scaling("foreach")
    if hyper.differentiable:
        raise RuntimeError("foreach=True does not support differentiable=True: _foreach ops have no autograd")
    if hyper.capturable:
        check_capturable_devices(params, state_steps)
    lr, beta1, beta2 = hyper.scalar_lr_betas()
    if not hyper.capturable:
        for name, value in (("lr", lr), ("betas[0]", beta1), ("betas[1]", beta2)):
            if isinstance(value, Tensor):
                raise RuntimeError(f"{name} as a Tensor is not supported for capturable=False and foreach=True")

    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps]  # type: ignore[list-item]
    )
    beta1_by_device: dict[torch.device, Tensor] | None = (
        {beta1.device: beta1} if isinstance(beta1, Tensor) and beta1.device.type != "cpu" else None
    )
    for lists, _ in grouped.values():
        dev_params, dev_grads, dev_exp_avgs, dev_exp_avg_sqs, dev_max, dev_steps = cast(list[list[Tensor]], lists)
        device = dev_params[0].device
        if beta1_by_device is not None and device not in beta1_by_device:
            beta1_by_device[device] = cast(Tensor, beta1).to(device=device, non_blocking=True)
        dev_beta1 = beta1_by_device[device] if beta1_by_device else beta1

        if hyper.has_complex:
            others = [dev_grads, dev_exp_avgs, dev_exp_avg_sqs, *([dev_max] if hyper.amsgrad else [])]
            for i, p in enumerate(dev_params):
                if torch.is_complex(p):
                    dev_params[i] = torch.view_as_real(p)
                    for lst in others:
                        lst[i] = torch.view_as_real(lst[i])
        if hyper.maximize:
            dev_grads = list(torch._foreach_neg(dev_grads))

        if not torch.compiler.is_compiling() and dev_steps[0].is_cpu:
            # One wrapped scalar for the whole list: CPU steps take foreach's slow per-tensor path.
            torch._foreach_add_(dev_steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(dev_steps, 1)

        if hyper.weight_decay != 0:
            torch._foreach_mul_(dev_params, 1 - lr * hyper.weight_decay)  # type: ignore[arg-type]

        torch._foreach_lerp_(dev_exp_avgs, dev_grads, cast(float, 1 - dev_beta1))
        torch._foreach_mul_(dev_exp_avg_sqs, beta2)
        # _foreach_addcmul_'s value must be a Python number, so a Tensor beta2 scales the grads first.
        if isinstance(beta2, Tensor):
            scaled_grads = list(torch._foreach_mul(dev_grads, 1 - beta2))
            value = 1.0
        else:
            scaled_grads = dev_grads
            value = 1 - beta2
        torch._foreach_addcmul_(dev_exp_avg_sqs, scaled_grads, dev_grads, value)
        del dev_grads, scaled_grads  # lower peak memory before the denominators are allocated

        if hyper.amsgrad:
            torch._foreach_maximum_(dev_max, dev_exp_avg_sqs)
            exp_avg_sq_sqrt = torch._foreach_sqrt(dev_max)
        else:
            exp_avg_sq_sqrt = torch._foreach_sqrt(dev_exp_avg_sqs)

        if hyper.capturable:
            # step_size = lr / (1 - beta1^t) and sqrt(1 - beta2^t), kept as device tensors.
            bias_correction1 = torch._foreach_pow(beta1, dev_steps)  # type: ignore[arg-type]
            bias_correction2 = torch._foreach_pow(beta2, dev_steps)  # type: ignore[arg-type]
            torch._foreach_sub_(bias_correction1, 1)
            torch._foreach_sub_(bias_correction2, 1)
            torch._foreach_neg_(bias_correction2)
            torch._foreach_div_(bias_correction1, lr)  # type: ignore[arg-type]
            torch._foreach_reciprocal_(bias_correction1)
            torch._foreach_sqrt_(bias_correction2)
            step_size, bias_correction2_sqrt = bias_correction1, bias_correction2  # -lr/bc1, sqrt(bc2)
            torch._foreach_div_(exp_avg_sq_sqrt, bias_correction2_sqrt)
            torch._foreach_add_(exp_avg_sq_sqrt, hyper.eps)
            torch._foreach_div_(exp_avg_sq_sqrt, step_size)
            torch._foreach_addcdiv_(dev_params, dev_exp_avgs, exp_avg_sq_sqrt)
        else:
            steps = [host_value(s) for s in dev_steps]
            bias_corrections1 = [1 - beta1**t for t in steps]
            bias_corrections2 = [1 - beta2**t for t in steps]
            step_sizes = [(lr / bc) * -1 for bc in bias_corrections1]
            if torch.compiler.is_compiling():
                step_sizes = torch.stack(step_sizes)  # type: ignore[arg-type, assignment]
            bias_correction2_sqrts = [bc**0.5 for bc in bias_corrections2]
            torch._foreach_div_(exp_avg_sq_sqrt, bias_correction2_sqrts)  # type: ignore[arg-type]
            torch._foreach_add_(exp_avg_sq_sqrt, hyper.eps)
            torch._foreach_addcdiv_(dev_params, dev_exp_avgs, exp_avg_sq_sqrt, step_sizes)  # type: ignore[arg-type]
