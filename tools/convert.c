/*
 * convert.c - optiml-convert: turns a llama2.c checkpoint or a Hugging Face
 * Llama directory into an OptiML GGUF file (docs/FORMAT.md).
 *
 *   optiml-convert --llama2c CKPT.bin --tokenizer TOK.bin --outfile OUT.gguf
 *   optiml-convert --hf DIR --outfile OUT.gguf
 *       [--outtype f32|f16|bf16] [--name NAME] [--sparse SIDE.gguf]
 *
 * --sparse merges predictors and activation statistics (convert.py writes
 * them from PowerInfer-style predictor files) and adds ffn_down_t.
 *
 * This file holds the command line and the pieces both front ends share
 * (convert.h): file mapping, the output queue that converts each tensor's
 * elements (f32/f16/bf16, optional RoPE row permutation) while the writer
 * asks for them, the Llama hyperparameter keys and the vocabulary builder.
 * Everything goes to standard error; the exit code is 0 on success, 1 on
 * any error (one line saying why).
 */
#define _POSIX_C_SOURCE 200809L
#include "convert.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "optiml-convert reads and writes little-endian files on a little-endian host only"
#endif

/* ---- files ------------------------------------------------------------------- */

optiml_status convert_map_open(const char *path, struct convert_map *m) {
    memset(m, 0, sizeof(*m));
    int fd = open(path, O_RDONLY);
    if (fd < 0) return optiml_fail(OPTIML_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return optiml_fail(OPTIML_ERR_IO, "%s: not a regular file", path);
    }
    m->size = (uint64_t)sb.st_size;
    if (m->size > 0) {
        void *p = mmap(NULL, (size_t)m->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            int e = errno;
            close(fd);
            m->size = 0;
            return optiml_fail(OPTIML_ERR_IO, "%s: mmap failed: %s", path, strerror(e));
        }
        m->data = p;
    }
    close(fd);
    return OPTIML_OK;
}

void convert_map_close(struct convert_map *m) {
    if (m->data) munmap((void *)m->data, (size_t)m->size);
    memset(m, 0, sizeof(*m));
}

char *convert_path_name(const char *path, bool strip_ext) {
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/') n--; /* "dir/" names "dir" */
    size_t start = n;
    while (start > 0 && path[start - 1] != '/') start--;
    size_t end = n;
    for (size_t i = n; strip_ext && i > start + 1; i--)
        if (path[i - 1] == '.') {
            end = i - 1;
            break;
        }
    char *s = malloc(end - start + 1);
    if (!s) return NULL;
    memcpy(s, path + start, end - start);
    s[end - start] = '\0';
    return s;
}

/* ---- element conversion ------------------------------------------------------- */

static void convert_load_f32(float *dst, const uint8_t *src, uint32_t type, size_t n) {
    switch (type) {
    case DTYPE_F32: memcpy(dst, src, n * sizeof(float)); break;
    case DTYPE_F16:
        for (size_t i = 0; i < n; i++) {
            f16_t h;
            memcpy(&h, src + 2 * i, 2);
            dst[i] = f16_to_f32(h);
        }
        break;
    case DTYPE_BF16:
        for (size_t i = 0; i < n; i++) {
            bf16_t b;
            memcpy(&b, src + 2 * i, 2);
            dst[i] = bf16_to_f32(b);
        }
        break;
    }
}

static void convert_store_f32(uint8_t *dst, uint32_t type, const float *src, size_t n) {
    switch (type) {
    case DTYPE_F32: memcpy(dst, src, n * sizeof(float)); break;
    case DTYPE_F16:
        for (size_t i = 0; i < n; i++) {
            f16_t h = f32_to_f16(src[i]);
            memcpy(dst + 2 * i, &h, 2);
        }
        break;
    case DTYPE_BF16:
        for (size_t i = 0; i < n; i++) {
            bf16_t b = f32_to_bf16(src[i]);
            memcpy(dst + 2 * i, &b, 2);
        }
        break;
    }
}

