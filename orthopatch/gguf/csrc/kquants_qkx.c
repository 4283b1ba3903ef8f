/* Q2_K, Q4_K and Q5_K without an importance matrix, byte for byte as ggml's reference quantizers.
 *
 * Each sub-block gets a scale and a min from ggml's least-squares search (make_qkx2_quants, the
 * numpy make_qkx_quants); the super-block stores them as small integer codes of two fp16 steps, and
 * the levels are rounded again with the stored, fp16-rounded scale and min.
 *
 * The search runs on eight sub-blocks at once, one per lane of two four-lane vectors. Every lane
 * performs the float32 operations of the scalar search in its order (each sum runs over the positions
 * in index order, within its lane), so the bytes do not change; the lanes only let eight independent
 * chains of additions overlap where one sub-block alone would wait on every addition.
 */
#include "ggml_float.h"

#define QK_K 256
#define LANES 4  /* sub-blocks per vector (16 bytes: SSE2 on x86-64, NEON on ARM) */
#define GROUPS 2 /* vectors searched together */
#define WIDTH (LANES * GROUPS) /* sub-blocks per search: Q4_K's and Q5_K's eight, half of Q2_K's */
#define MAX_POSITIONS 32

typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE vf vf_splat(float v) { return (vf){v, v, v, v}; }
ALWAYS_INLINE vi vi_splat(int32_t v) { return (vi){v, v, v, v}; }

/* Lanes of `yes` where `mask` is set (all ones), of `no` elsewhere: bits are moved, not values. */
ALWAYS_INLINE vf vf_select(vi mask, vf yes, vf no) { return (vf)((mask & (vi)yes) | (~mask & (vi)no)); }

/* Larger and smaller of each lane pair, for values that are neither NaN nor -0 (whole numbers here). */
#if defined(__SSE2__)
#include <emmintrin.h>
ALWAYS_INLINE vf vf_max(vf a, vf b) { return (vf)_mm_max_ps((__m128)a, (__m128)b); }
ALWAYS_INLINE vf vf_min(vf a, vf b) { return (vf)_mm_min_ps((__m128)a, (__m128)b); }
#else
ALWAYS_INLINE vf vf_max(vf a, vf b) { return vf_select(a > b, a, b); }
ALWAYS_INLINE vf vf_min(vf a, vf b) { return vf_select(a < b, a, b); }
#endif

ALWAYS_INLINE vf vf_abs(vf v) { return (vf)((vi)v & vi_splat(0x7FFFFFFF)); }

/* Each lane clamped to 0..nmax (|level| <= 2**22), by sign shifts rather than compares. */
ALWAYS_INLINE vi clamped(vi level, int nmax) {
    level &= ~(level >> 31);
    vi excess = level - vi_splat(nmax);
    return level - (excess & ~(excess >> 31));
}

/* op_nearest_int of each lane, clamped to 0..nmax afterwards, as float32. The integer is the low 23
 * bits of the rounded sum less 2**22; as the mantissa of a float in [2**23, 2**24) less 1.5 * 2**23, it
 * comes out exactly, and clamping a whole number after the conversion gives the same value. */
ALWAYS_INLINE vf clamped_levels(vf scaled, int nmax) {
    vi bits = (vi)(scaled + vf_splat(12582912.0f));
    vf value = (vf)((bits & vi_splat(0x007FFFFF)) | vi_splat(0x4B000000)) - vf_splat(12582912.0f);
    return vf_min(vf_max(value, vf_splat(0.0f)), vf_splat((float)nmax));
}

/* Over the vectors of a search, unrolled so that their state stays in registers. */
#define FOR_GROUPS(g) _Pragma("GCC unroll 4") for (int g = 0; g < GROUPS; g++)

/* Result of the search for WIDTH sub-blocks: sub-block s in lane s % LANES of vector s / LANES. */
struct qkx_fit {
    vf scale[GROUPS];   /* 0 for a flat sub-block */
    vf the_min[GROUPS]; /* minus the fitted offset (the sub-block's minimum when flat), sign of zero kept */
    vf inverse[GROUPS]; /* the inverse scale and offset whose rounding gave the chosen levels */
    vf offset[GROUPS];
    vi flat[GROUPS];    /* all values equal: the levels are all 0 */
};

