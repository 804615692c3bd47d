/*
 * matmul.cu - weights in VRAM and the matrix products behind cuda.h.
 *
 * Device layout of a weight
 *   f32, f16, bf16: the GGUF rows as they are.
 *   quantized types: every block split into a "body" (the packed quants,
 *   and for q2_k/q4_k/q5_k/q6_k the sub-block scales too) whose size is a
 *   multiple of 16 bytes, and an "aux" part (the f16 scales, q5's high
 *   bits); all bodies of the tensor first (block g of the tensor at
 *   body + g * BODY), then all aux parts (at aux + g * AUX). Threads then
 *   read the quants with aligned, coalesced 16-byte loads. q4_k and q5_k
 *   blocks (144, 176 bytes) are already aligned and stay whole; q5_0 and
 *   q3_k get 2 bytes of padding per block (3% more VRAM for rare types).
 *
 * Every quantized type is read in "chunks" of 32 consecutive values of a
 * row (one q4_0/q8_0 block, a sub-block of a k-quant); unpack<T>() turns a
 * chunk into 32 int8 quants (offsets applied) and one or two (scale, min)
 * pairs, value = a * q + b. Both products and the dequantizers share it:
 *   - matrix-vector (few tokens): x is quantized to 8 bits in blocks of 32
 *     (scale d, integer sum), and a chunk dot a block of x is
 *     d * (a * sum(q * xq) + b * sum(xq)) with __dp4a. One block of 128
 *     threads computes R rows for all (<= 8) tokens, so each weight byte is
 *     read once per call; the 128 threads split the row and are reduced
 *     through shared memory at the end.
 *   - warp matrix-vector (mmf_q_kernel, the default, cu_tuning.mmv_kernel
 *     2): a warp per R rows, lanes split the row, U chunks per lane in
 *     flight (16-byte loads), a warp reduction; the 8-bit x read from L1.
 *   - cu_matmul_ex, few tokens of a quantized weight: by default (mmv_fused
 *     3) one small kernel (mm_inq_kernel, a block per token row) applies the
 *     input step (rmsnorm, or FATReLU + act(gate) * up) and quantizes into
 *     scratch, then the warp kernel runs; mmv_fused 1 is the older fused
 *     kernel (every block redoes the input step into shared memory: 17 us
 *     for 7B's q|k|v on an H200, 40% of copy bandwidth). Stacked weights
 *     (q|k|v, gate|up: cu_weight_upload_parts) make one product of three or
 *     two.
 *   - GEMM (many tokens): the weight is dequantized to f16 in chunks of rows
 *     (CU_GEMM_CHUNK_DEFAULT, tunable), x is converted to f16 once (or the
 *     input step writes f16 directly), and cublasGemmEx (f32 accumulation)
 *     runs per chunk. f16 weights go to cuBLAS directly, f32 weights use an
 *     f32 GEMM.
 * The dequantizers compute a * q + b with the float operations (and their
 * order) of src/quant.c, so they give the CPU's values bit for bit.
 */
#include "common.cuh"

#include <atomic>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static constexpr int MMV_THREADS = 128;                 /* threads of a matrix-vector block   */
static constexpr int MMV_THREADS_MAX = 512;             /* ... of the block kernel at most     */
static constexpr int64_t MMV_MAX_TOKENS = 8;             /* tokens of one matrix-vector pass   */

/* ---- layouts -------------------------------------------------------------- */

struct qlayout {
    int qk;   /* values per GGUF block (1 for f32/f16/bf16)  */
    int bs;   /* bytes per GGUF block                        */
    int body; /* device bytes per block: quants (16-aligned) */
    int aux;  /* device bytes per block: scales etc.         */
};

__host__ __device__ constexpr qlayout layout_of(int t) {
    switch (t) {
    case DTYPE_F32: return {1, 4, 4, 0};
    case DTYPE_F16: return {1, 2, 2, 0};
    case DTYPE_BF16: return {1, 2, 2, 0};
    case DTYPE_Q4_0: return {32, 18, 16, 2};   /* body qs; aux d               */
    case DTYPE_Q4_1: return {32, 20, 16, 4};   /* body qs; aux d, m            */
    case DTYPE_Q5_0: return {32, 22, 16, 8};   /* body qs; aux qh, d, pad      */
    case DTYPE_Q5_1: return {32, 24, 16, 8};   /* body qs; aux qh, d, m        */
    case DTYPE_Q8_0: return {32, 34, 32, 2};   /* body qs; aux d               */
    case DTYPE_Q2_K: return {256, 84, 80, 4};  /* body scales, qs; aux d, dmin */
    case DTYPE_Q3_K: return {256, 110, 96, 16};/* body hmask, qs; aux scales, d, pad */
    case DTYPE_Q4_K: return {256, 144, 144, 0};/* whole block                  */
    case DTYPE_Q5_K: return {256, 176, 176, 0};/* whole block                  */
    case DTYPE_Q6_K: return {256, 210, 208, 2};/* body ql, qh, scales; aux d   */
    default: return {0, 0, 0, 0};
    }
}

static bool type_is_plain(uint32_t t) { return t == DTYPE_F32 || t == DTYPE_F16 || t == DTYPE_BF16; }

/* Split GGUF block `src` of type t into its device body and aux parts. */
static void repack_block(uint32_t t, const uint8_t *src, uint8_t *body, uint8_t *aux) {
    const qlayout l = layout_of((int)t);
    switch (t) {
    case DTYPE_Q4_0: /* d, qs */
    case DTYPE_Q8_0:
        memcpy(aux, src, 2);
        memcpy(body, src + 2, (size_t)l.body);
        break;
    case DTYPE_Q6_K: /* ql[128], qh[64], scales[16], d */
        memcpy(body, src, 208);
        memcpy(aux, src + 208, 2);
        break;
    case DTYPE_Q4_1: /* d, m, qs[16] */
        memcpy(aux, src, 4);
        memcpy(body, src + 4, 16);
        break;
    case DTYPE_Q5_0: /* d, qh[4], qs[16] -> aux qh, d, 0 */
        memcpy(aux, src + 2, 4);
        memcpy(aux + 4, src, 2);
        aux[6] = aux[7] = 0;
        memcpy(body, src + 6, 16);
        break;
    case DTYPE_Q5_1: /* d, m, qh[4], qs[16] -> aux qh, d, m */
        memcpy(aux, src + 4, 4);
        memcpy(aux + 4, src, 4);
        memcpy(body, src + 8, 16);
        break;
    case DTYPE_Q2_K: /* scales[16], qs[64], d, dmin */
        memcpy(body, src, 80);
        memcpy(aux, src + 80, 4);
        break;
    case DTYPE_Q3_K: /* hmask[32], qs[64], scales[12], d -> aux scales, d, 0 */
        memcpy(body, src, 96);
        memcpy(aux, src + 96, 14);
        aux[14] = aux[15] = 0;
        break;
    default: /* q4_k, q5_k, plain types: unchanged */
        memcpy(body, src, (size_t)l.bs);
        break;
    }
}

/* ---- unpacking a chunk of 32 values ----------------------------------------- */

/* A quantized weight as the kernels see it. */
struct wq {
    const uint8_t *body;
    const uint8_t *aux;
    int64_t nbr; /* GGUF blocks per row */
};

/* 32 values of a row: q[i] holds values 4i..4i+3 as int8 bytes (little
 * endian); value j = a[s] * q_j + b[s] with s = j / 16 if NS == 2, else 0. */
struct chunk {
    int q[8];
    float a[2], b[2];
};

template <int T> struct qtraits;
/* NS: scale pairs per chunk; MIN: b != 0 (the _1 types and q2/q4/q5_k). */
template <> struct qtraits<DTYPE_Q4_0> { static constexpr int NS = 1; static constexpr bool MIN = false; };
template <> struct qtraits<DTYPE_Q4_1> { static constexpr int NS = 1; static constexpr bool MIN = true; };
template <> struct qtraits<DTYPE_Q5_0> { static constexpr int NS = 1; static constexpr bool MIN = false; };
template <> struct qtraits<DTYPE_Q5_1> { static constexpr int NS = 1; static constexpr bool MIN = true; };
template <> struct qtraits<DTYPE_Q8_0> { static constexpr int NS = 1; static constexpr bool MIN = false; };
template <> struct qtraits<DTYPE_Q2_K> { static constexpr int NS = 2; static constexpr bool MIN = true; };
template <> struct qtraits<DTYPE_Q3_K> { static constexpr int NS = 2; static constexpr bool MIN = false; };
template <> struct qtraits<DTYPE_Q4_K> { static constexpr int NS = 1; static constexpr bool MIN = true; };
template <> struct qtraits<DTYPE_Q5_K> { static constexpr int NS = 1; static constexpr bool MIN = true; };
template <> struct qtraits<DTYPE_Q6_K> { static constexpr int NS = 2; static constexpr bool MIN = false; };

__device__ __forceinline__ float h2f(uint32_t bits) { return __half2float(__ushort_as_half((unsigned short)bits)); }

/* 32 bytes (two aligned 16-byte loads) as 8 words. */
__device__ __forceinline__ void ld32(const uint8_t *p, uint32_t *u) {
    const uint4 a = __ldg((const uint4 *)p), b = __ldg((const uint4 *)p + 1);
    u[0] = a.x, u[1] = a.y, u[2] = a.z, u[3] = a.w;
    u[4] = b.x, u[5] = b.y, u[6] = b.z, u[7] = b.w;
}
__device__ __forceinline__ uint32_t ld_u32(const uint8_t *p) { return __ldg((const unsigned int *)p); }
__device__ __forceinline__ uint32_t ld_u16(const uint8_t *p) { return __ldg((const unsigned short *)p); }

/* Bits 0..3 of x moved to bit 0 of bytes 0..3. */
__device__ __forceinline__ uint32_t spread4(uint32_t x) { return (x * 0x00204081u) & 0x01010101u; }
/* Byte i of 12 bytes held in 3 words (selects, not an indexed array:
 * i is a run-time value and indexing would put w in local memory). */
__device__ __forceinline__ int byte_of(const uint32_t *w, int i) {
    const uint32_t v = i < 4 ? w[0] : i < 8 ? w[1] : w[2];
    return (int)(v >> 8 * (i & 3)) & 0xFF;
}

/* 16 nibbles of one 16-byte q4 block: low nibbles are values 0..15. */
__device__ __forceinline__ void nibbles16(uint4 v, int *q) {
    const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        q[i] = (int)(u[i] & 0x0F0F0F0Fu);
        q[4 + i] = (int)((u[i] >> 4) & 0x0F0F0F0Fu);
    }
}

template <int T> __device__ __forceinline__ void unpack(const wq &w, int64_t row, int c, chunk &k);

template <> __device__ __forceinline__ void unpack<DTYPE_Q4_0>(const wq &w, int64_t row, int c, chunk &k) {
    const int64_t g = row * w.nbr + c;
    nibbles16(__ldg((const uint4 *)(w.body + g * 16)), k.q);
#pragma unroll
    for (int i = 0; i < 8; i++) k.q[i] = (int)__vsub4((uint32_t)k.q[i], 0x08080808u);
    k.a[0] = h2f(ld_u16(w.aux + g * 2));
}

template <> __device__ __forceinline__ void unpack<DTYPE_Q4_1>(const wq &w, int64_t row, int c, chunk &k) {
    const int64_t g = row * w.nbr + c;
    nibbles16(__ldg((const uint4 *)(w.body + g * 16)), k.q);
    const uint32_t dm = ld_u32(w.aux + g * 4);
    k.a[0] = h2f(dm & 0xFFFF);
    k.b[0] = h2f(dm >> 16);
}

/* q5_0/q5_1: nibbles plus bit j of qh as bit 4 of value j. */
__device__ __forceinline__ void q5_high(uint32_t h, int *q) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        q[i] |= (int)(spread4((h >> 4 * i) & 0xF) << 4);
        q[4 + i] |= (int)(spread4((h >> (16 + 4 * i)) & 0xF) << 4);
    }
}

template <> __device__ __forceinline__ void unpack<DTYPE_Q5_0>(const wq &w, int64_t row, int c, chunk &k) {
    const int64_t g = row * w.nbr + c;
    nibbles16(__ldg((const uint4 *)(w.body + g * 16)), k.q);
    const uint2 a = __ldg((const uint2 *)(w.aux + g * 8)); /* qh, d */
    q5_high(a.x, k.q);
#pragma unroll
    for (int i = 0; i < 8; i++) k.q[i] = (int)__vsub4((uint32_t)k.q[i], 0x10101010u);
    k.a[0] = h2f(a.y & 0xFFFF);
}

template <> __device__ __forceinline__ void unpack<DTYPE_Q5_1>(const wq &w, int64_t row, int c, chunk &k) {
    const int64_t g = row * w.nbr + c;
    nibbles16(__ldg((const uint4 *)(w.body + g * 16)), k.q);
    const uint2 a = __ldg((const uint2 *)(w.aux + g * 8)); /* qh, d | m << 16 */
    q5_high(a.x, k.q);
    k.a[0] = h2f(a.y & 0xFFFF);
    k.b[0] = h2f(a.y >> 16);
}

