/*
 * test_powerinfer.c - PowerInfer files (magic "PWRI", src/powerinfer.c,
 * docs/FORMAT.md "PowerInfer files") load as they are and run sparse.
 *
 * Small ReLU models are written in PowerInfer's layout (the GGUF writer,
 * then the magic patched to "PWRI"): no optiml.* keys, ffn_down only as
 * ffn_down_t, predictors fc1/fc2 that read the residual before the FFN's
 * RMSNorm (ffn_norm weights are not 1, so that matters), and next to each
 * one the same model as an OptiML GGUF built here by hand (ffn_down
 * transposed, fc1 / ffn_norm, relu or drelu, threshold just below 0).
 *   - the loader's ffn_down is the transpose of ffn_down_t bit for bit
 *     (f32, f16; q8_0 from exactly representable values);
 *   - dense and predictor logits of the PWRI file equal those of the
 *     OptiML file bit for bit, and oracle / predictor logits equal the
 *     dense ones to float rounding (1e-4 relative; 1e-2 for q8_0);
 *   - PowerInfer's rule, computed here in double on the un-normed input
 *     with the file's fc1 (score = fc2 relu(fc1 x) >= threshold), picks
 *     the same neurons as the loaded predictor on the normed input, for
 *     random inputs and for x = 0 (all scores 0: every neuron active);
 *   - bamboo files run relu(gate) * relu(up); a .generated.gpuidx-style
 *     file (PWRI, ggml's old i32 = 18) parses; corrupt files fail with a
 *     message naming the problem.
 */
#define _POSIX_C_SOURCE 200809L
#include "gguf.h"
#include "model.h"
#include "optiml.h"
#include "quant.h"
#include "sparse.h"
#include "test.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N_EMBD 128
#define N_FF 256
#define N_LAYER 2
#define N_HEAD 4
#include "sparse_test_util.h"

struct opts {
    uint32_t type;      /* attention, gate, up, output                       */
    uint32_t down_type; /* ffn_down_t (and the reference's ffn_down)        */
    bool bamboo, optiml_ref;
    float threshold;    /* powerinfer.sparse_threshold; NAN: key absent     */
    /* error injection */
    bool no_down_t, bad_arch;
};

/* what the test knows of the model last written: fc1 as the file holds it
 * (dequantized), fc2, ffn_norm, ffn_down_t (dequantized) */
#define R (2 * N_FF) /* predictor rank */
static float g_fc1[N_LAYER][R * N_EMBD], g_fc2[N_LAYER][N_FF * R], g_norm[N_LAYER][N_EMBD];
static float g_down_t[N_LAYER][N_FF * N_EMBD];

static void set_magic(const char *path, const char *magic) {
    FILE *fp = fopen(path, "r+b");
    CHECK(fp && fwrite(magic, 1, 4, fp) == 4 && fclose(fp) == 0, "patching %s", path);
}

/* A PowerInfer file, or (optiml_ref) the same model as an OptiML GGUF. The
 * gate makes about 12% of the neurons fire (as tests/test_sparse.c); the
 * predictor's score is linear in its input, g_i + 0.03 mean(x) with g the
 * gate as stored (hidden rows g_i + d and -(g_i + d), fc2 = (1, -1)): on
 * the normed input that covers every neuron that fires; the file's fc1 is
 * that times ffn_norm per column, as PowerInfer's reads the raw input. */
