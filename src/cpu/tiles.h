/*
 * tiles.h - the kernels the tile templates give, written once for
 * ops_avx2.c and ops_avx512.c. The includer defines, before including it,
 * TILE_SFX (its table's suffix: avx2, avx512) and the templates
 * tile_q4_0_q8_0(R, T, PF, Q8, ...), tile_q4_K(R, T, PF, ...) and
 * tile_q6_K(R, T, PF, ...) (R weight rows x T inputs; PF: the bytes past
 * what it reads that it asks for, 0 = none; then n, w, w_stride, xq,
 * xq_stride, out). The includer defines OPTIML_PREFETCH_AHEAD, decode's
 * read-ahead. For each of q4_0, q8_0, q4_K and q6_K (static):
 *   dot_T_SFX          1x1 with read-ahead (dot_q)
 *   dot_T_next_SFX     1x1 asking for another row (dot_q_next)
 *   dot_T_x4_SFX       1x4 (dot_q_x4)
 *   dot_T_2x1_SFX, dot_T_2x4_SFX   the 2-row tiles
 */
#ifndef OPTIML_CPU_TILES_H
#define OPTIML_CPU_TILES_H

#define TILE_INSTANCES(NAME, CALL, SFX) TILE_INSTANCES_(NAME, CALL, SFX) /* expands SFX */
#define TILE_INSTANCES_(NAME, CALL, SFX)                                                                               \
    static float dot_##NAME##_##SFX(int64_t n, const void *w, const void *xq) {                                        \
        float o;                                                                                                       \
        CALL(1, 1, OPTIML_PREFETCH_AHEAD, n, w, 0, xq, 0, &o);                                                         \
        return o;                                                                                                      \
    }                                                                                                                  \
    static float dot_##NAME##_next_##SFX(int64_t n, const void *w, const void *xq, const void *next) {                 \
        float o;                                                                                                       \
        CALL(1, 1, next ? (uintptr_t)next - (uintptr_t)w : 0, n, w, 0, xq, 0, &o);                                     \
        return o;                                                                                                      \
    }                                                                                                                  \
    static void dot_##NAME##_x4_##SFX(int64_t n, const void *w, const void *xq, uint64_t xs, float out[4]) {           \
        CALL(1, 4, 0, n, w, 0, xq, xs, out);                                                                           \
    }                                                                                                                  \
    static void dot_##NAME##_2x1_##SFX(int64_t n, const void *w, uint64_t ws, const void *xq, uint64_t xs,             \
                                       float *out) {                                                                   \
        CALL(2, 1, 0, n, w, ws, xq, xs, out);                                                                          \
    }                                                                                                                  \
    static void dot_##NAME##_2x4_##SFX(int64_t n, const void *w, uint64_t ws, const void *xq, uint64_t xs,             \
                                       float *out) {                                                                   \
        CALL(2, 4, 0, n, w, ws, xq, xs, out);                                                                          \
    }

#define CALL_Q4_0(R, T, PF, ...) tile_q4_0_q8_0(R, T, PF, false, __VA_ARGS__)
#define CALL_Q8_0(R, T, PF, ...) tile_q4_0_q8_0(R, T, PF, true, __VA_ARGS__)
TILE_INSTANCES(q4_0, CALL_Q4_0, TILE_SFX)
TILE_INSTANCES(q8_0, CALL_Q8_0, TILE_SFX)
TILE_INSTANCES(q4_K, tile_q4_K, TILE_SFX)
TILE_INSTANCES(q6_K, tile_q6_K, TILE_SFX)

#endif
