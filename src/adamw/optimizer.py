"""``adamw.AdamW``: a drop-in ``torch.optim.AdamW``. Bookkeeping only: validation, groups, state.

The math lives in :mod:`adamw._math`, the choice of backend in :mod:`adamw.functional`, checkpoint
conversion in :mod:`adamw.states.checkpoint`. The state layout (``step``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``) and param-group keys are torch's, so checkpoints move between the two classes in
both directions (an 8-bit one through ``full_precision_state_dict()``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT, _use_grad_for_differentiable

from .backends._common import capturable_devices, run_eagerly
from .backends.lean import effective_param_update
from .functional import (
    BACKENDS,
    FUSED_BACKENDS,
    adamw,
    adamw_lean,
    backend_step,
    check_kernel,
    select_backend,
)
from .states import (
    PARAM_UPDATES,
    STATE_PRECISIONS,
    full_precision_state,
    init_lean_state,
)
from .states.checkpoint import (
    OWN_GROUP_DEFAULTS,
    adopt_state,
    from_checkpoint,
    shield_from_cast,
    to_checkpoint,
)
from .states.formats import MOMENTS
from .states.reference import is_dtensor

# Keys that exist in our param groups but not in torch's: a state dict carries them only where they
# differ from their defaults (so that one of default options is torch's), and a checkpoint without
# them (torch's, or ours at the defaults) keeps the live group's values.
_OWN_GROUP_KEYS = ("backend", "seed")
# How state is stored is this run's memory decision, not the checkpoint's: these always keep the live
# group's value, and a loaded state is converted to them.
_STORAGE_GROUP_KEYS = ("state_precision", "param_update")

# dtypes each fused kernel handles, by device type.
_dtype_of = attrgetter("dtype")
_is_cpu = attrgetter("is_cpu")
_grad_of = attrgetter("grad")
_is_sparse = attrgetter("is_sparse")
_PLAIN_TYPES = frozenset((Tensor, torch.nn.Parameter))

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
            other dtypes are written as usual. Both may be set in a live param group: the next step
            converts that group's state first, as ``load_state_dict`` does.
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
        # Each group's (group, state_precision, param_update) as its state was last stored, by id:
        # step() compares them with the group's options to convert a state whose format was changed.
        self._formats: dict[int, tuple[dict[str, Any], str, str]] = {}
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
        self._remember_format(self.param_groups[-1])

    def __getstate__(self) -> dict[str, Any]:
        """torch's optimizer state (defaults, state, groups), plus our public options: what a copy or
        pickle needs to act as this optimizer does."""
        return {**super().__getstate__(), "reshardable_state_dict": self.reshardable_state_dict}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Called by ``load_state_dict`` with the groups and state to install, and by unpickling.

        On a load, everything that can fail runs before anything is installed: a rejected checkpoint
        leaves the optimizer as it was. This is done here rather than in ``load_state_dict`` because
        here the groups are the ones left after torch's checks and any load_state_dict pre-hook
        (which may rewrite the checkpoint, e.g. merge its groups). A checkpoint without our own group
        keys (``backend``, ``seed``: torch's, or ours at their defaults) keeps the live group's values;
        ``state_precision``/``param_update`` always keep the live group's, and each param's state is
        converted to them.
        """
        live_groups = self.__dict__.get("param_groups")  # absent when unpickling
        if live_groups is not None:
            state = self._prepare_load(state, live_groups)
        super().__setstate__(state)
        self.__dict__.setdefault("reshardable_state_dict", False)
        for group in self.param_groups:
            _complete_group(group)
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state:
                    _upgrade_number_step(p_state, p, group)
        self._formats = {}
        for group in self.param_groups:
            self._remember_format(group)

    def _remember_format(self, group: dict[str, Any]) -> None:
        self._formats[id(group)] = (group, group["state_precision"], group["param_update"])

    def _prepare_load(self, state: dict[str, Any], live_groups: list[dict[str, Any]]) -> dict[str, Any]:
        """The groups and state that ``load_state_dict`` installs: the checkpoint's groups (with our
        own keys from the live ones) and each param's state read and converted to its group's format.
        Raises (ValueError) before anything is installed."""
        new_groups = state.get("param_groups", [])
        if len(live_groups) == len(new_groups):
            for new, live in zip(new_groups, live_groups, strict=True):
                for key in _OWN_GROUP_KEYS:
                    if key not in new and key in live:
                        new[key] = live[key]
                for key in _STORAGE_GROUP_KEYS:
                    if key in live:
                        new[key] = live[key]
        loaded = state.get("state", {})
        adopted = {}
        index = 0
        for group in new_groups:
            _complete_group(group)
            for p in group["params"]:
                entry = loaded.get(p)
                if isinstance(entry, dict):
                    try:
                        p_state = from_checkpoint(entry, p)
                        _upgrade_number_step(p_state, p, group)
                        adopted[p] = _adopt(p_state, p, group)
                    except ValueError as exc:
                        raise ValueError(f"cannot load the state of param {index}: {exc}") from exc
                index += 1
        new_state: defaultdict[Any, Any] = defaultdict(dict, loaded)  # with the entries of no param
        new_state.update(adopted)
        return {**state, "state": new_state, "param_groups": new_groups}

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict. Options of ours are written only where they differ from their defaults,
        so that with default options it is key for key what ``torch.optim.AdamW`` writes.

        8-bit codes are written under ``exp_avg_codes`` (and so on) beside their absmaxes, so that
        ``torch.optim.AdamW`` fails on such a checkpoint instead of reading the codes as moments
        (:mod:`adamw.states.checkpoint`); ``full_precision_state_dict()`` writes one torch can load.
        The 8-bit moments of DTensor params (and of every param with ``reshardable_state_dict``) are
        written as float32 tensors shaped and sharded like their params: a sharded param's 8-bit
        blocks are cut from its local shard (see adamw.states.reference), so its absmaxes cannot be
        resharded; decoded, every saved tensor is shaped like its param and DCP reshards it. The cost:
        those moments take 4 bytes per value in the checkpoint (against about 1.02 as codes), not in
        memory. State-dict post-hooks see the state dict as written.
        """
        handle = self.register_state_dict_post_hook(_write_checkpoint_layout, prepend=True)
        try:
            return super().state_dict()
        finally:
            handle.remove()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint written by this class (any state format) or by ``torch.optim.AdamW``.

        Each param's state is converted to its live group's ``state_precision`` (and ``param_update``:
        a Kahan buffer is created, or dropped): a torch checkpoint loads into an 8-bit optimizer, and
        an 8-bit checkpoint into a full-precision one. Other options come from the checkpoint, as in torch.
        A checkpoint that cannot be loaded raises before anything changes. Load-state-dict pre-hooks
        see the checkpoint as given, post-hooks the state as installed.
        """
        # torch's loader casts every state tensor to its param's dtype: right for full-precision
        # moments, wrong for 8-bit codes, absmaxes and moments kept in float32 for a bf16 param. So,
        # after every pre-hook, all but the step travel wrapped through it (see shield_from_cast) and
        # are unwrapped and converted to the group's format in __setstate__.
        handle = self.register_load_state_dict_pre_hook(_shield_from_cast)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()

    def full_precision_state_dict(self) -> dict[str, Any]:
        """``state_dict()`` with every moment in its param's dtype and only torch's state keys.

        The documented way to write a checkpoint from a bf16 or 8-bit optimizer that
        ``torch.optim.AdamW`` (or a full-precision ``adamw.AdamW``) loads.
        """
        full = self.state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        state = {}
        for index, entry in full["state"].items():
            p = _param_at(params, index)
            if p is not None and isinstance(entry, dict):
                entry = from_checkpoint(entry, p)
                if any(k in entry for k in MOMENTS):
                    entry = full_precision_state(entry, p)
            state[index] = entry
        return {**full, "state": state}

    # ----------------------------------------------------------------------------------------------
    # the step

    # As torch does for its own optimizers: called from eager code (a step that torch.compile left to
    # eager mode around a fused kernel), _init_group runs as it is, instead of being compiled once per
    # optimizer (its guards name this optimizer's objects) up to Dynamo's recompile limit. A traced
    # step still runs it once at trace time (Dynamo's optimizer support calls it by name).
    @run_eagerly
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
            if state and "exp_avg" not in state:
                # A checkpoint's entry put in as it is, by a loader that is not ours
                # (ZeroRedundancyOptimizer.load_state_dict copies each entry into ``state``).
                state = state_of[p] = _adopt(from_checkpoint(state, p), p, group)
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
        has_complex = any(dtype.is_complex for dtype in {p.dtype for p in params})
        return has_complex

    def _convert_changed_formats(self) -> None:
        """Convert the state of each group whose ``state_precision``/``param_update`` was set since its
        state was stored (``opt.param_groups[0]["state_precision"] = "8bit"``), as loading a checkpoint
        does; an invalid value raises before any change. A group is one comparison with the format
        remembered for it; a group the optimizer does not know (step_in_backward's one-param view of
        a group) has its params' states checked instead, and is not remembered."""
        formats = self._formats
        changed = []
        for index, group in enumerate(self.param_groups):
            known = formats.get(id(group))
            if (
                known is None
                or known[0] is not group
                or known[1] != group["state_precision"]
                or known[2] != group["param_update"]
            ):
                changed.append((index, group))
        if not changed:
            return
        for index, group in changed:
            try:
                _check_storage_options(group)
            except ValueError as exc:
                raise ValueError(f"param group {index}: {exc}") from exc
        converted = {}
        for index, group in changed:
            for position, p in enumerate(group["params"]):
                state = self.state.get(p)
                if state:
                    try:
                        new = _adopt(state, p, group)
                    except ValueError as exc:
                        raise ValueError(
                            f"param group {index}: cannot convert the state of its param {position}: {exc}"
                        ) from exc
                    if new is not state:
                        converted[p] = new
        self.state.update(converted)
        for _, group in changed:
            known = formats.get(id(group))
            if known is not None and known[0] is group:
                self._remember_format(group)

    @_use_grad_for_differentiable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        self._accelerator_graph_capture_health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not torch.compiler.is_compiling():
            # Every check runs before anything changes: a rejected step leaves params and state as they
            # were. A group's state converted to its changed format is replaced whole or not at all.
            self._check_step_inputs()
            self._convert_changed_formats()

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

    @run_eagerly
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

    @run_eagerly
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
            _check_grad_dtypes(params, index)
            if _is_lean(group):
                _check_lean_group(params, group)
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
            # Import the backend's module and load its kernel last (after the checks torch also makes):
            # a missing compiler or Triton must fail here, not after earlier groups were stepped or
            # state was created.
            backend_step(backend)
            if backend in FUSED_BACKENDS:
                check_kernel(backend, params, lean=False)


