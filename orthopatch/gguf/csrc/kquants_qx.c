/* Q3_K and Q6_K without an importance matrix: the rules of orthopatch.gguf.kquants.quantize_q3_k and
 * quantize_q6_k (with make_q3_quants and make_qx_quants of orthopatch.gguf.blockmath), one 16-value
 * sub-block at a time.
 *
 * Every float operation is the one the numpy code makes, in its order: sums run in index order from the
 * first term, products group left to right as written there, and nearest_int rounds half to even. The
 * bytes are ggml's block layouts.
 */
#include "ggml_float.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define SUPER_BLOCK 256
#define SUB_SIZE 16
#define SUBS (SUPER_BLOCK / SUB_SIZE)
#define ALL_ZERO_EPS 1e-15f

#define Q3_K_BYTES 110 /* hmask 32, qs 64, scales 12, d 2 */
#define Q6_K_BYTES 210 /* ql 128, qh 64, scales 16, d 2 */

static inline int clamp_int(int value, int low, int high) {
    return value < low ? low : (value > high ? high : value);
}

/* The first value of largest magnitude (a C `>` scan from zero). */
static inline float first_largest_magnitude(const float *x, int n) {
    float peak = 0.0f, largest = 0.0f;
    for (int i = 0; i < n; i++) {
        float magnitude = fabsf(x[i]);
        if (magnitude > largest) {
            largest = magnitude;
            peak = x[i];
        }
    }
    return peak;
}

/* Rounded levels of inverse * x in -nmax..nmax-1 and their weighted sums (weights x², given as w and w * x). */
static inline void qx_trial(const float *x, const float *w, const float *wx, float inverse, int nmax, int *levels,
                            float *sum_lx, float *sum_l2) {
    for (int i = 0; i < SUB_SIZE; i++) {
        levels[i] = clamp_int(op_nearest_int(inverse * x[i]), -nmax, nmax - 1);
    }
    float l = (float)levels[0];
    float lx = wx[0] * l, l2 = w[0] * l * l;
    for (int i = 1; i < SUB_SIZE; i++) {
        l = (float)levels[i];
        lx += wx[i] * l;
        l2 += w[i] * l * l;
    }
    *sum_lx = lx;
    *sum_l2 = l2;
}

/* make_qx_quants weighted by x²: the signed scale of one sub-block, its levels 0..2*nmax-1 in out. Tries
 * 18 inverse scales around nmax / peak besides the first, keeping the least-squares fit that explains the
 * most weighted energy. */
static float qx_quants(const float *x, int nmax, uint8_t *out) {
    float peak = first_largest_magnitude(x, SUB_SIZE);
    if (fabsf(peak) < ALL_ZERO_EPS) {
        memset(out, 0, SUB_SIZE);
        return 0.0f;
    }
    float w[SUB_SIZE], wx[SUB_SIZE];
    for (int i = 0; i < SUB_SIZE; i++) {
        w[i] = x[i] * x[i];
        wx[i] = w[i] * x[i];
    }
    int levels[SUB_SIZE], best_levels[SUB_SIZE];
    float sum_lx, sum_l2;
    qx_trial(x, w, wx, (float)(-nmax) / peak, nmax, best_levels, &sum_lx, &sum_l2);
    float scale = sum_l2 != 0.0f ? sum_lx / sum_l2 : 0.0f;
    float best = scale * sum_lx;
    for (int step = -9; step <= 9; step++) {
        if (step == 0) {
            continue;
        }
        float inverse = -((float)nmax + 0.1f * (float)step) / peak;
        qx_trial(x, w, wx, inverse, nmax, levels, &sum_lx, &sum_l2);
        if (sum_lx * sum_lx > best * sum_l2 && sum_l2 > 0.0f) {
            scale = sum_lx / sum_l2;
            best = scale * sum_lx;
            memcpy(best_levels, levels, sizeof levels);
        }
    }
    for (int i = 0; i < SUB_SIZE; i++) {
        out[i] = (uint8_t)(best_levels[i] + nmax);
    }
    return scale;
}

/* make_q3_quants: the signed scale of one sub-block and its levels 0..2*nmax-1 in out. Rounds at
 * nmax / peak, then up to five sweeps move each level, in order, to the one the current fit prefers when
 * that explains more weighted energy (weights x²); a sweep that changes nothing ends the refinement. */
