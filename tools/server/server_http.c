/*
 * server_http.c - optiml-server's HTTP front end on libmicrohttpd: reads
 * request bodies (with a size limit), checks the API key, routes to the
 * endpoints (llama.cpp's /completion, /tokenize, /detokenize, /health,
 * /props, /metrics; OpenAI's /v1/models, /v1/completions,
 * /v1/chat/completions; the web UI at /), turns prompts into tokens,
 * submits tasks to the scheduler and writes results as JSON or as
 * server-sent events. Every error body has OpenAI's shape
 * {"error": {"message", "type", "param", "code"}}.
 *
 * libmicrohttpd runs one thread per connection, so a handler may block
 * waiting for its task; a stream's reader callback blocks for the next
 * tokens, and a client that goes away makes the next write fail, which
 * frees the response and cancels the task.
 */
#define _POSIX_C_SOURCE 200809L
#include "server_http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

extern const unsigned char srv_webui_html[];
extern const size_t srv_webui_html_len;

/* ---- responses --------------------------------------------------------------- */

static enum MHD_Result send_bytes(struct MHD_Connection *c, unsigned status, const char *type, char *data, size_t len,
                                  enum MHD_ResponseMemoryMode mode) {
    struct MHD_Response *r = MHD_create_response_from_buffer(len, data, mode);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

/* Send a JSON value and drop its reference. */
static enum MHD_Result send_json(struct MHD_Connection *c, unsigned status, json_t *v) {
    char *s = v ? json_dumps(v, JSON_COMPACT) : NULL;
    json_decref(v);
    if (!s) return MHD_NO;
    return send_bytes(c, status, "application/json; charset=utf-8", s, strlen(s), MHD_RESPMEM_MUST_FREE);
}

static json_t *error_json(const srv_error *e) {
    return json_pack("{s:{s:s%,s:s,s:s?,s:i}}", "error", "message", e->message, strlen(e->message), "type",
                     e->type ? e->type : "server_error", "param", e->param[0] ? e->param : NULL, "code", e->status);
}

static enum MHD_Result send_error(struct MHD_Connection *c, const srv_error *e) {
    json_t *v = error_json(e);
    if (!v) { /* a message that is not UTF-8: should not happen, but say something */
        srv_error plain = *e;
        snprintf(plain.message, sizeof(plain.message), "error %d", e->status);
        v = error_json(&plain);
    }
    return send_json(c, (unsigned)e->status, v);
}

static enum MHD_Result send_error_msg(struct MHD_Connection *c, int status, const char *param, const char *msg) {
    srv_error e;
    srv_error_set(&e, status, param, "%s", msg);
    return send_error(c, &e);
}

/* A JSON string from model output: invalid UTF-8 becomes U+FFFD. */
static json_t *jstr(const char *s, size_t n) {
    size_t len;
    char *clean = srv_utf8_sanitize(s, n, &len);
    if (!clean) return NULL;
    json_t *v = json_stringn_nocheck(clean, len);
    free(clean);
    return v;
}

/* The text of a token (invalid UTF-8 replaced). */
static json_t *token_str(const optiml_model *model, optiml_token id) {
    char piece[256];
    int32_t n = optiml_token_to_piece(model, id, piece, sizeof(piece), false, true);
    return jstr(piece, n > 0 ? (size_t)n : 0);
}

/* ---- prompts ------------------------------------------------------------------ */

/* Tokenize text[0..len); returns malloc'd tokens or NULL with err set. */
static optiml_token *tokenize(const optiml_model *model, const char *text, size_t len, bool add_bos, bool parse_special,
                              int32_t *n_out, srv_error *err) {
    if (len > (size_t)INT32_MAX / 4) {
        srv_error_set(err, 400, "prompt", "the prompt is too long");
        return NULL;
    }
    int32_t n_max = (int32_t)len + 2;
    optiml_token *toks = malloc((size_t)n_max * sizeof(*toks));
    int32_t n = toks ? optiml_tokenize(model, text, (int32_t)len, toks, n_max, add_bos, parse_special) : 0;
    if (toks && n < 0 && n != INT32_MIN) { /* needs more room */
        n_max = -n;
        optiml_token *p = realloc(toks, (size_t)n_max * sizeof(*toks));
        if (p) toks = p;
        n = p ? optiml_tokenize(model, text, (int32_t)len, toks, n_max, add_bos, parse_special) : INT32_MIN;
    }
    if (!toks || n < 0) {
        srv_error_set(err, toks ? 400 : 500, "prompt", "cannot tokenize the prompt: %s",
                      toks ? optiml_last_error() : "out of memory");
        free(toks);
        return NULL;
    }
    *n_out = n;
    return toks;
}

/* Render the chat messages with the chat template. */
static char *render_chat(const srv_app *app, const srv_params *p, srv_error *err) {
    int32_t cap = 4096;
    for (size_t i = 0; i < p->n_msgs; i++) cap += (int32_t)(strlen(p->msgs[i].content) + 64);
    for (int attempt = 0; attempt < 2; attempt++) {
        char *buf = malloc((size_t)cap);
        if (!buf) {
            srv_error_set(err, 500, NULL, "out of memory");
            return NULL;
        }
        int32_t n = optiml_chat_apply_template(app->model, app->chat_template, p->msgs, p->n_msgs, true, buf, cap);
        if (n == INT32_MIN) {
            srv_error_set(err, 400, "messages", "chat template: %s", optiml_last_error());
            free(buf);
            return NULL;
        }
        if (n < cap) return buf;
        free(buf);
        cap = n + 1;
    }
    srv_error_set(err, 500, "messages", "chat template: the rendered prompt keeps growing");
    return NULL;
}

/* The prompt of a generation request as tokens. */
static optiml_token *prompt_tokens(const srv_app *app, const srv_params *p, int32_t *n, srv_error *err) {
    if (p->prompt_ids) {
        optiml_token *t = malloc((size_t)(p->n_prompt_ids ? p->n_prompt_ids : 1) * sizeof(*t));
        if (!t) {
            srv_error_set(err, 500, NULL, "out of memory");
            return NULL;
        }
        memcpy(t, p->prompt_ids, (size_t)p->n_prompt_ids * sizeof(*t));
        *n = p->n_prompt_ids;
        return t;
    }
    bool add_bos = optiml_token_add_bos(app->model);
    if (p->api != SRV_API_OAI_CHAT) return tokenize(app->model, p->prompt, strlen(p->prompt), add_bos, true, n, err);
    char *text = render_chat(app, p, err);
    if (!text) return NULL;
    /* the template may already hold the BOS text: add BOS only if missing */
    optiml_token *t = tokenize(app->model, text, strlen(text), false, true, n, err);
    free(text);
    optiml_token bos = optiml_token_bos(app->model);
    if (t && add_bos && bos >= 0 && (*n == 0 || t[0] != bos)) {
        optiml_token *t2 = realloc(t, (size_t)(*n + 1) * sizeof(*t));
        if (!t2) {
            free(t);
            srv_error_set(err, 500, NULL, "out of memory");
            return NULL;
        }
        memmove(t2 + 1, t2, (size_t)*n * sizeof(*t2));
        t2[0] = bos;
        (*n)++;
        t = t2;
    }
    return t;
}

/* ---- result bodies ------------------------------------------------------------ */

/* Results read from a task under the scheduler's lock. */
typedef struct task_view {
    char *text; /* new text (malloc'd), may be NULL            */
    size_t text_len;
    srv_token_info *tokens; /* new tokens (malloc'd)                       */
    int32_t n_tokens, n_total_tokens;
    bool done;
    srv_finish finish;
    char stop_word[SRV_STOP_LEN_MAX + 1];
    char error[256];
    int32_t n_prompt, n_cached, slot_id;
    int64_t t_start_us, t_first_us, t_end_us;
} task_view;

/* Copy what is new in the task since text_from / tokens_from. */
static void task_read(srv_sched *s, srv_task *t, size_t text_from, int32_t tokens_from, task_view *v) {
    memset(v, 0, sizeof(*v));
    srv_sched_lock(s);
    if (t->text_len > text_from && (v->text = malloc(t->text_len - text_from)) != NULL) {
        v->text_len = t->text_len - text_from;
        memcpy(v->text, t->text + text_from, v->text_len);
    }
    if (t->n_tokens > tokens_from && (v->tokens = malloc((size_t)(t->n_tokens - tokens_from) * sizeof(*v->tokens)))) {
        v->n_tokens = t->n_tokens - tokens_from;
        memcpy(v->tokens, t->tokens + tokens_from, (size_t)v->n_tokens * sizeof(*v->tokens));
    }
    v->n_total_tokens = t->n_tokens;
    v->done = t->done;
    v->finish = t->finish;
    memcpy(v->stop_word, t->stop_word, sizeof(v->stop_word));
    memcpy(v->error, t->error, sizeof(v->error));
    v->n_prompt = t->n_prompt;
    v->n_cached = t->n_cached;
    v->slot_id = t->slot_id;
    v->t_start_us = t->t_start_us;
    v->t_first_us = t->t_first_us;
    v->t_end_us = t->t_end_us;
    srv_sched_unlock(s);
}

static void task_view_free(task_view *v) {
    free(v->text);
    free(v->tokens);
}

/* The error of a task that did not end normally, else false. */
static bool task_error(const task_view *v, const srv_app *app, srv_error *err) {
    switch (v->finish) {
    case SRV_FINISH_CANCELLED:
        return !srv_error_set(err, 503, NULL, "the request was cancelled: the server is shutting down");
    case SRV_FINISH_TIMEOUT:
        return !srv_error_set(err, 504, NULL, "the request timed out after %g s (--timeout)", app->timeout_s);
    case SRV_FINISH_ERROR:
        return !srv_error_set(err, 500, NULL, "%s", v->error[0] ? v->error : "generation failed");
    default:
        return false;
    }
}

static const char *oai_finish(srv_finish f) { return f == SRV_FINISH_STOP ? "stop" : "length"; }

static json_t *usage_json(const task_view *v) {
    return json_pack("{s:i,s:i,s:i}", "prompt_tokens", v->n_prompt, "completion_tokens", v->n_total_tokens,
                     "total_tokens", v->n_prompt + v->n_total_tokens);
}

/* llama.cpp's completion_probabilities for the given tokens. */
static json_t *probs_json(const srv_app *app, const srv_token_info *toks, int32_t n) {
    json_t *arr = json_array();
    for (int32_t i = 0; i < n; i++) {
        json_t *top = json_array();
        for (int32_t k = 0; k < toks[i].n_top; k++)
            json_array_append_new(top, json_pack("{s:i,s:o,s:f}", "id", toks[i].top_id[k], "tok_str",
                                                 token_str(app->model, toks[i].top_id[k]), "prob",
                                                 (double)toks[i].top_prob[k]));
        json_array_append_new(arr,
                              json_pack("{s:i,s:o,s:f,s:o}", "id", toks[i].id, "content",
                                        token_str(app->model, toks[i].id), "prob", (double)toks[i].prob, "probs", top));
    }
    return arr;
}

static json_t *ids_json(const srv_token_info *toks, int32_t n) {
    json_t *arr = json_array();
    for (int32_t i = 0; i < n; i++) json_array_append_new(arr, json_integer(toks[i].id));
    return arr;
}

/* llama.cpp /completion result (final: the whole result, or the last event
 * of a stream with empty content). */
static json_t *completion_json(const srv_app *app, const srv_params *p, const task_view *v, bool stream_final) {
    double t_prompt_ms = v->t_first_us > v->t_start_us ? (v->t_first_us - v->t_start_us) / 1e3 : 0;
    double t_gen_ms = v->t_end_us > v->t_first_us && v->t_first_us ? (v->t_end_us - v->t_first_us) / 1e3 : 0;
    const char *stop_type = v->finish == SRV_FINISH_STOP ? (v->stop_word[0] ? "word" : "eos") : "limit";
    json_t *o =
        json_pack("{s:o,s:i,s:b,s:s,s:i,s:i,s:i,s:s,s:o,s:b,s:{s:i,s:f,s:i,s:f,s:f}}", "content",
                  stream_final ? json_string("") : jstr(v->text ? v->text : "", v->text_len), "id_slot", v->slot_id,
                  "stop", 1, "model", app->model_name, "tokens_predicted", v->n_total_tokens, "tokens_evaluated",
                  v->n_prompt, "tokens_cached", v->n_cached, "stop_type", stop_type, "stopping_word",
                  jstr(v->stop_word, strlen(v->stop_word)), "truncated", 0, "timings", "prompt_n",
                  v->n_prompt - v->n_cached, "prompt_ms", t_prompt_ms, "predicted_n", v->n_total_tokens, "predicted_ms",
                  t_gen_ms, "predicted_per_second", t_gen_ms > 0 ? v->n_total_tokens * 1e3 / t_gen_ms : 0.0);
    if (!o) return NULL;
    json_object_set_new(o, "generation_settings",
                        json_pack("{s:i,s:f,s:i,s:f,s:f,s:f,s:i,s:I,s:b}", "n_predict", p->n_predict, "temperature",
                                  (double)p->sp.temp, "top_k", p->sp.top_k, "top_p", (double)p->sp.top_p, "min_p",
                                  (double)p->sp.min_p, "repeat_penalty", (double)p->sp.repeat_penalty, "n_probs",
                                  p->n_probs, "seed", (json_int_t)p->sp.seed, "ignore_eos", p->ignore_eos));
    if (!stream_final && p->return_tokens) json_object_set_new(o, "tokens", ids_json(v->tokens, v->n_tokens));
    if (!stream_final && p->n_probs > 0)
        json_object_set_new(o, "completion_probabilities", probs_json(app, v->tokens, v->n_tokens));
    return o;
}

static json_t *oai_result_json(const srv_app *app, const srv_params *p, const task_view *v, const char *id,
                               int64_t created) {
    json_t *text = jstr(v->text ? v->text : "", v->text_len);
    json_t *choice = p->api == SRV_API_OAI_CHAT
                         ? json_pack("{s:i,s:{s:s,s:o},s:n,s:s}", "index", 0, "message", "role", "assistant", "content",
                                     text, "logprobs", "finish_reason", oai_finish(v->finish))
                         : json_pack("{s:i,s:o,s:n,s:s}", "index", 0, "text", text, "logprobs", "finish_reason",
                                     oai_finish(v->finish));
    return json_pack("{s:s,s:s,s:I,s:s,s:[o],s:o}", "id", id, "object",
                     p->api == SRV_API_OAI_CHAT ? "chat.completion" : "text_completion", "created", (json_int_t)created,
                     "model", app->model_name, "choices", choice, "usage", usage_json(v));
}

/* One OpenAI stream chunk: delta text (or role), finish reason or NULL. */
static json_t *oai_chunk_json(const srv_app *app, const srv_params *p, const char *id, int64_t created,
                              json_t *delta_text, bool role, const char *finish) {
    json_t *choice;
    if (p->api == SRV_API_OAI_CHAT) {
        json_t *delta = json_object();
        if (role) json_object_set_new(delta, "role", json_string("assistant"));
        if (delta_text) json_object_set_new(delta, "content", delta_text);
        choice = json_pack("{s:i,s:o,s:n,s:o}", "index", 0, "delta", delta, "logprobs", "finish_reason",
                           finish ? json_string(finish) : json_null());
    } else {
        choice = json_pack("{s:i,s:o,s:n,s:o}", "index", 0, "text", delta_text ? delta_text : json_string(""),
                           "logprobs", "finish_reason", finish ? json_string(finish) : json_null());
    }
    return json_pack("{s:s,s:s,s:I,s:s,s:[o]}", "id", id, "object",
                     p->api == SRV_API_OAI_CHAT ? "chat.completion.chunk" : "text_completion", "created",
                     (json_int_t)created, "model", app->model_name, "choices", choice);
}

/* ---- streaming ---------------------------------------------------------------- */

typedef struct stream {
    srv_app *app;
    srv_task *task;
    char id[48];
    int64_t created;
    char *out; /* formatted bytes waiting for the socket */
    size_t out_len, out_pos, out_cap;
    size_t text_seen;
    int32_t tokens_seen;
    bool started, eof;
} stream;

static void stream_put(stream *st, const char *s, size_t n) {
    if (st->out_len + n > st->out_cap) {
        size_t cap = st->out_cap ? st->out_cap : 4096;
        while (cap < st->out_len + n) cap *= 2;
        char *p = realloc(st->out, cap);
        if (!p) return;
        st->out = p;
        st->out_cap = cap;
    }
    memcpy(st->out + st->out_len, s, n);
    st->out_len += n;
}

/* "data: JSON\n\n", dropping the reference to v. */
static void stream_event(stream *st, json_t *v) {
    char *s = v ? json_dumps(v, JSON_COMPACT) : NULL;
    json_decref(v);
    if (!s) return;
    stream_put(st, "data: ", 6);
    stream_put(st, s, strlen(s));
    stream_put(st, "\n\n", 2);
    free(s);
}

/* Format the events for what is new in the task. */
static void stream_fill(stream *st) {
    const srv_params *p = &st->task->params;
    srv_app *app = st->app;
    if (!st->started && p->api == SRV_API_OAI_CHAT)
        stream_event(st, oai_chunk_json(app, p, st->id, st->created, json_string(""), true, NULL));
    st->started = true;
    task_view v;
    task_read(app->sched, st->task, st->text_seen, st->tokens_seen, &v);
    st->text_seen += v.text_len;
    st->tokens_seen += v.n_tokens;
    if (v.text_len > 0 || (p->api == SRV_API_COMPLETION && v.n_tokens > 0)) {
        json_t *text = jstr(v.text ? v.text : "", v.text_len);
        if (p->api == SRV_API_COMPLETION) {
            json_t *o = json_pack("{s:o,s:b,s:i}", "content", text, "stop", 0, "id_slot", v.slot_id);
            if (o && p->return_tokens) json_object_set_new(o, "tokens", ids_json(v.tokens, v.n_tokens));
            if (o && p->n_probs > 0)
                json_object_set_new(o, "completion_probabilities", probs_json(app, v.tokens, v.n_tokens));
            stream_event(st, o);
        } else {
            stream_event(st, oai_chunk_json(app, p, st->id, st->created, text, false, NULL));
        }
    }
    if (v.done) {
        srv_error err;
        if (task_error(&v, app, &err)) {
            stream_event(st, error_json(&err));
        } else if (p->api == SRV_API_COMPLETION) {
            stream_event(st, completion_json(app, p, &v, true));
        } else {
            stream_event(st, oai_chunk_json(app, p, st->id, st->created, NULL, false, oai_finish(v.finish)));
            if (p->include_usage)
                stream_event(st, json_pack("{s:s,s:s,s:I,s:s,s:[],s:o}", "id", st->id, "object",
                                           p->api == SRV_API_OAI_CHAT ? "chat.completion.chunk" : "text_completion",
                                           "created", (json_int_t)st->created, "model", app->model_name, "choices",
                                           "usage", usage_json(&v)));
        }
        if (p->api != SRV_API_COMPLETION) stream_put(st, "data: [DONE]\n\n", 14);
        st->eof = true;
    }
    task_view_free(&v);
}

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
    stream *st = cls;
    while (st->out_pos == st->out_len) {
        st->out_pos = st->out_len = 0;
        if (st->eof) return MHD_CONTENT_READER_END_OF_STREAM;
        if (st->started && !srv_task_wait(st->app->sched, st->task, st->text_seen, st->tokens_seen, 1000)) {
            /* nothing for a second: a comment line, so a gone client is noticed */
            stream_put(st, ": ping\n\n", 8);
            break;
        }
        stream_fill(st);
    }
    size_t n = st->out_len - st->out_pos < max ? st->out_len - st->out_pos : max;
    memcpy(buf, st->out + st->out_pos, n);
    st->out_pos += n;
    return (ssize_t)n;
}

