/* chat.c - the model's chat template, found in a conversion's copied files,
 * and the rendering of a conversation with it (tprun --chat and -i, the
 * server).  ChatML, as a Jinja template of its own, is the fallback for a
 * model that has none.  The Jinja engine itself is jinja.c. */
#include <stdlib.h>
#include <string.h>

#include <cJSON.h>

#include "runtime.h"

/* Qwen's turns, what tprun --chat wrote before it read the model's own
 * template: each message between <|im_start|>ROLE\n and <|im_end|>\n. */
static const char chatml_template[] =
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

int tp_template_chatml(tp_template **t, tp_err *err)
{
    return tp_template_parse(t, chatml_template, sizeof chatml_template - 1, "ChatML template", err);
}

/* A special token in tokenizer_config.json: a string, or an AddedToken
 * object {"content": ...}; anything else (null, absent) is none. */
static int special_token(const cJSON *cfg, const char *key, char **out, tp_err *err)
{
    *out = NULL;
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (cJSON_IsObject(v))
        v = cJSON_GetObjectItemCaseSensitive(v, "content");
    if (!cJSON_IsString(v))
        return 0;
    if (!(*out = strdup(v->valuestring)))
        return tp_errorf(err, "tokenizer_config.json: out of memory");
    return 0;
}

/* tokenizer_config.json's "chat_template": a string, or a list of
 * {name, template} of which "default" is the one apply_chat_template uses. */
static int config_template(const cJSON *cfg, const char **src, tp_err *err)
{
    *src = NULL;
    const cJSON *ct = cJSON_GetObjectItemCaseSensitive(cfg, "chat_template");
    if (!ct || cJSON_IsNull(ct))
        return 0;
    if (cJSON_IsString(ct)) {
        *src = ct->valuestring;
        return 0;
    }
    if (!cJSON_IsArray(ct))
        return tp_errorf(err, "tokenizer_config.json: chat_template: a string or a list of {name, template} expected");
    for (const cJSON *e = ct->child; e; e = e->next) {
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(e, "name");
        const cJSON *tmpl = cJSON_GetObjectItemCaseSensitive(e, "template");
        if (!cJSON_IsString(name) || !cJSON_IsString(tmpl))
            return tp_errorf(err, "tokenizer_config.json: chat_template: an entry without a string name and template");
        if (!strcmp(name->valuestring, "default")) {
            *src = tmpl->valuestring;
            return 0;
        }
    }
    return tp_errorf(err, "tokenizer_config.json: chat_template: no template named \"default\"");
}

int tp_template_load(tp_template **t, char **bos_token, char **eos_token, const tp_loaded_rank *lr, tp_err *err)
{
    *t = NULL;
    *bos_token = *eos_token = NULL;
    cJSON *cfg = NULL;
    if (lr->tokenizer_config_json) {
        cfg = cJSON_Parse(lr->tokenizer_config_json);
        if (!cJSON_IsObject(cfg)) {
            cJSON_Delete(cfg);
            return tp_errorf(err, "%s: tokenizer_config.json: not a JSON object", lr->source ? lr->source : "");
        }
    }
    const char *src = NULL, *name = NULL;
    int rc = 0;
    if (lr->chat_template_jinja) {
        src = lr->chat_template_jinja;
        name = "chat_template.jinja";
    } else if (cfg) {
        rc = config_template(cfg, &src, err);
        name = "tokenizer_config.json: chat_template";
    }
    if (rc == 0 && cfg)
        rc = special_token(cfg, "bos_token", bos_token, err);
    if (rc == 0 && cfg)
        rc = special_token(cfg, "eos_token", eos_token, err);
    if (rc == 0 && src)
        rc = tp_template_parse(t, src, strlen(src), name, err);
    cJSON_Delete(cfg);
    if (rc < 0) {
        free(*bos_token);
        free(*eos_token);
        *bos_token = *eos_token = NULL;
    }
    return rc;
}

int tp_chat_render(const tp_template *t, const char *bos_token, const char *eos_token, const cJSON *messages,
                   bool add_generation_prompt, char **out, size_t *out_len, tp_err *err)
{
    *out = NULL;
    cJSON *ctx = cJSON_CreateObject();
    cJSON *msgs = ctx ? cJSON_Duplicate(messages, true) : NULL;
    bool ok = msgs && cJSON_AddItemToObject(ctx, "messages", msgs);
    if (!ok)
        cJSON_Delete(msgs);
    ok = ok && cJSON_AddBoolToObject(ctx, "add_generation_prompt", add_generation_prompt);
    if (ok && bos_token)
        ok = cJSON_AddStringToObject(ctx, "bos_token", bos_token) != NULL;
    if (ok && eos_token)
        ok = cJSON_AddStringToObject(ctx, "eos_token", eos_token) != NULL;
    int rc = ok ? tp_template_render(t, ctx, out, out_len, err) : tp_errorf(err, "out of memory for a chat");
    cJSON_Delete(ctx);
    return rc;
}
