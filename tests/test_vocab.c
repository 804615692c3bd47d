/*
 * test_vocab.c - tests of the SentencePiece BPE tokenizer (src/vocab.c).
 *
 * 1. The Llama 2 vocabulary of tests/data/ggml-vocab-llama-spm.gguf against
 *    llama.cpp's expected ids (.inp: inputs, each followed by a line
 *    "__ggml_vocab_test__"; .out: one line of ids per input), plus the
 *    round trip back to text, special tokens, BOS and a timing check.
 * 2. Tiny vocabularies written with the GGUF writer: merge order, byte
 *    fallback, unknown tokens, user-defined and control tokens, buffer-size
 *    returns, invalid ids and the load-time validation of every key.
 */
#define _POSIX_C_SOURCE 200809L
#include "test.h"

#include "gguf.h"
#include "vocab.h"

#include <stdint.h>
#include <string.h>

#define SPM_VOCAB OPTIML_TEST_DATA "/ggml-vocab-llama-spm.gguf"
#define SEPARATOR "\n__ggml_vocab_test__\n"

/* CHECK without a message (an empty format string makes gcc -Wall warn) */
#define EXPECT(cond) CHECK(cond, "%s", "")

/* ---- helpers -------------------------------------------------------------- */

static char *read_all(const char *path, size_t *n) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    char *buf = NULL;
    if (fseek(fp, 0, SEEK_END) == 0) {
        long size = ftell(fp);
        if (size >= 0 && fseek(fp, 0, SEEK_SET) == 0 && (buf = malloc((size_t)size + 1))) {
            *n = fread(buf, 1, (size_t)size, fp);
            buf[*n] = '\0';
        }
    }
    fclose(fp);
    return buf;
}

/* Tokenize into a vector of up to 256 tokens; returns the count. */
static int32_t tok(const struct vocab *v, const char *text, optiml_token *out, bool add_bos,
                   bool parse_special) {
    return vocab_tokenize(v, text, (int32_t)strlen(text), out, 256, add_bos, parse_special);
}

/* Decode tokens[0..n) into buf (NUL-terminated), lstrip on the first. */
static size_t detok(const struct vocab *v, const optiml_token *tokens, int32_t n, char *buf,
                    size_t cap, bool special) {
    size_t len = 0;
    for (int32_t i = 0; i < n; i++) {
        int32_t r = vocab_token_to_piece(v, tokens[i], buf + len, (int32_t)(cap - len - 1),
                                         i == 0, special);
        CHECK(r >= 0, "token %d -> %d", tokens[i], r);
        if (r < 0) break;
        len += (size_t)r;
    }
    buf[len] = '\0';
    return len;
}

static bool ids_equal(const optiml_token *a, int32_t na, const int32_t *b, int32_t nb) {
    return na == nb && (na == 0 || memcmp(a, b, (size_t)na * sizeof(*a)) == 0);
}

/* ---- the Llama 2 vocabulary ---------------------------------------------- */

static void test_spm_cases(const struct vocab *v) {
    size_t n_inp = 0, n_out = 0;
    char *inp = read_all(SPM_VOCAB ".inp", &n_inp);
    char *out = read_all(SPM_VOCAB ".out", &n_out);
    CHECK(inp && out, "cannot read %s.inp/.out", SPM_VOCAB);
    if (!inp || !out) goto done;

    int n_cases = 0, n_pass = 0, n_roundtrip = 0;
    char *text = inp, *line = out;
    char *sep;
    while ((sep = strstr(text, SEPARATOR)) != NULL) {
        *sep = '\0';
        int32_t text_len = (int32_t)(sep - text);
        char *eol = strchr(line, '\n');
        CHECK(eol, "case %d: .out has too few lines", n_cases);
        if (!eol) break;
        *eol = '\0';

        int32_t want[1024], n_want = 0;
        for (char *p = line, *end; n_want < 1024; p = end) {
            long id = strtol(p, &end, 10);
            if (end == p) break;
            want[n_want++] = (int32_t)id;
        }

        optiml_token got[1024];
        int32_t n_got = vocab_tokenize(v, text, text_len, got, 1024, false, false);
        bool ok = ids_equal(got, n_got, want, n_want);
        CHECK(ok, "case %d \"%s\": got %d tokens, want %d", n_cases, text, n_got, n_want);
        n_pass += ok;

        /* too small a buffer reports the size it needs */
        if (n_want > 0) {
            EXPECT(vocab_tokenize(v, text, text_len, got, n_want - 1, false, false) == -n_want);
            EXPECT(vocab_tokenize(v, text, text_len, NULL, 0, false, false) == -n_want);
        }

        /* decoding gives the input back (the space prefix is stripped) */
        char dec[8192];
        size_t n_dec = detok(v, got, n_got > 0 ? n_got : 0, dec, sizeof(dec), false);
        bool same = n_dec == (size_t)text_len && memcmp(dec, text, n_dec) == 0;
        CHECK(same, "case %d \"%s\": decodes to \"%s\"", n_cases, text, dec);
        n_roundtrip += same;

        n_cases++;
        text = sep + strlen(SEPARATOR);
        line = eol + 1;
    }
    CHECK(n_cases == 46, "%d cases", n_cases);
    CHECK(*text == '\0' && *line == '\0', "trailing input after case %d", n_cases);
    printf("llama-spm: %d/%d cases match llama.cpp, %d/%d round-trip\n", n_pass, n_cases,
           n_roundtrip, n_cases);
done:
    free(inp);
    free(out);
}