/* Called when the response is done or the connection dropped. */
static void stream_free(void *cls) {
    stream *st = cls;
    srv_task_release(st->app->sched, st->task);
    __atomic_sub_fetch(&st->app->n_active, 1, __ATOMIC_SEQ_CST);
    free(st->out);
    free(st);
}

/* ---- endpoints ------------------------------------------------------------------ */

static void make_id(char *buf, size_t n, const char *prefix) {
    static unsigned long counter;
    unsigned long k = __atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED);
    snprintf(buf, n, "%s%lx%08lx", prefix, (unsigned long)(optiml_time_us() & 0xffffffffff), k);
}

/* True if the peer closed the connection (EOF pending on the socket). */
static bool client_gone(MHD_socket fd) {
    char b;
    ssize_t n = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

static enum MHD_Result generate(srv_app *app, struct MHD_Connection *c, srv_api api, const char *body, size_t len,
                                bool *streaming);

/* A generation request; counted in app->n_active until its response is
 * done (for a stream: until stream_free). */
static enum MHD_Result handle_generate(srv_app *app, struct MHD_Connection *c, srv_api api, const char *body,
                                       size_t len) {
    bool streaming = false;
    __atomic_add_fetch(&app->n_active, 1, __ATOMIC_SEQ_CST);
    enum MHD_Result ret = generate(app, c, api, body, len, &streaming);
    if (!streaming) __atomic_sub_fetch(&app->n_active, 1, __ATOMIC_SEQ_CST);
    return ret;
}

void srv_http_drain(srv_app *app, double timeout_s) {
    int64_t until = optiml_time_us() + (int64_t)(timeout_s * 1e6);
    while (__atomic_load_n(&app->n_active, __ATOMIC_SEQ_CST) > 0 && optiml_time_us() < until) {
        struct timespec ts = {0, 10 * 1000000L};
        nanosleep(&ts, NULL);
    }
}

static enum MHD_Result generate(srv_app *app, struct MHD_Connection *c, srv_api api, const char *body, size_t len,
                                bool *streaming) {
    srv_params p;
    srv_error err;
    if (!srv_params_parse(api, body, len, optiml_model_n_vocab(app->model), &p, &err)) return send_error(c, &err);
    int32_t n_prompt = 0;
    optiml_token *toks = prompt_tokens(app, &p, &n_prompt, &err);
    if (!toks) {
        srv_params_free(&p);
        return send_error(c, &err);
    }
    const char *field = api == SRV_API_OAI_CHAT ? "messages" : "prompt";
    int32_t n_ctx_slot = srv_sched_n_ctx_slot(app->sched);
    if (n_prompt == 0 || n_prompt >= n_ctx_slot) {
        free(toks);
        srv_params_free(&p);
        if (n_prompt == 0)
            srv_error_set(&err, 400, field, "the prompt is empty (and the model adds no BOS token)");
        else
            srv_error_set(&err, 400, field,
                          "the prompt has %d tokens but a slot's context holds %d (it needs room for at least "
                          "one generated token; raise -c or lower --parallel)",
                          n_prompt, n_ctx_slot);
        return send_error(c, &err);
    }
    srv_task *t = srv_task_new(&p, toks, n_prompt);
    free(toks);
    if (!t) {
        srv_params_free(&p);
        return send_error_msg(c, 500, NULL, "out of memory");
    }
    if (!srv_sched_submit(app->sched, t, &err)) {
        srv_task_release(app->sched, t);
        return send_error(c, &err);
    }
    char id[48];
    make_id(id, sizeof(id), api == SRV_API_OAI_CHAT ? "chatcmpl-" : "cmpl-");
    int64_t created = (int64_t)time(NULL);

    if (t->params.stream) {
        stream *st = calloc(1, sizeof(*st));
        struct MHD_Response *r =
            st ? MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_read, st, stream_free) : NULL;
        if (!r) {
            free(st);
            srv_task_release(app->sched, t);
            return MHD_NO;
        }
        st->app = app;
        st->task = t;
        *streaming = true; /* from here stream_free ends the count */
        memcpy(st->id, id, sizeof(id));
        st->created = created;
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream; charset=utf-8");
        MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        MHD_add_response_header(r, "X-Accel-Buffering", "no");
        enum MHD_Result ret = MHD_queue_response(c, MHD_HTTP_OK, r);
        MHD_destroy_response(r); /* stream_free runs when MHD lets go of it */
        return ret;
    }

    /* not streaming: wait for the end (the scheduler applies --timeout),
     * cancelling the task if the client hangs up meanwhile */
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    while (!srv_task_wait(app->sched, t, SIZE_MAX, INT32_MAX, 200)) {
        if (ci && client_gone(ci->connect_fd)) {
            srv_task_release(app->sched, t);
            return MHD_NO; /* close the connection */
        }
    }
    task_view v;
    task_read(app->sched, t, 0, 0, &v);
    enum MHD_Result ret;
    if (task_error(&v, app, &err))
        ret = send_error(c, &err);
    else if (api == SRV_API_COMPLETION)
        ret = send_json(c, 200, completion_json(app, &t->params, &v, false));
    else
        ret = send_json(c, 200, oai_result_json(app, &t->params, &v, id, created));
    task_view_free(&v);
    srv_task_release(app->sched, t);
    return ret;
}

