/*
 * gguf.c - GGUF reader (mmap, a read into memory, or caller buffer; every
 * read bounds-checked)
 * and writer (temporary file renamed into place).
 *
 * Reader: a cursor walks the image; scalars are decoded into struct
 * gguf_value, strings and numeric arrays point into the image, arrays of
 * strings and arrays of arrays are allocated from an arena owned by the
 * gguf_file. Choices the format text leaves open:
 *   - empty keys and empty tensor names are rejected;
 *   - every ne[i] must be >= 1 (no empty tensors) and the element count
 *     must fit in an int64;
 *   - arrays nest at most GGUF_MAX_DEPTH levels; bools must be 0 or 1;
 *   - tensor data must lie inside the data section and must not overlap;
 *   - a file without tensors may end before the padded data section start.
 *
 * Writer: each value is encoded to bytes when it is set (so setting an
 * existing key replaces its bytes in place); tensors are laid out at write
 * time in insertion order, and the last one is not padded, so the file ends
 * where its last tensor ends.
 */
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS, madvise */
#define _POSIX_C_SOURCE 200809L
#include "gguf.h"

#include "dtype.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#error "gguf.c reads and writes little-endian integers with memcpy: big-endian hosts unsupported"
#endif

#define GGUF_MAX_DEPTH 16        /* deepest array nesting accepted            */
#define GGUF_MIN_KV_BYTES 14     /* key length (8), 1 key byte, type (4), u8  */
#define GGUF_MIN_TENSOR_BYTES 33 /* name (8+1), n_dims, one ne, type, offset  */
#define GGUF_MIN_STR_BYTES 8     /* an empty string inside an array           */
#define GGUF_MIN_ARR_BYTES 12    /* an empty array inside an array            */
#define WHY_SIZE 160             /* reason buffers of tensor_check            */

/* ==== value types ========================================================= */

enum kind { KIND_UINT, KIND_INT, KIND_FLOAT, KIND_BOOL, KIND_STR, KIND_ARR };

static const struct type_info {
    const char *name;
    uint8_t size; /* bytes of an encoded scalar; 0 for string and array */
    uint8_t kind;
    int64_t lo; /* integer range */
    uint64_t hi;
} type_info[GGUF_TYPE_COUNT] = {
    [GGUF_TYPE_UINT8] = {"uint8", 1, KIND_UINT, 0, UINT8_MAX},
    [GGUF_TYPE_INT8] = {"int8", 1, KIND_INT, INT8_MIN, INT8_MAX},
    [GGUF_TYPE_UINT16] = {"uint16", 2, KIND_UINT, 0, UINT16_MAX},
    [GGUF_TYPE_INT16] = {"int16", 2, KIND_INT, INT16_MIN, INT16_MAX},
    [GGUF_TYPE_UINT32] = {"uint32", 4, KIND_UINT, 0, UINT32_MAX},
    [GGUF_TYPE_INT32] = {"int32", 4, KIND_INT, INT32_MIN, INT32_MAX},
    [GGUF_TYPE_FLOAT32] = {"float32", 4, KIND_FLOAT, 0, 0},
    [GGUF_TYPE_BOOL] = {"bool", 1, KIND_BOOL, 0, 0},
    [GGUF_TYPE_STRING] = {"string", 0, KIND_STR, 0, 0},
    [GGUF_TYPE_ARRAY] = {"array", 0, KIND_ARR, 0, 0},
    [GGUF_TYPE_UINT64] = {"uint64", 8, KIND_UINT, 0, UINT64_MAX},
    [GGUF_TYPE_INT64] = {"int64", 8, KIND_INT, INT64_MIN, INT64_MAX},
    [GGUF_TYPE_FLOAT64] = {"float64", 8, KIND_FLOAT, 0, 0},
};

const char *gguf_type_name(uint32_t type) {
    return type < GGUF_TYPE_COUNT ? type_info[type].name : "unknown";
}

static bool type_is_scalar(uint32_t t) { return t < GGUF_TYPE_COUNT && type_info[t].size > 0; }

/* Decode one little-endian scalar of type t (type_is_scalar) from b. */
static void scalar_decode(enum gguf_type t, const uint8_t *b, struct gguf_value *v) {
    unsigned shift = 64 - 8 * type_info[t].size;
    uint64_t bits = 0;
    memcpy(&bits, b, type_info[t].size);
    v->type = t;
    switch (type_info[t].kind) {
    case KIND_UINT: v->u64 = bits; break;
    case KIND_INT: v->i64 = (int64_t)(bits << shift) >> shift; break; /* sign-extend */
    case KIND_BOOL: v->b = bits != 0; break;
    default:
        if (t == GGUF_TYPE_FLOAT64) memcpy(&v->f64, &bits, 8);
        else v->f64 = dtype_bits_f32((uint32_t)bits);
    }
}

/* If v is an integer in [lo, hi]: true and its two's-complement bits. */
static bool int_fits(const struct gguf_value *v, int64_t lo, uint64_t hi, uint64_t *bits) {
    uint8_t kind = type_info[v->type].kind;
    if (kind == KIND_UINT && v->u64 <= hi) *bits = v->u64;
    else if (kind == KIND_INT && v->i64 >= lo && (v->i64 < 0 || (uint64_t)v->i64 <= hi))
        *bits = (uint64_t)v->i64;
    else return false;
    return true;
}

/* Encode scalar v as its own type into out; false if the value does not fit. */
static bool scalar_encode(const struct gguf_value *v, uint8_t out[8]) {
    const struct type_info *ti = &type_info[v->type];
    uint64_t bits = 0;
    if (ti->kind == KIND_BOOL) bits = v->b;
    else if (v->type == GGUF_TYPE_FLOAT64) memcpy(&bits, &v->f64, 8);
    else if (v->type == GGUF_TYPE_FLOAT32) bits = dtype_f32_bits((float)v->f64);
    else if (!int_fits(v, ti->lo, ti->hi, &bits)) return false;
    memcpy(out, &bits, ti->size);
    return true;
}

static double value_f64(const struct gguf_value *v) {
    switch (type_info[v->type].kind) {
    case KIND_UINT: return (double)v->u64;
    case KIND_INT: return (double)v->i64;
    case KIND_FLOAT: return v->f64;
    default: return v->b;
    }
}

/* Saturating: out-of-range values clamp, NaN gives 0. */
static int64_t value_i64(const struct gguf_value *v) {
    switch (type_info[v->type].kind) {
    case KIND_UINT: return v->u64 > INT64_MAX ? INT64_MAX : (int64_t)v->u64;
    case KIND_INT: return v->i64;
    case KIND_FLOAT:
        if (v->f64 != v->f64) return 0;
        if (v->f64 >= 0x1p63) return INT64_MAX;
        return v->f64 < -0x1p63 ? INT64_MIN : (int64_t)v->f64;
    default: return v->b;
    }
}

/* ==== tensor shape (shared by reader and writer) ========================= */

static OPTIML_PRINTF(3, 4) optiml_status why_set(optiml_status st, char *why, const char *fmt,
                                                 ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, WHY_SIZE, fmt, ap);
    va_end(ap);
    return st;
}

