/*
 * ops.c - scalar reference kernels and elementwise ops (see ops.h).
 */
#include "cpu/ops.h"

#include <math.h>

/* ---- reference dot products and conversions -------------------------- */

static float dot_f32_ref(int64_t n, const void *w, const float *x) {
    const float *a = w;
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += a[i] * x[i];
    return s;
}

static float dot_f16_ref(int64_t n, const void *w, const float *x) {
    const f16_t *a = w;
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += f16_to_f32(a[i]) * x[i];
    return s;
}

static float dot_bf16_ref(int64_t n, const void *w, const float *x) {
    const bf16_t *a = w;
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += bf16_to_f32(a[i]) * x[i];
    return s;
}

static void to_f32_f32(int64_t n, const void *src, float *dst) {
    const float *s = src;
    for (int64_t i = 0; i < n; i++) dst[i] = s[i];
}

static void to_f32_f16(int64_t n, const void *src, float *dst) {
    const f16_t *s = src;
    for (int64_t i = 0; i < n; i++) dst[i] = f16_to_f32(s[i]);
}

static void to_f32_bf16(int64_t n, const void *src, float *dst) {
    const bf16_t *s = src;
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
}

static const struct cpu_kernels kernels_ref = {
    .name = "ref",
    .dot = {[DTYPE_F32] = dot_f32_ref, [DTYPE_F16] = dot_f16_ref, [DTYPE_BF16] = dot_bf16_ref},
    .to_f32 = {[DTYPE_F32] = to_f32_f32, [DTYPE_F16] = to_f32_f16, [DTYPE_BF16] = to_f32_bf16},
};

const struct cpu_kernels *cpu_kernels_ref(void) { return &kernels_ref; }

/* ---- elementwise ops --------------------------------------------------- */

void ops_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float scale = (float)(1.0 / sqrt(ss / (double)n + eps));
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * scale * w[i];
}

void ops_rope(float *x, const float *cos_sin, int64_t n_rot) {
    for (int64_t i = 0; i < n_rot / 2; i++) {
        float c = cos_sin[2 * i], s = cos_sin[2 * i + 1];
        float a = x[2 * i], b = x[2 * i + 1];
        x[2 * i] = a * c - b * s;
        x[2 * i + 1] = a * s + b * c;
    }
}

void ops_softmax(float *x, int64_t n) {
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    float inv = 1.0f / sum;
    for (int64_t i = 0; i < n; i++) x[i] *= inv;
}

void ops_act_mul(float *gate, const float *up, int64_t n, enum ffn_act act) {
    switch (act) {
    case FFN_ACT_SILU:
        for (int64_t i = 0; i < n; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
        break;
    case FFN_ACT_RELU:
        for (int64_t i = 0; i < n; i++) gate[i] = (gate[i] > 0.0f ? gate[i] : 0.0f) * up[i];
        break;
    case FFN_ACT_RELU2:
        for (int64_t i = 0; i < n; i++) {
            float r = gate[i] > 0.0f ? gate[i] : 0.0f;
            gate[i] = r * r * up[i];
        }
        break;
    case FFN_ACT_GELU:
        for (int64_t i = 0; i < n; i++) {
            float g = gate[i];
            float t = tanhf(0.7978845608f * (g + 0.044715f * g * g * g));
            gate[i] = 0.5f * g * (1.0f + t) * up[i];
        }
        break;
    }
}
