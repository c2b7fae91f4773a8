"""The fused kernels as PyTorch custom ops (namespace ``adamw``), so that ``torch.compile`` puts each
kernel call in its graph as one opaque op instead of breaking the graph around it.

One op per kernel entry, each with a fake implementation (the ops return nothing: they write in place
the tensors their schemas mark ``!``) and the host code of its backend as its implementation:

=========================  =========  ===============================================
op                         devices    runs
=========================  =========  ===============================================
``adamw::cpu_step``        cpu        :func:`adamw.backends.cpu.step`
``adamw::triton_step``     cuda, cpu  :func:`adamw.backends.triton.step`
``adamw::cpu_low_bit``     cpu        :func:`adamw.backends.cpu_low_bit.step_low_bit`
``adamw::triton_low_bit``  cuda, cpu  :func:`adamw.backends.triton.step_low_bit`
=========================  =========  ===============================================

(Triton runs CPU tensors under its interpreter.) A schema holds tensors, lists of them and scalars,
so the :class:`~adamw.backends._common.Hyper` record travels as a list of its numbers, one of its flags
and one of its tensors (see :func:`hyper_args`), and the low-bit steps' state dicts
as one flat list of their tensors with a bit mask per param saying which of :data:`STATE_KEYS` it
holds. The backends' modules are imported by the implementations: defining the ops loads neither
the C kernels nor Triton.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..states import KAHAN_KEY
from ..states.formats import ABSMAX_SUFFIX, MOMENTS
from ._common import Hyper
from .low_bit import StorageFormat

# The state entries a low-bit kernel may read or write, in the order the flat list holds them.
STATE_KEYS: tuple[str, ...] = (*MOMENTS, *(key + ABSMAX_SUFFIX for key in MOMENTS), KAHAN_KEY)


def _hyper(scalars: list[float], flags: list[bool], scalar_tensors: list[Tensor | None]) -> Hyper:
    """The record :func:`hyper_args` took apart."""
    lr, beta1, beta2, eps, weight_decay = scalars
    amsgrad, maximize, capturable, has_complex = flags
    lr_tensor, beta1_tensor, beta2_tensor, grad_scale, found_inf = scalar_tensors
    return Hyper(
        lr=lr if lr_tensor is None else lr_tensor,
        beta1=beta1 if beta1_tensor is None else beta1_tensor,
        beta2=beta2 if beta2_tensor is None else beta2_tensor,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        capturable=capturable,
        differentiable=False,
        has_complex=has_complex,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


def hyper_args(hyper: Hyper) -> tuple[list[float], list[bool], list[Tensor | None]]:
    """The op arguments that carry ``hyper`` (the last three of every op's schema): its numbers, its
    flags, and its tensors (``lr``, ``beta1``, ``beta2`` where given as tensors, ``grad_scale``,
    ``found_inf``; None where absent)."""

    def number(x: float | Tensor) -> float:
        return 0.0 if isinstance(x, Tensor) else float(x)

    def tensor(x: float | Tensor) -> Tensor | None:
        return x if isinstance(x, Tensor) else None

    lr, beta1, beta2 = hyper.lr, hyper.beta1, hyper.beta2
    scalars = [number(lr), number(beta1), number(beta2), float(hyper.eps), float(hyper.weight_decay)]
    flags = [bool(hyper.amsgrad), bool(hyper.maximize), bool(hyper.capturable), bool(hyper.has_complex)]
    return scalars, flags, [tensor(lr), tensor(beta1), tensor(beta2), hyper.grad_scale, hyper.found_inf]


_LIBRARY = torch.library.Library("adamw", "DEF")


def _define(name: str, schema: str, device_types: Sequence[str], kernel: Callable[..., None]) -> Callable[..., None]:
    """Define ``adamw::name`` with ``kernel`` as its implementation on each device type, and a fake
    one that does nothing (the op writes its tensors in place and returns nothing).

    Defined through ``torch.library.Library`` rather than ``torch.library.custom_op``: a custom_op
    adds Python autograd and version-bump layers that unpack every list of tensors once more on each
    call, which costs a compiled step of a few hundred params more than the kernel itself; the
    dispatcher's own fallbacks do those jobs in C++. (The step runs under ``no_grad``: the ops have no
    autograd formula.)"""
    _LIBRARY.define(name + schema)
    for device_type in device_types:
        _LIBRARY.impl(name, kernel, _DISPATCH_KEYS[device_type])
    torch.library.register_fake(f"adamw::{name}", _fake, lib=_LIBRARY)
    op: Callable[..., None] = getattr(torch.ops.adamw, name).default
    return op


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _fake(*args: object) -> None:
    return None


# --------------------------------------------------------------------------------------------------
# the full-precision steps (torch's storage format)

FullPrecisionStep = Callable[
    [list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], Hyper], None
]

# The arguments every op ends with: hyper_args(hyper).
_HYPER_SCHEMA = "float[] scalars, bool[] flags, Tensor?[] scalar_tensors"
_FULL_PRECISION_SCHEMA = (
    "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
    f"Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, {_HYPER_SCHEMA}) -> ()"
)


def _define_full_precision(
    name: str, device_types: Sequence[str], run: Callable[[], FullPrecisionStep]
) -> Callable[..., None]:
    def kernel(
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        max_exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
        scalars: list[float],
        flags: list[bool],
        scalar_tensors: list[Tensor | None],
    ) -> None:
        hyper = _hyper(scalars, flags, scalar_tensors)
        run()(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hyper)

    return _define(name, _FULL_PRECISION_SCHEMA, device_types, kernel)


def _cpu_step() -> FullPrecisionStep:
    from . import cpu

    return cpu.step


def _triton_step() -> FullPrecisionStep:
    from . import triton

    return triton.step


cpu_step = _define_full_precision("cpu_step", ("cpu",), _cpu_step)
triton_step = _define_full_precision("triton_step", ("cuda", "cpu"), _triton_step)
FULL_PRECISION_OPS: dict[str, Callable[..., None]] = {"cpu": cpu_step, "triton": triton_step}


def step(
    name: str,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hyper: Hyper,
) -> None:
    """The full-precision step of fused backend ``name`` through its op."""
    FULL_PRECISION_OPS[name](params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *hyper_args(hyper))


# --------------------------------------------------------------------------------------------------
# the low-bit steps (moments in the params' state dicts)

LowBitStep = Callable[
    [list[Tensor], list[Tensor], list[dict[str, Tensor]], list[Tensor], list[int], Hyper, StorageFormat], None
]


def flatten_states(states: list[dict[str, Tensor]]) -> tuple[list[Tensor], list[int]]:
    """The state dicts' entries of :data:`STATE_KEYS` in one list, and per param the mask of the keys
    it holds (bit ``j``: ``STATE_KEYS[j]``)."""
    tensors: list[Tensor] = []
    masks: list[int] = []
    for state in states:
        mask = 0
        for j, key in enumerate(STATE_KEYS):
            value = state.get(key)
            if isinstance(value, Tensor):
                tensors.append(value)
                mask |= 1 << j
        masks.append(mask)
    return tensors, masks


def unflatten_states(tensors: list[Tensor], masks: list[int], state_steps: list[Tensor]) -> list[dict[str, Tensor]]:
    """The state dicts :func:`flatten_states` took apart (with each param's ``step``)."""
    states: list[dict[str, Tensor]] = []
    entries = iter(tensors)
    for mask, step_t in zip(masks, state_steps, strict=True):
        state = {key: next(entries) for j, key in enumerate(STATE_KEYS) if mask >> j & 1}
        state["step"] = step_t
        states.append(state)
    return states


# The grads are only read: a scaled one is divided into a new tensor. (The full-precision kernels
# write an unscaled grad back, as torch's fused kernels do.)
_LOW_BIT_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_tensors, int[] state_masks, "
    "Tensor(c!)[] state_steps, int[] streams, str state_precision, str param_update, int seed, "
    f"{_HYPER_SCHEMA}) -> ()"
)


