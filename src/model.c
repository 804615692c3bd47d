/*
 * model.c - loads a Llama-family GGUF file: reads the hyperparameters,
 * binds every weight to a view into the mapping (checking its shape and
 * type), and loads the vocabulary. Keys and tensor names: docs/FORMAT.md.
 * Then repacks the q4_0 and q4_k matrices the CPU multiplies (cpu/ops.h's x8).
 */
#define _DEFAULT_SOURCE /* madvise */
#define _POSIX_C_SOURCE 200809L
#include "model.h"

#include "gpu.h"
#include "powerinfer.h"
#include "threadpool.h"
#include "vocab.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* ---- hyperparameters --------------------------------------------------- */

static optiml_status key_u32(const gguf_file *f, const char *arch, const char *suffix, bool required,
                             uint32_t def, uint32_t *out) {
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    if (!required) return gguf_get_u32_or(f, key, def, out);
    optiml_status st = gguf_get_u32(f, key, out);
    if (st == OPTIML_ERR_INVALID_ARG)
        return optiml_fail(OPTIML_ERR_FORMAT, "missing required key %s", key);
    return st;
}

static optiml_status key_f32(const gguf_file *f, const char *arch, const char *suffix, float def,
                             float *out) {
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    return gguf_get_f32_or(f, key, def, out);
}

static optiml_status parse_ffn_act(const gguf_file *f, enum ffn_act *out) {
    struct gguf_str s;
    optiml_status st = gguf_get_str(f, "optiml.ffn_activation", &s);
    *out = FFN_ACT_SILU;
    if (st == OPTIML_ERR_INVALID_ARG) return OPTIML_OK; /* absent: SiLU, as Llama */
    TRY(st);
    static const struct { const char *name; enum ffn_act act; } acts[] = {
        {"silu", FFN_ACT_SILU},   {"relu", FFN_ACT_RELU},   {"relu2", FFN_ACT_RELU2},
        {"gelu", FFN_ACT_GELU},   {"drelu", FFN_ACT_DRELU}, {"relu_nogate", FFN_ACT_RELU_NOGATE},
    };
    for (size_t i = 0; i < sizeof(acts) / sizeof(acts[0]); i++)
        if (gguf_str_eq(s, acts[i].name)) {
            *out = acts[i].act;
            return OPTIML_OK;
        }
    return optiml_fail(OPTIML_ERR_UNSUPPORTED, "optiml.ffn_activation \"%.*s\" is not one of silu, relu, relu2, gelu, drelu, "
                       "relu_nogate",
                       (int)(s.n > 32 ? 32 : s.n), s.data);
}

