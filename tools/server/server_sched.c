/*
 * server_sched.c - optiml-server's scheduler: one thread owns the
 * optiml_context and runs continuous batching over N slots (one sequence id
 * each). Every step it (1) drops cancelled and timed-out tasks, (2) moves
 * queued tasks into free slots, picking the slot whose cached tokens share
 * the longest prefix with the prompt and truncating its KV cache after that
 * prefix, (3) builds one batch holding one token per generating slot plus
 * prompt chunks of slots still ingesting, (4) decodes it in one
 * optiml_decode call, and (5) samples each slot's next token with the
 * slot's own sampler, applies stop strings (never publishing a part of
 * one) and publishes the text to the waiting HTTP handler.
 */
#define _POSIX_C_SOURCE 200809L
#include "server.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- types ------------------------------------------------------------------ */

typedef struct srv_slot {
    int id;         /* also the sequence id                          */
    srv_task *task; /* NULL: free                                    */
    optiml_sampler *smpl;
    optiml_token *hist; /* tokens cached for this sequence (n_ctx_slot)  */
    int32_t n_hist;
    int32_t i_prompt;     /* next prompt token to decode                   */
    bool generating;      /* prompt done                                   */
    optiml_token pending; /* sampled, to decode next step (-1: none)       */
    int32_t i_batch;      /* batch entry with this slot's logits, -1: none */
    int32_t n_gen;
    char *gen; /* generated text of the current task            */
    size_t gen_len, gen_cap, gen_sent;
    srv_finish finish;   /* set when the step ends the task               */
    int matched_stop;    /* index of the stop string that ended it, -1    */
    srv_token_info info; /* the token sampled this step                   */
    bool has_info;
} srv_slot;

struct srv_sched {
    const optiml_model *model;
    optiml_context *ctx;
    int32_t n_vocab, n_ctx_slot, n_batch;
    srv_slot *slots;
    int n_slots;
    optiml_batch batch;
    float *logits_tmp; /* (n_vocab) logits with EOG masked (ignore_eos) */
    float *probs;      /* (n_vocab) softmax scratch for n_probs         */
    optiml_token *eog; /* every end-of-generation token                 */
    int32_t n_eog;
    double timeout_s;
    int queue_max;
    /* guarded by mu */
    pthread_mutex_t mu;
    pthread_cond_t cv; /* the scheduler waits here for work             */
    srv_task *q_head, *q_tail;
    int n_queued;
    bool stopping;
    int64_t cancel_at_us; /* while stopping: cancel running tasks then     */
    srv_metrics m;
    pthread_t thread;
    bool thread_started;
};

const char *srv_finish_str(srv_finish f) {
    switch (f) {
    case SRV_FINISH_STOP:
        return "stop";
    case SRV_FINISH_LENGTH:
        return "length";
    case SRV_FINISH_CANCELLED:
        return "cancelled";
    case SRV_FINISH_TIMEOUT:
        return "timeout";
    case SRV_FINISH_ERROR:
        return "error";
    default:
        return "none";
    }
}

/* ---- tasks ------------------------------------------------------------------ */

srv_task *srv_task_new(srv_params *params, const optiml_token *prompt, int32_t n_prompt) {
    srv_task *t = calloc(1, sizeof(*t));
    if (!t) return NULL;
    t->prompt = malloc((size_t)(n_prompt > 0 ? n_prompt : 1) * sizeof(*prompt));
    if (!t->prompt) {
        free(t);
        return NULL;
    }
    memcpy(t->prompt, prompt, (size_t)n_prompt * sizeof(*prompt));
    t->n_prompt = n_prompt;
    t->params = *params;
    memset(params, 0, sizeof(*params));
    pthread_cond_init(&t->cv, NULL);
    t->refs = 1;
    t->slot_id = -1;
    return t;
}

static void task_free(srv_task *t) {
    srv_params_free(&t->params);
    free(t->prompt);
    free(t->text);
    free(t->tokens);
    pthread_cond_destroy(&t->cv);
    free(t);
}

/* Drop one reference (mu held). */
static void task_unref(srv_task *t) {
    if (--t->refs == 0) task_free(t);
}

