/*
 * vocab.c - SentencePiece BPE tokenizer over a vocabulary read from GGUF
 * metadata (tokenizer.ggml.*), the "llama" tokenizer model.
 *
 * Loading copies every piece into one arena (NUL-terminated), precomputes
 * how each token renders as text (U+2581 -> ' ', <0xXX> -> the byte) and
 * indexes the pieces in an open-addressing hash table (FNV-1a over the
 * piece bytes, linear probing; for duplicate pieces the last id wins).
 *
 * Tokenizing a text:
 *   1. Special tokens: the texts of control/unknown tokens (parse_special
 *      only) and user-defined tokens (always) are located, longest text
 *      first; each claims its first non-overlapping occurrences in the bytes
 *      no longer text has claimed. They split the text into fragments.
 *   2. Each fragment is normalized: ' ' -> U+2581 (E2 96 81), and a U+2581
 *      is prepended when add_space_prefix is set and the fragment starts the
 *      text or follows a special token.
 *   3. The fragment is split into symbols, one per UTF-8 character (a byte
 *      that does not start a valid sequence is a symbol of its own), kept in
 *      a doubly linked list.
 *   4. Every adjacent pair whose concatenation is a piece is a candidate
 *      bigram in a binary max-heap ordered by the piece's score (ties: the
 *      leftmost pair). The best bigram is popped and merged; entries made
 *      stale by earlier merges are recognised by their length and skipped;
 *      the merged symbol forms new candidates with its two neighbours.
 *      O(n log n) for n characters.
 *   5. Each remaining symbol is looked up: a piece gives its token, anything
 *      else falls back to one <0xXX> token per byte, or to the unknown token
 *      when the vocabulary lacks some of those byte tokens.
 */
#include "vocab.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- data ---------------------------------------------------------------- */

#define KEY_MODEL "tokenizer.ggml.model"
#define KEY_TOKENS "tokenizer.ggml.tokens"
#define KEY_SCORES "tokenizer.ggml.scores"
#define KEY_TYPES "tokenizer.ggml.token_type"

#define VOCAB_MAX_TOKENS (1 << 24)
/* Longest text tokenize accepts: keeps symbol offsets (3 bytes per input
 * byte after normalization) within 32 bits. */
#define VOCAB_MAX_TEXT (1 << 30)

enum special_id { SPECIAL_BOS, SPECIAL_EOS, SPECIAL_UNK, SPECIAL_PAD, SPECIAL_EOT, SPECIAL_EOM,
                  SPECIAL_COUNT };

static const char *const special_keys[SPECIAL_COUNT] = {
    "tokenizer.ggml.bos_token_id",     "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.eot_token_id",     "tokenizer.ggml.eom_token_id",
};

/* U+2581 LOWER ONE EIGHTH BLOCK, SentencePiece's visible space. */
static const char spm_space[3] = {'\xE2', '\x96', '\x81'};

struct vocab_entry {
    const char *piece; /* raw piece in the arena, NUL-terminated        */
    const char *text;  /* rendering without special (may be piece)      */
    uint32_t piece_len;
    uint32_t text_len;
    float score;
    uint8_t type; /* enum vocab_token_type */
};

struct vocab {
    int32_t n_tokens;
    struct vocab_entry *tok;
    char *arena;
    int32_t *slots; /* hash table of token ids, -1 = empty */
    uint32_t slot_mask;
    int32_t byte_tok[256]; /* token of "<0xXX>", -1 if none */
    int32_t *special;      /* matchable special tokens, longest text first */
    int32_t n_special;
    int32_t n_user_defined;
    optiml_token ids[SPECIAL_COUNT];
    bool add_bos, add_eos, add_space_prefix;
};

/* ---- piece index ---------------------------------------------------------- */

static uint32_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 0x100000001b3ull;
    }
    return (uint32_t)(h ^ (h >> 32));
}

/* Slot holding the piece s[0..n), or the empty slot where it would go. */
static uint32_t vocab_slot(const struct vocab *v, const char *s, size_t n) {
    uint32_t i = hash_bytes(s, n) & v->slot_mask;
    for (;; i = (i + 1) & v->slot_mask) {
        int32_t id = v->slots[i];
        if (id < 0) return i;
        const struct vocab_entry *e = &v->tok[id];
        if (e->piece_len == n && memcmp(e->piece, s, n) == 0) return i;
    }
}

