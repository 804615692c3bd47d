/*
 * ops.c - scalar reference kernels (f32/f16/bf16 dots, quantized dots
 * against 8-bit activations) and elementwise ops (see ops.h).
 */
#include "cpu/ops.h"

#include "quant.h"

#include <math.h>
#include <pthread.h>
#include <string.h>

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

/* ---- reference quantized dot products --------------------------------
 * Each block: the integer dot of the weight quants (quant.h's unpack
 * helpers) with the activation quants, then the float scales. */

static int32_t idot(const int8_t *a, const int8_t *b, int n) {
    int32_t s = 0;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static float dot_q4_0_ref(int64_t n, const void *w, const void *xq) {
    const block_q4_0 *a = w;
    const block_q8_0 *b = xq;
    int8_t q[QK4_0];
    float s = 0.0f;
    for (int64_t i = 0; i < n / QK4_0; i++) {
        quant_unpack_q4_0(&a[i], q);
        s += (float)idot(q, b[i].qs, QK4_0) * f16_to_f32(a[i].d) * f16_to_f32(b[i].d);
    }
    return s;
}

static float dot_q4_1_ref(int64_t n, const void *w, const void *xq) {
    const block_q4_1 *a = w;
    const block_q8_1 *b = xq;
    int8_t q[QK4_1];
    float s = 0.0f;
    for (int64_t i = 0; i < n / QK4_1; i++) {
        quant_unpack_q4_1(&a[i], q);
        s += (float)idot(q, b[i].qs, QK4_1) * f16_to_f32(a[i].d) * f16_to_f32(b[i].d) +
             f16_to_f32(a[i].m) * f16_to_f32(b[i].s);
    }
    return s;
}

static float dot_q5_0_ref(int64_t n, const void *w, const void *xq) {
    const block_q5_0 *a = w;
    const block_q8_0 *b = xq;
    int8_t q[QK5_0];
    float s = 0.0f;
    for (int64_t i = 0; i < n / QK5_0; i++) {
        quant_unpack_q5(a[i].qs, a[i].qh, q);
        for (int j = 0; j < QK5_0; j++) q[j] = (int8_t)(q[j] - 16);
        s += (float)idot(q, b[i].qs, QK5_0) * f16_to_f32(a[i].d) * f16_to_f32(b[i].d);
    }
    return s;
}

static float dot_q5_1_ref(int64_t n, const void *w, const void *xq) {
    const block_q5_1 *a = w;
    const block_q8_1 *b = xq;
    int8_t q[QK5_1];
    float s = 0.0f;
    for (int64_t i = 0; i < n / QK5_1; i++) {
        quant_unpack_q5(a[i].qs, a[i].qh, q);
        s += (float)idot(q, b[i].qs, QK5_1) * f16_to_f32(a[i].d) * f16_to_f32(b[i].d) +
             f16_to_f32(a[i].m) * f16_to_f32(b[i].s);
    }
    return s;
}

static float dot_q8_0_ref(int64_t n, const void *w, const void *xq) {
    const block_q8_0 *a = w;
    const block_q8_0 *b = xq;
    float s = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; i++)
        s += (float)idot(a[i].qs, b[i].qs, QK8_0) * f16_to_f32(a[i].d) * f16_to_f32(b[i].d);
    return s;
}

/* sum_j mins[j] * (activation sum of sub-block j), sub-blocks of 16 * per16 values */
static int32_t ksum_mins(const int16_t *bsums, const uint8_t *mins, int n_sub, int per16) {
    int32_t s = 0;
    for (int j = 0; j < n_sub; j++)
        for (int k = 0; k < per16; k++) s += mins[j] * bsums[j * per16 + k];
    return s;
}

static float dot_q2_K_ref(int64_t n, const void *w, const void *xq) {
    const block_q2_K *a = w;
    const block_q8_K *b = xq;
    int8_t q[QK_K];
    float s = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        quant_unpack_q2_k(&a[i], q);
        int32_t isum = 0;
        uint8_t mins[16];
        for (int j = 0; j < 16; j++) {
            isum += (a[i].scales[j] & 0xF) * idot(q + 16 * j, b[i].qs + 16 * j, 16);
            mins[j] = a[i].scales[j] >> 4;
        }
        const int32_t msum = ksum_mins(b[i].bsums, mins, 16, 1);
        s += b[i].d * f16_to_f32(a[i].d) * (float)isum - b[i].d * f16_to_f32(a[i].dmin) * (float)msum;
    }
    return s;
}

