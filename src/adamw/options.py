"""Every rule on AdamW's options, stated once: the keyword arguments and their types, where each
backend runs, the checks made at construction (and by ``add_param_group``), and those made before
each step.

A rule is checked where it can first be decided: an option's value at construction; what depends on
the params (devices, dtypes, grads) or on their state before a step, which raises before anything
changes. Where torch has the rule, the exception type and the message's opening words are torch's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

import torch
from torch import Tensor

from .backends._common import check_capturable_devices, dtype_of, grad_of, is_cpu, is_cuda, is_sparse
from .states import PARAM_UPDATES, STATE_PRECISIONS


class AdamWOptions(TypedDict, total=False):
    """The keyword arguments of :class:`adamw.AdamW` (see its docstring for their meaning), shared by
    :func:`adamw.step_in_backward`. mypy holds the two together: ``AdamW.__init__`` builds its group
    options as one, and ``AdamWInBackward`` passes one to it; a test checks that it names every keyword."""

    lr: float | Tensor
    betas: tuple[float | Tensor, float | Tensor]
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    foreach: bool | None
    capturable: bool
    differentiable: bool
    fused: bool | None
    backend: str | None
    state_precision: str
    param_update: str
    seed: int
    reshardable_state_dict: bool


def is_low_bit(group: Mapping[str, Any]) -> bool:
    """Whether the group stores state or writes params other than torch's way."""
    return group["state_precision"] != "param" or group["param_update"] != "round"


# ----------------------------------------------------------------------------------------------
# the backends

FUSED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# Where each backend runs: device type -> the param dtypes its kernel takes. The torch-op backends
# (None) run whatever torch runs.
BACKEND_DEVICES: dict[str, Mapping[str, tuple[torch.dtype, ...]] | None] = {
    "forloop": None,
    "foreach": None,
    "cpu": {"cpu": FUSED_DTYPES},
    "triton": {"cuda": FUSED_DTYPES, "cpu": FUSED_DTYPES},  # CPU tensors under Triton's interpreter
}
BACKENDS: tuple[str, ...] = tuple(BACKEND_DEVICES)
FUSED_BACKENDS: tuple[str, ...] = tuple(name for name, devices in BACKEND_DEVICES.items() if devices is not None)
# The kernel that torch's flag fused=True runs on each device type.
FUSED_BY_DEVICE = {"cpu": "cpu", "cuda": "triton"}

_FUSED_NOT_DIFFERENTIABLE = "`fused` does not support `differentiable`"
# As torch's message spells what its fused kernels take: {'cpu', 'cuda'} x ['torch.float64', ...].
_FUSED_SUPPORT = f"{{{', '.join(map(repr, FUSED_BY_DEVICE))}}} x {[str(d) for d in FUSED_DTYPES]}"


def fused_backend_for(param: Tensor) -> str:
    """The kernel that ``fused=True`` runs on ``param``'s device (torch's message for another device)."""
    if param.device.type in FUSED_BY_DEVICE:
        return FUSED_BY_DEVICE[param.device.type]
    raise RuntimeError(
        "`fused=True` requires all the params to be floating point Tensors of supported devices: "
        f"{list(FUSED_BY_DEVICE)} but {param.dtype} and {param.device.type}"
    )