/* Token whose piece is s[0..n), or -1. */
static int32_t vocab_find(const struct vocab *v, const char *s, size_t n) {
    return v->slots[vocab_slot(v, s, n)];
}

/* ---- loading -------------------------------------------------------------- */

static optiml_status load_check_model(const gguf_file *f) {
    struct gguf_str model;
    optiml_status st = gguf_get_str(f, KEY_MODEL, &model);
    if (st == OPTIML_ERR_INVALID_ARG)
        return optiml_fail(OPTIML_ERR_FORMAT, "missing key %s", KEY_MODEL);
    if (st != OPTIML_OK) return st;
    if (gguf_str_eq(model, "llama")) return OPTIML_OK;
    if (gguf_str_eq(model, "gpt2"))
        return optiml_fail(OPTIML_ERR_UNSUPPORTED,
                           "%s = \"gpt2\": byte-level BPE tokenizer not implemented yet", KEY_MODEL);
    int len = model.n > 64 ? 64 : (int)model.n;
    return optiml_fail(OPTIML_ERR_UNSUPPORTED, "%s = \"%.*s\": tokenizer not supported", KEY_MODEL,
                       len, model.data);
}

/* An array key; *out = NULL if it is optional and missing. n_expected != 0:
 * the array must have that many elements. */
static optiml_status load_array(const gguf_file *f, const char *key, enum gguf_type type,
                                bool required, uint64_t n_expected, const struct gguf_value **out) {
    *out = NULL;
    optiml_status st = gguf_get_arr(f, key, type, out);
    if (st == OPTIML_ERR_INVALID_ARG) {
        return required ? optiml_fail(OPTIML_ERR_FORMAT, "missing key %s", key) : OPTIML_OK;
    }
    if (st != OPTIML_OK) return st;
    if (n_expected && (*out)->arr.n != n_expected)
        return optiml_fail(OPTIML_ERR_FORMAT, "%s has %llu elements, %s has %llu", key,
                           (unsigned long long)(*out)->arr.n, KEY_TOKENS,
                           (unsigned long long)n_expected);
    return OPTIML_OK;
}

/* Upper-case digits first: byte tokens are looked up by "<0x%02X>". */
static const char hex_digits[] = "0123456789ABCDEF0123456789abcdef";

/* The byte a "<0xXX>" piece stands for, or -1. */
static int byte_piece_value(const char *s, size_t n) {
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    const char *hi = memchr(hex_digits, s[3], 32), *lo = memchr(hex_digits, s[4], 32);
    return hi && lo ? (int)((hi - hex_digits) % 16 * 16 + (lo - hex_digits) % 16) : -1;
}

/* Write how a piece of the given type renders (without special) at dst;
 * returns the length. dst has room for n bytes. */
static uint32_t render_piece(int type, const char *s, uint32_t n, char *dst) {
    uint32_t m = 0;
    switch (type) {
    case VOCAB_TOKEN_NORMAL:
        for (uint32_t i = 0; i < n; i++) {
            if (i + 3 <= n && memcmp(s + i, spm_space, 3) == 0) {
                dst[m++] = ' ';
                i += 2;
            } else {
                dst[m++] = s[i];
            }
        }
        return m;
    case VOCAB_TOKEN_BYTE: dst[0] = (char)byte_piece_value(s, n); return 1;
    default: return 0; /* control, unused */
    }
}