static enum MHD_Result handle_tokenize(srv_app *app, struct MHD_Connection *c, const char *body, size_t len) {
    srv_params p;
    srv_error err;
    if (!srv_params_parse(SRV_API_TOKENIZE, body, len, 0, &p, &err)) return send_error(c, &err);
    int32_t n = 0;
    optiml_token *toks = tokenize(app->model, p.prompt, strlen(p.prompt),
                                  p.add_special && optiml_token_add_bos(app->model), true, &n, &err);
    if (!toks) {
        srv_params_free(&p);
        return send_error(c, &err);
    }
    json_t *arr = json_array();
    for (int32_t i = 0; i < n; i++)
        json_array_append_new(arr, p.with_pieces
                                       ? json_pack("{s:i,s:o}", "id", toks[i], "piece", token_str(app->model, toks[i]))
                                       : json_integer(toks[i]));
    free(toks);
    srv_params_free(&p);
    return send_json(c, 200, json_pack("{s:o}", "tokens", arr));
}

static enum MHD_Result handle_detokenize(srv_app *app, struct MHD_Connection *c, const char *body, size_t len) {
    srv_params p;
    srv_error err;
    if (!srv_params_parse(SRV_API_DETOKENIZE, body, len, optiml_model_n_vocab(app->model), &p, &err))
        return send_error(c, &err);
    size_t cap = (size_t)p.n_prompt_ids * 16 + 1, o = 0;
    char *text = malloc(cap);
    optiml_token bos = optiml_token_bos(app->model);
    for (int32_t i = 0; text && i < p.n_prompt_ids; i++) {
        char piece[256];
        int32_t n = optiml_token_to_piece(app->model, p.prompt_ids[i], piece, sizeof(piece),
                                          i > 0 && p.prompt_ids[i - 1] == bos, false);
        if (n <= 0) continue;
        if (o + (size_t)n > cap) {
            char *q = realloc(text, cap = cap * 2 + (size_t)n);
            if (!q) {
                free(text);
                text = NULL;
                break;
            }
            text = q;
        }
        memcpy(text + o, piece, (size_t)n);
        o += (size_t)n;
    }
    srv_params_free(&p);
    if (!text) return send_error_msg(c, 500, NULL, "out of memory");
    json_t *v = json_pack("{s:o}", "content", jstr(text, o));
    free(text);
    return send_json(c, 200, v);
}

