"""adamw: a drop-in ``torch.optim.AdamW`` with its own fused kernels (C on the CPU, Triton on CUDA)."""

from .functional import adamw
from .in_backward import step_in_backward
from .optimizer import AdamW

__all__ = ["AdamW", "adamw", "step_in_backward"]
__version__ = "0.1.0"
