/*
 * gpu.c - layer offload (CUDA builds): placement of layers under -ngl or
 * a VRAM budget, weight upload at model load, device buffers per context,
 * and the GPU part of the forward pass (see gpu.h). The kernels are behind
 * src/cuda/cuda.h; this file is plain C.
 *
 * One decode step with layers [first, n_layer) on the GPU:
 *   host: KV cells claimed, per-step arrays (positions, cells, cell
 *         positions and sequences, n_used) written to a pinned buffer
 *   GPU:  step arrays uploaded (one copy); x uploaded from the CPU layers'
 *         output (or the embedding looked up on the GPU in a full offload);
 *         per layer: rmsnorm + q|k|v (one fused product on the stacked
 *         weight), rope + KV store, attention (decode: one kernel whose
 *         last block per head merges the splits and, for a quantized wo,
 *         writes wo's 8-bit input), wo (+=), rmsnorm + gate|up, act*up +
 *         down (+=); 9 launches per layer for a quantized model (the input
 *         steps are a small kernel before each product); then either the
 *         output norm and head
 *         (logits rows downloaded) or x downloaded for the CPU head
 * Stacked weights: wq|wk|wv and ffn_gate|ffn_up are uploaded as one weight
 * each when their types match (else separately, writing the same output
 * rows), so one product writes q|k|v (gate|up) side by side per token row;
 * rope reads that row with a stride and the down product's input step
 * computes act(gate) * up from it (FATReLU threshold included).
 * A single-token step is captured once as a CUDA graph and replayed: every
 * value that changes between steps lives in the uploaded step arrays.
 */
#define _POSIX_C_SOURCE 200809L
#include "gpu.h"

#include "cuda/cuda.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GPU_STAGING_BYTES (64u << 20)
/* the KV cache the budget reserves room for at model load (the context's
 * size is not known then): min(training context, this) cells, and batches
 * of up to 512 tokens */
#define GPU_BUDGET_CTX 4096
#define GPU_BUDGET_BATCH 512

struct gpu_layer {
    cu_weight qkv;          /* wq|wk|wv stacked: n_embd -> n_q + 2 n_kv (types equal) */
    cu_weight wq, wk, wv;   /* otherwise separate                                    */
    cu_weight gu;           /* ffn_gate|ffn_up stacked: n_embd -> 2 n_ff             */
    cu_weight gate, up;     /* otherwise separate (up alone: relu without gate)      */
    cu_weight wo, down;
    float *attn_norm, *ffn_norm; /* device f32 (n_embd) */
    float *bqkv;                 /* device f32 q|k|v biases, or NULL */
};

struct gpu_model {
    cu_ctx *cu;              /* device and stream used for the uploads   */
    int32_t first;           /* layers >= first are on the GPU           */
    bool head;               /* output norm + head (+ embedding) on GPU  */
    struct gpu_layer *layers; /* (n_layer), entries < first empty        */
    cu_weight output, tok_embd;
    bool emb_is_output;       /* tied: tok_embd is the output weight     */
    float *output_norm;
    uint64_t bytes;           /* device bytes of weights                 */
};

/* the ops of a GPU step, for the profile */
enum gpu_op { OP_UPLOAD, OP_QKV, OP_ROPE, OP_ATTN, OP_O, OP_GU, OP_DOWN, OP_HEAD, OP_DOWNLOAD, GPU_OP_COUNT };
static const char *const gpu_op_names[GPU_OP_COUNT] = {
    "upload", "norm+qkv", "rope+store", "attention", "wo", "norm+gate|up", "act+down", "output head", "download"};
#define PROF_SLOTS 4096

struct gpu_ctx {
    cu_ctx *cu;
    /* activations (n_batch rows) */
    float *x, *xb, *logits;
    float *qkv; /* (n_batch, n_q + 2 n_kv): the q|k|v product    */
    float *q;   /* (n_batch, n_q): q rotated                      */
    float *att; /* (n_batch, n_q)                                 */
    float *gu;  /* (n_batch, 2 n_ff): the gate|up product          */
    float *kv_k, *kv_v; /* (GPU layers, n_ctx, n_kv) */
    float *inv_freq;    /* (n_rot / 2)               */
    void *att_scratch;
    /* per-step arrays: one device buffer and its pinned host mirror */
    void *d_step, *h_step;
    uint64_t step_bytes;
    uint64_t off_pos, off_seq, off_cell, off_tok, off_rows, off_used, off_cpos, off_cseq;
    struct cu_batch batch; /* device pointers into d_step */
    float *h_x;            /* pinned (n_batch, n_embd)   */
    float *h_logits;       /* pinned (n_vocab): the graph's output row */
    cu_graph *graph[2];    /* single-token step, [want logits]          */
    bool no_graph;
    /* OPTIML_CUDA_PROFILE=1: every op of every step timed with events
     * (graphs off), a table per op logged when the context is freed */
    cu_timer *prof;
    int prof_slot;
    double prof_ms[GPU_OP_COUNT];
    int64_t prof_calls[GPU_OP_COUNT];
    int8_t prof_op[PROF_SLOTS]; /* op that ended at each slot */
    uint64_t bytes;
};

