/*
 * convert_hf.c - Hugging Face Llama directory -> GGUF.
 *
 * Reads, from the model directory:
 *   config.json                     hyperparameters (LlamaForCausalLM)
 *   model.safetensors, or model.safetensors.index.json + its shards, or the
 *     one *.safetensors file there (format: src/safetensors.h)
 *   tokenizer.model                 SentencePiece ModelProto (protobuf), or
 *   tokenizer.json                  byte-level BPE (Llama 3 style)
 *   tokenizer_config.json           optional: chat_template, add_bos_token...
 *
 * Tensors are renamed to docs/FORMAT.md's names; the rows of q_proj and
 * k_proj are permuted within each head from Hugging Face's rotate-half RoPE
 * layout to interleaved pairs. Each tensor is converted (f32/f16/bf16) while
 * the GGUF file is written, so one tensor at a time is held in memory: the
 * shards stay memory-mapped. Llama 3 rope_scaling becomes a rope_freqs.weight
 * tensor of frequency divisors computed the way transformers does.
 *
 * The tokenizer.model reader is in convert_spm.c. This file needs jansson
 * (OPTIML_HAVE_JANSSON); without it --hf reports how to get it.
 */
#define _POSIX_C_SOURCE 200809L
#include "convert.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef OPTIML_HAVE_JANSSON

#include "safetensors.h"

#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <sys/stat.h>

/* ---- paths and JSON --------------------------------------------------------------- */

/* dir/file, malloc'd (NULL if out of memory). */
static char *hf_path(const char *dir, const char *file) {
    size_t n = strlen(dir) + strlen(file) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, file);
    return p;
}

static bool hf_file_exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

/* Load dir/file as JSON into *out. A missing file is an error if required,
 * else *out = NULL and OK. flags: jansson decoding flags besides
 * JSON_REJECT_DUPLICATES. */
static optiml_status hf_json_load(const char *dir, const char *file, bool required, size_t flags,
                                  json_t **out) {
    *out = NULL;
    char *path = hf_path(dir, file);
    if (!path) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    optiml_status st = OPTIML_OK;
    if (!hf_file_exists(path)) {
        if (required) st = optiml_fail(OPTIML_ERR_IO, "%s: no such file", path);
    } else {
        json_error_t err;
        *out = json_load_file(path, JSON_REJECT_DUPLICATES | flags, &err);
        if (!*out)
            st = optiml_fail(OPTIML_ERR_FORMAT, "%s: line %d, column %d: %s", path, err.line,
                             err.column, err.text);
    }
    free(path);
    return st;
}

/* ---- config.json ----------------------------------------------------------------- */

enum hf_rope_kind { HF_ROPE_NONE, HF_ROPE_LINEAR, HF_ROPE_LLAMA3 };

struct hf_config {
    uint32_t n_embd, n_ff, n_layer, n_head, n_head_kv, head_dim, n_vocab, n_ctx;
    double rms_eps, rope_theta;
    const char *activation; /* optiml.ffn_activation (static string)      */
    bool tied;              /* tie_word_embeddings                         */
    int dtype;              /* enum dtype of torch_dtype / dtype, -1: none */
    enum hf_rope_kind rope_kind;
    double rope_factor, low_freq_factor, high_freq_factor;
    uint32_t orig_ctx;      /* original_max_position_embeddings (llama3)   */
    bool qwen2;             /* Qwen2ForCausalLM: q/k/v biases, NeoX RoPE   */
    int64_t bos_id, eos_id, pad_id; /* -1: none                            */
};

/* A positive integer that fits 32 bits; a missing key or JSON null gives def
 * (0 = required). */
static optiml_status hf_cfg_u32(const json_t *cfg, const char *key, uint32_t def, uint32_t *out) {
    const json_t *v = json_object_get(cfg, key);
    if (!v || json_is_null(v)) {
        if (def == 0) return optiml_fail(OPTIML_ERR_FORMAT, "config.json: missing \"%s\"", key);
        *out = def;
        return OPTIML_OK;
    }
    if (!json_is_integer(v) || json_integer_value(v) <= 0 || json_integer_value(v) > UINT32_MAX)
        return optiml_fail(OPTIML_ERR_FORMAT, "config.json: \"%s\" is not a positive 32-bit integer",
                           key);
    *out = (uint32_t)json_integer_value(v);
    return OPTIML_OK;
}

/* A positive finite number; missing/null gives def (0 = required). */
static optiml_status hf_cfg_num(const json_t *obj, const char *where, const char *key, double def,
                                double *out) {
    const json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        if (def == 0) return optiml_fail(OPTIML_ERR_FORMAT, "%s: missing \"%s\"", where, key);
        *out = def;
        return OPTIML_OK;
    }
    if (!json_is_number(v) || !(json_number_value(v) > 0) || !isfinite(json_number_value(v)))
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: \"%s\" is not a positive number", where, key);
    *out = json_number_value(v);
    return OPTIML_OK;
}

/* A token id: an integer, or a list of them (the first is taken); -1 if
 * missing or null. */
static optiml_status hf_cfg_token_id(const json_t *cfg, const char *key, int64_t *out) {
    const json_t *v = json_object_get(cfg, key);
    *out = -1;
    if (json_is_array(v)) v = json_array_get(v, 0);
    if (!v || json_is_null(v)) return OPTIML_OK;
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT32_MAX)
        return optiml_fail(OPTIML_ERR_FORMAT, "config.json: \"%s\" is not a token id", key);
    *out = json_integer_value(v);
    return OPTIML_OK;
}

