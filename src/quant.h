/*
 * quant.h - GGUF/ggml quantized block formats, defined once for the C
 * compiler and nvcc (plain structs of fixed-width integers; f16 values are
 * uint16_t bits), and the reference quantize/dequantize of src/quant.c.
 *
 * A row of n values (n a multiple of the block size) is n / QK blocks laid
 * end to end. Each block holds one or two f16 scales and packed integer
 * quants; a value dequantizes as
 *
 *   q4_0  d * (q - 8)                q in 0..15    32 values per block
 *   q4_1  d * q + m                  q in 0..15
 *   q5_0  d * (q - 16)               q in 0..31    (4 low bits in qs, high bit in qh)
 *   q5_1  d * q + m                  q in 0..31
 *   q8_0  d * q                      q in -128..127
 *   q8_1  d * q; s = d * sum(q)      (activations of the _1 dot products)
 *   q2_k  d*sc*q - dmin*m            256 values, 16 sub-blocks of 16, 4-bit sc and m, q in 0..3
 *   q3_k  d*(sc-32)*(q-4)            16 sub-blocks of 16, 6-bit sc, q in 0..7 (2 bits + hmask)
 *   q4_k  d*sc*q - dmin*m            8 sub-blocks of 32, 6-bit sc and m, q in 0..15
 *   q5_k  d*sc*q - dmin*m            8 sub-blocks of 32, 6-bit sc and m, q in 0..31
 *   q6_k  d*sc*(q-32)                16 sub-blocks of 16, int8 sc, q in 0..63
 *   q8_k  d * q (d is f32)           activations of the k-quant dot products;
 *                                    bsums[j] = sum of q over values 16j..16j+15
 *
 * The bit placement of every field is the one ggml and gguf-py use;
 * src/quant.c spells it out next to each dequantizer, and
 * tests/python/test_quant_formats.py checks it against gguf-py.
 */
