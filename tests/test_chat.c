/*
 * test_chat.c - the chat-template interpreter (src/jinja.c) construct by
 * construct, its errors and limits, the built-in formats (src/chat.c) and
 * optiml_chat_apply_template's buffer protocol. The expected strings are
 * what Jinja2 (as transformers configures it) renders; the Python test
 * test_chat_template.py compares whole real templates with transformers.
 */
#include "chat.h"
#include "test.h"

#include <stdlib.h>
#include <string.h>

static const optiml_chat_message conv[] = {
    {"system", "Be brief."},
    {"user", "Hi"},
    {"assistant", " Hello! "},
    {"user", "Bye"},
};

/* Render tmpl over conv[0..n) into a static buffer; NULL on error. */
static const char *render_n(const char *tmpl, size_t n, bool gen, const struct jinja_limits *lim) {
    static char buf[1 << 16];
    int32_t r = chat_apply(tmpl, "<s>", "</s>", conv, n, gen, lim, buf, sizeof(buf));
    if (r == INT32_MIN) return NULL;
    CHECK(r < (int32_t)sizeof(buf), "output too long for the test buffer");
    return buf;
}

static const char *render(const char *tmpl) { return render_n(tmpl, 4, false, NULL); }

#define EXPECT(tmpl, want)                                                                 \
    do {                                                                                   \
        const char *got_ = render(tmpl);                                                   \
        CHECK(got_ && !strcmp(got_, want), "%s\n  got  [%s]\n  want [%s]\n  error: %s", tmpl, \
              got_ ? got_ : "(error)", want, got_ ? "" : optiml_last_error());            \
    } while (0)

#define EXPECT_ERROR(tmpl, needle)                                                         \
    do {                                                                                   \
        const char *got_ = render(tmpl);                                                   \
        CHECK(!got_ && strstr(optiml_last_error(), needle), "%s: got [%s], error [%s], want [%s]", tmpl, \
              got_ ? got_ : "(error)", optiml_last_error(), needle);                       \
    } while (0)

static void test_text_and_whitespace(void) {
    EXPECT("plain text", "plain text");
    EXPECT("a\n", "a");                        /* one trailing newline dropped */
    EXPECT("a\n\n", "a\n");
    EXPECT("a\r\nb", "a\nb");                  /* newlines normalized */
    EXPECT("{# comment #}x", "x");
    EXPECT("{% if true %}\nyes\n{% endif %}\nz", "yes\nz");   /* trim_blocks */
    EXPECT("  {% if true %}x{% endif %}", "x");                /* lstrip_blocks */
    EXPECT("a  {% if true %}x{% endif %}", "a  x");           /* not at a line start */
    EXPECT("a\n   {% if true %}x{% endif %}", "a\nx");
    EXPECT("  {{ 'v' }}", "  v");                              /* lstrip is for blocks only */
    EXPECT("a   {{- 'b' -}}   c", "abc");
    EXPECT("a \n {%- if true -%} \n b {%- endif %}", "ab");
    EXPECT("  {%+ if true %}x{% endif %}", "  x");
    EXPECT("{% if true +%}\nx{% endif %}", "\nx");
    EXPECT("{{ '{{' }}{{ '%}' }}", "{{%}");
    EXPECT("{{ {'a': {'b': 1}}['a']['b'] }}", "1");
}