static const char *hf_json_str(const json_t *obj, const char *key) {
    const json_t *v = json_object_get(obj, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

/* Llama and Mistral; Qwen2 (*qwen2 set): Llama with q/k/v biases. */
static optiml_status hf_config_arch(const json_t *cfg, bool *qwen2) {
    static const char *const archs[] = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"};
    static const char *const types[] = {"llama", "mistral", "qwen2"};
    const json_t *arch0 = json_array_get(json_object_get(cfg, "architectures"), 0);
    const char *arch = json_is_string(arch0) ? json_string_value(arch0) : NULL;
    const char *type = hf_json_str(cfg, "model_type");
    size_t found = sizeof(archs) / sizeof(archs[0]);
    for (size_t i = 0; i < sizeof(archs) / sizeof(archs[0]) && found == sizeof(archs) / sizeof(archs[0]); i++)
        if ((arch && strcmp(arch, archs[i]) == 0) || (type && strcmp(type, types[i]) == 0)) found = i;
    if (found == sizeof(archs) / sizeof(archs[0]))
        return optiml_fail(OPTIML_ERR_UNSUPPORTED,
                           "config.json: architecture %s (model_type %s) is not supported: "
                           "Llama-family models (LlamaForCausalLM, MistralForCausalLM) and "
                           "Qwen2ForCausalLM",
                           arch ? arch : "(none)", type ? type : "(none)");
    *qwen2 = found == 2;
    if (json_is_true(json_object_get(cfg, "attention_bias")) ||
        json_is_true(json_object_get(cfg, "mlp_bias")))
        return optiml_fail(OPTIML_ERR_UNSUPPORTED,
                           "config.json: attention_bias / mlp_bias are not supported");
    /* Qwen2 configs carry a sliding_window that use_sliding_window false turns off */
    const json_t *sw = json_object_get(cfg, "sliding_window");
    const json_t *use_sw = json_object_get(cfg, "use_sliding_window");
    if (sw && !json_is_null(sw) && !(use_sw && json_is_false(use_sw)))
        LOG_WARN("config.json: sliding_window is ignored: attention spans the whole context");
    return OPTIML_OK;
}

static optiml_status hf_config_activation(const json_t *cfg, const char **out) {
    static const struct {
        const char *hf, *ours;
    } acts[] = {
        {"silu", "silu"},          {"swish", "silu"},          {"relu", "relu"},
        {"relu2", "relu2"},        {"relu_squared", "relu2"},  {"relu-squared", "relu2"},
        {"squared_relu", "relu2"}, {"gelu", "gelu"},           {"gelu_new", "gelu"},
        {"gelu_fast", "gelu"},     {"gelu_pytorch_tanh", "gelu"},
    };
    const char *act = hf_json_str(cfg, "hidden_act");
    if (!act) act = "silu";
    for (size_t i = 0; i < sizeof(acts) / sizeof(acts[0]); i++)
        if (strcmp(act, acts[i].hf) == 0) {
            *out = acts[i].ours;
            return OPTIML_OK;
        }
    return optiml_fail(OPTIML_ERR_UNSUPPORTED,
                       "config.json: hidden_act \"%s\" is not supported (silu, relu, relu2, gelu)",
                       act);
}

/* rope_theta and rope scaling: transformers 4 writes "rope_theta" and
 * "rope_scaling"; transformers 5 writes both into "rope_parameters". */
static optiml_status hf_config_rope(const json_t *cfg, struct hf_config *c) {
    const json_t *params = json_object_get(cfg, "rope_parameters");
    if (params && !json_is_object(params))
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "config.json: \"rope_parameters\" is not an object");
    TRY(hf_cfg_num(cfg, "config.json", "rope_theta", 10000.0, &c->rope_theta));
    if (params && !json_object_get(cfg, "rope_theta"))
        TRY(hf_cfg_num(params, "config.json rope_parameters", "rope_theta", 10000.0,
                       &c->rope_theta));

    const json_t *scaling = json_object_get(cfg, "rope_scaling");
    if (!scaling || json_is_null(scaling)) scaling = params;
    c->rope_kind = HF_ROPE_NONE;
    if (!scaling || json_is_null(scaling)) return OPTIML_OK;
    if (!json_is_object(scaling))
        return optiml_fail(OPTIML_ERR_FORMAT, "config.json: \"rope_scaling\" is not an object");
    const char *type = hf_json_str(scaling, "rope_type");
    if (!type) type = hf_json_str(scaling, "type");
    if (!type || strcmp(type, "default") == 0) return OPTIML_OK;

    const char *where = "config.json rope scaling";
    if (strcmp(type, "linear") == 0) {
        c->rope_kind = HF_ROPE_LINEAR;
        return hf_cfg_num(scaling, where, "factor", 0, &c->rope_factor);
    }
    if (strcmp(type, "llama3") == 0) {
        double orig;
        c->rope_kind = HF_ROPE_LLAMA3;
        TRY(hf_cfg_num(scaling, where, "factor", 0, &c->rope_factor));
        TRY(hf_cfg_num(scaling, where, "low_freq_factor", 0, &c->low_freq_factor));
        TRY(hf_cfg_num(scaling, where, "high_freq_factor", 0, &c->high_freq_factor));
        TRY(hf_cfg_num(scaling, where, "original_max_position_embeddings", 0, &orig));
        if (!(c->high_freq_factor > c->low_freq_factor) || orig > UINT32_MAX)
            return optiml_fail(OPTIML_ERR_FORMAT,
                               "%s: need high_freq_factor > low_freq_factor and a 32-bit "
                               "original_max_position_embeddings",
                               where);
        c->orig_ctx = (uint32_t)orig;
        return OPTIML_OK;
    }
    return optiml_fail(OPTIML_ERR_UNSUPPORTED,
                       "config.json: rope scaling type \"%s\" is not supported (linear, llama3)",
                       type);
}

static optiml_status hf_config_read(const json_t *cfg, struct hf_config *c) {
    memset(c, 0, sizeof(*c));
    if (!json_is_object(cfg)) return optiml_fail(OPTIML_ERR_FORMAT, "config.json: not an object");
    TRY(hf_config_arch(cfg, &c->qwen2));
    TRY(hf_cfg_u32(cfg, "hidden_size", 0, &c->n_embd));
    TRY(hf_cfg_u32(cfg, "intermediate_size", 0, &c->n_ff));
    TRY(hf_cfg_u32(cfg, "num_hidden_layers", 0, &c->n_layer));
    TRY(hf_cfg_u32(cfg, "num_attention_heads", 0, &c->n_head));
    TRY(hf_cfg_u32(cfg, "num_key_value_heads", c->n_head, &c->n_head_kv));
    TRY(hf_cfg_u32(cfg, "vocab_size", 0, &c->n_vocab));
    TRY(hf_cfg_u32(cfg, "max_position_embeddings", 2048, &c->n_ctx));
    const json_t *head_dim = json_object_get(cfg, "head_dim");
    if (head_dim && !json_is_null(head_dim))
        TRY(hf_cfg_u32(cfg, "head_dim", 0, &c->head_dim));
    else if (c->n_embd % c->n_head == 0)
        c->head_dim = c->n_embd / c->n_head;
    else
        return optiml_fail(OPTIML_ERR_FORMAT,
                           "config.json: hidden_size %u is not a multiple of num_attention_heads "
                           "%u and there is no head_dim",
                           c->n_embd, c->n_head);
    if (c->head_dim % 2 != 0)
        return optiml_fail(OPTIML_ERR_FORMAT, "config.json: head_dim %u is odd", c->head_dim);
    if (c->n_head_kv > c->n_head || c->n_head % c->n_head_kv != 0)
        return optiml_fail(OPTIML_ERR_FORMAT,
                           "config.json: num_attention_heads %u is not a multiple of "
                           "num_key_value_heads %u",
                           c->n_head, c->n_head_kv);
    TRY(hf_cfg_num(cfg, "config.json", "rms_norm_eps", 1e-6, &c->rms_eps));
    TRY(hf_config_rope(cfg, c));
    TRY(hf_config_activation(cfg, &c->activation));
    const json_t *tie = json_object_get(cfg, "tie_word_embeddings");
    c->tied = json_is_true(tie);

    const char *dt = hf_json_str(cfg, "torch_dtype");
    if (!dt) dt = hf_json_str(cfg, "dtype");
    c->dtype = -1;
    if (dt && strncmp(dt, "torch.", 6) == 0) dt += 6;
    if (dt && strcmp(dt, "float32") == 0) c->dtype = DTYPE_F32;
    if (dt && strcmp(dt, "float16") == 0) c->dtype = DTYPE_F16;
    if (dt && strcmp(dt, "bfloat16") == 0) c->dtype = DTYPE_BF16;

    TRY(hf_cfg_token_id(cfg, "bos_token_id", &c->bos_id));
    TRY(hf_cfg_token_id(cfg, "eos_token_id", &c->eos_id));
    TRY(hf_cfg_token_id(cfg, "pad_token_id", &c->pad_id));
    return OPTIML_OK;
}

/* ---- weights: safetensors shards ----------------------------------------------------- */

struct hf_weights {
    struct safetensors_file **files;
    size_t n_files;
};

static void hf_weights_free(struct hf_weights *w) {
    for (size_t i = 0; i < w->n_files; i++) safetensors_close(w->files[i]);
    free(w->files);
    memset(w, 0, sizeof(*w));
}

static const struct safetensors_tensor *hf_weights_find(const struct hf_weights *w,
                                                        const char *name,
                                                        const struct safetensors_file **file) {
    for (size_t i = 0; i < w->n_files; i++) {
        const struct safetensors_tensor *t = safetensors_find(w->files[i], name);
        if (t) {
            if (file) *file = w->files[i];
            return t;
        }
    }
    return NULL;
}

/* Open dir/file (unless already open) and add it to w. */
static optiml_status hf_weights_open(struct hf_weights *w, const char *dir, const char *file) {
    if (strchr(file, '/') || strcmp(file, "..") == 0 || strcmp(file, ".") == 0 || !file[0])
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: shard name \"%s\" is not a file in the directory",
                           dir, file);
    char *path = hf_path(dir, file);
    if (!path) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < w->n_files; i++)
        if (strcmp(w->files[i]->name, path) == 0) {
            free(path);
            return OPTIML_OK;
        }
    struct safetensors_file **files = realloc(w->files, (w->n_files + 1) * sizeof(*files));
    if (!files) {
        free(path);
        return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    }
    w->files = files;
    optiml_status st = safetensors_open(path, &w->files[w->n_files]);
    free(path);
    TRY(st);
    const struct safetensors_file *f = w->files[w->n_files++];
    /* A tensor in two shards is ambiguous. */
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const struct safetensors_file *other = NULL;
        const struct safetensors_tensor *t = hf_weights_find(w, f->tensors[i].name, &other);
        if (t && other != f)
            return optiml_fail(OPTIML_ERR_FORMAT, "tensor '%s' is in both %s and %s",
                               f->tensors[i].name, other->name, f->name);
    }
    return OPTIML_OK;
}

