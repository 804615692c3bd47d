/*
 * ops_avx512.c - AVX-512 (F, BW, VL) + VNNI variants of the hot quantized
 * dots: q4_0 and q8_0 (vpdpbusd on 256-bit vectors: one instruction for
 * the 32-byte integer dot of a block), q4_k and q6_k (512-bit vectors: 64
 * values, two or four scales, per step), the prompt GEMM of q4_0 and q8_0
 * (gemm_panel.h, vpdpbusd), and the sparse down step's axpy and axpy4 for
 * q4_0 and q8_0 (a block in two 16-lane vectors). This file alone is
 * compiled with
 * -mavx512f -mavx512bw -mavx512vl -mavx512vnni (plus AVX2, FMA, F16C);
 * cpu_kernels_avx512vnni() checks cpuid and XCR0 first (dispatch.c).
 *
 * As in ops_avx2.c, one template per type gives dot_q (1x1, with
 * read-ahead), dot_q_next (1x1 with the next row instead), dot_q_x4 (1x4) and the 2x1 and
 * 2x4 tiles; every (row, input) pair has one accumulator taking the blocks
 * in order through the same operations in every shape, so the shapes
 * agree bit for bit (tests/test_ops.c checks
 * them, and each against the scalar reference, on any CPU that runs them).
 */
#include "cpu/ops.h"

#include "quant.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

#define TILE_INLINE static inline __attribute__((always_inline))
#define FOR_R for (int r = 0; r < R; r++)
#define FOR_T for (int t = 0; t < T; t++)

/* Decode (dot_q, PF) prefetches the weights this far ahead of the row it
 * reads, as ops_avx2.c does; dot_q_next (one scattered row) asks for the
 * next row instead. */
#ifndef OPTIML_PREFETCH_AHEAD /* a build-time override, for measuring */
#define OPTIML_PREFETCH_AHEAD 4096
#endif
/* the line PF bytes past p (PF: a template argument, 0 = none) */
#define PREFETCH(p) _mm_prefetch((const char *)((uintptr_t)(p) + PF), _MM_HINT_T0)

static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    lo = _mm_add_ps(lo, _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* 16 lanes to 8, then as above (fixed order: the same in every shape). */
static inline float hsum512(__m512 v) {
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return hsum256(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
}

/* Broadcast f32 of an f16 in memory. */
static inline __m256 f16_bcast256(const uint16_t *h) { return _mm256_cvtph_ps(_mm_set1_epi16((short)*h)); }
static inline __m512 f16_bcast512(const uint16_t *h) { return _mm512_cvtph_ps(_mm256_set1_epi16((short)*h)); }

/* ---- q4_0, q8_0 against q8_0 inputs ----------------------------------------
 * q4_0: the weights' unsigned nibbles go straight into vpdpbusd (unsigned
 * x signed bytes, 4 products summed into each int32 lane); the -8 offset
 * starts each lane at -8 * (its 4 input bytes), computed once per input
 * block. q8_0: |w| (unsigned) times x with w's sign (|w| = 128 for -128 is
 * right as unsigned; inputs never hold -128). vpdpbusd does not saturate. */
TILE_INLINE void tile_q4_0_q8_0(const int R, const int T, const uintptr_t PF, const bool Q8, int64_t n, const void *w,
                                uint64_t w_stride, const void *xq, uint64_t xq_stride, float *out) {
    const int64_t nb = n / 32;
    const __m256i m4 = _mm256_set1_epi8(0xF), eights = _mm256_set1_epi8(8), zero = _mm256_setzero_si256();
    const __m256i shift = _mm256_setr_epi64x(0, 0, 4, 4);
    __m256 acc[2][4];
    FOR_R FOR_T acc[r][t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        __m256i xv[4], base[4];
        __m256 dx[4];
#pragma GCC unroll 4
        FOR_T {
            const block_q8_0 *b = (const block_q8_0 *)((const char *)xq + t * xq_stride) + i;
            xv[t] = _mm256_loadu_si256((const __m256i *)b->qs);
            base[t] = Q8 ? zero : _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, eights, xv[t]));
            dx[t] = f16_bcast256(&b->d);
        }
#pragma GCC unroll 2
        FOR_R {
            __m256i wv;
            __m256 dw;
            if (Q8) {
                const block_q8_0 *a = (const block_q8_0 *)((const char *)w + r * w_stride) + i;
                wv = _mm256_loadu_si256((const __m256i *)a->qs);
                dw = f16_bcast256(&a->d);
                if (PF) PREFETCH(a);
            } else {
                /* low nibbles (values 0..15) in the low 128 bits, high in the high */
                const block_q4_0 *a = (const block_q4_0 *)((const char *)w + r * w_stride) + i;
                const __m256i q = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)a->qs));
                wv = _mm256_and_si256(_mm256_srlv_epi64(q, shift), m4);
                dw = f16_bcast256(&a->d);
                if (PF && (i & 1) == 0) PREFETCH(a); /* 36 bytes per two blocks */
            }
            const __m256i wu = Q8 ? _mm256_sign_epi8(wv, wv) : wv;
