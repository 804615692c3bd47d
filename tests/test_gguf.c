/*
 * test_gguf.c - the GGUF module: writer -> reader round trips of every value
 * type and several tensor types, metadata pass-through, typed getters,
 * writer errors, and a corpus of corrupt files (every truncation, random
 * byte changes, crafted cases) that must fail cleanly.
 *
 * With OPTIML_GGUF_SEED_CORPUS=dir set, the test also writes the fuzz seed
 * corpus (fuzz/corpus/gguf) into dir.
 */
#define _POSIX_C_SOURCE 200809L
#include "gguf.h"

#include "dtype.h"
#include "test.h"

#include <dirent.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* The fuzz target (fuzz/fuzz_gguf.c): parses and walks every byte. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char tmp_dir[256];

static const char *tmp_path(char *buf, const char *name) {
    snprintf(buf, 512, "%s/%s", tmp_dir, name);
    return buf;
}

static void quiet_log(optiml_log_level level, const char *msg, void *user) {
    (void)level, (void)msg, (void)user;
}

static bool has(const char *haystack, const char *needle) { return strstr(haystack, needle); }

/* ==== helpers: files, bytes ============================================== */

static uint8_t *file_read(const char *path, size_t *size) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    uint8_t *p = malloc(n > 0 ? (size_t)n : 1);
    *size = fread(p, 1, (size_t)n, fp);
    fclose(fp);
    return p;
}

static void file_write(const char *path, const void *p, size_t n) {
    FILE *fp = fopen(path, "wb");
    if (!fp) return;
    fwrite(p, 1, n, fp);
    fclose(fp);
}

/* Parse an exact-size heap copy of buf[0..n) so ASan sees any overread. */
static optiml_status parse_copy(const uint8_t *buf, size_t n, const char *name) {
    uint8_t *copy = malloc(n ? n : 1);
    memcpy(copy, buf, n);
    gguf_file *f = NULL;
    optiml_status st = gguf_parse(copy, n, name, &f);
    gguf_close(f);
    free(copy);
    return st;
}

static uint64_t rng_state;
static uint64_t rng_next(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Byte builder for crafted files. */
struct bb {
    uint8_t p[1024];
    size_t n;
};
static void bb_put(struct bb *b, const void *src, size_t n) {
    memcpy(b->p + b->n, src, n);
    b->n += n;
}
static void bb_u32(struct bb *b, uint32_t v) { bb_put(b, &v, 4); }
static void bb_u64(struct bb *b, uint64_t v) { bb_put(b, &v, 8); }
static void bb_str(struct bb *b, const char *s) {
    bb_u64(b, strlen(s));
    bb_put(b, s, strlen(s));
}
static void bb_hdr(struct bb *b, uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
    bb_u32(b, GGUF_MAGIC);
    bb_u32(b, version);
    bb_u64(b, n_tensors);
    bb_u64(b, n_kv);
}
static void bb_kv_u32(struct bb *b, const char *key, uint32_t v) {
    bb_str(b, key);
    bb_u32(b, GGUF_TYPE_UINT32);
    bb_u32(b, v);
}
static void bb_tensor(struct bb *b, const char *name, uint32_t n_dims, uint64_t ne0, uint64_t ne1,
                      uint32_t type, uint64_t offset) {
    bb_str(b, name);
    bb_u32(b, n_dims);
    for (uint32_t d = 0; d < n_dims; d++) bb_u64(b, d == 0 ? ne0 : ne1);
    bb_u32(b, type);
    bb_u64(b, offset);
}
/* Pad to align, then n bytes of tensor data. */
static void bb_data(struct bb *b, size_t align, size_t n) {
    while (b->n % align) b->p[b->n++] = 0;
    for (size_t i = 0; i < n; i++) b->p[b->n++] = (uint8_t)i;
}

/* ==== value comparison =================================================== */

static bool value_eq(const struct gguf_value *a, const struct gguf_value *b);

static bool str_eq(struct gguf_str a, struct gguf_str b) {
    return a.n == b.n && (a.n == 0 || memcmp(a.data, b.data, a.n) == 0);
}

static size_t scalar_size(enum gguf_type t) {
    static const size_t size[GGUF_TYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return size[t];
}

static bool array_eq(const struct gguf_value *a, const struct gguf_value *b) {
    if (a->arr.type != b->arr.type || a->arr.n != b->arr.n) return false;
    for (uint64_t i = 0; i < a->arr.n; i++) {
        if (a->arr.type == GGUF_TYPE_STRING) {
            if (!str_eq(((const struct gguf_str *)a->arr.data)[i],
                        ((const struct gguf_str *)b->arr.data)[i]))
                return false;
        } else if (a->arr.type == GGUF_TYPE_ARRAY) {
            if (!value_eq((const struct gguf_value *)a->arr.data + i,
                          (const struct gguf_value *)b->arr.data + i))
                return false;
        }
    }
    size_t sz = scalar_size(a->arr.type);
    return sz == 0 || a->arr.n == 0 || memcmp(a->arr.data, b->arr.data, sz * a->arr.n) == 0;
}

static bool value_eq(const struct gguf_value *a, const struct gguf_value *b) {
    if (a->type != b->type) return false;
    switch (a->type) {
    case GGUF_TYPE_UINT8: case GGUF_TYPE_UINT16: case GGUF_TYPE_UINT32: case GGUF_TYPE_UINT64:
        return a->u64 == b->u64;
    case GGUF_TYPE_INT8: case GGUF_TYPE_INT16: case GGUF_TYPE_INT32: case GGUF_TYPE_INT64:
        return a->i64 == b->i64;
    case GGUF_TYPE_FLOAT32: case GGUF_TYPE_FLOAT64: return a->f64 == b->f64;
    case GGUF_TYPE_BOOL: return a->b == b->b;
    case GGUF_TYPE_STRING: return str_eq(a->str, b->str);
    case GGUF_TYPE_ARRAY: return array_eq(a, b);
    default: return false;
    }
}

/* ==== the reference file: every value type, several tensor types ========= */

static const uint8_t arr_u8[] = {0, 1, 255};
static const int8_t arr_i8[] = {-128, 0, 127};
static const uint16_t arr_u16[] = {0, 65535};
static const int16_t arr_i16[] = {-32768, 32767, -1};
static const uint32_t arr_u32[] = {0, 1, 4000000000u};
static const int32_t arr_i32[] = {INT32_MIN, -7, INT32_MAX};
static const uint64_t arr_u64[] = {UINT64_MAX, 0};
static const int64_t arr_i64[] = {INT64_MIN, 42, INT64_MAX};
static const float arr_f32[] = {1.5f, -0.0f, 1e30f, -2.25f};
static const double arr_f64[] = {3.141592653589793, -1e-300};
static const uint8_t arr_bool[] = {1, 0, 1, 1};
#define UTF8_A "\xc3\xa9t\xc3\xa9 \xe2\x9c\x93"                                  /* 9 bytes */
#define UTF8_B "h\xc3\xa9llo \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x98\x80" /* 18 bytes */
static const struct gguf_str arr_str[] = {{5, "hello"}, {0, ""}, {9, UTF8_A}};
static const int32_t nest_a[] = {1, 2, 3}, nest_b[] = {-4};
static const struct gguf_value nest2_elems[] = {
    {.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_INT32, 3, nest_a}},
    {.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_INT32, 1, nest_b}},
    {.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_INT32, 0, nest_a}},
};
static const struct gguf_value nest3_leaf[] = {
    {.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_STRING, 3, arr_str}},
    {.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_STRING, 0, NULL}},
};
static const struct gguf_value nest3_mid[] = {
    {.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_ARRAY, 2, nest3_leaf}},
    {.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_ARRAY, 0, NULL}},
};

