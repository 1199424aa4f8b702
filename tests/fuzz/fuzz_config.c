/* fuzz_config.c - libFuzzer target for config.json: both parsers of it,
 * the runtime's (tp_model_config_parse, runtime/model_config.c) and the
 * converter's (tp_model_info_parse, convert/cut.c).  Any input either
 * parses into sizes that hold together or fails with a one-line message
 * naming config.json; never crash or leak. */
#include "convert.h"
#include "runtime.h"

#include <stdlib.h>
#include <string.h>

static void check_message(const tp_err *err)
{
    if (!strstr(err->msg, "config.json") || strchr(err->msg, '\n'))
        abort();
}

static void runtime_parser(const char *json)
{
    tp_model_config c;
    tp_err err;
    if (tp_model_config_parse(&c, json, &err) != 0) {
        check_message(&err);
        return;
    }
    if (c.hidden < 1 || c.n_layers < 1 || c.n_heads < 1 || c.n_kv_heads < 1 ||
        c.n_heads % c.n_kv_heads || c.head_dim < 2 || c.head_dim % 2 || c.intermediate < 1 ||
        c.vocab < 1 || c.max_position < 1 || !(c.rms_eps > 0) || c.n_eos < 0 || c.n_eos > 8)
        abort();
}

static void converter_parser(const char *json, size_t len)
{
    tp_model_info mi;
    tp_err err;
    if (tp_model_info_parse(json, len, "fuzz/config.json", &mi, &err) != 0) {
        check_message(&err);
        return;
    }
    if (!mi.model_type[0] || mi.hidden < 1 || mi.n_heads < 1 || mi.n_kv_heads < 1 ||
        mi.n_heads % mi.n_kv_heads || mi.head_dim < 1 || mi.intermediate < 1 || mi.vocab < 1 ||
        mi.n_layers < 1)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *json = malloc(size + 1); /* the runtime parser takes a C string */
    if (!json)
        return 0;
    memcpy(json, data, size);
    json[size] = '\0';
    runtime_parser(json);
    converter_parser(json, size);
    free(json);
    return 0;
}
