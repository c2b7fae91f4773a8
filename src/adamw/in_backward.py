"""The step fused into backward: each parameter is stepped as soon as its gradient is ready, then freed.

A standard training step holds every gradient at once (``backward()`` then ``step()``). Here one
:class:`AdamWInBackward` registers a ``register_post_accumulate_grad_hook`` per parameter that runs
the AdamW update for that parameter alone and sets its ``.grad`` to ``None``, so at most a few
gradients live at any time. The update is the one :class:`adamw.AdamW` runs (same backends, same
state, same checkpoint format): the parameter is stepped by ``AdamW.step`` over a one-parameter view
of its group, so each parameter gets the bits a standard step would give it.

What changes for the training loop:

* there is no ``optimizer.step()`` (after a backward it raises, so a loop written for a standard
  step fails loudly instead of silently doing nothing); ``zero_grad()`` is not needed either;
* LR schedulers work unchanged: they change ``param_groups[i]["lr"]``, read at each parameter's step;
* ``state_dict()``/``load_state_dict()`` are :class:`adamw.AdamW`'s, so checkpoints move between a
  standard and an in-backward run in both directions;
* every ``backward()`` is a step: no gradient accumulation over micro-batches;
* global-norm clipping (``clip_grad_norm_``) is impossible, since it needs every gradient before the
  first step; clip per parameter instead with ``before_step`` (``clip_grad_norm_`` on the one
  parameter, or ``p.grad.clamp_(-c, c)`` as ``clip_grad_value_`` does);
* ``GradScaler`` is refused with an error: it skips the whole step when any gradient overflowed,
  which it can only know after the last gradient, and by then the others were stepped. Use
  bfloat16 autocast, which needs no loss scaling;
* ``DistributedDataParallel`` is refused: its hooks reduce gradients in buckets after ours run, so
  each rank would step with its own unreduced gradient. FSDP2 (``fully_shard``) works: it runs
  post-accumulate-grad hooks on the sharded parameter after the reduce-scatter.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT
from torch.utils.hooks import RemovableHandle
from typing_extensions import Unpack

from .optimizer import AdamW
from .options import AdamWOptions

BeforeStep = Callable[[Tensor], object]


def _unhooked_adamw_step() -> Callable[..., Any]:
    """``AdamW.step`` without torch's profiling/step-hook wrapper (present once any AdamW was built).

    Step hooks registered on an optimizer mean "around a step of all parameters"; running them once
    per parameter would surprise, so per-parameter steps run the bare method.
    """
    step = AdamW.step
    return step.__wrapped__ if getattr(step, "hooked", False) else step  # type: ignore[attr-defined]


class AdamWInBackward(AdamW):
    r"""AdamW whose step runs inside ``backward()``, one parameter at a time, freeing each gradient.

    Takes :class:`adamw.AdamW`'s arguments (keyword-only after ``params``) and:

    Args:
        before_step: called with each parameter right before its step, its ``.grad`` set; for
            per-parameter clipping, e.g. ``lambda p: torch.nn.utils.clip_grad_norm_(p, 1.0)``.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> opt = adamw.step_in_backward(model, lr=1e-3)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
        >>> model(torch.randn(8, 4)).sum().backward()   # the step happens here
        >>> sched.step()
        >>> opt.remove()  # back to a standard AdamW: backward() fills .grad, step() steps
    """

    def __init__(
        self,
        params: ParamsT,
        *,
        before_step: BeforeStep | None = None,
        **options: Unpack[AdamWOptions],
    ) -> None:
        # Set before super().__init__, which calls add_param_group (where the hooks are registered).
        self.before_step = before_step
        self._hooks: list[RemovableHandle] = []
        self._group_index: dict[Tensor, int] = {}
        # Autograd runs the hooks of different devices in different threads; a param_groups swap
        # (see _step_and_free) must not interleave.
        self._lock = threading.Lock()
        super().__init__(params, **options)
        # Makes GradScaler.step call step() (which refuses) instead of failing on "No inf checks".
        self._step_supports_amp_scaling = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        for param in self.param_groups[index]["params"]:
            self._hook(param, index)

    def _hook(self, param: Tensor, index: int) -> None:
        """Step ``param`` (of group ``index``) whenever backward completes its gradient, frozen or not.

        A frozen param is hooked too, since AdamW steps it once it is unfrozen. torch refuses a hook on
        a tensor that does not require grad but keeps one across ``requires_grad_`` changes, so the
        hook goes on while requires_grad is briefly set.
        """
        self._group_index[param] = index
        if param.requires_grad:
            self._hooks.append(param.register_post_accumulate_grad_hook(self._step_and_free))
            return
        if not (param.is_floating_point() or param.is_complex()) or param.is_inference():
            return  # can never require grad (outside inference mode), so never gets a gradient
        param.requires_grad_(True)
        try:
            self._hooks.append(param.register_post_accumulate_grad_hook(self._step_and_free))
        finally:
            param.requires_grad_(False)

    def __getstate__(self) -> dict[str, Any]:
        """torch's optimizer state, plus what a copy needs to step in backward as this one does."""
        return {**super().__getstate__(), "before_step": self.before_step, "in_backward": bool(self._hooks)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Called by ``load_state_dict`` on a live optimizer, which keeps its hooks, and by
        ``copy.deepcopy`` and unpickling on a new one, which hooks its own params: the copied ones, so
        ``copy.deepcopy((model, opt))`` trains the copied model in backward (unless ``remove()`` was
        called on the original), as a copy of a standard optimizer steps the copied params."""
        if "_hooks" in self.__dict__:
            super().__setstate__(state)
            return
        state = dict(state)
        in_backward = state.pop("in_backward", True)
        self.before_step = state.pop("before_step", None)
        self._hooks = []
        self._group_index = {}
        self._lock = threading.Lock()
        super().__setstate__(state)
        self._step_supports_amp_scaling = True
        if in_backward:
            for index, group in enumerate(self.param_groups):
                for param in group["params"]:
                    self._hook(param, index)

    def remove(self) -> None:
        """Remove the hooks: from now on ``backward()`` fills ``.grad`` and ``step()`` steps, as in AdamW."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Step the parameters that hold a gradient, as ``AdamW.step``; while the hooks are on, raise
        when none does (backward() stepped them already) or when GradScaler calls.

        Gradients set by hand are stepped: ``torch.distributed.checkpoint`` builds the state of a
        fresh optimizer that way (zero gradients, ``lr`` 0, one step).
        """
        if self._hooks:
            if getattr(self, "found_inf", None) is not None or getattr(self, "grad_scale", None) is not None:
                raise RuntimeError(
                    "GradScaler cannot drive a step in backward: it skips the step of every parameter "
                    "when any gradient overflowed, which is known only after the last gradient, and by "
                    "then the others were stepped. Use bfloat16 autocast (no loss scaling needed), or "
                    "call remove() and step as usual."
                )
            if not any(p.grad is not None for group in self.param_groups for p in group["params"]):
                raise RuntimeError(
                    "the parameters of this optimizer are stepped inside backward(): drop the call to "
                    "step() (and zero_grad()), or call remove() first to step as a standard AdamW"
                )
        return super().step(closure)

    def _step_and_free(self, param: Tensor) -> None:
        """``AdamW.step`` over a one-parameter view of ``param``'s group (current options, shared
        state), then free its gradient."""
        if self.before_step is not None:
            self.before_step(param)
        # Looked up by index at each step: load_state_dict replaces the group dicts.
        group = self.param_groups[self._group_index[param]]
        view = {**group, "params": [param]}
        with self._lock:
            groups, self.param_groups = self.param_groups, [view]
            try:
                _unhooked_adamw_step()(self)
            finally:
                self.param_groups = groups
        # What an LR scheduler reads to check that the optimizer stepped before it.
        self._opt_called = True
        param.grad = None


def step_in_backward(
    params: ParamsT | torch.nn.Module,
    *,
    before_step: BeforeStep | None = None,
    **options: Unpack[AdamWOptions],
) -> AdamWInBackward:
    """Step every parameter of ``params`` (a module or what AdamW takes) by AdamW inside ``backward()``.

    ``options`` are :class:`adamw.AdamW`'s keyword arguments; see :class:`AdamWInBackward` for what
    the returned optimizer does and :mod:`adamw.in_backward` for what changes in a training loop.
    A module's parameters are taken in ``model.parameters()`` order, so checkpoints match those of
    ``AdamW(model.parameters())``.
    """
    if isinstance(params, torch.nn.Module):
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(params, DistributedDataParallel):
            raise RuntimeError(
                "step in backward does not work under DistributedDataParallel: its gradient "
                "all-reduce completes after the per-parameter hooks run, so each rank would step "
                "with its own gradient. Use FSDP2 (torch.distributed.fsdp.fully_shard), whose "
                "reduce-scatter runs before these hooks."
            )
        params = params.parameters()
    return AdamWInBackward(params, before_step=before_step, **options)
