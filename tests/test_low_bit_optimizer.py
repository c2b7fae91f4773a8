"""adamw.AdamW with low-bit state (``state_precision``, ``param_update``): steps, checkpoints, errors.

The formats themselves (code tables, quantization, rounding, conversions) are tested in
test_states.py; here, the optimizer's use of them, on the for-loop backend (the low-bit reference,
which the kernels match bit for bit: test_low_bit_kernels.py): that each format stays near float32
AdamW, that the param updates keep what round-to-nearest loses, that an 8-bit step never blows up and
bf16 moments decay, that runs reproduce from a seed, and that checkpoints move between every format
and torch.optim.AdamW. GradScaler: test_grad_scaler.py.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import Tensor

import adamw
from _helpers import DRIFT, FORMATS, ROUND_TRIP, assert_same_run
from adamw.backends.forloop import sqrt_rn
from adamw.states import KAHAN_KEY, Code
from adamw.states import formats as formats_module

# Small tensors: one thread is faster by far.
pytestmark = pytest.mark.usefixtures("one_thread")

LR = 1e-2
# The low-bit formats, with the param dtype each is drifting in (param_update applies to bf16 params).
MODES = [
    ("bf16", torch.float32),
    ("8bit", torch.float32),
    ("param-stochastic", torch.bfloat16),
    ("param-kahan", torch.bfloat16),
    ("8bit-stochastic", torch.bfloat16),
    ("4bit", torch.float32),
    ("4bit-stochastic", torch.bfloat16),
]


def _mode_id(mode: tuple[str, torch.dtype]) -> str:
    return f"{mode[0]}-{str(mode[1]).removeprefix('torch.')}"


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


def _low_bit(params: list[Tensor], storage: str, **options: Any) -> adamw.AdamW:
    return adamw.AdamW(params, backend="forloop", **FORMATS[storage], **options)


# --------------------------------------------------------------------------------------------------
# steps


def _row_scaled(steps: int) -> tuple[list[Tensor], list[list[Tensor]]]:
    """A 64x128 param whose rows have gradient scales from 1e-2 to 1e2 and a common drift."""
    g = torch.Generator().manual_seed(9)
    p0 = torch.randn(64, 128, generator=g) * 0.1
    scales = 10 ** (torch.rand(64, 1, generator=g) * 4 - 2)
    return [p0], [[torch.randn(64, 128, generator=g) * scales + 0.3 * scales] for _ in range(steps)]


def _odd_shapes(steps: int) -> tuple[list[Tensor], list[list[Tensor]]]:
    """:func:`_params` (8-bit and float32 moments in one group, a 0-d param) on random grads."""
    params = [p.detach() for p in _params(torch.float32)]
    return params, [_grads(params, i) for i in range(steps)]


# The runs a drift is measured on: their data, steps and weight decay.
RUNS = {"row-scaled": (_row_scaled, 50, 0.1), "odd-shapes": (_odd_shapes, 20, 0.01)}


def _drift(storage: str, dtype: torch.dtype, run: str, lr: float = LR) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(start, float32 AdamW's params, ours) per param after ``run``."""
    data, steps, weight_decay = RUNS[run]
    init, grads = data(steps)
    ours = [p.to(dtype).clone().requires_grad_() for p in init]
    start = [p.detach().float().clone() for p in ours]  # where ours starts, in float32
    exact = [p.clone().requires_grad_() for p in start]
    opt = _low_bit(ours, storage, lr=lr, weight_decay=weight_decay, seed=3)
    torch_opt = torch.optim.AdamW(exact, lr=lr, weight_decay=weight_decay)
    for step_grads in grads:
        for p, q, g in zip(ours, exact, step_grads, strict=True):
            p.grad, q.grad = g.to(dtype), g.clone()
        opt.step()
        torch_opt.step()
    return [(s, e.detach(), p.detach().float()) for s, e, p in zip(start, exact, ours, strict=True)]


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
def test_low_bit_formats_stay_near_float32_adamw(mode: tuple[str, torch.dtype], run: str) -> None:
    """Ours against float32 AdamW from the same (rounded) start, relative to how far the params moved:
    in norm over a long run of row-scaled grads, in the largest element per param of a group."""
    storage, dtype = mode
    bound = DRIFT[storage, run]
    for i, (start, exact, ours) in enumerate(_drift(storage, dtype, run)):
        if ours.numel() == 0:
            continue
        if run == "row-scaled":
            drift, moved = (ours - exact).norm(), (exact - start).norm()
        else:
            drift, moved = (ours - exact).abs().max(), (exact - start).abs().max()
        assert drift <= bound.bound * moved, f"param {i}: drift {drift:.3g} vs movement {moved:.3g} ({bound.reason})"


