/*
 * optiml-perplexity - perplexity of a model on a text file.
 *
 *   optiml-perplexity -m MODEL -f TEXT [-c 512] [-b 512] [-t N] [--chunks N]
 *                     [--sparse-mode M]
 *
 * The text is tokenized once (no BOS) and cut into non-overlapping windows
 * of n_ctx tokens; each window starts with BOS in place of its first token
 * when the model adds BOS to its prompts (tokenizer.ggml.add_bos_token, as
 * llama.cpp's perplexity decides; SmolLM2 and Qwen2 do not) and is
 * evaluated as one sequence. Only the second half of each window is scored (every scored token then has at
 * least n_ctx/2 tokens of context), as llama.cpp's perplexity does: the
 * negative log-likelihood of token j+1 given logits at j, for j in
 * [n_ctx/2, n_ctx - 1). Progress per window on stderr; the final line on
 * stdout: "PPL = <estimate> +/- <standard error>", the error from the
 * standard deviation of the per-token log-likelihoods. --sparse-mode sets
 * optiml_context_params.sparse_mode (0 auto, 1 dense, 2 oracle, 3
 * predictor, 4 cats); when the FFN runs sparse, a second line on stdout,
 * "FFN active = <share>", gives the share of FFN neurons active over all
 * evaluated tokens (optiml_context_ffn_stats summed over the decodes).
 */
#define _POSIX_C_SOURCE 200809L
#include "optiml.h"
#include "read_file.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* log softmax(logits)[tok] in double. */
static double log_prob(const float *logits, int32_t n_vocab, optiml_token tok) {
    float mx = logits[0];
    for (int32_t i = 1; i < n_vocab; i++) mx = logits[i] > mx ? logits[i] : mx;
    double sum = 0.0;
    for (int32_t i = 0; i < n_vocab; i++) sum += exp((double)logits[i] - mx);
    return (double)logits[tok] - mx - log(sum);
}

