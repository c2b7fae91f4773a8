"""Low-bit state formats: the 8-bit code tables, blockwise quantization, random bits, stochastic
rounding, Kahan compensation, the formats' rules and sizes, the correctly rounded square root, and
checkpoint conversions between formats. The optimizer's use of them: test_low_bit_optimizer.py."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch

from _helpers import CLOSE
from adamw.backends._common import Hyper
from adamw.backends.forloop import sqrt_rn, step_low_bit
from adamw.backends.low_bit import StorageFormat
from adamw.cli.bench.workloads import gpt2_shapes
from adamw.states import (
    BLOCK_SIZE,
    KAHAN_KEY,
    MIN_QUANTIZED_NUMEL,
    SIGNED_CODE,
    UNSIGNED_CODE,
    Code,
    convert_state,
    dequantize,
    format_for,
    full_precision_state,
    init_low_bit_state,
    quantize,
    rounding_key,
    state_nbytes,
    stochastic_round_to_bf16,
)
from adamw.states.quantize import (
    BLOCK_SIZE_4BIT,
    SIGNED_CODE_4BIT,
    UNSIGNED_CODE_4BIT,
    pack_nibbles,
    quantization_error_bound,
    unpack_nibbles,
)
from adamw.states.rounding import (
    PURPOSE_EXP_AVG,
    PURPOSE_EXP_AVG_SQ,
    PURPOSE_MAX_EXP_AVG_SQ,
    PURPOSE_PARAM,
    hash32,
    hash32_int,
    kahan_store,
    kahan_value,
    noise_shift,
    random_bits,
)

# These tensors are small: one thread is faster, and immune to a busy machine's other jobs.
pytestmark = pytest.mark.usefixtures("one_thread")

HYPER: dict[str, Any] = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
SHAPES = [(5,), (256,), (257,), (3, 300), (7, 11, 13), (4096,)]
# Every code table with the block size its format uses.
CODES = [(SIGNED_CODE, BLOCK_SIZE), (UNSIGNED_CODE, BLOCK_SIZE), (SIGNED_CODE_4BIT, 128), (UNSIGNED_CODE_4BIT, 128)]
CODE_IDS = ["signed", "unsigned", "signed-4bit", "unsigned-4bit"]
SIGNED_CODES = [case for case in CODES if case[0].signed]
UNSIGNED_CODES = [case for case in CODES if not case[0].signed]


def _relative_bound(code: Code) -> float:
    """|decoded - x| / |x| for x inside the ladder's range, with nearest rounding on arithmetic
    midpoints: at worst (r - 1) / (r + 1) for a ladder ratio r (a value on a midpoint, either way)."""
    assert code.ladder_steps is not None
    ratio = 2.0 ** (1 / code.ladder_steps)
    return (ratio - 1) / (ratio + 1)


def _blocks_of(x: torch.Tensor, block: int = BLOCK_SIZE) -> torch.Tensor:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block)


def _signed_data(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Signed values whose magnitudes span 1e-12..1e2, scaled differently in each block."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    mags = 10 ** (torch.rand(n, generator=g) * 14 - 12)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    block_scale = 10 ** (torch.randn(-(-n // BLOCK_SIZE), generator=g) * 3)
    x = mags * signs * block_scale.repeat_interleave(BLOCK_SIZE)[:n]
    return x.to(torch.float32).view(shape)


# ----------------------------------------------------------------------------------------------
# code tables


@pytest.mark.parametrize("code", [SIGNED_CODE, SIGNED_CODE_4BIT], ids=["8bit", "4bit"])
def test_signed_code_is_sign_symmetric_with_sign_bit(code: Code) -> None:
    values, mids = code.tables()
    half = code.sign_bit
    assert values.shape == (2 * half,) and mids.shape == (half - 1,)
    assert torch.equal(values[half:], -values[:half])
    assert values[0] == 0 and values[half - 1] == 1.0
    assert bool((values[1:half] > 0).all()) and bool((values[1:half].diff() > 0).all())


@pytest.mark.parametrize("code", [UNSIGNED_CODE, UNSIGNED_CODE_4BIT], ids=["8bit", "4bit"])
def test_unsigned_code_has_no_zero(code: Code) -> None:
    values, mids = code.tables()
    assert values.shape == (2**code.bits,) and mids.shape == (2**code.bits - 1,)
    assert float(values.min()) > 0, "a zero code would let v decode to 0 and the step become lr*m/eps"
    assert values[-1] == 1.0 and bool((values.diff() > 0).all())


@pytest.mark.parametrize(("code", "block"), CODES, ids=CODE_IDS)
def test_ladder_search_is_the_binary_search(code: Code, block: int) -> None:
    """The log2 guess plus one correction gives bucketize's codes, midpoints and their neighbours included."""
    values, mids = code.tables()
    mags = values[: code.sign_bit] if code.signed else values
    edges = torch.cat([mids, mags, torch.tensor([0.0, 1e-45, 1e-38, 1.0])])
    neighbours = torch.cat(
        [torch.nextafter(edges, torch.tensor(0.0)), edges, torch.nextafter(edges, torch.tensor(2.0))]
    )
    dense = torch.logspace(-40, 0, 200_000, base=2.0)
    y = torch.cat([neighbours, dense]).clamp(0, 1)
    assert torch.equal(code.magnitude_index(y).long(), torch.bucketize(y, mids))
    plain = Code("no-ladder", code.magnitudes, signed=code.signed, bits=code.bits)  # the binary search itself
    assert torch.equal(plain.magnitude_index(y), torch.bucketize(y, mids))


