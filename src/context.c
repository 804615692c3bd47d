/*
 * context.c - a context: KV cache, scratch buffers, thread pool, and the
 * CPU forward pass of a batch of tokens.
 *
 * Data flow of optiml_decode (shapes per batch of n tokens):
 *
 *   tokens --embed--> x (n, n_embd)
 *   per layer:
 *     attention step: xb = rmsnorm(x); q,k,v = xb Wq, xb Wk, xb Wv;
 *                     rope(q, k); k,v -> cache cells; a = softmax(q K^T) V
 *                     over the cells of the token's sequence at positions
 *                     <= its own; x += a Wo
 *     FFN step:       xb = rmsnorm(x); h = act(xb Wgate) * (xb Wup);
 *                     x += h Wdown
 *   rows that asked for logits: logits = rmsnorm(x) Woutput
 *
 * The two steps of a layer are separate functions so a later backend can
 * run them on different devices. Each matrix op is one threadpool_run over
 * the weight rows: every weight row is read once per batch. Quantized
 * weights multiply activations quantized to 8 bits (q8_0 / q8_1 / q8_k,
 * as ggml does), quantized once per matmul before the rows are split;
 * batches of cpu_gemm_min_tokens(type) or more multiply q4_0, q8_0, q4_k
 * and q6_k weights through the prompt GEMM (cpu/ops.h: each thread
 * repacks 8 rows at a time into its own panel). All buffers are allocated
 * in optiml_context_init; decode allocates nothing.
 */
#define _POSIX_C_SOURCE 200809L
#include "context.h"
#include "gpu.h"
#include "sparse.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* batch entries a thread's attention takes together (attention_run) */
#define ATT_TOKENS 4

optiml_context_params optiml_context_default_params(void) {
    return (optiml_context_params){.n_ctx = 0, .n_batch = 512, .n_seq_max = 1, .n_threads = 0, .sparse_mode = 0};
}

static void rope_init(optiml_context *ctx) {
    const struct hparams *hp = &ctx->model->hp;
    const float *div = ctx->model->rope_freqs.data;
    for (int32_t i = 0; i < hp->n_rot / 2; i++) {
        double f = pow((double)hp->rope_base, -2.0 * i / hp->n_rot) / hp->rope_scale;
        ctx->rope_inv_freq[i] = (float)(div ? f / div[i] : f);
    }
}

/* Track the largest input row of the matrices, and the activation types
 * their weights need (act_used[t]); act_used[DTYPE_COUNT]: some weight
 * type has a prompt GEMM. */
static void matrix_note(const struct tensor *w, const struct cpu_kernels *kern, bool *act_used, int64_t *n_in_max) {
    const uint32_t t = kern->vec_dot_type[w->type];
    if (t != DTYPE_F32) act_used[t] = true;
    if (kern->gemm[w->type]) act_used[DTYPE_COUNT] = true;
    if (w->ne[0] > *n_in_max) *n_in_max = w->ne[0];
}

static int64_t model_matrix_inputs(const optiml_model *m, const struct cpu_kernels *kern, bool *act_used) {
    int64_t n_in_max = 0;
    matrix_note(&m->output, kern, act_used, &n_in_max);
    for (int32_t il = 0; il < m->hp.n_layer; il++) {
        const struct layer *l = &m->layers[il];
        const struct tensor *ws[LAYER_N_MATRICES] = LAYER_MATRICES(l);
        for (int k = 0; k < LAYER_N_MATRICES; k++) matrix_note(ws[k], kern, act_used, &n_in_max);
    }
    return n_in_max;
}

/* Per-thread panels and the q8_0 inputs' block summaries of the GEMM. */
static optiml_status context_alloc_gemm(optiml_context *ctx, int64_t n_in_max) {
    const uint64_t n_threads = (uint64_t)threadpool_n_threads(ctx->pool);
    ctx->gemm_panel_size = (cpu_gemm_panel_size(n_in_max) + 63) / 64 * 64;
    ctx->gemm_panel = optiml_alloc_aligned(n_threads * ctx->gemm_panel_size);
    ctx->gemm_xi = optiml_alloc_aligned((uint64_t)ctx->params.n_batch * (uint64_t)(n_in_max / 32 + 1) *
                                        sizeof(struct cpu_gemm_xblock));
    if (!ctx->gemm_panel || !ctx->gemm_xi)
        return optiml_fail(OPTIML_ERR_NOMEM, "context: cannot allocate the GEMM panels");
    return OPTIML_OK;
}

static optiml_status context_alloc_xq(optiml_context *ctx) {
    bool used[DTYPE_COUNT + 1] = {0};
    const int64_t n_in_max = model_matrix_inputs(ctx->model, ctx->kern, used);
    for (uint32_t t = 0; t < DTYPE_COUNT; t++) {
        if (!used[t]) continue;
        const uint64_t bs = dtype_block_size(t);
        const uint64_t n = (uint64_t)ctx->params.n_batch * (((uint64_t)n_in_max + bs - 1) / bs) * dtype_type_size(t);
        ctx->xq[t] = optiml_alloc_aligned(n);
        if (!ctx->xq[t])
            return optiml_fail(OPTIML_ERR_NOMEM, "context: cannot allocate %llu bytes of %s activations",
                               (unsigned long long)n, dtype_name(t));
    }
    return used[DTYPE_COUNT] ? context_alloc_gemm(ctx, n_in_max) : OPTIML_OK;
}

