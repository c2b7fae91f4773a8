"""The C kernels' cache (:mod:`adamw.backends._native`): a library is loaded only when it is exactly
what was built, from a directory only this user can write.

Whatever could load a damaged or planted library runs in a subprocess, so that a crash (SIGBUS,
SIGSEGV, SIGILL) fails the test instead of ending the session; each such run steps the kernels and
checks them against torch's for-loop AdamW (the C kernel) and the low-bit reference (the low-bit kernel).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest

from _helpers import CLOSE
from adamw.backends import _native, cpu, cpu_low_bit
from adamw.cli.bench import floor

# One run: steps the kernels named in argv, checks them, prints each kernel's path and whether it
# was compiled now.
SCRIPT = r"""
import json, os, sys
import torch
import adamw
from adamw.backends import cpu, cpu_low_bit

torch.manual_seed(0)
TOLERANCES = json.loads(os.environ["ADAMW_TEST_TOLERANCES"])

def check(options, reference, tolerance):
    p = torch.nn.Parameter(torch.randn(5000))
    q = torch.nn.Parameter(p.detach().clone())
    ours, ref = adamw.AdamW([p], lr=0.01, weight_decay=0.1, **options), reference([q])
    for _ in range(3):
        p.grad = torch.randn(5000)
        q.grad = p.grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), **tolerance)

out = {}
if "cpu" in sys.argv[1:]:
    check({"fused": True}, lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=False), TOLERANCES["cpu"])
    out["cpu"] = cpu.library()
if "low-bit" in sys.argv[1:]:
    low_bit = {"state_precision": "8bit"}
    check({"fused": True, **low_bit}, lambda ps: adamw.AdamW(ps, lr=0.01, weight_decay=0.1, **low_bit), TOLERANCES["low-bit"])
    out["low-bit"] = cpu_low_bit.library()
print(json.dumps({k: {"path": str(v.path), "compiled": v.compiled} for k, v in out.items()}))
"""

KERNELS = {"cpu": cpu.KERNEL, "low-bit": cpu_low_bit.KERNEL}
# The run's check of each kernel it loaded, against torch's for-loop or the low-bit reference.
TOLERANCES = {
    "cpu": CLOSE["C kernel from the cache vs torch's for-loop"],
    "low-bit": CLOSE["low-bit C kernel from the cache vs its reference"],
}


def _run(tmp: Path, cache: Path, *kernels: str, marker: Path | None = None) -> tuple[dict[str, Any], str]:
    """Step ``kernels`` in a fresh process with ``cache`` as $ADAMW_CACHE_DIR and ``tmp/tmp`` as
    $TMPDIR; what it loaded, and its stderr (the warnings). A crash fails the test."""
    (tmp / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "ADAMW_CACHE_DIR": str(cache), "TMPDIR": str(tmp / "tmp"), "OMP_NUM_THREADS": "2"}
    env["ADAMW_TEST_TOLERANCES"] = json.dumps({k: {"atol": t.atol, "rtol": t.rtol} for k, t in TOLERANCES.items()})
    if marker is not None:
        env["ADAMW_TEST_MARKER"] = str(marker)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, *kernels], env=env, capture_output=True, text=True, timeout=300
    )
    if marker is not None:
        assert not marker.exists(), f"a planted library was loaded (its constructor ran):\n{result.stderr}"
    if result.returncode < 0:
        pytest.fail(f"the run crashed with {signal.Signals(-result.returncode).name}:\n{result.stderr}")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1]), result.stderr


def _libraries(directory: Path) -> dict[str, list[str]]:
    """The library files in ``directory``, per kernel."""
    names = sorted(f.name for f in directory.iterdir() if f.name.endswith(".so"))
    return {k: [n for n in names if n.startswith(f"{kernel.source.stem}-")] for k, kernel in KERNELS.items()}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding both kernels as built (each test damages a copy), built under a umask that
    leaves new files group-writable."""
    cache = tmp_path_factory.mktemp("pristine") / "cache"
    umask = os.umask(0o002)
    try:
        with pytest.MonkeyPatch.context() as m:
            m.setenv("ADAMW_CACHE_DIR", str(cache))
            for kernel in KERNELS.values():
                assert _native.build_and_load(kernel).compiled
    finally:
        os.umask(umask)
    return cache


def _load_in_process(cache: Path, kernel: _native.Kernel) -> _native.Library:
    with pytest.MonkeyPatch.context() as m:
        m.setenv("ADAMW_CACHE_DIR", str(cache))
        return _native.build_and_load(kernel)


def _copy(pristine: Path, directory: Path) -> dict[str, Path]:
    shutil.copytree(pristine, directory, dirs_exist_ok=True)
    return {k: directory / names[0] for k, names in _libraries(directory).items()}


# --------------------------------------------------------------------------------------------------
# a damaged library is rebuilt, never loaded


def _truncate(libs: dict[str, Path]) -> list[str]:
    os.truncate(libs["cpu"], 4096)
    return ["cpu"]


