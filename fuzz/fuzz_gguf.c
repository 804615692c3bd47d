/*
 * fuzz_gguf.c - libFuzzer target for the GGUF parser: parse the input as a
 * GGUF image and, when it parses, touch everything the parser vouched for
 * (every key and value through the typed getters, nested arrays, every byte
 * of every tensor) so the sanitizers see any out-of-bounds pointer. Aborts
 * if a failure message does not name the input or a lookup is inconsistent.
 * fuzz/replay.c runs it over a corpus without libFuzzer.
 */
#include "gguf.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_NAME "fuzz-input"

volatile uint64_t fuzz_gguf_sink; /* keeps the walk from being optimized away */

static void fuzz_quiet_log(optiml_log_level level, const char *msg, void *user) {
    (void)level, (void)msg, (void)user;
}

static uint64_t fuzz_mix(uint64_t h, uint64_t v) { return (h ^ v) * 0x100000001b3ull; }

static uint64_t fuzz_bytes(uint64_t h, const void *p, uint64_t n) {
    for (uint64_t i = 0; i < n; i++) h = fuzz_mix(h, ((const uint8_t *)p)[i]);
    return h;
}

static uint64_t fuzz_value(uint64_t h, const struct gguf_value *v) {
    uint64_t bits;
    switch (v->type) {
    case GGUF_TYPE_STRING: return fuzz_bytes(h, v->str.data, v->str.n);
    case GGUF_TYPE_ARRAY: break;
    default:
        memcpy(&bits, &v->u64, sizeof bits);
        return fuzz_mix(h, bits);
    }
    for (uint64_t i = 0; i < v->arr.n; i++) {
        if (v->arr.type == GGUF_TYPE_STRING) {
            const struct gguf_str *s = (const struct gguf_str *)v->arr.data + i;
            h = fuzz_bytes(h, s->data, s->n);
        } else if (v->arr.type == GGUF_TYPE_ARRAY) {
            h = fuzz_value(h, (const struct gguf_value *)v->arr.data + i);
        } else {
            double d = gguf_arr_f64(v, i);
            memcpy(&bits, &d, sizeof bits);
            h = fuzz_mix(fuzz_mix(h, bits), (uint64_t)gguf_arr_i64(v, i));
        }
    }
    return h;
}

/* Every typed getter on one key; the one matching its type must succeed. */
static uint64_t fuzz_getters(uint64_t h, const gguf_file *f, const char *key) {
    uint32_t u32 = 0;
    int64_t i64 = 0;
    float f32 = 0;
    bool b = false;
    struct gguf_str s = {0, NULL};
    const struct gguf_value *arr = NULL;
    const struct gguf_value *v = gguf_get(f, key);
    if (!v) abort(); /* keys are unique and NUL-free here: lookup must find it */
    if (gguf_get_u32_or(f, key, 1, &u32) == OPTIML_OK) h = fuzz_mix(h, u32);
    if (gguf_get_i64(f, key, &i64) == OPTIML_OK) h = fuzz_mix(h, (uint64_t)i64);
    if (gguf_get_f32_or(f, key, 0.5f, &f32) == OPTIML_OK) h = fuzz_mix(h, (uint64_t)(f32 == f32));
    if (gguf_get_bool_or(f, key, false, &b) == OPTIML_OK) h = fuzz_mix(h, b);
    if (gguf_get_str(f, key, &s) == OPTIML_OK) h = fuzz_bytes(h, s.data, s.n);
    if ((gguf_get_arr(f, key, GGUF_TYPE_COUNT, &arr) == OPTIML_OK) != (v->type == GGUF_TYPE_ARRAY))
        abort();
    if (v->type == GGUF_TYPE_BOOL && gguf_get_bool(f, key, &b) != OPTIML_OK) abort();
    if (v->type == GGUF_TYPE_STRING && gguf_get_str(f, key, &s) != OPTIML_OK) abort();
    return h;
}

static uint64_t fuzz_walk(const gguf_file *f) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (uint64_t i = 0; i < f->n_kv; i++) {
        const struct gguf_kv *kv = &f->kv[i];
        h = fuzz_value(fuzz_bytes(h, kv->key.data, kv->key.n), &kv->value);
        char *key = gguf_str_dup(kv->key);
        if (key && strlen(key) == kv->key.n) h = fuzz_getters(h, f, key);
        free(key);
    }
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const struct gguf_tensor_info *t = &f->tensors[i];
        const uint8_t *p = t->data;
        if (p < f->base || t->size > f->size || p + t->size > f->base + f->size) abort();
        h = fuzz_bytes(h, p, t->size);
        char *name = gguf_str_dup(t->name);
        if (name && strlen(name) == t->name.n && !gguf_find_tensor(f, name)) abort();
        free(name);
    }
    return h;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    gguf_file *f = NULL;
    optiml_log_set(fuzz_quiet_log, NULL, OPTIML_LOG_LEVEL_ERROR);
    optiml_status st = gguf_parse(data, size, FUZZ_NAME, &f);
    if (st != OPTIML_OK) {
        if (f || !strstr(optiml_last_error(), FUZZ_NAME)) abort();
        return 0;
    }
    fuzz_gguf_sink = fuzz_walk(f);
    gguf_close(f);
    return 0;
}
