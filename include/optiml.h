/*
 * optiml.h - the public C API of liboptiml.
 *
 * OptiML runs Llama-family language models stored in GGUF files. The API
 * separates the read-only model (weights, vocabulary; shareable by several
 * contexts) from the context (KV cache, scratch buffers, logits). Text goes
 * through the tokenizer into a batch of tokens, each with a position and a
 * sequence id, so several sequences can advance in one optiml_decode() call.
 *
 * Errors: every function that can fail returns an optiml_status (or NULL /
 * a negative count) and records a one-line reason, readable with
 * optiml_last_error() on the same thread. Nothing in the library calls
 * exit() or prints to stdout; log lines go to the callback set with
 * optiml_log_set() (standard error by default).
 *
 * Threads: a model may be used by several contexts on several threads; one
 * context must be used by one thread at a time.
 */
#ifndef OPTIML_H
#define OPTIML_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(OPTIML_SHARED) && defined(OPTIML_BUILD)
#define OPTIML_API __declspec(dllexport)
#elif defined(__GNUC__)
#define OPTIML_API __attribute__((visibility("default")))
#else
#define OPTIML_API
#endif

/* ---- status codes and logging ----------------------------------------- */

typedef enum optiml_status {
    OPTIML_OK = 0,
    OPTIML_ERR_INVALID_ARG = 1, /* a NULL or out-of-range argument          */
    OPTIML_ERR_IO = 2,          /* open/read/write/mmap failed (see errno)   */
    OPTIML_ERR_FORMAT = 3,      /* the file is truncated or corrupt          */
    OPTIML_ERR_UNSUPPORTED = 4, /* valid file, feature we do not implement   */
    OPTIML_ERR_NOMEM = 5,       /* an allocation failed                      */
    OPTIML_ERR_CONTEXT_FULL = 6,/* no free KV-cache cell for a batch token   */
    OPTIML_ERR_INTERNAL = 7,    /* a bug: please report it                   */
    OPTIML_ERR_BACKEND = 8,     /* the GPU backend failed (driver, VRAM)     */
} optiml_status;

/* Static string naming a status ("invalid argument", ...). */
OPTIML_API const char *optiml_status_str(optiml_status status);

/* The reason recorded by the last failing call on this thread ("" if none).
 * The pointer stays valid until the next failing call on this thread. */
OPTIML_API const char *optiml_last_error(void);

typedef enum optiml_log_level {
    OPTIML_LOG_LEVEL_DEBUG = 0,
    OPTIML_LOG_LEVEL_INFO = 1,
    OPTIML_LOG_LEVEL_WARN = 2,
    OPTIML_LOG_LEVEL_ERROR = 3,
} optiml_log_level;

/* Receives one log line (no trailing newline). May be called from any thread
 * that calls into the library. */
typedef void (*optiml_log_fn)(optiml_log_level level, const char *msg, void *user);

/* Route log lines to fn (NULL restores the default: standard error) and drop
 * lines below min_level. Not thread-safe against concurrent logging: call it
 * before loading models. */
OPTIML_API void optiml_log_set(optiml_log_fn fn, void *user, optiml_log_level min_level);

/* ---- model ------------------------------------------------------------- */

typedef int32_t optiml_token;
typedef struct optiml_model optiml_model;
typedef struct optiml_context optiml_context;

typedef struct optiml_model_params {
    int32_t n_gpu_layers;   /* CUDA builds: the last N layers run on the GPU;
                               N > n_layer (or < 0) adds the output head and
                               embedding (llama.cpp's -ngl); 0 = CPU only     */
    double vram_budget_gib; /* > 0: the most layers whose weights, KV cache
                               (min(training context, 4096) cells), scratch
                               and CUDA context fit this many GiB; with
                               n_gpu_layers > 0 too, the smaller wins        */
    bool use_mmap;          /* map the file (default) instead of reading it   */
    bool repack;            /* default true: the q4_0/q4_k matrices the CPU
                               multiplies are repacked at load, 8 rows
                               interleaved, for faster decode; with
                               use_mmap their file pages are
                               then released (the OS reads them again if
                               a sparse FFN's gathers need them)          */
} optiml_model_params;

OPTIML_API optiml_model_params optiml_model_default_params(void);

/* Load a GGUF model. On success *out owns the model; free it with
 * optiml_model_free(). On failure *out is NULL and optiml_last_error() says
 * which file, key, tensor or offset was wrong. */
OPTIML_API optiml_status optiml_model_load(const char *path, const optiml_model_params *params,
                                           optiml_model **out);
OPTIML_API void optiml_model_free(optiml_model *model); /* NULL is a no-op */