def _scramble(libs: dict[str, Path]) -> list[str]:
    """Random bytes over everything past the first page (the code, the dynamic section), size kept."""
    size = libs["cpu"].stat().st_size
    with open(libs["cpu"], "r+b") as f:
        f.seek(4096)
        f.write(random.Random(0).randbytes(size - 4096))
    return ["cpu"]


def _swap(libs: dict[str, Path]) -> list[str]:
    cpu_bytes, low_bit_bytes = libs["cpu"].read_bytes(), libs["low-bit"].read_bytes()
    libs["cpu"].write_bytes(low_bit_bytes)
    libs["low-bit"].write_bytes(cpu_bytes)
    return ["cpu", "low-bit"]


def _empty(libs: dict[str, Path]) -> list[str]:
    libs["cpu"].write_bytes(b"")
    return ["cpu"]


def _garbage(libs: dict[str, Path]) -> list[str]:
    libs["cpu"].write_bytes(b"not a shared library\n" * 200)
    return ["cpu"]


# Each damages the cached libraries and names the kernels it damaged.
DAMAGE = {"truncated": _truncate, "random bytes": _scramble, "swapped": _swap, "empty": _empty, "garbage": _garbage}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_library_is_rebuilt_in_place_with_a_warning(damage: Any, pristine: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    libs = _copy(pristine, cache)
    kernels = damage(libs)
    libs = {k: libs[k] for k in kernels}
    loaded, stderr = _run(tmp_path, cache, *kernels)
    for kernel, path in libs.items():
        assert "rebuilding" in stderr and str(path) in stderr, f"no warning names the damaged {path}:\n{stderr}"
        assert loaded[kernel] == {"path": str(path), "compiled": True}, "rebuilt in place, with the preferred flags"
    assert _libraries(cache) == _libraries(pristine), "no other flag set was built"
    assert [p.read_bytes() for p in libs.values()] == [(pristine / p.name).read_bytes() for p in libs.values()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kernel in kernels:
            assert not _load_in_process(cache, KERNELS[kernel]).compiled, "the rebuilt library is loaded from then on"


# --------------------------------------------------------------------------------------------------
# only this user's files are trusted

PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *marker = getenv("ADAMW_TEST_MARKER");
    FILE *f = marker ? fopen(marker, "w") : NULL;
    if (f) fclose(f);
}
"""

NOBODY = 65534


def _plant(path: Path, tmp: Path) -> None:
    """A library whose constructor writes $ADAMW_TEST_MARKER at ``path``, with a digest file that
    matches it: all a user who can write the directory could put there."""
    source = tmp / "planted.c"
    source.write_text(PLANTED)
    subprocess.run(
        [*shlex.split(os.environ.get("CC") or "cc"), "-shared", "-fPIC", str(source), "-o", str(path)], check=True
    )
    data = path.read_bytes()
    record = {"name": path.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    Path(f"{path}.sha256").write_text(json.dumps(record))


def _chown_to_nobody(path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    os.chown(path, NOBODY, NOBODY)


@pytest.mark.parametrize("how", ["world-writable directory", "files owned by another user"])
def test_a_library_planted_in_the_fallback_directory_is_never_loaded(how: str, pristine: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    unwritable = tmp_path / "file" / "cache"  # under a file: no user can create it, root included
    fallback = tmp_path / "tmp" / f"adamw-{os.getuid()}"
    fallback.mkdir(parents=True, mode=0o700)
    _plant(fallback / _libraries(pristine)["cpu"][0], tmp_path)
    if how == "world-writable directory":
        fallback.chmod(0o777)
    else:
        for f in fallback.iterdir():
            _chown_to_nobody(f)
    loaded, stderr = _run(tmp_path, unwritable, "cpu", marker=tmp_path / "marker")
    built = Path(loaded["cpu"]["path"])
    assert loaded["cpu"]["compiled"] and "Warning" in stderr
    if how == "world-writable directory":
        assert built.parent != fallback and built.parent.parent == tmp_path / "tmp", "built in a private directory"
        assert not built.parent.exists(), "the private directory is removed once the library is loaded"
    else:  # a directory of this user's: the untrusted files are replaced
        assert built.parent == fallback and built.stat().st_uid == os.getuid()


def test_an_untrusted_cache_directory_is_not_used(
    pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    _copy(pristine, shared)
    shared.chmod(0o777)
    before = sorted(f.name for f in shared.iterdir())
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    fallback = tmp_path / "tmp" / f"adamw-{os.geteuid()}"
    _copy(pristine, fallback)  # so that this load needs no compiler
    with pytest.warns(RuntimeWarning, match=f"does not use {shared} .* writable by group or others"):
        library = _load_in_process(shared, cpu.KERNEL)
    assert library.path.parent == fallback and not library.compiled, "the fallback directory"
    assert sorted(f.name for f in shared.iterdir()) == before, "nothing is written there"


def _someone_elses(directory: Path) -> None:
    """``directory`` as a symlink to a directory of another user's."""
    target = directory.with_name("elsewhere")
    target.mkdir(mode=0o755)
    _chown_to_nobody(target)
    directory.symlink_to(target)


DIRECTORIES = {
    "world-writable": lambda d: d.mkdir(mode=0o777) or d.chmod(0o777),
    "group-writable": lambda d: d.mkdir() or d.chmod(0o770),
    "owned by another user": lambda d: d.mkdir(mode=0o700) or _chown_to_nobody(d),
    "a symlink to another user's": _someone_elses,
}


@pytest.mark.parametrize("make", DIRECTORIES.values(), ids=DIRECTORIES.keys())
def test_each_untrusted_directory_is_passed_over(make: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    fallback = tmp_path / "tmp" / f"adamw-{os.geteuid()}"
    monkeypatch.setenv("ADAMW_CACHE_DIR", str(tmp_path / "cache"))
    make(tmp_path / "cache")
    with pytest.warns(RuntimeWarning, match="does not use .*cache as its kernel cache"):
        assert _native._cache_directory() == fallback
    assert fallback.stat().st_mode & 0o777 == 0o700, "created private"
    fallback.rmdir()
    make(fallback)
    with pytest.warns(RuntimeWarning, match="does not use"):
        assert _native._cache_directory() is None, "then a private temporary directory"


# --------------------------------------------------------------------------------------------------
# the checks one by one (no compiler, no subprocess)


def _fake_library(directory: Path) -> Path:
    path = directory / "adamw_cpu-0123456789abcdef0123.so"
    path.write_bytes(b"\x7fELF" + bytes(range(256)) * 8)
    path.chmod(0o755)
    _native._write_digest(path, path)
    return path


def _corrupt_digest(path: Path, **changes: Any) -> None:
    sidecar = Path(f"{path}.sha256")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), **changes}))


