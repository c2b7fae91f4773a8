"""The step in backward (adamw.step_in_backward) against the standard step: same bits, schedulers,
checkpoints both ways, freed gradients, per-parameter clipping, and the refusals (step(), GradScaler)."""

from __future__ import annotations

import copy
import io
import typing
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import adamw
from _dist_workers import STATE_FORMATS
from _helpers import assert_same_run, backend_params
from adamw.in_backward import AdamWInBackward
from adamw.options import AdamWOptions

STEPS = 4


class Net(nn.Module):
    """Exercises what a hook sees: a tied weight (used twice, one hook call), a frozen layer (no grad),
    a layer used on even steps only (no grad, no step on odd ones), and params in two groups."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 8)
        self.hidden = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8).requires_grad_(False)
        self.sometimes = nn.Linear(8, 8)

    def forward(self, tokens: Tensor, step: int) -> Tensor:
        h = torch.tanh(self.hidden(self.embed(tokens)))
        h = self.frozen(h)
        if step % 2 == 0:
            h = h + self.sometimes(h)
        return h @ self.embed.weight.T  # logits through the tied embedding


def groups(model: nn.Module) -> list[dict[str, Any]]:
    decay = [p for name, p in model.named_parameters() if name.endswith("weight")]
    no_decay = [p for name, p in model.named_parameters() if not name.endswith("weight")]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lr": 3e-2}]


def loss_at(model: nn.Module, step: int) -> Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, 11, (6,), generator=gen)
    targets = torch.randint(0, 11, (6,), generator=gen)
    return nn.functional.cross_entropy(model(tokens, step), targets)


OPTIONS: dict[str, Any] = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)


def standard_run(
    backend: str, steps: range, model: Net | None = None, opt: adamw.AdamW | None = None, state_format: str = "param"
) -> tuple[Net, adamw.AdamW]:
    model = model or Net()
    opt = opt or adamw.AdamW(groups(model), backend=backend, **OPTIONS, **STATE_FORMATS[state_format])
    for step in steps:
        loss_at(model, step).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def in_backward_run(
    backend: str,
    steps: range,
    model: Net | None = None,
    opt: AdamWInBackward | None = None,
    state_format: str = "param",
    **extra: Any,
) -> tuple[Net, AdamWInBackward]:
    model = model or Net()
    opt = opt or adamw.step_in_backward(
        groups(model), backend=backend, **OPTIONS, **STATE_FORMATS[state_format], **extra
    )
    for step in steps:
        loss_at(model, step).backward()
    return model, opt


def params(model: nn.Module) -> list[Tensor]:
    return list(model.parameters())


def params_of(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


@pytest.mark.parametrize("state_format", STATE_FORMATS)
@pytest.mark.parametrize("backend", backend_params())
def test_same_params_and_states_as_the_standard_step(backend: str, state_format: str) -> None:
    # Per parameter, the step is the same elementwise update over the same values: bit for bit.
    model, opt = in_backward_run(backend, range(STEPS), state_format=state_format)
    reference, reference_opt = standard_run(backend, range(STEPS), state_format=state_format)
    assert_same_run(opt, reference_opt, params(model), params(reference))
    assert opt.state[model.sometimes.weight]["step"].item() == (STEPS + 1) // 2  # stepped only when used


@pytest.mark.parametrize("backend", backend_params())
def test_each_gradient_is_freed_before_the_next_arrives(backend: str) -> None:
    model = Net()
    held: list[int] = []
    opt = adamw.step_in_backward(
        groups(model),
        backend=backend,
        before_step=lambda p: held.append(sum(q.grad is not None for q in model.parameters())),
        **OPTIONS,
    )
    loss_at(model, 0).backward()
    assert held == [1] * 5, f"grads held at each hook call: {held}"  # 5 params get a grad at step 0
    assert all(p.grad is None for p in model.parameters())
    assert len(opt.state) == 5


def test_lr_schedulers_drive_it() -> None:
    # The scheduler changes param_groups[i]["lr"], read by each parameter's step; and the hooks mark
    # the optimizer as stepped, so the scheduler does not warn that it ran first.
    def scheduled(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.5**s, lambda s: 1.0 + s])

    model = Net()
    opt = adamw.step_in_backward(groups(model), backend="forloop", **OPTIONS)
    reference = Net()
    reference_opt = adamw.AdamW(groups(reference), backend="forloop", **OPTIONS)
    schedulers = [scheduled(opt), scheduled(reference_opt)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(STEPS):
            in_backward_run("forloop", range(step, step + 1), model, opt)
            standard_run("forloop", range(step, step + 1), reference, reference_opt)
            for scheduler in schedulers:
                scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == [1e-2 * 0.5**STEPS, 3e-2 * (1 + STEPS)]
    assert_same_run(opt, reference_opt, params(model), params(reference))


@pytest.mark.parametrize("state_format", STATE_FORMATS)
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("direction", ["in_backward->standard", "standard->in_backward"])
def test_checkpoints_move_between_standard_and_in_backward(backend: str, direction: str, state_format: str) -> None:
    # Same state_dict format (AdamW's), so a run can switch modes at a checkpoint, lr changes included.
    first, then = direction.split("->")
    run: dict[str, Callable[..., Any]] = {"standard": standard_run, "in_backward": in_backward_run}
    model, opt = run[first](backend, range(2), state_format=state_format)
    opt.param_groups[1]["lr"] = 0.05
    checkpoint = {"model": model.state_dict(), "opt": opt.state_dict()}

    resumed = Net()
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = (adamw.step_in_backward if then == "in_backward" else adamw.AdamW)(
        groups(resumed), backend=backend, **OPTIONS, **STATE_FORMATS[state_format]
    )
    resumed_opt.load_state_dict(checkpoint["opt"])
    run[then](backend, range(2, STEPS), resumed, resumed_opt)

    reference, reference_opt = standard_run(backend, range(2), state_format=state_format)
    reference_opt.param_groups[1]["lr"] = 0.05
    standard_run(backend, range(2, STEPS), reference, reference_opt)
    assert_same_run(resumed_opt, reference_opt, params(resumed), params(reference))


def test_a_module_gives_the_layout_of_adamw_over_its_parameters() -> None:
    model = Net()
    opt = adamw.step_in_backward(model, backend="foreach")
    loss_at(model, 0).backward()
    reference = Net()
    reference_opt = adamw.AdamW(reference.parameters(), backend="foreach")
    loss_at(reference, 0).backward()
    reference_opt.step()
    assert opt.state_dict()["param_groups"] == reference_opt.state_dict()["param_groups"]
    assert_same_run(opt, reference_opt, params(model), params(reference))


@pytest.mark.parametrize(
    "clip",
    [
        pytest.param(lambda p: torch.nn.utils.clip_grad_norm_(p, max_norm=0.05), id="norm per parameter"),
        pytest.param(lambda p: p.grad.clamp_(-0.01, 0.01), id="value"),
    ],
)
def test_before_step_clips_each_gradient_before_its_step(clip: Callable[[Tensor], Any]) -> None:
    model, opt = in_backward_run("forloop", range(STEPS), before_step=clip)
    reference = Net()
    reference_opt = adamw.AdamW(groups(reference), backend="forloop", **OPTIONS)
    for step in range(STEPS):
        loss_at(reference, step).backward()
        for p in reference.parameters():
            if p.grad is not None:
                clip(p)
        reference_opt.step()
        reference_opt.zero_grad()
    assert_same_run(opt, reference_opt, params(model), params(reference))
    unclipped, _ = in_backward_run("forloop", range(STEPS))
    assert not torch.equal(unclipped.hidden.weight, model.hidden.weight), "the clipping did nothing here"


def test_step_after_backward_raises() -> None:
    model, opt = in_backward_run("forloop", range(1))
    with pytest.raises(RuntimeError, match=r"stepped inside backward\(\)"):
        opt.step()


def test_grad_scaler_is_refused_with_the_reason() -> None:
    model = Net()
    opt = adamw.step_in_backward(model, backend="forloop")
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_at(model, 0)).backward()
    with pytest.raises(RuntimeError, match="GradScaler cannot drive a step in backward"):
        scaler.step(opt)


@pytest.mark.parametrize("backend", backend_params())
def test_remove_turns_it_back_into_a_standard_adamw(backend: str) -> None:
    model, opt = in_backward_run(backend, range(2))
    opt.remove()
    standard_run(backend, range(2, STEPS), model, opt)
    reference, reference_opt = standard_run(backend, range(STEPS))
    assert_same_run(opt, reference_opt, params(model), params(reference))


def test_added_param_groups_are_stepped_in_backward() -> None:
    model = Net()
    opt = adamw.step_in_backward([model.embed.weight], backend="forloop")
    opt.add_param_group({"params": [model.hidden.weight], "lr": 0.5})
    before = model.hidden.weight.detach().clone()
    loss_at(model, 0).backward()
    assert model.hidden.weight.grad is None and not torch.equal(model.hidden.weight, before)
    assert model.hidden.bias.grad is not None  # not in the optimizer: no hook, the grad stays


def test_step_hooks_do_not_run_once_per_parameter() -> None:
    # Step hooks mean "around a step of all parameters"; per-parameter steps are not that.
    model = Net()
    opt = adamw.step_in_backward(model, backend="forloop")
    calls: list[int] = []
    opt.register_step_pre_hook(lambda *args: calls.append(1))
    adamw.AdamW([torch.zeros(1)])  # wraps AdamW.step with torch's hook runner, as any AdamW does
    loss_at(model, 0).backward()
    assert calls == [] and len(opt.state) == 5


@pytest.mark.parametrize("state_precision", ["param", "8bit"])
def test_kernels_keep_a_table_per_param(monkeypatch: pytest.MonkeyPatch, state_precision: str) -> None:
    """In backward each param is its own group; the C kernels keep each one's table (here 300 of
    them) instead of rebuilding it every step."""
    from adamw.backends import cpu, cpu_low_bit

    builds: list[str] = []
    for module, name in ((cpu, "_build_plan"), (cpu_low_bit, "_build")):
        original = getattr(module, name)

        def counting(*args: Any, _original: Any = original, _name: str = name) -> Any:
            builds.append(_name)
            return _original(*args)

        monkeypatch.setattr(module, name, counting)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(72, 72) for _ in range(150)])
    opt = adamw.step_in_backward(model, fused=True, state_precision=state_precision)
    x = torch.randn(4, 72)
    for step in range(3):
        before = len(builds)
        model(x).square().mean().backward()
        assert all(p.grad is None for p in model.parameters())
        if step > 0:
            assert len(builds) == before, f"step {step + 1} rebuilt {len(builds) - before} tables"
    assert len(builds) == 300 and all(opt.state[p]["step"] == 3 for p in model.parameters())


@pytest.mark.parametrize("backend", backend_params())
def test_a_layer_frozen_when_built_and_unfrozen_later_is_stepped_as_adamw_steps_it(backend: str) -> None:
    # AdamW steps every param of its groups that holds a gradient, whether or not it required one
    # when the optimizer was built (groups() and model.parameters() include frozen params).
    model, opt = in_backward_run(backend, range(2))
    reference, reference_opt = standard_run(backend, range(2))
    for m in (model, reference):
        m.frozen.requires_grad_(True)
    in_backward_run(backend, range(2, STEPS), model, opt)
    standard_run(backend, range(2, STEPS), reference, reference_opt)
    assert model.frozen.weight.grad is None
    assert opt.state[model.frozen.weight]["step"].item() == STEPS - 2
    assert_same_run(opt, reference_opt, params(model), params(reference))


def test_params_that_cannot_require_grad_are_accepted() -> None:
    # Quantized weights (bitsandbytes' int8 Parameters) sit frozen in model.parameters(): they can
    # never get a gradient, so they need no hook, and AdamW accepts them.
    model = Net()
    model.codes = nn.Parameter(torch.zeros(4, dtype=torch.int8), requires_grad=False)
    opt = adamw.step_in_backward(model, backend="forloop")
    loss_at(model, 0).backward()
    assert len(opt.state) == 5 and model.codes not in opt.state


def clip_by_value(p: Tensor) -> None:
    """A before_step that pickles (a lambda does not)."""
    p.grad.clamp_(-0.01, 0.01)


def pickled(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = [pytest.param(copy.deepcopy, id="deepcopy"), pytest.param(pickled, id="pickle")]


@pytest.mark.parametrize("removed", [False, True], ids=["in_backward", "removed"])
@pytest.mark.parametrize("copy_of", COPIES)
def test_a_copy_of_model_and_optimizer_trains_as_the_original(copy_of: Callable[[Any], Any], removed: bool) -> None:
    # The copy hooks its own (copied) params, with the same before_step, frozen params included; a
    # copy taken after remove() is a standard AdamW, as the original.
    model, opt = in_backward_run("forloop", range(2), before_step=clip_by_value)
    if removed:
        opt.remove()
    copied_model, copied_opt = copy_of((model, opt))
    run = standard_run if removed else in_backward_run
    for m, o in ((model, opt), (copied_model, copied_opt)):
        m.frozen.requires_grad_(True)
        run("forloop", range(2, STEPS), m, o)
    assert all(p.grad is None for p in copied_model.parameters())
    assert copied_opt.state[copied_model.frozen.weight]["step"].item() == STEPS - 2
    assert_same_run(copied_opt, opt, params(copied_model), params(model))


@pytest.mark.parametrize("copy_of", COPIES)
def test_a_copy_in_a_low_bit_format_steps_and_takes_new_groups(copy_of: Callable[[Any], Any]) -> None:
    # A low-bit step numbers each param's rounding stream, which a copy holds from its first step on,
    # whichever param a step in backward reaches first.
    model, opt = in_backward_run("forloop", range(2), state_format="8bit")
    copied_model, copied_opt = copy_of((model, opt))
    for m, o in ((model, opt), (copied_model, copied_opt)):
        in_backward_run("forloop", range(2, STEPS), m, o)
    assert_same_run(copied_opt, opt, params(copied_model), params(model))
    copied_opt.add_param_group({"params": [nn.Parameter(torch.ones(3))]})
    assert copied_opt._streams[copied_opt.param_groups[-1]["params"][0]] == len(params(copied_model))


@pytest.mark.parametrize("copy_of", COPIES)
def test_a_copy_of_the_optimizer_alone_keeps_the_state_it_had(copy_of: Callable[[Any], Any]) -> None:
    # It holds copies of the params, as a copy of any torch optimizer does: later steps of the
    # original leave it as it was, and its state_dict() can restore the original.
    model, opt = in_backward_run("forloop", range(2))
    snapshot = copy_of(opt)
    in_backward_run("forloop", range(2, STEPS), model, opt)
    reference, reference_opt = standard_run("forloop", range(2))
    assert_same_run(snapshot, reference_opt, *(params_of(o) for o in (snapshot, reference_opt)))
    with pytest.raises(RuntimeError, match=r"stepped inside backward\(\)"):
        snapshot.step()
    opt.load_state_dict(snapshot.state_dict())
    assert opt.state[model.hidden.weight]["step"].item() == 2


def test_its_options_are_the_keyword_arguments_of_adamw() -> None:
    """step_in_backward's options are typed as AdamWOptions, which mypy checks against each call; the
    TypedDict must name every keyword of AdamW.__init__, with its type, and nothing else."""
    keywords = typing.get_type_hints(adamw.AdamW.__init__)
    del keywords["params"], keywords["return"]
    assert typing.get_type_hints(AdamWOptions) == keywords
    assert list(AdamWOptions.__annotations__) == list(keywords)  # in the constructor's order
