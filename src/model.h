/*
 * model.h - the loaded model: hyperparameters, weight views into the mapped
 * GGUF file, vocabulary. Read-only after optiml_model_load, so several
 * contexts (and threads) can share one model.
 */
#ifndef OPTIML_MODEL_H
#define OPTIML_MODEL_H

#include "common.h"
#include "cpu/ops.h"
#include "gguf.h"
#include "tensor.h"

struct vocab;

struct hparams {
    int32_t n_vocab;
    int32_t n_embd;
    int32_t n_layer;
    int32_t n_ff;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t head_dim;  /* per head, q/k/v                       */
    int32_t n_rot;     /* rotated dims per head (<= head_dim)    */
    int32_t n_ctx_train;
    float norm_eps;
    float rope_base;
    float rope_scale;  /* positions are divided by it (linear)   */
    bool rope_neox;    /* rotate pairs (i, i + n_rot/2), not (2i, 2i+1):
                          qwen2, whose q/k rows are not permuted   */
    enum ffn_act ffn_act;
};

struct layer {
    struct tensor attn_norm; /* (n_embd)                          f32 */
    struct tensor wq;        /* (n_embd, n_head * head_dim)           */
    struct tensor wk;        /* (n_embd, n_head_kv * head_dim)        */
    struct tensor wv;        /* (n_embd, n_head_kv * head_dim)        */
    struct tensor wo;        /* (n_head * head_dim, n_embd)           */
    struct tensor bq, bk, bv, bo; /* attention biases (qwen2), f32, or absent */
    struct tensor ffn_norm;  /* (n_embd)                          f32 */
    struct tensor ffn_gate;  /* (n_embd, n_ff)                        */
    struct tensor ffn_up;    /* (n_embd, n_ff)                        */
    struct tensor ffn_down;  /* (n_ff, n_embd)                        */
    /* sparse FFN (optional, docs/FORMAT.md "Sparse FFN"): ffn_gate is absent
     * for FFN_ACT_RELU_NOGATE */
    struct tensor fc1;          /* (n_embd, r) predictor layer 1, or absent */
    struct tensor fc2;          /* (r, n_ff) predictor layer 2, or absent   */
    struct tensor ffn_down_t;   /* (n_embd, n_ff) row i = column i of down  */
    struct tensor ffn_act_freq; /* (n_ff) f32 fraction of tokens active     */
    struct tensor ffn_gate_thr; /* (n_ff) f32 CATS threshold per neuron     */
};

/* The seven matrices of layer l, as an initializer: struct tensor
 * *ws[LAYER_N_MATRICES] = LAYER_MATRICES(l); (const or not). */
#define LAYER_N_MATRICES 7
#define LAYER_MATRICES(l) {&(l)->wq, &(l)->wk, &(l)->wv, &(l)->wo, &(l)->ffn_gate, &(l)->ffn_up, &(l)->ffn_down}

/* optiml.sparse.* keys; version 0 when the model has none. */
struct sparse_info {
    uint32_t version;
    bool has_predictor;     /* every layer has fc1 and fc2              */
    bool has_down_t;        /* every layer has ffn_down_t               */
    float act_threshold;    /* FATReLU: activations <= it count as zero */
    float *layer_threshold; /* (n_layer) predictor logit thresholds     */
    uint64_t calib_tokens;
    /* training-free sparsity (optiml.sparse.kind "cats"): neuron i of
     * layer il is active iff |act(x Wgate)_i| > gate_threshold[il], or,
     * when every layer has blk.N.ffn_gate_thr, > ffn_gate_thr[i] */
    float *gate_threshold;  /* (n_layer), or NULL                       */
    bool has_neuron_thr;    /* every layer has ffn_gate_thr             */
    bool cats_product;      /* kind "cats_product": the cut is on
                               |act(g_i) up_i|, not on |act(g_i)|       */
};

struct optiml_model {
    gguf_file *file;
    struct hparams hp;
    struct tensor tok_embd;    /* (n_embd, n_vocab)                  */
    struct tensor output_norm; /* (n_embd)                       f32 */
    struct tensor output;      /* (n_embd, n_vocab); = tok_embd if tied */
    struct tensor rope_freqs;  /* (n_rot / 2) f32 divisors, or absent  */
    struct layer *layers;      /* n_layer                            */
    struct sparse_info sparse;
    struct vocab *vocab;
    struct gpu_model *gpu;     /* offloaded layers (gpu.c), or NULL  */
    struct powerinfer_mem *powerinfer; /* tensors built for a PowerInfer
                                          file (powerinfer.c), or NULL */
    char **meta_strs;          /* NUL-terminated copies for meta_str */
    char **meta_keys;
    int32_t n_meta_strs;
    uint64_t n_bytes;
    uint64_t n_params;
    char arch[32];
    char desc[128];
};

#endif /* OPTIML_MODEL_H */
