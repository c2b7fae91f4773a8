"""``adamw.AdamW``: a drop-in ``torch.optim.AdamW``. Bookkeeping only: groups, state, torch's hooks.

The math lives in :mod:`adamw._math`, the choice of backend in :mod:`adamw.functional`, the rules on
options in :mod:`adamw.options`, the state's creation, conversion and checkpoint layout in
:mod:`adamw.states.checkpoint`. The state layout (``step``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``) and param-group keys are torch's, so checkpoints move between the two classes in
both directions (an 8-bit one through ``full_precision_state_dict()``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT, _use_grad_for_differentiable

from .backends._common import run_eagerly
from .functional import adamw, check_kernel, select_backend
from .options import (
    FUSED_BACKENDS,
    AdamWOptions,
    check_group_options,
    check_group_step,
    check_storage_options,
    is_low_bit,
    stepped_params,
)
from .states.checkpoint import (
    adopt_for_group,
    adopt_groups,
    complete_group,
    from_checkpoint,
    full_precision_state_dict,
    new_state,
    prepare_load,
    shield_from_cast,
    upgrade_number_step,
    write_checkpoint_layout,
)


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
        # Built as an AdamWOptions so that mypy checks the TypedDict's keys and types against this
        # signature (a test checks that it names every keyword).
        options = AdamWOptions(
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
            backend=backend,
            state_precision=state_precision,
            param_update=param_update,
            seed=seed,
        )
        check_group_options(options)
        defaults: dict[str, Any] = {
            **options,
            "betas": tuple(b.squeeze() if isinstance(b, Tensor) and b.dim() != 0 else b for b in betas),
            "decoupled_weight_decay": True,  # torch.optim.AdamW's groups carry it; keep checkpoints alike
        }
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
            check_group_options({**getattr(self, "defaults", {}), **param_group})
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
            state = prepare_load(state, live_groups)
        super().__setstate__(state)
        self.__dict__.setdefault("reshardable_state_dict", False)
        for group in self.param_groups:
            complete_group(group)
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state:
                    upgrade_number_step(p_state, p, group)
        self._formats = {}
        for group in self.param_groups:
            self._remember_format(group)

    def _remember_format(self, group: dict[str, Any]) -> None:
        self._formats[id(group)] = (group, group["state_precision"], group["param_update"])

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
        handle = self.register_state_dict_post_hook(write_checkpoint_layout, prepend=True)
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
        handle = self.register_load_state_dict_pre_hook(shield_from_cast)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()

    def full_precision_state_dict(self) -> dict[str, Any]:
        """``state_dict()`` with every moment in its param's dtype and only torch's state keys.

        The documented way to write a checkpoint from a bf16 or 8-bit optimizer that
        ``torch.optim.AdamW`` (or a full-precision ``adamw.AdamW``) loads.
        """
        return full_precision_state_dict(self.state_dict(), [p for g in self.param_groups for p in g["params"]])

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
        low_bit = is_low_bit(group)
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
                state = state_of[p] = adopt_for_group(from_checkpoint(state, p), p, group)
            if len(state) == 0:
                state = state_of[p] = new_state(p, group)
            if low_bit:
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
        # One plain loop, no helper or comprehension: torch.compile compiles this method per optimizer,
        # and each of those would be one more compiled frame (tests/test_integrations.py counts them).
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
                check_storage_options(group)
            except ValueError as exc:
                raise ValueError(f"param group {index}: {exc}") from exc
        self.state.update(adopt_groups(changed, self.state))
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
            if is_low_bit(group):
                self._low_bit_step(group, params, grads)
                continue
            beta1, beta2 = group["betas"]
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

    # Eager, as functional._run_low_bit is (the low-bit steps' host work cannot be traced): a traced
    # lookup of the params' state dicts and streams would guard the compiled step on this optimizer's
    # objects, and compile it once per optimizer.
    @run_eagerly
    def _low_bit_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """The step of a group in a low-bit format, whose moments live in the params' state dicts."""
        # The param's number in the optimizer keys its stochastic rounding: stable across steps and
        # checkpoints, and distinct for every param.
        if not hasattr(self, "_streams"):  # unpickled from a pickle that predates it
            self._streams = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(
            params,
            grads,
            [],
            [],
            [],
            [state["step"] for state in states],
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
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
            backend=group["backend"],
            state_precision=group["state_precision"],
            param_update=group["param_update"],
            seed=group["seed"],
            states=states,
            streams=[self._streams[p] for p in params],
        )

    @run_eagerly
    def _check_step_inputs(self) -> None:
        """Raise, before any change, for whatever would make some group's step fail: the rules of
        :mod:`adamw.options`, then each group's backend is imported and its kernel loaded (after the
        checks torch also makes), so that a missing compiler or Triton fails here, not after earlier
        groups were stepped or state was created."""
        for index, group in enumerate(self.param_groups):
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
            if is_low_bit(group):
                check_kernel(backend, params, low_bit=True)
                continue
            check_group_step(params, group, backend, self.state)
            check_kernel(backend, params, low_bit=False)
