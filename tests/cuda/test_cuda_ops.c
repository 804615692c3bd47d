/*
 * test_cuda_ops.c - the CUDA non-matmul ops (src/cuda/ops.cu) against
 * independent references on fresh random inputs: RMS norm, RoPE and the
 * activations against the CPU's ops (src/cpu/ops.h), attention against a
 * plain double-precision softmax written here. Outputs are poisoned with
 * NaN (0xFF bytes) before every run so an unwritten value fails. Also runs
 * RoPE + attention captured in a CUDA graph and replayed with new positions,
 * cells and n_used, and times decode and prompt attention.
 *
 * Error: max |got - ref| / max |ref| over each case's outputs; tolerance
 * 1e-5 for the elementwise ops, 1e-4 for attention (f32 sums against a
 * double reference). Exit 1 on any failure, 77 without a CUDA device.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */

#include "cpu/ops.h"
#include "cuda/cuda.h"
#include "dtype.h"
#include "quant.h"
#include "test.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t rng_state = 0x243f6a8885a308d3ull;
static uint32_t urand(void) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(rng_state >> 33);
}
static float frand(void) { return (float)(urand() & 0xffffff) / 8388608.0f - 1.0f; } /* [-1, 1) */

static cu_ctx *cu;

#define CU_OK(call)                                                                                                    \
    do {                                                                                                               \
        optiml_status st_ = (call);                                                                                    \
        if (st_ != OPTIML_OK) {                                                                                        \
            fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #call, optiml_last_error());                 \
            exit(1);                                                                                                   \
        }                                                                                                              \
    } while (0)

static void *dalloc(uint64_t n) {
    void *p = NULL;
    CU_OK(cu_malloc(cu, n, &p));
    return p;
}
static void *dup_to_dev(const void *host, uint64_t n) {
    void *p = dalloc(n);
    CU_OK(cu_upload(cu, p, host, n));
    return p;
}
static void poison(void *dev, uint64_t n) { CU_OK(cu_memset(cu, dev, 0xFF, n)); }
static void fetch(void *host, const void *dev, uint64_t n) {
    CU_OK(cu_download(cu, host, dev, n));
    CU_OK(cu_sync(cu));
}
static float *frand_array(int64_t n, float scale) {
    float *a = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) a[i] = frand() * scale;
    return a;
}

/* max |got - ref| / max |ref|; NaN anywhere gives NaN (a failure). */
static double rel_err_f(const float *got, const float *ref, int64_t n) {
    double md = 0.0, mr = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - ref[i]);
        if (isnan(got[i]) || isnan(d)) return NAN;
        if (d > md) md = d;
        if (fabs(ref[i]) > mr) mr = fabs(ref[i]);
    }
    return mr > 0.0 ? md / mr : md;
}
static double rel_err_d(const float *got, const double *ref, int64_t n) {
    double md = 0.0, mr = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - ref[i]);
        if (isnan(got[i]) || isnan(d)) return NAN;
        if (d > md) md = d;
        if (fabs(ref[i]) > mr) mr = fabs(ref[i]);
    }
    return mr > 0.0 ? md / mr : md;
}

static void report(const char *what, double err, double tol) {
    const int ok = err <= tol; /* false for NaN */
    test_n_checks++;
    if (!ok) test_n_failed++;
    printf("%s %s: max rel err %.3g (tol %.0e)\n", ok ? "PASS" : "FAIL", what, err, tol);
}

/* ---- RMS norm ---------------------------------------------------------------- */

static void test_rmsnorm(int64_t n, int64_t n_rows, int use_rows, float eps) {
    const int64_t n_src = n_rows + 3;
    float *x = frand_array(n_src * n, 3.0f), *w = frand_array(n, 1.0f);
    int32_t *rows = malloc((size_t)n_rows * sizeof(int32_t));
    for (int64_t i = 0; i < n_rows; i++) rows[i] = (int32_t)(urand() % n_src); /* repeats allowed */
    float *ref = malloc((size_t)(n_rows * n) * sizeof(float)), *got = malloc((size_t)(n_rows * n) * sizeof(float));
    for (int64_t i = 0; i < n_rows; i++) ops_rmsnorm(ref + i * n, x + (use_rows ? rows[i] : i) * n, w, n, eps);
    float *dx = dup_to_dev(x, n_src * n * sizeof(float)), *dw = dup_to_dev(w, n * sizeof(float));
    int32_t *drows = dup_to_dev(rows, n_rows * sizeof(int32_t) + 4);
    float *dout = dalloc(n_rows * n * sizeof(float));
    poison(dout, n_rows * n * sizeof(float));
    CU_OK(cu_rmsnorm(cu, dout, dx, dw, n, n_rows, use_rows ? drows : NULL, eps));
    fetch(got, dout, n_rows * n * sizeof(float));
    char what[160];
    snprintf(what, sizeof(what), "rmsnorm n=%lld rows=%lld%s eps=%g", (long long)n, (long long)n_rows,
             use_rows ? " (indirect)" : "", eps);
    report(what, rel_err_f(got, ref, n_rows * n), 1e-5);
    cu_dfree(dx), cu_dfree(dw), cu_dfree(drows), cu_dfree(dout);
    free(x), free(w), free(rows), free(ref), free(got);
}

/* ---- activations -------------------------------------------------------------- */

static void test_act(int64_t n, int act) {
    static const char *names[] = {"silu", "relu", "relu2", "gelu", "drelu", "relu_nogate"};
    float *g = frand_array(n, 6.0f), *u = frand_array(n, 2.0f);
    float *ref = malloc((size_t)n * sizeof(float)), *got = malloc((size_t)n * sizeof(float));
    memcpy(ref, g, (size_t)n * sizeof(float));
    ops_act_mul(ref, u, n, (enum ffn_act)act);
    float *dg = dup_to_dev(g, n * sizeof(float)), *du = dup_to_dev(u, n * sizeof(float));
    CU_OK(cu_act_mul(cu, dg, du, n, act));
    fetch(got, dg, n * sizeof(float));
    char what[96];
    snprintf(what, sizeof(what), "act_mul %s n=%lld", names[act], (long long)n);
    report(what, rel_err_f(got, ref, n), 1e-5);
    cu_dfree(dg), cu_dfree(du);
    free(g), free(u), free(ref), free(got);
}