void convert_elements(void *dst, uint32_t dst_type, const void *src, uint32_t src_type,
                      uint64_t n) {
    if (dst_type == src_type) { /* exact copy, NaN payloads included */
        memcpy(dst, src, (size_t)(n * dtype_type_size(src_type)));
        return;
    }
    enum { CHUNK = 1024 };
    float buf[CHUNK];
    const uint8_t *s = src;
    uint8_t *d = dst;
    size_t ss = dtype_type_size(src_type), ds = dtype_type_size(dst_type);
    while (n > 0) {
        size_t k = n < CHUNK ? (size_t)n : CHUNK;
        convert_load_f32(buf, s, src_type, k);
        convert_store_f32(d, dst_type, buf, k);
        s += k * ss;
        d += k * ds;
        n -= k;
    }
}

static bool convert_type_ok(uint32_t t) {
    return t == DTYPE_F32 || t == DTYPE_F16 || t == DTYPE_BF16;
}

/* ---- output queue --------------------------------------------------------------- */

/* llama.cpp's general.file_type numbers. */
static uint32_t convert_file_type(uint32_t outtype) {
    switch (outtype) {
    case DTYPE_F16: return 1;
    case DTYPE_BF16: return 32;
    default: return 0;
    }
}

optiml_status convert_out_init(struct convert_out *out, uint32_t outtype) {
    memset(out, 0, sizeof(*out));
    if (!convert_type_ok(outtype))
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "output type %s: only f32, f16 and bf16",
                           dtype_name(outtype));
    out->outtype = outtype;
    out->w = gguf_writer_init();
    if (!out->w) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    return gguf_writer_set_u32(out->w, "general.file_type", convert_file_type(outtype));
}

void convert_out_free(struct convert_out *out) {
    for (size_t i = 0; i < out->n_tensors; i++) {
        free(out->tensors[i]->name);
        free(out->tensors[i]);
    }
    free(out->tensors);
    for (size_t i = 0; i < out->n_owned; i++) free(out->owned[i]);
    free(out->owned);
    if (out->w) gguf_writer_free(out->w);
    memset(out, 0, sizeof(*out));
}

/* arr (capacity *cap elements of size sz, n used) with room for one more;
 * NULL if out of memory (arr is then unchanged). */
static void *convert_grow(void *arr, size_t n, size_t *cap, size_t sz) {
    if (n < *cap) return arr;
    size_t c = *cap ? *cap * 2 : 64;
    void *p = realloc(arr, c * sz);
    if (p) *cap = c;
    return p;
}

optiml_status convert_out_own(struct convert_out *out, void *buf) {
    void **p = convert_grow(out->owned, out->n_owned, &out->cap_owned, sizeof(*p));
    if (!p) {
        free(buf);
        return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    }
    out->owned = p;
    out->owned[out->n_owned++] = buf;
    return OPTIML_OK;
}

static bool convert_ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && memcmp(s + n - k, suffix, k) == 0;
}

uint32_t convert_pick_type(const char *name, uint32_t n_dims, uint32_t outtype) {
    if (n_dims <= 1 || convert_ends_with(name, "_norm.weight") ||
        strncmp(name, "rope_freqs", 10) == 0)
        return DTYPE_F32;
    /* predictors are read as f32, f16 or q8_0 (docs/FORMAT.md) */
    if (outtype == DTYPE_BF16 && (convert_ends_with(name, ".fc1.weight") || convert_ends_with(name, ".fc2.weight")))
        return DTYPE_F16;
    return outtype;
}

static uint64_t convert_tensor_rows(const struct convert_tensor *t) {
    uint64_t rows = 1;
    for (uint32_t d = 1; d < t->n_dims; d++) rows *= t->ne[d];
    return rows;
}

/* Output row r = column r of the source (ne[0] rows of ne[1]), 64 output
 * rows at a time so that each source row is read in one stretch. */