static optiml_status load_hparams(optiml_model *m) {
    const gguf_file *f = m->file;
    const char *a = m->arch;
    struct hparams *hp = &m->hp;
    uint32_t v;
    TRY(key_u32(f, a, "embedding_length", true, 0, &v)); hp->n_embd = (int32_t)v;
    TRY(key_u32(f, a, "block_count", true, 0, &v)); hp->n_layer = (int32_t)v;
    TRY(key_u32(f, a, "feed_forward_length", true, 0, &v)); hp->n_ff = (int32_t)v;
    TRY(key_u32(f, a, "attention.head_count", true, 0, &v)); hp->n_head = (int32_t)v;
    TRY(key_u32(f, a, "attention.head_count_kv", false, (uint32_t)hp->n_head, &v)); hp->n_head_kv = (int32_t)v;
    TRY(key_u32(f, a, "context_length", false, 2048, &v)); hp->n_ctx_train = (int32_t)v;
    TRY(key_f32(f, a, "attention.layer_norm_rms_epsilon", 1e-5f, &hp->norm_eps));
    TRY(key_f32(f, a, "rope.freq_base", 10000.0f, &hp->rope_base));
    TRY(parse_ffn_act(f, &hp->ffn_act));

    if (hp->n_embd <= 0 || hp->n_layer <= 0 || hp->n_ff <= 0 || hp->n_head <= 0 || hp->n_head_kv <= 0 ||
        hp->n_ctx_train <= 0 || hp->n_embd > (1 << 20) || hp->n_layer > 4096 || hp->n_ff > (1 << 22) ||
        hp->n_head > 4096)
        return optiml_fail(OPTIML_ERR_FORMAT, "hyperparameters out of range: n_embd %d n_layer %d n_ff %d n_head %d n_head_kv %d context %d",
                           hp->n_embd, hp->n_layer, hp->n_ff, hp->n_head, hp->n_head_kv, hp->n_ctx_train);
    if (hp->n_head % hp->n_head_kv != 0)
        return optiml_fail(OPTIML_ERR_FORMAT, "n_head %d is not a multiple of n_head_kv %d", hp->n_head, hp->n_head_kv);
    uint32_t head_dim = (uint32_t)(hp->n_embd / hp->n_head);
    TRY(key_u32(f, a, "attention.key_length", false, head_dim, &v)); hp->head_dim = (int32_t)v;
    TRY(key_u32(f, a, "rope.dimension_count", false, (uint32_t)hp->head_dim, &v)); hp->n_rot = (int32_t)v;
    if (hp->head_dim <= 0 || hp->head_dim > 1024 || hp->n_rot <= 0 || hp->n_rot > hp->head_dim || hp->n_rot % 2)
        return optiml_fail(OPTIML_ERR_FORMAT, "head_dim %d / rope dimension %d invalid", hp->head_dim, hp->n_rot);
    if (!(hp->norm_eps > 0.0f && hp->norm_eps < 1.0f) || !(hp->rope_base > 1.0f))
        return optiml_fail(OPTIML_ERR_FORMAT, "norm epsilon %g or rope base %g invalid", hp->norm_eps, hp->rope_base);

    hp->rope_scale = 1.0f;
    char key[128];
    snprintf(key, sizeof(key), "%s.rope.scaling.type", a);
    struct gguf_str type;
    optiml_status st = gguf_get_str(f, key, &type);
    if (st == OPTIML_OK && gguf_str_eq(type, "linear")) {
        TRY(key_f32(f, a, "rope.scaling.factor", 1.0f, &hp->rope_scale));
        if (!(hp->rope_scale > 0.0f))
            return optiml_fail(OPTIML_ERR_FORMAT, "%s.rope.scaling.factor %g invalid", a, hp->rope_scale);
    } else if (st == OPTIML_OK && !gguf_str_eq(type, "none")) {
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "%s \"%.*s\" is not supported (none, linear)", key,
                           (int)(type.n > 32 ? 32 : type.n), type.data);
    } else if (st != OPTIML_OK && st != OPTIML_ERR_INVALID_ARG) {
        return st;
    }
    return OPTIML_OK;
}

/* ---- weights ------------------------------------------------------------ */

enum bind_kind { BIND_MATRIX, BIND_NORM };

/* Bind tensor `name` with shape (ne0, ne1) (ne1 = 1 for vectors). Matrices
 * need a type the CPU kernels compute; norms must be f32. */
static optiml_status bind(optiml_model *m, struct tensor *t, const char *name, int64_t ne0, int64_t ne1,
                          enum bind_kind kind, bool required) {
    memset(t, 0, sizeof(*t));
    const struct gguf_tensor_info *ti = gguf_find_tensor(m->file, name);
    if (!ti) {
        if (!required) return OPTIML_OK;
        return optiml_fail(OPTIML_ERR_FORMAT, "missing tensor %s", name);
    }
    uint64_t n_rows = ti->ne[1] * ti->ne[2] * ti->ne[3];
    if ((int64_t)ti->ne[0] != ne0 || (int64_t)n_rows != ne1)
        return optiml_fail(OPTIML_ERR_FORMAT, "tensor %s has shape (%llu, %llu), expected (%lld, %lld)", name,
                           (unsigned long long)ti->ne[0], (unsigned long long)n_rows, (long long)ne0,
                           (long long)ne1);
    if (kind == BIND_NORM && ti->type != DTYPE_F32)
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "tensor %s has type %s, expected f32", name, dtype_name(ti->type));
    if (kind == BIND_MATRIX && !cpu_kernels_can_matmul(cpu_kernels_best(), ti->type))
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "tensor %s has type %s, which this build cannot compute yet",
                           name, dtype_name(ti->type));
    t->data = ti->data;
    t->type = ti->type;
    t->ne[0] = ne0;
    t->ne[1] = ne1;
    t->ne[2] = t->ne[3] = 1;
    dtype_row_size(ti->type, (uint64_t)ne0, &t->row_size);
    return OPTIML_OK;
}

/* ---- sparse FFN tensors and keys (docs/FORMAT.md "Sparse FFN") ---------- */

/* The optional per-layer tensors: predictor fc1 (n_embd -> r, r read from
 * the file) and fc2 (r -> n_ff), neuron-major down, activation frequencies. */
