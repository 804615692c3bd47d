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
 *   deepseek-llm (DeepSeek LLM 7B/67B's tokenizer.json): a Sequence of
 *     isolating Splits, each on the pieces the step before left, then
 *     Digits(individual_digits):
 *       [\r\n]
 *       \s?[A-Za-z and 85 more ranges of cased letters: deepseek_letters]+
 *       \s?[!-/:-~ U+FF01-FF0F U+FF1A-FF5E U+2018-201F U+3000-3002]+
 *       \s+$
 *       [U+4E00-9FA5 U+0800-4E00 U+AC00-D7FF]+
 *     The letter class holds ASCII letters, so the third step keeps " word"
 *     whole but cuts " café" into " caf" and "é". Pieces hold no '\n' but
 *     as a piece of its own, so the $ of the fourth is the piece's end.
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
        {"deepseek-llm", UNICODE_PRE_DEEPSEEK_LLM},
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

/* ---- DeepSeek LLM: a sequence of isolating splits ------------------------------ */

struct cp_range {
    uint32_t lo, hi;
};

/* The letter class of DeepSeek LLM's second Split, sorted. */
static const struct cp_range deepseek_letters[] = {
    {0x41, 0x5A},       {0x61, 0x7A},       {0xB5, 0xB5},       {0xC0, 0xD6},
    {0xD8, 0xF6},       {0xF8, 0x1BA},      {0x1BC, 0x1BF},     {0x1C4, 0x293},
    {0x295, 0x2AF},     {0x370, 0x373},     {0x376, 0x377},     {0x37B, 0x37D},
    {0x37F, 0x37F},     {0x386, 0x386},     {0x388, 0x38A},     {0x38C, 0x38C},
    {0x38E, 0x3A1},     {0x3A3, 0x3F5},     {0x3F7, 0x481},     {0x48A, 0x52F},
    {0x531, 0x556},     {0x10A0, 0x10C5},   {0x13A0, 0x13F5},   {0x13F8, 0x13FD},
    {0x1C90, 0x1CBA},   {0x1CBD, 0x1CBF},   {0x1D00, 0x1D2B},   {0x1D6B, 0x1D77},
    {0x1D79, 0x1D9A},   {0x1E00, 0x1F15},   {0x1F18, 0x1F1D},   {0x1F20, 0x1F45},
    {0x1F48, 0x1F4D},   {0x1F50, 0x1F57},   {0x1F59, 0x1F59},   {0x1F5B, 0x1F5B},
    {0x1F5D, 0x1F5D},   {0x1F5F, 0x1F7D},   {0x1F80, 0x1FB4},   {0x1FB6, 0x1FBC},
    {0x1FBE, 0x1FBE},   {0x1FC2, 0x1FC4},   {0x1FC6, 0x1FCC},   {0x1FD0, 0x1FD3},
    {0x1FD6, 0x1FDB},   {0x1FE0, 0x1FEC},   {0x1FF2, 0x1FF4},   {0x1FF6, 0x1FFC},
    {0x2102, 0x2102},   {0x2107, 0x2107},   {0x210A, 0x2113},   {0x2115, 0x2115},
    {0x2119, 0x211D},   {0x2124, 0x2124},   {0x2126, 0x2126},   {0x2128, 0x2128},
    {0x212A, 0x212D},   {0x212F, 0x2134},   {0x2139, 0x2139},   {0x213C, 0x213F},
    {0x2145, 0x2149},   {0x214E, 0x214E},   {0x2183, 0x2184},   {0x2C00, 0x2C7B},
    {0x2C7E, 0x2CE4},   {0x2CEB, 0x2CEE},   {0x2CF2, 0x2CF3},   {0xA640, 0xA66D},
    {0xA680, 0xA69B},   {0xA722, 0xA76F},   {0xA771, 0xA787},   {0xA78B, 0xA78E},
    {0xAB70, 0xABBF},   {0xFB00, 0xFB06},   {0xFB13, 0xFB17},   {0xFF21, 0xFF3A},
    {0xFF41, 0xFF5A},   {0x10400, 0x1044F}, {0x104B0, 0x104D3}, {0x104D8, 0x104FB},
    {0x10C80, 0x10CB2}, {0x10CC0, 0x10CF2}, {0x118A0, 0x118DF}, {0x1E900, 0x1E943},
};

/* The punctuation class of the third Split (it holds the ASCII letters
 * too: :-~ spans them) and the CJK/Hangul class of the fifth. */
static const struct cp_range deepseek_punct[] = {
    {0x21, 0x2F}, {0x3A, 0x7E}, {0x2018, 0x201F}, {0x3000, 0x3002}, {0xFF01, 0xFF0F},
    {0xFF1A, 0xFF5E},
};
static const struct cp_range deepseek_cjk[] = {{0x800, 0x9FA5}, {0xAC00, 0xD7FF}};

#define N_RANGES(r) (sizeof(r) / sizeof((r)[0]))

static bool in_ranges(const struct cp_range *r, size_t n, uint32_t cp) {
    size_t lo = 0, hi = n; /* binary search for the last range with r.lo <= cp */
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        if (r[mid].lo <= cp) lo = mid;
        else hi = mid;
    }
    return n && cp >= r[lo].lo && cp <= r[lo].hi;
}

