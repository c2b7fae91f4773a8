/* The low-bit CPU kernel of adamw: one AdamW step with bf16 or 8-bit moments (and bf16 params written
 * by stochastic rounding or Kahan compensation) over a whole group of tensors in one call.
 *
 * Mirrors adamw/backends/forloop.py (reference_step) operation for operation, in float32, as torch's CPU
 * ops evaluate it, so the two agree bit for bit (as _triton_low_bit_kernels.py does on GPUs):
 *   g      <- grad (/ grad_scale, correctly rounded)   (-g with maximize)
 *   p      <- param                      (Kahan: param + comp, in float32)
 *   p      <- p * (1 - lr*wd)            (torch's p.mul_)
 *   m      <- fma(c, g - m, base)        (torch's lerp: c = w, base = m when |w| < 0.5, else w - 1, g)
 *   v      <- fma((1 - b2) * g, g, v * b2)   (torch's mul_ then addcmul_, which its build contracts)
 *   vmax   <- maximum(vmax, v)           (amsgrad, NaN propagating; then vmax is used below)
 *   denom  =  sqrt(v) / sqrt(bc2) + eps
 *   p      <- p + (-(lr / bc1) * m) / denom  (torch's addcdiv_)
 * Built with -ffp-contract=off, no fast-math: fmaf exactly where torch fuses, sqrtf and '/' round
 * to nearest. Each tensor's step counter is incremented here, and its scalars computed from it in
 * double as the reference computes them in Python (-(lr / (1 - pow(beta1, t))) and
 * pow(1 - pow(beta2, t), 0.5): the same libm calls), then rounded to float32.
 *
 * Storage (adamw/states/quantize.py, rounding.py), per tensor:
 *   moments float32, float16 (to nearest), bfloat16 (stochastic rounding) or uint8: 8-bit blockwise
 *   codes of 256 values with a float32 absmax per block, taken after the update; y = x / absmax
 *   (absmax 0 or NaN: 1); code = number of float32 midpoints strictly below |y| (+128 when y < 0
 *   for the signed code). The index is guessed from the float's exponent and top mantissa bits
 *   (within one of the answer on the 2^(-k/8) ladder), then fixed by comparing with the two
 *   neighbouring midpoints: the same answer as quantize.Code.magnitude_index.
 *   Stochastic rounding draws hash32(hash32(i) ^ key), i the element's flat index in its tensor
 *   (lowbias32); key = hash32(stream_key ^ lo32(t) ^ hi32(t)) at step t, the stream keys (per
 *   tensor and purpose, the same every step) computed on the host (rounding.py).
 *
 * Work split: each tensor is a run of 256-value blocks; the group's blocks are one range, cut into
 * one contiguous piece per thread (one OpenMP region per call). A block is processed in phases over
 * 256-float stack buffers (load, math, store), each a branch-free loop the compiler vectorizes.
 * Where every moment is 8-bit, whole blocks instead take the fast path (fast_block: the same
 * operations in explicit vectors, with the ladder's arithmetic form in place of table lookups),
 * built for AVX-512 (16 lanes) or AVX2 + FMA (8 lanes).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "adamw_common.h"

enum { UPDATE_ROUND = 0, UPDATE_STOCHASTIC = 1, UPDATE_KAHAN = 2 };
enum { PURPOSE_PARAM = 0, PURPOSE_EXP_AVG = 1, PURPOSE_EXP_AVG_SQ = 2, PURPOSE_MAX = 3 };

#define QBLOCK 256          /* adamw.states.quantize.BLOCK_SIZE (checked by the host) */
#define SIGNED_TOP 127
#define UNSIGNED_TOP 255
#define GUESS_BITS 6        /* mantissa bits that index the log guess table */
#define MIN_PARALLEL_BLOCKS 128

/* One tensor of a call (adamw/backends/cpu_low_bit.py, class _Tensor). The host fills what stays the
 * same from step to step, so that it can keep a group's table and pass only the new grads; the
 * fields marked "set here" are filled by adamw_low_bit_step. */
typedef struct {
    void *param;
    const void *grad;      /* set here, from the call's grads */
    void *moment[3];       /* exp_avg, exp_avg_sq, max_exp_avg_sq (NULL without amsgrad) */
    float *absmax[3];      /* 8-bit only */
    uint16_t *comp;        /* Kahan only (bfloat16) */
    void *step;            /* the step counter, a float32 or float64 scalar: incremented here */
    int64_t numel;
    int64_t first_block;   /* of this tensor in the call's block range */
    uint32_t stream_key[4];  /* per purpose: param, exp_avg, exp_avg_sq, max_exp_avg_sq */
    uint32_t key[4];       /* set here: this step's keys */
    double neg_step_size;  /* set here: -(lr / bc1) */
    double bc2_sqrt;       /* set here: sqrt(bc2) */
    int32_t param_dtype, grad_dtype, moment_dtype, param_update, unscale, step_dtype;
} LowBitTensor;

/* Both tables in arithmetic form (checked against the host's tables by ladder_init: ok = 0 if not):
 *   decode: bits(values[j]) = dec[j & 7] + ((j & 0xF8) << 20), j the magnitude index (signed: 0 is 0)
 *   encode: the midpoint between ladder entries k and k + 1 (2^(-k/8) and 2^(-(k+1)/8)) is
 *     M[k & 7] * 2^-(k >> 3), each M[r] in [0.5, 1) and descending. For y > 0 (not NaN) with biased
 *     exponent E and mantissa bits u, c = #{r : u > mantissa(M[r])} = cbase[u >> 19] + (u > bnd[u >> 19])
 *     (at most one M per 1/16 of the octave), and the number of ladder midpoints below y is
 *     clamp(8E + c + K - 1016, 0, K), K = 126 (signed; plus [s0 < y], s0 the midpoint next to 0) or
 *     255 (unsigned). */