template <> __device__ __forceinline__ void unpack<DTYPE_Q8_0>(const wq &w, int64_t row, int c, chunk &k) {
    const int64_t g = row * w.nbr + c;
    ld32(w.body + g * 32, (uint32_t *)k.q);
    k.a[0] = h2f(ld_u16(w.aux + g * 2));
}

/* k-quants: chunk c is sub-chunk s = c % 8 (values 32s..32s+31) of block c / 8. */
template <> __device__ __forceinline__ void unpack<DTYPE_Q2_K>(const wq &w, int64_t row, int c, chunk &k) {
    const int64_t g = row * w.nbr + (c >> 3);
    const int s = c & 7;
    const uint8_t *b = w.body + g * 80;
    uint32_t u[8];
    ld32(b + 16 + 32 * (s >> 2), u); /* value 128h + 32s' + l: qs[32h + l] >> 2s' */
#pragma unroll
    for (int i = 0; i < 8; i++) k.q[i] = (int)((u[i] >> 2 * (s & 3)) & 0x03030303u);
    const uint32_t sc = ld_u16(b + 2 * s); /* scales of sub-blocks 2s, 2s+1 */
    const uint32_t dd = ld_u32(w.aux + g * 4);
    const float d = h2f(dd & 0xFFFF), dmin = h2f(dd >> 16);
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const uint32_t v = sc >> 8 * j & 0xFF;
        k.a[j] = __fmul_rn(d, (float)(v & 0xF));
        k.b[j] = -__fmul_rn(dmin, (float)(v >> 4));
    }
}

template <> __device__ __forceinline__ void unpack<DTYPE_Q3_K>(const wq &w, int64_t row, int c, chunk &k) {
    const int64_t g = row * w.nbr + (c >> 3);
    const int s = c & 7;
    const uint8_t *b = w.body + g * 96;
    uint32_t hm[8], u[8];
    ld32(b, hm);                     /* value 32s + l: bit s of hmask[l]            */
    ld32(b + 32 + 32 * (s >> 2), u); /* low 2 bits as q2_k                          */
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const uint32_t v = ((u[i] >> 2 * (s & 3)) & 0x03030303u) | (((hm[i] >> s) & 0x01010101u) << 2);
        k.q[i] = (int)__vsub4(v, 0x04040404u);
    }
    const uint4 a = __ldg((const uint4 *)(w.aux + g * 16)); /* scales[12], d */
    const uint32_t sw[3] = {a.x, a.y, a.z};
    const float d = h2f(a.w & 0xFFFF);
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const int js = 2 * s + j; /* as quant_scale_q3_k */
        const int lo = js < 8 ? byte_of(sw, js) & 0xF : byte_of(sw, js - 8) >> 4;
        const int hi = (byte_of(sw, 8 + js % 4) >> (2 * (js / 4))) & 3;
        k.a[j] = __fmul_rn(d, (float)((lo | hi << 4) - 32));
    }
}

/* Scale and min of sub-block j of a q4_k/q5_k block (quant_scale_min_k4). */
__device__ __forceinline__ void scale_min_k4(const uint8_t *b, int j, float *a, float *m) {
    const uint32_t dd = ld_u32(b);
    const uint32_t sw[3] = {ld_u32(b + 4), ld_u32(b + 8), ld_u32(b + 12)};
    int sc, mn;
    if (j < 4) {
        sc = byte_of(sw, j) & 63;
        mn = byte_of(sw, j + 4) & 63;
    } else {
        sc = (byte_of(sw, j + 4) & 0xF) | ((byte_of(sw, j - 4) >> 6) << 4);
        mn = (byte_of(sw, j + 4) >> 4) | ((byte_of(sw, j) >> 6) << 4);
    }
    *a = __fmul_rn(h2f(dd & 0xFFFF), (float)sc);
    *m = -__fmul_rn(h2f(dd >> 16), (float)mn);
}

template <> __device__ __forceinline__ void unpack<DTYPE_Q4_K>(const wq &w, int64_t row, int c, chunk &k) {
    const int64_t g = row * w.nbr + (c >> 3);
    const int s = c & 7;
    const uint8_t *b = w.body + g * 144;
    uint32_t u[8];
    ld32(b + 16 + 32 * (s >> 1), u); /* value 64c' + l: qs[32c' + l] & 15; 64c' + 32 + l: >> 4 */
#pragma unroll
    for (int i = 0; i < 8; i++) k.q[i] = (int)((u[i] >> 4 * (s & 1)) & 0x0F0F0F0Fu);
    scale_min_k4(b, s, &k.a[0], &k.b[0]);
}

template <> __device__ __forceinline__ void unpack<DTYPE_Q5_K>(const wq &w, int64_t row, int c, chunk &k) {
    const int64_t g = row * w.nbr + (c >> 3);
    const int s = c & 7;
    const uint8_t *b = w.body + g * 176;
    uint32_t u[8], h[8];
    ld32(b + 48 + 32 * (s >> 1), u);
    ld32(b + 16, h); /* value 32s + l: bit s of qh[l] */
#pragma unroll
    for (int i = 0; i < 8; i++)
        k.q[i] = (int)(((u[i] >> 4 * (s & 1)) & 0x0F0F0F0Fu) | (((h[i] >> s) & 0x01010101u) << 4));
    scale_min_k4(b, s, &k.a[0], &k.b[0]);
}

template <> __device__ __forceinline__ void unpack<DTYPE_Q6_K>(const wq &w, int64_t row, int c, chunk &k) {
    const int64_t g = row * w.nbr + (c >> 3);
    const int s = c & 7, h = s >> 2, s4 = s & 3; /* values 128h + 32s4 + l */
    const uint8_t *b = w.body + g * 208;
    uint32_t lo[8], hi[8];
    ld32(b + 64 * h + 32 * (s4 & 1), lo); /* nibble s4/2 of ql[64h + (32s4 + l) % 64] */
    ld32(b + 128 + 32 * h, hi);           /* bits 2s4.. of qh[32h + l]                */
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const uint32_t v = ((lo[i] >> 4 * (s4 >> 1)) & 0x0F0F0F0Fu) | (((hi[i] >> 2 * s4) & 0x03030303u) << 4);
        k.q[i] = (int)__vsub4(v, 0x20202020u);
    }
    const uint32_t sc = ld_u16(b + 192 + 2 * s);
    const float d = h2f(ld_u16(w.aux + g * 2));
    k.a[0] = __fmul_rn(d, (float)(int8_t)(sc & 0xFF));
    k.a[1] = __fmul_rn(d, (float)(int8_t)(sc >> 8));
}

/* The 32 float values of a chunk, computed as src/quant.c does. */
template <int T> __device__ __forceinline__ void chunk_values(const chunk &k, float *v) {
#pragma unroll
    for (int j = 0; j < 32; j++) {
        const float q = (float)(int8_t)(k.q[j >> 2] >> 8 * (j & 3));
        const int s = qtraits<T>::NS == 2 ? j >> 4 : 0;
        v[j] = qtraits<T>::MIN ? __fadd_rn(__fmul_rn(k.a[s], q), k.b[s]) : __fmul_rn(k.a[s], q);
    }
}

/* ---- plain types ---------------------------------------------------------- */

template <int T> __device__ __forceinline__ float plain_value(const void *w, int64_t i);
template <> __device__ __forceinline__ float plain_value<DTYPE_F32>(const void *w, int64_t i) {
    return __ldg((const float *)w + i);
}
template <> __device__ __forceinline__ float plain_value<DTYPE_F16>(const void *w, int64_t i) {
    return __half2float(__ldg((const __half *)w + i));
}
template <> __device__ __forceinline__ float plain_value<DTYPE_BF16>(const void *w, int64_t i) {
    return __uint_as_float((uint32_t)__ldg((const unsigned short *)w + i) << 16);
}

/* 8 values from element i (a multiple of 8, 16-byte aligned). */
template <int T> __device__ __forceinline__ void plain_load8(const void *w, int64_t i, float *v) {
    if constexpr (T == DTYPE_F32) {
        const float4 a = __ldg((const float4 *)((const float *)w + i)), b = __ldg((const float4 *)((const float *)w + i) + 1);
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
        const uint4 a = __ldg((const uint4 *)((const uint16_t *)w + i));
        const uint32_t u[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            if constexpr (T == DTYPE_F16) {
                v[2 * j] = h2f(u[j] & 0xFFFF);
                v[2 * j + 1] = h2f(u[j] >> 16);
            } else {
                v[2 * j] = __uint_as_float(u[j] << 16);
                v[2 * j + 1] = __uint_as_float(u[j] & 0xFFFF0000u);
            }
        }
    }
}

/* ---- matrix-vector kernels ------------------------------------------------- */

/* Sums acc over the block's threads (whole warps, at most MMV_THREADS_MAX)
 * and writes y[t * n_out + row0 + r]. */
template <int R, int NT>
__device__ __forceinline__ void mmv_store(float (&acc)[R][NT], float *y, int64_t ldy, int64_t row0, int64_t n_out,
                                          bool accumulate) {
    __shared__ float red[MMV_THREADS_MAX / 32][R * NT];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) {
            const float v = warp_sum(acc[r][t]);
            if (lane == 0) red[warp][r * NT + t] = v;
        }
    __syncthreads();
    if (threadIdx.x < R * NT) {
        const int r = threadIdx.x / NT, t = threadIdx.x % NT;
        float v = 0.0f;
#pragma unroll
        for (int i = 0; i < n_warps; i++) v += red[i][threadIdx.x];
        const int64_t row = row0 + r;
        if (row < n_out) {
            float *p = y + t * ldy + row;
            *p = accumulate ? *p + v : v;
        }
    }
}

/* x (n_tok, n_in) f32 -> int8 quants xq (n_tok, n_in) and per block of 32
 * (d, sum of the quants) in xs (n_tok, n_in / 32). One warp per block. */
__global__ void quantize_x_kernel(const float *__restrict__ x, int8_t *__restrict__ xq, float2 *__restrict__ xs,
                                  int64_t n_blocks) {
    const int64_t blk = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (blk >= n_blocks) return; /* whole warps leave together */
    const int lane = threadIdx.x & 31;
    const float v = x[blk * 32 + lane];
    const float amax = warp_max(fabsf(v));
    const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
    const int q = __float2int_rn(v * id);
    xq[blk * 32 + lane] = (int8_t)q;
    const int sum = __reduce_add_sync(0xffffffffu, q);
    if (lane == 0) xs[blk] = make_float2(d, (float)sum);
}

/* acc[r][t] += chunk k[r] . x block c of token t, for R rows and NT tokens. */
template <int T, int NT, int R>
__device__ __forceinline__ void mmv_chunk_acc(const chunk (&k)[R], const int8_t *__restrict__ xq,
                                              const float2 *__restrict__ xs, int64_t n_in, int nc, int c,
                                              float (&acc)[R][NT]) {
#pragma unroll
    for (int t = 0; t < NT; t++) {
        const uint4 *xp = (const uint4 *)(xq + t * n_in + (int64_t)c * 32);
        const uint4 xa = __ldg(xp), xb = __ldg(xp + 1);
        const float2 s = __ldg(&xs[(int64_t)t * nc + c]);
        const int xw[8] = {(int)xa.x, (int)xa.y, (int)xa.z, (int)xa.w, (int)xb.x, (int)xb.y, (int)xb.z, (int)xb.w};
        float sx0 = 0.0f, sx1 = 0.0f; /* sums of x quants per half (q2_k's mins) */
        if (qtraits<T>::MIN && qtraits<T>::NS == 2) {
            int a = 0, b = 0;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                a = __dp4a(xw[i], 0x01010101, a);
                b = __dp4a(xw[4 + i], 0x01010101, b);
            }
            sx0 = (float)a, sx1 = (float)b;
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            int s0 = 0, s1 = 0;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                s0 = __dp4a(k[r].q[i], xw[i], s0);
                s1 = __dp4a(k[r].q[4 + i], xw[4 + i], s1);
            }
            float f;
            if (qtraits<T>::NS == 1) {
                f = k[r].a[0] * (float)(s0 + s1);
                if (qtraits<T>::MIN) f += k[r].b[0] * s.y;
            } else {
                f = k[r].a[0] * (float)s0 + k[r].a[1] * (float)s1;
                if (qtraits<T>::MIN) f += k[r].b[0] * sx0 + k[r].b[1] * sx1;
            }
            acc[r][t] += s.x * f;
        }
    }
}

/* y[t, row] (+)= sum over chunks of dot(chunk, x block); R rows per block,
 * NT tokens: each weight chunk is loaded once and used for every token.
 * Threads: mmv_threads() (a thread per chunk, or fewer that loop).
 * Launched with programmatic dependent launch (cu_launch): the weights do
 * not depend on the kernel before, so each thread loads its first chunks
 * before pdl_begin() and that DRAM latency overlaps the previous kernel's
 * tail; x and y are touched only after it. */
