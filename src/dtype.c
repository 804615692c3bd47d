/*
 * dtype.c - the table of GGUF tensor types (block size, bytes per block).
 */
#include "dtype.h"

#include <strings.h>

struct dtype_info {
    const char *name;
    uint32_t block_size;
    uint32_t type_size;
};

static const struct dtype_info dtype_table[DTYPE_COUNT] = {
    [DTYPE_F32] = {"f32", 1, 4},         [DTYPE_F16] = {"f16", 1, 2},
    [DTYPE_Q4_0] = {"q4_0", 32, 18},     [DTYPE_Q4_1] = {"q4_1", 32, 20},
    [DTYPE_Q5_0] = {"q5_0", 32, 22},     [DTYPE_Q5_1] = {"q5_1", 32, 24},
    [DTYPE_Q8_0] = {"q8_0", 32, 34},     [DTYPE_Q8_1] = {"q8_1", 32, 36},
    [DTYPE_Q2_K] = {"q2_k", 256, 84},    [DTYPE_Q3_K] = {"q3_k", 256, 110},
    [DTYPE_Q4_K] = {"q4_k", 256, 144},   [DTYPE_Q5_K] = {"q5_k", 256, 176},
    [DTYPE_Q6_K] = {"q6_k", 256, 210},   [DTYPE_Q8_K] = {"q8_k", 256, 292},
    [DTYPE_IQ2_XXS] = {"iq2_xxs", 256, 66}, [DTYPE_IQ2_XS] = {"iq2_xs", 256, 74},
    [DTYPE_IQ3_XXS] = {"iq3_xxs", 256, 98}, [DTYPE_IQ1_S] = {"iq1_s", 256, 50},
    [DTYPE_IQ4_NL] = {"iq4_nl", 32, 18}, [DTYPE_IQ3_S] = {"iq3_s", 256, 110},
    [DTYPE_IQ2_S] = {"iq2_s", 256, 82},  [DTYPE_IQ4_XS] = {"iq4_xs", 256, 136},
    [DTYPE_I8] = {"i8", 1, 1},           [DTYPE_I16] = {"i16", 1, 2},
    [DTYPE_I32] = {"i32", 1, 4},         [DTYPE_I64] = {"i64", 1, 8},
    [DTYPE_F64] = {"f64", 1, 8},         [DTYPE_IQ1_M] = {"iq1_m", 256, 56},
    [DTYPE_BF16] = {"bf16", 1, 2},       [DTYPE_TQ1_0] = {"tq1_0", 256, 54},
    [DTYPE_TQ2_0] = {"tq2_0", 256, 66},  [DTYPE_MXFP4] = {"mxfp4", 32, 17},
};

bool dtype_is_known(uint32_t t) { return t < DTYPE_COUNT && dtype_table[t].name != NULL; }

uint32_t dtype_block_size(uint32_t t) { return dtype_is_known(t) ? dtype_table[t].block_size : 0; }

uint32_t dtype_type_size(uint32_t t) { return dtype_is_known(t) ? dtype_table[t].type_size : 0; }

const char *dtype_name(uint32_t t) { return dtype_is_known(t) ? dtype_table[t].name : "unknown"; }

int dtype_from_name(const char *name) {
    for (int t = 0; t < DTYPE_COUNT; t++)
        if (dtype_table[t].name && strcasecmp(dtype_table[t].name, name) == 0) return t;
    return -1;
}

bool dtype_row_size(uint32_t t, uint64_t n, uint64_t *out) {
    if (!dtype_is_known(t)) return false;
    uint64_t bs = dtype_table[t].block_size;
    if (n % bs != 0) return false;
    return !__builtin_mul_overflow(n / bs, (uint64_t)dtype_table[t].type_size, out);
}
