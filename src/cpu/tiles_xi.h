/*
 * tiles_xi.h - dot_q_xi (cpu/ops.h) of q4_0 and q8_0, written once for
 * ops_avx2.c and ops_avx512.c. The includer defines, before including it,
 * TILE_INLINE, OPTIML_PREFETCH_AHEAD, hsum256 and xi_sums(Q8, weight
 * block, input bytes): the block's sum of w x in int32 lanes, q4_0's
 * nibbles taken unsigned (its -8 is the input summary's m8). The
 * functions are static: dot_q4_0_xi and dot_q8_0_xi.
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

#define XI_BLOCK(Q8, i, ACC, CORR)                                                                                     \
    do {                                                                                                               \
        const __m256i xv = _mm256_loadu_si256((const __m256i *)((const block_q8_0 *)xq + (i))->qs);                    \
        const void *wb = (const char *)w + (uint64_t)(i)*bs;                                                           \
        const float dw = _cvtsh_ss(Q8 ? ((const block_q8_0 *)wb)->d : ((const block_q4_0 *)wb)->d);                   \
        if (!Q8) CORR = fmaf(dw, xi[i].m8, CORR);                                                                      \
        const __m256 s = _mm256_cvtepi32_ps(xi_sums(Q8, wb, xv));                                                      \
        ACC = _mm256_fmadd_ps(_mm256_set1_ps(dw * xi[i].d), s, ACC);                                                   \
    } while (0)

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

static float dot_q4_0_xi(int64_t n, const void *w, const void *xq, const struct cpu_gemm_xblock *xi, const void *next) {
    return dot_xi(false, n, w, xq, xi, next);
}
static float dot_q8_0_xi(int64_t n, const void *w, const void *xq, const struct cpu_gemm_xblock *xi, const void *next) {
    return dot_xi(true, n, w, xq, xi, next);
}

#endif
