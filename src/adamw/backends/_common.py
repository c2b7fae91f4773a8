"""What every backend receives: the group's hyper-parameters in one record, and shared checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

# Tensors whose memory is their own (a DTensor's is its local shard's): what our kernels take.
PLAIN_TYPES = frozenset((Tensor, torch.nn.Parameter))

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Hyper:
    """One param group's hyper-parameters and flags, as a backend sees them."""

    lr: float | Tensor
    beta1: float | Tensor
    beta2: float | Tensor
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    capturable: bool
    differentiable: bool
    has_complex: bool = False
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None

    def scalar_lr_betas(self) -> tuple[float | Tensor, float | Tensor, float | Tensor]:
        """lr, beta1, beta2 with 1-element Tensors squeezed to 0-d (as torch does)."""
        return _squeeze(self.lr), _squeeze(self.beta1), _squeeze(self.beta2)


def _squeeze(x: float | Tensor) -> float | Tensor:
    return x.squeeze() if isinstance(x, Tensor) and x.dim() != 0 else x


def host_value(x: float | Tensor) -> float | Tensor:
    """A Python number from a CPU scalar tensor; under torch.compile the tensor itself (no sync)."""
    if torch.compiler.is_compiling():
        return x
    return x.item() if isinstance(x, Tensor) else x


def capturable_devices() -> list[str]:
    devices = ["cuda", "xpu", "hpu", torch._C._get_privateuse1_backend_name()]
    return devices


def check_capturable_devices(params: list[Tensor], state_steps: list[Tensor]) -> None:
    """capturable=True needs params and step counters on one accelerator (never the CPU)."""
    if torch.compiler.is_compiling():
        return  # the compiler does its own cudagraph checks
    supported = capturable_devices()
    for p, s in zip(params, state_steps, strict=True):
        if not (p.device.type == s.device.type and p.device.type in supported):
            raise AssertionError(
                "If capturable=True, params and state_steps must be on supported devices: "
                f"{supported}; got a param on {p.device.type} with its step on {s.device.type}"
            )


def run_eagerly(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` as one call that torch.compile runs as it is instead of tracing (``torch.compiler.disable``).

    Through torch's own lazy form, which torch.optim uses for the same purpose: ``torch.compiler.disable``
    imports torch._dynamo at once (seconds that an eager user would pay at ``import adamw``), and a
    lazy wrapper of our own would itself be traced, one more compiled frame per optimizer.
    """
    return torch._disable_dynamo(fn)  # type: ignore[return-value]
