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
 *      only) and user-defined tokens (always) are located as Hugging Face
 *      tokenizers locates added tokens: scanning left to right, the longest
 *      text at the leftmost position, without overlap, honouring the
 *      lstrip/rstrip/single_word options of tokenizer.ggml.added_token_flags
 *      and matching "normalized" tokens in a second pass. A first-byte index
 *      of the special texts keeps the scan one table look-up per byte of
 *      plain text. They split the text into fragments.
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
 *
 * Byte-level BPE ("gpt2") shares steps 1 and 4 with a different start and
 * order: loading also indexes the merges in a hash table keyed by the pair
 * of token ids (rank and result), and each fragment is decoded (UTF-8,
 * category flags) and cut into words by the pre-tokenizer (src/unicode.c);
 * a word's symbols are its bytes as the tokens of their GPT-2 characters,
 * and the heap pops the lowest merge rank first. Rendering maps each
 * character of a piece back to its byte.
 */
#include "vocab.h"
#include "unicode.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- data ---------------------------------------------------------------- */

#define KEY_MODEL "tokenizer.ggml.model"
#define KEY_TOKENS "tokenizer.ggml.tokens"
#define KEY_SCORES "tokenizer.ggml.scores"
#define KEY_TYPES "tokenizer.ggml.token_type"
#define KEY_MERGES "tokenizer.ggml.merges"
#define KEY_PRE "tokenizer.ggml.pre"
#define KEY_FLAGS "tokenizer.ggml.added_token_flags"

/* tokenizer.ggml.added_token_flags bits: Hugging Face's AddedToken options. */
enum {
    ADDED_LSTRIP = 1,      /* also takes the whitespace on its left       */
    ADDED_RSTRIP = 2,      /* also takes the whitespace on its right      */
    ADDED_SINGLE_WORD = 4, /* matches only where no word character touches */
    ADDED_NORMALIZED = 8,  /* matched in the second pass                  */
    ADDED_ALL = 15,
};

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

/* A BPE merge: the pair (left, right) of token ids packed in key, its rank
 * (lower merges first) and the token it makes. key UINT64_MAX: empty. */
struct merge_slot {
    uint64_t key;
    int32_t rank;
    int32_t id;
};

/* A slot of the piece index: the token, its piece's hash (compared first)
 * and where the piece is, so a lookup touches the slot and the piece only. */
struct piece_slot {
    int32_t id; /* -1: empty */
    uint32_t hash;
    uint32_t off, len; /* the piece: arena[off..off+len) */
};

struct vocab {
    bool bpe;               /* "gpt2": byte-level BPE; else SentencePiece */
    enum unicode_pre pre;   /* BPE pre-tokenizer                          */
    bool ignore_merges;     /* BPE: a word that is a token is that token   */
    struct merge_slot *merges;
    uint32_t merge_mask;
    int32_t n_tokens;
    struct vocab_entry *tok;
    char *arena;
    struct piece_slot *slots; /* hash table of token ids */
    uint32_t slot_mask;
    int32_t byte_tok[256]; /* token of "<0xXX>" (BPE: of the byte's character), -1 if none */
    int32_t *special;      /* matchable special tokens by first byte, longest first */
    int32_t special_start[257]; /* special[special_start[b]..[b + 1]): first byte b */
    uint8_t *flags;        /* n_tokens ADDED_* flags; NULL: none          */
    int32_t n_special;
    int32_t n_user_defined;
    optiml_token ids[SPECIAL_COUNT];
    bool add_bos, add_eos, add_space_prefix;
    uint8_t *eog; /* n_tokens flags: ends generation */
};

/* ---- piece index ---------------------------------------------------------- */

/* FNV-1a over the piece bytes, in steps (a piece may come in two parts). */
#define FNV_BASIS 0xcbf29ce484222325ull

