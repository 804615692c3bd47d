/*
 * quant.c - reference (plain C) quantize and dequantize of the GGUF block
 * formats of quant.h. The dequantizers define the formats: each computes
 * exactly what gguf-py's numpy dequantizer computes, float operation for
 * float operation (tests/python/test_quant_formats.py checks it). The
 * quantizers of the 32-value types reproduce ggml's reference rounding bit
 * for bit; the k-quant quantizers fit the sub-block scales by least squares.
 */
#include "quant.h"

#include "dtype.h"

#include <math.h>
#include <string.h>

/* ---- helpers ------------------------------------------------------------- */

/* A block's inputs with non-finite values replaced by 0. */
static void block_load(float *dst, const float *src, int n) {
    for (int i = 0; i < n; i++) dst[i] = isfinite(src[i]) ? src[i] : 0.0f;
}

/* Round to nearest (ties to even), clamped to [lo, hi] first (NaN gives
 * lo): adding 1.5 * 2^23 leaves the integer in the low mantissa bits. Only
 * the k-quant fits use it; the 32-value formats round as ggml does. */
static inline int round_clamp(float v, int lo, int hi) {
    v = v > (float)lo ? v : (float)lo; /* branch-free (maxss, minss): the loops vectorize */
    v = v < (float)hi ? v : (float)hi;
    const float f = v + 12582912.0f;
    int32_t i;
    memcpy(&i, &f, 4);
    return (i & 0x007fffff) - 0x00400000;
}

/* (int)v for v in [0, hi], v clamped first (NaN gives 0): ggml's
 * MIN(hi, (int8_t)v) for every v it meets, without undefined conversions. */
static inline int trunc_clamp(float v, int hi) {
    v = v > 0.0f ? v : 0.0f;
    v = v < (float)hi ? v : (float)hi;
    return (int)v;
}

/* roundf(v) as int8 for v in [-127, 127], v clamped first (NaN gives 0). */
static inline int8_t round_i8(float v) {
    if (!(v >= -127.0f)) v = v < 0.0f ? -127.0f : 0.0f;
    if (v > 127.0f) v = 127.0f;
    return (int8_t)roundf(v);
}

/* Value with the largest magnitude (the first one on ties) and |it|. */
static float block_absmax(const float *x, int n, float *amax_out) {
    float amax = 0.0f, max = 0.0f;
    for (int i = 0; i < n; i++)
        if (amax < fabsf(x[i])) {
            amax = fabsf(x[i]);
            max = x[i];
        }
    *amax_out = amax;
    return max;
}

/* ---- 32-value formats ---------------------------------------------------- */

/* q4_0 / q5_0: d = max / -2^(bits-1), q = trunc(x / d + 2^(bits-1) + 0.5). */
static void quantize_q4_0(int64_t n, const float *src, void *dst) {
    block_q4_0 *y = dst;
    float x[QK4_0];
    for (int64_t i = 0; i < n / QK4_0; i++) {
        block_load(x, src + i * QK4_0, QK4_0);
        float amax;
        const float max = block_absmax(x, QK4_0, &amax);
        const float d = max / -8.0f, id = quant_inv_scale(d);
        y[i].d = f32_to_f16(d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            const int q0 = trunc_clamp(x[j] * id + 8.5f, 15), q1 = trunc_clamp(x[j + QK4_0 / 2] * id + 8.5f, 15);
            y[i].qs[j] = (uint8_t)(q0 | q1 << 4);
        }
    }
}

static void dequantize_q4_0(int64_t n, const void *src, float *y) {
    const block_q4_0 *x = src;
    int8_t q[QK4_0];
    for (int64_t i = 0; i < n / QK4_0; i++) {
        const float d = f16_to_f32(x[i].d);
        quant_unpack_q4_0(&x[i], q);
        for (int j = 0; j < QK4_0; j++) y[i * QK4_0 + j] = d * (float)q[j];
    }
}

