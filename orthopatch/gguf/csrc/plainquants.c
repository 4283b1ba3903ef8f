/* The quantizers without a search: BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1, without an importance matrix.
 *
 * The same rules as orthopatch/gguf/plainquants.py (ggml's reference quantizers): a block's scale from
 * its extreme values, stored as fp16, then each value times the inverse of the unrounded scale, offset
 * and truncated to an integer. A float out of int32's range (a block of float32 subnormals has an infinite
 * inverse scale) converts as x86's cvttss2si converts it, to INT32_MIN, whose low byte is 0: written out,
 * so that no compiler or CPU is left to decide.
 */
#include <stddef.h>

#include "ggml_float.h"

#define BLOCK 32

static inline int8_t truncated(float value) {
    int32_t whole = fabsf(value) < 2147483648.0f ? (int32_t)value : INT32_MIN;
    return (int8_t)(uint8_t)((uint32_t)whole & 0xFF);
}

/* bfloat16 (blocks of one value): the upper half of the float32 rounded to nearest even (NaN kept quiet). */
OP_EXPORT OP_VECTOR_CLONES void orthopatch_quantize_bf16(const float *x, uint8_t *out, int64_t n_values) {
    for (int64_t i = 0; i < n_values; i++) {
        uint32_t bits;
        memcpy(&bits, &x[i], sizeof bits);
        uint16_t half = (bits & 0x7FFFFFFF) > 0x7F800000 ? (uint16_t)((bits >> 16) | 64)
                                                        : (uint16_t)((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16);
        out[2 * i] = (uint8_t)(half & 0xFF);
        out[2 * i + 1] = (uint8_t)(half >> 8);
    }
}

/* Q8_0: d = max|x| / 127, levels roundf(x / d) (half away from zero), 34 bytes a block. */
OP_EXPORT OP_VECTOR_CLONES void orthopatch_quantize_q8_0(const float *x, uint8_t *out, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++, x += BLOCK, out += 2 + BLOCK) {
        float largest = 0.0f;
        for (int j = 0; j < BLOCK; j++) {
            float magnitude = fabsf(x[j]);
            largest = magnitude > largest ? magnitude : largest;
        }
        const float d = largest / 127.0f;
        const float inverse = d != 0.0f ? 1.0f / d : 0.0f;
        op_put_fp16(out, op_fp16_bits(d));
        for (int j = 0; j < BLOCK; j++) {
            /* adding the float32 just below 0.5 with the value's sign, then truncating, is roundf */
            float scaled = x[j] * inverse;
            out[2 + j] = (uint8_t)truncated(scaled + copysignf(0.49999997f, scaled));
        }
    }
}

/* The largest and the smallest value of a block. Lanes of eight, so the compiler vectorizes the scan;
 * the order only decides which zero comes out where +0.0 and -0.0 tie, and callers do not depend on that. */
static inline void extremes(const float *x, float *high, float *low) {
    float top[8], bottom[8];
    for (int k = 0; k < 8; k++) top[k] = bottom[k] = x[k];
    for (int j = 8; j < BLOCK; j += 8) {
        for (int k = 0; k < 8; k++) {
            top[k] = x[j + k] > top[k] ? x[j + k] : top[k];
            bottom[k] = x[j + k] < bottom[k] ? x[j + k] : bottom[k];
        }
    }
    for (int k = 1; k < 8; k++) {
        top[0] = top[k] > top[0] ? top[k] : top[0];
        bottom[0] = bottom[k] < bottom[0] ? bottom[k] : bottom[0];
    }
    *high = top[0];
    *low = bottom[0];
}

/* The value of largest magnitude in a block, the first one on ties, +0.0 when all are zero: what the scan
 * `if (largest < |v|) keep v` finds. */
static inline float first_largest_magnitude(const float *x) {
    float high, low;
    extremes(x, &high, &low);
    if (-low != high) return -low > high ? low : high; /* a select, not a branch the data would mispredict */
    /* the magnitude occurs with both signs, or the block is all zeros: the first of largest magnitude */
    for (int j = 0; j < BLOCK; j++) {
        if (fabsf(x[j]) == high) return x[j] + 0.0f;
    }
    return 0.0f;
}

/* The levels of a block, truncated from `(x - low) * inverse + offset` (`low` is 0 for Q4_0 and Q5_0)
 * and capped at `top` when `capped`: the low nibbles two per byte into `nibbles` (value j low, j + 16
 * high) and, with `fifth`, bit 4 of each level as one little-endian word. Inlined with constant
 * arguments, so each type gets its own loops, written so the compiler can vectorize them. */
static inline __attribute__((always_inline)) void put_levels(const float *x, float low, float inverse, float offset,
                                                             int top, int capped, uint8_t *nibbles, uint8_t *fifth) {
    int first[BLOCK / 2], second[BLOCK / 2];
    for (int j = 0; j < BLOCK / 2; j++) {
        int a = truncated((x[j] - low) * inverse + offset), b = truncated((x[j + BLOCK / 2] - low) * inverse + offset);
        if (capped) {
            a = a < top ? a : top;
            b = b < top ? b : top;
        }
        nibbles[j] = (uint8_t)((a & 0xF) | ((b & 0xF) << 4));
        first[j] = a;
        second[j] = b;
    }
    if (fifth) {
        uint32_t bits = 0;
        for (int j = 0; j < BLOCK / 2; j++) {
            bits |= (uint32_t)((first[j] >> 4) & 1) << j | (uint32_t)((second[j] >> 4) & 1) << (j + BLOCK / 2);
        }
        for (int k = 0; k < 4; k++) fifth[k] = (uint8_t)(bits >> (8 * k));
    }
}