/* Pieces, scores and types into v->tok and v->arena. */
static optiml_status load_entries(struct vocab *v, const struct gguf_value *toks,
                                  const struct gguf_value *scores,
                                  const struct gguf_value *types) {
    const struct gguf_str *strs = toks->arr.data;
    uint64_t n = toks->arr.n, total = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (strs[i].n > VOCAB_MAX_PIECE_LEN)
            return optiml_fail(OPTIML_ERR_FORMAT, "%s: token %llu is %llu bytes long (at most %d)",
                               KEY_TOKENS, (unsigned long long)i, (unsigned long long)strs[i].n,
                               VOCAB_MAX_PIECE_LEN);
        total += 2 * strs[i].n + 1; /* piece + NUL + rendering */
    }
    v->n_tokens = (int32_t)n;
    v->tok = calloc(n, sizeof(*v->tok));
    v->arena = malloc(total);
    if (!v->tok || !v->arena)
        return optiml_fail(OPTIML_ERR_NOMEM, "vocab: out of memory for %llu tokens",
                           (unsigned long long)n);
    char *p = v->arena;
    for (uint64_t i = 0; i < n; i++) {
        struct vocab_entry *e = &v->tok[i];
        uint32_t len = (uint32_t)strs[i].n;
        if (len) memcpy(p, strs[i].data, len);
        p[len] = '\0';
        e->piece = p;
        e->piece_len = len;
        p += len + 1;
        double score = scores ? gguf_arr_f64(scores, i) : 0.0;
        if (isnan(score))
            return optiml_fail(OPTIML_ERR_FORMAT, "%s: score of token %llu is NaN", KEY_SCORES,
                               (unsigned long long)i);
        e->score = (float)score;
        int64_t type = types ? gguf_arr_i64(types, i) : VOCAB_TOKEN_NORMAL;
        if (type == 0) type = VOCAB_TOKEN_NORMAL;
        if (type < VOCAB_TOKEN_NORMAL || type > VOCAB_TOKEN_BYTE)
            return optiml_fail(OPTIML_ERR_FORMAT, "%s: token %llu has type %lld (expected 0..6)",
                               KEY_TYPES, (unsigned long long)i, (long long)type);
        if (type == VOCAB_TOKEN_BYTE && byte_piece_value(e->piece, len) < 0)
            return optiml_fail(OPTIML_ERR_FORMAT, "%s: token %llu is a byte token but %s has "
                               "\"%s\", not <0xXX>", KEY_TYPES, (unsigned long long)i,
                               KEY_TOKENS, e->piece);
        e->type = (uint8_t)type;
        if (type == VOCAB_TOKEN_UNKNOWN || type == VOCAB_TOKEN_USER_DEFINED) {
            e->text = e->piece;
            e->text_len = len;
        } else {
            e->text = p;
            e->text_len = render_piece((int)type, e->piece, len, p);
            p += e->text_len;
        }
    }
    return OPTIML_OK;
}

/* The special-token list sorts (length, id) pairs packed into 64-bit keys
 * (qsort has no context argument to compare by piece). */
