"""Bit-for-bit parity with torch.optim.AdamW on the CPU: params and every state entry, several steps.

Our for-loop and foreach backends mirror torch's single-tensor and foreach paths op for op, so every
combination of dtype and flags must give torch's exact bits (torch.equal, same dtypes), including the
differentiable path, whose gradients are checked with gradcheck and against torch's.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import adamw
import adamw.functional
from _helpers import (
    DTYPES,
    MIRROR_BACKENDS,
    assert_bitwise,
    assert_same_run,
    backend_params,
    make_params,
    run_steps,
    torch_counterpart,
    two_groups,
)

STEPS = 5


def _cases() -> list[Any]:
    """(backend, lr kind, differentiable): foreach takes neither a Tensor lr nor differentiable (as torch)."""
    cases = []
    for backend in MIRROR_BACKENDS:
        for lr_kind in ("float-lr", "tensor-lr"):
            for differentiable in (False, True):
                if backend == "foreach" and (lr_kind == "tensor-lr" or differentiable):
                    continue
                ident = f"{backend}-{lr_kind}" + ("-differentiable" if differentiable else "")
                cases.append(pytest.param(backend, lr_kind == "tensor-lr", differentiable, id=ident))
    return cases


def _factory(cls: type[torch.optim.Optimizer], *, tensor_lr: bool, **kwargs: Any) -> Any:
    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        lr: float | torch.Tensor = torch.tensor(0.01) if tensor_lr else 0.01
        return cls(two_groups(params, tensor_lr=tensor_lr), lr=lr, betas=(0.9, 0.99), eps=1e-6, **kwargs)

    return make


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["wd0", "wd"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "maximize"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("backend", "tensor_lr", "differentiable"), _cases())
def test_bitwise_equal_to_torch(
    backend: str,
    tensor_lr: bool,
    differentiable: bool,
    dtype: torch.dtype,
    amsgrad: bool,
    maximize: bool,
    weight_decay: float,
) -> None:
    flags = {"amsgrad": amsgrad, "maximize": maximize, "weight_decay": weight_decay, "differentiable": differentiable}
    ours_params, their_params = make_params(dtype), make_params(dtype)
    ours = run_steps(_factory(adamw.AdamW, tensor_lr=tensor_lr, backend=backend, **flags), ours_params, STEPS)
    theirs = run_steps(
        _factory(torch.optim.AdamW, tensor_lr=tensor_lr, **torch_counterpart(backend), **flags), their_params, STEPS
    )
    assert_same_run(ours, theirs, ours_params, their_params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.complex64], ids=str)
@pytest.mark.parametrize(
    "flags",
    [{"foreach": None}, {"foreach": False}, {"foreach": True}, {"foreach": False, "fused": False}],
    ids=["foreach=None", "foreach=False", "foreach=True", "foreach=fused=False"],
)
def test_torch_flags_give_torch_bits(flags: dict[str, Any], dtype: torch.dtype) -> None:
    """torch's own flags on our class give the bits torch gives for the same flags."""
    kwargs = {"amsgrad": True, "maximize": True, "weight_decay": 0.1, **flags}
    ours_params, their_params = make_params(dtype), make_params(dtype)
    ours = run_steps(_factory(adamw.AdamW, tensor_lr=False, **kwargs), ours_params, STEPS)
    theirs = run_steps(_factory(torch.optim.AdamW, tensor_lr=False, **kwargs), their_params, STEPS)
    assert_same_run(ours, theirs, ours_params, their_params)


@pytest.mark.parametrize("differentiable", [False, True], ids=["plain", "differentiable"])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_tensor_betas_forloop(tensor_lr: bool, differentiable: bool) -> None:
    def make(cls: type[torch.optim.Optimizer], **kwargs: Any) -> Any:
        def build(params: list[torch.Tensor]) -> torch.optim.Optimizer:
            lr = torch.tensor(0.02) if tensor_lr else 0.02
            betas = (torch.tensor(0.85), torch.tensor(0.98))
            return cls(params, lr=lr, betas=betas, amsgrad=True, differentiable=differentiable, **kwargs)

        return build

    ours_params, their_params = make_params(torch.float32), make_params(torch.float32)
    ours = run_steps(make(adamw.AdamW, foreach=False), ours_params, STEPS)
    theirs = run_steps(make(torch.optim.AdamW, foreach=False), their_params, STEPS)
    assert_same_run(ours, theirs, ours_params, their_params)


