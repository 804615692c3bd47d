/*
 * gguf.h - GGUF reader (memory-mapped, bounds-checked) and writer.
 *
 * File format (versions 2 and 3; all integers little-endian):
 *
 *   u32 magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
 *   n_kv  x  { str key | u32 value_type | value }
 *   n_tensors x { str name | u32 n_dims (1..4) | u64 ne[n_dims] |
 *                 u32 dtype | u64 offset (relative to the data section) }
 *   padding to `general.alignment` (u32, default 32, a power of two)
 *   data section: each tensor at its offset, offsets multiples of alignment
 *
 *   str   = u64 length | bytes (not NUL-terminated, UTF-8 by convention)
 *   value = a scalar of value_type, a str, or
 *           an array: u32 elem_type | u64 n | n elements (arrays may nest)
 *
 * Version 1 (u32 counts and lengths) is rejected as unsupported.
 *
 * PowerInfer files (docs/FORMAT.md "PowerInfer files") are the same
 * container with the magic "PWRI" instead of "GGUF"; gguf_file.powerinfer
 * says which one was read. Their tensor types follow the ggml of late 2023,
 * where 16, 17, 18 were i8, i16, i32 (today's 24, 25, 26; 16-18 are now
 * iq2_xxs, iq2_xs, iq3_xxs): the reader renumbers those and refuses types
 * above 18 in such a file.
 *
 * Reader guarantees: every count, length, offset and size is checked against
 * the mapping before use; a truncated, corrupt or unsupported file fails with
 * OPTIML_ERR_FORMAT / OPTIML_ERR_UNSUPPORTED and a message naming the key or
 * tensor and the byte offset; the parser never reads outside the mapping.
 * Strings returned by the reader point into the mapping and are NOT
 * NUL-terminated; use gguf_str_eq / gguf_str_dup.
 *
 * The parser (gguf_parse) works on a caller-provided buffer too, which is
 * what the fuzz target and the corpus tests use.
 */
#ifndef OPTIML_GGUF_H
#define OPTIML_GGUF_H

#include "common.h"

#include <stdbool.h>
#include <stdint.h>

#define GGUF_MAGIC 0x46554747u            /* "GGUF" read as a little-endian u32 */
#define GGUF_MAGIC_POWERINFER 0x49525750u  /* "PWRI" likewise                    */
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_DIMS 4

enum gguf_type {
    GGUF_TYPE_UINT8 = 0,
    GGUF_TYPE_INT8 = 1,
    GGUF_TYPE_UINT16 = 2,
    GGUF_TYPE_INT16 = 3,
    GGUF_TYPE_UINT32 = 4,
    GGUF_TYPE_INT32 = 5,
    GGUF_TYPE_FLOAT32 = 6,
    GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8,
    GGUF_TYPE_ARRAY = 9,
    GGUF_TYPE_UINT64 = 10,
    GGUF_TYPE_INT64 = 11,
    GGUF_TYPE_FLOAT64 = 12,
    GGUF_TYPE_COUNT = 13,
};

/* "uint8", "string", ... ("unknown" otherwise). */
const char *gguf_type_name(uint32_t type);

struct gguf_str {
    uint64_t n;
    const char *data; /* n bytes, not NUL-terminated */
};

/* A metadata value. Scalars are widened: unsigned ints into u64, signed
 * ints into i64, float32/float64 into f64, bool into b. */
struct gguf_value {
    enum gguf_type type;
    union {
        uint64_t u64;
        int64_t i64;
        double f64;
        bool b;
        struct gguf_str str;
        struct {
            enum gguf_type type; /* element type                               */
            uint64_t n;          /* element count                              */
            /* numeric/bool elements: pointer to the n raw little-endian
             * elements inside the file (possibly unaligned: read with
             * memcpy or the gguf_arr_* helpers);
             * strings: struct gguf_str[n] (owned by the gguf_file);
             * arrays:  struct gguf_value[n] (owned by the gguf_file).    */
            const void *data;
        } arr;
    };
};

struct gguf_kv {
    struct gguf_str key;
    struct gguf_value value;
    uint64_t offset; /* file offset of the key, for messages */
};

struct gguf_tensor_info {
    struct gguf_str name;
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS]; /* ne[0] is the row length; unused dims are 1 */
    uint32_t type;              /* enum dtype                                  */
    uint64_t offset;            /* relative to the data section                */
    uint64_t size;              /* bytes, computed from type and ne            */
    const void *data;           /* inside the mapping (or buffer)              */
};

typedef struct gguf_file {
    uint32_t version;
    bool powerinfer;      /* magic "PWRI": a PowerInfer file    */
    uint32_t alignment;
    uint64_t n_kv;
    struct gguf_kv *kv;
    uint64_t n_tensors;
    struct gguf_tensor_info *tensors;
    uint64_t data_offset; /* file offset of the data section */
    const uint8_t *base;  /* the whole file                  */
    uint64_t size;        /* its size in bytes               */
    /* private */
    void *map;            /* mmap'd region (the file, or anonymous memory it
                             was read into), or NULL for gguf_parse buffers */
    uint64_t map_size;
    void *arena;          /* allocations owned by the file                  */
} gguf_file;

/* Map and parse the file at path. On failure *out is NULL and the status
 * says why (optiml_last_error() has the message, which names path). */
optiml_status gguf_open(const char *path, gguf_file **out);
/* The same; use_mmap false reads the whole file into memory instead (huge
 * pages where the OS gives them; see gguf.c). */
optiml_status gguf_open_ex(const char *path, bool use_mmap, gguf_file **out);

/* Parse a GGUF image held in memory (not copied: buf must outlive *out).
 * name is used in messages. */
optiml_status gguf_parse(const void *buf, uint64_t size, const char *name, gguf_file **out);

