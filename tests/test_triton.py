"""The Triton kernel (backend "triton", ``fused=True`` on CUDA): what is Triton's own. Its accuracy
against the float64 reference and torch is test_reference.py's, its GradScaler contract
test_grad_scaler.py's; here its rounding, hyper-parameters as device tensors, the plan cache,
DTensors and complex params, the GPU compiler's output, and (on a GPU only) graph capture.

Where no GPU is, the kernel runs on CPU tensors under Triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1``): the kernel source a GPU runs, executed in numpy, slowly. Tensors are tiny;
the interpreter's chunk is ``INTERPRETER_BLOCK`` (128) elements, so they still span full and partial
chunks. Tests marked ``requires_cuda`` run on a GPU only (benchmarks/gpu_check.sh runs this file there).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

pytest.importorskip("triton")

import adamw  # noqa: E402
from _helpers import CLOSE, assert_bitwise, leaves  # noqa: E402
from adamw._math import ReferenceState, reference_step  # noqa: E402
from adamw.backends import triton as triton_backend  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)", allow_module_level=True)

STEPS = 3
HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8)

# --------------------------------------------------------------------------------------------------
# helpers


def make_params(dtype: torch.dtype, seed: int = 0) -> list[Tensor]:
    """Awkward shapes: several chunks with a partial one, exactly one chunk, 0-d, empty, a transposed
    view (dense: run in place), a strided slice (not dense: run through copies)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:  # on the device, so that the views below stay views there
        return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)

    return [randn(300), randn(), randn(0), randn(128), randn(40, 7).t(), randn(12, 30)[:, ::3], randn(5, 6)]


