/*
 * bench_cuda_matmul.c - speed of the CUDA matrix products against the
 * device's own ceilings: a 1 GiB device-to-device copy (memory bandwidth)
 * and a plain cuBLAS f16 GEMM (tensor-core throughput).
 *
 * For each weight type and Llama-7B / 13B matrix shape:
 *   mmv: cu_matmul for 1 token (and 8), recorded many times into a CUDA
 *        graph (as decode runs it) over several copies of the weight so
 *        that L2 (50 MB on H100) does not hold it; median of 15 replays.
 *        GB/s counts the weight's device bytes once per call.
 *   gemm: cu_matmul_gemm for 512 tokens vs cu_gemm_f16_bench of the same
 *        shape (median of 10), in TFLOP/s (2 * tokens * n_in * n_out).
 * Weights are random bytes: the speed does not depend on the values.
 * Prints a markdown table. Exit 77 without a CUDA device.
 */
#define _POSIX_C_SOURCE 199309L
#include "cuda/cuda.h"
#include "dtype.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MUST(call)                                                                               \
    do {                                                                                         \
        optiml_status must_st_ = (call);                                                         \
        if (must_st_ != OPTIML_OK) {                                                             \
            fprintf(stderr, "FATAL: %s failed: %s\n", #call, optiml_last_error());              \
            exit(1);                                                                             \
        }                                                                                        \
    } while (0)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}
static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    return v[n / 2];
}