void gguf_close(gguf_file *f); /* NULL is a no-op */

/* ---- lookups ----------------------------------------------------------- */

bool gguf_str_eq(struct gguf_str s, const char *cstr);
/* malloc'd NUL-terminated copy (NULL on allocation failure). */
char *gguf_str_dup(struct gguf_str s);

/* Index of the key, or -1. */
int64_t gguf_find_key(const gguf_file *f, const char *key);
/* The value of key, or NULL if absent. */
const struct gguf_value *gguf_get(const gguf_file *f, const char *key);

/* Typed getters: OPTIML_OK and *out set if key exists and its value fits the
 * requested type (any integer type whose value is in range for the integer
 * getters; float32/float64 for the float getter); OPTIML_ERR_FORMAT with a
 * message naming the key and its actual type if it exists but does not fit;
 * OPTIML_ERR_INVALID_ARG (no message logged) if it is missing. Use the
 * _or variants for optional keys. */
optiml_status gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out);
optiml_status gguf_get_i64(const gguf_file *f, const char *key, int64_t *out);
optiml_status gguf_get_f32(const gguf_file *f, const char *key, float *out);
optiml_status gguf_get_bool(const gguf_file *f, const char *key, bool *out);
optiml_status gguf_get_str(const gguf_file *f, const char *key, struct gguf_str *out);
/* An array of the given element type (GGUF_TYPE_COUNT accepts any type). */
optiml_status gguf_get_arr(const gguf_file *f, const char *key, enum gguf_type elem_type,
                           const struct gguf_value **out);

/* Missing key: *out = def and OK. Present but wrong type: error as above. */
optiml_status gguf_get_u32_or(const gguf_file *f, const char *key, uint32_t def, uint32_t *out);
optiml_status gguf_get_f32_or(const gguf_file *f, const char *key, float def, float *out);
optiml_status gguf_get_bool_or(const gguf_file *f, const char *key, bool def, bool *out);

/* Element i of a numeric array value (any integer/float/bool element type),
 * converted. No bounds check beyond i < arr.n (asserted). */
double gguf_arr_f64(const struct gguf_value *arr, uint64_t i);
int64_t gguf_arr_i64(const struct gguf_value *arr, uint64_t i);

/* Tensor by name, or NULL. */
const struct gguf_tensor_info *gguf_find_tensor(const gguf_file *f, const char *name);

/* ---- writer ------------------------------------------------------------ */

typedef struct gguf_writer gguf_writer;

/* Produces the data of one tensor at write time into dst (size bytes).
 * Returns OPTIML_OK or an error status (with optiml_fail's message). */
typedef optiml_status (*gguf_fill_fn)(void *user, void *dst, uint64_t size);

/* NULL on allocation failure. Version 3, alignment 32 unless changed by a
 * "general.alignment" u32 key set before writing. */
gguf_writer *gguf_writer_init(void);
void gguf_writer_free(gguf_writer *w);

/* Set (or replace) a key. Keys and strings are copied. */
optiml_status gguf_writer_set_u8(gguf_writer *w, const char *key, uint8_t v);
optiml_status gguf_writer_set_i8(gguf_writer *w, const char *key, int8_t v);
optiml_status gguf_writer_set_u16(gguf_writer *w, const char *key, uint16_t v);
optiml_status gguf_writer_set_i16(gguf_writer *w, const char *key, int16_t v);
optiml_status gguf_writer_set_u32(gguf_writer *w, const char *key, uint32_t v);
optiml_status gguf_writer_set_i32(gguf_writer *w, const char *key, int32_t v);
optiml_status gguf_writer_set_u64(gguf_writer *w, const char *key, uint64_t v);
optiml_status gguf_writer_set_i64(gguf_writer *w, const char *key, int64_t v);
optiml_status gguf_writer_set_f32(gguf_writer *w, const char *key, float v);
optiml_status gguf_writer_set_f64(gguf_writer *w, const char *key, double v);
optiml_status gguf_writer_set_bool(gguf_writer *w, const char *key, bool v);
optiml_status gguf_writer_set_str(gguf_writer *w, const char *key, const char *v);
/* Array of n numeric/bool elements of elem_type, given as raw little-endian
 * values (copied). */
optiml_status gguf_writer_set_arr(gguf_writer *w, const char *key, enum gguf_type elem_type,
                                  const void *data, uint64_t n);
/* Array of n strings (copied); lens may be NULL for NUL-terminated strings. */
optiml_status gguf_writer_set_arr_str(gguf_writer *w, const char *key, const char *const *strs,
                                      const uint64_t *lens, uint64_t n);
/* Any value, including nested arrays, e.g. one read by gguf_get (deep copy).
 * This is how tools pass metadata through unchanged. */
optiml_status gguf_writer_set_value(gguf_writer *w, const char *key, const struct gguf_value *v);
/* Remove a key if present. */
void gguf_writer_remove(gguf_writer *w, const char *key);

/* Add a tensor whose bytes are at data (not copied: must stay valid until
 * gguf_writer_write returns). ne has n_dims entries, ne[0] = row length. */
optiml_status gguf_writer_add_tensor(gguf_writer *w, const char *name, uint32_t type,
                                     uint32_t n_dims, const uint64_t *ne, const void *data);
/* Add a tensor whose bytes fill(user, dst, size) produces at write time. */
optiml_status gguf_writer_add_tensor_fn(gguf_writer *w, const char *name, uint32_t type,
                                        uint32_t n_dims, const uint64_t *ne, gguf_fill_fn fill,
                                        void *user);

/* Write everything to path (through a temporary file renamed into place, so
 * a failed write leaves no partial file under path). */
optiml_status gguf_writer_write(gguf_writer *w, const char *path);

#endif /* OPTIML_GGUF_H */
