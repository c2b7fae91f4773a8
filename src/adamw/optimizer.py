"""``adamw.AdamW``: a drop-in ``torch.optim.AdamW``. Bookkeeping only: validation, groups, state.

The math lives in :mod:`adamw._math`, the choice of backend in :mod:`adamw.functional`. The state
layout (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) and param-group keys are
torch's, so checkpoints move between the two classes in both directions.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT, _use_grad_for_differentiable

from .backends._common import capturable_devices
from .backends.lean import effective_param_update
from .functional import BACKENDS, FUSED_BACKENDS, adamw, adamw_lean, backend_step, select_backend
from .states import (
    KAHAN_KEY,
    PARAM_UPDATES,
    STATE_PRECISIONS,
    convert_state,
    format_for,
    full_precision_state,
    init_lean_state,
)
from .states.formats import ABSMAX_SUFFIX, INT8, MOMENTS, StateFormat, compute_dtype, stored_format
from .states.reference import is_dtensor, like_param

# Keys that exist in our param groups but not in torch's: kept from the live optimizer when a
# checkpoint written by torch.optim.AdamW (which lacks them) is loaded.
_OWN_GROUP_KEYS = ("backend", "seed")
# How state is stored is this run's memory decision, not the checkpoint's: these always keep the live
# group's value, and a loaded state is converted to them.
_STORAGE_GROUP_KEYS = ("state_precision", "param_update")

# dtypes each fused kernel handles, by device type.
_dtype_of = attrgetter("dtype")
_is_cpu = attrgetter("is_cpu")
_grad_of = attrgetter("grad")
_is_sparse = attrgetter("is_sparse")

_FUSED_DTYPES = {
    "cpu": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
}


def _scalar_dtype(fused: bool | None) -> torch.dtype:
    """dtype of the ``step`` counter, as torch stores it (so checkpoints match)."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class AdamW(Optimizer):
    r"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter), a drop-in for ``torch.optim.AdamW``.

    At step :math:`t`, for each parameter :math:`\theta` with gradient :math:`g`
    (negated when ``maximize``)::

        theta <- theta * (1 - lr * weight_decay)
        m     <- beta1 * m + (1 - beta1) * g
        v     <- beta2 * v + (1 - beta2) * g^2          (v_max <- max(v_max, v) with amsgrad)
        theta <- theta - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

    Weight decay is multiplied by the learning rate, as in torch (not by lr / initial lr).

    Args:
        params: tensors, ``(name, tensor)`` pairs, or dicts defining parameter groups.
        lr: learning rate, a float or a 1-element Tensor (default 1e-3).
        betas: decay rates of the first and second moment averages, both floats or both
            1-element Tensors (default (0.9, 0.999)).
        eps: added to the denominator after the bias-corrected root (default 1e-8).
        weight_decay: decoupled weight decay coefficient (default 1e-2).
        amsgrad: use the maximum of past second moments (AMSGrad).
        maximize: maximize the objective instead of minimizing it.
        foreach: torch's flag: run the foreach backend (None: on CUDA only).
        capturable: keep step counters on the device and never sync with the host, so the step
            can be captured in a CUDA graph.
        differentiable: let autograd run through ``step``.
        fused: torch's flag: run our fused kernel (C on the CPU, Triton on CUDA).
        backend: name one backend explicitly instead of the flags: ``"forloop"``, ``"foreach"``,
            ``"cpu"`` (the C kernel) or ``"triton"`` (the Triton kernel; on CPU tensors under
            ``TRITON_INTERPRET=1``).
        state_precision: how the moments are stored: ``"param"`` (the param's dtype, as torch),
            ``"bf16"``, or ``"8bit"`` (blockwise-quantized; params under 4096 values keep float32).
            The math always runs in float32 (float64 for float64 params).
        param_update: how a new bfloat16 param is written: ``"round"`` (to nearest, as torch),
            ``"stochastic"`` (stochastic rounding, unbiased) or ``"kahan"`` (a bfloat16 compensation
            buffer in the state). Lets bfloat16 params train without a float32 master copy; params of
            other dtypes are written as usual.
        seed: seeds stochastic rounding, so runs reproduce (any backend draws the same bits).
        reshardable_state_dict: ``state_dict()`` writes 8-bit moments as float32 tensors shaped like
            their params instead of codes and absmaxes, so that ``torch.distributed.checkpoint``
            can reshard them (loading re-quantizes). Always done for DTensor params (FSDP2), whose
            absmaxes belong to one shard; set it where such a checkpoint is loaded into plain params
            (e.g. a 2-rank FSDP2 checkpoint resumed in one process).

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> opt = adamw.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str | None = None,
        state_precision: str = "param",
        param_update: str = "round",
        seed: int = 0,
        reshardable_state_dict: bool = False,
    ) -> None:
        defaults: dict[str, Any] = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,  # torch.optim.AdamW's groups carry it; keep checkpoints alike
            backend=backend,
            state_precision=state_precision,
            param_update=param_update,
            seed=seed,
        )
        _check_group_options(defaults)
        defaults["betas"] = tuple(_squeeze(b) for b in betas)
        # Each param's number in the order it was added: the stream of its stochastic rounding. Kept
        # apart from param_groups, which step_in_backward narrows to one param while it steps.
        self._streams: dict[Tensor, int] = {}
        super().__init__(params, defaults)
        self.reshardable_state_dict = reshardable_state_dict
        uses_fused_kernel = bool(fused) or backend in FUSED_BACKENDS
        if uses_fused_kernel:
            # GradScaler hands grad_scale/found_inf to step() instead of unscaling the grads itself.
            self._step_supports_amp_scaling = True

    # ----------------------------------------------------------------------------------------------
    # groups and checkpoints

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            options = {**getattr(self, "defaults", {}), **param_group}
            _check_group_options(options)
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._streams.setdefault(p, len(self._streams))

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Called by ``load_state_dict`` (and unpickling) with the groups to install.

        A checkpoint written by ``torch.optim.AdamW`` lacks our own group keys (``backend``): those keep
        the live group's value. This is done here rather than in ``load_state_dict`` because here the
        groups are the ones left after torch's checks and any load_state_dict pre-hook (which may
        rewrite the checkpoint, e.g. merge its groups).
        """
        live_groups = self.__dict__.get("param_groups")  # absent when unpickling
        new_groups = state.get("param_groups", [])
        if live_groups is not None and len(live_groups) == len(new_groups):
            for new, live in zip(new_groups, live_groups, strict=True):
                for key in _OWN_GROUP_KEYS:
                    if key not in new and key in live:
                        new[key] = live[key]
                for key in _STORAGE_GROUP_KEYS:
                    if key in live:
                        new[key] = live[key]
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group["decoupled_weight_decay"] = True
            group.setdefault("backend", None)
            group.setdefault("state_precision", "param")
            group.setdefault("param_update", "round")
            group.setdefault("seed", 0)
            fused = group.setdefault("fused", None)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                    # Checkpoints from old torch versions store the step as a Python number.
                    step_value = float(p_state["step"])
                    on_device = group["capturable"] or group["fused"]
                    p_state["step"] = torch.tensor(
                        step_value, dtype=_scalar_dtype(fused), device=p.device if on_device else "cpu"
                    )

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict; 8-bit moments of DTensor params (and of every param with
        ``reshardable_state_dict``) as float32 tensors shaped and sharded like their params.

        A sharded param's 8-bit blocks are cut from its local shard (see adamw.states.reference),
        so its absmaxes cannot be resharded; decoded, every saved tensor is shaped like its param
        and DCP reshards it. The cost: those moments take 4 bytes per value in the checkpoint
        (against about 1.02 as codes), not in memory.
        """
        state_dict = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        everywhere = getattr(self, "reshardable_state_dict", False)  # absent on an unpickled optimizer
        state_dict["state"] = {
            index: _decode_8bit(state, params[index]) if everywhere or is_dtensor(params[index]) else state
            for index, state in state_dict["state"].items()
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint written by this class (any state format) or by ``torch.optim.AdamW``.

        Each param's state is converted to its live group's ``state_precision`` (and ``param_update``:
        a Kahan buffer is created, or dropped): a torch checkpoint loads into an 8-bit optimizer, and
        an 8-bit checkpoint into a full-precision one. Other options come from the checkpoint, as in torch.
        """
        # torch's loader casts every state tensor to its param's dtype: right for full-precision
        # moments, wrong for 8-bit codes, absmaxes and moments kept in float32 for a bf16 param. So
        # all but the step travel wrapped (torch passes unknown objects through as they are) and
        # are unwrapped below, then converted to the group's format (torch's cast, for "param").
        state_dict = dict(state_dict)
        state_dict["state"] = {k: _wrap_lean_entries(v) for k, v in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    self.state[p] = self._adopt_loaded_state(self.state[p], p, group)

    def _adopt_loaded_state(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = {k: v.tensor.to(p.device) if isinstance(v, _KeepAsIs) else v for k, v in state.items()}
        if "step" in state and _on_device_step(group) and isinstance(state["step"], Tensor):
            state["step"] = state["step"].to(dtype=torch.float32, device=p.device)
        if not any(k in state for k in MOMENTS):
            return state
        if is_dtensor(p):
            # Convert the local shards, in the format the whole param takes (see adamw.states.reference).
            fmt = format_for(p, group["state_precision"])
            local_p = p.to_local()  # type: ignore[attr-defined]
            local = {k: v.to_local() if is_dtensor(v) else v for k, v in state.items()}
            if not _stored_as(local, local_p, group["state_precision"], fmt):
                local = convert_state(local, local_p, group["state_precision"], target=fmt)
            state = {k: like_param(k, v, p) for k, v in local.items()}
        elif not _stored_as(state, p, group["state_precision"]):
            state = convert_state(state, p, group["state_precision"])
        kahan = effective_param_update(p, group["param_update"]) == "kahan"
        if kahan and KAHAN_KEY not in state:
            state[KAHAN_KEY] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif not kahan:
            state.pop(KAHAN_KEY, None)
        return state

    def full_precision_state_dict(self) -> dict[str, Any]:
        """``state_dict()`` with every moment in its param's dtype and only torch's state keys.

        The documented way to write a checkpoint from a bf16 or 8-bit optimizer that
        ``torch.optim.AdamW`` (or a full-precision ``adamw.AdamW``) loads.
        """
        full = self.state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        full["state"] = {
            index: full_precision_state(state, params[index]) if any(k in state for k in MOMENTS) else state
            for index, state in full["state"].items()
        }
        return full

    # ----------------------------------------------------------------------------------------------
    # the step

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        max_exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
    ) -> bool:
        """Collect the group's params that have a grad and their state (created on first use).

        Named and shaped as torch's, so torch.compile runs it once at trace time instead of tracing it.
        Returns whether any param is complex.
        """
        on_device = group["capturable"] or group["fused"] or group["backend"] in FUSED_BACKENDS
        lean = _is_lean(group)
        amsgrad = group["amsgrad"]
        state_of = self.state
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            params.append(p)
            grads.append(grad)
            state = state_of[p]
            if len(state) == 0:
                # The step lives on the CPU unless a kernel or graph capture needs it on the device:
                # reading a CPU scalar costs no device sync and no kernel launch.
                state["step"] = (
                    torch.zeros((), dtype=_scalar_dtype(group["fused"]), device=p.device)
                    if on_device
                    else torch.tensor(0.0, dtype=_scalar_dtype(None), device="cpu")
                )
                if lean:
                    state.update(
                        init_lean_state(
                            p,
                            amsgrad=amsgrad,
                            state_precision=group["state_precision"],
                            param_update=effective_param_update(p, group["param_update"]),
                        )
                    )
                    continue
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if lean:
                continue
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if amsgrad:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            state_steps.append(state["step"])
        # One check per dtype, not per param: a group of 1000 params has one or two dtypes.
        has_complex = any(dtype.is_complex for dtype in set(map(_dtype_of, params)))
        return has_complex

    @_use_grad_for_differentiable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        self._accelerator_graph_capture_health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not torch.compiler.is_compiling():
            # Every check runs before anything changes: a rejected step leaves params and state as they were.
            self._check_step_inputs()

        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            max_exp_avg_sqs: list[Tensor] = []
            state_steps: list[Tensor] = []
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
            beta1, beta2 = group["betas"]
            if _is_lean(group):
                self._lean_step(group, params, grads)
                continue
            adamw(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                max_exp_avg_sqs,
                state_steps,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                amsgrad=group["amsgrad"],
                maximize=group["maximize"],
                foreach=group["foreach"],
                fused=group["fused"],
                capturable=group["capturable"],
                differentiable=group["differentiable"],
                has_complex=has_complex,
                grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None),
                backend=group["backend"],
            )
        return loss

    def _lean_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        # The param's number in the optimizer keys its stochastic rounding: stable across steps and
        # checkpoints, and distinct for every param.
        if not hasattr(self, "_streams"):  # unpickled from a pickle that predates it
            self._streams = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        beta1, beta2 = group["betas"]
        # DTensor params (FSDP2) step their local shards in the torch-ops reference, whatever the
        # backend: the lean kernels take plain tensors, and the 4096-value rule needs the whole param.
        sharded = [is_dtensor(p) for p in params]
        if any(sharded) and not all(sharded):
            for want in (False, True):
                subset = [i for i, s in enumerate(sharded) if s == want]
                self._lean_step(group, [params[i] for i in subset], [grads[i] for i in subset])
            return
        if params and all(sharded):
            group = {**group, "backend": "forloop", "foreach": None, "fused": None}
        adamw_lean(
            params,
            grads,
            [self.state[p] for p in params],
            [self.state[p]["step"] for p in params],
            [self._streams[p] for p in params],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            foreach=group["foreach"],
            fused=group["fused"],
            backend=group["backend"],
            state_precision=group["state_precision"],
            param_update=group["param_update"],
            seed=group["seed"],
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
        )

    def _check_step_inputs(self) -> None:
        """Raise, before any change, for whatever would make some group's step fail."""
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if any(map(_is_sparse, map(_grad_of, params))):
                raise RuntimeError(
                    "AdamW does not support sparse gradients, please consider SparseAdam instead "
                    f"(param group {index} has a sparse grad)"
                )
            if not params:
                continue
            if _is_lean(group):
                continue  # the lean path takes any float dtype on any device; options were checked at construction
            backend = select_backend(
                params,
                backend=group["backend"],
                foreach=group["foreach"],
                fused=group["fused"],
                differentiable=group["differentiable"],
                capturable=group["capturable"],
                lr=group["lr"],
            )
            lr_is_tensor = isinstance(group["lr"], Tensor)
            if backend == "foreach" and lr_is_tensor and not group["capturable"]:
                raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")
            if backend == "foreach" and not group["capturable"]:
                # torch's foreach path raises ValueError for Tensor betas, but only mid-step; we raise first.
                for i, beta in enumerate(group["betas"]):
                    if isinstance(beta, Tensor):
                        raise ValueError(
                            f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True"
                        )
            if backend == "foreach" and group["differentiable"]:
                # AssertionError is torch's type here (its foreach path asserts); raised before any change,
                # where torch has already created state and stepped earlier groups.
                raise AssertionError("_foreach ops don't support autograd (foreach with differentiable=True)")
            if backend in FUSED_BACKENDS:
                _check_fused_params(params, backend, group)
            if group["capturable"] and backend not in FUSED_BACKENDS:
                supported = capturable_devices()
                for p in params:
                    step = self.state[p].get("step") if p in self.state else None
                    step_device = step.device.type if isinstance(step, Tensor) else p.device.type
                    if p.device.type not in supported or step_device != p.device.type:
                        raise AssertionError(
                            "If capturable=True, params and state_steps must be on supported devices: "
                            f"{supported}; got a param on {p.device.type} with its step on {step_device}"
                        )
            if group["differentiable"]:
                for p in params:
                    step = self.state.get(p, {}).get("step")
                    if isinstance(step, Tensor) and step.requires_grad:
                        raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
            # Import the backend's module last (after the checks torch also makes): a missing optional
            # backend must fail here, not after earlier groups were stepped or state was created.
            backend_step(backend)


def _check_fused_params(params: list[Tensor], backend: str, group: dict[str, Any]) -> None:
    if group["differentiable"]:
        raise RuntimeError("`fused` does not support `differentiable`")
    # A group on the CPU alone is checked once per dtype present (a thousand params have one or two),
    # any other param by param.
    if all(map(_is_cpu, params)):
        firsts = reversed(params)  # so that each dtype keeps its first param
        by_dtype = dict(zip(map(_dtype_of, firsts), reversed(params), strict=True))
        params = [by_dtype[dtype] for dtype in sorted(by_dtype, key=str)]
    for p in params:
        allowed = _FUSED_DTYPES.get(p.device.type, ())
        if backend == "triton" and p.device.type == "cpu":
            allowed = _FUSED_DTYPES["cuda"]  # the Triton interpreter runs CPU tensors
        if p.dtype not in allowed:
            raise RuntimeError(
                "`fused=True` requires all the params to be floating point Tensors of supported "
                f"devices and dtypes: {{'cpu', 'cuda'}} x {[str(d) for d in _FUSED_DTYPES['cpu']]}, "
                f"but got {p.dtype} on {p.device.type}"
            )
        if p.device != params[0].device and backend == "cpu":
            raise RuntimeError("`fused=True` on the CPU needs every param of a group on the CPU")


def _is_lean(group: dict[str, Any]) -> bool:
    """Whether the group stores state or writes params other than torch's way."""
    return group["state_precision"] != "param" or group["param_update"] != "round"


def _stored_as(state: dict[str, Any], p: Tensor, state_precision: str, fmt: StateFormat | None = None) -> bool:
    """Whether every moment in ``state`` is stored as ``state_precision`` (or ``fmt``) stores it for ``p``."""
    meta = torch.empty_like(p, device="meta")
    fmt = fmt or format_for(meta, state_precision)
    for key in MOMENTS:
        if key not in state:
            continue
        stored_format(state, key, p)  # raises for an incomplete 8-bit entry
        for name, expected in fmt.zeros(meta, key).items():
            value = state.get(name)
            if not isinstance(value, Tensor) or value.dtype != expected.dtype or value.shape != expected.shape:
                return False
    return True


def _decode_8bit(state: dict[str, Any], p: Tensor) -> dict[str, Any]:
    """``state`` (a new dict) with its 8-bit moments decoded to the compute dtype, shaped (and, for a
    DTensor, sharded) like ``p``; other entries as they are."""
    if not any(k + ABSMAX_SUFFIX in state for k in MOMENTS):
        return state
    out = dict(state)
    for key in MOMENTS:
        if key + ABSMAX_SUFFIX not in state:
            continue
        codes = state[key].to_local() if is_dtensor(state[key]) else state[key]
        value = INT8.decode({key: codes, key + ABSMAX_SUFFIX: out.pop(key + ABSMAX_SUFFIX)}, key, compute_dtype(p))
        out[key] = like_param(key, value, p)
    return out


def _on_device_step(group: dict[str, Any]) -> bool:
    """Whether the group's step counters live on the param's device (capturable or a fused kernel)."""
    return bool(group["capturable"] or group["fused"] or group["backend"] in FUSED_BACKENDS)


class _KeepAsIs:
    """A state tensor that torch's loader must not cast to its param's dtype (see load_state_dict)."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


def _wrap_lean_entries(state: Any) -> Any:
    if not isinstance(state, dict):
        return state
    return {k: _KeepAsIs(v) if k != "step" and isinstance(v, Tensor) else v for k, v in state.items()}


def _check_group_options(options: dict[str, Any]) -> None:
    """Validate one group's options; messages name the argument and what it accepts (torch's wording first)."""
    lr, betas, eps, weight_decay = options["lr"], options["betas"], options["eps"], options["weight_decay"]
    foreach, fused, capturable = options["foreach"], options["fused"], options["capturable"]
    differentiable, backend = options["differentiable"], options.get("backend")
    # backend="foreach" is foreach=True by name: the same Tensor lr/betas limits apply at construction
    # (otherwise a Tensor beta only failed inside the step, after state was created).
    runs_foreach = bool(foreach) or backend == "foreach"
    if isinstance(lr, Tensor):
        if runs_foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
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
    for i in (0, 1):
        if isinstance(betas[i], Tensor):
            if not capturable and runs_foreach:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
            if betas[i].numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    state_precision = options.get("state_precision", "param")
    param_update = options.get("param_update", "round")
    if state_precision not in STATE_PRECISIONS:
        raise ValueError(f"state_precision must be one of {list(STATE_PRECISIONS)}, but got {state_precision!r}")
    if param_update not in PARAM_UPDATES:
        raise ValueError(f"param_update must be one of {list(PARAM_UPDATES)}, but got {param_update!r}")
    if not isinstance(options.get("seed", 0), int):
        raise ValueError(f"seed must be an int, but got {options.get('seed')!r}")
    if state_precision != "param" or param_update != "round":
        lean = f"state_precision={state_precision!r}, param_update={param_update!r}"
        if differentiable:
            raise ValueError(
                f"{lean} does not support differentiable=True (use state_precision='param', param_update='round')"
            )
        if capturable:
            raise ValueError(
                f"{lean} does not support capturable=True (use state_precision='param', param_update='round')"
            )
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)} or None, but got {backend!r}")
        if foreach is not None or fused is not None:
            raise ValueError(f"backend={backend!r} names the implementation: leave foreach and fused unset (None)")
        if backend in FUSED_BACKENDS and differentiable:
            raise RuntimeError(f"backend={backend!r} (a fused kernel) does not support `differentiable`")


def _squeeze(x: float | Tensor) -> float | Tensor:
    return x.squeeze() if isinstance(x, Tensor) and x.dim() != 0 else x