static void write_model(const char *path, const struct opts *o) {
    const char *arch = o->bad_arch ? "falcon" : o->bamboo && !o->optiml_ref ? "bamboo" : "llama";
    gguf_writer *w = model_begin(0x7654321ull, arch);
    char key[64];
    snprintf(key, sizeof(key), "%s.attention.layer_norm_rms_epsilon", arch);
    gguf_writer_set_f32(w, key, 1e-5f);
    if (o->optiml_ref) {
        gguf_writer_set_str(w, "optiml.ffn_activation", o->bamboo ? "drelu" : "relu");
        float thr[N_LAYER];
        for (int i = 0; i < N_LAYER; i++) thr[i] = -FLT_TRUE_MIN; /* logit >= 0 */
        gguf_writer_set_arr(w, "optiml.sparse.layer_threshold", GGUF_TYPE_FLOAT32, thr, N_LAYER);
    } else if (!isnan(o->threshold)) {
        gguf_writer_set_f32(w, "powerinfer.sparse_threshold", o->threshold);
    }
    vocab_keys(w, false);
    float *emb = keep(malloc((size_t)N_VOCAB * N_EMBD * sizeof(float)));
    for (int64_t i = 0; i < N_VOCAB * N_EMBD; i++) emb[i] = 0.6f + 0.7f * rnd() * 1.7f;
    add(w, "token_embd.weight", DTYPE_F32, N_EMBD, N_VOCAB, emb);
    float *ones = ones_embd();
    add(w, "output_norm.weight", DTYPE_F32, N_EMBD, 1, ones);
    add(w, "output.weight", o->type, N_EMBD, N_VOCAB, randm(N_VOCAB * N_EMBD, 0.1f));
    for (int il = 0; il < N_LAYER; il++) {
        char name[64];
#define NAME(s) (snprintf(name, sizeof(name), "blk.%d." s, il), name)
        add(w, NAME("attn_norm.weight"), DTYPE_F32, N_EMBD, 1, ones);
        for (int j = 0; j < N_EMBD; j++) g_norm[il][j] = 0.5f + 0.5f * (rnd() + 1.0f); /* [0.5, 1.5) */
        add(w, NAME("ffn_norm.weight"), DTYPE_F32, N_EMBD, 1, g_norm[il]);
        add(w, NAME("attn_q.weight"), o->type, N_EMBD, N_EMBD, randm(N_EMBD * N_EMBD, 0.1f));
        add(w, NAME("attn_k.weight"), o->type, N_EMBD, N_EMBD, randm(N_EMBD * N_EMBD, 0.1f));
        add(w, NAME("attn_v.weight"), o->type, N_EMBD, N_EMBD, randm(N_EMBD * N_EMBD, 0.1f));
        add(w, NAME("attn_output.weight"), o->type, N_EMBD, N_EMBD, randm(N_EMBD * N_EMBD, 0.01f));
        float *gate = sparse_gate(rnd, 9.0f);
        add(w, NAME("ffn_gate.weight"), o->type, N_EMBD, N_FF, gate);
        /* bamboo: up positive where it matters half the time */
        add(w, NAME("ffn_up.weight"), o->type, N_EMBD, N_FF, randm(N_FF * N_EMBD, 0.1f));
        float *dt = g_down_t[il]; /* (n_embd, n_ff): row i = neuron i */
        for (int64_t i = 0; i < N_FF; i++)
            for (int64_t j = 0; j < N_EMBD; j++)
                dt[i * N_EMBD + j] = o->down_type == DTYPE_Q8_0 ? exact_value(j, i) : 0.2f * rnd();
        round_trip(o->down_type, N_FF * N_EMBD, dt);
        if (o->optiml_ref) add(w, NAME("ffn_down.weight"), o->down_type, N_FF, N_EMBD, transpose(dt, N_FF, N_EMBD));
        if (!o->no_down_t) add(w, NAME("ffn_down_t.weight"), o->down_type, N_EMBD, N_FF, dt);
        float *fc1 = g_fc1[il], *fc2 = g_fc2[il];
        float *g = keep(malloc((size_t)N_FF * N_EMBD * sizeof(float)));
        memcpy(g, gate, (size_t)N_FF * N_EMBD * sizeof(float));
        round_trip(o->type, N_FF * N_EMBD, g);
        for (int64_t i = 0; i < N_FF; i++)
            for (int64_t j = 0; j < N_EMBD; j++) {
                const float v = (g[i * N_EMBD + j] + 0.03f / N_EMBD) * g_norm[il][j];
                fc1[(2 * i) * N_EMBD + j] = v;
                fc1[(2 * i + 1) * N_EMBD + j] = -v;
            }
        memset(fc2, 0, sizeof(g_fc2[il]));
        for (int64_t i = 0; i < N_FF; i++) fc2[i * R + 2 * i] = 1.0f, fc2[i * R + 2 * i + 1] = -1.0f;
        if (o->optiml_ref) {
            float *folded = keep(malloc((size_t)R * N_EMBD * sizeof(float)));
            for (int64_t k = 0; k < R; k++)
                for (int64_t j = 0; j < N_EMBD; j++) folded[k * N_EMBD + j] = fc1[k * N_EMBD + j] / g_norm[il][j];
            add(w, NAME("fc1.weight"), DTYPE_F32, N_EMBD, R, folded);
        } else {
            add(w, NAME("fc1.weight"), DTYPE_F32, N_EMBD, R, fc1);
        }
        add(w, NAME("fc2.weight"), DTYPE_F32, R, N_FF, fc2);
#undef NAME
    }
    model_end(w, path);
    if (!o->optiml_ref) set_magic(path, "PWRI");
}

