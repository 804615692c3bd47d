/*
 * optiml-train-predictor - train each layer's activation predictor from the
 * samples of `optiml-profile --dump-samples` and write the predictors into
 * a copy of the model.
 *
 *   optiml-train-predictor -m M.gguf --samples FILE -o OUT.gguf
 *       [--rank R | --rank-per-layer [--rank R]] [--recall 0.99]
 *       [--recall-of mass|count] [--epochs 10] [--batch 256] [--lr 3e-3]
 *       [--pos-weight 3] [--holdout-every 10] [--type f16|f32|q8_0] [-t N]
 *       [--seed 1] [--force]
 *
 * The predictor of a layer (docs/FORMAT.md) is a low-rank MLP on the FFN's
 * normed input x (n_embd): logits = relu(x fc1^T) fc2^T, fc1 (r, n_embd),
 * fc2 (n_ff, r), no biases; neuron j is predicted active iff
 * logit_j > optiml.sparse.layer_threshold[layer].
 *
 * Data. Sample i of the file (every layer has the same samples) is held out
 * iff i % K == K - 1 (K = --holdout-every, default 10: every tenth sample,
 * spread over the whole text); the rest is the training set.
 *
 * Loss: binary cross-entropy on the logits with the positives weighted,
 *   L = mean over tokens and neurons of
 *       w_pos * y * softplus(-z) + (1 - y) * softplus(z)
 * (y = 1 iff the neuron was active, z the logit, w_pos = --pos-weight,
 * default 3 > 1: a missed active neuron costs more than a false alarm, the
 * recall-favouring choice). Adam (beta 0.9, 0.999, eps 1e-8) on minibatches
 * of --batch training samples, reshuffled every epoch; fc1 starts uniform in
 * +-sqrt(6 / n_embd), fc2 in +-sqrt(3 / r). The random numbers come from
 * --seed and the layer, and every output element of the threaded matrix
 * products is one thread's dot product, so the weights do not depend on -t.
 *
 * Threshold. After training the weights are rounded to the output type
 * (--type, default f16; q8_0 halves the bytes the predictor reads per
 * token, its rows of n_embd and r values in 32-value blocks) and the
 * held-out logits computed with them. The
 * threshold is the largest one whose recall on the held-out samples reaches
 * --recall (default 0.99), where recall is
 *   mass:  sum of |h_j| over active neurons predicted active
 *          / sum of |h_j| over active neurons   (the default when the
 *          samples carry |h|, i.e. were not dumped with --no-mag)
 *   count: active neurons predicted active / active neurons
 * Among the thresholds that give the same predicted set on the held-out
 * data, the midpoint between the two neighbouring logits is taken, which
 * leaves a margin for unseen tokens.
 *
 * Output, per layer on standard output (held-out samples, at the threshold):
 *   layer L rank r threshold t loss l recall R recall_count Rc
 *         precision P pred_sparsity S sparsity S0
 * (recall in the chosen measure, recall_count always by count, precision =
 * predicted active and active / predicted active, pred_sparsity = share of
 * neurons predicted inactive, sparsity = share actually inactive, loss = the
 * last epoch's training loss), then a "model" line of the means. Progress
 * per epoch on standard error, with the held-out loss and recall and
 * precision at logit > 0.
 *
 * Rank: --rank R (default n_embd / 8, in [16, 1024], a multiple of 8; of 32
 * for q8_0). --rank-per-layer scales it by each layer's share of active
 * neurons against the mean over layers (clamped to 0.5x..2x, then the
 * nearest multiple of 8 (32 for q8_0), at least that multiple): a denser layer has more to predict
 * (PowerInfer sizes its predictors by sparsity likewise).
 *
 * The output GGUF is the input (every key and tensor, except existing
 * blk.N.fc1/fc2.weight, which are replaced) plus blk.N.fc1.weight
 * (ne0 = n_embd, ne1 = r), blk.N.fc2.weight (ne0 = r, ne1 = n_ff),
 * optiml.sparse.layer_threshold (f32[n_layer]), optiml.sparse.version (1),
 * optiml.sparse.weights_hash, and optiml.sparse.act_threshold when the
 * samples used a threshold other than the model's. The samples must come
 * from the same FFN weights (hash in the sample header) unless --force.
 */
#define _POSIX_C_SOURCE 200809L
#include "common.h"
#include "cpu/ops.h"
#include "dtype.h"
#include "gguf.h"
#include "parse_num.h"
#include "quant.h"
#include "sparse_util.h"
#include "threadpool.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct opts {
    const char *model, *samples, *out;
    long rank, epochs, batch, holdout_every, n_threads;
    bool rank_per_layer, force, recall_count;
    int recall_of_set;
    double recall, lr, pos_weight;
    uint32_t type;
    uint64_t seed;
};

/* ---- options ------------------------------------------------------------ */

static const char usage[] =
    "usage: optiml-train-predictor -m M.gguf --samples FILE -o OUT.gguf [--rank R | --rank-per-layer]\n"
    "       [--recall 0.99] [--recall-of mass|count] [--epochs 10] [--batch 256] [--lr 3e-3]\n"
    "       [--pos-weight 3] [--holdout-every 10] [--type f16|f32|q8_0] [-t N] [--seed 1] [--force]\n";

