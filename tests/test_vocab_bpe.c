/*
 * test_vocab_bpe.c - tests of the byte-level BPE tokenizer (src/vocab.c)
 * and its pre-tokenizers (src/unicode.c) on small vocabularies written with
 * the GGUF writer: GPT-2's byte mapping, merge order by rank (ties to the
 * leftmost pair), ignore_merges, the word cuts of every pre-tokenizer on
 * hand-worked examples of their regexes, invalid UTF-8, special and
 * end-of-generation tokens, the added-token options (lstrip, rstrip,
 * single_word, normalized), rendering, load errors, and the time to
 * tokenize 10 KB. Agreement with Hugging Face tokenizers on real
 * vocabularies is tests/python/test_tokenizer_hf.py's job.
 */
#define _POSIX_C_SOURCE 200809L
#include "test.h"

#include "gguf.h"
#include "unicode.h"
#include "vocab.h"

#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define EXPECT(cond) CHECK(cond, "%s", "")

/* ---- a tiny vocabulary ---------------------------------------------------- */

/* GPT-2's character for byte b, UTF-8, NUL-terminated in dst[3]. */
static const char *byte_char(unsigned b, char *dst) {
    unsigned cp = b;
    if (!((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE))
        cp = 0x100 + (b <= 0x20 ? b : b <= 0xA0 ? b - 0x7F + 0x21 : 0x43);
    memset(dst, 0, 3);
    if (cp < 0x80) {
        dst[0] = (char)cp;
    } else {
        dst[0] = (char)(0xC0 | cp >> 6);
        dst[1] = (char)(0x80 | (cp & 0x3F));
    }
    return dst;
}

struct tiny {
    const char *pre;           /* NULL: no tokenizer.ggml.pre key            */
    const char *const *extra;  /* tokens after the 256 bytes (NULL-ended)     */
    const int32_t *extra_type; /* their types                                 */
    const char *const *merges; /* NULL-ended; NULL: no merges key             */
    int64_t eos, eot;          /* -1: none                                    */
    const uint8_t *flags;      /* added_token_flags of the extra tokens, or NULL */
};

static optiml_status tiny_load(const struct tiny *t, struct vocab **out) {
    static char bytes[256][3];
    const char *toks[320];
    int32_t types[320];
    uint8_t flags[320] = {0};
    size_t n = 0, n_merges = 0;
    for (unsigned b = 0; b < 256; b++, n++) {
        toks[n] = byte_char(b, bytes[b]);
        types[n] = VOCAB_TOKEN_NORMAL;
    }
    for (size_t i = 0; t->extra && t->extra[i]; i++, n++) {
        toks[n] = t->extra[i];
        types[n] = t->extra_type ? t->extra_type[i] : VOCAB_TOKEN_NORMAL;
        flags[n] = t->flags ? t->flags[i] : 0;
    }
    while (t->merges && t->merges[n_merges]) n_merges++;
    char path[] = "/tmp/test_vocab_bpe_XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) return OPTIML_ERR_IO;
    close(fd);
    gguf_writer *w = gguf_writer_init();
    optiml_status st = gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2");
    if (st == OPTIML_OK && t->pre) st = gguf_writer_set_str(w, "tokenizer.ggml.pre", t->pre);
    if (st == OPTIML_OK) st = gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", toks, NULL, n);
    if (st == OPTIML_OK)
        st = gguf_writer_set_arr(w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types, n);
    if (st == OPTIML_OK && t->flags)
        st = gguf_writer_set_arr(w, "tokenizer.ggml.added_token_flags", GGUF_TYPE_UINT8, flags, n);
    if (st == OPTIML_OK && t->merges)
        st = gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", t->merges, NULL, n_merges);
    if (st == OPTIML_OK && t->eos >= 0)
        st = gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)t->eos);
    if (st == OPTIML_OK && t->eot >= 0)
        st = gguf_writer_set_u32(w, "tokenizer.ggml.eot_token_id", (uint32_t)t->eot);
    if (st == OPTIML_OK) st = gguf_writer_write(w, path);
    gguf_writer_free(w);
    gguf_file *f = NULL;
    *out = NULL;
    if (st == OPTIML_OK) st = gguf_open(path, &f);
    if (st == OPTIML_OK) st = vocab_load(f, out);
    gguf_close(f);
    unlink(path);
    return st;
}

