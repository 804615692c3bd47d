/*
 * powerinfer.c - what a PowerInfer file (magic "PWRI") needs beyond an
 * OptiML GGUF: the activation its engine implies, a row-major ffn_down
 * built from ffn_down_t, predictors moved onto the normed input, and the
 * threshold. powerinfer.h explains the predictor conversion; the layout is
 * in docs/FORMAT.md "PowerInfer files".
 */
#include "powerinfer.h"

#include "model.h"
#include "quant.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* The buffers built at load time (they replace views into the mapping). */
struct powerinfer_mem {
    void **bufs;
    int32_t n, cap;
};

void powerinfer_free(struct powerinfer_mem *mem) {
    if (!mem) return;
    for (int32_t i = 0; i < mem->n; i++) free(mem->bufs[i]);
    free(mem->bufs);
    free(mem);
}

/* A zeroed buffer of size bytes owned by m->powerinfer. */
static optiml_status mem_alloc(optiml_model *m, uint64_t size, void **out) {
    struct powerinfer_mem *mem = m->powerinfer;
    if (!mem && !(mem = m->powerinfer = calloc(1, sizeof(*mem))))
        return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    if (mem->n == mem->cap) {
        int32_t cap = mem->cap ? 2 * mem->cap : 16;
        void **b = realloc(mem->bufs, (size_t)cap * sizeof(*b));
        if (!b) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
        mem->bufs = b;
        mem->cap = cap;
    }
    if (size > SIZE_MAX || !(*out = calloc(1, (size_t)size)))
        return optiml_fail(OPTIML_ERR_NOMEM, "out of memory for %llu bytes", (unsigned long long)size);
    mem->bufs[mem->n++] = *out;
    return OPTIML_OK;
}

/* ---- activation ---------------------------------------------------------- */

optiml_status powerinfer_hparams(optiml_model *m) {
    if (gguf_find_key(m->file, "optiml.ffn_activation") >= 0) return OPTIML_OK;
    /* llm_build_ffn_sparse: LLM_FFN_RELU, gate kind PAR for llama, SYM
     * (both gate and up through the ReLU) for bamboo */
    m->hp.ffn_act = strcmp(m->arch, "bamboo") == 0 ? FFN_ACT_DRELU : FFN_ACT_RELU;
    return OPTIML_OK;
}

/* ---- ffn_down from ffn_down_t -------------------------------------------- */

#define TILE 32 /* neurons per pass: one q8_0 block of each output row */

static void store_f32(void *dst, uint32_t type, uint64_t i, float v) {
    if (type == DTYPE_F32) ((float *)dst)[i] = v;
    else if (type == DTYPE_F16) ((f16_t *)dst)[i] = f32_to_f16(v);
    else ((bf16_t *)dst)[i] = f32_to_bf16(v);
}

/* down (n_ff, n_embd): row j holds column j of down_t, i.e. element j of
 * every neuron row. Float types keep their type (exact); quantized rows are
 * dequantized and stored as q8_0 (f32 when n_ff is not a multiple of 32):
 * the dense FFN of such a file reads these, the sparse one ffn_down_t. */
static optiml_status build_down(optiml_model *m, struct layer *l, float *tile) {
    const int64_t n_embd = m->hp.n_embd, n_ff = m->hp.n_ff;
    const struct tensor *dt = &l->ffn_down_t;
    const bool flt = dt->type == DTYPE_F32 || dt->type == DTYPE_F16 || dt->type == DTYPE_BF16;
    const uint32_t type = flt ? dt->type : n_ff % TILE == 0 ? DTYPE_Q8_0 : DTYPE_F32;
    uint64_t row_size;
    dtype_row_size(type, (uint64_t)n_ff, &row_size);
    void *buf;
    TRY(mem_alloc(m, row_size * (uint64_t)n_embd, &buf));
    const cpu_to_f32_fn to_f32 = cpu_kernels_best()->to_f32[dt->type];
    const quant_quantize_fn q8 = quant_quantizer(DTYPE_Q8_0);
    for (int64_t i0 = 0; i0 < n_ff; i0 += TILE) {
        const int64_t n = n_ff - i0 < TILE ? n_ff - i0 : TILE;
        for (int64_t i = 0; i < n; i++) to_f32(n_embd, tensor_row(dt, i0 + i), tile + i * n_embd);
        for (int64_t j = 0; j < n_embd; j++) {
            uint8_t *row = (uint8_t *)buf + (uint64_t)j * row_size;
            if (type == DTYPE_Q8_0) {
                float v[TILE];
                for (int64_t i = 0; i < TILE; i++) v[i] = tile[i * n_embd + j];
                q8(TILE, v, row + (uint64_t)(i0 / TILE) * dtype_type_size(DTYPE_Q8_0));
            } else {
                for (int64_t i = 0; i < n; i++) store_f32(row, type, (uint64_t)(i0 + i), tile[i * n_embd + j]);
            }
        }
    }
    l->ffn_down = (struct tensor){.data = buf, .type = type, .ne = {n_ff, n_embd, 1, 1}, .row_size = row_size};
    return OPTIML_OK;
}

