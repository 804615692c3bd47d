/*
 * fuzz_chat_template.c - libFuzzer target for the chat-template interpreter
 * (src/jinja.c through src/chat.c).
 *
 * The input bytes are rendered twice as a template over a fixed
 * conversation (system, user, assistant, user; add_generation_prompt off
 * and on), and once as the content of every message under each built-in
 * format. Limits are small so a hostile template fails fast instead of
 * timing out. Checks: a rendering either fails with a reason or reports a
 * length, a second call with exactly that room gives the same length and
 * NUL-terminates, and a built-in format never fails on any content.
 */
#include "chat.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const struct jinja_limits fuzz_limits = {
    .max_output = 256u << 10, .max_memory = 8u << 20, .max_steps = 20000, .max_depth = 64};

static void fuzz_check(bool ok, const char *what) {
    if (ok) return;
    fprintf(stderr, "fuzz_chat_template: %s\n", what);
    abort();
}

static void fuzz_render(const char *tmpl, const optiml_chat_message *msgs, size_t n, bool gen, bool must_work) {
    int32_t need = chat_apply(tmpl, "<s>", "</s>", msgs, n, gen, &fuzz_limits, NULL, 0);
    if (need == INT32_MIN) {
        fuzz_check(!must_work, "a built-in format failed");
        fuzz_check(optiml_last_error()[0] != '\0', "failure without a reason");
        return;
    }
    fuzz_check(need >= 0, "negative length");
    char *buf = malloc((size_t)need + 1);
    fuzz_check(buf != NULL, "out of memory");
    int32_t got = chat_apply(tmpl, "<s>", "</s>", msgs, n, gen, &fuzz_limits, buf, need + 1);
    fuzz_check(got == need, "length differs between the two calls");
    fuzz_check(buf[need] == '\0', "not NUL-terminated");
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > (1u << 16)) return 0;
    char *text = malloc(size + 1);
    fuzz_check(text != NULL, "out of memory");
    memcpy(text, data, size);
    text[size] = '\0';
    const optiml_chat_message conv[] = {
        {"system", "You are helpful."}, {"user", "Hi!"}, {"assistant", " Hello. "}, {"user", "Bye\n"}};
    fuzz_render(text, conv, 4, false, false);
    fuzz_render(text, conv, 4, true, false);
    static const char *const names[] = {"llama2", "llama3", "chatml", "mistral", "gemma", "phi3"};
    const optiml_chat_message own[] = {{"system", text}, {"user", text}, {"assistant", text}, {"user", text}};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) fuzz_render(names[i], own, 4, true, true);
    free(text);
    return 0;
}
