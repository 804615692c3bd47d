/*
 * test_quant.c - the reference quantizers of src/quant.c: block sizes
 * against dtype.c's table, round-trip error per type on random data
 * (bounds below), and edge cases: all-zero blocks, large values,
 * subnormal values, NaN and infinities (quantized as 0, see quant.h), the
 * q8_1 sum and q8_k block sums. Bit-exactness against gguf-py is tests/python/test_quant_formats.py.
 */
#include "dtype.h"
#include "quant.h"
#include "test.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t rng_state;
static float frand(void) { /* uniform in [-1, 1) */
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

/* Round-trip bound: relative RMS error (||dequant(quant(x)) - x|| / ||x||)
 * for x uniform in [-1, 1). Rounding to a grid of step h leaves an RMS
 * error of h / sqrt(12); with rms(x) = 1/sqrt(3) that is h / 2. The grid
 * steps: q8 amax/127 (0.0039), q6_k about 1/32 of a 16-value group's range
 * midpoint (0.016), q5_0/q5_1/q5_k range/31 (0.032), q4_0/q4_1/q4_k range/15
 * (0.067), q3_k 1/4 (0.125), q2_k range/3 (0.33); each bound is that
 * estimate plus 25% for the quantized scales. */
static const struct { uint32_t type; double bound; } round_trip[] = {
    {DTYPE_Q4_0, 0.085}, {DTYPE_Q4_1, 0.085}, {DTYPE_Q5_0, 0.042}, {DTYPE_Q5_1, 0.042},
    {DTYPE_Q8_0, 0.005}, {DTYPE_Q8_1, 0.005}, {DTYPE_Q2_K, 0.42},  {DTYPE_Q3_K, 0.16},
    {DTYPE_Q4_K, 0.085}, {DTYPE_Q5_K, 0.042}, {DTYPE_Q6_K, 0.021}, {DTYPE_Q8_K, 0.005},
};
#define N_TYPES (sizeof(round_trip) / sizeof(round_trip[0]))

static double rel_rms(const float *a, const float *b, int64_t n) {
    double e = 0, s = 0;
    for (int64_t i = 0; i < n; i++) {
        e += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        s += (double)b[i] * b[i];
    }
    return s > 0 ? sqrt(e / s) : sqrt(e);
}

static void check_sizes(void) {
    static const struct { uint32_t type; size_t size, block; } t[] = {
        {DTYPE_Q4_0, sizeof(block_q4_0), QK4_0}, {DTYPE_Q4_1, sizeof(block_q4_1), QK4_1},
        {DTYPE_Q5_0, sizeof(block_q5_0), QK5_0}, {DTYPE_Q5_1, sizeof(block_q5_1), QK5_1},
        {DTYPE_Q8_0, sizeof(block_q8_0), QK8_0}, {DTYPE_Q8_1, sizeof(block_q8_1), QK8_1},
        {DTYPE_Q2_K, sizeof(block_q2_K), QK_K},  {DTYPE_Q3_K, sizeof(block_q3_K), QK_K},
        {DTYPE_Q4_K, sizeof(block_q4_K), QK_K},  {DTYPE_Q5_K, sizeof(block_q5_K), QK_K},
        {DTYPE_Q6_K, sizeof(block_q6_K), QK_K},  {DTYPE_Q8_K, sizeof(block_q8_K), QK_K},
    };
    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        CHECK(t[i].size == dtype_type_size(t[i].type), "%s: struct %zu bytes, table %u", dtype_name(t[i].type),
              t[i].size, dtype_type_size(t[i].type));
        CHECK(t[i].block == dtype_block_size(t[i].type), "%s block size", dtype_name(t[i].type));
        CHECK(quant_quantizer(t[i].type) && quant_dequantizer(t[i].type), "%s has converters",
              dtype_name(t[i].type));
    }
    CHECK(quant_quantizer(DTYPE_F32) == NULL && quant_dequantizer(DTYPE_IQ2_XXS) == NULL);
    CHECK(quant_quantizer(1000) == NULL && quant_dequantizer(1000) == NULL);
}

