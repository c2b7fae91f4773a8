"""Test-wide settings: Triton kernels run on CPU tensors through Triton's interpreter where no GPU is;
the fixtures every test file may use."""

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported anywhere in the process.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread for the test (see :func:`_helpers.one_thread`)."""
    from _helpers import one_thread  # not at the top: the environment above comes first

    with one_thread():
        yield