/* ---- the batch and KV-cache state shared by the RoPE and attention tests ------------ */

struct kv_state {
    int32_t n_tok, n_ctx, n_seq;
    uint32_t n_used;
    int32_t *pos, *seq, *cell; /* (n_tok)  */
    int32_t *cell_pos;         /* (n_ctx)  */
    uint64_t *cell_seq;        /* (n_ctx)  */
};

/* A random cache: n_tok distinct batch cells among the first n_used, the
 * other used cells free (1 in 8) or history of 1-2 of n_seq sequences,
 * interleaved; cells >= n_used free. Batch entries continue their
 * sequence's positions, so each sees its own cell and earlier ones. */
static void kv_state_init(struct kv_state *s, int32_t n_tok, int32_t n_ctx, uint32_t n_used, int32_t n_seq) {
    memset(s, 0, sizeof(*s));
    s->n_tok = n_tok, s->n_ctx = n_ctx, s->n_used = n_used, s->n_seq = n_seq;
    s->pos = malloc((size_t)n_tok * sizeof(int32_t));
    s->seq = malloc((size_t)n_tok * sizeof(int32_t));
    s->cell = malloc((size_t)n_tok * sizeof(int32_t));
    s->cell_pos = malloc((size_t)n_ctx * sizeof(int32_t));
    s->cell_seq = malloc((size_t)n_ctx * sizeof(uint64_t));
    char *taken = calloc((size_t)n_ctx, 1);
    for (int32_t t = 0; t < n_tok; t++) {
        int32_t c;
        do c = (t == 0) ? (int32_t)n_used - 1 : (int32_t)(urand() % n_used); /* n_used is tight */
        while (taken[c]);
        taken[c] = 1;
        s->cell[t] = c;
    }
    int32_t next[64] = {0};
    for (int32_t c = 0; c < n_ctx; c++) {
        s->cell_pos[c] = -1;
        s->cell_seq[c] = 0;
        if (c >= (int32_t)n_used || taken[c] || urand() % 8 == 0) continue;
        const int32_t a = (int32_t)(urand() % n_seq), b = (int32_t)(urand() % n_seq);
        const int shared = urand() % 5 == 0 && a != b; /* a shared prompt prefix */
        int32_t p = next[a];
        if (shared && next[b] > p) p = next[b];
        s->cell_pos[c] = p;
        s->cell_seq[c] = 1ull << a;
        next[a] = p + 1;
        if (shared) s->cell_seq[c] |= 1ull << b, next[b] = p + 1;
    }
    for (int32_t t = 0; t < n_tok; t++) {
        s->seq[t] = (int32_t)(urand() % n_seq);
        s->pos[t] = next[s->seq[t]]++;
        s->cell_pos[s->cell[t]] = s->pos[t];
        s->cell_seq[s->cell[t]] = 1ull << s->seq[t];
    }
    free(taken);
}

static void kv_state_free(struct kv_state *s) {
    free(s->pos), free(s->seq), free(s->cell), free(s->cell_pos), free(s->cell_seq);
}

/* Device copies of a kv_state, wired into a cu_batch. */
struct dev_batch {
    int32_t *pos, *seq, *cell, *cell_pos;
    uint64_t *cell_seq;
    uint32_t *n_used;
    struct cu_batch b;
};

static void dev_batch_init(struct dev_batch *d, int32_t n_tok, int32_t n_ctx) {
    d->pos = dalloc(n_tok * sizeof(int32_t));
    d->seq = dalloc(n_tok * sizeof(int32_t));
    d->cell = dalloc(n_tok * sizeof(int32_t));
    d->cell_pos = dalloc(n_ctx * sizeof(int32_t));
    d->cell_seq = dalloc(n_ctx * sizeof(uint64_t));
    d->n_used = dalloc(sizeof(uint32_t));
    d->b = (struct cu_batch){.pos = d->pos,
                             .seq = d->seq,
                             .cell = d->cell,
                             .cell_pos = d->cell_pos,
                             .cell_seq = d->cell_seq,
                             .n_used = d->n_used};
}
static void dev_batch_upload(struct dev_batch *d, const struct kv_state *s) {
    CU_OK(cu_upload(cu, d->pos, s->pos, s->n_tok * sizeof(int32_t)));
    CU_OK(cu_upload(cu, d->seq, s->seq, s->n_tok * sizeof(int32_t)));
    CU_OK(cu_upload(cu, d->cell, s->cell, s->n_tok * sizeof(int32_t)));
    CU_OK(cu_upload(cu, d->cell_pos, s->cell_pos, s->n_ctx * sizeof(int32_t)));
    CU_OK(cu_upload(cu, d->cell_seq, s->cell_seq, s->n_ctx * sizeof(uint64_t)));
    CU_OK(cu_upload(cu, d->n_used, &s->n_used, sizeof(uint32_t)));
    CU_OK(cu_sync(cu)); /* the host arrays may change right after */
}
static void dev_batch_free(struct dev_batch *d) {
    cu_dfree(d->pos), cu_dfree(d->seq), cu_dfree(d->cell), cu_dfree(d->cell_pos), cu_dfree(d->cell_seq);
    cu_dfree(d->n_used);
}

/* ---- RoPE + store --------------------------------------------------------------- */

static float *inv_freq_make(int32_t n_rot) {
    float *f = malloc((size_t)(n_rot / 2 + 1) * sizeof(float));
    for (int32_t i = 0; i < n_rot / 2; i++) f[i] = (float)pow(10000.0, -2.0 * i / n_rot);
    return f;
}

/* The CPU's rope_prepare + rope_and_store on host arrays. */
static void rope_store_ref(float *q, float *k, const float *v, float *kc, float *vc, const struct kv_state *s,
                           int32_t n_head, int32_t n_head_kv, int32_t hd, int32_t n_rot, const float *inv_freq,
                           bool neox) {
    void (*rope)(float *, const float *, int64_t) = neox ? ops_rope_neox : ops_rope;
    const int64_t n_q = (int64_t)n_head * hd, n_kv = (int64_t)n_head_kv * hd;
    float *cs = malloc((size_t)(n_rot + 2) * sizeof(float));
    for (int32_t t = 0; t < s->n_tok; t++) {
        for (int32_t j = 0; j < n_rot / 2; j++) {
            float a = (float)s->pos[t] * inv_freq[j];
            cs[2 * j] = cosf(a);
            cs[2 * j + 1] = sinf(a);
        }
        for (int32_t h = 0; h < n_head; h++) rope(q + t * n_q + h * hd, cs, n_rot);
        for (int32_t h = 0; h < n_head_kv; h++) rope(k + t * n_kv + h * hd, cs, n_rot);
        memcpy(kc + (int64_t)s->cell[t] * n_kv, k + t * n_kv, (size_t)n_kv * sizeof(float));
        memcpy(vc + (int64_t)s->cell[t] * n_kv, v + t * n_kv, (size_t)n_kv * sizeof(float));
    }
    free(cs);
}

