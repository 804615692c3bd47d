/*
 * test_convert_llama2c.c - optiml-convert --llama2c end to end.
 *
 * Runs the built tool (OPTIML_BIN_DIR) on models/stories260K.bin +
 * tok512.bin, opens the result with gguf_open and checks every metadata
 * value and every tensor against the checkpoint, read here independently:
 * f32 bytes must be identical, f16 values the round-to-nearest-even f16 of
 * the checkpoint's floats, norms f32 in both. A synthetic checkpoint with a
 * separate classifier (negative vocab_size) checks output.weight. Then the
 * error paths: a truncated checkpoint, a tokenizer with the wrong token
 * count, missing files and bad flags must fail with exit code 1, one error
 * line naming the problem and no output file.
 */
#define _POSIX_C_SOURCE 200809L
#include "test.h"

#include "dtype.h"
#include "gguf.h"

#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define CONVERT OPTIML_BIN_DIR "/optiml-convert"
#define CKPT OPTIML_MODELS "/stories260K.bin"
#define TOK OPTIML_MODELS "/tok512.bin"

#define EXPECT(cond) CHECK(cond, "%s", "")

static char tmp_dir[64];

/* ---- helpers -------------------------------------------------------------- */

static uint8_t *read_file(const char *path, size_t *n) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    uint8_t *buf = NULL;
    if (fseek(fp, 0, SEEK_END) == 0) {
        long size = ftell(fp);
        if (size >= 0 && fseek(fp, 0, SEEK_SET) == 0 && (buf = malloc((size_t)size + 1)))
            *n = fread(buf, 1, (size_t)size, fp);
    }
    fclose(fp);
    return buf;
}

static bool write_file(const char *path, const void *data, size_t n) {
    FILE *fp = fopen(path, "wb");
    if (!fp) return false;
    bool ok = fwrite(data, 1, n, fp) == n;
    return fclose(fp) == 0 && ok;
}

static const char *tmp_path(char *buf, size_t cap, const char *name) {
    snprintf(buf, cap, "%s/%s", tmp_dir, name);
    return buf;
}

static bool file_exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

/* Run optiml-convert with args (NULL-terminated); its standard error goes
 * into err (NUL-terminated, truncated to cap). Returns the exit code, or
 * -1 if it did not exit normally. */
static int run_convert(const char *const *args, char *err, size_t cap) {
    char err_path[128];
    tmp_path(err_path, sizeof(err_path), "stderr.txt");
    const char *argv[32] = {CONVERT};
    int argc = 1;
    for (; args[argc - 1] && argc < 31; argc++) argv[argc] = args[argc - 1];
    argv[argc] = NULL;
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) _exit(126);
        dup2(fd, 2);
        close(fd);
        execv(CONVERT, (char *const *)argv);
        _exit(127);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid) return -1;
    size_t n = 0;
    uint8_t *text = read_file(err_path, &n);
    if (err && cap) {
        size_t k = text ? (n < cap - 1 ? n : cap - 1) : 0;
        if (k) memcpy(err, text, k);
        err[k] = '\0';
    }
    free(text);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* Number of lines of s starting with "optiml-convert: error: ". */
static int error_lines(const char *s) {
    int n = 0;
    for (const char *p = s; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL)
        n += strncmp(p, "optiml-convert: error: ", 23) == 0;
    return n;
}

/* ---- the checkpoint, read independently -------------------------------- */

struct ckpt {
    int32_t dim, hidden, n_layer, n_head, n_kv, vocab, seq;
    const float *embd, *rms_att, *wq, *wk, *wv, *wo, *rms_ffn, *w1, *w2, *w3, *rms_final, *wcls;
};

/* Walk the float arrays in file order (freq_cis_real/imag skipped). */
static bool ckpt_read(const uint8_t *data, size_t size, struct ckpt *c) {
    if (size < 28) return false;
    memcpy(&c->dim, data, 28);
    int64_t V = c->vocab < 0 ? -c->vocab : c->vocab, D = c->dim, L = c->n_layer;
    int64_t hs = D / c->n_head, kv = (int64_t)c->n_kv * hs, F = c->hidden;
    const float *p = (const float *)(data + 28);
    c->embd = p, p += V * D;
    c->rms_att = p, p += L * D;
    c->wq = p, p += L * D * D;
    c->wk = p, p += L * kv * D;
    c->wv = p, p += L * kv * D;
    c->wo = p, p += L * D * D;
    c->rms_ffn = p, p += L * D;
    c->w1 = p, p += L * F * D;
    c->w2 = p, p += L * D * F;
    c->w3 = p, p += L * F * D;
    c->rms_final = p, p += D;
    p += (int64_t)c->seq * hs; /* freq_cis_real, freq_cis_imag */
    c->wcls = c->vocab < 0 ? p : NULL;
    if (c->vocab < 0) p += V * D;
    return (const uint8_t *)p == data + size;
}