static optiml_status convert_fill_transposed(const struct convert_tensor *t, uint8_t *d) {
    enum { TILE = 64 };
    const uint64_t n_in = t->ne[0], n_out = t->ne[1]; /* out: n_out rows of n_in */
    const uint64_t ss = dtype_type_size(t->src_type), ds = dtype_type_size(t->dst_type);
    float *tile = malloc(TILE * n_in * sizeof(float));
    if (!tile) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    for (uint64_t r0 = 0; r0 < n_out; r0 += TILE) {
        const uint64_t n = n_out - r0 < TILE ? n_out - r0 : TILE;
        float col[TILE];
        for (uint64_t k = 0; k < n_in; k++) { /* source row k, columns r0.. */
            convert_load_f32(col, (const uint8_t *)t->src + (k * n_out + r0) * ss, t->src_type, (size_t)n);
            for (uint64_t i = 0; i < n; i++) tile[i * n_in + k] = col[i];
        }
        for (uint64_t i = 0; i < n; i++)
            convert_store_f32(d + (r0 + i) * n_in * ds, t->dst_type, tile + i * n_in, (size_t)n_in);
    }
    free(tile);
    return OPTIML_OK;
}

/* gguf_fill_fn: convert (and permute) one queued tensor into dst. */
static optiml_status convert_fill(void *user, void *dst, uint64_t size) {
    const struct convert_tensor *t = user;
    uint64_t row_len = t->ne[0], rows = convert_tensor_rows(t);
    uint64_t ss = dtype_type_size(t->src_type), ds = dtype_type_size(t->dst_type);
    if (size != rows * row_len * ds)
        return optiml_fail(OPTIML_ERR_INTERNAL, "%s: writer asks for %llu bytes, expected %llu",
                           t->name, (unsigned long long)size,
                           (unsigned long long)(rows * row_len * ds));

    char shape[96];
    int k = snprintf(shape, sizeof(shape), "(%llu", (unsigned long long)t->ne[0]);
    for (uint32_t d = 1; d < t->n_dims && k > 0 && (size_t)k < sizeof(shape); d++)
        k += snprintf(shape + k, sizeof(shape) - (size_t)k, ", %llu", (unsigned long long)t->ne[d]);
    LOG_INFO("[%3zu/%3zu] %-32s %-6s -> %-6s %s)%s", t->index + 1, t->out->n_tensors, t->name,
             dtype_name(t->src_type), dtype_name(t->dst_type), shape,
             t->rope_heads ? " rope-permuted" : "");

    const uint8_t *src = t->src;
    uint8_t *d = dst;
    if (t->transpose) return convert_fill_transposed(t, d);
    if (t->rope_heads == 0) {
        convert_elements(d, t->dst_type, src, t->src_type, rows * row_len);
        return OPTIML_OK;
    }
    uint64_t head_dim = rows / t->rope_heads, half = head_dim / 2;
    for (uint64_t r = 0; r < rows; r++) {
        uint64_t h = r / head_dim, j = r % head_dim;
        uint64_t from = h * head_dim + (j % 2 == 0 ? j / 2 : j / 2 + half);
        convert_elements(d + r * row_len * ds, t->dst_type, src + from * row_len * ss, t->src_type,
                         row_len);
    }
    return OPTIML_OK;
}

optiml_status convert_out_add(struct convert_out *out, const char *name, uint32_t src_type,
                              uint32_t n_dims, const uint64_t *ne, const void *src,
                              uint32_t rope_heads) {
    if (!convert_type_ok(src_type))
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "%s: source type %s (only f32, f16, bf16)", name,
                           dtype_name(src_type));
    if (n_dims < 1 || n_dims > GGUF_MAX_DIMS)
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "%s: %u dimensions (1..%d)", name, n_dims,
                           GGUF_MAX_DIMS);
    struct convert_tensor *t = calloc(1, sizeof(*t));
    if (!t || !(t->name = strdup(name))) {
        free(t);
        return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    }
    t->n_dims = n_dims;
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = d < n_dims ? ne[d] : 1;
    t->src_type = src_type;
    t->dst_type = convert_pick_type(name, n_dims, out->outtype);
    t->src = src;
    t->rope_heads = rope_heads;
    t->out = out;
    if (rope_heads) {
        uint64_t rows = convert_tensor_rows(t);
        if (rows % rope_heads != 0 || (rows / rope_heads) % 2 != 0) {
            free(t->name);
            free(t);
            return optiml_fail(OPTIML_ERR_FORMAT,
                               "%s: %llu rows do not split into %u heads of even size", name,
                               (unsigned long long)rows, rope_heads);
        }
    }
    struct convert_tensor **p =
        convert_grow(out->tensors, out->n_tensors, &out->cap_tensors, sizeof(*p));
    if (!p) {
        free(t->name);
        free(t);
        return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    }
    out->tensors = p;
    t->index = out->n_tensors;
    out->tensors[out->n_tensors++] = t;
    return gguf_writer_add_tensor_fn(out->w, t->name, t->dst_type, n_dims, t->ne, convert_fill, t);
}

