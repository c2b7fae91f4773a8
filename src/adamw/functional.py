"""The one place where a backend is chosen, and the functional ``adamw`` that runs it.

torch's ``foreach``/``fused`` flags are kept for compatibility and mapped here to one backend name
(:func:`select_backend`). That name and the device type of the group's first param pick, from one
table (:data:`STEPS`), what runs: a step for the full-precision storage format (torch's), one for
the low-bit formats, and a check that the backend's kernel can run. ``fused=True`` is ``cpu`` (the C
kernels) on CPU tensors and ``triton`` on CUDA ones; ``triton`` runs CPU tensors under Triton's
interpreter; ``forloop`` and ``foreach`` run torch ops wherever torch runs. DTensor params (FSDP2)
in a low-bit format step their local shards through ``forloop.step_low_bit`` whatever the backend:
the kernels take plain tensors, and the rule that keeps a param under 4096 values in float32 needs
the whole param.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _foreach_supported_types  # the types torch's default accepts

from .backends import foreach as _foreach_backend
from .backends import forloop as _forloop_backend
from .backends import low_bit as _low_bit_backend
from .backends import ops as _ops
from .backends._common import PLAIN_TYPES, Hyper, imported_on_call, is_cuda, run_eagerly
from .options import (
    BACKEND_DEVICES,
    FUSED_BACKENDS,
    check_backend_name,
    check_group_step,
    fused_backend_for,
    is_low_bit,
    stepped_params,
)
from .states.entries import is_dtensor

# Devices on which torch's rule (the documentation's note) turns foreach on when no flag is given.
_FOREACH_DEFAULT_DEVICES = ("cuda", "xpu", "mtia")


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
            and _on_foreach_default_devices(params)
        )
    return "foreach" if foreach else "forloop"


def _on_foreach_default_devices(params: list[Tensor]) -> bool:
    """Every param of a type torch's foreach ops take, on a device where torch defaults to them. All
    on CUDA is answered without reading each param's device (1 us each: 1 ms a step for a thousand)."""
    if not set(map(type, params)) <= set(_foreach_supported_types):
        return False
    return all(map(is_cuda, params)) or all(p.device.type in _FOREACH_DEFAULT_DEVICES for p in params)


StepFn = Callable[..., None]
ANY_DEVICE = "*"


def _nothing_to_check(params: list[Tensor], low_bit: bool) -> None:
    """The torch-op backends run wherever torch runs, and are imported with this module."""


@dataclass(frozen=True)
class Steps:
    """What a backend runs on one device type: the step of the full-precision format (its moments are
    :func:`adamw`'s lists), the step of the low-bit formats (its moments are in the params' state
    dicts), and the check that its kernel can run, made before any group of a step changes."""

    full_precision: StepFn
    low_bit: StepFn
    check: Callable[[list[Tensor], bool], None] = _nothing_to_check


# The torch-op backends are imported with this module: an import inside a torch.compile'd step is a
# graph break, which on the first (state-creating) step makes dynamo trace _init_group on fake tensors,
# and the foreach step then fails to compile. The kernels' modules are imported on first use.


def _load_c_kernel(params: list[Tensor], low_bit: bool) -> None:
    from .backends import cpu, cpu_low_bit

    (cpu_low_bit if low_bit else cpu).library()  # built, or found in the cache, and loaded once


_TRITON = Steps(
    imported_on_call("triton", "step"),
    imported_on_call("triton", "step_low_bit"),
    imported_on_call("triton", "check_params"),
)

# (backend, device type of the group's first param) -> what runs; ANY_DEVICE: whatever torch runs.
STEPS: dict[tuple[str, str], Steps] = {
    ("forloop", ANY_DEVICE): Steps(_forloop_backend.step, _forloop_backend.step_low_bit),
    ("foreach", ANY_DEVICE): Steps(_foreach_backend.step, _forloop_backend.step_low_bit),
    ("cpu", "cpu"): Steps(
        imported_on_call("cpu", "step"), imported_on_call("cpu_low_bit", "step_low_bit"), _load_c_kernel
    ),
    ("triton", "cuda"): _TRITON,
    ("triton", "cpu"): _TRITON,  # under Triton's interpreter
}
# The device types a backend runs here are those options.BACKEND_DEVICES lets its params be on.
assert set(STEPS) == {
    (name, device) for name, devices in BACKEND_DEVICES.items() for device in (devices or (ANY_DEVICE,))
}


