/* plan.c - tensor-parallel plans: style names, built-in plans per model type,
 * plans from JSON, and the lookup of a tensor name in a plan.
 *
 * What is reproduced from transformers 5.24.0 (the installed version):
 *  - models/{qwen3,qwen2,llama,mistral}/configuration_*.py base_model_tp_plan
 *    (copied below) and modeling_*.py `_tp_plan = {"lm_head":
 *    "colwise_gather_output"}` for *ForCausalLM;
 *  - distributed/mixin.py init_parallel_plans: the base-model plan's keys
 *    live under the base model (prefix "model."), the ForCausalLM's at the
 *    top level; it also puts "embed_tokens": "embedding_rowwise" in front of
 *    any non-empty plan.  tpconvert does the same by default (the cut
 *    "vocab"), as vLLM does; --replicate-embedding keeps it whole (the
 *    runtime then needs no all-reduce for the lookup);
 *  - distributed/parallel_utils.py replace_layer_number_by_wildcard and
 *    _get_parameter_plan: the lookup (exact generic name, then its module);
 *  - distributed/tensor_parallel.py ALL_PARALLEL_STYLES registrations for
 *    the style names, plus the names of transformers 4.5x's ParallelInterface
 *    (colwise_rep, rowwise_rep, local_colwise, local_rowwise,
 *    local_packed_rowwise, local, gather, ...).
 */
#include "convert.h"
#include "json_internal.h"

#include <cJSON.h>
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ styles */

static const char *const style_names[] = {
    [TP_STYLE_REPLICATE] = "replicate",
    [TP_STYLE_COLWISE] = "colwise",
    [TP_STYLE_COLWISE_GATHER] = "colwise_gather_output",
    [TP_STYLE_ROWWISE] = "rowwise",
    [TP_STYLE_ROWWISE_REP] = "rowwise_rep",
    [TP_STYLE_PACKED_COLWISE] = "packed_colwise",
    [TP_STYLE_PACKED_ROWWISE] = "packed_rowwise",
    [TP_STYLE_VOCAB] = "vocab",
    [TP_STYLE_EXPERT] = "expert",
};

const char *tp_style_name(tp_style s)
{
    if ((unsigned)s < sizeof style_names / sizeof style_names[0] && style_names[s])
        return style_names[s];
    return "?";
}

/* Every name that cuts the parameters like one of ours.  Same cut, not always
 * the same forward: colwise_rep / colwise_gather_output gather the output
 * (lm_head), colwise keeps it sharded; local_* are the 4.5x spellings of the
 * same parameter shards without DTensor. */
static const struct {
    const char *name;
    tp_style style;
} style_aliases[] = {
    {"replicate", TP_STYLE_REPLICATE},
    {"replicated", TP_STYLE_REPLICATE},
    {"replicated_with_grad_allreduce", TP_STYLE_REPLICATE}, /* qwen3 q_norm/k_norm */
    {"sequence_parallel", TP_STYLE_REPLICATE}, /* SequenceParallel keeps params Replicate() */
    {"colwise", TP_STYLE_COLWISE},
    {"local_colwise", TP_STYLE_COLWISE},
    {"colwise_gather_output", TP_STYLE_COLWISE_GATHER}, /* transformers 5 */
    {"colwise_rep", TP_STYLE_COLWISE_GATHER},           /* transformers 4.5x */
    {"rowwise", TP_STYLE_ROWWISE},
    {"local_rowwise", TP_STYLE_ROWWISE},
    {"rowwise_rep", TP_STYLE_ROWWISE_REP},
    {"rowwise_split_input", TP_STYLE_ROWWISE_REP}, /* registered identically in 5.24 */
    {"packed_colwise", TP_STYLE_PACKED_COLWISE},
    {"local_packed_colwise", TP_STYLE_PACKED_COLWISE},
    {"packed_rowwise", TP_STYLE_PACKED_ROWWISE},
    {"local_packed_rowwise", TP_STYLE_PACKED_ROWWISE},
    {"vocab", TP_STYLE_VOCAB},
    {"embedding_rowwise", TP_STYLE_VOCAB}, /* EmbeddingParallel(shard_dim=0) */
    {"expert", TP_STYLE_EXPERT},           /* ours: --expert-parallel */
};

/* Known to transformers, meaningless for a dense checkpoint cut offline. */
static const char *const unsupported_styles[] = {
    "embedding_colwise", "gather", "local", "isolated", "all_reduce", "mla_kv_a_proj",
    "moe_tp_experts", "moe_identity_expert", "local_params", "grouped_gemm", "ep_router",
    "ep_dispatch_experts",
};

int tp_style_parse(const char *name, const char *key, tp_style *out, tp_err *err)
{
    for (size_t i = 0; i < sizeof style_aliases / sizeof style_aliases[0]; i++)
        if (!strcmp(name, style_aliases[i].name)) {
            *out = style_aliases[i].style;
            return 0;
        }
    for (size_t i = 0; i < sizeof unsupported_styles / sizeof unsupported_styles[0]; i++)
        if (!strcmp(name, unsupported_styles[i]))
            return tp_errorf(err, "plan key \"%s\": style \"%s\" is a transformers style that "
                             "tpconvert does not support (dense models only)", key ? key : "?", name);
    return tp_errorf(err, "plan key \"%s\": unknown style \"%s\" (known: replicate, colwise, "
                     "colwise_gather_output/colwise_rep, rowwise, rowwise_rep, local_colwise, "
                     "local_rowwise, packed_colwise, packed_rowwise, vocab/embedding_rowwise, "
                     "replicated_with_grad_allreduce)", key ? key : "?", name);
}