static void test_spm_special(const struct vocab *v) {
    optiml_token t[256];
    char buf[256];

    EXPECT(vocab_n_tokens(v) == 32000);
    EXPECT(vocab_bos(v) == 1 && vocab_eos(v) == 2 && vocab_unk(v) == 0);
    EXPECT(vocab_add_bos(v) && !vocab_add_eos(v));
    EXPECT(vocab_is_eog(v, 2) && !vocab_is_eog(v, 1) && !vocab_is_eog(v, -1));
    EXPECT(vocab_token_type(v, 1) == VOCAB_TOKEN_CONTROL);
    EXPECT(vocab_token_type(v, 3) == VOCAB_TOKEN_BYTE);
    EXPECT(vocab_token_type(v, 32000) == VOCAB_TOKEN_INVALID);
    EXPECT(strcmp(vocab_piece(v, 15043), "\xE2\x96\x81Hello") == 0);
    EXPECT(vocab_piece(v, -1) == NULL && vocab_piece(v, 32000) == NULL);

    /* BOS, and an empty text */
    EXPECT(tok(v, "", t, false, false) == 0);
    EXPECT(tok(v, "", t, true, false) == 1 && t[0] == 1);
    EXPECT(tok(v, "Hello world", t, true, false) == 3 && t[0] == 1 && t[1] == 15043 &&
          t[2] == 3186);

    /* control tokens: parsed only with parse_special; each fragment after a
     * special token gets its own space prefix */
    int32_t n = tok(v, "<s>Hello world</s>", t, false, true);
    CHECK(n == 4 && t[0] == 1 && t[1] == 15043 && t[2] == 3186 && t[3] == 2, "n = %d", n);
    n = tok(v, "Hello</s><s>world", t, false, true);
    CHECK(n == 4 && t[0] == 15043 && t[1] == 2 && t[2] == 1 && t[3] == 3186, "n = %d", n);
    n = tok(v, "<s>Hello world</s>", t, false, false);
    CHECK(n > 4, "n = %d", n);
    for (int32_t i = 0; i < n; i++) EXPECT(t[i] != 1 && t[i] != 2);
    CHECK(detok(v, t, n, buf, sizeof(buf), false) == 18 && strcmp(buf, "<s>Hello world</s>") == 0,
          "\"%s\"", buf);
    n = tok(v, "<unk>", t, false, true);
    CHECK(n == 1 && t[0] == 0, "n = %d", n);

    /* rendering of control, byte and unknown tokens */
    EXPECT(vocab_token_to_piece(v, 1, buf, sizeof(buf), false, false) == 0);
    EXPECT(vocab_token_to_piece(v, 1, buf, sizeof(buf), false, true) == 3 &&
          memcmp(buf, "<s>", 3) == 0);
    EXPECT(vocab_token_to_piece(v, 13, buf, sizeof(buf), false, false) == 1 && buf[0] == '\n');
    EXPECT(vocab_token_to_piece(v, 0, buf, sizeof(buf), false, false) == 5 &&
          memcmp(buf, "<unk>", 5) == 0);
    EXPECT(vocab_token_to_piece(v, 15043, buf, sizeof(buf), false, false) == 6 &&
          memcmp(buf, " Hello", 6) == 0);
    EXPECT(vocab_token_to_piece(v, 15043, buf, sizeof(buf), true, false) == 5 &&
          memcmp(buf, "Hello", 5) == 0);
    EXPECT(vocab_token_to_piece(v, 15043, buf, 3, false, false) == -6);
    EXPECT(vocab_token_to_piece(v, 15043, NULL, 0, false, false) == -6);
    EXPECT(vocab_token_to_piece(v, 32000, buf, sizeof(buf), false, false) == INT32_MIN);
    EXPECT(vocab_token_to_piece(v, -1, buf, sizeof(buf), false, false) == INT32_MIN);
    EXPECT(vocab_tokenize(v, "x", -1, t, 8, false, false) == INT32_MIN);
    EXPECT(vocab_tokenize(v, "x", 1, NULL, 8, false, false) == INT32_MIN);

    /* invalid UTF-8 becomes byte tokens and decodes back */
    const char bad[] = "a\xff\xc3(\xe2\x82 \xed\xa0\x80z";
    n = tok(v, bad, t, false, false);
    EXPECT(n > 0);
    EXPECT(detok(v, t, n, buf, sizeof(buf), false) == strlen(bad) && strcmp(buf, bad) == 0);
}