static optiml_status context_alloc(optiml_context *ctx) {
    const struct hparams *hp = &ctx->model->hp;
    const uint64_t nb = ctx->params.n_batch, nc = ctx->params.n_ctx;
    const uint64_t n_q = (uint64_t)hp->n_head * hp->head_dim, n_kv = (uint64_t)hp->n_head_kv * hp->head_dim;
    const uint64_t n_threads = (uint64_t)threadpool_n_threads(ctx->pool);
    struct { void **p; uint64_t n; } bufs[] = {
        {(void **)&ctx->kv.pos, nc * sizeof(int32_t)},
        {(void **)&ctx->kv.seq, nc * sizeof(uint64_t)},
        {(void **)&ctx->kv.k, (uint64_t)hp->n_layer * nc * n_kv * sizeof(float)},
        {(void **)&ctx->kv.v, (uint64_t)hp->n_layer * nc * n_kv * sizeof(float)},
        {(void **)&ctx->x, nb * hp->n_embd * sizeof(float)},
        {(void **)&ctx->xb, nb * hp->n_embd * sizeof(float)},
        {(void **)&ctx->q, nb * n_q * sizeof(float)},
        {(void **)&ctx->k, nb * n_kv * sizeof(float)},
        {(void **)&ctx->v, nb * n_kv * sizeof(float)},
        {(void **)&ctx->att, nb * n_q * sizeof(float)},
        {(void **)&ctx->gate, nb * hp->n_ff * sizeof(float)},
        {(void **)&ctx->up, nb * hp->n_ff * sizeof(float)},
        {(void **)&ctx->scores, n_threads * ATT_TOKENS * nc * sizeof(float)},
        {(void **)&ctx->rope_inv_freq, (uint64_t)hp->n_rot / 2 * sizeof(float)},
        {(void **)&ctx->rope_cs, nb * hp->n_rot * sizeof(float)},
        {(void **)&ctx->cells, nb * sizeof(uint32_t)},
        {(void **)&ctx->logits, nb * hp->n_vocab * sizeof(float)},
        {(void **)&ctx->logits_row, nb * sizeof(int32_t)},
        {(void **)&ctx->out_ids, nb * sizeof(int32_t)},
    };
    uint64_t total = 0;
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) {
        *bufs[i].p = optiml_alloc_aligned(bufs[i].n);
        if (!*bufs[i].p)
            return optiml_fail(OPTIML_ERR_NOMEM, "context: cannot allocate %llu bytes (n_ctx %llu, n_batch %llu)",
                               (unsigned long long)bufs[i].n, (unsigned long long)nc, (unsigned long long)nb);
        total += bufs[i].n;
    }
    LOG_DEBUG("context: %.1f MiB of buffers (KV cache %.1f MiB)", total / 1048576.0,
              2.0 * hp->n_layer * nc * n_kv * sizeof(float) / 1048576.0);
    ctx->kv.n_cells = (uint32_t)nc;
    for (uint64_t i = 0; i < nc; i++) ctx->kv.pos[i] = -1;
    for (uint64_t i = 0; i < nb; i++) ctx->logits_row[i] = -1;
    rope_init(ctx);
    return OPTIML_OK;
}

optiml_status optiml_context_init(const optiml_model *model, const optiml_context_params *params,
                                  optiml_context **out) {
    if (!out) return optiml_fail(OPTIML_ERR_INVALID_ARG, "optiml_context_init: out is NULL");
    *out = NULL;
    if (!model) return optiml_fail(OPTIML_ERR_INVALID_ARG, "optiml_context_init: model is NULL");
    optiml_context_params p = params ? *params : optiml_context_default_params();
    if (p.n_ctx == 0) p.n_ctx = (uint32_t)model->hp.n_ctx_train;
    if (p.n_batch == 0) p.n_batch = 512;
    if (p.n_batch > p.n_ctx) p.n_batch = p.n_ctx;
    if (p.n_seq_max == 0) p.n_seq_max = 1;
    if (p.n_threads <= 0) p.n_threads = threadpool_default_threads();
    if (p.n_ctx > (1u << 24) || p.n_seq_max > KV_SEQ_MAX)
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "context: n_ctx %u (max %u) or n_seq_max %u (max %d) out of range",
                           p.n_ctx, 1u << 24, p.n_seq_max, KV_SEQ_MAX);
    optiml_context *ctx = calloc(1, sizeof(*ctx));
    if (!ctx) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    ctx->model = model;
    ctx->params = p;
    ctx->kern = cpu_kernels_best();
    optiml_status st = threadpool_init(p.n_threads, &ctx->pool);
    if (st == OPTIML_OK) st = context_alloc(ctx);
    if (st == OPTIML_OK) st = context_alloc_xq(ctx);
    if (st == OPTIML_OK) st = sparse_init(ctx);
    if (st == OPTIML_OK) st = gpu_context_init(ctx);
    if (st != OPTIML_OK) {
        optiml_context_free(ctx);
        return st;
    }
    *out = ctx;
    return OPTIML_OK;
}

void optiml_context_free(optiml_context *ctx) {
    if (!ctx) return;
    gpu_context_free(ctx);
    threadpool_free(ctx->pool);
    sparse_free(ctx->sparse);
    void *bufs[] = {ctx->kv.pos, ctx->kv.seq, ctx->kv.k, ctx->kv.v, ctx->x, ctx->xb, ctx->q, ctx->k, ctx->v,
                    ctx->att, ctx->gate, ctx->up, ctx->scores, ctx->rope_inv_freq, ctx->rope_cs, ctx->cells,
                    ctx->logits, ctx->logits_row, ctx->out_ids, ctx->observer_gate};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) optiml_free_aligned(bufs[i]);
    for (int t = 0; t < DTYPE_COUNT; t++) optiml_free_aligned(ctx->xq[t]);
    optiml_free_aligned(ctx->gemm_panel);
    optiml_free_aligned(ctx->gemm_xi);
    free(ctx);
}

uint32_t optiml_context_n_ctx(const optiml_context *ctx) { return ctx->params.n_ctx; }