#define SCALAR(k, t, f, v) {k, {.type = GGUF_TYPE_##t, .f = v}}
#define ARR(k, t, a, n) {k, {.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_##t, n, a}}}
static const struct kv_case {
    const char *key;
    struct gguf_value v;
} kv_cases[] = {
    SCALAR("s.u8", UINT8, u64, 200),
    SCALAR("s.i8", INT8, i64, -100),
    SCALAR("s.u16", UINT16, u64, 60000),
    SCALAR("s.i16", INT16, i64, -30000),
    SCALAR("s.u32", UINT32, u64, 4000000000u),
    SCALAR("s.i32", INT32, i64, -2000000000),
    SCALAR("s.u64", UINT64, u64, UINT64_MAX),
    SCALAR("s.i64", INT64, i64, INT64_MIN),
    SCALAR("s.f32", FLOAT32, f64, 3.25),
    SCALAR("s.f64", FLOAT64, f64, -1e300),
    SCALAR("s.true", BOOL, b, true),
    SCALAR("s.false", BOOL, b, false),
    {"s.str", {.type = GGUF_TYPE_STRING, .str = {5, "hello"}}},
    {"s.empty", {.type = GGUF_TYPE_STRING, .str = {0, ""}}},
    {"s.utf8", {.type = GGUF_TYPE_STRING, .str = {18, UTF8_B}}},
    ARR("a.u8", UINT8, arr_u8, 3),
    ARR("a.i8", INT8, arr_i8, 3),
    ARR("a.u16", UINT16, arr_u16, 2),
    ARR("a.i16", INT16, arr_i16, 3),
    ARR("a.u32", UINT32, arr_u32, 3),
    ARR("a.i32", INT32, arr_i32, 3),
    ARR("a.u64", UINT64, arr_u64, 2),
    ARR("a.i64", INT64, arr_i64, 3),
    ARR("a.f32", FLOAT32, arr_f32, 4),
    ARR("a.f64", FLOAT64, arr_f64, 2),
    ARR("a.bool", BOOL, arr_bool, 4),
    ARR("a.str", STRING, arr_str, 3),
    ARR("a.empty", UINT32, arr_u32, 0),
    ARR("a.empty_str", STRING, NULL, 0),
    ARR("a.nested2", ARRAY, nest2_elems, 3),
    ARR("a.nested3", ARRAY, nest3_mid, 2),
};
#define N_KV_CASES (sizeof kv_cases / sizeof kv_cases[0])

/* Set a case through the setter made for its type. */
static optiml_status set_case(gguf_writer *w, const struct kv_case *c) {
    const struct gguf_value *v = &c->v;
    const char *strs[3];
    uint64_t lens[3];
    switch (v->type) {
    case GGUF_TYPE_UINT8: return gguf_writer_set_u8(w, c->key, (uint8_t)v->u64);
    case GGUF_TYPE_INT8: return gguf_writer_set_i8(w, c->key, (int8_t)v->i64);
    case GGUF_TYPE_UINT16: return gguf_writer_set_u16(w, c->key, (uint16_t)v->u64);
    case GGUF_TYPE_INT16: return gguf_writer_set_i16(w, c->key, (int16_t)v->i64);
    case GGUF_TYPE_UINT32: return gguf_writer_set_u32(w, c->key, (uint32_t)v->u64);
    case GGUF_TYPE_INT32: return gguf_writer_set_i32(w, c->key, (int32_t)v->i64);
    case GGUF_TYPE_UINT64: return gguf_writer_set_u64(w, c->key, v->u64);
    case GGUF_TYPE_INT64: return gguf_writer_set_i64(w, c->key, v->i64);
    case GGUF_TYPE_FLOAT32: return gguf_writer_set_f32(w, c->key, (float)v->f64);
    case GGUF_TYPE_FLOAT64: return gguf_writer_set_f64(w, c->key, v->f64);
    case GGUF_TYPE_BOOL: return gguf_writer_set_bool(w, c->key, v->b);
    case GGUF_TYPE_STRING: return gguf_writer_set_str(w, c->key, v->str.data);
    default: break;
    }
    if (v->arr.type == GGUF_TYPE_ARRAY) return gguf_writer_set_value(w, c->key, v);
    if (v->arr.type != GGUF_TYPE_STRING)
        return gguf_writer_set_arr(w, c->key, v->arr.type, v->arr.data, v->arr.n);
    for (uint64_t i = 0; i < v->arr.n; i++) {
        strs[i] = ((const struct gguf_str *)v->arr.data)[i].data;
        lens[i] = ((const struct gguf_str *)v->arr.data)[i].n;
    }
    return gguf_writer_set_arr_str(w, c->key, strs, lens, v->arr.n);
}

struct tensor_case {
    const char *name;
    uint32_t type, n_dims;
    uint64_t ne[4];
    uint8_t data[160];
    bool use_fill;
};
static struct tensor_case tensor_cases[] = {
    {"t.f32", DTYPE_F32, 2, {4, 3, 1, 1}, {0}, false},
    {"t.f16", DTYPE_F16, 1, {8, 1, 1, 1}, {0}, false},
    {"t.q4_0", DTYPE_Q4_0, 2, {64, 2, 1, 1}, {0}, false},
    {"t.bf16", DTYPE_BF16, 4, {5, 1, 1, 2}, {0}, false},
    {"t.fill", DTYPE_Q8_0, 2, {32, 3, 1, 1}, {0}, true},
};
#define N_TENSOR_CASES (sizeof tensor_cases / sizeof tensor_cases[0])

static uint64_t tensor_case_size(const struct tensor_case *t) {
    uint64_t row = 0;
    dtype_row_size(t->type, t->ne[0], &row);
    return row * t->ne[1] * t->ne[2] * t->ne[3];
}

