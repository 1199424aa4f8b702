/* serve_request.c - tprun --serve's request parser: the untrusted body of a
 * POST to /v1/completions or /v1/chat/completions (OpenAI's JSON) -> the
 * fields of a tp_srv_req, or an OpenAI-style error (status, message, param,
 * code).  No HTTP and no model here: serve_http.c calls it with the body it
 * received, tests/fuzz/fuzz_request.c and tests/test_serve_request.c call it
 * directly (serve_internal.h states the contract). */
#include <cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "serve_internal.h"

static int badf(tp_srv_bad *b, int status, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int badf(tp_srv_bad *b, int status, const char *param, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->msg, sizeof b->msg, fmt, ap);
    va_end(ap);
    b->status = status;
    b->param = param;
    return -1;
}

int tp_srv_check_body_size(const tp_srv *s, size_t len, tp_srv_bad *b)
{
    if (len <= s->max_body)
        return 0;
    b->code = NULL;
    return badf(b, 413, NULL, "the request body is larger than the server's limit (%zu bytes)", s->max_body);
}

/* A field that is present and not null (OpenAI's clients send null for
 * "the default"). */
static const cJSON *field(const cJSON *root, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    return v && !cJSON_IsNull(v) ? v : NULL;
}

/* A number field inside [lo, hi] (integral when integer); *has says
 * whether it was there. */
static int number_field(const cJSON *root, const char *key, double lo, double hi, bool integer, bool *has,
                        double *out, tp_srv_bad *b)
{
    const cJSON *v = field(root, key);
    *has = v != NULL;
    if (!v)
        return 0;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || (integer && v->valuedouble != floor(v->valuedouble)))
        return badf(b, 400, key, "%s must be %s", key, integer ? "an integer" : "a number");
    if (v->valuedouble < lo || v->valuedouble > hi)
        return badf(b, 400, key, "%s %g is out of range: expected %g to %g", key, v->valuedouble, lo, hi);
    *out = v->valuedouble;
    return 0;
}

static int bool_field(const cJSON *root, const char *key, bool *out, tp_srv_bad *b)
{
    const cJSON *v = field(root, key);
    if (!v)
        return 0;
    if (!cJSON_IsBool(v))
        return badf(b, 400, key, "%s must be true or false", key);
    *out = cJSON_IsTrue(v);
    return 0;
}

/* stop: a string or a list of up to TP_SRV_MAX_STOPS strings ("" stops
 * nothing and is dropped). */
static int stop_field(const cJSON *root, tp_srv_req *r, tp_srv_bad *b)
{
    const cJSON *v = field(root, "stop");
    if (!v)
        return 0;
    if (cJSON_IsString(v)) {
        if (!v->valuestring[0])
            return 0;
        return (r->stops[r->n_stops++] = strdup(v->valuestring)) ? 0 : badf(b, 500, NULL, "out of memory");
    }
    if (!cJSON_IsArray(v))
        return badf(b, 400, "stop", "stop must be a string or a list of strings");
    if (cJSON_GetArraySize(v) > TP_SRV_MAX_STOPS)
        return badf(b, 400, "stop", "stop has %d strings; at most %d", cJSON_GetArraySize(v), TP_SRV_MAX_STOPS);
    const cJSON *e;
    cJSON_ArrayForEach(e, v) {
        if (!cJSON_IsString(e))
            return badf(b, 400, "stop", "stop must be a string or a list of strings");
        if (e->valuestring[0] && !(r->stops[r->n_stops++] = strdup(e->valuestring)))
            return badf(b, 500, NULL, "out of memory");
    }
    return 0;
}

/* Sampling: the server's defaults, then the request's fields.  Without a
 * seed in the request the caller draws one (has_seed false). */
static int sampling_fields(const tp_srv *s, const cJSON *root, tp_srv_req *r, tp_srv_bad *b)
{
    bool has;
    double v;
    r->sampler = s->o->defaults;
    if (number_field(root, "temperature", 0, 2, false, &has, &v, b))
        return -1;
    if (has)
        r->sampler.temperature = (float)v;
    if (number_field(root, "top_p", 0, 1, false, &has, &v, b))
        return -1;
    if (has && v <= 0)
        return badf(b, 400, "top_p", "top_p must be more than 0 and at most 1");
    if (has)
        r->sampler.top_p = (float)v;
    if (number_field(root, "top_k", -1, 1e9, true, &has, &v, b))
        return -1;
    if (has)
        r->sampler.top_k = v < 0 ? 0 : (int)v;   /* -1 (vLLM) and 0: off */
    if (number_field(root, "seed", -9.2e18, 9.2e18, true, &has, &v, b))
        return -1;
    r->has_seed = has;
    r->sampler.seed = has ? (uint64_t)(int64_t)v : 0;
    r->sampler.seen = NULL;
    r->sampler.n_seen = 0;
    return 0;
}

