/* Q2_K, Q4_K and Q5_K, and with an importance matrix also Q4_1 and Q5_1, byte for byte as ggml's
 * quantizers (the rules of orthopatch.gguf.kquants and its make_qkx_quants and make_qp_quants).
 *
 * Each sub-block gets a scale and a min from ggml's least-squares search (make_qkx2_quants, or
 * make_qkx3_quants with importance weights); a k-quant super-block stores them as small integer codes
 * of two fp16 steps (relative to the largest, or from make_qp_quants with weights), and the levels are
 * rounded again with the stored, fp16-rounded scale and min. The weighted legacy types store the
 * searched scale and min of each 32-value block as fp16 and keep the search's levels.
 *
 * The search runs on eight sub-blocks at once, one per lane of two four-lane vectors. Every lane
 * performs the float32 operations of the scalar search in its order (each sum runs over the positions
 * in index order, within its lane), so the bytes do not change; the lanes only let eight independent
 * chains of additions overlap where one sub-block alone would wait on every addition.
 */
#include "lanes.h"

#define QK_K 256
#define GROUPS 2 /* vectors searched together */
#define WIDTH (LANES * GROUPS) /* sub-blocks per search: Q4_K's and Q5_K's eight, half of Q2_K's */
#define MAX_POSITIONS 32

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

/* ggml's make_qp_quants on n non-negative values x (a super-block's sub-block scales or mins): the step
 * and codes 0..nmax (stored as bytes, wrapping as C does) for x ≈ step * code, weighted by w. Picks the
 * best of 9 inverse steps around nmax / max x by weighted squared error, then refines code by code
 * (up to five sweeps) where that explains more weighted energy. A NaN among x is the maximum, as numpy's. */
static float qp_quants(const float *x, int n, int nmax, const float *w, uint8_t *codes_out) {
    float peak = x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] > peak || x[i] != x[i]) peak = x[i] != x[i] || peak != peak ? NAN : x[i];
    }
    if (peak < 0.0f) peak = 0.0f;
    int all_zero = peak < 1e-15f;
    if (all_zero) peak = 1.0f;
    float wx[16], codes[16];
    for (int i = 0; i < n; i++) {
        wx[i] = w[i] * x[i];
    }
    float inverse = (float)nmax / peak, best = 0.0f;
    for (int k = -5; k <= 4; k++) { /* k = -5: the first rounding, unclamped; then steps -4..-1, 1..4 */
        if (k == 0) continue;
        float trial_inverse = k == -5 ? inverse : (0.1f * (float)k + (float)nmax) / peak;
        float step = 1.0f / trial_inverse, error = 0.0f;
        for (int i = 0; i < n; i++) {
            int level = op_nearest_int(trial_inverse * x[i]);
            float l = k == -5 ? (float)(level & 0xFF) : (float)(level < nmax ? level : nmax);
            float diff = x[i] - step * l, term = w[i] * diff * diff;
            error = i ? error + term : term;
        }
        if (k == -5) {
            best = error;
        } else if (error < best) {
            best = error;
            inverse = trial_inverse;
        }
    }
    float sum_lx = 0.0f, sum_l2 = 0.0f;
    for (int i = 0; i < n; i++) {
        int level = op_nearest_int(inverse * x[i]);
        float l = (float)(level < nmax ? level : nmax);
        sum_lx = i ? sum_lx + wx[i] * l : wx[i] * l;
        sum_l2 = i ? sum_l2 + w[i] * l * l : w[i] * l * l;
        codes[i] = (float)((int)l & 0xFF);
    }
    for (int sweep = 0; sweep < 5 && !all_zero; sweep++) {
        int changed = 0;
        for (int i = 0; i < n; i++) {
            float code = codes[i];
            float without_lx = sum_lx - wx[i] * code, without_l2 = sum_l2 - w[i] * code * code;
            int level = op_nearest_int(x[i] * without_l2 / without_lx);
            float proposal = (float)(level < nmax ? level : nmax);
            float with_lx = without_lx + wx[i] * proposal, with_l2 = without_l2 + w[i] * proposal * proposal;
            if (without_lx > 0 && without_l2 > 0 && proposal != code
                && with_lx * with_lx * sum_l2 > sum_lx * sum_lx * with_l2) {
                codes[i] = (float)((int)proposal & 0xFF);
                sum_lx = with_lx;
                sum_l2 = with_l2;
                changed = 1;
            }
        }
        if (!changed) break;
    }
    for (int i = 0; i < n; i++) {
        codes_out[i] = all_zero ? 0 : (uint8_t)codes[i];
    }
    return all_zero || !(sum_l2 > 0) ? 0.0f : sum_lx / sum_l2;
}

