"""The fused CPU kernel (``fused=True`` on CPU tensors): its own rounding against torch's fused kernel,
the work split (threads, vector and scalar loops), checkpoints and training beside torch's fused
AdamW, the guards on its inputs, and what happens without a compiler (the cache:
tests/test_native_cache.py). Its accuracy against the float64 reference is test_reference.py's, its
GradScaler contract test_grad_scaler.py's.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import adamw
from _helpers import CLOSE, CLOSE_ULPS, FUSED_DTYPES, drive, make_grads, make_params
from adamw.backends import _native, cpu
from adamw.backends._common import Hyper

STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def contiguous_leaves(params: list[Tensor]) -> list[Tensor]:
    """Contiguous copies, for torch's fused kernel: it walks a non-dense param as if it were dense."""
    return [p.detach().clone(memory_format=torch.contiguous_format).requires_grad_() for p in params]


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.3, 0.9)], ids=["lerp-from-start", "lerp-from-end"])
def test_matches_torch_fused_outside_its_scalar_tail(betas: tuple[float, float]) -> None:
    """Ours rounds as torch's vector loop: bit for bit on every element a vector loop covers.

    A tensor whose size is a multiple of 64 has no scalar tail at any vector width.
    """
    p0 = torch.randn(64 * 700, generator=torch.Generator().manual_seed(3))
    ours, theirs = contiguous_leaves([p0]), contiguous_leaves([p0])
    opt_ours = adamw.AdamW(ours, fused=True, betas=betas, amsgrad=True, weight_decay=0.1)
    opt_theirs = torch.optim.AdamW(theirs, fused=True, betas=betas, amsgrad=True, weight_decay=0.1)
    drive(opt_ours, ours, range(4), all_steps=True)
    drive(opt_theirs, theirs, range(4), all_steps=True)
    assert torch.equal(ours[0], theirs[0])
    for k in STATE_KEYS:
        assert torch.equal(opt_ours.state[ours[0]][k], opt_theirs.state[theirs[0]][k]), k


# --------------------------------------------------------------------------------------------------
# the work split


def _hyper(**kw: Any) -> Hyper:
    base: dict[str, Any] = dict(
        lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=False, maximize=False,
        capturable=False, differentiable=False,
    )  # fmt: skip
    return Hyper(**{**base, **kw})


def _step_backend(params: list[Tensor], grads: list[Tensor], states: dict[str, list[Tensor]], hyper: Hyper) -> None:
    cpu.step(params, grads, states["exp_avg"], states["exp_avg_sq"], states["max_exp_avg_sq"], states["step"], hyper)


def _fresh_states(params: list[Tensor], amsgrad: bool) -> dict[str, list[Tensor]]:
    return {
        "exp_avg": [torch.zeros_like(p) for p in params],
        "exp_avg_sq": [torch.zeros_like(p) for p in params],
        "max_exp_avg_sq": [torch.zeros_like(p) for p in params] if amsgrad else [],
        "step": [torch.zeros((), dtype=torch.float32) for _ in params],
    }


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
def test_many_tensors_step_exactly_as_their_concatenation(dtype: torch.dtype) -> None:
    """Chunks cut across tensor boundaries, on 1, 2 and 3 threads, leave no element out or twice."""
    gen = torch.Generator().manual_seed(5)
    sizes = torch.randint(0, 3000, (120,), generator=gen).tolist()  # ~180K values, some tensors empty
    whole = torch.randn(sum(sizes), generator=gen).to(dtype)
    whole_grads = [torch.randn(sum(sizes), generator=gen).to(dtype) for _ in range(3)]
    one = [whole.clone()]
    one_states = _fresh_states(one, amsgrad=True)
    for g in whole_grads:
        _step_backend(one, [g.clone()], one_states, _hyper(amsgrad=True))

    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            many = [t.clone() for t in whole.split(sizes)]
            states = _fresh_states(many, amsgrad=True)
            for g in whole_grads:
                _step_backend(many, [t.clone() for t in g.split(sizes)], states, _hyper(amsgrad=True))
            assert torch.equal(torch.cat(many), one[0]), f"{n} threads"
            for k in STATE_KEYS:
                assert torch.equal(torch.cat(states[k]), one_states[k][0]), f"{k}, {n} threads"
            assert all(s.item() == 3 for s in states["step"])
    finally:
        torch.set_num_threads(threads)


_INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}
_PAYLOAD_NAN = {
    torch.float32: 0x7FC01234,
    torch.float64: 0x7FF8000000001234,
    torch.bfloat16: 0x7FC5,
    torch.float16: 0x7E05,
}


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@pytest.mark.parametrize(
    "flags",
    # beta2 = 0.9 with amsgrad: where the grads are small, v falls by 10% a step, visibly even in
    # bfloat16, and max_exp_avg_sq must keep the old maximum
    [{}, {"amsgrad": True, "maximize": True, "grad_scale": torch.tensor(4.0), "beta2": 0.9}],
    ids=["plain", "amsgrad-maximize-unscale"],
)
def test_vector_loop_rounds_as_the_scalar_loop(dtype: torch.dtype, flags: dict[str, Any]) -> None:
    """A long tensor runs the vector loop (AVX-512 conversions for 16-bit types where the CPU has
    them), one-value tensors the scalar one: the same bits, subnormals, zeros, infinities and NaNs
    included (compared as integers, so NaN payloads count)."""
    gen = torch.Generator().manual_seed(6)
    values = [torch.randn(512, generator=gen) for _ in range(4)]
    values[2], values[3] = values[2].abs() * 0.1, values[3].abs() * 0.01  # moments: v >= 0
    for v in values:
        v[::7] *= 1e-39  # float32/bfloat16 subnormals
        v[3::11] *= 1e-6  # float16 subnormals
        v[5::13] = 0.0
    values[1][17], values[1][40], values[0][99] = float("nan"), float("-inf"), float("-nan")
    values[1][1::3] *= 1e-3  # small grads: there v falls (see the amsgrad case's beta2)
    hyper = _hyper(**flags)
    results = []
    for split in (False, True):
        tensors = [v.to(dtype, copy=True) for v in values]  # a copy for float32 too: both runs start alike
        tensors[1].view(_INT_VIEW[dtype])[23] = _PAYLOAD_NAN[dtype]  # a NaN that carries a payload
        lists = [list(t.split(1)) if split else [t] for t in tensors]
        states = {"exp_avg": lists[2], "exp_avg_sq": lists[3], "step": [torch.zeros(()) for _ in lists[0]]}
        states["max_exp_avg_sq"] = [t.clone() for t in lists[3]] if flags.get("amsgrad") else []
        for _ in range(2):
            _step_backend(lists[0], lists[1], states, hyper)
        maxima = [torch.cat([t.reshape(-1) for t in states["max_exp_avg_sq"]])] if flags.get("amsgrad") else []
        results.append([t.view(_INT_VIEW[dtype]) for t in [*tensors, *maxima]])
    names = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    for name, whole, one_by_one in zip(names, *results, strict=False):
        assert torch.equal(whole, one_by_one), name


def test_float64_step_counters_count_alike() -> None:
    """backend="cpu" keeps a loaded checkpoint's counters as they are: float64 ones must work too."""
    results = []
    for step_dtype in (torch.float32, torch.float64):
        params = [torch.randn(100, generator=torch.Generator().manual_seed(2))]
        states = _fresh_states(params, amsgrad=False)
        states["step"] = [torch.zeros((), dtype=step_dtype)]
        for s in range(3):
            _step_backend(params, make_grads(params, s, all_steps=True), states, _hyper())
        assert states["step"][0].dtype == step_dtype and states["step"][0].item() == 3
        results.append(params[0])
    assert torch.equal(results[0], results[1])


def test_a_group_of_mixed_dtypes_steps_each_dtype() -> None:
    params = [torch.randn(300, dtype=d) for d in (torch.float32, torch.bfloat16, torch.float32, torch.float64)]
    ours, theirs = contiguous_leaves(params), contiguous_leaves(params)
    opt_ours, opt_theirs = adamw.AdamW(ours, fused=True), torch.optim.AdamW(theirs, fused=True)
    drive(opt_ours, ours, range(3))
    drive(opt_theirs, theirs, range(3))
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.dtype == b.dtype
        CLOSE_ULPS["fused kernel vs torch's, mixed dtypes"].tol(a.dtype).assert_close(a, b, f"param {i}")


# --------------------------------------------------------------------------------------------------
# checkpoints and training