#pragma GCC unroll 4
            FOR_T {
                const __m256i xs = Q8 ? _mm256_sign_epi8(xv[t], wv) : xv[t];
                const __m256i p = _mm256_dpbusd_epi32(base[t], wu, xs);
                acc[r][t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx[t]), _mm256_cvtepi32_ps(p), acc[r][t]);
            }
        }
    }
    FOR_R FOR_T out[r * T + t] = hsum256(acc[r][t]);
}

/* ---- q4_k against q8_k inputs ------------------------------------------------
 * Chunk c of 64 values: sub-block 2c (low nibbles of 32 bytes) in the low
 * 256 bits of a 512-bit vector, 2c + 1 (high nibbles) in the high 256, the
 * 64 input bytes in one load; int16 pair sums times the sub-block's scale
 * (vpermw picks it per half). The mins go through the input's 16-value
 * sums, as in ops_avx2.c. */

/* The 8 scales (bytes 0..7) and 8 mins (bytes 8..15) of a q4_k block. */
static inline __m128i k4_scales_mins(const uint8_t *s) {
    uint32_t u[4];
    memcpy(u, s, 12);
    const uint32_t m1 = 0x3f3f3f3f, m2 = 0x0f0f0f0f, m3 = 0x03030303;
    u[3] = ((u[2] >> 4) & m2) | (((u[1] >> 6) & m3) << 4);
    const uint32_t mins_lo = u[1] & m1;
    u[1] = (u[2] & m2) | (((u[0] >> 6) & m3) << 4);
    u[2] = mins_lo;
    u[0] &= m1;
    return _mm_loadu_si128((const __m128i *)u);
}

/* vpermw index: int16 lanes 0..15 take lane a, lanes 16..31 lane b. */
static inline __m512i perm_halves(int a, int b) {
    return _mm512_inserti64x4(_mm512_set1_epi16((short)a), _mm256_set1_epi16((short)b), 1);
}

TILE_INLINE void tile_q4_K(const int R, const int T, const uintptr_t PF, int64_t n, const void *w, uint64_t w_stride,
                           const void *xq, uint64_t xq_stride, float *out) {
    const int64_t nb = n / QK_K;
    const __m256i m4 = _mm256_set1_epi8(0xF);
    __m512 acc[2][4];
    FOR_R FOR_T acc[r][t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        __m512i bsp[4]; /* 8 sums of 32 inputs (int16) in the low 128 bits, zeros above */
        __m512 dx[4];
#pragma GCC unroll 4
        FOR_T {
            const block_q8_K *b = (const block_q8_K *)((const char *)xq + t * xq_stride) + i;
            const __m128i s0 = _mm_loadu_si128((const __m128i *)b->bsums);
            const __m128i s1 = _mm_loadu_si128((const __m128i *)(b->bsums + 8));
            bsp[t] = _mm512_zextsi128_si512(_mm_hadd_epi16(s0, s1));
            dx[t] = _mm512_set1_ps(b->d);
        }
#pragma GCC unroll 2
        FOR_R {
            const block_q4_K *a = (const block_q4_K *)((const char *)w + r * w_stride) + i;
            if (PF) for (int o = 0; o < (int)sizeof(*a); o += 64) PREFETCH((const char *)a + o);
            const __m128i sm = k4_scales_mins(a->scales);
            const __m512i sc = _mm512_zextsi128_si512(_mm_cvtepu8_epi16(sm)); /* int16 lanes 0..7 */
            const __m512i mins = _mm512_zextsi128_si512(_mm_cvtepu8_epi16(_mm_srli_si128(sm, 8)));
            const __m512 dw = f16_bcast512(&a->d), dmin = f16_bcast512(&a->dmin);
            __m512i isum[4];
            FOR_T isum[t] = _mm512_setzero_si512();
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {
                const __m256i q = _mm256_loadu_si256((const __m256i *)(a->qs + 32 * c));
                const __m512i qq = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(q, m4)),
                                                      _mm256_and_si256(_mm256_srli_epi16(q, 4), m4), 1);
                const __m512i s = _mm512_permutexvar_epi16(perm_halves(2 * c, 2 * c + 1), sc);
#pragma GCC unroll 4
                FOR_T {
                    const int8_t *x = ((const block_q8_K *)((const char *)xq + t * xq_stride) + i)->qs + 64 * c;
                    const __m512i p = _mm512_madd_epi16(_mm512_maddubs_epi16(qq, _mm512_loadu_si512(x)), s);
                    isum[t] = _mm512_add_epi32(isum[t], p);
                }
            }
#pragma GCC unroll 4
            FOR_T {
                const __m512i msum = _mm512_madd_epi16(mins, bsp[t]);
                acc[r][t] = _mm512_fmadd_ps(_mm512_mul_ps(dw, dx[t]), _mm512_cvtepi32_ps(isum[t]), acc[r][t]);
                acc[r][t] = _mm512_fnmadd_ps(_mm512_mul_ps(dmin, dx[t]), _mm512_cvtepi32_ps(msum), acc[r][t]);
            }
        }
    }
    FOR_R FOR_T out[r * T + t] = hsum512(acc[r][t]);
}

