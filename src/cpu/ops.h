/*
 * ops.h - CPU kernels: dot products and row conversion per weight type
 * (reference C and SIMD variants chosen at run time), and the elementwise
 * ops of the Llama forward pass.
 *
 * Every SIMD kernel has a scalar twin in cpu_kernels_ref() (the prompt
 * GEMM: cpu_gemm_ref); tests/test_ops.c compares them on fresh random
 * inputs.
 */
#ifndef OPTIML_CPU_OPS_H
#define OPTIML_CPU_OPS_H

#include "dtype.h"

#include <stdbool.h>
#include <stdint.h>

/* sum_i w[i] * x[i] for a weight row of type T and n f32 activations. */
typedef float (*cpu_dot_fn)(int64_t n, const void *w, const float *x);
/* dst[i] = (float)src[i] for a row of n elements of type T (dequantize). */
typedef void (*cpu_to_f32_fn)(int64_t n, const void *src, float *dst);
/* Quantized weight row of type T (n values) dot an activation row already
 * quantized to vec_dot_type[T] (q8_0, q8_1 or q8_k blocks of n values). */
typedef float (*cpu_dot_q_fn)(int64_t n, const void *w, const void *xq);
/* dot_q of one scattered row that also asks for the row `next` (NULL:
 * none), a cache line at a time as it reads w (the sparse FFN's gathers:
 * the next neuron's row, spread over this row's work instead of asked for
 * at once), and reads nothing past w. Equal bits to dot_q. */
typedef float (*cpu_dot_q_next_fn)(int64_t n, const void *w, const void *xq, const void *next);
/* dot_q given also the q8_0 input's block summaries xi (cpu_gemm_prep_q8_0,
 * once per input row): the input's scales as f32 and q4_0's -8 term are
 * read, not worked out again for every row. next: NULL for rows read in
 * order (dot_q's read-ahead), else a row to ask for at the same offsets as
 * it reads, as dot_q_next (w itself: nothing more). q4_0 and q8_0 weights;
 * within float rounding of dot_q, not its bits (the -8 term is summed on
 * its own); the same bits whatever next is. */
struct cpu_gemm_xblock;
typedef float (*cpu_dot_q_xi_fn)(int64_t n, const void *w, const void *xq, const struct cpu_gemm_xblock *xi,
                                 const void *next);
/* dot_q_xi of n_rows rows read in order (row r at w + r * w_stride)
 * against one input: out[r]. Four rows a step share the input's loads and
 * one horizontal sum; for short rows (the predictor's fc2, 160 values),
 * where a call and a sum per row cost as much as the row. Within float
 * rounding of dot_q, as dot_q_xi (not its bits: one accumulator a row). */
typedef void (*cpu_dot_q_xi_rows_fn)(int64_t n, const void *w, uint64_t w_stride, int64_t n_rows, const void *xq,
                                     const struct cpu_gemm_xblock *xi, float *out);
/* The same for 4 input rows at once (xq, xq + xq_stride, ...: quantized
 * rows of a batch): out[k] = dot_q(n, w, row k). A weight row is unpacked
 * once for the 4 rows; the result equals 4 dot_q calls of the same table
 * bit for bit. Used for prompt processing. */
typedef void (*cpu_dot_q_x4_fn)(int64_t n, const void *w, const void *xq, uint64_t xq_stride, float out[4]);
/* A tile of 2 weight rows (w, w + w_stride) times T quantized input rows
 * (xq, xq + xq_stride, ...): out[r * T + t] = dot_q(n, row r, input t),
 * equal to dot_q of the same table bit for bit. Prompts: 2x4 for 4 tokens
 * at a time, 2x1 for the rest (decode keeps dot_q: two weight streams at
 * once read memory slower, see ops_avx2.c). */
typedef void (*cpu_dot_q_tile_fn)(int64_t n, const void *w, uint64_t w_stride, const void *xq, uint64_t xq_stride,
                                  float *out);
/* Prompt GEMM on a repacked panel: 8 weight rows (w, w + w_stride, ...;
 * n_rows of them, 1..8) are repacked into `panel` (cpu_gemm_panel_size(n)
 * bytes, 32-byte aligned, the caller's per-thread scratch) so that one
 * vector holds a few values of all 8 rows, then multiplied with n_tok
 * quantized input rows (xq + t * xq_stride): y[t * y_stride + r] = (or +=,
 * with accumulate) dot_q(n, row r, input t). xi: q8_0 inputs' blocks
 * prepared by cpu_gemm_prep_q8_0 (n_tok rows of n / 32), NULL for the
 * others. Not bit-identical to dot_q: each block's integer sum is exact,
 * but the blocks are summed in another order (tests/test_ops.c states the
 * tolerance). Used for batches of cpu_gemm_min_tokens(T) or more. */
