/*
 * safetensors.c - bounds-checked parser of .safetensors files (the format
 * is described in safetensors.h): header length, JSON header (jansson),
 * per-tensor dtype/shape/offset validation, then a table of tensors sorted
 * by offset whose data pointers lie inside the caller's buffer or mapping.
 */
#define _POSIX_C_SOURCE 200809L
#include "safetensors.h"

#include "dtype.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifdef OPTIML_HAVE_JANSSON
#include <jansson.h>
#endif

/* ---- dtypes ---------------------------------------------------------------- */

struct safetensors_dtype_info {
    const char *name;
    uint32_t size;
    int gguf; /* enum dtype, -1 if none */
};

static const struct safetensors_dtype_info safetensors_dtypes[SAFETENSORS_DTYPE_COUNT] = {
    [SAFETENSORS_BOOL] = {"BOOL", 1, -1},
    [SAFETENSORS_U8] = {"U8", 1, -1},
    [SAFETENSORS_I8] = {"I8", 1, DTYPE_I8},
    [SAFETENSORS_F8_E5M2] = {"F8_E5M2", 1, -1},
    [SAFETENSORS_F8_E4M3] = {"F8_E4M3", 1, -1},
    [SAFETENSORS_I16] = {"I16", 2, DTYPE_I16},
    [SAFETENSORS_U16] = {"U16", 2, -1},
    [SAFETENSORS_F16] = {"F16", 2, DTYPE_F16},
    [SAFETENSORS_BF16] = {"BF16", 2, DTYPE_BF16},
    [SAFETENSORS_I32] = {"I32", 4, DTYPE_I32},
    [SAFETENSORS_U32] = {"U32", 4, -1},
    [SAFETENSORS_F32] = {"F32", 4, DTYPE_F32},
    [SAFETENSORS_F64] = {"F64", 8, DTYPE_F64},
    [SAFETENSORS_I64] = {"I64", 8, DTYPE_I64},
    [SAFETENSORS_U64] = {"U64", 8, -1},
};

const char *safetensors_dtype_name(enum safetensors_dtype t) {
    return (unsigned)t < SAFETENSORS_DTYPE_COUNT ? safetensors_dtypes[t].name : "unknown";
}

uint32_t safetensors_dtype_size(enum safetensors_dtype t) {
    return (unsigned)t < SAFETENSORS_DTYPE_COUNT ? safetensors_dtypes[t].size : 0;
}

int safetensors_dtype_to_gguf(enum safetensors_dtype t) {
    return (unsigned)t < SAFETENSORS_DTYPE_COUNT ? safetensors_dtypes[t].gguf : -1;
}

/* ---- lifetime and lookup --------------------------------------------------- */

void safetensors_close(struct safetensors_file *f) {
    if (!f) return;
    for (uint64_t i = 0; i < f->n_tensors; i++) free(f->tensors[i].name);
    free(f->tensors);
    free(f->name);
    if (f->map) munmap(f->map, f->map_size);
    free(f);
}

const struct safetensors_tensor *safetensors_find(const struct safetensors_file *f,
                                                  const char *name) {
    for (uint64_t i = 0; i < f->n_tensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0) return &f->tensors[i];
    return NULL;
}

/* ---- parser ------------------------------------------------------------------ */

#ifdef OPTIML_HAVE_JANSSON

static int safetensors_dtype_from_name(const char *name) {
    for (int t = 0; t < SAFETENSORS_DTYPE_COUNT; t++)
        if (strcmp(safetensors_dtypes[t].name, name) == 0) return t;
    return -1;
}

