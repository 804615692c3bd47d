/*
 * bench_cuda_layer.c - one Llama layer on the GPU, old kernel sequence vs
 * the fused one, for the 7B and 13B shapes (random weights: speed does not
 * depend on the values).
 *
 * Decode (1 token): the layer sequence recorded 32 times into a CUDA graph
 * (cycling over 4 copies of the layer so L2 never holds the weights) and
 * replayed; us per layer and the layer's weight bytes / device copy
 * bandwidth ("% of floor"), with a tok/s estimate for the whole stack.
 *   old:  rmsnorm, q, k, v (quantize + mmv each), rope+store, attention,
 *         wo, rmsnorm, gate, up, act*up, down            (16-17 kernels)
 *   new:  rmsnorm+q|k|v, rope, attention, wo, rmsnorm+gate|up, act+down
 *         on stacked weights; by default (mmv_fused=3) each product is
 *         two kernels: input step + 8-bit quantization, then the warp mmv
 *         kernel (11 kernels with attention's two); mmv_fused=1 is the
 *         older fused prologue                           (7 kernels)
 * then the new sequence under each cu_tuning variant, and every kernel alone
 * (a graph of 64 calls, cycling over the copies).
 * Prompt (512 tokens): the layer sequence old vs new (stream timing, median
 * of 5), each GEMM shape against cuBLAS f16 for several dequant chunk
 * sizes, and the first GEMM call of the process against the steady state.
 *
 * Env: BENCH_TYPE (q4_0 default; any type cu_type_supported), BENCH_MODELS
 * (7B,13B), BENCH_NUSED (decode attention cells, 128). Exit 77 without a
 * CUDA device.
 */
