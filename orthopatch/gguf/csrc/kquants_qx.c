/* Q3_K and Q6_K, and with an importance matrix also Q4_0 and Q5_0: the rules of
 * orthopatch.gguf.kquants.quantize_q3_k, quantize_q6_k and quantize_q4_0/q5_0_weighted (with
 * make_q3_quants and make_qx_quants of orthopatch.gguf.blockmath), on sub-blocks held on the stack.
 *
 * Every float operation is the one the numpy code makes, in its order: sums run in index order from the
 * first term, products group left to right as written there, and nearest_int rounds half to even. The
 * largest-magnitude scans are C `>` scans, which pass over NaN (values past about 1.8e19 square to inf,
 * and a sub-block's sums can then be NaN), as ggml's do. The bytes are ggml's block layouts.
 *
 * The scale searches run LANES sub-blocks side by side: lane s of every vector belongs to sub-block s and
 * makes that sub-block's operations in that order, so the lanes' chains of dependent sums overlap.
 */
#include "lanes.h"

#define SUPER_BLOCK 256
#define SUB_SIZE 16
#define SUBS (SUPER_BLOCK / SUB_SIZE)
#define ALL_ZERO_EPS 1e-15f
#define QX_MAX 32 /* the longest sub-block make_qx_quants takes: a legacy block */

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

/* nearest_int of v clamped to low..high, as floats. Below 2**22 in magnitude the magic-number sum rounds
 * exactly, as rint; exact takes op_nearest_int's bit trick instead, which also covers inf and NaN (from
 * non-finite values in a sub-block). Inlined with a constant exact, each caller gets one of the two. */
__attribute__((always_inline)) static inline vf rounded_levels(vf v, vf low, vf high, int exact) {
    const vf magic = vf_splat(12582912.0f);
    vf r;
    if (exact) {
        vi n = ((vi)(v + magic) & vi_splat(0x007FFFFF)) - vi_splat(0x00400000);
        r = __builtin_convertvector(n, vf);
    } else {
        r = (v + magic) - magic;
    }
    return vf_min(vf_max(r, low), high); /* r is finite */
}

/* Whether every value of n positions of lanes is finite. */
static inline int all_finite(const vf *xt, int n) {
    vi special = vi_splat(0);
    for (int i = 0; i < n; i++) {
        special |= ((vi)xt[i] & vi_splat(0x7F800000)) == vi_splat(0x7F800000);
    }
    int any = 0;
    for (int s = 0; s < LANES; s++) {
        any |= special[s];
    }
    return !any;
}

/* Sub-blocks first + s (s < LANES) of a super-block as lanes, [position]. */
static inline void gather_lanes(const float *x, int first, vf *xt) {
    for (int i = 0; i < SUB_SIZE; i++) {
        for (int s = 0; s < LANES; s++) {
            xt[i][s] = x[SUB_SIZE * (first + s) + i];
        }
    }
}

/* Lanes' levels [position] back into per-sub-block order, from sub-block first on. */
static inline void scatter_levels(const vf *found, int first, uint8_t *levels) {
    for (int s = 0; s < LANES; s++) {
        for (int i = 0; i < SUB_SIZE; i++) {
            levels[SUB_SIZE * (first + s) + i] = (uint8_t)found[i][s];
        }
    }
}

/* The start of both searches on n positions: each lane's first largest magnitude (a `>` scan), the
 * weights w (`given`, or x² where that is NULL) and w * x, and which lanes are all zero (their peak is
 * set to 1, which keeps their arithmetic finite; their results are zero). */
ALWAYS_INLINE vi weights_and_peak(const vf *xt, int n, const vf *given, vf *w, vf *wx, vf *peak) {
    const vi no_sign = vi_splat(0x7FFFFFFF);
    vf largest = vf_splat(0.0f), found = vf_splat(0.0f);
    for (int i = 0; i < n; i++) {
        vf magnitude = (vf)((vi)xt[i] & no_sign);
        vi larger = magnitude > largest;
        largest = vf_select(larger, magnitude, largest);
        found = vf_select(larger, xt[i], found);
        w[i] = given ? given[i] : xt[i] * xt[i];
        wx[i] = w[i] * xt[i];
    }
    vi all_zero = largest < vf_splat(ALL_ZERO_EPS);
    *peak = vf_select(all_zero, vf_splat(1.0f), found);
    return all_zero;
}

