"""The one plan cache of the kernel hosts: what a host builds for a param group (the C kernels'
pointer tables, the Triton kernels' launch tables), kept from one step to the next.

A plan is found by its group's key (the group's first param, its size and the options the plan
depends on) and used only while the group's :func:`fingerprint` is the one it was built for. Memory
that stays where it was but is read differently (``p.data = p.data.view(torch.float16)`` keeps the
address and the byte count) and a new param that reuses a dropped one's ``id`` both get a new plan,
checked as it is built. Plans hold no tensors of the group: a dropped model's memory is freed.

A fingerprint reads five attributes of every tensor, one Python call each: milliseconds a step for
a group of a thousand params (5000 tensors with their grads, states and step counters), a large part
of a GPU step's host time. So once a plan's fingerprint has matched, its entry keeps a
:class:`_Guard` over the tensors, checked instead in two passes: torch's C-level tensor check
(dtype, device, shape and strides of each tensor, one call) and the fixed tensors' addresses. A guard
that passes implies the same fingerprint; one that fails (or a torch without the check) falls back to
comparing fingerprints, so the guard changes the cost, never the answer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import torch
from torch import Tensor

from ._common import dtype_of, nbytes_of

# The tensor check Dynamo's guards were built on: C++, one call for a list of tensors. Its stub
# declares other argument types than it takes (a list of sizes per tensor), hence Any.
_TensorGuards: Any = getattr(getattr(torch._C, "_dynamo", None), "guards", None)
_TensorGuards = getattr(_TensorGuards, "TensorGuards", None)

_data_ptr = Tensor.data_ptr
_is_contiguous = Tensor.is_contiguous
# -1 on the CPU, else the device's index: tells apart the devices the kernels run (the CPU and CUDA
# devices) at half the cost of reading .device.
_get_device = Tensor.get_device

# addresses, sizes in bytes, dtypes, devices, and shapes and strides (None: all contiguous)
Fingerprint = tuple[list[int], list[int], list[torch.dtype], list[int], list[tuple[torch.Size, tuple[int, ...]]] | None]


def fingerprint(fixed: Sequence[Tensor], moving: Sequence[Tensor] = ()) -> Fingerprint:
    """What a plan built over these tensors relies on: the addresses of ``fixed`` (which the plan
    holds; ``moving``'s, the grads', are passed anew each step) and, of every tensor, its dtype, size
    in bytes (with the dtype, its number of values) and device, each read in one C-level pass
    (``map``); shapes and strides (a tuple per tensor) only where some tensor is not contiguous, as
    the kernels read contiguous tensors as flat arrays whatever their shapes."""
    tensors = [*fixed, *moving]
    contiguous = all(map(_is_contiguous, tensors))
    return (
        list(map(_data_ptr, fixed)),
        list(map(nbytes_of, tensors)),
        list(map(dtype_of, tensors)),
        list(map(_get_device, tensors)),
        None if contiguous else [(t.shape, t.stride()) for t in tensors],
    )


class Memory:
    """The tensors a plan is built over, as its cache checks them: ``fixed`` ones (the plan holds
    their addresses), ``moving`` ones (the grads, whose addresses are passed anew each step), and
    ``extra``, whatever else the plan depends on (compared with ``==``). Its :attr:`fingerprint` is
    read only where a kept plan's guard does not settle the question."""

    __slots__ = ("fixed", "moving", "extra", "_fingerprint")

    def __init__(self, fixed: Sequence[Tensor], moving: Sequence[Tensor] = (), extra: object = None) -> None:
        self.fixed, self.moving, self.extra = fixed, moving, extra
        self._fingerprint: Fingerprint | None = None

    @property
    def fingerprint(self) -> Fingerprint:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.fixed, self.moving)
        return self._fingerprint


class _Guard:
    """A quicker test that :class:`Memory`'s fingerprint is still one seen before: every tensor of
    the same dtype, device, shape and strides (so the same size in bytes and the same contiguity)
    as when the guard was made, and each fixed tensor at the same address. It holds numbers only,
    no tensor. Also compared by torch's check, and stricter than a fingerprint: a tensor's Python
    type, ``requires_grad`` and dispatch keys; a guard that fails for those only costs a fingerprint."""

    __slots__ = ("_check", "_count", "_addresses")

    def __init__(self, memory: Memory) -> None:
        assert _TensorGuards is not None
        tensors = [*memory.fixed, *memory.moving]
        shapes, strides = [list(t.shape) for t in tensors], [list(t.stride()) for t in tensors]
        self._check = _TensorGuards(*tensors, dynamic_dims_sizes=shapes, dynamic_dims_strides=strides).check
        self._count = len(tensors)
        self._addresses = list(map(_data_ptr, memory.fixed))

    @classmethod
    def over(cls, memory: Memory) -> _Guard | None:
        """A guard for ``memory``'s tensors as they are now, or None where torch cannot make one."""
        if _TensorGuards is None:
            return None
        try:
            return cls(memory)
        except Exception:  # a torch whose check takes other arguments: fingerprints only
            return None

    def passes(self, memory: Memory) -> bool:
        return (
            len(memory.fixed) + len(memory.moving) == self._count
            and self._check(*memory.fixed, *memory.moving)
            and list(map(_data_ptr, memory.fixed)) == self._addresses
        )


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    plans: int  # kept, pinned ones included
    nbytes: int  # of their tables
    pinned: int  # used by a CUDA graph: never dropped
    staged: int  # holding copies of tensors


