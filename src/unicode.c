/*
 * unicode.c - UTF-8 decoding and the pre-tokenizers of byte-level BPE
 * vocabularies (see unicode.h).
 *
 * Each pre-tokenizer is a hand-written matcher equivalent to a regular
 * expression of the Hugging Face pipeline it stands for. A matcher returns
 * where the match starting at character i ends, within [i, end): every
 * pattern here matches at every position, so a text is cut into words by
 * matching again where the last match ended. The regexes, with \s, \p{L},
 * \p{N} as in Oniguruma (which HF tokenizers uses):
 *
 *   GPT-2 (ByteLevel use_regex):
 *     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *   Llama 3 (qwen2: \p{N} instead of \p{N}{1,3}):
 *     (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
 *      ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 *   smollm, starcoder: Digits(individual_digits) - every \p{N} character is
 *     a word of its own - then the GPT-2 regex on the text between them.
 *   falcon: Punctuation(contiguous) - runs of \p{P} or ASCII punctuation are
 *     words - then the GPT-2 regex, then on the byte-mapped text
 *     Digits(contiguous) and the regex [0-9][0-9][0-9] (isolated). After
 *     the byte mapping the numeric characters are the digits and the bytes
 *     B2 B3 B9 BC BD BE (they map to the Latin-1 characters ² ³ ¹ ¼ ½ ¾),
 *     so those last two steps cut by bytes.
 * A regex lookahead or end ($) sees the end of the piece a previous step
 * cut, as in HF, where each step runs on the pieces of the one before.
 */
#include "unicode.h"

#include <string.h>

/* ---- decoding ------------------------------------------------------------ */

size_t unicode_decode(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned c = s[0];
    size_t len = c < 0x80 ? 1 : c < 0xC2 ? 0 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : c < 0xF5 ? 4 : 0;
    *cp = UNICODE_REPLACEMENT;
    if (len == 1) *cp = c;
    if (len <= 1 || len > n) return 1;
    for (size_t i = 1; i < len; i++)
        if ((s[i] & 0xC0) != 0x80) return 1;
    if ((c == 0xE0 && s[1] < 0xA0) || (c == 0xED && s[1] > 0x9F) ||
        (c == 0xF0 && s[1] < 0x90) || (c == 0xF4 && s[1] > 0x8F))
        return 1;
    uint32_t v = c & (0xFFu >> (len + 1));
    for (size_t i = 1; i < len; i++) v = v << 6 | (s[i] & 0x3F);
    *cp = v;
    return len;
}

void unicode_chars_decode(struct unicode_chars *c, const char *s, size_t n) {
    size_t k = 0;
    for (size_t off = 0; off < n; k++) {
        uint32_t cp;
        size_t len = unicode_decode((const unsigned char *)s + off, n - off, &cp);
        c->cp[k] = cp;
        c->flags[k] = (uint8_t)unicode_flags(cp);
        c->off[k] = (uint32_t)off;
        off += len;
    }
    c->off[k] = (uint32_t)n;
    c->n = k;
}

/* ---- names ----------------------------------------------------------------- */