@pytest.mark.parametrize("direction", ["ours-to-torch", "torch-to-ours"])
def test_checkpoint_round_trip_with_torch_fused(direction: str) -> None:
    gen = torch.Generator().manual_seed(11)
    # make_params' layouts, plus odd sizes and one over the kernel's threshold for threads
    params = make_params(torch.float32, seed=11) + [
        torch.randn(s, generator=gen) for s in ((37, 5), (1000,), (3, 12_000))
    ]
    first, second = (
        (adamw.AdamW, torch.optim.AdamW) if direction == "ours-to-torch" else (torch.optim.AdamW, adamw.AdamW)
    )
    a = contiguous_leaves(params)
    opt_a = first(a, fused=True, amsgrad=True)
    drive(opt_a, a, range(3))
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)  # a real checkpoint: a state_dict alone shares its tensors
    buffer.seek(0)
    saved = torch.load(buffer)

    b = contiguous_leaves(a)
    opt_b = second(b, fused=True, amsgrad=True)
    opt_b.load_state_dict(saved)
    for p, q in zip(a, b, strict=True):
        for k, v in opt_a.state[p].items():
            assert torch.equal(opt_b.state[q][k], v) and opt_b.state[q][k].dtype == v.dtype, k
    drive(opt_a, a, range(3, 6))
    drive(opt_b, b, range(3, 6))
    for p, q in zip(a, b, strict=True):
        CLOSE["fused kernel vs torch's, after a checkpoint"].assert_close(q, p)
        assert torch.equal(opt_b.state[q]["step"], opt_a.state[p]["step"])


def test_training_a_model_tracks_torch_fused() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.LayerNorm(64), torch.nn.Linear(64, 10)
    )
    twin = copy.deepcopy(model)
    opt = adamw.AdamW(model.parameters(), lr=3e-3, fused=True)
    opt_twin = torch.optim.AdamW(twin.parameters(), lr=3e-3, fused=True)
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    losses = []
    for _ in range(8):
        for m, o in ((model, opt), (twin, opt_twin)):
            o.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            o.step()
            losses.append(loss.item())
    assert losses[-2] < losses[0], "training lowers the loss"
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        CLOSE["fused kernel vs torch's, float32 model"].assert_close(a, b)


# --------------------------------------------------------------------------------------------------
# guarding the kernel's memory


def test_mismatched_inputs_raise_instead_of_reaching_the_kernel() -> None:
    params = [torch.randn(100), torch.randn(50)]
    grads = [torch.randn(100), torch.randn(50)]
    states = _fresh_states(params, amsgrad=False)
    _step_backend(params, grads, states, _hyper())  # builds and caches the group's plan
    cases: dict[str, Callable[[dict[str, list[Tensor]]], None]] = {
        "a state view of the same memory, smaller": lambda s: s["exp_avg"].__setitem__(1, s["exp_avg"][1][:10]),
        "a state of another size": lambda s: s["exp_avg_sq"].__setitem__(0, torch.zeros(99)),
        "a state of another dtype": lambda s: s["exp_avg"].__setitem__(0, torch.zeros(100, dtype=torch.float64)),
        "a step counter of an integer dtype": lambda s: s["step"].__setitem__(0, torch.zeros((), dtype=torch.int64)),
    }
    for name, corrupt in cases.items():
        broken = {k: list(v) for k, v in states.items()}
        corrupt(broken)
        with pytest.raises(RuntimeError, match="fused CPU kernel"):
            _step_backend(params, grads, broken, _hyper())
            pytest.fail(f"not caught: {name}")
    with pytest.raises(RuntimeError, match="fused CPU kernel"):
        _step_backend(params, [grads[0], torch.randn(49)], states, _hyper())
    with pytest.raises(RuntimeError, match="fused CPU kernel"):
        _step_backend(params, [grads[0], torch.randn(50, dtype=torch.float64)], states, _hyper())


# --------------------------------------------------------------------------------------------------
# without a compiler (the cache: tests/test_native_cache.py)


@pytest.fixture
def fresh_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next use of the backend builds its library afresh; undone after the test."""
    monkeypatch.setattr(_native, "_loaded", {})


@pytest.mark.parametrize("compiler", ["missing", "failing", "misnamed"])
@pytest.mark.usefixtures("fresh_build")
def test_without_a_working_compiler_fused_raises_before_any_change(
    compiler: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADAMW_CACHE_DIR", str(tmp_path))
    if compiler == "missing":
        monkeypatch.setenv("PATH", str(tmp_path))
        monkeypatch.delenv("CC", raising=False)
        expected = "no C compiler was found"
    elif compiler == "misnamed":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        expected = "names no executable"
    else:
        fake = tmp_path / "fake-cc"
        fake.write_text("#!/bin/sh\necho 'fake-cc: cannot compile' >&2\nexit 1\n")
        fake.chmod(0o755)
        monkeypatch.setenv("CC", str(fake))
        expected = "could not be compiled(.|\n)*fake-cc: cannot compile"
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    opt = adamw.AdamW([p], fused=True)
    with pytest.raises(RuntimeError, match=expected):
        opt.step()
    assert torch.equal(p, torch.ones(4)) and len(opt.state) == 0, "nothing changes"