/* ---- q6_k against q8_k inputs ------------------------------------------------
 * Half h of 128 values; group s of 32 takes nibble s / 2 of ql bytes
 * 64h + 32(s % 2) + l and bits 2s of qh bytes 32h + l. Groups 2p and
 * 2p + 1 share a 512-bit step (their 64 inputs are contiguous); scales per
 * 16 values: 128-bit quarter k of the step takes scale 8h + 4p + k. The
 * -32 offset goes through the input's 16-value sums. */
TILE_INLINE void tile_q6_K(const int R, const int T, const uintptr_t PF, int64_t n, const void *w, uint64_t w_stride,
                           const void *xq, uint64_t xq_stride, float *out) {
    const int64_t nb = n / QK_K;
    const __m256i m4 = _mm256_set1_epi8(0xF), m2 = _mm256_set1_epi8(3);
    /* vpermw indices: int16 lane l of the step takes scale base + l / 8 */
    const __m512i quarter = _mm512_srli_epi16(
        _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9,
                         8, 7, 6, 5, 4, 3, 2, 1, 0),
        3);
    __m256 acc[2][4];
    FOR_R FOR_T acc[r][t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        __m256i bs[4];
        __m256 dx[4];
#pragma GCC unroll 4
        FOR_T {
            const block_q8_K *b = (const block_q8_K *)((const char *)xq + t * xq_stride) + i;
            bs[t] = _mm256_loadu_si256((const __m256i *)b->bsums);
            dx[t] = _mm256_set1_ps(b->d);
        }
#pragma GCC unroll 2
        FOR_R {
            const block_q6_K *a = (const block_q6_K *)((const char *)w + r * w_stride) + i;
            if (PF) for (int o = 0; o < (int)sizeof(*a); o += 64) PREFETCH((const char *)a + o);
            const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)a->scales));
            const __m512i sc = _mm512_zextsi256_si512(sc16); /* scales in int16 lanes 0..15 */
            const __m256 dw = f16_bcast256(&a->d);
            __m512i isum[4];
#pragma GCC unroll 4
            FOR_T {
                const __m256i o = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs[t]), 5); /* 32 sum sc bsum */
                isum[t] = _mm512_zextsi256_si512(_mm256_sub_epi32(_mm256_setzero_si256(), o));
            }
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                const __m256i l0 = _mm256_loadu_si256((const __m256i *)(a->ql + 64 * h));
                const __m256i l1 = _mm256_loadu_si256((const __m256i *)(a->ql + 64 * h + 32));
                const __m256i qh = _mm256_loadu_si256((const __m256i *)(a->qh + 32 * h));
                const __m256i q[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                                      _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                      _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
                __m256i g[4]; /* the 6-bit values of group s */
#pragma GCC unroll 4
                for (int s = 0; s < 4; s++)
                    g[s] = _mm256_or_si256(q[s], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * s), m2), 4));
#pragma GCC unroll 2
                for (int p = 0; p < 2; p++) {
                    const __m512i qq = _mm512_inserti64x4(_mm512_castsi256_si512(g[2 * p]), g[2 * p + 1], 1);
                    const __m512i s =
                        _mm512_permutexvar_epi16(_mm512_add_epi16(quarter, _mm512_set1_epi16((short)(8 * h + 4 * p))), sc);
#pragma GCC unroll 4
                    FOR_T {
                        const int8_t *x = ((const block_q8_K *)((const char *)xq + t * xq_stride) + i)->qs + 128 * h + 64 * p;
                        const __m512i pr = _mm512_madd_epi16(_mm512_maddubs_epi16(qq, _mm512_loadu_si512(x)), s);
                        isum[t] = _mm512_add_epi32(isum[t], pr);
                    }
                }
            }