static int die(const char *what, const char *detail) {
    fprintf(stderr, "optiml-train-predictor: %s%s\n", what, detail ? detail : "");
    return 1;
}

static int parse_args(int argc, char **argv, struct opts *o) {
    *o = (struct opts){.epochs = 10, .batch = 256, .holdout_every = 10, .recall = 0.99, .lr = 3e-3,
                       .pos_weight = 3.0, .type = DTYPE_F16, .seed = 1};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("%s", usage);
            exit(0);
        }
        if (!strcmp(a, "--rank-per-layer")) {
            o->rank_per_layer = true;
            continue;
        }
        if (!strcmp(a, "--force")) {
            o->force = true;
            continue;
        }
        if (i + 1 >= argc) return die("unknown option or missing value: ", a);
        const char *v = argv[++i];
        double d = 0;
        bool ok = true;
        if (!strcmp(a, "-m") || !strcmp(a, "--model")) o->model = v;
        else if (!strcmp(a, "--samples")) o->samples = v;
        else if (!strcmp(a, "-o") || !strcmp(a, "--output")) o->out = v;
        else if (!strcmp(a, "--rank")) ok = tool_parse_double(v, 1, 1 << 16, &d), o->rank = (long)d;
        else if (!strcmp(a, "--epochs")) ok = tool_parse_double(v, 1, 1e6, &d), o->epochs = (long)d;
        else if (!strcmp(a, "--batch")) ok = tool_parse_double(v, 1, 1 << 16, &d), o->batch = (long)d;
        else if (!strcmp(a, "--holdout-every")) ok = tool_parse_double(v, 2, 1e9, &d), o->holdout_every = (long)d;
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) ok = tool_parse_double(v, 1, 1024, &d), o->n_threads = (long)d;
        else if (!strcmp(a, "--seed")) ok = tool_parse_double(v, 0, 1e15, &d), o->seed = (uint64_t)d;
        else if (!strcmp(a, "--recall")) ok = tool_parse_double(v, 0, 1, &d), o->recall = d;
        else if (!strcmp(a, "--lr")) ok = tool_parse_double(v, 1e-9, 10, &d), o->lr = d;
        else if (!strcmp(a, "--pos-weight")) ok = tool_parse_double(v, 1e-3, 1e6, &d), o->pos_weight = d;
        else if (!strcmp(a, "--recall-of")) {
            ok = !strcmp(v, "mass") || !strcmp(v, "count");
            o->recall_count = !strcmp(v, "count");
            o->recall_of_set = 1;
        } else if (!strcmp(a, "--type")) {
            ok = !strcmp(v, "f16") || !strcmp(v, "f32") || !strcmp(v, "q8_0");
            o->type = !strcmp(v, "f32") ? DTYPE_F32 : !strcmp(v, "q8_0") ? DTYPE_Q8_0 : DTYPE_F16;
        } else return die("unknown option: ", a);
        if (!ok) return die("invalid value for ", a);
    }
    if (!o->model || !o->samples || !o->out) return die("-m MODEL, --samples FILE and -o OUT are required\n", usage);
    if (o->n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        o->n_threads = n > 0 ? n : 1;
    }
    return 0;
}

/* ---- random numbers ----------------------------------------------------- */

static uint64_t rng_next(uint64_t *s) { /* splitmix64 */
    uint64_t x = (*s += 0x9e3779b97f4a7c15ull);
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}
static float rng_uniform(uint64_t *s, float a) { /* in [-a, a) */
    return ((float)(rng_next(s) >> 40) / 8388608.0f - 1.0f) * a;
}

/* ---- threaded kernels ------------------------------------------------- */

static struct threadpool *g_pool;
static const struct cpu_kernels *g_kern;

/* C (m, n) = A (m, k) . B (n, k)^T: every C element is one f32 dot
 * product. The threads split the larger of m and n; rows of A are taken in
 * blocks that stay in cache while the rows of B stream past. */
struct gemm_job {
    const float *a, *b;
    float *c;
    int64_t m, n, k;
};

static void gemm_run(void *arg, int ith, int nth) {
    const struct gemm_job *g = arg;
    int64_t i0 = 0, i1 = g->m, j0 = 0, j1 = g->n;
    if (g->m >= g->n) threadpool_split(g->m, ith, nth, &i0, &i1);
    else threadpool_split(g->n, ith, nth, &j0, &j1);
    int64_t blk = 32768 / (g->k > 0 ? g->k : 1);
    if (blk < 4) blk = 4;
    for (int64_t ib = i0; ib < i1; ib += blk) {
        const int64_t ie = ib + blk < i1 ? ib + blk : i1;
        for (int64_t j = j0; j < j1; j++) {
            const float *bj = g->b + j * g->k;
            for (int64_t i = ib; i < ie; i++) g->c[i * g->n + j] = g_kern->dot[DTYPE_F32](g->k, bj, g->a + i * g->k);
        }
    }
}

static void gemm_nt(const float *a, const float *b, float *c, int64_t m, int64_t n, int64_t k) {
    struct gemm_job g = {a, b, c, m, n, k};
    threadpool_run(g_pool, gemm_run, &g);
}

/* dst (n, m) = src (m, n)^T */
static void transpose(const float *src, float *dst, int64_t m, int64_t n) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) dst[j * m + i] = src[i * n + j];
}