/* Mark the task done and wake its handler (mu held); drops the scheduler's
 * reference. */
static void task_finish(srv_sched *s, srv_task *t, srv_finish f) {
    t->done = true;
    t->finish = f;
    t->t_end_us = optiml_time_us();
    if (f == SRV_FINISH_CANCELLED) s->m.requests_cancelled++;
    if (f == SRV_FINISH_TIMEOUT) s->m.requests_timeout++;
    pthread_cond_broadcast(&t->cv);
    task_unref(t);
}

static bool task_append_text(srv_task *t, const char *s, size_t n) {
    if (t->text_len + n + 1 > t->text_cap) {
        size_t cap = t->text_cap ? t->text_cap : 256;
        while (cap < t->text_len + n + 1) cap *= 2;
        char *p = realloc(t->text, cap);
        if (!p) return false;
        t->text = p;
        t->text_cap = cap;
    }
    memcpy(t->text + t->text_len, s, n);
    t->text_len += n;
    t->text[t->text_len] = 0;
    return true;
}

static bool task_append_token(srv_task *t, const srv_token_info *info) {
    if (t->n_tokens == t->tokens_cap) {
        int32_t cap = t->tokens_cap ? t->tokens_cap * 2 : 64;
        srv_token_info *p = realloc(t->tokens, (size_t)cap * sizeof(*p));
        if (!p) return false;
        t->tokens = p;
        t->tokens_cap = cap;
    }
    t->tokens[t->n_tokens++] = *info;
    return true;
}

void srv_sched_lock(srv_sched *s) { pthread_mutex_lock(&s->mu); }
void srv_sched_unlock(srv_sched *s) { pthread_mutex_unlock(&s->mu); }

bool srv_sched_submit(srv_sched *s, srv_task *t, srv_error *err) {
    pthread_mutex_lock(&s->mu);
    if (s->stopping) {
        pthread_mutex_unlock(&s->mu);
        return srv_error_set(err, 503, NULL, "the server is shutting down");
    }
    int n_free = 0;
    for (int i = 0; i < s->n_slots; i++) n_free += s->slots[i].task == NULL;
    if (s->n_queued - n_free >= s->queue_max) {
        s->m.requests_rejected++;
        pthread_mutex_unlock(&s->mu);
        return srv_error_set(err, 503, NULL, "the server is busy: %d requests are queued (--queue %d)", s->n_queued,
                             s->queue_max);
    }
    t->refs++; /* the scheduler's */
    t->t_start_us = optiml_time_us();
    if (s->timeout_s > 0) t->t_deadline_us = t->t_start_us + (int64_t)(s->timeout_s * 1e6);
    if (s->q_tail)
        s->q_tail->next = t;
    else
        s->q_head = t;
    s->q_tail = t;
    s->n_queued++;
    s->m.requests_total++;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return true;
}

bool srv_task_wait(srv_sched *s, srv_task *t, size_t have_text, int32_t have_tokens, int wait_ms) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += wait_ms / 1000;
    ts.tv_nsec += (long)(wait_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
    pthread_mutex_lock(&s->mu);
    bool changed;
    while (!(changed = t->text_len > have_text || t->n_tokens > have_tokens || t->done))
        if (pthread_cond_timedwait(&t->cv, &s->mu, &ts) != 0) break;
    pthread_mutex_unlock(&s->mu);
    return changed;
}

void srv_task_release(srv_sched *s, srv_task *t) {
    if (!t) return;
    pthread_mutex_lock(&s->mu);
    if (!t->done) {
        t->cancelled = true;
        pthread_cond_signal(&s->cv);
    }
    task_unref(t);
    pthread_mutex_unlock(&s->mu);
}

void srv_sched_get_metrics(srv_sched *s, srv_metrics *m) {
    pthread_mutex_lock(&s->mu);
    *m = s->m;
    m->n_queued = s->n_queued;
    m->n_busy = 0;
    for (int i = 0; i < s->n_slots; i++) m->n_busy += s->slots[i].task != NULL;
    pthread_mutex_unlock(&s->mu);
}

