"""adamw.AdamW with lean state (``state_precision``, ``param_update``): steps, checkpoints, errors.

The formats themselves (code tables, rounding) are tested in test_states.py; here, the optimizer's
use of them: that each mode stays near float32 AdamW, that runs reproduce from a seed, and that
checkpoints move between every format and torch.optim.AdamW.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import Tensor

import adamw
from adamw.states import KAHAN_KEY
from adamw.states.reference import sqrt_rn

# (state_precision, param_update, param dtype)
MODES = [
    ("bf16", "round", torch.float32),
    ("8bit", "round", torch.float32),
    ("param", "stochastic", torch.bfloat16),
    ("param", "kahan", torch.bfloat16),
    ("8bit", "stochastic", torch.bfloat16),
]
# How far each mode may drift from float32 AdamW after STEPS steps, relative to the params' change
# (the step moves each element by about lr; errors are a fraction of that).
DRIFT = {
    # bf16 moments: relative error 2^-8 per stored value, partly averaged by stochastic rounding.
    ("bf16", "round", torch.float32): 0.05,
    # 8-bit codes: ~4% relative error on m, ~2% on sqrt(v) (the ladder's half-gap).
    ("8bit", "round", torch.float32): 0.15,
    # bf16 params: each store loses up to 2^-8 of |p| (|p| ~ 1 >> lr), unbiased but noisy.
    ("param", "stochastic", torch.bfloat16): 0.6,
    ("param", "kahan", torch.bfloat16): 0.1,
    ("8bit", "stochastic", torch.bfloat16): 0.6,
}
STEPS = 20
LR = 1e-2


def _params(dtype: torch.dtype, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 96), (5000,), (7,), ()]  # 8-bit applies to the first two (>= 4096 values)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def _grads(params: list[Tensor], step: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def _train(opt: torch.optim.Optimizer, params: list[Tensor], steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        for p, g in zip(params, _grads(params, i), strict=True):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(str(x).replace("torch.", "") for x in m))
def test_lean_modes_stay_near_float32_adamw(mode: tuple[str, str, torch.dtype]) -> None:
    precision, update, dtype = mode
    ours = _params(dtype)
    exact = [p.detach().to(torch.float32).requires_grad_() for p in ours]
    start = [p.detach().to(torch.float32).clone() for p in ours]
    _train(adamw.AdamW(ours, lr=LR, state_precision=precision, param_update=update, seed=3), ours, STEPS)
    _train(torch.optim.AdamW(exact, lr=LR), exact, STEPS)
    for p, e, s in zip(ours, exact, start, strict=True):
        if p.numel() == 0:
            continue
        moved = (e.detach() - s).abs().max()
        drift = (p.detach().float() - e.detach()).abs().max()
        assert drift <= DRIFT[mode] * moved, f"drift {drift:.3g} vs movement {moved:.3g}"


def test_8bit_state_is_codes_and_absmax_only_for_large_params() -> None:
    params = _params(torch.float32)
    opt = adamw.AdamW(params, state_precision="8bit", amsgrad=True)
    _train(opt, params, 1)
    big, small = opt.state[params[0]], opt.state[params[2]]
    assert big["exp_avg"].dtype == torch.uint8 and big["exp_avg_absmax"].numel() == 64 * 96 // 256
    assert big["max_exp_avg_sq"].dtype == torch.uint8
    assert small["exp_avg"].dtype == torch.float32  # under 4096 values: full precision


def test_plain_bf16_is_what_stochastic_rounding_fixes() -> None:
    """Many tiny updates: round-to-nearest bf16 params stall, stochastic ones follow float32."""

    def train(update: str) -> Tensor:
        p = torch.full((8192,), 1.0, dtype=torch.bfloat16, requires_grad=True)
        opt = adamw.AdamW([p], lr=1e-4, weight_decay=0.0, param_update=update, seed=0)
        for _ in range(30):
            p.grad = torch.ones_like(p)
            opt.step()
        if update == "kahan":  # the param's value is the bf16 param plus its compensation
            return p.detach().float() + opt.state[p][KAHAN_KEY].float()
        return p.detach().float()

    expected = 1.0 - 30 * 1e-4  # a constant gradient moves each step by lr
    assert torch.all(train("round") == 1.0)  # 1e-4 is below half a bf16 step at 1.0: lost each time
    assert abs(train("stochastic").mean().item() - expected) < 2e-4
    assert abs(train("kahan").mean().item() - expected) < 2e-4


def test_seed_reproduces_a_run_and_another_seed_differs() -> None:
    def run(seed: int) -> list[Tensor]:
        params = _params(torch.bfloat16)
        _train(adamw.AdamW(params, lr=LR, state_precision="8bit", param_update="stochastic", seed=seed), params, 3)
        return [p.detach() for p in params]

    first, again, other = run(1), run(1), run(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_param_update_leaves_float32_params_to_plain_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A float32 param in a lean group is stepped as torch steps it, but for the square root: the
    lean path's is correctly rounded (so that every backend agrees), torch's float32 one not always."""
    a, b = _params(torch.float32), _params(torch.float32)
    _train(adamw.AdamW(a, lr=LR, param_update="stochastic"), a, 3)
    monkeypatch.setattr(torch.Tensor, "sqrt", sqrt_rn)
    _train(torch.optim.AdamW(b, lr=LR), b, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------------------------------
# checkpoints


def _state_equal(a: torch.optim.Optimizer, pa: list[Tensor], b: torch.optim.Optimizer, pb: list[Tensor]) -> bool:
    for x, y in zip(pa, pb, strict=True):
        sa, sb = a.state[x], b.state[y]
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(str(x).replace("torch.", "") for x in m))
def test_checkpoint_round_trip_resumes_exactly(mode: tuple[str, str, torch.dtype]) -> None:
    precision, update, dtype = mode
    options = dict(lr=LR, state_precision=precision, param_update=update, seed=5)
    params = _params(dtype)
    opt = adamw.AdamW(params, **options)
    _train(opt, params, 2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)

    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = adamw.AdamW(resumed_params, **options)
    resumed.load_state_dict(torch.load(buffer))
    assert _state_equal(opt, params, resumed, resumed_params)
    _train(opt, params, 2, start=2)
    _train(resumed, resumed_params, 2, start=2)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params, strict=True))
    assert _state_equal(opt, params, resumed, resumed_params)