/* ---- checks of a converted file ----------------------------------------- */

static uint32_t get_u32(const gguf_file *f, const char *key) {
    uint32_t v = 0xdeadbeef;
    CHECK(gguf_get_u32(f, key, &v) == OPTIML_OK, "%s", key);
    return v;
}

static bool str_is(const gguf_file *f, const char *key, const char *want) {
    struct gguf_str s = {0, NULL};
    return gguf_get_str(f, key, &s) == OPTIML_OK && gguf_str_eq(s, want);
}

static void check_metadata(const gguf_file *f, uint32_t file_type, const uint8_t *tok,
                           size_t tok_size) {
    EXPECT(str_is(f, "general.architecture", "llama"));
    EXPECT(str_is(f, "general.name", "stories260K"));
    EXPECT(get_u32(f, "general.file_type") == file_type);
    EXPECT(get_u32(f, "llama.context_length") == 512);
    EXPECT(get_u32(f, "llama.embedding_length") == 64);
    EXPECT(get_u32(f, "llama.block_count") == 5);
    EXPECT(get_u32(f, "llama.feed_forward_length") == 172);
    EXPECT(get_u32(f, "llama.attention.head_count") == 8);
    EXPECT(get_u32(f, "llama.attention.head_count_kv") == 4);
    EXPECT(get_u32(f, "llama.rope.dimension_count") == 8);
    float eps = 0, theta = 0;
    EXPECT(gguf_get_f32(f, "llama.attention.layer_norm_rms_epsilon", &eps) == OPTIML_OK);
    EXPECT(gguf_get_f32(f, "llama.rope.freq_base", &theta) == OPTIML_OK);
    EXPECT(eps == 1e-5f);
    EXPECT(theta == 10000.0f);
    EXPECT(str_is(f, "optiml.ffn_activation", "silu"));

    EXPECT(str_is(f, "tokenizer.ggml.model", "llama"));
    EXPECT(get_u32(f, "tokenizer.ggml.bos_token_id") == 1);
    EXPECT(get_u32(f, "tokenizer.ggml.eos_token_id") == 2);
    EXPECT(get_u32(f, "tokenizer.ggml.unknown_token_id") == 0);
    bool b = false;
    EXPECT(gguf_get_bool(f, "tokenizer.ggml.add_bos_token", &b) == OPTIML_OK && b);
    EXPECT(gguf_get_bool(f, "tokenizer.ggml.add_space_prefix", &b) == OPTIML_OK && b);

    const struct gguf_value *tokens = NULL, *scores = NULL, *types = NULL;
    EXPECT(gguf_get_arr(f, "tokenizer.ggml.tokens", GGUF_TYPE_STRING, &tokens) == OPTIML_OK);
    EXPECT(gguf_get_arr(f, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, &scores) == OPTIML_OK);
    EXPECT(gguf_get_arr(f, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, &types) == OPTIML_OK);
    if (!tokens || !scores || !types) return;
    CHECK(tokens->arr.n == 512 && scores->arr.n == 512 && types->arr.n == 512, "%llu tokens",
          (unsigned long long)tokens->arr.n);
    if (tokens->arr.n != 512 || scores->arr.n != 512 || types->arr.n != 512) return;

    /* Walk tok512.bin: every piece with ' ' -> U+2581, types, scores. */
    const struct gguf_str *strs = tokens->arr.data;
    size_t off = 4;
    int bad_pieces = 0, bad_types = 0, bad_scores = 0, n_byte = 0;
    for (uint32_t i = 0; i < 512 && off + 8 <= tok_size; i++) {
        float score;
        int32_t len;
        memcpy(&score, tok + off, 4);
        memcpy(&len, tok + off + 4, 4);
        const char *s = (const char *)tok + off + 8;
        off += 8 + (size_t)len;
        char want[64] = "";
        size_t k = 0;
        if (i == 1 || i == 2) {
            strcpy(want, i == 1 ? "<s>" : "</s>");
            k = strlen(want);
        } else {
            for (int32_t j = 0; j < len && k + 3 < sizeof(want); j++) {
                if (s[j] == ' ') {
                    memcpy(want + k, "\xe2\x96\x81", 3);
                    k += 3;
                } else {
                    want[k++] = s[j];
                }
            }
        }
        bool is_byte = len == 6 && strncmp(s, "<0x", 3) == 0 && s[5] == '>';
        int32_t want_type = i == 0 ? 2 : i <= 2 ? 3 : is_byte ? 6 : 1;
        n_byte += is_byte;
        bad_pieces += strs[i].n != k || memcmp(strs[i].data, want, k) != 0;
        bad_types += gguf_arr_i64(types, i) != want_type;
        bad_scores += (float)gguf_arr_f64(scores, i) != score;
    }
    CHECK(bad_pieces == 0, "%d pieces differ", bad_pieces);
    CHECK(bad_types == 0, "%d token types differ", bad_types);
    CHECK(bad_scores == 0, "%d scores differ", bad_scores);
    CHECK(n_byte == 256, "%d byte tokens", n_byte);
    EXPECT(gguf_str_eq(strs[0], "<unk>"));
    EXPECT(gguf_str_eq(strs[1], "<s>"));
    EXPECT(gguf_str_eq(strs[2], "</s>"));
}