/* ggml's make_qkx2_quants on WIDTH sub-blocks of n values: x[i * GROUPS + g] and w[i * GROUPS + g] hold
 * position i of the sub-blocks of vector g. Fits x ≈ scale * L + offset (offset <= 0, L in 0..nmax) by
 * weighted least squares on the rounding of nstep + 1 inverse scales around nmax / (max - offset), each
 * trial starting from the offset found so far, and keeps the fit of least weighted error (absolute with
 * use_mad, squared otherwise). The loops over g only interleave independent sub-blocks. */
ALWAYS_INLINE void qkx_search(const vf *x, const vf *w, int n, int nmax, float rmin, float rdelta, int nstep,
                              int use_mad, struct qkx_fit *fit) {
    const vf zero = vf_splat(0.0f), one = vf_splat(1.0f);
    vf low[GROUPS], high[GROUPS], sum_w[GROUPS], sum_x[GROUPS];
    vi flat[GROUPS];
    FOR_GROUPS(g) {
        low[g] = high[g] = x[g];
        sum_w[g] = w[g];
        sum_x[g] = w[g] * x[g];
    }
    for (int i = 1; i < n; i++) { /* C's scans: the first of equal minima, so a zero keeps its sign */
        FOR_GROUPS(g) {
            vf xi = x[i * GROUPS + g], wi = w[i * GROUPS + g];
            low[g] = vf_select(xi < low[g], xi, low[g]);
            high[g] = vf_select(xi > high[g], xi, high[g]);
            sum_w[g] += wi;
            sum_x[g] += wi * xi;
        }
    }

    vf offset[GROUPS], inverse[GROUPS], scale[GROUPS], best[GROUPS], chosen_inverse[GROUPS], chosen_offset[GROUPS];
    FOR_GROUPS(g) {
        low[g] = vf_select(low[g] > zero, zero, low[g]);
        flat[g] = high[g] == low[g]; /* no scale; a unit span keeps their arithmetic finite until overridden */
        offset[g] = low[g];
        inverse[g] = vf_splat((float)nmax) / vf_select(flat[g], one, high[g] - offset[g]);
        scale[g] = one / inverse[g];
        best[g] = zero;
        chosen_inverse[g] = inverse[g];
        chosen_offset[g] = offset[g];
    }
    for (int i = 0; i < n; i++) {
        FOR_GROUPS(g) {
            vf xi = x[i * GROUPS + g];
            vf diff = scale[g] * clamped_levels(inverse[g] * (xi - offset[g]), nmax) + offset[g] - xi;
            diff = use_mad ? vf_abs(diff) : diff * diff;
            best[g] += w[i * GROUPS + g] * diff;
        }
    }

    vf levels[MAX_POSITIONS * GROUPS];
    for (int step = 0; step <= nstep; step++) {
        float factor = rmin + rdelta * (float)step + (float)nmax;
        vf sum_l[GROUPS], sum_l2[GROUPS], sum_xl[GROUPS];
        FOR_GROUPS(g) {
            inverse[g] = vf_splat(factor) / vf_select(flat[g], one, high[g] - offset[g]);
            sum_l[g] = sum_l2[g] = sum_xl[g] = zero;
        }
        for (int i = 0; i < n; i++) {
            FOR_GROUPS(g) {
                vf xi = x[i * GROUPS + g];
                vf level = clamped_levels(inverse[g] * (xi - offset[g]), nmax);
                levels[i * GROUPS + g] = level;
                vf weighted = w[i * GROUPS + g] * level;
                sum_l[g] += weighted;
                sum_l2[g] += weighted * level;
                sum_xl[g] += weighted * xi;
            }
        }
        vf det[GROUPS], trial_scale[GROUPS], trial_offset[GROUPS], error[GROUPS];
        FOR_GROUPS(g) {
            det[g] = sum_w[g] * sum_l2[g] - sum_l[g] * sum_l[g];
            trial_scale[g] = (sum_w[g] * sum_xl[g] - sum_x[g] * sum_l[g]) / det[g];
            trial_offset[g] = (sum_l2[g] * sum_x[g] - sum_l[g] * sum_xl[g]) / det[g];
            vi clamp = trial_offset[g] > zero; /* a positive offset is refitted as zero, with the scale alone */
            trial_offset[g] = vf_select(clamp, zero, trial_offset[g]);
            trial_scale[g] = vf_select(clamp, sum_xl[g] / sum_l2[g], trial_scale[g]);
            error[g] = zero;
        }
        for (int i = 0; i < n; i++) {
            FOR_GROUPS(g) {
                vf diff = trial_scale[g] * levels[i * GROUPS + g] + trial_offset[g] - x[i * GROUPS + g];
                diff = use_mad ? vf_abs(diff) : diff * diff;
                error[g] += w[i * GROUPS + g] * diff;
            }
        }
        FOR_GROUPS(g) {
            vi better = (error[g] < best[g]) & (det[g] > zero);
            best[g] = vf_select(better, error[g], best[g]);
            chosen_inverse[g] = vf_select(better, inverse[g], chosen_inverse[g]);
            chosen_offset[g] = vf_select(better, offset[g], chosen_offset[g]);
            scale[g] = vf_select(better, trial_scale[g], scale[g]);
            offset[g] = vf_select(better, trial_offset[g], offset[g]);
        }
    }
    FOR_GROUPS(g) {
        fit->scale[g] = vf_select(flat[g], zero, scale[g]);
        fit->the_min[g] = -vf_select(flat[g], low[g], offset[g]);
        fit->inverse[g] = chosen_inverse[g];
        fit->offset[g] = chosen_offset[g];
        fit->flat[g] = flat[g];
    }
}