static float dot_q3_K_ref(int64_t n, const void *w, const void *xq) {
    const block_q3_K *a = w;
    const block_q8_K *b = xq;
    int8_t q[QK_K];
    float s = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        quant_unpack_q3_k(&a[i], q);
        int32_t isum = 0;
        for (int j = 0; j < 16; j++) isum += quant_scale_q3_k(j, a[i].scales) * idot(q + 16 * j, b[i].qs + 16 * j, 16);
        s += b[i].d * f16_to_f32(a[i].d) * (float)isum;
    }
    return s;
}

/* q4_k and q5_k: 8 sub-blocks of 32 with 6-bit scales and mins. */
static float dot_k4_block(const int8_t *q, const block_q8_K *b, const uint8_t *scales, uint16_t d, uint16_t dmin) {
    int32_t isum = 0;
    uint8_t sc[8], mins[8];
    for (int j = 0; j < 8; j++) {
        quant_scale_min_k4(j, scales, &sc[j], &mins[j]);
        isum += sc[j] * idot(q + 32 * j, b->qs + 32 * j, 32);
    }
    const int32_t msum = ksum_mins(b->bsums, mins, 8, 2);
    return b->d * f16_to_f32(d) * (float)isum - b->d * f16_to_f32(dmin) * (float)msum;
}

static float dot_q4_K_ref(int64_t n, const void *w, const void *xq) {
    const block_q4_K *a = w;
    const block_q8_K *b = xq;
    int8_t q[QK_K];
    float s = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        quant_unpack_q4_k(&a[i], q);
        s += dot_k4_block(q, &b[i], a[i].scales, a[i].d, a[i].dmin);
    }
    return s;
}

static float dot_q5_K_ref(int64_t n, const void *w, const void *xq) {
    const block_q5_K *a = w;
    const block_q8_K *b = xq;
    int8_t q[QK_K];
    float s = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        quant_unpack_q5_k(&a[i], q);
        s += dot_k4_block(q, &b[i], a[i].scales, a[i].d, a[i].dmin);
    }
    return s;
}

static float dot_q6_K_ref(int64_t n, const void *w, const void *xq) {
    const block_q6_K *a = w;
    const block_q8_K *b = xq;
    int8_t q[QK_K];
    float s = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        quant_unpack_q6_k(&a[i], q);
        int32_t isum = 0;
        for (int j = 0; j < 16; j++) isum += a[i].scales[j] * idot(q + 16 * j, b[i].qs + 16 * j, 16);
        s += b[i].d * f16_to_f32(a[i].d) * (float)isum;
    }
    return s;
}

/* ---- reference axpy (sparse down rows) ----------------------------------- */

static void axpy_f32_ref(int64_t n, float a, const void *w, float *y) {
    const float *v = w;
    for (int64_t i = 0; i < n; i++) y[i] += a * v[i];
}

static void axpy_f16_ref(int64_t n, float a, const void *w, float *y) {
    const f16_t *v = w;
    for (int64_t i = 0; i < n; i++) y[i] += a * f16_to_f32(v[i]);
}

static void axpy_q8_0_ref(int64_t n, float a, const void *w, float *y) {
    const block_q8_0 *b = w;
    for (int64_t k = 0; k < n / QK8_0; k++) {
        const float d = a * f16_to_f32(b[k].d);
        for (int j = 0; j < QK8_0; j++) y[k * QK8_0 + j] += d * (float)b[k].qs[j];
    }
}

static void axpy_q4_0_ref(int64_t n, float a, const void *w, float *y) {
    const block_q4_0 *b = w;
    int8_t q[QK4_0];
    for (int64_t k = 0; k < n / QK4_0; k++) {
        const float d = a * f16_to_f32(b[k].d);
        quant_unpack_q4_0(&b[k], q);
        for (int j = 0; j < QK4_0; j++) y[k * QK4_0 + j] += d * (float)q[j];
    }
}

