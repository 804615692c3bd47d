/*
 * safetensors.h - reader of Hugging Face .safetensors weight files
 * (memory-mapped, bounds-checked). Used by optiml-convert --hf.
 *
 * File format (all integers little-endian):
 *
 *   u64 N                       length of the JSON header
 *   N bytes                     UTF-8 JSON object (may end in spaces):
 *     { "TENSOR_NAME": { "dtype": "F32", "shape": [d0, d1, ...],
 *                        "data_offsets": [begin, end] },
 *       ...,
 *       "__metadata__": { "key": "string", ... } }      (optional)
 *   data area                   the rest of the file
 *
 * Each tensor's bytes are data[begin, end), row-major with the last shape
 * entry varying fastest (PyTorch layout), and end - begin must equal
 * product(shape) * element size. shape [] is a scalar (one element).
 *
 * Reader guarantees: the header length is checked against the file size and
 * a cap (SAFETENSORS_MAX_HEADER); the JSON must parse with no duplicate keys;
 * every tensor needs a known dtype, a shape whose byte size matches its
 * offsets, offsets inside the data area and no overlap with another tensor.
 * A failure returns OPTIML_ERR_FORMAT (or _UNSUPPORTED for a valid file we
 * cannot read) with a message naming the file, the tensor and the offset.
 *
 * The JSON parser is jansson: built without it (OPTIML_HAVE_JANSSON
 * undefined), safetensors_parse and safetensors_open fail with
 * OPTIML_ERR_UNSUPPORTED.
 */
#ifndef OPTIML_SAFETENSORS_H
#define OPTIML_SAFETENSORS_H

#include "common.h"

#include <stdint.h>

#define SAFETENSORS_MAX_HEADER (100ull << 20) /* bytes of JSON we accept */
#define SAFETENSORS_MAX_DIMS 8

enum safetensors_dtype {
    SAFETENSORS_BOOL,
    SAFETENSORS_U8,
    SAFETENSORS_I8,
    SAFETENSORS_F8_E5M2,
    SAFETENSORS_F8_E4M3,
    SAFETENSORS_I16,
    SAFETENSORS_U16,
    SAFETENSORS_F16,
    SAFETENSORS_BF16,
    SAFETENSORS_I32,
    SAFETENSORS_U32,
    SAFETENSORS_F32,
    SAFETENSORS_F64,
    SAFETENSORS_I64,
    SAFETENSORS_U64,
    SAFETENSORS_DTYPE_COUNT,
};

/* "F32", "BF16", ... ("unknown" otherwise). */
const char *safetensors_dtype_name(enum safetensors_dtype t);
/* Bytes per element (0 for an unknown type). */
uint32_t safetensors_dtype_size(enum safetensors_dtype t);
/* The GGUF element type (enum dtype) of the same encoding, or -1 if GGUF has
 * none (bool, unsigned and 8-bit float types). */
int safetensors_dtype_to_gguf(enum safetensors_dtype t);

struct safetensors_tensor {
    char *name;                          /* NUL-terminated, owned by the file  */
    enum safetensors_dtype dtype;
    uint32_t n_dims;                     /* 0 for a scalar                     */
    uint64_t shape[SAFETENSORS_MAX_DIMS];/* PyTorch order: shape[n_dims-1] varies fastest */
    uint64_t n_elements;
    uint64_t offset;                     /* begin, relative to the data area   */
    uint64_t size;                       /* end - begin                        */
    const void *data;                    /* inside the buffer (maybe unaligned)*/
};

struct safetensors_file {
    char *name;                          /* path or name given, for messages   */
    uint64_t n_tensors;
    struct safetensors_tensor *tensors;  /* sorted by offset                   */
    uint64_t data_offset;                /* file offset of the data area       */
    const uint8_t *base;                 /* the whole file                     */
    uint64_t size;
    /* private */
    void *map;                           /* mmap'd region, NULL for buffers    */
    uint64_t map_size;
};

/* Parse a safetensors image held in memory (not copied: buf must outlive
 * *out). name is used in messages. On failure *out is NULL. */
optiml_status safetensors_parse(const void *buf, uint64_t size, const char *name,
                                struct safetensors_file **out);

/* Map and parse the file at path. On failure *out is NULL and the status
 * says why (optiml_last_error() has the message, which names path). */
optiml_status safetensors_open(const char *path, struct safetensors_file **out);

void safetensors_close(struct safetensors_file *f); /* NULL is a no-op */

/* Tensor by name, or NULL. */
const struct safetensors_tensor *safetensors_find(const struct safetensors_file *f,
                                                  const char *name);

#endif /* OPTIML_SAFETENSORS_H */
