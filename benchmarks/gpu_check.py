"""GPU acceptance checks of the Triton backend (``fused=True`` on CUDA); run by benchmarks/gpu_check.sh.

1. capture: optimizer.step() (Tensor lr) captured in a CUDA graph and replayed over new grads must
   give the bits of the same eager steps; a whole training step (forward, backward with grads
   allocated inside the capture, the step) replayed must land within 1e-5 of the eager one.
2. speed: one step of torch.optim.AdamW (foreach, fused) and ours (fused=True), float32, on
   - one 256M-element tensor          (ours >= 0.95x torch fused)
   - GPT-2 small's 148 shapes         (ours >= 1.0x)
   - 1000 tensors of 32K elements     (ours >= 1.1x)
   and a device copy ``dst.copy_(src)`` of 1 GiB: ours must move >= 85% of its bytes per second.
   Bytes a step moves: float32 param, grad, exp_avg, exp_avg_sq read and param, exp_avg, exp_avg_sq
   written (7 x 4 bytes per element). Timing (as HeavyBall's step benchmark): warm-up, then windows
   of steps between synchronizations, the median window; implementations interleaved per round.
3. host: the host time of a step (no synchronization) of 1000 x 32K and GPT-2's shapes, ours and torch
   fused, and a profile of ours on 1000 x 32K: many small tensors wait for the host, not the GPU.
4. formats: our step in each storage format (float32, 8-bit and 4-bit moments on float32 params;
   bf16 params rounded to nearest, by stochastic rounding, with Kahan compensation, with 8-bit and
   4-bit moments) on one 256M-element tensor, against its own memory floor: the bytes that format
   must move (3 x the param's bytes + 2 x its state's) at the device copy's bandwidth. Reported, no
   verdict: "x floor" near 1 is a step at the memory limit.
5. tune: our float kernel's (BLOCK, num_warps) on the 256M and 1000 x 32K shapes, to pick the defaults
   in src/adamw/backends/triton.py (CUDA_BLOCK, CUDA_NUM_WARPS); then the low-bit kernel's (blocks per
   program, num_warps) on two formats (LOW_BIT_CUDA_BLOCKS, LOW_BIT_CUDA_NUM_WARPS).

Writes a JSON summary to --out (after each section, so that a run cut short keeps what it measured)
and prints PASS/FAIL per criterion; exits 1 if any fails.
``--smoke`` runs the speed and tune code on tiny CPU tensors under Triton's interpreter (no GPU, no
verdict): a check of this script itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if "--smoke" in sys.argv:
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")  # before adamw.backends.triton imports triton

import adamw  # noqa: E402
from adamw.backends import triton as triton_backend  # noqa: E402
from adamw.cli.bench.workloads import gpt2_shapes  # noqa: E402

DEVICE = "cpu" if "--smoke" in sys.argv else "cuda"

BYTES_PER_ELEMENT = 7 * 4


WORKLOADS: dict[str, tuple[list[tuple[int, ...]], float]] = {
    # name: (shapes, ours / torch fused speed ratio required)
    "one-256M": ([(256 * 2**20,)], 0.95),
    "gpt2-small": (gpt2_shapes(), 1.0),
    "1000x32K": ([(32 * 1024,)] * 1000, 1.1),
}


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def workloads() -> dict[str, tuple[list[tuple[int, ...]], float]]:
    if DEVICE == "cuda":
        return WORKLOADS
    return {"one-256M": ([(300,)], 0.0), "gpt2-small": ([(3, 40), (40,)], 0.0), "1000x32K": ([(50,)] * 4, 0.0)}


def timed(step: Callable[[], None], *, warmup: int = 3, window: int = 10, windows: int = 7) -> float:
    """Median seconds per step over ``windows`` windows of ``window`` steps (host time included)."""
    if DEVICE == "cpu":
        warmup, window, windows = 1, 1, 1
    for _ in range(warmup):
        step()
    sync()
    samples = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(window):
            step()
        sync()
        samples.append((time.perf_counter() - start) / window)
    return statistics.median(samples)


def copy_bandwidth(nbytes: int = 2**30) -> float:
    src = torch.randn(nbytes // 4, device=DEVICE)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), window=20)
    return 2 * nbytes / seconds


def make_params(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, device=DEVICE, generator=gen).requires_grad_()
        p.grad = torch.randn(shape, device=DEVICE, generator=gen) * 1e-2
        params.append(p)
    return params


def ours(params: list[torch.Tensor], **options: Any) -> adamw.AdamW:
    """fused=True: on CUDA, our Triton kernel (on the CPU it would pick the C kernel)."""
    if DEVICE == "cuda":
        return adamw.AdamW(params, lr=1e-3, fused=True, **options)
    return adamw.AdamW(params, lr=1e-3, backend="triton", **options)


IMPLEMENTATIONS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "torch-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "torch-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "ours-fused": lambda ps: ours(ps),
}


def speed(results: dict[str, Any], failures: list[str]) -> None:
    bandwidth = copy_bandwidth(2**30 if DEVICE == "cuda" else 2**20)
    results["copy_bandwidth_GBps"] = bandwidth / 1e9
    print(f"device copy: {bandwidth / 1e9:.0f} GB/s")
    for name, (shapes, required) in workloads().items():
        params = make_params(shapes)
        numel = sum(p.numel() for p in params)
        seconds: dict[str, float] = {}
        optimizers = {impl: make(params) for impl, make in IMPLEMENTATIONS.items()}
        for _round in range(2):  # interleaved, the second round counts
            for impl, optimizer in optimizers.items():
                seconds[impl] = timed(optimizer.step)
        del optimizers
        free()
        ratio = seconds["torch-fused"] / seconds["ours-fused"]
        achieved = numel * BYTES_PER_ELEMENT / seconds["ours-fused"]
        results[name] = {
            "tensors": len(shapes),
            "numel": numel,
            **{f"{impl}_ms": s * 1e3 for impl, s in seconds.items()},
            "speedup_vs_torch_fused": ratio,
            "bandwidth_fraction": achieved / bandwidth,
        }
        line = ", ".join(f"{impl} {s * 1e3:.3f} ms" for impl, s in seconds.items())
        print(f"{name}: {line}; ours/torch-fused speed {ratio:.3f}x; {achieved / bandwidth:.1%} of copy bandwidth")
        if ratio < required:
            failures.append(f"{name}: {ratio:.3f}x torch fused < {required}x")
        if name == "one-256M" and achieved / bandwidth < 0.85:
            failures.append(f"{name}: {achieved / bandwidth:.1%} of copy bandwidth < 85%")
        del params
        free()


def host(results: dict[str, Any]) -> None:
    """Where a step of many small tensors spends its time: the host code alone (steps timed without a
    synchronization; the GPU runs behind), ours against torch's fused step, and a profile of ours."""
    import cProfile
    import io
    import pstats

    table: dict[str, dict[str, float]] = {}
    for name in ("1000x32K", "gpt2-small"):
        params = make_params(workloads()[name][0])
        table[name] = {}
        for impl in ("torch-fused", "ours-fused"):
            optimizer = IMPLEMENTATIONS[impl](params)
            for _ in range(5):
                optimizer.step()
            sync()
            rounds = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(10):
                    optimizer.step()
                rounds.append((time.perf_counter() - start) / 10)
                sync()
            table[name][f"{impl}_host_ms"] = min(rounds) * 1e3
            if name == "1000x32K" and impl == "ours-fused":
                profile = cProfile.Profile()
                profile.enable()
                for _ in range(10):
                    optimizer.step()
                profile.disable()
                sync()
                out = io.StringIO()
                pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(15)
                print(out.getvalue())
            del optimizer
        print(f"host {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in table[name].items()))
        del params
        free()
    results["host"] = table


# name: (param dtype, AdamW options)
FORMATS: dict[str, tuple[torch.dtype, dict[str, str]]] = {
    "float32": (torch.float32, {}),
    "float32, 8-bit moments": (torch.float32, {"state_precision": "8bit"}),
    "float32, 4-bit moments": (torch.float32, {"state_precision": "4bit"}),
    "bf16": (torch.bfloat16, {}),
    "bf16 stochastic": (torch.bfloat16, {"param_update": "stochastic"}),
    "bf16 kahan": (torch.bfloat16, {"param_update": "kahan"}),
    "bf16 stochastic, 8-bit moments": (torch.bfloat16, {"state_precision": "8bit", "param_update": "stochastic"}),
    "bf16 stochastic, 4-bit moments": (torch.bfloat16, {"state_precision": "4bit", "param_update": "stochastic"}),
}


def format_param(dtype: torch.dtype) -> torch.Tensor:
    """The one tensor the format sections step: 256M values (on the CPU 8192: just over the 4-bit
    threshold), with its grad."""
    numel = 256 * 2**20 if DEVICE == "cuda" else 8192
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    param = torch.randn(numel, device=DEVICE, generator=gen).to(dtype).requires_grad_()
    param.grad = (torch.randn(numel, device=DEVICE, generator=gen) * 1e-2).to(dtype)
    return param


def formats(results: dict[str, Any]) -> None:
    """Each storage format's step on one tensor against the bytes it must move at copy bandwidth."""
    bandwidth = results.get("copy_bandwidth_GBps", 0) * 1e9 or copy_bandwidth(2**30 if DEVICE == "cuda" else 2**20)
    table: dict[str, dict[str, float]] = {}
    for name, (dtype, options) in FORMATS.items():
        param = format_param(dtype)
        numel = param.numel()
        optimizer = ours([param], **options)
        optimizer.step()  # the state exists from here on
        state = [t for t in optimizer.state[param].values() if torch.is_tensor(t) and t.dim() > 0]
        moved = 3 * param.numel() * param.element_size() + 2 * sum(t.numel() * t.element_size() for t in state)
        seconds = timed(optimizer.step)
        floor = moved / bandwidth
        table[name] = {"ms": seconds * 1e3, "bytes_per_value": moved / numel, "x_floor": seconds / floor}
        print(
            f"format {name}: {seconds * 1e3:.3f} ms, {moved / numel:.2f} B/value, "
            f"{moved / seconds / 1e9:.0f} GB/s, {seconds / floor:.2f}x its floor"
        )
        del optimizer, param, state
        free()
    results["formats"] = table


def sweep(
    section: str, name: str, optimizer: adamw.AdamW, knobs: dict[str, str], configs: list[tuple[int, int]]
) -> dict[str, float]:
    """ms per step of ``optimizer`` with the backend's two launch-shape constants (``knobs``: label ->
    attribute of adamw.backends.triton) set to each of ``configs``; the constants are restored after."""
    attributes = list(knobs.values())
    defaults = [getattr(triton_backend, attribute) for attribute in attributes]
    table: dict[str, float] = {}
    for config in configs:
        for attribute, value in zip(attributes, config, strict=True):
            setattr(triton_backend, attribute, value)
        triton_backend.clear_plans()  # a plan's chunk map depends on the values per program
        ms = timed(optimizer.step) * 1e3
        labels = [f"{label}={value}" for label, value in zip(knobs, config, strict=True)]
        table[",".join(labels)] = ms
        print(f"{section} {name}: {' '.join(labels)}: {ms:.3f} ms")
    for attribute, value in zip(attributes, defaults, strict=True):
        setattr(triton_backend, attribute, value)
    triton_backend.clear_plans()
    return table


FLOAT_KNOBS = {"BLOCK": "CUDA_BLOCK", "num_warps": "CUDA_NUM_WARPS"}
FLOAT_CONFIGS = [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)]


