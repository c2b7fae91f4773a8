/* The CPU kernel of adamw: one AdamW step over a whole group of tensors in one call.
 *
 * Mirrors adamw/_math.py (the statement of the algorithm) in the operation order of torch's CPU
 * fused kernel (ATen FusedAdamKernel.cpp), so that the two round alike:
 *   g      = grad / grad_scale            (stored back into grad when a scale is given)
 *   g      = -g                           (maximize)
 *   param  = param * (1 - lr * weight_decay)
 *   m      = lerp(m, g, 1 - beta1)        (torch's two-sided lerp, one fused multiply-add)
 *   v      = v * beta2 + (1 - beta2) * g * g  (the last product fused with the sum, as torch's
 *                                              build contracts it)
 *   v_max  = maximum(v_max, v)            (amsgrad; NaN propagates as in torch's vec::maximum)
 *   denom  = sqrt(v) / sqrt(1 - beta2^t) + eps
 *   param  = param - (lr / (1 - beta1^t)) * m / denom
 * Scalars are computed once per tensor in double and rounded to the math type (float32, or float64
 * for float64 tensors); bfloat16 and float16 tensors are computed in float32 and rounded to nearest
 * even on store.
 *
 * Work split: the tensors of a call are one concatenated range of elements, cut into one chunk per
 * thread (cuts rounded to 64 elements inside a tensor, so no two threads write one cache line);
 * each thread walks across tensor boundaries, so 1000 small tensors balance like one big one. One
 * parallel region per call, not one per tensor: when other processes share the cores, every region
 * waits for its slowest (descheduled) thread, and torch's per-tensor regions pay that per tensor.
 * Static chunks, not dynamic ones: one long stream per thread measured faster (memory bound).
 *
 * Built with -ffp-contract=off, with fmaf/fma written out exactly where torch's vector loop fuses
 * (its vec::fmadd, and the one multiply-add its compiler contracts), so the two round alike on
 * every build. (torch's scalar tail, the last numel % vector-width elements of a tensor, rounds the
 * second moment without the fused multiply-add, so those few may differ from it in the last bit.)
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "adamw_common.h"

enum { STEP_FLOAT32 = 0, STEP_FLOAT64 = 1 };

/* Totals below this run on the calling thread: waking the pool costs more than it saves. */
#define MIN_PARALLEL_NUMEL 32768
#define CUT_ALIGN 64

/* ---------------------------------------------------------------------------------------------
 * per-tensor scalars, rounded once to the math type */

typedef struct {
    double step_size;             /* lr / (1 - beta1^t) */
    double bias_correction2_sqrt; /* sqrt(1 - beta2^t) */
} TensorScalars;

typedef struct {
    double decay;       /* 1 - lr * weight_decay (1 when weight_decay == 0: an exact no-op) */
    double lerp_weight; /* 1 - beta1 */
    double beta2;
    double one_minus_beta2;
    double eps;
    double grad_scale;  /* 1 when there is none */
    double grad_sign;   /* -1 when maximize */
} GroupScalars;

/* One segment [lo, hi) of one tensor (returns hi). UNSCALE and AMSGRAD are compile-time constants
 * at each call site (the functions are always inlined), so each variant is its own vectorized loop. */