struct cpu_gemm_xblock {
    float d;  /* the block's scale as f32 */
    float m8; /* -8 d (sum of its 32 quants), exact (11 x 12 bits): the
                 term of q4_0's -8 offset */
};
typedef void (*cpu_gemm_fn)(int64_t n, const void *w, uint64_t w_stride, int n_rows, const void *xq,
                            uint64_t xq_stride, const struct cpu_gemm_xblock *xi, int64_t n_tok, float *y,
                            uint64_t y_stride, bool accumulate, void *panel);
#define CPU_GEMM_ROWS 8
/* The fewest inputs for which gemm[type] beats the tiles: on a 2-core
 * Zen 3, q4_0 / q8_0 from 4 (1.7x / 1.2x there), q4_k / q6_k from 8
 * (1.35x; at 4 their repacking, sub-block scales included, cancels the
 * gain). */
#define CPU_GEMM_MIN_TOKENS 4
static inline int64_t cpu_gemm_min_tokens(uint32_t type) {
    return type == DTYPE_Q4_K || type == DTYPE_Q6_K ? 8 : CPU_GEMM_MIN_TOKENS;
}
/* 9 bytes a value for q4_0 / q8_0, 11.25 for q4_k / q6_k (ops_avx2.c);
 * gemm_x16's 16 rows (ops_avx512.c): 18 for q4_0, 20.5 for q4_k; 64-byte
 * aligned */
static inline uint64_t cpu_gemm_panel_size(int64_t n) { return 21 * (uint64_t)n + 64; }
/* The per-block scale and offset term of a q8_0 row of n values. */
void cpu_gemm_prep_q8_0(int64_t n, const void *xq, struct cpu_gemm_xblock *dst);
/* The scalar twin of gemm[type] (no panel): dot_q of the reference table
 * for every (row, input) pair. */
void cpu_gemm_ref(uint32_t type, int64_t n, const void *w, uint64_t w_stride, int n_rows, const void *xq,
                  uint64_t xq_stride, int64_t n_tok, float *y, uint64_t y_stride, bool accumulate);

/* Weights repacked at load (model.c, cpu_pack_x8), for decode: 8 rows
 * interleaved block by block. q4_0: 144 bytes a block of the 8 rows (what
 * their 8 blocks take in the file):
 *   uint16_t d[8]       the rows' f16 scales
 *   uint8_t q[4][32]    q[g][4r + j] = byte 4g + j of row r's qs
 * One 32-byte load of q[g] holds, one row per int32 lane, values 4g..4g+3
 * (low nibbles) and 16+4g..19+4g (high nibbles) of the 8 rows; the input's
 * bytes 4g..4g+3 (or 16+4g..) broadcast to every lane give 8 rows' 4-value
 * dots in one product-sum, and one FMA a block scales the 8 rows' sums:
 * no horizontal sums, and a third of the instructions of a row at a time
 * (dot_q_xi). A panel is the nb blocks of its 8 rows in order. */
struct cpu_x8_q4_0 {
    uint16_t d[8];
    uint8_t q[4][32];
};
/* q4_k: 1184 bytes a block of the 8 rows (their 8 blocks: 1152), the
 * 6-bit scales and mins unpacked:
 *   uint16_t d[8], dmin[8]
 *   uint8_t sc[8][8]       sc[j][r] = row r's scale of sub-block j
 *   uint8_t mn[4][16]      mn[k][2r + e] = row r's min of sub-block 2k + e
 *   uint8_t q[4][8][32]    q[c][g][4r + j] = byte 32c + 4g + j of row r's
 *                          qs (low nibble: sub-block 2c, high: 2c + 1)
 * mn as int16 pairs meets the input's 32-value sums two sub-blocks at a
 * time in one multiply-add. */
struct cpu_x8_q4_K {
    uint16_t d[8], dmin[8];
    uint8_t sc[8][8];
    uint8_t mn[4][16];
    uint8_t q[4][8][32];
};
#define CPU_X8_ROWS 8
/* Repack rows w, w + w_stride, ... (8 of them, n values each) of type
 * `type` into one panel dst (cpu_x8_panel_size(type, n) bytes). false if
 * the type has no x8 layout (q4_0 and q4_k have). */
