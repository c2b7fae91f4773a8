"""The for-loop backend: one parameter at a time, in torch ops, in every storage format.

Mirrors :mod:`adamw._math` step for step, in one update (:func:`_update`) that both steps run. The
order of every floating-point operation is the order of ``torch.optim.AdamW``'s single-tensor path,
so that a user who swaps the import sees not one bit change: e.g. the moment update is ``lerp_`` (not
``mul_``+``add_``), the denominator is ``sqrt(v) / sqrt(1 - beta2^t) + eps``, and the step size
``lr / (1 - beta1^t)`` is applied through ``addcdiv_``'s ``value``. Where the order looks odd,
torch's result depends on it. The two steps differ only where each must keep another's bits:

* :func:`step`, the full-precision format, keeps torch's: the moments are the lists' tensors, the
  math in the param's dtype, a complex param decayed by a complex multiply, torch's ``sqrt``; bit for
  bit ``torch.optim.AdamW(foreach=False)``, capturable, differentiable and Tensor lr and betas included.
* :func:`step_low_bit`, the low-bit formats, keeps the low-bit kernels': :func:`reference_step`
  decodes a param's moments from its state dict (:mod:`adamw.states.formats`), runs the update in
  float32 (float64 for the float64 params the kernels hand it; the real view decayed; the correctly
  rounded :func:`sqrt_rn`), writes the param per ``param_update`` and encodes the moments (8-bit:
  absmax after the update). The C and Triton kernels give its bits (tests/test_low_bit_reproducible.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..states.entries import KAHAN_KEY, is_dtensor
from ..states.formats import MOMENTS, compute_dtype, format_for
from ..states.rounding import (
    MOMENT_PURPOSES,
    PURPOSE_PARAM,
    check_param_update,
    effective_param_update,
    kahan_store,
    kahan_value,
    rounding_key,
    stochastic_round_to_bf16,
)
from ._common import Hyper, check_capturable_devices, host_value
from .low_bit import StorageFormat, host_scalars


def step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hyper: Hyper,
) -> None:
    """The full-precision format: the moments are the lists' tensors, of the params' dtypes."""
    hyper.refuse_grad_scaling("for-loop")
    lr, beta1, beta2 = hyper.scalar_lr_betas()
    if hyper.capturable:
        check_capturable_devices(params, state_steps)
    # A Tensor beta1 is moved once per (device, dtype), as lerp_ needs its weight there.
    beta1_by_key: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    for i, param in enumerate(params):
        grad, exp_avg, exp_avg_sq, step_t = grads[i], exp_avgs[i], exp_avg_sqs[i], state_steps[i]
        max_exp_avg_sq = max_exp_avg_sqs[i] if hyper.amsgrad else None
        step_t += 1
        if hyper.weight_decay != 0:
            param.mul_(1 - lr * hyper.weight_decay)
        if torch.is_complex(param):
            param, grad, exp_avg, exp_avg_sq = map(torch.view_as_real, (param, grad, exp_avg, exp_avg_sq))
            if max_exp_avg_sq is not None:
                max_exp_avg_sq = torch.view_as_real(max_exp_avg_sq)
        lerp_beta1 = beta1
        if isinstance(beta1, Tensor):
            key = (param.device, param.dtype)
            if key not in beta1_by_key:
                beta1_by_key[key] = beta1.to(device=param.device, dtype=param.dtype, non_blocking=True)
            lerp_beta1 = beta1_by_key[key]
        _update(
            param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step_t, hyper, lr, beta1, beta2, torch.sqrt, lerp_beta1
        )


def step_low_bit(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    state_steps: list[Tensor],
    streams: list[int],
    hyper: Hyper,
    storage: StorageFormat,
) -> None:
    """The low-bit formats: each param's moments are in its state dict."""
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
    """One param's step in a low-bit format, in place; ``step`` is its number (1 for the first).

    ``storage.seed`` and ``stream`` (distinct per param) key stochastic rounding, of the param and of
    bf16 moments, through :func:`adamw.states.rounding.rounding_key`: the same seed replays the same
    run on any backend. A DTensor param (FSDP2) steps its local shard: see "Sharded params" in
    :mod:`adamw.states.entries`.
    """
    fmt = format_for(param, storage.state_precision)  # of the whole param: the 4096-value rule
    param_update = effective_param_update(param, storage.param_update)
    check_param_update(param_update, param.dtype)
    if is_dtensor(param):
        # to_local() returns views: the in-place updates below land in the DTensors' shards.
        param = param.to_local()  # type: ignore[attr-defined]
        grad = grad.to_local() if is_dtensor(grad) else grad  # type: ignore[attr-defined]
        state = {k: v.to_local() if is_dtensor(v) else v for k, v in state.items()}  # type: ignore[attr-defined]
    dtype = compute_dtype(param)
    real_param = torch.view_as_real(param) if param.is_complex() else param
    grad = (torch.view_as_real(grad) if grad.is_complex() else grad).to(dtype)
    if param_update == "kahan":
        p = kahan_value(real_param, state[KAHAN_KEY])
    else:
        p = real_param.to(dtype)  # the param itself when it is already of the compute dtype
    if hyper.weight_decay != 0:
        p.mul_(1 - lr * hyper.weight_decay)
    keys = MOMENTS if hyper.amsgrad else MOMENTS[:2]
    moments = {key: fmt.decode(state, key, dtype, tuple(real_param.shape)) for key in keys}
    exp_avg, exp_avg_sq = moments["exp_avg"], moments["exp_avg_sq"]
    _update(p, grad, exp_avg, exp_avg_sq, moments.get("max_exp_avg_sq"), step, hyper, lr, beta1, beta2, sqrt_rn, beta1)

    if param_update == "kahan":
        kahan_store(real_param, state[KAHAN_KEY], p)
    elif param_update == "stochastic":
        real_param.copy_(stochastic_round_to_bf16(p, rounding_key(storage.seed, step, stream, PURPOSE_PARAM)))
    elif p.data_ptr() != real_param.data_ptr():
        real_param.copy_(p)
    for key, value in moments.items():
        fmt.encode(state, key, value, rounding_key(storage.seed, step, stream, MOMENT_PURPOSES[key]))


