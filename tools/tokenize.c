/*
 * tokenize.c - optiml-tokenize: print the token ids of a text.
 *
 *   optiml-tokenize -m MODEL.gguf -p TEXT [--pieces] [--no-bos] [--parse-special]
 *   optiml-tokenize -m MODEL.gguf -f FILE ...          (the text of a file)
 *   optiml-tokenize -m MODEL.gguf --cases FILE [--roundtrip] ...
 *
 * Prints the ids space-separated on one line; with --pieces one token per
 * line: the id, a tab and the piece (special tokens rendered). --cases reads
 * many texts, each followed by a line "__ggml_vocab_test__" (llama.cpp's
 * tokenizer test format), and prints one line of ids per text; --roundtrip
 * adds, after each, a line with the hex bytes of the detokenized text.
 *
 * It reads the vocabulary only (the tokenizer.ggml.* keys), so vocab-only
 * GGUF files and files whose weights the engine cannot load work too; that
 * is why it uses the internal gguf and vocab API rather than optiml.h's
 * model loader.
 */
#include "gguf.h"
#include "read_file.h"
#include "vocab.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CASE_SEPARATOR "\n__ggml_vocab_test__\n"

struct opts {
    const char *model, *prompt, *file, *cases;
    bool pieces, bos, parse_special, roundtrip;
};

static void usage(FILE *out) {
    fprintf(out,
            "usage: optiml-tokenize -m MODEL.gguf (-p TEXT | -f FILE | --cases FILE)\n"
            "                       [--pieces] [--no-bos] [--parse-special] [--roundtrip]\n"
            "  -m MODEL.gguf     the model (only its tokenizer.ggml.* keys are read)\n"
            "  -p TEXT           the text to tokenize\n"
            "  -f FILE           tokenize the contents of FILE\n"
            "  --cases FILE      texts each followed by a line __ggml_vocab_test__: one line\n"
            "                    of ids per text\n"
            "  --pieces          one token per line: id, tab, piece\n"
            "  --no-bos          do not prepend BOS (default: the model's add_bos_token)\n"
            "  --parse-special   text of control tokens (e.g. <|eot_id|>) becomes them\n"
            "  --roundtrip       with --cases: after each line of ids, the hex bytes of\n"
            "                    the detokenized text\n");
}

static int parse_args(int argc, char **argv, struct opts *o) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has_val = i + 1 < argc;
        if (strcmp(a, "-m") == 0 && has_val) o->model = argv[++i];
        else if (strcmp(a, "-p") == 0 && has_val) o->prompt = argv[++i];
        else if (strcmp(a, "-f") == 0 && has_val) o->file = argv[++i];
        else if (strcmp(a, "--cases") == 0 && has_val) o->cases = argv[++i];
        else if (strcmp(a, "--pieces") == 0) o->pieces = true;
        else if (strcmp(a, "--no-bos") == 0) o->bos = false;
        else if (strcmp(a, "--parse-special") == 0) o->parse_special = true;
        else if (strcmp(a, "--roundtrip") == 0) o->roundtrip = true;
        else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "optiml-tokenize: unknown or incomplete argument '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (!o->model || (!!o->prompt + !!o->file + !!o->cases) != 1) {
        usage(stderr);
        return 2;
    }
    return -1;
}

/* Tokenize text[0..n) into a malloc'd array; the count in *n_tok. */
static optiml_token *tokenize(const struct vocab *v, const char *text, size_t n,
                              const struct opts *o, int32_t *n_tok) {
    if (n > INT32_MAX) return NULL;
    int32_t need = vocab_tokenize(v, text, (int32_t)n, NULL, 0, o->bos, o->parse_special);
    if (need == INT32_MIN) return NULL;
    need = need < 0 ? -need : need;
    optiml_token *t = malloc(((size_t)need + 1) * sizeof(*t));
    if (!t) return NULL;
    *n_tok = vocab_tokenize(v, text, (int32_t)n, t, need, o->bos, o->parse_special);
    if (*n_tok < 0) {
        free(t);
        return NULL;
    }
    return t;
}

/* The text of token t into buf (size >= VOCAB_MAX_PIECE_LEN); its length. */
static int32_t piece(const struct vocab *v, optiml_token t, bool special, char *buf) {
    int32_t n = vocab_token_to_piece(v, t, buf, VOCAB_MAX_PIECE_LEN, false, special);
    return n < 0 ? 0 : n;
}

static int print_tokens(const struct vocab *v, const char *text, size_t n, const struct opts *o) {
    int32_t n_tok = 0;
    optiml_token *t = tokenize(v, text, n, o, &n_tok);
    if (!t) {
        fprintf(stderr, "optiml-tokenize: %s\n", optiml_last_error());
        return 1;
    }
    static char buf[VOCAB_MAX_PIECE_LEN];
    for (int32_t i = 0; i < n_tok; i++) {
        if (o->pieces) {
            int32_t len = piece(v, t[i], true, buf);
            printf("%d\t%.*s\n", t[i], (int)len, buf);
        } else {
            printf(i ? " %d" : "%d", t[i]);
        }
    }
    if (!o->pieces) printf("\n");
    if (o->roundtrip) {
        for (int32_t i = 0; i < n_tok; i++) {
            int32_t len = piece(v, t[i], false, buf);
            for (int32_t k = 0; k < len; k++) printf("%02x", (unsigned char)buf[k]);
        }
        printf("\n");
    }
    free(t);
    return 0;
}

static int run_cases(const struct vocab *v, const struct opts *o) {
    size_t n = 0;
    char *all = tool_read_file(o->cases, &n);
    if (!all) {
        fprintf(stderr, "optiml-tokenize: cannot read %s\n", o->cases);
        return 1;
    }
    int rc = 0;
    const size_t sep_len = strlen(CASE_SEPARATOR);
    for (char *p = all; rc == 0 && p < all + n;) {
        char *end = strstr(p, CASE_SEPARATOR);
        if (!end) break;
        rc = print_tokens(v, p, (size_t)(end - p), o);
        p = end + sep_len;
    }
    free(all);
    return rc;
}

int main(int argc, char **argv) {
    struct opts o = {.bos = true};
    int rc = parse_args(argc, argv, &o);
    if (rc >= 0) return rc;
    gguf_file *f = NULL;
    struct vocab *v = NULL;
    if (gguf_open(o.model, &f) != OPTIML_OK || vocab_load(f, &v) != OPTIML_OK) {
        fprintf(stderr, "optiml-tokenize: %s: %s\n", o.model, optiml_last_error());
        gguf_close(f);
        return 1;
    }
    o.bos = o.bos && vocab_add_bos(v);
    if (o.cases) {
        rc = run_cases(v, &o);
    } else if (o.file) {
        size_t n = 0;
        char *text = tool_read_file(o.file, &n);
        if (!text) {
            fprintf(stderr, "optiml-tokenize: cannot read %s\n", o.file);
            rc = 1;
        } else {
            rc = print_tokens(v, text, n, &o);
        }
        free(text);
    } else {
        rc = print_tokens(v, o.prompt, strlen(o.prompt), &o);
    }
    vocab_free(v);
    gguf_close(f);
    return rc;
}
