/*
 * optiml-synth - write a Llama-shaped ReLU-sparse model of any size with
 * working predictors and activation statistics (an OptiML GGUF, docs/
 * FORMAT.md "Sparse FFN"), for benchmarks of the sparse engine.
 *
 *   optiml-synth --outfile M.gguf [--shape tiny|7b|13b|70b] [--n-embd N]
 *       [--n-layer N] [--n-ff N] [--n-head N] [--n-head-kv N] [--vocab N]
 *       [--ctx N] [--type f16|q8_0|q4_0] [--sparsity 0.9] [--hot-share 0.8]
 *       [--rank 64] [--noise 0.1] [--seed N] [--pred-type q8_0|f16] [--hot-first]
 *       [--threads N]
 *
 * How the activation distribution comes about. Every token embedding is
 * e = alpha * 1 + sqrt(1 - alpha^2) * g (alpha = 0.5, g standard normal),
 * so the normed FFN input x has a mean component x . 1/sqrt(n) ~ alpha
 * sqrt(n) and an isotropic rest; attention and FFN outputs are kept small
 * (std ~0.02 per layer) so every layer sees inputs of this form. Neuron i
 * of layer l has the gate row
 *     w_i = -beta_i / sqrt(n) * 1 + u_i + eta * v_i,
 *     u_i = U a_i / |U a_i| (U: n_embd x rank, shared by the layer's
 *     neurons), v_i a random unit vector, both with zero mean,
 * so gate_i(x) = -beta_i alpha sqrt(n) + N(0, sigma^2), sigma^2 =
 * (1 + eta^2)(1 - alpha^2): the neuron fires (ReLU gate > 0) with
 * probability p_i = Phi(-beta_i alpha sqrt(n) / sigma), and beta_i is
 * solved from the p_i wanted. The p_i follow a capped Zipf law over a
 * random permutation of the neurons: p = min(0.98, C (rank + 1)^-s), with C
 * and s found by bisection so that the mean of p is the layer's active
 * share (1 - sparsity) and the hottest 20% of neurons carry --hot-share of
 * the activations; both vary by layer (active share x0.75 .. x1.25 from
 * the first layer to the last, hot share +-0.05), averaging to the flags.
 * --hot-first stores the neurons hottest first instead (no permutation),
 * as a pass that reorders neurons by firing frequency would leave them.
 *
 * The predictor reads the same low-rank structure: fc1 has the rows
 * U^T, -U^T, 1/sqrt(n) and zero rows (r = 2 rank + 2, for q8_0 predictors
 * (--pred-type, the default) rounded up to the 32-value block), so hidden =
 * (relu(U^T x), relu(-U^T x), x . 1/sqrt(n), 0...); fc2 row i is
 * (a_i, -a_i, -beta_i, 0...) / scale, so the logit is gate_i(x) - eta v_i . x:
 * the gate without its full-rank part. The layer threshold, -2.3 eta
 * sigma / sqrt(1 + eta^2), keeps recall near 99%. ffn_act_freq holds the
 * p_i (calib_tokens 0: from the construction, not counted).
 *
 * Weights are generated tensor by tensor while the file is written (a 7B
 * model needs a few hundred MiB of memory), each tensor's rows split over
 * --threads threads; ffn_down_t holds exactly the
 * values of ffn_down (a counter-based generator of (layer, row, column)),
 * quantized along the other axis. optiml.sparse.weights_hash (XXH64 of the
 * FFN tensors) is computed while they are written and patched into the
 * header at the end.
 */
#define _POSIX_C_SOURCE 200809L
#include "dtype.h"
#include "gguf.h"
#include "quant.h"
#include "threadpool.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

#define ALPHA 0.5
#define P_CAP 0.98
#define LAYER_OUT_STD 0.02

struct cfg {
    long n_embd, n_layer, n_ff, n_head, n_head_kv, n_vocab, ctx, rank;
    uint32_t type, pred_type;
    double sparsity, hot_share, noise;
    uint64_t seed;
    bool hot_first;
};

/* ---- random numbers: counter based, so any element can be regenerated --- */

