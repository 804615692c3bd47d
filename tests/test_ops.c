/*
 * test_ops.c - every SIMD kernel against its scalar reference twin on fresh
 * random inputs of several shapes, ragged lengths included. Prints the
 * largest relative difference per kernel; fails above 1e-5 (f32 sums in a
 * different order). Quantized dot products: the variant against the
 * reference (both sum each block in integers exactly; only the float
 * accumulation order differs: 1e-5 of sum |w x|), and the reference against
 * a double-precision dot of the dequantized rows (1e-5; 2e-3 for q4_1/q5_1,
 * whose activation block sum s is stored in f16, a relative error of 2^-11
 * on the min term). Activation quantizers must match the reference bytes.
 * axpy and axpy4 kernels (sparse down rows), scalar and SIMD: against the
 * rows dequantized by the reference converters, in double. The x8 panels
 * (compare_x8): layout, decode and prompt GEMM on them.
 */
#include "cpu/ops.h"
#include "quant.h"
#include "test.h"

#include <string.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

static uint64_t rng_state;
static float frand(void) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

static void fill_row(uint32_t type, void *w, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = frand();
        if (type == DTYPE_F32) ((float *)w)[i] = v;
        else if (type == DTYPE_F16) ((f16_t *)w)[i] = f32_to_f16(v);
        else ((bf16_t *)w)[i] = f32_to_bf16(v);
    }
}

static void compare(const char *name, const struct cpu_kernels *k) {
    static const int64_t sizes[] = {1, 7, 8, 31, 32, 33, 64, 100, 255, 256, 1000, 4096, 11008};
    static const uint32_t types[] = {DTYPE_F32, DTYPE_F16, DTYPE_BF16};
    const struct cpu_kernels *ref = cpu_kernels_ref();
    float *x = malloc(11008 * sizeof(float)), *a = malloc(11008 * sizeof(float)), *b = malloc(11008 * sizeof(float));
    void *w = malloc(11008 * sizeof(float));
    for (size_t ti = 0; ti < 3; ti++) {
        uint32_t t = types[ti];
        double max_rel = 0.0;
        int conv_bad = 0;
        for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
            int64_t n = sizes[si];
            for (int rep = 0; rep < 4; rep++) {
                fill_row(t, w, n);
                double sum_abs = 0.0;
                for (int64_t i = 0; i < n; i++) x[i] = frand();
                ref->to_f32[t](n, w, a);
                for (int64_t i = 0; i < n; i++) sum_abs += fabs((double)a[i] * x[i]);
                double rd = ref->dot[t](n, w, x), kd = k->dot[t](n, w, x);
                double rel = fabs(rd - kd) / (sum_abs > 1e-30 ? sum_abs : 1.0);
                if (rel > max_rel) max_rel = rel;
                k->to_f32[t](n, w, b);
                for (int64_t i = 0; i < n; i++) conv_bad += a[i] != b[i];
            }
        }
        printf("%s dot %-4s: max relative difference %.3g (tolerance 1e-5)\n", name, dtype_name(t), max_rel);
        CHECK(max_rel <= 1e-5, "%s dot %s", name, dtype_name(t));
        CHECK(conv_bad == 0, "%s to_f32 %s: %d values differ", name, dtype_name(t), conv_bad);
    }
    free(x);
    free(a);
    free(b);
    free(w);
}

/* Byte offsets of the f16 scales of a weight block (random-byte blocks get
 * sane scales there, 1e-3..1 with either sign). */
static void sane_scales(uint32_t t, uint8_t *blk) {
    int offs[2] = {-1, -1};
    switch (t) {
    case DTYPE_Q4_1: case DTYPE_Q5_1: case DTYPE_Q4_K: case DTYPE_Q5_K: offs[0] = 0; offs[1] = 2; break;
    case DTYPE_Q4_0: case DTYPE_Q5_0: case DTYPE_Q8_0: offs[0] = 0; break;
    case DTYPE_Q2_K: offs[0] = 80; offs[1] = 82; break;
    case DTYPE_Q3_K: offs[0] = 108; break;
    case DTYPE_Q6_K: offs[0] = 208; break;
    default: break;
    }
    for (int k = 0; k < 2; k++) {
        if (offs[k] < 0) continue;
        f16_t h = f32_to_f16(frand() * 0.999f + (frand() > 0 ? 0.001f : -0.001f));
        memcpy(blk + offs[k], &h, 2);
    }
}