#ifndef OPTIML_QUANT_H
#define OPTIML_QUANT_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
#define QUANT_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
extern "C" {
#else
#define QUANT_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#endif

#define QK4_0 32
#define QK4_1 32
#define QK5_0 32
#define QK5_1 32
#define QK8_0 32
#define QK8_1 32
#define QK_K 256
#define K_SCALE_SIZE 12

/* ---- block structs ------------------------------------------------------ */

typedef struct {
    uint16_t d;             /* f16 scale                                  */
    uint8_t qs[QK4_0 / 2];  /* value j: qs[j] & 15, value j+16: qs[j] >> 4 */
} block_q4_0;
QUANT_STATIC_ASSERT(sizeof(block_q4_0) == 18, "block_q4_0 size");

typedef struct {
    uint16_t d;             /* f16 scale                                  */
    uint16_t m;             /* f16 minimum (added)                        */
    uint8_t qs[QK4_1 / 2];  /* as q4_0                                    */
} block_q4_1;
QUANT_STATIC_ASSERT(sizeof(block_q4_1) == 20, "block_q4_1 size");

typedef struct {
    uint16_t d;             /* f16 scale                                  */
    uint8_t qh[4];          /* bit j (little-endian u32): 5th bit of value j */
    uint8_t qs[QK5_0 / 2];  /* low 4 bits, as q4_0                        */
} block_q5_0;
QUANT_STATIC_ASSERT(sizeof(block_q5_0) == 22, "block_q5_0 size");

typedef struct {
    uint16_t d;
    uint16_t m;
    uint8_t qh[4];
    uint8_t qs[QK5_1 / 2];
} block_q5_1;
QUANT_STATIC_ASSERT(sizeof(block_q5_1) == 24, "block_q5_1 size");

typedef struct {
    uint16_t d;             /* f16 scale                                  */
    int8_t qs[QK8_0];
} block_q8_0;
QUANT_STATIC_ASSERT(sizeof(block_q8_0) == 34, "block_q8_0 size");

typedef struct {
    uint16_t d;             /* f16 scale                                  */
    uint16_t s;             /* f16 d * sum(qs)                            */
    int8_t qs[QK8_1];
} block_q8_1;
QUANT_STATIC_ASSERT(sizeof(block_q8_1) == 36, "block_q8_1 size");

typedef struct {
    uint8_t scales[QK_K / 16]; /* sub-block j: scale = low nibble, min = high nibble */
    uint8_t qs[QK_K / 4];      /* value 128h + 32s + l: (qs[32h + l] >> 2s) & 3 */
    uint16_t d;                /* f16 super-block scale of the scales     */
    uint16_t dmin;             /* f16 super-block scale of the mins       */
} block_q2_K;
QUANT_STATIC_ASSERT(sizeof(block_q2_K) == 84, "block_q2_K size");

typedef struct {
    uint8_t hmask[QK_K / 8];   /* value 32b + l: bit b of hmask[l]; set = no -4 offset */
    uint8_t qs[QK_K / 4];      /* low 2 bits, laid out as q2_k           */
    uint8_t scales[12];        /* 16 6-bit scales (stored + 32)           */
    uint16_t d;                /* f16 super-block scale                   */
} block_q3_K;
QUANT_STATIC_ASSERT(sizeof(block_q3_K) == 110, "block_q3_K size");

typedef struct {
    uint16_t d;                  /* f16 scale of the 6-bit scales         */
    uint16_t dmin;               /* f16 scale of the 6-bit mins           */
    uint8_t scales[K_SCALE_SIZE];/* 8 scales + 8 mins, 6 bits each        */
    uint8_t qs[QK_K / 2];        /* value 64c + l: qs[32c + l] & 15; 64c + 32 + l: >> 4 */
} block_q4_K;
QUANT_STATIC_ASSERT(sizeof(block_q4_K) == 144, "block_q4_K size");

typedef struct {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[K_SCALE_SIZE];/* as q4_k                               */
    uint8_t qh[QK_K / 8];        /* value 32b + l: 5th bit = bit b of qh[l] */
    uint8_t qs[QK_K / 2];        /* low 4 bits, as q4_k                   */
} block_q5_K;
QUANT_STATIC_ASSERT(sizeof(block_q5_K) == 176, "block_q5_K size");

typedef struct {
    uint8_t ql[QK_K / 2];  /* value 128h + 64u + l (l < 64): nibble u of ql[64h + l] */
    uint8_t qh[QK_K / 4];  /* value 128h + 32s + l (l < 32): (qh[32h + l] >> 2s) & 3 */
    int8_t scales[QK_K / 16];
    uint16_t d;            /* f16 super-block scale                       */
} block_q6_K;
QUANT_STATIC_ASSERT(sizeof(block_q6_K) == 210, "block_q6_K size");

typedef struct {
    float d;                   /* f32 scale                               */
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];  /* sums of qs over groups of 16            */
} block_q8_K;
QUANT_STATIC_ASSERT(sizeof(block_q8_K) == 292, "block_q8_K size");

#ifndef __CUDACC__
/* ---- reference conversions (src/quant.c) -------------------------------- */

/* Quantize n floats (n a multiple of the type's block size) into blocks.
 * Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1 round to nearest exactly as ggml's
 * reference quantizers do (bit-identical output); the k-quants search the
 * sub-block scales by least squares (not llama.cpp's search, same format).
 * Non-finite inputs (NaN, +-inf) are quantized as 0. Values whose block
 * scale exceeds the f16 range (|x| > ~8e6 for q8_0) give an infinite scale,
 * as in ggml. */
typedef void (*quant_quantize_fn)(int64_t n, const float *src, void *dst);
/* Dequantize n values (a multiple of the block size) to floats. */
typedef void (*quant_dequantize_fn)(int64_t n, const void *src, float *dst);

/* NULL for types without a reference quantizer / dequantizer (the plain
 * f32/f16/bf16 types too: they are conversions, not quants). */
quant_quantize_fn quant_quantizer(uint32_t type);
quant_dequantize_fn quant_dequantizer(uint32_t type);