optiml_status convert_out_add_transposed(struct convert_out *out, const char *name, uint32_t src_type,
                                         const uint64_t *ne, const void *src) {
    TRY(convert_out_add(out, name, src_type, 2, ne, src, 0));
    out->tensors[out->n_tensors - 1]->transpose = true;
    return OPTIML_OK;
}

/* ---- sparse-FFN extras (--sparse) ------------------------------------------------ */

/* One tensor of the side file: blk.N.<what>, f32 or f16, shape (ne0, ne1)
 * (ne0 = 0: any, read into *ne0; ne1 = 0: any). */
static optiml_status convert_sparse_tensor(const gguf_file *side, uint32_t il, const char *what, uint64_t *ne0,
                                           uint64_t ne1, const struct gguf_tensor_info **out) {
    char name[64];
    snprintf(name, sizeof(name), "blk.%u.%s", il, what);
    const struct gguf_tensor_info *t = *out = gguf_find_tensor(side, name);
    if (!t) return OPTIML_OK;
    const uint64_t rows = t->ne[1] * t->ne[2] * t->ne[3];
    if (t->type != DTYPE_F32 && t->type != DTYPE_F16)
        return optiml_fail(OPTIML_ERR_FORMAT, "--sparse: %s has type %s (f32 or f16)", name, dtype_name(t->type));
    if ((*ne0 && t->ne[0] != *ne0) || (ne1 && rows != ne1) || t->ne[0] > (1u << 20) || rows > (1u << 20))
        return optiml_fail(OPTIML_ERR_FORMAT, "--sparse: %s has shape (%llu, %llu), expected (%llu, %llu)", name,
                           (unsigned long long)t->ne[0], (unsigned long long)rows, (unsigned long long)*ne0,
                           (unsigned long long)ne1);
    *ne0 = t->ne[0];
    return OPTIML_OK;
}

optiml_status convert_add_sparse(struct convert_out *out, const gguf_file *side, uint32_t n_layer,
                                 uint32_t n_embd, uint32_t n_ff) {
    uint64_t n_used = 0;
    uint32_t n_pred = 0;
    for (uint32_t il = 0; il < n_layer; il++) {
        const struct gguf_tensor_info *fc1, *fc2, *freq;
        uint64_t e = n_embd, r = 0, one = 1;
        TRY(convert_sparse_tensor(side, il, "fc1.weight", &e, 0, &fc1));
        if (fc1) r = fc1->ne[1];
        TRY(convert_sparse_tensor(side, il, "fc2.weight", &r, n_ff, &fc2));
        TRY(convert_sparse_tensor(side, il, "ffn_act_freq", &(uint64_t){n_ff}, one, &freq));
        if (!fc1 != !fc2)
            return optiml_fail(OPTIML_ERR_FORMAT, "--sparse: layer %u has fc%d without fc%d", il, fc1 ? 1 : 2,
                               fc1 ? 2 : 1);
        const struct gguf_tensor_info *ts[3] = {fc1, fc2, freq};
        for (int k = 0; k < 3; k++) {
            if (!ts[k]) continue;
            char name[64];
            snprintf(name, sizeof(name), "%.*s", (int)ts[k]->name.n, ts[k]->name.data);
            const uint64_t ne[2] = {ts[k]->ne[0], ts[k]->ne[1]};
            TRY(convert_out_add(out, name, ts[k]->type, k < 2 ? 2 : 1, ne, ts[k]->data, 0));
            n_used++;
        }
        n_pred += fc1 != NULL;
    }
    if (n_pred != 0 && n_pred != n_layer)
        return optiml_fail(OPTIML_ERR_FORMAT, "--sparse: predictors for %u of %u layers", n_pred, n_layer);
    if (n_used != side->n_tensors)
        return optiml_fail(OPTIML_ERR_FORMAT, "--sparse: %llu of its %llu tensors are not blk.N.fc1.weight, "
                           "fc2.weight or ffn_act_freq of the model's layers",
                           (unsigned long long)(side->n_tensors - n_used), (unsigned long long)side->n_tensors);
    for (uint64_t i = 0; i < side->n_kv; i++) {
        const struct gguf_kv *kv = &side->kv[i];
        if (kv->key.n > 14 && memcmp(kv->key.data, "optiml.sparse.", 14) == 0) {
            char key[128];
            snprintf(key, sizeof(key), "%.*s", (int)(kv->key.n < 120 ? kv->key.n : 120), kv->key.data);
            TRY(gguf_writer_set_value(out->w, key, &kv->value));
        } else if (!(kv->key.n > 8 && memcmp(kv->key.data, "general.", 8) == 0)) {
            return optiml_fail(OPTIML_ERR_FORMAT, "--sparse: key '%.*s' is not an optiml.sparse.* key",
                               (int)(kv->key.n < 64 ? kv->key.n : 64), kv->key.data);
        }
    }
    LOG_INFO("--sparse: %u layers with predictors, %llu tensors", n_pred, (unsigned long long)n_used);
    return OPTIML_OK;
}