typedef struct {
    int ok, near_ok;
    float s0;
    uint32_t sdec[16], udec[16];  /* dec[i & 7] */
    uint32_t cbase[16], bnd[16];
    /* the same, as the vector (AVX-512 or AVX2) path reads them (see decode_vec, Enc) */
    uint32_t sdec16[16], udec16[16], sadj[16], uadj[16], bnd9[16];
} Ladder;

typedef struct {
    float decay, lerp_coeff, beta2, one_minus_beta2, eps, grad_scale;
    int lerp_small, amsgrad, maximize, weight_decay;
    /* bounds[i], bounds[i + 1]: magnitude i's interval (-inf, the midpoints, +inf) */
    float signed_values[256], signed_bounds[SIGNED_TOP + 2];
    float unsigned_values[256], unsigned_bounds[UNSIGNED_TOP + 2];
    int32_t guess[1 << GUESS_BITS];  /* round(8 * log2(mantissa)) at each bucket's centre */
    Ladder ladder;
} Group;

/* ---------------------------------------------------------------------------------------------
 * stochastic rounding to bfloat16 (to nearest: adamw_common.h) */

INLINE uint32_t hash32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

/* Up or down at random: a carry out of the low 16 bits rounds |x| up (rounding.py). */
INLINE uint16_t stochastic_bf16(float f, uint32_t index, uint32_t key) {
    uint32_t noise = hash32(hash32(index) ^ key) & 0xFFFFu;
    uint32_t rounded = (bits_of(f) + noise) >> 16;
    return (uint16_t)(f != f ? 0x7FC0u : rounded);
}

/* ---------------------------------------------------------------------------------------------
 * one block: load, math, store */

INLINE void load_values(float *out, const void *src, int dtype, int64_t start, int len) {
    if (dtype == DTYPE_FLOAT32) {
        const float *s = (const float *)src + start;
        for (int i = 0; i < len; i++) out[i] = s[i];
    } else if (dtype == DTYPE_BFLOAT16) {
        const uint16_t *s = (const uint16_t *)src + start;
        for (int i = 0; i < len; i++) out[i] = bf16_to_float(s[i]);
    } else {
        const _Float16 *s = (const _Float16 *)src + start;
        for (int i = 0; i < len; i++) out[i] = (float)s[i];
    }
}

INLINE void load_moment(float *out, const LowBitTensor *t, int which, const float *values, int64_t start,
                        int len) {
    if (t->moment_dtype == DTYPE_UINT8) {
        const uint8_t *codes = (const uint8_t *)t->moment[which] + start;
        const float absmax = t->absmax[which][start / QBLOCK];
        for (int i = 0; i < len; i++) out[i] = values[codes[i]] * absmax;
    } else {
        load_values(out, t->moment[which], t->moment_dtype, start, len);
    }
}

/* The code of each normalized value: quantize.Code.magnitude_index, plus the sign bit. Two loops,
 * 32-bit lanes then the narrowing to bytes, so that each vectorizes. */
INLINE void encode_block(uint8_t *codes, const float *x, int len, float absmax, const float *bounds,
                         int top, int is_signed, const int32_t *guess_table) {
    const float safe = absmax > 0 ? absmax : 1.0f;
    int32_t index[QBLOCK];
    for (int i = 0; i < len; i++) {
        const float y = x[i] / safe;
        const float magnitude = is_signed ? fabsf(y) : y;
        const uint32_t b = bits_of(magnitude);
        const int32_t octave = (int32_t)(b >> 23) - 127;
        int32_t guess = top + 8 * octave + guess_table[(b >> (23 - GUESS_BITS)) & ((1u << GUESS_BITS) - 1)];
        guess = magnitude > 0 ? guess : 0;  /* 0, negative (unsigned code) and NaN: index 0 */
        guess = guess < 0 ? 0 : (guess > top ? top : guess);
        const float below = bounds[guess], above = bounds[guess + 1];
        int32_t k = guess - (magnitude <= below ? 1 : 0) + (magnitude > above ? 1 : 0);
        if (is_signed) k += y < 0 ? 128 : 0;
        index[i] = k;
    }
    for (int i = 0; i < len; i++) codes[i] = (uint8_t)index[i];
}

/* max |x| as integers: the bits of non-negative floats order as their values, and a NaN's above
 * infinity's, so a NaN propagates as torch's amax propagates it. */
INLINE float block_absmax(const float *x, int len) {
    uint32_t m = 0;
    for (int i = 0; i < len; i++) {
        const uint32_t a = bits_of(x[i]) & 0x7FFFFFFFu;
        m = a > m ? a : m;
    }
    return float_of(m);
}

INLINE void store_moment(const LowBitTensor *t, int which, const Group *gr, const float *x, int64_t start,
                         int len, uint32_t key) {
    void *dst = t->moment[which];
    if (t->moment_dtype == DTYPE_UINT8) {
        const float absmax = block_absmax(x, len);
        t->absmax[which][start / QBLOCK] = absmax;
        if (which == 0)
            encode_block((uint8_t *)dst + start, x, len, absmax, gr->signed_bounds, SIGNED_TOP, 1, gr->guess);
        else
            encode_block((uint8_t *)dst + start, x, len, absmax, gr->unsigned_bounds, UNSIGNED_TOP, 0, gr->guess);
    } else if (t->moment_dtype == DTYPE_BFLOAT16) {
        uint16_t *d = (uint16_t *)dst + start;
        for (int i = 0; i < len; i++) d[i] = stochastic_bf16(x[i], (uint32_t)(start + i), key);
    } else if (t->moment_dtype == DTYPE_FLOAT16) {
        _Float16 *d = (_Float16 *)dst + start;
        for (int i = 0; i < len; i++) d[i] = (_Float16)x[i];
    } else {
        float *d = (float *)dst + start;
        for (int i = 0; i < len; i++) d[i] = x[i];
    }
}

