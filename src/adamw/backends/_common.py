"""What every backend receives: the group's hyper-parameters in one record, and shared helpers."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, ParamSpec, TypeVar

import torch
from torch import Tensor

# A tensor's attributes as functions, for map(): one C-level pass over a group's list of a thousand
# tensors costs a fraction of a Python loop's.
dtype_of = attrgetter("dtype")
grad_of = attrgetter("grad")
is_cpu = attrgetter("is_cpu")
is_cuda = attrgetter("is_cuda")
is_sparse = attrgetter("is_sparse")
nbytes_of = attrgetter("nbytes")

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

    def refuse_grad_scaling(self, backend: str) -> None:
        """Raise for GradScaler's tensors on a torch-op backend: GradScaler unscales for those itself."""
        if self.grad_scale is not None or self.found_inf is not None:
            raise RuntimeError(
                f"the {backend} backend does not take grad_scale/found_inf; GradScaler unscales "
                "gradients itself for it (use fused=True for in-kernel unscaling)"
            )


def _squeeze(x: float | Tensor) -> float | Tensor:
    return x.squeeze() if isinstance(x, Tensor) and x.dim() != 0 else x


def host_value(x: float | Tensor) -> float | Tensor:
    """A Python number from a CPU scalar tensor; under torch.compile the tensor itself (no sync)."""
    if torch.compiler.is_compiling():
        return x
    return x.item() if isinstance(x, Tensor) else x


def check_capturable_devices(params: list[Tensor], state_steps: list[Tensor]) -> None:
    """capturable=True needs params and step counters on one accelerator (never the CPU)."""
    if torch.compiler.is_compiling():
        return  # the compiler does its own cudagraph checks
    supported = ["cuda", "xpu", "hpu", torch._C._get_privateuse1_backend_name()]
    for p, s in zip(params, state_steps, strict=True):
        if not (p.device.type == s.device.type and p.device.type in supported):
            raise AssertionError(
                "If capturable=True, params and state_steps must be on supported devices: "
                f"{supported}; got a param on {p.device.type} with its step on {s.device.type}"
            )


def run_eagerly(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` as one call that torch.compile runs as it is instead of tracing (``torch.compiler.disable``).

    This package runs eagerly what cannot be traced (a kernel launched through ctypes or Triton's
    launcher, with its loading and host work) and what looks up an optimizer's groups, state or streams.
    A graph break inside the former would leave the whole step to eager mode; there, as in a traced
    step, a function that reads an optimizer's objects is compiled with guards on them, once per
    optimizer, so a few compiled optimizers in one process would exhaust Dynamo's recompile limit.
    torch's optimizers run their ``_init_group`` eagerly for the same reason.

    Through torch's own lazy form, which torch.optim uses for the same purpose: ``torch.compiler.disable``
    imports torch._dynamo at once (seconds that an eager user would pay at ``import adamw``), and a
    lazy wrapper of our own would itself be traced, one more compiled frame per optimizer.
    """
    return torch._disable_dynamo(fn)  # type: ignore[return-value]


def imported_on_call(module: str, name: str) -> Callable[..., Any]:
    """``adamw.backends.<module>.<name>``, its module imported at the first call: the compiled
    kernels' modules load C kernels or Triton (optional), which a user of the torch-op backends need
    not load. Only for calls that torch.compile does not trace: an import there is a graph break."""

    resolved: list[Callable[..., Any]] = []  # the function, once imported (an import costs microseconds a step)

    def call(*args: Any) -> Any:
        if not resolved:
            resolved.append(getattr(importlib.import_module(f"{__package__}.{module}"), name))
        return resolved[0](*args)

    return call
