/*
 * core.cu - device, memory, copies, streams and graphs behind cuda.h.
 */
#include "common.cuh"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" int cu_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* clear the sticky "no driver" error */
        return 0;
    }
    return n;
}

extern "C" optiml_status cu_init(int device, cu_ctx **out) {
    if (!out) return optiml_fail(OPTIML_ERR_INVALID_ARG, "cu_init: out is NULL");
    *out = NULL;
    const int n = cu_device_count();
    if (device < 0 || device >= n)
        return optiml_fail(OPTIML_ERR_BACKEND, "CUDA: device %d requested, %d present", device, n);
    cu_ctx *cu = (cu_ctx *)calloc(1, sizeof(*cu));
    if (!cu) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    cu->device = device;
    cudaDeviceProp prop;
    optiml_status st = cu_check(cudaSetDevice(device), "cudaSetDevice");
    if (st == OPTIML_OK) st = cu_check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    if (st == OPTIML_OK) {
        snprintf(cu->name, sizeof(cu->name), "%s", prop.name);
        cu->n_sm = prop.multiProcessorCount;
        cu->cc = 10 * prop.major + prop.minor;
        cu->smem_optin = (int)prop.sharedMemPerBlockOptin;
        cu->tune.mmv_variant = 1;
        cu->tune.mmv_blocks_per_sm = 2;
        cu->tune.mmv_fused = 3;
        cu->tune.gemm_chunk_elems = CU_GEMM_CHUNK_DEFAULT;
        cu->tune.att_chunk_min = 64;
        cu->tune.mmv_kernel = 1; /* H200, 7B q4_0 decode: 491 tok/s vs 398 for the warp kernel */
        cu->tune.att_kernel = 3; /* 2 with the merge in its last block: one launch fewer */
        cu->tune.att_blocks_per_sm = 4;
        /* tensor cores: pp512 22.5k vs 18.8k tok/s (7B, H200) for WMMA (2);
         * mma.sync with the fragments in registers (4) needs sm_80 */
        cu->tune.att_prompt = cu->cc >= 80 ? 4 : 2;
        cu->tune.pdl = 1;        /* 411 vs 398 tok/s */
        cu->tune.mmv_block_rows = 4; /* 7B q4_0 decode 515 vs 500 (2 rows) and 492 (8), H200 */
        cu->tune.mmv_block_threads = 1; /* chosen per shape: matmul.cu mmv_threads */
        cu->tune.inq_kernel = 2; /* H200 ncu, 7B: act+quantize 7.4 us with one block per row */
        cu->tune.in_kernel = 2;  /* H200 ncu, 7B pp512: 20 us per call with a value per thread */
        st = cu_check(cudaStreamCreateWithFlags(&cu->stream, cudaStreamNonBlocking), "cudaStreamCreate");
    }
    if (st == OPTIML_OK) st = cu_check(cudaMalloc((void **)&cu->att_done, CU_ATT_DONE_MAX * sizeof(unsigned)), "cudaMalloc");
    if (st == OPTIML_OK) st = cu_check(cudaMemset(cu->att_done, 0, CU_ATT_DONE_MAX * sizeof(unsigned)), "cudaMemset");
    if (st == OPTIML_OK) st = cublas_check(cublasCreate(&cu->cublas), "cublasCreate");
    if (st == OPTIML_OK) st = cublas_check(cublasSetStream(cu->cublas, cu->stream), "cublasSetStream");
    if (st != OPTIML_OK) {
        cu_free(cu);
        return st;
    }
    *out = cu;
    return OPTIML_OK;
}

extern "C" void cu_free(cu_ctx *cu) {
    if (!cu) return;
    cudaSetDevice(cu->device);
    if (cu->stream) cudaStreamSynchronize(cu->stream);
    cudaFree(cu->mm_xq);
    cudaFree(cu->mm_xh);
    cudaFree(cu->mm_wh);
    cudaFree(cu->mm_xf);
    cudaFree(cu->att_done);
    if (cu->cublas) cublasDestroy(cu->cublas);
    if (cu->stream) cudaStreamDestroy(cu->stream);
    free(cu);
}