static int32_t tok(const struct vocab *v, const char *text, optiml_token *out, bool special) {
    return vocab_tokenize(v, text, (int32_t)strlen(text), out, 256, false, special);
}

static const char *const no_merges[] = {NULL};

/* ---- BPE ---------------------------------------------------------------------- */

static void test_byte_mapping(void) {
    struct tiny t = {"gpt2", NULL, NULL, no_merges, -1, -1, NULL};
    struct vocab *v = NULL;
    optiml_token ids[256];
    CHECK(tiny_load(&t, &v) == OPTIML_OK, "%s", optiml_last_error());
    if (!v) return;
    EXPECT(strcmp(vocab_piece(v, ' '), "\xC4\xA0") == 0);   /* U+0120 */
    EXPECT(strcmp(vocab_piece(v, 0xAD), "\xC5\x83") == 0);  /* U+0143 */
    EXPECT(strcmp(vocab_piece(v, 0x7F), "\xC4\xA1") == 0);  /* U+0121 */
    EXPECT(strcmp(vocab_piece(v, 'a'), "a") == 0);
    /* every byte stands for itself, and renders back */
    const char text[] = "a \xC3\xA9\x01\xFF";
    int32_t n = tok(v, text, ids, false);
    CHECK(n == 6 && ids[0] == 'a' && ids[1] == ' ' && ids[2] == 0xC3 && ids[3] == 0xA9 &&
              ids[4] == 1 && ids[5] == 0xFF,
          "n = %d", n);
    for (int b = 0; b < 256; b++) {
        char buf[4];
        CHECK(vocab_token_to_piece(v, b, buf, 4, false, false) == 1 && (unsigned char)buf[0] == b,
              "byte %d", b);
    }
    EXPECT(!vocab_add_bos(v)); /* byte-level BPE: no BOS unless the file says so */
    vocab_free(v);
}

static void test_merge_order(void) {
    static const char *const extra[] = {"ab", "bc", "aa", "abc", "aaaa", NULL};
    static const char *const m1[] = {"b c", "a b", NULL}, *const m2[] = {"a b", "b c", NULL};
    static const char *const m3[] = {"a a", "aa aa", NULL};
    struct tiny t = {"gpt2", extra, NULL, m1, -1, -1, NULL};
    struct vocab *v = NULL;
    optiml_token ids[256];
    CHECK(tiny_load(&t, &v) == OPTIML_OK, "%s", optiml_last_error());
    if (v) {
        int32_t n = tok(v, "abc", ids, false); /* rank 0 "b c" first */
        CHECK(n == 2 && ids[0] == 'a' && ids[1] == 257, "n = %d", n);
        vocab_free(v);
    }
    t.merges = m2;
    CHECK(tiny_load(&t, &v) == OPTIML_OK, "%s", optiml_last_error());
    if (v) {
        int32_t n = tok(v, "abc", ids, false);
        CHECK(n == 2 && ids[0] == 256 && ids[1] == 'c', "n = %d", n);
        vocab_free(v);
    }
    t.merges = m3;
    CHECK(tiny_load(&t, &v) == OPTIML_OK, "%s", optiml_last_error());
    if (v) {
        int32_t n = tok(v, "aaa", ids, false); /* equal ranks: leftmost pair */
        CHECK(n == 2 && ids[0] == 258 && ids[1] == 'a', "n = %d", n);
        n = tok(v, "aaaaa", ids, false);
        CHECK(n == 2 && ids[0] == 260 && ids[1] == 'a', "n = %d", n);
        vocab_free(v);
    }
    /* ignore_merges (llama-bpe): a word that is a token is that token */
    t.merges = no_merges;
    t.pre = "llama-bpe";
    CHECK(tiny_load(&t, &v) == OPTIML_OK, "%s", optiml_last_error());
    if (v) {
        int32_t n = tok(v, "abc", ids, false);
        CHECK(n == 1 && ids[0] == 259, "n = %d", n);
        vocab_free(v);
    }
    t.pre = "gpt2";
    CHECK(tiny_load(&t, &v) == OPTIML_OK, "%s", optiml_last_error());
    if (v) {
        EXPECT(tok(v, "abc", ids, false) == 3);
        vocab_free(v);
    }
}