def test_plain_bf16_params_lose_the_updates_that_stochastic_and_kahan_keep() -> None:
    """Many updates below half a bf16 step: round-to-nearest bf16 params stall, stochastic rounding
    is noisy element by element but unbiased (the mean survives), Kahan keeps them in its buffer."""

    def constant(param_update: str) -> Tensor:
        """30 steps of a constant gradient from 1.0: each moves by lr = 1e-4, below half a bf16 step."""
        p = torch.full((8192,), 1.0, dtype=torch.bfloat16, requires_grad=True)
        opt = _low_bit([p], f"param-{param_update}" if param_update != "round" else "param", lr=1e-4, weight_decay=0.0)
        for _ in range(30):
            p.grad = torch.ones_like(p)
            opt.step()
        if param_update == "kahan":  # the param's value is the bf16 param plus its compensation
            return p.detach().float() + opt.state[p][KAHAN_KEY].float()
        return p.detach().float()

    expected = 1.0 - 30 * 1e-4
    assert torch.all(constant("round") == 1.0)
    assert abs(constant("stochastic").mean().item() - expected) < 2e-4
    assert abs(constant("kahan").mean().item() - expected) < 2e-4

    def displacement_error(param_update: str) -> float:
        """Row-scaled grads at lr 1e-4 move |p| ~ 0.1 by less than half a bf16 step (2^-12) a step."""
        storage = f"param-{param_update}" if param_update != "round" else "param"
        [(start, exact, ours)] = _drift(storage, torch.bfloat16, "row-scaled", lr=1e-4)
        return abs(float((ours - exact).mean() / (exact - start).mean()))

    assert displacement_error("round") > 0.5
    assert displacement_error("stochastic") < 0.05
    assert displacement_error("kahan") < 0.01  # the param itself, without its compensation


def _largest_steps(storage: str, steps: int) -> float:
    """The largest change of any element in one quantized step, over a history built to break a code
    for v with a zero: element 0 of each block sees one huge gradient at step 1 and nothing after (it
    holds its block's v absmax for long); element 1 sees a tiny gradient every other step (its v is
    ~1e-13 of that absmax, below any ladder) while its m is the largest of the block once element 0's
    m has decayed. A v decoded to 0 would make element 1's step lr * m / eps."""
    param = torch.zeros(16, 256, requires_grad=True)
    opt = _low_bit([param], storage, lr=LR, weight_decay=0.0)
    largest = 0.0
    for t in range(steps):
        param.grad = torch.zeros(16, 256)
        if t == 0:
            param.grad[:, 0] = 1e3
        param.grad[:, 1] = 1e-5 if t % 2 else 0.0
        before = param.detach().clone()
        opt.step()
        largest = max(largest, float((param.detach() - before).abs().max()))
    return largest