static int safetensors_cmp_offset(const void *a, const void *b) {
    const struct safetensors_tensor *x = a, *y = b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    if (x->size != y->size) return x->size < y->size ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* A JSON integer in [0, INT64_MAX], or false. */
static bool safetensors_json_u64(const json_t *v, uint64_t *out) {
    if (!json_is_integer(v)) return false;
    json_int_t i = json_integer_value(v);
    if (i < 0) return false;
    *out = (uint64_t)i;
    return true;
}

/* Fill t from the header entry of tensor `key`. data_size is the size of the
 * data area. Messages name the file, the tensor and the offsets. */
static optiml_status safetensors_parse_entry(const char *fname, const char *key, const json_t *v,
                                             uint64_t data_size, struct safetensors_tensor *t) {
    if (!json_is_object(v))
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: tensor '%s': header entry is not an object",
                           fname, key);

    const json_t *jdtype = json_object_get(v, "dtype");
    if (!json_is_string(jdtype))
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: tensor '%s': missing or non-string \"dtype\"",
                           fname, key);
    int dt = safetensors_dtype_from_name(json_string_value(jdtype));
    if (dt < 0)
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "%s: tensor '%s': unknown dtype '%.32s'",
                           fname, key, json_string_value(jdtype));
    t->dtype = (enum safetensors_dtype)dt;

    const json_t *jshape = json_object_get(v, "shape");
    if (!json_is_array(jshape))
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: tensor '%s': missing or non-array \"shape\"",
                           fname, key);
    size_t n_dims = json_array_size(jshape);
    if (n_dims > SAFETENSORS_MAX_DIMS)
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "%s: tensor '%s': %zu dimensions (at most %d)",
                           fname, key, n_dims, SAFETENSORS_MAX_DIMS);
    t->n_dims = (uint32_t)n_dims;
    t->n_elements = 1;
    for (size_t i = 0; i < n_dims; i++) {
        uint64_t d;
        if (!safetensors_json_u64(json_array_get(jshape, i), &d))
            return optiml_fail(OPTIML_ERR_FORMAT,
                               "%s: tensor '%s': shape[%zu] is not a non-negative integer", fname,
                               key, i);
        t->shape[i] = d;
        if (!mul_u64_ok(t->n_elements, d, &t->n_elements))
            return optiml_fail(OPTIML_ERR_FORMAT, "%s: tensor '%s': element count overflows",
                               fname, key);
    }

    const json_t *joff = json_object_get(v, "data_offsets");
    uint64_t begin, end;
    if (!json_is_array(joff) || json_array_size(joff) != 2 ||
        !safetensors_json_u64(json_array_get(joff, 0), &begin) ||
        !safetensors_json_u64(json_array_get(joff, 1), &end))
        return optiml_fail(OPTIML_ERR_FORMAT,
                           "%s: tensor '%s': \"data_offsets\" must be [begin, end] of "
                           "non-negative integers",
                           fname, key);
    if (begin > end || end > data_size)
        return optiml_fail(OPTIML_ERR_FORMAT,
                           "%s: tensor '%s': data_offsets [%llu, %llu] outside the data area "
                           "of %llu bytes",
                           fname, key, (unsigned long long)begin, (unsigned long long)end,
                           (unsigned long long)data_size);
    uint64_t want;
    if (!mul_u64_ok(t->n_elements, safetensors_dtype_size(t->dtype), &want) ||
        want != end - begin)
        return optiml_fail(OPTIML_ERR_FORMAT,
                           "%s: tensor '%s': data_offsets [%llu, %llu] hold %llu bytes, but "
                           "%llu elements of %s need %llu",
                           fname, key, (unsigned long long)begin, (unsigned long long)end,
                           (unsigned long long)(end - begin), (unsigned long long)t->n_elements,
                           safetensors_dtype_name(t->dtype), (unsigned long long)want);
    t->offset = begin;
    t->size = end - begin;
    return OPTIML_OK;
}

static optiml_status safetensors_parse_header(struct safetensors_file *f, const json_t *root) {
    if (!json_is_object(root))
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: header is not a JSON object", f->name);
    size_t n_entries = json_object_size(root);
    f->tensors = calloc(n_entries ? n_entries : 1, sizeof(*f->tensors));
    if (!f->tensors) return optiml_fail(OPTIML_ERR_NOMEM, "%s: out of memory", f->name);

    uint64_t data_size = f->size - f->data_offset;
    const char *key;
    json_t *v;
    json_object_foreach((json_t *)root, key, v) {
        if (strcmp(key, "__metadata__") == 0) {
            if (!json_is_object(v))
                return optiml_fail(OPTIML_ERR_FORMAT, "%s: \"__metadata__\" is not an object",
                                   f->name);
            continue;
        }
        struct safetensors_tensor *t = &f->tensors[f->n_tensors];
        TRY(safetensors_parse_entry(f->name, key, v, data_size, t));
        t->name = strdup(key);
        if (!t->name) return optiml_fail(OPTIML_ERR_NOMEM, "%s: out of memory", f->name);
        t->data = f->base + f->data_offset + t->offset;
        f->n_tensors++;
    }

    /* No two tensors may share bytes. */
    qsort(f->tensors, f->n_tensors, sizeof(*f->tensors), safetensors_cmp_offset);
    for (uint64_t i = 1; i < f->n_tensors; i++) {
        const struct safetensors_tensor *a = &f->tensors[i - 1], *b = &f->tensors[i];
        if (b->offset < a->offset + a->size)
            return optiml_fail(OPTIML_ERR_FORMAT,
                               "%s: tensor '%s' at data offset %llu overlaps tensor '%s' "
                               "[%llu, %llu)",
                               f->name, b->name, (unsigned long long)b->offset, a->name,
                               (unsigned long long)a->offset,
                               (unsigned long long)(a->offset + a->size));
    }
    return OPTIML_OK;
}