static uint64_t fnv_update(uint64_t h, const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static uint32_t fnv_final(uint64_t h) { return (uint32_t)(h ^ (h >> 32)); }

static uint32_t hash_bytes(const char *s, size_t n) { return fnv_final(fnv_update(FNV_BASIS, s, n)); }

/* Slot holding the piece a[0..na) b[0..nb) of hash h, or the empty slot
 * where it would go. */
static struct piece_slot *vocab_slot2(const struct vocab *v, const char *a, size_t na,
                                      const char *b, size_t nb, uint32_t h) {
    for (uint32_t i = h & v->slot_mask;; i = (i + 1) & v->slot_mask) {
        struct piece_slot *slot = &v->slots[i];
        if (slot->id < 0) return slot;
        if (slot->hash != h || slot->len != na + nb) continue;
        const char *piece = v->arena + slot->off;
        if (memcmp(piece, a, na) == 0 && (nb == 0 || memcmp(piece + na, b, nb) == 0))
            return slot;
    }
}

/* Slot holding the piece s[0..n), or the empty slot where it would go. */
static struct piece_slot *vocab_slot(const struct vocab *v, const char *s, size_t n) {
    return vocab_slot2(v, s, n, NULL, 0, hash_bytes(s, n));
}

/* Token whose piece is s[0..n), or -1. */
static int32_t vocab_find(const struct vocab *v, const char *s, size_t n) {
    return vocab_slot(v, s, n)->id;
}

/* ---- GPT-2 byte mapping ---------------------------------------------------- */

/* Byte-level BPE spells each byte as one character: the printable bytes
 * 0x21..0x7E, 0xA1..0xAC and 0xAE..0xFF as the code point of the same
 * value, the other 68 bytes, in increasing order, as U+0100, U+0101, ... */
static uint32_t byte_to_cp(unsigned b) {
    if ((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE) return b;
    unsigned n = b <= 0x20 ? b : b <= 0xA0 ? b - 0x7F + 0x21 : 0x21 + 0x22;
    return 0x100 + n;
}

/* The byte a character of the mapping stands for, -1 if none. */
static int cp_to_byte(uint32_t cp) {
    if (cp < 0x100) return byte_to_cp(cp) == cp ? (int)cp : -1;
    if (cp <= 0x120) return (int)(cp - 0x100);
    if (cp <= 0x142) return (int)(cp - 0x121 + 0x7F);
    return cp == 0x143 ? 0xAD : -1;
}

/* The UTF-8 of byte b's character into dst (2 bytes of room); the length. */
static size_t byte_to_utf8(unsigned b, char *dst) {
    uint32_t cp = byte_to_cp(b);
    if (cp < 0x80) {
        dst[0] = (char)cp;
        return 1;
    }
    dst[0] = (char)(0xC0 | cp >> 6);
    dst[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
}

/* ---- loading -------------------------------------------------------------- */

static optiml_status load_check_model(const gguf_file *f, bool *bpe) {
    struct gguf_str model;
    optiml_status st = gguf_get_str(f, KEY_MODEL, &model);
    if (st == OPTIML_ERR_INVALID_ARG)
        return optiml_fail(OPTIML_ERR_FORMAT, "missing key %s", KEY_MODEL);
    if (st != OPTIML_OK) return st;
    *bpe = gguf_str_eq(model, "gpt2");
    if (*bpe || gguf_str_eq(model, "llama")) return OPTIML_OK;
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

/* A byte-level piece as the bytes its characters stand for (a character
 * outside the mapping is kept as it is). dst has room for n bytes. */
static uint32_t render_bpe_piece(const char *s, uint32_t n, char *dst) {
    uint32_t m = 0;
    for (uint32_t i = 0; i < n;) {
        uint32_t cp;
        size_t len = unicode_decode((const unsigned char *)s + i, n - i, &cp);
        int b = len > 1 || cp < 0x80 ? cp_to_byte(cp) : -1;
        if (b >= 0) {
            dst[m++] = (char)b;
        } else {
            memcpy(dst + m, s + i, len);
            m += (uint32_t)len;
        }
        i += (uint32_t)len;
    }
    return m;
}

/* Write how a piece of the given type renders (without special) at dst;
 * returns the length. dst has room for n bytes. */
static uint32_t render_piece(bool bpe, int type, const char *s, uint32_t n, char *dst) {
    uint32_t m = 0;
    if (bpe && type == VOCAB_TOKEN_NORMAL) return render_bpe_piece(s, n, dst);
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
    if (total > UINT32_MAX) /* the piece index keeps 32-bit arena offsets */
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: %llu bytes of token text (at most 2 GiB)",
                           KEY_TOKENS, (unsigned long long)(total / 2));
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
            e->text_len = render_piece(v->bpe, (int)type, e->piece, len, p);
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
        *vocab_slot(v, e->piece, e->piece_len) = (struct piece_slot){
            i, hash_bytes(e->piece, e->piece_len), (uint32_t)(e->piece - v->arena), e->piece_len};
        if (e->type == VOCAB_TOKEN_CONTROL || e->type == VOCAB_TOKEN_UNKNOWN ||
            e->type == VOCAB_TOKEN_USER_DEFINED) {
            /* by first byte, then longest first, then lowest id: ascending
             * order of the key */
            keys[n_special++] = (uint64_t)(unsigned char)e->piece[0] << 48 |
                                (uint64_t)(VOCAB_MAX_PIECE_LEN - e->piece_len) << 32 | (uint32_t)i;
            v->n_user_defined += e->type == VOCAB_TOKEN_USER_DEFINED;
        }
    }
    qsort(keys, (size_t)n_special, sizeof(*keys), u64_cmp);
    v->special = malloc(((size_t)n_special + 1) * sizeof(*v->special));
    if (!v->special) {
        free(keys);
        return optiml_fail(OPTIML_ERR_NOMEM, "vocab: out of memory for the special tokens");
    }
    for (int32_t i = 0, b = 0; i <= n_special; i++) {
        int first = i < n_special ? (int)(keys[i] >> 48) : 256;
        while (b <= first) v->special_start[b++] = i;
        if (i < n_special) v->special[i] = (int32_t)(keys[i] & 0xffffffffu);
    }
    v->n_special = n_special;
    free(keys);

    for (int b = 0; b < 256; b++) {
        char name[7] = {'<', '0', 'x', hex_digits[b >> 4], hex_digits[b & 15], '>'};
        if (v->bpe)
            v->byte_tok[b] = vocab_find(v, name, byte_to_utf8((unsigned)b, name));
        else
            v->byte_tok[b] = vocab_find(v, name, 6);
    }
    return OPTIML_OK;
}

/* ---- loading: BPE merges ---------------------------------------------------- */

static uint32_t merge_hash(uint64_t key) { /* splitmix64's finalizer */
    key = (key ^ (key >> 30)) * 0xBF58476D1CE4E5B9ull;
    key = (key ^ (key >> 27)) * 0x94D049BB133111EBull;
    return (uint32_t)(key ^ (key >> 31));
}

/* The slot of the pair key, or the empty slot where it would go. */
static struct merge_slot *merge_slot_find(const struct vocab *v, uint64_t key) {
    for (uint32_t i = merge_hash(key) & v->merge_mask;; i = (i + 1) & v->merge_mask)
        if (v->merges[i].key == key || v->merges[i].key == UINT64_MAX) return &v->merges[i];
}

/* A merge string cut at its first space, with the hashes of both parts
 * and of their concatenation; nl = UINT32_MAX if it has no space. */
struct merge_parse {
    uint32_t nl;
    uint32_t h_left, h_right, h_joined;
};

static void merge_parse(const struct gguf_str *m, const struct vocab *v, struct merge_parse *p) {
    const char *sp = memchr(m->data, ' ', m->n);
    p->nl = UINT32_MAX;
    if (!sp) return;
    size_t nl = (size_t)(sp - m->data), nr = m->n - nl - 1;
    uint64_t hl = fnv_update(FNV_BASIS, m->data, nl);
    p->nl = (uint32_t)nl;
    p->h_left = fnv_final(hl);
    p->h_right = hash_bytes(sp + 1, nr);
    p->h_joined = fnv_final(fnv_update(hl, sp + 1, nr));
    __builtin_prefetch(&v->slots[p->h_left & v->slot_mask]);
    __builtin_prefetch(&v->slots[p->h_right & v->slot_mask]);
    __builtin_prefetch(&v->slots[p->h_joined & v->slot_mask]);
}

/* Prefetch the piece the first slot of hash h with that hash points at. */
static void merge_prefetch_piece(const struct vocab *v, uint32_t h) {
    for (uint32_t i = h & v->slot_mask;; i = (i + 1) & v->slot_mask) {
        const struct piece_slot *slot = &v->slots[i];
        if (slot->id < 0) return;
        if (slot->hash == h) {
            __builtin_prefetch(v->arena + slot->off);
            return;
        }
    }
}

/* The merge m as (left, right) -> result, trying each space of the string
 * as the cut (the first is usually right, and p has it pre-hashed). False
 * if no cut names three tokens. */
static bool merge_resolve(const struct vocab *v, const struct gguf_str *m,
                          const struct merge_parse *p, struct merge_slot *out) {
    const char *s = m->data;
    for (const char *sp = memchr(s, ' ', m->n); sp; sp = memchr(sp + 1, ' ', m->n - (size_t)(sp + 1 - s))) {
        size_t nl = (size_t)(sp - s), nr = m->n - nl - 1;
        if (nl == 0 || nr == 0) continue;
        bool first = nl == p->nl;
        int32_t left = vocab_slot2(v, s, nl, NULL, 0, first ? p->h_left : hash_bytes(s, nl))->id;
        int32_t right =
            vocab_slot2(v, sp + 1, nr, NULL, 0, first ? p->h_right : hash_bytes(sp + 1, nr))->id;
        if (left < 0 || right < 0) continue;
        uint32_t hj = first ? p->h_joined : fnv_final(fnv_update(fnv_update(FNV_BASIS, s, nl), sp + 1, nr));
        int32_t id = vocab_slot2(v, s, nl, sp + 1, nr, hj)->id;
        if (id < 0) continue;
        out->key = (uint64_t)left << 32 | (uint32_t)right;
        out->id = id;
        return true;
    }
    return false;
}

#define MERGE_AHEAD 16 /* merges parsed (and their slots prefetched) ahead */

/* tokenizer.ggml.merges: "left right" strings, rank = index. A merge whose
 * parts or result are not tokens can never apply and is skipped; of two
 * equal merges the first (lower rank) counts. The lookups are cache misses
 * in big tables, so they run in two passes that prefetch MERGE_AHEAD
 * entries ahead: resolve every merge to ids, then insert them. */
static optiml_status load_merges(struct vocab *v, const gguf_file *f) {
    const struct gguf_value *arr;
    TRY(load_array(f, KEY_MERGES, GGUF_TYPE_STRING, true, 0, &arr));
    if (arr->arr.n > VOCAB_MAX_TOKENS)
        return optiml_fail(OPTIML_ERR_FORMAT, "%s has %llu merges (at most %d)", KEY_MERGES,
                           (unsigned long long)arr->arr.n, VOCAB_MAX_TOKENS);
    const struct gguf_str *strs = arr->arr.data;
    uint32_t n = (uint32_t)arr->arr.n, cap = 16, n_skipped = 0;
    while (cap < n + n / 2) cap *= 2;
    v->merges = malloc((size_t)cap * sizeof(*v->merges));
    struct merge_slot *resolved = malloc(((size_t)n + 1) * sizeof(*resolved));
    if (!v->merges || !resolved) {
        free(resolved);
        return optiml_fail(OPTIML_ERR_NOMEM, "vocab: out of memory for %u merges", n);
    }
    memset(v->merges, 0xff, (size_t)cap * sizeof(*v->merges));
    v->merge_mask = cap - 1;

    /* merge i + 2 * MERGE_AHEAD: hashed, slots prefetched; merge i +
     * MERGE_AHEAD: pieces prefetched; merge i: resolved */
    struct merge_parse ring[4 * MERGE_AHEAD];
    const uint32_t ring_mask = 4 * MERGE_AHEAD - 1;
    for (uint32_t i = 0; i < n && i < 2 * MERGE_AHEAD; i++) merge_parse(&strs[i], v, &ring[i]);
    for (uint32_t i = 0; i < n; i++) {
        if (i + 2 * MERGE_AHEAD < n)
            merge_parse(&strs[i + 2 * MERGE_AHEAD], v, &ring[(i + 2 * MERGE_AHEAD) & ring_mask]);
        const struct merge_parse *ahead = &ring[(i + MERGE_AHEAD) & ring_mask];
        if (i + MERGE_AHEAD < n && ahead->nl != UINT32_MAX) {
            merge_prefetch_piece(v, ahead->h_left);
            merge_prefetch_piece(v, ahead->h_right);
            merge_prefetch_piece(v, ahead->h_joined);
        }
        resolved[i].rank = (int32_t)i;
        if (!merge_resolve(v, &strs[i], &ring[i & ring_mask], &resolved[i])) {
            resolved[i].key = UINT64_MAX;
            n_skipped++;
        }
    }
    for (uint32_t i = 0; i < n; i++) {
        if (i + MERGE_AHEAD < n && resolved[i + MERGE_AHEAD].key != UINT64_MAX)
            __builtin_prefetch(&v->merges[merge_hash(resolved[i + MERGE_AHEAD].key) & v->merge_mask]);
        if (resolved[i].key == UINT64_MAX) continue;
        struct merge_slot *slot = merge_slot_find(v, resolved[i].key);
        if (slot->key == UINT64_MAX) *slot = resolved[i];
    }
    free(resolved);
    if (n_skipped)
        LOG_WARN("%s: %u of %u merges name pieces that are not tokens: skipped", KEY_MERGES,
                 n_skipped, n);
    return OPTIML_OK;
}

/* tokenizer.ggml.added_token_flags (optional u8 array, one per token). */
static optiml_status load_added_flags(struct vocab *v, const gguf_file *f) {
    const struct gguf_value *arr;
    TRY(load_array(f, KEY_FLAGS, GGUF_TYPE_UINT8, false, (uint64_t)v->n_tokens, &arr));
    if (!arr) return OPTIML_OK;
    const uint8_t *src = arr->arr.data;
    for (int32_t i = 0; i < v->n_tokens; i++)
        if (src[i] & ~ADDED_ALL)
            return optiml_fail(OPTIML_ERR_FORMAT, "%s[%d] = %u has unknown bits", KEY_FLAGS, i,
                               src[i]);
    v->flags = malloc((size_t)v->n_tokens);
    if (!v->flags) return optiml_fail(OPTIML_ERR_NOMEM, "vocab: out of memory");
    memcpy(v->flags, src, (size_t)v->n_tokens);
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
    TRY(gguf_get_bool_or(f, "tokenizer.ggml.add_bos_token", !v->bpe, &v->add_bos));
    TRY(gguf_get_bool_or(f, "tokenizer.ggml.add_eos_token", false, &v->add_eos));
    TRY(gguf_get_bool_or(f, "tokenizer.ggml.add_space_prefix", !v->bpe, &v->add_space_prefix));
    if (v->bpe) {
        struct gguf_str pre = {7, "default"};
        optiml_status st = gguf_get_str(f, KEY_PRE, &pre);
        if (st == OPTIML_ERR_INVALID_ARG) {
            LOG_WARN("%s missing: using the GPT-2 pre-tokenizer (\"default\")", KEY_PRE);
            pre = (struct gguf_str){7, "default"};
        } else if (st != OPTIML_OK) {
            return st;
        }
        if (!unicode_pre_from_name(pre.data, pre.n, &v->pre))
            return optiml_fail(OPTIML_ERR_UNSUPPORTED,
                               "%s = \"%.*s\": pre-tokenizer not supported (gpt2, default, "
                               "llama-bpe, qwen2, smollm, starcoder, falcon, deepseek-llm)",
                               KEY_PRE, pre.n > 64 ? 64 : (int)pre.n, pre.data);
        v->ignore_merges = v->pre == UNICODE_PRE_LLAMA3; /* as HF's Llama 3 tokenizer.json */
        int n_missing = 0;
        for (int b = 0; b < 256; b++) n_missing += v->byte_tok[b] < 0;
        if (n_missing)
            LOG_INFO("byte-level BPE: %d bytes have no token and are left out of texts "
                     "(Falcon's vocabulary lacks 28)", n_missing);
    }
    return OPTIML_OK;
}

/* End-of-generation tokens: the EOS, EOT and EOM ids, and control tokens
 * spelled like the end-of-turn markers of common chat formats. */
static optiml_status load_eog(struct vocab *v) {
    static const char *const texts[] = {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>",
                                        "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>"};
    v->eog = calloc((size_t)v->n_tokens, 1);
    if (!v->eog) return optiml_fail(OPTIML_ERR_NOMEM, "vocab: out of memory");
    for (int k = SPECIAL_EOS; k <= SPECIAL_EOM; k++)
        if (k != SPECIAL_UNK && k != SPECIAL_PAD && v->ids[k] >= 0) v->eog[v->ids[k]] = 1;
    for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) {
        int32_t id = vocab_find(v, texts[i], strlen(texts[i]));
        if (id >= 0 && v->tok[id].type == VOCAB_TOKEN_CONTROL) v->eog[id] = 1;
    }
    return OPTIML_OK;
}

optiml_status vocab_load(const gguf_file *f, struct vocab **out) {
    if (!out) return optiml_fail(OPTIML_ERR_INVALID_ARG, "vocab_load: out is NULL");
    *out = NULL;
    if (!f) return optiml_fail(OPTIML_ERR_INVALID_ARG, "vocab_load: file is NULL");
    bool bpe = false;
    TRY(load_check_model(f, &bpe));
    const struct gguf_value *toks, *scores, *types;
    TRY(load_array(f, KEY_TOKENS, GGUF_TYPE_STRING, true, 0, &toks));
    if (toks->arr.n == 0 || toks->arr.n > VOCAB_MAX_TOKENS)
        return optiml_fail(OPTIML_ERR_FORMAT, "%s has %llu tokens (expected 1..%d)", KEY_TOKENS,
                           (unsigned long long)toks->arr.n, VOCAB_MAX_TOKENS);
    TRY(load_array(f, KEY_SCORES, GGUF_TYPE_FLOAT32, false, toks->arr.n, &scores));
    TRY(load_array(f, KEY_TYPES, GGUF_TYPE_INT32, false, toks->arr.n, &types));

    struct vocab *v = calloc(1, sizeof(*v));
    if (!v) return optiml_fail(OPTIML_ERR_NOMEM, "vocab: out of memory");
    v->bpe = bpe;
    optiml_status st = load_entries(v, toks, scores, types);
    if (st == OPTIML_OK) st = load_index(v);
    if (st == OPTIML_OK && bpe) st = load_merges(v, f);
    if (st == OPTIML_OK) st = load_settings(v, f);
    if (st == OPTIML_OK) st = load_added_flags(v, f);
    if (st == OPTIML_OK) st = load_eog(v);
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
    free(v->merges);
    free(v->eog);
    free(v->flags);
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
    return vocab_valid(v, t) && v->eog[t];
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
    int32_t id;         /* BPE: the symbol's token */
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
    /* byte-level BPE: the decoded characters (text_len + 1 each) and the
     * word ends of the pre-tokenizer (text_len each) */
    struct unicode_chars chars;
    uint32_t *ends, *scratch;
};

struct sink {
    optiml_token *tokens;
    int64_t cap, n;
};

static void sink_push(struct sink *s, optiml_token t) {
    if (s->n < s->cap) s->tokens[s->n] = t;
    s->n++;
}

static bool work_init(struct work *w, size_t len, bool with_mark, bool bpe) {
    uint64_t n = (uint64_t)len + 1;
    /* each part starts 8-byte aligned (struct bigram holds a uint64_t) */
    uint64_t sz_sym = align_up_u64(n * sizeof(struct symbol), 8);
    uint64_t sz_heap = 3 * n * sizeof(struct bigram);
    uint64_t sz_mark = with_mark ? align_up_u64((uint64_t)len * sizeof(int32_t), 8) : 0;
    uint64_t sz_u32 = n * sizeof(uint32_t), sz_bpe = bpe ? 4 * sz_u32 + n : 0;
    uint64_t total = sz_sym + sz_heap + sz_mark + sz_bpe + 3 * n;
    if (total > SIZE_MAX || !(w->mem = malloc((size_t)total))) return false;
    char *p = w->mem;
    w->sym = (struct symbol *)p;
    w->heap = (struct bigram *)(p + sz_sym);
    w->mark = with_mark ? (int32_t *)(p + sz_sym + sz_heap) : NULL;
    p += sz_sym + sz_heap + sz_mark;
    if (bpe) {
        w->chars.cp = (uint32_t *)p;
        w->chars.off = (uint32_t *)(p + sz_u32);
        w->ends = (uint32_t *)(p + 2 * sz_u32);
        w->scratch = (uint32_t *)(p + 3 * sz_u32);
        w->chars.flags = (uint8_t *)(p + 4 * sz_u32);
        p += sz_bpe;
    }
    w->norm = p;
    return true;
}

/* ---- tokenizing: SentencePiece merges of one fragment ---------------------- */

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
        uint32_t cp;
        size_t len = unicode_decode((const unsigned char *)w->norm + off, nb - off, &cp);
        w->sym[n_sym] = (struct symbol){n_sym - 1, n_sym + 1, (uint32_t)off, (uint32_t)len, -1};
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

/* ---- tokenizing: byte-level BPE of one fragment --------------------------- */

/* Queue the pair (left, right) if a merge joins their tokens; the heap
 * pops the lowest rank first, then the leftmost pair. */
static void bpe_try_pair(const struct vocab *v, struct work *w, int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const struct merge_slot *m =
        merge_slot_find(v, (uint64_t)w->sym[left].id << 32 | (uint32_t)w->sym[right].id);
    if (m->key == UINT64_MAX) return;
    uint64_t key = (uint64_t)~(uint32_t)m->rank << 32 | (uint32_t)~(uint32_t)left;
    heap_push(w, (struct bigram){key, right, w->sym[left].len + w->sym[right].len});
}

/* BPE of one word s[0..n) (n > 0): its bytes as byte tokens, merged by
 * rank. With ignore_merges a word that is a normal token is that token.
 * Never fails (a bool like tokenize_fragment's). */
static bool bpe_word(const struct vocab *v, struct work *w, const char *s, size_t n,
                     struct sink *out) {
    if (v->ignore_merges) {
        size_t m = 0;
        for (size_t i = 0; i < n; i++) m += byte_to_utf8((unsigned char)s[i], w->norm + m);
        int32_t id = vocab_find(v, w->norm, m);
        if (id >= 0 && v->tok[id].type == VOCAB_TOKEN_NORMAL) {
            sink_push(out, id);
            return true;
        }
    }
    /* a byte without a token is left out, its neighbours meeting (HF's BPE
     * model without unk_token drops such characters, as llama.cpp does) */
    size_t n_sym = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = v->byte_tok[(unsigned char)s[i]];
        if (id < 0) continue;
        int32_t k = (int32_t)n_sym++;
        w->sym[k] = (struct symbol){k - 1, k + 1, (uint32_t)k, 1, id};
    }
    if (n_sym == 0) return true;
    w->sym[n_sym - 1].next = -1;
    w->n_heap = 0;
    for (size_t i = 1; i < n_sym; i++) bpe_try_pair(v, w, (int32_t)i - 1, (int32_t)i);
    while (w->n_heap) {
        struct bigram b = heap_pop(w);
        int32_t left = (int32_t)~(uint32_t)b.key;
        struct symbol *l = &w->sym[left], *r = &w->sym[b.right];
        if (l->len == 0 || r->len == 0 || l->next != b.right || l->len + r->len != b.len)
            continue; /* stale: one side was merged since */
        l->id = merge_slot_find(v, (uint64_t)l->id << 32 | (uint32_t)r->id)->id;
        l->len += r->len;
        r->len = 0;
        l->next = r->next;
        if (r->next >= 0) w->sym[r->next].prev = left;
        bpe_try_pair(v, w, l->prev, left);
        bpe_try_pair(v, w, left, l->next);
    }
    for (int32_t i = 0; i >= 0; i = w->sym[i].next) sink_push(out, w->sym[i].id);
    return true;
}

