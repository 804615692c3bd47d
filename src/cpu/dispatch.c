/*
 * dispatch.c - picks the CPU kernels once from cpuid: the best variant's
 * entries where it has them, the reference kernels elsewhere.
 */
#include "cpu/ops.h"

#include "optiml.h"

#include <pthread.h>

#if defined(OPTIML_X86)
#include <cpuid.h>

bool cpu_has_avx2_fma_f16c(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
    const bool fma = c >> 12 & 1, osxsave = c >> 27 & 1, avx = c >> 28 & 1, f16c = c >> 29 & 1;
    if (!(fma && osxsave && avx && f16c)) return false;
    unsigned xcr0_lo, xcr0_hi;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & 6) != 6) return false; /* the OS saves XMM and YMM state */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return b >> 5 & 1; /* AVX2 */
}

bool cpu_has_avx512vnni(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c >> 27 & 1)) return false; /* OSXSAVE */
    unsigned xcr0_lo, xcr0_hi;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & 0xE6) != 0xE6) return false; /* the OS saves XMM, YMM, opmask and all of ZMM */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool f = b >> 16 & 1, bw = b >> 30 & 1, vl = b >> 31 & 1, vnni = c >> 11 & 1;
    return f && bw && vl && vnni;
}
#endif

static struct cpu_kernels best;
static pthread_once_t best_once = PTHREAD_ONCE_INIT;

void cpu_kernels_merge(struct cpu_kernels *dst, const struct cpu_kernels *src) {
    if (!src) return;
    dst->name = src->name;
    for (int t = 0; t < DTYPE_COUNT; t++) {
        if (src->dot[t]) dst->dot[t] = src->dot[t];
        if (src->to_f32[t]) dst->to_f32[t] = src->to_f32[t];
        if (src->dot_q[t]) dst->dot_q[t] = src->dot_q[t];
        /* tile kernels belong with their own table's dot_q (equal bits) */
        if (src->dot_q[t]) {
            dst->dot_q_x4[t] = src->dot_q_x4[t];
            dst->dot_q_2x1[t] = src->dot_q_2x1[t];
            dst->dot_q_2x4[t] = src->dot_q_2x4[t];
            dst->dot_q_next[t] = src->dot_q_next[t];
            dst->dot_q_xi[t] = src->dot_q_xi[t];
            dst->dot_q_xi_rows[t] = src->dot_q_xi_rows[t];
        }
        if (src->gemm[t]) dst->gemm[t] = src->gemm[t];
        if (src->gemv_x8[t]) dst->gemv_x8[t] = src->gemv_x8[t];
        if (src->gemm_x8[t]) dst->gemm_x8[t] = src->gemm_x8[t];
        if (src->gemm_x16[t]) dst->gemm_x16[t] = src->gemm_x16[t];
        if (src->quantize[t]) dst->quantize[t] = src->quantize[t];
        if (src->axpy[t]) dst->axpy[t] = src->axpy[t];
        if (src->axpy4[t]) dst->axpy4[t] = src->axpy4[t];
    }
    if (src->dot_f32_4x) dst->dot_f32_4x = src->dot_f32_4x;
    if (src->axpy[DTYPE_F32]) dst->axpy_f32_4y = src->axpy_f32_4y; /* its bits are its table's axpy's */
}

static void best_init(void) {
    best = *cpu_kernels_ref();
#if defined(OPTIML_X86)
    cpu_kernels_merge(&best, cpu_kernels_avx2());
    cpu_kernels_merge(&best, cpu_kernels_avx512vnni()); /* its missing entries stay avx2's */
#endif
}

const struct cpu_kernels *cpu_kernels_best(void) {
    pthread_once(&best_once, best_init);
    return &best;
}

const char *optiml_cpu_features(void) { return cpu_kernels_best()->name; }