/* WIDTH sub-blocks of `size` values from `x` (sub-block s at x + s * size) laid out by position. */
ALWAYS_INLINE void by_position(const float *x, int size, vf *out) {
    for (int s = 0; s < WIDTH; s++) {
        for (int i = 0; i < size; i++) {
            out[i * GROUPS + s / LANES][s % LANES] = x[s * size + i];
        }
    }
}

/* The levels of the search for sub-block s of a fit, kept where the stored scale is zero. */
static void searched_levels(const float *x, int size, const struct qkx_fit *fit, int s, int nmax, uint8_t *levels) {
    if (fit->flat[s / LANES][s % LANES]) {
        memset(levels, 0, (size_t)size);
        return;
    }
    float inverse = fit->inverse[s / LANES][s % LANES], offset = fit->offset[s / LANES][s % LANES];
    for (int i = 0; i < size; i++) {
        int level = op_nearest_int(inverse * (x[i] - offset));
        levels[i] = (uint8_t)(level < 0 ? 0 : level > nmax ? nmax : level);
    }
}

/* Levels round((x + offset) / step) clamped to 0..nmax, for `size` values (a multiple of LANES). */
ALWAYS_INLINE void requantized_levels(const float *x, int size, float step, float offset, int nmax,
                                      uint8_t *levels) {
    const vf step_v = vf_splat(step), offset_v = vf_splat(offset);
    for (int i = 0; i < size; i += LANES) {
        vf values;
        memcpy(&values, x + i, sizeof values);
        vi level = ((vi)((values + offset_v) / step_v + vf_splat(12582912.0f)) & vi_splat(0x007FFFFF))
                   - vi_splat(0x00400000);
        level = clamped(level, nmax);
        for (int k = 0; k < LANES; k++) {
            levels[i + k] = (uint8_t)level[k];
        }
    }
}

static void put_fp16(uint8_t *out, uint16_t bits) { memcpy(out, &bits, sizeof bits); }

/* ---------------------------------------------------------------- Q2_K */

/* 16 sub-blocks of 16, 2-bit levels, a 4-bit scale code and min code per sub-block against fp16 d, dmin.
 * Block: scales[16], qs[64], d, dmin (84 bytes). */