bool cpu_pack_x8(uint32_t type, int64_t n, const void *w, uint64_t w_stride, void *dst);
/* Bytes of one panel of 8 rows of n values; 0 if the type has none. */
uint64_t cpu_x8_panel_size(uint32_t type, int64_t n);
/* Decode on panels: out[8k + r] = row r of panel k (k < n_panels; the
 * panels one after another from p) times one input row xq of the type's
 * vec_dot_type. q4_0: xi holds the q8_0 input's block summaries
 * (cpu_gemm_prep_q8_0); per row and block the integer sum is exact, acc
 * += (dw dx) sum, and the -8 term is summed apart (m8 dw) and added last.
 * q4_k (xi unused): per row and block isum = sum_j sc_j (q x over
 * sub-block j) and msum = sum_j m_j (x over sub-block j), exact; acc +=
 * (d dx) isum, then acc -= (dmin dx) msum. Within float rounding of
 * dot_q, not its bits (tests/test_ops.c states the tolerance). */
typedef void (*cpu_gemv_x8_fn)(int64_t n, const void *p, int64_t n_panels, const void *xq,
                               const struct cpu_gemm_xblock *xi, float *out);
/* Quantize n activations (a multiple of the block size) into blocks. */
typedef void (*cpu_quantize_fn)(int64_t n, const float *x, void *dst);
/* y[i] += a * w[i] for a weight row (or whole blocks of one) of type T:
 * the sparse FFN's down step, one neuron-major row per active neuron. */
typedef void (*cpu_axpy_fn)(int64_t n, float a, const void *w, float *y);
/* y[i] += a[0] w[0][i] + a[1] w[1][i] + a[2] w[2][i] + a[3] w[3][i]: four
 * rows of type T in one pass over y (one load and store of y per four rows
 * instead of per row): the down step of four active neurons. next: NULL,
 * or four more rows of type T (the next group) that the SIMD kernels ask
 * for a cache line at a time as they read w (the scalar ones ignore it);
 * it never changes y. */
typedef void (*cpu_axpy4_fn)(int64_t n, const float a[4], const void *const w[4], float *y,
                             const void *const next[4]);

/* The prompt attention's steps on a group of 4 batch entries (context.c):
 * dot_f32_4x: out[k] = dot(n, w, x + k * x_stride) for k < 4 (a key row
 * and 4 query rows, the key read once), within float rounding of the
 * table's dot[DTYPE_F32] (tests/test_ops.c: 1e-5 of sum |w x|);
 * axpy_f32_4y: y + k * y_stride += a[k] * v for k < 4 (a value row into 4
 * outputs, read once), each output bit for bit what the same table's
 * axpy[DTYPE_F32] gives it. */
typedef void (*cpu_dot_f32_4x_fn)(int64_t n, const float *w, const float *x, uint64_t x_stride, float out[4]);
typedef void (*cpu_axpy_f32_4y_fn)(int64_t n, const float a[4], const float *v, float *y, uint64_t y_stride);

/* Matrix-vector products take one of two paths per weight type T:
 *   vec_dot_type[T] == DTYPE_F32: dot[T](n, w_row, x) on f32 activations
 *     (f32, f16, bf16 weights);
 *   otherwise: quantize[vec_dot_type[T]] once per input row, then
 *     dot_q[T](n, w_row, x_q) (quantized weights, as ggml does: q4_0, q5_0,
 *     q8_0 with q8_0 activations; q4_1, q5_1 with q8_1; k-quants with q8_k). */
struct cpu_kernels {
    const char *name;                       /* "ref", "avx2", "avx512vnni"  */
    cpu_dot_fn dot[DTYPE_COUNT];            /* NULL where the type has none */
    cpu_to_f32_fn to_f32[DTYPE_COUNT];      /* NULL where the type has none */
    uint32_t vec_dot_type[DTYPE_COUNT];     /* activation type of dot_q[T]  */
    cpu_dot_q_fn dot_q[DTYPE_COUNT];        /* NULL where the type has none */
    cpu_dot_q_x4_fn dot_q_x4[DTYPE_COUNT];  /* optional: NULL = 4 dot_q      */
    cpu_dot_q_tile_fn dot_q_2x1[DTYPE_COUNT]; /* optional: 2 rows x 1 input */
    cpu_dot_q_tile_fn dot_q_2x4[DTYPE_COUNT]; /* optional: 2 rows x 4 inputs */
    cpu_dot_q_next_fn dot_q_next[DTYPE_COUNT]; /* optional: NULL = dot_q */
    cpu_dot_q_xi_fn dot_q_xi[DTYPE_COUNT];  /* optional: NULL = dot_q      */
    cpu_dot_q_xi_rows_fn dot_q_xi_rows[DTYPE_COUNT]; /* optional, with dot_q_xi */
    cpu_gemm_fn gemm[DTYPE_COUNT];          /* optional: NULL = the tiles  */
    cpu_gemv_x8_fn gemv_x8[DTYPE_COUNT];    /* decode on x8 panels, where
                                               the type has the layout    */
    cpu_gemm_fn gemm_x8[DTYPE_COUNT];       /* the prompt GEMM on one x8
                                               panel (w; w_stride unused,
                                               n_rows 8); NULL in the
                                               scalar table: model.c
                                               repacks only where both are */
    cpu_gemm_fn gemm_x16[DTYPE_COUNT];      /* optional: the prompt GEMM on
                                               two consecutive x8 panels
                                               (16 rows; w the first) */
    cpu_quantize_fn quantize[DTYPE_COUNT];  /* activation quantizers        */
    cpu_axpy_fn axpy[DTYPE_COUNT];          /* f32, f16, q8_0, q4_0; NULL:
                                               to_f32, then a loop         */
    cpu_axpy4_fn axpy4[DTYPE_COUNT];        /* where axpy is; NULL: 4 axpy */
    cpu_dot_f32_4x_fn dot_f32_4x;           /* ref (4 dot / axpy calls) */
    cpu_axpy_f32_4y_fn axpy_f32_4y;         /* and avx2; NULL: per entry */
};

