/*
 * convert_llama2c.c - llama2.c legacy checkpoint + tokenizer.bin -> GGUF.
 *
 * Checkpoint (all little-endian; Karpathy's llama2.c "legacy" export):
 *
 *   int32 dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
 *       (vocab_size < 0: the classifier is not shared with the embedding and
 *        follows the other weights; |vocab_size| is the vocabulary)
 *   float32 weights, PyTorch layout (out, in) for matrices, in this order
 *   (head_size = dim / n_heads):
 *     token_embedding  (vocab, dim)
 *     rms_att          (n_layers, dim)
 *     wq               (n_layers, n_heads * head_size, dim)
 *     wk               (n_layers, n_kv_heads * head_size, dim)
 *     wv               (n_layers, n_kv_heads * head_size, dim)
 *     wo               (n_layers, dim, n_heads * head_size)
 *     rms_ffn          (n_layers, dim)
 *     w1               (n_layers, hidden_dim, dim)     gate
 *     w2               (n_layers, dim, hidden_dim)     down
 *     w3               (n_layers, hidden_dim, dim)     up
 *     rms_final        (dim)
 *     freq_cis_real    (seq_len, head_size / 2)        unused: skipped
 *     freq_cis_imag    (seq_len, head_size / 2)        unused: skipped
 *     wcls             (vocab, dim)                    only if vocab_size < 0
 *   The file size must equal what the header implies.
 *
 * Tokenizer (tokenizer.bin):
 *
 *   int32 max_token_length
 *   per token, until the end of the file: float32 score | int32 len | len bytes
 *
 * The tokens become a SentencePiece-style GGUF vocabulary (model "llama"):
 * spaces turn into U+2581, token 0 is <unk>, 1 and 2 are the control tokens
 * <s> and </s> (their text in the file, "\n<s>\n", is replaced), "<0xXX>"
 * pieces are byte tokens. llama2.c applies RoPE to adjacent pairs already,
 * so unlike Hugging Face checkpoints no Q/K rows are permuted.
 */
#include "convert.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- checkpoint ------------------------------------------------------------- */

struct llama2c_config {
    int32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
    bool shared_classifier;
    uint32_t n_vocab, head_size;
};

/* Read and check the 7-int header. */
static optiml_status llama2c_read_config(const char *path, const struct convert_map *m,
                                         struct llama2c_config *c) {
    if (m->size < 7 * sizeof(int32_t))
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: %llu bytes is too short for a llama2.c header",
                           path, (unsigned long long)m->size);
    int32_t h[7];
    memcpy(h, m->data, sizeof(h));
    c->dim = h[0];
    c->hidden_dim = h[1];
    c->n_layers = h[2];
    c->n_heads = h[3];
    c->n_kv_heads = h[4];
    c->vocab_size = h[5];
    c->seq_len = h[6];
    c->shared_classifier = c->vocab_size > 0;
    if (c->dim <= 0 || c->hidden_dim <= 0 || c->n_layers <= 0 || c->n_heads <= 0 ||
        c->n_kv_heads <= 0 || c->vocab_size == 0 || c->vocab_size == INT32_MIN || c->seq_len <= 0)
        return optiml_fail(OPTIML_ERR_FORMAT,
                           "%s: bad header (dim %d, hidden_dim %d, n_layers %d, n_heads %d, "
                           "n_kv_heads %d, vocab_size %d, seq_len %d): not a llama2.c checkpoint?",
                           path, c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads,
                           c->vocab_size, c->seq_len);
    if (c->dim % c->n_heads != 0 || (c->dim / c->n_heads) % 2 != 0)
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: dim %d does not split into %d heads of even size",
                           path, c->dim, c->n_heads);
    if (c->n_kv_heads > c->n_heads || c->n_heads % c->n_kv_heads != 0)
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: n_heads %d is not a multiple of n_kv_heads %d",
                           path, c->n_heads, c->n_kv_heads);
    c->n_vocab = (uint32_t)(c->vocab_size < 0 ? -c->vocab_size : c->vocab_size);
    c->head_size = (uint32_t)(c->dim / c->n_heads);
    return OPTIML_OK;
}

/* One weight array of the checkpoint, in file order. */
struct llama2c_array {
    const char *what;    /* llama2.c's name                                   */
    uint64_t per_layer;  /* number of copies: n_layers, or 1                  */
    uint64_t rows, cols; /* each copy: rows x cols float32 (PyTorch (out, in)) */
    const float *data;   /* set by llama2c_layout                             */
};

