/*
 * ops_avx2.c - AVX2 + FMA + F16C kernels. This file alone is compiled with
 * -mavx2 -mfma -mf16c; cpu_kernels_avx2() checks cpuid (dispatch.c) before
 * handing them out. Each has a scalar twin in ops.c (tests/test_ops.c compares them).
 */
#include "cpu/ops.h"

#include "quant.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

static inline __m256 load_bf16x8(const bf16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Four accumulators hide the FMA latency; the tail is scalar. */
#define DOT_BODY(LOAD, SCALAR)                                                   \
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();               \
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();               \
    int64_t i = 0;                                                               \
    for (; i + 32 <= n; i += 32) {                                               \
        acc0 = _mm256_fmadd_ps(LOAD(a + i), _mm256_loadu_ps(x + i), acc0);       \
        acc1 = _mm256_fmadd_ps(LOAD(a + i + 8), _mm256_loadu_ps(x + i + 8), acc1); \
        acc2 = _mm256_fmadd_ps(LOAD(a + i + 16), _mm256_loadu_ps(x + i + 16), acc2); \
        acc3 = _mm256_fmadd_ps(LOAD(a + i + 24), _mm256_loadu_ps(x + i + 24), acc3); \
    }                                                                            \
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(LOAD(a + i), _mm256_loadu_ps(x + i), acc0); \
    float s = hsum256(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3))); \
    for (; i < n; i++) s += SCALAR(a[i]) * x[i];                                 \
    return s;

#define LOAD_F32(p) _mm256_loadu_ps(p)
#define LOAD_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define LOAD_BF16(p) load_bf16x8(p)
#define SCALAR_F32(v) (v)

static float dot_f32_avx2(int64_t n, const void *w, const float *x) {
    const float *a = w;
    DOT_BODY(LOAD_F32, SCALAR_F32)
}

static float dot_f16_avx2(int64_t n, const void *w, const float *x) {
    const f16_t *a = w;
    DOT_BODY(LOAD_F16, f16_to_f32)
}

static float dot_bf16_avx2(int64_t n, const void *w, const float *x) {
    const bf16_t *a = w;
    DOT_BODY(LOAD_BF16, bf16_to_f32)
}

static void to_f32_f16_avx2(int64_t n, const void *src, float *dst) {
    const f16_t *s = src;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, LOAD_F16(s + i));
    for (; i < n; i++) dst[i] = f16_to_f32(s[i]);
}

/* ---- quantized dot products --------------------------------------------
 * Integer products per block (maddubs: unsigned x signed bytes to int16
 * pairs, madd: int16 pairs to int32), then one FMA per block with the
 * float scales. Activations are q8 blocks whose quants lie in -127..127
 * (our quantizers never produce -128, which the sign trick below needs). */

static inline float f16s(uint16_t h) { return _cvtsh_ss(h); }

/* 8 int32 partial sums of a[i] * b[i] over 32 signed bytes. */
static inline __m256i dot_i8(__m256i a, __m256i b) {
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/* Same with a in 0..127 (unsigned quants). */
static inline __m256i dot_u8(__m256i a, __m256i b) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
}

/* 32 nibbles of a 16-byte q4 block: low nibbles are values 0..15, high 16..31. */
static inline __m256i nibbles32(const uint8_t *qs) {
    const __m128i t = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0xF));
}

/* Byte j = 0x10 where bit j of the 32 bits at p is set, else 0. */
static inline __m256i bits32_to_0x10(const uint8_t *p) {
    uint32_t h;
    memcpy(&h, p, 4);
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)h),
                                               _mm256_setr_epi64x(0, 0x0101010101010101LL,
                                                                  0x0202020202020202LL, 0x0303030303030303LL));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

static float dot_q4_1_avx2(int64_t n, const void *w, const void *xq) {
    const block_q4_1 *a = w;
    const block_q8_1 *b = xq;
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f;
    for (int64_t i = 0; i < n / QK4_1; i++) {
        const __m256i qx = _mm256_loadu_si256((const __m256i *)b[i].qs);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(f16s(a[i].d) * f16s(b[i].d)),
                              _mm256_cvtepi32_ps(dot_u8(nibbles32(a[i].qs), qx)), acc);
        mins += f16s(a[i].m) * f16s(b[i].s);
    }
    return hsum256(acc) + mins;
}

static float dot_q5_0_avx2(int64_t n, const void *w, const void *xq) {
    const block_q5_0 *a = w;
    const block_q8_0 *b = xq;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK5_0; i++) {
        __m256i qw = _mm256_or_si256(nibbles32(a[i].qs), bits32_to_0x10(a[i].qh));
        qw = _mm256_sub_epi8(qw, _mm256_set1_epi8(16));
        const __m256i qx = _mm256_loadu_si256((const __m256i *)b[i].qs);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(f16s(a[i].d) * f16s(b[i].d)), _mm256_cvtepi32_ps(dot_i8(qw, qx)), acc);
    }
    return hsum256(acc);
}

static float dot_q5_1_avx2(int64_t n, const void *w, const void *xq) {
    const block_q5_1 *a = w;
    const block_q8_1 *b = xq;
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f;
    for (int64_t i = 0; i < n / QK5_1; i++) {
        const __m256i qw = _mm256_or_si256(nibbles32(a[i].qs), bits32_to_0x10(a[i].qh));
        const __m256i qx = _mm256_loadu_si256((const __m256i *)b[i].qs);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(f16s(a[i].d) * f16s(b[i].d)), _mm256_cvtepi32_ps(dot_u8(qw, qx)), acc);
        mins += f16s(a[i].m) * f16s(b[i].s);
    }
    return hsum256(acc) + mins;
}

/* Per-16-value scales of a 32-value group as int16 lanes for madd: the low
 * 128 bits (values 0..15) take s0, the high ones (16..31) s1. */
static inline __m256i scales16(int s0, int s1) {
    return _mm256_set_m128i(_mm_set1_epi16((short)s1), _mm_set1_epi16((short)s0));
}

/* q2_k: value 128h + 32s + l is bits 2s of qs[32h + l]; 16 groups of 16
 * with 4-bit scales (low nibble) and mins (high nibble). */
static float dot_q2_K_avx2(int64_t n, const void *w, const void *xq) {
    const block_q2_K *a = w;
    const block_q8_K *b = xq;
    const __m256i m2 = _mm256_set1_epi8(3);
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int32_t msum = 0;
        for (int j = 0; j < 16; j++) msum += (a[i].scales[j] >> 4) * b[i].bsums[j];
        __m256i isum = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(a[i].qs + 32 * h));
            for (int s = 0; s < 4; s++) {
                const __m256i u = _mm256_and_si256(_mm256_srli_epi16(q, 2 * s), m2);
                const __m256i x = _mm256_loadu_si256((const __m256i *)(b[i].qs + 128 * h + 32 * s));
                const uint8_t *sc = a[i].scales + 8 * h + 2 * s;
                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x),
                                                                scales16(sc[0] & 0xF, sc[1] & 0xF)));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(b[i].d * f16s(a[i].d)), _mm256_cvtepi32_ps(isum), acc);
        mins += b[i].d * f16s(a[i].dmin) * (float)msum;
    }
    return hsum256(acc) - mins;
}

