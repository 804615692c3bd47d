/*
 * fuzz_server_request.c - libFuzzer target for optiml-server's request
 * parser (tools/server/server_params.c): the first input byte picks the
 * endpoint (/completion, /v1/completions, /v1/chat/completions, /tokenize,
 * /detokenize), the rest is the JSON body, fed to srv_params_parse exactly
 * as the HTTP handlers do. Accepted requests must be self-consistent (one
 * prompt form, bounded stop strings, token ids below n_vocab); rejected
 * ones must carry a 4xx/5xx status and a message. The bytes also go through
 * the UTF-8 sanitizer, whose output jansson must accept.
 */
#include "server.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FUZZ_N_VOCAB 1000

static void fuzz_check(bool ok, const char *what) {
    if (ok) return;
    fprintf(stderr, "fuzz_server_request: %s\n", what);
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    srv_api api = (srv_api)(data[0] % 5);
    const char *body = (const char *)data + 1;
    size_t len = size - 1;

    srv_params p;
    srv_error err;
    memset(&err, 0, sizeof(err));
    if (srv_params_parse(api, body, len, FUZZ_N_VOCAB, &p, &err)) {
        int forms = (p.prompt != NULL) + (p.prompt_ids != NULL) + (p.msgs != NULL);
        if (api == SRV_API_DETOKENIZE)
            fuzz_check(p.prompt_ids && forms == 1, "detokenize without ids");
        else
            fuzz_check(forms == 1, "not exactly one prompt form");
        for (int32_t i = 0; p.prompt_ids && i < p.n_prompt_ids; i++)
            fuzz_check(p.prompt_ids[i] >= 0 && p.prompt_ids[i] < FUZZ_N_VOCAB, "token id out of range");
        fuzz_check(p.n_stop >= 0 && p.n_stop <= SRV_STOP_MAX, "too many stop strings");
        for (int i = 0; i < p.n_stop; i++)
            fuzz_check(p.stop[i] && strlen(p.stop[i]) > 0 && strlen(p.stop[i]) <= SRV_STOP_LEN_MAX, "bad stop");
        fuzz_check(p.n_probs >= 0 && p.n_probs <= SRV_N_PROBS_MAX, "n_probs out of range");
        fuzz_check(p.n_predict >= -1, "n_predict below -1");
        fuzz_check(p.sp.temp >= 0 && p.sp.top_p >= 0 && p.sp.top_p <= 1 && p.sp.top_k >= 0, "bad sampling");
        for (size_t i = 0; i < p.n_msgs; i++) fuzz_check(p.msgs[i].role && p.msgs[i].content, "message NULL");
        srv_params_free(&p);
    } else {
        fuzz_check(err.status >= 400 && err.status < 600 && err.message[0] && err.type, "error without reason");
    }

    size_t out_len = 0;
    char *clean = srv_utf8_sanitize((const char *)data, size, &out_len);
    fuzz_check(clean != NULL, "sanitize failed");
    json_t *s = json_stringn(clean, out_len);
    fuzz_check(s != NULL, "sanitized text is not valid UTF-8");
    json_decref(s);
    free(clean);
    fuzz_check(srv_utf8_incomplete_tail((const char *)data, size) <= 3, "tail longer than 3");
    return 0;
}
