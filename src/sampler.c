/*
 * sampler.c - token sampling: repetition penalty, then top-k, top-p and
 * min-p on the softmax of the logits, then temperature and a draw from the
 * remaining distribution (llama.cpp's order, so the same settings pick from
 * the same candidates). temp <= 0 is greedy: the first largest logit.
 *
 * The random generator is splitmix64-seeded xoshiro256**: the same seed
 * gives the same draws on every platform. All buffers are allocated in
 * optiml_sampler_init.
 */
#include "common.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct candidate {
    int32_t id;
    float logit;
    float p;
};

struct optiml_sampler {
    optiml_sampler_params params;
    int32_t n_vocab;
    struct candidate *cand; /* (n_vocab) */
    int32_t *history;       /* (repeat_last_n) ring of accepted tokens */
    int32_t n_history;
    int32_t history_head;
    uint64_t rng[4];
};

/* ---- random numbers ------------------------------------------------------ */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_next(uint64_t s[4]) {
    uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

/* Uniform in [0, 1). */
static double rng_uniform(uint64_t s[4]) { return (double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0); }

/* ---- life cycle ------------------------------------------------------------ */

optiml_sampler_params optiml_sampler_default_params(void) {
    return (optiml_sampler_params){.temp = 0.8f, .top_k = 40, .top_p = 0.95f, .min_p = 0.05f,
                                   .repeat_penalty = 1.0f, .repeat_last_n = 64, .seed = 0};
}

optiml_sampler *optiml_sampler_init(const optiml_sampler_params *params, int32_t n_vocab) {
    if (!params || n_vocab <= 0 || params->repeat_last_n < 0 || params->repeat_last_n > (1 << 20) ||
        !(params->repeat_penalty > 0.0f) || isnan(params->temp) || isnan(params->top_p) || isnan(params->min_p)) {
        optiml_fail(OPTIML_ERR_INVALID_ARG, "sampler: invalid parameters (n_vocab %d, repeat_last_n %d, "
                    "repeat_penalty %g)", n_vocab, params ? params->repeat_last_n : 0,
                    params ? params->repeat_penalty : 0.0);
        return NULL;
    }
    optiml_sampler *s = calloc(1, sizeof(*s));
    if (!s) goto oom;
    s->params = *params;
    s->n_vocab = n_vocab;
    s->cand = malloc((size_t)n_vocab * sizeof(*s->cand));
    s->history = malloc(((size_t)params->repeat_last_n + 1) * sizeof(*s->history));
    if (!s->cand || !s->history) goto oom;
    optiml_sampler_reset(s);
    return s;
oom:
    optiml_sampler_free(s);
    optiml_fail(OPTIML_ERR_NOMEM, "sampler: out of memory");
    return NULL;
}

void optiml_sampler_free(optiml_sampler *s) {
    if (!s) return;
    free(s->cand);
    free(s->history);
    free(s);
}

void optiml_sampler_reset(optiml_sampler *s) {
    s->n_history = 0;
    s->history_head = 0;
    uint64_t x = s->params.seed;
    for (int i = 0; i < 4; i++) s->rng[i] = splitmix64(&x);
}

void optiml_sampler_accept(optiml_sampler *s, optiml_token token) {
    int32_t cap = s->params.repeat_last_n;
    if (cap == 0) return;
    s->history[s->history_head] = token;
    s->history_head = (s->history_head + 1) % cap;
    if (s->n_history < cap) s->n_history++;
}

/* ---- the chain ----------------------------------------------------------- */

static int cmp_logit_desc(const void *a, const void *b) {
    const struct candidate *x = a, *y = b;
    if (x->logit != y->logit) return x->logit < y->logit ? 1 : -1;
    return x->id - y->id;
}

/* Reorder c[0..n) so that its k best (cmp_logit_desc order) come first,
 * in any order: quickselect, O(n) expected. */
static void select_top_k(struct candidate *c, int32_t n, int32_t k) {
    int32_t lo = 0, hi = n - 1;
    while (lo < hi) {
        struct candidate pivot = c[lo + (hi - lo) / 2];
        int32_t i = lo, j = hi;
        while (i <= j) {
            while (cmp_logit_desc(&c[i], &pivot) < 0) i++;
            while (cmp_logit_desc(&c[j], &pivot) > 0) j--;
            if (i <= j) {
                struct candidate t = c[i];
                c[i++] = c[j];
                c[j--] = t;
            }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else return;
    }
}

/* Penalize each distinct token of the history once (llama.cpp's rule:
 * divide positive logits, multiply negative ones). */
static void apply_repeat_penalty(optiml_sampler *s) {
    float pen = s->params.repeat_penalty;
    if (pen == 1.0f) return;
    for (int32_t i = 0; i < s->n_history; i++) {
        int32_t t = s->history[i];
        if (t < 0 || t >= s->n_vocab) continue;
        bool seen = false;
        for (int32_t j = 0; j < i && !seen; j++) seen = s->history[j] == t;
        if (seen) continue;
        struct candidate *c = &s->cand[t];
        c->logit = c->logit > 0.0f ? c->logit / pen : c->logit * pen;
    }
}

/* Softmax of logit / temp over the first n candidates (sorted descending). */
static void softmax_cand(struct candidate *c, int32_t n, float temp) {
    float mx = c[0].logit;
    double sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        c[i].p = expf((c[i].logit - mx) / temp);
        sum += c[i].p;
    }
    for (int32_t i = 0; i < n; i++) c[i].p = (float)(c[i].p / sum);
}

optiml_token optiml_sampler_sample(optiml_sampler *s, const float *logits) {
    const optiml_sampler_params *p = &s->params;
    for (int32_t i = 0; i < s->n_vocab; i++) s->cand[i] = (struct candidate){i, logits[i], 0.0f};
    apply_repeat_penalty(s);

    if (p->temp <= 0.0f) {
        int32_t best = 0;
        for (int32_t i = 1; i < s->n_vocab; i++)
            if (s->cand[i].logit > s->cand[best].logit) best = i;
        return best;
    }

    int32_t n = s->n_vocab;
    if (p->top_k > 0 && p->top_k < n) {
        select_top_k(s->cand, n, p->top_k);
        n = p->top_k;
    }
    qsort(s->cand, (size_t)n, sizeof(*s->cand), cmp_logit_desc);

    softmax_cand(s->cand, n, 1.0f);
    if (p->top_p < 1.0f) {
        double cum = 0.0;
        for (int32_t i = 0; i < n; i++) {
            cum += s->cand[i].p;
            if (cum >= p->top_p) {
                n = i + 1;
                break;
            }
        }
    }
    if (p->min_p > 0.0f) {
        float floor_p = s->cand[0].p * p->min_p;
        int32_t keep = 1;
        while (keep < n && s->cand[keep].p >= floor_p) keep++;
        n = keep;
    }

    softmax_cand(s->cand, n, p->temp);
    double r = rng_uniform(s->rng), cum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        cum += s->cand[i].p;
        if (r < cum) return s->cand[i].id;
    }
    return s->cand[n - 1].id;
}
