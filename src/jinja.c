/*
 * jinja.c - a Jinja2-subset interpreter for chat templates.
 *
 * Language: text, {{ expr }}, {# comments #}, {% if/elif/else/endif %},
 * {% for x in xs [if cond] %}...{% else %}...{% endfor %} (also
 * "for k, v in d.items()"; loop.index, index0, revindex, revindex0, first,
 * last, length, previtem, nextitem), {% break %}, {% continue %},
 * {% set x = e %}, {% set ns.attr = e %}, {% set x %}...{% endset %},
 * {% generation %}...{% endgeneration %} (transformers' extension: renders
 * its body), whitespace control ({%- -%} {{- -}} {%+), trim_blocks and
 * lstrip_blocks on (as transformers configures Jinja), one trailing newline
 * of the template dropped (Jinja's keep_trailing_newline=False).
 * Expressions: string/int/bool/none literals, lists, tuples, dicts, names,
 * .attr, [index], [a:b:c] slices, calls with keyword arguments, filters,
 * "is [not] test", comparisons, in / not in, and/or/not, + - * // % on
 * ints, + and * on strings and lists, ~, inline if/else.
 * Not supported (a clear error naming the construct and line:col): floats
 * and "/", macros, call/filter blocks, include/import/extends, raw.
 * Strings are UTF-8; length, indexing and slicing count code points; upper,
 * lower, title and capitalize change ASCII letters only.
 *
 * Implementation: source -> tokens (lexer, whitespace control applied) ->
 * AST (recursive descent with Jinja's operator precedence) -> tree-walking
 * evaluator. Everything a render allocates (tokens, nodes, values, output)
 * comes from one arena freed at the end, and errors unwind with longjmp to
 * jinja_render, so an error path cannot leak. Steps, memory, output and
 * depth are counted against struct jinja_limits.
 */
#define _POSIX_C_SOURCE 200809L
#include "jinja.h"

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- arena and errors ------------------------------------------------------ */

struct arena_block {
    struct arena_block *next;
    size_t used, cap;
    _Alignas(16) unsigned char data[];
};

struct value;
struct scope;

struct jinja {
    struct arena_block *blocks;
    size_t mem_used;
    uint64_t steps;
    struct jinja_limits lim;
    jmp_buf fail;
    optiml_status status;
    char msg[400];
    /* evaluation state */
    struct scope *scope;
    struct sbuf *out;
    int depth;
};

static _Noreturn void jfail(struct jinja *J, optiml_status st, int line, int col, const char *fmt, ...)
    OPTIML_PRINTF(5, 6);

static _Noreturn void jfail(struct jinja *J, optiml_status st, int line, int col, const char *fmt, ...) {
    char what[320];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    if (line > 0) snprintf(J->msg, sizeof(J->msg), "chat template line %d:%d: %s", line, col, what);
    else snprintf(J->msg, sizeof(J->msg), "chat template: %s", what);
    J->status = st;
    longjmp(J->fail, 1);
}

static void *jalloc(struct jinja *J, size_t size) {
    size = (size + 15) & ~(size_t)15;
    if (size > J->lim.max_memory || J->mem_used + size > J->lim.max_memory)
        jfail(J, OPTIML_ERR_INVALID_ARG, 0, 0, "rendering needs more than %zu bytes of memory", J->lim.max_memory);
    struct arena_block *b = J->blocks;
    if (!b || b->cap - b->used < size) {
        size_t cap = size > 65536 ? size : 65536;
        b = malloc(sizeof(*b) + cap);
        if (!b) jfail(J, OPTIML_ERR_NOMEM, 0, 0, "out of memory");
        b->cap = cap;
        b->used = 0;
        b->next = J->blocks;
        J->blocks = b;
    }
    void *p = b->data + b->used;
    b->used += size;
    J->mem_used += size;
    return p;
}

static void jsteps(struct jinja *J, uint64_t n, int line, int col) {
    J->steps += n;
    if (J->steps > J->lim.max_steps)
        jfail(J, OPTIML_ERR_INVALID_ARG, line, col, "rendering takes more than %llu steps",
              (unsigned long long)J->lim.max_steps);
}

/* Growable byte buffer in the arena (old storage is abandoned on growth). */
struct sbuf {
    char *p;
    size_t n, cap;
};

static void sb_put(struct jinja *J, struct sbuf *b, const char *s, size_t n) {
    if (n == 0) return;
    if (n > J->lim.max_output || b->n + n > J->lim.max_output)
        jfail(J, OPTIML_ERR_INVALID_ARG, 0, 0, "a string or the output exceeds %zu bytes", J->lim.max_output);
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 64;
        while (cap < b->n + n) cap *= 2;
        char *p = jalloc(J, cap);
        if (b->n) memcpy(p, b->p, b->n);
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}

static void sb_puts(struct jinja *J, struct sbuf *b, const char *s) { sb_put(J, b, s, strlen(s)); }

static void sb_putc(struct jinja *J, struct sbuf *b, char c) { sb_put(J, b, &c, 1); }

/* ---- values ------------------------------------------------------------------ */

enum vkind { V_UNDEF, V_NONE, V_BOOL, V_INT, V_STR, V_LIST, V_DICT, V_FUNC };

enum jfunc { F_RAISE, F_NAMESPACE, F_RANGE, F_DICT, F_STRFTIME };

struct list {
    struct value *items;
    size_t n, cap;
};

struct dict {
    struct value *keys; /* strings */
    struct value *vals;
    size_t n, cap;
    bool is_ns; /* namespace(): the only mutable object */
};

struct value {
    enum vkind k;
    union {
        bool b;
        int64_t i;
        struct {
            const char *s;
            size_t n;
        } str;
        struct list *list;
        struct dict *dict;
        enum jfunc fn;
    } u;
};

static const struct value v_undef = {.k = V_UNDEF};
static const struct value v_none = {.k = V_NONE};

static struct value v_bool(bool b) { return (struct value){.k = V_BOOL, .u.b = b}; }
static struct value v_int(int64_t i) { return (struct value){.k = V_INT, .u.i = i}; }
static struct value v_str(const char *s, size_t n) {
    return (struct value){.k = V_STR, .u.str = {s, n}};
}

