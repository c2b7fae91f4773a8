"""Low-bit optimizer state: how the moments are stored (full precision, bfloat16, 8-bit blockwise), how
a float32 result is written into a bfloat16 param (stochastic rounding, Kahan compensation), and a
param's state entries. The step that runs on them: :mod:`adamw.backends.forloop`.

=============  ==========================================================================
module         what lives there
=============  ==========================================================================
quantize       the 8-bit code tables and blockwise ``quantize``/``dequantize``
formats        ``StateFormat``: "param", "bf16", "8bit" (the 4096-value rule), conversions
rounding       stochastic rounding to bfloat16 (counter-based, seedable), Kahan compensation
entries        a param's state at step 0 (the Kahan buffer's key), a sharded param's entries
checkpoint     a param's first state, the state dict's layout (8-bit codes as ``exp_avg_codes``),
               reading it back, and the conversion of a loaded or re-formatted state to its
               group's format
=============  ==========================================================================
"""

from .entries import KAHAN_KEY, init_low_bit_state
from .formats import (
    MIN_QUANTIZED_NUMEL,
    STATE_PRECISIONS,
    StateFormat,
    StatePrecision,
    convert_state,
    format_for,
    full_precision_state,
    state_nbytes,
)
from .quantize import BLOCK_SIZE, SIGNED_CODE, UNSIGNED_CODE, Code, dequantize, quantize
from .rounding import PARAM_UPDATES, ParamUpdate, rounding_key, stochastic_round_to_bf16

__all__ = [
    "BLOCK_SIZE",
    "KAHAN_KEY",
    "MIN_QUANTIZED_NUMEL",
    "PARAM_UPDATES",
    "SIGNED_CODE",
    "STATE_PRECISIONS",
    "UNSIGNED_CODE",
    "Code",
    "ParamUpdate",
    "StateFormat",
    "StatePrecision",
    "convert_state",
    "dequantize",
    "format_for",
    "full_precision_state",
    "init_low_bit_state",
    "quantize",
    "rounding_key",
    "state_nbytes",
    "stochastic_round_to_bf16",
]