optiml_status context_set_ffn_observer(optiml_context *ctx, ffn_observer_fn fn, void *user) {
    if (fn && !ctx->observer_gate) {
        const size_t n = (size_t)ctx->params.n_batch * (size_t)ctx->model->hp.n_ff * sizeof(float);
        if (!(ctx->observer_gate = optiml_alloc_aligned(n)))
            return optiml_fail(OPTIML_ERR_NOMEM, "context: cannot allocate the FFN observer's buffer");
    }
    ctx->ffn_observer = fn;
    ctx->ffn_observer_user = user;
    return OPTIML_OK;
}

/* ---- batches ------------------------------------------------------------ */

optiml_batch optiml_batch_init(int32_t n_max) {
    optiml_batch b = {0};
    if (n_max <= 0) return b;
    b.token = calloc((size_t)n_max, sizeof(*b.token));
    b.pos = calloc((size_t)n_max, sizeof(*b.pos));
    b.seq_id = calloc((size_t)n_max, sizeof(*b.seq_id));
    b.logits = calloc((size_t)n_max, sizeof(*b.logits));
    if (!b.token || !b.pos || !b.seq_id || !b.logits) {
        optiml_batch_free(b);
        return (optiml_batch){0};
    }
    return b;
}

void optiml_batch_free(optiml_batch b) {
    free(b.token);
    free(b.pos);
    free(b.seq_id);
    free(b.logits);
}

/* ---- KV cache ----------------------------------------------------------- */

static bool kv_cell_in_seq(const struct kv_cache *kv, uint32_t c, int32_t seq) {
    return kv->pos[c] >= 0 && (seq < 0 || (kv->seq[c] >> seq & 1));
}

static void kv_cell_drop(struct kv_cache *kv, uint32_t c, int32_t seq) {
    kv->seq[c] = seq < 0 ? 0 : kv->seq[c] & ~(UINT64_C(1) << seq);
    if (kv->seq[c] == 0) kv->pos[c] = -1;
}

static void kv_update_used(struct kv_cache *kv) {
    while (kv->n_used_hi > 0 && kv->pos[kv->n_used_hi - 1] < 0) kv->n_used_hi--;
}

void optiml_kv_seq_truncate(optiml_context *ctx, int32_t seq_id, int32_t pos_start) {
    if (!ctx || seq_id >= (int32_t)ctx->params.n_seq_max) return;
    struct kv_cache *kv = &ctx->kv;
    for (uint32_t c = 0; c < kv->n_used_hi; c++)
        if (kv_cell_in_seq(kv, c, seq_id) && kv->pos[c] >= pos_start) kv_cell_drop(kv, c, seq_id);
    kv_update_used(kv);
}

void optiml_kv_seq_clear(optiml_context *ctx, int32_t seq_id) { optiml_kv_seq_truncate(ctx, seq_id, 0); }

void optiml_kv_seq_copy(optiml_context *ctx, int32_t src, int32_t dst) {
    if (!ctx || src < 0 || dst < 0 || src >= (int32_t)ctx->params.n_seq_max ||
        dst >= (int32_t)ctx->params.n_seq_max || src == dst)
        return;
    struct kv_cache *kv = &ctx->kv;
    for (uint32_t c = 0; c < kv->n_used_hi; c++)
        if (kv_cell_in_seq(kv, c, src)) kv->seq[c] |= UINT64_C(1) << dst;
}

int32_t optiml_kv_seq_pos_max(const optiml_context *ctx, int32_t seq_id) {
    int32_t mx = -1;
    if (!ctx || seq_id >= (int32_t)ctx->params.n_seq_max) return mx;
    for (uint32_t c = 0; c < ctx->kv.n_used_hi; c++)
        if (kv_cell_in_seq(&ctx->kv, c, seq_id) && ctx->kv.pos[c] > mx) mx = ctx->kv.pos[c];
    return mx;
}

/* Claim a free cell for every batch entry, or none of them. */
static optiml_status kv_claim(optiml_context *ctx, const optiml_batch *b) {
    struct kv_cache *kv = &ctx->kv;
    uint32_t c = 0;
    for (int32_t i = 0; i < b->n_tokens; i++) {
        while (c < kv->n_cells && kv->pos[c] >= 0) c++;
        if (c == kv->n_cells) {
            for (int32_t j = 0; j < i; j++) kv->pos[ctx->cells[j]] = -1; /* roll back */
            kv_update_used(kv);
            return optiml_fail(OPTIML_ERR_CONTEXT_FULL, "context full: %u cells, batch of %d tokens needs %d more",
                               kv->n_cells, b->n_tokens, b->n_tokens - i);
        }
        ctx->cells[i] = c;
        kv->pos[c] = b->pos[i];
        kv->seq[c] = UINT64_C(1) << b->seq_id[i];
        if (c + 1 > kv->n_used_hi) kv->n_used_hi = c + 1;
    }
    return OPTIML_OK;
}

/* ---- threaded ops -------------------------------------------------------- */

/* Up to three matrices applied to the same input rows: y_j = x W_j^T.
 * Quantized weights read the rows quantized beforehand (xq[j]), the
 * others the f32 rows. */
struct matmul_job {
    const struct cpu_kernels *kern;
    const float *x; /* (n_tok, n_in) */
    int64_t n_tok;
    int n_mat;
    bool accumulate; /* y += instead of y = */
    const struct tensor *w[3];
    float *y[3];       /* (n_tok, rows of w[j]) */
    const void *xq[3]; /* (n_tok, xq_row bytes) or NULL: f32 path */
    uint64_t xq_row[3];
    /* prompt GEMM for weight types that have one (cpu/ops.h), else NULL */
    const struct cpu_gemm_xblock *gemm_xi; /* (n_tok, n_in / 32) q8_0 inputs */
    char *gemm_panel;                      /* per thread: gemm_panel_size  */
    uint64_t gemm_panel_size;
    atomic_int_fast64_t next_chunk; /* matmul_run's work counter, from 0 */
};

/* The end of matrix w's x8 panels within rows [r0, r1) (r0 is a multiple
 * of 8: matmul_chunk_rows), r0 if it has none. */