static void test_rope(int32_t hd, int32_t n_head, int32_t n_head_kv, int32_t n_rot, int32_t n_tok) {
    const int32_t n_ctx = n_tok * 2 + 16;
    const int64_t n_q = (int64_t)n_head * hd, n_kv = (int64_t)n_head_kv * hd;
    struct kv_state s;
    kv_state_init(&s, n_tok, n_ctx, (uint32_t)(n_tok + 8), 2);
    for (int32_t t = 0; t < n_tok; t++) s.pos[t] = (int32_t)(urand() % 5000); /* large angles too */
    float *q = frand_array(n_tok * n_q, 1.0f), *k = frand_array(n_tok * n_kv, 1.0f);
    float *v = frand_array(n_tok * n_kv, 1.0f);
    float *kc = frand_array(n_ctx * n_kv, 1.0f), *vc = frand_array(n_ctx * n_kv, 1.0f);
    float *f = inv_freq_make(n_rot);
    float *dq = dup_to_dev(q, n_tok * n_q * sizeof(float)), *dk = dup_to_dev(k, n_tok * n_kv * sizeof(float));
    float *dv = dup_to_dev(v, n_tok * n_kv * sizeof(float)), *df = dup_to_dev(f, (n_rot / 2 + 1) * sizeof(float));
    /* the cache: random rows that must stay, NaN rows that must be written */
    float *kc0 = malloc((size_t)(n_ctx * n_kv) * sizeof(float)), *vc0 = malloc((size_t)(n_ctx * n_kv) * sizeof(float));
    memcpy(kc0, kc, (size_t)(n_ctx * n_kv) * sizeof(float));
    memcpy(vc0, vc, (size_t)(n_ctx * n_kv) * sizeof(float));
    for (int32_t t = 0; t < n_tok; t++)
        for (int64_t i = 0; i < n_kv; i++) kc0[s.cell[t] * n_kv + i] = vc0[s.cell[t] * n_kv + i] = NAN;
    float *dkc = dup_to_dev(kc0, n_ctx * n_kv * sizeof(float)), *dvc = dup_to_dev(vc0, n_ctx * n_kv * sizeof(float));
    struct dev_batch db;
    dev_batch_init(&db, n_tok, n_ctx);
    dev_batch_upload(&db, &s);
    CU_OK(cu_rope_store(cu, dq, dk, dv, dkc, dvc, n_tok, n_head, n_head_kv, hd, n_rot, df, &db.b));
    rope_store_ref(q, k, v, kc, vc, &s, n_head, n_head_kv, hd, n_rot, f, false);
    float *got = malloc((size_t)(n_ctx * n_kv > n_tok * n_q ? n_ctx * n_kv : n_tok * n_q) * sizeof(float));
    char what[160];
    const char *parts[] = {"q", "k", "k cache", "v cache"};
    const float *refs[] = {q, k, kc, vc};
    const void *devs[] = {dq, dk, dkc, dvc};
    const int64_t ns[] = {n_tok * n_q, n_tok * n_kv, n_ctx * n_kv, n_ctx * n_kv};
    for (int i = 0; i < 4; i++) {
        fetch(got, devs[i], ns[i] * sizeof(float));
        snprintf(what, sizeof(what), "rope_store %s hd=%d heads=%d/%d n_rot=%d n_tok=%d", parts[i], hd, n_head,
                 n_head_kv, n_rot, n_tok);
        report(what, rel_err_f(got, refs[i], ns[i]), 1e-5);
    }
    dev_batch_free(&db);
    cu_dfree(dq), cu_dfree(dk), cu_dfree(dv), cu_dfree(df), cu_dfree(dkc), cu_dfree(dvc);
    free(q), free(k), free(v), free(kc), free(vc), free(kc0), free(vc0), free(f), free(got);
    kv_state_free(&s);
}

/* cu_rope_store_qkv: q, k, v read from one row of q|k|v (ld with padding),
 * rotated q written to its own poisoned buffer, k and v to the cache; with
 * bias, a random q|k|v bias added first (as ops_add); neox: NeoX pairs. */