/* -------------------------------------------------------------------- plan */

void tp_plan_free(tp_plan *p)
{
    if (!p)
        return;
    for (size_t i = 0; i < p->n; i++)
        free(p->patterns[i]);
    free(p->patterns);
    free(p->styles);
    free(p->source);
    memset(p, 0, sizeof *p);
}

int tp_plan_set(tp_plan *p, const char *pattern, tp_style style, tp_err *err)
{
    for (size_t i = 0; i < p->n; i++)
        if (!strcmp(p->patterns[i], pattern)) {
            p->styles[i] = style;
            return 0;
        }
    char **np = realloc(p->patterns, (p->n + 1) * sizeof *np);
    if (!np)
        return tp_errorf(err, "out of memory");
    p->patterns = np;
    tp_style *ns = realloc(p->styles, (p->n + 1) * sizeof *ns);
    if (!ns)
        return tp_errorf(err, "out of memory");
    p->styles = ns;
    if (!(p->patterns[p->n] = strdup(pattern)))
        return tp_errorf(err, "out of memory");
    p->styles[p->n++] = style;
    return 0;
}

bool tp_wildcard_layers(const char *name, char *out, size_t cap)
{
    /* re.sub(r"\.\d+(\.|$)", lambda m: ".*" + m.group(1), name): matches do
     * not overlap, so in "a.1.2" the dot closing ".1." is consumed and "2"
     * stays a number. */
    size_t o = 0;
    const char *s = name;
    while (*s) {
        if (*s == '.' && isdigit((unsigned char)s[1])) {
            const char *d = s + 1;
            while (isdigit((unsigned char)*d))
                d++;
            if (*d == '.' || *d == '\0') {
                if (o + 2 >= cap)
                    return false;
                out[o++] = '.';
                out[o++] = '*';
                if (*d == '.') {
                    if (o + 1 >= cap)
                        return false;
                    out[o++] = '.';
                    d++;
                }
                s = d;
                continue;
            }
        }
        if (o + 1 >= cap)
            return false;
        out[o++] = *s++;
    }
    if (o >= cap)
        return false;
    out[o] = '\0';
    return true;
}

static long find_pattern(const tp_plan *p, const char *key)
{
    for (size_t i = 0; i < p->n; i++)
        if (!strcmp(p->patterns[i], key))
            return (long)i;
    return -1;
}

/* key itself, then its module (key without the last ".part"). */
static long match_param_or_module(const tp_plan *p, const char *key)
{
    long i = find_pattern(p, key);
    if (i >= 0)
        return i;
    const char *dot = strrchr(key, '.');
    if (!dot)
        return -1;
    size_t n = (size_t)(dot - key);
    char module[512];
    if (n >= sizeof module)
        return -1;
    memcpy(module, key, n);
    module[n] = '\0';
    return find_pattern(p, module);
}

long tp_plan_match(const tp_plan *p, const char *tensor_name)
{
    /* A concrete key ("model.layers.0.mlp.up_proj") wins over the wildcard
     * one: transformers 5.24 expands "*" into concrete names before applying
     * the plan (_expand_parallel_plan), so both spellings work there. */
    long i = match_param_or_module(p, tensor_name);
    if (i >= 0)
        return i;
    char generic[512];
    if (!tp_wildcard_layers(tensor_name, generic, sizeof generic))
        return -1;
    return match_param_or_module(p, generic);
}

char *tp_plan_to_json(const tp_plan *p)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return NULL;
    for (size_t i = 0; i < p->n; i++)
        if (!cJSON_AddStringToObject(o, p->patterns[i], tp_style_name(p->styles[i]))) {
            cJSON_Delete(o);
            return NULL;
        }
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

/* Which names a --plan key may use as they are. */
static bool is_full_name(const char *key)
{
    return !strncmp(key, "model.", 6) || !strcmp(key, "model") || !strcmp(key, "lm_head") ||
           !strncmp(key, "lm_head.", 8);
}

static bool pattern_chars_ok(const char *key)
{
    if (!*key)
        return false;
    for (const char *s = key; *s; s++)
        if (!(isalnum((unsigned char)*s) || *s == '_' || *s == '.' || *s == '*' || *s == '-'))
            return false;
    return key[0] != '.' && key[strlen(key) - 1] != '.' && !strstr(key, "..");
}