static int64_t x8_end(const struct tensor *w, int64_t r0, int64_t r1) {
    if (!w->x8) return r0;
    const int64_t end = w->ne[1] / CPU_X8_ROWS * CPU_X8_ROWS;
    return r1 < end ? r1 : end > r0 ? end : r0;
}

static const void *x8_panel(const struct tensor *w, int64_t r) {
    return (const char *)w->x8 + (uint64_t)(r / CPU_X8_ROWS) * cpu_x8_panel_size(w->type, w->ne[0]);
}

/* Rows [r0, r1) of matrix j by the prompt GEMM, 8 rows per panel: from
 * the x8 copy where the matrix has one, else from its rows. */
static void matmul_rows_gemm(const struct matmul_job *job, int j, int64_t r0, int64_t r1, int ith) {
    const struct tensor *w = job->w[j];
    const cpu_gemm_fn gemm = job->kern->gemm[w->type], gemm_x8 = job->kern->gemm_x8[w->type];
    const cpu_gemm_fn gemm_x16 = job->kern->gemm_x16[w->type];
    const int64_t n_out = w->ne[1], x8 = x8_end(w, r0, r1);
    const struct cpu_gemm_xblock *xi = job->kern->vec_dot_type[w->type] == DTYPE_Q8_0 ? job->gemm_xi : NULL;
    void *panel = job->gemm_panel + (uint64_t)ith * job->gemm_panel_size;
    for (int64_t r = r0; r < r1; r += CPU_GEMM_ROWS) {
        const int n_rows = r1 - r < CPU_GEMM_ROWS ? (int)(r1 - r) : CPU_GEMM_ROWS;
        if (gemm_x16 && r + 2 * CPU_X8_ROWS <= x8) { /* two panels at once */
            gemm_x16(w->ne[0], x8_panel(w, r), 0, 2 * CPU_X8_ROWS, job->xq[j], job->xq_row[j], xi, job->n_tok,
                     job->y[j] + r, (uint64_t)n_out, job->accumulate, panel);
            r += CPU_X8_ROWS;
        } else if (r < x8)
            gemm_x8(w->ne[0], x8_panel(w, r), 0, CPU_X8_ROWS, job->xq[j], job->xq_row[j], xi, job->n_tok,
                    job->y[j] + r, (uint64_t)n_out, job->accumulate, panel);
        else
            gemm(w->ne[0], tensor_row(w, r), w->row_size, n_rows, job->xq[j], job->xq_row[j], xi, job->n_tok,
                 job->y[j] + r, (uint64_t)n_out, job->accumulate, panel);
    }
}

/* Rows [r0, x8) of matrix j from its x8 panels, one input row at a time
 * (decode, and batches too small for the GEMM), 64 rows for every input
 * before the next 64 (they stay in cache between inputs). */
static void matmul_rows_x8(const struct matmul_job *job, int j, int64_t r0, int64_t x8) {
    const struct tensor *w = job->w[j];
    const cpu_gemv_x8_fn gemv = job->kern->gemv_x8[w->type];
    const int64_t n_in = w->ne[0], n_out = w->ne[1];
    const bool q8_0 = job->kern->vec_dot_type[w->type] == DTYPE_Q8_0; /* xi: q4_0's block summaries */
    float out[64];
    for (int64_t r = r0; r < x8; r += 64) {
        const int64_t n = x8 - r < 64 ? x8 - r : 64;
        for (int64_t t = 0; t < job->n_tok; t++) {
            gemv(n_in, x8_panel(w, r), n / CPU_X8_ROWS, (const char *)job->xq[j] + (uint64_t)t * job->xq_row[j],
                 q8_0 ? job->gemm_xi + t * (n_in / 32) : NULL, out);
            float *y = job->y[j] + t * n_out + r;
            for (int64_t k = 0; k < n; k++) y[k] = job->accumulate ? y[k] + out[k] : out[k];
        }
    }
}

/* Rows [r0, r1) of matrix j for every token (thread ith). The prompt
 * GEMM where the job has it (equal to dot_q to float rounding only);
 * else batches of 4 or more tokens: pairs of rows through the 2-row tiles
 * (2x4 for 4 tokens at a time, 2x1 for the rest); otherwise (decode) and
 * for a last odd row, single rows through dot_q_x4 / dot_q (or dot on f32
 * inputs). The tiles give dot_q's bits (cpu/ops.h), so there a row's
 * result does not depend on its tile. */
