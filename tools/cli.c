/*
 * optiml-cli - generate text with a GGUF model.
 *
 *   optiml-cli [-m MODEL] [-p PROMPT | -f FILE] [-n N] [-t THREADS] [-c CTX]
 *              [--temp T] [--top-k K] [--top-p P] [--min-p P]
 *              [--repeat-penalty R] [--repeat-last-n N] [-s SEED]
 *              [--show-ids] [--no-bos] [-v]
 *
 * Standard output carries the prompt followed by the generated text and
 * nothing else; logs, token ids (--show-ids) and timings go to standard
 * error. Without -m the model shipped in the repository is used.
 */
#define _POSIX_C_SOURCE 200809L
#include "optiml.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifndef OPTIML_DEFAULT_MODEL
#define OPTIML_DEFAULT_MODEL "models/stories260K.gguf"
#endif

struct cli_args {
    const char *model;
    const char *prompt;
    const char *prompt_file;
    int32_t n_predict;
    int32_t n_threads;
    int32_t n_ctx;
    bool seed_set;
    bool show_ids;
    bool no_bos;
    bool verbose;
    optiml_sampler_params sp;
};

static void usage(FILE *out) {
    fprintf(out,
            "usage: optiml-cli [options]\n"
            "  -m, --model FILE         GGUF model (default: %s)\n"
            "  -p, --prompt TEXT        prompt (default: empty, BOS only)\n"
            "  -f, --file FILE          read the prompt from a file\n"
            "  -n, --n-predict N        tokens to generate, -1 = until end of text or context (default 128)\n"
            "  -t, --threads N          CPU threads (default: all cores)\n"
            "  -c, --ctx-size N         context size, 0 = the model's (default 2048)\n"
            "      --temp T             temperature, 0 = greedy (default 0.8)\n"
            "      --top-k K            top-k, 0 = off (default 40)\n"
            "      --top-p P            top-p, 1 = off (default 0.95)\n"
            "      --min-p P            min-p, 0 = off (default 0.05)\n"
            "      --repeat-penalty R   repetition penalty, 1 = off (default 1.0)\n"
            "      --repeat-last-n N    tokens the penalty looks at (default 64)\n"
            "  -s, --seed N             random seed (default: random, printed)\n"
            "      --no-bos             do not start the prompt with BOS\n"
            "      --show-ids           print prompt and generated token ids to stderr\n"
            "  -v, --verbose            debug logging\n"
            "  -h, --help               this help\n",
            OPTIML_DEFAULT_MODEL);
}

/* ---- argument parsing ------------------------------------------------------ */

static bool parse_long(const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return false;
    *out = v;
    return true;
}

static bool parse_float(const char *s, float *out) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end || v != v) return false;
    *out = v;
    return true;
}

