/*
 * optiml-bench - prompt and decode speed of a model, like llama-bench.
 *
 *   optiml-bench -m MODEL [-p 512] [-n 128] [-t THREADS[,THREADS...]] [-r 5]
 *                [-o md|json] [--no-floor] [--probe-each] [-ngl N]
 *                [--vram-budget GIB] [--sparse-mode M[,M...]] [--no-mmap] [--no-repack]
 *
 * pp<P>: one batch of P random tokens into an empty cache.
 * tg<N>: N single-token decode steps after a one-token prompt.
 * Each test runs once to warm up, then r times: mean and standard deviation
 * of tokens/s. -p 0 or -n 0 skips that test.
 *
 * The decode floor: a decode step reads every weight once (the embedding
 * table only one row, unless it is also the output head):
 * optiml_model_decode_bytes() / read bandwidth measured here with the same
 * number of threads = the most tokens/s memory allows; the table says how
 * close decode comes. With layers on the GPU (-ngl, CUDA builds) the CPU
 * floor does not apply; the table's ngl column says how many layers (plus
 * the head) ran there, and bench/gpu.sh computes the GPU floor from the
 * device's measured copy bandwidth.
 *
 * A shared or virtual host's bandwidth changes from moment to moment, so a
 * decode of a model that reads at least 512 MiB per token (far more than a
 * cache holds; --probe-each: any model) also gets one read pass of the
 * probe just before each of its runs, and the floor line adds each run
 * against its own pass (mean and range).
 *
 * --sparse-mode runs each test once per listed optiml_context_params
 * sparse_mode (0 auto, 1 dense, 2 oracle, 3 predictor, 4 CATS), so sparse
 * and dense decode of a sparse model compare in one run; the test name then
 * carries the mode and the share of FFN neurons the last step computed
 * (optiml_context_ffn_stats), e.g. "tg128 sparse3 9.8%"; the decode floor
 * line compares with the first mode listed (list the dense mode, 1, first).
 * The modes take turns: each repetition runs every mode once, in the listed
 * order, and every later mode's tokens/s is also given over the first
 * mode's of the same round (mean and range over the rounds), so a slow
 * moment of a shared host weighs on both sides of a ratio. Their contexts
 * (each with its own KV cache and scratch, on the GPU too with -ngl) are
 * alive together.
 */
#define _POSIX_C_SOURCE 200809L
#include "optiml.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_THREAD_COUNTS 16
#define MAX_REPS 100
#define MAX_SPARSE_MODES 4

/* ---- memory bandwidth ----------------------------------------------------- */

struct bw_arg {
    const unsigned char *p;
    size_t n;
    const void *found;
};

/* glibc's memchr reads with the widest vector loads the CPU has, so the
 * loads, not the instructions, set its pace; the byte is never present. */
static void *bw_read(void *arg) {
    struct bw_arg *a = arg;
    a->found = memchr(a->p, 0xff, a->n);
    return NULL;
}

#define BW_BYTES ((size_t)1 << 30) /* the probe's buffer */

/* One read pass over buf (BW_BYTES of 1s) on n_threads threads: bytes/s, 0
 * on failure. */
static double read_pass(const unsigned char *buf, int n_threads) {
    const size_t n = BW_BYTES;
    if (n_threads > 256) n_threads = 256;
    pthread_t th[256];
    struct bw_arg args[256];
    bool found = false;
    int64_t t0 = optiml_time_us();
    int started = 0;
    for (int i = 0; i < n_threads; i++) {
        args[i] = (struct bw_arg){buf + n / n_threads * i, n / n_threads, NULL};
        if (pthread_create(&th[i], NULL, bw_read, &args[i]) != 0) break;
        started++;
    }
    for (int i = 0; i < started; i++) {
        pthread_join(th[i], NULL);
        found |= args[i].found != NULL;
    }
    double s = (optiml_time_us() - t0) / 1e6;
    return found || s <= 0 ? 0.0 : (double)(n / n_threads) * started / s;
}

/* Read bandwidth in bytes/s, best of 3 passes; 0 on failure. */
static double measure_bandwidth(const unsigned char *buf, int n_threads) {
    double best = 0.0;
    for (int rep = 0; rep < 3; rep++) {
        const double b = read_pass(buf, n_threads);
        if (b == 0.0) return 0.0;
        if (b > best) best = b;
    }
    return best;
}

/* ---- the tests ----------------------------------------------------------------- */

