/*
 * cuda.h - the one door from the C library into CUDA (built only with
 * -DOPTIML_CUBLAS=ON). Everything here is plain C; the .cu files behind it
 * hold the kernels, cuBLAS calls and CUDA runtime calls.
 *
 * Conventions
 *   - Every function that can fail returns an optiml_status and records
 *     the reason with optiml_fail() (CUDA's error string included). A kernel
 *     launch is checked with cudaGetLastError() right after the launch.
 *   - All work is enqueued on the stream of the cu_ctx and is asynchronous
 *     with respect to the host, except cu_sync() and the *_sync helpers.
 *   - "dev" pointers are device memory; "host" pointers are host memory
 *     (pinned when it says so). Matrices are row-major, GGUF order: a
 *     weight of n_in x n_out has n_out rows of n_in values; activations
 *     are (n_tok, n) row-major f32.
 *   - Nothing allocates per token: scratch is reserved once
 *     (cu_matmul_reserve, cu_attention_scratch_bytes).
 *   - Functions used inside a captured CUDA graph (cu_graph_begin/end) take
 *     every value that changes between steps from device memory (struct
 *     cu_batch), never from host arguments.
 */
#ifndef OPTIML_CUDA_H
#define OPTIML_CUDA_H

#include "optiml.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cu_ctx cu_ctx;     /* device, stream, cuBLAS handle, scratch */
typedef struct cu_graph cu_graph; /* an instantiated CUDA graph             */

/* ---- device, memory, streams --------------------------------------------- */

/* Number of CUDA devices (0 when there is no driver or no device; never an
 * error: the caller falls back to the CPU). */
int cu_device_count(void);
/* Opens device `device`: a stream, a cuBLAS handle bound to it. */
optiml_status cu_init(int device, cu_ctx **out);
void cu_free(cu_ctx *cu); /* NULL is a no-op; frees the reserved scratch */
/* Device name ("NVIDIA H100 80GB HBM3") and free/total memory in bytes. */
const char *cu_device_name(const cu_ctx *cu);
optiml_status cu_mem_info(cu_ctx *cu, uint64_t *free_bytes, uint64_t *total_bytes);

optiml_status cu_malloc(cu_ctx *cu, uint64_t n, void **dev); /* cudaMalloc */
void cu_dfree(void *dev);                                    /* NULL is a no-op */
optiml_status cu_host_alloc(uint64_t n, void **host);         /* pinned host memory */
void cu_host_free(void *host);
/* Asynchronous copies on the context's stream (the host side should be
 * pinned for true asynchrony; pageable memory works, synchronously). */
optiml_status cu_upload(cu_ctx *cu, void *dev, const void *host, uint64_t n);
optiml_status cu_download(cu_ctx *cu, void *host, const void *dev, uint64_t n);
optiml_status cu_copy_d2d(cu_ctx *cu, void *dst, const void *src, uint64_t n);
optiml_status cu_memset(cu_ctx *cu, void *dev, int value, uint64_t n);
/* Waits until everything enqueued so far has finished. */
optiml_status cu_sync(cu_ctx *cu);

/* Stream capture: every cu_* call between begin and end is recorded, not
 * run; end instantiates the graph. cu_graph_launch replays it. */
optiml_status cu_graph_begin(cu_ctx *cu);
optiml_status cu_graph_end(cu_ctx *cu, cu_graph **out);
optiml_status cu_graph_launch(cu_ctx *cu, cu_graph *g);
void cu_graph_free(cu_graph *g); /* NULL is a no-op */

/* Event timing on the context's stream (the OPTIML_CUDA_PROFILE report of
 * gpu.c, benchmarks): cu_timer_mark records event `slot`; after cu_sync,
 * cu_timer_ms gives the milliseconds between two recorded slots. */
typedef struct cu_timer cu_timer;
optiml_status cu_timer_init(int n_slots, cu_timer **out);
void cu_timer_free(cu_timer *t); /* NULL is a no-op */
optiml_status cu_timer_mark(cu_ctx *cu, cu_timer *t, int slot);
float cu_timer_ms(cu_timer *t, int a, int b);

/* ---- weights ------------------------------------------------------------- */

/* A weight matrix in VRAM. The layout on the device may differ from the
 * GGUF blocks (e.g. q4_0/q8_0 scales and quants split into two arrays for
 * 16-byte loads); only the kernels behind this header read it. */
typedef struct cu_weight {
    uint32_t type;   /* enum dtype of the source                */
    int64_t n_in;    /* row length                              */
    int64_t n_out;   /* rows                                    */
    void *dev;       /* device data (cu_weight_bytes of it)     */
    uint64_t bytes;  /* bytes allocated on the device           */
} cu_weight;

