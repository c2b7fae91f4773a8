"""How ``adamw bench`` times a step: every (workload, implementation) pair against a memory-bandwidth
reference timed in the same run (a large ``dst.copy_(src)``).

The method is told to users in the help (:data:`.command.EPILOG`); the why of each choice is at the
function that makes it.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .workloads import IMPLEMENTATIONS, REFERENCE_IMPL, WORKLOADS, Hyper, Implementation, MiB, Shape, Workload

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


@dataclass
class Config:
    device: str
    workloads: list[str]
    impls: list[str]
    steps: int  # rounded down to a multiple of windows, at most one window per step
    warmup: int
    windows: int
    threads: int
    amsgrad: bool = False
    quick: bool = False
    copy_bytes: int = 256 * MiB
    copies_per_window: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        self.windows = min(self.windows, self.steps)
        self.steps -= self.steps % self.windows

    @property
    def per_window(self) -> int:
        return self.steps // self.windows


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
    over_floor: float | None = None  # ms/step over that of its storage format's floor row
    window_ms: list[float] = field(default_factory=list)


@dataclass
class Copy:
    bytes_per_copy: int  # read + write: twice the source's size
    gb_per_s: float
    ms_median: float
    window_ms: list[float]


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

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_window(fn: Callable[[], object], n: int, device: str) -> float:
    """Milliseconds per call of ``fn`` over ``n`` back-to-back calls."""
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    _synchronize(device)
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


_Shared = dict[tuple[int, str, torch.dtype, Shape], Tensor]  # a workload's state tensors, by (param, key, form)


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
    cpu_clock = _cpu_clock()
    torch.set_num_threads(config.threads)
    if config.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    per_workload = len(config.impls) * (config.warmup + config.steps) + config.windows * config.copies_per_window
    progress = _Progress(per_workload * len(config.workloads), config.progress)

    results: list[Result] = []
    copy_samples: list[float] = []
    for workload_name in config.workloads:
        workload = WORKLOADS[workload_name]
        progress.phase(f"{workload_name}: setup")
        params = _random_params(workload.shapes_for(config.device, config.quick), workload.dtype, config.device)
        shared: _Shared = {}
        entries = [_warm_up(workload, IMPLEMENTATIONS[name], params, config, progress, shared) for name in config.impls]
        timed = [e for e in entries if e.result is not None and e.result.status == "ok"]
        progress.update((len(entries) - len(timed)) * config.steps)  # skipped: unavailable
        copy_entry = _copy_entry(config)
        _time_rounds([*timed, copy_entry], config, progress, workload_name)
        copy_samples += copy_entry.samples
        results.extend(_summarize(entries))
        del params, entries, timed, copy_entry, shared
        gc.collect()
        if config.device == "cuda":
            torch.cuda.empty_cache()
    progress.close()

    copy_ms = statistics.median(copy_samples) if copy_samples else float("nan")
    copy = Copy(2 * config.copy_bytes, 2 * config.copy_bytes / copy_ms / 1e6, copy_ms, copy_samples)
    for r in results:
        if r.status == "ok":
            r.fraction_of_copy = r.gb_per_s / copy.gb_per_s
    return results, copy, {"date": started, **_metadata(config), "others_cpu_fraction": _others_fraction(cpu_clock)}


def _copy_entry(config: Config) -> _Entry:
    """The bandwidth reference: ``dst.copy_(src)``, its buffers touched before timing.

    Made after the workload's optimizers, and freed with them: on CPU, big buffers allocated first
    shift where the params and states land, which alone can change a step's time markedly.
    """
    src = torch.randn(config.copy_bytes // 4, device=config.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return _Entry("copy", lambda: dst.copy_(src), config.copies_per_window)


def _time_rounds(entries: list[_Entry], config: Config, progress: _Progress, label: str) -> None:
    """One window of each entry per round, the order rotated every round; a failing entry drops out."""
    for round_index in range(config.windows):
        shift = round_index % len(entries)
        for entry in entries[shift:] + entries[:shift]:
            result = entry.result
            if result is not None and result.status != "ok":
                continue
            progress.phase(f"{label}: {entry.name}")
            try:
                entry.samples.append(_time_window(entry.step, entry.per_window, config.device))
            except Exception as error:  # noqa: BLE001 - a failing implementation is reported, not fatal
                if result is None:
                    raise
                result.status, result.reason = "unavailable", _reason(error)
            progress.update(entry.per_window)


def _warm_up(
    workload: Workload, impl: Implementation, params: list[Tensor], config: Config, progress: _Progress, shared: _Shared
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
    entry = _Entry(impl.name, lambda: None, config.per_window, result=result)
    try:
        hyper: Hyper = {"lr": 1e-3, "weight_decay": 1e-2, "amsgrad": config.amsgrad}
        optimizer = impl.make(params, hyper)
        optimizer.step()  # the first warm-up step allocates the state, which is then shared
        _share_state(optimizer, params, shared)
        for _ in range(config.warmup - 1):
            optimizer.step()
        _synchronize(config.device)
    except Exception as error:  # noqa: BLE001 - e.g. a backend that cannot be built or imported here
        result.status, result.reason = "unavailable", _reason(error)
    else:
        entry.step = optimizer.step
        result.state_bytes = state_bytes(optimizer)
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        result.bytes_per_step = 3 * param_bytes + 2 * result.state_bytes  # see FORMULA
    progress.update(config.warmup)
    return entry


def _share_state(optimizer: torch.optim.Optimizer, params: list[Tensor], shared: _Shared) -> None:
    """Swap the optimizer's state tensors for the workload's shared ones of the same dtype and shape.

    The first implementation to allocate a state tensor of a given form provides it; later ones step
    the same memory, so that the luck of each one's allocation (which physical pages back it: see the
    help) does not decide the comparison. Sharing costs nothing in correctness: every implementation
    takes a valid AdamW step from whatever moments the others left.
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


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _summarize(entries: list[_Entry]) -> list[Result]:
    for entry in entries:
        r = entry.result
        if r is not None and r.status == "ok" and entry.samples:
            r.window_ms = entry.samples
            r.ms_median = statistics.median(entry.samples)
            r.ms_min, r.ms_max = min(entry.samples), max(entry.samples)
            r.params_per_s = r.n_params / r.ms_median * 1e3
            r.gb_per_s = r.bytes_per_step / r.ms_median / 1e6
    ok = [e.result for e in entries if e.result is not None and e.result.status == "ok"]
    reference = next((r for r in ok if r.impl == REFERENCE_IMPL), None)
    floors = {r.impl: r for r in ok if r.impl.startswith("floor")}
    for r in ok:
        if reference is not None:
            r.vs_torch_fused = reference.ms_median / r.ms_median
        floor = floors.get(IMPLEMENTATIONS[r.impl].floor)
        if floor is not None:
            r.over_floor = r.ms_median / floor.ms_median
    return [e.result for e in entries if e.result is not None]