static int u64_cmp(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Hash table, byte tokens, the special-token list. */
static optiml_status load_index(struct vocab *v) {
    int32_t n = v->n_tokens;
    uint32_t cap = 16;
    while (cap < 2u * (uint32_t)n) cap *= 2;
    v->slots = malloc((size_t)cap * sizeof(*v->slots));
    uint64_t *keys = malloc((size_t)n * sizeof(*keys));
    if (!v->slots || !keys) {
        free(keys);
        return optiml_fail(OPTIML_ERR_NOMEM, "vocab: out of memory for the piece index");
    }
    memset(v->slots, 0xff, (size_t)cap * sizeof(*v->slots));
    v->slot_mask = cap - 1;
    int32_t n_special = 0;
    for (int32_t i = 0; i < n; i++) {
        const struct vocab_entry *e = &v->tok[i];
        if (e->piece_len == 0) continue;
        v->slots[vocab_slot(v, e->piece, e->piece_len)] = i;
        if (e->type == VOCAB_TOKEN_CONTROL || e->type == VOCAB_TOKEN_UNKNOWN ||
            e->type == VOCAB_TOKEN_USER_DEFINED) {
            /* longest first, then lowest id: ascending order of the key */
            keys[n_special++] = ((uint64_t)(VOCAB_MAX_PIECE_LEN - e->piece_len) << 32) | (uint32_t)i;
            v->n_user_defined += e->type == VOCAB_TOKEN_USER_DEFINED;
        }
    }
    qsort(keys, (size_t)n_special, sizeof(*keys), u64_cmp);
    v->special = malloc(((size_t)n_special + 1) * sizeof(*v->special));
    if (!v->special) {
        free(keys);
        return optiml_fail(OPTIML_ERR_NOMEM, "vocab: out of memory for the special tokens");
    }
    for (int32_t i = 0; i < n_special; i++) v->special[i] = (int32_t)(keys[i] & 0xffffffffu);
    v->n_special = n_special;
    free(keys);

    for (int b = 0; b < 256; b++) {
        char name[7] = {'<', '0', 'x', hex_digits[b >> 4], hex_digits[b & 15], '>'};
        v->byte_tok[b] = vocab_find(v, name, 6);
    }
    return OPTIML_OK;
}

/* Special token ids and the add_* flags. */
static optiml_status load_settings(struct vocab *v, const gguf_file *f) {
    for (int k = 0; k < SPECIAL_COUNT; k++) {
        uint32_t id;
        v->ids[k] = -1;
        if (gguf_find_key(f, special_keys[k]) < 0) continue;
        TRY(gguf_get_u32(f, special_keys[k], &id));
        if (id < (uint32_t)v->n_tokens) {
            v->ids[k] = (optiml_token)id;
        } else if (k == SPECIAL_PAD) {
            LOG_WARN("%s = %u is out of range (%d tokens): ignored", special_keys[k], id,
                     v->n_tokens);
        } else {
            return optiml_fail(OPTIML_ERR_FORMAT, "%s = %u is out of range (%d tokens)",
                               special_keys[k], id, v->n_tokens);
        }
    }
    for (int32_t i = 0; i < v->n_tokens && v->ids[SPECIAL_UNK] < 0; i++)
        if (v->tok[i].type == VOCAB_TOKEN_UNKNOWN) v->ids[SPECIAL_UNK] = i;
    TRY(gguf_get_bool_or(f, "tokenizer.ggml.add_bos_token", true, &v->add_bos));
    TRY(gguf_get_bool_or(f, "tokenizer.ggml.add_eos_token", false, &v->add_eos));
    TRY(gguf_get_bool_or(f, "tokenizer.ggml.add_space_prefix", true, &v->add_space_prefix));
    return OPTIML_OK;
}

optiml_status vocab_load(const gguf_file *f, struct vocab **out) {
    if (!out) return optiml_fail(OPTIML_ERR_INVALID_ARG, "vocab_load: out is NULL");
    *out = NULL;
    if (!f) return optiml_fail(OPTIML_ERR_INVALID_ARG, "vocab_load: file is NULL");
    TRY(load_check_model(f));
    const struct gguf_value *toks, *scores, *types;
    TRY(load_array(f, KEY_TOKENS, GGUF_TYPE_STRING, true, 0, &toks));
    if (toks->arr.n == 0 || toks->arr.n > VOCAB_MAX_TOKENS)
        return optiml_fail(OPTIML_ERR_FORMAT, "%s has %llu tokens (expected 1..%d)", KEY_TOKENS,
                           (unsigned long long)toks->arr.n, VOCAB_MAX_TOKENS);
    TRY(load_array(f, KEY_SCORES, GGUF_TYPE_FLOAT32, false, toks->arr.n, &scores));
    TRY(load_array(f, KEY_TYPES, GGUF_TYPE_INT32, false, toks->arr.n, &types));

    struct vocab *v = calloc(1, sizeof(*v));
    if (!v) return optiml_fail(OPTIML_ERR_NOMEM, "vocab: out of memory");
    optiml_status st = load_entries(v, toks, scores, types);
    if (st == OPTIML_OK) st = load_index(v);
    if (st == OPTIML_OK) st = load_settings(v, f);
    if (st != OPTIML_OK) {
        vocab_free(v);
        return st;
    }
    *out = v;
    return OPTIML_OK;
}

void vocab_free(struct vocab *v) {
    if (!v) return;
    free(v->tok);
    free(v->arena);
    free(v->slots);
    free(v->special);
    free(v);
}

/* ---- accessors ------------------------------------------------------------ */

static bool vocab_valid(const struct vocab *v, optiml_token t) {
    return v && t >= 0 && t < v->n_tokens;
}

int32_t vocab_n_tokens(const struct vocab *v) { return v ? v->n_tokens : 0; }
optiml_token vocab_bos(const struct vocab *v) { return v ? v->ids[SPECIAL_BOS] : -1; }
optiml_token vocab_eos(const struct vocab *v) { return v ? v->ids[SPECIAL_EOS] : -1; }
optiml_token vocab_unk(const struct vocab *v) { return v ? v->ids[SPECIAL_UNK] : -1; }
bool vocab_add_bos(const struct vocab *v) { return v && v->add_bos; }
bool vocab_add_eos(const struct vocab *v) { return v && v->add_eos; }

bool vocab_is_eog(const struct vocab *v, optiml_token t) {
    return vocab_valid(v, t) &&
           (t == v->ids[SPECIAL_EOS] || t == v->ids[SPECIAL_EOT] || t == v->ids[SPECIAL_EOM]);
}

enum vocab_token_type vocab_token_type(const struct vocab *v, optiml_token t) {
    return vocab_valid(v, t) ? (enum vocab_token_type)v->tok[t].type : VOCAB_TOKEN_INVALID;
}

const char *vocab_piece(const struct vocab *v, optiml_token t) {
    return vocab_valid(v, t) ? v->tok[t].piece : NULL;
}

/* ---- tokenizing: work space and output ------------------------------------ */

struct symbol {
    int32_t prev, next; /* neighbours in the list, -1 at the ends */
    uint32_t off, len;  /* bytes in the normalized fragment; len 0 = merged away */
};

/* A candidate merge. key orders the heap: the piece's score mapped to an
 * unsigned integer of the same order, then the left symbol, lower first. */
struct bigram {
    uint64_t key;  /* score_key(score) << 32 | ~left */
    int32_t right; /* right symbol */
    uint32_t len;  /* bytes of the merged piece, to detect stale entries */
};

/* One allocation sized for the whole text, reused by every fragment. */
struct work {
    void *mem;
    struct symbol *sym; /* text_len + 1 (the prefix counts as one character) */
    struct bigram *heap; /* 3 * (text_len + 1): n - 1 initial + 2 per merge */
    int32_t *mark;       /* text_len, if special tokens are matched          */
    char *norm;          /* 3 * (text_len + 1): every byte may become U+2581 */
    size_t n_heap;
};

struct sink {
    optiml_token *tokens;
    int64_t cap, n;
};

static void sink_push(struct sink *s, optiml_token t) {
    if (s->n < s->cap) s->tokens[s->n] = t;
    s->n++;
}

static bool work_init(struct work *w, size_t len, bool with_mark) {
    uint64_t n = (uint64_t)len + 1;
    uint64_t sz_sym = n * sizeof(struct symbol), sz_heap = 3 * n * sizeof(struct bigram);
    uint64_t sz_mark = with_mark ? (uint64_t)len * sizeof(int32_t) : 0;
    uint64_t total = sz_sym + sz_heap + sz_mark + 3 * n;
    if (total > SIZE_MAX || !(w->mem = malloc((size_t)total))) return false;
    char *p = w->mem;
    w->sym = (struct symbol *)p;
    w->heap = (struct bigram *)(p + sz_sym);
    w->mark = with_mark ? (int32_t *)(p + sz_sym + sz_heap) : NULL;
    w->norm = p + sz_sym + sz_heap + sz_mark;
    return true;
}

/* ---- tokenizing: BPE merges of one fragment ------------------------------- */

/* Bytes of the UTF-8 character at s[0..n), or 1 if it is not a valid
 * (shortest-form, non-surrogate, <= U+10FFFF) sequence. */
static size_t utf8_char_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t len = c < 0x80 ? 1 : c < 0xC2 ? 0 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : c < 0xF5 ? 4 : 0;
    if (len <= 1 || len > n) return 1;
    for (size_t i = 1; i < len; i++)
        if ((s[i] & 0xC0) != 0x80) return 1;
    if ((c == 0xE0 && s[1] < 0xA0) || (c == 0xED && s[1] > 0x9F) ||
        (c == 0xF0 && s[1] < 0x90) || (c == 0xF4 && s[1] > 0x8F))
        return 1;
    return len;
}

