"""Test-wide settings: Triton kernels run on CPU tensors through Triton's interpreter where no GPU is."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported anywhere in the process.
    os.environ.setdefault("TRITON_INTERPRET", "1")
