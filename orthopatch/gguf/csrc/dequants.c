/* Dequantizers: raw blocks of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and Q2_K..Q6_K to float32.
 *
 * The values are gguf-py's `gguf.quants.dequantize`, bit for bit: the same float32 operations in its
 * order. A stored fp16 scale converts exactly; a sub-block's scale is `d * scale` (and its offset
 * `dmin * min`) first, then each value is `scale * q`, then `- offset` (Q2_K, Q4_K, Q5_K) or `+ m` (Q4_1,
 * Q5_1). Q8_0 is `q * d`. llama.cpp's dequantize_row_* group Q4_1 and Q5_1 as `q * d + m` too, and the
 * k-quants the same way; float32 multiplication is commutative, so only the order of the operations
 * counts, and it is the same in both. Every input byte pattern is defined: fp16 inf and NaN scales
 * give what the IEEE operations give.
 *
 * Each sub-block is one loop over contiguous output with its scale held in a register, which the
 * compiler vectorizes (the AVX2 clone 8 values at a time); the bit unpacking is integer work in that loop.
 */
#include "ggml_float.h"

#define QK 32
#define QK_K 256

/* Inner loops of 16 and 32 values stay loops: unrolled whole before vectorizing, GCC packs them lane by lane
 * (one int-to-float conversion at a time), about 2.5 times slower on Q4_0 than the vectorized loop. */
#define NOT_UNROLLED _Pragma("GCC unroll 1")

static inline float fp16_at(const uint8_t *p) { return op_fp16_value((uint16_t)(p[0] | (p[1] << 8))); }

/* Q8_0, 34 bytes: d, 32 signed levels. */
OP_EXPORT OP_VECTOR_CLONES void orthopatch_dequantize_q8_0(const uint8_t *restrict in, float *restrict out,
                                                           int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++, in += 34, out += QK) {
        const float d = fp16_at(in);
        const int8_t *q = (const int8_t *)(in + 2);
        NOT_UNROLLED for (int j = 0; j < QK; j++) out[j] = (float)q[j] * d;
    }
}

/* Q4_0, 18 bytes: d, 16 bytes of nibbles (low nibbles are values 0..15, high ones 16..31), level - 8. */
OP_EXPORT OP_VECTOR_CLONES void orthopatch_dequantize_q4_0(const uint8_t *restrict in, float *restrict out,
                                                           int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++, in += 18, out += QK) {
        const float d = fp16_at(in);
        const uint8_t *qs = in + 2;
        NOT_UNROLLED for (int j = 0; j < QK / 2; j++) out[j] = d * (float)((int)(qs[j] & 0x0F) - 8);
        NOT_UNROLLED for (int j = 0; j < QK / 2; j++) out[j + QK / 2] = d * (float)((int)(qs[j] >> 4) - 8);
    }
}

/* Q4_1, 20 bytes: d, m, 16 bytes of nibbles; d * level + m. */
OP_EXPORT OP_VECTOR_CLONES void orthopatch_dequantize_q4_1(const uint8_t *restrict in, float *restrict out,
                                                           int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++, in += 20, out += QK) {
        const float d = fp16_at(in), m = fp16_at(in + 2);
        const uint8_t *qs = in + 4;
        NOT_UNROLLED for (int j = 0; j < QK / 2; j++) out[j] = d * (float)(qs[j] & 0x0F) + m;
        NOT_UNROLLED for (int j = 0; j < QK / 2; j++) out[j + QK / 2] = d * (float)(qs[j] >> 4) + m;
    }
}

static inline uint32_t u32_at(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* Q5_0, 22 bytes: d, the fifth bits (bit j of a little-endian uint32 for value j), nibbles; level - 16. */
OP_EXPORT OP_VECTOR_CLONES void orthopatch_dequantize_q5_0(const uint8_t *restrict in, float *restrict out,
                                                           int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++, in += 22, out += QK) {
        const float d = fp16_at(in);
        const uint32_t qh = u32_at(in + 2);
        const uint8_t *qs = in + 6;
        NOT_UNROLLED for (int j = 0; j < QK / 2; j++) {
            out[j] = d * (float)(((int)(qs[j] & 0x0F) | (int)(((qh >> j) & 1u) << 4)) - 16);
        }
        NOT_UNROLLED for (int j = 0; j < QK / 2; j++) {
            out[j + QK / 2] = d * (float)(((int)(qs[j] >> 4) | (int)(((qh >> (j + QK / 2)) & 1u) << 4)) - 16);
        }
    }
}

