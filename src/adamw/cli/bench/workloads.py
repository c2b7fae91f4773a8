"""What ``adamw bench`` measures: :data:`WORKLOADS` (parameter shapes and a dtype) and
:data:`IMPLEMENTATIONS` (a factory from params to an optimizer), and the GPT-2 shape table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Shape = tuple[int, ...]
Hyper = dict[str, Any]
MiB = 2**20


@dataclass(frozen=True)
class GPT2Size:
    """GPT-2's dimensions; the defaults are GPT-2 small's (Hugging Face's "gpt2": 124,439,808 params)."""

    vocab: int = 50257
    context: int = 1024
    width: int = 768
    layers: int = 12


GPT2_SMALL = GPT2Size()


def gpt2_shapes(size: GPT2Size = GPT2_SMALL) -> list[Shape]:
    """GPT-2's parameter shapes in Hugging Face's order and Conv1D layout (in, out); the output layer
    is the token embedding (tied), so it has no shape of its own. GPT-2 small: 148 tensors.

    The one table of GPT-2 shapes: ``adamw bench``'s gpt2 workload, the tests and ``benchmarks/`` use it.
    """
    d, d4 = size.width, 4 * size.width
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, d4), (d4,), (d4, d), (d,)]
    return [(size.vocab, d), (size.context, d), *block * size.layers, (d,), (d,)]


@dataclass(frozen=True)
class Workload:
    """A set of parameter shapes of one dtype; ``cuda_shapes`` overrides ``shapes`` on CUDA."""

    name: str
    description: str
    dtype: torch.dtype
    shapes: list[Shape]
    quick_shapes: list[Shape]
    cuda_shapes: list[Shape] | None = None

    def shapes_for(self, device: str, quick: bool) -> list[Shape]:
        if quick:
            return self.quick_shapes
        if device == "cuda" and self.cuda_shapes is not None:
            return self.cuda_shapes
        return self.shapes


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "big",
            "one 32M-element float32 tensor (256M on CUDA)",
            torch.float32,
            shapes=[(32 * MiB,)],
            cuda_shapes=[(256 * MiB,)],
            quick_shapes=[(64 * 1024,)],
        ),
        Workload(
            "many",
            "1000 float32 tensors of 32K elements",
            torch.float32,
            shapes=[(32 * 1024,)] * 1000,
            quick_shapes=[(1024,)] * 20,
        ),
        Workload(
            "gpt2",
            "GPT-2-small parameter shapes, float32 (124M params, 148 tensors)",
            torch.float32,
            shapes=gpt2_shapes(),
            quick_shapes=gpt2_shapes(GPT2Size(vocab=500, context=64, width=32, layers=2)),
        ),
        Workload(
            "bf16",
            "four bfloat16 tensors of 8M elements",
            torch.bfloat16,
            shapes=[(8 * MiB,)] * 4,
            quick_shapes=[(16 * 1024,)] * 4,
        ),
    )
}


Factory = Callable[[list[Tensor], Hyper], torch.optim.Optimizer]


def _factory(kind: str, **flags: Any) -> Factory:
    """``kind``: "torch" (torch.optim.AdamW), "adamw" (ours) or "floor" (a MemoryFloor: no hyper-parameters)."""

    def make(params: list[Tensor], hyper: Hyper) -> torch.optim.Optimizer:
        if kind == "torch":
            return torch.optim.AdamW(params, **hyper, **flags)
        if kind == "floor":
            from .floor import MemoryFloor

            return MemoryFloor(params, **flags)
        from adamw import AdamW

        return AdamW(params, **hyper, **flags)

    return make


@dataclass(frozen=True)
class Implementation:
    """One optimizer to time: a name for the table and a factory ``(params, hyper) -> optimizer``."""

    name: str
    description: str
    make: Factory
    floor: str = "floor"  # the floor row of the storage format it steps (the "x floor" column)


# A new implementation is one more entry here: its bytes per step follow from the state it allocates
# (timing.FORMULA), so no other change is needed.
IMPLEMENTATIONS: dict[str, Implementation] = {
    i.name: i
    for i in (
        Implementation("torch-forloop", "torch.optim.AdamW(foreach=False)", _factory("torch", foreach=False)),
        Implementation("torch-foreach", "torch.optim.AdamW(foreach=True)", _factory("torch", foreach=True)),
        Implementation("torch-fused", "torch.optim.AdamW(fused=True)", _factory("torch", fused=True)),
        Implementation("adamw-forloop", 'adamw.AdamW(backend="forloop")', _factory("adamw", backend="forloop")),
        Implementation("adamw-foreach", 'adamw.AdamW(backend="foreach")', _factory("adamw", backend="foreach")),
        Implementation(
            "adamw-fused", "adamw.AdamW(fused=True): our C kernel on CPU, Triton on CUDA", _factory("adamw", fused=True)
        ),
        Implementation(
            "adamw-fused-stochastic",
            'adamw.AdamW(fused=True, param_update="stochastic") (bf16 params; others are rounded)',
            _factory("adamw", fused=True, param_update="stochastic"),
        ),
        Implementation(
            "adamw-fused-kahan",
            'adamw.AdamW(fused=True, param_update="kahan") (bf16 params; others are rounded)',
            _factory("adamw", fused=True, param_update="kahan"),
            floor="floor-kahan",
        ),
        Implementation(
            "adamw-fused-8bit",
            'adamw.AdamW(fused=True, state_precision="8bit")',
            _factory("adamw", fused=True, state_precision="8bit"),
            floor="floor-8bit",
        ),
        Implementation(
            "adamw-fused-8bit-stochastic",
            'adamw.AdamW(fused=True, state_precision="8bit", param_update="stochastic")',
            _factory("adamw", fused=True, state_precision="8bit", param_update="stochastic"),
            floor="floor-8bit",
        ),
        Implementation(
            "adamw-fused-4bit",
            'adamw.AdamW(fused=True, state_precision="4bit")',
            _factory("adamw", fused=True, state_precision="4bit"),
            floor="floor-4bit",
        ),
        Implementation(
            "adamw-fused-4bit-stochastic",
            'adamw.AdamW(fused=True, state_precision="4bit", param_update="stochastic")',
            _factory("adamw", fused=True, state_precision="4bit", param_update="stochastic"),
            floor="floor-4bit",
        ),
        Implementation(
            "floor",
            "no optimizer: a fused step's reads and writes, moments in the param's dtype, no math (CPU)",
            _factory("floor"),
        ),
        Implementation(
            "floor-kahan",
            "the floor with a Kahan buffer beside bf16 params (as floor for others)",
            _factory("floor", param_update="kahan"),
            floor="floor-kahan",
        ),
        Implementation(
            "floor-8bit",
            "the floor with 8-bit moments (codes and absmaxes)",
            _factory("floor", state_precision="8bit"),
            floor="floor-8bit",
        ),
        Implementation(
            "floor-4bit",
            "the floor with 4-bit moments (codes two to a byte, and absmaxes)",
            _factory("floor", state_precision="4bit"),
            floor="floor-4bit",
        ),
    )
}
REFERENCE_IMPL = "torch-fused"  # the "vs torch-fused" column is its median time over each row's