/* q3_k: u = 2 low bits (laid out as q2_k) | hmask bit << 2, value u - 4;
 * the -4 goes through the activation sums: sum sc (u - 4) x =
 * sum sc u x - 4 sum sc bsum. */
static float dot_q3_K_avx2(int64_t n, const void *w, const void *xq) {
    const block_q3_K *a = w;
    const block_q8_K *b = xq;
    const __m256i m2 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        int sc[16];
        int32_t osum = 0;
        for (int j = 0; j < 16; j++) {
            sc[j] = quant_scale_q3_k(j, a[i].scales);
            osum += sc[j] * b[i].bsums[j];
        }
        __m256i isum = _mm256_setr_epi32(-4 * osum, 0, 0, 0, 0, 0, 0, 0);
        const __m256i hm = _mm256_loadu_si256((const __m256i *)a[i].hmask);
        for (int h = 0; h < 2; h++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(a[i].qs + 32 * h));
            for (int s = 0; s < 4; s++) {
                const __m256i hb = _mm256_and_si256(_mm256_srli_epi16(hm, 4 * h + s), one);
                const __m256i u = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 2 * s), m2),
                                                  _mm256_slli_epi16(hb, 2));
                const __m256i x = _mm256_loadu_si256((const __m256i *)(b[i].qs + 128 * h + 32 * s));
                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x),
                                                                scales16(sc[8 * h + 2 * s], sc[8 * h + 2 * s + 1])));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(b[i].d * f16s(a[i].d)), _mm256_cvtepi32_ps(isum), acc);
    }
    return hsum256(acc);
}

/* q4_k / q5_k (same header: d, dmin, scales; q5 adds qh before qs): chunk
 * c of 64 values = sub-blocks 2c (low nibbles) and 2c+1 (high nibbles),
 * plus for q5_k the 5th bits, bits 2c and 2c+1 of qh. */
static float dot_k4_avx2(int64_t n_blocks, const uint8_t *base, size_t stride, const block_q8_K *b, bool q5) {
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f;
    const __m256i m4 = _mm256_set1_epi8(0xF), one = _mm256_set1_epi8(1);
    for (int64_t i = 0; i < n_blocks; i++) {
        const uint8_t *blk = base + (size_t)i * stride;
        uint16_t d16, dmin16;
        memcpy(&d16, blk, 2);
        memcpy(&dmin16, blk + 2, 2);
        const uint8_t *scales = blk + 4;
        const uint8_t *qh = q5 ? blk + 4 + K_SCALE_SIZE : NULL;
        const uint8_t *qs = blk + 4 + K_SCALE_SIZE + (q5 ? QK_K / 8 : 0);
        uint8_t sc[8], m[8];
        int32_t msum = 0;
        for (int j = 0; j < 8; j++) {
            quant_scale_min_k4(j, scales, &sc[j], &m[j]);
            msum += m[j] * (b[i].bsums[2 * j] + b[i].bsums[2 * j + 1]);
        }
        const __m256i hb = q5 ? _mm256_loadu_si256((const __m256i *)qh) : _mm256_setzero_si256();
        __m256i isum = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            if (q5) {
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c), one), 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c + 1), one), 4));
            }
            const __m256i xlo = _mm256_loadu_si256((const __m256i *)(b[i].qs + 64 * c));
            const __m256i xhi = _mm256_loadu_si256((const __m256i *)(b[i].qs + 64 * c + 32));
            const __m256i plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_set1_epi16(sc[2 * c]));
            const __m256i phi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xhi), _mm256_set1_epi16(sc[2 * c + 1]));
            isum = _mm256_add_epi32(isum, _mm256_add_epi32(plo, phi));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(b[i].d * f16s(d16)), _mm256_cvtepi32_ps(isum), acc);
        mins += b[i].d * f16s(dmin16) * (float)msum;
    }
    return hsum256(acc) - mins;
}

static float dot_q5_K_avx2(int64_t n, const void *w, const void *xq) {
    return dot_k4_avx2(n / QK_K, w, sizeof(block_q5_K), xq, true);
}

/* ---- tiles: R weight rows x T input rows ---------------------------------
 * One template per weight type, instantiated for 1x1 (dot_q, and
 * dot_q_next with the next row's offset as PF instead of the read-ahead),
 * 1x4, 2x1 and 2x4. Every (row,
 * input) pair has one float accumulator that takes the blocks in order
 * through the same operations whatever the tile, so all shapes give the
 * same bits (tests/test_ops.c checks it); the tile only shares the loads
 * and unpacking: a weight block is unpacked once for T inputs, an input
 * block loaded once for R rows. */
#define TILE_INLINE static inline __attribute__((always_inline))
#define FOR_R for (int r = 0; r < R; r++)
#define FOR_T for (int t = 0; t < T; t++)

/* Broadcast f32 of an f16 in memory. */
static inline __m256 f16_bcast(const uint16_t *h) { return _mm256_cvtph_ps(_mm_set1_epi16((short)*h)); }

/* 32 nibbles of a 16-byte q4 block as bytes 0..15 (low nibbles in the low
 * 128 bits); one broadcast load and a per-half shift instead of two shifts
 * and an insert. */
static inline __m256i nibbles32_v(const uint8_t *qs) {
    const __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    return _mm256_and_si256(_mm256_srlv_epi64(t, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0xF));
}

/* Decode (dot_q, PF) streams the weights from memory: the tiles prefetch
 * this far ahead (measured on a 2-core Zen 3: one row at a time plus this
 * prefetch reads 10-20% faster than without it, and two rows at a time,
 * two streams, 30-40% slower, so decode uses the 1x1 kernels). 512 bytes
 * ahead was too short: 7B q4_0 decode at 2 threads, same machine, runs
 * alternating, 3.30 tokens/s (512) / 3.84 (2048) / 4.04 (4096) / 3.91
 * (8192) averaged over three runs each; q4_k unchanged (3.99 vs 4.08).
 * dot_q_next (one scattered row: the sparse FFN's gathers) reads no
 * further than its row: 4096 bytes past a 7B q4_0 row of 2304 is another
 * neuron's row, read for nothing (the sparse gate/up round took 12-15%
 * longer with it); it asks for the next neuron's row instead, at the same
 * offset as it reads, so the requests are spread over the row's work. */
#ifndef OPTIML_PREFETCH_AHEAD /* a build-time override, for measuring */
#define OPTIML_PREFETCH_AHEAD 4096
#endif
/* the line PF bytes past p (PF: a template argument, 0 = none) */
#define PREFETCH(p) _mm_prefetch((const char *)((uintptr_t)(p) + PF), _MM_HINT_T0)

/* q4_0 (Q8 = false: weights - 8 through the input sums: maddubs(w, x) -
 * maddubs(8, x), both exact in int16) and q8_0 (Q8 = true: the sign trick)
 * against q8_0 inputs. */