static void compare_quant(const char *name, const struct cpu_kernels *k) {
    static const int64_t sizes[] = {32, 64, 96, 256, 512, 768, 4096, 11008};
    const struct cpu_kernels *ref = cpu_kernels_ref();
    const int64_t n_max = 11008;
    float *x = malloc(n_max * sizeof(float)), *wf = malloc(n_max * sizeof(float)), *xf = malloc(n_max * sizeof(float));
    uint8_t *w = malloc(n_max * 2), *xq = malloc(n_max * 2), *xq2 = malloc(n_max * 2);
    for (uint32_t t = 0; t < DTYPE_COUNT; t++) {
        if (!ref->dot_q[t]) continue;
        const uint32_t vt = ref->vec_dot_type[t];
        const int64_t bs = dtype_block_size(t), ts = dtype_type_size(t);
        double max_rel = 0.0, max_deq = 0.0, max_xi = 0.0;
        int n_cases = 0, xi_cases = 0, xi_next_differ = 0;
        struct cpu_gemm_xblock *xi = malloc((size_t)(n_max / 32) * sizeof(*xi));
        for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
            const int64_t n = sizes[si];
            if (n % bs) continue;
            for (int rep = 0; rep < 4; rep++) {
                if (rep < 2) { /* a quantized random row */
                    for (int64_t i = 0; i < n; i++) x[i] = frand();
                    quant_quantizer(t)(n, x, w);
                } else { /* random bytes: every bit pattern, sane scales */
                    for (int64_t i = 0; i < n / bs * ts; i++) w[i] = (uint8_t)(frand() * 128.0f + 128.0f);
                    for (int64_t b = 0; b < n / bs; b++) sane_scales(t, w + b * ts);
                }
                for (int64_t i = 0; i < n; i++) x[i] = frand() * (rep == 3 ? 100.0f : 1.0f);
                ref->quantize[vt](n, x, xq);
                ref->to_f32[t](n, w, wf);
                ref->to_f32[vt](n, xq, xf);
                double exact = 0.0, sum_abs = 0.0;
                for (int64_t i = 0; i < n; i++) {
                    exact += (double)wf[i] * xf[i];
                    sum_abs += fabs((double)wf[i] * xf[i]);
                }
                if (sum_abs < 1e-30) sum_abs = 1.0;
                const double rd = ref->dot_q[t](n, w, xq), kd = k->dot_q[t](n, w, xq);
                max_rel = fmax(max_rel, fabs(rd - kd) / sum_abs);
                if (k->dot_q_xi[t]) { /* with the input's block summaries (odd block counts too) */
                    cpu_gemm_prep_q8_0(n, xq, xi);
                    const float xd = k->dot_q_xi[t](n, w, xq, xi, NULL);
                    max_xi = fmax(max_xi, fabs(rd - xd) / sum_abs);
                    /* next (a prefetch hint): the row itself, the input, any address */
                    xi_next_differ += (k->dot_q_xi[t](n, w, xq, xi, w) != xd) +
                                      (k->dot_q_xi[t](n, w, xq, xi, xq) != xd);
                    xi_cases++;
                }
                max_deq = fmax(max_deq, fabs(rd - exact) / sum_abs);
                n_cases++;
            }
        }
        /* the tiles (1x4, 2x1, 2x4): the same bits as dot_q of this table,
         * for 1..3 blocks and a 7B row (odd block counts too) */
        int tile_differ = 0, tile_cases = 0;
        const bool has_tiles = k->dot_q_x4[t] || k->dot_q_2x1[t] || k->dot_q_2x4[t] || k->dot_q_next[t];
        for (int rep = 0; has_tiles && rep < 8; rep++) {
            const int64_t n = rep < 3 ? 4096 : rep == 3 ? 11008 / bs * bs : bs * (1 + rep % 3);
            if (n % bs || n <= 0) continue;
            uint64_t row, wrow = (uint64_t)(n / bs * ts);
            dtype_row_size(vt, (uint64_t)n, &row);
            uint8_t *w2 = malloc(2 * wrow), *x4q = malloc(4 * row);
            for (uint64_t i = 0; i < 2 * wrow; i++) w2[i] = (uint8_t)(frand() * 128.0f + 128.0f);
            for (int64_t b = 0; b < 2 * n / bs; b++) sane_scales(t, w2 + b * ts);
            if (rep == 0) quant_quantizer(t)(n, x, w2); /* one quantized row too */
            for (int r = 0; r < 4; r++) {
                for (int64_t i = 0; i < n; i++) x[i] = frand() * (r == 3 ? 50.0f : 1.0f);
                k->quantize[vt](n, x, x4q + r * row);
            }
            float want[8], out[8];
            for (int r = 0; r < 8; r++) want[r] = k->dot_q[t](n, w2 + (r / 4) * wrow, x4q + (r % 4) * row);
            if (k->dot_q_next[t]) { /* next: none, the other row, the input (any address) */
                for (int r = 0; r < 8; r++) {
                    const uint8_t *wr = w2 + (r / 4) * wrow, *other = w2 + (1 - r / 4) * wrow;
                    const void *next = r % 3 == 0 ? NULL : r % 3 == 1 ? (const void *)other : (const void *)x4q;
                    tile_differ += k->dot_q_next[t](n, wr, x4q + (r % 4) * row, next) != want[r];
                }
                tile_cases += 8;
            }
            if (k->dot_q_x4[t]) {
                for (int r = 0; r < 4; r++) out[r] = NAN; /* poison */
                k->dot_q_x4[t](n, w2, x4q, row, out);
                for (int r = 0; r < 4; r++) tile_differ += out[r] != want[r];
                tile_cases += 4;
            }
            if (k->dot_q_2x1[t]) {
                for (int tok = 0; tok < 4; tok++) {
                    out[0] = out[1] = NAN;
                    k->dot_q_2x1[t](n, w2, wrow, x4q + tok * row, row, out);
                    tile_differ += (out[0] != want[tok]) + (out[1] != want[4 + tok]);
                    tile_cases += 2;
                }
            }
            if (k->dot_q_2x4[t]) {
                for (int r = 0; r < 8; r++) out[r] = NAN;
                k->dot_q_2x4[t](n, w2, wrow, x4q, row, out); /* out[r * 4 + t] */
                for (int r = 0; r < 8; r++) tile_differ += out[r] != want[r];
                tile_cases += 8;
            }
            free(w2);
            free(x4q);
        }
        if (has_tiles) {
            printf("%s tiles %-4s (%s%s%s%s): %d of %d results differ from dot_q\n", name, dtype_name(t),
                   k->dot_q_x4[t] ? "1x4 " : "", k->dot_q_2x1[t] ? "2x1 " : "", k->dot_q_2x4[t] ? "2x4 " : "",
                   k->dot_q_next[t] ? "next" : "",
                   tile_differ, tile_cases);
            CHECK(tile_cases > 0 && tile_differ == 0, "%s tiles %s", name, dtype_name(t));
        }
        /* dot_q_xi_rows: groups of four and the rows after them, short and
         * long rows, each row against the reference dot_q within 1e-5 of
         * its sum of |products|; nothing written past n_rows */
        if (k->dot_q_xi_rows[t]) {
            static const int64_t rn[] = {32, 96, 160, 4096};
            static const int64_t rr[] = {1, 3, 4, 5, 8, 13};
            double max_rows = 0.0;
            int rows_cases = 0, past = 0;
            for (size_t a = 0; a < sizeof(rn) / sizeof(rn[0]); a++)
                for (size_t b = 0; b < sizeof(rr) / sizeof(rr[0]); b++) {
                    const int64_t n = rn[a], nr = rr[b];
                    const uint64_t wrow = (uint64_t)(n / bs * ts);
                    uint8_t *wr = malloc(nr * wrow);
                    float *out = malloc((size_t)(nr + 1) * sizeof(float));
                    for (uint64_t i = 0; i < nr * wrow; i++) wr[i] = (uint8_t)(frand() * 128.0f + 128.0f);
                    for (int64_t q = 0; q < nr * n / bs; q++) sane_scales(t, wr + q * ts);
                    for (int64_t i = 0; i < n; i++) x[i] = frand() * (b % 2 ? 30.0f : 1.0f);
                    ref->quantize[vt](n, x, xq);
                    cpu_gemm_prep_q8_0(n, xq, xi);
                    out[nr] = 12345.0f;
                    k->dot_q_xi_rows[t](n, wr, wrow, nr, xq, xi, out);
                    past += out[nr] != 12345.0f;
                    ref->to_f32[vt](n, xq, xf);
                    for (int64_t r = 0; r < nr; r++) {
                        ref->to_f32[t](n, wr + r * wrow, wf);
                        double sum_abs = 0.0;
                        for (int64_t i = 0; i < n; i++) sum_abs += fabs((double)wf[i] * xf[i]);
                        if (sum_abs < 1e-30) sum_abs = 1.0;
                        max_rows = fmax(max_rows, fabs(ref->dot_q[t](n, wr + r * wrow, xq) - out[r]) / sum_abs);
                        rows_cases++;
                    }
                    free(wr);
                    free(out);
                }
            printf("%s dot_q_xi_rows %-4s: max relative difference %.3g vs ref dot_q (tolerance 1e-5), %d rows, %d "
                   "writes past the rows\n", name, dtype_name(t), max_rows, rows_cases, past);
            CHECK(rows_cases > 0 && max_rows <= 1e-5, "%s dot_q_xi_rows %s", name, dtype_name(t));
            CHECK(past == 0, "%s dot_q_xi_rows %s wrote past its rows", name, dtype_name(t));
        }
        const double tol_deq = (t == DTYPE_Q4_1 || t == DTYPE_Q5_1) ? 2e-3 : 1e-5;
        printf("%s dot_q %-4s x %-4s: max relative difference %.3g vs ref (tolerance 1e-5), ref vs dequantized "
               "%.3g (tolerance %g), %d cases\n", name, dtype_name(t), dtype_name(vt), max_rel, max_deq, tol_deq,
               n_cases);
        CHECK(n_cases > 0 && max_rel <= 1e-5, "%s dot_q %s", name, dtype_name(t));
        if (xi_cases) {
            printf("%s dot_q_xi %-4s: max relative difference %.3g vs ref dot_q (tolerance 1e-5), %d cases, %d "
                   "differ with a next row\n", name, dtype_name(t), max_xi, xi_cases, xi_next_differ);
            CHECK(max_xi <= 1e-5, "%s dot_q_xi %s", name, dtype_name(t));
            CHECK(xi_next_differ == 0, "%s dot_q_xi %s: next changed the result", name, dtype_name(t));
        }
        free(xi);
        CHECK(max_deq <= tol_deq, "ref dot_q %s vs dequantized dot", dtype_name(t));
    }
    /* activation quantizers: identical bytes, NaN, inf and subnormals included */
    static const uint32_t acts[] = {DTYPE_Q8_0, DTYPE_Q8_1, DTYPE_Q8_K};
    for (size_t ai = 0; ai < 3; ai++) {
        const uint32_t vt = acts[ai];
        int differ = 0;
        for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
            const int64_t n = sizes[si];
            if (n % dtype_block_size(vt)) continue;
            for (int rep = 0; rep < 4; rep++) { /* rep 3: subnormal values */
                for (int64_t i = 0; i < n; i++) x[i] = frand() * (rep == 3 ? 1e-39f : rep == 2 ? 1e-3f : 10.0f);
                if (rep == 1) {
                    x[0] = NAN;
                    x[n - 1] = INFINITY;
                    for (int64_t i = 32; i < 64 && i < n; i++) x[i] = 0.0f;
                }
                uint64_t row;
                dtype_row_size(vt, (uint64_t)n, &row);
                ref->quantize[vt](n, x, xq);
                k->quantize[vt](n, x, xq2);
                differ += memcmp(xq, xq2, row) != 0;
            }
        }
        printf("%s quantize %s: %d rows differ from ref\n", name, dtype_name(vt), differ);
        CHECK(differ == 0, "%s quantize %s", name, dtype_name(vt));
    }
    free(x);
    free(wf);
    free(xf);
    free(w);
    free(xq);
    free(xq2);
}