def _cpu_clock() -> tuple[float, float | None, float]:
    """(wall seconds, the machine's busy CPU seconds (Linux only, else None), this process's CPU seconds)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return time.monotonic(), None, time.process_time()
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # up to steal; guest time is in user
    return time.monotonic(), busy, time.process_time()


def _others_fraction(start: tuple[float, float | None, float]) -> float | None:
    """The share of the machine's CPU time that other processes took since ``start`` (a :func:`_cpu_clock`).

    A 2-thread step waits at every barrier for a thread the OS has parked to let another process in,
    so a busy neighbour slows a per-tensor parallel loop far more than its share: worth a warning.
    """
    (wall0, busy0, ours0), (wall1, busy1, ours1) = start, _cpu_clock()
    if busy0 is None or busy1 is None or wall1 <= wall0:
        return None
    return max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / ((wall1 - wall0) * (os.cpu_count() or 1)))


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
    from adamw import __version__

    try:
        import resource  # Unix only

        max_rss_mib: float | None = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except ImportError:
        max_rss_mib = None
    meta: dict[str, Any] = {
        "device": config.device,
        "device_name": _device_name(config.device),
        "torch": torch.__version__,
        "adamw": __version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "steps": config.steps,
        "warmup": config.warmup,
        "windows": config.windows,
        "amsgrad": config.amsgrad,
        "quick": config.quick,
        "max_rss_mib": max_rss_mib,
    }
    if config.device == "cuda":
        meta["cuda_max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / MiB
    return meta