/* q4_1 / q5_1: d = (max - min) / (2^bits - 1), q = trunc((x - min) / d + 0.5). */
static void block_minmax(const float *x, int n, float *mn, float *mx) {
    *mn = INFINITY;
    *mx = -INFINITY;
    for (int i = 0; i < n; i++) {
        if (x[i] < *mn) *mn = x[i];
        if (x[i] > *mx) *mx = x[i];
    }
}

static void quantize_q4_1(int64_t n, const float *src, void *dst) {
    block_q4_1 *y = dst;
    float x[QK4_1];
    for (int64_t i = 0; i < n / QK4_1; i++) {
        block_load(x, src + i * QK4_1, QK4_1);
        float mn, mx;
        block_minmax(x, QK4_1, &mn, &mx);
        const float d = (mx - mn) / 15.0f, id = quant_inv_scale(d);
        y[i].d = f32_to_f16(d);
        y[i].m = f32_to_f16(mn);
        for (int j = 0; j < QK4_1 / 2; j++) {
            const int q0 = trunc_clamp((x[j] - mn) * id + 0.5f, 15);
            const int q1 = trunc_clamp((x[j + QK4_1 / 2] - mn) * id + 0.5f, 15);
            y[i].qs[j] = (uint8_t)(q0 | q1 << 4);
        }
    }
}

static void dequantize_q4_1(int64_t n, const void *src, float *y) {
    const block_q4_1 *x = src;
    int8_t q[QK4_1];
    for (int64_t i = 0; i < n / QK4_1; i++) {
        const float d = f16_to_f32(x[i].d), m = f16_to_f32(x[i].m);
        quant_unpack_q4_1(&x[i], q);
        for (int j = 0; j < QK4_1; j++) y[i * QK4_1 + j] = d * (float)q[j] + m;
    }
}

/* Pack 32 5-bit quants: low nibbles into qs (as q4_0), 5th bits into qh. */
static void pack_q5(const int *q, uint8_t *qs, uint8_t *qh) {
    uint32_t h = 0;
    for (int j = 0; j < 16; j++) {
        qs[j] = (uint8_t)((q[j] & 0xF) | (q[j + 16] & 0xF) << 4);
        h |= (uint32_t)(q[j] >> 4 & 1) << j | (uint32_t)(q[j + 16] >> 4 & 1) << (j + 16);
    }
    for (int b = 0; b < 4; b++) qh[b] = (uint8_t)(h >> 8 * b);
}


static void quantize_q5_0(int64_t n, const float *src, void *dst) {
    block_q5_0 *y = dst;
    float x[QK5_0];
    int q[QK5_0];
    for (int64_t i = 0; i < n / QK5_0; i++) {
        block_load(x, src + i * QK5_0, QK5_0);
        float amax;
        const float max = block_absmax(x, QK5_0, &amax);
        const float d = max / -16.0f, id = quant_inv_scale(d);
        y[i].d = f32_to_f16(d);
        for (int j = 0; j < QK5_0; j++) q[j] = trunc_clamp(x[j] * id + 16.5f, 31);
        pack_q5(q, y[i].qs, y[i].qh);
    }
}

static void dequantize_q5_0(int64_t n, const void *src, float *y) {
    const block_q5_0 *x = src;
    int8_t q[QK5_0];
    for (int64_t i = 0; i < n / QK5_0; i++) {
        const float d = f16_to_f32(x[i].d);
        quant_unpack_q5(x[i].qs, x[i].qh, q);
        for (int j = 0; j < QK5_0; j++) y[i * QK5_0 + j] = d * (float)(q[j] - 16);
    }
}

static void quantize_q5_1(int64_t n, const float *src, void *dst) {
    block_q5_1 *y = dst;
    float x[QK5_1];
    int q[QK5_1];
    for (int64_t i = 0; i < n / QK5_1; i++) {
        block_load(x, src + i * QK5_1, QK5_1);
        float mn, mx;
        block_minmax(x, QK5_1, &mn, &mx);
        const float d = (mx - mn) / 31.0f, id = quant_inv_scale(d);
        y[i].d = f32_to_f16(d);
        y[i].m = f32_to_f16(mn);
        for (int j = 0; j < QK5_1; j++) q[j] = trunc_clamp((x[j] - mn) * id + 0.5f, 31);
        pack_q5(q, y[i].qs, y[i].qh);
    }
}