/* The prompt GEMM (gemm[t]: 1..8 rows repacked into a panel, times n_tok
 * inputs) against cpu_gemm_ref (the reference dot_q per pair), ragged
 * shapes, y = and y +=. Both sum each block's integer products exactly;
 * they differ in the float rounding of the block scale products (a few
 * ulp) and the order of the nb block terms, so each result is within
 * 2 (nb + 4) 2^-24 (sum |w x| + |y0|) of the other (two sums of nb + 4
 * roundings each, both against the exact value). Unwritten outputs stay
 * NaN (poison), and the entries beside the tile must stay NaN. */
static int gemm_case(const struct cpu_kernels *k, uint32_t t, int64_t n, int n_rows, int64_t n_tok, bool acc,
                     double *worst) {
    const uint32_t vt = k->vec_dot_type[t];
    const int64_t bs = dtype_block_size(t), nb = n / 32;
    const uint64_t wrow = (uint64_t)(n / bs) * dtype_type_size(t), ys = (uint64_t)n_rows + 3;
    uint64_t xrow;
    dtype_row_size(vt, (uint64_t)n, &xrow);
    uint8_t *w = malloc(CPU_GEMM_ROWS * wrow), *xq = malloc((size_t)(n_tok * xrow));
    float *y = malloc((size_t)((n_tok + 1) * ys) * sizeof(float)), *want = malloc((size_t)(n_tok * ys) * sizeof(float));
    float *x = malloc((size_t)n * sizeof(float)), *wf = malloc((size_t)(CPU_GEMM_ROWS * n) * sizeof(float)),
          *xf = malloc((size_t)n * sizeof(float));
    struct cpu_gemm_xblock *xi = malloc((size_t)(n_tok * nb + 1) * sizeof(*xi));
    void *panel = aligned_alloc(64, (cpu_gemm_panel_size(n) + 63) / 64 * 64);
    for (uint64_t i = 0; i < (uint64_t)n_rows * wrow; i++) w[i] = (uint8_t)(frand() * 128.0f + 128.0f);
    for (int64_t b = 0; b < n_rows * (n / bs); b++) sane_scales(t, w + b * dtype_type_size(t));
    for (int64_t i = 0; i < n; i++) x[i] = frand();
    quant_quantizer(t)(n, x, w); /* row 0: a quantized row */
    for (int r = 0; r < n_rows; r++) cpu_kernels_ref()->to_f32[t](n, w + r * wrow, wf + r * n);
    for (int64_t i = 0; i < (n_tok + 1) * (int64_t)ys; i++) y[i] = NAN;
    for (int64_t tk = 0; tk < n_tok; tk++) {
        for (int64_t i = 0; i < n; i++) x[i] = frand() * (tk % 3 == 2 ? 50.0f : 1.0f);
        k->quantize[vt](n, x, xq + tk * xrow);
        if (vt == DTYPE_Q8_0) cpu_gemm_prep_q8_0(n, xq + tk * xrow, xi + tk * nb);
        for (int r = 0; r < n_rows; r++)
            if (acc) y[tk * ys + r] = frand() * 10.0f;
    }
    memcpy(want, y, (size_t)(n_tok * ys) * sizeof(float));
    cpu_gemm_ref(t, n, w, wrow, n_rows, xq, xrow, n_tok, want, ys, acc);
    k->gemm[t](n, w, wrow, n_rows, xq, xrow, vt == DTYPE_Q8_0 ? xi : NULL, n_tok, y, ys, acc, panel);
    int bad = 0;
    for (int64_t tk = 0; tk < n_tok; tk++) {
        cpu_kernels_ref()->to_f32[vt](n, xq + tk * xrow, xf);
        for (int r = 0; r < (int)ys; r++) {
            const float got = y[tk * ys + r];
            if (r >= n_rows) {
                bad += !isnan(got); /* beside the tile: untouched */
                continue;
            }
            double sum_abs = acc ? fabs((double)want[tk * ys + r]) : 0.0;
            for (int64_t i = 0; i < n; i++) sum_abs += fabs((double)wf[r * n + i] * xf[i]);
            const double d = fabs((double)got - want[tk * ys + r]), tol = 2.0 * (nb + 4) * 0x1p-24 * sum_abs;
            if (!(d <= tol)) bad++;
            *worst = fmax(*worst, d / (sum_abs > 1e-30 ? sum_abs : 1.0));
        }
    }
    for (uint64_t r = 0; r < ys; r++) bad += !isnan(y[n_tok * ys + r]); /* past the last input */
    free(w), free(xq), free(y), free(want), free(x), free(wf), free(xf), free(xi), free(panel);
    return bad;
}