/* Levels of inverse * x in low..high, as floats [position], and their sums Σ w x l and Σ w l l in order. */
__attribute__((always_inline)) static inline void trial(const vf *xt, const vf *w, const vf *wx,
                                                       vf inverse, vf low, vf high, int exact,
                                                       vf *levels, vf *sum_lx, vf *sum_l2) {
    vf l = levels[0] = rounded_levels(inverse * xt[0], low, high, exact);
    vf lx = wx[0] * l, l2 = w[0] * l * l;
    for (int i = 1; i < SUB_SIZE; i++) {
        l = levels[i] = rounded_levels(inverse * xt[i], low, high, exact);
        lx += wx[i] * l;
        l2 += w[i] * l * l;
    }
    *sum_lx = lx;
    *sum_l2 = l2;
}

/* The sums of trial, without its levels, for two groups of lanes at once: their chains of dependent additions
 * interleave, so neither waits on the other's latency. */
__attribute__((always_inline)) static inline void trial_sums_pair(vf (*xt)[QX_MAX], vf (*w)[QX_MAX],
                                                                 vf (*wx)[QX_MAX], int n, const vf *inverse,
                                                                 vf low, vf high, int exact,
                                                                 vf *sum_lx, vf *sum_l2) {
    vf a = rounded_levels(inverse[0] * xt[0][0], low, high, exact);
    vf b = rounded_levels(inverse[1] * xt[1][0], low, high, exact);
    vf lx_a = wx[0][0] * a, l2_a = w[0][0] * a * a;
    vf lx_b = wx[1][0] * b, l2_b = w[1][0] * b * b;
    for (int i = 1; i < n; i++) {
        a = rounded_levels(inverse[0] * xt[0][i], low, high, exact);
        b = rounded_levels(inverse[1] * xt[1][i], low, high, exact);
        lx_a += wx[0][i] * a;
        lx_b += wx[1][i] * b;
        l2_a += w[0][i] * a * a;
        l2_b += w[1][i] * b * b;
    }
    sum_lx[0] = lx_a, sum_l2[0] = l2_a;
    sum_lx[1] = lx_b, sum_l2[1] = l2_b;
}

/* make_qx_quants weighted by `weights` [group][position] (x² where NULL): the signed scales of two
 * groups of LANES sub-blocks of n values (xt [group][position]) and their levels 0..2*nmax-1 as floats
 * [group][position]. Tries 18 inverse scales around nmax / peak besides the first, keeping the
 * least-squares fit that explains the most weighted energy. Every |inverse * x| of finite values is at
 * most about nmax + 1, so the fast rounding applies unless exact is set (some value is not finite). */
__attribute__((always_inline)) static inline void qx_quants_pair(vf (*xt)[QX_MAX], int n, int nmax, int exact,
                                                                vf (*weights)[QX_MAX], vf *scale_out,
                                                                vf (*levels_out)[QX_MAX]) {
    const vf low = vf_splat((float)-nmax), high = vf_splat((float)(nmax - 1)), zero = vf_splat(0.0f);
    vf w[2][QX_MAX], wx[2][QX_MAX], peak[2], chosen[2], scale[2], best[2], lx[2], l2[2];
    vi all_zero[2];
    for (int g = 0; g < 2; g++) {
        all_zero[g] = weights_and_peak(xt[g], n, weights ? weights[g] : NULL, w[g], wx[g], &peak[g]);
        chosen[g] = low / peak[g];
    }
    trial_sums_pair(xt, w, wx, n, chosen, low, high, exact, lx, l2);
    for (int g = 0; g < 2; g++) {
        scale[g] = vf_select(l2[g] != zero, lx[g] / l2[g], zero);
        best[g] = scale[g] * lx[g];
    }
    for (int step = -9; step <= 9; step++) {
        if (step == 0) {
            continue;
        }
        vf inverse[2], factor = -vf_splat((float)nmax + 0.1f * (float)step);
        inverse[0] = factor / peak[0];
        inverse[1] = factor / peak[1];
        trial_sums_pair(xt, w, wx, n, inverse, low, high, exact, lx, l2);
        for (int g = 0; g < 2; g++) {
            vi better = (lx[g] * lx[g] > best[g] * l2[g]) & (l2[g] > zero);
            chosen[g] = vf_select(better, inverse[g], chosen[g]);
            scale[g] = vf_select(better, lx[g] / l2[g], scale[g]);
            best[g] = vf_select(better, scale[g] * lx[g], best[g]);
        }
    }
    const vf offset = vf_splat((float)nmax);
    for (int g = 0; g < 2; g++) {
        scale_out[g] = vf_select(all_zero[g], zero, scale[g]);
        for (int i = 0; i < n; i++) {
            vf level = rounded_levels(chosen[g] * xt[g][i], low, high, exact) + offset;
            levels_out[g][i] = vf_select(all_zero[g], zero, level);
        }
    }
}

