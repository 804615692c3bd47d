/*
 * server_params.c - optiml-server's request parser: turns an untrusted JSON
 * body into srv_params for /completion, /v1/completions,
 * /v1/chat/completions, /tokenize and /detokenize, checking every known
 * field's type and range and naming the field in the error. Unknown fields
 * are ignored (OpenAI clients send many). Also the UTF-8 helpers the
 * handlers use before text goes into JSON. Fuzzed by
 * fuzz/fuzz_server_request.c.
 */
#define _POSIX_C_SOURCE 200809L
#include "server.h"

#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- errors -------------------------------------------------------------- */

bool srv_error_set(srv_error *err, int status, const char *param, const char *fmt, ...) {
    err->status = status;
    err->type = status == 401   ? "authentication_error"
                : status == 404 ? "not_found_error"
                : status == 501 ? "not_supported_error"
                : status == 503 ? "unavailable_error"
                : status >= 500 ? "server_error"
                                : "invalid_request_error";
    snprintf(err->param, sizeof(err->param), "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
    return false;
}

/* ---- UTF-8 ----------------------------------------------------------------- */

/* Length of the valid UTF-8 sequence at s[0..n), 0 if invalid or cut off. */
static size_t utf8_valid_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t len;
    unsigned min;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF)
        len = 2, min = 0x80;
    else if (c >= 0xE0 && c <= 0xEF)
        len = 3, min = 0x800;
    else if (c >= 0xF0 && c <= 0xF4)
        len = 4, min = 0x10000;
    else
        return 0;
    if (n < len) return 0;
    unsigned cp = c & (0x7F >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return len;
}

char *srv_utf8_sanitize(const char *s, size_t n, size_t *out_len) {
    char *out = malloc(n * 3 + 1); /* each bad byte becomes 3 bytes */
    if (!out) return NULL;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        size_t len = utf8_valid_len((const unsigned char *)s + i, n - i);
        if (len == 0) {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        } else {
            memcpy(out + o, s + i, len);
            o += len;
            i += len;
        }
    }
    out[o] = 0;
    if (out_len) *out_len = o;
    return out;
}

size_t srv_utf8_incomplete_tail(const char *s, size_t n) {
    /* look back at most 3 bytes for a lead byte whose sequence is cut off */
    for (size_t k = 1; k <= 3 && k <= n; k++) {
        unsigned char c = (unsigned char)s[n - k];
        if ((c & 0xC0) == 0x80) continue; /* continuation: keep looking */
        size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        return need > k ? k : 0;
    }
    return 0;
}

/* ---- field readers ------------------------------------------------------- */

/* Each returns false with err set when the field is present with a wrong
 * type or out of range; absent or null fields leave *out unchanged. */

static bool get_number(json_t *root, const char *key, double lo, double hi, double *out, srv_error *err) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) return true;
    if (!json_is_number(v)) return srv_error_set(err, 400, key, "'%s' must be a number", key);
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi)) return srv_error_set(err, 400, key, "'%s' must be between %g and %g", key, lo, hi);
    *out = x;
    return true;
}

static bool get_float(json_t *root, const char *key, double lo, double hi, float *out, srv_error *err) {
    double x = *out;
    if (!get_number(root, key, lo, hi, &x, err)) return false;
    *out = (float)x;
    return true;
}

static bool get_int(json_t *root, const char *key, json_int_t lo, json_int_t hi, int32_t *out, srv_error *err) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) return true;
    if (!json_is_integer(v)) return srv_error_set(err, 400, key, "'%s' must be an integer", key);
    json_int_t x = json_integer_value(v);
    if (x < lo || x > hi)
        return srv_error_set(err, 400, key, "'%s' must be between %lld and %lld", key, (long long)lo, (long long)hi);
    *out = (int32_t)x;
    return true;
}

static bool get_bool(json_t *root, const char *key, bool *out, srv_error *err) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) return true;
    if (!json_is_boolean(v)) return srv_error_set(err, 400, key, "'%s' must be true or false", key);
    *out = json_is_true(v);
    return true;
}

static char *dup_string(json_t *v) {
    size_t n = json_string_length(v);
    char *s = malloc(n + 1);
    if (s) {
        memcpy(s, json_string_value(v), n);
        s[n] = 0;
    }
    return s;
}

