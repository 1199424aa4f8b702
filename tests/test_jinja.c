/* test_jinja.c - the chat template engine (runtime/jinja.c) and the
 * template lookup (runtime/chat.c).
 *
 * 1. Real templates (the .jinja files of tests/data/templates: Qwen2.5, Qwen3, Llama
 *    3.1/3.2/3.3, Mistral Nemo) rendered over the conversations of
 *    tests/data/templates/cases.json, byte for byte against what Python
 *    jinja2 rendered as transformers does (tools/make_template_fixtures.py),
 *    raise_exception's message included.
 * 2. Constructs one by one, against outputs worked out by hand from jinja2.
 * 3. Errors: unsupported constructs at parse time with line and column,
 *    runtime errors, the bounds.
 * 4. tp_template_load: chat_template.jinja first, tokenizer_config.json's
 *    string or list form, bos/eos as strings or objects, no template. */
#include "check.h"
#include "runtime.h"

#include <cJSON.h>
#include <time.h>

#define TEMPLATE_DIR "tests/data/templates/"

static char *read_text(const char *path)
{
    char *text = NULL;
    size_t len = 0;
    tp_err err;
    if (tp_read_file(path, 64u << 20, &text, &len, &err)) {
        CHECK(0, "%s", err.msg);
        return NULL;
    }
    return text;
}

/* 2025-03-14 09:26:53, the fixtures' FIXED_NOW */
static struct tm fixed_now(void)
{
    struct tm tm = {.tm_year = 125, .tm_mon = 2, .tm_mday = 14, .tm_hour = 9, .tm_min = 26, .tm_sec = 53};
    time_t t = timegm(&tm);
    gmtime_r(&t, &tm);   /* fills tm_wday and tm_yday */
    return tm;
}

static tp_template *load_template(const char *file)
{
    char path[512];
    snprintf(path, sizeof path, TEMPLATE_DIR "%s", file);
    char *src = read_text(path);
    if (!src)
        return NULL;
    tp_template *t = NULL;
    tp_err err;
    CHECK_OK(tp_template_parse(&t, src, strlen(src), file, &err), err);
    free(src);
    if (t) {
        struct tm now = fixed_now();
        tp_template_set_time(t, &now);
    }
    return t;
}

/* Where two texts first differ, for a readable failure. */
static void report_diff(const char *what, const char *got, const char *want)
{
    size_t i = 0;
    while (got[i] && got[i] == want[i])
        i++;
    size_t from = i > 40 ? i - 40 : 0;
    fprintf(stderr, "  %s: differ at byte %zu\n  got:  %.80s\n  want: %.80s\n", what, i, got + from, want + from);
}

static void test_real_templates(void)
{
    char *json = read_text(TEMPLATE_DIR "cases.json");
    if (!json)
        return;
    cJSON *cases = cJSON_Parse(json);
    free(json);
    CHECK(cJSON_IsArray(cases) && cJSON_GetArraySize(cases) > 200, "cases.json: an array of the fixtures expected");
    char loaded_name[256] = "";
    tp_template *t = NULL;
    int rendered = 0, raised = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, cases) {
        const char *file = cJSON_GetObjectItem(c, "template")->valuestring;
        const char *name = cJSON_GetObjectItem(c, "name")->valuestring;
        if (strcmp(file, loaded_name) != 0) {
            tp_template_free(t);
            t = load_template(file);
            snprintf(loaded_name, sizeof loaded_name, "%s", file);
        }
        if (!t)
            continue;
        const cJSON *want = cJSON_GetObjectItem(c, "output");
        const cJSON *raises = cJSON_GetObjectItem(c, "raises");
        char *out = NULL;
        size_t len = 0;
        tp_err err = {{0}};
        int rc = tp_template_render(t, cJSON_GetObjectItem(c, "context"), &out, &len, &err);
        if (want) {
            bool same = rc == 0 && len == strlen(want->valuestring) && !memcmp(out, want->valuestring, len);
            CHECK(same, "%s %s: %s", file, name, rc ? err.msg : "output differs from jinja2's");
            if (rc == 0 && !same)
                report_diff(name, out, want->valuestring);
            rendered += same;
        } else if (raises) {
            CHECK(rc != 0 && strstr(err.msg, raises->valuestring) && strstr(err.msg, file),
                  "%s %s: raise_exception(\"%s\") expected, got %s", file, name, raises->valuestring,
                  rc ? err.msg : "success");
            raised += rc != 0;
        } else {
            CHECK(rc != 0, "%s %s: jinja2 failed, we rendered", file, name);
        }
        free(out);
    }
    tp_template_free(t);
    cJSON_Delete(cases);
    printf("real templates: %d rendered as jinja2 does, %d raised as jinja2 does\n", rendered, raised);
}

