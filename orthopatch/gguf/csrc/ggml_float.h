/* Float32 helpers shared by the C quantizers, with the rounding ggml's reference quantizers use.
 *
 * Compiled with -ffp-contract=off and without -ffast-math: every product and sum is one IEEE float32
 * operation in the order written, as in numpy and in ggml's reference code, so the bytes match.
 */
#ifndef ORTHOPATCH_GGML_FLOAT_H
#define ORTHOPATCH_GGML_FLOAT_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define OP_EXPORT __attribute__((visibility("default")))

/* Hot loops get an AVX2 version beside the baseline one, picked when the library loads: wider vectors
 * only, the same IEEE float32 operations (FMA contraction stays off), so the same bytes on either. */
#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 6) && !defined(OP_NO_CLONES)
#define OP_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define OP_VECTOR_CLONES
#endif

/* ggml's nearest_int: adding 1.5 * 2**23 leaves the rounded integer (half to even) in the low bits. */
static inline int op_nearest_int(float value) {
    float shifted = value + 12582912.0f;
    int32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    return (bits & 0x007FFFFF) - 0x00400000;
}

/* IEEE half bits of a float32, rounded to nearest even (subnormals kept, inf past 65504, NaN kept quiet). */
static inline uint16_t op_fp16_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000);
    uint32_t magnitude = bits & 0x7FFFFFFF;
    if (magnitude > 0x7F800000) { /* NaN: keep the top of the payload, set the quiet bit */
        return (uint16_t)(sign | 0x7E00 | ((magnitude >> 13) & 0x3FF));
    }
    if (magnitude >= 0x477FF000) { /* 65520 and above (inf too) round to inf */
        return (uint16_t)(sign | 0x7C00);
    }
    if (magnitude < 0x38800000) { /* below 2**-14: a multiple of 2**-24, scaled exactly, rounded to even */
        float scaled;
        memcpy(&scaled, &magnitude, sizeof scaled);
        scaled *= 16777216.0f;
        return (uint16_t)(sign | (uint16_t)((scaled + 12582912.0f) - 12582912.0f));
    }
    /* rebias the exponent (127 - 15 = 112) and round the 13 dropped bits to even; a carry moves the exponent */
    uint32_t rebiased = magnitude - 0x38000000u;
    return (uint16_t)(sign | ((rebiased + 0x0FFFu + ((rebiased >> 13) & 1u)) >> 13));
}

/* The float32 value of IEEE half bits. */
static inline float op_fp16_value(uint16_t half) {
    uint32_t sign = (uint32_t)(half & 0x8000) << 16;
    uint32_t exponent = (half >> 10) & 0x1F;
    uint32_t mantissa = half & 0x3FF;
    uint32_t bits;
    if (exponent == 0) { /* zero or subnormal: mantissa * 2**-24, exact in float32 */
        float value = (float)mantissa * 5.9604644775390625e-08f;
        memcpy(&bits, &value, sizeof bits);
        bits |= sign;
    } else if (exponent == 31) {
        bits = sign | 0x7F800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    }
    float result;
    memcpy(&result, &bits, sizeof result);
    return result;
}

/* fp16 bits stored in GGUF's little-endian order (the library is built for little-endian hosts). */
static inline void op_put_fp16(uint8_t *out, uint16_t bits) { memcpy(out, &bits, sizeof bits); }

/* fp16 round trip of a float32: the value a stored fp16 scale takes back. */
static inline float op_fp16_round(float value) { return op_fp16_value(op_fp16_bits(value)); }

#endif
