/* What adamw's C sources share: the dtype codes the hosts pass, bit casts and the low-precision
 * conversions, and the OpenMP work split. All of it is static and inlined, so each library holds
 * its own copy and depends on no other; each library's cache name hashes this file's bytes with its
 * source's (_native.py), so an edit here rebuilds them all. */
#ifndef ADAMW_COMMON_H
#define ADAMW_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define INLINE static inline __attribute__((always_inline))

/* As the hosts number them (_DTYPE_CODES in backends/cpu.py and backends/cpu_low_bit.py). UINT4X2:
 * 4-bit codes two to a byte, a moment storage of the low-bit kernel (no torch dtype of its own). */
enum { DTYPE_FLOAT32 = 0, DTYPE_FLOAT64 = 1, DTYPE_BFLOAT16 = 2, DTYPE_FLOAT16 = 3, DTYPE_UINT8 = 4, DTYPE_UINT4X2 = 5 };

/* ---------------------------------------------------------------------------------------------
 * bit casts and low-precision conversions (branch-free, so loops vectorize) */

INLINE uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
INLINE float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

INLINE float bf16_to_float(uint16_t h) { return float_of((uint32_t)h << 16); }

/* Round to nearest even, NaN to the canonical quiet NaN: c10::BFloat16's rule. */
INLINE uint16_t float_to_bf16(float f) {
    uint32_t u = bits_of(f);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(f != f ? 0x7FC0u : rounded);
}

/* IEEE half <-> float, exact in both directions with round to nearest even: the FP16 library's
 * algorithm, which c10::Half uses for its scalar conversions. */
INLINE float fp16_to_float(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t result = sign | (two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized));
    return float_of(result);
}

INLINE uint16_t float_to_fp16(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = bits_of(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = float_of((bias >> 1) + 0x07800000u) + base;
    const uint32_t b = bits_of(base);
    const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* ---------------------------------------------------------------------------------------------
 * the work split: one OpenMP region per call, in which a call's work (its tensors' elements or
 * blocks, end to end) is one flat range [0, total) and each thread takes one contiguous share of it
 * (why one region, not one per tensor: adamw_cpu.c). */

/* The threads a call runs on: the `requested` ones, but one below `min_parallel` units of work,
 * where waking the pool costs more than it saves. */
INLINE int team_size(int requested, int64_t work, int64_t min_parallel) {
    return requested > 1 && work >= min_parallel ? requested : 1;
}

typedef struct {
    int64_t begin, end;
} Range;

/* Where share k of `count` starts: floor(total * k / count), exactly and without overflowing
 * total * k (k = count gives total). */
INLINE int64_t share_start(int64_t total, int k, int count) {
    return total / count * k + total % count * k / count;
}

/* The calling thread's share of [0, total): equal shares, each cut moved back to a multiple of
 * `align`, the last share ending at total. All of it outside a parallel region or without OpenMP. */
INLINE Range thread_share(int64_t total, int64_t align) {
    int k = 0, count = 1;
#ifdef _OPENMP
    k = omp_get_thread_num();
    count = omp_get_num_threads();
#endif
    Range r;
    r.begin = share_start(total, k, count) / align * align;
    r.end = k + 1 == count ? total : share_start(total, k + 1, count) / align * align;
    return r;
}

/* The part of `r` that falls in [first, first + len), counted from first (empty: begin >= end). */
INLINE Range clip(Range r, int64_t first, int64_t len) {
    Range c;
    c.begin = (r.begin > first ? r.begin : first) - first;
    c.end = (r.end < first + len ? r.end : first + len) - first;
    return c;
}

#endif
