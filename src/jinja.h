/*
 * jinja.h - a small Jinja2-subset interpreter for chat templates
 * (tokenizer.chat_template). See src/jinja.c for the supported language.
 *
 * The environment matches the one Hugging Face transformers renders chat
 * templates with: trim_blocks and lstrip_blocks on, autoescape off, the
 * loopcontrols extension (break/continue), globals raise_exception,
 * namespace, range, dict, strftime_now, and the variables messages,
 * add_generation_prompt, bos_token, eos_token, tools = none,
 * documents = none. A template never runs unbounded: output size, memory,
 * steps and nesting depth are limited (struct jinja_limits).
 */
#ifndef OPTIML_JINJA_H
#define OPTIML_JINJA_H

#include "common.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct jinja_limits {
    size_t max_output; /* bytes of rendered text                         */
    size_t max_memory; /* bytes of the per-render arena (values, AST)    */
    uint64_t max_steps;/* statements + loop iterations + element visits  */
    int max_depth;     /* nesting of blocks, expressions and values      */
};

/* The defaults: 64 MiB output, 512 MiB memory, 10M steps, depth 64. */
struct jinja_limits jinja_default_limits(void);

struct jinja_input {
    const optiml_chat_message *msgs; /* role and content of each message  */
    size_t n_msgs;                   /* (content NULL: the key is absent) */
    bool add_generation_prompt;
    const char *bos_token;           /* NULL renders as ""                */
    const char *eos_token;
};

/* Render tmpl[0..tmpl_len). On success *out is a malloc'd NUL-terminated
 * string of *out_len bytes (free() it). On failure *out is NULL and
 * optiml_last_error() names the construct and "line L:C":
 *   OPTIML_ERR_FORMAT       syntax error
 *   OPTIML_ERR_UNSUPPORTED  a construct this subset does not implement
 *   OPTIML_ERR_INVALID_ARG  raise_exception(), a type error, a limit
 *   OPTIML_ERR_NOMEM        out of memory */
optiml_status jinja_render(const char *tmpl, size_t tmpl_len, const struct jinja_input *in,
                           const struct jinja_limits *limits, char **out, size_t *out_len);

#endif /* OPTIML_JINJA_H */