#pragma GCC unroll 4
            FOR_T {
                const __m256i s8 = _mm256_add_epi32(_mm512_castsi512_si256(isum[t]), _mm512_extracti64x4_epi64(isum[t], 1));
                acc[r][t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx[t]), _mm256_cvtepi32_ps(s8), acc[r][t]);
            }
        }
    }
    FOR_R FOR_T out[r * T + t] = hsum256(acc[r][t]);
}

/* ---- prompt GEMM on repacked panels (gemm_panel.h) ------------------------
 * vpdpbusd on the 8-row panel: one instruction per input and group, into
 * int32 lanes (no int16 stage, no saturation); q8_0 with the sign trick. */
static inline __m256i gemm_acc(bool q8, __m256i s, __m256i wq, __m256i wa, __m256i xb) {
    return q8 ? _mm256_dpbusd_epi32(s, wa, _mm256_sign_epi8(xb, wq)) : _mm256_dpbusd_epi32(s, wq, xb);
}

static inline __m256i gemm_block_sum(bool q8, __m256i s) {
    (void)q8;
    return s;
}

/* 8 inputs a tile: 8 integer chains (vpdpbusd's 4-cycle latency left 4
 * at half its rate) and 8 float accumulators fit the 32 registers */
#define GEMM_T 8
#include "cpu/gemm_panel.h"

static void gemm_q4_0_avx512(int64_t n, const void *w, uint64_t w_stride, int n_rows, const void *xq, uint64_t xs,
                             const struct cpu_gemm_xblock *xi, int64_t n_tok, float *y, uint64_t ys, bool accumulate,
                             void *panel) {
    gemm_q0(false, false, n, w, w_stride, n_rows, xq, xs, xi, n_tok, y, ys, accumulate, panel);
}

static void gemm_q8_0_avx512(int64_t n, const void *w, uint64_t w_stride, int n_rows, const void *xq, uint64_t xs,
                             const struct cpu_gemm_xblock *xi, int64_t n_tok, float *y, uint64_t ys, bool accumulate,
                             void *panel) {
    gemm_q0(true, false, n, w, w_stride, n_rows, xq, xs, xi, n_tok, y, ys, accumulate, panel);
}

/* ---- prompt GEMM on two x8 panels: 16 rows a vector --------------------
 * The q4_0 GEMM of gemm_panel.h on zmm: a block of 16 rows (two
 * consecutive x8 panels, unpacked into gemm_block16) times T inputs, one
 * vpdpbusd per input and group with the input's 4 bytes broadcast (gcc
 * loads them with vpbroadcastd, as fast there as an embedded broadcast
 * in the scratch benchmark). On the dev EPYC (Zen 4) vpdpbusd has 4 cycles' latency and
 * runs 2 ymm or 1 zmm a cycle: the 8-row tile's 4 ymm chains reached half
 * of that, and 8 ymm chains were held back by their loads (9 per 8
 * vpdpbusd); 4 or more zmm chains run at the peak (scratch benchmarks,
 * bench/RESULTS.md). Per lane the same integer and float steps as
 * gemm_tile_q0, in the same order: equal to gemm and gemm_x8 bit for bit. */
struct gemm_block16 {
    float d[16];
    uint8_t q[8][64]; /* q[g][4r + j] = value 4g + j of row r (r < 16) */
};

/* Two panels' 32-byte vectors as one (the first in the low half). */
static inline __m512i i512_pair(__m256i a, __m256i b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
}

/* Two panels' 8 f16 scales as 16 floats. */
static inline __m512 f16_pair_ps(const uint16_t a[8], const uint16_t b[8]) {
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)a)),
                                                   _mm_loadu_si128((const __m128i *)b), 1));
}

static inline void gemm_pack_x16_q4_0(int64_t nb, const struct cpu_x8_q4_0 *a, struct gemm_block16 *p) {
    const __m512i m4 = _mm512_set1_epi8(0xF);
    const struct cpu_x8_q4_0 *b = a + nb; /* the second panel */
    for (int64_t i = 0; i < nb; i++) {
        _mm512_store_ps(p[i].d, f16_pair_ps(a[i].d, b[i].d));
        for (int g = 0; g < 4; g++) {
            const __m512i v = i512_pair(_mm256_loadu_si256((const __m256i *)a[i].q[g]),
                                        _mm256_loadu_si256((const __m256i *)b[i].q[g]));
            _mm512_store_si512(p[i].q[g], _mm512_and_si512(v, m4));
            _mm512_store_si512(p[i].q[g + 4], _mm512_and_si512(_mm512_srli_epi16(v, 4), m4));
        }
    }
}