bool unicode_pre_from_name(const char *name, size_t len, enum unicode_pre *out) {
    static const struct {
        const char *name;
        enum unicode_pre pre;
    } names[] = {
        {"gpt2", UNICODE_PRE_GPT2},          {"default", UNICODE_PRE_GPT2},
        {"llama-bpe", UNICODE_PRE_LLAMA3},   {"llama3", UNICODE_PRE_LLAMA3},
        {"qwen2", UNICODE_PRE_QWEN2},        {"smollm", UNICODE_PRE_DIGITS_GPT2},
        {"starcoder", UNICODE_PRE_DIGITS_GPT2}, {"falcon", UNICODE_PRE_FALCON},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (strlen(names[i].name) == len && memcmp(names[i].name, name, len) == 0) {
            *out = names[i].pre;
            return true;
        }
    return false;
}

/* ---- matchers ----------------------------------------------------------------- */

#define CP_IS(c, i, ch) ((c)->cp[i] == (uint32_t)(ch))

static bool flags_other(unsigned f) {
    return !(f & (UNICODE_LETTER | UNICODE_NUMBER | UNICODE_SPACE));
}

/* End of the run of characters from i on that have one of the flags. */
static size_t run_flags(const struct unicode_chars *c, size_t i, size_t end, unsigned f) {
    while (i < end && (c->flags[i] & f)) i++;
    return i;
}

/* End of the run of [^\s\p{L}\p{N}] characters from i on. */
static size_t run_other(const struct unicode_chars *c, size_t i, size_t end) {
    while (i < end && flags_other(c->flags[i])) i++;
    return i;
}

/* Lower-case ASCII letter of a contraction, folding case if fold (under
 * Oniguruma's case folding U+017F LATIN SMALL LETTER LONG S is an 's'). */
static uint32_t fold_letter(uint32_t cp, bool fold) {
    if (!fold) return cp;
    if (cp >= 'A' && cp <= 'Z') return cp + 32;
    return cp == 0x17F ? 's' : cp;
}

/* Length of 's 't 're 've 'm 'll 'd at i (c->cp[i] is '\''), 0 if none. */
static size_t match_contraction(const struct unicode_chars *c, size_t i, size_t end, bool fold) {
    if (i + 1 >= end) return 0;
    uint32_t a = fold_letter(c->cp[i + 1], fold);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if (i + 2 >= end) return 0;
    uint32_t b = fold_letter(c->cp[i + 2], fold);
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    return 0;
}

/* \s+(?!\S)|\s+ at i (a whitespace character). */
static size_t match_space_run(const struct unicode_chars *c, size_t i, size_t end) {
    size_t k = run_flags(c, i, end, UNICODE_SPACE);
    if (k == end || k - i == 1) return k;
    return k - 1; /* leave the last space to the word that follows */
}

static size_t match_gpt2(const struct unicode_chars *c, size_t i, size_t end) {
    if (CP_IS(c, i, '\'')) {
        size_t k = match_contraction(c, i, end, false);
        if (k) return i + k;
    }
    size_t j = CP_IS(c, i, ' ') && i + 1 < end ? i + 1 : i;
    unsigned f = c->flags[j];
    if (f & UNICODE_LETTER) return run_flags(c, j, end, UNICODE_LETTER);
    if (f & UNICODE_NUMBER) return run_flags(c, j, end, UNICODE_NUMBER);
    if (flags_other(f)) return run_other(c, j, end);
    return match_space_run(c, i, end);
}

static bool cp_is_newline(uint32_t cp) { return cp == '\r' || cp == '\n'; }

static size_t match_llama3(const struct unicode_chars *c, size_t i, size_t end,
                           size_t max_digits) {
    if (CP_IS(c, i, '\'')) {
        size_t k = match_contraction(c, i, end, true);
        if (k) return i + k;
    }
    unsigned f = c->flags[i];
    /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    if (f & UNICODE_LETTER) return run_flags(c, i, end, UNICODE_LETTER);
    if (!cp_is_newline(c->cp[i]) && !(f & UNICODE_NUMBER) && i + 1 < end &&
        (c->flags[i + 1] & UNICODE_LETTER))
        return run_flags(c, i + 1, end, UNICODE_LETTER);
    /* \p{N}{1,max} */
    if (f & UNICODE_NUMBER) {
        size_t k = i + 1;
        while (k < end && k - i < max_digits && (c->flags[k] & UNICODE_NUMBER)) k++;
        return k;
    }
    /*  ?[^\s\p{L}\p{N}]+[\r\n]* */
    size_t j = CP_IS(c, i, ' ') && i + 1 < end ? i + 1 : i;
    if (flags_other(c->flags[j])) {
        size_t k = run_other(c, j, end);
        while (k < end && cp_is_newline(c->cp[k])) k++;
        return k;
    }
    /* \s*[\r\n]+ : up to the last newline of the whitespace run */
    size_t k = run_flags(c, i, end, UNICODE_SPACE), last = k;
    for (size_t p = i; p < k; p++)
        if (cp_is_newline(c->cp[p])) last = p;
    if (last < k) return last + 1;
    return match_space_run(c, i, end);
}

/* ---- splitting ------------------------------------------------------------------ */

/* Words of c[start, end) under a whole-text matcher, appended to ends. */
static size_t split_range(enum unicode_pre pre, const struct unicode_chars *c, size_t start,
                          size_t end, uint32_t *ends, size_t n_ends) {
    for (size_t i = start; i < end;) {
        size_t k = pre == UNICODE_PRE_LLAMA3  ? match_llama3(c, i, end, 3)
                   : pre == UNICODE_PRE_QWEN2 ? match_llama3(c, i, end, 1)
                                              : match_gpt2(c, i, end);
        ends[n_ends++] = c->off[k];
        i = k;
    }
    return n_ends;
}

/* A character Hugging Face's Punctuation pre-tokenizer splits on: Unicode
 * punctuation or ASCII punctuation (which includes the symbols $+<=>^`|~). */
static bool char_is_punct(const struct unicode_chars *c, size_t i) {
    return (c->flags[i] & UNICODE_PUNCT) || (c->cp[i] < 0x80 && (c->flags[i] & UNICODE_SYMBOL));
}

/* Isolate the numeric characters one by one (punct false), or the runs of
 * punctuation (punct true), and run the GPT-2 matcher on the text between. */
static size_t split_isolate_gpt2(const struct unicode_chars *c, uint32_t *ends, bool punct) {
    size_t n_ends = 0;
    for (size_t i = 0; i < c->n;) {
        bool hit = punct ? char_is_punct(c, i) : (c->flags[i] & UNICODE_NUMBER) != 0;
        size_t k = i + 1;
        if (hit) {
            while (punct && k < c->n && char_is_punct(c, k)) k++;
            ends[n_ends++] = c->off[k];
        } else {
            while (k < c->n && !(punct ? char_is_punct(c, k) : (c->flags[k] & UNICODE_NUMBER)))
                k++;
            n_ends = split_range(UNICODE_PRE_GPT2, c, i, k, ends, n_ends);
        }
        i = k;
    }
    return n_ends;
}

/* A byte whose byte-level character is numeric: 0-9, ² ³ ¹ ¼ ½ ¾. */
static bool byte_is_numeric(unsigned char b) {
    return (b >= '0' && b <= '9') || b == 0xB2 || b == 0xB3 || b == 0xB9 || b == 0xBC ||
           b == 0xBD || b == 0xBE;
}

/* Falcon's steps after the byte mapping, on the words in ends[0..n):
 * runs of numeric bytes become words, and inside them [0-9]{3}. */
static size_t split_falcon_digits(const char *s, uint32_t *ends, size_t n, uint32_t *tmp) {
    memcpy(tmp, ends, n * sizeof(*tmp));
    size_t m = 0;
    for (size_t w = 0, start = 0; w < n; start = tmp[w++]) {
        const unsigned char *b = (const unsigned char *)s;
        for (size_t i = start; i < tmp[w];) {
            bool num = byte_is_numeric(b[i]);
            size_t k = i + 1;
            while (k < tmp[w] && byte_is_numeric(b[k]) == num) k++;
            if (!num) {
                ends[m++] = (uint32_t)k;
            } else { /* [0-9][0-9][0-9] isolated, left to right */
                size_t p = i, gap = i;
                while (p + 3 <= k) {
                    bool three = true;
                    for (size_t q = p; q < p + 3; q++) three &= b[q] >= '0' && b[q] <= '9';
                    if (!three) {
                        p++;
                        continue;
                    }
                    if (p > gap) ends[m++] = (uint32_t)p;
                    ends[m++] = (uint32_t)(p + 3);
                    p += 3;
                    gap = p;
                }
                if (k > gap) ends[m++] = (uint32_t)k;
            }
            i = k;
        }
    }
    return m;
}

size_t unicode_pre_split(enum unicode_pre pre, const struct unicode_chars *c, const char *s,
                         uint32_t *ends, uint32_t *scratch) {
    switch (pre) {
    case UNICODE_PRE_DIGITS_GPT2: return split_isolate_gpt2(c, ends, false);
    case UNICODE_PRE_FALCON: {
        size_t n = split_isolate_gpt2(c, ends, true);
        return split_falcon_digits(s, ends, n, scratch);
    }
    default: return split_range(pre, c, 0, c->n, ends, 0);
    }
}