/* Blocks are taken GROUP at a time: the scale of one block is two divisions that wait on each other,
 * those of GROUP blocks run side by side in vector lanes. Each lane does the one block's operations. */
#define GROUP 8

/* d = numerator / divisor (plus +0.0 with `unsign_zero`, which turns -0.0 into +0.0) and its inverse,
 * 0 where d is 0, for each block of a group. */
static inline __attribute__((always_inline)) void group_scales(const float *numerator, float divisor, int unsign_zero,
                                                               float *d, float *inverse) {
    for (int k = 0; k < GROUP; k++) {
        d[k] = unsign_zero ? numerator[k] / divisor + 0.0f : numerator[k] / divisor;
        float reciprocal = 1.0f / d[k];
        inverse[k] = d[k] != 0.0f ? reciprocal : 0.0f;
    }
}

/* Q4_0 (levels 0..15 around 8) and Q5_0 (0..31 around 16): d = peak / -(half the levels). */
static inline __attribute__((always_inline)) void signed_group(const float *x, uint8_t *out, int bits) {
    const int half = 1 << (bits - 1), top = (1 << bits) - 1;
    const size_t block_bytes = 2 + (bits == 5 ? 4 : 0) + BLOCK / 2;
    const float offset = (float)half + 0.5f;
    float peak[GROUP], d[GROUP], inverse[GROUP];
    for (int k = 0; k < GROUP; k++) peak[k] = first_largest_magnitude(x + k * BLOCK);
    group_scales(peak, (float)-half, 0, d, inverse);
    for (int k = 0; k < GROUP; k++, x += BLOCK, out += block_bytes) {
        op_put_fp16(out, op_fp16_bits(d[k]));
        if (bits == 5) {
            put_levels(x, 0.0f, inverse[k], offset, top, 1, out + 6, out + 2);
        } else {
            put_levels(x, 0.0f, inverse[k], offset, top, 1, out + 2, NULL);
        }
    }
}

/* Q4_1 (levels 0..15) and Q5_1 (0..31): d = (max - min) / top and the block's minimum, levels above it.
 * The scan `v < min` keeps the first zero's sign when the minimum is zero, and the minimum is stored. */
static inline __attribute__((always_inline)) void offset_group(const float *x, uint8_t *out, int bits) {
    const int top = (1 << bits) - 1;
    const size_t block_bytes = 4 + (bits == 5 ? 4 : 0) + BLOCK / 2;
    float span[GROUP], low[GROUP], d[GROUP], inverse[GROUP];
    for (int k = 0; k < GROUP; k++) {
        const float *block = x + k * BLOCK;
        float high;
        extremes(block, &high, &low[k]);
        if (low[k] == 0.0f) { /* the scan `v < min` keeps the first zero, with its sign */
            for (int j = 0; j < BLOCK; j++) {
                if (block[j] == 0.0f) {
                    low[k] = block[j];
                    break;
                }
            }
        }
        span[k] = high - low[k];
    }
    group_scales(span, (float)top, 1, d, inverse); /* +0.0 in an all-zero block, whichever its zeros */
    for (int k = 0; k < GROUP; k++, x += BLOCK, out += block_bytes) {
        op_put_fp16(out, op_fp16_bits(d[k]));
        op_put_fp16(out + 2, op_fp16_bits(low[k]));
        if (bits == 5) {
            put_levels(x, low[k], inverse[k], 0.5f, top, 0, out + 8, out + 4);
        } else {
            put_levels(x, low[k], inverse[k], 0.5f, top, 1, out + 4, NULL);
        }
    }
}

/* Whole groups in place; the last, partial one through zero-padded copies. */
#define QUANTIZE_IN_GROUPS(group, bits, block_bytes)                                              \
    do {                                                                                          \
        int64_t b = 0;                                                                            \
        for (; b + GROUP <= n_blocks; b += GROUP) group(x + b * BLOCK, out + b * (block_bytes), bits); \
        if (b < n_blocks) {                                                                       \
            float padded[GROUP * BLOCK] = {0};                                                    \
            uint8_t written[GROUP * (block_bytes)];                                               \
            memcpy(padded, x + b * BLOCK, (size_t)(n_blocks - b) * BLOCK * sizeof(float));        \
            group(padded, written, bits);                                                         \
            memcpy(out + b * (block_bytes), written, (size_t)(n_blocks - b) * (block_bytes));     \
        }                                                                                         \
    } while (0)

OP_EXPORT OP_VECTOR_CLONES void orthopatch_quantize_q4_0(const float *x, uint8_t *out, int64_t n_blocks) {
    QUANTIZE_IN_GROUPS(signed_group, 4, 18);
}

OP_EXPORT OP_VECTOR_CLONES void orthopatch_quantize_q5_0(const float *x, uint8_t *out, int64_t n_blocks) {
    QUANTIZE_IN_GROUPS(signed_group, 5, 22);
}

OP_EXPORT OP_VECTOR_CLONES void orthopatch_quantize_q4_1(const float *x, uint8_t *out, int64_t n_blocks) {
    QUANTIZE_IN_GROUPS(offset_group, 4, 20);
}

OP_EXPORT OP_VECTOR_CLONES void orthopatch_quantize_q5_1(const float *x, uint8_t *out, int64_t n_blocks) {
    QUANTIZE_IN_GROUPS(offset_group, 5, 24);
}
