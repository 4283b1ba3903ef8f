/* Four-lane float32 vectors shared by the k-quant searches: one lane per sub-block, each lane making
 * that sub-block's float32 operations in their order, so that independent chains of sums overlap. */
#ifndef ORTHOPATCH_LANES_H
#define ORTHOPATCH_LANES_H

#include "ggml_float.h"

#if defined(__SSE2__) && !defined(OP_NO_INTRINSICS)
#include <emmintrin.h>
#endif

#define LANES 4 /* sub-blocks per vector (16 bytes: SSE2 on x86-64, NEON on ARM) */

typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE vf vf_splat(float v) { return (vf){v, v, v, v}; }
ALWAYS_INLINE vi vi_splat(int32_t v) { return (vi){v, v, v, v}; }

/* Lanes of `yes` where `mask` is set (all ones), of `no` elsewhere: bits are moved, not values. */
ALWAYS_INLINE vf vf_select(vi mask, vf yes, vf no) { return (vf)((mask & (vi)yes) | (~mask & (vi)no)); }

/* Larger and smaller of each lane pair, for values that are neither NaN nor -0 (whole numbers here). */
#if defined(__SSE2__) && !defined(OP_NO_INTRINSICS)
ALWAYS_INLINE vf vf_max(vf a, vf b) { return (vf)_mm_max_ps((__m128)a, (__m128)b); }
ALWAYS_INLINE vf vf_min(vf a, vf b) { return (vf)_mm_min_ps((__m128)a, (__m128)b); }
#else
ALWAYS_INLINE vf vf_max(vf a, vf b) { return vf_select(a > b, a, b); }
ALWAYS_INLINE vf vf_min(vf a, vf b) { return vf_select(a < b, a, b); }
#endif

ALWAYS_INLINE vf vf_abs(vf v) { return (vf)((vi)v & vi_splat(0x7FFFFFFF)); }


/* A 32-value block's levels as Q4/Q5 store them: with `fifth_bits`, bit 4 of level i as bit i of a
 * little-endian word (ggml's qh), then the low nibbles two per byte, level i low and i + 16 high. */
static inline void op_put_levels_32(uint8_t *out, const uint8_t *levels, int fifth_bits) {
    if (fifth_bits) {
        uint32_t high = 0;
        for (int i = 0; i < 32; i++) {
            high |= (uint32_t)(levels[i] >> 4) << i;
        }
        memcpy(out, &high, sizeof high);
        out += sizeof high;
    }
    for (int i = 0; i < 16; i++) {
        out[i] = (uint8_t)((levels[i] & 0xF) | ((levels[16 + i] & 0xF) << 4));
    }
}

/* ---------------------------------------------------------------- importance weights */

/* The weights of llama.cpp's weighted k-quants for one 256-value super-block: importance times
 * sqrt(σ² + x²), σ² the super-block's sum of squares (in index order) times factor, over 256. */
static inline void op_importance_weights(const float *x, const float *importance, int factor, float *w) {
    float sum_x2 = x[0] * x[0];
    for (int i = 1; i < 256; i++) {
        sum_x2 += x[i] * x[i];
    }
    float variance = (float)factor * sum_x2 / 256.0f;
    for (int i = 0; i < 256; i++) {
        w[i] = importance[i] * sqrtf(variance + x[i] * x[i]);
    }
}

/* The mean square of a row (its squares summed in index order), σ² of the weighted legacy types. */
static inline float op_row_mean_square(const float *row, int64_t n) {
    float sum = row[0] * row[0];
    for (int64_t i = 1; i < n; i++) {
        sum += row[i] * row[i];
    }
    return sum / (float)n;
}

/* The weights of a 32-value legacy block: importance times sqrt(σ² + x²), σ² the row's mean square. */
static inline void op_legacy_weights(const float *x, const float *importance, float mean_square, float *w) {
    for (int i = 0; i < 32; i++) {
        w[i] = importance[i] * sqrtf(mean_square + x[i] * x[i]);
    }
}

/* Sum of n values in index order from the first. */
static inline float op_running_sum(const float *v, int n) {
    float sum = v[0];
    for (int i = 1; i < n; i++) {
        sum += v[i];
    }
    return sum;
}

#endif
