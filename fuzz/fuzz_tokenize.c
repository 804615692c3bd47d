/*
 * fuzz_tokenize.c - libFuzzer target for the tokenizer (src/vocab.c).
 *
 * Loads the Llama 2 vocabulary of tests/data once, then tokenizes the input
 * bytes with parse_special off and on: first with no output buffer (which
 * must report -(needed)), then with exactly that much room. Every id must be
 * valid and every token must render. With parse_special off the rendering
 * (leading space of the first token stripped) must give the input back,
 * since any byte string survives SentencePiece byte fallback unchanged -
 * except U+2581, which is SentencePiece's space and renders as ' '.
 */
#include "vocab.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef OPTIML_TEST_DATA
#error "compile with -DOPTIML_TEST_DATA=\"<repo>/tests/data\""
#endif

static struct vocab *fuzz_vocab(void) {
    static struct vocab *v;
    if (!v) {
        gguf_file *f = NULL;
        if (gguf_open(OPTIML_TEST_DATA "/ggml-vocab-llama-spm.gguf", &f) != OPTIML_OK ||
            vocab_load(f, &v) != OPTIML_OK) {
            fprintf(stderr, "fuzz_tokenize: %s\n", optiml_last_error());
            abort();
        }
        gguf_close(f);
    }
    return v;
}

static void fuzz_check(bool ok, const char *what) {
    if (ok) return;
    fprintf(stderr, "fuzz_tokenize: %s\n", what);
    abort();
}

/* The text the tokens of text[0..len) must render to: U+2581 -> ' '. */
static size_t fuzz_expected(const char *text, size_t len, char *out) {
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (i + 3 <= len && memcmp(text + i, "\xE2\x96\x81", 3) == 0) {
            out[n++] = ' ';
            i += 2;
        } else {
            out[n++] = text[i];
        }
    }
    return n;
}

static void fuzz_one(const struct vocab *v, const char *text, int32_t len, bool parse_special) {
    int32_t need = vocab_tokenize(v, text, len, NULL, 0, false, parse_special);
    fuzz_check(need <= 0 && need != INT32_MIN, "sizing call failed");
    int32_t n_max = -need;
    optiml_token *tokens = malloc(((size_t)n_max + 1) * sizeof(*tokens));
    fuzz_check(tokens != NULL, "out of memory");
    int32_t n = vocab_tokenize(v, text, len, tokens, n_max, false, parse_special);
    fuzz_check(n == n_max, "token count differs between the two calls");

    char *out = malloc((size_t)len + 1), *want = malloc((size_t)len + 1);
    fuzz_check(out && want, "out of memory");
    size_t out_len = 0, want_len = fuzz_expected(text, (size_t)len, want);
    for (int32_t i = 0; i < n; i++) {
        char piece[VOCAB_MAX_PIECE_LEN];
        fuzz_check(tokens[i] >= 0 && tokens[i] < vocab_n_tokens(v), "token id out of range");
        int32_t r = vocab_token_to_piece(v, tokens[i], piece, (int32_t)sizeof(piece), i == 0,
                                         parse_special);
        fuzz_check(r >= 0, "token_to_piece failed");
        if (!parse_special) {
            fuzz_check(out_len + (size_t)r <= want_len, "decoded text longer than the input");
            memcpy(out + out_len, piece, (size_t)r);
        }
        out_len += (size_t)r;
    }
    if (!parse_special)
        fuzz_check(out_len == want_len && (want_len == 0 || memcmp(out, want, want_len) == 0),
                   "decoded text differs from the input");
    free(want);
    free(out);
    free(tokens);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > (1u << 20)) return 0;
    const struct vocab *v = fuzz_vocab();
    fuzz_one(v, (const char *)data, (int32_t)size, false);
    fuzz_one(v, (const char *)data, (int32_t)size, true);
    return 0;
}
