"""Our C kernels as loaded libraries: compiled on first use, cached, checked, loaded and bound.

Every C source of the package (``adamw_cpu.c``, ``adamw_cpu_low_bit.c``, the benchmark's floor) is
declared as a :class:`Kernel` and loaded by :func:`load`, once per process, on its first use; importing
a module builds nothing. Each includes the one shared header, :data:`HEADER`.

**Build.** The system C compiler (``$CC`` if set, else the compiler Python was built with, else
``cc``) compiles the source in about a second with ``-O3 -march=native -fopenmp``, falling back to
fewer flags only where the compiler rejects them; never fast-math. Without OpenMP the kernel runs on
one thread, with a one-time warning. Without a compiler, or when no flag set builds, :func:`load`
raises a ``RuntimeError`` that names the compiler, its error and how to do without the kernel.

**Cache.** The library is cached in ``$ADAMW_CACHE_DIR``, else ``$XDG_CACHE_HOME/adamw``, else
``~/.cache/adamw``, under a name that hashes the source and the shared header, the compiler, the flags
and the CPU, so later processes load it without compiling. Beside it, ``<name>.sha256`` records its
name, size and SHA-256. Both are written to temporary files and renamed into place (the digest first),
so concurrent first uses do not collide and no reader sees half a file.

**Trust.** ``dlopen`` runs a library's constructors and a step runs its code, so a library is loaded
only when it is exactly what was built: a regular file whose size and SHA-256 match its digest file,
which names it; both owned by this user and writable by no one else. Anything else (truncated,
overwritten, another kernel's library, a file someone else put there) is rebuilt in place with the
same flags, with a warning: a bad cache file never makes a slower flag set load. The cache directory
is created 0700 and used only while it is this user's, writable by no one else, and writable by us;
else ``$TMPDIR/adamw-<uid>`` is, on the same terms; else the library is built in a fresh private
directory (``tempfile.mkdtemp``), removed once it is loaded, so that process compiles every kernel
it uses.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Tried in order until one compiles. No -ffast-math: sqrt and division must round as IEEE says.
# -ffp-contract=off: a multiply-add is fused only where the source calls fma (where torch's kernel
# fuses); -fno-math-errno only lets sqrt vectorize (it changes no value).
BASE_FLAGS = ("-std=c11", "-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")
FLAG_SETS = (
    ("-march=native", "-fopenmp"),
    ("-fopenmp",),
    ("-march=native",),
    (),
)
# What every C source includes (bit casts, conversions, the work split); on every build's include path.
HEADER = Path(__file__).with_name("adamw_common.h")
# Part of every library's name: a library cached in another layout (e.g. without a digest file) is
# never looked up, so it is neither loaded nor reported as damaged.
_CACHE_LAYOUT = 2


@dataclass(frozen=True)
class Kernel:
    """A C source and how to use it once loaded."""

    source: Path
    bind: Callable[[ctypes.CDLL], Callable[..., int]]  # checks the library, returns its entry point
    what: str  # names the kernel in errors and warnings
    instead: str  # how to do without it


@dataclass(frozen=True)
class Library:
    """A loaded kernel and how it was built."""

    path: Path  # in a private directory, removed once loaded, when no cache directory could be used
    compiled: bool  # False when it came from the cache
    flags: tuple[str, ...]
    step_fn: Callable[..., int]

    @property
    def openmp(self) -> bool:
        return "-fopenmp" in self.flags


_lock = threading.Lock()
_loaded: dict[Path, Library] = {}


def load(kernel: Kernel) -> Library:
    """``kernel``'s library, compiled on first use (or found in the cache) and loaded once per process."""
    library = _loaded.get(kernel.source)
    if library is None:
        with _lock:
            library = _loaded.get(kernel.source)
            if library is None:
                library = _loaded[kernel.source] = build_and_load(kernel)
    return library