def test_code_rejects_bad_tables() -> None:
    with pytest.raises(ValueError, match="128 magnitudes"):
        Code("bad", tuple(range(256)), signed=True)
    with pytest.raises(ValueError, match="ascend"):
        Code("bad", tuple([1.0] * 127 + [0.5]), signed=True)
    with pytest.raises(ValueError, match="ladder"):
        Code("bad", SIGNED_CODE.magnitudes, signed=True, ladder_steps=7)


# ----------------------------------------------------------------------------------------------
# quantize / dequantize


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("code", "block"), CODES, ids=CODE_IDS)
def test_quantize_error_bound_per_block(shape: tuple[int, ...], code: Code, block: int) -> None:
    x = _signed_data(shape, seed=len(shape) * 1000 + shape[-1])
    if not code.signed:
        x = x.abs()
    codes, absmax = quantize(x, code, block)
    assert codes.shape == x.shape and codes.dtype == torch.uint8 and int(codes.max()) < 2**code.bits
    assert absmax.shape == (-(-x.numel() // block),) and absmax.dtype == torch.float32
    decoded = dequantize(codes, absmax, code, block)
    assert decoded.shape == x.shape and decoded.dtype == torch.float32

    xb, db = _blocks_of(x, block), _blocks_of(decoded, block)
    # absmax is each block's max |x|: nothing clips.
    assert torch.equal(absmax, xb.abs().amax(dim=1))
    # absolute bound: half the code's largest gap, times the block's absmax (plus float32 rounding).
    err = (db - xb).abs()
    assert bool((err <= absmax[:, None] * (quantization_error_bound(code) + 1e-6)).all())
    # relative bound for every value inside the ladder's range.
    smallest = code.magnitudes[1] if code.signed else code.magnitudes[0]
    inside = xb.abs() >= absmax[:, None] * smallest
    rel = err[inside] / xb.abs()[inside]
    assert float(rel.max()) <= _relative_bound(code) * (1 + 1e-5)


@pytest.mark.parametrize(("code", "block"), CODES, ids=CODE_IDS)
def test_largest_value_round_trips_to_the_max_code(code: Code, block: int) -> None:
    x = _signed_data((10, block), seed=3)
    if not code.signed:
        x = x.abs()
    codes, absmax = quantize(x, code, block)
    decoded = dequantize(codes, absmax, code, block)
    at_max = x.abs().argmax(dim=1)
    rows = torch.arange(10)
    assert torch.equal(decoded[rows, at_max], x[rows, at_max])
    top = len(code.magnitudes) - 1
    magnitude_code = codes[rows, at_max].long() % code.sign_bit if code.signed else codes[rows, at_max].long()
    assert torch.equal(magnitude_code, torch.full((10,), top))


@pytest.mark.parametrize(("code", "block"), SIGNED_CODES, ids=["8bit", "4bit"])
def test_signed_code_never_flips_the_sign(code: Code, block: int) -> None:
    x = _signed_data((64, block), seed=4)
    # tiny, denormal, signed-zero and below-the-ladder values next to a large one in the same block
    tiny = torch.tensor([1e-30, -1e-30, 1e-44, -1e-44, 0.0, -0.0, 1e-7, -1e-7, 3e-6, -3e-6])
    x.view(-1)[: tiny.numel()] = tiny
    codes, absmax = quantize(x, code, block)
    decoded = dequantize(codes, absmax, code, block)
    assert bool((torch.sign(decoded) * torch.sign(x) >= 0).all())
    # and nonzero values inside the range keep their sign exactly
    smallest = absmax.repeat_interleave(block).view(x.shape) * code.magnitudes[1]
    big = x.abs() >= smallest
    assert bool(big.any()) and bool((~big).any())
    assert torch.equal(torch.sign(decoded[big]), torch.sign(x[big]))


@pytest.mark.parametrize(("code", "block"), UNSIGNED_CODES, ids=["8bit", "4bit"])
def test_unsigned_code_never_decodes_nonzero_to_zero(code: Code, block: int) -> None:
    g = torch.Generator().manual_seed(5)
    x = 10 ** (torch.rand(8 * block, generator=g) * 40 - 30)  # 1e-30 .. 1e10 in every block
    codes, absmax = quantize(x, code, block)
    decoded = dequantize(codes, absmax, code, block)
    assert bool((decoded > 0).all())
    # values below the ladder round *up* (the step shrinks), never down
    below = x < absmax.repeat_interleave(block) * code.magnitudes[0]
    assert bool(below.any()) and bool((decoded[below] >= x[below]).all())


@pytest.mark.parametrize(("code", "block"), CODES, ids=CODE_IDS)
def test_zero_blocks_decode_to_zero_and_nan_propagates(code: Code, block: int) -> None:
    x = torch.zeros(3 * block + 7)
    x[block + 44] = float("nan")
    x[2 * block + 88] = 1.0
    codes, absmax = quantize(x, code, block)
    decoded = dequantize(codes, absmax, code, block)
    assert bool((decoded[:block] == 0).all()) and bool((decoded[3 * block :] == 0).all())
    assert bool(decoded[block : 2 * block].isnan().all())
    assert decoded[2 * block + 88] == 1.0


@pytest.mark.parametrize("numel", [1, 2, 7, 4096, 4097])
def test_nibbles_pack_two_codes_to_a_byte_and_unpack(numel: int) -> None:
    codes = torch.randint(0, 16, (numel,), dtype=torch.uint8, generator=torch.Generator().manual_seed(numel))
    packed = pack_nibbles(codes)
    assert packed.shape == ((numel + 1) // 2,) and packed.dtype == torch.uint8
    assert int(packed[0]) == int(codes[0]) + 16 * (int(codes[1]) if numel > 1 else 0)  # low nibble first
    if numel % 2:
        assert int(packed[-1]) >> 4 == 0  # past an odd end: zero
    assert torch.equal(unpack_nibbles(packed, numel), codes)


def test_quantize_checks_its_inputs() -> None:
    with pytest.raises(TypeError, match="float32"):
        quantize(torch.zeros(4, dtype=torch.float64), SIGNED_CODE)
    codes, absmax = quantize(torch.ones(300), SIGNED_CODE)
    with pytest.raises(ValueError, match="absmax values"):
        dequantize(codes, absmax[:1], SIGNED_CODE)
    with pytest.raises(TypeError, match="uint8"):
        dequantize(codes.to(torch.int32), absmax, SIGNED_CODE)


# ----------------------------------------------------------------------------------------------
# random bits and stochastic rounding


def test_hash32_matches_an_independent_uint32_implementation() -> None:
    words = np.random.default_rng(6).integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32)
    with np.errstate(over="ignore"):
        h = words.copy()
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x7FEB352D)
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x846CA68B)
        h ^= h >> np.uint32(16)
    ours = hash32(torch.from_numpy(words.view(np.int32)))
    assert torch.equal(ours, torch.from_numpy(h.view(np.int32)))
    assert [hash32_int(int(w)) for w in words[:64]] == [int(v) for v in h[:64]]