static optiml_status bind_sparse_layer(optiml_model *m, int32_t il) {
    const struct hparams *hp = &m->hp;
    struct layer *l = &m->layers[il];
    char n1[64], n2[64], name[64];
    snprintf(n1, sizeof(n1), "blk.%d.fc1.weight", il);
    snprintf(n2, sizeof(n2), "blk.%d.fc2.weight", il);
    const struct gguf_tensor_info *t1 = gguf_find_tensor(m->file, n1), *t2 = gguf_find_tensor(m->file, n2);
    if (!t1 != !t2)
        return optiml_fail(OPTIML_ERR_FORMAT, "%s without %s: a predictor needs both layers", t1 ? n1 : n2,
                           t1 ? n2 : n1);
    if (t1) {
        const uint64_t r = t1->ne[1] * t1->ne[2] * t1->ne[3];
        if (r == 0 || r > (1u << 20))
            return optiml_fail(OPTIML_ERR_FORMAT, "%s: predictor rank %llu out of range", n1, (unsigned long long)r);
        for (int k = 0; k < 2; k++) {
            const struct gguf_tensor_info *t = k ? t2 : t1;
            if (t->type != DTYPE_F32 && t->type != DTYPE_F16 && t->type != DTYPE_Q8_0)
                return optiml_fail(OPTIML_ERR_UNSUPPORTED, "%s has type %s, expected f32, f16 or q8_0",
                                   k ? n2 : n1, dtype_name(t->type));
        }
        TRY(bind(m, &l->fc1, n1, hp->n_embd, (int64_t)r, BIND_MATRIX, true));
        TRY(bind(m, &l->fc2, n2, (int64_t)r, hp->n_ff, BIND_MATRIX, true));
    }
    snprintf(name, sizeof(name), "blk.%d.ffn_down_t.weight", il);
    TRY(bind(m, &l->ffn_down_t, name, hp->n_embd, hp->n_ff, BIND_MATRIX, false));
    if (l->ffn_down_t.data && !cpu_kernels_best()->to_f32[l->ffn_down_t.type])
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "%s has type %s, which cannot be read yet", name,
                           dtype_name(l->ffn_down_t.type));
    snprintf(name, sizeof(name), "blk.%d.ffn_gate_thr", il);
    TRY(bind(m, &l->ffn_gate_thr, name, hp->n_ff, 1, BIND_NORM, false));
    snprintf(name, sizeof(name), "blk.%d.ffn_act_freq", il);
    return bind(m, &l->ffn_act_freq, name, hp->n_ff, 1, BIND_NORM, false);
}

/* blk.N.ffn_gate_thr, CATS thresholds per neuron: in every layer or none,
 * with optiml.sparse.kind "cats" or "cats_product", values >= 0 (+inf:
 * never computed). */
static optiml_status check_neuron_thr(optiml_model *m, bool cats) {
    const int32_t n_layer = m->hp.n_layer;
    int32_t n = 0, missing = -1;
    for (int32_t il = 0; il < n_layer; il++) {
        if (m->layers[il].ffn_gate_thr.data) n++;
        else if (missing < 0) missing = il;
    }
    if (n == 0) return OPTIML_OK;
    if (!cats)
        return optiml_fail(OPTIML_ERR_FORMAT, "blk.N.ffn_gate_thr needs optiml.sparse.kind 'cats' or 'cats_product'");
    if (n < n_layer)
        return optiml_fail(OPTIML_ERR_FORMAT, "blk.N.ffn_gate_thr in %d of %d layers (blk.%d has none): it must be in "
                                              "every layer or none", n, n_layer, missing);
    for (int32_t il = 0; il < n_layer; il++) {
        const float *t = m->layers[il].ffn_gate_thr.data;
        for (int64_t i = 0; i < m->hp.n_ff; i++)
            if (!(t[i] >= 0.0f))
                return optiml_fail(OPTIML_ERR_FORMAT, "blk.%d.ffn_gate_thr[%lld] = %g must be >= 0", il, (long long)i,
                                   (double)t[i]);
    }
    m->sparse.has_neuron_thr = true;
    return OPTIML_OK;
}

/* optiml.sparse.kind "cats" and its optiml.sparse.gate_threshold (CATS:
 * magnitude thresholds on the gate's activation, calibrated per layer). */