extern "C" void cu_set_tuning(cu_ctx *cu, const struct cu_tuning *t) {
    if (t->mmv_variant >= 1 && t->mmv_variant <= 3) cu->tune.mmv_variant = t->mmv_variant;
    if (t->mmv_blocks_per_sm > 0) cu->tune.mmv_blocks_per_sm = t->mmv_blocks_per_sm;
    if (t->mmv_fused >= 1 && t->mmv_fused <= 3) cu->tune.mmv_fused = t->mmv_fused;
    if (t->mmv_kernel >= 1 && t->mmv_kernel <= 3) cu->tune.mmv_kernel = t->mmv_kernel;
    if (t->att_kernel >= 1 && t->att_kernel <= 3) cu->tune.att_kernel = t->att_kernel;
    if (t->att_prompt >= 1 && t->att_prompt <= 4) cu->tune.att_prompt = t->att_prompt;
    if (t->pdl == 1 || t->pdl == 2) cu->tune.pdl = t->pdl;
    if (t->mmv_block_rows == 2 || t->mmv_block_rows == 4 || t->mmv_block_rows == 8)
        cu->tune.mmv_block_rows = t->mmv_block_rows;
    if (t->mmv_block_threads == 1 ||
        (t->mmv_block_threads >= 32 && t->mmv_block_threads <= 512 && t->mmv_block_threads % 32 == 0))
        cu->tune.mmv_block_threads = t->mmv_block_threads;
    if (t->inq_kernel == 1 || t->inq_kernel == 2) cu->tune.inq_kernel = t->inq_kernel;
    if (t->in_kernel == 1 || t->in_kernel == 2) cu->tune.in_kernel = t->in_kernel;
    if (t->att_blocks_per_sm >= 1 && t->att_blocks_per_sm <= 16) cu->tune.att_blocks_per_sm = t->att_blocks_per_sm;
    if (t->gemm_chunk_elems > 0) cu->tune.gemm_chunk_elems = t->gemm_chunk_elems;
    if (t->att_chunk_min >= 64 && t->att_chunk_min <= 256 && (t->att_chunk_min & (t->att_chunk_min - 1)) == 0)
        cu->tune.att_chunk_min = t->att_chunk_min;
}

extern "C" void cu_get_tuning(const cu_ctx *cu, struct cu_tuning *t) { *t = cu->tune; }

extern "C" const char *cu_device_name(const cu_ctx *cu) { return cu ? cu->name : ""; }

extern "C" optiml_status cu_mem_info(cu_ctx *cu, uint64_t *free_bytes, uint64_t *total_bytes) {
    size_t f = 0, t = 0;
    CU_TRY(cudaSetDevice(cu->device));
    CU_TRY(cudaMemGetInfo(&f, &t));
    if (free_bytes) *free_bytes = f;
    if (total_bytes) *total_bytes = t;
    return OPTIML_OK;
}

extern "C" optiml_status cu_malloc(cu_ctx *cu, uint64_t n, void **dev) {
    *dev = NULL;
    if (n == 0) n = 1;
    cudaError_t e = cudaMalloc(dev, n);
    if (e != cudaSuccess) {
        *dev = NULL;
        cudaGetLastError();
        return optiml_fail(e == cudaErrorMemoryAllocation ? OPTIML_ERR_NOMEM : OPTIML_ERR_BACKEND,
                           "CUDA: cannot allocate %.1f MiB on %s: %s", n / 1048576.0, cu->name, cudaGetErrorString(e));
    }
    return OPTIML_OK;
}

extern "C" void cu_dfree(void *dev) {
    if (dev) cudaFree(dev);
}

extern "C" optiml_status cu_host_alloc(uint64_t n, void **host) {
    *host = NULL;
    cudaError_t e = cudaMallocHost(host, n ? n : 1);
    if (e != cudaSuccess) {
        *host = NULL;
        cudaGetLastError();
        return optiml_fail(OPTIML_ERR_NOMEM, "CUDA: cannot allocate %.1f MiB of pinned host memory: %s",
                           n / 1048576.0, cudaGetErrorString(e));
    }
    return OPTIML_OK;
}

extern "C" void cu_host_free(void *host) {
    if (host) cudaFreeHost(host);
}

