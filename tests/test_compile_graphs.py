"""torch.compile over adamw.AdamW's step: every backend and state format breaks the graph no more often,
and makes no more graphs, than torch.optim.AdamW; a fused kernel is one op in the graph (and Inductor
runs it on the state in place); several compiled optimizers stay under Dynamo's recompile limit; and the
kernels' ops (adamw.backends.ops) pass torch.library.opcheck.

Dynamo's counts do not depend on the compiler behind it, so all but one test compile with the eager
backend (a graph run as traced): Inductor would add seconds per compile and count nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

import adamw
from adamw.backends import ops
from adamw.backends._common import Hyper

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False



def _triton_skip() -> str | None:
    """Why the Triton cases skip: these steps and ops take CPU tensors, which Triton runs under its
    interpreter, and the interpreter is off where a GPU is (tests/conftest.py)."""
    if not HAS_TRITON:
        return "triton is not installed"
    if torch.cuda.is_available():
        return "CPU tensors: Triton's interpreter is off where a GPU is"
    return None


TRITON_SKIP = _triton_skip()
needs_triton = pytest.mark.skipif(TRITON_SKIP is not None, reason=TRITON_SKIP or "")

# backend x storage format: the options of adamw.AdamW and the dtype of the model's params.
CASES: dict[str, tuple[dict[str, Any], torch.dtype]] = {
    "forloop-param": ({"foreach": False}, torch.float32),
    "foreach-param": ({"foreach": True}, torch.float32),
    "foreach-8bit": ({"foreach": True, "state_precision": "8bit"}, torch.float32),
    "cpu-param": ({"fused": True}, torch.float32),
    "cpu-8bit": ({"fused": True, "state_precision": "8bit"}, torch.float32),
    "cpu-bf16": ({"fused": True, "state_precision": "bf16"}, torch.float32),
    "cpu-stochastic": ({"fused": True, "param_update": "stochastic"}, torch.bfloat16),
    "cpu-kahan": ({"fused": True, "param_update": "kahan"}, torch.bfloat16),
    "triton-param": ({"backend": "triton"}, torch.float32),
    "triton-8bit": ({"backend": "triton", "state_precision": "8bit"}, torch.float32),
    "triton-kahan": ({"backend": "triton", "param_update": "kahan"}, torch.bfloat16),
}
# The op each full-precision fused backend's step puts in the graph.
FUSED_OPS = {"cpu-param": torch.ops.adamw.cpu_step.default, "triton-param": torch.ops.adamw.triton_step.default}


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    # The first weight has 5120 values: over 4096, so that "8bit" quantizes it (the others stay float32).
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.ReLU(), torch.nn.Linear(80, 2)).to(dtype)


@dataclass
class Counts:
    graphs: int
    breaks: int
    frames: int
    targets: list[Any]  # what the graphs call


def _count(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], dtype: torch.dtype) -> Counts:
    """Dynamo's counts for one optimizer's compiled step, called three times (the first creates the state)."""
    torch._dynamo.reset()
    counters.clear()
    targets: list[Any] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        targets.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    model = _model(dtype)
    step = torch.compile(make(list(model.parameters())).step, backend=backend)
    x = torch.randn(8, 64, dtype=dtype, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model.zero_grad()
        model(x).float().square().mean().backward()
        step()
    return Counts(
        graphs=int(counters["stats"]["unique_graphs"]),
        breaks=sum(counters["graph_break"].values()),
        frames=int(counters["frames"]["total"]),
        targets=targets,
    )


@pytest.fixture(scope="module")
def torch_counts() -> Iterator[Counts]:
    """torch.optim.AdamW's counts with foreach=True: its step traced whole, between the two breaks
    torch.optim.Optimizer places around it. (Its fused=True makes no graph: the kernel runs eagerly.)"""
    yield _count(lambda params: torch.optim.AdamW(params, lr=0.01, foreach=True), torch.float32)


@pytest.mark.parametrize("case", CASES)
def test_compiled_step_breaks_no_more_than_torchs(case: str, torch_counts: Counts) -> None:
    options, dtype = CASES[case]
    if case.startswith("triton") and TRITON_SKIP is not None:
        pytest.skip(TRITON_SKIP)
    ours = _count(lambda params: adamw.AdamW(params, lr=0.01, **options), dtype)
    assert ours.graphs <= torch_counts.graphs and ours.breaks <= torch_counts.breaks, (
        f"adamw.AdamW({options}): {ours}; torch.optim.AdamW(foreach=True): {torch_counts}"
    )
    if case in FUSED_OPS:
        assert ours.targets.count(FUSED_OPS[case]) == ours.graphs == 1, ours.targets


def test_inductor_steps_the_state_in_place() -> None:
    """A mutating op in an Inductor graph is functionalized; Inductor must turn it back into the one
    in-place call on the graph's inputs, not clone params and moments each step and copy them back."""
    torch._dynamo.reset()
    model = _model()
    step = torch.compile(adamw.AdamW(model.parameters(), lr=0.01, fused=True).step)
    model(torch.randn(8, 64)).square().mean().backward()
    _, (code, *_) = torch._inductor.utils.run_and_get_code(step)
    call = code[code.index("def call(") :]  # the step as run (the module's preamble defines helpers)
    assert call.count("torch.ops.adamw.cpu_step.default(") == 1, call
    assert not any(word in call for word in ("clone", "copy_", "empty_strided")), call