static void test_spm_speed(const struct vocab *v) {
    static const char words[] = "The quick brown fox jumps over the lazy dog. Ünïcødé 日本語 🦙! ";
    size_t n = 10 * 1024, wl = sizeof(words) - 1;
    char *text = malloc(n);
    optiml_token *t = malloc(n * sizeof(*t));
    if (!text || !t) {
        CHECK(0, "out of memory");
        free(text);
        free(t);
        return;
    }
    for (size_t i = 0; i < n; i++) text[i] = words[i % wl];
    int64_t best = INT64_MAX;
    int32_t count = 0;
    for (int rep = 0; rep < 5; rep++) {
        int64_t t0 = optiml_time_us();
        count = vocab_tokenize(v, text, (int32_t)n, t, (int32_t)n, true, true);
        int64_t dt = optiml_time_us() - t0;
        if (dt < best) best = dt;
    }
    CHECK(count > 1000, "count %d", count);
    printf("tokenizing %zu bytes: %d tokens in %.3f ms\n", n, count, best / 1000.0);
    CHECK(best < 50000, "%lld us", (long long)best); /* generous: sanitizer builds */
    free(text);
    free(t);
}

/* ---- tiny vocabularies ---------------------------------------------------- */

enum tiny_variant {
    TINY_FULL,       /* all byte tokens, <unk>, a user-defined <tool>        */
    TINY_NO_BYTES,   /* no byte tokens: unknown characters become <unk>      */
    TINY_BARE,       /* no byte tokens, no unknown token                      */
    TINY_GPT2,       /* tokenizer.ggml.model = "gpt2"                         */
    TINY_NO_MODEL,   /* tokenizer.ggml.model missing                          */
    TINY_BAD_SCORES, /* scores shorter than tokens                            */
    TINY_BAD_BOS,    /* bos_token_id out of range                             */
    TINY_LONG_PIECE, /* a piece longer than VOCAB_MAX_PIECE_LEN               */
    TINY_BAD_BYTE,   /* a byte token not spelled <0xXX>                       */
    TINY_BAD_TYPE,   /* token type 9                                          */
    TINY_MINIMAL,    /* only the model and the tokens: every default          */
};

/* Tokens after <unk>, <s>, </s> (ids 0, 1, 2) and, with bytes, the 256 byte
 * tokens (ids 3..258). */
static const struct {
    const char *piece;
    float score;
    int32_t type;
} tiny_tokens[] = {
    {"\xE2\x96\x81", -1.0f, VOCAB_TOKEN_NORMAL},
    {"a", -1.0f, VOCAB_TOKEN_NORMAL},
    {"b", -1.0f, VOCAB_TOKEN_NORMAL},
    {"c", -1.0f, VOCAB_TOKEN_NORMAL},
    {"ab", -3.0f, VOCAB_TOKEN_NORMAL},
    {"bc", -2.0f, VOCAB_TOKEN_NORMAL},
    {"aa", -4.0f, VOCAB_TOKEN_NORMAL},
    {"\xE2\x96\x81" "ab", -5.0f, VOCAB_TOKEN_NORMAL},
    {"<tool>", 0.0f, VOCAB_TOKEN_USER_DEFINED},
    {"<tool>x", 0.0f, VOCAB_TOKEN_UNUSED},
};
#define TINY_N_EXTRA ((int32_t)(sizeof(tiny_tokens) / sizeof(tiny_tokens[0])))