/* Check a tensor's dims, element count and type: on success *size is its
 * byte size, else why[WHY_SIZE] says what is wrong. */
static optiml_status tensor_check(uint32_t type, uint32_t n_dims, const uint64_t *ne,
                                  uint64_t *size, char *why) {
    const optiml_status bad = OPTIML_ERR_FORMAT;
    uint64_t count = 1, row;
    if (n_dims < 1 || n_dims > GGUF_MAX_DIMS)
        return why_set(bad, why, "n_dims %" PRIu32 " is not in 1..%d", n_dims, GGUF_MAX_DIMS);
    for (uint32_t d = 0; d < n_dims; d++) {
        if (ne[d] == 0 || ne[d] > INT64_MAX)
            return why_set(bad, why, "ne[%" PRIu32 "] = %" PRIu64 " is not in 1..2^63-1", d, ne[d]);
        if (!mul_u64_ok(count, ne[d], &count) || count > INT64_MAX)
            return why_set(bad, why, "element count overflows at ne[%" PRIu32 "]", d);
    }
    if (!dtype_is_known(type))
        return why_set(OPTIML_ERR_UNSUPPORTED, why, "unknown tensor type %" PRIu32, type);
    if (ne[0] % dtype_block_size(type) != 0)
        return why_set(bad, why, "ne[0] = %" PRIu64 " is not a multiple of the %s block size "
                       "%" PRIu32, ne[0], dtype_name(type), dtype_block_size(type));
    if (!dtype_row_size(type, ne[0], &row) || !mul_u64_ok(row, count / ne[0], size))
        return why_set(bad, why, "byte size of %" PRIu64 " elements overflows", count);
    return OPTIML_OK;
}

/* ==== file object and its arena ========================================== */

struct arena_block {
    struct arena_block *next;
    max_align_t data[];
};

/* What gguf_file.arena points to: the blocks, and the name for messages. */
struct gguf_priv {
    struct arena_block *blocks;
    char name[];
};

static const char *file_name(const gguf_file *f) {
    return ((const struct gguf_priv *)f->arena)->name;
}

/* Zeroed memory for n elements of elem bytes, freed by gguf_close. */
static void *file_alloc(gguf_file *f, uint64_t n, uint64_t elem) {
    struct gguf_priv *p = f->arena;
    uint64_t bytes;
    if (!mul_u64_ok(n, elem, &bytes) || bytes > SIZE_MAX - sizeof(struct arena_block)) return NULL;
    struct arena_block *b = calloc(1, sizeof *b + (size_t)bytes);
    if (!b) return NULL;
    b->next = p->blocks;
    p->blocks = b;
    return b->data;
}

void gguf_close(gguf_file *f) {
    if (!f) return;
    struct gguf_priv *p = f->arena;
    for (struct arena_block *b = p ? p->blocks : NULL, *next; b; b = next) {
        next = b->next;
        free(b);
    }
    free(p);
    if (f->map) munmap(f->map, (size_t)f->map_size);
    free(f);
}

/* ==== reader: bounds-checked cursor ====================================== */

struct cursor {
    const uint8_t *base;
    uint64_t size, pos;
    const char *name; /* the file, for messages                       */
    char what[112];   /* what is being read: "key 'x'", "tensor #3"   */
    gguf_file *f;
};

static OPTIML_PRINTF(4, 5) optiml_status cur_fail(struct cursor *c, optiml_status st,
                                                  uint64_t off, const char *fmt, ...) {
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return optiml_fail(st, "%s: %s at offset %" PRIu64 ": %s", c->name, c->what, off, msg);
}

/* what = "kind 'name'", control bytes shown as '?', long names cut. */
static void cur_named(struct cursor *c, const char *kind, struct gguf_str s) {
    char clean[64];
    size_t n = s.n < sizeof clean ? (size_t)s.n : sizeof clean;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s.data[i];
        clean[i] = (char)(ch < 0x20 || ch == 0x7f ? '?' : ch);
    }
    snprintf(c->what, sizeof c->what, "%s '%.*s%s'", kind, (int)n, clean, s.n > n ? "..." : "");
}

/* File offset of the length field of a string read from the image. */
static uint64_t cur_str_offset(const struct cursor *c, const struct gguf_str *s) {
    return (uint64_t)((const uint8_t *)s->data - c->base) - 8;
}

static optiml_status cur_take(struct cursor *c, uint64_t n, const char *item, const uint8_t **out) {
    uint64_t left = c->size - c->pos;
    if (n > left)
        return cur_fail(c, OPTIML_ERR_FORMAT, c->pos,
                        "truncated: %s needs %" PRIu64 " bytes, %" PRIu64 " left", item, n, left);
    *out = c->base + c->pos;
    c->pos += n;
    return OPTIML_OK;
}

static optiml_status cur_copy(struct cursor *c, const char *item, void *v, uint64_t n) {
    const uint8_t *p = NULL;
    TRY(cur_take(c, n, item, &p));
    memcpy(v, p, (size_t)n);
    return OPTIML_OK;
}

static optiml_status cur_u32(struct cursor *c, const char *item, uint32_t *v) {
    return cur_copy(c, item, v, 4);
}

static optiml_status cur_u64(struct cursor *c, const char *item, uint64_t *v) {
    return cur_copy(c, item, v, 8);
}

static optiml_status cur_str(struct cursor *c, const char *item, struct gguf_str *s) {
    const uint8_t *p = NULL;
    TRY(cur_u64(c, item, &s->n));
    TRY(cur_take(c, s->n, item, &p));
    s->data = (const char *)p;
    return OPTIML_OK;
}

/* A u64 count of items of at least min_size bytes each, which must all fit
 * in what is left (so a corrupt count cannot cause a huge allocation). */
static optiml_status cur_count(struct cursor *c, const char *item, uint64_t min_size, uint64_t *n) {
    uint64_t off = c->pos;
    TRY(cur_u64(c, item, n));
    if (*n > (c->size - c->pos) / min_size)
        return cur_fail(c, OPTIML_ERR_FORMAT, off, "%s %" PRIu64 " is more than the %" PRIu64
                        " bytes left can hold", item, *n, c->size - c->pos);
    return OPTIML_OK;
}

/* A value type tag (< GGUF_TYPE_COUNT). */
static optiml_status cur_type(struct cursor *c, const char *item, uint32_t *t) {
    uint64_t off = c->pos;
    TRY(cur_u32(c, item, t));
    if (*t >= GGUF_TYPE_COUNT)
        return cur_fail(c, OPTIML_ERR_FORMAT, off, "unknown %s %" PRIu32, item, *t);
    return OPTIML_OK;
}

/* ==== reader: metadata values ============================================ */

static optiml_status check_bools(struct cursor *c, const uint8_t *p, uint64_t n) {
    for (uint64_t i = 0; i < n; i++)
        if (p[i] > 1)
            return cur_fail(c, OPTIML_ERR_FORMAT, (uint64_t)(p + i - c->base),
                            "bool byte %u is not 0 or 1", p[i]);
    return OPTIML_OK;
}