def _check_grad_dtypes(params: list[Tensor], index: int) -> None:
    """Every backend computes a param's update from a grad of its own dtype. torch raises for any
    other grad only mid-step (state created, earlier groups stepped); the lean kernels would take it."""
    grads = list(map(_grad_of, params))
    if list(map(_dtype_of, grads)) == list(map(_dtype_of, params)):
        return
    p, grad = next((p, g) for p, g in zip(params, grads, strict=True) if g.dtype != p.dtype)
    raise RuntimeError(
        f"expected each grad to have its param's dtype, but param group {index} has a {p.dtype} param "
        f"with a {grad.dtype} grad (give it a {p.dtype} grad)"
    )


def _check_lean_group(params: list[Tensor], group: dict[str, Any]) -> None:
    """What a lean group's step needs beyond the options checked at construction: its fused backend's
    lean kernel, for the params it runs (DTensors run the torch-ops reference: see ``_lean_step``)."""
    backend = select_backend(
        params,
        backend=group["backend"],
        foreach=group["foreach"],
        fused=group["fused"],
        differentiable=False,
        capturable=False,
        lr=group["lr"],
    )
    if backend not in FUSED_BACKENDS:
        return
    if not set(map(type, params)) <= _PLAIN_TYPES:
        params = [p for p in params if not is_dtensor(p)]
    if params:
        check_kernel(backend, params, lean=True)


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


