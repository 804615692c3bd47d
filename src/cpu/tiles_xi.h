/*
 * tiles_xi.h - dot_q_xi (cpu/ops.h) of q4_0 and q8_0, written once for
 * ops_avx2.c and ops_avx512.c. The includer defines, before including it,
 * TILE_INLINE, OPTIML_PREFETCH_AHEAD, hsum256 and xi_sums(Q8, weight
 * block, input bytes): the block's sum of w x in int32 lanes, q4_0's
 * nibbles taken unsigned (its -8 is the input summary's m8). The
 * functions are static: dot_q4_0_xi, dot_q8_0_xi and their _rows twins.
 *
 * Two blocks a step, each into its own accumulator (the fma's latency is
 * not the loop's); per block the sums times the weight scale times the
 * input's f32 scale; q4_0's -8 term (m8 = -8 dx sum x) times the weight
 * scale into a scalar, one per accumulator. The scales are scalars (F16C
 * for the weight's), one product broadcast a block: on the dev EPYC (Zen 3)
 * a 4096-value q4_0 row in cache took 193-199 ns with the scales as
 * vectors (a broadcast f16 converted, a vector multiply, the -8 term a
 * vector fma), 161-167 ns so. It asks for the bytes pf past what it reads:
 * decode's read-ahead, or the same offset of the next row.
 */
#ifndef OPTIML_CPU_TILES_XI_H
#define OPTIML_CPU_TILES_XI_H

/* one weight block wb against the input block xv (its xi scale dx and
 * -8 term m8): into ACC, and q4_0's -8 term into CORR */
#define XI_STEP(Q8, wb, xv, dx, m8, ACC, CORR)                                                                         \
    do {                                                                                                               \
        const float dw = _cvtsh_ss(Q8 ? ((const block_q8_0 *)(wb))->d : ((const block_q4_0 *)(wb))->d);                \
        if (!Q8) CORR = fmaf(dw, m8, CORR);                                                                            \
        ACC = _mm256_fmadd_ps(_mm256_set1_ps(dw * (dx)), _mm256_cvtepi32_ps(xi_sums(Q8, wb, xv)), ACC);                \
    } while (0)
/* block i of the weight row w */
#define XI_BLOCK(Q8, i, ACC, CORR)                                                                                     \
    XI_STEP(Q8, (const char *)w + (uint64_t)(i)*bs,                                                                    \
            _mm256_loadu_si256((const __m256i *)((const block_q8_0 *)xq + (i))->qs), xi[i].d, xi[i].m8, ACC, CORR)

TILE_INLINE float dot_xi(const bool Q8, int64_t n, const void *w, const void *xq, const struct cpu_gemm_xblock *xi,
                         const void *next) {
    const int64_t nb = n / 32;
    const uint64_t bs = Q8 ? sizeof(block_q8_0) : sizeof(block_q4_0);
    const uintptr_t pf = next ? (uintptr_t)next - (uintptr_t)w : OPTIML_PREFETCH_AHEAD; /* bytes past what it reads */
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float corr0 = 0.0f, corr1 = 0.0f;
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        const uintptr_t at = (uintptr_t)w + (uint64_t)i * bs + pf;
        _mm_prefetch((const char *)at, _MM_HINT_T0);
        if (Q8) _mm_prefetch((const char *)(at + 64), _MM_HINT_T0); /* 68 bytes a step */
        XI_BLOCK(Q8, i, acc0, corr0);
        XI_BLOCK(Q8, i + 1, acc1, corr1);
    }
    if (i < nb) XI_BLOCK(Q8, i, acc0, corr0);
    return hsum256(_mm256_add_ps(acc0, acc1)) + (corr0 + corr1);
}

/* n_rows rows in order (cpu_dot_q_xi_rows_fn): four a step, dot_xi's
 * block step for each with one load of the input block and its xi for
 * the four, one accumulator and one -8 scalar a row, the four sums out of
 * one reduction; the next group's bytes asked for at the step's start
 * (the rows are short, a few lines each); the last rows one at a time
 * (dot_xi). */
TILE_INLINE void rows_xi(const bool Q8, int64_t n, const void *w, uint64_t ws, int64_t n_rows, const void *xq,
                         const struct cpu_gemm_xblock *xi, float *out) {
    const int64_t nb = n / 32;
    const uint64_t bs = Q8 ? sizeof(block_q8_0) : sizeof(block_q4_0);
    int64_t r = 0;
    for (; r + 4 <= n_rows; r += 4) {
        const char *w0 = (const char *)w + (uint64_t)r * ws;
        for (uint64_t o = 0; o < 4 * ws; o += 64) _mm_prefetch(w0 + 4 * ws + o, _MM_HINT_T0);
        __m256 acc[4];
        float corr[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int k = 0; k < 4; k++) acc[k] = _mm256_setzero_ps();
        for (int64_t i = 0; i < nb; i++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)((const block_q8_0 *)xq + i)->qs);
            const float dx = xi[i].d, m8 = xi[i].m8;
            for (int k = 0; k < 4; k++) XI_STEP(Q8, w0 + k * ws + (uint64_t)i * bs, xv, dx, m8, acc[k], corr[k]);
        }
        /* lanes of h: each row's low-half sums, then its high-half ones */
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
        const __m128 sum = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(out + r, _mm_add_ps(sum, _mm_loadu_ps(corr)));
    }
    for (; r < n_rows; r++) out[r] = dot_xi(Q8, n, (const char *)w + (uint64_t)r * ws, xq, xi, NULL);
}

static void dot_q4_0_xi_rows(int64_t n, const void *w, uint64_t ws, int64_t n_rows, const void *xq,
                             const struct cpu_gemm_xblock *xi, float *out) {
    rows_xi(false, n, w, ws, n_rows, xq, xi, out);
}
static void dot_q8_0_xi_rows(int64_t n, const void *w, uint64_t ws, int64_t n_rows, const void *xq,
                             const struct cpu_gemm_xblock *xi, float *out) {
    rows_xi(true, n, w, ws, n_rows, xq, xi, out);
}

static float dot_q4_0_xi(int64_t n, const void *w, const void *xq, const struct cpu_gemm_xblock *xi, const void *next) {
    return dot_xi(false, n, w, xq, xi, next);
}
static float dot_q8_0_xi(int64_t n, const void *w, const void *xq, const struct cpu_gemm_xblock *xi, const void *next) {
    return dot_xi(true, n, w, xq, xi, next);
}

#endif