INLINE void store_param(const LowBitTensor *t, const float *p, int64_t start, int len) {
    if (t->param_dtype == DTYPE_FLOAT32) {
        float *d = (float *)t->param + start;
        for (int i = 0; i < len; i++) d[i] = p[i];
    } else if (t->param_dtype == DTYPE_FLOAT16) {
        _Float16 *d = (_Float16 *)t->param + start;
        for (int i = 0; i < len; i++) d[i] = (_Float16)p[i];
    } else if (t->param_update == UPDATE_STOCHASTIC) {
        uint16_t *d = (uint16_t *)t->param + start;
        const uint32_t key = t->key[PURPOSE_PARAM];
        for (int i = 0; i < len; i++) d[i] = stochastic_bf16(p[i], (uint32_t)(start + i), key);
    } else if (t->param_update == UPDATE_KAHAN) {
        uint16_t *d = (uint16_t *)t->param + start;
        uint16_t *c = t->comp + start;
        for (int i = 0; i < len; i++) {
            const uint16_t stored = float_to_bf16(p[i]);
            d[i] = stored;
            c[i] = float_to_bf16(p[i] - bf16_to_float(stored));
        }
    } else {
        uint16_t *d = (uint16_t *)t->param + start;
        for (int i = 0; i < len; i++) d[i] = float_to_bf16(p[i]);
    }
}

static void step_block(const LowBitTensor *t, const Group *gr, int64_t start, int len) {
    float p[QBLOCK], g[QBLOCK], m[QBLOCK], v[QBLOCK], vmax[QBLOCK];
    load_values(p, t->param, t->param_dtype, start, len);
    if (t->param_update == UPDATE_KAHAN) {
        const uint16_t *c = t->comp + start;
        for (int i = 0; i < len; i++) p[i] = p[i] + bf16_to_float(c[i]);
    }
    load_values(g, t->grad, t->grad_dtype, start, len);
    if (t->unscale) {
        const float scale = gr->grad_scale;
        for (int i = 0; i < len; i++) g[i] = g[i] / scale;
    }
    if (gr->maximize)
        for (int i = 0; i < len; i++) g[i] = -g[i];
    load_moment(m, t, 0, gr->signed_values, start, len);
    load_moment(v, t, 1, gr->unsigned_values, start, len);
    if (gr->amsgrad) load_moment(vmax, t, 2, gr->unsigned_values, start, len);

    const float decay = gr->decay, coeff = gr->lerp_coeff, beta2 = gr->beta2, omb2 = gr->one_minus_beta2;
    const float eps = gr->eps, nss = (float)t->neg_step_size, bc2s = (float)t->bc2_sqrt;
    if (gr->weight_decay)
        for (int i = 0; i < len; i++) p[i] = p[i] * decay;
    if (gr->lerp_small)
        for (int i = 0; i < len; i++) m[i] = fmaf(coeff, g[i] - m[i], m[i]);
    else
        for (int i = 0; i < len; i++) m[i] = fmaf(coeff, g[i] - m[i], g[i]);
    for (int i = 0; i < len; i++) v[i] = fmaf(omb2 * g[i], g[i], v[i] * beta2);
    if (gr->amsgrad) {
        for (int i = 0; i < len; i++) {
            const float a = vmax[i], b = v[i];
            vmax[i] = a != a ? a : (a > b ? a : b);  /* torch.maximum: NaN propagates */
        }
        for (int i = 0; i < len; i++) p[i] = p[i] + (nss * m[i]) / (sqrtf(vmax[i]) / bc2s + eps);
    } else {
        for (int i = 0; i < len; i++) p[i] = p[i] + (nss * m[i]) / (sqrtf(v[i]) / bc2s + eps);
    }

    store_param(t, p, start, len);
    store_moment(t, 0, gr, m, start, len, t->key[PURPOSE_EXP_AVG]);
    store_moment(t, 1, gr, v, start, len, t->key[PURPOSE_EXP_AVG_SQ]);
    if (gr->amsgrad) store_moment(t, 2, gr, vmax, start, len, t->key[PURPOSE_MAX]);
}

/* ---------------------------------------------------------------------------------------------
 * the ladder's arithmetic form (see Ladder) */

#define NEAR_ULPS 8  /* see encode_vec_recip */