static inline uint64_t mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
/* uniform in [-1, 1) from a key */
static inline float unif(uint64_t key) { return (float)(mix64(key) >> 40) / 8388608.0f - 1.0f; }
/* standard normal from a key (Box-Muller) */
static inline double gauss(uint64_t key) {
    const uint64_t r = mix64(key);
    const double u1 = ((double)(r >> 11) + 0.5) / 9007199254740992.0;
    const double u2 = (double)(mix64(r) >> 11) / 9007199254740992.0;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}
static inline uint64_t key3(uint64_t a, uint64_t b, uint64_t c) { return mix64(mix64(a) ^ b) ^ (c * 0xd6e8feb86659fd93ull); }

/* ---- the activation law --------------------------------------------------- */

static double phi_inv_upper(double p) { /* t with P(N(0,1) > t) = p */
    double lo = -40, hi = 40;
    for (int i = 0; i < 200; i++) {
        const double mid = 0.5 * (lo + hi);
        if (0.5 * erfc(mid / sqrt(2.0)) > p) lo = mid;
        else hi = mid;
    }
    return 0.5 * (lo + hi);
}

/* p[rank] = min(cap, C (rank+1)^-s) with mean p = mean */
static void zipf_fill(double *p, long n, double s, double mean) {
    double lo = 0, hi = 1e9;
    for (int it = 0; it < 200; it++) {
        const double c = 0.5 * (lo + hi);
        double sum = 0;
        for (long i = 0; i < n; i++) sum += fmin(P_CAP, c * pow((double)(i + 1), -s));
        if (sum / n > mean) hi = c;
        else lo = c;
    }
    for (long i = 0; i < n; i++) p[i] = fmin(P_CAP, lo * pow((double)(i + 1), -s));
}

static double top_share(const double *p, long n) {
    double top = 0, all = 0;
    for (long i = 0; i < n; i++) {
        all += p[i];
        if (i < n / 5) top += p[i];
    }
    return top / all;
}

/* Activation probabilities by rank for one layer. */
static void layer_law(double *p, long n, double mean, double share) {
    double lo = 0, hi = 4;
    for (int it = 0; it < 40; it++) {
        const double s = 0.5 * (lo + hi);
        zipf_fill(p, n, s, mean);
        if (top_share(p, n) < share) lo = s;
        else hi = s;
    }
    zipf_fill(p, n, 0.5 * (lo + hi), mean);
}

/* ---- per-layer state, built when the layer's first FFN tensor is filled -- */

struct layer_state {
    long il;        /* -1: none yet                                   */
    float *U;       /* (rank, n_embd) zero-mean directions            */
    float *a;       /* (n_ff, rank) per-neuron mix, scaled so |U a| = 1 */
    float *beta;    /* (n_ff)                                         */
    float *p;       /* (n_ff) activation probability                  */
    double *law;    /* (n_ff)                                         */
    long *perm;     /* (n_ff)                                         */
};

static struct cfg C;
static struct layer_state L = {.il = -1};
static struct threadpool *pool;
static float *scratch; /* per thread: a row (n_embd) then an output row (max of n_embd, n_ff, rank) */
static long scratch_len;
static XXH64_state_t *hash_state;
static float layer_thr[4096];

static double layer_active(long il) {
    const double f = C.n_layer > 1 ? (double)il / (double)(C.n_layer - 1) : 0.5;
    return (1.0 - C.sparsity) * (0.75 + 0.5 * f);
}
static double layer_share(long il) {
    const double f = C.n_layer > 1 ? (double)il / (double)(C.n_layer - 1) : 0.5;
    return fmin(0.98, fmax(0.25, C.hot_share + 0.1 * (0.5 - f)));
}

static void zero_mean(float *v, long n) {
    double m = 0;
    for (long j = 0; j < n; j++) m += v[j];
    m /= (double)n;
    for (long j = 0; j < n; j++) v[j] -= (float)m;
}

