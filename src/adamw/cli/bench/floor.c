/* The memory floor of an AdamW step, for `adamw bench`: what any step must cost at the least.
 *
 * Reads every element of param, grad, exp_avg and exp_avg_sq and writes param, exp_avg and
 * exp_avg_sq back, the pattern of a fused AdamW step (28 bytes per float32 element, 14 per
 * bfloat16), with no arithmetic beyond an AND and an XOR: `x ^= grad & mask` with mask 0 at run
 * time, so the values stay as they were while the compiler must still load the grad and store x.
 * The work split of adamw_cpu.c (adamw_common.h): one parallel region, the tensors as one range, one
 * chunk per thread; but the cuts are rounded to 64 elements of the whole range, not of each tensor,
 * and no call is too small to split.
 */
#include <stdint.h>

#include "adamw_common.h"

#define CUT_ALIGN 64

#define DEFINE_TOUCH(NAME, T)                                                                       \
    static void NAME(T *restrict p, const T *restrict g, T *restrict m, T *restrict v, int64_t lo,  \
                     int64_t hi, T mask) {                                                          \
        for (int64_t i = lo; i < hi; i++) {                                                         \
            const T x = g[i] & mask;                                                                \
            p[i] ^= x;                                                                              \
            m[i] ^= x;                                                                              \
            v[i] ^= x;                                                                              \
        }                                                                                           \
    }

DEFINE_TOUCH(touch_2, uint16_t)
DEFINE_TOUCH(touch_4, uint32_t)
DEFINE_TOUCH(touch_8, uint64_t)

/* One pass over `n` tensors of `item` bytes per element (2, 4 or 8; returns -1 for another). The
 * bench passes mask 0; the tests pass all ones, which XORs the grad's bits into the other three and
 * so shows that every element was read and written. */
int adamw_floor_pass(int item, int64_t n, void *const *params, void *const *grads, void *const *exp_avgs,
                     void *const *exp_avg_sqs, const int64_t *numels, int num_threads, int64_t mask) {
    if (item != 2 && item != 4 && item != 8) return -1;
    int64_t total = 0;
    for (int64_t t = 0; t < n; t++) total += numels[t];
    const int threads = team_size(num_threads, total, 0);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const Range mine = thread_share(total, CUT_ALIGN);
        int64_t offset = 0;
        for (int64_t t = 0; t < n && offset < mine.end; offset += numels[t], t++) {
            const Range part = clip(mine, offset, numels[t]);
            const int64_t lo = part.begin, hi = part.end;
            if (lo >= hi) continue;
            if (item == 2)
                touch_2(params[t], grads[t], exp_avgs[t], exp_avg_sqs[t], lo, hi, (uint16_t)mask);
            else if (item == 4)
                touch_4(params[t], grads[t], exp_avgs[t], exp_avg_sqs[t], lo, hi, (uint32_t)mask);
            else
                touch_8(params[t], grads[t], exp_avgs[t], exp_avg_sqs[t], lo, hi, (uint64_t)mask);
        }
    }
    return 0;
}
