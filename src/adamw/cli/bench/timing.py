"""``adamw bench``: time one optimizer step of each implementation on named workloads.

Two small registries say what is measured — :data:`WORKLOADS` (parameter shapes and a dtype) and
:data:`IMPLEMENTATIONS` (a factory from params to an optimizer) — and :func:`run` measures every pair
against a memory-bandwidth reference timed in the same run (a large ``dst.copy_(src)``).

How a step is timed: params and grads are random (never zeros) and shared by every implementation of
a workload; each takes its warm-up steps (which also allocate its state), then its moments are swapped
for the workload's shared ones of the same form (see :func:`_share_state`), then the timed steps run
in windows, and the
windows of all implementations (and of the copy) are interleaved, in an order rotated every round, so
that drift on a shared machine touches all of them alike. A window is bracketed by
``torch.cuda.synchronize`` on CUDA; its time divided by its steps is one sample; the report gives the
median of the samples and their min and max. On CPU a window is one step by default (see the help).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

Shape = tuple[int, ...]
Hyper = dict[str, Any]
MiB = 2**20

# ------------------------------------------------------------------------------------------------
# workloads


def gpt2_shapes(vocab: int = 50257, n_ctx: int = 1024, d_model: int = 768, n_layer: int = 12) -> list[Shape]:
    """The parameter shapes of GPT-2 (small by default: 124,439,808 params), HF's Conv1D layout (in, out)."""
    d, d4 = d_model, 4 * d_model
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, d4), (d4,), (d4, d), (d,)]
    return [(vocab, d), (n_ctx, d), *block * n_layer, (d,), (d,)]


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
            quick_shapes=gpt2_shapes(vocab=500, n_ctx=64, d_model=32, n_layer=2),
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

# ------------------------------------------------------------------------------------------------
# implementations


class Factory(Protocol):
    def __call__(self, params: list[Tensor], hyper: Hyper) -> torch.optim.Optimizer: ...


def _adamw(**flags: Any) -> Factory:
    def make(params: list[Tensor], hyper: Hyper) -> torch.optim.Optimizer:
        from . import AdamW

        return AdamW(params, **hyper, **flags)

    return make


def _torch(**flags: Any) -> Factory:
    def make(params: list[Tensor], hyper: Hyper) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, **hyper, **flags)

    return make


def _floor(params: list[Tensor], hyper: Hyper) -> torch.optim.Optimizer:
    from .bench_floor import MemoryFloor

    return MemoryFloor(params)


@dataclass(frozen=True)
class Implementation:
    """One optimizer to time: a name for the table and a factory ``(params, hyper) -> optimizer``."""

    name: str
    description: str
    make: Factory


# A new implementation (e.g. an 8-bit state mode) is one more line here. Its bytes per step follow
# from the state it allocates (see step_bytes), so no other change is needed.
IMPLEMENTATIONS: dict[str, Implementation] = {
    i.name: i
    for i in (
        Implementation("torch-forloop", "torch.optim.AdamW(foreach=False)", _torch(foreach=False)),
        Implementation("torch-foreach", "torch.optim.AdamW(foreach=True)", _torch(foreach=True)),
        Implementation("torch-fused", "torch.optim.AdamW(fused=True)", _torch(fused=True)),
        Implementation("adamw-forloop", 'adamw.AdamW(backend="forloop")', _adamw(backend="forloop")),
        Implementation("adamw-foreach", 'adamw.AdamW(backend="foreach")', _adamw(backend="foreach")),
        Implementation(
            "adamw-fused", "adamw.AdamW(fused=True): our C kernel on CPU, Triton on CUDA", _adamw(fused=True)
        ),
        Implementation(
            "adamw-fused-8bit",
            'adamw.AdamW(fused=True, state_precision="8bit")',
            _adamw(fused=True, state_precision="8bit"),
        ),
        Implementation(
            "floor",
            "no optimizer: a fused step's reads and writes, no math (CPU; see columns)",
            _floor,
        ),
    )
}
BUSY_WARNING = 0.1  # others' share of CPU time above which the report warns that timings are noisy
REFERENCE_IMPL = "torch-fused"  # the "vs torch-fused" column is its median time over each row's