static struct value v_strdup(struct jinja *J, const char *s, size_t n) {
    char *p = jalloc(J, n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return v_str(p, n);
}

static struct value v_sbuf(struct sbuf *b) { return v_str(b->p ? b->p : "", b->n); }

static struct list *list_new(struct jinja *J, size_t cap) {
    struct list *l = jalloc(J, sizeof(*l));
    l->n = 0;
    l->cap = cap ? cap : 4;
    l->items = jalloc(J, l->cap * sizeof(struct value));
    return l;
}

static void list_push(struct jinja *J, struct list *l, struct value v) {
    if (l->n == l->cap) {
        struct value *items = jalloc(J, 2 * l->cap * sizeof(struct value));
        memcpy(items, l->items, l->n * sizeof(struct value));
        l->items = items;
        l->cap *= 2;
    }
    l->items[l->n++] = v;
}

static struct value v_list(struct list *l) { return (struct value){.k = V_LIST, .u.list = l}; }

static struct dict *dict_new(struct jinja *J, size_t cap) {
    struct dict *d = jalloc(J, sizeof(*d));
    d->n = 0;
    d->cap = cap ? cap : 4;
    d->is_ns = false;
    d->keys = jalloc(J, d->cap * sizeof(struct value));
    d->vals = jalloc(J, d->cap * sizeof(struct value));
    return d;
}

static struct value v_dict(struct dict *d) { return (struct value){.k = V_DICT, .u.dict = d}; }

static bool str_eq(struct value a, const char *s, size_t n) {
    return a.k == V_STR && a.u.str.n == n && (n == 0 || memcmp(a.u.str.s, s, n) == 0);
}

static struct value *dict_find(const struct dict *d, const char *key, size_t n) {
    for (size_t i = 0; i < d->n; i++)
        if (str_eq(d->keys[i], key, n)) return &d->vals[i];
    return NULL;
}

static void dict_set(struct jinja *J, struct dict *d, struct value key, struct value v) {
    struct value *slot = dict_find(d, key.u.str.s, key.u.str.n);
    if (slot) {
        *slot = v;
        return;
    }
    if (d->n == d->cap) {
        struct value *k = jalloc(J, 2 * d->cap * sizeof(struct value));
        struct value *vv = jalloc(J, 2 * d->cap * sizeof(struct value));
        memcpy(k, d->keys, d->n * sizeof(struct value));
        memcpy(vv, d->vals, d->n * sizeof(struct value));
        d->keys = k;
        d->vals = vv;
        d->cap *= 2;
    }
    d->keys[d->n] = key;
    d->vals[d->n++] = v;
}

static void dict_set_c(struct jinja *J, struct dict *d, const char *key, struct value v) {
    dict_set(J, d, v_str(key, strlen(key)), v);
}

static const char *kind_name(enum vkind k) {
    static const char *const names[] = {"undefined", "none", "bool", "int", "string", "list", "dict", "function"};
    return names[k];
}

/* ---- UTF-8 helpers -------------------------------------------------------------- */

/* Length of the code point starting at s[0] (invalid bytes count as one). */
static size_t u8_len(const char *s, size_t n) {
    unsigned char c = (unsigned char)s[0];
    size_t l = c < 0x80 ? 1 : (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3 : (c & 0xf8) == 0xf0 ? 4 : 1;
    if (l > n) return 1;
    for (size_t i = 1; i < l; i++)
        if (((unsigned char)s[i] & 0xc0) != 0x80) return 1;
    return l;
}

static uint32_t u8_decode(const char *s, size_t l) {
    const unsigned char *u = (const unsigned char *)s;
    if (l == 1) return u[0];
    if (l == 2) return ((uint32_t)(u[0] & 0x1f) << 6) | (u[1] & 0x3f);
    if (l == 3) return ((uint32_t)(u[0] & 0x0f) << 12) | ((uint32_t)(u[1] & 0x3f) << 6) | (u[2] & 0x3f);
    return ((uint32_t)(u[0] & 0x07) << 18) | ((uint32_t)(u[1] & 0x3f) << 12) | ((uint32_t)(u[2] & 0x3f) << 6) |
           (u[3] & 0x3f);
}

static size_t u8_encode(uint32_t cp, char *out) {
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) { out[0] = (char)(0xc0 | (cp >> 6)); out[1] = (char)(0x80 | (cp & 0x3f)); return 2; }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* Python's str.isspace(). */
static bool py_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f ||
           c == 0x3000;
}

static size_t u8_count(const char *s, size_t n) {
    size_t c = 0;
    for (size_t i = 0; i < n; i += u8_len(s + i, n - i)) c++;
    return c;
}

/* Byte offsets of the code points of s (n_cp + 1 entries, the last = n). */
static size_t *u8_offsets(struct jinja *J, const char *s, size_t n, size_t *n_cp) {
    size_t c = u8_count(s, n), k = 0;
    size_t *off = jalloc(J, (c + 1) * sizeof(size_t));
    for (size_t i = 0; i < n; i += u8_len(s + i, n - i)) off[k++] = i;
    off[k] = n;
    *n_cp = c;
    return off;
}

/* ---- lexer ------------------------------------------------------------------------- */

enum tok_kind {
    T_EOF, T_TEXT, T_VAR_BEGIN, T_VAR_END, T_BLOCK_BEGIN, T_BLOCK_END,
    T_NAME, T_STRING, T_INT, T_OP,
};

struct token {
    enum tok_kind k;
    int line, col;
    const char *s; /* text, name, decoded string, or operator */
    size_t n;
    int64_t i;
};

struct lexer {
    struct jinja *J;
    const char *src;
    size_t n, pos;
    struct token *toks;
    size_t n_toks, cap;
    size_t line_start; /* offset of the current line's start */
    size_t scanned;    /* lex_where has counted newlines up to here */
    int line;
};

static void lex_where(struct lexer *L, size_t pos, int *line, int *col) {
    /* advance the line counter up to pos (positions only grow) */
    for (size_t i = L->scanned; i < pos; i++)
        if (L->src[i] == '\n') {
            L->line++;
            L->line_start = i + 1;
        }
    if (pos > L->scanned) L->scanned = pos;
    *line = L->line;
    *col = pos >= L->line_start ? (int)(pos - L->line_start) + 1 : 1;
}

static struct token *lex_push(struct lexer *L, enum tok_kind k, size_t pos, const char *s, size_t n) {
    if (L->n_toks == L->cap) {
        size_t cap = L->cap ? 2 * L->cap : 256;
        struct token *t = jalloc(L->J, cap * sizeof(*t));
        if (L->n_toks) memcpy(t, L->toks, L->n_toks * sizeof(*t));
        L->toks = t;
        L->cap = cap;
    }
    struct token *t = &L->toks[L->n_toks++];
    *t = (struct token){.k = k, .s = s, .n = n};
    lex_where(L, pos, &t->line, &t->col);
    return t;
}

static bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
static bool is_name0(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
static bool is_digit(char c) { return c >= '0' && c <= '9'; }

static _Noreturn void lex_fail(struct lexer *L, size_t pos, optiml_status st, const char *what) {
    int line, col;
    lex_where(L, pos, &line, &col);
    jfail(L->J, st, line, col, "%s", what);
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* A quoted literal at L->pos; escapes as Python's unicode-escape decodes them. */
static void lex_string(struct lexer *L) {
    const char *s = L->src;
    size_t start = L->pos, i = L->pos + 1;
    char q = s[start];
    struct sbuf b = {0};
    for (;;) {
        if (i >= L->n) lex_fail(L, start, OPTIML_ERR_FORMAT, "unterminated string literal");
        char c = s[i];
        if (c == q) break;
        if (c != '\\') {
            sb_putc(L->J, &b, c);
            i++;
            continue;
        }
        if (i + 1 >= L->n) lex_fail(L, start, OPTIML_ERR_FORMAT, "unterminated string literal");
        char e = s[i + 1];
        i += 2;
        if (e == '\n') continue; /* line continuation */
        char simple = 0;
        switch (e) {
        case 'n': simple = '\n'; break;
        case 't': simple = '\t'; break;
        case 'r': simple = '\r'; break;
        case '\\': simple = '\\'; break;
        case '\'': simple = '\''; break;
        case '"': simple = '"'; break;
        case 'a': simple = '\a'; break;
        case 'b': simple = '\b'; break;
        case 'f': simple = '\f'; break;
        case 'v': simple = '\v'; break;
        default: break;
        }
        if (simple) {
            sb_putc(L->J, &b, simple);
            continue;
        }
        int nhex = e == 'x' ? 2 : e == 'u' ? 4 : e == 'U' ? 8 : 0;
        if (nhex) {
            uint32_t cp = 0;
            for (int k = 0; k < nhex; k++) {
                int h = i + (size_t)k < L->n ? hexval(s[i + (size_t)k]) : -1;
                if (h < 0) lex_fail(L, i - 2, OPTIML_ERR_FORMAT, "bad escape in string literal");
                cp = cp * 16 + (uint32_t)h;
            }
            if (cp > 0x10ffff) lex_fail(L, i - 2, OPTIML_ERR_FORMAT, "bad escape in string literal");
            i += (size_t)nhex;
            char enc[4];
            sb_put(L->J, &b, enc, u8_encode(cp, enc));
            continue;
        }
        sb_putc(L->J, &b, '\\'); /* unknown escapes stay as written */
        sb_putc(L->J, &b, e);
    }
    struct value v = v_sbuf(&b);
    lex_push(L, T_STRING, start, v.u.str.s, v.u.str.n);
    L->pos = i + 1;
}

/* Tokens of one {{ }} or {% %} tag, up to and including its end. Returns the
 * position after the end delimiter (whitespace control applied) and whether
 * a newline was consumed last (for lstrip_blocks). */
static void lex_tag(struct lexer *L, bool block, bool *line_starting) {
    const char *s = L->src;
    int brackets = 0;
    size_t tag_start = L->pos;
    for (;;) {
        while (L->pos < L->n && is_ws(s[L->pos])) L->pos++;
        if (L->pos >= L->n) lex_fail(L, tag_start, OPTIML_ERR_FORMAT, block ? "unclosed {% tag" : "unclosed {{ tag");
        size_t p = L->pos;
        char c = s[p];
        const char *end = block ? "%}" : "}}";
        if (brackets == 0) {
            bool minus = c == '-' && p + 3 <= L->n && !strncmp(s + p + 1, end, 2);
            bool plus = block && c == '+' && p + 3 <= L->n && !strncmp(s + p + 1, end, 2);
            if (minus || plus || (p + 2 <= L->n && !strncmp(s + p, end, 2))) {
                lex_push(L, block ? T_BLOCK_END : T_VAR_END, p, NULL, 0);
                L->pos = p + 2 + (minus || plus);
                *line_starting = false;
                if (minus) {
                    while (L->pos < L->n && is_ws(s[L->pos])) L->pos++;
                    *line_starting = L->pos > 0 && s[L->pos - 1] == '\n' && L->pos > p + 3;
                } else if (block && !plus && L->pos < L->n && s[L->pos] == '\n') {
                    L->pos++; /* trim_blocks */
                    *line_starting = true;
                }
                return;
            }
        }
        if (c == '\'' || c == '"') {
            lex_string(L);
            continue;
        }
        if (is_digit(c)) {
            int64_t v = 0;
            size_t i = p;
            while (i < L->n && (is_digit(s[i]) || (s[i] == '_' && i + 1 < L->n && is_digit(s[i + 1])))) {
                if (s[i] != '_') {
                    if (v > (INT64_MAX - (s[i] - '0')) / 10)
                        lex_fail(L, p, OPTIML_ERR_UNSUPPORTED, "integer literal too large");
                    v = v * 10 + (s[i] - '0');
                }
                i++;
            }
            if (i < L->n && (s[i] == '.' && i + 1 < L->n && is_digit(s[i + 1])))
                lex_fail(L, p, OPTIML_ERR_UNSUPPORTED, "unsupported construct: float literal");
            if (i < L->n && (s[i] == 'e' || s[i] == 'E'))
                lex_fail(L, p, OPTIML_ERR_UNSUPPORTED, "unsupported construct: float literal");
            lex_push(L, T_INT, p, s + p, i - p)->i = v;
            L->pos = i;
            continue;
        }
        if (is_name0(c)) {
            size_t i = p;
            while (i < L->n && (is_name0(s[i]) || is_digit(s[i]))) i++;
            lex_push(L, T_NAME, p, s + p, i - p);
            L->pos = i;
            continue;
        }
        static const char *const ops[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<",
                                          ">", "=", "(", ")", "[", "]", "{", "}", ",", ".", ":", "|"};
        size_t k;
        for (k = 0; k < sizeof(ops) / sizeof(ops[0]); k++) {
            size_t l = strlen(ops[k]);
            if (p + l <= L->n && !strncmp(s + p, ops[k], l)) break;
        }
        if (k == sizeof(ops) / sizeof(ops[0])) {
            char what[64];
            snprintf(what, sizeof(what), "unexpected character '%c'", c >= 0x20 && c < 0x7f ? c : '?');
            lex_fail(L, p, OPTIML_ERR_FORMAT, what);
        }
        const char *op = ops[k];
        if (op[0] == '(' || op[0] == '[' || op[0] == '{') brackets++;
        if ((op[0] == ')' || op[0] == ']' || op[0] == '}') && brackets > 0) brackets--;
        lex_push(L, T_OP, p, op, strlen(op));
        L->pos = p + strlen(op);
    }
}

static void lex_text(struct lexer *L, size_t from, size_t to) {
    if (to > from) lex_push(L, T_TEXT, from, L->src + from, to - from);
}

static void lex_all(struct lexer *L) {
    const char *s = L->src;
    bool line_starting = true;
    while (L->pos < L->n) {
        size_t t = L->pos;
        while (t + 1 < L->n && !(s[t] == '{' && (s[t + 1] == '{' || s[t + 1] == '%' || s[t + 1] == '#'))) t++;
        if (t + 1 >= L->n) {
            lex_text(L, L->pos, L->n);
            break;
        }
        char kind = s[t + 1];
        char mod = t + 2 < L->n ? s[t + 2] : 0;
        size_t text_end = t;
        if (mod == '-') {
            while (text_end > L->pos && is_ws(s[text_end - 1])) text_end--;
        } else if (kind != '{' && mod != '+') {
            /* lstrip_blocks: blanks between the line start and the tag go */
            size_t l = text_end;
            while (l > L->pos && s[l - 1] != '\n') l--;
            if (l > L->pos || line_starting) { /* a newline in the text, or the text starts a line */
                size_t k = l;
                while (k < text_end && (s[k] == ' ' || s[k] == '\t' || s[k] == '\r' || s[k] == '\f' || s[k] == '\v'))
                    k++;
                if (k == text_end) text_end = l;
            }
        }
        lex_text(L, L->pos, text_end);
        size_t body = t + 2 + (mod == '-' || (mod == '+' && kind != '{'));
        if (kind == '#') {
            size_t e = body;
            while (e + 1 < L->n && !(s[e] == '#' && s[e + 1] == '}')) e++;
            if (e + 1 >= L->n) lex_fail(L, t, OPTIML_ERR_FORMAT, "unclosed comment");
            bool minus = e > body && s[e - 1] == '-';
            L->pos = e + 2;
            line_starting = false;
            if (minus) {
                while (L->pos < L->n && is_ws(s[L->pos])) L->pos++;
                line_starting = L->pos > e + 2 && s[L->pos - 1] == '\n';
            } else if (L->pos < L->n && s[L->pos] == '\n') {
                L->pos++;
                line_starting = true;
            }
            continue;
        }
        bool block = kind == '%';
        lex_push(L, block ? T_BLOCK_BEGIN : T_VAR_BEGIN, t, NULL, 0);
        L->pos = body;
        lex_tag(L, block, &line_starting);
    }
    lex_push(L, T_EOF, L->n, NULL, 0);
}

/* ---- AST ------------------------------------------------------------------------------ */

enum node_kind {
    /* statements */
    N_TEXT, N_OUTPUT, N_IF, N_FOR, N_SET, N_SET_ATTR, N_SET_BLOCK, N_BREAK, N_CONTINUE, N_BODY,
    /* expressions */
    E_LIT, E_NAME, E_ATTR, E_ITEM, E_SLICE, E_CALL, E_FILTER, E_TEST, E_NEG, E_NOT, E_BINOP, E_AND, E_OR,
    E_COND, E_LIST, E_DICT, E_CONCAT,
};

struct node {
    enum node_kind k;
    int line, col;
    const char *name; /* variable, attribute, filter, test, operator; N_SET targets */
    size_t name_len;
    const char *name2; /* second loop/set target, N_SET_ATTR attribute */
    size_t name2_len;
    struct node *a, *b, *c;
    struct node **kids; /* bodies, arguments, items (dict: key, value pairs) */
    size_t n_kids;
    struct node **kids2; /* else bodies */
    size_t n_kids2;
    const char **kw; /* keyword names of call/filter arguments (NULL = positional) */
    size_t *kw_len;
    bool negate;
    struct value lit;
};

struct parser {
    struct jinja *J;
    struct token *t;
    size_t i, n;
    int depth;
};

static struct token *P_peek(struct parser *P) { return &P->t[P->i]; }
static struct token *P_next(struct parser *P) {
    struct token *t = &P->t[P->i];
    if (P->i + 1 < P->n) P->i++;
    return t;
}

static bool tok_is(const struct token *t, enum tok_kind k, const char *s) {
    return t->k == k && (!s || (t->n == strlen(s) && !memcmp(t->s, s, t->n)));
}
static bool P_op(struct parser *P, const char *op) { return tok_is(P_peek(P), T_OP, op); }
static bool P_name(struct parser *P, const char *name) { return tok_is(P_peek(P), T_NAME, name); }

static _Noreturn void P_fail(struct parser *P, optiml_status st, const char *fmt, const char *arg) {
    const struct token *t = P_peek(P);
    char what[256];
    snprintf(what, sizeof(what), fmt, arg);
    jfail(P->J, st, t->line, t->col, "%s", what);
}

static const char *tok_desc(const struct token *t, char *buf, size_t size) {
    switch (t->k) {
    case T_EOF: return "end of template";
    case T_TEXT: return "text";
    case T_VAR_BEGIN: return "'{{'";
    case T_VAR_END: return "'}}'";
    case T_BLOCK_BEGIN: return "'{%'";
    case T_BLOCK_END: return "'%}'";
    default: snprintf(buf, size, "'%.*s'", (int)(t->n > 40 ? 40 : t->n), t->s ? t->s : ""); return buf;
    }
}

static void P_expect_op(struct parser *P, const char *op) {
    if (!P_op(P, op)) {
        char buf[64], what[128];
        snprintf(what, sizeof(what), "expected '%s', found %s", op, tok_desc(P_peek(P), buf, sizeof(buf)));
        P_fail(P, OPTIML_ERR_FORMAT, "syntax error: %s", what);
    }
    P_next(P);
}

static void P_expect(struct parser *P, enum tok_kind k, const char *what) {
    if (P_peek(P)->k != k) {
        char buf[64], msg[160];
        snprintf(msg, sizeof(msg), "expected %s, found %s", what, tok_desc(P_peek(P), buf, sizeof(buf)));
        P_fail(P, OPTIML_ERR_FORMAT, "syntax error: %s", msg);
    }
    P_next(P);
}

static struct node *node_new(struct parser *P, enum node_kind k, const struct token *at) {
    struct node *n = jalloc(P->J, sizeof(*n));
    memset(n, 0, sizeof(*n));
    n->k = k;
    n->line = at->line;
    n->col = at->col;
    return n;
}

/* A growable node list during parsing. */
struct nlist {
    struct node **p;
    size_t n, cap;
};

static void nl_push(struct jinja *J, struct nlist *l, struct node *x) {
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 8;
        struct node **p = jalloc(J, cap * sizeof(*p));
        if (l->n) memcpy(p, l->p, l->n * sizeof(*p));
        l->p = p;
        l->cap = cap;
    }
    l->p[l->n++] = x;
}

static void P_enter(struct parser *P) {
    if (++P->depth > P->J->lim.max_depth)
        P_fail(P, OPTIML_ERR_INVALID_ARG, "nesting deeper than %s", "the limit");
}

static struct node *parse_expr(struct parser *P);
static struct node *parse_or(struct parser *P);
static struct node *parse_unary(struct parser *P, bool with_filter);

static bool P_is_name_tok(const struct token *t, const char *s) { return tok_is(t, T_NAME, s); }

static void parse_call_args(struct parser *P, struct node *call) {
    P_expect_op(P, "(");
    struct nlist args = {0};
    const char *kw[64];
    size_t kwl[64];
    while (!P_op(P, ")")) {
        if (args.n == 64) P_fail(P, OPTIML_ERR_UNSUPPORTED, "more than %s call arguments", "64");
        struct token *t = P_peek(P);
        if (t->k == T_NAME && tok_is(&P->t[P->i + 1 < P->n ? P->i + 1 : P->i], T_OP, "=")) {
            kw[args.n] = t->s;
            kwl[args.n] = t->n;
            P_next(P);
            P_next(P);
        } else {
            if (args.n && kw[args.n - 1])
                P_fail(P, OPTIML_ERR_FORMAT, "syntax error: %s", "positional argument after keyword argument");
            kw[args.n] = NULL;
            kwl[args.n] = 0;
        }
        nl_push(P->J, &args, parse_expr(P));
        if (!P_op(P, ",")) break;
        P_next(P);
    }
    P_expect_op(P, ")");
    call->kids = args.p;
    call->n_kids = args.n;
    call->kw = jalloc(P->J, (args.n + 1) * sizeof(*call->kw));
    call->kw_len = jalloc(P->J, (args.n + 1) * sizeof(size_t));
    for (size_t i = 0; i < args.n; i++) {
        call->kw[i] = kw[i];
        call->kw_len[i] = kwl[i];
    }
}

static struct node *parse_primary(struct parser *P) {
    P_enter(P);
    struct token *t = P_peek(P);
    struct node *n;
    if (t->k == T_NAME) {
        P_next(P);
        n = node_new(P, E_LIT, t);
        if (tok_is(t, T_NAME, "true") || tok_is(t, T_NAME, "True")) n->lit = v_bool(true);
        else if (tok_is(t, T_NAME, "false") || tok_is(t, T_NAME, "False")) n->lit = v_bool(false);
        else if (tok_is(t, T_NAME, "none") || tok_is(t, T_NAME, "None")) n->lit = v_none;
        else {
            n->k = E_NAME;
            n->name = t->s;
            n->name_len = t->n;
        }
    } else if (t->k == T_STRING) {
        /* adjacent literals concatenate, as in Python */
        P_next(P);
        n = node_new(P, E_LIT, t);
        n->lit = v_str(t->s, t->n);
        if (P_peek(P)->k == T_STRING) {
            struct sbuf b = {0};
            sb_put(P->J, &b, t->s, t->n);
            while (P_peek(P)->k == T_STRING) {
                struct token *u = P_next(P);
                sb_put(P->J, &b, u->s, u->n);
            }
            n->lit = v_sbuf(&b);
        }
    } else if (t->k == T_INT) {
        P_next(P);
        n = node_new(P, E_LIT, t);
        n->lit = v_int(t->i);
    } else if (tok_is(t, T_OP, "(")) {
        P_next(P);
        if (P_op(P, ")")) { /* empty tuple */
            P_next(P);
            n = node_new(P, E_LIST, t);
        } else {
            n = parse_expr(P);
            if (P_op(P, ",")) { /* tuple */
                struct nlist items = {0};
                nl_push(P->J, &items, n);
                while (P_op(P, ",")) {
                    P_next(P);
                    if (P_op(P, ")")) break;
                    nl_push(P->J, &items, parse_expr(P));
                }
                n = node_new(P, E_LIST, t);
                n->kids = items.p;
                n->n_kids = items.n;
            }
            P_expect_op(P, ")");
        }
    } else if (tok_is(t, T_OP, "[")) {
        P_next(P);
        struct nlist items = {0};
        while (!P_op(P, "]")) {
            nl_push(P->J, &items, parse_expr(P));
            if (!P_op(P, ",")) break;
            P_next(P);
        }
        P_expect_op(P, "]");
        n = node_new(P, E_LIST, t);
        n->kids = items.p;
        n->n_kids = items.n;
    } else if (tok_is(t, T_OP, "{")) {
        P_next(P);
        struct nlist items = {0};
        while (!P_op(P, "}")) {
            nl_push(P->J, &items, parse_expr(P));
            P_expect_op(P, ":");
            nl_push(P->J, &items, parse_expr(P));
            if (!P_op(P, ",")) break;
            P_next(P);
        }
        P_expect_op(P, "}");
        n = node_new(P, E_DICT, t);
        n->kids = items.p;
        n->n_kids = items.n;
    } else {
        char buf[64];
        P_fail(P, OPTIML_ERR_FORMAT, "syntax error: unexpected %s", tok_desc(t, buf, sizeof(buf)));
    }
    P->depth--;
    return n;
}

static struct node *parse_postfix(struct parser *P, struct node *n) {
    for (;;) {
        struct token *t = P_peek(P);
        if (tok_is(t, T_OP, ".")) {
            P_next(P);
            struct token *name = P_peek(P);
            if (name->k == T_INT) { /* x.0 */
                P_next(P);
                struct node *m = node_new(P, E_ITEM, t);
                m->a = n;
                m->b = node_new(P, E_LIT, name);
                m->b->lit = v_int(name->i);
                n = m;
                continue;
            }
            P_expect(P, T_NAME, "an attribute name");
            struct node *m = node_new(P, E_ATTR, t);
            m->a = n;
            m->name = name->s;
            m->name_len = name->n;
            n = m;
        } else if (tok_is(t, T_OP, "[")) {
            P_next(P);
            struct node *idx[3] = {NULL, NULL, NULL};
            int part = 0;
            bool slice = false;
            while (!P_op(P, "]")) {
                if (P_op(P, ":")) {
                    if (++part > 2) P_fail(P, OPTIML_ERR_FORMAT, "syntax error: %s", "bad slice");
                    slice = true;
                    P_next(P);
                    continue;
                }
                if (idx[part]) P_fail(P, OPTIML_ERR_FORMAT, "syntax error: %s", "expected ']'");
                idx[part] = parse_expr(P);
            }
            P_next(P);
            struct node *m = node_new(P, slice ? E_SLICE : E_ITEM, t);
            if (!slice && !idx[0]) P_fail(P, OPTIML_ERR_FORMAT, "syntax error: %s", "empty subscript");
            m->a = n;
            if (slice) {
                m->b = idx[0];
                m->c = idx[1];
                m->kids = jalloc(P->J, sizeof(struct node *));
                m->kids[0] = idx[2];
                m->n_kids = 1;
            } else {
                m->b = idx[0];
            }
            n = m;
        } else if (tok_is(t, T_OP, "(")) {
            struct node *m = node_new(P, E_CALL, t);
            m->a = n;
            parse_call_args(P, m);
            n = m;
        } else {
            return n;
        }
    }
}

static struct node *parse_filters_tests(struct parser *P, struct node *n) {
    for (;;) {
        struct token *t = P_peek(P);
        if (tok_is(t, T_OP, "|")) {
            P_next(P);
            struct token *name = P_peek(P);
            P_expect(P, T_NAME, "a filter name");
            struct node *m = node_new(P, E_FILTER, name);
            m->a = n;
            m->name = name->s;
            m->name_len = name->n;
            if (P_op(P, "(")) parse_call_args(P, m);
            n = m;
        } else if (tok_is(t, T_NAME, "is")) {
            P_next(P);
            struct node *m = node_new(P, E_TEST, t);
            if (P_name(P, "not")) {
                P_next(P);
                m->negate = true;
            }
            struct token *name = P_peek(P);
            P_expect(P, T_NAME, "a test name");
            m->a = n;
            m->name = name->s;
            m->name_len = name->n;
            struct token *u = P_peek(P);
            if (tok_is(u, T_OP, "(")) {
                parse_call_args(P, m);
            } else if ((u->k == T_NAME || u->k == T_STRING || u->k == T_INT || tok_is(u, T_OP, "[") ||
                        tok_is(u, T_OP, "{")) &&
                       !P_is_name_tok(u, "else") && !P_is_name_tok(u, "or") && !P_is_name_tok(u, "and")) {
                if (P_is_name_tok(u, "is")) P_fail(P, OPTIML_ERR_FORMAT, "syntax error: %s", "chained tests");
                struct node *arg = parse_postfix(P, parse_primary(P));
                m->kids = jalloc(P->J, sizeof(struct node *));
                m->kids[0] = arg;
                m->n_kids = 1;
                m->kw = jalloc(P->J, sizeof(*m->kw));
                m->kw[0] = NULL;
                m->kw_len = jalloc(P->J, sizeof(size_t));
            }
            n = m;
        } else if (tok_is(t, T_OP, "(")) {
            struct node *m = node_new(P, E_CALL, t);
            m->a = n;
            parse_call_args(P, m);
            n = m;
        } else {
            return n;
        }
    }
}

static struct node *parse_unary(struct parser *P, bool with_filter) {
    P_enter(P);
    struct token *t = P_peek(P);
    struct node *n;
    if (tok_is(t, T_OP, "-") || tok_is(t, T_OP, "+")) {
        P_next(P);
        n = node_new(P, E_NEG, t);
        n->negate = t->s[0] == '-';
        n->a = parse_unary(P, false);
    } else {
        n = parse_postfix(P, parse_primary(P));
    }
    if (with_filter) n = parse_filters_tests(P, n);
    P->depth--;
    return n;
}

static struct node *binop(struct parser *P, const struct token *t, const char *op, struct node *a, struct node *b) {
    struct node *n = node_new(P, E_BINOP, t);
    n->name = op;
    n->name_len = strlen(op);
    n->a = a;
    n->b = b;
    return n;
}

static struct node *parse_pow(struct parser *P) {
    struct node *n = parse_unary(P, true);
    while (P_op(P, "**")) {
        struct token *t = P_next(P);
        n = binop(P, t, "**", n, parse_unary(P, true));
    }
    return n;
}

static struct node *parse_math2(struct parser *P) {
    struct node *n = parse_pow(P);
    while (P_op(P, "*") || P_op(P, "/") || P_op(P, "//") || P_op(P, "%")) {
        struct token *t = P_next(P);
        char *op = jalloc(P->J, 3);
        memcpy(op, t->s, t->n);
        op[t->n] = '\0';
        n = binop(P, t, op, n, parse_pow(P));
    }
    return n;
}

static struct node *parse_concat(struct parser *P) {
    struct node *n = parse_math2(P);
    if (!P_op(P, "~")) return n;
    struct nlist parts = {0};
    nl_push(P->J, &parts, n);
    struct token *t = P_peek(P);
    while (P_op(P, "~")) {
        P_next(P);
        nl_push(P->J, &parts, parse_math2(P));
    }
    struct node *c = node_new(P, E_CONCAT, t);
    c->kids = parts.p;
    c->n_kids = parts.n;
    return c;
}

static struct node *parse_math1(struct parser *P) {
    struct node *n = parse_concat(P);
    while (P_op(P, "+") || P_op(P, "-")) {
        struct token *t = P_next(P);
        n = binop(P, t, t->s[0] == '+' ? "+" : "-", n, parse_concat(P));
    }
    return n;
}

static struct node *parse_compare(struct parser *P) {
    struct node *n = parse_math1(P);
    static const char *const cmps[] = {"==", "!=", "<", "<=", ">", ">="};
    for (;;) {
        struct token *t = P_peek(P);
        const char *op = NULL;
        for (size_t k = 0; k < 6; k++)
            if (tok_is(t, T_OP, cmps[k])) op = cmps[k];
        if (op) {
            P_next(P);
        } else if (tok_is(t, T_NAME, "in")) {
            P_next(P);
            op = "in";
        } else if (tok_is(t, T_NAME, "not") && P->i + 1 < P->n && tok_is(&P->t[P->i + 1], T_NAME, "in")) {
            P_next(P);
            P_next(P);
            op = "not in";
        } else {
            return n;
        }
        n = binop(P, t, op, n, parse_math1(P));
    }
}

static struct node *parse_not(struct parser *P) {
    if (P_name(P, "not")) {
        P_enter(P);
        struct token *t = P_next(P);
        struct node *n = node_new(P, E_NOT, t);
        n->a = parse_not(P);
        P->depth--;
        return n;
    }
    return parse_compare(P);
}

static struct node *parse_and(struct parser *P) {
    struct node *n = parse_not(P);
    while (P_name(P, "and")) {
        struct token *t = P_next(P);
        struct node *m = node_new(P, E_AND, t);
        m->a = n;
        m->b = parse_not(P);
        n = m;
    }
    return n;
}

static struct node *parse_or(struct parser *P) {
    struct node *n = parse_and(P);
    while (P_name(P, "or")) {
        struct token *t = P_next(P);
        struct node *m = node_new(P, E_OR, t);
        m->a = n;
        m->b = parse_and(P);
        n = m;
    }
    return n;
}

/* expr: or-expression [if or-expression [else expr]] */
static struct node *parse_expr(struct parser *P) {
    P_enter(P);
    struct node *n = parse_or(P);
    while (P_name(P, "if")) {
        struct token *t = P_next(P);
        struct node *m = node_new(P, E_COND, t);
        m->a = parse_or(P);
        m->b = n;
        if (P_name(P, "else")) {
            P_next(P);
            m->c = parse_expr(P);
        }
        n = m;
    }
    P->depth--;
    return n;
}

/* statements */

static void parse_body(struct parser *P, struct nlist *body, const char *const *ends, size_t n_ends,
                       const struct token *opener);

static void P_block_end(struct parser *P) { P_expect(P, T_BLOCK_END, "'%}'"); }

/* After "{%": whether the next name is one of ends (without consuming). */
static bool P_at_end_tag(struct parser *P, const char *const *ends, size_t n_ends) {
    if (P_peek(P)->k != T_BLOCK_BEGIN || P->i + 1 >= P->n) return false;
    const struct token *name = &P->t[P->i + 1];
    for (size_t k = 0; k < n_ends; k++)
        if (tok_is(name, T_NAME, ends[k])) return true;
    return false;
}

/* if/elif/else: an elif is an N_IF (negate = true marks it) that is the
 * whole else body of the previous one; built and run without recursion. */
static struct node *parse_if(struct parser *P, const struct token *at) {
    static const char *const ends[] = {"elif", "else", "endif"};
    static const char *const endif[] = {"endif"};
    struct node *first = node_new(P, N_IF, at), *cur = first;
    for (;;) {
        cur->a = parse_expr(P);
        P_block_end(P);
        struct nlist body = {0};
        parse_body(P, &body, ends, 3, at);
        cur->kids = body.p;
        cur->n_kids = body.n;
        P_next(P); /* {% */
        struct token *which = P_next(P);
        if (tok_is(which, T_NAME, "elif")) {
            struct node *e = node_new(P, N_IF, which);
            e->negate = true;
            cur->kids2 = jalloc(P->J, sizeof(struct node *));
            cur->kids2[0] = e;
            cur->n_kids2 = 1;
            cur = e;
            continue;
        }
        if (tok_is(which, T_NAME, "else")) {
            P_block_end(P);
            struct nlist eb = {0};
            parse_body(P, &eb, endif, 1, at);
            cur->kids2 = eb.p;
            cur->n_kids2 = eb.n;
            P_next(P);
            P_next(P);
        }
        P_block_end(P);
        return first;
    }
}

static struct node *parse_for(struct parser *P, const struct token *at) {
    struct node *n = node_new(P, N_FOR, at);
    struct token *t1 = P_peek(P);
    P_expect(P, T_NAME, "a loop variable");
    n->name = t1->s;
    n->name_len = t1->n;
    if (P_op(P, ",")) {
        P_next(P);
        struct token *t2 = P_peek(P);
        P_expect(P, T_NAME, "a loop variable");
        n->name2 = t2->s;
        n->name2_len = t2->n;
        if (P_op(P, ","))
            P_fail(P, OPTIML_ERR_UNSUPPORTED, "unsupported construct: %s", "more than two loop variables");
    }
    if (!P_name(P, "in")) P_fail(P, OPTIML_ERR_FORMAT, "syntax error: %s", "expected 'in'");
    P_next(P);
    n->a = parse_or(P); /* no inline if: "if" filters the loop */
    if (P_name(P, "if")) {
        P_next(P);
        n->b = parse_or(P);
    }
    if (P_name(P, "recursive")) P_fail(P, OPTIML_ERR_UNSUPPORTED, "unsupported construct: %s", "recursive loop");
    P_block_end(P);
    static const char *const ends[] = {"else", "endfor"};
    struct nlist body = {0};
    parse_body(P, &body, ends, 2, at);
    n->kids = body.p;
    n->n_kids = body.n;
    P_next(P);
    if (tok_is(P_next(P), T_NAME, "else")) {
        P_block_end(P);
        static const char *const endfor[] = {"endfor"};
        struct nlist eb = {0};
        parse_body(P, &eb, endfor, 1, at);
        n->kids2 = eb.p;
        n->n_kids2 = eb.n;
        P_next(P);
        P_next(P);
    }
    P_block_end(P);
    return n;
}

static struct node *parse_set(struct parser *P, const struct token *at) {
    struct token *t1 = P_peek(P);
    P_expect(P, T_NAME, "a variable name");
    struct node *n = node_new(P, N_SET, at);
    n->name = t1->s;
    n->name_len = t1->n;
    if (P_op(P, ".")) {
        P_next(P);
        struct token *t2 = P_peek(P);
        P_expect(P, T_NAME, "an attribute name");
        n->k = N_SET_ATTR;
        n->name2 = t2->s;
        n->name2_len = t2->n;
    } else if (P_op(P, ",")) {
        P_fail(P, OPTIML_ERR_UNSUPPORTED, "unsupported construct: %s", "tuple assignment in set");
    }
    if (n->k == N_SET && P_peek(P)->k == T_BLOCK_END) { /* {% set x %}...{% endset %} */
        P_next(P);
        n->k = N_SET_BLOCK;
        static const char *const ends[] = {"endset"};
        struct nlist body = {0};
        parse_body(P, &body, ends, 1, at);
        n->kids = body.p;
        n->n_kids = body.n;
        P_next(P);
        P_next(P);
        P_block_end(P);
        return n;
    }
    P_expect_op(P, "=");
    n->a = parse_expr(P);
    if (P_op(P, ",")) { /* set x = a, b: a tuple */
        struct nlist items = {0};
        nl_push(P->J, &items, n->a);
        while (P_op(P, ",")) {
            P_next(P);
            if (P_peek(P)->k == T_BLOCK_END) break;
            nl_push(P->J, &items, parse_expr(P));
        }
        struct node *l = node_new(P, E_LIST, at);
        l->kids = items.p;
        l->n_kids = items.n;
        n->a = l;
    }
    P_block_end(P);
    return n;
}

/* Statements until "{% <one of ends>" (left unconsumed) or, with no ends,
 * the end of the template. */
static void parse_body(struct parser *P, struct nlist *body, const char *const *ends, size_t n_ends,
                       const struct token *opener) {
    P_enter(P);
    for (;;) {
        struct token *t = P_peek(P);
        if (t->k == T_EOF) {
            if (n_ends) {
                char what[96];
                snprintf(what, sizeof(what), "missing {%% %s %%} for the block opened at line %d:%d", ends[n_ends - 1],
                         opener->line, opener->col);
                jfail(P->J, OPTIML_ERR_FORMAT, t->line, t->col, "syntax error: %s", what);
            }
            break;
        }
        if (n_ends && P_at_end_tag(P, ends, n_ends)) break;
        if (t->k == T_TEXT) {
            P_next(P);
            struct node *n = node_new(P, N_TEXT, t);
            n->lit = v_str(t->s, t->n);
            nl_push(P->J, body, n);
            continue;
        }
        if (t->k == T_VAR_BEGIN) {
            P_next(P);
            struct node *n = node_new(P, N_OUTPUT, t);
            n->a = parse_expr(P);
            P_expect(P, T_VAR_END, "'}}'");
            nl_push(P->J, body, n);
            continue;
        }
        if (t->k != T_BLOCK_BEGIN) {
            char buf[64];
            P_fail(P, OPTIML_ERR_FORMAT, "syntax error: unexpected %s", tok_desc(t, buf, sizeof(buf)));
        }
        P_next(P);
        struct token *kw = P_peek(P);
        if (kw->k != T_NAME) P_fail(P, OPTIML_ERR_FORMAT, "syntax error: %s", "expected a statement name after '{%'");
        P_next(P);
        struct node *n;
        if (tok_is(kw, T_NAME, "if")) n = parse_if(P, kw);
        else if (tok_is(kw, T_NAME, "for")) n = parse_for(P, kw);
        else if (tok_is(kw, T_NAME, "set")) n = parse_set(P, kw);
        else if (tok_is(kw, T_NAME, "break") || tok_is(kw, T_NAME, "continue")) {
            n = node_new(P, kw->s[0] == 'b' ? N_BREAK : N_CONTINUE, kw);
            P_block_end(P);
        } else if (tok_is(kw, T_NAME, "generation")) {
            P_block_end(P);
            static const char *const endg[] = {"endgeneration"};
            struct nlist gb = {0};
            parse_body(P, &gb, endg, 1, kw);
            n = node_new(P, N_BODY, kw);
            n->kids = gb.p;
            n->n_kids = gb.n;
            P_next(P);
            P_next(P);
            P_block_end(P);
        } else {
            static const char *const known[] = {"macro", "call", "filter", "include", "import", "from", "extends",
                                                "block", "raw", "with", "do", "autoescape", "endmacro"};
            bool is_known = false;
            for (size_t k = 0; k < sizeof(known) / sizeof(known[0]); k++) is_known |= tok_is(kw, T_NAME, known[k]);
            char name[48];
            snprintf(name, sizeof(name), "%.*s", (int)(kw->n > 40 ? 40 : kw->n), kw->s);
            jfail(P->J, is_known ? OPTIML_ERR_UNSUPPORTED : OPTIML_ERR_FORMAT, kw->line, kw->col,
                  is_known ? "unsupported construct: {%% %s %%}" : "syntax error: unknown statement '%s' (or a "
                                                                   "misplaced end tag)",
                  name);
        }
        nl_push(P->J, body, n);
    }
    P->depth--;
}

/* ---- evaluation: scopes -------------------------------------------------------------- */

struct binding {
    const char *name;
    size_t len;
    struct value v;
};

struct scope {
    struct binding *b;
    size_t n, cap;
    struct scope *parent;
};

static struct value *scope_find(struct scope *s, const char *name, size_t len) {
    for (; s; s = s->parent)
        for (size_t i = s->n; i-- > 0;)
            if (s->b[i].len == len && !memcmp(s->b[i].name, name, len)) return &s->b[i].v;
    return NULL;
}

static void scope_set(struct jinja *J, struct scope *s, const char *name, size_t len, struct value v) {
    for (size_t i = 0; i < s->n; i++)
        if (s->b[i].len == len && !memcmp(s->b[i].name, name, len)) {
            s->b[i].v = v;
            return;
        }
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 8;
        struct binding *b = jalloc(J, cap * sizeof(*b));
        if (s->n) memcpy(b, s->b, s->n * sizeof(*b));
        s->b = b;
        s->cap = cap;
    }
    s->b[s->n++] = (struct binding){name, len, v};
}

/* ---- evaluation: conversions ------------------------------------------------------------ */

static void value_repr(struct jinja *J, struct sbuf *b, struct value v, int depth, const struct node *at);

static void depth_check(struct jinja *J, int depth, const struct node *at) {
    if (depth > J->lim.max_depth)
        jfail(J, OPTIML_ERR_INVALID_ARG, at ? at->line : 0, at ? at->col : 0, "a value nests deeper than %d",
              J->lim.max_depth);
}

/* Python's str(v) (Jinja renders values with it). */
static void value_str(struct jinja *J, struct sbuf *b, struct value v, int depth, const struct node *at) {
    char num[32];
    switch (v.k) {
    case V_UNDEF: return;
    case V_NONE: sb_puts(J, b, "None"); return;
    case V_BOOL: sb_puts(J, b, v.u.b ? "True" : "False"); return;
    case V_INT: snprintf(num, sizeof(num), "%lld", (long long)v.u.i); sb_puts(J, b, num); return;
    case V_STR: sb_put(J, b, v.u.str.s, v.u.str.n); return;
    case V_FUNC: sb_puts(J, b, "<function>"); return;
    case V_LIST:
    case V_DICT: value_repr(J, b, v, depth, at); return;
    }
}

static void str_repr(struct jinja *J, struct sbuf *b, const char *s, size_t n) {
    bool has_sq = memchr(s, '\'', n) != NULL, has_dq = memchr(s, '"', n) != NULL;
    char q = has_sq && !has_dq ? '"' : '\'';
    sb_putc(J, b, q);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        if (c == '\\' || c == (unsigned char)q) {
            sb_putc(J, b, '\\');
            sb_putc(J, b, (char)c);
        } else if (c == '\n') sb_puts(J, b, "\\n");
        else if (c == '\r') sb_puts(J, b, "\\r");
        else if (c == '\t') sb_puts(J, b, "\\t");
        else if (c < 0x20 || c == 0x7f) {
            snprintf(esc, sizeof(esc), "\\x%02x", c);
            sb_puts(J, b, esc);
        } else sb_putc(J, b, (char)c);
    }
    sb_putc(J, b, q);
}