static void test_rope_qkv(int32_t hd, int32_t n_head, int32_t n_head_kv, int32_t n_rot, int32_t n_tok, bool bias,
                          bool neox) {
    const int32_t n_ctx = n_tok * 2 + 16;
    const int64_t n_q = (int64_t)n_head * hd, n_kv = (int64_t)n_head_kv * hd, ld = n_q + 2 * n_kv + 6;
    struct kv_state s;
    kv_state_init(&s, n_tok, n_ctx, (uint32_t)(n_tok + 8), 2);
    for (int32_t t = 0; t < n_tok; t++) s.pos[t] = (int32_t)(urand() % 5000);
    float *qkv = frand_array(n_tok * ld, 1.0f);
    float *q = malloc((size_t)(n_tok * n_q) * sizeof(float)), *k = malloc((size_t)(n_tok * n_kv) * sizeof(float));
    float *v = malloc((size_t)(n_tok * n_kv) * sizeof(float));
    float *b = bias ? frand_array(n_q + 2 * n_kv, 1.0f) : NULL;
    for (int32_t t = 0; t < n_tok; t++) {
        memcpy(q + t * n_q, qkv + t * ld, (size_t)n_q * sizeof(float));
        memcpy(k + t * n_kv, qkv + t * ld + n_q, (size_t)n_kv * sizeof(float));
        memcpy(v + t * n_kv, qkv + t * ld + n_q + n_kv, (size_t)n_kv * sizeof(float));
        if (b) {
            ops_add(q + t * n_q, b, n_q);
            ops_add(k + t * n_kv, b + n_q, n_kv);
            ops_add(v + t * n_kv, b + n_q + n_kv, n_kv);
        }
    }
    float *dbias = b ? dup_to_dev(b, (n_q + 2 * n_kv) * sizeof(float)) : NULL;
    float *kc = frand_array(n_ctx * n_kv, 1.0f), *vc = frand_array(n_ctx * n_kv, 1.0f);
    float *kc0 = malloc((size_t)(n_ctx * n_kv) * sizeof(float)), *vc0 = malloc((size_t)(n_ctx * n_kv) * sizeof(float));
    memcpy(kc0, kc, (size_t)(n_ctx * n_kv) * sizeof(float));
    memcpy(vc0, vc, (size_t)(n_ctx * n_kv) * sizeof(float));
    for (int32_t t = 0; t < n_tok; t++)
        for (int64_t i = 0; i < n_kv; i++) kc0[s.cell[t] * n_kv + i] = vc0[s.cell[t] * n_kv + i] = NAN;
    float *f = inv_freq_make(n_rot);
    float *dqkv = dup_to_dev(qkv, n_tok * ld * sizeof(float)), *df = dup_to_dev(f, (n_rot / 2 + 1) * sizeof(float));
    float *dq = dalloc(n_tok * n_q * sizeof(float));
    poison(dq, n_tok * n_q * sizeof(float));
    float *dkc = dup_to_dev(kc0, n_ctx * n_kv * sizeof(float)), *dvc = dup_to_dev(vc0, n_ctx * n_kv * sizeof(float));
    struct dev_batch db;
    dev_batch_init(&db, n_tok, n_ctx);
    dev_batch_upload(&db, &s);
    CU_OK(cu_rope_store_qkv(cu, dqkv, ld, dq, dkc, dvc, n_tok, n_head, n_head_kv, hd, n_rot, df, dbias, neox, &db.b));
    rope_store_ref(q, k, v, kc, vc, &s, n_head, n_head_kv, hd, n_rot, f, neox);
    float *got = malloc((size_t)(n_ctx * n_kv > n_tok * n_q ? n_ctx * n_kv : n_tok * n_q) * sizeof(float));
    char what[160];
    const char *parts[] = {"q", "k cache", "v cache"};
    const float *refs[] = {q, kc, vc};
    const void *devs[] = {dq, dkc, dvc};
    const int64_t ns[] = {n_tok * n_q, n_ctx * n_kv, n_ctx * n_kv};
    for (int i = 0; i < 3; i++) {
        fetch(got, devs[i], ns[i] * sizeof(float));
        snprintf(what, sizeof(what), "rope_store_qkv %s hd=%d heads=%d/%d n_rot=%d n_tok=%d ld=%lld%s%s", parts[i],
                 hd, n_head, n_head_kv, n_rot, n_tok, (long long)ld, bias ? " bias" : "", neox ? " neox" : "");
        report(what, rel_err_f(got, refs[i], ns[i]), 1e-5);
    }
    dev_batch_free(&db);
    cu_dfree(dqkv), cu_dfree(dq), cu_dfree(df), cu_dfree(dkc), cu_dfree(dvc);
    if (dbias) cu_dfree(dbias);
    free(qkv), free(q), free(k), free(v), free(kc), free(vc), free(kc0), free(vc0), free(f), free(got), free(b);
    kv_state_free(&s);
}

/* ---- attention ---------------------------------------------------------------------- */

/* softmax(q K^T / sqrt(hd)) V in double over the visible cells (the CPU's
 * rule); zeros when none is visible. */
static void attention_ref(double *out, const float *q, const float *kc, const float *vc, const struct kv_state *s,
                          int32_t n_head, int32_t n_head_kv, int32_t hd) {
    const int64_t n_q = (int64_t)n_head * hd, n_kv = (int64_t)n_head_kv * hd;
    const int32_t group = n_head / n_head_kv;
    double *sc = malloc((size_t)s->n_ctx * sizeof(double));
    for (int32_t t = 0; t < s->n_tok; t++)
        for (int32_t h = 0; h < n_head; h++) {
            const float *qh = q + t * n_q + h * hd;
            const int64_t koff = (int64_t)(h / group) * hd;
            double mx = -INFINITY;
            for (uint32_t c = 0; c < s->n_used; c++) {
                const int vis = s->cell_pos[c] >= 0 && s->cell_pos[c] <= s->pos[t] && (s->cell_seq[c] >> s->seq[t] & 1);
                sc[c] = -INFINITY;
                if (!vis) continue;
                double d = 0.0;
                for (int32_t i = 0; i < hd; i++) d += (double)qh[i] * kc[c * n_kv + koff + i];
                sc[c] = d / sqrt((double)hd);
                if (sc[c] > mx) mx = sc[c];
            }
            double *o = out + t * n_q + h * hd, sum = 0.0;
            for (int32_t i = 0; i < hd; i++) o[i] = 0.0;
            for (uint32_t c = 0; c < s->n_used; c++) {
                if (sc[c] == -INFINITY) continue;
                const double w = exp(sc[c] - mx);
                sum += w;
                for (int32_t i = 0; i < hd; i++) o[i] += w * vc[c * n_kv + koff + i];
            }
            if (sum > 0.0)
                for (int32_t i = 0; i < hd; i++) o[i] /= sum;
        }
    free(sc);
}

/* A cache whose free cells hold NaN (a kernel must not read them) and used
 * cells random values. */
static float *cache_make(const struct kv_state *s, int64_t n_kv) {
    float *c = frand_array(s->n_ctx * n_kv, 1.0f);
    for (int32_t i = 0; i < s->n_ctx; i++)
        if (s->cell_pos[i] < 0)
            for (int64_t j = 0; j < n_kv; j++) c[i * n_kv + j] = NAN;
    return c;
}

/* f32 kernels: 1e-4; the tensor-core prompt kernel rounds Q, K, P and V
 * to f16 (4 roundings of relative 2^-11 = 4.9e-4 each, on scores of up
 * to about +-5 after scaling): 2e-3 */
static double att_tol = 1e-4;