static bool parse_int(const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return false;
    *out = v;
    return true;
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *text_path = NULL;
    long n_ctx = 512, n_batch = 512, n_threads = 0, max_chunks = -1, n_gpu_layers = 0, sparse_mode = 0;
    bool no_mmap = false, no_repack = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("usage: optiml-perplexity -m MODEL -f TEXT [-c 512] [-b 512] [-t N] [--chunks N] [-ngl N]\n"
                   "                         [--sparse-mode 0|1|2|3|4] [--no-mmap] [--no-repack]\n");
            return 0;
        }
        if (!strcmp(a, "--no-mmap")) {
            no_mmap = true;
            continue;
        }
        if (!strcmp(a, "--no-repack")) {
            no_repack = true;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "optiml-perplexity: unknown option or missing value '%s'\n", a);
            return 1;
        }
        const char *v = argv[++i];
        bool ok = true;
        if (!strcmp(a, "-m") || !strcmp(a, "--model")) model_path = v;
        else if (!strcmp(a, "-f") || !strcmp(a, "--file")) text_path = v;
        else if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) ok = parse_int(v, 4, 1 << 20, &n_ctx);
        else if (!strcmp(a, "-b") || !strcmp(a, "--batch-size")) ok = parse_int(v, 1, 1 << 20, &n_batch);
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) ok = parse_int(v, 1, 1024, &n_threads);
        else if (!strcmp(a, "--chunks")) ok = parse_int(v, 1, 1L << 30, &max_chunks);
        else if (!strcmp(a, "-ngl") || !strcmp(a, "--n-gpu-layers")) ok = parse_int(v, -1, 1 << 20, &n_gpu_layers);
        else if (!strcmp(a, "--sparse-mode")) ok = parse_int(v, 0, 1 << 20, &sparse_mode);
        else {
            fprintf(stderr, "optiml-perplexity: unknown option '%s'\n", a);
            return 1;
        }
        if (!ok) {
            fprintf(stderr, "optiml-perplexity: invalid value '%s' for %s\n", v, a);
            return 1;
        }
    }
    if (!model_path || !text_path) {
        fprintf(stderr, "optiml-perplexity: -m MODEL and -f TEXT are required (see --help)\n");
        return 1;
    }
    optiml_log_set(NULL, NULL, OPTIML_LOG_LEVEL_WARN);
    size_t text_len = 0;
    char *text = tool_read_file(text_path, &text_len);
    if (!text) {
        fprintf(stderr, "optiml-perplexity: cannot read '%s': %s\n", text_path, strerror(errno));
        return 1;
    }
    int rc = 1;
    optiml_model *model = NULL;
    optiml_context *ctx = NULL;
    optiml_token *toks = NULL;
    optiml_batch batch = {0};
    if (text_len > (size_t)INT32_MAX / 2) {
        fprintf(stderr, "optiml-perplexity: text too long\n");
        goto done;
    }
    optiml_model_params mp = optiml_model_default_params();
    mp.n_gpu_layers = (int32_t)n_gpu_layers;
    mp.use_mmap = !no_mmap;
    mp.repack = !no_repack;
    if (optiml_model_load(model_path, &mp, &model) != OPTIML_OK) {
        fprintf(stderr, "optiml-perplexity: %s\n", optiml_last_error());
        goto done;
    }
    if (n_batch > n_ctx) n_batch = n_ctx;
    optiml_context_params cp = optiml_context_default_params();
    cp.n_ctx = (uint32_t)n_ctx;
    cp.n_batch = (uint32_t)n_batch;
    cp.n_threads = (int32_t)n_threads;
    cp.sparse_mode = (int32_t)sparse_mode;
    if (optiml_context_init(model, &cp, &ctx) != OPTIML_OK) {
        fprintf(stderr, "optiml-perplexity: %s\n", optiml_last_error());
        goto done;
    }
    /* a token per byte is not always enough (a space can become the three
     * bytes of U+2581, each its own byte token): retry with the size asked */
    int32_t n_max = (int32_t)text_len + 1, n_tok = -n_max;
    while (n_tok < 0 && n_tok != INT32_MIN) {
        n_max = -n_tok;
        free(toks);
        toks = malloc((size_t)n_max * sizeof(*toks));
        if (!toks) break;
        n_tok = optiml_tokenize(model, text, (int32_t)text_len, toks, n_max, false, false);
    }
    batch = optiml_batch_init((int32_t)n_batch);
    if (!toks || !batch.token) {
        fprintf(stderr, "optiml-perplexity: out of memory\n");
        goto done;
    }
    if (n_tok < 0) {
        fprintf(stderr, "optiml-perplexity: cannot tokenize '%s': %s\n", text_path, optiml_last_error());
        goto done;
    }
    long n_chunks = n_tok / n_ctx;
    if (max_chunks > 0 && max_chunks < n_chunks) n_chunks = max_chunks;
    if (n_chunks < 1) {
        fprintf(stderr, "optiml-perplexity: %d tokens, need at least %ld (one window of -c %ld)\n", n_tok, n_ctx,
                n_ctx);
        goto done;
    }
    fprintf(stderr, "optiml-perplexity: %d tokens, %ld windows of %ld, scoring the last %ld of each\n", n_tok,
            n_chunks, n_ctx, n_ctx - n_ctx / 2 - 1);

    const int32_t n_vocab = optiml_model_n_vocab(model);
    const optiml_token bos = optiml_token_add_bos(model) ? optiml_token_bos(model) : -1;
    const int32_t first = (int32_t)(n_ctx / 2);
    double nll = 0.0, nll2 = 0.0;
    long count = 0;
    uint64_t ffn_active = 0, ffn_total = 0;
    int64_t t0 = optiml_time_us();
    for (long c = 0; c < n_chunks; c++) {
        const optiml_token *w = toks + c * n_ctx;
        optiml_kv_seq_clear(ctx, -1);
        for (int32_t b0 = 0; b0 < n_ctx; b0 += (int32_t)n_batch) {
            batch.n_tokens = (int32_t)(n_ctx - b0 < n_batch ? n_ctx - b0 : n_batch);
            for (int32_t j = 0; j < batch.n_tokens; j++) {
                int32_t p = b0 + j;
                batch.token[j] = p == 0 && bos >= 0 ? bos : w[p];
                batch.pos[j] = p;
                batch.seq_id[j] = 0;
                batch.logits[j] = p >= first && p < n_ctx - 1;
            }
            if (optiml_decode(ctx, &batch) != OPTIML_OK) {
                fprintf(stderr, "optiml-perplexity: %s\n", optiml_last_error());
                goto done;
            }
            uint64_t n_active, n_total;
            optiml_context_ffn_stats(ctx, &n_active, &n_total);
            ffn_active += n_active;
            ffn_total += n_total;
            for (int32_t j = 0; j < batch.n_tokens; j++) {
                if (!batch.logits[j]) continue;
                double lp = log_prob(optiml_get_logits_ith(ctx, j), n_vocab, w[b0 + j + 1]);
                nll -= lp;
                nll2 += lp * lp;
                count++;
            }
        }
        double secs = (optiml_time_us() - t0) / 1e6;
        fprintf(stderr, "[%ld/%ld] ppl %.4f, %.1f s, ETA %.1f s\n", c + 1, n_chunks, exp(nll / count), secs,
                secs / (c + 1) * (n_chunks - c - 1));
    }
    double mean = nll / count, var = nll2 / count - mean * mean;
    double ppl = exp(mean);
    double err = count > 1 && var > 0 ? ppl * sqrt(var / (count - 1)) : 0.0;
    printf("PPL = %.4f +/- %.4f (%ld tokens scored)\n", ppl, err, count);
    if (ffn_total) printf("FFN active = %.4f\n", (double)ffn_active / (double)ffn_total);
    rc = 0;
done:
    optiml_batch_free(batch);
    free(toks);
    optiml_context_free(ctx);
    optiml_model_free(model);
    free(text);
    return rc;
}