/* Order-preserving map of a (non-NaN) float to an unsigned integer. */
static uint32_t score_key(float score) {
    uint32_t u;
    if (score == 0.0f) score = 0.0f; /* -0 and +0 tie */
    memcpy(&u, &score, sizeof(u));
    return (u & 0x80000000u) ? ~u : u | 0x80000000u;
}

static void heap_push(struct work *w, struct bigram b) {
    size_t i = w->n_heap++;
    while (i > 0 && b.key > w->heap[(i - 1) / 2].key) {
        w->heap[i] = w->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    w->heap[i] = b;
}

static struct bigram heap_pop(struct work *w) {
    struct bigram top = w->heap[0], last = w->heap[--w->n_heap];
    size_t i = 0, n = w->n_heap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && w->heap[c + 1].key > w->heap[c].key) c++;
        if (w->heap[c].key <= last.key) break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n) w->heap[i] = last;
    return top;
}

/* Queue the pair (left, right) if their concatenation is a piece. */
static void try_bigram(const struct vocab *v, struct work *w, int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    uint32_t len = w->sym[left].len + w->sym[right].len;
    int32_t id = vocab_find(v, w->norm + w->sym[left].off, len);
    if (id < 0) return;
    uint64_t key = (uint64_t)score_key(v->tok[id].score) << 32 | (uint32_t)~(uint32_t)left;
    heap_push(w, (struct bigram){key, right, len});
}

