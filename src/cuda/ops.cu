/*
 * ops.cu - the non-matmul ops of the Llama forward pass behind cuda.h:
 * RMS norm, the FFN activation, RoPE + KV-cache store, and attention.
 *
 * Every op matches its CPU twin (src/cpu/ops.c, src/context.c) in f32; the
 * values that change between decode steps (positions, cells, *n_used) are
 * read on the device from struct cu_batch, and grid sizes depend only on
 * host arguments, so the launches can be captured in a CUDA graph.
 *
 * Attention has two kernels:
 *   - decode (n_tok <= ATT_DEC_MAX_TOK): flash-decoding. The cells are split
 *     into chunks; one block per (chunk, head, token) writes a partial
 *     (max score, sum of weights, weighted sum of V) to scratch, and a
 *     second kernel combines the partials of the chunks below *n_used.
 *   - prompt: a block per (64 queries, head) walks tiles of 64 cells with an
 *     online softmax; tiles no query of the block sees (the causal future,
 *     other sequences) are skipped. Three versions: f32 on CUDA cores, f16 on
 *     tensor cores through WMMA (S, P, O in shared memory), and the default,
 *     f16 through mma.sync with S, P and O in registers.
 */
#include "common.cuh"

#include <math.h>
#include <mma.h>

/* ---- RMS norm ------------------------------------------------------------- */

#define RMS_THREADS 256

/* One block per row. The sum of squares is accumulated in double and the
 * scale computed in double, as ops_rmsnorm does. */
__global__ void __launch_bounds__(RMS_THREADS)
    rmsnorm_kernel(float *__restrict__ out, const float *__restrict__ x, const float *__restrict__ w, int64_t n,
                   const int32_t *__restrict__ rows, float eps) {
    __shared__ double red[RMS_THREADS / 32];
    const int64_t row = blockIdx.x;
    const float *xr = x + (rows ? (int64_t)rows[row] : row) * n;
    double ss = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ss += (double)xr[i] * xr[i];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = ss;
    __syncthreads();
    ss = 0.0;
    for (int i = 0; i < RMS_THREADS / 32; i++) ss += red[i];
    const float scale = (float)(1.0 / sqrt(ss / (double)n + eps));
    float *orow = out + row * n;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) orow[i] = xr[i] * scale * w[i];
}

extern "C" optiml_status cu_rmsnorm(cu_ctx *cu, float *out, const float *x, const float *w, int64_t n, int64_t n_rows,
                                    const int32_t *rows, float eps) {
    if (n <= 0 || n_rows < 0 || n_rows > INT32_MAX)
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "cu_rmsnorm: bad shape n %lld, n_rows %lld", (long long)n,
                           (long long)n_rows);
    if (n_rows == 0) return OPTIML_OK;
    rmsnorm_kernel<<<(unsigned)n_rows, RMS_THREADS, 0, cu->stream>>>(out, x, w, n, rows, eps);
    CU_LAUNCHED("rmsnorm");
    return OPTIML_OK;
}

/* ---- FFN activation --------------------------------------------------------- */

/* The CPU's expressions (ops_act_mul), term for term: act(g) * u; 4 is
 * relu(g) * relu(u) and 5 relu(u) alone (no gate matrix: g is not read). */
template <int ACT> __device__ __forceinline__ float act_mul_one(const float *gate, float u) {
    if (ACT == 5) return u > 0.0f ? u : 0.0f;
    const float g = *gate;
    if (ACT == 0) return g / (1.0f + expf(-g)) * u;
    if (ACT == 1) return (g > 0.0f ? g : 0.0f) * u;
    if (ACT == 2) {
        const float r = g > 0.0f ? g : 0.0f;
        return r * r * u;
    }
    if (ACT == 4) return (g > 0.0f ? g : 0.0f) * (u > 0.0f ? u : 0.0f);
    const float t = tanhf(0.7978845608f * (g + 0.044715f * g * g * g));
    return 0.5f * g * (1.0f + t) * u;
}

template <int ACT> __global__ void act_mul_kernel(float *__restrict__ gate, const float *__restrict__ up, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        gate[i] = act_mul_one<ACT>(gate + i, up[i]);
}

extern "C" optiml_status cu_act_mul(cu_ctx *cu, float *gate, const float *up, int64_t n, int act) {
    if (n < 0) return optiml_fail(OPTIML_ERR_INVALID_ARG, "cu_act_mul: n %lld", (long long)n);
    if (n == 0) return OPTIML_OK;
    const unsigned blocks = (unsigned)(n / 256 + 1 < 8192 ? n / 256 + 1 : 8192); /* grid-stride beyond */
    switch (act) {
    case 0:
        act_mul_kernel<0><<<blocks, 256, 0, cu->stream>>>(gate, up, n);
        break;
    case 1:
        act_mul_kernel<1><<<blocks, 256, 0, cu->stream>>>(gate, up, n);
        break;
    case 2:
        act_mul_kernel<2><<<blocks, 256, 0, cu->stream>>>(gate, up, n);
        break;
    case 3:
        act_mul_kernel<3><<<blocks, 256, 0, cu->stream>>>(gate, up, n);
        break;
    case 4:
        act_mul_kernel<4><<<blocks, 256, 0, cu->stream>>>(gate, up, n);
        break;
    case 5:
        act_mul_kernel<5><<<blocks, 256, 0, cu->stream>>>(gate, up, n);
        break;
    default:
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "cu_act_mul: unknown activation %d", act);
    }
    CU_LAUNCHED("act_mul");
    return OPTIML_OK;
}

/* ---- RoPE and KV-cache store -------------------------------------------------- */

#define ROPE_MAX_PAIRS 128 /* head_dim <= 256 */

/* Rotates the pair at x (a, b) by (c, s) without fused multiply-adds, so the
 * result equals ops_rope's a*c - b*s, a*s + b*c given the same cos and sin. */
__device__ __forceinline__ void rope_pair(float *x, float c, float s, float *copy) {
    const float a = x[0], b = x[1];
    const float r0 = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    const float r1 = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
    x[0] = r0;
    x[1] = r1;
    if (copy) {
        copy[0] = r0;
        copy[1] = r1;
    }
}

#define ROPE_WARPS 4

struct rope_args {
    const float *q_in, *k_in, *v_in;
    float *q_out, *k_out; /* k_out: NULL or k_in (in place) */
    float *k_cache, *v_cache;
    int64_t ldq_in, ldq_out, ldk, ldv;
    int32_t n_head, n_head_kv, hd, n_rot;
    const float *inv_freq;
    const int32_t *pos, *cell;
    const float *bias; /* NULL, or (n_q + 2 n_kv) added to q|k|v first */
    int32_t neox;      /* rotate (i, i + n_rot/2), not (2i, 2i+1)       */
};

/* One warp per head row of one batch entry (rows: the q heads, then the k
 * heads, then the v heads), so a decode step runs n_head + 2 n_head_kv
 * warps side by side. Lane j does pairs j, j + 32, ...: the cos/sin of its
 * pair as rope_prepare (float angle pos * inv_freq[i], cosf/sinf), the
 * rotation, and for k and v the copy into the entry's cell. */
__global__ void __launch_bounds__(ROPE_WARPS * 32) rope_store_kernel(rope_args a) {
    pdl_begin();
    const int32_t t = blockIdx.y, lane = threadIdx.x % 32;
    const int32_t hrow = blockIdx.x * ROPE_WARPS + threadIdx.x / 32;
    if (hrow >= a.n_head + 2 * a.n_head_kv) return;
    const int64_t n_kv = (int64_t)a.n_head_kv * a.hd, cell = a.cell[t];
    const int64_t n_q = (int64_t)a.n_head * a.hd;
    if (hrow >= a.n_head + a.n_head_kv) {
        const int64_t h = hrow - a.n_head - a.n_head_kv;
        const float *src = a.v_in + t * a.ldv + h * a.hd;
        const float *bv = a.bias ? a.bias + n_q + n_kv + h * a.hd : NULL;
        float *dst = a.v_cache + cell * n_kv + h * a.hd;
        for (int i = lane; i < a.hd; i += 32) dst[i] = bv ? __fadd_rn(src[i], bv[i]) : src[i];
        return;
    }
    const bool is_q = hrow < a.n_head;
    const int64_t h = is_q ? hrow : hrow - a.n_head;
    const float *src = is_q ? a.q_in + t * a.ldq_in + h * a.hd : a.k_in + t * a.ldk + h * a.hd;
    float *dst = is_q ? a.q_out + t * a.ldq_out + h * a.hd : (a.k_out ? a.k_out + t * a.ldk + h * a.hd : NULL);
    float *kc = is_q ? NULL : a.k_cache + cell * n_kv + h * a.hd;
    const float *bh = a.bias ? a.bias + (is_q ? h * a.hd : n_q + h * a.hd) : NULL;
    const float p = (float)a.pos[t];
    const int32_t half = a.n_rot / 2;
    for (int j = lane; j < a.hd / 2; j += 32) {
        /* the pair's two places: NeoX pairs i with i + n_rot/2 in the rotated part */
        const int i0 = a.neox && j < half ? j : 2 * j, i1 = a.neox && j < half ? j + half : 2 * j + 1;
        float r[2] = {src[i0], src[i1]};
        if (bh) r[0] = __fadd_rn(r[0], bh[i0]), r[1] = __fadd_rn(r[1], bh[i1]);
        if (j < half) {
            const float ang = p * a.inv_freq[j];
            rope_pair(r, cosf(ang), sinf(ang), NULL);
        }
        if (dst) dst[i0] = r[0], dst[i1] = r[1];
        if (kc) kc[i0] = r[0], kc[i1] = r[1];
    }
}

