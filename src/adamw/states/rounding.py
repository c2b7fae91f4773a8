"""Writing a float32 result into bfloat16 storage: stochastic rounding and Kahan compensation.

Stochastic rounding needs random bits that the torch reference, the C kernel and the Triton kernel
draw *identically*, so that the three give the same bits and a run reproduces on any backend. A
``torch.Generator`` cannot be replayed inside a kernel, so the bits come from a counter-based hash:

* each element draws 32 bits per step and *draw*: ``bits = hash32(i ^ key)``, ``i`` its index in
  the flat tensor (counters wrap at 2^32 elements per tensor) and ``key = rounding_key(seed, step,
  stream, purpose)`` one 32-bit number per tensor, step and draw, computed on the host
  (:func:`hash32_int`), never stored;
* two uses share a draw, each taking 16 of its bits (:func:`noise_shift`): the moments
  ``exp_avg`` (low half) and ``exp_avg_sq`` (high half), and the param (low) and
  ``max_exp_avg_sq`` (high). One hash per element serves two roundings: the CPU kernel's
  stochastic step measured 1.3x faster than with one double hash per use.

``hash32`` is the "lowbias32" integer hash (xorshift-multiply, constants 0x7feb352d, 0x846ca68b): a
bijection of 32-bit words with full avalanche, cheap in C (``uint32_t``), in Triton (``tl.uint32``)
and here (int32 tensors holding the same bits: multiplication wraps alike, right shifts are masked
to be logical). The key is itself a hash of the seed, stream, draw and step, so draws of different
tensors, steps and draws are unrelated.

Stochastic rounding float32 -> bfloat16 adds 16 random bits to the float32's bit pattern and drops
its low 16 bits: the value rounds away from zero with probability (low 16 bits) / 2^16, so the
expected result is exactly the float32 input. NaN stays NaN; infinities stay infinite.

Kahan compensation keeps, beside each bfloat16 param ``p``, a bfloat16 buffer ``c`` with what the
last rounding lost: the param's true value is ``p + c`` (read in float32), and after the update
``x`` (float32) is written as ``p = bf16(x)``, ``c = bf16(x - p)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

ParamUpdate = Literal["round", "stochastic", "kahan"]
PARAM_UPDATES: tuple[str, ...] = ("round", "stochastic", "kahan")

# The uses of one tensor's random bits: its param and each moment round with their own 16 bits.
PURPOSE_PARAM = 0
PURPOSE_EXP_AVG = 1
PURPOSE_EXP_AVG_SQ = 2
PURPOSE_MAX_EXP_AVG_SQ = 3
# Each use's draw (the key's sub-stream) and the shift of its 16 bits in the draw's 32.
_DRAW = {PURPOSE_PARAM: 0, PURPOSE_MAX_EXP_AVG_SQ: 0, PURPOSE_EXP_AVG: 1, PURPOSE_EXP_AVG_SQ: 1}
_SHIFT = {PURPOSE_PARAM: 0, PURPOSE_MAX_EXP_AVG_SQ: 16, PURPOSE_EXP_AVG: 0, PURPOSE_EXP_AVG_SQ: 16}
# The purpose of each moment, by its state key.
MOMENT_PURPOSES = {"exp_avg": PURPOSE_EXP_AVG, "exp_avg_sq": PURPOSE_EXP_AVG_SQ, "max_exp_avg_sq": PURPOSE_MAX_EXP_AVG_SQ}

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # keeps key 0 from being a fixed point of the chain (hash32(0) == 0)
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B


def check_param_update(param_update: str, dtype: torch.dtype) -> None:
    """The one rule for which params a ``param_update`` applies to."""
    if param_update not in PARAM_UPDATES:
        raise ValueError(f"param_update must be one of {PARAM_UPDATES}, but got {param_update!r}")
    if param_update != "round" and dtype != torch.bfloat16:
        raise ValueError(
            f"param_update={param_update!r} is for bfloat16 params (no float32 master copy), "
            f"but got a {dtype} param: use param_update='round' for it"
        )


def effective_param_update(param: Tensor, param_update: str) -> str:
    """``param_update`` applies to bfloat16 params; params of other dtypes are written as usual."""
    return param_update if param.dtype == torch.bfloat16 else "round"


def hash32_int(x: int) -> int:
    """lowbias32 of a Python int's low 32 bits (the host side of :func:`hash32`)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _MUL1) & _MASK32
    x ^= x >> 15
    x = (x * _MUL2) & _MASK32
    x ^= x >> 16
    return x