# ------------------------------------------------------------------------------------------------
# bytes and the bandwidth reference

FORMULA = """\
bytes a step must move, per parameter element of s bytes (s = 4 for float32, 2 for bfloat16):
  read param, grad, exp_avg, exp_avg_sq + write param, exp_avg, exp_avg_sq  = 7*s  (28 B for float32)
  with --amsgrad, also read and write max_exp_avg_sq                         = 9*s
  in general: 3 * param bytes + 2 * bytes of the optimizer's state tensors (measured after warm-up,
  so an implementation with smaller states is credited with fewer bytes)."""


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the per-parameter state tensors (the ``step`` counters excluded)."""
    return sum(
        value.numel() * value.element_size()
        for entry in optimizer.state.values()
        for key, value in entry.items()
        if isinstance(value, Tensor) and key != "step"
    )


def step_bytes(param_bytes: int, state_nbytes: int) -> int:
    """Bytes one step reads and writes: param (r+w), grad (r), every state tensor (r+w)."""
    return 3 * param_bytes + 2 * state_nbytes


# ------------------------------------------------------------------------------------------------
# configuration and results


@dataclass
class Config:
    device: str
    workloads: list[str]
    impls: list[str]
    steps: int
    warmup: int
    windows: int  # the steps are split into this many timing windows
    threads: int
    amsgrad: bool = False
    quick: bool = False
    copy_bytes: int = 256 * MiB
    copies_per_window: int = 1
    progress: bool = True


@dataclass
class Result:
    workload: str
    impl: str
    status: str  # "ok" or "unavailable"
    reason: str = ""
    dtype: str = ""
    n_tensors: int = 0
    n_params: int = 0
    state_bytes: int = 0
    bytes_per_step: int = 0
    ms_median: float = 0.0
    ms_min: float = 0.0
    ms_max: float = 0.0
    params_per_s: float = 0.0
    gb_per_s: float = 0.0
    fraction_of_copy: float = 0.0
    vs_torch_fused: float | None = None
    window_ms: list[float] = field(default_factory=list)


@dataclass
class Copy:
    bytes_per_copy: int  # read + write: twice the source's size
    gb_per_s: float
    ms_median: float
    window_ms: list[float]


# ------------------------------------------------------------------------------------------------
# timing


class _Progress:
    """tqdm on stderr when installed, otherwise a line per phase."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar: Any = None
        self._enabled = enabled
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, desc="adamw bench", unit="step", file=sys.stderr, leave=False)

    def phase(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
        elif self._enabled:
            print(f"adamw bench: {text}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _time_window(fn: Callable[[], object], n: int, sync: Callable[[], None]) -> float:
    """Milliseconds per call of ``fn`` over ``n`` back-to-back calls."""
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - start) * 1e3 / n


def _random_params(shapes: list[Shape], dtype: torch.dtype, device: str) -> list[Tensor]:
    """Random params and grads (never zeros: a kernel may take a shortcut on them), made on the device."""
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=generator, dtype=dtype, device=device).requires_grad_()
        p.grad = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        params.append(p)
    return params


@dataclass
class _Entry:
    """One implementation under test in one workload, or the copy (with ``result`` None)."""

    name: str
    step: Callable[[], object]
    per_window: int
    samples: list[float] = field(default_factory=list)
    result: Result | None = None