static void tensor_cases_init(void) {
    for (size_t i = 0; i < N_TENSOR_CASES; i++) {
        struct tensor_case *t = &tensor_cases[i];
        uint64_t n = tensor_case_size(t);
        if (t->type == DTYPE_F32)
            for (uint64_t j = 0; j < n / 4; j++) {
                float x = (float)j * 0.5f - 1.0f;
                memcpy(t->data + 4 * j, &x, 4);
            }
        else if (t->type == DTYPE_F16 || t->type == DTYPE_BF16)
            for (uint64_t j = 0; j < n / 2; j++) {
                uint16_t h = t->type == DTYPE_F16 ? f32_to_f16((float)j - 3.5f)
                                                  : f32_to_bf16((float)j * 1.25f);
                memcpy(t->data + 2 * j, &h, 2);
            }
        else
            for (uint64_t j = 0; j < n; j++) t->data[j] = (uint8_t)(j * 7 + i);
    }
}

static optiml_status fill_case(void *user, void *dst, uint64_t size) {
    const struct tensor_case *t = user;
    if (size != tensor_case_size(t)) return optiml_fail(OPTIML_ERR_INTERNAL, "fill: bad size");
    memcpy(dst, t->data, size);
    return OPTIML_OK;
}

static optiml_status fill_broken(void *user, void *dst, uint64_t size) {
    (void)user, (void)dst, (void)size;
    return optiml_fail(OPTIML_ERR_IO, "fill_broken: source went away");
}

static void add_tensor_cases(gguf_writer *w) {
    for (size_t i = 0; i < N_TENSOR_CASES; i++) {
        struct tensor_case *t = &tensor_cases[i];
        optiml_status st = t->use_fill ? gguf_writer_add_tensor_fn(w, t->name, t->type, t->n_dims,
                                                                   t->ne, fill_case, t)
                                       : gguf_writer_add_tensor(w, t->name, t->type, t->n_dims,
                                                                t->ne, t->data);
        CHECK(st == OPTIML_OK, "add %s: %s", t->name, optiml_last_error());
    }
}

/* Write the reference file (all kv cases, all tensor cases) to path. */
static void write_reference(const char *path, uint32_t alignment) {
    gguf_writer *w = gguf_writer_init();
    CHECK(w != NULL);
    CHECK(gguf_writer_set_u32(w, "replace.me", 1) == OPTIML_OK);
    for (size_t i = 0; i < N_KV_CASES; i++)
        CHECK(set_case(w, &kv_cases[i]) == OPTIML_OK, "set %s: %s", kv_cases[i].key,
              optiml_last_error());
    CHECK(gguf_writer_set_str(w, "replace.me", "replaced") == OPTIML_OK); /* stays first */
    CHECK(gguf_writer_set_u32(w, "removed", 5) == OPTIML_OK);
    gguf_writer_remove(w, "removed");
    gguf_writer_remove(w, "never.set");
    if (alignment) CHECK(gguf_writer_set_u32(w, "general.alignment", alignment) == OPTIML_OK);
    add_tensor_cases(w);
    CHECK(gguf_writer_write(w, path) == OPTIML_OK, "write: %s", optiml_last_error());
    gguf_writer_free(w);
}

/* ==== round trip ========================================================= */

static void check_tensors(const gguf_file *f, uint32_t align) {
    CHECK(f->n_tensors == N_TENSOR_CASES);
    CHECK(f->data_offset % align == 0, "data_offset %llu", (unsigned long long)f->data_offset);
    const struct gguf_tensor_info *last = NULL;
    for (size_t i = 0; i < N_TENSOR_CASES; i++) {
        const struct tensor_case *c = &tensor_cases[i];
        const struct gguf_tensor_info *t = gguf_find_tensor(f, c->name);
        CHECK(t == &f->tensors[i], "%s in insertion order", c->name);
        if (!t) continue;
        CHECK(t->type == c->type && t->n_dims == c->n_dims);
        CHECK(memcmp(t->ne, c->ne, sizeof t->ne) == 0, "%s ne", c->name);
        CHECK(t->size == tensor_case_size(c));
        CHECK(memcmp(t->data, c->data, t->size) == 0, "%s bytes", c->name);
        CHECK(t->offset % align == 0 && (uint64_t)((const uint8_t *)t->data - f->base) % align == 0,
              "%s alignment", c->name);
        CHECK((uintptr_t)t->data % align == 0, "%s address alignment", c->name);
        last = t;
    }
    CHECK(gguf_find_tensor(f, "t.missing") == NULL);
    if (last) CHECK(f->size == f->data_offset + last->offset + last->size, "no trailing padding");
}

static void check_kvs(const gguf_file *f) {
    struct gguf_str s;
    CHECK(f->version == 3);
    CHECK(f->n_kv == N_KV_CASES + 1);
    CHECK(gguf_str_eq(f->kv[0].key, "replace.me") && gguf_get_str(f, "replace.me", &s) == 0 &&
          gguf_str_eq(s, "replaced"));
    CHECK(gguf_find_key(f, "removed") == -1);
    for (size_t i = 0; i < N_KV_CASES && i + 1 < f->n_kv; i++) {
        CHECK(gguf_str_eq(f->kv[i + 1].key, kv_cases[i].key), "key order at %zu", i);
        const struct gguf_value *v = gguf_get(f, kv_cases[i].key);
        CHECK(v && value_eq(v, &kv_cases[i].v), "value of %s", kv_cases[i].key);
    }
}

static void test_roundtrip(void) {
    char path[512];
    gguf_file *f = NULL;
    write_reference(tmp_path(path, "ref.gguf"), 0);
    CHECK(gguf_open(path, &f) == OPTIML_OK, "%s", optiml_last_error());
    if (!f) return;
    CHECK(f->alignment == GGUF_DEFAULT_ALIGNMENT);
    check_kvs(f);
    check_tensors(f, GGUF_DEFAULT_ALIGNMENT);
    /* nested arrays, element by element */
    const struct gguf_value *n2 = NULL, *n3 = NULL;
    CHECK(gguf_get_arr(f, "a.nested2", GGUF_TYPE_ARRAY, &n2) == OPTIML_OK);
    CHECK(gguf_get_arr(f, "a.nested3", GGUF_TYPE_COUNT, &n3) == OPTIML_OK);
    if (n2 && n3) {
        const struct gguf_value *e = n2->arr.data;
        CHECK(n2->arr.n == 3 && e[0].arr.n == 3 && gguf_arr_i64(&e[0], 2) == 3 &&
              gguf_arr_i64(&e[1], 0) == -4 && e[2].arr.n == 0);
        const struct gguf_value *mid = n3->arr.data;
        const struct gguf_value *leaf = mid[0].arr.data;
        const struct gguf_str *strs = leaf[0].arr.data;
        CHECK(mid[0].arr.n == 2 && mid[1].arr.n == 0 && leaf[0].arr.n == 3 &&
              gguf_str_eq(strs[2], UTF8_A) && leaf[1].arr.n == 0);
    }
    gguf_close(f);

    /* read into memory instead of mapped (--no-mmap): the same file, and a
     * copy of its bytes rather than the mapping */
    CHECK(gguf_open_ex(path, false, &f) == OPTIML_OK, "%s", optiml_last_error());
    if (!f) return;
    check_kvs(f);
    check_tensors(f, GGUF_DEFAULT_ALIGNMENT);
    gguf_file *m = NULL;
    CHECK(gguf_open(path, &m) == OPTIML_OK);
    if (m) {
        CHECK(f->size == m->size && f->base != m->base && memcmp(f->base, m->base, (size_t)f->size) == 0);
        gguf_close(m);
    }
    gguf_close(f);

    /* custom alignment */
    write_reference(tmp_path(path, "ref64.gguf"), 64);
    CHECK(gguf_open(path, &f) == OPTIML_OK, "%s", optiml_last_error());
    if (!f) return;
    CHECK(f->alignment == 64);
    check_tensors(f, 64);
    gguf_close(f);
}