enum {
    LLAMA2C_EMBD, LLAMA2C_RMS_ATT, LLAMA2C_WQ, LLAMA2C_WK, LLAMA2C_WV, LLAMA2C_WO,
    LLAMA2C_RMS_FFN, LLAMA2C_W1, LLAMA2C_W2, LLAMA2C_W3, LLAMA2C_RMS_FINAL,
    LLAMA2C_FREQ_REAL, LLAMA2C_FREQ_IMAG, LLAMA2C_WCLS, LLAMA2C_N_ARRAYS,
};

/* Lay the arrays out over the mapping; fail unless the sizes add up to the
 * file size exactly. */
static optiml_status llama2c_layout(const char *path, const struct convert_map *m,
                                    const struct llama2c_config *c,
                                    struct llama2c_array a[LLAMA2C_N_ARRAYS]) {
    uint64_t L = (uint64_t)c->n_layers, dim = (uint64_t)c->dim, ff = (uint64_t)c->hidden_dim;
    uint64_t q = (uint64_t)c->n_heads * c->head_size, kv = (uint64_t)c->n_kv_heads * c->head_size;
    uint64_t half = c->head_size / 2, seq = (uint64_t)c->seq_len, V = c->n_vocab;
    const struct llama2c_array table[LLAMA2C_N_ARRAYS] = {
        [LLAMA2C_EMBD] = {"token_embedding_table", 1, V, dim, NULL},
        [LLAMA2C_RMS_ATT] = {"rms_att_weight", L, 1, dim, NULL},
        [LLAMA2C_WQ] = {"wq", L, q, dim, NULL},
        [LLAMA2C_WK] = {"wk", L, kv, dim, NULL},
        [LLAMA2C_WV] = {"wv", L, kv, dim, NULL},
        [LLAMA2C_WO] = {"wo", L, dim, q, NULL},
        [LLAMA2C_RMS_FFN] = {"rms_ffn_weight", L, 1, dim, NULL},
        [LLAMA2C_W1] = {"w1", L, ff, dim, NULL},
        [LLAMA2C_W2] = {"w2", L, dim, ff, NULL},
        [LLAMA2C_W3] = {"w3", L, ff, dim, NULL},
        [LLAMA2C_RMS_FINAL] = {"rms_final_weight", 1, 1, dim, NULL},
        [LLAMA2C_FREQ_REAL] = {"freq_cis_real", 1, seq, half, NULL},
        [LLAMA2C_FREQ_IMAG] = {"freq_cis_imag", 1, seq, half, NULL},
        [LLAMA2C_WCLS] = {"wcls", c->shared_classifier ? 0 : 1, V, dim, NULL},
    };
    /* Every factor is below 2^31, and at most 14 terms of three factors
     * each are summed: compute in checked 64-bit arithmetic anyway. */
    uint64_t offset = 7 * sizeof(int32_t);
    for (int i = 0; i < LLAMA2C_N_ARRAYS; i++) {
        a[i] = table[i];
        uint64_t n, bytes;
        if (!mul_u64_ok(a[i].rows, a[i].cols, &n) || !mul_u64_ok(n, a[i].per_layer, &n) ||
            !mul_u64_ok(n, sizeof(float), &bytes) || !add_u64_ok(offset, bytes, &bytes))
            return optiml_fail(OPTIML_ERR_FORMAT, "%s: header implies an impossible size", path);
        if (bytes > m->size)
            return optiml_fail(OPTIML_ERR_FORMAT,
                               "%s: truncated: %s needs bytes up to offset %llu, the file has "
                               "%llu",
                               path, a[i].what, (unsigned long long)bytes,
                               (unsigned long long)m->size);
        a[i].data = (const float *)(m->data + offset);
        offset = bytes;
    }
    if (offset != m->size)
        return optiml_fail(OPTIML_ERR_FORMAT,
                           "%s: the header implies %llu bytes but the file has %llu (%s "
                           "classifier, vocab_size %d)",
                           path, (unsigned long long)offset, (unsigned long long)m->size,
                           c->shared_classifier ? "shared" : "separate", c->vocab_size);
    return OPTIML_OK;
}

/* Queue copy `layer` of array a as tensor `name`. */
static optiml_status llama2c_add(struct convert_out *out, const char *name,
                                 const struct llama2c_array *a, uint64_t layer) {
    uint64_t ne[2] = {a->cols, a->rows};
    uint32_t n_dims = a->rows == 1 ? 1 : 2;
    return convert_out_add(out, name, DTYPE_F32, n_dims, ne, a->data + layer * a->rows * a->cols,
                           0);
}