/* ---- pre-tokenizers ------------------------------------------------------------- */

static void check_split(const char *pre, const char *text, const uint32_t *want, size_t n_want) {
    enum unicode_pre p;
    size_t n = strlen(text);
    uint32_t cp[64], off[65], ends[64], scratch[64];
    uint8_t flags[65];
    struct unicode_chars c = {cp, flags, off, 0};
    CHECK(unicode_pre_from_name(pre, strlen(pre), &p), "%s", pre);
    unicode_chars_decode(&c, text, n);
    size_t got = unicode_pre_split(p, &c, text, ends, scratch);
    bool same = got == n_want;
    for (size_t i = 0; same && i < got; i++) same = ends[i] == want[i];
    CHECK(same, "%s on \"%s\": %zu words", pre, text, got);
}

#define SPLIT(pre, text, ...)                                                     \
    do {                                                                          \
        static const uint32_t want_[] = {__VA_ARGS__};                            \
        check_split(pre, text, want_, sizeof(want_) / sizeof(want_[0]));          \
    } while (0)

static void test_pre_tokenizers(void) {
    /* GPT-2: "Hello" " world" "'s" " " " end" */
    SPLIT("gpt2", "Hello world's  end", 5, 11, 13, 14, 18);
    SPLIT("default", "x  \n", 1, 4); /* \s+(?!\S) at the end takes all */
    SPLIT("gpt2", "it'S", 2, 3, 4); /* case-sensitive: "'" then "S" */
    SPLIT("gpt2", "a\xFF" "b", 1, 2, 3); /* an invalid byte is a symbol */
    SPLIT("gpt2", "a \xE2\x82\xAC" "5", 1, 5, 6);
    /* Llama 3: "I" "'LL" " " "123" "456" "7" "!!\n\n" " x" */
    SPLIT("llama-bpe", "I'LL 1234567!!\n\n x", 1, 4, 5, 8, 11, 12, 16, 18);
    SPLIT("llama-bpe", "\t\tx", 1, 3);           /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    SPLIT("llama-bpe", "a \n\n b", 1, 4, 6);     /* \s*[\r\n]+ then " b" */
    SPLIT("llama-bpe", "\xC3\xA9t\xC3\xA9 \xCC\x81", 5, 8); /* U+0301 (Mn) is no letter: " ?[^\s...]+" */
    /* Qwen2: single digits */
    SPLIT("qwen2", "abc 12", 3, 4, 5, 6);
    /* smollm / starcoder: each digit apart, GPT-2 between */
    SPLIT("smollm", "a12 b", 1, 2, 3, 5);
    SPLIT("starcoder", "x\xD9\xA3", 1, 3); /* Arabic-Indic three is \p{N} */
    /* falcon: "hi" "!!" then 1234567 as "123" "456" "7" */
    SPLIT("falcon", "hi!!1234567", 2, 4, 7, 10, 11);
    SPLIT("falcon", "x\xC2\xB2y", 1, 2, 3, 4); /* the byte B2 maps to a numeric char */
    /* deepseek-llm: "Hello" " world" (\s?[letters]+), kept by the next Split */
    SPLIT("deepseek-llm", "Hello world", 5, 11);
    /* " caf\u00E9" is one letter run; the punctuation class holds only the
     * ASCII letters, so its Split cuts " caf" from "\u00E9" */
    SPLIT("deepseek-llm", " caf\xC3\xA9", 4, 6);
    /* "[\r\n]" isolates the newline, "  " is no letter run */
    SPLIT("deepseek-llm", "a  \n", 1, 3, 4);
    /* "x", then " 12\u4E2D\u6587": the CJK Split cuts "\u4E2D\u6587",
     * Digits cuts " " "1" "2" */
    SPLIT("deepseek-llm", "x 12\xE4\xB8\xAD\xE6\x96\x87", 1, 2, 3, 4, 10);
    /* \s+$ : a piece's trailing whitespace ("!  " from the third Split) */
    SPLIT("deepseek-llm", "!  ", 1, 3);
    enum unicode_pre p;
    EXPECT(!unicode_pre_from_name("tekken", 6, &p));
}

/* ---- special tokens, rendering, errors ---------------------------------------- */

