/*
 * ops_avx2.c - AVX2 + FMA + F16C kernels. This file alone is compiled with
 * -mavx2 -mfma -mf16c; cpu_kernels_avx2() checks cpuid (dispatch.c) before
 * handing them out. Each has a scalar twin in ops.c (tests/test_ops.c compares them).
 */
#include "cpu/ops.h"

#include <immintrin.h>

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

static const struct cpu_kernels kernels_avx2 = {
    .name = "avx2",
    .dot = {[DTYPE_F32] = dot_f32_avx2, [DTYPE_F16] = dot_f16_avx2, [DTYPE_BF16] = dot_bf16_avx2},
    .to_f32 = {[DTYPE_F16] = to_f32_f16_avx2},
};

const struct cpu_kernels *cpu_kernels_avx2(void) { return cpu_has_avx2_fma_f16c() ? &kernels_avx2 : NULL; }
