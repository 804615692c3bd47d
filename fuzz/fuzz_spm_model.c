/*
 * fuzz_spm_model.c - libFuzzer target for the SentencePiece ModelProto
 * reader of optiml-convert (spm_model_parse in tools/convert_spm.c). When
 * the input
 * parses, every piece must lie inside the input, its type must be 1..6 and
 * its score a number; every byte of every piece is read so the sanitizers
 * see any out-of-bounds pointer. A failure must name the input and return
 * no model. fuzz/replay.c runs it over a corpus without libFuzzer.
 */
#include "convert.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_NAME "fuzz-input"

volatile uint64_t fuzz_spm_sink; /* keeps the reads from being optimized away */

static void fuzz_quiet_log(optiml_log_level level, const char *msg, void *user) {}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    struct spm_model *m = NULL;
    optiml_log_set(fuzz_quiet_log, NULL, OPTIML_LOG_LEVEL_ERROR);
    optiml_status st = spm_model_parse(data, size, FUZZ_NAME, &m);
    if (st != OPTIML_OK) {
        if (m || !strstr(optiml_last_error(), FUZZ_NAME)) abort();
        return 0;
    }
    uint64_t h = 0xcbf29ce484222325ull;
    if (m->n_pieces == 0) abort();
    for (uint32_t i = 0; i < m->n_pieces; i++) {
        const struct spm_piece *p = &m->pieces[i];
        const uint8_t *s = (const uint8_t *)p->piece;
        if (s < data || s > data + size || p->len > (size_t)(data + size - s)) abort();
        if (p->type < CONVERT_TOKEN_NORMAL || p->type > CONVERT_TOKEN_BYTE) abort();
        if (p->score != p->score) abort();
        for (uint32_t k = 0; k < p->len; k++) h = (h ^ s[k]) * 0x100000001b3ull;
    }
    fuzz_spm_sink = h ^ (uint64_t)m->bos_id ^ (uint64_t)m->add_dummy_prefix;
    spm_model_free(m);
    return 0;
}