static optiml_status load_gate_threshold(optiml_model *m) {
    const gguf_file *f = m->file;
    const int32_t n_layer = m->hp.n_layer;
    struct gguf_str kind = {0};
    optiml_status st = gguf_get_str(f, "optiml.sparse.kind", &kind);
    if (st == OPTIML_ERR_INVALID_ARG) kind = (struct gguf_str){.n = 4, .data = "relu"};
    else TRY(st);
    /* cats_product: the score is |act(g_i) up_i| (a kind of its own, so
     * that readers that predate it refuse the file instead of misreading
     * its thresholds) */
    m->sparse.cats_product = kind.n == 12 && !memcmp(kind.data, "cats_product", 12);
    const bool cats = m->sparse.cats_product || (kind.n == 4 && !memcmp(kind.data, "cats", 4));
    if (!cats && !(kind.n == 4 && !memcmp(kind.data, "relu", 4)))
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "optiml.sparse.kind '%.*s' is not 'relu', 'cats' or 'cats_product'",
                           (int)(kind.n < 64 ? kind.n : 64), kind.data);
    const struct gguf_value *arr;
    st = gguf_get_arr(f, "optiml.sparse.gate_threshold", GGUF_TYPE_FLOAT32, &arr);
    if (st == OPTIML_ERR_INVALID_ARG) {
        if (cats)
            return optiml_fail(OPTIML_ERR_FORMAT, "optiml.sparse.kind '%.*s' without optiml.sparse.gate_threshold",
                               (int)kind.n, kind.data);
        return check_neuron_thr(m, false);
    }
    TRY(st);
    if (!cats) return optiml_fail(OPTIML_ERR_FORMAT, "optiml.sparse.gate_threshold needs optiml.sparse.kind 'cats'");
    if (m->hp.ffn_act == FFN_ACT_RELU_NOGATE)
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "optiml.sparse.gate_threshold needs an FFN with a gate");
    if (arr->arr.n != (uint64_t)n_layer)
        return optiml_fail(OPTIML_ERR_FORMAT, "optiml.sparse.gate_threshold has %llu values, expected %d (n_layer)",
                           (unsigned long long)arr->arr.n, n_layer);
    m->sparse.gate_threshold = malloc((size_t)n_layer * sizeof(float));
    if (!m->sparse.gate_threshold) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    for (int32_t il = 0; il < n_layer; il++) {
        const float t = (float)gguf_arr_f64(arr, (uint64_t)il);
        if (!(t >= 0.0f && t < 1e30f))
            return optiml_fail(OPTIML_ERR_FORMAT, "optiml.sparse.gate_threshold[%d] = %g must be finite and >= 0", il,
                               (double)t);
        m->sparse.gate_threshold[il] = t;
    }
    return check_neuron_thr(m, true);
}

static optiml_status load_sparse_info(optiml_model *m) {
    const gguf_file *f = m->file;
    const int32_t n_layer = m->hp.n_layer;
    struct sparse_info *sp = &m->sparse;
    TRY(gguf_get_u32_or(f, "optiml.sparse.version", 0, &sp->version));
    if (sp->version > 1)
        return optiml_fail(OPTIML_ERR_UNSUPPORTED,
                           "optiml.sparse.version %u is not supported (this build reads version 1)", sp->version);
    TRY(gguf_get_f32_or(f, "optiml.sparse.act_threshold", 0.0f, &sp->act_threshold));
    if (!(sp->act_threshold >= 0.0f && sp->act_threshold < 1e30f))
        return optiml_fail(OPTIML_ERR_FORMAT, "optiml.sparse.act_threshold %g must be finite and >= 0",
                           sp->act_threshold);
    if (sp->act_threshold > 0.0f && !ffn_act_is_relu(m->hp.ffn_act))
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "optiml.sparse.act_threshold needs a ReLU-family activation");
    int64_t calib = 0;
    optiml_status st = gguf_get_i64(f, "optiml.sparse.calib_tokens", &calib);
    if (st != OPTIML_OK && st != OPTIML_ERR_INVALID_ARG) return st;
    sp->calib_tokens = calib > 0 ? (uint64_t)calib : 0;

    int32_t n_pred = 0, n_down_t = 0;
    for (int32_t il = 0; il < n_layer; il++) {
        n_pred += m->layers[il].fc1.data != NULL;
        n_down_t += m->layers[il].ffn_down_t.data != NULL;
    }
    sp->has_predictor = n_pred == n_layer;
    sp->has_down_t = n_down_t == n_layer;
    if (n_pred > 0 && n_pred < n_layer)
        LOG_WARN("predictors in %d of %d layers only: the model runs dense", n_pred, n_layer);

    TRY(load_gate_threshold(m));

    sp->layer_threshold = calloc((size_t)n_layer, sizeof(float)); /* absent: logit > 0 */
    if (!sp->layer_threshold) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    const struct gguf_value *arr;
    st = gguf_get_arr(f, "optiml.sparse.layer_threshold", GGUF_TYPE_FLOAT32, &arr);
    if (st == OPTIML_ERR_INVALID_ARG) return OPTIML_OK;
    TRY(st);
    if (arr->arr.n != (uint64_t)n_layer)
        return optiml_fail(OPTIML_ERR_FORMAT, "optiml.sparse.layer_threshold has %llu values, expected %d (n_layer)",
                           (unsigned long long)arr->arr.n, n_layer);
    for (int32_t il = 0; il < n_layer; il++) {
        sp->layer_threshold[il] = (float)gguf_arr_f64(arr, (uint64_t)il);
        if (isnan(sp->layer_threshold[il]))
            return optiml_fail(OPTIML_ERR_FORMAT, "optiml.sparse.layer_threshold[%d] is NaN", il);
    }
    return OPTIML_OK;
}