static void compare_gemm(const char *name, const struct cpu_kernels *k) {
    static const int64_t sizes[] = {32, 96, 256, 2048, 4096};
    static const int rows[] = {8, 1, 3, 5, 7};
    static const int64_t toks[] = {1, 2, 3, 4, 5, 8, 13, 19};
    for (uint32_t t = 0; t < DTYPE_COUNT; t++) {
        if (!k->gemm[t]) continue;
        int bad = 0, cases = 0;
        double worst = 0.0;
        for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
            if (sizes[si] % dtype_block_size(t)) continue;
            for (size_t ri = 0; ri < sizeof(rows) / sizeof(rows[0]); ri++)
                for (size_t ti = 0; ti < sizeof(toks) / sizeof(toks[0]); ti++, cases++)
                    bad += gemm_case(k, t, sizes[si], rows[ri], toks[ti], (ti + ri) % 2 == 1, &worst);
        }
        printf("%s gemm %-4s: %d cases, %d results off (tolerance 2 (nb + 4) 2^-24 of sum |w x|), max relative "
               "difference %.3g vs reference dot_q\n", name, dtype_name(t), cases, bad, worst);
        CHECK(cases > 0 && bad == 0, "%s gemm %s", name, dtype_name(t));
    }
}

/* Row r's block i read back from x8 panels p (cpu/ops.h): the number of
 * fields that differ from the file's block a. */