/* ---- placement -------------------------------------------------------------- */

static uint64_t layer_weight_bytes(const struct hparams *hp, const struct layer *l) {
    const struct tensor *ws[LAYER_N_MATRICES] = LAYER_MATRICES(l);
    uint64_t n = 2 * (uint64_t)hp->n_embd * sizeof(float);
    for (int i = 0; i < LAYER_N_MATRICES; i++) n += cu_weight_bytes(ws[i]->type, ws[i]->ne[0], ws[i]->ne[1]);
    return n;
}

static uint64_t kv_bytes_per_layer(const struct hparams *hp, uint64_t n_ctx) {
    return 2 * n_ctx * (uint64_t)hp->n_head_kv * hp->head_dim * sizeof(float);
}

static int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

static void matmul_dims(const struct hparams *hp, int64_t *n_in_max, int64_t *n_out_max) {
    const int64_t n_q = (int64_t)hp->n_head * hp->head_dim, n_kv = (int64_t)hp->n_head_kv * hp->head_dim;
    *n_in_max = max_i64(max_i64(hp->n_embd, n_q), hp->n_ff);
    /* stacked weights: q|k|v and gate|up rows */
    *n_out_max = max_i64(max_i64(max_i64(hp->n_embd, n_q + 2 * n_kv), 2 * (int64_t)hp->n_ff), hp->n_vocab);
}

/* Device bytes of a context's activations and scratch for n_batch rows. */
static uint64_t ctx_scratch_bytes(const struct hparams *hp, uint64_t n_batch, uint64_t n_ctx, bool head) {
    const uint64_t n_q = (uint64_t)hp->n_head * hp->head_dim, n_kv = (uint64_t)hp->n_head_kv * hp->head_dim;
    int64_t in_max, out_max;
    matmul_dims(hp, &in_max, &out_max);
    /* x, xb, q|k|v, q, att, gate|up */
    uint64_t n = n_batch * (2 * (uint64_t)hp->n_embd + 3 * n_q + 2 * n_kv + 2 * (uint64_t)hp->n_ff) * sizeof(float);
    if (head) n += n_batch * (uint64_t)hp->n_vocab * sizeof(float);
    n += cu_matmul_scratch_bytes((int64_t)n_batch, in_max, out_max);
    n += cu_attention_scratch_bytes((int32_t)n_batch, hp->n_head, hp->head_dim, (uint32_t)n_ctx);
    n += n_ctx * 12 + n_batch * 20 + 64;
    return n;
}

/* OPTIML_CUDA_TUNE="fused=3,mmvk=1,brows=4,bthr=1,inq=2,inp=2,var=1,bps=2,att=3,attbps=4,attp=4,pdl=1,chunk=N"
 * (the defaults shown; pdl=0 turns it off): the kernels' tuning knobs
 * (struct cu_tuning) for benchmarks and tests; unknown keys are reported
 * and skipped. */
static void tuning_from_env(cu_ctx *cu) {
    const char *env = getenv("OPTIML_CUDA_TUNE");
    if (!env || !*env) return;
    struct cu_tuning t = {0};
    const char *p = env;
    while (*p) {
        char key[16];
        long long v = 0;
        int n = 0;
        if (sscanf(p, "%15[a-z_]=%lld%n", key, &v, &n) != 2 || n <= 0) {
            LOG_WARN("OPTIML_CUDA_TUNE: cannot parse \"%s\"", p);
            return;
        }
        if (strcmp(key, "fused") == 0) t.mmv_fused = (int)v;
        else if (strcmp(key, "mmvk") == 0) t.mmv_kernel = (int)v;
        else if (strcmp(key, "var") == 0) t.mmv_variant = (int)v;
        else if (strcmp(key, "bps") == 0) t.mmv_blocks_per_sm = (int)v;
        else if (strcmp(key, "att") == 0) t.att_kernel = (int)v;
        else if (strcmp(key, "attbps") == 0) t.att_blocks_per_sm = (int)v;
        else if (strcmp(key, "attmin") == 0) t.att_chunk_min = (int)v;
        else if (strcmp(key, "attp") == 0) t.att_prompt = (int)v;
        else if (strcmp(key, "pdl") == 0) t.pdl = v ? 1 : 2;
        else if (strcmp(key, "brows") == 0) t.mmv_block_rows = (int)v;
        else if (strcmp(key, "bthr") == 0) t.mmv_block_threads = (int)v;
        else if (strcmp(key, "inq") == 0) t.inq_kernel = (int)v;
        else if (strcmp(key, "inp") == 0) t.in_kernel = (int)v;
        else if (strcmp(key, "chunk") == 0) t.gemm_chunk_elems = v;
        else LOG_WARN("OPTIML_CUDA_TUNE: unknown key %s", key);
        p += n;
        if (*p == ',') p++;
    }
    cu_set_tuning(cu, &t);
}