@pytest.mark.parametrize("shift", [0, 16])
def test_random_bits_are_uniform_and_keyed(shift: int) -> None:
    draw = random_bits(1 << 16, rounding_key(0, 1))
    bits = (draw >> shift) & 0xFFFF  # either half of the draw (an arithmetic shift: the mask takes 16 bits)
    counts = torch.bincount((bits >> 12).long(), minlength=16).float()  # 16 bins of 4096 expected
    assert float(((counts - 4096) ** 2 / 4096).sum()) < 60  # chi-square, 15 dof: p < 1e-6 to fail
    # neighbouring elements' draws are unrelated: their 16-bit halves agree as often as chance has it
    assert int((bits[1:] == bits[:-1]).sum()) < 10
    draws = (PURPOSE_PARAM, PURPOSE_EXP_AVG)
    keys = {rounding_key(s, t, k, p) for s in range(3) for t in range(3) for k in range(3) for p in draws}
    assert len(keys) == 54


def test_two_uses_share_a_draw_and_take_its_two_halves() -> None:
    """exp_avg and exp_avg_sq round with the low and high halves of one draw, the param and
    max_exp_avg_sq likewise: same keys, unrelated bits."""
    assert rounding_key(3, 7, 2, PURPOSE_EXP_AVG) == rounding_key(3, 7, 2, PURPOSE_EXP_AVG_SQ)
    assert rounding_key(3, 7, 2, PURPOSE_PARAM) == rounding_key(3, 7, 2, PURPOSE_MAX_EXP_AVG_SQ)
    assert rounding_key(3, 7, 2, PURPOSE_PARAM) != rounding_key(3, 7, 2, PURPOSE_EXP_AVG)
    assert (noise_shift(PURPOSE_PARAM), noise_shift(PURPOSE_MAX_EXP_AVG_SQ)) == (0, 16)
    assert (noise_shift(PURPOSE_EXP_AVG), noise_shift(PURPOSE_EXP_AVG_SQ)) == (0, 16)
    # halfway between two bfloat16s: each rounding goes up when its 16 bits reach 0x8000, so with
    # independent halves the two roundings agree half the time (with one shared half, always)
    x = ((((torch.rand(1 << 16) + 1).view(torch.int32) >> 16) << 16) | 0x8000).view(torch.float32)
    key = rounding_key(3, 7, 2, PURPOSE_EXP_AVG)
    low = stochastic_round_to_bf16(x, key, PURPOSE_EXP_AVG).float() > x
    high = stochastic_round_to_bf16(x, key, PURPOSE_EXP_AVG_SQ).float() > x
    agree = float((low == high).float().mean())
    assert abs(agree - 0.5) < 0.02