TILE_INLINE void tile_q4_0_q8_0(const int R, const int T, const uintptr_t PF, const bool Q8, int64_t n, const void *w,
                                uint64_t w_stride, const void *xq, uint64_t xq_stride, float *out) {
    const int64_t nb = n / 32;
    const __m256i ones = _mm256_set1_epi16(1), eights = _mm256_set1_epi8(8);
    __m256 acc[2][4];
    FOR_R FOR_T acc[r][t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        /* the R weight blocks first (kept in registers), then input by input:
         * few live registers, so the 2x4 accumulators stay in registers */
        __m256i wv[2];
        __m256 dw[2];
#pragma GCC unroll 2
        FOR_R {
            if (Q8) {
                const block_q8_0 *a = (const block_q8_0 *)((const char *)w + r * w_stride) + i;
                wv[r] = _mm256_loadu_si256((const __m256i *)a->qs);
                dw[r] = f16_bcast(&a->d);
                if (PF) PREFETCH(a);
            } else {
                const block_q4_0 *a = (const block_q4_0 *)((const char *)w + r * w_stride) + i;
                wv[r] = nibbles32_v(a->qs);
                dw[r] = f16_bcast(&a->d);
                if (PF && (i & 1) == 0) PREFETCH(a); /* 36 bytes per two blocks */
            }
        }
#pragma GCC unroll 4
        FOR_T {
            const block_q8_0 *b = (const block_q8_0 *)((const char *)xq + t * xq_stride) + i;
            const __m256i xv = _mm256_loadu_si256((const __m256i *)b->qs);
            const __m256i x8 = Q8 ? xv : _mm256_maddubs_epi16(eights, xv);
            const __m256 dx = f16_bcast(&b->d);
#pragma GCC unroll 2
            FOR_R {
                __m256i p16;
                if (Q8) p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv[r], wv[r]), _mm256_sign_epi8(xv, wv[r]));
                else p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(wv[r], xv), x8);
                const __m256i p = _mm256_madd_epi16(p16, ones);
                acc[r][t] = _mm256_fmadd_ps(_mm256_mul_ps(dw[r], dx), _mm256_cvtepi32_ps(p), acc[r][t]);
            }
        }
    }
    FOR_R FOR_T out[r * T + t] = hsum256(acc[r][t]);
}

/* The 8 scales (bytes 0..7) and 8 mins (bytes 8..15) of a q4_k / q5_k
 * block, 6 bits each, unpacked from their 12 bytes (quant.h's
 * quant_scale_min_k4 for all j at once). */
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

/* shuffle_epi8 mask: int16 lane k of each 128-bit half to all its lanes. */
static inline __m256i bcast16_mask(int k) {
    return _mm256_set1_epi16((short)((2 * k) | ((2 * k + 1) << 8)));
}

/* q4_k: chunk c of 64 values = sub-block 2c (low nibbles of 32 bytes) and
 * 2c + 1 (high nibbles). The mins go through the input's 16-value sums. */
TILE_INLINE void tile_q4_K(const int R, const int T, const uintptr_t PF, int64_t n, const void *w, uint64_t w_stride,
                           const void *xq, uint64_t xq_stride, float *out) {
    const int64_t nb = n / QK_K;
    const __m256i m4 = _mm256_set1_epi8(0xF);
    __m256 acc[2][4];
    FOR_R FOR_T acc[r][t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        __m256i bsp[4]; /* 8 sums of 32 inputs (int16) in the low half */
        __m256 dx[4];
#pragma GCC unroll 4
        FOR_T {
            const block_q8_K *b = (const block_q8_K *)((const char *)xq + t * xq_stride) + i;
            const __m128i s0 = _mm_loadu_si128((const __m128i *)b->bsums);
            const __m128i s1 = _mm_loadu_si128((const __m128i *)(b->bsums + 8));
            bsp[t] = _mm256_zextsi128_si256(_mm_hadd_epi16(s0, s1));
            dx[t] = _mm256_set1_ps(b->d);
        }
#pragma GCC unroll 2
        FOR_R {
            const block_q4_K *a = (const block_q4_K *)((const char *)w + r * w_stride) + i;
            if (PF) for (int o = 0; o < (int)sizeof(*a); o += 64) PREFETCH((const char *)a + o);
            const __m128i sm = k4_scales_mins(a->scales);
            const __m256i sc = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
            const __m256i mins = _mm256_zextsi128_si256(_mm_cvtepu8_epi16(_mm_srli_si128(sm, 8)));
            const __m256 dw = f16_bcast(&a->d), dmin = f16_bcast(&a->dmin);
            __m256i isum[4];
            FOR_T isum[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {
                const __m256i q = _mm256_loadu_si256((const __m256i *)(a->qs + 32 * c));
                const __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                const __m256i sl = _mm256_shuffle_epi8(sc, bcast16_mask(2 * c));
                const __m256i sh = _mm256_shuffle_epi8(sc, bcast16_mask(2 * c + 1));
#pragma GCC unroll 4
                FOR_T {
                    const int8_t *x = ((const block_q8_K *)((const char *)xq + t * xq_stride) + i)->qs + 64 * c;
                    const __m256i pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)x)), sl);
                    const __m256i ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 32))), sh);
                    isum[t] = _mm256_add_epi32(isum[t], _mm256_add_epi32(pl, ph));
                }
            }
#pragma GCC unroll 4
            FOR_T {
                const __m256i msum = _mm256_madd_epi16(mins, bsp[t]);
                acc[r][t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx[t]), _mm256_cvtepi32_ps(isum[t]), acc[r][t]);
                acc[r][t] = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, dx[t]), _mm256_cvtepi32_ps(msum), acc[r][t]);
            }
        }
    }
    FOR_R FOR_T out[r * T + t] = hsum256(acc[r][t]);
}

/* q6_k: half h of 128 values; group s of 32 takes nibble s / 2 of ql bytes
 * 64h + 32(s % 2) + l and bits 2s of qh bytes 32h + l; two scales per
 * group (16 values each: the low and high 128 bits). The -32 offset goes
 * through the input's 16-value sums: sum sc (q - 32) x = sum sc q x -
 * 32 sum sc bsum. */
TILE_INLINE void tile_q6_K(const int R, const int T, const uintptr_t PF, int64_t n, const void *w, uint64_t w_stride,
                           const void *xq, uint64_t xq_stride, float *out) {
    const int64_t nb = n / QK_K;
    const __m256i m4 = _mm256_set1_epi8(0xF), m2 = _mm256_set1_epi8(3);
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
            const __m256 dw = f16_bcast(&a->d);
            __m256i isum[4];
#pragma GCC unroll 4
            FOR_T isum[t] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs[t]), 5));
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                /* the 8 scales of this half, as int16, in both 128-bit halves */
                const __m256i sch = h ? _mm256_permute4x64_epi64(sc16, 0xEE) : _mm256_permute4x64_epi64(sc16, 0x44);
                const __m256i l0 = _mm256_loadu_si256((const __m256i *)(a->ql + 64 * h));
                const __m256i l1 = _mm256_loadu_si256((const __m256i *)(a->ql + 64 * h + 32));
                const __m256i qh = _mm256_loadu_si256((const __m256i *)(a->qh + 32 * h));
                const __m256i q[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                                      _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                      _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
#pragma GCC unroll 4
                for (int s = 0; s < 4; s++) {
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * s), m2);
                    const __m256i qs = _mm256_or_si256(q[s], _mm256_slli_epi16(hi, 4));
                    /* low 128 bits: scale 2s of the half, high: 2s + 1 */
                    const __m256i scs = _mm256_shuffle_epi8(
                        sch, _mm256_setr_epi8(4 * s, 4 * s + 1, 4 * s, 4 * s + 1, 4 * s, 4 * s + 1, 4 * s, 4 * s + 1,
                                              4 * s, 4 * s + 1, 4 * s, 4 * s + 1, 4 * s, 4 * s + 1, 4 * s, 4 * s + 1,
                                              4 * s + 2, 4 * s + 3, 4 * s + 2, 4 * s + 3, 4 * s + 2, 4 * s + 3,
                                              4 * s + 2, 4 * s + 3, 4 * s + 2, 4 * s + 3, 4 * s + 2, 4 * s + 3,
                                              4 * s + 2, 4 * s + 3, 4 * s + 2, 4 * s + 3));
