/*
 * sparse_tool - measures a sparse model for tests/python/test_synth.py:
 *
 *   sparse_tool MODEL [N_TOKENS]
 *
 * Runs N_TOKENS (default 256) random tokens through the dense FFN with an
 * FFN observer and prints one JSON object per line:
 *   {"layer": l, "sparsity": s, "recall": r, "mass_recall": m, "precision": p,
 *    "hot_share": h, "freq_err": e}
 *     s: share of (token, neuron) pairs with h == 0 (per-token sparsity),
 *     r: share of the active pairs the model's predictor predicts
 *        (sparse_predict_row, scalar), m: the same weighted by |h|,
 *     p: share of the predicted pairs that are active,
 *     h: share of the activations carried by the 20% most active neurons,
 *     e: mean |measured frequency - ffn_act_freq| over the neurons;
 * then {"hash": "<XXH64 of the FFN tensors, as optiml.sparse.weights_hash>",
 *       "key": "<the file's optiml.sparse.weights_hash>",
 *       "sparse_active": a, "dense_logits_diff": d}
 *     a: active share optiml_context_ffn_stats reports for the last token
 *        in predictor mode, d: max |logit difference| of that token
 *        between predictor mode and dense.
 */
#define _POSIX_C_SOURCE 200809L
#include "context.h"
#include "model.h"
#include "optiml.h"
#include "sparse.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

struct layer_stats {
    uint64_t n_pairs, n_active, n_pred, n_hit;
    double mass, mass_hit;
    uint64_t *count; /* (n_ff) tokens on which the neuron fired */
};

struct obs {
    const optiml_model *m;
    struct layer_stats *ls;
    float *scratch, *logits;
};

static void observe(void *user, int32_t il, int64_t n_tok, const float *x, const float *g, const float *h) {
    (void)g;
    struct obs *o = user;
    const int64_t n_embd = o->m->hp.n_embd, n_ff = o->m->hp.n_ff;
    struct layer_stats *s = &o->ls[il];
    const float thr = o->m->sparse.layer_threshold[il];
    for (int64_t t = 0; t < n_tok; t++) {
        sparse_predict_row(o->m, il, x + t * n_embd, o->scratch, o->logits);
        for (int64_t i = 0; i < n_ff; i++) {
            const float v = h[t * n_ff + i];
            const bool on = v != 0.0f, pred = o->logits[i] > thr;
            s->n_pairs++;
            s->n_active += on;
            s->n_pred += pred;
            s->n_hit += on && pred;
            s->mass += fabsf(v);
            if (pred) s->mass_hit += fabsf(v);
            s->count[i] += on;
        }
    }
}

