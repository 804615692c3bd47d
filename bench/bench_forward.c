/*
 * optiml-bench-forward - prompt and decode speed of a model on the CPU,
 * against the memory-bandwidth floor.
 *
 *   optiml-bench-forward -m MODEL [-p 128] [-n 64] [-r 3] [-t THREADS]
 *
 * Prompt: one batch of p random tokens. Decode: n single-token steps after
 * a one-token prompt. Each repeated r times; mean and standard deviation.
 * Floor: a decode step must read every weight once (the weight bytes of the
 * file, less the embedding table of which it reads one row, plus the output
 * head, which is the embedding when tied), divided by the read bandwidth
 * measured here with the same thread count.
 */
#define _POSIX_C_SOURCE 200809L
#include "optiml.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct bw_arg {
    const float *p;
    size_t n;
    double sum;
};

static void *bw_read(void *arg) {
    struct bw_arg *a = arg;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i + 4 <= a->n; i += 4) {
        s0 += a->p[i];
        s1 += a->p[i + 1];
        s2 += a->p[i + 2];
        s3 += a->p[i + 3];
    }
    a->sum = s0 + s1 + s2 + s3;
    return NULL;
}

/* Read bandwidth in bytes/s over a 1 GiB buffer, best of 3. */
static double measure_bandwidth(int n_threads) {
    const size_t n = (size_t)1 << 28; /* floats */
    float *buf = malloc(n * sizeof(float));
    if (!buf) return 0.0;
    for (size_t i = 0; i < n; i++) buf[i] = (float)(i & 7);
    double best = 0.0;
    pthread_t th[256];
    struct bw_arg args[256];
    if (n_threads > 256) n_threads = 256;
    for (int rep = 0; rep < 3; rep++) {
        int64_t t0 = optiml_time_us();
        for (int i = 0; i < n_threads; i++) {
            args[i] = (struct bw_arg){buf + n / n_threads * i, n / n_threads, 0.0};
            pthread_create(&th[i], NULL, bw_read, &args[i]);
        }
        double sink = 0;
        for (int i = 0; i < n_threads; i++) {
            pthread_join(th[i], NULL);
            sink += args[i].sum;
        }
        double s = (optiml_time_us() - t0) / 1e6;
        if (sink != -1.0 && n * sizeof(float) / s > best) best = n * sizeof(float) / s;
    }
    free(buf);
    return best;
}

static void stats(const double *v, int n, double *mean, double *sd) {
    double s = 0, ss = 0;
    for (int i = 0; i < n; i++) s += v[i];
    *mean = s / n;
    for (int i = 0; i < n; i++) ss += (v[i] - *mean) * (v[i] - *mean);
    *sd = n > 1 ? sqrt(ss / (n - 1)) : 0.0;
}

int main(int argc, char **argv) {
    const char *path = NULL;
    int n_prompt = 128, n_gen = 64, reps = 3, n_threads = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "-m")) path = argv[i + 1];
        else if (!strcmp(argv[i], "-p")) n_prompt = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-n")) n_gen = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-r")) reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-t")) n_threads = atoi(argv[i + 1]);
        else { fprintf(stderr, "optiml-bench-forward: unknown option '%s'\n", argv[i]); return 1; }
    }
    if (!path || n_prompt < 1 || n_gen < 1 || reps < 1 || reps > 100) {
        fprintf(stderr, "usage: optiml-bench-forward -m MODEL [-p 128] [-n 64] [-r 3] [-t THREADS]\n");
        return 1;
    }
    optiml_log_set(NULL, NULL, OPTIML_LOG_LEVEL_WARN);
    optiml_model *model = NULL;
    optiml_context *ctx = NULL;
    if (optiml_model_load(path, NULL, &model) != OPTIML_OK) {
        fprintf(stderr, "optiml-bench-forward: %s\n", optiml_last_error());
        return 1;
    }
    optiml_context_params cp = optiml_context_default_params();
    cp.n_ctx = (uint32_t)(n_prompt > n_gen + 1 ? n_prompt : n_gen + 1);
    cp.n_batch = (uint32_t)n_prompt;
    cp.n_threads = n_threads;
    if (optiml_context_init(model, &cp, &ctx) != OPTIML_OK) {
        fprintf(stderr, "optiml-bench-forward: %s\n", optiml_last_error());
        return 1;
    }
    if (n_threads <= 0) {
        long nc = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = nc > 0 ? (int)nc : 1;
    }
    const int32_t n_vocab = optiml_model_n_vocab(model), n_embd = optiml_model_n_embd(model);
    optiml_batch batch = optiml_batch_init(n_prompt);
    double pp[100], tg[100];
    uint64_t rng = 12345;
    for (int r = 0; r < reps + 1; r++) { /* the first round warms up */
        optiml_kv_seq_clear(ctx, -1);
        batch.n_tokens = n_prompt;
        for (int i = 0; i < n_prompt; i++) {
            rng = rng * 6364136223846793005ull + 1;
            batch.token[i] = (optiml_token)((rng >> 33) % (uint64_t)n_vocab);
            batch.pos[i] = i;
            batch.seq_id[i] = 0;
            batch.logits[i] = i == n_prompt - 1;
        }
        int64_t t0 = optiml_time_us();
        if (optiml_decode(ctx, &batch) != OPTIML_OK) goto fail;
        double t_pp = (optiml_time_us() - t0) / 1e6;
        optiml_kv_seq_clear(ctx, -1);
        batch.n_tokens = 1;
        batch.logits[0] = 1;
        t0 = optiml_time_us();
        for (int i = 0; i <= n_gen; i++) {
            batch.token[0] = (optiml_token)(i % n_vocab);
            batch.pos[0] = i;
            if (i == 1) t0 = optiml_time_us(); /* step 0 is the one-token prompt */
            if (optiml_decode(ctx, &batch) != OPTIML_OK) goto fail;
        }
        double t_tg = (optiml_time_us() - t0) / 1e6;
        if (r > 0) {
            pp[r - 1] = n_prompt / t_pp;
            tg[r - 1] = n_gen / t_tg;
        }
    }
    double pm, ps, tm, ts;
    stats(pp, reps, &pm, &ps);
    stats(tg, reps, &tm, &ts);
    const uint64_t bytes = optiml_model_size(model), step_bytes = optiml_model_decode_bytes(model);
    double bw = measure_bandwidth(n_threads);
    char desc[128];
    optiml_model_desc(model, desc, sizeof(desc));
    printf("| model | size | params | threads | test | t/s |\n|---|---|---|---|---|---|\n");
    printf("| %s | %.1f MiB | %.2f M | %d | pp%d | %.2f ± %.2f |\n", desc, bytes / 1048576.0,
           optiml_model_n_params(model) / 1e6, n_threads, n_prompt, pm, ps);
    printf("| %s | %.1f MiB | %.2f M | %d | tg%d | %.2f ± %.2f |\n", desc, bytes / 1048576.0,
           optiml_model_n_params(model) / 1e6, n_threads, n_gen, tm, ts);
    double floor_tps = bw / (double)step_bytes;
    printf("\ndecode floor: %.1f MiB of weights read per token / %.2f GB/s measured read bandwidth = %.1f tokens/s; "
           "decode runs at %.0f%% of it (n_embd %d)\n",
           step_bytes / 1048576.0, bw / 1e9, floor_tps, 100.0 * tm / floor_tps, n_embd);
    optiml_batch_free(batch);
    optiml_context_free(ctx);
    optiml_model_free(model);
    return 0;
fail:
    fprintf(stderr, "optiml-bench-forward: %s\n", optiml_last_error());
    return 1;
}