/* The weights: model.safetensors.index.json and its shards, else
 * model.safetensors, else the only *.safetensors file of dir. */
static optiml_status hf_weights_load(struct hf_weights *w, const char *dir) {
    json_t *index;
    TRY(hf_json_load(dir, "model.safetensors.index.json", false, 0, &index));
    if (index) {
        const json_t *map = json_object_get(index, "weight_map");
        optiml_status st = OPTIML_OK;
        if (!json_is_object(map) || json_object_size(map) == 0)
            st = optiml_fail(OPTIML_ERR_FORMAT,
                             "%s/model.safetensors.index.json: missing or empty \"weight_map\"", dir);
        const char *name;
        json_t *shard;
        json_object_foreach((json_t *)map, name, shard) {
            if (st != OPTIML_OK) break;
            if (!json_is_string(shard)) {
                st = optiml_fail(OPTIML_ERR_FORMAT,
                                 "%s/model.safetensors.index.json: weight_map[\"%s\"] is not a "
                                 "file name",
                                 dir, name);
                break;
            }
            st = hf_weights_open(w, dir, json_string_value(shard));
        }
        /* Every tensor the index names must be in the shard it names. */
        json_object_foreach((json_t *)map, name, shard) {
            if (st != OPTIML_OK) break;
            const struct safetensors_file *f = NULL;
            const char *want = json_string_value(shard);
            size_t nd = strlen(dir);
            if (!hf_weights_find(w, name, &f) || strncmp(f->name, dir, nd) != 0 ||
                strcmp(f->name + nd + 1, want) != 0)
                st = optiml_fail(OPTIML_ERR_FORMAT,
                                 "%s/model.safetensors.index.json: tensor '%s' is not in %s", dir,
                                 name, want);
        }
        json_decref(index);
        return st;
    }

    char *single = hf_path(dir, "model.safetensors");
    if (!single) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    bool have_single = hf_file_exists(single);
    free(single);
    if (have_single) return hf_weights_open(w, dir, "model.safetensors");

    DIR *d = opendir(dir);
    if (!d) return optiml_fail(OPTIML_ERR_IO, "%s: cannot list the directory", dir);
    char found[512] = "";
    int n_found = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t n = strlen(e->d_name);
        if (n > 12 && strcmp(e->d_name + n - 12, ".safetensors") == 0) {
            if (n_found++ == 0) snprintf(found, sizeof(found), "%s", e->d_name);
        }
    }
    closedir(d);
    if (n_found == 0)
        return optiml_fail(OPTIML_ERR_IO,
                           "%s: no .safetensors weights (PyTorch .bin checkpoints are not "
                           "supported: re-save with safe_serialization=True)",
                           dir);
    if (n_found > 1)
        return optiml_fail(OPTIML_ERR_FORMAT,
                           "%s: %d .safetensors files and no model.safetensors.index.json to say "
                           "which tensors are where",
                           dir, n_found);
    return hf_weights_open(w, dir, found);
}

/* ---- tensors --------------------------------------------------------------------- */

enum hf_rope_perm { HF_PERM_NONE, HF_PERM_Q, HF_PERM_K };

/* Per-layer tensors: Hugging Face suffix after "model.layers.N.", GGUF name
 * after "blk.N.", the rows and columns (PyTorch (out, in)) as multiples of
 * hf_dim below, and the RoPE permutation. */
enum hf_dim { HF_DIM_ONE, HF_DIM_EMBD, HF_DIM_FF, HF_DIM_Q, HF_DIM_KV, HF_DIM_VOCAB };

static const struct hf_tensor_map {
    const char *hf, *gguf;
    enum hf_dim rows, cols; /* cols HF_DIM_ONE: a vector of `rows` */
    enum hf_rope_perm perm;
} hf_layer_tensors[] = {
    {"input_layernorm.weight", "attn_norm", HF_DIM_EMBD, HF_DIM_ONE, HF_PERM_NONE},
    {"self_attn.q_proj.weight", "attn_q", HF_DIM_Q, HF_DIM_EMBD, HF_PERM_Q},
    {"self_attn.k_proj.weight", "attn_k", HF_DIM_KV, HF_DIM_EMBD, HF_PERM_K},
    {"self_attn.v_proj.weight", "attn_v", HF_DIM_KV, HF_DIM_EMBD, HF_PERM_NONE},
    {"self_attn.o_proj.weight", "attn_output", HF_DIM_EMBD, HF_DIM_Q, HF_PERM_NONE},
    /* Qwen2 only (hf_add_tensors), which keeps q and k unpermuted */
    {"self_attn.q_proj.bias", "attn_q", HF_DIM_Q, HF_DIM_ONE, HF_PERM_NONE},
    {"self_attn.k_proj.bias", "attn_k", HF_DIM_KV, HF_DIM_ONE, HF_PERM_NONE},
    {"self_attn.v_proj.bias", "attn_v", HF_DIM_KV, HF_DIM_ONE, HF_PERM_NONE},
    {"post_attention_layernorm.weight", "ffn_norm", HF_DIM_EMBD, HF_DIM_ONE, HF_PERM_NONE},
    {"mlp.gate_proj.weight", "ffn_gate", HF_DIM_FF, HF_DIM_EMBD, HF_PERM_NONE},
    {"mlp.up_proj.weight", "ffn_up", HF_DIM_FF, HF_DIM_EMBD, HF_PERM_NONE},
    {"mlp.down_proj.weight", "ffn_down", HF_DIM_EMBD, HF_DIM_FF, HF_PERM_NONE},
};
#define HF_N_LAYER_TENSORS (sizeof(hf_layer_tensors) / sizeof(hf_layer_tensors[0]))

static uint64_t hf_dim_value(const struct hf_config *c, enum hf_dim d) {
    switch (d) {
    case HF_DIM_ONE: return 1;
    case HF_DIM_EMBD: return c->n_embd;
    case HF_DIM_FF: return c->n_ff;
    case HF_DIM_Q: return (uint64_t)c->n_head * c->head_dim;
    case HF_DIM_KV: return (uint64_t)c->n_head_kv * c->head_dim;
    case HF_DIM_VOCAB: return c->n_vocab;
    }
    return 0;
}

/* Queue Hugging Face tensor hf_name as gguf_name after checking its dtype
 * and shape. A missing tensor fails unless optional (then *found = false). */