static int x8_layout_diff(uint32_t t, const uint8_t *p, uint64_t ps, int64_t r, int64_t i, const void *a) {
    int bad = 0;
    const int k = (int)(r % 8);
    if (t == DTYPE_Q4_K) {
        const block_q4_K *w = a;
        const struct cpu_x8_q4_K *b = (const struct cpu_x8_q4_K *)(p + (r / 8) * ps) + i;
        bad += b->d[k] != w->d || b->dmin[k] != w->dmin;
        for (int j = 0; j < 8; j++) {
            uint8_t sc, m;
            quant_scale_min_k4(j, w->scales, &sc, &m);
            bad += b->sc[j][k] != sc || b->mn[j / 2][2 * k + j % 2] != m;
        }
        for (int c = 0; c < 4; c++)
            for (int g = 0; g < 8; g++) bad += memcmp(&b->q[c][g][4 * k], w->qs + 32 * c + 4 * g, 4) != 0;
        return bad;
    }
    const block_q4_0 *w = a;
    const struct cpu_x8_q4_0 *b = (const struct cpu_x8_q4_0 *)(p + (r / 8) * ps) + i;
    bad += b->d[k] != w->d;
    for (int g = 0; g < 4; g++) bad += memcmp(&b->q[g][4 * k], w->qs + 4 * g, 4) != 0;
    return bad;
}

/* x8 panels (cpu/ops.h): the packed layout read back field by field
 * against the rows; gemv_x8 of the table equal to the reference gemv_x8
 * bit for bit (the same exact integer sums and the same float steps per
 * row), the reference within 1e-5 of sum |w x| of the reference dot_q per
 * row, and writing nothing past its 8 n_panels outputs; gemm_x8 on a panel
 * equal to gemm on its 8 rows bit for bit (the two make the same GEMM
 * panel). */