int main(void) {
    rng_state = (uint64_t)time(NULL);
    printf("seed %llu\n", (unsigned long long)rng_state);
    check_sizes();
    const int64_t n = 4096; /* 128 blocks of 32, 16 of 256 */
    float *x = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float));
    void *q = malloc((size_t)n * 2);
    for (size_t k = 0; k < N_TYPES; k++) {
        const uint32_t t = round_trip[k].type;
        const int64_t bs = dtype_block_size(t);
        const quant_quantize_fn quant = quant_quantizer(t);
        const quant_dequantize_fn deq = quant_dequantizer(t);

        /* random data, and a row scaled by 1e4 (f16 scales still finite) */
        double worst = 0.0, worst_big = 0.0;
        for (int rep = 0; rep < 4; rep++) {
            for (int64_t i = 0; i < n; i++) x[i] = frand();
            quant(n, x, q);
            deq(n, q, y);
            worst = fmax(worst, rel_rms(y, x, n));
            for (int64_t i = 0; i < n; i++) x[i] *= 1e4f;
            quant(n, x, q);
            deq(n, q, y);
            worst_big = fmax(worst_big, rel_rms(y, x, n));
        }
        printf("%-5s round trip: relative RMS error %.4f (bound %.3f), at 1e4 scale %.4f\n", dtype_name(t), worst,
               round_trip[k].bound, worst_big);
        CHECK(worst <= round_trip[k].bound, "%s: round-trip error %g above %g", dtype_name(t), worst,
              round_trip[k].bound);
        CHECK(worst_big <= round_trip[k].bound, "%s at 1e4 scale: error %g", dtype_name(t), worst_big);

        /* all-zero blocks come back exactly zero */
        memset(x, 0, (size_t)n * sizeof(float));
        quant(n, x, q);
        deq(n, q, y);
        int nonzero = 0;
        for (int64_t i = 0; i < n; i++) nonzero += y[i] != 0.0f;
        CHECK(nonzero == 0, "%s: %d values of an all-zero row dequantize to non-zero", dtype_name(t), nonzero);

        /* subnormal values (1 / scale overflows): a block of zeros */
        for (int64_t i = 0; i < n; i++) x[i] = frand() * 1e-39f;
        quant(n, x, q);
        deq(n, q, y);
        double worst_sub = 0.0, max_abs = 0.0;
        for (int64_t i = 0; i < n; i++) {
            worst_sub = fmax(worst_sub, fabs((double)y[i] - x[i]));
            max_abs = fmax(max_abs, fabs((double)x[i]));
        }
        /* no worse than a block of zeros (the inputs are ~1e-39 as floats) */
        CHECK(worst_sub <= max_abs, "%s: subnormal row off by %g (largest input %g)", dtype_name(t), worst_sub,
              max_abs);

        /* a constant block: every value within the bound of the constant */
        for (int64_t i = 0; i < bs; i++) x[i] = 0.75f;
        quant(bs, x, q);
        deq(bs, q, y);
        CHECK(rel_rms(y, x, bs) <= round_trip[k].bound, "%s: constant block error %g", dtype_name(t),
              rel_rms(y, x, bs));

        /* NaN and infinities quantize as 0: the rest of the block is intact */
        for (int64_t i = 0; i < bs; i++) x[i] = frand();
        float *z = malloc((size_t)bs * sizeof(float));
        memcpy(z, x, (size_t)bs * sizeof(float));
        x[3] = NAN;
        x[bs - 2] = INFINITY;
        x[bs / 2] = -INFINITY;
        z[3] = z[bs - 2] = z[bs / 2] = 0.0f;
        quant(bs, x, q);
        deq(bs, q, y);
        int finite = 1;
        for (int64_t i = 0; i < bs; i++) finite &= isfinite(y[i]) != 0;
        CHECK(finite, "%s: non-finite inputs give non-finite outputs", dtype_name(t));
        CHECK(rel_rms(y, z, bs) <= round_trip[k].bound * 1.5, "%s: block with NaN/inf: error %g",
              dtype_name(t), rel_rms(y, z, bs));
        free(z);
    }

    /* q8_1: s = d * sum(q); q8_k: bsums are the sums of 16 quants */
    for (int64_t i = 0; i < n; i++) x[i] = frand();
    quant_quantizer(DTYPE_Q8_1)(QK8_1, x, q);
    const block_q8_1 *b1 = q;
    int sum = 0;
    for (int j = 0; j < QK8_1; j++) sum += b1->qs[j];
    CHECK_CLOSE(f16_to_f32(b1->s), f16_to_f32(f32_to_f16(sum * f16_to_f32(b1->d))), 2e-3);
    quant_quantizer(DTYPE_Q8_K)(QK_K, x, q);
    const block_q8_K *bk = q;
    int bad = 0, qmax = 0;
    for (int g = 0; g < 16; g++) {
        int s = 0;
        for (int j = 0; j < 16; j++) {
            s += bk->qs[16 * g + j];
            qmax = abs(bk->qs[16 * g + j]) > qmax ? abs(bk->qs[16 * g + j]) : qmax;
        }
        bad += s != bk->bsums[g];
    }
    CHECK(bad == 0, "q8_k: %d block sums wrong", bad);
    CHECK(qmax == 127, "q8_k: largest quant %d, expected 127", qmax);

    free(x);
    free(y);
    free(q);
    return test_summary("test_quant");
}