static void test_expressions(void) {
    EXPECT("{{ 1 + 2 * 3 }}|{{ (1 + 2) * 3 }}|{{ 7 // 2 }}|{{ -7 // 2 }}|{{ -7 % 3 }}", "7|9|3|-4|2");
    EXPECT("{{ 'a' + 'b' }}{{ 'x' ~ 1 ~ none ~ true }}{{ 'ab' * 2 }}", "abx1NoneTrueabab");
    EXPECT("{{ none }}|{{ true }}|{{ False }}|{{ undefined_name }}|", "None|True|False||");
    EXPECT("{{ [1, 'a', none, [true]] }}|{{ {'k': 'v', 'n': 1} }}", "[1, 'a', None, [True]]|{'k': 'v', 'n': 1}");
    EXPECT("{{ \"it's\" }}|{{ ['it\\'s', 'a\"b'] }}", "it's|[\"it's\", 'a\"b']");
    EXPECT("{{ 1 == 1 }}{{ 1 != 1 }}{{ 1 < 2 }}{{ 'a' >= 'b' }}{{ true == 1 }}", "TrueFalseTrueFalseTrue");
    EXPECT("{{ 'b' in 'abc' }}{{ 2 in [1, 2] }}{{ 'k' in {'k': 1} }}{{ 3 not in [3] }}", "TrueTrueTrueFalse");
    EXPECT("{{ 0 or 'x' }}|{{ 1 and 'y' }}|{{ not 0 }}|{{ not 1 == 2 }}", "x|y|True|True");
    EXPECT("{{ 'y' if 1 else 'n' }}{{ 'y' if 0 else 'n' }}[{{ 'y' if 0 }}]", "yn[]");
    EXPECT("{{ messages[1]['content'] }}|{{ messages[1].role }}|{{ messages[-1].content }}", "Hi|user|Bye");
    EXPECT("{{ messages[1:3] | length }}|{{ messages[::2][1].content }}|{{ messages[9] is defined }}", "2| Hello! |False");
    EXPECT("{{ 'héllo'[1] }}|{{ 'héllo'[1:3] }}|{{ 'héllo'[::-1] }}|{{ 'héllo' | length }}", "é|él|olléh|5");
    EXPECT("{{ 'abc' 'def' }}", "abcdef");
    EXPECT("{{ '\\n\\t\\u00e9\\x41\\\\' }}", "\n\té" "A\\");
    EXPECT("{{ (1, 2) }}{{ () }}{{ 1_000 }}", "[1, 2][]1000");
}

static void test_tests(void) {
    EXPECT("{{ x is defined }}{{ x is undefined }}{{ none is none }}{{ 1 is not none }}", "FalseTrueTrueTrue");
    EXPECT("{{ 'a' is string }}{{ 1 is number }}{{ {} is mapping }}{{ [] is iterable }}{{ 'a' is iterable }}",
           "TrueTrueTrueTrueTrue");
    EXPECT("{{ 3 is odd }}{{ 3 is even }}{{ 9 is divisibleby 3 }}{{ 9 is divisibleby(2) }}", "TrueFalseTrueFalse");
    EXPECT("{{ 'a' is equalto 'a' }}{{ true is true }}{{ 1 is boolean }}{{ not x is defined }}", "TrueTrueFalseTrue");
    EXPECT("{{ messages[0].tool_calls is defined }}", "False");
}

static void test_filters_and_methods(void) {
    EXPECT("[{{ '  a b \\n' | trim }}][{{ 'xxaxx' | trim('x') }}]", "[a b][a]");
    EXPECT("[{{ '\\u3000x\\u00a0' | trim }}][{{ 'éxé' | trim('é') }}][{{ '\\xff ' | trim }}]", "[x][x][\xc3\xbf]");
    EXPECT("{{ messages | length }}{{ 'abc' | count }}{{ none | default('d') }}{{ x | default('d') }}", "43Noned");
    EXPECT("{{ '' | default('e', true) }}{{ 'Ab' | upper }}{{ 'Ab' | lower }}{{ 'hELLO wORLD' | capitalize }}",
           "eABabHello world");
    EXPECT("{{ 'hello big-world' | title }}|{{ 'hello big-world'.title() }}", "Hello Big-World|Hello Big-World");
    EXPECT("{{ [1, 2] | first }}{{ [1, 2] | last }}{{ 'xy' | first }}{{ [1, 2, 3] | join(', ') }}", "12x1, 2, 3");
    EXPECT("{{ 'aXbX' | replace('X', '-') }}{{ 1 | string }}{{ ' 12 ' | int + 1 }}{{ 'z' | int }}", "a-b-1130");
    EXPECT("{{ 'ab' | list }}{{ {'a': 1} | items | list }}{{ '<&>' | safe }}{{ -3 | abs }}", "['a', 'b'][['a', 1]]<&>3");
    EXPECT("{{ {'a': [1, 'é', none, true], 'b': \"q\\\"\\n\"} | tojson }}",
           "{\"a\": [1, \"é\", null, true], \"b\": \"q\\\"\\n\"}");
    EXPECT("{{ {'a': [1, {}], 'b': []} | tojson(indent=2) }}", "{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": []\n}");
    EXPECT("{{ messages | selectattr('role', 'equalto', 'user') | map(attribute='content') | join('+') }}", "Hi+Bye");
    EXPECT("{{ messages | rejectattr('role', 'equalto', 'user') | list | length }}{{ [0, 1, 2] | select | list }}",
           "2[1, 2]");
    EXPECT("[{{ '  x  '.strip() }}][{{ 'xy'.lstrip('x') }}][{{ 'yx '.rstrip() }}]", "[x][y][yx]");
    EXPECT("{{ 'abc'.startswith('ab') }}{{ 'abc'.endswith(('x', 'c')) }}{{ 'a b  c'.split() }}{{ 'a,b'.split(',') }}",
           "TrueTrue['a', 'b', 'c']['a', 'b']");
    EXPECT("{{ 'Ab'.upper() }}{{ 'Ab'.lower() }}{{ 'aaa'.replace('a', 'b', 2) }}{{ '-'.join(['x', 'y']) }}",
           "ABabbbax-y");
    EXPECT("{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}{{ v }}{% endfor %}{{ {'a': 1}.get('b', 'no') }}",
           "a1b2no");
    EXPECT("{{ {'a': 1}.keys() | list }}{{ {'a': 1}.values() | list }}", "['a'][1]");
}

