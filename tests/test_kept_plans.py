"""The fused kernels keep what they built for a group (the CPU kernel's pointer arrays, the Triton
kernel's launch tables, the low-bit kernels' tables) from one step to the next, in one kind of cache
(:class:`adamw.backends._plans.PlanCache`, whose rules are tested here first). Memory that stays where
it was but is read differently (``t.data = t.data.view(dtype)`` keeps the pointer and the byte count,
and changes the dtype and the number of values) must not reuse it: the next step gives what a fresh
optimizer gives on the same tensors, or raises what that one raises, having changed nothing. Each
such test runs twice: with a kept plan's guard (torch's C-level tensor check) in force, and with
fingerprints only (a torch without that check).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import adamw
from _helpers import assert_bitwise, assert_unchanged, backend_params, catch, snapshot
from adamw.backends import _plans
from adamw.backends._plans import Memory, PlanCache, fingerprint

CHECKS = ["guard", "fingerprints only", "a guard that cannot be made"]


def _refuse(*tensors: Tensor, **kwargs: Any) -> None:
    raise TypeError("TensorGuards() takes other arguments in this torch")


@pytest.fixture(params=CHECKS)
def check(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How kept plans are checked: by their guards once found, or by comparing fingerprints every
    step (a torch without TensorGuards, or whose TensorGuards takes other arguments)."""
    if request.param == "fingerprints only":
        monkeypatch.setattr(_plans, "_TensorGuards", None)
    elif request.param == "a guard that cannot be made":
        monkeypatch.setattr(_plans, "_TensorGuards", _refuse)
    return str(request.param)


# --------------------------------------------------------------------------------------------------
# the cache


def _found(cache: PlanCache[int], keys: range) -> list[int]:
    return [key for key in keys if cache.get(key, "memory") is not None]


def test_a_plan_is_found_while_its_memory_is_as_it_was() -> None:
    t, grad = torch.zeros(4, 4), torch.zeros(4, 4)
    cache: PlanCache[str] = PlanCache()
    cache.put("group", fingerprint([t], [grad]), "plan")
    assert cache.get("group", fingerprint([t], [torch.ones(4, 4)])) == "plan"  # a grad's address may change
    for changed in (
        fingerprint([t.view(torch.float16)], [grad]),  # same address and bytes, another dtype
        fingerprint([t.t()], [grad]),  # same address, bytes and dtype, another order
        fingerprint([t.clone()], [grad]),  # moved
        fingerprint([t], [grad.double()]),  # a grad of another dtype
        None,  # never matches
    ):
        assert cache.get("group", changed) is None
    assert cache.get("another group", fingerprint([t], [grad])) is None
    assert cache.cache_info()[:3] == (1, 6, 1)
    cache.clear()
    assert cache.cache_info() == (0, 0, 0, 0, 0, 0)


def test_a_plan_over_tensors_is_found_while_they_are_as_they_were(check: str) -> None:
    """The same answers as the fingerprints', whether a guard settles them or not; the guard, made
    when the plan is first found, is the stricter test (it also compares ``requires_grad``), and a
    plan it does not pass is still found where the fingerprint is unchanged."""
    t, grad = torch.randn(4, 4), torch.randn(4, 4)
    cache: PlanCache[str] = PlanCache()
    cache.put("group", Memory([t], [grad], extra=["exp_avg"]), "plan")
    for _ in range(3):  # the first find makes the guard (with TensorGuards), the others use it
        assert cache.get("group", Memory([t], [torch.randn(4, 4)], extra=["exp_avg"])) == "plan"
    for changed in (
        Memory([t.view(torch.float16)], [grad], extra=["exp_avg"]),  # same address and bytes, another dtype
        Memory([t.t()], [grad], extra=["exp_avg"]),  # same address, bytes and dtype, another order
        Memory([t.clone()], [grad], extra=["exp_avg"]),  # moved
        Memory([t], [grad.double()], extra=["exp_avg"]),  # a grad of another dtype
        Memory([t], [grad.t()], extra=["exp_avg"]),  # a grad in another order
        Memory([t], [grad[:2]], extra=["exp_avg"]),  # a grad of another size
        Memory([t, t], [grad], extra=["exp_avg"]),  # another tensor
        Memory([t], [grad], extra=["exp_avg_sq"]),  # another extra
        None,  # never matches
    ):
        assert cache.get("group", changed) is None
    t.requires_grad_()  # not in the fingerprint: found, by the fingerprint, and guarded anew
    assert cache.get("group", Memory([t], [grad], extra=["exp_avg"])) == "plan"
    t.data = torch.randn(4, 4)  # the same tensor over other memory
    assert cache.get("group", Memory([t], [grad], extra=["exp_avg"])) is None
    assert cache.cache_info()[:3] == (4, 10, 1)


