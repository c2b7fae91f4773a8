"""The CPU backend (``fused=True`` on CPU tensors): our C kernel, one call per group and dtype.

Mirrors :mod:`adamw._math` in the operation order of torch's CPU fused kernel (see the comment at
the top of ``adamw_cpu.c``). Float32 and float64 params compute in their own type, bfloat16 and
float16 params in float32; the states are in the param's dtype, as in torch's fused path.

**Build.** ``adamw_cpu.c`` is compiled on first use (about a second) by the system C compiler:
``$CC`` if set, else the compiler Python was built with, else ``cc``; flags ``-O3 -march=native
-fopenmp`` (falling back to fewer flags where the compiler rejects them), never fast-math. The shared
library is cached in ``$ADAMW_CACHE_DIR``, else ``$XDG_CACHE_HOME/adamw``, else ``~/.cache/adamw``,
under a name that hashes the source, the compiler, the flags and the CPU, so later processes load it
without compiling; it is written to a temporary file and renamed, so concurrent first uses do not
collide.

The library is built (or loaded) when this module is imported, which :mod:`adamw.functional`
does on the first step that uses the backend, and :class:`adamw.AdamW` before it changes anything.

**Without a compiler** (or when the build fails) that first ``step`` of an optimizer that asked for
``fused=True`` on CPU tensors (or ``backend="cpu"``) raises a ``RuntimeError`` that names the compiler
and its error, before any param or state has changed. It does not silently fall back: the user asked
for this kernel, and the for-loop or foreach path is one flag away (``fused=None`` or
``foreach=True``). Without OpenMP the kernel is built single-threaded, with a one-time warning.

**Threads:** ``torch.get_num_threads()`` per call. The library links ``libgomp.so.1``, the OpenMP
runtime torch itself loads, so both share one thread pool (no oversubscription).

**GradScaler.** As torch's fused optimizers: grads are divided by ``grad_scale`` in the kernel (and
stored back unscaled); when ``found_inf`` is nonzero nothing changes, the step counters included.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

import torch
from torch import Tensor

from ._common import Hyper, host_value

SOURCE = Path(__file__).with_name("adamw_cpu.c")
ABI_VERSION = 1

# The kernel's dtype codes (the enum at the top of adamw_cpu.c).
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_STEP_CODES = {torch.float32: 0, torch.float64: 1}

# Tried in order until one compiles. No -ffast-math: sqrt and division must round as IEEE says.
# -ffp-contract=off: a multiply-add is fused only where the source calls fma (where torch's kernel
# fuses); -fno-math-errno only lets sqrt vectorize (it changes no value).
_BASE_FLAGS = ("-std=c11", "-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")
_FLAG_SETS = (
    ("-march=native", "-fopenmp"),
    ("-fopenmp",),
    ("-march=native",),
    (),
)


# --------------------------------------------------------------------------------------------------
# building and loading the library


@dataclass(frozen=True)
class Library:
    """The loaded kernel and how it was built."""

    path: Path
    compiled: bool  # False when it came from the cache
    openmp: bool
    step_fn: Callable[..., int]


def cache_dir() -> Path:
    if os.environ.get("ADAMW_CACHE_DIR"):
        return Path(os.environ["ADAMW_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adamw"


def compiler() -> list[str]:
    """The C compiler command: ``$CC`` when set, else Python's build compiler, else ``cc`` or ``gcc``."""
    if os.environ.get("CC"):
        words = shlex.split(os.environ["CC"])
        if words and shutil.which(words[0]):
            return words
        raise RuntimeError(
            f"adamw's fused CPU kernel (fused=True on CPU tensors) is compiled on first use by $CC, but "
            f"CC={os.environ['CC']!r} names no executable. Fix or unset CC; or step without the fused "
            "kernel (fused=None or foreach=True)."
        )
    for candidate in (sysconfig.get_config_var("CC"), "cc", "gcc"):
        words = shlex.split(candidate or "")
        if words and shutil.which(words[0]):
            return words
    raise RuntimeError(
        "adamw's fused CPU kernel (fused=True on CPU tensors) is compiled on first use, but no C "
        "compiler was found (tried $CC, Python's build compiler and `cc`). Install gcc or clang, or "
        "set CC; or step without the fused kernel (fused=None or foreach=True)."
    )