static enum MHD_Result handle_props(srv_app *app, struct MHD_Connection *c) {
    srv_metrics m;
    srv_sched_get_metrics(app->sched, &m);
    optiml_sampler_params sp = optiml_sampler_default_params();
    const char *tmpl =
        app->chat_template ? app->chat_template : optiml_model_meta_str(app->model, "tokenizer.chat_template");
    json_t *v = json_pack("{s:{s:i,s:i,s:f,s:i,s:f,s:f,s:f},s:i,s:i,s:i,s:i,s:s,s:s,s:s?,s:s,s:f,s:b}",
                          "default_generation_settings", "n_ctx", srv_sched_n_ctx_slot(app->sched), "n_predict", -1,
                          "temperature", (double)sp.temp, "top_k", sp.top_k, "top_p", (double)sp.top_p, "min_p",
                          (double)sp.min_p, "repeat_penalty", (double)sp.repeat_penalty, "total_slots",
                          srv_sched_n_slots(app->sched), "slots_idle", srv_sched_n_slots(app->sched) - m.n_busy,
                          "slots_processing", m.n_busy, "requests_queued", m.n_queued, "model_path", app->model_path,
                          "model", app->model_name, "chat_template", tmpl, "build_info", optiml_version(), "timeout",
                          app->timeout_s, "api_key_required", app->api_key != NULL);
    return send_json(c, 200, v);
}