struct adam_job {
    float *p, *m, *v;
    const float *g;
    int64_t n;
    float lr, c1, c2; /* c1, c2: bias corrections 1 - beta^t */
};

static void adam_run(void *arg, int ith, int nth) {
    const struct adam_job *a = arg;
    int64_t i0, i1;
    threadpool_split(a->n, ith, nth, &i0, &i1);
    for (int64_t i = i0; i < i1; i++) {
        a->m[i] = 0.9f * a->m[i] + 0.1f * a->g[i];
        a->v[i] = 0.999f * a->v[i] + 0.001f * a->g[i] * a->g[i];
        a->p[i] -= a->lr * (a->m[i] / a->c1) / (sqrtf(a->v[i] / a->c2) + 1e-8f);
    }
}

/* Weighted BCE over (rows, n_ff) logits z against targets y: the gradient
 * dz = dL/dz in place of z, the loss sum per thread in part[ith]. */
struct bce_job {
    float *z;
    const float *y;
    int64_t rows, n_ff;
    float w_pos, scale; /* scale: 1 / (rows * n_ff) */
    bool grad;
    double *part;
};

static float softplus(float x) { return x > 0 ? x + log1pf(expf(-x)) : log1pf(expf(x)); }

static void bce_run(void *arg, int ith, int nth) {
    const struct bce_job *b = arg;
    int64_t i0, i1;
    threadpool_split(b->rows * b->n_ff, ith, nth, &i0, &i1);
    double sum = 0;
    for (int64_t i = i0; i < i1; i++) {
        const float z = b->z[i], y = b->y[i];
        sum += y > 0 ? b->w_pos * softplus(-z) : softplus(z);
        if (b->grad) {
            const float s = 1.0f / (1.0f + expf(-z));
            b->z[i] = (y > 0 ? b->w_pos * (s - 1.0f) : s) * b->scale;
        }
    }
    b->part[ith] = sum;
}

/* ---- one layer's data --------------------------------------------------- */

struct layer_data {
    int64_t n;        /* samples                                    */
    float *x;         /* (n, n_embd)                                */
    uint8_t *mask;    /* (n, mask_bytes)                            */
    float *mag;       /* (n, n_ff) |h|, or NULL: count recall only  */
};

static void layer_data_free(struct layer_data *d) {
    free(d->x);
    free(d->mask);
    free(d->mag);
    *d = (struct layer_data){0};
}

static bool mask_bit(const uint8_t *m, int64_t j) { return (m[j >> 3] >> (j & 7)) & 1; }

/* Read layer il's records (contiguous in the file). */
static int layer_data_read(int fd, const struct samples_header *h, uint32_t il, struct layer_data *d) {
    const struct samples_layout lay = samples_layout(h->n_embd, h->n_ff, h->flags);
    const uint64_t n = h->n_samples, rec = lay.record_bytes;
    uint8_t *buf = malloc(rec);
    d->n = (int64_t)n;
    d->x = malloc(n * h->n_embd * sizeof(float));
    d->mask = malloc(n * lay.mask_bytes);
    d->mag = h->flags & SAMPLES_HAS_MAG ? malloc(n * h->n_ff * sizeof(float)) : NULL;
    if (!buf || !d->x || !d->mask || (h->flags & SAMPLES_HAS_MAG && !d->mag)) {
        free(buf);
        return die("out of memory for the samples", NULL);
    }
    for (uint64_t s = 0; s < n; s++) {
        off_t off = (off_t)(SAMPLES_HEADER_BYTES + ((uint64_t)il * n + s) * rec);
        if (pread(fd, buf, rec, off) != (ssize_t)rec) {
            free(buf);
            return die("the sample file is truncated", NULL);
        }
        memcpy(d->x + s * h->n_embd, buf + lay.off_x, 4ull * h->n_embd);
        memcpy(d->mask + s * lay.mask_bytes, buf + lay.off_mask, lay.mask_bytes);
        for (uint64_t j = 0; d->mag && j < h->n_ff; j++) {
            f16_t m;
            memcpy(&m, buf + lay.off_mag + 2 * j, 2);
            d->mag[s * h->n_ff + j] = f16_to_f32(m);
        }
    }
    free(buf);
    return 0;
}

/* Share of (sample, neuron) pairs that are active, from the masks alone. */
static double layer_density(int fd, const struct samples_header *h, uint32_t il) {
    const struct samples_layout lay = samples_layout(h->n_embd, h->n_ff, h->flags);
    uint8_t *m = malloc(lay.mask_bytes);
    uint64_t on = 0;
    for (uint64_t s = 0; m && s < h->n_samples; s++) {
        off_t off = (off_t)(SAMPLES_HEADER_BYTES + ((uint64_t)il * h->n_samples + s) * lay.record_bytes +
                            lay.off_mask);
        if (pread(fd, m, lay.mask_bytes, off) != (ssize_t)lay.mask_bytes) break;
        for (uint64_t b = 0; b < lay.mask_bytes; b++) on += (uint64_t)__builtin_popcount(m[b]);
    }
    free(m);
    return (double)on / ((double)h->n_samples * h->n_ff);
}

/* ---- the model being trained --------------------------------------------- */

struct mlp {
    int64_t e, r, f; /* n_embd, rank, n_ff                  */
    float *w1;       /* (r, e)  fc1                         */
    float *w2;       /* (f, r)  fc2                         */
};

