/* The float conversions around the projection of a quantized tensor, each with its finiteness check in the
 * same pass: decoded float32 values widened to float64, projected float64 values rounded to float32 (round
 * to nearest even, inf past float32's range, as numpy's astype). Each returns how many values are not
 * finite (inf or NaN), so that the caller can refuse them. */
#include <float.h>

#include "ggml_float.h"

OP_EXPORT OP_VECTOR_CLONES int64_t orthopatch_widen_f32(const float *in, double *out, int64_t n) {
    int64_t not_finite = 0;
    for (int64_t i = 0; i < n; i++) {
        out[i] = (double)in[i];
        not_finite += !(fabsf(in[i]) <= FLT_MAX); /* NaN fails every comparison */
    }
    return not_finite;
}

OP_EXPORT OP_VECTOR_CLONES int64_t orthopatch_narrow_f64(const double *in, float *out, int64_t n) {
    int64_t not_finite = 0;
    for (int64_t i = 0; i < n; i++) {
        float value = (float)in[i];
        out[i] = value;
        not_finite += !(fabsf(value) <= FLT_MAX);
    }
    return not_finite;
}
