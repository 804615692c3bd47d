/*
 * optiml-profile - how often each FFN neuron fires, per layer, over a
 * calibration text; writes the statistics into the GGUF and can dump
 * (layer input, active mask) samples for optiml-train-predictor.
 *
 *   optiml-profile -m M.gguf -f calib.txt [-c 512] [-t N] [--max-tokens N]
 *       [-o OUT.gguf] [--dump-samples FILE] [--sample-rate 0.05]
 *       [--no-mag] [--act-threshold T] [--seed N]
 *       [--calibrate-sparsity S [--neuron-thresholds | --cats-product]
 *        [--write-down-t] [--down-t-type q8_0]]
 *
 * The text is tokenized once (no BOS) and cut into windows: each window is
 * BOS followed by the next c-1 text tokens (c text tokens when the
 * vocabulary has no BOS), the last one possibly shorter; each window is one
 * sequence, evaluated from an empty KV cache. --max-tokens bounds the
 * evaluated tokens (BOS positions included). Every evaluated token counts.
 *
 * A neuron j of layer l is active on a token iff h_j != 0, where
 * h = act(x Wgate) * (x Wup) is the input of Wdown (context.h's FFN
 * observer). The forward pass is the dense one (predictors in the model are
 * not used) and applies the model's FATReLU cut optiml.sparse.act_threshold
 * to the gate (0 when absent); --act-threshold T profiles with the cut T
 * instead and writes it into the -o file.
 *
 * Standard output, per layer and for the whole model:
 *   sparsity  mean share of inactive neurons per token (= mean(1 - freq))
 *   hot80     smallest share of neurons (hottest first) whose activations
 *             make up 80% of all activations: the power law (0.2 = the
 *             hottest 20% carry 80%); model-wide over all neurons pooled
 *   top10     share of all activations carried by the hottest 10%
 *   dead      share of neurons that never fired
 * Progress and an ETA go to standard error.
 *
 * -o writes a copy of the model (every key and tensor unchanged) with, per
 * layer, blk.N.ffn_act_freq (f32, n_ff: fraction of the evaluated tokens on
 * which the neuron was active) and the keys optiml.sparse.version (1),
 * optiml.sparse.calib_tokens (u64), optiml.sparse.weights_hash (XXH64 of the
 * FFN weights, sparse_util.h), and optiml.sparse.act_threshold when
 * --act-threshold was given. An existing blk.N.ffn_act_freq is replaced.
 *
 * --calibrate-sparsity S (0 < S < 1): training-free sparsity for SiLU-gated
 * models, as CATS (Lee et al. 2024) does. Per layer, the distribution of
 * |act(g)|, g = x Wgate (every neuron of every evaluated token), goes into
 * a histogram of CALIB_BINS log-spaced bins over [CALIB_LO, CALIB_HI]; the
 * layer's threshold t_l is its S-quantile (bins 0.35% wide, geometric
 * interpolation inside the crossing bin), so a share S of the
 * calibration activations has |act(g)| <= t_l. -o then writes, instead of
 * blk.N.ffn_act_freq, the keys optiml.sparse.kind = "cats",
 * optiml.sparse.gate_threshold (f32, n_layer), optiml.sparse.gate_sparsity
 * (f32, S) with the version, hash and calib_tokens above; --write-down-t
 * adds blk.N.ffn_down_t.weight (ffn_down transposed, neuron-major, of
 * --down-t-type, default q8_0: 8 bits keep the re-quantization error small),
 * which the sparse FFN needs to read only the active neurons' part of down.
 * Standard output then lists, per layer, t_l and the share of calibration
 * activations below it.
 * --neuron-thresholds: a neuron's score is |act(g_i)| c_i, c_i = |column i
 * of Wdown| * rms(up_i) over the text (up_i = h_i / act(g_i) of the dense
 * run), the size of its contribution to the FFN's output per unit of
 * |act(g_i)|. A second pass over the text histograms the scores; t_l is
 * their S-quantile, and blk.N.ffn_gate_thr[i] = t_l / c_i (f32, n_ff) is
 * written besides the plain gate_threshold (docs/FORMAT.md).
 * --cats-product: optiml.sparse.kind "cats_product", the score is the
 * contribution itself, |h_i| c_i with c_i = |column i of Wdown| (one pass);
 * gate_threshold holds t_l and blk.N.ffn_gate_thr t_l / c_i. The decode
 * then computes gate and up of every neuron and skips only down rows.
 *
 * --dump-samples writes the sample file of sparse_util.h (docs/FORMAT.md):
 * for each sampled token, per layer, the FFN's normed input x (f32), the
 * active mask and (unless --no-mag) |h| as f16, so the trainer can aim at a
 * recall of activation mass. A token is sampled iff a hash of its index and
 * --seed falls below --sample-rate (default 0.05), so which tokens are
 * sampled does not depend on the threads or the batch.
 */
#define _POSIX_C_SOURCE 200809L
#include "context.h"
#include "dtype.h"
#include "gguf.h"
#include "model.h"
#include "quant.h"
#include "read_file.h"
#include "parse_num.h"
#include "sparse_util.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct opts {
    const char *model, *text, *out, *samples;
    long n_ctx, n_threads;
    long long max_tokens;
    double sample_rate;
    bool mag, act_thr_set, write_down_t, neuron_thr, product;
    float act_thr;
    uint64_t seed;
    double calib;        /* --calibrate-sparsity S, 0: off */
    uint32_t down_t_type;
};