/* Scratch for minibatches of up to nb rows, and the Adam state. */
struct trainer {
    struct mlp p;
    int64_t nb;
    float *xb, *xt, *hp, *h, *ht, *z, *y, *zt, *w2t, *dh, *dht; /* activations and gradients */
    float *g1, *g2, *m1, *v1, *m2, *v2;                         /* gradients, Adam moments    */
    double *part;
    int64_t step;
};

static int trainer_init(struct trainer *t, int64_t e, int64_t r, int64_t f, int64_t nb, int nth) {
    *t = (struct trainer){.p = {e, r, f}, .nb = nb};
    float **bufs[] = {&t->p.w1, &t->g1, &t->m1, &t->v1, &t->p.w2, &t->g2, &t->m2, &t->v2, &t->w2t,
                      &t->xb, &t->xt, &t->hp, &t->h, &t->ht, &t->dh, &t->dht, &t->z, &t->y, &t->zt};
    const int64_t sizes[] = {r * e, r * e, r * e, r * e, f * r, f * r, f * r, f * r, f * r,
                             nb * e, nb * e, nb * r, nb * r, nb * r, nb * r, nb * r, nb * f, nb * f, nb * f};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
        if (!(*bufs[i] = calloc((size_t)sizes[i], sizeof(float)))) return die("out of memory", NULL);
    if (!(t->part = calloc((size_t)nth, sizeof(double)))) return die("out of memory", NULL);
    return 0;
}

static void trainer_free(struct trainer *t) {
    float *bufs[] = {t->p.w1, t->g1, t->m1, t->v1, t->p.w2, t->g2, t->m2, t->v2, t->w2t, t->xb,
                     t->xt, t->hp, t->h, t->ht, t->dh, t->dht, t->z, t->y, t->zt};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) free(bufs[i]);
    free(t->part);
}

/* z (n, f) = relu(x fc1^T) fc2^T; t->hp, t->h keep the hidden layer. */
static void mlp_forward(struct trainer *t, const float *x, int64_t n) {
    const struct mlp *p = &t->p;
    gemm_nt(x, p->w1, t->hp, n, p->r, p->e);
    for (int64_t i = 0; i < n * p->r; i++) t->h[i] = t->hp[i] > 0 ? t->hp[i] : 0;
    gemm_nt(t->h, p->w2, t->z, n, p->f, p->r);
}

/* Loss of logits t->z against t->y over n rows; with grad, t->z becomes dz. */
static double bce(struct trainer *t, int64_t n, float w_pos, bool grad) {
    int nth = threadpool_n_threads(g_pool);
    struct bce_job b = {t->z, t->y, n, t->p.f, w_pos, 1.0f / (float)(n * t->p.f), grad, t->part};
    threadpool_run(g_pool, bce_run, &b);
    double s = 0;
    for (int i = 0; i < nth; i++) s += t->part[i];
    return s / (double)(n * t->p.f);
}

static void adam(float *p, const float *g, float *m, float *v, int64_t n, float lr, int64_t step) {
    struct adam_job a = {p, m, v, g, n, lr, 1.0f - powf(0.9f, (float)step), 1.0f - powf(0.999f, (float)step)};
    threadpool_run(g_pool, adam_run, &a);
}

/* One Adam step on the n rows in t->xb / t->y; returns the loss. */
static double train_step(struct trainer *t, int64_t n, const struct opts *o) {
    const struct mlp *p = &t->p;
    mlp_forward(t, t->xb, n);
    double loss = bce(t, n, (float)o->pos_weight, true); /* t->z = dz (n, f) */
    /* g2 (f, r) = dz^T h */
    transpose(t->z, t->zt, n, p->f);
    transpose(t->h, t->ht, n, p->r);
    gemm_nt(t->zt, t->ht, t->g2, p->f, p->r, n);
    /* dh (n, r) = dz w2, through the ReLU */
    transpose(p->w2, t->w2t, p->f, p->r);
    gemm_nt(t->z, t->w2t, t->dh, n, p->r, p->f);
    for (int64_t i = 0; i < n * p->r; i++) t->dh[i] = t->hp[i] > 0 ? t->dh[i] : 0;
    /* g1 (r, e) = dh^T x */
    transpose(t->dh, t->dht, n, p->r);
    transpose(t->xb, t->xt, n, p->e);
    gemm_nt(t->dht, t->xt, t->g1, p->r, p->e, n);
    t->step++;
    adam(p->w1, t->g1, t->m1, t->v1, p->r * p->e, (float)o->lr, t->step);
    adam(p->w2, t->g2, t->m2, t->v2, p->f * p->r, (float)o->lr, t->step);
    return loss;
}

/* Targets of sample s into y (n_ff). */
static void targets(const struct layer_data *d, int64_t s, int64_t n_ff, int64_t mask_bytes, float *y) {
    const uint8_t *m = d->mask + s * mask_bytes;
    for (int64_t j = 0; j < n_ff; j++) y[j] = mask_bit(m, j) ? 1.0f : 0.0f;
}

