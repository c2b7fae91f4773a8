"""``adamw bench``: ``--quick`` end to end, its JSON, its byte count, its errors, the memory-floor row and
the GPT-2 shape table."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import adamw
from adamw.__main__ import main
from adamw.cli.bench import timing, workloads
from adamw.cli.bench.floor import MemoryFloor
from adamw.states import init_low_bit_state

TORCH_IMPLS = ("torch-forloop", "torch-foreach", "torch-fused")
OUR_TORCH_OP_IMPLS = ("adamw-forloop", "adamw-foreach")  # no kernel to build: must always run


def _bench_json(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "out.json"
    # on the CPU wherever it runs: the floor rows (and these tests' expectations) are the CPU's
    assert main(["bench", "--quick", "--no-progress", "--device", "cpu", "--json", str(out), *args]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _bench_json(tmp_path_factory.mktemp("bench"))


def test_quick_run_has_every_pair_with_positive_numbers(quick_run: dict[str, Any]) -> None:
    meta, copy, results = quick_run["meta"], quick_run["copy"], quick_run["results"]
    for key in (
        "date",
        "device",
        "device_name",
        "torch",
        "adamw",
        "threads",
        "steps",
        "warmup",
        "windows",
        "others_cpu_fraction",
    ):
        assert key in meta
    assert meta["device"] in ("cpu", "cuda") and meta["threads"] >= 1 and meta["quick"] is True
    assert copy["gb_per_s"] > 0 and copy["ms_median"] > 0 and len(copy["window_ms"]) >= 1

    pairs = {(r["workload"], r["impl"]) for r in results}
    assert pairs == {(w, i) for w in workloads.WORKLOADS for i in workloads.IMPLEMENTATIONS}
    for r in results:
        if r["status"] != "ok":
            # Only a kernel of ours may be missing here (not built yet, no compiler); it must say why.
            assert r["impl"] not in TORCH_IMPLS + OUR_TORCH_OP_IMPLS, r
            assert r["status"] == "unavailable" and r["reason"], r
            continue
        for key in ("ms_median", "ms_min", "ms_max", "params_per_s", "gb_per_s", "fraction_of_copy", "vs_torch_fused"):
            assert r[key] > 0, (key, r)
        assert r["ms_min"] <= r["ms_median"] <= r["ms_max"]
        assert len(r["window_ms"]) == meta["windows"]
        assert r["n_params"] > 0 and r["bytes_per_step"] > 0
    fused = [r for r in results if r["impl"] == "torch-fused"]
    assert all(r["vs_torch_fused"] == pytest.approx(1.0) for r in fused)


@pytest.mark.parametrize(
    ("workload", "amsgrad", "bytes_per_element"),
    [
        ("big", False, 28),  # float32: read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq
        ("bf16", False, 14),  # the same seven accesses at 2 bytes
        ("big", True, 36),  # + read and write max_exp_avg_sq
    ],
)
def test_bytes_per_step_is_seven_accesses_per_element(
    tmp_path: Path, workload: str, amsgrad: bool, bytes_per_element: int
) -> None:
    args = ["--workloads", workload, "--impls", "torch-fused,adamw-forloop", *(["--amsgrad"] if amsgrad else [])]
    results = _bench_json(tmp_path, *args)["results"]
    n_params = sum(_numel(shape) for shape in workloads.WORKLOADS[workload].quick_shapes)
    assert len(results) == 2
    for r in results:
        assert r["n_params"] == n_params
        assert r["bytes_per_step"] == bytes_per_element * n_params, r["impl"]


@pytest.mark.parametrize(
    ("workload", "floor", "bytes_per_element"),
    [
        ("big", "floor", 28),
        ("bf16", "floor", 14),
        ("bf16", "floor-kahan", 18),  # plus a bf16 Kahan buffer, read and written
        ("big", "floor-kahan", 28),  # float32 params have none
        ("big", "floor-8bit", 16 + 2 * 2 * 4 / 256),  # 1-byte codes and a float32 absmax per 256 values
        ("bf16", "floor-8bit", 10 + 2 * 2 * 4 / 256),
    ],
)
def test_floor_rows_move_their_formats_bytes(
    tmp_path: Path, workload: str, floor: str, bytes_per_element: float
) -> None:
    """A floor touches param, grad and its format's state (no max_exp_avg_sq, even with --amsgrad)."""
    results = _bench_json(tmp_path, "--workloads", workload, "--impls", floor, "--amsgrad")["results"]
    n_params = sum(_numel(shape) for shape in workloads.WORKLOADS[workload].quick_shapes)
    assert [r["status"] for r in results] == ["ok"]
    assert results[0]["bytes_per_step"] == bytes_per_element * n_params


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def test_gpt2_small_has_124m_parameters() -> None:
    shapes = workloads.gpt2_shapes()
    assert len(shapes) == 148 and sum(_numel(s) for s in shapes) == 124_439_808


