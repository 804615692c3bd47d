/*
 * powerinfer.h - loading PowerInfer's GGUF files as they are (magic "PWRI",
 * docs/FORMAT.md "PowerInfer files").
 *
 * Such a file is a llama (or bamboo) GGUF whose FFN down matrix is stored
 * only neuron-major (blk.N.ffn_down_t), with predictors blk.N.fc1/fc2 and
 * one threshold, powerinfer.sparse_threshold. PowerInfer's predictor reads
 * the residual stream before the FFN's RMSNorm and marks neuron i active
 * iff its score >= the threshold; OptiML's reads the normed input and tests
 * logit > threshold. Since x_raw = s * (x_normed / w) per token (s the RMS
 * of x_raw, a positive scalar; w the ffn_norm weight) and relu(a s) =
 * s relu(a), PowerInfer's score is s times that of fc1' = fc1 / w (per
 * input column): the same sign, so with threshold 0 (PowerInfer's default,
 * and every file it ships) the active sets agree exactly. A non-zero
 * threshold cannot be carried over exactly (it would scale with s per
 * token); it is kept as it is, with a warning.
 *
 * model.c calls these for files whose gguf_file.powerinfer is set.
 */
#ifndef OPTIML_POWERINFER_H
#define OPTIML_POWERINFER_H

#include "common.h"

struct optiml_model;
struct powerinfer_mem;

/* After the hyperparameters: PowerInfer runs "llama" files with
 * relu(gate) * up and "bamboo" files with relu(gate) * relu(up); that is
 * the activation unless optiml.ffn_activation says otherwise. */
optiml_status powerinfer_hparams(struct optiml_model *m);

/* After the weights and optiml.sparse.* keys: builds ffn_down (row-major,
 * for the dense FFN) where the file has only ffn_down_t, folds 1 / ffn_norm
 * into each fc1, and sets the layer thresholds from
 * powerinfer.sparse_threshold t (unless optiml.sparse.layer_threshold is
 * present) to the largest float below t, so that logit > it iff logit >= t.
 * The buffers it builds are owned by m->powerinfer. */
optiml_status powerinfer_finish(struct optiml_model *m);

void powerinfer_free(struct powerinfer_mem *mem); /* NULL is a no-op */

#endif /* OPTIML_POWERINFER_H */
