/*
 * optiml-random-model - write a Llama-shaped GGUF with random weights, for
 * benchmarks and tests that need a model of a given size (no download).
 *
 *   optiml-random-model --outfile M.gguf [--n-embd 4096] [--n-layer 32]
 *       [--n-ff 11008] [--n-head 32] [--n-head-kv 32] [--n-vocab 32000]
 *       [--ctx 4096] [--type f32|f16|bf16|q4_0|q8_0|...] [--act silu|relu|relu2]
 *       [--arch llama|qwen2] [--seed N]
 *       [--chat-template FILE]
 *
 * Weights are uniform in +-sqrt(3 / n_in) (unit-variance outputs), norms 1.
 * --arch qwen2 writes qwen2.* keys and f32 q/k/v biases uniform in +-1.
 * Quantized types are quantized row by row as they are written (the
 * reference quantizers of src/quant.c), so a 13B-shaped q4_0 model needs
 * neither an f16 copy nor much memory.
 * The vocabulary is synthetic: <unk>, <s>, </s>, 256 byte tokens, then
 * pieces "▁t<i>".
 */
#define _POSIX_C_SOURCE 200809L
#include "dtype.h"
#include "gguf.h"
#include "quant.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct fill_args {
    uint32_t type;
    uint64_t n_in;
    uint64_t seed;
    bool ones;
};

/* Quantized tensors: rows split over threads, each row from its own
 * generator (seeded by tensor and row), quantized by the reference
 * quantizer. */
struct qfill {
    const struct fill_args *a;
    char *dst;
    uint64_t row, n_rows, r0, r1;
    int err;
};

static void *qfill_run(void *arg) {
    struct qfill *q = arg;
    const quant_quantize_fn quantize = quant_quantizer(q->a->type);
    const float scale = sqrtf(3.0f / (float)q->a->n_in);
    float *tmp = malloc(q->a->n_in * sizeof(float));
    if (!tmp) {
        q->err = 1;
        return NULL;
    }
    for (uint64_t r = q->r0; r < q->r1; r++) {
        uint64_t s = (q->a->seed * 0x9e3779b97f4a7c15ull) ^ ((r + 1) * 0xbf58476d1ce4e5b9ull);
        for (uint64_t i = 0; i < q->a->n_in; i++) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            tmp[i] = ((float)(s >> 40) / 8388608.0f - 1.0f) * scale;
        }
        quantize((int64_t)q->a->n_in, tmp, q->dst + r * q->row);
    }
    free(tmp);
    return NULL;
}

static optiml_status fill_quantized(const struct fill_args *a, void *dst, uint64_t size) {
    enum { MAX_T = 64 };
    long nt = sysconf(_SC_NPROCESSORS_ONLN);
    nt = nt < 1 ? 1 : nt > MAX_T ? MAX_T : nt;
    uint64_t row = 0;
    dtype_row_size(a->type, a->n_in, &row);
    const uint64_t n_rows = size / row;
    struct qfill q[MAX_T];
    pthread_t th[MAX_T];
    bool created[MAX_T] = {false};
    for (long t = 0; t < nt; t++) {
        q[t] = (struct qfill){.a = a, .dst = dst, .row = row, .n_rows = n_rows,
                              .r0 = n_rows * (uint64_t)t / (uint64_t)nt, .r1 = n_rows * (uint64_t)(t + 1) / (uint64_t)nt};
        if (t > 0) created[t] = pthread_create(&th[t], NULL, qfill_run, &q[t]) == 0;
    }
    qfill_run(&q[0]);
    int err = q[0].err;
    for (long t = 1; t < nt; t++) {
        if (created[t]) pthread_join(th[t], NULL);
        else qfill_run(&q[t]); /* could not start a thread: do its rows here */
        err |= q[t].err;
    }
    return err ? optiml_fail(OPTIML_ERR_NOMEM, "out of memory") : OPTIML_OK;
}