/* True if the CUDA kernels multiply weights of this type. */
bool cu_type_supported(uint32_t type);
/* Device bytes a weight of this type and shape takes (for VRAM budgets). */
uint64_t cu_weight_bytes(uint32_t type, int64_t n_in, int64_t n_out);
/* Allocates and uploads (repacking if the device layout differs) a weight
 * from its GGUF bytes in host memory (host: n_out rows of GGUF row size).
 * Synchronous. staging: a pinned host buffer of staging_bytes bytes (>= 1
 * MiB) used to move the data; may be NULL (then pageable copies). */
optiml_status cu_weight_upload(cu_ctx *cu, uint32_t type, int64_t n_in, int64_t n_out, const void *host,
                               void *staging, uint64_t staging_bytes, cu_weight *out);
/* One weight made of n_parts row blocks stacked in order (wq|wk|wv, gate|up):
 * part i has n_out[i] rows at host[i]; all parts share type and n_in. The
 * product then writes the parts' outputs side by side in each y row. */
optiml_status cu_weight_upload_parts(cu_ctx *cu, uint32_t type, int64_t n_in, int n_parts, const void *const *host,
                                     const int64_t *n_out, void *staging, uint64_t staging_bytes, cu_weight *out);
void cu_weight_free(cu_weight *w); /* frees w->dev; NULL or empty is a no-op */

/* ---- matrix products ----------------------------------------------------- */

/* Reserves the scratch cu_matmul needs for batches up to n_batch tokens and
 * weights with up to n_in_max inputs and n_out_max outputs (activations
 * quantized to 8 bits, f16 copies for cuBLAS, a dequantized weight chunk).
 * Returns the device bytes reserved in *bytes (may be NULL). Call before
 * cu_matmul; calling again with larger sizes grows the scratch. */
optiml_status cu_matmul_reserve(cu_ctx *cu, int64_t n_batch, int64_t n_in_max, int64_t n_out_max,
                                uint64_t *bytes);
/* Device bytes cu_matmul_reserve would take (for VRAM budgets). */
uint64_t cu_matmul_scratch_bytes(int64_t n_batch, int64_t n_in_max, int64_t n_out_max);

/* y (n_tok, n_out) = x (n_tok, n_in) W^T, or y += with accumulate.
 * Few tokens: matrix-vector kernels (activations quantized to 8 bits for the
 * quantized types); many: weights dequantized to f16 in chunks + cuBLAS
 * tensor-core GEMM with f32 accumulation. x and y are device f32. */
optiml_status cu_matmul(cu_ctx *cu, const cu_weight *w, const float *x, int64_t n_tok, float *y, bool accumulate);
/* The same, forcing one path (tests and benchmarks compare the two). */
optiml_status cu_matmul_mmv(cu_ctx *cu, const cu_weight *w, const float *x, int64_t n_tok, float *y, bool accumulate);
optiml_status cu_matmul_gemm(cu_ctx *cu, const cu_weight *w, const float *x, int64_t n_tok, float *y, bool accumulate);
/* Token-count threshold: cu_matmul uses the matrix-vector path for
 * n_tok <= this. */
int64_t cu_matmul_mmv_max_tokens(void);

/* What a fused product does to its input rows before multiplying. */
enum cu_in_kind {
    CU_IN_PLAIN = 0,   /* x as it is                                          */
    CU_IN_RMSNORM = 1, /* x / rms(x) * norm (as cu_rmsnorm)                    */
    CU_IN_ACT_MUL = 2, /* act(gate) * up (as cu_act_mul): x holds gate rows    */
};
struct cu_mm_in {
    int kind;          /* enum cu_in_kind                                            */
    int64_t ld;        /* elements between token rows of x (and of up); 0: n_in      */
    const float *norm; /* RMSNORM: (n_in) weights                                    */
    float eps;         /* RMSNORM                                                    */
    const float *up;   /* ACT_MUL: up rows (act 5, relu without gate: x not read)    */
    int act;           /* ACT_MUL: enum ffn_act (see cu_act_mul)                     */
    float thr;         /* ACT_MUL: > 0: FATReLU, gate values (up without a gate)
                        * <= thr become 0 before the activation                      */
};
/* y (n_tok rows, ldy apart; ldy 0: n_out) = in(x) W^T, or y += with
 * accumulate. Few tokens of a quantized weight: one kernel reads the f32
 * rows, applies `in`, quantizes them to 8 bits in shared memory and runs the
 * matrix-vector product; otherwise the input step runs once into scratch
 * (f16 for the GEMM path) and the product follows. in: NULL is plain.
 * Same scratch as cu_matmul (cu_matmul_reserve). */
optiml_status cu_matmul_ex(cu_ctx *cu, const cu_weight *w, const float *x, const struct cu_mm_in *in, int64_t n_tok,
                           float *y, int64_t ldy, bool accumulate);