#pragma GCC unroll 4
                    FOR_T {
                        const int8_t *x = ((const block_q8_K *)((const char *)xq + t * xq_stride) + i)->qs + 128 * h + 32 * s;
                        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(qs, _mm256_loadu_si256((const __m256i *)x)), scs);
                        isum[t] = _mm256_add_epi32(isum[t], p);
                    }
                }
            }
#pragma GCC unroll 4
            FOR_T acc[r][t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx[t]), _mm256_cvtepi32_ps(isum[t]), acc[r][t]);
        }
    }
    FOR_R FOR_T out[r * T + t] = hsum256(acc[r][t]);
}

#define TILE_SFX avx2
#include "cpu/tiles.h" /* dot_q, dot_q_next, dot_q_x4 and the 2-row tiles */

/* dot_q_xi's block sums (cpu/tiles.h): the int32 lanes of sum w x over a
 * block, q4_0's nibbles unsigned (its -8 is xi's m8): maddubs, then pair
 * sums. */
static inline __m256i xi_sums(const bool Q8, const void *wb, __m256i xv) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i p16;
    if (Q8) {
        const __m256i wv = _mm256_loadu_si256((const __m256i *)((const block_q8_0 *)wb)->qs);
        p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
    } else {
        p16 = _mm256_maddubs_epi16(nibbles32_v(((const block_q4_0 *)wb)->qs), xv);
    }
    return _mm256_madd_epi16(p16, ones);
}
#include "cpu/tiles_xi.h"


/* ---- prompt GEMM on repacked panels (gemm_panel.h) ----------------------
 * q4_0: the nibble products (|p| <= 2 * 15 * 127 per int16 pair) of a
 * block's 8 groups sum in int16 (<= 30480), one madd per block; q8_0: the
 * sign trick (dot_i8 above), one madd per group. */
static inline __m256i gemm_acc(bool q8, __m256i s, __m256i wq, __m256i wa, __m256i xb) {
    if (q8) return _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(wa, _mm256_sign_epi8(xb, wq)),
                                                         _mm256_set1_epi16(1)));
    return _mm256_add_epi16(s, _mm256_maddubs_epi16(wq, xb));
}

static inline __m256i gemm_block_sum(bool q8, __m256i s) {
    return q8 ? s : _mm256_madd_epi16(s, _mm256_set1_epi16(1));
}

#include "cpu/gemm_panel.h"

static void gemm_q4_0_avx2(int64_t n, const void *w, uint64_t w_stride, int n_rows, const void *xq, uint64_t xs,
                           const struct cpu_gemm_xblock *xi, int64_t n_tok, float *y, uint64_t ys, bool accumulate,
                           void *panel) {
    gemm_q0(false, false, n, w, w_stride, n_rows, xq, xs, xi, n_tok, y, ys, accumulate, panel);
}

static void gemm_q8_0_avx2(int64_t n, const void *w, uint64_t w_stride, int n_rows, const void *xq, uint64_t xs,
                           const struct cpu_gemm_xblock *xi, int64_t n_tok, float *y, uint64_t ys, bool accumulate,
                           void *panel) {
    gemm_q0(true, false, n, w, w_stride, n_rows, xq, xs, xi, n_tok, y, ys, accumulate, panel);
}

/* ---- prompt GEMM for q4_k and q6_k (AVX2 only; the avx512 table keeps
 * these) ----------------------------------------------------------------
 * Panel per 256-value block of 8 rows: the quants as gemm_panel.h's q[][]
 * (64 groups of 4 values), and per row, as int32 lanes, the sub-block
 * scales (an int16 pair (s, s): madd of the int16 sums by it scales both
 * halves) and the offset weights o of the input's 16-value sums:
 *   q4_k: value = d sc_j q - dmin m_j (32-value sub-blocks, q 0..15),
 *         o pair k = (m_k, m_k) against bsums 2k, 2k + 1, times dmin;
 *   q6_k: value = d sc_j (q - 32) (16-value sub-blocks, q 0..63),
 *         o pair k = 32 (sc_2k, sc_2k+1), times d. */
struct gemm_kblock {
    float d[8], dmin[8];
    int32_t sc[16][8];
    int32_t off[8][8];
    uint8_t q[64][32];
};

/* 8 int16 as 8 int32 lanes (v, v), for madd. */
static inline __m256i i16_pairs(__m128i v) {
    return _mm256_set_m128i(_mm_unpackhi_epi16(v, v), _mm_unpacklo_epi16(v, v));
}

/* The 256 values of a q4_k block as 8 vectors of 32 bytes, and its scales
 * (s[0]) and mins (s[2]) as int16 pairs, one sub-block per lane. */
static inline void gemm_unpack_q4_K(const block_q4_K *a, __m256i *v, __m256i *s) {
    const __m256i m4 = _mm256_set1_epi8(0xF);
    for (int c = 0; c < 4; c++) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(a->qs + 32 * c));
        v[2 * c] = _mm256_and_si256(q, m4);
        v[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
    }
    const __m128i sm = k4_scales_mins(a->scales);
    s[0] = i16_pairs(_mm_cvtepu8_epi16(sm));
    s[1] = _mm256_setzero_si256();
    s[2] = i16_pairs(_mm_cvtepu8_epi16(_mm_srli_si128(sm, 8)));
}

/* The same for q6_k (quants 0..63, as tile_q6_K above): scales 0..7 (s[0])
 * and 8..15 (s[1]), offset weights 32 (sc_2k, sc_2k+1) (s[2]). */
static inline void gemm_unpack_q6_K(const block_q6_K *a, __m256i *v, __m256i *s) {
    const __m256i m4 = _mm256_set1_epi8(0xF), m2 = _mm256_set1_epi8(3);
    for (int h = 0; h < 2; h++) {
        const __m256i l0 = _mm256_loadu_si256((const __m256i *)(a->ql + 64 * h));
        const __m256i l1 = _mm256_loadu_si256((const __m256i *)(a->ql + 64 * h + 32));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(a->qh + 32 * h));
        const __m256i lo[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                               _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                               _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
        for (int k = 0; k < 4; k++) {
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), m2);
            v[4 * h + k] = _mm256_or_si256(lo[k], _mm256_slli_epi16(hi, 4));
        }
    }
    const __m256i sc = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)a->scales));
    s[0] = i16_pairs(_mm256_castsi256_si128(sc));
    s[1] = i16_pairs(_mm256_extracti128_si256(sc, 1));
    s[2] = _mm256_slli_epi16(sc, 5);
}