/* Copy every kv with set_value and every tensor into a new file: the bytes
 * must come out identical, and so must the values. */
static void test_passthrough(void) {
    char a_path[512], b_path[512];
    gguf_file *a = NULL, *b = NULL;
    tmp_path(a_path, "ref.gguf");
    CHECK(gguf_open(a_path, &a) == OPTIML_OK, "%s", optiml_last_error());
    if (!a) return;
    gguf_writer *w = gguf_writer_init();
    for (uint64_t i = 0; i < a->n_kv; i++) {
        char *key = gguf_str_dup(a->kv[i].key);
        CHECK(gguf_writer_set_value(w, key, &a->kv[i].value) == OPTIML_OK, "%s", key);
        free(key);
    }
    for (uint64_t i = 0; i < a->n_tensors; i++) {
        const struct gguf_tensor_info *t = &a->tensors[i];
        char *name = gguf_str_dup(t->name);
        CHECK(gguf_writer_add_tensor(w, name, t->type, t->n_dims, t->ne, t->data) == OPTIML_OK);
        free(name);
    }
    CHECK(gguf_writer_write(w, tmp_path(b_path, "copy.gguf")) == OPTIML_OK);
    gguf_writer_free(w);
    CHECK(gguf_open(b_path, &b) == OPTIML_OK, "%s", optiml_last_error());
    if (b) {
        CHECK(a->size == b->size && memcmp(a->base, b->base, a->size) == 0, "identical bytes");
        CHECK(a->n_kv == b->n_kv);
        for (uint64_t i = 0; i < a->n_kv && i < b->n_kv; i++)
            CHECK(str_eq(a->kv[i].key, b->kv[i].key) && value_eq(&a->kv[i].value, &b->kv[i].value));
    }
    gguf_close(b);
    /* the same image through gguf_parse (no mapping) */
    CHECK(gguf_parse(a->base, a->size, "in-memory", &b) == OPTIML_OK);
    if (b) CHECK(b->n_kv == a->n_kv && b->n_tensors == a->n_tensors && b->map == NULL);
    gguf_close(b);
    gguf_close(a);
}

/* ==== typed getters ====================================================== */

static void test_getters(void) {
    char path[512];
    gguf_file *f = NULL;
    uint32_t u32 = 0;
    int64_t i64 = 0;
    float f32 = 0;
    bool b = false;
    struct gguf_str s;
    const struct gguf_value *arr = NULL;
    CHECK(gguf_open(tmp_path(path, "ref.gguf"), &f) == OPTIML_OK);
    if (!f) return;
    CHECK(gguf_get_u32(f, "s.u8", &u32) == OPTIML_OK && u32 == 200);
    CHECK(gguf_get_u32(f, "s.u32", &u32) == OPTIML_OK && u32 == 4000000000u);
    CHECK(gguf_get_u32(f, "s.i16", &u32) == OPTIML_ERR_FORMAT); /* negative */
    CHECK(has(optiml_last_error(), "key 's.i16' at offset ") && has(optiml_last_error(), "int16") &&
          has(optiml_last_error(), path), "%s", optiml_last_error());
    CHECK(gguf_get_u32(f, "s.u64", &u32) == OPTIML_ERR_FORMAT); /* too big */
    CHECK(gguf_get_u32(f, "s.str", &u32) == OPTIML_ERR_FORMAT);
    CHECK(has(optiml_last_error(), "string"));
    CHECK(gguf_get_i64(f, "s.i64", &i64) == OPTIML_OK && i64 == INT64_MIN);
    CHECK(gguf_get_i64(f, "s.u32", &i64) == OPTIML_OK && i64 == 4000000000);
    CHECK(gguf_get_i64(f, "s.u64", &i64) == OPTIML_ERR_FORMAT);
    CHECK(gguf_get_i64(f, "s.f32", &i64) == OPTIML_ERR_FORMAT);
    CHECK(gguf_get_f32(f, "s.f32", &f32) == OPTIML_OK && f32 == 3.25f);
    CHECK(gguf_get_f32(f, "s.f64", &f32) == OPTIML_OK && isinf(f32));
    CHECK(gguf_get_f32(f, "s.u8", &f32) == OPTIML_ERR_FORMAT);
    CHECK(gguf_get_bool(f, "s.true", &b) == OPTIML_OK && b);
    CHECK(gguf_get_bool(f, "s.u8", &b) == OPTIML_ERR_FORMAT);
    CHECK(gguf_get_str(f, "s.empty", &s) == OPTIML_OK && s.n == 0);
    CHECK(gguf_get_str(f, "s.utf8", &s) == OPTIML_OK && s.n == 18);
    CHECK(gguf_get_str(f, "a.str", &s) == OPTIML_ERR_FORMAT);
    CHECK(has(optiml_last_error(), "array of string"), "%s", optiml_last_error());
    CHECK(gguf_get_arr(f, "a.u16", GGUF_TYPE_UINT16, &arr) == OPTIML_OK && arr->arr.n == 2);
    CHECK(gguf_get_arr(f, "a.u16", GGUF_TYPE_UINT32, &arr) == OPTIML_ERR_FORMAT);
    CHECK(gguf_get_arr(f, "s.u8", GGUF_TYPE_COUNT, &arr) == OPTIML_ERR_FORMAT);
    /* missing keys: INVALID_ARG, the _or variants give the default */
    CHECK(gguf_get_u32(f, "nope", &u32) == OPTIML_ERR_INVALID_ARG);
    CHECK(has(optiml_last_error(), "nope"));
    CHECK(gguf_get_u32_or(f, "nope", 7, &u32) == OPTIML_OK && u32 == 7);
    CHECK(gguf_get_u32_or(f, "s.u16", 7, &u32) == OPTIML_OK && u32 == 60000);
    CHECK(gguf_get_u32_or(f, "s.str", 7, &u32) == OPTIML_ERR_FORMAT);
    CHECK(gguf_get_f32_or(f, "nope", 0.5f, &f32) == OPTIML_OK && f32 == 0.5f);
    CHECK(gguf_get_bool_or(f, "nope", true, &b) == OPTIML_OK && b);
    CHECK(gguf_get_bool_or(f, "s.false", true, &b) == OPTIML_OK && !b);
    CHECK(gguf_get(f, "nope") == NULL && gguf_find_key(f, "s.u8") == 1);
    /* element access converts every numeric type */
    const struct gguf_value *v;
    CHECK((v = gguf_get(f, "a.i8")) && gguf_arr_i64(v, 0) == -128 && gguf_arr_f64(v, 2) == 127);
    CHECK((v = gguf_get(f, "a.u64")) && gguf_arr_i64(v, 0) == INT64_MAX &&
          gguf_arr_f64(v, 0) == 18446744073709551615.0);
    CHECK((v = gguf_get(f, "a.f32")) && gguf_arr_f64(v, 0) == 1.5 && gguf_arr_i64(v, 3) == -2 &&
          gguf_arr_i64(v, 2) == INT64_MAX);
    CHECK((v = gguf_get(f, "a.bool")) && gguf_arr_i64(v, 0) == 1 && gguf_arr_f64(v, 1) == 0);
    CHECK((v = gguf_get(f, "a.i64")) && gguf_arr_i64(v, 0) == INT64_MIN);
    CHECK((v = gguf_get(f, "a.f64")) && gguf_arr_f64(v, 1) == -1e-300);
    char *dup = NULL;
    CHECK(gguf_get_str(f, "s.utf8", &s) == OPTIML_OK && (dup = gguf_str_dup(s)) &&
          strlen(dup) == 18);
    free(dup);
    gguf_close(f);
}

