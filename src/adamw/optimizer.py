"""``adamw.AdamW``: a drop-in ``torch.optim.AdamW``. Bookkeeping only: validation, groups, state.

The math lives in :mod:`adamw._math`, the choice of backend in :mod:`adamw.functional`. The state
layout (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) and param-group keys are
torch's, so checkpoints move between the two classes in both directions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT, _use_grad_for_differentiable

from .backends._common import capturable_devices
from .functional import BACKENDS, FUSED_BACKENDS, adamw, backend_step, select_backend

# Keys that exist in our param groups but not in torch's: kept from the live optimizer when a
# checkpoint written by torch.optim.AdamW (which lacks them) is loaded.
_OWN_GROUP_KEYS = ("backend",)

# dtypes each fused kernel handles, by device type.
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
        )
        _check_group_options(defaults)
        defaults["betas"] = tuple(_squeeze(b) for b in betas)
        super().__init__(params, defaults)
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
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group["decoupled_weight_decay"] = True
            group.setdefault("backend", None)
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
        has_complex = False
        on_device = group["capturable"] or group["fused"] or group["backend"] in FUSED_BACKENDS
        for p in group["params"]:
            if p.grad is None:
                continue
            has_complex |= torch.is_complex(p)
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if len(state) == 0:
                # The step lives on the CPU unless a kernel or graph capture needs it on the device:
                # reading a CPU scalar costs no device sync and no kernel launch.
                state["step"] = (
                    torch.zeros((), dtype=_scalar_dtype(group["fused"]), device=p.device)
                    if on_device
                    else torch.tensor(0.0, dtype=_scalar_dtype(None), device="cpu")
                )
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            state_steps.append(state["step"])
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

    def _check_step_inputs(self) -> None:
        """Raise, before any change, for whatever would make some group's step fail."""
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "AdamW does not support sparse gradients, please consider SparseAdam instead "
                        f"(param group {index} has a sparse grad)"
                    )
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
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)} or None, but got {backend!r}")
        if foreach is not None or fused is not None:
            raise ValueError(
                f"backend={backend!r} names the implementation: leave foreach and fused unset (None)"
            )
        if backend in FUSED_BACKENDS and differentiable:
            raise RuntimeError(f"backend={backend!r} (a fused kernel) does not support `differentiable`")


def _squeeze(x: float | Tensor) -> float | Tensor:
    return x.squeeze() if isinstance(x, Tensor) and x.dim() != 0 else x
