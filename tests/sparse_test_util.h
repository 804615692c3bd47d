/*
 * sparse_test_util.h - what the sparse-FFN tests (test_sparse.c,
 * test_cats.c, test_powerinfer.c) share: a seeded random source, the
 * pieces of a small Llama GGUF written with the GGUF writer (tensors from
 * float arrays in any type, the hyperparameters, a 300-piece SentencePiece
 * vocabulary), and the whole-model runs they compare (logits of N_TOK
 * prompt tokens, in one batch or one token per decode, with the FFN
 * statistics).
 *
 * The including test defines its model's sizes first (N_EMBD, N_FF,
 * N_LAYER, N_HEAD) and includes test.h (the helpers count their CHECKs as
 * the test's own); this header defines N_VOCAB (its vocabulary) and N_TOK
 * (its prompt).
 */
#ifndef OPTIML_SPARSE_TEST_UTIL_H
#define OPTIML_SPARSE_TEST_UTIL_H

#if !defined(N_EMBD) || !defined(N_FF) || !defined(N_LAYER) || !defined(N_HEAD) || !defined(OPTIML_TEST_H)
#error "define N_EMBD, N_FF, N_LAYER, N_HEAD and include test.h before sparse_test_util.h"
#endif

#define N_VOCAB 300 /* vocab_keys */
#define N_TOK 6     /* toks */

#include "gguf.h"
#include "model.h"
#include "optiml.h"
#include "quant.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- random numbers ----------------------------------------------------- */

/* xorshift64; each model writer seeds it, so a model is the same every run */
static uint64_t rng_state;

static inline float rnd(void) { /* uniform in [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)(rng_state >> 40) / 8388608.0f - 1.0f;
}

static inline float gauss(void) { /* about N(0, 1) */
    float s = 0;
    for (int i = 0; i < 4; i++) s += rnd();
    return s * 0.866f; /* variance 4/3 * 3/4 = 1 */
}

/* ---- model writer ------------------------------------------------------- */

/* The writer holds pointers to the tensor bytes until gguf_writer_write:
 * every buffer of one model is kept here and freed by model_end. */
static void *bufs[256];
static int n_bufs;

static inline void *keep(void *p) {
    if (n_bufs == (int)(sizeof(bufs) / sizeof(bufs[0]))) { /* a test's own bug: grow bufs */
        fprintf(stderr, "sparse_test_util.h: more than %d buffers in one model\n", n_bufs);
        abort();
    }
    bufs[n_bufs++] = p;
    return p;
}

/* Tensor `name` of shape (ne0, ne1) from the floats v, stored as `type`. */
static inline void add(gguf_writer *w, const char *name, uint32_t type, int64_t ne0, int64_t ne1, const float *v) {
    uint64_t ne[2] = {(uint64_t)ne0, (uint64_t)ne1}, row;
    dtype_row_size(type, (uint64_t)ne0, &row);
    void *dst = keep(malloc(row * (uint64_t)ne1));
    if (type == DTYPE_F32) memcpy(dst, v, (size_t)(ne0 * ne1) * sizeof(float));
    else if (type == DTYPE_F16)
        for (int64_t i = 0; i < ne0 * ne1; i++) ((f16_t *)dst)[i] = f32_to_f16(v[i]);
    else quant_quantizer(type)(ne0 * ne1, v, dst);
    CHECK(gguf_writer_add_tensor(w, name, type, ne1 > 1 ? 2 : 1, ne, dst) == OPTIML_OK, "%s", optiml_last_error());
}

/* The values a tensor of this type really holds (quantize, dequantize). */
static inline void round_trip(uint32_t type, int64_t n, float *v) {
    if (type == DTYPE_F32) return;
    if (type == DTYPE_F16) {
        for (int64_t i = 0; i < n; i++) v[i] = f16_to_f32(f32_to_f16(v[i]));
        return;
    }
    uint64_t row;
    dtype_row_size(type, (uint64_t)n, &row);
    void *q = malloc(row);
    quant_quantizer(type)(n, v, q);
    quant_dequantizer(type)(n, q, v);
    free(q);
}

/* n kept floats scale * rnd() (randm) or scale * gauss() (randn) */
static inline float *randm(int64_t n, float scale) {
    float *v = keep(malloc((size_t)n * sizeof(float)));
    for (int64_t i = 0; i < n; i++) v[i] = rnd() * scale;
    return v;
}

static inline float *randn(int64_t n, float scale) {
    float *v = keep(malloc((size_t)n * sizeof(float)));
    for (int64_t i = 0; i < n; i++) v[i] = gauss() * scale;
    return v;
}

