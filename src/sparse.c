/*
 * sparse.c - the sparse CPU FFN (see sparse.h for what it computes).
 *
 * One call of sparse_layer_ffn, n tokens in ctx->xb:
 *   1. active sets: predictor hidden = relu(xb fc1^T), logits = hidden fc2^T
 *      (mask: logit > threshold), or in oracle mode the dense gate (mask:
 *      gate > act_threshold); union of the tokens' masks -> index list;
 *      a union above SPARSE_DENSE_FRAC of n_ff hands the layer back to the
 *      dense FFN; in CATS mode the dense gate (mask: |act(gate)| above the
 *      layer's gate_threshold, or the neuron's ffn_gate_thr), and no
 *      hand-back (the gate is paid for);
 *   2. gate/up rows of the union only (threads split the index list):
 *      h[t][i] = act(gate) * up where token t's mask has i, else 0, written
 *      into ctx->gate (zero elsewhere: the FFN observer sees a dense h);
 *   3. down: x[t] += sum over i with h[t][i] != 0 of h[t][i] * down_t row i
 *      (threads split n_embd in whole blocks; each dequantizes its slice of a
 *      row once for all tokens), or without ffn_down_t, the dense down
 *      matmul on the sparse h (same kernels: its result is the dense one).
 * A one-token batch (decode) does 1-3 in two parallel rounds instead
 * (sparse_ffn_one): each thread scores its own neurons (64-neuron chunks
 * dealt round-robin) into its own active list; then each takes an equal
 * slice of all the active neurons (the lists joined in thread order), runs
 * their gate/up and sums their down_t rows (four per pass, axpy4) into its
 * own partial sum, which the caller adds into x; the predictor's hidden
 * layer is the only round before them. The batch path's three rounds
 * (scores, gate/up, down) with two serial passes over n_ff between them
 * become two rounds with a join of the short lists between them, each
 * down_t row is read whole by one thread instead of 1/nth of it by every
 * thread, and the threads' shares of the gathers are equal whatever the
 * order of the neurons (a layer handed to the dense FFN reads no gate/up
 * row: the check runs between the rounds).
 * The dots are the dense matmul's kernels on the same (quantized) inputs,
 * so in oracle mode gate and up are bit for bit the dense ones (batches
 * below cpu_gemm_min_tokens; larger ones go through the dense GEMM, equal
 * to float rounding); only down differs (f32 h against down_t rows
 * instead of q8 h against down rows).
 * CATS with kind "cats_product" skips steps 1-2: gate and up of every
 * neuron, h = act(gate) * up, zeroed where |h_i| is at most the neuron's
 * threshold (sparse_h_cut), then step 3 on the kept neurons.
 * Every buffer is allocated in sparse_init. CATS batches of more than
 * SPARSE_CATS_MAX_TOKENS run the dense FFN, which applies the same cut
 * (sparse_gate_cut), so a token's result does not depend on its batch.
 */
#include "gpu.h"
#include "sparse.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* neurons per chunk of the one-token scoring round (one_score_run) */
#define ONE_CHUNK 64
/* pieces of the joined active list per thread in the one-token gate/up/down
 * round (one_ffn_run): threads take them in turn, so one whose gathers wait
 * longer takes fewer */
#define ONE_SPLIT 4
/* The scores' rows through dot_q_xi_rows up to this length (values): it
 * asks for the next four rows at once, a few lines for fc2 (160 values:
 * 680 bytes of q8_0), but 144 lines for a 4096-value gate row (CATS),
 * where dot_q_xi's read-ahead as it goes does better. Dev EPYC, 7B synth
 * (fc2 11008 x 160 q8_0, 60 MB a token), 2 threads, phases of two runs
 * each: the scores took 7.4-8.8 ms a token with a dot_q_xi call per row,
 * 6.6-6.8 ms so. */
#define SCORE_ROWS_MAX_N 1024

/* The dense FFN takes over a batch whose union of active neurons exceeds
 * this share of n_ff (it reads rows at a better rate: 4-token kernels) */
#define SPARSE_DENSE_FRAC 0.6
/* ... and batches above this many tokens, without predicting (their union
 * is nearly every neuron) */
#define SPARSE_MAX_TOKENS 64
/* CATS keeps about half the neurons per token: the union of a few tokens is
 * nearly all of them, and the dense FFN's 4-token kernels win */
#define SPARSE_CATS_MAX_TOKENS 2

struct sparse_state {
    enum sparse_mode mode; /* ORACLE, PREDICTOR or CATS */
    int64_t n_tok_max;     /* n_batch                                        */
    int64_t r_max;         /* widest predictor                               */
    float *hidden;         /* (n_batch, r_max) predictor hidden layer       */
    float *logits;         /* (n_batch, n_ff) predictor logits / oracle gate */
    int32_t *idx;          /* (n_ff) union of active neurons                 */
    int32_t *idx_nz;       /* (n_ff) those with some h != 0; one token: idx
                            * holds per thread a list of its chunks' active
                            * neurons (one_score_run), then all of them in
                            * one list; room for n_ff + threads * ONE_CHUNK */
    float *tmp;            /* (n_threads, n_embd) dequantized down_t rows    */
    int64_t tmp_n;
    float *part;           /* (ONE_SPLIT * n_threads, n_embd) one-token path:
                              each piece's share of the down sum          */
    int64_t *counts;       /* (n_threads) one-token path: active neurons of
                              the thread's chunks                          */
    int64_t *piece_nz;     /* (ONE_SPLIT * n_threads) h != 0 in each piece */
    atomic_int_fast64_t next_piece; /* one_ffn_run: the next piece to take */
    /* inputs quantized for the weights' dot_q: xb per activation type, and
     * the predictor's hidden layer; a q8_0 buffer holds n_batch rows, then
     * (at q8_0_xi_offset) their block summaries for dot_q_xi */
    void *xq[DTYPE_COUNT]; /* (n_batch, row bytes of n_embd) */
    void *hq[DTYPE_COUNT]; /* (n_batch, row bytes of r_max)  */
    void *dq[DTYPE_COUNT]; /* (n_batch, row bytes of n_ff): h, no down_t */
    uint64_t n_active, n_total;
};

/* ---- setup ------------------------------------------------------------- */

/* Where a q8_0 input buffer of n_rows rows of row bytes keeps the rows'
 * block summaries. */
static inline uint64_t q8_0_xi_offset(uint64_t row, int64_t n_rows) { return (row * (uint64_t)n_rows + 63) / 64 * 64; }