/* elem_type | n | elements; depth counts array levels from 1. */
static optiml_status read_array(struct cursor *c, struct gguf_value *v, int depth) {
    uint32_t et;
    uint64_t n, off = c->pos;
    const uint8_t *p = NULL;
    if (depth > GGUF_MAX_DEPTH)
        return cur_fail(c, OPTIML_ERR_FORMAT, off, "arrays nested deeper than %d levels",
                        GGUF_MAX_DEPTH);
    TRY(cur_type(c, "array element type", &et));
    bool strs = et == GGUF_TYPE_STRING;
    uint64_t min = type_is_scalar(et) ? type_info[et].size
                   : strs                ? GGUF_MIN_STR_BYTES
                                         : GGUF_MIN_ARR_BYTES;
    TRY(cur_count(c, "array length", min, &n));
    v->type = GGUF_TYPE_ARRAY;
    v->arr.type = (enum gguf_type)et;
    v->arr.n = n;
    if (type_is_scalar(et)) {
        TRY(cur_take(c, n * min, "array data", &p));
        v->arr.data = p;
        return et == GGUF_TYPE_BOOL ? check_bools(c, p, n) : OPTIML_OK;
    }
    void *elems = file_alloc(c->f, n, strs ? sizeof(struct gguf_str) : sizeof(struct gguf_value));
    if (!elems) return cur_fail(c, OPTIML_ERR_NOMEM, off, "no memory for %" PRIu64 " elements", n);
    v->arr.data = elems;
    for (uint64_t i = 0; i < n; i++) {
        if (strs) TRY(cur_str(c, "string", (struct gguf_str *)elems + i));
        else TRY(read_array(c, (struct gguf_value *)elems + i, depth + 1));
    }
    return OPTIML_OK;
}

static optiml_status read_value(struct cursor *c, enum gguf_type t, struct gguf_value *v) {
    const uint8_t *p = NULL;
    memset(v, 0, sizeof *v);
    v->type = t;
    if (t == GGUF_TYPE_STRING) return cur_str(c, "string", &v->str);
    if (t == GGUF_TYPE_ARRAY) return read_array(c, v, 1);
    TRY(cur_take(c, type_info[t].size, type_info[t].name, &p));
    if (t == GGUF_TYPE_BOOL) TRY(check_bools(c, p, 1));
    scalar_decode(t, p, v);
    return OPTIML_OK;
}

/* ==== reader: header, key/values, tensor infos, data ===================== */

static optiml_status read_header(struct cursor *c, gguf_file *f) {
    uint32_t magic, v;
    optiml_status unsup = OPTIML_ERR_UNSUPPORTED;
    snprintf(c->what, sizeof c->what, "header");
    TRY(cur_u32(c, "magic", &magic));
    if (magic != GGUF_MAGIC && magic != GGUF_MAGIC_POWERINFER)
        return cur_fail(c, OPTIML_ERR_FORMAT, 0, "bad magic 0x%08" PRIx32 " (not GGUF or PWRI)", magic);
    f->powerinfer = magic == GGUF_MAGIC_POWERINFER;
    TRY(cur_u32(c, "version", &f->version));
    v = f->version;
    if (v == 1)
        return cur_fail(c, unsup, 4, "GGUF version 1 is not supported; convert to version 3");
    if (__builtin_bswap32(v) == 2 || __builtin_bswap32(v) == 3)
        return cur_fail(c, unsup, 4, "big-endian GGUF files are not supported");
    if (v != 2 && v != 3) return cur_fail(c, unsup, 4, "unknown GGUF version %" PRIu32, v);
    TRY(cur_count(c, "tensor count", GGUF_MIN_TENSOR_BYTES, &f->n_tensors));
    return cur_count(c, "key count", GGUF_MIN_KV_BYTES, &f->n_kv);
}

static optiml_status read_kvs(struct cursor *c, gguf_file *f) {
    uint32_t t;
    if (!(f->kv = file_alloc(f, f->n_kv, sizeof *f->kv)))
        return cur_fail(c, OPTIML_ERR_NOMEM, c->pos, "out of memory");
    for (uint64_t i = 0; i < f->n_kv; i++) {
        struct gguf_kv *kv = &f->kv[i];
        kv->offset = c->pos;
        snprintf(c->what, sizeof c->what, "key #%" PRIu64, i);
        TRY(cur_str(c, "key", &kv->key));
        if (kv->key.n == 0) return cur_fail(c, OPTIML_ERR_FORMAT, kv->offset, "empty key");
        cur_named(c, "key", kv->key);
        TRY(cur_type(c, "value type", &t));
        TRY(read_value(c, (enum gguf_type)t, &kv->value));
    }
    return OPTIML_OK;
}

static int str_ptr_cmp(const void *a, const void *b) {
    const struct gguf_str *x = *(const struct gguf_str *const *)a;
    const struct gguf_str *y = *(const struct gguf_str *const *)b;
    int r = memcmp(x->data, y->data, (size_t)(x->n < y->n ? x->n : y->n));
    return r ? r : (x->n > y->n) - (x->n < y->n);
}

static int tensor_ptr_cmp(const void *a, const void *b) {
    const struct gguf_tensor_info *x = *(const struct gguf_tensor_info *const *)a;
    const struct gguf_tensor_info *y = *(const struct gguf_tensor_info *const *)b;
    return (x->offset > y->offset) - (x->offset < y->offset);
}

/* Pointers to n items stride bytes apart from first, sorted by cmp; the
 * caller frees the array. */
static optiml_status sorted_ptrs(struct cursor *c, const void *first, size_t stride, uint64_t n,
                                 int (*cmp)(const void *, const void *), const void ***out) {
    const void **v = malloc((size_t)(n ? n : 1) * sizeof *v);
    if (!(*out = v)) return cur_fail(c, OPTIML_ERR_NOMEM, c->pos, "out of memory");
    for (uint64_t i = 0; i < n; i++) v[i] = (const char *)first + i * stride;
    qsort(v, (size_t)n, sizeof *v, cmp);
    return OPTIML_OK;
}

/* n names, stride bytes apart from first, must be distinct. */
static optiml_status check_unique(struct cursor *c, const char *kind, const struct gguf_str *first,
                                  size_t stride, uint64_t n) {
    const void **v;
    TRY(sorted_ptrs(c, first, stride, n, str_ptr_cmp, &v));
    optiml_status st = OPTIML_OK;
    for (uint64_t i = 1; i < n && st == OPTIML_OK; i++) {
        if (str_ptr_cmp(&v[i - 1], &v[i]) != 0) continue;
        const struct gguf_str *a = v[i - 1], *b = v[i];
        if (a->data > b->data) { /* report the later one */
            a = v[i];
            b = v[i - 1];
        }
        cur_named(c, kind, *b);
        st = cur_fail(c, OPTIML_ERR_FORMAT, cur_str_offset(c, b),
                      "duplicate %s (first at offset %" PRIu64 ")", kind, cur_str_offset(c, a));
    }
    free(v);
    return st;
}