static uint64_t head_bytes(const optiml_model *m) {
    const struct hparams *hp = &m->hp;
    uint64_t n = (uint64_t)hp->n_embd * sizeof(float);
    n += cu_weight_bytes(m->output.type, m->output.ne[0], m->output.ne[1]);
    if (m->output.data != m->tok_embd.data)
        n += cu_weight_bytes(m->tok_embd.type, m->tok_embd.ne[0], m->tok_embd.ne[1]);
    return n;
}

/* The largest -ngl value whose VRAM need fits budget bytes (overhead: the
 * CUDA context and cuBLAS, measured). */
static int32_t layers_for_budget(const optiml_model *m, uint64_t budget, uint64_t overhead) {
    const struct hparams *hp = &m->hp;
    const uint64_t n_ctx = hp->n_ctx_train < GPU_BUDGET_CTX ? (uint64_t)hp->n_ctx_train : GPU_BUDGET_CTX;
    uint64_t used = overhead + ctx_scratch_bytes(hp, GPU_BUDGET_BATCH, n_ctx, true);
    if (used > budget) return 0;
    int32_t n = 0;
    for (int32_t il = hp->n_layer - 1; il >= 0; il--) {
        const uint64_t need = layer_weight_bytes(hp, &m->layers[il]) + kv_bytes_per_layer(hp, n_ctx);
        if (used + need > budget) return n;
        used += need;
        n++;
    }
    return used + head_bytes(m) <= budget ? n + 1 : n;
}

/* ---- weights ------------------------------------------------------------- */

static optiml_status upload_matrix(struct gpu_model *g, const struct tensor *t, const char *what, int32_t il,
                                   void *staging, cu_weight *out) {
    if (!cu_type_supported(t->type))
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "%s of layer %d has type %s, which the CUDA backend cannot compute",
                           what, il, dtype_name(t->type));
    TRY(cu_weight_upload(g->cu, t->type, t->ne[0], t->ne[1], t->data, staging, GPU_STAGING_BYTES, out));
    g->bytes += out->bytes;
    return OPTIML_OK;
}

/* Parts ts[0..n) as one stacked weight (they have the same type and row
 * length: the caller checked). */
static optiml_status upload_stack(struct gpu_model *g, const struct tensor *const *ts, int n, const char *what,
                                  int32_t il, void *staging, cu_weight *out) {
    if (!cu_type_supported(ts[0]->type))
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "%s of layer %d has type %s, which the CUDA backend cannot compute",
                           what, il, dtype_name(ts[0]->type));
    const void *host[3];
    int64_t rows[3];
    for (int i = 0; i < n; i++) host[i] = ts[i]->data, rows[i] = ts[i]->ne[1];
    TRY(cu_weight_upload_parts(g->cu, ts[0]->type, ts[0]->ne[0], n, host, rows, staging, GPU_STAGING_BYTES, out));
    g->bytes += out->bytes;
    return OPTIML_OK;
}

static bool stackable(const struct tensor *const *ts, int n) {
    for (int i = 1; i < n; i++)
        if (!ts[i]->data || ts[i]->type != ts[0]->type || ts[i]->ne[0] != ts[0]->ne[0]) return false;
    return ts[0]->data != NULL;
}

static optiml_status upload_vec(struct gpu_model *g, const struct tensor *t, float **out) {
    const uint64_t n = (uint64_t)t->ne[0] * sizeof(float);
    TRY(cu_malloc(g->cu, n, (void **)out));
    TRY(cu_upload(g->cu, *out, t->data, n));
    g->bytes += n;
    return cu_sync(g->cu);
}

/* The q, k and v biases as one q|k|v vector (zeros where one is absent). */
static optiml_status upload_bqkv(struct gpu_model *g, const optiml_model *m, const struct layer *l, float **out) {
    const int64_t n_q = (int64_t)m->hp.n_head * m->hp.head_dim, n_kv = (int64_t)m->hp.n_head_kv * m->hp.head_dim;
    const int64_t n = n_q + 2 * n_kv;
    float *host = calloc((size_t)n, sizeof(float));
    if (!host) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    if (l->bq.data) memcpy(host, l->bq.data, (size_t)n_q * sizeof(float));
    if (l->bk.data) memcpy(host + n_q, l->bk.data, (size_t)n_kv * sizeof(float));
    if (l->bv.data) memcpy(host + n_q + n_kv, l->bv.data, (size_t)n_kv * sizeof(float));
    const struct tensor t = {.data = host, .type = DTYPE_F32, .ne = {n, 1, 1, 1}};
    optiml_status st = upload_vec(g, &t, out);
    free(host);
    return st;
}

