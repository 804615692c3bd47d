/*
 * sparse_util.c - the sample-file header, the FFN weights hash and GGUF
 * copying shared by optiml-profile and optiml-train-predictor
 * (sparse_util.h documents the formats).
 */
#define _POSIX_C_SOURCE 200809L
#include "sparse_util.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <xxhash.h>

struct samples_layout samples_layout(uint32_t n_embd, uint32_t n_ff, uint32_t flags) {
    struct samples_layout l;
    l.off_x = 8;
    l.off_mask = l.off_x + 4ull * n_embd;
    l.mask_bytes = (n_ff + 7ull) / 8;
    l.off_mag = l.off_mask + l.mask_bytes;
    uint64_t end = l.off_mag + (flags & SAMPLES_HAS_MAG ? 2ull * n_ff : 0);
    l.record_bytes = (end + 7) / 8 * 8;
    return l;
}

static void put_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); } /* little-endian hosts only */
static void put_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static uint32_t get_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

void samples_header_encode(const struct samples_header *h, uint8_t out[SAMPLES_HEADER_BYTES]) {
    memset(out, 0, SAMPLES_HEADER_BYTES);
    memcpy(out, SAMPLES_MAGIC, 4);
    put_u32(out + 4, h->version);
    put_u32(out + 8, h->n_layer);
    put_u32(out + 12, h->n_embd);
    put_u32(out + 16, h->n_ff);
    put_u32(out + 20, h->flags);
    put_u64(out + 24, h->n_samples);
    put_u64(out + 32, h->record_bytes);
    put_u64(out + 40, h->weights_hash);
    memcpy(out + 48, &h->act_threshold, 4);
    memcpy(out + 52, &h->sample_rate, 4);
    put_u64(out + 56, h->n_tokens);
}

optiml_status samples_header_decode(const uint8_t in[SAMPLES_HEADER_BYTES], const char *name,
                                    struct samples_header *h) {
    if (memcmp(in, SAMPLES_MAGIC, 4) != 0)
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: not a sample file (magic is not \"%s\")", name, SAMPLES_MAGIC);
    h->version = get_u32(in + 4);
    h->n_layer = get_u32(in + 8);
    h->n_embd = get_u32(in + 12);
    h->n_ff = get_u32(in + 16);
    h->flags = get_u32(in + 20);
    h->n_samples = get_u64(in + 24);
    h->record_bytes = get_u64(in + 32);
    h->weights_hash = get_u64(in + 40);
    memcpy(&h->act_threshold, in + 48, 4);
    memcpy(&h->sample_rate, in + 52, 4);
    h->n_tokens = get_u64(in + 56);
    if (h->version != SAMPLES_VERSION)
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "%s: sample file version %u (this build reads %u)", name,
                           h->version, SAMPLES_VERSION);
    if (!h->n_layer || !h->n_embd || !h->n_ff || h->n_layer > 4096 || h->n_embd > (1u << 20) ||
        h->n_ff > (1u << 22) || (h->flags & ~SAMPLES_HAS_MAG))
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: implausible header (n_layer %u, n_embd %u, n_ff %u, flags %u)",
                           name, h->n_layer, h->n_embd, h->n_ff, h->flags);
    if (samples_layout(h->n_embd, h->n_ff, h->flags).record_bytes != h->record_bytes)
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: record_bytes %" PRIu64 " does not match the shape", name,
                           h->record_bytes);
    return OPTIML_OK;
}

optiml_status sparse_weights_hash(const gguf_file *f, uint32_t n_layer, uint64_t *out) {
    static const char *const roles[] = {"ffn_gate", "ffn_up", "ffn_down"};
    XXH64_state_t *st = XXH64_createState();
    if (!st) return optiml_fail(OPTIML_ERR_NOMEM, "weights hash: out of memory");
    XXH64_reset(st, 0);
    for (uint32_t il = 0; il < n_layer; il++)
        for (int r = 0; r < 3; r++) {
            char name[64];
            snprintf(name, sizeof(name), "blk.%u.%s.weight", il, roles[r]);
            const struct gguf_tensor_info *t = gguf_find_tensor(f, name);
            if (!t && r == 0) continue; /* relu_nogate models have no gate */
            if (!t) {
                XXH64_freeState(st);
                return optiml_fail(OPTIML_ERR_FORMAT, "weights hash: tensor %s is missing", name);
            }
            XXH64_update(st, t->data, (size_t)t->size);
        }
    *out = XXH64_digest(st);
    XXH64_freeState(st);
    return OPTIML_OK;
}

void sparse_hash_hex(uint64_t hash, char out[17]) { snprintf(out, 17, "%016" PRIx64, hash); }

uint32_t gguf_n_layer(const gguf_file *f) {
    struct gguf_str arch;
    uint32_t n = 0;
    char key[96];
    if (gguf_get_str(f, "general.architecture", &arch) == OPTIML_OK && arch.n < 64) {
        snprintf(key, sizeof(key), "%.*s.block_count", (int)arch.n, arch.data);
        if (gguf_get_u32_or(f, key, 0, &n) != OPTIML_OK) n = 0;
    }
    return n;
}

optiml_status gguf_writer_copy_of(const gguf_file *in, bool (*skip)(const char *name), gguf_writer **out) {
    gguf_writer *w = gguf_writer_init();
    if (!w) return optiml_fail(OPTIML_ERR_NOMEM, "gguf copy: out of memory");
    optiml_status st = OPTIML_OK;
    for (uint64_t i = 0; i < in->n_kv && st == OPTIML_OK; i++) {
        char *key = gguf_str_dup(in->kv[i].key);
        st = key ? gguf_writer_set_value(w, key, &in->kv[i].value)
                 : optiml_fail(OPTIML_ERR_NOMEM, "gguf copy: out of memory");
        free(key);
    }
    for (uint64_t i = 0; i < in->n_tensors && st == OPTIML_OK; i++) {
        const struct gguf_tensor_info *t = &in->tensors[i];
        char *name = gguf_str_dup(t->name);
        if (!name) st = optiml_fail(OPTIML_ERR_NOMEM, "gguf copy: out of memory");
        else if (!skip || !skip(name)) st = gguf_writer_add_tensor(w, name, t->type, t->n_dims, t->ne, t->data);
        free(name);
    }
    if (st != OPTIML_OK) {
        gguf_writer_free(w);
        return st;
    }
    *out = w;
    return OPTIML_OK;
}

double util_seconds(void) {
    static struct timespec t0;
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    if (t0.tv_sec == 0 && t0.tv_nsec == 0) t0 = t;
    return (double)(t.tv_sec - t0.tv_sec) + 1e-9 * (double)(t.tv_nsec - t0.tv_nsec);
}
