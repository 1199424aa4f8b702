/* generate.c - prefill, then token-by-token decoding; and the sampling
 * defaults of generation_config.json. */
#include <cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "json_internal.h"
#include "runtime.h"

/* ------------------------------------------------------ generation_config */

static int json_number(const cJSON *root, const char *key, bool *has, double *out, tp_err *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!v || cJSON_IsNull(v))
        return 0;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        return tp_errorf(err, "generation_config.json: %s is not a number", key);
    *has = true;
    *out = v->valuedouble;
    return 0;
}

int tp_gen_config_parse(tp_gen_config *g, const char *json, tp_err *err)
{
    memset(g, 0, sizeof *g);
    if (!json)
        return 0;
    cJSON *root = cJSON_Parse(json);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return tp_errorf(err, "generation_config.json: not a JSON object");
    }
    int rc = -1;
    double v = 0;
    const cJSON *ds = cJSON_GetObjectItemCaseSensitive(root, "do_sample");
    if (ds && !cJSON_IsNull(ds)) {
        if (!cJSON_IsBool(ds)) {
            tp_errorf(err, "generation_config.json: do_sample is not true or false");
            goto out;
        }
        g->has_do_sample = true;
        g->do_sample = cJSON_IsTrue(ds);
    }
    if (json_number(root, "temperature", &g->has_temperature, &v, err))
        goto out;
    if (g->has_temperature) {
        if (v < 0) {
            tp_errorf(err, "generation_config.json: temperature %g is negative", v);
            goto out;
        }
        g->temperature = (float)v;
    }
    if (json_number(root, "top_k", &g->has_top_k, &v, err))
        goto out;
    if (g->has_top_k) {
        if (v < 0 || v > INT32_MAX || v != floor(v)) {
            tp_errorf(err, "generation_config.json: top_k %g is not a count", v);
            goto out;
        }
        g->top_k = (int)v;
    }
    if (json_number(root, "top_p", &g->has_top_p, &v, err))
        goto out;
    if (g->has_top_p) {
        if (v <= 0 || v > 1) {
            tp_errorf(err, "generation_config.json: top_p %g is not in (0, 1]", v);
            goto out;
        }
        g->top_p = (float)v;
    }
    if (json_number(root, "repetition_penalty", &g->has_repetition_penalty, &v, err))
        goto out;
    if (g->has_repetition_penalty) {
        if (!(v > 0) || v > 1e6) {
            tp_errorf(err, "generation_config.json: repetition_penalty %g is not a positive number (1: off)", v);
            goto out;
        }
        g->repetition_penalty = (float)v;
    }
    bool has_max = false;
    if (json_number(root, "max_new_tokens", &has_max, &v, err))
        goto out;
    if (has_max && (v < 0 || v > INT32_MAX || v != floor(v))) {
        tp_errorf(err, "generation_config.json: max_new_tokens %g is not a count of tokens", v);
        goto out;
    }
    if (has_max)
        g->max_new_tokens = (int)v;

    if (tp_json_id_list(root, "eos_token_id", g->eos_ids, (int)(sizeof g->eos_ids / sizeof g->eos_ids[0]),
                        "generation_config.json", &g->n_eos, err) < 0)
        goto out;
    rc = 0;
out:
    cJSON_Delete(root);
    return rc;
}

/* -------------------------------------------------------------- generate */

int tp_gen_check_prompt(const tp_model *m, const int32_t *ids, int n, int context, tp_err *err)
{
    const tp_model_config *cfg = tp_model_get_config(m);
    if (n < 1)
        return tp_errorf(err, "the prompt is empty");
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= cfg->vocab)
            return tp_errorf(err, "prompt id %d is outside the vocabulary (%d)", (int)ids[i], cfg->vocab);
    int pos = tp_model_position(m);
    if (pos == 0 && n > context)
        return tp_errorf(err, "prompt has %d tokens, the context is %d", n, context);
    if ((long)pos + n > context)
        return tp_errorf(err, "prompt has %d tokens after the %d of the conversation so far, the context is %d",
                         n, pos, context);
    return 0;
}

static bool is_eos(int32_t id, const tp_gen_opts *o)
{
    for (int i = 0; i < o->n_eos; i++)
        if (o->eos_ids[i] == id)
            return true;
    return false;
}

int tp_generate(tp_model *m, tp_comm *comm, tp_rng *rng, const int32_t *ids, int n,
                const tp_gen_opts *o, tp_gen_result *res, tp_err *err)
{
    memset(res, 0, sizeof *res);
    res->pending = -1;
    if (tp_gen_check_prompt(m, ids, n, o->context, err))
        return -1;
    (void)comm;   /* the model holds its comm: tp_model_pick broadcasts */
    int max_new = o->max_new_tokens > 0 ? o->max_new_tokens : 0;
    res->ids = malloc(((size_t)max_new + 1) * sizeof *res->ids);
    if (!res->ids)
        return tp_errorf(err, "out of memory");
    /* The sampler's view of the ids seen, for the repetition penalty:
     * history, then the prompt, then each generated id as it comes. */
    tp_sampler_opts so = o->sampler;
    int32_t *seen = NULL;
    if (so.repetition_penalty > 0 && so.repetition_penalty != 1.0f) {
        seen = malloc((o->n_history + (size_t)n + (size_t)max_new + 1) * sizeof *seen);
        if (!seen) {
            tp_gen_result_free(res);
            return tp_errorf(err, "out of memory");
        }
        if (o->n_history)
            memcpy(seen, o->history, o->n_history * sizeof *seen);
        memcpy(seen + o->n_history, ids, (size_t)n * sizeof *seen);
        so.seen = seen;
        so.n_seen = o->n_history + (size_t)n;
    }

    /* The prompt: one forward, and the first pick (from the host logits
     * when the caller wants them, else wherever the model runs). */
    int32_t tok = -1;
    double t0 = tp_now();
    if (max_new > 0 || o->prompt_logits) {
        if (o->prompt_logits
                ? tp_model_forward(m, ids, n, o->prompt_logits, err) < 0 ||
                      (max_new > 0 && tp_model_pick(m, o->prompt_logits, &so, rng, &tok, err) < 0)
                : tp_model_forward_pick(m, ids, n, &so, rng, &tok, err) < 0)
            goto fail;
    } else if (tp_model_forward(m, ids, n, NULL, err) < 0) {
        goto fail;
    }
    res->prefill_s = tp_now() - t0;
    res->n_prefill = n;

    double t_decode = tp_now();
    while (res->n_ids < (size_t)max_new) {
        res->ids[res->n_ids++] = tok;
        res->pending = tok;
        if (seen)
            seen[so.n_seen++] = tok;
        if (o->on_token && o->on_token(tok, o->arg, err))
            goto fail;
        if (is_eos(tok, o)) {
            res->stopped_eos = true;
            break;
        }
        if (res->n_ids == (size_t)max_new)
            break;
        if (tp_model_position(m) + 1 > o->context) {
            res->stopped_context = true;
            break;
        }
        int32_t fed = tok;
        if (tp_model_forward_pick(m, &fed, 1, &so, rng, &tok, err))
            goto fail;
        res->pending = -1;   /* fed is in the cache now */
        res->n_decode++;
    }
    res->decode_s = tp_now() - t_decode;
    free(seen);
    return 0;
fail:
    free(seen);
    tp_gen_result_free(res);
    return -1;
}

void tp_gen_result_free(tp_gen_result *r)
{
    free(r->ids);
    r->ids = NULL;
    r->n_ids = 0;
}