static optiml_status upload_layers(optiml_model *m, struct gpu_model *g) {
    void *staging = NULL;
    if (cu_host_alloc(GPU_STAGING_BYTES, &staging) != OPTIML_OK) staging = NULL; /* pageable copies then */
    /* OPTIML_CUDA_NO_STACK=1: separate q/k/v and gate/up weights (to compare) */
    const char *env = getenv("OPTIML_CUDA_NO_STACK");
    const bool no_stack = env && *env && strcmp(env, "0") != 0;
    optiml_status st = OPTIML_OK;
    for (int32_t il = g->first; il < m->hp.n_layer && st == OPTIML_OK; il++) {
        const struct layer *l = &m->layers[il];
        struct gpu_layer *gl = &g->layers[il];
        const struct tensor *qkv[3] = {&l->wq, &l->wk, &l->wv}, *gu[2] = {&l->ffn_gate, &l->ffn_up};
        const bool s_qkv = !no_stack && stackable(qkv, 3), s_gu = !no_stack && stackable(gu, 2);
        if (s_qkv) st = upload_stack(g, qkv, 3, "attn_q|k|v", il, staging, &gl->qkv);
        if (st == OPTIML_OK && s_gu) st = upload_stack(g, gu, 2, "ffn_gate|up", il, staging, &gl->gu);
        const struct { const struct tensor *t; cu_weight *w; const char *name; bool skip; } mats[7] = {
            {&l->wq, &gl->wq, "attn_q", s_qkv},          {&l->wk, &gl->wk, "attn_k", s_qkv},
            {&l->wv, &gl->wv, "attn_v", s_qkv},          {&l->wo, &gl->wo, "attn_output", false},
            {&l->ffn_gate, &gl->gate, "ffn_gate", s_gu}, {&l->ffn_up, &gl->up, "ffn_up", s_gu},
            {&l->ffn_down, &gl->down, "ffn_down", false},
        };
        for (int i = 0; i < 7 && st == OPTIML_OK; i++)
            if (mats[i].t->data && !mats[i].skip) /* ffn_gate is absent in relu_nogate models */
                st = upload_matrix(g, mats[i].t, mats[i].name, il, staging, mats[i].w);
        if (st == OPTIML_OK) st = upload_vec(g, &l->attn_norm, &gl->attn_norm);
        if (st == OPTIML_OK) st = upload_vec(g, &l->ffn_norm, &gl->ffn_norm);
        if (st == OPTIML_OK && (l->bq.data || l->bk.data || l->bv.data)) st = upload_bqkv(g, m, l, &gl->bqkv);
    }
    if (st == OPTIML_OK && g->head) {
        st = upload_vec(g, &m->output_norm, &g->output_norm);
        if (st == OPTIML_OK) st = upload_matrix(g, &m->output, "output", -1, staging, &g->output);
        g->emb_is_output = m->output.data == m->tok_embd.data;
        if (st == OPTIML_OK && !g->emb_is_output)
            st = upload_matrix(g, &m->tok_embd, "token_embd", -1, staging, &g->tok_embd);
    }
    cu_host_free(staging);
    return st;
}

int32_t gpu_first_layer(const optiml_model *m) { return m->gpu ? m->gpu->first : m->hp.n_layer; }
bool gpu_embeds(const optiml_model *m) { return m->gpu && m->gpu->head && m->gpu->first == 0; }
bool gpu_head(const optiml_model *m) { return m->gpu && m->gpu->head; }

optiml_status gpu_model_load(optiml_model *m, const optiml_model_params *params) {
    const int32_t n_layer = m->hp.n_layer;
    int32_t ngl = params->n_gpu_layers < 0 ? n_layer + 1 : params->n_gpu_layers;
    if (ngl == 0 && !(params->vram_budget_gib > 0.0)) return OPTIML_OK;
    if (cu_device_count() == 0) {
        LOG_WARN("no CUDA device found: running all layers on the CPU");
        return OPTIML_OK;
    }
    for (int32_t il = 0; il < n_layer; il++)
        if (m->layers[il].bo.data)
            return optiml_fail(OPTIML_ERR_UNSUPPORTED, "blk.%d.attn_output.bias: the GPU kernels have no output "
                               "bias yet: run this model with -ngl 0 and no --vram-budget", il);
    struct gpu_model *g = calloc(1, sizeof(*g));
    if (!g) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    m->gpu = g;
    TRY(cu_init(0, &g->cu));
    if (params->vram_budget_gib > 0.0) {
        uint64_t free_b = 0, total_b = 0;
        TRY(cu_mem_info(g->cu, &free_b, &total_b));
        const uint64_t budget = (uint64_t)(params->vram_budget_gib * 1073741824.0);
        const int32_t fit = layers_for_budget(m, budget, total_b - free_b);
        /* -ngl and a budget together: the smaller wins */
        ngl = params->n_gpu_layers != 0 && params->n_gpu_layers < fit && params->n_gpu_layers > 0 ? params->n_gpu_layers : fit;
        LOG_INFO("VRAM budget %.2f GiB (%.0f MiB already in use on %s): %d of %d layers%s fit", params->vram_budget_gib,
                 (total_b - free_b) / 1048576.0, cu_device_name(g->cu), ngl > n_layer ? n_layer : ngl, n_layer,
                 ngl > n_layer ? " and the output head" : "");
        if (ngl == 0) {
            gpu_model_free(m);
            return OPTIML_OK;
        }
    }
    g->first = ngl >= n_layer ? 0 : n_layer - ngl;
    g->head = ngl > n_layer;
    g->layers = calloc((size_t)n_layer, sizeof(*g->layers));
    if (!g->layers) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    TRY(upload_layers(m, g));
    LOG_INFO("offloaded %d of %d layers%s to %s: %.1f MiB of weights", n_layer - g->first, n_layer,
             g->head ? " and the output head" : "", cu_device_name(g->cu), g->bytes / 1048576.0);
    return OPTIML_OK;
}