/* Python's repr(v), as str() of a container shows its items. */
static void value_repr(struct jinja *J, struct sbuf *b, struct value v, int depth, const struct node *at) {
    depth_check(J, depth, at);
    if (v.k == V_STR) {
        str_repr(J, b, v.u.str.s, v.u.str.n);
    } else if (v.k == V_LIST) {
        sb_putc(J, b, '[');
        for (size_t i = 0; i < v.u.list->n; i++) {
            if (i) sb_puts(J, b, ", ");
            value_repr(J, b, v.u.list->items[i], depth + 1, at);
        }
        sb_putc(J, b, ']');
    } else if (v.k == V_DICT) {
        if (v.u.dict->is_ns) sb_puts(J, b, "<Namespace ");
        sb_putc(J, b, '{');
        for (size_t i = 0; i < v.u.dict->n; i++) {
            if (i) sb_puts(J, b, ", ");
            value_repr(J, b, v.u.dict->keys[i], depth + 1, at);
            sb_puts(J, b, ": ");
            value_repr(J, b, v.u.dict->vals[i], depth + 1, at);
        }
        sb_putc(J, b, '}');
        if (v.u.dict->is_ns) sb_putc(J, b, '>');
    } else if (v.k == V_UNDEF) {
        jfail(J, OPTIML_ERR_INVALID_ARG, at ? at->line : 0, at ? at->col : 0, "undefined value inside a container");
    } else {
        value_str(J, b, v, depth, at);
    }
}

