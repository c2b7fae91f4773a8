r"""The low-bit Triton kernel: decode the moments, update, write the param and re-encode, in one pass.

Mirrors :func:`adamw.backends.forloop.reference_step` operation for operation, in float32, as torch's CPU kernels
evaluate it (so the two agree bit for bit)::

    g      <- grad (/ grad_scale, correctly rounded)    (-g with maximize)
    p      <- param                       (Kahan: param + comp, in float32)
    p      <- p * (1 - lr*wd)             (torch's p.mul_)
    m      <- fma(c, g - m, base)         (torch's lerp: c = w, base = m when |w| < 0.5, else w - 1, g)
    v      <- fma((1 - b2) * g, g, v * b2)   (torch's mul_ then addcmul_, which compilers contract)
    vmax   <- max(vmax, v)                (amsgrad; then vmax is used below)
    denom  =  sqrt(v) / sqrt(bc2) + eps
    p      <- p + (-(lr / bc1) * m) / denom   (torch's addcdiv_)

torch's CPU kernels for ``lerp`` and ``addcmul`` round once where a multiply feeds an add (AVX2 and
AVX-512 ``fmadd``, and GCC contracts the scalar tails alike), so this kernel calls ``tl.fma`` there
(``_fma``, exact under the interpreter too) and nowhere else, and is compiled without FP fusion so
that no other multiply-add is contracted.
Every scalar is computed on the host exactly as the reference computes it and rounded to float32
as torch rounds a Python scalar; division and square root round to nearest (``div_rn``,
``sqrt_rn``), as the reference's do (its sqrt is :func:`adamw.backends.forloop.sqrt_rn`, not torch's
float32 one, which is not always correctly rounded). Under Triton's interpreter ``sqrt_rn`` is
numpy's, also correctly rounded. tests/test_low_bit_kernels.py and tests/test_low_bit_reproducible.py check
the two agree bit for bit.

Storage, per constexpr switch:

* ``MOMENT_DTYPE``: float32, bfloat16 (stochastic rounding), float16 (to nearest) or uint8: blockwise
  codes of ``CODE_BITS`` bits (:mod:`adamw.states.quantize`). Each program owns ``BLOCKS`` whole
  blocks, a row of its tile each (256 values, or 128 for 4-bit codes), so a block's new absmax is a
  ``tl.max`` over its row, taken after the update (NaN where the row holds one, as torch's ``amax``;
  values past the end count as zeros, as the reference pads them). A code is that of
  ``y = x / absmax`` (``div_rn``; the absmax taken as 1 where it is 0 or NaN), decoded as
  ``values[code] * absmax``.
* ``CODE_BITS``, for uint8 moments (8 for the others). The index of ``|y|`` (signed code) or ``y``
  (unsigned) is the number of midpoints strictly below it (0 for NaN); the signed code adds its
  sign bit (128 or 8) where ``y < 0``.

  - 8: a code per byte. The index is guessed from the logarithm on the 8-bit ladder, then
    corrected by one comparison with each neighbouring midpoint.
  - 4: two codes per byte, value ``2i`` in the low nibble of byte ``i`` and ``2i + 1`` in the high
    one (0 past an odd end). The index counts the midpoints with one comparison each (7 signed, 15
    unsigned): exact for any ascending table. A row's 64 bytes are read once, split into nibbles
    and interleaved (``tl.join``); its new codes are paired (``tl.split``) and written once.
* ``PARAM_UPDATE``: round to nearest, stochastic rounding, or Kahan (``comp`` holds what the last
  rounding lost).
* ``ALIGNED``: the host checked that every param, grad, moment and ``comp`` address is a multiple of
  16 bytes (the grads' at each step), so full chunks load and store them in vectors of 8 or 16 bytes; the
  per-block absmaxes are read as they lie.

Stochastic rounding takes 16 bits of the draw ``hash32(i ^ key)`` per flat element ``i``
(``lowbias32``): the low half for the param and ``exp_avg``, the high half for ``exp_avg_sq`` and
``max_exp_avg_sq`` (:mod:`adamw.states.rounding`); the keys are computed on the host per tensor and
purpose (two purposes that share a draw have one key).

Couplings with the host side (:func:`adamw.backends.triton.step_low_bit`): ``table`` has ``ROW`` int64
per tensor (columns below; an address of 0 is never read); ``chunk_tensor`` names the tensor of
every program; ``codes`` is the float32 concatenation of the values and midpoints of the 8-bit
signed code, the 8-bit unsigned code, the 4-bit signed code and the 4-bit unsigned code (``CODE_*``
and ``CODE4_*`` offsets): the tables are read at run time, never compiled in. A chunk of the chunk
map is ``BLOCKS`` blocks of the launch's format.
"""

