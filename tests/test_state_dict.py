"""Checkpoints move between adamw.AdamW and torch.optim.AdamW in both directions, and resume exactly.

After a load, the next steps of the two optimizers are bit-identical (params and every state entry),
whether the state dict is passed in memory or through torch.save/torch.load.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch

import adamw
from _helpers import (
    MIRROR_BACKENDS,
    assert_same_run,
    assert_same_value,
    backend_params,
    drive,
    make_params,
    run_steps,
    skip_unsupported,
    torch_counterpart,
    two_groups,
)

BEFORE, AFTER = 1, 3  # after 1 step one param (it had no grad) has no state yet
HYPER = {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.1}


def _through_bytes(state_dict: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only: a checkpoint must load without unpickling code


def _fresh_copy(params: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """New params with the same values and layouts (a model restored from its own checkpoint)."""
    fresh = make_params(dtype, seed=99)
    with torch.no_grad():
        for f, p in zip(fresh, params, strict=True):
            f.copy_(p)
    return fresh


def _build(cls: type[torch.optim.Optimizer], params: list[torch.Tensor], amsgrad: bool, **flags: Any) -> Any:
    return cls(two_groups(params, amsgrad=not amsgrad), amsgrad=amsgrad, **HYPER, **flags)


# Flags, not backend names: a checkpoint of backend="foreach" carries torch's foreach=None, so torch
# would resume on its for-loop, whose bits differ from its foreach path in a few low-precision cases.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64], ids=str)
@pytest.mark.parametrize("via_bytes", [False, True], ids=["in-memory", "torch.save"])
@pytest.mark.parametrize("direction", ["ours-to-torch", "torch-to-ours"])
@pytest.mark.parametrize("foreach", [False, True], ids=["foreach=False", "foreach=True"])
def test_round_trip_across_classes(foreach: bool, direction: str, via_bytes: bool, dtype: torch.dtype) -> None:
    if direction == "ours-to-torch":
        first, second = adamw.AdamW, torch.optim.AdamW
    else:
        first, second = torch.optim.AdamW, adamw.AdamW

    params = make_params(dtype)
    source = _build(first, params, amsgrad=True, foreach=foreach)
    drive(source, params, range(BEFORE))
    # In memory, load_state_dict keeps the very tensors of the source (torch's behaviour for both
    # classes), so the source's next steps would move the loaded state too: copy it first.
    state_dict = _through_bytes(source.state_dict()) if via_bytes else copy.deepcopy(source.state_dict())

    loaded_params = _fresh_copy(params, dtype)
    loaded = _build(second, loaded_params, amsgrad=False, foreach=not foreach)  # options come from the checkpoint
    loaded.load_state_dict(state_dict)
    assert_same_run(loaded, source, loaded_params, params)

    drive(source, params, range(BEFORE, BEFORE + AFTER))
    drive(loaded, loaded_params, range(BEFORE, BEFORE + AFTER))
    assert_same_run(loaded, source, loaded_params, params)


@pytest.mark.parametrize("backend", backend_params())
def test_resume_from_checkpoint_is_exact(backend: str) -> None:
    """Every backend, fused ones included: save, load into a fresh optimizer, continue bit for bit."""
    skip_unsupported(backend, torch.float32)
    params = make_params(torch.float32)
    source = _build(adamw.AdamW, params, amsgrad=True, backend=backend)
    drive(source, params, range(BEFORE))
    loaded_params = _fresh_copy(params, torch.float32)
    loaded = _build(adamw.AdamW, loaded_params, amsgrad=True, backend=backend)
    loaded.load_state_dict(_through_bytes(source.state_dict()))
    drive(source, params, range(BEFORE, BEFORE + AFTER))
    drive(loaded, loaded_params, range(BEFORE, BEFORE + AFTER))
    assert_same_run(loaded, source, loaded_params, params)


@pytest.mark.parametrize("backend", MIRROR_BACKENDS)
def test_state_dict_is_torchs(backend: str) -> None:
    """Same state entries and group options as torch's, plus only our own keys (at their defaults)."""
    ours = run_steps(lambda ps: _build(adamw.AdamW, ps, True, backend=backend), make_params(torch.float32), 3)
    theirs = run_steps(
        lambda ps: _build(torch.optim.AdamW, ps, True, **torch_counterpart(backend)), make_params(torch.float32), 3
    )
    ours_sd, their_sd = ours.state_dict(), theirs.state_dict()
    assert ours_sd.keys() == their_sd.keys() == {"state", "param_groups"}
    assert ours_sd["state"].keys() == their_sd["state"].keys()
    for index, entry in their_sd["state"].items():
        assert ours_sd["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            assert_same_value(ours_sd["state"][index][key], value, f"state[{index}][{key!r}]")
    for ours_group, their_group in zip(ours_sd["param_groups"], their_sd["param_groups"], strict=True):
        assert ours_group.pop("backend") == backend
        own = {key: ours_group.pop(key) for key in ("state_precision", "param_update", "seed")}
        assert own == {"state_precision": "param", "param_update": "round", "seed": 0}
        for key in ("foreach", "fused"):  # ours names the backend instead of setting torch's flags
            ours_group.pop(key), their_group.pop(key)
        assert ours_group.keys() == their_group.keys()
        for key, value in their_group.items():
            assert_same_value(ours_group[key], value, f"param_groups[{key!r}]")


def test_loading_torch_checkpoint_keeps_our_backend() -> None:
    params = make_params(torch.float32)
    theirs = run_steps(lambda ps: torch.optim.AdamW(ps, foreach=False), params, 2)
    ours = adamw.AdamW(_fresh_copy(params, torch.float32), backend="foreach")
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["backend"] == "foreach"
    assert "backend" not in theirs.param_groups[0]


@pytest.mark.parametrize("direction", ["ours-to-torch", "torch-to-ours"])
def test_named_parameters_round_trip(direction: str) -> None:
    """Params given as ``model.named_parameters()``: names are saved, and a checkpoint loads across classes."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)))
    first_cls, second_cls = (
        (adamw.AdamW, torch.optim.AdamW) if direction == "ours-to-torch" else (torch.optim.AdamW, adamw.AdamW)
    )
    first = first_cls(models[0].named_parameters(), foreach=False, **HYPER)
    second = second_cls(models[1].named_parameters(), foreach=False, **HYPER)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))

    def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()

    train(models[0], first, 2)
    state_dict = first.state_dict()
    assert state_dict["param_groups"][0]["param_names"] == [name for name, _ in models[0].named_parameters()]
    models[1].load_state_dict(models[0].state_dict())
    second.load_state_dict(_through_bytes(state_dict))
    train(models[0], first, 2)
    train(models[1], second, 2)
    assert_same_run(second, first, list(models[1].parameters()), list(models[0].parameters()))
    assert second.state_dict()["param_groups"][0]["param_names"] == state_dict["param_groups"][0]["param_names"]


@pytest.mark.parametrize("cls", [adamw.AdamW, torch.optim.AdamW], ids=["ours", "torch"])
def test_old_checkpoint_with_number_step(cls: type[torch.optim.Optimizer]) -> None:
    """Checkpoints from old torch versions store ``step`` as a Python number: both classes upgrade it alike."""
    params = make_params(torch.float32)
    source = run_steps(lambda ps: torch.optim.AdamW(ps, foreach=False), params, 2)
    state_dict = copy.deepcopy(source.state_dict())  # its per-param dicts are the source's own
    for entry in state_dict["state"].values():
        entry["step"] = float(entry["step"])
    loaded_params = _fresh_copy(params, torch.float32)
    loaded = cls(loaded_params, foreach=False)
    loaded.load_state_dict(state_dict)
    drive(loaded, loaded_params, range(2, 4))
    drive(source, params, range(2, 4))
    assert_same_run(loaded, source, loaded_params, params)