static void ladder_init(Ladder *L, const float *codes) {
    const float *sv = codes, *sm = codes + 256, *uv = codes + 256 + SIGNED_TOP, *um = codes + 512 + SIGNED_TOP;
    memset(L, 0, sizeof *L);
    uint32_t M[8];
    int ok = 1;
    for (int r = 0; r < 8; r++) {
        M[r] = bits_of(um[254 - r]);  /* unsigned midpoint j lies between ladder 254 - j and 255 - j */
        if ((M[r] >> 23) != 126 || (r > 0 && M[r] >= M[r - 1])) ok = 0;
    }
    for (int j = 0; j < UNSIGNED_TOP; j++) {
        const int k = 254 - j;
        if (bits_of(um[j]) != M[k & 7] - ((uint32_t)(k >> 3) << 23)) ok = 0;
    }
    for (int j = 1; j < SIGNED_TOP; j++) {
        const int k = 126 - j;
        if (bits_of(sm[j]) != M[k & 7] - ((uint32_t)(k >> 3) << 23)) ok = 0;
    }
    L->s0 = sm[0];
    for (int i = 0; i < 16; i++) {
        L->udec[i] = bits_of(uv[i & 7]);
        L->sdec[i] = L->udec[i] + (16u << 23);  /* signed magnitude j: 2^16 times unsigned j's */
    }
    for (int c = 0; c < 256; c++) {
        const uint32_t j = (uint32_t)c & 127u;
        const uint32_t s = (j == 0 ? 0u : L->sdec[j & 7] + ((j & 0xF8u) << 20)) | (((uint32_t)c & 128u) << 24);
        const uint32_t u = L->udec[c & 7] + (((uint32_t)c & 0xF8u) << 20);
        if (s != bits_of(sv[c]) || u != bits_of(uv[c])) ok = 0;
    }
    for (int b = 0; b < 16; b++) {
        const uint32_t lo = (uint32_t)b << 19, hi = (uint32_t)(b + 1) << 19;
        int below = 0, inside = 0;
        L->bnd[b] = 0x7FFFFFFFu;  /* none: u > bnd never, and u - bnd is far from 0 */
        for (int r = 0; r < 8; r++) {
            const uint32_t mant = M[r] & 0x7FFFFFu;
            if (mant < lo) below++;
            else if (mant < hi) { inside++; L->bnd[b] = mant; }
        }
        L->cbase[b] = (uint32_t)below;
        if (inside > 1) ok = 0;
    }
    for (int i = 0; i < 16; i++) {
        L->sdec16[i] = L->sdec[i] - ((uint32_t)(i & 7) << 20);
        L->udec16[i] = L->udec[i] - ((uint32_t)(i & 7) << 20);
        L->sadj[i] = L->cbase[i] - (uint32_t)(i >> 1) + (uint32_t)(SIGNED_TOP - 1 - 1016 + 1);
        L->uadj[i] = L->cbase[i] - (uint32_t)(i >> 1) + (uint32_t)(UNSIGNED_TOP - 1016);
        L->bnd9[i] = L->bnd[i] == 0x7FFFFFFFu ? 0xFFFFFFFFu : L->bnd[i] << 9;
    }
    L->ok = ok;
    L->near_ok = ok;
    for (int r = 0; r < 8; r++) {
        const uint32_t edge = M[r] & 0x7FFFFu;  /* within its bucket of 2^19 */
        if (edge <= 2 * NEAR_ULPS || edge >= (1u << 19) - 2 * NEAR_ULPS) L->near_ok = 0;
    }
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>

/* ---------------------------------------------------------------------------------------------
 * the 8-bit fast path: float32 param and grad, all moments 8-bit, a whole block; LANES values at a
 * time (16 with AVX-512, 8 with AVX2 + FMA), the same operations as step_block.
 *
 * Written once over a few vector operations, each the same bits on both instruction sets; only
 * these wrappers differ. A lane mask (VM) is an AVX-512 mask register, or with AVX2 a vector of
 * all-ones / all-zeros lanes. A table (VT) holds 16 uint32 entries (Ladder's *16 arrays). */

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 VF;
typedef __m512i VI;
typedef __mmask16 VM;
typedef __m512i VT;

INLINE VF vf_load(const float *p) { return _mm512_loadu_ps(p); }
INLINE void vf_store(float *p, VF a) { _mm512_storeu_ps(p, a); }
INLINE VF vf_set1(float a) { return _mm512_set1_ps(a); }
INLINE VF vf_zero(void) { return _mm512_setzero_ps(); }
INLINE VF vf_add(VF a, VF b) { return _mm512_add_ps(a, b); }
INLINE VF vf_sub(VF a, VF b) { return _mm512_sub_ps(a, b); }
INLINE VF vf_mul(VF a, VF b) { return _mm512_mul_ps(a, b); }
INLINE VF vf_div(VF a, VF b) { return _mm512_div_ps(a, b); }
INLINE VF vf_sqrt(VF a) { return _mm512_sqrt_ps(a); }
INLINE VF vf_fmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
INLINE VF vf_max(VF a, VF b) { return _mm512_max_ps(a, b); }  /* b where either is NaN */
INLINE VI vf_bits(VF a) { return _mm512_castps_si512(a); }
INLINE VF vi_float(VI a) { return _mm512_castsi512_ps(a); }
INLINE VI vi_set1(uint32_t a) { return _mm512_set1_epi32((int)a); }
INLINE VI vi_zero(void) { return _mm512_setzero_si512(); }
INLINE VI vi_add(VI a, VI b) { return _mm512_add_epi32(a, b); }
INLINE VI vi_sub(VI a, VI b) { return _mm512_sub_epi32(a, b); }
INLINE VI vi_and(VI a, VI b) { return _mm512_and_si512(a, b); }
INLINE VI vi_or(VI a, VI b) { return _mm512_or_si512(a, b); }
INLINE VI vi_xor(VI a, VI b) { return _mm512_xor_si512(a, b); }
INLINE VI vi_shl(VI a, unsigned n) { return _mm512_slli_epi32(a, n); }
INLINE VI vi_shr(VI a, unsigned n) { return _mm512_srli_epi32(a, n); }
INLINE VI vi_min_i32(VI a, VI b) { return _mm512_min_epi32(a, b); }
INLINE VI vi_max_i32(VI a, VI b) { return _mm512_max_epi32(a, b); }
INLINE VI vi_max_u32(VI a, VI b) { return _mm512_max_epu32(a, b); }
INLINE uint32_t vi_reduce_max_u32(VI a) { return (uint32_t)_mm512_reduce_max_epu32(a); }

INLINE VM vm_nonzero(VI a) { return _mm512_test_epi32_mask(a, a); }
INLINE VM vm_gt_u32(VI a, VI b) { return _mm512_cmpgt_epu32_mask(a, b); }
INLINE VM vm_le_u32(VI a, VI b) { return _mm512_cmple_epu32_mask(a, b); }
INLINE VM vm_gt(VF a, VF b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
INLINE VM vm_lt(VF a, VF b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
INLINE VM vm_nan(VF a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
INLINE VM vm_and(VM a, VM b) { return a & b; }
INLINE VM vm_or(VM a, VM b) { return a | b; }
INLINE int vm_any(VM a) { return a != 0; }
INLINE VI vi_keep(VM m, VI a) { return _mm512_maskz_mov_epi32(m, a); }     /* a where m, else 0 */
INLINE VI vi_inc(VM m, VI a) { return _mm512_mask_sub_epi32(a, m, a, vi_set1(0xFFFFFFFFu)); }  /* a + 1 where m */
INLINE VF vf_select(VM m, VF a, VF b) { return _mm512_mask_mov_ps(b, m, a); }  /* a where m, else b */

INLINE VT vt_load(const uint32_t *table16) { return _mm512_loadu_si512(table16); }
/* t[i & 15] */
INLINE VI vt_lookup16(VI i, VT t) { return _mm512_permutexvar_epi32(i, t); }
/* t[i & 7], for a table whose entries repeat with period 8 */
INLINE VI vt_lookup8(VI i, VT t) { return _mm512_permutexvar_epi32(i, t); }

INLINE VI load_codes(const uint8_t *codes) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)codes)); }
/* n in 0..255 */
INLINE void store_codes(uint8_t *codes, VI n) { _mm_storeu_si128((__m128i *)codes, _mm512_cvtepi32_epi8(n)); }

