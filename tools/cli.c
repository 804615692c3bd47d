/*
 * optiml-cli - generate text with a GGUF model.
 *
 *   optiml-cli [-m MODEL] [-p PROMPT | -f FILE] [-n N] [-t THREADS] [-c CTX]
 *              [--temp T] [--top-k K] [--top-p P] [--min-p P]
 *              [--repeat-penalty R] [--repeat-last-n N] [-s SEED]
 *              [--show-ids] [--no-bos] [-v]
 *   optiml-cli -cnv [--system TEXT] [--chat-template NAME|FILE] [options]
 *
 * Standard output carries the prompt followed by the generated text and
 * nothing else; logs, token ids (--show-ids) and timings go to standard
 * error. Without -m the model shipped in the repository is used.
 *
 * -cnv is an interactive chat: user lines come from standard input (the
 * "> " prompt goes to standard error), standard output carries only the
 * replies, each followed by a newline. Every turn renders the whole
 * conversation with the chat template (the model's tokenizer.chat_template,
 * else a built-in format; a template that fails falls back to the built-in
 * format it resembles) and decodes only the tokens that differ from what
 * the KV cache holds. Ctrl-C during a reply stops the reply; Ctrl-C or
 * end of input at the prompt ends the program.
 */
#define _POSIX_C_SOURCE 200809L
#include "chat.h"
#include "optiml.h"
#include "read_file.h"

#include <errno.h>
#include <limits.h>
#include <signal.h>
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
    int32_t n_gpu_layers;      /* -ngl */
    double vram_budget;        /* --vram-budget GiB */
    bool seed_set;
    bool no_mmap;              /* --no-mmap */
    bool no_repack;            /* --no-repack */
    bool show_ids;
    bool no_bos;
    bool verbose;
    bool chat;                 /* -cnv */
    const char *system_prompt; /* --system */
    const char *chat_template; /* --chat-template: built-in name or file */
    optiml_sampler_params sp;
};