optiml_status convert_out_write(struct convert_out *out, const char *path) {
    LOG_INFO("writing %s: %zu tensors, matrices in %s", path, out->n_tensors,
             dtype_name(out->outtype));
    TRY(gguf_writer_write(out->w, path));
    LOG_INFO("wrote %s", path);
    return OPTIML_OK;
}

/* ---- Llama hyperparameters ------------------------------------------------------- */

optiml_status convert_set_hparams(struct convert_out *out, const struct convert_hparams *hp) {
    gguf_writer *w = out->w;
    const char *arch = hp->arch ? hp->arch : "llama";
    char key[96];
#define ARCH_KEY(suffix) (snprintf(key, sizeof(key), "%s." suffix, arch), key)
    TRY(gguf_writer_set_str(w, "general.architecture", arch));
    TRY(gguf_writer_set_str(w, "general.name", hp->name));
    TRY(gguf_writer_set_u32(w, ARCH_KEY("context_length"), hp->n_ctx));
    TRY(gguf_writer_set_u32(w, ARCH_KEY("embedding_length"), hp->n_embd));
    TRY(gguf_writer_set_u32(w, ARCH_KEY("block_count"), hp->n_layer));
    TRY(gguf_writer_set_u32(w, ARCH_KEY("feed_forward_length"), hp->n_ff));
    TRY(gguf_writer_set_u32(w, ARCH_KEY("attention.head_count"), hp->n_head));
    TRY(gguf_writer_set_u32(w, ARCH_KEY("attention.head_count_kv"), hp->n_head_kv));
    TRY(gguf_writer_set_f32(w, ARCH_KEY("attention.layer_norm_rms_epsilon"), hp->rms_eps));
    TRY(gguf_writer_set_f32(w, ARCH_KEY("rope.freq_base"), hp->rope_theta));
    TRY(gguf_writer_set_u32(w, ARCH_KEY("rope.dimension_count"), hp->head_dim));
    TRY(gguf_writer_set_u32(w, ARCH_KEY("vocab_size"), hp->n_vocab));
#undef ARCH_KEY
    TRY(gguf_writer_set_str(w, "optiml.ffn_activation", hp->activation));
    return OPTIML_OK;
}

/* ---- vocabulary ---------------------------------------------------------------------- */

/* arr resized from old_n to n elements of size sz, the new ones zeroed;
 * NULL if out of memory (arr is then unchanged). */
static void *convert_vocab_resize(void *arr, size_t old_n, size_t n, size_t sz) {
    char *p = realloc(arr, (n ? n : 1) * sz);
    if (p && n > old_n) memset(p + old_n * sz, 0, (n - old_n) * sz);
    return p;
}