def test_six_compiled_fused_optimizers_stay_under_the_recompile_limit() -> None:
    """Six optimizers in one process, each with its own compiled step (as when several models train
    together): none of the frames Dynamo compiles reaches the recompile limit."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for _ in range(6):
            model = _model()
            step = torch.compile(adamw.AdamW(model.parameters(), lr=0.01, fused=True).step, backend="eager")
            for _ in range(2):
                model.zero_grad()
                model(torch.randn(8, 64)).square().mean().backward()
                step()
    assert counters["stats"]["unique_graphs"] == 6  # one per optimizer: its kernel's op in its graph


# --------------------------------------------------------------------------------------------------
# the ops against torch.library.opcheck


def _hyper(grad_scale: torch.Tensor | None = None) -> Hyper:
    return Hyper(
        lr=0.01,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.01,
        amsgrad=True,
        maximize=False,
        capturable=False,
        differentiable=False,
        grad_scale=grad_scale,
        found_inf=None if grad_scale is None else torch.zeros(()),
    )


@pytest.mark.parametrize("name", ["cpu", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "grad_scale"])
def test_full_precision_op_passes_opcheck(name: str, scaled: bool) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,)]
    params = [torch.randn(s, generator=g) for s in shapes]
    args = (
        params,
        [torch.randn(s, generator=g) for s in shapes],
        [torch.zeros(s) for s in shapes],
        [torch.zeros(s) for s in shapes],
        [torch.zeros(s) for s in shapes],
        [torch.zeros(()) for _ in shapes],
        *ops.hyper_args(_hyper(torch.tensor(4.0) if scaled else None)),
    )
    torch.library.opcheck(ops.FULL_PRECISION_OPS[name], args)


@pytest.mark.parametrize("name", ["cpu", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize(
    ("state_precision", "param_update", "dtype"),
    [("8bit", "round", torch.float32), ("bf16", "kahan", torch.bfloat16)],
    ids=["8bit", "bf16-kahan"],
)
def test_low_bit_op_passes_opcheck(name: str, state_precision: str, param_update: str, dtype: torch.dtype) -> None:
    # 4096 values: the smallest param whose 8-bit moments are quantized; the other keeps float32 ones.
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(64, 64, generator=g).to(dtype), torch.randn(7, generator=g).to(dtype)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    opt = adamw.AdamW(
        params, lr=0.01, amsgrad=True, backend=name, state_precision=state_precision, param_update=param_update
    )
    opt.step()  # creates the state in the format under test
    states = [opt.state[p] for p in params]
    state_tensors, masks = ops.flatten_states(states)
    assert len(state_tensors) == sum(bin(m).count("1") for m in masks) and all(masks)
    args = (
        params,
        [p.grad for p in params],
        state_tensors,
        masks,
        [state["step"] for state in states],
        [0, 1],
        state_precision,
        param_update,
        0,
        *ops.hyper_args(_hyper()),
    )
    torch.library.opcheck(ops.LOW_BIT_OPS[name], args)