def test_a_guarded_plan_is_found_without_reading_a_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fingerprint reads five attributes of every tensor, one Python call each (3-4 ms a step for
    a thousand params with their states): once a plan has been found, its guard answers instead."""
    read = []
    monkeypatch.setattr(_plans, "fingerprint", lambda *tensors: read.append(1) or fingerprint(*tensors))
    tensors = [torch.randn(3) for _ in range(4)]
    cache: PlanCache[str] = PlanCache()
    cache.put("group", Memory(tensors[:3], tensors[3:]), "plan")
    assert cache.get("group", Memory(tensors[:3], tensors[3:])) == "plan"
    assert len(read) == 2  # the plan's, when put, and the first find's
    for _ in range(3):
        assert cache.get("group", Memory(tensors[:3], tensors[3:])) == "plan"
    assert len(read) == 2


def test_plans_beyond_the_count_are_dropped_oldest_first_but_not_pinned_ones() -> None:
    cache: PlanCache[int] = PlanCache(max_plans=5, recent=2)
    for key in range(8):
        cache.put(key, "memory", key, nbytes=10)
    assert _found(cache, range(8)) == [3, 4, 5, 6, 7]
    cache.get(3, "memory", pin=True)  # now the newest
    for key in range(8, 13):
        cache.put(key, "memory", key, nbytes=10)
    assert _found(cache, range(13)) == [3, 9, 10, 11, 12]
    assert cache.cache_info()[2:] == (5, 50, 1, 0)


def test_plans_beyond_the_byte_budget_are_dropped_but_not_the_newest() -> None:
    cache: PlanCache[int] = PlanCache(max_bytes=50, recent=2)
    for key in range(8):
        cache.put(key, "memory", key, nbytes=10)
    assert _found(cache, range(8)) == [3, 4, 5, 6, 7]
    cache.put(8, "memory", 8, nbytes=100)
    assert _found(cache, range(9)) == [7, 8]
    assert cache.cache_info().nbytes == 110


def test_plans_holding_staged_copies_are_kept_among_the_newest_only() -> None:
    cache: PlanCache[int] = PlanCache(recent=2)
    for key in range(5):
        cache.put(key, "memory", key, staged=True)
    for key in range(5, 7):
        cache.put(key, "memory", key)
    assert _found(cache, range(7)) == [3, 4, 5, 6]
    assert cache.cache_info().staged == 2


def test_a_pinned_plan_stays_when_a_new_plan_of_its_key_replaces_it() -> None:
    """Found no more, it still counts against the limits (its graph may replay)."""
    cache: PlanCache[str] = PlanCache(max_plans=2, recent=0)
    cache.put("group", "captured", "captured plan", nbytes=10, pin=True)
    cache.put("group", "eager", "eager plan", nbytes=10)
    assert cache.get("group", "captured") is None and cache.get("group", "eager") == "eager plan"
    cache.put("other", "memory", "other plan", nbytes=10)
    assert cache.get("group", "eager") is None and cache.get("other", "memory") == "other plan"
    assert cache.cache_info()[2:] == (2, 20, 1, 0)


# --------------------------------------------------------------------------------------------------
# memory read differently under a kept plan

# (param dtype while stepping, dtype it is then read as, which tensors are read as that dtype)
REINTERPRETATIONS = {
    # same number of values: only the dtype differs
    "bf16 as fp16": (torch.bfloat16, torch.float16, "param and state"),
    # twice the values in the same bytes
    "fp32 as bf16": (torch.float32, torch.bfloat16, "param and state"),
    # the param alone: its state no longer has its dtype, which the kernel (and torch) rejects
    "fp32 param as fp16": (torch.float32, torch.float16, "param"),
}
SHAPES = ((16,), (3, 4), (40,))


def _step_with_grads(opt: torch.optim.Optimizer, params: list[Tensor], seed: int) -> None:
    """A step with new grad values written into the same grad tensors (as ``zero_grad(set_to_none=
    False)`` and a backward do), so that the grads' pointers, which plans also check, stay put."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        if p.grad is None:
            p.grad = torch.empty_like(p)
        p.grad.copy_(torch.randn(p.shape, generator=gen))
    opt.step()