static struct value to_str(struct jinja *J, struct value v, const struct node *at) {
    if (v.k == V_STR) return v;
    struct sbuf b = {0};
    value_str(J, &b, v, 0, at);
    return v_sbuf(&b);
}

/* json.dumps(v, ensure_ascii=False, indent=indent) */
static void value_json(struct jinja *J, struct sbuf *b, struct value v, int64_t indent, int depth,
                       const struct node *at) {
    depth_check(J, depth, at);
    char num[32];
    switch (v.k) {
    case V_NONE: sb_puts(J, b, "null"); return;
    case V_BOOL: sb_puts(J, b, v.u.b ? "true" : "false"); return;
    case V_INT: snprintf(num, sizeof(num), "%lld", (long long)v.u.i); sb_puts(J, b, num); return;
    case V_STR:
        sb_putc(J, b, '"');
        for (size_t i = 0; i < v.u.str.n; i++) {
            unsigned char c = (unsigned char)v.u.str.s[i];
            if (c == '"') sb_puts(J, b, "\\\"");
            else if (c == '\\') sb_puts(J, b, "\\\\");
            else if (c == '\n') sb_puts(J, b, "\\n");
            else if (c == '\r') sb_puts(J, b, "\\r");
            else if (c == '\t') sb_puts(J, b, "\\t");
            else if (c == '\b') sb_puts(J, b, "\\b");
            else if (c == '\f') sb_puts(J, b, "\\f");
            else if (c < 0x20) {
                snprintf(num, sizeof(num), "\\u%04x", c);
                sb_puts(J, b, num);
            } else sb_putc(J, b, (char)c);
        }
        sb_putc(J, b, '"');
        return;
    case V_LIST:
    case V_DICT: {
        bool is_list = v.k == V_LIST;
        size_t n = is_list ? v.u.list->n : v.u.dict->n;
        sb_putc(J, b, is_list ? '[' : '{');
        if (n == 0) {
            sb_putc(J, b, is_list ? ']' : '}');
            return;
        }
        for (size_t i = 0; i < n; i++) {
            if (i) sb_puts(J, b, indent >= 0 ? "," : ", ");
            if (indent >= 0) {
                sb_putc(J, b, '\n');
                for (int64_t k = 0; k < indent * (depth + 1); k++) sb_putc(J, b, ' ');
            }
            if (is_list) {
                value_json(J, b, v.u.list->items[i], indent, depth + 1, at);
            } else {
                value_json(J, b, v.u.dict->keys[i], indent, depth + 1, at);
                sb_puts(J, b, ": ");
                value_json(J, b, v.u.dict->vals[i], indent, depth + 1, at);
            }
        }
        if (indent >= 0) {
            sb_putc(J, b, '\n');
            for (int64_t k = 0; k < indent * depth; k++) sb_putc(J, b, ' ');
        }
        sb_putc(J, b, is_list ? ']' : '}');
        return;
    }
    default:
        jfail(J, OPTIML_ERR_INVALID_ARG, at->line, at->col, "tojson: a %s value is not JSON serializable",
              kind_name(v.k));
    }
}

static bool truthy(struct value v) {
    switch (v.k) {
    case V_UNDEF:
    case V_NONE: return false;
    case V_BOOL: return v.u.b;
    case V_INT: return v.u.i != 0;
    case V_STR: return v.u.str.n != 0;
    case V_LIST: return v.u.list->n != 0;
    case V_DICT: return v.u.dict->is_ns || v.u.dict->n != 0;
    case V_FUNC: return true;
    }
    return false;
}

