/*
 * sparse.h - the sparse CPU FFN of ReLU-family models (issue 5): only the
 * neurons that fire are computed.
 *
 * Per layer and token: a predictor (relu(x fc1^T) fc2^T, logit per neuron,
 * active iff logit > optiml.sparse.layer_threshold[il]) or, in oracle mode,
 * the dense gate itself picks the active neurons; then only their gate/up
 * rows are read, h = act(gate) * up, and y += h[i] * ffn_down_t row i for
 * the neurons with h[i] != 0. Batches of several tokens use the union of
 * the tokens' active sets (each token keeps its own mask), or the dense
 * FFN when the union is too large to pay off. Formats: docs/FORMAT.md
 * "Sparse FFN (OptiML GGUF)".
 *
 * Training-free sparsity of SiLU-gated models (CATS, mode 4): the gate is
 * computed for every neuron, and a neuron counts only when
 * |act(gate)| > optiml.sparse.gate_threshold[il] (calibrated per layer by
 * optiml-profile --calibrate-sparsity), or > blk.N.ffn_gate_thr[i] when
 * the model has per-neuron thresholds; only those rows of up and of
 * ffn_down_t are read. The cut changes the model, so it applies to every
 * batch: one too large for the sparse path runs the dense FFN with the
 * same cut (sparse_gate_cut).
 */
#ifndef OPTIML_SPARSE_H
#define OPTIML_SPARSE_H

#include "context.h"

/* optiml_context_params.sparse_mode */
enum sparse_mode {
    SPARSE_MODE_AUTO = 0,      /* predictor when the model has one, else dense */
    SPARSE_MODE_DENSE = 1,     /* always the dense FFN                         */
    SPARSE_MODE_ORACLE = 2,    /* exact active set from the dense gate (tests) */
    SPARSE_MODE_PREDICTOR = 3, /* predictor; context init fails without one    */
    SPARSE_MODE_CATS = 4,      /* |act(gate)| > gate_threshold; auto picks it
                                  for a model with thresholds, no predictor  */
};

/* Sets ctx->sparse (NULL when the context runs dense) and allocates every
 * buffer the sparse FFN needs. OPTIML_ERR_INVALID_ARG for an unknown mode
 * or mode 3 on a model without predictors. */
optiml_status sparse_init(optiml_context *ctx);
void sparse_free(struct sparse_state *s); /* NULL is a no-op */

/* The FFN of layer il for the n_tok rows of ctx->xb (already normed):
 * ctx->x += FFN(xb). Returns false, having changed nothing the caller
 * reads, when the dense FFN is the better choice for this batch. */
bool sparse_layer_ffn(optiml_context *ctx, int64_t n_tok, int32_t il);

/* The dense FFN's share of CATS: zeroes the gate values g of ctx->gate
 * (n_tok, n_ff, before the activation) with |act(g)| <= the layer's
 * threshold, and counts the others in optiml_context_ffn_stats. A no-op
 * unless the context runs CATS. */
void sparse_gate_cut(optiml_context *ctx, int64_t n_tok, int32_t il);

/* The same for a CATS model with the product score: zeroes h = ctx->gate
 * (after the activation) where |h_i| is at most the neuron's threshold. */
void sparse_h_cut(optiml_context *ctx, int64_t n_tok, int32_t il);

/* The predictor of layer il alone on one normed input row x (n_embd):
 * logits (n_ff). Scalar and allocation-free but for scratch given by the
 * caller: r + max(n_embd, r) floats (the hidden layer, then one dequantized
 * row of fc1 or fc2); for tests and tools that measure recall. */
void sparse_predict_row(const optiml_model *m, int32_t il, const float *x, float *scratch, float *logits);

#endif /* OPTIML_SPARSE_H */