/* Token ids from a JSON array (every element an integer in [0, n_vocab)). */
static bool get_ids(json_t *arr, const char *key, int32_t n_vocab, optiml_token **ids, int32_t *n_ids, srv_error *err) {
    size_t n = json_array_size(arr);
    if (n > (1u << 24)) return srv_error_set(err, 400, key, "'%s' has too many tokens", key);
    *ids = malloc((n ? n : 1) * sizeof(**ids));
    if (!*ids) return srv_error_set(err, 500, NULL, "out of memory");
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(arr, i);
        json_int_t x = json_is_integer(e) ? json_integer_value(e) : -1;
        if (x < 0 || (n_vocab > 0 && x >= n_vocab) || x > INT32_MAX) {
            free(*ids);
            *ids = NULL;
            if (n_vocab > 0) return srv_error_set(err, 400, key, "'%s' must hold token ids in [0, %d)", key, n_vocab);
            return srv_error_set(err, 400, key, "'%s' must hold non-negative token ids", key);
        }
        (*ids)[i] = (optiml_token)x;
    }
    *n_ids = (int32_t)n;
    return true;
}

/* "prompt": a string, an array of token ids, or (OpenAI) an array holding
 * one string. */
static bool get_prompt(json_t *root, int32_t n_vocab, srv_params *p, srv_error *err) {
    json_t *v = json_object_get(root, "prompt");
    if (!v || json_is_null(v)) return srv_error_set(err, 400, "prompt", "'prompt' is required");
    if (json_is_array(v) && json_array_size(v) == 1 && json_is_string(json_array_get(v, 0))) v = json_array_get(v, 0);
    if (json_is_string(v)) {
        if (memchr(json_string_value(v), 0, json_string_length(v)))
            return srv_error_set(err, 400, "prompt", "'prompt' holds a NUL character");
        p->prompt = dup_string(v);
        return p->prompt ? true : srv_error_set(err, 500, NULL, "out of memory");
    }
    if (json_is_array(v)) return get_ids(v, "prompt", n_vocab, &p->prompt_ids, &p->n_prompt_ids, err);
    return srv_error_set(err, 400, "prompt", "'prompt' must be a string or an array of token ids");
}

/* "stop": a string or an array of strings (llama.cpp: array only). */
static bool get_stop(json_t *root, srv_params *p, srv_error *err) {
    json_t *v = json_object_get(root, "stop");
    if (!v || json_is_null(v)) return true;
    if (!json_is_string(v) && !json_is_array(v))
        return srv_error_set(err, 400, "stop", "'stop' must be a string or an array of strings");
    size_t n = json_is_string(v) ? 1 : json_array_size(v);
    if (n > SRV_STOP_MAX) return srv_error_set(err, 400, "stop", "'stop' holds more than %d strings", SRV_STOP_MAX);
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_is_string(v) ? v : json_array_get(v, i);
        if (!json_is_string(e)) return srv_error_set(err, 400, "stop", "'stop' must hold strings only");
        size_t len = json_string_length(e);
        if (len == 0) continue;
        if (len > SRV_STOP_LEN_MAX || memchr(json_string_value(e), 0, len))
            return srv_error_set(err, 400, "stop", "a stop string is longer than %d bytes or holds NUL",
                                 SRV_STOP_LEN_MAX);
        if (!(p->stop[p->n_stop] = dup_string(e))) return srv_error_set(err, 500, NULL, "out of memory");
        p->n_stop++;
    }
    return true;
}

