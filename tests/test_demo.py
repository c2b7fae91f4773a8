"""``adamw demo --quick``: every mode trains, and the PNG and the JSON are written."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adamw import demo

pytest.importorskip("matplotlib")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The quick model is tiny: one thread is faster, and immune to a busy machine's other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float, str]:
    out = tmp_path_factory.mktemp("demo")
    png, report = out / "loss.png", out / "demo.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        begin = time.perf_counter()
        assert demo.main(_parse(["--quick", "--out", str(png), "--json", str(report), "--no-progress"])) == 0
        seconds = time.perf_counter() - begin
    finally:
        torch.set_num_threads(threads)
    return png, report, seconds, demo.format_table(json.loads(report.read_text()))


def test_quick_demo_writes_png_and_json(quick_run: tuple[Path, Path, float, str]) -> None:
    png, report_path, seconds, _ = quick_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    report = json.loads(report_path.read_text())
    assert [r["mode"] for r in report["results"]] == [m.name for m in demo.MODES]
    for r in report["results"]:
        assert len(r["losses"]) == report["steps"] == 30
        assert all(math.isfinite(x) for x in r["losses"])
        assert r["final_loss"] < r["losses"][0], f"{r['mode']} did not learn"
    print(f"quick demo: {seconds:.1f} s")  # the issue asks for < 20 s on an idle 2-core CPU


def test_quick_demo_numbers_are_consistent(quick_run: tuple[Path, Path, float, str]) -> None:
    report = json.loads(quick_run[1].read_text())
    by_mode = {r["mode"]: r for r in report["results"]}
    torch_run, ours = by_mode["torch"], by_mode["adamw"]
    assert ours["losses"] == torch_run["losses"], "adamw.AdamW must be torch.optim.AdamW bit for bit"
    assert torch_run["vs_torch"] == 0.0
    # state: torch 8 B/param (+ step); bf16 moments half of that; 8-bit less again
    assert by_mode["bf16 moments"]["state_bytes"] < 0.51 * torch_run["state_bytes"]
    assert by_mode["8-bit moments"]["state_bytes"] < 0.9 * by_mode["bf16 moments"]["state_bytes"]
    assert by_mode["bf16 params, Kahan"]["state_bytes"] > by_mode["bf16 params, stochastic"]["state_bytes"]
    assert by_mode["leanest"]["param_bytes"] * 2 == torch_run["param_bytes"]
    for r in report["results"]:
        assert r["bytes_per_param"] == pytest.approx((r["state_bytes"] + r["param_bytes"]) / r["num_params"])
    assert set(report["checks"]) and all(isinstance(v, bool) for v in report["checks"].values())


def test_table_lists_every_mode_and_check(quick_run: tuple[Path, Path, float, str]) -> None:
    table = quick_run[3]
    for mode in demo.MODES:
        assert mode.name in table
    assert "PASS" in table or "FAIL" in table
    assert "ms/step" in table and "bytes/param" in table
    # which implementation ran each mode: on this CPU the lean modes run the C kernel
    assert "leanest" in table and "the C kernel (fused=True)" in table
    report = json.loads(quick_run[1].read_text())
    assert {r["implementation"] for r in report["results"] if r["mode"] not in ("torch", "adamw")} == {
        "the C kernel (fused=True)"
    }


def test_modes_can_be_chosen_and_unknown_ones_fail(tmp_path: Path) -> None:
    report = demo.run_demo(
        steps=3,
        out_png=None,
        modes=["torch", "8bit"],
        config=demo.ModelConfig(d_model=16, n_layers=1, n_heads=2, context=8),
        batch_size=2,
        show_progress=False,
    )
    assert [r["mode"] for r in report["results"]] == ["torch", "8-bit moments"]
    with pytest.raises(ValueError, match="unknown mode"):
        demo.run_demo(steps=1, out_png=None, modes=["4bit"], show_progress=False)


def test_the_shipped_text_is_there_and_plain() -> None:
    text = demo.load_text()
    assert len(text) > 200_000 and text.isascii()
    assert "HAMLET" in text and "Macbeth" in text
    assert "gutenberg" not in text.lower()  # the Project Gutenberg licence text is not shipped