static void layer_build(long il) {
    if (L.il == il) return;
    const long n = C.n_embd, k = C.rank, nf = C.n_ff;
    const uint64_t seed = C.seed * 1000003u + (uint64_t)il;
    for (long j = 0; j < k; j++) {
        float *u = L.U + j * n;
        for (long d = 0; d < n; d++) u[d] = (float)(gauss(key3(seed, 1, (uint64_t)(j * n + d))) / sqrt((double)n));
        zero_mean(u, n);
    }
    /* Gram matrix of U: |U a|^2 = a^T G a */
    double *G = malloc((size_t)(k * k) * sizeof(double));
    for (long i = 0; i < k; i++)
        for (long j = 0; j <= i; j++) {
            double s = 0;
            for (long d = 0; d < n; d++) s += (double)L.U[i * n + d] * L.U[j * n + d];
            G[i * k + j] = G[j * k + i] = s;
        }
    layer_law(L.law, nf, layer_active(il), layer_share(il));
    for (long i = 0; i < nf; i++) L.perm[i] = i;
    for (long i = nf - 1; i > 0 && !C.hot_first; i--) { /* Fisher-Yates */
        const long j = (long)(mix64(key3(seed, 2, (uint64_t)i)) % (uint64_t)(i + 1));
        const long t = L.perm[i];
        L.perm[i] = L.perm[j];
        L.perm[j] = t;
    }
    const double sigma = sqrt((1.0 + C.noise * C.noise) * (1.0 - ALPHA * ALPHA));
    for (long r = 0; r < nf; r++) {
        const long i = L.perm[r];
        float *a = L.a + i * k;
        for (long j = 0; j < k; j++) a[j] = (float)gauss(key3(seed, 3, (uint64_t)(i * k + j)));
        double q = 0;
        for (long x = 0; x < k; x++)
            for (long y = 0; y < k; y++) q += (double)a[x] * a[y] * G[x * k + y];
        const float inv = (float)(1.0 / sqrt(q));
        for (long j = 0; j < k; j++) a[j] *= inv;
        L.p[i] = (float)L.law[r];
        L.beta[i] = (float)(phi_inv_upper(L.law[r]) * sigma / (ALPHA * sqrt((double)n)));
    }
    free(G);
    L.il = il;
}

/* ---- tensor fills ----------------------------------------------------------- */

enum role { R_EMBD, R_NORM, R_ATTN, R_ATTN_OUT, R_OUTPUT, R_GATE, R_UP, R_DOWN, R_DOWN_T, R_FC1, R_FC2, R_FREQ };

struct fill {
    enum role role;
    long il, n_in, n_out;
    uint32_t type;
    uint64_t key;
};