static optiml_status fill_random(void *user, void *dst, uint64_t size) {
    const struct fill_args *a = user;
    uint64_t s = a->seed * 0x9e3779b97f4a7c15ull + 1;
    const float scale = sqrtf(3.0f / (float)a->n_in);
    if (quant_quantizer(a->type)) return fill_quantized(a, dst, size);
    const uint64_t n = size / (a->type == DTYPE_F32 ? 4 : 2);
    for (uint64_t i = 0; i < n; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        float v = a->ones ? 1.0f : ((float)(s >> 40) / 8388608.0f - 1.0f) * scale;
        if (a->type == DTYPE_F32) memcpy((char *)dst + 4 * i, &v, 4);
        else if (a->type == DTYPE_F16) ((f16_t *)dst)[i] = f32_to_f16(v);
        else ((bf16_t *)dst)[i] = f32_to_bf16(v);
    }
    return OPTIML_OK;
}

static long arg_long(const char *flag, const char *v) {
    char *end;
    long x = strtol(v, &end, 10);
    if (*end || x <= 0) {
        fprintf(stderr, "optiml-random-model: invalid value '%s' for %s\n", v, flag);
        exit(1);
    }
    return x;
}

int main(int argc, char **argv) {
    const char *out = NULL, *act = "silu", *chat_template = NULL, *arch = "llama";
    long n_embd = 4096, n_layer = 32, n_ff = 11008, n_head = 32, n_head_kv = -1, n_vocab = 32000, ctx = 4096;
    long seed = 1;
    int type = DTYPE_F32;
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            fprintf(stderr, "optiml-random-model: unknown option or missing value '%s'\n", f);
            return 1;
        }
        i++;
        if (!strcmp(f, "--outfile")) out = v;
        else if (!strcmp(f, "--n-embd")) n_embd = arg_long(f, v);
        else if (!strcmp(f, "--n-layer")) n_layer = arg_long(f, v);
        else if (!strcmp(f, "--n-ff")) n_ff = arg_long(f, v);
        else if (!strcmp(f, "--n-head")) n_head = arg_long(f, v);
        else if (!strcmp(f, "--n-head-kv")) n_head_kv = arg_long(f, v);
        else if (!strcmp(f, "--n-vocab")) n_vocab = arg_long(f, v);
        else if (!strcmp(f, "--ctx")) ctx = arg_long(f, v);
        else if (!strcmp(f, "--seed")) seed = arg_long(f, v);
        else if (!strcmp(f, "--act")) act = v;
        else if (!strcmp(f, "--arch")) arch = v;
        else if (!strcmp(f, "--chat-template")) chat_template = v;
        else if (!strcmp(f, "--type")) {
            type = dtype_from_name(v);
            if (type != DTYPE_F32 && type != DTYPE_F16 && type != DTYPE_BF16 &&
                (type < 0 || !quant_quantizer((uint32_t)type) || type == DTYPE_Q8_1 || type == DTYPE_Q8_K)) {
                fprintf(stderr, "optiml-random-model: --type must be f32, f16, bf16 or a weight quant type "
                                "(q4_0, q8_0, q4_k, ...)\n");
                return 1;
            }
        } else {
            fprintf(stderr, "optiml-random-model: unknown option '%s'\n", f);
            return 1;
        }
    }
    if (n_head_kv < 0) n_head_kv = n_head;
    const long bs = (long)dtype_block_size((uint32_t)type);
    if (n_embd % bs || n_ff % bs) {
        fprintf(stderr, "optiml-random-model: --n-embd %ld and --n-ff %ld must be multiples of %s's block of %ld\n",
                n_embd, n_ff, dtype_name((uint32_t)type), bs);
        return 1;
    }
    if (strcmp(arch, "llama") && strcmp(arch, "qwen2")) {
        fprintf(stderr, "optiml-random-model: --arch must be llama or qwen2\n");
        return 1;
    }
    if (!out || n_embd % n_head || n_head % n_head_kv || n_vocab < 260) {
        fprintf(stderr, "usage: optiml-random-model --outfile M.gguf [--n-embd N --n-layer N --n-ff N --n-head N "
                        "--n-head-kv N --n-vocab N(>=260) --ctx N --type f32|f16|bf16|q4_0|q8_0|... "
                        "--act silu|relu|relu2 --arch llama|qwen2 --seed N]\n");
        return 1;
    }

    gguf_writer *w = gguf_writer_init();
    if (!w) return 1;
    const bool qwen2 = !strcmp(arch, "qwen2");
    char key[96];