template <int T, int NT, int R>
__global__ void __launch_bounds__(MMV_THREADS_MAX)
    mmv_q_kernel(wq w, const int8_t *__restrict__ xq, const float2 *__restrict__ xs, float *__restrict__ y,
                 int64_t ldy, int64_t n_in, int64_t n_out, int nc, bool accumulate) {
    const int64_t row0 = (int64_t)blockIdx.x * R;
    float acc[R][NT];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[r][t] = 0.0f;

    chunk k[R];
    int c = threadIdx.x;
    if (c < nc)
#pragma unroll
        for (int r = 0; r < R; r++) unpack<T>(w, min(row0 + r, n_out - 1), c, k[r]); /* extra rows: discarded */
    pdl_begin();
    while (c < nc) {
        mmv_chunk_acc<T, NT, R>(k, xq, xs, n_in, nc, c, acc);
        c += blockDim.x;
        if (c >= nc) break;
#pragma unroll
        for (int r = 0; r < R; r++) unpack<T>(w, min(row0 + r, n_out - 1), c, k[r]);
    }
    mmv_store<R, NT>(acc, y, ldy, row0, n_out, accumulate);
}

/* f32/f16/bf16 weights with f32 x: V = 8 (vector loads; n_in % 8 == 0 and
 * x 16-byte aligned) or 1. */
template <int T, int NT, int R, int V>
__global__ void __launch_bounds__(MMV_THREADS, 2)
    mmv_plain_kernel(const void *__restrict__ w, const float *__restrict__ x, float *__restrict__ y, int64_t ldy,
                     int64_t n_in, int64_t n_out, bool accumulate) {
    const int64_t row0 = (int64_t)blockIdx.x * R;
    float acc[R][NT];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[r][t] = 0.0f;

    for (int64_t i = (int64_t)threadIdx.x * V; i < n_in; i += MMV_THREADS * V) {
        float wv[R][V];
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int64_t off = min(row0 + r, n_out - 1) * n_in + i;
            if constexpr (V == 8) plain_load8<T>(w, off, wv[r]);
            else wv[r][0] = plain_value<T>(w, off);
        }
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float xv[V];
            if constexpr (V == 8) {
                plain_load8<DTYPE_F32>(x, t * n_in + i, xv);
            } else {
                xv[0] = __ldg(x + t * n_in + i);
            }
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int j = 0; j < V; j++) acc[r][t] = fmaf(wv[r][j], xv[j], acc[r][t]);
        }
    }
    mmv_store<R, NT>(acc, y, ldy, row0, n_out, accumulate);
}

/* ---- dequantizers ----------------------------------------------------------- */

/* bf16 rows as f16 (the gemm's input type). */
__global__ void bf16_to_f16_kernel(const uint16_t *__restrict__ w, __half *__restrict__ out, int64_t n) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __float2half_rn(__uint_as_float((uint32_t)w[i] << 16));
}

__global__ void f32_to_f16_kernel(const float *__restrict__ x, __half *__restrict__ out, int64_t n) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __float2half_rn(x[i]);
}

/* out (n, n_in) = rows tokens[] of a quantized table; one thread per chunk.
 * A token outside [0, n_rows) gives NaN rows (the caller checks tokens). */
template <int T>
__global__ void get_rows_q_kernel(wq w, const int32_t *__restrict__ tokens, float *__restrict__ out, int64_t n,
                                  int64_t n_rows, int nc) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * nc) return;
    const int64_t e = i / nc;
    const int c = (int)(i % nc);
    const int32_t tok = tokens[e];
    float v[32];
    if (tok >= 0 && tok < n_rows) {
        chunk k;
        unpack<T>(w, tok, c, k);
        chunk_values<T>(k, v);
    } else {
#pragma unroll
        for (int j = 0; j < 32; j++) v[j] = __int_as_float(0x7fc00000);
    }
    float4 *o = (float4 *)(out + e * ((int64_t)nc * 32) + (int64_t)c * 32);
#pragma unroll
    for (int j = 0; j < 8; j++) o[j] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
}

template <int T>
__global__ void get_rows_plain_kernel(const void *__restrict__ w, const int32_t *__restrict__ tokens,
                                      float *__restrict__ out, int64_t n, int64_t n_rows, int64_t n_in) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * n_in) return;
    const int64_t e = i / n_in, j = i % n_in;
    const int32_t tok = tokens[e];
    out[i] = tok >= 0 && tok < n_rows ? plain_value<T>(w, tok * n_in + j) : __int_as_float(0x7fc00000);
}

/* ---- fused matrix-vector: input step + 8-bit quantization in shared memory --- */

/* cu_mm_in as the kernels get it (ld resolved). */
struct mm_in_dev {
    int kind, act;
    float thr, eps;
    int64_t ld;
    const float *norm, *up;
};

static constexpr int MMF_THREADS = 256;
static constexpr int MMF_WARPS = MMF_THREADS / 32;

__device__ __forceinline__ void ld8f(const float *p, float *v) {
    const float4 a = *(const float4 *)p, b = *((const float4 *)p + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

/* The input value j of token row t, as the CPU computes it: rmsnorm
 * x * scale * w, FATReLU then act(g) * u, or x itself. */
__device__ __forceinline__ float in_value(const mm_in_dev &in, const float *x, int64_t t, int64_t j, float scale) {
    if (in.kind == CU_IN_ACT_MUL) {
        float u = in.up[t * in.ld + j], g = 0.0f;
        if (in.act != 5) g = x[t * in.ld + j];
        if (in.thr > 0.0f) {
            if (in.act == 5) u = u > in.thr ? u : 0.0f;
            else g = g > in.thr ? g : 0.0f;
        }
        return cu_act_value(in.act, g, u);
    }
    const float v = x[t * in.ld + j];
    return in.kind == CU_IN_RMSNORM ? v * scale * in.norm[j] : v;
}

/* 8 values from j (a multiple of 8; rows 16-byte aligned). */
__device__ __forceinline__ void in_values8(const mm_in_dev &in, const float *x, int64_t t, int64_t j, float scale,
                                           float *v) {
    if (in.kind == CU_IN_ACT_MUL) {
        float u[8], g[8];
        ld8f(in.up + t * in.ld + j, u);
        if (in.act != 5) ld8f(x + t * in.ld + j, g);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            if (in.act == 5) g[e] = 0.0f;
            if (in.thr > 0.0f) {
                if (in.act == 5) u[e] = u[e] > in.thr ? u[e] : 0.0f;
                else g[e] = g[e] > in.thr ? g[e] : 0.0f;
            }
            v[e] = cu_act_value(in.act, g[e], u[e]);
        }
        return;
    }
    ld8f(x + t * in.ld + j, v);
    if (in.kind == CU_IN_RMSNORM) {
        float w[8];
        ld8f(in.norm + j, w);
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = v[e] * scale * w[e];
    }
}

/* 1 / rms of token row t (block-wide; every thread gets it): the sum of
 * squares in double, as ops_rmsnorm and rmsnorm_kernel. red: NW doubles. */
template <int NW>
__device__ __forceinline__ float rms_scale(const float *xr, int64_t n, float eps, double *red) {
    double ss = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ss += (double)xr[i] * xr[i];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = ss;
    __syncthreads();
    ss = 0.0;
    for (int i = 0; i < NW; i++) ss += red[i];
    __syncthreads(); /* red is reused by the next row */
    return (float)(1.0 / sqrt(ss / (double)n + eps));
}

/* rms_scale for a 16-byte aligned row, n % 4 == 0, on T threads (the
 * block) with L float4 loads in flight per thread; red: T / 32 doubles,
 * not reused after (a block per row). */
template <int T, int L>
__device__ __forceinline__ float rms_scale4(const float *x, int n, float eps, double *red) {
    const float4 *xr = (const float4 *)x;
    const int n4 = n / 4;
    double ss = 0.0;
    for (int j0 = threadIdx.x; j0 < n4; j0 += L * T) {
        float4 a[L];
#pragma unroll
        for (int u = 0; u < L; u++) {
            const int j = j0 + u * T;
            a[u] = j < n4 ? xr[j] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int u = 0; u < L; u++)
            ss += (double)a[u].x * a[u].x + (double)a[u].y * a[u].y + (double)a[u].z * a[u].z +
                  (double)a[u].w * a[u].w;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = ss;
    __syncthreads();
    ss = 0.0;
#pragma unroll
    for (int w = 0; w < T / 32; w++) ss += red[w];
    return (float)(1.0 / sqrt(ss / (double)n + eps));
}

/* Block-wide: NT rows through the input step, quantized as quantize_x_kernel
 * (blocks of 32, d = amax / 127, round to nearest) into shared memory: xq
 * (NT, n_in) int8 and xs (NT, n_in / 32) (d, sum of quants). A thread does
 * 8 values; the 4 threads of a block of 32 agree through shuffles. */
template <int NT>
__device__ __forceinline__ void mmf_prologue(const float *x, const mm_in_dev &in, int n_in, int8_t *xq, float2 *xs) {
    __shared__ double red[MMF_WARPS];
    const int nc = n_in / 32, lane = threadIdx.x & 31;
    const unsigned gmask = 0xFu << (lane & 28);
    for (int t = 0; t < NT; t++) {
        const float scale = in.kind == CU_IN_RMSNORM ? rms_scale<MMF_WARPS>(x + t * in.ld, n_in, in.eps, red) : 1.0f;
        for (int i = threadIdx.x * 8; i < n_in; i += MMF_THREADS * 8) { /* whole groups of 4 stay together */
            float v[8];
            in_values8(in, x, t, i, scale, v);
            float amax = 0.0f;
#pragma unroll
            for (int e = 0; e < 8; e++) amax = fmaxf(amax, fabsf(v[e]));
            amax = fmaxf(amax, __shfl_xor_sync(gmask, amax, 1));
            amax = fmaxf(amax, __shfl_xor_sync(gmask, amax, 2));
            const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
            int sum = 0;
            uint32_t pk[2] = {0, 0};
#pragma unroll
            for (int e = 0; e < 8; e++) {
                const int q = __float2int_rn(v[e] * id);
                sum += q;
                pk[e >> 2] |= (uint32_t)(q & 0xFF) << 8 * (e & 3);
            }
            sum += __shfl_xor_sync(gmask, sum, 1);
            sum += __shfl_xor_sync(gmask, sum, 2);
            *(uint2 *)(xq + t * n_in + i) = make_uint2(pk[0], pk[1]);
            if ((lane & 3) == 0) xs[t * nc + i / 32] = make_float2(d, (float)sum);
        }
    }
    __syncthreads();
}

/* dot(chunk, x block) * d as mmv_q_kernel computes it. */
template <int T>
__device__ __forceinline__ float chunk_dot(const chunk &k, const int *xw, float2 s) {
    float sx0 = 0.0f, sx1 = 0.0f;
    if (qtraits<T>::MIN && qtraits<T>::NS == 2) {
        int a = 0, b = 0;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            a = __dp4a(xw[i], 0x01010101, a);
            b = __dp4a(xw[4 + i], 0x01010101, b);
        }
        sx0 = (float)a, sx1 = (float)b;
    }
    int s0 = 0, s1 = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        s0 = __dp4a(k.q[i], xw[i], s0);
        s1 = __dp4a(k.q[4 + i], xw[4 + i], s1);
    }
    float f;
    if (qtraits<T>::NS == 1) {
        f = k.a[0] * (float)(s0 + s1);
        if (qtraits<T>::MIN) f += k.b[0] * s.y;
    } else {
        f = k.a[0] * (float)s0 + k.a[1] * (float)s1;
        if (qtraits<T>::MIN) f += k.b[0] * sx0 + k.b[1] * sx1;
    }
    return s.x * f;
}

/* One token, persistent (cu_tuning.mmv_kernel 3): the grid is what fits on
 * the GPU at once, block b takes row groups b, b + grid, ... of R rows. The
 * block has a thread per chunk of the row (n_in <= 32 * MMV_THREADS_MAX), so
 * the x chunk stays in registers, and each thread issues the loads of its
 * next row group before the current group is reduced: every resident
 * thread keeps R 16-byte loads in flight from the start to the end, where
 * short-lived blocks of the block kernel leave DRAM idle between waves.
 * The warps' partial sums meet in shared memory (double-buffered: one
 * barrier per group). Same sums in the same order as mmv_q_kernel with a
 * thread per chunk. */