int32_t srv_sched_n_ctx_slot(const srv_sched *s) { return s->n_ctx_slot; }
int32_t srv_sched_n_slots(const srv_sched *s) { return s->n_slots; }

/* ---- slots ------------------------------------------------------------------ */

static int32_t common_prefix(const optiml_token *a, int32_t na, const optiml_token *b, int32_t nb) {
    int32_t n = 0;
    while (n < na && n < nb && a[n] == b[n]) n++;
    return n;
}

/* The free slot sharing the longest prefix with the prompt (mu held). */
static srv_slot *slot_pick(srv_sched *s, const srv_task *t) {
    srv_slot *best = NULL;
    int32_t best_n = -1;
    for (int i = 0; i < s->n_slots; i++) {
        srv_slot *sl = &s->slots[i];
        if (sl->task) continue;
        int32_t n = t->params.cache_prompt ? common_prefix(sl->hist, sl->n_hist, t->prompt, t->n_prompt) : 0;
        if (n > best_n) best = sl, best_n = n;
    }
    return best;
}

/* Bind a task to a free slot (mu held). */
static void slot_start(srv_sched *s, srv_slot *sl, srv_task *t) {
    int32_t keep = t->params.cache_prompt ? common_prefix(sl->hist, sl->n_hist, t->prompt, t->n_prompt) : 0;
    if (keep >= t->n_prompt) keep = t->n_prompt - 1; /* decode one token for its logits */
    if (keep < 0) keep = 0;
    optiml_kv_seq_truncate(s->ctx, sl->id, keep);
    sl->n_hist = keep;
    sl->i_prompt = keep;
    sl->generating = false;
    sl->pending = -1;
    sl->i_batch = -1;
    sl->n_gen = 0;
    sl->gen_len = sl->gen_sent = 0;
    sl->finish = SRV_FINISH_NONE;
    sl->matched_stop = -1;
    sl->has_info = false;
    sl->task = t;
    t->slot_id = sl->id;
    t->n_cached = keep;
    s->m.prompt_tokens += (uint64_t)t->n_prompt;
    s->m.prompt_tokens_cached += (uint64_t)keep;

    optiml_sampler_params sp = t->params.sp;
    if (!t->params.seed_set) sp.seed = (uint64_t)time(NULL) ^ ((uint64_t)optiml_time_us() << 16) ^ (uint64_t)sl->id;
    optiml_sampler_free(sl->smpl);
    sl->smpl = optiml_sampler_init(&sp, s->n_vocab);
    if (!sl->smpl) {
        snprintf(t->error, sizeof(t->error), "sampler: %s", optiml_last_error());
        sl->finish = SRV_FINISH_ERROR;
        return;
    }
    for (int32_t i = 0; i < t->n_prompt; i++) optiml_sampler_accept(sl->smpl, t->prompt[i]);
}

/* Release the slot's task with reason f (mu held). The KV cache and the
 * token history stay for prefix reuse. */
static void slot_end(srv_sched *s, srv_slot *sl, srv_finish f) {
    srv_task *t = sl->task;
    if (!t) return;
    /* everything not yet published goes out now */
    if (sl->gen_len > sl->gen_sent) task_append_text(t, sl->gen + sl->gen_sent, sl->gen_len - sl->gen_sent);
    sl->gen_sent = sl->gen_len;
    if (sl->matched_stop >= 0) snprintf(t->stop_word, sizeof(t->stop_word), "%s", t->params.stop[sl->matched_stop]);
    sl->task = NULL;
    sl->pending = -1;
    task_finish(s, t, f);
}

/* ---- stop strings ----------------------------------------------------------- */

static const char *find_bytes(const char *hay, size_t n, const char *needle, size_t m) {
    if (m == 0 || m > n) return NULL;
    for (size_t i = 0; i + m <= n; i++)
        if (hay[i] == needle[0] && memcmp(hay + i, needle, m) == 0) return hay + i;
    return NULL;
}

/* After new text was appended at from: cut the text at the earliest stop
 * string (returns true), else compute in *safe how much may be published:
 * hold back any tail that could start a stop string, and an incomplete
 * UTF-8 sequence. */