OPTIML_API int32_t optiml_model_n_vocab(const optiml_model *model);
OPTIML_API int32_t optiml_model_n_embd(const optiml_model *model);
OPTIML_API int32_t optiml_model_n_layer(const optiml_model *model);
OPTIML_API int32_t optiml_model_n_ctx_train(const optiml_model *model);
/* Bytes of weight data (all tensors of the file). */
OPTIML_API uint64_t optiml_model_size(const optiml_model *model);
/* Bytes of weights one decode step reads: every weight once, except the
 * token embedding table, of which it reads one row (unless it is also the
 * output head). The numerator of the memory-bandwidth floor. */
OPTIML_API uint64_t optiml_model_decode_bytes(const optiml_model *model);
/* Layers running on the GPU, plus 1 when the output head runs there too
 * (so it equals an -ngl value that gives this placement); 0 on the CPU. */
OPTIML_API int32_t optiml_model_n_gpu_layers(const optiml_model *model);
/* Number of weight parameters (elements of all tensors). */
OPTIML_API uint64_t optiml_model_n_params(const optiml_model *model);
/* Short description, e.g. "llama 64d 5L f32"; writes at most buf_size bytes
 * including the NUL; returns the length it needed. */
OPTIML_API int32_t optiml_model_desc(const optiml_model *model, char *buf, size_t buf_size);
/* A metadata string value (NULL if missing or not a string). The pointer
 * lives as long as the model; the string is NUL-terminated. */
OPTIML_API const char *optiml_model_meta_str(const optiml_model *model, const char *key);

/* ---- tokenizer --------------------------------------------------------- */

OPTIML_API optiml_token optiml_token_bos(const optiml_model *model); /* -1 if none */
OPTIML_API optiml_token optiml_token_eos(const optiml_model *model); /* -1 if none */
/* True for every token that ends generation (EOS, EOT, EOM, ...). */
OPTIML_API bool optiml_token_is_eog(const optiml_model *model, optiml_token token);
/* Whether prompts for this model start with BOS (tokenizer.ggml.add_bos_token). */
OPTIML_API bool optiml_token_add_bos(const optiml_model *model);

/* Tokenize text[0..text_len) into tokens[0..n_max). add_bos prepends BOS when
 * the vocabulary has one; parse_special lets control-token text such as
 * "<s>" become that token. Returns the number of tokens, or -(needed) if
 * n_max was too small (nothing useful is written then), or INT32_MIN on an
 * error (optiml_last_error() says why). */
OPTIML_API int32_t optiml_tokenize(const optiml_model *model, const char *text, int32_t text_len,
                                   optiml_token *tokens, int32_t n_max, bool add_bos,
                                   bool parse_special);

/* Write the text of one token into buf (not NUL-terminated). lstrip removes
 * the leading space SentencePiece pieces carry (for the first token after
 * BOS; a no-op for vocabularies without that space prefix, as byte-level
 * BPE). Control tokens render as "" unless special is true. Returns the byte
 * count, -(needed) if buf_size is too small, INT32_MIN for an invalid id. */
OPTIML_API int32_t optiml_token_to_piece(const optiml_model *model, optiml_token token, char *buf,
                                         int32_t buf_size, bool lstrip, bool special);

/* ---- context, batch, decode ------------------------------------------- */

typedef struct optiml_context_params {
    uint32_t n_ctx;     /* KV-cache cells; 0 = the model's training context   */
    uint32_t n_batch;   /* most tokens in one optiml_decode() call            */
    uint32_t n_seq_max; /* distinct sequence ids, 1..64                       */
    int32_t n_threads;  /* CPU threads; <= 0 picks the number of cores        */
    int32_t sparse_mode; /* FFN of ReLU-sparse models: 0 = sparse when the
                            model has predictors, 1 = dense, 2 = oracle (the
                            exact active set from the dense gate; tests),
                            3 = predictor (init fails without predictors),
                            4 = cats: dense gate, then only the neurons
                            whose |act(gate)| passes the calibrated
                            optiml.sparse.gate_threshold (training-free
                            sparsity of SiLU models; 0 picks it when the
                            model has thresholds and no predictors)       */
} optiml_context_params;

OPTIML_API optiml_context_params optiml_context_default_params(void);

/* Allocates every buffer decoding will need; decode allocates nothing. The
 * model must outlive the context. */
OPTIML_API optiml_status optiml_context_init(const optiml_model *model,
                                             const optiml_context_params *params,
                                             optiml_context **out);
OPTIML_API void optiml_context_free(optiml_context *ctx); /* NULL is a no-op */
OPTIML_API uint32_t optiml_context_n_ctx(const optiml_context *ctx);
/* FFN neurons of the last optiml_decode: *n_active computed (sparse FFN:
 * those with a non-zero activation; layers handed to the dense FFN count
 * all), *n_total = n_layer * n_ff * n_tokens. Both 0 when the context runs
 * the dense FFN (sparse_mode 1, or 0 on a model without predictors). */
