"""adamw: a drop-in ``torch.optim.AdamW`` with its own fused kernels (C on the CPU, Triton on CUDA).

The public names load on first use (PEP 562), so ``import adamw`` alone does not import torch: the
``adamw`` command answers ``--help`` without it, and the tools of :mod:`adamw.cli` are never loaded
by the library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .functional import adamw
    from .in_backward import step_in_backward
    from .optimizer import AdamW

__all__ = ["AdamW", "adamw", "step_in_backward"]
__version__ = "0.1.0"

_HOMES = {"AdamW": ".optimizer", "adamw": ".functional", "step_in_backward": ".in_backward"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value  # later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
