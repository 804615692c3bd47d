/*
 * vocab.h - the tokenizer: SentencePiece-style BPE vocabularies
 * (tokenizer.ggml.model = "llama") and byte-level BPE vocabularies ("gpt2")
 * stored in GGUF metadata.
 *
 * A vocabulary is built once from the GGUF keys and is read-only afterwards,
 * so one vocabulary may serve several threads at once. Tokenizing follows
 * SentencePiece BPE as used by Llama 2 (and llama.cpp's "spm" tokenizer):
 * spaces become U+2581, a U+2581 is prepended to the text, the text is split
 * into characters and adjacent pairs are merged best score first; characters
 * left without a piece fall back to <0xXX> byte tokens. See vocab.c.
 *
 * Special tokens: with parse_special, the text of control and unknown tokens
 * (e.g. "<s>") found in the input becomes those tokens; user-defined tokens
 * are always matched, with or without parse_special (as llama.cpp does).
 * They are found as Hugging Face tokenizers finds added tokens: leftmost
 * first, the longest there, without overlap; tokens flagged "normalized"
 * (tokenizer.ggml.added_token_flags) in a second pass over the text the
 * others left; lstrip/rstrip tokens also take the whitespace beside them,
 * single_word tokens match only where no word character touches them. The
 * text between special tokens is tokenized fragment by fragment; a fragment
 * at the start of the text or right after a special token gets the U+2581
 * prefix (current llama.cpp and the Hugging Face "legacy" Llama tokenizer
 * behave the same way).
 *
 * Byte-level BPE (as Hugging Face tokenizers' BPE model with a ByteLevel
 * pre-tokenizer): the text between special tokens is cut into words by the
 * pre-tokenizer tokenizer.ggml.pre names (src/unicode.h), each word's bytes
 * start as the tokens of GPT-2's byte characters, and adjacent pairs merge
 * lowest merge rank first (ties: leftmost). No space prefix; no unknown
 * token: a byte the vocabulary has no token for is left out (as HF
 * tokenizers and llama.cpp do; Falcon's vocabulary lacks 28 bytes). Pieces
 * render as the bytes their characters stand for. Invalid UTF-8 is kept
 * byte for byte (see unicode.h), so rendering the tokens of any text gives
 * it back (unless it holds bytes without a token).
 */
#ifndef OPTIML_VOCAB_H
#define OPTIML_VOCAB_H

#include "common.h"
#include "gguf.h"

#include <stdbool.h>
#include <stdint.h>

/* Token types of tokenizer.ggml.token_type (SentencePiece's numbering;
 * 0 "undefined" is read as normal). */
enum vocab_token_type {
    VOCAB_TOKEN_INVALID = 0, /* only returned by vocab_token_type() */
    VOCAB_TOKEN_NORMAL = 1,
    VOCAB_TOKEN_UNKNOWN = 2,
    VOCAB_TOKEN_CONTROL = 3,
    VOCAB_TOKEN_USER_DEFINED = 4,
    VOCAB_TOKEN_UNUSED = 5,
    VOCAB_TOKEN_BYTE = 6,
};

/* Longest token piece accepted, in bytes. */
#define VOCAB_MAX_PIECE_LEN 1024

struct vocab; /* opaque */

/* Build from the GGUF metadata keys tokenizer.ggml.*:
 *   model (string, required): "llama" or "gpt2"; any other value fails
 *     with OPTIML_ERR_UNSUPPORTED; missing: OPTIML_ERR_FORMAT.
 *   gpt2 only: merges (string array, required: "left right", rank = index;
 *     a merge whose parts or result are not tokens is skipped with a
 *     warning) and pre (string, optional: "default"; a name
 *     unicode_pre_from_name does not know fails with
 *     OPTIML_ERR_UNSUPPORTED).
 *   added_token_flags (u8 array, optional: all 0): per token, Hugging Face's
 *     AddedToken options, bit 0 lstrip, 1 rstrip, 2 single_word, 3
 *     normalized (see above); other bits fail.
 *   tokens (string array, required), scores (f32 array, optional: 0),
 *   token_type (i32 array, optional: normal),
 *   bos_token_id / eos_token_id / unknown_token_id / padding_token_id /
 *   eot_token_id / eom_token_id (u32, optional: none; an unknown_token_id
 *   that is missing falls back to the first token of type unknown),
 *   add_bos_token (default true for llama, false for gpt2), add_eos_token
 *   (default false), add_space_prefix (default true for llama; gpt2 never
 *   adds one).
 * Array lengths must agree, ids must be in range (an out-of-range
 * padding_token_id is only warned about: nothing here uses it), pieces must
 * be at most VOCAB_MAX_PIECE_LEN bytes, byte tokens must be spelled <0xXX>,
 * token types must be 0..6 and scores must not be NaN.
 * Failures name the key. On failure *out is NULL. */
optiml_status vocab_load(const gguf_file *f, struct vocab **out);
void vocab_free(struct vocab *v); /* NULL is a no-op */

int32_t vocab_n_tokens(const struct vocab *v);
optiml_token vocab_bos(const struct vocab *v); /* -1 if none */
optiml_token vocab_eos(const struct vocab *v); /* -1 if none */
optiml_token vocab_unk(const struct vocab *v); /* -1 if none */
/* True for the EOS, EOT and EOM tokens and for control tokens spelled as
 * the end-of-turn markers of common chat formats (<|eot_id|>, <|eom_id|>,
 * <|im_end|>, <|end|>, <end_of_turn>, <|endoftext|>, <|end_of_text|>). */
bool vocab_is_eog(const struct vocab *v, optiml_token t);
/* The file's add_bos_token / add_eos_token flags. */
bool vocab_add_bos(const struct vocab *v);
bool vocab_add_eos(const struct vocab *v);
/* The type of token t, VOCAB_TOKEN_INVALID for an invalid id. */
enum vocab_token_type vocab_token_type(const struct vocab *v, optiml_token t);

/* Same contract as optiml_tokenize in include/optiml.h: returns the token
 * count, -(needed) if n_max is too small, INT32_MIN on error (bad argument,
 * text over 1 GiB, out of memory, a character with neither a byte token nor
 * an unknown token to stand for it), with the reason in optiml_last_error(). add_bos
 * prepends BOS when the vocabulary has one. */
int32_t vocab_tokenize(const struct vocab *v, const char *text, int32_t text_len,
                       optiml_token *tokens, int32_t n_max, bool add_bos, bool parse_special);

/* Same contract as optiml_token_to_piece: normal tokens render with U+2581
 * turned into ' ' (gpt2: as the bytes of their characters), byte tokens as
 * their byte, control and unused tokens as
 * "" unless special (then their piece), unknown and user-defined tokens as
 * their piece. lstrip drops one leading ' ' of the result if the
 * vocabulary adds a space prefix (SentencePiece); byte-level BPE adds none,
 * so there a leading space is text and stays. Returns the byte
 * count, -(needed) if buf_size is too small, INT32_MIN for an invalid id. */
int32_t vocab_token_to_piece(const struct vocab *v, optiml_token token, char *buf,
                             int32_t buf_size, bool lstrip, bool special);

/* The raw piece of token t (NUL-terminated, U+2581 kept), NULL if invalid. */
const char *vocab_piece(const struct vocab *v, optiml_token t);

#endif /* OPTIML_VOCAB_H */