static bool slot_check_stop(srv_slot *sl, size_t from, size_t *safe) {
    const srv_params *p = &sl->task->params;
    size_t cut = SIZE_MAX;
    for (int i = 0; i < p->n_stop; i++) {
        size_t m = strlen(p->stop[i]);
        size_t start = from >= m - 1 ? from - (m - 1) : 0;
        if (start < sl->gen_sent) start = sl->gen_sent;
        const char *hit = find_bytes(sl->gen + start, sl->gen_len - start, p->stop[i], m);
        if (hit && (size_t)(hit - sl->gen) < cut) {
            cut = (size_t)(hit - sl->gen);
            sl->matched_stop = i;
        }
    }
    if (cut != SIZE_MAX) {
        sl->gen_len = cut;
        return true;
    }
    size_t hold = srv_utf8_incomplete_tail(sl->gen, sl->gen_len);
    for (int i = 0; i < p->n_stop; i++) {
        size_t m = strlen(p->stop[i]);
        for (size_t k = m - 1; k > hold; k--) {
            if (k <= sl->gen_len && memcmp(sl->gen + sl->gen_len - k, p->stop[i], k) == 0) {
                hold = k;
                break;
            }
        }
    }
    *safe = sl->gen_len - hold;
    if (*safe < sl->gen_sent) *safe = sl->gen_sent;
    return false;
}

static bool slot_append_text(srv_slot *sl, const char *s, size_t n) {
    if (sl->gen_len + n > sl->gen_cap) {
        size_t cap = sl->gen_cap ? sl->gen_cap : 1024;
        while (cap < sl->gen_len + n) cap *= 2;
        char *p = realloc(sl->gen, cap);
        if (!p) return false;
        sl->gen = p;
        sl->gen_cap = cap;
    }
    memcpy(sl->gen + sl->gen_len, s, n);
    sl->gen_len += n;
    return true;
}

/* ---- sampling --------------------------------------------------------------- */

/* Softmax probability of tok and the n most likely tokens. */
static void token_probs(srv_sched *s, const float *logits, optiml_token tok, int32_t n, srv_token_info *info) {
    float mx = logits[0];
    for (int32_t i = 1; i < s->n_vocab; i++) mx = logits[i] > mx ? logits[i] : mx;
    double sum = 0;
    for (int32_t i = 0; i < s->n_vocab; i++) sum += s->probs[i] = expf(logits[i] - mx);
    info->prob = (float)(s->probs[tok] / sum);
    info->n_top = 0;
    for (int32_t k = 0; k < n && k < s->n_vocab; k++) { /* n <= 20: selection */
        int32_t best = -1;
        for (int32_t i = 0; i < s->n_vocab; i++)
            if (s->probs[i] >= 0 && (best < 0 || s->probs[i] > s->probs[best])) best = i;
        info->top_id[k] = best;
        info->top_prob[k] = (float)(s->probs[best] / sum);
        s->probs[best] = -1;
        info->n_top++;
    }
}

/* Sample the slot's next token from batch entry i_batch and extend its text
 * (scheduler thread, mu not held: touches slot state and the read-only
 * task params only). Sets sl->finish when the task ends. */
