r"""Blockwise quantization of the moments (8-bit and 4-bit): the code tables and ``quantize``/``dequantize``.

The rules, written down once (the C and Triton kernels must follow them bit for bit):

* **Blocks.** A tensor is read flat, in blocks of :data:`BLOCK_SIZE` = 256 values; the last block
  may be short. Each block stores one float32 ``absmax`` = max |x| over the block, taken from the
  values being stored (after the moment update), so nothing is ever clipped: the largest value maps
  to normalized magnitude exactly 1.0 (``x / x == 1`` in IEEE arithmetic), which is a code.
* **Normalization.** ``y = x / absmax`` with a correctly rounded float32 division (not a
  multiplication by a reciprocal, nor Triton's default approximate ``/``: use ``div_rn``), since a
  last-bit difference can pick another code. A block whose absmax is 0 stores code 0 everywhere and
  decodes to exact zeros.
* **Nearest code.** A magnitude's index is the number of float32 midpoints between neighbouring
  entries that are strictly below it (``torch.bucketize``, ``right=False``): a value exactly on a
  midpoint takes the smaller magnitude. Signed codes add 128 when ``x < 0``.
* **Decoding** is ``table[code] * absmax`` in float32.

The tables. What the update uses is ``m / sqrt(v)`` element by element, so the error that matters is
the *relative* error of each stored value, whatever its size within the block. A geometric ladder
has the same relative error at every magnitude (the minimax choice), so both tables are one ladder,
:math:`2^{-k/8}`, ``k = 0, 1, 2, ...`` (a step of 9.05%: at most ~4.4% error):

* ``exp_avg`` (:data:`SIGNED_CODE`): sign and magnitude. Bit 7 is the sign, bits 0-6 index 128
  magnitudes: 0 and :math:`2^{-k/8}` for ``k = 0..126`` (down to :math:`2^{-15.75} \approx 1.8\cdot10^{-5}`
  of the block's absmax; below half of that a value becomes 0). The sign is a bit of its own, so a
  value can never decode to the opposite sign, by construction rather than by a property of the
  search (codes 0 and 128 both decode to zero: one code of 256 spent on that guarantee).
* ``exp_avg_sq`` and ``max_exp_avg_sq`` (:data:`UNSIGNED_CODE`): 256 values :math:`2^{-k/8}`,
  ``k = 0..255``, and **no zero**: the smallest is :math:`2^{-31.875} \approx 2.5\cdot10^{-10}` of the
  absmax. Why: ``v`` sits in a denominator. If a small nonzero ``v`` decoded to 0 while its ``m``
  did not, the step would be ``lr * m / eps``, a blow-up by orders of magnitude. Without a zero code
  a nonzero ``v`` decodes to at least ``2^-31.875 * absmax``: a value that small rounds *up*, which
  only shrinks that element's step (the safe direction). Exact zeros still decode to zero when the
  whole block is zero (absmax 0), and an element whose ``v`` is 0 in a nonzero block has ``m == 0``
  too (both start at 0 and see the same gradients), so its step is 0 either way.
  The range is the square of ``exp_avg``'s (``sqrt(v)`` runs over the same :math:`2^{-16}` as
  ``m``), and in the ``sqrt(v)`` that the step uses the ladder's error halves (at most ~2.2%).

What an 8-bit ``v`` tracks, and what it does not: the block's scale moves exactly (the float32
absmax is recomputed every step), but an element's share of its block changes code only when one
step moves it by more than half a ladder step (~4.4%). With ``beta2 = 0.999`` one step moves ``v``
by at most 0.1% times ``g^2 / v``, so after the first few dozen steps the shares stay where they
are unless a gradient grows sharply (``g^2`` above ~45 ``v``); a share that should grow lags, and
that element's steps are larger than float32 Adam's (by ``sqrt`` of the lag). Any 8-bit code rounded
to nearest behaves so (a finer code near 1 only lowers the threshold); stochastic rounding would
remove the bias but its noise, summed over ~1/(1 - beta2) steps, would be of the order of ``v``
itself. ``tests/test_low_bit_optimizer.py`` and ``adamw demo`` measure what this costs in training.

**4 bits** (``state_precision="4bit"``) follow every rule above with 16-entry tables, blocks of
:data:`BLOCK_SIZE_4BIT` = 128 (a float32 absmax per 128 values: 0.53 bytes per value in all) and the
codes packed two to a byte (:func:`pack_nibbles`):

* ``exp_avg`` (:data:`SIGNED_CODE_4BIT`): bit 3 the sign, 8 magnitudes 0 and :math:`2^{-k/2}`,
  ``k = 0..6`` (a step of 41%: at most ~17% error; below 1/16 of the block's absmax a value is 0).
* ``exp_avg_sq`` (:data:`UNSIGNED_CODE_4BIT`): 16 values :math:`2^{-k}`, ``k = 0..15``, no zero
  (down to :math:`3\cdot10^{-5}` of the absmax; at most ~1/3 error in ``v``, ~18% in ``sqrt(v)``).

These were chosen by training (``benchmarks/four_bit_designs.py``, BENCHMARKS.md): against octave
steps for ``m`` the half-octave steps gave the lowest loss of the candidates on both models tried;
finer steps for ``v`` did worse (the coarser ``v`` ladder keeps its range); blocks of 64 trained no
better on the transformer and cost 0.03 bytes per value more (over 1.1 bytes per param for the two).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

BLOCK_SIZE = 256
"""Values per block, each block with one float32 absmax."""

LADDER_STEPS_PER_OCTAVE = 8
"""Both tables are the ladder 2^(-k / LADDER_STEPS_PER_OCTAVE)."""


def _ladder(count: int, steps_per_octave: float = LADDER_STEPS_PER_OCTAVE) -> list[float]:
    return [2.0 ** (-k / steps_per_octave) for k in range(count)]


@dataclass(frozen=True)
class Code:
    """One code table of ``bits`` bits: ascending magnitudes ending at 1.0, ``2^(bits-1)`` behind a sign
    bit (the top bit) or ``2^bits`` unsigned. ``ladder_steps`` says the nonzero magnitudes are the
    ladder ``2^(-k / ladder_steps)``, which lets the encoder guess the index from a logarithm instead
    of a binary search (the midpoints still decide: see :meth:`magnitude_index`). A table that breaks
    these rules is rejected here."""

    name: str
    magnitudes: tuple[float, ...]
    signed: bool
    ladder_steps: int | None = None
    bits: int = 8
    _cache: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        expected = self.sign_bit if self.signed else 2**self.bits
        if len(self.magnitudes) != expected:
            raise ValueError(f"a {'signed' if self.signed else 'unsigned'} code needs {expected} magnitudes")
        if list(self.magnitudes) != sorted(self.magnitudes) or self.magnitudes[-1] != 1.0:
            raise ValueError("magnitudes must ascend and end at 1.0")
        if self.ladder_steps is not None:
            top = len(self.magnitudes) - 1
            nonzero = [(j, m) for j, m in enumerate(self.magnitudes) if m != 0]
            if any(m != 2.0 ** (-(top - j) / self.ladder_steps) for j, m in nonzero) or len(nonzero) < top:
                raise ValueError(f"magnitudes are not the ladder 2^(-k/{self.ladder_steps})")

    @property
    def sign_bit(self) -> int:
        """The value of the sign bit of a signed code (the top bit): 128 for 8 bits, 8 for 4."""
        return 2 ** (self.bits - 1)

    def tables(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """``(values, midpoints)`` in float32 on ``device``: ``values[code]`` is each code's normalized
        value, ``midpoints`` the boundaries between neighbouring magnitudes that the encoder
        searches. Kernels take these tensors as they are: they are the definition, never recomputed."""
        values, mids, _ = self._tables(torch.device(device))
        return values, mids

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        if device not in self._cache:
            mags64 = torch.tensor(self.magnitudes, dtype=torch.float64)
            mids = ((mags64[1:] + mags64[:-1]) / 2).to(torch.float32)
            mags = mags64.to(torch.float32)
            values = torch.cat([mags, -mags]) if self.signed else mags
            inf = torch.tensor([float("inf")])
            bounds = torch.cat([-inf, mids, inf])  # bounds[i], bounds[i + 1]: magnitude i's interval
            self._cache[device] = (values.to(device), mids.to(device), bounds.to(device))
        return self._cache[device]

    def encode_normalized(self, y: Tensor) -> Tensor:
        """Codes (uint8) of values already divided by their block's absmax (so ``|y| <= 1``)."""
        magnitude = y.abs() if self.signed else y
        index = self.magnitude_index(magnitude)
        if self.signed:
            index = index + (y < 0).to(index.dtype) * self.sign_bit
        return index.to(torch.uint8)

    def magnitude_index(self, magnitude: Tensor) -> Tensor:
        """The number of midpoints strictly below each value: ``torch.bucketize``'s answer.

        On a ladder, ``top + round(steps * log2(y))`` is that number or one off it (rounding on a
        log scale and on arithmetic midpoints differ only between a geometric and an arithmetic
        mean), so one comparison with each neighbouring midpoint makes it exact: the same codes as
        the binary search, in a few elementwise passes (float32 and int32, never int64).
        """
        _, mids, bounds = self._tables(magnitude.device)
        if self.ladder_steps is None:  # NaN: no midpoint is below it (bucketize would put it last)
            return torch.bucketize(torch.nan_to_num(magnitude, nan=0.0), mids)
        top = len(self.magnitudes) - 1
        guess = torch.log2(magnitude).mul_(self.ladder_steps).round_().add_(top)
        guess = torch.nan_to_num_(guess, nan=0.0, neginf=0.0).clamp_(0, top)
        flat = guess.reshape(-1).to(torch.int32)
        below = bounds[:-1].index_select(0, flat).view(guess.shape)
        above = bounds[1:].index_select(0, flat).view(guess.shape)
        return guess.sub_((magnitude <= below).to(guess.dtype)).add_((magnitude > above).to(guess.dtype))

    def decode_normalized(self, codes: Tensor) -> Tensor:
        """Normalized float32 values of ``codes`` (before multiplying by the absmax)."""
        values, _ = self.tables(codes.device)
        return values.index_select(0, codes.reshape(-1).to(torch.int64)).view(codes.shape)