/* the |act(g)| histogram of --calibrate-sparsity */
#define CALIB_BINS 8000
#define CALIB_LO 1e-8 /* bin 0 also takes everything below (exact zeros) */
#define CALIB_HI 1e4  /* the last bin also takes everything above       */

/* ---- options ------------------------------------------------------------ */

static const char usage[] =
    "usage: optiml-profile -m M.gguf -f calib.txt [-c 512] [-t N] [--max-tokens N] [-o OUT.gguf]\n"
    "                      [--dump-samples FILE] [--sample-rate 0.05] [--no-mag] [--act-threshold T] [--seed N]\n"
    "                      [--calibrate-sparsity S [--neuron-thresholds | --cats-product] [--write-down-t]\n"
    "                       [--down-t-type q8_0|f16|f32|q4_0|...]]\n";

static int die(const char *what, const char *detail) {
    fprintf(stderr, "optiml-profile: %s%s\n", what, detail ? detail : "");
    return 1;
}

static int parse_args(int argc, char **argv, struct opts *o) {
    *o = (struct opts){.n_ctx = 512, .sample_rate = 0.05, .mag = true, .max_tokens = -1, .seed = 1,
                       .down_t_type = DTYPE_Q8_0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("%s", usage);
            exit(0);
        }
        if (!strcmp(a, "--no-mag")) {
            o->mag = false;
            continue;
        }
        if (!strcmp(a, "--write-down-t")) {
            o->write_down_t = true;
            continue;
        }
        if (!strcmp(a, "--neuron-thresholds")) {
            o->neuron_thr = true;
            continue;
        }
        if (!strcmp(a, "--cats-product")) {
            o->product = true;
            continue;
        }
        if (i + 1 >= argc) return die("unknown option or missing value: ", a);
        const char *v = argv[++i];
        double d = 0;
        bool ok = true;
        if (!strcmp(a, "-m") || !strcmp(a, "--model")) o->model = v;
        else if (!strcmp(a, "-f") || !strcmp(a, "--file")) o->text = v;
        else if (!strcmp(a, "-o") || !strcmp(a, "--output")) o->out = v;
        else if (!strcmp(a, "--dump-samples")) o->samples = v;
        else if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) ok = tool_parse_double(v, 2, 1 << 20, &d), o->n_ctx = (long)d;
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) ok = tool_parse_double(v, 1, 1024, &d), o->n_threads = (long)d;
        else if (!strcmp(a, "--max-tokens")) ok = tool_parse_double(v, 1, 1e15, &d), o->max_tokens = (long long)d;
        else if (!strcmp(a, "--sample-rate")) ok = tool_parse_double(v, 0, 1, &d), o->sample_rate = d;
        else if (!strcmp(a, "--seed")) ok = tool_parse_double(v, 0, 1e15, &d), o->seed = (uint64_t)d;
        else if (!strcmp(a, "--calibrate-sparsity")) ok = tool_parse_double(v, 1e-6, 1 - 1e-6, &d), o->calib = d;
        else if (!strcmp(a, "--down-t-type")) {
            const int t = dtype_from_name(v);
            ok = t >= 0 && (t == DTYPE_F32 || t == DTYPE_F16 || quant_quantizer((uint32_t)t));
            o->down_t_type = (uint32_t)t;
        } else if (!strcmp(a, "--act-threshold")) {
            ok = tool_parse_double(v, 0, 1e30, &d);
            o->act_thr = (float)d;
            o->act_thr_set = true;
        } else return die("unknown option: ", a);
        if (!ok) return die("invalid value for ", a);
    }
    if (!o->model || !o->text) return die("-m MODEL and -f TEXT are required\n", usage);
    if (o->write_down_t && !o->calib) return die("--write-down-t goes with --calibrate-sparsity", NULL);
    if ((o->neuron_thr || o->product) && !o->calib)
        return die("--neuron-thresholds and --cats-product go with --calibrate-sparsity", NULL);
    if (o->neuron_thr && o->product) return die("--neuron-thresholds or --cats-product, not both", NULL);
    return 0;
}

/* ---- the calibration tokens ------------------------------------------- */

/* Token ids of the text without BOS; NULL with a message on failure. */
static optiml_token *tokenize_file(const optiml_model *model, const char *path, int32_t *n_out) {
    size_t len = 0;
    char *text = tool_read_file(path, &len);
    if (!text) {
        fprintf(stderr, "optiml-profile: cannot read '%s': %s\n", path, strerror(errno));
        return NULL;
    }
    if (len > (size_t)INT32_MAX / 4) {
        fprintf(stderr, "optiml-profile: '%s' is too long\n", path);
        free(text);
        return NULL;
    }
    /* a byte can become several tokens (a space: the 3 byte tokens of
     * U+2581): retry with the size asked for */
    optiml_token *toks = NULL;
    int32_t n_max = (int32_t)len + 1, n = -n_max;
    while (n < 0 && n != INT32_MIN) {
        n_max = -n;
        free(toks);
        toks = malloc((size_t)n_max * sizeof(*toks));
        if (!toks) break;
        n = optiml_tokenize(model, text, (int32_t)len, toks, n_max, false, false);
    }
    free(text);
    if (!toks || n < 0) {
        fprintf(stderr, "optiml-profile: cannot tokenize '%s': %s\n", path,
                toks ? optiml_last_error() : "out of memory");
        free(toks);
        return NULL;
    }
    *n_out = n;
    return toks;
}