/* Logits of the samples idx[0..n) into out (n, f), in minibatches. */
static void predict(struct trainer *t, const struct layer_data *d, const int64_t *idx, int64_t n, float *out) {
    const struct mlp *p = &t->p;
    for (int64_t b0 = 0; b0 < n; b0 += t->nb) {
        int64_t nb = n - b0 < t->nb ? n - b0 : t->nb;
        for (int64_t i = 0; i < nb; i++) memcpy(t->xb + i * p->e, d->x + idx[b0 + i] * p->e, 4 * p->e);
        mlp_forward(t, t->xb, nb);
        memcpy(out + b0 * p->f, t->z, (size_t)(nb * p->f) * sizeof(float));
    }
}

/* ---- evaluation and the threshold -------------------------------------- */

struct metrics {
    double recall, recall_count, precision, pred_sparsity, sparsity;
};

/* Metrics of logits (n, f) of the samples idx at threshold thr. */
static struct metrics evaluate(const struct layer_data *d, const int64_t *idx, int64_t n, int64_t f,
                               int64_t mask_bytes, const float *logits, float thr, bool by_count) {
    double mass = 0, mass_hit = 0;
    uint64_t act = 0, pred = 0, hit = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *m = d->mask + idx[i] * mask_bytes;
        for (int64_t j = 0; j < f; j++) {
            const bool a = mask_bit(m, j), p = logits[i * f + j] > thr;
            const double w = by_count ? 1.0 : d->mag[idx[i] * f + j];
            act += a, pred += p, hit += a && p;
            if (a) mass += w, mass_hit += p ? w : 0;
        }
    }
    const double all = (double)n * (double)f;
    return (struct metrics){mass > 0 ? mass_hit / mass : 1.0, act ? (double)hit / (double)act : 1.0,
                            pred ? (double)hit / (double)pred : 1.0, 1.0 - (double)pred / all,
                            1.0 - (double)act / all};
}

struct scored {
    float logit, w;
};

static int cmp_scored(const void *a, const void *b) {
    float x = ((const struct scored *)a)->logit, y = ((const struct scored *)b)->logit;
    return x < y ? -1 : x > y;
}

/* The largest threshold whose recall (mass or count) reaches target: the
 * active neurons sorted by logit, drop the lowest while the dropped weight
 * stays within (1 - target) of the total, never splitting equal logits. */
static float pick_threshold(const struct layer_data *d, const int64_t *idx, int64_t n, int64_t f,
                            int64_t mask_bytes, const float *logits, double target, bool by_count) {
    uint64_t n_act = 0;
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < f; j++) n_act += mask_bit(d->mask + idx[i] * mask_bytes, j);
    struct scored *s = malloc((n_act ? n_act : 1) * sizeof(*s));
    if (!s) return -INFINITY; /* everything predicted active: recall 1 */
    uint64_t k = 0;
    double total = 0;
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < f; j++)
            if (mask_bit(d->mask + idx[i] * mask_bytes, j)) {
                s[k].logit = logits[i * f + j];
                s[k].w = by_count ? 1.0f : d->mag[idx[i] * f + j];
                total += s[k++].w;
            }
    qsort(s, n_act, sizeof(*s), cmp_scored);
    const double budget = (1.0 - target) * total;
    double dropped = 0;
    uint64_t cut = 0; /* entries [0, cut) predicted inactive */
    for (uint64_t i = 0; i < n_act;) {
        uint64_t e = i; /* the run of equal logits starting at i */
        double w = 0;
        while (e < n_act && s[e].logit == s[i].logit) w += s[e++].w;
        if (dropped + w > budget) break;
        dropped += w;
        cut = i = e;
    }
    float thr;
    if (n_act == 0) thr = 0.0f;
    else if (cut == 0) thr = nextafterf(s[0].logit, -INFINITY);
    else if (cut == n_act) thr = s[n_act - 1].logit;
    else {
        const float lo = s[cut - 1].logit, hi = s[cut].logit, mid = lo + 0.5f * (hi - lo);
        thr = mid < hi ? mid : lo;
    }
    free(s);
    return thr;
}

/* ---- training a layer --------------------------------------------------- */

static void init_weights(struct mlp *p, uint64_t seed) {
    const float a1 = sqrtf(6.0f / (float)p->e), a2 = sqrtf(3.0f / (float)p->r);
    for (int64_t i = 0; i < p->r * p->e; i++) p->w1[i] = rng_uniform(&seed, a1);
    for (int64_t i = 0; i < p->f * p->r; i++) p->w2[i] = rng_uniform(&seed, a2);
}

/* Weights as they will be stored (f16 or q8_0 rounding of rows of n_in
 * values), in place; false when out of memory. */
static bool round_to_type(float *w, int64_t n, int64_t n_in, uint32_t type) {
    if (type == DTYPE_F16)
        for (int64_t i = 0; i < n; i++) w[i] = f16_to_f32(f32_to_f16(w[i]));
    if (type != DTYPE_Q8_0) return true;
    block_q8_0 *q = malloc((size_t)(n_in / QK8_0) * sizeof(block_q8_0));
    if (!q) return false;
    for (int64_t r = 0; r < n / n_in; r++) {
        quant_quantizer(DTYPE_Q8_0)(n_in, w + r * n_in, q);
        quant_dequantizer(DTYPE_Q8_0)(n_in, q, w + r * n_in);
    }
    free(q);
    return true;
}

struct layer_result {
    int64_t rank;
    float thr;
    double loss;
    struct metrics m;
};