template <int T, int R>
__global__ void __launch_bounds__(MMV_THREADS_MAX)
    mmv_q_persist_kernel(wq w, const int8_t *__restrict__ xq, const float2 *__restrict__ xs, float *__restrict__ y,
                         int64_t n_out, int nc, bool accumulate) {
    __shared__ float red[2][MMV_THREADS_MAX / 32][R];
    const int c = threadIdx.x, warp = c >> 5, lane = c & 31, n_warps = blockDim.x >> 5;
    const bool on = c < nc;
    const int64_t n_groups = (n_out + R - 1) / R;
    int64_t g = blockIdx.x;
    chunk k[R];
    if (on && g < n_groups)
#pragma unroll
        for (int r = 0; r < R; r++) unpack<T>(w, min(g * R + r, n_out - 1), c, k[r]); /* before the wait: PDL */
    pdl_begin();
    int xw[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    float2 s = make_float2(0.0f, 0.0f);
    if (on) {
        const uint4 *xp = (const uint4 *)(xq + (int64_t)c * 32);
        const uint4 xa = __ldg(xp), xb = __ldg(xp + 1);
        s = __ldg(&xs[c]);
        xw[0] = (int)xa.x, xw[1] = (int)xa.y, xw[2] = (int)xa.z, xw[3] = (int)xa.w;
        xw[4] = (int)xb.x, xw[5] = (int)xb.y, xw[6] = (int)xb.z, xw[7] = (int)xb.w;
    }
    for (int buf = 0; g < n_groups; g += gridDim.x, buf ^= 1) {
        float acc[R];
#pragma unroll
        for (int r = 0; r < R; r++) acc[r] = on ? 0.0f + chunk_dot<T>(k[r], xw, s) : 0.0f;
        const int64_t gn = g + gridDim.x;
        if (on && gn < n_groups)
#pragma unroll
            for (int r = 0; r < R; r++) unpack<T>(w, min(gn * R + r, n_out - 1), c, k[r]);
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float v = warp_sum(acc[r]);
            if (lane == 0) red[buf][warp][r] = v;
        }
        __syncthreads();
        if (c < R && g * R + c < n_out) {
            float v = 0.0f;
            for (int i = 0; i < n_warps; i++) v += red[buf][i][c];
            float *p = y + g * R + c;
            *p = accumulate ? *p + v : v;
        }
    }
}

/* y[t * ldy + row] (+)= in(x)[t] . W[row] for NT tokens. The block first
 * builds the quantized input in shared memory (every block: the input is
 * small and in L2), then loops over groups of rows: a warp owns R rows, its
 * lanes split the row's chunks, U chunks per lane per row in flight (16-byte
 * loads), then a warp reduction. The grid is a few blocks per SM, each
 * looping, so the input step is paid a few hundred times, not per row. */
/* PRO false: the same loop over x already quantized in global memory
 * (gxq, gxs as quantize_x_kernel writes them; tiny, so L1/L2 hits); no
 * prologue, no shared memory. */
template <int T, int NT, int R, int U, bool PRO>
__global__ void __launch_bounds__(MMF_THREADS, 2)
    mmf_q_kernel(wq w, const float *__restrict__ x, mm_in_dev in, const int8_t *__restrict__ gxq,
                 const float2 *__restrict__ gxs, float *__restrict__ y, int64_t ldy, int n_in, int64_t n_out,
                 bool accumulate) {
    extern __shared__ uint4 mmf_smem[];
    pdl_begin();
    const int nc = n_in / 32;
    const int8_t *xq = gxq;
    const float2 *xs = gxs;
    if constexpr (PRO) {
        int8_t *sq = (int8_t *)mmf_smem;
        float2 *ss = (float2 *)(sq + NT * n_in);
        mmf_prologue<NT>(x, in, n_in, sq, ss);
        xq = sq, xs = ss;
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t step = (int64_t)gridDim.x * MMF_WARPS * R;
    for (int64_t row0 = ((int64_t)blockIdx.x * MMF_WARPS + warp) * R; row0 < n_out; row0 += step) {
        float acc[R][NT];
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int t = 0; t < NT; t++) acc[r][t] = 0.0f;
        for (int c0 = lane; c0 < nc; c0 += 32 * U) {
            chunk k[U][R];
#pragma unroll
            for (int u = 0; u < U; u++)
#pragma unroll
                for (int r = 0; r < R; r++)
                    if (c0 + 32 * u < nc) unpack<T>(w, min(row0 + r, n_out - 1), c0 + 32 * u, k[u][r]);
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int c = c0 + 32 * u;
                if (c >= nc) break;
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    const uint4 *xp = (const uint4 *)(xq + t * n_in + c * 32);
                    uint4 xa, xb;
                    float2 s;
                    if constexpr (PRO) {
                        xa = xp[0], xb = xp[1], s = xs[t * nc + c];
                    } else {
                        xa = __ldg(xp), xb = __ldg(xp + 1), s = __ldg(&xs[t * nc + c]);
                    }
                    const int xw[8] = {(int)xa.x, (int)xa.y, (int)xa.z, (int)xa.w,
                                       (int)xb.x, (int)xb.y, (int)xb.z, (int)xb.w};
#pragma unroll
                    for (int r = 0; r < R; r++) acc[r][t] += chunk_dot<T>(k[u][r], xw, s);
                }
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int t = 0; t < NT; t++) {
                const float v = warp_sum(acc[r][t]);
                if (lane == r * NT + t && row0 + r < n_out) {
                    float *p = y + t * ldy + row0 + r;
                    *p = accumulate ? *p + v : v;
                }
            }
    }
}

/* The input step alone, for the unfused paths: one block per token row,
 * out (n_tok, n) contiguous, f32 or f16 (the GEMM's input). */
template <typename O>
__global__ void __launch_bounds__(256) mm_in_kernel(const float *__restrict__ x, mm_in_dev in, int64_t n, O *out) {
    __shared__ double red[8];
    const int64_t t = blockIdx.x;
    const float scale = in.kind == CU_IN_RMSNORM ? rms_scale<8>(x + t * in.ld, n, in.eps, red) : 1.0f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        const float v = in_value(in, x, t, j, scale);
        if constexpr (sizeof(O) == 2) out[t * n + j] = __float2half_rn(v);
        else out[t * n + j] = v;
    }
}

/* mm_in_kernel on 8 values per thread (16- or 32-byte loads and stores,
 * two groups' loads in flight): the prompt's input step, a block per token
 * row. A scalar loop of dependent 4-byte loads left it at ~20 us per 512
 * x 4096 call on an H200 (ncu), 8.5% of the 7B pp512 step. Rows 16-byte
 * aligned, n % 8 == 0. */
template <typename O>
__global__ void __launch_bounds__(256) mm_in8_kernel(const float *__restrict__ x, mm_in_dev in, int n, O *out) {
    __shared__ double red[8];
    const int64_t t = blockIdx.x;
    const float scale = in.kind == CU_IN_RMSNORM ? rms_scale4<256, 4>(x + t * in.ld, n, in.eps, red) : 1.0f;
    for (int i0 = 8 * threadIdx.x; i0 < n; i0 += 2 * 8 * 256) {
        float v[2][8];
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int i = i0 + 8 * 256 * u;
            if (i < n) in_values8(in, x, t, i, scale, v[u]);
        }
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int i = i0 + 8 * 256 * u;
            if (i >= n) continue;
            if constexpr (sizeof(O) == 2) {
                __half2 h[4];
#pragma unroll
                for (int e = 0; e < 4; e++) h[e] = __floats2half2_rn(v[u][2 * e], v[u][2 * e + 1]);
                *(uint4 *)(out + t * n + i) = *(const uint4 *)h;
            } else {
                *(float4 *)(out + t * n + i) = make_float4(v[u][0], v[u][1], v[u][2], v[u][3]);
                *(float4 *)(out + t * n + i + 4) = make_float4(v[u][4], v[u][5], v[u][6], v[u][7]);
            }
        }
    }
}

/* The input step and the 8-bit quantization of one token row (a block per
 * row) into global xq (n_tok, n_in) / xs (n_tok, n_in / 32), as
 * mmf_prologue computes it, for the product kernels that follow (one small
 * launch instead of a prologue in every block of the product). G groups of
 * 8 values per thread stay in registers between the sum of squares and the
 * quantization; group g of thread i is values 8 (i + INQ_THREADS g) ..., so
 * the 4 groups of a block of 32 are 4 neighbouring lanes of one warp.
 * Rows 16-byte aligned, n_in % 32 == 0, n_in <= 8 * INQ_THREADS * G. */
static constexpr int INQ_THREADS = 512;

template <int G>
__global__ void __launch_bounds__(INQ_THREADS)
    mm_inq_kernel(const float *__restrict__ x, mm_in_dev in, int n_in, int8_t *__restrict__ xq,
                  float2 *__restrict__ xs) {
    __shared__ double red[INQ_THREADS / 32];
    pdl_begin();
    const int64_t t = blockIdx.x;
    const int lane = threadIdx.x & 31, nc = n_in / 32;
    float v[G][8];
    double ss = 0.0;
#pragma unroll
    for (int g = 0; g < G; g++) {
        const int i = 8 * (threadIdx.x + INQ_THREADS * g);
        if (i < n_in) {
            if (in.kind == CU_IN_RMSNORM) { /* x for now; x * scale * w below */
                ld8f(x + t * in.ld + i, v[g]);
#pragma unroll
                for (int e = 0; e < 8; e++) ss += (double)v[g][e] * v[g][e];
            } else {
                in_values8(in, x, t, i, 1.0f, v[g]);
            }
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++) v[g][e] = 0.0f;
        }
    }
    if (in.kind == CU_IN_RMSNORM) { /* block sum in double, as ops_rmsnorm */
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (lane == 0) red[threadIdx.x / 32] = ss;
        __syncthreads();
        ss = 0.0;
#pragma unroll
        for (int i = 0; i < INQ_THREADS / 32; i++) ss += red[i];
        const float scale = (float)(1.0 / sqrt(ss / (double)n_in + in.eps));
#pragma unroll
        for (int g = 0; g < G; g++) { /* x * scale * w, the CPU's order */
            const int i = 8 * (threadIdx.x + INQ_THREADS * g);
            if (i < n_in) {
                float wr[8];
                ld8f(in.norm + i, wr);
#pragma unroll
                for (int e = 0; e < 8; e++) v[g][e] = v[g][e] * scale * wr[e];
            }
        }
    }
#pragma unroll
    for (int g = 0; g < G; g++) {
        const int i = 8 * (threadIdx.x + INQ_THREADS * g);
        float amax = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; e++) amax = fmaxf(amax, fabsf(v[g][e]));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
        const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        uint32_t pk[2] = {0, 0};
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const int q = __float2int_rn(v[g][e] * id);
            sum += q;
            pk[e >> 2] |= (uint32_t)(q & 0xFF) << 8 * (e & 3);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        if (i < n_in) {
            *(uint2 *)(xq + t * n_in + i) = make_uint2(pk[0], pk[1]);
            if ((lane & 3) == 0) xs[t * nc + i / 32] = make_float2(d, (float)sum);
        }
    }
}

/* mm_inq_kernel's work spread over blocks of INQ2_THREADS threads, a
 * thread per 8 values (4 lanes per block of 32): grid (row blocks, n_tok).
 * For rmsnorm every block sums the squares of the whole row itself (one
 * more L2 read of the row per block, no second launch); the other input
 * kinds need no reduction. One block per row left the act+quantize step
 * of a 7B layer at 7.4 us on an H200 (ncu), most of it one SM's latency. */
static constexpr int INQ2_THREADS = 128;

__global__ void __launch_bounds__(INQ2_THREADS)
    mm_inq2_kernel(const float *__restrict__ x, mm_in_dev in, int n_in, int8_t *__restrict__ xq,
                   float2 *__restrict__ xs) {
    __shared__ double red[INQ2_THREADS / 32];
    pdl_begin();
    const int64_t t = blockIdx.y;
    const int lane = threadIdx.x & 31, nc = n_in / 32;
    const int i = 8 * (blockIdx.x * INQ2_THREADS + threadIdx.x);
    float v[8];
    if (in.kind == CU_IN_RMSNORM) {
        const float scale = rms_scale4<INQ2_THREADS, 8>(x + t * in.ld, n_in, in.eps, red);
        if (i < n_in) in_values8(in, x, t, i, scale, v);
    } else if (i < n_in) {
        in_values8(in, x, t, i, 1.0f, v);
    }
    if (i >= n_in)
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = 0.0f;
    float amax = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; e++) amax = fmaxf(amax, fabsf(v[e]));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
    int sum = 0;
    uint32_t pk[2] = {0, 0};
#pragma unroll
    for (int e = 0; e < 8; e++) {
        const int q = __float2int_rn(v[e] * id);
        sum += q;
        pk[e >> 2] |= (uint32_t)(q & 0xFF) << 8 * (e & 3);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (i < n_in) {
        *(uint2 *)(xq + t * n_in + i) = make_uint2(pk[0], pk[1]);
        if ((lane & 3) == 0) xs[t * nc + i / 32] = make_float2(d, (float)sum);
    }
}

/* Values 8 p .. 8 p + 7 of chunk c of a row as q[0..1] (int8 bytes) and
 * their scale pair: the whole chunk unpacked, a quarter kept. */
