"""The one place where a backend is chosen, and the functional ``adamw`` that runs it.

torch's ``foreach``/``fused`` flags are kept for compatibility and mapped here to one backend name:

=========  =======================================================================
backend    what runs
=========  =======================================================================
forloop    :mod:`adamw.backends.forloop`: torch ops, one tensor at a time
foreach    :mod:`adamw.backends.foreach`: ``torch._foreach_*`` ops per device/dtype
cpu        :mod:`adamw.backends.cpu`: our C kernel, one call per group (``fused=True`` on CPU)
triton     :mod:`adamw.backends.triton`: our Triton kernel (``fused=True`` on CUDA)
=========  =======================================================================
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Literal

from torch import Tensor

from .backends import foreach as _foreach_backend
from .backends import forloop as _forloop_backend
from .backends import lean as _lean_backend
from .backends._common import Hyper, run_eagerly

BackendName = Literal["forloop", "foreach", "cpu", "triton"]
BACKENDS: tuple[str, ...] = ("forloop", "foreach", "cpu", "triton")
FUSED_BACKENDS: tuple[str, ...] = ("cpu", "triton")

# Devices on which torch's rule (the documentation's note) turns foreach on when no flag is given.
_FOREACH_DEFAULT_DEVICES = ("cuda", "xpu", "mtia")


def fused_backend_for(param: Tensor) -> str:
    """The kernel that ``fused=True`` runs on ``param``'s device (torch's message for another device)."""
    if param.device.type == "cpu":
        return "cpu"
    if param.device.type == "cuda":
        return "triton"
    raise RuntimeError(
        "`fused=True` requires all the params to be floating point Tensors of supported devices: "
        f"['cpu', 'cuda'] but {param.dtype} and {param.device.type}"
    )


def select_backend(
    params: list[Tensor],
    *,
    backend: str | None,
    foreach: bool | None,
    fused: bool | None,
    differentiable: bool,
    capturable: bool,
    lr: float | Tensor,
) -> str:
    """Map torch's flags (or an explicit backend name) to the backend that runs a group.

    The rules of torch's note: fused over foreach when both are set; foreach by default only when
    every param is on CUDA (and not differentiable, and lr is not a Tensor without capturable);
    otherwise the for-loop.
    """
    if backend is not None:
        return backend
    if fused:
        return fused_backend_for(params[0]) if params else "forloop"
    if foreach is None and fused is None:
        foreach = (
            not differentiable
            and not (isinstance(lr, Tensor) and not capturable)
            and all(type(p) in _foreach_types() and p.device.type in _FOREACH_DEFAULT_DEVICES for p in params)
        )
    return "foreach" if foreach else "forloop"


def _foreach_types() -> tuple[type, ...]:
    from torch.optim.optimizer import _foreach_supported_types  # the types torch's default accepts

    return tuple(_foreach_supported_types)


StepFn = Callable[..., None]
# The two torch-only backends are loaded up front: importlib inside a torch.compile'd step is a graph
# break, and on the first (state-creating) step that made dynamo trace _init_group on fake tensors,
# so the foreach step failed to compile. The optional fused backends are imported on first use.
_loaded: dict[str, StepFn] = {"forloop": _forloop_backend.step, "foreach": _foreach_backend.step}


def backend_step(name: str) -> StepFn:
    """The ``step`` function of a backend module, imported on first use (Triton is optional)."""
    if name not in _loaded:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, but got {name!r}")
        module = importlib.import_module(f"adamw.backends.{name}")
        _loaded[name] = module.step
    return _loaded[name]


def adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
    maximize: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    has_complex: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    backend: str | None = None,
) -> None:
    """Functional AdamW: one step over lists of tensors (see :mod:`adamw._math` for the math).

    ``state_steps`` are singleton tensors, incremented here. Fused backends also take GradScaler's
    ``grad_scale`` (gradients are divided by it) and ``found_inf`` (nonzero: the step is skipped).
    """
    if not params:
        return
    name = select_backend(
        params,
        backend=backend,
        foreach=foreach,
        fused=fused,
        differentiable=differentiable,
        capturable=capturable,
        lr=lr,
    )
    hyper = Hyper(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        capturable=capturable,
        differentiable=differentiable,
        has_complex=has_complex,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )
    run = _run_fused if name in FUSED_BACKENDS else _run
    run(name, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hyper)


def _run(name: str, *args: object) -> None:
    backend_step(name)(*args)


# torch.compile runs our fused kernels eagerly, as it does torch's own fused optimizers: a kernel launched
# through ctypes or Triton's launcher (and its loading and host work) cannot be traced, and a graph break
# inside it would leave the whole step to eager mode, where every function it calls is compiled on its
# own with guards on this optimizer's objects, so a few compiled optimizers in one process would exhaust
# Dynamo's recompile limit.
_run_fused = run_eagerly(_run)


def adamw_lean(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    state_steps: list[Tensor],
    streams: list[int],
    *,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    state_precision: str,
    param_update: str,
    seed: int = 0,
    foreach: bool | None = None,
    fused: bool | None = None,
    backend: str | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One AdamW step with lean state (bf16/8-bit moments, bf16 params without a master copy).

    ``states`` are the params' state dicts (layout: :mod:`adamw.states.formats`); ``streams`` key each
    param's stochastic rounding. A fused backend that has a lean kernel (a ``step_lean`` function)
    runs it; every other choice runs the torch-ops reference, :mod:`adamw.backends.lean`.
    """
    if not params:
        return
    name = select_backend(
        params, backend=backend, foreach=foreach, fused=fused, differentiable=False, capturable=False, lr=lr
    )
    hyper = Hyper(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        capturable=False,
        differentiable=False,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )
    lean = _lean_backend.Lean(state_precision=state_precision, param_update=param_update, seed=seed)
    _run_low_bit(name, params, grads, states, state_steps, streams, hyper, lean)


@run_eagerly
def _run_low_bit(
    name: str,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    state_steps: list[Tensor],
    streams: list[int],
    hyper: Hyper,
    lean: _lean_backend.Lean,
) -> None:
    step_lean = _lean_kernel(name) or _lean_backend.step
    step_lean(params, grads, states, state_steps, streams, hyper, lean)


def _lean_kernel(name: str) -> Callable[..., None] | None:
    """The lean variant of a fused backend's kernel (``step_lean`` in its module or in a ``<name>_lean``
    module beside it), where it has one."""
    if name not in FUSED_BACKENDS:
        return None
    module = importlib.import_module(f"adamw.backends.{name}")
    if hasattr(module, "step_lean"):
        return module.step_lean  # type: ignore[no-any-return]
    if importlib.util.find_spec(f"adamw.backends.{name}_lean") is None:
        return None
    return importlib.import_module(f"adamw.backends.{name}_lean").step_lean  # type: ignore[no-any-return]


def check_kernel(name: str, params: list[Tensor], *, lean: bool) -> None:
    """Raise now what a step of ``params`` on backend ``name`` would raise for want of its kernel: the
    C kernel (the lean one for a lean group) is built or loaded, Triton imported and the params'
    devices checked against the Triton kernel's. :class:`adamw.AdamW` calls it for every group before
    it steps any; loading happens once per process, later calls cost a lookup."""
    if name == "cpu":
        importlib.import_module("adamw.backends.cpu_lean" if lean else "adamw.backends.cpu").library()
    elif name == "triton":
        importlib.import_module("adamw.backends.triton").check_params(params, lean=lean)