static void dequantize_q5_1(int64_t n, const void *src, float *y) {
    const block_q5_1 *x = src;
    int8_t q[QK5_1];
    for (int64_t i = 0; i < n / QK5_1; i++) {
        const float d = f16_to_f32(x[i].d), m = f16_to_f32(x[i].m);
        quant_unpack_q5(x[i].qs, x[i].qh, q);
        for (int j = 0; j < QK5_1; j++) y[i * QK5_1 + j] = d * (float)q[j] + m;
    }
}

/* q8_0 / q8_1: d = amax / 127, q = roundf(x / d). */
static void quantize_q8_0(int64_t n, const float *src, void *dst) {
    block_q8_0 *y = dst;
    float x[QK8_0];
    for (int64_t i = 0; i < n / QK8_0; i++) {
        block_load(x, src + i * QK8_0, QK8_0);
        float amax;
        block_absmax(x, QK8_0, &amax);
        const float d = amax / 127.0f, id = quant_inv_scale(d);
        y[i].d = f32_to_f16(d);
        for (int j = 0; j < QK8_0; j++) y[i].qs[j] = round_i8(x[j] * id);
    }
}

static void dequantize_q8_0(int64_t n, const void *src, float *y) {
    const block_q8_0 *x = src;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        const float d = f16_to_f32(x[i].d);
        for (int j = 0; j < QK8_0; j++) y[i * QK8_0 + j] = (float)x[i].qs[j] * d;
    }
}

static void quantize_q8_1(int64_t n, const float *src, void *dst) {
    block_q8_1 *y = dst;
    float x[QK8_1];
    for (int64_t i = 0; i < n / QK8_1; i++) {
        block_load(x, src + i * QK8_1, QK8_1);
        float amax;
        block_absmax(x, QK8_1, &amax);
        const float d = amax / 127.0f, id = quant_inv_scale(d);
        int sum = 0;
        y[i].d = f32_to_f16(d);
        for (int j = 0; j < QK8_1; j++) {
            y[i].qs[j] = round_i8(x[j] * id);
            sum += y[i].qs[j];
        }
        y[i].s = f32_to_f16((float)sum * d);
    }
}

static void dequantize_q8_1(int64_t n, const void *src, float *y) {
    const block_q8_1 *x = src;
    for (int64_t i = 0; i < n / QK8_1; i++) {
        const float d = f16_to_f32(x[i].d);
        for (int j = 0; j < QK8_1; j++) y[i * QK8_1 + j] = (float)x[i].qs[j] * d;
    }
}

/* ---- k-quant scale fitting ------------------------------------------------- */

/* x ~ scale * L with L in [-nmax, nmax - 1]: tries 19 scales around
 * max / -nmax, refits each by least squares, keeps the smallest squared
 * error. Returns the scale (0 for an all-zero group). */
static float fit_symmetric(int n, const float *x, int nmax, int8_t *L) {
    float amax;
    const float max = block_absmax(x, n, &amax);
    memset(L, 0, (size_t)n);
    if (amax < 1e-30f) return 0.0f;
    float best_gain = -1.0f, best = 0.0f;
    int8_t t[32];
    for (int k = -9; k <= 9; k++) {
        const float iscale = -((float)nmax + 0.1f * (float)k) / max;
        float sumlx = 0.0f, suml2 = 0.0f;
        for (int i = 0; i < n; i++) {
            t[i] = (int8_t)round_clamp(iscale * x[i], -nmax, nmax - 1);
            sumlx += x[i] * t[i];
            suml2 += (float)(t[i] * t[i]);
        }
        if (suml2 <= 0.0f) continue;
        /* with the least-squares scale sumlx / suml2 the squared error is
         * sum x^2 - sumlx^2 / suml2: keep the largest sumlx^2 / suml2 */
        const float gain = sumlx * sumlx / suml2;
        if (gain > best_gain) {
            best_gain = gain;
            best = sumlx / suml2;
            memcpy(L, t, (size_t)n);
        }
    }
    return best;
}

