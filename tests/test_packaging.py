"""What a user installs: the wheel's files and metadata, and the ``adamw`` command and ``import adamw``
without anything they do not need (torch for ``--help``; numpy; the tools of ``adamw.cli``)."""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.message import Message
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "src" / "adamw"
NUMPY_WARNING = "Failed to initialize NumPy"

# Makes `import numpy` fail as it does where numpy is not installed, for torch too.
HIDE_NUMPY = """\
import sys


class _NoNumpy:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "numpy" or name.startswith("numpy."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoNumpy)
"""


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


# ------------------------------------------------------------------------------------------------
# the wheel


def _build_requirement_unmet() -> str | None:
    """Why this environment cannot build the wheel without fetching a build backend, or None. The
    build runs offline on the installed setuptools (pip's own build would fetch the project's
    ``requires``), which must be as new as pyproject.toml asks (77 reads the license as an SPDX
    expression). Machines without network access may hold an older one."""
    from importlib.metadata import PackageNotFoundError, version

    needed = re.search(r'requires = \["setuptools>=(\d+)"\]', (ROOT / "pyproject.toml").read_text())
    assert needed, "pyproject.toml's build requirement is no longer setuptools>=N: update this check"
    try:
        installed = version("setuptools")
    except PackageNotFoundError:
        return "setuptools is not installed"
    if int(installed.split(".")[0]) >= int(needed[1]):
        return None
    return f"setuptools {installed} is older than the build's setuptools>={needed[1]}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built as pip builds one, from a copy of the project (the shared tree gets no build/)."""
    unmet = _build_requirement_unmet()
    if unmet:
        pytest.skip(f"{unmet} (pip fetches it for an install; this build is offline)")
    tmp = tmp_path_factory.mktemp("wheel")
    project = tmp / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, project / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")
    shutil.copytree(ROOT / "src", project / "src", ignore=ignore)
    out = tmp / "dist"
    done = _run(
        *("-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"),
        *("--wheel-dir", str(out), str(project)),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = out.glob("adamw-*.whl")
    return path


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def _metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(archive.read(name))


def test_wheel_holds_the_c_sources_and_the_demo_text(wheel: Path) -> None:
    names = _names(wheel)
    read_at_run_time = [
        *PACKAGE.rglob("*.c"),  # compiled on first use
        *PACKAGE.rglob("*.h"),
        *(PACKAGE / "cli" / "demo" / "data").iterdir(),  # adamw demo's text and where it comes from
        PACKAGE / "py.typed",
    ]
    expected = {"adamw/" + p.relative_to(PACKAGE).as_posix() for p in read_at_run_time}
    assert {"adamw/cli/demo/data/shakespeare.txt", "adamw/cli/bench/floor.c"} <= expected
    assert sorted(expected - names) == []
    python = {"adamw/" + p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}
    assert sorted(python - names) == []


def test_the_installed_package_imports_light_and_finds_its_files(wheel: Path, tmp_path: Path) -> None:
    """Unpacked as pip installs it: ``import adamw`` imports neither torch nor a tool, the optimizer
    none of the tools, and the demo reads its text and the floor row finds its C source."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path)
    script = (
        "import pathlib, sys\n"
        "import adamw\n"
        f"assert pathlib.Path(adamw.__file__).is_relative_to({str(tmp_path)!r}), adamw.__file__\n"
        "assert 'torch' not in sys.modules, 'import adamw imported torch'\n"
        "adamw.AdamW, adamw.adamw, adamw.step_in_backward\n"
        "print(sorted(m for m in sys.modules if m.startswith('adamw.cli')))\n"
        "from adamw.cli.bench import floor\n"
        "from adamw.cli.demo.model import load_text\n"
        "assert floor.SOURCE.is_file(), floor.SOURCE\n"
        "print(len(load_text()))\n"
    )
    done = _run("-c", script, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    tools_loaded, text_length = done.stdout.splitlines()
    assert tools_loaded == "[]"
    assert int(text_length) > 200_000


def test_wheel_metadata_declares_license_urls_and_what_features_need(wheel: Path) -> None:
    meta = _metadata(wheel)
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert {"Homepage", "Source", "Issues"} <= {url.split(",")[0] for url in meta.get_all("Project-URL", [])}
    requires = meta.get_all("Requires-Dist", [])
    assert "numpy" in requires  # torch.distributed.checkpoint.save needs it (the README's FSDP2 example)
    for extra, package in [("demo", "matplotlib"), ("test", "matplotlib"), ("triton", "triton")]:
        assert any(r.startswith(package) and f'extra == "{extra}"' in r for r in requires), (extra, requires)
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
        license_text = archive.read(name).decode()
    assert license_text == (ROOT / "LICENSE").read_text()
    assert license_text.startswith("BSD 3-Clause License\n\nCopyright (c) 2026, the adamw authors\n")
    assert "Neither the name of the copyright holder" in license_text  # the third clause


# ------------------------------------------------------------------------------------------------
# the command and the import


def _without_numpy(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "sitecustomize.py").write_text(HIDE_NUMPY)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def test_help_without_numpy_has_no_numpy_warning(tmp_path: Path) -> None:
    env = _without_numpy(tmp_path)
    control = _run("-c", "import torch", env=env)  # the shim hides numpy from torch: torch warns
    assert control.returncode == 0 and NUMPY_WARNING in control.stderr, control.stderr
    for option, says in [("--help", "demo"), ("--version", "adamw 0.1.0")]:
        done = _run("-m", "adamw", option, env=env)
        assert done.returncode == 0 and says in done.stdout, done.stderr
        assert NUMPY_WARNING not in done.stderr and done.stderr == ""


def test_no_subcommand_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    from adamw.__main__ import main

    assert main([]) == 2
    assert "bench" in capsys.readouterr().err
