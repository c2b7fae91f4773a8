"""``adamw.AdamW``: a drop-in ``torch.optim.AdamW``. Bookkeeping only: groups, state, torch's hooks.

The math lives in :mod:`adamw._math`, the choice of backend in :mod:`adamw.functional`, the rules on
options in :mod:`adamw.options`, the state's creation, conversion and checkpoint layout (torch's
state and param-group keys) in :mod:`adamw.states.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import itemgetter
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT, _use_grad_for_differentiable

from .backends._common import dtype_of, grad_of, run_eagerly
from .functional import adamw, check_step
from .options import FUSED_BACKENDS, AdamWOptions, check_group_options, is_low_bit
from .states import checkpoint

_exp_avg_of, _exp_avg_sq_of = itemgetter("exp_avg"), itemgetter("exp_avg_sq")
_max_exp_avg_sq_of, _step_of = itemgetter("max_exp_avg_sq"), itemgetter("step")


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
        betas: decay rates of the two moment averages, both floats or both 1-element Tensors.
        eps: added to the denominator after the bias-corrected root (default 1e-8).
        weight_decay: decoupled weight decay coefficient (default 1e-2).
        amsgrad: use the maximum of past second moments (AMSGrad).
        maximize: maximize the objective instead of minimizing it.
        foreach: torch's flag: run the foreach backend (None: on CUDA only).
        capturable: keep step counters on the device and never sync with the host (CUDA graphs).
        differentiable: let autograd run through ``step``.
        fused: torch's flag: run our fused kernel (C on the CPU, Triton on CUDA).
        backend: one backend by name instead of the flags: ``"forloop"``, ``"foreach"``, ``"cpu"``
            (the C kernel) or ``"triton"`` (on CPU tensors under ``TRITON_INTERPRET=1``).
        state_precision: how the moments are stored: ``"param"`` (the param's dtype, as torch),
            ``"bf16"``, ``"8bit"`` or ``"4bit"`` (blockwise-quantized; params under 4096 values keep
            float32). The math always runs in float32 (float64 for float64 params).
        param_update: how a new bfloat16 param is written: ``"round"`` (to nearest, as torch),
            ``"stochastic"`` (unbiased stochastic rounding) or ``"kahan"`` (a bfloat16 compensation
            buffer in the state): bfloat16 params train without a float32 master copy. Both options
            may be changed in a live param group: the next step converts that group's state first.
        seed: seeds stochastic rounding, so runs reproduce (any backend draws the same bits).
        reshardable_state_dict: ``state_dict()`` writes 8-bit and 4-bit moments decoded, in float32,
            so that ``torch.distributed.checkpoint`` can reshard them (always done for DTensor
            params, whose absmaxes belong to one shard).

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
        options = AdamWOptions(  # so that mypy holds AdamWOptions to this signature
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
        # What step() compares with each group's options to convert a state whose format was changed.
        self._formats = checkpoint.StoredFormats()
        super().__init__(params, defaults)
        self.reshardable_state_dict = reshardable_state_dict
        if bool(fused) or backend in FUSED_BACKENDS:
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
        self._formats.remember(self.param_groups[-1])

    def __getstate__(self) -> dict[str, Any]:
        """torch's optimizer state plus our public options: what a copy or pickle needs."""
        return {**super().__getstate__(), "reshardable_state_dict": self.reshardable_state_dict}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Called by unpickling, and by ``load_state_dict`` after every pre-hook: everything that can
        fail then runs before anything is installed (``prepare_load``)."""
        live_groups = self.__dict__.get("param_groups")  # absent when unpickling
        if live_groups is not None:
            state = checkpoint.prepare_load(state, live_groups)
        super().__setstate__(state)
        self.__dict__.setdefault("reshardable_state_dict", False)
        for group in self.param_groups:
            checkpoint.complete_group(group)
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state:
                    checkpoint.upgrade_number_step(p_state, p, group)
        if "_streams" not in self.__dict__:  # unpickled: __getstate__ holds torch's state only
            self._streams = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        self._formats = checkpoint.StoredFormats(self.param_groups)

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict; with default options, key for key what ``torch.optim.AdamW`` writes.

        8-bit codes are written under ``exp_avg_codes`` (and so on), which ``torch.optim.AdamW``
        refuses; ``full_precision_state_dict()`` writes a checkpoint torch loads. The 8-bit moments of
        DTensor params (of every param with ``reshardable_state_dict``) are written decoded, in
        float32, so that DCP can reshard them. Post-hooks see the state dict as written.
        """
        with self.register_state_dict_post_hook(checkpoint.write_checkpoint_layout, prepend=True):
            return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint written by this class (any state format) or by ``torch.optim.AdamW``.

        Each param's state is converted to its live group's ``state_precision`` and ``param_update``;
        other options come from the checkpoint, as in torch. A checkpoint that cannot be loaded raises
        before anything changes. Pre-hooks see the checkpoint as given, post-hooks the state as installed.
        """
        # torch's loader casts every state tensor to its param's dtype, which 8-bit codes and float32
        # moments of a bf16 param must escape: see shield_from_cast, run after every pre-hook.
        with self.register_load_state_dict_pre_hook(checkpoint.shield_from_cast):
            super().load_state_dict(state_dict)

    def full_precision_state_dict(self) -> dict[str, Any]:
        """``state_dict()`` with every moment in its param's dtype and only torch's state keys: the
        checkpoint of a bf16 or 8-bit optimizer that ``torch.optim.AdamW`` loads."""
        params = [p for g in self.param_groups for p in g["params"]]
        return checkpoint.full_precision_state_dict(self.state_dict(), params)

    # ----------------------------------------------------------------------------------------------
    # the step

    # Eager, as torch's own (see run_eagerly). Dynamo's optimizer support calls it by torch's name, with
    # torch's signature, once at trace time.
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
        """Collect the group's params that have a grad and their state (created on first use); return
        whether any param is complex."""
        with_grad = [p for p in group["params"] if p.grad is not None]
        states = list(map(self.state.__getitem__, with_grad))  # the state dict creates a missing entry
        try:  # every state made already (the steady state): the lists in C-level passes over the group
            found_exp_avgs = list(map(_exp_avg_of, states))
        except KeyError:  # some state to make, or a checkpoint's entry to adopt: param by param
            self._make_states(group, with_grad, states)
            found_exp_avgs = list(map(_exp_avg_of, states))
        params += with_grad
        grads += map(grad_of, with_grad)
        exp_avgs += found_exp_avgs
        exp_avg_sqs += map(_exp_avg_sq_of, states)
        if group["amsgrad"]:
            max_exp_avg_sqs += map(_max_exp_avg_sq_of, states)
        state_steps += map(_step_of, states)
        # One check per dtype, not per param: a group of 1000 params has one or two dtypes.
        return any(dtype.is_complex for dtype in set(map(dtype_of, params)))

    def _make_states(self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]]) -> None:
        """The state of each of ``params`` made where it is empty, or adopted where it is a
        checkpoint's entry put in as it is, by a loader that is not ours (ZeroRedundancyOptimizer's
        load_state_dict copies each entry into ``state``); ``states`` updated in place."""
        for i, (p, state) in enumerate(zip(params, states, strict=True)):
            if state and "exp_avg" not in state:
                state = checkpoint.adopt_for_group(checkpoint.from_checkpoint(state, p), p, group)
            elif not state:
                state = checkpoint.new_state(p, group)
            else:
                continue
            states[i] = self.state[p] = state

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
            check_step(self.param_groups, self.state)
            self._formats.convert_changed(self.param_groups, self.state)

        for group in self.param_groups:
            # params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps: torch's lists
            lists: tuple[list[Tensor], ...] = ([], [], [], [], [], [])
            has_complex = self._init_group(group, *lists)
            if is_low_bit(group):
                self._low_bit_step(group, lists[0], lists[1], lists[5])
            else:
                adamw(*lists, has_complex=has_complex, **self._adamw_options(group))
        return loss

    # Eager: it looks up the params' state dicts and streams (see run_eagerly).
    @run_eagerly
    def _low_bit_step(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], steps: list[Tensor]
    ) -> None:
        """The step of a group in a low-bit format, whose moments live in the params' state dicts."""
        states = list(map(self.state.__getitem__, params))
        # A param's number keys its stochastic rounding: stable across steps and checkpoints, and distinct.
        streams = list(map(self._streams.__getitem__, params))
        adamw(params, grads, [], [], [], steps, states=states, streams=streams, **self._adamw_options(group))

    def _adamw_options(self, group: dict[str, Any]) -> dict[str, Any]:
        """``functional.adamw``'s keyword arguments from ``group``'s options and GradScaler's tensors."""
        beta1, beta2 = group["betas"]
        scaler = {"grad_scale": getattr(self, "grad_scale", None), "found_inf": getattr(self, "found_inf", None)}
        return {**{key: group[key] for key in _FUNCTIONAL_OPTIONS}, "beta1": beta1, "beta2": beta2, **scaler}


# The group options that functional.adamw takes as they are (betas it takes as beta1 and beta2).
_FUNCTIONAL_OPTIONS = (
    "lr eps weight_decay amsgrad maximize foreach fused capturable differentiable backend state_precision "
    "param_update seed"
).split()