/* "messages": [{"role": str, "content": str | [{"type":"text","text":str}]}] */
static bool get_messages(json_t *root, srv_params *p, srv_error *err) {
    json_t *v = json_object_get(root, "messages");
    if (!json_is_array(v) || json_array_size(v) == 0)
        return srv_error_set(err, 400, "messages", "'messages' must be a non-empty array");
    size_t n = json_array_size(v);
    if (n > 100000) return srv_error_set(err, 400, "messages", "'messages' has too many entries");
    p->msgs = calloc(n, sizeof(*p->msgs));
    if (!p->msgs) return srv_error_set(err, 500, NULL, "out of memory");
    p->n_msgs = n;
    for (size_t i = 0; i < n; i++) {
        json_t *m = json_array_get(v, i);
        json_t *role = json_object_get(m, "role"), *content = json_object_get(m, "content");
        if (!json_is_object(m) || !json_is_string(role))
            return srv_error_set(err, 400, "messages", "messages[%zu].role must be a string", i);
        if (!(p->msgs[i].role = dup_string(role))) return srv_error_set(err, 500, NULL, "out of memory");
        if (!content || json_is_null(content)) {
            p->msgs[i].content = strdup("");
        } else if (json_is_string(content)) {
            p->msgs[i].content = dup_string(content);
        } else if (json_is_array(content)) {
            /* content parts: concatenate the text parts */
            size_t total = 0;
            for (size_t k = 0; k < json_array_size(content); k++) {
                json_t *part = json_array_get(content, k), *text = json_object_get(part, "text");
                json_t *type = json_object_get(part, "type");
                if (!json_is_string(type) || strcmp(json_string_value(type), "text") != 0 || !json_is_string(text))
                    return srv_error_set(err, 400, "messages",
                                         "messages[%zu].content[%zu]: only {\"type\":\"text\",\"text\":...} "
                                         "parts are supported",
                                         i, k);
                total += json_string_length(text);
            }
            char *s = malloc(total + 1);
            if (!s) return srv_error_set(err, 500, NULL, "out of memory");
            size_t o = 0;
            for (size_t k = 0; k < json_array_size(content); k++) {
                json_t *text = json_object_get(json_array_get(content, k), "text");
                memcpy(s + o, json_string_value(text), json_string_length(text));
                o += json_string_length(text);
            }
            s[o] = 0;
            p->msgs[i].content = s;
        } else {
            return srv_error_set(err, 400, "messages", "messages[%zu].content must be a string or an array", i);
        }
        if (!p->msgs[i].content) return srv_error_set(err, 500, NULL, "out of memory");
        if (memchr(json_string_value(role), 0, json_string_length(role)) ||
            (json_is_string(content) && memchr(json_string_value(content), 0, json_string_length(content))))
            return srv_error_set(err, 400, "messages", "messages[%zu] holds a NUL character", i);
    }
    return true;
}

/* ---- per-endpoint parsing ------------------------------------------------- */

/* Sampling and generation fields shared by the three generation endpoints. */
static bool get_generation(json_t *root, srv_api api, srv_params *p, srv_error *err) {
    optiml_sampler_params *sp = &p->sp;
    double seed = -1;
    bool ok =
        get_float(root, "temperature", 0, 100, &sp->temp, err) && get_float(root, "top_p", 0, 1, &sp->top_p, err) &&
        get_int(root, "top_k", 0, INT32_MAX, &sp->top_k, err) && get_float(root, "min_p", 0, 1, &sp->min_p, err) &&
        get_float(root, "repeat_penalty", 0, 100, &sp->repeat_penalty, err) &&
        get_int(root, "repeat_last_n", 0, 1 << 20, &sp->repeat_last_n, err) &&
        get_number(root, "seed", -1, 1.8e19, &seed, err) && get_stop(root, p, err) &&
        get_bool(root, "stream", &p->stream, err) && get_bool(root, "cache_prompt", &p->cache_prompt, err) &&
        get_bool(root, "ignore_eos", &p->ignore_eos, err);
    if (!ok) return false;
    if (seed >= 0) {
        if (seed != floor(seed)) return srv_error_set(err, 400, "seed", "'seed' must be an integer");
        sp->seed = (uint64_t)seed;
        p->seed_set = true;
    }
    if (api == SRV_API_COMPLETION) {
        return get_int(root, "n_predict", -1, INT32_MAX, &p->n_predict, err) &&
               get_int(root, "n_probs", 0, SRV_N_PROBS_MAX, &p->n_probs, err) &&
               get_bool(root, "return_tokens", &p->return_tokens, err);
    }
    /* OpenAI */
    int32_t n = 1;
    if (!get_int(root, "max_tokens", 0, INT32_MAX, &p->n_predict, err) ||
        !get_int(root, "max_completion_tokens", 0, INT32_MAX, &p->n_predict, err) || !get_int(root, "n", 1, 1, &n, err))
        return false;
    json_t *so = json_object_get(root, "stream_options");
    if (so && !json_is_null(so)) {
        if (!json_is_object(so)) return srv_error_set(err, 400, "stream_options", "'stream_options' must be an object");
        if (!get_bool(so, "include_usage", &p->include_usage, err)) return false;
    }
    json_t *rf = json_object_get(root, "response_format");
    if (rf && !json_is_null(rf)) {
        json_t *type = json_object_get(rf, "type");
        if (!json_is_object(rf) || !json_is_string(type))
            return srv_error_set(err, 400, "response_format", "'response_format' must be {\"type\": ...}");
        if (strcmp(json_string_value(type), "text") != 0)
            return srv_error_set(err, 400, "response_format",
                                 "response_format type '%s' is not supported yet (only \"text\")",
                                 json_string_value(type));
    }
    json_t *tools = json_object_get(root, "tools");
    if (tools && !json_is_null(tools) && json_array_size(tools) > 0)
        return srv_error_set(err, 400, "tools", "'tools' (function calling) is not supported yet");
    if (api == SRV_API_OAI_COMPLETION) {
        json_t *lp = json_object_get(root, "logprobs");
        if (lp && !json_is_null(lp) && !(json_is_integer(lp) && json_integer_value(lp) == 0))
            return srv_error_set(err, 400, "logprobs", "'logprobs' is not supported yet");
        json_t *echo = json_object_get(root, "echo");
        if (json_is_true(echo)) return srv_error_set(err, 400, "echo", "'echo' is not supported yet");
    } else {
        json_t *lp = json_object_get(root, "logprobs");
        if (json_is_true(lp)) return srv_error_set(err, 400, "logprobs", "'logprobs' is not supported yet");
    }
    return true;
}