static void shuffle(int64_t *a, int64_t n, uint64_t *rng) {
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = (int64_t)(rng_next(rng) % (uint64_t)(i + 1));
        int64_t tmp = a[i];
        a[i] = a[j];
        a[j] = tmp;
    }
}

static int train_layer(struct trainer *t, const struct layer_data *d, uint32_t il, uint32_t n_layer,
                       int64_t mask_bytes, const struct opts *o, bool by_count, struct layer_result *res,
                       double work_done, double work_total) {
    struct mlp *p = &t->p;
    const int64_t k = o->holdout_every;
    int64_t n_hold = 0, n_train = 0;
    int64_t *train = malloc((size_t)d->n * sizeof(int64_t)), *hold = malloc((size_t)d->n * sizeof(int64_t));
    float *logits = NULL;
    for (int64_t s = 0; train && hold && s < d->n; s++) {
        if (s % k == k - 1) hold[n_hold++] = s;
        else train[n_train++] = s;
    }
    if (!train || !hold || n_train == 0 || n_hold == 0 ||
        !(logits = malloc((size_t)(n_hold * p->f) * sizeof(float)))) {
        free(train), free(hold);
        return die(train && hold ? "too few samples: need a training and a held-out sample per layer"
                                 : "out of memory", NULL);
    }
    uint64_t rng = o->seed * 0x9e3779b97f4a7c15ull + il + 1;
    init_weights(p, rng_next(&rng));
    double loss = 0;
    for (long ep = 0; ep < o->epochs; ep++) {
        shuffle(train, n_train, &rng);
        double sum = 0;
        for (int64_t b0 = 0; b0 < n_train; b0 += t->nb) {
            const int64_t nb = n_train - b0 < t->nb ? n_train - b0 : t->nb;
            for (int64_t i = 0; i < nb; i++) {
                memcpy(t->xb + i * p->e, d->x + train[b0 + i] * p->e, 4 * p->e);
                targets(d, train[b0 + i], p->f, mask_bytes, t->y + i * p->f);
            }
            sum += train_step(t, nb, o) * (double)nb;
        }
        loss = sum / (double)n_train;
        /* held-out loss, recall and precision at logit > 0 */
        predict(t, d, hold, n_hold, logits);
        double hold_loss = 0;
        for (int64_t b0 = 0; b0 < n_hold; b0 += t->nb) {
            const int64_t nb = n_hold - b0 < t->nb ? n_hold - b0 : t->nb;
            memcpy(t->z, logits + b0 * p->f, (size_t)(nb * p->f) * sizeof(float));
            for (int64_t i = 0; i < nb; i++) targets(d, hold[b0 + i], p->f, mask_bytes, t->y + i * p->f);
            hold_loss += bce(t, nb, (float)o->pos_weight, false) * (double)nb;
        }
        struct metrics m = evaluate(d, hold, n_hold, p->f, mask_bytes, logits, 0.0f, by_count);
        const double done = work_done + (double)(ep + 1) / (double)o->epochs * (double)(p->r);
        const double secs = util_seconds(); /* since the start */
        fprintf(stderr,
                "layer %u/%u epoch %ld/%ld: loss %.5f, held-out loss %.5f, recall %.4f precision %.4f at logit > 0; "
                "%.1f s, ETA %.1f s\n",
                il + 1, n_layer, ep + 1, o->epochs, loss, hold_loss / (double)n_hold, m.recall, m.precision, secs,
                secs / done * (work_total - done));
    }
    if (!round_to_type(p->w1, p->r * p->e, p->e, o->type) || !round_to_type(p->w2, p->f * p->r, p->r, o->type))
        return die("out of memory", NULL);
    predict(t, d, hold, n_hold, logits);
    res->rank = p->r;
    res->loss = loss;
    res->thr = pick_threshold(d, hold, n_hold, p->f, mask_bytes, logits, o->recall, by_count);
    res->m = evaluate(d, hold, n_hold, p->f, mask_bytes, logits, res->thr, by_count);
    free(train), free(hold), free(logits);
    return 0;
}

/* ---- output -------------------------------------------------------------- */

/* blk.N.fc1.weight, blk.N.fc2.weight: replaced, not copied. */
static bool is_predictor(const char *name) {
    int il, end = -1;
    char which = 0;
    if (sscanf(name, "blk.%d.fc%c.weight%n", &il, &which, &end) != 2 || end < 0) return false;
    return (which == '1' || which == '2') && name[end] == '\0';
}

struct stored {
    void *fc1, *fc2; /* in the output type */
};

/* n values in rows of n_in, in the output type */
static void *store(const float *w, int64_t n, int64_t n_in, uint32_t type) {
    uint64_t row;
    if (!dtype_row_size(type, (uint64_t)n_in, &row)) return NULL;
    void *out = malloc((size_t)(row * (uint64_t)(n / n_in)));
    if (!out) return NULL;
    if (type == DTYPE_F16)
        for (int64_t i = 0; i < n; i++) ((f16_t *)out)[i] = f32_to_f16(w[i]);
    else if (type == DTYPE_Q8_0)
        for (int64_t r = 0; r < n / n_in; r++) quant_quantizer(type)(n_in, w + r * n_in, (char *)out + r * row);
    else memcpy(out, w, (size_t)n * 4);
    return out;
}

