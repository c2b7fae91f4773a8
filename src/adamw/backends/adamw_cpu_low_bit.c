/* The low-bit CPU kernel of adamw: one AdamW step with bf16, 8-bit or 4-bit moments (and bf16 params
 * written by stochastic rounding or Kahan compensation) over a whole group of tensors in one call.
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
 * Storage (adamw/states/quantize.py, formats.py, rounding.py), per tensor:
 *   moments float32, float16 (to nearest), bfloat16 (stochastic rounding), or blockwise codes with a
 *   float32 absmax per block, taken after the update (max |x|, a NaN propagating); y = x / absmax,
 *   correctly rounded (absmax 0 or NaN: 1); code = number of float32 midpoints strictly below |y|
 *   (signed code, exp_avg; plus the sign bit when y < 0) or y (unsigned code, the others); NaN: 0.
 *   Decoded as values[code] * absmax. The tables (values and midpoints) are the host's, passed each
 *   call, so any ascending table is encoded exactly.
 *   - 8-bit (uint8): one code a byte, blocks of 256, sign bit 128. The index is guessed from the
 *     float's exponent and top mantissa bits (within one of the answer on the 2^(-k/8) ladder), then
 *     fixed by comparing with the two neighbouring midpoints: quantize.Code.magnitude_index's answer.
 *   - 4-bit (DTYPE_UINT4X2): blocks of 128, sign bit 8, codes two to a byte in flat order: value 2i
 *     in the low nibble of byte i, 2i + 1 in its high nibble, 0 past an odd end. The index counts
 *     the midpoints below y with one compare each (7 signed, 15 unsigned); the fast path compares x
 *     with per-block thresholds instead (the least x whose quotient passes each midpoint, found in
 *     double; Block4): both exact for any ascending table.
 *   Stochastic rounding takes 16 bits of the draw hash32(i ^ key), i the element's flat index in its
 *   tensor (lowbias32): the low half for the param and exp_avg, the high half for exp_avg_sq and
 *   max_exp_avg_sq, whose keys are those of exp_avg and the param (one draw, two uses); key =
 *   hash32(stream_key ^ lo32(t) ^ hi32(t)) at step t, the stream keys (per tensor and purpose, the
 *   same every step) computed on the host (rounding.py).
 *
 * Work split: each tensor is a run of 256-value blocks (a 4-bit one's are two of its blocks of 128,
 * and start on a whole byte); the group's blocks are one range, cut into one contiguous piece per
 * thread (one OpenMP region per call). A block is processed in phases over 256-float stack buffers
 * (load, math, store), each a branch-free loop the compiler vectorizes. Where every moment is 8-bit
 * (and the tables pass ladder_init's check) or 4-bit, or param, grad and moments are each float32 or
 * bfloat16, whole blocks instead take a fast path (fast_block, fast4_range, fast_float_range: the
 * same operations in explicit vectors; for 8-bit codes the ladder's arithmetic form in place of table
 * lookups, for 4-bit codes thresholds in place of the division), built for AVX-512 (16 lanes) or
 * AVX2 + FMA (8 lanes).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "adamw_common.h"

enum { UPDATE_ROUND = 0, UPDATE_STOCHASTIC = 1, UPDATE_KAHAN = 2 };
enum { PURPOSE_PARAM = 0, PURPOSE_EXP_AVG = 1, PURPOSE_EXP_AVG_SQ = 2, PURPOSE_MAX = 3 };

#define QBLOCK 256          /* adamw.states.quantize.BLOCK_SIZE (checked by the host) */
#define QBLOCK4 128         /* adamw.states.quantize.BLOCK_SIZE_4BIT (checked by the host); divides QBLOCK */
#define SIGNED_TOP 127
#define UNSIGNED_TOP 255
#define SIGNED4_MIDS 7      /* midpoints of the 4-bit codes: 8 signed magnitudes, 16 unsigned values */
#define UNSIGNED4_MIDS 15
#define GUESS_BITS 6        /* mantissa bits that index the log guess table */
#define MIN_PARALLEL_BLOCKS 128

/* One tensor of a call (adamw/backends/cpu_low_bit.py, class _Tensor). The host fills what stays the
 * same from step to step, so that it can keep a group's table and pass only the new grads; the
 * fields marked "set here" are filled by adamw_low_bit_step. */