static optiml_status read_alignment(struct cursor *c, gguf_file *f) {
    int64_t i = gguf_find_key(f, "general.alignment");
    f->alignment = GGUF_DEFAULT_ALIGNMENT;
    if (i < 0) return OPTIML_OK;
    const struct gguf_kv *kv = &f->kv[i];
    uint64_t a = kv->value.u64;
    cur_named(c, "key", kv->key);
    if (kv->value.type != GGUF_TYPE_UINT32)
        return cur_fail(c, OPTIML_ERR_FORMAT, kv->offset, "alignment is %s, must be uint32",
                        gguf_type_name(kv->value.type));
    if (a == 0 || (a & (a - 1)) != 0)
        return cur_fail(c, OPTIML_ERR_FORMAT, kv->offset,
                        "alignment %" PRIu64 " is not a power of two", a);
    f->alignment = (uint32_t)a;
    return OPTIML_OK;
}

/* A PowerInfer file numbers tensor types as the ggml it was written with:
 * 0-15 as today, then i8, i16, i32 (now 24-26), nothing above. */
static optiml_status powerinfer_type(struct cursor *c, uint64_t off, uint32_t *type) {
    if (*type > 18)
        return cur_fail(c, OPTIML_ERR_UNSUPPORTED, off, "tensor type %" PRIu32 " is not one of "
                        "PowerInfer's (0..18)", *type);
    if (*type >= 16) *type = DTYPE_I8 + (*type - 16);
    return OPTIML_OK;
}

static optiml_status read_tensor_info(struct cursor *c, struct gguf_tensor_info *t, uint64_t i) {
    uint64_t off = c->pos;
    char why[WHY_SIZE];
    snprintf(c->what, sizeof c->what, "tensor #%" PRIu64, i);
    TRY(cur_str(c, "tensor name", &t->name));
    if (t->name.n == 0) return cur_fail(c, OPTIML_ERR_FORMAT, off, "empty tensor name");
    cur_named(c, "tensor", t->name);
    TRY(cur_u32(c, "n_dims", &t->n_dims));
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    /* n_dims > 4 reads 4 dims here and fails in tensor_check below */
    for (uint32_t d = 0; d < t->n_dims && d < GGUF_MAX_DIMS; d++) TRY(cur_u64(c, "ne", &t->ne[d]));
    TRY(cur_u32(c, "tensor type", &t->type));
    TRY(cur_u64(c, "data offset", &t->offset));
    if (c->f->powerinfer) TRY(powerinfer_type(c, off, &t->type));
    optiml_status st = tensor_check(t->type, t->n_dims, t->ne, &t->size, why);
    return st == OPTIML_OK ? st : cur_fail(c, st, off, "%s", why);
}

static optiml_status read_tensor_infos(struct cursor *c, gguf_file *f) {
    if (!(f->tensors = file_alloc(f, f->n_tensors, sizeof *f->tensors)))
        return cur_fail(c, OPTIML_ERR_NOMEM, c->pos, "out of memory");
    for (uint64_t i = 0; i < f->n_tensors; i++) TRY(read_tensor_info(c, &f->tensors[i], i));
    snprintf(c->what, sizeof c->what, "data section");
    f->data_offset = align_up_u64(c->pos, f->alignment);
    if (f->data_offset > f->size && f->n_tensors == 0) f->data_offset = f->size;
    if (f->data_offset <= f->size) return OPTIML_OK;
    return cur_fail(c, OPTIML_ERR_FORMAT, c->pos, "truncated: data section starts at %" PRIu64
                    ", past the end (%" PRIu64 ")", f->data_offset, f->size);
}

static optiml_status place_tensor(struct cursor *c, gguf_file *f, struct gguf_tensor_info *t) {
    uint64_t data_size = f->size - f->data_offset, off = cur_str_offset(c, &t->name);
    cur_named(c, "tensor", t->name);
    if (t->offset % f->alignment != 0)
        return cur_fail(c, OPTIML_ERR_FORMAT, off, "data offset %" PRIu64
                        " is not a multiple of the alignment %" PRIu32, t->offset, f->alignment);
    if (t->offset > data_size || t->size > data_size - t->offset)
        return cur_fail(c, OPTIML_ERR_FORMAT, off, "data [%" PRIu64 ", +%" PRIu64 ") lies outside "
                        "the %" PRIu64 "-byte data section", t->offset, t->size, data_size);
    t->data = f->base + f->data_offset + t->offset;
    return OPTIML_OK;
}

/* Bounds and alignment of each tensor, then no two may overlap. */
static optiml_status place_tensors(struct cursor *c, gguf_file *f) {
    const void **v;
    for (uint64_t i = 0; i < f->n_tensors; i++) TRY(place_tensor(c, f, &f->tensors[i]));
    TRY(sorted_ptrs(c, f->tensors, sizeof *f->tensors, f->n_tensors, tensor_ptr_cmp, &v));
    optiml_status st = OPTIML_OK;
    for (uint64_t i = 1; i < f->n_tensors && st == OPTIML_OK; i++) {
        const struct gguf_tensor_info *a = v[i - 1], *b = v[i];
        if (a->offset + a->size <= b->offset) continue;
        cur_named(c, "tensor", b->name);
        st = cur_fail(c, OPTIML_ERR_FORMAT, cur_str_offset(c, &b->name),
                      "data at %" PRIu64 " overlaps tensor '%.*s' at %" PRIu64, b->offset,
                      (int)(a->name.n < 64 ? a->name.n : 64), a->name.data, a->offset);
    }
    free(v);
    return st;
}

static optiml_status parse_all(gguf_file *f) {
    struct cursor c = {.base = f->base, .size = f->size, .name = file_name(f), .f = f};
    TRY(read_header(&c, f));
    TRY(read_kvs(&c, f));
    TRY(check_unique(&c, "key", &f->kv->key, sizeof *f->kv, f->n_kv));
    TRY(read_alignment(&c, f));
    TRY(read_tensor_infos(&c, f));
    TRY(check_unique(&c, "tensor", &f->tensors->name, sizeof *f->tensors, f->n_tensors));
    return place_tensors(&c, f);
}

optiml_status gguf_parse(const void *buf, uint64_t size, const char *name, gguf_file **out) {
    if (!out || (!buf && size))
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "gguf_parse: NULL argument");
    name = name ? name : "<buffer>";
    gguf_file *f = calloc(1, sizeof *f);
    struct gguf_priv *p = malloc(sizeof *p + strlen(name) + 1);
    *out = NULL;
    if (!f || !p) {
        free(f);
        free(p);
        return optiml_fail(OPTIML_ERR_NOMEM, "%s: out of memory", name);
    }
    p->blocks = NULL;
    strcpy(p->name, name);
    f->arena = p;
    f->base = buf;
    f->size = size;
    optiml_status st = parse_all(f);
    if (st == OPTIML_OK) *out = f;
    else gguf_close(f);
    return st;
}

/* The file's bytes in anonymous memory (gguf_open_ex without mmap), with
 * transparent huge pages asked for where Linux has them (one TLB entry for
 * 2 MiB of weights; a mapped file stays in 4 KiB page-cache pages). On the
 * Xeon of the GPU host the sparse FFN's scattered rows ran no faster with
 * them (bench/RESULTS.md, sixth session); the copy costs the read and,
 * while the page cache keeps the file, twice its memory. */