#define DEFINE_SEGMENT(NAME, T, M, LOAD, STORE, FMA, SQRT)                                          \
    INLINE int64_t NAME(T *restrict param, T *restrict grad, T *restrict exp_avg,                   \
                     T *restrict exp_avg_sq, T *restrict max_exp_avg_sq, int64_t lo, int64_t hi,    \
                     const GroupScalars *gs, const TensorScalars *ts, const int unscale,            \
                     const int amsgrad) {                                                           \
        const M decay = (M)gs->decay;                                                               \
        const M weight = (M)gs->lerp_weight;                                                        \
        /* torch's lerp: from the nearer end, so a weight near 1 loses no precision */              \
        const int from_start = fabs((double)weight) < 0.5;                                          \
        const M coeff = from_start ? weight : weight - (M)1;                                        \
        const M beta2 = (M)gs->beta2;                                                               \
        const M one_minus_beta2 = (M)gs->one_minus_beta2;                                           \
        const M eps = (M)gs->eps;                                                                   \
        const M scale = (M)gs->grad_scale;                                                          \
        const M sign = (M)gs->grad_sign;                                                            \
        const M step_size = (M)ts->step_size;                                                       \
        const M bc2_sqrt = (M)ts->bias_correction2_sqrt;                                            \
        _Pragma("omp simd")                                                                         \
        for (int64_t i = lo; i < hi; i++) {                                                         \
            M g = LOAD(grad[i]);                                                                    \
            if (unscale) {                                                                          \
                g = g / scale;                                                                      \
                grad[i] = STORE(g);                                                                 \
            }                                                                                       \
            g = g * sign;                                                                           \
            M p = LOAD(param[i]) * decay;                                                           \
            M m = LOAD(exp_avg[i]);                                                                 \
            m = FMA(coeff, g - m, from_start ? m : g);                                              \
            M v = FMA(one_minus_beta2 * g, g, LOAD(exp_avg_sq[i]) * beta2);                         \
            exp_avg[i] = STORE(m);                                                                  \
            exp_avg_sq[i] = STORE(v);                                                               \
            if (amsgrad) {                                                                          \
                M old = LOAD(max_exp_avg_sq[i]);                                                    \
                v = (old > v || old != old) ? old : v;                                              \
                max_exp_avg_sq[i] = STORE(v);                                                       \
            }                                                                                       \
            M denom = SQRT(v) / bc2_sqrt + eps;                                                     \
            param[i] = STORE(p - step_size * m / denom);                                            \
        }                                                                                           \
        return hi;                                                                                  \
    }

#define IDENTITY(x) (x)
DEFINE_SEGMENT(segment_f32, float, float, IDENTITY, IDENTITY, fmaf, sqrtf)
DEFINE_SEGMENT(segment_f64, double, double, IDENTITY, IDENTITY, fma, sqrt)
DEFINE_SEGMENT(segment_bf16, uint16_t, float, bf16_to_float, float_to_bf16, fmaf, sqrtf)
DEFINE_SEGMENT(segment_f16, uint16_t, float, fp16_to_float, float_to_fp16, fmaf, sqrtf)

/* ---------------------------------------------------------------------------------------------
 * bfloat16 and float16 with AVX-512: the conversions as single instructions. The compiler does not
 * turn adamw_common.h's bit operations into them, and they are most of the work once the data is in
 * cache. Each result is bit for bit the generic loop's (the tests compare the two). */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define HAVE_X16 1

#define FPCLASS_NAN 0x81 /* quiet or signalling NaN */
#define FPCLASS_SUBNORMAL 0x20

INLINE __m512 bf16x16_to_float(const uint16_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* float_to_bf16 on 16 values. The instruction (AVX512-BF16) flushes subnormals to zero and keeps a
 * NaN's sign, so a vector holding either takes the bit operations. */
INLINE void float_to_bf16x16(uint16_t *p, __m512 x) {
#if defined(__AVX512BF16__)
    if (__builtin_expect(_mm512_fpclass_ps_mask(x, FPCLASS_NAN | FPCLASS_SUBNORMAL) == 0, 1)) {
        _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(x));
        return;
    }
#endif
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    r = _mm512_mask_blend_epi32(_mm512_fpclass_ps_mask(x, FPCLASS_NAN), r, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(r));
}

INLINE __m512 fp16x16_to_float(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

/* float_to_fp16 on 16 values: the instruction rounds alike, but keeps a NaN's payload. */
INLINE void float_to_fp16x16(uint16_t *p, __m512 x) {
    __m256i h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 nan = _mm512_fpclass_ps_mask(x, FPCLASS_NAN);
    if (__builtin_expect(nan != 0, 0)) {
        const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(x), 16), _mm512_set1_epi32(0x8000));
        const __m512i quiet = _mm512_or_si512(sign, _mm512_set1_epi32(0x7E00));
        h = _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, _mm512_cvtepu16_epi32(h), quiet));
    }
    _mm256_storeu_si256((__m256i *)p, h);
}

