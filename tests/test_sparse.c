/*
 * test_sparse.c - the sparse FFN (src/sparse.c) against the dense FFN.
 *
 * Small ReLU-family models are written here with the GGUF writer: their
 * embeddings share a positive offset and each gate row has a negative
 * component along it, so about 12% of the neurons fire per token (as in
 * ReLU-sparse LLMs; a batch's union stays sparse). For each weight type
 * (f32, f16, q8_0, q4_0, q4_k gate/up and attention; f16 down and down_t,
 * whose transposition is exact):
 *   - oracle mode (exact active set) gives the dense logits to float
 *     rounding: |diff| <= 1e-4 * max(1, |logit|) (the down sums run in
 *     another order), token by token with 1, 2 and 3 threads (3: uneven
 *     shares of the one-token path's chunks and of its active list) and
 *     in one batch with 1 and 2; 1e-2 for the quantized types, where such
 *     a rounding difference can move an 8-bit activation of a later
 *     matmul by one step (gate and up themselves are bit for bit the dense
 *     ones);
 *   - a negative control: a predictor threshold that drops the neurons
 *     with small gates must miss the dense logits by more than 10x that;
 *   - predictor mode with a perfect-recall predictor (fc1 = the gate rows
 *     dequantized plus a small shift, fc2 = identity, threshold 0: every
 *     neuron with gate > 0 is predicted) gives the same;
 *   - the FFN statistics say the sparse path ran (active share < 30%);
 *   - token by token with 3 threads, a second run gives the same logits
 *     bit for bit (the threads' shares never depend on timing);
 *   - a predictor threshold below every logit (all neurons predicted
 *     active) hands every layer to the dense FFN: the dense logits bit for
 *     bit, active share 100%.
 * Then: no ffn_down_t (the dense down matmul on the sparse h: bit for bit
 * the dense logits), drelu, relu_nogate, FATReLU
 * (act_threshold), q8_0 down/down_t built from exactly representable
 * values (only the dense path's 8-bit h differs: looser tolerance), and
 * the load and init errors.
 */
#define _POSIX_C_SOURCE 200809L
#include "context.h"
#include "gguf.h"
#include "model.h"
#include "optiml.h"
#include "quant.h"
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N_EMBD 256
#define N_FF 512
#define N_LAYER 2
#define N_HEAD 4
#include "sparse_test_util.h"

struct opts {
    uint32_t type;      /* gate, up, attention, output                     */
    uint32_t down_type; /* ffn_down and ffn_down_t                         */
    const char *act;
    bool down_t, pred, exact_down; /* exact_down: values k * 2^-9, see below */
    float act_threshold, pred_threshold;
    /* error injection */
    bool fc1_only, bad_fc2_shape, bad_thresholds, fc1_q4_0;
    uint32_t version;
};

/* ---- model writer ------------------------------------------------------ */

/* Down weights exactly representable in q8_0 (exact_value). */
static float *exact_down(void) {
    float *v = keep(malloc((size_t)N_FF * N_EMBD * sizeof(float)));
    for (int64_t r = 0; r < N_EMBD; r++)
        for (int64_t c = 0; c < N_FF; c++) v[r * N_FF + c] = exact_value(r, c);
    return v;
}