/* ---- prompt GEMM: preparation and the reference twin -------------------- */

void cpu_gemm_prep_q8_0(int64_t n, const void *xq, struct cpu_gemm_xblock *dst) {
    const block_q8_0 *b = xq;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        int32_t s = 0;
        for (int j = 0; j < QK8_0; j++) s += b[i].qs[j];
        const float d = f16_to_f32(b[i].d);
        dst[i] = (struct cpu_gemm_xblock){.d = d, .m8 = -8.0f * d * (float)s};
    }
}

void cpu_gemm_ref(uint32_t type, int64_t n, const void *w, uint64_t w_stride, int n_rows, const void *xq,
                  uint64_t xq_stride, int64_t n_tok, float *y, uint64_t y_stride, bool accumulate) {
    const cpu_dot_q_fn dot_q = cpu_kernels_ref()->dot_q[type];
    for (int64_t t = 0; t < n_tok; t++)
        for (int r = 0; r < n_rows; r++) {
            const float s = dot_q(n, (const char *)w + r * w_stride, (const char *)xq + t * xq_stride);
            float *o = &y[t * y_stride + r];
            *o = accumulate ? *o + s : s;
        }
}

/* ---- x8 panels (cpu/ops.h): the layout and the reference decode -------- */

uint64_t cpu_x8_panel_size(uint32_t type, int64_t n) {
    if (n <= 0) return 0;
    if (type == DTYPE_Q4_0 && n % QK4_0 == 0) return (uint64_t)(n / QK4_0) * sizeof(struct cpu_x8_q4_0);
    if (type == DTYPE_Q4_K && n % QK_K == 0) return (uint64_t)(n / QK_K) * sizeof(struct cpu_x8_q4_K);
    return 0;
}

bool cpu_pack_x8(uint32_t type, int64_t n, const void *w, uint64_t w_stride, void *dst) {
    if (cpu_x8_panel_size(type, n) == 0) return false;
    if (type == DTYPE_Q4_K) {
        struct cpu_x8_q4_K *p = dst;
        for (int64_t i = 0; i < n / QK_K; i++)
            for (int r = 0; r < CPU_X8_ROWS; r++) {
                const block_q4_K *b = (const block_q4_K *)((const char *)w + (uint64_t)r * w_stride) + i;
                p[i].d[r] = b->d;
                p[i].dmin[r] = b->dmin;
                for (int j = 0; j < 8; j++)
                    quant_scale_min_k4(j, b->scales, &p[i].sc[j][r], &p[i].mn[j / 2][2 * r + j % 2]);
                for (int c = 0; c < 4; c++)
                    for (int g = 0; g < 8; g++) memcpy(&p[i].q[c][g][4 * r], b->qs + 32 * c + 4 * g, 4);
            }
        return true;
    }
    struct cpu_x8_q4_0 *p = dst;
    for (int64_t i = 0; i < n / QK4_0; i++)
        for (int r = 0; r < CPU_X8_ROWS; r++) {
            const block_q4_0 *b = (const block_q4_0 *)((const char *)w + (uint64_t)r * w_stride) + i;
            p[i].d[r] = b->d;
            for (int g = 0; g < 4; g++) memcpy(&p[i].q[g][4 * r], b->qs + 4 * g, 4);
        }
    return true;
}

/* Per row, in the SIMD kernels' order: the block's exact integer sum of
 * nibble x input, acc = fma(dw dx, sum, acc), the -8 term apart. */
static void gemv_x8_q4_0_ref(int64_t n, const void *p, int64_t n_panels, const void *xq,
                             const struct cpu_gemm_xblock *xi, float *out) {
    const int64_t nb = n / QK4_0;
    const block_q8_0 *x = xq;
    for (int64_t k = 0; k < n_panels; k++) {
        const struct cpu_x8_q4_0 *b = (const struct cpu_x8_q4_0 *)p + k * nb;
        for (int r = 0; r < CPU_X8_ROWS; r++) {
            float acc = 0.0f, corr = 0.0f;
            for (int64_t i = 0; i < nb; i++) {
                int32_t sum = 0;
                for (int g = 0; g < 4; g++)
                    for (int j = 0; j < 4; j++) {
                        const uint8_t q = b[i].q[g][4 * r + j];
                        sum += (q & 15) * x[i].qs[4 * g + j] + (q >> 4) * x[i].qs[16 + 4 * g + j];
                    }
                const float dw = f16_to_f32(b[i].d[r]);
                acc = fmaf(dw * xi[i].d, (float)sum, acc);
                corr = fmaf(dw, xi[i].m8, corr);
            }
            out[k * CPU_X8_ROWS + r] = acc + corr;
        }
    }
}