static void slot_sample(srv_sched *s, srv_slot *sl) {
    const srv_params *p = &sl->task->params;
    const float *logits = optiml_get_logits_ith(s->ctx, sl->i_batch);
    sl->i_batch = -1;
    if (!logits) {
        sl->finish = SRV_FINISH_ERROR;
        return;
    }
    if (p->ignore_eos) {
        memcpy(s->logits_tmp, logits, (size_t)s->n_vocab * sizeof(float));
        for (int32_t i = 0; i < s->n_eog; i++) s->logits_tmp[s->eog[i]] = -INFINITY;
        logits = s->logits_tmp;
    }
    optiml_token tok = optiml_sampler_sample(sl->smpl, logits);
    optiml_sampler_accept(sl->smpl, tok);
    sl->n_gen++;
    if (!p->ignore_eos && optiml_token_is_eog(s->model, tok)) {
        sl->finish = SRV_FINISH_STOP;
        return;
    }
    sl->info.id = tok;
    sl->info.n_top = 0;
    sl->info.prob = 0;
    if (p->n_probs > 0) token_probs(s, logits, tok, p->n_probs, &sl->info);
    sl->has_info = true;

    char piece[256];
    optiml_token prev = sl->n_hist > 0 ? sl->hist[sl->n_hist - 1] : -1;
    int32_t n = optiml_token_to_piece(s->model, tok, piece, sizeof(piece),
                                      prev >= 0 && prev == optiml_token_bos(s->model), false);
    size_t from = sl->gen_len;
    if (n > 0 && !slot_append_text(sl, piece, (size_t)n)) {
        sl->finish = SRV_FINISH_ERROR;
        return;
    }
    size_t safe;
    if (slot_check_stop(sl, from, &safe)) {
        sl->finish = SRV_FINISH_STOP;
        return;
    }
    if ((p->n_predict >= 0 && sl->n_gen >= p->n_predict) || sl->n_hist >= s->n_ctx_slot) {
        sl->finish = SRV_FINISH_LENGTH;
        return;
    }
    sl->pending = tok;
}

/* Publish what the step produced for the slot (mu held). */
static void slot_publish(srv_sched *s, srv_slot *sl) {
    srv_task *t = sl->task;
    if (sl->has_info) {
        task_append_token(t, &sl->info);
        sl->has_info = false;
        s->m.tokens_predicted++;
        if (!t->t_first_us) t->t_first_us = optiml_time_us();
    }
    if (sl->finish != SRV_FINISH_NONE) {
        if (sl->finish == SRV_FINISH_ERROR && !t->error[0]) snprintf(t->error, sizeof(t->error), "generation failed");
        slot_end(s, sl, sl->finish);
        return;
    }
    size_t safe;
    if (sl->gen_len > sl->gen_sent && !slot_check_stop(sl, sl->gen_len, &safe) && safe > sl->gen_sent) {
        task_append_text(t, sl->gen + sl->gen_sent, safe - sl->gen_sent);
        sl->gen_sent = safe;
    }
    pthread_cond_broadcast(&t->cv);
}

/* ---- the decode loop ------------------------------------------------------- */

/* Drop cancelled and timed-out tasks, start queued ones (mu held). Returns
 * the number of busy slots. */
static int sched_admit(srv_sched *s) {
    int64_t now = optiml_time_us();
    bool cancel_all = s->stopping && now >= s->cancel_at_us;
    for (int i = 0; i < s->n_slots; i++) {
        srv_slot *sl = &s->slots[i];
        if (!sl->task) continue;
        if (sl->task->cancelled || cancel_all)
            slot_end(s, sl, SRV_FINISH_CANCELLED);
        else if (sl->task->t_deadline_us && now >= sl->task->t_deadline_us)
            slot_end(s, sl, SRV_FINISH_TIMEOUT);
        else if (sl->finish != SRV_FINISH_NONE)
            slot_end(s, sl, sl->finish);
    }
    /* the queue: drop dead entries, start the rest while slots are free */
    srv_task **link = &s->q_head, *prev = NULL;
    while (*link) {
        srv_task *t = *link;
        srv_finish f = t->cancelled || s->stopping                   ? SRV_FINISH_CANCELLED
                       : t->t_deadline_us && now >= t->t_deadline_us ? SRV_FINISH_TIMEOUT
                                                                     : SRV_FINISH_NONE;
        srv_slot *sl = f == SRV_FINISH_NONE ? slot_pick(s, t) : NULL;
        if (f == SRV_FINISH_NONE && !sl) break; /* no free slot: keep FIFO order */
        *link = t->next;
        t->next = NULL;
        s->n_queued--;
        if (f != SRV_FINISH_NONE)
            task_finish(s, t, f);
        else {
            slot_start(s, sl, t);
            if (sl->finish != SRV_FINISH_NONE) slot_end(s, sl, sl->finish);
        }
    }
    for (srv_task *t = s->q_head; t; t = t->next) prev = t;
    s->q_tail = prev;
    int busy = 0;
    for (int i = 0; i < s->n_slots; i++) busy += s->slots[i].task != NULL;
    return busy;
}