optiml_status safetensors_parse(const void *buf, uint64_t size, const char *name,
                                struct safetensors_file **out) {
    *out = NULL;
    if (!buf && size) return optiml_fail(OPTIML_ERR_INVALID_ARG, "safetensors_parse: NULL buffer");
    if (!name) name = "<buffer>";
    if (size < 8)
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: %llu bytes is too short for a safetensors file",
                           name, (unsigned long long)size);
    const uint8_t *p = buf;
    uint64_t n_header = 0;
    for (int i = 7; i >= 0; i--) n_header = n_header << 8 | p[i];
    if (n_header > size - 8)
        return optiml_fail(OPTIML_ERR_FORMAT,
                           "%s: header length %llu at offset 0 runs past the end of the file "
                           "(%llu bytes)",
                           name, (unsigned long long)n_header, (unsigned long long)size);
    if (n_header > SAFETENSORS_MAX_HEADER)
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: header length %llu exceeds the %llu-byte cap",
                           name, (unsigned long long)n_header,
                           (unsigned long long)SAFETENSORS_MAX_HEADER);

    struct safetensors_file *f = calloc(1, sizeof(*f));
    if (!f || !(f->name = strdup(name))) {
        free(f);
        return optiml_fail(OPTIML_ERR_NOMEM, "%s: out of memory", name);
    }
    f->base = p;
    f->size = size;
    f->data_offset = 8 + n_header;

    json_error_t jerr;
    json_t *root = json_loadb((const char *)p + 8, (size_t)n_header, JSON_REJECT_DUPLICATES, &jerr);
    optiml_status st;
    if (!root) {
        st = optiml_fail(OPTIML_ERR_FORMAT, "%s: bad JSON header at offset %llu: %s", name,
                         (unsigned long long)(8 + (jerr.position > 0 ? jerr.position : 0)),
                         jerr.text);
    } else {
        st = safetensors_parse_header(f, root);
        json_decref(root);
    }
    if (st != OPTIML_OK) {
        safetensors_close(f);
        return st;
    }
    *out = f;
    return OPTIML_OK;
}

#else /* !OPTIML_HAVE_JANSSON */

optiml_status safetensors_parse(const void *buf, uint64_t size, const char *name,
                                struct safetensors_file **out) {
    (void)buf;
    (void)size;
    *out = NULL;
    return optiml_fail(OPTIML_ERR_UNSUPPORTED,
                       "%s: built without jansson: install libjansson-dev and rebuild",
                       name ? name : "safetensors");
}

#endif /* OPTIML_HAVE_JANSSON */

/* ---- files ------------------------------------------------------------------- */

optiml_status safetensors_open(const char *path, struct safetensors_file **out) {
    *out = NULL;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return optiml_fail(OPTIML_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return optiml_fail(OPTIML_ERR_IO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(sb.st_mode) || sb.st_size < 8) {
        close(fd);
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: not a safetensors file (%lld bytes)", path,
                           (long long)sb.st_size);
    }
    uint64_t size = (uint64_t)sb.st_size;
    void *map = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (map == MAP_FAILED) return optiml_fail(OPTIML_ERR_IO, "%s: mmap failed: %s", path, strerror(e));

    optiml_status st = safetensors_parse(map, size, path, out);
    if (st != OPTIML_OK) {
        munmap(map, (size_t)size);
        return st;
    }
    (*out)->map = map;
    (*out)->map_size = size;
    return OPTIML_OK;
}
