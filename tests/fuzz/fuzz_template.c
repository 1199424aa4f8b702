/* fuzz_template.c - libFuzzer target for the chat template engine
 * (runtime/jinja.c): the input is a template, optionally followed by a NUL
 * byte and a JSON object of variables (else a fixed conversation with a
 * system message, tools, a tool call and its result).  Parsing and
 * rendering must either succeed (NUL-terminated output of the length
 * reported) or fail with a one-line message; never crash, hang past the
 * engine's bounds, or leak. */
#include "runtime.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char default_ctx[] =
    "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"},"
    " {\"role\": \"user\", \"content\": \"Weather in Paris? {{ x }} \\u00e9\"},"
    " {\"role\": \"assistant\", \"content\": \"<think>\\nhm\\n</think>\\n\\n\", \"tool_calls\": [{\"id\": \"abc123XYZ\","
    " \"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"n\": 2.5}}}]},"
    " {\"role\": \"tool\", \"tool_call_id\": \"abc123XYZ\", \"content\": \"sunny\"}],"
    " \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"parameters\": {\"type\": \"object\"}}}],"
    " \"add_generation_prompt\": true, \"bos_token\": \"<s>\", \"eos_token\": \"</s>\", \"enable_thinking\": false}";

static void check_message(const tp_err *err)
{
    if (!err->msg[0] || strchr(err->msg, '\n'))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *src = (const char *)data;
    const char *nul = memchr(src, '\0', size);
    size_t src_len = nul ? (size_t)(nul - src) : size;
    cJSON *ctx = NULL;
    if (nul) {
        ctx = cJSON_ParseWithLength(nul + 1, size - src_len - 1);
        if (!cJSON_IsObject(ctx)) {
            cJSON_Delete(ctx);
            ctx = NULL;
        }
    }
    if (!ctx)
        ctx = cJSON_Parse(default_ctx);
    tp_template *t = NULL;
    tp_err err = {{0}};
    if (tp_template_parse(&t, src, src_len, "fuzz.jinja", &err)) {
        if (t)
            abort();
        check_message(&err);
    } else {
        char *out = NULL;
        size_t len = 0;
        err.msg[0] = '\0';
        if (tp_template_render(t, ctx, &out, &len, &err)) {
            if (out)
                abort();
            check_message(&err);
        } else if (!out || out[len] != '\0') {
            abort();
        }
        free(out);
        tp_template_free(t);
    }
    cJSON_Delete(ctx);
    return 0;
}