/* ==== writer errors ====================================================== */

static bool dir_has_temp_files(void) {
    DIR *d = opendir(tmp_dir);
    struct dirent *e;
    bool found = false;
    while (d && (e = readdir(d)))
        if (strstr(e->d_name, ".tmp.")) found = true;
    if (d) closedir(d);
    return found;
}

static void test_writer_errors(void) {
    char path[512];
    const uint64_t ne33[] = {33}, ne32[] = {32}, ne0[] = {0, 4}, ne5[] = {32, 1, 1, 1, 1};
    static uint8_t data[64];
    const uint8_t bad_bools[] = {0, 2};
    gguf_writer *w = gguf_writer_init();
    CHECK(gguf_writer_add_tensor(w, "q", DTYPE_Q4_0, 1, ne33, data) == OPTIML_ERR_INVALID_ARG);
    CHECK(has(optiml_last_error(), "'q'") && has(optiml_last_error(), "multiple"));
    CHECK(gguf_writer_add_tensor(w, "u", 99, 1, ne32, data) == OPTIML_ERR_INVALID_ARG);
    CHECK(has(optiml_last_error(), "unknown tensor type 99"));
    CHECK(gguf_writer_add_tensor(w, "z", DTYPE_F32, 2, ne0, data) == OPTIML_ERR_INVALID_ARG);
    CHECK(gguf_writer_add_tensor(w, "d5", DTYPE_F32, 5, ne5, data) == OPTIML_ERR_INVALID_ARG);
    CHECK(gguf_writer_add_tensor(w, "n", DTYPE_F32, 1, ne32, NULL) == OPTIML_ERR_INVALID_ARG);
    CHECK(gguf_writer_add_tensor(w, "ok", DTYPE_I8, 1, ne32, data) == OPTIML_OK);
    CHECK(gguf_writer_add_tensor(w, "ok", DTYPE_I8, 1, ne32, data) == OPTIML_ERR_INVALID_ARG);
    CHECK(has(optiml_last_error(), "duplicate tensor 'ok'"));
    CHECK(gguf_writer_set_arr(w, "k", GGUF_TYPE_STRING, data, 1) == OPTIML_ERR_INVALID_ARG);
    CHECK(gguf_writer_set_arr(w, "k", GGUF_TYPE_BOOL, bad_bools, 2) == OPTIML_ERR_INVALID_ARG);
    CHECK(gguf_writer_set_str(w, "", "x") == OPTIML_ERR_INVALID_ARG);
    struct gguf_value bad = {.type = GGUF_TYPE_UINT8, .u64 = 300};
    CHECK(gguf_writer_set_value(w, "k", &bad) == OPTIML_ERR_INVALID_ARG);
    CHECK(has(optiml_last_error(), "'k'"));
    /* a 17-deep nest is refused, 16 is fine */
    struct gguf_value nest[17];
    nest[0] = (struct gguf_value){.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_UINT8, 0, NULL}};
    for (int i = 1; i < 17; i++)
        nest[i] = (struct gguf_value){.type = GGUF_TYPE_ARRAY,
                                      .arr = {GGUF_TYPE_ARRAY, 1, &nest[i - 1]}};
    CHECK(gguf_writer_set_value(w, "deep16", &nest[15]) == OPTIML_OK);
    CHECK(gguf_writer_set_value(w, "deep17", &nest[16]) == OPTIML_ERR_INVALID_ARG);
    /* bad alignment keys fail at write time, leaving nothing behind */
    tmp_path(path, "bad.gguf");
    CHECK(gguf_writer_set_str(w, "general.alignment", "64") == OPTIML_OK);
    CHECK(gguf_writer_write(w, path) == OPTIML_ERR_INVALID_ARG);
    CHECK(gguf_writer_set_u32(w, "general.alignment", 48) == OPTIML_OK);
    CHECK(gguf_writer_write(w, path) == OPTIML_ERR_INVALID_ARG);
    CHECK(has(optiml_last_error(), "power of two"));
    CHECK(gguf_writer_set_u32(w, "general.alignment", 16) == OPTIML_OK);
    /* a failing fill: error, no file, no temporary file */
    CHECK(gguf_writer_add_tensor_fn(w, "broken", DTYPE_F32, 1, ne32, fill_broken, NULL) == 0);
    CHECK(gguf_writer_write(w, path) == OPTIML_ERR_IO);
    CHECK(has(optiml_last_error(), "broken") && has(optiml_last_error(), "source went away"));
    CHECK(access(path, F_OK) != 0 && !dir_has_temp_files());
    char bad_dir[600];
    snprintf(bad_dir, sizeof bad_dir, "%s/no/such/dir.gguf", tmp_dir);
    CHECK(gguf_writer_write(w, bad_dir) == OPTIML_ERR_IO);
    CHECK(has(optiml_last_error(), bad_dir));
    gguf_writer_free(w);

    /* an empty writer makes a valid file */
    w = gguf_writer_init();
    gguf_file *f = NULL;
    CHECK(gguf_writer_write(w, tmp_path(path, "empty.gguf")) == OPTIML_OK);
    CHECK(gguf_open(path, &f) == OPTIML_OK && f->n_kv == 0 && f->n_tensors == 0);
    gguf_close(f);
    gguf_writer_free(w);
    CHECK(gguf_open(tmp_path(path, "missing.gguf"), &f) == OPTIML_ERR_IO && f == NULL);
    CHECK(has(optiml_last_error(), "missing.gguf"));
    CHECK(gguf_open(tmp_dir, &f) == OPTIML_ERR_IO);
    CHECK(gguf_open_ex(tmp_path(path, "missing.gguf"), false, &f) == OPTIML_ERR_IO && f == NULL);
    CHECK(gguf_open_ex(tmp_dir, false, &f) == OPTIML_ERR_IO && f == NULL);
    CHECK(has(optiml_last_error(), "non-regular"));
}