/* ---- counting (the FFN observer) ---------------------------------------- */

struct profile {
    int32_t n_layer, n_embd, n_ff;
    float act_thr;       /* the FATReLU cut of the forward pass             */
    uint64_t *count;     /* (n_layer, n_ff) tokens on which the neuron fired */
    uint64_t n_tokens;   /* evaluated so far                                */
    uint64_t tok_base;   /* global index of row 0 of the batch in flight    */
    /* samples */
    int fd;              /* -1: no dump                                      */
    int64_t *sample_of;  /* (total tokens) sample index, or -1               */
    uint64_t n_samples;
    uint32_t flags;
    struct samples_layout lay;
    uint8_t *rec;        /* one record                                      */
    bool write_failed;
    /* --calibrate-sparsity */
    enum ffn_act act;
    uint64_t *hist;      /* (n_layer, CALIB_BINS) counts of |act(g)|          */
    float *ones, *tmp;   /* (n_ff) each                                       */
    float *gate_thr;     /* (n_layer) the thresholds, once computed           */
    /* per-neuron thresholds (the second pass over the text) */
    int pass;            /* 1: |act(g)| and up statistics; 2: scores          */
    double *up_sq;       /* (n_layer, n_ff) sum of up^2 over the tokens       */
    uint64_t *up_n;      /* (n_layer, n_ff) tokens in up_sq                   */
    float *scale;        /* (n_layer, n_ff) c_i, mean 1 per layer             */
    uint64_t *hist2;     /* (n_layer, CALIB_BINS) counts of |act(g_i)| c_i    */
    float *score_thr;    /* (n_layer) t_l of the scores                       */
    float *neuron_thr;   /* (n_layer, n_ff) t_l / c_i: blk.N.ffn_gate_thr     */
    bool product;        /* --cats-product: one pass, scores |h_i| c_i       */
};

static uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static void write_record(struct profile *p, int32_t il, uint64_t tok, const float *x, const float *h) {
    uint8_t *r = p->rec;
    memset(r, 0, p->lay.record_bytes);
    memcpy(r, &tok, 8);
    memcpy(r + p->lay.off_x, x, 4ull * p->n_embd);
    for (int32_t j = 0; j < p->n_ff; j++) {
        float a = fabsf(h[j]);
        if (a > 0.0f) r[p->lay.off_mask + j / 8] |= (uint8_t)(1u << (j % 8));
        if (p->flags & SAMPLES_HAS_MAG) {
            f16_t m = f32_to_f16(a < 65504.0f ? a : 65504.0f);
            memcpy(r + p->lay.off_mag + 2ull * j, &m, 2);
        }
    }
    uint64_t s = (uint64_t)p->sample_of[tok];
    off_t off = (off_t)(SAMPLES_HEADER_BYTES + ((uint64_t)il * p->n_samples + s) * p->lay.record_bytes);
    if (pwrite(p->fd, r, p->lay.record_bytes, off) != (ssize_t)p->lay.record_bytes) p->write_failed = true;
}

/* |act(g)| of n_tok rows of g (act: false, |g|), each times the neuron's c
 * (NULL: 1), into a histogram. */
static void calib_add(struct profile *p, uint64_t *hist, int64_t n_tok, const float *g, const float *c, bool act) {
    const double scale = CALIB_BINS / log(CALIB_HI / CALIB_LO);
    for (int64_t t = 0; t < n_tok; t++) {
        memcpy(p->tmp, g + t * p->n_ff, (size_t)p->n_ff * sizeof(float));
        if (act) ops_act_mul(p->tmp, p->ones, p->n_ff, p->act); /* the forward pass's act */
        for (int32_t j = 0; j < p->n_ff; j++) {
            const double a = fabs((double)p->tmp[j]) * (c ? c[j] : 1.0);
            const double b = a > CALIB_LO ? floor(log(a / CALIB_LO) * scale) : 0.0;
            hist[b < CALIB_BINS - 1 ? (int)b : CALIB_BINS - 1]++;
        }
    }
}

/* Pass 1 of the per-neuron thresholds: sum of up_i^2, up = h / act(g)
 * (the dense run: h = act(g) * up in float, so the quotient is up within
 * an ulp; the rare exact act(g) = 0 is left out of the mean). */
static void calib_add_up(struct profile *p, int32_t il, int64_t n_tok, const float *g, const float *h) {
    double *sq = p->up_sq + (uint64_t)il * p->n_ff;
    uint64_t *n = p->up_n + (uint64_t)il * p->n_ff;
    for (int64_t t = 0; t < n_tok; t++) {
        memcpy(p->tmp, g + t * p->n_ff, (size_t)p->n_ff * sizeof(float));
        ops_act_mul(p->tmp, p->ones, p->n_ff, p->act);
        for (int32_t j = 0; j < p->n_ff; j++) {
            if (p->tmp[j] == 0.0f) continue;
            const double u = (double)h[t * p->n_ff + j] / (double)p->tmp[j];
            sq[j] += u * u;
            n[j]++;
        }
    }
}

