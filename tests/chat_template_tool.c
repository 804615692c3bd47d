/*
 * optiml-chat-template - render a chat template with src/chat.c, for the
 * Python tests that compare it with Hugging Face transformers.
 *
 *   optiml-chat-template TEMPLATE [--bos S] [--eos S] [--gen]
 *                        [ROLE CONTENT]...
 *   optiml-chat-template NAME --print-template
 *
 * TEMPLATE is a built-in name ("chatml", ...) or a file holding the
 * template text. Each ROLE CONTENT pair is one message; a CONTENT of
 * "@none" leaves the message's content out. Prints the rendering to stdout
 * (nothing else); --print-template prints a built-in format's template
 * text instead; on an error prints "error: <reason>" to stderr and exits 1.
 */
#include "chat.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    for (size_t r; buf && (r = fread(buf + n, 1, cap - n - 1, f)) > 0;) {
        n += r;
        if (cap - n - 1 == 0) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) free(buf);
            buf = nb;
            cap *= 2;
        }
    }
    fclose(f);
    if (buf) buf[n] = '\0';
    return buf;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: optiml-chat-template TEMPLATE [--bos S] [--eos S] [--gen] [ROLE CONTENT]...\n");
        return 2;
    }
    if (argc == 3 && !strcmp(argv[2], "--print-template")) {
        const char *t = chat_builtin_template(argv[1]);
        if (t) fputs(t, stdout);
        return t ? 0 : 2;
    }
    const char *bos = "", *eos = "";
    bool gen = false;
    optiml_chat_message *msgs = calloc((size_t)argc, sizeof(*msgs));
    size_t n_msgs = 0;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--gen")) gen = true;
        else if (!strcmp(argv[i], "--bos") && i + 1 < argc) bos = argv[++i];
        else if (!strcmp(argv[i], "--eos") && i + 1 < argc) eos = argv[++i];
        else if (i + 1 < argc) {
            msgs[n_msgs].role = argv[i];
            msgs[n_msgs++].content = strcmp(argv[i + 1], "@none") ? argv[i + 1] : NULL;
            i++;
        } else {
            fprintf(stderr, "optiml-chat-template: a role without content\n");
            return 2;
        }
    }
    char *file = chat_builtin_template(argv[1]) ? NULL : slurp(argv[1]);
    const char *tmpl = file ? file : argv[1];
    if (!file && !chat_builtin_template(argv[1])) {
        fprintf(stderr, "optiml-chat-template: cannot read '%s'\n", argv[1]);
        return 2;
    }
    int32_t n = chat_apply(tmpl, bos, eos, msgs, n_msgs, gen, NULL, NULL, 0);
    int rc = 1;
    if (n == INT32_MIN) {
        fprintf(stderr, "error: %s\n", optiml_last_error());
    } else {
        char *buf = malloc((size_t)n + 1);
        if (buf && chat_apply(tmpl, bos, eos, msgs, n_msgs, gen, NULL, buf, n + 1) == n) {
            fwrite(buf, 1, (size_t)n, stdout);
            rc = 0;
        }
        free(buf);
    }
    free(file);
    free(msgs);
    return rc;
}