def _cpu_identity() -> str:
    """What -march=native depends on: a cache shared between machines must not mix their builds."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _library_name(cc: list[str], flags: tuple[str, ...], source: Path = SOURCE) -> str:
    h = hashlib.sha256()
    h.update(source.read_bytes())
    resolved = shutil.which(cc[0]) or cc[0]
    stat = os.stat(resolved)
    for part in (*cc, resolved, str(stat.st_mtime_ns), *_BASE_FLAGS, *flags, _cpu_identity(), sys.platform):
        h.update(part.encode() + b"\0")
    return f"{source.stem}-{h.hexdigest()[:20]}.so"


def _compile(cc: list[str], flags: tuple[str, ...], target: Path, source: Path = SOURCE) -> str | None:
    """Build ``source`` into ``target`` atomically; the compiler's error text on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=f".{source.stem}-", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [*cc, *_BASE_FLAGS, *flags, str(source), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            return (result.stderr or result.stdout).strip()[-2000:]
        os.replace(tmp, target)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_lock = threading.Lock()
_library: Library | None = None


def library() -> Library:
    """The kernel, compiled on first use (or found in the cache) and loaded once per process."""
    global _library
    if _library is not None:
        return _library
    with _lock:
        if _library is None:
            _library = _build_and_load()
    return _library


def _build_and_load() -> Library:
    return build_and_load(SOURCE, _bind, "fused CPU kernel (fused=True on CPU tensors)", "fused=None or foreach=True")


def build_and_load(source: Path, bind: Callable[[ctypes.CDLL], Callable[..., int]], what: str, instead: str) -> Library:
    """Compile ``source`` (or find it in the cache) with the first flag set the compiler takes, load it
    and ``bind`` its entry point. ``what`` names the kernel and ``instead`` the way to step without it,
    in the error raised when no flag set builds."""
    cc = compiler()
    errors: list[str] = []
    for flags in _FLAG_SETS:
        path, compiled, error = _cached_or_built(cc, flags, source)
        if path is None:
            errors.append(error)
            continue
        try:
            step_fn = bind(ctypes.CDLL(str(path)))
        except OSError as exc:
            errors.append(f"{path}: {exc}")
            continue
        openmp = "-fopenmp" in flags
        if not openmp:
            warnings.warn(
                f"adamw's {what} was built without OpenMP (the compiler rejected -fopenmp): it runs on one thread",
                RuntimeWarning,
                stacklevel=3,
            )
        return Library(path, compiled, openmp, step_fn)
    raise RuntimeError(
        f"adamw's {what} could not be compiled; step without it ({instead}), or fix the compiler. "
        "Errors:\n" + "\n".join(errors)
    )


def _cached_or_built(cc: list[str], flags: tuple[str, ...], source: Path = SOURCE) -> tuple[Path | None, bool, str]:
    """(the library's path or None, whether it was compiled now, why not)."""
    name = _library_name(cc, flags, source)
    fallback = Path(tempfile.gettempdir()) / (f"adamw-{os.getuid()}" if hasattr(os, "getuid") else "adamw")
    unwritable = []
    for directory in (cache_dir(), fallback):
        path = directory / name
        if path.exists():
            return path, False, ""
        try:
            error = _compile(cc, flags, path, source)
        except OSError as exc:  # an unwritable cache directory: try the next one
            unwritable.append(f"{path}: {exc}")
            continue
        if error is not None:
            return None, False, f"{' '.join([*cc, *flags])}: {error}"
        return path, True, ""
    return None, False, "; ".join(unwritable)


def _bind(lib: ctypes.CDLL) -> Callable[..., int]:
    if lib.adamw_abi_version() != ABI_VERSION:
        raise RuntimeError(f"adamw's CPU kernel has ABI {lib.adamw_abi_version()}, expected {ABI_VERSION}")
    fn = lib.adamw_step
    ptr, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    # dtype, n, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, numels, steps, step_dtype,
    # lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, unscale, grad_scale, num_threads
    fn.argtypes = [i32, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, f64, f64, f64, f64, f64, i32, i32, i32, f64, i32]
    fn.restype = i32
    return fn


