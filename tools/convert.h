/*
 * convert.h - the pieces of optiml-convert shared between its front ends:
 * the output queue (metadata plus tensors converted and permuted on the fly
 * while the GGUF file is written), the Llama hyperparameter keys, the token
 * vocabulary builder, a read-only file mapping, and the entry points of the
 * llama2.c and Hugging Face converters.
 *
 * Nothing here exits: every function returns an optiml_status with the
 * reason recorded by optiml_fail(); tools/convert.c's main prints it.
 */
#ifndef OPTIML_CONVERT_H
#define OPTIML_CONVERT_H

#include "common.h"
#include "dtype.h"
#include "gguf.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- command line --------------------------------------------------------- */

struct convert_params {
    const char *outfile; /* the GGUF file to write                              */
    const char *name;    /* general.name; NULL: derived from the input path     */
    int outtype;         /* DTYPE_F32, DTYPE_F16 or DTYPE_BF16; -1: the input's */
    const char *sparse;  /* GGUF of sparse-FFN extras to merge (--sparse), or NULL */
};

/* llama2.c legacy checkpoint + tokenizer.bin -> GGUF (convert_llama2c.c). */
optiml_status convert_llama2c(const char *ckpt_path, const char *tok_path,
                              const struct convert_params *params);

/* Hugging Face Llama directory -> GGUF (convert_hf.c). Without jansson it
 * fails with OPTIML_ERR_UNSUPPORTED. */
optiml_status convert_hf(const char *dir, const struct convert_params *params);

/* ---- files -------------------------------------------------------------------- */

/* A whole file mapped read-only (data is NULL for an empty file). */
struct convert_map {
    const uint8_t *data;
    uint64_t size;
};

optiml_status convert_map_open(const char *path, struct convert_map *m);
void convert_map_close(struct convert_map *m); /* zeroed or closed: no-op */

/* The last path component ("a/b/stories.bin/" -> "stories.bin"), without
 * its extension if strip_ext ("stories"); malloc'd, NULL if out of memory. */
char *convert_path_name(const char *path, bool strip_ext);

/* ---- output: metadata and tensors ------------------------------------------- */

/* Where a queued tensor's elements come from. src points at n_rows rows of
 * ne[0] elements of src_type (F32, F16 or BF16), possibly unaligned. With
 * rope_heads > 0 the rows are split into rope_heads heads and permuted
 * within each head from Hugging Face's rotate-half layout to interleaved
 * pairs (docs/FORMAT.md, "RoPE layout"): out row 2i <- in row i,
 * out row 2i+1 <- in row i + head_dim/2. */
struct convert_tensor {
    char *name;
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS]; /* GGUF order: ne[0] is the row length */
    uint32_t src_type;
    uint32_t dst_type;
    const void *src;
    uint32_t rope_heads;
    bool transpose; /* src holds ne[0] rows of ne[1]: out row r = src column r */
    size_t index;   /* position in the queue, for progress lines */
    struct convert_out *out;
};

/* A GGUF file being assembled. */
struct convert_out {
    gguf_writer *w;
    uint32_t outtype;              /* type of matrices: DTYPE_F32/F16/BF16 */
    struct convert_tensor **tensors;
    size_t n_tensors, cap_tensors;
    void **owned;                  /* buffers freed with the queue          */
    size_t n_owned, cap_owned;
};

/* outtype is DTYPE_F32, DTYPE_F16 or DTYPE_BF16. Sets general.file_type. */
optiml_status convert_out_init(struct convert_out *out, uint32_t outtype);
void convert_out_free(struct convert_out *out);

/* The type a tensor is stored in: f32 for 1-D tensors, norms and
 * rope_freqs; outtype for the rest. */
uint32_t convert_pick_type(const char *name, uint32_t n_dims, uint32_t outtype);

/* Queue a tensor (converted to convert_pick_type when written). ne is in
 * GGUF order. src must stay valid until convert_out_write returns. */
optiml_status convert_out_add(struct convert_out *out, const char *name, uint32_t src_type,
                              uint32_t n_dims, const uint64_t *ne, const void *src,
                              uint32_t rope_heads);

/* Queue the 2-D tensor (ne[0], ne[1]) whose rows are the columns of src,
 * a row-major matrix of ne[0] rows of ne[1] elements (e.g. ffn_down_t from
 * Hugging Face's down_proj). */
optiml_status convert_out_add_transposed(struct convert_out *out, const char *name, uint32_t src_type,
                                         const uint64_t *ne, const void *src);

