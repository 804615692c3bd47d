/*
 * tensor.h - a read-only view of a weight tensor inside the mapped model
 * file: type, shape (GGUF order: ne[0] is the row length) and data, and
 * where the CPU multiplies it from a repacked copy, that copy.
 */
#ifndef OPTIML_TENSOR_H
#define OPTIML_TENSOR_H

#include <stdint.h>

struct tensor {
    const void *data;  /* NULL when the tensor is absent           */
    uint32_t type;     /* enum dtype                               */
    int64_t ne[4];     /* ne[0] = row length, ne[1] = rows, ...     */
    uint64_t row_size; /* bytes of one row                         */
    void *x8;          /* rows 0 .. ne[1] / 8 * 8 repacked 8 at a time
                          for the CPU (cpu/ops.h's x8 layout; model.c
                          owns it), or NULL                         */
};

static inline const void *tensor_row(const struct tensor *t, int64_t row) {
    return (const char *)t->data + (uint64_t)row * t->row_size;
}

#endif /* OPTIML_TENSOR_H */
