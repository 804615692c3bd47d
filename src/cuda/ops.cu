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
 *     online softmax in shared memory; tiles no query of the block sees (the
 *     causal future, other sequences) are skipped.
 */
#include "common.cuh"

#include <math.h>

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

#define ROPE_THREADS   256
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

/* One block per batch entry: cos/sin of its position (as rope_prepare:
 * float angle pos * inv_freq[i], cosf/sinf), then q and k heads rotated in
 * place, k and v copied into the entry's cell. */
__global__ void __launch_bounds__(ROPE_THREADS)
    rope_store_kernel(float *__restrict__ q, float *__restrict__ k, const float *__restrict__ v,
                      float *__restrict__ k_cache, float *__restrict__ v_cache, int32_t n_head, int32_t n_head_kv,
                      int32_t head_dim, int32_t n_rot, const float *__restrict__ inv_freq,
                      const int32_t *__restrict__ pos, const int32_t *__restrict__ cell) {
    __shared__ float cs[ROPE_MAX_PAIRS][2];
    const int32_t t = blockIdx.x, half = head_dim / 2, n_pair_rot = n_rot / 2;
    const int64_t n_q = (int64_t)n_head * head_dim, n_kv = (int64_t)n_head_kv * head_dim;
    const float p = (float)pos[t];
    for (int i = threadIdx.x; i < n_pair_rot; i += blockDim.x) {
        const float a = p * inv_freq[i];
        cs[i][0] = cosf(a);
        cs[i][1] = sinf(a);
    }
    __syncthreads();
    float *qt = q + t * n_q, *kt = k + t * n_kv;
    float *kc = k_cache + (int64_t)cell[t] * n_kv, *vc = v_cache + (int64_t)cell[t] * n_kv;
    for (int64_t i = threadIdx.x; i < (int64_t)n_head * half; i += blockDim.x) {
        const int32_t j = (int32_t)(i % half);
        if (j < n_pair_rot) rope_pair(qt + 2 * i, cs[j][0], cs[j][1], NULL);
    }
    for (int64_t i = threadIdx.x; i < (int64_t)n_head_kv * half; i += blockDim.x) {
        const int32_t j = (int32_t)(i % half);
        if (j < n_pair_rot) {
            rope_pair(kt + 2 * i, cs[j][0], cs[j][1], kc + 2 * i);
        } else {
            kc[2 * i] = kt[2 * i];
            kc[2 * i + 1] = kt[2 * i + 1];
        }
    }
    const float *vt = v + t * n_kv;
    for (int64_t i = threadIdx.x; i < n_kv; i += blockDim.x) vc[i] = vt[i];
}

extern "C" optiml_status cu_rope_store(cu_ctx *cu, float *q, float *k, const float *v, float *k_cache, float *v_cache,
                                       int32_t n_tok, int32_t n_head, int32_t n_head_kv, int32_t head_dim,
                                       int32_t n_rot, const float *inv_freq, const struct cu_batch *b) {
    if (n_tok < 0 || n_head <= 0 || n_head_kv <= 0 || head_dim <= 0 || head_dim % 2 != 0 ||
        head_dim > 2 * ROPE_MAX_PAIRS || n_rot < 0 || n_rot % 2 != 0 || n_rot > head_dim)
        return optiml_fail(OPTIML_ERR_INVALID_ARG,
                           "cu_rope_store: bad shape n_tok %d, heads %d/%d, head_dim %d, n_rot %d", n_tok, n_head,
                           n_head_kv, head_dim, n_rot);
    if (n_tok == 0) return OPTIML_OK;
    rope_store_kernel<<<(unsigned)n_tok, ROPE_THREADS, 0, cu->stream>>>(q, k, v, k_cache, v_cache, n_head, n_head_kv,
                                                                        head_dim, n_rot, inv_freq, b->pos, b->cell);
    CU_LAUNCHED("rope_store");
    return OPTIML_OK;
}

/* ---- attention: shared pieces ---------------------------------------------------- */

#define ATT_DEC_MAX_TOK 8   /* n_tok up to this: the decode kernels       */
#define ATT_DEC_WARPS   4   /* warps of a decode block                    */
#define ATT_DEC_CPW     4   /* cells a warp has in flight at once          */
#define ATT_CHUNK_MAX   256 /* cells per decode block, at most...          */
#define ATT_CHUNK_MIN   64  /* ...and at least (bounds the scratch)       */
#define ATT_PQ          64  /* prompt: queries per block                   */
#define ATT_PC          64  /* prompt: cells per tile                       */
#define ATT_P_THREADS   256 /* prompt: 16 x 16 threads, 4 x 4 scores each  */

struct att_args {
    const float *q, *k, *v;
    float *out;
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
    while (chunk > ATT_CHUNK_MIN && (int64_t)n_tok * n_head * ((n_ctx + chunk - 1) / chunk) < want) chunk /= 2;
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
#pragma unroll
        for (int j = 0; j < ATT_DEC_CPW; j++) {
            const int i = i0 + j;
            const int64_t c = c0 + i;
            if (i < n_c && att_visible(a.cell_pos[c], a.cell_seq[c], pos, seq)) vis |= 1u << j;
            dot[j] = 0.0f;
            if (vis >> j & 1) {
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
            if (w != 0.0f) {
                const float *vr = v + (int64_t)i * a.n_kv;
#pragma unroll
                for (int e = 0; e < E; e++)
                    if (lane + 32 * e < a.hd) acc[e] += w * vr[lane + 32 * e];
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

extern "C" optiml_status cu_attention(cu_ctx *cu, const float *q, const float *k_cache, const float *v_cache,
                                      float *out, int32_t n_tok, int32_t n_head, int32_t n_head_kv, int32_t head_dim,
                                      uint32_t n_ctx, const struct cu_batch *b, void *scratch) {
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