def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just toward and just away from zero of float32 ``x``."""
    bits = x.view(torch.int32)
    toward = (bits & ~0xFFFF).view(torch.float32)
    away = ((bits & ~0xFFFF) + 0x10000).view(torch.float32)
    exact = (bits & 0xFFFF) == 0
    return toward, torch.where(exact, toward, away)


def test_stochastic_rounding_is_unbiased() -> None:
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(512, generator=g) * 10 ** torch.randint(-20, 20, (512,), generator=g)).to(torch.float32)
    x[:4] = torch.tensor([1.0, -2.5, 0.0, 3.0e38])
    samples = 1000
    total = torch.zeros(512, dtype=torch.float64)
    toward, away = _bf16_neighbours(x)
    for step in range(samples):
        r = stochastic_round_to_bf16(x, rounding_key(11, step)).to(torch.float32)
        assert bool(((r == toward) | (r == away)).all()), "a sample is not one of the two neighbours"
        total += r.double()
    mean = total / samples
    gap = (away.double() - toward.double()).abs()
    # each sample is a Bernoulli choice between the neighbours: std of the mean <= gap / (2 sqrt(n))
    sigma = gap / (2 * math.sqrt(samples))
    assert bool(((mean - x.double()).abs() <= 5 * sigma + 1e-300).all())
    # round-to-nearest would be biased by up to gap/2 here: the test separates the two
    nearest = x.to(torch.bfloat16).double()
    assert float(((nearest - x.double()).abs() / gap.clamp_min(1e-300)).max()) > 0.4


def test_stochastic_rounding_keeps_non_finite_values() -> None:
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    r = stochastic_round_to_bf16(x, rounding_key(0, 1))
    assert r.dtype == torch.bfloat16 and bool(r[0].isnan())
    assert r[1] == float("inf") and r[2] == -float("inf") and r[3] == 0 and r[4] == 0


def test_stochastic_rounding_reproduces_from_its_key() -> None:
    x = torch.randn(10_000)
    a = stochastic_round_to_bf16(x, rounding_key(1, 5, 2))
    assert torch.equal(a, stochastic_round_to_bf16(x, rounding_key(1, 5, 2)))
    for other in (rounding_key(2, 5, 2), rounding_key(1, 6, 2), rounding_key(1, 5, 3)):
        assert float((stochastic_round_to_bf16(x, other) != a).float().mean()) > 0.2


def test_kahan_beats_round_to_nearest_on_a_long_sum_of_tiny_updates() -> None:
    steps = 2000
    g = torch.Generator().manual_seed(14)
    deltas = torch.rand(steps, 256, generator=g) * 1e-3  # below half a bf16 step at 1.0 (2^-8)
    exact = 1 + deltas.double().sum(dim=0)
    rounded = torch.ones(256, dtype=torch.bfloat16)
    param = torch.ones(256, dtype=torch.bfloat16)
    comp = torch.zeros(256, dtype=torch.bfloat16)
    stochastic = torch.ones(256, dtype=torch.bfloat16)
    for step in range(steps):
        rounded.copy_(rounded.float() + deltas[step])
        kahan_store(param, comp, kahan_value(param, comp) + deltas[step])
        stochastic.copy_(stochastic_round_to_bf16(stochastic.float() + deltas[step], rounding_key(0, step)))
    assert bool((rounded == 1.0).all()), "round-to-nearest loses every update"
    # p + c carries ~16 significant bits (two bf16 halves): well within 1% of the sum of updates here
    kahan_error = (kahan_value(param, comp).double() - exact).abs()
    assert float(kahan_error.max()) < 0.01
    assert float((param.double() - exact).abs().max()) <= 2**-7  # the param itself within one bf16 step
    # stochastic rounding: unbiased, its error a random walk of ~sqrt(steps * p(1-p)) bf16 steps
    assert abs(float((stochastic.double() - exact).mean())) < 0.01


# ----------------------------------------------------------------------------------------------
# formats


def test_the_4096_rule_and_bytes_per_element() -> None:
    small, large = torch.zeros(MIN_QUANTIZED_NUMEL - 1), torch.zeros(MIN_QUANTIZED_NUMEL)
    assert format_for(small, "8bit").name == "float32"
    assert format_for(large, "8bit").name == "8bit"
    assert format_for(large, "8bit").bytes_per_element(large) == 1 + 4 / BLOCK_SIZE
    assert format_for(large, "bf16").bytes_per_element(large) == 2
    assert format_for(large, "param").bytes_per_element(large) == 4
    state = init_low_bit_state(large, amsgrad=True, state_precision="8bit", param_update="round")
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_absmax"].shape == (16,)
    assert state_nbytes(state) == 3 * (4096 + 16 * 4)
    assert format_for(large, "8bit").nbytes(state, "exp_avg") == 4096 + 16 * 4
    assert format_for(small, "4bit").name == "float32"
    assert format_for(large, "4bit").bytes_per_element(large) == 0.5 + 4 / BLOCK_SIZE_4BIT
    state = init_low_bit_state(large, amsgrad=True, state_precision="4bit", param_update="round")
    assert state["exp_avg"].shape == (2048,) and state["exp_avg_absmax"].shape == (4096 // BLOCK_SIZE_4BIT,)
    assert state_nbytes(state) == 3 * (2048 + 4096 // BLOCK_SIZE_4BIT * 4)
    with pytest.raises(ValueError, match="state_precision"):
        format_for(large, "2bit")


# Bytes per param on GPT-2-small shapes: of the state alone (float32 params), and of bf16 params with
# stochastic rounding and their state together (the leanest setup).
@pytest.mark.parametrize(("precision", "state_alone", "leanest"), [("8bit", 2.1, 4.1), ("4bit", 1.1, 3.1)])
def test_quantized_state_bytes_per_param_on_gpt2_small(precision: str, state_alone: float, leanest: float) -> None:
    params = [torch.empty(s, device="meta") for s in gpt2_shapes()]
    numel = sum(p.numel() for p in params)
    assert 124_000_000 < numel < 125_000_000
    moments = sum(
        state_nbytes(init_low_bit_state(p, amsgrad=False, state_precision=precision, param_update="round"))
        for p in params
    )
    assert moments / numel <= state_alone
    low_bit = sum(
        state_nbytes(
            init_low_bit_state(p.to(torch.bfloat16), amsgrad=False, state_precision=precision, param_update="stochastic")
        )
        for p in params
    )
    assert (low_bit + 2 * numel) / numel <= leanest


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="bfloat16 params"):
        init_low_bit_state(torch.zeros(4), amsgrad=False, state_precision="param", param_update="stochastic")
    with pytest.raises(ValueError, match="param_update must be"):
        init_low_bit_state(
            torch.zeros(4, dtype=torch.bfloat16), amsgrad=False, state_precision="param", param_update="up"
        )


# ----------------------------------------------------------------------------------------------
# the square root every backend takes


def test_sqrt_rn_is_correctly_rounded() -> None:
    """The low-bit step's float32 sqrt is the C kernel's sqrtf and Triton's sqrt_rn (numpy's sqrt, the
    interpreter's, is the hardware's, correctly rounded): on every float32 of [1, 4) (two octaves:
    every significand, at either parity of the exponent), subnormals, random values of every
    exponent, zeros, infinity and NaN (sign kept)."""
    gen = torch.Generator().manual_seed(12)
    two_octaves = torch.arange(0x3F800000, 0x40800000, dtype=torch.int32)
    subnormals = torch.randint(0, 0x00800000, (1 << 16,), generator=gen, dtype=torch.int32)
    anywhere = torch.randint(0, 0x7F800000, (1 << 20,), generator=gen, dtype=torch.int32)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("nan"), -float("nan")]).view(torch.int32)
    x = torch.cat([two_octaves, subnormals, anywhere, specials]).view(torch.float32)
    exact = torch.from_numpy(np.sqrt(x.numpy()))
    assert torch.equal(sqrt_rn(x).view(torch.int32), exact.view(torch.int32))
    y = torch.rand(1000, generator=gen, dtype=torch.float64)
    assert torch.equal(sqrt_rn(y), y.sqrt()) and sqrt_rn(x.bfloat16()).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# checkpoints


def _torch_adamw_state(param: torch.Tensor, steps: int = 5) -> tuple[torch.optim.AdamW, dict[str, torch.Tensor]]:
    opt = torch.optim.AdamW([param], lr=1e-2, weight_decay=0.1, amsgrad=True)
    g = torch.Generator().manual_seed(12)
    for _ in range(steps):
        param.grad = torch.randn(param.shape, generator=g)
        opt.step()
    return opt, opt.state[param]


LADDERS = {"8bit": (SIGNED_CODE, UNSIGNED_CODE), "4bit": (SIGNED_CODE_4BIT, UNSIGNED_CODE_4BIT)}


@pytest.mark.parametrize("state_precision", ["bf16", "8bit", "4bit"])
def test_torch_checkpoint_converts_to_low_bit_and_back(state_precision: str) -> None:
    param = torch.randn(64, 80)
    opt, torch_state = _torch_adamw_state(param)
    low_bit = convert_state(torch_state, param, state_precision)
    assert low_bit["step"] is torch_state["step"]
    stored = torch.bfloat16 if state_precision == "bf16" else torch.uint8
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert low_bit[key].dtype == stored
    back = full_precision_state(low_bit, param)
    assert set(back) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        original = torch_state[key]
        assert back[key].dtype == param.dtype and back[key].shape == param.shape
        if state_precision == "bf16":
            tolerance, inside_from = 2**-8, 1e-3
        else:  # inside the ladders' range (4 bits: m under 1/16 of its block's absmax is stored as 0)
            signed, unsigned = LADDERS[state_precision]
            tolerance = _relative_bound(signed if key == "exp_avg" else unsigned)
            inside_from = 1e-3 if state_precision == "8bit" else 1 / 8
        inside = original.abs() >= original.abs().max() * inside_from
        rel = (back[key] - original).abs()[inside] / original.abs()[inside]
        assert float(rel.max()) <= tolerance * 1.001, key
    # torch.optim.AdamW loads the full-precision state and steps from it
    sd = opt.state_dict()
    sd["state"][0] = back
    fresh = torch.optim.AdamW([param], lr=1e-2, weight_decay=0.1, amsgrad=True)
    fresh.load_state_dict(sd)
    param.grad = torch.ones_like(param)
    fresh.step()
    assert fresh.state[param]["step"] == 6


def test_formats_switch_between_save_and_load() -> None:
    param = torch.randn(64, 80)
    _, torch_state = _torch_adamw_state(param)
    chain = ["8bit", "bf16", "param", "8bit", "param"]
    state = dict(torch_state)
    for precision in chain:
        state = convert_state(state, param, precision)
        assert ("exp_avg_absmax" in state) == (precision == "8bit")
    assert state["exp_avg"].dtype == torch.float32
    CLOSE["exp_avg_sq after five format conversions"].assert_close(state["exp_avg_sq"], torch_state["exp_avg_sq"])


def test_mismatched_checkpoints_fail_clearly() -> None:
    param = torch.randn(64, 80)
    _, torch_state = _torch_adamw_state(param)
    other = torch.randn(80, 64)
    with pytest.raises(ValueError, match="another model"):
        convert_state(torch_state, other, "8bit")
    low_bit = convert_state(torch_state, param, "8bit")
    broken = {k: v for k, v in low_bit.items() if k != "exp_avg_absmax"}
    with pytest.raises(ValueError, match="incomplete"):
        convert_state(broken, param, "param")
    short = copy.copy(low_bit)
    short["exp_avg_sq_absmax"] = low_bit["exp_avg_sq_absmax"][:-1]
    with pytest.raises(ValueError, match="blocks"):
        convert_state(short, param, "param")


def test_kahan_state_converts_and_drops_for_torch() -> None:
    p = torch.randn(64, 80).to(torch.bfloat16)
    state = init_low_bit_state(p, amsgrad=False, state_precision="8bit", param_update="kahan")
    state["step"] = torch.tensor(0.0)
    hyper = Hyper(**HYPER, amsgrad=False, maximize=False, capturable=False, differentiable=False)
    storage = StorageFormat(state_precision="8bit", param_update="kahan", seed=0)
    for _ in range(3):
        grad = torch.randn(64, 80).to(torch.bfloat16)
        step_low_bit([p], [grad], [state], [state["step"]], [0], hyper, storage)
    assert KAHAN_KEY in convert_state(state, p, "bf16")
    exported = full_precision_state(state, p)
    assert set(exported) == {"step", "exp_avg", "exp_avg_sq"} and exported["exp_avg"].dtype == torch.bfloat16