static enum MHD_Result handle_metrics(srv_app *app, struct MHD_Connection *c) {
    srv_metrics m;
    srv_sched_get_metrics(app->sched, &m);
    char *s = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&s, &n);
    if (!f) return send_error_msg(c, 500, NULL, "out of memory");
#define METRIC(name, type, help, fmt, val)                                                                             \
    fprintf(f, "# HELP optiml_" name " " help "\n# TYPE optiml_" name " " type "\noptiml_" name " " fmt "\n", val)
    METRIC("requests_total", "counter", "Generation requests accepted into the queue.", "%llu",
           (unsigned long long)m.requests_total);
    METRIC("requests_rejected_total", "counter", "Requests rejected because the queue was full.", "%llu",
           (unsigned long long)m.requests_rejected);
    METRIC("requests_cancelled_total", "counter", "Requests cancelled (client gone or shutdown).", "%llu",
           (unsigned long long)m.requests_cancelled);
    METRIC("requests_timeout_total", "counter", "Requests stopped by --timeout.", "%llu",
           (unsigned long long)m.requests_timeout);
    METRIC("prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", "%llu",
           (unsigned long long)m.prompt_tokens);
    METRIC("prompt_tokens_cached_total", "counter", "Prompt tokens reused from a slot's cache.", "%llu",
           (unsigned long long)m.prompt_tokens_cached);
    METRIC("tokens_predicted_total", "counter", "Generated tokens.", "%llu", (unsigned long long)m.tokens_predicted);
    METRIC("decode_steps_total", "counter", "optiml_decode calls.", "%llu", (unsigned long long)m.decode_steps);
    METRIC("batch_tokens_total", "counter", "Tokens decoded over all steps.", "%llu",
           (unsigned long long)m.batch_tokens);
    METRIC("decode_seconds_total", "counter", "Time spent in optiml_decode.", "%.6f", m.t_decode_us / 1e6);
    METRIC("requests_processing", "gauge", "Busy slots.", "%d", m.n_busy);
    METRIC("requests_deferred", "gauge", "Requests waiting in the queue.", "%d", m.n_queued);
    METRIC("slots_idle", "gauge", "Free slots.", "%d", srv_sched_n_slots(app->sched) - m.n_busy);
    METRIC("kv_cache_tokens", "gauge", "Tokens held in the KV cache over all slots.", "%d", m.kv_tokens);