/* DEFINE_SEGMENT's loop, 16 values at a time and op for op; returns where it stopped. */
#define DEFINE_SEGMENT_X16(NAME, LOAD16, STORE16)                                                   \
    INLINE int64_t NAME(uint16_t *restrict param, uint16_t *restrict grad,                          \
                        uint16_t *restrict exp_avg, uint16_t *restrict exp_avg_sq,                  \
                        uint16_t *restrict max_exp_avg_sq, int64_t lo, int64_t hi,                  \
                        const GroupScalars *gs, const TensorScalars *ts, const int unscale,         \
                        const int amsgrad) {                                                        \
        const float weight = (float)gs->lerp_weight;                                                \
        const int from_start = fabs((double)weight) < 0.5;                                          \
        const __m512 coeff = _mm512_set1_ps(from_start ? weight : weight - 1.0f);                   \
        const __m512 decay = _mm512_set1_ps((float)gs->decay);                                      \
        const __m512 beta2 = _mm512_set1_ps((float)gs->beta2);                                      \
        const __m512 one_minus_beta2 = _mm512_set1_ps((float)gs->one_minus_beta2);                  \
        const __m512 eps = _mm512_set1_ps((float)gs->eps);                                          \
        const __m512 scale = _mm512_set1_ps((float)gs->grad_scale);                                 \
        const __m512 sign = _mm512_set1_ps((float)gs->grad_sign);                                   \
        const __m512 step_size = _mm512_set1_ps((float)ts->step_size);                              \
        const __m512 bc2_sqrt = _mm512_set1_ps((float)ts->bias_correction2_sqrt);                   \
        int64_t i = lo;                                                                             \
        for (; i + 16 <= hi; i += 16) {                                                             \
            __m512 g = LOAD16(grad + i);                                                            \
            if (unscale) {                                                                          \
                g = _mm512_div_ps(g, scale);                                                        \
                STORE16(grad + i, g);                                                               \
            }                                                                                       \
            g = _mm512_mul_ps(g, sign);                                                             \
            __m512 p = _mm512_mul_ps(LOAD16(param + i), decay);                                     \
            __m512 m = LOAD16(exp_avg + i);                                                         \
            m = _mm512_fmadd_ps(coeff, _mm512_sub_ps(g, m), from_start ? m : g);                    \
            __m512 v = _mm512_fmadd_ps(_mm512_mul_ps(one_minus_beta2, g), g,                        \
                                       _mm512_mul_ps(LOAD16(exp_avg_sq + i), beta2));               \
            STORE16(exp_avg + i, m);                                                                \
            STORE16(exp_avg_sq + i, v);                                                             \
            if (amsgrad) {                                                                          \
                __m512 old = LOAD16(max_exp_avg_sq + i);                                            \
                __mmask16 keep = _mm512_cmp_ps_mask(old, v, _CMP_GT_OQ) |                           \
                                 _mm512_cmp_ps_mask(old, old, _CMP_UNORD_Q);                        \
                v = _mm512_mask_blend_ps(keep, v, old);                                             \
                STORE16(max_exp_avg_sq + i, v);                                                     \
            }                                                                                       \
            __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), bc2_sqrt), eps);          \
            p = _mm512_sub_ps(p, _mm512_div_ps(_mm512_mul_ps(step_size, m), denom));                \
            STORE16(param + i, p);                                                                  \
        }                                                                                           \
        return i;                                                                                   \
    }

DEFINE_SEGMENT_X16(segment_bf16_x16, bf16x16_to_float, float_to_bf16x16)
DEFINE_SEGMENT_X16(segment_f16_x16, fp16x16_to_float, float_to_fp16x16)
#endif