static optiml_status read_whole(int fd, uint64_t size, const char *path, void **out) {
    void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return optiml_fail(OPTIML_ERR_NOMEM, "%s: cannot allocate %" PRIu64 " bytes to read the file into: %s", path,
                           size, strerror(errno));
#ifdef MADV_HUGEPAGE
    (void)madvise(p, (size_t)size, MADV_HUGEPAGE); /* a hint: 4 KiB pages if refused */
#endif
    for (uint64_t off = 0; off < size;) {
        const size_t chunk = size - off < ((size_t)1 << 30) ? (size_t)(size - off) : (size_t)1 << 30;
        const ssize_t r = pread(fd, (char *)p + off, chunk, (off_t)off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            const char *why = r < 0 ? strerror(errno) : "the file shrank";
            munmap(p, (size_t)size);
            return optiml_fail(OPTIML_ERR_IO, "%s: read failed at byte %" PRIu64 " of %" PRIu64 ": %s", path, off,
                               size, why);
        }
        off += (uint64_t)r;
    }
    (void)mprotect(p, (size_t)size, PROT_READ); /* as a mapped file: read-only */
    *out = p;
    return OPTIML_OK;
}

optiml_status gguf_open_ex(const char *path, bool use_mmap, gguf_file **out) {
    struct stat sb;
    void *map = NULL;
    if (!path || !out) return optiml_fail(OPTIML_ERR_INVALID_ARG, "gguf_open: NULL argument");
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return optiml_fail(OPTIML_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    bool ok = fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode) && (uint64_t)sb.st_size <= SIZE_MAX;
    uint64_t size = ok ? (uint64_t)sb.st_size : 0;
    if (ok && size > 0 && !use_mmap) {
        const optiml_status st = read_whole(fd, size, path, &map);
        close(fd);
        if (st != OPTIML_OK) return st;
    } else {
        if (ok && size > 0) map = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
        int e = errno;
        close(fd);
        if (!ok || map == MAP_FAILED)
            return optiml_fail(OPTIML_ERR_IO, "%s: cannot map %s: %s", path,
                               ok ? "the file" : "a non-regular file", ok ? strerror(e) : "-");
    }
    optiml_status st = gguf_parse(map, size, path, out);
    if (st != OPTIML_OK) {
        if (map) munmap(map, (size_t)size);
        return st;
    }
    (*out)->map = map;
    (*out)->map_size = size;
    return OPTIML_OK;
}

optiml_status gguf_open(const char *path, gguf_file **out) { return gguf_open_ex(path, true, out); }

/* ==== lookups and typed getters ========================================== */

bool gguf_str_eq(struct gguf_str s, const char *cstr) {
    size_t n = strlen(cstr);
    return s.n == n && (n == 0 || memcmp(s.data, cstr, n) == 0);
}

char *gguf_str_dup(struct gguf_str s) {
    char *p = s.n < SIZE_MAX ? malloc((size_t)s.n + 1) : NULL;
    if (!p) return NULL;
    if (s.n) memcpy(p, s.data, (size_t)s.n);
    p[s.n] = '\0';
    return p;
}

int64_t gguf_find_key(const gguf_file *f, const char *key) {
    for (uint64_t i = 0; f && key && i < f->n_kv; i++)
        if (gguf_str_eq(f->kv[i].key, key)) return (int64_t)i;
    return -1;
}

const struct gguf_value *gguf_get(const gguf_file *f, const char *key) {
    int64_t i = gguf_find_key(f, key);
    return i < 0 ? NULL : &f->kv[i].value;
}

const struct gguf_tensor_info *gguf_find_tensor(const gguf_file *f, const char *name) {
    for (uint64_t i = 0; f && name && i < f->n_tensors; i++)
        if (gguf_str_eq(f->tensors[i].name, name)) return &f->tensors[i];
    return NULL;
}

/* The value a typed getter asked for; a missing key is recorded without
 * logging (the caller may fall back to a default). */
static optiml_status get_value(const gguf_file *f, const char *key, const struct gguf_value **v) {
    if ((*v = gguf_get(f, key))) return OPTIML_OK;
    optiml_set_error("%s: key '%s' not found", f ? file_name(f) : "gguf", key ? key : "(null)");
    return OPTIML_ERR_INVALID_ARG;
}

static optiml_status get_mismatch(const gguf_file *f, const char *key, const struct gguf_value *v,
                                  const char *expected) {
    const struct gguf_kv *kv = (const void *)((const char *)v - offsetof(struct gguf_kv, value));
    bool arr = v->type == GGUF_TYPE_ARRAY;
    return optiml_fail(OPTIML_ERR_FORMAT, "%s: key '%s' at offset %" PRIu64 " is %s%s%s, "
                       "expected %s", file_name(f), key, kv->offset, gguf_type_name(v->type),
                       arr ? " of " : "", arr ? gguf_type_name(v->arr.type) : "", expected);
}

static optiml_status get_int(const gguf_file *f, const char *key, int64_t lo, uint64_t hi,
                             const char *expected, uint64_t *bits) {
    const struct gguf_value *v;
    TRY(get_value(f, key, &v));
    return int_fits(v, lo, hi, bits) ? OPTIML_OK : get_mismatch(f, key, v, expected);
}

optiml_status gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out) {
    uint64_t bits = 0;
    TRY(get_int(f, key, 0, UINT32_MAX, "an integer in uint32 range", &bits));
    *out = (uint32_t)bits;
    return OPTIML_OK;
}

optiml_status gguf_get_i64(const gguf_file *f, const char *key, int64_t *out) {
    uint64_t bits = 0;
    TRY(get_int(f, key, INT64_MIN, INT64_MAX, "an integer in int64 range", &bits));
    *out = (int64_t)bits;
    return OPTIML_OK;
}

/* Getters of one value kind: *out = v->field. */
#define GGUF_GET_KIND(suffix, ctype, want, field, expected)                            \
    optiml_status gguf_get_##suffix(const gguf_file *f, const char *key, ctype *out) { \
        const struct gguf_value *v;                                                    \
        TRY(get_value(f, key, &v));                                                    \
        if (type_info[v->type].kind != want) return get_mismatch(f, key, v, expected); \
        *out = v->field;                                                               \
        return OPTIML_OK;                                                              \
    }
GGUF_GET_KIND(f32, float, KIND_FLOAT, f64, "float32/float64")
GGUF_GET_KIND(bool, bool, KIND_BOOL, b, "bool")
GGUF_GET_KIND(str, struct gguf_str, KIND_STR, str, "string")
#undef GGUF_GET_KIND

optiml_status gguf_get_arr(const gguf_file *f, const char *key, enum gguf_type elem_type,
                           const struct gguf_value **out) {
    const struct gguf_value *v;
    char expected[40];
    TRY(get_value(f, key, &v));
    if (v->type == GGUF_TYPE_ARRAY && (elem_type == GGUF_TYPE_COUNT || v->arr.type == elem_type)) {
        *out = v;
        return OPTIML_OK;
    }
    snprintf(expected, sizeof expected, "array of %s",
             elem_type == GGUF_TYPE_COUNT ? "any type" : gguf_type_name(elem_type));
    return get_mismatch(f, key, v, expected);
}