static void compare_x8(const char *name, const struct cpu_kernels *k) {
    static const int64_t sizes[] = {256, 512, 4352};
    static const int64_t sizes_q4_0[] = {32, 96, 256, 4128};
    static const int64_t panels[] = {1, 2, 3};
    static const int64_t toks[] = {4, 5, 8, 13, 16};
    for (uint32_t t = 0; t < DTYPE_COUNT; t++) {
        if (!k->gemv_x8[t]) continue;
        const bool q40 = t == DTYPE_Q4_0;
        const uint32_t vt = k->vec_dot_type[t];
        const int64_t *sz = q40 ? sizes_q4_0 : sizes;
        const size_t n_sz = q40 ? sizeof(sizes_q4_0) / sizeof(sizes_q4_0[0]) : sizeof(sizes) / sizeof(sizes[0]);
        int cases = 0, layout_bad = 0, differ = 0, past = 0, gemm_differ = 0, gemm_cases = 0, x16_differ = 0;
        int x16_cases = 0;
        double worst = 0.0;
        for (size_t si = 0; si < n_sz; si++)
            for (size_t pi = 0; pi < sizeof(panels) / sizeof(panels[0]); pi++, cases++) {
                const int64_t n = sz[si], np = panels[pi], nb = n / dtype_block_size(t), n_rows = np * CPU_X8_ROWS;
                const uint64_t bsz = dtype_type_size(t), wrow = (uint64_t)nb * bsz, ps = cpu_x8_panel_size(t, n);
                uint64_t xrow;
                dtype_row_size(vt, (uint64_t)n, &xrow);
                uint8_t *w = malloc(n_rows * wrow), *p = malloc(np * ps), *xq = malloc(16 * xrow);
                float *x = malloc(n * sizeof(float)), *wf = malloc(n * sizeof(float)), *xf = malloc(n * sizeof(float));
                float *got = malloc((n_rows + 1) * sizeof(float)), *want = malloc((n_rows + 1) * sizeof(float));
                struct cpu_gemm_xblock *xi = malloc(16 * (n / 32) * sizeof(*xi));
                for (uint64_t i = 0; i < n_rows * wrow; i++) w[i] = (uint8_t)(frand() * 128.0f + 128.0f);
                for (int64_t b = 0; b < n_rows * nb; b++) sane_scales(t, w + b * bsz);
                for (int64_t i = 0; i < n; i++) x[i] = frand();
                quant_quantizer(t)(n, x, w); /* row 0: a quantized row */
                for (int64_t kp = 0; kp < np; kp++)
                    CHECK(cpu_pack_x8(t, n, w + kp * CPU_X8_ROWS * wrow, wrow, p + kp * ps), "pack %s", dtype_name(t));
                for (int64_t r = 0; r < n_rows; r++)
                    for (int64_t i = 0; i < nb; i++)
                        layout_bad += x8_layout_diff(t, p, ps, r, i, w + r * wrow + i * bsz);
                for (int64_t tk = 0; tk < 16; tk++) {
                    for (int64_t i = 0; i < n; i++) x[i] = frand() * (tk % 3 == 2 ? 50.0f : 1.0f);
                    k->quantize[vt](n, x, xq + tk * xrow);
                    if (vt == DTYPE_Q8_0) cpu_gemm_prep_q8_0(n, xq + tk * xrow, xi + tk * (n / 32));
                }
                const struct cpu_gemm_xblock *xi_or = vt == DTYPE_Q8_0 ? xi : NULL;
                got[n_rows] = want[n_rows] = NAN;
                cpu_kernels_ref()->gemv_x8[t](n, p, np, xq, xi_or, want);
                k->gemv_x8[t](n, p, np, xq, xi_or, got);
                differ += memcmp(got, want, n_rows * sizeof(float)) != 0;
                past += !isnan(got[n_rows]);
                cpu_kernels_ref()->to_f32[vt](n, xq, xf);
                for (int64_t r = 0; r < n_rows; r++) {
                    cpu_kernels_ref()->to_f32[t](n, w + r * wrow, wf);
                    double sum_abs = 0.0;
                    for (int64_t i = 0; i < n; i++) sum_abs += fabs((double)wf[i] * xf[i]);
                    const double d = fabs((double)want[r] - cpu_kernels_ref()->dot_q[t](n, w + r * wrow, xq));
                    worst = fmax(worst, d / (sum_abs > 1e-30 ? sum_abs : 1.0));
                }
                for (size_t ti = 0; k->gemm_x8[t] && ti < sizeof(toks) / sizeof(toks[0]); ti++, gemm_cases++) {
                    const int64_t nt = toks[ti];
                    float *y1 = malloc(nt * 8 * sizeof(float)), *y2 = malloc(nt * 8 * sizeof(float));
                    void *panel = aligned_alloc(64, (cpu_gemm_panel_size(n) + 63) / 64 * 64);
                    for (int64_t i = 0; i < nt * 8; i++) y1[i] = y2[i] = frand();
                    const bool acc = ti % 2 == 1;
                    k->gemm[t](n, w, wrow, 8, xq, xrow, xi_or, nt, y1, 8, acc, panel);
                    k->gemm_x8[t](n, p, 0, 8, xq, xrow, xi_or, nt, y2, 8, acc, panel);
                    gemm_differ += memcmp(y1, y2, nt * 8 * sizeof(float)) != 0;
                    free(y1), free(y2), free(panel);
                }
                /* gemm_x16: two panels at once, against gemm on their 16 rows
                 * (the best table's where this one has none: avx512vnni's
                 * q4_k x16 keeps avx2's integer and float steps) */
                const cpu_gemm_fn gemm16 = k->gemm[t] ? k->gemm[t] : cpu_kernels_best()->gemm[t];
                for (size_t ti = 0; k->gemm_x16[t] && np >= 2 && ti < sizeof(toks) / sizeof(toks[0]); ti++) {
                    const int64_t nt = toks[ti];
                    float *y1 = malloc(nt * 16 * sizeof(float)), *y2 = malloc(nt * 16 * sizeof(float));
                    void *panel = aligned_alloc(64, (cpu_gemm_panel_size(n) + 63) / 64 * 64);
                    for (int64_t i = 0; i < nt * 16; i++) y1[i] = y2[i] = frand();
                    const bool acc = ti % 2 == 0;
                    if (!gemm16) {
                        CHECK(false, "%s gemm_x16 %s: no gemm to compare with", name, dtype_name(t));
                        free(y1), free(y2), free(panel);
                        break;
                    }
                    gemm16(n, w, wrow, 8, xq, xrow, xi_or, nt, y1, 16, acc, panel);
                    gemm16(n, w + 8 * wrow, wrow, 8, xq, xrow, xi_or, nt, y1 + 8, 16, acc, panel);
                    k->gemm_x16[t](n, p, 0, 16, xq, xrow, xi_or, nt, y2, 16, acc, panel);
                    x16_differ += memcmp(y1, y2, nt * 16 * sizeof(float)) != 0;
                    x16_cases++;
                    free(y1), free(y2), free(panel);
                }
                free(w), free(p), free(xq), free(x), free(wf), free(xf), free(got), free(want), free(xi);
            }
        printf("%s gemv_x8 %-4s: %d cases, layout %d off, %d differ from the reference gemv_x8, max relative "
               "difference %.3g vs reference dot_q; gemm_x8: %d cases, %d differ from gemm; gemm_x16: %d cases, %d "
               "differ\n",
               name, dtype_name(t), cases, layout_bad, differ, worst, gemm_cases, gemm_differ, x16_cases, x16_differ);
        CHECK(cases > 0 && layout_bad == 0, "%s x8 layout %s", name, dtype_name(t));
        CHECK(differ == 0 && past == 0, "%s gemv_x8 %s", name, dtype_name(t));
        CHECK(worst <= 1e-5, "%s gemv_x8 %s vs dot_q: %g", name, dtype_name(t), worst);
        CHECK(gemm_differ == 0, "%s gemm_x8 %s", name, dtype_name(t));
        CHECK(x16_differ == 0 && (x16_cases > 0) == (k->gemm_x16[t] != NULL), "%s gemm_x16 %s", name, dtype_name(t));
    }
}

/* axpy (y += a * row): the kernel against y + a * (the row dequantized by
 * quant.c / to_f32) in double; 1e-6 of |y| + |a w| (one float rounding of
 * the product and of the sum). */