static optiml_status sparse_alloc_q(void **buf, const struct cpu_kernels *kern, uint32_t wtype, int64_t n_rows,
                                    int64_t n_in) {
    const uint32_t t = kern->vec_dot_type[wtype];
    if (t == DTYPE_F32 || buf[t]) return OPTIML_OK;
    uint64_t row;
    if (!dtype_row_size(t, (uint64_t)n_in, &row))
        return optiml_fail(OPTIML_ERR_FORMAT, "sparse FFN: rows of %lld values do not fill %s blocks",
                           (long long)n_in, dtype_name(t));
    uint64_t size = row * (uint64_t)n_rows;
    if (t == DTYPE_Q8_0)
        size = q8_0_xi_offset(row, n_rows) + (uint64_t)n_rows * (uint64_t)(n_in / 32) * sizeof(struct cpu_gemm_xblock);
    buf[t] = optiml_alloc_aligned((size_t)size);
    if (!buf[t]) return optiml_fail(OPTIML_ERR_NOMEM, "sparse FFN: cannot allocate %s inputs", dtype_name(t));
    return OPTIML_OK;
}

static optiml_status sparse_alloc(optiml_context *ctx, struct sparse_state *s) {
    const optiml_model *m = ctx->model;
    const struct hparams *hp = &m->hp;
    const int64_t nb = ctx->params.n_batch, nth = threadpool_n_threads(ctx->pool);
    s->n_tok_max = nb;
    for (int32_t il = 0; il < hp->n_layer; il++)
        if (m->layers[il].fc1.data && m->layers[il].fc1.ne[1] > s->r_max) s->r_max = m->layers[il].fc1.ne[1];
    s->tmp_n = hp->n_embd;
    struct { void **p; uint64_t n; } bufs[] = {
        {(void **)&s->hidden, (uint64_t)(nb * (s->r_max > 0 ? s->r_max : 1)) * sizeof(float)},
        {(void **)&s->logits, (uint64_t)(nb * hp->n_ff) * sizeof(float)},
        {(void **)&s->idx, (uint64_t)(hp->n_ff + nth * ONE_CHUNK) * sizeof(int32_t)},
        {(void **)&s->idx_nz, (uint64_t)(hp->n_ff + nth * ONE_CHUNK) * sizeof(int32_t)},
        {(void **)&s->tmp, (uint64_t)(nth * s->tmp_n) * sizeof(float)},
        {(void **)&s->part, (uint64_t)(ONE_SPLIT * nth * hp->n_embd) * sizeof(float)},
        {(void **)&s->counts, (uint64_t)nth * sizeof(int64_t)},
        {(void **)&s->piece_nz, (uint64_t)(ONE_SPLIT * nth) * sizeof(int64_t)},
    };
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) {
        *bufs[i].p = optiml_alloc_aligned(bufs[i].n);
        if (!*bufs[i].p) return optiml_fail(OPTIML_ERR_NOMEM, "sparse FFN: cannot allocate %llu bytes",
                                            (unsigned long long)bufs[i].n);
    }
    for (int32_t il = 0; il < hp->n_layer; il++) {
        const struct layer *l = &m->layers[il];
        if (l->ffn_gate.data) TRY(sparse_alloc_q(s->xq, ctx->kern, l->ffn_gate.type, nb, hp->n_embd));
        TRY(sparse_alloc_q(s->xq, ctx->kern, l->ffn_up.type, nb, hp->n_embd));
        if (!l->ffn_down_t.data) TRY(sparse_alloc_q(s->dq, ctx->kern, l->ffn_down.type, nb, hp->n_ff));
        if (s->mode == SPARSE_MODE_PREDICTOR) {
            TRY(sparse_alloc_q(s->xq, ctx->kern, l->fc1.type, nb, hp->n_embd));
            TRY(sparse_alloc_q(s->hq, ctx->kern, l->fc2.type, nb, s->r_max));
        }
    }
    return OPTIML_OK;
}

optiml_status sparse_init(optiml_context *ctx) {
    const optiml_model *m = ctx->model;
    ctx->sparse = NULL;
    enum sparse_mode mode;
    switch (ctx->params.sparse_mode) {
    case SPARSE_MODE_AUTO:
        mode = m->sparse.has_predictor    ? SPARSE_MODE_PREDICTOR
               : m->sparse.gate_threshold ? SPARSE_MODE_CATS
                                          : SPARSE_MODE_DENSE;
        break;
    case SPARSE_MODE_DENSE: mode = SPARSE_MODE_DENSE; break;
    case SPARSE_MODE_ORACLE: mode = SPARSE_MODE_ORACLE; break;
    case SPARSE_MODE_PREDICTOR:
        if (!m->sparse.has_predictor)
            return optiml_fail(OPTIML_ERR_INVALID_ARG, "context: sparse_mode 3 (predictor) needs a model with "
                                                       "predictors (blk.N.fc1/fc2) in every layer");
        mode = SPARSE_MODE_PREDICTOR;
        break;
    case SPARSE_MODE_CATS:
        if (!m->sparse.gate_threshold)
            return optiml_fail(OPTIML_ERR_INVALID_ARG, "context: sparse_mode 4 (cats) needs a model with "
                                                       "optiml.sparse.gate_threshold (optiml-profile "
                                                       "--calibrate-sparsity)");
        mode = SPARSE_MODE_CATS;
        break;
    default:
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "context: sparse_mode %d is not 0 (auto), 1 (dense), 2 (oracle), "
                                                   "3 (predictor) or 4 (cats)", (int)ctx->params.sparse_mode);
    }
    if (mode == SPARSE_MODE_DENSE) return OPTIML_OK;
    struct sparse_state *s = calloc(1, sizeof(*s));
    if (!s) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    s->mode = mode;
    optiml_status st = sparse_alloc(ctx, s);
    if (st != OPTIML_OK) {
        sparse_free(s);
        return st;
    }
    if (!m->sparse.has_down_t)
        LOG_INFO("sparse FFN without ffn_down_t: the down matrix is read in full");
    const int32_t first_gpu = gpu_first_layer(m);
    if (first_gpu < (int32_t)m->hp.n_layer) /* the CUDA kernels have no sparse FFN yet */
        LOG_WARN("sparse FFN (%s) runs on the %d CPU layers only: the %d GPU layers compute the dense FFN",
                 mode == SPARSE_MODE_CATS ? "cats" : mode == SPARSE_MODE_ORACLE ? "oracle" : "predictor",
                 (int)first_gpu, (int)m->hp.n_layer - (int)first_gpu);
    ctx->sparse = s;
    return OPTIML_OK;
}

void sparse_free(struct sparse_state *s) {
    if (!s) return;
    void *bufs[] = {s->hidden, s->logits, s->idx, s->idx_nz, s->tmp, s->part, s->counts, s->piece_nz};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) optiml_free_aligned(bufs[i]);
    for (int t = 0; t < DTYPE_COUNT; t++) {
        optiml_free_aligned(s->xq[t]);
        optiml_free_aligned(s->hq[t]);
        optiml_free_aligned(s->dq[t]);
    }
    free(s);
}

