/*
 * test_cuda_matmul.c - the CUDA matrix products (src/cuda/matmul.cu)
 * against a double-precision host reference.
 *
 * For every weight type the GPU multiplies: fresh random f32 weights are
 * quantized with the reference quantizer of src/quant.c (or converted to
 * f16/bf16), uploaded with cu_weight_upload, and multiplied by random x
 * through both forced paths (cu_matmul_mmv, cu_matmul_gemm), plain and
 * accumulating. The reference is computed in double from the host's
 * dequantized weights (src/quant.c's dequantizers, the format's
 * definition) and the f32 x. y is poisoned with NaN (0xFF bytes) before
 * every plain run; accumulating runs start from random y.
 *
 * Error measure: ||y - ref|| / max(||ref||, S) with S^2 the sum over
 * outputs of sum_i (w_i x_i)^2: S is what ||ref|| is for random signs; it
 * only matters where a short sum cancels (n_out = 1, n_in = 32) and the
 * plain ratio would measure luck, not the kernel.
 *
 * Tolerances (and why):
 *   TOL_Q8_ACT  2e-2  quantized weights, matrix-vector: x is quantized to 8
 *                     bits per block of 32 (step amax/127): for x uniform
 *                     in [-1, 1] the error is ~0.4% rms of the measure's
 *                     scale; a case with one output row is one sample of
 *                     it, so the bound is 5 sigma, not the ~1% of a mean
 *   TOL_F16     2e-3  GEMM path: weights and x rounded to f16 (2^-11
 *                     relative each) before an f32-accumulating GEMM
 *   TOL_F32     1e-4  f32/f16/bf16 matrix-vector and the f32 GEMM: exact
 *                     products, only the f32 summation order differs
 * cu_get_rows must equal the host dequantizer bit for bit.
 *
 * cu_matmul_ex (fused input steps) on a weight uploaded in 3 stacked parts
 * (cu_weight_upload_parts): the host reference first applies the CPU's
 * ops_rmsnorm, or ops_threshold + ops_act_mul, to x rows read with a stride
 * (padding and the up half of gate|up rows), then the double product; y rows
 * are written ldy apart and the columns between them must stay poisoned.
 * Every tuning variant of the fused kernel, the unfused path and the
 * input-step + quantize kernel with both product kernels are run.
 *
 * Exit status: 0 all passed, 1 any failure, 77 no CUDA device (skip).
 */
#include "cpu/ops.h"
#include "cuda/cuda.h"
#include "dtype.h"
#include "quant.h"

#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOL_Q8_ACT 2e-2
#define TOL_F16 2e-3
#define TOL_F32 1e-4

static int n_pass, n_fail;

