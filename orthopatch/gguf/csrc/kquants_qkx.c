/* Q2_K, Q4_K and Q5_K without an importance matrix, byte for byte as ggml's reference quantizers.
 *
 * Each sub-block gets a scale and a min from ggml's least-squares search (make_qkx2_quants, the
 * numpy make_qkx_quants); the super-block stores them as small integer codes of two fp16 steps, and
 * the levels are rounded again with the stored, fp16-rounded scale and min.
 *
 * The search runs on eight sub-blocks at once, one per lane of a vector. Every lane performs the
 * float32 operations of the scalar search in its order (each sum runs over the positions in index
 * order, within its lane), so the bytes do not change; the lanes only let eight independent chains
 * of additions overlap where one sub-block alone would wait on every addition.
 */
#include "ggml_float.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi" /* the 32-byte vectors never cross a non-inlined call */
#endif

#define QK_K 256
#define LANES 4
#define MAX_POSITIONS 32

typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE vf vf_splat(float v) { return (vf){v, v, v, v}; }
ALWAYS_INLINE vi vi_splat(int32_t v) { return (vi){v, v, v, v}; }

/* Lanes of `yes` where `mask` is set (all ones), of `no` elsewhere: bits are moved, not values. */
ALWAYS_INLINE vf vf_select(vi mask, vf yes, vf no) { return (vf)((mask & (vi)yes) | (~mask & (vi)no)); }

/* Larger and smaller of each lane pair, for values that are neither NaN nor -0 (whole numbers here). */
#if defined(__SSE2__) && LANES == 4
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

/* op_nearest_int of each lane, clamped to 0..nmax afterwards, as float32. The integer lies within
 * +-2**22, so it converts exactly and clamping after the conversion gives the same value. */
ALWAYS_INLINE vf clamped_levels(vf scaled, int nmax) {
    vi level = ((vi)(scaled + vf_splat(12582912.0f)) & vi_splat(0x007FFFFF)) - vi_splat(0x00400000);
    vf value = __builtin_convertvector(level, vf);
    return vf_min(vf_max(value, vf_splat(0.0f)), vf_splat((float)nmax));
}

/* Result of the search for the eight sub-blocks of a group, one per lane. */
struct qkx_fit {
    vf scale;   /* 0 for a flat sub-block */
    vf the_min; /* minus the fitted offset (the sub-block's minimum when flat), sign of zero kept */
    vf inverse; /* the inverse scale and offset whose rounding gave the chosen levels */
    vf offset;
    vi flat;    /* all values equal: the levels are all 0 */
};

/* ggml's make_qkx2_quants on eight sub-blocks: x[i] and w[i] hold position i of every lane's sub-block.
 * Fits x ≈ scale * L + offset (offset <= 0, L in 0..nmax) by weighted least squares on the rounding of
 * nstep + 1 inverse scales around nmax / (max - offset), each trial starting from the offset found so
 * far, and keeps the fit of least weighted error (absolute with use_mad, squared otherwise). */