static optiml_status rope_check(int32_t n_tok, int32_t n_head, int32_t n_head_kv, int32_t head_dim, int32_t n_rot) {
    if (n_tok < 0 || n_tok > 65535 || n_head <= 0 || n_head_kv <= 0 || head_dim <= 0 || head_dim % 2 != 0 ||
        head_dim > 2 * ROPE_MAX_PAIRS || n_rot < 0 || n_rot % 2 != 0 || n_rot > head_dim)
        return optiml_fail(OPTIML_ERR_INVALID_ARG,
                           "cu_rope_store: bad shape n_tok %d, heads %d/%d, head_dim %d, n_rot %d", n_tok, n_head,
                           n_head_kv, head_dim, n_rot);
    return OPTIML_OK;
}

static optiml_status rope_launch(cu_ctx *cu, const rope_args &a, int32_t n_tok) {
    if (n_tok == 0) return OPTIML_OK;
    const unsigned rows = (unsigned)(a.n_head + 2 * a.n_head_kv);
    const dim3 grid((rows + ROPE_WARPS - 1) / ROPE_WARPS, (unsigned)n_tok);
    TRY(cu_check(cu_launch(cu, rope_store_kernel, grid, dim3(ROPE_WARPS * 32), 0, a), "rope_store"));
    return OPTIML_OK;
}

extern "C" optiml_status cu_rope_store(cu_ctx *cu, float *q, float *k, const float *v, float *k_cache, float *v_cache,
                                       int32_t n_tok, int32_t n_head, int32_t n_head_kv, int32_t head_dim,
                                       int32_t n_rot, const float *inv_freq, const struct cu_batch *b) {
    TRY(rope_check(n_tok, n_head, n_head_kv, head_dim, n_rot));
    const int64_t n_q = (int64_t)n_head * head_dim, n_kv = (int64_t)n_head_kv * head_dim;
    const rope_args a = {q, k, v, q, k, k_cache, v_cache, n_q, n_q, n_kv, n_kv, n_head, n_head_kv, head_dim, n_rot,
                         inv_freq, b->pos, b->cell, NULL, 0};
    return rope_launch(cu, a, n_tok);
}

extern "C" optiml_status cu_rope_store_qkv(cu_ctx *cu, const float *qkv, int64_t ld, float *q_out, float *k_cache,
                                           float *v_cache, int32_t n_tok, int32_t n_head, int32_t n_head_kv,
                                           int32_t head_dim, int32_t n_rot, const float *inv_freq,
                                           const float *bias, bool neox, const struct cu_batch *b) {
    TRY(rope_check(n_tok, n_head, n_head_kv, head_dim, n_rot));
    const int64_t n_q = (int64_t)n_head * head_dim, n_kv = (int64_t)n_head_kv * head_dim;
    if (ld < n_q + 2 * n_kv)
        return optiml_fail(OPTIML_ERR_INVALID_ARG, "cu_rope_store_qkv: row stride %lld < %lld", (long long)ld,
                           (long long)(n_q + 2 * n_kv));
    const rope_args a = {qkv, qkv + n_q, qkv + n_q + n_kv, q_out, NULL, k_cache, v_cache, ld, n_q, ld, ld,
                         n_head, n_head_kv, head_dim, n_rot, inv_freq, b->pos, b->cell, bias, neox ? 1 : 0};
    return rope_launch(cu, a, n_tok);
}

/* ---- attention: shared pieces ---------------------------------------------------- */

#define ATT_DEC_MAX_TOK 8   /* n_tok up to this: the decode kernels       */
#define ATT_DEC_WARPS   4   /* warps of a decode block                    */
#define ATT_DEC_CPW     8   /* cells a warp has in flight at once          */
#define ATT_CHUNK_MAX   256 /* cells per decode block, at most...          */
#define ATT_CHUNK_MIN   64  /* ...and at least (bounds the scratch)       */
#define ATT_PQ          64  /* prompt: queries per block                   */
#define ATT_PC          64  /* prompt: cells per tile                       */
#define ATT_P_THREADS   256 /* prompt: 16 x 16 threads, 4 x 4 scores each  */

struct att_args {
    const float *q, *k, *v;
    float *out;
    int8_t *out_q;  /* decode kernel 3 with Q8: out quantized (cu_mm_q8_ptrs) */
    float2 *out_s;
    int32_t n_tok, n_head, group, hd;
    int64_t n_q, n_kv; /* row lengths of q/out and of the cache */
    uint32_t n_ctx;
    float scale;
    const int32_t *pos, *seq, *cell_pos;
    const uint64_t *cell_seq;
    const uint32_t *n_used;
};

/* The CPU's rule (kv_cell_in_seq and cell_pos <= pos); seq < 0 sees every
 * sequence, as on the CPU. */
__device__ __forceinline__ bool att_visible(int32_t cpos, uint64_t cseq, int32_t pos, int32_t seq) {
    return cpos >= 0 && cpos <= pos && (seq < 0 || (seq < 64 && ((cseq >> seq) & 1)));
}

__device__ __forceinline__ uint32_t att_n_used(const att_args &a) {
    const uint32_t n = *a.n_used;
    return n < a.n_ctx ? n : a.n_ctx;
}

/* Cells per decode block: the largest chunk (<= ATT_CHUNK_MAX) that still
 * gives about two blocks per SM at this context size. */
static int att_chunk(const cu_ctx *cu, int32_t n_tok, int32_t n_head, uint32_t n_ctx) {
    int chunk = ATT_CHUNK_MAX;
    const int64_t want = 2 * (int64_t)(cu->n_sm > 0 ? cu->n_sm : 132);
    const int lo = cu->tune.att_chunk_min > ATT_CHUNK_MIN ? cu->tune.att_chunk_min : ATT_CHUNK_MIN;
    while (chunk > lo && (int64_t)n_tok * n_head * ((n_ctx + chunk - 1) / chunk) < want) chunk /= 2;
    return chunk;
}

static int64_t att_max_splits(uint32_t n_ctx) { return ((int64_t)n_ctx + ATT_CHUNK_MIN - 1) / ATT_CHUNK_MIN; }

extern "C" uint64_t cu_attention_scratch_bytes(int32_t n_batch, int32_t n_head, int32_t head_dim, uint32_t n_ctx) {
    if (n_batch <= 0 || n_head <= 0 || head_dim <= 0) return 0;
    const int64_t n_dec = n_batch < ATT_DEC_MAX_TOK ? n_batch : ATT_DEC_MAX_TOK;
    return (uint64_t)n_dec * n_head * att_max_splits(n_ctx) * (head_dim + 2) * sizeof(float);
}

/* ---- attention: decode (flash-decoding) ------------------------------------------- */

template <int NW> __device__ __forceinline__ float block_max(float v, float *red) {
    v = warp_max(v);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
    __syncthreads();
    float r = red[0];
#pragma unroll
    for (int i = 1; i < NW; i++) r = fmaxf(r, red[i]);
    __syncthreads(); /* red may be reused */
    return r;
}

template <int NW> __device__ __forceinline__ float block_sum(float v, float *red) {
    v = warp_sum(v);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
    __syncthreads();
    float r = 0.0f;
#pragma unroll
    for (int i = 0; i < NW; i++) r += red[i];
    __syncthreads();
    return r;
}

/* Block (split s, head h, token t) over cells [s*chunk, min((s+1)*chunk,
 * n_used)). Scores go to shared memory (lanes split head_dim, a warp per
 * cell, ATT_DEC_CPW cells in flight), then the chunk's max and weights, then
 * the weighted sum of V rows. Writes the partial: acc (hd), max, sum. D:
 * head_dim rounded up to a power of two >= 32 (lane i holds dims i + 32 j). */