def check_backend_name(backend: str) -> None:
    """``backend`` names one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)} or None, but got {backend!r}")


# ----------------------------------------------------------------------------------------------
# at construction


def _refuse_foreach_tensor(
    name: str, value: object, *, foreach: bool, capturable: bool, error: type[Exception]
) -> None:
    """torch's foreach path takes a Tensor lr or beta only with capturable=True. Checked at
    construction and again before each step (options set in a live group, or loaded), each time with
    the type torch raises there: ValueError in its constructor, RuntimeError for lr in its step."""
    if foreach and not capturable and isinstance(value, Tensor):
        raise error(f"{name} as a Tensor is not supported for capturable=False and foreach=True")


def check_group_options(options: Mapping[str, Any]) -> None:
    """Validate one group's options; messages name the argument and what it accepts (torch's wording first)."""
    lr, betas, eps, weight_decay = options["lr"], options["betas"], options["eps"], options["weight_decay"]
    foreach, fused, capturable = options["foreach"], options["fused"], options["capturable"]
    differentiable, backend = options["differentiable"], options.get("backend")
    # backend="foreach" is foreach=True by name: the same Tensor lr/betas limits apply at construction.
    runs_foreach = bool(foreach) or backend == "foreach"
    if isinstance(lr, Tensor):
        _refuse_foreach_tensor("lr", lr, foreach=runs_foreach, capturable=capturable, error=ValueError)
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, but got {lr.numel()} elements")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr} (lr must be >= 0)")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps} (eps must be >= 0)")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), but got {betas!r}")
    for i in (0, 1):
        if not 0.0 <= betas[i] < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]} (betas[{i}] must be in [0, 1))")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (weight_decay must be >= 0)")
    both_float = isinstance(betas[0], float) and isinstance(betas[1], float)
    both_tensor = isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor)
    if not (both_float or both_tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            _refuse_foreach_tensor(f"betas[{i}]", beta, foreach=runs_foreach, capturable=capturable, error=ValueError)
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
    if fused and differentiable:
        raise RuntimeError(_FUSED_NOT_DIFFERENTIABLE)
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    check_storage_options(options)
    if not isinstance(options.get("seed", 0), int):
        raise ValueError(f"seed must be an int, but got {options.get('seed')!r}")
    if backend is not None:
        check_backend_name(backend)
        if foreach is not None or fused is not None:
            raise ValueError(f"backend={backend!r} names the implementation: leave foreach and fused unset (None)")
        if backend in FUSED_BACKENDS and differentiable:
            raise RuntimeError(f"backend={backend!r} (a fused kernel) does not support `differentiable`")


def check_storage_options(options: Mapping[str, Any]) -> None:
    """Validate ``state_precision``/``param_update``: at construction, and when set in a live group."""
    state_precision = options.get("state_precision", "param")
    param_update = options.get("param_update", "round")
    if state_precision not in STATE_PRECISIONS:
        raise ValueError(f"state_precision must be one of {list(STATE_PRECISIONS)}, but got {state_precision!r}")
    if param_update not in PARAM_UPDATES:
        raise ValueError(f"param_update must be one of {list(PARAM_UPDATES)}, but got {param_update!r}")
    if state_precision != "param" or param_update != "round":
        chosen = f"state_precision={state_precision!r}, param_update={param_update!r}"
        for flag in ("differentiable", "capturable"):
            if options.get(flag):
                raise ValueError(
                    f"{chosen} does not support {flag}=True (use state_precision='param', param_update='round')"
                )


# ----------------------------------------------------------------------------------------------
# before each step



def stepped_params(group: Mapping[str, Any], index: int) -> list[Tensor]:
    """The params of group ``index`` that have a grad, once their grads are checked: dense (torch's
    message), and of their param's dtype, from which every backend computes the update (torch raises
    for another dtype only mid-step, after state was created and earlier groups stepped; the low-bit
    kernels would take it)."""
    params = [p for p in group["params"] if p.grad is not None]
    grads = list(map(grad_of, params))
    if any(map(is_sparse, grads)):
        raise RuntimeError(
            "AdamW does not support sparse gradients, please consider SparseAdam instead "
            f"(param group {index} has a sparse grad)"
        )
    if list(map(dtype_of, grads)) != list(map(dtype_of, params)):
        p, grad = next((p, g) for p, g in zip(params, grads, strict=True) if g.dtype != p.dtype)
        raise RuntimeError(
            f"expected each grad to have its param's dtype, but param group {index} has a {p.dtype} param "
            f"with a {grad.dtype} grad (give it a {p.dtype} grad)"
        )
    return params


def check_group_step(
    params: list[Tensor], group: Mapping[str, Any], backend: str, state: Mapping[Tensor, Mapping[str, Any]]
) -> None:
    """What a full-precision group's step on ``backend`` needs of its options, ``params`` (those with
    a grad) and their ``state``."""
    capturable, differentiable = group["capturable"], group["differentiable"]
    if backend == "foreach":
        _refuse_foreach_tensor("lr", group["lr"], foreach=True, capturable=capturable, error=RuntimeError)
        # torch's foreach path raises ValueError for Tensor betas, but only mid-step; we raise first.
        for i, beta in enumerate(group["betas"]):
            _refuse_foreach_tensor(f"betas[{i}]", beta, foreach=True, capturable=capturable, error=ValueError)
        if differentiable:
            # AssertionError is torch's type here (its foreach path asserts); raised before any change,
            # where torch has already created state and stepped earlier groups.
            raise AssertionError("_foreach ops don't support autograd (foreach with differentiable=True)")
    if backend in FUSED_BACKENDS:
        if differentiable:
            raise RuntimeError(_FUSED_NOT_DIFFERENTIABLE)
        _check_fused_params(params, backend)
    if capturable and backend not in FUSED_BACKENDS:
        steps = [state.get(p, {}).get("step") for p in params]
        # A param without a step yet gets one on its own device.
        check_capturable_devices(
            params, [s if isinstance(s, Tensor) else p for p, s in zip(params, steps, strict=True)]
        )
    if differentiable:
        for p in params:
            step = state.get(p, {}).get("step")
            if isinstance(step, Tensor) and step.requires_grad:
                raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")


def _check_fused_params(params: list[Tensor], backend: str) -> None:
    """Every param on a device of ``backend``'s kernel, of a dtype it takes there."""
    devices = BACKEND_DEVICES[backend] or {}
    for p in _one_per_kind(params):
        dtypes = devices.get(p.device.type)
        if dtypes is None and p.device.type in FUSED_BY_DEVICE:
            # The device of another fused kernel: a group's fused=True runs the kernel of its first param.
            raise RuntimeError("`fused=True` on the CPU needs every param of a group on the CPU")
        if p.dtype not in (dtypes or ()):
            raise RuntimeError(
                "`fused=True` requires all the params to be floating point Tensors of supported "
                f"devices and dtypes: {_FUSED_SUPPORT}, but got {p.dtype} on {p.device.type}"
            )


def _one_per_kind(params: list[Tensor]) -> list[Tensor]:
    """The first param of each (device type, dtype) present, in a fixed order: a group of a thousand
    params has one or two kinds. A group on the CPU alone, or on CUDA alone, is told apart by dtype, the
    cheap lookup (reading each param's device costs 1 us: 1 ms a step for a thousand params)."""
    firsts = params[::-1]  # so that each kind keeps its first param
    if all(map(is_cpu, params)) or all(map(is_cuda, params)):
        by_dtype = dict(zip(map(dtype_of, firsts), firsts, strict=True))
        return [by_dtype[dtype] for dtype in sorted(by_dtype, key=str)]
    by_kind = {(p.device.type, str(p.dtype)): p for p in firsts}
    return [by_kind[kind] for kind in sorted(by_kind)]