static void observe(void *user, int32_t il, int64_t n_tok, const float *x, const float *g, const float *h) {
    struct profile *p = user;
    if (p->hist) { /* g: the run is dense and the FFN has a gate */
        if (!g) return;
        if (p->pass == 2) /* the scores |act(g_i)| c_i */
            calib_add(p, p->hist2 + (uint64_t)il * CALIB_BINS, n_tok, g, p->scale + (uint64_t)il * p->n_ff, true);
        else {
            calib_add(p, p->hist + (uint64_t)il * CALIB_BINS, n_tok, g, NULL, true);
            if (p->up_sq) calib_add_up(p, il, n_tok, g, h);
            if (p->product) /* |h_i| c_i, c_i = |column i of Wdown| */
                calib_add(p, p->hist2 + (uint64_t)il * CALIB_BINS, n_tok, h, p->scale + (uint64_t)il * p->n_ff,
                          false);
        }
        return;
    }
    uint64_t *cnt = p->count + (uint64_t)il * p->n_ff;
    for (int64_t t = 0; t < n_tok; t++) {
        const float *ht = h + t * p->n_ff;
        for (int32_t j = 0; j < p->n_ff; j++) cnt[j] += ht[j] != 0.0f;
        uint64_t tok = p->tok_base + (uint64_t)t;
        if (p->fd >= 0 && p->sample_of[tok] >= 0) write_record(p, il, tok, x + t * p->n_embd, ht);
    }
}

/* ---- statistics --------------------------------------------------------- */