template <int T>
__device__ __forceinline__ void unpack_part(const wq &w, int64_t row, int c, int p, int *q, float &a, float &b) {
    chunk k;
    unpack<T>(w, row, c, k);
    /* selects, not k.q[2 * p]: a run-time index would put k in local memory */
    q[0] = p == 0 ? k.q[0] : p == 1 ? k.q[2] : p == 2 ? k.q[4] : k.q[6];
    q[1] = p == 0 ? k.q[1] : p == 1 ? k.q[3] : p == 2 ? k.q[5] : k.q[7];
    const bool hi = qtraits<T>::NS == 2 && p >= 2;
    a = hi ? k.a[1] : k.a[0];
    b = hi ? k.b[1] : k.b[0];
}

/* q4_0: the 8 bytes that hold the quarter (values 0..15 are the low
 * nibbles of bytes 0..15, 16..31 the high ones) */
template <>
__device__ __forceinline__ void unpack_part<DTYPE_Q4_0>(const wq &w, int64_t row, int c, int p, int *q, float &a,
                                                        float &b) {
    const int64_t g = row * w.nbr + c;
    const uint2 u = __ldg((const uint2 *)(w.body + g * 16) + (p & 1));
    const int sh = p >= 2 ? 4 : 0;
    q[0] = (int)__vsub4((u.x >> sh) & 0x0F0F0F0Fu, 0x08080808u);
    q[1] = (int)__vsub4((u.y >> sh) & 0x0F0F0F0Fu, 0x08080808u);
    a = h2f(ld_u16(w.aux + g * 2));
    b = 0.0f;
}

template <>
__device__ __forceinline__ void unpack_part<DTYPE_Q8_0>(const wq &w, int64_t row, int c, int p, int *q, float &a,
                                                        float &b) {
    const int64_t g = row * w.nbr + c;
    const uint2 u = __ldg((const uint2 *)(w.body + g * 32) + p);
    q[0] = (int)u.x;
    q[1] = (int)u.y;
    a = h2f(ld_u16(w.aux + g * 2));
    b = 0.0f;
}

/* Rows [row0, row0 + n_rows) of a quantized weight as f16, packed (n_rows,
 * n_in): a thread per 8 values, so a warp's 16-byte stores are one
 * contiguous 512-byte run. Rows come from the grid's y (rows r, r + Y, ...
 * with Y = gridDim.y <= DQ_GRID_ROWS), two rows' loads in flight per
 * thread; q4_0 and q8_0 load only the 8 bytes of their quarter of the
 * chunk (unpack_part). The first version (a 1-D grid, a division per
 * thread, every chunk unpacked whole by its 4 threads) was 1.8% slower on
 * 7B and 13B pp512 (H200). */
#define DQ_GRID_ROWS 1024

template <int T>
__global__ void dequant8_f16_kernel(wq w, __half *__restrict__ out, int64_t row0, int64_t n_rows, uint32_t nc) {
    const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= 4 * nc) return;
    const int c = (int)(i >> 2), p = (int)(i & 3);
    for (int64_t r0 = blockIdx.y; r0 < n_rows; r0 += 2 * (int64_t)gridDim.y) {
        int q[2][2];
        float a[2], b[2];
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int64_t r = r0 + u * (int64_t)gridDim.y;
            if (r < n_rows) unpack_part<T>(w, row0 + r, c, p, q[u], a[u], b[u]);
        }
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int64_t r = r0 + u * (int64_t)gridDim.y;
            if (r >= n_rows) continue;
            __half2 h[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float v[2];
#pragma unroll
                for (int f = 0; f < 2; f++) {
                    const int j = 2 * e + f; /* byte j % 4 of word j / 4 */
                    const float qv = (float)(int8_t)(q[u][j >> 2] >> 8 * (j & 3));
                    v[f] = qtraits<T>::MIN ? __fadd_rn(__fmul_rn(a[u], qv), b[u]) : __fmul_rn(a[u], qv);
                }
                h[e] = __floats2half2_rn(v[0], v[1]);
            }
            *(uint4 *)(out + (uint64_t)r * nc * 32 + i * 8) = *(const uint4 *)h;
        }
    }
}

/* ---- weights ------------------------------------------------------------------ */

extern "C" bool cu_type_supported(uint32_t type) { return type < DTYPE_COUNT && layout_of((int)type).qk != 0; }

static uint64_t weight_bytes(uint32_t type, int64_t n_in, int64_t n_out) {
    const qlayout l = layout_of((int)type);
    if (l.qk == 0 || n_in <= 0 || n_out <= 0 || n_in % l.qk) return 0;
    uint64_t blocks, bytes;
    if (!mul_u64_ok((uint64_t)(n_in / l.qk), (uint64_t)n_out, &blocks)) return 0;
    if (!mul_u64_ok(blocks, (uint64_t)(l.body + l.aux), &bytes)) return 0;
    return bytes;
}

extern "C" uint64_t cu_weight_bytes(uint32_t type, int64_t n_in, int64_t n_out) {
    return weight_bytes(type, n_in, n_out);
}

/* Repacks and uploads n_blocks GGUF blocks through buf (buf_bytes of host
 * memory): bodies to body_dev, aux parts to aux_dev, waiting for each piece
 * before the buffer is refilled. */
static optiml_status upload_blocks(cu_ctx *cu, uint32_t type, const uint8_t *src, uint64_t n_blocks,
                                   uint8_t *body_dev, uint8_t *aux_dev, uint8_t *buf, uint64_t buf_bytes) {
    const qlayout l = layout_of((int)type);
    const uint64_t per = (uint64_t)(l.body + l.aux), step = buf_bytes / per;
    for (uint64_t g0 = 0; g0 < n_blocks; g0 += step) {
        const uint64_t cnt = n_blocks - g0 < step ? n_blocks - g0 : step;
        if (l.aux == 0) {
            memcpy(buf, src + g0 * l.bs, cnt * l.bs);
        } else {
            for (uint64_t i = 0; i < cnt; i++)
                repack_block(type, src + (g0 + i) * l.bs, buf + i * l.body, buf + cnt * l.body + i * l.aux);
        }
        TRY(cu_upload(cu, body_dev + g0 * l.body, buf, cnt * l.body));
        if (l.aux) TRY(cu_upload(cu, aux_dev + g0 * l.aux, buf + cnt * l.body, cnt * l.aux));
        TRY(cu_sync(cu));
    }
    return OPTIML_OK;
}

extern "C" optiml_status cu_weight_upload_parts(cu_ctx *cu, uint32_t type, int64_t n_in, int n_parts,
                                                const void *const *host, const int64_t *n_out, void *staging,
                                                uint64_t staging_bytes, cu_weight *out) {
    if (!cu || !host || !n_out || !out || n_parts < 1)
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "cu_weight_upload: NULL argument");
    memset(out, 0, sizeof(*out));
    if (!cu_type_supported(type))
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "CUDA: weights of type %s are not supported", dtype_name(type));
    int64_t rows = 0;
    for (int p = 0; p < n_parts; p++) {
        if (!host[p] || n_out[p] <= 0 || weight_bytes(type, n_in, n_out[p]) == 0)
            return optiml_fail(OPTIML_ERR_INVALID_ARG, "CUDA: bad %s weight part %d: %lld x %lld", dtype_name(type), p,
                               (long long)n_in, (long long)n_out[p]);
        rows += n_out[p];
    }
    const uint64_t bytes = weight_bytes(type, n_in, rows);
    if (bytes == 0)
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "CUDA: bad %s weight shape %lld x %lld", dtype_name(type),
                           (long long)n_in, (long long)rows);
    const qlayout l = layout_of((int)type);
    uint8_t *buf = (uint8_t *)staging, *own = NULL;
    if (!buf || staging_bytes < (uint64_t)(l.body + l.aux) * 64) { /* pageable fallback buffer */
        staging_bytes = bytes < (16u << 20) ? bytes : (16u << 20);
        own = buf = (uint8_t *)malloc(staging_bytes);
        if (!own) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    }
    void *dev = NULL;
    optiml_status st = cu_malloc(cu, bytes, &dev);
    const uint64_t total = bytes / (uint64_t)(l.body + l.aux), per_row = (uint64_t)(n_in / l.qk);
    uint8_t *aux_dev = (uint8_t *)dev + total * l.body;
    uint64_t g0 = 0; /* first block of the part */
    for (int p = 0; p < n_parts && st == OPTIML_OK; p++) {
        const uint64_t nb = per_row * (uint64_t)n_out[p];
        st = upload_blocks(cu, type, (const uint8_t *)host[p], nb, (uint8_t *)dev + g0 * l.body, aux_dev + g0 * l.aux,
                           buf, staging_bytes);
        g0 += nb;
    }
    free(own);
    if (st != OPTIML_OK) {
        cu_dfree(dev);
        return st;
    }
    out->type = type;
    out->n_in = n_in;
    out->n_out = rows;
    out->dev = dev;
    out->bytes = bytes;
    return OPTIML_OK;
}

extern "C" optiml_status cu_weight_upload(cu_ctx *cu, uint32_t type, int64_t n_in, int64_t n_out, const void *host,
                                          void *staging, uint64_t staging_bytes, cu_weight *out) {
    if (!cu || !host || !out) return optiml_fail(OPTIML_ERR_INVALID_ARG, "cu_weight_upload: NULL argument");
    return cu_weight_upload_parts(cu, type, n_in, 1, &host, &n_out, staging, staging_bytes, out);
}

extern "C" void cu_weight_free(cu_weight *w) {
    if (!w) return;
    cu_dfree(w->dev);
    memset(w, 0, sizeof(*w));
}

static wq wq_of(const cu_weight *w) {
    const qlayout l = layout_of((int)w->type);
    const int64_t nbr = w->n_in / l.qk;
    const uint8_t *body = (const uint8_t *)w->dev;
    return wq{body, body + (uint64_t)nbr * (uint64_t)w->n_out * (uint64_t)l.body, nbr};
}

/* ---- scratch ------------------------------------------------------------------ */

struct mm_sizes {
    uint64_t xq;       /* bytes: int8 quants + (d, sum) per 32 */
    uint64_t xh;       /* bytes: f16 activations               */
    uint64_t xf;       /* bytes: f32 activations (input step)  */
    uint64_t wh_elems; /* f16 values of a dequantized chunk    */
};

static mm_sizes mm_sizes_of(int64_t n_batch, int64_t n_in_max, int64_t n_out_max, int64_t chunk_elems) {
    const uint64_t nb = (uint64_t)n_batch, ni = align_up_u64((uint64_t)n_in_max, 32), no = (uint64_t)n_out_max;
    mm_sizes s;
    s.xq = align_up_u64(nb * ni, 16) + nb * (ni / 32) * sizeof(float2);
    s.xh = nb * ni * 2;
    s.xf = nb * ni * 4;
    const uint64_t ce = (uint64_t)chunk_elems;
    const uint64_t chunk = ce > ni * 64 ? ce : ni * 64; /* >= 64 rows */
    s.wh_elems = no * ni < chunk ? no * ni : chunk;
    return s;
}

static uint64_t mm_total(const mm_sizes &s) { return s.xq + s.xh + s.xf + s.wh_elems * 2; }

extern "C" uint64_t cu_matmul_scratch_bytes(int64_t n_batch, int64_t n_in_max, int64_t n_out_max) {
    if (n_batch <= 0 || n_in_max <= 0 || n_out_max <= 0) return 0;
    return mm_total(mm_sizes_of(n_batch, n_in_max, n_out_max, CU_GEMM_CHUNK_DEFAULT));
}

static void mm_free(cu_ctx *cu) {
    cu_dfree(cu->mm_xq);
    cu_dfree(cu->mm_xh);
    cu_dfree(cu->mm_xf);
    cu_dfree(cu->mm_wh);
    cu->mm_xq = cu->mm_xh = cu->mm_xf = cu->mm_wh = NULL;
    cu->mm_batch = cu->mm_in_max = cu->mm_out_max = 0;
    cu->mm_wh_elems = cu->mm_bytes = 0;
}

