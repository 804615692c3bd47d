/*
 * quant_tool.c - test-only executable exposing the reference quantizers of
 * src/quant.c to the Python tests (tests/python/test_quant_formats.py),
 * which compare them with gguf-py's numpy implementation:
 *
 *   quant_tool dequantize TYPE IN.bin OUT.f32   blocks -> float32
 *   quant_tool quantize   TYPE IN.f32 OUT.bin   float32 -> blocks
 *
 * TYPE is a name such as q4_k. Exits 1 with a message on bad input.
 */
#include "dtype.h"
#include "quant.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void *read_all(const char *path, long *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *size = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = malloc((size_t)*size + 1);
    if (buf && fread(buf, 1, (size_t)*size, f) != (size_t)*size) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    return buf;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: quant_tool dequantize|quantize TYPE IN OUT\n");
        return 1;
    }
    const int type = dtype_from_name(argv[2]);
    const bool deq = strcmp(argv[1], "dequantize") == 0;
    if (type < 0 || (deq ? !quant_dequantizer((uint32_t)type) : !quant_quantizer((uint32_t)type))) {
        fprintf(stderr, "quant_tool: no %s for type '%s'\n", argv[1], argv[2]);
        return 1;
    }
    long size = 0;
    void *in = read_all(argv[3], &size);
    if (!in) {
        fprintf(stderr, "quant_tool: cannot read %s\n", argv[3]);
        return 1;
    }
    const long bs = dtype_block_size((uint32_t)type), ts = dtype_type_size((uint32_t)type);
    long n_blocks = deq ? size / ts : size / 4 / bs;
    if ((deq && size % ts) || (!deq && size % (4 * bs))) {
        fprintf(stderr, "quant_tool: %s: size %ld is not a whole number of blocks\n", argv[3], size);
        return 1;
    }
    const size_t out_size = (size_t)(deq ? n_blocks * bs * 4 : n_blocks * ts);
    void *out = malloc(out_size + 1);
    if (deq) quant_dequantizer((uint32_t)type)(n_blocks * bs, in, out);
    else quant_quantizer((uint32_t)type)(n_blocks * bs, in, out);
    FILE *f = fopen(argv[4], "wb");
    if (!f || fwrite(out, 1, out_size, f) != out_size) {
        fprintf(stderr, "quant_tool: cannot write %s\n", argv[4]);
        return 1;
    }
    fclose(f);
    free(in);
    free(out);
    return 0;
}