# No `from __future__ import annotations`: Triton reads the annotations.
import os

import triton
import triton.language as tl

from ._triton_kernels import address, locate, round_bf16, to_storage

# Set by adamw.backends.triton once it has checked the constants below against its own.
checked_against_the_host = False

QBLOCK = tl.constexpr(256)  # adamw.states.quantize.BLOCK_SIZE (checked on the host)
QBLOCK_4BIT = tl.constexpr(128)  # adamw.states.quantize.BLOCK_SIZE_4BIT (checked on the host)

ROW = tl.constexpr(16)
COL_PARAM = tl.constexpr(0)
COL_GRAD = tl.constexpr(1)
COL_EXP_AVG = tl.constexpr(2)
COL_EXP_AVG_SQ = tl.constexpr(3)
COL_MAX = tl.constexpr(4)
COL_EXP_AVG_ABSMAX = tl.constexpr(5)
COL_EXP_AVG_SQ_ABSMAX = tl.constexpr(6)
COL_MAX_ABSMAX = tl.constexpr(7)
COL_COMP = tl.constexpr(8)
COL_NUMEL = tl.constexpr(9)
COL_FIRST_CHUNK = tl.constexpr(10)
COL_KEY_PARAM = tl.constexpr(11)
COL_KEY_EXP_AVG = tl.constexpr(12)
COL_KEY_EXP_AVG_SQ = tl.constexpr(13)
COL_KEY_MAX = tl.constexpr(14)
COL_SCALARS = tl.constexpr(15)  # float32 bits: -(lr / bc1) in the low word, sqrt(bc2) in the high one

UPDATE_ROUND = tl.constexpr(0)
UPDATE_STOCHASTIC = tl.constexpr(1)
UPDATE_KAHAN = tl.constexpr(2)

# Offsets into the `codes` tensor.
SIGNED_TOP = tl.constexpr(127)
UNSIGNED_TOP = tl.constexpr(255)
CODE_SIGNED_VALUES = tl.constexpr(0)
CODE_SIGNED_MIDS = tl.constexpr(256)
CODE_UNSIGNED_VALUES = tl.constexpr(383)
CODE_UNSIGNED_MIDS = tl.constexpr(639)
CODE4_SIGNED_VALUES = tl.constexpr(894)
CODE4_SIGNED_MIDS = tl.constexpr(910)
CODE4_UNSIGNED_VALUES = tl.constexpr(917)
CODE4_UNSIGNED_MIDS = tl.constexpr(933)
CODE_SIZE = tl.constexpr(948)
LADDER_STEPS = tl.constexpr(8)  # adamw.states.quantize.LADDER_STEPS_PER_OCTAVE


# --------------------------------------------------------------------------------------------------
# fused multiply-add

if os.environ.get("TRITON_INTERPRET", "0") == "1":  # read as triton.jit reads it, when this module is imported

    @triton.jit
    def _fma(a, b, c):
        """``a * b + c`` rounded once, under Triton's interpreter, whose own ``tl.fma`` multiplies then
        adds (two roundings) in some releases (3.6 among them): the product of two float32s is exact
        in float64, the sum is rounded there to odd (to the neighbour with an odd last bit wherever
        TwoSum finds it inexact), and a float64 rounded to odd rounds to float32 as the exact value
        would (float64 has more than two bits beyond float32's)."""
        a64, b64, c64 = a.to(tl.float64), b.to(tl.float64), c.to(tl.float64)
        product = a64 * b64
        total = product + c64
        product_part = total - c64
        dropped = (product - product_part) + (c64 - (total - product_part))
        bits = total.to(tl.int64, bitcast=True)
        outward = (dropped > 0) == (total > 0)  # the exact value lies beyond total, away from zero
        neighbour = tl.where(outward, bits + 1, bits - 1)
        finite = tl.abs(total) < float("inf")
        odd = tl.where(finite & (dropped != 0) & ((bits & 1) == 0), neighbour, bits)
        return odd.to(tl.float64, bitcast=True).to(tl.float32)

else:

    @triton.jit
    def _fma(a, b, c):
        return tl.fma(a, b, c)


# --------------------------------------------------------------------------------------------------
# rounding