static int parse_args(int argc, char **argv, struct cli_args *a) {
    *a = (struct cli_args){.model = OPTIML_DEFAULT_MODEL, .prompt = "", .n_predict = 128, .n_ctx = 2048};
    a->sp = optiml_sampler_default_params();
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (!strcmp(arg, "-h") || !strcmp(arg, "--help")) {
            usage(stdout);
            exit(0);
        }
        if (!strcmp(arg, "--show-ids")) { a->show_ids = true; continue; }
        if (!strcmp(arg, "--no-bos")) { a->no_bos = true; continue; }
        if (!strcmp(arg, "-v") || !strcmp(arg, "--verbose")) { a->verbose = true; continue; }
        static const char *const with_value[] = {"-m", "--model", "-p", "--prompt", "-f", "--file", "-n",
                                                 "--n-predict", "-t", "--threads", "-c", "--ctx-size",
                                                 "--temp", "--top-k", "--top-p", "--min-p", "--repeat-penalty",
                                                 "--repeat-last-n", "-s", "--seed"};
        bool known = false;
        for (size_t k = 0; k < sizeof(with_value) / sizeof(with_value[0]); k++) known |= !strcmp(arg, with_value[k]);
        if (!known) {
            fprintf(stderr, "optiml-cli: unknown option '%s' (see --help)\n", arg);
            return 1;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "optiml-cli: option '%s' needs a value\n", arg);
            return 1;
        }
        const char *val = argv[++i];
        long l;
        bool ok = true;
        if (!strcmp(arg, "-m") || !strcmp(arg, "--model")) a->model = val;
        else if (!strcmp(arg, "-p") || !strcmp(arg, "--prompt")) a->prompt = val;
        else if (!strcmp(arg, "-f") || !strcmp(arg, "--file")) a->prompt_file = val;
        else if (!strcmp(arg, "-n") || !strcmp(arg, "--n-predict")) { ok = parse_long(val, -1, INT32_MAX, &l); a->n_predict = (int32_t)l; }
        else if (!strcmp(arg, "-t") || !strcmp(arg, "--threads")) { ok = parse_long(val, 1, 1024, &l); a->n_threads = (int32_t)l; }
        else if (!strcmp(arg, "-c") || !strcmp(arg, "--ctx-size")) { ok = parse_long(val, 0, 1 << 24, &l); a->n_ctx = (int32_t)l; }
        else if (!strcmp(arg, "--temp")) ok = parse_float(val, &a->sp.temp);
        else if (!strcmp(arg, "--top-k")) { ok = parse_long(val, 0, INT32_MAX, &l); a->sp.top_k = (int32_t)l; }
        else if (!strcmp(arg, "--top-p")) ok = parse_float(val, &a->sp.top_p) && a->sp.top_p >= 0.0f && a->sp.top_p <= 1.0f;
        else if (!strcmp(arg, "--min-p")) ok = parse_float(val, &a->sp.min_p) && a->sp.min_p >= 0.0f && a->sp.min_p <= 1.0f;
        else if (!strcmp(arg, "--repeat-penalty")) ok = parse_float(val, &a->sp.repeat_penalty) && a->sp.repeat_penalty > 0.0f;
        else if (!strcmp(arg, "--repeat-last-n")) { ok = parse_long(val, 0, 1 << 20, &l); a->sp.repeat_last_n = (int32_t)l; }
        else if (!strcmp(arg, "-s") || !strcmp(arg, "--seed")) {
            char *end;
            errno = 0;
            unsigned long long v = strtoull(val, &end, 10);
            ok = !errno && end != val && !*end && val[0] != '-';
            a->sp.seed = v;
            a->seed_set = true;
        }
        if (!ok) {
            fprintf(stderr, "optiml-cli: invalid value '%s' for %s\n", val, arg);
            return 1;
        }
    }
    return 0;
}

/* ---- prompt and output ---------------------------------------------------- */

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0) break;
        if (n == cap) {
            char *nb = realloc(buf, 2 * cap + 1);
            if (!nb) { free(buf); buf = NULL; break; }
            buf = nb;
            cap *= 2;
        }
    }
    bool err = ferror(f);
    fclose(f);
    if (!buf || err) { free(buf); return NULL; }
    buf[n] = '\0';
    *len = n;
    return buf;
}

/* Streams token text to stdout, holding back an incomplete UTF-8 sequence
 * until the token that completes it arrives. */
struct utf8_out {
    char pending[8];
    int n_pending;
};

static int utf8_len(unsigned char c) {
    if (c < 0x80) return 1;
    if ((c & 0xe0) == 0xc0) return 2;
    if ((c & 0xf0) == 0xe0) return 3;
    if ((c & 0xf8) == 0xf0) return 4;
    return 1; /* stray continuation or invalid lead: pass through */
}

static void utf8_out_write(struct utf8_out *o, const char *s, int n) {
    for (int i = 0; i < n; i++) {
        o->pending[o->n_pending++] = s[i];
        if (o->n_pending == utf8_len((unsigned char)o->pending[0]) || o->n_pending == (int)sizeof(o->pending)) {
            fwrite(o->pending, 1, (size_t)o->n_pending, stdout);
            o->n_pending = 0;
        }
    }
    fflush(stdout);
}

static void utf8_out_flush(struct utf8_out *o) {
    fwrite(o->pending, 1, (size_t)o->n_pending, stdout);
    o->n_pending = 0;
    fflush(stdout);
}