void gpu_model_free(optiml_model *m) {
    struct gpu_model *g = m->gpu;
    if (!g) return;
    if (g->layers)
        for (int32_t il = 0; il < m->hp.n_layer; il++) {
            struct gpu_layer *gl = &g->layers[il];
            cu_weight *ws[9] = {&gl->qkv, &gl->wq, &gl->wk, &gl->wv, &gl->gu, &gl->gate, &gl->up, &gl->wo, &gl->down};
            for (int i = 0; i < 9; i++) cu_weight_free(ws[i]);
            cu_dfree(gl->attn_norm);
            cu_dfree(gl->ffn_norm);
            cu_dfree(gl->bqkv);
        }
    free(g->layers);
    cu_weight_free(&g->output);
    cu_weight_free(&g->tok_embd);
    cu_dfree(g->output_norm);
    cu_free(g->cu);
    free(g);
    m->gpu = NULL;
}

/* ---- context ----------------------------------------------------------------- */

static uint64_t step_layout(struct gpu_ctx *gc, uint64_t nb, uint64_t nc) {
    uint64_t o = 0;
    gc->off_cseq = o, o += nc * sizeof(uint64_t);
    gc->off_pos = o, o += nb * sizeof(int32_t);
    gc->off_seq = o, o += nb * sizeof(int32_t);
    gc->off_cell = o, o += nb * sizeof(int32_t);
    gc->off_tok = o, o += nb * sizeof(int32_t);
    gc->off_rows = o, o += nb * sizeof(int32_t);
    gc->off_used = o, o += sizeof(uint32_t);
    gc->off_cpos = o, o += nc * sizeof(int32_t);
    return align_up_u64(o, 256);
}

static optiml_status dalloc(struct gpu_ctx *gc, uint64_t n, void **p) {
    TRY(cu_malloc(gc->cu, n, p));
    gc->bytes += n;
    return OPTIML_OK;
}

