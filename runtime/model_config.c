/* model_config.c - config.json of qwen3 / qwen2 / llama / mistral into a
 * tp_model_config.
 *
 * Both layouts of the RoPE settings are read: transformers < 5 writes
 * "rope_theta" and "rope_scaling" at the top level; transformers 5 writes
 * "rope_parameters": {"rope_type", "rope_theta", ...}.  Errors name the key.
 */
#include "runtime.h"

#include <cJSON.h>
#include <math.h>
#include <string.h>

#define CFG "config.json"

/* An integer-valued number in [lo, hi].  A missing or null key gives def
 * when has_def, else an error. */
static int get_int(const cJSON *o, const char *key, bool has_def, long def, long lo, long hi,
                   long *out, tp_err *err)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!it || cJSON_IsNull(it)) {
        if (!has_def)
            return tp_errorf(err, "%s: missing key \"%s\"", CFG, key);
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(it))
        return tp_errorf(err, "%s: key \"%s\" is not a number", CFG, key);
    double v = it->valuedouble;
    if (!(v == floor(v)) || v < (double)lo || v > (double)hi)
        return tp_errorf(err, "%s: key \"%s\" = %g is not an integer in [%ld, %ld]", CFG, key, v,
                         lo, hi);
    *out = (long)v;
    return 0;
}

static int get_float(const cJSON *o, const char *where, const char *key, bool has_def, double def,
                     double *out, tp_err *err)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!it || cJSON_IsNull(it)) {
        if (!has_def)
            return tp_errorf(err, "%s: missing key \"%s%s\"", CFG, where, key);
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(it) || !isfinite(it->valuedouble))
        return tp_errorf(err, "%s: key \"%s%s\" is not a finite number", CFG, where, key);
    *out = it->valuedouble;
    return 0;
}

static int get_bool(const cJSON *o, const char *key, bool def, bool *out, tp_err *err)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!it || cJSON_IsNull(it)) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsBool(it))
        return tp_errorf(err, "%s: key \"%s\" is not true/false", CFG, key);
    *out = cJSON_IsTrue(it);
    return 0;
}

/* rope_theta and the "llama3" scaling, from either layout. */
static int parse_rope(tp_model_config *c, const cJSON *root, tp_err *err)
{
    const cJSON *params = cJSON_GetObjectItemCaseSensitive(root, "rope_parameters");
    const char *where = "rope_parameters.";
    if (!params || cJSON_IsNull(params)) {
        params = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
        where = "rope_scaling.";
    }
    if (params && !cJSON_IsNull(params) && !cJSON_IsObject(params))
        return tp_errorf(err, "%s: key \"%.*s\" is not an object", CFG, (int)strlen(where) - 1, where);
    if (params && cJSON_IsNull(params))
        params = NULL;
    if (params) {
        const cJSON *child;
        cJSON_ArrayForEach(child, params)
            if (cJSON_IsObject(child))
                return tp_errorf(err, "%s: %s%s: per-layer-type RoPE parameters are not supported",
                                 CFG, where, child->string);
    }

    double theta;
    if (get_float(root, "", "rope_theta", true, 10000.0, &theta, err) < 0)
        return -1;
    if (params && get_float(params, where, "rope_theta", true, theta, &theta, err) < 0)
        return -1;
    if (!(theta > 1.0))
        return tp_errorf(err, "%s: rope_theta = %g must be > 1", CFG, theta);
    c->rope_theta = (float)theta;

    double prf = 1.0;
    if (get_float(root, "", "partial_rotary_factor", true, 1.0, &prf, err) < 0)
        return -1;
    if (params && get_float(params, where, "partial_rotary_factor", true, prf, &prf, err) < 0)
        return -1;
    if (prf != 1.0)
        return tp_errorf(err, "%s: partial_rotary_factor = %g is not supported (only 1)", CFG, prf);

    if (!params)
        return 0;
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(params, "rope_type");
    const char *type_key = "rope_type";
    if (!type || cJSON_IsNull(type)) {
        type = cJSON_GetObjectItemCaseSensitive(params, "type");
        type_key = "type";
    }
    if (!type || cJSON_IsNull(type))
        return 0;
    if (!cJSON_IsString(type))
        return tp_errorf(err, "%s: key \"%s%s\" is not a string", CFG, where, type_key);
    if (strcmp(type->valuestring, "default") == 0)
        return 0;
    if (strcmp(type->valuestring, "llama3") != 0)
        return tp_errorf(err, "%s: %s%s \"%s\" is not supported (only \"default\" and \"llama3\")",
                         CFG, where, type_key, type->valuestring);
    double factor, lo, hi, orig;
    if (get_float(params, where, "factor", false, 0, &factor, err) < 0 ||
        get_float(params, where, "low_freq_factor", false, 0, &lo, err) < 0 ||
        get_float(params, where, "high_freq_factor", false, 0, &hi, err) < 0 ||
        get_float(params, where, "original_max_position_embeddings", true, c->max_position, &orig,
                  err) < 0)
        return -1;
    if (!(factor > 0) || !(lo > 0) || !(hi > lo) || !(orig >= 1) || orig != floor(orig) || orig > 1e9)
        return tp_errorf(err, "%s: %s{factor, low_freq_factor, high_freq_factor, "
                         "original_max_position_embeddings} = {%g, %g, %g, %g} are not valid "
                         "(need factor > 0, 0 < low < high, an integer original length)",
                         CFG, where, factor, lo, hi, orig);
    c->rope_llama3 = true;
    c->rope_factor = (float)factor;
    c->rope_low_freq_factor = (float)lo;
    c->rope_high_freq_factor = (float)hi;
    c->rope_original_max_position = (int)orig;
    return 0;
}