OPTIML_API void optiml_context_ffn_stats(const optiml_context *ctx, uint64_t *n_active, uint64_t *n_total);

/* A batch of tokens; entry i is token[i] at position pos[i] of sequence
 * seq_id[i]; logits[i] != 0 asks for the logits of that entry. */
typedef struct optiml_batch {
    int32_t n_tokens;
    optiml_token *token;
    int32_t *pos;
    int32_t *seq_id;
    int8_t *logits;
} optiml_batch;

/* Allocate a batch for up to n_max tokens (n_tokens = 0). */
OPTIML_API optiml_batch optiml_batch_init(int32_t n_max);
OPTIML_API void optiml_batch_free(optiml_batch batch);

/* Run the model over the batch: writes K/V of every entry into the cache and
 * computes logits for the entries that asked. Each entry attends to the
 * cached entries of its own sequence at positions <= its own. On error the
 * cache holds none of the batch. */
OPTIML_API optiml_status optiml_decode(optiml_context *ctx, const optiml_batch *batch);

/* Logits (n_vocab floats) of batch entry i of the last decode, or NULL if that
 * entry did not ask for logits. Valid until the next decode. */
OPTIML_API float *optiml_get_logits_ith(optiml_context *ctx, int32_t i);

/* KV cache per sequence. seq_id < 0 means every sequence. */
OPTIML_API void optiml_kv_seq_clear(optiml_context *ctx, int32_t seq_id);
/* Forget positions >= pos_start of the sequence. */
OPTIML_API void optiml_kv_seq_truncate(optiml_context *ctx, int32_t seq_id, int32_t pos_start);
/* Make the cached entries of src also belong to dst (shared prefix). */
OPTIML_API void optiml_kv_seq_copy(optiml_context *ctx, int32_t src, int32_t dst);
/* Largest cached position of the sequence, -1 if empty. */
OPTIML_API int32_t optiml_kv_seq_pos_max(const optiml_context *ctx, int32_t seq_id);

/* ---- sampling ---------------------------------------------------------- */

typedef struct optiml_sampler optiml_sampler;

typedef struct optiml_sampler_params {
    float temp;             /* <= 0: greedy (argmax)                           */
    int32_t top_k;          /* <= 0: off                                       */
    float top_p;            /* >= 1: off                                       */
    float min_p;            /* <= 0: off                                       */
    float repeat_penalty;   /* 1: off                                          */
    int32_t repeat_last_n;  /* tokens the penalty looks back over              */
    uint64_t seed;          /* same seed, same choices                         */
} optiml_sampler_params;

OPTIML_API optiml_sampler_params optiml_sampler_default_params(void);
/* NULL on bad params or out of memory (see optiml_last_error()). */
OPTIML_API optiml_sampler *optiml_sampler_init(const optiml_sampler_params *params, int32_t n_vocab);
OPTIML_API void optiml_sampler_free(optiml_sampler *smpl);
/* Pick a token from n_vocab logits. The logits are not modified. */
OPTIML_API optiml_token optiml_sampler_sample(optiml_sampler *smpl, const float *logits);
/* Record a token of the history the repetition penalty looks at. */
OPTIML_API void optiml_sampler_accept(optiml_sampler *smpl, optiml_token token);
/* Forget the history and re-seed. */
OPTIML_API void optiml_sampler_reset(optiml_sampler *smpl);

/* ---- chat ---------------------------------------------------------------- */

typedef struct optiml_chat_message {
    const char *role;    /* "system", "user", "assistant", ... */
    const char *content; /* UTF-8 */
} optiml_chat_message;
/* Render a conversation as a prompt. tmpl: NULL = the model's
 * tokenizer.chat_template (or, if the model has none, a built-in format
 * guessed from its vocabulary), else the template text itself or a built-in
 * name: "llama2", "llama3", "chatml", "mistral", "gemma", "phi3".
 * Writes at most buf_size bytes including a NUL; returns the length of the
 * rendered text (excluding the NUL) -- if that is >= buf_size, call again
 * with a larger buffer -- or INT32_MIN on error (optiml_last_error() says
 * which template construct failed and where). model may be NULL when tmpl
 * is given. */
OPTIML_API int32_t optiml_chat_apply_template(const optiml_model *model, const char *tmpl,
                                              const optiml_chat_message *msgs, size_t n_msgs,
                                              bool add_generation_prompt, char *buf, int32_t buf_size);

/* ---- misc ---------------------------------------------------------------- */

OPTIML_API const char *optiml_version(void);
/* Monotonic time in microseconds (for timings). */
OPTIML_API int64_t optiml_time_us(void);
/* Name of the CPU kernel set chosen at run time: "avx2" (AVX2+FMA+F16C) or "ref". */
OPTIML_API const char *optiml_cpu_features(void);

#ifdef __cplusplus
}
#endif

#endif /* OPTIML_H */
