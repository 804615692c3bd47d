/*
 * dtype.h - tensor element types as numbered by GGUF/ggml, their block
 * sizes, and scalar half-precision conversions.
 *
 * A tensor row of ne0 elements of type t occupies
 *     ne0 / dtype_block_size(t) * dtype_type_size(t) bytes,
 * and ne0 must be a multiple of the block size. The numbers are the file
 * format's: never renumber them.
 */
#ifndef OPTIML_DTYPE_H
#define OPTIML_DTYPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum dtype {
    DTYPE_F32 = 0,
    DTYPE_F16 = 1,
    DTYPE_Q4_0 = 2,
    DTYPE_Q4_1 = 3,
    DTYPE_Q5_0 = 6,
    DTYPE_Q5_1 = 7,
    DTYPE_Q8_0 = 8,
    DTYPE_Q8_1 = 9,
    DTYPE_Q2_K = 10,
    DTYPE_Q3_K = 11,
    DTYPE_Q4_K = 12,
    DTYPE_Q5_K = 13,
    DTYPE_Q6_K = 14,
    DTYPE_Q8_K = 15,
    DTYPE_IQ2_XXS = 16,
    DTYPE_IQ2_XS = 17,
    DTYPE_IQ3_XXS = 18,
    DTYPE_IQ1_S = 19,
    DTYPE_IQ4_NL = 20,
    DTYPE_IQ3_S = 21,
    DTYPE_IQ2_S = 22,
    DTYPE_IQ4_XS = 23,
    DTYPE_I8 = 24,
    DTYPE_I16 = 25,
    DTYPE_I32 = 26,
    DTYPE_I64 = 27,
    DTYPE_F64 = 28,
    DTYPE_IQ1_M = 29,
    DTYPE_BF16 = 30,
    DTYPE_TQ1_0 = 34,
    DTYPE_TQ2_0 = 35,
    DTYPE_MXFP4 = 39,
    DTYPE_COUNT = 40,
};

/* True if t is a type we know the layout of (not necessarily compute). */
bool dtype_is_known(uint32_t t);
/* Elements per block (1 for plain types); 0 for unknown types. */
uint32_t dtype_block_size(uint32_t t);
/* Bytes per block; 0 for unknown types. */
uint32_t dtype_type_size(uint32_t t);
/* "f32", "q4_k", ...; "unknown" for unknown types. */
const char *dtype_name(uint32_t t);
/* Type by name (case-insensitive); -1 if unknown. */
int dtype_from_name(const char *name);
/* Bytes of a row of n elements; false if n is not a multiple of the block
 * size, the type is unknown, or the size overflows. */
bool dtype_row_size(uint32_t t, uint64_t n, uint64_t *out);

/* ---- half precision ---------------------------------------------------- */

typedef uint16_t f16_t;  /* IEEE binary16 bits */
typedef uint16_t bf16_t; /* bfloat16 bits      */

static inline uint32_t dtype_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float dtype_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* binary16 -> float, exact for every input including subnormals, inf, NaN. */
static inline float f16_to_f32(f16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    if (exp == 0x1f) return dtype_bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0) return dtype_bits_f32(sign);
        /* subnormal: man * 2^-24 */
        float v = (float)man * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    return dtype_bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

/* float -> binary16, round to nearest even, overflow to inf, NaN kept NaN. */
static inline f16_t f32_to_f16(float f) {
    uint32_t x = dtype_f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) return (f16_t)(sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0));
    if (absx >= 0x477ff000u) return (f16_t)(sign | 0x7c00); /* rounds to >= 65520 */
    if (absx < 0x38800000u) {                                /* below 2^-14: subnormal */
        float a = dtype_bits_f32(absx);
        /* a * 2^24 rounded to nearest even by the FPU's default mode */
        float s = a * 16777216.0f;
        uint32_t m = (uint32_t)s;
        float rem = s - (float)m;
        if (rem > 0.5f || (rem == 0.5f && (m & 1))) m++;
        return (f16_t)(sign | m);
    }
    uint32_t mant = absx & 0x7fffff;
    uint32_t exp = (absx >> 23) - 112;
    uint32_t h = (exp << 10) | (mant >> 13);
    uint32_t rest = mant & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return (f16_t)(sign | h);
}

static inline float bf16_to_f32(bf16_t b) { return dtype_bits_f32((uint32_t)b << 16); }

/* float -> bfloat16, round to nearest even, NaN kept NaN. */
static inline bf16_t f32_to_bf16(float f) {
    uint32_t x = dtype_f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((x >> 16) | 0x40);
    x += 0x7fff + ((x >> 16) & 1);
    return (bf16_t)(x >> 16);
}

#endif /* OPTIML_DTYPE_H */