/* Weighted sums of each sub-block of `size` values of w, in index order. */
static void sub_block_weights(const float *w, int subs, int size, float *sums) {
    for (int j = 0; j < subs; j++) {
        sums[j] = op_running_sum(w + size * j, size);
    }
}

/* The k-quant block quantizer `block(x, importance, out)` on every super-block of n_rows rows of row_values
 * values, with the importance of the super-block's columns. */
#define FOR_EACH_SUPER_BLOCK(block, block_bytes)                                                       \
    for (int64_t r = 0; r < n_rows; r++) {                                                            \
        for (int64_t c = 0; c < row_values; c += QK_K) {                                              \
            block(x + r * row_values + c, importance + c,                                             \
                  out + (r * row_values + c) / QK_K * (block_bytes));                                   \
        }                                                                                             \
    }

/* ---------------------------------------------------------------- Q2_K */

/* Q2_K's levels from the stored codes, d and dmin, and the block's bytes. Block: scales[16], qs[64],
 * d, dmin (84 bytes); `codes` is out[0..16). */
ALWAYS_INLINE void q2_k_finish(const float *x, const struct qkx_fit *fits, uint16_t d, uint16_t dmin, uint8_t *out) {
    const uint8_t *codes = out;
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
    op_put_fp16(out + 80, d);
    op_put_fp16(out + 82, dmin);
}

/* Q2_K's sub-block search (16 sub-blocks of 16, 2-bit levels): scales and mins per sub-block. */
ALWAYS_INLINE void q2_k_search(const float *x, const float *w, float rmin, float rdelta, int nstep, int use_mad,
                               struct qkx_fit *fits, float *scales, float *mins) {
    for (int f = 0; f < 16 / WIDTH; f++) {
        vf values[16 * GROUPS], weights[16 * GROUPS];
        by_position(x + f * WIDTH * 16, 16, values);
        if (w) {
            by_position(w + f * WIDTH * 16, 16, weights);
        } else {
            for (int i = 0; i < 16 * GROUPS; i++) {
                weights[i] = vf_abs(values[i]);
            }
        }
        qkx_search(values, weights, 16, 3, rmin, rdelta, nstep, use_mad, &fits[f]);
        for (int s = 0; s < WIDTH; s++) {
            scales[f * WIDTH + s] = fits[f].scale[s / LANES][s % LANES];
            mins[f * WIDTH + s] = fits[f].the_min[s / LANES][s % LANES];
        }
    }
}

/* Q2_K: a 4-bit scale code and min code per sub-block against fp16 d, dmin (relative to the largest). */
OP_EXPORT OP_VECTOR_CLONES void orthopatch_quantize_q2_k(const float *x, uint8_t *out, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++, x += QK_K, out += 84) {
        struct qkx_fit fits[16 / WIDTH];
        float scales[16], mins[16];
        q2_k_search(x, NULL, -0.5f, 0.1f, 15, 1, fits, scales, mins);
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
        q2_k_finish(x, fits, d, dmin, out);
    }
}

