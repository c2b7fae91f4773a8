"""Each storage format's CPU step against its memory floor, in clock cycles per parameter value.

    .venv/bin/python benchmarks/cycles_per_value.py [--threads 2] [--ghz G]

Two numbers per format (fused=True on CPU tensors):

* **kernel**: the C kernel's own cost. One ``adamw.AdamW`` step is taken on a param of 16K values
  (its state fits in the L2 cache), the kernel call it made is captured and replayed on one thread,
  bare (no Python around it), and timed (the least of 21 rounds, the formats interleaved): cycles
  per value at the core's clock. This is the arithmetic the format asks for, with the memory out of
  the way.
* **floor allows**: what memory leaves each thread per value. The format's memory floor
  (``adamw bench``'s floor row: its bytes read and written once, no arithmetic) is timed on 32M
  values with ``--threads`` threads; its time per value, times the threads, at the clock, is the
  cycles a thread may spend on a value before arithmetic, not memory, sets the pace.

kernel / floor allows above 1: the step is compute-bound on this machine, and no memory-side change
brings it to its floor. The clock is measured by a chain of dependent integer multiplies (3 cycles
each on current x86 cores) unless ``--ghz`` is given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import adamw
from adamw.backends import cpu as cpu_float
from adamw.backends import cpu_low_bit
from adamw.cli.bench.floor import MemoryFloor

KERNEL_NUMEL = 1 << 14
FLOOR_NUMEL = 1 << 25

# name, param dtype, AdamW options (the floor takes the same state_precision and param_update)
FORMATS: list[tuple[str, torch.dtype, dict[str, Any]]] = [
    ("float32", torch.float32, {}),
    ("bf16 (to nearest)", torch.bfloat16, {}),
    ("bf16 stochastic", torch.bfloat16, {"param_update": "stochastic"}),
    ("bf16 kahan", torch.bfloat16, {"param_update": "kahan"}),
    ("8-bit, float32 params", torch.float32, {"state_precision": "8bit"}),
    ("8-bit, bf16 params", torch.bfloat16, {"state_precision": "8bit"}),
    ("8-bit + stochastic", torch.bfloat16, {"state_precision": "8bit", "param_update": "stochastic"}),
    ("4-bit, float32 params", torch.float32, {"state_precision": "4bit"}),
    ("4-bit, bf16 params", torch.bfloat16, {"state_precision": "4bit"}),
    ("4-bit + stochastic", torch.bfloat16, {"state_precision": "4bit", "param_update": "stochastic"}),
]

_CLOCK_PROBE = r"""
#include <stdint.h>
#include <stdio.h>
#include <time.h>
int main(void) {
    struct timespec a, b;
    uint64_t x = 12345;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < 100000000L; i++)
        __asm__ volatile("imul %0, %0\n\timul %0, %0\n\timul %0, %0\n\timul %0, %0" : "+r"(x));
    clock_gettime(CLOCK_MONOTONIC, &b);
    double s = (double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec);
    printf("%f\n", 3.0 * 4e8 / s / 1e9 + (double)(x & 0));
    return 0;
}
"""


# Throughput of the update's costly instructions on 8 floats (AVX), in seconds per instruction: 8
# independent chains, so that each instruction waits on the unit, not on the one before it.
_THROUGHPUT_PROBE = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
#define RUN(NAME, OP) { \
    __m256 a0 = _mm256_set1_ps(1.5f), a1 = _mm256_set1_ps(2.5f), a2 = _mm256_set1_ps(3.5f), a3 = _mm256_set1_ps(4.5f); \
    __m256 a4 = _mm256_set1_ps(5.5f), a5 = _mm256_set1_ps(6.5f), a6 = _mm256_set1_ps(7.5f), a7 = _mm256_set1_ps(8.5f); \
    double t0 = now(); \
    for (long i = 0; i < N; i++) { a0 = OP(a0); a1 = OP(a1); a2 = OP(a2); a3 = OP(a3); a4 = OP(a4); a5 = OP(a5); a6 = OP(a6); a7 = OP(a7); } \
    double dt = now() - t0; \
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)), _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7))); \
    printf("%s %g %g\n", NAME, dt / (8.0 * N), (double)_mm256_cvtss_f32(s) * 0); }
int main(void) {
    const long N = 20000000;
    const __m256 d = _mm256_setr_ps(1.3717f, 1.9123f, 1.1111f, 1.5777f, 1.2345f, 1.8765f, 1.0101f, 1.6543f);
#define DIV(x) _mm256_mul_ps(_mm256_div_ps(d, x), d)
#define SQRT(x) _mm256_add_ps(_mm256_sqrt_ps(x), d)
#define MUL(x) _mm256_mul_ps(x, d)
    RUN("vdivps+vmulps", DIV) RUN("vsqrtps+vaddps", SQRT) RUN("vmulps", MUL)
    return 0;
}
"""


