/* The memory floor of an AdamW step, for `adamw bench`: what any step in a given storage format must
 * cost at the least.
 *
 * Reads every element of a step's tensors and writes back those a step writes, with no arithmetic
 * beyond an XOR: each param is a list of pieces (the param, its grad, each state tensor of its
 * format), each with its element size and whether the step writes it. A written element becomes
 * `x ^ mask`, with mask 0 at run time, so the values stay as they were while the compiler must still
 * load and store each one; a read-only one (the grad) is XORed into a running value that is returned,
 * so that no load can be dropped. A piece may hold one element per `per` values of the param (an
 * 8-bit absmax: one per 256-value block).
 *
 * The work split of adamw_cpu.c (adamw_common.h): one parallel region, the params as one range, one
 * share per thread, cut at multiples of 256 values of the whole range; a piece with one element per
 * `per` values has element j visited by the thread whose share holds value j * per, so no element is
 * visited twice. Within a share, pieces of one element size (every format but 8-bit) are streamed
 * side by side in one loop, as a fused kernel streams its columns; mixed ones (8-bit codes beside
 * a float param) a tile of each in turn (on this machine, tiles under 64K values measured slower).
 */
#include <stdint.h>

#include "adamw_common.h"

#define CUT_ALIGN 256
#define TILE 65536

#define DEFINE_TOUCH(NAME, T)                                                                      \
    static uint64_t NAME(T *restrict x, int64_t lo, int64_t hi, int written, T mask) {             \
        T read = 0;                                                                                \
        if (written)                                                                               \
            for (int64_t i = lo; i < hi; i++) x[i] ^= mask;                                        \
        else                                                                                       \
            for (int64_t i = lo; i < hi; i++) read ^= x[i];                                        \
        return read;                                                                               \
    }

DEFINE_TOUCH(touch_1, uint8_t)
DEFINE_TOUCH(touch_2, uint16_t)
DEFINE_TOUCH(touch_4, uint32_t)
DEFINE_TOUCH(touch_8, uint64_t)

/* A param whose pieces are all of its element size, one per value (param, grad, two or three state
 * tensors: every format but 8-bit), in one loop over all of them, as a fused kernel streams them. */
#define DEFINE_ROWS(NAME, T)                                                                       \
    static uint64_t NAME(void *const *x, int states, int64_t lo, int64_t hi, T mask) {             \
        T *restrict p = x[0], *restrict m = x[2], *restrict v = x[3];                              \
        const T *restrict g = x[1];                                                                \
        T read = 0;                                                                                \
        if (states == 2) {                                                                         \
            for (int64_t i = lo; i < hi; i++) {                                                    \
                read ^= g[i];                                                                      \
                p[i] ^= mask;                                                                      \
                m[i] ^= mask;                                                                      \
                v[i] ^= mask;                                                                      \
            }                                                                                      \
        } else {                                                                                   \
            T *restrict c = x[4];                                                                  \
            for (int64_t i = lo; i < hi; i++) {                                                    \
                read ^= g[i];                                                                      \
                p[i] ^= mask;                                                                      \
                m[i] ^= mask;                                                                      \
                v[i] ^= mask;                                                                      \
                c[i] ^= mask;                                                                      \
            }                                                                                      \
        }                                                                                          \
        return read;                                                                               \
    }

DEFINE_ROWS(rows_2, uint16_t)
DEFINE_ROWS(rows_4, uint32_t)
DEFINE_ROWS(rows_8, uint64_t)

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* Whether pieces [k0, k1) are param, grad and two or three states of one element size (2, 4 or 8),
 * one per value, only the grad read-only: then rows_* streams them. */
static int as_rows(int64_t k0, int64_t k1, const int *items, const int64_t *per, const int *written) {
    if (k1 - k0 != 4 && k1 - k0 != 5) return 0;
    if (items[k0] == 1) return 0;
    for (int64_t k = k0; k < k1; k++)
        if (items[k] != items[k0] || per[k] != 1 || written[k] != (k != k0 + 1)) return 0;
    return 1;
}

static uint64_t touch(void *x, int item, int64_t lo, int64_t hi, int written, int64_t mask) {
    switch (item) {
        case 1: return touch_1(x, lo, hi, written, (uint8_t)mask);
        case 2: return touch_2(x, lo, hi, written, (uint16_t)mask);
        case 4: return touch_4(x, lo, hi, written, (uint32_t)mask);
        default: return touch_8(x, lo, hi, written, (uint64_t)mask);
    }
}

/* One pass over `n` params of `numels[t]` values each; param t's pieces are [first_piece[t],
 * first_piece[t + 1]) of `pieces`, `items` (bytes per element: 1, 2, 4 or 8), `per` and `written`.
 * Returns -1 for a bad item or per, else 0, with the XOR of every read-only element's bits
 * (zero-extended) in *read_xor. */
int adamw_floor_pass(int64_t n, const int64_t *numels, const int64_t *first_piece, void *const *pieces,
                     const int *items, const int64_t *per, const int *written, int num_threads, int64_t mask,
                     uint64_t *read_xor) {
    int64_t total = 0;
    for (int64_t t = 0; t < n; t++) total += numels[t];
    for (int64_t k = 0; k < first_piece[n]; k++) {
        if (items[k] != 1 && items[k] != 2 && items[k] != 4 && items[k] != 8) return -1;
        if (per[k] < 1) return -1;
    }
    uint64_t read = 0;
    const int threads = team_size(num_threads, total, 0);
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(^ : read)
    {
        const Range mine = thread_share(total, CUT_ALIGN);
        int64_t offset = 0;
        for (int64_t t = 0; t < n && offset < mine.end; offset += numels[t], t++) {
            const Range part = clip(mine, offset, numels[t]);
            const int64_t k0 = first_piece[t], k1 = first_piece[t + 1];
            if (part.begin < part.end && as_rows(k0, k1, items, per, written)) {
                const int states = (int)(k1 - k0 - 2);
                if (items[k0] == 2) read ^= rows_2(pieces + k0, states, part.begin, part.end, (uint16_t)mask);
                else if (items[k0] == 4) read ^= rows_4(pieces + k0, states, part.begin, part.end, (uint32_t)mask);
                else read ^= rows_8(pieces + k0, states, part.begin, part.end, (uint64_t)mask);
                continue;
            }
            for (int64_t lo = part.begin; lo < part.end; lo += TILE) {
                const int64_t hi = lo + TILE < part.end ? lo + TILE : part.end;
                for (int64_t k = first_piece[t]; k < first_piece[t + 1]; k++)
                    read ^= touch(pieces[k], items[k], ceil_div(lo, per[k]), ceil_div(hi, per[k]), written[k], mask);
            }
        }
    }
    *read_xor = read;
    return 0;
}
