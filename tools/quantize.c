/*
 * optiml-quantize - convert the weight matrices of a GGUF model to another
 * type (quantized, f16, bf16 or f32), keeping everything else.
 *
 *   optiml-quantize --input M.gguf --output OUT.gguf --type TYPE [--threads N]
 *
 * TYPE: q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k q4_k q5_k q6_k (every matrix in
 * that type), the mixtures q3_k_m q4_k_s q4_k_m q5_k_s q5_k_m, or f16 bf16
 * f32. The rules (docs/FORMAT.md, "Quantization"):
 *   - converted: token_embd.weight, output.weight and the seven matrices of
 *     each layer (blk.N.attn_q/attn_k/attn_v/attn_output/ffn_gate/ffn_up/
 *     ffn_down.weight); every other tensor (norms, rope_freqs, anything a
 *     later stage adds) and every metadata key are copied unchanged;
 *     general.file_type is set to llama.cpp's number for TYPE;
 *   - mixtures keep token_embd and output in q6_k and give some attn_v and
 *     ffn_down matrices more bits (as llama.cpp's mixtures do);
 *   - a matrix whose row length is not a multiple of the type's block
 *     falls back as llama.cpp does (q2_k, q3_k -> q4_0; q4_k -> q5_0;
 *     q5_k -> q5_1; q6_k -> q8_0), then to f16 if still not a multiple of
 *     32; each fallback is reported.
 * Progress goes to standard error; errors are one line and exit status 1.
 */
#define _POSIX_C_SOURCE 200809L
#include "cpu/ops.h"
#include "dtype.h"
#include "gguf.h"
#include "quant.h"
#include "threadpool.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- schemes -------------------------------------------------------------- */

enum mix { MIX_NONE, MIX_Q3_K_M, MIX_Q4_K_S, MIX_Q4_K_M, MIX_Q5_K_S, MIX_Q5_K_M };

struct scheme {
    const char *name;
    uint32_t base;      /* type of the matrices without a rule of their own */
    uint32_t file_type; /* llama.cpp's LLAMA_FTYPE number                   */
    enum mix mix;
};

static const struct scheme schemes[] = {
    {"f32", DTYPE_F32, 0, MIX_NONE},        {"f16", DTYPE_F16, 1, MIX_NONE},
    {"bf16", DTYPE_BF16, 32, MIX_NONE},     {"q4_0", DTYPE_Q4_0, 2, MIX_NONE},
    {"q4_1", DTYPE_Q4_1, 3, MIX_NONE},      {"q8_0", DTYPE_Q8_0, 7, MIX_NONE},
    {"q5_0", DTYPE_Q5_0, 8, MIX_NONE},      {"q5_1", DTYPE_Q5_1, 9, MIX_NONE},
    {"q2_k", DTYPE_Q2_K, 10, MIX_NONE},     {"q3_k", DTYPE_Q3_K, 11, MIX_NONE},
    {"q3_k_m", DTYPE_Q3_K, 12, MIX_Q3_K_M}, {"q4_k", DTYPE_Q4_K, 14, MIX_NONE},
    {"q4_k_s", DTYPE_Q4_K, 14, MIX_Q4_K_S}, {"q4_k_m", DTYPE_Q4_K, 15, MIX_Q4_K_M},
    {"q5_k", DTYPE_Q5_K, 16, MIX_NONE},     {"q5_k_s", DTYPE_Q5_K, 16, MIX_Q5_K_S},
    {"q5_k_m", DTYPE_Q5_K, 17, MIX_Q5_K_M}, {"q6_k", DTYPE_Q6_K, 18, MIX_NONE},
};

static const struct scheme *scheme_find(const char *name) {
    for (size_t i = 0; i < sizeof(schemes) / sizeof(schemes[0]); i++)
        if (strcmp(schemes[i].name, name) == 0) return &schemes[i];
    return NULL;
}

/* llama.cpp's rule for which layers get more bits in the _m mixtures. */
static bool more_bits(int il, int n_layer) {
    return il < n_layer / 8 || il >= 7 * n_layer / 8 || (il - n_layer / 8) % 3 == 2;
}

/* The type a converted tensor gets before the block-size fallback; role is
 * the name without "blk.N." (il = -1 for token_embd/output). */
static uint32_t scheme_type(const struct scheme *s, const char *role, int il, int n_layer) {
    const bool io = il < 0, attn_v = !strcmp(role, "attn_v.weight"), down = !strcmp(role, "ffn_down.weight");
    if (s->mix == MIX_NONE) return s->base;
    if (io) return DTYPE_Q6_K;
    switch (s->mix) {
    case MIX_Q3_K_M:
        if (attn_v) return il < 2 ? DTYPE_Q5_K : DTYPE_Q4_K;
        if (down) return il < n_layer / 16 ? DTYPE_Q5_K : DTYPE_Q4_K;
        if (!strcmp(role, "attn_output.weight")) return DTYPE_Q4_K;
        return s->base;
    case MIX_Q4_K_S:
        return (attn_v || down) && il < n_layer / 8 ? DTYPE_Q5_K : s->base;
    case MIX_Q4_K_M:
    case MIX_Q5_K_M:
        return (attn_v || down) && more_bits(il, n_layer) ? DTYPE_Q6_K : s->base;
    default:
        return s->base;
    }
}