static void test_special(void) {
    static const char *const extra[] = {"<|im_end|>", "<|im_start|>", "<x>", "<|im", NULL};
    static const int32_t types[] = {VOCAB_TOKEN_CONTROL, VOCAB_TOKEN_CONTROL,
                                    VOCAB_TOKEN_USER_DEFINED, VOCAB_TOKEN_CONTROL};
    struct tiny t = {"qwen2", extra, types, no_merges, 'z', -1, NULL};
    struct vocab *v = NULL;
    optiml_token ids[256];
    CHECK(tiny_load(&t, &v) == OPTIML_OK, "%s", optiml_last_error());
    if (!v) return;
    int32_t n = tok(v, "<|im_start|>a<|im_end|><x>", ids, true);
    CHECK(n == 4 && ids[0] == 257 && ids[1] == 'a' && ids[2] == 256 && ids[3] == 258, "n = %d", n);
    n = tok(v, "<|im_end|><x>", ids, false); /* only user-defined texts without parse_special */
    CHECK(n > 2 && ids[0] == '<' && ids[n - 1] == 258, "n = %d", n);
    EXPECT(vocab_is_eog(v, 256) && vocab_is_eog(v, 'z') && !vocab_is_eog(v, 257));
    char buf[32];
    EXPECT(vocab_token_to_piece(v, 256, buf, 32, false, false) == 0);
    EXPECT(vocab_token_to_piece(v, 256, buf, 32, false, true) == 10 &&
           memcmp(buf, "<|im_end|>", 10) == 0);
    EXPECT(vocab_token_to_piece(v, 258, buf, 32, false, false) == 3);
    /* lstrip: byte-level BPE adds no space prefix, so a leading space is text */
    EXPECT(vocab_token_to_piece(v, ' ', buf, 32, true, false) == 1 && buf[0] == ' ');
    EXPECT(vocab_token_to_piece(v, 256, buf, 4, false, true) == -10);
    vocab_free(v);
}

/* Hugging Face's AddedToken options, on hand-worked cases of its rules. */
static void test_added_flags(void) {
    static const char *const extra[] = {"<L>", "<R>", "<W>", "<N>", "N>x", "qz", "zwv", NULL};
    static const int32_t types[] = {VOCAB_TOKEN_CONTROL, VOCAB_TOKEN_CONTROL,
                                    VOCAB_TOKEN_USER_DEFINED, VOCAB_TOKEN_CONTROL,
                                    VOCAB_TOKEN_CONTROL, VOCAB_TOKEN_USER_DEFINED,
                                    VOCAB_TOKEN_USER_DEFINED};
    static const uint8_t flags[] = {1, 2, 4, 8, 0, 0, 0}; /* lstrip rstrip single_word normalized */
    struct tiny t = {"gpt2", extra, types, no_merges, -1, -1, flags};
    struct vocab *v = NULL;
    optiml_token ids[256];
    CHECK(tiny_load(&t, &v) == OPTIML_OK, "%s", optiml_last_error());
    if (!v) return;
    int32_t n = tok(v, "a \t <L>b", ids, true); /* lstrip takes " \t " */
    CHECK(n == 3 && ids[0] == 'a' && ids[1] == 256 && ids[2] == 'b', "lstrip: n = %d", n);
    n = tok(v, "a<R>\xE3\x80\x80 b ", ids, true); /* rstrip takes U+3000 and ' ' */
    CHECK(n == 4 && ids[0] == 'a' && ids[1] == 257 && ids[2] == 'b' && ids[3] == ' ',
          "rstrip: n = %d", n);
    n = tok(v, "<L><L>", ids, true); /* nothing between to strip */
    CHECK(n == 2 && ids[0] == 256 && ids[1] == 256, "n = %d", n);
    n = tok(v, "x<W> <W>.", ids, false); /* "x" touches the first */
    CHECK(n == 7 && ids[0] == 'x' && ids[1] == '<' && ids[4] == ' ' && ids[5] == 258 &&
              ids[6] == '.',
          "single_word: n = %d", n);
    n = tok(v, "_<W>", ids, false); /* '_' is a word character */
    CHECK(n == 4 && ids[1] == '<', "single_word after _: n = %d", n);
    /* "<N>" is normalized: "N>x" (first pass) wins though it starts later */
    n = tok(v, "<N>x", ids, true);
    CHECK(n == 2 && ids[0] == '<' && ids[1] == 260, "normalized: n = %d", n);
    n = tok(v, "<N>y", ids, true);
    CHECK(n == 2 && ids[0] == 259 && ids[1] == 'y', "normalized alone: n = %d", n);
    /* leftmost-longest: "qz" at 0 beats the longer "zwv" at 1 */
    n = tok(v, "qzwv", ids, false);
    CHECK(n == 3 && ids[0] == 261 && ids[1] == 'w' && ids[2] == 'v', "leftmost: n = %d", n);
    vocab_free(v);

    static const uint8_t bad[] = {16, 0, 0, 0, 0, 0, 0};
    t.flags = bad;
    optiml_log_set(NULL, NULL, (optiml_log_level)(OPTIML_LOG_LEVEL_ERROR + 1));
    EXPECT(tiny_load(&t, &v) == OPTIML_ERR_FORMAT && v == NULL);
    CHECK(strstr(optiml_last_error(), "added_token_flags") != NULL, "%s", optiml_last_error());
    optiml_log_set(NULL, NULL, OPTIML_LOG_LEVEL_INFO);
}

