r"""The Triton kernels of :mod:`adamw.backends.triton`: one AdamW launch over many tensors, and the step bump.

Mirrors :mod:`adamw._math` step for step (the order of :mod:`adamw.backends.forloop`, which is
torch's)::

    g      <- grad / grad_scale                 (with a GradScaler; the unscaled grad is stored back)
    g      <- -g                                (maximize)
    theta  <- theta - (lr * weight_decay) * theta
    m      <- lerp(m, g, 1 - beta1)
    v      <- v * beta2 + (1 - beta2) * g * g
    v_max  <- max(v_max, v)                     (amsgrad; then v_max is used below)
    denom  =  sqrt(v) / sqrt(1 - beta2^t) + eps
    theta  <- theta - (lr / (1 - beta1^t)) * m / denom

Couplings with the host side (:mod:`adamw.backends.triton`):

* ``table`` has one row of ``ROW`` int64 per tensor: the addresses of param, grad, exp_avg,
  exp_avg_sq, max_exp_avg_sq (0 without amsgrad) and the float32 step counter, the numel, and the
  index of the tensor's first chunk. ``chunk_tensor`` (int32) names the tensor of every chunk of
  ``BLOCK`` elements, so program ``pid`` handles elements ``[(pid - first) * BLOCK, ... + BLOCK)``.
* All tensors of one launch share one dtype (``DTYPE``); math runs in ``ACC`` (float32, or float64
  for float64 params). Division and square root round to nearest (``div_rn``/``sqrt_rn``): Triton's
  plain ``/`` and ``sqrt`` are approximate on GPUs.
* Hyper-parameters are runtime float64 arguments (never recompile for a new lr); only feature
  switches are ``tl.constexpr``. ``tl.full([], x, tl.float64)`` turns such an argument into a
  float64 scalar both when compiled and under the interpreter (which passes Python floats).
* The bias corrections ``1 - beta^t`` are computed per program in float64 from the step counter read
  from device memory (``t = step + 1``: the counter is bumped by :func:`bump_steps_kernel`, launched
  after this kernel), so nothing is read back on the host and a CUDA graph replays them right.
"""

# No `from __future__ import annotations`: Triton reads the annotations (tl.float64 makes a
# runtime float argument a double; a plain Python float would be passed as float32).
import triton
import triton.language as tl

# The table's columns (see the module docstring); tl.constexpr so the kernels may read them.
ROW = tl.constexpr(8)
COL_PARAM = tl.constexpr(0)
COL_GRAD = tl.constexpr(1)
COL_EXP_AVG = tl.constexpr(2)
COL_EXP_AVG_SQ = tl.constexpr(3)
COL_MAX = tl.constexpr(4)
COL_STEP = tl.constexpr(5)
COL_NUMEL = tl.constexpr(6)
COL_FIRST_CHUNK = tl.constexpr(7)


@triton.jit
def _div(x, y, ACC: tl.constexpr):
    if ACC == tl.float32:
        return tl.div_rn(x, y)
    else:
        return x / y


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    if ACC == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def round_bf16(x, noise):
    """float32 -> bfloat16: ``noise`` (below 2^16) added to the bits, which are then truncated.

    By hand: Triton's interpreter truncates float32 -> bfloat16 (GPUs round in hardware), and one
    code path for both keeps what the interpreter tests what the GPU runs.
    """
    rounded = (x.to(tl.uint32, bitcast=True) + noise) >> 16  # a carry out of the low 16 bits rounds |x| up
    rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    """float32/64 -> the storage dtype, rounding to nearest even."""
    if DTYPE == tl.bfloat16:
        return round_bf16(x, 0x7FFF + ((x.to(tl.uint32, bitcast=True) >> 16) & 1))
    else:
        return x.to(DTYPE)