static void test_attention(int32_t hd, int32_t n_head, int32_t n_head_kv, int32_t n_tok, int32_t n_ctx, uint32_t n_used,
                           int32_t n_seq, int blind_last) {
    const int64_t n_q = (int64_t)n_head * hd, n_kv = (int64_t)n_head_kv * hd;
    struct kv_state s;
    kv_state_init(&s, n_tok, n_ctx, n_used, n_seq);
    if (blind_last) s.pos[n_tok - 1] = -1; /* sees no cell: must give zeros */
    float *q = frand_array(n_tok * n_q, 2.0f), *kc = cache_make(&s, n_kv), *vc = cache_make(&s, n_kv);
    double *ref = malloc((size_t)(n_tok * n_q) * sizeof(double));
    float *got = malloc((size_t)(n_tok * n_q) * sizeof(float));
    attention_ref(ref, q, kc, vc, &s, n_head, n_head_kv, hd);
    float *dq = dup_to_dev(q, n_tok * n_q * sizeof(float));
    float *dkc = dup_to_dev(kc, n_ctx * n_kv * sizeof(float)), *dvc = dup_to_dev(vc, n_ctx * n_kv * sizeof(float));
    float *dout = dalloc(n_tok * n_q * sizeof(float));
    const uint64_t sb = cu_attention_scratch_bytes(n_tok, n_head, hd, (uint32_t)n_ctx);
    void *scratch = dalloc(sb);
    poison(scratch, sb);
    struct dev_batch db;
    dev_batch_init(&db, n_tok, n_ctx);
    dev_batch_upload(&db, &s);
    poison(dout, n_tok * n_q * sizeof(float));
    CU_OK(cu_attention(cu, dq, dkc, dvc, dout, n_tok, n_head, n_head_kv, hd, (uint32_t)n_ctx, &db.b, scratch));
    fetch(got, dout, n_tok * n_q * sizeof(float));
    char what[200];
    snprintf(what, sizeof(what), "attention hd=%d heads=%d/%d n_tok=%d n_ctx=%d n_used=%u seqs=%d%s", hd, n_head,
             n_head_kv, n_tok, n_ctx, n_used, n_seq, blind_last ? " (last token blind)" : "");
    report(what, rel_err_d(got, ref, n_tok * n_q), att_tol);
    dev_batch_free(&db);
    cu_dfree(dq), cu_dfree(dkc), cu_dfree(dvc), cu_dfree(dout), cu_dfree(scratch);
    free(q), free(kc), free(vc), free(ref), free(got);
    kv_state_free(&s);
}

/* cu_attention_q8 (decode kernel 3 leaving its output quantized in the
 * matmul scratch) then cu_matmul_prequant with a q8_0 weight must equal, bit
 * for bit, cu_attention's f32 output multiplied by cu_matmul_ex (whose input
 * kernel quantizes the same values); the f32 output is checked against the
 * double reference as in test_attention. */
static void test_attention_q8(int32_t hd, int32_t n_head, int32_t n_head_kv, int32_t n_tok, int32_t n_ctx,
                              uint32_t n_used, int32_t n_seq) {
    const int64_t n_q = (int64_t)n_head * hd, n_kv = (int64_t)n_head_kv * hd, n_out = 72;
    struct kv_state s;
    kv_state_init(&s, n_tok, n_ctx, n_used, n_seq);
    float *q = frand_array(n_tok * n_q, 2.0f), *kc = cache_make(&s, n_kv), *vc = cache_make(&s, n_kv);
    double *ref = malloc((size_t)(n_tok * n_q) * sizeof(double));
    float *got = malloc((size_t)(n_tok * n_q) * sizeof(float));
    attention_ref(ref, q, kc, vc, &s, n_head, n_head_kv, hd);
    /* a q8_0 weight of n_out rows, quantized by src/quant.c */
    uint64_t rs = 0;
    if (!dtype_row_size(DTYPE_Q8_0, (uint64_t)n_q, &rs)) abort();
    float *wf = frand_array(n_out * n_q, 1.0f);
    uint8_t *wq = malloc((size_t)(rs * (uint64_t)n_out));
    for (int64_t r = 0; r < n_out; r++) quant_quantizer(DTYPE_Q8_0)(n_q, wf + r * n_q, wq + (uint64_t)r * rs);
    cu_weight w;
    CU_OK(cu_weight_upload(cu, DTYPE_Q8_0, n_q, n_out, wq, NULL, 0, &w));
    CU_OK(cu_matmul_reserve(cu, n_tok, n_q, n_out, NULL));
    float *dq = dup_to_dev(q, n_tok * n_q * sizeof(float));
    float *dkc = dup_to_dev(kc, n_ctx * n_kv * sizeof(float)), *dvc = dup_to_dev(vc, n_ctx * n_kv * sizeof(float));
    float *dout = dalloc(n_tok * n_q * sizeof(float));
    float *dy1 = dalloc(n_tok * n_out * sizeof(float)), *dy2 = dalloc(n_tok * n_out * sizeof(float));
    const uint64_t sb = cu_attention_scratch_bytes(n_tok, n_head, hd, (uint32_t)n_ctx);
    void *scratch = dalloc(sb);
    poison(scratch, sb);
    struct dev_batch db;
    dev_batch_init(&db, n_tok, n_ctx);
    dev_batch_upload(&db, &s);
    poison(dout, n_tok * n_q * sizeof(float));
    poison(dy1, n_tok * n_out * sizeof(float));
    poison(dy2, n_tok * n_out * sizeof(float));
    bool quantized = false;
    CU_OK(cu_attention_q8(cu, dq, dkc, dvc, dout, n_tok, n_head, n_head_kv, hd, (uint32_t)n_ctx, &db.b, scratch,
                          &quantized));
    if (quantized) CU_OK(cu_matmul_prequant(cu, &w, n_tok, dy1, 0, false));
    fetch(got, dout, n_tok * n_q * sizeof(float));
    char what[200];
    snprintf(what, sizeof(what), "attention_q8 hd=%d heads=%d/%d n_tok=%d n_ctx=%d n_used=%u seqs=%d", hd, n_head,
             n_head_kv, n_tok, n_ctx, n_used, n_seq);
    report(what, rel_err_d(got, ref, n_tok * n_q), att_tol);
    CU_OK(cu_matmul_ex(cu, &w, dout, NULL, n_tok, dy2, 0, false));
    float *y1 = malloc((size_t)(n_tok * n_out) * sizeof(float)), *y2 = malloc((size_t)(n_tok * n_out) * sizeof(float));
    fetch(y1, dy1, n_tok * n_out * sizeof(float));
    fetch(y2, dy2, n_tok * n_out * sizeof(float));
    int64_t diff = 0;
    for (int64_t i = 0; i < n_tok * n_out; i++) diff += dtype_f32_bits(y1[i]) != dtype_f32_bits(y2[i]);
    test_n_checks++;
    if (!quantized || diff) test_n_failed++;
    printf("%s %s: %s, then cu_matmul_prequant vs cu_matmul_ex: %lld of %lld outputs differ\n",
           quantized && !diff ? "PASS" : "FAIL", what, quantized ? "quantized in the kernel" : "NOT quantized",
           (long long)diff, (long long)(n_tok * n_out));
    dev_batch_free(&db);
    cu_weight_free(&w);
    cu_dfree(dq), cu_dfree(dkc), cu_dfree(dvc), cu_dfree(dout), cu_dfree(dy1), cu_dfree(dy2), cu_dfree(scratch);
    free(q), free(kc), free(vc), free(ref), free(got), free(wf), free(wq), free(y1), free(y2);
    kv_state_free(&s);
}