static void result(bool ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void result(bool ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s ", ok ? "PASS" : "FAIL");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (ok) n_pass++;
    else n_fail++;
}

static void die_status(optiml_status st, const char *what) {
    fprintf(stderr, "FATAL: %s failed (%d): %s\n", what, (int)st, optiml_last_error());
    exit(1);
}
#define MUST(call)                                    \
    do {                                              \
        optiml_status must_st_ = (call);              \
        if (must_st_ != OPTIML_OK) die_status(must_st_, #call); \
    } while (0)

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static float frand(void) { /* uniform in [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) * (1.0 / 8388608.0)) - 1.0f;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "FATAL: out of host memory\n");
        exit(1);
    }
    return p;
}

/* ---- host weights ---------------------------------------------------------- */

struct host_weight {
    uint32_t type;
    int64_t n_in, n_out;
    void *data;  /* GGUF bytes          */
    float *deq;  /* (n_out, n_in) values */
};

static struct host_weight host_weight_make(uint32_t type, int64_t n_in, int64_t n_out) {
    struct host_weight h = {type, n_in, n_out, NULL, NULL};
    const int64_t n = n_in * n_out;
    float *src = xmalloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) src[i] = frand();
    uint64_t row = 0;
    if (!dtype_row_size(type, (uint64_t)n_in, &row)) {
        fprintf(stderr, "FATAL: bad row size\n");
        exit(1);
    }
    h.data = xmalloc((size_t)(row * (uint64_t)n_out));
    h.deq = xmalloc((size_t)n * sizeof(float));
    if (type == DTYPE_F32) {
        memcpy(h.data, src, (size_t)n * 4);
        memcpy(h.deq, src, (size_t)n * 4);
    } else if (type == DTYPE_F16 || type == DTYPE_BF16) {
        uint16_t *d = h.data;
        for (int64_t i = 0; i < n; i++) {
            d[i] = type == DTYPE_F16 ? f32_to_f16(src[i]) : f32_to_bf16(src[i]);
            h.deq[i] = type == DTYPE_F16 ? f16_to_f32(d[i]) : bf16_to_f32(d[i]);
        }
    } else {
        quant_quantizer(type)(n, src, h.data);
        quant_dequantizer(type)(n, h.data, h.deq);
    }
    free(src);
    return h;
}

static void host_weight_free(struct host_weight *h) {
    free(h->data);
    free(h->deq);
}

/* ref (n_tok, n_out) in double, and S^2 per the header comment. */
static void reference(const struct host_weight *h, const float *x, int64_t n_tok, double *ref, double *s2_out) {
    double s2 = 0.0;
    for (int64_t t = 0; t < n_tok; t++)
        for (int64_t o = 0; o < h->n_out; o++) {
            const float *w = h->deq + o * h->n_in, *xr = x + t * h->n_in;
            double acc = 0.0;
            for (int64_t i = 0; i < h->n_in; i++) {
                const double p = (double)w[i] * (double)xr[i];
                acc += p;
                s2 += p * p;
            }
            ref[t * h->n_out + o] = acc;
        }
    *s2_out = s2;
}

static double rel_error(const float *y, const float *y0, const double *ref, int64_t n, double s2) {
    double e2 = 0.0, r2 = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const double want = ref[i] + (y0 ? (double)y0[i] : 0.0);
        const double d = (double)y[i] - want;
        e2 += d * d;
        r2 += ref[i] * ref[i];
    }
    const double den = sqrt(r2 > s2 ? r2 : s2);
    if (isnan(e2)) return NAN;
    return den > 0.0 ? sqrt(e2) / den : sqrt(e2);
}

/* ---- device state ------------------------------------------------------------ */

enum { MAX_TOK = 512, MAX_IN = 14336, MAX_OUT = 4096 }; /* 14336: the FFN rows of 7B and 13B */

struct dev {
    cu_ctx *cu;
    float *x, *y;     /* device (MAX_TOK, 2 * MAX_IN), (MAX_TOK, MAX_OUT) */
    float *hy, *hy0;  /* host copies of y, y before */
    double *ref;
};

static bool is_plain(uint32_t t) { return t == DTYPE_F32 || t == DTYPE_F16 || t == DTYPE_BF16; }

static double tolerance(uint32_t type, bool gemm) {
    if (gemm) return type == DTYPE_F32 ? TOL_F32 : TOL_F16;
    return is_plain(type) ? TOL_F32 : TOL_Q8_ACT;
}

typedef optiml_status (*matmul_fn)(cu_ctx *, const cu_weight *, const float *, int64_t, float *, bool);

/* One product through fn: plain (y poisoned) or accumulating (y random). */
static double run_product(struct dev *d, matmul_fn fn, const cu_weight *w, int64_t n_tok, bool acc, double s2,
                          optiml_status *st_out) {
    const int64_t n_y = n_tok * w->n_out;
    if (acc) {
        for (int64_t i = 0; i < n_y; i++) d->hy0[i] = frand();
        MUST(cu_upload(d->cu, d->y, d->hy0, (uint64_t)n_y * sizeof(float)));
    } else {
        MUST(cu_memset(d->cu, d->y, 0xFF, (uint64_t)n_y * sizeof(float)));
    }
    const optiml_status st = fn(d->cu, w, d->x, n_tok, d->y, acc);
    *st_out = st;
    if (st != OPTIML_OK) return NAN;
    MUST(cu_download(d->cu, d->hy, d->y, (uint64_t)n_y * sizeof(float)));
    MUST(cu_sync(d->cu));
    return rel_error(d->hy, acc ? d->hy0 : NULL, d->ref, n_y, s2);
}

static void test_shape(struct dev *d, uint32_t type, int64_t n_in, int64_t n_out) {
    static const int64_t toks[] = {1, 2, 3, 5, 8, 9, 64, 512};
    struct host_weight h = host_weight_make(type, n_in, n_out);
    cu_weight w;
    /* alternate the staging modes: none (pageable), a small pinned buffer */
    void *staging = NULL;
    const uint64_t staging_bytes = 1u << 20;
    const bool use_staging = (n_out & 1) == 0;
    if (use_staging) MUST(cu_host_alloc(staging_bytes, &staging));
    MUST(cu_weight_upload(d->cu, type, n_in, n_out, h.data, staging, staging_bytes, &w));
    cu_host_free(staging);
    if (w.bytes != cu_weight_bytes(type, n_in, n_out))
        result(false, "%s weight bytes %llu != cu_weight_bytes %llu", dtype_name(type), (unsigned long long)w.bytes,
               (unsigned long long)cu_weight_bytes(type, n_in, n_out));

    float *hx = xmalloc((size_t)(MAX_TOK * n_in) * sizeof(float));
    for (size_t ti = 0; ti < sizeof(toks) / sizeof(toks[0]); ti++) {
        const int64_t n_tok = toks[ti];
        if (n_tok * n_in * n_out > (1 << 26) && n_tok > 1) continue; /* host reference time */
        for (int64_t i = 0; i < n_tok * n_in; i++) hx[i] = frand();
        MUST(cu_upload(d->cu, d->x, hx, (uint64_t)(n_tok * n_in) * sizeof(float)));
        double s2;
        reference(&h, hx, n_tok, d->ref, &s2);
        /* paths: mmv (the warp kernel for quantized types), gemm, mmv with the block kernel, the
         * persistent kernel (one token; other token counts take the block kernel) */
        for (int path = 0; path < (is_plain(type) ? 2 : 4); path++) {
            const matmul_fn fn = path == 1 ? cu_matmul_gemm : cu_matmul_mmv;
            const double tol = tolerance(type, path == 1);
            if (path >= 2) {
                const struct cu_tuning t = {.mmv_kernel = path == 2 ? 1 : 3};
                cu_set_tuning(d->cu, &t);
            }
            optiml_status st0, st1;
            const double e0 = run_product(d, fn, &w, n_tok, false, s2, &st0);
            const double e1 = run_product(d, fn, &w, n_tok, true, s2, &st1);
            if (path >= 2) {
                const struct cu_tuning t = {.mmv_kernel = 2};
                cu_set_tuning(d->cu, &t);
            }
            const bool ok = st0 == OPTIML_OK && st1 == OPTIML_OK && e0 <= tol && e1 <= tol;
            result(ok, "%-5s %-4s n_in=%-5lld n_out=%-5lld n_tok=%-4lld rel %.2e (accumulate %.2e) tol %.0e%s%s",
                   dtype_name(type), path == 1 ? "gemm" : path == 2 ? "mmvb" : path == 3 ? "mmvp" : "mmv", (long long)n_in,
                   (long long)n_out, (long long)n_tok, e0, e1, tol, st0 || st1 ? ": error " : "",
                   st0 || st1 ? optiml_last_error() : "");
        }
        /* cu_matmul picks a path by itself: check it once per token count */
        optiml_status st;
        const double e = run_product(d, cu_matmul, &w, n_tok, false, s2, &st);
        const double tol = tolerance(type, n_tok > cu_matmul_mmv_max_tokens());
        result(st == OPTIML_OK && e <= tol, "%-5s auto n_in=%-5lld n_out=%-5lld n_tok=%-4lld rel %.2e tol %.0e",
               dtype_name(type), (long long)n_in, (long long)n_out, (long long)n_tok, e, tol);
    }
    free(hx);
    cu_weight_free(&w);
    host_weight_free(&h);
}

/* Embedding rows: equal to the host dequantizer bit for bit. */
static void test_get_rows(struct dev *d, uint32_t type, int64_t n_in, int64_t n_out) {
    struct host_weight h = host_weight_make(type, n_in, n_out);
    cu_weight w;
    MUST(cu_weight_upload(d->cu, type, n_in, n_out, h.data, NULL, 0, &w));
    const int32_t toks[] = {0, (int32_t)(n_out - 1), (int32_t)(n_out / 2), 3 % (int32_t)n_out, 0};
    const int32_t n = (int32_t)(sizeof(toks) / sizeof(toks[0]));
    int32_t *dtok;
    float *dout;
    MUST(cu_malloc(d->cu, sizeof(toks), (void **)&dtok));
    MUST(cu_malloc(d->cu, (uint64_t)(n * n_in) * sizeof(float), (void **)&dout));
    MUST(cu_upload(d->cu, dtok, toks, sizeof(toks)));
    MUST(cu_memset(d->cu, dout, 0xFF, (uint64_t)(n * n_in) * sizeof(float)));
    const optiml_status st = cu_get_rows(d->cu, &w, dtok, n, dout);
    float *out = xmalloc((size_t)(n * n_in) * sizeof(float));
    int64_t bad = -1;
    if (st == OPTIML_OK) {
        MUST(cu_download(d->cu, out, dout, (uint64_t)(n * n_in) * sizeof(float)));
        MUST(cu_sync(d->cu));
        for (int64_t e = 0; e < n && bad < 0; e++)
            for (int64_t j = 0; j < n_in; j++)
                if (memcmp(&out[e * n_in + j], &h.deq[toks[e] * n_in + j], sizeof(float)) != 0) {
                    bad = e * n_in + j;
                    break;
                }
    }
    if (bad >= 0)
        result(false, "%-5s get_rows n_in=%lld n_out=%lld: value %lld is %.9g, dequantizer %.9g", dtype_name(type),
               (long long)n_in, (long long)n_out, (long long)bad, out[bad],
               h.deq[toks[bad / n_in] * n_in + bad % n_in]);
    else
        result(st == OPTIML_OK, "%-5s get_rows n_in=%lld n_out=%lld: %d rows bit-exact%s", dtype_name(type),
               (long long)n_in, (long long)n_out, (int)n, st ? optiml_last_error() : "");
    free(out);
    cu_dfree(dtok);
    cu_dfree(dout);
    cu_weight_free(&w);
    host_weight_free(&h);
}

/* A product captured in a CUDA graph reads x at replay time. */
static void test_graph(struct dev *d, uint32_t type, int64_t n_tok) {
    const int64_t n_in = 512, n_out = 300;
    struct host_weight h = host_weight_make(type, n_in, n_out);
    cu_weight w;
    MUST(cu_weight_upload(d->cu, type, n_in, n_out, h.data, NULL, 0, &w));
    float *hx = xmalloc((size_t)(n_tok * n_in) * sizeof(float));
    for (int64_t i = 0; i < n_tok * n_in; i++) hx[i] = frand();
    MUST(cu_upload(d->cu, d->x, hx, (uint64_t)(n_tok * n_in) * sizeof(float)));
    MUST(cu_sync(d->cu));
    cu_graph *g = NULL;
    MUST(cu_graph_begin(d->cu));
    const optiml_status st = cu_matmul(d->cu, &w, d->x, n_tok, d->y, false);
    const optiml_status st_end = cu_graph_end(d->cu, &g);
    double e = NAN;
    if (st == OPTIML_OK && st_end == OPTIML_OK) {
        for (int64_t i = 0; i < n_tok * n_in; i++) hx[i] = frand(); /* new x, same buffer */
        MUST(cu_upload(d->cu, d->x, hx, (uint64_t)(n_tok * n_in) * sizeof(float)));
        MUST(cu_memset(d->cu, d->y, 0xFF, (uint64_t)(n_tok * n_out) * sizeof(float)));
        MUST(cu_graph_launch(d->cu, g));
        MUST(cu_download(d->cu, d->hy, d->y, (uint64_t)(n_tok * n_out) * sizeof(float)));
        MUST(cu_sync(d->cu));
        double s2;
        reference(&h, hx, n_tok, d->ref, &s2);
        e = rel_error(d->hy, NULL, d->ref, n_tok * n_out, s2);
    }
    const double tol = tolerance(type, false);
    result(st == OPTIML_OK && st_end == OPTIML_OK && e <= tol, "%-5s graph n_tok=%lld: rel %.2e tol %.0e%s",
           dtype_name(type), (long long)n_tok, e, tol, st || st_end ? optiml_last_error() : "");
    cu_graph_free(g);
    free(hx);
    cu_weight_free(&w);
    host_weight_free(&h);
}

/* ---- fused products (cu_matmul_ex) ------------------------------------------------ */

static const char *const in_names[3] = {"plain", "rmsnorm", "act_mul"};

/* The input rows (n_tok, n_in) the fused product must see, from raw rows
 * of ld floats (act_mul: gate at 0, up at n_in). */
static void host_input(int kind, int act, float thr, const float *raw, int64_t ld, const float *norm, int64_t n_tok,
                       int64_t n_in, float *out) {
    float *u = xmalloc((size_t)n_in * sizeof(float));
    for (int64_t t = 0; t < n_tok; t++) {
        const float *r = raw + t * ld;
        float *o = out + t * n_in;
        if (kind == CU_IN_RMSNORM) {
            ops_rmsnorm(o, r, norm, n_in, 1e-5f);
        } else if (kind == CU_IN_ACT_MUL) {
            memcpy(o, r, (size_t)n_in * sizeof(float));
            memcpy(u, r + n_in, (size_t)n_in * sizeof(float));
            if (thr > 0.0f) ops_threshold(act == FFN_ACT_RELU_NOGATE ? u : o, n_in, thr);
            ops_act_mul(o, u, n_in, (enum ffn_act)act);
        } else {
            memcpy(o, r, (size_t)n_in * sizeof(float));
        }
    }
    free(u);
}

static void test_fused(struct dev *d, uint32_t type, int64_t n_in, int64_t n_out) {
    static const int64_t toks[] = {1, 2, 5, 8, 9, 64};
    struct host_weight h = host_weight_make(type, n_in, n_out);
    uint64_t row = 0;
    dtype_row_size(type, (uint64_t)n_in, &row);
    /* three stacked parts (fewer rows than 3: one part) */
    const int n_parts = n_out >= 3 ? 3 : 1;
    int64_t rows[3] = {n_out, 0, 0};
    if (n_parts == 3) rows[0] = n_out / 3, rows[1] = n_out / 3, rows[2] = n_out - 2 * (n_out / 3);
    const void *parts[3] = {h.data, (const uint8_t *)h.data + row * (uint64_t)rows[0],
                            (const uint8_t *)h.data + row * (uint64_t)(rows[0] + rows[1])};
    cu_weight w;
    MUST(cu_weight_upload_parts(d->cu, type, n_in, n_parts, parts, rows, NULL, 0, &w));
    const int64_t ldy = n_out + 3;
    float *norm = xmalloc((size_t)n_in * sizeof(float)), *dnorm;
    for (int64_t i = 0; i < n_in; i++) norm[i] = 1.0f + 0.5f * frand();
    MUST(cu_malloc(d->cu, (uint64_t)n_in * sizeof(float), (void **)&dnorm));
    MUST(cu_upload(d->cu, dnorm, norm, (uint64_t)n_in * sizeof(float)));
    const int64_t max_tok = 64, ld_max = 2 * n_in;
    float *raw = xmalloc((size_t)(max_tok * ld_max) * sizeof(float));
    float *xin = xmalloc((size_t)(max_tok * n_in) * sizeof(float));
    float *yg = xmalloc((size_t)(max_tok * ldy) * sizeof(float));
    float *y0 = xmalloc((size_t)(max_tok * n_out) * sizeof(float));
    float *yc = xmalloc((size_t)(max_tok * n_out) * sizeof(float));
    for (size_t ti = 0; ti < sizeof(toks) / sizeof(toks[0]); ti++) {
        const int64_t n_tok = toks[ti];
        if (n_tok * n_in * n_out > (1 << 25) && n_tok > 1) continue; /* host reference time */
        if (n_tok * ldy > MAX_TOK * MAX_OUT) continue;
        for (int kind = 0; kind < 3; kind++) {
            /* one line per (n_tok, kind): the worst case over activations,
             * thresholds, configurations and accumulate */
            double worst = 0.0;
            bool ok = true;
            char worst_what[96] = "", err_text[160] = "";
            for (int act = 0; act < (kind == CU_IN_ACT_MUL ? 6 : 1); act++)
                for (int ti2 = 0; ti2 < (kind == CU_IN_ACT_MUL ? 2 : 1); ti2++) {
                    if (kind == CU_IN_ACT_MUL && n_tok != 1 && act != 0 && act != 5) continue;
                    const float thr = ti2 ? 0.25f : 0.0f;
                    const int64_t ld = kind == CU_IN_ACT_MUL ? 2 * n_in : n_in + 4;
                    for (int64_t i = 0; i < n_tok * ld; i++) raw[i] = 2.0f * frand();
                    MUST(cu_upload(d->cu, d->x, raw, (uint64_t)(n_tok * ld) * sizeof(float)));
                    host_input(kind, act, thr, raw, ld, norm, n_tok, n_in, xin);
                    double s2;
                    reference(&h, xin, n_tok, d->ref, &s2);
                    const struct cu_mm_in in = {.kind = kind, .ld = ld, .norm = dnorm, .eps = 1e-5f,
                                                .up = d->x + n_in, .act = act, .thr = thr};
                    /* configurations: fused kernel variants 1..3, the unfused path,
                     * input step + quantization then the warp kernel (variants 1..3),
                     * then the block kernel */
                    static const char *cfg_names[] = {"fused-v1",    "fused-v2",    "fused-v3",  "unfused",
                                                      "inq-warp-v1", "inq-warp-v2", "inq-warp-v3", "inq-block",
                                                      "inq-warp-pdl", "inq-persist-pdl", "inq1-block",
                                                      "unfused-inp1"};
                    for (int cfg = 0; cfg < 12; cfg++) {
                        if (((cfg > 0 && cfg < 3) || (cfg > 4 && cfg < 7)) && n_tok != 1) continue;
                        const int var = cfg < 3 ? cfg + 1 : cfg >= 4 && cfg < 7 ? cfg - 3 : 1;
                        const struct cu_tuning tune = {.mmv_variant = var,
                                                       .mmv_fused = cfg < 3 ? 1 : cfg == 3 || cfg == 11 ? 2 : 3,
                                                       .mmv_kernel = cfg == 7 || cfg >= 10 ? 1 : cfg == 9 ? 3 : 2,
                                                       .pdl = cfg >= 8 ? 1 : 2,
                                                       .inq_kernel = cfg == 10 ? 1 : 2,
                                                       .in_kernel = cfg == 11 ? 1 : 2};
                        cu_set_tuning(d->cu, &tune);
                        for (int acc = 0; acc < 2; acc++) {
                            MUST(cu_memset(d->cu, d->y, 0xFF, (uint64_t)(n_tok * ldy) * sizeof(float)));
                            if (acc) {
                                for (int64_t i = 0; i < n_tok * n_out; i++) y0[i] = frand();
                                for (int64_t t = 0; t < n_tok; t++)
                                    MUST(cu_upload(d->cu, d->y + t * ldy, y0 + t * n_out,
                                                   (uint64_t)n_out * sizeof(float)));
                            }
                            const optiml_status st = cu_matmul_ex(d->cu, &w, d->x, &in, n_tok, d->y, ldy, acc);
                            double e = NAN;
                            bool gaps = true;
                            if (st == OPTIML_OK) {
                                MUST(cu_download(d->cu, yg, d->y, (uint64_t)(n_tok * ldy) * sizeof(float)));
                                MUST(cu_sync(d->cu));
                                for (int64_t t = 0; t < n_tok; t++) {
                                    memcpy(yc + t * n_out, yg + t * ldy, (size_t)n_out * sizeof(float));
                                    for (int64_t j = n_out; j < ldy; j++) {
                                        uint32_t bits;
                                        memcpy(&bits, &yg[t * ldy + j], 4);
                                        gaps = gaps && bits == 0xFFFFFFFFu;
                                    }
                                }
                                e = rel_error(yc, acc ? y0 : NULL, d->ref, n_tok * n_out, s2);
                            } else {
                                snprintf(err_text, sizeof(err_text), ": error %s", optiml_last_error());
                            }
                            const double tol = tolerance(type, n_tok > cu_matmul_mmv_max_tokens());
                            const bool case_ok = st == OPTIML_OK && e <= tol && gaps;
                            if (!case_ok || isnan(worst) || e > worst || !worst_what[0]) {
                                if (!case_ok || !(e <= worst)) worst = e;
                                snprintf(worst_what, sizeof(worst_what), "act=%d thr=%.2f %s%s%s", act, thr,
                                         cfg_names[cfg],
                                         acc ? " acc" : "", gaps ? "" : " (a gap between rows was written)");
                            }
                            if (!case_ok && ok) printf("  first failure: %s rel %.2e\n", worst_what, e);
                            ok = ok && case_ok;
                        }
                    }
                    const struct cu_tuning back = {.mmv_variant = 1, .mmv_fused = 3, .mmv_kernel = 2, .pdl = 2,
                                                   .inq_kernel = 2, .in_kernel = 2};
                    cu_set_tuning(d->cu, &back);
                }
            const double tol = tolerance(type, n_tok > cu_matmul_mmv_max_tokens());
            result(ok, "%-5s ex %-7s n_in=%-5lld n_out=%-5lld (3 parts, ldy +3) n_tok=%-3lld worst rel %.2e (%s) tol %.0e%s",
                   dtype_name(type), in_names[kind], (long long)n_in, (long long)n_out, (long long)n_tok, worst,
                   worst_what, tol, err_text);
        }
    }
    free(raw), free(xin), free(yg), free(y0), free(yc), free(norm);
    cu_dfree(dnorm);
    cu_weight_free(&w);
    host_weight_free(&h);
}

static void test_errors(struct dev *d) {
    result(!cu_type_supported(DTYPE_Q8_K) && !cu_type_supported(DTYPE_IQ2_XXS) && !cu_type_supported(DTYPE_COUNT) &&
               cu_type_supported(DTYPE_Q4_0),
           "cu_type_supported: q8_k, iq2_xxs and an unknown type refused, q4_0 accepted");
    uint8_t blob[1024] = {0};
    cu_weight w;
    optiml_status st = cu_weight_upload(d->cu, DTYPE_IQ4_NL, 32, 1, blob, NULL, 0, &w);
    result(st != OPTIML_OK && w.dev == NULL, "upload of an unsupported type fails: %s", optiml_last_error());
    st = cu_weight_upload(d->cu, DTYPE_Q4_0, 48, 1, blob, NULL, 0, &w);
    result(st != OPTIML_OK, "upload of q4_0 with n_in = 48 fails: %s", optiml_last_error());

    /* beyond the reserve: too many tokens, a too long row */
    struct host_weight h = host_weight_make(DTYPE_Q8_0, 2 * MAX_IN, 3);
    MUST(cu_weight_upload(d->cu, DTYPE_Q8_0, 2 * MAX_IN, 3, h.data, NULL, 0, &w));
    st = cu_matmul(d->cu, &w, d->x, 1, d->y, false);
    result(st != OPTIML_OK, "n_in %d above the reserved %d fails: %s", 2 * MAX_IN, MAX_IN, optiml_last_error());
    st = cu_matmul_gemm(d->cu, &w, d->x, MAX_TOK + 1, d->y, false);
    result(st != OPTIML_OK, "%d tokens above the reserved %d fail: %s", MAX_TOK + 1, MAX_TOK, optiml_last_error());
    /* growing the reserve makes the same call work */
    uint64_t bytes = 0;
    MUST(cu_matmul_reserve(d->cu, MAX_TOK, 2 * MAX_IN, MAX_OUT, &bytes));
    result(bytes == cu_matmul_scratch_bytes(MAX_TOK, 2 * MAX_IN, MAX_OUT), "grown reserve: %llu bytes, expected %llu",
           (unsigned long long)bytes, (unsigned long long)cu_matmul_scratch_bytes(MAX_TOK, 2 * MAX_IN, MAX_OUT));
    float *hx = xmalloc(2 * MAX_IN * sizeof(float));
    for (int i = 0; i < 2 * MAX_IN; i++) hx[i] = frand();
    MUST(cu_upload(d->cu, d->x, hx, 2 * MAX_IN * sizeof(float)));
    double s2;
    reference(&h, hx, 1, d->ref, &s2);
    const double e = run_product(d, cu_matmul, &w, 1, false, s2, &st);
    result(st == OPTIML_OK && e <= TOL_Q8_ACT, "after growing the reserve n_in %d works: rel %.2e", 2 * MAX_IN, e);
    free(hx);
    cu_weight_free(&w);
    host_weight_free(&h);
}

int main(int argc, char **argv) {
    /* --quick (for compute-sanitizer): rows up to 512 long, up to 300 rows */
    const int quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    if (cu_device_count() == 0) {
        printf("test_cuda_matmul: no CUDA device, skipped\n");
        return 77;
    }
    struct dev d;
    MUST(cu_init(0, &d.cu));
    printf("device: %s\n", cu_device_name(d.cu));
    uint64_t scratch = 0;
    MUST(cu_matmul_reserve(d.cu, MAX_TOK, MAX_IN, MAX_OUT, &scratch));
    result(scratch == cu_matmul_scratch_bytes(MAX_TOK, MAX_IN, MAX_OUT), "reserve: %llu bytes of scratch",
           (unsigned long long)scratch);
    MUST(cu_malloc(d.cu, (uint64_t)MAX_TOK * 2 * MAX_IN * sizeof(float), (void **)&d.x));
    MUST(cu_malloc(d.cu, (uint64_t)MAX_TOK * MAX_OUT * sizeof(float), (void **)&d.y));
    d.hy = xmalloc((size_t)MAX_TOK * MAX_OUT * sizeof(float));
    d.hy0 = xmalloc((size_t)MAX_TOK * MAX_OUT * sizeof(float));
    d.ref = xmalloc((size_t)MAX_TOK * MAX_OUT * sizeof(double));

    static const uint32_t types[] = {DTYPE_F32,  DTYPE_F16,  DTYPE_BF16, DTYPE_Q4_0, DTYPE_Q4_1,
                                     DTYPE_Q5_0, DTYPE_Q5_1, DTYPE_Q8_0, DTYPE_Q2_K, DTYPE_Q3_K,
                                     DTYPE_Q4_K, DTYPE_Q5_K, DTYPE_Q6_K};
    static const int64_t outs[] = {1, 7, 33, 300, 4096};
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        const uint32_t t = types[ti];
        /* the smallest row: one block (plain types: 37, a ragged length
         * that takes the scalar kernel) */
        const int64_t first = is_plain(t) ? 37 : (int64_t)dtype_block_size(t);
        const int64_t ins[] = {first, 512, 4096};
        for (int i = 0; i < (quick ? 2 : 3); i++)
            for (size_t o = 0; o < sizeof(outs) / sizeof(outs[0]) - (quick ? 1 : 0); o++)
                test_shape(&d, t, ins[i], outs[o]);
        test_get_rows(&d, t, first, 7);
        test_get_rows(&d, t, 512, 300);
    }
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        const int64_t first = is_plain(types[ti]) ? 64 : (int64_t)dtype_block_size(types[ti]);
        test_fused(&d, types[ti], first, 7);
        test_fused(&d, types[ti], 512, 300);
        if (!quick) test_fused(&d, types[ti], 4096, 257);
    }
    if (!quick) { /* long rows: 2..4 register groups per thread in the input + quantize kernel */
        test_fused(&d, DTYPE_Q4_0, 11008, 40);
        test_fused(&d, DTYPE_Q4_K, 11008, 40);
        test_fused(&d, DTYPE_Q6_K, 11008, 40);
        test_fused(&d, DTYPE_Q4_0, 13824, 20);
    }
    test_graph(&d, DTYPE_Q4_0, 1);
    test_graph(&d, DTYPE_Q4_K, 3);
    test_graph(&d, DTYPE_F16, 2);
    { /* the same with programmatic dependent launch */
        const struct cu_tuning on = {.pdl = 1}, off = {.pdl = 2};
        cu_set_tuning(d.cu, &on);
        printf("with programmatic dependent launch (pdl=1):\n");
        test_graph(&d, DTYPE_Q4_0, 1);
        test_graph(&d, DTYPE_Q4_K, 3);
        cu_set_tuning(d.cu, &off);
    }
    test_errors(&d);

    cu_dfree(d.x);
    cu_dfree(d.y);
    free(d.hy);
    free(d.hy0);
    free(d.ref);
    cu_free(d.cu);
    printf("test_cuda_matmul: %d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