static optiml_status hf_add_tensor(struct convert_out *out, const struct hf_weights *w,
                                   const struct hf_config *c, const char *hf_name,
                                   const char *gguf_name, enum hf_dim rows, enum hf_dim cols,
                                   enum hf_rope_perm perm, bool optional, bool *found) {
    const struct safetensors_file *f = NULL;
    const struct safetensors_tensor *t = hf_weights_find(w, hf_name, &f);
    if (found) *found = t != NULL;
    if (!t) {
        if (optional) return OPTIML_OK;
        return optiml_fail(OPTIML_ERR_FORMAT, "missing tensor '%s' (for %s)", hf_name, gguf_name);
    }
    int type = safetensors_dtype_to_gguf(t->dtype);
    if (type != DTYPE_F32 && type != DTYPE_F16 && type != DTYPE_BF16)
        return optiml_fail(OPTIML_ERR_UNSUPPORTED, "%s: tensor '%s' is %s (only F32, F16, BF16)",
                           f->name, hf_name, safetensors_dtype_name(t->dtype));
    uint64_t r = hf_dim_value(c, rows), k = hf_dim_value(c, cols);
    bool vec = cols == HF_DIM_ONE;
    bool ok = vec ? t->n_dims == 1 && t->shape[0] == r
                  : t->n_dims == 2 && t->shape[0] == r && t->shape[1] == k;
    if (!ok) {
        char got[64] = "";
        int n = 0;
        for (uint32_t d = 0; d < t->n_dims && n >= 0 && (size_t)n < sizeof(got); d++)
            n += snprintf(got + n, sizeof(got) - (size_t)n, "%s%llu", d ? ", " : "",
                          (unsigned long long)t->shape[d]);
        if (vec)
            return optiml_fail(OPTIML_ERR_FORMAT, "%s: tensor '%s' has shape [%s], config.json "
                               "implies [%llu]",
                               f->name, hf_name, got, (unsigned long long)r);
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: tensor '%s' has shape [%s], config.json "
                           "implies [%llu, %llu]",
                           f->name, hf_name, got, (unsigned long long)r, (unsigned long long)k);
    }
    uint64_t ne[2] = {vec ? r : k, r};
    uint32_t heads = perm == HF_PERM_Q ? c->n_head : perm == HF_PERM_K ? c->n_head_kv : 0;
    return convert_out_add(out, gguf_name, (uint32_t)type, vec ? 1 : 2, ne, t->data, heads);
}

/* Llama 3 rope scaling: per frequency pair i, the divisor freq_i / new_freq_i
 * of transformers' _compute_llama3_parameters, as rope_freqs.weight. */
static optiml_status hf_add_llama3_rope_freqs(struct convert_out *out, const struct hf_config *c) {
    uint32_t n = c->head_dim / 2;
    float *div = malloc(n * sizeof(float));
    if (!div) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    TRY(convert_out_own(out, div));
    const double pi = 3.14159265358979323846;
    double low_wavelen = c->orig_ctx / c->low_freq_factor;
    double high_wavelen = c->orig_ctx / c->high_freq_factor;
    for (uint32_t i = 0; i < n; i++) {
        double freq = pow(c->rope_theta, -(2.0 * i) / c->head_dim);
        double wavelen = 2.0 * pi / freq;
        if (wavelen < high_wavelen) {
            div[i] = 1.0f;
        } else if (wavelen > low_wavelen) {
            div[i] = (float)c->rope_factor;
        } else {
            double smooth = (c->orig_ctx / wavelen - c->low_freq_factor) /
                            (c->high_freq_factor - c->low_freq_factor);
            double new_freq = (1.0 - smooth) * freq / c->rope_factor + smooth * freq;
            div[i] = (float)(freq / new_freq);
        }
    }
    uint64_t ne[1] = {n};
    return convert_out_add(out, "rope_freqs.weight", DTYPE_F32, 1, ne, div, 0);
}

static optiml_status hf_add_tensors(struct convert_out *out, const struct hf_weights *w,
                                    const struct hf_config *c) {
    TRY(hf_add_tensor(out, w, c, "model.embed_tokens.weight", "token_embd.weight", HF_DIM_VOCAB,
                      HF_DIM_EMBD, HF_PERM_NONE, false, NULL));
    if (c->rope_kind == HF_ROPE_LLAMA3) TRY(hf_add_llama3_rope_freqs(out, c));
    for (uint32_t l = 0; l < c->n_layer; l++) {
        for (size_t k = 0; k < HF_N_LAYER_TENSORS; k++) {
            const struct hf_tensor_map *m = &hf_layer_tensors[k];
            const bool bias = strstr(m->hf, ".bias") != NULL;
            if (bias && !c->qwen2) continue;
            char hf_name[128], gguf_name[64];
            snprintf(hf_name, sizeof(hf_name), "model.layers.%u.%s", l, m->hf);
            snprintf(gguf_name, sizeof(gguf_name), "blk.%u.%s.%s", l, m->gguf, bias ? "bias" : "weight");
            /* Qwen2 keeps Hugging Face's rotate-half layout: qwen2 is NeoX RoPE */
            TRY(hf_add_tensor(out, w, c, hf_name, gguf_name, m->rows, m->cols, c->qwen2 ? HF_PERM_NONE : m->perm,
                              false, NULL));
        }
    }
    TRY(hf_add_tensor(out, w, c, "model.norm.weight", "output_norm.weight", HF_DIM_EMBD,
                      HF_DIM_ONE, HF_PERM_NONE, false, NULL));
    if (!c->tied) {
        bool found;
        TRY(hf_add_tensor(out, w, c, "lm_head.weight", "output.weight", HF_DIM_VOCAB, HF_DIM_EMBD,
                          HF_PERM_NONE, true, &found));
        if (!found) LOG_INFO("no lm_head.weight: the output layer reuses token_embd.weight");
    }
    return OPTIML_OK;
}

/* Warn about every tensor of the checkpoint that the mapping leaves out. */
static void hf_warn_unused(const struct hf_weights *w, const struct hf_config *c) {
    for (size_t i = 0; i < w->n_files; i++) {
        for (uint64_t j = 0; j < w->files[i]->n_tensors; j++) {
            const char *name = w->files[i]->tensors[j].name;
            size_t n = strlen(name);
            if (strcmp(name, "model.embed_tokens.weight") == 0 ||
                strcmp(name, "model.norm.weight") == 0)
                continue;
            if (strcmp(name, "lm_head.weight") == 0) {
                if (c->tied) LOG_INFO("tie_word_embeddings: lm_head.weight is not written");
                continue;
            }
            if (n >= 19 && strcmp(name + n - 19, "rotary_emb.inv_freq") == 0) continue;
            unsigned layer;
            int pos = 0;
            if (sscanf(name, "model.layers.%u.%n", &layer, &pos) == 1 && pos > 0 &&
                layer < c->n_layer) {
                bool known = false;
                for (size_t k = 0; k < HF_N_LAYER_TENSORS; k++)
                    known |= strcmp(name + pos, hf_layer_tensors[k].hf) == 0;
                if (known) continue;
            }
            LOG_WARN("%s: skipping unknown tensor '%s'", w->files[i]->name, name);
        }
    }
}

/* ---- tokenizer ---------------------------------------------------------------------- */

/* The special-token ids to write (-1: none). */
struct hf_special {
    int64_t bos, eos, unk, pad, eot, eom;
};

/* Id of the token whose text is s, or -1. */
static int64_t hf_vocab_find(const struct convert_vocab *v, const char *s) {
    size_t n = strlen(s);
    for (uint32_t i = 0; i < v->n; i++)
        if (v->tokens[i] && v->lens[i] == n && memcmp(v->tokens[i], s, n) == 0) return i;
    return -1;
}

/* tokenizer.model -> the first pieces of a "llama" vocabulary of n_vocab
 * ids (the rest left unset); *n_pieces says how many. */
