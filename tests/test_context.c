/*
 * test_context.c - the decode API on the shipped stories260K model:
 * a prompt in one batch gives the same logits as token by token; two
 * sequences in one batch give the same logits as each alone; KV cache
 * truncate and copy behave; a full context or a bad batch fails with a
 * reason and leaves the cache as it was; results do not depend on the
 * thread count.
 */
#include "optiml.h"
#include "test.h"

#include <math.h>
#include <string.h>

static const char *model_path = OPTIML_MODELS "/stories260K.gguf";
static const optiml_token prompt[] = {1, 403, 407, 261, 378, 432, 383, 286, 261, 376};
#define N_PROMPT ((int32_t)(sizeof(prompt) / sizeof(prompt[0])))

static float max_diff(const float *a, const float *b, int32_t n) {
    float m = 0.0f;
    for (int32_t i = 0; i < n; i++) m = fmaxf(m, fabsf(a[i] - b[i]));
    return m;
}

static void fill(optiml_batch *b, const optiml_token *t, int32_t n, int32_t pos0, int32_t seq, bool all_logits) {
    for (int32_t i = 0; i < n; i++) {
        b->token[b->n_tokens] = t[i];
        b->pos[b->n_tokens] = pos0 + i;
        b->seq_id[b->n_tokens] = seq;
        b->logits[b->n_tokens] = all_logits || i == n - 1;
        b->n_tokens++;
    }
}

static optiml_context *make_ctx(const optiml_model *m, uint32_t n_ctx, uint32_t n_seq, int threads) {
    optiml_context_params p = optiml_context_default_params();
    p.n_ctx = n_ctx;
    p.n_seq_max = n_seq;
    p.n_threads = threads;
    optiml_context *ctx = NULL;
    CHECK(optiml_context_init(m, &p, &ctx) == OPTIML_OK, "%s", optiml_last_error());
    return ctx;
}

