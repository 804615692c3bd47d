/*
 * fuzz_tokenize_bpe.c - libFuzzer target for the byte-level BPE tokenizer
 * (src/vocab.c, src/unicode.c).
 *
 * Builds small "gpt2" vocabularies once, one per pre-tokenizer family (256
 * byte tokens, merges of a few letters, digits and spaces, a merge that
 * names no token, control and user-defined tokens), written to a temporary
 * GGUF file and loaded back. The first input byte picks the family, the
 * rest is the text, tokenized with parse_special off and on: first with no
 * output buffer (which must report -(needed)), then with exactly that much
 * room. Every id must be valid, and rendering the tokens (control tokens
 * too when parse_special is on) must give the input bytes back: byte-level
 * BPE loses nothing, invalid UTF-8 included.
 */
#define _POSIX_C_SOURCE 200809L
#include "gguf.h"
#include "vocab.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *const fuzz_pre[] = {"gpt2", "llama-bpe", "qwen2", "smollm", "falcon"};
#define FUZZ_N_PRE (sizeof(fuzz_pre) / sizeof(fuzz_pre[0]))

static void fuzz_check(bool ok, const char *what) {
    if (ok) return;
    fprintf(stderr, "fuzz_tokenize_bpe: %s\n", what);
    abort();
}