template <int D>
__global__ void __launch_bounds__(ATT_DEC_WARPS * 32)
    att_decode_kernel(att_args a, int32_t chunk, int32_t n_split, float *__restrict__ part_acc,
                      float *__restrict__ part_ml) {
    constexpr int E = D / 32;
    __shared__ float sc[ATT_CHUNK_MAX];
    __shared__ float red[ATT_DEC_WARPS];
    __shared__ float accs[ATT_DEC_WARPS][D];
    const int32_t s = blockIdx.x, h = blockIdx.y, t = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t p = ((int64_t)t * a.n_head + h) * n_split + s;
    const int64_t n_used = att_n_used(a), c0 = (int64_t)s * chunk;
    if (c0 >= n_used) { /* beyond the used cells: an empty partial */
        if (threadIdx.x == 0) {
            part_ml[2 * p] = -INFINITY;
            part_ml[2 * p + 1] = 0.0f;
        }
        return;
    }
    const int n_c = (int)min((int64_t)chunk, n_used - c0);
    const int32_t pos = a.pos[t], seq = a.seq[t];
    const int64_t koff = (int64_t)(h / a.group) * a.hd;
    const float *k = a.k + koff + c0 * a.n_kv, *v = a.v + koff + c0 * a.n_kv;
    const float *qh = a.q + t * a.n_q + (int64_t)h * a.hd;
    float qr[E];
#pragma unroll
    for (int e = 0; e < E; e++) qr[e] = lane + 32 * e < a.hd ? qh[lane + 32 * e] : 0.0f;

    /* scores: a warp per cell, ATT_DEC_CPW cells at a time */
    for (int i0 = warp * ATT_DEC_CPW; i0 < n_c; i0 += ATT_DEC_WARPS * ATT_DEC_CPW) {
        float dot[ATT_DEC_CPW];
        unsigned vis = 0;
        /* K rows are loaded before visibility is known (one round trip, not
         * two); a cell below n_used is allocated memory, and an invisible
         * cell's score is replaced below whatever its row holds */
#pragma unroll
        for (int j = 0; j < ATT_DEC_CPW; j++) {
            const int i = i0 + j;
            const int64_t c = c0 + i;
            if (i < n_c && att_visible(a.cell_pos[c], a.cell_seq[c], pos, seq)) vis |= 1u << j;
            dot[j] = 0.0f;
            if (i < n_c) {
                const float *kr = k + (int64_t)i * a.n_kv;
#pragma unroll
                for (int e = 0; e < E; e++)
                    if (lane + 32 * e < a.hd) dot[j] += qr[e] * kr[lane + 32 * e];
            }
        }
#pragma unroll
        for (int j = 0; j < ATT_DEC_CPW; j++) {
            dot[j] = warp_sum(dot[j]);
            if (lane == 0 && i0 + j < n_c) sc[i0 + j] = (vis >> j & 1) ? dot[j] * a.scale : -INFINITY;
        }
    }
    __syncthreads();
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n_c; i += blockDim.x) m = fmaxf(m, sc[i]);
    m = block_max<ATT_DEC_WARPS>(m, red);
    float l = 0.0f;
    for (int i = threadIdx.x; i < n_c; i += blockDim.x) {
        const float w = sc[i] == -INFINITY ? 0.0f : expf(sc[i] - m);
        sc[i] = w;
        l += w;
    }
    l = block_sum<ATT_DEC_WARPS>(l, red); /* its barriers also publish sc */

    /* weighted V rows: a warp per cell again; cells of weight 0 are not read
     * (free cells may hold anything) */
    float acc[E];
#pragma unroll
    for (int e = 0; e < E; e++) acc[e] = 0.0f;
    for (int i0 = warp * ATT_DEC_CPW; i0 < n_c; i0 += ATT_DEC_WARPS * ATT_DEC_CPW) {
#pragma unroll
        for (int j = 0; j < ATT_DEC_CPW; j++) {
            const int i = i0 + j;
            const float w = i < n_c ? sc[i] : 0.0f;
            if (i < n_c) { /* loaded whatever w is; a weight of 0 selects 0 (free cells may hold NaN) */
                const float *vr = v + (int64_t)i * a.n_kv;
#pragma unroll
                for (int e = 0; e < E; e++)
                    if (lane + 32 * e < a.hd) {
                        const float vv = vr[lane + 32 * e];
                        acc[e] += w != 0.0f ? w * vv : 0.0f;
                    }
            }
        }
    }
#pragma unroll
    for (int e = 0; e < E; e++) accs[warp][lane + 32 * e] = acc[e];
    __syncthreads();
    for (int d = threadIdx.x; d < a.hd; d += blockDim.x) {
        float r = 0.0f;
#pragma unroll
        for (int w = 0; w < ATT_DEC_WARPS; w++) r += accs[w][d];
        part_acc[p * a.hd + d] = r;
    }
    if (threadIdx.x == 0) {
        part_ml[2 * p] = m;
        part_ml[2 * p + 1] = l;
    }
}

/* One block per (head, token): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s
 * - M) l_s over the splits that hold used cells; zeros when no cell is
 * visible. */
__global__ void att_combine_kernel(att_args a, int32_t chunk, int32_t n_split, const float *__restrict__ part_acc,
                                   const float *__restrict__ part_ml) {
    const int32_t h = blockIdx.x, t = blockIdx.y;
    const int64_t n_used = att_n_used(a);
    const int64_t n_act = min((int64_t)n_split, (n_used + chunk - 1) / chunk);
    const int64_t p0 = ((int64_t)t * a.n_head + h) * n_split;
    float mx = -INFINITY;
    for (int64_t s = 0; s < n_act; s++) mx = fmaxf(mx, part_ml[2 * (p0 + s)]);
    float l = 0.0f;
    if (mx != -INFINITY)
        for (int64_t s = 0; s < n_act; s++) {
            const float ms = part_ml[2 * (p0 + s)];
            if (ms != -INFINITY) l += expf(ms - mx) * part_ml[2 * (p0 + s) + 1];
        }
    float *o = a.out + t * a.n_q + (int64_t)h * a.hd;
    for (int d = threadIdx.x; d < a.hd; d += blockDim.x) {
        float r = 0.0f;
        if (l > 0.0f) {
            for (int64_t s = 0; s < n_act; s++) {
                const float ms = part_ml[2 * (p0 + s)];
                if (ms != -INFINITY) r += expf(ms - mx) * part_acc[(p0 + s) * a.hd + d];
            }
            r /= l;
        }
        o[d] = r;
    }
}

template <int D> static optiml_status att_decode(cu_ctx *cu, const att_args &a, void *scratch) {
    const int32_t chunk = att_chunk(cu, a.n_tok, a.n_head, a.n_ctx);
    const int32_t n_split = (int32_t)(((int64_t)a.n_ctx + chunk - 1) / chunk);
    const int64_t n_part = (int64_t)a.n_tok * a.n_head * n_split;
    float *part_acc = (float *)scratch, *part_ml = part_acc + n_part * a.hd;
    const dim3 grid((unsigned)n_split, (unsigned)a.n_head, (unsigned)a.n_tok);
    att_decode_kernel<D><<<grid, ATT_DEC_WARPS * 32, 0, cu->stream>>>(a, chunk, n_split, part_acc, part_ml);
    CU_LAUNCHED("attention (decode)");
    const int threads = a.hd <= 64 ? 64 : (a.hd <= 128 ? 128 : 256);
    att_combine_kernel<<<dim3((unsigned)a.n_head, (unsigned)a.n_tok), threads, 0, cu->stream>>>(a, chunk, n_split,
                                                                                                part_acc, part_ml);
    CU_LAUNCHED("attention (combine)");
    return OPTIML_OK;
}

/* ---- attention: decode, kernel 2 (even split, tiles, online softmax) ----------------- */

#define ATT2_THREADS 128 /* threads of a block                                   */
#define ATT2_TC      64  /* cells per tile: 4 threads per cell, 2 passes of 32    */

/* Splits of the used cells per (token, head): about att_blocks_per_sm
 * blocks per SM in all, at most one per ATT_CHUNK_MIN cells of n_ctx (the
 * scratch bound of cu_attention_scratch_bytes). The grid depends on host
 * values only; each block takes its share of *n_used on the device, so
 * short contexts in a long cache still spread over every split. */
static int32_t att2_splits(const cu_ctx *cu, int32_t n_tok, int32_t n_head, uint32_t n_ctx) {
    const int64_t want = (int64_t)(cu->n_sm > 0 ? cu->n_sm : 132) * cu->tune.att_blocks_per_sm;
    int64_t n = (want + (int64_t)n_tok * n_head - 1) / ((int64_t)n_tok * n_head);
    const int64_t cap = att_max_splits(n_ctx);
    if (n > cap) n = cap;
    return (int32_t)(n < 1 ? 1 : n);
}

/* The partials of every split of (token t, head h) merged into a.out (empty
 * ones have max -inf and are skipped); the block's threads take the output
 * values in turn. Loads bypass L1 (__ldcg): in kernel 3 other blocks wrote
 * the partials during this kernel. */
template <bool Q8>
__device__ __forceinline__ void att2_merge(const att_args &a, int32_t n_split, const float *part_acc,
                                           const float *part_ml, int32_t t, int32_t h) {
    const int64_t p0 = ((int64_t)t * a.n_head + h) * n_split;
    float mx = -INFINITY;
    for (int32_t s = 0; s < n_split; s++) mx = fmaxf(mx, __ldcg(&part_ml[2 * (p0 + s)]));
    for (int d = threadIdx.x; d < a.hd; d += blockDim.x) {
        float l = 0.0f, r = 0.0f;
        if (mx != -INFINITY)
            for (int32_t s = 0; s < n_split; s++) {
                const float ms = __ldcg(&part_ml[2 * (p0 + s)]);
                if (ms == -INFINITY) continue;
                const float e = expf(ms - mx);
                l += e * __ldcg(&part_ml[2 * (p0 + s) + 1]);
                r += e * __ldcg(&part_acc[(p0 + s) * a.hd + d]);
            }
        const float v = l > 0.0f ? r / l : 0.0f;
        const int64_t j = (int64_t)h * a.hd + d;
        a.out[t * a.n_q + j] = v;
        if constexpr (Q8) { /* a warp holds one block of 32 (hd % 32 == 0): mm_inq_kernel's rounding */
            const float amax = warp_max(fabsf(v));
            const float ds = amax / 127.0f, id = ds > 0.0f ? 1.0f / ds : 0.0f;
            const int qv = __float2int_rn(v * id);
            a.out_q[t * a.n_q + j] = (int8_t)qv;
            const int sum = __reduce_add_sync(0xffffffffu, qv);
            if ((d & 31) == 0) a.out_s[t * (a.n_q / 32) + j / 32] = make_float2(ds, (float)sum);
        }
    }
}

/* Kernel 3: after a block has written its partial it counts itself done for
 * (t, h); the last of the n_split blocks merges them (the threadfence +
 * atomic counter pattern) and resets the counter to 0 for the next call or
 * graph replay. */