static void test_statements(void) {
    EXPECT("{% if 0 %}a{% elif 0 %}b{% elif 1 %}c{% else %}d{% endif %}", "c");
    EXPECT("{% if 0 %}a{% else %}d{% endif %}{% if 0 %}x{% endif %}", "d");
    EXPECT("{% for m in messages %}{{ loop.index }}{{ loop.index0 }}{{ loop.first|int }}{{ loop.last|int }}"
           "{{ loop.length }}{{ loop.revindex }};{% endfor %}",
           "10104" "4;21004" "3;32004" "2;43014" "1;");
    EXPECT("{% for m in messages if m.role == 'user' %}{{ loop.index }}/{{ loop.length }}{% endfor %}", "1/22/2");
    EXPECT("{% for x in [] %}a{% else %}empty{% endfor %}", "empty");
    EXPECT("{% for x in [1, 2, 3, 4] %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}"
           "{{ x }}{% endfor %}",
           "13");
    EXPECT("{% for x in [1, 2] %}{{ loop.previtem is defined }}{{ loop.nextitem }}{% endfor %}", "False2True");
    EXPECT("{% for a in [1, 2] %}{% for b in 'xy' %}{{ a }}{{ b }}{{ loop.index }} {% endfor %}{% endfor %}",
           "1x1 1y2 2x1 2y2 ");
    EXPECT("{% set x = 1 %}{% if true %}{% set x = 2 %}{% endif %}{{ x }}", "2");
    EXPECT("{% set x = 1 %}{% for i in [1] %}{% set x = 5 %}{% endfor %}{{ x }}", "1");  /* loop scope */
    EXPECT("{% set ns = namespace(x=1) %}{% for i in [1, 2] %}{% set ns.x = ns.x + i %}{% endfor %}{{ ns.x }}", "4");
    EXPECT("{% set t = 1, 2 %}{{ t }}", "[1, 2]");
    EXPECT("{% set b %}in {{ 'side' }}{% endset %}[{{ b }}]", "[in side]");
    EXPECT("{% generation %}g{% endgeneration %}", "g");
    EXPECT("{% for i in range(3) %}{{ i }}{% endfor %}{{ range(1, 7, 2) | list }}", "012[1, 3, 5]");
    EXPECT("{{ bos_token }}{{ eos_token }}{{ add_generation_prompt }}{{ tools }}{{ documents }}", "<s></s>FalseNoneNone");
    EXPECT("{% set messages = messages[1:] %}{{ messages[0].content }}", "Hi");
    EXPECT("{% set d = dict(a=1) %}{{ d.a }}{{ strftime_now('%Y') | length }}", "14");
}