OP_EXPORT OP_VECTOR_CLONES void orthopatch_quantize_q2_k(const float *x, uint8_t *out, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++, x += QK_K, out += 84) {
        struct qkx_fit fits[16 / WIDTH];
        float scales[16], mins[16];
        for (int f = 0; f < 16 / WIDTH; f++) {
            vf values[16 * GROUPS], weights[16 * GROUPS];
            by_position(x + f * WIDTH * 16, 16, values);
            for (int i = 0; i < 16 * GROUPS; i++) {
                weights[i] = vf_abs(values[i]);
            }
            qkx_search(values, weights, 16, 3, -0.5f, 0.1f, 15, 1, &fits[f]);
            for (int s = 0; s < WIDTH; s++) {
                scales[f * WIDTH + s] = fits[f].scale[s / LANES][s % LANES];
                mins[f * WIDTH + s] = fits[f].the_min[s / LANES][s % LANES];
            }
        }
        float max_scale = 0.0f, max_min = 0.0f;
        for (int j = 0; j < 16; j++) {
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        uint8_t *codes = out;
        uint16_t d = 0, dmin = 0;
        memset(codes, 0, 16);
        if (max_scale > 0) {
            float inverse = 15.0f / max_scale;
            for (int j = 0; j < 16; j++) {
                codes[j] = (uint8_t)op_nearest_int(inverse * scales[j]);
            }
            d = op_fp16_bits(max_scale / 15.0f);
        }
        if (max_min > 0) {
            float inverse = 15.0f / max_min;
            for (int j = 0; j < 16; j++) {
                codes[j] |= (uint8_t)((uint32_t)op_nearest_int(inverse * mins[j]) << 4);
            }
            dmin = op_fp16_bits(max_min / 15.0f);
        }
        float d_value = op_fp16_value(d), dmin_value = op_fp16_value(dmin);
        uint8_t levels[QK_K];
        for (int j = 0; j < 16; j++) {
            float step = d_value * (float)(codes[j] & 0xF);
            if (step == 0.0f) {
                searched_levels(x + 16 * j, 16, &fits[j / WIDTH], j % WIDTH, 3, levels + 16 * j);
                continue;
            }
            requantized_levels(x + 16 * j, 16, step, dmin_value * (float)(codes[j] >> 4), 3, levels + 16 * j);
        }
        uint8_t *qs = out + 16;
        for (int half = 0; half < 2; half++) {
            const uint8_t *l = levels + 128 * half;
            for (int i = 0; i < 32; i++) {
                qs[32 * half + i] = (uint8_t)(l[i] | (l[32 + i] << 2) | (l[64 + i] << 4) | (l[96 + i] << 6));
            }
        }
        put_fp16(out + 80, d);
        put_fp16(out + 82, dmin);
    }
}

/* ---------------------------------------------------------------- Q4_K and Q5_K */

/* What Q4_K and Q5_K share: 8 sub-blocks of 32 with 6-bit scale and min codes against fp16 d, dmin.
 * Writes d, dmin and the 12 code bytes to out[0..16) and the levels (0..nmax) of the 256 values. */