/* Tensor `name` must hold n_out rows of n_in values equal to src (f32) or
 * rounded from it (f16). */
static void check_tensor(const gguf_file *f, const char *name, uint32_t type, uint64_t n_in,
                         uint64_t n_out, const float *src) {
    const struct gguf_tensor_info *t = gguf_find_tensor(f, name);
    CHECK(t != NULL, "tensor %s missing", name);
    if (!t) return;
    uint32_t n_dims = n_out == 1 ? 1 : 2;
    CHECK(t->n_dims == n_dims && t->ne[0] == n_in && (n_dims == 1 || t->ne[1] == n_out),
          "%s: shape (%llu, %llu), expected (%llu, %llu)", name, (unsigned long long)t->ne[0],
          (unsigned long long)t->ne[1], (unsigned long long)n_in, (unsigned long long)n_out);
    CHECK(t->type == type, "%s: type %s, expected %s", name, dtype_name(t->type),
          dtype_name(type));
    if (t->type != type || t->ne[0] != n_in || (n_dims == 2 && t->ne[1] != n_out)) return;
    uint64_t n = n_in * n_out, bad = 0;
    if (type == DTYPE_F32) {
        bad = memcmp(t->data, src, n * 4) != 0;
    } else {
        const uint8_t *p = t->data;
        for (uint64_t i = 0; i < n; i++) {
            f16_t h;
            memcpy(&h, p + 2 * i, 2);
            float back = f16_to_f32(h);
            /* nearest: within half an f16 ulp (2^-11 relative, 2^-25 subnormal) */
            bad += h != f32_to_f16(src[i]) ||
                   fabsf(back - src[i]) > fmaxf(fabsf(src[i]) * (1.0f / 2048), 1.0f / 33554432);
        }
    }
    CHECK(bad == 0, "%s: %llu values differ from the checkpoint", name, (unsigned long long)bad);
}

static void check_tensors(const gguf_file *f, const struct ckpt *c, uint32_t mat) {
    uint64_t D = (uint64_t)c->dim, F = (uint64_t)c->hidden;
    uint64_t V = (uint64_t)(c->vocab < 0 ? -c->vocab : c->vocab);
    uint64_t kv = (uint64_t)c->n_kv * (D / (uint64_t)c->n_head);
    CHECK(f->n_tensors == 2 + 9 * (uint64_t)c->n_layer + (c->wcls != NULL), "%llu tensors",
          (unsigned long long)f->n_tensors);
    check_tensor(f, "token_embd.weight", mat, D, V, c->embd);
    for (int l = 0; l < c->n_layer; l++) {
        char name[64];
#define LAYER(suffix, type, n_in, n_out, base)                                    \
    snprintf(name, sizeof(name), "blk.%d." suffix ".weight", l);                  \
    check_tensor(f, name, type, n_in, n_out, (base) + (uint64_t)l * (n_in) * (n_out))
        LAYER("attn_norm", DTYPE_F32, D, 1, c->rms_att);
        LAYER("attn_q", mat, D, D, c->wq);
        LAYER("attn_k", mat, D, kv, c->wk);
        LAYER("attn_v", mat, D, kv, c->wv);
        LAYER("attn_output", mat, D, D, c->wo);
        LAYER("ffn_norm", DTYPE_F32, D, 1, c->rms_ffn);
        LAYER("ffn_gate", mat, D, F, c->w1);
        LAYER("ffn_down", mat, F, D, c->w2);
        LAYER("ffn_up", mat, D, F, c->w3);
#undef LAYER
    }
    check_tensor(f, "output_norm.weight", DTYPE_F32, D, 1, c->rms_final);
    if (c->wcls)
        check_tensor(f, "output.weight", mat, D, V, c->wcls);
    else
        CHECK(gguf_find_tensor(f, "output.weight") == NULL, "shared classifier written");
}