template <bool Q8>
__device__ __forceinline__ void att2_merge_if_last(const att_args &a, int32_t n_split, const float *part_acc,
                                                   const float *part_ml, unsigned *done, int32_t t, int32_t h) {
    __shared__ bool last;
    __threadfence(); /* this block's partial is visible before it is counted */
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned *c = done + (int64_t)t * a.n_head + h;
        last = atomicAdd(c, 1u) == (unsigned)n_split - 1;
        if (last) *c = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    att2_merge<Q8>(a, n_split, part_acc, part_ml, t, h);
}

/* The sum of the V slots' float4 f (accs[VS][D / 4]) */
template <int VS>
__device__ __forceinline__ float4 att2_slot_sum(const float4 *accs, int d4, int f) {
    float4 r = accs[f];
#pragma unroll
    for (int j = 1; j < VS; j++) {
        const float4 o = accs[j * d4 + f];
        r.x += o.x, r.y += o.y, r.z += o.z, r.w += o.w;
    }
    return r;
}

/* Kernel 3 with one split per (token, head), as short contexts have: the
 * block writes what att2_merge would make of its one partial (exp(m - m)
 * = 1, so r / l: bit-identical) and skips the partial, the fence and the
 * counter, two round trips through L2 on the decode's critical path. A
 * thread takes a float4 of the output; 8 threads hold a block of 32 for the
 * 8-bit copy. */
template <int D, bool Q8>
__device__ __forceinline__ void att2_single(const att_args &a, const float4 (*accs)[D / 4], float m, float l,
                                            int32_t t, int32_t h) {
    constexpr int D4 = D / 4, VS = ATT2_THREADS / D4;
    const unsigned mask = D4 >= 32 ? 0xffffffffu : (1u << D4) - 1u;
    for (int f = threadIdx.x; f < D4; f += ATT2_THREADS) {
        const float4 r = att2_slot_sum<VS>(&accs[0][0], D4, f);
        const bool ok = m != -INFINITY && l > 0.0f;
        const float4 v = ok ? make_float4(r.x / l, r.y / l, r.z / l, r.w / l) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        const int64_t j = (int64_t)h * a.hd + 4 * f;
        *(float4 *)(a.out + t * a.n_q + j) = v;
        if constexpr (Q8) { /* as att2_merge: d = amax / 127, round to nearest */
            float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
#pragma unroll
            for (int o = 1; o < 8; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(mask, amax, o));
            const float ds = amax / 127.0f, id = ds > 0.0f ? 1.0f / ds : 0.0f;
            const int q0 = __float2int_rn(v.x * id), q1 = __float2int_rn(v.y * id), q2 = __float2int_rn(v.z * id),
                      q3 = __float2int_rn(v.w * id);
            *(uint32_t *)(a.out_q + t * a.n_q + j) =
                (uint32_t)(q0 & 0xFF) | (uint32_t)(q1 & 0xFF) << 8 | (uint32_t)(q2 & 0xFF) << 16 | (uint32_t)(q3 & 0xFF) << 24;
            int sum = q0 + q1 + q2 + q3;
#pragma unroll
            for (int o = 1; o < 8; o <<= 1) sum += __shfl_xor_sync(mask, sum, o);
            if ((f & 7) == 0) a.out_s[t * (a.n_q / 32) + j / 32] = make_float2(ds, (float)sum);
        }
    }
}

/* Block (split s, head h, token t) over its share [c0, c1) of the used
 * cells, cut in multiples of 32, in tiles of ATT2_TC cells:
 *   scores: 4 neighbouring threads per cell, each reading every 4th float4
 *     of the K row (a warp's load is 8 cells x 64 contiguous bytes), all
 *     loads of the tile issued before any sum; two shuffles finish a dot;
 *   softmax: every warp reads the tile's scores from shared memory and
 *     computes the same running max and sum (no further barrier);
 *   V: thread (slot, f) owns float4 f of the head's output and adds cells
 *     slot, slot + VS, ... of the tile, loads issued together (a cell past
 *     the tile's end reads the last cell and is weighted 0).
 * Ends with the slots summed through shared memory and the partial (acc,
 * max, sum) written as kernel 1 does. Requires head_dim == D and 16-byte
 * aligned q, K, V rows. */
template <int D, bool FOLD, bool Q8>
__global__ void __launch_bounds__(ATT2_THREADS)
    att_decode2_kernel(att_args a, int32_t n_split, float *__restrict__ part_acc, float *__restrict__ part_ml,
                       unsigned *__restrict__ done) {
    constexpr int D4 = D / 4, KF = D4 / 4, KP = ATT2_TC / (ATT2_THREADS / 4), VS = ATT2_THREADS / D4;
    constexpr int VN = ATT2_TC / VS; /* cells per V slot per tile */
    __shared__ float sc[ATT2_TC];
    __shared__ float4 accs[VS][D4];
    pdl_begin();
    const int32_t s = blockIdx.x, h = blockIdx.y, t = blockIdx.z;
    const int lane = threadIdx.x % 32;
    const int64_t p = ((int64_t)t * a.n_head + h) * n_split + s;
    const int64_t n_used = att_n_used(a);
    const int64_t per = ((n_used + n_split - 1) / n_split + 31) / 32 * 32;
    const int64_t c0 = (int64_t)s * per, c1 = min(c0 + per, n_used);
    if (c0 >= c1) { /* nothing here: an empty partial */
        if (threadIdx.x == 0) {
            part_ml[2 * p] = -INFINITY;
            part_ml[2 * p + 1] = 0.0f;
        }
        if constexpr (FOLD) att2_merge_if_last<Q8>(a, n_split, part_acc, part_ml, done, t, h);
        return;
    }
    const int32_t pos = a.pos[t], seq = a.seq[t];
    const int64_t koff = (int64_t)(h / a.group) * a.hd;
    const int kc = threadIdx.x >> 2, kq = threadIdx.x & 3; /* score phase: cell kc (+ 32 pass), quarter kq */
    const int vf = threadIdx.x % D4, vs = threadIdx.x / D4; /* V phase: float4 vf, slot vs */
    const float4 *qh = (const float4 *)(a.q + t * a.n_q + (int64_t)h * a.hd);
    float4 qr[KF];
#pragma unroll
    for (int f = 0; f < KF; f++) qr[f] = qh[kq + 4 * f];
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float m = -INFINITY, l = 0.0f;
    for (int64_t b0 = c0; b0 < c1; b0 += ATT2_TC) {
        const int nb = (int)min((int64_t)ATT2_TC, c1 - b0);
        float dot[KP];
#pragma unroll
        for (int ps = 0; ps < KP; ps++) {
            const int ic = min(kc + 32 * ps, nb - 1);
            const float4 *kr = (const float4 *)(a.k + (b0 + ic) * a.n_kv + koff);
            float d = 0.0f;
#pragma unroll
            for (int f = 0; f < KF; f++) {
                const float4 kv = __ldg(kr + kq + 4 * f);
                d = fmaf(qr[f].x, kv.x, d);
                d = fmaf(qr[f].y, kv.y, d);
                d = fmaf(qr[f].z, kv.z, d);
                d = fmaf(qr[f].w, kv.w, d);
            }
            dot[ps] = d;
        }
#pragma unroll
        for (int ps = 0; ps < KP; ps++) {
            float d = dot[ps];
            d += __shfl_xor_sync(0xffffffffu, d, 1);
            d += __shfl_xor_sync(0xffffffffu, d, 2);
            const int i = kc + 32 * ps;
            if (kq == 0 && i < nb) {
                const int64_t c = b0 + i;
                sc[i] = att_visible(a.cell_pos[c], a.cell_seq[c], pos, seq) ? d * a.scale : -INFINITY;
            }
        }
        __syncthreads();
        /* the tile's max and weights, the same in every warp */
        const float s0 = lane < nb ? sc[lane] : -INFINITY, s1 = lane + 32 < nb ? sc[lane + 32] : -INFINITY;
        const float mn = fmaxf(m, warp_max(fmaxf(s0, s1)));
        const float alpha = m == -INFINITY ? 0.0f : expf(m - mn);
        const float w0 = s0 == -INFINITY ? 0.0f : expf(s0 - mn), w1 = s1 == -INFINITY ? 0.0f : expf(s1 - mn);
        l = l * alpha + warp_sum(w0 + w1);
        m = mn;
        acc.x *= alpha, acc.y *= alpha, acc.z *= alpha, acc.w *= alpha;
        float4 vv[VN];
#pragma unroll
        for (int j = 0; j < VN; j++) {
            const int ic = min(vs + VS * j, nb - 1);
            vv[j] = __ldg((const float4 *)(a.v + (b0 + ic) * a.n_kv + koff) + vf);
        }
#pragma unroll
        for (int j = 0; j < VN; j++) {
            const int i = vs + VS * j;
            const float sv = i < nb ? sc[i] : -INFINITY;
            const float w = sv == -INFINITY ? 0.0f : expf(sv - mn);
            /* a weight of 0 selects 0: free cells may hold NaN */
            if (w != 0.0f) {
                acc.x = fmaf(w, vv[j].x, acc.x);
                acc.y = fmaf(w, vv[j].y, acc.y);
                acc.z = fmaf(w, vv[j].z, acc.z);
                acc.w = fmaf(w, vv[j].w, acc.w);
            }
        }
        __syncthreads(); /* sc is rewritten by the next tile */
    }
    accs[vs][vf] = acc;
    __syncthreads();
    if (FOLD && n_split == 1) { /* the only split: the merge's result directly (no partial, no counter) */
        att2_single<D, Q8>(a, accs, m, l, t, h);
        return;
    }
    for (int f = threadIdx.x; f < D4; f += ATT2_THREADS)
        ((float4 *)(part_acc + p * a.hd))[f] = att2_slot_sum<VS>(&accs[0][0], D4, f);
    if (threadIdx.x == 0) {
        part_ml[2 * p] = m;
        part_ml[2 * p + 1] = l;
    }
    if constexpr (FOLD) att2_merge_if_last<Q8>(a, n_split, part_acc, part_ml, done, t, h);
}