/* N_EMBD kept ones (the norm weights that change nothing) */
static inline float *ones_embd(void) {
    float *v = keep(malloc(N_EMBD * sizeof(float)));
    for (int i = 0; i < N_EMBD; i++) v[i] = 1.0f;
    return v;
}

/* The kept transpose of a (rows, cols) row-major matrix: (cols, rows). */
static inline float *transpose(const float *a, int64_t rows, int64_t cols) {
    float *t = keep(malloc((size_t)(rows * cols) * sizeof(float)));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) t[c * rows + r] = a[r * cols + c];
    return t;
}

/* Down weights k * 2^-9, |k| <= 127, 127 wherever (r - c) % 32 == 0: every
 * 32-block of a row and of a column holds the maximum, so q8_0 holds them
 * exactly as rows of down and of down_t. */
static inline float exact_value(int64_t r, int64_t c) {
    return ((r - c) % 32 == 0 ? 127.0f : floorf(rnd() * 126.0f)) / 512.0f;
}

/* Gate rows (N_FF, N_EMBD) that fire for about 12% of inputs with a
 * positive mean (as ReLU-sparse LLMs): zero-mean noise noise() / divisor minus
 * c_i / N_EMBD in every column, c_i in [1.2, 2.2]. */
static inline float *sparse_gate(float (*noise)(void), float divisor) {
    float *gate = keep(malloc((size_t)N_FF * N_EMBD * sizeof(float)));
    for (int64_t i = 0; i < N_FF; i++) {
        float *g = gate + i * N_EMBD, mean = 0, c = 1.7f + 0.5f * rnd();
        for (int j = 0; j < N_EMBD; j++) mean += (g[j] = noise() / divisor) / N_EMBD;
        for (int j = 0; j < N_EMBD; j++) g[j] += -mean - c / N_EMBD; /* x . 1 / n ~ mean(x) */
    }
    return gate;
}

/* Starts a model: seeds rnd(), empties the buffer list, and writes the
 * architecture and its hyperparameters (<arch>.context_length 64, ...). */
static inline gguf_writer *model_begin(uint64_t seed, const char *arch) {
    rng_state = seed;
    n_bufs = 0;
    gguf_writer *w = gguf_writer_init();
    char key[64];
    gguf_writer_set_str(w, "general.architecture", arch);
#define KEY(s) (snprintf(key, sizeof(key), "%s." s, arch), key)
    gguf_writer_set_u32(w, KEY("context_length"), 64);
    gguf_writer_set_u32(w, KEY("embedding_length"), N_EMBD);
    gguf_writer_set_u32(w, KEY("block_count"), N_LAYER);
    gguf_writer_set_u32(w, KEY("feed_forward_length"), N_FF);
    gguf_writer_set_u32(w, KEY("attention.head_count"), N_HEAD);
#undef KEY
    return w;
}

/* Writes the model to path and frees the writer and the kept buffers. */
static inline void model_end(gguf_writer *w, const char *path) {
    CHECK(gguf_writer_write(w, path) == OPTIML_OK, "%s", optiml_last_error());
    gguf_writer_free(w);
    for (int i = 0; i < n_bufs; i++) free(bufs[i]);
    n_bufs = 0;
}

/* A Llama SentencePiece vocabulary of N_VOCAB pieces: <unk> <s> </s>, the
 * 256 byte pieces, then "_t259" ...; with_ids: also the bos and eos ids. */
static inline void vocab_keys(gguf_writer *w, bool with_ids) {
    static char store[N_VOCAB][16];
    const char *pieces[N_VOCAB];
    float scores[N_VOCAB];
    int32_t types[N_VOCAB];
    for (int i = 0; i < N_VOCAB; i++) {
        if (i < 3) snprintf(store[i], 16, "%s", i == 0 ? "<unk>" : i == 1 ? "<s>" : "</s>");
        else if (i < 259) snprintf(store[i], 16, "<0x%02X>", (unsigned)(i - 3));
        else snprintf(store[i], 16, "\xe2\x96\x81t%d", i);
        pieces[i] = store[i];
        scores[i] = -(float)i;
        types[i] = i == 0 ? 2 : i < 3 ? 3 : i < 259 ? 6 : 1;
    }
    gguf_writer_set_str(w, "tokenizer.ggml.model", "llama");
    gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", pieces, NULL, N_VOCAB);
    gguf_writer_set_arr(w, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, scores, N_VOCAB);
    gguf_writer_set_arr(w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types, N_VOCAB);
    if (!with_ids) return;
    gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", 1);
    gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 2);
}