def run(config: Config) -> tuple[list[Result], Copy, dict[str, Any]]:
    """Measure every (workload, implementation) pair of ``config``; returns results, the copy, metadata."""
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    others = _OtherProcesses()
    torch.set_num_threads(config.threads)
    sync = _synchronizer(config.device)
    if config.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    hyper: Hyper = {"lr": 1e-3, "weight_decay": 1e-2, "amsgrad": config.amsgrad}
    windows, per_window = _windowing(config)
    per_workload = len(config.impls) * (config.warmup + windows * per_window) + windows * config.copies_per_window
    progress = _Progress(per_workload * len(config.workloads), config.progress)

    results: list[Result] = []
    copy_samples: list[float] = []
    for workload_name in config.workloads:
        workload = WORKLOADS[workload_name]
        progress.phase(f"{workload_name}: setup")
        params = _random_params(workload.shapes_for(config.device, config.quick), workload.dtype, config.device)
        shared_state: dict[tuple[int, str, torch.dtype, Shape], Tensor] = {}
        entries = [
            _warm_up(workload, IMPLEMENTATIONS[name], params, hyper, config, sync, progress, shared_state)
            for name in config.impls
        ]
        timed = [e for e in entries if e.result is not None and e.result.status == "ok"]
        progress.update((len(entries) - len(timed)) * windows * per_window)  # skipped: unavailable
        copy_entry = _copy_entry(config)
        _time_rounds([*timed, copy_entry], windows, sync, progress, workload_name)
        copy_samples += copy_entry.samples
        results.extend(_summarize(entries))
        del params, entries, timed, copy_entry, shared_state
        gc.collect()
        if config.device == "cuda":
            torch.cuda.empty_cache()
    progress.close()

    copy_ms = statistics.median(copy_samples) if copy_samples else float("nan")
    copy = Copy(2 * config.copy_bytes, 2 * config.copy_bytes / copy_ms / 1e6, copy_ms, copy_samples)
    for r in results:
        if r.status == "ok":
            r.fraction_of_copy = r.gb_per_s / copy.gb_per_s
    return results, copy, {"date": started, **_metadata(config), "others_cpu_fraction": others.fraction()}