def make_grads(params: list[Tensor], steps: int, seed: int = 1) -> list[list[Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        grads = []
        for p in params:
            g = torch.randn(p.shape, generator=gen).to(p.dtype).to(DEVICE)
            if p.dim() == 2 and p.stride(0) == 1:  # the transposed view: a grad laid out alike
                g = g.t().contiguous().t()
            grads.append(g)
        grads[-1] = grads[-1].t().contiguous().t()  # a contiguous param with a transposed grad
        out.append(grads)
    return out


def run(
    make_optimizer: Callable[[list[Tensor]], Any], init: list[Tensor], grads: list[list[Tensor]]
) -> tuple[list[Tensor], Any]:
    params = leaves(init, DEVICE)
    optimizer = make_optimizer(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    return params, optimizer


def ours(**options: Any) -> Callable[[list[Tensor]], Any]:
    return lambda params: adamw.AdamW(params, backend="triton", **{**HYPER, **options})


def state_of(params: list[Tensor], optimizer: Any, key: str) -> list[Tensor]:
    if key == "param":
        return [p.detach().cpu() for p in params]
    return [optimizer.state[p][key].cpu() for p in params]


STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")


# --------------------------------------------------------------------------------------------------
# rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bfloat16_and_half_round_to_nearest_even(dtype: torch.dtype) -> None:
    """One step from zero states: exp_avg_sq = (1 - beta2) * g * g (exact in float32), rounded once to
    the storage dtype to nearest even, as torch rounds."""
    g = torch.randn(1000, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    p = torch.zeros(1000, dtype=dtype, device=DEVICE, requires_grad=True)
    optimizer = adamw.AdamW([p], backend="triton", lr=0.0, weight_decay=0.0, betas=(0.75, 0.5))
    p.grad = g.clone()
    optimizer.step()
    g32 = g.float()
    assert torch.equal(optimizer.state[p]["exp_avg"], (0.25 * g32).to(dtype))
    assert torch.equal(optimizer.state[p]["exp_avg_sq"], (0.5 * g32 * g32).to(dtype))


# --------------------------------------------------------------------------------------------------
# hyper-parameters as tensors


def test_tensor_lr_reads_device_memory_and_follows_a_schedule() -> None:
    """A float64 Tensor lr gives the bits of the same Python float, step after step, as it changes."""
    init = make_params(torch.float32)
    grads = make_grads(init, STEPS)
    lr = torch.tensor(1e-2, dtype=torch.float64, device=DEVICE)
    schedule = [1e-2, 3e-3, 5e-2]

    params = leaves(init, DEVICE)
    optimizer = adamw.AdamW(params, backend="triton", lr=lr)
    float_params = leaves(init, DEVICE)
    float_optimizer = adamw.AdamW(float_params, backend="triton", lr=1e-2)
    for k in range(STEPS):
        lr.fill_(schedule[k])
        float_optimizer.param_groups[0]["lr"] = schedule[k]
        for p, q, g in zip(params, float_params, grads[k], strict=True):
            p.grad = g.clone()
            q.grad = g.clone()
        optimizer.step()
        float_optimizer.step()
    for key in STATE_KEYS:
        for i, (a, b) in enumerate(
            zip(state_of(params, optimizer, key), state_of(float_params, float_optimizer, key), strict=True)
        ):
            assert_bitwise(a, b, f"{key} of param {i}")


def test_tensor_betas_on_device_match_float_betas() -> None:
    init = make_params(torch.float32)
    grads = make_grads(init, STEPS)
    betas = (
        torch.tensor(0.9, dtype=torch.float64, device=DEVICE),
        torch.tensor(0.999, dtype=torch.float64, device=DEVICE),
    )
    params, optimizer = run(lambda ps: adamw.AdamW(ps, backend="triton", lr=1e-2, betas=betas), init, grads)
    float_params, float_optimizer = run(ours(), init, grads)
    for key in STATE_KEYS:
        for a, b in zip(state_of(params, optimizer, key), state_of(float_params, float_optimizer, key), strict=True):
            CLOSE["triton, tensor betas vs float betas"].assert_close(a, b, key)


# --------------------------------------------------------------------------------------------------
# the plan cache


def test_plan_is_reused_while_tensors_stay_and_rebuilt_when_they_change() -> None:
    init = make_params(torch.float32)[:4]
    grads = make_grads(init, 4)
    params = leaves(init, DEVICE)
    optimizer = adamw.AdamW(params, backend="triton", **HYPER)
    ref = [ReferenceState.from_param(p.cpu()) for p in init]

    def step(k: int, grad_tensors: list[Tensor]) -> None:
        for p, g in zip(params, grad_tensors, strict=True):
            p.grad = g
        optimizer.step()
        for r, g in zip(ref, grads[k], strict=True):
            reference_step(
                r, g.cpu(), lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False
            )
        for p, r in zip(params, ref, strict=True):
            CLOSE["triton vs float64 reference, float32"].assert_close(p.detach().cpu().double(), r.param)

    def built_and_found(k: int, grad_tensors: list[Tensor]) -> tuple[int, int]:
        before = triton_backend._plans.cache_info()
        step(k, grad_tensors)
        after = triton_backend._plans.cache_info()
        return after.misses - before.misses, after.hits - before.hits

    kept = [g.clone() for g in grads[0]]
    assert built_and_found(0, kept) == (1, 0)
    for g, new in zip(kept, grads[1], strict=True):
        g.copy_(new)  # same grad tensors, new values: the plan is reused
    assert built_and_found(1, kept) == (0, 1)
    # new grad tensors (the old ones are alive: new addresses)
    assert built_and_found(2, [g.clone() for g in grads[2]]) == (1, 0)
    params[0].data = params[0].data.clone()  # a param moved in memory
    assert built_and_found(3, [g.clone() for g in grads[3]]) == (1, 0)


def test_small_plans_are_kept_for_a_whole_model() -> None:
    """A step in backward makes a group, so a plan, of every param: under the default limits every
    param's plan is found again on the next step."""
    params = [torch.zeros(3, device=DEVICE, requires_grad=True) for _ in range(3 * triton_backend._plans.recent)]
    optimizer = adamw.AdamW([{"params": [p]} for p in params], backend="triton")
    for p in params:
        p.grad = torch.ones(3, device=DEVICE)
    optimizer.step()
    before = triton_backend._plans.cache_info()
    optimizer.step()
    after = triton_backend._plans.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (len(params), 0)


def test_plans_a_graph_capture_uses_are_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan found or built while a CUDA graph is captured stays, found or not (the graph's replays
    read its table). Capture is faked: its CUDA calls cannot run here."""
    p = torch.zeros(3, device=DEVICE, requires_grad=True)
    p.grad = torch.ones(3, device=DEVICE)
    optimizer = adamw.AdamW([p], backend="triton")
    optimizer.step()
    before = triton_backend._plans.cache_info()
    monkeypatch.setattr(triton_backend, "_is_capturing", lambda device: True)
    optimizer.step()  # found
    _old_grad, p.grad = p.grad, torch.ones(3, device=DEVICE)  # alive: the new grad has a new address
    optimizer.step()  # built in its place
    after = triton_backend._plans.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (1, 1)
    assert (after.pinned - before.pinned, after.plans - before.plans) == (2, 1)


# --------------------------------------------------------------------------------------------------
# other tensors: DTensor (FSDP2), complex, wrong step counters


@pytest.fixture
def single_rank_group() -> Any:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("nccl" if CUDA else "gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh(DEVICE.type, (1,))
    finally:
        dist.destroy_process_group()


def test_dtensor_params_step_their_local_shards(single_rank_group: Any) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    init = [p for p in make_params(torch.float32) if p.is_contiguous() and p.dim() == 1]
    grads = make_grads(init, 2)
    params = [torch.nn.Parameter(distribute_tensor(p.clone(), single_rank_group, [Shard(0)])) for p in init]
    optimizer = adamw.AdamW(params, backend="triton", **HYPER)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = distribute_tensor(g.clone(), single_rank_group, [Shard(0)])
        optimizer.step()
    plain_params, plain_optimizer = run(ours(), init, grads)
    for p, q in zip(params, plain_params, strict=True):
        assert torch.equal(p.to_local(), q.detach())
        assert torch.equal(optimizer.state[p]["exp_avg_sq"].to_local(), plain_optimizer.state[q]["exp_avg_sq"])


def test_complex_params_step_as_real_pairs() -> None:
    params = [
        torch.randn(70, dtype=torch.complex64, device=DEVICE),
        torch.randn(3, 2, dtype=torch.complex64, device=DEVICE),
    ]
    grads = [torch.randn_like(p) for p in params]

    def functional(backend: str) -> list[Tensor]:
        ps = [p.clone() for p in params]
        states = [[torch.zeros_like(p) for p in ps] for _ in range(2)]
        steps = [torch.zeros((), device=DEVICE) for _ in ps]
        adamw.adamw(
            ps,
            [g.clone() for g in grads],
            *states,
            [],
            steps,
            lr=1e-2,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=1e-2,
            has_complex=True,
            backend=backend,
        )
        return ps

    for a, b in zip(functional("triton"), functional("forloop"), strict=True):
        CLOSE["triton vs for-loop, complex64"].assert_close(a, b)


def test_step_counter_on_the_wrong_device_or_dtype_is_an_error() -> None:
    p = torch.zeros(3, device=DEVICE, requires_grad=True)
    optimizer = adamw.AdamW([p], backend="triton")
    p.grad = torch.ones(3, device=DEVICE)
    optimizer.step()
    optimizer.state[p]["step"] = optimizer.state[p]["step"].double()
    with pytest.raises(RuntimeError, match="float32 scalar"):
        optimizer.step()


def test_package_works_without_triton() -> None:
    """Triton is an extra: without it adamw imports and steps; the Triton backend says what to install."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # any "import triton" now fails as if it were not installed
        import torch, adamw
        p = torch.zeros(3, requires_grad=True)
        p.grad = torch.ones(3)
        adamw.AdamW([p]).step()
        q = torch.zeros(3, requires_grad=True)
        q.grad = torch.ones(3)
        try:
            adamw.AdamW([q], backend="triton").step()
        except RuntimeError as error:
            assert "adamw[triton]" in str(error), error
        else:
            raise AssertionError("no error without triton")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# --------------------------------------------------------------------------------------------------
# compiled for a GPU (no GPU needed: Triton compiles to PTX and cubin on the CPU)

_COMPILE_CHECK = textwrap.dedent(
    """
    import os, re
    os.environ.pop("TRITON_INTERPRET", None)
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from adamw.backends import _triton_kernels as K, triton as backend

    def compile(fn, signature, constants, num_warps):
        for name in constants:
            signature.setdefault(name, "constexpr")
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants, attrs={(0,): [["tt.divisibility", 16]]})
        options = {"num_warps": num_warps, "enable_fp_fusion": backend.FP_FUSION}
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

    def adamw_ptx(dtype, aligned, amsgrad=False, device_scalars=False, scaler=False):
        floats = {n: "fp64" for n in ["lr", "beta1", "beta2", "log_beta1", "log_beta2", "eps", "weight_decay"]}
        signature = {"table_ptr": "*i64", "chunk_tensor_ptr": "*i32", **floats}
        constants = dict(BLOCK=backend.CUDA_BLOCK, AMSGRAD=amsgrad, MAXIMIZE=True, HAS_WEIGHT_DECAY=True,
                         LR_ON_DEVICE=device_scalars, BETAS_ON_DEVICE=device_scalars, HAS_GRAD_SCALE=scaler,
                         HAS_FOUND_INF=scaler, ALIGNED=aligned, DTYPE=dtype,
                         ACC=tl.float64 if dtype == tl.float64 else tl.float32)
        for name, on in [("lr_ptr", device_scalars), ("beta1_ptr", device_scalars), ("beta2_ptr", device_scalars),
                         ("grad_scale_ptr", scaler), ("found_inf_ptr", scaler)]:
            if on:
                signature[name] = "*fp32"
            else:
                constants[name] = None
        return compile(K.adamw_kernel, signature, constants, backend.CUDA_NUM_WARPS)

    floats = {p.name: p.annotation_type for p in K.adamw_kernel.params if p.name in ("lr", "beta2", "eps")}
    assert set(floats.values()) == {"fp64"}, f"hyper-parameters must reach the kernel as doubles: {floats}"
    ptx = adamw_ptx(tl.float32, aligned=True)
    assert re.search(r"ld\\.global(\\.\\w+)*\\.v4\\.b32", ptx), "aligned float32 chunks must use 128-bit loads"
    assert re.search(r"st\\.global(\\.\\w+)*\\.v4\\.b32", ptx), "aligned float32 chunks must use 128-bit stores"
    assert not re.search(r"\\.v4\\.", adamw_ptx(tl.float32, aligned=False)), "unaligned tensors must not"
    assert re.search(r"ld\\.global(\\.\\w+)*\\.v4\\.b32", adamw_ptx(tl.bfloat16, aligned=True))
    for scaler in (False, True):  # no contracted float32 multiply-add, which would round as the compiler picks
        ptx = adamw_ptx(tl.float32, aligned=True, amsgrad=True, scaler=scaler)
        assert not re.search(r"\\bfma\\.rn\\.f32", ptx), "a float32 multiply-add was contracted"
        assert not re.search(r"\\b(mul|add|sub)\\.f32", ptx), "float32 arithmetic ptxas may still contract"
    adamw_ptx(tl.float16, aligned=True, amsgrad=True, device_scalars=True, scaler=True)
    adamw_ptx(tl.float64, aligned=True, amsgrad=True, device_scalars=True, scaler=True)
    compile(K.bump_steps_kernel, {"table_ptr": "*i64", "found_inf_ptr": "*fp32", "n_tensors": "i32"},
            dict(HAS_FOUND_INF=True, BLOCK=1024), 4)
    print("ok")
    """
)


def test_kernels_compile_for_hopper_with_vector_accesses() -> None:
    """The real compiler (not the interpreter) accepts every variant, for sm_90 as on an H100, and
    the alignment facts reach it: aligned chunks load and store 128 bits at a time."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas) and shutil.which("ptxas") is None:
        pytest.skip("no ptxas to compile for a GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_CHECK], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# --------------------------------------------------------------------------------------------------
# GPU only


@requires_cuda
def test_captured_step_replays_the_eager_steps_bitwise() -> None:
    """optimizer.step() captured once (Tensor lr, grad_scale, found_inf read on the device) and
    replayed over new grads, lr values and found_inf flags gives the bits of the same eager steps."""
    init = [torch.randn(3000, device="cuda"), torch.randn(64, 33, device="cuda"), torch.randn((), device="cuda")]
    grads = [[torch.randn_like(p) for p in init] for _ in range(5)]
    lrs = [1e-2, 5e-3, 2e-2, 1e-3, 1e-2]
    found = [0.0, 0.0, 1.0, 0.0, 0.0]

    def make() -> tuple[list[Tensor], adamw.AdamW, Tensor]:
        params = [p.clone().requires_grad_() for p in init]
        lr = torch.tensor(lrs[0], device="cuda")
        optimizer = adamw.AdamW(params, lr=lr, fused=True, capturable=True, amsgrad=True, weight_decay=0.1)
        optimizer.grad_scale = torch.tensor(4.0, device="cuda")
        optimizer.found_inf = torch.tensor(0.0, device="cuda")
        return params, optimizer, lr

    eager_params, eager_optimizer, eager_lr = make()
    for k in range(5):
        for p, g in zip(eager_params, grads[k], strict=True):
            p.grad = g * 4.0
        eager_lr.fill_(lrs[k])
        eager_optimizer.found_inf.fill_(found[k])
        eager_optimizer.step()

    params, optimizer, lr = make()
    for p, g in zip(params, grads[0], strict=True):
        p.grad = g * 4.0
    optimizer.step()  # the warm-up step is step 0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step()
    for k in range(1, 5):
        for p, g in zip(params, grads[k], strict=True):
            p.grad.copy_(g * 4.0)
        lr.fill_(lrs[k])
        optimizer.found_inf.fill_(found[k])
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(params, eager_params, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(p.grad, q.grad)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], eager_optimizer.state[q][key]), key
        assert optimizer.state[p]["step"].item() == 4.0


@requires_cuda
def test_captured_training_step_replays_the_eager_steps() -> None:
    """A whole training step captured (forward, backward whose grads are allocated inside the capture,
    so the step needs a new table there) and replayed lands where the same eager steps do."""
    torch.manual_seed(0)
    inputs = [torch.randn(16, 32, device="cuda") for _ in range(5)]

    def make() -> tuple[torch.nn.Module, adamw.AdamW]:
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 3)).cuda()
        optimizer = adamw.AdamW(model.parameters(), lr=torch.tensor(1e-2, device="cuda"), fused=True, capturable=True)
        return model, optimizer

    eager_model, eager_optimizer = make()
    for x in inputs:
        eager_optimizer.zero_grad(set_to_none=True)
        eager_model(x).square().mean().backward()
        eager_optimizer.step()

    model, optimizer = make()
    static_x = inputs[0].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # torch's warm-up recipe: an eager step on a side stream
        optimizer.zero_grad(set_to_none=True)
        model(static_x).square().mean().backward()
        optimizer.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        model(static_x).square().mean().backward()
        optimizer.step()
    for x in inputs[1:]:
        static_x.copy_(x)
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), eager_model.parameters(), strict=True):
        CLOSE["captured training vs eager"].assert_close(p, q)
        torch.testing.assert_close(optimizer.state[p]["exp_avg_sq"], eager_optimizer.state[q]["exp_avg_sq"])
        assert optimizer.state[p]["step"].item() == len(inputs)


@requires_cuda
def test_lr_changes_never_recompile() -> None:
    from adamw.backends import _triton_kernels as kernels

    def compiled() -> int:
        return sum(len(entry[0]) for entry in kernels.adamw_kernel.device_caches.values())

    p = torch.randn(5000, device="cuda", requires_grad=True)
    optimizer = adamw.AdamW([p], fused=True)
    p.grad = torch.randn_like(p)
    optimizer.step()
    before = compiled()
    for lr in (1e-4, 3e-2, 0.5, 1.0):
        optimizer.param_groups[0]["lr"] = lr
        optimizer.step()
    assert compiled() == before


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_tensors_close_to_torch_fused(dtype: torch.dtype) -> None:
    """Many full chunks and partial ones on the GPU, against torch's fused kernel: one group of
    16-byte aligned tensors (vector accesses), one with a view that starts 2 bytes in (scalar ones)."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def make() -> list[list[Tensor]]:
        base = torch.randn(2**20 + 9, device="cuda", generator=gen).to(dtype)
        unaligned = base[1 : 2**20 + 4]
        aligned = [
            torch.randn(2**20 + 3, device="cuda", generator=gen).to(dtype),
            torch.randn(1000, 77, device="cuda", generator=gen).to(dtype),
        ]
        return [[p.requires_grad_() for p in aligned], [unaligned.requires_grad_()]]

    groups = make()
    torch_groups = [[p.detach().clone().requires_grad_() for p in group] for group in groups]
    optimizer = adamw.AdamW([{"params": g} for g in groups], backend="triton", amsgrad=True, **HYPER)
    torch_optimizer = torch.optim.AdamW([{"params": g} for g in torch_groups], fused=True, amsgrad=True, **HYPER)
    for _ in range(3):
        for group, torch_group in zip(groups, torch_groups, strict=True):
            for p, q in zip(group, torch_group, strict=True):
                p.grad = torch.randn(p.shape, device="cuda", generator=gen).to(dtype)
                q.grad = p.grad.clone()
        optimizer.step()
        torch_optimizer.step()
    tol = CLOSE[f"triton vs torch's fused on a GPU, {str(dtype).removeprefix('torch.')}"]
    params = [p for g in groups for p in g]
    torch_params = [p for g in torch_groups for p in g]
    for key in STATE_KEYS + ("max_exp_avg_sq",):
        for a, b in zip(state_of(params, optimizer, key), state_of(torch_params, torch_optimizer, key), strict=True):
            tol.assert_close(a.float(), b.float(), key)