@triton.jit
def address(row_ptr, column: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(row_ptr + column).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # Addresses read from memory carry no alignment facts; the host checked every one is a
        # multiple of 16 bytes, which lets unmasked loads and stores use 128-bit accesses.
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def locate(table_ptr, chunk_tensor_ptr, ROW: tl.constexpr, COL_NUMEL: tl.constexpr, COL_FIRST_CHUNK: tl.constexpr):
    """The table row of this program's tensor, the tensor's numel, and the program's chunk in it."""
    pid = tl.program_id(0)
    row_ptr = table_ptr + tl.load(chunk_tensor_ptr + pid).to(tl.int64) * ROW
    return row_ptr, tl.load(row_ptr + COL_NUMEL), pid - tl.load(row_ptr + COL_FIRST_CHUNK)


@triton.jit
def _update_block(
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    max_exp_avg_sq_ptr,
    offsets,
    numel,
    grad_scale,
    decay,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    step_size,
    bias_correction2_sqrt,
    eps,
    MASKED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
):
    if MASKED:
        mask = offsets < numel
    else:
        mask = None
    param = tl.load(param_ptr + offsets, mask=mask).to(ACC)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(ACC)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(ACC)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(ACC)
    if HAS_GRAD_SCALE:
        grad = _div(grad, grad_scale, ACC)
        tl.store(grad_ptr + offsets, to_storage(grad, DTYPE), mask=mask)  # torch's fused kernels store it unscaled
    if MAXIMIZE:
        grad = -grad
    if HAS_WEIGHT_DECAY:
        param = param - decay * param
    # torch's lerp: the two forms keep the result exact at either end of the weight's range.
    diff = grad - exp_avg
    exp_avg = tl.where(one_minus_beta1 < 0.5, exp_avg + one_minus_beta1 * diff, grad - diff * beta1)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * (grad * grad)
    if AMSGRAD:
        max_exp_avg_sq = tl.maximum(tl.load(max_exp_avg_sq_ptr + offsets, mask=mask).to(ACC), exp_avg_sq)
        tl.store(max_exp_avg_sq_ptr + offsets, to_storage(max_exp_avg_sq, DTYPE), mask=mask)
    else:
        max_exp_avg_sq = exp_avg_sq
    denom = _div(_sqrt(max_exp_avg_sq, ACC), bias_correction2_sqrt, ACC) + eps
    param = param - _div(step_size * exp_avg, denom, ACC)
    tl.store(param_ptr + offsets, to_storage(param, DTYPE), mask=mask)
    tl.store(exp_avg_ptr + offsets, to_storage(exp_avg, DTYPE), mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, to_storage(exp_avg_sq, DTYPE), mask=mask)


@triton.jit
def adamw_kernel(
    table_ptr,
    chunk_tensor_ptr,
    lr_ptr,
    beta1_ptr,
    beta2_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    lr: tl.float64,
    beta1: tl.float64,
    beta2: tl.float64,
    log_beta1: tl.float64,
    log_beta2: tl.float64,
    eps: tl.float64,
    weight_decay: tl.float64,
    BLOCK: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    BETAS_ON_DEVICE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
):
    """One AdamW step on chunk ``program_id`` of the tensors listed in ``table`` (see the module docstring)."""
    if HAS_FOUND_INF:
        # GradScaler's contract, as torch's fused kernels read it: exactly 1.0 skips the step.
        take_step = tl.load(found_inf_ptr) != 1.0
    else:
        take_step = True
    if take_step:
        row_ptr, numel, chunk = locate(table_ptr, chunk_tensor_ptr, ROW, COL_NUMEL, COL_FIRST_CHUNK)
        start = chunk * BLOCK
        offsets = tl.multiple_of(start, BLOCK) + tl.arange(0, BLOCK)
        param_ptr = address(row_ptr, COL_PARAM, DTYPE, ALIGNED)
        if AMSGRAD:
            max_exp_avg_sq_ptr = address(row_ptr, COL_MAX, DTYPE, ALIGNED)
        else:
            max_exp_avg_sq_ptr = param_ptr  # never read
        step_ptr = tl.load(row_ptr + COL_STEP).to(tl.pointer_type(tl.float32))

        # Per-program scalars, in float64: the step as torch counts it (the counter is bumped after us).
        step = (tl.load(step_ptr) + 1.0).to(tl.float64)
        if LR_ON_DEVICE:
            lr64 = tl.load(lr_ptr).to(tl.float64)
        else:
            lr64 = tl.full([], lr, tl.float64)
        if BETAS_ON_DEVICE:
            beta1_64 = tl.load(beta1_ptr).to(tl.float64)
            beta2_64 = tl.load(beta2_ptr).to(tl.float64)
            log_beta1_64 = tl.log(beta1_64)
            log_beta2_64 = tl.log(beta2_64)
        else:
            beta1_64 = tl.full([], beta1, tl.float64)
            beta2_64 = tl.full([], beta2, tl.float64)
            log_beta1_64 = tl.full([], log_beta1, tl.float64)
            log_beta2_64 = tl.full([], log_beta2, tl.float64)
        # beta^t as exp(t * log(beta)): exact enough in float64 (relative error ~1e-15 for t < 2^24).
        bias_correction1 = 1.0 - tl.exp(step * log_beta1_64)
        bias_correction2 = 1.0 - tl.exp(step * log_beta2_64)
        weight_decay64 = tl.full([], weight_decay, tl.float64)
        if HAS_GRAD_SCALE:
            grad_scale = tl.load(grad_scale_ptr).to(ACC)
        else:
            grad_scale = 1.0

        block_args = (
            param_ptr,
            address(row_ptr, COL_GRAD, DTYPE, ALIGNED),
            address(row_ptr, COL_EXP_AVG, DTYPE, ALIGNED),
            address(row_ptr, COL_EXP_AVG_SQ, DTYPE, ALIGNED),
            max_exp_avg_sq_ptr,
            offsets,
            numel,
            grad_scale,
            (lr64 * weight_decay64).to(ACC),
            beta1_64.to(ACC),
            (1.0 - beta1_64).to(ACC),
            beta2_64.to(ACC),
            (1.0 - beta2_64).to(ACC),
            (lr64 / bias_correction1).to(ACC),
            tl.sqrt(bias_correction2).to(ACC),
            tl.full([], eps, tl.float64).to(ACC),
        )
        # Full chunks take the unmasked path: a mask built from a numel read at run time would stop
        # the compiler from vectorizing the loads.
        if start + BLOCK <= numel:
            _update_block(*block_args, False, AMSGRAD, MAXIMIZE, HAS_WEIGHT_DECAY, HAS_GRAD_SCALE, DTYPE, ACC)
        else:
            _update_block(*block_args, True, AMSGRAD, MAXIMIZE, HAS_WEIGHT_DECAY, HAS_GRAD_SCALE, DTYPE, ACC)


@triton.jit(do_not_specialize=["n_tensors"])
def bump_steps_kernel(table_ptr, found_inf_ptr, n_tensors, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    """``step <- step + 1 - found_inf`` for every tensor of the table: torch's ``_foreach_add_`` then
    ``_foreach_sub_`` around its fused kernel, in one launch."""
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n_tensors
    address = tl.load(table_ptr + index.to(tl.int64) * ROW + COL_STEP, mask=mask, other=0)
    step_ptr = address.to(tl.pointer_type(tl.float32))
    step = tl.load(step_ptr, mask=mask) + 1.0
    if HAS_FOUND_INF:
        step = step - tl.load(found_inf_ptr).to(tl.float32)
    tl.store(step_ptr, step, mask=mask)