/* ==== corrupt files ====================================================== */

static uint8_t *small_file(size_t *size) {
    char path[512];
    const uint64_t ne_a[] = {4}, ne_b[] = {32}, ne_c[] = {2, 3};
    static const uint8_t data[64] = {1, 2, 3, 4, 5, 6, 7, 8};
    const char *strs[] = {"a", "bc", ""};
    const struct gguf_value inner = {.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_UINT8, 2, data}};
    const struct gguf_value outer = {.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_ARRAY, 1, &inner}};
    gguf_writer *w = gguf_writer_init();
    gguf_writer_set_str(w, "general.architecture", "llama");
    gguf_writer_set_u32(w, "llama.block_count", 2);
    gguf_writer_set_bool(w, "b", true);
    gguf_writer_set_f32(w, "f", 0.5f);
    gguf_writer_set_arr_str(w, "tokens", strs, NULL, 3);
    gguf_writer_set_arr(w, "scores", GGUF_TYPE_FLOAT32, data, 2);
    gguf_writer_set_value(w, "nested", &outer);
    gguf_writer_add_tensor(w, "a", DTYPE_F32, 1, ne_a, data);
    gguf_writer_add_tensor(w, "b", DTYPE_Q4_0, 1, ne_b, data);
    gguf_writer_add_tensor(w, "c", DTYPE_F16, 2, ne_c, data);
    CHECK(gguf_writer_write(w, tmp_path(path, "small.gguf")) == OPTIML_OK);
    gguf_writer_free(w);
    return file_read(path, size);
}

static void test_truncations(const uint8_t *buf, size_t size) {
    size_t n_bad = 0, first_bad = 0;
    CHECK(parse_copy(buf, size, "small.gguf") == OPTIML_OK, "%s", optiml_last_error());
    for (size_t n = 0; n < size; n++) {
        optiml_status st = parse_copy(buf, n, "trunc.gguf");
        if (st != OPTIML_ERR_FORMAT || !has(optiml_last_error(), "trunc.gguf")) {
            if (!n_bad++) first_bad = n;
        }
        LLVMFuzzerTestOneInput(buf, n);
    }
    CHECK(n_bad == 0, "%zu truncations did not fail with FORMAT, first at length %zu", n_bad,
          first_bad);
}

static void test_byte_changes(const uint8_t *buf, size_t size, uint64_t seed, int rounds) {
    uint8_t *copy = malloc(size);
    int n_ok = 0, n_unclean = 0;
    printf("test_gguf: byte-change seed %llu (%d rounds)\n", (unsigned long long)seed, rounds);
    rng_state = seed;
    for (int i = 0; i < rounds; i++) {
        memcpy(copy, buf, size);
        size_t at = (size_t)(rng_next() % size);
        copy[at] ^= (uint8_t)(1 + rng_next() % 255);
        optiml_status st = parse_copy(copy, size, "flip.gguf");
        if (st == OPTIML_OK) n_ok++;
        else if (!has(optiml_last_error(), "flip.gguf")) n_unclean++;
        LLVMFuzzerTestOneInput(copy, size);
    }
    free(copy);
    CHECK(n_unclean == 0, "seed %llu: %d failures without the file name",
          (unsigned long long)seed, n_unclean);
    printf("test_gguf: %d of %d changed files still parse\n", n_ok, rounds);
}

/* Crafted files: each must fail with the status and a message naming what
 * is wrong. */