static uint64_t rng_state = 88172645463325252ull;
static uint64_t rng(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* Bytes read + written per second of a 1 GiB device copy. */
static double copy_bandwidth(cu_ctx *cu) {
    const uint64_t n = 1ull << 30;
    void *a, *b;
    MUST(cu_malloc(cu, n, &a));
    MUST(cu_malloc(cu, n, &b));
    MUST(cu_memset(cu, a, 1, n));
    MUST(cu_copy_d2d(cu, b, a, n)); /* warm up */
    MUST(cu_sync(cu));
    double t[9];
    for (int r = 0; r < 9; r++) {
        const double t0 = now_s();
        MUST(cu_copy_d2d(cu, b, a, n));
        MUST(cu_sync(cu));
        t[r] = now_s() - t0;
    }
    cu_dfree(a);
    cu_dfree(b);
    return 2.0 * (double)n / median(t, 9);
}

/* Median seconds per cu_matmul of n_tok tokens, replayed from a graph
 * that cycles through the weight copies. */
static double time_mmv(cu_ctx *cu, cu_weight *w, int n_copies, const float *x, float *y, int64_t n_tok) {
    int calls = n_copies;
    while (calls * (double)w->bytes < 2e9) calls += n_copies; /* ~1 ms of traffic or more */
    if (calls > 4096) calls = 4096;
    cu_graph *g = NULL;
    MUST(cu_graph_begin(cu));
    for (int i = 0; i < calls; i++) MUST(cu_matmul(cu, &w[i % n_copies], x, n_tok, y, false));
    MUST(cu_graph_end(cu, &g));
    MUST(cu_graph_launch(cu, g)); /* warm up */
    MUST(cu_sync(cu));
    double t[15];
    for (int r = 0; r < 15; r++) {
        const double t0 = now_s();
        MUST(cu_graph_launch(cu, g));
        MUST(cu_sync(cu));
        t[r] = (now_s() - t0) / calls;
    }
    cu_graph_free(g);
    return median(t, 15);
}

static double time_gemm(cu_ctx *cu, cu_weight *w, const float *x, float *y, int64_t n_tok) {
    MUST(cu_matmul_gemm(cu, w, x, n_tok, y, false));
    MUST(cu_sync(cu));
    double t[10];
    for (int r = 0; r < 10; r++) {
        const double t0 = now_s();
        MUST(cu_matmul_gemm(cu, w, x, n_tok, y, false));
        MUST(cu_sync(cu));
        t[r] = now_s() - t0;
    }
    return median(t, 10);
}

static double time_f16_gemm(cu_ctx *cu, const void *a, const void *b, float *c, int64_t m, int64_t n, int64_t k) {
    MUST(cu_gemm_f16_bench(cu, a, b, c, m, n, k));
    MUST(cu_sync(cu));
    double t[10];
    for (int r = 0; r < 10; r++) {
        const double t0 = now_s();
        MUST(cu_gemm_f16_bench(cu, a, b, c, m, n, k));
        MUST(cu_sync(cu));
        t[r] = now_s() - t0;
    }
    return median(t, 10);
}

int main(void) {
    if (cu_device_count() == 0) {
        printf("bench_cuda_matmul: no CUDA device, skipped\n");
        return 77;
    }
    cu_ctx *cu;
    MUST(cu_init(0, &cu));
    const int64_t max_tok = 512, max_in = 13824, max_out = 32000;
    MUST(cu_matmul_reserve(cu, max_tok, max_in, max_out, NULL));
    const double copy_bw = copy_bandwidth(cu);
    printf("device: %s\ndevice copy (1 GiB, read + write): %.0f GB/s\n\n", cu_device_name(cu), copy_bw / 1e9);

    float *x, *y;
    void *ah, *bh;
    MUST(cu_malloc(cu, (uint64_t)max_tok * max_in * sizeof(float), (void **)&x));
    MUST(cu_malloc(cu, (uint64_t)max_tok * max_out * sizeof(float), (void **)&y));
    MUST(cu_malloc(cu, (uint64_t)max_tok * max_in * 2, &ah));
    MUST(cu_malloc(cu, (uint64_t)max_out * max_in * 2, &bh));
    MUST(cu_memset(cu, ah, 0x3c, (uint64_t)max_tok * max_in * 2)); /* f16 ~1.0 */
    MUST(cu_memset(cu, bh, 0x2c, (uint64_t)max_out * max_in * 2)); /* f16 ~0.06 */
    {
        float *hx = malloc((size_t)max_tok * max_in * sizeof(float));
        if (!hx) return 1;
        for (int64_t i = 0; i < max_tok * max_in; i++) hx[i] = (float)((rng() >> 40) * (1.0 / 8388608.0)) - 1.0f;
        MUST(cu_upload(cu, x, hx, (uint64_t)max_tok * max_in * sizeof(float)));
        MUST(cu_sync(cu));
        free(hx);
    }

    static const uint32_t types[] = {DTYPE_Q4_0, DTYPE_Q4_K, DTYPE_Q6_K, DTYPE_Q8_0, DTYPE_F16};
    static const struct {
        const char *model;
        int64_t n_in, n_out;
    } shapes[] = {
        {"7B", 4096, 4096},   {"7B", 4096, 11008},  {"7B", 11008, 4096},  {"7B", 4096, 32000},
        {"13B", 5120, 5120},  {"13B", 5120, 13824}, {"13B", 13824, 5120}, {"13B", 5120, 32000},
    };
    printf("| type | model | n_in x n_out | MiB | mmv 1 tok us | GB/s | %% of copy | mmv 8 tok us | gemm 512 TFLOP/s "
           "| cuBLAS f16 TFLOP/s | ratio |\n");
    printf("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++)
        for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
            const uint32_t type = types[ti];
            const int64_t n_in = shapes[si].n_in, n_out = shapes[si].n_out;
            uint64_t row;
            if (!dtype_row_size(type, (uint64_t)n_in, &row)) return 1;
            const uint64_t host_bytes = row * (uint64_t)n_out;
            uint8_t *host = malloc(host_bytes);
            if (!host) return 1;
            for (uint64_t i = 0; i + 8 <= host_bytes; i += 8) {
                const uint64_t r = rng() & 0x3bff3bff3bff3bffull; /* no f16 inf/NaN where scales land */
                memcpy(host + i, &r, 8);
            }
            const uint64_t dev_bytes = cu_weight_bytes(type, n_in, n_out);
            int n_copies = (int)(150e6 / (double)dev_bytes) + 1; /* > 3x L2 in all */
            if (n_copies < 2) n_copies = 2;
            cu_weight w[64];
            if (n_copies > 64) n_copies = 64;
            void *staging;
            MUST(cu_host_alloc(64u << 20, &staging));
            for (int c = 0; c < n_copies; c++)
                MUST(cu_weight_upload(cu, type, n_in, n_out, host, staging, 64u << 20, &w[c]));
            cu_host_free(staging);
            free(host);

            const double t1 = time_mmv(cu, w, n_copies, x, y, 1);
            const double t8 = time_mmv(cu, w, n_copies, x, y, 8);
            const double tg = time_gemm(cu, &w[0], x, y, max_tok);
            const double tf = time_f16_gemm(cu, ah, bh, y, max_tok, n_out, n_in);
            const double flop = 2.0 * (double)max_tok * (double)n_in * (double)n_out;
            const double gbs = (double)dev_bytes / t1;
            printf("| %s | %s | %lld x %lld | %.1f | %.1f | %.0f | %.0f%% | %.1f | %.1f | %.1f | %.2f |\n",
                   dtype_name(type), shapes[si].model, (long long)n_in, (long long)n_out, dev_bytes / 1048576.0,
                   t1 * 1e6, gbs / 1e9, 100.0 * gbs / copy_bw, t8 * 1e6, flop / tg / 1e12, flop / tf / 1e12, tf / tg);
            fflush(stdout);
            for (int c = 0; c < n_copies; c++) cu_weight_free(&w[c]);
        }
    cu_dfree(x);
    cu_dfree(y);
    cu_dfree(ah);
    cu_dfree(bh);
    cu_free(cu);
    return 0;
}
