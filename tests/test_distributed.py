"""AdamW at scale, on 2 CPU ranks (gloo): DDP, FSDP2, ZeRO and distributed checkpoints, each against
one process training on the same data.

Each engine is one 2-rank job (tests/_dist_workers.py) that runs every configuration; the tests read
its results. Every rank gets its half of a global batch and the mean loss over it; DDP and FSDP2
average the gradients over ranks, so every run steps with the gradient of the mean loss over the
global batch, which the single process computes directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from _dist_workers import (
    CHECKPOINT_AT,
    DIST_STATE_FORMATS,
    WORLD_SIZE,
    Config,
    global_batches,
    load_checkpoint_single,
    make_model,
    make_optimizer,
    result_path,
    run_job,
    snapshot,
    train_single,
    train_step,
)
from _helpers import DISTRIBUTED_TOL, Ulps, backend_params
from adamw.states import KAHAN_KEY

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available in this torch build",
)

# The fused Triton kernel is left out: on CPU it runs under Triton's interpreter, which is slow and
# says nothing about DTensors that the C kernel (stepping local shards the same way) does not.
DIST_BACKENDS = ("forloop", "foreach", "cpu")


def _configs(*, in_backward: bool) -> list[Any]:
    out = []
    for backend in backend_params(DIST_BACKENDS):
        for state_format in DIST_STATE_FORMATS:
            config = Config(backend.values[0], state_format, in_backward)
            out.append(pytest.param(config, id=config.id, marks=backend.marks))
    return out


STANDARD = _configs(in_backward=False)
IN_BACKWARD = _configs(in_backward=True)
DDP_IN_BACKWARD = Config("forloop", in_backward=True)


def _runnable(params: list[Any]) -> list[Config]:
    return [p.values[0] for p in params if not p.marks]


JOB_CONFIGS: dict[str, list[Config]] = {
    "ddp": _runnable(STANDARD) + [DDP_IN_BACKWARD],
    "fsdp2": _runnable(STANDARD + IN_BACKWARD),
    "zero": _runnable(STANDARD),
    "dcp": _runnable(STANDARD + IN_BACKWARD),
}


class Jobs:
    """Runs each 2-rank job once, when a test first asks for one of its results."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.errors: dict[str, str | None] = {}

    def result(self, job: str, config: Config) -> dict[str, Any]:
        if job not in self.errors:
            self.errors[job] = run_job(job, JOB_CONFIGS[job], self.out_dir)
        path = result_path(self.out_dir, job, config)
        if not path.exists():
            pytest.fail(f"the {job} job gave no result for {config.id}:\n{self.errors[job] or '(no error reported)'}")
        return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    return Jobs(tmp_path_factory.mktemp("distributed"))


def assert_close_run(actual: dict[str, Any], expected: dict[str, Any], config: Config) -> None:
    """Params and every state entry of two snapshots (see _dist_workers.snapshot), within DISTRIBUTED_TOL."""
    tol = DISTRIBUTED_TOL[config.state_format]
    assert actual["params"].keys() == expected["params"].keys()
    assert actual["state"].keys() == expected["state"].keys(), "not the same params have state"
    for name, param in expected["params"].items():
        _assert_close(actual["params"][name], param, tol, f"param {name}")
        state = expected["state"][name]
        assert actual["state"][name].keys() == state.keys(), f"state keys of {name}"
        for key, value in state.items():
            if key == "kahan_comp":
                continue  # what rounding the param lost: any flipped rounding changes it wholly (the param is compared)
            _assert_close(actual["state"][name][key], value, tol, f"state[{name}][{key!r}]")