static optiml_status convert_vocab_grow(struct convert_vocab *v, uint32_t n) {
    char **tokens = convert_vocab_resize(v->tokens, v->n, n, sizeof(*tokens));
    if (tokens) v->tokens = tokens;
    uint64_t *lens = convert_vocab_resize(v->lens, v->n, n, sizeof(*lens));
    if (lens) v->lens = lens;
    float *scores = convert_vocab_resize(v->scores, v->n, n, sizeof(*scores));
    if (scores) v->scores = scores;
    int32_t *types = convert_vocab_resize(v->types, v->n, n, sizeof(*types));
    if (types) v->types = types;
    if (!tokens || !lens || !scores || !types)
        return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    v->n = n;
    return OPTIML_OK;
}

optiml_status convert_vocab_init(struct convert_vocab *v, uint32_t n) {
    memset(v, 0, sizeof(*v));
    return convert_vocab_grow(v, n);
}

void convert_vocab_free(struct convert_vocab *v) {
    for (uint32_t i = 0; v->tokens && i < v->n; i++) free(v->tokens[i]);
    free(v->tokens);
    free(v->lens);
    free(v->scores);
    free(v->types);
    memset(v, 0, sizeof(*v));
}

optiml_status convert_vocab_set(struct convert_vocab *v, uint32_t i, const char *s, uint64_t len,
                                float score, int32_t type) {
    if (i >= v->n) return optiml_fail(OPTIML_ERR_INTERNAL, "token id %u >= %u", i, v->n);
    char *copy = malloc((size_t)len + 1);
    if (!copy) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    if (len) memcpy(copy, s, (size_t)len);
    copy[len] = '\0';
    free(v->tokens[i]);
    v->tokens[i] = copy;
    v->lens[i] = len;
    v->scores[i] = score;
    v->types[i] = type;
    return OPTIML_OK;
}

optiml_status convert_vocab_pad(struct convert_vocab *v, uint32_t n, uint32_t *n_filled) {
    if (n_filled) *n_filled = 0;
    if (n > v->n) TRY(convert_vocab_grow(v, n));
    for (uint32_t i = 0; i < v->n; i++) {
        if (v->tokens[i]) continue;
        char buf[32];
        int len = snprintf(buf, sizeof(buf), "[PAD%u]", i);
        TRY(convert_vocab_set(v, i, buf, (uint64_t)len, 0.0f, CONVERT_TOKEN_UNUSED));
        if (n_filled) (*n_filled)++;
    }
    return OPTIML_OK;
}

optiml_status convert_vocab_write(struct convert_out *out, const struct convert_vocab *v,
                                  const char *model, bool with_scores) {
    for (uint32_t i = 0; i < v->n; i++)
        if (!v->tokens[i]) return optiml_fail(OPTIML_ERR_INTERNAL, "token %u was never set", i);
    TRY(gguf_writer_set_str(out->w, "tokenizer.ggml.model", model));
    TRY(gguf_writer_set_arr_str(out->w, "tokenizer.ggml.tokens", (const char *const *)v->tokens,
                                v->lens, v->n));
    if (with_scores)
        TRY(gguf_writer_set_arr(out->w, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, v->scores,
                                v->n));
    TRY(gguf_writer_set_arr(out->w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, v->types, v->n));
    return OPTIML_OK;
}

/* ---- command line ---------------------------------------------------------------------- */

static void convert_usage(FILE *fp) {
    fprintf(fp,
            "usage: optiml-convert --llama2c CKPT.bin --tokenizer TOK.bin --outfile OUT.gguf\n"
            "                      [--outtype f32|f16|bf16] [--name NAME]\n"
            "       optiml-convert --hf DIR --outfile OUT.gguf [--outtype f32|f16|bf16] "
            "[--name NAME] [--sparse SIDE.gguf]\n"
            "\n"
            "Convert a llama2.c legacy checkpoint (with its tokenizer.bin) or a Hugging Face\n"
            "Llama directory (config.json, *.safetensors, tokenizer.model or tokenizer.json)\n"
            "into an OptiML GGUF file.\n"
            "\n"
            "  --llama2c FILE    llama2.c checkpoint (7 int32 header, float32 weights)\n"
            "  --tokenizer FILE  llama2.c tokenizer.bin (with --llama2c)\n"
            "  --hf DIR          Hugging Face model directory\n"
            "  --outfile FILE    the GGUF file to write\n"
            "  --outtype TYPE    matrix type: f32, f16 or bf16 (default: f32 for llama2c,\n"
            "                    the checkpoint's dtype for --hf); norms stay f32\n"
            "  --name NAME       general.name (default: the input's file or directory name)\n"
            "  --sparse FILE     (--hf) a GGUF of predictors and statistics to merge\n"
            "                    (blk.N.fc1.weight, fc2.weight, ffn_act_freq, optiml.sparse.*\n"
            "                    keys; convert.py writes it); adds blk.N.ffn_down_t.weight\n"
            "  -h, --help        this help\n");
}