static optiml_status hf_tokenizer_spm(const char *path, const struct hf_config *c,
                                      struct convert_vocab *v, struct hf_special *sp,
                                      bool *add_space_prefix, uint32_t *n_pieces) {
    struct convert_map m;
    struct spm_model *spm = NULL;
    TRY(convert_map_open(path, &m));
    optiml_status st = spm_model_parse(m.data, m.size, path, &spm);
    if (st == OPTIML_OK && spm->n_pieces > c->n_vocab)
        st = optiml_fail(OPTIML_ERR_FORMAT,
                         "%s: %u pieces, more than config.json's vocab_size %u", path,
                         spm->n_pieces, c->n_vocab);
    if (st == OPTIML_OK) st = convert_vocab_init(v, c->n_vocab);
    for (uint32_t i = 0; st == OPTIML_OK && i < spm->n_pieces; i++) {
        const struct spm_piece *p = &spm->pieces[i];
        st = convert_vocab_set(v, i, p->piece, p->len, p->score, p->type);
        if (p->type == CONVERT_TOKEN_UNKNOWN && sp->unk < 0) sp->unk = i;
    }
    if (st == OPTIML_OK) {
        int32_t n = (int32_t)spm->n_pieces;
        if (sp->unk < 0 && spm->unk_id >= 0 && spm->unk_id < n) sp->unk = spm->unk_id;
        if (sp->bos < 0 && spm->bos_id >= 0 && spm->bos_id < n) sp->bos = spm->bos_id;
        if (sp->eos < 0 && spm->eos_id >= 0 && spm->eos_id < n) sp->eos = spm->eos_id;
        if (sp->pad < 0 && spm->pad_id >= 0 && spm->pad_id < n) sp->pad = spm->pad_id;
        *add_space_prefix = spm->add_dummy_prefix;
        *n_pieces = spm->n_pieces;
        LOG_INFO("%s: SentencePiece model, %u pieces", path, spm->n_pieces);
    }
    spm_model_free(spm);
    convert_map_close(&m);
    return st;
}

/* ---- tokenizer.json: the pre-tokenizer ---------------------------------------------- */

/* The regexes of the Split pre-tokenizers we know (tokenizer.json spelling). */
static const char hf_regex_llama3[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char hf_regex_qwen2[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char hf_regex_falcon_digits[] = "[0-9][0-9][0-9]";
/* DeepSeek LLM's five Splits (non-ASCII as universal character names). */
static const char *const hf_regex_deepseek_llm[5] = {
    "[\r\n]",
    "\\s?[A-Za-z\u00B5\u00C0-\u00D6\u00D8-\u00F6\u00F8-\u01BA\u01BC-\u01BF\u01C4-\u0293"
    "\u0295-\u02AF\u0370-\u0373\u0376\u0377\u037B-\u037D\u037F\u0386\u0388-\u038A\u038C"
    "\u038E-\u03A1\u03A3-\u03F5\u03F7-\u0481\u048A-\u052F\u0531-\u0556\u10A0-\u10C5"
    "\u13A0-\u13F5\u13F8-\u13FD\u1C90-\u1CBA\u1CBD-\u1CBF\u1D00-\u1D2B\u1D6B-\u1D77"
    "\u1D79-\u1D9A\u1E00-\u1F15\u1F18-\u1F1D\u1F20-\u1F45\u1F48-\u1F4D\u1F50-\u1F57\u1F59"
    "\u1F5B\u1F5D\u1F5F-\u1F7D\u1F80-\u1FB4\u1FB6-\u1FBC\u1FBE\u1FC2-\u1FC4\u1FC6-\u1FCC"
    "\u1FD0-\u1FD3\u1FD6-\u1FDB\u1FE0-\u1FEC\u1FF2-\u1FF4\u1FF6-\u1FFC\u2102\u2107"
    "\u210A-\u2113\u2115\u2119-\u211D\u2124\u2126\u2128\u212A-\u212D\u212F-\u2134\u2139"
    "\u213C-\u213F\u2145-\u2149\u214E\u2183\u2184\u2C00-\u2C7B\u2C7E-\u2CE4\u2CEB-\u2CEE"
    "\u2CF2\u2CF3\uA640-\uA66D\uA680-\uA69B\uA722-\uA76F\uA771-\uA787\uA78B-\uA78E"
    "\uAB70-\uABBF\uFB00-\uFB06\uFB13-\uFB17\uFF21-\uFF3A\uFF41-\uFF5A\U00010400-\U0001044F"
    "\U000104B0-\U000104D3\U000104D8-\U000104FB\U00010C80-\U00010CB2\U00010CC0-\U00010CF2"
    "\U000118A0-\U000118DF\U0001E900-\U0001E943]+",
    "\\s?[!-/:-~\uFF01-\uFF0F\uFF1A-\uFF5E\u2018-\u201F\u3000-\u3002]+",
    "\\s+$",
    "[\u4E00-\u9FA5\u0800-\u4E00\uAC00-\uD7FF]+",
};

/* Whether pre-tokenizer node p has this type; for ByteLevel also that it
 * adds no prefix space and uses (or not) its GPT-2 regex. */
static bool hf_pre_is(const json_t *p, const char *type) {
    const char *t = hf_json_str(p, "type");
    return t && strcmp(t, type) == 0;
}

static bool hf_pre_byte_level(const json_t *p, bool use_regex) {
    const json_t *r = json_object_get(p, "use_regex");
    bool regex = r ? json_is_true(r) : true;
    return hf_pre_is(p, "ByteLevel") && !json_is_true(json_object_get(p, "add_prefix_space")) &&
           regex == use_regex;
}

/* A Split on exactly this regex, isolating the matches. */
static bool hf_pre_split(const json_t *p, const char *regex) {
    const char *r = hf_json_str(json_object_get(p, "pattern"), "Regex");
    const char *behavior = hf_json_str(p, "behavior");
    return hf_pre_is(p, "Split") && r && strcmp(r, regex) == 0 && behavior &&
           strcmp(behavior, "Isolated") == 0 && !json_is_true(json_object_get(p, "invert"));
}

static bool hf_pre_digits(const json_t *p, bool individual) {
    return hf_pre_is(p, "Digits") &&
           json_is_true(json_object_get(p, "individual_digits")) == individual;
}

/* The tokenizer.ggml.pre name of a tokenizer.json pre_tokenizer, or NULL if
 * it is none of the pipelines the engine implements (src/unicode.c):
 *   llama-bpe  Split(Llama 3 regex), ByteLevel(use_regex false)
 *   qwen2      Split(Qwen2 regex), ByteLevel(use_regex false)
 *   default    ByteLevel(use_regex true)  (GPT-2's; = gpt2)
 *   smollm     Digits(individual), ByteLevel(use_regex true)  (= starcoder)
 *   falcon     Punctuation(contiguous), ByteLevel(use_regex true),
 *              Digits(not individual), Split([0-9][0-9][0-9])
 *   deepseek-llm  Split x 5 (DeepSeek LLM's regexes), Digits(individual),
 *              ByteLevel(use_regex false) */
static const char *hf_pre_name(const json_t *pre) {
    const json_t *one[1] = {pre}, *const *p = one;
    const json_t *items[7] = {NULL};
    size_t n = 1;
    if (hf_pre_is(pre, "Sequence")) {
        const json_t *list = json_object_get(pre, "pretokenizers");
        n = json_array_size(list);
        if (n > 7) return NULL;
        for (size_t i = 0; i < n; i++) items[i] = json_array_get(list, i);
        p = items;
    }
    if (n == 1 && hf_pre_byte_level(p[0], true)) return "default"; /* = "gpt2" */
    if (n == 2 && hf_pre_split(p[0], hf_regex_llama3) && hf_pre_byte_level(p[1], false))
        return "llama-bpe";
    if (n == 2 && hf_pre_split(p[0], hf_regex_qwen2) && hf_pre_byte_level(p[1], false))
        return "qwen2";
    if (n == 2 && hf_pre_digits(p[0], true) && hf_pre_byte_level(p[1], true)) return "smollm";
    const char *behavior = hf_json_str(p[0], "behavior");
    if (n == 4 && hf_pre_is(p[0], "Punctuation") && behavior &&
        strcmp(behavior, "Contiguous") == 0 && hf_pre_byte_level(p[1], true) &&
        hf_pre_digits(p[2], false) && hf_pre_split(p[3], hf_regex_falcon_digits))
        return "falcon";
    if (n == 7 && hf_pre_digits(p[5], true) && hf_pre_byte_level(p[6], false)) {
        bool splits = true;
        for (size_t i = 0; i < 5; i++) splits &= hf_pre_split(p[i], hf_regex_deepseek_llm[i]);
        if (splits) return "deepseek-llm";
    }
    return NULL;
}

/* Whether the post-processor puts a special token before the text (as
 * Llama 3's TemplateProcessing does with <|begin_of_text|>). */
static bool hf_post_adds_bos(const json_t *post) {
    if (hf_pre_is(post, "Sequence")) {
        size_t i;
        const json_t *p;
        json_array_foreach(json_object_get(post, "processors"), i, p) if (hf_post_adds_bos(p))
            return true;
        return false;
    }
    const json_t *first = json_array_get(json_object_get(post, "single"), 0);
    return hf_pre_is(post, "TemplateProcessing") && json_object_get(first, "SpecialToken");
}

/* True if tok (a tokenizer.json) is byte-level: ByteLevel pre-tokenizer or
 * decoder somewhere. */
static bool hf_is_byte_level(const json_t *node) {
    const char *type = hf_json_str(node, "type");
    if (type && strcmp(type, "ByteLevel") == 0) return true;
    const json_t *list = json_object_get(node, "pretokenizers");
    if (!list) list = json_object_get(node, "decoders");
    size_t i;
    const json_t *p;
    json_array_foreach(list, i, p) if (hf_is_byte_level(p)) return true;
    return false;
}

/* model.merges entry i as "a b" (merges are strings or [a, b] pairs). */
static char *hf_merge_str(const json_t *m) {
    if (json_is_string(m)) return strdup(json_string_value(m));
    if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
        json_is_string(json_array_get(m, 1))) {
        const char *a = json_string_value(json_array_get(m, 0));
        const char *b = json_string_value(json_array_get(m, 1));
        size_t n = strlen(a) + strlen(b) + 2;
        char *s = malloc(n);
        if (s) snprintf(s, n, "%s %s", a, b);
        return s;
    }
    return NULL;
}

static optiml_status hf_write_merges(struct convert_out *out, const char *path,
                                     const json_t *merges) {
    size_t n = json_array_size(merges);
    char **strs = calloc(n ? n : 1, sizeof(*strs));
    if (!strs) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    optiml_status st = OPTIML_OK;
    for (size_t i = 0; i < n && st == OPTIML_OK; i++) {
        strs[i] = hf_merge_str(json_array_get(merges, i));
        if (!strs[i])
            st = optiml_fail(OPTIML_ERR_FORMAT, "%s: model.merges[%zu] is not \"a b\" or [a, b]",
                             path, i);
    }
    if (st == OPTIML_OK)
        st = gguf_writer_set_arr_str(out->w, "tokenizer.ggml.merges", (const char *const *)strs,
                                     NULL, n);
    for (size_t i = 0; i < n; i++) free(strs[i]);
    free(strs);
    return st;
}

/* Set token id (from vocab or added_tokens) to text s; ids must be new. */
static optiml_status hf_bpe_set(struct convert_vocab *v, const char *path, int64_t id,
                                const char *s, int32_t type) {
    if (id < 0 || (uint64_t)id >= v->n)
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: token \"%.64s\" has id %lld, outside 0..%u",
                           path, s, (long long)id, v->n - 1);
    return convert_vocab_set(v, (uint32_t)id, s, strlen(s), 0.0f, type);
}