def _assert_close(actual: Tensor, expected: Tensor, tol: Ulps, what: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, f"{what}: shape/dtype differ"
    if expected.numel() == 0:
        return
    if not expected.is_floating_point() or expected.dim() == 0:
        assert torch.equal(actual, expected), f"{what}: {actual} != {expected}"  # step counters, exactly
        return
    bound = tol.of(expected.dtype, expected.abs().max().item())
    diff = (actual - expected).abs().max().item()
    ulps = diff / (torch.finfo(expected.dtype).eps * expected.abs().max().item())
    assert diff <= bound, (
        f"{what}: max |diff| {diff:.3e} > {bound:.3e} = {ulps:.1f} ulps ({tol.ulps} ulps: {tol.reason})"
    )


def single_process(config: Config, steps: int | None = None) -> dict[str, Any]:
    """The standard step in one process on the full batches: what every distributed run must give."""
    standard = Config(config.backend, config.state_format)
    return snapshot(*train_single(standard, **({} if steps is None else {"steps": steps})))


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", STANDARD)
def test_ddp_matches_single_process(jobs: Jobs, config: Config) -> None:
    result = jobs.result("ddp", config)
    assert result["replicas_equal"], "the ranks' replicas differ after training"
    assert_close_run(result, single_process(config), config)


def test_ddp_refuses_step_in_backward(jobs: Jobs) -> None:
    # DDP reduces gradients after the per-parameter hooks run: each rank would step on its own.
    refused = jobs.result("ddp", DDP_IN_BACKWARD)["refused"]
    assert refused is not None and "DistributedDataParallel" in refused


@pytest.mark.parametrize("config", STANDARD + IN_BACKWARD)
def test_fsdp2_matches_single_process(jobs: Jobs, config: Config) -> None:
    result = jobs.result("fsdp2", config)
    assert_close_run(result, single_process(config), config)
    # Each moment (bf16, 8-bit codes, float32) and Kahan buffer is a DTensor sharded like its param
    # (what DCP saves and reshards by); the step counter is a plain tensor, the same on every rank,
    # and an absmax and 4-bit codes (flat, two to a byte) plain tensors of this rank's shard
    # (state_dict() decodes them away).
    for name, states in result["placements"].items():
        packed = config.state_format == "4bit" and name == "0.weight"  # the one param over 4096 values
        for key, kind in states.items():
            plain = key == "step" or key.endswith("_absmax") or (packed and key != KAHAN_KEY)
            assert kind == (("Tensor", False) if plain else ("DTensor", True)), f"{name}[{key!r}]: {kind}"


@pytest.mark.parametrize("config", STANDARD)
def test_zero_matches_single_process(jobs: Jobs, config: Config) -> None:
    result = jobs.result("zero", config)
    reference_model, reference_opt = train_single(config)
    reference = snapshot(reference_model, reference_opt)
    assert all(owned > 0 for owned in result["owned"]) and len(result["owned"]) == WORLD_SIZE, (
        f"every rank must step a partition: params with state per rank {result['owned']}"
    )
    assert result["replicas_equal"], "the ranks' params differ after ZeRO's broadcast"
    # ZeRO's consolidated state dict is an AdamW state dict of the whole model: a single-process
    # AdamW loads it and holds the single-process run's state.
    model = make_model(config.state_format)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(result["params"][name])
    opt = make_optimizer(model, config)
    opt.load_state_dict(result["state_dict"])
    assert_close_run(snapshot(model, opt), reference, config)
    assert opt.param_groups[1]["weight_decay"] == reference_opt.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("config", STANDARD + IN_BACKWARD)
def test_dcp_checkpoint_of_2_ranks_resumes_on_1(jobs: Jobs, config: Config) -> None:
    result = jobs.result("dcp", config)
    model, opt = load_checkpoint_single(config, jobs.out_dir)
    # Loading copies: the unsharded state is the 2-rank state at the save, bit for bit; 8-bit
    # moments travel as float32 and are re-quantized in the single process's blocks, so they agree
    # within one code step (snapshots compare them decoded).
    loaded = snapshot(model, opt)
    if config.state_format in ("8bit", "4bit"):
        assert_close_run(loaded, result["at_save"], config)
    else:
        for name, param in result["at_save"]["params"].items():
            assert torch.equal(loaded["params"][name], param), f"param {name}"
            for key, value in result["at_save"]["state"][name].items():
                assert torch.equal(loaded["state"][name][key], value), f"state[{name}][{key!r}]"
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[0]["lr"] == 1e-2
    for batch in global_batches()[CHECKPOINT_AT:]:
        train_step(model, opt, batch, config)
    assert_close_run(snapshot(model, opt), result["continued"], config)