/* Emit the tokens of one final symbol. */
static bool emit_symbol(const struct vocab *v, const char *s, size_t n, struct sink *out) {
    int32_t id = vocab_find(v, s, n);
    if (id >= 0) {
        sink_push(out, id);
        return true;
    }
    bool bytes = true;
    for (size_t i = 0; i < n; i++) bytes &= v->byte_tok[(unsigned char)s[i]] >= 0;
    if (bytes) {
        for (size_t i = 0; i < n; i++) sink_push(out, v->byte_tok[(unsigned char)s[i]]);
        return true;
    }
    if (v->ids[SPECIAL_UNK] >= 0) {
        sink_push(out, v->ids[SPECIAL_UNK]);
        return true;
    }
    optiml_set_error("vocab_tokenize: no piece, byte token or unknown token for byte 0x%02X",
                     (unsigned char)s[0]);
    return false;
}

/* Tokenize text[0..n) (n > 0) as one fragment. */
static bool tokenize_fragment(const struct vocab *v, struct work *w, const char *text, size_t n,
                              bool prefix, struct sink *out) {
    size_t nb = 0;
    if (prefix) {
        memcpy(w->norm, spm_space, 3);
        nb = 3;
    }
    for (size_t i = 0; i < n; i++) {
        if (text[i] == ' ') {
            memcpy(w->norm + nb, spm_space, 3);
            nb += 3;
        } else {
            w->norm[nb++] = text[i];
        }
    }
    int32_t n_sym = 0;
    for (size_t off = 0; off < nb; n_sym++) {
        size_t len = utf8_char_len((const unsigned char *)w->norm + off, nb - off);
        w->sym[n_sym] = (struct symbol){n_sym - 1, n_sym + 1, (uint32_t)off, (uint32_t)len};
        off += len;
    }
    w->sym[n_sym - 1].next = -1;

    w->n_heap = 0;
    for (int32_t i = 1; i < n_sym; i++) try_bigram(v, w, i - 1, i);
    while (w->n_heap) {
        struct bigram b = heap_pop(w);
        int32_t left = (int32_t)~(uint32_t)b.key;
        struct symbol *l = &w->sym[left], *r = &w->sym[b.right];
        if (l->len == 0 || r->len == 0 || l->next != b.right || l->len + r->len != b.len)
            continue; /* stale: one side was merged since */
        l->len += r->len;
        r->len = 0;
        l->next = r->next;
        if (r->next >= 0) w->sym[r->next].prev = left;
        try_bigram(v, w, l->prev, left);
        try_bigram(v, w, left, l->next);
    }
    for (int32_t i = 0; i >= 0; i = w->sym[i].next)
        if (!emit_symbol(v, w->norm + w->sym[i].off, w->sym[i].len, out)) return false;
    return true;
}

/* ---- tokenizing: special tokens and the whole text ------------------------ */

/* mark[i] = token id where a matched special token starts, -2 inside one,
 * -1 for plain text. Longer texts are matched first, each in the runs of
 * plain text left over, left to right, without overlap. */