static bool value_eq(struct jinja *J, struct value a, struct value b, int depth, const struct node *at) {
    depth_check(J, depth, at);
    if ((a.k == V_INT || a.k == V_BOOL) && (b.k == V_INT || b.k == V_BOOL)) {
        int64_t x = a.k == V_INT ? a.u.i : a.u.b, y = b.k == V_INT ? b.u.i : b.u.b;
        return x == y;
    }
    if (a.k != b.k) return false;
    switch (a.k) {
    case V_UNDEF:
    case V_NONE: return true;
    case V_STR: return str_eq(a, b.u.str.s, b.u.str.n);
    case V_LIST:
        if (a.u.list->n != b.u.list->n) return false;
        jsteps(J, a.u.list->n, at->line, at->col);
        for (size_t i = 0; i < a.u.list->n; i++)
            if (!value_eq(J, a.u.list->items[i], b.u.list->items[i], depth + 1, at)) return false;
        return true;
    case V_DICT:
        if (a.u.dict == b.u.dict) return true;
        if (a.u.dict->is_ns || b.u.dict->is_ns || a.u.dict->n != b.u.dict->n) return false;
        jsteps(J, a.u.dict->n, at->line, at->col);
        for (size_t i = 0; i < a.u.dict->n; i++) {
            struct value *o = dict_find(b.u.dict, a.u.dict->keys[i].u.str.s, a.u.dict->keys[i].u.str.n);
            if (!o || !value_eq(J, a.u.dict->vals[i], *o, depth + 1, at)) return false;
        }
        return true;
    case V_FUNC: return a.u.fn == b.u.fn;
    default: return false;
    }
}

/* ---- evaluation: expressions ------------------------------------------------------------------- */

static struct value eval(struct jinja *J, const struct node *n);

static _Noreturn void type_error(struct jinja *J, const struct node *n, const char *what, struct value a) {
    jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "%s: not supported for a %s value", what, kind_name(a.k));
}

static struct value str_substr(struct jinja *J, struct value s, size_t from, size_t to) {
    (void)J;
    return v_str(s.u.str.s + from, to - from);
}

/* Python's slice.indices() */
static void slice_indices(int64_t len, const struct value *lo, const struct value *hi, int64_t step, int64_t *start,
                          int64_t *stop) {
    int64_t def_start = step > 0 ? 0 : len - 1, def_stop = step > 0 ? len : -1;
    const struct value *vv[2] = {lo, hi};
    int64_t out[2] = {def_start, def_stop};
    for (int k = 0; k < 2; k++) {
        if (!vv[k] || vv[k]->k == V_NONE) continue;
        int64_t x = vv[k]->k == V_BOOL ? vv[k]->u.b : vv[k]->u.i;
        if (x < 0) {
            x += len;
            if (x < 0) x = step < 0 ? -1 : 0;
        } else if (x >= len) {
            x = step < 0 ? len - 1 : len;
        }
        out[k] = x;
    }
    *start = out[0];
    *stop = out[1];
}

static int64_t int_of(struct jinja *J, const struct node *n, struct value v, const char *what) {
    if (v.k == V_INT) return v.u.i;
    if (v.k == V_BOOL) return v.u.b;
    jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "%s must be an integer, not %s", what, kind_name(v.k));
}

static struct value eval_slice(struct jinja *J, const struct node *n) {
    struct value obj = eval(J, n->a);
    struct value lo = n->b ? eval(J, n->b) : v_none, hi = n->c ? eval(J, n->c) : v_none;
    struct value st = n->kids[0] ? eval(J, n->kids[0]) : v_none;
    int64_t step = st.k == V_NONE ? 1 : int_of(J, n, st, "slice step");
    if (step == 0) jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "slice step cannot be zero");
    if (lo.k != V_NONE) int_of(J, n, lo, "slice start");
    if (hi.k != V_NONE) int_of(J, n, hi, "slice stop");
    if (obj.k == V_LIST) {
        int64_t a, b;
        slice_indices((int64_t)obj.u.list->n, &lo, &hi, step, &a, &b);
        struct list *l = list_new(J, 0);
        for (int64_t i = a; step > 0 ? i < b : i > b; i += step) {
            jsteps(J, 1, n->line, n->col);
            list_push(J, l, obj.u.list->items[i]);
        }
        return v_list(l);
    }
    if (obj.k == V_STR) {
        size_t n_cp;
        size_t *off = u8_offsets(J, obj.u.str.s, obj.u.str.n, &n_cp);
        int64_t a, b;
        slice_indices((int64_t)n_cp, &lo, &hi, step, &a, &b);
        if (step == 1) return a < b ? str_substr(J, obj, off[a], off[b]) : v_str("", 0);
        struct sbuf out = {0};
        for (int64_t i = a; step > 0 ? i < b : i > b; i += step) {
            jsteps(J, 1, n->line, n->col);
            sb_put(J, &out, obj.u.str.s + off[i], off[i + 1] - off[i]);
        }
        return v_sbuf(&out);
    }
    type_error(J, n, "slicing", obj); /* Jinja compiles slices to plain Python subscripts */
}

static struct value get_item(struct jinja *J, const struct node *n, struct value obj, struct value key) {
    if (obj.k == V_DICT) {
        if (key.k != V_STR) return v_undef;
        struct value *v = dict_find(obj.u.dict, key.u.str.s, key.u.str.n);
        return v ? *v : v_undef;
    }
    if (obj.k == V_LIST || obj.k == V_STR) {
        if (key.k != V_INT && key.k != V_BOOL) return v_undef;
        int64_t i = key.k == V_INT ? key.u.i : key.u.b;
        if (obj.k == V_LIST) {
            int64_t len = (int64_t)obj.u.list->n;
            if (i < 0) i += len;
            return i >= 0 && i < len ? obj.u.list->items[i] : v_undef;
        }
        size_t n_cp;
        size_t *off = u8_offsets(J, obj.u.str.s, obj.u.str.n, &n_cp);
        if (i < 0) i += (int64_t)n_cp;
        return i >= 0 && i < (int64_t)n_cp ? str_substr(J, obj, off[i], off[i + 1]) : v_undef;
    }
    if (obj.k == V_UNDEF)
        jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "subscript of an undefined value");
    return v_undef;
}

static struct value eval_name(struct jinja *J, const struct node *n) {
    struct value *v = scope_find(J->scope, n->name, n->name_len);
    return v ? *v : v_undef;
}

/* Iteration: the items of a list, the keys of a dict, the characters of a
 * string; undefined iterates as empty. */
static struct list *iter_list(struct jinja *J, const struct node *n, struct value v) {
    if (v.k == V_LIST) return v.u.list;
    if (v.k == V_UNDEF) return list_new(J, 1);
    if (v.k == V_DICT && !v.u.dict->is_ns) {
        struct list *l = list_new(J, v.u.dict->n);
        for (size_t i = 0; i < v.u.dict->n; i++) list_push(J, l, v.u.dict->keys[i]);
        return l;
    }
    if (v.k == V_STR) {
        size_t n_cp;
        size_t *off = u8_offsets(J, v.u.str.s, v.u.str.n, &n_cp);
        struct list *l = list_new(J, n_cp);
        for (size_t i = 0; i < n_cp; i++) list_push(J, l, str_substr(J, v, off[i], off[i + 1]));
        return l;
    }
    type_error(J, n, "iteration", v);
}

static int64_t length_of(struct jinja *J, const struct node *n, struct value v) {
    switch (v.k) {
    case V_UNDEF: return 0;
    case V_STR: return (int64_t)u8_count(v.u.str.s, v.u.str.n);
    case V_LIST: return (int64_t)v.u.list->n;
    case V_DICT: return (int64_t)v.u.dict->n;
    default: type_error(J, n, "length", v);
    }
}

static bool contains(struct jinja *J, const struct node *n, struct value item, struct value seq) {
    if (seq.k == V_STR) {
        if (item.k != V_STR) type_error(J, n, "'in' on a string with a non-string", item);
        if (item.u.str.n == 0) return true;
        jsteps(J, seq.u.str.n / 64 + 1, n->line, n->col);
        for (size_t i = 0; i + item.u.str.n <= seq.u.str.n; i++)
            if (!memcmp(seq.u.str.s + i, item.u.str.s, item.u.str.n)) return true;
        return false;
    }
    if (seq.k == V_LIST) {
        jsteps(J, seq.u.list->n, n->line, n->col);
        for (size_t i = 0; i < seq.u.list->n; i++)
            if (value_eq(J, item, seq.u.list->items[i], 0, n)) return true;
        return false;
    }
    if (seq.k == V_DICT && !seq.u.dict->is_ns) {
        if (item.k == V_LIST || item.k == V_DICT) type_error(J, n, "'in' on a dict (unhashable key)", item);
        return item.k == V_STR && dict_find(seq.u.dict, item.u.str.s, item.u.str.n) != NULL;
    }
    if (seq.k == V_UNDEF) return false; /* undefined iterates as empty */
    type_error(J, n, "'in'", seq);
}

static int compare_order(struct jinja *J, const struct node *n, struct value a, struct value b) {
    if ((a.k == V_INT || a.k == V_BOOL) && (b.k == V_INT || b.k == V_BOOL)) {
        int64_t x = a.k == V_INT ? a.u.i : a.u.b, y = b.k == V_INT ? b.u.i : b.u.b;
        return x < y ? -1 : x > y;
    }
    if (a.k == V_STR && b.k == V_STR) {
        size_t m = a.u.str.n < b.u.str.n ? a.u.str.n : b.u.str.n;
        int c = m ? memcmp(a.u.str.s, b.u.str.s, m) : 0;
        if (c) return c < 0 ? -1 : 1;
        return a.u.str.n < b.u.str.n ? -1 : a.u.str.n > b.u.str.n;
    }
    jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "cannot order a %s and a %s", kind_name(a.k), kind_name(b.k));
}

static struct value repeat(struct jinja *J, const struct node *n, struct value seq, int64_t times) {
    if (times < 0) times = 0;
    if (seq.k == V_STR) {
        struct sbuf b = {0};
        if (seq.u.str.n && (uint64_t)times > J->lim.max_output / seq.u.str.n)
            jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "string repetition exceeds %zu bytes", J->lim.max_output);
        for (int64_t i = 0; i < times; i++) sb_put(J, &b, seq.u.str.s, seq.u.str.n);
        return v_sbuf(&b);
    }
    struct list *l = list_new(J, 0);
    for (int64_t i = 0; i < times; i++) {
        jsteps(J, seq.u.list->n + 1, n->line, n->col);
        for (size_t k = 0; k < seq.u.list->n; k++) list_push(J, l, seq.u.list->items[k]);
    }
    return v_list(l);
}

static struct value eval_binop(struct jinja *J, const struct node *n) {
    const char *op = n->name;
    struct value a = eval(J, n->a), b = eval(J, n->b);
    if (!strcmp(op, "==")) return v_bool(value_eq(J, a, b, 0, n));
    if (!strcmp(op, "!=")) return v_bool(!value_eq(J, a, b, 0, n));
    if (!strcmp(op, "in")) return v_bool(contains(J, n, a, b));
    if (!strcmp(op, "not in")) return v_bool(!contains(J, n, a, b));
    if (!strcmp(op, "<")) return v_bool(compare_order(J, n, a, b) < 0);
    if (!strcmp(op, "<=")) return v_bool(compare_order(J, n, a, b) <= 0);
    if (!strcmp(op, ">")) return v_bool(compare_order(J, n, a, b) > 0);
    if (!strcmp(op, ">=")) return v_bool(compare_order(J, n, a, b) >= 0);
    bool ai = a.k == V_INT || a.k == V_BOOL, bi = b.k == V_INT || b.k == V_BOOL;
    if (!strcmp(op, "+")) {
        if (a.k == V_STR && b.k == V_STR) {
            struct sbuf s = {0};
            sb_put(J, &s, a.u.str.s, a.u.str.n);
            sb_put(J, &s, b.u.str.s, b.u.str.n);
            return v_sbuf(&s);
        }
        if (a.k == V_LIST && b.k == V_LIST) {
            struct list *l = list_new(J, a.u.list->n + b.u.list->n);
            jsteps(J, a.u.list->n + b.u.list->n, n->line, n->col);
            for (size_t i = 0; i < a.u.list->n; i++) list_push(J, l, a.u.list->items[i]);
            for (size_t i = 0; i < b.u.list->n; i++) list_push(J, l, b.u.list->items[i]);
            return v_list(l);
        }
    }
    if (!strcmp(op, "*")) {
        if ((a.k == V_STR || a.k == V_LIST) && bi) return repeat(J, n, a, int_of(J, n, b, "count"));
        if (ai && (b.k == V_STR || b.k == V_LIST)) return repeat(J, n, b, int_of(J, n, a, "count"));
    }
    if (!strcmp(op, "/"))
        jfail(J, OPTIML_ERR_UNSUPPORTED, n->line, n->col, "unsupported construct: '/' (floating-point division)");
    if (!strcmp(op, "**"))
        jfail(J, OPTIML_ERR_UNSUPPORTED, n->line, n->col, "unsupported construct: '**'");
    if (!ai || !bi)
        jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "'%s' is not supported between a %s and a %s", op,
              kind_name(a.k), kind_name(b.k));
    int64_t x = a.k == V_INT ? a.u.i : a.u.b, y = b.k == V_INT ? b.u.i : b.u.b, r = 0;
    bool ovf = false;
    switch (op[0]) {
    case '+': ovf = __builtin_add_overflow(x, y, &r); break;
    case '-': ovf = __builtin_sub_overflow(x, y, &r); break;
    case '*': ovf = __builtin_mul_overflow(x, y, &r); break;
    case '/':
    case '%':
        if (y == 0) jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "integer division or modulo by zero");
        if (x == INT64_MIN && y == -1) {
            ovf = op[0] == '/';
            r = 0;
            break;
        }
        /* Python floors */
        r = op[0] == '/' ? x / y : x % y;
        if (op[0] == '/' && (x % y != 0) && ((x < 0) != (y < 0))) r--;
        if (op[0] == '%' && r != 0 && ((r < 0) != (y < 0))) r += y;
        break;
    }
    if (ovf) jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "integer overflow");
    return v_int(r);
}

/* Arguments of a call/filter/test: positional values after an optional
 * implicit first one (the filtered value), keyword values by name. */
struct args {
    struct value pos[8];
    size_t n_pos;
    const char *kw[8];
    size_t kw_len[8];
    struct value kwv[8];
    size_t n_kw;
};

