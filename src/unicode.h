/*
 * unicode.h - what the byte-level BPE tokenizer needs of Unicode: UTF-8
 * decoding, the general-category flags of every code point (a generated
 * table, src/unicode_data.c, from tools/gen_unicode.py), and the
 * pre-tokenizers that cut text into words before BPE.
 *
 * The pre-tokenizers are hand-written matchers, each exactly equivalent to
 * the regular expressions of the Hugging Face tokenizers pipeline it names
 * (quoted in unicode.c); tests/python/test_tokenizer_hf.py checks them
 * against HF tokenizers on random text.
 *
 * Invalid UTF-8: a byte that does not start a valid (shortest-form,
 * non-surrogate, <= U+10FFFF) sequence is one character of its own that the
 * pre-tokenizers classify like U+FFFD (a symbol); BPE then encodes the byte
 * itself, so decoding gives the input bytes back.
 */
#ifndef OPTIML_UNICODE_H
#define OPTIML_UNICODE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Code point flags (one byte each, unicode_flags()). */
enum {
    UNICODE_LETTER = 0x01, /* L*                                               */
    UNICODE_NUMBER = 0x02, /* N*                                               */
    UNICODE_PUNCT = 0x04,  /* P*                                               */
    UNICODE_SYMBOL = 0x08, /* S*                                               */
    UNICODE_MARK = 0x10,   /* M*                                               */
    UNICODE_SPACE = 0x20,  /* \s: U+0009..U+000D, U+0085, Zs, Zl, Zp           */
    UNICODE_OTHER = 0x40,  /* C* (control, format, surrogate, private, unassigned) */
};

#define UNICODE_REPLACEMENT 0xFFFDu

extern const char unicode_version[]; /* of the table, e.g. "14.0.0" */
extern const uint16_t unicode_stage1[];
extern const uint8_t unicode_stage2[];

static inline unsigned unicode_flags(uint32_t cp) {
    return cp < 0x110000u ? unicode_stage2[(size_t)unicode_stage1[cp >> 7] * 128 + (cp & 127)] : 0;
}

/* Bytes of the UTF-8 character at s[0..n) (n > 0) and its code point in
 * *cp; an invalid byte gives 1 and UNICODE_REPLACEMENT. */
size_t unicode_decode(const unsigned char *s, size_t n, uint32_t *cp);

/* ---- pre-tokenizers ------------------------------------------------------ */

/* tokenizer.ggml.pre families. */
enum unicode_pre {
    UNICODE_PRE_GPT2,         /* "gpt2", "default": GPT-2's ByteLevel regex     */
    UNICODE_PRE_LLAMA3,       /* "llama-bpe", "llama3"                          */
    UNICODE_PRE_QWEN2,        /* "qwen2": Llama 3's with single digits          */
    UNICODE_PRE_DIGITS_GPT2,  /* "smollm", "starcoder": each digit apart, GPT-2  */
    UNICODE_PRE_FALCON,       /* "falcon"                                       */
    UNICODE_PRE_DEEPSEEK_LLM, /* "deepseek-llm": five isolating Splits, Digits  */
};

/* The family of a tokenizer.ggml.pre name; false if unknown. */
bool unicode_pre_from_name(const char *name, size_t len, enum unicode_pre *out);

/* Decoded text the pre-tokenizers work on: n characters with their code
 * points, flags and byte offsets (off[n] = total bytes). */
struct unicode_chars {
    uint32_t *cp;
    uint8_t *flags;
    uint32_t *off;
    size_t n;
};

/* Decode s[0..n) into c (arrays of room n + 1, filled here). */
void unicode_chars_decode(struct unicode_chars *c, const char *s, size_t n);

/* Split the decoded text s (c from unicode_chars_decode) into words: writes
 * the byte offset where each word ends into ends[] (increasing, the last is
 * the byte count) and returns the count. ends and scratch need room for as
 * many entries as the text has bytes. */
size_t unicode_pre_split(enum unicode_pre pre, const struct unicode_chars *c, const char *s,
                         uint32_t *ends, uint32_t *scratch);

#endif /* OPTIML_UNICODE_H */