/* q4_k, in the SIMD kernels' order (cpu/ops.h). */
static void gemv_x8_q4_K_ref(int64_t n, const void *p, int64_t n_panels, const void *xq,
                             const struct cpu_gemm_xblock *xi, float *out) {
    (void)xi;
    const int64_t nb = n / QK_K;
    const block_q8_K *x = xq;
    for (int64_t k = 0; k < n_panels; k++) {
        const struct cpu_x8_q4_K *b = (const struct cpu_x8_q4_K *)p + k * nb;
        for (int r = 0; r < CPU_X8_ROWS; r++) {
            float acc = 0.0f;
            for (int64_t i = 0; i < nb; i++) {
                int32_t isum = 0, msum = 0;
                for (int c = 0; c < 4; c++) {
                    int32_t lo = 0, hi = 0;
                    for (int g = 0; g < 8; g++)
                        for (int j = 0; j < 4; j++) {
                            const uint8_t q = b[i].q[c][g][4 * r + j];
                            lo += (q & 15) * x[i].qs[64 * c + 4 * g + j];
                            hi += (q >> 4) * x[i].qs[64 * c + 32 + 4 * g + j];
                        }
                    isum += b[i].sc[2 * c][r] * lo + b[i].sc[2 * c + 1][r] * hi;
                }
                for (int j = 0; j < 8; j++)
                    msum += b[i].mn[j / 2][2 * r + j % 2] * (x[i].bsums[2 * j] + x[i].bsums[2 * j + 1]);
                acc = fmaf(f16_to_f32(b[i].d[r]) * x[i].d, (float)isum, acc);
                acc = fmaf(-(f16_to_f32(b[i].dmin[r]) * x[i].d), (float)msum, acc);
            }
            out[k * CPU_X8_ROWS + r] = acc;
        }
    }
}

/* Four rows, element by element in row order (each row's product rounded
 * and added as axpy does). */
static void axpy4_f32_ref(int64_t n, const float a[4], const void *const w[4], float *y,
                          const void *const next[4]) {
    (void)next;
    for (int r = 0; r < 4; r++) axpy_f32_ref(n, a[r], w[r], y);
}

static void axpy4_f16_ref(int64_t n, const float a[4], const void *const w[4], float *y,
                          const void *const next[4]) {
    (void)next;
    for (int r = 0; r < 4; r++) axpy_f16_ref(n, a[r], w[r], y);
}

static void axpy4_q8_0_ref(int64_t n, const float a[4], const void *const w[4], float *y,
                          const void *const next[4]) {
    (void)next;
    for (int r = 0; r < 4; r++) axpy_q8_0_ref(n, a[r], w[r], y);
}

static void axpy4_q4_0_ref(int64_t n, const float a[4], const void *const w[4], float *y,
                          const void *const next[4]) {
    (void)next;
    for (int r = 0; r < 4; r++) axpy_q4_0_ref(n, a[r], w[r], y);
}

static void dot_f32_4x_ref(int64_t n, const float *w, const float *x, uint64_t x_stride, float out[4]) {
    for (int k = 0; k < 4; k++) out[k] = dot_f32_ref(n, w, x + k * x_stride);
}

static void axpy_f32_4y_ref(int64_t n, const float a[4], const float *v, float *y, uint64_t y_stride) {
    for (int k = 0; k < 4; k++) axpy_f32_ref(n, a[k], v, y + k * y_stride);
}

/* ---- the reference table ------------------------------------------------ */