#define _POSIX_C_SOURCE 199309L
#include "cuda/cuda.h"
#include "dtype.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MUST(call)                                                                                                     \
    do {                                                                                                               \
        optiml_status must_st_ = (call);                                                                               \
        if (must_st_ != OPTIML_OK) {                                                                                   \
            fprintf(stderr, "FATAL: %s failed: %s\n", #call, optiml_last_error());                                    \
            exit(1);                                                                                                   \
        }                                                                                                              \
    } while (0)

enum { N_COPY = 4, N_LAYER_GRAPH = 32, N_BATCH = 512, N_CTX = 1024 };

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}
static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    return v[n / 2];
}
static uint64_t rng_state = 88172645463325252ull;
static uint64_t rng(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
static float frand(void) { return (float)((rng() >> 40) * (1.0 / 8388608.0)) - 1.0f; }

static cu_ctx *cu;

static void *dalloc(uint64_t n) {
    void *p;
    MUST(cu_malloc(cu, n, &p));
    return p;
}
static float *dev_floats(int64_t n, float scale, float offset) {
    float *h = malloc((size_t)n * sizeof(float)), *d = dalloc((uint64_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) h[i] = offset + scale * frand();
    MUST(cu_upload(cu, d, h, (uint64_t)n * sizeof(float)));
    MUST(cu_sync(cu));
    free(h);
    return d;
}

static double copy_bandwidth(void) {
    const uint64_t n = 1ull << 30;
    void *a = dalloc(n), *b = dalloc(n);
    MUST(cu_memset(cu, a, 1, n));
    MUST(cu_copy_d2d(cu, b, a, n));
    MUST(cu_sync(cu));
    double t[9];
    for (int r = 0; r < 9; r++) {
        const double t0 = now_s();
        MUST(cu_copy_d2d(cu, b, a, n));
        MUST(cu_sync(cu));
        t[r] = now_s() - t0;
    }
    cu_dfree(a);
    cu_dfree(b);
    return 2.0 * (double)n / median(t, 9);
}

/* ---- a model shape and its layer copies -------------------------------------------- */

struct shape {
    const char *name;
    int64_t n_embd, n_head, n_kv_head, hd, n_ff;
};

struct layer {
    cu_weight wq, wk, wv, wo, gate, up, down; /* separate (old sequence) */
    cu_weight qkv, gu;                        /* stacked (new)           */
    float *attn_norm, *ffn_norm;
    float *kc, *vc; /* (N_CTX, n_kv) */
};

struct bench {
    struct shape s;
    uint32_t type;
    int64_t n_q, n_kv;
    struct layer l[N_COPY];
    uint64_t layer_bytes; /* weights read per decode layer */
    float *x, *xb, *q, *k, *v, *att, *gate, *up, *qkv, *qr, *gu, *inv_freq;
    void *att_scratch;
    int32_t *pos, *seq, *cell, *cell_pos;
    uint64_t *cell_seq;
    uint32_t *n_used;
    struct cu_batch b;
};

static void *random_host(uint32_t type, int64_t n_in, int64_t n_out) {
    uint64_t row;
    if (!dtype_row_size(type, (uint64_t)n_in, &row)) exit(1);
    const uint64_t n = row * (uint64_t)n_out;
    uint8_t *h = malloc(n);
    if (!h) exit(1);
    for (uint64_t i = 0; i + 8 <= n; i += 8) {
        const uint64_t r = rng() & 0x3bff3bff3bff3bffull; /* no f16 inf/NaN where scales land */
        memcpy(h + i, &r, 8);
    }
    return h;
}

static void upload(uint32_t type, int64_t n_in, int64_t n_out, const void *host, void *staging, cu_weight *w) {
    MUST(cu_weight_upload(cu, type, n_in, n_out, host, staging, 64u << 20, w));
}

static void bench_init(struct bench *B, const struct shape *s, uint32_t type, uint32_t n_used) {
    memset(B, 0, sizeof(*B));
    B->s = *s;
    B->type = type;
    B->n_q = s->n_head * s->hd;
    B->n_kv = s->n_kv_head * s->hd;
    void *staging;
    MUST(cu_host_alloc(64u << 20, &staging));
    const int64_t E = s->n_embd, F = s->n_ff;
    for (int c = 0; c < N_COPY; c++) {
        struct layer *L = &B->l[c];
        void *hq = random_host(type, E, B->n_q), *hk = random_host(type, E, B->n_kv), *hv = random_host(type, E, B->n_kv);
        void *ho = random_host(type, B->n_q, E), *hg = random_host(type, E, F), *hu = random_host(type, E, F);
        void *hd = random_host(type, F, E);
        upload(type, E, B->n_q, hq, staging, &L->wq);
        upload(type, E, B->n_kv, hk, staging, &L->wk);
        upload(type, E, B->n_kv, hv, staging, &L->wv);
        upload(type, B->n_q, E, ho, staging, &L->wo);
        upload(type, E, F, hg, staging, &L->gate);
        upload(type, E, F, hu, staging, &L->up);
        upload(type, F, E, hd, staging, &L->down);
        const void *p3[3] = {hq, hk, hv}, *p2[2] = {hg, hu};
        const int64_t r3[3] = {B->n_q, B->n_kv, B->n_kv}, r2[2] = {F, F};
        MUST(cu_weight_upload_parts(cu, type, E, 3, p3, r3, staging, 64u << 20, &L->qkv));
        MUST(cu_weight_upload_parts(cu, type, E, 2, p2, r2, staging, 64u << 20, &L->gu));
        free(hq), free(hk), free(hv), free(ho), free(hg), free(hu), free(hd);
        L->attn_norm = dev_floats(E, 0.2f, 1.0f);
        L->ffn_norm = dev_floats(E, 0.2f, 1.0f);
        L->kc = dev_floats(N_CTX * B->n_kv, 1.0f, 0.0f);
        L->vc = dev_floats(N_CTX * B->n_kv, 1.0f, 0.0f);
    }
    cu_host_free(staging);
    const struct layer *L = &B->l[0];
    B->layer_bytes = L->qkv.bytes + L->wo.bytes + L->gu.bytes + L->down.bytes + 2 * (uint64_t)E * sizeof(float);
    const int64_t nb = N_BATCH;
    B->x = dev_floats(nb * E, 1.0f, 0.0f);
    B->xb = dalloc((uint64_t)(nb * E) * sizeof(float));
    B->q = dalloc((uint64_t)(nb * B->n_q) * sizeof(float));
    B->k = dalloc((uint64_t)(nb * B->n_kv) * sizeof(float));
    B->v = dalloc((uint64_t)(nb * B->n_kv) * sizeof(float));
    B->att = dev_floats(nb * B->n_q, 1.0f, 0.0f);
    B->gate = dalloc((uint64_t)(nb * F) * sizeof(float));
    B->up = dalloc((uint64_t)(nb * F) * sizeof(float));
    B->qkv = dalloc((uint64_t)(nb * (B->n_q + 2 * B->n_kv)) * sizeof(float));
    B->qr = dalloc((uint64_t)(nb * B->n_q) * sizeof(float));
    B->gu = dev_floats(nb * 2 * F, 1.0f, 0.0f);
    B->inv_freq = dev_floats(s->hd / 2, 0.0f, 0.01f);
    B->att_scratch = dalloc(cu_attention_scratch_bytes(N_BATCH, (int32_t)s->n_head, (int32_t)s->hd, N_CTX));
    /* the batch: n tokens at positions n_used - n .. n_used - 1 of one sequence */
    int32_t *h = malloc(N_CTX * sizeof(int32_t));
    uint64_t *hs = malloc(N_CTX * sizeof(uint64_t));
    for (int i = 0; i < N_CTX; i++) h[i] = i < (int)n_used ? i : -1, hs[i] = i < (int)n_used ? 1 : 0;
    B->cell_pos = dalloc(N_CTX * sizeof(int32_t));
    B->cell_seq = dalloc(N_CTX * sizeof(uint64_t));
    MUST(cu_upload(cu, B->cell_pos, h, N_CTX * sizeof(int32_t)));
    MUST(cu_upload(cu, B->cell_seq, hs, N_CTX * sizeof(uint64_t)));
    B->n_used = dalloc(sizeof(uint32_t));
    MUST(cu_upload(cu, B->n_used, &n_used, sizeof(uint32_t)));
    MUST(cu_sync(cu));
    free(h);
    free(hs);
    B->pos = dalloc(N_BATCH * sizeof(int32_t));
    B->seq = dalloc(N_BATCH * sizeof(int32_t));
    B->cell = dalloc(N_BATCH * sizeof(int32_t));
    B->b = (struct cu_batch){.pos = B->pos, .seq = B->seq, .cell = B->cell, .cell_pos = B->cell_pos,
                             .cell_seq = B->cell_seq, .n_used = B->n_used};
}

/* Positions/cells of an n-token batch ending at cell n_used - 1 (n_used >= n). */
static void bench_batch(struct bench *B, int32_t n, uint32_t n_used) {
    int32_t *p = malloc((size_t)n * sizeof(int32_t)), *z = calloc((size_t)n, sizeof(int32_t));
    for (int32_t i = 0; i < n; i++) p[i] = (int32_t)n_used - n + i;
    MUST(cu_upload(cu, B->pos, p, (uint64_t)n * sizeof(int32_t)));
    MUST(cu_upload(cu, B->cell, p, (uint64_t)n * sizeof(int32_t)));
    MUST(cu_upload(cu, B->seq, z, (uint64_t)n * sizeof(int32_t)));
    int32_t *h = malloc(N_CTX * sizeof(int32_t));
    uint64_t *hs = malloc(N_CTX * sizeof(uint64_t));
    for (int i = 0; i < N_CTX; i++) h[i] = i < (int)n_used ? i : -1, hs[i] = i < (int)n_used ? 1 : 0;
    MUST(cu_upload(cu, B->cell_pos, h, N_CTX * sizeof(int32_t)));
    MUST(cu_upload(cu, B->cell_seq, hs, N_CTX * sizeof(uint64_t)));
    MUST(cu_upload(cu, B->n_used, &n_used, sizeof(uint32_t)));
    MUST(cu_sync(cu));
    free(p), free(z), free(h), free(hs);
}

/* ---- the layer sequences ------------------------------------------------------------- */

static void layer_old(struct bench *B, int c, int32_t n) {
    const struct layer *L = &B->l[c];
    const struct shape *s = &B->s;
    MUST(cu_rmsnorm(cu, B->xb, B->x, L->attn_norm, s->n_embd, n, NULL, 1e-5f));
    MUST(cu_matmul(cu, &L->wq, B->xb, n, B->q, false));
    MUST(cu_matmul(cu, &L->wk, B->xb, n, B->k, false));
    MUST(cu_matmul(cu, &L->wv, B->xb, n, B->v, false));
    MUST(cu_rope_store(cu, B->q, B->k, B->v, L->kc, L->vc, n, (int32_t)s->n_head, (int32_t)s->n_kv_head,
                       (int32_t)s->hd, (int32_t)s->hd, B->inv_freq, &B->b));
    MUST(cu_attention(cu, B->q, L->kc, L->vc, B->att, n, (int32_t)s->n_head, (int32_t)s->n_kv_head, (int32_t)s->hd,
                      N_CTX, &B->b, B->att_scratch));
    MUST(cu_matmul(cu, &L->wo, B->att, n, B->x, true));
    MUST(cu_rmsnorm(cu, B->xb, B->x, L->ffn_norm, s->n_embd, n, NULL, 1e-5f));
    MUST(cu_matmul(cu, &L->gate, B->xb, n, B->gate, false));
    MUST(cu_matmul(cu, &L->up, B->xb, n, B->up, false));
    MUST(cu_act_mul(cu, B->gate, B->up, (int64_t)n * s->n_ff, 0));
    MUST(cu_matmul(cu, &L->down, B->gate, n, B->x, true));
}

/* The sequence of src/gpu.c. */
static void layer_new(struct bench *B, int c, int32_t n) {
    const struct layer *L = &B->l[c];
    const struct shape *s = &B->s;
    const int64_t ld = B->n_q + 2 * B->n_kv, F = s->n_ff;
    const struct cu_mm_in n1 = {.kind = CU_IN_RMSNORM, .norm = L->attn_norm, .eps = 1e-5f};
    const struct cu_mm_in n2 = {.kind = CU_IN_RMSNORM, .norm = L->ffn_norm, .eps = 1e-5f};
    const struct cu_mm_in act = {.kind = CU_IN_ACT_MUL, .ld = 2 * F, .up = B->gu + F, .act = 0};
    MUST(cu_matmul_ex(cu, &L->qkv, B->x, &n1, n, B->qkv, ld, false));
    MUST(cu_rope_store_qkv(cu, B->qkv, ld, B->qr, L->kc, L->vc, n, (int32_t)s->n_head, (int32_t)s->n_kv_head,
                           (int32_t)s->hd, (int32_t)s->hd, B->inv_freq, NULL, false, &B->b));
    bool q8 = false; /* as src/gpu.c: the attention leaves wo's 8-bit input where it can */
    MUST(cu_attention_q8(cu, B->qr, L->kc, L->vc, B->att, n, (int32_t)s->n_head, (int32_t)s->n_kv_head,
                         (int32_t)s->hd, N_CTX, &B->b, B->att_scratch, &q8));
    if (q8) MUST(cu_matmul_prequant(cu, &L->wo, n, B->x, 0, true));
    else MUST(cu_matmul_ex(cu, &L->wo, B->att, NULL, n, B->x, 0, true));
    MUST(cu_matmul_ex(cu, &L->gu, B->x, &n2, n, B->gu, 2 * F, false));
    MUST(cu_matmul_ex(cu, &L->down, B->gu, &act, n, B->x, 0, true));
}

typedef void (*layer_fn)(struct bench *, int, int32_t);

/* Median us per layer of N_LAYER_GRAPH decode layers replayed from a graph. */
static double time_decode(struct bench *B, layer_fn fn) {
    cu_graph *g = NULL;
    MUST(cu_graph_begin(cu));
    for (int i = 0; i < N_LAYER_GRAPH; i++) fn(B, i % N_COPY, 1);
    MUST(cu_graph_end(cu, &g));
    MUST(cu_graph_launch(cu, g));
    MUST(cu_sync(cu));
    double t[21];
    for (int r = 0; r < 21; r++) {
        const double t0 = now_s();
        MUST(cu_graph_launch(cu, g));
        MUST(cu_sync(cu));
        t[r] = (now_s() - t0) / N_LAYER_GRAPH;
    }
    cu_graph_free(g);
    return median(t, 21) * 1e6;
}

/* ---- single ops ----------------------------------------------------------------------- */

enum op {
    OP_OLD_NORM, OP_OLD_Q, OP_OLD_K, OP_OLD_V, OP_OLD_ROPE, OP_ATTN, OP_OLD_O, OP_OLD_GATE, OP_OLD_UP, OP_OLD_ACT,
    OP_OLD_DOWN, OP_NEW_QKV, OP_NEW_ROPE, OP_NEW_O, OP_NEW_GU, OP_NEW_DOWN, OP_COUNT
};
static const char *const op_names[OP_COUNT] = {
    "old rmsnorm", "old q (quantize+mmv)", "old k", "old v", "old rope_store (new kernel)", "attention (decode+combine)",
    "old wo", "old gate", "old up", "old act*up", "old down", "new rmsnorm+q|k|v", "new rope_store_qkv", "new wo (ex)",
    "new rmsnorm+gate|up", "new act*up+down"};

static void run_op(struct bench *B, int op, int c, int32_t n) {
    const struct layer *L = &B->l[c];
    const struct shape *s = &B->s;
    const int64_t ld = B->n_q + 2 * B->n_kv, F = s->n_ff;
    const struct cu_mm_in n1 = {.kind = CU_IN_RMSNORM, .norm = L->attn_norm, .eps = 1e-5f};
    const struct cu_mm_in act = {.kind = CU_IN_ACT_MUL, .ld = 2 * F, .up = B->gu + F, .act = 0};
    switch (op) {
    case OP_OLD_NORM: MUST(cu_rmsnorm(cu, B->xb, B->x, L->attn_norm, s->n_embd, n, NULL, 1e-5f)); break;
    case OP_OLD_Q: MUST(cu_matmul(cu, &L->wq, B->xb, n, B->q, false)); break;
    case OP_OLD_K: MUST(cu_matmul(cu, &L->wk, B->xb, n, B->k, false)); break;
    case OP_OLD_V: MUST(cu_matmul(cu, &L->wv, B->xb, n, B->v, false)); break;
    case OP_OLD_ROPE:
        MUST(cu_rope_store(cu, B->q, B->k, B->v, L->kc, L->vc, n, (int32_t)s->n_head, (int32_t)s->n_kv_head,
                           (int32_t)s->hd, (int32_t)s->hd, B->inv_freq, &B->b));
        break;
    case OP_ATTN:
        MUST(cu_attention(cu, B->qr, L->kc, L->vc, B->att, n, (int32_t)s->n_head, (int32_t)s->n_kv_head,
                          (int32_t)s->hd, N_CTX, &B->b, B->att_scratch));
        break;
    case OP_OLD_O: MUST(cu_matmul(cu, &L->wo, B->att, n, B->x, true)); break;
    case OP_OLD_GATE: MUST(cu_matmul(cu, &L->gate, B->xb, n, B->gate, false)); break;
    case OP_OLD_UP: MUST(cu_matmul(cu, &L->up, B->xb, n, B->up, false)); break;
    case OP_OLD_ACT: MUST(cu_act_mul(cu, B->gate, B->up, (int64_t)n * F, 0)); break;
    case OP_OLD_DOWN: MUST(cu_matmul(cu, &L->down, B->gate, n, B->x, true)); break;
    case OP_NEW_QKV: MUST(cu_matmul_ex(cu, &L->qkv, B->x, &n1, n, B->qkv, ld, false)); break;
    case OP_NEW_ROPE:
        MUST(cu_rope_store_qkv(cu, B->qkv, ld, B->qr, L->kc, L->vc, n, (int32_t)s->n_head, (int32_t)s->n_kv_head,
                               (int32_t)s->hd, (int32_t)s->hd, B->inv_freq, NULL, false, &B->b));
        break;
    case OP_NEW_O: MUST(cu_matmul_ex(cu, &L->wo, B->att, NULL, n, B->x, 0, true)); break;
    case OP_NEW_GU: MUST(cu_matmul_ex(cu, &L->gu, B->x, &n1, n, B->gu, 2 * F, false)); break;
    default: MUST(cu_matmul_ex(cu, &L->down, B->gu, &act, n, B->x, 0, true)); break;
    }
}

static uint64_t op_bytes(const struct bench *B, int op) {
    const struct layer *L = &B->l[0];
    switch (op) {
    case OP_OLD_Q: return L->wq.bytes;
    case OP_OLD_K: return L->wk.bytes;
    case OP_OLD_V: return L->wv.bytes;
    case OP_OLD_O: case OP_NEW_O: return L->wo.bytes;
    case OP_OLD_GATE: return L->gate.bytes;
    case OP_OLD_UP: return L->up.bytes;
    case OP_OLD_DOWN: case OP_NEW_DOWN: return L->down.bytes;
    case OP_NEW_QKV: return L->qkv.bytes;
    case OP_NEW_GU: return L->gu.bytes;
    default: return 0;
    }
}

/* Median us per call of one op, 64 calls in a graph over the copies. */
static double time_op(struct bench *B, int op, int32_t n) {
    enum { CALLS = 64 };
    cu_graph *g = NULL;
    MUST(cu_graph_begin(cu));
    for (int i = 0; i < CALLS; i++) run_op(B, op, i % N_COPY, n);
    MUST(cu_graph_end(cu, &g));
    MUST(cu_graph_launch(cu, g));
    MUST(cu_sync(cu));
    double t[15];
    for (int r = 0; r < 15; r++) {
        const double t0 = now_s();
        MUST(cu_graph_launch(cu, g));
        MUST(cu_sync(cu));
        t[r] = (now_s() - t0) / CALLS;
    }
    cu_graph_free(g);
    return median(t, 15) * 1e6;
}

/* ---- prompt -------------------------------------------------------------------------- */

static double time_prompt(struct bench *B, layer_fn fn, int32_t n) {
    fn(B, 0, n);
    MUST(cu_sync(cu));
    double t[5];
    for (int r = 0; r < 5; r++) {
        const double t0 = now_s();
        for (int c = 0; c < N_COPY; c++) fn(B, c, n);
        MUST(cu_sync(cu));
        t[r] = (now_s() - t0) / N_COPY;
    }
    return median(t, 5) * 1e6;
}

static double time_gemm(const cu_weight *w, const float *x, float *y, int64_t n_tok) {
    MUST(cu_matmul_gemm(cu, w, x, n_tok, y, false));
    MUST(cu_sync(cu));
    double t[7];
    for (int r = 0; r < 7; r++) {
        const double t0 = now_s();
        MUST(cu_matmul_gemm(cu, w, x, n_tok, y, false));
        MUST(cu_sync(cu));
        t[r] = now_s() - t0;
    }
    return median(t, 7);
}

static double time_f16(const void *a, const void *b, float *c, int64_t m, int64_t n, int64_t k) {
    MUST(cu_gemm_f16_bench(cu, a, b, c, m, n, k));
    MUST(cu_sync(cu));
    double t[7];
    for (int r = 0; r < 7; r++) {
        const double t0 = now_s();
        MUST(cu_gemm_f16_bench(cu, a, b, c, m, n, k));
        MUST(cu_sync(cu));
        t[r] = now_s() - t0;
    }
    return median(t, 7);
}

static void prompt_tables(struct bench *B) {
    const struct shape *s = &B->s;
    const int32_t n = N_BATCH;
    bench_batch(B, n, n);
    const double flop_layer =
        2.0 * n * (double)s->n_embd * (double)(B->n_q + 2 * B->n_kv + B->n_q) + 2.0 * n * 3.0 * s->n_embd * s->n_ff;
    printf("\n#### %s prompt, %d tokens, %s (stream-timed, median of 5, us per layer)\n\n", s->name, n,
           dtype_name(B->type));
    printf("| sequence | gemm chunk (f16 values) | us/layer | matmul TFLOP/s (whole layer time) | tok/s per layer stack (x%d "
           "layers) |\n| --- | ---: | ---: | ---: | ---: |\n",
           s->n_embd == 4096 ? 32 : 40);
    const int64_t chunks[] = {8ll << 20, 32ll << 20, 128ll << 20};
    for (int ci = 0; ci < 3; ci++) {
        const struct cu_tuning t = {.gemm_chunk_elems = chunks[ci]};
        cu_set_tuning(cu, &t);
        MUST(cu_matmul_reserve(cu, N_BATCH, s->n_ff, 2 * s->n_ff, NULL));
        for (int v = 0; v < 2; v++) {
            const double us = time_prompt(B, v ? layer_new : layer_old, n);
            printf("| %s | %lldM | %.0f | %.0f | %.0f |\n", v ? "new" : "old", (long long)(chunks[ci] >> 20), us,
                   flop_layer / (us * 1e-6) / 1e12, n / (us * 1e-6 * (s->n_embd == 4096 ? 32 : 40)));
            fflush(stdout);
        }
    }
    /* each GEMM shape against cuBLAS f16 */
    const struct layer *L = &B->l[0];
    const cu_weight *ws[6] = {&L->wq, &L->qkv, &L->wo, &L->gate, &L->gu, &L->down};
    const char *wn[6] = {"q", "q|k|v", "wo", "gate", "gate|up", "down"};
    void *ah = dalloc((uint64_t)n * s->n_ff * 2), *bh = dalloc((uint64_t)2 * s->n_ff * s->n_embd * 2);
    MUST(cu_memset(cu, ah, 0x3c, (uint64_t)n * s->n_ff * 2));
    MUST(cu_memset(cu, bh, 0x2c, (uint64_t)2 * s->n_ff * s->n_embd * 2));
    float *y = dalloc((uint64_t)n * 2 * s->n_ff * sizeof(float));
    float *x = B->gu; /* random, n x 2 n_ff */
    printf("\n| %s gemm %d tok | n_in x n_out | cuBLAS f16 TFLOP/s | ours 8M | 32M | 128M (TFLOP/s, ratio) |\n"
           "| --- | --- | ---: | ---: | ---: | ---: |\n",
           s->name, n);
    for (int i = 0; i < 6; i++) {
        const cu_weight *w = ws[i];
        const double flop = 2.0 * n * (double)w->n_in * (double)w->n_out;
        const double tf = flop / time_f16(ah, bh, y, n, w->n_out, w->n_in) / 1e12;
        printf("| %s | %lld x %lld | %.0f |", wn[i], (long long)w->n_in, (long long)w->n_out, tf);
        for (int ci = 0; ci < 3; ci++) {
            const struct cu_tuning t = {.gemm_chunk_elems = chunks[ci]};
            cu_set_tuning(cu, &t);
            const double tg = flop / time_gemm(w, x, y, n) / 1e12;
            printf(" %.0f (%.2f) |", tg, tg / tf);
        }
        printf("\n");
        fflush(stdout);
    }
    const struct cu_tuning back = {.gemm_chunk_elems = 128ll << 20}; /* the default */
    cu_set_tuning(cu, &back);
    cu_dfree(ah), cu_dfree(bh), cu_dfree(y);
}

/* ---- decode tables ------------------------------------------------------------------------ */

static void decode_tables(struct bench *B, double copy_bw, uint32_t n_used) {
    const struct shape *s = &B->s;
    const int n_layer = s->n_embd == 4096 ? 32 : 40;
    bench_batch(B, 1, n_used);
    const double floor_us = (double)B->layer_bytes / copy_bw * 1e6;
    printf("\n#### %s decode layer, 1 token, %s, %u cells of context (graph of %d layers over %d copies)\n\n", s->name,
           dtype_name(B->type), n_used, N_LAYER_GRAPH, N_COPY);
    printf("layer weights %.1f MB -> floor %.1f us at %.0f GB/s\n\n", B->layer_bytes / 1e6, floor_us, copy_bw / 1e9);
    printf("| sequence | tuning | us/layer | %% of floor | tok/s for %d layers (no head) |\n| --- | --- | ---: | ---: | ---: |\n",
           n_layer);
    struct cu_tuning def;
    cu_get_tuning(cu, &def);
    double us = time_decode(B, layer_old);
    printf("| old | - | %.1f | %.0f%% | %.0f |\n", us, 100 * floor_us / us, 1e6 / (us * n_layer));
    us = time_decode(B, layer_new);
    printf("| new | default (fused=%d mmv_kernel=%d v%d, att kernel %d at %d blocks/SM) | %.1f | %.0f%% | %.0f |\n",
           def.mmv_fused, def.mmv_kernel, def.mmv_variant, def.att_kernel, def.att_blocks_per_sm, us,
           100 * floor_us / us, 1e6 / (us * n_layer));
    fflush(stdout);
    const struct { const char *what; struct cu_tuning t; } vars[] = {
        {"fused prologue in every block (mmv_fused=1, 2 blocks/SM)", {.mmv_fused = 1}},
        {"fused prologue, 4 blocks/SM", {.mmv_fused = 1, .mmv_blocks_per_sm = 4}},
        {"unfused input steps (mmv_fused=2)", {.mmv_fused = 2}},
        {"input+quantize, block mmv kernel (mmv_kernel=1)", {.mmv_kernel = 1}},
        {"mmv v1 (2 rows x 4 chunks)", {.mmv_variant = 1}},
        {"mmv v2 (1 row x 8 chunks)", {.mmv_variant = 2}},
        {"mmv v3 (4 rows x 2 chunks)", {.mmv_variant = 3}},
        {"att kernel 1 (chunks >= 64)", {.att_kernel = 1}},
        {"att kernel 2, 2 blocks/SM", {.att_kernel = 2, .att_blocks_per_sm = 2}},
        {"att kernel 2, 8 blocks/SM", {.att_kernel = 2, .att_blocks_per_sm = 8}},
        {"att kernel 3 (merge in the last block)", {.att_kernel = 3}},
        {"persistent mmv (mmv_kernel=3)", {.mmv_kernel = 3}},
        {"persistent mmv, att kernel 3", {.mmv_kernel = 3, .att_kernel = 3}},
        {"block mmv, 128 threads (bthr=128)", {.mmv_block_threads = 128}},
        {"block mmv, 256 threads (bthr=256)", {.mmv_block_threads = 256}},
        {"programmatic dependent launch (pdl=1)", {.pdl = 1}},
        {"pdl=1, mmv v2", {.pdl = 1, .mmv_variant = 2}},
        {"old everything (fused=1, mmv_kernel=1, att kernel 1)", {.mmv_fused = 1, .mmv_kernel = 1, .att_kernel = 1}},
    };
    for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++) {
        cu_set_tuning(cu, &def);
        cu_set_tuning(cu, &vars[i].t);
        us = time_decode(B, layer_new);
        printf("| new | %s | %.1f | %.0f%% | %.0f |\n", vars[i].what, us, 100 * floor_us / us, 1e6 / (us * n_layer));
        fflush(stdout);
    }
    cu_set_tuning(cu, &def);

    printf("\n| %s op, 1 token (default tuning) | us/call | GB/s of weights | %% of copy | v2 | v3 | block kernel "
           "| fused=1 | fused=2 (us) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
           s->name);
    for (int op = 0; op < OP_COUNT; op++) {
        const double t = time_op(B, op, 1);
        const uint64_t by = op_bytes(B, op);
        printf("| %s | %.1f |", op_names[op], t);
        if (by) printf(" %.0f | %.0f%% |", by / t / 1e3, 100.0 * by / (t * 1e-6) / copy_bw);
        else printf(" | |");
        if (by) {
            const struct cu_tuning tv[5] = {{.mmv_variant = 2}, {.mmv_variant = 3}, {.mmv_kernel = 1},
                                            {.mmv_fused = 1}, {.mmv_fused = 2}};
            for (int v = 0; v < 5; v++) {
                cu_set_tuning(cu, &def);
                cu_set_tuning(cu, &tv[v]);
                if (v >= 3 && op < OP_NEW_QKV) printf(" |"); /* cu_matmul: no input step */
                else printf(" %.1f |", time_op(B, op, 1));
            }
            cu_set_tuning(cu, &def);
        } else {
            printf(" | | | | |");
        }
        printf("\n");
        fflush(stdout);
    }
    /* 8 tokens (speculative / small batches) */
    bench_batch(B, 8, n_used);
    printf("\n| %s op, 8 tokens | us/call |\n| --- | ---: |\n", s->name);
    const int ops8[] = {OP_OLD_Q, OP_NEW_QKV, OP_NEW_GU, OP_NEW_DOWN, OP_OLD_DOWN, OP_ATTN};
    for (size_t i = 0; i < sizeof(ops8) / sizeof(ops8[0]); i++)
        printf("| %s | %.1f |\n", op_names[ops8[i]], time_op(B, ops8[i], 8));
    /* attention at longer contexts */
    printf("\n| %s attention, 1 token, n_ctx %d | cells | kernel 1 chunk>=64 | kernel 2, 2 | 4 | 8 | 16 blocks/SM (us) "
           "|\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
           s->name, N_CTX);
    const uint32_t cells[] = {32, 128, 512, 1000, N_CTX};
    for (int i = 0; i < 5; i++) {
        bench_batch(B, 1, cells[i]);
        printf("| | %u |", cells[i]);
        const struct cu_tuning ta[5] = {{.att_kernel = 1, .att_chunk_min = 64},
                                        {.att_kernel = 2, .att_blocks_per_sm = 2},
                                        {.att_kernel = 2, .att_blocks_per_sm = 4},
                                        {.att_kernel = 2, .att_blocks_per_sm = 8},
                                        {.att_kernel = 2, .att_blocks_per_sm = 16}};
        for (int v = 0; v < 5; v++) {
            cu_set_tuning(cu, &ta[v]);
            printf(" %.1f |", time_op(B, OP_ATTN, 1));
        }
        printf("\n");
        fflush(stdout);
    }
    cu_set_tuning(cu, &def);
    fflush(stdout);
}

static void bench_free(struct bench *B) {
    for (int c = 0; c < N_COPY; c++) {
        struct layer *L = &B->l[c];
        cu_weight *ws[9] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->gate, &L->up, &L->down, &L->qkv, &L->gu};
        for (int i = 0; i < 9; i++) cu_weight_free(ws[i]);
        cu_dfree(L->attn_norm), cu_dfree(L->ffn_norm), cu_dfree(L->kc), cu_dfree(L->vc);
    }
    void *p[] = {B->x, B->xb, B->q, B->k, B->v, B->att, B->gate, B->up, B->qkv, B->qr, B->gu, B->inv_freq,
                 B->att_scratch, B->pos, B->seq, B->cell, B->cell_pos, B->cell_seq, B->n_used};
    for (size_t i = 0; i < sizeof(p) / sizeof(p[0]); i++) cu_dfree(p[i]);
}