def _compile_and_run(source: str, *flags: str, runs: int = 1) -> list[str]:
    """Build ``source`` once and run it ``runs`` times: each run's standard output."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "probe.c", Path(tmp) / "probe"
        src.write_text(source)
        subprocess.run([cc, "-O2", *flags, str(src), "-o", str(exe)], check=True, capture_output=True)
        return [subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout for _ in range(runs)]


def throughputs(ghz: float) -> str:
    """Cycles per 8-float instruction of the update's divider work, or why it was not measured."""
    try:
        lines = _compile_and_run(_THROUGHPUT_PROBE, "-mavx2", "-mfma")[0].split("\n")
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"(no AVX probe: {exc})"
    cycles = {name: float(t) * ghz * 1e9 for name, t, _ in (line.split() for line in lines if line)}
    return (
        f"throughput on 8 floats, cycles per instruction: vdivps {cycles['vdivps+vmulps']:.2f} (a vmulps "
        f"beside each), vsqrtps {cycles['vsqrtps+vaddps']:.2f} (a vaddps beside each), vmulps {cycles['vmulps']:.2f}"
    )


def clock_ghz() -> float:
    """The core's clock while busy: 4e8 dependent 64-bit multiplies at 3 cycles each (x86 only)."""
    return max(float(out) for out in _compile_and_run(_CLOCK_PROBE, runs=3))


def _optimizer(dtype: torch.dtype, options: dict[str, Any], numel: int) -> tuple[Any, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(numel, generator=gen).to(dtype).requires_grad_()
    p.grad = (torch.randn(numel, generator=gen) * 1e-2).to(dtype)
    return adamw.AdamW([p], fused=True, **options), p


def captured_kernel_call(dtype: torch.dtype, options: dict[str, Any]) -> tuple[Any, tuple[Any, ...], Any]:
    """(the kernel's entry point, the arguments of the one call a step made, what must stay alive)."""
    module: Any = cpu_low_bit if options else cpu_float
    library = module.library()
    calls: list[tuple[Any, ...]] = []

    class Capturing:
        @staticmethod
        def step_fn(*args: Any) -> int:
            calls.append(args)
            return library.step_fn(*args)

    opt, param = _optimizer(dtype, options, KERNEL_NUMEL)
    original = module.library
    module.library = lambda: Capturing  # swapped for the one call
    try:
        opt.step()
    finally:
        module.library = original
    if len(calls) != 1:
        raise RuntimeError(f"expected one kernel call for {options}, saw {len(calls)}")
    return library.step_fn, calls[0], (opt, param)


def kernel_seconds_per_value(rounds: int = 21, reps: int = 200) -> list[float]:
    """Each format's kernel call replayed bare on one thread, the formats interleaved round by round
    (so that a busy spell of the machine touches all alike): the least seconds per value of each."""
    torch.set_num_threads(1)
    calls = [captured_kernel_call(dtype, options) for _, dtype, options in FORMATS]
    best = [float("inf")] * len(calls)
    for _ in range(rounds):
        for k, (fn, args, _keep) in enumerate(calls):
            start = time.perf_counter()
            for _ in range(reps):
                fn(*args)
            best[k] = min(best[k], (time.perf_counter() - start) / reps / KERNEL_NUMEL)
    return best


def floor_seconds_per_value(dtype: torch.dtype, options: dict[str, Any], steps: int = 9) -> float:
    """The format's memory floor on FLOOR_NUMEL values, with torch's threads: median seconds per value."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(FLOOR_NUMEL, generator=gen).to(dtype).requires_grad_()
    p.grad = torch.randn(FLOOR_NUMEL, generator=gen).to(dtype)
    floor = MemoryFloor([p], **options)
    floor.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        floor.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / FLOOR_NUMEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of the floor pass")
    parser.add_argument("--ghz", type=float, default=None, help="the core clock (default: measured)")
    args = parser.parse_args()
    try:
        ghz = args.ghz or clock_ghz()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"could not measure the clock ({exc}): pass --ghz") from exc
    print(
        f"clock {ghz:.2f} GHz; kernel: 1 thread, {KERNEL_NUMEL} values; floor: {args.threads} threads, "
        f"{FLOOR_NUMEL} values; cycles per value"
    )
    print()
    print("| format | kernel | floor allows | kernel / floor allows |")
    print("|---|---:|---:|---:|")
    kernels = kernel_seconds_per_value()
    torch.set_num_threads(args.threads)
    for (name, dtype, options), kernel_seconds in zip(FORMATS, kernels, strict=True):
        kernel = kernel_seconds * ghz * 1e9
        allows = floor_seconds_per_value(dtype, options) * args.threads * ghz * 1e9
        print(f"| {name} | {kernel:.2f} | {allows:.2f} | {kernel / allows:.2f} |", flush=True)
    print()
    print(throughputs(ghz))


if __name__ == "__main__":
    main()
