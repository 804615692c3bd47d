/*
 * ops.h - CPU kernels: dot products and row conversion per weight type
 * (reference C and SIMD variants chosen at run time), and the elementwise
 * ops of the Llama forward pass.
 *
 * Every SIMD kernel has a scalar twin in cpu_kernels_ref(); tests/test_ops.c
 * compares them on fresh random inputs.
 */
#ifndef OPTIML_CPU_OPS_H
#define OPTIML_CPU_OPS_H

#include "dtype.h"

#include <stdbool.h>
#include <stdint.h>

/* sum_i w[i] * x[i] for a weight row of type T and n f32 activations. */
typedef float (*cpu_dot_fn)(int64_t n, const void *w, const float *x);
/* dst[i] = (float)src[i] for a row of n elements of type T. */
typedef void (*cpu_to_f32_fn)(int64_t n, const void *src, float *dst);

struct cpu_kernels {
    const char *name;                  /* "ref", "avx2"                   */
    cpu_dot_fn dot[DTYPE_COUNT];       /* NULL where the type has none    */
    cpu_to_f32_fn to_f32[DTYPE_COUNT]; /* NULL where the type has none    */
};

/* The scalar reference kernels (every supported type). */
const struct cpu_kernels *cpu_kernels_ref(void);
/* The fastest kernels this CPU runs (checked with cpuid once). */
const struct cpu_kernels *cpu_kernels_best(void);
#if defined(OPTIML_X86)
/* cpuid (and the OS's saved-state flags) say AVX2, FMA and F16C run here. */
bool cpu_has_avx2_fma_f16c(void);
/* AVX2+FMA+F16C variants (entries NULL fall back to ref); NULL if the CPU
 * lacks the instructions. */
const struct cpu_kernels *cpu_kernels_avx2(void);
#endif

/* ---- elementwise ops (scalar, cheap next to the matrix work) ---------- */

/* out = x / rms(x) * w */
void ops_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps);
/* In place, one head of head_dim values: rotate pairs (2i, 2i+1) for
 * i < n_rot/2 by angle pos * inv_freq[i] (cos_sin holds cos, sin pairs). */
void ops_rope(float *x, const float *cos_sin, int64_t n_rot);
/* In place softmax over n values. */
void ops_softmax(float *x, int64_t n);

enum ffn_act {
    FFN_ACT_SILU = 0,
    FFN_ACT_RELU = 1,
    FFN_ACT_RELU2 = 2, /* squared ReLU */
    FFN_ACT_GELU = 3,  /* tanh approximation */
};
/* gate[i] = act(gate[i]) * up[i] */
void ops_act_mul(float *gate, const float *up, int64_t n, enum ffn_act act);

#endif /* OPTIML_CPU_OPS_H */