static optiml_status write_output(const gguf_file *in, const struct opts *o, const struct samples_header *h,
                                  const struct stored *st_w, const struct layer_result *res, uint64_t hash,
                                  float model_act_thr) {
    gguf_writer *w = NULL;
    TRY(gguf_writer_copy_of(in, is_predictor, &w));
    optiml_status st = OPTIML_OK;
    float *thr = malloc(h->n_layer * sizeof(float));
    if (!thr) st = optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    for (uint32_t il = 0; il < h->n_layer && st == OPTIML_OK; il++) {
        char name[64];
        uint64_t ne1[2] = {h->n_embd, (uint64_t)res[il].rank}, ne2[2] = {(uint64_t)res[il].rank, h->n_ff};
        snprintf(name, sizeof(name), "blk.%u.fc1.weight", il);
        st = gguf_writer_add_tensor(w, name, o->type, 2, ne1, st_w[il].fc1);
        snprintf(name, sizeof(name), "blk.%u.fc2.weight", il);
        if (st == OPTIML_OK) st = gguf_writer_add_tensor(w, name, o->type, 2, ne2, st_w[il].fc2);
        thr[il] = res[il].thr;
    }
    char hex[17];
    sparse_hash_hex(hash, hex);
    if (st == OPTIML_OK)
        st = gguf_writer_set_arr(w, "optiml.sparse.layer_threshold", GGUF_TYPE_FLOAT32, thr, h->n_layer);
    if (st == OPTIML_OK) st = gguf_writer_set_u32(w, "optiml.sparse.version", 1);
    if (st == OPTIML_OK) st = gguf_writer_set_str(w, "optiml.sparse.weights_hash", hex);
    if (st == OPTIML_OK && h->act_threshold != model_act_thr)
        st = gguf_writer_set_f32(w, "optiml.sparse.act_threshold", h->act_threshold);
    if (st == OPTIML_OK) st = gguf_writer_write(w, o->out);
    gguf_writer_free(w);
    free(thr);
    return st;
}

/* ---- main ----------------------------------------------------------------- */

/* Ranks are multiples of this: q8_0 rows of fc2 fill whole blocks. */
static int64_t rank_step(uint32_t type) { return type == DTYPE_Q8_0 ? QK8_0 : 8; }

static int64_t default_rank(uint32_t n_embd, uint32_t type) {
    int64_t r = (int64_t)n_embd / 8;
    r = r < 16 ? 16 : r > 1024 ? 1024 : r;
    return (r + rank_step(type) - 1) / rank_step(type) * rank_step(type);
}

/* Ranks per layer (see the header comment). */
static int choose_ranks(int fd, const struct samples_header *h, const struct opts *o, int64_t *rank) {
    const int64_t step = rank_step(o->type);
    if (o->rank > 0 && o->rank % step) {
        fprintf(stderr, "optiml-train-predictor: --rank must be a multiple of %lld for %s predictors\n",
                (long long)step, dtype_name(o->type));
        return 1;
    }
    if (h->n_embd % (uint32_t)dtype_block_size(o->type)) {
        fprintf(stderr, "optiml-train-predictor: n_embd %u does not fill %s blocks\n", h->n_embd,
                dtype_name(o->type));
        return 1;
    }
    const int64_t base = o->rank > 0 ? o->rank : default_rank(h->n_embd, o->type);
    for (uint32_t il = 0; il < h->n_layer; il++) rank[il] = base;
    if (!o->rank_per_layer) return 0;
    double *dens = malloc(h->n_layer * sizeof(double)), mean = 0;
    if (!dens) return die("out of memory", NULL);
    for (uint32_t il = 0; il < h->n_layer; il++) mean += (dens[il] = layer_density(fd, h, il)) / h->n_layer;
    for (uint32_t il = 0; il < h->n_layer; il++) {
        double s = mean > 0 ? dens[il] / mean : 1.0;
        s = s < 0.5 ? 0.5 : s > 2.0 ? 2.0 : s;
        rank[il] = ((int64_t)((double)base * s + (double)step / 2)) / step * step; /* the nearest multiple */
        if (rank[il] < step) rank[il] = step;
        fprintf(stderr, "optiml-train-predictor: layer %u: %.1f%% active, rank %" PRId64 "\n", il, 100 * dens[il],
                rank[il]);
    }
    free(dens);
    return 0;
}

static int open_samples(const char *path, struct samples_header *h) {
    int fd = open(path, O_RDONLY);
    uint8_t hb[SAMPLES_HEADER_BYTES];
    if (fd < 0 || read(fd, hb, sizeof(hb)) != (ssize_t)sizeof(hb)) {
        fprintf(stderr, "optiml-train-predictor: cannot read '%s': %s\n", path, fd < 0 ? strerror(errno) : "short");
        if (fd >= 0) close(fd);
        return -1;
    }
    if (samples_header_decode(hb, path, h) != OPTIML_OK) {
        die(optiml_last_error(), NULL);
        close(fd);
        return -1;
    }
    return fd;
}