static void emit_token(const optiml_model *model, struct utf8_out *out, optiml_token tok, bool after_bos) {
    char piece[256];
    int32_t n = optiml_token_to_piece(model, tok, piece, sizeof(piece), after_bos, false);
    if (n > 0) utf8_out_write(out, piece, n);
}

static void print_ids(const char *label, const optiml_token *ids, int32_t n) {
    fprintf(stderr, "%s:", label);
    for (int32_t i = 0; i < n; i++) fprintf(stderr, " %d", ids[i]);
    fputc('\n', stderr);
}

/* ---- main ----------------------------------------------------------------- */

int main(int argc, char **argv) {
    struct cli_args a;
    if (parse_args(argc, argv, &a)) return 1;
    optiml_log_set(NULL, NULL, a.verbose ? OPTIML_LOG_LEVEL_DEBUG : OPTIML_LOG_LEVEL_WARN);
    if (!a.seed_set) {
        a.sp.seed = (uint64_t)time(NULL) ^ ((uint64_t)optiml_time_us() << 20);
        fprintf(stderr, "seed: %llu\n", (unsigned long long)a.sp.seed);
    }

    char *prompt_buf = NULL;
    size_t prompt_len = strlen(a.prompt);
    if (a.prompt_file) {
        prompt_buf = read_file(a.prompt_file, &prompt_len);
        if (!prompt_buf) {
            fprintf(stderr, "optiml-cli: cannot read prompt file '%s': %s\n", a.prompt_file, strerror(errno));
            return 1;
        }
        a.prompt = prompt_buf;
    }
    if (prompt_len > INT32_MAX / 2) {
        fprintf(stderr, "optiml-cli: prompt too long\n");
        free(prompt_buf);
        return 1;
    }

    int rc = 1;
    optiml_model *model = NULL;
    optiml_context *ctx = NULL;
    optiml_sampler *smpl = NULL;
    optiml_token *toks = NULL;
    optiml_batch batch = {0};

    int64_t t0 = optiml_time_us();
    optiml_model_params mp = optiml_model_default_params();
    if (optiml_model_load(a.model, &mp, &model) != OPTIML_OK) {
        fprintf(stderr, "optiml-cli: %s\n", optiml_last_error());
        goto done;
    }
    optiml_context_params cp = optiml_context_default_params();
    cp.n_ctx = (uint32_t)a.n_ctx;
    if (cp.n_ctx > (uint32_t)optiml_model_n_ctx_train(model) || cp.n_ctx == 0)
        cp.n_ctx = (uint32_t)optiml_model_n_ctx_train(model);
    cp.n_threads = a.n_threads;
    if (optiml_context_init(model, &cp, &ctx) != OPTIML_OK) {
        fprintf(stderr, "optiml-cli: %s\n", optiml_last_error());
        goto done;
    }
    smpl = optiml_sampler_init(&a.sp, optiml_model_n_vocab(model));
    if (!smpl) {
        fprintf(stderr, "optiml-cli: %s\n", optiml_last_error());
        goto done;
    }
    int64_t t_load = optiml_time_us() - t0;

    /* tokenize */
    const int32_t n_ctx = (int32_t)optiml_context_n_ctx(ctx);
    bool add_bos = !a.no_bos && optiml_token_add_bos(model);
    int32_t n_max = (int32_t)prompt_len + 2;
    toks = malloc((size_t)n_max * sizeof(*toks));
    int32_t n_prompt = toks ? optiml_tokenize(model, a.prompt, (int32_t)prompt_len, toks, n_max, add_bos, false) : INT32_MIN;
    if (n_prompt < 0) {
        fprintf(stderr, "optiml-cli: cannot tokenize the prompt: %s\n", toks ? optiml_last_error() : "out of memory");
        goto done;
    }
    if (n_prompt == 0) {
        fprintf(stderr, "optiml-cli: the prompt is empty and the model has no BOS token; give a prompt\n");
        goto done;
    }
    if (n_prompt >= n_ctx) {
        fprintf(stderr, "optiml-cli: prompt of %d tokens does not fit the context of %d\n", n_prompt, n_ctx);
        goto done;
    }
    if (a.show_ids) print_ids("prompt_ids", toks, n_prompt);

    /* echo the prompt */
    struct utf8_out out = {0};
    const optiml_token bos = optiml_token_bos(model);
    for (int32_t i = 0; i < n_prompt; i++)
        emit_token(model, &out, toks[i], i == 0 || toks[i - 1] == bos);

    /* prompt in batches of n_batch, logits for the last token only */
    const int32_t n_batch = 512;
    batch = optiml_batch_init(n_batch);
    if (!batch.token) {
        fprintf(stderr, "optiml-cli: out of memory\n");
        goto done;
    }
    int64_t t1 = optiml_time_us();
    for (int32_t i = 0; i < n_prompt; i += n_batch) {
        batch.n_tokens = n_prompt - i < n_batch ? n_prompt - i : n_batch;
        for (int32_t j = 0; j < batch.n_tokens; j++) {
            batch.token[j] = toks[i + j];
            batch.pos[j] = i + j;
            batch.seq_id[j] = 0;
            batch.logits[j] = i + j == n_prompt - 1;
        }
        if (optiml_decode(ctx, &batch) != OPTIML_OK) {
            fprintf(stderr, "optiml-cli: %s\n", optiml_last_error());
            goto done;
        }
    }
    for (int32_t i = 0; i < n_prompt; i++) optiml_sampler_accept(smpl, toks[i]);
    int64_t t_prompt = optiml_time_us() - t1;

    /* generate */
    int64_t t2 = optiml_time_us();
    int32_t n_gen = 0, n_decoded = 0, pos = n_prompt;
    const float *logits = optiml_get_logits_ith(ctx, batch.n_tokens - 1);
    optiml_token *gen = malloc(((size_t)(a.n_predict < 0 ? n_ctx : a.n_predict) + 1) * sizeof(*gen));
    if (!gen) {
        fprintf(stderr, "optiml-cli: out of memory\n");
        goto done;
    }
    optiml_token prev = toks[n_prompt - 1];
    while (a.n_predict < 0 || n_gen < a.n_predict) {
        optiml_token tok = optiml_sampler_sample(smpl, logits);
        if (optiml_token_is_eog(model, tok)) break;
        gen[n_gen++] = tok;
        optiml_sampler_accept(smpl, tok);
        emit_token(model, &out, tok, prev == bos);
        prev = tok;
        if (pos >= n_ctx) {
            fprintf(stderr, "\noptiml-cli: context of %d tokens is full\n", n_ctx);
            break;
        }
        if (a.n_predict >= 0 && n_gen == a.n_predict) break;
        batch.n_tokens = 1;
        batch.token[0] = tok;
        batch.pos[0] = pos++;
        batch.seq_id[0] = 0;
        batch.logits[0] = 1;
        if (optiml_decode(ctx, &batch) != OPTIML_OK) {
            fprintf(stderr, "optiml-cli: %s\n", optiml_last_error());
            free(gen);
            goto done;
        }
        n_decoded++;
        logits = optiml_get_logits_ith(ctx, 0);
    }
    int64_t t_gen = optiml_time_us() - t2;
    utf8_out_flush(&out);
    if (isatty(fileno(stdout))) fputc('\n', stdout);
    fflush(stdout);
    if (a.show_ids) print_ids("generated_ids", gen, n_gen);
    free(gen);

    fprintf(stderr, "\nload: %.2f ms\n", t_load / 1e3);
    fprintf(stderr, "prompt: %d tokens in %.2f ms, %.2f tokens/s\n", n_prompt, t_prompt / 1e3,
            t_prompt > 0 ? n_prompt * 1e6 / t_prompt : 0.0);
    fprintf(stderr, "generation: %d tokens, %d decode steps in %.2f ms, %.2f tokens/s (%s kernels)\n", n_gen,
            n_decoded, t_gen / 1e3, t_gen > 0 ? n_decoded * 1e6 / t_gen : 0.0, optiml_cpu_features());
    rc = 0;
done:
    optiml_batch_free(batch);
    free(toks);
    optiml_sampler_free(smpl);
    optiml_context_free(ctx);
    optiml_model_free(model);
    free(prompt_buf);
    return rc;
}