/* One block per (head, token): the partials of every split merged. */
__global__ void att_combine2_kernel(att_args a, int32_t n_split, const float *__restrict__ part_acc,
                                    const float *__restrict__ part_ml) {
    pdl_begin();
    att2_merge<false>(a, n_split, part_acc, part_ml, blockIdx.y, blockIdx.x);
}

template <int D> static optiml_status att_decode2(cu_ctx *cu, const att_args &a, void *scratch, bool q8) {
    const int32_t n_split = att2_splits(cu, a.n_tok, a.n_head, a.n_ctx);
    const int64_t n_part = (int64_t)a.n_tok * a.n_head * n_split;
    float *part_acc = (float *)scratch, *part_ml = part_acc + n_part * a.hd;
    const dim3 grid((unsigned)n_split, (unsigned)a.n_head, (unsigned)a.n_tok);
    if (cu->tune.att_kernel == 3 && (int64_t)a.n_tok * a.n_head <= CU_ATT_DONE_MAX) {
        if (q8)
            TRY(cu_check(cu_launch(cu, att_decode2_kernel<D, true, true>, grid, dim3(ATT2_THREADS), 0, a, n_split,
                                   part_acc, part_ml, cu->att_done),
                         "attention (decode 3, quantized out)"));
        else
            TRY(cu_check(cu_launch(cu, att_decode2_kernel<D, true, false>, grid, dim3(ATT2_THREADS), 0, a, n_split,
                                   part_acc, part_ml, cu->att_done),
                         "attention (decode 3)"));
        return OPTIML_OK;
    }
    TRY(cu_check(cu_launch(cu, att_decode2_kernel<D, false, false>, grid, dim3(ATT2_THREADS), 0, a, n_split, part_acc,
                           part_ml, (unsigned *)NULL),
                 "attention (decode 2)"));
    TRY(cu_check(cu_launch(cu, att_combine2_kernel, dim3((unsigned)a.n_head, (unsigned)a.n_tok),
                           dim3(D < 64 ? 64 : D), 0, a, n_split, (const float *)part_acc, (const float *)part_ml),
                 "attention (combine 2)"));
    return OPTIML_OK;
}

/* ---- attention: prompt (tiled, online softmax) -------------------------------------- */

template <int D> static constexpr size_t att_prompt_smem(void) {
    return sizeof(float) * ((size_t)ATT_PQ * (D + 4) + (size_t)ATT_PC * (D + 4) + (size_t)ATT_PC * (ATT_PQ + 4)) +
           sizeof(uint64_t) * ATT_PC + sizeof(int32_t) * (2 * ATT_PQ + ATT_PC);
}

/* Block (query tile, head h): thread (ty, tx) owns queries 4ty..4ty+3 (their
 * running max, sum and output dims tx + 16 j) and scores of cells tx + 16 j
 * of each tile. Shared memory: the Q tile, one K-then-V tile (rows padded
 * by 4 floats against bank conflicts), P transposed, and the tile's cell and
 * query metadata. Rows beyond head_dim are zero in Q and K. */
template <int D> __global__ void __launch_bounds__(ATT_P_THREADS, D <= 128 ? 2 : 1) att_prompt_kernel(att_args a) {
    constexpr int LD = D + 4, LP = ATT_PQ + 4, DT = D / 16;
    extern __shared__ float4 smem4[];
    float *qs = (float *)smem4;
    float *kv = qs + ATT_PQ * LD;
    float *pt = kv + ATT_PC * LD;
    uint64_t *cseq = (uint64_t *)(pt + ATT_PC * LP);
    int32_t *cpos = (int32_t *)(cseq + ATT_PC);
    int32_t *qpos = cpos + ATT_PC, *qseq = qpos + ATT_PQ;

    const int32_t h = blockIdx.y, t0 = blockIdx.x * ATT_PQ;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int n_tq = min(ATT_PQ, a.n_tok - t0);
    const int64_t koff = (int64_t)(h / a.group) * a.hd;
    for (int i = tid; i < ATT_PQ * D; i += ATT_P_THREADS) {
        const int r = i / D, d = i % D;
        qs[r * LD + d] = r < n_tq && d < a.hd ? a.q[(t0 + r) * a.n_q + (int64_t)h * a.hd + d] : 0.0f;
    }
    for (int i = tid; i < ATT_PQ; i += ATT_P_THREADS) {
        qpos[i] = i < n_tq ? a.pos[t0 + i] : -1; /* padding queries see nothing */
        qseq[i] = i < n_tq ? a.seq[t0 + i] : 0;
    }
    __syncthreads();

    float o[4][DT], m[4], l[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < DT; j++) o[i][j] = 0.0f;
    }
    const int64_t n_used = att_n_used(a);
    for (int64_t c0 = 0; c0 < n_used; c0 += ATT_PC) {
        if (tid < ATT_PC) {
            const int64_t c = c0 + tid;
            cpos[tid] = c < n_used ? a.cell_pos[c] : -1;
            cseq[tid] = c < n_used ? a.cell_seq[c] : 0;
        }
        __syncthreads();
        unsigned vis = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int32_t cp = cpos[tx + 16 * j];
            const uint64_t cq = cseq[tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
                if (att_visible(cp, cq, qpos[4 * ty + i], qseq[4 * ty + i])) vis |= 1u << (4 * i + j);
        }
        if (!__syncthreads_or(vis != 0)) continue; /* no query here sees this tile */

        /* K tile (free cells as zeros: their memory may hold anything) */
        for (int i = tid; i < ATT_PC * D; i += ATT_P_THREADS) {
            const int r = i / D, d = i % D;
            kv[r * LD + d] = cpos[r] >= 0 && d < a.hd ? a.k[(c0 + r) * a.n_kv + koff + d] : 0.0f;
        }
        __syncthreads();
        float sc[4][4];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) sc[i][j] = 0.0f;
#pragma unroll 4
        for (int d = 0; d < D; d += 4) {
            float4 qv[4], kk[4];
#pragma unroll
            for (int i = 0; i < 4; i++) qv[i] = *(const float4 *)&qs[(4 * ty + i) * LD + d];
#pragma unroll
            for (int j = 0; j < 4; j++) kk[j] = *(const float4 *)&kv[(tx + 16 * j) * LD + d];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    sc[i][j] = fmaf(qv[i].x, kk[j].x, sc[i][j]);
                    sc[i][j] = fmaf(qv[i].y, kk[j].y, sc[i][j]);
                    sc[i][j] = fmaf(qv[i].z, kk[j].z, sc[i][j]);
                    sc[i][j] = fmaf(qv[i].w, kk[j].w, sc[i][j]);
                }
        }
        /* online softmax: the 16 threads of a row (lanes differing in the low
         * 4 bits) agree on the new max; each keeps its own part of the sum */
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float mt = -INFINITY;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                sc[i][j] = (vis >> (4 * i + j) & 1) ? sc[i][j] * a.scale : -INFINITY;
                mt = fmaxf(mt, sc[i][j]);
            }
#pragma unroll
            for (int off = 8; off > 0; off >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
            const float mn = fmaxf(m[i], mt);
            const float alpha = m[i] == -INFINITY ? 0.0f : expf(m[i] - mn);
            float ls = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                sc[i][j] = sc[i][j] == -INFINITY ? 0.0f : expf(sc[i][j] - mn);
                ls += sc[i][j];
            }
            l[i] = l[i] * alpha + ls;
            m[i] = mn;
#pragma unroll
            for (int j = 0; j < DT; j++) o[i][j] *= alpha;
        }
#pragma unroll
        for (int j = 0; j < 4; j++)
            *(float4 *)&pt[(tx + 16 * j) * LP + 4 * ty] = make_float4(sc[0][j], sc[1][j], sc[2][j], sc[3][j]);
        __syncthreads(); /* K reads done, P written */

        for (int i = tid; i < ATT_PC * D; i += ATT_P_THREADS) {
            const int r = i / D, d = i % D;
            kv[r * LD + d] = cpos[r] >= 0 && d < a.hd ? a.v[(c0 + r) * a.n_kv + koff + d] : 0.0f;
        }
        __syncthreads();
#pragma unroll 2
        for (int c = 0; c < ATT_PC; c++) {
            const float4 p4 = *(const float4 *)&pt[c * LP + 4 * ty];
#pragma unroll
            for (int j = 0; j < DT; j++) {
                const float vv = kv[c * LD + tx + 16 * j];
                o[0][j] = fmaf(p4.x, vv, o[0][j]);
                o[1][j] = fmaf(p4.y, vv, o[1][j]);
                o[2][j] = fmaf(p4.z, vv, o[2][j]);
                o[3][j] = fmaf(p4.w, vv, o[3][j]);
            }
        }
        __syncthreads(); /* before the next tile overwrites kv, pt, cpos */
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float lt = l[i];
#pragma unroll
        for (int off = 8; off > 0; off >>= 1) lt += __shfl_xor_sync(0xffffffffu, lt, off);
        const int r = 4 * ty + i;
        if (r >= n_tq) continue;
        float *orow = a.out + (t0 + r) * a.n_q + (int64_t)h * a.hd;
        const float inv = lt > 0.0f ? 1.0f / lt : 0.0f; /* no visible cell: zeros */