/* GPT-2's character for byte b, as UTF-8 into dst; returns the length. */
static size_t fuzz_byte_char(unsigned b, char *dst) {
    unsigned cp = b;
    if (!((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE))
        cp = 0x100 + (b <= 0x20 ? b : b <= 0xA0 ? b - 0x7F + 0x21 : 0x43);
    if (cp < 0x80) {
        dst[0] = (char)cp;
        return 1;
    }
    dst[0] = (char)(0xC0 | cp >> 6);
    dst[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
}

#define FUZZ_MAX_TOKENS 1024
#define FUZZ_MAX_MERGES 1024

static struct vocab *fuzz_build(const char *pre) {
    static char tok_buf[FUZZ_MAX_TOKENS][16], merge_buf[FUZZ_MAX_MERGES][24];
    const char *toks[FUZZ_MAX_TOKENS], *merges[FUZZ_MAX_MERGES];
    int32_t types[FUZZ_MAX_TOKENS];
    size_t n_tok = 0, n_merge = 0;
    for (unsigned b = 0; b < 256; b++) {
        tok_buf[n_tok][fuzz_byte_char(b, tok_buf[n_tok])] = '\0';
        types[n_tok++] = VOCAB_TOKEN_NORMAL;
    }
    /* pairs of a small alphabet, then pairs of those pairs */
    static const char alpha[] = "etaoin s'\n0123";
    size_t first_pair = n_tok;
    for (size_t i = 0; alpha[i]; i++)
        for (size_t j = 0; alpha[j]; j++) {
            char a[3] = {0}, b[3] = {0};
            fuzz_byte_char((unsigned char)alpha[i], a);
            fuzz_byte_char((unsigned char)alpha[j], b);
            snprintf(merge_buf[n_merge], sizeof(merge_buf[0]), "%s %s", a, b);
            merges[n_merge] = merge_buf[n_merge];
            n_merge++;
            snprintf(tok_buf[n_tok], sizeof(tok_buf[0]), "%s%s", a, b);
            types[n_tok++] = VOCAB_TOKEN_NORMAL;
        }
    size_t n_pairs = n_tok - first_pair;
    for (size_t k = 0; k < 150; k++) {
        const char *a = tok_buf[first_pair + (k * 7) % n_pairs];
        const char *b = tok_buf[first_pair + (k * 13 + 5) % n_pairs];
        snprintf(merge_buf[n_merge], sizeof(merge_buf[0]), "%s %s", a, b);
        merges[n_merge] = merge_buf[n_merge];
        n_merge++;
        snprintf(tok_buf[n_tok], sizeof(tok_buf[0]), "%s%s", a, b);
        types[n_tok++] = VOCAB_TOKEN_NORMAL;
    }
    merges[n_merge++] = "x yz"; /* names no token: skipped */
    static const char *const specials[] = {"<|eot_id|>", "<|end|>", "<s>", "<extra>"};
    for (size_t i = 0; i < 4; i++) {
        snprintf(tok_buf[n_tok], sizeof(tok_buf[0]), "%s", specials[i]);
        types[n_tok++] = i < 3 ? VOCAB_TOKEN_CONTROL : VOCAB_TOKEN_USER_DEFINED;
    }
    for (size_t i = 0; i < n_tok; i++) toks[i] = tok_buf[i];

    char path[] = "/tmp/fuzz_tokenize_bpe_XXXXXX";
    int fd = mkstemp(path);
    fuzz_check(fd >= 0, "mkstemp failed");
    close(fd);
    gguf_writer *w = gguf_writer_init();
    fuzz_check(w != NULL, "out of memory");
    optiml_status st = gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2");
    if (st == OPTIML_OK) st = gguf_writer_set_str(w, "tokenizer.ggml.pre", pre);
    if (st == OPTIML_OK)
        st = gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", toks, NULL, n_tok);
    if (st == OPTIML_OK)
        st = gguf_writer_set_arr(w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types, n_tok);
    if (st == OPTIML_OK)
        st = gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", merges, NULL, n_merge);
    if (st == OPTIML_OK) st = gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 0);
    if (st == OPTIML_OK) st = gguf_writer_write(w, path);
    gguf_writer_free(w);
    gguf_file *f = NULL;
    struct vocab *v = NULL;
    optiml_log_set(NULL, NULL, OPTIML_LOG_LEVEL_ERROR); /* the skipped merge warns */
    if (st == OPTIML_OK) st = gguf_open(path, &f);
    if (st == OPTIML_OK) st = vocab_load(f, &v);
    gguf_close(f);
    unlink(path);
    if (st != OPTIML_OK) fprintf(stderr, "fuzz_tokenize_bpe: %s\n", optiml_last_error());
    fuzz_check(st == OPTIML_OK, "building the vocabulary failed");
    return v;
}

static void fuzz_one(const struct vocab *v, const char *text, int32_t len, bool parse_special) {
    int32_t need = vocab_tokenize(v, text, len, NULL, 0, false, parse_special);
    fuzz_check(need <= 0 && need != INT32_MIN, "sizing call failed");
    int32_t n_max = -need;
    optiml_token *tokens = malloc(((size_t)n_max + 1) * sizeof(*tokens));
    fuzz_check(tokens != NULL, "out of memory");
    int32_t n = vocab_tokenize(v, text, len, tokens, n_max, false, parse_special);
    fuzz_check(n == n_max, "token count differs between the two calls");
    char *out = malloc((size_t)len + 1);
    fuzz_check(out != NULL, "out of memory");
    size_t out_len = 0;
    for (int32_t i = 0; i < n; i++) {
        char piece[VOCAB_MAX_PIECE_LEN];
        fuzz_check(tokens[i] >= 0 && tokens[i] < vocab_n_tokens(v), "token id out of range");
        int32_t r = vocab_token_to_piece(v, tokens[i], piece, (int32_t)sizeof(piece), false,
                                         parse_special);
        fuzz_check(r >= 0, "token_to_piece failed");
        fuzz_check(out_len + (size_t)r <= (size_t)len, "decoded text longer than the input");
        memcpy(out + out_len, piece, (size_t)r);
        out_len += (size_t)r;
    }
    fuzz_check(out_len == (size_t)len && (len == 0 || memcmp(out, text, (size_t)len) == 0),
               "decoded text differs from the input");
    free(out);
    free(tokens);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static struct vocab *vocabs[FUZZ_N_PRE];
    if (size < 1 || size > (1u << 20)) return 0;
    size_t k = data[0] % FUZZ_N_PRE;
    if (!vocabs[k]) vocabs[k] = fuzz_build(fuzz_pre[k]);
    fuzz_one(vocabs[k], (const char *)data + 1, (int32_t)(size - 1), false);
    fuzz_one(vocabs[k], (const char *)data + 1, (int32_t)(size - 1), true);
    return 0;
}