/* Row r (n_in values) of a tensor, as f32; tmp: n_embd floats of scratch. */
static void gen_row(const struct fill *f, long r, float *out, float *tmp) {
    const long n = f->n_in;
    switch (f->role) {
    case R_EMBD:
        for (long d = 0; d < n; d++)
            out[d] = (float)(ALPHA + sqrt(1.0 - ALPHA * ALPHA) * gauss(key3(f->key, (uint64_t)r, (uint64_t)d)));
        break;
    case R_NORM:
        for (long d = 0; d < n; d++) out[d] = 1.0f;
        break;
    case R_ATTN:
    case R_OUTPUT:
    case R_UP: { /* unit-variance outputs */
        const float sc = sqrtf(3.0f / (float)n);
        for (long d = 0; d < n; d++) out[d] = unif(key3(f->key, (uint64_t)r, (uint64_t)d)) * sc;
        break;
    }
    case R_ATTN_OUT: {
        const float sc = sqrtf(3.0f / (float)n) * (float)LAYER_OUT_STD;
        for (long d = 0; d < n; d++) out[d] = unif(key3(f->key, (uint64_t)r, (uint64_t)d)) * sc;
        break;
    }
    case R_DOWN:
    case R_DOWN_T: { /* element (neuron i, output o) from one key: down_t = down^T */
        /* FFN output std ~ LAYER_OUT_STD: about active * n_ff terms of |h| ~ 0.5 */
        const double n_act = fmax(1.0, (1.0 - C.sparsity) * (double)C.n_ff);
        const float sc = (float)(LAYER_OUT_STD / (0.5 * sqrt(n_act)) * sqrt(3.0));
        for (long d = 0; d < n; d++) {
            const long i = f->role == R_DOWN ? d : r, o = f->role == R_DOWN ? r : d;
            out[d] = unif(key3(f->key, (uint64_t)i, (uint64_t)o)) * sc;
        }
        break;
    }
    case R_GATE: {
        const float *a = L.a + r * C.rank;
        for (long d = 0; d < n; d++) out[d] = 0.0f;
        for (long j = 0; j < C.rank; j++) {
            const float aj = a[j], *u = L.U + j * n;
            for (long d = 0; d < n; d++) out[d] += aj * u[d];
        }
        float *v = tmp;
        double vv = 0;
        for (long d = 0; d < n; d++) v[d] = (float)gauss(key3(f->key, (uint64_t)r, (uint64_t)d));
        zero_mean(v, n);
        for (long d = 0; d < n; d++) vv += (double)v[d] * v[d];
        const float vs = (float)(C.noise / sqrt(vv)), bias = (float)(-L.beta[r] / sqrt((double)n));
        for (long d = 0; d < n; d++) out[d] += vs * v[d] + bias;
        break;
    }
    case R_FC1: { /* rows: U, -U, 1/sqrt(n), 0 */
        const long k = C.rank;
        for (long d = 0; d < n; d++)
            out[d] = r < k ? L.U[r * n + d] : r < 2 * k ? -L.U[(r - k) * n + d]
                     : r == 2 * k ? (float)(1.0 / sqrt((double)n)) : 0.0f;
        break;
    }
    case R_FC2: { /* row i: a_i, -a_i, -beta_i, 0 */
        const long k = C.rank;
        for (long j = 0; j < k; j++) {
            out[j] = L.a[r * k + j];
            out[k + j] = -L.a[r * k + j];
        }
        out[2 * k] = -L.beta[r];
        for (long j = 2 * k + 1; j < n; j++) out[j] = 0.0f;
        break;
    }
    case R_FREQ:
        for (long d = 0; d < n; d++) out[d] = L.p[d];
        break;
    }
}

/* Rows of one tensor, split over the pool's threads: every value comes
 * from its own key, so the file does not depend on the thread count. */
struct fill_job {
    const struct fill *f;
    char *dst;
    uint64_t row;
};

static void fill_rows(void *arg, int ith, int nth) {
    const struct fill_job *j = arg;
    const struct fill *f = j->f;
    int64_t r0, r1;
    threadpool_split(f->n_out, ith, nth, &r0, &r1);
    float *tmp = scratch + (size_t)ith * (size_t)scratch_len, *rowf = tmp + C.n_embd;
    for (int64_t r = r0; r < r1; r++) {
        char *d = j->dst + (uint64_t)r * j->row;
        gen_row(f, (long)r, rowf, tmp);
        if (f->type == DTYPE_F32) memcpy(d, rowf, (size_t)f->n_in * sizeof(float));
        else if (f->type == DTYPE_F16)
            for (long k = 0; k < f->n_in; k++) ((f16_t *)d)[k] = f32_to_f16(rowf[k]);
        else quant_quantizer(f->type)(f->n_in, rowf, d);
    }
}

static optiml_status fill_tensor(void *user, void *dst, uint64_t size) {
    const struct fill *f = user;
    if (f->il >= 0 && f->role >= R_GATE) layer_build(f->il);
    uint64_t row;
    dtype_row_size(f->type, (uint64_t)f->n_in, &row);
    if (row * (uint64_t)f->n_out != size) return optiml_fail(OPTIML_ERR_INTERNAL, "synth: tensor size mismatch");
    struct fill_job job = {.f = f, .dst = dst, .row = row};
    threadpool_run(pool, fill_rows, &job);
    if (f->role == R_GATE || f->role == R_UP || f->role == R_DOWN) XXH64_update(hash_state, dst, (size_t)size);
    if (f->role == R_DOWN_T && f->il % 4 == 0)
        fprintf(stderr, "optiml-synth: layer %ld of %ld\n", f->il + 1, C.n_layer);
    return OPTIML_OK;
}