/* ---- runs ----------------------------------------------------------------- */

/* the prompt every whole-model run decodes */
static const optiml_token toks[N_TOK] = {1, 293, 261, 45, 280, 99};

/* A context of n_ctx cells in sparse mode `mode` on n_threads threads (0:
 * the default); what optiml_context_init returns. */
static inline optiml_status context_start(const optiml_model *m, uint32_t n_ctx, int mode, int n_threads,
                                          optiml_context **ctx) {
    optiml_context_params p = optiml_context_default_params();
    p.n_ctx = n_ctx;
    p.n_threads = n_threads;
    p.sparse_mode = mode;
    return optiml_context_init(m, &p, ctx);
}

/* Appends prompt token j at position j of sequence 0. */
static inline void batch_add(optiml_batch *b, int j, bool logits) {
    b->token[b->n_tokens] = toks[j];
    b->pos[b->n_tokens] = j;
    b->seq_id[b->n_tokens] = 0;
    b->logits[b->n_tokens++] = logits;
}

/* Logits of every prompt token (out: N_TOK * N_VOCAB, poisoned first) in
 * sparse mode `mode`, in one batch or one token per decode; *share: the
 * active share of the FFN neurons over all decodes, -1 when no decode
 * counted any (the dense FFN). False if the context could not start. */
static inline bool run(const optiml_model *m, int mode, int threads, bool batched, float *out, double *share) {
    for (int i = 0; i < N_TOK * N_VOCAB; i++) out[i] = NAN; /* poison */
    optiml_context *ctx = NULL;
    if (context_start(m, 32, mode, threads, &ctx) != OPTIML_OK) {
        CHECK(false, "context mode %d: %s", mode, optiml_last_error());
        return false;
    }
    optiml_batch b = optiml_batch_init(N_TOK);
    uint64_t act_sum = 0, tot_sum = 0;
    for (int i = 0; i < N_TOK; i += batched ? N_TOK : 1) {
        b.n_tokens = 0;
        for (int j = i; j < (batched ? N_TOK : i + 1); j++) batch_add(&b, j, true);
        CHECK(optiml_decode(ctx, &b) == OPTIML_OK, "%s", optiml_last_error());
        for (int j = 0; j < b.n_tokens; j++)
            memcpy(out + (i + j) * N_VOCAB, optiml_get_logits_ith(ctx, j), N_VOCAB * sizeof(float));
        uint64_t a, t;
        optiml_context_ffn_stats(ctx, &a, &t);
        act_sum += a;
        tot_sum += t;
    }
    *share = tot_sum ? (double)act_sum / (double)tot_sum : -1.0;
    optiml_batch_free(b);
    optiml_context_free(ctx);
    return true;
}

/* max over the N_TOK * N_VOCAB logits of |a - b| / max(1, |b|); a NaN
 * (an unwritten logit) gives infinity */
static inline double rel_diff(const float *a, const float *b) {
    double d = 0;
    for (int i = 0; i < N_TOK * N_VOCAB; i++) {
        double e = fabs((double)a[i] - b[i]) / fmax(1.0, fabs((double)b[i]));
        if (isnan(e)) return INFINITY;
        if (e > d) d = e;
    }
    return d;
}

/* Loading path must fail with status want and a message containing needle. */
static inline void expect_load_error(const char *label, const char *path, optiml_status want, const char *needle) {
    optiml_model *m = NULL;
    const optiml_status st = optiml_model_load(path, NULL, &m);
    const bool ok = st == want && strstr(optiml_last_error(), needle);
    printf("%s error: %s: status %d: %s\n", ok ? "PASS" : "FAIL", label, (int)st, optiml_last_error());
    CHECK(ok, "%s: want status %d with \"%s\"", label, (int)want, needle);
    optiml_model_free(m);
}

/* Each test defines its struct opts (what its small model holds) and
 * write_model(path, o), which writes that model to path. */
struct opts;
static void write_model(const char *path, const struct opts *o);

/* A model that must not load: what write_model writes for it, the status
 * and a piece of the message expected. */
struct load_error {
    const char *label;
    const struct opts *o;
    optiml_status want;
    const char *needle;
};

/* write_model, then expect_load_error, for each of the n cases. */
static inline void expect_load_errors(const char *path, const struct load_error *e, size_t n) {
    for (size_t k = 0; k < n; k++) {
        write_model(path, e[k].o);
        expect_load_error(e[k].label, path, e[k].want, e[k].needle);
    }
}

#endif /* OPTIML_SPARSE_TEST_UTIL_H */