static void eval_args(struct jinja *J, const struct node *n, struct args *a) {
    memset(a, 0, sizeof(*a));
    for (size_t i = 0; i < n->n_kids; i++) {
        struct value v = eval(J, n->kids[i]);
        if (n->kw && n->kw[i]) {
            if (a->n_kw == 8) jfail(J, OPTIML_ERR_UNSUPPORTED, n->line, n->col, "more than 8 keyword arguments");
            a->kw[a->n_kw] = n->kw[i];
            a->kw_len[a->n_kw] = n->kw_len[i];
            a->kwv[a->n_kw++] = v;
        } else {
            if (a->n_pos == 8) jfail(J, OPTIML_ERR_UNSUPPORTED, n->line, n->col, "more than 8 arguments");
            a->pos[a->n_pos++] = v;
        }
    }
}

/* Argument idx (positional) or name (keyword), else def. */
static struct value arg_get(const struct args *a, size_t idx, const char *name, struct value def) {
    if (idx < a->n_pos) return a->pos[idx];
    for (size_t k = 0; k < a->n_kw; k++)
        if (a->kw_len[k] == strlen(name) && !memcmp(a->kw[k], name, a->kw_len[k])) return a->kwv[k];
    return def;
}

static void args_max(struct jinja *J, const struct node *n, const struct args *a, size_t max_pos, const char *what) {
    if (a->n_pos > max_pos)
        jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "%s takes at most %zu arguments", what, max_pos);
}

static struct value arg_str(struct jinja *J, const struct node *n, struct value v, const char *what) {
    if (v.k != V_STR)
        jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "%s must be a string, not %s", what, kind_name(v.k));
    return v;
}

/* Whether the code point c[0..l) is one strip removes: one of chars, or
 * Python whitespace when chars is not a string. */
static bool strip_this(struct value chars, const char *c, size_t l) {
    if (chars.k != V_STR) return py_space(u8_decode(c, l));
    for (size_t k = 0; k < chars.u.str.n;) {
        size_t kl = u8_len(chars.u.str.s + k, chars.u.str.n - k);
        if (kl == l && !memcmp(chars.u.str.s + k, c, l)) return true;
        k += kl;
    }
    return false;
}

/* strip/lstrip/rstrip: chars = none strips Python whitespace. */
static struct value str_strip(struct jinja *J, const struct node *n, struct value s, struct value chars, bool left,
                              bool right) {
    if (chars.k != V_NONE && chars.k != V_UNDEF) arg_str(J, n, chars, "strip characters");
    const char *p = s.u.str.s;
    size_t a = 0, b = s.u.str.n;
    while (left && a < b) {
        size_t l = u8_len(p + a, b - a);
        if (!strip_this(chars, p + a, l)) break;
        a += l;
    }
    while (right && b > a) {
        size_t k = b - 1; /* back to the start of the last code point */
        while (k > a && b - k < 4 && ((unsigned char)p[k] & 0xc0) == 0x80) k--;
        size_t l = u8_len(p + k, b - k);
        if (k + l != b) { /* not a whole code point: one invalid byte */
            k = b - 1;
            l = 1;
        }
        if (!strip_this(chars, p + k, l)) break;
        b = k;
    }
    return v_str(p + a, b - a);
}

enum casefn { CASE_UPPER, CASE_LOWER, CASE_CAPITALIZE, CASE_TITLE_PY, CASE_TITLE_JINJA };

static bool ascii_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
static char ascii_up(char c) { return c >= 'a' && c <= 'z' ? (char)(c - 32) : c; }
static char ascii_low(char c) { return c >= 'A' && c <= 'Z' ? (char)(c + 32) : c; }

static struct value str_case(struct jinja *J, struct value s, enum casefn f) {
    char *p = jalloc(J, s.u.str.n + 1);
    bool prev_cased = false, word_start = true;
    for (size_t i = 0; i < s.u.str.n; i++) {
        char c = s.u.str.s[i];
        switch (f) {
        case CASE_UPPER: p[i] = ascii_up(c); break;
        case CASE_LOWER: p[i] = ascii_low(c); break;
        case CASE_CAPITALIZE: p[i] = i == 0 ? ascii_up(c) : ascii_low(c); break;
        case CASE_TITLE_PY:
            p[i] = ascii_alpha(c) ? (prev_cased ? ascii_low(c) : ascii_up(c)) : c;
            prev_cased = ascii_alpha(c);
            break;
        case CASE_TITLE_JINJA: {
            /* words start after whitespace, '-', '(', '{', '[', '<' */
            bool sep = is_ws(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
            p[i] = sep ? c : word_start ? ascii_up(c) : ascii_low(c);
            word_start = sep;
            break;
        }
        }
    }
    p[s.u.str.n] = '\0';
    return v_str(p, s.u.str.n);
}

static struct value str_replace(struct jinja *J, const struct node *n, struct value s, struct value old,
                                struct value new_, int64_t count) {
    arg_str(J, n, old, "replace: old");
    arg_str(J, n, new_, "replace: new");
    struct sbuf b = {0};
    size_t i = 0;
    int64_t done = 0;
    if (old.u.str.n == 0) { /* Python inserts new around every character */
        while (i <= s.u.str.n) {
            if (count < 0 || done < count) {
                sb_put(J, &b, new_.u.str.s, new_.u.str.n);
                done++;
            }
            if (i == s.u.str.n) break;
            size_t l = u8_len(s.u.str.s + i, s.u.str.n - i);
            sb_put(J, &b, s.u.str.s + i, l);
            i += l;
        }
        return v_sbuf(&b);
    }
    while (i < s.u.str.n) {
        if ((count < 0 || done < count) && i + old.u.str.n <= s.u.str.n &&
            !memcmp(s.u.str.s + i, old.u.str.s, old.u.str.n)) {
            sb_put(J, &b, new_.u.str.s, new_.u.str.n);
            i += old.u.str.n;
            done++;
        } else {
            sb_putc(J, &b, s.u.str.s[i++]);
        }
    }
    return v_sbuf(&b);
}

static struct value str_split(struct jinja *J, const struct node *n, struct value s, struct value sep,
                              int64_t maxsplit) {
    struct list *l = list_new(J, 0);
    const char *p = s.u.str.s;
    size_t len = s.u.str.n, i = 0;
    if (sep.k == V_NONE || sep.k == V_UNDEF) { /* runs of whitespace, no empty parts */
        int64_t splits = 0;
        for (;;) {
            while (i < len && py_space(u8_decode(p + i, u8_len(p + i, len - i)))) i += u8_len(p + i, len - i);
            if (i >= len) break;
            if (maxsplit >= 0 && splits >= maxsplit) {
                size_t e = len;
                while (e > i && py_space(u8_decode(p + e - 1, 1))) e--;
                list_push(J, l, v_str(p + i, e - i));
                break;
            }
            size_t st = i;
            while (i < len && !py_space(u8_decode(p + i, u8_len(p + i, len - i)))) i += u8_len(p + i, len - i);
            list_push(J, l, v_str(p + st, i - st));
            splits++;
            jsteps(J, 1, n->line, n->col);
        }
        return v_list(l);
    }
    arg_str(J, n, sep, "split separator");
    if (sep.u.str.n == 0) jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "split: empty separator");
    size_t st = 0;
    int64_t splits = 0;
    while (i + sep.u.str.n <= len) {
        if ((maxsplit < 0 || splits < maxsplit) && !memcmp(p + i, sep.u.str.s, sep.u.str.n)) {
            list_push(J, l, v_str(p + st, i - st));
            jsteps(J, 1, n->line, n->col);
            i += sep.u.str.n;
            st = i;
            splits++;
        } else {
            i++;
        }
    }
    list_push(J, l, v_str(p + st, len - st));
    return v_list(l);
}

static bool str_affix(struct jinja *J, const struct node *n, struct value s, struct value x, bool prefix) {
    if (x.k == V_LIST) {
        for (size_t i = 0; i < x.u.list->n; i++)
            if (str_affix(J, n, s, x.u.list->items[i], prefix)) return true;
        return false;
    }
    arg_str(J, n, x, prefix ? "startswith" : "endswith");
    if (x.u.str.n > s.u.str.n) return false;
    return !memcmp(prefix ? s.u.str.s : s.u.str.s + s.u.str.n - x.u.str.n, x.u.str.s, x.u.str.n);
}

static struct value join_values(struct jinja *J, const struct node *n, struct list *l, struct value sep) {
    struct sbuf b = {0};
    jsteps(J, l->n, n->line, n->col);
    for (size_t i = 0; i < l->n; i++) {
        if (i) sb_put(J, &b, sep.u.str.s, sep.u.str.n);
        value_str(J, &b, l->items[i], 0, n);
    }
    return v_sbuf(&b);
}

static struct value call_method(struct jinja *J, const struct node *n, struct value obj, const struct node *attr) {
    struct args a;
    eval_args(J, n, &a);
    char m[32];
    snprintf(m, sizeof(m), "%.*s", (int)(attr->name_len > 30 ? 30 : attr->name_len), attr->name);
    if (obj.k == V_STR) {
        if (!strcmp(m, "strip") || !strcmp(m, "lstrip") || !strcmp(m, "rstrip")) {
            args_max(J, n, &a, 1, m);
            return str_strip(J, n, obj, arg_get(&a, 0, "chars", v_none), m[0] != 'r', m[0] != 'l');
        }
        if (!strcmp(m, "upper")) return str_case(J, obj, CASE_UPPER);
        if (!strcmp(m, "lower")) return str_case(J, obj, CASE_LOWER);
        if (!strcmp(m, "title")) return str_case(J, obj, CASE_TITLE_PY);
        if (!strcmp(m, "capitalize")) return str_case(J, obj, CASE_CAPITALIZE);
        if (!strcmp(m, "startswith") || !strcmp(m, "endswith")) {
            args_max(J, n, &a, 1, m);
            return v_bool(str_affix(J, n, obj, arg_get(&a, 0, "prefix", v_str("", 0)), m[0] == 's'));
        }
        if (!strcmp(m, "split")) {
            args_max(J, n, &a, 2, m);
            struct value mx = arg_get(&a, 1, "maxsplit", v_int(-1));
            return str_split(J, n, obj, arg_get(&a, 0, "sep", v_none), int_of(J, n, mx, "maxsplit"));
        }
        if (!strcmp(m, "replace")) {
            args_max(J, n, &a, 3, m);
            struct value cnt = arg_get(&a, 2, "count", v_int(-1));
            return str_replace(J, n, obj, arg_get(&a, 0, "old", v_undef), arg_get(&a, 1, "new", v_undef),
                               int_of(J, n, cnt, "count"));
        }
        if (!strcmp(m, "join")) {
            args_max(J, n, &a, 1, m);
            return join_values(J, n, iter_list(J, n, arg_get(&a, 0, "iterable", v_undef)), obj);
        }
        if (!strcmp(m, "find")) {
            struct value x = arg_str(J, n, arg_get(&a, 0, "sub", v_undef), "find");
            for (size_t i = 0; i + x.u.str.n <= obj.u.str.n; i++)
                if (!memcmp(obj.u.str.s + i, x.u.str.s, x.u.str.n))
                    return v_int((int64_t)u8_count(obj.u.str.s, i));
            return v_int(-1);
        }
    } else if (obj.k == V_DICT && !obj.u.dict->is_ns) {
        const struct dict *d = obj.u.dict;
        if (!strcmp(m, "items") || !strcmp(m, "keys") || !strcmp(m, "values")) {
            struct list *l = list_new(J, d->n);
            jsteps(J, d->n, n->line, n->col);
            for (size_t i = 0; i < d->n; i++) {
                if (m[0] == 'k') list_push(J, l, d->keys[i]);
                else if (m[0] == 'v') list_push(J, l, d->vals[i]);
                else {
                    struct list *pair = list_new(J, 2);
                    list_push(J, pair, d->keys[i]);
                    list_push(J, pair, d->vals[i]);
                    list_push(J, l, v_list(pair));
                }
            }
            return v_list(l);
        }
        if (!strcmp(m, "get")) {
            args_max(J, n, &a, 2, m);
            struct value k = arg_get(&a, 0, "key", v_undef);
            struct value *v = k.k == V_STR ? dict_find(d, k.u.str.s, k.u.str.n) : NULL;
            return v ? *v : arg_get(&a, 1, "default", v_none);
        }
    } else if (obj.k == V_UNDEF) {
        jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "call of method '%s' on an undefined value", m);
    }
    jfail(J, OPTIML_ERR_UNSUPPORTED, n->line, n->col, "unsupported construct: method '%s' of a %s value", m,
          kind_name(obj.k));
}

static struct value call_global(struct jinja *J, const struct node *n, struct value fn) {
    struct args a;
    eval_args(J, n, &a);
    switch (fn.u.fn) {
    case F_RAISE: {
        struct value msg = to_str(J, arg_get(&a, 0, "message", v_str("", 0)), n);
        jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "raise_exception: %.*s",
              (int)(msg.u.str.n > 250 ? 250 : msg.u.str.n), msg.u.str.s);
    }
    case F_NAMESPACE:
    case F_DICT: {
        struct dict *d = dict_new(J, a.n_kw);
        d->is_ns = fn.u.fn == F_NAMESPACE;
        if (a.n_pos == 1 && a.pos[0].k == V_DICT) {
            const struct dict *src = a.pos[0].u.dict;
            for (size_t i = 0; i < src->n; i++) dict_set(J, d, src->keys[i], src->vals[i]);
        } else if (a.n_pos) {
            jfail(J, OPTIML_ERR_UNSUPPORTED, n->line, n->col, "unsupported construct: positional arguments of %s()",
                  d->is_ns ? "namespace" : "dict");
        }
        for (size_t k = 0; k < a.n_kw; k++) dict_set(J, d, v_str(a.kw[k], a.kw_len[k]), a.kwv[k]);
        return v_dict(d);
    }
    case F_RANGE: {
        if (a.n_pos < 1 || a.n_pos > 3 || a.n_kw)
            jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "range takes 1 to 3 integer arguments");
        int64_t lo = 0, hi, step = 1;
        if (a.n_pos == 1) hi = int_of(J, n, a.pos[0], "range stop");
        else {
            lo = int_of(J, n, a.pos[0], "range start");
            hi = int_of(J, n, a.pos[1], "range stop");
            if (a.n_pos == 3) step = int_of(J, n, a.pos[2], "range step");
        }
        if (step == 0) jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "range step cannot be zero");
        struct list *l = list_new(J, 0);
        for (int64_t i = lo; step > 0 ? i < hi : i > hi;) {
            jsteps(J, 1, n->line, n->col);
            list_push(J, l, v_int(i));
            if (__builtin_add_overflow(i, step, &i)) break;
        }
        return v_list(l);
    }
    case F_STRFTIME: {
        struct value f = arg_str(J, n, arg_get(&a, 0, "format", v_undef), "strftime_now format");
        char fmt[128], out[256];
        snprintf(fmt, sizeof(fmt), "%.*s", (int)(f.u.str.n > 120 ? 120 : f.u.str.n), f.u.str.s);
        time_t now = time(NULL);
        struct tm tmv;
        size_t len = localtime_r(&now, &tmv) ? strftime(out, sizeof(out), fmt, &tmv) : 0;
        return v_strdup(J, out, len);
    }
    }
    return v_undef;
}

