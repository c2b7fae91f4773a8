"""Checkpoints move between adamw.AdamW and torch.optim.AdamW in both directions, and resume exactly.

After a load, the next steps of the two optimizers are bit-identical (params and every state entry),
whether the state dict is passed in memory or through torch.save/torch.load. With default options a
state dict is torch's key for key; an 8-bit one makes torch fail instead of train; a checkpoint that
cannot be loaded changes nothing.
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
    assert_unchanged,
    backend_params,
    drive,
    make_params,
    run_steps,
    skip_unsupported,
    snapshot,
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
    """Same state entries and group options as torch's, plus ``backend`` (the one option not at its default)."""
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


# --------------------------------------------------------------------------------------------------
# our own options: written only where they differ from their defaults

OWN_DEFAULTS = {"backend": None, "state_precision": "param", "param_update": "round", "seed": 0}
OWN_OPTIONS = {"backend": "foreach", "state_precision": "bf16", "param_update": "stochastic", "seed": 7}


def test_default_state_dict_is_torchs_key_for_key() -> None:
    """With default options a state dict is torch.optim.AdamW's: the same groups and state, key for key
    and value for value (both run the for-loop on the CPU)."""
    ours = run_steps(adamw.AdamW, make_params(torch.float32), 3).state_dict()
    theirs = run_steps(torch.optim.AdamW, make_params(torch.float32), 3).state_dict()
    assert ours.keys() == theirs.keys()
    assert ours["state"].keys() == theirs["state"].keys()
    for index, entry in theirs["state"].items():
        assert ours["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            assert_same_value(ours["state"][index][key], value, f"state[{index}][{key!r}]")
    for i, (ours_group, their_group) in enumerate(zip(ours["param_groups"], theirs["param_groups"], strict=True)):
        assert ours_group.keys() == their_group.keys()
        for key, value in their_group.items():
            assert_same_value(ours_group[key], value, f"param_groups[{i}][{key!r}]")


@pytest.mark.parametrize("option", OWN_OPTIONS)
def test_own_option_is_written_only_when_not_default(option: str) -> None:
    params = make_params(torch.bfloat16)
    opt = run_steps(lambda ps: adamw.AdamW(ps, **{option: OWN_OPTIONS[option]}), params, 2)
    group = opt.state_dict()["param_groups"][0]
    assert {key: group[key] for key in OWN_OPTIONS if key in group} == {option: OWN_OPTIONS[option]}


def test_own_options_round_trip() -> None:
    """Non-default options come back from a checkpoint; a default checkpoint restores the defaults."""
    params = make_params(torch.bfloat16)
    opt = run_steps(lambda ps: adamw.AdamW(ps, **OWN_OPTIONS), params, 2)
    saved = _through_bytes(opt.state_dict())
    assert {key: saved["param_groups"][0][key] for key in OWN_OPTIONS} == OWN_OPTIONS

    same = adamw.AdamW(_fresh_copy(params, torch.bfloat16), **OWN_OPTIONS)
    same.load_state_dict(copy.deepcopy(saved))
    assert {key: same.param_groups[0][key] for key in OWN_OPTIONS} == OWN_OPTIONS
    drive(same, same.param_groups[0]["params"], range(2, 3))

    # Into a default optimizer: backend and seed come from the checkpoint, as torch's options do; how
    # state is stored stays the live optimizer's choice (the state is converted to it).
    plain = adamw.AdamW(_fresh_copy(params, torch.bfloat16))
    plain.load_state_dict(copy.deepcopy(saved))
    loaded = {key: plain.param_groups[0][key] for key in OWN_OPTIONS}
    assert loaded == {**OWN_DEFAULTS, "backend": "foreach", "seed": 7}

    default_saved = run_steps(adamw.AdamW, make_params(torch.float32), 2).state_dict()
    fresh = adamw.AdamW(make_params(torch.float32, seed=1))
    fresh.load_state_dict(default_saved)
    assert {key: fresh.param_groups[0][key] for key in OWN_OPTIONS} == OWN_DEFAULTS


# --------------------------------------------------------------------------------------------------
# 8-bit checkpoints and torch.optim.AdamW


def _big_params(seed: int = 0) -> list[torch.Tensor]:
    """A param quantized under "8bit" (>= 4096 values) and one kept in float32."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in ((64, 96), (7,))]


def _step(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + i)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()


def _trained_8bit() -> tuple[list[torch.Tensor], adamw.AdamW]:
    params = _big_params()
    opt = adamw.AdamW(params, lr=0.01, state_precision="8bit", amsgrad=True)
    _step(opt, params, 2)
    return params, opt


@pytest.mark.parametrize("flags", [{"foreach": False}, {"foreach": True}, {"fused": True}], ids=str)
def test_8bit_checkpoint_fails_in_torch_instead_of_training(flags: dict[str, bool]) -> None:
    """torch.optim.AdamW casts every loaded state tensor to its param's dtype: 8-bit codes under
    ``exp_avg`` would load as moments of 0 to 255 and train. Under ``exp_avg_codes`` torch's first
    step raises, before any change; full_precision_state_dict() is the checkpoint torch takes."""
    params, opt = _trained_8bit()
    saved = _through_bytes(opt.state_dict())
    their_params = [p.detach().clone().requires_grad_() for p in params]
    theirs = torch.optim.AdamW(their_params, **flags)
    theirs.load_state_dict(saved)
    for p in their_params:
        p.grad = torch.ones_like(p)
    before = snapshot(theirs, their_params)
    with pytest.raises(KeyError, match="exp_avg"):
        theirs.step()
    assert_unchanged(theirs, their_params, before)
    assert saved["state"][0]["exp_avg_codes"].dtype == torch.uint8 and "exp_avg" not in saved["state"][0]

    full = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params], **flags)
    full.load_state_dict(_through_bytes(opt.full_precision_state_dict()))
    _step(full, full.param_groups[0]["params"], 1, start=2)


@pytest.mark.parametrize("precision", ["8bit", "bf16", "param"])
def test_8bit_checkpoint_with_codes_under_the_moments_name_still_loads(precision: str) -> None:
    """Earlier versions wrote 8-bit codes under ``exp_avg`` itself (beside ``exp_avg_absmax``): such
    a checkpoint loads as the current layout does, into every format."""
    params, opt = _trained_8bit()
    current = _through_bytes(opt.state_dict())
    earlier = copy.deepcopy(current)
    for entry in earlier["state"].values():
        for key in [k for k in entry if k.endswith("_codes")]:
            entry[key.removesuffix("_codes")] = entry.pop(key)
    assert earlier["state"][0]["exp_avg"].dtype == torch.uint8

    loaded = []
    for checkpoint in (current, earlier):
        target = adamw.AdamW([p.detach().clone().requires_grad_() for p in params], state_precision=precision)
        target.load_state_dict(checkpoint)
        loaded.append(target)
    assert_same_run(loaded[1], loaded[0], loaded[1].param_groups[0]["params"], loaded[0].param_groups[0]["params"])
    if precision == "8bit":
        assert_same_run(loaded[1], opt, loaded[1].param_groups[0]["params"], params)


@pytest.mark.parametrize("precision", ["8bit", "param"])
def test_checkpoint_entries_put_into_state_as_they_are_are_read_at_the_next_step(precision: str) -> None:
    """ZeroRedundancyOptimizer.load_state_dict copies each checkpoint entry into ``optimizer.state``
    without our loader: the next step reads it as load_state_dict would have (8-bit codes saved
    under ``exp_avg_codes`` included), instead of failing on a missing ``exp_avg``."""
    params, opt = _trained_8bit()
    saved = _through_bytes(opt.state_dict())
    copied, loaded = (
        adamw.AdamW(
            [p.detach().clone().requires_grad_() for p in params], lr=0.01, state_precision=precision, amsgrad=True
        )
        for _ in range(2)
    )
    loaded.load_state_dict(copy.deepcopy(saved))
    for index, p in enumerate(copied.param_groups[0]["params"]):
        copied.state[p] = dict(saved["state"][index])
    for target in (copied, loaded):
        _step(target, target.param_groups[0]["params"], 2, start=2)
    assert_same_run(copied, loaded, copied.param_groups[0]["params"], loaded.param_groups[0]["params"])


# --------------------------------------------------------------------------------------------------
# a rejected load changes nothing; hooks see the checkpoint's tensors


BROKEN = {
    "exp_avg of another shape": ("param", lambda s: s.__setitem__("exp_avg", torch.zeros(3))),
    "8-bit codes without their absmax": ("8bit", lambda s: s.pop("exp_avg_absmax")),
    "int8 values as a moment": ("param", lambda s: s.__setitem__("exp_avg", s["exp_avg"].to(torch.int8))),
    "uint8 codes as a float moment": ("param", lambda s: s.__setitem__("exp_avg", s["exp_avg"].to(torch.uint8))),
    "no step": ("param", lambda s: s.pop("step")),
    "codes under both names": ("8bit", lambda s: s.__setitem__("exp_avg", s["exp_avg_codes"])),
}


@pytest.mark.parametrize("case", BROKEN.values(), ids=BROKEN.keys())
def test_rejected_load_changes_nothing(case: tuple[str, Any]) -> None:
    precision, break_state = case
    params = _big_params()
    opt = adamw.AdamW(params, lr=0.01, state_precision=precision)
    _step(opt, params, 2)
    broken = copy.deepcopy(opt.state_dict())
    broken["param_groups"][0]["lr"] = 123.0
    break_state(broken["state"][0])
    before = snapshot(opt, params)
    with pytest.raises(ValueError) as error:
        opt.load_state_dict(broken)
    assert_unchanged(opt, params, before)
    assert "param 0" in str(error.value)  # names the param whose state cannot be loaded
    # Still steps, and still writes a checkpoint that loads without unpickling code.
    _step(opt, params, 1, start=2)
    _through_bytes(opt.state_dict())


def test_load_hooks_see_the_checkpoints_tensors() -> None:
    """As in torch: a pre-hook gets the checkpoint's tensors (and may cast one), a post-hook the
    state as installed."""
    params, opt = _trained_8bit()
    seen: list[set[type]] = []

    def pre_hook(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict = copy.deepcopy(state_dict)
        seen.append({type(v) for entry in state_dict["state"].values() for v in entry.values()})
        state_dict["state"][1]["exp_avg"] = state_dict["state"][1]["exp_avg"].double()
        return state_dict

    def post_hook(optimizer: Any) -> None:
        seen.append({type(v) for entry in optimizer.state.values() for v in entry.values()})

    opt.register_load_state_dict_pre_hook(pre_hook)
    opt.register_load_state_dict_post_hook(post_hook)
    opt.load_state_dict(opt.state_dict())
    assert seen == [{torch.Tensor}, {torch.Tensor}]
    assert opt.state[params[1]]["exp_avg"].dtype == torch.float32  # converted to the group's format
