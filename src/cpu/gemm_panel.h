/*
 * gemm_panel.h - the prompt GEMM (ops.h's cpu_gemm_fn) for q4_0 and q8_0
 * weights, written once for ops_avx2.c and ops_avx512.c (include it only
 * from files compiled with AVX2): the repacked weight panel, and the
 * micro-tiles over it; and the kernels on the x8 panels made at load
 * (ops.h): gemm_x8_q4_0 (the GEMM's panel unpacked from one), gemv_x8_q4_0
 * and gemv_x8_q4_K (decode), static in each includer. The includer first
 * defines the integer step, gemm_acc(q8, s, wq, |wq|, xb): s plus the
 * 4-value dots of 8 rows (wq) with an input's broadcast 4 bytes (xb), and
 * gemm_block_sum(q8, s): a block's int32 sums from s.
 *
 * Layout, per 32-value block of 8 weight rows (288 bytes):
 *   float d[8]         the rows' scales
 *   uint8_t q[8][32]   q[g][4r + j] = value 4g + j of row r
 * One 32-byte load of q[g] holds 4 values of each row, one row per int32
 * lane; an input's 4 bytes 4g..4g+3 broadcast to all lanes then give, per
 * lane, the 4-value dot of one row (maddubs + madd, or vpdpbusd): 8 rows'
 * sums in one vector, scaled by one FMA with d[] and no horizontal sums.
 * q4_0 keeps its nibbles 0..15 (the -8 goes through the input block's
 * sum: cpu_gemm_xblock.m8), q8_0 its signed bytes.
 */
#ifndef OPTIML_CPU_GEMM_PANEL_H
#define OPTIML_CPU_GEMM_PANEL_H

#include "cpu/ops.h"
#include "quant.h"

#include <immintrin.h>
#include <string.h>

struct gemm_block {
    float d[8];
    uint8_t q[8][32];
};

/* 8x8 int32 transpose: lane g of r[k] goes to lane k of r[g]. */
static inline void gemm_transpose8(__m256i r[8]) {
    __m256i t[8], u[8];
    for (int k = 0; k < 4; k++) {
        t[2 * k] = _mm256_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm256_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
    }
    for (int h = 0; h < 2; h++) { /* rows 4h..4h+3 */
        u[4 * h + 0] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
        u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
    }
    for (int g = 0; g < 4; g++) {
        r[g] = _mm256_permute2x128_si256(u[g], u[4 + g], 0x20);
        r[g + 4] = _mm256_permute2x128_si256(u[g], u[4 + g], 0x31);
    }
}

/* The 32 values of block i of row k, in order, as bytes. */
static inline __m256i gemm_block_bytes(bool q8, const void *w, uint64_t w_stride, int k, int64_t i, float *d) {
    const char *row = (const char *)w + (uint64_t)k * w_stride;
    if (q8) {
        const block_q8_0 *a = (const block_q8_0 *)row + i;
        *d = _cvtsh_ss(a->d);
        return _mm256_loadu_si256((const __m256i *)a->qs);
    }
    const block_q4_0 *a = (const block_q4_0 *)row + i;
    *d = _cvtsh_ss(a->d);
    const __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)a->qs));
    return _mm256_and_si256(_mm256_srlv_epi64(t, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0xF));
}

/* Repack n_rows (1..8) rows of nb blocks into p; missing rows are zeros. */
static inline void gemm_pack_q0(bool q8, int64_t nb, const void *w, uint64_t w_stride, int n_rows,
                                struct gemm_block *p) {
    for (int64_t i = 0; i < nb; i++) {
        __m256i r[8];
        for (int k = 0; k < 8; k++) {
            if (k < n_rows) {
                r[k] = gemm_block_bytes(q8, w, w_stride, k, i, &p[i].d[k]);
            } else {
                r[k] = _mm256_setzero_si256();
                p[i].d[k] = 0.0f;
            }
        }
        gemm_transpose8(r);
        for (int g = 0; g < 8; g++) _mm256_store_si256((__m256i *)p[i].q[g], r[g]);
    }
}

/* The panel of 8 q4_0 rows already in the x8 layout (cpu/ops.h): the low
 * nibbles of its q[g] are the panel's group g, the high ones group g + 4;
 * the scales as f32. The same panel, bit for bit, as gemm_pack_q0 makes
 * from the 8 rows. */