/* Repack n_rows (1..8) rows of nb blocks; missing rows are zeros. The
 * rows' scale vectors go through the same transpose as the quants. */
static void gemm_pack_k(bool q6, int64_t nb, const void *w, uint64_t w_stride, int n_rows, struct gemm_kblock *p) {
    const uint64_t bsize = q6 ? sizeof(block_q6_K) : sizeof(block_q4_K);
    for (int64_t i = 0; i < nb; i++) {
        __m256i v[8][8], s[3][8]; /* [row][32-value vector], [scale vector][row] */
        for (int r = 0; r < 8; r++) {
            const char *a = (const char *)w + (uint64_t)r * w_stride + (uint64_t)i * bsize;
            __m256i sr[3] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
            p[i].d[r] = p[i].dmin[r] = 0.0f;
            if (r >= n_rows) {
                for (int k = 0; k < 8; k++) v[r][k] = _mm256_setzero_si256();
            } else if (q6) {
                gemm_unpack_q6_K((const block_q6_K *)a, v[r], sr);
                p[i].d[r] = f16s(((const block_q6_K *)a)->d);
            } else {
                gemm_unpack_q4_K((const block_q4_K *)a, v[r], sr);
                p[i].d[r] = f16s(((const block_q4_K *)a)->d);
                p[i].dmin[r] = f16s(((const block_q4_K *)a)->dmin);
            }
            for (int k = 0; k < 3; k++) s[k][r] = sr[k];
        }
        for (int k = 0; k < 3; k++) {
            gemm_transpose8(s[k]);
            for (int j = 0; j < 8; j++)
                _mm256_store_si256((__m256i *)(k == 2 ? p[i].off[j] : p[i].sc[8 * k + j]), s[k][j]);
        }
        for (int k = 0; k < 8; k++) {
            __m256i t[8];
            for (int r = 0; r < 8; r++) t[r] = v[r][k];
            gemm_transpose8(t);
            for (int g = 0; g < 8; g++) _mm256_store_si256((__m256i *)p[i].q[8 * k + g], t[g]);
        }
    }
}

/* The GEMM panel of one q4_k x8 panel (cpu/ops.h): the same panel, bit for
 * bit, as gemm_pack_k makes from its 8 rows. */
static void gemm_pack_x8_q4_K(int64_t nb, const struct cpu_x8_q4_K *src, struct gemm_kblock *p) {
    const __m256i m4 = _mm256_set1_epi8(0xF), lo16 = _mm256_set1_epi32(0xFFFF);
    for (int64_t i = 0; i < nb; i++) {
        _mm256_store_ps(p[i].d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)src[i].d)));
        _mm256_store_ps(p[i].dmin, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)src[i].dmin)));
        for (int j = 0; j < 8; j++) { /* (s, s) int16 pairs, one row a lane */
            const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)src[i].sc[j]));
            _mm256_store_si256((__m256i *)p[i].sc[j], _mm256_or_si256(v, _mm256_slli_epi32(v, 16)));
            _mm256_store_si256((__m256i *)p[i].sc[8 + j], _mm256_setzero_si256());
        }
        for (int k = 0; k < 4; k++) { /* lanes (m_2k, m_2k+1) to (m_2k, m_2k) and (m_2k+1, m_2k+1) */
            const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)src[i].mn[k]));
            const __m256i a = _mm256_and_si256(v, lo16), b = _mm256_srli_epi32(v, 16);
            _mm256_store_si256((__m256i *)p[i].off[2 * k], _mm256_or_si256(a, _mm256_slli_epi32(a, 16)));
            _mm256_store_si256((__m256i *)p[i].off[2 * k + 1], _mm256_or_si256(b, _mm256_slli_epi32(b, 16)));
        }
        for (int c = 0; c < 4; c++)
            for (int g = 0; g < 8; g++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)src[i].q[c][g]);
                _mm256_store_si256((__m256i *)p[i].q[16 * c + g], _mm256_and_si256(v, m4));
                _mm256_store_si256((__m256i *)p[i].q[16 * c + 8 + g], _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
            }
    }
}

/* 8 rows x T inputs, blocks [i0, i1). Int16 sums of unsigned quants times
 * inputs: q4_k takes a sub-block's 8 groups (<= 8 * 2 * 15 * 127), q6_k 2
 * groups (<= 2 * 2 * 63 * 127) before each madd by the scales. */
TILE_INLINE void gemm_tile_k(const int T, const bool Q6, int64_t i0, int64_t i1, const struct gemm_kblock *p,
                             const char *xq, uint64_t xs, __m256 *acc) {
    const int n_sub = Q6 ? 16 : 8, n_half = Q6 ? 2 : 1, n_g = Q6 ? 2 : 8;
    for (int64_t i = i0; i < i1; i++) {
        __m256i s32[4], s16[4];
        FOR_T s32[t] = _mm256_setzero_si256();
        for (int j = 0; j < n_sub; j++) {
            const __m256i sc = _mm256_load_si256((const __m256i *)p[i].sc[j]);
            for (int h = 0; h < n_half; h++) {
                FOR_T s16[t] = _mm256_setzero_si256();
#pragma GCC unroll 8
                for (int gg = 0; gg < n_g; gg++) {
                    const int g = j * n_half * n_g + h * n_g + gg;
                    const __m256i wq = _mm256_load_si256((const __m256i *)p[i].q[g]);
#pragma GCC unroll 4
                    FOR_T {
                        int32_t x4;
                        memcpy(&x4, ((const block_q8_K *)(xq + t * xs) + i)->qs + 4 * g, 4);
                        s16[t] = _mm256_add_epi16(s16[t], _mm256_maddubs_epi16(wq, _mm256_set1_epi32(x4)));
                        __asm__("" : "+x"(s16[t])); /* a chain, as in gemm_tile_q0 */
                    }
                }
                FOR_T s32[t] = _mm256_add_epi32(s32[t], _mm256_madd_epi16(s16[t], sc));
            }
        }
        const __m256 dw = _mm256_load_ps(p[i].d), dm = _mm256_load_ps(p[i].dmin);
#pragma GCC unroll 4
        FOR_T {
            const block_q8_K *b = (const block_q8_K *)(xq + t * xs) + i;
            __m256i o = _mm256_setzero_si256();
            for (int k = 0; k < 8; k++) {
                int32_t b2;
                memcpy(&b2, b->bsums + 2 * k, 4);
                o = _mm256_add_epi32(o, _mm256_madd_epi16(_mm256_load_si256((const __m256i *)p[i].off[k]),
                                                          _mm256_set1_epi32(b2)));
            }
            const __m256 dx = _mm256_set1_ps(b->d);
            if (Q6) {
                const __m256 v = _mm256_cvtepi32_ps(_mm256_sub_epi32(s32[t], o));
                acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), v, acc[t]);
            } else {
                acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(s32[t]), acc[t]);
                acc[t] = _mm256_fnmadd_ps(_mm256_mul_ps(dm, dx), _mm256_cvtepi32_ps(o), acc[t]);
            }
        }
    }
}