static void write_model(const char *path, const struct opts *o) {
    gguf_writer *w = model_begin(0x1234567ull, "llama");
    gguf_writer_set_str(w, "optiml.ffn_activation", o->act);
    if (o->version) gguf_writer_set_u32(w, "optiml.sparse.version", o->version);
    if (o->act_threshold > 0) gguf_writer_set_f32(w, "optiml.sparse.act_threshold", o->act_threshold);
    float thr[N_LAYER + 1];
    for (int i = 0; i <= N_LAYER; i++) thr[i] = o->pred_threshold;
    gguf_writer_set_arr(w, "optiml.sparse.layer_threshold", GGUF_TYPE_FLOAT32, thr,
                        o->bad_thresholds ? N_LAYER + 1 : N_LAYER);
    vocab_keys(w, true);

    /* embeddings: offset 0.6 in every dimension plus noise */
    float *emb = keep(malloc((size_t)N_VOCAB * N_EMBD * sizeof(float)));
    for (int64_t i = 0; i < N_VOCAB * N_EMBD; i++) emb[i] = 0.6f + 0.8f * gauss();
    add(w, "token_embd.weight", DTYPE_F32, N_EMBD, N_VOCAB, emb);
    float *ones = ones_embd();
    add(w, "output_norm.weight", DTYPE_F32, N_EMBD, 1, ones);
    add(w, "output.weight", o->type, N_EMBD, N_VOCAB, randm(N_VOCAB * N_EMBD, 0.1f));
    const bool nogate = !strcmp(o->act, "relu_nogate");
    for (int il = 0; il < N_LAYER; il++) {
        char name[64];
#define NAME(s) (snprintf(name, sizeof(name), "blk.%d." s, il), name)
        add(w, NAME("attn_norm.weight"), DTYPE_F32, N_EMBD, 1, ones);
        add(w, NAME("ffn_norm.weight"), DTYPE_F32, N_EMBD, 1, ones);
        add(w, NAME("attn_q.weight"), o->type, N_EMBD, N_EMBD, randm(N_EMBD * N_EMBD, 0.1f));
        add(w, NAME("attn_k.weight"), o->type, N_EMBD, N_EMBD, randm(N_EMBD * N_EMBD, 0.1f));
        add(w, NAME("attn_v.weight"), o->type, N_EMBD, N_EMBD, randm(N_EMBD * N_EMBD, 0.1f));
        add(w, NAME("attn_output.weight"), o->type, N_EMBD, N_EMBD, randm(N_EMBD * N_EMBD, 0.01f));
        /* gate (up without a gate): P(> 0) about 0.12 */
        float *gate = sparse_gate(gauss, 16.0f);
        float *up = randm(N_FF * N_EMBD, 0.1f);
        if (!nogate) add(w, NAME("ffn_gate.weight"), o->type, N_EMBD, N_FF, gate);
        add(w, NAME("ffn_up.weight"), o->type, N_EMBD, N_FF, nogate ? gate : up);
        float *down = o->exact_down ? exact_down() : randm(N_FF * N_EMBD, 0.2f);
        add(w, NAME("ffn_down.weight"), o->down_type, N_FF, N_EMBD, down);
        if (o->down_t) add(w, NAME("ffn_down_t.weight"), o->down_type, N_EMBD, N_FF, transpose(down, N_EMBD, N_FF));
        if (o->pred) {
            /* fc1 = the gate rows as the model holds them plus 0.03 / n
             * (logit = relu(gate + ~0.02): covers the dense path's 8-bit
             * activations), fc2 = identity */
            float *fc1 = keep(malloc((size_t)N_FF * N_EMBD * sizeof(float)));
            memcpy(fc1, gate, (size_t)N_FF * N_EMBD * sizeof(float));
            round_trip(o->type, N_FF * N_EMBD, fc1);
            for (int64_t i = 0; i < N_FF * N_EMBD; i++) fc1[i] += 0.03f / N_EMBD;
            float *fc2 = keep(calloc((size_t)N_FF * N_FF, sizeof(float)));
            for (int64_t i = 0; i < N_FF; i++) fc2[i * N_FF + i] = 1.0f;
            add(w, NAME("fc1.weight"), o->fc1_q4_0 ? DTYPE_Q4_0 : DTYPE_F32, N_EMBD, N_FF, fc1);
            if (!o->fc1_only)
                add(w, NAME("fc2.weight"), DTYPE_F32, N_FF, o->bad_fc2_shape ? N_FF / 2 : N_FF, fc2);
        }
#undef NAME
    }
    model_end(w, path);
}

/* ---- runs ---------------------------------------------------------------- */

static float dense[N_TOK * N_VOCAB], sparse[N_TOK * N_VOCAB];

enum expect {
    EXPECT_MATCH, /* the logits match within tol, the sparse path ran       */
    EXPECT_MISS,  /* a negative control: they differ by more than 10 * tol */
    EXPECT_DENSE, /* every layer went to the dense FFN: within tol (0)     */
};