ALWAYS_INLINE struct qkx_fit qkx_search(const vf *x, const vf *w, int n, int nmax, float rmin, float rdelta,
                                        int nstep, int use_mad) {
    const vf zero = vf_splat(0.0f), one = vf_splat(1.0f);
    vf low = x[0], high = x[0], sum_w = w[0], sum_x = w[0] * x[0];
    for (int i = 1; i < n; i++) { /* C's scans: the first of equal minima, so a zero keeps its sign */
        low = vf_select(x[i] < low, x[i], low);
        high = vf_select(x[i] > high, x[i], high);
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    low = vf_select(low > zero, zero, low);
    vi flat = high == low; /* no scale; a unit span keeps their arithmetic finite, the result is overridden */

    vf offset = low;
    vf inverse = vf_splat((float)nmax) / vf_select(flat, one, high - offset);
    vf scale = one / inverse;
    vf best = zero;
    for (int i = 0; i < n; i++) {
        vf diff = scale * clamped_levels(inverse * (x[i] - offset), nmax) + offset - x[i];
        diff = use_mad ? vf_abs(diff) : diff * diff;
        best += w[i] * diff;
    }
    vf chosen_inverse = inverse, chosen_offset = offset;

    vf levels[MAX_POSITIONS];
    for (int step = 0; step <= nstep; step++) {
        float factor = rmin + rdelta * (float)step + (float)nmax;
        inverse = vf_splat(factor) / vf_select(flat, one, high - offset);
        vf sum_l = zero, sum_l2 = zero, sum_xl = zero;
        for (int i = 0; i < n; i++) {
            vf level = clamped_levels(inverse * (x[i] - offset), nmax);
            levels[i] = level;
            vf weighted = w[i] * level;
            sum_l += weighted;
            sum_l2 += weighted * level;
            sum_xl += weighted * x[i];
        }
        vf det = sum_w * sum_l2 - sum_l * sum_l;
        vf trial_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        vf trial_offset = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        vi clamp = trial_offset > zero; /* a positive offset is refitted as zero, with the scale alone */
        trial_offset = vf_select(clamp, zero, trial_offset);
        trial_scale = vf_select(clamp, sum_xl / sum_l2, trial_scale);
        vf error = zero;
        for (int i = 0; i < n; i++) {
            vf diff = trial_scale * levels[i] + trial_offset - x[i];
            diff = use_mad ? vf_abs(diff) : diff * diff;
            error += w[i] * diff;
        }
        vi better = (error < best) & (det > zero);
        best = vf_select(better, error, best);
        chosen_inverse = vf_select(better, inverse, chosen_inverse);
        chosen_offset = vf_select(better, offset, chosen_offset);
        scale = vf_select(better, trial_scale, scale);
        offset = vf_select(better, trial_offset, offset);
    }
    struct qkx_fit fit;
    fit.scale = vf_select(flat, zero, scale);
    fit.the_min = -vf_select(flat, low, offset);
    fit.inverse = chosen_inverse;
    fit.offset = chosen_offset;
    fit.flat = flat;
    return fit;
}

/* Eight sub-blocks of `size` values from `x` (sub-block k at x + k * size) laid out by position. */
ALWAYS_INLINE void by_position(const float *x, int size, vf *out) {
    for (int k = 0; k < LANES; k++) {
        for (int i = 0; i < size; i++) {
            out[i][k] = x[k * size + i];
        }
    }
}

/* The levels of the search for lane k, kept where the stored scale is zero. */
static void searched_levels(const float *x, int size, const struct qkx_fit *fit, int k, int nmax, uint8_t *levels) {
    if (fit->flat[k]) {
        memset(levels, 0, (size_t)size);
        return;
    }
    float inverse = fit->inverse[k], offset = fit->offset[k];
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
OP_EXPORT void orthopatch_quantize_q2_k(const float *x, uint8_t *out, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++, x += QK_K, out += 84) {
        struct qkx_fit fits[16 / LANES];
        float scales[16], mins[16];
        for (int g = 0; g < 16 / LANES; g++) {
            vf values[16], weights[16];
            by_position(x + g * LANES * 16, 16, values);
            for (int i = 0; i < 16; i++) {
                weights[i] = vf_abs(values[i]);
            }
            fits[g] = qkx_search(values, weights, 16, 3, -0.5f, 0.1f, 15, 1);
            for (int k = 0; k < LANES; k++) {
                scales[g * LANES + k] = fits[g].scale[k];
                mins[g * LANES + k] = fits[g].the_min[k];
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
                searched_levels(x + 16 * j, 16, &fits[j / LANES], j % LANES, 3, levels + 16 * j);
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
    struct qkx_fit fits[8 / LANES];
    float scales[8], mins[8];
    for (int g = 0; g < 8 / LANES; g++) {
        vf values[32], weights[32];
        by_position(x + g * LANES * 32, 32, values);
        vf sum_x2 = vf_splat(0.0f);
        for (int i = 0; i < 32; i++) {
            sum_x2 += values[i] * values[i];
        }
        vf mean_square = sum_x2 / vf_splat(32.0f), rms;
        for (int k = 0; k < LANES; k++) {
            rms[k] = sqrtf(mean_square[k]);
        }
        for (int i = 0; i < 32; i++) {
            weights[i] = rms + vf_abs(values[i]);
        }
        fits[g] = qkx_search(values, weights, 32, nmax, rmin, 0.1f, nstep, 0);
        for (int k = 0; k < LANES; k++) {
            scales[g * LANES + k] = fits[g].scale[k];
            mins[g * LANES + k] = fits[g].the_min[k];
        }
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
            searched_levels(x + 32 * j, 32, &fits[j / LANES], j % LANES, nmax, levels + 32 * j);
            continue;
        }
        requantized_levels(x + 32 * j, 32, step, dmin_value * (float)min_codes[j], nmax, levels + 32 * j);
    }
}

/* Q4_K: 4-bit levels, two sub-blocks' levels sharing each byte. Block: d, dmin, scales[12], qs[128]. */
OP_EXPORT void orthopatch_quantize_q4_k(const float *x, uint8_t *out, int64_t n_blocks) {
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
OP_EXPORT void orthopatch_quantize_q5_k(const float *x, uint8_t *out, int64_t n_blocks) {
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