static void stats(const double *v, int n, double *mean, double *sd) {
    double s = 0, ss = 0;
    for (int i = 0; i < n; i++) s += v[i];
    *mean = s / n;
    for (int i = 0; i < n; i++) ss += (v[i] - *mean) * (v[i] - *mean);
    *sd = n > 1 ? sqrt(ss / (n - 1)) : 0.0;
}

/* tokens/s of one prompt batch of n tokens (n_gen = 0) or of n_gen decode
 * steps (n = 1 then). */
static optiml_status run_once(optiml_context *ctx, optiml_batch *b, int n_vocab, int n, int n_gen, uint64_t *rng,
                              double *tps) {
    optiml_kv_seq_clear(ctx, -1);
    b->n_tokens = n;
    for (int i = 0; i < n; i++) {
        *rng = *rng * 6364136223846793005ull + 1442695040888963407ull;
        b->token[i] = (optiml_token)((*rng >> 33) % (uint64_t)n_vocab);
        b->pos[i] = i;
        b->seq_id[i] = 0;
        b->logits[i] = i == n - 1;
    }
    int64_t t0 = optiml_time_us();
    optiml_status st = optiml_decode(ctx, b);
    if (st != OPTIML_OK || n_gen == 0) {
        *tps = n / ((optiml_time_us() - t0) / 1e6);
        return st;
    }
    t0 = optiml_time_us();
    b->n_tokens = 1;
    b->logits[0] = 1;
    for (int i = 0; i < n_gen; i++) {
        b->token[0] = (optiml_token)((i * 7919) % n_vocab);
        b->pos[0] = n + i;
        if ((st = optiml_decode(ctx, b)) != OPTIML_OK) return st;
    }
    *tps = n_gen / ((optiml_time_us() - t0) / 1e6);
    return OPTIML_OK;
}

struct result {
    int n_threads;
    int sparse_mode;
    double ffn_active; /* share of FFN neurons computed, -1: dense FFN */
    char test[48];
    double mean, sd;
    /* decode with paired probes (see main): n_paired runs, each run's share
     * of the read pass just before it (mean, min, max), and the passes'
     * bandwidth (min, max) */
    int n_paired;
    double share_mean, share_min, share_max, bw_min, bw_max;
    /* the second and later --sparse-mode: tokens/s over the first mode's in
     * the same round, mean and range over the rounds (else 0) */
    double ratio_mean, ratio_min, ratio_max;
};

static void free_contexts(optiml_context **ctxs, int n) {
    for (int i = 0; i < n; i++) optiml_context_free(ctxs[i]);
}

/* ---- arguments ---------------------------------------------------------------- */

struct bench_args {
    const char *model;
    int n_prompt, n_gen, reps;
    int threads[MAX_THREAD_COUNTS];
    int n_thread_counts;
    int n_gpu_layers;
    double vram_budget;
    int sparse_modes[MAX_SPARSE_MODES];
    int n_sparse_modes; /* 0: the default mode only, names unchanged */
    bool json, floor, probe_each, no_mmap, no_repack;
};

static bool parse_int(const char *s, long lo, long hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return false;
    *out = (int)v;
    return true;
}