def _on_device_step(group: dict[str, Any]) -> bool:
    """Whether the group's step counters live on the param's device (capturable or a fused kernel)."""
    return bool(group["capturable"] or group["fused"] or group["backend"] in FUSED_BACKENDS)


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
    _check_storage_options(options)
    if not isinstance(options.get("seed", 0), int):
        raise ValueError(f"seed must be an int, but got {options.get('seed')!r}")
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)} or None, but got {backend!r}")
        if foreach is not None or fused is not None:
            raise ValueError(f"backend={backend!r} names the implementation: leave foreach and fused unset (None)")
        if backend in FUSED_BACKENDS and differentiable:
            raise RuntimeError(f"backend={backend!r} (a fused kernel) does not support `differentiable`")


def _check_storage_options(options: dict[str, Any]) -> None:
    """Validate ``state_precision``/``param_update``: at construction, and when set in a live group."""
    state_precision = options.get("state_precision", "param")
    param_update = options.get("param_update", "round")
    if state_precision not in STATE_PRECISIONS:
        raise ValueError(f"state_precision must be one of {list(STATE_PRECISIONS)}, but got {state_precision!r}")
    if param_update not in PARAM_UPDATES:
        raise ValueError(f"param_update must be one of {list(PARAM_UPDATES)}, but got {param_update!r}")
    if state_precision != "param" or param_update != "round":
        lean = f"state_precision={state_precision!r}, param_update={param_update!r}"
        if options.get("differentiable"):
            raise ValueError(
                f"{lean} does not support differentiable=True (use state_precision='param', param_update='round')"
            )
        if options.get("capturable"):
            raise ValueError(
                f"{lean} does not support capturable=True (use state_precision='param', param_update='round')"
            )