static optiml_status load_weights(optiml_model *m) {
    const struct hparams *hp = &m->hp;
    const struct gguf_tensor_info *emb = gguf_find_tensor(m->file, "token_embd.weight");
    if (!emb) return optiml_fail(OPTIML_ERR_FORMAT, "missing tensor token_embd.weight");
    if (emb->ne[1] == 0 || emb->ne[1] > (1u << 24))
        return optiml_fail(OPTIML_ERR_FORMAT, "token_embd.weight: vocabulary size %llu out of range",
                           (unsigned long long)emb->ne[1]);
    m->hp.n_vocab = (int32_t)emb->ne[1];
    const int64_t n_embd = hp->n_embd, n_q = (int64_t)hp->n_head * hp->head_dim;
    const int64_t n_kv = (int64_t)hp->n_head_kv * hp->head_dim;

    TRY(bind(m, &m->tok_embd, "token_embd.weight", n_embd, hp->n_vocab, BIND_MATRIX, true));
    if (!cpu_kernels_best()->to_f32[m->tok_embd.type])
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "token_embd.weight has type %s, which cannot be read yet",
                           dtype_name(m->tok_embd.type));
    TRY(bind(m, &m->output_norm, "output_norm.weight", n_embd, 1, BIND_NORM, true));
    TRY(bind(m, &m->output, "output.weight", n_embd, hp->n_vocab, BIND_MATRIX, false));
    if (!m->output.data) m->output = m->tok_embd; /* tied embeddings */
    TRY(bind(m, &m->rope_freqs, "rope_freqs.weight", hp->n_rot / 2, 1, BIND_NORM, false));

    m->layers = calloc((size_t)hp->n_layer, sizeof(*m->layers));
    if (!m->layers) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory for %d layers", hp->n_layer);
    for (int32_t il = 0; il < hp->n_layer; il++) {
        struct layer *l = &m->layers[il];
        char name[96];
#define BIND(field, suffix, ne0, ne1, kind)                                   \
        snprintf(name, sizeof(name), "blk.%d." suffix ".weight", il);        \
        TRY(bind(m, &l->field, name, ne0, ne1, kind, true))
        BIND(attn_norm, "attn_norm", n_embd, 1, BIND_NORM);
        BIND(wq, "attn_q", n_embd, n_q, BIND_MATRIX);
        BIND(wk, "attn_k", n_embd, n_kv, BIND_MATRIX);
        BIND(wv, "attn_v", n_embd, n_kv, BIND_MATRIX);
        BIND(wo, "attn_output", n_q, n_embd, BIND_MATRIX);
        /* biases: qwen2 has q, k and v ones; llama.cpp's llama may have all four */
        const struct { struct tensor *t; const char *suffix; int64_t n; } biases[4] = {
            {&l->bq, "attn_q", n_q}, {&l->bk, "attn_k", n_kv}, {&l->bv, "attn_v", n_kv}, {&l->bo, "attn_output", n_embd}};
        for (int k = 0; k < 4; k++) {
            snprintf(name, sizeof(name), "blk.%d.%s.bias", il, biases[k].suffix);
            TRY(bind(m, biases[k].t, name, biases[k].n, 1, BIND_NORM, false));
        }
        BIND(ffn_norm, "ffn_norm", n_embd, 1, BIND_NORM);
        if (hp->ffn_act != FFN_ACT_RELU_NOGATE) { /* relu_nogate: no gate */
            BIND(ffn_gate, "ffn_gate", n_embd, hp->n_ff, BIND_MATRIX);
        }
        BIND(ffn_up, "ffn_up", n_embd, hp->n_ff, BIND_MATRIX);
#undef BIND
        /* a PowerInfer file has only ffn_down_t: powerinfer_finish builds it */
        snprintf(name, sizeof(name), "blk.%d.ffn_down.weight", il);
        TRY(bind(m, &l->ffn_down, name, hp->n_ff, n_embd, BIND_MATRIX, !m->file->powerinfer));
        TRY(bind_sparse_layer(m, il));
    }
    TRY(load_sparse_info(m));
    if (m->file->powerinfer) TRY(powerinfer_finish(m));
    for (uint64_t i = 0; i < m->file->n_tensors; i++) {
        const struct gguf_tensor_info *ti = &m->file->tensors[i];
        m->n_bytes += ti->size;
        m->n_params += ti->ne[0] * ti->ne[1] * ti->ne[2] * ti->ne[3];
    }
    return OPTIML_OK;
}