# the step

_dtype = attrgetter("dtype")
_is_cpu = attrgetter("is_cpu")
_nbytes = attrgetter("nbytes")
_numel = Tensor.numel
_data_ptr = Tensor.data_ptr
_is_contiguous = Tensor.is_contiguous
_PLAIN_TYPES = frozenset((Tensor, torch.nn.Parameter))


def step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hyper: Hyper,
) -> None:
    if not params:
        return
    if hyper.differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if hyper.has_complex:
        raise RuntimeError("the fused CPU kernel does not support complex params")
    fn = library().step_fn
    if hyper.found_inf is not None and float(hyper.found_inf) != 0.0:
        return  # torch's contract: steps go +1 then -found_inf; nothing else changes
    lr, beta1, beta2 = (float(host_value(x)) for x in hyper.scalar_lr_betas())
    unscale = hyper.grad_scale is not None
    scalars = (
        lr,
        beta1,
        beta2,
        float(hyper.eps),
        float(hyper.weight_decay),
        int(hyper.amsgrad),
        int(hyper.maximize),
        int(unscale),
        float(hyper.grad_scale) if hyper.grad_scale is not None else 1.0,
        torch.get_num_threads(),
    )
    tensors = [params, grads, exp_avgs, exp_avg_sqs, *([max_exp_avg_sqs] if hyper.amsgrad else [])]
    if not set(map(type, params)) <= _PLAIN_TYPES:
        tensors, state_steps = _to_local(tensors), _to_local([state_steps])[0]
    dtypes = set(map(_dtype, tensors[0]))
    if len(dtypes) == 1:
        _step_one_dtype(fn, tensors, state_steps, scalars)
        return
    for dtype in sorted(dtypes, key=str):  # torch's fused path too makes one call per dtype
        index = [i for i, p in enumerate(tensors[0]) if p.dtype == dtype]
        _step_one_dtype(fn, [[lst[i] for i in index] for lst in tensors], [state_steps[i] for i in index], scalars)


def _step_one_dtype(
    fn: Callable[..., int], tensors: list[list[Tensor]], steps: list[Tensor], scalars: tuple[float, ...]
) -> None:
    copies: list[tuple[int, Tensor, Tensor]] = []
    if not all(all(map(_is_contiguous, lst)) for lst in tensors):
        tensors, copies = _contiguous(tensors)
    plan = _plan(tensors, steps)
    rc = fn(plan.dtype_code, plan.count, *plan.pointer_args, plan.step_code, *scalars)
    if rc != 0:
        raise RuntimeError(f"adamw's CPU kernel failed with code {rc}")
    unscaled = bool(scalars[7])
    for which, original, copy in copies:
        if which != 1 or unscaled:  # a grad changes only when it is unscaled
            original.copy_(copy)


@dataclass
class _Plan:
    """One group's validated layout: what the kernel call needs beyond the grads' pointers."""

    count: int
    dtype_code: int
    step_code: int
    nbytes: list[int]  # each param's
    state_ptrs: list[int]  # params, states and steps, in that order
    numels: array.array
    pointers: array.array  # the pointer arrays the kernel reads, one after another
    pointer_args: tuple[int | None, ...] = ()


# Plans of the groups stepped lately, keyed by their first param; a hit is checked pointer by pointer.
_plans: dict[tuple[int, int, int], _Plan] = {}
# Enough for a step in backward, which steps each param as its own group (a plan holds pointers only).
_MAX_PLANS = 4096


