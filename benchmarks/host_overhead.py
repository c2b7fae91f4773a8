"""The host (Python) time of one step of the CUDA path, measured on the CPU with no GPU.

On a GPU a step of many small tensors, or of a small model, waits for its host code rather than for
its kernel. This runs our Triton backend's host code (checks, plan lookup, argument packing) on CPU
tensors with both kernel launches replaced by no-ops, against torch.optim.AdamW(fused=True) with its
fused kernel replaced by a no-op too (its step counters' foreach add still runs, as on a GPU), and
prints the best of interleaved rounds:

    .venv/bin/python benchmarks/host_overhead.py                   # 4 tensors of 8 values
    .venv/bin/python benchmarks/host_overhead.py --tensors 1000    # 1000 tensors
    .venv/bin/python benchmarks/host_overhead.py --tensors 1000 --profile
    .venv/bin/python benchmarks/host_overhead.py --tensors 1000 --backend cpu   # the C kernel, run

With ``--backend cpu`` it times our fused CPU step (the C kernel, which runs: on tensors this small
its time is the host's and the kernel call's) against torch's fused CPU step, both on one thread.

What a GPU's launches add (Triton's launcher, the CUDA driver) is not in these numbers, nor what
reading a CUDA tensor's attributes costs over a CPU tensor's.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from typing import Any

os.environ["TRITON_INTERPRET"] = "1"  # before adamw.backends.triton imports triton: CPU tensors

import torch  # noqa: E402

import adamw  # noqa: E402
from adamw.backends import triton as triton_backend  # noqa: E402


class _NoLaunch:
    """A kernel whose launches do nothing (named as the interpreter's, which the backend checks for)."""

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: None


_NoLaunch.__name__ = "InterpretedFunction"


def make_params(tensors: int, numel: int) -> list[torch.Tensor]:
    params = [torch.randn(numel, requires_grad=True) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(numel)
    return params


def per_step_us(optimizer: torch.optim.Optimizer, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=4)
    parser.add_argument("--numel", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--backend", choices=["triton", "cpu"], default="triton")
    parser.add_argument("--profile", action="store_true", help="then cProfile our steps (by own time)")
    args = parser.parse_args()

    if args.backend == "triton":
        kernels = triton_backend._kernels()
        kernels.adamw_kernel = _NoLaunch()
        kernels.bump_steps_kernel = _NoLaunch()
        torch._fused_adamw_ = lambda *a, **k: None  # timing torch's host code only; never run here otherwise
    else:
        torch.set_num_threads(1)

    ours = adamw.AdamW(make_params(args.tensors, args.numel), lr=1e-3, backend=args.backend)
    theirs = torch.optim.AdamW(make_params(args.tensors, args.numel), lr=1e-3, fused=True)
    steps = max(30, 2000 // args.tensors)
    for optimizer in (ours, theirs):
        per_step_us(optimizer, 5)
    times: dict[str, list[float]] = {"ours": [], "torch fused": []}
    for _ in range(args.rounds):  # interleaved: drift on a shared machine touches both alike
        times["ours"].append(per_step_us(ours, steps))
        times["torch fused"].append(per_step_us(theirs, steps))
    best = {name: min(t) for name, t in times.items()}
    print(
        f"{args.backend}, {args.tensors} tensors of {args.numel}: host time per step, best of {args.rounds} rounds of {steps} "
        f"steps: ours {best['ours']:.1f} us, torch fused {best['torch fused']:.1f} us "
        f"(ours / torch {best['ours'] / best['torch fused']:.2f})"
    )
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        per_step_us(ours, steps)
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