static float q3_quants(const float *x, int nmax, uint8_t *out) {
    float peak = first_largest_magnitude(x, SUB_SIZE);
    if (fabsf(peak) < ALL_ZERO_EPS) {
        memset(out, 0, SUB_SIZE);
        return 0.0f;
    }
    float w[SUB_SIZE], wx[SUB_SIZE];
    int levels[SUB_SIZE];
    float sum_lx, sum_l2;
    for (int i = 0; i < SUB_SIZE; i++) {
        w[i] = x[i] * x[i];
        wx[i] = w[i] * x[i];
    }
    qx_trial(x, w, wx, (float)(-nmax) / peak, nmax, levels, &sum_lx, &sum_l2);
    /* A positive finite peak gives every value a level of the opposite sign: every partial sum_lx is at
     * most zero and no proposal can pass, so the sweeps are skipped. */
    if (!(peak > 0.0f && isfinite(peak))) {
        for (int sweep = 0; sweep < 5; sweep++) {
            int changed = 0;
            for (int i = 0; i < SUB_SIZE; i++) {
                float level = (float)levels[i];
                float without_lx = sum_lx - wx[i] * level;
                if (!(without_lx > 0.0f)) {
                    continue;
                }
                float without_l2 = sum_l2 - w[i] * level * level;
                int proposal = clamp_int(op_nearest_int(x[i] * without_l2 / without_lx), -nmax, nmax - 1);
                if (proposal == levels[i]) {
                    continue;
                }
                float p = (float)proposal;
                float with_lx = without_lx + wx[i] * p;
                float with_l2 = without_l2 + w[i] * p * p;
                if (with_l2 > 0.0f && with_lx * with_lx * sum_l2 > sum_lx * sum_lx * with_l2) {
                    levels[i] = proposal;
                    sum_lx = with_lx;
                    sum_l2 = with_l2;
                    changed = 1;
                }
            }
            if (!changed) {
                break;
            }
        }
    }
    for (int i = 0; i < SUB_SIZE; i++) {
        out[i] = (uint8_t)(levels[i] + nmax);
    }
    return sum_l2 > 0.0f ? sum_lx / sum_l2 : 0.0f;
}

/* Levels round(x / step) in low..high, shifted to start at 0; the searched levels stay where step is 0. */
static inline void requantize(const float *x, float step, int low, int high, uint8_t *levels) {
    if (step == 0.0f) {
        return;
    }
    for (int i = 0; i < SUB_SIZE; i++) {
        levels[i] = (uint8_t)(clamp_int(op_nearest_int(x[i] / step), low, high) - low);
    }
}

static inline void store_fp16(uint8_t *out, uint16_t bits) {
    out[0] = (uint8_t)(bits & 0xFF);
    out[1] = (uint8_t)(bits >> 8);
}