/* Tuning knobs for benchmarks (defaults are the measured best); zero
 * fields keep the current value. */
struct cu_tuning {
    int mmv_variant;         /* fused 1-token kernel: 1 = 2 rows x 4 chunks in flight per
                              * lane, 2 = 1 row x 8, 3 = 4 rows x 2                    */
    int mmv_blocks_per_sm;   /* grid of the fused kernel: SMs times this (then a loop)  */
    int mmv_fused;           /* cu_matmul_ex with few tokens of a quantized weight:
                              * 1: the fused kernel (input step in every block);
                              * 2: input step into f32 scratch, quantize, product;
                              * 3 (default): one kernel does the input step and the
                              * 8-bit quantization into scratch, then the product      */
    int64_t gemm_chunk_elems;/* f16 values of a dequantized weight chunk (applies at
                              * the next cu_matmul_reserve)                             */
    int att_chunk_min;       /* decode attention kernel 1: cells per block at least this
                              * (64, 128, 256): fewer blocks at short contexts          */
    int mmv_kernel;          /* matrix-vector product over pre-quantized x: 1 (default)
                              * = a block of 128 threads per R rows; 2 = a warp per R
                              * rows, U 16-byte loads per lane in flight (mmv_variant
                              * picks R x U as for the fused kernel); 3 = one token:
                              * a persistent grid (what is resident at once) looping
                              * over row groups, a thread per chunk, next loads issued
                              * before the reduction (other token counts: kernel 1)    */
    int att_kernel;          /* decode attention: 1 = fixed chunks per block (cells
                              * scanned a warp per cell); 2 (default) = the used cells
                              * split evenly over att_blocks_per_sm * SMs blocks, tiles
                              * of 64 cells, 4 threads per cell, online softmax; 3 =
                              * kernel 2 whose last block per (token, head) merges the
                              * splits (no second launch)                              */
    int att_blocks_per_sm;   /* decode attention kernel 2: blocks per SM wanted (1..16) */
    int att_prompt;          /* prompt attention: 1 = f32 CUDA cores; 2 = f16 tensor
                              * cores (WMMA, f32 accumulation; head_dim 64 or 128,
                              * else 1); 3 = 2 with the K/V tile loaded a float4 at a
                              * time (a comparison point: bench/RESULTS.md); 4 (default
                              * from sm_80, else 2) = f16 tensor cores through
                              * mma.sync with scores, weights and output in registers */
    int pdl;                 /* 1 (default): programmatic dependent launch for the decode
                              * kernels (input+quantize, warp mmv, rope, attention
                              * kernel 2): a kernel's launch overlaps the previous
                              * one's end; 2: off                                       */
    int mmv_block_rows;      /* block kernel (mmv_kernel 1), one token: rows per block,
                              * 2, 4 (default) or 8                                     */
    int mmv_block_threads;   /* block kernel threads: 1 (default) = chosen per shape
                              * from the kernel's occupancy (matmul.cu mmv_threads);
                              * 32..512 = a thread per chunk up to this many          */
    int inq_kernel;          /* input step + 8-bit quantization before a matrix-vector
                              * product: 1 = one block per token row; 2 (default) =
                              * blocks of 1024 values (rmsnorm: each block sums the
                              * squares of the whole row)                               */
    int in_kernel;           /* input step of the unfused paths (prompts): 1 = a value
                              * per thread in turn; 2 (default) = 8 values per thread,
                              * vector loads (aligned rows, n_in % 8 == 0)             */
};
void cu_set_tuning(cu_ctx *cu, const struct cu_tuning *t);
void cu_get_tuning(const cu_ctx *cu, struct cu_tuning *t);

/* out (n, n_embd) f32 = rows tokens[0..n) of an embedding table (a weight
 * with n_in = n_embd, n_out = n_vocab), dequantized. tokens: device. */
optiml_status cu_get_rows(cu_ctx *cu, const cu_weight *emb, const int32_t *tokens, int32_t n, float *out);

/* Plain f16 GEMM through cuBLAS, for the benchmark's ceiling:
 * C (m, n) f32 = A (m, k) f16 row-major * B (n, k)^T f16 row-major. */
optiml_status cu_gemm_f16_bench(cu_ctx *cu, const void *a, const void *b, float *c, int64_t m, int64_t n, int64_t k);

/* ---- the other ops of the Llama forward pass ------------------------------- */

/* Per-step values that change between decode steps, in device memory so a
 * captured graph reads the current ones. One pinned host copy is filled
 * and uploaded with one cu_upload before each step. */