def tune(results: dict[str, Any]) -> None:
    table: dict[str, dict[str, float]] = {}
    for name in ("one-256M", "1000x32K"):
        params = make_params(workloads()[name][0])
        table[name] = sweep("tune", name, ours(params), FLOAT_KNOBS, FLOAT_CONFIGS)
        del params
        free()
    results["tune_ms"] = table


# The low-bit kernel's launch shape: (256-value blocks per program, num_warps), on the formats that
# move the fewest and the most bytes per value among the low-bit ones.
LOW_BIT_KNOBS = {"blocks": "LOW_BIT_CUDA_BLOCKS", "num_warps": "LOW_BIT_CUDA_NUM_WARPS"}
LOW_BIT_CONFIGS = [(2, 4), (4, 4), (8, 4), (4, 8), (8, 8), (16, 8)]
LOW_BIT_TUNED = ["bf16 stochastic, 8-bit moments", "float32, 4-bit moments"]


def tune_low_bit(results: dict[str, Any]) -> None:
    table: dict[str, dict[str, float]] = {}
    for name in LOW_BIT_TUNED:
        dtype, options = FORMATS[name]
        param = format_param(dtype)
        table[name] = sweep("tune-low-bit", name, ours([param], **options), LOW_BIT_KNOBS, LOW_BIT_CONFIGS)
        del param
        free()
    results["tune_low_bit_ms"] = table