static void batch_add(optiml_batch *b, optiml_token tok, int32_t pos, int32_t seq, bool logits) {
    b->token[b->n_tokens] = tok;
    b->pos[b->n_tokens] = pos;
    b->seq_id[b->n_tokens] = seq;
    b->logits[b->n_tokens] = logits;
    b->n_tokens++;
}

/* One decode step over every busy slot (mu not held; the slots' tasks stay
 * bound because only this thread unbinds them). */
static void sched_step(srv_sched *s, int first) {
    optiml_batch *b = &s->batch;
    b->n_tokens = 0;
    /* (a) one token per generating slot */
    for (int i = 0; i < s->n_slots; i++) {
        srv_slot *sl = &s->slots[i];
        if (!sl->task || !sl->generating || sl->pending < 0 || sl->finish != SRV_FINISH_NONE) continue;
        sl->i_batch = b->n_tokens;
        batch_add(b, sl->pending, sl->n_hist, sl->id, true);
        sl->hist[sl->n_hist++] = sl->pending;
        sl->pending = -1;
    }
    /* (b) prompt chunks, starting at a rotating slot for fairness */
    for (int k = 0; k < s->n_slots && b->n_tokens < s->n_batch; k++) {
        srv_slot *sl = &s->slots[(first + k) % s->n_slots];
        if (!sl->task || sl->generating || sl->finish != SRV_FINISH_NONE) continue;
        const srv_task *t = sl->task;
        while (sl->i_prompt < t->n_prompt && b->n_tokens < s->n_batch) {
            bool last = sl->i_prompt == t->n_prompt - 1;
            if (last) sl->i_batch = b->n_tokens;
            batch_add(b, t->prompt[sl->i_prompt], sl->n_hist, sl->id, last);
            sl->hist[sl->n_hist++] = t->prompt[sl->i_prompt++];
        }
    }
    if (b->n_tokens == 0) return;

    int64_t t0 = optiml_time_us();
    optiml_status st = optiml_decode(s->ctx, b);
    int64_t dt = optiml_time_us() - t0;
    if (st != OPTIML_OK) {
        /* the cache holds none of the batch: forget the slots' histories */
        const char *why = optiml_last_error();
        for (int i = 0; i < s->n_slots; i++) {
            srv_slot *sl = &s->slots[i];
            if (!sl->task || sl->finish != SRV_FINISH_NONE) continue;
            optiml_kv_seq_clear(s->ctx, sl->id);
            sl->n_hist = 0;
            sl->i_batch = -1;
            snprintf(sl->task->error, sizeof(sl->task->error), "decode failed: %s", why);
            sl->finish = SRV_FINISH_ERROR;
        }
        return;
    }
    for (int i = 0; i < s->n_slots; i++) {
        srv_slot *sl = &s->slots[i];
        if (!sl->task || sl->i_batch < 0) continue;
        if (!sl->generating) {
            sl->generating = true;
            if (sl->task->params.n_predict == 0) {
                sl->i_batch = -1;
                sl->finish = SRV_FINISH_LENGTH;
                continue;
            }
        }
        slot_sample(s, sl);
    }
    pthread_mutex_lock(&s->mu);
    s->m.decode_steps++;
    s->m.batch_tokens += (uint64_t)b->n_tokens;
    s->m.t_decode_us += dt;
    s->m.kv_tokens = 0;
    for (int i = 0; i < s->n_slots; i++) {
        if (s->slots[i].task) slot_publish(s, &s->slots[i]);
        s->m.kv_tokens += s->slots[i].n_hist;
    }
    pthread_mutex_unlock(&s->mu);
}