static void test_errors(void) {
    EXPECT_ERROR("{% macro m() %}x{% endmacro %}", "line 1:4: unsupported construct: {% macro %}");
    EXPECT_ERROR("a\n b {{ 1.5 }}", "line 2:7: unsupported construct: float literal");
    EXPECT_ERROR("{{ 4 / 2 }}", "unsupported construct: '/'");
    EXPECT_ERROR("{{ x | wordwrap }}", "line 1:8: unsupported construct: filter 'wordwrap'");
    EXPECT_ERROR("{{ 'a'.zfill(3) }}", "unsupported construct: method 'zfill' of a string value");
    EXPECT_ERROR("{{ x is sameasx }}", "unsupported construct: test 'sameasx'");
    EXPECT_ERROR("{{ lipsum() }}", "unsupported construct: function 'lipsum'");
    EXPECT_ERROR("{% if true %}x", "line 1:15: syntax error: missing {% endif %} for the block opened at line 1:4");
    EXPECT_ERROR("{% endfor %}", "unknown statement 'endfor'");
    EXPECT_ERROR("{{ 'abc", "unterminated string literal");
    EXPECT_ERROR("{{ 1 + }}", "syntax error: unexpected '}}'");
    EXPECT_ERROR("{# open", "unclosed comment");
    EXPECT_ERROR("{{ raise_exception('bad ' ~ 1) }}", "line 1:19: raise_exception: bad 1");
    EXPECT_ERROR("{{ 'a' + 1 }}", "'+' is not supported between a string and a int");
    EXPECT_ERROR("{{ x.y }}", "attribute 'y' of an undefined value");
    EXPECT_ERROR("{% set x.y = 1 %}", "non-namespace");
    EXPECT_ERROR("{{ 1 // 0 }}", "division or modulo by zero");
    EXPECT_ERROR("{{ 9223372036854775807 + 1 }}", "integer overflow");
    EXPECT_ERROR("{% break %}", "break outside a loop");
    EXPECT_ERROR("{{ none | tojson }}{{ x | tojson }}", "not JSON serializable");
    /* construct errors name "line L:C" */
    const char *r = render("x\n\n   {{ foo(1) }}");
    CHECK(!r && strstr(optiml_last_error(), "chat template line 3:10"), "%s", optiml_last_error());
}

static void test_limits(void) {
    struct jinja_limits lim = jinja_default_limits();
    lim.max_steps = 1000;
    CHECK(render_n("{% for i in range(2000) %}{% endfor %}", 4, false, &lim) == NULL &&
              strstr(optiml_last_error(), "more than 1000 steps"),
          "%s", optiml_last_error());
    lim = jinja_default_limits();
    lim.max_output = 100;
    CHECK(render_n("{% for i in range(20) %}0123456789{% endfor %}", 4, false, &lim) == NULL &&
              strstr(optiml_last_error(), "exceeds 100 bytes"),
          "%s", optiml_last_error());
    lim = jinja_default_limits();
    lim.max_memory = 1 << 20;
    CHECK(render_n("{% set x = range(1000000) %}", 4, false, &lim) == NULL &&
              strstr(optiml_last_error(), "more than 1048576 bytes of memory"),
          "%s", optiml_last_error());
    /* deep nesting is refused, not a stack overflow */
    static char deep[4096];
    size_t n = 0;
    n += (size_t)snprintf(deep + n, sizeof(deep) - n, "{{ ");
    for (int i = 0; i < 1000; i++) deep[n++] = '(';
    deep[n++] = '1';
    for (int i = 0; i < 1000; i++) deep[n++] = ')';
    snprintf(deep + n, sizeof(deep) - n, " }}");
    CHECK(render(deep) == NULL && strstr(optiml_last_error(), "nesting"), "%s", optiml_last_error());
    CHECK(render("{% set ns = namespace(x=[]) %}{% for i in range(200) %}{% set ns.x = [ns.x] %}{% endfor %}"
                 "{{ ns.x }}") == NULL &&
              strstr(optiml_last_error(), "nests deeper"),
          "%s", optiml_last_error());
    static char chain[65536];
    n = (size_t)snprintf(chain, sizeof(chain), "{%% if 0 %%}");
    for (int i = 0; i < 5000; i++) n += (size_t)snprintf(chain + n, sizeof(chain) - n, "{%% elif 0 %%}");
    snprintf(chain + n, sizeof(chain) - n, "{%% else %%}ok{%% endif %%}");
    const char *r = render(chain);
    CHECK(r && !strcmp(r, "ok"), "long elif chain: %s", r ? r : optiml_last_error());
}