static void mark_specials(const struct vocab *v, const char *text, size_t n, bool parse_special,
                          int32_t *mark) {
    for (size_t i = 0; i < n; i++) mark[i] = -1;
    for (int32_t k = 0; k < v->n_special; k++) {
        const struct vocab_entry *e = &v->tok[v->special[k]];
        size_t len = e->piece_len;
        if ((!parse_special && e->type != VOCAB_TOKEN_USER_DEFINED) || len > n) continue;
        for (size_t i = 0; i < n;) {
            if (mark[i] != -1) {
                i++;
                continue;
            }
            size_t end = i;
            while (end < n && mark[end] == -1) end++;
            for (size_t p = i; end - p >= len;) {
                const char *hit = memchr(text + p, e->piece[0], end - p - len + 1);
                if (!hit) break;
                p = (size_t)(hit - text);
                if (memcmp(hit, e->piece, len) != 0) {
                    p++;
                    continue;
                }
                mark[p] = v->special[k];
                for (size_t j = 1; j < len; j++) mark[p + j] = -2;
                p += len;
            }
            i = end;
        }
    }
}

static bool tokenize_text(const struct vocab *v, struct work *w, const char *text, size_t n,
                          bool parse_special, struct sink *out) {
    if (w->mark) mark_specials(v, text, n, parse_special, w->mark);
    bool after_special = true; /* the start of the text counts as one */
    size_t start = 0;
    for (size_t i = 0; i <= n;) {
        bool special = i < n && w->mark && w->mark[i] >= 0;
        if (i < n && !special) {
            i++;
            continue;
        }
        if (i > start) {
            if (!tokenize_fragment(v, w, text + start, i - start,
                                   v->add_space_prefix && after_special, out))
                return false;
            after_special = false;
        }
        if (i == n) break;
        sink_push(out, w->mark[i]);
        after_special = true;
        i += v->tok[w->mark[i]].piece_len;
        start = i;
    }
    return true;
}

int32_t vocab_tokenize(const struct vocab *v, const char *text, int32_t text_len,
                       optiml_token *tokens, int32_t n_max, bool add_bos, bool parse_special) {
    if (!v || text_len < 0 || text_len > VOCAB_MAX_TEXT || (text_len > 0 && !text) || n_max < 0 ||
        (n_max > 0 && !tokens)) {
        optiml_set_error("vocab_tokenize: invalid argument (text_len %d, at most %d; n_max %d)",
                         text_len, VOCAB_MAX_TEXT, n_max);
        return INT32_MIN;
    }
    struct sink out = {tokens, n_max, 0};
    if (add_bos && v->ids[SPECIAL_BOS] >= 0) sink_push(&out, v->ids[SPECIAL_BOS]);
    if (text_len > 0) {
        struct work w = {0};
        bool marks = v->n_user_defined > 0 || (parse_special && v->n_special > 0);
        if (!work_init(&w, (size_t)text_len, marks)) {
            optiml_set_error("vocab_tokenize: out of memory for %d bytes of text", text_len);
            return INT32_MIN;
        }
        bool ok = tokenize_text(v, &w, text, (size_t)text_len, parse_special, &out);
        free(w.mem);
        if (!ok) return INT32_MIN;
    }
    if (out.n > INT32_MAX) {
        optiml_set_error("vocab_tokenize: %lld tokens do not fit an int32_t", (long long)out.n);
        return INT32_MIN;
    }
    return out.n > n_max ? -(int32_t)out.n : (int32_t)out.n;
}

/* ---- detokenizing --------------------------------------------------------- */

int32_t vocab_token_to_piece(const struct vocab *v, optiml_token token, char *buf,
                             int32_t buf_size, bool lstrip, bool special) {
    if (!vocab_valid(v, token) || buf_size < 0 || (buf_size > 0 && !buf)) {
        optiml_set_error("vocab_token_to_piece: invalid token %d or buffer (size %d)", token,
                         buf_size);
        return INT32_MIN;
    }
    const struct vocab_entry *e = &v->tok[token];
    const char *s = e->text;
    int32_t n = (int32_t)e->text_len;
    if (special && (e->type == VOCAB_TOKEN_CONTROL || e->type == VOCAB_TOKEN_UNUSED)) {
        s = e->piece;
        n = (int32_t)e->piece_len;
    }
    if (lstrip && n > 0 && s[0] == ' ') {
        s++;
        n--;
    }
    if (n > buf_size) return -n;
    if (n) memcpy(buf, s, (size_t)n);
    return n;
}