bool srv_params_parse(srv_api api, const char *body, size_t len, int32_t n_vocab, srv_params *out, srv_error *err) {
    memset(out, 0, sizeof(*out));
    out->api = api;
    out->n_predict = -1;
    out->sp = optiml_sampler_default_params();
    out->cache_prompt = true;
    out->add_special = false;

    json_error_t jerr;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return srv_error_set(err, 400, NULL, "invalid JSON at line %d column %d: %s", jerr.line, jerr.column,
                             jerr.text);
    bool ok = false;
    if (!json_is_object(root)) {
        srv_error_set(err, 400, NULL, "the request body must be a JSON object");
        goto done;
    }
    switch (api) {
    case SRV_API_COMPLETION:
    case SRV_API_OAI_COMPLETION:
        ok = get_prompt(root, n_vocab, out, err) && get_generation(root, api, out, err);
        break;
    case SRV_API_OAI_CHAT:
        ok = get_messages(root, out, err) && get_generation(root, api, out, err);
        break;
    case SRV_API_TOKENIZE: {
        json_t *c = json_object_get(root, "content");
        if (!json_is_string(c)) {
            srv_error_set(err, 400, "content", "'content' must be a string");
            break;
        }
        if (!(out->prompt = dup_string(c))) {
            srv_error_set(err, 500, NULL, "out of memory");
            break;
        }
        ok = get_bool(root, "add_special", &out->add_special, err) &&
             get_bool(root, "with_pieces", &out->with_pieces, err);
        break;
    }
    case SRV_API_DETOKENIZE: {
        json_t *t = json_object_get(root, "tokens");
        if (!json_is_array(t)) {
            srv_error_set(err, 400, "tokens", "'tokens' must be an array of token ids");
            break;
        }
        ok = get_ids(t, "tokens", n_vocab, &out->prompt_ids, &out->n_prompt_ids, err);
        break;
    }
    }
    if (ok && out->prompt && strlen(out->prompt) > (size_t)INT32_MAX / 4)
        ok = srv_error_set(err, 400, "prompt", "the prompt is too long");
done:
    json_decref(root);
    if (!ok) srv_params_free(out);
    return ok;
}

void srv_params_free(srv_params *p) {
    free(p->prompt);
    free(p->prompt_ids);
    for (size_t i = 0; i < p->n_msgs; i++) {
        free((char *)p->msgs[i].role);
        free((char *)p->msgs[i].content);
    }
    free(p->msgs);
    for (int i = 0; i < p->n_stop; i++) free(p->stop[i]);
    srv_api api = p->api;
    memset(p, 0, sizeof(*p));
    p->api = api;
}