#else  /* AVX2 + FMA */
#define LANES 8
typedef __m256 VF;
typedef __m256i VI;
typedef __m256i VM;
typedef struct { __m256i lo, hi; } VT;  /* entries 0-7, 8-15 */

INLINE VF vf_load(const float *p) { return _mm256_loadu_ps(p); }
INLINE void vf_store(float *p, VF a) { _mm256_storeu_ps(p, a); }
INLINE VF vf_set1(float a) { return _mm256_set1_ps(a); }
INLINE VF vf_zero(void) { return _mm256_setzero_ps(); }
INLINE VF vf_add(VF a, VF b) { return _mm256_add_ps(a, b); }
INLINE VF vf_sub(VF a, VF b) { return _mm256_sub_ps(a, b); }
INLINE VF vf_mul(VF a, VF b) { return _mm256_mul_ps(a, b); }
INLINE VF vf_div(VF a, VF b) { return _mm256_div_ps(a, b); }
INLINE VF vf_sqrt(VF a) { return _mm256_sqrt_ps(a); }
INLINE VF vf_fmadd(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
INLINE VF vf_max(VF a, VF b) { return _mm256_max_ps(a, b); }  /* b where either is NaN */
INLINE VI vf_bits(VF a) { return _mm256_castps_si256(a); }
INLINE VF vi_float(VI a) { return _mm256_castsi256_ps(a); }
INLINE VI vi_set1(uint32_t a) { return _mm256_set1_epi32((int)a); }
INLINE VI vi_zero(void) { return _mm256_setzero_si256(); }
INLINE VI vi_add(VI a, VI b) { return _mm256_add_epi32(a, b); }
INLINE VI vi_sub(VI a, VI b) { return _mm256_sub_epi32(a, b); }
INLINE VI vi_and(VI a, VI b) { return _mm256_and_si256(a, b); }
INLINE VI vi_or(VI a, VI b) { return _mm256_or_si256(a, b); }
INLINE VI vi_xor(VI a, VI b) { return _mm256_xor_si256(a, b); }
INLINE VI vi_shl(VI a, unsigned n) { return _mm256_slli_epi32(a, (int)n); }
INLINE VI vi_shr(VI a, unsigned n) { return _mm256_srli_epi32(a, (int)n); }
INLINE VI vi_min_i32(VI a, VI b) { return _mm256_min_epi32(a, b); }
INLINE VI vi_max_i32(VI a, VI b) { return _mm256_max_epi32(a, b); }
INLINE VI vi_max_u32(VI a, VI b) { return _mm256_max_epu32(a, b); }
INLINE uint32_t vi_reduce_max_u32(VI a) {
    __m128i m = _mm_max_epu32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4E));  /* swap the 64-bit halves */
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xB1));  /* swap neighbours */
    return (uint32_t)_mm_cvtsi128_si32(m);
}

INLINE VM vm_nonzero(VI a) { return _mm256_andnot_si256(_mm256_cmpeq_epi32(a, vi_zero()), vi_set1(0xFFFFFFFFu)); }
/* no unsigned compare: flipping the sign bits orders unsigned as signed */
INLINE VM vm_gt_u32(VI a, VI b) {
    const VI flip = vi_set1(0x80000000u);
    return _mm256_cmpgt_epi32(vi_xor(a, flip), vi_xor(b, flip));
}
INLINE VM vm_le_u32(VI a, VI b) { return _mm256_cmpeq_epi32(_mm256_min_epu32(a, b), a); }
INLINE VM vm_gt(VF a, VF b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_GT_OQ)); }
INLINE VM vm_lt(VF a, VF b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_LT_OQ)); }
INLINE VM vm_nan(VF a) { return _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)); }
INLINE VM vm_and(VM a, VM b) { return _mm256_and_si256(a, b); }
INLINE VM vm_or(VM a, VM b) { return _mm256_or_si256(a, b); }
INLINE int vm_any(VM a) { return !_mm256_testz_si256(a, a); }
INLINE VI vi_keep(VM m, VI a) { return _mm256_and_si256(m, a); }     /* a where m, else 0 */
INLINE VI vi_inc(VM m, VI a) { return _mm256_sub_epi32(a, m); }      /* a + 1 where m (m = -1) */
INLINE VF vf_select(VM m, VF a, VF b) { return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m)); }

