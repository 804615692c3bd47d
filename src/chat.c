/*
 * chat.c - chat prompts from a conversation: optiml_chat_apply_template.
 *
 * The template is the model's tokenizer.chat_template, the caller's text,
 * or one of the built-in formats below, which are written in the same
 * Jinja subset (src/jinja.c) and rendered the same way. bos_token and
 * eos_token are the text of the model's BOS/EOS tokens.
 */
#include "chat.h"

#include "model.h"
#include "vocab.h"

#include <stdlib.h>
#include <string.h>

/* ---- built-in formats ------------------------------------------------------ */

static const struct {
    const char *name;
    const char *tmpl;
} builtins[] = {
    /* Llama 2 chat: the system prompt goes into the first user turn */
    {"llama2",
     "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
     "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
     "{% set system_message = '' %}{% endif %}"
     "{% for message in loop_messages %}"
     "{% if loop.index0 == 0 and system_message != '' %}"
     "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
     "{% else %}{% set content = message['content'] %}{% endif %}"
     "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
     "{% elif message['role'] == 'assistant' %}{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}"
     "{% endfor %}"},
    {"llama3",
     "{{ bos_token }}{% for message in messages %}"
     "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
     "'<|eot_id|>' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"},
    {"chatml",
     "{% for message in messages %}"
     "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"},
    /* Mistral: the system prompt goes into the next user turn */
    {"mistral",
     "{% set ns = namespace(system='') %}{{ bos_token }}{% for message in messages %}"
     "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
     "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
     "{% set ns.system = '' %}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"},
    /* Gemma: no system role; it goes into the next user turn */
    {"gemma",
     "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
     "{% if message['role'] == 'system' %}{% set ns.system = message['content'] | trim + '\\n\\n' %}"
     "{% else %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + "
     "'\\n' + ns.system + message['content'] | trim + '<end_of_turn>\\n' }}{% set ns.system = '' %}"
     "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"},
    {"phi3",
     "{% for message in messages %}"
     "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"},
};

const char *chat_builtin_template(const char *name) {
    for (size_t i = 0; i < sizeof(builtins) / sizeof(builtins[0]); i++)
        if (!strcmp(builtins[i].name, name)) return builtins[i].tmpl;
    return NULL;
}

/* ---- guessing a format ----------------------------------------------------------- */

/* Marker text -> format, most specific first. */
static const struct {
    const char *marker;
    const char *name;
} markers[] = {
    {"<|start_header_id|>", "llama3"}, {"<|im_start|>", "chatml"}, {"<start_of_turn>", "gemma"},
    {"<|user|>", "phi3"},              {"<<SYS>>", "llama2"},     {"[INST]", "mistral"},
};

const char *chat_guess_builtin(const char *tmpl) {
    if (!tmpl) return NULL;
    for (size_t i = 0; i < sizeof(markers) / sizeof(markers[0]); i++)
        if (strstr(tmpl, markers[i].marker)) return markers[i].name;
    return NULL;
}

const char *chat_guess_builtin_from_vocab(const optiml_model *model) {
    const struct vocab *v = model->vocab;
    size_t best = sizeof(markers) / sizeof(markers[0]);
    for (int32_t t = 0; t < vocab_n_tokens(v); t++) {
        const char *piece = vocab_piece(v, t);
        for (size_t i = 0; i < best && piece; i++)
            if (!strcmp(piece, markers[i].marker)) best = i;
    }
    return best < sizeof(markers) / sizeof(markers[0]) ? markers[best].name : "llama2";
}

/* ---- rendering ------------------------------------------------------------------- */

int32_t chat_apply(const char *tmpl, const char *bos_token, const char *eos_token,
                   const optiml_chat_message *msgs, size_t n_msgs, bool add_generation_prompt,
                   const struct jinja_limits *limits, char *buf, int32_t buf_size) {
    if (!tmpl || (n_msgs && !msgs) || buf_size < 0 || (buf_size > 0 && !buf)) {
        optiml_fail(OPTIML_ERR_INVALID_ARG, "optiml_chat_apply_template: NULL or negative argument");
        return INT32_MIN;
    }
    const char *builtin = chat_builtin_template(tmpl);
    if (builtin) tmpl = builtin;
    struct jinja_input in = {.msgs = msgs, .n_msgs = n_msgs, .add_generation_prompt = add_generation_prompt,
                             .bos_token = bos_token, .eos_token = eos_token};
    char *text = NULL;
    size_t len = 0;
    if (jinja_render(tmpl, strlen(tmpl), &in, limits, &text, &len) != OPTIML_OK) return INT32_MIN;
    if (len > (size_t)INT32_MAX - 1) {
        free(text);
        optiml_fail(OPTIML_ERR_INVALID_ARG, "chat template: the rendered prompt exceeds 2 GiB");
        return INT32_MIN;
    }
    if (buf_size > 0) {
        size_t n = len < (size_t)buf_size - 1 ? len : (size_t)buf_size - 1;
        memcpy(buf, text, n);
        buf[n] = '\0';
    }
    free(text);
    return (int32_t)len;
}

/* The text of a special token (BOS/EOS), "" if the model has none. */
static void token_text(const optiml_model *model, optiml_token t, char *buf, size_t size) {
    buf[0] = '\0';
    if (t < 0) return;
    int32_t n = optiml_token_to_piece(model, t, buf, (int32_t)size - 1, false, true);
    buf[n > 0 ? n : 0] = '\0';
}

int32_t optiml_chat_apply_template(const optiml_model *model, const char *tmpl, const optiml_chat_message *msgs,
                                   size_t n_msgs, bool add_generation_prompt, char *buf, int32_t buf_size) {
    if (!model && !tmpl) {
        optiml_fail(OPTIML_ERR_INVALID_ARG, "optiml_chat_apply_template: give a model or a template");
        return INT32_MIN;
    }
    char bos[VOCAB_MAX_PIECE_LEN + 1] = "", eos[VOCAB_MAX_PIECE_LEN + 1] = "";
    if (model) {
        token_text(model, optiml_token_bos(model), bos, sizeof(bos));
        token_text(model, optiml_token_eos(model), eos, sizeof(eos));
        if (!tmpl) tmpl = optiml_model_meta_str(model, "tokenizer.chat_template");
        if (!tmpl) tmpl = chat_guess_builtin_from_vocab(model);
    }
    return chat_apply(tmpl, bos, eos, msgs, n_msgs, add_generation_prompt, NULL, buf, buf_size);
}
