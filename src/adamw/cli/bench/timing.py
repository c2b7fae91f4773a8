"""How ``adamw bench`` times a step: every (workload, implementation) pair against a memory-bandwidth
reference timed in the same run (a large ``dst.copy_(src)``).

Params and grads are random (never zeros) and shared by every implementation of a workload; each
takes its warm-up steps (which also allocate its state), then its moments are swapped for the
workload's shared ones of the same form (see :func:`_share_state`), then the timed steps run in
windows, and the windows of all implementations (and of the copy) are interleaved, in an order
rotated every round, so that drift on a shared machine touches all of them alike. A window is
bracketed by ``torch.cuda.synchronize`` on CUDA; its time divided by its steps is one sample; the
report gives the median of the samples and their min and max. On CPU a window is one step by default
(see the help).
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
    over_floor: float | None = None  # ms/step over that of its storage format's floor row
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
    floors = {r.impl: r for r in results if r.impl.startswith("floor") and r.status == "ok"}
    for r in results:
        if reference is not None and r.status == "ok":
            r.vs_torch_fused = reference.ms_median / r.ms_median
        floor = floors.get(IMPLEMENTATIONS[r.impl].floor)
        if floor is not None and r.status == "ok":
            r.over_floor = r.ms_median / floor.ms_median
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
    from adamw import __version__

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