static optiml_status llama2c_add_tensors(struct convert_out *out, const struct llama2c_config *c,
                                         const struct llama2c_array a[LLAMA2C_N_ARRAYS]) {
    static const struct {
        int array;
        const char *name;
    } per_layer[] = {
        {LLAMA2C_RMS_ATT, "attn_norm"}, {LLAMA2C_WQ, "attn_q"},      {LLAMA2C_WK, "attn_k"},
        {LLAMA2C_WV, "attn_v"},         {LLAMA2C_WO, "attn_output"}, {LLAMA2C_RMS_FFN, "ffn_norm"},
        {LLAMA2C_W1, "ffn_gate"},       {LLAMA2C_W3, "ffn_up"},      {LLAMA2C_W2, "ffn_down"},
    };
    TRY(llama2c_add(out, "token_embd.weight", &a[LLAMA2C_EMBD], 0));
    for (int32_t l = 0; l < c->n_layers; l++) {
        for (size_t k = 0; k < sizeof(per_layer) / sizeof(per_layer[0]); k++) {
            char name[64];
            snprintf(name, sizeof(name), "blk.%d.%s.weight", l, per_layer[k].name);
            TRY(llama2c_add(out, name, &a[per_layer[k].array], (uint64_t)l));
        }
    }
    TRY(llama2c_add(out, "output_norm.weight", &a[LLAMA2C_RMS_FINAL], 0));
    if (!c->shared_classifier) TRY(llama2c_add(out, "output.weight", &a[LLAMA2C_WCLS], 0));
    return OPTIML_OK;
}

/* ---- tokenizer -------------------------------------------------------------- */

static bool llama2c_is_hex_digit(uint8_t ch) {
    return (ch >= '0' && ch <= '9') || (ch >= 'A' && ch <= 'F');
}

/* "<0xXX>" with upper-case hex digits, as SentencePiece spells byte pieces. */
static bool llama2c_is_byte_piece(const uint8_t *s, uint32_t len) {
    return len == 6 && memcmp(s, "<0x", 3) == 0 && llama2c_is_hex_digit(s[3]) &&
           llama2c_is_hex_digit(s[4]) && s[5] == '>';
}

/* Parse tokenizer.bin into v; the token count must equal n_vocab. */
static optiml_status llama2c_read_tokenizer(const char *path, const struct convert_map *m,
                                            uint32_t n_vocab, struct convert_vocab *v) {
    if (m->size < 4)
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: too short for a llama2.c tokenizer", path);
    int32_t max_len;
    memcpy(&max_len, m->data, 4);
    if (max_len <= 0)
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: bad max_token_length %d", path, max_len);

    /* First pass: count the tokens and check every record. */
    uint32_t n = 0;
    for (uint64_t off = 4; off < m->size; n++) {
        int32_t len;
        if (m->size - off < 8)
            return optiml_fail(OPTIML_ERR_FORMAT, "%s: token %u: truncated record at offset %llu",
                               path, n, (unsigned long long)off);
        memcpy(&len, m->data + off + 4, 4);
        if (len < 0 || (uint64_t)len > m->size - off - 8)
            return optiml_fail(OPTIML_ERR_FORMAT,
                               "%s: token %u: length %d at offset %llu runs past the end", path, n,
                               len, (unsigned long long)(off + 4));
        if (len > max_len)
            LOG_WARN("%s: token %u is %d bytes, longer than max_token_length %d", path, n, len,
                     max_len);
        off += 8 + (uint64_t)len;
    }
    if (n != n_vocab)
        return optiml_fail(OPTIML_ERR_FORMAT,
                           "%s: %u tokens, but the checkpoint's vocab_size is %u: wrong tokenizer?",
                           path, n, n_vocab);

    TRY(convert_vocab_init(v, n));
    uint64_t off = 4;
    for (uint32_t i = 0; i < n; i++) {
        float score;
        int32_t len;
        memcpy(&score, m->data + off, 4);
        memcpy(&len, m->data + off + 4, 4);
        const uint8_t *s = m->data + off + 8;
        off += 8 + (uint64_t)len;
        if (score != score)
            return optiml_fail(OPTIML_ERR_FORMAT, "%s: token %u: score is NaN", path, i);

        if (i == 1 || i == 2) { /* "\n<s>\n", "\n</s>\n" in llama2.c's files */
            const char *text = i == 1 ? "<s>" : "</s>";
            TRY(convert_vocab_set(v, i, text, strlen(text), score, CONVERT_TOKEN_CONTROL));
            continue;
        }
        int32_t type = i == 0                                    ? CONVERT_TOKEN_UNKNOWN
                       : llama2c_is_byte_piece(s, (uint32_t)len) ? CONVERT_TOKEN_BYTE
                                                                 : CONVERT_TOKEN_NORMAL;
        /* ' ' -> U+2581 (3 bytes in UTF-8) */
        char *piece = malloc((size_t)len * 3 + 1);
        if (!piece) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
        size_t k = 0;
        for (int32_t j = 0; j < len; j++) {
            if (s[j] == ' ') {
                memcpy(piece + k, "\xe2\x96\x81", 3);
                k += 3;
            } else {
                piece[k++] = (char)s[j];
            }
        }
        optiml_status st = convert_vocab_set(v, i, piece, k, score, type);
        free(piece);
        TRY(st);
    }
    return OPTIML_OK;
}