static void test_builtins(void) {
    const char *r;
    r = render_n("chatml", 4, true, NULL);
    CHECK(r && !strcmp(r, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                          "<|im_start|>assistant\n Hello! <|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                          "<|im_start|>assistant\n"),
          "chatml: %s", r ? r : optiml_last_error());
    r = render_n("llama3", 2, true, NULL);
    CHECK(r && !strcmp(r, "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                          "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                          "<|start_header_id|>assistant<|end_header_id|>\n\n"),
          "llama3: %s", r ? r : optiml_last_error());
    r = render_n("llama2", 4, true, NULL);
    CHECK(r && !strcmp(r, "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]"),
          "llama2: %s", r ? r : optiml_last_error());
    r = render_n("mistral", 4, true, NULL);
    CHECK(r && !strcmp(r, "<s>[INST] Be brief.\n\nHi [/INST] Hello! </s>[INST] Bye [/INST]"),
          "mistral: %s", r ? r : optiml_last_error());
    r = render_n("gemma", 4, true, NULL);
    CHECK(r && !strcmp(r, "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!"
                          "<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"),
          "gemma: %s", r ? r : optiml_last_error());
    r = render_n("phi3", 2, false, NULL);
    CHECK(r && !strcmp(r, "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n</s>"), "phi3: %s",
          r ? r : optiml_last_error());

    CHECK(!strcmp(chat_guess_builtin("...<|start_header_id|>..."), "llama3"), "guess llama3");
    CHECK(!strcmp(chat_guess_builtin("<|im_start|>"), "chatml"), "guess chatml");
    CHECK(!strcmp(chat_guess_builtin("[INST] <<SYS>>"), "llama2"), "guess llama2");
    CHECK(!strcmp(chat_guess_builtin("[INST]"), "mistral"), "guess mistral");
    CHECK(!strcmp(chat_guess_builtin("<start_of_turn>"), "gemma"), "guess gemma");
    CHECK(!strcmp(chat_guess_builtin("<|user|>"), "phi3"), "guess phi3");
    CHECK(chat_guess_builtin("plain") == NULL, "guess none");
}

static void test_public_api(void) {
    char small[8];
    int32_t n = optiml_chat_apply_template(NULL, "chatml", conv + 1, 1, false, small, sizeof(small));
    const char *want = "<|im_start|>user\nHi<|im_end|>\n";
    CHECK(n == (int32_t)strlen(want), "length %d", n);
    CHECK(!memcmp(small, want, sizeof(small) - 1) && small[sizeof(small) - 1] == '\0', "truncated copy");
    CHECK(optiml_chat_apply_template(NULL, "chatml", conv + 1, 1, false, NULL, 0) == n, "sizing call");
    CHECK(optiml_chat_apply_template(NULL, NULL, conv, 1, false, small, sizeof(small)) == INT32_MIN,
          "no model, no template");
    CHECK(optiml_chat_apply_template(NULL, "{{ bos_token }}|{{ eos_token }}", conv, 1, false, small,
                                     sizeof(small)) == 1 && !strcmp(small, "|"),
          "no model: empty bos/eos");
    optiml_chat_message no_role = {NULL, "x"};
    CHECK(optiml_chat_apply_template(NULL, "chatml", &no_role, 1, false, small, sizeof(small)) == INT32_MIN,
          "message without role");
    optiml_chat_message no_content = {"user", NULL};
    CHECK(optiml_chat_apply_template(NULL, "{{ messages[0].content is defined }}", &no_content, 1, false, small,
                                     sizeof(small)) == 5 && !strcmp(small, "False"),
          "NULL content: key absent");

    /* a model without a template: the built-in format guessed from its
     * vocabulary (llama2 for stories260K), with its BOS/EOS text */
    optiml_model *model = NULL;
    optiml_model_params mp = optiml_model_default_params();
    if (optiml_model_load(OPTIML_MODELS "/stories260K.gguf", &mp, &model) != OPTIML_OK) {
        CHECK(0, "load: %s", optiml_last_error());
        return;
    }
    CHECK(!strcmp(chat_guess_builtin_from_vocab(model), "llama2"), "stories260K guess");
    char a[512], b[512];
    int32_t na = optiml_chat_apply_template(model, NULL, conv, 4, true, a, sizeof(a));
    int32_t nb = chat_apply("llama2", "<s>", "</s>", conv, 4, true, NULL, b, sizeof(b));
    CHECK(na > 0 && na == nb && !strcmp(a, b), "model default: [%s] vs [%s]", a, b);
    optiml_model_free(model);
}

int main(void) {
    test_text_and_whitespace();
    test_expressions();
    test_tests();
    test_filters_and_methods();
    test_statements();
    test_errors();
    test_limits();
    test_builtins();
    test_public_api();
    return test_summary("test_chat");
}