static void test_errors(void) {
    static const char *const bad_merges[] = {"a b", "nospace", "q z", NULL};
    struct tiny t = {"tekken", NULL, NULL, no_merges, -1, -1, NULL};
    struct vocab *v = NULL;
    optiml_log_set(NULL, NULL, (optiml_log_level)(OPTIML_LOG_LEVEL_ERROR + 1));
    EXPECT(tiny_load(&t, &v) == OPTIML_ERR_UNSUPPORTED && v == NULL);
    CHECK(strstr(optiml_last_error(), "tekken") != NULL, "%s", optiml_last_error());
    t.pre = "gpt2";
    t.merges = NULL;
    EXPECT(tiny_load(&t, &v) == OPTIML_ERR_FORMAT && v == NULL);
    CHECK(strstr(optiml_last_error(), "tokenizer.ggml.merges") != NULL, "%s", optiml_last_error());
    t.merges = bad_merges; /* merges naming no token are skipped, not fatal */
    t.pre = NULL;          /* no pre key: GPT-2's */
    CHECK(tiny_load(&t, &v) == OPTIML_OK, "%s", optiml_last_error());
    optiml_log_set(NULL, NULL, OPTIML_LOG_LEVEL_INFO);
    vocab_free(v);
}

static void test_speed(void) {
    static const char *const extra[] = {"th", "the", "Ġthe", "in", "Ġa", NULL};
    static const char *const merges[] = {"t h", "th e", "Ġ the", "i n", "Ġ a", NULL};
    struct tiny t = {"llama-bpe", extra, NULL, merges, -1, -1, NULL};
    struct vocab *v = NULL;
    CHECK(tiny_load(&t, &v) == OPTIML_OK, "%s", optiml_last_error());
    if (!v) return;
    static const char *const words[] = {"the ", "in ", "a ", "caf\xC3\xA9 ", "\xE4\xBD\xA0\xE5\xA5\xBD",
                                        "123456 ", "don't ", "\xF0\x9F\x98\x80 ", "\n\n", "  "};
    static char text[10240 + 16];
    size_t n = 0;
    for (unsigned i = 0; n < 10240; i = i * 1103515245u + 12345u) {
        const char *w = words[(i >> 16) % 10];
        memcpy(text + n, w, strlen(w));
        n += strlen(w);
    }
    static optiml_token ids[10240 + 16];
    int64_t best = INT64_MAX;
    for (int r = 0; r < 5; r++) {
        int64_t t0 = optiml_time_us();
        int32_t got = vocab_tokenize(v, text, 10240, ids, 10240 + 16, false, false);
        int64_t dt = optiml_time_us() - t0;
        CHECK(got > 0, "%d", got);
        best = dt < best ? dt : best;
    }
    printf("tokenize 10 KB (byte-level BPE): %.2f ms\n", (double)best / 1e3);
    CHECK(best < 20000, "%.2f ms (limit 20)", (double)best / 1e3);
    vocab_free(v);
}

int main(void) {
    test_byte_mapping();
    test_merge_order();
    test_pre_tokenizers();
    test_special();
    test_added_flags();
    test_errors();
    test_speed();
    return test_summary("test_vocab_bpe");
}