/* ---- runs ---------------------------------------------------------------- */

/* ---- checks -------------------------------------------------------------- */

static float la[N_TOK * N_VOCAB], lb[N_TOK * N_VOCAB];

static optiml_model *load(const char *label, const char *path) {
    optiml_model *m = NULL;
    if (optiml_model_load(path, NULL, &m) != OPTIML_OK) CHECK(false, "%s: load %s: %s", label, path, optiml_last_error());
    return m;
}

/* ffn_down built by the loader = the transpose of ffn_down_t, as bytes of
 * the reference file's ffn_down. */
static void check_down(const char *label, const optiml_model *pw, const optiml_model *ref) {
    bool same = true;
    for (int il = 0; il < N_LAYER; il++) {
        const struct tensor *a = &pw->layers[il].ffn_down, *b = &ref->layers[il].ffn_down;
        same = same && a->type == b->type && a->row_size == b->row_size && a->ne[0] == N_FF && a->ne[1] == N_EMBD &&
               memcmp(a->data, b->data, a->row_size * N_EMBD) == 0;
    }
    printf("%s load: %s: ffn_down (%s) = transpose of ffn_down_t, byte for byte\n", same ? "PASS" : "FAIL", label,
           dtype_name(pw->layers[0].ffn_down.type));
    CHECK(same, "%s: ffn_down", label);
    const bool thr = pw->sparse.layer_threshold[0] == -FLT_TRUE_MIN && pw->sparse.layer_threshold[1] == -FLT_TRUE_MIN;
    printf("%s load: %s: activation %d, threshold %g, predictor %d\n", thr ? "PASS" : "FAIL", label,
           (int)pw->hp.ffn_act, (double)pw->sparse.layer_threshold[0], (int)pw->sparse.has_predictor);
    CHECK(thr && pw->sparse.has_predictor && pw->hp.ffn_act == ref->hp.ffn_act, "%s: keys", label);
}

/* PowerInfer's rule in double on the un-normed x against the loaded
 * predictor on rmsnorm(x) * ffn_norm: the same active neurons, except
 * where |score| is within rounding of 0. */
static void check_rule(const char *label, const optiml_model *m) {
    static float x[N_EMBD], xn[N_EMBD], logits[N_FF], scratch[2 * R + N_EMBD]; /* hidden, then a row of fc1 or fc2 */
    static bool ctl[N_FF];
    int n_diff = 0, n_active = 0, n_all = 0, n_ctl = 0;
    for (int trial = 0; trial < 41; trial++) {
        const int il = trial % N_LAYER;
        double ss = 0;
        for (int j = 0; j < N_EMBD; j++) ss += (double)(x[j] = trial == 40 ? 0.0f : 3.0f * (0.6f + rnd()));
        ss = 0;
        for (int j = 0; j < N_EMBD; j++) ss += (double)x[j] * x[j];
        const double s = sqrt(ss / N_EMBD + 1e-5);
        for (int j = 0; j < N_EMBD; j++) xn[j] = (float)(x[j] / s) * g_norm[il][j];
        /* negative control: the predictor on x / s without the norm weight
         * (what a loader that did not fold ffn_norm would see) must differ */
        for (int j = 0; j < N_EMBD; j++) xn[j] = (float)(x[j] / s);
        sparse_predict_row(m, il, xn, scratch, logits);
        for (int i = 0; i < N_FF; i++) ctl[i] = logits[i] > m->sparse.layer_threshold[il];
        for (int j = 0; j < N_EMBD; j++) xn[j] = (float)(x[j] / s) * g_norm[il][j];
        for (int i = 0; i < N_FF; i++) logits[i] = NAN;
        sparse_predict_row(m, il, xn, scratch, logits);
        static double hidden[R];
        for (int k = 0; k < R; k++) {
            double h = 0;
            for (int j = 0; j < N_EMBD; j++) h += (double)g_fc1[il][k * N_EMBD + j] * x[j];
            hidden[k] = h > 0 ? h : 0;
        }
        for (int i = 0; i < N_FF; i++) {
            double score = 0, mag = 0;
            for (int k = 0; k < R; k++) {
                score += (double)g_fc2[il][i * R + k] * hidden[k];
                mag += fabs((double)g_fc2[il][i * R + k] * hidden[k]);
            }
            const bool pi = score >= 0.0, ours = logits[i] > m->sparse.layer_threshold[il];
            n_active += pi;
            n_all += trial == 40 && ours;
            if (pi != ours && fabs(score) > 1e-5 * (mag + 1e-30)) n_diff++;
            n_ctl += pi != ctl[i];
        }
    }
    const bool ok = n_diff == 0 && n_all == N_FF && n_active > 0 && n_active < 41 * N_FF && n_ctl > 10;
    printf("%s rule: %s: PowerInfer's score >= 0 on raw x vs ours: %d differences, %d active, x = 0: %d of %d "
           "active; without the norm weight: %d differences (must be > 10)\n",
           ok ? "PASS" : "FAIL", label, n_diff, n_active, n_all, N_FF, n_ctl);
    CHECK(ok, "%s: predictor rule", label);
}