void optiml_context_ffn_stats(const optiml_context *ctx, uint64_t *n_active, uint64_t *n_total) {
    const struct sparse_state *s = ctx ? ctx->sparse : NULL;
    if (n_active) *n_active = s ? s->n_active : 0;
    if (n_total) *n_total = s ? s->n_total : 0;
}

/* ---- threaded row ops -------------------------------------------------- */

/* An input of a matrix: f32 rows, or quantized rows for dot_q. */
struct row_input {
    const float *x; /* (n_tok, n_in) */
    const char *xq; /* (n_tok, xq_row bytes) or NULL: dot on f32 */
    uint64_t xq_row;
    const struct cpu_gemm_xblock *xi; /* q8_0 inputs: (n_tok, n_in / 32) block summaries, else NULL */
    int64_t xi_row;
};

/* Quantize the n_tok rows of x for weights of type wtype into buf (one
 * buffer per activation type), unless done already for this x (*done). */
static struct row_input row_input_make(optiml_context *ctx, void **buf, bool *done, uint32_t wtype, const float *x,
                                       int64_t n_tok, int64_t n_in) {
    struct row_input in = {.x = x};
    const uint32_t t = ctx->kern->vec_dot_type[wtype];
    if (t == DTYPE_F32) return in;
    dtype_row_size(t, (uint64_t)n_in, &in.xq_row);
    in.xq = buf[t];
    if (t == DTYPE_Q8_0) {
        in.xi = (const struct cpu_gemm_xblock *)((char *)buf[t] + q8_0_xi_offset(in.xq_row, ctx->sparse->n_tok_max));
        in.xi_row = n_in / 32;
    }
    if (!done[t])
        for (int64_t k = 0; k < n_tok; k++) {
            char *dst = (char *)buf[t] + k * in.xq_row;
            ctx->kern->quantize[t](n_in, x + k * n_in, dst);
            if (in.xi) cpu_gemm_prep_q8_0(n_in, dst, (struct cpu_gemm_xblock *)in.xi + k * in.xi_row);
        }
    done[t] = true;
    return in;
}

/* dot_q_xi of w's type where the input has its block summaries, else NULL */
static inline cpu_dot_q_xi_fn row_dot_xi(const struct cpu_kernels *kern, const struct tensor *w,
                                         const struct row_input *in) {
    return in->xi ? kern->dot_q_xi[w->type] : NULL;
}

/* Row r of w dot input t, the row read in order (rows_run, the scores). */
static inline float row_dot(const struct cpu_kernels *kern, const struct tensor *w, int64_t r,
                            const struct row_input *in, int64_t t) {
    const int64_t n = w->ne[0];
    const cpu_dot_q_xi_fn dxi = row_dot_xi(kern, w, in);
    if (dxi) return dxi(n, tensor_row(w, r), in->xq + (uint64_t)t * in->xq_row, in->xi + t * in->xi_row, NULL);
    if (in->xq) return kern->dot_q[w->type](n, tensor_row(w, r), in->xq + (uint64_t)t * in->xq_row);
    return kern->dot[w->type](n, tensor_row(w, r), in->x + t * n);
}

/* row_dot of a gathered row r: no read-ahead past the row unless the gather is dense
 * (gather_streams: a third or more of the rows, so the rows after this one
 * are mostly read next; CATS keeps about 60%). At 10% (the 7B synth), the
 * read-ahead fetched other neurons' rows for nothing: the dev EPYC's
 * gate/up/down round took 70-71 ms a token with it, 59-63 ms without;
 * CATS at 60%, the same machine, three runs each: 3.07-3.49 tokens/s with
 * it, 2.78-3.41 without. Where it reads no further (dot_q_next), it asks
 * for row r_next (-1: none) as it goes. */
static inline bool gather_streams(int64_t n_rows, int64_t n_all) { return 3 * n_rows >= n_all; }

static inline bool gather_next(const struct cpu_kernels *kern, const struct tensor *w, const struct row_input *in,
                               bool streams) {
    return in->xq && (row_dot_xi(kern, w, in) || kern->dot_q_next[w->type]) && !streams;
}

static inline float gather_dot(const struct cpu_kernels *kern, const struct tensor *w, int64_t r,
                               const struct row_input *in, int64_t t, bool streams, int64_t r_next) {
    if (!gather_next(kern, w, in, streams)) return row_dot(kern, w, r, in, t);
    const void *row = tensor_row(w, r), *next = r_next >= 0 ? tensor_row(w, r_next) : NULL;
    const char *xq = in->xq + (uint64_t)t * in->xq_row;
    const cpu_dot_q_xi_fn dxi = row_dot_xi(kern, w, in);
    if (dxi) return dxi(w->ne[0], row, xq, in->xi + t * in->xi_row, next ? next : row);
    return kern->dot_q_next[w->type](w->ne[0], row, xq, next);
}

/* y[t * y_stride + r] (+)= row r of w . input t, for every row r. */
struct rows_job {
    const struct cpu_kernels *kern;
    const struct tensor *w;
    struct row_input in;
    int64_t n_tok, y_stride;
    bool accumulate;
    float *y;
};

static void rows_run(void *arg, int ith, int nth) {
    const struct rows_job *job = arg;
    int64_t r0, r1;
    threadpool_split(job->w->ne[1], ith, nth, &r0, &r1);
    for (int64_t r = r0; r < r1; r++)
        for (int64_t t = 0; t < job->n_tok; t++) {
            float *y = &job->y[t * job->y_stride + r];
            const float d = row_dot(job->kern, job->w, r, &job->in, t);
            *y = job->accumulate ? *y + d : d;
        }
}

/* Scattered rows defeat the hardware prefetcher (it follows one stream):
 * ask for the next neuron's rows (PREFETCH_AHEAD neurons ahead), every
 * cache line, into all cache levels. Non-temporal prefetches (locality 0)
 * four neurons ahead, as before, made the one-token gate/up/down round
 * twice as slow on the Xeon of the GPU host (13.1-14.6 ms a token against
 * 6.8-8.0 ms at 16 threads, 7B synth q4_0; Intel keeps such lines in a
 * sliver of L1, which 18 KB ahead overruns) and slower than no prefetch
 * at all (8.0 ms). One neuron ahead and two are alike there (sparse/dense
 * 1.62-1.87 against 1.43-1.89, two runs each at 16, 8 and 4 threads, one
 * ahead steadier); on the dev EPYC no prefetch is the slowest, one ahead
 * the quickest (62-69 ms at 2 threads; two ahead 68-77, the old one
 * 65-71). The one-token round asks for them more gently still: the dot of
 * a neuron's row asks for the next neuron's row at the same offset as it
 * reads (dot_q_next; axpy4 the same for the next four down rows), so the
 * requests are spread over the row's work, not issued 72 lines at once
 * (which stalls the core until most have arrived): that round went from
 * 7.8-8.6 to 4.9-5.2 ms a token on the Xeon at 16 threads, sparse/dense
 * 1.58-1.88 to 1.80-2.07 at 16, 8 and 4 threads, one machine
 * (bench/RESULTS.md). The batch path and the types without dot_q_next
 * keep the whole-row requests below. */