SIGNED_CODE = Code(
    "signed-ladder", tuple([0.0] + _ladder(127)[::-1]), signed=True, ladder_steps=LADDER_STEPS_PER_OCTAVE
)
"""``exp_avg``: sign bit + {0, 2^(-k/8) for k = 0..126}."""

UNSIGNED_CODE = Code("unsigned-ladder", tuple(_ladder(256)[::-1]), signed=False, ladder_steps=LADDER_STEPS_PER_OCTAVE)
"""``exp_avg_sq``: 2^(-k/8) for k = 0..255 (no zero: see the module's docstring)."""


BLOCK_SIZE_4BIT = 128
"""Values per block of a 4-bit moment (``state_precision="4bit"``)."""

SIGNED_CODE_4BIT = Code("signed-ladder-4bit", tuple([0.0] + _ladder(7, 2)[::-1]), signed=True, ladder_steps=2, bits=4)
"""``exp_avg`` in 4 bits: sign bit + {0, 2^(-k/2) for k = 0..6}."""

UNSIGNED_CODE_4BIT = Code("unsigned-ladder-4bit", tuple(_ladder(16, 1)[::-1]), signed=False, ladder_steps=1, bits=4)
"""``exp_avg_sq`` in 4 bits: 2^-k for k = 0..15 (no zero)."""