def build_and_load(kernel: Kernel) -> Library:
    """Find ``kernel`` in the cache, or compile it with the first flag set the compiler takes; load it
    and bind its entry point."""
    cc = compiler(kernel)
    directory = _cache_directory()
    private = directory is None
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="adamw-"))
        warnings.warn(
            f"adamw's {kernel.what} is built in a private temporary directory, as no cache directory is "
            "usable (see the warnings before, or set ADAMW_CACHE_DIR): every process compiles it anew",
            RuntimeWarning,
            stacklevel=3,
        )
    try:
        errors: list[str] = []
        for flags in FLAG_SETS:
            path = directory / _library_name(cc, flags, kernel.source)
            compiled, error = _cached_or_built(kernel, cc, flags, path)
            if error is not None:
                errors.append(error)
                continue
            try:
                step_fn = kernel.bind(ctypes.CDLL(str(path)))
            except OSError as exc:
                errors.append(f"{path}: {exc}")
                continue
            if "-fopenmp" not in flags:
                warnings.warn(
                    f"adamw's {kernel.what} was built without OpenMP (the compiler rejected -fopenmp): "
                    "it runs on one thread",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return Library(path, compiled, flags, step_fn)
    finally:
        if private:
            shutil.rmtree(directory, ignore_errors=True)  # a loaded library stays mapped
    raise RuntimeError(
        f"adamw's {kernel.what} could not be compiled; step without it ({kernel.instead}), or fix the "
        "compiler. Errors:\n" + "\n".join(errors)
    )


def _cached_or_built(kernel: Kernel, cc: list[str], flags: tuple[str, ...], path: Path) -> tuple[bool, str | None]:
    """(whether the library at ``path`` was compiled now, why it could not be): a cached one is kept
    only if it passes :func:`_damage`; any other is replaced by a fresh build."""
    if os.path.lexists(path):
        damage = _damage(path)
        if damage is None:
            return False, None
        warnings.warn(
            f"adamw's {kernel.what}: not loading the cached {path} ({damage}); rebuilding it",
            RuntimeWarning,
            stacklevel=4,
        )
    try:
        error = _compile(cc, flags, path, kernel.source)
    except OSError as exc:
        error = f"could not write {path}: {exc}"
    return True, None if error is None else f"{' '.join([*cc, *flags])}: {error}"


def compiler(kernel: Kernel) -> list[str]:
    """The C compiler command: ``$CC`` when set, else Python's build compiler, else ``cc`` or ``gcc``."""
    cc = os.environ.get("CC")
    for candidate in [cc] if cc else [sysconfig.get_config_var("CC"), "cc", "gcc"]:
        words = shlex.split(candidate or "")
        if words and shutil.which(words[0]):
            return words
    if cc:
        raise RuntimeError(
            f"adamw's {kernel.what} is compiled on first use by $CC, but CC={cc!r} names no executable. "
            f"Fix or unset CC; or step without it ({kernel.instead})."
        )
    raise RuntimeError(
        f"adamw's {kernel.what} is compiled on first use, but no C compiler was found (tried $CC, "
        f"Python's build compiler and `cc`). Install gcc or clang, or set CC; or step without it "
        f"({kernel.instead})."
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


def _library_name(cc: list[str], flags: tuple[str, ...], source: Path) -> str:
    h = hashlib.sha256()
    for text in (source, HEADER):  # an edit to the header rebuilds every library
        h.update(text.read_bytes() + b"\0")
    resolved = shutil.which(cc[0]) or cc[0]
    mtime = str(os.stat(resolved).st_mtime_ns)
    for part in (*cc, resolved, mtime, *BASE_FLAGS, *flags, _cpu_identity(), sys.platform, str(_CACHE_LAYOUT)):
        h.update(part.encode() + b"\0")
    return f"{source.stem}-{h.hexdigest()[:20]}.so"


def _compile(cc: list[str], flags: tuple[str, ...], target: Path, source: Path) -> str | None:
    """Build ``source`` into ``target`` with its digest file (see "Cache" above); the compiler's error
    text on failure."""
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=f".{source.stem}-", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [*cc, *BASE_FLAGS, *flags, f"-I{HEADER.parent}", str(source), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            return (result.stderr or result.stdout).strip()[-2000:]
        os.chmod(tmp, 0o755)  # the linker's mode follows the umask, which may let the group write
        _write_digest(Path(tmp), target)
        os.replace(tmp, target)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _digest_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_digest(built: Path, target: Path) -> None:
    """Record ``built``'s size and SHA-256 as the library ``target`` (its digest file, written atomically)."""
    record = {"name": target.name, "size": built.stat().st_size, "sha256": _sha256(built)}
    fd, tmp = tempfile.mkstemp(suffix=".sha256", prefix=f".{target.name}-", dir=target.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, _digest_path(target))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _untrusted(path: Path, st: os.stat_result) -> str | None:
    """Why a file or directory someone else could have written is not to be trusted, or None."""
    if st.st_uid != os.geteuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others"
    return None


def _damage(path: Path) -> str | None:
    """Why the library at ``path`` is not exactly the one built there, or None when it is."""
    sidecar = _digest_path(path)
    for f in (path, sidecar):
        try:
            st = os.lstat(f)
        except FileNotFoundError:
            return f"it has no digest file {sidecar.name}"
        if not stat.S_ISREG(st.st_mode):
            return f"{f} is not a regular file"
        reason = _untrusted(f, st)
        if reason is not None:
            return reason
    try:
        record = json.loads(sidecar.read_text())
        name, size, digest = record["name"], record["size"], record["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its digest file cannot be read: {exc!r}"
    if name != path.name:
        return f"its digest file is another library's ({name})"
    actual = os.lstat(path).st_size
    if actual != size:
        return f"it has {actual} bytes where {size} were built"
    if _sha256(path) != digest:
        return "its bytes do not match its digest"
    return None


def cache_dir() -> Path:
    """Where libraries are cached when that directory can be trusted (see :func:`_cache_directory`)."""
    if os.environ.get("ADAMW_CACHE_DIR"):
        return Path(os.environ["ADAMW_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adamw"


def _cache_directory() -> Path | None:
    """The first of :func:`cache_dir` and ``$TMPDIR/adamw-<uid>`` that can be trusted (see "Trust"
    above), resolved so that a symlink changed later does not move it; None when neither can."""
    for directory in (cache_dir(), Path(tempfile.gettempdir()) / f"adamw-{os.geteuid()}"):
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            resolved = directory.resolve()
            reason = _untrusted(resolved, os.stat(resolved))
        except OSError:
            continue
        if reason is not None:
            warnings.warn(
                f"adamw does not use {directory} as its kernel cache: {reason}. Make it private "
                "(chmod go-w), or set ADAMW_CACHE_DIR to a directory of your own.",
                RuntimeWarning,
                stacklevel=4,
            )
            continue
        if os.access(resolved, os.W_OK | os.X_OK):
            return resolved
    return None