#ifndef OPTIML_SPARSE_PREFETCH_AHEAD /* a build-time override, for measuring */
#define OPTIML_SPARSE_PREFETCH_AHEAD 1
#endif
#define PREFETCH_AHEAD OPTIML_SPARSE_PREFETCH_AHEAD

static inline void prefetch_bytes(const void *p, uint64_t n) {
    for (uint64_t o = 0; o < n; o += 64) __builtin_prefetch((const char *)p + o, 0, 3);
}

/* Is a neuron with score v active? v is a predictor logit (thr: the
 * layer's logit threshold), the dense gate (oracle: thr = act_threshold),
 * or in CATS mode the dense gate with thr the neuron's threshold
 * (cats_thr). The dense FFN's cut (sparse_gate_cut) asks the same question. */
static inline bool score_on(enum sparse_mode mode, enum ffn_act act, float v, float thr) {
    if (mode != SPARSE_MODE_CATS) return v > thr;
    float a = v;
    if (act == FFN_ACT_SILU) a = v / (1.0f + expf(-v)); /* as ops_act_mul */
    else {
        const float one = 1.0f;
        ops_act_mul(&a, &one, 1, act);
    }
    return fabsf(a) > thr;
}

/* CATS: neuron i's threshold, blk.N.ffn_gate_thr[i] when the model has
 * them (nthr), else the layer's gate_threshold (thr). */
static inline float cats_thr(const float *nthr, float thr, int64_t i) { return nthr ? nthr[i] : thr; }

/* gate/up of the neurons in idx; h into ctx->gate (n_tok, n_ff). */
struct ffn_job {
    const struct cpu_kernels *kern;
    const struct layer *l;
    const struct sparse_state *s;
    struct row_input in_gate, in_up;
    const int32_t *idx;
    int64_t n_idx, n_tok, n_ff;
    enum ffn_act act;
    float act_threshold, logit_threshold;
    const float *neuron_thr; /* CATS per-neuron thresholds, or NULL */
    float *h;
    bool streams; /* gather_streams(n_idx, n_ff) */
};

static void ffn_run(void *arg, int ith, int nth) {
    const struct ffn_job *job = arg;
    const enum sparse_mode mode = job->s->mode;
    /* oracle and CATS: the scores are the dense gate (up without one) */
    const bool oracle = mode == SPARSE_MODE_ORACLE || mode == SPARSE_MODE_CATS;
    const bool nogate = job->act == FFN_ACT_RELU_NOGATE;
    int64_t k0, k1;
    threadpool_split(job->n_idx, ith, nth, &k0, &k1);
    for (int64_t k = k0; k < k1; k++) {
        const int32_t i = job->idx[k];
        if (k + PREFETCH_AHEAD < k1) {
            const int32_t ip = job->idx[k + PREFETCH_AHEAD];
            if (!nogate && !oracle) prefetch_bytes(tensor_row(&job->l->ffn_gate, ip), job->l->ffn_gate.row_size);
            prefetch_bytes(tensor_row(&job->l->ffn_up, ip), job->l->ffn_up.row_size);
        }
        for (int64_t t = 0; t < job->n_tok; t++) {
            /* oracle: lg is the dense gate (up without one), and the
             * threshold act_threshold: h would be exactly 0 */
            const float lg = job->s->logits[t * job->n_ff + i];
            const float thr = cats_thr(job->neuron_thr, job->logit_threshold, i);
            if (!score_on(mode, job->act, lg, thr)) continue; /* h stays 0 */
            float g = 0.0f, u;
            const bool st = job->streams;
            if (!nogate) g = oracle ? lg : gather_dot(job->kern, &job->l->ffn_gate, i, &job->in_gate, t, st, -1);
            u = nogate && oracle ? lg : gather_dot(job->kern, &job->l->ffn_up, i, &job->in_up, t, st, -1);
            /* exactly the dense FFN's ops, one element at a time */
            if (job->act_threshold > 0.0f) ops_threshold(nogate ? &u : &g, 1, job->act_threshold);
            ops_act_mul(&g, &u, 1, job->act);
            job->h[t * job->n_ff + i] = g;
        }
    }
}

/* x[t] += sum over idx of h[t][i] * down_t row i; threads split n_embd. */
struct down_job {
    const struct cpu_kernels *kern;
    const struct tensor *w; /* ffn_down_t (n_embd, n_ff) */
    const int32_t *idx;
    int64_t n_idx, n_tok, n_ff;
    const float *h;
    float *x; /* (n_tok, n_embd) */
    float *tmp;
    int64_t tmp_n;
};

static void down_t_run(void *arg, int ith, int nth) {
    const struct down_job *job = arg;
    const int64_t n_embd = job->w->ne[0], bs = (int64_t)dtype_block_size(job->w->type);
    const uint64_t bbytes = dtype_type_size(job->w->type);
    int64_t b0, b1;
    threadpool_split(n_embd / bs, ith, nth, &b0, &b1);
    if (b0 >= b1) return;
    const int64_t c0 = b0 * bs, nc = (b1 - b0) * bs;
    float *tmp = job->tmp + ith * job->tmp_n;
    const cpu_to_f32_fn to_f32 = job->kern->to_f32[job->w->type];
    const cpu_axpy_fn axpy = job->kern->axpy[job->w->type];
    for (int64_t k = 0; k < job->n_idx; k++) {
        const int32_t i = job->idx[k];
        const char *row = (const char *)tensor_row(job->w, i) + (uint64_t)b0 * bbytes;
        if (k + PREFETCH_AHEAD < job->n_idx)
            prefetch_bytes((const char *)tensor_row(job->w, job->idx[k + PREFETCH_AHEAD]) + (uint64_t)b0 * bbytes,
                           (uint64_t)(b1 - b0) * bbytes);
        if (axpy) { /* fused dequantize + multiply-add */
            for (int64_t t = 0; t < job->n_tok; t++) {
                const float a = job->h[t * job->n_ff + i];
                if (a != 0.0f) axpy(nc, a, row, job->x + t * n_embd + c0);
            }
            continue;
        }
        to_f32(nc, row, tmp); /* other types: dequantize once for all tokens */
        for (int64_t t = 0; t < job->n_tok; t++) {
            const float a = job->h[t * job->n_ff + i];
            if (a == 0.0f) continue;
            float *y = job->x + t * n_embd + c0;
            for (int64_t j = 0; j < nc; j++) y[j] += a * tmp[j];
        }
    }
}

/* ---- one token: the whole FFN in two parallel rounds ------------------ */

