"""adamw.AdamW inside the rest of torch: LR schedulers and torch.compile (GradScaler with autocast:
test_grad_scaler.py).

Each runs beside torch.optim.AdamW on the same model and data; the mirror backends must give the
same bits, the fused kernels the same results within the float32 tolerance of the table.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters
from torch.optim.lr_scheduler import LRScheduler, OneCycleLR, StepLR

import adamw
from _helpers import REFERENCE_TOL, assert_same_run

SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], LRScheduler]] = {
    "StepLR": lambda opt: StepLR(opt, step_size=2, gamma=0.5),
    # cycle_momentum drives betas[0] (AdamW has no "momentum"): the scheduler writes group["betas"].
    "OneCycleLR": lambda opt: OneCycleLR(
        opt, max_lr=0.1, total_steps=6, cycle_momentum=True, base_momentum=0.8, max_momentum=0.95
    ),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _inputs() -> torch.Tensor:
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(1))


def _assert_close_run(ours: Any, theirs: Any, our_params: list[torch.Tensor], their_params: list[torch.Tensor]) -> None:
    """For fused kernels: step counters exact, params and moments within the float32 tolerance."""
    tol = REFERENCE_TOL[torch.float32]
    for i, (a, b) in enumerate(zip(our_params, their_params, strict=True)):
        tol.assert_close(a, b, f"param {i}")
        assert ours.state[a].keys() == theirs.state[b].keys()
        for key, value in theirs.state[b].items():
            actual = ours.state[a][key]
            if key == "step":
                assert actual.item() == value.item(), f"param {i} step {actual.item()} != {value.item()}"
            else:
                tol.assert_close(actual, value, f"param {i} state[{key!r}]")


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("foreach", [False, True], ids=["foreach=False", "foreach=True"])
@pytest.mark.parametrize("scheduler", SCHEDULERS.values(), ids=SCHEDULERS.keys())
def test_lr_scheduler(scheduler: Callable[[Any], LRScheduler], foreach: bool, lr_kind: str) -> None:
    if foreach and lr_kind == "tensor":
        pytest.skip("a Tensor lr needs capturable=True with foreach (CUDA only), in torch and ours alike")
    x = _inputs()

    def run(cls: type[torch.optim.Optimizer]) -> tuple[Any, list[torch.Tensor], list[Any]]:
        model = _model()
        lr = torch.tensor(0.01) if lr_kind == "tensor" else 0.01
        opt = cls(model.parameters(), lr=lr, weight_decay=0.1, foreach=foreach)
        sched = scheduler(opt)
        history = []
        for _ in range(6):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            sched.step()
            group = opt.param_groups[0]
            history.append((float(group["lr"]), tuple(float(b) for b in group["betas"])))
        return opt, list(model.parameters()), history

    ours, our_params, our_history = run(adamw.AdamW)
    theirs, their_params, their_history = run(torch.optim.AdamW)
    assert our_history == their_history
    assert len(set(our_history)) > 2  # the schedule really moved lr (and betas for OneCycleLR)
    assert_same_run(ours, theirs, our_params, their_params)


def test_compiled_training_step() -> None:
    """A training loop whose optimizer step is torch.compile'd (as torch's compiled-optimizer tests do;
    compiling forward and backward too would only add compile time), from a cold start: the first call
    creates the state inside the compiled step. Inductor reorders float math, so not bitwise."""
    torch._dynamo.reset()
    x = _inputs()
    models = [_model(), _model()]
    ours = adamw.AdamW(models[0].parameters(), lr=0.01, weight_decay=0.1, amsgrad=True, foreach=True)
    theirs = torch.optim.AdamW(models[1].parameters(), lr=0.01, weight_decay=0.1, amsgrad=True, foreach=True)
    compiled_step = torch.compile(ours.step)
    for _ in range(3):
        for model, step in ((models[0], compiled_step), (models[1], theirs.step)):
            model.zero_grad()
            model(x).square().mean().backward()
            step()
    _assert_close_run(ours, theirs, list(models[0].parameters()), list(models[1].parameters()))


@pytest.mark.parametrize("state_precision", ["param", "8bit"])
def test_compiled_step_of_the_cpu_kernels(state_precision: str) -> None:
    """torch.compile over a step that calls our C kernels: the full-precision one is an op in the graph
    (adamw.backends.ops), which Inductor calls as it is; the low-bit one runs under the optimizer's
    eager boundary. Either way the compiled step is the eager one bit for bit, with no warning."""
    torch._dynamo.reset()
    x = _inputs()
    models = [_model(), _model()]
    ours, eager = (
        adamw.AdamW(m.parameters(), lr=0.01, weight_decay=0.1, fused=True, state_precision=state_precision)
        for m in models
    )
    compiled_step = torch.compile(ours.step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            for model, step in ((models[0], compiled_step), (models[1], eager.step)):
                model.zero_grad()
                model(x).square().mean().backward()
                step()
    assert_same_run(ours, eager, list(models[0].parameters()), list(models[1].parameters()))


def _frames_compiled(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]) -> int:
    """Frames Dynamo compiles for three optimizers, each stepped twice through its own compiled step."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=2):
        for _ in range(3):
            model = _model()
            step = torch.compile(make(list(model.parameters())).step)
            for _ in range(2):
                model.zero_grad()
                model(_inputs()).square().mean().backward()
                step()
    return int(counters["frames"]["total"])


@pytest.fixture(scope="module")
def torch_fused_frames() -> int:
    return _frames_compiled(lambda params: torch.optim.AdamW(params, lr=0.01, fused=True))


@pytest.mark.parametrize("options", [{"fused": True}, {"fused": True, "state_precision": "8bit"}])
def test_several_compiled_optimizers_compile_no_more_than_torchs(
    options: dict[str, object], torch_fused_frames: int
) -> None:
    """Each optimizer with its own compiled step (as when several models train in one process): ours
    compile no more frames than torch's fused AdamW. A frame Dynamo compiles per optimizer (its guards
    name that optimizer's objects) would reach the recompile limit after a few optimizers."""
    ours = _frames_compiled(lambda params: adamw.AdamW(params, lr=0.01, **options))  # type: ignore[arg-type]
    assert ours <= torch_fused_frames, f"{ours} frames compiled for 3 adamw.AdamW, {torch_fused_frames} for torch's"
