"""What a step needs is checked for every group before any group is stepped or any state created:
the kernels (the low-bit ones for low-bit groups), Triton, the grads' dtypes. A step that cannot run raises
and leaves params and state as they were; once the cause is fixed, the next step steps once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import adamw
import adamw.backends
from _helpers import assert_bitwise, assert_unchanged, backend_params, catch, snapshot
from adamw.backends import _native

# Group 0 runs the for-loop and is stepped first; group 1 is the one that cannot run. Its first param
# is quantized under state_precision="8bit" (4096 values or more), its second is not.
SHAPES = (((3, 4), (5,)), ((5000,), (7,)))


def _optimizer(group1: dict[str, Any], seed: int = 0) -> tuple[adamw.AdamW, list[Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    groups = [[torch.randn(shape, generator=gen).requires_grad_() for shape in shapes] for shapes in SHAPES]
    for p in groups[0] + groups[1]:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = adamw.AdamW([{"params": groups[0]}, {"params": groups[1], **group1}])
    return opt, groups[0] + groups[1]


def _check_fails_then_steps_once(group1: dict[str, Any], match: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the cause in place (set up by the caller on ``monkeypatch``) the step raises ``match`` and
    changes nothing; once it is undone, a step gives what one step of an optimizer that never failed gives."""
    opt, params = _optimizer(group1)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert_unchanged(opt, params, before)
    assert not opt.state, "no state is created"

    monkeypatch.undo()
    opt.step()
    expected, expected_params = _optimizer(group1)
    expected.step()
    for i, (p, q) in enumerate(zip(params, expected_params, strict=True)):
        assert_bitwise(p, q, f"param {i}")
        assert opt.state[p].keys() == expected.state[q].keys(), f"param {i}: state keys"
        for key, value in expected.state[q].items():
            assert_bitwise(opt.state[p][key], value, f"param {i} state[{key!r}]")


@pytest.mark.parametrize(
    ("group1", "kernel"),
    [
        ({"fused": True}, r"adamw's fused CPU kernel \(fused=True on CPU tensors\)"),
        ({"fused": True, "state_precision": "8bit"}, "adamw's low-bit CPU kernel"),
        ({"backend": "cpu", "param_update": "kahan"}, "adamw's low-bit CPU kernel"),
    ],
    ids=["full precision", "8bit", "kahan"],
)
def test_without_a_compiler_no_group_is_stepped(
    group1: dict[str, Any], kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel must be built (an empty cache) and cannot be (CC names no executable); the error
    names the kernel that group runs."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("ADAMW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_native, "_loaded", {})  # this process has loaded no kernel yet
    _check_fails_then_steps_once(group1, f"{kernel}.*names no executable", monkeypatch)


@pytest.mark.parametrize(
    "group1",
    [{"backend": "triton"}, {"backend": "triton", "state_precision": "8bit"}],
    ids=["full precision", "8bit"],
)
@pytest.mark.parametrize("_", backend_params(["triton"]))  # where Triton is missing, there is nothing to undo
def test_without_triton_no_group_is_stepped(group1: dict[str, Any], _: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ModuleNotFoundError
    for name in ("_triton_kernels", "_triton_low_bit_kernels"):  # imported earlier: forget them
        monkeypatch.delitem(sys.modules, f"adamw.backends.{name}", raising=False)
        monkeypatch.delattr(adamw.backends, name, raising=False)
    _check_fails_then_steps_once(group1, "Triton is not installed", monkeypatch)


# --------------------------------------------------------------------------------------------------
# grads of another dtype than their param's

LOW_BIT_GROUPS = {
    "bf16 moments": {"state_precision": "bf16"},
    "8bit moments": {"state_precision": "8bit"},
    "kahan": {"param_update": "kahan"},  # applies to bfloat16 params; float32 ones are rounded as usual
}
DTYPE_PAIRS = {
    "fp32 param, bf16 grad": (torch.float32, torch.bfloat16),
    "bf16 param, fp32 grad": (torch.bfloat16, torch.float32),
}


def _mismatched_grad_error(
    optimizer: Any, options: dict[str, Any], dtypes: tuple[torch.dtype, torch.dtype]
) -> tuple[BaseException, Any, list[Tensor], Any]:
    """Two groups (the second with ``options``), one step with good grads, then a grad of another
    dtype in the second group: the error of the next step, and the optimizer and its params with
    their snapshot from before that step."""
    param_dtype, grad_dtype = dtypes
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.randn(shape, generator=gen).to(param_dtype).requires_grad_() for shapes in SHAPES for shape in shapes
    ]
    opt = optimizer([{"params": params[:2]}, {"params": params[2:], **options}])
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(param_dtype)
    opt.step()
    params[3].grad.data = params[3].grad.data.to(grad_dtype)  # p.grad = ... would refuse the dtype
    before = snapshot(opt, params)
    return catch(opt.step), opt, params, before


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS.values(), ids=DTYPE_PAIRS.keys())
@pytest.mark.parametrize("low_bit", LOW_BIT_GROUPS.values(), ids=LOW_BIT_GROUPS.keys())
@pytest.mark.parametrize("backend", backend_params())
def test_low_bit_group_refuses_a_grad_of_another_dtype(
    backend: str, low_bit: dict[str, Any], dtypes: tuple[torch.dtype, torch.dtype]
) -> None:
    """As torch.optim.AdamW (every implementation raises a RuntimeError), before any change."""
    theirs, *_ = _mismatched_grad_error(torch.optim.AdamW, {"foreach": False}, dtypes)
    error, opt, params, before = _mismatched_grad_error(adamw.AdamW, {"backend": backend, **low_bit}, dtypes)
    assert type(error) is type(theirs), f"ours raised {error!r}, torch {theirs!r}"
    param_dtype, grad_dtype = dtypes
    assert f"{param_dtype} param with a {grad_dtype} grad" in str(error)
    assert_unchanged(opt, params, before)