int tp_plan_parse(const char *json, size_t len, const char *source, bool base_prefixed,
                  tp_plan *out, tp_err *err)
{
    memset(out, 0, sizeof *out);
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!root)
        return tp_errorf(err, "%s: not valid JSON", source);
    int rc = -1;
    const cJSON *obj = root;
    if (!cJSON_IsObject(obj)) {
        tp_errorf(err, "%s: the plan must be a JSON object {\"pattern\": \"style\", ...}", source);
        goto out;
    }
    if (!(out->source = strdup(source))) {
        tp_errorf(err, "out of memory");
        goto out;
    }
    const cJSON *it;
    cJSON_ArrayForEach(it, obj)
    {
        const char *key = it->string;
        if (!key || !pattern_chars_ok(key) || strlen(key) > 400) {
            tp_errorf(err, "%s: plan key \"%s\" is not a module name pattern", source,
                      key ? key : "");
            goto out;
        }
        if (!cJSON_IsString(it) || !it->valuestring) {
            tp_errorf(err, "%s: plan key \"%s\": the style must be a string", source, key);
            goto out;
        }
        tp_style st;
        if (tp_style_parse(it->valuestring, key, &st, err) < 0) {
            tp_err_prefix(err, "%s", source);
            goto out;
        }
        char full[512];
        if (base_prefixed || !is_full_name(key))
            snprintf(full, sizeof full, "model.%s", key);
        else
            snprintf(full, sizeof full, "%s", key);
        if (find_pattern(out, full) >= 0) {
            tp_errorf(err, "%s: plan key \"%s\" is given twice", source, key);
            goto out;
        }
        if (tp_plan_set(out, full, st, err) < 0)
            goto out;
    }
    rc = 0;
out:
    cJSON_Delete(root);
    if (rc < 0)
        tp_plan_free(out);
    return rc;
}

/* ------------------------------------------------------------ built-ins */

/* The built-in plans (tp_plan_builtin, tp_model_type_known) are made from
 * the per-layer tensor table in arch.c. */

/* modeling_*.py: `_tp_plan = {"lm_head": "colwise_gather_output"}`. */
static int add_lm_head(tp_plan *p, tp_err *err)
{
    if (find_pattern(p, "lm_head") >= 0)
        return 0;
    return tp_plan_set(p, "lm_head", TP_STYLE_COLWISE_GATHER, err);
}

/* ------------------------------------------------------------- resolving */

static int unknown_model_type(const char *model_type, tp_err *err)
{
    return tp_errorf(err, "config.json: model_type \"%s\" is not supported (qwen3, qwen2, llama, "
                     "mistral); give a plan by hand with --plan FILE.json, a JSON object of "
                     "module pattern -> style, e.g. {\"layers.*.self_attn.q_proj\": \"colwise\", "
                     "\"layers.*.self_attn.o_proj\": \"rowwise\", \"lm_head\": "
                     "\"colwise_gather_output\"}", model_type);
}

static bool names_embedding(const tp_plan *p)
{
    return find_pattern(p, "model.embed_tokens") >= 0 ||
           find_pattern(p, "model.embed_tokens.weight") >= 0;
}

int tp_plan_resolve(const char *config_json, size_t config_len, const char *plan_path,
                    bool vocab_parallel, tp_plan *out, tp_err *err)
{
    memset(out, 0, sizeof *out);
    /* Read as tp_config_parse reads it (last duplicate wins, no NUL). */
    cJSON *cfg = tp_json_parse_config(config_json, config_len, "config.json", err);
    if (!cfg)
        return -1;
    int rc = -1;
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(cfg, "model_type");
    if (!cJSON_IsObject(cfg) || !cJSON_IsString(mt) || !mt->valuestring) {
        tp_errorf(err, "config.json: no \"model_type\" string");
        goto out;
    }
    const char *model_type = mt->valuestring;
    if (plan_path) {
        /* --plan replaces every other source: it is the whole plan. */
        char *text = NULL;
        size_t len = 0;
        if (tp_read_file(plan_path, 16u << 20, &text, &len, err) < 0)
            goto out;
        int prc = tp_plan_parse(text, len, plan_path, false, out, err);
        free(text);
        if (prc < 0)
            goto out;
    } else if (!tp_model_type_known(model_type)) {
        unknown_model_type(model_type, err);
        goto out;
    } else {
        const cJSON *base = cJSON_GetObjectItemCaseSensitive(cfg, "base_model_tp_plan");
        if (base && !cJSON_IsNull(base)) {
            if (!cJSON_IsObject(base)) {
                tp_errorf(err, "config.json: \"base_model_tp_plan\" is not an object");
                goto out;
            }
            char *text = cJSON_PrintUnformatted(base);
            if (!text) {
                tp_errorf(err, "out of memory");
                goto out;
            }
            int prc = tp_plan_parse(text, strlen(text), "config.json base_model_tp_plan", true,
                                    out, err);
            free(text);
            if (prc < 0)
                goto out;
            if (add_lm_head(out, err) < 0)
                goto out;
        } else if (tp_plan_builtin(model_type, out, err) < 0) {
            goto out;
        }
    }
    if (vocab_parallel && !names_embedding(out) &&
        tp_plan_set(out, "model.embed_tokens", TP_STYLE_VOCAB, err) < 0)
        goto out;
    rc = 0;
out:
    cJSON_Delete(cfg);
    if (rc < 0)
        tp_plan_free(out);
    return rc;
}