#define GGUF_GET_OR(suffix, ctype)                                                            \
    optiml_status gguf_get_##suffix##_or(const gguf_file *f, const char *key, ctype def,      \
                                         ctype *out) {                                        \
        if (gguf_get(f, key)) return gguf_get_##suffix(f, key, out);                          \
        *out = def;                                                                           \
        return OPTIML_OK;                                                                     \
    }
GGUF_GET_OR(u32, uint32_t)
GGUF_GET_OR(f32, float)
GGUF_GET_OR(bool, bool)
#undef GGUF_GET_OR

/* Element i of a numeric array, decoded (0 for other arrays). */
static struct gguf_value arr_elem(const struct gguf_value *arr, uint64_t i) {
    struct gguf_value e = {.type = GGUF_TYPE_UINT64, .u64 = 0};
    bool ok = arr->type == GGUF_TYPE_ARRAY && type_is_scalar(arr->arr.type) && i < arr->arr.n;
    assert(ok);
    if (ok)
        scalar_decode(arr->arr.type,
                      (const uint8_t *)arr->arr.data + i * type_info[arr->arr.type].size, &e);
    return e;
}

double gguf_arr_f64(const struct gguf_value *arr, uint64_t i) {
    struct gguf_value e = arr_elem(arr, i);
    return value_f64(&e);
}

int64_t gguf_arr_i64(const struct gguf_value *arr, uint64_t i) {
    struct gguf_value e = arr_elem(arr, i);
    return value_i64(&e);
}

/* ==== writer: byte buffer ================================================ */

struct wbuf {
    uint8_t *p;
    size_t n, cap;
    bool oom;
};

/* Append n bytes of src (zeros if src is NULL). */
static void wbuf_put(struct wbuf *b, const void *src, uint64_t n) {
    if (b->oom || n == 0) return;
    if (n > b->cap - b->n) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap - b->n < n && cap <= SIZE_MAX / 2) cap *= 2;
        uint8_t *p = cap - b->n >= n ? realloc(b->p, cap) : NULL;
        if (!p) {
            b->oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    if (src) memcpy(b->p + b->n, src, (size_t)n);
    else memset(b->p + b->n, 0, (size_t)n);
    b->n += (size_t)n;
}

static void wbuf_u32(struct wbuf *b, uint32_t v) { wbuf_put(b, &v, 4); }
static void wbuf_u64(struct wbuf *b, uint64_t v) { wbuf_put(b, &v, 8); }

static void wbuf_str(struct wbuf *b, const char *s, uint64_t n) {
    wbuf_u64(b, n);
    wbuf_put(b, s, n);
}

/* ==== writer: value encoding ============================================= */

static OPTIML_PRINTF(2, 3) optiml_status enc_fail(const char *key, const char *fmt, ...) {
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return optiml_fail(OPTIML_ERR_INVALID_ARG, "gguf writer: key '%s': %s", key, msg);
}

static optiml_status enc_payload(struct wbuf *b, const char *key, const struct gguf_value *v,
                                 int depth);

static optiml_status enc_array(struct wbuf *b, const char *key, const struct gguf_value *v,
                               int depth) {
    uint32_t et = v->arr.type;
    uint64_t n = v->arr.n, bytes;
    const uint8_t *raw = v->arr.data;
    if (depth > GGUF_MAX_DEPTH)
        return enc_fail(key, "arrays nested deeper than %d levels", GGUF_MAX_DEPTH);
    if (et >= GGUF_TYPE_COUNT) return enc_fail(key, "unknown array element type %" PRIu32, et);
    if (n && !raw) return enc_fail(key, "array data is NULL");
    wbuf_u32(b, et);
    wbuf_u64(b, n);
    if (type_is_scalar(et)) {
        if (!mul_u64_ok(n, type_info[et].size, &bytes) || bytes > SIZE_MAX)
            return enc_fail(key, "array of %" PRIu64 " elements is too large", n);
        for (uint64_t i = 0; et == GGUF_TYPE_BOOL && i < n; i++)
            if (raw[i] > 1) return enc_fail(key, "bool element %" PRIu64 " is not 0 or 1", i);
        wbuf_put(b, raw, bytes);
        return OPTIML_OK;
    }
    for (uint64_t i = 0; i < n; i++) {
        struct gguf_value e = {.type = GGUF_TYPE_STRING};
        if (et == GGUF_TYPE_STRING) e.str = ((const struct gguf_str *)raw)[i];
        else e = ((const struct gguf_value *)raw)[i];
        if (e.type != et)
            return enc_fail(key, "element %" PRIu64 " of an array of %s is %s", i,
                            gguf_type_name(et), gguf_type_name(e.type));
        TRY(enc_payload(b, key, &e, depth));
    }
    return OPTIML_OK;
}

/* The bytes of v after its type tag; depth = array levels around v. */
static optiml_status enc_payload(struct wbuf *b, const char *key, const struct gguf_value *v,
                                 int depth) {
    uint8_t raw[8];
    if ((unsigned)v->type >= GGUF_TYPE_COUNT)
        return enc_fail(key, "unknown value type %u", (unsigned)v->type);
    if (v->type == GGUF_TYPE_ARRAY) return enc_array(b, key, v, depth + 1);
    if (v->type == GGUF_TYPE_STRING) {
        if (v->str.n && !v->str.data) return enc_fail(key, "string data is NULL");
        wbuf_str(b, v->str.data, v->str.n);
        return OPTIML_OK;
    }
    if (!scalar_encode(v, raw))
        return enc_fail(key, "value out of %s range", gguf_type_name(v->type));
    wbuf_put(b, raw, type_info[v->type].size);
    return OPTIML_OK;
}

/* ==== writer: keys and tensors =========================================== */

struct writer_kv {
    char *key;
    enum gguf_type type;
    struct wbuf enc; /* u32 type | payload */
};

struct writer_tensor {
    char *name;
    uint32_t type, n_dims;
    uint64_t ne[GGUF_MAX_DIMS];
    uint64_t size, offset;
    const void *data;
    gguf_fill_fn fill;
    void *user;
};

struct gguf_writer {
    struct writer_kv *kv;
    size_t n_kv, cap_kv;
    struct writer_tensor *tensors;
    size_t n_tensors, cap_tensors;
};

/* Room for one more element: the (possibly moved) array, or NULL (p kept). */
static void *grow(void *p, size_t *cap, size_t n, size_t elem) {
    size_t c = *cap ? *cap * 2 : 16;
    if (n < *cap) return p;
    void *q = c <= SIZE_MAX / elem ? realloc(p, c * elem) : NULL;
    if (q) *cap = c;
    return q;
}

gguf_writer *gguf_writer_init(void) { return calloc(1, sizeof(gguf_writer)); }

void gguf_writer_free(gguf_writer *w) {
    for (size_t i = 0; w && i < w->n_kv; i++) {
        free(w->kv[i].key);
        free(w->kv[i].enc.p);
    }
    for (size_t i = 0; w && i < w->n_tensors; i++) free(w->tensors[i].name);
    if (w) {
        free(w->kv);
        free(w->tensors);
    }
    free(w);
}