INLINE VT vt_load(const uint32_t *table16) {
    VT t;
    t.lo = _mm256_loadu_si256((const __m256i *)table16);
    t.hi = _mm256_loadu_si256((const __m256i *)(table16 + 8));
    return t;
}
/* t[i & 15]: both halves' t[i & 7], chosen by bit 3 of i (moved to the sign bit, which blendv reads) */
INLINE VI vt_lookup16(VI i, VT t) {
    const __m256 lo = _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(t.lo, i));
    const __m256 hi = _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(t.hi, i));
    return _mm256_castps_si256(_mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(i, 28))));
}
/* t[i & 7], for a table whose entries repeat with period 8 */
INLINE VI vt_lookup8(VI i, VT t) { return _mm256_permutevar8x32_epi32(t.lo, i); }

INLINE VI load_codes(const uint8_t *codes) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)codes)); }
/* n in 0..255, so that the saturating packs (to u16, then u8) change nothing */
INLINE void store_codes(uint8_t *codes, VI n) {
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(n), _mm256_extracti128_si256(n, 1));
    _mm_storel_epi64((__m128i *)codes, _mm_packus_epi16(w, w));
}
#endif

/* dec16 (Ladder.sdec16, udec16): dec[i & 7] - ((i & 7) << 20), so that dec16[c & 7] + ((c & 0xFF or
 * 0x7F) << 20) is Ladder's decode. */
INLINE VF decode_vec(const uint8_t *codes, VT dec16, VF absmax, int is_signed) {
    const VI c = load_codes(codes);
    const VI w = vi_shl(c, 20);
    VI b;
    if (is_signed) {  /* magnitude 0 for c & 127 == 0; the sign from c & 128 */
        b = vi_keep(vm_nonzero(vi_and(c, vi_set1(127))), vi_add(vt_lookup8(c, dec16), vi_and(w, vi_set1(127u << 20))));
        b = vi_or(b, vi_and(vi_shl(c, 24), vi_set1(0x80000000u)));
    } else {
        b = vi_add(vt_lookup8(c, dec16), w);
    }
    return vf_mul(vi_float(b), absmax);
}

/* Per code (Ladder.sadj, uadj, bnd9): adj[bucket] = cbase[bucket] - (bucket >> 1) + K - 1016 (+ 1 signed, for s0), so that
 * (b >> 20) + adj + (u > bnd) is Ladder's 8E + c + K - 1016; bnd9 = bnd << 9 (compared with u << 9). */
typedef struct {
    VT adj, bnd9;
    VF s0;
} Enc;

INLINE Enc enc_tables(const Ladder *L, int is_signed) {
    Enc e;
    e.adj = vt_load(is_signed ? L->sadj : L->uadj);
    e.bnd9 = vt_load(L->bnd9);
    e.s0 = vf_set1(L->s0);
    return e;
}

/* The codes of y (the correctly rounded x / absmax, or what stands for it: encode_vec_recip), given
 * b = y's bits (signed: without the sign), t = b << 9 and bn9 = its bucket's bnd9. Ladder's count,
 * clamped: for y <= 0 or NaN (signed: |y| <= s0) the count is 0; signed codes add 128 for any y < 0. */
INLINE void codes_vec(uint8_t *codes, VF y, VI b, VI t, VI bn9, const Enc *e, int is_signed) {
    VI n = vi_add(vi_shr(b, 20), vt_lookup16(vi_shr(b, 19), e->adj));
    n = vi_inc(vm_gt_u32(t, bn9), n);
    if (is_signed) {
        const VM big = vm_gt(vi_float(b), e->s0);
        n = vi_keep(big, vi_min_i32(vi_max_i32(n, vi_set1(1)), vi_set1(SIGNED_TOP)));
        n = vi_or(n, vi_keep(vm_lt(y, vf_zero()), vi_set1(128)));
    } else {
        const VM pos = vm_gt(y, vf_zero());
        n = vi_keep(pos, vi_min_i32(vi_max_i32(n, vi_zero()), vi_set1(UNSIGNED_TOP)));
    }
    store_codes(codes, n);
}

INLINE VI magnitude_bits(VF y, int is_signed) {
    const VI yb = vf_bits(y);
    return is_signed ? vi_and(yb, vi_set1(0x7FFFFFFFu)) : yb;
}

INLINE void encode_vec_div(uint8_t *codes, VF x, VF safe, const Enc *e, int is_signed) {
    const VF y = vf_div(x, safe);
    const VI b = magnitude_bits(y, is_signed), t = vi_shl(b, 9);
    codes_vec(codes, y, b, t, vt_lookup16(vi_shr(b, 19), e->bnd9), e, is_signed);
}

/* Without the division where that gives the same codes: q0 = x * (1/absmax) (both rounded) is within
 * 3 ulps of the quotient y when absmax, its reciprocal and q0 are normal, so unless a midpoint lies
 * within NEAR_ULPS of q0 (Ladder.near_ok: no midpoint's mantissa lies within 2 NEAR_ULPS of an
 * octave's or a bucket's edge, so the bucket's own midpoint is the only candidate) q0 and y have the
 * same count, sign and code. Near a midpoint, and for the signed code below 2^-15 (s0, and the sign
 * of an underflow), the vector is recomputed with the division. The unsigned code needs no such
 * check: below 2^-100 both counts are 0. */
INLINE void encode_vec_recip(uint8_t *codes, VF x, VF safe, VF recip, const Enc *e, int is_signed) {
    const VF q0 = vf_mul(x, recip);
    const VI b = magnitude_bits(q0, is_signed), t = vi_shl(b, 9);
    const VI bn9 = vt_lookup16(vi_shr(b, 19), e->bnd9);
    const VI window = vi_set1(NEAR_ULPS << 9);
    VM redo = vm_le_u32(vi_add(vi_sub(t, bn9), window), vi_add(window, window));
    if (is_signed) {
        const VM nonzero = vm_nonzero(vi_and(vf_bits(x), vi_set1(0x7FFFFFFFu)));
        redo = vm_or(redo, vm_and(nonzero, vm_gt_u32(vi_set1(0x38000000u), b)));  /* 2^-15 */
    }
    if (__builtin_expect(vm_any(redo), 0)) {
        encode_vec_div(codes, x, safe, e, is_signed);
        return;
    }
    codes_vec(codes, q0, b, t, bn9, e, is_signed);
}