TILE_INLINE void gemm_tokens_k(const int T, const bool Q6, int64_t i0, int64_t i1, const struct gemm_kblock *p,
                               const char *xq, uint64_t xs, int64_t t0, float *y, uint64_t ys, int n_rows,
                               bool load_y) {
    __m256 acc[4];
    FOR_T acc[t] = load_y ? gemm_load8(y + (t0 + t) * ys, n_rows) : _mm256_setzero_ps();
    gemm_tile_k(T, Q6, i0, i1, p, xq + t0 * xs, xs, acc);
    FOR_T gemm_store8(y + (t0 + t) * ys, acc[t], n_rows);
}

/* As gemm_q0: chunks of 16 inputs x 4 blocks (18 KiB of inputs, 11 KiB of
 * panel) stay in L1. */
#define GEMM_KBLOCKS 4
static inline void gemm_k(const bool Q6, const bool X8, int64_t n, const void *w, uint64_t w_stride, int n_rows,
                          const void *xq, uint64_t xs, int64_t n_tok, float *y, uint64_t ys, bool accumulate,
                          void *panel) {
    const int64_t nb = n / QK_K;
    struct gemm_kblock *p = panel;
    if (X8)
        gemm_pack_x8_q4_K(nb, w, p);
    else
        gemm_pack_k(Q6, nb, w, w_stride, n_rows, p);
    for (int64_t c0 = 0; c0 < n_tok; c0 += GEMM_TOKENS) {
        const int64_t c1 = c0 + GEMM_TOKENS < n_tok ? c0 + GEMM_TOKENS : n_tok;
        for (int64_t i0 = 0; i0 < nb; i0 += GEMM_KBLOCKS) {
            const int64_t i1 = i0 + GEMM_KBLOCKS < nb ? i0 + GEMM_KBLOCKS : nb;
            const bool load_y = i0 > 0 || accumulate;
            int64_t t = c0;
            for (; t + 4 <= c1; t += 4) gemm_tokens_k(4, Q6, i0, i1, p, xq, xs, t, y, ys, n_rows, load_y);
            switch (c1 - t) {
            case 3: gemm_tokens_k(3, Q6, i0, i1, p, xq, xs, t, y, ys, n_rows, load_y); break;
            case 2: gemm_tokens_k(2, Q6, i0, i1, p, xq, xs, t, y, ys, n_rows, load_y); break;
            case 1: gemm_tokens_k(1, Q6, i0, i1, p, xq, xs, t, y, ys, n_rows, load_y); break;
            default: break;
            }
        }
    }
}

static void gemm_q4_K_avx2(int64_t n, const void *w, uint64_t w_stride, int n_rows, const void *xq, uint64_t xs,
                           const struct cpu_gemm_xblock *xi, int64_t n_tok, float *y, uint64_t ys, bool accumulate,
                           void *panel) {
    (void)xi;
    gemm_k(false, false, n, w, w_stride, n_rows, xq, xs, n_tok, y, ys, accumulate, panel);
}

static void gemm_x8_q4_K_avx2(int64_t n, const void *w, uint64_t w_stride, int n_rows, const void *xq, uint64_t xs,
                              const struct cpu_gemm_xblock *xi, int64_t n_tok, float *y, uint64_t ys, bool accumulate,
                              void *panel) {
    (void)xi;
    gemm_k(false, true, n, w, w_stride, n_rows, xq, xs, n_tok, y, ys, accumulate, panel);
}

static void gemm_q6_K_avx2(int64_t n, const void *w, uint64_t w_stride, int n_rows, const void *xq, uint64_t xs,
                           const struct cpu_gemm_xblock *xi, int64_t n_tok, float *y, uint64_t ys, bool accumulate,
                           void *panel) {
    (void)xi;
    gemm_k(true, false, n, w, w_stride, n_rows, xq, xs, n_tok, y, ys, accumulate, panel);
}

/* ---- activation quantizers (bit-identical to quant.c's) ---------------- */

/* Non-finite lanes to 0, as quant.c's block_load. */
static inline __m256 load_finite(const float *p) {
    const __m256 v = _mm256_loadu_ps(p);
    const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
    return _mm256_and_ps(v, _mm256_cmp_ps(a, _mm256_set1_ps(INFINITY), _CMP_LT_OQ));
}

/* roundf (half away from zero) of each lane, as int32: |v| = f + frac,
 * rounded = f + floor(2 frac), exact in float. */
static inline __m256i round_away(__m256 v) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 a = _mm256_andnot_ps(sign, v);
    const __m256 f = _mm256_floor_ps(a);
    const __m256 r = _mm256_add_ps(f, _mm256_floor_ps(_mm256_add_ps(_mm256_sub_ps(a, f), _mm256_sub_ps(a, f))));
    return _mm256_cvttps_epi32(_mm256_or_ps(r, _mm256_and_ps(sign, v)));
}

/* 32 int32 (4 vectors, in order) to 32 int8 with saturation. */
static inline __m256i pack_i8(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
    const __m256i p = _mm256_packs_epi16(ab, cd);
    return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

static float absmax32(const __m256 *v) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
    m = _mm256_max_ps(m, _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* The 32 values at x scaled by s, rounded, stored as int8 at q. */
static inline void scale_round_store(const __m256 *v, float s, int8_t *q) {
    const __m256 sv = _mm256_set1_ps(s);
    const __m256i p = pack_i8(round_away(_mm256_mul_ps(v[0], sv)), round_away(_mm256_mul_ps(v[1], sv)),
                              round_away(_mm256_mul_ps(v[2], sv)), round_away(_mm256_mul_ps(v[3], sv)));
    _mm256_storeu_si256((__m256i *)q, p);
}

static void quantize_q8_0_avx2(int64_t n, const float *x, void *dst) {
    block_q8_0 *y = dst;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        __m256 v[4];
        for (int k = 0; k < 4; k++) v[k] = load_finite(x + i * QK8_0 + 8 * k);
        const float d = absmax32(v) / 127.0f, id = quant_inv_scale(d);
        y[i].d = f32_to_f16(d);
        scale_round_store(v, id, y[i].qs);
    }
}

static void quantize_q8_K_avx2(int64_t n, const float *x, void *dst) {
    block_q8_K *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float *xb = x + i * QK_K;
        __m256 v[32];
        float amax = 0.0f;
        for (int k = 0; k < 32; k++) v[k] = load_finite(xb + 8 * k);
        for (int k = 0; k < 32; k += 4) amax = fmaxf(amax, absmax32(v + k));
        memset(&y[i], 0, sizeof(y[i]));
        if (amax == 0.0f) continue;
        float max = 0.0f; /* the first value of largest magnitude, with its sign */
        for (int j = 0; j < QK_K; j++)
            if (fabsf(xb[j]) == amax) {
                max = xb[j];
                break;
            }
        const float iscale = -127.0f * quant_inv_scale(max);
        if (iscale == 0.0f) continue; /* subnormal block: zeros, as quant.c */
        for (int k = 0; k < 32; k += 4) scale_round_store(v + k, iscale, y[i].qs + 8 * k);
        for (int j = 0; j < QK_K; j++) y[i].bsums[j / 16] = (int16_t)(y[i].bsums[j / 16] + y[i].qs[j]);
        y[i].d = 1.0f / iscale;
    }
}