CHECKS = {
    "no digest file": (lambda p: Path(f"{p}.sha256").unlink(), "no digest"),
    "a digest file of another library": (lambda p: _corrupt_digest(p, name="adamw_cpu_low_bit-x.so"), "another"),
    "another size": (lambda p: _corrupt_digest(p, size=4096), "bytes"),
    "another digest": (lambda p: _corrupt_digest(p, sha256="0" * 64), "digest"),
    "a digest file that is not one": (lambda p: Path(f"{p}.sha256").write_text("{"), "digest"),
    "a group-writable library": (lambda p: p.chmod(0o775), "writable"),
    "a world-writable digest file": (lambda p: Path(f"{p}.sha256").chmod(0o646), "writable"),
    "a symlink": (lambda p: p.symlink_to(p.rename(p.with_suffix(".real"))), "regular"),
}


@pytest.mark.parametrize(("damage", "reason"), CHECKS.values(), ids=CHECKS.keys())
def test_each_check(damage: Any, reason: str, tmp_path: Path) -> None:
    path = _fake_library(tmp_path)
    assert _native._damage(path) is None, "the file as written passes"
    damage(path)
    assert reason in (_native._damage(path) or ""), _native._damage(path)


def test_the_cache_is_private_and_used_by_a_second_load(pristine: Path) -> None:
    assert pristine.stat().st_mode & 0o777 == 0o700, "created 0700"
    for f in pristine.iterdir():
        assert f.stat().st_mode & 0o022 == 0, f"{f} is writable by others whatever the umask"
    mtimes = {f.name: f.stat().st_mtime_ns for f in pristine.iterdir()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean cache loads without a word
        for kernel in KERNELS.values():
            library = _load_in_process(pristine, kernel)
            assert not library.compiled and library.path.parent == pristine and library.openmp
    assert {f.name: f.stat().st_mtime_ns for f in pristine.iterdir()} == mtimes, "nothing rewritten"
    libraries = [f for f in mtimes if f.endswith(".so")]
    assert sorted(mtimes) == sorted([*libraries, *(f"{f}.sha256" for f in libraries)]), "no temporary file left"
    cc = _native.compiler(cpu.KERNEL)
    names = {_native._library_name(cc, flags, cpu.SOURCE) for flags in _native.FLAG_SETS}
    assert len(names) == len(_native.FLAG_SETS), "flags are part of the name"


def test_the_shared_header_is_in_every_source_and_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An edit to the header gives every kernel a new library name, so none loads a stale build."""
    sources = [cpu.SOURCE, cpu_low_bit.SOURCE, floor.SOURCE]
    for source in sources:
        assert f'#include "{_native.HEADER.name}"' in source.read_text(), source
    cc, flags = _native.compiler(cpu.KERNEL), _native.FLAG_SETS[0]
    before = {_native._library_name(cc, flags, source) for source in sources}
    edited = tmp_path / _native.HEADER.name
    edited.write_bytes(_native.HEADER.read_bytes() + b"/* edited */\n")
    monkeypatch.setattr(_native, "HEADER", edited)
    after = {_native._library_name(cc, flags, source) for source in sources}
    assert len(before) == len(after) == len(sources) and before.isdisjoint(after)