/* True if weights of type t can be multiplied (either path above). */
static inline bool cpu_kernels_can_matmul(const struct cpu_kernels *k, uint32_t t) {
    if (t >= DTYPE_COUNT) return false;
    if (k->vec_dot_type[t] == DTYPE_F32) return k->dot[t] != NULL;
    return k->dot_q[t] != NULL && k->quantize[k->vec_dot_type[t]] != NULL;
}

/* The scalar reference kernels (every supported type). */
const struct cpu_kernels *cpu_kernels_ref(void);
/* dst's entries replaced by src's non-NULL ones (a dot_q's tiles with it,
 * NULL or not: they must give its bits), and dst's name by src's; src
 * NULL: nothing. */
void cpu_kernels_merge(struct cpu_kernels *dst, const struct cpu_kernels *src);
/* The fastest kernels this CPU runs (checked with cpuid once). */
const struct cpu_kernels *cpu_kernels_best(void);
#if defined(OPTIML_X86)
/* cpuid (and the OS's saved-state flags) say AVX2, FMA and F16C run here. */
bool cpu_has_avx2_fma_f16c(void);
/* AVX2+FMA+F16C variants (entries NULL fall back to ref; vec_dot_type is
 * always ref's); NULL if the CPU lacks the instructions. */
const struct cpu_kernels *cpu_kernels_avx2(void);
/* cpuid and XCR0 (the OS saves opmask and ZMM state) say AVX-512 F, BW,
 * VL and VNNI run here. */
bool cpu_has_avx512vnni(void);
/* AVX-512 (F/BW/VL/VNNI) variants of the hot quantized dots, as above;
 * NULL if the CPU or the OS lacks them. */
const struct cpu_kernels *cpu_kernels_avx512vnni(void);
#endif

/* ---- elementwise ops (scalar, cheap next to the matrix work) ---------- */

/* out = x / rms(x) * w */
void ops_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps);
/* In place, one head of head_dim values: rotate pairs (2i, 2i+1) for
 * i < n_rot/2 by angle pos * inv_freq[i] (cos_sin holds cos, sin pairs). */
void ops_rope(float *x, const float *cos_sin, int64_t n_rot);
/* The same rotation on pairs (i, i + n_rot/2) (GPT-NeoX's layout: qwen2). */
void ops_rope_neox(float *x, const float *cos_sin, int64_t n_rot);
/* y[i] += x[i] */
void ops_add(float *y, const float *x, int64_t n);
/* In place softmax over n values. */
void ops_softmax(float *x, int64_t n);

enum ffn_act {
    FFN_ACT_SILU = 0,
    FFN_ACT_RELU = 1,
    FFN_ACT_RELU2 = 2, /* squared ReLU */
    FFN_ACT_GELU = 3,  /* tanh approximation */
    FFN_ACT_DRELU = 4, /* relu(gate) * relu(up) (Bamboo, TurboSparse) */
    FFN_ACT_RELU_NOGATE = 5, /* relu(up); the model has no gate matrix */
};
/* gate[i] = act(gate[i]) * up[i] (RELU_NOGATE: gate[i] = relu(up[i]), the
 * gate input is not read) */
void ops_act_mul(float *gate, const float *up, int64_t n, enum ffn_act act);
/* FATReLU's cut: x[i] = x[i] > t ? x[i] : 0 (applied to the gate, or to up
 * without a gate, before ops_act_mul when optiml.sparse.act_threshold > 0) */
void ops_threshold(float *x, int64_t n, float t);
/* True for the activations that are exactly zero for gate (up) <= 0. */
static inline bool ffn_act_is_relu(enum ffn_act a) {
    return a == FFN_ACT_RELU || a == FFN_ACT_RELU2 || a == FFN_ACT_DRELU || a == FFN_ACT_RELU_NOGATE;
}

#endif /* OPTIML_CPU_OPS_H */