static struct cpu_kernels kernels_ref = {
    .name = "ref",
    .dot = {[DTYPE_F32] = dot_f32_ref, [DTYPE_F16] = dot_f16_ref, [DTYPE_BF16] = dot_bf16_ref},
    .to_f32 = {[DTYPE_F32] = to_f32_f32, [DTYPE_F16] = to_f32_f16, [DTYPE_BF16] = to_f32_bf16},
    .vec_dot_type = {[DTYPE_Q4_0] = DTYPE_Q8_0, [DTYPE_Q4_1] = DTYPE_Q8_1, [DTYPE_Q5_0] = DTYPE_Q8_0,
                     [DTYPE_Q5_1] = DTYPE_Q8_1, [DTYPE_Q8_0] = DTYPE_Q8_0, [DTYPE_Q2_K] = DTYPE_Q8_K,
                     [DTYPE_Q3_K] = DTYPE_Q8_K, [DTYPE_Q4_K] = DTYPE_Q8_K, [DTYPE_Q5_K] = DTYPE_Q8_K,
                     [DTYPE_Q6_K] = DTYPE_Q8_K},
    .dot_q = {[DTYPE_Q4_0] = dot_q4_0_ref, [DTYPE_Q4_1] = dot_q4_1_ref, [DTYPE_Q5_0] = dot_q5_0_ref,
              [DTYPE_Q5_1] = dot_q5_1_ref, [DTYPE_Q8_0] = dot_q8_0_ref, [DTYPE_Q2_K] = dot_q2_K_ref,
              [DTYPE_Q3_K] = dot_q3_K_ref, [DTYPE_Q4_K] = dot_q4_K_ref, [DTYPE_Q5_K] = dot_q5_K_ref,
              [DTYPE_Q6_K] = dot_q6_K_ref},
    .axpy = {[DTYPE_F32] = axpy_f32_ref, [DTYPE_F16] = axpy_f16_ref, [DTYPE_Q8_0] = axpy_q8_0_ref,
             [DTYPE_Q4_0] = axpy_q4_0_ref},
    .gemv_x8 = {[DTYPE_Q4_0] = gemv_x8_q4_0_ref, [DTYPE_Q4_K] = gemv_x8_q4_K_ref},
    .axpy4 = {[DTYPE_F32] = axpy4_f32_ref, [DTYPE_F16] = axpy4_f16_ref, [DTYPE_Q8_0] = axpy4_q8_0_ref,
              [DTYPE_Q4_0] = axpy4_q4_0_ref},
    .dot_f32_4x = dot_f32_4x_ref,
    .axpy_f32_4y = axpy_f32_4y_ref,
};
static pthread_once_t kernels_ref_once = PTHREAD_ONCE_INIT;

/* Dequantizers (to_f32) and activation quantizers come from quant.c. */
static void kernels_ref_init(void) {
    for (uint32_t t = 0; t < DTYPE_COUNT; t++) {
        if (quant_dequantizer(t)) kernels_ref.to_f32[t] = quant_dequantizer(t);
        if (t == DTYPE_Q8_0 || t == DTYPE_Q8_1 || t == DTYPE_Q8_K) kernels_ref.quantize[t] = quant_quantizer(t);
    }
}

const struct cpu_kernels *cpu_kernels_ref(void) {
    pthread_once(&kernels_ref_once, kernels_ref_init);
    return &kernels_ref;
}

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

void ops_rope_neox(float *x, const float *cos_sin, int64_t n_rot) {
    const int64_t half = n_rot / 2;
    for (int64_t i = 0; i < half; i++) {
        float c = cos_sin[2 * i], s = cos_sin[2 * i + 1];
        float a = x[i], b = x[i + half];
        x[i] = a * c - b * s;
        x[i + half] = a * s + b * c;
    }
}

void ops_add(float *y, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += x[i];
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
    case FFN_ACT_DRELU:
        for (int64_t i = 0; i < n; i++)
            gate[i] = (gate[i] > 0.0f ? gate[i] : 0.0f) * (up[i] > 0.0f ? up[i] : 0.0f);
        break;
    case FFN_ACT_RELU_NOGATE:
        for (int64_t i = 0; i < n; i++) gate[i] = up[i] > 0.0f ? up[i] : 0.0f;
        break;
    }
}

void ops_threshold(float *x, int64_t n, float t) {
    for (int64_t i = 0; i < n; i++) x[i] = x[i] > t ? x[i] : 0.0f;
}