/* Pre-tokenize text[0..n) (n > 0) into words and BPE each. */
static bool tokenize_fragment_bpe(const struct vocab *v, struct work *w, const char *text,
                                  size_t n, struct sink *out) {
    unicode_chars_decode(&w->chars, text, n);
    size_t n_words = unicode_pre_split(v->pre, &w->chars, text, w->ends, w->scratch);
    for (size_t i = 0, start = 0; i < n_words; start = w->ends[i++])
        if (!bpe_word(v, w, text + start, w->ends[i] - start, out)) return false;
    return true;
}

/* ---- tokenizing: special tokens and the whole text ------------------------ */

/* Hugging Face's regex \w (Unicode word characters: letters, marks,
 * decimal digits, connector punctuation, joiners), as single_word sees it.
 * Our flags do not tell decimal digits from other numbers, so ², ½ and
 * ① count as word characters here and not in HF; letter-like symbols
 * such as Ⓐ (Other_Alphabetic) do not. */
static bool char_is_word(uint32_t cp) {
    if (unicode_flags(cp) & (UNICODE_LETTER | UNICODE_MARK | UNICODE_NUMBER)) return true;
    return cp == '_' || cp == 0x200C || cp == 0x200D || cp == 0x203F || cp == 0x2040 ||
           cp == 0x2054 || cp == 0xFE33 || cp == 0xFE34 || (cp >= 0xFE4D && cp <= 0xFE4F) ||
           cp == 0xFF3F;
}