static void compare_axpy(const char *name, const struct cpu_kernels *k) {
    static const uint32_t types[] = {DTYPE_F32, DTYPE_F16, DTYPE_Q8_0, DTYPE_Q4_0};
    static const int64_t sizes[] = {32, 64, 96, 256, 4096, 11008};
    const struct cpu_kernels *ref = cpu_kernels_ref();
    const size_t n_max = 11008 + 2; /* the largest size, ragged */
    float *src = malloc(n_max * sizeof(float)), *wf = malloc(n_max * sizeof(float));
    float *y = malloc(n_max * sizeof(float)), *y0 = malloc(n_max * sizeof(float));
    void *w = malloc(n_max * sizeof(float));
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        const uint32_t t = types[ti];
        if (!k->axpy[t]) {
            CHECK(false, "%s axpy %s missing", name, dtype_name(t));
            continue;
        }
        double worst = 0;
        for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
            const int64_t n = sizes[si] + (t == DTYPE_F32 || t == DTYPE_F16 ? (int64_t)si % 3 : 0); /* ragged */
            for (int64_t i = 0; i < n; i++) src[i] = frand();
            if (t == DTYPE_F32) memcpy(w, src, (size_t)n * sizeof(float));
            else if (t == DTYPE_F16) for (int64_t i = 0; i < n; i++) ((f16_t *)w)[i] = f32_to_f16(src[i]);
            else quant_quantizer(t)(n, src, w);
            ref->to_f32[t](n, w, wf);
            const float a = frand() * 3.0f;
            for (int64_t i = 0; i < n; i++) y[i] = y0[i] = 0.1f * (float)i + frand(); /* poisoned by the values */
            k->axpy[t](n, a, w, y);
            for (int64_t i = 0; i < n; i++) {
                const double want = (double)y0[i] + (double)a * wf[i];
                const double e = fabs(y[i] - want) / (fabs((double)y0[i]) + fabs((double)a * wf[i]) + 1e-30);
                if (!(e <= worst)) worst = e;
            }
        }
        printf("%s axpy %s: max rel diff %.3g\n", name, dtype_name(t), worst);
        CHECK(worst < 1e-6, "%s axpy %s: %g", name, dtype_name(t), worst);
    }
    free(src);
    free(wf);
    free(y);
    free(y0);
    free(w);
}

/* axpy4 (y += a0 w0 + a1 w1 + a2 w2 + a3 w3, four independent random rows):
 * against the double sum of the rows dequantized by the reference
 * converters; 1e-6 of |y| + sum |a w| (four roundings of a partial sum no
 * larger than that). Its `next` rows (a prefetch hint) change no bit: the
 * same call with the rows themselves, reversed, as next. */
static void compare_axpy4(const char *name, const struct cpu_kernels *k) {
    static const uint32_t types[] = {DTYPE_F32, DTYPE_F16, DTYPE_Q8_0, DTYPE_Q4_0};
    static const int64_t sizes[] = {32, 64, 96, 256, 4096, 11008};
    const struct cpu_kernels *ref = cpu_kernels_ref();
    const size_t n_max = 11008 + 3; /* the largest size, ragged */
    float *src = malloc(n_max * sizeof(float)), *wf = malloc(4 * n_max * sizeof(float));
    float *y = malloc(n_max * sizeof(float)), *y0 = malloc(n_max * sizeof(float));
    char *wb = malloc(4 * n_max * sizeof(float));
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        const uint32_t t = types[ti];
        if (!k->axpy4[t]) {
            CHECK(false, "%s axpy4 %s missing", name, dtype_name(t));
            continue;
        }
        double worst = 0;
        int next_differ = 0;
        for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
            const int64_t n = sizes[si] + (t == DTYPE_F32 || t == DTYPE_F16 ? (int64_t)si % 3 + 1 : 0); /* ragged */
            const void *w[4];
            float a[4];
            for (int r = 0; r < 4; r++) {
                char *wr = wb + (size_t)r * n_max * sizeof(float);
                for (int64_t i = 0; i < n; i++) src[i] = frand();
                if (t == DTYPE_F32) memcpy(wr, src, (size_t)n * sizeof(float));
                else if (t == DTYPE_F16) for (int64_t i = 0; i < n; i++) ((f16_t *)wr)[i] = f32_to_f16(src[i]);
                else quant_quantizer(t)(n, src, wr);
                ref->to_f32[t](n, wr, wf + (size_t)r * n_max);
                w[r] = wr;
                a[r] = frand() * 3.0f;
            }
            for (int64_t i = 0; i < n; i++) y[i] = y0[i] = 0.1f * (float)i + frand(); /* poisoned by the values */
            k->axpy4[t](n, a, w, y, NULL);
            float *y2 = malloc((size_t)n * sizeof(float));
            for (int64_t i = 0; i < n; i++) y2[i] = y0[i];
            const void *next[4] = {w[3], w[2], w[1], w[0]};
            k->axpy4[t](n, a, w, y2, next);
            next_differ += memcmp(y, y2, (size_t)n * sizeof(float)) != 0;
            free(y2);
            for (int64_t i = 0; i < n; i++) {
                double want = y0[i], mag = fabs((double)y0[i]);
                for (int r = 0; r < 4; r++) {
                    want += (double)a[r] * wf[(size_t)r * n_max + (size_t)i];
                    mag += fabs((double)a[r] * wf[(size_t)r * n_max + (size_t)i]);
                }
                const double e = fabs(y[i] - want) / (mag + 1e-30);
                if (!(e <= worst)) worst = e;
            }
        }
        printf("%s axpy4 %s: max rel diff %.3g, %d sizes differ with next rows\n", name, dtype_name(t), worst,
               next_differ);
        CHECK(worst < 1e-6, "%s axpy4 %s: %g", name, dtype_name(t), worst);
        CHECK(next_differ == 0, "%s axpy4 %s: next rows changed y", name, dtype_name(t));
    }
    free(src);
    free(wf);
    free(y);
    free(y0);
    free(wb);
}

/* The attention's 4-entry steps: dot_f32_4x within 1e-5 of sum |w x| of
 * the reference dot (as compare's dot); axpy_f32_4y equal to 4 axpy calls
 * of the same table bit for bit, the gaps between its rows untouched. */
