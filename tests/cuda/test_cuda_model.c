/*
 * test_cuda_model.c - whole-model logits with layers on the GPU against the
 * CPU forward pass of the same file (GPU machine only; run by
 * tests/cuda/run_gpu_tests.sh).
 *
 *   test_cuda_model TOL MODEL.gguf[:REF.gguf] [...]
 *
 * For each model and each -ngl in {1, n_layer/2, n_layer, n_layer + 1}:
 * a 24-token prompt (logits for every entry: the GEMM path), 12 single-token
 * steps (the matrix-vector path and the captured graph), then a batch that
 * mixes two sequences (seq 1 copies seq 0's prefix, then diverges), all
 * compared with the CPU run of the same calls: relative error
 * ||gpu - cpu|| / ||cpu|| per logits row must stay under TOL, and the
 * greedy token must agree where the CPU's top two logits differ by more
 * than the error.
 *
 * With MODEL:REF (REF = the same weights dequantized to f32 by
 * optiml-quantize --type f32), the GPU and the CPU are both measured
 * against the CPU run of REF, the exact product of the stored weights:
 * quantized models differ between the two devices because each quantizes
 * activations to 8 bits its own way (q8_1 blocks of 32 on the GPU, q8_0 /
 * q8_1 / q8_k on the CPU), and neither is the right answer. A row passes
 * when err(gpu, ref) <= TOL * err(cpu, ref) + 1e-4: the GPU is about as
 * accurate as the CPU. Exit 0 pass, 1 fail, 77 no GPU.
 */
#include "optiml.h"
#include "cuda/cuda.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_PROMPT 24
#define N_STEPS 12

static int g_fail;

struct run {
    optiml_model *model;
    optiml_context *ctx;
    optiml_batch batch;
    int32_t n_vocab;
};

static int run_open(struct run *r, const char *path, int32_t ngl) {
    optiml_model_params mp = optiml_model_default_params();
    mp.n_gpu_layers = ngl;
    if (optiml_model_load(path, &mp, &r->model) != OPTIML_OK) return -1;
    optiml_context_params cp = optiml_context_default_params();
    cp.n_ctx = 128;
    cp.n_batch = 64;
    cp.n_seq_max = 2;
    cp.n_threads = 4;
    if (optiml_context_init(r->model, &cp, &r->ctx) != OPTIML_OK) return -1;
    r->batch = optiml_batch_init(64);
    r->n_vocab = optiml_model_n_vocab(r->model);
    return 0;
}

static void run_close(struct run *r) {
    optiml_batch_free(r->batch);
    optiml_context_free(r->ctx);
    optiml_model_free(r->model);
}

static double rel_err(const float *a, const float *ref, int32_t n, double *scale) {
    double d = 0, s = 0;
    *scale = 0;
    for (int32_t i = 0; i < n; i++) {
        double e = (double)a[i] - ref[i];
        d += e * e;
        s += (double)ref[i] * ref[i];
        if (a[i] != a[i]) return INFINITY;
    }
    *scale = sqrt(s / n);
    return s > 0 ? sqrt(d / s) : sqrt(d);
}

static int32_t argmax(const float *x, int32_t n, float *gap) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    float second = -INFINITY;
    for (int32_t i = 0; i < n; i++)
        if (i != best && x[i] > second) second = x[i];
    *gap = x[best] - second;
    return best;
}

/* Decode the same batch on both runs and compare every logits row. */
static int step(struct run *cpu, struct run *gpu, struct run *ref, int32_t n, const int32_t *tok,
                const int32_t *pos, const int32_t *seq, const char *what, double tol, double *worst) {
    struct run *rs[3] = {cpu, gpu, ref};
    for (int k = 0; k < (ref ? 3 : 2); k++) {
        optiml_batch *b = &rs[k]->batch;
        b->n_tokens = n;
        for (int32_t i = 0; i < n; i++) {
            b->token[i] = tok[i];
            b->pos[i] = pos[i];
            b->seq_id[i] = seq[i];
            b->logits[i] = 1;
        }
        if (optiml_decode(rs[k]->ctx, b) != OPTIML_OK) {
            printf("FAIL %s: decode (%s): %s\n", what, k == 1 ? "gpu" : k ? "ref" : "cpu", optiml_last_error());
            g_fail++;
            return -1;
        }
    }
    for (int32_t i = 0; i < n; i++) {
        const float *lc = optiml_get_logits_ith(cpu->ctx, i), *lg = optiml_get_logits_ith(gpu->ctx, i);
        double scale = 0;
        double e = rel_err(lg, lc, cpu->n_vocab, &scale);
        if (ref) {
            const float *lr = optiml_get_logits_ith(ref->ctx, i);
            double s2;
            const double e_gpu = rel_err(lg, lr, cpu->n_vocab, &s2), e_cpu = rel_err(lc, lr, cpu->n_vocab, &s2);
            const double ratio = e_gpu / (e_cpu + 1e-4 / tol);
            if (ratio > *worst) *worst = ratio;
            if (!(e_gpu <= tol * e_cpu + 1e-4)) {
                printf("FAIL %s row %d: err vs exact: gpu %.3g, cpu %.3g (gpu must be <= %.2f x cpu + 1e-4)\n", what,
                       i, e_gpu, e_cpu, tol);
                g_fail++;
                return -1;
            }
            continue;
        }
        if (e > *worst) *worst = e;
        float gap_c, gap_g;
        int32_t ac = argmax(lc, cpu->n_vocab, &gap_c), ag = argmax(lg, cpu->n_vocab, &gap_g);
        bool argmax_bad = ac != ag && gap_c > 4 * e * scale + 1e-6;
        if (!(e <= tol) || argmax_bad) {
            printf("FAIL %s row %d: rel err %.3g (tol %.3g), argmax cpu %d gpu %d (cpu gap %.3g)\n", what, i, e, tol,
                   ac, ag, gap_c);
            g_fail++;
            return -1;
        }
    }
    return 0;
}