/* Q2_K with an importance matrix: weights importance * sqrt(σ² + x²), the scale and min codes from
 * make_qp_quants weighted by each sub-block's total weight. */
ALWAYS_INLINE void q2_k_weighted_block(const float *x, const float *importance, uint8_t *out) {
    float w[QK_K], sub_weights[16], scales[16], mins[16];
    struct qkx_fit fits[16 / WIDTH];
    uint8_t scale_codes[16], min_codes[16];
    op_importance_weights(x, importance, 1, w);
    q2_k_search(x, w, -0.9f, 0.05f, 36, 0, fits, scales, mins);
    sub_block_weights(w, 16, 16, sub_weights);
    uint16_t d = op_fp16_bits(qp_quants(scales, 16, 15, sub_weights, scale_codes));
    uint16_t dmin = op_fp16_bits(qp_quants(mins, 16, 15, sub_weights, min_codes));
    for (int j = 0; j < 16; j++) {
        out[j] = (uint8_t)(scale_codes[j] | (min_codes[j] << 4));
    }
    q2_k_finish(x, fits, d, dmin, out);
}

OP_EXPORT OP_VECTOR_CLONES void orthopatch_quantize_q2_k_weighted(const float *x, const float *importance, uint8_t *out,
                                                                  int64_t n_rows, int64_t row_values) {
    FOR_EACH_SUPER_BLOCK(q2_k_weighted_block, 84)
}

/* ---------------------------------------------------------------- Q4_K and Q5_K */

/* What Q4_K and Q5_K share after the search: packs the 6-bit scale and min codes (get_scale_min_k4's
 * layout, codes past 63 losing their high bits as ggml's packing does) with d and dmin into out[0..16),
 * and rounds the 256 values again with the codes read back, to levels 0..nmax. */