static void matmul_rows(const struct matmul_job *job, int j, int64_t r0, int64_t r1, int ith) {
    const struct tensor *w = job->w[j];
    if (job->gemm_panel && job->xq[j] && job->kern->gemm[w->type] && job->n_tok >= cpu_gemm_min_tokens(w->type)) {
        matmul_rows_gemm(job, j, r0, r1, ith);
        return;
    }
    /* the x8 panels, then any rows past the last one (q8_0 inputs: with
     * their block summaries, which matmul makes when a matrix needs them) */
    if (w->x8 && job->xq[j] && (job->gemm_xi || job->kern->vec_dot_type[w->type] != DTYPE_Q8_0)) {
        const int64_t x8 = x8_end(w, r0, r1);
        matmul_rows_x8(job, j, r0, x8);
        r0 = x8;
    }
    const struct cpu_kernels *kern = job->kern;
    const cpu_dot_fn dot = kern->dot[w->type];
    const cpu_dot_q_fn dot_q = kern->dot_q[w->type];
    const cpu_dot_q_x4_fn dot_q_x4 = kern->dot_q_x4[w->type];
    /* decode's rows with the input's block summaries, where there are both */
    const cpu_dot_q_xi_fn dot_q_xi = job->gemm_xi && kern->vec_dot_type[w->type] == DTYPE_Q8_0 ? kern->dot_q_xi[w->type]
                                                                                               : NULL;
    const cpu_dot_q_tile_fn dot_2x1 = kern->dot_q_2x1[w->type], dot_2x4 = kern->dot_q_2x4[w->type];
    const char *xq = job->xq[j];
    const uint64_t xs = job->xq_row[j];
    const int64_t n_in = w->ne[0], n_out = w->ne[1], n_tok = job->n_tok;
    float *yj = job->y[j];
    const bool acc = job->accumulate;
    int64_t r = r0;
    if (xq && dot_2x1 && dot_2x4 && n_tok >= 4) { /* decode: one row at a time (cpu/ops_avx2.c) */
        const int64_t n_x4 = n_tok / 4 * 4;
        for (; r + 2 <= r1; r += 2) {
            const void *row = tensor_row(w, r);
            float s[8];
            for (int64_t t = 0; t < n_x4; t += 4) {
                dot_2x4(n_in, row, w->row_size, xq + (uint64_t)t * xs, xs, s);
                for (int k = 0; k < 8; k++) {
                    float *y = &yj[(t + k % 4) * n_out + r + k / 4];
                    *y = acc ? *y + s[k] : s[k];
                }
            }
            for (int64_t t = n_x4; t < n_tok; t++) {
                dot_2x1(n_in, row, w->row_size, xq + (uint64_t)t * xs, xs, s);
                for (int k = 0; k < 2; k++) {
                    float *y = &yj[t * n_out + r + k];
                    *y = acc ? *y + s[k] : s[k];
                }
            }
        }
    }
    /* tokens handled 4 at a time (one unpacking of the row for 4) */
    const int64_t n_x4 = xq && dot_q_x4 ? n_tok / 4 * 4 : 0;
    for (; r < r1; r++) {
        const void *row = tensor_row(w, r);
        for (int64_t t = 0; t < n_x4; t += 4) {
            float s4[4];
            dot_q_x4(n_in, row, xq + (uint64_t)t * xs, xs, s4);
            for (int k = 0; k < 4; k++) {
                float *y = &yj[(t + k) * n_out + r];
                *y = acc ? *y + s4[k] : s4[k];
            }
        }
        for (int64_t t = n_x4; t < n_tok; t++) {
            float s = dot_q_xi ? dot_q_xi(n_in, row, xq + (uint64_t)t * xs, job->gemm_xi + t * (n_in / 32), NULL)
                      : xq     ? dot_q(n_in, row, xq + (uint64_t)t * xs)
                               : dot(n_in, row, job->x + t * n_in);
            float *y = &yj[t * n_out + r];
            *y = acc ? *y + s : s;
        }
    }
}

/* Rows per chunk of matrix j: about 8 chunks per thread, a multiple of 16
 * rows (even, for the 2-row tiles). */
static int64_t matmul_chunk_rows(const struct matmul_job *job, int j, int nth) {
    const int64_t per = (job->w[j]->ne[1] + 8 * nth - 1) / (8 * nth);
    return per < 16 ? 16 : (per + 15) / 16 * 16;
}

/* Threads take chunks of rows (of all the job's matrices in turn) from a
 * shared counter until none is left: a thread that lost its core for a
 * while (a busy machine) holds up no more than one chunk. */
static void matmul_run(void *arg, int ith, int nth) {
    struct matmul_job *job = arg;
    for (;;) {
        int64_t c = atomic_fetch_add_explicit(&job->next_chunk, 1, memory_order_relaxed);
        int j = 0;
        int64_t per = 0, n_chunks = 0;
        for (; j < job->n_mat; j++, c -= n_chunks) {
            per = matmul_chunk_rows(job, j, nth);
            n_chunks = (job->w[j]->ne[1] + per - 1) / per;
            if (c < n_chunks) break;
        }
        if (j == job->n_mat) return;
        const int64_t r0 = c * per, r1 = r0 + per < job->w[j]->ne[1] ? r0 + per : job->w[j]->ne[1];
        matmul_rows(job, j, r0, r1, ith);
    }
}

/* Quantize the input rows into each activation type a matrix needs. */
struct quantize_job {
    const struct cpu_kernels *kern;
    const float *x; /* (n_tok, n_in) */
    int64_t n_tok, n_in;
    int n_types;
    uint32_t type[3];
    void *dst[3];
    uint64_t row[3];
    struct cpu_gemm_xblock *gemm_xi; /* NULL, or the GEMM's q8_0 block summaries */
};

static void quantize_run(void *arg, int ith, int nth) {
    const struct quantize_job *job = arg;
    int64_t t0, t1;
    threadpool_split(job->n_tok, ith, nth, &t0, &t1);
    for (int k = 0; k < job->n_types; k++)
        for (int64_t t = t0; t < t1; t++) {
            char *dst = (char *)job->dst[k] + (uint64_t)t * job->row[k];
            job->kern->quantize[job->type[k]](job->n_in, job->x + t * job->n_in, dst);
            if (job->gemm_xi && job->type[k] == DTYPE_Q8_0)
                cpu_gemm_prep_q8_0(job->n_in, dst, job->gemm_xi + t * (job->n_in / 32));
        }
}