#define X16_T for (int t = 0; t < T; t++)
/* s[t] += the 4-value dots of the 16 rows (wq) with input t's 4 bytes at
 * x + t * xs, t < T: one chain per input (the barrier keeps gcc from
 * regrouping the sums, as in gemm_tile_q0) */
static inline __attribute__((always_inline)) void x16_step(const int T, __m512i *s, __m512i wq, const char *x,
                                                           uint64_t xs) {
#pragma GCC unroll 8
    X16_T {
        int32_t v;
        memcpy(&v, x + t * xs, 4);
        s[t] = _mm512_dpbusd_epi32(s[t], wq, _mm512_set1_epi32(v));
        __asm__("" : "+v"(s[t]));
    }
}

/* blocks [i0, i1) of T inputs into acc[0..T) (one lane per row) */
static inline __attribute__((always_inline)) void gemm_tile_x16(const int T, int64_t i0, int64_t i1,
                                                                const struct gemm_block16 *p, const char *xq,
                                                                uint64_t xs, const struct cpu_gemm_xblock *xi,
                                                                int64_t nb, __m512 *acc) {
    for (int64_t i = i0; i < i1; i++) {
        __m512i s[8];
        X16_T s[t] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int g = 0; g < 8; g++) {
            const __m512i wq = _mm512_load_si512(p[i].q[g]);
            x16_step(T, s, wq, (const char *)(((const block_q8_0 *)xq + i)->qs + 4 * g), xs);
        }
        const __m512 dw = _mm512_load_ps(p[i].d);
#pragma GCC unroll 8
        X16_T {
            const struct cpu_gemm_xblock *b = xi + t * nb + i;
            const __m512 v = _mm512_fmadd_ps(_mm512_set1_ps(b->d), _mm512_cvtepi32_ps(s[t]), _mm512_set1_ps(b->m8));
            acc[t] = _mm512_fmadd_ps(dw, v, acc[t]);
        }
    }
}

/* q4_k on two x8 panels (cpu/ops.h), 16 rows a zmm, as gemm_x16_q4_0.
 * Per 256-value block of the 16 rows: the scales as int32 lanes, the mins
 * as int16 pairs (m, m) for the input's 16-value sums two at a time, and
 * the quants as 64 groups of 4 values (group 8j + g: values 4g..4g+3 of
 * sub-block j). A half sub-block's 4 vpdpbusd from zero sum at most 16 *
 * 15 * 128 < 2^15, so its int32 lanes are int16 values: one vpdpwssd
 * with the scale lanes (s, 0) adds s * sum exactly. The integer sums, and
 * then the float steps, equal gemm_tile_k's (the avx2 table's gemm): the
 * same bits (test_ops). */
struct gemm_kblock16 {
    float d[16], dmin[16];
    int32_t sc[8][16]; /* sc[j][r]: row r's scale of sub-block j */
    int32_t mn[8][16]; /* mn[j][r]: (m, m), row r's min of sub-block j */
    uint8_t q[64][64]; /* q[8j + g][4r + k]: value 4g + k of sub-block j */
};

static inline void gemm_pack_x16_q4_K(int64_t nb, const struct cpu_x8_q4_K *a, struct gemm_kblock16 *p) {
    const __m512i m4 = _mm512_set1_epi8(0xF), lo16 = _mm512_set1_epi32(0xFFFF);
    const struct cpu_x8_q4_K *b = a + nb; /* the second panel */
    for (int64_t i = 0; i < nb; i++) {
        _mm512_store_ps(p[i].d, f16_pair_ps(a[i].d, b[i].d));
        _mm512_store_ps(p[i].dmin, f16_pair_ps(a[i].dmin, b[i].dmin));
        for (int j = 0; j < 8; j++) {
            __m128i s = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)a[i].sc[j]),
                                           _mm_loadl_epi64((const __m128i *)b[i].sc[j]));
            _mm512_store_si512(p[i].sc[j], _mm512_cvtepu8_epi32(s));
        }
        for (int k = 0; k < 4; k++) { /* lanes (m_2k, m_2k+1) to (m_2k, m_2k) and (m_2k+1, m_2k+1) */
            const __m512i v = i512_pair(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)a[i].mn[k])),
                                        _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)b[i].mn[k])));
            const __m512i lo = _mm512_and_si512(v, lo16), hi = _mm512_srli_epi32(v, 16);
            _mm512_store_si512(p[i].mn[2 * k], _mm512_or_si512(lo, _mm512_slli_epi32(lo, 16)));
            _mm512_store_si512(p[i].mn[2 * k + 1], _mm512_or_si512(hi, _mm512_slli_epi32(hi, 16)));
        }
        for (int c = 0; c < 4; c++)
            for (int g = 0; g < 8; g++) {
                const __m512i v = i512_pair(_mm256_loadu_si256((const __m256i *)a[i].q[c][g]),
                                            _mm256_loadu_si256((const __m256i *)b[i].q[c][g]));
                _mm512_store_si512(p[i].q[16 * c + g], _mm512_and_si512(v, m4));
                _mm512_store_si512(p[i].q[16 * c + 8 + g], _mm512_and_si512(_mm512_srli_epi16(v, 4), m4));
            }
    }
}