optiml_status gpu_context_init(optiml_context *ctx) {
    const optiml_model *m = ctx->model;
    const struct gpu_model *g = m->gpu;
    if (!g) return OPTIML_OK;
    const struct hparams *hp = &m->hp;
    const uint64_t nb = ctx->params.n_batch, nc = ctx->params.n_ctx;
    const uint64_t n_q = (uint64_t)hp->n_head * hp->head_dim, n_kv = (uint64_t)hp->n_head_kv * hp->head_dim;
    struct gpu_ctx *gc = calloc(1, sizeof(*gc));
    if (!gc) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    ctx->gpu = gc;
    const char *env = getenv("OPTIML_NO_CUDA_GRAPH");
    gc->no_graph = env && *env && strcmp(env, "0") != 0;
    TRY(cu_init(0, &gc->cu));
    env = getenv("OPTIML_CUDA_PROFILE");
    if (env && *env && strcmp(env, "0") != 0) {
        TRY(cu_timer_init(PROF_SLOTS, &gc->prof));
        gc->no_graph = true;
    }
    /* OPTIML_CUDA_UNFUSED=1: input steps (rmsnorm, act*up) as separate
     * kernels before each product, as before the fused kernel (to compare) */
    env = getenv("OPTIML_CUDA_UNFUSED");
    if (env && *env && strcmp(env, "0") != 0) {
        const struct cu_tuning t = {.mmv_fused = 2};
        cu_set_tuning(gc->cu, &t);
    }
    tuning_from_env(gc->cu);
    struct { void **p; uint64_t n; } bufs[] = {
        {(void **)&gc->x, nb * hp->n_embd * sizeof(float)},
        {(void **)&gc->xb, nb * hp->n_embd * sizeof(float)},
        {(void **)&gc->qkv, nb * (n_q + 2 * n_kv) * sizeof(float)},
        {(void **)&gc->q, nb * n_q * sizeof(float)},
        {(void **)&gc->att, nb * n_q * sizeof(float)},
        {(void **)&gc->gu, nb * 2 * (uint64_t)hp->n_ff * sizeof(float)},
        {(void **)&gc->kv_k, (uint64_t)(hp->n_layer - g->first) * nc * n_kv * sizeof(float)},
        {(void **)&gc->kv_v, (uint64_t)(hp->n_layer - g->first) * nc * n_kv * sizeof(float)},
        {(void **)&gc->inv_freq, (uint64_t)hp->n_rot / 2 * sizeof(float)},
        {(void **)&gc->att_scratch, cu_attention_scratch_bytes((int32_t)nb, hp->n_head, hp->head_dim, (uint32_t)nc)},
    };
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) TRY(dalloc(gc, bufs[i].n, bufs[i].p));
    if (g->head) TRY(dalloc(gc, nb * hp->n_vocab * sizeof(float), (void **)&gc->logits));
    int64_t in_max, out_max;
    matmul_dims(hp, &in_max, &out_max);
    /* the prompt GEMM's weight chunk: the default (256 MiB of f16) where VRAM
     * leaves room for it and 1 GiB more, else 64 MiB (a few % slower) */
    uint64_t mem_free = 0, mem_total = 0;
    TRY(cu_mem_info(gc->cu, &mem_free, &mem_total));
    if (mem_free < cu_matmul_scratch_bytes((int64_t)nb, in_max, out_max) + (1ull << 30)) {
        const struct cu_tuning t = {.gemm_chunk_elems = 32ll << 20};
        cu_set_tuning(gc->cu, &t);
    }
    uint64_t mm = 0;
    TRY(cu_matmul_reserve(gc->cu, (int64_t)nb, in_max, out_max, &mm));
    gc->bytes += mm;

    gc->step_bytes = step_layout(gc, nb, nc);
    TRY(dalloc(gc, gc->step_bytes, &gc->d_step));
    TRY(cu_host_alloc(gc->step_bytes, &gc->h_step));
    TRY(cu_host_alloc(nb * hp->n_embd * sizeof(float), (void **)&gc->h_x));
    TRY(cu_host_alloc((uint64_t)hp->n_vocab * sizeof(float), (void **)&gc->h_logits));
    char *d = gc->d_step;
    gc->batch = (struct cu_batch){.pos = (const int32_t *)(d + gc->off_pos), .seq = (const int32_t *)(d + gc->off_seq),
                                  .cell = (const int32_t *)(d + gc->off_cell),
                                  .cell_pos = (const int32_t *)(d + gc->off_cpos),
                                  .cell_seq = (const uint64_t *)(d + gc->off_cseq),
                                  .n_used = (const uint32_t *)(d + gc->off_used)};
    /* inverse frequencies as the CPU computed them */
    TRY(cu_upload(gc->cu, gc->inv_freq, ctx->rope_inv_freq, (uint64_t)hp->n_rot / 2 * sizeof(float)));
    TRY(cu_sync(gc->cu));
    LOG_DEBUG("GPU context: %.1f MiB of device buffers (KV cache %.1f MiB)", gc->bytes / 1048576.0,
              2.0 * (hp->n_layer - g->first) * nc * n_kv * sizeof(float) / 1048576.0);
    return OPTIML_OK;
}

static void prof_report(const struct gpu_ctx *gc) {
    double total = 0;
    for (int k = 0; k < GPU_OP_COUNT; k++) total += gc->prof_ms[k];
    if (total <= 0) return;
    LOG_WARN("CUDA profile (OPTIML_CUDA_PROFILE, graphs off), %s:", cu_device_name(gc->cu));
    for (int k = 0; k < GPU_OP_COUNT; k++)
        if (gc->prof_calls[k])
            LOG_WARN("  %-12s %10.3f ms %5.1f%%  %8lld calls %9.2f us/call", gpu_op_names[k], gc->prof_ms[k],
                     100.0 * gc->prof_ms[k] / total, (long long)gc->prof_calls[k],
                     1000.0 * gc->prof_ms[k] / (double)gc->prof_calls[k]);
}

void gpu_context_free(optiml_context *ctx) {
    struct gpu_ctx *gc = ctx->gpu;
    if (!gc) return;
    if (gc->cu) cu_sync(gc->cu);
    if (gc->prof) prof_report(gc);
    cu_timer_free(gc->prof);
    for (int i = 0; i < 2; i++) cu_graph_free(gc->graph[i]);
    void *dev[] = {gc->x,    gc->xb,   gc->qkv,      gc->q,          gc->att,    gc->gu,
                   gc->logits, gc->kv_k, gc->kv_v, gc->inv_freq, gc->att_scratch, gc->d_step};
    for (size_t i = 0; i < sizeof(dev) / sizeof(dev[0]); i++) cu_dfree(dev[i]);
    cu_host_free(gc->h_step);
    cu_host_free(gc->h_x);
    cu_host_free(gc->h_logits);
    cu_free(gc->cu);
    free(gc);
    ctx->gpu = NULL;
}

/* ---- the forward pass ------------------------------------------------------------ */

