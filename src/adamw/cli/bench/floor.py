"""The memory-floor rows of ``adamw bench``: a storage format's memory traffic with no arithmetic (what
the rows mean: the bench's help; how the pass moves the bytes: ``floor.c``). CPU tensors only; the C
library is built on first use by :mod:`adamw.backends._native`, as our kernels are.
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
from adamw.states import init_low_bit_state
from adamw.states.rounding import effective_param_update

SOURCE = Path(__file__).with_name("floor.c")


def _bind(lib: ctypes.CDLL) -> Callable[..., int]:
    fn = lib.adamw_floor_pass
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    # n, numels, first_piece, pieces, items, per, written, num_threads, mask, read_xor
    fn.argtypes = [i64, ptr, ptr, ptr, ptr, ptr, ptr, i32, i64, ptr]
    fn.restype = i32
    return fn


KERNEL = _native.Kernel(SOURCE, _bind, "memory-floor probe", "leave out the floor rows")


class MemoryFloor(torch.optim.Optimizer):
    """Not an optimizer, though timed as one: each ``step`` reads and writes the bytes of a fused AdamW step
    in the given storage format (:class:`adamw.AdamW`'s ``state_precision`` and ``param_update``, its
    state made as AdamW makes it; no amsgrad) and leaves every value as it was."""

    def __init__(
        self, params: Iterable[Tensor], *, state_precision: str = "param", param_update: str = "round", mask: int = 0
    ) -> None:
        super().__init__(params, {})
        self._format = {"state_precision": state_precision, "param_update": param_update}
        self._mask = mask  # all ones (-1) in the tests: then every written value has its bits flipped
        self.read_xor = 0  # the last step's XOR of every grad word it read (the tests check it)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p] = init_low_bit_state(
                        p,
                        amsgrad=False,
                        state_precision=self._format["state_precision"],
                        param_update=effective_param_update(p, self._format["param_update"]),
                    )
            first_piece, pieces, items, per, written = [0], [], [], [], []
            for p in params:
                tensors = [(p, True), (p.grad, False), *((t, True) for t in self.state[p].values())]
                for t, writes in tensors:
                    if not t.is_cpu or not t.is_contiguous():
                        raise RuntimeError("the memory floor runs on contiguous CPU tensors only")
                    pieces.append(t.data_ptr())
                    items.append(t.element_size())
                    per.append(1 if t.numel() == p.numel() else -(-p.numel() // max(t.numel(), 1)))
                    written.append(int(writes))
                first_piece.append(len(pieces))
            arrays = [
                array.array("q", [p.numel() for p in params]),
                array.array("q", first_piece),
                array.array("Q", pieces),
                array.array("i", items),
                array.array("q", per),
                array.array("i", written),
            ]
            read_xor = ctypes.c_uint64(0)
            rc = _native.load(KERNEL).step_fn(
                len(params),
                *(a.buffer_info()[0] for a in arrays),
                torch.get_num_threads(),
                self._mask,
                ctypes.byref(read_xor),
            )
            if rc != 0:
                raise RuntimeError(f"the memory floor pass failed with code {rc}")
            self.read_xor = read_xor.value