static optiml_status tiny_load(enum tiny_variant variant, struct vocab **out) {
    const char *path = OPTIML_BIN_DIR "/test_vocab_tiny.gguf";
    bool bytes = variant != TINY_NO_BYTES && variant != TINY_BARE;
    char byte_names[256][7];
    const char *pieces[3 + 256 + TINY_N_EXTRA + 1];
    float scores[3 + 256 + TINY_N_EXTRA + 1];
    int32_t types[3 + 256 + TINY_N_EXTRA + 1];
    static char long_piece[VOCAB_MAX_PIECE_LEN + 2];
    uint64_t n = 0;

    pieces[n] = variant == TINY_BARE ? "zz" : "<unk>";
    types[n++] = variant == TINY_BARE ? VOCAB_TOKEN_NORMAL : VOCAB_TOKEN_UNKNOWN;
    pieces[n] = "<s>";
    types[n++] = VOCAB_TOKEN_CONTROL;
    pieces[n] = "</s>";
    types[n++] = VOCAB_TOKEN_CONTROL;
    for (int b = 0; bytes && b < 256; b++) {
        snprintf(byte_names[b], sizeof(byte_names[b]), "<0x%02X>", b);
        pieces[n] = byte_names[b];
        types[n++] = VOCAB_TOKEN_BYTE;
    }
    for (uint64_t i = 0; i < n; i++) scores[i] = 0.0f;
    for (int32_t i = 0; i < TINY_N_EXTRA; i++) {
        pieces[n] = tiny_tokens[i].piece;
        scores[n] = tiny_tokens[i].score;
        types[n++] = tiny_tokens[i].type;
    }
    if (variant == TINY_LONG_PIECE) {
        memset(long_piece, 'q', sizeof(long_piece) - 1);
        pieces[n] = long_piece;
        scores[n] = 0.0f;
        types[n++] = VOCAB_TOKEN_NORMAL;
    }
    if (variant == TINY_BAD_BYTE) pieces[1] = "<0xZZ>", types[1] = VOCAB_TOKEN_BYTE;
    if (variant == TINY_BAD_TYPE) types[2] = 9;

    gguf_writer *w = gguf_writer_init();
    EXPECT(w != NULL);
    if (!w) return OPTIML_ERR_NOMEM;
    optiml_status st = OPTIML_OK;
    if (variant != TINY_NO_MODEL)
        st = gguf_writer_set_str(w, "tokenizer.ggml.model", variant == TINY_GPT2 ? "gpt2" : "llama");
    if (!st) st = gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", pieces, NULL, n);
    if (!st && variant != TINY_MINIMAL) {
        st = gguf_writer_set_arr(w, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, scores,
                                 variant == TINY_BAD_SCORES ? n - 1 : n);
        if (!st) st = gguf_writer_set_arr(w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types, n);
        if (!st) st = gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id",
                                          variant == TINY_BAD_BOS ? (uint32_t)n : 1);
        if (!st) st = gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 2);
        if (!st) st = gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token", false);
    }
    if (!st) st = gguf_writer_write(w, path);
    gguf_writer_free(w);
    CHECK(st == OPTIML_OK, "writing %s: %s", path, optiml_last_error());
    if (st) return st;

    gguf_file *f = NULL;
    st = gguf_open(path, &f);
    CHECK(st == OPTIML_OK, "%s", optiml_last_error());
    if (st) return st;
    st = vocab_load(f, out);
    gguf_close(f); /* the vocabulary keeps no pointer into the file */
    remove(path);
    return st;
}

/* id of the tiny token with this piece */
static optiml_token tiny_id(const struct vocab *v, const char *piece) {
    for (int32_t i = 0; i < vocab_n_tokens(v); i++)
        if (strcmp(vocab_piece(v, i), piece) == 0) return i;
    return -1;
}

