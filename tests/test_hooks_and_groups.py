"""Optimizer plumbing a drop-in must share with torch.optim.AdamW: hooks, zero_grad, param groups, closures.

Each scenario runs once with our class and once with torch's; the recorded events, the returned
values, and the params and state afterwards must be identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import adamw
from _helpers import assert_same_run, drive, make_grads, make_params, set_grads

# Group keys only adamw.AdamW has (torch.optim.AdamW has no such options).
OWN_GROUP_KEYS = ("backend", "state_precision", "param_update", "seed")

CLASSES = {"ours": adamw.AdamW, "torch": torch.optim.AdamW}
Scenario = Callable[[type[torch.optim.Optimizer]], tuple[list[Any], torch.optim.Optimizer, list[torch.Tensor]]]


def _same_in_both(scenario: Scenario) -> list[Any]:
    """Run ``scenario`` with both classes; assert equal events and bitwise equal params and state."""
    ours_events, ours, ours_params = scenario(adamw.AdamW)
    their_events, theirs, their_params = scenario(torch.optim.AdamW)
    assert ours_events == their_events
    assert_same_run(ours, theirs, ours_params, their_params)
    return ours_events


def _closure(params: list[torch.Tensor], step: int, loss: float, events: list[Any], name: str) -> Callable[[], Any]:
    def closure() -> torch.Tensor:
        events.append(name)
        set_grads(params, make_grads(params, step, all_steps=True))
        return torch.tensor(loss)

    return closure


def test_step_hooks_rewrite_arguments_and_remove() -> None:
    def scenario(cls: type[torch.optim.Optimizer]) -> Any:
        params = make_params(torch.float32)
        opt = cls(params, foreach=False)
        events: list[Any] = []
        replacement = _closure(params, 0, 2.0, events, "replacement closure")

        def pre(optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            assert optimizer is opt
            events.append(("pre", len(args), sorted(kwargs)))
            return args[:1], {"closure": replacement}  # args[0] is the optimizer; the step runs with these

        def post(optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            events.append(("post", len(args), sorted(kwargs)))

        handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
        handles += [
            register_optimizer_step_pre_hook(lambda o, a, k: events.append("global pre") if o is opt else None),
            register_optimizer_step_post_hook(lambda o, a, k: events.append("global post") if o is opt else None),
        ]
        try:
            events.append(("loss", opt.step(_closure(params, 1, 1.0, events, "given closure")).item()))
        finally:
            for handle in handles:
                handle.remove()
        events.append(("loss", opt.step(_closure(params, 2, 3.0, events, "given closure")).item()))
        return events, opt, params

    events = _same_in_both(scenario)
    assert events == [
        "global pre",
        ("pre", 2, []),
        "replacement closure",
        ("post", 1, ["closure"]),
        "global post",
        ("loss", 2.0),
        "given closure",  # hooks removed: no events, the given closure runs
        ("loss", 3.0),
    ]


def test_state_dict_and_load_state_dict_hooks() -> None:
    def scenario(cls: type[torch.optim.Optimizer]) -> Any:
        params = make_params(torch.float32)
        opt = cls(params, lr=0.01, foreach=False)
        drive(opt, params, range(2))
        events: list[Any] = []

        def post_state_dict(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
            events.append("state_dict post")
            return {**state_dict, "note": "added by a hook"}

        def pre_load(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
            events.append(("load pre", state_dict.get("note")))
            groups = [{**g, "lr": 0.5} for g in state_dict["param_groups"]]
            return {k: v for k, v in state_dict.items() if k != "note"} | {"param_groups": groups}

        handles = [
            opt.register_state_dict_pre_hook(lambda o: events.append("state_dict pre")),
            opt.register_state_dict_post_hook(post_state_dict),
            opt.register_load_state_dict_pre_hook(pre_load),
            opt.register_load_state_dict_post_hook(lambda o: events.append(("load post", o.param_groups[0]["lr"]))),
        ]
        state_dict = opt.state_dict()
        events.append(sorted(state_dict))
        opt.load_state_dict(state_dict)
        for handle in handles:
            handle.remove()
        opt.load_state_dict(opt.state_dict())
        events.append(("lr", opt.param_groups[0]["lr"]))
        drive(opt, params, range(2, 4))
        return events, opt, params

    events = _same_in_both(scenario)
    assert events == [
        "state_dict pre",
        "state_dict post",
        ["note", "param_groups", "state"],
        ("load pre", "added by a hook"),
        ("load post", 0.5),
        ("lr", 0.5),
    ]


def test_load_state_dict_pre_hook_may_reshape_groups() -> None:
    """A pre-hook that adapts a checkpoint (here: two saved groups merged into the one we have) must work."""

    def scenario(cls: type[torch.optim.Optimizer]) -> Any:
        params = make_params(torch.float32)
        source = cls([{"params": params[:3]}, {"params": params[3:], "lr": 0.02}], foreach=False)
        drive(source, params, range(2))
        target_params = make_params(torch.float32)
        target = cls(target_params, foreach=False)

        def merge_groups(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
            first, second = state_dict["param_groups"]
            return {**state_dict, "param_groups": [{**first, "params": first["params"] + second["params"]}]}

        target.register_load_state_dict_pre_hook(merge_groups)
        target.load_state_dict(source.state_dict())
        drive(target, target_params, range(2, 4))
        return [len(target.param_groups)], target, target_params

    _same_in_both(scenario)


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zeros"])
def test_zero_grad(set_to_none: bool) -> None:
    """None grads skip a param; zero grads still step it (decay, moments), as in torch."""

    def scenario(cls: type[torch.optim.Optimizer]) -> Any:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        opt = cls(model.parameters(), lr=0.05, weight_decay=0.1, foreach=False)
        x = torch.randn(5, 3)
        events = []
        for step in range(4):
            opt.zero_grad(set_to_none=set_to_none)
            events.append([p.grad is None or bool((p.grad == 0).all()) for p in model.parameters()])
            # On odd steps the last layer's bias gets no gradient at all.
            out = model(x)
            loss = out[:, 0].sum() if step % 2 else out.square().sum() + model[2].bias.sum()
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=set_to_none)
        events.append([None if p.grad is None else p.grad.abs().sum().item() for p in model.parameters()])
        return events, opt, list(model.parameters())

    events = _same_in_both(scenario)
    assert events[-1] == ([None] * 4 if set_to_none else [0.0] * 4)


def test_add_param_group_mid_training() -> None:
    def scenario(cls: type[torch.optim.Optimizer]) -> Any:
        params = make_params(torch.float32)
        opt = cls(params[:3], lr=0.01, foreach=False)
        drive(opt, params[:3], range(2))
        opt.add_param_group({"params": params[3:], "lr": 0.05, "betas": (0.8, 0.9), "amsgrad": True, "maximize": True})
        drive(opt, params, range(2, 5))
        events = [{k: v for k, v in g.items() if k not in ("params", *OWN_GROUP_KEYS)} for g in opt.param_groups]
        return events, opt, params

    groups = _same_in_both(scenario)
    assert groups[1]["lr"] == 0.05 and groups[1]["amsgrad"] and groups[0]["weight_decay"] == 0.01


def test_closure_returns_loss_and_steps_once() -> None:
    def scenario(cls: type[torch.optim.Optimizer]) -> Any:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = cls(model.parameters(), lr=0.1, foreach=False)
        x = torch.randn(4, 3)
        events = []

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            events.append("closure")
            return loss

        for _ in range(3):
            loss = opt.step(closure)
            events.append(loss.item())
        return events, opt, list(model.parameters())

    events = _same_in_both(scenario)
    assert events[0::2] == ["closure"] * 3 and events[1] > events[3] > events[5]
