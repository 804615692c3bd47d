/*
 * server.h - optiml-server's internal types: the parameters of one
 * generation request (parsed and validated from JSON by server_params.c),
 * the scheduler with its slots and bounded queue (server_sched.c), and the
 * HTTP front end (server_http.c) that ties them to libmicrohttpd.
 *
 * Data flow: an HTTP handler thread parses the body into srv_params,
 * tokenizes the prompt, wraps both in a srv_task and submits it to the
 * queue; the scheduler thread (the only user of the optiml_context) moves
 * queued tasks into free slots, decodes one batch per step holding prompt
 * chunks and one token per generating slot, samples, applies stop strings
 * and publishes text into the task, waking the handler through the task's
 * condition variable. Either side may drop the task first (client gone,
 * generation done): tasks are reference counted.
 */
#ifndef OPTIML_SERVER_H
#define OPTIML_SERVER_H

#include "optiml.h"

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- request parameters (server_params.c) ------------------------------ */

typedef enum srv_api {
    SRV_API_COMPLETION = 0, /* llama.cpp POST /completion                   */
    SRV_API_OAI_COMPLETION, /* OpenAI POST /v1/completions                  */
    SRV_API_OAI_CHAT,       /* OpenAI POST /v1/chat/completions             */
    SRV_API_TOKENIZE,       /* POST /tokenize                               */
    SRV_API_DETOKENIZE,     /* POST /detokenize                             */
} srv_api;

#define SRV_STOP_MAX     16  /* stop strings per request                   */
#define SRV_STOP_LEN_MAX 256 /* bytes per stop string                      */
#define SRV_N_PROBS_MAX  20  /* n_probs / logprobs upper bound             */

typedef struct srv_params {
    srv_api api;
    /* prompt: text, token ids, or chat messages (exactly one is set) */
    char *prompt;             /* NUL-terminated UTF-8, or NULL          */
    optiml_token *prompt_ids; /* or NULL                                */
    int32_t n_prompt_ids;
    optiml_chat_message *msgs; /* role/content strings owned here        */
    size_t n_msgs;
    /* generation */
    int32_t n_predict; /* -1: until end of generation or context */
    optiml_sampler_params sp;
    bool seed_set;
    char *stop[SRV_STOP_MAX];
    int n_stop;
    bool stream;
    bool include_usage; /* stream_options.include_usage           */
    bool cache_prompt;
    bool ignore_eos;
    bool return_tokens; /* /completion: add "tokens" to results   */
    int32_t n_probs;    /* 0: off                                 */
    /* /tokenize, /detokenize */
    bool add_special;
    bool with_pieces;
} srv_params;

/* An error for the client: HTTP status, OpenAI error type and the request
 * field it concerns ("" if none). */
typedef struct srv_error {
    int status;
    const char *type;
    char param[64];
    char message[512];
} srv_error;

/* Parse and validate a JSON request body for api. On success returns true
 * and fills *out (free with srv_params_free); on failure returns false with
 * *err set (status 400 naming the field, or 501 for unsupported features)
 * and nothing to free. body need not be NUL-terminated. n_vocab bounds
 * token ids (<= 0: no bound). */
bool srv_params_parse(srv_api api, const char *body, size_t len, int32_t n_vocab, srv_params *out, srv_error *err);
void srv_params_free(srv_params *p);