static struct value eval_call(struct jinja *J, const struct node *n) {
    if (n->a->k == E_ATTR) {
        struct value obj = eval(J, n->a->a);
        return call_method(J, n, obj, n->a);
    }
    struct value fn = eval(J, n->a);
    if (fn.k == V_FUNC) return call_global(J, n, fn);
    if (n->a->k == E_NAME) {
        char name[48];
        snprintf(name, sizeof(name), "%.*s", (int)(n->a->name_len > 40 ? 40 : n->a->name_len), n->a->name);
        jfail(J, fn.k == V_UNDEF ? OPTIML_ERR_UNSUPPORTED : OPTIML_ERR_INVALID_ARG, n->line, n->col,
              fn.k == V_UNDEF ? "unsupported construct: function '%s'" : "'%s' is not callable", name);
    }
    jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "a %s value is not callable", kind_name(fn.k));
}

static bool run_test(struct jinja *J, const struct node *n, const char *name, size_t name_len, struct value v,
                     const struct args *a);

static struct value attr_of(struct jinja *J, const struct node *n, struct value obj, const char *name, size_t len) {
    if (obj.k == V_UNDEF) {
        jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "attribute '%.*s' of an undefined value",
              (int)(len > 40 ? 40 : len), name);
    }
    if (obj.k == V_DICT) {
        struct value *v = dict_find(obj.u.dict, name, len);
        return v ? *v : v_undef;
    }
    return v_undef;
}

/* selectattr / rejectattr / select / reject / map filters */
static struct value filter_select(struct jinja *J, const struct node *n, struct value seq, const struct args *a,
                                  bool by_attr, bool keep) {
    struct list *in = iter_list(J, n, seq), *out = list_new(J, 0);
    size_t first = by_attr ? 1 : 0;
    struct value attr = by_attr ? arg_str(J, n, arg_get(a, 0, "attribute", v_undef), "attribute") : v_undef;
    struct value test = a->n_pos > first ? arg_str(J, n, a->pos[first], "test name") : v_undef;
    struct args targs = {0};
    for (size_t k = first + 1; k < a->n_pos; k++) targs.pos[targs.n_pos++] = a->pos[k];
    jsteps(J, in->n, n->line, n->col);
    for (size_t i = 0; i < in->n; i++) {
        struct value x = by_attr ? attr_of(J, n, in->items[i], attr.u.str.s, attr.u.str.n) : in->items[i];
        bool ok = test.k == V_STR ? run_test(J, n, test.u.str.s, test.u.str.n, x, &targs) : truthy(x);
        if (ok == keep) list_push(J, out, in->items[i]);
    }
    return v_list(out);
}

static struct value apply_filter(struct jinja *J, const struct node *n, struct value v) {
    struct args a;
    eval_args(J, n, &a);
    char f[32];
    snprintf(f, sizeof(f), "%.*s", (int)(n->name_len > 30 ? 30 : n->name_len), n->name);
    if (!strcmp(f, "trim")) {
        args_max(J, n, &a, 1, f);
        return str_strip(J, n, to_str(J, v, n), arg_get(&a, 0, "chars", v_none), true, true);
    }
    if (!strcmp(f, "length") || !strcmp(f, "count")) return v_int(length_of(J, n, v));
    if (!strcmp(f, "tojson")) {
        struct value ind = arg_get(&a, 0, "indent", v_none);
        int64_t indent = ind.k == V_NONE ? -1 : int_of(J, n, ind, "indent");
        if (indent > 64) indent = 64;
        if (indent < -1) indent = 0;
        for (size_t k = 0; k < a.n_kw; k++)
            if (!(a.kw_len[k] == 6 && !memcmp(a.kw[k], "indent", 6)) &&
                !(a.kw_len[k] == 12 && !memcmp(a.kw[k], "ensure_ascii", 12) && !truthy(a.kwv[k])))
                jfail(J, OPTIML_ERR_UNSUPPORTED, n->line, n->col, "unsupported construct: tojson argument '%.*s'",
                      (int)(a.kw_len[k] > 30 ? 30 : a.kw_len[k]), a.kw[k]);
        struct sbuf b = {0};
        value_json(J, &b, v, indent, 0, n);
        return v_sbuf(&b);
    }
    if (!strcmp(f, "upper")) return str_case(J, to_str(J, v, n), CASE_UPPER);
    if (!strcmp(f, "lower")) return str_case(J, to_str(J, v, n), CASE_LOWER);
    if (!strcmp(f, "capitalize")) return str_case(J, to_str(J, v, n), CASE_CAPITALIZE);
    if (!strcmp(f, "title")) return str_case(J, to_str(J, v, n), CASE_TITLE_JINJA);
    if (!strcmp(f, "default") || !strcmp(f, "d")) {
        bool boolean = truthy(arg_get(&a, 1, "boolean", v_bool(false)));
        if (v.k == V_UNDEF || (boolean && !truthy(v))) return arg_get(&a, 0, "default_value", v_str("", 0));
        return v;
    }
    if (!strcmp(f, "first") || !strcmp(f, "last")) {
        struct list *l = iter_list(J, n, v);
        if (l->n == 0) return v_undef;
        return l->items[f[0] == 'f' ? 0 : l->n - 1];
    }
    if (!strcmp(f, "join")) {
        struct value sep = arg_str(J, n, arg_get(&a, 0, "d", v_str("", 0)), "join separator");
        struct value attr = arg_get(&a, 1, "attribute", v_none);
        struct list *l = iter_list(J, n, v);
        if (attr.k == V_STR) {
            struct list *m = list_new(J, l->n);
            for (size_t i = 0; i < l->n; i++) list_push(J, m, attr_of(J, n, l->items[i], attr.u.str.s, attr.u.str.n));
            l = m;
        }
        return join_values(J, n, l, sep);
    }
    if (!strcmp(f, "replace")) {
        args_max(J, n, &a, 3, f);
        struct value cnt = arg_get(&a, 2, "count", v_none);
        return str_replace(J, n, to_str(J, v, n), arg_get(&a, 0, "old", v_undef), arg_get(&a, 1, "new", v_undef),
                           cnt.k == V_NONE ? -1 : int_of(J, n, cnt, "count"));
    }
    if (!strcmp(f, "string")) return to_str(J, v, n);
    if (!strcmp(f, "safe")) return v;
    if (!strcmp(f, "int")) {
        struct value def = arg_get(&a, 0, "default", v_int(0));
        if (v.k == V_INT) return v;
        if (v.k == V_BOOL) return v_int(v.u.b);
        if (v.k != V_STR) return def;
        struct value t = str_strip(J, n, v, v_none, true, true);
        const char *s = t.u.str.s;
        size_t len = t.u.str.n, i = 0;
        bool neg = false;
        if (i < len && (s[i] == '+' || s[i] == '-')) neg = s[i++] == '-';
        if (i == len) return def;
        int64_t r = 0;
        for (; i < len; i++) {
            if (s[i] == '_' && i + 1 < len && is_digit(s[i + 1]) && i > 0 && is_digit(s[i - 1])) continue;
            if (!is_digit(s[i]) || __builtin_mul_overflow(r, 10, &r) || __builtin_add_overflow(r, s[i] - '0', &r))
                return def;
        }
        return v_int(neg ? -r : r);
    }
    if (!strcmp(f, "list")) {
        struct list *l = iter_list(J, n, v), *c = list_new(J, l->n);
        jsteps(J, l->n, n->line, n->col);
        for (size_t i = 0; i < l->n; i++) list_push(J, c, l->items[i]);
        return v_list(c);
    }
    if (!strcmp(f, "items")) {
        if (v.k == V_UNDEF) return v_list(list_new(J, 1));
        if (v.k != V_DICT) type_error(J, n, "items", v);
        struct node fake = *n;
        fake.name = "items";
        fake.name_len = 5;
        fake.n_kids = 0;
        return call_method(J, &fake, v, &fake);
    }
    if (!strcmp(f, "abs")) {
        int64_t x = int_of(J, n, v, "abs");
        if (x == INT64_MIN) jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "integer overflow");
        return v_int(x < 0 ? -x : x);
    }
    if (!strcmp(f, "reverse")) {
        if (v.k == V_STR) {
            size_t n_cp;
            size_t *off = u8_offsets(J, v.u.str.s, v.u.str.n, &n_cp);
            struct sbuf b = {0};
            for (size_t i = n_cp; i-- > 0;) sb_put(J, &b, v.u.str.s + off[i], off[i + 1] - off[i]);
            return v_sbuf(&b);
        }
        struct list *l = iter_list(J, n, v), *r = list_new(J, l->n);
        for (size_t i = l->n; i-- > 0;) list_push(J, r, l->items[i]);
        return v_list(r);
    }
    if (!strcmp(f, "escape") || !strcmp(f, "e")) {
        struct value s = to_str(J, v, n);
        struct sbuf b = {0};
        for (size_t i = 0; i < s.u.str.n; i++) {
            char c = s.u.str.s[i];
            if (c == '&') sb_puts(J, &b, "&amp;");
            else if (c == '<') sb_puts(J, &b, "&lt;");
            else if (c == '>') sb_puts(J, &b, "&gt;");
            else if (c == '"') sb_puts(J, &b, "&#34;");
            else if (c == '\'') sb_puts(J, &b, "&#39;");
            else sb_putc(J, &b, c);
        }
        return v_sbuf(&b);
    }
    if (!strcmp(f, "selectattr") || !strcmp(f, "rejectattr")) return filter_select(J, n, v, &a, true, f[0] == 's');
    if (!strcmp(f, "select") || !strcmp(f, "reject")) return filter_select(J, n, v, &a, false, f[0] == 's');
    if (!strcmp(f, "map")) {
        struct value attr = arg_get(&a, 0, "attribute", v_undef);
        bool by_kw = a.n_pos == 0;
        struct list *in = iter_list(J, n, v), *out = list_new(J, in->n);
        jsteps(J, in->n, n->line, n->col);
        for (size_t i = 0; i < in->n; i++) {
            struct value x = in->items[i];
            if (by_kw) {
                arg_str(J, n, attr, "map attribute");
                x = attr_of(J, n, x, attr.u.str.s, attr.u.str.n);
            } else {
                struct value fname = arg_str(J, n, a.pos[0], "map filter");
                struct node sub = *n;
                sub.name = fname.u.str.s;
                sub.name_len = fname.u.str.n;
                sub.n_kids = 0;
                x = apply_filter(J, &sub, x);
            }
            list_push(J, out, x);
        }
        return v_list(out);
    }
    jfail(J, OPTIML_ERR_UNSUPPORTED, n->line, n->col, "unsupported construct: filter '%s'", f);
}

static bool run_test(struct jinja *J, const struct node *n, const char *name, size_t name_len, struct value v,
                     const struct args *a) {
    char t[32];
    snprintf(t, sizeof(t), "%.*s", (int)(name_len > 30 ? 30 : name_len), name);
    struct value arg = arg_get(a, 0, "value", v_undef);
    if (!strcmp(t, "defined")) return v.k != V_UNDEF;
    if (!strcmp(t, "undefined")) return v.k == V_UNDEF;
    if (!strcmp(t, "none")) return v.k == V_NONE;
    if (!strcmp(t, "boolean")) return v.k == V_BOOL;
    if (!strcmp(t, "true")) return v.k == V_BOOL && v.u.b;
    if (!strcmp(t, "false")) return v.k == V_BOOL && !v.u.b;
    if (!strcmp(t, "integer")) return v.k == V_INT;
    if (!strcmp(t, "number")) return v.k == V_INT || v.k == V_BOOL;
    if (!strcmp(t, "float")) return false;
    if (!strcmp(t, "string")) return v.k == V_STR;
    if (!strcmp(t, "mapping")) return v.k == V_DICT && !v.u.dict->is_ns;
    if (!strcmp(t, "iterable")) return v.k == V_STR || v.k == V_LIST || (v.k == V_DICT && !v.u.dict->is_ns);
    if (!strcmp(t, "sequence")) return v.k == V_STR || v.k == V_LIST || (v.k == V_DICT && !v.u.dict->is_ns);
    if (!strcmp(t, "callable")) return v.k == V_FUNC;
    if (!strcmp(t, "odd")) return (int_of(J, n, v, "odd") & 1) != 0;
    if (!strcmp(t, "even")) return (int_of(J, n, v, "even") & 1) == 0;
    if (!strcmp(t, "divisibleby")) {
        int64_t d = int_of(J, n, arg, "divisibleby");
        int64_t x = int_of(J, n, v, "divisibleby");
        if (d == 0) jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "divisibleby 0");
        return d == -1 || x % d == 0;
    }
    if (!strcmp(t, "eq") || !strcmp(t, "equalto") || !strcmp(t, "==")) return value_eq(J, v, arg, 0, n);
    if (!strcmp(t, "ne") || !strcmp(t, "!=")) return !value_eq(J, v, arg, 0, n);
    if (!strcmp(t, "lt") || !strcmp(t, "lessthan")) return compare_order(J, n, v, arg) < 0;
    if (!strcmp(t, "le")) return compare_order(J, n, v, arg) <= 0;
    if (!strcmp(t, "gt") || !strcmp(t, "greaterthan")) return compare_order(J, n, v, arg) > 0;
    if (!strcmp(t, "ge")) return compare_order(J, n, v, arg) >= 0;
    if (!strcmp(t, "in")) return contains(J, n, v, arg);
    if (!strcmp(t, "sameas")) {
        if (v.k != arg.k) return false;
        if (v.k == V_LIST) return v.u.list == arg.u.list;
        if (v.k == V_DICT) return v.u.dict == arg.u.dict;
        if (v.k == V_STR) return v.u.str.s == arg.u.str.s && v.u.str.n == arg.u.str.n;
        return value_eq(J, v, arg, 0, n);
    }
    if (!strcmp(t, "lower") || !strcmp(t, "upper")) {
        if (v.k != V_STR) return false;
        bool any = false;
        for (size_t i = 0; i < v.u.str.n; i++) {
            char c = v.u.str.s[i];
            if (ascii_alpha(c)) {
                any = true;
                if ((t[0] == 'l') != (c >= 'a' && c <= 'z')) return false;
            }
        }
        return any;
    }
    jfail(J, OPTIML_ERR_UNSUPPORTED, n->line, n->col, "unsupported construct: test '%s'", t);
}

