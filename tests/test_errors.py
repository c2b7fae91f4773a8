"""Bad inputs: ours raises the exception type torch.optim.AdamW raises, and changes nothing first.

Every case snapshots params, state and group options before the failing call and compares after.
Where torch raises mid-step after it has already changed something (state created lazily, an
earlier group stepped), ours raises before any change; those cases also check that torch did change
something, so the claim stays tested.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import adamw
import adamw.functional
from _helpers import assert_unchanged, catch, drive, make_grads, make_params, set_grads, snapshot

Tensor = torch.Tensor
OptClass = type[torch.optim.Optimizer]


def _t(x: Any) -> Tensor:
    return torch.tensor(x)


# --------------------------------------------------------------------------------------------------
# construction

CONSTRUCTOR_CASES: dict[str, Callable[[OptClass, list[Tensor]], Any]] = {
    "negative lr": lambda cls, ps: cls(ps, lr=-1e-3),
    "NaN lr": lambda cls, ps: cls(ps, lr=float("nan")),
    "negative eps": lambda cls, ps: cls(ps, eps=-1e-8),
    "beta1 = 1": lambda cls, ps: cls(ps, betas=(1.0, 0.999)),
    "negative beta2": lambda cls, ps: cls(ps, betas=(0.9, -0.1)),
    "negative weight_decay": lambda cls, ps: cls(ps, weight_decay=-0.01),
    "betas float and Tensor": lambda cls, ps: cls(ps, betas=(0.9, _t(0.999))),
    "betas Tensor and float": lambda cls, ps: cls(ps, betas=(_t(0.9), 0.999)),
    "Tensor lr with foreach": lambda cls, ps: cls(ps, lr=_t(0.01), foreach=True),
    "Tensor betas with foreach": lambda cls, ps: cls(ps, betas=(_t(0.9), _t(0.999)), foreach=True),
    "2-element Tensor lr": lambda cls, ps: cls(ps, lr=_t([0.01, 0.02])),
    "2-element Tensor beta": lambda cls, ps: cls(ps, betas=(_t([0.9, 0.8]), _t(0.999))),
    "foreach and fused": lambda cls, ps: cls(ps, foreach=True, fused=True),
    "fused and differentiable": lambda cls, ps: cls(ps, fused=True, differentiable=True),
    "params is a Tensor": lambda cls, ps: cls(ps[2]),
    "empty params": lambda cls, ps: cls([]),
    "param in two groups": lambda cls, ps: cls([{"params": ps[:3]}, {"params": ps[2:]}]),
    "named and unnamed groups": lambda cls, ps: cls([{"params": [("a", ps[0])]}, {"params": ps[1:]}]),
    "non-leaf param": lambda cls, ps: cls([ps[2].detach().requires_grad_() * 2]),
}


@pytest.mark.parametrize("case", CONSTRUCTOR_CASES.values(), ids=CONSTRUCTOR_CASES.keys())
def test_constructor_error_like_torch(case: Callable[[OptClass, list[Tensor]], Any]) -> None:
    params = make_params(torch.float32)
    before = snapshot(None, params)
    theirs = catch(lambda: case(torch.optim.AdamW, params))
    ours = catch(lambda: case(adamw.AdamW, params))
    assert type(ours) is type(theirs), f"ours raised {ours!r}, torch {theirs!r}"
    assert_unchanged(None, params, before)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"backend": "gpu"},
        {"backend": "foreach", "foreach": True},
        {"backend": "cpu", "differentiable": True},
        {"backend": "foreach", "lr": _t(0.01)},  # as foreach=True: ValueError, as torch
        {"backend": "foreach", "betas": (_t(0.9), _t(0.999))},
    ],
    ids=[
        "unknown backend",
        "backend and foreach",
        "fused backend and differentiable",
        "foreach backend, Tensor lr",
        "foreach backend, Tensor betas",
    ],
)
def test_backend_argument_errors(kwargs: dict[str, Any]) -> None:
    """``backend`` is ours alone (torch has no such argument): its misuse is a ValueError or, like
    torch's fused+differentiable, a RuntimeError, at construction and in add_param_group alike."""
    expected = RuntimeError if kwargs.get("differentiable") else ValueError
    params = make_params(torch.float32)
    with pytest.raises(expected):
        adamw.AdamW(params, **kwargs)
    opt = adamw.AdamW(params[:3])
    drive(opt, params[:3], range(2))
    before = snapshot(opt, params)
    with pytest.raises(expected):
        opt.add_param_group({"params": params[3:], **kwargs})
    assert_unchanged(opt, params, before)


