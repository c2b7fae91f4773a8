r"""The AdamW algorithm, stated once; every backend is tested against :func:`reference_step`.

For each parameter :math:`\theta` with gradient :math:`g`, at step :math:`t = 1, 2, \dots`::

    g      <- -g                         if maximize
    theta  <- theta * (1 - lr * weight_decay)          # decoupled decay, before the moments
    m      <- beta1 * m + (1 - beta1) * g              # exp_avg
    v      <- beta2 * v + (1 - beta2) * g * g          # exp_avg_sq (|g|^2 per real component)
    v_max  <- max(v_max, v)                            # only with amsgrad; then v_hat uses v_max
    m_hat  =  m / (1 - beta1^t)
    v_hat  =  v / (1 - beta2^t)
    theta  <- theta - lr * m_hat / (sqrt(v_hat) + eps) # eps after the bias-corrected root

Complex parameters are treated as pairs of reals (``torch.view_as_real``), as torch does.

The reference below computes this in float64 on copies, with no regard for operation order: it is the
ground truth that tells how far each backend (and torch's own) is from the exact result. Bit-for-bit
parity with torch is a separate property, tested against torch.optim.AdamW itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ReferenceState:
    """Float64 copies of one parameter and its moments."""

    param: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    max_exp_avg_sq: Tensor
    step: int = 0

    @classmethod
    def from_param(cls, param: Tensor) -> ReferenceState:
        p = _as_real64(param.detach())
        return cls(p.clone(), torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p))


def _as_real64(t: Tensor) -> Tensor:
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.to(torch.float64)


def reference_step(
    state: ReferenceState,
    grad: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
) -> None:
    """Advance ``state`` by one AdamW step in float64 (updates ``state`` in place)."""
    g = _as_real64(grad)
    if maximize:
        g = -g
    state.step += 1
    t = state.step
    state.param.mul_(1 - lr * weight_decay)
    state.exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
    state.exp_avg_sq.mul_(beta2).add_(g * g, alpha=1 - beta2)
    v = state.exp_avg_sq
    if amsgrad:
        torch.maximum(state.max_exp_avg_sq, v, out=state.max_exp_avg_sq)
        v = state.max_exp_avg_sq
    m_hat = state.exp_avg / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    state.param.sub_(lr * m_hat / (v_hat.sqrt() + eps))
