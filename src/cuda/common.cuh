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

struct cu_ctx {
    int device;
    cudaStream_t stream;
    cublasHandle_t cublas;
    char name[256];
    int n_sm;
    /* matmul scratch (cu_matmul_reserve) */
    int64_t mm_batch, mm_in_max, mm_out_max;
    void *mm_xq;     /* activations quantized to 8 bits   */
    void *mm_xh;     /* activations as f16                */
    void *mm_wh;     /* a dequantized f16 weight chunk    */
    uint64_t mm_wh_elems;
    uint64_t mm_bytes;
};

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

#endif /* OPTIML_CUDA_COMMON_CUH */