static int encode(const tp_srv *s, const char *text, size_t len, const char *param, tp_srv_req *r, tp_srv_bad *b)
{
    tp_err err;
    size_t bad_at = tp_utf8_first_invalid(text, len);
    if (bad_at != len)
        return badf(b, 400, param, "%s: invalid UTF-8 at byte %zu", param, bad_at);
    size_t n = 0;
    if (tp_tokenizer_encode(s->tok, text, len, &r->prompt, &n, &err))
        return badf(b, 400, param, "%s: %s", param, err.msg);
    r->n_prompt = (int)n;   /* the text is at most 1 MiB (the body) or 16 MiB (a template's output) */
    return 0;
}

/* prompt: a string, a list of token ids, or a list of one of either. */
static int prompt_field(const tp_srv *s, const cJSON *root, tp_srv_req *r, tp_srv_bad *b)
{
    const cJSON *v = field(root, "prompt");
    if (!v)
        return badf(b, 400, "prompt", "prompt is missing");
    if (cJSON_IsArray(v) && cJSON_GetArraySize(v) == 1 && !cJSON_IsNumber(v->child))
        v = v->child;   /* a list of one prompt */
    if (cJSON_IsString(v))
        return encode(s, v->valuestring, strlen(v->valuestring), "prompt", r, b);
    if (!cJSON_IsArray(v))
        return badf(b, 400, "prompt", "prompt must be a string or a list of token ids");
    int n = cJSON_GetArraySize(v), i = 0;
    r->prompt = malloc(((size_t)n + 1) * sizeof *r->prompt);
    if (!r->prompt)
        return badf(b, 500, NULL, "out of memory");
    const cJSON *e;
    cJSON_ArrayForEach(e, v) {
        if (!cJSON_IsNumber(e) || e->valuedouble != floor(e->valuedouble))
            return badf(b, 400, "prompt", "prompt must be a string or a list of token ids (one prompt: n is 1)");
        if (e->valuedouble < 0 || e->valuedouble >= s->cfg->vocab)
            return badf(b, 400, "prompt", "prompt token id %g is outside the vocabulary (%d)", e->valuedouble,
                        s->cfg->vocab);
        r->prompt[i++] = (int32_t)e->valuedouble;
    }
    r->n_prompt = n;
    return 0;
}

/* A message's content as the templates read it: a string (or null), or
 * OpenAI's list of {"type": "text", "text": ...} parts, joined into one
 * string.  Returns the content to use (a new item, or NULL to keep it). */
static cJSON *message_content(const cJSON *content, tp_srv_bad *b, bool *failed)
{
    *failed = false;
    if (!content || cJSON_IsString(content) || cJSON_IsNull(content))
        return NULL;
    if (!cJSON_IsArray(content)) {
        *failed = true;
        badf(b, 400, "messages", "a message's content must be a string or a list of text parts");
        return NULL;
    }
    char *text = NULL;
    size_t len = 0, cap = 0;
    const cJSON *part;
    cJSON_ArrayForEach(part, content) {
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(part, "text");
        if (!cJSON_IsString(type) || strcmp(type->valuestring, "text") || !cJSON_IsString(t)) {
            badf(b, 400, "messages", "only text content parts are supported");
            goto fail;
        }
        if (tp_srv_buf_append(&text, &len, &cap, t->valuestring, strlen(t->valuestring)))
            goto oom;
    }
    cJSON *joined = cJSON_CreateString(text ? text : "");
    free(text);
    if (joined)
        return joined;
oom:
    badf(b, 500, NULL, "out of memory");
fail:
    free(text);
    *failed = true;
    return NULL;
}

/* Adds a copy of item to ctx under key; -1 when out of memory. */
static int add_copy(cJSON *ctx, const char *key, const cJSON *item)
{
    cJSON *copy = cJSON_Duplicate(item, true);
    if (copy && cJSON_AddItemToObject(ctx, key, copy))
        return 0;
    cJSON_Delete(copy);
    return -1;
}

/* The template's variables: messages (contents made strings), tools,
 * add_generation_prompt, bos_token, eos_token, then chat_template_kwargs
 * (enable_thinking ...) for the names still free: a kwarg never shadows
 * the request's messages or the server's tokens, and no name is there
 * twice. */