static void matmul(optiml_context *ctx, const float *x, int64_t n_tok, bool accumulate, int n_mat,
                   const struct tensor *w0, float *y0, const struct tensor *w1, float *y1,
                   const struct tensor *w2, float *y2) {
    struct matmul_job job = {.kern = ctx->kern, .x = x, .n_tok = n_tok, .n_mat = n_mat,
                             .accumulate = accumulate, .w = {w0, w1, w2}, .y = {y0, y1, y2}};
    const int64_t n_in = w0->ne[0];
    struct quantize_job qj = {.kern = ctx->kern, .x = x, .n_tok = n_tok, .n_in = n_in};
    if (ctx->gemm_panel && n_tok >= CPU_GEMM_MIN_TOKENS) {
        job.gemm_panel = ctx->gemm_panel;
        job.gemm_panel_size = ctx->gemm_panel_size;
        job.gemm_xi = qj.gemm_xi = ctx->gemm_xi;
    }
    for (int j = 0; j < n_mat && !job.gemm_xi; j++) /* decode: the summaries dot_q_xi reads */
        if (ctx->gemm_xi && ctx->kern->dot_q_xi[job.w[j]->type]) job.gemm_xi = qj.gemm_xi = ctx->gemm_xi;
    for (int j = 0; j < n_mat; j++) {
        const uint32_t t = ctx->kern->vec_dot_type[job.w[j]->type];
        if (t == DTYPE_F32) continue;
        dtype_row_size(t, (uint64_t)n_in, &job.xq_row[j]);
        job.xq[j] = ctx->xq[t];
        int k = 0;
        while (k < qj.n_types && qj.type[k] != t) k++;
        if (k == qj.n_types) {
            qj.type[k] = t;
            qj.dst[k] = ctx->xq[t];
            qj.row[k] = job.xq_row[j];
            qj.n_types++;
        }
    }
    if (qj.n_types > 0) {
        /* a few rows are quicker to quantize here than to hand out */
        if (n_tok * n_in * qj.n_types <= 65536) quantize_run(&qj, 0, 1);
        else threadpool_run(ctx->pool, quantize_run, &qj);
    }
    threadpool_run(ctx->pool, matmul_run, &job);
}

struct rmsnorm_job {
    const float *x;
    float *out;
    const float *w;
    int64_t n, n_rows;
    const int32_t *rows; /* NULL: rows 0..n_rows-1; else source row of out row i */
    float eps;
};

static void rmsnorm_run(void *arg, int ith, int nth) {
    const struct rmsnorm_job *job = arg;
    int64_t i0, i1;
    threadpool_split(job->n_rows, ith, nth, &i0, &i1);
    for (int64_t i = i0; i < i1; i++) {
        int64_t src = job->rows ? job->rows[i] : i;
        ops_rmsnorm(job->out + i * job->n, job->x + src * job->n, job->w, job->n, job->eps);
    }
}

static void rmsnorm(optiml_context *ctx, float *out, const float *x, const struct tensor *w, int64_t n_rows,
                    const int32_t *rows) {
    struct rmsnorm_job job = {.x = x, .out = out, .w = w->data, .n = w->ne[0], .n_rows = n_rows,
                              .rows = rows, .eps = ctx->model->hp.norm_eps};
    threadpool_run(ctx->pool, rmsnorm_run, &job);
}

struct attention_job {
    optiml_context *ctx;
    const optiml_batch *batch;
    int32_t il;
};

/* Up to ATT_TOKENS (4) consecutive batch entries of one head per
 * iteration: scores over their cells, softmax, weighted sum of values.
 * Where all 4 see a cell, its key and value rows are read once for the 4
 * (dot_f32_4x: the scores within float rounding of dot's; axpy_f32_4y:
 * axpy's bits); elsewhere each entry takes its own dot and axpy. Score
 * rows: ATT_TOKENS per thread in ctx->scores. */
static void attention_run(void *arg, int ith, int nth) {
    const struct attention_job *job = arg;
    optiml_context *ctx = job->ctx;
    const struct hparams *hp = &ctx->model->hp;
    const struct kv_cache *kv = &ctx->kv;
    const optiml_batch *b = job->batch;
    const int64_t hd = hp->head_dim, n_q = (int64_t)hp->n_head * hd, n_kv = (int64_t)hp->n_head_kv * hd;
    const int32_t group = hp->n_head / hp->n_head_kv;
    const float scale = 1.0f / sqrtf((float)hd);
    const float *kc = kv->k + (uint64_t)job->il * kv->n_cells * n_kv;
    const float *vc = kv->v + (uint64_t)job->il * kv->n_cells * n_kv;
    const cpu_dot_fn dot = ctx->kern->dot[DTYPE_F32];
    const cpu_axpy_fn axpy = ctx->kern->axpy[DTYPE_F32]; /* out += w v: gcc -O2 leaves the loop scalar */
    const cpu_dot_f32_4x_fn dot4 = ctx->kern->dot_f32_4x;
    const cpu_axpy_f32_4y_fn axpy4 = ctx->kern->axpy_f32_4y;
    float *sc = ctx->scores + (uint64_t)ith * ATT_TOKENS * kv->n_cells;
    /* groups head by head, dealt round-robin: a prompt's later entries see
     * more cells, so contiguous ranges left the first thread waiting; and
     * a head's keys and values (256 KiB each at 512 cells of 128 floats)
     * stay in L2 from one group to the next, where token-major order went
     * through every head's in between (pp512 on the dev EPYC: 34.1 to 39.3
     * tokens/s, attention 40% less time) */
    const int64_t n_groups = (b->n_tokens + ATT_TOKENS - 1) / ATT_TOKENS;
    for (int64_t u = ith; u < n_groups * hp->n_head; u += nth) {
        const int32_t h = (int32_t)(u / n_groups), t0 = (int32_t)(u % n_groups) * ATT_TOKENS;
        const int nt = b->n_tokens - t0 < ATT_TOKENS ? b->n_tokens - t0 : ATT_TOKENS;
        const int64_t koff = (int64_t)(h / group) * hd;
        float mx[ATT_TOKENS], inv[ATT_TOKENS], *s[ATT_TOKENS];
        const float *q[ATT_TOKENS];
        int32_t pos[ATT_TOKENS], seq[ATT_TOKENS];
        for (int k = 0; k < nt; k++) {
            mx[k] = -INFINITY;
            s[k] = sc + (uint64_t)k * kv->n_cells;
            q[k] = ctx->q + (t0 + k) * n_q + h * hd;
            pos[k] = b->pos[t0 + k];
            seq[k] = b->seq_id[t0 + k];
        }
        uint32_t c_end = 0; /* past the last cell any entry sees */
        for (uint32_t c = 0; c < kv->n_used_hi; c++) {
            const float *kr = kc + c * n_kv + koff;
            bool sees[ATT_TOKENS];
            int n_see = 0;
            for (int k = 0; k < nt; k++) {
                sees[k] = kv_cell_in_seq(kv, c, seq[k]) && kv->pos[c] <= pos[k];
                n_see += sees[k];
            }
            float d[ATT_TOKENS];
            const bool all4 = dot4 && n_see == ATT_TOKENS;
            if (all4) dot4(hd, kr, q[0], (uint64_t)n_q, d); /* the key once for the 4 entries */
            for (int k = 0; k < nt; k++) {
                if (!sees[k]) {
                    s[k][c] = -INFINITY;
                    continue;
                }
                s[k][c] = (all4 ? d[k] : dot(hd, kr, q[k])) * scale;
                if (s[k][c] > mx[k]) mx[k] = s[k][c];
                c_end = c + 1;
            }
        }
        for (int k = 0; k < nt; k++) {
            float sum = 0.0f;
            for (uint32_t c = 0; c < c_end; c++) {
                s[k][c] = s[k][c] == -INFINITY ? 0.0f : expf(s[k][c] - mx[k]);
                sum += s[k][c];
            }
            inv[k] = 1.0f / sum; /* sum >= 1: the entry's own cell */
            memset(ctx->att + (t0 + k) * n_q + h * hd, 0, (size_t)hd * sizeof(float));
        }
        float *out = ctx->att + t0 * n_q + h * hd;
        for (uint32_t c = 0; c < c_end; c++) {
            const float *vr = vc + c * n_kv + koff;
            if (axpy4 && nt == ATT_TOKENS && s[0][c] != 0.0f && s[1][c] != 0.0f && s[2][c] != 0.0f &&
                s[3][c] != 0.0f) {
                const float a[ATT_TOKENS] = {s[0][c] * inv[0], s[1][c] * inv[1], s[2][c] * inv[2], s[3][c] * inv[3]};
                axpy4(hd, a, vr, out, (uint64_t)n_q); /* the value once for the 4 */
                continue;
            }
            for (int k = 0; k < nt; k++)
                if (s[k][c] != 0.0f) axpy(hd, s[k][c] * inv[k], vr, out + k * n_q);
        }
    }
}