ALWAYS_INLINE void q45_k_finish(const float *x, const struct qkx_fit *fit, const int *scale_codes,
                                const int *min_codes, uint16_t d, uint16_t dmin, int nmax, uint8_t *out,
                                uint8_t *levels) {
    op_put_fp16(out, d);
    op_put_fp16(out + 2, dmin);
    /* the low 6 bits of the first four of each in bytes 0..7, the last four as nibbles in bytes 8..11,
     * their top two bits in the spare bits of bytes 0..7 */
    uint8_t *packed = out + 4;
    for (int j = 0; j < 4; j++) {
        packed[j] = (uint8_t)(scale_codes[j] | ((scale_codes[j + 4] >> 4) << 6));
        packed[j + 4] = (uint8_t)(min_codes[j] | ((min_codes[j + 4] >> 4) << 6));
        packed[j + 8] = (uint8_t)((scale_codes[j + 4] & 0xF) | ((min_codes[j + 4] & 0xF) << 4));
    }
    float d_value = op_fp16_value(d), dmin_value = op_fp16_value(dmin);
    for (int j = 0; j < 8; j++) {
        int sc = j < 4 ? packed[j] & 63 : (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4);
        int m = j < 4 ? packed[j + 4] & 63 : (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
        float step = d_value * (float)sc;
        if (step == 0.0f) {
            searched_levels(x + 32 * j, 32, fit, j, nmax, levels + 32 * j);
            continue;
        }
        requantized_levels(x + 32 * j, 32, step, dmin_value * (float)m, nmax, levels + 32 * j);
    }
}

/* Q4_K's and Q5_K's levels: 8 sub-blocks of 32 with 6-bit scale and min codes against fp16 d, dmin,
 * written with d, dmin and the 12 code bytes to out[0..16). Without importance (NULL) the codes are
 * relative to the largest scale and min, with it make_qp_quants' codes weighted by sub-block weight. */
ALWAYS_INLINE void q45_k_levels(const float *x, const float *importance, int nmax, float rmin, int nstep,
                                uint8_t *out, uint8_t *levels) {
    struct qkx_fit fit;
    float scales[8], mins[8];
    vf values[32 * GROUPS], weights[32 * GROUPS];
    float w[QK_K];
    by_position(x, 32, values);
    if (importance) {
        op_importance_weights(x, importance, 2, w);
        by_position(w, 32, weights);
        qkx_search(values, weights, 32, nmax, -0.9f, 0.05f, 36, 0, &fit);
    } else {
        for (int g = 0; g < GROUPS; g++) {
            vf sum_x2 = vf_splat(0.0f);
            for (int i = 0; i < 32; i++) {
                sum_x2 += values[i * GROUPS + g] * values[i * GROUPS + g];
            }
            vf mean_square = sum_x2 / vf_splat(32.0f), rms = mean_square;
            for (int k = 0; k < LANES; k++) {
                rms[k] = sqrtf(mean_square[k]);
            }
            for (int i = 0; i < 32; i++) {
                weights[i * GROUPS + g] = rms + vf_abs(values[i * GROUPS + g]);
            }
        }
        qkx_search(values, weights, 32, nmax, rmin, 0.1f, nstep, 0, &fit);
    }
    for (int s = 0; s < 8; s++) {
        scales[s] = fit.scale[s / LANES][s % LANES];
        mins[s] = fit.the_min[s / LANES][s % LANES];
    }

    int scale_codes[8], min_codes[8];
    uint16_t d, dmin;
    if (importance) {
        float sub_weights[8];
        uint8_t sc[8], m[8];
        sub_block_weights(w, 8, 32, sub_weights);
        d = op_fp16_bits(qp_quants(scales, 8, 63, sub_weights, sc));
        dmin = op_fp16_bits(qp_quants(mins, 8, 63, sub_weights, m));
        for (int j = 0; j < 8; j++) { /* Q5_K clamps the codes to 6 bits, Q4_K packs them as they come */
            scale_codes[j] = nmax == 31 && sc[j] > 63 ? 63 : sc[j];
            min_codes[j] = nmax == 31 && m[j] > 63 ? 63 : m[j];
        }
    } else {
        float max_scale = 0.0f, max_min = 0.0f;
        for (int j = 0; j < 8; j++) {
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        float inverse_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
        float inverse_min = max_min > 0 ? 63.0f / max_min : 0.0f;
        for (int j = 0; j < 8; j++) {
            uint8_t s = (uint8_t)op_nearest_int(inverse_scale * scales[j]);
            uint8_t m = (uint8_t)op_nearest_int(inverse_min * mins[j]);
            scale_codes[j] = s < 63 ? s : 63;
            min_codes[j] = m < 63 ? m : 63;
        }
        d = op_fp16_bits(max_scale / 63.0f);
        dmin = op_fp16_bits(max_min / 63.0f);
    }
    q45_k_finish(x, &fit, scale_codes, min_codes, d, dmin, nmax, out, levels);
}

/* Q4_K: 4-bit levels, two sub-blocks' levels sharing each byte. Block: d, dmin, scales[12], qs[128]. */
ALWAYS_INLINE void q4_k_block(const float *x, const float *importance, uint8_t *out) {
    uint8_t levels[QK_K];
    q45_k_levels(x, importance, 15, -1.0f, 20, out, levels);
    uint8_t *qs = out + 16;
    for (int g = 0; g < 4; g++) {
        for (int i = 0; i < 32; i++) {
            qs[32 * g + i] = (uint8_t)(levels[64 * g + i] | (levels[64 * g + 32 + i] << 4));
        }
    }
}

/* Q5_K: as Q4_K with 5-bit levels, the fifth bit of position i of sub-block j at bit j of qh[i].
 * Block: d, dmin, scales[12], qh[32], qs[128]. */
ALWAYS_INLINE void q5_k_block(const float *x, const float *importance, uint8_t *out) {
    uint8_t levels[QK_K];
    q45_k_levels(x, importance, 31, -0.5f, 15, out, levels);
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

OP_EXPORT OP_VECTOR_CLONES void orthopatch_quantize_q4_k(const float *x, uint8_t *out, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++) {
        q4_k_block(x + QK_K * b, NULL, out + 144 * b);
    }
}

OP_EXPORT OP_VECTOR_CLONES void orthopatch_quantize_q5_k(const float *x, uint8_t *out, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++) {
        q5_k_block(x + QK_K * b, NULL, out + 176 * b);
    }
}

OP_EXPORT OP_VECTOR_CLONES void orthopatch_quantize_q4_k_weighted(const float *x, const float *importance, uint8_t *out,
                                                                  int64_t n_rows, int64_t row_values) {
    FOR_EACH_SUPER_BLOCK(q4_k_block, 144)
}

OP_EXPORT OP_VECTOR_CLONES void orthopatch_quantize_q5_k_weighted(const float *x, const float *importance, uint8_t *out,
                                                                  int64_t n_rows, int64_t row_values) {
    FOR_EACH_SUPER_BLOCK(q5_k_block, 176)
}

/* ---------------------------------------------------------------- Q4_1 and Q5_1 with an importance matrix */

/* Q4_1 (nmax 15) and Q5_1 (31) of one row: each block of 32 a searched scale and min (make_qkx3_quants
 * weighted by importance * sqrt(σ² + x²), σ² the row's mean square), stored as fp16 d and m; the levels
 * are the search's. Eight blocks are searched at once; a short last group fills its lanes with zeros. */
ALWAYS_INLINE void q41_51_row(const float *x, const float *importance, int64_t n_values, int nmax, uint8_t *out) {
    const int block_bytes = nmax == 15 ? 20 : 24;
    float mean_square = op_row_mean_square(x, n_values);
    for (int64_t first = 0; first < n_values / 32; first += WIDTH) {
        int count = n_values / 32 - first < WIDTH ? (int)(n_values / 32 - first) : WIDTH;
        float xs[32 * WIDTH] = {0}, ws[32 * WIDTH] = {0};
        memcpy(xs, x + 32 * first, sizeof(float) * 32 * (size_t)count);
        for (int s = 0; s < count; s++) {
            op_legacy_weights(xs + 32 * s, importance + 32 * (first + s), mean_square, ws + 32 * s);
        }
        vf values[32 * GROUPS], weights[32 * GROUPS];
        struct qkx_fit fit;
        by_position(xs, 32, values);
        by_position(ws, 32, weights);
        qkx_search(values, weights, 32, nmax, -0.9f, 0.05f, 36, 0, &fit);
        for (int s = 0; s < count; s++) {
            uint8_t *block = out + block_bytes * (first + s), levels[32];
            op_put_fp16(block, op_fp16_bits(fit.scale[s / LANES][s % LANES]));
            op_put_fp16(block + 2, op_fp16_bits(-fit.the_min[s / LANES][s % LANES]));
            searched_levels(xs + 32 * s, 32, &fit, s, nmax, levels);
            op_put_levels_32(block + 4, levels, nmax == 31);
        }
    }
}

OP_EXPORT OP_VECTOR_CLONES void orthopatch_quantize_q4_1_weighted(const float *x, const float *importance, uint8_t *out,
                                                                  int64_t n_rows, int64_t row_values) {
    for (int64_t r = 0; r < n_rows; r++) {
        q41_51_row(x + r * row_values, importance, row_values, 15, out + r * (row_values / 32 * 20));
    }
}

OP_EXPORT OP_VECTOR_CLONES void orthopatch_quantize_q5_1_weighted(const float *x, const float *importance, uint8_t *out,
                                                                  int64_t n_rows, int64_t row_values) {
    for (int64_t r = 0; r < n_rows; r++) {
        q41_51_row(x + r * row_values, importance, row_values, 31, out + r * (row_values / 32 * 24));
    }
}