/* ---- axpy: y += a * row (sparse down) ------------------------------------ */

static void axpy_f32_avx2(int64_t n, float a, const void *w, float *y) {
    const float *v = w;
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(v + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * v[i];
}

/* Four outputs: each element as axpy_f32_avx2 computes it. */
static void axpy_f32_4y_avx2(int64_t n, const float a[4], const float *v, float *y, uint64_t y_stride) {
    const __m256 va[4] = {_mm256_set1_ps(a[0]), _mm256_set1_ps(a[1]), _mm256_set1_ps(a[2]), _mm256_set1_ps(a[3])};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 vv = _mm256_loadu_ps(v + i);
        for (int k = 0; k < 4; k++) {
            float *yk = y + k * y_stride + i;
            _mm256_storeu_ps(yk, _mm256_fmadd_ps(va[k], vv, _mm256_loadu_ps(yk)));
        }
    }
    for (; i < n; i++)
        for (int k = 0; k < 4; k++) y[k * y_stride + i] += a[k] * v[i];
}

/* Four inputs, two accumulators each (8 of the 16 registers). */
static void dot_f32_4x_avx2(int64_t n, const float *w, const float *x, uint64_t x_stride, float out[4]) {
    __m256 acc[4][2];
    for (int k = 0; k < 4; k++) acc[k][0] = acc[k][1] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 w0 = _mm256_loadu_ps(w + i), w1 = _mm256_loadu_ps(w + i + 8);
        for (int k = 0; k < 4; k++) {
            acc[k][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k * x_stride + i), acc[k][0]);
            acc[k][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k * x_stride + i + 8), acc[k][1]);
        }
    }
    for (; i + 8 <= n; i += 8) {
        const __m256 w0 = _mm256_loadu_ps(w + i);
        for (int k = 0; k < 4; k++) acc[k][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k * x_stride + i), acc[k][0]);
    }
    for (int k = 0; k < 4; k++) {
        float s = hsum256(_mm256_add_ps(acc[k][0], acc[k][1]));
        for (int64_t j = i; j < n; j++) s += w[j] * x[k * x_stride + j];
        out[k] = s;
    }
}

static void axpy_f16_avx2(int64_t n, float a, const void *w, float *y) {
    const f16_t *v = w;
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, LOAD_F16(v + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * f16_to_f32(v[i]);
}

/* y[0..8) += d * (8 signed or unsigned bytes at q, minus off) */
#define AXPY8(y, d, q8, off)                                                                       \
    _mm256_storeu_ps((y), _mm256_fmadd_ps((d), _mm256_sub_ps(_mm256_cvtepi32_ps(q8), (off)),       \
                                          _mm256_loadu_ps(y)))

static void axpy_q8_0_avx2(int64_t n, float a, const void *w, float *y) {
    const block_q8_0 *b = w;
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t k = 0; k < n / QK8_0; k++, y += QK8_0) {
        const __m256 d = _mm256_set1_ps(a * f16s(b[k].d));
        const __m128i q0 = _mm_loadu_si128((const __m128i *)b[k].qs);
        const __m128i q1 = _mm_loadu_si128((const __m128i *)(b[k].qs + 16));
        AXPY8(y, d, _mm256_cvtepi8_epi32(q0), zero);
        AXPY8(y + 8, d, _mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8)), zero);
        AXPY8(y + 16, d, _mm256_cvtepi8_epi32(q1), zero);
        AXPY8(y + 24, d, _mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8)), zero);
    }
}

/* q4_0: byte j holds element j (low nibble) and j + 16 (high), both +8 */
static void axpy_q4_0_avx2(int64_t n, float a, const void *w, float *y) {
    const block_q4_0 *b = w;
    const __m128i m4 = _mm_set1_epi8(0x0f);
    const __m256 eight = _mm256_set1_ps(8.0f);
    for (int64_t k = 0; k < n / QK4_0; k++, y += QK4_0) {
        const __m256 d = _mm256_set1_ps(a * f16s(b[k].d));
        const __m128i q = _mm_loadu_si128((const __m128i *)b[k].qs);
        const __m128i lo = _mm_and_si128(q, m4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
        AXPY8(y, d, _mm256_cvtepu8_epi32(lo), eight);
        AXPY8(y + 8, d, _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), eight);
        AXPY8(y + 16, d, _mm256_cvtepu8_epi32(hi), eight);
        AXPY8(y + 24, d, _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), eight);
    }
}

/* Four rows in one pass over y: y is loaded and stored once per block for
 * the four rows (the single-row axpy moves y through the registers once
 * per row). Each row's term is one fma, rows in order. */
/* axpy4's next: the line of each next row at this offset (bytes into the row) */
static inline void prefetch_next4(const void *const next[4], uint64_t off) {
    for (int r = 0; r < 4; r++) _mm_prefetch((const char *)next[r] + off, _MM_HINT_T0);
}

static void axpy4_f32_avx2(int64_t n, const float a[4], const void *const w[4], float *y,
                           const void *const next[4]) {
    const float *v0 = w[0], *v1 = w[1], *v2 = w[2], *v3 = w[3];
    const __m256 a0 = _mm256_set1_ps(a[0]), a1 = _mm256_set1_ps(a[1]), a2 = _mm256_set1_ps(a[2]),
                 a3 = _mm256_set1_ps(a[3]);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        if (next && (i & 15) == 0) prefetch_next4(next, (uint64_t)i * 4);
        __m256 acc = _mm256_fmadd_ps(a0, _mm256_loadu_ps(v0 + i), _mm256_loadu_ps(y + i));
        acc = _mm256_fmadd_ps(a1, _mm256_loadu_ps(v1 + i), acc);
        acc = _mm256_fmadd_ps(a2, _mm256_loadu_ps(v2 + i), acc);
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a3, _mm256_loadu_ps(v3 + i), acc));
    }
    for (; i < n; i++) y[i] = y[i] + a[0] * v0[i] + a[1] * v1[i] + a[2] * v2[i] + a[3] * v3[i];
}

static void axpy4_f16_avx2(int64_t n, const float a[4], const void *const w[4], float *y,
                           const void *const next[4]) {
    const f16_t *v0 = w[0], *v1 = w[1], *v2 = w[2], *v3 = w[3];
    const __m256 a0 = _mm256_set1_ps(a[0]), a1 = _mm256_set1_ps(a[1]), a2 = _mm256_set1_ps(a[2]),
                 a3 = _mm256_set1_ps(a[3]);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        if (next && (i & 31) == 0) prefetch_next4(next, (uint64_t)i * 2);
        __m256 acc = _mm256_fmadd_ps(a0, LOAD_F16(v0 + i), _mm256_loadu_ps(y + i));
        acc = _mm256_fmadd_ps(a1, LOAD_F16(v1 + i), acc);
        acc = _mm256_fmadd_ps(a2, LOAD_F16(v2 + i), acc);
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a3, LOAD_F16(v3 + i), acc));
    }
    for (; i < n; i++)
        y[i] = y[i] + a[0] * f16_to_f32(v0[i]) + a[1] * f16_to_f32(v1[i]) + a[2] * f16_to_f32(v2[i]) +
               a[3] * f16_to_f32(v3[i]);
}