@triton.jit
def _hash32(x):
    """lowbias32 of uint32 words (adamw.states.rounding.hash32)."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _round(x, offsets, key, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, SHIFT: tl.constexpr):
    """float32 -> ``DTYPE``; to bfloat16 up or down at random when ``STOCHASTIC``, by the 16 bits
    at ``SHIFT`` of the element's draw (adamw.states.rounding.stochastic_round_to_bf16), else to
    nearest."""
    if DTYPE == tl.bfloat16 and STOCHASTIC:
        return round_bf16(x, (_hash32(offsets.to(tl.uint32) ^ key) >> SHIFT) & 0xFFFF)
    else:
        return to_storage(x, DTYPE)


# --------------------------------------------------------------------------------------------------
# moments: MOMENT 0 is exp_avg (signed code), 1 exp_avg_sq and 2 max_exp_avg_sq (unsigned code); the
# address, absmax and rounding key of each are in columns COL_EXP_AVG, COL_EXP_AVG_ABSMAX and
# COL_KEY_EXP_AVG + MOMENT


@triton.jit
def _encode(y, codes_ptr, SIGNED: tl.constexpr, CODE_BITS: tl.constexpr):
    """Codes of normalized values: the number of midpoints strictly below each magnitude (a NaN's is
    0), plus the sign bit for negative values of the signed code.

    8-bit, as adamw.states.quantize.Code.magnitude_index: a guess from the logarithm (on the ladder it
    is the answer or one off it), then one comparison with each neighbouring midpoint. The guess may
    come from any log2 (the GPU's is approximate): the midpoints decide. 4-bit: a comparison with
    every midpoint (as ``torch.bucketize``), whatever the table.
    """
    magnitude = tl.abs(y) if SIGNED else y
    if CODE_BITS == 4:
        mids_ptr = codes_ptr + (CODE4_SIGNED_MIDS if SIGNED else CODE4_UNSIGNED_MIDS)
        index = tl.zeros(magnitude.shape, tl.int32)
        for j in tl.static_range(7 if SIGNED else 15):
            index += (magnitude > tl.load(mids_ptr + j)).to(tl.int32)
    else:
        if SIGNED:
            mids_ptr = codes_ptr + CODE_SIGNED_MIDS
            TOP = SIGNED_TOP
        else:
            mids_ptr = codes_ptr + CODE_UNSIGNED_MIDS
            TOP = UNSIGNED_TOP
        # max(., 1e-30): no log of 0 (it would clamp to index 0 anyway); a NaN guess becomes 0 below.
        guess = tl.floor(tl.log2(tl.maximum(magnitude, 1e-30)) * LADDER_STEPS + 0.5) + TOP
        guess = tl.where(guess == guess, guess, 0.0)
        guess = tl.minimum(tl.maximum(guess, 0.0), TOP * 1.0).to(tl.int32)
        below = tl.load(mids_ptr + guess - 1, mask=guess > 0, other=float("-inf"))
        above = tl.load(mids_ptr + guess, mask=guess < TOP, other=float("inf"))
        index = guess - (magnitude <= below).to(tl.int32) + (magnitude > above).to(tl.int32)
    if SIGNED:
        index = index + tl.where(y < 0, 8 if CODE_BITS == 4 else 128, 0)
    return index


@triton.jit
def _load(ptr, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr, mask=mask, other=0)
    else:
        return tl.load(ptr)


@triton.jit
def _store(ptr, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr, value, mask=mask)
    else:
        tl.store(ptr, value)


@triton.jit
def _values_ptr(codes_ptr, MOMENT: tl.constexpr, CODE_BITS: tl.constexpr):
    if CODE_BITS == 4:
        return codes_ptr + (CODE4_SIGNED_VALUES if MOMENT == 0 else CODE4_UNSIGNED_VALUES)
    else:
        return codes_ptr + (CODE_SIGNED_VALUES if MOMENT == 0 else CODE_UNSIGNED_VALUES)


@triton.jit
def _load_moment(
    row_ptr,
    codes_ptr,
    tile,
    MOMENT: tl.constexpr,
    DTYPE: tl.constexpr,
    CODE_BITS: tl.constexpr,
    MASKED: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    offsets, mask, blocks, block_mask, pairs, pair_mask = tile
    ptr = address(row_ptr, COL_EXP_AVG + MOMENT, DTYPE, ALIGNED)
    if DTYPE == tl.uint8:
        if CODE_BITS == 4:
            packed = _load(ptr + pairs, pair_mask, MASKED)
            codes = tl.reshape(tl.join(packed & 15, packed >> 4), offsets.shape).to(tl.int32)
        else:
            codes = _load(ptr + offsets, mask, MASKED).to(tl.int32)
        absmax = _load(address(row_ptr, COL_EXP_AVG_ABSMAX + MOMENT, tl.float32, False) + blocks, block_mask, MASKED)
        # codes < 2^CODE_BITS: always inside the table
        return tl.load(_values_ptr(codes_ptr, MOMENT, CODE_BITS) + codes) * absmax[:, None]
    else:
        return _load(ptr + offsets, mask, MASKED).to(tl.float32)


@triton.jit
def _store_moment(
    x,
    row_ptr,
    codes_ptr,
    tile,
    MOMENT: tl.constexpr,
    DTYPE: tl.constexpr,
    CODE_BITS: tl.constexpr,
    MASKED: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    offsets, mask, blocks, block_mask, pairs, pair_mask = tile
    ptr = address(row_ptr, COL_EXP_AVG + MOMENT, DTYPE, ALIGNED)
    if DTYPE == tl.uint8:
        magnitude = tl.abs(x)
        if MASKED:
            magnitude = tl.where(mask, magnitude, 0.0)  # the reference pads a short block with zeros
        absmax = tl.max(magnitude, axis=1)
        # torch's amax propagates NaN; a GPU's max ignores it.
        has_nan = tl.max(tl.where(magnitude != magnitude, 1, 0), axis=1)
        absmax = tl.where(has_nan > 0, float("nan"), absmax)
        _store(address(row_ptr, COL_EXP_AVG_ABSMAX + MOMENT, tl.float32, False) + blocks, absmax, block_mask, MASKED)
        safe = tl.where(absmax > 0, absmax, 1.0)
        codes = _encode(tl.div_rn(x, safe[:, None]), codes_ptr, MOMENT == 0, CODE_BITS)
        if CODE_BITS == 4:
            if MASKED:
                codes = tl.where(mask, codes, 0)  # the high nibble past an odd end is 0
            low, high = tl.split(tl.reshape(codes.to(tl.uint8), (codes.shape[0], codes.shape[1] // 2, 2)))
            _store(ptr + pairs, low | (high << 4), pair_mask, MASKED)
        else:
            _store(ptr + offsets, codes.to(tl.uint8), mask, MASKED)
    else:
        key = tl.load(row_ptr + COL_KEY_EXP_AVG + MOMENT).to(tl.uint32)
        _store(ptr + offsets, _round(x, offsets, key, DTYPE, True, 0 if MOMENT == 0 else 16), mask, MASKED)


# --------------------------------------------------------------------------------------------------
# the step


@triton.jit
def _low_bit_tile(
    row_ptr,
    codes_ptr,
    grad_scale,
    offsets,
    blocks,
    numel,
    decay,
    lerp_coeff,
    lerp_small,
    beta2,
    one_minus_beta2,
    eps,
    MASKED: tl.constexpr,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    MOMENT_DTYPE: tl.constexpr,
    CODE_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
    PARAM_UPDATE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    mask = offsets < numel
    block_mask = blocks * BLOCK < numel
    # the byte of each two 4-bit codes (unused by other formats)
    pairs = blocks[:, None] * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
    tile = (offsets, mask, blocks, block_mask, pairs, pairs * 2 < numel)
    scalars = tl.load(row_ptr + COL_SCALARS)
    neg_step_size = scalars.to(tl.int32).to(tl.float32, bitcast=True)
    bias_correction2_sqrt = (scalars >> 32).to(tl.int32).to(tl.float32, bitcast=True)

    param_ptr = address(row_ptr, COL_PARAM, PARAM_DTYPE, ALIGNED)
    comp_ptr = address(row_ptr, COL_COMP, tl.bfloat16, ALIGNED)  # 0 unless Kahan
    p = _load(param_ptr + offsets, mask, MASKED).to(tl.float32)
    if PARAM_UPDATE == UPDATE_KAHAN:
        p = p + _load(comp_ptr + offsets, mask, MASKED).to(tl.float32)
    g = _load(address(row_ptr, COL_GRAD, GRAD_DTYPE, ALIGNED) + offsets, mask, MASKED).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, grad_scale)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        p = p * decay

    m = _load_moment(row_ptr, codes_ptr, tile, 0, MOMENT_DTYPE, CODE_BITS, MASKED, ALIGNED)
    v = _load_moment(row_ptr, codes_ptr, tile, 1, MOMENT_DTYPE, CODE_BITS, MASKED, ALIGNED)
    m = _fma(lerp_coeff, g - m, tl.where(lerp_small != 0, m, g))
    v = _fma(one_minus_beta2 * g, g, v * beta2)
    if AMSGRAD:
        v_max = _load_moment(row_ptr, codes_ptr, tile, 2, MOMENT_DTYPE, CODE_BITS, MASKED, ALIGNED)
        v_max = tl.maximum(v_max, v, propagate_nan=tl.PropagateNan.ALL)
    else:
        v_max = v
    denom = tl.div_rn(tl.sqrt_rn(v_max), bias_correction2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, denom)

    key_param = tl.load(row_ptr + COL_KEY_PARAM).to(tl.uint32)
    stored = _round(p, offsets, key_param, PARAM_DTYPE, PARAM_UPDATE == UPDATE_STOCHASTIC, 0)
    _store(param_ptr + offsets, stored, mask, MASKED)
    if PARAM_UPDATE == UPDATE_KAHAN:
        _store(comp_ptr + offsets, to_storage(p - stored.to(tl.float32), tl.bfloat16), mask, MASKED)

    _store_moment(m, row_ptr, codes_ptr, tile, 0, MOMENT_DTYPE, CODE_BITS, MASKED, ALIGNED)
    _store_moment(v, row_ptr, codes_ptr, tile, 1, MOMENT_DTYPE, CODE_BITS, MASKED, ALIGNED)
    if AMSGRAD:
        _store_moment(v_max, row_ptr, codes_ptr, tile, 2, MOMENT_DTYPE, CODE_BITS, MASKED, ALIGNED)


@triton.jit
def low_bit_kernel(
    table_ptr,
    chunk_tensor_ptr,
    codes_ptr,
    grad_scale_ptr,
    decay: tl.float32,
    lerp_coeff: tl.float32,
    lerp_small: tl.int32,
    beta2: tl.float32,
    one_minus_beta2: tl.float32,
    eps: tl.float32,
    BLOCKS: tl.constexpr,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    MOMENT_DTYPE: tl.constexpr,
    CODE_BITS: tl.constexpr,
    PARAM_UPDATE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """One low-bit AdamW step on the ``BLOCKS`` blocks (of 128 values for 4-bit codes, else 256) of
    program ``program_id``."""
    BLOCK: tl.constexpr = QBLOCK_4BIT if CODE_BITS == 4 else QBLOCK
    row_ptr, numel, chunk = locate(table_ptr, chunk_tensor_ptr, ROW, COL_NUMEL, COL_FIRST_CHUNK)
    first_block = chunk * BLOCKS
    blocks = first_block + tl.arange(0, BLOCKS)
    offsets = blocks[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
    else:
        grad_scale = 1.0
    # Scalars arrive as float32 values (exactly representable): tl.full keeps them float32 both
    # when compiled and under the interpreter, which passes Python floats.
    tile_args = (
        row_ptr,
        codes_ptr,
        grad_scale,
        offsets,
        blocks,
        numel,
        tl.full([], decay, tl.float32),
        tl.full([], lerp_coeff, tl.float32),
        lerp_small,
        tl.full([], beta2, tl.float32),
        tl.full([], one_minus_beta2, tl.float32),
        tl.full([], eps, tl.float32),
    )
    if (first_block + BLOCKS) * BLOCK <= numel:  # unmasked: vector loads on full chunks
        _low_bit_tile(
            *tile_args,
            MASKED=False,
            PARAM_DTYPE=PARAM_DTYPE,
            GRAD_DTYPE=GRAD_DTYPE,
            MOMENT_DTYPE=MOMENT_DTYPE,
            CODE_BITS=CODE_BITS,
            BLOCK=BLOCK,
            PARAM_UPDATE=PARAM_UPDATE,
            AMSGRAD=AMSGRAD,
            MAXIMIZE=MAXIMIZE,
            HAS_WEIGHT_DECAY=HAS_WEIGHT_DECAY,
            HAS_GRAD_SCALE=HAS_GRAD_SCALE,
            ALIGNED=ALIGNED,
        )
    else:
        _low_bit_tile(
            *tile_args,
            MASKED=True,
            PARAM_DTYPE=PARAM_DTYPE,
            GRAD_DTYPE=GRAD_DTYPE,
            MOMENT_DTYPE=MOMENT_DTYPE,
            CODE_BITS=CODE_BITS,
            BLOCK=BLOCK,
            PARAM_UPDATE=PARAM_UPDATE,
            AMSGRAD=AMSGRAD,
            MAXIMIZE=MAXIMIZE,
            HAS_WEIGHT_DECAY=HAS_WEIGHT_DECAY,
            HAS_GRAD_SCALE=HAS_GRAD_SCALE,
            ALIGNED=ALIGNED,
        )
