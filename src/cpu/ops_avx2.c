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

/* Two blocks per step into two accumulators: the FMA chains overlap. */
static float dot_q4_0_avx2(int64_t n, const void *w, const void *xq) {
    const block_q4_0 *a = w;
    const block_q8_0 *b = xq;
    const int64_t nb = n / QK4_0;
    const __m256i off = _mm256_set1_epi8(8);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        const __m256i w0 = _mm256_sub_epi8(nibbles32(a[i].qs), off);
        const __m256i w1 = _mm256_sub_epi8(nibbles32(a[i + 1].qs), off);
        const __m256i p0 = dot_i8(w0, _mm256_loadu_si256((const __m256i *)b[i].qs));
        const __m256i p1 = dot_i8(w1, _mm256_loadu_si256((const __m256i *)b[i + 1].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(f16s(a[i].d) * f16s(b[i].d)), _mm256_cvtepi32_ps(p0), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(f16s(a[i + 1].d) * f16s(b[i + 1].d)), _mm256_cvtepi32_ps(p1), acc1);
    }
    for (; i < nb; i++) {
        const __m256i p0 = dot_i8(_mm256_sub_epi8(nibbles32(a[i].qs), off), _mm256_loadu_si256((const __m256i *)b[i].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(f16s(a[i].d) * f16s(b[i].d)), _mm256_cvtepi32_ps(p0), acc0);
    }
    return hsum256(_mm256_add_ps(acc0, acc1));
}

/* 4 input rows per pass over a weight row of 32-value blocks with one f16
 * scale (q4_0, q8_0): each block's signed weights are unpacked once. Per row
 * the blocks go to the two accumulators of the one-row kernels (even, odd;
 * an odd last block to the even one), so the sums are the same bits. */
#define DOT_X4_STEP(I, SLOT)                                                                  \
    do {                                                                                      \
        const __m256i wv = LOAD_W(a, I);                                                      \
        const __m256i wabs = _mm256_sign_epi8(wv, wv);                                        \
        const float da = f16s(a[I].d);                                                        \
        for (int k = 0; k < 4; k++) {                                                         \
            const block_q8_0 *b = (const block_q8_0 *)((const char *)xq + k * xq_stride) + (I); \
            const __m256i xv = _mm256_loadu_si256((const __m256i *)b->qs);                    \
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, wv)), \
                                                _mm256_set1_epi16(1));                        \
            acc[k][SLOT] = _mm256_fmadd_ps(_mm256_set1_ps(da * f16s(b->d)), _mm256_cvtepi32_ps(p), acc[k][SLOT]); \
        }                                                                                     \
    } while (0)

#define DOT_X4_BODY(BLOCK_T)                                                                  \
    const BLOCK_T *a = w;                                                                     \
    const int64_t nb = n / 32;                                                                \
    __m256 acc[4][2];                                                                         \
    for (int k = 0; k < 4; k++) acc[k][0] = acc[k][1] = _mm256_setzero_ps();                 \
    int64_t i = 0;                                                                            \
    for (; i + 2 <= nb; i += 2) {                                                             \
        DOT_X4_STEP(i, 0);                                                                    \
        DOT_X4_STEP(i + 1, 1);                                                                \
    }                                                                                         \
    if (i < nb) DOT_X4_STEP(i, 0);                                                            \
    for (int k = 0; k < 4; k++) out[k] = hsum256(_mm256_add_ps(acc[k][0], acc[k][1]));

static void dot_q4_0_x4_avx2(int64_t n, const void *w, const void *xq, uint64_t xq_stride, float out[4]) {
    const __m256i off = _mm256_set1_epi8(8);
#define LOAD_W(A, I) _mm256_sub_epi8(nibbles32((A)[I].qs), off)
    DOT_X4_BODY(block_q4_0)
#undef LOAD_W
}