static optiml_status llama2c_write_vocab(struct convert_out *out, const struct convert_vocab *v) {
    TRY(convert_vocab_write(out, v, "llama", true));
    gguf_writer *w = out->w;
    TRY(gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", 1));
    TRY(gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 2));
    TRY(gguf_writer_set_u32(w, "tokenizer.ggml.unknown_token_id", 0));
    TRY(gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token", true));
    TRY(gguf_writer_set_bool(w, "tokenizer.ggml.add_eos_token", false));
    TRY(gguf_writer_set_bool(w, "tokenizer.ggml.add_space_prefix", true));
    return OPTIML_OK;
}

/* ---- driver ------------------------------------------------------------------- */

optiml_status convert_llama2c(const char *ckpt_path, const char *tok_path,
                              const struct convert_params *params) {
    struct convert_map ckpt = {0}, tok = {0};
    struct convert_out out = {0};
    struct convert_vocab vocab = {0};
    char *stem = NULL;
    struct llama2c_config c = {0};
    struct llama2c_array arrays[LLAMA2C_N_ARRAYS] = {{0}};
    uint32_t outtype = params->outtype < 0 ? DTYPE_F32 : (uint32_t)params->outtype;

    optiml_status st = convert_map_open(ckpt_path, &ckpt);
    if (st == OPTIML_OK) st = llama2c_read_config(ckpt_path, &ckpt, &c);
    if (st == OPTIML_OK) st = llama2c_layout(ckpt_path, &ckpt, &c, arrays);
    if (st == OPTIML_OK) st = convert_map_open(tok_path, &tok);
    if (st == OPTIML_OK) st = llama2c_read_tokenizer(tok_path, &tok, c.n_vocab, &vocab);
    if (st == OPTIML_OK) {
        LOG_INFO("%s: llama2.c checkpoint: dim %d, hidden_dim %d, %d layers, %d heads, %d kv "
                 "heads, vocab %u, seq_len %d, %s classifier",
                 ckpt_path, c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.n_vocab,
                 c.seq_len, c.shared_classifier ? "shared" : "separate");
        st = convert_out_init(&out, outtype);
    }
    if (st == OPTIML_OK && !params->name && !(stem = convert_path_name(ckpt_path, true)))
        st = optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    if (st == OPTIML_OK) {
        struct convert_hparams hp = {
            .name = params->name ? params->name : stem,
            .n_ctx = (uint32_t)c.seq_len,
            .n_embd = (uint32_t)c.dim,
            .n_layer = (uint32_t)c.n_layers,
            .n_ff = (uint32_t)c.hidden_dim,
            .n_head = (uint32_t)c.n_heads,
            .n_head_kv = (uint32_t)c.n_kv_heads,
            .head_dim = c.head_size,
            .n_vocab = c.n_vocab,
            .rms_eps = 1e-5f,
            .rope_theta = 10000.0f,
            .activation = "silu",
        };
        st = convert_set_hparams(&out, &hp);
    }
    if (st == OPTIML_OK) st = llama2c_write_vocab(&out, &vocab);
    if (st == OPTIML_OK) st = llama2c_add_tensors(&out, &c, arrays);
    if (st == OPTIML_OK) st = convert_out_write(&out, params->outfile);

    free(stem);
    convert_vocab_free(&vocab);
    convert_out_free(&out);
    convert_map_close(&tok);
    convert_map_close(&ckpt);
    return st;
}