static void test_tiny_full(void) {
    struct vocab *v = NULL;
    CHECK(tiny_load(TINY_FULL, &v) == OPTIML_OK, "%s", optiml_last_error());
    if (!v) return;
    optiml_token t[256];
    char buf[64];
    const optiml_token sp = tiny_id(v, "\xE2\x96\x81"), a = tiny_id(v, "a"), b = tiny_id(v, "b"),
                       bc = tiny_id(v, "bc"), aa = tiny_id(v, "aa"),
                       spab = tiny_id(v, "\xE2\x96\x81" "ab"), tool = tiny_id(v, "<tool>");
    const optiml_token x = 3 + 'x', lt = 3 + '<', gt = 3 + '>', s = 3 + 's';
    EXPECT(vocab_n_tokens(v) == 3 + 256 + TINY_N_EXTRA);
    EXPECT(!vocab_add_bos(v) && vocab_bos(v) == 1 && vocab_unk(v) == 0);

    /* higher score merges first: bc (-2) before ab (-3) */
    EXPECT(tok(v, "abc", t, false, false) == 3 && t[0] == sp && t[1] == a && t[2] == bc);
    /* a later merge may build on an earlier one: (a b) then (▁ ab) */
    EXPECT(tok(v, "ab", t, false, false) == 1 && t[0] == spab);
    /* equal scores: leftmost pair first */
    EXPECT(tok(v, "aaa", t, false, false) == 3 && t[0] == sp && t[1] == aa && t[2] == a);
    /* spaces are U+2581; consecutive ones stay separate tokens here */
    EXPECT(tok(v, "a  b", t, false, false) == 5 && t[0] == sp && t[1] == a && t[2] == sp &&
          t[3] == sp && t[4] == b);
    /* byte fallback: characters without a piece become their bytes */
    EXPECT(tok(v, "x", t, false, false) == 2 && t[0] == sp && t[1] == x);
    EXPECT(tok(v, "\xC3\xA9", t, false, false) == 3 && t[1] == 3 + 0xC3 && t[2] == 3 + 0xA9);
    EXPECT(tok(v, "\xff", t, false, false) == 2 && t[1] == 3 + 0xFF);

    /* control tokens only with parse_special; the fragment after one gets a
     * space prefix of its own */
    EXPECT(tok(v, "a<s>b", t, false, true) == 5 && t[0] == sp && t[1] == a && t[2] == 1 &&
          t[3] == sp && t[4] == b);
    EXPECT(tok(v, "<s>", t, true, true) == 2 && t[0] == 1 && t[1] == 1);
    int32_t n = tok(v, "a<s>b", t, false, false);
    CHECK(n == 6 && t[1] == a && t[2] == lt && t[3] == s && t[4] == gt && t[5] == b, "n = %d", n);
    /* user-defined tokens are matched even without parse_special; the longer
     * unused "<tool>x" is not a special token */
    n = tok(v, "<tool>x", t, false, false);
    CHECK(n == 3 && t[0] == tool && t[1] == sp && t[2] == x, "n = %d", n);
    n = tok(v, "b<tool><s>", t, false, true);
    CHECK(n == 4 && t[0] == sp && t[1] == b && t[2] == tool && t[3] == 1, "n = %d", n);

    /* -(needed) when the output is too small */
    EXPECT(tok(v, "abc", t, false, false) == 3);
    EXPECT(vocab_tokenize(v, "abc", 3, t, 2, false, false) == -3);
    EXPECT(vocab_tokenize(v, "abc", 3, NULL, 0, true, false) == -4);

    /* rendering */
    EXPECT(vocab_token_to_piece(v, sp, buf, sizeof(buf), false, false) == 1 && buf[0] == ' ');
    EXPECT(vocab_token_to_piece(v, sp, buf, sizeof(buf), true, false) == 0);
    EXPECT(vocab_token_to_piece(v, spab, buf, 2, false, false) == -3);
    EXPECT(vocab_token_to_piece(v, tool, buf, sizeof(buf), false, false) == 6 &&
          memcmp(buf, "<tool>", 6) == 0);
    EXPECT(vocab_token_to_piece(v, tiny_id(v, "<tool>x"), buf, sizeof(buf), false, false) == 0);
    EXPECT(vocab_token_to_piece(v, 3 + 0xC3, buf, sizeof(buf), false, false) == 1 &&
          (unsigned char)buf[0] == 0xC3);
    EXPECT(vocab_token_to_piece(v, vocab_n_tokens(v), buf, sizeof(buf), false, false) == INT32_MIN);
    EXPECT(optiml_last_error()[0] != '\0');
    vocab_free(v);
}

