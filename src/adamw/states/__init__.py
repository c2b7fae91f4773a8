"""Low-bit optimizer state: how the moments are stored (``formats``: "param", "bf16", "8bit", with the
8-bit code tables and blocks in ``quantize``), how a float32 result is written into a bfloat16 param
(``rounding``: stochastic rounding, Kahan compensation), a param's state entries (``entries``) and
its checkpoint layout and conversions (``checkpoint``). The step that runs on them:
:mod:`adamw.backends.forloop`.
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