typedef struct {
    void *param;
    const void *grad;      /* set here, from the call's grads */
    void *moment[3];       /* exp_avg, exp_avg_sq, max_exp_avg_sq (NULL without amsgrad) */
    float *absmax[3];      /* 8-bit and 4-bit only */
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

/* A 4-bit code's midpoints as bounds on the quotient, for the fast path's thresholds (Block4):
 * y = x / s rounds above midpoint k exactly when x / s > bound[k], or equals it and not tie_down[k]
 * (ties to even). bound[k], halfway from the midpoint to the next float32, has at most 25
 * significant bits, so bound[k] * s is exact in double. The top `run` midpoints are mids[count - 1] * 2^-j (normal
 * floats an octave apart; run 0 for fewer than 2), the `explicit` ones below them are compared one
 * by one. `thresholds`: every midpoint is 0 or more (else the fast path divides). */
typedef struct {
    double bound[16];  /* past count: 1 (unused) */
    uint32_t tie_down[16];
    int count, run, explicit, thresholds;
} Code4;

typedef struct {
    float decay, lerp_coeff, beta2, one_minus_beta2, eps, grad_scale;
    int lerp_small, amsgrad, maximize, weight_decay;
    /* bounds[i], bounds[i + 1]: magnitude i's interval (-inf, the midpoints, +inf) */
    float signed_values[256], signed_bounds[SIGNED_TOP + 2];
    float unsigned_values[256], unsigned_bounds[UNSIGNED_TOP + 2];
    float signed4_values[16], signed4_mids[SIGNED4_MIDS], unsigned4_values[16], unsigned4_mids[UNSIGNED4_MIDS];
    int32_t guess[1 << GUESS_BITS];  /* round(8 * log2(mantissa)) at each bucket's centre */
    Ladder ladder;
    Code4 signed4, unsigned4;
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

/* Up or down at random, by the 16 bits at `shift` (0 or 16) of the element's draw: a carry out of
 * the low 16 bits rounds |x| up (rounding.py). */
INLINE uint16_t stochastic_bf16(float f, uint32_t index, uint32_t key, int shift) {
    uint32_t noise = (hash32(index ^ key) >> shift) & 0xFFFFu;
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

/* Moment `which` (0: exp_avg, signed codes; else unsigned) of values start .. start + len, as float32. */
INLINE void load_moment(float *out, const LowBitTensor *t, int which, const Group *gr, int64_t start, int len) {
    if (t->moment_dtype == DTYPE_UINT8) {
        const float *values = which == 0 ? gr->signed_values : gr->unsigned_values;
        const uint8_t *codes = (const uint8_t *)t->moment[which] + start;
        const float absmax = t->absmax[which][start / QBLOCK];
        for (int i = 0; i < len; i++) out[i] = values[codes[i]] * absmax;
    } else if (t->moment_dtype == DTYPE_UINT4X2) {
        const float *values = which == 0 ? gr->signed4_values : gr->unsigned4_values;
        const uint8_t *bytes = (const uint8_t *)t->moment[which] + start / 2;  /* start is even */
        for (int h = 0; h < len; h += QBLOCK4) {
            const float absmax = t->absmax[which][(start + h) / QBLOCK4];
            const int part = len - h < QBLOCK4 ? len - h : QBLOCK4;
            const uint8_t *b = bytes + h / 2;
            float *o = out + h;
            for (int j = 0; j < part / 2; j++) {
                o[2 * j] = values[b[j] & 15] * absmax;
                o[2 * j + 1] = values[b[j] >> 4] * absmax;
            }
            if (part & 1) o[part - 1] = values[b[part / 2] & 15] * absmax;
        }
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

/* 4-bit codes (bytes below 16) two to a byte: code 2i in the low nibble of byte i, 0 past an odd end. */
INLINE void pack_nibbles(uint8_t *packed, const uint8_t *codes, int len) {
    for (int i = 0; i < len / 2; i++) packed[i] = (uint8_t)(codes[2 * i] | codes[2 * i + 1] << 4);
    if (len & 1) packed[len / 2] = codes[len - 1];
}

/* The 4-bit codes of a block: the number of midpoints strictly below the normalized value, by one
 * compare each (false for NaN), plus the sign bit; packed. */
INLINE void encode_block4(uint8_t *packed, const float *x, int len, float absmax, const float *mids, int count,
                          int is_signed) {
    const float safe = absmax > 0 ? absmax : 1.0f;
    uint8_t codes[QBLOCK4];
    for (int i = 0; i < len; i++) {
        const float y = x[i] / safe;
        const float magnitude = is_signed ? fabsf(y) : y;
        int32_t k = 0;
        for (int j = 0; j < count; j++) k += magnitude > mids[j];
        if (is_signed) k += y < 0 ? 8 : 0;
        codes[i] = (uint8_t)k;
    }
    pack_nibbles(packed, codes, len);
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
    } else if (t->moment_dtype == DTYPE_UINT4X2) {
        uint8_t *bytes = (uint8_t *)dst + start / 2;
        for (int h = 0; h < len; h += QBLOCK4) {
            const int part = len - h < QBLOCK4 ? len - h : QBLOCK4;
            const float absmax = block_absmax(x + h, part);
            t->absmax[which][(start + h) / QBLOCK4] = absmax;
            if (which == 0)
                encode_block4(bytes + h / 2, x + h, part, absmax, gr->signed4_mids, SIGNED4_MIDS, 1);
            else
                encode_block4(bytes + h / 2, x + h, part, absmax, gr->unsigned4_mids, UNSIGNED4_MIDS, 0);
        }
    } else if (t->moment_dtype == DTYPE_BFLOAT16) {
        uint16_t *d = (uint16_t *)dst + start;
        const int shift = which == 0 ? 0 : 16;  /* exp_avg: the low half; the others the high one */
        for (int i = 0; i < len; i++) d[i] = stochastic_bf16(x[i], (uint32_t)(start + i), key, shift);
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
        for (int i = 0; i < len; i++) d[i] = stochastic_bf16(p[i], (uint32_t)(start + i), key, 0);
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
    load_moment(m, t, 0, gr, start, len);
    load_moment(v, t, 1, gr, start, len);
    if (gr->amsgrad) load_moment(vmax, t, 2, gr, start, len);

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

static void code4_init(Code4 *c, const float *mids, int count) {
    c->count = count;
    c->thresholds = 1;
    for (int k = 0; k < 16; k++) {
        const float up = k < count ? nextafterf(mids[k], INFINITY) : 1.0f;
        c->bound[k] = k < count ? ((double)mids[k] + (double)up) / 2 : 1.0;
        c->tie_down[k] = bits_of(up) & 1u;
        if (k < count && !(mids[k] >= 0)) c->thresholds = 0;
    }
    int run = 0;
    while (run < count) {
        const float m = mids[count - 1 - run];
        if (!(m >= 0x1p-126f && m <= 0x1p127f) || (run > 0 && m * 2 != mids[count - run])) break;
        run++;
    }
    c->run = run >= 2 ? run : 0;
    c->explicit = count - c->run;
}

/* ADAMW_NO_FAST_PATH (a test's build) leaves every block to step_block. */
#if !defined(ADAMW_NO_FAST_PATH) && (defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)))
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
INLINE VI vi_sra(VI a, unsigned n) { return _mm512_srai_epi32(a, n); }
INLINE VI vi_min_i32(VI a, VI b) { return _mm512_min_epi32(a, b); }
INLINE VI vi_max_i32(VI a, VI b) { return _mm512_max_epi32(a, b); }
INLINE VI vi_max_u32(VI a, VI b) { return _mm512_max_epu32(a, b); }
INLINE uint32_t vi_reduce_max_u32(VI a) { return (uint32_t)_mm512_reduce_max_epu32(a); }

INLINE VM vm_nonzero(VI a) { return _mm512_test_epi32_mask(a, a); }
INLINE VM vm_gt_u32(VI a, VI b) { return _mm512_cmpgt_epu32_mask(a, b); }
INLINE VM vm_le_u32(VI a, VI b) { return _mm512_cmple_epu32_mask(a, b); }
INLINE VM vm_gt(VF a, VF b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
INLINE VM vm_lt(VF a, VF b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
INLINE VM vm_ge(VF a, VF b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
INLINE VM vm_le(VF a, VF b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
INLINE VM vm_nan(VF a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
INLINE VM vm_and(VM a, VM b) { return a & b; }
INLINE VM vm_or(VM a, VM b) { return a | b; }
INLINE int vm_any(VM a) { return a != 0; }
INLINE VI vi_keep(VM m, VI a) { return _mm512_maskz_mov_epi32(m, a); }     /* a where m, else 0 */
INLINE VI vi_inc(VM m, VI a) { return _mm512_mask_sub_epi32(a, m, a, vi_set1(0xFFFFFFFFu)); }  /* a + 1 where m */
INLINE VF vf_select(VM m, VF a, VF b) { return _mm512_mask_mov_ps(b, m, a); }  /* a where m, else b */
INLINE VI vi_select(VM m, VI a, VI b) { return _mm512_mask_mov_epi32(b, m, a); }  /* a where m, else b */
INLINE VI vi_mullo(VI a, VI b) { return _mm512_mullo_epi32(a, b); }
INLINE VI vi_iota(void) { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
/* LANES bfloat16s as float32 */
INLINE VF load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
/* LANES values below 2^16 as uint16 */
INLINE void store_u16(uint16_t *p, VI a) { _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(a)); }
/* 2 LANES values below 2^16 as uint16, a's then b's */
INLINE void store_u16x2(uint16_t *p, VI a, VI b) {
    store_u16(p, a);
    store_u16(p + LANES, b);
}

INLINE VT vt_load(const uint32_t *table16) { return _mm512_loadu_si512(table16); }
/* bits(values[i] * s) */
INLINE VT vt_scaled(const float *values16, float s) {
    return _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(values16), _mm512_set1_ps(s)));
}
/* t[i & 15] */
INLINE VI vt_lookup16(VI i, VT t) { return _mm512_permutexvar_epi32(i, t); }
/* t[i & 7], for a table whose entries repeat with period 8 */
INLINE VI vt_lookup8(VI i, VT t) { return _mm512_permutexvar_epi32(i, t); }

INLINE VI load_codes(const uint8_t *codes) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)codes)); }
/* n in 0..255 */
INLINE void store_codes(uint8_t *codes, VI n) { _mm_storeu_si128((__m128i *)codes, _mm512_cvtepi32_epi8(n)); }
/* 32 codes below 16, 16 in each of n[0], n[1], two to a byte: code 2i in the low nibble of byte i
 * (maddubs: code 2i + 16 * code 2i + 1 in each 16-bit lane) */
INLINE void store_nibbles32(uint8_t *packed, const VI *n) {
    const __m128i weights = _mm_set1_epi16(0x1001);
    const __m128i a = _mm_maddubs_epi16(_mm512_cvtepi32_epi8(n[0]), weights);
    const __m128i b = _mm_maddubs_epi16(_mm512_cvtepi32_epi8(n[1]), weights);
    _mm_storeu_si128((__m128i *)packed, _mm_packus_epi16(a, b));
}
/* 4-bit codes two to a byte: lane j's low 4 bits are code j (the bits above it are not cleared) */
INLINE VI load_nibbles(const uint8_t *packed) {
    const VI word = _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)packed));
    const VI pick = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const VI shift = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    return _mm512_srlv_epi32(_mm512_permutexvar_epi32(pick, word), shift);
}

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
INLINE VI vi_sra(VI a, unsigned n) { return _mm256_srai_epi32(a, (int)n); }
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
INLINE VM vm_ge(VF a, VF b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_GE_OQ)); }
INLINE VM vm_le(VF a, VF b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_LE_OQ)); }
INLINE VM vm_nan(VF a) { return _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)); }
INLINE VM vm_and(VM a, VM b) { return _mm256_and_si256(a, b); }
INLINE VM vm_or(VM a, VM b) { return _mm256_or_si256(a, b); }
INLINE int vm_any(VM a) { return !_mm256_testz_si256(a, a); }
INLINE VI vi_keep(VM m, VI a) { return _mm256_and_si256(m, a); }     /* a where m, else 0 */
INLINE VI vi_inc(VM m, VI a) { return _mm256_sub_epi32(a, m); }      /* a + 1 where m (m = -1) */
INLINE VF vf_select(VM m, VF a, VF b) { return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m)); }
INLINE VI vi_select(VM m, VI a, VI b) { return _mm256_blendv_epi8(b, a, m); }  /* a where m, else b */
INLINE VI vi_mullo(VI a, VI b) { return _mm256_mullo_epi32(a, b); }
INLINE VI vi_iota(void) { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
/* LANES bfloat16s as float32 */
INLINE VF load_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
/* LANES values below 2^16 as uint16 (so that the saturating pack changes nothing) */
INLINE void store_u16(uint16_t *p, VI a) {
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1)));
}
/* 2 LANES values below 2^16 as uint16, a's then b's: one pack (which interleaves the 128-bit
 * lanes: a 0-3, b 0-3, a 4-7, b 4-7) and one permutation of its 64-bit quarters */