/* llama.cpp's fallback when the row length is not a multiple of the block. */
static uint32_t fallback_type(uint32_t t, uint64_t ne0) {
    if (ne0 % dtype_block_size(t) == 0) return t;
    switch (t) {
    case DTYPE_Q2_K: case DTYPE_Q3_K: t = DTYPE_Q4_0; break;
    case DTYPE_Q4_K: t = DTYPE_Q5_0; break;
    case DTYPE_Q5_K: t = DTYPE_Q5_1; break;
    case DTYPE_Q6_K: t = DTYPE_Q8_0; break;
    default: break;
    }
    return ne0 % dtype_block_size(t) == 0 ? t : DTYPE_F16;
}

/* Converted tensors: token_embd, output, and the layer matrices. Returns
 * the role (name after "blk.N.") and sets *il, or NULL to copy as is. */
static const char *tensor_role(const char *name, int *il) {
    static const char *const layer_roles[] = {"attn_q.weight", "attn_k.weight", "attn_v.weight",
                                              "attn_output.weight", "ffn_gate.weight", "ffn_up.weight",
                                              "ffn_down.weight"};
    *il = -1;
    if (!strcmp(name, "token_embd.weight") || !strcmp(name, "output.weight")) return name;
    int n = 0;
    if (sscanf(name, "blk.%d.%n", il, &n) != 1 || n == 0 || *il < 0) return NULL;
    for (size_t i = 0; i < sizeof(layer_roles) / sizeof(layer_roles[0]); i++)
        if (!strcmp(name + n, layer_roles[i])) return layer_roles[i];
    return NULL;
}

/* ---- conversion ------------------------------------------------------------ */

struct convert_job {
    const struct gguf_tensor_info *src;
    uint32_t type;        /* target                               */
    uint64_t n_rows, src_row, dst_row;
    void *dst;
    float *scratch;       /* (n_threads, ne0)                      */
    int index, n_total;   /* for the progress line                 */
};

static void convert_rows(void *arg, int ith, int nth) {
    const struct convert_job *job = arg;
    const int64_t ne0 = (int64_t)job->src->ne[0];
    const cpu_to_f32_fn to_f32 = cpu_kernels_ref()->to_f32[job->src->type];
    const quant_quantize_fn quant = quant_quantizer(job->type);
    float *row = job->scratch + (size_t)ith * (size_t)ne0;
    int64_t r0, r1;
    threadpool_split((int64_t)job->n_rows, ith, nth, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) {
        to_f32(ne0, (const char *)job->src->data + (uint64_t)r * job->src_row, row);
        char *out = (char *)job->dst + (uint64_t)r * job->dst_row;
        if (quant) {
            quant(ne0, row, out);
        } else if (job->type == DTYPE_F32) {
            memcpy(out, row, (size_t)ne0 * sizeof(float));
        } else {
            for (int64_t i = 0; i < ne0; i++) {
                uint16_t h = job->type == DTYPE_F16 ? f32_to_f16(row[i]) : f32_to_bf16(row[i]);
                memcpy(out + 2 * i, &h, 2);
            }
        }
    }
}

static struct threadpool *pool;

static optiml_status convert_fill(void *user, void *dst, uint64_t size) {
    struct convert_job *job = user;
    job->dst = dst;
    job->scratch = malloc((size_t)threadpool_n_threads(pool) * job->src->ne[0] * sizeof(float));
    if (!job->scratch) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory converting %.*s",
                                          (int)job->src->name.n, job->src->name.data);
    threadpool_run(pool, convert_rows, job);
    free(job->scratch);
    job->scratch = NULL;
    fprintf(stderr, "optiml-quantize: [%3d/%3d] %-28.*s %5s -> %-5s %9.2f MiB\n", job->index, job->n_total,
            (int)job->src->name.n, job->src->name.data, dtype_name(job->src->type), dtype_name(job->type),
            size / 1048576.0);
    return OPTIML_OK;
}

/* ---- main ------------------------------------------------------------------ */

static int fail(const char *msg, const char *arg) {
    fprintf(stderr, "optiml-quantize: %s%s\n", msg, arg ? arg : "");
    return 1;
}