/* ---- the forward pass ----------------------------------------------------- */

static void embed_tokens(optiml_context *ctx, const optiml_batch *b) {
    const struct tensor *emb = &ctx->model->tok_embd;
    const int64_t n_embd = ctx->model->hp.n_embd;
    for (int32_t i = 0; i < b->n_tokens; i++)
        ctx->kern->to_f32[emb->type](n_embd, tensor_row(emb, b->token[i]), ctx->x + i * n_embd);
}

static void rope_prepare(optiml_context *ctx, const optiml_batch *b) {
    const int32_t n_rot = ctx->model->hp.n_rot;
    for (int32_t i = 0; i < b->n_tokens; i++)
        for (int32_t j = 0; j < n_rot / 2; j++) {
            float a = (float)b->pos[i] * ctx->rope_inv_freq[j];
            ctx->rope_cs[i * n_rot + 2 * j] = cosf(a);
            ctx->rope_cs[i * n_rot + 2 * j + 1] = sinf(a);
        }
}

/* Rotate q and k, then store k and v of every batch entry in its cell. */
static void rope_and_store(optiml_context *ctx, const optiml_batch *b, int32_t il) {
    const struct hparams *hp = &ctx->model->hp;
    const int64_t hd = hp->head_dim, n_q = (int64_t)hp->n_head * hd, n_kv = (int64_t)hp->n_head_kv * hd;
    struct kv_cache *kv = &ctx->kv;
    void (*rope)(float *, const float *, int64_t) = hp->rope_neox ? ops_rope_neox : ops_rope;
    for (int32_t i = 0; i < b->n_tokens; i++) {
        const float *cs = ctx->rope_cs + i * hp->n_rot;
        for (int32_t h = 0; h < hp->n_head; h++) rope(ctx->q + i * n_q + h * hd, cs, hp->n_rot);
        for (int32_t h = 0; h < hp->n_head_kv; h++) rope(ctx->k + i * n_kv + h * hd, cs, hp->n_rot);
        uint64_t off = ((uint64_t)il * kv->n_cells + ctx->cells[i]) * n_kv;
        memcpy(kv->k + off, ctx->k + i * n_kv, (size_t)n_kv * sizeof(float));
        memcpy(kv->v + off, ctx->v + i * n_kv, (size_t)n_kv * sizeof(float));
    }
}

/* y[i] += bias for each of n rows of y (bias->ne[0] wide); no bias: nothing. */
static void add_bias(float *y, const struct tensor *bias, int64_t n) {
    if (!bias->data) return;
    const float *b = bias->data;
    for (int64_t i = 0; i < n; i++) ops_add(y + i * bias->ne[0], b, bias->ne[0]);
}

static void layer_attention(optiml_context *ctx, const optiml_batch *b, int32_t il) {
    const struct layer *l = &ctx->model->layers[il];
    const int64_t n = b->n_tokens;
    rmsnorm(ctx, ctx->xb, ctx->x, &l->attn_norm, n, NULL);
    matmul(ctx, ctx->xb, n, false, 3, &l->wq, ctx->q, &l->wk, ctx->k, &l->wv, ctx->v);
    add_bias(ctx->q, &l->bq, n);
    add_bias(ctx->k, &l->bk, n);
    add_bias(ctx->v, &l->bv, n);
    rope_and_store(ctx, b, il);
    struct attention_job job = {.ctx = ctx, .batch = b, .il = il};
    threadpool_run(ctx->pool, attention_run, &job);
    matmul(ctx, ctx->att, n, true, 1, &l->wo, ctx->x, NULL, NULL, NULL, NULL);
    add_bias(ctx->x, &l->bo, n);
}