static inline __attribute__((always_inline)) void gemm_tile_x16k(const int T, int64_t i0, int64_t i1,
                                                                 const struct gemm_kblock16 *p, const char *xq,
                                                                 uint64_t xs, __m512 *acc) {
    for (int64_t i = i0; i < i1; i++) {
        __m512i s32[8];
        X16_T s32[t] = _mm512_setzero_si512();
        for (int j = 0; j < 8; j++) {
            const __m512i sc = _mm512_load_si512(p[i].sc[j]);
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                __m512i hs[8];
                X16_T hs[t] = _mm512_setzero_si512();
#pragma GCC unroll 4
                for (int gg = 0; gg < 4; gg++) {
                    const int g = 8 * j + 4 * h + gg;
                    const __m512i wq = _mm512_load_si512(p[i].q[g]);
                    x16_step(T, hs, wq, (const char *)(((const block_q8_K *)xq + i)->qs + 4 * g), xs);
                }
                X16_T s32[t] = _mm512_dpwssd_epi32(s32[t], hs[t], sc);
            }
        }
        const __m512 dw = _mm512_load_ps(p[i].d), dm = _mm512_load_ps(p[i].dmin);
#pragma GCC unroll 8
        X16_T {
            const block_q8_K *b = (const block_q8_K *)(xq + t * xs) + i;
            __m512i o = _mm512_setzero_si512();
            for (int j = 0; j < 8; j++) {
                int32_t b2;
                memcpy(&b2, b->bsums + 2 * j, 4);
                o = _mm512_dpwssd_epi32(o, _mm512_load_si512(p[i].mn[j]), _mm512_set1_epi32(b2));
            }
            const __m512 dx = _mm512_set1_ps(b->d);
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(s32[t]), acc[t]);
            acc[t] = _mm512_fnmadd_ps(_mm512_mul_ps(dm, dx), _mm512_cvtepi32_ps(o), acc[t]);
        }
    }
}

/* The x16 GEMMs' loops: inputs 8 at a time (the last few 4, then 1-3),
 * each tile over `blocks` blocks at a time. */
static inline __attribute__((always_inline)) void gemm_x16_tile(const bool K, const int T, int64_t i0, int64_t i1,
                                                                const void *p, const char *x, uint64_t xs,
                                                                const struct cpu_gemm_xblock *xi, int64_t nb,
                                                                float *y, uint64_t ys, bool load_y) {
    __m512 acc[8];
    X16_T acc[t] = load_y ? _mm512_loadu_ps(y + t * ys) : _mm512_setzero_ps();
    if (K)
        gemm_tile_x16k(T, i0, i1, p, x, xs, acc);
    else
        gemm_tile_x16(T, i0, i1, p, x, xs, xi, nb, acc);
    X16_T _mm512_storeu_ps(y + t * ys, acc[t]);
}