@pytest.mark.parametrize("storage", ["8bit", "4bit"])
def test_quantized_step_never_blows_up(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Adam's own bound is about 3.2 lr with these betas; allow the ladder's error on top.
    assert _largest_steps(storage, 200) <= 3.5 * LR
    # The same history with a zero code for v blows up: the check above can fail.
    fmt = formats_module.INT8 if storage == "8bit" else formats_module.INT4
    unsigned = fmt.codes["exp_avg_sq"]
    with_zero = Code("with-zero", (0.0, *unsigned.magnitudes[1:]), signed=False, bits=unsigned.bits)
    monkeypatch.setitem(fmt.codes, "exp_avg_sq", with_zero)
    assert _largest_steps(storage, 200) > 100 * LR


@pytest.mark.parametrize("backend", ["forloop", "cpu"])
@pytest.mark.parametrize("storage", ["8bit", "4bit"])
def test_quantized_moments_add_no_nan_or_inf(storage: str, backend: str) -> None:
    """Grads scaled from 1e-30 to 1e30 (g^2 overflows float32 at the top, in torch's AdamW too), then
    1000 steps of zero grads: our params are finite wherever float32 AdamW's are, and our moments in
    every row (a whole number of blocks) where all of torch's are (an inf v spreads to its block)."""
    g = torch.Generator().manual_seed(11)
    init = torch.randn(8, 1024, generator=g)
    ours, theirs = init.clone().requires_grad_(), init.clone().requires_grad_()
    opt = adamw.AdamW([ours], lr=LR, backend=backend, state_precision=storage)
    torch_opt = torch.optim.AdamW([theirs], lr=LR)

    def check(when: str) -> None:
        assert bool(torch.isfinite(ours[torch.isfinite(theirs)]).all()), f"{when}: param not finite where torch's is"
        state = formats_module.convert_state(opt.state[ours], ours, "param")
        for key in ("exp_avg", "exp_avg_sq"):
            rows = torch.isfinite(torch_opt.state[theirs][key]).all(dim=1)
            assert bool(torch.isfinite(state[key][rows]).all()), f"{when}: {key} not finite where torch's is"

    for exponent in range(-30, 31, 6):
        # each row at its own scale around 10^exponent, each element's sign and size random
        scale = 10.0 ** (exponent + torch.randint(-3, 4, (8, 1), generator=g).float())
        grad = torch.randn(8, 1024, generator=g) * scale
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        torch_opt.step()
        check(f"grads ~1e{exponent}")
    for _ in range(1000):
        ours.grad, theirs.grad = torch.zeros_like(ours), torch.zeros_like(theirs)
        opt.step()
        torch_opt.step()
    check("after 1000 zero-grad steps")
    assert bool(torch.isfinite(theirs).all())  # the check above compared something


def test_bf16_moments_decay_without_gradient() -> None:
    """Rounded to nearest, a bf16 v could never shrink at beta2 = 0.999 (0.1% < half a bf16 step)."""
    param = torch.zeros(4096, requires_grad=True)
    opt = _low_bit([param], "bf16", weight_decay=0.0)
    param.grad = torch.zeros(4096)
    opt.step()  # creates the state
    opt.state[param]["exp_avg_sq"].fill_(1.0)
    steps = 299
    for _ in range(steps):
        opt.step()
    assert abs(float(opt.state[param]["exp_avg_sq"].float().mean()) / 0.999**steps - 1) < 0.01


@pytest.mark.parametrize(("storage", "codes", "block"), [("8bit", 64 * 96, 256), ("4bit", 64 * 96 // 2, 128)])
def test_quantized_state_is_codes_and_absmax_only_for_large_params(storage: str, codes: int, block: int) -> None:
    params = _params(torch.float32)
    opt = _low_bit(params, storage, amsgrad=True)
    _train(opt, params, 1)
    big, small = opt.state[params[0]], opt.state[params[2]]
    assert big["exp_avg"].dtype == torch.uint8 and big["exp_avg"].numel() == codes
    assert big["exp_avg_absmax"].numel() == 64 * 96 // block
    assert big["max_exp_avg_sq"].dtype == torch.uint8 and big["max_exp_avg_sq"].numel() == codes
    assert small["exp_avg"].dtype == torch.float32  # under 4096 values: full precision


def test_seed_reproduces_a_run_and_another_seed_differs() -> None:
    def run(seed: int) -> tuple[adamw.AdamW, list[Tensor]]:
        params = _params(torch.bfloat16)
        opt = _low_bit(params, "8bit-stochastic", lr=LR, seed=seed)
        _train(opt, params, 3)
        return opt, params

    (first, a), (again, b), (_, c) = run(1), run(1), run(2)
    assert_same_run(first, again, a, b, "seed 1 twice")
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64], ids=str)
def test_param_update_leaves_other_params_to_torchs_step(
    dtype: torch.dtype, amsgrad: bool, maximize: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A param that is not bfloat16 in a stochastic-rounding group is stepped as torch steps it, state
    and all, but for the square root: the low-bit path's is correctly rounded (so that every backend
    agrees), torch's float32 one not always; given the same, the two agree bit for bit."""
    g = torch.Generator().manual_seed(8)
    init = [torch.randn(33, 65, generator=g).to(dtype)] + [p.detach().to(dtype) for p in _params(torch.float32)]
    ours, theirs = [p.clone().requires_grad_() for p in init], [p.clone().requires_grad_() for p in init]
    options = dict(lr=LR, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize)
    opt = _low_bit(ours, "param-stochastic", **options)
    torch_opt = torch.optim.AdamW(theirs, foreach=False, **options)
    monkeypatch.setattr(torch.Tensor, "sqrt", sqrt_rn)
    for _ in range(12):
        grads = [torch.randn(p.shape, generator=g).to(dtype) for p in init]
        for p, q, grad in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = grad, grad.clone()
        opt.step()
        torch_opt.step()
    assert_same_run(opt, torch_opt, ours, theirs)


# --------------------------------------------------------------------------------------------------
# checkpoints


# Every low-bit format on bf16 params (param_update applies to them) and torch's own, and the formats
# of float32 params that keep float32 params.
CHECKPOINT_CASES = [(storage, torch.bfloat16) for storage in FORMATS] + [
    ("bf16", torch.float32),
    ("8bit", torch.float32),
    ("4bit", torch.float32),
]


@pytest.mark.parametrize(("storage", "dtype"), CHECKPOINT_CASES, ids=[_mode_id(case) for case in CHECKPOINT_CASES])
def test_checkpoint_round_trip_resumes_exactly(storage: str, dtype: torch.dtype) -> None:
    """Through torch.save, every state entry (8-bit codes and absmaxes, Kahan buffers) as it was, and
    the resumed run the same run, bit for bit."""
    options = dict(lr=LR, amsgrad=True, weight_decay=0.1, seed=5)
    params = _params(dtype)
    opt = _low_bit(params, storage, **options)
    _train(opt, params, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)

    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = _low_bit(resumed_params, storage, **options)
    resumed.load_state_dict(torch.load(buffer))
    assert_same_run(resumed, opt, resumed_params, params, "loaded")
    _train(opt, params, 3, start=3)
    _train(resumed, resumed_params, 3, start=3)
    assert_same_run(resumed, opt, resumed_params, params, "resumed")


@pytest.mark.parametrize("storage", ["bf16", "8bit", "4bit"])
def test_torch_checkpoint_converts_into_low_bit_state_and_back(storage: str) -> None:
    params = _params(torch.float32)
    theirs = torch.optim.AdamW(params, lr=LR)
    _train(theirs, params, 3)

    low_bit_params = [p.detach().clone().requires_grad_() for p in params]
    low_bit = _low_bit(low_bit_params, storage, lr=LR)
    low_bit.load_state_dict(theirs.state_dict())
    stored = low_bit.state[low_bit_params[0]]["exp_avg"].dtype
    assert stored == (torch.bfloat16 if storage == "bf16" else torch.uint8)
    assert low_bit.param_groups[0]["state_precision"] == storage  # the live format wins over the checkpoint's

    # Back to torch: full precision, torch's keys, values within the format's rounding of torch's own.
    back = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params], lr=LR)
    back.load_state_dict(low_bit.full_precision_state_dict())
    for i, (p, q) in enumerate(zip(params, back.param_groups[0]["params"], strict=True)):
        original, loaded = theirs.state[p], back.state[q]
        assert loaded.keys() == original.keys()
        assert loaded["exp_avg"].dtype == torch.float32
        for key in ("exp_avg", "exp_avg_sq"):
            ROUND_TRIP[storage].assert_close(loaded[key], original[key], f"param {i} {key}")
    _train(back, back.param_groups[0]["params"], 1, start=3)  # torch steps from it


