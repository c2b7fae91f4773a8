"""Behaviours that torch's own optimizer tests (test/test_optim.py) check of every optimizer, run on
both classes: a deep copy keeps every public attribute; a state-dict pre-hook may put an entry of no
param in ``optimizer.state``; ``fused=True`` over params on the ``meta`` device builds, and fails at
the step with torch's message."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch

import adamw
from _helpers import assert_same_run, drive, make_params

CLASSES = {"ours": adamw.AdamW, "torch": torch.optim.AdamW}


def _public(obj: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


@pytest.mark.parametrize("options", [{}, {"reshardable_state_dict": True, "state_precision": "8bit"}], ids=str)
def test_deepcopy_keeps_every_public_attribute(options: dict[str, Any]) -> None:
    params = make_params(torch.float32)
    opt = adamw.AdamW(params, **options)
    drive(opt, params, range(3))
    copied = copy.deepcopy(opt)
    assert _public(copied).keys() == _public(opt).keys()
    assert copied.reshardable_state_dict == opt.reshardable_state_dict
    copied_params = copied.param_groups[0]["params"]
    drive(opt, params, range(3, 5))
    drive(copied, copied_params, range(3, 5))
    assert_same_run(copied, opt, copied_params, params)


@pytest.mark.parametrize("cls", CLASSES.values(), ids=CLASSES.keys())
def test_state_dict_pre_hook_may_add_an_entry_of_no_param(cls: type[torch.optim.Optimizer]) -> None:
    """torch keeps such an entry under its own key, in the state dict and through a load."""
    params = make_params(torch.float32)
    opt = cls(params, foreach=False)
    drive(opt, params, range(2))
    opt.register_state_dict_pre_hook(lambda optimizer: optimizer.state.__setitem__("test", 1))
    state_dict = opt.state_dict()
    assert state_dict["state"]["test"] == 1
    if isinstance(opt, adamw.AdamW):
        assert opt.full_precision_state_dict()["state"]["test"] == 1
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    loaded = cls(make_params(torch.float32, seed=1), foreach=False)
    loaded.load_state_dict(torch.load(buffer))
    assert loaded.state["test"] == 1
    drive(loaded, loaded.param_groups[0]["params"], range(2, 3))


@pytest.mark.parametrize("cls", CLASSES.values(), ids=CLASSES.keys())
def test_fused_on_the_meta_device_fails_at_the_step_with_torchs_message(cls: type[torch.optim.Optimizer]) -> None:
    """torch builds the optimizer (params may be materialized later) and checks at the first step."""
    params = [torch.nn.Parameter(torch.randn(3, device="meta"))]
    opt = cls(params, fused=True)
    params[0].grad = torch.ones_like(params[0])
    with pytest.raises(RuntimeError, match=r"`fused=True` requires all the params to be floating point Tensors .*meta"):
        opt.step()
    assert not any(opt.state.values())
