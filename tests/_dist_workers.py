"""The 2-rank training jobs of tests/test_distributed.py (gloo, CPU) and the single-process runs they
are compared with.

Each job is one spawn of 2 processes that loops over every configuration (backend x state format x
step mode) inside, since starting processes and a process group costs seconds; rank 0 saves one
result file per configuration, which the tests read. A spawned process imports this module by name
(tests/ is on its path), so it holds everything a worker runs and no pytest.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import adamw
from adamw.in_backward import step_in_backward
from adamw.states.checkpoint import decode_quantized_moments

WORLD_SIZE = 2
STEPS = 4
CHECKPOINT_AT = 2  # the DCP job saves after this many steps and runs the rest as the continuation
GLOBAL_BATCH = 16
# A gloo collective that waits longer than this is a hang (a rank died or diverged): fail, not stall CI.
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
JOB_TIMEOUT_S = 120.0

# State formats the jobs (and tests/test_in_backward.py) run, by name: the extra AdamW keyword
# arguments that select it. A new format is one entry here and one in test_distributed.TOLERANCES.
STATE_FORMATS: dict[str, dict[str, Any]] = {
    "param": {},
    "bf16": {"state_precision": "bf16"},
    "8bit": {"state_precision": "8bit"},
    "4bit": {"state_precision": "4bit"},
    "bf16-stochastic": {"param_update": "stochastic"},
    "bf16-kahan": {"param_update": "kahan"},
}
DIST_STATE_FORMATS = STATE_FORMATS
# Formats whose model trains in bfloat16 (param_update only changes how bfloat16 params are written).
BF16_PARAM_FORMATS = ("bf16-stochastic", "bf16-kahan")


@dataclasses.dataclass(frozen=True)
class Config:
    """One run: which backend steps, which state format, and whether the step runs in backward."""

    backend: str
    state_format: str = "param"
    in_backward: bool = False

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.state_format}" + ("-in_backward" if self.in_backward else "")


# --------------------------------------------------------------------------------------------------
# the model, the data, the optimizer: identical in every process


def make_model(state_format: str = "param") -> nn.Sequential:
    # 7 and 1 output rows shard unevenly on 2 ranks (4+3, and 1+0: rank 1 holds empty shards). The
    # first weight has 4128 values: quantized under "8bit" (>= 4096) although each shard holds 2064,
    # and its 256-value blocks do not end at the shard boundary.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 344), nn.Tanh(), nn.Linear(344, 7), nn.Tanh(), nn.Linear(7, 1))
    return model.to(torch.bfloat16) if state_format in BF16_PARAM_FORMATS else model


def global_batches() -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(GLOBAL_BATCH, 12, generator=generator), torch.randn(GLOBAL_BATCH, 1, generator=generator))
        for _ in range(STEPS)
    ]


def rank_slice(batch: tuple[Tensor, Tensor], rank: int, world_size: int) -> tuple[Tensor, Tensor]:
    """This rank's contiguous share of a global batch."""
    per_rank = GLOBAL_BATCH // world_size
    x, y = batch
    return x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]


def loss_of(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    dtype = next(model.parameters()).dtype
    return nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype))  # mean over the (local) batch


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two groups, as in most LLM recipes: weights decay, biases do not."""
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    return [{"params": weights}, {"params": biases, "weight_decay": 0.0}]


def adamw_options(config: Config) -> dict[str, Any]:
    options = dict(lr=1e-2, weight_decay=0.1, backend=config.backend, **DIST_STATE_FORMATS[config.state_format])
    if config.state_format != "param":
        # Every checkpoint of these runs may be resharded (DCP 2 ranks -> 1): 8-bit moments as float32.
        options["reshardable_state_dict"] = True
    return options


def make_optimizer(model: nn.Module, config: Config) -> adamw.AdamW:
    options = adamw_options(config)
    if config.in_backward:
        return step_in_backward(param_groups(model), **options)
    return adamw.AdamW(param_groups(model), **options)


def train_step(model: nn.Module, opt: adamw.AdamW, batch: tuple[Tensor, Tensor], config: Config) -> None:
    loss_of(model, batch).backward()
    if not config.in_backward:
        opt.step()
        opt.zero_grad()


def full(t: Tensor) -> Tensor:
    """The whole tensor of a (possibly sharded) DTensor, as a plain CPU tensor."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Params and every state entry by param name, unsharded (collective under FSDP2: every rank calls).

    8-bit moments are decoded to float32: their blocks are cut per shard, so codes and absmaxes of
    a sharded run are not comparable with a single process's, the values they stand for are.
    """
    names = {p: name for name, p in model.named_parameters()}
    return {
        "params": {names[p]: full(p) for p in names},
        "state": {names[p]: {k: full(v) for k, v in decode_quantized_moments(s, p).items()} for p, s in opt.state.items()},
    }


def train_single(config: Config, steps: int = STEPS) -> tuple[nn.Sequential, adamw.AdamW]:
    """The reference: one process, the full global batch, the same options."""
    model = make_model(config.state_format)
    opt = make_optimizer(model, config)
    for batch in global_batches()[:steps]:
        train_step(model, opt, batch, config)
    return model, opt


# --------------------------------------------------------------------------------------------------
# the jobs: (rank, config, out_dir) -> what rank 0 saves


def ddp_job(rank: int, config: Config, out_dir: Path) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model(config.state_format))
    if config.in_backward:
        try:
            step_in_backward(model, lr=1e-2, backend=config.backend)
        except RuntimeError as exc:
            return {"refused": str(exc)}
        return {"refused": None}
    opt = make_optimizer(model.module, config)
    for batch in global_batches():
        train_step(model, opt, rank_slice(batch, rank, WORLD_SIZE), config)
    return {**snapshot(model.module, opt), "replicas_equal": _replicas_equal(model.module)}


def _replicas_equal(model: nn.Module) -> bool:
    """Whether every rank holds the same params bit for bit (DDP and ZeRO keep full replicas)."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _fully_shard(model: nn.Sequential) -> nn.Sequential:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp2_job(rank: int, config: Config, out_dir: Path) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    model = _fully_shard(make_model(config.state_format))
    opt = make_optimizer(model, config)
    for batch in global_batches():
        train_step(model, opt, rank_slice(batch, rank, WORLD_SIZE), config)
    # The states must stay DTensors sharded like their params: DCP saves and reshards them by that.
    placements = {
        name: {k: (type(v).__name__, getattr(v, "placements", None) == p.placements) for k, v in opt.state[p].items()}
        for name, p in model.named_parameters()
        if isinstance(p, DTensor)
    }
    return {**snapshot(model, opt), "placements": placements}