static inline __attribute__((always_inline)) void gemm_x16_run(const bool K, int64_t nb, int64_t blocks,
                                                               const void *p, const char *xq, uint64_t xs,
                                                               const struct cpu_gemm_xblock *xi, int64_t n_tok,
                                                               float *y, uint64_t ys, bool accumulate) {
    for (int64_t t = 0; t < n_tok;) {
        const int64_t left = n_tok - t;
        const int T = left >= 8 ? 8 : left >= 4 ? 4 : (int)left;
        const char *x = xq + t * xs;
        const struct cpu_gemm_xblock *xt = xi ? xi + t * nb : NULL;
        for (int64_t i0 = 0; i0 < nb; i0 += blocks) {
            const int64_t i1 = i0 + blocks < nb ? i0 + blocks : nb;
            const bool load_y = i0 > 0 || accumulate;
            switch (T) {
            case 8: gemm_x16_tile(K, 8, i0, i1, p, x, xs, xt, nb, y + t * ys, ys, load_y); break;
            case 4: gemm_x16_tile(K, 4, i0, i1, p, x, xs, xt, nb, y + t * ys, ys, load_y); break;
            case 3: gemm_x16_tile(K, 3, i0, i1, p, x, xs, xt, nb, y + t * ys, ys, load_y); break;
            case 2: gemm_x16_tile(K, 2, i0, i1, p, x, xs, xt, nb, y + t * ys, ys, load_y); break;
            default: gemm_x16_tile(K, 1, i0, i1, p, x, xs, xt, nb, y + t * ys, ys, load_y); break;
            }
        }
        t += T;
    }
}

/* 8 inputs a tile over 64 blocks at a time: on the dev EPYC (Zen 4, 32
 * KiB L1d) 8 x 64 and 8 x 128 gave 149-154 GMAC/s a core, 8 x 16 145,
 * 16 x 16 135, 16 x 32 144, 4 x 32 147 (4096 x 4096 and 11008 x 4096
 * times 64 inputs, the best of 6 alternating runs; .xx scratch
 * benchmark). q4_k: 16 blocks of 256 (2 and 4 were within the noise). */
#define X16_BLOCKS 64
#define X16K_BLOCKS 16

/* cpu_gemm_fn on the two x8 panels at w (w_stride and n_rows unused). */
static void gemm_x16_q4_0(int64_t n, const void *w, uint64_t w_stride, int n_rows, const void *xq, uint64_t xs,
                          const struct cpu_gemm_xblock *xi, int64_t n_tok, float *y, uint64_t ys, bool accumulate,
                          void *panel) {
    (void)w_stride, (void)n_rows;
    gemm_pack_x16_q4_0(n / 32, w, panel);
    gemm_x16_run(false, n / 32, X16_BLOCKS, panel, xq, xs, xi, n_tok, y, ys, accumulate);
}

static void gemm_x16_q4_K(int64_t n, const void *w, uint64_t w_stride, int n_rows, const void *xq, uint64_t xs,
                          const struct cpu_gemm_xblock *xi, int64_t n_tok, float *y, uint64_t ys, bool accumulate,
                          void *panel) {
    (void)w_stride, (void)n_rows, (void)xi;
    gemm_pack_x16_q4_K(n / QK_K, w, panel);
    gemm_x16_run(true, n / QK_K, X16K_BLOCKS, panel, xq, xs, NULL, n_tok, y, ys, accumulate);
}

#undef X16_T

/* ---- axpy (sparse down rows): 16 lanes, a q4_0/q8_0 block in two vectors ----
 * y is loaded and stored once per block for all the rows (1 or 4); each
 * row's term is one fma, rows in order. */

/* acc[0..2) (32 floats) += d * (32 signed bytes: q0 holds 0..15, q1 16..31) */
static inline void fma32_i8_512(__m512 acc[2], __m512 d, __m128i q0, __m128i q1) {
    acc[0] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), acc[0]);
    acc[1] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), acc[1]);
}

/* q4_0 block: the nibbles minus 8 as signed bytes (exact) */
static inline void q4_0_bytes(const block_q4_0 *b, __m128i *lo, __m128i *hi) {
    const __m128i m4 = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
    const __m128i q = _mm_loadu_si128((const __m128i *)b->qs);
    *lo = _mm_sub_epi8(_mm_and_si128(q, m4), eight);
    *hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m4), eight);
}

TILE_INLINE void axpy_q_rows(const int R, const bool Q8, int64_t n, const float *a, const void *const *w, float *y,
                             const void *const *next) {
    const uint64_t bs = Q8 ? sizeof(block_q8_0) : sizeof(block_q4_0);
    for (int64_t k = 0; k < n / 32; k++, y += 32) {
        if (next && (Q8 || (k & 1) == 0)) /* axpy4's next rows, a line per 34-36 bytes read */
            FOR_R _mm_prefetch((const char *)next[r] + (uint64_t)k * bs, _MM_HINT_T0);
        __m512 acc[2] = {_mm512_loadu_ps(y), _mm512_loadu_ps(y + 16)};
        FOR_R {
            __m128i q0, q1;
            uint16_t dh;
            if (Q8) {
                const block_q8_0 *b = (const block_q8_0 *)w[r] + k;
                q0 = _mm_loadu_si128((const __m128i *)b->qs);
                q1 = _mm_loadu_si128((const __m128i *)(b->qs + 16));
                dh = b->d;
            } else {
                const block_q4_0 *b = (const block_q4_0 *)w[r] + k;
                q4_0_bytes(b, &q0, &q1);
                dh = b->d;
            }
            const float d = a[r] * _cvtsh_ss(dh);
            fma32_i8_512(acc, _mm512_set1_ps(d), q0, q1);
        }
        _mm512_storeu_ps(y, acc[0]);
        _mm512_storeu_ps(y + 16, acc[1]);
    }
}