def num_blocks(numel: int, block_size: int = BLOCK_SIZE) -> int:
    return (numel + block_size - 1) // block_size


def _blocks(x: Tensor, block_size: int) -> Tensor:
    """``x`` flat, zero-padded to whole blocks, as (blocks, block_size)."""
    flat = x.reshape(-1)
    pad = num_blocks(flat.numel(), block_size) * block_size - flat.numel()
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def quantize(x: Tensor, code: Code, block_size: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """Blockwise quantization of a float32 tensor of any shape (non-negative for unsigned codes).

    Returns ``(codes, absmax)``: uint8 codes (one per value, whatever ``code.bits``) shaped like ``x``
    and one float32 absmax per block of ``block_size`` flat values. Non-finite input gives a
    non-finite absmax, so it decodes to NaN (never to a finite value that would hide it).
    """
    if x.dtype != torch.float32:
        raise TypeError(f"quantize takes float32 values, got {x.dtype}")
    blocks = _blocks(x, block_size)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = code.encode_normalized(blocks / safe.unsqueeze(1))
    return codes.reshape(-1)[: x.numel()].view(x.shape), absmax


def dequantize(codes: Tensor, absmax: Tensor, code: Code, block_size: int = BLOCK_SIZE) -> Tensor:
    """Float32 values of ``codes`` (any shape, one per value) with one ``absmax`` per block of
    ``block_size`` flat values."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"dequantize takes uint8 codes, got {codes.dtype}")
    blocks_needed = num_blocks(codes.numel(), block_size)
    if absmax.numel() != blocks_needed:
        raise ValueError(f"{codes.numel()} codes need {blocks_needed} absmax values, got {absmax.numel()}")
    blocks = _blocks(codes, block_size)
    values = code.decode_normalized(blocks) * absmax.to(torch.float32).unsqueeze(1)
    return values.reshape(-1)[: codes.numel()].view(codes.shape)


def pack_nibbles(codes: Tensor) -> Tensor:
    """4-bit codes (uint8 values below 16, any shape) two to a byte, flat: value ``2i`` in the low
    nibble of byte ``i``, value ``2i + 1`` in its high nibble (0 past an odd end)."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.nn.functional.pad(flat, (0, 1))
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: Tensor, numel: int) -> Tensor:
    """The first ``numel`` 4-bit codes of ``packed`` (see :func:`pack_nibbles`), flat uint8."""
    pairs = torch.stack([packed & 15, packed >> 4], dim=1)
    return pairs.reshape(-1)[:numel]


def quantization_error_bound(code: Code) -> float:
    """Largest |decoded - x| / absmax that nearest-code rounding allows: half the largest gap."""
    mags = code.magnitudes
    return max(b - a for a, b in zip(mags[:-1], mags[1:], strict=True)) / 2