def test_the_memory_benchmarks_gpt2_has_the_tables_shapes() -> None:
    """benchmarks/step_in_backward_memory.py builds a real GPT-2 from the table's sizes: the same tensors
    in the same order (its Linear weights are (out, in), the table's Conv1D ones (in, out))."""
    path = Path(__file__).parents[1] / "benchmarks" / "step_in_backward_memory.py"
    spec = importlib.util.spec_from_file_location("step_in_backward_memory", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.device("meta"):
        model = module.GPT2()
    ours = [tuple(p.shape) for p in model.parameters()]
    assert [sorted(s) for s in ours] == [sorted(s) for s in workloads.gpt2_shapes()]


def test_an_implementation_that_fails_is_reported_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(params: Any, hyper: Any) -> Any:
        raise ImportError("kernel not built")

    monkeypatch.setitem(workloads.IMPLEMENTATIONS, "broken", workloads.Implementation("broken", "always fails", broken))
    results = _bench_json(tmp_path, "--workloads", "big", "--impls", "torch-fused,broken")["results"]
    status = {r["impl"]: (r["status"], r["reason"]) for r in results}
    assert status == {"torch-fused": ("ok", ""), "broken": ("unavailable", "ImportError: kernel not built")}
    assert "unavailable: ImportError: kernel not built" in capsys.readouterr().out


def test_floor_rows_are_left_out_by_default_where_they_cannot_run() -> None:
    """The floor rows stream CPU tensors (a C pass): by default every row runs on the CPU, every row
    but the floors on CUDA (named in --impls, a floor row on CUDA reports itself unavailable)."""
    from adamw.cli.bench.command import default_impls

    assert default_impls("cpu") == list(workloads.IMPLEMENTATIONS)
    cuda = default_impls("cuda")
    floors = [name for name in workloads.IMPLEMENTATIONS if name.startswith("floor")]
    assert floors and not set(floors) & set(cuda)
    assert cuda == [name for name in workloads.IMPLEMENTATIONS if name not in floors]


def test_table_names_the_device_and_the_copy_bandwidth(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--no-progress", "--workloads", "many", "--impls", "torch-foreach"]) == 0
    out = capsys.readouterr().out
    assert "device:" in out and "copy bandwidth" in out and "torch " in out
    assert any(line.startswith("many") and "torch-foreach" in line for line in out.splitlines())


@pytest.mark.parametrize("option", ["--workloads", "--impls"])
def test_unknown_name_is_a_usage_error_listing_valid_names(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", option, "nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    registry = workloads.WORKLOADS if option == "--workloads" else workloads.IMPLEMENTATIONS
    assert "'nope'" in err and "valid: " + ", ".join(registry) in err


def test_a_json_path_that_cannot_be_written_is_a_usage_error_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Written after the run: a typo found then would cost the run (minutes)."""
    from adamw.cli.bench import command

    monkeypatch.setattr(command, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
    for path, expected in (
        (tmp_path / "missing" / "out.json", f"directory {str(tmp_path / 'missing')!r} does not exist"),
        (tmp_path, "is a directory"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "--quick", "--json", str(path)])
        assert exit_info.value.code == 2
        out, err = capsys.readouterr()
        assert f"argument --json: {str(path)!r}" in err and expected in err and out == ""


def test_python_m_adamw_help() -> None:
    done = subprocess.run([sys.executable, "-m", "adamw", "bench", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "7*s" in done.stdout and "--json" in done.stdout and "gpt2" in done.stdout


# Every storage format's floor: (dtype, state_precision, param_update). 8-bit codes and absmaxes, a
# Kahan buffer, bf16 moments; float64 and float16 params in the param's dtype.
FLOOR_FORMATS = [
    (torch.float32, "param", "round"),
    (torch.float64, "param", "round"),
    (torch.float16, "param", "round"),
    (torch.bfloat16, "param", "round"),
    (torch.bfloat16, "param", "kahan"),
    (torch.float32, "bf16", "round"),
    (torch.float32, "8bit", "round"),
    (torch.bfloat16, "8bit", "stochastic"),
]
# 0-d, empty, sizes off every vector width, several 8-bit blocks, over one thread's share, a partial block.
FLOOR_SHAPES = [(), (0,), (3,), (1000,), (257, 131), (70001,), (4096,)]


def _floor_params(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in FLOOR_SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(dtype)
    return params


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def _tensors(floor: MemoryFloor, p: torch.Tensor) -> list[torch.Tensor]:
    return [p, p.grad, *floor.state[p].values()]


@pytest.mark.parametrize(("dtype", "state_precision", "param_update"), FLOOR_FORMATS)
def test_memory_floor_changes_nothing(dtype: torch.dtype, state_precision: str, param_update: str) -> None:
    """The floor's state is the format's (as adamw.AdamW makes it), and a step leaves every byte as it was."""
    params = _floor_params(dtype, seed=0)
    options = {"state_precision": state_precision, "param_update": param_update}
    floor = MemoryFloor(params, **options)
    floor.step()
    generator = torch.Generator().manual_seed(2)
    for p in params:
        made = init_low_bit_state(p, amsgrad=False, state_precision=state_precision, param_update=param_update)
        assert {k: (v.dtype, v.shape) for k, v in floor.state[p].items()} == {
            k: (v.dtype, v.shape) for k, v in made.items()
        }
        for t in floor.state[p].values():  # random bytes, not the zeros it starts with
            _bits(t).copy_(
                torch.randint(0, 256, (t.numel() * t.element_size(),), generator=generator, dtype=torch.uint8)
            )
    before = [[t.detach().clone() for t in _tensors(floor, p)] for p in params]
    for _ in range(3):
        floor.step()
    for p, saved in zip(params, before, strict=True):
        for old, new in zip(saved, _tensors(floor, p), strict=True):
            assert torch.equal(_bits(old), _bits(new))


@pytest.mark.parametrize(("dtype", "state_precision", "param_update"), FLOOR_FORMATS)
def test_memory_floor_reads_and_writes_every_element(
    dtype: torch.dtype, state_precision: str, param_update: str
) -> None:
    """With an all-ones mask every written byte (param and state) is flipped, and the XOR of every grad
    element comes back: each element is visited once."""
    params = _floor_params(dtype, seed=1)
    floor = MemoryFloor(params, state_precision=state_precision, param_update=param_update, mask=-1)
    floor.step()  # creates the state, then flips param and state
    before = [[t.detach().clone() for t in _tensors(floor, p)] for p in params]
    floor.step()
    for p, saved in zip(params, before, strict=True):
        grad_and_others = zip(saved, _tensors(floor, p), strict=True)
        for k, (old, new) in enumerate(grad_and_others):
            expected = _bits(old) if k == 1 else _bits(old) ^ 0xFF  # the grad (k = 1) is only read
            assert torch.equal(_bits(new), expected), k
    words = torch.cat([_bits(p.grad) for p in params]).numpy().view(f"<u{params[0].element_size()}")
    expected_xor = int(np.bitwise_xor.reduce(words)) if words.size else 0
    assert floor.read_xor == expected_xor


def test_memory_floor_refuses_what_it_cannot_stream() -> None:
    p = torch.randn(8, 8).t().requires_grad_()
    p.grad = torch.randn(8, 8).t()
    with pytest.raises(RuntimeError, match="contiguous CPU tensors"):
        MemoryFloor([p]).step()


def test_implementations_of_a_workload_step_the_same_state_memory() -> None:
    """After warm-up, every implementation whose moments have the same form steps the first one's tensors."""
    params = [torch.randn(5000, requires_grad=True), torch.randn(3, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p)
    shared: dict[Any, torch.Tensor] = {}
    optimizers = [
        torch.optim.AdamW(params, fused=True),
        adamw.AdamW(params, fused=True),
        adamw.AdamW(params, state_precision="8bit"),
    ]
    for opt in optimizers:
        opt.step()
        timing._share_state(opt, params, shared)
    first, ours, low_bit = (opt.state for opt in optimizers)
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            assert ours[p][key] is first[p][key]
        assert ours[p]["step"] is not first[p]["step"]  # each keeps its own step count
    assert low_bit[params[0]]["exp_avg"].dtype != torch.float32  # 8-bit codes keep their own memory
    assert low_bit[params[0]]["exp_avg"] is not first[params[0]]["exp_avg"]
    for opt in optimizers:  # and every one still steps
        opt.step()