def _complete_group(group: dict[str, Any]) -> None:
    """Fill the options a checkpoint may lack (older torch's, or ours at their defaults) with defaults."""
    for key, default in (
        ("amsgrad", False),
        ("maximize", False),
        ("foreach", None),
        ("capturable", False),
        ("differentiable", False),
        ("fused", None),
        *OWN_GROUP_DEFAULTS.items(),
    ):
        group.setdefault(key, default)
    group["decoupled_weight_decay"] = True


def _upgrade_number_step(state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
    """Checkpoints from old torch versions store the step as a Python number: make it torch's tensor."""
    step = state.get("step")
    if step is not None and not torch.is_tensor(step):
        on_device = group["capturable"] or group["fused"]
        state["step"] = torch.tensor(
            float(step), dtype=_scalar_dtype(group["fused"]), device=p.device if on_device else "cpu"
        )


def _adopt(state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    """``state`` in the format ``group`` keeps it in (see adamw.states.checkpoint.adopt_state)."""
    return adopt_state(
        state,
        p,
        group["state_precision"],
        kahan=effective_param_update(p, group["param_update"]) == "kahan",
        step_on_device=_on_device_step(group),
    )


def _param_at(params: list[Tensor], index: Any) -> Tensor | None:
    """The param a state dict's ``state`` key stands for; None for an entry of no param (torch keeps
    entries that a hook put in ``optimizer.state`` under their own keys)."""
    return params[index] if type(index) is int and 0 <= index < len(params) else None


def _at_default(key: str, value: Any) -> bool:
    default = OWN_GROUP_DEFAULTS[key]
    return value is None if default is None else type(value) is type(default) and value == default


def _write_checkpoint_layout(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """State-dict post-hook, run first: each param's state as a checkpoint holds it, and our own group
    options only where they differ from their defaults (see AdamW.state_dict)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    everywhere = getattr(optimizer, "reshardable_state_dict", False)
    state = {}
    for index, entry in state_dict["state"].items():
        p = _param_at(params, index)
        if p is not None and isinstance(entry, dict):
            entry = to_checkpoint(entry, p, decode_8bit=everywhere or is_dtensor(p))
        state[index] = entry
    groups = [
        {k: v for k, v in group.items() if not (k in OWN_GROUP_DEFAULTS and _at_default(k, v))}
        for group in state_dict["param_groups"]
    ]
    return {**state_dict, "state": state, "param_groups": groups}


def _shield_from_cast(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Load-state-dict pre-hook, run last (see AdamW.load_state_dict)."""
    return shield_from_cast(state_dict)


def _squeeze(x: float | Tensor) -> float | Tensor:
    return x.squeeze() if isinstance(x, Tensor) and x.dim() != 0 else x