static void compare_attn4(const char *name, const struct cpu_kernels *k) {
    static const int64_t sizes[] = {1, 7, 8, 15, 16, 33, 64, 128, 200};
    const struct cpu_kernels *ref = cpu_kernels_ref();
    double worst = 0.0;
    int axpy_differ = 0, cases = 0;
    for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++)
        for (int rep = 0; rep < 4; rep++, cases++) {
            const int64_t n = sizes[si], xs = n + 5, ys = n + 3;
            float *w = malloc(n * sizeof(float)), *x = malloc(4 * xs * sizeof(float));
            float *y1 = malloc(4 * ys * sizeof(float)), *y2 = malloc(4 * ys * sizeof(float));
            for (int64_t i = 0; i < n; i++) w[i] = frand();
            for (int64_t i = 0; i < 4 * xs; i++) x[i] = frand() * (rep == 3 ? 30.0f : 1.0f);
            for (int64_t i = 0; i < 4 * ys; i++) y1[i] = y2[i] = frand();
            float got[4];
            k->dot_f32_4x(n, w, x, (uint64_t)xs, got);
            const float a[4] = {frand(), frand(), frand(), frand()};
            k->axpy_f32_4y(n, a, w, y1, (uint64_t)ys);
            for (int j = 0; j < 4; j++) {
                double sum_abs = 0.0;
                for (int64_t i = 0; i < n; i++) sum_abs += fabs((double)w[i] * x[j * xs + i]);
                const double d = fabs((double)got[j] - ref->dot[DTYPE_F32](n, w, x + j * xs));
                worst = fmax(worst, d / (sum_abs > 1e-30 ? sum_abs : 1.0));
                k->axpy[DTYPE_F32](n, a[j], w, y2 + j * ys);
            }
            axpy_differ += memcmp(y1, y2, 4 * ys * sizeof(float)) != 0;
            free(w), free(x), free(y1), free(y2);
        }
    printf("%s dot_f32_4x: %d cases, max relative difference %.3g vs reference dot (tolerance 1e-5); axpy_f32_4y: "
           "%d differ from 4 axpy\n",
           name, cases, worst, axpy_differ);
    CHECK(worst <= 1e-5, "%s dot_f32_4x: %g", name, worst);
    CHECK(axpy_differ == 0, "%s axpy_f32_4y", name);
}

int main(void) {
    rng_state = (uint64_t)time(NULL);
    printf("seed %llu\n", (unsigned long long)rng_state);
    printf("best table: %s\n", cpu_kernels_best()->name);
    compare("best", cpu_kernels_best());
    compare_quant("best", cpu_kernels_best());
    compare_axpy("ref", cpu_kernels_ref());
    compare_axpy("best", cpu_kernels_best());
    int n_gemm = 0;
    for (int t = 0; t < DTYPE_COUNT; t++) n_gemm += cpu_kernels_best()->gemm[t] != NULL;
    printf("best table: %d weight types with a prompt GEMM\n", n_gemm);
    compare_gemm("best", cpu_kernels_best());
    compare_x8("ref", cpu_kernels_ref());
    compare_x8("best", cpu_kernels_best());
    compare_axpy4("ref", cpu_kernels_ref());
    compare_axpy4("best", cpu_kernels_best());
    compare_attn4("ref", cpu_kernels_ref());
    compare_attn4("best", cpu_kernels_best());
#if defined(OPTIML_X86)
    /* every SIMD table this CPU runs, its gaps filled from the reference */
    const struct { const char *name; const struct cpu_kernels *k; } tables[] = {
        {"avx2", cpu_kernels_avx2()}, {"avx512vnni", cpu_kernels_avx512vnni()}};
    for (size_t i = 0; i < sizeof(tables) / sizeof(tables[0]); i++) {
        if (!tables[i].k) {
            printf("%s: not supported by this CPU, skipped\n", tables[i].name);
            continue;
        }
        printf("testing table %s\n", tables[i].name);
        struct cpu_kernels k = *cpu_kernels_ref();
        cpu_kernels_merge(&k, tables[i].k);
        compare(tables[i].name, &k);
        compare_quant(tables[i].name, &k);
        compare_axpy(tables[i].name, &k);
        compare_gemm(tables[i].name, &k);
        compare_x8(tables[i].name, &k);
        compare_axpy4(tables[i].name, &k);
        compare_attn4(tables[i].name, &k);
    }
#endif
    /* elementwise ops against double-precision formulas */
    float v[64], w[64], o[64];
    double ss = 0;
    for (int i = 0; i < 64; i++) { v[i] = frand(); w[i] = frand(); ss += (double)v[i] * v[i]; }
    ops_rmsnorm(o, v, w, 64, 1e-5f);
    double worst = 0;
    for (int i = 0; i < 64; i++) worst = fmax(worst, fabs(o[i] - v[i] / sqrt(ss / 64 + 1e-5) * w[i]));
    CHECK(worst < 1e-5, "rmsnorm off by %g", worst);
    float g[4] = {-1.0f, 0.0f, 0.5f, 2.0f}, u[4] = {2.0f, 3.0f, 4.0f, 5.0f}, g2[4];
    for (int i = 0; i < 4; i++) g2[i] = g[i];
    ops_act_mul(g2, u, 4, FFN_ACT_SILU);
    for (int i = 0; i < 4; i++) CHECK_CLOSE(g2[i], g[i] / (1 + exp(-g[i])) * u[i], 1e-6);
    for (int i = 0; i < 4; i++) g2[i] = g[i];
    ops_act_mul(g2, u, 4, FFN_ACT_RELU2);
    for (int i = 0; i < 4; i++) CHECK_CLOSE(g2[i], (g[i] > 0 ? g[i] * g[i] : 0) * u[i], 1e-6);
    float sm[5] = {1, 2, 3, 4, -1000};
    ops_softmax(sm, 5);
    double z = exp(1) + exp(2) + exp(3) + exp(4);
    CHECK_CLOSE(sm[3], exp(4) / z, 1e-6);
    CHECK(sm[4] == 0.0f);
    return test_summary("test_ops");
}