#pragma unroll
        for (int j = 0; j < DT; j++)
            if (tx + 16 * j < a.hd) orow[tx + 16 * j] = o[i][j] * inv;
    }
}

template <int D> static optiml_status att_prompt(cu_ctx *cu, const att_args &a) {
    constexpr size_t smem = att_prompt_smem<D>();
    /* above 48 KiB a kernel must opt in; a host-side attribute, fine while
     * a stream is being captured */
    CU_TRY(cudaFuncSetAttribute(att_prompt_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    const dim3 grid((unsigned)((a.n_tok + ATT_PQ - 1) / ATT_PQ), (unsigned)a.n_head);
    att_prompt_kernel<D><<<grid, ATT_P_THREADS, smem, cu->stream>>>(a);
    CU_LAUNCHED("attention (prompt)");
    return OPTIML_OK;
}

/* ---- attention: prompt on tensor cores (WMMA f16, f32 accumulation) ------------------- */

/* Shared by the tensor-core prompt kernels. */

/* The metadata of the tile of C cells from c0 (beyond n_used: free). */
template <int C>
__device__ __forceinline__ void att_tile_meta(const att_args &a, int64_t c0, int64_t n_used, int32_t *cpos,
                                              uint64_t *cseq, int tid) {
    if (tid < C) {
        const int64_t c = c0 + tid;
        cpos[tid] = c < n_used ? a.cell_pos[c] : -1;
        cseq[tid] = c < n_used ? a.cell_seq[c] : 0;
    }
}

/* The Q rows t0.. of head h as f16 (rows from n_tq on as zeros), LD halves apart. */
template <int D, int Q, int T, int LD>
__device__ __forceinline__ void att_stage_q(const att_args &a, int32_t t0, int n_tq, int32_t h, __half *qs, int tid) {
    constexpr int D4 = D / 4;
    for (int i = tid; i < Q * D4; i += T) {
        const int r = i / D4, f = i % D4;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (r < n_tq) v = *((const float4 *)(a.q + (t0 + r) * a.n_q + (int64_t)h * a.hd) + f);
        __half2 *d = (__half2 *)(qs + r * LD + 4 * f);
        d[0] = __floats2half2_rn(v.x, v.y);
        d[1] = __floats2half2_rn(v.z, v.w);
    }
}

/* K and V of the tile of C cells from c0 as f16 (free cells as zeros:
 * their memory may hold anything): B float4 of each per thread loaded
 * before any is stored, so B loads are in flight at once. */
template <int D, int C, int T, int B, int LD>
__device__ __forceinline__ void att_stage_kv(const att_args &a, int64_t c0, int64_t koff, const int32_t *cpos,
                                             __half *ks, __half *vs, int tid) {
    constexpr int D4 = D / 4, PER = C * D4 / T;
    static_assert(PER % B == 0, "K/V staging batches");
    for (int i0 = 0; i0 < PER; i0 += B) {
        float4 kv[B], vv[B];
#pragma unroll
        for (int u = 0; u < B; u++) {
            const int i = tid + (i0 + u) * T, c = i / D4, f = i % D4;
            kv[u] = vv[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (cpos[c] >= 0) {
                kv[u] = __ldg((const float4 *)(a.k + (c0 + c) * a.n_kv + koff) + f);
                vv[u] = __ldg((const float4 *)(a.v + (c0 + c) * a.n_kv + koff) + f);
            }
        }
#pragma unroll
        for (int u = 0; u < B; u++) {
            const int i = tid + (i0 + u) * T, c = i / D4, f = i % D4;
            __half2 *dk = (__half2 *)(ks + c * LD + 4 * f), *dv = (__half2 *)(vs + c * LD + 4 * f);
            dk[0] = __floats2half2_rn(kv[u].x, kv[u].y);
            dk[1] = __floats2half2_rn(kv[u].z, kv[u].w);
            dv[0] = __floats2half2_rn(vv[u].x, vv[u].y);
            dv[1] = __floats2half2_rn(vv[u].z, vv[u].w);
        }
    }
}

#define ATT_T_Q       64  /* queries per block: 4 warps x 16 rows  */
#define ATT_T_C       64  /* cells per tile                          */
#define ATT_T_THREADS 128

/* Shared memory of att_tc_kernel<D> (every array a multiple of 32 bytes,
 * leading dimensions padded against bank conflicts and kept multiples of
 * 8 halves / 4 floats as WMMA needs). */
template <int D> struct att_tc_smem {
    static constexpr int LDH = D + 8, LDS = ATT_T_C + 4, LDP = ATT_T_C + 8, LDO = D + 4;
    static constexpr size_t q = 0, k = q + 2 * ATT_T_Q * LDH, v = k + 2 * ATT_T_C * LDH;
    static constexpr size_t s = v + 2 * ATT_T_C * LDH, p = s + 4 * ATT_T_Q * LDS, o = p + 2 * ATT_T_Q * LDP;
    static constexpr size_t cseq = o + 4 * ATT_T_Q * LDO, cpos = cseq + 8 * ATT_T_C, qpos = cpos + 4 * ATT_T_C;
    static constexpr size_t qseq = qpos + 4 * ATT_T_Q, bytes = qseq + 4 * ATT_T_Q;
};

/* Block (64 queries, head h); warp w owns query rows 16w..16w+15. Per tile
 * of 64 cells: K and V converted to f16 in shared memory (free cells as
 * zeros), S = Q K^T on tensor cores into shared memory (f32), then two
 * lanes per query row apply the mask and scale, update the row's running
 * max and sum (online softmax), write P (f16) and rescale the row's output
 * O (f32, shared memory), and O += P V on tensor cores (O loaded into the
 * accumulator fragments and stored back). Tiles no query of the block sees
 * are skipped. head_dim == D (64 or 128). */
template <int D, int B> __global__ void __launch_bounds__(ATT_T_THREADS) att_tc_kernel(att_args a) {
    using namespace nvcuda;
    using L = att_tc_smem<D>;
    extern __shared__ float4 smem4[];
    uint8_t *sm = (uint8_t *)smem4;
    __half *qs = (__half *)(sm + L::q), *ks = (__half *)(sm + L::k), *vs = (__half *)(sm + L::v);
    float *ss = (float *)(sm + L::s), *os = (float *)(sm + L::o);
    __half *ps = (__half *)(sm + L::p);
    uint64_t *cseq = (uint64_t *)(sm + L::cseq);
    int32_t *cpos = (int32_t *)(sm + L::cpos), *qpos = (int32_t *)(sm + L::qpos), *qseq = (int32_t *)(sm + L::qseq);

    const int32_t h = blockIdx.y, t0 = blockIdx.x * ATT_T_Q;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int n_tq = min(ATT_T_Q, a.n_tok - t0);
    const int64_t koff = (int64_t)(h / a.group) * a.hd;
    att_stage_q<D, ATT_T_Q, ATT_T_THREADS, L::LDH>(a, t0, n_tq, h, qs, tid);
    for (int i = tid; i < ATT_T_Q * D; i += ATT_T_THREADS) os[(i / D) * L::LDO + i % D] = 0.0f;
    for (int i = tid; i < ATT_T_Q; i += ATT_T_THREADS) {
        qpos[i] = i < n_tq ? a.pos[t0 + i] : -1; /* padding queries see nothing */
        qseq[i] = i < n_tq ? a.seq[t0 + i] : 0;
    }
    __syncthreads();

    /* this warp's 16 query rows as A fragments, loaded once for every tile */
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fq[D / 16];
#pragma unroll
    for (int k = 0; k < D / 16; k++) wmma::load_matrix_sync(fq[k], qs + 16 * warp * L::LDH + 16 * k, L::LDH);
    /* softmax mapping: row r = 16 warp + lane / 2, cells 32 (lane & 1) + j */
    const int r = 16 * warp + lane / 2, half = lane & 1;
    float m = -INFINITY, l = 0.0f;
    const int64_t n_used = att_n_used(a);
    for (int64_t c0 = 0; c0 < n_used; c0 += ATT_T_C) {
        att_tile_meta<ATT_T_C>(a, c0, n_used, cpos, cseq, tid);
        __syncthreads();
        uint32_t vis = 0;
        const int32_t qp = qpos[r], qq = qseq[r];
#pragma unroll
        for (int j = 0; j < 32; j++) {
            const int c = 32 * half + j;
            if (att_visible(cpos[c], cseq[c], qp, qq)) vis |= 1u << j;
        }
        if (!__syncthreads_or(vis != 0)) continue; /* no query here sees this tile */

        /* B = 1 (attp=3): one float4 at a time, as the first version did;
         * 7B pp512 on an H200 24.2k vs 25.3k tokens/s with B = 8 */
        att_stage_kv<D, ATT_T_C, ATT_T_THREADS, B, L::LDH>(a, c0, koff, cpos, ks, vs, tid);
        __syncthreads();

        /* S (16 rows of this warp x 64 cells) = Q K^T */
#pragma unroll
        for (int n = 0; n < ATT_T_C / 16; n++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int k = 0; k < D / 16; k++) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
                wmma::load_matrix_sync(fb, ks + 16 * n * L::LDH + 16 * k, L::LDH);
                wmma::mma_sync(acc, fq[k], fb, acc);
            }
            wmma::store_matrix_sync(ss + 16 * warp * L::LDS + 16 * n, acc, L::LDS, wmma::mem_row_major);
        }
        __syncwarp();
        /* online softmax of row r over its 32 cells (the pair of lanes agrees on the max) */
        float sv[32], mt = -INFINITY;
#pragma unroll
        for (int j = 0; j < 32; j++) {
            sv[j] = (vis >> j & 1) ? ss[r * L::LDS + 32 * half + j] * a.scale : -INFINITY;
            mt = fmaxf(mt, sv[j]);
        }
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
        const float mn = fmaxf(m, mt);
        const float alpha = m == -INFINITY ? 0.0f : expf(m - mn);
        float ls = 0.0f;
#pragma unroll
        for (int j = 0; j < 32; j += 2) {
            const float p0 = sv[j] == -INFINITY ? 0.0f : expf(sv[j] - mn);
            const float p1 = sv[j + 1] == -INFINITY ? 0.0f : expf(sv[j + 1] - mn);
            ls += p0 + p1;
            *(__half2 *)(ps + r * L::LDP + 32 * half + j) = __floats2half2_rn(p0, p1);
        }
        l = l * alpha + ls;
        m = mn;
        if (alpha != 1.0f) /* the row's max did not move: nothing to rescale */
            for (int d = half * (D / 2); d < (half + 1) * (D / 2); d++) os[r * L::LDO + d] *= alpha;
        __syncwarp();
        /* O (16 rows x D) += P V, P's fragments loaded once per tile */
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fp[ATT_T_C / 16];
#pragma unroll
        for (int k = 0; k < ATT_T_C / 16; k++) wmma::load_matrix_sync(fp[k], ps + 16 * warp * L::LDP + 16 * k, L::LDP);
#pragma unroll
        for (int j = 0; j < D / 16; j++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, os + 16 * warp * L::LDO + 16 * j, L::LDO, wmma::mem_row_major);
#pragma unroll
            for (int k = 0; k < ATT_T_C / 16; k++) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
                wmma::load_matrix_sync(fb, vs + 16 * k * L::LDH + 16 * j, L::LDH);
                wmma::mma_sync(acc, fp[k], fb, acc);
            }
            wmma::store_matrix_sync(os + 16 * warp * L::LDO + 16 * j, acc, L::LDO, wmma::mem_row_major);
        }
        __syncthreads(); /* before the next tile overwrites K, V and the cell data */
    }
    __syncwarp();
    const float lt = l + __shfl_xor_sync(0xffffffffu, l, 1);
    if (r < n_tq) {
        float *orow = a.out + (t0 + r) * a.n_q + (int64_t)h * a.hd;
        const float inv = lt > 0.0f ? 1.0f / lt : 0.0f; /* no visible cell: zeros */
        for (int d = half * (D / 2); d < (half + 1) * (D / 2); d++) orow[d] = os[r * L::LDO + d] * inv;
    }
}