INLINE void encode_block_vec(uint8_t *codes, const float *x, float absmax, const Ladder *L, int is_signed) {
    const VF safe = vf_set1(absmax > 0 ? absmax : 1.0f);
    const Enc e = enc_tables(L, is_signed);
    const uint32_t ex = bits_of(absmax) >> 23;  /* absmax >= 0 */
    if (L->near_ok && ex >= 1 && ex <= 252) {   /* normal, with a normal reciprocal */
        const VF recip = vf_set1(1.0f / absmax);
        for (int i = 0; i < QBLOCK; i += LANES) encode_vec_recip(codes + i, vf_load(x + i), safe, recip, &e, is_signed);
        return;
    }
    for (int i = 0; i < QBLOCK; i += LANES) encode_vec_div(codes + i, vf_load(x + i), safe, &e, is_signed);
}

INLINE float absmax_vec(VI m) { return float_of(vi_reduce_max_u32(m)); }

INLINE void fast_block(const LowBitTensor *t, const Group *gr, int64_t start, int amsgrad) {
    /* float32 params (other than Kahan's) and grads in place; others through buffers, as step_block */
    float p_buf[QBLOCK] __attribute__((aligned(64))), g_buf[QBLOCK] __attribute__((aligned(64)));
    const int direct = t->param_dtype == DTYPE_FLOAT32 && t->param_update != UPDATE_KAHAN;
    float *param = direct ? (float *)t->param + start : p_buf;
    if (!direct) {
        load_values(p_buf, t->param, t->param_dtype, start, QBLOCK);
        if (t->param_update == UPDATE_KAHAN) {
            const uint16_t *c = t->comp + start;
            for (int i = 0; i < QBLOCK; i++) p_buf[i] = p_buf[i] + bf16_to_float(c[i]);
        }
    }
    const float *grad = (const float *)t->grad + start;
    if (t->grad_dtype != DTYPE_FLOAT32) {
        load_values(g_buf, t->grad, t->grad_dtype, start, QBLOCK);
        grad = g_buf;
    }
    uint8_t *codes[3];
    for (int w = 0; w < 3; w++) codes[w] = t->moment[w] ? (uint8_t *)t->moment[w] + start : NULL;
    const int64_t blk = start / QBLOCK;
    const VF am = vf_set1(t->absmax[0][blk]), av = vf_set1(t->absmax[1][blk]);
    const VF ax = amsgrad ? vf_set1(t->absmax[2][blk]) : am;
    const VT sdec = vt_load(gr->ladder.sdec16), udec = vt_load(gr->ladder.udec16);
    const VF decay = vf_set1(gr->decay), coeff = vf_set1(gr->lerp_coeff);
    const VF beta2 = vf_set1(gr->beta2), omb2 = vf_set1(gr->one_minus_beta2);
    const VF eps = vf_set1(gr->eps), scale = vf_set1(gr->grad_scale);
    const VF nss = vf_set1((float)t->neg_step_size), bc2s = vf_set1((float)t->bc2_sqrt);
    const VI abs_mask = vi_set1(0x7FFFFFFFu), sign = vi_set1(0x80000000u);
    const int unscale = t->unscale, maximize = gr->maximize, wd = gr->weight_decay, small = gr->lerp_small;
    float m_out[QBLOCK] __attribute__((aligned(64))), v_out[QBLOCK] __attribute__((aligned(64)));
    float x_out[QBLOCK] __attribute__((aligned(64)));
    VI mmax = vi_zero(), vmax = mmax, xmax = mmax;
    for (int i = 0; i < QBLOCK; i += LANES) {
        VF p = vf_load(param + i), g = vf_load(grad + i);
        if (unscale) g = vf_div(g, scale);
        if (maximize) g = vi_float(vi_xor(vf_bits(g), sign));
        VF m = decode_vec(codes[0] + i, sdec, am, 1);
        VF v = decode_vec(codes[1] + i, udec, av, 0);
        if (wd) p = vf_mul(p, decay);
        m = vf_fmadd(coeff, vf_sub(g, m), small ? m : g);
        v = vf_fmadd(vf_mul(omb2, g), g, vf_mul(v, beta2));
        VF d = v;
        if (amsgrad) {
            const VF a = decode_vec(codes[2] + i, udec, ax, 0);
            d = vf_select(vm_nan(a), a, vf_max(a, v));  /* torch.maximum: NaN propagates */
            vf_store(x_out + i, d);
            xmax = vi_max_u32(xmax, vi_and(vf_bits(d), abs_mask));
        }
        p = vf_add(p, vf_div(vf_mul(nss, m), vf_add(vf_div(vf_sqrt(d), bc2s), eps)));
        vf_store(param + i, p);
        vf_store(m_out + i, m);
        vf_store(v_out + i, v);
        mmax = vi_max_u32(mmax, vi_and(vf_bits(m), abs_mask));
        vmax = vi_max_u32(vmax, vi_and(vf_bits(v), abs_mask));
    }
    if (!direct) store_param(t, p_buf, start, QBLOCK);
    const float amax_m = absmax_vec(mmax), amax_v = absmax_vec(vmax);
    t->absmax[0][blk] = amax_m;
    t->absmax[1][blk] = amax_v;
    encode_block_vec(codes[0], m_out, amax_m, &gr->ladder, 1);
    encode_block_vec(codes[1], v_out, amax_v, &gr->ladder, 0);
    if (amsgrad) {
        const float amax_x = absmax_vec(xmax);
        t->absmax[2][blk] = amax_x;
        encode_block_vec(codes[2], x_out, amax_x, &gr->ladder, 0);
    }
}