/* The character that ends at text[pos] (pos > a) within [a, pos): its code
 * point (U+FFFD for a stray byte) and start. */
static size_t char_before(const char *text, size_t a, size_t pos, uint32_t *cp) {
    size_t q = pos - 1;
    while (q > a && pos - q < 4 && ((unsigned char)text[q] & 0xC0) == 0x80) q--;
    if (unicode_decode((const unsigned char *)text + q, pos - q, cp) == pos - q) return q;
    *cp = UNICODE_REPLACEMENT;
    return pos - 1;
}

static bool space_before(const char *text, size_t a, size_t pos, size_t *start) {
    uint32_t cp;
    *start = char_before(text, a, pos, &cp);
    return (unicode_flags(cp) & UNICODE_SPACE) != 0;
}

static bool space_at(const char *text, size_t pos, size_t b, size_t *len) {
    uint32_t cp;
    *len = unicode_decode((const unsigned char *)text + pos, b - pos, &cp);
    return (unicode_flags(cp) & UNICODE_SPACE) != 0;
}

/* The longest special token of this pass at text[q..b), or -1. */
static int32_t special_at(const struct vocab *v, const char *text, size_t q, size_t b, int pass) {
    unsigned char first = (unsigned char)text[q];
    for (int32_t k = v->special_start[first]; k < v->special_start[first + 1]; k++) {
        int32_t id = v->special[k];
        const struct vocab_entry *e = &v->tok[id];
        bool normalized = v->flags && (v->flags[id] & ADDED_NORMALIZED);
        if ((int)normalized != pass || e->piece_len > b - q) continue;
        if (memcmp(text + q, e->piece, e->piece_len) == 0) return id;
    }
    return -1;
}