static inline void gemm_pack_x8_q4_0(int64_t nb, const struct cpu_x8_q4_0 *src, struct gemm_block *p) {
    const __m256i m4 = _mm256_set1_epi8(0xF);
    for (int64_t i = 0; i < nb; i++) {
        _mm256_store_ps(p[i].d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)src[i].d)));
        for (int g = 0; g < 4; g++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)src[i].q[g]);
            _mm256_store_si256((__m256i *)p[i].q[g], _mm256_and_si256(v, m4));
            _mm256_store_si256((__m256i *)p[i].q[g + 4], _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
        }
    }
}

/* y[0..n_rows) as 8 lanes (0 past n_rows), and back. */
static inline __m256 gemm_load8(const float *y, int n_rows) {
    if (n_rows == 8) return _mm256_loadu_ps(y);
    float tmp[8] = {0};
    for (int r = 0; r < n_rows; r++) tmp[r] = y[r];
    return _mm256_loadu_ps(tmp);
}

static inline void gemm_store8(float *y, __m256 v, int n_rows) {
    if (n_rows == 8) {
        _mm256_storeu_ps(y, v);
        return;
    }
    float tmp[8];
    _mm256_storeu_ps(tmp, v);
    for (int r = 0; r < n_rows; r++) y[r] = tmp[r];
}

/* The 4 input bytes 4g..4g+3 of q8_0 block i of input row x, in every lane. */
static inline __m256i gemm_x4(const void *x, int64_t i, int g) {
    int32_t v;
    memcpy(&v, ((const block_q8_0 *)x + i)->qs + 4 * g, 4);
    return _mm256_set1_epi32(v);
}

/* A micro-tile of 8 rows x T inputs (T <= GEMM_T: 4 in AVX2's 16
 * registers, the includer's choice where it has more), blocks [i0, i1): T
 * float accumulators (one lane per row) and T integer ones.
 * q4_0: v = dx (sum - 8 sum x) as dx sum + m8 (exact m8, one rounding). */
#ifndef GEMM_T
#define GEMM_T 4
#endif
#define TILE_T for (int t = 0; t < T; t++)
static inline __attribute__((always_inline)) void gemm_tile_q0(const int T, const bool Q8, int64_t i0, int64_t i1,
                                                               const struct gemm_block *p, const char *xq, uint64_t xs,
                                                               const struct cpu_gemm_xblock *xi, int64_t nb,
                                                               __m256 *acc) {
    for (int64_t i = i0; i < i1; i++) {
        __m256i s[GEMM_T];
        TILE_T s[t] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int g = 0; g < 8; g++) {
            const __m256i wq = _mm256_load_si256((const __m256i *)p[i].q[g]);
            const __m256i wa = Q8 ? _mm256_sign_epi8(wq, wq) : wq;
#pragma GCC unroll 8
            TILE_T {
                s[t] = gemm_acc(Q8, s[t], wq, wa, gemm_x4(xq + t * xs, i, g));
                /* keeps each sum a chain: gcc otherwise regroups the 8
                 * terms into trees whose partial sums spill (2x slower) */
                __asm__("" : "+v"(s[t]));
            }
        }
        const __m256 dw = _mm256_load_ps(p[i].d);
#pragma GCC unroll 8
        TILE_T {
            const struct cpu_gemm_xblock *b = xi + t * nb + i;
            const __m256 dx = _mm256_set1_ps(b->d), si = _mm256_cvtepi32_ps(gemm_block_sum(Q8, s[t]));
            const __m256 v = Q8 ? _mm256_mul_ps(dx, si) : _mm256_fmadd_ps(dx, si, _mm256_set1_ps(b->m8));
            acc[t] = _mm256_fmadd_ps(dw, v, acc[t]);
        }
    }
}

/* Blocks [i0, i1) of inputs [t0, t0 + T), added to y (load_y) or not. */
static inline __attribute__((always_inline)) void gemm_tokens_q0(const int T, const bool Q8, int64_t i0, int64_t i1,
                                                                 const struct gemm_block *p, const char *xq,
                                                                 uint64_t xs, const struct cpu_gemm_xblock *xi,
                                                                 int64_t nb, int64_t t0, float *y, uint64_t ys,
                                                                 int n_rows, bool load_y) {
    __m256 acc[GEMM_T];
    TILE_T acc[t] = load_y ? gemm_load8(y + (t0 + t) * ys, n_rows) : _mm256_setzero_ps();
    gemm_tile_q0(T, Q8, i0, i1, p, xq + t0 * xs, xs, xi + t0 * nb, nb, acc);
    TILE_T gemm_store8(y + (t0 + t) * ys, acc[t], n_rows);
}