static void fast_block_plain(const LowBitTensor *t, const Group *gr, int64_t start) { fast_block(t, gr, start, 0); }
static void fast_block_amsgrad(const LowBitTensor *t, const Group *gr, int64_t start) { fast_block(t, gr, start, 1); }
#define HAVE_FAST_BLOCK 1
#else
#define HAVE_FAST_BLOCK 0
#endif

/* ---------------------------------------------------------------------------------------------
 * the call */

static int64_t tensor_at(const LowBitTensor *tensors, int64_t n, int64_t block) {
    int64_t lo = 0, hi = n - 1;  /* the last tensor whose first block is <= block */
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (tensors[mid].first_block <= block) lo = mid; else hi = mid - 1;
    }
    return lo;
}

static void fill_table(float *bounds, const float *mids, int top) {
    bounds[0] = -INFINITY;
    for (int i = 0; i < top; i++) bounds[i + 1] = mids[i];
    bounds[top + 1] = INFINITY;
}

/* codes: the signed code's 256 values and 127 midpoints, then the unsigned code's 256 values and
 * 255 midpoints (adamw.states.quantize's tables, as the host passes them); grads: each tensor's
 * grad. Returns 0, or -1 for a tensor of an unknown dtype (before anything changed). */
int adamw_low_bit_step(LowBitTensor *tensors, int64_t n, int64_t total_blocks, const void *const *grads,
                    const float *codes, double lr, double beta1, double beta2, double decay, double eps,
                    double grad_scale, int amsgrad, int maximize, int weight_decay, int num_threads) {
    for (int64_t k = 0; k < n; k++) {
        const LowBitTensor *t = &tensors[k];
        if (t->param_dtype != DTYPE_FLOAT32 && t->param_dtype != DTYPE_BFLOAT16 && t->param_dtype != DTYPE_FLOAT16)
            return -1;
        if (t->grad_dtype != DTYPE_FLOAT32 && t->grad_dtype != DTYPE_BFLOAT16 && t->grad_dtype != DTYPE_FLOAT16)
            return -1;
        if (t->moment_dtype < DTYPE_FLOAT32 || t->moment_dtype > DTYPE_UINT8 || t->moment_dtype == DTYPE_FLOAT64)
            return -1;
        if (t->step_dtype != DTYPE_FLOAT32 && t->step_dtype != DTYPE_FLOAT64) return -1;
    }
    for (int64_t k = 0; k < n; k++) {
        LowBitTensor *t = &tensors[k];
        t->grad = grads[k];
        double step;
        if (t->step_dtype == DTYPE_FLOAT64) {
            step = (*(double *)t->step += 1.0);
        } else {
            step = (double)(*(float *)t->step += 1.0f);
        }
        const int64_t whole = (int64_t)step;
        t->neg_step_size = -(lr / (1.0 - pow(beta1, (double)whole)));
        t->bc2_sqrt = pow(1.0 - pow(beta2, (double)whole), 0.5);
        const uint32_t mix = (uint32_t)whole ^ (uint32_t)((uint64_t)whole >> 32);
        for (int j = 0; j < 4; j++) t->key[j] = hash32(t->stream_key[j] ^ mix);
    }
    static Group zero;
    Group gr = zero;
    const float w = (float)(1.0 - beta1);
    gr.decay = (float)decay;
    gr.lerp_small = fabsf(w) < 0.5f;
    gr.lerp_coeff = gr.lerp_small ? w : w - 1.0f;
    gr.beta2 = (float)beta2;
    gr.one_minus_beta2 = (float)(1.0 - beta2);
    gr.eps = (float)eps;
    gr.grad_scale = (float)grad_scale;
    gr.amsgrad = amsgrad;
    gr.maximize = maximize;
    gr.weight_decay = weight_decay;
    memcpy(gr.signed_values, codes, 256 * sizeof(float));
    fill_table(gr.signed_bounds, codes + 256, SIGNED_TOP);
    memcpy(gr.unsigned_values, codes + 256 + SIGNED_TOP, 256 * sizeof(float));
    fill_table(gr.unsigned_bounds, codes + 512 + SIGNED_TOP, UNSIGNED_TOP);
    for (int i = 0; i < (1 << GUESS_BITS); i++)
        gr.guess[i] = (int32_t)lrint(8.0 * log2(1.0 + (i + 0.5) / (1 << GUESS_BITS)));
    ladder_init(&gr.ladder, codes);

    const int threads = team_size(num_threads, total_blocks, MIN_PARALLEL_BLOCKS);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const Range mine = thread_share(total_blocks, 1);
        if (mine.begin < mine.end) {
            for (int64_t i = tensor_at(tensors, n, mine.begin); i < n && tensors[i].first_block < mine.end; i++) {
                const LowBitTensor *t = &tensors[i];
                const Range part = clip(mine, t->first_block, (t->numel + QBLOCK - 1) / QBLOCK);
                int64_t b = part.begin;
#if HAVE_FAST_BLOCK
                if (gr.ladder.ok && t->moment_dtype == DTYPE_UINT8) {
                    const int64_t whole = part.end < t->numel / QBLOCK ? part.end : t->numel / QBLOCK;
                    if (gr.amsgrad)
                        for (; b < whole; b++) fast_block_amsgrad(t, &gr, b * QBLOCK);
                    else
                        for (; b < whole; b++) fast_block_plain(t, &gr, b * QBLOCK);
                }
#endif
                for (; b < part.end; b++) {
                    const int64_t start = b * QBLOCK;
                    const int64_t left = t->numel - start;
                    step_block(t, &gr, start, left < QBLOCK ? (int)left : QBLOCK);
                }
            }
        }
    }
    return 0;
}

/* The ABI version the Python loader checks, bumped with any change to LowBitTensor or adamw_low_bit_step. */
int adamw_low_bit_abi_version(void) { return 2; }
