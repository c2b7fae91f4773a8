"""How the moments are stored: full precision ("param"), bfloat16 ("bf16"), 8-bit or 4-bit blockwise.

A :class:`StateFormat` turns a moment into what the state dict holds (``encode``) and back into the
float32 values the math runs on (``decode``); the math itself never sees the storage. The rules,
written down once:

* ``"param"``: each moment is a tensor shaped and typed like its param, exactly as
  ``torch.optim.AdamW`` keeps it (complex params keep complex moments).
* ``"bf16"``: each moment is a bfloat16 tensor.
* Whatever the format, a moment stored in bfloat16 (``"bf16"``, or ``"param"`` for a bfloat16
  param on the low-bit path) is written with stochastic rounding, because with ``beta2 = 0.999`` the
  change of ``v`` in one step (at most 0.1%) is below half a bfloat16 step (0.2% to 0.4%): rounded
  to nearest, ``v`` could never decrease and would only ratchet upwards. Stochastic rounding keeps
  it unbiased (the bits: :mod:`adamw.states.rounding`).
* ``"8bit"``: ``state[name]`` holds uint8 codes shaped like the param and ``state[name + "_absmax"]``
  one float32 absmax per block of 256 (:mod:`adamw.states.quantize`): ``exp_avg`` with the signed
  code, ``exp_avg_sq`` and ``max_exp_avg_sq`` with the unsigned one.
* ``"4bit"``: the same rules with 16-entry codes and blocks of 128; ``state[name]`` holds the codes
  two to a byte, flat (``(numel + 1) // 2`` bytes: value ``2i`` in the low nibble of byte ``i``).
* Under ``"8bit"`` and ``"4bit"``, params with fewer than :data:`MIN_QUANTIZED_NUMEL` (4096) values
  keep their moments in the dtype the math runs in: their state is negligible, and a handful of
  blocks would quantize e.g. a LayerNorm's few scales coarsely for no saving.

Complex params are stored as their real view (``torch.view_as_real``) in "bf16", "8bit" and "4bit".
The math runs in float64 for float64 params and in float32 for every other dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from .quantize import (
    BLOCK_SIZE,
    BLOCK_SIZE_4BIT,
    SIGNED_CODE,
    SIGNED_CODE_4BIT,
    UNSIGNED_CODE,
    UNSIGNED_CODE_4BIT,
    Code,
    dequantize,
    num_blocks,
    pack_nibbles,
    quantize,
    unpack_nibbles,
)
from .rounding import MOMENT_PURPOSES, stochastic_round_to_bf16

StatePrecision = Literal["param", "bf16", "8bit", "4bit"]
STATE_PRECISIONS: tuple[str, ...] = ("param", "bf16", "8bit", "4bit")

MIN_QUANTIZED_NUMEL = 4096
"""Params with fewer values keep unquantized moments under ``state_precision="8bit"`` or ``"4bit"``."""

MOMENTS: tuple[str, ...] = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
ABSMAX_SUFFIX = "_absmax"


def compute_dtype(param: Tensor) -> torch.dtype:
    """The dtype the update math runs in for ``param``."""
    return torch.float64 if param.dtype in (torch.float64, torch.complex128) else torch.float32


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _real_shape(t: Tensor) -> tuple[int, ...]:
    return (*t.shape, 2) if t.is_complex() else tuple(t.shape)


class StateFormat:
    """Storage of one param's moments. Subclasses set ``name`` and implement the methods that raise;
    :meth:`layout` is the one statement of what a format stores."""

    name: str = ""

    def layout(self, param: Tensor, key: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The dtype and shape of each entry :meth:`zeros` creates, without creating them (a check of
        a stored state costs no allocation)."""
        raise NotImplementedError

    def zeros(self, param: Tensor, key: str) -> dict[str, Tensor]:
        """The state entries of moment ``key`` at zero (to merge into the param's state)."""
        return {
            name: torch.zeros(shape, dtype=dtype, device=param.device)
            for name, (dtype, shape) in self.layout(param, key).items()
        }

    def decode(self, state: dict[str, Tensor], key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
        """Moment ``key`` as a real tensor of ``dtype`` and ``shape`` (its param's real shape); may be
        the stored tensor itself."""
        raise NotImplementedError

    def encode(self, state: dict[str, Tensor], key: str, value: Tensor, rounding_key: int | None = None) -> None:
        """Store ``value`` (from :meth:`decode`, updated) as moment ``key``; ``rounding_key`` seeds
        stochastic rounding where the format uses it, ``None`` rounds to nearest (conversions, checkpoints)."""
        raise NotImplementedError

    def bytes_per_element(self, param: Tensor) -> float:
        """Bytes one moment of ``param`` takes per param value (``nbytes / numel``)."""
        layout = self.layout(param, "exp_avg").values()
        return sum(math.prod(shape) * dtype.itemsize for dtype, shape in layout) / max(param.numel(), 1)

    def nbytes(self, state: Mapping[str, object], key: str) -> int:
        """Bytes that moment ``key`` takes in ``state`` (its codes and absmax, for 8-bit)."""
        return state_nbytes({k: v for k, v in state.items() if k in (key, key + ABSMAX_SUFFIX)})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class PlainFormat(StateFormat):
    """Moments as plain tensors: of the param's own dtype and shape (``dtype=None``, torch's layout),
    or real tensors of ``dtype`` (bfloat16 ones written with stochastic rounding when given a key)."""

    def __init__(self, dtype: torch.dtype | None = None, name: str | None = None) -> None:
        self.dtype = dtype
        self.name = name or ("param" if dtype is None else str(dtype).removeprefix("torch."))

    def zeros(self, param: Tensor, key: str) -> dict[str, Tensor]:
        if self.dtype is None:
            return {key: torch.zeros_like(param, memory_format=torch.preserve_format)}
        return {key: torch.zeros_like(_real(param), dtype=self.dtype, memory_format=torch.preserve_format)}

    def layout(self, param: Tensor, key: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        if self.dtype is None:
            return {key: (param.dtype, tuple(param.shape))}
        return {key: (self.dtype, _real_shape(param))}

    def decode(self, state: dict[str, Tensor], key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
        return _real(state[key]).to(dtype)  # no copy when the stored dtype is the compute dtype

    def encode(self, state: dict[str, Tensor], key: str, value: Tensor, rounding_key: int | None = None) -> None:
        stored = _real(state[key])
        if stored.dtype == torch.bfloat16 and rounding_key is not None:
            stored.copy_(stochastic_round_to_bf16(value.to(torch.float32), rounding_key, MOMENT_PURPOSES[key]))
        elif stored.data_ptr() != value.data_ptr() or stored.dtype != value.dtype:
            stored.copy_(value)


class BlockwiseFormat(StateFormat):
    """Codes of ``bits`` bits and a float32 absmax per block of ``block_size`` flat values
    (:mod:`adamw.states.quantize`). 8-bit codes are a uint8 tensor shaped like the real param; 4-bit
    codes are packed two to a byte in a flat uint8 tensor (:func:`~adamw.states.quantize.pack_nibbles`)."""

    def __init__(self, name: str, bits: int, block_size: int, codes: Mapping[str, Code]) -> None:
        if bits not in (4, 8) or any(code.bits != bits for code in codes.values()):
            raise ValueError(f"a blockwise format has 4 or 8 bits, and codes of as many; got {bits}")
        self.name, self.bits, self.block_size, self.codes = name, bits, block_size, dict(codes)

    def layout(self, param: Tensor, key: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        shape = _real_shape(param)
        numel = math.prod(shape)
        stored = shape if self.bits == 8 else ((numel + 1) // 2,)
        return {key: (torch.uint8, stored), key + ABSMAX_SUFFIX: (torch.float32, (self.num_blocks(numel),))}

    def num_blocks(self, numel: int) -> int:
        return num_blocks(numel, self.block_size)

    def decode(self, state: dict[str, Tensor], key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
        codes = state[key]
        if self.bits == 4:
            codes = unpack_nibbles(codes, math.prod(shape)).view(shape)
        return dequantize(codes, state[key + ABSMAX_SUFFIX], self.codes[key], self.block_size).to(dtype)

    def encode(self, state: dict[str, Tensor], key: str, value: Tensor, rounding_key: int | None = None) -> None:
        codes, absmax = quantize(value.to(torch.float32), self.codes[key], self.block_size)
        state[key].copy_(codes if self.bits == 8 else pack_nibbles(codes))
        state[key + ABSMAX_SUFFIX].copy_(absmax)


PARAM = PlainFormat()
FLOAT32 = PlainFormat(torch.float32)
FLOAT64 = PlainFormat(torch.float64)
BF16 = PlainFormat(torch.bfloat16, name="bf16")
# exp_avg takes the signed code, exp_avg_sq and max_exp_avg_sq the unsigned one
INT8 = BlockwiseFormat("8bit", 8, BLOCK_SIZE, dict(zip(MOMENTS, (SIGNED_CODE, *[UNSIGNED_CODE] * 2), strict=True)))
INT4 = BlockwiseFormat(
    "4bit", 4, BLOCK_SIZE_4BIT, dict(zip(MOMENTS, (SIGNED_CODE_4BIT, *[UNSIGNED_CODE_4BIT] * 2), strict=True))
)


def format_for(param: Tensor, state_precision: str) -> StateFormat:
    """The format of ``param``'s moments under ``state_precision`` (the 4096-value rule lives here)."""
    if state_precision == "param":
        return PARAM
    if state_precision == "bf16":
        return BF16
    if state_precision in ("8bit", "4bit"):
        if _real(param).numel() >= MIN_QUANTIZED_NUMEL:
            return INT8 if state_precision == "8bit" else INT4
        return FLOAT64 if compute_dtype(param) == torch.float64 else FLOAT32
    raise ValueError(f"state_precision must be one of {STATE_PRECISIONS}, but got {state_precision!r}")


def stored_format(state: dict[str, Tensor], key: str, param: Tensor) -> StateFormat:
    """The format moment ``key`` is stored in, read from the state itself (for conversions)."""
    for name in (key, key + ABSMAX_SUFFIX):
        if name in state and not isinstance(state[name], Tensor):
            raise ValueError(f"state[{name!r}] is a {type(state[name]).__name__}, not a tensor")
    stored = state[key]
    if key + ABSMAX_SUFFIX in state:
        if stored.dtype != torch.uint8:
            raise ValueError(
                f"state[{key + ABSMAX_SUFFIX!r}] marks state[{key!r}] as 8-bit or 4-bit codes, but it holds "
                f"{stored.dtype} values"
            )
        # 8-bit codes are shaped like the param, 4-bit ones flat and half as many (a quantized param
        # has at least 4096 values, so the two never look alike)
        packed = stored.dim() == 1 and stored.numel() == (_real(param).numel() + 1) // 2
        return INT4 if packed and _real(param).numel() > 1 else INT8
    if stored.dtype == torch.uint8:
        raise ValueError(
            f"state[{key!r}] holds 8-bit or 4-bit codes but no {key + ABSMAX_SUFFIX!r}: the checkpoint is incomplete"
        )
    if not (stored.is_floating_point() or stored.is_complex()):
        raise ValueError(
            f"state[{key!r}] holds {stored.dtype} values: a moment is stored as floating point "
            f"(or as uint8 codes beside {key + ABSMAX_SUFFIX!r})"
        )
    if stored.dtype == param.dtype and stored.shape == param.shape:
        return PARAM
    return PlainFormat(stored.dtype)


def _check_shape(state: dict[str, Tensor], key: str, param: Tensor, fmt: StateFormat) -> None:
    stored = state[key]
    expected = fmt.layout(param, key)
    if stored.shape != expected[key][1]:
        raise ValueError(
            f"state[{key!r}] has shape {tuple(stored.shape)} but its param needs {expected[key][1]}: "
            "the checkpoint belongs to another model or param order"
        )
    if isinstance(fmt, BlockwiseFormat):
        blocks = state[key + ABSMAX_SUFFIX].numel()
        numel = _real(param).numel()
        if blocks != fmt.num_blocks(numel):
            raise ValueError(
                f"state[{key + ABSMAX_SUFFIX!r}] has {blocks} blocks; {numel} values in blocks of "
                f"{fmt.block_size} need {fmt.num_blocks(numel)}"
            )


def convert_state(
    state: dict[str, Tensor], param: Tensor, state_precision: str, target: StateFormat | None = None
) -> dict[str, Tensor]:
    """``state`` with its moments re-stored in ``state_precision`` (a new dict; other entries kept).

    Reads any format this module writes and torch.optim.AdamW's, so a checkpoint moves between
    formats: torch's float32 moments become 8-bit codes, 8-bit codes become bf16, and so on.
    Rounding is to nearest, so a conversion is deterministic. ``target`` overrides the format
    ``state_precision`` picks for ``param`` (a DTensor's local shard takes its whole param's).
    """
    target = target or format_for(param, state_precision)
    dtype = compute_dtype(param)
    out = {k: v for k, v in state.items() if not any(k == m + ABSMAX_SUFFIX for m in MOMENTS)}
    for key in MOMENTS:
        if key not in state:
            continue
        source = stored_format(state, key, param)
        _check_shape(state, key, param, source)
        value = source.decode(state, key, dtype, _real_shape(param)).clone()
        out.pop(key)
        entries = target.zeros(param, key)
        target.encode(entries, key, value)
        out.update(entries)
    return out


def full_precision_state(state: dict[str, Tensor], param: Tensor) -> dict[str, Tensor]:
    """``state`` as ``torch.optim.AdamW`` keeps it: moments in the param's dtype and shape, only
    torch's keys (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``); what torch has no use
    for (e.g. a Kahan compensation) is dropped."""
    out = convert_state(state, param, "param")
    return {k: v for k, v in out.items() if k == "step" or k in MOMENTS}


def state_nbytes(state: Mapping[str, object]) -> int:
    """Bytes of every tensor in one param's state (the step counter included)."""
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, Tensor))