template <int D, int B> static optiml_status att_prompt_tc(cu_ctx *cu, const att_args &a) {
    constexpr size_t smem = att_tc_smem<D>::bytes;
    CU_TRY(cudaFuncSetAttribute(att_tc_kernel<D, B>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    const dim3 grid((unsigned)((a.n_tok + ATT_T_Q - 1) / ATT_T_Q), (unsigned)a.n_head);
    att_tc_kernel<D, B><<<grid, ATT_T_THREADS, smem, cu->stream>>>(a);
    CU_LAUNCHED("attention (prompt, tensor cores)");
    return OPTIML_OK;
}

/* ---- attention: prompt on tensor cores, fragments in registers (mma.sync) -------------- */

/* att_tc_kernel keeps S, P and O in shared memory because WMMA's fragment
 * layout is opaque; with mma.sync.m16n8k16 the layout is documented (PTX ISA,
 * "Matrix fragments for mma.m16n8k16"), so each warp keeps its 16 query rows'
 * scores, weights and output in registers, as FlashAttention-2 does: lane
 * (g = lane / 4, t = lane % 4) holds rows g and g + 8 of the warp's 16, and
 * in each 8-column tile the columns 2t and 2t + 1. The score tile's
 * accumulators are, converted to f16, the A fragments of P V. */

#define ATT_M_Q       64 /* queries per block: 4 warps x 16 rows */
#define ATT_M_C       64 /* cells per tile                        */
#define ATT_M_THREADS 128
#define ATT_M_LOG2E   1.4426950408889634f

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const __half *p) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s)
                 : "memory");
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const __half *p) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s)
                 : "memory");
}

/* d += a b: m16n8k16, f16 inputs, f32 accumulators */
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap(); /* att_run picks this kernel only on compute capability 8.0 and later */
#endif
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi); /* lo in the low half: the lower column */
    return *(const uint32_t *)&h;
}

/* Visibility of this lane's (row, cell) pairs of the tile whose metadata
 * is in cpos/cseq: bit 2 j + e + 16 i: row g + 8 i sees cell 8 j + 2 t + e. */
__device__ __forceinline__ uint32_t att_mma_vis(const int32_t *cpos, const uint64_t *cseq, const int32_t *qp,
                                                const int32_t *qq, int t) {
    uint32_t vis = 0;
#pragma unroll
    for (int j = 0; j < ATT_M_C / 8; j++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int c = 8 * j + 2 * t + e;
            const int32_t cp = cpos[c];
            const uint64_t cq = cseq[c];
#pragma unroll
            for (int i = 0; i < 2; i++)
                if (att_visible(cp, cq, qp[i], qq[i])) vis |= 1u << (2 * j + e + 16 * i);
        }
    return vis;
}

/* One warp, one tile of cells staged as f16 in ks/vs (LD halves a row):
 * S = Q K^T, the online softmax of rows g and g + 8, O += P V. */
template <int D, int LD>
__device__ __forceinline__ void att_mma_tile(const uint32_t (&qf)[D / 16][4], const __half *ks, const __half *vs,
                                             uint32_t vis, float scale, float (&m)[2], float (&l)[2],
                                             float (&o)[D / 8][4], int lane) {
    constexpr int KS = D / 16, NS = ATT_M_C / 8, NO = D / 8;
    const int mi = lane / 8, ri = lane % 8; /* ldmatrix: the matrix and row this lane addresses */
    /* S (16 rows x 64 cells) = Q K^T; a ldmatrix.x4 gives two cell tiles' B */
    float s[NS][4];
#pragma unroll
    for (int j = 0; j < NS; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int k = 0; k < KS; k++)
#pragma unroll
        for (int j = 0; j < NS; j += 2) {
            uint32_t b[4];
            ldsm_x4(b, ks + (8 * (j + (mi >> 1)) + ri) * LD + 16 * k + 8 * (mi & 1));
            mma_16816(s[j], qf[k], b[0], b[1]);
            mma_16816(s[j + 1], qf[k], b[2], b[3]);
        }

    /* online softmax of rows g, g + 8 (the 4 lanes of a row agree on the max) */
    float alpha[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        float mt = -INFINITY;
#pragma unroll
        for (int j = 0; j < NS; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                float &v = s[j][2 * i + e];
                v = (vis >> (2 * j + e + 16 * i) & 1) ? v * scale : -INFINITY;
                mt = fmaxf(mt, v);
            }
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 2));
        const float mn = fmaxf(m[i], mt);
        alpha[i] = m[i] == -INFINITY ? 0.0f : exp2f(m[i] - mn);
        float ls = 0.0f;
#pragma unroll
        for (int j = 0; j < NS; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                float &v = s[j][2 * i + e];
                v = v == -INFINITY ? 0.0f : exp2f(v - mn);
                ls += v;
            }
        l[i] = l[i] * alpha[i] + ls;
        m[i] = mn;
    }
#pragma unroll
    for (int j = 0; j < NO; j++) {
        o[j][0] *= alpha[0];
        o[j][1] *= alpha[0];
        o[j][2] *= alpha[1];
        o[j][3] *= alpha[1];
    }

    /* O (16 rows x D) += P V; P's A fragment for cells 16 k.. is score tiles 2k, 2k + 1 */
#pragma unroll
    for (int k = 0; k < ATT_M_C / 16; k++) {
        const uint32_t pf[4] = {pack_half2(s[2 * k][0], s[2 * k][1]), pack_half2(s[2 * k][2], s[2 * k][3]),
                                pack_half2(s[2 * k + 1][0], s[2 * k + 1][1]),
                                pack_half2(s[2 * k + 1][2], s[2 * k + 1][3])};
#pragma unroll
        for (int j = 0; j < NO; j += 2) {
            uint32_t b[4];
            ldsm_x4_t(b, vs + (16 * k + 8 * (mi & 1) + ri) * LD + 8 * (j + (mi >> 1)));
            mma_16816(o[j], pf, b[0], b[1]);
            mma_16816(o[j + 1], pf, b[2], b[3]);
        }
    }
}

/* Block (64 queries, head h), query tiles from the last (the causal mask
 * gives them the most cells) so the longest blocks start first; a warp
 * per 16 query rows, its Q fragments loaded once (staged through the K
 * buffer). Each visible tile's K and V are loaded (8 float4 of each in
 * flight per thread), converted to f16 into shared memory, then computed
 * (copying the next tile with cp.async during the compute, as f32 in 64
 * KiB more shared memory, measured slower: 48.3 vs 42.3 us for 512
 * tokens x 32 heads, H200). head_dim == D (64 or 128). */