@pytest.mark.parametrize("precision", ["bf16", "8bit"])
def test_torch_checkpoint_converts_into_lean_state_and_back(precision: str) -> None:
    params = _params(torch.float32)
    theirs = torch.optim.AdamW(params, lr=LR)
    _train(theirs, params, 3)

    lean_params = [p.detach().clone().requires_grad_() for p in params]
    lean = adamw.AdamW(lean_params, lr=LR, state_precision=precision)
    lean.load_state_dict(theirs.state_dict())
    stored = lean.state[lean_params[0]]["exp_avg"].dtype
    assert stored == (torch.uint8 if precision == "8bit" else torch.bfloat16)
    assert lean.param_groups[0]["state_precision"] == precision  # the live format wins over the checkpoint's

    # Back to torch: full precision, torch's keys, values within the format's rounding of torch's own.
    back = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params], lr=LR)
    back.load_state_dict(lean.full_precision_state_dict())
    tolerance = 0.05 if precision == "8bit" else 0.01  # the codes' relative half-gap; bf16's 2^-8
    for p, q in zip(params, back.param_groups[0]["params"], strict=True):
        original, loaded = theirs.state[p], back.state[q]
        assert loaded.keys() == original.keys()
        assert loaded["exp_avg"].dtype == torch.float32
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(
                loaded[key],
                original[key],
                rtol=tolerance,
                atol=1e-12 + tolerance * original[key].abs().max().item() / 100,
            )
    _train(back, back.param_groups[0]["params"], 1, start=3)  # torch steps from it


def test_lean_checkpoint_loads_into_a_full_precision_optimizer() -> None:
    params = _params(torch.bfloat16)
    lean = adamw.AdamW(params, state_precision="8bit", param_update="kahan")
    _train(lean, params, 2)
    plain = adamw.AdamW([p.detach().clone().requires_grad_() for p in params])
    plain.load_state_dict(lean.state_dict())
    state = plain.state[plain.param_groups[0]["params"][0]]
    assert state["exp_avg"].dtype == torch.bfloat16  # the param's dtype, as torch keeps it
    assert KAHAN_KEY not in state  # a round-to-nearest optimizer has no compensation buffer
    assert plain.param_groups[0]["state_precision"] == "param"


def test_kahan_buffer_is_created_when_loading_a_checkpoint_without_one() -> None:
    params = _params(torch.bfloat16)
    plain = adamw.AdamW(params)
    _train(plain, params, 1)
    kahan = adamw.AdamW(params, param_update="kahan")
    kahan.load_state_dict(plain.state_dict())
    assert torch.count_nonzero(kahan.state[params[0]][KAHAN_KEY]) == 0
    _train(kahan, params, 1, start=1)


def test_incomplete_8bit_checkpoint_is_refused_before_any_change() -> None:
    params = _params(torch.float32)
    opt = adamw.AdamW(params, state_precision="8bit")
    _train(opt, params, 1)
    broken = copy.deepcopy(opt.state_dict())
    del broken["state"][0]["exp_avg_absmax"]
    target = adamw.AdamW([p.detach().clone().requires_grad_() for p in params], state_precision="8bit")
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        target.load_state_dict(broken)