/* y += h[i] * row i of w (ffn_down_t) for the neurons in idx: four rows per
 * pass over y where the type has axpy4, which asks for the next group's
 * rows a line at a time as it goes (scattered rows defeat the hardware
 * prefetcher); the rows after the last full group are asked for at once. */
static void down_rows(const struct cpu_kernels *kern, const struct tensor *w, const int32_t *idx, int64_t n,
                      const float *h, float *y, float *tmp) {
    const int64_t n_embd = w->ne[0];
    const cpu_axpy4_fn axpy4 = kern->axpy4[w->type];
    const cpu_axpy_fn axpy = kern->axpy[w->type];
    int64_t k = 0;
    if (axpy4)
        for (; k + 4 <= n; k += 4) {
            const bool full = k + 8 <= n; /* a whole next group */
            if (!full)
                for (int64_t p = k + 4; p < n; p++) prefetch_bytes(tensor_row(w, idx[p]), w->row_size);
            const void *rows[4], *next[4];
            float a[4];
            for (int r = 0; r < 4; r++) {
                rows[r] = tensor_row(w, idx[k + r]);
                a[r] = h[idx[k + r]];
                next[r] = full ? tensor_row(w, idx[k + 4 + r]) : NULL;
            }
            axpy4(n_embd, a, rows, y, full ? next : NULL);
        }
    for (; k < n; k++) {
        if (k + 1 < n) prefetch_bytes(tensor_row(w, idx[k + 1]), w->row_size);
        const void *row = tensor_row(w, idx[k]);
        const float a = h[idx[k]];
        if (axpy) {
            axpy(n_embd, a, row, y);
            continue;
        }
        kern->to_f32[w->type](n_embd, row, tmp);
        for (int64_t j = 0; j < n_embd; j++) y[j] += a * tmp[j];
    }
}

/* One token (decode), two rounds. one_score_run: each thread scores its
 * share of the neurons (chunks of ONE_CHUNK dealt round-robin; predictor
 * fc2 rows, a sequential read, or the dense gate) into its own active
 * list. The caller joins the lists in thread order. one_ffn_run: the
 * joined list is cut into ONE_SPLIT pieces per thread, of equal length;
 * threads take pieces in turn (an atomic counter), run gate/up of their
 * neurons and sum their down_t rows into the piece's own part (whole rows,
 * each read by one thread). one_reduce_run: each thread adds the parts,
 * in piece order, into its slice of x. Which neurons a piece holds, and so
 * every float sum, depends on the mask and the thread count only, never on
 * which thread took it or when. The batch path takes three rounds with
 * serial passes over n_ff between them. */
struct one_job {
    const struct cpu_kernels *kern;
    const struct layer *l;
    struct sparse_state *s;
    const struct tensor *score_w; /* fc2, or the dense gate (up without one) */
    struct row_input in_score, in_gate, in_up;
    int64_t n_ff, n_embd;
    enum ffn_act act;
    float act_threshold, thr;
    float *h;      /* (n_ff) ctx->gate */
    float *x;      /* (n_embd) ctx->x: the residual the down sum goes into */
    int64_t n_act; /* one_ffn_run: the length of the joined list s->idx */
    int64_t n_pieces;
    bool streams;   /* gather_streams(n_act, n_ff) */
    bool down_only; /* one_ffn_run: the down step of the n_act neurons of idx_nz */
};

/* Gate/up of one_ffn_run: h of the active neurons act[0..n) (the batch path's
 * ffn_run for one token, same ops); their indices with h != 0 into nz. */
static int64_t one_gate_up(const struct one_job *job, const int32_t *act, int64_t n, int32_t *nz) {
    const enum sparse_mode mode = job->s->mode;
    const bool scores_gate = mode == SPARSE_MODE_ORACLE || mode == SPARSE_MODE_CATS;
    const bool nogate = job->act == FFN_ACT_RELU_NOGATE;
    const struct layer *l = job->l;
    const bool gate = !nogate && !scores_gate, up = !(nogate && scores_gate); /* the rows read */
    /* the next neuron's rows: asked for by the dot of this one's (dot_q_next)
     * or all at once here */
    const bool gate_pf = gate && !gather_next(job->kern, &l->ffn_gate, &job->in_gate, job->streams);
    const bool up_pf = up && !gather_next(job->kern, &l->ffn_up, &job->in_up, job->streams);
    int64_t n_nz = 0;
    for (int64_t k = 0; k < n; k++) {
        const int32_t i = act[k], next = k + 1 < n ? act[k + 1] : -1;
        if (k + PREFETCH_AHEAD < n) {
            const int32_t ip = act[k + PREFETCH_AHEAD];
            if (gate_pf) prefetch_bytes(tensor_row(&l->ffn_gate, ip), l->ffn_gate.row_size);
            if (up_pf) prefetch_bytes(tensor_row(&l->ffn_up, ip), l->ffn_up.row_size);
        }
        const float lg = job->s->logits[i];
        float g = 0.0f, u;
        if (gate) g = gather_dot(job->kern, &l->ffn_gate, i, &job->in_gate, 0, job->streams, next);
        else if (!nogate) g = lg;
        u = up ? gather_dot(job->kern, &l->ffn_up, i, &job->in_up, 0, job->streams, next) : lg;
        if (job->act_threshold > 0.0f) ops_threshold(nogate ? &u : &g, 1, job->act_threshold);
        ops_act_mul(&g, &u, 1, job->act);
        job->h[i] = g;
        if (g != 0.0f) nz[n_nz++] = i;
    }
    return n_nz;
}

/* Room per thread in s->idx for its active list in one_score_run: the
 * most neurons its chunks hold. */
static int64_t one_list_room(int64_t n_ff, int nth) {
    const int64_t n_ch = (n_ff + ONE_CHUNK - 1) / ONE_CHUNK;
    return (n_ch + nth - 1) / nth * ONE_CHUNK;
}

static void one_score_run(void *arg, int ith, int nth) {
    const struct one_job *job = arg;
    struct sparse_state *s = job->s;
    /* chunks of ONE_CHUNK neurons dealt round-robin: an equal share of the
     * scores, and hot neurons stored together (hottest first) spread over
     * the lists (one_ffn_run balances the gathers in any case) */
    const int64_t n_ch = (job->n_ff + ONE_CHUNK - 1) / ONE_CHUNK;
    int32_t *act = s->idx + ith * one_list_room(job->n_ff, nth); /* this thread's list */
    int64_t n_act = 0;
    const struct tensor *w = job->score_w;
    const struct row_input *in = &job->in_score;
    /* short rows (the predictor's fc2): the chunk's rows in one call */
    const cpu_dot_q_xi_rows_fn rows =
        in->xi && w->ne[0] <= SCORE_ROWS_MAX_N ? job->kern->dot_q_xi_rows[w->type] : NULL;
    for (int64_t c = ith; c < n_ch; c += nth) {
        const int64_t i0 = c * ONE_CHUNK, i1 = i0 + ONE_CHUNK < job->n_ff ? i0 + ONE_CHUNK : job->n_ff;
        memset(job->h + i0, 0, (size_t)(i1 - i0) * sizeof(float)); /* every neuron's h, once */
        if (rows) rows(w->ne[0], tensor_row(w, i0), w->row_size, i1 - i0, in->xq, in->xi, s->logits + i0);
        for (int64_t i = i0; i < i1; i++) {
            if (!rows) s->logits[i] = row_dot(job->kern, w, i, in, 0);
            if (score_on(s->mode, job->act, s->logits[i], job->thr)) act[n_act++] = (int32_t)i;
        }
    }
    s->counts[ith] = n_act;
}