/* Q3_K: 16 sub-blocks of 16, 3-bit levels (high bit in hmask), signed 6-bit scales, fp16 d. */
OP_EXPORT void orthopatch_quantize_q3_k(const float *x, uint8_t *out, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++, x += SUPER_BLOCK, out += Q3_K_BYTES) {
        float scales[SUBS];
        uint8_t levels[SUPER_BLOCK];
        for (int j = 0; j < SUBS; j++) {
            scales[j] = q3_quants(x + SUB_SIZE * j, 4, levels + SUB_SIZE * j);
        }
        float max_scale = first_largest_magnitude(scales, SUBS);
        int codes[SUBS] = {0};
        uint16_t d = 0;
        if (max_scale != 0.0f) {
            float inverse = -32.0f / max_scale;
            for (int j = 0; j < SUBS; j++) {
                int code = op_nearest_int(inverse * scales[j]) & 0xFF; /* wraps to int8 as the numpy cast does */
                code = code > 127 ? code - 256 : code;
                codes[j] = clamp_int(code, -32, 31) + 32;
            }
            d = op_fp16_bits(1.0f / inverse);
        }
        float d_value = op_fp16_value(d);
        for (int j = 0; j < SUBS; j++) {
            requantize(x + SUB_SIZE * j, d_value * (float)(codes[j] - 32), -4, 3, levels + SUB_SIZE * j);
        }
        uint8_t *hmask = out, *qs = out + 32, *packed_scales = out + 96;
        for (int j = 0; j < 32; j++) { /* bit k of hmask[j]: the high bit of level 32k + j */
            uint8_t bits = 0;
            for (int k = 0; k < 8; k++) {
                bits |= (uint8_t)((levels[32 * k + j] > 3) << k);
            }
            hmask[j] = bits;
        }
        for (int h = 0; h < 2; h++) { /* qs[32h + j]: the low two bits of levels 128h + 32k + j, k = 0..3 */
            const uint8_t *half = levels + 128 * h;
            for (int j = 0; j < 32; j++) {
                qs[32 * h + j] = (uint8_t)((half[j] & 3) | ((half[32 + j] & 3) << 2) | ((half[64 + j] & 3) << 4)
                                           | ((half[96 + j] & 3) << 6));
            }
        }
        for (int j = 0; j < 8; j++) { /* low nibbles of codes j and j + 8 */
            packed_scales[j] = (uint8_t)((codes[j] & 0xF) | ((codes[j + 8] & 0xF) << 4));
        }
        for (int j = 0; j < 4; j++) { /* high two bits of codes 4k + j, k = 0..3 */
            packed_scales[8 + j] = (uint8_t)((codes[j] >> 4) | ((codes[4 + j] >> 4) << 2) | ((codes[8 + j] >> 4) << 4)
                                             | ((codes[12 + j] >> 4) << 6));
        }
        store_fp16(out + 108, d);
    }
}

/* make_qx_quants for QX_LANES sub-blocks at once: lane s of every vector belongs to sub-block s, and each
 * lane's arithmetic is qx_quants' in the same order, so the lanes' chains of sums run side by side. */
#define QX_LANES 4
typedef float lanes_f __attribute__((vector_size(4 * QX_LANES)));
typedef int32_t lanes_i __attribute__((vector_size(4 * QX_LANES)));

static inline lanes_f splat(float value) {
    lanes_f v;
    for (int s = 0; s < QX_LANES; s++) {
        v[s] = value;
    }
    return v;
}

static inline lanes_i splat_int(int32_t value) {
    lanes_i v;
    for (int s = 0; s < QX_LANES; s++) {
        v[s] = value;
    }
    return v;
}

/* a where mask is set, else b. */
static inline lanes_f pick(lanes_i mask, lanes_f a, lanes_f b) {
    return (lanes_f)(((lanes_i)a & mask) | ((lanes_i)b & ~mask));
}

/* nearest_int of values below 2**22 in magnitude (there the magic-number sum rounds exactly), clamped to
 * low..high, as floats. */
static inline lanes_f rounded_levels(lanes_f v, lanes_f low, lanes_f high) {
    const lanes_f magic = splat(12582912.0f);
    lanes_f r = (v + magic) - magic;
#if defined(__SSE2__) && QX_LANES == 4
    return _mm_min_ps(_mm_max_ps(r, low), high); /* r is finite: the same as the comparisons below */
#else
    r = pick(r < low, low, r);
    return pick(r > high, high, r);
#endif
}

/* qx_quants of the sub-blocks whose values are the lanes of xt [position]: their scales, and their levels
 * 0..2*nmax-1 as floats [position]. Every |inverse * x| is at most about nmax + 1, so rounded_levels applies. */