/* tokenizer.json's added_tokens with ids >= min_id: control tokens if
 * "special", else user-defined. */
static optiml_status hf_set_added_tokens(struct convert_vocab *v, const char *path,
                                         const json_t *added, int64_t min_id) {
    size_t i;
    const json_t *a;
    json_array_foreach(added, i, a) {
        const char *content = hf_json_str(a, "content");
        const json_t *aid = json_object_get(a, "id");
        if (!content || !json_is_integer(aid))
            return optiml_fail(OPTIML_ERR_FORMAT, "%s: added_tokens[%zu] lacks id or content",
                               path, i);
        if (json_integer_value(aid) < min_id) continue;
        int32_t t = json_is_true(json_object_get(a, "special")) ? CONVERT_TOKEN_CONTROL
                                                                : CONVERT_TOKEN_USER_DEFINED;
        TRY(hf_bpe_set(v, path, json_integer_value(aid), content, t));
    }
    return OPTIML_OK;
}

/* tokenizer.ggml.added_token_flags: per token, the matching options of
 * tokenizer.json's added_tokens (bit 0 lstrip, 1 rstrip, 2 single_word,
 * 3 normalized; a missing "normalized" is HF's default, !special). Written
 * only when some added token has one. */
static optiml_status hf_write_added_flags(struct convert_out *out, const json_t *added,
                                          uint32_t n_vocab) {
    uint8_t *flags = calloc(n_vocab ? n_vocab : 1, 1);
    if (!flags) return optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    bool any = false;
    size_t i;
    const json_t *a;
    json_array_foreach(added, i, a) {
        const json_t *aid = json_object_get(a, "id"), *norm = json_object_get(a, "normalized");
        if (!json_is_integer(aid) || json_integer_value(aid) < 0 ||
            json_integer_value(aid) >= n_vocab)
            continue;
        bool normalized = norm ? json_is_true(norm) : !json_is_true(json_object_get(a, "special"));
        uint8_t f = (uint8_t)(json_is_true(json_object_get(a, "lstrip")) << 0 |
                              json_is_true(json_object_get(a, "rstrip")) << 1 |
                              json_is_true(json_object_get(a, "single_word")) << 2 |
                              normalized << 3);
        flags[json_integer_value(aid)] = f;
        any |= f != 0;
    }
    optiml_status st = OPTIML_OK;
    if (any)
        st = gguf_writer_set_arr(out->w, "tokenizer.ggml.added_token_flags", GGUF_TYPE_UINT8,
                                 flags, n_vocab);
    free(flags);
    return st;
}