/* Q5_1, 24 bytes: d, m, the fifth bits, nibbles; d * level + m. */
OP_EXPORT OP_VECTOR_CLONES void orthopatch_dequantize_q5_1(const uint8_t *restrict in, float *restrict out,
                                                           int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++, in += 24, out += QK) {
        const float d = fp16_at(in), m = fp16_at(in + 2);
        const uint32_t qh = u32_at(in + 4);
        const uint8_t *qs = in + 8;
        NOT_UNROLLED for (int j = 0; j < QK / 2; j++) {
            out[j] = d * (float)((int)(qs[j] & 0x0F) | (int)(((qh >> j) & 1u) << 4)) + m;
        }
        NOT_UNROLLED for (int j = 0; j < QK / 2; j++) {
            out[j + QK / 2] = d * (float)((int)(qs[j] >> 4) | (int)(((qh >> (j + QK / 2)) & 1u) << 4)) + m;
        }
    }
}

/* Q2_K, 84 bytes: 16 scale bytes (scale low nibble, min high nibble), 64 bytes of 2-bit levels, d, dmin.
 * Value 128h + 32s + j is bits 2s..2s+1 of qs[32h + j]; its sub-block is (128h + 32s + j) / 16. */
OP_EXPORT OP_VECTOR_CLONES void orthopatch_dequantize_q2_k(const uint8_t *restrict in, float *restrict out,
                                                           int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++, in += 84, out += QK_K) {
        const uint8_t *scales = in, *qs = in + 16;
        const float d = fp16_at(in + 80), dmin = fp16_at(in + 82);
        for (int h = 0; h < 2; h++) {
            for (int s = 0; s < 4; s++) {
                for (int half = 0; half < 2; half++) {
                    const int sub = 8 * h + 2 * s + half;
                    const float dl = d * (float)(scales[sub] & 0x0F);
                    const float ml = dmin * (float)(scales[sub] >> 4);
                    const uint8_t *q = qs + 32 * h + 16 * half;
                    float *y = out + 16 * sub;
                    NOT_UNROLLED for (int j = 0; j < 16; j++) y[j] = dl * (float)((q[j] >> (2 * s)) & 3) - ml;
                }
            }
        }
    }
}

/* Q3_K, 110 bytes: hmask 32, 2-bit levels 64, 12 bytes of 6-bit scales, d. Value 128h + 32s + j: low
 * bits 2s..2s+1 of qs[32h + j], minus 4 where bit 4h + s of hmask[j] is clear; scale (6 bits) - 32. */
OP_EXPORT OP_VECTOR_CLONES void orthopatch_dequantize_q3_k(const uint8_t *restrict in, float *restrict out,
                                                           int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++, in += 110, out += QK_K) {
        const uint8_t *hmask = in, *qs = in + 32, *packed = in + 96;
        const float d = fp16_at(in + 108);
        for (int h = 0; h < 2; h++) {
            for (int s = 0; s < 4; s++) {
                const int bit = 4 * h + s;
                for (int half = 0; half < 2; half++) {
                    const int sub = 8 * h + 2 * s + half;
                    const int low = (packed[sub % 8] >> (4 * (sub / 8))) & 0x0F;
                    const int high = (packed[8 + sub % 4] >> (2 * (sub / 4))) & 0x03;
                    const float dl = d * (float)((low | (high << 4)) - 32);
                    const uint8_t *q = qs + 32 * h + 16 * half, *m = hmask + 16 * half;
                    float *y = out + 16 * sub;
                    NOT_UNROLLED for (int j = 0; j < 16; j++) {
                        int level = (int)((q[j] >> (2 * s)) & 3) - (int)((((m[j] >> bit) & 1) ^ 1) << 2);
                        y[j] = dl * (float)level;
                    }
                }
            }
        }
    }
}