def steps_for(backend: str, device_type: str) -> Steps:
    """What ``backend`` runs on tensors of ``device_type``."""
    steps = STEPS.get((backend, device_type)) or STEPS.get((backend, ANY_DEVICE))
    if steps is None:
        check_backend_name(backend)
        devices = " and ".join(device for name, device in STEPS if name == backend)
        raise RuntimeError(f"backend={backend!r} runs {devices} tensors, not {device_type} ones")
    return steps


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
    state_precision: str = "param",
    param_update: str = "round",
    seed: int = 0,
    states: list[dict[str, Tensor]] | None = None,
    streams: list[int] | None = None,
) -> None:
    """Functional AdamW: one step over lists of tensors (see :mod:`adamw._math` for the math).

    ``state_steps`` are singleton tensors, incremented here. Fused backends also take GradScaler's
    ``grad_scale`` (gradients are divided by it) and ``found_inf`` (nonzero: the step is skipped).

    ``state_precision``, ``param_update`` and ``seed`` are the storage format, as :class:`adamw.AdamW`
    takes them. In the full-precision one (``"param"``, ``"round"``: torch's) the moments are
    ``exp_avgs``, ``exp_avg_sqs`` and ``max_exp_avg_sqs``. In a low-bit one those lists are not read:
    the moments are in ``states``, the params' state dicts (layout: :mod:`adamw.states.formats`), and
    ``streams`` number the params' stochastic rounding (distinct per param, stable across steps);
    such a format is neither capturable nor differentiable.
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
    if state_precision == "param" and param_update == "round":
        args = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hyper)
        if name not in FUSED_BACKENDS:
            _run(name, *args)
        elif _traceable(params, hyper):
            _ops.step(name, *args)
        else:
            _run_fused_eagerly(name, *args)
        return
    chosen = f"state_precision={state_precision!r}, param_update={param_update!r}"
    if states is None or streams is None:
        raise ValueError(f"{chosen} keeps the moments in `states` and numbers the rounding by `streams`: pass both")
    if capturable or differentiable:
        raise ValueError(f"{chosen} supports neither capturable=True nor differentiable=True")
    storage = _low_bit_backend.StorageFormat(state_precision=state_precision, param_update=param_update, seed=seed)
    low_bit_args = (params, grads, states, state_steps, streams, hyper, storage)
    if name in _ops.LOW_BIT_OPS and _traceable(params, hyper):
        _ops.step_low_bit(name, *low_bit_args)
    else:
        _run_low_bit_eagerly(name, *low_bit_args)


def _run(name: str, params: list[Tensor], *args: object) -> None:
    steps_for(name, params[0].device.type).full_precision(params, *args)


def _traceable(params: list[Tensor], hyper: Hyper) -> bool:
    """Whether a fused step goes into a torch.compile graph as its kernel's op (:mod:`adamw.backends.ops`).

    Only while compiling: eager, the op's dispatch would cost a step more than the call it wraps. Not
    for DTensor params (FSDP2), which have no sharding rule for our ops and step their local shards,
    nor for ``differentiable`` (the fused kernels refuse it, which the eager call says)."""
    return torch.compiler.is_compiling() and set(map(type, params)) <= PLAIN_TYPES and not hyper.differentiable


# Where the op cannot stand in, the kernel's call runs eagerly (see run_eagerly), as torch's own fused
# optimizers do under torch.compile. The low-bit steps of every backend do: they read the step counters
# on the host.
_run_fused_eagerly = run_eagerly(_run)


@run_eagerly
def _run_low_bit_eagerly(
    name: str,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    state_steps: list[Tensor],
    streams: list[int],
    hyper: Hyper,
    storage: _low_bit_backend.StorageFormat,
) -> None:
    sharded = [] if set(map(type, params)) <= PLAIN_TYPES else list(map(is_dtensor, params))
    if not any(sharded):
        steps_for(name, params[0].device.type).low_bit(params, grads, states, state_steps, streams, hyper, storage)
        return

    # DTensor params (FSDP2) step their local shards through the torch ops (see the module's docstring),
    # after the plain params have stepped through the backend.
    def run(step: StepFn, index: list[int]) -> None:
        def pick(values: list[Any]) -> list[Any]:
            return [values[i] for i in index]

        step(pick(params), pick(grads), pick(states), pick(state_steps), pick(streams), hyper, storage)

    plain = [i for i, s in enumerate(sharded) if not s]
    if plain:
        run(steps_for(name, params[plain[0]].device.type).low_bit, plain)
    run(_forloop_backend.step_low_bit, [i for i, s in enumerate(sharded) if s])


def check_kernel(name: str, params: list[Tensor], *, low_bit: bool) -> None:
    """Raise now what a step of ``params`` on backend ``name`` would raise for want of its kernel: the
    backend's module, the C kernel (low-bit or not) built or loaded, Triton and the params' devices.
    Loading happens once per process; later calls cost a lookup. Low-bit DTensor params are left out:
    the torch ops step them."""
    if low_bit and not set(map(type, params)) <= PLAIN_TYPES:
        params = [p for p in params if not is_dtensor(p)]
    if params:
        steps_for(name, params[0].device.type).check(params, low_bit)


@run_eagerly
def check_step(groups: list[dict[str, Any]], state: Mapping[Tensor, Mapping[str, Any]]) -> None:
    """Raise, before any change, for whatever would make some group's step fail: the rules of
    :mod:`adamw.options`, then each group's kernel (:func:`check_kernel`, after the checks torch also
    makes), so that a missing compiler or Triton fails here, not after earlier groups were stepped or
    state was created. ``groups`` and ``state`` are an optimizer's."""
    for index, group in enumerate(groups):
        params = stepped_params(group, index)
        if not params:
            continue
        backend = select_backend(
            params,
            backend=group["backend"],
            foreach=group["foreach"],
            fused=group["fused"],
            differentiable=group["differentiable"],
            capturable=group["capturable"],
            lr=group["lr"],
        )
        low_bit = is_low_bit(group)
        if not low_bit:
            check_group_step(params, group, backend, state)
        check_kernel(backend, params, low_bit=low_bit)