static void test_tiny_unknown(void) {
    struct vocab *v = NULL;
    optiml_token t[64];
    CHECK(tiny_load(TINY_NO_BYTES, &v) == OPTIML_OK, "%s", optiml_last_error());
    if (v) {
        optiml_token sp = tiny_id(v, "\xE2\x96\x81"), c = tiny_id(v, "c");
        /* one <unk> per character without a piece, valid or not */
        int32_t n = tok(v, "x\xC3\xA9\xff" "c", t, false, false);
        CHECK(n == 5 && t[0] == sp && t[1] == 0 && t[2] == 0 && t[3] == 0 && t[4] == c,
              "n = %d", n);
        vocab_free(v);
    }
    v = NULL;
    CHECK(tiny_load(TINY_BARE, &v) == OPTIML_OK, "%s", optiml_last_error());
    if (v) {
        EXPECT(vocab_unk(v) == -1);
        EXPECT(tok(v, "abc", t, false, false) == 3);
        optiml_clear_error();
        EXPECT(tok(v, "x", t, false, false) == INT32_MIN);
        CHECK(strstr(optiml_last_error(), "0x78") != NULL, "%s", optiml_last_error());
        vocab_free(v);
    }
}

/* Without scores, types and ids: all tokens normal, all scores 0 (so the
 * leftmost pair always merges first), no BOS, add_bos_token true. */
static void test_tiny_defaults(void) {
    struct vocab *v = NULL;
    optiml_token t[64];
    CHECK(tiny_load(TINY_MINIMAL, &v) == OPTIML_OK, "%s", optiml_last_error());
    if (!v) return;
    EXPECT(vocab_bos(v) == -1 && vocab_eos(v) == -1 && vocab_unk(v) == -1);
    EXPECT(vocab_add_bos(v) && !vocab_add_eos(v));
    EXPECT(vocab_token_type(v, 1) == VOCAB_TOKEN_NORMAL && !vocab_is_eog(v, 2));
    int32_t n = tok(v, "abc", t, true, true);
    CHECK(n == 2 && t[0] == tiny_id(v, "\xE2\x96\x81" "ab") && t[1] == tiny_id(v, "c"), "n = %d", n);
    /* "<s>" is a normal token now: not matched as a whole, and BPE cannot
     * reach it without "<s" or "s>" */
    n = tok(v, "<s>", t, false, true);
    CHECK(n == 4 && t[1] == 3 + '<' && t[2] == 3 + 's' && t[3] == 3 + '>', "n = %d", n);
    vocab_free(v);
}

static void test_tiny_errors(void) {
    static const struct {
        enum tiny_variant variant;
        optiml_status status;
        const char *message;
    } cases[] = {
        {TINY_GPT2, OPTIML_ERR_FORMAT, "missing key tokenizer.ggml.merges"},
        {TINY_NO_MODEL, OPTIML_ERR_FORMAT, "tokenizer.ggml.model"},
        {TINY_BAD_SCORES, OPTIML_ERR_FORMAT, "tokenizer.ggml.scores"},
        {TINY_BAD_BOS, OPTIML_ERR_FORMAT, "tokenizer.ggml.bos_token_id"},
        {TINY_LONG_PIECE, OPTIML_ERR_FORMAT, "tokenizer.ggml.tokens"},
        {TINY_BAD_BYTE, OPTIML_ERR_FORMAT, "<0xZZ>"},
        {TINY_BAD_TYPE, OPTIML_ERR_FORMAT, "tokenizer.ggml.token_type"},
    };
    optiml_log_set(NULL, NULL, (optiml_log_level)(OPTIML_LOG_LEVEL_ERROR + 1)); /* expected errors: keep quiet */
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct vocab *v = NULL;
        optiml_status st = tiny_load(cases[i].variant, &v);
        CHECK(st == cases[i].status, "variant %d: status %d", (int)cases[i].variant, (int)st);
        EXPECT(v == NULL);
        CHECK(strstr(optiml_last_error(), cases[i].message) != NULL, "variant %d: \"%s\"",
              (int)cases[i].variant, optiml_last_error());
        vocab_free(v);
    }
    EXPECT(vocab_load(NULL, NULL) == OPTIML_ERR_INVALID_ARG);
    optiml_log_set(NULL, NULL, OPTIML_LOG_LEVEL_INFO);
    vocab_free(NULL);
}

int main(void) {
    gguf_file *f = NULL;
    struct vocab *v = NULL;
    CHECK(gguf_open(SPM_VOCAB, &f) == OPTIML_OK, "%s", optiml_last_error());
    if (f) CHECK(vocab_load(f, &v) == OPTIML_OK, "%s", optiml_last_error());
    if (v) {
        test_spm_cases(v);
        test_spm_special(v);
        test_spm_speed(v);
    }
    vocab_free(v);
    gguf_close(f);
    test_tiny_full();
    test_tiny_unknown();
    test_tiny_defaults();
    test_tiny_errors();
    return test_summary("test_vocab");
}