static void *sched_main(void *arg) {
    srv_sched *s = arg;
    int first = 0;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        int busy = sched_admit(s);
        if (busy == 0) {
            if (s->stopping && !s->q_head) break;
            /* wake at least every 100 ms to apply timeouts of queued tasks */
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 100000000L;
            if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
            pthread_cond_timedwait(&s->cv, &s->mu, &ts);
            continue;
        }
        pthread_mutex_unlock(&s->mu);
        sched_step(s, first);
        first = (first + 1) % s->n_slots;
        pthread_mutex_lock(&s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ---- start and stop ---------------------------------------------------------- */

static void sched_free(srv_sched *s) {
    for (int i = 0; s->slots && i < s->n_slots; i++) {
        optiml_sampler_free(s->slots[i].smpl);
        free(s->slots[i].hist);
        free(s->slots[i].gen);
    }
    free(s->slots);
    optiml_batch_free(s->batch);
    free(s->logits_tmp);
    free(s->probs);
    free(s->eog);
    optiml_context_free(s->ctx);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
}

srv_sched *srv_sched_start(const optiml_model *model, const srv_sched_params *params, char *err, size_t err_size) {
    srv_sched *s = calloc(1, sizeof(*s));
    if (!s) {
        snprintf(err, err_size, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->model = model;
    s->n_slots = params->n_parallel;
    s->queue_max = params->queue_max;
    s->timeout_s = params->timeout_s;
    s->n_vocab = optiml_model_n_vocab(model);

    optiml_context_params cp = optiml_context_default_params();
    cp.n_ctx = (uint32_t)(params->n_ctx > 0 ? params->n_ctx : optiml_model_n_ctx_train(model));
    cp.n_seq_max = (uint32_t)s->n_slots;
    cp.n_threads = params->n_threads;
    cp.n_batch = 512;
    if (cp.n_batch < (uint32_t)s->n_slots) cp.n_batch = (uint32_t)s->n_slots;
    if (optiml_context_init(model, &cp, &s->ctx) != OPTIML_OK) {
        snprintf(err, err_size, "%s", optiml_last_error());
        sched_free(s);
        return NULL;
    }
    int32_t n_ctx = (int32_t)optiml_context_n_ctx(s->ctx);
    s->n_batch = n_ctx < (int32_t)cp.n_batch ? n_ctx : (int32_t)cp.n_batch;
    s->n_ctx_slot = n_ctx / s->n_slots;
    if (s->n_ctx_slot > optiml_model_n_ctx_train(model)) s->n_ctx_slot = optiml_model_n_ctx_train(model);
    if (s->n_ctx_slot < 8 || s->n_batch < s->n_slots) {
        snprintf(err, err_size, "a context of %d cells is too small for %d slots", n_ctx, s->n_slots);
        sched_free(s);
        return NULL;
    }
    s->batch = optiml_batch_init(s->n_batch);
    s->slots = calloc((size_t)s->n_slots, sizeof(*s->slots));
    s->logits_tmp = malloc((size_t)s->n_vocab * sizeof(float));
    s->probs = malloc((size_t)s->n_vocab * sizeof(float));
    s->eog = malloc((size_t)s->n_vocab * sizeof(optiml_token));
    bool ok = s->batch.token && s->slots && s->logits_tmp && s->probs && s->eog;
    for (int i = 0; ok && i < s->n_slots; i++) {
        s->slots[i].id = i;
        s->slots[i].pending = -1;
        s->slots[i].i_batch = -1;
        ok = (s->slots[i].hist = malloc((size_t)s->n_ctx_slot * sizeof(optiml_token))) != NULL;
    }
    if (!ok) {
        snprintf(err, err_size, "out of memory");
        sched_free(s);
        return NULL;
    }
    for (optiml_token t = 0; t < s->n_vocab; t++)
        if (optiml_token_is_eog(model, t)) s->eog[s->n_eog++] = t;
    if (pthread_create(&s->thread, NULL, sched_main, s) != 0) {
        snprintf(err, err_size, "cannot start the scheduler thread");
        sched_free(s);
        return NULL;
    }
    s->thread_started = true;
    return s;
}

void srv_sched_shutdown(srv_sched *s, double grace_s) {
    pthread_mutex_lock(&s->mu);
    s->stopping = true;
    s->cancel_at_us = optiml_time_us() + (int64_t)(grace_s * 1e6);
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (s->thread_started) pthread_join(s->thread, NULL);
    s->thread_started = false;
}

void srv_sched_free(srv_sched *s) {
    if (!s) return;
    if (s->thread_started) srv_sched_shutdown(s, 0);
    sched_free(s);
}