/* One pass of Hugging Face's added-token matching over the plain text
 * text[a..b) (HF's find_matches): the leftmost-longest occurrences of the
 * pass's tokens, left to right without overlap. An occurrence is dropped,
 * its text staying plain, if the token is disabled (a control or unknown
 * token without parse_special) or single_word and a word character
 * touches it; lstrip and rstrip widen it over the whitespace next to it
 * (not over an earlier token's). The scan goes on after the widened end
 * (HF after the token itself: they differ only for a token that starts
 * with whitespace right after an rstrip token). */
static void mark_run(const struct vocab *v, const char *text, size_t a, size_t b,
                     bool parse_special, int pass, int32_t *mark) {
    size_t taken = a; /* end of the last token placed */
    for (size_t q = a; q < b;) {
        int32_t id = special_at(v, text, q, b, pass);
        if (id < 0) {
            q++;
            continue;
        }
        const struct vocab_entry *e = &v->tok[id];
        size_t start = q, stop = q + e->piece_len, len;
        unsigned fl = v->flags ? v->flags[id] : 0;
        q = stop;
        if (!parse_special && e->type != VOCAB_TOKEN_USER_DEFINED) continue;
        if (fl & ADDED_SINGLE_WORD) {
            uint32_t before = ' ', after = ' ';
            if (start > a) char_before(text, a, start, &before);
            if (stop < b) unicode_decode((const unsigned char *)text + stop, b - stop, &after);
            if (char_is_word(before) || char_is_word(after)) continue;
        }
        if (fl & ADDED_LSTRIP)
            for (size_t p; start > taken && space_before(text, taken, start, &p);) start = p;
        if (fl & ADDED_RSTRIP)
            while (stop < b && space_at(text, stop, b, &len)) stop += len;
        mark[start] = id;
        for (size_t j = start + 1; j < stop; j++) mark[j] = -2;
        taken = q = stop;
    }
}