/* qwen2/qwen3: sliding_window only counts when use_sliding_window is set,
 * and then for layers >= max_window_layers (or as layer_types says). */
static int parse_sliding(tp_model_config *c, const cJSON *root, tp_err *err)
{
    long win = 0;
    if (c->arch == TP_ARCH_LLAMA)
        return 0;
    if (get_int(root, "sliding_window", true, 0, 0, 1L << 30, &win, err) < 0)
        return -1;
    if (c->arch == TP_ARCH_MISTRAL) {
        c->sliding_window = (int)win;
        c->sliding_from_layer = 0;
        return 0;
    }
    bool use = false;
    if (get_bool(root, "use_sliding_window", false, &use, err) < 0)
        return -1;
    if (!use || win == 0)
        return 0;
    long from;
    if (get_int(root, "max_window_layers", true, 28, 0, 1L << 30, &from, err) < 0)
        return -1;
    const cJSON *types = cJSON_GetObjectItemCaseSensitive(root, "layer_types");
    if (types && cJSON_IsArray(types)) {
        /* The explicit list wins; accept the shape transformers derives
         * (full attention first, sliding after), refuse anything else. */
        if (cJSON_GetArraySize(types) != c->n_layers)
            return tp_errorf(err, "%s: layer_types has %d entries, num_hidden_layers is %d", CFG,
                             cJSON_GetArraySize(types), c->n_layers);
        int first_sliding = c->n_layers;
        for (int i = 0; i < c->n_layers; i++) {
            const cJSON *t = cJSON_GetArrayItem(types, i);
            if (!cJSON_IsString(t))
                return tp_errorf(err, "%s: layer_types[%d] is not a string", CFG, i);
            bool sl = strcmp(t->valuestring, "sliding_attention") == 0;
            if (!sl && strcmp(t->valuestring, "full_attention") != 0)
                return tp_errorf(err, "%s: layer_types[%d] \"%s\" is not supported", CFG, i,
                                 t->valuestring);
            if (sl && first_sliding == c->n_layers)
                first_sliding = i;
            if (!sl && first_sliding < i)
                return tp_errorf(err, "%s: layer_types: full attention at layer %d after sliding "
                                 "layers is not supported", CFG, i);
        }
        from = first_sliding;
    }
    c->sliding_window = (int)win;
    c->sliding_from_layer = (int)from;
    return 0;
}

static int parse_token_ids(tp_model_config *c, const cJSON *root, tp_err *err)
{
    long bos;
    if (get_int(root, "bos_token_id", true, -1, -1, INT32_MAX, &bos, err) < 0)
        return -1;
    c->bos_id = (int)bos;
    c->n_eos = 0;
    const cJSON *eos = cJSON_GetObjectItemCaseSensitive(root, "eos_token_id");
    if (!eos || cJSON_IsNull(eos))
        return 0;
    if (cJSON_IsNumber(eos)) {
        long v;
        if (get_int(root, "eos_token_id", false, 0, 0, INT32_MAX, &v, err) < 0)
            return -1;
        c->eos_ids[c->n_eos++] = (int)v;
        return 0;
    }
    if (!cJSON_IsArray(eos))
        return tp_errorf(err, "%s: key \"eos_token_id\" is neither a number nor a list", CFG);
    const cJSON *it;
    cJSON_ArrayForEach(it, eos) {
        double v = cJSON_IsNumber(it) ? it->valuedouble : -1;
        if (v < 0 || v != floor(v) || v > INT32_MAX)
            return tp_errorf(err, "%s: eos_token_id: an entry is not a token id", CFG);
        if (c->n_eos == (int)(sizeof c->eos_ids / sizeof c->eos_ids[0]))
            return tp_errorf(err, "%s: eos_token_id: more than %d ids", CFG, c->n_eos);
        c->eos_ids[c->n_eos++] = (int)v;
    }
    return 0;
}