static struct writer_kv *writer_find_kv(const gguf_writer *w, const char *key) {
    for (size_t i = 0; i < w->n_kv; i++)
        if (strcmp(w->kv[i].key, key) == 0) return &w->kv[i];
    return NULL;
}

/* Store an encoded value under key, replacing in place; takes b's bytes. */
static optiml_status writer_store_kv(gguf_writer *w, const char *key, enum gguf_type t,
                                     struct wbuf *b) {
    struct writer_kv *kv = writer_find_kv(w, key);
    if (!kv) {
        char *k = strdup(key);
        struct writer_kv *arr = grow(w->kv, &w->cap_kv, w->n_kv, sizeof *w->kv);
        if (arr) w->kv = arr;
        if (!k || !arr) {
            free(k);
            return optiml_fail(OPTIML_ERR_NOMEM, "gguf writer: key '%s': out of memory", key);
        }
        kv = &w->kv[w->n_kv++];
        *kv = (struct writer_kv){.key = k};
    }
    free(kv->enc.p);
    kv->enc = *b;
    kv->type = t;
    return OPTIML_OK;
}

optiml_status gguf_writer_set_value(gguf_writer *w, const char *key, const struct gguf_value *v) {
    struct wbuf b = {0};
    if (!w || !key || !*key || !v)
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "gguf writer: set: NULL argument or empty key");
    wbuf_u32(&b, (uint32_t)v->type);
    optiml_status st = enc_payload(&b, key, v, 0);
    if (st == OPTIML_OK && b.oom)
        st = optiml_fail(OPTIML_ERR_NOMEM, "gguf writer: key '%s': out of memory", key);
    if (st == OPTIML_OK) st = writer_store_kv(w, key, v->type, &b);
    if (st != OPTIML_OK) free(b.p);
    return st;
}

#define WRITER_SET_SCALAR(suffix, ctype, gtype, field)                                  \
    optiml_status gguf_writer_set_##suffix(gguf_writer *w, const char *key, ctype v) { \
        struct gguf_value val = {.type = gtype, .field = v};                           \
        return gguf_writer_set_value(w, key, &val);                                    \
    }
WRITER_SET_SCALAR(u8, uint8_t, GGUF_TYPE_UINT8, u64)
WRITER_SET_SCALAR(i8, int8_t, GGUF_TYPE_INT8, i64)
WRITER_SET_SCALAR(u16, uint16_t, GGUF_TYPE_UINT16, u64)
WRITER_SET_SCALAR(i16, int16_t, GGUF_TYPE_INT16, i64)
WRITER_SET_SCALAR(u32, uint32_t, GGUF_TYPE_UINT32, u64)
WRITER_SET_SCALAR(i32, int32_t, GGUF_TYPE_INT32, i64)
WRITER_SET_SCALAR(u64, uint64_t, GGUF_TYPE_UINT64, u64)
WRITER_SET_SCALAR(i64, int64_t, GGUF_TYPE_INT64, i64)
WRITER_SET_SCALAR(f32, float, GGUF_TYPE_FLOAT32, f64)
WRITER_SET_SCALAR(f64, double, GGUF_TYPE_FLOAT64, f64)
WRITER_SET_SCALAR(bool, bool, GGUF_TYPE_BOOL, b)
#undef WRITER_SET_SCALAR

optiml_status gguf_writer_set_str(gguf_writer *w, const char *key, const char *v) {
    struct gguf_value val = {.type = GGUF_TYPE_STRING, .str = {v ? strlen(v) : 1, v}};
    return gguf_writer_set_value(w, key, &val); /* v == NULL: "string data is NULL" */
}

optiml_status gguf_writer_set_arr(gguf_writer *w, const char *key, enum gguf_type elem_type,
                                  const void *data, uint64_t n) {
    struct gguf_value val = {.type = GGUF_TYPE_ARRAY, .arr = {elem_type, n, data}};
    if (!type_is_scalar(elem_type))
        return enc_fail(key ? key : "(null)", "set_arr takes numeric/bool elements, not %s",
                        gguf_type_name(elem_type));
    return gguf_writer_set_value(w, key, &val);
}

optiml_status gguf_writer_set_arr_str(gguf_writer *w, const char *key, const char *const *strs,
                                      const uint64_t *lens, uint64_t n) {
    struct gguf_str *s = n < SIZE_MAX / sizeof *s ? malloc((size_t)(n ? n : 1) * sizeof *s) : NULL;
    if (!s || (n && !strs)) {
        free(s);
        return enc_fail(key ? key : "(null)", "no memory or NULL strings");
    }
    for (uint64_t i = 0; i < n; i++) /* a NULL string fails as "string data is NULL" */
        s[i] = (struct gguf_str){lens ? lens[i] : strs[i] ? strlen(strs[i]) : 1, strs[i]};
    struct gguf_value val = {.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_STRING, n, s}};
    optiml_status st = gguf_writer_set_value(w, key, &val);
    free(s);
    return st;
}

void gguf_writer_remove(gguf_writer *w, const char *key) {
    struct writer_kv *kv = w && key ? writer_find_kv(w, key) : NULL;
    if (!kv) return;
    free(kv->key);
    free(kv->enc.p);
    memmove(kv, kv + 1, (size_t)(w->kv + w->n_kv - (kv + 1)) * sizeof *kv);
    w->n_kv--;
}

static optiml_status writer_add(gguf_writer *w, const char *name, uint32_t type, uint32_t n_dims,
                                const uint64_t *ne, const void *data, gguf_fill_fn fill,
                                void *user) {
    struct writer_tensor t = {.type = type, .n_dims = n_dims, .data = data, .fill = fill,
                              .user = user};
    char why[WHY_SIZE];
    if (!w || !name || !*name || !ne || (!data && !fill))
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "gguf writer: add_tensor: NULL argument");
    for (size_t i = 0; i < w->n_tensors; i++)
        if (strcmp(w->tensors[i].name, name) == 0)
            return optiml_fail(OPTIML_ERR_INVALID_ARG, "gguf writer: duplicate tensor '%s'", name);
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++)
        t.ne[d] = d < n_dims && n_dims <= GGUF_MAX_DIMS ? ne[d] : 1;
    if (tensor_check(type, n_dims, t.ne, &t.size, why) != OPTIML_OK)
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "gguf writer: tensor '%s': %s", name, why);
    struct writer_tensor *arr = grow(w->tensors, &w->cap_tensors, w->n_tensors, sizeof t);
    if (arr) w->tensors = arr;
    if (!arr || !(t.name = strdup(name)))
        return optiml_fail(OPTIML_ERR_NOMEM, "gguf writer: tensor '%s': out of memory", name);
    w->tensors[w->n_tensors++] = t;
    return OPTIML_OK;
}

optiml_status gguf_writer_add_tensor(gguf_writer *w, const char *name, uint32_t type,
                                     uint32_t n_dims, const uint64_t *ne, const void *data) {
    return writer_add(w, name, type, n_dims, ne, data, NULL, NULL);
}