static void c_magic(struct bb *b) {
    bb_hdr(b, 3, 0, 0);
    b->p[0] = 'X';
}
static void c_v1(struct bb *b) { bb_hdr(b, 1, 0, 0); }
static void c_v4(struct bb *b) { bb_hdr(b, 4, 0, 0); }
static void c_be(struct bb *b) { bb_hdr(b, 0x03000000, 0, 0); }
static void c_n_kv(struct bb *b) { bb_hdr(b, 3, 0, UINT64_MAX / 2); }
static void c_n_tensors(struct bb *b) { bb_hdr(b, 3, 1ull << 40, 0); }
static void c_key_len(struct bb *b) { bb_hdr(b, 3, 0, 1); bb_u64(b, 1ull << 62); bb_u64(b, 0); }
static void c_empty_key(struct bb *b) { bb_hdr(b, 3, 0, 1); bb_kv_u32(b, "", 1); }
static void c_str_len(struct bb *b) {
    bb_hdr(b, 3, 0, 1);
    bb_str(b, "big.str");
    bb_u32(b, GGUF_TYPE_STRING);
    bb_u64(b, 1ull << 62);
}
static void c_arr_count(struct bb *b) {
    bb_hdr(b, 3, 0, 1);
    bb_str(b, "big.arr");
    bb_u32(b, GGUF_TYPE_ARRAY);
    bb_u32(b, GGUF_TYPE_UINT32);
    bb_u64(b, 1ull << 61);
}
static void c_str_arr_count(struct bb *b) {
    bb_hdr(b, 3, 0, 1);
    bb_str(b, "big.strs");
    bb_u32(b, GGUF_TYPE_ARRAY);
    bb_u32(b, GGUF_TYPE_STRING);
    bb_u64(b, UINT64_MAX);
}
static void nest(struct bb *b, const char *key, int depth) {
    bb_hdr(b, 3, 0, 1);
    bb_str(b, key);
    bb_u32(b, GGUF_TYPE_ARRAY);
    for (int i = 1; i < depth; i++) {
        bb_u32(b, GGUF_TYPE_ARRAY);
        bb_u64(b, 1);
    }
    bb_u32(b, GGUF_TYPE_UINT8);
    bb_u64(b, 0);
}
static void c_bomb(struct bb *b) { nest(b, "bomb", 40); }
static void c_nest17(struct bb *b) { nest(b, "deep", 17); }
static void c_nest16(struct bb *b) { nest(b, "deep", 16); }
static void c_vtype(struct bb *b) {
    bb_hdr(b, 3, 0, 1);
    bb_str(b, "odd");
    bb_u32(b, 13);
    bb_u32(b, 0);
}
static void c_etype(struct bb *b) {
    bb_hdr(b, 3, 0, 1);
    bb_str(b, "odd.arr");
    bb_u32(b, GGUF_TYPE_ARRAY);
    bb_u32(b, 99);
    bb_u64(b, 0);
}
static void c_bool(struct bb *b) {
    bb_hdr(b, 3, 0, 1);
    bb_str(b, "flag");
    bb_u32(b, GGUF_TYPE_BOOL);
    b->p[b->n++] = 2;
}
static void c_dup_key(struct bb *b) {
    bb_hdr(b, 3, 0, 3);
    bb_kv_u32(b, "x", 1);
    bb_kv_u32(b, "y", 2);
    bb_kv_u32(b, "x", 3);
}
static void c_align_48(struct bb *b) { bb_hdr(b, 3, 0, 1); bb_kv_u32(b, "general.alignment", 48); }
static void c_align_0(struct bb *b) { bb_hdr(b, 3, 0, 1); bb_kv_u32(b, "general.alignment", 0); }
static void c_align_u64(struct bb *b) {
    bb_hdr(b, 3, 0, 1);
    bb_str(b, "general.alignment");
    bb_u32(b, GGUF_TYPE_UINT64);
    bb_u64(b, 32);
}
static void c_align_1(struct bb *b) {
    bb_hdr(b, 3, 1, 1);
    bb_kv_u32(b, "general.alignment", 1);
    bb_tensor(b, "w", 1, 3, 0, DTYPE_I8, 1);
    bb_data(b, 1, 4);
}
static void one_tensor(struct bb *b, uint32_t n_dims, uint64_t ne0, uint64_t ne1, uint32_t type,
                       uint64_t offset, size_t data) {
    bb_hdr(b, 3, 1, 0);
    bb_tensor(b, "w", n_dims, ne0, ne1, type, offset);
    bb_data(b, 32, data);
}
static void c_dtype(struct bb *b) { one_tensor(b, 1, 32, 0, 77, 0, 64); }
static void c_dtype_gap(struct bb *b) { one_tensor(b, 1, 32, 0, 4, 0, 64); }
static void c_dims0(struct bb *b) { one_tensor(b, 0, 0, 0, DTYPE_F32, 0, 64); }
static void c_dims5(struct bb *b) {
    bb_hdr(b, 3, 1, 0);
    bb_str(b, "w");
    bb_u32(b, 5);
    for (int i = 0; i < 5; i++) bb_u64(b, 1);
    bb_u32(b, DTYPE_F32);
    bb_u64(b, 0);
    bb_data(b, 32, 64);
}
static void c_ne0(struct bb *b) { one_tensor(b, 2, 4, 0, DTYPE_F32, 0, 64); }
static void c_ne_overflow(struct bb *b) {
    one_tensor(b, 2, 1ull << 32, 1ull << 32, DTYPE_F32, 0, 64);
}
static void c_ne_huge(struct bb *b) { one_tensor(b, 1, UINT64_MAX, 0, DTYPE_I8, 0, 64); }
static void c_size_overflow(struct bb *b) {
    one_tensor(b, 2, 1ull << 31, 1ull << 31, DTYPE_F64, 0, 64);
}
static void c_block(struct bb *b) { one_tensor(b, 1, 16, 0, DTYPE_Q4_0, 0, 64); }
static void c_misaligned(struct bb *b) { one_tensor(b, 1, 4, 0, DTYPE_F32, 4, 64); }
static void c_past_end(struct bb *b) { one_tensor(b, 1, 16, 0, DTYPE_F32, 32, 64); }
static void c_offset_huge(struct bb *b) { one_tensor(b, 1, 16, 0, DTYPE_F32, UINT64_MAX - 31, 64); }
static void two_tensors(struct bb *b, const char *second, uint64_t offset) {
    bb_hdr(b, 3, 2, 0);
    bb_tensor(b, "first", 1, 16, 0, DTYPE_F32, 0);
    bb_tensor(b, second, 1, 8, 0, DTYPE_F32, offset);
    bb_data(b, 32, 128);
}
static void c_overlap(struct bb *b) { two_tensors(b, "second", 32); }
static void c_dup_tensor(struct bb *b) { two_tensors(b, "first", 64); }
static void c_ok_two(struct bb *b) { two_tensors(b, "second", 64); }
static void c_empty_name(struct bb *b) { two_tensors(b, "", 64); }
static void c_no_data(struct bb *b) {
    bb_hdr(b, 3, 1, 0);
    bb_tensor(b, "w", 1, 4, 0, DTYPE_F32, 0);
}