struct cu_batch {
    const int32_t *pos;       /* (n_tok) position of each batch entry          */
    const int32_t *seq;       /* (n_tok) sequence id of each batch entry       */
    const int32_t *cell;      /* (n_tok) KV cell each entry writes             */
    const int32_t *cell_pos;  /* (n_ctx) position of each cell, -1 when free   */
    const uint64_t *cell_seq; /* (n_ctx) bit s: the cell belongs to sequence s  */
    const uint32_t *n_used;   /* (1) cells >= *n_used are all free             */
};

/* out[i] = x[rows ? rows[i] : i] / rms * w, for n_rows rows of n values.
 * rows: device or NULL. */
optiml_status cu_rmsnorm(cu_ctx *cu, float *out, const float *x, const float *w, int64_t n, int64_t n_rows,
                         const int32_t *rows, float eps);
/* gate[i] = act(gate[i]) * up[i] for n values; act is enum ffn_act
 * (0 silu, 1 relu, 2 relu2, 3 gelu-tanh, 4 drelu, 5 relu without gate),
 * the CPU's definitions. */
optiml_status cu_act_mul(cu_ctx *cu, float *gate, const float *up, int64_t n, int act);
/* Rotates q (n_tok, n_head * head_dim) and k (n_tok, n_head_kv * head_dim)
 * in place (pairs 2i, 2i+1 for i < n_rot / 2 by angle pos * inv_freq[i], as
 * ops_rope), then writes k and v rows of every entry into its cell of this
 * layer's cache: k_cache/v_cache (n_ctx, n_head_kv * head_dim) f32.
 * inv_freq: device (n_rot / 2). */
optiml_status cu_rope_store(cu_ctx *cu, float *q, float *k, const float *v, float *k_cache, float *v_cache,
                            int32_t n_tok, int32_t n_head, int32_t n_head_kv, int32_t head_dim, int32_t n_rot,
                            const float *inv_freq, const struct cu_batch *b);
/* The same from a fused q|k|v buffer: token t's q, k, v at qkv + t * ld,
 * + n_head * head_dim, + (n_head + n_head_kv) * head_dim. Rotated q goes
 * to q_out (n_tok, n_head * head_dim); k and v go to the cache only.
 * bias: NULL, or device (n_head + 2 n_head_kv) * head_dim added to each
 * token's q|k|v before the rotation (qwen2). neox: pairs (i, i + n_rot/2),
 * as ops_rope_neox. */
optiml_status cu_rope_store_qkv(cu_ctx *cu, const float *qkv, int64_t ld, float *q_out, float *k_cache,
                                float *v_cache, int32_t n_tok, int32_t n_head, int32_t n_head_kv, int32_t head_dim,
                                int32_t n_rot, const float *inv_freq, const float *bias, bool neox,
                                const struct cu_batch *b);
/* Device bytes of scratch cu_attention needs (partial results of the
 * split over the sequence). */
uint64_t cu_attention_scratch_bytes(int32_t n_batch, int32_t n_head, int32_t head_dim, uint32_t n_ctx);
/* out (n_tok, n_head * head_dim) = softmax(q K^T / sqrt(head_dim)) V per
 * token and head over the cells c < *b->n_used that belong to the token's
 * sequence and have cell_pos[c] <= the token's position (GQA: head h reads
 * kv head h / (n_head / n_head_kv)). Few tokens: the cells are split over
 * several blocks (flash-decoding) and combined; many tokens: tiled with an
 * online softmax. scratch: cu_attention_scratch_bytes bytes of device
 * memory. */
optiml_status cu_attention(cu_ctx *cu, const float *q, const float *k_cache, const float *v_cache, float *out,
                           int32_t n_tok, int32_t n_head, int32_t n_head_kv, int32_t head_dim, uint32_t n_ctx,
                           const struct cu_batch *b, void *scratch);
/* cu_attention that, where it can do so inside its kernel (decode kernel 3,
 * at most 8 tokens, head_dim a multiple of 32, matmul scratch reserved for
 * n_tok x n_head * head_dim), also leaves out quantized to 8 bits in the
 * matmul scratch, as cu_matmul_ex would quantize it, and sets *quantized;
 * cu_matmul_prequant then multiplies it (one launch fewer per layer). */
optiml_status cu_attention_q8(cu_ctx *cu, const float *q, const float *k_cache, const float *v_cache, float *out,
                              int32_t n_tok, int32_t n_head, int32_t n_head_kv, int32_t head_dim, uint32_t n_ctx,
                              const struct cu_batch *b, void *scratch, bool *quantized);
/* y (+)= w . x for the x cu_attention_q8 left quantized (n_tok <= 8 rows of
 * w->n_in values; quantized weight types). */
optiml_status cu_matmul_prequant(cu_ctx *cu, const cu_weight *w, int64_t n_tok, float *y, int64_t ldy,
                                 bool accumulate);

#ifdef __cplusplus
}
#endif

#endif /* OPTIML_CUDA_H */