static void dot_q8_0_x4_avx2(int64_t n, const void *w, const void *xq, uint64_t xq_stride, float out[4]) {
#define LOAD_W(A, I) _mm256_loadu_si256((const __m256i *)(A)[I].qs)
    DOT_X4_BODY(block_q8_0)
#undef LOAD_W
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

static float dot_q8_0_avx2(int64_t n, const void *w, const void *xq) {
    const block_q8_0 *a = w;
    const block_q8_0 *b = xq;
    const int64_t nb = n / QK8_0;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        const __m256i p0 = dot_i8(_mm256_loadu_si256((const __m256i *)a[i].qs), _mm256_loadu_si256((const __m256i *)b[i].qs));
        const __m256i p1 = dot_i8(_mm256_loadu_si256((const __m256i *)a[i + 1].qs),
                                  _mm256_loadu_si256((const __m256i *)b[i + 1].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(f16s(a[i].d) * f16s(b[i].d)), _mm256_cvtepi32_ps(p0), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(f16s(a[i + 1].d) * f16s(b[i + 1].d)), _mm256_cvtepi32_ps(p1), acc1);
    }
    for (; i < nb; i++) {
        const __m256i p0 = dot_i8(_mm256_loadu_si256((const __m256i *)a[i].qs), _mm256_loadu_si256((const __m256i *)b[i].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(f16s(a[i].d) * f16s(b[i].d)), _mm256_cvtepi32_ps(p0), acc0);
    }
    return hsum256(_mm256_add_ps(acc0, acc1));
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

static float dot_q4_K_avx2(int64_t n, const void *w, const void *xq) {
    return dot_k4_avx2(n / QK_K, w, sizeof(block_q4_K), xq, false);
}

static float dot_q5_K_avx2(int64_t n, const void *w, const void *xq) {
    return dot_k4_avx2(n / QK_K, w, sizeof(block_q5_K), xq, true);
}

/* q6_k: half h of 128 values; group s of 32 takes nibble s / 2 of ql bytes
 * 64h + 32(s % 2) + l and bits 2s of qh bytes 32h + l; two scales per
 * group (16 values each). The -32 offset is applied once per block through
 * the activation sums: sum (q - 32) x = sum q x - 32 sum x. */
static float dot_q6_K_avx2(int64_t n, const void *w, const void *xq) {
    const block_q6_K *a = w;
    const block_q8_K *b = xq;
    const __m256i m4 = _mm256_set1_epi8(0xF), m2 = _mm256_set1_epi8(3);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        int32_t osum = 0;
        for (int j = 0; j < 16; j++) osum += a[i].scales[j] * b[i].bsums[j];
        __m256i isum = _mm256_setr_epi32(-32 * osum, 0, 0, 0, 0, 0, 0, 0);
        for (int h = 0; h < 2; h++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(a[i].ql + 64 * h));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(a[i].ql + 64 * h + 32));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(a[i].qh + 32 * h));
            __m256i q[4];
            q[0] = _mm256_and_si256(l0, m4);
            q[1] = _mm256_and_si256(l1, m4);
            q[2] = _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4);
            q[3] = _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4);
            for (int s = 0; s < 4; s++) {
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * s), m2);
                const __m256i qs = _mm256_or_si256(q[s], _mm256_slli_epi16(hi, 4));
                const __m256i x = _mm256_loadu_si256((const __m256i *)(b[i].qs + 128 * h + 32 * s));
                const __m256i sc = scales16(a[i].scales[8 * h + 2 * s], a[i].scales[8 * h + 2 * s + 1]);
                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(qs, x), sc));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(b[i].d * f16s(a[i].d)), _mm256_cvtepi32_ps(isum), acc);
    }
    return hsum256(acc);
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
        const __m256 d = _mm256_set1_ps(a * f16_to_f32(b[k].d));
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
        const __m256 d = _mm256_set1_ps(a * f16_to_f32(b[k].d));
        const __m128i q = _mm_loadu_si128((const __m128i *)b[k].qs);
        const __m128i lo = _mm_and_si128(q, m4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
        AXPY8(y, d, _mm256_cvtepu8_epi32(lo), eight);
        AXPY8(y + 8, d, _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), eight);
        AXPY8(y + 16, d, _mm256_cvtepu8_epi32(hi), eight);
        AXPY8(y + 24, d, _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), eight);
    }
}

static const struct cpu_kernels kernels_avx2 = {
    .name = "avx2",
    .dot = {[DTYPE_F32] = dot_f32_avx2, [DTYPE_F16] = dot_f16_avx2, [DTYPE_BF16] = dot_bf16_avx2},
    .to_f32 = {[DTYPE_F16] = to_f32_f16_avx2},
    .dot_q = {[DTYPE_Q4_0] = dot_q4_0_avx2, [DTYPE_Q4_1] = dot_q4_1_avx2, [DTYPE_Q5_0] = dot_q5_0_avx2,
              [DTYPE_Q5_1] = dot_q5_1_avx2, [DTYPE_Q8_0] = dot_q8_0_avx2, [DTYPE_Q2_K] = dot_q2_K_avx2,
              [DTYPE_Q3_K] = dot_q3_K_avx2, [DTYPE_Q4_K] = dot_q4_K_avx2, [DTYPE_Q5_K] = dot_q5_K_avx2,
              [DTYPE_Q6_K] = dot_q6_K_avx2},
    .dot_q_x4 = {[DTYPE_Q4_0] = dot_q4_0_x4_avx2, [DTYPE_Q8_0] = dot_q8_0_x4_avx2},
    .quantize = {[DTYPE_Q8_0] = quantize_q8_0_avx2, [DTYPE_Q8_K] = quantize_q8_K_avx2},
    .axpy = {[DTYPE_F32] = axpy_f32_avx2, [DTYPE_F16] = axpy_f16_avx2, [DTYPE_Q8_0] = axpy_q8_0_avx2,
             [DTYPE_Q4_0] = axpy_q4_0_avx2},
};

const struct cpu_kernels *cpu_kernels_avx2(void) { return cpu_has_avx2_fma_f16c() ? &kernels_avx2 : NULL; }