optiml_status gguf_writer_add_tensor_fn(gguf_writer *w, const char *name, uint32_t type,
                                        uint32_t n_dims, const uint64_t *ne, gguf_fill_fn fill,
                                        void *user) {
    return writer_add(w, name, type, n_dims, ne, NULL, fill, user);
}

/* ==== writer: layout and output ========================================== */

static optiml_status writer_alignment(const gguf_writer *w, uint32_t *align) {
    const struct writer_kv *kv = writer_find_kv(w, "general.alignment");
    *align = GGUF_DEFAULT_ALIGNMENT;
    if (!kv) return OPTIML_OK;
    if (kv->type == GGUF_TYPE_UINT32) memcpy(align, kv->enc.p + 4, 4);
    if (kv->type != GGUF_TYPE_UINT32 || *align == 0 || (*align & (*align - 1)) != 0)
        return enc_fail("general.alignment", "must be a uint32 power of two");
    return OPTIML_OK;
}

/* Data offsets in insertion order; the largest fill-produced tensor. */
static optiml_status writer_layout(gguf_writer *w, uint32_t align, uint64_t *max_fill) {
    uint64_t end = 0;
    *max_fill = 0;
    for (size_t i = 0; i < w->n_tensors; i++) {
        struct writer_tensor *t = &w->tensors[i];
        t->offset = align_up_u64(end, align);
        if (t->offset < end || !add_u64_ok(t->offset, t->size, &end))
            return optiml_fail(OPTIML_ERR_INVALID_ARG, "gguf writer: data section too large");
        if (t->fill && t->size > *max_fill) *max_fill = t->size;
    }
    return OPTIML_OK;
}

/* Header, key/values, tensor infos and the padding up to the data. */
static void writer_meta(const gguf_writer *w, uint32_t align, struct wbuf *b) {
    wbuf_u32(b, GGUF_MAGIC);
    wbuf_u32(b, 3);
    wbuf_u64(b, w->n_tensors);
    wbuf_u64(b, w->n_kv);
    for (size_t i = 0; i < w->n_kv; i++) {
        wbuf_str(b, w->kv[i].key, strlen(w->kv[i].key));
        wbuf_put(b, w->kv[i].enc.p, w->kv[i].enc.n);
    }
    for (size_t i = 0; i < w->n_tensors; i++) {
        const struct writer_tensor *t = &w->tensors[i];
        wbuf_str(b, t->name, strlen(t->name));
        wbuf_u32(b, t->n_dims);
        for (uint32_t d = 0; d < t->n_dims; d++) wbuf_u64(b, t->ne[d]);
        wbuf_u32(b, t->type);
        wbuf_u64(b, t->offset);
    }
    wbuf_put(b, NULL, align_up_u64(b->n, align) - b->n);
}

/* n bytes of src, or n zeros if src is NULL. */
static optiml_status write_bytes(FILE *fp, const void *src, uint64_t n, const char *path) {
    static const uint8_t zeros[4096];
    while (n > 0) {
        size_t k = src || n < sizeof zeros ? (size_t)n : sizeof zeros;
        if (fwrite(src ? src : zeros, 1, k, fp) != k)
            return optiml_fail(OPTIML_ERR_IO, "%s: write failed: %s", path, strerror(errno));
        n -= k;
    }
    return OPTIML_OK;
}

static optiml_status write_tensor(const struct writer_tensor *t, FILE *fp, void *scratch,
                                  const char *path) {
    char why[512];
    if (!t->fill) return write_bytes(fp, t->data, t->size, path);
    optiml_status st = t->fill(t->user, scratch, t->size);
    if (st == OPTIML_OK) return write_bytes(fp, scratch, t->size, path);
    snprintf(why, sizeof why, "%s", optiml_last_error());
    return optiml_fail(st, "%s: tensor '%s': fill failed: %s", path, t->name, why);
}

static optiml_status writer_emit(const gguf_writer *w, FILE *fp, const struct wbuf *meta,
                                 uint64_t max_fill, const char *path) {
    uint64_t pos = 0;
    void *scratch = NULL;
    optiml_status st = write_bytes(fp, meta->p, meta->n, path);
    if (st == OPTIML_OK && max_fill > 0 && !(scratch = malloc((size_t)max_fill)))
        st = optiml_fail(OPTIML_ERR_NOMEM, "%s: no memory for a %" PRIu64 "-byte tensor", path,
                         max_fill);
    for (size_t i = 0; i < w->n_tensors && st == OPTIML_OK; i++) {
        const struct writer_tensor *t = &w->tensors[i];
        st = write_bytes(fp, NULL, t->offset - pos, path);
        if (st == OPTIML_OK) st = write_tensor(t, fp, scratch, path);
        pos = t->offset + t->size;
    }
    free(scratch);
    return st;
}

/* Write through tmp (a mkstemp template next to path), then rename. */
static optiml_status writer_to_temp(const gguf_writer *w, const struct wbuf *meta,
                                    uint64_t max_fill, const char *path, char *tmp) {
    int fd = mkstemp(tmp);
    if (fd < 0)
        return optiml_fail(OPTIML_ERR_IO, "%s: cannot create %s: %s", path, tmp, strerror(errno));
    FILE *fp = fdopen(fd, "wb");
    optiml_status st = OPTIML_OK;
    if (!fp) {
        st = optiml_fail(OPTIML_ERR_IO, "%s: fdopen: %s", path, strerror(errno));
        close(fd);
    } else {
        setvbuf(fp, NULL, _IOFBF, 1 << 20);
        st = writer_emit(w, fp, meta, max_fill, path);
        if (st == OPTIML_OK && (fchmod(fd, 0644) != 0 || fflush(fp) != 0 || fsync(fd) != 0))
            st = optiml_fail(OPTIML_ERR_IO, "%s: write failed: %s", path, strerror(errno));
        if (fclose(fp) != 0 && st == OPTIML_OK)
            st = optiml_fail(OPTIML_ERR_IO, "%s: close failed: %s", path, strerror(errno));
    }
    if (st == OPTIML_OK && rename(tmp, path) != 0)
        st = optiml_fail(OPTIML_ERR_IO, "%s: rename from %s: %s", path, tmp, strerror(errno));
    if (st != OPTIML_OK) unlink(tmp);
    return st;
}

optiml_status gguf_writer_write(gguf_writer *w, const char *path) {
    uint32_t align;
    uint64_t max_fill;
    struct wbuf meta = {0};
    if (!w || !path) return optiml_fail(OPTIML_ERR_INVALID_ARG, "gguf writer: NULL argument");
    TRY(writer_alignment(w, &align));
    TRY(writer_layout(w, align, &max_fill));
    writer_meta(w, align, &meta);
    size_t n = strlen(path) + sizeof ".tmp.XXXXXX";
    char *tmp = meta.oom ? NULL : malloc(n);
    optiml_status st = OPTIML_ERR_NOMEM;
    if (tmp) {
        snprintf(tmp, n, "%s.tmp.XXXXXX", path);
        st = writer_to_temp(w, &meta, max_fill, path, tmp);
    } else {
        optiml_fail(st, "%s: out of memory", path);
    }
    free(tmp);
    free(meta.p);
    return st;
}