extern "C" optiml_status cu_matmul_reserve(cu_ctx *cu, int64_t n_batch, int64_t n_in_max, int64_t n_out_max,
                                           uint64_t *bytes) {
    if (n_batch <= 0 || n_in_max <= 0 || n_out_max <= 0 || n_in_max > INT_MAX || n_out_max > INT_MAX ||
        n_batch > INT_MAX)
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "cu_matmul_reserve: bad sizes %lld, %lld, %lld",
                           (long long)n_batch, (long long)n_in_max, (long long)n_out_max);
    const mm_sizes want = mm_sizes_of(n_batch, n_in_max, n_out_max, cu->tune.gemm_chunk_elems);
    if (n_batch <= cu->mm_batch && n_in_max <= cu->mm_in_max && n_out_max <= cu->mm_out_max &&
        want.wh_elems <= cu->mm_wh_elems) {
        if (bytes) *bytes = cu->mm_bytes;
        return OPTIML_OK;
    }
    /* grow every dimension to the larger of old and new */
    if (cu->mm_batch > n_batch) n_batch = cu->mm_batch;
    if (cu->mm_in_max > n_in_max) n_in_max = cu->mm_in_max;
    if (cu->mm_out_max > n_out_max) n_out_max = cu->mm_out_max;
    TRY(cu_sync(cu)); /* earlier products may still read the old scratch */
    mm_free(cu);
    const mm_sizes s = mm_sizes_of(n_batch, n_in_max, n_out_max, cu->tune.gemm_chunk_elems);
    optiml_status st = cu_malloc(cu, s.xq, &cu->mm_xq);
    if (st == OPTIML_OK) st = cu_malloc(cu, s.xh, &cu->mm_xh);
    if (st == OPTIML_OK) st = cu_malloc(cu, s.xf, &cu->mm_xf);
    if (st == OPTIML_OK) st = cu_malloc(cu, s.wh_elems * 2, &cu->mm_wh);
    if (st != OPTIML_OK) {
        mm_free(cu);
        return st;
    }
    cu->mm_batch = n_batch;
    cu->mm_in_max = n_in_max;
    cu->mm_out_max = n_out_max;
    cu->mm_wh_elems = s.wh_elems;
    cu->mm_bytes = mm_total(s);
    if (bytes) *bytes = cu->mm_bytes;
    return OPTIML_OK;
}

/* ---- matrix products ------------------------------------------------------------ */

extern "C" int64_t cu_matmul_mmv_max_tokens(void) { return MMV_MAX_TOKENS; }

/* Arguments every product checks: a supported weight, scratch that fits. */
static optiml_status matmul_check(const cu_ctx *cu, const cu_weight *w, const float *x, int64_t n_tok, const float *y) {
    if (!cu || !w || !w->dev || !x || !y) return optiml_fail(OPTIML_ERR_INVALID_ARG, "cu_matmul: NULL argument");
    if (!cu_type_supported(w->type))
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "CUDA: weights of type %s are not supported", dtype_name(w->type));
    if (n_tok < 1 || n_tok > cu->mm_batch || w->n_in > cu->mm_in_max || w->n_out > cu->mm_out_max)
        return optiml_fail(OPTIML_ERR_INVALID_ARG,
                           "cu_matmul: %lld tokens of %lld x %lld exceed the reserved scratch (%lld tokens, %lld x %lld)",
                           (long long)n_tok, (long long)w->n_in, (long long)w->n_out, (long long)cu->mm_batch,
                           (long long)cu->mm_in_max, (long long)cu->mm_out_max);
    return OPTIML_OK;
}

/* R: rows per block. More rows share each x load (the L1 traffic of many
 * tokens); few rows keep enough blocks in flight for one token. */
template <int NT> constexpr int mmv_rows() { return NT <= 2 ? 2 : 4; }

/* Threads of a block kernel for rows of nc chunks in n_blocks blocks. A
 * thread per chunk costs waves (blocks beyond what is resident at once, from
 * the kernel's occupancy: its registers), fewer threads cost chunks per
 * thread in turn; the cost is waves x chunks per thread, ties go to fewer
 * waves, and at least min(nc, 128) threads. This picks what measured best
 * on an H200 (bench/RESULTS.md): 128 threads for 7B rows of 128 and 344
 * chunks, 160 for 13B's 160, 224 for 13B's down rows of 432.
 * cu_tuning.mmv_block_threads > 1 overrides it. occ[w]: blocks per SM with
 * w warps (0: not asked yet), cached per process: it assumes one GPU model
 * per process (multi-GPU with mixed cards would need it per device). */
template <typename K>
static int mmv_threads(const cu_ctx *cu, K kernel, std::atomic<int> *occ, int nc, int64_t n_blocks) {
    const int w_all = (nc + 31) / 32, w_top = w_all < MMV_THREADS_MAX / 32 ? w_all : MMV_THREADS_MAX / 32;
    if (cu->tune.mmv_block_threads > 1) {
        const int cap = cu->tune.mmv_block_threads / 32;
        return 32 * (w_top < cap ? w_top : cap);
    }
    const int64_t n_sm = cu->n_sm > 0 ? cu->n_sm : 132;
    int best = w_top;
    int64_t best_cost = INT64_MAX, best_waves = INT64_MAX;
    for (int wv = w_top < 4 ? w_top : 4; wv <= w_top; wv++) {
        int o = occ[wv].load(std::memory_order_relaxed);
        if (o == 0) {
            if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&o, kernel, 32 * wv, 0) != cudaSuccess || o < 1) o = 1;
            occ[wv].store(o, std::memory_order_relaxed);
        }
        const int64_t slots = n_sm * o, waves = (n_blocks + slots - 1) / slots;
        const int64_t cost = waves * ((nc + 32 * wv - 1) / (32 * wv));
        if (cost < best_cost || (cost == best_cost && waves < best_waves))
            best = wv, best_cost = cost, best_waves = waves;
    }
    return 32 * best;
}

template <int T, int NT, int R>
static cudaError_t launch_mmv_q_rows(cu_ctx *cu, const wq &w, const int8_t *xq, const float2 *xs, float *y,
                                     int64_t ldy, int64_t n_in, int64_t n_out, bool acc) {
    static std::atomic<int> occ[MMV_THREADS_MAX / 32 + 1];
    const int nc = (int)(n_in / 32);
    const unsigned blocks = cu_blocks(n_out, R);
    const int threads = mmv_threads(cu, mmv_q_kernel<T, NT, R>, occ, nc, blocks);
    return cu_launch(cu, mmv_q_kernel<T, NT, R>, dim3(blocks), dim3(threads), 0, w, xq, xs, y, ldy, n_in, n_out, nc,
                     acc);
}

template <int T, int NT>
static cudaError_t launch_mmv_q(cu_ctx *cu, const wq &w, const int8_t *xq, const float2 *xs, float *y, int64_t ldy,
                                int64_t n_in, int64_t n_out, bool acc) {
    if (NT == 1 && cu->tune.mmv_block_rows == 4)
        return launch_mmv_q_rows<T, NT, 4>(cu, w, xq, xs, y, ldy, n_in, n_out, acc);
    if (NT == 1 && cu->tune.mmv_block_rows == 8)
        return launch_mmv_q_rows<T, NT, 8>(cu, w, xq, xs, y, ldy, n_in, n_out, acc);
    return launch_mmv_q_rows<T, NT, mmv_rows<NT>()>(cu, w, xq, xs, y, ldy, n_in, n_out, acc);
}

template <int T, int NT, int V>
static void launch_mmv_plain(cu_ctx *cu, const void *w, const float *x, float *y, int64_t ldy, int64_t n_in,
                             int64_t n_out, bool acc) {
    constexpr int R = mmv_rows<NT>();
    mmv_plain_kernel<T, NT, R, V><<<cu_blocks(n_out, R), MMV_THREADS, 0, cu->stream>>>(w, x, y, ldy, n_in, n_out,
                                                                                        acc);
}

/* The persistent kernel: a thread per chunk, as many blocks as are resident
 * at once (the occupancy API: it depends on the kernel's registers). */
template <int T, int R>
static cudaError_t launch_mmv_persist(cu_ctx *cu, const wq &w, const int8_t *xq, const float2 *xs, float *y,
                                      int64_t n_in, int64_t n_out, bool acc) {
    const int nc = (int)(n_in / 32), threads = 32 * ((nc + 31) / 32);
    int occ = 0;
    const cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, mmv_q_persist_kernel<T, R>, threads, 0);
    if (e != cudaSuccess) return e;
    const int64_t groups = (n_out + R - 1) / R;
    int64_t grid = (int64_t)(cu->n_sm > 0 ? cu->n_sm : 132) * (occ > 0 ? occ : 1);
    if (grid > groups) grid = groups;
    return cu_launch(cu, mmv_q_persist_kernel<T, R>, dim3((unsigned)grid), dim3(threads), 0, w, xq, xs, y, n_out, nc,
                     acc);
}

/* Up to 8 tokens of a quantized weight (x already quantized). */
template <int T>
static optiml_status mmv_q(cu_ctx *cu, const cu_weight *w, const int8_t *xq, const float2 *xs, int64_t nt, float *y,
                           int64_t ldy, bool acc) {
    const wq v = wq_of(w);
    const int64_t n_in = w->n_in, n_out = w->n_out;
    cudaError_t e;
    if (nt == 1 && cu->tune.mmv_kernel == 3 && n_in / 32 <= MMV_THREADS_MAX) {
        const int rows = cu->tune.mmv_block_rows;
        e = rows == 2   ? launch_mmv_persist<T, 2>(cu, v, xq, xs, y, n_in, n_out, acc)
            : rows == 8 ? launch_mmv_persist<T, 8>(cu, v, xq, xs, y, n_in, n_out, acc)
                        : launch_mmv_persist<T, 4>(cu, v, xq, xs, y, n_in, n_out, acc);
        return cu_check(e, "mmv_q_persist_kernel");
    }
    switch (nt) {
    case 1: e = launch_mmv_q<T, 1>(cu, v, xq, xs, y, ldy, n_in, n_out, acc); break;
    case 2: e = launch_mmv_q<T, 2>(cu, v, xq, xs, y, ldy, n_in, n_out, acc); break;
    case 3: e = launch_mmv_q<T, 3>(cu, v, xq, xs, y, ldy, n_in, n_out, acc); break;
    case 4: e = launch_mmv_q<T, 4>(cu, v, xq, xs, y, ldy, n_in, n_out, acc); break;
    case 5: e = launch_mmv_q<T, 5>(cu, v, xq, xs, y, ldy, n_in, n_out, acc); break;
    case 6: e = launch_mmv_q<T, 6>(cu, v, xq, xs, y, ldy, n_in, n_out, acc); break;
    case 7: e = launch_mmv_q<T, 7>(cu, v, xq, xs, y, ldy, n_in, n_out, acc); break;
    default: e = launch_mmv_q<T, 8>(cu, v, xq, xs, y, ldy, n_in, n_out, acc); break;
    }
    return cu_check(e, "mmv_q_kernel");
}

template <int T, int V>
static optiml_status mmv_plain(cu_ctx *cu, const cu_weight *w, const float *x, int64_t nt, float *y, int64_t ldy,
                               bool acc) {
    const int64_t n_in = w->n_in, n_out = w->n_out;
    switch (nt) {
    case 1: launch_mmv_plain<T, 1, V>(cu, w->dev, x, y, ldy, n_in, n_out, acc); break;
    case 2: launch_mmv_plain<T, 2, V>(cu, w->dev, x, y, ldy, n_in, n_out, acc); break;
    case 3: launch_mmv_plain<T, 3, V>(cu, w->dev, x, y, ldy, n_in, n_out, acc); break;
    case 4: launch_mmv_plain<T, 4, V>(cu, w->dev, x, y, ldy, n_in, n_out, acc); break;
    case 5: launch_mmv_plain<T, 5, V>(cu, w->dev, x, y, ldy, n_in, n_out, acc); break;
    case 6: launch_mmv_plain<T, 6, V>(cu, w->dev, x, y, ldy, n_in, n_out, acc); break;
    case 7: launch_mmv_plain<T, 7, V>(cu, w->dev, x, y, ldy, n_in, n_out, acc); break;
    default: launch_mmv_plain<T, 8, V>(cu, w->dev, x, y, ldy, n_in, n_out, acc); break;
    }
    CU_LAUNCHED("mmv_plain_kernel");
    return OPTIML_OK;
}

template <int V>
static optiml_status mmv_plain_type(cu_ctx *cu, const cu_weight *w, const float *x, int64_t nt, float *y, int64_t ldy,
                                    bool acc) {
    switch (w->type) {
    case DTYPE_F32: return mmv_plain<DTYPE_F32, V>(cu, w, x, nt, y, ldy, acc);
    case DTYPE_F16: return mmv_plain<DTYPE_F16, V>(cu, w, x, nt, y, ldy, acc);
    default: return mmv_plain<DTYPE_BF16, V>(cu, w, x, nt, y, ldy, acc);
    }
}

#define CU_QUANT_CASES(F, ...)                                                                                        \
    case DTYPE_Q4_0: return F<DTYPE_Q4_0>(__VA_ARGS__);                                                              \
    case DTYPE_Q4_1: return F<DTYPE_Q4_1>(__VA_ARGS__);                                                              \
    case DTYPE_Q5_0: return F<DTYPE_Q5_0>(__VA_ARGS__);                                                              \
    case DTYPE_Q5_1: return F<DTYPE_Q5_1>(__VA_ARGS__);                                                              \
    case DTYPE_Q8_0: return F<DTYPE_Q8_0>(__VA_ARGS__);                                                              \
    case DTYPE_Q2_K: return F<DTYPE_Q2_K>(__VA_ARGS__);                                                              \
    case DTYPE_Q3_K: return F<DTYPE_Q3_K>(__VA_ARGS__);                                                              \
    case DTYPE_Q4_K: return F<DTYPE_Q4_K>(__VA_ARGS__);                                                              \
    case DTYPE_Q5_K: return F<DTYPE_Q5_K>(__VA_ARGS__);                                                              \
    case DTYPE_Q6_K: return F<DTYPE_Q6_K>(__VA_ARGS__);