/* Sparse mode `mode` against dense, batched and token by token. */
static void compare(const char *label, const char *path, int mode, double tol, enum expect want) {
    /* the one-token path splits the work two ways (8 chunks of 64 neurons,
     * then slices of the joined active list): uneven shares at 3 threads,
     * slices across the threads' lists (more threads: slow on 2 cores) */
    static const int thread_counts[2][3] = {{1, 2, 3}, {1, 2}}; /* token by token, batched */
    optiml_model *m = NULL;
    if (optiml_model_load(path, NULL, &m) != OPTIML_OK) {
        CHECK(false, "%s: load: %s", label, optiml_last_error());
        return;
    }
    for (int batched = 0; batched < 2; batched++)
        for (int ti = 0; ti < 3 && thread_counts[batched][ti]; ti++) {
            const int threads = thread_counts[batched][ti];
            double share_d, share_s;
            if (!run(m, 1, threads, batched, dense, &share_d) || !run(m, mode, threads, batched, sparse, &share_s))
                continue;
            const double d = rel_diff(sparse, dense);
            const bool match = want != EXPECT_MISS;
            const bool ran = want == EXPECT_DENSE ? share_s == 1.0 : share_s > 0.0 && share_s < 0.3;
            const bool ok = (match ? d <= tol : d > 10 * tol) && ran && share_d == -1.0;
            printf("%s %s: %-30s %s, %d thr: max rel diff %.3g (%s %.0e), active %.1f%%\n", ok ? "PASS" : "FAIL",
                   mode == 2 ? "oracle   " : "predictor", label, batched ? "batch" : "1 by 1", threads, d,
                   match ? "tol" : "must exceed", match ? tol : 10 * tol, 100.0 * share_s);
            CHECK(ok, "%s", label);
            if (batched || threads != 3) continue;
            /* which thread sums which neurons depends on the mask and the
             * thread count only: a second run gives the same bits */
            static float again[N_TOK * N_VOCAB];
            double share_a;
            const bool same = run(m, mode, threads, false, again, &share_a) && !memcmp(again, sparse, sizeof(again));
            printf("%s %s: %-30s 1 by 1, %d thr: a second run gives the same logits bit for bit\n",
                   same ? "PASS" : "FAIL", mode == 2 ? "oracle   " : "predictor", label, threads);
            CHECK(same, "%s: second run", label);
        }
    optiml_model_free(m);
}