/* Inputs in chunks of GEMM_TOKENS, blocks in chunks of GEMM_BLOCKS: the
 * chunk's inputs (17 KiB) and panel blocks (9 KiB) stay in L1 while the
 * micro-tiles go over them (without it a panel of long rows times many
 * inputs ran 30-40% slower per product on a 2-core Zen 3; 16 x 32 was
 * the best of 64 x 8, 32 x 8, 32 x 16 and 16 x 32 there). */
#define GEMM_TOKENS 16
#define GEMM_BLOCKS 32
static inline void gemm_q0(const bool Q8, const bool X8, int64_t n, const void *w, uint64_t w_stride, int n_rows,
                           const void *xq, uint64_t xs, const struct cpu_gemm_xblock *xi, int64_t n_tok, float *y,
                           uint64_t ys, bool accumulate, void *panel) {
    const int64_t nb = n / 32;
    struct gemm_block *p = panel;
    if (X8)
        gemm_pack_x8_q4_0(nb, w, p);
    else
        gemm_pack_q0(Q8, nb, w, w_stride, n_rows, p);
    for (int64_t c0 = 0; c0 < n_tok; c0 += GEMM_TOKENS) {
        const int64_t c1 = c0 + GEMM_TOKENS < n_tok ? c0 + GEMM_TOKENS : n_tok;
        for (int64_t i0 = 0; i0 < nb; i0 += GEMM_BLOCKS) {
            const int64_t i1 = i0 + GEMM_BLOCKS < nb ? i0 + GEMM_BLOCKS : nb;
            const bool load_y = i0 > 0 || accumulate;
            int64_t t = c0;
            for (; t + GEMM_T <= c1; t += GEMM_T)
                gemm_tokens_q0(GEMM_T, Q8, i0, i1, p, xq, xs, xi, nb, t, y, ys, n_rows, load_y);
            if (GEMM_T > 4 && c1 - t >= 4) {
                gemm_tokens_q0(4, Q8, i0, i1, p, xq, xs, xi, nb, t, y, ys, n_rows, load_y);
                t += 4;
            }
            switch (c1 - t) {
            case 3: gemm_tokens_q0(3, Q8, i0, i1, p, xq, xs, xi, nb, t, y, ys, n_rows, load_y); break;
            case 2: gemm_tokens_q0(2, Q8, i0, i1, p, xq, xs, xi, nb, t, y, ys, n_rows, load_y); break;
            case 1: gemm_tokens_q0(1, Q8, i0, i1, p, xq, xs, xi, nb, t, y, ys, n_rows, load_y); break;
            default: break;
            }
        }
    }
}

/* The prompt GEMM (cpu_gemm_fn) on one q4_0 x8 panel (w; w_stride and
 * n_rows unused: a panel holds 8 rows). */
static void gemm_x8_q4_0(int64_t n, const void *w, uint64_t w_stride, int n_rows, const void *xq, uint64_t xs,
                         const struct cpu_gemm_xblock *xi, int64_t n_tok, float *y, uint64_t ys, bool accumulate,
                         void *panel) {
    gemm_q0(false, true, n, w, w_stride, n_rows, xq, xs, xi, n_tok, y, ys, accumulate, panel);
}

/* ---- decode on x8 panels (cpu_gemv_x8_fn) ---------------------------------
 * One panel after another: per block four 32-byte loads, two nibble masks
 * and two integer steps (gemm_acc) each, one FMA for the 8 rows' scaled
 * sums and one for their -8 terms (cpu/ops.h gives the order, which
 * gemv_x8_q4_0_ref follows), the panel read ahead by OPTIML_PREFETCH_AHEAD
 * bytes as dot_q reads a row. Two panels a step, sharing the input's
 * broadcasts, were 10% faster in cache on the dev EPYC (Zen 4) but
 * streamed 16-17 GB/s on one core against 23-26 for one panel a step (two
 * read streams instead of one; rows one at a time through dot_q_xi: 17-18). */