static void usage(FILE *out) {
    fprintf(out,
            "usage: optiml-cli [options]\n"
            "  -m, --model FILE         GGUF model (default: %s)\n"
            "  -p, --prompt TEXT        prompt (default: empty, BOS only)\n"
            "  -f, --file FILE          read the prompt from a file\n"
            "  -n, --n-predict N        tokens to generate (per reply with -cnv), -1 = until end of text or\n"
            "                           context (default 128)\n"
            "  -t, --threads N          CPU threads (default: all cores)\n"
            "  -c, --ctx-size N         context size, 0 = the model's (default 2048)\n"
            "  -ngl, --n-gpu-layers N   CUDA builds: run the last N layers on the GPU; more than the\n"
            "                           model has (or -1) also puts the output head there (default 0)\n"
            "      --vram-budget GIB    CUDA builds: offload the most layers that fit GIB of VRAM\n"
            "      --no-mmap            read the model into memory (huge pages where the OS gives them)\n"
            "                           instead of mapping the file\n"
            "      --no-repack          multiply q4_0/q4_k weights from the file's rows, not a copy repacked\n"
            "                           at load for the CPU kernels (faster load, slower decode)\n"
            "      --temp T             temperature, 0 = greedy (default 0.8)\n"
            "      --top-k K            top-k, 0 = off (default 40)\n"
            "      --top-p P            top-p, 1 = off (default 0.95)\n"
            "      --min-p P            min-p, 0 = off (default 0.05)\n"
            "      --repeat-penalty R   repetition penalty, 1 = off (default 1.0)\n"
            "      --repeat-last-n N    tokens the penalty looks at (default 64)\n"
            "  -s, --seed N             random seed (default: random, printed)\n"
            "      --no-bos             do not start the prompt with BOS\n"
            "      --show-ids           print prompt and generated token ids to stderr\n"
            "  -cnv, --conversation     interactive chat: lines from stdin, replies on stdout\n"
            "      --system TEXT        system message of the chat\n"
            "      --chat-template T    chat format: llama2, llama3, chatml, mistral, gemma, phi3, or a\n"
            "                           file with a Jinja template (default: the model's template)\n"
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
        if (!strcmp(arg, "--no-mmap")) { a->no_mmap = true; continue; }
        if (!strcmp(arg, "--no-repack")) { a->no_repack = true; continue; }
        if (!strcmp(arg, "-v") || !strcmp(arg, "--verbose")) { a->verbose = true; continue; }
        if (!strcmp(arg, "-cnv") || !strcmp(arg, "--conversation")) { a->chat = true; continue; }
        static const char *const with_value[] = {"-m", "--model", "-p", "--prompt", "-f", "--file", "-n",
                                                 "--n-predict", "-t", "--threads", "-c", "--ctx-size",
                                                 "--temp", "--top-k", "--top-p", "--min-p", "--repeat-penalty",
                                                 "--repeat-last-n", "-s", "--seed", "--system",
                                                 "--chat-template", "-ngl", "--n-gpu-layers", "--gpu-layers",
                                                 "--vram-budget"};
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
        else if (!strcmp(arg, "--system")) a->system_prompt = val;
        else if (!strcmp(arg, "--chat-template")) a->chat_template = val;
        else if (!strcmp(arg, "-n") || !strcmp(arg, "--n-predict")) { ok = parse_long(val, -1, INT32_MAX, &l); a->n_predict = (int32_t)l; }
        else if (!strcmp(arg, "-t") || !strcmp(arg, "--threads")) { ok = parse_long(val, 1, 1024, &l); a->n_threads = (int32_t)l; }
        else if (!strcmp(arg, "-c") || !strcmp(arg, "--ctx-size")) { ok = parse_long(val, 0, 1 << 24, &l); a->n_ctx = (int32_t)l; }
        else if (!strcmp(arg, "-ngl") || !strcmp(arg, "--n-gpu-layers") || !strcmp(arg, "--gpu-layers")) {
            ok = parse_long(val, -1, 1 << 20, &l);
            a->n_gpu_layers = (int32_t)l;
        } else if (!strcmp(arg, "--vram-budget")) {
            float f;
            ok = parse_float(val, &f) && f > 0.0f;
            a->vram_budget = f;
        }
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
    if (a->chat && (a->prompt[0] || a->prompt_file)) {
        fprintf(stderr, "optiml-cli: -cnv takes its turns from standard input; use --system for a system message\n");
        return 1;
    }
    if (!a->chat && (a->system_prompt || a->chat_template)) {
        fprintf(stderr, "optiml-cli: --system and --chat-template need -cnv\n");
        return 1;
    }
    return 0;
}

/* ---- prompt and output ---------------------------------------------------- */

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

/* Decode toks[0..n) at positions pos0.. of sequence 0 in batches of
 * batch->n_tokens' capacity n_batch, asking logits for the last token only;
 * the logits are then those of entry batch->n_tokens - 1. */
static optiml_status decode_tokens(optiml_context *ctx, optiml_batch *batch, int32_t n_batch,
                                   const optiml_token *toks, int32_t n, int32_t pos0) {
    for (int32_t i = 0; i < n; i += n_batch) {
        batch->n_tokens = n - i < n_batch ? n - i : n_batch;
        for (int32_t j = 0; j < batch->n_tokens; j++) {
            batch->token[j] = toks[i + j];
            batch->pos[j] = pos0 + i + j;
            batch->seq_id[j] = 0;
            batch->logits[j] = i + j == n - 1;
        }
        optiml_status st = optiml_decode(ctx, batch);
        if (st != OPTIML_OK) return st;
    }
    return OPTIML_OK;
}

/* ---- interactive chat (-cnv) ------------------------------------------------ */

static volatile sig_atomic_t chat_interrupted;

static void chat_on_sigint(int sig) {
    (void)sig;
    chat_interrupted = 1;
}

/* A growable byte string. */
struct text {
    char *p;
    size_t n, cap;
};

/* Room for size bytes in all. */
static bool text_reserve(struct text *t, size_t size) {
    if (size <= t->cap) return true;
    size_t cap = t->cap ? t->cap : 256;
    while (cap < size) cap *= 2;
    char *p = realloc(t->p, cap);
    if (!p) return false;
    t->p = p;
    t->cap = cap;
    return true;
}

static bool text_append(struct text *t, const char *s, size_t n) {
    if (!text_reserve(t, t->n + n + 1)) return false;
    memcpy(t->p + t->n, s, n);
    t->n += n;
    t->p[t->n] = '\0';
    return true;
}

struct chat {
    const optiml_model *model;
    const char *tmpl;            /* template text or built-in name */
    optiml_chat_message *msgs;   /* role: static string; content: owned */
    size_t n_msgs, cap_msgs;
    struct text prompt;          /* the last rendering */
};

static bool chat_add(struct chat *c, const char *role, const char *content, size_t len) {
    if (c->n_msgs == c->cap_msgs) {
        size_t cap = c->cap_msgs ? 2 * c->cap_msgs : 8;
        optiml_chat_message *m = realloc(c->msgs, cap * sizeof(*m));
        if (!m) {
            fprintf(stderr, "optiml-cli: out of memory\n");
            return false;
        }
        c->msgs = m;
        c->cap_msgs = cap;
    }
    char *copy = malloc(len + 1);
    if (!copy) {
        fprintf(stderr, "optiml-cli: out of memory\n");
        return false;
    }
    memcpy(copy, content, len);
    copy[len] = '\0';
    c->msgs[c->n_msgs++] = (optiml_chat_message){role, copy};
    return true;
}

/* Render the conversation into c->prompt. On a template error, switch to
 * the built-in format the template resembles (chatml if none) and say so. */
static bool chat_render(struct chat *c) {
    for (int attempt = 0; attempt < 2; attempt++) {
        int32_t n = optiml_chat_apply_template(c->model, c->tmpl, c->msgs, c->n_msgs, true, c->prompt.p,
                                               (int32_t)c->prompt.cap);
        if (n >= 0 && (size_t)n < c->prompt.cap) {
            c->prompt.n = (size_t)n;
            return true;
        }
        if (n >= 0) { /* grow and render again */
            if (!text_reserve(&c->prompt, (size_t)n + 1)) {
                fprintf(stderr, "optiml-cli: out of memory\n");
                return false;
            }
            attempt--;
            continue;
        }
        if (chat_builtin_template(c->tmpl)) break; /* a built-in failed: give up */
        const char *fallback = chat_guess_builtin(c->tmpl);
        fprintf(stderr, "optiml-cli: the chat template failed (%s); using the built-in %s format instead\n",
                optiml_last_error(), fallback ? fallback : "chatml");
        c->tmpl = fallback ? fallback : "chatml";
    }
    fprintf(stderr, "optiml-cli: cannot render the conversation: %s\n", optiml_last_error());
    return false;
}

/* Template text from --chat-template (built-in name or file), or the
 * model's, or a built-in guessed from the vocabulary. *owned is what to free. */
static const char *chat_pick_template(const struct cli_args *a, const optiml_model *model, char **owned) {
    *owned = NULL;
    if (a->chat_template) {
        if (chat_builtin_template(a->chat_template)) return a->chat_template;
        size_t len;
        *owned = tool_read_file(a->chat_template, &len);
        if (!*owned)
            fprintf(stderr, "optiml-cli: --chat-template '%s' is neither a built-in format nor a readable file\n",
                    a->chat_template);
        return *owned;
    }
    const char *t = optiml_model_meta_str(model, "tokenizer.chat_template");
    if (t) return t;
    t = chat_guess_builtin_from_vocab(model);
    fprintf(stderr, "optiml-cli: the model has no chat template; using the built-in %s format\n", t);
    return t;
}

static int chat_run(const struct cli_args *a, optiml_model *model, optiml_context *ctx, optiml_sampler *smpl) {
    const int32_t n_ctx = (int32_t)optiml_context_n_ctx(ctx), n_batch = 512;
    struct chat c = {.model = model};
    char *tmpl_owned = NULL, *line = NULL;
    size_t line_cap = 0;
    struct text reply = {0};
    optiml_token *cached = malloc((size_t)n_ctx * sizeof(*cached)); /* what the KV cache holds */
    optiml_token *toks = malloc(((size_t)n_ctx + 1) * sizeof(*toks));
    optiml_token *gen = malloc(((size_t)n_ctx + 1) * sizeof(*gen)); /* ids of the reply */
    optiml_batch batch = optiml_batch_init(n_batch);
    int32_t n_cached = 0;
    int rc = 1;
    c.tmpl = chat_pick_template(a, model, &tmpl_owned);
    if (!c.tmpl) goto done;
    if (!cached || !toks || !gen || !batch.token) {
        fprintf(stderr, "optiml-cli: out of memory\n");
        goto done;
    }
    if (a->system_prompt && !chat_add(&c, "system", a->system_prompt, strlen(a->system_prompt))) goto done;

    /* the BOS text, to see whether the template writes BOS itself */
    char bos_text[256] = "";
    const optiml_token bos = optiml_token_bos(model);
    if (bos >= 0) {
        int32_t nb = optiml_token_to_piece(model, bos, bos_text, sizeof(bos_text) - 1, false, true);
        bos_text[nb > 0 ? nb : 0] = '\0';
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = chat_on_sigint; /* no SA_RESTART: Ctrl-C at the prompt ends the read */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);

    for (int turn = 1;; turn++) {
        fputs("> ", stderr);
        fflush(stderr);
        chat_interrupted = 0;
        ssize_t len = getline(&line, &line_cap, stdin);
        if (len < 0) { /* end of input, or Ctrl-C at the prompt */
            fputc('\n', stderr);
            rc = 0;
            break;
        }
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = '\0';
        if (len == 0) {
            turn--;
            continue;
        }
        if (!chat_add(&c, "user", line, (size_t)len) || !chat_render(&c)) goto done;

        /* tokenize the whole conversation; reuse the cached prefix */
        bool add_bos = !a->no_bos && optiml_token_add_bos(model) &&
                       !(bos_text[0] && !strncmp(c.prompt.p, bos_text, strlen(bos_text)));
        int32_t n = optiml_tokenize(model, c.prompt.p, (int32_t)c.prompt.n, toks, n_ctx, add_bos, true);
        if (n == INT32_MIN) {
            fprintf(stderr, "optiml-cli: cannot tokenize the conversation: %s\n", optiml_last_error());
            goto done;
        }
        if (n < 0 || n >= n_ctx) {
            fprintf(stderr, "optiml-cli: the conversation no longer fits the context of %d tokens\n", n_ctx);
            rc = 0;
            break;
        }
        int32_t same = 0;
        while (same < n_cached && same < n && cached[same] == toks[same]) same++;
        if (same == n) same = n - 1; /* decode at least one token for the logits */
        if (same < n_cached) {
            if (a->verbose)
                fprintf(stderr, "chat: the rendering differs from the cache at token %d of %d; truncating\n", same,
                        n_cached);
            optiml_kv_seq_truncate(ctx, 0, same);
        }
        int64_t t1 = optiml_time_us();
        if (decode_tokens(ctx, &batch, n_batch, toks + same, n - same, same) != OPTIML_OK) {
            fprintf(stderr, "optiml-cli: %s\n", optiml_last_error());
            goto done;
        }
        memcpy(cached, toks, (size_t)n * sizeof(*toks));
        n_cached = n;
        for (int32_t i = same; i < n; i++) optiml_sampler_accept(smpl, toks[i]);
        int64_t t_prompt = optiml_time_us() - t1;
        if (a->show_ids) print_ids("prompt_ids", toks, n);

        /* stream the reply */
        int64_t t2 = optiml_time_us();
        const float *logits = optiml_get_logits_ith(ctx, batch.n_tokens - 1);
        struct utf8_out out = {0};
        int32_t n_gen = 0;
        reply.n = 0;
        const char *stop = NULL;
        while (!stop) {
            if (chat_interrupted) {
                stop = "interrupted";
                break;
            }
            optiml_token tok = optiml_sampler_sample(smpl, logits);
            if (optiml_token_is_eog(model, tok)) break;
            char piece[256];
            int32_t np = optiml_token_to_piece(model, tok, piece, sizeof(piece), false, false);
            if (np > 0) {
                utf8_out_write(&out, piece, np);
                if (!text_append(&reply, piece, (size_t)np)) {
                    fprintf(stderr, "optiml-cli: out of memory\n");
                    goto done;
                }
            }
            optiml_sampler_accept(smpl, tok);
            gen[n_gen++] = tok;
            if (a->n_predict >= 0 && n_gen >= a->n_predict) break;
            if (n_cached >= n_ctx) {
                stop = "context full";
                break;
            }
            batch.n_tokens = 1;
            batch.token[0] = tok;
            batch.pos[0] = n_cached;
            batch.seq_id[0] = 0;
            batch.logits[0] = 1;
            if (optiml_decode(ctx, &batch) != OPTIML_OK) {
                fprintf(stderr, "optiml-cli: %s\n", optiml_last_error());
                goto done;
            }
            cached[n_cached++] = tok;
            logits = optiml_get_logits_ith(ctx, 0);
        }
        int64_t t_gen = optiml_time_us() - t2;
        utf8_out_flush(&out);
        fputc('\n', stdout);
        fflush(stdout);
        chat_interrupted = 0;
        if (a->show_ids) print_ids("generated_ids", gen, n_gen);
        if (stop) fprintf(stderr, "[reply %s]\n", stop);
        fprintf(stderr, "[turn %d: %d new prompt tokens, %d reused from the cache, %.2f ms; %d tokens generated, "
                        "%.2f tokens/s]\n",
                turn, n - same, same, t_prompt / 1e3, n_gen, t_gen > 0 ? n_gen * 1e6 / t_gen : 0.0);
        if (!chat_add(&c, "assistant", reply.p ? reply.p : "", reply.n)) goto done;
    }
done:
    for (size_t i = 0; i < c.n_msgs; i++) free((char *)c.msgs[i].content);
    free(c.msgs);
    free(c.prompt.p);
    free(reply.p);
    free(line);
    free(tmpl_owned);
    free(cached);
    free(toks);
    free(gen);
    optiml_batch_free(batch);
    return rc;
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
        prompt_buf = tool_read_file(a.prompt_file, &prompt_len);
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
    mp.n_gpu_layers = a.n_gpu_layers;
    mp.vram_budget_gib = a.vram_budget;
    mp.use_mmap = !a.no_mmap;
    mp.repack = !a.no_repack;
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
    if (a.chat) {
        rc = chat_run(&a, model, ctx, smpl);
        goto done;
    }

    /* tokenize */
    const int32_t n_ctx = (int32_t)optiml_context_n_ctx(ctx);
    bool add_bos = !a.no_bos && optiml_token_add_bos(model);
    toks = malloc((size_t)n_ctx * sizeof(*toks));
    if (!toks) {
        fprintf(stderr, "optiml-cli: out of memory\n");
        goto done;
    }
    int32_t n_prompt = optiml_tokenize(model, a.prompt, (int32_t)prompt_len, toks, n_ctx, add_bos, false);
    if (n_prompt == INT32_MIN) {
        fprintf(stderr, "optiml-cli: cannot tokenize the prompt: %s\n", optiml_last_error());
        goto done;
    }
    if (n_prompt < 0) n_prompt = -n_prompt; /* more than n_ctx: reported below */
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
    if (decode_tokens(ctx, &batch, n_batch, toks, n_prompt, 0) != OPTIML_OK) {
        fprintf(stderr, "optiml-cli: %s\n", optiml_last_error());
        goto done;
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