int main(int argc, char **argv) {
    const char *in_path = NULL, *out_path = NULL, *type_name = NULL;
    long n_threads = sysconf(_SC_NPROCESSORS_ONLN);
    static const char usage[] = "usage: optiml-quantize --input M.gguf --output OUT.gguf --type TYPE [--threads N] "
                                "(TYPE: q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k q4_k q5_k q6_k q3_k_m q4_k_s q4_k_m q5_k_s "
                                "q5_k_m f16 bf16 f32)";
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(f, "-h") || !strcmp(f, "--help")) {
            printf("%s\n", usage);
            return 0;
        }
        if (!v) return fail("missing value or unknown option: ", f);
        i++;
        if (!strcmp(f, "--input")) in_path = v;
        else if (!strcmp(f, "--output")) out_path = v;
        else if (!strcmp(f, "--type")) type_name = v;
        else if (!strcmp(f, "--threads")) {
            char *end;
            n_threads = strtol(v, &end, 10);
            if (*end || n_threads < 1 || n_threads > 256) return fail("invalid --threads ", v);
        } else {
            return fail("unknown option ", f);
        }
    }
    if (!in_path || !out_path || !type_name)
        return fail(usage, NULL);
    const struct scheme *sch = scheme_find(type_name);
    if (!sch) return fail("unknown --type ", type_name);
    if (n_threads < 1) n_threads = 1;

    gguf_file *in = NULL;
    if (gguf_open(in_path, &in) != OPTIML_OK) return fail(optiml_last_error(), NULL);
    uint32_t n_layer = 0;
    {
        struct gguf_str arch;
        char key[96];
        if (gguf_get_str(in, "general.architecture", &arch) == OPTIML_OK && arch.n < 64) {
            snprintf(key, sizeof(key), "%.*s.block_count", (int)arch.n, arch.data);
            gguf_get_u32_or(in, key, 0, &n_layer);
        }
    }
    gguf_writer *w = gguf_writer_init();
    struct convert_job *jobs = calloc(in->n_tensors + 1, sizeof(*jobs));
    char **names = calloc(in->n_tensors + 1, sizeof(char *));
    if (!w || !jobs || !names || threadpool_init((int)n_threads, &pool) != OPTIML_OK)
        return fail("out of memory", NULL);

    optiml_status st = OPTIML_OK;
    for (uint64_t i = 0; i < in->n_kv && st == OPTIML_OK; i++) {
        char *key = gguf_str_dup(in->kv[i].key);
        if (!key) return fail("out of memory", NULL);
        st = gguf_writer_set_value(w, key, &in->kv[i].value);
        free(key);
    }
    if (st == OPTIML_OK) st = gguf_writer_set_u32(w, "general.file_type", sch->file_type);

    int n_convert = 0, n_fallback = 0, n_quantized = 0;
    for (uint64_t i = 0; i < in->n_tensors && st == OPTIML_OK; i++) {
        const struct gguf_tensor_info *ti = &in->tensors[i];
        names[i] = gguf_str_dup(ti->name);
        if (!names[i]) return fail("out of memory", NULL);
        int il;
        const char *role = tensor_role(names[i], &il);
        uint32_t type = ti->type;
        if (role && ti->n_dims == 2) {
            const uint32_t want = scheme_type(sch, role, il, (int)n_layer);
            type = fallback_type(want, ti->ne[0]);
            if (type != want) {
                fprintf(stderr, "optiml-quantize: %s: rows of %llu values are not a multiple of %s's block of %u: "
                        "using %s\n", names[i], (unsigned long long)ti->ne[0], dtype_name(want),
                        dtype_block_size(want), dtype_name(type));
                n_fallback++;
            }
            if (type != ti->type && !cpu_kernels_ref()->to_f32[ti->type]) {
                fprintf(stderr, "optiml-quantize: %s: cannot read type %s\n", names[i], dtype_name(ti->type));
                return 1;
            }
        }
        n_quantized += quant_quantizer(type) != NULL;
        if (type == ti->type) {
            st = gguf_writer_add_tensor(w, names[i], type, ti->n_dims, ti->ne, ti->data);
            continue;
        }
        struct convert_job *job = &jobs[n_convert++];
        job->src = ti;
        job->type = type;
        job->n_rows = ti->ne[1] * ti->ne[2] * ti->ne[3];
        dtype_row_size(ti->type, ti->ne[0], &job->src_row);
        dtype_row_size(type, ti->ne[0], &job->dst_row);
        st = gguf_writer_add_tensor_fn(w, names[i], type, ti->n_dims, ti->ne, convert_fill, job);
    }
    for (int k = 0; k < n_convert; k++) {
        jobs[k].index = k + 1;
        jobs[k].n_total = n_convert;
    }
    if (st == OPTIML_OK && n_quantized > 0) st = gguf_writer_set_u32(w, "general.quantization_version", 2);
    fprintf(stderr, "optiml-quantize: %s -> %s (%s): %d of %llu tensors converted, %d fallbacks, %ld threads\n",
            in_path, out_path, sch->name, n_convert, (unsigned long long)in->n_tensors, n_fallback, n_threads);
    if (st == OPTIML_OK) st = gguf_writer_write(w, out_path);
    if (st != OPTIML_OK) fprintf(stderr, "optiml-quantize: %s\n", optiml_last_error());
    else fprintf(stderr, "optiml-quantize: wrote %s\n", out_path);
    gguf_writer_free(w);
    threadpool_free(pool);
    for (uint64_t i = 0; i < in->n_tensors; i++) free(names[i]);
    free(names);
    free(jobs);
    gguf_close(in);
    return st == OPTIML_OK ? 0 : 1;
}