/* ---- metadata strings ------------------------------------------------- */

static optiml_status load_meta_strs(optiml_model *m) {
    const gguf_file *f = m->file;
    int32_t n = 0;
    for (uint64_t i = 0; i < f->n_kv; i++) n += f->kv[i].value.type == GGUF_TYPE_STRING;
    m->meta_keys = calloc((size_t)n + 1, sizeof(char *));
    m->meta_strs = calloc((size_t)n + 1, sizeof(char *));
    if (!m->meta_keys || !m->meta_strs) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory for metadata");
    for (uint64_t i = 0; i < f->n_kv; i++) {
        if (f->kv[i].value.type != GGUF_TYPE_STRING) continue;
        m->meta_keys[m->n_meta_strs] = gguf_str_dup(f->kv[i].key);
        m->meta_strs[m->n_meta_strs] = gguf_str_dup(f->kv[i].value.str);
        if (!m->meta_keys[m->n_meta_strs] || !m->meta_strs[m->n_meta_strs])
            return optiml_fail(OPTIML_ERR_NOMEM, "out of memory for metadata");
        m->n_meta_strs++;
    }
    return OPTIML_OK;
}

/* ---- x8 repacking (cpu/ops.h) ------------------------------------------ */

/* The matrices the CPU multiplies densely: the CPU layers' seven, and the
 * head unless the GPU runs it. (A sparse FFN's gathers read the file's
 * rows; its dense mode and the prompt steps read the copy.) */
static int32_t cpu_matrices(optiml_model *m, struct tensor **out) {
    int32_t n = 0;
    if (!gpu_head(m)) out[n++] = &m->output;
    for (int32_t il = 0; il < gpu_first_layer(m); il++) {
        struct layer *l = &m->layers[il];
        struct tensor *ws[LAYER_N_MATRICES] = LAYER_MATRICES(l);
        for (int k = 0; k < LAYER_N_MATRICES; k++) out[n++] = ws[k];
    }
    return n;
}

/* The x8 copy's buffer of one matrix (left NULL where its type has no x8
 * kernels): 2 MiB aligned, huge pages asked for (in 4 KiB pages a 7B
 * model's copy took 10-30 s of page faults on the dev VM, against 3 s for
 * the rest of the load). */
static optiml_status alloc_x8(struct tensor *t, const struct cpu_kernels *k) {
    const uint64_t ps = cpu_x8_panel_size(t->type, t->ne[0]);
    const int64_t n_panels = t->ne[1] / CPU_X8_ROWS;
    if (!t->data || t->x8 || ps == 0 || n_panels == 0 || !k->gemv_x8[t->type] || !k->gemm_x8[t->type])
        return OPTIML_OK;
    const size_t size = ps * (uint64_t)n_panels, huge = (size_t)2 << 20;
    if (posix_memalign(&t->x8, size >= huge ? huge : 64, size) != 0) {
        t->x8 = NULL;
        return optiml_fail(OPTIML_ERR_NOMEM, "out of memory repacking a %lld x %lld matrix (%llu bytes; --no-repack "
                           "multiplies the file's rows instead)", (long long)t->ne[0], (long long)t->ne[1],
                           (unsigned long long)size);
    }
#ifdef MADV_HUGEPAGE
    if (size >= huge) (void)madvise(t->x8, size, MADV_HUGEPAGE); /* a hint: 4 KiB pages if refused */
#endif
    return OPTIML_OK;
}

/* Fill a matrix's x8 copy: its full panels of 8 rows (rows past the last
 * panel stay the file's). With the file mapped, the pages wholly inside
 * the packed rows are then released (MADV_DONTNEED on a private read-only
 * file mapping: a later read faults them in from the file again). */