static void axpy_q4_0_avx512(int64_t n, float a, const void *w, float *y) {
    axpy_q_rows(1, false, n, &a, &w, y, NULL);
}
static void axpy_q8_0_avx512(int64_t n, float a, const void *w, float *y) {
    axpy_q_rows(1, true, n, &a, &w, y, NULL);
}
static void axpy4_q4_0_avx512(int64_t n, const float a[4], const void *const w[4], float *y,
                              const void *const next[4]) {
    axpy_q_rows(4, false, n, a, w, y, next);
}
static void axpy4_q8_0_avx512(int64_t n, const float a[4], const void *const w[4], float *y,
                              const void *const next[4]) {
    axpy_q_rows(4, true, n, a, w, y, next);
}

/* ---- instances and the table ----------------------------------------------- */

#define TILE_SFX avx512
#include "cpu/tiles.h" /* dot_q, dot_q_next, dot_q_x4 and the 2-row tiles */

/* dot_q_xi's block sums (cpu/tiles.h): vpdpbusd of the unsigned nibbles
 * (q8_0: |w| and x with w's sign) from zero; q4_0's -8 is xi's m8. */
static inline __m256i xi_sums(const bool Q8, const void *wb, __m256i xv) {
    const __m256i zero = _mm256_setzero_si256();
    if (Q8) {
        const __m256i wv = _mm256_loadu_si256((const __m256i *)((const block_q8_0 *)wb)->qs);
        return _mm256_dpbusd_epi32(zero, _mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
    }
    const __m256i q = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)((const block_q4_0 *)wb)->qs));
    const __m256i nib = _mm256_and_si256(_mm256_srlv_epi64(q, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0xF));
    return _mm256_dpbusd_epi32(zero, nib, xv);
}
#include "cpu/tiles_xi.h"


#define ENTRIES(NAME)                                                                                           \
    [DTYPE_Q4_0] = dot_q4_0##NAME##_avx512, [DTYPE_Q8_0] = dot_q8_0##NAME##_avx512,                              \
    [DTYPE_Q4_K] = dot_q4_K##NAME##_avx512, [DTYPE_Q6_K] = dot_q6_K##NAME##_avx512

static const struct cpu_kernels kernels_avx512 = {
    .name = "avx512vnni",
    .dot_q = {ENTRIES()},
    .dot_q_x4 = {ENTRIES(_x4)},
    .dot_q_2x1 = {ENTRIES(_2x1)},
    .dot_q_2x4 = {ENTRIES(_2x4)},
    .dot_q_next = {ENTRIES(_next)},
    .dot_q_xi = {[DTYPE_Q4_0] = dot_q4_0_xi, [DTYPE_Q8_0] = dot_q8_0_xi},
    .dot_q_xi_rows = {[DTYPE_Q4_0] = dot_q4_0_xi_rows, [DTYPE_Q8_0] = dot_q8_0_xi_rows},
    .gemm = {[DTYPE_Q4_0] = gemm_q4_0_avx512, [DTYPE_Q8_0] = gemm_q8_0_avx512},
    .gemv_x8 = {[DTYPE_Q4_0] = gemv_x8_q4_0, [DTYPE_Q4_K] = gemv_x8_q4_K},
    .gemm_x8 = {[DTYPE_Q4_0] = gemm_x8_q4_0},
    .gemm_x16 = {[DTYPE_Q4_0] = gemm_x16_q4_0, [DTYPE_Q4_K] = gemm_x16_q4_K},
    .axpy = {[DTYPE_Q4_0] = axpy_q4_0_avx512, [DTYPE_Q8_0] = axpy_q8_0_avx512},
    .axpy4 = {[DTYPE_Q4_0] = axpy4_q4_0_avx512, [DTYPE_Q8_0] = axpy4_q8_0_avx512},
};

const struct cpu_kernels *cpu_kernels_avx512vnni(void) {
    return cpu_has_avx2_fma_f16c() && cpu_has_avx512vnni() ? &kernels_avx512 : NULL;
}
