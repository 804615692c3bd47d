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
    enum ffn_act ffn_act;
};

struct layer {
    struct tensor attn_norm; /* (n_embd)                          f32 */
    struct tensor wq;        /* (n_embd, n_head * head_dim)           */
    struct tensor wk;        /* (n_embd, n_head_kv * head_dim)        */
    struct tensor wv;        /* (n_embd, n_head_kv * head_dim)        */
    struct tensor wo;        /* (n_head * head_dim, n_embd)           */
    struct tensor ffn_norm;  /* (n_embd)                          f32 */
    struct tensor ffn_gate;  /* (n_embd, n_ff)                        */
    struct tensor ffn_up;    /* (n_embd, n_ff)                        */
    struct tensor ffn_down;  /* (n_ff, n_embd)                        */
};

struct optiml_model {
    gguf_file *file;
    struct hparams hp;
    struct tensor tok_embd;    /* (n_embd, n_vocab)                  */
    struct tensor output_norm; /* (n_embd)                       f32 */
    struct tensor output;      /* (n_embd, n_vocab); = tok_embd if tied */
    struct tensor rope_freqs;  /* (n_rot / 2) f32 divisors, or absent  */
    struct layer *layers;      /* n_layer                            */
    struct vocab *vocab;
    char **meta_strs;          /* NUL-terminated copies for meta_str */
    char **meta_keys;
    int32_t n_meta_strs;
    uint64_t n_bytes;
    uint64_t n_params;
    char arch[32];
    char desc[128];
};

#endif /* OPTIML_MODEL_H */