/* ---------------------------------------------------------------------------------------------
 * bfloat16 with AVX2 + FMA (no AVX-512): DEFINE_SEGMENT_X16's operations on two vectors of 8 values
 * per iteration, each tensor's 16 results stored at once, for bfloat16 only, where the compiler's own
 * vectorization of the generic loop measured 1.2x slower in cache (its conversions and stores);
 * float16 keeps the generic loop. Bit for bit the generic loop's, as the x16 ones are. */

#if !defined(HAVE_X16) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_X8 1

INLINE __m256 bf16x8_to_float(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* float_to_bf16's bits of 8 values, in 32-bit lanes */
INLINE __m256i bf16_bits_x8(__m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
}

/* float_to_bf16 on 8 values */
INLINE void float_to_bf16x8(uint16_t *p, __m256 x) {
    const __m256i r = bf16_bits_x8(x);
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

/* float_to_bf16 on 16 values (x's then y's) as one store: one pack (which interleaves the 128-bit
 * lanes) and one permutation of its 64-bit quarters */
INLINE void float_to_bf16x16_avx2(uint16_t *p, __m256 x, __m256 y) {
    _mm256_storeu_si256((__m256i *)p, _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits_x8(x), bf16_bits_x8(y)), 0xD8));
}

/* The new param, exp_avg, exp_avg_sq and max_exp_avg_sq (amsgrad; else exp_avg_sq) of 8 values. */
typedef struct { __m256 p, m, v, x; } Lanes8;

/* The segment's step on values i .. i + 7, as DEFINE_SEGMENT_X16 (the grad is written back here when
 * unscaled; the rest is stored by the caller). */
INLINE Lanes8 step8(uint16_t *restrict param, uint16_t *restrict grad, uint16_t *restrict exp_avg,
                    uint16_t *restrict exp_avg_sq, uint16_t *restrict max_exp_avg_sq, int64_t i,
                    __m256 coeff, int from_start, __m256 decay, __m256 beta2, __m256 one_minus_beta2, __m256 eps,
                    __m256 scale, __m256 sign, __m256 step_size, __m256 bc2_sqrt, const int unscale, const int amsgrad) {
    Lanes8 o;
    __m256 g = bf16x8_to_float(grad + i);
    if (unscale) {
        g = _mm256_div_ps(g, scale);
        float_to_bf16x8(grad + i, g);
    }
    g = _mm256_mul_ps(g, sign);
    __m256 p = _mm256_mul_ps(bf16x8_to_float(param + i), decay);
    __m256 m = bf16x8_to_float(exp_avg + i);
    m = _mm256_fmadd_ps(coeff, _mm256_sub_ps(g, m), from_start ? m : g);
    __m256 v = _mm256_fmadd_ps(_mm256_mul_ps(one_minus_beta2, g), g, _mm256_mul_ps(bf16x8_to_float(exp_avg_sq + i), beta2));
    o.m = m;
    o.v = v;
    o.x = v;
    if (amsgrad) {
        __m256 old = bf16x8_to_float(max_exp_avg_sq + i);
        __m256 keep = _mm256_or_ps(_mm256_cmp_ps(old, v, _CMP_GT_OQ), _mm256_cmp_ps(old, old, _CMP_UNORD_Q));
        v = o.x = _mm256_blendv_ps(v, old, keep);
    }
    __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), bc2_sqrt), eps);
    o.p = _mm256_sub_ps(p, _mm256_div_ps(_mm256_mul_ps(step_size, m), denom));
    return o;
}
INLINE int64_t segment_bf16_x8(uint16_t *restrict param, uint16_t *restrict grad, uint16_t *restrict exp_avg,
                               uint16_t *restrict exp_avg_sq, uint16_t *restrict max_exp_avg_sq, int64_t lo,
                               int64_t hi, const GroupScalars *gs, const TensorScalars *ts, const int unscale,
                               const int amsgrad) {
    const float weight = (float)gs->lerp_weight;
    const int from_start = fabs((double)weight) < 0.5;
    const __m256 coeff = _mm256_set1_ps(from_start ? weight : weight - 1.0f);
    const __m256 decay = _mm256_set1_ps((float)gs->decay);
    const __m256 beta2 = _mm256_set1_ps((float)gs->beta2);
    const __m256 one_minus_beta2 = _mm256_set1_ps((float)gs->one_minus_beta2);
    const __m256 eps = _mm256_set1_ps((float)gs->eps);
    const __m256 scale = _mm256_set1_ps((float)gs->grad_scale);
    const __m256 sign = _mm256_set1_ps((float)gs->grad_sign);
    const __m256 step_size = _mm256_set1_ps((float)ts->step_size);
    const __m256 bc2_sqrt = _mm256_set1_ps((float)ts->bias_correction2_sqrt);
    int64_t i = lo;
    for (; i + 16 <= hi; i += 16) {
        const Lanes8 a = step8(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, i, coeff, from_start, decay, beta2,
                               one_minus_beta2, eps, scale, sign, step_size, bc2_sqrt, unscale, amsgrad);
        const Lanes8 b = step8(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, i + 8, coeff, from_start, decay,
                               beta2, one_minus_beta2, eps, scale, sign, step_size, bc2_sqrt, unscale, amsgrad);
        float_to_bf16x16_avx2(exp_avg + i, a.m, b.m);
        float_to_bf16x16_avx2(exp_avg_sq + i, a.v, b.v);
        if (amsgrad) float_to_bf16x16_avx2(max_exp_avg_sq + i, a.x, b.x);
        float_to_bf16x16_avx2(param + i, a.p, b.p);
    }
    return i;
}
#endif