/* ---- vocabulary (as optiml-random-model's) ---------------------------------- */

static int write_vocab(gguf_writer *w) {
    char **pieces = calloc((size_t)C.n_vocab, sizeof(char *));
    float *scores = calloc((size_t)C.n_vocab, sizeof(float));
    int32_t *types = calloc((size_t)C.n_vocab, sizeof(int32_t));
    if (!pieces || !scores || !types) return 1;
    for (long i = 0; i < C.n_vocab; i++) {
        char buf[32];
        if (i == 0) snprintf(buf, sizeof(buf), "<unk>");
        else if (i == 1) snprintf(buf, sizeof(buf), "<s>");
        else if (i == 2) snprintf(buf, sizeof(buf), "</s>");
        else if (i < 259) snprintf(buf, sizeof(buf), "<0x%02X>", (unsigned)(i - 3));
        else snprintf(buf, sizeof(buf), "\xe2\x96\x81t%ld", i);
        pieces[i] = strdup(buf);
        types[i] = i == 0 ? 2 : i < 3 ? 3 : i < 259 ? 6 : 1;
        scores[i] = -(float)i;
    }
    gguf_writer_set_str(w, "tokenizer.ggml.model", "llama");
    gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)pieces, NULL, (uint64_t)C.n_vocab);
    gguf_writer_set_arr(w, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, scores, (uint64_t)C.n_vocab);
    gguf_writer_set_arr(w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types, (uint64_t)C.n_vocab);
    gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", 1);
    gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 2);
    gguf_writer_set_u32(w, "tokenizer.ggml.unknown_token_id", 0);
    for (long i = 0; i < C.n_vocab; i++) free(pieces[i]);
    free(pieces);
    free(scores);
    free(types);
    return 0;
}

/* ---- the hash, written after the tensors ------------------------------------ */

#define HASH_PLACEHOLDER "0000000000000000"

/* Overwrite the placeholder value of optiml.sparse.weights_hash in the
 * header: key string, u32 type, u64 length, then the 16 characters. */
static int patch_hash(const char *path, uint64_t hash) {
    FILE *fp = fopen(path, "r+b");
    if (!fp) return 1;
    static char head[1 << 22];
    const size_t n = fread(head, 1, sizeof(head), fp);
    const char *key = "optiml.sparse.weights_hash";
    const size_t kl = strlen(key);
    for (size_t i = 0; i + kl + 12 + 16 <= n; i++) {
        if (memcmp(head + i, key, kl) != 0) continue;
        const size_t at = i + kl + 12;
        if (memcmp(head + at, HASH_PLACEHOLDER, 16) != 0) break;
        char hex[17];
        snprintf(hex, sizeof(hex), "%016llx", (unsigned long long)hash);
        const int ok = fseek(fp, (long)at, SEEK_SET) == 0 && fwrite(hex, 1, 16, fp) == 16;
        return fclose(fp) != 0 || !ok;
    }
    fclose(fp);
    return 1;
}

/* ---- main ------------------------------------------------------------------ */

static long arg_long(const char *flag, const char *v) {
    char *end;
    long x = strtol(v, &end, 10);
    if (*end || x <= 0) {
        fprintf(stderr, "optiml-synth: invalid value '%s' for %s\n", v, flag);
        exit(1);
    }
    return x;
}

static double arg_double(const char *flag, const char *v, double lo, double hi) {
    char *end;
    double x = strtod(v, &end);
    if (*end || !(x >= lo && x <= hi)) {
        fprintf(stderr, "optiml-synth: %s must be in [%g, %g], got '%s'\n", flag, lo, hi, v);
        exit(1);
    }
    return x;
}

static int set_shape(const char *s) {
    static const struct { const char *name; long e, l, f, h, kv; } shapes[] = {
        {"tiny", 256, 4, 1024, 4, 4},
        {"7b", 4096, 32, 11008, 32, 32},
        {"13b", 5120, 40, 13824, 40, 40},
        {"70b", 8192, 80, 28672, 64, 8},
    };
    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++)
        if (!strcmp(s, shapes[i].name)) {
            C.n_embd = shapes[i].e, C.n_layer = shapes[i].l, C.n_ff = shapes[i].f;
            C.n_head = shapes[i].h, C.n_head_kv = shapes[i].kv;
            return 0;
        }
    fprintf(stderr, "optiml-synth: --shape must be tiny, 7b, 13b or 70b\n");
    return 1;
}