# --------------------------------------------------------------------------------------------------
# options


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(state_precision="int8"), "state_precision must be one of"),
        (dict(param_update="nearest"), "param_update must be one of"),
        (dict(state_precision="8bit", differentiable=True), "differentiable"),
        (dict(param_update="kahan", capturable=True), "capturable"),
        (dict(seed=1.5), "seed must be an int"),
    ],
)
def test_bad_lean_options_are_refused(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        adamw.AdamW(_params(torch.float32), **options)


@pytest.mark.parametrize("fused", [None, True], ids=["scaler-unscales", "in-step-unscale"])
def test_grad_scaler_with_lean_state_skips_an_inf_step(fused: bool | None) -> None:
    """With fused=True GradScaler hands grad_scale/found_inf to step(); the lean path honours them."""
    params = _params(torch.float32)
    opt = adamw.AdamW(params, lr=LR, state_precision="8bit", fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    _train(opt, params, 1)
    scaler.scale(torch.ones(()))  # the scaler's scale starts with the first scaled loss
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    after = opt.state_dict()["state"]
    assert all(torch.equal(state_before[i][k], after[i][k]) for i in state_before for k in state_before[i])
    assert scaler.get_scale() == 2.0**3  # the inf was seen

    # A finite scaled step: the lean path divides by the scale, so it matches an unscaled step.
    reference = [p.detach().clone().requires_grad_() for p in params]
    plain = adamw.AdamW(reference, lr=LR, state_precision="8bit")
    plain.load_state_dict(copy.deepcopy(opt.state_dict()))  # loading in memory shares tensors
    grads = _grads(params, 7)
    for p, q, g in zip(params, reference, grads, strict=True):
        p.grad, q.grad = g * scaler.get_scale(), g.clone()
    scaler.step(opt)
    plain.step()
    # Bit for bit: the scale is a power of two, and the kernel and the reference round alike.
    assert all(torch.equal(a, b) for a, b in zip(params, reference, strict=True))


# How GradScaler reaches the lean step: a fused optimizer takes grad_scale/found_inf into step(); for
# the for-loop path GradScaler unscales the grads itself and skips step(), or (an optimizer that
# declares _step_supports_amp_scaling) hands them over as to a fused one, and the step skips itself.
SCALER_PATHS = {
    "fused-cpu": ({"fused": True}, False),
    "forloop": ({"backend": "forloop"}, False),
    "forloop-in-step": ({"backend": "forloop"}, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", SCALER_PATHS)
def test_a_scaler_skipped_step_leaves_8bit_state_untouched(path: str, dtype: torch.dtype) -> None:
    """One inf in one grad: GradScaler skips the step, and the 8-bit state (codes, absmaxes, step
    counters) and the params stay bit for bit as they were. An inf that reached a block would make
    its absmax non-finite and its 256 values NaN from then on (README, "Lean state"). The next finite step
    is the one an optimizer that never saw the inf takes (its stochastic rounding keyed by the same
    step number)."""
    options, in_step = SCALER_PATHS[path]
    param_update = "stochastic" if dtype == torch.bfloat16 else "round"
    params, twin = _params(dtype), _params(dtype)
    opt, twin_opt = (
        adamw.AdamW(ps, lr=LR, state_precision="8bit", param_update=param_update, seed=5, **options)
        for ps in (params, twin)
    )
    if in_step:
        opt._step_supports_amp_scaling = True
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def scaled_step(grads: list[Tensor]) -> None:
        # d(loss)/dp = grad * scale, as a scaled loss's backward gives it
        loss = sum((p.float() * g.float()).sum() for p, g in zip(params, grads, strict=True))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    def twin_step(grads: list[Tensor]) -> None:
        for p, g in zip(twin, grads, strict=True):
            p.grad = g.clone()
        twin_opt.step()

    for i in range(2):
        scaled_step(_grads(params, i))
        twin_step(_grads(params, i))
    state = opt.state[params[0]]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_sq_absmax"].dtype == torch.float32
    before = [p.detach().clone() for p in params]
    state_before = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]

    grads = _grads(params, 2)
    grads[1][17] = float("inf")  # one element of one 8-bit param's grad
    scaled_step(grads)
    assert scaler.get_scale() == 2.0**9, "the inf was seen"
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), before[i]), f"param {i}"
        assert opt.state[p].keys() == state_before[i].keys()
        for key, value in state_before[i].items():
            assert torch.equal(opt.state[p][key], value), f"param {i}, state[{key!r}]"

    scaled_step(_grads(params, 3))
    twin_step(_grads(params, 3))
    for i, (p, q) in enumerate(zip(params, twin, strict=True)):
        assert torch.equal(p.detach(), q.detach()), f"param {i}"
        for key, value in twin_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value), f"param {i}, state[{key!r}]"
    assert opt.state[params[0]]["step"].item() == 3