static cJSON *chat_context(const tp_srv *s, const cJSON *root, tp_srv_bad *b)
{
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
    if (!cJSON_IsArray(msgs) || cJSON_GetArraySize(msgs) == 0) {
        badf(b, 400, "messages", "messages must be a non-empty list");
        return NULL;
    }
    const cJSON *tools = field(root, "tools"), *kwargs = field(root, "chat_template_kwargs");
    if (tools && !cJSON_IsArray(tools)) {
        badf(b, 400, "tools", "tools must be a list");
        return NULL;
    }
    if (kwargs && !cJSON_IsObject(kwargs)) {
        badf(b, 400, "chat_template_kwargs", "chat_template_kwargs must be an object");
        return NULL;
    }
    cJSON *ctx = cJSON_CreateObject();
    if (!ctx || add_copy(ctx, "messages", msgs))
        goto oom;
    cJSON *m;
    cJSON_ArrayForEach(m, cJSON_GetObjectItemCaseSensitive(ctx, "messages")) {
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        bool failed;
        if (!cJSON_IsObject(m) || !cJSON_IsString(role)) {
            badf(b, 400, "messages", "every message must be an object with a role string");
            goto fail;
        }
        cJSON *content = message_content(cJSON_GetObjectItemCaseSensitive(m, "content"), b, &failed);
        if (failed)
            goto fail;
        if (content)
            cJSON_ReplaceItemInObjectCaseSensitive(m, "content", content);
    }
    if ((tools && add_copy(ctx, "tools", tools)) || !cJSON_AddBoolToObject(ctx, "add_generation_prompt", true) ||
        (s->o->bos_token && !cJSON_AddStringToObject(ctx, "bos_token", s->o->bos_token)) ||
        (s->o->eos_token && !cJSON_AddStringToObject(ctx, "eos_token", s->o->eos_token)))
        goto oom;
    const cJSON *kw;
    if (kwargs)
        cJSON_ArrayForEach(kw, kwargs) if (kw->string && !cJSON_GetObjectItemCaseSensitive(ctx, kw->string) &&
                                           add_copy(ctx, kw->string, kw))
            goto oom;
    return ctx;
oom:
    badf(b, 500, NULL, "out of memory");
fail:
    cJSON_Delete(ctx);
    return NULL;
}

/* The conversation as the text the model reads: the model's own chat
 * template (tprun --chat renders a user turn the same way). */
static int messages_field(const tp_srv *s, const cJSON *root, tp_srv_req *r, tp_srv_bad *b)
{
    if (!s->o->chat_template) {
        b->code = NULL;
        return badf(b, 404, NULL, "this model has no chat template");
    }
    if (!cJSON_GetObjectItemCaseSensitive(root, "messages"))
        return badf(b, 400, "messages", "messages is missing");
    cJSON *ctx = chat_context(s, root, b);
    if (!ctx)
        return -1;
    char *text = NULL;
    size_t len = 0;
    tp_err err;
    int rc = tp_template_render(s->o->chat_template, ctx, &text, &len, &err);
    cJSON_Delete(ctx);
    if (rc)
        return badf(b, 400, "messages", "the chat template: %s", err.msg);
    rc = encode(s, text, len, "messages", r, b);
    free(text);
    return rc;
}

/* The request's fields common to both endpoints, after its prompt. */
static int common_fields(const tp_srv *s, const cJSON *root, tp_srv_req *r, tp_srv_bad *b)
{
    const cJSON *model = field(root, "model");
    if (model && !cJSON_IsString(model))
        return badf(b, 400, "model", "model must be a string");
    if (model && strcmp(model->valuestring, s->model_name)) {
        b->code = "model_not_found";
        return badf(b, 404, "model", "the model %.100s does not exist: this server serves %.100s",
                    model->valuestring, s->model_name);
    }
    bool has;
    double v;
    if (number_field(root, "n", 1, 1, true, &has, &v, b))
        return badf(b, 400, "n", "n must be 1: this server returns one choice per request");
    if (bool_field(root, "stream", &r->stream, b) || bool_field(root, "return_token_ids", &r->return_token_ids, b))
        return -1;
    const cJSON *so = field(root, "stream_options");
    if (so && !cJSON_IsObject(so))
        return badf(b, 400, "stream_options", "stream_options must be an object");
    if (so && bool_field(so, "include_usage", &r->include_usage, b))
        return -1;
    if (stop_field(root, r, b) || sampling_fields(s, root, r, b))
        return -1;
    /* max_completion_tokens (chat's newer name) wins over max_tokens */
    int max_tokens = r->kind == TP_SRV_COMPLETION ? 16 : s->max_seq;   /* OpenAI's defaults: 16, unbounded */
    const char *key = field(root, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
    if (number_field(root, key, 1, 1e9, true, &has, &v, b))
        return -1;
    if (has)
        max_tokens = (int)v;
    const char *prompt_param = r->kind == TP_SRV_CHAT ? "messages" : "prompt";
    if (r->n_prompt < 1)
        return badf(b, 400, prompt_param, "the prompt is empty");
    if (r->n_prompt > s->max_seq) {
        b->code = "context_length_exceeded";
        return badf(b, 400, prompt_param, "the prompt has %d tokens, the context (--max-seq) is %d", r->n_prompt,
                    s->max_seq);
    }
    /* no answer runs past the context: finish_reason "length" there */
    int room = s->max_seq - r->n_prompt + 1;
    r->max_tokens = max_tokens < room ? max_tokens : room;
    return 0;
}

int tp_srv_parse_request(const tp_srv *s, int kind, const char *body, size_t len, tp_srv_req *r, tp_srv_bad *b)
{
    *b = (tp_srv_bad){ 0 };
    if (tp_srv_check_body_size(s, len, b))
        return -1;
    cJSON *root = cJSON_ParseWithLength(body, len);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return badf(b, 400, NULL, "the request body is not a JSON object");
    }
    r->kind = kind;
    int rc = kind == TP_SRV_CHAT ? messages_field(s, root, r, b) : prompt_field(s, root, r, b);
    if (rc == 0)
        rc = common_fields(s, root, r, b);
    cJSON_Delete(root);
    return rc;
}