/* 1 / d, or 0 where d is 0 or so small (subnormal) that 1 / d overflows:
 * such a block quantizes to zeros. Otherwise exactly ggml's 1.0f / d. */
static inline float quant_inv_scale(float d) {
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    return id - id == 0.0f ? id : 0.0f; /* finite */
}

/* Value of 6-bit scale j and min j (0..7) packed in a q4_k/q5_k scales[12]. */
static inline void quant_scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* Scale j (0..15) of a q3_k block, -32..31. */
static inline int quant_scale_q3_k(int j, const uint8_t *s) {
    int lo = j < 8 ? s[j] & 0xF : s[j - 8] >> 4;
    int hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
    return (lo | hi << 4) - 32;
}

/* ---- integer quants of one block, offsets applied ----------------------
 * What the block's value j is, before the float scales: the reference
 * dequantizers and the reference dot products both start from these. */

static inline void quant_unpack_q4_0(const block_q4_0 *b, int8_t *q) { /* -8..7 */
    for (int j = 0; j < 16; j++) {
        q[j] = (int8_t)((b->qs[j] & 0xF) - 8);
        q[j + 16] = (int8_t)((b->qs[j] >> 4) - 8);
    }
}
static inline void quant_unpack_q4_1(const block_q4_1 *b, int8_t *q) { /* 0..15 */
    for (int j = 0; j < 16; j++) {
        q[j] = (int8_t)(b->qs[j] & 0xF);
        q[j + 16] = (int8_t)(b->qs[j] >> 4);
    }
}
/* 5-bit quants 0..31 from the low nibbles qs and the 32 high bits qh. */
static inline void quant_unpack_q5(const uint8_t *qs, const uint8_t *qh, int8_t *q) {
    const uint32_t h = (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
    for (int j = 0; j < 16; j++) {
        q[j] = (int8_t)((qs[j] & 0xF) | (int)(h >> j & 1) << 4);
        q[j + 16] = (int8_t)((qs[j] >> 4) | (int)(h >> (j + 16) & 1) << 4);
    }
}
static inline void quant_unpack_q2_k(const block_q2_K *b, int8_t *q) { /* 0..3 */
    for (int e = 0; e < QK_K; e++) q[e] = (int8_t)(b->qs[32 * (e / 128) + e % 32] >> 2 * (e % 128 / 32) & 3);
}
static inline void quant_unpack_q3_k(const block_q3_K *b, int8_t *q) { /* -4..3 */
    for (int e = 0; e < QK_K; e++) {
        const int lo = b->qs[32 * (e / 128) + e % 32] >> 2 * (e % 128 / 32) & 3;
        const int hi = b->hmask[e % 32] >> (e / 32) & 1;
        q[e] = (int8_t)(lo - (hi ? 0 : 4));
    }
}
static inline void quant_unpack_q4_k(const block_q4_K *b, int8_t *q) { /* 0..15 */
    for (int e = 0; e < QK_K; e++) q[e] = (int8_t)(b->qs[32 * (e / 64) + e % 32] >> 4 * (e % 64 / 32) & 0xF);
}
static inline void quant_unpack_q5_k(const block_q5_K *b, int8_t *q) { /* 0..31 */
    for (int e = 0; e < QK_K; e++) {
        const int lo = b->qs[32 * (e / 64) + e % 32] >> 4 * (e % 64 / 32) & 0xF;
        q[e] = (int8_t)(lo | (b->qh[e % 32] >> (e / 32) & 1) << 4);
    }
}
static inline void quant_unpack_q6_k(const block_q6_K *b, int8_t *q) { /* -32..31 */
    for (int e = 0; e < QK_K; e++) {
        const int h = e / 128, r = e % 128;
        const int lo = b->ql[64 * h + r % 64] >> 4 * (r / 64) & 0xF;
        const int hi = b->qh[32 * h + r % 32] >> 2 * (r / 32) & 3;
        q[e] = (int8_t)((lo | hi << 4) - 32);
    }
}
#endif

#ifdef __cplusplus
}
#endif

#endif /* OPTIML_QUANT_H */