/* The threads' active lists (one_score_run) joined in thread order at the
 * start of s->idx; returns the length. Each list moves down (the room
 * before it holds the lists before it), in order, so none is overwritten
 * before it moves. */
static int64_t one_join(struct sparse_state *s, int64_t n_ff, int nth) {
    const int64_t room = one_list_room(n_ff, nth);
    int64_t n = 0;
    for (int t = 0; t < nth; t++) {
        const int64_t c = s->counts[t];
        if (t > 0) memmove(s->idx + n, s->idx + t * room, (size_t)c * sizeof(int32_t));
        n += c;
    }
    return n;
}

static void one_ffn_run(void *arg, int ith, int nth) {
    const struct one_job *job = arg;
    struct sparse_state *s = job->s;
    (void)nth;
    for (;;) {
        const int64_t c = atomic_fetch_add_explicit(&s->next_piece, 1, memory_order_relaxed);
        if (c >= job->n_pieces) break;
        /* piece c of the joined list (one list: the gathers' prefetch runs
         * ahead across the threads' lists); its h != 0 neurons go to the
         * same place in idx_nz */
        const int64_t k0 = job->n_act * c / job->n_pieces, k1 = job->n_act * (c + 1) / job->n_pieces;
        int32_t *nz = s->idx_nz + k0;
        /* down_only (CATS with the product score): idx_nz holds the kept neurons already */
        const int64_t n_nz = job->down_only ? k1 - k0 : one_gate_up(job, s->idx + k0, k1 - k0, nz);
        if (job->l->ffn_down_t.data) {
            float *y = s->part + c * job->n_embd;
            memset(y, 0, (size_t)job->n_embd * sizeof(float));
            down_rows(job->kern, &job->l->ffn_down_t, nz, n_nz, job->h, y, s->tmp + ith * s->tmp_n);
        }
        s->piece_nz[c] = n_nz;
    }
}

static void one_reduce_run(void *arg, int ith, int nth) {
    const struct one_job *job = arg;
    int64_t j0, j1;
    threadpool_split(job->n_embd, ith, nth, &j0, &j1);
    for (int64_t c = 0; c < job->n_pieces; c++) {
        ops_add(job->x + j0, job->s->part + c * job->n_embd + j0, j1 - j0);
    }
}

/* The one-token round over the job's n_act neurons: ONE_SPLIT pieces per
 * thread (none empty) taken in turn (one_ffn_run), then, with ffn_down_t,
 * the pieces' parts added into x (one_reduce_run). */
static void one_rounds(optiml_context *ctx, struct one_job *job) {
    const int nth = threadpool_n_threads(ctx->pool);
    job->n_pieces = job->n_act < ONE_SPLIT * nth ? job->n_act : ONE_SPLIT * nth;
    atomic_store_explicit(&job->s->next_piece, 0, memory_order_relaxed); /* threadpool_run publishes it */
    threadpool_run(ctx->pool, one_ffn_run, job);
    if (job->l->ffn_down_t.data) threadpool_run(ctx->pool, one_reduce_run, job);
}

/* s->hidden = relu(xb fc1^T) (one token). */
static void predictor_hidden(optiml_context *ctx, const struct layer *l, bool *done) {
    struct sparse_state *s = ctx->sparse;
    const int64_t r = l->fc1.ne[1];
    struct rows_job job = {.kern = ctx->kern, .w = &l->fc1, .n_tok = 1, .y = s->hidden, .y_stride = r};
    job.in = row_input_make(ctx, s->xq, done, l->fc1.type, ctx->xb, 1, ctx->model->hp.n_embd);
    threadpool_run(ctx->pool, rows_run, &job);
    for (int64_t k = 0; k < r; k++) s->hidden[k] = s->hidden[k] > 0.0f ? s->hidden[k] : 0.0f;
}

static bool sparse_ffn_one(optiml_context *ctx, const struct layer *l, int32_t il, float thr) {
    struct sparse_state *s = ctx->sparse;
    const struct hparams *hp = &ctx->model->hp;
    const int64_t n_ff = hp->n_ff, n_embd = hp->n_embd;
    const bool cats = s->mode == SPARSE_MODE_CATS;
    if (s->mode == SPARSE_MODE_ORACLE && !ffn_act_is_relu(hp->ffn_act)) { /* every neuron is active */
        s->n_active += (uint64_t)n_ff;
        return false;
    }
    bool done[DTYPE_COUNT] = {0}, hdone[DTYPE_COUNT] = {0};
    struct one_job job = {.kern = ctx->kern, .l = l, .s = s, .n_ff = n_ff, .n_embd = n_embd, .act = hp->ffn_act,
                          .act_threshold = ctx->model->sparse.act_threshold, .thr = thr, .h = ctx->gate,
                          .x = ctx->x};
    if (s->mode == SPARSE_MODE_PREDICTOR) {
        predictor_hidden(ctx, l, done);
        job.score_w = &l->fc2;
        job.in_score = row_input_make(ctx, s->hq, hdone, l->fc2.type, s->hidden, 1, l->fc1.ne[1]);
    } else {
        job.score_w = l->ffn_gate.data ? &l->ffn_gate : &l->ffn_up;
        job.in_score = row_input_make(ctx, s->xq, done, job.score_w->type, ctx->xb, 1, n_embd);
    }
    if (l->ffn_gate.data) job.in_gate = row_input_make(ctx, s->xq, done, l->ffn_gate.type, ctx->xb, 1, n_embd);
    job.in_up = row_input_make(ctx, s->xq, done, l->ffn_up.type, ctx->xb, 1, n_embd);
    threadpool_run(ctx->pool, one_score_run, &job);

    const int nth = threadpool_n_threads(ctx->pool);
    job.n_act = one_join(s, n_ff, nth);
    /* as the batch path: dense pays off (before any gate/up or down row is
     * read; ctx->gate is the dense FFN's to write) */
    if (!cats && (double)job.n_act > SPARSE_DENSE_FRAC * (double)n_ff) {
        s->n_active += (uint64_t)n_ff;
        return false;
    }
    job.streams = gather_streams(job.n_act, n_ff);
    one_rounds(ctx, &job);
    int64_t n_nz = 0;
    for (int64_t c = 0; c < job.n_pieces; c++) n_nz += s->piece_nz[c];
    if (ctx->ffn_observer) {
        const bool g_known = s->mode != SPARSE_MODE_PREDICTOR && l->ffn_gate.data;
        ctx->ffn_observer(ctx->ffn_observer_user, il, 1, ctx->xb, g_known ? s->logits : NULL, ctx->gate);
    }
    s->n_active += (uint64_t)n_nz;
    if (!l->ffn_down_t.data) { /* the dense down matmul on the sparse h (8-bit h as it does) */
        bool ddone[DTYPE_COUNT] = {0};
        struct rows_job rj = {.kern = ctx->kern, .w = &l->ffn_down, .n_tok = 1, .y_stride = n_embd,
                              .accumulate = true, .y = ctx->x};
        rj.in = row_input_make(ctx, s->dq, ddone, l->ffn_down.type, ctx->gate, 1, n_ff);
        threadpool_run(ctx->pool, rows_run, &rj);
    }
    return true;
}