static void layer_ffn(optiml_context *ctx, const optiml_batch *b, int32_t il) {
    const struct layer *l = &ctx->model->layers[il];
    const struct hparams *hp = &ctx->model->hp;
    const int64_t n = b->n_tokens;
    rmsnorm(ctx, ctx->xb, ctx->x, &l->ffn_norm, n, NULL);
    if (ctx->sparse && sparse_layer_ffn(ctx, n, il)) return; /* else dense pays off */
    if (l->ffn_gate.data) matmul(ctx, ctx->xb, n, false, 2, &l->ffn_gate, ctx->gate, &l->ffn_up, ctx->up, NULL, NULL);
    else matmul(ctx, ctx->xb, n, false, 1, &l->ffn_up, ctx->up, NULL, NULL, NULL, NULL); /* relu_nogate */
    const bool keep_g = ctx->ffn_observer && l->ffn_gate.data;
    if (keep_g) memcpy(ctx->observer_gate, ctx->gate, (size_t)(n * hp->n_ff) * sizeof(float));
    const float cut = ctx->model->sparse.act_threshold; /* FATReLU */
    if (cut > 0.0f) ops_threshold(l->ffn_gate.data ? ctx->gate : ctx->up, n * hp->n_ff, cut);
    if (ctx->sparse) sparse_gate_cut(ctx, n, il); /* CATS thresholds */
    ops_act_mul(ctx->gate, ctx->up, n * hp->n_ff, hp->ffn_act);
    if (ctx->sparse) sparse_h_cut(ctx, n, il); /* CATS product score */
    if (ctx->ffn_observer)
        ctx->ffn_observer(ctx->ffn_observer_user, il, n, ctx->xb, keep_g ? ctx->observer_gate : NULL, ctx->gate);
    matmul(ctx, ctx->gate, n, true, 1, &l->ffn_down, ctx->x, NULL, NULL, NULL, NULL);
}

/* Which batch entries get logits: their rows in ctx->logits. */
static int32_t select_outputs(optiml_context *ctx, const optiml_batch *b) {
    int32_t n_out = 0;
    for (uint32_t i = 0; i < ctx->params.n_batch; i++) {
        bool want = (int32_t)i < b->n_tokens && b->logits[i];
        ctx->logits_row[i] = want ? n_out : -1;
        if (want) ctx->out_ids[n_out++] = (int32_t)i;
    }
    return n_out;
}

static void output_logits(optiml_context *ctx, int32_t n_out) {
    if (n_out == 0) return;
    rmsnorm(ctx, ctx->xb, ctx->x, &ctx->model->output_norm, n_out, ctx->out_ids);
    matmul(ctx, ctx->xb, n_out, false, 1, &ctx->model->output, ctx->logits, NULL, NULL, NULL, NULL);
}

static optiml_status batch_check(const optiml_context *ctx, const optiml_batch *b) {
    if (!b || b->n_tokens <= 0 || !b->token || !b->pos || !b->seq_id || !b->logits)
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "decode: empty or incomplete batch");
    if ((uint32_t)b->n_tokens > ctx->params.n_batch)
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "decode: batch of %d tokens exceeds n_batch %u", b->n_tokens,
                           ctx->params.n_batch);
    for (int32_t i = 0; i < b->n_tokens; i++) {
        if (b->token[i] < 0 || b->token[i] >= ctx->model->hp.n_vocab)
            return optiml_fail(OPTIML_ERR_INVALID_ARG, "decode: batch entry %d: token %d outside vocabulary 0..%d", i,
                               b->token[i], ctx->model->hp.n_vocab - 1);
        if (b->seq_id[i] < 0 || b->seq_id[i] >= (int32_t)ctx->params.n_seq_max)
            return optiml_fail(OPTIML_ERR_INVALID_ARG, "decode: batch entry %d: sequence id %d outside 0..%u", i,
                               b->seq_id[i], ctx->params.n_seq_max - 1);
        if (b->pos[i] < 0)
            return optiml_fail(OPTIML_ERR_INVALID_ARG, "decode: batch entry %d: negative position %d", i, b->pos[i]);
    }
    return OPTIML_OK;
}

optiml_status optiml_decode(optiml_context *ctx, const optiml_batch *batch) {
    if (!ctx) return optiml_fail(OPTIML_ERR_INVALID_ARG, "decode: context is NULL");
    TRY(batch_check(ctx, batch));
    TRY(kv_claim(ctx, batch));
    const int32_t first_gpu = gpu_first_layer(ctx->model); /* n_layer: CPU only */
    if (!gpu_embeds(ctx->model)) embed_tokens(ctx, batch);
    rope_prepare(ctx, batch);
    for (int32_t il = 0; il < first_gpu; il++) {
        layer_attention(ctx, batch, il);
        layer_ffn(ctx, batch, il);
    }
    const int32_t n_out = select_outputs(ctx, batch);
    bool cpu_output = true;
    optiml_status st = gpu_forward(ctx, batch, n_out, &cpu_output);
    if (st != OPTIML_OK) {
        /* nothing of the batch counts: free its cells, no logits */
        for (int32_t i = 0; i < batch->n_tokens; i++) kv_cell_drop(&ctx->kv, ctx->cells[i], -1);
        kv_update_used(&ctx->kv);
        select_outputs(ctx, &(optiml_batch){.n_tokens = 0});
        return st;
    }
    if (cpu_output) output_logits(ctx, n_out);
    return OPTIML_OK;
}

float *optiml_get_logits_ith(optiml_context *ctx, int32_t i) {
    if (!ctx || i < 0 || (uint32_t)i >= ctx->params.n_batch || ctx->logits_row[i] < 0) return NULL;
    return ctx->logits + (uint64_t)ctx->logits_row[i] * ctx->model->hp.n_vocab;
}