INLINE void store_u16x2(uint16_t *p, VI a, VI b) {
    _mm256_storeu_si256((__m256i *)p, _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8));
}

INLINE VT vt_load(const uint32_t *table16) {
    VT t;
    t.lo = _mm256_loadu_si256((const __m256i *)table16);
    t.hi = _mm256_loadu_si256((const __m256i *)(table16 + 8));
    return t;
}
/* bits(values[i] * s) */
INLINE VT vt_scaled(const float *values16, float s) {
    VT t;
    t.lo = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(values16), _mm256_set1_ps(s)));
    t.hi = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(values16 + 8), _mm256_set1_ps(s)));
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
/* 32 codes below 16, 8 in each of n[0..3], two to a byte: code 2i in the low nibble of byte i. The
 * packs interleave the 128-bit lanes (dwords of 4 codes: n0 0-3, n1 0-3, n2 0-3, n3 0-3, then the
 * 4-7s), the permutation restores their order, and maddubs makes code 2i + 16 * code 2i + 1 of each
 * pair of bytes. */
INLINE void store_nibbles32(uint8_t *packed, const VI *n) {
    const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(n[0], n[1]), _mm256_packus_epi32(n[2], n[3]));
    const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    const __m256i pairs = _mm256_maddubs_epi16(ordered, _mm256_set1_epi16(0x1001));
    const __m128i lo = _mm256_castsi256_si128(pairs), hi = _mm256_extracti128_si256(pairs, 1);
    _mm_storeu_si128((__m128i *)packed, _mm_packus_epi16(lo, hi));
}
/* 4-bit codes two to a byte: lane j's low 4 bits are code j (the bits above it are not cleared) */
INLINE VI load_nibbles(const uint8_t *packed) {
    uint32_t word;
    memcpy(&word, packed, 4);
    return _mm256_srlv_epi32(_mm256_set1_epi32((int)word), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
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

/* ---------------------------------------------------------------------------------------------
 * the fast paths' update: step_block's operations on LANES values */

typedef struct {
    VF decay, coeff, beta2, omb2, eps, scale, nss, bc2s;
    VI sign;    /* the sign bit with maximize, else 0 */
    VM small;   /* all lanes with torch's lerp form for |w| < 0.5 */
    int unscale;
} Update;

INLINE Update update_init(const LowBitTensor *t, const Group *gr) {
    Update u;
    u.decay = vf_set1(gr->weight_decay ? gr->decay : 1.0f);
    u.coeff = vf_set1(gr->lerp_coeff);
    u.beta2 = vf_set1(gr->beta2);
    u.omb2 = vf_set1(gr->one_minus_beta2);
    u.eps = vf_set1(gr->eps);
    u.scale = vf_set1(gr->grad_scale);
    u.nss = vf_set1((float)t->neg_step_size);
    u.bc2s = vf_set1((float)t->bc2_sqrt);
    u.sign = vi_set1(gr->maximize ? 0x80000000u : 0);
    u.small = vm_nonzero(vi_set1(gr->lerp_small ? 1 : 0));
    u.unscale = t->unscale;
    return u;
}

/* The new p from p and g; m, v and (amsgrad) vmax, decoded, are updated in place. */
INLINE VF update_vec(const Update *u, VF p, VF g, VF *m, VF *v, VF *vmax, int amsgrad) {
    if (u->unscale) g = vf_div(g, u->scale);
    g = vi_float(vi_xor(vf_bits(g), u->sign));  /* -g with maximize */
    p = vf_mul(p, u->decay);                    /* by 1 (exactly p) without weight decay */
    *m = vf_fmadd(u->coeff, vf_sub(g, *m), vf_select(u->small, *m, g));
    *v = vf_fmadd(vf_mul(u->omb2, g), g, vf_mul(*v, u->beta2));
    VF d = *v;
    if (amsgrad) {
        const VF a = *vmax;
        d = *vmax = vf_select(vm_nan(a), a, vf_max(a, *v));  /* torch.maximum: NaN propagates */
    }
    return vf_add(p, vf_div(vf_mul(u->nss, *m), vf_add(vf_div(vf_sqrt(d), u->bc2s), u->eps)));
}

/* One vector of a fast path's block, after its moments are decoded: the param updated in place, the
 * new moments kept in the block's buffers out[0..2] (max_exp_avg_sq with amsgrad) and their running
 * max |x| (the block's absmax: a NaN's bits order above infinity's) in max[0..2]. */
INLINE void update_lanes(const Update *u, float *param, const float *grad, VF m, VF v, VF x, int amsgrad,
                         float *const out[3], VI max[3]) {
    vf_store(param, update_vec(u, vf_load(param), vf_load(grad), &m, &v, &x, amsgrad));
    const VI abs_mask = vi_set1(0x7FFFFFFFu);
    vf_store(out[0], m);
    vf_store(out[1], v);
    max[0] = vi_max_u32(max[0], vi_and(vf_bits(m), abs_mask));
    max[1] = vi_max_u32(max[1], vi_and(vf_bits(v), abs_mask));
    if (amsgrad) {
        vf_store(out[2], x);
        max[2] = vi_max_u32(max[2], vi_and(vf_bits(x), abs_mask));
    }
}

/* Values start .. start + len of the param and grad as float32: float32 params (other than Kahan's)
 * and grads in place, others loaded into the buffers, as step_block does. Returns whether the param
 * is in place (else store_param writes p_buf back). */
INLINE int stage(const LowBitTensor *t, int64_t start, int len, float *p_buf, float *g_buf, float **param,
                 const float **grad) {
    const int direct = t->param_dtype == DTYPE_FLOAT32 && t->param_update != UPDATE_KAHAN;
    *param = direct ? (float *)t->param + start : p_buf;
    if (!direct) {
        load_values(p_buf, t->param, t->param_dtype, start, len);
        if (t->param_update == UPDATE_KAHAN) {
            const uint16_t *c = t->comp + start;
            for (int i = 0; i < len; i++) p_buf[i] = p_buf[i] + bf16_to_float(c[i]);
        }
    }
    *grad = (const float *)t->grad + start;
    if (t->grad_dtype != DTYPE_FLOAT32) {
        load_values(g_buf, t->grad, t->grad_dtype, start, len);
        *grad = g_buf;
    }
    return direct;
}

/* ---------------------------------------------------------------------------------------------
 * the 8-bit fast path: a whole block of a tensor whose moments are all 8-bit */

INLINE void fast_block(const LowBitTensor *t, const Group *gr, int64_t start, int amsgrad) {
    float p_buf[QBLOCK] __attribute__((aligned(64))), g_buf[QBLOCK] __attribute__((aligned(64)));
    float *param;
    const float *grad;
    const int direct = stage(t, start, QBLOCK, p_buf, g_buf, &param, &grad);
    uint8_t *codes[3];
    for (int w = 0; w < 3; w++) codes[w] = t->moment[w] ? (uint8_t *)t->moment[w] + start : NULL;
    const int64_t blk = start / QBLOCK;
    const VF am = vf_set1(t->absmax[0][blk]), av = vf_set1(t->absmax[1][blk]);
    const VF ax = amsgrad ? vf_set1(t->absmax[2][blk]) : am;
    const VT sdec = vt_load(gr->ladder.sdec16), udec = vt_load(gr->ladder.udec16);
    const Update u = update_init(t, gr);
    float m_out[QBLOCK] __attribute__((aligned(64))), v_out[QBLOCK] __attribute__((aligned(64)));
    float x_out[QBLOCK] __attribute__((aligned(64)));
    VI max[3] = {vi_zero(), vi_zero(), vi_zero()};
    for (int i = 0; i < QBLOCK; i += LANES) {
        VF m = decode_vec(codes[0] + i, sdec, am, 1), v = decode_vec(codes[1] + i, udec, av, 0);
        VF x = amsgrad ? decode_vec(codes[2] + i, udec, ax, 0) : v;
        float *const out[3] = {m_out + i, v_out + i, x_out + i};
        update_lanes(&u, param + i, grad + i, m, v, x, amsgrad, out, max);
    }
    if (!direct) store_param(t, p_buf, start, QBLOCK);
    const float amax_m = absmax_vec(max[0]), amax_v = absmax_vec(max[1]);
    t->absmax[0][blk] = amax_m;
    t->absmax[1][blk] = amax_v;
    encode_block_vec(codes[0], m_out, amax_m, &gr->ladder, 1);
    encode_block_vec(codes[1], v_out, amax_v, &gr->ladder, 0);
    if (amsgrad) {
        const float amax_x = absmax_vec(max[2]);
        t->absmax[2][blk] = amax_x;
        encode_block_vec(codes[2], x_out, amax_x, &gr->ladder, 0);
    }
}

/* ---------------------------------------------------------------------------------------------
 * the 4-bit fast path: whole blocks of a tensor whose moments are all 4-bit, each block updated into
 * buffers, then encoded. Decoding looks each code up in the block's table scaled by its absmax
 * (values[c] * absmax, step_block's product). Encoding compares each value with the block's
 * thresholds instead of dividing it (see Block4): the same codes as encode_block4's, for any table. */

INLINE VF decode4_vec(const uint8_t *packed, VT scaled) { return vi_float(vt_lookup16(load_nibbles(packed), scaled)); }

/* A block's thresholds: threshold k is the least float32 x with x / s (correctly rounded) above
 * midpoint k, so that, x / s being non-decreasing in x, the count of midpoints below |y| (signed
 * code) or y is the count of thresholds at or below |x| or x. The signed code's 7 are searched
 * (`sorted`, NaN after them: 3 compares). The unsigned code counts its run from the bits,
 * clamp((bits(x) - run_base) >> 23, 0, run) for x > 0 with run_base = bits(the top threshold) -
 * (run << 23), and compares x with each threshold below the run (`below`). The run's thresholds are
 * the top one's times 2^-j: so are their bounds (Code4), and the least float32 above a bound scales
 * with it while normal, as every threshold here is. y < 0 exactly when x <= sign. */
typedef struct {
    VT sorted;
    VF middle, sign;
    VI run_base, run;
    VF below[UNSIGNED4_MIDS];
} Block4;

/* Threshold k for the safe absmax s: the float32 next above bound * s, or bound * s itself where a
 * float32 and the tie does not round down. */
INLINE uint32_t threshold4(const Code4 *c, int k, float s) {
    const double scaled = c->bound[k] * (double)s;
    const float f = (float)scaled;
    const double back = (double)f;
    return bits_of(f) + ((uint32_t)(back < scaled) | ((uint32_t)(back == scaled) & c->tie_down[k]));
}

/* Whether a block with this absmax has its Block4: its thresholds are normal floats (else it takes
 * the quotients, as encode_block4). */
INLINE int block4_init(Block4 *b, const Code4 *c, float absmax, int is_signed) {
    const float s = absmax > 0 ? absmax : 1.0f;
    if (!c->thresholds || s == INFINITY || c->bound[0] * (double)s < 0x1p-126) return 0;
    uint32_t t[16];
    if (is_signed) {
        for (int k = 0; k < 8; k++) t[k] = threshold4(c, k, s);  /* one loop of 8: vectorized */
        for (int k = SIGNED4_MIDS; k < 16; k++) t[k] = 0x7FC00000u;  /* NaN: never at or below x */
        b->sorted = vt_load(t);
        b->middle = vi_float(vi_set1(t[3]));
        /* zero's: x / s rounds above 0 from 2^-150 * s up (a tie to 0): in units of 2^-149, s / 2 */
        const uint32_t zero = s < 0x1p24f ? (uint32_t)((double)s * 0.5) + 1 : bits_of((float)(s * 0x1p-150)) + 1;
        b->sign = vf_set1(-float_of(zero));
        return 1;
    }
    const uint32_t top = threshold4(c, c->count - 1, s);
    b->run_base = vi_set1(top - ((uint32_t)c->run << 23));
    b->run = vi_set1((uint32_t)c->run);
    for (int e = 0; e < c->explicit; e++) b->below[e] = vi_float(vi_set1(threshold4(c, e, s)));
    return 1;
}

/* The codes (below 16) of LANES values x. */
INLINE VI codes4_vec(VF x, const Block4 *b, const Code4 *c, int is_signed) {
    if (is_signed) {  /* thresholds 0-6: 3 at or below (4), then 1 or 5 (2), then 0, 2, 4 or 6 (1) */
        const VF magnitude = vi_float(vi_and(vf_bits(x), vi_set1(0x7FFFFFFFu)));
        VI n = vi_keep(vm_ge(magnitude, b->middle), vi_set1(4));
        n = vi_or(n, vi_keep(vm_ge(magnitude, vi_float(vt_lookup8(vi_or(n, vi_set1(1)), b->sorted))), vi_set1(2)));
        n = vi_inc(vm_ge(magnitude, vi_float(vt_lookup8(n, b->sorted))), n);
        return vi_or(n, vi_keep(vm_le(x, b->sign), vi_set1(8)));
    }
    VI n = vi_zero();
    if (c->run) {  /* max(x, 0) is 0 for NaN (its second operand) */
        const VI octaves = vi_sra(vi_sub(vf_bits(vf_max(x, vf_zero())), b->run_base), 23);
        n = vi_min_i32(vi_max_i32(octaves, vi_zero()), b->run);
    }
    for (int e = 0; e < c->explicit; e++) n = vi_inc(vm_ge(x, b->below[e]), n);  /* NaN: never */
    return n;
}

/* As encode_block4 (the quotients), for a block without thresholds. */
INLINE VI codes4_div_vec(VF x, VF safe, const float *mids, int count, int is_signed) {
    const VF y = vf_div(x, safe);
    const VF magnitude = is_signed ? vi_float(vi_and(vf_bits(y), vi_set1(0x7FFFFFFFu))) : y;
    VI n = vi_zero();
    for (int j = 0; j < count; j++) n = vi_inc(vm_gt(magnitude, vf_set1(mids[j])), n);  /* NaN: never */
    if (is_signed) n = vi_or(n, vi_keep(vm_lt(y, vf_zero()), vi_set1(8)));
    return n;
}

#define NIBBLE_VECS (32 / LANES)  /* vectors of codes that store_nibbles32 packs */

/* A block's codes: by its thresholds, or its quotients where it has none. */
INLINE void encode4_block_vec(uint8_t *packed, const float *x, float absmax, const Code4 *code, const float *mids,
                              int is_signed) {
    Block4 b;
    if (block4_init(&b, code, absmax, is_signed)) {
        for (int i = 0; i < QBLOCK4; i += 32) {
            VI n[NIBBLE_VECS];
            for (int l = 0; l < NIBBLE_VECS; l++) n[l] = codes4_vec(vf_load(x + i + l * LANES), &b, code, is_signed);
            store_nibbles32(packed + i / 2, n);
        }
        return;
    }
    const VF safe = vf_set1(absmax > 0 ? absmax : 1.0f);
    for (int i = 0; i < QBLOCK4; i += 32) {
        VI n[NIBBLE_VECS];
        for (int l = 0; l < NIBBLE_VECS; l++)
            n[l] = codes4_div_vec(vf_load(x + i + l * LANES), safe, mids, code->count, is_signed);
        store_nibbles32(packed + i / 2, n);
    }
}

/* Whole blocks of 4-bit moments from value `start` to `end` (multiples of QBLOCK). */
INLINE void fast4_range(const LowBitTensor *t, const Group *gr, int64_t start, int64_t end, int amsgrad) {
    float p_buf[QBLOCK4] __attribute__((aligned(64))), g_buf[QBLOCK4] __attribute__((aligned(64)));
    float m_out[QBLOCK4] __attribute__((aligned(64))), v_out[QBLOCK4] __attribute__((aligned(64)));
    float x_out[QBLOCK4] __attribute__((aligned(64)));
    const Update u = update_init(t, gr);
    for (int64_t at = start; at < end; at += QBLOCK4) {
        float *param;
        const float *grad;
        const int direct = stage(t, at, QBLOCK4, p_buf, g_buf, &param, &grad);
        const int64_t blk = at / QBLOCK4;
        const VT mdec = vt_scaled(gr->signed4_values, t->absmax[0][blk]);
        const VT vdec = vt_scaled(gr->unsigned4_values, t->absmax[1][blk]);
        const VT xdec = amsgrad ? vt_scaled(gr->unsigned4_values, t->absmax[2][blk]) : vdec;
        uint8_t *mc = (uint8_t *)t->moment[0] + at / 2, *vc = (uint8_t *)t->moment[1] + at / 2;
        uint8_t *xc = amsgrad ? (uint8_t *)t->moment[2] + at / 2 : mc;
        VI max[3] = {vi_zero(), vi_zero(), vi_zero()};
        for (int i = 0; i < QBLOCK4; i += LANES) {
            VF m = decode4_vec(mc + i / 2, mdec), v = decode4_vec(vc + i / 2, vdec);
            VF x = amsgrad ? decode4_vec(xc + i / 2, xdec) : v;
            float *const out[3] = {m_out + i, v_out + i, x_out + i};
            update_lanes(&u, param + i, grad + i, m, v, x, amsgrad, out, max);
        }
        if (!direct) store_param(t, p_buf, at, QBLOCK4);
        const float amax_m = t->absmax[0][blk] = absmax_vec(max[0]), amax_v = t->absmax[1][blk] = absmax_vec(max[1]);
        encode4_block_vec(mc, m_out, amax_m, &gr->signed4, gr->signed4_mids, 1);
        encode4_block_vec(vc, v_out, amax_v, &gr->unsigned4, gr->unsigned4_mids, 0);
        if (amsgrad) {
            const float amax_x = t->absmax[2][blk] = absmax_vec(max[2]);
            encode4_block_vec(xc, x_out, amax_x, &gr->unsigned4, gr->unsigned4_mids, 0);
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * the float fast path: moments stored as float32 or bfloat16 (by stochastic rounding), float32 or
 * bfloat16 params (to nearest, stochastic rounding or Kahan) and grads; step_block's operations,
 * LANES values at a time, read straight from the tensors (bfloat16 results go through a block's
 * buffers: fast_float_range). */

INLINE VI hash32_vec(VI x) {
    x = vi_xor(x, vi_shr(x, 16));
    x = vi_mullo(x, vi_set1(0x7FEB352Du));
    x = vi_xor(x, vi_shr(x, 15));
    x = vi_mullo(x, vi_set1(0x846CA68Bu));
    return vi_xor(x, vi_shr(x, 16));
}

INLINE VF load_float(const void *src, int dtype, int64_t i) {
    return dtype == DTYPE_FLOAT32 ? vf_load((const float *)src + i) : load_bf16((const uint16_t *)src + i);
}

/* float_to_bf16's and stochastic_bf16's bits, given f's bits u rounded by adding `carry` */
INLINE VI bf16_bits(VF f, VI carry) {
    return vi_select(vm_nan(f), vi_set1(0x7FC0u), vi_shr(vi_add(vf_bits(f), carry), 16));
}
INLINE VI bf16_nearest(VF f) { return bf16_bits(f, vi_add(vi_set1(0x7FFFu), vi_and(vi_shr(vf_bits(f), 16), vi_set1(1)))); }
/* stochastic_bf16 by the low (shift 0) or high (16) half of the lanes' draws */
INLINE VI bf16_stochastic(VF f, VI draw, int shift) {
    return bf16_bits(f, shift ? vi_shr(draw, 16) : vi_and(draw, vi_set1(0xFFFFu)));
}

/* How the float fast path writes a param: float32, or bfloat16 to nearest, by stochastic rounding
 * or with Kahan compensation. Each kind (with the moments' dtype and amsgrad) has its own compiled
 * loop, so that no test of them is left in it (measured: 14% of the step). */
enum { PARAM_FLOAT32 = 0, PARAM_NEAREST = 1, PARAM_STOCHASTIC = 2, PARAM_KAHAN = 3 };

/* Values start .. end (whole blocks) of a tensor whose param, grad and moments are each float32 or
 * bfloat16. A block in two passes: the update (float32 results stored in place, bfloat16 ones into
 * the block's buffers), then the rounding of the buffers to bfloat16. */
INLINE void fast_float_range(const LowBitTensor *t, const Group *gr, int64_t start, int64_t end, const int kind,
                             const int bf16_moments, const int amsgrad) {
    float p_buf[QBLOCK] __attribute__((aligned(64))), m_buf[QBLOCK] __attribute__((aligned(64)));
    float v_buf[QBLOCK] __attribute__((aligned(64))), x_buf[QBLOCK] __attribute__((aligned(64)));
    const Update u = update_init(t, gr);
    const int bf16_param = kind != PARAM_FLOAT32, md = bf16_moments ? DTYPE_BFLOAT16 : DTYPE_FLOAT32;
    const int bf16_grad = t->grad_dtype == DTYPE_BFLOAT16;
    /* held here, not read through t: the stores below could alias t, and its fields would be reloaded
     * on every iteration (measured: 20% of the step) */
    void *const param = t->param, *const moment[3] = {t->moment[0], t->moment[1], t->moment[2]};
    const void *const grad = t->grad;
    uint16_t *const comp = t->comp;
    /* the two draws' keys: the param's (and max_exp_avg_sq's), the moments' */
    const uint32_t key_param = t->key[PURPOSE_PARAM], key_moments = t->key[PURPOSE_EXP_AVG];
    float *const p_out = bf16_param ? p_buf : (float *)param;  /* where the update's results go: */
    float *const m_out = bf16_moments ? m_buf : (float *)moment[0];  /* float32 tensors themselves, */
    float *const v_out = bf16_moments ? v_buf : (float *)moment[1];  /* else the buffers, indexed */
    float *const x_out = bf16_moments ? x_buf : (float *)moment[2];  /* from the block's start */
    const VI lanes = vi_iota();
    for (int64_t at = start; at < end; at += QBLOCK) {
        const int64_t p_at = bf16_param ? 0 : at, m_at = bf16_moments ? 0 : at;
        for (int j = 0; j < QBLOCK; j += LANES) {
            const int64_t i = at + j;
            VF p = bf16_param ? load_bf16((const uint16_t *)param + i) : vf_load((const float *)param + i);
            if (kind == PARAM_KAHAN) p = vf_add(p, load_bf16(comp + i));
            const VF g = bf16_grad ? load_bf16((const uint16_t *)grad + i) : vf_load((const float *)grad + i);
            VF m = load_float(moment[0], md, i), v = load_float(moment[1], md, i);
            VF x = amsgrad ? load_float(moment[2], md, i) : v;
            p = update_vec(&u, p, g, &m, &v, &x, amsgrad);
            vf_store(p_out + p_at + j, p);
            vf_store(m_out + m_at + j, m);
            vf_store(v_out + m_at + j, v);
            if (amsgrad) vf_store(x_out + m_at + j, x);
        }
        if (!bf16_param && !bf16_moments) continue;
        for (int j = 0; j < QBLOCK; j += 2 * LANES) {  /* two vectors at a time: one store of each */
            const int64_t i = at + j;
            VI draw_p[2], draw_m[2];
            for (int h = 0; h < 2; h++) {
                const VI index = vi_add(vi_set1((uint32_t)(i + h * LANES)), lanes);
                draw_p[h] = kind == PARAM_STOCHASTIC || (amsgrad && bf16_moments)
                                ? hash32_vec(vi_xor(index, vi_set1(key_param))) : vi_zero();
                draw_m[h] = bf16_moments ? hash32_vec(vi_xor(index, vi_set1(key_moments))) : vi_zero();
            }
            const VF p0 = vf_load(p_buf + j), p1 = vf_load(p_buf + j + LANES);
            if (kind == PARAM_STOCHASTIC) {
                store_u16x2((uint16_t *)param + i, bf16_stochastic(p0, draw_p[0], 0), bf16_stochastic(p1, draw_p[1], 0));
            } else if (bf16_param) {
                const VI s0 = bf16_nearest(p0), s1 = bf16_nearest(p1);
                store_u16x2((uint16_t *)param + i, s0, s1);
                if (kind == PARAM_KAHAN)
                    store_u16x2(comp + i, bf16_nearest(vf_sub(p0, vi_float(vi_shl(s0, 16)))),
                                bf16_nearest(vf_sub(p1, vi_float(vi_shl(s1, 16)))));
            }
            if (bf16_moments) {
                store_u16x2((uint16_t *)moment[0] + i, bf16_stochastic(vf_load(m_buf + j), draw_m[0], 0),
                            bf16_stochastic(vf_load(m_buf + j + LANES), draw_m[1], 0));
                store_u16x2((uint16_t *)moment[1] + i, bf16_stochastic(vf_load(v_buf + j), draw_m[0], 16),
                            bf16_stochastic(vf_load(v_buf + j + LANES), draw_m[1], 16));
                if (amsgrad)
                    store_u16x2((uint16_t *)moment[2] + i, bf16_stochastic(vf_load(x_buf + j), draw_p[0], 16),
                                bf16_stochastic(vf_load(x_buf + j + LANES), draw_p[1], 16));
            }
        }
    }
}

/* A tensor's whole blocks begin .. end (of QBLOCK values) on a fast path. */
typedef void (*FastBlocks)(const LowBitTensor *, const Group *, int64_t, int64_t);
static void fast8_plain(const LowBitTensor *t, const Group *gr, int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b++) fast_block(t, gr, b * QBLOCK, 0);
}
static void fast8_amsgrad(const LowBitTensor *t, const Group *gr, int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b++) fast_block(t, gr, b * QBLOCK, 1);
}
static void fast4_plain(const LowBitTensor *t, const Group *gr, int64_t begin, int64_t end) {
    fast4_range(t, gr, begin * QBLOCK, end * QBLOCK, 0);
}
static void fast4_amsgrad(const LowBitTensor *t, const Group *gr, int64_t begin, int64_t end) {
    fast4_range(t, gr, begin * QBLOCK, end * QBLOCK, 1);
}
#define FLOAT_PATH(KIND, BF16_MOMENTS, AMSGRAD)                                                       \
    static void fast_float_##KIND##_##BF16_MOMENTS##_##AMSGRAD(const LowBitTensor *t, const Group *gr,   \
                                                               int64_t begin, int64_t end) {            \
        fast_float_range(t, gr, begin * QBLOCK, end * QBLOCK, KIND, BF16_MOMENTS, AMSGRAD);             \
    }
#define FLOAT_PATHS(KIND) FLOAT_PATH(KIND, 0, 0) FLOAT_PATH(KIND, 0, 1) FLOAT_PATH(KIND, 1, 0) FLOAT_PATH(KIND, 1, 1)
FLOAT_PATHS(PARAM_FLOAT32)
FLOAT_PATHS(PARAM_NEAREST)
FLOAT_PATHS(PARAM_STOCHASTIC)
FLOAT_PATHS(PARAM_KAHAN)
#define FLOAT_ROW(KIND)                                                                                  \
    { {fast_float_##KIND##_0_0, fast_float_##KIND##_0_1}, {fast_float_##KIND##_1_0, fast_float_##KIND##_1_1} }
/* [kind][bf16 moments][amsgrad] */
static const FastBlocks float_paths[4][2][2] = {
    FLOAT_ROW(PARAM_FLOAT32), FLOAT_ROW(PARAM_NEAREST), FLOAT_ROW(PARAM_STOCHASTIC), FLOAT_ROW(PARAM_KAHAN)};

INLINE int float32_or_bf16(int dtype) { return dtype == DTYPE_FLOAT32 || dtype == DTYPE_BFLOAT16; }

/* The fast path for tensor t's whole blocks, or NULL where it has none. */
static FastBlocks fast_path(const LowBitTensor *t, const Group *gr) {
    if (t->moment_dtype == DTYPE_UINT8 && gr->ladder.ok) return gr->amsgrad ? fast8_amsgrad : fast8_plain;
    if (t->moment_dtype == DTYPE_UINT4X2) return gr->amsgrad ? fast4_amsgrad : fast4_plain;
    if (float32_or_bf16(t->moment_dtype) && float32_or_bf16(t->param_dtype) && float32_or_bf16(t->grad_dtype)) {
        const int kind = t->param_dtype == DTYPE_FLOAT32 ? PARAM_FLOAT32
                         : t->param_update == UPDATE_STOCHASTIC ? PARAM_STOCHASTIC
                         : t->param_update == UPDATE_KAHAN ? PARAM_KAHAN : PARAM_NEAREST;
        return float_paths[kind][t->moment_dtype == DTYPE_BFLOAT16][gr->amsgrad != 0];
    }
    return NULL;
}

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

/* codes: the 8-bit signed code's 256 values and 127 midpoints, the unsigned code's 256 values and
 * 255 midpoints, then the 4-bit signed code's 16 values and 7 midpoints and the unsigned code's 16
 * values and 15 midpoints (adamw.states.quantize's tables, as the host passes them); grads: each
 * tensor's grad. Returns 0, or -1 for a tensor of an unknown dtype (before anything changed). */
int adamw_low_bit_step(LowBitTensor *tensors, int64_t n, int64_t total_blocks, const void *const *grads,
                    const float *codes, double lr, double beta1, double beta2, double decay, double eps,
                    double grad_scale, int amsgrad, int maximize, int weight_decay, int num_threads) {
    for (int64_t k = 0; k < n; k++) {
        const LowBitTensor *t = &tensors[k];
        if (t->param_dtype != DTYPE_FLOAT32 && t->param_dtype != DTYPE_BFLOAT16 && t->param_dtype != DTYPE_FLOAT16)
            return -1;
        if (t->grad_dtype != DTYPE_FLOAT32 && t->grad_dtype != DTYPE_BFLOAT16 && t->grad_dtype != DTYPE_FLOAT16)
            return -1;
        if (t->moment_dtype < DTYPE_FLOAT32 || t->moment_dtype > DTYPE_UINT4X2 || t->moment_dtype == DTYPE_FLOAT64)
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
    const float *codes4 = codes + 512 + SIGNED_TOP + UNSIGNED_TOP;
    memcpy(gr.signed4_values, codes4, 16 * sizeof(float));
    memcpy(gr.signed4_mids, codes4 + 16, SIGNED4_MIDS * sizeof(float));
    memcpy(gr.unsigned4_values, codes4 + 16 + SIGNED4_MIDS, 16 * sizeof(float));
    memcpy(gr.unsigned4_mids, codes4 + 32 + SIGNED4_MIDS, UNSIGNED4_MIDS * sizeof(float));
    code4_init(&gr.signed4, gr.signed4_mids, SIGNED4_MIDS);
    code4_init(&gr.unsigned4, gr.unsigned4_mids, UNSIGNED4_MIDS);

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
                const FastBlocks fast = fast_path(t, &gr);
                const int64_t whole = part.end < t->numel / QBLOCK ? part.end : t->numel / QBLOCK;
                if (fast && b < whole) {
                    fast(t, &gr, b, whole);
                    b = whole;
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
int adamw_low_bit_abi_version(void) { return 4; }