def _define_low_bit(name: str, device_types: Sequence[str], run: Callable[[], LowBitStep]) -> Callable[..., None]:
    def kernel(
        params: list[Tensor],
        grads: list[Tensor],
        state_tensors: list[Tensor],
        state_masks: list[int],
        state_steps: list[Tensor],
        streams: list[int],
        state_precision: str,
        param_update: str,
        seed: int,
        scalars: list[float],
        flags: list[bool],
        scalar_tensors: list[Tensor | None],
    ) -> None:
        hyper = _hyper(scalars, flags, scalar_tensors)
        states = unflatten_states(state_tensors, state_masks, state_steps)
        storage = StorageFormat(state_precision=state_precision, param_update=param_update, seed=seed)
        run()(params, grads, states, state_steps, streams, hyper, storage)

    return _define(name, _LOW_BIT_SCHEMA, device_types, kernel)


def _cpu_low_bit() -> LowBitStep:
    from . import cpu_low_bit

    return cpu_low_bit.step_low_bit


def _triton_low_bit() -> LowBitStep:
    from . import triton

    return triton.step_low_bit


cpu_low_bit = _define_low_bit("cpu_low_bit", ("cpu",), _cpu_low_bit)
triton_low_bit = _define_low_bit("triton_low_bit", ("cuda", "cpu"), _triton_low_bit)
LOW_BIT_OPS: dict[str, Callable[..., None]] = {"cpu": cpu_low_bit, "triton": triton_low_bit}


def step_low_bit(
    name: str,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    state_steps: list[Tensor],
    streams: list[int],
    hyper: Hyper,
    storage: StorageFormat,
) -> None:
    """The low-bit step of fused backend ``name`` through its op."""
    state_tensors, masks = flatten_states(states)
    LOW_BIT_OPS[name](
        params,
        grads,
        state_tensors,
        masks,
        state_steps,
        streams,
        storage.state_precision,
        storage.param_update,
        storage.seed,
        *hyper_args(hyper),
    )