/* tokenizer.json (byte-level BPE) -> a "gpt2" vocabulary, merges and pre. */
static optiml_status hf_tokenizer_bpe(struct convert_out *out, const char *path, const json_t *tok,
                                      const struct hf_config *c, struct convert_vocab *v) {
    const json_t *model = json_object_get(tok, "model");
    const char *type = hf_json_str(model, "type");
    if (!type || strcmp(type, "BPE") != 0)
        return optiml_fail(OPTIML_ERR_UNSUPPORTED,
                           "%s: model.type %s is not supported (BPE only; SentencePiece models "
                           "need tokenizer.model)",
                           path, type ? type : "(none)");
    if (!hf_is_byte_level(json_object_get(tok, "pre_tokenizer")) &&
        !hf_is_byte_level(json_object_get(tok, "decoder")))
        return optiml_fail(OPTIML_ERR_UNSUPPORTED,
                           "%s: a BPE tokenizer that is not byte-level: convert it with its "
                           "tokenizer.model",
                           path);
    const json_t *vocab = json_object_get(model, "vocab");
    const json_t *merges = json_object_get(model, "merges");
    const json_t *added = json_object_get(tok, "added_tokens");
    if (!json_is_object(vocab) || !json_is_array(merges))
        return optiml_fail(OPTIML_ERR_FORMAT, "%s: model.vocab or model.merges missing", path);

    TRY(convert_vocab_init(v, c->n_vocab));
    const char *key;
    const json_t *id;
    json_object_foreach((json_t *)vocab, key, id) {
        if (!json_is_integer(id))
            return optiml_fail(OPTIML_ERR_FORMAT, "%s: model.vocab[\"%.64s\"] is not an id", path,
                               key);
        if (json_integer_value(id) >= 0 && json_integer_value(id) < c->n_vocab &&
            v->tokens[json_integer_value(id)])
            return optiml_fail(OPTIML_ERR_FORMAT, "%s: two tokens have id %lld", path,
                               (long long)json_integer_value(id));
        TRY(hf_bpe_set(v, path, json_integer_value(id), key, CONVERT_TOKEN_NORMAL));
    }
    TRY(hf_set_added_tokens(v, path, added, 0));
    uint32_t n_pad;
    TRY(convert_vocab_pad(v, c->n_vocab, &n_pad));
    if (n_pad) LOG_INFO("%s: %u ids without a token padded as [PADn]", path, n_pad);

    const char *pre = hf_pre_name(json_object_get(tok, "pre_tokenizer"));
    if (!pre)
        return optiml_fail(OPTIML_ERR_UNSUPPORTED,
                           "%s: pre_tokenizer is none of the pipelines of llama-bpe, qwen2, gpt2, "
                           "smollm/starcoder, falcon or deepseek-llm (see tools/convert_hf.c, "
                           "hf_pre_name)",
                           path);
    const json_t *normalizer = json_object_get(tok, "normalizer");
    const char *norm = hf_json_str(normalizer, "type");
    bool identity = norm && strcmp(norm, "Sequence") == 0 &&
                    json_array_size(json_object_get(normalizer, "normalizers")) == 0;
    if (norm && !identity) /* DeepSeek LLM has an empty Sequence: nothing to apply */
        LOG_WARN("%s: normalizer %s is not applied by the engine: texts must come normalized",
                 path, norm);
    TRY(gguf_writer_set_str(out->w, "tokenizer.ggml.pre", pre));
    TRY(hf_write_merges(out, path, merges));
    LOG_INFO("%s: byte-level BPE, %u tokens, %zu merges, pre-tokenizer %s", path, v->n - n_pad,
             json_array_size(merges), pre);
    return OPTIML_OK;
}

/* The text of a tokenizer_config.json special token ("<s>" or
 * {"content": "<s>", ...}), or NULL. */
static const char *hf_token_text(const json_t *cfg, const char *key) {
    const json_t *v = json_object_get(cfg, key);
    if (json_is_object(v)) return hf_json_str(v, "content");
    return json_is_string(v) ? json_string_value(v) : NULL;
}

/* The tokenizer: tokenizer.model, else tokenizer.json; tokenizer_config.json
 * adds the chat template and the add_bos/add_eos flags. */
static optiml_status hf_tokenizer(struct convert_out *out, const char *dir,
                                  const struct hf_config *c) {
    struct convert_vocab v = {0};
    struct hf_special sp = {c->bos_id, c->eos_id, -1, c->pad_id, -1, -1};
    json_t *tok = NULL, *tcfg = NULL;
    bool spm = false, add_space_prefix = false;
    char *spm_path = hf_path(dir, "tokenizer.model");
    char *json_path = hf_path(dir, "tokenizer.json");
    optiml_status st = spm_path && json_path ? OPTIML_OK
                                             : optiml_fail(OPTIML_ERR_NOMEM, "out of memory");

    bool have_spm = st == OPTIML_OK && hf_file_exists(spm_path);
    bool have_json = st == OPTIML_OK && hf_file_exists(json_path);
    if (st == OPTIML_OK && !have_spm && !have_json)
        st = optiml_fail(OPTIML_ERR_IO, "%s: no tokenizer.model or tokenizer.json", dir);
    if (have_spm) {
        uint32_t n_pieces = 0;
        st = hf_tokenizer_spm(spm_path, c, &v, &sp, &add_space_prefix, &n_pieces);
        spm = st == OPTIML_OK;
        if (st == OPTIML_OK && have_json) { /* tokens added beyond the model's pieces */
            st = hf_json_load(dir, "tokenizer.json", true, 0, &tok);
            if (st == OPTIML_OK)
                st = hf_set_added_tokens(&v, json_path, json_object_get(tok, "added_tokens"),
                                         n_pieces);
        } else if (st != OPTIML_OK && have_json && st != OPTIML_ERR_NOMEM) {
            /* e.g. a tiktoken-format tokenizer.model: use tokenizer.json */
            LOG_WARN("%s; using tokenizer.json instead", optiml_last_error());
            convert_vocab_free(&v);
            sp = (struct hf_special){c->bos_id, c->eos_id, -1, c->pad_id, -1, -1};
            st = OPTIML_OK;
        }
        if (st == OPTIML_OK && spm) st = convert_vocab_pad(&v, c->n_vocab, NULL);
        if (st == OPTIML_OK && spm) st = convert_vocab_write(out, &v, "llama", true);
    }
    if (st == OPTIML_OK && !spm) {
        st = hf_json_load(dir, "tokenizer.json", true, 0, &tok);
        if (st == OPTIML_OK) st = hf_tokenizer_bpe(out, json_path, tok, c, &v);
        if (st == OPTIML_OK) st = convert_vocab_write(out, &v, "gpt2", false);
    }
    if (st == OPTIML_OK && tok)
        st = hf_write_added_flags(out, json_object_get(tok, "added_tokens"), v.n);
    /* Only strings and booleans are read from it; its model_max_length is
     * often 1e30 written as an integer, too big for jansson's integers. */
    if (st == OPTIML_OK)
        st = hf_json_load(dir, "tokenizer_config.json", false, JSON_DECODE_INT_AS_REAL, &tcfg);

    if (st == OPTIML_OK) {
        /* Ids config.json did not give: from the tokenizer's own texts. */
        const char *bos = hf_token_text(tcfg, "bos_token"), *eos = hf_token_text(tcfg, "eos_token");
        if (sp.bos < 0 && bos) sp.bos = hf_vocab_find(&v, bos);
        if (sp.eos < 0 && eos) sp.eos = hf_vocab_find(&v, eos);
        if (!spm) { /* the end-of-turn marker of the chat format */
            static const char *const eot[] = {"<|eot_id|>", "<|im_end|>", "<|end|>",
                                              "<end_of_turn>"};
            for (size_t i = 0; i < sizeof(eot) / sizeof(eot[0]) && sp.eot < 0; i++)
                sp.eot = hf_vocab_find(&v, eot[i]);
            sp.eom = hf_vocab_find(&v, "<|eom_id|>");
        }
        static const char *const keys[] = {
            "tokenizer.ggml.bos_token_id",     "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
            "tokenizer.ggml.eot_token_id",     "tokenizer.ggml.eom_token_id",
        };
        const int64_t ids[] = {sp.bos, sp.eos, sp.unk, sp.pad, sp.eot, sp.eom};
        for (size_t i = 0; i < 6 && st == OPTIML_OK; i++) {
            if (ids[i] < 0) continue;
            if ((uint64_t)ids[i] >= v.n)
                LOG_WARN("%s = %lld is outside the vocabulary: not written", keys[i],
                         (long long)ids[i]);
            else
                st = gguf_writer_set_u32(out->w, keys[i], (uint32_t)ids[i]);
        }
    }
    if (st == OPTIML_OK) {
        const json_t *add_bos = json_object_get(tcfg, "add_bos_token");
        const json_t *add_eos = json_object_get(tcfg, "add_eos_token");
        if (json_is_boolean(add_bos))
            st = gguf_writer_set_bool(out->w, "tokenizer.ggml.add_bos_token", json_is_true(add_bos));
        else if (spm)
            st = gguf_writer_set_bool(out->w, "tokenizer.ggml.add_bos_token", true);
        else /* byte-level BPE: BOS if the post-processor adds one; Llama 3 models
              * (some of whose tokenizer.json lack that step) are trained with it */
            st = gguf_writer_set_bool(
                out->w, "tokenizer.ggml.add_bos_token",
                hf_post_adds_bos(json_object_get(tok, "post_processor")) ||
                    (sp.bos >= 0 && hf_pre_name(json_object_get(tok, "pre_tokenizer")) &&
                     strcmp(hf_pre_name(json_object_get(tok, "pre_tokenizer")), "llama-bpe") == 0));
        if (st == OPTIML_OK && json_is_boolean(add_eos))
            st = gguf_writer_set_bool(out->w, "tokenizer.ggml.add_eos_token", json_is_true(add_eos));
        if (st == OPTIML_OK && spm)
            st = gguf_writer_set_bool(out->w, "tokenizer.ggml.add_space_prefix", add_space_prefix);
    }
    if (st == OPTIML_OK) {
        /* A string, or a list of {"name", "template"}: take "default". */
        const json_t *tmpl = json_object_get(tcfg, "chat_template");
        const char *text = json_is_string(tmpl) ? json_string_value(tmpl) : NULL;
        size_t i;
        const json_t *t;
        json_array_foreach(tmpl, i, t) {
            const char *name = hf_json_str(t, "name");
            if (name && strcmp(name, "default") == 0) text = hf_json_str(t, "template");
        }
        if (text) st = gguf_writer_set_str(out->w, "tokenizer.chat_template", text);
    }
    json_decref(tcfg);
    json_decref(tok);
    convert_vocab_free(&v);
    free(spm_path);
    free(json_path);
    return st;
}