Plan = TypeVar("Plan")


@dataclass(eq=False)
class _Entry(Generic[Plan]):
    plan: Plan
    memory: object  # a Memory's (fingerprint, extra), or the value put
    nbytes: int
    staged: bool
    pinned: bool
    guard: _Guard | None = None  # made once the memory has matched (see the module docstring)

    def matches(self, memory: object) -> bool:
        if not isinstance(memory, Memory):
            return memory is not None and self.memory == memory
        if self.guard is not None and self.guard.passes(memory):
            return self.memory[1] == memory.extra  # type: ignore[index]
        if self.memory != (memory.fingerprint, memory.extra):
            return False
        # A plan found twice is likely kept: its guard, made once (about a microsecond a tensor), is
        # then checked instead of the fingerprint. A plan made anew each step never makes one.
        self.guard = _Guard.over(memory)
        return True


def _value(memory: object) -> object:
    """What an entry keeps of the memory it was put with."""
    return (memory.fingerprint, memory.extra) if isinstance(memory, Memory) else memory


class PlanCache(Generic[Plan]):
    """Plans by key, least recently used first out.

    Kept: every pinned plan (a captured CUDA graph reads its tables at every replay, so it is kept,
    found or not, until :meth:`clear`), the ``recent`` newest, and older ones while all plans
    together number at most ``max_plans`` and hold at most ``max_bytes`` of tables, and at most
    ``recent`` of them hold staged copies (copies of tensors, as large as those). The defaults fit a
    step in backward, which makes a group, so a plan, of every param.
    """

    def __init__(self, *, max_plans: int = 4096, max_bytes: int = 16 * 2**20, recent: int = 8) -> None:
        self.max_plans, self.max_bytes, self.recent = max_plans, max_bytes, recent
        self._entries: OrderedDict[Hashable, _Entry[Plan]] = OrderedDict()
        self._replaced: list[_Entry[Plan]] = []  # pinned plans a newer one of their key replaced
        self.clear()

    def get(self, key: Hashable, memory: Memory | Any, *, pin: bool = False) -> Plan | None:
        """The plan kept for ``key`` if it was built for ``memory`` (a :class:`Memory`, or any
        value compared with ``==``; None never matches); ``pin``: it is now used by a CUDA graph."""
        entry = self._entries.get(key)
        if entry is None or not entry.matches(memory):
            self._misses += 1
            return None
        self._hits += 1
        self._entries.move_to_end(key)
        if pin and not entry.pinned:
            entry.pinned = True
            self._pinned += 1
        return entry.plan

    def put(
        self,
        key: Hashable,
        memory: Memory | Any,
        plan: Plan,
        *,
        nbytes: int = 0,
        staged: bool = False,
        pin: bool = False,
    ) -> None:
        """Keep ``plan`` for ``key`` (in place of the one there), then drop what is beyond the limits."""
        old = self._entries.pop(key, None)
        if old is not None:
            if old.pinned:
                self._replaced.append(old)
            else:
                self._forget(old)
        self._entries[key] = _Entry(plan, _value(memory), nbytes, staged, pin)
        self._nbytes += nbytes
        self._staged += staged
        self._pinned += pin
        if self._within():
            return  # the common case: no copy of the keys
        for old_key in list(self._entries)[: max(0, len(self._entries) - self.recent)]:  # oldest first
            if self._within():
                break
            candidate = self._entries[old_key]
            if not candidate.pinned and (candidate.staged or self._over()):
                self._forget(self._entries.pop(old_key))

    def cache_info(self) -> CacheInfo:
        plans = len(self._entries) + len(self._replaced)
        return CacheInfo(self._hits, self._misses, plans, self._nbytes, self._pinned, self._staged)

    def clear(self) -> None:
        """Forget every plan and count, pinned ones included (only safe once their graphs are gone)."""
        self._entries.clear()
        self._replaced.clear()
        self._hits = self._misses = self._nbytes = self._pinned = self._staged = 0

    def _forget(self, entry: _Entry[Plan]) -> None:
        self._nbytes -= entry.nbytes
        self._staged -= entry.staged
        self._pinned -= entry.pinned

    def _over(self) -> bool:
        return len(self._entries) + len(self._replaced) > self.max_plans or self._nbytes > self.max_bytes

    def _within(self) -> bool:
        return not self._over() and self._staged <= self.recent
