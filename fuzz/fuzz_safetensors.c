/*
 * fuzz_safetensors.c - libFuzzer target for the safetensors parser
 * (src/safetensors.c): parse the input and, when it parses, check what the
 * parser vouched for - every tensor inside the data area, sorted by offset
 * without overlap, its size equal to elements x element size, findable by
 * name - and read every byte of every tensor so the sanitizers see any
 * out-of-bounds pointer. A failure must name the input and return no file.
 * fuzz/replay.c runs it over a corpus without libFuzzer.
 */
#include "safetensors.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_NAME "fuzz-input"

volatile uint64_t fuzz_safetensors_sink; /* keeps the reads from being optimized away */

static void fuzz_quiet_log(optiml_log_level level, const char *msg, void *user) {}

static uint64_t fuzz_walk(const struct safetensors_file *f) {
    uint64_t h = 0xcbf29ce484222325ull;
    const uint8_t *lo = f->base + f->data_offset, *hi = f->base + f->size;
    if (f->data_offset < 8 || f->data_offset > f->size) abort();
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const struct safetensors_tensor *t = &f->tensors[i];
        const uint8_t *p = t->data;
        if (p < lo || p > hi || t->size > (uint64_t)(hi - p)) abort();
        if (t->n_elements * safetensors_dtype_size(t->dtype) != t->size) abort();
        if (t->n_dims > SAFETENSORS_MAX_DIMS) abort();
        if (i > 0 && t->offset < f->tensors[i - 1].offset + f->tensors[i - 1].size) abort();
        if (safetensors_find(f, t->name) != t) abort(); /* names are unique */
        if (safetensors_dtype_to_gguf(t->dtype) < -1) abort();
        for (uint64_t k = 0; k < t->size; k++) h = (h ^ p[k]) * 0x100000001b3ull;
        for (const char *c = t->name; *c; c++) h = (h ^ (uint8_t)*c) * 0x100000001b3ull;
    }
    return h;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    struct safetensors_file *f = NULL;
    optiml_log_set(fuzz_quiet_log, NULL, OPTIML_LOG_LEVEL_ERROR);
    optiml_status st = safetensors_parse(data, size, FUZZ_NAME, &f);
    if (st != OPTIML_OK) {
        if (f || !strstr(optiml_last_error(), FUZZ_NAME)) abort();
        return 0;
    }
    fuzz_safetensors_sink = fuzz_walk(f);
    safetensors_close(f);
    return 0;
}