/* Renders src with ctx_json (NULL: no variables); NULL on failure (err set). */
static char *render(const char *src, const char *ctx_json, tp_err *err)
{
    tp_template *t = NULL;
    if (tp_template_parse(&t, src, strlen(src), "t", err))
        return NULL;
    cJSON *ctx = ctx_json ? cJSON_Parse(ctx_json) : NULL;
    char *out = NULL;
    size_t len;
    tp_template_render(t, ctx, &out, &len, err);
    cJSON_Delete(ctx);
    tp_template_free(t);
    return out;
}

#define EXPECT(src, ctx, want) expect_((src), (ctx), (want), __LINE__)
static void expect_(const char *src, const char *ctx, const char *want, int line)
{
    tp_err err = {{0}};
    char *out = render(src, ctx, &err);
    CHECK(out && !strcmp(out, want), "line %d: %s\n  got  [%s]\n  want [%s]", line, src, out ? out : err.msg, want);
    free(out);
}

#define EXPECT_FAIL(src, ctx, want) expect_fail_((src), (ctx), (want), __LINE__)
static void expect_fail_(const char *src, const char *ctx, const char *want, int line)
{
    tp_err err = {{0}};
    char *out = render(src, ctx, &err);
    CHECK(!out && strstr(err.msg, want) && !strchr(err.msg, '\n'), "line %d: %s: want an error with [%s], got [%s]",
          line, src, want, out ? out : err.msg);
    free(out);
}

static void test_whitespace(void)
{
    /* trim_blocks: the newline after a block tag goes; lstrip_blocks: the
     * indentation before it */
    EXPECT("{% if true %}\n  yes\n{% endif %}\nafter", NULL, "  yes\nafter");
    EXPECT("  {% if true %}\nx\n  {% endif %}\n", NULL, "x\n");   /* and the trailing newline of the template goes */
    EXPECT("a  {% if true %}b{% endif %}", NULL, "a  b");       /* not at a line's start: kept */
    EXPECT("a\n  {{ 1 }}\n", NULL, "a\n  1");                  /* {{ }} takes neither */
    EXPECT("a   {{- 1 -}}   b", NULL, "a1b");
    EXPECT("a \n {%- if true -%} \n b {%- endif %}", NULL, "ab");
    EXPECT("  {%+ if true %}x{% endif %}", NULL, "  x");
    EXPECT("{# comment #}\nx{#- c -#}  y", NULL, "xy");
    EXPECT("line1\r\nline2\r\n", NULL, "line1\nline2");
}

static void test_expressions(void)
{
    EXPECT("{{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }}",
           NULL, "7 9 3 -4 1 2 3.5 1024");
    EXPECT("{{ 0.1 + 0.2 }} {{ 1e20 }} {{ 1.5e-7 }} {{ 2.0 }} {{ 3 / 3 }}", NULL,
           "0.30000000000000004 1e+20 1.5e-07 2.0 1.0");
    EXPECT("{{ 'a' ~ 1 ~ none ~ true }} {{ 'ab' * 3 }} {{ [1] + [2, 'x'] }}", NULL, "a1NoneTrue ababab [1, 2, 'x']");
    EXPECT("{{ 1 < 2 and 2 <= 2 and not 3 == 4 and 'b' > 'a' }} {{ none or 'd' }} {{ 0 and 1 }}", NULL, "True d 0");
    EXPECT("{{ 'b' in 'abc' }} {{ 2 in [1, 2] }} {{ 'k' in {'k': 1} }} {{ 'z' not in 'abc' }}", NULL, "True True True True");
    EXPECT("{{ 'yes' if x else 'no' }}{{ 'A' if not x }}", "{\"x\": 0}", "noA");
    EXPECT("{{ s[0] }}{{ s[-1] }}{{ s[1:3] }}{{ s[::-1] }}{{ s[::2] }}", "{\"s\": \"h\u00e9llo\"}", "hoélolléhhlo");
    EXPECT("{{ l[1:] }} {{ l[:-1] }} {{ l[::-1] }} {{ l[5] is defined }} {{ l[-4:10] }}", "{\"l\": [1, 2, 3]}",
           "[2, 3] [1, 2] [3, 2, 1] False [1, 2, 3]");
    EXPECT("{{ d.a }} {{ d['b'].c }} {{ d.missing is defined }} {{ d.items is defined }}", "{\"d\": {\"a\": 1, \"b\": {\"c\": \"x\"}}}",
           "1 x False False");
    EXPECT("{{ {'a': [1, {'b': none}], 'c': 'it\\'s'} }} {{ (1, 2) }} {{ 'say \"hi\"' }}", NULL,
           "{'a': [1, {'b': None}], 'c': \"it's\"} [1, 2] say \"hi\"");
    EXPECT("{{ \"a\" 'b' }}{{ '\\u00e9\\n'|length }}", NULL, "ab2");
    EXPECT("{{ x == y }} {{ [1, {'a': 2}] == [1, {'a': 2}] }} {{ 1 == 1.0 }} {{ true == 1 }}", "{\"x\": {\"a\": 1}, \"y\": {\"a\": 1}}",
           "True True True True");
}