static const char usage[] =
    "usage: optiml-synth --outfile M.gguf [--shape tiny|7b|13b|70b] [--n-embd N] [--n-layer N] [--n-ff N]\n"
    "       [--n-head N] [--n-head-kv N] [--vocab N] [--ctx N] [--type f16|q8_0|q4_0] [--sparsity 0.9]\n"
    "       [--hot-share 0.8] [--rank 64] [--noise 0.1] [--seed N] [--pred-type q8_0|f16]\n"
    "       [--hot-first] [--threads N (default: all CPUs; the file does not depend on it)]\n";

int main(int argc, char **argv) {
    const char *out = NULL;
    C = (struct cfg){.n_vocab = 32000, .ctx = 4096, .rank = 64, .type = DTYPE_Q4_0, .pred_type = DTYPE_Q8_0,
                     .sparsity = 0.9, .hot_share = 0.8, .noise = 0.1, .seed = 1};
    set_shape("7b");
    long n_head_kv = -1, n_threads = sysconf(_SC_NPROCESSORS_ONLN);
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(f, "-h") || !strcmp(f, "--help")) {
            fputs(usage, stdout);
            return 0;
        }
        if (!strcmp(f, "--hot-first")) { /* the one flag without a value */
            C.hot_first = true;
            continue;
        }
        if (!v) {
            fprintf(stderr, "optiml-synth: missing value for '%s'\n%s", f, usage);
            return 1;
        }
        i++;
        if (!strcmp(f, "--outfile")) out = v;
        else if (!strcmp(f, "--shape")) { if (set_shape(v)) return 1; }
        else if (!strcmp(f, "--n-embd")) C.n_embd = arg_long(f, v);
        else if (!strcmp(f, "--n-layer")) C.n_layer = arg_long(f, v);
        else if (!strcmp(f, "--n-ff")) C.n_ff = arg_long(f, v);
        else if (!strcmp(f, "--n-head")) C.n_head = arg_long(f, v);
        else if (!strcmp(f, "--n-head-kv")) n_head_kv = arg_long(f, v);
        else if (!strcmp(f, "--vocab")) C.n_vocab = arg_long(f, v);
        else if (!strcmp(f, "--ctx")) C.ctx = arg_long(f, v);
        else if (!strcmp(f, "--rank")) C.rank = arg_long(f, v);
        else if (!strcmp(f, "--threads")) n_threads = arg_long(f, v);
        else if (!strcmp(f, "--seed")) C.seed = (uint64_t)arg_long(f, v);
        else if (!strcmp(f, "--sparsity")) C.sparsity = arg_double(f, v, 0.0, 0.99);
        else if (!strcmp(f, "--hot-share")) C.hot_share = arg_double(f, v, 0.2, 0.98);
        else if (!strcmp(f, "--noise")) C.noise = arg_double(f, v, 0.0, 10.0);
        else if (!strcmp(f, "--type")) {
            const int t = dtype_from_name(v);
            if (t != DTYPE_F16 && t != DTYPE_Q8_0 && t != DTYPE_Q4_0) {
                fprintf(stderr, "optiml-synth: --type must be f16, q8_0 or q4_0\n");
                return 1;
            }
            C.type = (uint32_t)t;
        } else if (!strcmp(f, "--pred-type")) {
            /* q8_0 predictors: half the bytes of f16, read for every token */
            const int t = dtype_from_name(v);
            if (t != DTYPE_F16 && t != DTYPE_Q8_0) {
                fprintf(stderr, "optiml-synth: --pred-type must be q8_0 or f16\n");
                return 1;
            }
            C.pred_type = (uint32_t)t;
        } else {
            fprintf(stderr, "optiml-synth: unknown option '%s'\n%s", f, usage);
            return 1;
        }
    }
    C.n_head_kv = n_head_kv > 0 ? n_head_kv : C.n_head_kv;
    if (n_head_kv < 0 && C.n_head_kv > C.n_head) C.n_head_kv = C.n_head;
    const long bs = (long)dtype_block_size(C.type);
    const long pbs = (long)dtype_block_size(C.pred_type); /* fc2 rows of rr values fill whole blocks */
    if (!out || C.n_embd % C.n_head || C.n_head % C.n_head_kv || C.n_vocab < 260 || C.n_layer > 4096 ||
        C.n_embd % bs || C.n_ff % bs || C.n_embd % pbs || (C.n_embd / C.n_head) % 2) {
        fprintf(stderr, "optiml-synth: need --outfile, n_embd a multiple of n_head (even head size), n_head of "
                        "n_head_kv, n_embd and n_ff multiples of the %ld-value block, vocab >= 260\n%s", bs, usage);
        return 1;
    }
    const long n = C.n_embd, nf = C.n_ff, rr = (2 * C.rank + 2 + pbs - 1) / pbs * pbs,
               n_kv = C.n_head_kv * (n / C.n_head);
    L.U = malloc((size_t)(C.rank * n) * sizeof(float));
    L.a = malloc((size_t)(nf * C.rank) * sizeof(float));
    L.beta = malloc((size_t)nf * sizeof(float));
    L.p = malloc((size_t)nf * sizeof(float));
    if (n_threads < 1) n_threads = 1;
    if (threadpool_init((int)(n_threads > 256 ? 256 : n_threads), &pool) != OPTIML_OK) {
        fprintf(stderr, "optiml-synth: %s\n", optiml_last_error());
        return 1;
    }
    scratch_len = n + (n > nf ? (n > rr ? n : rr) : (nf > rr ? nf : rr));
    scratch = malloc((size_t)threadpool_n_threads(pool) * (size_t)scratch_len * sizeof(float));
    L.law = malloc((size_t)nf * sizeof(double));
    L.perm = malloc((size_t)nf * sizeof(long));
    hash_state = XXH64_createState();
    if (!L.U || !L.a || !L.beta || !L.p || !scratch || !L.law || !L.perm || !hash_state) return 1;
    XXH64_reset(hash_state, 0);

    gguf_writer *w = gguf_writer_init();
    if (!w) return 1;
    gguf_writer_set_str(w, "general.architecture", "llama");
    gguf_writer_set_str(w, "general.name", "optiml-synth");
    gguf_writer_set_u32(w, "llama.context_length", (uint32_t)C.ctx);
    gguf_writer_set_u32(w, "llama.embedding_length", (uint32_t)n);
    gguf_writer_set_u32(w, "llama.block_count", (uint32_t)C.n_layer);
    gguf_writer_set_u32(w, "llama.feed_forward_length", (uint32_t)nf);
    gguf_writer_set_u32(w, "llama.attention.head_count", (uint32_t)C.n_head);
    gguf_writer_set_u32(w, "llama.attention.head_count_kv", (uint32_t)C.n_head_kv);
    gguf_writer_set_f32(w, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    gguf_writer_set_f32(w, "llama.rope.freq_base", 10000.0f);
    gguf_writer_set_str(w, "optiml.ffn_activation", "relu");
    gguf_writer_set_u32(w, "optiml.sparse.version", 1);
    gguf_writer_set_str(w, "optiml.sparse.weights_hash", HASH_PLACEHOLDER);
    gguf_writer_set_f32(w, "optiml.sparse.act_threshold", 0.0f);
    gguf_writer_set_u64(w, "optiml.sparse.calib_tokens", 0);
    if (write_vocab(w)) return 1;
    /* thresholds depend only on the flags: known before any layer is built */
    const double sigma = sqrt((1.0 + C.noise * C.noise) * (1.0 - ALPHA * ALPHA));
    for (long il = 0; il < C.n_layer; il++) layer_thr[il] = (float)(-2.3 * C.noise * sigma / sqrt(1.0 + C.noise * C.noise));
    gguf_writer_set_arr(w, "optiml.sparse.layer_threshold", GGUF_TYPE_FLOAT32, layer_thr, (uint64_t)C.n_layer);

    const long n_tensors = 3 + 13 * C.n_layer;
    struct fill *fills = calloc((size_t)n_tensors, sizeof(*fills));
    char (*names)[64] = calloc((size_t)n_tensors, 64);
    if (!fills || !names) return 1;
    long k = 0;
    optiml_status st = OPTIML_OK;
    const uint32_t t = C.type;
#define ADD(fmt, il_, role_, type_, in_, out_)                                                            \
    do {                                                                                                  \
        snprintf(names[k], 64, fmt, (long)((il_) < 0 ? 0 : (il_)));                                       \
        fills[k] = (struct fill){.role = role_, .il = il_, .n_in = in_, .n_out = out_, .type = type_,      \
                                 .key = C.seed * 7919u + (uint64_t)k};                                    \
        uint64_t ne[2] = {(uint64_t)(in_), (uint64_t)(out_)};                                             \
        if (st == OPTIML_OK)                                                                              \
            st = gguf_writer_add_tensor_fn(w, names[k], type_, (out_) > 1 ? 2 : 1, ne, fill_tensor, &fills[k]); \
        k++;                                                                                              \
    } while (0)
    ADD("token_embd.weight%.0ld", -1, R_EMBD, t, n, C.n_vocab);
    for (long il = 0; il < C.n_layer; il++) {
        /* down and down_t share their element keys */
        const uint64_t down_key = C.seed * 104729u + (uint64_t)il;
        ADD("blk.%ld.attn_norm.weight", il, R_NORM, DTYPE_F32, n, 1);
        ADD("blk.%ld.attn_q.weight", il, R_ATTN, t, n, n);
        ADD("blk.%ld.attn_k.weight", il, R_ATTN, t, n, n_kv);
        ADD("blk.%ld.attn_v.weight", il, R_ATTN, t, n, n_kv);
        ADD("blk.%ld.attn_output.weight", il, R_ATTN_OUT, t, n, n);
        ADD("blk.%ld.ffn_norm.weight", il, R_NORM, DTYPE_F32, n, 1);
        ADD("blk.%ld.ffn_gate.weight", il, R_GATE, t, n, nf);
        ADD("blk.%ld.ffn_up.weight", il, R_UP, t, n, nf);
        ADD("blk.%ld.ffn_down.weight", il, R_DOWN, t, nf, n);
        fills[k - 1].key = down_key;
        ADD("blk.%ld.ffn_down_t.weight", il, R_DOWN_T, t, n, nf);
        fills[k - 1].key = down_key;
        ADD("blk.%ld.fc1.weight", il, R_FC1, C.pred_type, n, rr);
        ADD("blk.%ld.fc2.weight", il, R_FC2, C.pred_type, rr, nf);
        ADD("blk.%ld.ffn_act_freq", il, R_FREQ, DTYPE_F32, nf, 1);
    }
    ADD("output_norm.weight%.0ld", -1, R_NORM, DTYPE_F32, n, 1);
    ADD("output.weight%.0ld", -1, R_OUTPUT, t, n, C.n_vocab);
#undef ADD
    if (st == OPTIML_OK) st = gguf_writer_write(w, out);
    gguf_writer_free(w);
    if (st != OPTIML_OK) {
        fprintf(stderr, "optiml-synth: %s\n", optiml_last_error());
        return 1;
    }
    const uint64_t hash = XXH64_digest(hash_state);
    if (patch_hash(out, hash)) {
        fprintf(stderr, "optiml-synth: cannot write the weights hash into %s\n", out);
        return 1;
    }
    fprintf(stderr, "optiml-synth: wrote %s (%ld layers, n_embd %ld, n_ff %ld, %s, sparsity %.2f, hot share %.2f, "
                    "weights hash %016llx)\n", out, C.n_layer, n, nf, dtype_name(t), C.sparsity, C.hot_share,
            (unsigned long long)hash);
    XXH64_freeState(hash_state);
    threadpool_free(pool);
    free(scratch);
    free(fills);
    free(names);
    return 0;
}