#define ARCH_KEY(suffix) (snprintf(key, sizeof(key), "%s." suffix, arch), key)
    gguf_writer_set_str(w, "general.architecture", arch);
    gguf_writer_set_str(w, "general.name", "random");
    if (type == DTYPE_F32 || type == DTYPE_F16 || type == DTYPE_BF16)
        gguf_writer_set_u32(w, "general.file_type", type == DTYPE_F32 ? 0 : type == DTYPE_F16 ? 1 : 32);
    gguf_writer_set_u32(w, ARCH_KEY("context_length"), (uint32_t)ctx);
    gguf_writer_set_u32(w, ARCH_KEY("embedding_length"), (uint32_t)n_embd);
    gguf_writer_set_u32(w, ARCH_KEY("block_count"), (uint32_t)n_layer);
    gguf_writer_set_u32(w, ARCH_KEY("feed_forward_length"), (uint32_t)n_ff);
    gguf_writer_set_u32(w, ARCH_KEY("attention.head_count"), (uint32_t)n_head);
    gguf_writer_set_u32(w, ARCH_KEY("attention.head_count_kv"), (uint32_t)n_head_kv);
    gguf_writer_set_f32(w, ARCH_KEY("attention.layer_norm_rms_epsilon"), 1e-5f);
    gguf_writer_set_f32(w, ARCH_KEY("rope.freq_base"), 10000.0f);
#undef ARCH_KEY
    gguf_writer_set_str(w, "optiml.ffn_activation", act);

    /* synthetic SentencePiece vocabulary */
    char **pieces = calloc((size_t)n_vocab, sizeof(char *));
    float *scores = calloc((size_t)n_vocab, sizeof(float));
    int32_t *types = calloc((size_t)n_vocab, sizeof(int32_t));
    if (!pieces || !scores || !types) return 1;
    for (long i = 0; i < n_vocab; i++) {
        char buf[32];
        if (i == 0) snprintf(buf, sizeof(buf), "<unk>");
        else if (i == 1) snprintf(buf, sizeof(buf), "<s>");
        else if (i == 2) snprintf(buf, sizeof(buf), "</s>");
        else if (i < 259) snprintf(buf, sizeof(buf), "<0x%02X>", (unsigned)(i - 3));
        else snprintf(buf, sizeof(buf), "\xe2\x96\x81t%ld", i);
        pieces[i] = strdup(buf);
        types[i] = i == 0 ? 2 : i < 3 ? 3 : i < 259 ? 6 : 1;
        scores[i] = -(float)i;
    }
    gguf_writer_set_str(w, "tokenizer.ggml.model", "llama");
    gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)pieces, NULL, (uint64_t)n_vocab);
    gguf_writer_set_arr(w, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, scores, (uint64_t)n_vocab);
    gguf_writer_set_arr(w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types, (uint64_t)n_vocab);
    gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", 1);
    gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 2);
    gguf_writer_set_u32(w, "tokenizer.ggml.unknown_token_id", 0);
    if (chat_template) { /* tokenizer.chat_template from a file */
        FILE *tf = fopen(chat_template, "rb");
        char *text = tf ? calloc(1, 1 << 20) : NULL;
        size_t n = text ? fread(text, 1, (1 << 20) - 1, tf) : 0;
        if (tf) fclose(tf);
        if (!text) {
            fprintf(stderr, "optiml-random-model: cannot read '%s'\n", chat_template);
            return 1;
        }
        text[n] = '\0';
        gguf_writer_set_str(w, "tokenizer.chat_template", text);
        free(text);
    }

    /* tensors: (name, n_in, n_out, is_norm) */
    const long hd = n_embd / n_head;
    long n_tensors = 3 + (qwen2 ? 12 : 9) * n_layer;
    struct fill_args *args = calloc((size_t)n_tensors, sizeof(*args));
    char (*names)[64] = calloc((size_t)n_tensors, 64);
    if (!args || !names) return 1;
    long k = 0;
    optiml_status st = OPTIML_OK;
