"""``state_precision``/``param_update`` set in a live param group: the next step converts the group's
state first, with the conversion ``load_state_dict`` runs; an invalid value raises before any change;
a group whose options did not change costs one comparison."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor

import adamw
import adamw.states.checkpoint
from _helpers import assert_same_run, assert_unchanged, snapshot
from adamw.states.formats import BF16, FLOAT32, INT4, INT8, PARAM, StateFormat

LR = 1e-2


def _params(dtype: torch.dtype, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 96), (7,)]  # "8bit" quantizes the first (>= 4096 values), keeps the second in float32
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def _step(opt: torch.optim.Optimizer, params: list[Tensor], steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + i)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()


# (param dtype, (state_precision, param_update) before, after)
CHANGES = [
    (torch.float32, ("param", "round"), ("8bit", "round")),
    (torch.float32, ("8bit", "round"), ("bf16", "round")),
    (torch.float32, ("8bit", "round"), ("param", "round")),
    (torch.bfloat16, ("param", "round"), ("param", "kahan")),
    (torch.bfloat16, ("8bit", "kahan"), ("param", "round")),
    (torch.bfloat16, ("bf16", "round"), ("8bit", "stochastic")),
]


@pytest.mark.parametrize(
    "dtype, before, after",
    CHANGES,
    ids=lambda x: str(x).replace("torch.", "") if not isinstance(x, tuple) else "-".join(x),
)
def test_changed_format_converts_the_state_as_a_load_does(
    dtype: torch.dtype, before: tuple[str, str], after: tuple[str, str]
) -> None:
    """The changed optimizer steps on exactly as one built with the new options that loaded its checkpoint."""
    params = _params(dtype)
    opt = adamw.AdamW(params, lr=LR, state_precision=before[0], param_update=before[1], seed=3)
    _step(opt, params, 2)

    loaded_params = [p.detach().clone().requires_grad_() for p in params]
    loaded = adamw.AdamW(loaded_params, lr=LR, state_precision=after[0], param_update=after[1], seed=3)
    loaded.load_state_dict(copy.deepcopy(opt.state_dict()))

    opt.param_groups[0]["state_precision"], opt.param_groups[0]["param_update"] = after
    _step(opt, params, 2, start=2)
    _step(loaded, loaded_params, 2, start=2)
    assert_same_run(opt, loaded, params, loaded_params)
    assert all(opt.state[p]["step"] == 4 for p in params)


@pytest.mark.parametrize(
    "options, change, match",
    [
        ({}, {"state_precision": "int8"}, r"param group 1: state_precision must be one of \['param', 'bf16', '8bit', '4bit'\]"),
        (
            {},
            {"param_update": "nearest"},
            r"param group 1: param_update must be one of \['round', 'stochastic', 'kahan'\]",
        ),
        (
            {"differentiable": True},
            {"state_precision": "8bit"},
            "param group 1: .*does not support differentiable=True",
        ),
    ],
    ids=["state_precision", "param_update", "differentiable"],
)
def test_invalid_format_set_in_a_group_raises_before_any_change(
    options: dict[str, Any], change: dict[str, str], match: str
) -> None:
    # Leaves that do not require grad: with differentiable=True the step runs under autograd.
    params = [p.detach() for p in _params(torch.float32) + _params(torch.float32, seed=1)]
    opt = adamw.AdamW([{"params": params[:2]}, {"params": params[2:]}], lr=LR, **options)
    _step(opt, params, 2)
    other = "param" if options.get("differentiable") else "bf16"
    opt.param_groups[0]["state_precision"] = other  # a valid change in another group waits too
    opt.param_groups[1].update(change)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=match):
        _step(opt, params, 1, start=2)
    assert_unchanged(opt, params, before)
    assert opt.state[params[0]]["exp_avg"].dtype == torch.float32

    opt.param_groups[1].update({"state_precision": "param", "param_update": "round"})
    _step(opt, params, 1, start=2)
    assert opt.state[params[0]]["exp_avg"].dtype == (torch.float32 if other == "param" else torch.bfloat16)


def test_only_a_changed_group_is_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    params = _params(torch.float32) + _params(torch.float32, seed=1)
    opt = adamw.AdamW([{"params": params[:2]}, {"params": params[2:]}], lr=LR)
    _step(opt, params, 1)
    converted: list[Tensor] = []
    adopt = adamw.states.checkpoint.adopt_for_group

    def counting(state: dict[str, Any], p: Tensor, *args: Any, **kwargs: Any) -> dict[str, Any]:
        converted.append(p)
        return adopt(state, p, *args, **kwargs)

    monkeypatch.setattr(adamw.states.checkpoint, "adopt_for_group", counting)
    _step(opt, params, 2, start=1)
    assert converted == []  # unchanged groups: one comparison each, no look at their params
    opt.param_groups[1]["state_precision"] = "8bit"
    _step(opt, params, 1, start=3)
    assert converted == params[2:]
    _step(opt, params, 1, start=4)
    assert converted == params[2:]
    assert (
        opt.state[params[2]]["exp_avg"].dtype == torch.uint8 and opt.state[params[0]]["exp_avg"].dtype == torch.float32
    )


def test_changed_format_in_a_step_in_backward() -> None:
    """step_in_backward steps each param over a one-param view of its group: the change reaches it too."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(torch.nn.Sequential(torch.nn.Linear(80, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2)))
    standard = adamw.AdamW(models[0].parameters(), lr=LR)
    in_backward = adamw.step_in_backward(models[1], lr=LR)
    x = torch.randn(5, 80, generator=torch.Generator().manual_seed(1))

    def train(steps: int) -> None:
        for _ in range(steps):
            standard.zero_grad()
            models[0](x).square().sum().backward()
            standard.step()
            models[1](x).square().sum().backward()

    train(2)
    for opt in (standard, in_backward):
        opt.param_groups[0]["state_precision"] = "8bit"
    train(2)
    assert in_backward.state[models[1][0].weight]["exp_avg"].dtype == torch.uint8
    assert_same_run(in_backward, standard, list(models[1].parameters()), list(models[0].parameters()))


@pytest.mark.parametrize("fmt", [PARAM, FLOAT32, BF16, INT8, INT4], ids=str)
@pytest.mark.parametrize(
    "param",
    [
        torch.zeros(64, 96),
        torch.zeros(5000, dtype=torch.bfloat16),
        torch.zeros(70, 70, dtype=torch.complex64),
        torch.zeros(()),
        torch.zeros(0, 3),
        torch.zeros(6, 5)[::2, 1:],
    ],
    ids=["2d", "bf16", "complex", "0d", "empty", "strided"],
)
def test_layout_is_what_zeros_creates(fmt: StateFormat, param: Tensor) -> None:
    """The check that a stored state is in its group's format reads layout(), which allocates nothing."""
    zeros = fmt.zeros(param, "exp_avg")
    assert fmt.layout(param, "exp_avg") == {name: (t.dtype, tuple(t.shape)) for name, t in zeros.items()}