static int cmp_desc(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* hot80, top10 and dead of n counts (sorted in place, hottest first). */
static void power_law(uint64_t *c, uint64_t n, double *hot80, double *top10, double *dead) {
    qsort(c, n, sizeof(*c), cmp_desc);
    uint64_t total = 0, n_dead = 0;
    for (uint64_t i = 0; i < n; i++) total += c[i], n_dead += c[i] == 0;
    uint64_t k = 0, acc = 0, n10 = (n + 9) / 10, acc10 = 0;
    while (k < n && (double)acc < 0.8 * (double)total) acc += c[k++];
    for (uint64_t i = 0; i < n10; i++) acc10 += c[i];
    *hot80 = total ? (double)k / (double)n : NAN;
    *top10 = total ? (double)acc10 / (double)total : NAN;
    *dead = (double)n_dead / (double)n;
}

static void print_stats(const struct profile *p) {
    const uint64_t n_ff = (uint64_t)p->n_ff, n_all = n_ff * (uint64_t)p->n_layer;
    uint64_t *sorted = malloc(n_all * sizeof(*sorted));
    if (!sorted) return;
    memcpy(sorted, p->count, n_all * sizeof(*sorted));
    double hot80, top10, dead, sum_sp = 0;
    printf("layer      sparsity  hot80   top10   dead\n");
    for (int32_t il = 0; il < p->n_layer; il++) {
        uint64_t fired = 0;
        for (uint64_t j = 0; j < n_ff; j++) fired += p->count[il * n_ff + j];
        double sp = 1.0 - (double)fired / ((double)p->n_tokens * (double)n_ff);
        sum_sp += sp;
        power_law(sorted + il * n_ff, n_ff, &hot80, &top10, &dead);
        printf("layer %3d  %.4f    %.4f  %.4f  %.4f\n", il, sp, hot80, top10, dead);
    }
    memcpy(sorted, p->count, n_all * sizeof(*sorted));
    power_law(sorted, n_all, &hot80, &top10, &dead);
    printf("model      %.4f    %.4f  %.4f  %.4f\n", sum_sp / p->n_layer, hot80, top10, dead);
    free(sorted);
}

/* The share-quantile of a histogram: the lower edge of the bin where the
 * count crosses share * total, moved geometrically into the bin by the
 * part of the bin below the crossing. */
static double calib_quantile(const uint64_t *hist, double share) {
    uint64_t total = 0;
    for (int b = 0; b < CALIB_BINS; b++) total += hist[b];
    const double want = share * (double)total, step = log(CALIB_HI / CALIB_LO) / CALIB_BINS;
    double acc = 0;
    for (int b = 0; b < CALIB_BINS; b++) {
        if (acc + (double)hist[b] >= want && hist[b] > 0) {
            if (b == 0) return 0.0; /* the share is zeros or below CALIB_LO */
            return CALIB_LO * exp(step * (b + (want - acc) / (double)hist[b]));
        }
        acc += (double)hist[b];
    }
    return CALIB_HI;
}

/* thr (n_layer) from the histograms hists; prints them under title. */
static void calib_thresholds(const struct profile *p, const uint64_t *hists, float *thr, double share,
                             const char *title) {
    printf("layer      %-14s  below\n", title);
    const double scale = CALIB_BINS / log(CALIB_HI / CALIB_LO);
    double sum = 0;
    for (int32_t il = 0; il < p->n_layer; il++) {
        const uint64_t *hist = hists + (uint64_t)il * CALIB_BINS;
        const double t = calib_quantile(hist, share);
        thr[il] = (float)t;
        /* share below t, counting the crossing bin by its interpolated part */
        const double pos = t > CALIB_LO ? log(t / CALIB_LO) * scale : 0.0;
        uint64_t total = 0;
        double below = 0;
        for (int b = 0; b < CALIB_BINS; b++) {
            total += hist[b];
            below += (double)hist[b] * fmin(1.0, fmax(0.0, pos - b));
        }
        sum += below / (double)total;
        printf("layer %3d  %.6g  %.4f\n", il, t, below / (double)total);
    }
    printf("model      target %.4f  mean below %.4f\n", share, sum / p->n_layer);
}

/* p->scale: c_i = |column i of ffn_down| * rms(up_i) from pass 1 (the size
 * of neuron i's contribution per unit of |act(g_i)|; with_up false: the
 * column norm only, the size per unit of |h_i|), divided by the layer's
 * mean c so the scores stay in the histogram's range. */
static optiml_status calib_scales(struct profile *p, const optiml_model *m, bool with_up) {
    const int64_t n_ff = p->n_ff, n_embd = p->n_embd;
    double *col = malloc((size_t)n_ff * sizeof(double));
    float *row = malloc((size_t)n_ff * sizeof(float));
    if (!col || !row) {
        free(col);
        free(row);
        return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    }
    for (int32_t il = 0; il < p->n_layer; il++) {
        const struct tensor *down = &m->layers[il].ffn_down; /* (n_ff, n_embd) */
        memset(col, 0, (size_t)n_ff * sizeof(double));
        for (int64_t r = 0; r < n_embd; r++) {
            cpu_kernels_ref()->to_f32[down->type](n_ff, tensor_row(down, r), row);
            for (int64_t i = 0; i < n_ff; i++) col[i] += (double)row[i] * row[i];
        }
        const uint64_t o = (uint64_t)il * (uint64_t)n_ff;
        double sum = 0;
        for (int64_t i = 0; i < n_ff; i++) {
            const double up_ms = !with_up ? 1.0 : p->up_n[o + i] ? p->up_sq[o + i] / (double)p->up_n[o + i] : 0.0;
            col[i] = sqrt(col[i] * up_ms);
            sum += col[i];
        }
        for (int64_t i = 0; i < n_ff; i++) p->scale[o + i] = sum > 0 ? (float)(col[i] * (double)n_ff / sum) : 1.0f;
    }
    free(col);
    free(row);
    return OPTIML_OK;
}

/* ---- writing ------------------------------------------------------------ */

/* blk.N.ffn_act_freq: replaced, not copied. */
static bool is_act_freq(const char *name) {
    int il, end = -1;
    return sscanf(name, "blk.%d.ffn_act_freq%n", &il, &end) == 1 && end >= 0 && name[end] == '\0';
}

/* blk.N.<suffix> */
static bool is_layer_tensor(const char *name, const char *suffix) {
    int il, end = -1;
    return sscanf(name, "blk.%d.%n", &il, &end) == 1 && end >= 0 && !strcmp(name + end, suffix);
}

/* --calibrate-sparsity: per-neuron thresholds are replaced (or dropped:
 * --layer-thresholds), with --write-down-t ffn_down_t too */
static bool is_calib_replaced(const char *name) {
    return is_act_freq(name) || is_layer_tensor(name, "ffn_gate_thr");
}
static bool is_calib_replaced_down_t(const char *name) {
    return is_calib_replaced(name) || is_layer_tensor(name, "ffn_down_t.weight");
}

/* ffn_down of one layer, transposed into ffn_down_t, at write time. */
struct down_t_fill {
    const struct tensor *down; /* (n_ff, n_embd) */
    uint32_t type;
};

static optiml_status down_t_fill(void *user, void *dst, uint64_t size) {
    const struct down_t_fill *f = user;
    const int64_t n_ff = f->down->ne[0], n_embd = f->down->ne[1];
    uint64_t row;
    if (!dtype_row_size(f->type, (uint64_t)n_embd, &row) || row * (uint64_t)n_ff != size)
        return optiml_fail(OPTIML_ERR_FORMAT, "ffn_down_t: rows of %lld do not fill %s blocks", (long long)n_embd,
                           dtype_name(f->type));
    float *d = malloc((size_t)(n_ff * n_embd) * sizeof(float)), *t = malloc((size_t)n_embd * sizeof(float));
    if (!d || !t) {
        free(d);
        free(t);
        return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    }
    for (int64_t r = 0; r < n_embd; r++)
        cpu_kernels_ref()->to_f32[f->down->type](n_ff, tensor_row(f->down, r), d + r * n_ff);
    for (int64_t i = 0; i < n_ff; i++) {
        for (int64_t r = 0; r < n_embd; r++) t[r] = d[r * n_ff + i];
        char *out = (char *)dst + (uint64_t)i * row;
        if (f->type == DTYPE_F32) memcpy(out, t, (size_t)n_embd * sizeof(float));
        else if (f->type == DTYPE_F16)
            for (int64_t r = 0; r < n_embd; r++) ((f16_t *)out)[r] = f32_to_f16(t[r]);
        else quant_quantizer(f->type)(n_embd, t, out);
    }
    free(d);
    free(t);
    return OPTIML_OK;
}

/* The -o file of --calibrate-sparsity. */
static optiml_status write_calibrated(const struct profile *p, const optiml_model *m, const struct opts *o) {
    uint64_t hash;
    char hex[17];
    TRY(sparse_weights_hash(m->file, (uint32_t)p->n_layer, &hash));
    sparse_hash_hex(hash, hex);
    struct down_t_fill *fills = calloc((size_t)p->n_layer, sizeof(*fills));
    if (!fills) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    gguf_writer *w = NULL;
    optiml_status st = gguf_writer_copy_of(m->file, o->write_down_t ? is_calib_replaced_down_t : is_calib_replaced, &w);
    for (int32_t il = 0; il < p->n_layer && st == OPTIML_OK && o->write_down_t; il++) {
        char name[64];
        const uint64_t ne[2] = {(uint64_t)p->n_embd, (uint64_t)p->n_ff};
        fills[il] = (struct down_t_fill){.down = &m->layers[il].ffn_down, .type = o->down_t_type};
        snprintf(name, sizeof(name), "blk.%d.ffn_down_t.weight", il);
        st = gguf_writer_add_tensor_fn(w, name, o->down_t_type, 2, ne, down_t_fill, &fills[il]);
    }
    for (int32_t il = 0; il < p->n_layer && st == OPTIML_OK && p->neuron_thr; il++) {
        char name[64];
        const uint64_t ne[1] = {(uint64_t)p->n_ff};
        snprintf(name, sizeof(name), "blk.%d.ffn_gate_thr", il);
        st = gguf_writer_add_tensor(w, name, DTYPE_F32, 1, ne, p->neuron_thr + (uint64_t)il * p->n_ff);
    }
    if (st == OPTIML_OK) st = gguf_writer_set_u32(w, "optiml.sparse.version", 1);
    if (st == OPTIML_OK) st = gguf_writer_set_str(w, "optiml.sparse.weights_hash", hex);
    if (st == OPTIML_OK) st = gguf_writer_set_u64(w, "optiml.sparse.calib_tokens", p->n_tokens);
    /* cats_product: gate_threshold is t_l on |h| (c_i has mean 1) */
    if (st == OPTIML_OK) st = gguf_writer_set_str(w, "optiml.sparse.kind", p->product ? "cats_product" : "cats");
    if (st == OPTIML_OK)
        st = gguf_writer_set_arr(w, "optiml.sparse.gate_threshold", GGUF_TYPE_FLOAT32,
                                 p->product ? p->score_thr : p->gate_thr, (uint64_t)p->n_layer);
    if (st == OPTIML_OK) st = gguf_writer_set_f32(w, "optiml.sparse.gate_sparsity", (float)o->calib);
    if (st == OPTIML_OK) st = gguf_writer_write(w, o->out);
    gguf_writer_free(w);
    free(fills);
    return st;
}

static optiml_status write_gguf(const struct profile *p, const gguf_file *in, const struct opts *o) {
    uint64_t hash;
    char hex[17];
    TRY(sparse_weights_hash(in, (uint32_t)p->n_layer, &hash));
    sparse_hash_hex(hash, hex);
    float *freq = malloc((size_t)p->n_layer * p->n_ff * sizeof(float));
    if (!freq) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    for (uint64_t i = 0; i < (uint64_t)p->n_layer * p->n_ff; i++)
        freq[i] = (float)((double)p->count[i] / (double)p->n_tokens);
    gguf_writer *w = NULL;
    optiml_status st = gguf_writer_copy_of(in, is_act_freq, &w);
    for (int32_t il = 0; il < p->n_layer && st == OPTIML_OK; il++) {
        char name[64];
        uint64_t ne[1] = {(uint64_t)p->n_ff};
        snprintf(name, sizeof(name), "blk.%d.ffn_act_freq", il);
        st = gguf_writer_add_tensor(w, name, DTYPE_F32, 1, ne, freq + (uint64_t)il * p->n_ff);
    }
    if (st == OPTIML_OK) st = gguf_writer_set_u32(w, "optiml.sparse.version", 1);
    if (st == OPTIML_OK) st = gguf_writer_set_str(w, "optiml.sparse.weights_hash", hex);
    if (st == OPTIML_OK) st = gguf_writer_set_u64(w, "optiml.sparse.calib_tokens", p->n_tokens);
    if (st == OPTIML_OK && o->act_thr_set) st = gguf_writer_set_f32(w, "optiml.sparse.act_threshold", o->act_thr);
    if (st == OPTIML_OK) st = gguf_writer_write(w, o->out);
    gguf_writer_free(w);
    free(freq);
    return st;
}

/* Choose the sampled tokens, open the file, write its header. */
static int samples_open(struct profile *p, const struct opts *o, uint64_t total, const gguf_file *in,
                        char *tmp_path, size_t tmp_size) {
    p->sample_of = malloc(total * sizeof(*p->sample_of));
    if (!p->sample_of) return die("out of memory", NULL);
    const uint64_t cut = (uint64_t)(o->sample_rate * 18446744073709551615.0);
    for (uint64_t t = 0; t < total; t++)
        p->sample_of[t] = o->sample_rate >= 1.0 || splitmix64(t ^ (o->seed << 40)) < cut ? (int64_t)p->n_samples++
                                                                                          : -1;
    p->flags = o->mag ? SAMPLES_HAS_MAG : 0;
    p->lay = samples_layout((uint32_t)p->n_embd, (uint32_t)p->n_ff, p->flags);
    p->rec = malloc(p->lay.record_bytes);
    struct samples_header h = {.version = SAMPLES_VERSION, .n_layer = (uint32_t)p->n_layer,
                               .n_embd = (uint32_t)p->n_embd, .n_ff = (uint32_t)p->n_ff, .flags = p->flags,
                               .n_samples = p->n_samples, .record_bytes = p->lay.record_bytes,
                               .act_threshold = p->act_thr, .sample_rate = (float)o->sample_rate,
                               .n_tokens = total};
    if (!p->rec || sparse_weights_hash(in, (uint32_t)p->n_layer, &h.weights_hash) != OPTIML_OK)
        return die(p->rec ? optiml_last_error() : "out of memory", NULL);
    snprintf(tmp_path, tmp_size, "%s.tmp", o->samples);
    p->fd = open(tmp_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    uint8_t hb[SAMPLES_HEADER_BYTES];
    samples_header_encode(&h, hb);
    if (p->fd < 0 || write(p->fd, hb, sizeof(hb)) != (ssize_t)sizeof(hb))
        return die("cannot write ", tmp_path);
    fprintf(stderr, "optiml-profile: sampling %" PRIu64 " of %" PRIu64 " tokens into %s (%.1f MiB)\n",
            p->n_samples, total, o->samples,
            (double)(SAMPLES_HEADER_BYTES + p->n_samples * p->n_layer * p->lay.record_bytes) / 1048576.0);
    return 0;
}

/* ---- the run ------------------------------------------------------------ */

/* Evaluate the windows; counts land in p through the observer. */
static int run_windows(optiml_context *ctx, const optiml_model *model, struct profile *p, const optiml_token *toks,
                       int32_t n_text, long n_ctx, uint64_t total) {
    const optiml_token bos = optiml_token_bos(model);
    const int32_t per = bos >= 0 ? (int32_t)n_ctx - 1 : (int32_t)n_ctx; /* text tokens per window */
    optiml_batch batch = optiml_batch_init((int32_t)n_ctx);
    if (!batch.token) return die("out of memory", NULL);
    const uint64_t n_windows = (uint64_t)(n_text + per - 1) / per;
    const double t0 = util_seconds();
    int rc = 0;
    int32_t next = 0; /* next text token */
    for (uint64_t w = 0; w < n_windows && p->n_tokens < total; w++) {
        int32_t n = 0;
        if (bos >= 0) batch.token[n++] = bos;
        while (n < n_ctx && next < n_text && p->n_tokens + (uint64_t)n < total) batch.token[n++] = toks[next++];
        for (int32_t j = 0; j < n; j++) {
            batch.pos[j] = j;
            batch.seq_id[j] = 0;
            batch.logits[j] = false;
        }
        batch.logits[n - 1] = true; /* the context wants at least one */
        batch.n_tokens = n;
        optiml_kv_seq_clear(ctx, -1);
        p->tok_base = p->n_tokens;
        if (optiml_decode(ctx, &batch) != OPTIML_OK) {
            rc = die(optiml_last_error(), NULL);
            break;
        }
        p->n_tokens += (uint64_t)n;
        if (p->write_failed) {
            rc = die("writing the samples failed: ", strerror(errno));
            break;
        }
        double secs = util_seconds() - t0;
        fprintf(stderr, "[%" PRIu64 "/%" PRIu64 "] %" PRIu64 " tokens, %.0f tok/s, %.1f s, ETA %.1f s\n", w + 1,
                n_windows, p->n_tokens, (double)p->n_tokens / secs, secs,
                secs / (double)p->n_tokens * (double)(total - p->n_tokens));
    }
    optiml_batch_free(batch);
    return rc;
}

/* Evaluated tokens: n_text plus one BOS per window, capped by max_tokens. */
static uint64_t count_tokens(int32_t n_text, long n_ctx, bool has_bos, long long max_tokens) {
    uint64_t per = has_bos ? (uint64_t)n_ctx - 1 : (uint64_t)n_ctx;
    uint64_t total = (uint64_t)n_text + (has_bos ? ((uint64_t)n_text + per - 1) / per : 0);
    return max_tokens > 0 && (uint64_t)max_tokens < total ? (uint64_t)max_tokens : total;
}

int main(int argc, char **argv) {
    struct opts o;
    if (parse_args(argc, argv, &o)) return 1;
    optiml_log_set(NULL, NULL, OPTIML_LOG_LEVEL_WARN);
    util_seconds();
    optiml_model *model = NULL;
    optiml_context *ctx = NULL;
    optiml_token *toks = NULL;
    struct profile p = {.fd = -1};
    char tmp_path[4096] = "";
    int rc = 1;
    if (optiml_model_load(o.model, NULL, &model) != OPTIML_OK) {
        die(optiml_last_error(), NULL);
        goto done;
    }
    int32_t n_text = 0;
    if (!(toks = tokenize_file(model, o.text, &n_text))) goto done;
    p.n_layer = model->hp.n_layer;
    p.n_embd = model->hp.n_embd;
    p.n_ff = model->hp.n_ff;
    if (o.act_thr_set) model->sparse.act_threshold = o.act_thr; /* read by the forward pass */
    p.act_thr = model->sparse.act_threshold;
    if (o.calib) {
        if (model->hp.ffn_act == FFN_ACT_RELU_NOGATE || o.samples) {
            die("--calibrate-sparsity needs an FFN with a gate, and no --dump-samples", NULL);
            goto done;
        }
        p.act = model->hp.ffn_act;
        p.hist = calloc((size_t)p.n_layer * CALIB_BINS, sizeof(*p.hist));
        p.ones = malloc((size_t)p.n_ff * sizeof(float));
        p.tmp = malloc((size_t)p.n_ff * sizeof(float));
        p.gate_thr = malloc((size_t)p.n_layer * sizeof(float));
        if (!p.hist || !p.ones || !p.tmp || !p.gate_thr) {
            die("out of memory", NULL);
            goto done;
        }
        if (o.neuron_thr || o.product) {
            const size_t n = (size_t)p.n_layer * (size_t)p.n_ff;
            p.product = o.product;
            p.up_sq = calloc(n, sizeof(*p.up_sq));
            p.up_n = calloc(n, sizeof(*p.up_n));
            p.scale = malloc(n * sizeof(*p.scale));
            p.neuron_thr = malloc(n * sizeof(*p.neuron_thr));
            p.hist2 = calloc((size_t)p.n_layer * CALIB_BINS, sizeof(*p.hist2));
            p.score_thr = malloc((size_t)p.n_layer * sizeof(*p.score_thr));
            if (!p.up_sq || !p.up_n || !p.scale || !p.neuron_thr || !p.hist2 || !p.score_thr) {
                die("out of memory", NULL);
                goto done;
            }
        }
        for (int32_t j = 0; j < p.n_ff; j++) p.ones[j] = 1.0f;
    } else if (!ffn_act_is_relu(model->hp.ffn_act) && p.act_thr == 0.0f)
        fprintf(stderr, "optiml-profile: warning: the FFN activation is not ReLU and the threshold is 0: "
                        "few neurons will be exactly zero\n");
    const uint64_t total = count_tokens(n_text, o.n_ctx, optiml_token_bos(model) >= 0, o.max_tokens);
    if (n_text < 1 || total < 1) {
        die("no tokens in ", o.text);
        goto done;
    }
    p.count = calloc((size_t)p.n_layer * p.n_ff, sizeof(*p.count));
    if (!p.count) {
        die("out of memory", NULL);
        goto done;
    }
    if (o.samples && samples_open(&p, &o, total, model->file, tmp_path, sizeof(tmp_path))) goto done;

    optiml_context_params cp = optiml_context_default_params();
    cp.n_ctx = (uint32_t)o.n_ctx;
    cp.n_batch = (uint32_t)o.n_ctx;
    cp.n_threads = (int32_t)o.n_threads;
    cp.sparse_mode = 1; /* dense: every neuron computed, whatever predictors say */
    if (optiml_context_init(model, &cp, &ctx) != OPTIML_OK) {
        die(optiml_last_error(), NULL);
        goto done;
    }
    if (context_set_ffn_observer(ctx, observe, &p) != OPTIML_OK) {
        die(optiml_last_error(), NULL);
        goto done;
    }
    fprintf(stderr, "optiml-profile: %s: %" PRIu64 " tokens in windows of %ld, act_threshold %g\n", o.text, total,
            o.n_ctx, (double)p.act_thr);
    p.pass = 1;
    if (p.product && calib_scales(&p, model, false) != OPTIML_OK) {
        die(optiml_last_error(), NULL);
        goto done;
    }
    if (run_windows(ctx, model, &p, toks, n_text, o.n_ctx, total)) goto done;
    if (p.up_sq && !p.product) { /* the scores need pass 1's c_i: a second pass */
        if (calib_scales(&p, model, true) != OPTIML_OK) {
            die(optiml_last_error(), NULL);
            goto done;
        }
        p.pass = 2;
        p.n_tokens = 0;
        fprintf(stderr, "optiml-profile: second pass (per-neuron thresholds)\n");
        if (run_windows(ctx, model, &p, toks, n_text, o.n_ctx, total)) goto done;
    }

    if (p.hist) calib_thresholds(&p, p.hist, p.gate_thr, o.calib, "gate_threshold");
    if (p.hist2) {
        calib_thresholds(&p, p.hist2, p.score_thr, o.calib, "score_threshold");
        for (int32_t il = 0; il < p.n_layer; il++)
            for (int32_t i = 0; i < p.n_ff; i++) {
                const uint64_t k = (uint64_t)il * (uint64_t)p.n_ff + (uint64_t)i;
                /* score > t_l  <=>  |act(g_i)| (|h_i|) > t_l / c_i; c_i = 0: never */
                p.neuron_thr[k] = p.scale[k] > 0.0f ? p.score_thr[il] / p.scale[k] : INFINITY;
            }
    }
    if (!p.hist) print_stats(&p);
    if (p.fd >= 0) {
        if (close(p.fd) != 0 || rename(tmp_path, o.samples) != 0) {
            p.fd = -1;
            die("cannot write ", o.samples);
            goto done;
        }
        p.fd = -1;
        fprintf(stderr, "optiml-profile: wrote %" PRIu64 " samples to %s\n", p.n_samples, o.samples);
    }
    if (o.out) {
        if ((p.hist ? write_calibrated(&p, model, &o) : write_gguf(&p, model->file, &o)) != OPTIML_OK) {
            die(optiml_last_error(), NULL);
            goto done;
        }
        fprintf(stderr, "optiml-profile: wrote %s\n", o.out);
    }
    rc = 0;
done:
    if (p.fd >= 0) {
        close(p.fd);
        unlink(tmp_path);
    }
    free(p.count);
    free(p.sample_of);
    free(p.rec);
    free(p.hist);
    free(p.ones);
    free(p.tmp);
    free(p.gate_thr);
    free(p.up_sq);
    free(p.up_n);
    free(p.scale);
    free(p.neuron_thr);
    free(p.hist2);
    free(p.score_thr);
    free(toks);
    optiml_context_free(ctx);
    optiml_model_free(model);
    return rc;
}
