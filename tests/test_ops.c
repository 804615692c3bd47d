/*
 * test_ops.c - every SIMD kernel against its scalar reference twin on fresh
 * random inputs of several shapes, ragged lengths included. Prints the
 * largest relative difference per kernel; fails above 1e-5 (f32 sums in a
 * different order).
 */
#include "cpu/ops.h"
#include "test.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

static uint64_t rng_state;
static float frand(void) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

static void fill_row(uint32_t type, void *w, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = frand();
        if (type == DTYPE_F32) ((float *)w)[i] = v;
        else if (type == DTYPE_F16) ((f16_t *)w)[i] = f32_to_f16(v);
        else ((bf16_t *)w)[i] = f32_to_bf16(v);
    }
}

static void compare(const char *name, const struct cpu_kernels *k) {
    static const int64_t sizes[] = {1, 7, 8, 31, 32, 33, 64, 100, 255, 256, 1000, 4096, 11008};
    static const uint32_t types[] = {DTYPE_F32, DTYPE_F16, DTYPE_BF16};
    const struct cpu_kernels *ref = cpu_kernels_ref();
    float *x = malloc(11008 * sizeof(float)), *a = malloc(11008 * sizeof(float)), *b = malloc(11008 * sizeof(float));
    void *w = malloc(11008 * sizeof(float));
    for (size_t ti = 0; ti < 3; ti++) {
        uint32_t t = types[ti];
        double max_rel = 0.0;
        int conv_bad = 0;
        for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
            int64_t n = sizes[si];
            for (int rep = 0; rep < 4; rep++) {
                fill_row(t, w, n);
                double sum_abs = 0.0;
                for (int64_t i = 0; i < n; i++) x[i] = frand();
                ref->to_f32[t](n, w, a);
                for (int64_t i = 0; i < n; i++) sum_abs += fabs((double)a[i] * x[i]);
                double rd = ref->dot[t](n, w, x), kd = k->dot[t](n, w, x);
                double rel = fabs(rd - kd) / (sum_abs > 1e-30 ? sum_abs : 1.0);
                if (rel > max_rel) max_rel = rel;
                k->to_f32[t](n, w, b);
                for (int64_t i = 0; i < n; i++) conv_bad += a[i] != b[i];
            }
        }
        printf("%s dot %-4s: max relative difference %.3g (tolerance 1e-5)\n", name, dtype_name(t), max_rel);
        CHECK(max_rel <= 1e-5, "%s dot %s", name, dtype_name(t));
        CHECK(conv_bad == 0, "%s to_f32 %s: %d values differ", name, dtype_name(t), conv_bad);
    }
    free(x);
    free(a);
    free(b);
    free(w);
}

int main(void) {
    rng_state = (uint64_t)time(NULL);
    printf("seed %llu\n", (unsigned long long)rng_state);
    compare("best", cpu_kernels_best());
#if defined(OPTIML_X86)
    if (cpu_kernels_avx2()) {
        /* the avx2 table leaves some entries to the reference: fill them */
        struct cpu_kernels k = *cpu_kernels_ref();
        const struct cpu_kernels *v = cpu_kernels_avx2();
        for (int t = 0; t < DTYPE_COUNT; t++) {
            if (v->dot[t]) k.dot[t] = v->dot[t];
            if (v->to_f32[t]) k.to_f32[t] = v->to_f32[t];
        }
        compare("avx2", &k);
    } else {
        printf("avx2: not supported by this CPU, skipped\n");
    }
#endif
    /* elementwise ops against double-precision formulas */
    float v[64], w[64], o[64];
    double ss = 0;
    for (int i = 0; i < 64; i++) { v[i] = frand(); w[i] = frand(); ss += (double)v[i] * v[i]; }
    ops_rmsnorm(o, v, w, 64, 1e-5f);
    double worst = 0;
    for (int i = 0; i < 64; i++) worst = fmax(worst, fabs(o[i] - v[i] / sqrt(ss / 64 + 1e-5) * w[i]));
    CHECK(worst < 1e-5, "rmsnorm off by %g", worst);
    float g[4] = {-1.0f, 0.0f, 0.5f, 2.0f}, u[4] = {2.0f, 3.0f, 4.0f, 5.0f}, g2[4];
    for (int i = 0; i < 4; i++) g2[i] = g[i];
    ops_act_mul(g2, u, 4, FFN_ACT_SILU);
    for (int i = 0; i < 4; i++) CHECK_CLOSE(g2[i], g[i] / (1 + exp(-g[i])) * u[i], 1e-6);
    for (int i = 0; i < 4; i++) g2[i] = g[i];
    ops_act_mul(g2, u, 4, FFN_ACT_RELU2);
    for (int i = 0; i < 4; i++) CHECK_CLOSE(g2[i], (g[i] > 0 ? g[i] * g[i] : 0) * u[i], 1e-6);
    float sm[5] = {1, 2, 3, 4, -1000};
    ops_softmax(sm, 5);
    double z = exp(1) + exp(2) + exp(3) + exp(4);
    CHECK_CLOSE(sm[3], exp(4) / z, 1e-6);
    CHECK(sm[4] == 0.0f);
    return test_summary("test_ops");
}