#define ADD(name_fmt, layer, n_in, n_out, norm)                                                   \
    do {                                                                                          \
        snprintf(names[k], 64, name_fmt, layer);                                                  \
        args[k] = (struct fill_args){(norm) ? DTYPE_F32 : (uint32_t)type, (uint64_t)(n_in),       \
                                     (uint64_t)(seed * 1000003 + k), (norm)};                     \
        uint64_t ne[2] = {(uint64_t)(n_in), (uint64_t)(n_out)};                                   \
        if (st == OPTIML_OK)                                                                      \
            st = gguf_writer_add_tensor_fn(w, names[k], args[k].type, (norm) ? 1 : 2, ne,         \
                                           fill_random, &args[k]);                                \
        k++;                                                                                      \
    } while (0)
    ADD("token_embd.weight%.0d", 0, n_embd, n_vocab, false);
    for (long l = 0; l < n_layer; l++) {
        ADD("blk.%ld.attn_norm.weight", l, n_embd, 1, true);
        ADD("blk.%ld.attn_q.weight", l, n_embd, n_embd, false);
        ADD("blk.%ld.attn_k.weight", l, n_embd, n_head_kv * hd, false);
        ADD("blk.%ld.attn_v.weight", l, n_embd, n_head_kv * hd, false);
        ADD("blk.%ld.attn_output.weight", l, n_embd, n_embd, false);
        if (qwen2) { /* f32 biases, +-1 (n_in 3 sets the scale) */
            const char *bn[3] = {"blk.%ld.attn_q.bias", "blk.%ld.attn_k.bias", "blk.%ld.attn_v.bias"};
            const long bl[3] = {n_embd, n_head_kv * hd, n_head_kv * hd};
            for (int b = 0; b < 3; b++) {
                snprintf(names[k], 64, bn[b], l);
                args[k] = (struct fill_args){DTYPE_F32, 3, (uint64_t)(seed * 1000003 + k), false};
                const uint64_t ne[1] = {(uint64_t)bl[b]};
                if (st == OPTIML_OK) st = gguf_writer_add_tensor_fn(w, names[k], DTYPE_F32, 1, ne, fill_random, &args[k]);
                k++;
            }
        }
        ADD("blk.%ld.ffn_norm.weight", l, n_embd, 1, true);
        ADD("blk.%ld.ffn_gate.weight", l, n_embd, n_ff, false);
        ADD("blk.%ld.ffn_up.weight", l, n_embd, n_ff, false);
        ADD("blk.%ld.ffn_down.weight", l, n_ff, n_embd, false);
    }
    ADD("output_norm.weight%.0d", 0, n_embd, 1, true);
    ADD("output.weight%.0d", 0, n_embd, n_vocab, false);
#undef ADD
    if (st == OPTIML_OK) st = gguf_writer_write(w, out);
    if (st != OPTIML_OK) fprintf(stderr, "optiml-random-model: %s\n", optiml_last_error());
    else fprintf(stderr, "optiml-random-model: wrote %s\n", out);
    gguf_writer_free(w);
    for (long i = 0; i < n_vocab; i++) free(pieces[i]);
    free(pieces);
    free(scores);
    free(types);
    free(args);
    free(names);
    return st == OPTIML_OK ? 0 : 1;
}
