/*
 * chat.h - chat prompts: optiml_chat_apply_template (include/optiml.h) and
 * the helpers optiml-cli uses to pick a built-in format. Templates are
 * rendered by the Jinja subset of src/jinja.c; the built-in formats are
 * themselves templates in that subset.
 */
#ifndef OPTIML_CHAT_H
#define OPTIML_CHAT_H

#include "common.h"
#include "jinja.h"

#include <stddef.h>

/* Template text of a built-in format ("llama2", "llama3", "chatml",
 * "mistral", "gemma", "phi3"), NULL for another name. */
const char *chat_builtin_template(const char *name);

/* The built-in format a template text resembles ("llama3" for one that
 * contains "<|start_header_id|>", ...), NULL if none matches. */
const char *chat_guess_builtin(const char *tmpl);

/* The built-in format for a model without tokenizer.chat_template, guessed
 * from the control tokens of its vocabulary ("llama2" if nothing fits). */
const char *chat_guess_builtin_from_vocab(const optiml_model *model);

/* Render with explicit BOS/EOS strings and limits (NULL: the defaults):
 * same results as optiml_chat_apply_template, for tests and fuzzing.
 * tmpl is a built-in name or template text. */
int32_t chat_apply(const char *tmpl, const char *bos_token, const char *eos_token,
                   const optiml_chat_message *msgs, size_t n_msgs, bool add_generation_prompt,
                   const struct jinja_limits *limits, char *buf, int32_t buf_size);

#endif /* OPTIML_CHAT_H */