static void fill_x8(struct tensor *t, bool mapped) {
    const uint64_t ps = cpu_x8_panel_size(t->type, t->ne[0]);
    const int64_t n_panels = t->ne[1] / CPU_X8_ROWS;
    for (int64_t p = 0; p < n_panels; p++)
        cpu_pack_x8(t->type, t->ne[0], tensor_row(t, p * CPU_X8_ROWS), t->row_size, (char *)t->x8 + (uint64_t)p * ps);
    if (mapped) {
        const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
        const uintptr_t lo = ((uintptr_t)t->data + page - 1) / page * page;
        const uintptr_t hi = ((uintptr_t)t->data + (uint64_t)n_panels * CPU_X8_ROWS * t->row_size) / page * page;
        if (hi > lo) madvise((void *)lo, hi - lo, MADV_DONTNEED);
    }
}

struct repack_job {
    struct tensor **ts;
    int32_t n;
    bool mapped;
    atomic_int next; /* the next matrix to fill */
};

static void repack_run(void *arg, int ith, int nth) {
    (void)ith, (void)nth;
    struct repack_job *job = arg;
    for (int i; (i = atomic_fetch_add(&job->next, 1)) < job->n;)
        if (job->ts[i]->x8) fill_x8(job->ts[i], job->mapped);
}

/* Buffers first (a failure leaves a reason), then the copies on one
 * thread per core, a matrix at a time (the head first: the largest). */
static optiml_status model_repack(optiml_model *m, const optiml_model_params *params) {
    if (!params->repack) return OPTIML_OK;
    struct tensor **ts = malloc(sizeof(*ts) * (1 + LAYER_N_MATRICES * (size_t)m->hp.n_layer));
    if (!ts) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    struct repack_job job = {.ts = ts, .n = cpu_matrices(m, ts), .mapped = params->use_mmap};
    atomic_init(&job.next, 0);
    optiml_status st = OPTIML_OK;
    for (int32_t i = 0; i < job.n && st == OPTIML_OK; i++) st = alloc_x8(ts[i], cpu_kernels_best());
    struct threadpool *tp = NULL;
    if (st == OPTIML_OK) st = threadpool_init(threadpool_default_threads(), &tp);
    if (st == OPTIML_OK) threadpool_run(tp, repack_run, &job);
    threadpool_free(tp);
    free(ts);
    return st;
}

static void model_free_x8(optiml_model *m) {
    free(m->output.x8);
    for (int32_t il = 0; m->layers && il < m->hp.n_layer; il++) {
        struct layer *l = &m->layers[il];
        struct tensor *ws[LAYER_N_MATRICES] = LAYER_MATRICES(l);
        for (int k = 0; k < LAYER_N_MATRICES; k++) free(ws[k]->x8);
    }
}

/* ---- public API ------------------------------------------------------- */

optiml_model_params optiml_model_default_params(void) {
    return (optiml_model_params){.n_gpu_layers = 0, .vram_budget_gib = 0.0, .use_mmap = true, .repack = true};
}

static optiml_status model_load(optiml_model *m, const char *path, const optiml_model_params *params) {
    TRY(gguf_open_ex(path, params->use_mmap, &m->file));
    struct gguf_str arch;
    optiml_status st = gguf_get_str(m->file, "general.architecture", &arch);
    if (st == OPTIML_ERR_INVALID_ARG) return optiml_fail(OPTIML_ERR_FORMAT, "%s: missing key general.architecture", path);
    TRY(st);
    const bool bamboo = m->file->powerinfer && gguf_str_eq(arch, "bamboo"); /* PowerInfer's Bamboo */
    const bool qwen2 = gguf_str_eq(arch, "qwen2"); /* Llama with q/k/v biases and NeoX RoPE */
    if (!gguf_str_eq(arch, "llama") && !bamboo && !qwen2)
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "%s: architecture \"%.*s\" is not supported (llama, qwen2; bamboo "
                           "in PowerInfer files)", path, (int)(arch.n > 32 ? 32 : arch.n), arch.data);
    snprintf(m->arch, sizeof(m->arch), bamboo ? "bamboo" : qwen2 ? "qwen2" : "llama");
    m->hp.rope_neox = qwen2;
    TRY(load_hparams(m));
    if (m->file->powerinfer) TRY(powerinfer_hparams(m));
    TRY(load_weights(m));
    TRY(vocab_load(m->file, &m->vocab));
    if (vocab_n_tokens(m->vocab) > m->hp.n_vocab)
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: %d vocabulary tokens but token_embd.weight has %d rows", path,
                           vocab_n_tokens(m->vocab), m->hp.n_vocab);
    TRY(load_meta_strs(m));
    snprintf(m->desc, sizeof(m->desc), "%s %dd %dL %s", m->arch, m->hp.n_embd, m->hp.n_layer,
             dtype_name(m->layers[0].wq.type));
    TRY(gpu_model_load(m, params));
    return model_repack(m, params);
}