ALWAYS_INLINE void q45_k_levels(const float *x, int nmax, float rmin, int nstep, uint8_t *out, uint8_t *levels) {
    struct qkx_fit fit;
    float scales[8], mins[8];
    vf values[32 * GROUPS], weights[32 * GROUPS];
    by_position(x, 32, values);
    for (int g = 0; g < GROUPS; g++) {
        vf sum_x2 = vf_splat(0.0f);
        for (int i = 0; i < 32; i++) {
            sum_x2 += values[i * GROUPS + g] * values[i * GROUPS + g];
        }
        vf mean_square = sum_x2 / vf_splat(32.0f), rms;
        for (int k = 0; k < LANES; k++) {
            rms[k] = sqrtf(mean_square[k]);
        }
        for (int i = 0; i < 32; i++) {
            weights[i * GROUPS + g] = rms + vf_abs(values[i * GROUPS + g]);
        }
    }
    qkx_search(values, weights, 32, nmax, rmin, 0.1f, nstep, 0, &fit);
    for (int s = 0; s < 8; s++) {
        scales[s] = fit.scale[s / LANES][s % LANES];
        mins[s] = fit.the_min[s / LANES][s % LANES];
    }

    float max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < 8; j++) {
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    float inverse_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
    float inverse_min = max_min > 0 ? 63.0f / max_min : 0.0f;
    uint8_t scale_codes[8], min_codes[8];
    for (int j = 0; j < 8; j++) {
        uint8_t s = (uint8_t)op_nearest_int(inverse_scale * scales[j]);
        uint8_t m = (uint8_t)op_nearest_int(inverse_min * mins[j]);
        scale_codes[j] = s < 63 ? s : 63;
        min_codes[j] = m < 63 ? m : 63;
    }
    uint16_t d = op_fp16_bits(max_scale / 63.0f), dmin = op_fp16_bits(max_min / 63.0f);
    put_fp16(out, d);
    put_fp16(out + 2, dmin);
    /* the 6-bit packing get_scale_min_k4 reads: low 6 bits of the first four of each in bytes 0..7,
     * the last four as nibbles in bytes 8..11, their top two bits in the spare bits of bytes 0..7 */
    uint8_t *packed = out + 4;
    for (int j = 0; j < 4; j++) {
        packed[j] = (uint8_t)(scale_codes[j] | ((scale_codes[j + 4] >> 4) << 6));
        packed[j + 4] = (uint8_t)(min_codes[j] | ((min_codes[j + 4] >> 4) << 6));
        packed[j + 8] = (uint8_t)((scale_codes[j + 4] & 0xF) | ((min_codes[j + 4] & 0xF) << 4));
    }

    float d_value = op_fp16_value(d), dmin_value = op_fp16_value(dmin);
    for (int j = 0; j < 8; j++) { /* codes are at most 63, so they unpack to themselves */
        float step = d_value * (float)scale_codes[j];
        if (step == 0.0f) {
            searched_levels(x + 32 * j, 32, &fit, j, nmax, levels + 32 * j);
            continue;
        }
        requantized_levels(x + 32 * j, 32, step, dmin_value * (float)min_codes[j], nmax, levels + 32 * j);
    }
}

/* Q4_K: 4-bit levels, two sub-blocks' levels sharing each byte. Block: d, dmin, scales[12], qs[128]. */
OP_EXPORT OP_VECTOR_CLONES void orthopatch_quantize_q4_k(const float *x, uint8_t *out, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++, x += QK_K, out += 144) {
        uint8_t levels[QK_K];
        q45_k_levels(x, 15, -1.0f, 20, out, levels);
        uint8_t *qs = out + 16;
        for (int g = 0; g < 4; g++) {
            for (int i = 0; i < 32; i++) {
                qs[32 * g + i] = (uint8_t)(levels[64 * g + i] | (levels[64 * g + 32 + i] << 4));
            }
        }
    }
}

/* Q5_K: as Q4_K with 5-bit levels, the fifth bit of position i of sub-block j at bit j of qh[i].
 * Block: d, dmin, scales[12], qh[32], qs[128]. */
OP_EXPORT OP_VECTOR_CLONES void orthopatch_quantize_q5_k(const float *x, uint8_t *out, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++, x += QK_K, out += 176) {
        uint8_t levels[QK_K];
        q45_k_levels(x, 31, -0.5f, 15, out, levels);
        uint8_t *qh = out + 16, *qs = out + 48;
        for (int i = 0; i < 32; i++) {
            uint8_t high = 0;
            for (int j = 0; j < 8; j++) {
                high |= (uint8_t)((levels[32 * j + i] >> 4) << j);
            }
            qh[i] = high;
        }
        for (int g = 0; g < 4; g++) {
            for (int i = 0; i < 32; i++) {
                qs[32 * g + i] = (uint8_t)((levels[64 * g + i] & 0xF) | ((levels[64 * g + 32 + i] & 0xF) << 4));
            }
        }
    }
}