/* ---- a captured decode step, replayed ----------------------------------------------------- */

/* Captures rope_store + attention for one token, then replays 3 steps of
 * one sequence (new position, a new cell anywhere in the cache, n_used
 * following) with the batch arrays uploaded between replays. */
static void test_graph(int32_t hd, int32_t n_head, int32_t n_head_kv, int32_t n_ctx) {
    const int64_t n_q = (int64_t)n_head * hd, n_kv = (int64_t)n_head_kv * hd;
    struct kv_state s;
    kv_state_init(&s, 1, n_ctx, (uint32_t)n_ctx / 2, 1);
    float *kc = cache_make(&s, n_kv), *vc = cache_make(&s, n_kv), *f = inv_freq_make(hd);
    float *dkc = dup_to_dev(kc, n_ctx * n_kv * sizeof(float)), *dvc = dup_to_dev(vc, n_ctx * n_kv * sizeof(float));
    float *dq = dalloc(n_q * sizeof(float)), *dk = dalloc(n_kv * sizeof(float)), *dv = dalloc(n_kv * sizeof(float));
    float *dout = dalloc(n_q * sizeof(float)), *df = dup_to_dev(f, (hd / 2 + 1) * sizeof(float));
    const uint64_t sb = cu_attention_scratch_bytes(1, n_head, hd, (uint32_t)n_ctx);
    void *scratch = dalloc(sb);
    struct dev_batch db;
    dev_batch_init(&db, 1, n_ctx);
    cu_graph *g = NULL;
    CU_OK(cu_graph_begin(cu));
    CU_OK(cu_rope_store(cu, dq, dk, dv, dkc, dvc, 1, n_head, n_head_kv, hd, hd, df, &db.b));
    CU_OK(cu_attention(cu, dq, dkc, dvc, dout, 1, n_head, n_head_kv, hd, (uint32_t)n_ctx, &db.b, scratch));
    CU_OK(cu_graph_end(cu, &g));
    double *ref = malloc((size_t)n_q * sizeof(double));
    float *got = malloc((size_t)n_q * sizeof(float));
    for (int step = 0; step < 3; step++) {
        if (step > 0) { /* the next token of the sequence, in a free cell */
            int32_t c;
            do c = (int32_t)(urand() % (uint32_t)n_ctx);
            while (s.cell_pos[c] >= 0);
            s.cell[0] = c;
            s.pos[0]++;
            s.cell_pos[c] = s.pos[0];
            s.cell_seq[c] = 1ull << s.seq[0];
            if ((uint32_t)c >= s.n_used) s.n_used = (uint32_t)c + 1;
        }
        float *q = frand_array(n_q, 2.0f), *k = frand_array(n_kv, 1.0f), *v = frand_array(n_kv, 1.0f);
        CU_OK(cu_upload(cu, dq, q, n_q * sizeof(float)));
        CU_OK(cu_upload(cu, dk, k, n_kv * sizeof(float)));
        CU_OK(cu_upload(cu, dv, v, n_kv * sizeof(float)));
        dev_batch_upload(&db, &s);
        poison(dout, n_q * sizeof(float));
        CU_OK(cu_graph_launch(cu, g));
        fetch(got, dout, n_q * sizeof(float));
        rope_store_ref(q, k, v, kc, vc, &s, n_head, n_head_kv, hd, hd, f, false);
        attention_ref(ref, q, kc, vc, &s, n_head, n_head_kv, hd);
        char what[160];
        snprintf(what, sizeof(what), "graph step %d hd=%d heads=%d/%d n_ctx=%d pos=%d cell=%d n_used=%u", step, hd,
                 n_head, n_head_kv, n_ctx, s.pos[0], s.cell[0], s.n_used);
        report(what, rel_err_d(got, ref, n_q), 1e-4);
        free(q), free(k), free(v);
    }
    cu_graph_free(g);
    dev_batch_free(&db);
    cu_dfree(dkc), cu_dfree(dvc), cu_dfree(dq), cu_dfree(dk), cu_dfree(dv), cu_dfree(dout), cu_dfree(df);
    cu_dfree(scratch);
    free(kc), free(vc), free(f), free(ref), free(got);
    kv_state_free(&s);
}

/* ---- timings ----------------------------------------------------------------------------- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* One sequence at positions 0..n_used-1 in cells 0..n_used-1, the batch
 * its last n_tok tokens (causal prompt, or one decode token). */