/* tol: sparse against dense; quantized models round the FFN's output into
 * 8-bit activations of later matmuls, as in tests/test_sparse.c */
static void check_logits(const char *label, const char *pw_path, const char *ref_path, double tol) {
    optiml_model *pw = load(label, pw_path), *ref = load(label, ref_path);
    if (!pw || !ref) {
        optiml_model_free(pw);
        optiml_model_free(ref);
        return;
    }
    check_down(label, pw, ref);
    check_rule(label, pw);
    for (int batched = 0; batched < 2; batched++) {
        double sa, sb;
        /* same model twice: dense and predictor bit for bit */
        for (int mode = 1; mode <= 3; mode += 2) {
            if (!run(pw, mode, 2, batched, la, &sa) || !run(ref, mode, 2, batched, lb, &sb)) continue;
            const bool ok = memcmp(la, lb, sizeof(la)) == 0 && rel_diff(la, lb) == 0.0;
            printf("%s %s %-8s %s: PWRI file = OptiML file, bit for bit\n", ok ? "PASS" : "FAIL", label,
                   mode == 1 ? "dense" : "predictor", batched ? "batch" : "1 by 1");
            CHECK(ok, "%s mode %d", label, mode);
        }
        /* sparse against dense on the PWRI file */
        for (int mode = 2; mode <= 3; mode++) {
            if (!run(pw, 1, 2, batched, lb, &sb) || !run(pw, mode, 2, batched, la, &sa)) continue;
            const double d = rel_diff(la, lb);
            const bool ok = d <= tol && sa > 0.0 && sa < 0.5;
            printf("%s %s %-8s %s vs dense: max rel diff %.3g (tol %.0e), active %.1f%%\n", ok ? "PASS" : "FAIL",
                   label, mode == 2 ? "oracle" : "predictor", batched ? "batch" : "1 by 1", d, tol, 100.0 * sa);
            CHECK(ok, "%s sparse mode %d", label, mode);
        }
    }
    optiml_model_free(pw);
    optiml_model_free(ref);
}

/* A .generated.gpuidx as powerinfer-py writes it: PWRI, version 3, per
 * layer gpu_idx (n_ff) and gpu_bucket, ggml's old i32 (18). */
static void check_gpuidx(const char *path, uint32_t i32_type, optiml_status want) {
    static int32_t idx[N_FF], bucket[8];
    for (int i = 0; i < N_FF; i++) idx[i] = i < 8;
    for (int i = 0; i < 8; i++) bucket[i] = i;
    gguf_writer *w = gguf_writer_init();
    gguf_writer_set_str(w, "general.architecture", "generic.gpu_index");
    gguf_writer_set_u32(w, "generic.gpu_index.block_count", 1);
    gguf_writer_set_u64(w, "split.vram_capacity", 4096);
    /* our writer knows i32 as 26: write that, then put the old number in */
    const uint64_t ne_idx[1] = {N_FF}, ne_b[1] = {8};
    gguf_writer_add_tensor(w, "blk.0.gpu_idx", DTYPE_I32, 1, ne_idx, idx);
    gguf_writer_add_tensor(w, "blk.0.gpu_bucket", DTYPE_I32, 1, ne_b, bucket);
    CHECK(gguf_writer_write(w, path) == OPTIML_OK, "%s", optiml_last_error());
    gguf_writer_free(w);
    FILE *fp = fopen(path, "r+b");
    static uint8_t img[1 << 16];
    size_t n = fp ? fread(img, 1, sizeof(img), fp) : 0;
    if (fp) fclose(fp);
    memcpy(img, "PWRI", 4);
    int patched = 0;
    for (size_t i = 0; i + 4 <= n; i++) { /* the type field after each tensor's 1 dim */
        uint32_t v;
        memcpy(&v, img + i, 4);
        if (v == DTYPE_I32 && i >= 8 && (memcmp(img + i - 8, ne_idx, 8) == 0 || memcmp(img + i - 8, ne_b, 8) == 0)) {
            memcpy(img + i, &i32_type, 4);
            patched++;
        }
    }
    gguf_file *f = NULL;
    const optiml_status st = gguf_parse(img, n, "gpuidx", &f);
    bool ok = patched == 2 && st == want;
    if (ok && st == OPTIML_OK) {
        const struct gguf_tensor_info *t = gguf_find_tensor(f, "blk.0.gpu_idx");
        ok = f->powerinfer && t && t->type == DTYPE_I32 && memcmp(t->data, idx, sizeof(idx)) == 0;
    }
    printf("%s gpuidx: PWRI file with tensor type %u: status %d %s\n", ok ? "PASS" : "FAIL", i32_type, (int)st,
           st == OPTIML_OK ? "" : optiml_last_error());
    CHECK(ok, "gpuidx type %u", i32_type);
    gguf_close(f);
}