/* x ~ scale * L - m with L in [0, nmax] and m >= 0: tries 21 scales over
 * the group's range, refits (scale, m) of each by least squares, keeps the
 * smallest squared error. */
static float fit_affine(int n, const float *x, int nmax, float *m_out) {
    float mn, mx;
    block_minmax(x, n, &mn, &mx);
    if (mn > 0.0f) mn = 0.0f;
    *m_out = -mn;
    if (!(mx > mn)) return 0.0f;
    float best_err = INFINITY, best_a = 0.0f, best_b = mn;
    float sx = 0.0f, sx2 = 0.0f;
    for (int i = 0; i < n; i++) {
        sx += x[i];
        sx2 += x[i] * x[i];
    }
    for (int k = -10; k <= 10; k++) {
        const float iscale = ((float)nmax + 0.05f * (float)nmax * (float)k / 10.0f) / (mx - mn);
        float sl = 0.0f, sl2 = 0.0f, sxl = 0.0f;
        for (int i = 0; i < n; i++) {
            const float l = (float)round_clamp(iscale * (x[i] - mn), 0, nmax);
            sl += l;
            sl2 += l * l;
            sxl += x[i] * l;
        }
        const float det = (float)n * sl2 - sl * sl;
        float a = 0.0f, b = 0.0f;
        if (det > 0.0f) {
            a = ((float)n * sxl - sl * sx) / det;
            b = (sl2 * sx - sl * sxl) / det;
        } else if (sl2 > 0.0f) { /* every L equal: no room for a min */
            a = sxl / sl2;
        }
        if (b > 0.0f) {
            b = 0.0f;
            a = sxl / sl2;
        }
        if (!(a > 0.0f)) continue;
        /* sum (a L + b - x)^2 expanded into the sums above */
        const float err = a * a * sl2 + 2.0f * a * b * sl + (float)n * b * b - 2.0f * a * sxl - 2.0f * b * sx + sx2;
        if (err < best_err) {
            best_err = err;
            best_a = a;
            best_b = b;
        }
    }
    *m_out = -best_b;
    return best_a;
}

/* Affine sub-block fits of a 256-value block, quantized to `bits`-bit
 * scales and mins with f16 super-scales d and dmin. */
static void fit_affine_block(const float *x, int sub, int nmax, int bits, uint8_t *ls, uint8_t *lm,
                             uint16_t *d16, uint16_t *dmin16) {
    const int n_sub = QK_K / sub, lmax = (1 << bits) - 1;
    float scales[16], mins[16], max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < n_sub; j++) {
        scales[j] = fit_affine(sub, x + j * sub, nmax, &mins[j]);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float is = max_scale > 0.0f ? (float)lmax / max_scale : 0.0f;
    const float im = max_min > 0.0f ? (float)lmax / max_min : 0.0f;
    for (int j = 0; j < n_sub; j++) {
        ls[j] = (uint8_t)round_clamp(is * scales[j], 0, lmax);
        lm[j] = (uint8_t)round_clamp(im * mins[j], 0, lmax);
    }
    *d16 = f32_to_f16(max_scale / (float)lmax);
    *dmin16 = f32_to_f16(max_min / (float)lmax);
}

/* Requantize the values of sub-blocks with their final scale and min. */
static void requant_affine(const float *x, int sub, int nmax, const uint8_t *ls, const uint8_t *lm, uint16_t d16,
                           uint16_t dmin16, uint8_t *q) {
    const float d = f16_to_f32(d16), dmin = f16_to_f32(dmin16);
    for (int j = 0; j < QK_K / sub; j++) {
        const float dl = d * ls[j], ml = dmin * lm[j];
        for (int i = 0; i < sub; i++)
            q[j * sub + i] = dl > 0.0f ? (uint8_t)round_clamp((x[j * sub + i] + ml) / dl, 0, nmax) : 0;
    }
}

/* Symmetric sub-block fits quantized to signed scales in [-smax, smax - 1]
 * (smax 32 for q3_k, 128 for q6_k), then the values requantized to
 * [-nmax, nmax - 1] with the final scales. */
