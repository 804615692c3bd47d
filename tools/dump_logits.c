/*
 * optiml-dump-logits - evaluate token ids and write the logits of every
 * position as raw little-endian float32 (n_tokens x n_vocab), for tests that
 * compare OptiML against a reference implementation.
 *
 *   optiml-dump-logits -m MODEL -o OUT.f32 [--batch | --one-by-one | --chunk N] [-t N] [--no-repack] ID ID ...
 *
 * --batch (default) evaluates all ids in one decode call (the prompt path);
 * --one-by-one decodes them one at a time (the generation path); --chunk N
 * in decode calls of N ids (the last one may be shorter). --no-repack
 * multiplies q4_0/q4_k weights from the file's rows (optiml_model_params.repack).
 */
#include "optiml.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    const char *model_path = NULL, *out_path = NULL;
    int32_t chunk = 0; /* 0: all ids at once */
    int n_threads = 0;
    optiml_model_params mp = optiml_model_default_params();
    int first_id = argc;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc) model_path = argv[++i];
        else if (!strcmp(argv[i], "-o") && i + 1 < argc) out_path = argv[++i];
        else if (!strcmp(argv[i], "-t") && i + 1 < argc) n_threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--batch")) chunk = 0;
        else if (!strcmp(argv[i], "--one-by-one")) chunk = 1;
        else if (!strcmp(argv[i], "--no-repack")) mp.repack = false;
        else if (!strcmp(argv[i], "--chunk") && i + 1 < argc && atoi(argv[i + 1]) > 0) chunk = atoi(argv[++i]);
        else if (argv[i][0] == '-' && argv[i][1] != '\0' && (argv[i][1] < '0' || argv[i][1] > '9')) {
            fprintf(stderr, "optiml-dump-logits: unknown option '%s'\n", argv[i]);
            return 1;
        } else {
            first_id = i;
            break;
        }
    }
    int32_t n = argc - first_id;
    if (!model_path || !out_path || n <= 0) {
        fprintf(stderr,
                "usage: optiml-dump-logits -m MODEL -o OUT.f32 [--batch|--one-by-one|--chunk N] [-t N] [--no-repack] "
                "ID ...\n");
        return 1;
    }
    optiml_model *model = NULL;
    optiml_context *ctx = NULL;
    optiml_batch batch = optiml_batch_init(n);
    FILE *out = NULL;
    int rc = 1;
    if (optiml_model_load(model_path, &mp, &model) != OPTIML_OK) goto fail;
    optiml_context_params cp = optiml_context_default_params();
    cp.n_ctx = (uint32_t)n;
    cp.n_batch = (uint32_t)n;
    cp.n_threads = n_threads;
    if (optiml_context_init(model, &cp, &ctx) != OPTIML_OK) goto fail;
    out = fopen(out_path, "wb");
    if (!out) {
        fprintf(stderr, "optiml-dump-logits: cannot write %s\n", out_path);
        goto done;
    }
    const int32_t n_vocab = optiml_model_n_vocab(model);
    for (int32_t i = 0; i < n; i += batch.n_tokens) {
        const int32_t step = chunk == 0 || chunk > n - i ? n - i : chunk;
        batch.n_tokens = step;
        for (int32_t j = 0; j < step; j++) {
            batch.token[j] = atoi(argv[first_id + i + j]);
            batch.pos[j] = i + j;
            batch.seq_id[j] = 0;
            batch.logits[j] = 1;
        }
        if (optiml_decode(ctx, &batch) != OPTIML_OK) goto fail;
        for (int32_t j = 0; j < step; j++)
            if (fwrite(optiml_get_logits_ith(ctx, j), sizeof(float), (size_t)n_vocab, out) != (size_t)n_vocab) {
                fprintf(stderr, "optiml-dump-logits: write failed\n");
                goto done;
            }
    }
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "optiml-dump-logits: %s\n", optiml_last_error());
done:
    if (out && fclose(out) != 0) rc = 1;
    optiml_context_free(ctx);
    optiml_model_free(model);
    optiml_batch_free(batch);
    return rc;
}