def _update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    step: int | Tensor,
    hyper: Hyper,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    sqrt: Callable[[Tensor], Tensor],
    lerp_beta1: float | Tensor,
) -> None:
    """One param's update after its weight decay, on real tensors, in torch's order. ``step`` is this
    step's number (its counter in the full-precision format); ``lerp_beta1`` is beta1 on the param's
    device."""
    if hyper.maximize:
        grad = -grad
    exp_avg.lerp_(grad, 1 - lerp_beta1)
    if hyper.differentiable and _requires_grad(beta2):
        # v*b2 + g^2*(1-b2) == lerp(v, g^2, 1-b2): addcmul_'s value cannot carry autograd.
        exp_avg_sq.lerp_(torch.square(grad), weight=1 - beta2)
    else:
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # type: ignore[arg-type]

    if hyper.capturable or hyper.differentiable:
        # The step as tensor math: no host sync (capturable) and a graph autograd can follow.
        assert isinstance(step, Tensor)  # the low-bit formats are neither capturable nor differentiable
        differentiable = hyper.differentiable
        # .clone() where a beta carries grad: pow's backward must not see the counter's later +1.
        bias_correction1 = 1 - beta1 ** (step.clone() if differentiable and _requires_grad(beta1) else step)
        bias_correction2 = 1 - beta2 ** (step.clone() if differentiable and _requires_grad(beta2) else step)
        step_size = lr / bias_correction1
        step_size_neg = step_size.neg()  # type: ignore[union-attr]
        bias_correction2_sqrt = bias_correction2.sqrt()  # type: ignore[union-attr]
        v = exp_avg_sq
        if max_exp_avg_sq is not None:
            previous = max_exp_avg_sq.clone() if differentiable else max_exp_avg_sq
            max_exp_avg_sq.copy_(torch.maximum(previous, exp_avg_sq))
            v = max_exp_avg_sq
        # The 1-element step size is folded into the denominator (addcdiv_'s value must be a number):
        # param += exp_avg / ((sqrt(v) / sqrt(bc2) + eps) * (-lr / bc1)), in torch's order.
        denom = (v.sqrt() / (bias_correction2_sqrt * step_size_neg)).add_(hyper.eps / step_size_neg)
        param.addcdiv_(exp_avg.clone() if differentiable else exp_avg, denom)
        return
    t = host_value(step)
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    v = exp_avg_sq if max_exp_avg_sq is None else torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
    denom = (sqrt(v) / bias_correction2_sqrt).add_(hyper.eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)  # type: ignore[arg-type]


def _requires_grad(x: float | Tensor) -> bool:
    return isinstance(x, Tensor) and x.requires_grad


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