/* Log callback: progress and warnings on standard error; errors are printed
 * once by main from optiml_last_error(). */
static void convert_log(optiml_log_level level, const char *msg, void *user) {
    (void)user;
    if (level == OPTIML_LOG_LEVEL_ERROR) return;
    fprintf(stderr, "optiml-convert: %s%s\n", level == OPTIML_LOG_LEVEL_WARN ? "warning: " : "",
            msg);
}

static int convert_die(const char *fmt, const char *arg) {
    fprintf(stderr, "optiml-convert: error: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, " (see --help)\n");
    return 1;
}

int main(int argc, char **argv) {
    const char *ckpt = NULL, *tok = NULL, *hf = NULL, *outtype = NULL;
    struct convert_params params = {.outfile = NULL, .name = NULL, .outtype = -1, .sparse = NULL};

    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "-h") == 0 || strcmp(arg, "--help") == 0) {
            convert_usage(stderr);
            return 0;
        }
        /* --flag VALUE or --flag=VALUE */
        static const char *const flags[] = {"--llama2c", "--tokenizer", "--hf", "--outfile",
                                            "--outtype", "--name", "--sparse"};
        const char **slots[] = {&ckpt, &tok, &hf, &params.outfile, &outtype, &params.name, &params.sparse};
        int which = -1;
        const char *value = NULL;
        for (int f = 0; f < (int)(sizeof(flags) / sizeof(flags[0])); f++) {
            size_t n = strlen(flags[f]);
            if (strncmp(arg, flags[f], n) != 0) continue;
            if (arg[n] == '\0') {
                if (i + 1 >= argc) return convert_die("%s needs a value", flags[f]);
                value = argv[++i];
            } else if (arg[n] == '=') {
                value = arg + n + 1;
            } else {
                continue;
            }
            which = f;
            break;
        }
        if (which < 0) return convert_die("unknown argument '%s'", arg);
        if (*slots[which]) return convert_die("%s given twice", flags[which]);
        if (value[0] == '\0') return convert_die("%s needs a non-empty value", flags[which]);
        *slots[which] = value;
    }

    if (ckpt && hf) return convert_die("%s", "--llama2c and --hf exclude each other");
    if (!ckpt && !hf) return convert_die("%s", "give --llama2c CKPT.bin or --hf DIR");
    if (ckpt && !tok) return convert_die("%s", "--llama2c needs --tokenizer TOK.bin");
    if (hf && tok) return convert_die("%s", "--tokenizer goes with --llama2c only");
    if (ckpt && params.sparse) return convert_die("%s", "--sparse goes with --hf only");
    if (!params.outfile) return convert_die("%s", "missing --outfile OUT.gguf");
    if (outtype) {
        if (strcmp(outtype, "f32") == 0) params.outtype = DTYPE_F32;
        else if (strcmp(outtype, "f16") == 0) params.outtype = DTYPE_F16;
        else if (strcmp(outtype, "bf16") == 0) params.outtype = DTYPE_BF16;
        else return convert_die("--outtype '%s': expected f32, f16 or bf16", outtype);
    }

    optiml_log_set(convert_log, NULL, OPTIML_LOG_LEVEL_INFO);
    optiml_clear_error();
    optiml_status st = ckpt ? convert_llama2c(ckpt, tok, &params) : convert_hf(hf, &params);
    if (st != OPTIML_OK) {
        const char *why = optiml_last_error();
        fprintf(stderr, "optiml-convert: error: %s\n", why[0] ? why : optiml_status_str(st));
        return 1;
    }
    return 0;
}