/* mark[i] = token id where a matched special token starts, -2 inside one
 * (with the whitespace lstrip/rstrip took), -1 for plain text. As HF does:
 * first the tokens that are not "normalized" over the whole text, then the
 * normalized ones over each run of text the first pass left. (HF matches
 * normalized tokens against normalized text; the tokenizers we convert
 * normalize nothing, so the text is the same.) */
static void mark_specials(const struct vocab *v, const char *text, size_t n, bool parse_special,
                          int32_t *mark) {
    for (size_t i = 0; i < n; i++) mark[i] = -1;
    mark_run(v, text, 0, n, parse_special, 0, mark);
    if (!v->flags) return;
    for (size_t i = 0; i < n;) {
        if (mark[i] != -1) {
            i++;
            continue;
        }
        size_t end = i;
        while (end < n && mark[end] == -1) end++;
        mark_run(v, text, i, end, parse_special, 1, mark);
        i = end;
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
            bool ok = v->bpe ? tokenize_fragment_bpe(v, w, text + start, i - start, out)
                             : tokenize_fragment(v, w, text + start, i - start,
                                                 v->add_space_prefix && after_special, out);
            if (!ok) return false;
            after_special = false;
        }
        if (i == n) break;
        sink_push(out, w->mark[i]);
        after_special = true;
        for (i++; i < n && w->mark[i] == -2;) i++;
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
        if (!work_init(&w, (size_t)text_len, marks, v->bpe)) {
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
    if (lstrip && v->add_space_prefix && n > 0 && s[0] == ' ') {
        s++;
        n--;
    }
    if (n > buf_size) return -n;
    if (n) memcpy(buf, s, (size_t)n);
    return n;
}