int tp_model_config_parse(tp_model_config *c, const char *config_json, tp_err *err)
{
    memset(c, 0, sizeof *c);
    if (!config_json)
        return tp_errorf(err, "%s: missing", CFG);
    cJSON *root = cJSON_Parse(config_json);
    if (!root)
        return tp_errorf(err, "%s: not valid JSON", CFG);
    int rc = -1;
    if (!cJSON_IsObject(root)) {
        tp_errorf(err, "%s: not a JSON object", CFG);
        goto out;
    }
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    if (!cJSON_IsString(mt)) {
        tp_errorf(err, "%s: missing key \"model_type\"", CFG);
        goto out;
    }
    if (strcmp(mt->valuestring, "qwen3") == 0) c->arch = TP_ARCH_QWEN3;
    else if (strcmp(mt->valuestring, "qwen2") == 0) c->arch = TP_ARCH_QWEN2;
    else if (strcmp(mt->valuestring, "llama") == 0) c->arch = TP_ARCH_LLAMA;
    else if (strcmp(mt->valuestring, "mistral") == 0) c->arch = TP_ARCH_MISTRAL;
    else {
        tp_errorf(err, "%s: model_type \"%s\" is not supported (qwen3, qwen2, llama, mistral)", CFG,
                  mt->valuestring);
        goto out;
    }
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(root, "hidden_act");
    if (act && !cJSON_IsNull(act) && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu") != 0)) {
        tp_errorf(err, "%s: hidden_act is not \"silu\" (the only activation supported)", CFG);
        goto out;
    }

    const long big = 1L << 30;
    long hidden, layers, heads, kv, head_dim, inter, vocab, maxpos;
    if (get_int(root, "hidden_size", false, 0, 1, big, &hidden, err) < 0 ||
        get_int(root, "num_hidden_layers", false, 0, 1, 100000, &layers, err) < 0 ||
        get_int(root, "num_attention_heads", false, 0, 1, 100000, &heads, err) < 0 ||
        get_int(root, "num_key_value_heads", true, heads, 1, heads, &kv, err) < 0 ||
        get_int(root, "intermediate_size", false, 0, 1, big, &inter, err) < 0 ||
        get_int(root, "vocab_size", false, 0, 1, (1L << 24) - 1, &vocab, err) < 0 ||
        get_int(root, "max_position_embeddings", true, 4096, 1, big, &maxpos, err) < 0)
        goto out;
    /* transformers: Qwen3Config.head_dim defaults to 128; the others derive it. */
    long def_hd = c->arch == TP_ARCH_QWEN3 ? 128 : hidden / heads;
    if (get_int(root, "head_dim", def_hd >= 2, def_hd, 2, 1 << 16, &head_dim, err) < 0) /* none derived */
        goto out;
    if (head_dim % 2) {
        tp_errorf(err, "%s: head_dim = %ld must be even for RoPE", CFG, head_dim);
        goto out;
    }
    if (heads % kv) {
        tp_errorf(err, "%s: num_attention_heads = %ld is not a multiple of num_key_value_heads = %ld",
                  CFG, heads, kv);
        goto out;
    }
    c->hidden = (int)hidden; c->n_layers = (int)layers; c->n_heads = (int)heads;
    c->n_kv_heads = (int)kv; c->head_dim = (int)head_dim; c->intermediate = (int)inter;
    c->vocab = (int)vocab; c->max_position = (int)maxpos;

    double eps;
    if (get_float(root, "", "rms_norm_eps", true, 1e-6, &eps, err) < 0)
        goto out;
    if (!((float)eps > 0) || eps > 1) { /* > 0 as the float it is stored as */
        tp_errorf(err, "%s: rms_norm_eps = %g is not in (0, 1]", CFG, eps);
        goto out;
    }
    c->rms_eps = (float)eps;
    if (parse_rope(c, root, err) < 0)
        goto out;
    if (get_bool(root, "tie_word_embeddings", false, &c->tie_embeddings, err) < 0 ||
        get_bool(root, "attention_bias", c->arch == TP_ARCH_QWEN2, &c->attention_bias, err) < 0 ||
        get_bool(root, "mlp_bias", false, &c->mlp_bias, err) < 0)
        goto out;
    /* qwen2's q/k/v always have biases and o_proj never; llama/qwen3's
     * attention_bias covers o_proj too.  tp_model_create checks the tensors. */
    if (c->arch == TP_ARCH_QWEN2)
        c->attention_bias = true;
    c->o_bias = c->attention_bias && c->arch != TP_ARCH_QWEN2;
    c->qk_norm = c->arch == TP_ARCH_QWEN3;
    if (parse_sliding(c, root, err) < 0 || parse_token_ids(c, root, err) < 0)
        goto out;
    rc = 0;
out:
    cJSON_Delete(root);
    return rc;
}
