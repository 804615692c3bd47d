/*
 * sparse_util.h - what optiml-profile and optiml-train-predictor share: the
 * predictor-sample file (written by `optiml-profile --dump-samples`, read by
 * the trainer), the hash that ties sparse statistics to a model's FFN
 * weights, and copying a GGUF file with tensors and keys added.
 *
 * Sample file (all little-endian; docs/FORMAT.md, "Predictor samples"):
 *
 *   header, 64 bytes:
 *     0  char[4] magic "OMSP"
 *     4  u32 version (1)
 *     8  u32 n_layer
 *    12  u32 n_embd
 *    16  u32 n_ff
 *    20  u32 flags: bit 0 = records carry |h| as f16 (SAMPLES_HAS_MAG)
 *    24  u64 n_samples: sampled tokens (each has one record per layer)
 *    32  u64 record_bytes: size of one record (below)
 *    40  u64 weights_hash: XXH64 of the model's FFN weights (as the key
 *        optiml.sparse.weights_hash, but as a number)
 *    48  f32 act_threshold: the FATReLU cut the forward pass applied to
 *        the gate (optiml.sparse.act_threshold; 0: plain ReLU)
 *    52  f32 sample_rate: the --sample-rate that chose the tokens
 *    56  u64 n_tokens: tokens the profiler evaluated (sampled or not)
 *   then n_layer * n_samples records, layer-major (all samples of layer 0,
 *   then layer 1, ...), so record s of layer l starts at byte
 *   64 + (l * n_samples + s) * record_bytes. A record:
 *     u64 token: index of the token among all evaluated tokens (0-based,
 *         over the windows in order, BOS positions included)
 *     f32 x[n_embd]: the FFN's normed input (what the predictor sees)
 *     u8  mask[(n_ff + 7) / 8]: neuron j active (h_j != 0) iff bit
 *         (j % 8) of byte j / 8 is set
 *     f16 mag[n_ff]: |h_j| (clamped to 65504), only with SAMPLES_HAS_MAG
 *     zero bytes up to record_bytes (a multiple of 8)
 *   where h = act(x Wgate) * (x Wup), the input of Wdown.
 */
#ifndef OPTIML_TOOLS_SPARSE_UTIL_H
#define OPTIML_TOOLS_SPARSE_UTIL_H

#include "gguf.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#define SAMPLES_MAGIC "OMSP"
#define SAMPLES_VERSION 1u
#define SAMPLES_HEADER_BYTES 64u
#define SAMPLES_HAS_MAG 1u

struct samples_header {
    uint32_t version, n_layer, n_embd, n_ff, flags;
    uint64_t n_samples, record_bytes, weights_hash, n_tokens;
    float act_threshold, sample_rate;
};

/* Byte offsets inside a record and its size, from the shape and flags. */
struct samples_layout {
    uint64_t off_x, off_mask, off_mag, mask_bytes, record_bytes;
};
struct samples_layout samples_layout(uint32_t n_embd, uint32_t n_ff, uint32_t flags);

/* Serialize / parse the 64-byte header. Parsing checks magic, version and
 * that record_bytes matches the shape (message in optiml_last_error). */
void samples_header_encode(const struct samples_header *h, uint8_t out[SAMPLES_HEADER_BYTES]);
optiml_status samples_header_decode(const uint8_t in[SAMPLES_HEADER_BYTES], const char *name,
                                    struct samples_header *h);

/* XXH64 (seed 0) over the bytes of every layer's ffn_gate, ffn_up and
 * ffn_down tensors in layer order (gate, up, down of layer 0, then of
 * layer 1, ...; a model without gate matrices, relu_nogate, hashes up and
 * down). OPTIML_ERR_FORMAT if ffn_up or ffn_down is missing. */
optiml_status sparse_weights_hash(const gguf_file *f, uint32_t n_layer, uint64_t *out);
/* "%016llx" of the hash: the value of optiml.sparse.weights_hash. */
void sparse_hash_hex(uint64_t hash, char out[17]);

/* n_layer from "<general.architecture>.block_count" (0 if absent). */
uint32_t gguf_n_layer(const gguf_file *f);

/* Start a writer holding every key of in and every tensor of in whose name
 * skip(name) does not reject (skip may be NULL), data pointing into in's
 * mapping: a copy of in to which the caller adds. */
optiml_status gguf_writer_copy_of(const gguf_file *in, bool (*skip)(const char *name), gguf_writer **out);

/* The seconds since the first call: progress and ETA lines. */
double util_seconds(void);

#endif /* OPTIML_TOOLS_SPARSE_UTIL_H */