/* Runs FN on [lo, hi) of tensor t and sets lo to where it stopped. */
#define DISPATCH_VARIANTS(FN, T)                                                                    \
    do {                                                                                            \
        T *p = (T *)params[t], *g = (T *)grads[t], *m = (T *)exp_avgs[t], *v = (T *)exp_avg_sqs[t]; \
        T *vmax = amsgrad ? (T *)max_exp_avg_sqs[t] : NULL;                                         \
        if (unscale && amsgrad) lo = FN(p, g, m, v, vmax, lo, hi, gs, ts, 1, 1);                    \
        else if (unscale) lo = FN(p, g, m, v, vmax, lo, hi, gs, ts, 1, 0);                          \
        else if (amsgrad) lo = FN(p, g, m, v, vmax, lo, hi, gs, ts, 0, 1);                          \
        else lo = FN(p, g, m, v, vmax, lo, hi, gs, ts, 0, 0);                                       \
    } while (0)

static void run_segment(int dtype, int64_t t, int64_t lo, int64_t hi, void *const *params,
                        void *const *grads, void *const *exp_avgs, void *const *exp_avg_sqs,
                        void *const *max_exp_avg_sqs, const GroupScalars *gs,
                        const TensorScalars *ts, int unscale, int amsgrad) {
    switch (dtype) {
    case DTYPE_FLOAT32: DISPATCH_VARIANTS(segment_f32, float); break;
    case DTYPE_FLOAT64: DISPATCH_VARIANTS(segment_f64, double); break;
    case DTYPE_BFLOAT16:
#ifdef HAVE_X16
        DISPATCH_VARIANTS(segment_bf16_x16, uint16_t);
#endif
#ifdef HAVE_X8
        DISPATCH_VARIANTS(segment_bf16_x8, uint16_t);
#endif
        DISPATCH_VARIANTS(segment_bf16, uint16_t); /* what is left: all of it without AVX-512 */
        break;
    case DTYPE_FLOAT16:
#ifdef HAVE_X16
        DISPATCH_VARIANTS(segment_f16_x16, uint16_t);
#endif
        DISPATCH_VARIANTS(segment_f16, uint16_t);
        break;
    }
}

/* ---------------------------------------------------------------------------------------------
 * the work split */