#undef METRIC
    fclose(f);
    return send_bytes(c, 200, "text/plain; version=0.0.4; charset=utf-8", s, n, MHD_RESPMEM_MUST_FREE);
}

static enum MHD_Result handle_models(srv_app *app, struct MHD_Connection *c) {
    return send_json(c, 200,
                     json_pack("{s:s,s:[{s:s,s:s,s:I,s:s,s:{s:i,s:I}}]}", "object", "list", "data", "id",
                               app->model_name, "object", "model", "created", (json_int_t)app->t_created, "owned_by",
                               "optiml", "meta", "n_ctx_train", optiml_model_n_ctx_train(app->model), "n_params",
                               (json_int_t)optiml_model_n_params(app->model)));
}

static enum MHD_Result handle_webui(struct MHD_Connection *c) {
    struct MHD_Response *r =
        MHD_create_response_from_buffer(srv_webui_html_len, (void *)srv_webui_html, MHD_RESPMEM_PERSISTENT);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/html; charset=utf-8");
    MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(r, "Content-Security-Policy",
                            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'");
    enum MHD_Result ret = MHD_queue_response(c, MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    return ret;
}

/* ---- routing ---------------------------------------------------------------------- */

typedef enum route_kind {
    ROUTE_WEBUI,
    ROUTE_HEALTH,
    ROUTE_PROPS,
    ROUTE_METRICS,
    ROUTE_MODELS,
    ROUTE_TOKENIZE,
    ROUTE_DETOKENIZE,
    ROUTE_COMPLETION,
    ROUTE_OAI_COMPLETION,
    ROUTE_OAI_CHAT,
} route_kind;

static const struct route {
    const char *path;
    const char *method;
    route_kind kind;
} ROUTES[] = {
    {"/", "GET", ROUTE_WEBUI},
    {"/index.html", "GET", ROUTE_WEBUI},
    {"/health", "GET", ROUTE_HEALTH},
    {"/props", "GET", ROUTE_PROPS},
    {"/metrics", "GET", ROUTE_METRICS},
    {"/v1/models", "GET", ROUTE_MODELS},
    {"/models", "GET", ROUTE_MODELS},
    {"/tokenize", "POST", ROUTE_TOKENIZE},
    {"/detokenize", "POST", ROUTE_DETOKENIZE},
    {"/completion", "POST", ROUTE_COMPLETION},
    {"/completions", "POST", ROUTE_COMPLETION},
    {"/v1/completions", "POST", ROUTE_OAI_COMPLETION},
    {"/v1/chat/completions", "POST", ROUTE_OAI_CHAT},
    {"/chat/completions", "POST", ROUTE_OAI_CHAT},
};

/* Per-connection request state: the body read so far. */
typedef struct request {
    const struct route *route;
    char *body;
    size_t len, cap;
    bool too_big, answered;
} request;

/* Constant-time comparison of the Authorization header with the key. */
static bool auth_ok(const srv_app *app, struct MHD_Connection *c) {
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!h || strncmp(h, "Bearer ", 7) != 0) return false;
    h += 7;
    size_t n = strlen(h), m = strlen(app->api_key);
    unsigned diff = (unsigned)(n != m);
    for (size_t i = 0; i < m; i++) diff |= (unsigned char)app->api_key[i] ^ (unsigned char)(i < n ? h[i] : 0);
    return diff == 0;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_size, void **con_cls) {
    srv_app *app = cls;
    request *rq = *con_cls;
    if (!rq) { /* first call: headers only */
        if (!(rq = calloc(1, sizeof(*rq)))) return MHD_NO;
        *con_cls = rq;
        bool path_known = false;
        for (size_t i = 0; i < sizeof(ROUTES) / sizeof(ROUTES[0]); i++) {
            if (strcmp(url, ROUTES[i].path) != 0) continue;
            path_known = true;
            if (strcmp(method, ROUTES[i].method) == 0 || (strcmp(method, "HEAD") == 0 && ROUTES[i].method[0] == 'G'))
                rq->route = &ROUTES[i];
        }
        /* answered before the body is read: unknown path, wrong method,
         * wrong key, declared body too large */
        srv_error err;
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (!rq->route && path_known)
            srv_error_set(&err, 405, NULL, "%s is not allowed on %.100s", method, url);
        else if (!rq->route)
            srv_error_set(&err, 404, NULL, "no endpoint %.100s", url);
        else if (app->api_key && rq->route->kind != ROUTE_HEALTH && rq->route->kind != ROUTE_WEBUI && !auth_ok(app, c))
            srv_error_set(&err, 401, NULL, "invalid or missing API key (send 'Authorization: Bearer KEY')");
        else if (cl && strtoull(cl, NULL, 10) > app->body_max)
            srv_error_set(&err, 413, NULL, "the request body is larger than %zu bytes", app->body_max);
        else
            return MHD_YES;
        rq->answered = true;
        return send_error(c, &err);
    }
    if (*upload_size) { /* a piece of the body */
        if (!rq->answered && !rq->too_big) {
            if (rq->len + *upload_size > app->body_max) {
                rq->too_big = true;
            } else {
                if (rq->len + *upload_size > rq->cap) {
                    size_t cap = rq->cap ? rq->cap : 4096;
                    while (cap < rq->len + *upload_size) cap *= 2;
                    char *p = realloc(rq->body, cap);
                    if (!p) return MHD_NO;
                    rq->body = p;
                    rq->cap = cap;
                }
                memcpy(rq->body + rq->len, upload_data, *upload_size);
                rq->len += *upload_size;
            }
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (rq->answered) return MHD_YES;
    rq->answered = true;
    if (rq->too_big) {
        char msg[96];
        snprintf(msg, sizeof(msg), "the request body is larger than %zu bytes", app->body_max);
        return send_error_msg(c, 413, NULL, msg);
    }
    const char *body = rq->body ? rq->body : "";
    switch (rq->route->kind) {
    case ROUTE_WEBUI:
        return handle_webui(c);
    case ROUTE_HEALTH:
        return send_json(c, 200, json_pack("{s:s}", "status", "ok"));
    case ROUTE_PROPS:
        return handle_props(app, c);
    case ROUTE_METRICS:
        return handle_metrics(app, c);
    case ROUTE_MODELS:
        return handle_models(app, c);
    case ROUTE_TOKENIZE:
        return handle_tokenize(app, c, body, rq->len);
    case ROUTE_DETOKENIZE:
        return handle_detokenize(app, c, body, rq->len);
    case ROUTE_COMPLETION:
        return handle_generate(app, c, SRV_API_COMPLETION, body, rq->len);
    case ROUTE_OAI_COMPLETION:
        return handle_generate(app, c, SRV_API_OAI_COMPLETION, body, rq->len);
    case ROUTE_OAI_CHAT:
        return handle_generate(app, c, SRV_API_OAI_CHAT, body, rq->len);
    }
    return MHD_NO;
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe) {
    request *rq = *con_cls;
    if (!rq) return;
    free(rq->body);
    free(rq);
    *con_cls = NULL;
}

/* ---- start ------------------------------------------------------------------------ */

struct MHD_Daemon *srv_http_start(srv_app *app, const char *host, int port, int *bound_port, char *err,
                                  size_t err_size) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    char port_str[16];
    snprintf(port_str, sizeof(port_str), "%d", port);
    int rc = getaddrinfo(host, port_str, &hints, &res);
    if (rc != 0 || !res) {
        snprintf(err, err_size, "cannot resolve host '%s': %s", host, gai_strerror(rc));
        return NULL;
    }
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_ITC | MHD_USE_ERROR_LOG;
    if (res->ai_family == AF_INET6) flags |= MHD_USE_IPv6;
    struct MHD_Daemon *d = MHD_start_daemon(
        flags, (uint16_t)port, NULL, NULL, on_request, app, MHD_OPTION_SOCK_ADDR, res->ai_addr,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, app, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)120,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)512, MHD_OPTION_LISTENING_ADDRESS_REUSE, (unsigned)1, MHD_OPTION_END);
    freeaddrinfo(res);
    if (!d) {
        snprintf(err, err_size, "cannot listen on %s:%d (in use, or not an address of this machine?)", host, port);
        return NULL;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    *bound_port = info ? info->port : port;
    return d;
}