/* ---- predictors ----------------------------------------------------------- */

/* fc1' = fc1 / w per input column, f32 for an f32 fc1 (or where a value
 * would overflow f16), else f16. A zero norm weight hides that input from
 * the normed x: its column becomes 0. */
static optiml_status fold_fc1(optiml_model *m, int32_t il, float *row, int64_t *n_zero) {
    struct layer *l = &m->layers[il];
    const int64_t n_embd = m->hp.n_embd, r = l->fc1.ne[1];
    const float *w = l->ffn_norm.data;
    const cpu_to_f32_fn to_f32 = cpu_kernels_best()->to_f32[l->fc1.type];
    uint32_t type = l->fc1.type == DTYPE_F32 ? DTYPE_F32 : DTYPE_F16;
    for (int64_t k = 0; k < r && type == DTYPE_F16; k++) {
        to_f32(n_embd, tensor_row(&l->fc1, k), row);
        for (int64_t j = 0; j < n_embd; j++)
            if (w[j] != 0.0f && !(fabsf(row[j] / w[j]) <= 65504.0f)) type = DTYPE_F32;
    }
    uint64_t row_size;
    dtype_row_size(type, (uint64_t)n_embd, &row_size);
    void *buf;
    TRY(mem_alloc(m, row_size * (uint64_t)r, &buf));
    for (int64_t k = 0; k < r; k++) {
        to_f32(n_embd, tensor_row(&l->fc1, k), row);
        void *out = (uint8_t *)buf + (uint64_t)k * row_size;
        for (int64_t j = 0; j < n_embd; j++) store_f32(out, type, (uint64_t)j, w[j] != 0.0f ? row[j] / w[j] : 0.0f);
    }
    for (int64_t j = 0; j < n_embd; j++) *n_zero += w[j] == 0.0f;
    l->fc1 = (struct tensor){.data = buf, .type = type, .ne = {n_embd, r, 1, 1}, .row_size = row_size};
    return OPTIML_OK;
}

static optiml_status set_thresholds(optiml_model *m) {
    if (gguf_find_key(m->file, "optiml.sparse.layer_threshold") >= 0) return OPTIML_OK;
    float t = 0.0f;
    TRY(gguf_get_f32_or(m->file, "powerinfer.sparse_threshold", 0.0f, &t));
    if (!isfinite(t)) return optiml_fail(OPTIML_ERR_FORMAT, "powerinfer.sparse_threshold %g is not finite", (double)t);
    if (t != 0.0f && m->sparse.has_predictor)
        LOG_WARN("powerinfer.sparse_threshold %g: PowerInfer compares it with predictor scores of the un-normed "
                 "input; on the normed input OptiML uses it as it is (exact only for 0)", (double)t);
    for (int32_t il = 0; il < m->hp.n_layer; il++) m->sparse.layer_threshold[il] = nextafterf(t, -INFINITY);
    return OPTIML_OK;
}

optiml_status powerinfer_finish(optiml_model *m) {
    const struct hparams *hp = &m->hp;
    float *scratch = malloc((size_t)TILE * (size_t)hp->n_embd * sizeof(float));
    if (!scratch) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    optiml_status st = OPTIML_OK;
    int32_t n_built = 0;
    int64_t n_zero = 0;
    for (int32_t il = 0; il < hp->n_layer && st == OPTIML_OK; il++) {
        struct layer *l = &m->layers[il];
        if (!l->ffn_down.data) {
            if (!l->ffn_down_t.data)
                st = optiml_fail(OPTIML_ERR_FORMAT, "missing tensor blk.%d.ffn_down_t.weight (and blk.%d.ffn_down.weight)",
                                 il, il);
            else if (!cpu_kernels_best()->to_f32[l->ffn_down_t.type])
                st = optiml_fail(OPTIML_ERR_UNSUPPORTED, "blk.%d.ffn_down_t.weight has type %s, which cannot be read yet",
                                 il, dtype_name(l->ffn_down_t.type));
            else if ((st = build_down(m, l, scratch)) == OPTIML_OK)
                n_built++;
        }
        if (st == OPTIML_OK && l->fc1.data) st = fold_fc1(m, il, scratch, &n_zero);
    }
    free(scratch);
    TRY(st);
    if (n_built)
        LOG_INFO("PowerInfer file: built ffn_down from ffn_down_t in %d layers (%s) for the dense FFN", n_built,
                 dtype_name(m->layers[0].ffn_down.type));
    if (n_zero)
        LOG_WARN("PowerInfer file: %lld ffn_norm weights are 0: the predictors cannot see those inputs",
                 (long long)n_zero);
    return set_thresholds(m);
}