def _copy_entry(config: Config) -> _Entry:
    """The bandwidth reference: ``dst.copy_(src)``, its buffers touched before timing.

    Made after the workload's optimizers, and freed with them: on CPU, big buffers allocated first
    shift where the params and states land, which alone changed torch's fused step by 1.7x here.
    """
    src = torch.randn(config.copy_bytes // 4, device=config.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return _Entry("copy", lambda: dst.copy_(src), config.copies_per_window)


def _time_rounds(
    entries: list[_Entry], windows: int, sync: Callable[[], None], progress: _Progress, label: str
) -> None:
    """One window of each entry per round, the order rotated every round; a failing entry drops out."""
    for round_index in range(windows):
        shift = round_index % len(entries)
        for entry in entries[shift:] + entries[:shift]:
            result = entry.result
            if result is not None and result.status != "ok":
                continue
            progress.phase(f"{label}: {entry.name}")
            try:
                entry.samples.append(_time_window(entry.step, entry.per_window, sync))
            except Exception as error:  # noqa: BLE001 - a failing implementation is reported, not fatal
                if result is None:
                    raise
                result.status, result.reason = "unavailable", _reason(error)
            progress.update(entry.per_window)


def _warm_up(
    workload: Workload,
    impl: Implementation,
    params: list[Tensor],
    hyper: Hyper,
    config: Config,
    sync: Callable[[], None],
    progress: _Progress,
    shared_state: dict[tuple[int, str, torch.dtype, Shape], Tensor],
) -> _Entry:
    """Build the implementation's optimizer and take its warm-up steps; a failure marks it unavailable."""
    progress.phase(f"{workload.name}: {impl.name} warm-up")
    result = Result(
        workload=workload.name,
        impl=impl.name,
        status="ok",
        dtype=str(workload.dtype).removeprefix("torch."),
        n_tensors=len(params),
        n_params=sum(p.numel() for p in params),
    )
    entry = _Entry(impl.name, lambda: None, _windowing(config)[1], result=result)
    try:
        optimizer = impl.make(params, dict(hyper))
        optimizer.step()  # the first step allocates the state: always taken, even with --warmup 0
        _share_state(optimizer, params, shared_state)
        for _ in range(config.warmup - 1):
            optimizer.step()
        sync()
    except Exception as error:  # noqa: BLE001 - e.g. a backend that cannot be built or imported here
        result.status, result.reason = "unavailable", _reason(error)
    else:
        entry.step = optimizer.step
        result.state_bytes = state_bytes(optimizer)
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        result.bytes_per_step = step_bytes(param_bytes, result.state_bytes)
    progress.update(config.warmup)
    return entry


def _share_state(
    optimizer: torch.optim.Optimizer, params: list[Tensor], shared: dict[tuple[int, str, torch.dtype, Shape], Tensor]
) -> None:
    """Swap the optimizer's state tensors for the workload's shared ones of the same dtype and shape.

    The first implementation to allocate a state tensor of a given form provides it; later ones step
    the same memory. On CPU the speed of a memory-bound step depends on which physical pages back its
    tensors: the same kernel on freshly allocated buffers measured 42 to 70 GB/s here, so separate
    states would let the luck of each implementation's allocation decide the comparison. Sharing the
    params, grads and states leaves only what differs (formats such as 8-bit keep their own) — and
    costs nothing in correctness: every implementation takes a valid AdamW step from whatever moments
    the others left.
    """
    for index, p in enumerate(params):
        entry = optimizer.state.get(p)
        if not entry:
            continue
        for key, value in list(entry.items()):
            if key == "step" or not isinstance(value, Tensor) or not value.is_contiguous():
                continue
            mine = shared.setdefault((index, key, value.dtype, tuple(value.shape)), value)
            if mine is not value and mine.device == value.device:
                entry[key] = mine


def _windowing(config: Config) -> tuple[int, int]:
    """(windows, steps per window): ``steps`` split evenly, rounded down, at least one step a window."""
    windows = min(config.windows, config.steps)
    return windows, config.steps // windows


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _summarize(entries: list[_Entry]) -> list[Result]:
    results = [e.result for e in entries if e.result is not None]
    for entry, result in ((e, e.result) for e in entries if e.result is not None):
        if result.status != "ok" or not entry.samples:
            continue
        result.window_ms = entry.samples
        result.ms_median = statistics.median(entry.samples)
        result.ms_min, result.ms_max = min(entry.samples), max(entry.samples)
        result.params_per_s = result.n_params / result.ms_median * 1e3
        result.gb_per_s = result.bytes_per_step / result.ms_median / 1e6
    reference = next((r for r in results if r.impl == REFERENCE_IMPL and r.status == "ok"), None)
    for r in results:
        if reference is not None and r.status == "ok":
            r.vs_torch_fused = reference.ms_median / r.ms_median
    return results


class _OtherProcesses:
    """The share of the machine's CPU time that other processes took while we ran (Linux only).

    A 2-thread step waits at every barrier for a thread the OS has parked to let another process in,
    so a busy neighbour slows a per-tensor parallel loop far more than its share: worth a warning.
    """

    def __init__(self) -> None:
        self._start = (time.monotonic(), self._busy(), self._ours())

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as stat:
                fields = [int(x) for x in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # up to steal; guest time is in user

    @staticmethod
    def _ours() -> float:
        return time.process_time()

    def fraction(self) -> float | None:
        wall0, busy0, ours0 = self._start
        busy1, wall = self._busy(), time.monotonic() - wall0
        if busy0 is None or busy1 is None or wall <= 0:
            return None
        others = (busy1 - busy0) - (self._ours() - ours0)
        return max(0.0, others / (wall * (os.cpu_count() or 1)))


def _max_rss_mib() -> float | None:
    """This process's peak resident memory (Unix; Linux reports KiB)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _metadata(config: Config) -> dict[str, Any]:
    from . import __version__

    meta: dict[str, Any] = {
        "device": config.device,
        "device_name": _device_name(config.device),
        "torch": torch.__version__,
        "adamw": __version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "steps": _windowing(config)[0] * _windowing(config)[1],
        "warmup": config.warmup,
        "windows": _windowing(config)[0],
        "amsgrad": config.amsgrad,
        "quick": config.quick,
        "max_rss_mib": _max_rss_mib(),
    }
    if config.device == "cuda":
        meta["cuda_max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / MiB
    return meta


# ------------------------------------------------------------------------------------------------
# report


def format_report(results: list[Result], copy: Copy, meta: dict[str, Any]) -> str:
    lines = [
        f"adamw bench {meta['adamw']}  {meta['date']}",
        f"device: {meta['device']} ({meta['device_name']}), {meta['threads']} threads, torch {meta['torch']}",
        f"copy bandwidth (dst.copy_(src), {copy.bytes_per_copy // 2 / MiB:.0f} MiB, read+write): "
        f"{copy.gb_per_s:.1f} GB/s",
        f"{meta['steps']} timed steps in {meta['windows']} windows after {meta['warmup']} warm-up; "
        f"ms/step is the median {'step' if meta['steps'] == meta['windows'] else 'window'} (min-max)"
        + (", amsgrad" if meta["amsgrad"] else ""),
    ]
    others = meta.get("others_cpu_fraction")
    if others is not None and others >= BUSY_WARNING:
        lines.append(
            f"warning: other processes used {100 * others:.0f}% of this machine's CPU time during the run; "
            "multi-threaded CPU steps slow down far more than that share, so expect noisy numbers"
        )
    lines.append("")
    header = ("workload", "implementation", "ms/step", "min-max", "Mparams/s", "GB/s", "% copy", "vs torch-fused")
    rows: list[Sequence[str]] = []
    for r in results:
        if r.status != "ok":
            rows.append((r.workload, r.impl, f"unavailable: {r.reason}"))
            continue
        ratio = f"{r.vs_torch_fused:.2f}x" if r.vs_torch_fused is not None else "-"
        rows.append(
            (
                r.workload,
                r.impl,
                f"{r.ms_median:.3f}",
                f"{r.ms_min:.3f}-{r.ms_max:.3f}",
                f"{r.params_per_s / 1e6:.0f}",
                f"{r.gb_per_s:.1f}",
                f"{100 * r.fraction_of_copy:.0f}%",
                ratio,
            )
        )
    # A note row ("unavailable: ...") runs on past the numeric columns and does not set their width.
    widths = [max(len(h), *(len(row[i]) for row in rows if len(row) == len(header))) for i, h in enumerate(header)]
    left = 2  # workload and implementation are left-aligned, numbers right-aligned

    def line(cells: Sequence[str]) -> str:
        if len(cells) < len(header):
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    lines += [line(header), line(["-" * w for w in widths])]
    previous = None
    for row in rows:
        if previous is not None and row[0] != previous:
            lines.append("")
        lines.append(line(row))
        previous = row[0]
    return "\n".join(lines)


def to_json(results: list[Result], copy: Copy, meta: dict[str, Any]) -> dict[str, Any]:
    return {"meta": meta, "copy": asdict(copy), "results": [asdict(r) for r in results]}


# ------------------------------------------------------------------------------------------------
# command line


DESCRIPTION = "Time one AdamW step of each implementation (ours and torch.optim.AdamW's) on named workloads."

EPILOG = f"""\
workloads:
{chr(10).join(f"  {w.name:<6} {w.description}" for w in WORKLOADS.values())}

implementations:
{chr(10).join(f"  {i.name:<14} {i.description}" for i in IMPLEMENTATIONS.values())}
  one that cannot run here (e.g. its kernel cannot be built) is listed as "unavailable: <reason>".

columns:
  ms/step      median over the timing windows of (window time / steps in it); min-max of the windows
  Mparams/s    parameters updated per second
  GB/s         bytes a step must move / ms/step
  % copy       GB/s as a fraction of this machine's bandwidth, measured in the same run by a large
               dst.copy_(src) counted as read + write. On a CPU the copy also pays a hidden read of
               each destination line (write-allocate) that an in-place update does not, so a good
               kernel can exceed 100%.
  vs torch-fused
               torch-fused's ms/step / this row's: above 1 is faster than torch's fused step
  floor (row)  param, grad, exp_avg, exp_avg_sq read and the three written back unchanged, once,
               on the same buffers, with no arithmetic (without amsgrad's max_exp_avg_sq): the
               least a step that keeps its state in the param's dtype can take (8-bit states move
               fewer bytes). A row's ms/step over the floor's is its distance from the memory
               limit, and bounds what any faster such step could gain on it.

{FORMULA}

timing: every implementation of a workload takes its warm-up steps, then the timed steps run in
windows (steps rounded down to a multiple of --windows), interleaved across the implementations and
the copy in an order rotated every round, so drift on a shared machine touches all alike. On CPU
each step is its own window by default: averaging steps before taking the median lets a busy
machine's hiccups into the median (a 2-thread step stalls when a core is taken).
On CPU a step's time also depends on which physical memory backs its tensors (here the same kernel
ran at 42 to 70 GB/s on different fresh allocations), so a standalone timing can differ from the
table by that much. The implementations of a workload therefore step the same params, grads and
state tensors (each state format its own: 8-bit moments are not float32 ones), and only what they
do with them differs.

defaults: every workload and implementation. On CPU 10 timed steps, one per window, after 2 warm-up
steps: about a minute on 2 cores (a GPT-2 for-loop step takes ~0.2 s there: slow, but not so slow
that the for-loops need fewer steps); on CUDA 100 timed steps in 10 windows after 10 warm-up.
Every implementation of a workload is alive at once, its params, grads and states shared (GPT-2 in
float32: ~1 GB of params and grads plus ~1 GB of float32 state, and each other state format's own).
Hyper-parameters: lr=1e-3, weight_decay=1e-2, torch's betas and eps.
"""


def _choices(registry: dict[str, Any], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in registry]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, unknown)) or repr(text)}; valid: {', '.join(registry)}"
            )
        return names

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--workloads",
        type=_choices(WORKLOADS, "workload"),
        default=list(WORKLOADS),
        metavar="LIST",
        help=f"comma list of {{{','.join(WORKLOADS)}}} (default: all)",
    )
    parser.add_argument(
        "--impls",
        type=_choices(IMPLEMENTATIONS, "implementation"),
        default=list(IMPLEMENTATIONS),
        metavar="LIST",
        help="comma list of implementations (default: all, see below)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--steps", type=_positive, default=None, help="timed steps per implementation and workload")
    parser.add_argument("--warmup", type=_positive, default=None, help="untimed steps first (at least 1)")
    parser.add_argument(
        "--windows",
        type=_positive,
        default=None,
        help="timing windows the steps are split into (default: one per step on CPU, 10 on CUDA)",
    )
    parser.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help=f"torch.set_num_threads (default: torch's, {torch.get_num_threads()} here)",
    )
    parser.add_argument("--amsgrad", action="store_true", help="benchmark with amsgrad=True")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes, 3 steps, 1 warm-up, small copy: a smoke test in seconds (numbers are meaningless)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available in this torch build or on this machine")
    cuda = device == "cuda"
    if args.quick:
        steps, warmup, copy_bytes = 3, 1, 8 * MiB
    else:
        steps, warmup, copy_bytes = (100, 10, 1024 * MiB) if cuda else (10, 2, 256 * MiB)
    steps = args.steps or steps
    return Config(
        device=device,
        workloads=args.workloads,
        impls=args.impls,
        steps=steps,
        warmup=args.warmup or warmup,
        windows=args.windows or (10 if cuda and not args.quick else steps),
        threads=args.threads or torch.get_num_threads(),
        amsgrad=args.amsgrad,
        quick=args.quick,
        copy_bytes=copy_bytes,
        copies_per_window=20 if cuda and not args.quick else 1,
        progress=args.progress,
    )


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    config = config_from_args(args, parser)
    results, copy, meta = run(config)
    print(format_report(results, copy, meta))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(to_json(results, copy, meta), out, indent=2)
            out.write("\n")
    return 0