optiml_status optiml_model_load(const char *path, const optiml_model_params *params, optiml_model **out) {
    if (!out) return optiml_fail(OPTIML_ERR_INVALID_ARG, "optiml_model_load: out is NULL");
    *out = NULL;
    if (!path) return optiml_fail(OPTIML_ERR_INVALID_ARG, "optiml_model_load: path is NULL");
    optiml_model_params defaults = optiml_model_default_params();
    optiml_model *m = calloc(1, sizeof(*m));
    if (!m) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    optiml_status st = model_load(m, path, params ? params : &defaults);
    if (st != OPTIML_OK) {
        optiml_model_free(m);
        /* every reason names the file (the GGUF parser's already do) */
        const char *why = optiml_last_error();
        if (strncmp(why, path, strlen(path)) != 0) {
            char buf[512];
            snprintf(buf, sizeof(buf), "%s", why);
            optiml_set_error("%s: %s", path, buf);
        }
        return st;
    }
    *out = m;
    return OPTIML_OK;
}

void optiml_model_free(optiml_model *m) {
    if (!m) return;
    gpu_model_free(m);
    for (int32_t i = 0; i < m->n_meta_strs; i++) {
        free(m->meta_keys[i]);
        free(m->meta_strs[i]);
    }
    free(m->meta_keys);
    free(m->meta_strs);
    vocab_free(m->vocab);
    free(m->sparse.layer_threshold);
    powerinfer_free(m->powerinfer);
    free(m->sparse.gate_threshold);
    model_free_x8(m);
    free(m->layers);
    gguf_close(m->file);
    free(m);
}

int32_t optiml_model_n_vocab(const optiml_model *m) { return m->hp.n_vocab; }
int32_t optiml_model_n_embd(const optiml_model *m) { return m->hp.n_embd; }
int32_t optiml_model_n_layer(const optiml_model *m) { return m->hp.n_layer; }
int32_t optiml_model_n_ctx_train(const optiml_model *m) { return m->hp.n_ctx_train; }
uint64_t optiml_model_size(const optiml_model *m) { return m->n_bytes; }
uint64_t optiml_model_n_params(const optiml_model *m) { return m->n_params; }
int32_t optiml_model_n_gpu_layers(const optiml_model *m) {
    if (!m) return 0;
    const int32_t first = gpu_first_layer(m);
    return m->hp.n_layer - first + (m->gpu && first == 0 && gpu_embeds(m) ? 1 : 0);
}

uint64_t optiml_model_decode_bytes(const optiml_model *m) {
    if (m->output.data == m->tok_embd.data) return m->n_bytes;
    return m->n_bytes - m->tok_embd.row_size * (uint64_t)(m->hp.n_vocab - 1);
}

int32_t optiml_model_desc(const optiml_model *m, char *buf, size_t buf_size) {
    return snprintf(buf, buf_size, "%s", m->desc);
}

const char *optiml_model_meta_str(const optiml_model *m, const char *key) {
    for (int32_t i = 0; i < m->n_meta_strs; i++)
        if (strcmp(m->meta_keys[i], key) == 0) return m->meta_strs[i];
    return NULL;
}

/* ---- tokenizer entry points (the work is in vocab.c) ----------------- */

optiml_token optiml_token_bos(const optiml_model *m) { return vocab_bos(m->vocab); }
optiml_token optiml_token_eos(const optiml_model *m) { return vocab_eos(m->vocab); }
bool optiml_token_is_eog(const optiml_model *m, optiml_token t) { return vocab_is_eog(m->vocab, t); }
bool optiml_token_add_bos(const optiml_model *m) { return vocab_add_bos(m->vocab); }

int32_t optiml_tokenize(const optiml_model *m, const char *text, int32_t text_len, optiml_token *tokens,
                        int32_t n_max, bool add_bos, bool parse_special) {
    if (!m || (!text && text_len > 0) || text_len < 0 || n_max < 0 || (!tokens && n_max > 0)) {
        optiml_set_error("optiml_tokenize: invalid argument");
        return INT32_MIN;
    }
    return vocab_tokenize(m->vocab, text ? text : "", text_len, tokens, n_max, add_bos, parse_special);
}

int32_t optiml_token_to_piece(const optiml_model *m, optiml_token token, char *buf, int32_t buf_size, bool lstrip,
                              bool special) {
    if (!m || buf_size < 0 || (!buf && buf_size > 0)) {
        optiml_set_error("optiml_token_to_piece: invalid argument");
        return INT32_MIN;
    }
    return vocab_token_to_piece(m->vocab, token, buf, buf_size, lstrip, special);
}