static void fit_symmetric_block(const float *x, int nmax, int smax, int *ls, uint16_t *d16, int8_t *q) {
    float scales[16];
    int8_t L[16];
    for (int j = 0; j < 16; j++) scales[j] = fit_symmetric(16, x + 16 * j, nmax, L);
    float amax;
    const float max = block_absmax(scales, 16, &amax);
    if (amax < 1e-30f) {
        *d16 = 0;
        memset(ls, 0, 16 * sizeof(int));
        memset(q, 0, QK_K);
        return;
    }
    const float iscale = -(float)smax / max;
    for (int j = 0; j < 16; j++) ls[j] = round_clamp(iscale * scales[j], -smax, smax - 1);
    *d16 = f32_to_f16(1.0f / iscale);
    const float d = f16_to_f32(*d16);
    for (int j = 0; j < 16; j++) {
        const float dl = d * (float)ls[j];
        for (int i = 0; i < 16; i++)
            q[16 * j + i] = dl != 0.0f ? (int8_t)round_clamp(x[16 * j + i] / dl, -nmax, nmax - 1) : 0;
    }
}

/* ---- q2_k ------------------------------------------------------------------ */

static void quantize_q2_K(int64_t n, const float *src, void *dst) {
    block_q2_K *y = dst;
    float x[QK_K];
    uint8_t ls[16], lm[16], q[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++) {
        block_load(x, src + i * QK_K, QK_K);
        fit_affine_block(x, 16, 3, 4, ls, lm, &y[i].d, &y[i].dmin);
        requant_affine(x, 16, 3, ls, lm, y[i].d, y[i].dmin, q);
        for (int j = 0; j < 16; j++) y[i].scales[j] = (uint8_t)(ls[j] | lm[j] << 4);
        memset(y[i].qs, 0, sizeof(y[i].qs));
        for (int e = 0; e < QK_K; e++) y[i].qs[32 * (e / 128) + e % 32] |= (uint8_t)(q[e] << 2 * (e % 128 / 32));
    }
}

static void dequantize_q2_K(int64_t n, const void *src, float *y) {
    const block_q2_K *x = src;
    int8_t q[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = f16_to_f32(x[i].d), dmin = f16_to_f32(x[i].dmin);
        quant_unpack_q2_k(&x[i], q);
        for (int e = 0; e < QK_K; e++) {
            const uint8_t sc = x[i].scales[e / 16];
            const float dl = d * (float)(sc & 0xF), ml = dmin * (float)(sc >> 4);
            y[i * QK_K + e] = dl * (float)q[e] - ml;
        }
    }
}

/* ---- q3_k ------------------------------------------------------------------ */

static void quantize_q3_K(int64_t n, const float *src, void *dst) {
    block_q3_K *y = dst;
    float x[QK_K];
    int ls[16];
    int8_t q[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++) {
        block_load(x, src + i * QK_K, QK_K);
        fit_symmetric_block(x, 4, 32, ls, &y[i].d, q);
        memset(y[i].scales, 0, sizeof(y[i].scales));
        for (int j = 0; j < 16; j++) {
            const int l = ls[j] + 32;
            y[i].scales[j % 8] |= (uint8_t)((l & 0xF) << 4 * (j / 8));
            y[i].scales[8 + j % 4] |= (uint8_t)((l >> 4) << 2 * (j / 4));
        }
        memset(y[i].hmask, 0, sizeof(y[i].hmask));
        memset(y[i].qs, 0, sizeof(y[i].qs));
        for (int e = 0; e < QK_K; e++) {
            const int u = q[e] + 4; /* 0..7 */
            y[i].qs[32 * (e / 128) + e % 32] |= (uint8_t)((u & 3) << 2 * (e % 128 / 32));
            y[i].hmask[e % 32] |= (uint8_t)((u >> 2) << (e / 32));
        }
    }
}