# torch's for-loop and foreach paths agree bit for bit on the CPU for most dtypes, so parity alone
# cannot tell which backend ran: the dispatch is checked directly.
@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "forloop"),  # torch's note: foreach by default on CUDA only
        ({"foreach": None}, "forloop"),
        ({"foreach": False}, "forloop"),
        ({"foreach": True}, "foreach"),
        ({"differentiable": True}, "forloop"),
        ({"lr": torch.tensor(0.01)}, "forloop"),
        ({"backend": "forloop"}, "forloop"),
        ({"backend": "foreach"}, "foreach"),
        ({"fused": True}, "cpu"),  # fused on the CPU runs our C kernel
        ({"foreach": True, "fused": False}, "foreach"),
        ({"foreach": False, "fused": False}, "forloop"),
        # a low-bit format takes the same backend, and its low-bit step
        ({"state_precision": "8bit"}, "forloop low-bit"),
        ({"backend": "foreach", "state_precision": "bf16"}, "foreach low-bit"),
        ({"fused": True, "param_update": "kahan"}, "cpu low-bit"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else v,
)
def test_flags_select_backend(kwargs: dict[str, Any], expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []

    def steps_for(backend: str, device_type: str) -> adamw.functional.Steps:
        def step(*args: object) -> None:
            ran.append(backend)

        def low_bit_step(*args: object) -> None:
            ran.append(f"{backend} low-bit")

        return adamw.functional.Steps(step, low_bit_step)

    monkeypatch.setattr(adamw.functional, "steps_for", steps_for)
    params = make_params(torch.float32)
    opt = adamw.AdamW(params, **kwargs)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert ran == [expected]


@pytest.mark.parametrize("backend", backend_params(["cpu"]))
def test_fused_flag_runs_cpu_kernel_bits(backend: str) -> None:
    ours_params, their_params = make_params(torch.float32), make_params(torch.float32)
    ours = run_steps(lambda ps: adamw.AdamW(ps, fused=True, amsgrad=True), ours_params, STEPS)
    named = run_steps(lambda ps: adamw.AdamW(ps, backend=backend, amsgrad=True), their_params, STEPS)
    assert_same_run(ours, named, ours_params, their_params)


# --------------------------------------------------------------------------------------------------
# differentiable=True: autograd through the step


def _one_step(
    cls: type[torch.optim.Optimizer], amsgrad: bool, maximize: bool, *inputs: Any
) -> tuple[torch.Tensor, ...]:
    """One differentiable step from the given param, grad, moments (and lr, betas): new param and moments."""
    p, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, beta1, beta2 = inputs
    p = p.clone()  # a non-leaf: the in-place update is recorded, not refused
    p.grad = grad
    opt = cls([p], lr=lr, betas=(beta1, beta2), eps=1e-6, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize,
              differentiable=True)  # fmt: skip
    state = {"step": torch.tensor(2.0), "exp_avg": exp_avg.clone(), "exp_avg_sq": exp_avg_sq.clone()}
    if amsgrad:
        state["max_exp_avg_sq"] = max_exp_avg_sq.clone()
    opt.state[p].update(state)
    opt.step()
    return (p, *(opt.state[p][k] for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in opt.state[p]))


@pytest.mark.parametrize("hyper", ["float", "tensor"], ids=["float-hyper", "tensor-hyper-requires-grad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "maximize"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_differentiable_gradcheck_and_torch_grads(amsgrad: bool, maximize: bool, hyper: str) -> None:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, positive: bool = False) -> torch.Tensor:
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        return (t.abs() + 0.1 if positive else t).requires_grad_()

    max_exp_avg_sq = rand(3, positive=True) if amsgrad else None
    inputs: list[Any] = [rand(3), rand(3), rand(3), rand(3, positive=True), max_exp_avg_sq]
    if hyper == "tensor":
        inputs += [torch.tensor(0.05, dtype=torch.float64, requires_grad=True)]
        inputs += [torch.tensor(b, dtype=torch.float64, requires_grad=True) for b in (0.9, 0.99)]
    else:
        inputs += [0.05, 0.9, 0.99]

    assert torch.autograd.gradcheck(lambda *xs: _one_step(adamw.AdamW, amsgrad, maximize, *xs), tuple(inputs))

    ours = _one_step(adamw.AdamW, amsgrad, maximize, *inputs)
    theirs = _one_step(torch.optim.AdamW, amsgrad, maximize, *inputs)
    differentiable_inputs = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    weights = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in theirs]
    our_grads = torch.autograd.grad(
        sum((o * w).sum() for o, w in zip(ours, weights, strict=True)), differentiable_inputs
    )
    their_grads = torch.autograd.grad(
        sum((o * w).sum() for o, w in zip(theirs, weights, strict=True)), differentiable_inputs
    )
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert_bitwise(a, b, f"output {i}")
    for i, (a, b) in enumerate(zip(our_grads, their_grads, strict=True)):
        assert_bitwise(a, b, f"gradient w.r.t. input {i}")