/* Fill the pinned step arrays for batch b (n_out rows want logits). */
static void step_fill(optiml_context *ctx, const optiml_batch *b, int32_t n_out) {
    struct gpu_ctx *gc = ctx->gpu;
    char *h = gc->h_step;
    const struct kv_cache *kv = &ctx->kv;
    memcpy(h + gc->off_pos, b->pos, (size_t)b->n_tokens * sizeof(int32_t));
    memcpy(h + gc->off_seq, b->seq_id, (size_t)b->n_tokens * sizeof(int32_t));
    memcpy(h + gc->off_cell, ctx->cells, (size_t)b->n_tokens * sizeof(int32_t));
    memcpy(h + gc->off_tok, b->token, (size_t)b->n_tokens * sizeof(int32_t));
    memcpy(h + gc->off_rows, ctx->out_ids, (size_t)n_out * sizeof(int32_t));
    memcpy(h + gc->off_used, &kv->n_used_hi, sizeof(uint32_t));
    memcpy(h + gc->off_cpos, kv->pos, (size_t)kv->n_cells * sizeof(int32_t));
    memcpy(h + gc->off_cseq, kv->seq, (size_t)kv->n_cells * sizeof(uint64_t));
}

/* Run one op; with the profile on, mark an event after it (op k). */
static optiml_status prof_mark(struct gpu_ctx *gc, int op) {
    if (!gc->prof || gc->prof_slot >= PROF_SLOTS) return OPTIML_OK;
    gc->prof_calls[op]++;
    gc->prof_op[gc->prof_slot] = (int8_t)op;
    return cu_timer_mark(gc->cu, gc->prof, gc->prof_slot++);
}
#define OP(k, call)                  \
    do {                             \
        TRY(call);                   \
        TRY(prof_mark(gc, (k)));     \
    } while (0)

static optiml_status gpu_layer(optiml_context *ctx, int32_t il, int32_t n) {
    const optiml_model *m = ctx->model;
    const struct hparams *hp = &m->hp;
    const struct gpu_layer *l = &m->gpu->layers[il];
    struct gpu_ctx *gc = ctx->gpu;
    cu_ctx *cu = gc->cu;
    const int64_t n_q = (int64_t)hp->n_head * hp->head_dim, n_kv = (int64_t)hp->n_head_kv * hp->head_dim;
    const int64_t ld_qkv = n_q + 2 * n_kv, n_ff = hp->n_ff;
    const uint64_t kv_off = (uint64_t)(il - m->gpu->first) * ctx->params.n_ctx * (uint64_t)n_kv;
    float *kv_k = gc->kv_k + kv_off, *kv_v = gc->kv_v + kv_off;

    const struct cu_mm_in norm1 = {.kind = CU_IN_RMSNORM, .norm = l->attn_norm, .eps = hp->norm_eps};
    if (l->qkv.dev) {
        OP(OP_QKV, cu_matmul_ex(cu, &l->qkv, gc->x, &norm1, n, gc->qkv, ld_qkv, false));
    } else {
        OP(OP_QKV, cu_matmul_ex(cu, &l->wq, gc->x, &norm1, n, gc->qkv, ld_qkv, false));
        OP(OP_QKV, cu_matmul_ex(cu, &l->wk, gc->x, &norm1, n, gc->qkv + n_q, ld_qkv, false));
        OP(OP_QKV, cu_matmul_ex(cu, &l->wv, gc->x, &norm1, n, gc->qkv + n_q + n_kv, ld_qkv, false));
    }
    OP(OP_ROPE, cu_rope_store_qkv(cu, gc->qkv, ld_qkv, gc->q, kv_k, kv_v, n, hp->n_head, hp->n_head_kv, hp->head_dim,
                                  hp->n_rot, gc->inv_freq, l->bqkv, hp->rope_neox, &gc->batch));
    /* a quantized wo and few tokens: the attention kernel can leave its
     * output quantized for wo's product (one launch fewer) */
    bool att_q8 = false;
    if (dtype_block_size(l->wo.type) > 1 && n <= 8)
        OP(OP_ATTN, cu_attention_q8(cu, gc->q, kv_k, kv_v, gc->att, n, hp->n_head, hp->n_head_kv, hp->head_dim,
                                    ctx->params.n_ctx, &gc->batch, gc->att_scratch, &att_q8));
    else
        OP(OP_ATTN, cu_attention(cu, gc->q, kv_k, kv_v, gc->att, n, hp->n_head, hp->n_head_kv, hp->head_dim,
                                 ctx->params.n_ctx, &gc->batch, gc->att_scratch));
    if (att_q8) OP(OP_O, cu_matmul_prequant(cu, &l->wo, n, gc->x, 0, true));
    else OP(OP_O, cu_matmul_ex(cu, &l->wo, gc->att, NULL, n, gc->x, 0, true));

    const struct cu_mm_in norm2 = {.kind = CU_IN_RMSNORM, .norm = l->ffn_norm, .eps = hp->norm_eps};
    if (l->gu.dev) {
        OP(OP_GU, cu_matmul_ex(cu, &l->gu, gc->x, &norm2, n, gc->gu, 2 * n_ff, false));
    } else {
        if (l->gate.dev) OP(OP_GU, cu_matmul_ex(cu, &l->gate, gc->x, &norm2, n, gc->gu, 2 * n_ff, false));
        OP(OP_GU, cu_matmul_ex(cu, &l->up, gc->x, &norm2, n, gc->gu + n_ff, 2 * n_ff, false));
    }
    /* act(gate) * up (FATReLU first where the model has a threshold) as the down product's input */
    const struct cu_mm_in act = {.kind = CU_IN_ACT_MUL, .ld = 2 * n_ff, .up = gc->gu + n_ff, .act = (int)hp->ffn_act,
                                 .thr = m->sparse.act_threshold};
    OP(OP_DOWN, cu_matmul_ex(cu, &l->down, gc->gu, &act, n, gc->x, 0, true));
    return OPTIML_OK;
}