/* ---- the layer ---------------------------------------------------------- */

/* s->logits = predictor logits (or the oracle's dense gate / up). */
static void sparse_scores(optiml_context *ctx, const struct layer *l, int64_t n_tok, bool *done) {
    struct sparse_state *s = ctx->sparse;
    const struct hparams *hp = &ctx->model->hp;
    struct rows_job job = {.kern = ctx->kern, .n_tok = n_tok};
    if (s->mode == SPARSE_MODE_ORACLE || s->mode == SPARSE_MODE_CATS) {
        job.w = l->ffn_gate.data ? &l->ffn_gate : &l->ffn_up;
        job.in = row_input_make(ctx, s->xq, done, job.w->type, ctx->xb, n_tok, hp->n_embd);
        job.y = s->logits;
        job.y_stride = hp->n_ff;
        threadpool_run(ctx->pool, rows_run, &job);
        return;
    }
    const int64_t r = l->fc1.ne[1];
    job.w = &l->fc1;
    job.in = row_input_make(ctx, s->xq, done, l->fc1.type, ctx->xb, n_tok, hp->n_embd);
    job.y = s->hidden;
    job.y_stride = r;
    threadpool_run(ctx->pool, rows_run, &job);
    for (int64_t k = 0; k < n_tok * r; k++) s->hidden[k] = s->hidden[k] > 0.0f ? s->hidden[k] : 0.0f;
    bool hdone[DTYPE_COUNT] = {0};
    job.w = &l->fc2;
    job.in = row_input_make(ctx, s->hq, hdone, l->fc2.type, s->hidden, n_tok, r);
    job.y = s->logits;
    job.y_stride = hp->n_ff;
    threadpool_run(ctx->pool, rows_run, &job);
}

/* The union of the tokens' active sets into s->idx; returns its size. */
static int64_t sparse_union(const optiml_context *ctx, int64_t n_tok, float thr, const float *nthr) {
    struct sparse_state *s = ctx->sparse;
    const int64_t n_ff = ctx->model->hp.n_ff;
    /* the oracle of a non-ReLU activation: every neuron is active */
    const enum ffn_act act = ctx->model->hp.ffn_act;
    const bool all = s->mode == SPARSE_MODE_ORACLE && !ffn_act_is_relu(act);
    int64_t n = 0;
    for (int64_t i = 0; i < n_ff; i++) {
        bool on = all;
        const float ti = cats_thr(nthr, thr, i);
        for (int64_t t = 0; t < n_tok && !on; t++) on = score_on(s->mode, act, s->logits[t * n_ff + i], ti);
        if (on) s->idx[n++] = (int32_t)i;
    }
    return n;
}

static void sparse_down(optiml_context *ctx, const struct layer *l, int64_t n_tok, const int32_t *idx, int64_t n_idx,
                        bool count);

/* CATS with the product score: gate and up of every neuron (the dense
 * rows), h = act(g) up, the cut on |h_i| (sparse_h_cut), then only the
 * kept neurons' rows of ffn_down_t (or the dense down on the sparse h). */
static void cats_product_ffn(optiml_context *ctx, const struct layer *l, int64_t n_tok, int32_t il, bool *done) {
    struct sparse_state *s = ctx->sparse;
    const struct hparams *hp = &ctx->model->hp;
    const int64_t n_ff = hp->n_ff;
    sparse_scores(ctx, l, n_tok, done); /* gate into s->logits */
    struct rows_job uj = {.kern = ctx->kern, .w = &l->ffn_up, .n_tok = n_tok, .y = ctx->up, .y_stride = n_ff};
    uj.in = row_input_make(ctx, s->xq, done, l->ffn_up.type, ctx->xb, n_tok, hp->n_embd);
    threadpool_run(ctx->pool, rows_run, &uj);
    memcpy(ctx->gate, s->logits, (size_t)(n_tok * n_ff) * sizeof(float));
    ops_act_mul(ctx->gate, ctx->up, n_tok * n_ff, hp->ffn_act);
    sparse_h_cut(ctx, n_tok, il);
    if (ctx->ffn_observer) ctx->ffn_observer(ctx->ffn_observer_user, il, n_tok, ctx->xb, s->logits, ctx->gate);
}