/* Model shape and hash agree with the samples. */
static int check_model(const gguf_file *in, const struct samples_header *h, bool force, uint64_t *hash) {
    const uint32_t n_layer = gguf_n_layer(in);
    const struct gguf_tensor_info *g = gguf_find_tensor(in, "blk.0.ffn_up.weight");
    if (n_layer != h->n_layer || !g || g->ne[0] != h->n_embd || g->ne[1] != h->n_ff) {
        fprintf(stderr, "optiml-train-predictor: the samples (n_layer %u, n_embd %u, n_ff %u) do not fit the model\n",
                h->n_layer, h->n_embd, h->n_ff);
        return 1;
    }
    if (sparse_weights_hash(in, n_layer, hash) != OPTIML_OK) return die(optiml_last_error(), NULL);
    if (*hash != h->weights_hash) {
        char a[17], b[17];
        sparse_hash_hex(*hash, a);
        sparse_hash_hex(h->weights_hash, b);
        fprintf(stderr, "optiml-train-predictor: %s: the samples come from other FFN weights (hash %s, model %s)%s\n",
                force ? "warning" : "error", b, a, force ? "" : "; --force trains anyway");
        if (!force) return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    struct opts o;
    if (parse_args(argc, argv, &o)) return 1;
    util_seconds();
    struct samples_header h;
    int fd = open_samples(o.samples, &h);
    if (fd < 0) return 1;
    const bool by_count = o.recall_count || !(h.flags & SAMPLES_HAS_MAG);
    if (!o.recall_count && o.recall_of_set && by_count)
        fprintf(stderr, "optiml-train-predictor: the samples carry no |h| (--no-mag): recall is counted\n");
    gguf_file *in = NULL;
    uint64_t hash = 0;
    float model_act_thr = 0;
    if (gguf_open(o.model, &in) != OPTIML_OK) return die(optiml_last_error(), NULL);
    if (check_model(in, &h, o.force, &hash)) return 1;
    if (gguf_get_f32_or(in, "optiml.sparse.act_threshold", 0.0f, &model_act_thr) != OPTIML_OK)
        return die(optiml_last_error(), NULL);
    g_kern = cpu_kernels_best();
    if (threadpool_init((int)o.n_threads, &g_pool) != OPTIML_OK) return die(optiml_last_error(), NULL);

    int64_t *rank = malloc(h.n_layer * sizeof(int64_t));
    struct layer_result *res = calloc(h.n_layer, sizeof(*res));
    struct stored *sw = calloc(h.n_layer, sizeof(*sw));
    if (!rank || !res || !sw) return die("out of memory", NULL);
    if (choose_ranks(fd, &h, &o, rank)) return 1;
    double work_total = 0, work_done = 0;
    for (uint32_t il = 0; il < h.n_layer; il++) work_total += (double)rank[il];
    fprintf(stderr,
            "optiml-train-predictor: %" PRIu64 " samples x %u layers (every %ld-th held out), %ld epochs, "
            "batch %ld, recall %.4f of %s, %ld threads\n",
            h.n_samples, h.n_layer, o.holdout_every, o.epochs, o.batch, o.recall, by_count ? "count" : "mass",
            o.n_threads);
    const int64_t mask_bytes = (int64_t)samples_layout(h.n_embd, h.n_ff, h.flags).mask_bytes;
    struct metrics sum = {0};
    for (uint32_t il = 0; il < h.n_layer; il++) {
        struct layer_data d = {0};
        struct trainer t;
        int64_t nb = o.batch;
        if (layer_data_read(fd, &h, il, &d) || trainer_init(&t, h.n_embd, rank[il], h.n_ff, nb, (int)o.n_threads) ||
            train_layer(&t, &d, il, h.n_layer, mask_bytes, &o, by_count, &res[il], work_done, work_total))
            return 1;
        work_done += (double)rank[il];
        sw[il].fc1 = store(t.p.w1, t.p.r * t.p.e, t.p.e, o.type);
        sw[il].fc2 = store(t.p.w2, t.p.f * t.p.r, t.p.r, o.type);
        if (!sw[il].fc1 || !sw[il].fc2) return die("out of memory", NULL);
        const struct layer_result *r = &res[il];
        printf("layer %u rank %" PRId64 " threshold %.9g loss %.5f recall %.5f recall_count %.5f precision %.5f "
               "pred_sparsity %.4f sparsity %.4f\n",
               il, r->rank, (double)r->thr, r->loss, r->m.recall, r->m.recall_count, r->m.precision,
               r->m.pred_sparsity, r->m.sparsity);
        fflush(stdout);
        sum.recall += r->m.recall / h.n_layer, sum.recall_count += r->m.recall_count / h.n_layer;
        sum.precision += r->m.precision / h.n_layer, sum.pred_sparsity += r->m.pred_sparsity / h.n_layer;
        sum.sparsity += r->m.sparsity / h.n_layer;
        trainer_free(&t);
        layer_data_free(&d);
    }
    printf("model recall %.5f recall_count %.5f precision %.5f pred_sparsity %.4f sparsity %.4f\n", sum.recall,
           sum.recall_count, sum.precision, sum.pred_sparsity, sum.sparsity);
    int rc = 0;
    if (write_output(in, &o, &h, sw, res, hash, model_act_thr) != OPTIML_OK) rc = die(optiml_last_error(), NULL);
    else fprintf(stderr, "optiml-train-predictor: wrote %s\n", o.out);
    for (uint32_t il = 0; il < h.n_layer; il++) free(sw[il].fc1), free(sw[il].fc2);
    free(sw), free(res), free(rank);
    threadpool_free(g_pool);
    gguf_close(in);
    close(fd);
    return rc;
}