/* --sparse SIDE.gguf (written by convert.py from PowerInfer-style predictor
 * files): queue its blk.N.fc1.weight (n_embd, r), blk.N.fc2.weight (r, n_ff)
 * and blk.N.ffn_act_freq (n_ff), f32 or f16, after checking their shapes,
 * and copy its optiml.sparse.* keys. side must stay open until the file is
 * written. Any other tensor or key, or a predictor in some layers only,
 * fails with OPTIML_ERR_FORMAT. */
optiml_status convert_add_sparse(struct convert_out *out, const gguf_file *side, uint32_t n_layer,
                                  uint32_t n_embd, uint32_t n_ff);

/* Hand buf (malloc'd) to the queue, which frees it in convert_out_free,
 * even when this call fails. */
optiml_status convert_out_own(struct convert_out *out, void *buf);

/* Write the file: metadata, then each tensor, one at a time, converted as
 * it is written, with a progress line per tensor. */
optiml_status convert_out_write(struct convert_out *out, const char *path);

/* Convert n elements; src and dst may be unaligned. Types: F32, F16, BF16. */
void convert_elements(void *dst, uint32_t dst_type, const void *src, uint32_t src_type,
                      uint64_t n);

/* ---- Llama hyperparameters ------------------------------------------------- */

struct convert_hparams {
    const char *name;       /* general.name                                  */
    uint32_t n_ctx;         /* training context                              */
    uint32_t n_embd;
    uint32_t n_layer;
    uint32_t n_ff;
    uint32_t n_head;
    uint32_t n_head_kv;
    uint32_t head_dim;      /* rope.dimension_count                          */
    uint32_t n_vocab;
    float rms_eps;
    float rope_theta;
    const char *activation; /* optiml.ffn_activation: silu, relu, relu2, gelu */
    const char *arch;       /* general.architecture; NULL: "llama"         */
};

/* general.architecture (hp->arch), general.name and the ARCH.* keys. */
optiml_status convert_set_hparams(struct convert_out *out, const struct convert_hparams *hp);

/* ---- vocabulary ------------------------------------------------------------ */

/* Token types, as tokenizer.ggml.token_type numbers them. */
enum convert_token_type {
    CONVERT_TOKEN_NORMAL = 1,
    CONVERT_TOKEN_UNKNOWN = 2,
    CONVERT_TOKEN_CONTROL = 3,
    CONVERT_TOKEN_USER_DEFINED = 4,
    CONVERT_TOKEN_UNUSED = 5,
    CONVERT_TOKEN_BYTE = 6,
};

struct convert_vocab {
    uint32_t n;
    char **tokens;    /* n strings, malloc'd, NUL-terminated                 */
    uint64_t *lens;   /* byte lengths (pieces may hold NUL bytes)            */
    float *scores;    /* n scores                                            */
    int32_t *types;   /* n enum convert_token_type                           */
};

optiml_status convert_vocab_init(struct convert_vocab *v, uint32_t n);
void convert_vocab_free(struct convert_vocab *v);
/* Token i = the len bytes at s (copied). */
optiml_status convert_vocab_set(struct convert_vocab *v, uint32_t i, const char *s, uint64_t len,
                                float score, int32_t type);
/* Grow to n tokens (n may equal v->n); ids without a token (new or never
 * set) become "[PADi]" of type unused. *n_filled (may be NULL) counts them. */
optiml_status convert_vocab_pad(struct convert_vocab *v, uint32_t n, uint32_t *n_filled);
/* tokenizer.ggml.model = model, tokens, token_type, and scores if
 * with_scores. Every token must have been set (or padded). */
optiml_status convert_vocab_write(struct convert_out *out, const struct convert_vocab *v,
                                  const char *model, bool with_scores);

/* ---- SentencePiece model (tokenizer.model) ----------------------------------- */

/* One piece of a SentencePiece ModelProto. */
struct spm_piece {
    const char *piece; /* len bytes inside the parsed buffer, not NUL-terminated */
    uint32_t len;
    float score;
    int32_t type;      /* enum convert_token_type (SentencePiece's numbering)   */
};

struct spm_model {
    uint32_t n_pieces;
    struct spm_piece *pieces;
    bool add_dummy_prefix; /* normalizer_spec.add_dummy_prefix (default true) */
    int32_t unk_id, bos_id, eos_id, pad_id; /* trainer_spec (-1: none)         */
};

/* Parse a serialized sentencepiece.ModelProto held in memory (the pieces
 * point into buf, which must outlive *out). Bounds-checked: every varint,
 * length and field is checked against the buffer; a malformed message fails
 * with OPTIML_ERR_FORMAT naming name and the byte offset. Lives in
 * convert_spm.c and needs no JSON library. */
optiml_status spm_model_parse(const void *buf, uint64_t size, const char *name,
                              struct spm_model **out);
void spm_model_free(struct spm_model *m); /* NULL is a no-op */

#endif /* OPTIML_CONVERT_H */