static void qx_quants_lanes(const lanes_f *xt, int nmax, lanes_f *scale_out, lanes_f *levels_out) {
    const lanes_f low = splat((float)-nmax), high = splat((float)(nmax - 1)), zero = splat(0.0f);
    const lanes_i no_sign = splat_int(0x7FFFFFFF);
    lanes_f peak = zero, largest = zero;
    lanes_f w[SUB_SIZE], wx[SUB_SIZE];
    for (int i = 0; i < SUB_SIZE; i++) { /* the first largest magnitude: a `>` scan in each lane */
        lanes_f magnitude = (lanes_f)((lanes_i)xt[i] & no_sign);
        lanes_i larger = magnitude > largest;
        largest = pick(larger, magnitude, largest);
        peak = pick(larger, xt[i], peak);
        w[i] = xt[i] * xt[i];
        wx[i] = w[i] * xt[i];
    }
    lanes_i all_zero = largest < splat(ALL_ZERO_EPS);
    peak = pick(all_zero, splat(1.0f), peak); /* their result is zero; this keeps the arithmetic finite */

    lanes_f chosen = low / peak, scale = zero, best = zero;
    for (int step = -10; step <= 9; step++) { /* -10 stands for the first trial, at nmax / peak */
        if (step == 0) {
            continue;
        }
        lanes_f inverse = step == -10 ? chosen : -splat((float)nmax + 0.1f * (float)step) / peak;
        lanes_f l = rounded_levels(inverse * xt[0], low, high);
        lanes_f lx = wx[0] * l, l2 = w[0] * l * l;
        for (int i = 1; i < SUB_SIZE; i++) {
            l = rounded_levels(inverse * xt[i], low, high);
            lx += wx[i] * l;
            l2 += w[i] * l * l;
        }
        if (step == -10) {
            scale = pick(l2 != zero, lx / l2, zero);
            best = scale * lx;
            continue;
        }
        lanes_i better = (lx * lx > best * l2) & (l2 > zero);
        chosen = pick(better, inverse, chosen);
        scale = pick(better, lx / l2, scale);
        best = pick(better, scale * lx, best);
    }
    *scale_out = pick(all_zero, zero, scale);
    const lanes_f offset = splat((float)nmax);
    for (int i = 0; i < SUB_SIZE; i++) {
        levels_out[i] = pick(all_zero, zero, rounded_levels(chosen * xt[i], low, high) + offset);
    }
}

/* Q6_K: 16 sub-blocks of 16, 6-bit levels (low nibbles in ql, high pairs in qh), signed 8-bit scales, fp16 d. */
OP_EXPORT void orthopatch_quantize_q6_k(const float *x, uint8_t *out, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++, x += SUPER_BLOCK, out += Q6_K_BYTES) {
        float scales[SUBS];
        uint8_t levels[SUPER_BLOCK];
        for (int group = 0; group < SUBS; group += QX_LANES) {
            lanes_f xt[SUB_SIZE], found[SUB_SIZE], scale;
            for (int i = 0; i < SUB_SIZE; i++) { /* [position][sub-block] */
                for (int s = 0; s < QX_LANES; s++) {
                    xt[i][s] = x[SUB_SIZE * (group + s) + i];
                }
            }
            qx_quants_lanes(xt, 32, &scale, found);
            for (int s = 0; s < QX_LANES; s++) {
                scales[group + s] = scale[s];
                for (int i = 0; i < SUB_SIZE; i++) {
                    levels[SUB_SIZE * (group + s) + i] = (uint8_t)found[i][s];
                }
            }
        }
        float max_scale = first_largest_magnitude(scales, SUBS);
        if (fabsf(max_scale) < ALL_ZERO_EPS) { /* nothing to scale: an all-zero block */
            memset(out, 0, Q6_K_BYTES);
            continue;
        }
        float inverse = -128.0f / max_scale;
        uint16_t d = op_fp16_bits(1.0f / inverse);
        float d_value = op_fp16_value(d);
        uint8_t *ql = out, *qh = out + 128, *codes = out + 192;
        for (int j = 0; j < SUBS; j++) {
            int code = op_nearest_int(inverse * scales[j]);
            codes[j] = (uint8_t)((code < 127 ? code : 127) & 0xFF);
            int8_t signed_code = (int8_t)(codes[j] > 127 ? codes[j] - 256 : codes[j]);
            requantize(x + SUB_SIZE * j, d_value * (float)signed_code, -32, 31, levels + SUB_SIZE * j);
        }
        for (int h = 0; h < 2; h++) { /* levels 128h + 32k + j, k = 0..3, share ql and qh bytes */
            const uint8_t *half = levels + 128 * h;
            for (int j = 0; j < 32; j++) {
                ql[64 * h + j] = (uint8_t)((half[j] & 0xF) | ((half[64 + j] & 0xF) << 4));
                ql[64 * h + 32 + j] = (uint8_t)((half[32 + j] & 0xF) | ((half[96 + j] & 0xF) << 4));
                qh[32 * h + j] = (uint8_t)((half[j] >> 4) | ((half[32 + j] >> 4) << 2) | ((half[64 + j] >> 4) << 4)
                                           | ((half[96 + j] >> 4) << 6));
            }
        }
        store_fp16(out + 208, d);
    }
}
