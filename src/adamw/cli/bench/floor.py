"""The memory floor of a step, as a row of ``adamw bench``: AdamW's memory traffic with no math.

:class:`MemoryFloor` has an optimizer's interface so that the bench times it like the others, but its
"step" changes nothing: one pass of ``floor.c`` reads param, grad, exp_avg and exp_avg_sq and
writes param, exp_avg and exp_avg_sq back unchanged, on all threads, as a fused step does. No step
that keeps its state in the param's dtype can take less time on the same buffers, so the ratio of
another row's time to this one bounds what any faster kernel could gain (e.g. over the foreach path).
CPU tensors only; the library is built on first use by :mod:`adamw.backends._native`, as our kernels are.
"""

from __future__ import annotations

import array
import ctypes
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adamw.backends import _native

SOURCE = Path(__file__).with_name("floor.c")


def _bind(lib: ctypes.CDLL) -> Callable[..., int]:
    fn = lib.adamw_floor_pass
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    # item, n, params, grads, exp_avgs, exp_avg_sqs, numels, num_threads, mask
    fn.argtypes = [i32, i64, ptr, ptr, ptr, ptr, ptr, i32, i64]
    fn.restype = i32
    return fn


KERNEL = _native.Kernel(SOURCE, _bind, "memory-floor probe", "leave out the floor row")


def floor_pass() -> Callable[..., int]:
    """The C pass, compiled (or loaded from the cache) on first use."""
    return _native.load(KERNEL).step_fn


class MemoryFloor(torch.optim.Optimizer):
    """Not an optimizer: each ``step`` moves a fused AdamW step's bytes and leaves every value as it was."""

    def __init__(self, params: Iterable[Tensor], *, mask: int = 0) -> None:
        super().__init__(params, {})
        self._mask = mask  # all ones (-1) in the tests: then every value is XORed with its grad's bits

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(not p.is_cpu or not p.is_contiguous() or not p.grad.is_contiguous() for p in params):
                raise RuntimeError("the memory floor runs on contiguous CPU tensors only")
            for p in params:
                state = self.state[p]
                if not state:  # the moments a fused step keeps, in the param's dtype
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
            items = {p.element_size() for p in params}
            if len(items) != 1:
                raise RuntimeError("the memory floor needs params of one element size per group")
            columns = [
                array.array("Q", [t.data_ptr() for t in column])
                for column in (
                    params,
                    [p.grad for p in params],
                    [self.state[p]["exp_avg"] for p in params],
                    [self.state[p]["exp_avg_sq"] for p in params],
                )
            ]
            numels = array.array("q", [p.numel() for p in params])
            rc = floor_pass()(
                items.pop(),
                len(params),
                *(column.buffer_info()[0] for column in columns),
                numels.buffer_info()[0],
                torch.get_num_threads(),
                self._mask,
            )
            if rc != 0:
                raise RuntimeError(f"the memory floor pass failed with code {rc}")