static struct value eval(struct jinja *J, const struct node *n) {
    if (++J->depth > 4 * J->lim.max_depth)
        jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "expression nests too deeply");
    struct value r = v_undef;
    switch (n->k) {
    case E_LIT: r = n->lit; break;
    case E_NAME: r = eval_name(J, n); break;
    case E_ATTR: r = attr_of(J, n, eval(J, n->a), n->name, n->name_len); break;
    case E_ITEM: {
        struct value obj = eval(J, n->a);
        r = get_item(J, n, obj, eval(J, n->b));
        break;
    }
    case E_SLICE: r = eval_slice(J, n); break;
    case E_CALL: r = eval_call(J, n); break;
    case E_FILTER: r = apply_filter(J, n, eval(J, n->a)); break;
    case E_TEST: {
        struct value v;
        /* "x.y is defined" must not fail when only y is missing */
        v = eval(J, n->a);
        struct args a;
        eval_args(J, n, &a);
        bool ok = run_test(J, n, n->name, n->name_len, v, &a);
        r = v_bool(ok != n->negate);
        break;
    }
    case E_NEG: {
        struct value v = eval(J, n->a);
        int64_t x = int_of(J, n, v, "operand of unary minus");
        if (n->negate && x == INT64_MIN) jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "integer overflow");
        r = v_int(n->negate ? -x : x);
        break;
    }
    case E_NOT: r = v_bool(!truthy(eval(J, n->a))); break;
    case E_AND: {
        struct value a = eval(J, n->a);
        r = truthy(a) ? eval(J, n->b) : a;
        break;
    }
    case E_OR: {
        struct value a = eval(J, n->a);
        r = truthy(a) ? a : eval(J, n->b);
        break;
    }
    case E_BINOP: r = eval_binop(J, n); break;
    case E_COND: r = truthy(eval(J, n->a)) ? eval(J, n->b) : n->c ? eval(J, n->c) : v_undef; break;
    case E_LIST: {
        struct list *l = list_new(J, n->n_kids);
        for (size_t i = 0; i < n->n_kids; i++) list_push(J, l, eval(J, n->kids[i]));
        r = v_list(l);
        break;
    }
    case E_DICT: {
        struct dict *d = dict_new(J, n->n_kids / 2);
        for (size_t i = 0; i + 1 < n->n_kids; i += 2) {
            struct value k = eval(J, n->kids[i]);
            if (k.k != V_STR)
                jfail(J, OPTIML_ERR_UNSUPPORTED, n->line, n->col, "unsupported construct: a %s dict key",
                      kind_name(k.k));
            dict_set(J, d, k, eval(J, n->kids[i + 1]));
        }
        r = v_dict(d);
        break;
    }
    case E_CONCAT: {
        struct sbuf b = {0};
        for (size_t i = 0; i < n->n_kids; i++) value_str(J, &b, eval(J, n->kids[i]), 0, n);
        r = v_sbuf(&b);
        break;
    }
    default: jfail(J, OPTIML_ERR_INTERNAL, n->line, n->col, "internal error: statement evaluated as expression");
    }
    J->depth--;
    return r;
}

/* ---- evaluation: statements ------------------------------------------------------------------ */

enum flow { FLOW_NORMAL, FLOW_BREAK, FLOW_CONTINUE };
static enum flow exec_stmts(struct jinja *J, struct node *const *body, size_t n);

static enum flow exec_for(struct jinja *J, const struct node *n) {
    struct list *items = iter_list(J, n, eval(J, n->a));
    struct scope *outer = J->scope;
    /* "for x in xs if cond": filter first, so loop.length counts what runs */
    if (n->b) {
        struct list *kept = list_new(J, items->n);
        for (size_t i = 0; i < items->n; i++) {
            jsteps(J, 1, n->line, n->col);
            struct scope s = {.parent = outer};
            J->scope = &s;
            scope_set(J, &s, n->name, n->name_len, items->items[i]);
            bool keep = truthy(eval(J, n->b));
            J->scope = outer;
            if (keep) list_push(J, kept, items->items[i]);
        }
        items = kept;
    }
    if (items->n == 0) {
        exec_stmts(J, n->kids2, n->n_kids2);
        return FLOW_NORMAL;
    }
    /* One loop object, updated in place (as Jinja's LoopContext), and one
     * scope whose bindings are reset every iteration. */
    int64_t len = (int64_t)items->n;
    struct dict *loop = dict_new(J, 12);
    struct scope s = {.parent = outer};
    for (int64_t i = 0; i < len; i++) {
        jsteps(J, 1, n->line, n->col);
        s.n = 0;
        struct value item = items->items[i];
        if (n->name2) {
            struct list *pair = item.k == V_LIST ? item.u.list : NULL;
            if (!pair || pair->n != 2)
                jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col, "cannot unpack a %s into two loop variables",
                      kind_name(item.k));
            scope_set(J, &s, n->name, n->name_len, pair->items[0]);
            scope_set(J, &s, n->name2, n->name2_len, pair->items[1]);
        } else {
            scope_set(J, &s, n->name, n->name_len, item);
        }
        const struct value vals[] = {v_int(i + 1), v_int(i), v_int(len - i), v_int(len - i - 1), v_bool(i == 0),
                                     v_bool(i == len - 1), v_int(len), v_int(1), v_int(0),
                                     i > 0 ? items->items[i - 1] : v_undef,
                                     i + 1 < len ? items->items[i + 1] : v_undef};
        if (i == 0) {
            static const char *const keys[] = {"index", "index0", "revindex", "revindex0", "first", "last",
                                               "length", "depth", "depth0", "previtem", "nextitem"};
            for (size_t k = 0; k < 11; k++) dict_set_c(J, loop, keys[k], vals[k]);
        } else {
            memcpy(loop->vals, vals, sizeof(vals)); /* same keys, same order */
        }
        scope_set(J, &s, "loop", 4, v_dict(loop));
        J->scope = &s;
        enum flow f = exec_stmts(J, n->kids, n->n_kids);
        J->scope = outer;
        if (f == FLOW_BREAK) break;
    }
    return FLOW_NORMAL;
}

static enum flow exec_stmts(struct jinja *J, struct node *const *body, size_t n_body) {
    for (size_t i = 0; i < n_body; i++) {
        const struct node *n = body[i];
        jsteps(J, 1, n->line, n->col);
        switch (n->k) {
        case N_TEXT: sb_put(J, J->out, n->lit.u.str.s, n->lit.u.str.n); break;
        case N_OUTPUT: value_str(J, J->out, eval(J, n->a), 0, n); break;
        case N_IF: {
            const struct node *c = n;
            enum flow f;
            for (;;) {
                if (truthy(eval(J, c->a))) {
                    f = exec_stmts(J, c->kids, c->n_kids);
                    break;
                }
                if (c->n_kids2 == 1 && c->kids2[0]->k == N_IF && c->kids2[0]->negate) {
                    c = c->kids2[0];
                    jsteps(J, 1, c->line, c->col);
                    continue;
                }
                f = exec_stmts(J, c->kids2, c->n_kids2);
                break;
            }
            if (f != FLOW_NORMAL) return f;
            break;
        }
        case N_FOR: exec_for(J, n); break;
        case N_SET: scope_set(J, J->scope, n->name, n->name_len, eval(J, n->a)); break;
        case N_SET_ATTR: {
            struct value *ns = scope_find(J->scope, n->name, n->name_len);
            if (!ns || ns->k != V_DICT || !ns->u.dict->is_ns)
                jfail(J, OPTIML_ERR_INVALID_ARG, n->line, n->col,
                      "cannot assign an attribute of a non-namespace object");
            struct value v = eval(J, n->a);
            dict_set(J, ns->u.dict, v_str(n->name2, n->name2_len), v);
            break;
        }
        case N_SET_BLOCK: {
            struct sbuf *saved = J->out, capture = {0};
            J->out = &capture;
            exec_stmts(J, n->kids, n->n_kids);
            J->out = saved;
            scope_set(J, J->scope, n->name, n->name_len, v_sbuf(&capture));
            break;
        }
        case N_BODY: {
            enum flow f = exec_stmts(J, n->kids, n->n_kids);
            if (f != FLOW_NORMAL) return f;
            break;
        }
        case N_BREAK:
        case N_CONTINUE:
            if (!scope_find(J->scope, "loop", 4))
                jfail(J, OPTIML_ERR_FORMAT, n->line, n->col, "syntax error: %s outside a loop",
                      n->k == N_BREAK ? "break" : "continue");
            return n->k == N_BREAK ? FLOW_BREAK : FLOW_CONTINUE;
        default: jfail(J, OPTIML_ERR_INTERNAL, n->line, n->col, "internal error: expression executed as statement");
        }
    }
    return FLOW_NORMAL;
}

/* ---- entry point -------------------------------------------------------------------------- */

struct jinja_limits jinja_default_limits(void) {
    return (struct jinja_limits){
        .max_output = 64u << 20, .max_memory = 512u << 20, .max_steps = 10000000, .max_depth = 64};
}

/* Jinja first turns \r\n and \r into \n and drops one trailing newline. */
static const char *normalize_source(struct jinja *J, const char *src, size_t len, size_t *out_len) {
    char *p = jalloc(J, len + 1);
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (src[i] == '\r') {
            p[n++] = '\n';
            if (i + 1 < len && src[i + 1] == '\n') i++;
        } else {
            p[n++] = src[i];
        }
    }
    if (n && p[n - 1] == '\n') n--;
    p[n] = '\0';
    *out_len = n;
    return p;
}

static void render_all(struct jinja *J, const char *tmpl, size_t tmpl_len, const struct jinja_input *in,
                       struct sbuf *out) {
    size_t src_len;
    const char *src = normalize_source(J, tmpl, tmpl_len, &src_len);
    struct lexer L = {.J = J, .src = src, .n = src_len, .line = 1};
    lex_all(&L);
    struct parser P = {.J = J, .t = L.toks, .n = L.n_toks};
    struct nlist body = {0};
    parse_body(&P, &body, NULL, 0, NULL);

    /* globals */
    struct scope *g = jalloc(J, sizeof(*g));
    memset(g, 0, sizeof(*g));
    struct list *msgs = list_new(J, in->n_msgs);
    for (size_t i = 0; i < in->n_msgs; i++) {
        struct dict *m = dict_new(J, 2);
        const optiml_chat_message *cm = &in->msgs[i];
        dict_set_c(J, m, "role", v_str(cm->role, strlen(cm->role)));
        if (cm->content) dict_set_c(J, m, "content", v_str(cm->content, strlen(cm->content)));
        list_push(J, msgs, v_dict(m));
    }
    const char *bos = in->bos_token ? in->bos_token : "", *eos = in->eos_token ? in->eos_token : "";
    scope_set(J, g, "messages", 8, v_list(msgs));
    scope_set(J, g, "add_generation_prompt", 21, v_bool(in->add_generation_prompt));
    scope_set(J, g, "bos_token", 9, v_str(bos, strlen(bos)));
    scope_set(J, g, "eos_token", 9, v_str(eos, strlen(eos)));
    scope_set(J, g, "tools", 5, v_none);
    scope_set(J, g, "documents", 9, v_none);
    static const struct {
        const char *name;
        enum jfunc fn;
    } fns[] = {{"raise_exception", F_RAISE}, {"namespace", F_NAMESPACE}, {"range", F_RANGE},
               {"dict", F_DICT}, {"strftime_now", F_STRFTIME}};
    for (size_t k = 0; k < sizeof(fns) / sizeof(fns[0]); k++)
        scope_set(J, g, fns[k].name, strlen(fns[k].name), (struct value){.k = V_FUNC, .u.fn = fns[k].fn});
    struct scope *top = jalloc(J, sizeof(*top));
    memset(top, 0, sizeof(*top));
    top->parent = g;
    J->scope = top;
    J->out = out;
    exec_stmts(J, body.p, body.n);
}

optiml_status jinja_render(const char *tmpl, size_t tmpl_len, const struct jinja_input *in,
                           const struct jinja_limits *limits, char **out, size_t *out_len) {
    if (out) *out = NULL;
    if (out_len) *out_len = 0;
    if (!tmpl || !in || !out || !out_len || (in->n_msgs && !in->msgs))
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "jinja_render: NULL argument");
    for (size_t i = 0; i < in->n_msgs; i++)
        if (!in->msgs[i].role) return optiml_fail(OPTIML_ERR_INVALID_ARG, "chat message %zu has no role", i);
    struct jinja *J = calloc(1, sizeof(*J));
    if (!J) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    J->lim = limits ? *limits : jinja_default_limits();
    struct sbuf *result = calloc(1, sizeof(*result));
    optiml_status st = OPTIML_OK;
    if (!result) {
        st = optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    } else if (setjmp(J->fail) == 0) {
        render_all(J, tmpl, tmpl_len, in, result);
        char *text = malloc(result->n + 1);
        if (!text) {
            st = optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
        } else {
            if (result->n) memcpy(text, result->p, result->n);
            text[result->n] = '\0';
            *out = text;
            *out_len = result->n;
        }
    } else {
        st = optiml_fail(J->status, "%s", J->msg);
    }
    for (struct arena_block *b = J->blocks, *next; b; b = next) {
        next = b->next;
        free(b);
    }
    free(result);
    free(J);
    return st;
}