/* Fill err; returns false so callers can `return srv_error_set(...)`. */
bool srv_error_set(srv_error *err, int status, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Copy s[0..n) into a new NUL-terminated string, replacing invalid UTF-8
 * with U+FFFD (jansson accepts only valid UTF-8). NULL if out of memory. */
char *srv_utf8_sanitize(const char *s, size_t n, size_t *out_len);
/* Bytes at the end of s[0..n) that form an incomplete UTF-8 sequence. */
size_t srv_utf8_incomplete_tail(const char *s, size_t n);

/* ---- scheduler (server_sched.c) ---------------------------------------- */

typedef enum srv_finish {
    SRV_FINISH_NONE = 0,
    SRV_FINISH_STOP,      /* end-of-generation token or a stop string        */
    SRV_FINISH_LENGTH,    /* n_predict reached or the slot's context is full */
    SRV_FINISH_CANCELLED, /* the client went away or the server stops       */
    SRV_FINISH_TIMEOUT,   /* --timeout elapsed                               */
    SRV_FINISH_ERROR,     /* decode failed                                   */
} srv_finish;

/* One generated token, with the top n_probs alternatives when asked. */
typedef struct srv_token_info {
    optiml_token id;
    float prob; /* probability of id (softmax of logits) */
    int32_t n_top;
    optiml_token top_id[SRV_N_PROBS_MAX];
    float top_prob[SRV_N_PROBS_MAX];
} srv_token_info;

typedef struct srv_task srv_task;
struct srv_task {
    /* input, immutable after submit */
    srv_params params;
    optiml_token *prompt;
    int32_t n_prompt;
    int64_t t_deadline_us; /* 0: no timeout                         */
    /* output, guarded by the scheduler's mutex */
    pthread_cond_t cv; /* signalled when output changes         */
    char *text;        /* published text (stop strings removed) */
    size_t text_len, text_cap;
    srv_token_info *tokens; /* generated tokens, in order            */
    int32_t n_tokens, tokens_cap;
    bool done;
    srv_finish finish;
    char stop_word[SRV_STOP_LEN_MAX + 1]; /* the stop string that matched    */
    char error[256];
    int32_t n_cached; /* prompt tokens reused from the slot    */
    int slot_id;      /* -1 while queued                        */
    int64_t t_start_us, t_first_us, t_end_us;
    /* shared state */
    bool cancelled; /* set by the handler: stop generating   */
    int refs;       /* handler + scheduler                   */
    srv_task *next; /* queue link                            */
};

typedef struct srv_sched_params {
    int32_t n_ctx;      /* total KV cells; 0 = the model's training context */
    int32_t n_parallel; /* slots (sequence ids)                            */
    int32_t n_threads;
    int32_t queue_max; /* queued requests beyond the busy slots           */
    double timeout_s;  /* per request, 0 = none                           */
} srv_sched_params;

typedef struct srv_metrics {
    uint64_t requests_total, requests_rejected, requests_cancelled, requests_timeout;
    uint64_t prompt_tokens, prompt_tokens_cached, tokens_predicted, decode_steps, batch_tokens;
    int64_t t_decode_us; /* time inside optiml_decode */
    int n_busy, n_queued;
    int32_t kv_tokens;
} srv_metrics;

typedef struct srv_sched srv_sched;

/* Create the context and the slots, and start the scheduler thread. */
srv_sched *srv_sched_start(const optiml_model *model, const srv_sched_params *params, char *err, size_t err_size);
/* Stop the scheduler: refuse new tasks, cancel queued ones at once and
 * running ones after grace_s seconds, and join the thread. Tasks still held
 * by handlers stay readable until srv_sched_free. */
void srv_sched_shutdown(srv_sched *s, double grace_s);
void srv_sched_free(srv_sched *s); /* after every handler is gone */
int32_t srv_sched_n_ctx_slot(const srv_sched *s);
int32_t srv_sched_n_slots(const srv_sched *s);

/* Make a task owning params (moved: *params is zeroed) and prompt (copied). */
srv_task *srv_task_new(srv_params *params, const optiml_token *prompt, int32_t n_prompt);
/* Queue the task. Returns false (err set: 503) when the queue is full or the
 * server stops; the caller still owns its reference then. */
bool srv_sched_submit(srv_sched *s, srv_task *t, srv_error *err);
/* Wait until the task has more than have_text bytes / have_tokens tokens or
 * is done, at most wait_ms milliseconds. Returns true if anything changed. */
bool srv_task_wait(srv_sched *s, srv_task *t, size_t have_text, int32_t have_tokens, int wait_ms);
/* Lock/unlock around reading a task's output fields. */
void srv_sched_lock(srv_sched *s);
void srv_sched_unlock(srv_sched *s);
/* Ask the scheduler to stop the task and drop the caller's reference. */
void srv_task_release(srv_sched *s, srv_task *t);
void srv_sched_get_metrics(srv_sched *s, srv_metrics *m);

const char *srv_finish_str(srv_finish f); /* "stop", "length", ... */

#endif /* OPTIML_SERVER_H */
