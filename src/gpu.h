/*
 * gpu.h - layer offload to the GPU (CUDA builds): which layers live in
 * VRAM, their weights there, and the GPU part of a context's forward pass.
 * Without OPTIML_CUDA every function here is an inline no-op, so the CPU
 * build carries no CUDA code.
 *
 * Placement (llama.cpp's meaning of -ngl): n_gpu_layers = N puts the last
 * min(N, n_layer) layers on the GPU; N > n_layer (or N < 0) also puts the
 * output norm and head there (and the token embedding, so a full offload
 * runs the whole step on the GPU). vram_budget_gib > 0 picks the largest N
 * whose weights, KV cache, scratch and CUDA context fit the budget.
 */
#ifndef OPTIML_GPU_H
#define OPTIML_GPU_H

#include "context.h"

#if defined(OPTIML_CUDA)
/* Uploads the chosen layers; m->gpu stays NULL when nothing is offloaded. */
optiml_status gpu_model_load(optiml_model *m, const optiml_model_params *params);
void gpu_model_free(optiml_model *m);
/* Device buffers of a context (KV cache of the GPU layers, activations). */
optiml_status gpu_context_init(optiml_context *ctx);
void gpu_context_free(optiml_context *ctx);
/* First layer that runs on the GPU (n_layer when none does). */
int32_t gpu_first_layer(const optiml_model *m);
/* Runs the GPU layers of a batch, starting from ctx->x as the CPU layers
 * left it, then the output: on the GPU (logits into ctx->logits, with
 * ctx->logits_row / out_ids already chosen) when the head is there, else
 * *cpu_output = true and ctx->x holds the final residual stream. */
optiml_status gpu_forward(optiml_context *ctx, const optiml_batch *b, int32_t n_out, bool *cpu_output);
/* True when the token embedding lookup runs on the GPU (full offload). */
bool gpu_embeds(const optiml_model *m);
/* True when the output norm and head run on the GPU. */
bool gpu_head(const optiml_model *m);
#else
static inline optiml_status gpu_model_load(optiml_model *m, const optiml_model_params *params) {
    (void)m;
    if (params->n_gpu_layers != 0 || params->vram_budget_gib > 0.0)
        LOG_WARN("this build has no GPU backend (configure with -DOPTIML_CUBLAS=ON): running all layers on the CPU");
    return OPTIML_OK;
}
static inline void gpu_model_free(optiml_model *m) { (void)m; }
static inline optiml_status gpu_context_init(optiml_context *ctx) { (void)ctx; return OPTIML_OK; }
static inline void gpu_context_free(optiml_context *ctx) { (void)ctx; }
static inline int32_t gpu_first_layer(const optiml_model *m) { return m->hp.n_layer; }
static inline optiml_status gpu_forward(optiml_context *ctx, const optiml_batch *b, int32_t n_out, bool *cpu_output) {
    (void)ctx, (void)b, (void)n_out;
    *cpu_output = true;
    return OPTIML_OK;
}
static inline bool gpu_embeds(const optiml_model *m) { (void)m; return false; }
static inline bool gpu_head(const optiml_model *m) { (void)m; return false; }
#endif

#endif /* OPTIML_GPU_H */
