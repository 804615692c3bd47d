/*
 * common.cuh - shared by the .cu files behind cuda.h: the cu_ctx struct,
 * error checking, and small device helpers. Not included by C code.
 */
#ifndef OPTIML_CUDA_COMMON_CUH
#define OPTIML_CUDA_COMMON_CUH

extern "C" {
#include "../common.h"
#include "../dtype.h"
#include "../quant.h"
}
#include "cuda.h"

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <utility>

struct cu_ctx {
    int device;
    cudaStream_t stream;
    cublasHandle_t cublas;
    char name[256];
    int n_sm;
    int cc;         /* compute capability, 10 major + minor */
    int smem_optin; /* shared memory bytes a block may opt in to */
    struct cu_tuning tune;
    /* matmul scratch (cu_matmul_reserve) */
    int64_t mm_batch, mm_in_max, mm_out_max;
    void *mm_xq;     /* activations quantized to 8 bits   */
    void *mm_xh;     /* activations as f16                */
    void *mm_wh;     /* a dequantized f16 weight chunk    */
    void *mm_xf;     /* activations after an input step (f32) */
    uint64_t mm_wh_elems;
    uint64_t mm_bytes;
    /* decode attention kernel 3: per (token, head) count of finished splits,
     * zero between calls (the last block resets its counter) */
    unsigned *att_done;
};

/* Activations quantized to 8 bits in the matmul scratch (cu_matmul_reserve):
 * n_tok rows of n_in int8 quants, then per row n_in / 32 (scale, sum of the
 * quants) pairs. Written by mm_inq_kernel or the decode attention. */
static inline void cu_mm_q8_ptrs(const cu_ctx *cu, int64_t n_tok, int64_t n_in, int8_t **xq, float2 **xs) {
    *xq = (int8_t *)cu->mm_xq;
    *xs = (float2 *)((uint8_t *)cu->mm_xq + (((uint64_t)(n_tok * n_in) + 15) & ~(uint64_t)15));
}

/* (token, head) pairs att_done has room for: 8 tokens x 1024 heads. */
#define CU_ATT_DONE_MAX (8 * 1024)

/* f16 values of a dequantized weight chunk for the prompt GEMM, by default:
 * 128 Mi values (256 MiB), a whole stacked q|k|v or gate|up of 7B/13B in one
 * GEMM (measured on an H200: 818 us per 7B layer at 512 tokens vs 872 with
 * 32 Mi). gpu.c asks for less when free VRAM is short. */
#define CU_GEMM_CHUNK_DEFAULT (128ll << 20)

struct cu_graph {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
};

/* Record a CUDA runtime error as an optiml status (with the call's text). */
static inline optiml_status cu_check(cudaError_t e, const char *what) {
    if (e == cudaSuccess) return OPTIML_OK;
    return optiml_fail(OPTIML_ERR_BACKEND, "CUDA: %s: %s", what, cudaGetErrorString(e));
}
static inline optiml_status cublas_check(cublasStatus_t s, const char *what) {
    if (s == CUBLAS_STATUS_SUCCESS) return OPTIML_OK;
    return optiml_fail(OPTIML_ERR_BACKEND, "cuBLAS: %s: status %d", what, (int)s);
}
#define CU_TRY(call) TRY(cu_check((call), #call))
/* After a kernel launch: the launch's own error (bad configuration, ...). */
#define CU_LAUNCHED(name) TRY(cu_check(cudaGetLastError(), name))

static inline unsigned cu_blocks(int64_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Programmatic dependent launch (sm_90, cu_tuning.pdl): a kernel launched
 * with cu_launch may start while the kernel before it on the stream is
 * still running; it must call pdl_begin() before touching any memory (it
 * waits until the previous grid has completed and its writes are visible,
 * then lets the next PDL kernel start launching). Launched normally, both
 * instructions are no-ops, so a kernel with pdl_begin() is correct either
 * way. */
__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/* kernel<<<grid, block, smem, cu->stream>>>(args...), with the
 * programmatic-serialization attribute when cu->tune.pdl is set (only for
 * kernels that start with pdl_begin()). Returns the launch's error. */
template <typename... KArgs, typename... Args>
static cudaError_t cu_launch(const cu_ctx *cu, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                             Args &&...args) {
    if (cu->tune.pdl != 1) {
        kernel<<<grid, block, smem, cu->stream>>>(std::forward<Args>(args)...);
        return cudaGetLastError();
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = cu->stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

/* act(g) * u as the CPU's ops_act_mul, term for term (act: enum ffn_act; 4
 * is relu(g) * relu(u), 5 relu(u) alone). */
__device__ __forceinline__ float cu_act_value(int act, float g, float u) {
    switch (act) {
    case 0: return g / (1.0f + expf(-g)) * u;
    case 1: return (g > 0.0f ? g : 0.0f) * u;
    case 2: {
        const float r = g > 0.0f ? g : 0.0f;
        return r * r * u;
    }
    case 4: return (g > 0.0f ? g : 0.0f) * (u > 0.0f ? u : 0.0f);
    case 5: return u > 0.0f ? u : 0.0f;
    default: {
        const float t = tanhf(0.7978845608f * (g + 0.044715f * g * g * g));
        return 0.5f * g * (1.0f + t) * u;
    }
    }
}

#endif /* OPTIML_CUDA_COMMON_CUH */