def zero_job(rank: int, config: Config, out_dir: Path) -> dict[str, Any]:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model(config.state_format))
    opt = ZeroRedundancyOptimizer(param_groups(model.module), optimizer_class=adamw.AdamW, **adamw_options(config))
    for batch in global_batches():
        loss_of(model, rank_slice(batch, rank, WORLD_SIZE)).backward()
        opt.step()
        opt.zero_grad()
    # Each rank steps and holds the state of its partition only; consolidated on rank 0, the state
    # dict is an AdamW state dict of the whole model.
    owned = sum(len(s) > 0 for s in opt.optim.state.values())
    opt.consolidate_state_dict(to=0)
    params = {name: full(p) for name, p in model.module.named_parameters()}
    owned_counts = [0] * WORLD_SIZE
    dist.all_gather_object(owned_counts, owned)
    result: dict[str, Any] = {"params": params, "owned": owned_counts, "replicas_equal": _replicas_equal(model.module)}
    if rank == 0:
        result["state_dict"] = opt.state_dict()
    return result


def dcp_job(rank: int, config: Config, out_dir: Path) -> dict[str, Any]:
    """Train CHECKPOINT_AT steps under FSDP2, save a distributed checkpoint, train on to STEPS."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = _fully_shard(make_model(config.state_format))
    opt = make_optimizer(model, config)
    batches = global_batches()
    for batch in batches[:CHECKPOINT_AT]:
        train_step(model, opt, rank_slice(batch, rank, WORLD_SIZE), config)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=out_dir / f"checkpoint-{config.id}")
    at_save = snapshot(model, opt)
    for batch in batches[CHECKPOINT_AT:]:
        train_step(model, opt, rank_slice(batch, rank, WORLD_SIZE), config)
    return {"at_save": at_save, "continued": snapshot(model, opt)}


def load_checkpoint_single(config: Config, out_dir: Path) -> tuple[nn.Sequential, adamw.AdamW]:
    """Resume a 2-rank checkpoint in one process without a process group (world size 1, unsharded)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = make_model(config.state_format)
    opt = make_optimizer(model, config)
    with warnings.catch_warnings():
        # Loading without a process group is the point here, not a mistake to warn about.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=out_dir / f"checkpoint-{config.id}", no_dist=True)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
    return model, opt


JOBS: dict[str, Callable[[int, Config, Path], dict[str, Any]]] = {
    "ddp": ddp_job,
    "fsdp2": fsdp2_job,
    "zero": zero_job,
    "dcp": dcp_job,
}


# --------------------------------------------------------------------------------------------------
# spawning


def result_path(out_dir: Path, job: str, config: Config) -> Path:
    return out_dir / f"{job}-{config.id}.pt"


def run_job(job: str, configs: list[Config], out_dir: Path) -> str | None:
    """Run ``job`` on WORLD_SIZE ranks for every config; the error text if a rank failed.

    A failing config stops the job (its other rank may wait in a collective, so it cannot go on):
    configs before it keep their results, the ones after it have none.

    The ranks are forked, not spawned: they inherit this process's imported torch, where spawned
    ones would import it again and finalize it on exit (about 8 s per job on 2 cores, against 0.5 s).
    Forking is safe here because this process holds no process group, and each rank runs torch on
    one thread, so no OpenMP pool is used across the fork. Where CUDA is available they are spawned:
    asking whether it is starts CUDA's driver in this process, and a forked child that touches CUDA
    then fails (every optimizer's step asks whether CUDA is capturing a graph).
    """
    init_file = out_dir / f"{job}.init"
    start_method = "spawn" if torch.cuda.is_available() else "fork"
    if start_method == "fork":
        _import_once_before_fork()
    context = mp.start_processes(
        _worker,
        args=(job, configs, out_dir, init_file),
        nprocs=WORLD_SIZE,
        join=False,
        start_method=start_method,
    )
    assert context is not None
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.terminate()
                return f"job {job!r} did not finish in {JOB_TIMEOUT_S:.0f} s (its ranks were terminated)"
    except Exception:  # noqa: BLE001 - a failed rank is reported by the tests that lack a result
        return traceback.format_exc()
    return None


def _import_once_before_fork() -> None:
    """Import here what every rank would import (DDP and FSDP2 pull in torch._dynamo: ~2 s per process)."""
    import torch._dynamo  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.optim  # noqa: F401
    import torch.nn.parallel  # noqa: F401


def _worker(rank: int, job: str, configs: list[Config], out_dir: Path, init_file: Path) -> None:
    # Two ranks share two cores: more threads per rank only contend.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        for config in configs:
            result = JOBS[job](rank, config, out_dir)
            if rank == 0:
                torch.save(result, result_path(out_dir, job, config))
    finally:
        dist.destroy_process_group()