/* The 6-bit scales and mins of Q4_K and Q5_K's 8 sub-blocks from their 12 packed bytes. */
static inline void scale_min_k4(const uint8_t *s, int *scale, int *min) {
    for (int i = 0; i < 4; i++) {
        scale[i] = s[i] & 0x3F;
        min[i] = s[i + 4] & 0x3F;
        scale[i + 4] = (s[i + 8] & 0x0F) | ((s[i] >> 2) & 0x30);
        min[i + 4] = (s[i + 8] >> 4) | ((s[i + 4] >> 2) & 0x30);
    }
}

/* Q4_K, 144 bytes: d, dmin, 12 scale bytes, 128 bytes of nibbles. Sub-block 2c + k is nibble k of
 * qs[32c .. 32c + 31]. */
OP_EXPORT OP_VECTOR_CLONES void orthopatch_dequantize_q4_k(const uint8_t *restrict in, float *restrict out,
                                                           int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++, in += 144, out += QK_K) {
        const float d = fp16_at(in), dmin = fp16_at(in + 2);
        int scale[8], min[8];
        scale_min_k4(in + 4, scale, min);
        const uint8_t *qs = in + 16;
        for (int sub = 0; sub < 8; sub++) {
            const float dl = d * (float)scale[sub], ml = dmin * (float)min[sub];
            const uint8_t *q = qs + 32 * (sub / 2);
            const int shift = 4 * (sub % 2);
            float *y = out + 32 * sub;
            NOT_UNROLLED for (int j = 0; j < 32; j++) y[j] = dl * (float)((q[j] >> shift) & 0x0F) - ml;
        }
    }
}

/* Q5_K, 176 bytes: d, dmin, 12 scale bytes, qh 32, 128 bytes of nibbles; sub-block i's fifth bits are
 * bit i of qh[0..31]. */
OP_EXPORT OP_VECTOR_CLONES void orthopatch_dequantize_q5_k(const uint8_t *restrict in, float *restrict out,
                                                           int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++, in += 176, out += QK_K) {
        const float d = fp16_at(in), dmin = fp16_at(in + 2);
        int scale[8], min[8];
        scale_min_k4(in + 4, scale, min);
        const uint8_t *qh = in + 16, *qs = in + 48;
        for (int sub = 0; sub < 8; sub++) {
            const float dl = d * (float)scale[sub], ml = dmin * (float)min[sub];
            const uint8_t *q = qs + 32 * (sub / 2);
            const int shift = 4 * (sub % 2);
            float *y = out + 32 * sub;
            NOT_UNROLLED for (int j = 0; j < 32; j++) {
                int level = ((q[j] >> shift) & 0x0F) | (((qh[j] >> sub) & 1) << 4);
                y[j] = dl * (float)level - ml;
            }
        }
    }
}

/* Q6_K, 210 bytes: ql 128, qh 64, 16 signed scales, d. Value 128h + 64k + t has low bits nibble k of
 * ql[64h + t]; value 128h + 32s + j has high bits 2s..2s+1 of qh[32h + j]; level - 32. */
OP_EXPORT OP_VECTOR_CLONES void orthopatch_dequantize_q6_k(const uint8_t *restrict in, float *restrict out,
                                                           int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++, in += 210, out += QK_K) {
        const uint8_t *ql = in, *qh = in + 128;
        const int8_t *scales = (const int8_t *)(in + 192);
        const float d = fp16_at(in + 208);
        for (int h = 0; h < 2; h++) {
            for (int s = 0; s < 4; s++) {
                /* values 128h + 32s .. + 31: low nibbles from ql[64h + 32(s % 2) + j], nibble s / 2 */
                const uint8_t *low = ql + 64 * h + 32 * (s % 2), *high = qh + 32 * h;
                const int low_shift = 4 * (s / 2), high_shift = 2 * s;
                for (int half = 0; half < 2; half++) {
                    const int sub = 8 * h + 2 * s + half;
                    const float dl = d * (float)scales[sub];
                    float *y = out + 16 * sub;
                    NOT_UNROLLED for (int j = 0; j < 16; j++) {
                        int jj = 16 * half + j;
                        int level = ((low[jj] >> low_shift) & 0x0F) | (((high[jj] >> high_shift) & 3) << 4);
                        y[j] = dl * (float)(level - 32);
                    }
                }
            }
        }
    }
}