bool sparse_layer_ffn(optiml_context *ctx, int64_t n_tok, int32_t il) {
    struct sparse_state *s = ctx->sparse;
    const optiml_model *m = ctx->model;
    const struct hparams *hp = &m->hp;
    const struct layer *l = &m->layers[il];
    const int64_t n_ff = hp->n_ff;
    if (il == 0) s->n_active = s->n_total = 0;
    s->n_total += (uint64_t)(n_tok * n_ff);
    const bool cats = s->mode == SPARSE_MODE_CATS;
    if (cats && n_tok > SPARSE_CATS_MAX_TOKENS) return false; /* sparse_gate_cut counts */
    if (n_tok > SPARSE_MAX_TOKENS) {
        s->n_active += (uint64_t)(n_tok * n_ff);
        return false;
    }
    bool done[DTYPE_COUNT] = {0};
    if (cats && m->sparse.cats_product) {
        cats_product_ffn(ctx, l, n_tok, il, done);
        sparse_down(ctx, l, n_tok, NULL, n_ff, false); /* sparse_h_cut counted */
        return true;
    }
    const float thr = cats                           ? m->sparse.gate_threshold[il]
                      : s->mode == SPARSE_MODE_ORACLE ? m->sparse.act_threshold
                                                      : m->sparse.layer_threshold[il];
    const float *nthr = cats && m->sparse.has_neuron_thr ? l->ffn_gate_thr.data : NULL;
    if (n_tok == 1 && !nthr) return sparse_ffn_one(ctx, l, il, thr); /* per-neuron CATS: the path below */
    sparse_scores(ctx, l, n_tok, done);
    const int64_t n_idx = sparse_union(ctx, n_tok, thr, nthr);
    if (!cats && (double)n_idx > SPARSE_DENSE_FRAC * (double)n_ff) {
        s->n_active += (uint64_t)(n_tok * n_ff);
        return false;
    }

    /* gate/up of the union */
    memset(ctx->gate, 0, (size_t)(n_tok * n_ff) * sizeof(float));
    struct ffn_job fj = {.kern = ctx->kern, .l = l, .s = s, .idx = s->idx, .n_idx = n_idx, .n_tok = n_tok,
                         .n_ff = n_ff, .act = hp->ffn_act, .act_threshold = m->sparse.act_threshold,
                         .logit_threshold = thr, .neuron_thr = nthr, .h = ctx->gate,
                         .streams = gather_streams(n_idx, n_ff)};
    if (l->ffn_gate.data) fj.in_gate = row_input_make(ctx, s->xq, done, l->ffn_gate.type, ctx->xb, n_tok, hp->n_embd);
    fj.in_up = row_input_make(ctx, s->xq, done, l->ffn_up.type, ctx->xb, n_tok, hp->n_embd);
    threadpool_run(ctx->pool, ffn_run, &fj);
    if (ctx->ffn_observer) {
        const bool g_known = s->mode != SPARSE_MODE_PREDICTOR && l->ffn_gate.data;
        ctx->ffn_observer(ctx->ffn_observer_user, il, n_tok, ctx->xb, g_known ? s->logits : NULL, ctx->gate);
    }

    sparse_down(ctx, l, n_tok, s->idx, n_idx, true);
    return true;
}

/* x += h Wdown over the neurons of idx (n_idx; idx NULL: all) with some
 * h != 0 (count: add them to the FFN statistics). */
static void sparse_down(optiml_context *ctx, const struct layer *l, int64_t n_tok, const int32_t *idx, int64_t n_idx,
                        bool count) {
    struct sparse_state *s = ctx->sparse;
    const struct hparams *hp = &ctx->model->hp;
    const int64_t n_ff = hp->n_ff;
    int64_t n_nz = 0;
    for (int64_t k = 0; k < n_idx; k++) {
        const int32_t i = idx ? idx[k] : (int32_t)k;
        int64_t c = 0;
        for (int64_t t = 0; t < n_tok; t++) c += ctx->gate[t * n_ff + i] != 0.0f;
        if (count) s->n_active += (uint64_t)c;
        if (c) s->idx_nz[n_nz++] = i;
    }
    if (n_tok == 1 && l->ffn_down_t.data) { /* whole rows in pieces, as the one-token FFN does */
        struct one_job job = {.kern = ctx->kern, .l = l, .s = s, .n_ff = n_ff, .n_embd = hp->n_embd, .h = ctx->gate,
                              .x = ctx->x, .n_act = n_nz, .down_only = true};
        one_rounds(ctx, &job);
        return;
    }
    struct down_job dj = {.kern = ctx->kern, .idx = s->idx_nz, .n_idx = n_nz, .n_tok = n_tok, .n_ff = n_ff,
                          .h = ctx->gate, .x = ctx->x, .tmp = s->tmp, .tmp_n = s->tmp_n};
    if (l->ffn_down_t.data) {
        dj.w = &l->ffn_down_t;
        threadpool_run(ctx->pool, down_t_run, &dj);
    } else { /* the dense down matmul on the sparse h (8-bit h as it does) */
        bool hdone[DTYPE_COUNT] = {0};
        struct rows_job rj = {.kern = ctx->kern, .w = &l->ffn_down, .n_tok = n_tok, .y_stride = hp->n_embd,
                              .accumulate = true, .y = ctx->x};
        rj.in = row_input_make(ctx, s->dq, hdone, l->ffn_down.type, ctx->gate, n_tok, n_ff);
        threadpool_run(ctx->pool, rows_run, &rj);
    }
}

/* CATS's cut over n_tok rows of ctx->gate: the gate before the activation
 * (score |act(gate)|) or, with the product score, h = act(gate) * up
 * (score |h|); entries at or below their threshold become 0 (act(0) = 0
 * for every gated activation), the kept ones are counted. */
static void cats_cut(optiml_context *ctx, int64_t n_tok, int32_t il, bool product) {
    const optiml_model *m = ctx->model;
    const enum ffn_act act = m->hp.ffn_act;
    const float thr = m->sparse.gate_threshold[il];
    const float *nthr = m->sparse.has_neuron_thr ? m->layers[il].ffn_gate_thr.data : NULL;
    const int64_t n_ff = m->hp.n_ff;
    uint64_t kept = 0;
    for (int64_t t = 0; t < n_tok; t++)
        for (int64_t i = 0; i < n_ff; i++) {
            float *v = &ctx->gate[t * n_ff + i];
            const float th = cats_thr(nthr, thr, i);
            if (product ? fabsf(*v) > th : score_on(SPARSE_MODE_CATS, act, *v, th)) kept++;
            else *v = 0.0f;
        }
    ctx->sparse->n_active += kept;
}

void sparse_gate_cut(optiml_context *ctx, int64_t n_tok, int32_t il) {
    const struct sparse_state *s = ctx->sparse;
    if (s && s->mode == SPARSE_MODE_CATS && !ctx->model->sparse.cats_product) cats_cut(ctx, n_tok, il, false);
}

void sparse_h_cut(optiml_context *ctx, int64_t n_tok, int32_t il) {
    const struct sparse_state *s = ctx->sparse;
    if (s && s->mode == SPARSE_MODE_CATS && ctx->model->sparse.cats_product) cats_cut(ctx, n_tok, il, true);
}

/* ---- scalar predictor (tests, tools) ------------------------------------ */

static double row_dot_ref(const struct tensor *w, int64_t r, const float *x, float *tmp) {
    cpu_kernels_ref()->to_f32[w->type](w->ne[0], tensor_row(w, r), tmp);
    double sum = 0.0;
    for (int64_t j = 0; j < w->ne[0]; j++) sum += (double)tmp[j] * x[j];
    return sum;
}

void sparse_predict_row(const optiml_model *m, int32_t il, const float *x, float *scratch, float *logits) {
    const struct layer *l = &m->layers[il];
    const int64_t r = l->fc1.ne[1];
    float *hidden = scratch, *tmp = scratch + r;
    for (int64_t j = 0; j < r; j++) {
        const double v = row_dot_ref(&l->fc1, j, x, tmp);
        hidden[j] = v > 0.0 ? (float)v : 0.0f;
    }
    for (int64_t i = 0; i < m->hp.n_ff; i++) logits[i] = (float)row_dot_ref(&l->fc2, i, hidden, tmp);
}