static void test_statements(void)
{
    EXPECT("{% for x in l %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}"
           "{{ loop.revindex }}|{% endfor %}", "{\"l\": [\"a\", \"b\"]}", "10TrueFalse22|21FalseTrue21|");
    EXPECT("{% for x in [] %}x{% else %}empty{% endfor %}", NULL, "empty");
    EXPECT("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for k in d %}{{ k }}{% endfor %}",
           "{\"d\": {\"b\": 1, \"a\": 2}}", "b=1;a=2;ba");
    EXPECT("{% for x in range(10) if x % 3 == 0 %}{{ x }}{{ loop.length }} {% endfor %}", NULL, "04 34 64 94 ");
    EXPECT("{% for x in range(5) %}{% if x == 1 %}{% continue %}{% endif %}{% if x == 3 %}{% break %}{% endif %}"
           "{{ x }}{% endfor %}", NULL, "02");
    EXPECT("{% set x = 1 %}{% for i in [1] %}{% set x = 2 %}{{ x }}{% endfor %}{{ x }}", NULL, "21");
    /* a set inside a loop lasts for its iteration only (jinja2 2.9+) */
    EXPECT("{% set x = 'out' %}{% for i in range(3) %}{{ x }}{% if i == 0 %}{% set x = 'a' %}{% endif %}{{ x }}|"
           "{% endfor %}{{ x }}", NULL, "outa|outout|outout|out");
    EXPECT("{% for i in range(3) %}{% if i == 0 %}{% set y = 'a' %}{% endif %}{{ y }}|{% endfor %}", NULL, "a|||");
    EXPECT("{% set ns = namespace(n=0, s='') %}{% for i in range(3) %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}",
           NULL, "3");
    EXPECT("{% if a %}A{% elif b %}B{% elif c %}C{% else %}D{% endif %}", "{\"c\": 1}", "C");
    EXPECT("{% set a, b = 1, 'two' %}{{ b }}{{ a }}", NULL, "two1");
    EXPECT("{% set block %}in {{ 1 }}{% endset %}[{{ block }}]", NULL, "[in 1]");
    EXPECT("{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('Ann') }} {{ greet('Bo', punct='?') }}",
           NULL, "Hi Ann! Hi Bo?");
    EXPECT("{{ raise_exception is defined }} {{ strftime_now is defined }} {{ nothing is defined }}", NULL, "True True False");
}