static int parse_args(int argc, char **argv, struct bench_args *a) {
    *a = (struct bench_args){.n_prompt = 512, .n_gen = 128, .reps = 5, .floor = true};
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        if (!strcmp(f, "--no-floor")) { a->floor = false; continue; }
        if (!strcmp(f, "--probe-each")) { a->probe_each = true; continue; }
        if (!strcmp(f, "--no-mmap")) { a->no_mmap = true; continue; }
        if (!strcmp(f, "--no-repack")) { a->no_repack = true; continue; }
        if (!strcmp(f, "-h") || !strcmp(f, "--help")) {
            printf("usage: optiml-bench -m MODEL [-p 512] [-n 128] [-t N[,N...]] [-r 5] [-o md|json] [--no-floor]\n"
                   "                    [--probe-each] [-ngl N] [--vram-budget GIB] [--sparse-mode M[,M...]]\n"
                   "                    [--no-mmap] [--no-repack]\n");
            exit(0);
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "optiml-bench: unknown option or missing value '%s'\n", f);
            return 1;
        }
        const char *v = argv[++i];
        bool ok = true;
        if (!strcmp(f, "-m")) a->model = v;
        else if (!strcmp(f, "-p")) ok = parse_int(v, 0, 1 << 16, &a->n_prompt);
        else if (!strcmp(f, "-n")) ok = parse_int(v, 0, 1 << 16, &a->n_gen);
        else if (!strcmp(f, "-r")) ok = parse_int(v, 1, MAX_REPS, &a->reps);
        else if (!strcmp(f, "-ngl") || !strcmp(f, "--n-gpu-layers")) ok = parse_int(v, -1, 1 << 20, &a->n_gpu_layers);
        else if (!strcmp(f, "--vram-budget")) {
            char *end;
            errno = 0;
            a->vram_budget = strtod(v, &end);
            ok = !errno && end != v && !*end && a->vram_budget > 0.0;
        } else if (!strcmp(f, "-o")) { a->json = !strcmp(v, "json"); ok = a->json || !strcmp(v, "md"); }
        else if (!strcmp(f, "--sparse-mode")) {
            char buf[64];
            snprintf(buf, sizeof(buf), "%s", v);
            for (char *tok = strtok(buf, ","); tok && ok; tok = strtok(NULL, ","))
                ok = a->n_sparse_modes < MAX_SPARSE_MODES &&
                     parse_int(tok, 0, 4, &a->sparse_modes[a->n_sparse_modes++]);
        } else if (!strcmp(f, "-t")) {
            char buf[256];
            snprintf(buf, sizeof(buf), "%s", v);
            for (char *tok = strtok(buf, ","); tok && ok; tok = strtok(NULL, ",")) {
                ok = a->n_thread_counts < MAX_THREAD_COUNTS &&
                     parse_int(tok, 1, 1024, &a->threads[a->n_thread_counts++]);
            }
        } else {
            fprintf(stderr, "optiml-bench: unknown option '%s'\n", f);
            return 1;
        }
        if (!ok) {
            fprintf(stderr, "optiml-bench: invalid value '%s' for %s\n", v, f);
            return 1;
        }
    }
    if (!a->model) {
        fprintf(stderr, "optiml-bench: -m MODEL is required (see --help)\n");
        return 1;
    }
    if (a->n_thread_counts == 0) {
        long nc = sysconf(_SC_NPROCESSORS_ONLN);
        a->threads[a->n_thread_counts++] = nc > 0 ? (int)nc : 1;
    }
    return 0;
}

/* ---- main --------------------------------------------------------------------- */