template <int T>
static optiml_status mmw_type(cu_ctx *cu, const cu_weight *w, const int8_t *xq, const float2 *xs, int64_t nt, float *y,
                              int64_t ldy, bool acc);

static optiml_status mmv_q_type(cu_ctx *cu, const cu_weight *w, const int8_t *xq, const float2 *xs, int64_t nt,
                                float *y, int64_t ldy, bool acc) {
    if (cu->tune.mmv_kernel == 2) {
        switch (w->type) {
            CU_QUANT_CASES(mmw_type, cu, w, xq, xs, nt, y, ldy, acc)
        default: break;
        }
    }
    switch (w->type) {
        CU_QUANT_CASES(mmv_q, cu, w, xq, xs, nt, y, ldy, acc)
    default: return optiml_fail(OPTIML_ERR_UNSUPPORTED, "CUDA: no mmv kernel for %s", dtype_name(w->type));
    }
}

/* The matrix-vector path on contiguous f32 rows x (n_tok, n_in). */
static optiml_status mmv_run(cu_ctx *cu, const cu_weight *w, const float *x, int64_t n_tok, float *y, int64_t ldy,
                             bool accumulate) {
    const int64_t n_in = w->n_in;
    if (type_is_plain(w->type)) {
        const bool vec = n_in % 8 == 0 && ((uintptr_t)x & 15) == 0;
        for (int64_t t0 = 0; t0 < n_tok; t0 += MMV_MAX_TOKENS) {
            const int64_t nt = n_tok - t0 < MMV_MAX_TOKENS ? n_tok - t0 : MMV_MAX_TOKENS;
            if (vec) TRY(mmv_plain_type<8>(cu, w, x + t0 * n_in, nt, y + t0 * ldy, ldy, accumulate));
            else TRY(mmv_plain_type<1>(cu, w, x + t0 * n_in, nt, y + t0 * ldy, ldy, accumulate));
        }
        return OPTIML_OK;
    }
    /* quantize all tokens' activations once, then 8 tokens per pass */
    int8_t *xq = (int8_t *)cu->mm_xq;
    float2 *xs = (float2 *)((uint8_t *)cu->mm_xq + align_up_u64((uint64_t)(n_tok * n_in), 16));
    const int64_t n_blocks = n_tok * n_in / 32;
    quantize_x_kernel<<<cu_blocks(n_blocks * 32, 256), 256, 0, cu->stream>>>(x, xq, xs, n_blocks);
    CU_LAUNCHED("quantize_x_kernel");
    for (int64_t t0 = 0; t0 < n_tok; t0 += MMV_MAX_TOKENS) {
        const int64_t nt = n_tok - t0 < MMV_MAX_TOKENS ? n_tok - t0 : MMV_MAX_TOKENS;
        TRY(mmv_q_type(cu, w, xq + t0 * n_in, xs + t0 * (n_in / 32), nt, y + t0 * ldy, ldy, accumulate));
    }
    return OPTIML_OK;
}

extern "C" optiml_status cu_matmul_mmv(cu_ctx *cu, const cu_weight *w, const float *x, int64_t n_tok, float *y,
                                       bool accumulate) {
    TRY(matmul_check(cu, w, x, n_tok, y));
    return mmv_run(cu, w, x, n_tok, y, w->n_out, accumulate);
}

/* Rows [row0, row0 + n_rows) of w as f16 into the chunk buffer. */
template <int T>
static optiml_status dequant_q(cu_ctx *cu, const cu_weight *w, int64_t row0, int64_t n_rows, __half *out) {
    const uint32_t nc = (uint32_t)(w->n_in / 32);
    const dim3 grid(cu_blocks(4 * (int64_t)nc, 256), (unsigned)(n_rows < DQ_GRID_ROWS ? n_rows : DQ_GRID_ROWS));
    dequant8_f16_kernel<T><<<grid, 256, 0, cu->stream>>>(wq_of(w), out, row0, n_rows, nc);
    CU_LAUNCHED("dequant8_f16_kernel");
    return OPTIML_OK;
}

static optiml_status dequant_rows_f16(cu_ctx *cu, const cu_weight *w, int64_t row0, int64_t n_rows, __half *out) {
    if (n_rows * (w->n_in / 32) * 4 >= INT_MAX)
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "CUDA: dequantized chunk of %lld rows too large", (long long)n_rows);
    if (w->type == DTYPE_BF16) {
        const int64_t n = n_rows * w->n_in;
        bf16_to_f16_kernel<<<cu_blocks(n, 256), 256, 0, cu->stream>>>((const uint16_t *)w->dev + row0 * w->n_in,
                                                                         out, n);
        CU_LAUNCHED("bf16_to_f16_kernel");
        return OPTIML_OK;
    }
    switch (w->type) {
        CU_QUANT_CASES(dequant_q, cu, w, row0, n_rows, out)
    default: return optiml_fail(OPTIML_ERR_UNSUPPORTED, "CUDA: no f16 dequantizer for %s", dtype_name(w->type));
    }
}

/* C (m, n) col-major = op(A) (m x k) * B (k x n), as the row-major
 * y (n, m) = x (n, k) W^T (m rows of k values). */
static optiml_status gemm_ex(cu_ctx *cu, const void *wdata, cudaDataType wt, const void *x, cudaDataType xt, float *y,
                             int64_t m, int64_t n, int64_t k, int64_t ldc, float beta) {
    const float one = 1.0f;
    return cublas_check(cublasGemmEx(cu->cublas, CUBLAS_OP_T, CUBLAS_OP_N, (int)m, (int)n, (int)k, &one, wdata, wt,
                                     (int)k, x, xt, (int)k, &beta, y, CUDA_R_32F, (int)ldc, CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT),
                        "cublasGemmEx");
}

/* The GEMM path: x contiguous f32 (f32 weights: used as it is; others:
 * converted to f16 here unless xh already holds it). */
static optiml_status gemm_run(cu_ctx *cu, const cu_weight *w, const float *x, const __half *xh_ready, int64_t n_tok,
                              float *y, int64_t ldy, bool accumulate) {
    const int64_t n_in = w->n_in, n_out = w->n_out;
    const float beta = accumulate ? 1.0f : 0.0f;
    if (w->type == DTYPE_F32) /* exact f32 GEMM: no f16 rounding of either side */
        return gemm_ex(cu, w->dev, CUDA_R_32F, x, CUDA_R_32F, y, n_out, n_tok, n_in, ldy, beta);
    const __half *xh = xh_ready;
    if (!xh) {
        __half *h = (__half *)cu->mm_xh;
        f32_to_f16_kernel<<<cu_blocks(n_tok * n_in, 256), 256, 0, cu->stream>>>(x, h, n_tok * n_in);
        CU_LAUNCHED("f32_to_f16_kernel");
        xh = h;
    }
    if (w->type == DTYPE_F16) return gemm_ex(cu, w->dev, CUDA_R_16F, xh, CUDA_R_16F, y, n_out, n_tok, n_in, ldy, beta);
    /* chunks of rows dequantized to f16, each multiplied at once */
    uint64_t elems = cu->mm_wh_elems; /* the reserve, or less where the tuning asks (benchmarks) */
    const uint64_t want = (uint64_t)cu->tune.gemm_chunk_elems > 64 * (uint64_t)n_in ? (uint64_t)cu->tune.gemm_chunk_elems
                                                                                     : 64 * (uint64_t)n_in;
    if (want < elems) elems = want;
    int64_t rows = (int64_t)(elems / (uint64_t)n_in);
    if (rows > 64) rows -= rows % 64;
    __half *wh = (__half *)cu->mm_wh;
    for (int64_t r0 = 0; r0 < n_out; r0 += rows) {
        const int64_t nr = n_out - r0 < rows ? n_out - r0 : rows;
        TRY(dequant_rows_f16(cu, w, r0, nr, wh));
        TRY(gemm_ex(cu, wh, CUDA_R_16F, xh, CUDA_R_16F, y + r0, nr, n_tok, n_in, ldy, beta));
    }
    return OPTIML_OK;
}

extern "C" optiml_status cu_matmul_gemm(cu_ctx *cu, const cu_weight *w, const float *x, int64_t n_tok, float *y,
                                        bool accumulate) {
    TRY(matmul_check(cu, w, x, n_tok, y));
    return gemm_run(cu, w, x, NULL, n_tok, y, w->n_out, accumulate);
}

extern "C" optiml_status cu_matmul(cu_ctx *cu, const cu_weight *w, const float *x, int64_t n_tok, float *y,
                                   bool accumulate) {
    if (n_tok <= MMV_MAX_TOKENS) return cu_matmul_mmv(cu, w, x, n_tok, y, accumulate);
    return cu_matmul_gemm(cu, w, x, n_tok, y, accumulate);
}

/* ---- fused products (cu_matmul_ex) ---------------------------------------------- */

/* The warp-per-rows kernel: PRO true reads x and runs the input step in
 * every block (the fused kernel, grid capped at mmv_blocks_per_sm per SM);
 * PRO false reads x pre-quantized at xq/xs (every row group its own warp:
 * the grid is all row groups, up to 8 resident blocks per SM). */
template <int T, int NT, int R, int U, bool PRO>
static optiml_status mmf_go(cu_ctx *cu, const cu_weight *w, const float *x, const mm_in_dev &in, const int8_t *xq,
                            const float2 *xs, float *y, int64_t ldy, bool acc, size_t smem) {
    if (PRO && smem > 48 * 1024) /* a host-side attribute: fine while a stream is captured */
        CU_TRY(cudaFuncSetAttribute(mmf_q_kernel<T, NT, R, U, PRO>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)smem));
    const int64_t groups = (w->n_out + MMF_WARPS * R - 1) / (MMF_WARPS * R);
    const int64_t cap = PRO ? (int64_t)(cu->n_sm > 0 ? cu->n_sm : 132) * cu->tune.mmv_blocks_per_sm : (1ll << 30);
    const unsigned grid = (unsigned)(groups < cap ? groups : cap);
    TRY(cu_check(cu_launch(cu, mmf_q_kernel<T, NT, R, U, PRO>, dim3(grid), dim3(MMF_THREADS), PRO ? smem : 0,
                           wq_of(w), x, in, xq, xs, y, ldy, (int)w->n_in, w->n_out, acc),
                 "mmf_q_kernel"));
    return OPTIML_OK;
}

template <int T, bool PRO>
static optiml_status mmf_nt(cu_ctx *cu, const cu_weight *w, const float *x, const mm_in_dev &in, const int8_t *xq,
                            const float2 *xs, int64_t nt, float *y, int64_t ldy, bool acc, size_t smem) {
    switch (nt) {
    case 1:
        if (cu->tune.mmv_variant == 2) return mmf_go<T, 1, 1, 8, PRO>(cu, w, x, in, xq, xs, y, ldy, acc, smem);
        if (cu->tune.mmv_variant == 3) return mmf_go<T, 1, 4, 2, PRO>(cu, w, x, in, xq, xs, y, ldy, acc, smem);
        return mmf_go<T, 1, 2, 4, PRO>(cu, w, x, in, xq, xs, y, ldy, acc, smem);
    case 2: return mmf_go<T, 2, 2, 2, PRO>(cu, w, x, in, xq, xs, y, ldy, acc, smem);
    case 3: return mmf_go<T, 3, 2, 2, PRO>(cu, w, x, in, xq, xs, y, ldy, acc, smem);
    case 4: return mmf_go<T, 4, 2, 2, PRO>(cu, w, x, in, xq, xs, y, ldy, acc, smem);
    case 5: return mmf_go<T, 5, 2, 2, PRO>(cu, w, x, in, xq, xs, y, ldy, acc, smem);
    case 6: return mmf_go<T, 6, 2, 2, PRO>(cu, w, x, in, xq, xs, y, ldy, acc, smem);
    case 7: return mmf_go<T, 7, 2, 2, PRO>(cu, w, x, in, xq, xs, y, ldy, acc, smem);
    default: return mmf_go<T, 8, 2, 2, PRO>(cu, w, x, in, xq, xs, y, ldy, acc, smem);
    }
}

template <int T>
static optiml_status mmf_type(cu_ctx *cu, const cu_weight *w, const float *x, const mm_in_dev &in, int64_t nt,
                              float *y, int64_t ldy, bool acc, size_t smem) {
    return mmf_nt<T, true>(cu, w, x, in, NULL, NULL, nt, y, ldy, acc, smem);
}