/* make_q3_quants' refinement of one sub-block x from its first rounding (levels, sum_lx = Σ w x l and
 * sum_l2 = Σ w l l, weights w = x²): up to five sweeps move each level, in order, to the one the current
 * fit prefers when that explains more weighted energy; a sweep that changes nothing ends it. */
static void q3_refine(const float *x, int nmax, float *levels, float *sum_lx, float *sum_l2) {
    float w[SUB_SIZE], wx[SUB_SIZE], lx = *sum_lx, l2 = *sum_l2;
    for (int i = 0; i < SUB_SIZE; i++) {
        w[i] = x[i] * x[i];
        wx[i] = w[i] * x[i];
    }
    for (int sweep = 0; sweep < 5; sweep++) {
        int changed = 0;
        for (int i = 0; i < SUB_SIZE; i++) {
            float level = levels[i];
            float without_lx = lx - wx[i] * level;
            if (!(without_lx > 0.0f)) {
                continue;
            }
            float without_l2 = l2 - w[i] * level * level;
            float proposal = (float)clamp_int(op_nearest_int(x[i] * without_l2 / without_lx), -nmax, nmax - 1);
            if (proposal == level) {
                continue;
            }
            float with_lx = without_lx + wx[i] * proposal;
            float with_l2 = without_l2 + w[i] * proposal * proposal;
            if (with_l2 > 0.0f && with_lx * with_lx * l2 > lx * lx * with_l2) {
                levels[i] = proposal;
                lx = with_lx;
                l2 = with_l2;
                changed = 1;
            }
        }
        if (!changed) {
            break;
        }
    }
    *sum_lx = lx;
    *sum_l2 = l2;
}

/* make_q3_quants: the signed scales of LANES sub-blocks (xt [position], x in their own order) and their
 * levels 0..2*nmax-1 as floats [position]. Rounds at nmax / peak, then refines each sub-block on its own
 * (q3_refine). A positive finite peak gives every value a level of the opposite sign: every partial
 * Σ w x l is then at most zero, no proposal can pass, and those sub-blocks are not refined. */