extern "C" optiml_status cu_upload(cu_ctx *cu, void *dev, const void *host, uint64_t n) {
    if (n == 0) return OPTIML_OK;
    return cu_check(cudaMemcpyAsync(dev, host, n, cudaMemcpyHostToDevice, cu->stream), "upload");
}

extern "C" optiml_status cu_download(cu_ctx *cu, void *host, const void *dev, uint64_t n) {
    if (n == 0) return OPTIML_OK;
    return cu_check(cudaMemcpyAsync(host, dev, n, cudaMemcpyDeviceToHost, cu->stream), "download");
}

extern "C" optiml_status cu_copy_d2d(cu_ctx *cu, void *dst, const void *src, uint64_t n) {
    if (n == 0) return OPTIML_OK;
    return cu_check(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, cu->stream), "device copy");
}

extern "C" optiml_status cu_memset(cu_ctx *cu, void *dev, int value, uint64_t n) {
    if (n == 0) return OPTIML_OK;
    return cu_check(cudaMemsetAsync(dev, value, n, cu->stream), "memset");
}

extern "C" optiml_status cu_sync(cu_ctx *cu) { return cu_check(cudaStreamSynchronize(cu->stream), "synchronize"); }

extern "C" optiml_status cu_graph_begin(cu_ctx *cu) {
    return cu_check(cudaStreamBeginCapture(cu->stream, cudaStreamCaptureModeThreadLocal), "begin capture");
}

extern "C" optiml_status cu_graph_end(cu_ctx *cu, cu_graph **out) {
    *out = NULL;
    cudaGraph_t g = NULL;
    TRY(cu_check(cudaStreamEndCapture(cu->stream, &g), "end capture"));
    cu_graph *cg = (cu_graph *)calloc(1, sizeof(*cg));
    if (!cg) {
        cudaGraphDestroy(g);
        return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    }
    cg->graph = g;
    optiml_status st = cu_check(cudaGraphInstantiate(&cg->exec, g, 0), "instantiate graph");
    if (st != OPTIML_OK) {
        cu_graph_free(cg);
        return st;
    }
    *out = cg;
    return OPTIML_OK;
}

extern "C" optiml_status cu_graph_launch(cu_ctx *cu, cu_graph *g) {
    return cu_check(cudaGraphLaunch(g->exec, cu->stream), "graph launch");
}

extern "C" void cu_graph_free(cu_graph *g) {
    if (!g) return;
    if (g->exec) cudaGraphExecDestroy(g->exec);
    if (g->graph) cudaGraphDestroy(g->graph);
    free(g);
}

struct cu_timer {
    int n;
    cudaEvent_t *ev;
};

extern "C" optiml_status cu_timer_init(int n_slots, cu_timer **out) {
    *out = NULL;
    cu_timer *t = (cu_timer *)calloc(1, sizeof(*t));
    if (!t || !(t->ev = (cudaEvent_t *)calloc((size_t)n_slots, sizeof(cudaEvent_t)))) {
        free(t);
        return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    }
    for (int i = 0; i < n_slots; i++) {
        optiml_status st = cu_check(cudaEventCreate(&t->ev[i]), "cudaEventCreate");
        if (st != OPTIML_OK) {
            cu_timer_free(t);
            return st;
        }
        t->n = i + 1;
    }
    *out = t;
    return OPTIML_OK;
}

extern "C" void cu_timer_free(cu_timer *t) {
    if (!t) return;
    for (int i = 0; i < t->n; i++) cudaEventDestroy(t->ev[i]);
    free(t->ev);
    free(t);
}

extern "C" optiml_status cu_timer_mark(cu_ctx *cu, cu_timer *t, int slot) {
    if (slot < 0 || slot >= t->n) return optiml_fail(OPTIML_ERR_INVALID_ARG, "cu_timer_mark: slot %d of %d", slot, t->n);
    return cu_check(cudaEventRecord(t->ev[slot], cu->stream), "cudaEventRecord");
}

extern "C" float cu_timer_ms(cu_timer *t, int a, int b) {
    float ms = 0.0f;
    if (a < 0 || b < 0 || a >= t->n || b >= t->n || cudaEventElapsedTime(&ms, t->ev[a], t->ev[b]) != cudaSuccess) {
        cudaGetLastError();
        return -1.0f;
    }
    return ms;
}