static void gemv_x8_q4_0(int64_t n, const void *p, int64_t n_panels, const void *xq,
                         const struct cpu_gemm_xblock *xi, float *out) {
    const int64_t nb = n / 32;
    const __m256i m4 = _mm256_set1_epi8(0xF);
    for (int64_t k = 0; k < n_panels; k++) {
        const struct cpu_x8_q4_0 *b = (const struct cpu_x8_q4_0 *)p + k * nb;
        __m256 acc = _mm256_setzero_ps(), corr = _mm256_setzero_ps();
        for (int64_t i = 0; i < nb; i++) {
            for (int o = 0; o < (int)sizeof(*b); o += 64)
                _mm_prefetch((const char *)(b + i) + OPTIML_PREFETCH_AHEAD + o, _MM_HINT_T0);
            __m256i s = _mm256_setzero_si256();
            for (int g = 0; g < 4; g++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)b[i].q[g]);
                const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                s = gemm_acc(false, s, lo, lo, gemm_x4(xq, i, g));
                s = gemm_acc(false, s, hi, hi, gemm_x4(xq, i, g + 4));
            }
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b[i].d));
            acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(xi[i].d)),
                                  _mm256_cvtepi32_ps(gemm_block_sum(false, s)), acc);
            corr = _mm256_fmadd_ps(dw, _mm256_set1_ps(xi[i].m8), corr);
        }
        _mm256_storeu_ps(out + 8 * k, _mm256_add_ps(acc, corr));
    }
}

/* The 4 bytes at off of a q8_k block's quants, in every lane. */
static inline __m256i x8_k4(const block_q8_K *x, int off) {
    int32_t v;
    memcpy(&v, x->qs + off, 4);
    return _mm256_set1_epi32(v);
}

/* q4_k (cpu/ops.h): per block and chunk c the two sub-blocks' 8-row sums
 * (8 loads, each giving both through the nibble masks), times the rows'
 * scales (int32 multiply), summed; the mins against the input's 32-value
 * sums two sub-blocks a multiply-add; then dmin's term as tile_q4_K
 * does. */
static void gemv_x8_q4_K(int64_t n, const void *p, int64_t n_panels, const void *xq,
                         const struct cpu_gemm_xblock *xi, float *out) {
    (void)xi;
    const int64_t nb = n / QK_K;
    const __m256i m4 = _mm256_set1_epi8(0xF);
    const block_q8_K *x = xq;
    for (int64_t k = 0; k < n_panels; k++) {
        const struct cpu_x8_q4_K *b = (const struct cpu_x8_q4_K *)p + k * nb;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < nb; i++) {
            for (int o = 0; o < (int)sizeof(*b); o += 64)
                _mm_prefetch((const char *)(b + i) + OPTIML_PREFETCH_AHEAD + o, _MM_HINT_T0);
            __m256i isum = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
                for (int g = 0; g < 8; g++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)b[i].q[c][g]);
                    const __m256i vl = _mm256_and_si256(v, m4), vh = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                    lo = gemm_acc(false, lo, vl, vl, x8_k4(x + i, 64 * c + 4 * g));
                    hi = gemm_acc(false, hi, vh, vh, x8_k4(x + i, 64 * c + 32 + 4 * g));
                }
                const __m256i sl = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)b[i].sc[2 * c]));
                const __m256i sh = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)b[i].sc[2 * c + 1]));
                isum = _mm256_add_epi32(isum, _mm256_add_epi32(_mm256_mullo_epi32(gemm_block_sum(false, lo), sl),
                                                               _mm256_mullo_epi32(gemm_block_sum(false, hi), sh)));
            }
            int32_t bp[4]; /* the input's 32-value sums, two sub-blocks an int32 */
            _mm_storeu_si128((__m128i *)bp, _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)x[i].bsums),
                                                           _mm_loadu_si128((const __m128i *)(x[i].bsums + 8))));
            __m256i msum = _mm256_setzero_si256();
            for (int kk = 0; kk < 4; kk++)
                msum = _mm256_add_epi32(msum, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(
                                                                    (const __m128i *)b[i].mn[kk])),
                                                                _mm256_set1_epi32(bp[kk])));
            const __m256 dx = _mm256_set1_ps(x[i].d);
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b[i].d));
            const __m256 dm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b[i].dmin));
            acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(isum), acc);
            acc = _mm256_fnmadd_ps(_mm256_mul_ps(dm, dx), _mm256_cvtepi32_ps(msum), acc);
        }
        _mm256_storeu_ps(out + 8 * k, acc);
    }
}

#undef TILE_T

#endif /* OPTIML_CPU_GEMM_PANEL_H */