/* Everything a step enqueues, from the step upload to the output copy
 * (into pinned buffers when `pinned_out`, for graph capture). */
static optiml_status gpu_enqueue(optiml_context *ctx, int32_t n, int32_t n_out, bool pinned_out) {
    const optiml_model *m = ctx->model;
    const struct gpu_model *g = m->gpu;
    const struct hparams *hp = &m->hp;
    struct gpu_ctx *gc = ctx->gpu;
    cu_ctx *cu = gc->cu;
    const uint64_t x_bytes = (uint64_t)n * hp->n_embd * sizeof(float);
    if (gc->prof) {
        gc->prof_slot = 0;
        TRY(cu_timer_mark(cu, gc->prof, gc->prof_slot++));
    }
    OP(OP_UPLOAD, cu_upload(cu, gc->d_step, gc->h_step, gc->step_bytes));
    if (gpu_embeds(m)) {
        const cu_weight *emb = g->emb_is_output ? &g->output : &g->tok_embd;
        OP(OP_UPLOAD, cu_get_rows(cu, emb, (const int32_t *)((char *)gc->d_step + gc->off_tok), n, gc->x));
    } else {
        OP(OP_UPLOAD, cu_upload(cu, gc->x, gc->h_x, x_bytes));
    }
    for (int32_t il = g->first; il < hp->n_layer; il++) TRY(gpu_layer(ctx, il, n));
    if (!g->head) {
        OP(OP_DOWNLOAD, cu_download(cu, gc->h_x, gc->x, x_bytes));
        return OPTIML_OK;
    }
    if (n_out == 0) return OPTIML_OK;
    OP(OP_HEAD, cu_rmsnorm(cu, gc->xb, gc->x, g->output_norm, hp->n_embd, n_out,
                           (const int32_t *)((char *)gc->d_step + gc->off_rows), hp->norm_eps));
    OP(OP_HEAD, cu_matmul(cu, &g->output, gc->xb, n_out, gc->logits, false));
    const uint64_t l_bytes = (uint64_t)n_out * hp->n_vocab * sizeof(float);
    OP(OP_DOWNLOAD, cu_download(cu, pinned_out ? (void *)gc->h_logits : (void *)ctx->logits, gc->logits, l_bytes));
    return OPTIML_OK;
}

optiml_status gpu_forward(optiml_context *ctx, const optiml_batch *b, int32_t n_out, bool *cpu_output) {
    const optiml_model *m = ctx->model;
    struct gpu_ctx *gc = ctx->gpu;
    const struct hparams *hp = &m->hp;
    *cpu_output = true;
    if (!gc) return OPTIML_OK;
    const int32_t n = b->n_tokens;
    const uint64_t x_bytes = (uint64_t)n * hp->n_embd * sizeof(float);
    step_fill(ctx, b, n_out);
    if (!gpu_embeds(m)) memcpy(gc->h_x, ctx->x, x_bytes);
    if (n == 1 && !gc->no_graph && n_out <= 1) {
        cu_graph **gp = &gc->graph[n_out];
        if (!*gp) {
            TRY(cu_graph_begin(gc->cu));
            optiml_status st = gpu_enqueue(ctx, 1, n_out, true);
            cu_graph *graph = NULL;
            optiml_status st_end = cu_graph_end(gc->cu, &graph);
            TRY(st);
            TRY(st_end);
            *gp = graph;
        }
        TRY(cu_graph_launch(gc->cu, *gp));
        TRY(cu_sync(gc->cu));
        if (m->gpu->head && n_out == 1) memcpy(ctx->logits, gc->h_logits, (size_t)hp->n_vocab * sizeof(float));
    } else {
        TRY(gpu_enqueue(ctx, n, n_out, false));
        TRY(cu_sync(gc->cu));
        for (int k = 1; gc->prof && k < gc->prof_slot; k++)
            gc->prof_ms[gc->prof_op[k]] += cu_timer_ms(gc->prof, k - 1, k);
    }
    if (!m->gpu->head) memcpy(ctx->x, gc->h_x, x_bytes);
    *cpu_output = !m->gpu->head;
    return OPTIML_OK;
}