static void check_model(const char *path, const char *ref_path, int32_t ngl, double tol) {
    struct run cpu = {0}, gpu = {0}, ref_run = {0};
    struct run *ref = ref_path ? &ref_run : NULL;
    char what[4200];
    if (run_open(&cpu, path, 0) || run_open(&gpu, path, ngl) || (ref && run_open(ref, ref_path, 0))) {
        printf("FAIL %s -ngl %d: open: %s\n", path, ngl, optiml_last_error());
        g_fail++;
        goto done;
    }
    const int32_t on_gpu = optiml_model_n_gpu_layers(gpu.model);
    double worst = 0;
    uint64_t rng = 0x9E3779B97F4A7C15ull ^ (uint64_t)ngl;
    int32_t tok[64], pos[64], seq[64];
    for (int32_t i = 0; i < N_PROMPT; i++) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        tok[i] = (int32_t)((rng >> 33) % (uint64_t)cpu.n_vocab);
        pos[i] = i;
        seq[i] = 0;
    }
    snprintf(what, sizeof(what), "%s -ngl %d prompt", path, ngl);
    if (step(&cpu, &gpu, ref, N_PROMPT, tok, pos, seq, what, tol, &worst)) goto done;
    /* greedy steps from the CPU's choice, so both runs see the same tokens */
    int32_t next = tok[N_PROMPT - 1];
    for (int32_t s = 0; s < N_STEPS; s++) {
        float gap;
        next = argmax(optiml_get_logits_ith(cpu.ctx, s == 0 ? N_PROMPT - 1 : 0), cpu.n_vocab, &gap);
        int32_t p = N_PROMPT + s, q = 0;
        snprintf(what, sizeof(what), "%s -ngl %d step %d", path, ngl, s);
        if (step(&cpu, &gpu, ref, 1, &next, &p, &q, what, tol, &worst)) goto done;
    }
    /* sequence 1 shares the first 10 cells of sequence 0, then a mixed batch */
    struct run *rs[3] = {&cpu, &gpu, ref};
    for (int k = 0; k < (ref ? 3 : 2); k++) {
        optiml_kv_seq_copy(rs[k]->ctx, 0, 1);
        optiml_kv_seq_truncate(rs[k]->ctx, 1, 10);
    }
    for (int32_t i = 0; i < 6; i++) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        tok[i] = (int32_t)((rng >> 33) % (uint64_t)cpu.n_vocab);
        seq[i] = i % 2;
        pos[i] = seq[i] == 0 ? N_PROMPT + N_STEPS + i / 2 : 10 + i / 2;
    }
    snprintf(what, sizeof(what), "%s -ngl %d two sequences", path, ngl);
    if (step(&cpu, &gpu, ref, 6, tok, pos, seq, what, tol, &worst)) goto done;
    if (ref)
        printf("PASS %s -ngl %d (%d on the GPU): worst err(gpu, exact) / err(cpu, exact) %.3g (tol %.3g)\n", path,
               ngl, on_gpu, worst, tol);
    else
        printf("PASS %s -ngl %d (%d on the GPU): worst rel err %.3g (tol %.3g)\n", path, ngl, on_gpu, worst, tol);
done:
    run_close(&cpu);
    run_close(&gpu);
    if (ref) run_close(ref);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: test_cuda_model TOL MODEL.gguf [MODEL.gguf ...]\n");
        return 2;
    }
    if (cu_device_count() == 0) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    optiml_log_set(NULL, NULL, OPTIML_LOG_LEVEL_WARN);
    const double tol = atof(argv[1]);
    for (int i = 2; i < argc; i++) {
        char path[4096];
        snprintf(path, sizeof(path), "%s", argv[i]);
        char *colon = strchr(path, ':');
        const char *ref = NULL;
        if (colon) {
            *colon = '\0';
            ref = colon + 1;
        }
        optiml_model *m = NULL;
        if (optiml_model_load(path, NULL, &m) != OPTIML_OK) {
            printf("FAIL %s: %s\n", path, optiml_last_error());
            g_fail++;
            continue;
        }
        const int32_t nl = optiml_model_n_layer(m);
        optiml_model_free(m);
        const int32_t ngls[4] = {1, nl / 2 > 1 ? nl / 2 : 2, nl, nl + 1};
        for (int k = 0; k < 4; k++) check_model(path, ref, ngls[k], tol);
    }
    printf("%s: %d failure(s)\n", g_fail ? "FAILED" : "ALL PASSED", g_fail);
    return g_fail ? 1 : 0;
}