int main(void) {
    char pw[64], ref[64];
    snprintf(pw, sizeof(pw), "/tmp/test_pwri_%d.gguf", (int)getpid());
    snprintf(ref, sizeof(ref), "/tmp/test_pwri_ref_%d.gguf", (int)getpid());
    const struct {
        const char *label;
        uint32_t type, down_type;
        bool bamboo;
    } cases[] = {
        {"llama f32", DTYPE_F32, DTYPE_F32, false},
        {"llama f16", DTYPE_F16, DTYPE_F16, false},
        {"llama q8_0, q8_0 down_t", DTYPE_Q8_0, DTYPE_Q8_0, false},
        {"bamboo f16", DTYPE_F16, DTYPE_F16, true},
    };
    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
        struct opts o = {.type = cases[k].type, .down_type = cases[k].down_type, .bamboo = cases[k].bamboo,
                         .threshold = k == 0 ? NAN : 0.0f};
        write_model(pw, &o);
        o.optiml_ref = true;
        write_model(ref, &o);
        check_logits(cases[k].label, pw, ref, cases[k].type == DTYPE_Q8_0 ? 1e-2 : 1e-4);
    }

    /* a non-zero threshold is kept (largest float below it) */
    write_model(pw, &(struct opts){.type = DTYPE_F32, .down_type = DTYPE_F32, .threshold = 0.25f});
    optiml_model *m = load("threshold 0.25", pw);
    const bool thr_ok = m && m->sparse.layer_threshold[1] == nextafterf(0.25f, -INFINITY);
    printf("%s threshold 0.25 -> %.9g\n", thr_ok ? "PASS" : "FAIL", m ? (double)m->sparse.layer_threshold[1] : NAN);
    CHECK(thr_ok, "threshold");
    optiml_model_free(m);

    write_model(pw, &(struct opts){.type = DTYPE_F32, .down_type = DTYPE_F32, .threshold = INFINITY});
    expect_load_error("infinite threshold", pw, OPTIML_ERR_FORMAT, "powerinfer.sparse_threshold");
    write_model(pw, &(struct opts){.type = DTYPE_F32, .down_type = DTYPE_F32, .no_down_t = true});
    expect_load_error("no down, no down_t", pw, OPTIML_ERR_FORMAT, "blk.0.ffn_down_t.weight");
    write_model(pw, &(struct opts){.type = DTYPE_F32, .down_type = DTYPE_F32, .bad_arch = true});
    expect_load_error("falcon", pw, OPTIML_ERR_UNSUPPORTED, "falcon");
    write_model(pw, &(struct opts){.type = DTYPE_F32, .down_type = DTYPE_F32, .bamboo = true});
    set_magic(pw, "GGUF"); /* bamboo is PowerInfer's; and GGUF needs ffn_down */
    expect_load_error("bamboo as GGUF", pw, OPTIML_ERR_UNSUPPORTED, "bamboo");
    write_model(pw, &(struct opts){.type = DTYPE_F32, .down_type = DTYPE_F32});
    set_magic(pw, "PWRJ");
    expect_load_error("bad magic", pw, OPTIML_ERR_FORMAT, "magic");

    check_gpuidx(pw, 18, OPTIML_OK);
    check_gpuidx(pw, 19, OPTIML_ERR_UNSUPPORTED);
    unlink(pw);
    unlink(ref);
    return test_summary("test_powerinfer");
}