static void test_filters_and_methods(void)
{
    EXPECT("{{ '  a b  '|trim }}|{{ 'xxaxx'|trim('x') }}|{{ 'Ab'|upper }}{{ 'Ab'|lower }}|{{ l|length }}{{ 'é'|length }}",
           "{\"l\": [1, 2]}", "a b|a|ABab|21");
    EXPECT("{{ d|tojson }}", "{\"d\": {\"s\": \"\u00fc \\\"q\\\" \\n\", \"n\": [1, 2.5, true, null], \"e\": {}, \"l\": []}}",
           "{\"s\": \"ü \\\"q\\\" \\n\", \"n\": [1, 2.5, true, null], \"e\": {}, \"l\": []}");
    EXPECT("{{ d|tojson(indent=2) }}", "{\"d\": {\"a\": [1, {\"b\": 2}], \"c\": {}}}",
           "{\n  \"a\": [\n    1,\n    {\n      \"b\": 2\n    }\n  ],\n  \"c\": {}\n}");
    EXPECT("{{ d|tojson(sort_keys=true) }} {{ 'é<>&'|tojson }} {{ 'é'|tojson(ensure_ascii=true) }}", "{\"d\": {\"b\": 1, \"a\": 2}}",
           "{\"a\": 2, \"b\": 1} \"é<>&\" \"\\u00e9\"");
    EXPECT("{{ l|join(', ') }}|{{ l|first }}{{ l|last }}|{{ x|default('dflt') }}|{{ none|default('d') }}|{{ ''|default('e', true) }}",
           "{\"l\": [\"a\", \"b\"]}", "a, b|ab|dflt|None|e");
    EXPECT("{{ l|map(attribute='n')|join }} {{ l|selectattr('n', 'equalto', 2)|list }} {{ l|rejectattr('n')|list|length }}",
           "{\"l\": [{\"n\": 1}, {\"n\": 2}, {\"n\": 0}]}", "120 [{'n': 2}] 1");
    EXPECT("{{ ['a', 'b', 'c']|reject('equalto', 'b')|join }} {{ [1, 0, 2]|select|list }} {{ ['x']|map('upper')|list }}",
           NULL, "ac [1, 2] ['X']");
    EXPECT("{{ d|items|list }} {{ 42|string ~ '!' }} {{ '3'|int + 1 }} {{ 'x'|replace('x', 'yy') }} {{ [1,2]|reverse|list }}",
           "{\"d\": {\"a\": 1}}", "[['a', 1]] 42! 4 yy [2, 1]");
    EXPECT("{{ 'a,b,,c'.split(',') }} {{ ' a  b '.split() }} {{ 'a b c'.split(' ', 1) }}", NULL,
           "['a', 'b', '', 'c'] ['a', 'b'] ['a', 'b c']");
    EXPECT("{{ 'hello'.startswith('he') }}{{ 'hello'.endswith(('x', 'lo')) }}|{{ '\\n x \\n'.strip() }}|{{ 'xxy'.lstrip('x') }}"
           "|{{ 'yxx'.rstrip('x') }}|{{ 'aXa'.replace('a', 'b') }}|{{ 'Hi'.upper() }}{{ 'Hi'.lower() }}", NULL,
           "TrueTrue|x|y|y|bXb|HIhi");
    EXPECT("{{ d.get('a') }} {{ d.get('z', 'none here') }} {{ d.keys()|list }} {{ d.values()|list }}", "{\"d\": {\"a\": 1}}",
           "1 none here ['a'] [1]");
    EXPECT("{{ 'line1\\nline2'|indent(2) }}|{{ 'abc'|title }}", NULL, "line1\n  line2|Abc");
}

static void test_tests(void)
{
    EXPECT("{{ x is none }}{{ x is not none }}{{ s is string }}{{ d is mapping }}{{ l is iterable }}{{ s is iterable }}"
           "{{ 1 is number }}{{ 1 is integer }}{{ 1.5 is float }}{{ true is boolean }}{{ false is false }}{{ 3 is odd }}"
           "{{ 4 is even }}{{ 9 is divisibleby 3 }}{{ 'a' is eq 'a' }}{{ l is sequence }}{{ 1 is defined }}",
           "{\"x\": null, \"s\": \"t\", \"d\": {}, \"l\": []}",
           "TrueFalseTrueTrueTrueTrueTrueTrueTrueTrueTrueTrueTrueTrueTrueTrueTrue");
    EXPECT("{{ d is mapping }} {{ l is mapping }} {{ s is mapping }} {{ d is string }}", "{\"d\": {}, \"l\": [], \"s\": \"\"}",
           "True False False False");
}

static void test_strftime(void)
{
    tp_template *t = NULL;
    tp_err err;
    const char *src = "{{ strftime_now('%d %b %Y') }}";
    CHECK_OK(tp_template_parse(&t, src, strlen(src), "t", &err), err);
    struct tm now = fixed_now();
    tp_template_set_time(t, &now);
    char *out = NULL;
    size_t len;
    CHECK_OK(tp_template_render(t, NULL, &out, &len, &err), err);
    CHECK(out && !strcmp(out, "14 Mar 2025"), "strftime_now with a fixed time: %s", out ? out : "");
    free(out);
    tp_template_set_time(t, NULL);   /* the real clock again: a year of four digits */
    CHECK_OK(tp_template_render(t, NULL, &out, &len, &err), err);
    CHECK(out && len == 11, "strftime_now with the clock: %s", out ? out : "");
    free(out);
    tp_template_free(t);
}