int main(int argc, char **argv) {
    struct bench_args a;
    if (parse_args(argc, argv, &a)) return 1;
    optiml_log_set(NULL, NULL, OPTIML_LOG_LEVEL_WARN);
    optiml_model *model = NULL;
    optiml_model_params mp = optiml_model_default_params();
    mp.n_gpu_layers = a.n_gpu_layers;
    mp.vram_budget_gib = a.vram_budget;
    mp.use_mmap = !a.no_mmap;
    mp.repack = !a.no_repack;
    if (optiml_model_load(a.model, &mp, &model) != OPTIML_OK) {
        fprintf(stderr, "optiml-bench: %s\n", optiml_last_error());
        return 1;
    }
    const int n_vocab = optiml_model_n_vocab(model);
    const int n_batch = a.n_prompt > 1 ? a.n_prompt : 1;
    optiml_batch batch = optiml_batch_init(n_batch);
    struct result res[2 * MAX_THREAD_COUNTS * MAX_SPARSE_MODES];
    const int n_modes = a.n_sparse_modes ? a.n_sparse_modes : 1;
    double bw[MAX_THREAD_COUNTS] = {0};
    int n_res = 0;
    const double step_bytes = (double)optiml_model_decode_bytes(model);
    const int ngl = optiml_model_n_gpu_layers(model);
    /* The probe buffer. The host's bandwidth can change from second to
     * second (a shared or virtual machine: 13-24 GB/s between probes a
     * minute apart on the 2-core dev VM), so besides the best-of-3 probe
     * after the tests, a decode that reads far more than any cache holds
     * (or any, with --probe-each) gets one read pass just before each of
     * its runs, and each run is compared with its own pass (for a model
     * that fits a cache the pass evicts it and slows the run it measures). */
    unsigned char *bwbuf = NULL;
    if (a.floor && ngl == 0) {
        bwbuf = malloc(BW_BYTES);
        if (bwbuf) memset(bwbuf, 1, BW_BYTES);
    }
    const bool paired = bwbuf && a.n_gen > 0 && (a.probe_each || step_bytes >= 512.0 * 1048576.0);
    uint64_t rng = 12345;
    for (int ti = 0; ti < a.n_thread_counts; ti++) {
        /* one context per mode, all alive at once: each repetition runs
         * every mode in turn, so a slow moment of the host falls on all of
         * them and the run-by-run ratios compare neighbours */
        optiml_context *ctxs[MAX_SPARSE_MODES] = {0};
        for (int mi = 0; mi < n_modes; mi++) {
            optiml_context_params cp = optiml_context_default_params();
            cp.n_ctx = (uint32_t)(n_batch + a.n_gen + 1);
            cp.n_batch = (uint32_t)n_batch;
            cp.n_threads = a.threads[ti];
            if (a.n_sparse_modes) cp.sparse_mode = a.sparse_modes[mi];
            if (optiml_context_init(model, &cp, &ctxs[mi]) != OPTIML_OK) {
                free_contexts(ctxs, n_modes);
                goto fail;
            }
        }
        for (int kind = 0; kind < 2; kind++) {
            int n = kind == 0 ? a.n_prompt : 1, n_gen = kind == 0 ? 0 : a.n_gen;
            if ((kind == 0 && a.n_prompt == 0) || (kind == 1 && a.n_gen == 0)) continue;
            double tps[MAX_SPARSE_MODES][MAX_REPS], rbw[MAX_REPS];
            const bool pair = paired && kind == 1;
            for (int r = -1; r < a.reps; r++)
                for (int mi = 0; mi < n_modes; mi++) {
                    double t;
                    if (pair && mi == 0 && r >= 0) rbw[r] = read_pass(bwbuf, a.threads[ti]);
                    if (run_once(ctxs[mi], &batch, n_vocab, n, n_gen, &rng, &t) != OPTIML_OK) {
                        free_contexts(ctxs, n_modes);
                        goto fail;
                    }
                    if (r >= 0) tps[mi][r] = t;
                }
            for (int mi = 0; mi < n_modes; mi++) {
                struct result *rr = &res[n_res++];
                *rr = (struct result){.share_min = INFINITY, .share_max = -INFINITY, .bw_min = INFINITY,
                                      .bw_max = -INFINITY, .ratio_min = INFINITY, .ratio_max = -INFINITY};
                for (int r = 0; pair && mi == 0 && r < a.reps; r++) {
                    if (rbw[r] <= 0) continue;
                    const double sh = tps[mi][r] * step_bytes / rbw[r];
                    rr->share_mean += sh;
                    rr->share_min = fmin(rr->share_min, sh);
                    rr->share_max = fmax(rr->share_max, sh);
                    rr->bw_min = fmin(rr->bw_min, rbw[r]);
                    rr->bw_max = fmax(rr->bw_max, rbw[r]);
                    rr->n_paired++;
                }
                if (rr->n_paired) rr->share_mean /= rr->n_paired;
                for (int r = 0; mi > 0 && r < a.reps; r++) { /* against the first mode's run of the same round */
                    const double q = tps[mi][r] / tps[0][r];
                    rr->ratio_mean += q / a.reps;
                    rr->ratio_min = fmin(rr->ratio_min, q);
                    rr->ratio_max = fmax(rr->ratio_max, q);
                }
                rr->n_threads = a.threads[ti];
                rr->sparse_mode = a.n_sparse_modes ? a.sparse_modes[mi] : optiml_context_default_params().sparse_mode;
                uint64_t n_act = 0, n_tot = 0;
                optiml_context_ffn_stats(ctxs[mi], &n_act, &n_tot);
                rr->ffn_active = n_tot ? (double)n_act / (double)n_tot : -1.0;
                int len = snprintf(rr->test, sizeof(rr->test), kind == 0 ? "pp%d" : "tg%d",
                                   kind == 0 ? a.n_prompt : a.n_gen);
                if (a.n_sparse_modes)
                    snprintf(rr->test + len, sizeof(rr->test) - (size_t)len,
                             rr->ffn_active < 0 ? " sparse%d dense" : " sparse%d %.1f%%", rr->sparse_mode,
                             100.0 * rr->ffn_active);
                stats(tps[mi], a.reps, &rr->mean, &rr->sd);
            }
        }
        free_contexts(ctxs, n_modes);
        if (bwbuf) bw[ti] = measure_bandwidth(bwbuf, a.threads[ti]);
    }

    char desc[128];
    optiml_model_desc(model, desc, sizeof(desc));
    const double size_mib = optiml_model_size(model) / 1048576.0, params_m = optiml_model_n_params(model) / 1e6;
    free(bwbuf);
    if (a.json) {
        printf("[\n");
        for (int i = 0; i < n_res; i++) {
            int ti = 0;
            while (a.threads[ti] != res[i].n_threads) ti++;
            printf("  {\"model\": \"%s\", \"size_bytes\": %llu, \"n_params\": %llu, \"cpu\": \"%s\", \"n_threads\": %d, "
                   "\"n_gpu_layers\": %d, \"sparse_mode\": %d, \"ffn_active\": %.4f, \"test\": \"%s\", \"t_s\": %.4f, "
                   "\"t_s_sd\": %.4f, \"decode_bytes\": %.0f, \"read_bw_gbs\": %.3f",
                   desc, (unsigned long long)optiml_model_size(model), (unsigned long long)optiml_model_n_params(model),
                   optiml_cpu_features(), res[i].n_threads, ngl, res[i].sparse_mode, res[i].ffn_active, res[i].test,
                   res[i].mean, res[i].sd, step_bytes,
                   bw[ti] / 1e9);
            if (res[i].n_paired)
                printf(", \"paired_runs\": %d, \"paired_read_bw_gbs\": [%.3f, %.3f], \"paired_share\": %.4f, "
                       "\"paired_share_range\": [%.4f, %.4f]",
                       res[i].n_paired, res[i].bw_min / 1e9, res[i].bw_max / 1e9, res[i].share_mean,
                       res[i].share_min, res[i].share_max);
            if (res[i].ratio_mean > 0)
                printf(", \"vs_first_mode\": %.4f, \"vs_first_mode_range\": [%.4f, %.4f]", res[i].ratio_mean,
                       res[i].ratio_min, res[i].ratio_max);
            printf("}%s\n", i + 1 < n_res ? "," : "");
        }
        printf("]\n");
    } else {
        printf("| model | size | params | kernels | threads | ngl | test | t/s |\n");
        printf("| --- | ---: | ---: | --- | ---: | ---: | --- | ---: |\n");
        for (int i = 0; i < n_res; i++)
            printf("| %s | %.2f MiB | %.2f M | %s | %d | %d | %s | %.2f ± %.2f |\n", desc, size_mib, params_m,
                   optiml_cpu_features(), res[i].n_threads, ngl, res[i].test, res[i].mean, res[i].sd);
        bool ratios = false;
        for (int i = 0; i < n_res; i++)
            if (res[i].ratio_mean > 0) {
                printf("%s%s, %d threads: %.2fx the first mode's tokens/s, round by round (%.2f-%.2f)\n",
                       ratios ? "" : "\n", res[i].test, res[i].n_threads, res[i].ratio_mean, res[i].ratio_min,
                       res[i].ratio_max);
                ratios = true;
            }
        for (int ti = 0; a.floor && ngl == 0 && ti < a.n_thread_counts; ti++) {
            double floor_tps = bw[ti] > 0 ? bw[ti] / step_bytes : 0.0;
            double tg = 0.0;
            const struct result *rt = NULL;
            for (int i = 0; i < n_res; i++) /* the first --sparse-mode's decode */
                if (res[i].n_threads == a.threads[ti] && res[i].test[0] == 't' && !rt) {
                    rt = &res[i];
                    tg = res[i].mean;
                }
            printf("\ndecode floor, %d threads: %.2f MiB read per token / %.2f GB/s measured = %.2f tokens/s",
                   a.threads[ti], step_bytes / 1048576.0, bw[ti] / 1e9, floor_tps);
            if (tg > 0 && floor_tps > 0) printf("; decode reaches %.0f%% of it", 100.0 * tg / floor_tps);
            if (tg > floor_tps)
                printf(" (above the floor: the probe's bandwidth is a lower bound, and caches serve models that "
                       "fit them)");
            printf("\n");
            if (rt && rt->n_paired)
                printf("run by run, against a read pass just before each run (%.2f-%.2f GB/s): decode reaches "
                       "%.0f%% (%.0f-%.0f%%) of it\n",
                       rt->bw_min / 1e9, rt->bw_max / 1e9, 100.0 * rt->share_mean, 100.0 * rt->share_min,
                       100.0 * rt->share_max);
        }
    }
    optiml_batch_free(batch);
    optiml_model_free(model);
    return 0;
fail:
    free(bwbuf);
    fprintf(stderr, "optiml-bench: %s\n", optiml_last_error());
    optiml_batch_free(batch);
    optiml_model_free(model);
    return 1;
}