def signed32(c: int) -> int:
    """The int32 with the bits of the 32-bit word ``c``."""
    c &= _MASK32
    return c - (1 << 32) if c >= 1 << 31 else c


def _shift_right(x: Tensor, bits: int) -> Tensor:
    # A logical shift of 32-bit words held in int32: torch's shift is arithmetic, so mask the sign.
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def hash32(x: Tensor) -> Tensor:
    """lowbias32 of an int32 tensor holding 32-bit words (int32 multiplication wraps like uint32's)."""
    if x.dtype != torch.int32:
        raise TypeError(f"hash32 takes int32 words, got {x.dtype}")
    x = x ^ _shift_right(x, 16)
    x = x * signed32(_MUL1)
    x = x ^ _shift_right(x, 15)
    x = x * signed32(_MUL2)
    return x ^ _shift_right(x, 16)


def rounding_key(seed: int, step: int, stream: int = 0, purpose: int = PURPOSE_PARAM) -> int:
    """The 32-bit key of the draw that one tensor (``stream``) takes for ``purpose`` at one step."""
    # Kernels take the stream keys and do this last hash themselves.
    return hash32_int(stream_key(seed, stream, purpose) ^ step ^ (step >> 32))


def stream_key(seed: int, stream: int, purpose: int) -> int:
    """The part of :func:`rounding_key` that stays the same from step to step."""
    key = hash32_int(seed ^ _GOLDEN)
    key = hash32_int(key ^ (seed >> 32))
    key = hash32_int(key ^ stream)
    return hash32_int(key ^ _DRAW[purpose])


def noise_shift(purpose: int) -> int:
    """Where ``purpose``'s 16 bits lie in its draw's 32: 0 (low half) or 16 (high half)."""
    return _SHIFT[purpose]


def random_bits(numel: int, key: int, device: torch.device | str = "cpu") -> Tensor:
    """The 32 bits of one draw per flat element for ``key`` (an int32 tensor holding the 32-bit words)."""
    if numel <= 2**31:
        index = torch.arange(numel, dtype=torch.int32, device=device)
    else:  # counters wrap at 2^32
        index = (torch.arange(numel, dtype=torch.int64, device=device) & _MASK32).to(torch.int32)
    return hash32(index ^ signed32(key))


def stochastic_round_to_bf16(x: Tensor, key: int, purpose: int = PURPOSE_PARAM) -> Tensor:
    """``x`` (float32) rounded to bfloat16 up or down at random, unbiased, with the 16 bits of
    ``purpose`` from the draw of ``key`` (see the module's docstring)."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic rounding takes float32 values, got {x.dtype}")
    bits = x.contiguous().view(torch.int32).reshape(-1)
    draw = random_bits(bits.numel(), key, x.device)
    shift = noise_shift(purpose)
    noise = (_shift_right(draw, shift) if shift else draw) & 0xFFFF
    # Two's-complement addition is the unsigned one: a carry out of the low 16 bits rounds |x| up.
    rounded = (bits + noise) & signed32(0xFFFF0000)
    out = rounded.view(torch.float32).view(x.shape).to(torch.bfloat16)  # exact: low 16 bits are 0
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), out)


def kahan_value(param: Tensor, compensation: Tensor) -> Tensor:
    """The param's true value ``p + c`` in float32 (a new tensor)."""
    return param.to(torch.float32) + compensation.to(torch.float32)


def kahan_store(param: Tensor, compensation: Tensor, value: Tensor) -> None:
    """Write float32 ``value`` into the bfloat16 ``param`` and keep what rounding lost in ``compensation``."""
    param.copy_(value)
    compensation.copy_(value - param.to(torch.float32))