static void dequantize_q3_K(int64_t n, const void *src, float *y) {
    const block_q3_K *x = src;
    int8_t q[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = f16_to_f32(x[i].d);
        quant_unpack_q3_k(&x[i], q);
        for (int e = 0; e < QK_K; e++) {
            const float dl = d * (float)quant_scale_q3_k(e / 16, x[i].scales);
            y[i * QK_K + e] = dl * (float)q[e];
        }
    }
}

/* ---- q4_k, q5_k ---------------------------------------------------------- */

static void pack_scales_k4(const uint8_t *ls, const uint8_t *lm, uint8_t *s) {
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)(ls[j] | (ls[j + 4] >> 4) << 6);
        s[j + 4] = (uint8_t)(lm[j] | (lm[j + 4] >> 4) << 6);
        s[j + 8] = (uint8_t)((ls[j + 4] & 0xF) | (lm[j + 4] & 0xF) << 4);
    }
}

static void quantize_q4_K(int64_t n, const float *src, void *dst) {
    block_q4_K *y = dst;
    float x[QK_K];
    uint8_t ls[8], lm[8], q[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++) {
        block_load(x, src + i * QK_K, QK_K);
        fit_affine_block(x, 32, 15, 6, ls, lm, &y[i].d, &y[i].dmin);
        requant_affine(x, 32, 15, ls, lm, y[i].d, y[i].dmin, q);
        pack_scales_k4(ls, lm, y[i].scales);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) y[i].qs[32 * c + l] = (uint8_t)(q[64 * c + l] | q[64 * c + 32 + l] << 4);
    }
}

static void dequantize_q4_K(int64_t n, const void *src, float *y) {
    const block_q4_K *x = src;
    int8_t q[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = f16_to_f32(x[i].d), dmin = f16_to_f32(x[i].dmin);
        quant_unpack_q4_k(&x[i], q);
        for (int e = 0; e < QK_K; e++) {
            uint8_t sc, m;
            quant_scale_min_k4(e / 32, x[i].scales, &sc, &m);
            const float d1 = d * (float)sc, m1 = dmin * (float)m;
            y[i * QK_K + e] = d1 * (float)q[e] - m1;
        }
    }
}

static void quantize_q5_K(int64_t n, const float *src, void *dst) {
    block_q5_K *y = dst;
    float x[QK_K];
    uint8_t ls[8], lm[8], q[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++) {
        block_load(x, src + i * QK_K, QK_K);
        fit_affine_block(x, 32, 31, 6, ls, lm, &y[i].d, &y[i].dmin);
        requant_affine(x, 32, 31, ls, lm, y[i].d, y[i].dmin, q);
        pack_scales_k4(ls, lm, y[i].scales);
        memset(y[i].qh, 0, sizeof(y[i].qh));
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++)
                y[i].qs[32 * c + l] = (uint8_t)((q[64 * c + l] & 0xF) | (q[64 * c + 32 + l] & 0xF) << 4);
        for (int e = 0; e < QK_K; e++) y[i].qh[e % 32] |= (uint8_t)((q[e] >> 4) << (e / 32));
    }
}

static void dequantize_q5_K(int64_t n, const void *src, float *y) {
    const block_q5_K *x = src;
    int8_t q[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = f16_to_f32(x[i].d), dmin = f16_to_f32(x[i].dmin);
        quant_unpack_q5_k(&x[i], q);
        for (int e = 0; e < QK_K; e++) {
            uint8_t sc, m;
            quant_scale_min_k4(e / 32, x[i].scales, &sc, &m);
            const float d1 = d * (float)sc, m1 = dmin * (float)m;
            y[i * QK_K + e] = d1 * (float)q[e] - m1;
        }
    }
}

/* ---- q6_k ------------------------------------------------------------------ */

static void quantize_q6_K(int64_t n, const float *src, void *dst) {
    block_q6_K *y = dst;
    float x[QK_K];
    int ls[16];
    int8_t q[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++) {
        block_load(x, src + i * QK_K, QK_K);
        fit_symmetric_block(x, 32, 128, ls, &y[i].d, q);
        for (int j = 0; j < 16; j++) y[i].scales[j] = (int8_t)ls[j];
        memset(y[i].ql, 0, sizeof(y[i].ql));
        memset(y[i].qh, 0, sizeof(y[i].qh));
        for (int e = 0; e < QK_K; e++) {
            const int u = q[e] + 32, h = e / 128, r = e % 128; /* u in 0..63 */
            y[i].ql[64 * h + r % 64] |= (uint8_t)((u & 0xF) << 4 * (r / 64));
            y[i].qh[32 * h + r % 32] |= (uint8_t)((u >> 4) << 2 * (r / 32));
        }
    }
}