int main(void) {
    if (cu_device_count() == 0) {
        printf("bench_cuda_layer: no CUDA device, skipped\n");
        return 77;
    }
    MUST(cu_init(0, &cu));
    const char *te = getenv("BENCH_TYPE"), *me = getenv("BENCH_MODELS"), *ne = getenv("BENCH_NUSED");
    uint32_t type = DTYPE_Q4_0;
    if (te && *te) {
        for (type = 0; type < DTYPE_COUNT; type++)
            if (strcmp(dtype_name(type), te) == 0) break;
        if (type == DTYPE_COUNT || !cu_type_supported(type)) {
            fprintf(stderr, "BENCH_TYPE %s: not a type the CUDA backend multiplies\n", te);
            return 1;
        }
    }
    const uint32_t n_used = ne && *ne ? (uint32_t)atoi(ne) : 128;
    if (n_used < 8 || n_used > N_CTX) {
        fprintf(stderr, "BENCH_NUSED must be in 8..%d\n", N_CTX);
        return 1;
    }
    const double copy_bw = copy_bandwidth();
    printf("device: %s\ndevice copy (1 GiB, read + write): %.0f GB/s\n", cu_device_name(cu), copy_bw / 1e9);
    static const struct shape shapes[] = {{"7B", 4096, 32, 32, 128, 11008}, {"13B", 5120, 40, 40, 128, 13824}};

    /* the first GEMM of the process (module loading, cuBLAS heuristics) vs the next */
    {
        const struct shape *s = &shapes[0];
        MUST(cu_matmul_reserve(cu, N_BATCH, 2 * s->n_ff, 2 * s->n_ff, NULL));
        void *h = random_host(type, s->n_embd, s->n_embd);
        cu_weight w;
        MUST(cu_weight_upload(cu, type, s->n_embd, s->n_embd, h, NULL, 0, &w));
        free(h);
        float *x = dev_floats(N_BATCH * s->n_embd, 1.0f, 0.0f), *y = dalloc((uint64_t)N_BATCH * s->n_embd * 4);
        double t[3];
        for (int i = 0; i < 3; i++) {
            const double t0 = now_s();
            MUST(cu_matmul_gemm(cu, &w, x, N_BATCH, y, false));
            MUST(cu_sync(cu));
            t[i] = now_s() - t0;
        }
        printf("first cu_matmul_gemm of the process (4096 x 4096, %d tokens): %.0f us, second %.0f us, third %.0f us\n"
               "(the pp512 profile's 821 us for q, the first GEMM of a run, is this one-time cost spread over 32 calls)\n",
               N_BATCH, t[0] * 1e6, t[1] * 1e6, t[2] * 1e6);
        cu_weight_free(&w);
        cu_dfree(x), cu_dfree(y);
    }
    for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
        if (me && *me && !strstr(me, shapes[si].name)) continue;
        const struct shape *s = &shapes[si];
        MUST(cu_matmul_reserve(cu, N_BATCH, s->n_ff, 2 * s->n_ff, NULL));
        struct bench B;
        bench_init(&B, s, type, n_used);
        decode_tables(&B, copy_bw, n_used);
        prompt_tables(&B);
        bench_free(&B);
    }
    cu_free(cu);
    return 0;
}