/* First tensor whose range ends after element `index` of the concatenation (offsets: n + 1). */
static int64_t tensor_at(const int64_t *offsets, int64_t n, int64_t index) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (offsets[mid + 1] <= index) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* A cut between two threads' shares, moved back to a multiple of CUT_ALIGN elements from the start
 * of the tensor it falls in (the ends of the whole range stay). */
static int64_t align_cut(const int64_t *offsets, int64_t n, int64_t total, int64_t index) {
    if (index <= 0 || index >= total) return index;
    int64_t t = tensor_at(offsets, n, index);
    return offsets[t] + ((index - offsets[t]) / CUT_ALIGN) * CUT_ALIGN;
}

/* ---------------------------------------------------------------------------------------------
 * the entry point */

/* One AdamW step over `n` tensors of one dtype. Pointer arrays hold each tensor's data pointer
 * (contiguous storage of `numels[t]` elements; max_exp_avg_sqs may be NULL without amsgrad);
 * `steps` point to each tensor's step counter (float32 or float64 scalars), incremented here.
 * Returns 0, or -1 for an unknown dtype and -2 when memory for the scalars ran out. */
int adamw_step(int dtype, int64_t n, void *const *params, void *const *grads,
               void *const *exp_avgs, void *const *exp_avg_sqs, void *const *max_exp_avg_sqs,
               const int64_t *numels, void *const *steps, int step_dtype, double lr, double beta1,
               double beta2, double eps, double weight_decay, int amsgrad, int maximize,
               int unscale, double grad_scale, int num_threads) {
    if (dtype < DTYPE_FLOAT32 || dtype > DTYPE_FLOAT16) return -1;
    if (n <= 0) return 0;
    TensorScalars *scalars = (TensorScalars *)malloc((size_t)n * sizeof(TensorScalars));
    int64_t *offsets = (int64_t *)malloc((size_t)(n + 1) * sizeof(int64_t));
    if (!scalars || !offsets) {
        free(scalars);
        free(offsets);
        return -2;
    }
    offsets[0] = 0;
    for (int64_t t = 0; t < n; t++) {
        double step;
        if (step_dtype == STEP_FLOAT64) {
            double *s = (double *)steps[t];
            *s += 1.0;
            step = *s;
        } else {
            float *s = (float *)steps[t];
            *s += 1.0f;
            step = (double)*s;
        }
        const double bias_correction1 = 1.0 - pow(beta1, step);
        const double bias_correction2 = 1.0 - pow(beta2, step);
        scalars[t].step_size = lr / bias_correction1;
        scalars[t].bias_correction2_sqrt = sqrt(bias_correction2);
        offsets[t + 1] = offsets[t] + numels[t];
    }
    const GroupScalars gs = {
        .decay = weight_decay != 0.0 ? 1.0 - lr * weight_decay : 1.0,
        .lerp_weight = 1.0 - beta1,
        .beta2 = beta2,
        .one_minus_beta2 = 1.0 - beta2,
        .eps = eps,
        .grad_scale = unscale ? grad_scale : 1.0,
        .grad_sign = maximize ? -1.0 : 1.0,
    };
    const int64_t total = offsets[n];
    const int threads = team_size(num_threads, total, MIN_PARALLEL_NUMEL);

#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const Range share = thread_share(total, 1);
        const Range mine = {align_cut(offsets, n, total, share.begin), align_cut(offsets, n, total, share.end)};
        if (mine.begin < mine.end) {
            for (int64_t t = tensor_at(offsets, n, mine.begin); t < n && offsets[t] < mine.end; t++) {
                const Range part = clip(mine, offsets[t], offsets[t + 1] - offsets[t]);
                if (part.begin < part.end)
                    run_segment(dtype, t, part.begin, part.end, params, grads, exp_avgs, exp_avg_sqs,
                                max_exp_avg_sqs, &gs, &scalars[t], unscale, amsgrad);
            }
        }
    }
    free(scalars);
    free(offsets);
    return 0;
}

/* The ABI version the Python loader checks, bumped with any change to adamw_step's signature. */
int adamw_abi_version(void) { return 1; }