def test_low_bit_checkpoint_loads_into_a_full_precision_optimizer() -> None:
    params = _params(torch.bfloat16)
    low_bit = _low_bit(params, "8bit-kahan")
    _train(low_bit, params, 2)
    plain = adamw.AdamW([p.detach().clone().requires_grad_() for p in params])
    plain.load_state_dict(low_bit.state_dict())
    state = plain.state[plain.param_groups[0]["params"][0]]
    assert state["exp_avg"].dtype == torch.bfloat16  # the param's dtype, as torch keeps it
    assert KAHAN_KEY not in state  # a round-to-nearest optimizer has no compensation buffer
    assert plain.param_groups[0]["state_precision"] == "param"


def test_kahan_buffer_is_created_when_loading_a_checkpoint_without_one() -> None:
    params = _params(torch.bfloat16)
    plain = adamw.AdamW(params)
    _train(plain, params, 1)
    kahan = _low_bit(params, "param-kahan")
    kahan.load_state_dict(plain.state_dict())
    assert torch.count_nonzero(kahan.state[params[0]][KAHAN_KEY]) == 0
    _train(kahan, params, 1, start=1)


def test_incomplete_8bit_checkpoint_is_refused_before_any_change() -> None:
    params = _params(torch.float32)
    opt = _low_bit(params, "8bit")
    _train(opt, params, 1)
    broken = copy.deepcopy(opt.state_dict())
    del broken["state"][0]["exp_avg_absmax"]
    target = _low_bit([p.detach().clone().requires_grad_() for p in params], "8bit")
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
def test_bad_low_bit_options_are_refused(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        adamw.AdamW(_params(torch.float32), **options)