static void time_attention(int32_t hd, int32_t n_head, int32_t n_tok, uint32_t n_used, int reps) {
    const int32_t n_ctx = (int32_t)n_used;
    const int64_t n_q = (int64_t)n_head * hd, n_kv = (int64_t)n_head * hd;
    struct kv_state s;
    memset(&s, 0, sizeof(s));
    s.n_tok = n_tok, s.n_ctx = n_ctx, s.n_used = n_used, s.n_seq = 1;
    s.pos = malloc((size_t)n_tok * sizeof(int32_t));
    s.seq = calloc((size_t)n_tok, sizeof(int32_t));
    s.cell = malloc((size_t)n_tok * sizeof(int32_t));
    s.cell_pos = malloc((size_t)n_ctx * sizeof(int32_t));
    s.cell_seq = malloc((size_t)n_ctx * sizeof(uint64_t));
    for (int32_t c = 0; c < n_ctx; c++) s.cell_pos[c] = c, s.cell_seq[c] = 1;
    for (int32_t t = 0; t < n_tok; t++) s.pos[t] = s.cell[t] = n_ctx - n_tok + t;
    float *q = frand_array(n_tok * n_q, 1.0f), *kc = frand_array(n_ctx * n_kv, 1.0f);
    float *dq = dup_to_dev(q, n_tok * n_q * sizeof(float));
    float *dkc = dup_to_dev(kc, n_ctx * n_kv * sizeof(float)), *dvc = dup_to_dev(kc, n_ctx * n_kv * sizeof(float));
    float *dout = dalloc(n_tok * n_q * sizeof(float));
    void *scratch = dalloc(cu_attention_scratch_bytes(n_tok, n_head, hd, n_used));
    struct dev_batch db;
    dev_batch_init(&db, n_tok, n_ctx);
    dev_batch_upload(&db, &s);
    for (int i = 0; i < 3; i++)
        CU_OK(cu_attention(cu, dq, dkc, dvc, dout, n_tok, n_head, n_head, hd, n_used, &db.b, scratch));
    CU_OK(cu_sync(cu));
    const double t0 = now_s();
    for (int i = 0; i < reps; i++)
        CU_OK(cu_attention(cu, dq, dkc, dvc, dout, n_tok, n_head, n_head, hd, n_used, &db.b, scratch));
    CU_OK(cu_sync(cu));
    const double dt = (now_s() - t0) / reps;
    const double bytes = 2.0 * n_used * n_kv * sizeof(float);
    printf("TIME attention n_tok=%d heads=%d hd=%d n_used=%u: %.1f us, K+V %.1f MiB, %.0f GB/s\n", n_tok, n_head, hd,
           n_used, dt * 1e6, bytes / 1048576.0, bytes / dt / 1e9);
    dev_batch_free(&db);
    cu_dfree(dq), cu_dfree(dkc), cu_dfree(dvc), cu_dfree(dout), cu_dfree(scratch);
    free(q), free(kc);
    kv_state_free(&s);
}

