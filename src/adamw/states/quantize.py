r"""8-bit blockwise quantization of the moments: the two code tables and ``quantize``/``dequantize``.

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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

BLOCK_SIZE = 256
"""Values per block, each block with one float32 absmax."""

LADDER_STEPS_PER_OCTAVE = 8
"""Both tables are the ladder 2^(-k / LADDER_STEPS_PER_OCTAVE)."""


def _ladder(count: int) -> list[float]:
    return [2.0 ** (-k / LADDER_STEPS_PER_OCTAVE) for k in range(count)]


@dataclass(frozen=True)
class Code:
    """One 8-bit code table: ascending magnitudes ending at 1.0, 128 behind a sign bit or 256 unsigned.
    ``ladder_steps`` says the nonzero magnitudes are the ladder ``2^(-k / ladder_steps)``, which lets
    the encoder guess the index from a logarithm instead of a binary search (the midpoints still
    decide: see :meth:`magnitude_index`). A table that breaks these rules is rejected here."""

    name: str
    magnitudes: tuple[float, ...]
    signed: bool
    ladder_steps: int | None = None
    _cache: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        expected = 128 if self.signed else 256
        if len(self.magnitudes) != expected:
            raise ValueError(f"a {'signed' if self.signed else 'unsigned'} code needs {expected} magnitudes")
        if list(self.magnitudes) != sorted(self.magnitudes) or self.magnitudes[-1] != 1.0:
            raise ValueError("magnitudes must ascend and end at 1.0")
        if self.ladder_steps is not None:
            top = len(self.magnitudes) - 1
            nonzero = [(j, m) for j, m in enumerate(self.magnitudes) if m != 0]
            if any(m != 2.0 ** (-(top - j) / self.ladder_steps) for j, m in nonzero) or len(nonzero) < top:
                raise ValueError(f"magnitudes are not the ladder 2^(-k/{self.ladder_steps})")

    def tables(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """``(values, midpoints)`` in float32 on ``device``: ``values[code]`` is each of the 256 codes'
        normalized value, ``midpoints`` the boundaries between neighbouring magnitudes that the encoder
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
            index = index + (y < 0).to(index.dtype) * 128
        return index.to(torch.uint8)

    def magnitude_index(self, magnitude: Tensor) -> Tensor:
        """The number of midpoints strictly below each value: ``torch.bucketize``'s answer.

        On a ladder, ``top + round(steps * log2(y))`` is that number or one off it (rounding on a
        log scale and on arithmetic midpoints differ only between a geometric and an arithmetic
        mean), so one comparison with each neighbouring midpoint makes it exact: the same codes as
        the binary search, in a few elementwise passes (float32 and int32, never int64).
        """
        _, mids, bounds = self._tables(magnitude.device)
        if self.ladder_steps is None:
            return torch.bucketize(magnitude, mids)
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


def num_blocks(numel: int) -> int:
    return (numel + BLOCK_SIZE - 1) // BLOCK_SIZE


def _blocks(x: Tensor) -> Tensor:
    """``x`` flat, zero-padded to whole blocks, as (blocks, BLOCK_SIZE)."""
    flat = x.reshape(-1)
    pad = num_blocks(flat.numel()) * BLOCK_SIZE - flat.numel()
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, BLOCK_SIZE)


def quantize(x: Tensor, code: Code) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit quantization of a float32 tensor of any shape (non-negative for unsigned codes).

    Returns ``(codes, absmax)``: uint8 codes shaped like ``x`` and one float32 absmax per block of
    256 flat values. Non-finite input gives a non-finite absmax, so it decodes to NaN (never to a
    finite value that would hide it).
    """
    if x.dtype != torch.float32:
        raise TypeError(f"quantize takes float32 values, got {x.dtype}")
    blocks = _blocks(x)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = code.encode_normalized(blocks / safe.unsqueeze(1))
    return codes.reshape(-1)[: x.numel()].view(x.shape), absmax


def dequantize(codes: Tensor, absmax: Tensor, code: Code) -> Tensor:
    """Float32 values of ``codes`` (any shape) with one ``absmax`` per block of 256 flat values."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"dequantize takes uint8 codes, got {codes.dtype}")
    if absmax.numel() != num_blocks(codes.numel()):
        raise ValueError(f"{codes.numel()} codes need {num_blocks(codes.numel())} absmax values, got {absmax.numel()}")
    blocks = _blocks(codes)
    values = code.decode_normalized(blocks) * absmax.to(torch.float32).unsqueeze(1)
    return values.reshape(-1)[: codes.numel()].view(codes.shape)


def quantization_error_bound(code: Code) -> float:
    """Largest |decoded - x| / absmax that nearest-code rounding allows: half the largest gap."""
    mags = code.magnitudes
    return max(b - a for a, b in zip(mags[:-1], mags[1:], strict=True)) / 2