static void q3_quants_lanes(const vf *xt, const float *x, int nmax, vf *scale_out, vf *levels_out) {
    int exact = !all_finite(xt, SUB_SIZE);
    const vf low = vf_splat((float)-nmax), high = vf_splat((float)(nmax - 1)), zero = vf_splat(0.0f);
    vf w[SUB_SIZE], wx[SUB_SIZE], levels[SUB_SIZE], peak, lx, l2;
    vi all_zero = weights_and_peak(xt, SUB_SIZE, NULL, w, wx, &peak);
    if (exact) {
        trial(xt, w, wx, low / peak, low, high, 1, levels, &lx, &l2);
    } else {
        trial(xt, w, wx, low / peak, low, high, 0, levels, &lx, &l2);
    }
    for (int s = 0; s < LANES; s++) {
        if (!(peak[s] < 0.0f || peak[s] == INFINITY)) { /* all-zero lanes have peak 1 */
            continue;
        }
        float own[SUB_SIZE], own_lx = lx[s], own_l2 = l2[s];
        for (int i = 0; i < SUB_SIZE; i++) {
            own[i] = levels[i][s];
        }
        q3_refine(x + SUB_SIZE * s, nmax, own, &own_lx, &own_l2);
        for (int i = 0; i < SUB_SIZE; i++) {
            levels[i][s] = own[i];
        }
        lx[s] = own_lx;
        l2[s] = own_l2;
    }
    *scale_out = vf_select(all_zero, zero, vf_select(l2 > zero, lx / l2, zero));
    const vf offset = vf_splat((float)nmax);
    for (int i = 0; i < SUB_SIZE; i++) {
        levels_out[i] = vf_select(all_zero, zero, levels[i] + offset);
    }
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

/* Q3_K's bytes from the sub-blocks' searched levels (kept where a step is 0), their 6-bit codes and d:
 * the values rounded again with the stored steps to 3-bit levels (high bit in hmask). */
ALWAYS_INLINE void q3_k_finish(const float *x, const int *codes, uint16_t d, uint8_t *levels, uint8_t *out) {
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
    op_put_fp16(out + 108, d);
}

/* Q3_K: 16 sub-blocks of 16, 3-bit levels, signed 6-bit scales relative to the largest, fp16 d. */
OP_EXPORT void orthopatch_quantize_q3_k(const float *x, uint8_t *out, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++, x += SUPER_BLOCK, out += Q3_K_BYTES) {
        float scales[SUBS];
        uint8_t levels[SUPER_BLOCK];
        for (int first = 0; first < SUBS; first += LANES) {
            vf xt[SUB_SIZE], found[SUB_SIZE], scale;
            gather_lanes(x, first, xt);
            q3_quants_lanes(xt, x + SUB_SIZE * first, 4, &scale, found);
            memcpy(scales + first, &scale, sizeof scale);
            scatter_levels(found, first, levels);
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
        q3_k_finish(x, codes, d, levels, out);
    }
}

/* make_qx_quants on two groups of LANES sub-blocks of n values weighted by wt (x² where NULL), with the
 * fast rounding where every value is finite. */
ALWAYS_INLINE void qx_quants_checked(vf (*xt)[QX_MAX], int n, int nmax, vf (*wt)[QX_MAX], vf *scale,
                                     vf (*found)[QX_MAX]) {
    if (all_finite(xt[0], n) && all_finite(xt[1], n)) {
        qx_quants_pair(xt, n, nmax, 0, wt, scale, found);
    } else {
        qx_quants_pair(xt, n, nmax, 1, wt, scale, found);
    }
}

/* The 16 sub-blocks of a super-block x searched by make_qx_quants (nmax) weighted by w (x² where NULL):
 * their scales, and their levels 0..2*nmax-1 in value order. */
ALWAYS_INLINE void qx_sub_blocks(const float *x, const float *w, int nmax, float *scales, uint8_t *levels) {
    for (int first = 0; first < SUBS; first += 2 * LANES) {
        vf xt[2][QX_MAX], wt[2][QX_MAX], found[2][QX_MAX], scale[2];
        gather_lanes(x, first, xt[0]);
        gather_lanes(x, first + LANES, xt[1]);
        if (w) {
            gather_lanes(w, first, wt[0]);
            gather_lanes(w, first + LANES, wt[1]);
        }
        qx_quants_checked(xt, SUB_SIZE, nmax, w ? wt : NULL, scale, found);
        memcpy(scales + first, scale, sizeof scale);
        scatter_levels(found[0], first, levels);
        scatter_levels(found[1], first + LANES, levels);
    }
}

/* Q3_K with an importance matrix: make_qx_quants weighted by importance * sqrt(σ² + x²) on each sub-block,
 * then on the 16 scales (weighted by each sub-block's total weight) for their 6-bit codes and d. */
OP_EXPORT void orthopatch_quantize_q3_k_weighted(const float *x, const float *importance, uint8_t *out,
                                                 int64_t n_rows, int64_t row_values) {
    for (int64_t r = 0; r < n_rows; r++) {
        for (int64_t c = 0; c < row_values; c += SUPER_BLOCK) {
            const float *bx = x + r * row_values + c;
            uint8_t *bo = out + (r * row_values + c) / SUPER_BLOCK * Q3_K_BYTES, levels[SUPER_BLOCK];
            float w[SUPER_BLOCK], scales[SUBS];
            op_importance_weights(bx, importance + c, 2, w);
            qx_sub_blocks(bx, w, 4, scales, levels);
            vf xt[2][QX_MAX], wt[2][QX_MAX], found[2][QX_MAX], scale[2];
            for (int j = 0; j < SUBS; j++) { /* one column of 16 scales, in every lane */
                xt[0][j] = xt[1][j] = vf_splat(scales[j]);
                wt[0][j] = wt[1][j] = vf_splat(op_running_sum(w + SUB_SIZE * j, SUB_SIZE));
            }
            qx_quants_checked(xt, SUBS, 32, wt, scale, found);
            int codes[SUBS];
            for (int j = 0; j < SUBS; j++) {
                codes[j] = (int)found[0][j][0];
            }
            q3_k_finish(bx, codes, op_fp16_bits(scale[0][0]), levels, bo);
        }
    }
}

/* Q6_K: 16 sub-blocks of 16, 6-bit levels (low nibbles in ql, high pairs in qh), signed 8-bit scales, fp16 d;
 * the sub-blocks searched by make_qx_quants weighted by x², or by the importance where given. */
ALWAYS_INLINE void q6_k_block(const float *x, const float *importance, uint8_t *out) {
    float scales[SUBS];
    uint8_t levels[SUPER_BLOCK];
    qx_sub_blocks(x, importance, 32, scales, levels);
    float max_scale = first_largest_magnitude(scales, SUBS);
    if (fabsf(max_scale) < ALL_ZERO_EPS) { /* nothing to scale: an all-zero block */
        memset(out, 0, Q6_K_BYTES);
        return;
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
    op_put_fp16(out + 208, d);
}

OP_EXPORT void orthopatch_quantize_q6_k(const float *x, uint8_t *out, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++) {
        q6_k_block(x + SUPER_BLOCK * b, NULL, out + Q6_K_BYTES * b);
    }
}

OP_EXPORT void orthopatch_quantize_q6_k_weighted(const float *x, const float *importance, uint8_t *out,
                                                 int64_t n_rows, int64_t row_values) {
    for (int64_t r = 0; r < n_rows; r++) {
        for (int64_t c = 0; c < row_values; c += SUPER_BLOCK) {
            q6_k_block(x + r * row_values + c, importance + c,
                       out + (r * row_values + c) / SUPER_BLOCK * Q6_K_BYTES);
        }
    }
}

/* ---------------------------------------------------------------- Q4_0 and Q5_0 with an importance matrix */

/* Q4_0 (nmax 8) and Q5_0 (16) of one row: each block of 32 a signed scale from make_qx_quants weighted
 * by importance * sqrt(σ² + x²), σ² the row's mean square, stored as fp16 d, and the search's levels.
 * Eight blocks are searched at once; a short last group fills its lanes with zeros. */
ALWAYS_INLINE void q40_50_row(const float *x, const float *importance, int64_t n_values, int nmax, uint8_t *out) {
    const int block_bytes = nmax == 8 ? 18 : 22, blocks = (int)(n_values / 32);
    float mean_square = op_row_mean_square(x, n_values);
    for (int first = 0; first < blocks; first += 2 * LANES) {
        int count = blocks - first < 2 * LANES ? blocks - first : 2 * LANES;
        float ws[32];
        vf xt[2][QX_MAX], wt[2][QX_MAX], found[2][QX_MAX], scale[2];
        memset(xt, 0, sizeof xt);
        memset(wt, 0, sizeof wt);
        for (int s = 0; s < count; s++) {
            const float *bx = x + 32 * (first + s);
            op_legacy_weights(bx, importance + 32 * (first + s), mean_square, ws);
            for (int i = 0; i < 32; i++) {
                xt[s / LANES][i][s % LANES] = bx[i];
                wt[s / LANES][i][s % LANES] = ws[i];
            }
        }
        qx_quants_checked(xt, 32, nmax, wt, scale, found);
        for (int s = 0; s < count; s++) {
            uint8_t *block = out + block_bytes * (first + s), levels[32];
            op_put_fp16(block, op_fp16_bits(scale[s / LANES][s % LANES]));
            for (int i = 0; i < 32; i++) {
                levels[i] = (uint8_t)found[s / LANES][i][s % LANES];
            }
            op_put_levels_32(block + 2, levels, nmax == 16);
        }
    }
}

OP_EXPORT void orthopatch_quantize_q4_0_weighted(const float *x, const float *importance, uint8_t *out,
                                                 int64_t n_rows, int64_t row_values) {
    for (int64_t r = 0; r < n_rows; r++) {
        q40_50_row(x + r * row_values, importance, row_values, 8, out + r * (row_values / 32 * 18));
    }
}

OP_EXPORT void orthopatch_quantize_q5_0_weighted(const float *x, const float *importance, uint8_t *out,
                                                 int64_t n_rows, int64_t row_values) {
    for (int64_t r = 0; r < n_rows; r++) {
        q40_50_row(x + r * row_values, importance, row_values, 16, out + r * (row_values / 32 * 22));
    }
}