/* Up to 8 tokens over pre-quantized x, the warp-per-rows kernel. */
template <int T>
static optiml_status mmw_type(cu_ctx *cu, const cu_weight *w, const int8_t *xq, const float2 *xs, int64_t nt, float *y,
                              int64_t ldy, bool acc) {
    const mm_in_dev none = {CU_IN_PLAIN, 0, 0.0f, 0.0f, w->n_in, NULL, NULL};
    return mmf_nt<T, false>(cu, w, NULL, none, xq, xs, nt, y, ldy, acc, 0);
}

/* The input step and 8-bit quantization of n_tok rows into the scratch
 * (cu->mm_xq) with one launch; false when the shape does not suit the
 * kernel (then the caller takes the f32 input step). */
static optiml_status mm_inq_run(cu_ctx *cu, const float *x, const mm_in_dev &in, int64_t n_tok, int64_t n_in,
                                int8_t **xq_out, float2 **xs_out) {
    int8_t *xq;
    float2 *xs;
    cu_mm_q8_ptrs(cu, n_tok, n_in, &xq, &xs);
    int g = (int)((n_in + 8 * INQ_THREADS - 1) / (8 * INQ_THREADS));
    const dim3 grid((unsigned)n_tok), block(INQ_THREADS);
    const int ni = (int)n_in;
    cudaError_t e;
    if (cu->tune.inq_kernel != 1) g = 0; /* the multi-block kernel (default) */
    switch (g) {
    case 0:
        e = cu_launch(cu, mm_inq2_kernel, dim3((unsigned)((n_in + 8 * INQ2_THREADS - 1) / (8 * INQ2_THREADS)),
                                               (unsigned)n_tok),
                      dim3(INQ2_THREADS), 0, x, in, ni, xq, xs);
        break;
    case 1: e = cu_launch(cu, mm_inq_kernel<1>, grid, block, 0, x, in, ni, xq, xs); break;
    case 2: e = cu_launch(cu, mm_inq_kernel<2>, grid, block, 0, x, in, ni, xq, xs); break;
    case 3: e = cu_launch(cu, mm_inq_kernel<3>, grid, block, 0, x, in, ni, xq, xs); break;
    case 4: e = cu_launch(cu, mm_inq_kernel<4>, grid, block, 0, x, in, ni, xq, xs); break;
    case 5: e = cu_launch(cu, mm_inq_kernel<5>, grid, block, 0, x, in, ni, xq, xs); break;
    case 6: e = cu_launch(cu, mm_inq_kernel<6>, grid, block, 0, x, in, ni, xq, xs); break;
    default: return optiml_fail(OPTIML_ERR_INVALID_ARG, "mm_inq_run: n_in %lld too long", (long long)n_in);
    }
    TRY(cu_check(e, "mm_inq_kernel"));
    *xq_out = xq;
    *xs_out = xs;
    return OPTIML_OK;
}

/* The input step into scratch (f32 or f16 rows of n_in). */
static optiml_status mm_in_run(cu_ctx *cu, const float *x, const mm_in_dev &in, int64_t n_tok, int64_t n_in,
                               bool f16, bool aligned) {
    if (aligned && n_in % 8 == 0 && n_in <= INT_MAX && cu->tune.in_kernel != 1) {
        if (f16) mm_in8_kernel<__half><<<(unsigned)n_tok, 256, 0, cu->stream>>>(x, in, (int)n_in, (__half *)cu->mm_xh);
        else mm_in8_kernel<float><<<(unsigned)n_tok, 256, 0, cu->stream>>>(x, in, (int)n_in, (float *)cu->mm_xf);
        CU_LAUNCHED("mm_in8_kernel");
        return OPTIML_OK;
    }
    if (f16) mm_in_kernel<__half><<<(unsigned)n_tok, 256, 0, cu->stream>>>(x, in, n_in, (__half *)cu->mm_xh);
    else mm_in_kernel<float><<<(unsigned)n_tok, 256, 0, cu->stream>>>(x, in, n_in, (float *)cu->mm_xf);
    CU_LAUNCHED("mm_in_kernel");
    return OPTIML_OK;
}

extern "C" optiml_status cu_matmul_prequant(cu_ctx *cu, const cu_weight *w, int64_t n_tok, float *y, int64_t ldy,
                                            bool accumulate) {
    TRY(matmul_check(cu, w, (const float *)cu->mm_xq, n_tok, y));
    if (type_is_plain(w->type) || n_tok > MMV_MAX_TOKENS || w->n_in % 32 != 0)
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "cu_matmul_prequant: %s weight, %lld tokens: not supported",
                           dtype_name(w->type), (long long)n_tok);
    if (ldy == 0) ldy = w->n_out;
    if (ldy < w->n_out) return optiml_fail(OPTIML_ERR_INVALID_ARG, "cu_matmul_prequant: ldy %lld", (long long)ldy);
    int8_t *xq;
    float2 *xs;
    cu_mm_q8_ptrs(cu, n_tok, w->n_in, &xq, &xs);
    return mmv_q_type(cu, w, xq, xs, n_tok, y, ldy, accumulate);
}

extern "C" optiml_status cu_matmul_ex(cu_ctx *cu, const cu_weight *w, const float *x, const struct cu_mm_in *in_host,
                                      int64_t n_tok, float *y, int64_t ldy, bool accumulate) {
    TRY(matmul_check(cu, w, x, n_tok, y));
    const int64_t n_in = w->n_in;
    if (ldy == 0) ldy = w->n_out;
    const cu_mm_in plain = {CU_IN_PLAIN, 0, NULL, 0.0f, NULL, 0, 0.0f};
    const cu_mm_in &h = in_host ? *in_host : plain;
    mm_in_dev in = {h.kind, h.act, h.thr, h.eps, h.ld ? h.ld : n_in, h.norm, h.up};
    if (ldy < w->n_out || in.ld < n_in || in.kind < CU_IN_PLAIN || in.kind > CU_IN_ACT_MUL ||
        (in.kind == CU_IN_RMSNORM && !in.norm) || (in.kind == CU_IN_ACT_MUL && (!in.up || in.act < 0 || in.act > 5)))
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "cu_matmul_ex: bad input step (kind %d, ld %lld) or ldy %lld",
                           in.kind, (long long)in.ld, (long long)ldy);
    const bool gemm = n_tok > MMV_MAX_TOKENS;
    /* the fused kernel: quantized, few tokens, 16-byte aligned rows, shared memory enough */
    const size_t smem = (size_t)n_tok * (size_t)n_in + (size_t)n_tok * (size_t)(n_in / 32) * sizeof(float2);
    const bool aligned = ((uintptr_t)x & 15) == 0 && in.ld % 4 == 0 && (!in.up || ((uintptr_t)in.up & 15) == 0) &&
                         (!in.norm || ((uintptr_t)in.norm & 15) == 0);
    if (!gemm && !type_is_plain(w->type) && cu->tune.mmv_fused == 1 && aligned &&
        smem + 1024 <= (size_t)cu->smem_optin) { /* + the kernel's static shared memory */
        switch (w->type) {
            CU_QUANT_CASES(mmf_type, cu, w, x, in, n_tok, y, ldy, accumulate, smem)
        default: break;
        }
    }
    /* the input step and quantization in one launch, then the product over the quantized rows */
    if (!gemm && !type_is_plain(w->type) && cu->tune.mmv_fused == 3 && aligned && n_in % 32 == 0 &&
        n_in <= 6 * 8 * INQ_THREADS) {
        int8_t *xq = NULL;
        float2 *xs = NULL;
        TRY(mm_inq_run(cu, x, in, n_tok, n_in, &xq, &xs));
        for (int64_t t0 = 0; t0 < n_tok; t0 += MMV_MAX_TOKENS) {
            const int64_t nt = n_tok - t0 < MMV_MAX_TOKENS ? n_tok - t0 : MMV_MAX_TOKENS;
            TRY(mmv_q_type(cu, w, xq + t0 * n_in, xs + t0 * (n_in / 32), nt, y + t0 * ldy, ldy, accumulate));
        }
        return OPTIML_OK;
    }
    /* otherwise: the input step once (skipped for plain contiguous rows), then the unfused product */
    const bool direct = in.kind == CU_IN_PLAIN && in.ld == n_in;
    if (gemm) {
        if (direct) return gemm_run(cu, w, x, NULL, n_tok, y, ldy, accumulate);
        const bool f16 = w->type != DTYPE_F32;
        TRY(mm_in_run(cu, x, in, n_tok, n_in, f16, aligned));
        return gemm_run(cu, w, (const float *)cu->mm_xf, f16 ? (const __half *)cu->mm_xh : NULL, n_tok, y, ldy,
                        accumulate);
    }
    if (!direct) {
        TRY(mm_in_run(cu, x, in, n_tok, n_in, false, aligned));
        x = (const float *)cu->mm_xf;
    }
    return mmv_run(cu, w, x, n_tok, y, ldy, accumulate);
}

extern "C" optiml_status cu_get_rows(cu_ctx *cu, const cu_weight *emb, const int32_t *tokens, int32_t n, float *out) {
    if (!cu || !emb || !emb->dev || !tokens || !out || n < 0)
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "cu_get_rows: bad argument");
    if (!cu_type_supported(emb->type))
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "CUDA: embeddings of type %s are not supported",
                           dtype_name(emb->type));
    if (n == 0) return OPTIML_OK;
    const int64_t n_in = emb->n_in, n_rows = emb->n_out;
    cudaStream_t s = cu->stream;
    if (type_is_plain(emb->type)) {
        const unsigned grid = cu_blocks(n * n_in, 256);
        switch (emb->type) {
        case DTYPE_F32: get_rows_plain_kernel<DTYPE_F32><<<grid, 256, 0, s>>>(emb->dev, tokens, out, n, n_rows, n_in); break;
        case DTYPE_F16: get_rows_plain_kernel<DTYPE_F16><<<grid, 256, 0, s>>>(emb->dev, tokens, out, n, n_rows, n_in); break;
        default: get_rows_plain_kernel<DTYPE_BF16><<<grid, 256, 0, s>>>(emb->dev, tokens, out, n, n_rows, n_in); break;
        }
        CU_LAUNCHED("get_rows_plain_kernel");
        return OPTIML_OK;
    }
    const wq v = wq_of(emb);
    const int nc = (int)(n_in / 32);
    const unsigned grid = cu_blocks(n * nc, 256);
    switch (emb->type) {
    case DTYPE_Q4_0: get_rows_q_kernel<DTYPE_Q4_0><<<grid, 256, 0, s>>>(v, tokens, out, n, n_rows, nc); break;
    case DTYPE_Q4_1: get_rows_q_kernel<DTYPE_Q4_1><<<grid, 256, 0, s>>>(v, tokens, out, n, n_rows, nc); break;
    case DTYPE_Q5_0: get_rows_q_kernel<DTYPE_Q5_0><<<grid, 256, 0, s>>>(v, tokens, out, n, n_rows, nc); break;
    case DTYPE_Q5_1: get_rows_q_kernel<DTYPE_Q5_1><<<grid, 256, 0, s>>>(v, tokens, out, n, n_rows, nc); break;
    case DTYPE_Q8_0: get_rows_q_kernel<DTYPE_Q8_0><<<grid, 256, 0, s>>>(v, tokens, out, n, n_rows, nc); break;
    case DTYPE_Q2_K: get_rows_q_kernel<DTYPE_Q2_K><<<grid, 256, 0, s>>>(v, tokens, out, n, n_rows, nc); break;
    case DTYPE_Q3_K: get_rows_q_kernel<DTYPE_Q3_K><<<grid, 256, 0, s>>>(v, tokens, out, n, n_rows, nc); break;
    case DTYPE_Q4_K: get_rows_q_kernel<DTYPE_Q4_K><<<grid, 256, 0, s>>>(v, tokens, out, n, n_rows, nc); break;
    case DTYPE_Q5_K: get_rows_q_kernel<DTYPE_Q5_K><<<grid, 256, 0, s>>>(v, tokens, out, n, n_rows, nc); break;
    case DTYPE_Q6_K: get_rows_q_kernel<DTYPE_Q6_K><<<grid, 256, 0, s>>>(v, tokens, out, n, n_rows, nc); break;
    default: return optiml_fail(OPTIML_ERR_UNSUPPORTED, "CUDA: no row kernel for %s", dtype_name(emb->type));
    }
    CU_LAUNCHED("get_rows_q_kernel");
    return OPTIML_OK;
}

extern "C" optiml_status cu_gemm_f16_bench(cu_ctx *cu, const void *a, const void *b, float *c, int64_t m, int64_t n,
                                           int64_t k) {
    if (m <= 0 || n <= 0 || k <= 0 || m > INT_MAX || n > INT_MAX || k > INT_MAX)
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "cu_gemm_f16_bench: bad sizes");
    /* B plays the weight (n rows of k), A the activations (m rows of k) */
    return gemm_ex(cu, b, CUDA_R_16F, a, CUDA_R_16F, c, n, m, k, n, 0.0f);
}
