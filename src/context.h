/*
 * context.h - the context's internals, shared by the files that run parts
 * of the forward pass: context.c (KV cache, CPU forward pass), gpu.c (the
 * CUDA layers), and the FFN variants. Not installed.
 */
#ifndef OPTIML_CONTEXT_H
#define OPTIML_CONTEXT_H

#include "model.h"
#include "threadpool.h"

/* Called after the FFN activation of every layer that runs on the CPU
 * (observers: the profiler and the predictor-sample dump; layers offloaded
 * to the GPU are not observed, so the profiler loads with -ngl 0): x is
 * the normed FFN input (n_tok, n_embd),
 * g = x Wgate before the activation (n_tok, n_ff; NULL without a gate, or
 * when a predictor picked the neurons and the gate is partly unknown),
 * h = act(x Wgate) * (x Wup) (n_tok, n_ff), the input of Wdown. */
typedef void (*ffn_observer_fn)(void *user, int32_t il, int64_t n_tok, const float *x, const float *g,
                                const float *h);

#define KV_SEQ_MAX 64 /* sequence ids are bits of a uint64_t per cell */

struct kv_cache {
    uint32_t n_cells;
    uint32_t n_used_hi; /* cells >= this are free                        */
    int32_t *pos;       /* (n_cells) position, -1 when free              */
    uint64_t *seq;      /* (n_cells) bit s set: cell belongs to seq s    */
    float *k;           /* (n_layer, n_cells, n_head_kv * head_dim)      */
    float *v;           /* (n_layer, n_cells, n_head_kv * head_dim)      */
};

struct optiml_context {
    const optiml_model *model;
    optiml_context_params params;
    const struct cpu_kernels *kern;
    struct threadpool *pool;
    struct kv_cache kv;

    /* scratch, n_batch rows each */
    float *x;        /* (n_batch, n_embd) residual stream              */
    float *xb;       /* (n_batch, n_embd) normed input of a step       */
    float *q;        /* (n_batch, n_head * head_dim)                   */
    float *k;        /* (n_batch, n_head_kv * head_dim)                */
    float *v;        /* (n_batch, n_head_kv * head_dim)                */
    float *att;      /* (n_batch, n_head * head_dim)                   */
    float *gate;     /* (n_batch, n_ff)                                */
    float *up;       /* (n_batch, n_ff)                                */
    float *scores;   /* (n_threads, 4, n_ctx) attention weights        */
    float *rope_inv_freq; /* (n_rot / 2)                              */
    float *rope_cs;  /* (n_batch, n_rot) cos, sin per token and pair  */
    uint32_t *cells; /* (n_batch) KV cell of each batch entry          */
    float *logits;   /* (n_batch, n_vocab)                             */
    int32_t *logits_row; /* (n_batch) row of entry i in logits, or -1  */
    int32_t *out_ids;    /* (n_batch) entries that asked for logits    */
    /* input rows of the quantized matmuls, quantized once per matmul: one
     * buffer per activation type the weights use (q8_0, q8_1, q8_k),
     * indexed by that type, NULL for the others */
    void *xq[DTYPE_COUNT]; /* (n_batch, row bytes of the largest n_in)  */
    /* prompt GEMM (cpu/ops.h's gemm, batches of cpu_gemm_min_tokens or
     * more): each thread's repacked panel of 8 weight rows, and the q8_0
     * inputs' block scales and sums; NULL when no weight type has a gemm */
    void *gemm_panel; /* (n_threads, cpu_gemm_panel_size(largest n_in)) */
    struct cpu_gemm_xblock *gemm_xi; /* (n_batch, largest n_in / 32)   */
    uint64_t gemm_panel_size;

    struct gpu_ctx *gpu; /* device buffers when layers are offloaded (gpu.c) */
    struct sparse_state *sparse; /* sparse FFN (sparse.c), NULL: dense */

    ffn_observer_fn ffn_observer; /* NULL, or called after each FFN activation */
    void *ffn_observer_user;
    float *observer_gate; /* (n_batch, n_ff) the observer's g, with an observer */
};

/* Install (or with fn NULL remove) the FFN observer of a context; allocates
 * the buffer of its g (OPTIML_ERR_NOMEM). */
optiml_status context_set_ffn_observer(optiml_context *ctx, ffn_observer_fn fn, void *user);

#endif /* OPTIML_CONTEXT_H */