/* ---- tests -------------------------------------------------------------------- */

static void test_convert(const uint8_t *ckpt, size_t ckpt_size, const uint8_t *tok,
                         size_t tok_size, const char *outtype, uint32_t mat, uint32_t file_type) {
    char out[128], err[8192];
    tmp_path(out, sizeof(out), "stories260K.gguf");
    const char *args[] = {"--llama2c", CKPT, "--tokenizer", TOK, "--outfile", out,
                          "--outtype", outtype, NULL};
    int rc = run_convert(args, err, sizeof(err));
    CHECK(rc == 0, "optiml-convert --outtype %s exited %d:\n%s", outtype, rc, err);
    EXPECT(error_lines(err) == 0);
    EXPECT(strstr(err, "attn_q") != NULL); /* progress lines name the tensors */
    gguf_file *f = NULL;
    CHECK(gguf_open(out, &f) == OPTIML_OK, "%s", optiml_last_error());
    if (!f) return;
    struct ckpt c;
    CHECK(ckpt_read(ckpt, ckpt_size, &c), "stories260K.bin layout");
    check_metadata(f, file_type, tok, tok_size);
    check_tensors(f, &c, mat);
    gguf_close(f);
    unlink(out);
}

/* vocab_size < 0: a separate classifier follows the other weights. */
static void test_separate_classifier(const uint8_t *ckpt, size_t ckpt_size) {
    int32_t dim, vocab;
    memcpy(&dim, ckpt, 4);
    memcpy(&vocab, ckpt + 20, 4);
    size_t wcls = (size_t)vocab * (size_t)dim * 4;
    uint8_t *buf = malloc(ckpt_size + wcls);
    if (!buf) return;
    memcpy(buf, ckpt, ckpt_size);
    int32_t neg = -vocab;
    memcpy(buf + 20, &neg, 4);
    for (size_t i = 0; i < wcls / 4; i++) {
        float v = (float)((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
        memcpy(buf + ckpt_size + 4 * i, &v, 4);
    }
    char path[128], out[128], err[8192];
    tmp_path(path, sizeof(path), "wcls.bin");
    tmp_path(out, sizeof(out), "wcls.gguf");
    EXPECT(write_file(path, buf, ckpt_size + wcls));
    const char *args[] = {"--llama2c", path, "--tokenizer", TOK, "--outfile", out,
                          "--name", "sep", NULL};
    int rc = run_convert(args, err, sizeof(err));
    CHECK(rc == 0, "exit %d:\n%s", rc, err);
    gguf_file *f = NULL;
    CHECK(gguf_open(out, &f) == OPTIML_OK, "%s", optiml_last_error());
    if (f) {
        struct ckpt c;
        CHECK(ckpt_read(buf, ckpt_size + wcls, &c), "synthetic layout");
        EXPECT(c.wcls != NULL);
        EXPECT(str_is(f, "general.name", "sep"));
        check_tensors(f, &c, DTYPE_F32);
        gguf_close(f);
    }
    unlink(path);
    unlink(out);
    free(buf);
}

/* args must fail with exit 1, one error line containing needle, and leave
 * no output file. */
static void expect_failure(const char *what, const char *const *args, const char *out,
                           const char *needle) {
    char err[8192];
    int rc = run_convert(args, err, sizeof(err));
    CHECK(rc == 1, "%s: exit %d, expected 1:\n%s", what, rc, err);
    CHECK(error_lines(err) == 1, "%s: %d error lines:\n%s", what, error_lines(err), err);
    CHECK(strstr(err, needle) != NULL, "%s: no \"%s\" in:\n%s", what, needle, err);
    if (out) CHECK(!file_exists(out), "%s: left %s behind", what, out);
}

static void test_errors(const uint8_t *ckpt, size_t ckpt_size, const uint8_t *tok,
                        size_t tok_size) {
    char out[128], bad[128], badtok[128];
    tmp_path(out, sizeof(out), "fail.gguf");
    tmp_path(bad, sizeof(bad), "truncated.bin");
    tmp_path(badtok, sizeof(badtok), "tok511.bin");

    /* A checkpoint four bytes short, and one with trailing garbage. */
    EXPECT(write_file(bad, ckpt, ckpt_size - 4));
    const char *a1[] = {"--llama2c", bad, "--tokenizer", TOK, "--outfile", out, NULL};
    expect_failure("truncated checkpoint", a1, out, "truncated.bin");
    expect_failure("truncated checkpoint", a1, out, "bytes");
    uint8_t *longer = calloc(1, ckpt_size + 8);
    if (longer) {
        memcpy(longer, ckpt, ckpt_size);
        EXPECT(write_file(bad, longer, ckpt_size + 8));
        expect_failure("checkpoint with trailing bytes", a1, out, "implies");
        free(longer);
    }
    EXPECT(write_file(bad, ckpt, 20));
    expect_failure("header only", a1, out, "too short");

    /* A tokenizer with its last token cut off: 511 tokens for vocab 512. */
    size_t off = 4, last = 4;
    while (off + 8 <= tok_size) {
        int32_t len;
        memcpy(&len, tok + off + 4, 4);
        last = off;
        off += 8 + (size_t)len;
    }
    EXPECT(write_file(badtok, tok, last));
    const char *a2[] = {"--llama2c", CKPT, "--tokenizer", badtok, "--outfile", out, NULL};
    expect_failure("511-token tokenizer", a2, out, "511 tokens");
    EXPECT(write_file(badtok, tok, last + 5)); /* a record cut in the middle */
    expect_failure("truncated tokenizer", a2, out, "truncated");

    const char *a3[] = {"--llama2c", OPTIML_MODELS "/no-such.bin", "--tokenizer", TOK,
                        "--outfile", out, NULL};
    expect_failure("missing checkpoint", a3, out, "no-such.bin");
    const char *a4[] = {"--llama2c", CKPT, "--tokenizer", "/no/such/tok.bin", "--outfile", out,
                        NULL};
    expect_failure("missing tokenizer", a4, out, "/no/such/tok.bin");
    const char *a5[] = {"--llama2c", CKPT, "--tokenizer", TOK, "--outfile", out, "--bogus", NULL};
    expect_failure("unknown flag", a5, out, "--bogus");
    const char *a6[] = {"--llama2c", CKPT, "--tokenizer", TOK, "--outfile", out, "--outtype",
                        "q8_0", NULL};
    expect_failure("bad outtype", a6, out, "q8_0");
    const char *a7[] = {"--llama2c", CKPT, "--outfile", out, NULL};
    expect_failure("no tokenizer", a7, out, "--tokenizer");
    const char *a8[] = {"--llama2c", CKPT, "--tokenizer", TOK, NULL};
    expect_failure("no outfile", a8, NULL, "--outfile");
    const char *a9[] = {"--llama2c", CKPT, "--tokenizer", TOK, "--outfile", "/no/such/dir/x.gguf",
                        NULL};
    expect_failure("unwritable output", a9, NULL, "/no/such/dir");

    char err[4096];
    const char *help[] = {"--help", NULL};
    EXPECT(run_convert(help, err, sizeof(err)) == 0 && strstr(err, "usage:") != NULL);
    unlink(bad);
    unlink(badtok);
}

int main(void) {
    snprintf(tmp_dir, sizeof(tmp_dir), "/tmp/optiml-test-convert-XXXXXX");
    if (!mkdtemp(tmp_dir)) {
        perror("mkdtemp");
        return 1;
    }
    size_t ckpt_size = 0, tok_size = 0;
    uint8_t *ckpt = read_file(CKPT, &ckpt_size);
    uint8_t *tok = read_file(TOK, &tok_size);
    CHECK(ckpt && tok, "cannot read %s or %s", CKPT, TOK);
    if (ckpt && tok) {
        test_convert(ckpt, ckpt_size, tok, tok_size, "f32", DTYPE_F32, 0);
        test_convert(ckpt, ckpt_size, tok, tok_size, "f16", DTYPE_F16, 1);
        test_separate_classifier(ckpt, ckpt_size);
        test_errors(ckpt, ckpt_size, tok, tok_size);
    }
    free(ckpt);
    free(tok);
    char p[128];
    unlink(tmp_path(p, sizeof(p), "stderr.txt"));
    rmdir(tmp_dir);
    return test_summary("test_convert_llama2c");
}