static void dequantize_q6_K(int64_t n, const void *src, float *y) {
    const block_q6_K *x = src;
    int8_t q[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = f16_to_f32(x[i].d);
        quant_unpack_q6_k(&x[i], q);
        for (int e = 0; e < QK_K; e++) y[i * QK_K + e] = d * (float)x[i].scales[e / 16] * (float)q[e];
    }
}

/* ---- q8_k (activations) -------------------------------------------------- */

/* d = max / -127 (max: the value of largest magnitude), q = round(x / d),
 * computed as round(x * (-127 * (1 / max))). */
static void quantize_q8_K(int64_t n, const float *src, void *dst) {
    block_q8_K *y = dst;
    float x[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++) {
        block_load(x, src + i * QK_K, QK_K);
        float amax;
        const float max = block_absmax(x, QK_K, &amax);
        memset(&y[i], 0, sizeof(y[i]));
        const float iscale = -127.0f * quant_inv_scale(max);
        if (iscale == 0.0f) continue; /* all zero (or subnormal) */
        for (int j = 0; j < QK_K; j++) {
            y[i].qs[j] = round_i8(iscale * x[j]);
            y[i].bsums[j / 16] = (int16_t)(y[i].bsums[j / 16] + y[i].qs[j]);
        }
        y[i].d = 1.0f / iscale;
    }
}

static void dequantize_q8_K(int64_t n, const void *src, float *y) {
    const block_q8_K *x = src;
    for (int64_t i = 0; i < n / QK_K; i++)
        for (int j = 0; j < QK_K; j++) y[i * QK_K + j] = x[i].d * (float)x[i].qs[j];
}

/* ---- tables ---------------------------------------------------------------- */

static const quant_quantize_fn quantizers[DTYPE_COUNT] = {
    [DTYPE_Q4_0] = quantize_q4_0, [DTYPE_Q4_1] = quantize_q4_1, [DTYPE_Q5_0] = quantize_q5_0,
    [DTYPE_Q5_1] = quantize_q5_1, [DTYPE_Q8_0] = quantize_q8_0, [DTYPE_Q8_1] = quantize_q8_1,
    [DTYPE_Q2_K] = quantize_q2_K, [DTYPE_Q3_K] = quantize_q3_K, [DTYPE_Q4_K] = quantize_q4_K,
    [DTYPE_Q5_K] = quantize_q5_K, [DTYPE_Q6_K] = quantize_q6_K, [DTYPE_Q8_K] = quantize_q8_K,
};

static const quant_dequantize_fn dequantizers[DTYPE_COUNT] = {
    [DTYPE_Q4_0] = dequantize_q4_0, [DTYPE_Q4_1] = dequantize_q4_1, [DTYPE_Q5_0] = dequantize_q5_0,
    [DTYPE_Q5_1] = dequantize_q5_1, [DTYPE_Q8_0] = dequantize_q8_0, [DTYPE_Q8_1] = dequantize_q8_1,
    [DTYPE_Q2_K] = dequantize_q2_K, [DTYPE_Q3_K] = dequantize_q3_K, [DTYPE_Q4_K] = dequantize_q4_K,
    [DTYPE_Q5_K] = dequantize_q5_K, [DTYPE_Q6_K] = dequantize_q6_K, [DTYPE_Q8_K] = dequantize_q8_K,
};

quant_quantize_fn quant_quantizer(uint32_t type) { return type < DTYPE_COUNT ? quantizers[type] : NULL; }

quant_dequantize_fn quant_dequantizer(uint32_t type) { return type < DTYPE_COUNT ? dequantizers[type] : NULL; }