def _reinterpret(t: Tensor, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> None:
    """``t`` read as ``dtype`` from the same memory, then given values of that dtype in place (the
    old bits read as ``dtype`` may be NaN, which no bitwise comparison passes)."""
    t.data = t.data.view(dtype)
    t.data.copy_(torch.rand(t.shape, generator=gen) * scale)


def _fresh_copy(opt: torch.optim.Optimizer, params: list[Tensor], options: dict[str, Any]) -> tuple[Any, list[Tensor]]:
    """A new optimizer over copies of ``params`` (and their grads) holding copies of their state."""
    copies = [p.detach().clone().requires_grad_() for p in params]
    fresh = adamw.AdamW(copies, **options)
    for p, q in zip(params, copies, strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
        fresh.state[q] = {k: v.clone() for k, v in opt.state[p].items()}
    return fresh, copies


def _check_like_fresh(opt: torch.optim.Optimizer, params: list[Tensor], options: dict[str, Any]) -> None:
    fresh, copies = _fresh_copy(opt, params, options)
    before = snapshot(opt, params)
    try:
        fresh.step()
    except RuntimeError as expected:
        error = catch(opt.step)
        assert type(error) is type(expected), f"ours raised {error!r}, a fresh optimizer {expected!r}"
        assert_unchanged(opt, params, before)
        return
    opt.step()
    for i, (p, q) in enumerate(zip(params, copies, strict=True)):
        assert_bitwise(p, q, f"param {i}")
        for key, value in fresh.state[q].items():
            assert_bitwise(opt.state[p][key], value, f"param {i} state[{key!r}]")


@pytest.mark.parametrize("case", REINTERPRETATIONS.values(), ids=REINTERPRETATIONS.keys())
@pytest.mark.parametrize("backend", backend_params(["cpu", "triton"]))
def test_memory_read_as_another_dtype_is_not_stepped_by_the_kept_plan(
    backend: str, case: tuple[torch.dtype, torch.dtype, str], check: str
) -> None:
    old, new, which = case
    options = {"backend": backend}
    params = [torch.randn(shape).to(old).requires_grad_() for shape in SHAPES]
    opt = adamw.AdamW(params, **options)
    for seed in range(3):  # the second step runs the kept plan, the third has it by its guard
        _step_with_grads(opt, params, seed)
    gen = torch.Generator().manual_seed(2)
    for p in params:
        _reinterpret(p, new, gen)
        if which == "param and state":
            _reinterpret(opt.state[p]["exp_avg"], new, gen, 0.1)
            _reinterpret(opt.state[p]["exp_avg_sq"], new, gen, 0.01)
        _reinterpret(p.grad, new, gen)
    _check_like_fresh(opt, params, options)


@pytest.mark.parametrize("backend", backend_params(["cpu", "triton"]))
def test_low_bit_memory_read_as_another_dtype_is_not_stepped_by_the_kept_table(backend: str, check: str) -> None:
    """bf16 moments stay bf16 whatever the param's dtype: a bf16 param read as fp16 is a valid fp16
    param with its state, which a fresh optimizer steps with the fp16 code."""
    options = {"backend": backend, "state_precision": "bf16"}
    params = [torch.randn(shape).to(torch.bfloat16).requires_grad_() for shape in SHAPES]
    opt = adamw.AdamW(params, **options)
    for seed in range(3):
        _step_with_grads(opt, params, seed)
    gen = torch.Generator().manual_seed(2)
    for p in params:
        _reinterpret(p, torch.float16, gen)
        _reinterpret(p.grad, torch.float16, gen)
    _check_like_fresh(opt, params, options)


@pytest.mark.parametrize("state_precision", ["param", "bf16"])
@pytest.mark.parametrize("backend", backend_params(["cpu", "triton"]))
def test_memory_read_in_another_order_is_not_stepped_by_the_kept_plan(
    backend: str, state_precision: str, check: str
) -> None:
    """A square param transposed in place keeps its pointer, size and dtype; element (i, j) of it now
    sits where (j, i) was, and must meet element (i, j) of its grad and moments."""
    options = {"backend": backend, "state_precision": state_precision}
    params = [torch.randn(shape).requires_grad_() for shape in ((8, 8), (5,), (3, 3))]
    opt = adamw.AdamW(params, **options)
    for seed in range(3):
        _step_with_grads(opt, params, seed)
    for p in params:
        if p.dim() == 2:
            p.data = p.data.t()
    gen = torch.Generator().manual_seed(2)
    for p in params:
        p.grad.copy_(torch.randn(p.shape, generator=gen))
    _check_like_fresh(opt, params, options)
