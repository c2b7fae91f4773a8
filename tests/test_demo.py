"""``adamw demo``: every mode trains, the PNG and the JSON are written, a failed check is exit code 1,
and a bad argument is a usage error (exit code 2)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

from adamw.__main__ import main
from adamw.cli.demo import model, report, train

QUICK_STEPS = 12  # enough for every mode to learn and to pass its checks; the model is --quick's
TINY = ["--quick", "--steps", "3", "--out", "", "--no-progress"]  # a run that only has to finish


# The quick model is tiny: one thread is faster, and immune to a busy machine's other jobs.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float, str]:
    pytest.importorskip("matplotlib", reason="the demo draws its PNG with matplotlib (the test extra installs it)")
    out = tmp_path_factory.mktemp("demo")
    png, json_path = out / "loss.png", out / "demo.json"
    threads = torch.get_num_threads()
    try:
        begin = time.perf_counter()
        argv = ["demo", "--quick", "--steps", str(QUICK_STEPS), "--out", str(png), "--json", str(json_path)]
        assert main([*argv, "--no-progress"]) == 0  # --threads 1 by default
        seconds = time.perf_counter() - begin
    finally:
        torch.set_num_threads(threads)
    return png, json_path, seconds, report.format_table(json.loads(json_path.read_text()))


def test_quick_demo_writes_png_and_json(quick_run: tuple[Path, Path, float, str]) -> None:
    png, report_path, seconds, _ = quick_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    results = json.loads(report_path.read_text())
    assert [r["mode"] for r in results["results"]] == [m.name for m in train.MODES]
    for r in results["results"]:
        assert len(r["losses"]) == results["steps"] == QUICK_STEPS
        assert all(math.isfinite(x) for x in r["losses"])
        assert r["final_loss"] < r["losses"][0], f"{r['mode']} did not learn"
    print(f"quick demo, {QUICK_STEPS} steps: {seconds:.1f} s")


def test_quick_demo_numbers_are_consistent(quick_run: tuple[Path, Path, float, str]) -> None:
    results = json.loads(quick_run[1].read_text())
    by_mode = {r["mode"]: r for r in results["results"]}
    torch_run, ours = by_mode["torch"], by_mode["adamw"]
    assert ours["losses"] == torch_run["losses"], "adamw.AdamW must be torch.optim.AdamW bit for bit"
    assert torch_run["vs_torch"] == 0.0
    # state: torch 8 B/param (+ step); bf16 moments half of that; 8-bit less again
    assert by_mode["bf16 moments"]["state_bytes"] < 0.51 * torch_run["state_bytes"]
    assert by_mode["8-bit moments"]["state_bytes"] < 0.9 * by_mode["bf16 moments"]["state_bytes"]
    assert by_mode["bf16 params, Kahan"]["state_bytes"] > by_mode["bf16 params, stochastic"]["state_bytes"]
    assert by_mode["leanest"]["param_bytes"] * 2 == torch_run["param_bytes"]
    for r in results["results"]:
        assert r["bytes_per_param"] == pytest.approx((r["state_bytes"] + r["param_bytes"]) / r["num_params"])
    assert set(results["checks"]) and all(results["checks"].values())  # exit code 0 said so too


def test_table_lists_every_mode_and_check(quick_run: tuple[Path, Path, float, str]) -> None:
    table = quick_run[3]
    for mode in train.MODES:
        assert mode.name in table
    assert "PASS" in table
    assert "ms/step" in table and "bytes/param" in table
    # which implementation ran each mode: on this CPU the low-bit modes run the C kernel
    assert "leanest" in table and "the C kernel (fused=True)" in table
    results = json.loads(quick_run[1].read_text())
    assert {r["implementation"] for r in results["results"] if r["mode"] not in ("torch", "adamw")} == {
        "the C kernel (fused=True)"
    }


def test_a_failed_check_is_exit_code_1(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", *TINY, "--modes", "torch,8bit"]) == 0  # the same run, every check passing
    passed = capsys.readouterr().out
    assert "PASS  8-bit moments: state bytes" in passed and "FAIL" not in passed

    monkeypatch.setitem(train.STATE_RATIOS, "8-bit moments", 0.01)  # 8-bit state cannot be 1% of torch's
    assert main(["demo", *TINY, "--modes", "torch,8bit"]) == 1
    out, err = capsys.readouterr()
    assert "FAIL  8-bit moments: state bytes" in out
    assert "adamw demo: 1 check(s) failed: 8-bit moments: state bytes" in err


def _missing_cuda() -> tuple[str, str]:
    """A CUDA device this machine does not have (any, without CUDA; one past the last, with it), and the error."""
    if not torch.cuda.is_available():
        return "cuda", "argument --device: 'cuda': CUDA is not available in this torch build or on this machine"
    count = torch.cuda.device_count()
    return f"cuda:{count}", f"argument --device: 'cuda:{count}': this machine has {count} CUDA devices"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--modes", "nope"], "argument --modes: unknown mode 'nope'; valid: " + ", ".join(train.MODE_KEYS)),
        (["--modes", "torch,,2bit"], "argument --modes: unknown mode '2bit'; valid: torch, adamw, bf16, 8bit,"),
        (["--device", _missing_cuda()[0]], _missing_cuda()[1]),
        (["--device", "nope"], "argument --device: unknown device 'nope'; valid: cpu, cuda, cuda:N"),
        (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
        (["--threads", "-1"], "argument --threads: must be 0 (torch's default) or more, got -1"),
    ],
)
def test_bad_arguments_are_usage_errors(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *argv, "--out", "", "--no-progress"])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert "usage: adamw demo" in err and expected in err
    assert out == ""  # nothing ran


def test_outputs_that_cannot_be_written_are_usage_errors_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The PNG and the JSON are written after every mode has trained (minutes): a missing directory,
    or no matplotlib to draw the PNG, is said before, not found after."""
    from adamw.cli.demo import command

    monkeypatch.setattr(command, "run_demo", lambda *a, **k: pytest.fail("the demo ran"))
    missing = tmp_path / "missing" / "demo.json"
    cases = [
        (["--json", str(missing), "--out", ""], f"argument --json: {str(missing)!r}: directory"),
        (["--out", str(tmp_path)], f"argument --out: {str(tmp_path)!r} is a directory"),
        (["--out", str(tmp_path / "demo.png")], "argument --out: the loss curves are drawn with matplotlib"),
    ]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where it is not installed: import fails
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", "--quick", "--no-progress", *argv])
        assert exit_info.value.code == 2
        out, err = capsys.readouterr()
        assert expected in err and out == "", err


def test_demo_is_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "Exit status" in out


def test_modes_can_be_chosen_and_unknown_ones_fail() -> None:
    results = train.run_demo(
        steps=3,
        out_png=None,
        modes=["torch", "8bit"],
        config=model.ModelConfig(d_model=16, n_layers=1, n_heads=2, context=8),
        batch_size=2,
        show_progress=False,
    )
    assert [r["mode"] for r in results["results"]] == ["torch", "8-bit moments"]
    with pytest.raises(ValueError, match="unknown mode"):
        train.run_demo(steps=1, out_png=None, modes=["2bit"], show_progress=False)


def test_the_shipped_text_is_there_and_plain() -> None:
    text = model.load_text()
    assert len(text) > 200_000 and text.isascii()
    assert "HAMLET" in text and "Macbeth" in text
    assert "gutenberg" not in text.lower()  # the Project Gutenberg licence text is not shipped