static int cmp_desc(const void *a, const void *b) {
    const uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

static uint64_t ffn_hash(const optiml_model *m) {
    XXH64_state_t *st = XXH64_createState();
    XXH64_reset(st, 0);
    for (int32_t il = 0; il < m->hp.n_layer; il++) {
        const char *roles[3] = {"ffn_gate", "ffn_up", "ffn_down"};
        for (int r = 0; r < 3; r++) {
            char name[64];
            snprintf(name, sizeof(name), "blk.%d.%s.weight", il, roles[r]);
            const struct gguf_tensor_info *ti = gguf_find_tensor(m->file, name);
            if (ti) XXH64_update(st, ti->data, (size_t)ti->size);
        }
    }
    const uint64_t h = XXH64_digest(st);
    XXH64_freeState(st);
    return h;
}

static optiml_context *make_ctx(const optiml_model *m, int mode, uint32_t n_ctx) {
    optiml_context_params p = optiml_context_default_params();
    p.n_ctx = n_ctx;
    p.n_batch = 64;
    p.sparse_mode = mode;
    optiml_context *ctx = NULL;
    if (optiml_context_init(m, &p, &ctx) != OPTIML_OK) {
        fprintf(stderr, "sparse_tool: %s\n", optiml_last_error());
        exit(1);
    }
    return ctx;
}

/* Decode toks: all but the last in batches of 64, then the last alone
 * (a decode step), whose logits go to out (n_vocab). */
static void decode_all(optiml_context *ctx, const optiml_token *toks, int n, int n_vocab, float *out) {
    optiml_batch b = optiml_batch_init(64);
    for (int i = 0; i < n;) {
        const int end = i == n - 1 ? n : (i + 64 < n - 1 ? i + 64 : n - 1);
        b.n_tokens = 0;
        for (int j = i; j < end; j++) {
            b.token[b.n_tokens] = toks[j];
            b.pos[b.n_tokens] = j;
            b.seq_id[b.n_tokens] = 0;
            b.logits[b.n_tokens] = j == n - 1;
            b.n_tokens++;
        }
        if (optiml_decode(ctx, &b) != OPTIML_OK) {
            fprintf(stderr, "sparse_tool: %s\n", optiml_last_error());
            exit(1);
        }
        i = end;
    }
    memcpy(out, optiml_get_logits_ith(ctx, 0), (size_t)n_vocab * sizeof(float));
    optiml_batch_free(b);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: sparse_tool MODEL [N_TOKENS]\n");
        return 1;
    }
    const int n_tok = argc > 2 ? atoi(argv[2]) : 256;
    optiml_log_set(NULL, NULL, OPTIML_LOG_LEVEL_WARN);
    optiml_model *m = NULL;
    if (optiml_model_load(argv[1], NULL, &m) != OPTIML_OK) {
        fprintf(stderr, "sparse_tool: %s\n", optiml_last_error());
        return 1;
    }
    if (!m->sparse.has_predictor) {
        fprintf(stderr, "sparse_tool: the model has no predictors\n");
        return 1;
    }
    const struct hparams *hp = &m->hp;
    const int32_t hp_n_layer = hp->n_layer;
    optiml_token *toks = malloc((size_t)n_tok * sizeof(*toks));
    uint64_t s = 12345;
    for (int i = 0; i < n_tok; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        toks[i] = i == 0 ? 1 : (optiml_token)(3 + (s >> 33) % (uint64_t)(hp->n_vocab - 3));
    }

    /* dense run, observed */
    int64_t r_max = 0;
    for (int32_t il = 0; il < hp->n_layer; il++)
        if (m->layers[il].fc1.ne[1] > r_max) r_max = m->layers[il].fc1.ne[1];
    struct obs o = {.m = m, .ls = calloc((size_t)hp->n_layer, sizeof(struct layer_stats)),
                    .scratch = malloc((size_t)(r_max + (hp->n_embd > r_max ? hp->n_embd : r_max)) * sizeof(float)),
                    .logits = malloc((size_t)hp->n_ff * sizeof(float))};
    for (int32_t il = 0; il < hp->n_layer; il++) o.ls[il].count = calloc((size_t)hp->n_ff, sizeof(uint64_t));
    optiml_context *ctx = make_ctx(m, 1, (uint32_t)n_tok);
    context_set_ffn_observer(ctx, observe, &o);
    float *dense = malloc((size_t)hp->n_vocab * sizeof(float));
    float *sparse = malloc((size_t)hp->n_vocab * sizeof(float));
    decode_all(ctx, toks, n_tok, hp->n_vocab, dense);
    optiml_context_free(ctx);

    for (int32_t il = 0; il < hp->n_layer; il++) {
        struct layer_stats *ls = &o.ls[il];
        double freq_err = 0.0;
        const float *freq = m->layers[il].ffn_act_freq.data;
        for (int64_t i = 0; i < hp->n_ff; i++)
            freq_err += freq ? fabs((double)ls->count[i] / n_tok - freq[i]) : NAN;
        qsort(ls->count, (size_t)hp->n_ff, sizeof(uint64_t), cmp_desc);
        uint64_t top = 0;
        for (int64_t i = 0; i < hp->n_ff / 5; i++) top += ls->count[i];
        printf("{\"layer\": %d, \"sparsity\": %.5f, \"recall\": %.5f, \"mass_recall\": %.5f, \"precision\": %.5f, "
               "\"hot_share\": %.5f, \"freq_err\": %.5f}\n",
               il, 1.0 - (double)ls->n_active / (double)ls->n_pairs, (double)ls->n_hit / (double)ls->n_active,
               ls->mass_hit / ls->mass, (double)ls->n_hit / (double)ls->n_pred,
               (double)top / (double)ls->n_active, freq_err / hp->n_ff);
    }

    /* predictor mode: statistics and logits against dense */
    ctx = make_ctx(m, 3, (uint32_t)n_tok);
    decode_all(ctx, toks, n_tok, hp->n_vocab, sparse);
    uint64_t a = 0, t = 0;
    optiml_context_ffn_stats(ctx, &a, &t);
    optiml_context_free(ctx);
    double d = 0;
    for (int64_t i = 0; i < hp->n_vocab; i++) d = fmax(d, fabs((double)dense[i] - sparse[i]));
    const char *key = optiml_model_meta_str(m, "optiml.sparse.weights_hash");
    printf("{\"hash\": \"%016llx\", \"key\": \"%s\", \"sparse_active\": %.5f, \"dense_logits_diff\": %.6g}\n",
           (unsigned long long)ffn_hash(m), key ? key : "", t ? (double)a / (double)t : -1.0, d);
    optiml_model_free(m);
    for (int32_t il = 0; il < hp_n_layer; il++) free(o.ls[il].count);
    free(o.ls);
    free(o.scratch);
    free(o.logits);
    free(dense);
    free(sparse);
    free(toks);
    return 0;
}