int main(void) {
    optiml_model *m = NULL;
    if (optiml_model_load(model_path, NULL, &m) != OPTIML_OK) {
        CHECK(false, "load %s: %s", model_path, optiml_last_error());
        return test_summary("test_context");
    }
    const int32_t nv = optiml_model_n_vocab(m);
    CHECK(nv == 512 && optiml_model_n_layer(m) == 5 && optiml_model_n_embd(m) == 64);
    float batched[N_PROMPT][512], single[N_PROMPT][512];

    /* batch vs one by one */
    optiml_context *ctx = make_ctx(m, 64, 2, 2);
    optiml_batch b = optiml_batch_init(64);
    b.n_tokens = 0;
    fill(&b, prompt, N_PROMPT, 0, 0, true);
    CHECK(optiml_decode(ctx, &b) == OPTIML_OK);
    for (int32_t i = 0; i < N_PROMPT; i++) memcpy(batched[i], optiml_get_logits_ith(ctx, i), sizeof(batched[i]));
    CHECK(optiml_kv_seq_pos_max(ctx, 0) == N_PROMPT - 1);
    optiml_kv_seq_clear(ctx, 0);
    CHECK(optiml_kv_seq_pos_max(ctx, 0) == -1);
    for (int32_t i = 0; i < N_PROMPT; i++) {
        b.n_tokens = 0;
        fill(&b, &prompt[i], 1, i, 0, true);
        CHECK(optiml_decode(ctx, &b) == OPTIML_OK);
        memcpy(single[i], optiml_get_logits_ith(ctx, 0), sizeof(single[i]));
        CHECK(optiml_get_logits_ith(ctx, 1) == NULL);
    }
    float d = 0;
    for (int32_t i = 0; i < N_PROMPT; i++) d = fmaxf(d, max_diff(batched[i], single[i], nv));
    printf("batched vs one-by-one: max |diff| %.3g\n", d);
    CHECK(d < 1e-4f);

    /* truncate then re-decode the tail: same logits */
    optiml_kv_seq_truncate(ctx, 0, 6);
    CHECK(optiml_kv_seq_pos_max(ctx, 0) == 5);
    b.n_tokens = 0;
    fill(&b, &prompt[6], N_PROMPT - 6, 6, 0, false);
    CHECK(optiml_decode(ctx, &b) == OPTIML_OK);
    CHECK(max_diff(optiml_get_logits_ith(ctx, b.n_tokens - 1), single[N_PROMPT - 1], nv) < 1e-4f);

    /* copy seq 0's first 6 positions to seq 1, continue seq 1 differently
     * (same tokens): same logits as seq 0 had */
    optiml_kv_seq_copy(ctx, 0, 1);
    optiml_kv_seq_truncate(ctx, 1, 6);
    CHECK(optiml_kv_seq_pos_max(ctx, 1) == 5 && optiml_kv_seq_pos_max(ctx, 0) == N_PROMPT - 1);
    b.n_tokens = 0;
    fill(&b, &prompt[6], 2, 6, 1, false);
    CHECK(optiml_decode(ctx, &b) == OPTIML_OK);
    CHECK(max_diff(optiml_get_logits_ith(ctx, 1), single[7], nv) < 1e-4f);
    optiml_context_free(ctx);

    /* two sequences interleaved in one batch equal each alone */
    ctx = make_ctx(m, 64, 2, 1);
    const optiml_token other[] = {1, 403, 407, 261, 378, 267};
    b.n_tokens = 0;
    fill(&b, prompt, N_PROMPT, 0, 0, true);
    fill(&b, other, 6, 0, 1, true);
    CHECK(optiml_decode(ctx, &b) == OPTIML_OK);
    d = 0;
    for (int32_t i = 0; i < N_PROMPT; i++) d = fmaxf(d, max_diff(optiml_get_logits_ith(ctx, i), single[i], nv));
    for (int32_t i = 0; i < 5; i++) d = fmaxf(d, max_diff(optiml_get_logits_ith(ctx, N_PROMPT + i), single[i], nv));
    printf("two sequences in one batch vs alone: max |diff| %.3g\n", d);
    CHECK(d < 1e-4f);
    optiml_context_free(ctx);

    /* errors: full context, bad token, bad sequence, oversize batch */
    ctx = make_ctx(m, 8, 1, 2);
    b.n_tokens = 0;
    fill(&b, prompt, 6, 0, 0, false);
    CHECK(optiml_decode(ctx, &b) == OPTIML_OK);
    b.n_tokens = 0;
    fill(&b, prompt, 3, 6, 0, false);
    CHECK(optiml_decode(ctx, &b) == OPTIML_ERR_CONTEXT_FULL, "9 tokens in 8 cells");
    optiml_context_free(ctx);

    ctx = make_ctx(m, 16, 1, 2);
    b.n_tokens = 0;
    fill(&b, prompt, 10, 0, 0, false);
    CHECK(optiml_decode(ctx, &b) == OPTIML_OK);
    b.n_tokens = 0;
    fill(&b, prompt, 8, 10, 0, false);
    CHECK(optiml_decode(ctx, &b) == OPTIML_ERR_CONTEXT_FULL);
    CHECK(strstr(optiml_last_error(), "context full") != NULL, "%s", optiml_last_error());
    CHECK(optiml_kv_seq_pos_max(ctx, 0) == 9, "a failed decode leaves the cache as it was");
    b.n_tokens = 0;
    fill(&b, prompt, 1, 10, 0, false);
    b.token[0] = 512;
    CHECK(optiml_decode(ctx, &b) == OPTIML_ERR_INVALID_ARG && strstr(optiml_last_error(), "token 512"));
    b.token[0] = 1;
    b.seq_id[0] = 1;
    CHECK(optiml_decode(ctx, &b) == OPTIML_ERR_INVALID_ARG && strstr(optiml_last_error(), "sequence id 1"));
    b.n_tokens = 0;
    CHECK(optiml_decode(ctx, &b) == OPTIML_ERR_INVALID_ARG);
    CHECK(optiml_decode(NULL, &b) == OPTIML_ERR_INVALID_ARG);
    optiml_context_free(ctx);

    /* tokenizer through the public API */
    optiml_token toks[16];
    int32_t n = optiml_tokenize(m, "Once upon a time", 16, toks, 16, true, false);
    CHECK(n == 5 && memcmp(toks, prompt, 5 * sizeof(optiml_token)) == 0, "n = %d", n);
    CHECK(optiml_tokenize(m, "Once upon a time", 16, toks, 2, true, false) == -5);
    CHECK(optiml_token_bos(m) == 1 && optiml_token_eos(m) == 2 && optiml_token_is_eog(m, 2));
    char piece[16];
    CHECK(optiml_token_to_piece(m, 403, piece, sizeof(piece), true, false) == 4 && memcmp(piece, "Once", 4) == 0);

    /* loading errors name the file */
    optiml_model *bad = NULL;
    CHECK(optiml_model_load("/nonexistent.gguf", NULL, &bad) == OPTIML_ERR_IO && bad == NULL);
    CHECK(strstr(optiml_last_error(), "/nonexistent.gguf") != NULL, "%s", optiml_last_error());

    optiml_batch_free(b);
    optiml_model_free(m);
    return test_summary("test_context");
}