enum deepseek_step { DS_NEWLINE, DS_LETTERS, DS_PUNCT, DS_TRAILING_SPACE, DS_CJK, DS_DIGIT };

static bool ds_in(enum deepseek_step step, uint32_t cp) {
    switch (step) {
    case DS_LETTERS: return in_ranges(deepseek_letters, N_RANGES(deepseek_letters), cp);
    case DS_PUNCT: return in_ranges(deepseek_punct, N_RANGES(deepseek_punct), cp);
    default: return in_ranges(deepseek_cjk, N_RANGES(deepseek_cjk), cp);
    }
}

/* The leftmost match of step's regex in the piece's characters [p, b):
 * its start (b if none) and end (*me). */
static size_t ds_find(const struct unicode_chars *c, enum deepseek_step step, size_t p, size_t b,
                      size_t *me) {
    if (step == DS_TRAILING_SPACE) { /* \s+$ : the piece's trailing whitespace */
        size_t q = b;
        while (q > p && (c->flags[q - 1] & UNICODE_SPACE)) q--;
        *me = b;
        return q;
    }
    for (size_t q = p; q < b; q++) {
        if (step == DS_NEWLINE || step == DS_DIGIT) {
            bool hit = step == DS_NEWLINE ? cp_is_newline(c->cp[q]) : (c->flags[q] & UNICODE_NUMBER);
            if (!hit) continue;
            *me = q + 1;
            return q;
        }
        /* \s?[class]+ (CJK: [class]+): a space then a class character, or
         * a class character (U+3000 is both; either way the run from q) */
        size_t k = q;
        if (step != DS_CJK && (c->flags[q] & UNICODE_SPACE) && q + 1 < b && ds_in(step, c->cp[q + 1]))
            k = q + 1;
        else if (!ds_in(step, c->cp[q]))
            continue;
        while (k < b && ds_in(step, c->cp[k])) k++;
        *me = k;
        return q;
    }
    *me = b;
    return b;
}

/* Cut each piece of in[0..n_in) (ends, in characters) at the matches of
 * step, isolating them; the pieces go to out. */
static size_t ds_split(const struct unicode_chars *c, enum deepseek_step step, const uint32_t *in,
                       size_t n_in, uint32_t *out) {
    size_t m = 0;
    for (size_t w = 0, a = 0; w < n_in; a = in[w++]) {
        for (size_t p = a, b = in[w]; p < b;) {
            size_t me, ms = ds_find(c, step, p, b, &me);
            if (ms > p) out[m++] = (uint32_t)ms;
            if (ms == b) break;
            out[m++] = (uint32_t)me;
            p = me;
        }
    }
    return m;
}

/* The six steps, alternating between ends and scratch so that the last
 * writes ends; then character indices become byte offsets. */
static size_t split_deepseek_llm(const struct unicode_chars *c, uint32_t *ends, uint32_t *scratch) {
    static const enum deepseek_step steps[] = {DS_NEWLINE,        DS_LETTERS, DS_PUNCT,
                                               DS_TRAILING_SPACE, DS_CJK,     DS_DIGIT};
    uint32_t *buf[2] = {ends, scratch};
    size_t n = 1;
    ends[0] = (uint32_t)c->n;
    for (size_t s = 0; s < N_RANGES(steps); s++)
        n = ds_split(c, steps[s], buf[s % 2], n, buf[(s + 1) % 2]);
    /* an even number of steps: the result is in ends */
    for (size_t i = 0; i < n; i++) ends[i] = c->off[ends[i]];
    return n;
}

size_t unicode_pre_split(enum unicode_pre pre, const struct unicode_chars *c, const char *s,
                         uint32_t *ends, uint32_t *scratch) {
    switch (pre) {
    case UNICODE_PRE_DIGITS_GPT2: return split_isolate_gpt2(c, ends, false);
    case UNICODE_PRE_DEEPSEEK_LLM: return split_deepseek_llm(c, ends, scratch);
    case UNICODE_PRE_FALCON: {
        size_t n = split_isolate_gpt2(c, ends, true);
        return split_falcon_digits(s, ends, n, scratch);
    }
    default: return split_range(pre, c, 0, c->n, ends, 0);
    }
}