int main(int argc, char **argv) {
    /* --quick (for compute-sanitizer): the correctness cases, no timings */
    const int quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    if (cu_device_count() == 0) {
        printf("test_cuda_ops: no CUDA device, skipped\n");
        return 77;
    }
    CU_OK(cu_init(0, &cu));
    printf("device: %s\n", cu_device_name(cu));
    {
        /* the f32 prompt attention first (tolerance 1e-4); the default
         * tensor-core kernel has its own cases below at 2e-3 */
        const struct cu_tuning f32_attention = {.att_prompt = 1};
        cu_set_tuning(cu, &f32_attention);
    }

    test_rmsnorm(64, 1, 0, 1e-5f);
    test_rmsnorm(288, 7, 1, 1e-6f);
    test_rmsnorm(4096, 512, 0, 1e-5f);
    test_rmsnorm(5120, 33, 1, 1e-5f);
    test_rmsnorm(1000, 3, 1, 1e-5f);

    for (int act = 0; act < 6; act++) {
        test_act(1, act);
        test_act(1000, act);
        test_act(3 * 11008 + 5, act);
    }

    test_rope(8, 8, 4, 8, 1);
    test_rope(8, 8, 8, 8, 17);
    test_rope(64, 32, 8, 64, 3);
    test_rope(64, 8, 8, 32, 17); /* partial rotation */
    test_rope(128, 32, 8, 128, 512);
    test_rope(128, 32, 32, 128, 1);
    test_rope_qkv(8, 8, 4, 8, 1, false, false);
    test_rope_qkv(64, 8, 8, 32, 17, false, false); /* partial rotation */
    test_rope_qkv(128, 32, 8, 128, 5, false, false);
    test_rope_qkv(128, 32, 32, 128, 1, false, false);
    test_rope_qkv(128, 40, 40, 128, 300, false, false);
    /* qwen2: q/k/v biases and NeoX pairs; partial rotation too */
    test_rope_qkv(128, 12, 2, 128, 1, true, true);
    test_rope_qkv(128, 12, 2, 128, 33, true, true);
    test_rope_qkv(64, 8, 8, 32, 17, true, true);
    test_rope_qkv(64, 8, 4, 64, 5, true, false);
    test_rope_qkv(64, 8, 4, 48, 3, false, true);

    /* hd, heads, kv heads, n_tok, n_ctx, n_used, sequences, last token blind */
    test_attention(8, 8, 8, 1, 16, 16, 1, 0);
    test_attention(8, 8, 4, 3, 16, 11, 2, 0);
    test_attention(8, 8, 8, 17, 300, 250, 3, 1);
    test_attention(8, 8, 4, 512, 600, 580, 2, 0);
    test_attention(64, 8, 8, 1, 300, 200, 2, 0);
    test_attention(64, 32, 8, 3, 300, 300, 3, 1);
    test_attention(64, 32, 32, 17, 4096, 3000, 3, 0);
    test_attention(64, 32, 8, 512, 1024, 900, 4, 0);
    test_attention(128, 32, 32, 1, 4096, 4000, 1, 0);
    test_attention(128, 32, 8, 1, 4096, 4096, 3, 0);
    test_attention(128, 32, 8, 3, 300, 257, 2, 0);
    test_attention(128, 8, 8, 8, 4096, 2500, 2, 0); /* the largest decode batch */
    test_attention(128, 8, 8, 9, 300, 280, 2, 1);   /* the smallest prompt */
    test_attention(128, 32, 8, 17, 300, 200, 3, 0);
    test_attention(128, 32, 32, 512, 1024, 1024, 1, 0);
    test_attention(128, 8, 8, 512, 4096, 2100, 3, 0);
    test_attention(96, 8, 8, 2, 300, 300, 2, 0); /* head_dim not a power of two */
    test_attention(96, 8, 2, 40, 300, 280, 2, 0);
    test_attention(256, 8, 2, 5, 300, 280, 2, 0);
    test_attention(256, 8, 2, 40, 300, 280, 2, 0);
    /* decode attention with fewer, longer blocks (cu_tuning.att_chunk_min) */
    for (int cm = 128; cm <= 256; cm *= 2) {
        const struct cu_tuning t = {.att_chunk_min = cm};
        cu_set_tuning(cu, &t);
        printf("att_chunk_min %d:\n", cm);
        test_attention(128, 32, 8, 1, 4096, 4000, 1, 0);
        test_attention(128, 8, 8, 8, 4096, 2500, 2, 0);
        test_attention(64, 32, 8, 3, 300, 300, 3, 1);
        test_attention(128, 32, 32, 1, 641, 100, 1, 0);
    }
    {
        const struct cu_tuning t = {.att_chunk_min = 64};
        cu_set_tuning(cu, &t);
    }
    /* decode kernel 1 (fixed chunks), kernel 2 (it takes head_dim
     * 32/64/128/256, others fall back to kernel 1) and kernel 3 (kernel 2
     * whose last block merges; the graph replays check that its counters
     * return to 0) with one and with many blocks per SM */
    for (int v = 0; v < 6; v++) { /* v 3, 4: with programmatic dependent launch */
        const struct cu_tuning t = {.att_kernel = v == 0 ? 1 : v < 4 ? 2 : 3,
                                    .att_blocks_per_sm = v == 2 || v == 5 ? 16 : v == 3 || v == 4 ? 4 : 1,
                                    .pdl = v == 3 || v == 4 ? 1 : 2};
        cu_set_tuning(cu, &t);
        printf("decode attention kernel %d, blocks per SM %d%s:\n", t.att_kernel, t.att_blocks_per_sm,
               t.pdl == 1 ? ", pdl" : "");
        test_attention(32, 16, 4, 1, 300, 37, 2, 0);
        test_attention(64, 32, 8, 3, 300, 300, 3, 1);
        test_attention(128, 32, 32, 1, 4096, 100, 1, 0); /* a short context in a long cache */
        test_attention(128, 32, 8, 1, 4096, 4096, 3, 0);
        test_attention(128, 8, 8, 8, 4096, 2500, 2, 0);
        test_attention(128, 40, 40, 2, 2048, 1500, 2, 1);
        test_attention(256, 8, 2, 5, 300, 280, 2, 0);
        test_attention(128, 32, 8, 1, 64, 50, 1, 0); /* n_ctx <= 64: one split (kernel 3 writes out directly) */
        test_attention(64, 16, 4, 3, 48, 40, 2, 1);
        test_attention(32, 16, 16, 2, 40, 33, 1, 0);
        test_graph(128, 32, 8, 300);
        test_graph(128, 32, 8, 64);
    }
    {
        const struct cu_tuning t = {.att_kernel = 3, .att_blocks_per_sm = 4, .pdl = 1};
        cu_set_tuning(cu, &t);
        printf("decode attention kernel 3 with its output quantized for the next product:\n");
        test_attention_q8(128, 32, 8, 1, 4096, 4000, 1);
        test_attention_q8(128, 32, 32, 1, 300, 37, 1);
        test_attention_q8(64, 32, 8, 3, 300, 300, 3);
        test_attention_q8(32, 16, 4, 8, 300, 280, 2);
        test_attention_q8(256, 8, 2, 5, 300, 280, 2);
        test_attention_q8(128, 32, 8, 1, 64, 60, 1); /* one split: written without the merge */
        test_attention_q8(64, 32, 8, 3, 40, 40, 3);
        test_attention_q8(32, 16, 4, 8, 64, 50, 2);
        test_attention_q8(256, 8, 2, 2, 64, 64, 1);
        const struct cu_tuning back = {.att_kernel = 2, .att_blocks_per_sm = 4, .pdl = 2};
        cu_set_tuning(cu, &back);
    }
    /* prompt attention on tensor cores (head_dim 64 and 128; others and
     * decode batches take the f32 kernels, checked at the f32 tolerance) */
    {
        for (int k = 2; k <= 4; k++) { /* 3: the K/V tile loaded a float4 at a time; 4: mma.sync */
            const struct cu_tuning t = {.att_prompt = k};
            cu_set_tuning(cu, &t);
            printf("prompt attention on tensor cores (att_prompt=%d), tolerance 2e-3:\n", k);
            att_tol = 2e-3;
            test_attention(64, 32, 8, 512, 1024, 900, 4, 0);
            test_attention(64, 8, 8, 17, 300, 250, 3, 1);
            test_attention(128, 8, 8, 9, 300, 280, 2, 1);
            test_attention(128, 32, 8, 17, 300, 200, 3, 0);
            test_attention(128, 32, 32, 512, 1024, 1024, 1, 0);
            test_attention(128, 8, 8, 512, 4096, 2100, 3, 0);
            test_attention(128, 40, 40, 100, 700, 650, 2, 1);
            test_attention(64, 16, 2, 200, 200, 200, 1, 0);  /* cells == tokens, ragged last tile */
            test_attention(128, 32, 4, 65, 130, 129, 2, 1); /* one query past a tile */
            att_tol = 1e-4;
        }
        test_attention(96, 8, 2, 40, 300, 280, 2, 0); /* falls back to the f32 kernel */
        test_attention(128, 8, 8, 8, 4096, 2500, 2, 0);
        const struct cu_tuning back = {.att_prompt = 1};
        cu_set_tuning(cu, &back);
    }

    test_graph(8, 8, 4, 64);
    test_graph(128, 32, 8, 300);

    if (!quick) {
        for (int k = 1; k <= 3; k++) { /* decode: kernels 1, 2, 3 */
            const struct cu_tuning t = {.att_kernel = k};
            cu_set_tuning(cu, &t);
            printf("decode attention kernel %d:\n", k);
            time_attention(128, 32, 1, 128, 200);
            time_attention(128, 32, 1, 512, 200);
            time_attention(128, 32, 1, 1024, 100);
        }
        time_attention(128, 32, 1, 4096, 50);
        time_attention(128, 32, 1, 32768, 10);
        for (int k = 1; k <= 4; k++) { /* prompt: f32, then tensor cores (WMMA; mma.sync) */
            if (k == 3) continue;
            const struct cu_tuning t = {.att_prompt = k};
            cu_set_tuning(cu, &t);
            printf("prompt attention att_prompt=%d:\n", k);
            time_attention(128, 32, 512, 512, 10);
            time_attention(128, 32, 512, 4096, 5);
        }
    }

    cu_free(cu);
    return test_summary("test_cuda_ops");
}
