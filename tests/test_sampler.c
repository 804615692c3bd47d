/*
 * test_sampler.c - the sampling chain: greedy is argmax, the same seed gives
 * the same draws, draws follow softmax(logits / temp), and top-k, top-p,
 * min-p and the repetition penalty remove or reweight the right tokens.
 */
#include "optiml.h"
#include "test.h"

#include <math.h>
#include <string.h>

static optiml_sampler_params plain(float temp, uint64_t seed) {
    optiml_sampler_params p = optiml_sampler_default_params();
    p.temp = temp;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.repeat_penalty = 1.0f;
    p.seed = seed;
    return p;
}

/* Draw n tokens and count them. */
static void histogram(optiml_sampler_params p, const float *logits, int n_vocab, int n, int *counts) {
    optiml_sampler *s = optiml_sampler_init(&p, n_vocab);
    memset(counts, 0, (size_t)n_vocab * sizeof(int));
    for (int i = 0; i < n; i++) counts[optiml_sampler_sample(s, logits)]++;
    optiml_sampler_free(s);
}

int main(void) {
    const float logits[5] = {1.0f, 3.0f, 2.5f, -1.0f, 3.0f};
    int counts[5];

    optiml_sampler_params p = plain(0.0f, 1);
    optiml_sampler *s = optiml_sampler_init(&p, 5);
    CHECK(optiml_sampler_sample(s, logits) == 1, "greedy picks the first of equal maxima");
    optiml_sampler_free(s);

    /* same seed, same sequence; another seed, another sequence */
    optiml_token a[64], b[64], c[64];
    optiml_sampler_params p42 = plain(1.0f, 42), p43 = plain(1.0f, 43);
    optiml_sampler *sa = optiml_sampler_init(&p42, 5);
    optiml_sampler *sb = optiml_sampler_init(&p42, 5);
    optiml_sampler *sc = optiml_sampler_init(&p43, 5);
    for (int i = 0; i < 64; i++) {
        a[i] = optiml_sampler_sample(sa, logits);
        b[i] = optiml_sampler_sample(sb, logits);
        c[i] = optiml_sampler_sample(sc, logits);
    }
    CHECK(memcmp(a, b, sizeof(a)) == 0, "same seed gives the same tokens");
    CHECK(memcmp(a, c, sizeof(a)) != 0, "different seeds differ");
    optiml_sampler_reset(sa);
    for (int i = 0; i < 64; i++) b[i] = optiml_sampler_sample(sa, logits);
    CHECK(memcmp(a, b, sizeof(a)) == 0, "reset re-seeds");
    optiml_sampler_free(sa);
    optiml_sampler_free(sb);
    optiml_sampler_free(sc);

    /* frequencies follow softmax(logits / temp) */
    const int n = 40000;
    for (float temp = 0.5f; temp <= 2.0f; temp *= 2.0f) {
        histogram(plain(temp, 7), logits, 5, n, counts);
        double z = 0;
        for (int i = 0; i < 5; i++) z += exp(logits[i] / temp);
        for (int i = 0; i < 5; i++) {
            double pr = exp(logits[i] / temp) / z;
            double sd = sqrt(n * pr * (1 - pr)) + 1;
            CHECK(fabs(counts[i] - n * pr) < 5 * sd, "temp %g token %d: %d draws, expected %.0f", temp, i,
                  counts[i], n * pr);
        }
    }

    /* top-k 2 keeps the two largest (ids 1 and 4, equal logits) */
    optiml_sampler_params pk = plain(1.0f, 3);
    pk.top_k = 2;
    histogram(pk, logits, 5, 2000, counts);
    CHECK(counts[0] == 0 && counts[2] == 0 && counts[3] == 0 && counts[1] > 0 && counts[4] > 0);

    /* top-k on a large vocabulary: only the k largest logits are ever drawn
     * (quickselect path), and their frequencies follow their softmax */
    enum { NV = 5000, K = 7 };
    static float big[NV];
    static int big_counts[NV];
    uint64_t x = 99;
    for (int i = 0; i < NV; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        big[i] = (float)((x >> 40) % 1000) / 100.0f; /* ties are common */
    }
    int order[NV];
    for (int i = 0; i < NV; i++) order[i] = i;
    for (int i = 0; i < K; i++) /* selection sort of the K best: (logit desc, id asc) */
        for (int j = i + 1; j < NV; j++)
            if (big[order[j]] > big[order[i]] || (big[order[j]] == big[order[i]] && order[j] < order[i])) {
                int t = order[i];
                order[i] = order[j];
                order[j] = t;
            }
    optiml_sampler_params pbig = plain(1.0f, 11);
    pbig.top_k = K;
    histogram(pbig, big, NV, 20000, big_counts);
    int outside = 20000;
    for (int i = 0; i < K; i++) outside -= big_counts[order[i]];
    CHECK(outside == 0, "%d draws outside the top %d", outside, K);
    double zk = 0;
    for (int i = 0; i < K; i++) zk += exp(big[order[i]]);
    for (int i = 0; i < K; i++) {
        double pr = exp(big[order[i]]) / zk, sd = sqrt(20000 * pr * (1 - pr)) + 1;
        CHECK(fabs(big_counts[order[i]] - 20000 * pr) < 5 * sd, "top-k token %d", order[i]);
    }

    /* top-p: probabilities 0.3706 (x2), 0.2248, 0.0301, 0.0041 at temp 1;
     * p = 0.7 keeps the first two, 0.75 the first three */
    optiml_sampler_params pp = plain(1.0f, 5);
    pp.top_p = 0.7f;
    histogram(pp, logits, 5, 2000, counts);
    CHECK(counts[0] == 0 && counts[2] == 0 && counts[3] == 0);
    pp.top_p = 0.75f;
    histogram(pp, logits, 5, 4000, counts);
    CHECK(counts[2] > 0 && counts[0] == 0 && counts[3] == 0);

    /* min-p 0.5: keeps tokens with p >= 0.5 * p_max (ids 1, 4, 2) */
    optiml_sampler_params pm = plain(1.0f, 9);
    pm.min_p = 0.5f;
    histogram(pm, logits, 5, 4000, counts);
    CHECK(counts[0] == 0 && counts[3] == 0 && counts[2] > 0);

    /* repetition penalty: after accepting 1 and 4, greedy moves to 2 */
    optiml_sampler_params pr = plain(0.0f, 1);
    pr.repeat_penalty = 1.5f;
    s = optiml_sampler_init(&pr, 5);
    optiml_sampler_accept(s, 1);
    optiml_sampler_accept(s, 4);
    optiml_sampler_accept(s, 4);
    CHECK(optiml_sampler_sample(s, logits) == 2, "penalized 3.0/1.5 = 2.0 < 2.5");
    optiml_sampler_free(s);

    /* invalid parameters are refused with a reason */
    optiml_sampler_params bad = plain(1.0f, 1);
    bad.repeat_penalty = 0.0f;
    CHECK(optiml_sampler_init(&bad, 5) == NULL && strlen(optiml_last_error()) > 0);
    CHECK(optiml_sampler_init(&pr, 0) == NULL);
    return test_summary("test_sampler");
}