def capture(results: dict[str, Any], failures: list[str]) -> None:
    """Two captures: optimizer.step() alone over GPT-2-like shapes (replays must give the eager bits),
    and a whole training step whose grads are allocated inside the capture (close to eager: cuBLAS may
    pick other matmul kernels under capture)."""
    shapes = gpt2_shapes()[2:26]  # two transformer blocks' worth of shapes
    gen = torch.Generator(device="cuda").manual_seed(0)
    init = [torch.randn(shape, device="cuda", generator=gen) for shape in shapes]
    grads = [[torch.randn(shape, device="cuda", generator=gen) for shape in shapes] for _ in range(6)]
    lrs = [3e-3, 1e-3, 3e-3, 2e-3, 1e-4, 3e-3]

    def make_optimizer() -> tuple[list[torch.Tensor], adamw.AdamW, torch.Tensor]:
        params = [p.clone().requires_grad_() for p in init]
        lr = torch.tensor(lrs[0], device="cuda")
        return params, adamw.AdamW(params, lr=lr, weight_decay=0.1, fused=True, capturable=True), lr

    eager_params, eager_optimizer, eager_lr = make_optimizer()
    for k in range(6):
        for p, g in zip(eager_params, grads[k], strict=True):
            p.grad = g.clone()
        eager_lr.fill_(lrs[k])
        eager_optimizer.step()
    params, optimizer, lr = make_optimizer()
    for p, g in zip(params, grads[0], strict=True):
        p.grad = g.clone()
    optimizer.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step()
    for k in range(1, 6):
        for p, g in zip(params, grads[k], strict=True):
            p.grad.copy_(g)
        lr.fill_(lrs[k])
        graph.replay()
    torch.cuda.synchronize()
    bitwise = all(
        torch.equal(p, q)
        and all(torch.equal(optimizer.state[p][k], eager_optimizer.state[q][k]) for k in optimizer.state[p])
        for p, q in zip(params, eager_params, strict=True)
    )
    results["captured_step_bitwise_equals_eager"] = bitwise
    print(f"capture of step(): 5 replays {'==' if bitwise else '!='} eager steps (params and states, bitwise)")
    if not bitwise:
        failures.append("a captured optimizer step did not replay to the eager bits")

    inputs = [torch.randn(64, 256, device="cuda", generator=gen) for _ in range(6)]

    def make_model() -> tuple[torch.nn.Module, adamw.AdamW]:
        torch.manual_seed(1)
        layers = [torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256), torch.nn.LayerNorm(256)]
        model = torch.nn.Sequential(*layers).cuda()
        lr = torch.tensor(3e-3, device="cuda")
        return model, adamw.AdamW(model.parameters(), lr=lr, weight_decay=0.1, fused=True, capturable=True)

    def loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x).square().mean()

    eager_model, eager_opt = make_model()
    for x in inputs:
        eager_opt.zero_grad(set_to_none=True)
        loss(eager_model, x).backward()
        eager_opt.step()
    model, opt = make_model()
    static_x = inputs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # torch's warm-up recipe: an eager step on a side stream
        opt.zero_grad(set_to_none=True)
        loss(model, static_x).backward()
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)  # grads of the captured backward come from the graph's pool
    with torch.cuda.graph(graph):
        loss(model, static_x).backward()
        opt.step()
    for x in inputs[1:]:
        static_x.copy_(x)
        graph.replay()
    torch.cuda.synchronize()
    pairs = list(zip(model.parameters(), eager_model.parameters(), strict=True))
    bitwise = all(torch.equal(p, q) for p, q in pairs)
    worst = max(((p - q).abs().max() / q.abs().max()).item() for p, q in pairs)
    results["captured_training_step"] = {"bitwise": bitwise, "max_relative_difference": worst}
    print(f"capture of a training step: 5 replays vs eager: bitwise {bitwise}, max relative difference {worst:.2e}")
    if worst > 1e-5:
        failures.append(f"a captured training step replayed {worst:.2e} away from the eager result")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check_out")
    parser.add_argument(
        "--skip", default="", help="comma list of {capture,speed,host,formats,tune,tune-low-bit} to skip"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny CPU tensors under the interpreter")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.smoke:
        skip.add("capture")
    else:
        assert torch.cuda.is_available(), "needs a CUDA GPU"
    import triton

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "CUDA_BLOCK": triton_backend.CUDA_BLOCK,
        "CUDA_NUM_WARPS": triton_backend.CUDA_NUM_WARPS,
    }
    print(json.dumps(results))
    failures: list[str] = []
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section: a run cut short by its time limit keeps what it measured
        results["failures"] = failures
        results["seconds"] = time.perf_counter() - started
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2))

    for name, check in (("capture", capture), ("speed", speed)):
        if name not in skip:
            check(results, failures)
            save()
    if "host" not in skip:
        host(results)
        save()
    for name, section in (("formats", formats), ("tune", tune), ("tune-low-bit", tune_low_bit)):
        if name not in skip:
            section(results)
            save()
    if args.smoke:
        print("smoke run done (no verdict)")
        return 0
    print("FAIL:\n  " + "\n  ".join(failures) if failures else "PASS: every acceptance criterion")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