def test_foreach_backend_differentiable_raises_before_any_change() -> None:
    """As foreach=True with differentiable=True (torch asserts mid-step): AssertionError, nothing changed."""
    params = make_params(torch.float32)
    opt = adamw.AdamW(params, backend="foreach", differentiable=True)
    set_grads(params, make_grads(params, 0, all_steps=True))
    before = snapshot(opt, params)
    with pytest.raises(AssertionError):
        opt.step()
    assert_unchanged(opt, params, before)


def test_missing_backend_module_raises_before_any_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fused backend whose module cannot load (e.g. no C compiler) fails before group 1 is stepped."""
    real = adamw.functional.steps_for

    def steps_for(backend: str, device_type: str) -> adamw.functional.Steps:
        if backend == "cpu":
            raise ModuleNotFoundError("No module named 'adamw.backends.cpu'", name="adamw.backends.cpu")
        return real(backend, device_type)

    monkeypatch.setattr(adamw.functional, "steps_for", steps_for)
    params = make_params(torch.float32)
    opt = adamw.AdamW([{"params": params[:3]}, {"params": params[3:], "backend": "cpu"}])
    set_grads(params, make_grads(params, 0, all_steps=True))
    before = snapshot(opt, params)
    with pytest.raises(ModuleNotFoundError):
        opt.step()
    assert_unchanged(opt, params, before)


# --------------------------------------------------------------------------------------------------
# the step


def _sparse_grad(opt: Any, params: list[Tensor]) -> None:
    params[5].grad = params[5].grad.to_sparse()  # params[5] is 1-d


def _step_requires_grad(opt: Any, params: list[Tensor]) -> None:
    opt.state[params[2]]["step"].requires_grad_(True)


def _bf16_grad(opt: Any, params: list[Tensor]) -> None:
    params[4].grad.data = params[4].grad.data.to(torch.bfloat16)  # `p.grad = ...` refuses another dtype


def _nothing(opt: Any, params: list[Tensor]) -> None:
    pass


def _with_complex_param() -> list[Tensor]:
    return make_params(torch.float32) + [torch.randn(3, dtype=torch.complex64)]


# torch 2.13's foreach and fused steps create state for a bf16 grad of a float32 param, then raise;
# 2.11's raise first.
_TORCH_2_13 = torch.torch_version.TorchVersion(torch.__version__) >= "2.13"


@dataclass(frozen=True)
class StepCase:
    kwargs: dict[str, Any]  # for the constructor (every group)
    sabotage: Callable[[Any, list[Tensor]], None] = _nothing  # makes the next step fail
    second_group: dict[str, Any] | None = None  # options of a second group (params[3:]); None: one group
    warm_steps: int = 2  # good steps first, so there is state to keep unchanged
    make: Callable[[], list[Tensor]] = lambda: make_params(torch.float32)
    torch_changes: bool = False  # torch changes params or state before it raises


STEP_CASES = {
    "sparse grad": StepCase({"foreach": False}, _sparse_grad),
    "sparse grad, foreach": StepCase({"foreach": True}, _sparse_grad),
    "sparse grad in 2nd group": StepCase({"foreach": False}, _sparse_grad, second_group={}, torch_changes=True),
    "capturable on CPU": StepCase({"capturable": True}, warm_steps=0, torch_changes=True),
    "capturable foreach on CPU": StepCase({"capturable": True, "foreach": True}, warm_steps=0, torch_changes=True),
    "capturable 2nd group on CPU": StepCase(
        {"foreach": False}, second_group={"capturable": True}, warm_steps=0, torch_changes=True
    ),
    "foreach and differentiable": StepCase({"foreach": True, "differentiable": True}, warm_steps=0, torch_changes=True),
    "foreach 2nd group, differentiable": StepCase(
        {"differentiable": True}, second_group={"foreach": True}, warm_steps=0, torch_changes=True
    ),
    "fused with a complex param": StepCase({"fused": True}, warm_steps=0, make=_with_complex_param, torch_changes=True),
    "differentiable, step requires grad": StepCase({"differentiable": True}, _step_requires_grad),
    "bf16 grad of a float32 param": StepCase({"foreach": False}, _bf16_grad, torch_changes=True),
    "bf16 grad of a float32 param, foreach": StepCase({"foreach": True}, _bf16_grad, torch_changes=_TORCH_2_13),
    "bf16 grad of a float32 param, fused": StepCase({"fused": True}, _bf16_grad, torch_changes=_TORCH_2_13),
    "bf16 grad in 2nd group": StepCase({"foreach": False}, _bf16_grad, second_group={}, torch_changes=True),
}


def _arrange(cls: OptClass, case: StepCase) -> tuple[Any, list[Tensor]]:
    params = case.make()
    groups = [{"params": params}]
    if case.second_group is not None:
        groups = [{"params": params[:3]}, {"params": params[3:], **case.second_group}]
    opt = cls(groups, **case.kwargs)
    drive(opt, params, range(case.warm_steps), all_steps=True)
    set_grads(params, make_grads(params, case.warm_steps, all_steps=True))
    case.sabotage(opt, params)
    return opt, params


@pytest.mark.parametrize("case", STEP_CASES.values(), ids=STEP_CASES.keys())
def test_step_error_like_torch_and_changes_nothing(case: StepCase) -> None:
    theirs, their_params = _arrange(torch.optim.AdamW, case)
    their_before = snapshot(theirs, their_params)
    their_error = catch(theirs.step)

    ours, our_params = _arrange(adamw.AdamW, case)
    before = snapshot(ours, our_params)
    our_error = catch(ours.step)
    assert type(our_error) is type(their_error), f"ours raised {our_error!r}, torch {their_error!r}"
    assert_unchanged(ours, our_params, before)
    if case.torch_changes:
        with pytest.raises(AssertionError, match="changed"):
            assert_unchanged(theirs, their_params, their_before)


# --------------------------------------------------------------------------------------------------
# load_state_dict and add_param_group


def _load_mismatched_groups(cls: OptClass, params: list[Tensor], opt: Any) -> None:
    source = cls([{"params": params[:3]}, {"params": params[3:]}])
    opt.load_state_dict(source.state_dict())


def _load_mismatched_sizes(cls: OptClass, params: list[Tensor], opt: Any) -> None:
    source = cls([{"params": params[:2]}, {"params": params[2:]}])
    opt.load_state_dict(source.state_dict())


def _load_missing_param_groups(cls: OptClass, params: list[Tensor], opt: Any) -> None:
    opt.load_state_dict({"state": {}})


def _add_duplicate_param(cls: OptClass, params: list[Tensor], opt: Any) -> None:
    opt.add_param_group({"params": [params[5]]})


GROUP_CASES = {
    "load: number of groups differs": _load_mismatched_groups,
    "load: group sizes differ": _load_mismatched_sizes,
    "load: no param_groups": _load_missing_param_groups,
    "add: param already in a group": _add_duplicate_param,
}


@pytest.mark.parametrize("case", GROUP_CASES.values(), ids=GROUP_CASES.keys())
def test_group_error_like_torch_and_changes_nothing(case: Callable[[OptClass, list[Tensor], Any], None]) -> None:
    errors = []
    for cls in (torch.optim.AdamW, adamw.AdamW):
        params = make_params(torch.float32)
        opt = cls([{"params": params[:4]}, {"params": params[4:], "lr": 0.1}], foreach=False)
        drive(opt, params, range(2))
        before = snapshot(opt, params)
        errors.append(catch(lambda cls=cls, params=params, opt=opt: case(cls, params, opt)))
        assert_unchanged(opt, params, before)
    assert type(errors[1]) is type(errors[0]), f"ours raised {errors[1]!r}, torch {errors[0]!r}"


def test_unnamed_group_into_named_optimizer_like_torch() -> None:
    errors = []
    for cls in (torch.optim.AdamW, adamw.AdamW):
        model = torch.nn.Linear(2, 2)
        opt = cls(model.named_parameters())
        before = snapshot(opt, list(model.parameters()))
        errors.append(catch(lambda opt=opt: opt.add_param_group({"params": [torch.zeros(2)]})))
        assert_unchanged(opt, list(model.parameters()), before)
    assert type(errors[1]) is type(errors[0])