static const struct crafted {
    const char *name;
    void (*build)(struct bb *);
    optiml_status status;
    const char *expect[2]; /* substrings of the message */
} crafted[] = {
    {"bad_magic", c_magic, OPTIML_ERR_FORMAT, {"magic", "offset 0"}},
    {"version1", c_v1, OPTIML_ERR_UNSUPPORTED, {"version 1", "offset 4"}},
    {"version4", c_v4, OPTIML_ERR_UNSUPPORTED, {"version 4", "offset 4"}},
    {"big_endian", c_be, OPTIML_ERR_UNSUPPORTED, {"big-endian", NULL}},
    {"huge_n_kv", c_n_kv, OPTIML_ERR_FORMAT, {"key count", "offset 16"}},
    {"huge_n_tensors", c_n_tensors, OPTIML_ERR_FORMAT, {"tensor count", "offset 8"}},
    {"huge_key_len", c_key_len, OPTIML_ERR_FORMAT, {"key #0", "truncated"}},
    {"empty_key", c_empty_key, OPTIML_ERR_FORMAT, {"empty key", "offset 24"}},
    {"huge_str_len", c_str_len, OPTIML_ERR_FORMAT, {"key 'big.str'", "truncated"}},
    {"huge_arr_count", c_arr_count, OPTIML_ERR_FORMAT, {"key 'big.arr'", "array length"}},
    {"huge_str_arr", c_str_arr_count, OPTIML_ERR_FORMAT, {"key 'big.strs'", "array length"}},
    {"nest_bomb", c_bomb, OPTIML_ERR_FORMAT, {"key 'bomb'", "nested"}},
    {"nest17", c_nest17, OPTIML_ERR_FORMAT, {"key 'deep'", "nested"}},
    {"nest16", c_nest16, OPTIML_OK, {NULL, NULL}},
    {"value_type", c_vtype, OPTIML_ERR_FORMAT, {"key 'odd' at offset 35", "value type 13"}},
    {"elem_type", c_etype, OPTIML_ERR_FORMAT, {"key 'odd.arr'", "element type 99"}},
    {"bool2", c_bool, OPTIML_ERR_FORMAT, {"key 'flag'", "not 0 or 1"}},
    {"dup_key", c_dup_key, OPTIML_ERR_FORMAT, {"duplicate key", "key 'x' at offset 58"}},
    {"align48", c_align_48, OPTIML_ERR_FORMAT, {"general.alignment", "power of two"}},
    {"align0", c_align_0, OPTIML_ERR_FORMAT, {"general.alignment", "power of two"}},
    {"align_u64", c_align_u64, OPTIML_ERR_FORMAT, {"general.alignment", "uint32"}},
    {"align1", c_align_1, OPTIML_OK, {NULL, NULL}},
    {"dtype77", c_dtype, OPTIML_ERR_UNSUPPORTED, {"tensor 'w'", "unknown tensor type 77"}},
    {"dtype4", c_dtype_gap, OPTIML_ERR_UNSUPPORTED, {"tensor 'w'", "type 4"}},
    {"n_dims0", c_dims0, OPTIML_ERR_FORMAT, {"tensor 'w'", "n_dims 0"}},
    {"n_dims5", c_dims5, OPTIML_ERR_FORMAT, {"tensor 'w'", "n_dims 5"}},
    {"ne_zero", c_ne0, OPTIML_ERR_FORMAT, {"tensor 'w'", "ne[1] = 0"}},
    {"ne_overflow", c_ne_overflow, OPTIML_ERR_FORMAT, {"tensor 'w'", "overflows"}},
    {"ne_huge", c_ne_huge, OPTIML_ERR_FORMAT, {"tensor 'w'", "ne[0]"}},
    {"size_overflow", c_size_overflow, OPTIML_ERR_FORMAT, {"tensor 'w'", "overflows"}},
    {"block", c_block, OPTIML_ERR_FORMAT, {"tensor 'w'", "block size 32"}},
    {"misaligned", c_misaligned, OPTIML_ERR_FORMAT, {"tensor 'w'", "alignment 32"}},
    {"past_end", c_past_end, OPTIML_ERR_FORMAT, {"tensor 'w'", "outside"}},
    {"offset_huge", c_offset_huge, OPTIML_ERR_FORMAT, {"tensor 'w'", "outside"}},
    {"overlap", c_overlap, OPTIML_ERR_FORMAT, {"tensor 'second'", "overlaps tensor 'first'"}},
    {"dup_tensor", c_dup_tensor, OPTIML_ERR_FORMAT, {"duplicate tensor", "'first'"}},
    {"two_ok", c_ok_two, OPTIML_OK, {NULL, NULL}},
    {"empty_name", c_empty_name, OPTIML_ERR_FORMAT, {"tensor #1", "empty tensor name"}},
    {"no_data", c_no_data, OPTIML_ERR_FORMAT, {"data section", "truncated"}},
};
#define N_CRAFTED (sizeof crafted / sizeof crafted[0])

static void test_crafted(void) {
    for (size_t i = 0; i < N_CRAFTED; i++) {
        const struct crafted *c = &crafted[i];
        struct bb b = {.n = 0};
        char name[64];
        c->build(&b);
        snprintf(name, sizeof name, "%s.gguf", c->name);
        optiml_status st = parse_copy(b.p, b.n, name);
        const char *msg = optiml_last_error();
        CHECK(st == c->status, "%s: status %d, expected %d (%s)", c->name, st, c->status, msg);
        if (st == OPTIML_OK) continue;
        CHECK(has(msg, name), "%s: message lacks the file name: %s", c->name, msg);
        for (int k = 0; k < 2; k++)
            if (c->expect[k])
                CHECK(has(msg, c->expect[k]), "%s: lacks '%s': %s", c->name, c->expect[k], msg);
        LLVMFuzzerTestOneInput(b.p, b.n);
    }
}

/* Version 2 files read like version 3 ones. */
static void test_version2(const uint8_t *buf, size_t size) {
    uint8_t *copy = malloc(size);
    memcpy(copy, buf, size);
    copy[4] = 2;
    CHECK(parse_copy(copy, size, "v2.gguf") == OPTIML_OK, "%s", optiml_last_error());
    free(copy);
}

/* ==== seed corpus ======================================================== */

static void write_seed_corpus(const char *dir, const uint8_t *small, size_t small_size) {
    static const char *const picks[] = {"nest_bomb", "dtype77", "overlap", "value_type"};
    char path[600], ref[512];
    size_t n;
    snprintf(path, sizeof path, "%s/valid_small.gguf", dir);
    file_write(path, small, small_size);
    snprintf(path, sizeof path, "%s/truncated.gguf", dir);
    file_write(path, small, small_size - 7);
    uint8_t *big = file_read(tmp_path(ref, "ref64.gguf"), &n);
    snprintf(path, sizeof path, "%s/valid_all_types_align64.gguf", dir);
    if (big) file_write(path, big, n);
    free(big);
    for (size_t i = 0; i < N_CRAFTED; i++)
        for (size_t k = 0; k < sizeof picks / sizeof picks[0]; k++) {
            if (strcmp(crafted[i].name, picks[k]) != 0) continue;
            struct bb b = {.n = 0};
            crafted[i].build(&b);
            snprintf(path, sizeof path, "%s/%s.gguf", dir, crafted[i].name);
            file_write(path, b.p, b.n);
        }
    printf("test_gguf: wrote the seed corpus to %s\n", dir);
}

static void remove_tmp_dir(void) {
    DIR *d = opendir(tmp_dir);
    struct dirent *e;
    char path[600];
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "%s/%s", tmp_dir, e->d_name);
        unlink(path);
    }
    if (d) closedir(d);
    rmdir(tmp_dir);
}

int main(void) {
    const char *tmp = getenv("TMPDIR");
    snprintf(tmp_dir, sizeof tmp_dir, "%s/test_gguf.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(tmp_dir)) {
        perror("mkdtemp");
        return 1;
    }
    optiml_log_set(quiet_log, NULL, OPTIML_LOG_LEVEL_ERROR);
    tensor_cases_init();
    test_roundtrip();
    test_passthrough();
    test_getters();
    test_writer_errors();
    test_crafted();

    size_t size = 0;
    uint8_t *small = small_file(&size);
    CHECK(small && size > 100);
    if (small) {
        test_version2(small, size);
        test_truncations(small, size);
        test_byte_changes(small, size, 12345, 3000);
        test_byte_changes(small, size, (uint64_t)time(NULL), 2000);
        const char *corpus = getenv("OPTIML_GGUF_SEED_CORPUS");
        if (corpus && *corpus) write_seed_corpus(corpus, small, size);
    }
    free(small);
    remove_tmp_dir();
    optiml_log_set(NULL, NULL, OPTIML_LOG_LEVEL_INFO);
    return test_summary("test_gguf");
}