template <int D> __global__ void __launch_bounds__(ATT_M_THREADS) att_mma_kernel(att_args a) {
    constexpr int LD = D + 8; /* halves: rows 16-byte aligned, 8 rows of a ldmatrix in distinct banks */
    constexpr int KS = D / 16, NO = D / 8;
    __shared__ __align__(16) __half ks[ATT_M_C * LD], vs[ATT_M_C * LD];
    __shared__ uint64_t cseq[ATT_M_C];
    __shared__ int32_t cpos[ATT_M_C];

    const int32_t h = blockIdx.y, t0 = ((int32_t)gridDim.x - 1 - (int32_t)blockIdx.x) * ATT_M_Q;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int n_tq = min(ATT_M_Q, a.n_tok - t0);
    const int64_t koff = (int64_t)(h / a.group) * a.hd;

    att_stage_q<D, ATT_M_Q, ATT_M_THREADS, LD>(a, t0, n_tq, h, ks, tid);
    __syncthreads();
    uint32_t qf[KS][4];
    {
        const int mi = lane / 8, ri = lane % 8;
#pragma unroll
        for (int k = 0; k < KS; k++)
            ldsm_x4(qf[k], ks + (16 * warp + ri + 8 * (mi & 1)) * LD + 16 * k + 8 * (mi >> 1));
    }
    __syncthreads(); /* before the first tile overwrites ks */

    int32_t qp[2], qq[2]; /* rows g and g + 8 */
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int r = 16 * warp + g + 8 * i;
        qp[i] = r < n_tq ? a.pos[t0 + r] : -1; /* padding queries see nothing */
        qq[i] = r < n_tq ? a.seq[t0 + r] : 0;
    }
    float o[NO][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < NO; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    const float scale = a.scale * ATT_M_LOG2E; /* exp(x) = exp2(x log2 e) */
    const int64_t n_used = att_n_used(a);
    for (int64_t c0 = 0; c0 < n_used; c0 += ATT_M_C) {
        att_tile_meta<ATT_M_C>(a, c0, n_used, cpos, cseq, tid);
        __syncthreads();
        const uint32_t vis = att_mma_vis(cpos, cseq, qp, qq, t);
        if (!__syncthreads_or(vis != 0)) continue; /* no query here sees this tile */
        att_stage_kv<D, ATT_M_C, ATT_M_THREADS, 8, LD>(a, c0, koff, cpos, ks, vs, tid);
        __syncthreads();
        att_mma_tile<D, LD>(qf, ks, vs, vis, scale, m, l, o, lane);
        __syncthreads(); /* before the next tile overwrites K, V and the cell data */
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        float lt = l[i];
        lt += __shfl_xor_sync(0xffffffffu, lt, 1);
        lt += __shfl_xor_sync(0xffffffffu, lt, 2);
        const int r = 16 * warp + g + 8 * i;
        if (r >= n_tq) continue;
        float *orow = a.out + (t0 + r) * a.n_q + (int64_t)h * a.hd;
        const float inv = lt > 0.0f ? 1.0f / lt : 0.0f; /* no visible cell: zeros */
#pragma unroll
        for (int j = 0; j < NO; j++)
            *(float2 *)(orow + 8 * j + 2 * t) = make_float2(o[j][2 * i] * inv, o[j][2 * i + 1] * inv);
    }
}

template <int D> static optiml_status att_prompt_mma(cu_ctx *cu, const att_args &a) {
    const dim3 grid((unsigned)((a.n_tok + ATT_M_Q - 1) / ATT_M_Q), (unsigned)a.n_head);
    att_mma_kernel<D><<<grid, ATT_M_THREADS, 0, cu->stream>>>(a);
    CU_LAUNCHED("attention (prompt, mma)");
    return OPTIML_OK;
}

/* cu_attention; q8: the caller checked that decode kernel 3 runs and that
 * the matmul scratch holds n_tok x n_head * head_dim quants. */
static optiml_status att_run(cu_ctx *cu, const float *q, const float *k_cache, const float *v_cache, float *out,
                             int32_t n_tok, int32_t n_head, int32_t n_head_kv, int32_t head_dim, uint32_t n_ctx,
                             const struct cu_batch *b, void *scratch, bool q8) {
    if (n_tok < 0 || n_head <= 0 || n_head_kv <= 0 || n_head % n_head_kv != 0 || head_dim <= 0 || head_dim > 256 ||
        n_ctx == 0 || n_head > 65535)
        return optiml_fail(OPTIML_ERR_INVALID_ARG,
                           "cu_attention: bad shape n_tok %d, heads %d/%d, head_dim %d, n_ctx %u", n_tok, n_head,
                           n_head_kv, head_dim, n_ctx);
    if (n_tok == 0) return OPTIML_OK;
    att_args a;
    a.q = q;
    a.k = k_cache;
    a.v = v_cache;
    a.out = out;
    a.out_q = NULL;
    a.out_s = NULL;
    if (q8) cu_mm_q8_ptrs(cu, n_tok, (int64_t)n_head * head_dim, &a.out_q, &a.out_s);
    a.n_tok = n_tok;
    a.n_head = n_head;
    a.group = n_head / n_head_kv;
    a.hd = head_dim;
    a.n_q = (int64_t)n_head * head_dim;
    a.n_kv = (int64_t)n_head_kv * head_dim;
    a.n_ctx = n_ctx;
    a.scale = 1.0f / sqrtf((float)head_dim); /* as attention_run */
    a.pos = b->pos;
    a.seq = b->seq;
    a.cell_pos = b->cell_pos;
    a.cell_seq = b->cell_seq;
    a.n_used = b->n_used;
    const int D = head_dim <= 32 ? 32 : head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256;
    if (n_tok <= ATT_DEC_MAX_TOK) {
        if (!scratch) return optiml_fail(OPTIML_ERR_INVALID_ARG, "cu_attention: no scratch");
        const bool al16 = (((uintptr_t)q | (uintptr_t)k_cache | (uintptr_t)v_cache | (uintptr_t)scratch) & 15) == 0;
        if (cu->tune.att_kernel >= 2 && head_dim == D && al16) {
            switch (D) {
            case 32: return att_decode2<32>(cu, a, scratch, q8);
            case 64: return att_decode2<64>(cu, a, scratch, q8);
            case 128: return att_decode2<128>(cu, a, scratch, q8);
            default: return att_decode2<256>(cu, a, scratch, q8);
            }
        }
        switch (D) {
        case 32:
            return att_decode<32>(cu, a, scratch);
        case 64:
            return att_decode<64>(cu, a, scratch);
        case 128:
            return att_decode<128>(cu, a, scratch);
        default:
            return att_decode<256>(cu, a, scratch);
        }
    }
    const bool al16 = (((uintptr_t)q | (uintptr_t)k_cache | (uintptr_t)v_cache) & 15) == 0;
    if (cu->tune.att_prompt == 4 && cu->cc >= 80 && head_dim == D && (D == 64 || D == 128) && al16 &&
        ((uintptr_t)out & 7) == 0) /* float2 stores */
        return D == 64 ? att_prompt_mma<64>(cu, a) : att_prompt_mma<128>(cu, a);
    if (cu->tune.att_prompt != 1 && cu->tune.att_prompt != 3 && head_dim == D && (D == 64 || D == 128) && al16)
        return D == 64 ? att_prompt_tc<64, 8>(cu, a) : att_prompt_tc<128, 8>(cu, a);
    if (cu->tune.att_prompt == 3 && head_dim == D && (D == 64 || D == 128) && al16)
        return D == 64 ? att_prompt_tc<64, 1>(cu, a) : att_prompt_tc<128, 1>(cu, a);
    switch (D) {
    case 32:
        return att_prompt<32>(cu, a);
    case 64:
        return att_prompt<64>(cu, a);
    case 128:
        return att_prompt<128>(cu, a);
    default:
        return att_prompt<256>(cu, a);
    }
}

extern "C" optiml_status cu_attention(cu_ctx *cu, const float *q, const float *k_cache, const float *v_cache,
                                      float *out, int32_t n_tok, int32_t n_head, int32_t n_head_kv, int32_t head_dim,
                                      uint32_t n_ctx, const struct cu_batch *b, void *scratch) {
    return att_run(cu, q, k_cache, v_cache, out, n_tok, n_head, n_head_kv, head_dim, n_ctx, b, scratch, false);
}

extern "C" optiml_status cu_attention_q8(cu_ctx *cu, const float *q, const float *k_cache, const float *v_cache,
                                         float *out, int32_t n_tok, int32_t n_head, int32_t n_head_kv,
                                         int32_t head_dim, uint32_t n_ctx, const struct cu_batch *b, void *scratch,
                                         bool *quantized) {
    /* the conditions under which att_run reaches decode kernel 3 */
    const int D = head_dim <= 32 ? 32 : head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256;
    const bool al16 = (((uintptr_t)q | (uintptr_t)k_cache | (uintptr_t)v_cache | (uintptr_t)scratch) & 15) == 0;
    const int64_t n_q = (int64_t)n_head * head_dim;
    *quantized = cu->tune.att_kernel == 3 && n_tok >= 1 && n_tok <= ATT_DEC_MAX_TOK && head_dim == D &&
                 head_dim % 32 == 0 && al16 && (int64_t)n_tok * n_head <= CU_ATT_DONE_MAX && cu->mm_xq &&
                 n_tok <= cu->mm_batch && n_q <= cu->mm_in_max;
    return att_run(cu, q, k_cache, v_cache, out, n_tok, n_head, n_head_kv, head_dim, n_ctx, b, scratch, *quantized);
}