/* ---- sparse FFN (--sparse) ------------------------------------------------------------ */

/* ffn_down_t of every layer (down_proj's columns as rows), then the side
 * file's predictors, statistics and keys. *side stays open until written. */
static optiml_status hf_add_sparse(struct convert_out *out, const struct hf_weights *w,
                                   const struct hf_config *c, const char *path, gguf_file **side) {
    TRY(gguf_open(path, side));
    for (uint32_t l = 0; l < c->n_layer; l++) {
        char hf_name[128], gguf_name[64];
        snprintf(hf_name, sizeof(hf_name), "model.layers.%u.mlp.down_proj.weight", l);
        snprintf(gguf_name, sizeof(gguf_name), "blk.%u.ffn_down_t.weight", l);
        const struct safetensors_tensor *t = hf_weights_find(w, hf_name, NULL);
        if (!t) return optiml_fail(OPTIML_ERR_FORMAT, "missing tensor '%s'", hf_name);
        const uint64_t ne[2] = {c->n_embd, c->n_ff}; /* checked by hf_add_tensors */
        TRY(convert_out_add_transposed(out, gguf_name, (uint32_t)safetensors_dtype_to_gguf(t->dtype), ne,
                                       t->data));
    }
    return convert_add_sparse(out, *side, c->n_layer, c->n_embd, c->n_ff);
}

/* ---- driver ------------------------------------------------------------------------ */

static optiml_status hf_write_metadata(struct convert_out *out, const struct hf_config *c,
                                       const char *name) {
    struct convert_hparams hp = {
        .name = name,
        .n_ctx = c->n_ctx,
        .n_embd = c->n_embd,
        .n_layer = c->n_layer,
        .n_ff = c->n_ff,
        .n_head = c->n_head,
        .n_head_kv = c->n_head_kv,
        .head_dim = c->head_dim,
        .n_vocab = c->n_vocab,
        .rms_eps = (float)c->rms_eps,
        .rope_theta = (float)c->rope_theta,
        .activation = c->activation,
        .arch = c->qwen2 ? "qwen2" : "llama",
    };
    TRY(convert_set_hparams(out, &hp));
    if (c->rope_kind == HF_ROPE_LINEAR) {
        char key[64];
        snprintf(key, sizeof(key), "%s.rope.scaling.type", hp.arch);
        TRY(gguf_writer_set_str(out->w, key, "linear"));
        snprintf(key, sizeof(key), "%s.rope.scaling.factor", hp.arch);
        TRY(gguf_writer_set_f32(out->w, key, (float)c->rope_factor));
    }
    return OPTIML_OK;
}

/* The type matrices are written in: --outtype, else config.json's dtype,
 * else the embedding's. */
static optiml_status hf_pick_outtype(const struct convert_params *params,
                                     const struct hf_config *c, const struct hf_weights *w,
                                     uint32_t *out) {
    if (params->outtype >= 0) {
        *out = (uint32_t)params->outtype;
        return OPTIML_OK;
    }
    int t = c->dtype;
    if (t < 0) {
        const struct safetensors_tensor *e = hf_weights_find(w, "model.embed_tokens.weight", NULL);
        t = e ? safetensors_dtype_to_gguf(e->dtype) : -1;
    }
    if (t != DTYPE_F32 && t != DTYPE_F16 && t != DTYPE_BF16)
        return optiml_fail(OPTIML_ERR_UNSUPPORTED,
                           "cannot tell the checkpoint's dtype (f32, f16 or bf16): pass --outtype");
    *out = (uint32_t)t;
    return OPTIML_OK;
}

optiml_status convert_hf(const char *dir, const struct convert_params *params) {
    struct hf_config c;
    struct hf_weights w = {0};
    struct convert_out out = {0};
    json_t *cfg = NULL;
    char *name = NULL;
    gguf_file *side = NULL; /* --sparse */
    uint32_t outtype = DTYPE_F32;

    optiml_status st = hf_json_load(dir, "config.json", true, 0, &cfg);
    if (st == OPTIML_OK) st = hf_config_read(cfg, &c);
    if (st == OPTIML_OK) {
        LOG_INFO("%s: %u layers, n_embd %u, n_ff %u, %u heads (%u kv, head_dim %u), vocab %u, "
                 "ctx %u, %s, rope theta %g%s",
                 dir, c.n_layer, c.n_embd, c.n_ff, c.n_head, c.n_head_kv, c.head_dim, c.n_vocab,
                 c.n_ctx, c.activation, c.rope_theta,
                 c.rope_kind == HF_ROPE_LLAMA3   ? " (llama3 scaling)"
                 : c.rope_kind == HF_ROPE_LINEAR ? " (linear scaling)"
                                                 : "");
        st = hf_weights_load(&w, dir);
    }
    if (st == OPTIML_OK) st = hf_pick_outtype(params, &c, &w, &outtype);
    if (st == OPTIML_OK) st = convert_out_init(&out, outtype);
    if (st == OPTIML_OK && !params->name && !(name = convert_path_name(dir, false)))
        st = optiml_fail(OPTIML_ERR_NOMEM, "out of memory");
    if (st == OPTIML_OK) st = hf_write_metadata(&out, &c, params->name ? params->name : name);
    if (st == OPTIML_OK) st = hf_tokenizer(&out, dir, &c);
    if (st == OPTIML_OK) st = hf_add_tensors(&out, &w, &c);
    if (st == OPTIML_OK && params->sparse) st = hf_add_sparse(&out, &w, &c, params->sparse, &side);
    if (st == OPTIML_OK) {
        hf_warn_unused(&w, &c);
        st = convert_out_write(&out, params->outfile);
    }
    free(name);
    convert_out_free(&out);
    gguf_close(side);
    hf_weights_free(&w);
    json_decref(cfg);
    return st;
}

#else /* !OPTIML_HAVE_JANSSON */

optiml_status convert_hf(const char *dir, const struct convert_params *params) {
    (void)dir;
    (void)params;
    return optiml_fail(OPTIML_ERR_UNSUPPORTED,
                       "--hf: built without jansson: install libjansson-dev and rebuild");
}

#endif /* OPTIML_HAVE_JANSSON */