def _plan(tensors: list[list[Tensor]], steps: list[Tensor]) -> _Plan:
    """The group's plan: reused when no pointer or size moved, else built after a full check.

    A hit still checks what can change from one step to the next without moving a param's or a
    state's pointer: the grads (new tensors each step) and the states' sizes (a checkpoint loaded
    into a different model may reuse freed memory). The caller has checked contiguity.
    """
    params, grads = tensors[0], tensors[1]
    count = len(params)
    key = (id(params[0]), count, len(tensors))
    ptrs = list(map(_data_ptr, params))
    for lst in tensors[2:]:
        ptrs += map(_data_ptr, lst)
    ptrs += map(_data_ptr, steps)
    grad_ptrs = list(map(_data_ptr, grads))
    plan = _plans.get(key)
    dtype = params[0].dtype
    if (
        plan is None
        or plan.state_ptrs != ptrs
        or list(map(_nbytes, grads)) != plan.nbytes
        or any(list(map(_nbytes, lst)) != plan.nbytes for lst in tensors[2:])
        or set(map(_dtype, grads)) != {dtype}
        or not all(map(_is_cpu, grads))
    ):
        plan = _build_plan(tensors, steps, ptrs)
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        _plans[key] = plan
    plan.pointers[count : 2 * count] = array.array("Q", grad_ptrs)
    return plan


def _build_plan(tensors: list[list[Tensor]], steps: list[Tensor], ptrs: list[int]) -> _Plan:
    """Check every tensor (CPU, contiguous, the param's dtype and size) and lay out the pointers."""
    params = tensors[0]
    dtype = params[0].dtype
    if dtype not in _DTYPE_CODES:
        raise RuntimeError(f"the fused CPU kernel supports {list(_DTYPE_CODES)}, but got params of {dtype}")
    numels = list(map(_numel, params))
    nbytes = list(map(_nbytes, params))
    names = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
    for name, lst in zip(names, tensors, strict=False):
        if not all(map(_is_cpu, lst)):
            raise RuntimeError(f"the fused CPU kernel needs every tensor on the CPU, but some {name} are not")
        if set(map(_dtype, lst)) != {dtype}:
            raise RuntimeError(f"the fused CPU kernel needs {name} of the params' dtype {dtype}")
        if list(map(_numel, lst)) != numels:
            raise RuntimeError(f"the fused CPU kernel needs {name} of the params' sizes")
        if not all(map(_is_contiguous, lst)):
            raise RuntimeError(f"the fused CPU kernel needs contiguous {name}")
    step_dtypes = set(map(_dtype, steps))
    if len(step_dtypes) != 1 or not step_dtypes <= _STEP_CODES.keys() or not all(map(_is_cpu, steps)):
        raise RuntimeError(f"the fused CPU kernel needs float32 or float64 step counters on the CPU, got {step_dtypes}")
    if any(n != 1 for n in map(_numel, steps)):
        raise RuntimeError("the fused CPU kernel needs one-element step counters")

    count = len(params)
    # Laid out as the kernel's arguments: params, grads, the states, then the steps.
    layout = ptrs[:count] + [0] * count + ptrs[count:]
    pointers = array.array("Q", layout)
    base, item = pointers.buffer_info()[0], pointers.itemsize
    lists = [base + k * count * item for k in range(len(tensors))]
    numel_array = array.array("q", numels)
    pointer_args = (
        *lists[:4],
        lists[4] if len(tensors) == 5 else None,
        numel_array.buffer_info()[0],
        base + len(tensors) * count * item,
    )
    return _Plan(
        count=count,
        dtype_code=_DTYPE_CODES[dtype],
        step_code=_STEP_CODES[next(iter(step_dtypes))],
        nbytes=nbytes,
        state_ptrs=ptrs,
        numels=numel_array,
        pointers=pointers,
        pointer_args=pointer_args,
    )


def _contiguous(lists: list[list[Tensor]]) -> tuple[list[list[Tensor]], list[tuple[int, Tensor, Tensor]]]:
    """Contiguous stand-ins for non-contiguous tensors, as (list index, original, copy) to copy back."""
    copies: list[tuple[int, Tensor, Tensor]] = []
    out = []
    for which, lst in enumerate(lists):
        new = []
        for t in lst:
            if t.is_contiguous():
                new.append(t)
            else:
                c = t.contiguous()
                copies.append((which, t, c))
                new.append(c)
        out.append(new)
    return out, copies


def _to_local(lists: list[list[Tensor]]) -> list[list[Tensor]]:
    """DTensor (FSDP2) params and states are stepped through their local shards."""
    from torch.distributed.tensor import DTensor

    return [[t.to_local() if isinstance(t, DTensor) else t for t in lst] for lst in lists]


library()  # built or loaded now, so that a missing compiler fails the import, i.e. before a step