/* acc[0..4) (32 floats) += d * (32 signed bytes: q0 holds 0..15, q1 16..31) */
static inline void fma32_i8(__m256 acc[4], __m256 d, __m128i q0, __m128i q1) {
    acc[0] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0)), acc[0]);
    acc[1] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8))), acc[1]);
    acc[2] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1)), acc[2]);
    acc[3] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8))), acc[3]);
}

static inline void load32(__m256 acc[4], const float *y) {
    for (int k = 0; k < 4; k++) acc[k] = _mm256_loadu_ps(y + 8 * k);
}

static inline void store32(float *y, const __m256 acc[4]) {
    for (int k = 0; k < 4; k++) _mm256_storeu_ps(y + 8 * k, acc[k]);
}

static void axpy4_q8_0_avx2(int64_t n, const float a[4], const void *const w[4], float *y,
                            const void *const next[4]) {
    const block_q8_0 *b[4] = {w[0], w[1], w[2], w[3]};
    for (int64_t k = 0; k < n / QK8_0; k++, y += QK8_0) {
        if (next) prefetch_next4(next, (uint64_t)k * sizeof(block_q8_0)); /* 34 bytes a block */
        __m256 acc[4];
        load32(acc, y);
        for (int r = 0; r < 4; r++) {
            const __m256 d = _mm256_set1_ps(a[r] * f16s(b[r][k].d));
            fma32_i8(acc, d, _mm_loadu_si128((const __m128i *)b[r][k].qs),
                     _mm_loadu_si128((const __m128i *)(b[r][k].qs + 16)));
        }
        store32(y, acc);
    }
}

/* q4_0: the nibbles minus 8 as signed bytes (exact), then as q8_0 */
static void axpy4_q4_0_avx2(int64_t n, const float a[4], const void *const w[4], float *y,
                            const void *const next[4]) {
    const block_q4_0 *b[4] = {w[0], w[1], w[2], w[3]};
    const __m128i m4 = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
    for (int64_t k = 0; k < n / QK4_0; k++, y += QK4_0) {
        if (next && (k & 1) == 0) prefetch_next4(next, (uint64_t)k * sizeof(block_q4_0)); /* 36 bytes */
        __m256 acc[4];
        load32(acc, y);
        for (int r = 0; r < 4; r++) {
            const __m256 d = _mm256_set1_ps(a[r] * f16s(b[r][k].d));
            const __m128i q = _mm_loadu_si128((const __m128i *)b[r][k].qs);
            const __m128i lo = _mm_sub_epi8(_mm_and_si128(q, m4), eight);
            const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m4), eight);
            fma32_i8(acc, d, lo, hi);
        }
        store32(y, acc);
    }
}

static const struct cpu_kernels kernels_avx2 = {
    .name = "avx2",
    .dot_f32_4x = dot_f32_4x_avx2,
    .axpy_f32_4y = axpy_f32_4y_avx2,
    .dot = {[DTYPE_F32] = dot_f32_avx2, [DTYPE_F16] = dot_f16_avx2, [DTYPE_BF16] = dot_bf16_avx2},
    .to_f32 = {[DTYPE_F16] = to_f32_f16_avx2},
    .dot_q = {[DTYPE_Q4_0] = dot_q4_0_avx2, [DTYPE_Q4_1] = dot_q4_1_avx2, [DTYPE_Q5_0] = dot_q5_0_avx2,
              [DTYPE_Q5_1] = dot_q5_1_avx2, [DTYPE_Q8_0] = dot_q8_0_avx2, [DTYPE_Q2_K] = dot_q2_K_avx2,
              [DTYPE_Q3_K] = dot_q3_K_avx2, [DTYPE_Q4_K] = dot_q4_K_avx2, [DTYPE_Q5_K] = dot_q5_K_avx2,
              [DTYPE_Q6_K] = dot_q6_K_avx2},
    .dot_q_x4 = {[DTYPE_Q4_0] = dot_q4_0_x4_avx2, [DTYPE_Q8_0] = dot_q8_0_x4_avx2, [DTYPE_Q4_K] = dot_q4_K_x4_avx2,
                 [DTYPE_Q6_K] = dot_q6_K_x4_avx2},
    .dot_q_2x1 = {[DTYPE_Q4_0] = dot_q4_0_2x1_avx2, [DTYPE_Q8_0] = dot_q8_0_2x1_avx2, [DTYPE_Q4_K] = dot_q4_K_2x1_avx2,
                  [DTYPE_Q6_K] = dot_q6_K_2x1_avx2},
    .dot_q_2x4 = {[DTYPE_Q4_0] = dot_q4_0_2x4_avx2, [DTYPE_Q8_0] = dot_q8_0_2x4_avx2, [DTYPE_Q4_K] = dot_q4_K_2x4_avx2,
                  [DTYPE_Q6_K] = dot_q6_K_2x4_avx2},
    .dot_q_xi = {[DTYPE_Q4_0] = dot_q4_0_xi, [DTYPE_Q8_0] = dot_q8_0_xi},
    .dot_q_xi_rows = {[DTYPE_Q4_0] = dot_q4_0_xi_rows, [DTYPE_Q8_0] = dot_q8_0_xi_rows},
    .dot_q_next = {[DTYPE_Q4_0] = dot_q4_0_next_avx2, [DTYPE_Q8_0] = dot_q8_0_next_avx2,
                   [DTYPE_Q4_K] = dot_q4_K_next_avx2, [DTYPE_Q6_K] = dot_q6_K_next_avx2},
    .gemm = {[DTYPE_Q4_0] = gemm_q4_0_avx2, [DTYPE_Q8_0] = gemm_q8_0_avx2, [DTYPE_Q4_K] = gemm_q4_K_avx2,
             [DTYPE_Q6_K] = gemm_q6_K_avx2},
    .gemv_x8 = {[DTYPE_Q4_0] = gemv_x8_q4_0, [DTYPE_Q4_K] = gemv_x8_q4_K},
    .gemm_x8 = {[DTYPE_Q4_0] = gemm_x8_q4_0, [DTYPE_Q4_K] = gemm_x8_q4_K_avx2},
    .quantize = {[DTYPE_Q8_0] = quantize_q8_0_avx2, [DTYPE_Q8_K] = quantize_q8_K_avx2},
    .axpy = {[DTYPE_F32] = axpy_f32_avx2, [DTYPE_F16] = axpy_f16_avx2, [DTYPE_Q8_0] = axpy_q8_0_avx2,
             [DTYPE_Q4_0] = axpy_q4_0_avx2},
    .axpy4 = {[DTYPE_F32] = axpy4_f32_avx2, [DTYPE_F16] = axpy4_f16_avx2, [DTYPE_Q8_0] = axpy4_q8_0_avx2,
              [DTYPE_Q4_0] = axpy4_q4_0_avx2},
};

const struct cpu_kernels *cpu_kernels_avx2(void) { return cpu_has_avx2_fma_f16c() ? &kernels_avx2 : NULL; }