static void test_errors(void)
{
    /* at parse time, with line and column */
    EXPECT_FAIL("a\nb {{ x|wordcount }}", NULL, "t: line 2, column 8: filter 'wordcount' is not supported");
    EXPECT_FAIL("{{ x|frobnicate }}", NULL, "line 1, column 6: filter 'frobnicate' is not supported");
    EXPECT_FAIL("{% include 'x' %}", NULL, "line 1, column 4: statement 'include' is not supported");
    EXPECT_FAIL("{% extends 'x' %}", NULL, "statement 'extends' is not supported");
    EXPECT_FAIL("{{ x is frob }}", NULL, "test 'frob' is not supported");
    EXPECT_FAIL("{% for x in y recursive %}{% endfor %}", NULL, "recursive loops are not supported");
    EXPECT_FAIL("{% if x %}never closed", NULL, "line 1, column 4: block not closed: 'endif' expected");
    EXPECT_FAIL("{% endfor %}", NULL, "'endfor' without its opening block");
    EXPECT_FAIL("{{ 'open }}", NULL, "unterminated string literal");
    EXPECT_FAIL("{{ x ", NULL, "unclosed tag");
    EXPECT_FAIL("{# x", NULL, "unclosed comment");
    EXPECT_FAIL("{{ 1 + }}", NULL, "line 1, column 8: expected an expression, found '}}'");
    EXPECT_FAIL("{{ a $ b }}", NULL, "unexpected character '$'");
    EXPECT_FAIL("{{ 99999999999999999999 }}", NULL, "too large");
    /* at render time */
    EXPECT_FAIL("\n{{ raise_exception('Roles must alternate!') }}", NULL, "t: Roles must alternate!");
    EXPECT_FAIL("{{ x.y.z }}", "{\"x\": {}}", "line 1, column 7: 'dict object has no attribute 'y'' is undefined");
    EXPECT_FAIL("{{ undefined_thing.attr }}", NULL, "'undefined_thing' is undefined");
    EXPECT_FAIL("{{ 'a'.frob() }}", NULL, "method 'frob' of a string is not supported");
    EXPECT_FAIL("{{ l.append(1) }}", "{\"l\": []}", "method 'append' of a list is not supported");
    EXPECT_FAIL("{{ lipsum() }}", NULL, "function 'lipsum' is not supported");
    EXPECT_FAIL("{{ 1 / 0 }}", NULL, "division by zero");
    EXPECT_FAIL("{{ 1 + 'a' }}", NULL, "unsupported operand types");
    EXPECT_FAIL("{{ 9223372036854775807 + 1 }}", NULL, "integer overflow");
    EXPECT_FAIL("{% set d = {} %}{% set d.x = 1 %}", NULL, "only a namespace() takes assignments");
    EXPECT_FAIL("{% for a, b in [1] %}{% endfor %}", NULL, "not iterable");
    /* bounds */
    EXPECT_FAIL("{% for i in range(1001) %}{% for j in range(1000) %}{% endfor %}{% endfor %}", NULL,
                "more than 1000000 loop iterations");
    EXPECT_FAIL("{{ 'x' * 100000000 }}", NULL, "past 16 MiB");
    EXPECT_FAIL("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", NULL, "nested more than");
    EXPECT_FAIL("{% set ns = namespace(s='xxxxxxxxxxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                "{% endfor %}", NULL, "MiB");
    char src[700] = "{{ ";
    for (int i = 0; i < 300; i++)
        strcat(src, "(");
    strcat(src, "1");
    for (int i = 0; i < 300; i++)
        strcat(src, ")");
    strcat(src, " }}");
    EXPECT_FAIL(src, NULL, "nested more than 200 deep");
    tp_template *t = NULL;
    tp_err err;
    CHECK_FAILS(tp_template_parse(&t, "a\xff", 2, "bad.jinja", &err), err, "bad.jinja: invalid UTF-8 at byte 1");
    CHECK(!t);
    CHECK_FAILS(tp_template_parse(&t, "a\0b", 3, "nul.jinja", &err), err, "nul.jinja: holds a NUL byte");
}

/* tp_template_load over a tp_loaded_rank with only its copied texts set. */
static void test_load(void)
{
    tp_err err;
    tp_template *t = NULL;
    char *bos = NULL, *eos = NULL;
    tp_loaded_rank lr = {.source = "out"};
    CHECK_OK(tp_template_load(&t, &bos, &eos, &lr, &err), err);
    CHECK(!t && !bos && !eos, "no files: no template");

    lr.tokenizer_config_json = "{\"chat_template\": \"[{{ bos_token }}|{{ eos_token }}]\", "
                               "\"bos_token\": {\"content\": \"<s>\", \"lstrip\": false}, \"eos_token\": \"</s>\"}";
    CHECK_OK(tp_template_load(&t, &bos, &eos, &lr, &err), err);
    CHECK(t && bos && eos && !strcmp(bos, "<s>") && !strcmp(eos, "</s>"), "string template, bos as an object");
    cJSON *msgs = cJSON_Parse("[{\"role\": \"user\", \"content\": \"hi\"}]");
    char *out = NULL;
    size_t len;
    if (t) {
        CHECK_OK(tp_chat_render(t, bos, eos, msgs, true, &out, &len, &err), err);
        CHECK(out && !strcmp(out, "[<s>|</s>]"), "rendered with bos/eos: %s", out ? out : "");
        free(out);
    }
    tp_template_free(t);
    free(bos);
    free(eos);

    lr.tokenizer_config_json = "{\"chat_template\": [{\"name\": \"tool_use\", \"template\": \"T\"}, "
                               "{\"name\": \"default\", \"template\": \"D{{ bos_token is defined }}\"}], \"bos_token\": null}";
    CHECK_OK(tp_template_load(&t, &bos, &eos, &lr, &err), err);
    CHECK(t && !bos && !eos, "list template, null bos");
    if (t) {
        CHECK_OK(tp_chat_render(t, bos, eos, msgs, true, &out, &len, &err), err);
        CHECK(out && !strcmp(out, "DFalse"), "the default of the list, bos undefined: %s", out ? out : "");
        free(out);
    }
    tp_template_free(t);

    lr.chat_template_jinja = "J{{ messages[0].content }}\n";
    CHECK_OK(tp_template_load(&t, &bos, &eos, &lr, &err), err);
    if (t) {
        CHECK_OK(tp_chat_render(t, bos, eos, msgs, true, &out, &len, &err), err);
        CHECK(out && !strcmp(out, "Jhi"), "chat_template.jinja wins over tokenizer_config.json: %s", out ? out : "");
        free(out);
    }
    tp_template_free(t);
    lr.chat_template_jinja = "{{ x|wordcount }}";
    CHECK_FAILS(tp_template_load(&t, &bos, &eos, &lr, &err), err,
                "chat_template.jinja: line 1, column 6: filter 'wordcount' is not supported");
    lr.chat_template_jinja = NULL;
    lr.tokenizer_config_json = "{\"chat_template\": [{\"name\": \"tool_use\", \"template\": \"T\"}]}";
    CHECK_FAILS(tp_template_load(&t, &bos, &eos, &lr, &err), err, "no template named \"default\"");
    lr.tokenizer_config_json = "{\"chat_template\": 3}";
    CHECK_FAILS(tp_template_load(&t, &bos, &eos, &lr, &err), err, "tokenizer_config.json: chat_template: a string or a list");
    lr.tokenizer_config_json = "{\"chat_template\": \"{% if %}\"}";
    CHECK_FAILS(tp_template_load(&t, &bos, &eos, &lr, &err), err, "tokenizer_config.json: chat_template: line 1, column 7");

    /* the ChatML fallback: what tprun --chat wrote before templates */
    CHECK_OK(tp_template_chatml(&t, &err), err);
    cJSON *conv = cJSON_Parse("[{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Yo\"},"
                              "{\"role\": \"user\", \"content\": \"{{ x }}\"}]");
    if (t) {
        CHECK_OK(tp_chat_render(t, NULL, NULL, conv, true, &out, &len, &err), err);
        CHECK(out && !strcmp(out, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
                                  "<|im_start|>user\n{{ x }}<|im_end|>\n<|im_start|>assistant\n"),
              "ChatML: %s", out ? out : "");
        free(out);
    }
    tp_template_free(t);
    cJSON_Delete(conv);
    cJSON_Delete(msgs);
}

int main(void)
{
    test_real_templates();
    test_whitespace();
    test_expressions();
    test_statements();
    test_filters_and_methods();
    test_tests();
    test_strftime();
    test_errors();
    test_load();
    return check_finish("test_jinja");
}