int main(void) {
    char path[64];
    snprintf(path, sizeof(path), "/tmp/test_sparse_%d.gguf", (int)getpid());
    const uint32_t types[] = {DTYPE_F32, DTYPE_F16, DTYPE_Q8_0, DTYPE_Q4_0, DTYPE_Q4_K};
    for (size_t k = 0; k < sizeof(types) / sizeof(types[0]); k++) {
        char label[64];
        snprintf(label, sizeof(label), "relu %s", dtype_name(types[k]));
        write_model(path, &(struct opts){.type = types[k], .down_type = DTYPE_F16, .act = "relu", .down_t = true,
                                         .pred = true, .version = 1});
        /* quantized: the FFN's float rounding moves some 8-bit activations
         * of later matmuls by one step */
        const double tol = types[k] == DTYPE_F32 || types[k] == DTYPE_F16 ? 1e-4 : 1e-2;
        compare(label, path, 2, tol, EXPECT_MATCH);
        compare(label, path, 3, tol, EXPECT_MATCH);
        /* negative control: a threshold that drops neurons with small gates */
        write_model(path, &(struct opts){.type = types[k], .down_type = DTYPE_F16, .act = "relu", .down_t = true,
                                         .pred = true, .version = 1, .pred_threshold = 0.3f});
        compare(label, path, 3, tol, EXPECT_MISS);
    }
    /* the predicted logits are the hidden layer (fc2 = identity), >= 0 >
     * -1: all neurons, over the dense hand-back share (SPARSE_DENSE_FRAC,
     * 0.6), token by token and batched */
    write_model(path, &(struct opts){.type = DTYPE_Q4_0, .down_type = DTYPE_F16, .act = "relu", .down_t = true,
                                     .pred = true, .version = 1, .pred_threshold = -1.0f});
    compare("relu q4_0, all predicted", path, 3, 0.0, EXPECT_DENSE);
    write_model(path, &(struct opts){.type = DTYPE_Q8_0, .down_type = DTYPE_Q4_0, .act = "relu"});
    compare("relu q8_0, no down_t", path, 2, 0.0, EXPECT_MATCH); /* the dense down on the same h */
    write_model(path, &(struct opts){.type = DTYPE_F16, .down_type = DTYPE_F16, .act = "drelu", .down_t = true});
    compare("drelu f16", path, 2, 1e-4, EXPECT_MATCH);
    write_model(path, &(struct opts){.type = DTYPE_Q4_0, .down_type = DTYPE_F16, .act = "relu_nogate", .down_t = true});
    compare("relu_nogate q4_0", path, 2, 1e-2, EXPECT_MATCH);
    write_model(path, &(struct opts){.type = DTYPE_F32, .down_type = DTYPE_F32, .act = "relu2", .down_t = true,
                                     .act_threshold = 0.05f, .version = 1});
    compare("relu2 f32 FATReLU 0.05", path, 2, 1e-4, EXPECT_MATCH);
    /* the dense FFN multiplies q8_0 down rows by h quantized to 8 bits;
     * the sparse one scales f32 down_t rows by the f32 h */
    write_model(path, &(struct opts){.type = DTYPE_Q8_0, .down_type = DTYPE_Q8_0, .act = "relu", .down_t = true,
                                     .exact_down = true});
    compare("relu q8_0, exact q8_0 down_t", path, 2, 5e-2, EXPECT_MATCH);

    /* errors: the model each writes must fail to load with that message */
    const struct load_error errors[] = {
        {"fc1 without fc2",
         &(struct opts){.type = DTYPE_F32, .down_type = DTYPE_F32, .act = "relu", .pred = true, .fc1_only = true},
         OPTIML_ERR_FORMAT, "without blk.0.fc2.weight"},
        {"fc2 shape",
         &(struct opts){.type = DTYPE_F32, .down_type = DTYPE_F32, .act = "relu", .pred = true, .bad_fc2_shape = true},
         OPTIML_ERR_FORMAT, "blk.0.fc2.weight has shape"},
        {"fc1 type",
         &(struct opts){.type = DTYPE_F32, .down_type = DTYPE_F32, .act = "relu", .pred = true, .fc1_q4_0 = true},
         OPTIML_ERR_UNSUPPORTED, "expected f32, f16 or q8_0"},
        {"version 2", &(struct opts){.type = DTYPE_F32, .down_type = DTYPE_F32, .act = "relu", .version = 2},
         OPTIML_ERR_UNSUPPORTED, "optiml.sparse.version 2"},
        {"threshold count",
         &(struct opts){.type = DTYPE_F32, .down_type = DTYPE_F32, .act = "relu", .bad_thresholds = true},
         OPTIML_ERR_FORMAT, "layer_threshold has 3 values"},
        {"FATReLU on silu",
         &(struct opts){.type = DTYPE_F32, .down_type = DTYPE_F32, .act = "silu", .act_threshold = 0.1f},
         OPTIML_ERR_UNSUPPORTED, "act_threshold"},
    };
    expect_load_errors(path, errors, sizeof(errors) / sizeof(errors[0]));

    /* context init: mode 3 without predictors, unknown mode */
    write_model(path, &(struct opts){.type = DTYPE_F32, .down_type = DTYPE_F32, .act = "relu", .down_t = true});
    optiml_model *m = NULL;
    CHECK(optiml_model_load(path, NULL, &m) == OPTIML_OK, "%s", optiml_last_error());
    for (int mode = 3; m && mode <= 5; mode += 2) { /* 4 (cats) has its own test: test_cats.c */
        optiml_context *ctx = NULL;
        const optiml_status st = context_start(m, 16, mode, 0, &ctx);
        const bool ok = st == OPTIML_ERR_INVALID_ARG && !ctx && strstr(optiml_last_error(), "sparse_mode");
        printf("%s error: sparse_mode %d: %s\n", ok ? "PASS" : "FAIL", mode, optiml_last_error());
        CHECK(ok);
        optiml_context_free(ctx);
    }
    /* auto on a model without predictors: dense (no statistics) */
    double share = 0;
    if (m) run(m, 0, 2, true, dense, &share);
    CHECK(share == -1.0, "auto mode without predictors ran sparse (%g)", share);
    optiml_model_free(m);
    unlink(path);
    return test_summary("test_sparse");
}
