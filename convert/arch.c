/* arch.c - the one description of what tprun runs: config.json parsing
 * (tpconvert and tprun read it here, with transformers' defaults), the
 * per-layer tensor table, and the "runnable?" checks built on them.
 *
 * config.json: both layouts of the RoPE settings are read: transformers < 5
 * writes "rope_theta" and "rope_scaling" at the top level; transformers 5
 * writes "rope_parameters": {"rope_type", "rope_theta", ...}.
 * head_dim when absent: transformers 5's configuration_qwen3.py declares
 * `head_dim: int = 128` (a constant default, not derived), so a qwen3
 * config without head_dim means 128; llama, mistral and qwen2 derive
 * hidden_size // num_attention_heads (we also require it to divide, so that
 * q_proj is square as those models assume).
 */
#include "convert.h"
#include "json_internal.h"

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* -------------------------------------------------------------- the table */

#define ARCH_BIT(a) (1u << (a))
#define ALL_ARCHS (ARCH_BIT(TP_ARCH_QWEN3) | ARCH_BIT(TP_ARCH_QWEN2) | ARCH_BIT(TP_ARCH_LLAMA) | \
                   ARCH_BIT(TP_ARCH_MISTRAL))

/* In the order of transformers' base_model_tp_plan (the built-in plan is
 * made from the rows with a plan_style, in this order). */
const tp_arch_tensor tp_arch_layer_tensors[] = {
    {"input_layernorm", ALL_ARCHS, 1, {TP_DIM_HIDDEN}, false, NULL, TP_STYLE_REPLICATE},
    {"self_attn.q_proj", ALL_ARCHS, 2, {TP_DIM_Q, TP_DIM_HIDDEN}, true, "colwise", TP_STYLE_COLWISE},
    {"self_attn.k_proj", ALL_ARCHS, 2, {TP_DIM_KV, TP_DIM_HIDDEN}, true, "colwise", TP_STYLE_COLWISE},
    {"self_attn.v_proj", ALL_ARCHS, 2, {TP_DIM_KV, TP_DIM_HIDDEN}, true, "colwise", TP_STYLE_COLWISE},
    {"self_attn.q_norm", ARCH_BIT(TP_ARCH_QWEN3), 1, {TP_DIM_HEAD}, false,
     "replicated_with_grad_allreduce", TP_STYLE_REPLICATE},
    {"self_attn.k_norm", ARCH_BIT(TP_ARCH_QWEN3), 1, {TP_DIM_HEAD}, false,
     "replicated_with_grad_allreduce", TP_STYLE_REPLICATE},
    {"self_attn.o_proj", ALL_ARCHS, 2, {TP_DIM_HIDDEN, TP_DIM_Q}, true, "rowwise", TP_STYLE_ROWWISE},
    {"post_attention_layernorm", ALL_ARCHS, 1, {TP_DIM_HIDDEN}, false, NULL, TP_STYLE_REPLICATE},
    {"mlp.gate_proj", ALL_ARCHS, 2, {TP_DIM_INTER, TP_DIM_HIDDEN}, true, "colwise", TP_STYLE_COLWISE},
    {"mlp.up_proj", ALL_ARCHS, 2, {TP_DIM_INTER, TP_DIM_HIDDEN}, true, "colwise", TP_STYLE_COLWISE},
    {"mlp.down_proj", ALL_ARCHS, 2, {TP_DIM_HIDDEN, TP_DIM_INTER}, true, "rowwise", TP_STYLE_ROWWISE},
};
const size_t tp_arch_n_layer_tensors = sizeof tp_arch_layer_tensors / sizeof tp_arch_layer_tensors[0];

/* Buffers older checkpoints saved that no forward pass reads. */
static const char *const ignored_layer_tensors[] = {"self_attn.rotary_emb.inv_freq"};

static const char *const arch_names[] = {
    [TP_ARCH_QWEN3] = "qwen3", [TP_ARCH_QWEN2] = "qwen2", [TP_ARCH_LLAMA] = "llama",
    [TP_ARCH_MISTRAL] = "mistral",
};

static bool row_in_arch(const tp_arch_tensor *row, tp_arch a)
{
    return a != TP_ARCH_OTHER && (row->archs & ARCH_BIT(a));
}

/* -------------------------------------------------------------- config.json */

#define MAX_HIDDEN (1 << 20)
#define MAX_HEADS (1 << 16)
#define MAX_HEAD_DIM (1 << 16)
#define MAX_Q_WIDTH (1 << 24)
#define MAX_INTER (1 << 24)
#define MAX_VOCAB ((1 << 24) - 1) /* vocabulary ranges travel as exact floats */
#define MAX_LAYERS (1 << 16)
#define MAX_POSITION (1 << 30)

/* An int-valued key in [lo, hi] (bounds keep every value an int). */
static int cfg_int(const cJSON *o, const char *key, bool has_def, int64_t def, int64_t lo, int64_t hi,
                   const char *where, int *out, tp_err *err)
{
    int64_t v;
    if (tp_json_int_in(o, "", key, has_def, def, lo, hi, where, &v, err) < 0)
        return -1;
    *out = (int)v;
    return 0;
}

/* The rope parameters object of either layout, or NULL.  transformers 5's
 * convert_rope_params_to_dict takes `rope_scaling or rope_parameters`: a
 * non-empty rope_scaling wins. */
static int rope_params(const cJSON *root, const char *where, const cJSON **params,
                       const char **prefix, tp_err *err)
{
    *params = tp_json_opt(root, "rope_scaling");
    *prefix = "rope_scaling.";
    if (!*params || (cJSON_IsObject(*params) && !(*params)->child)) {
        *params = tp_json_opt(root, "rope_parameters");
        *prefix = "rope_parameters.";
    }
    if (*params && !cJSON_IsObject(*params))
        return TP_FAIL(err, "%s: key \"%.*s\" is not an object", where, (int)strlen(*prefix) - 1,
                       *prefix);
    for (const cJSON *child = *params ? (*params)->child : NULL; child; child = child->next)
        if (cJSON_IsObject(child))
            return TP_FAIL(err, "%s: %s%s: per-layer-type RoPE parameters are not supported", where,
                           *prefix, child->string);
    return 0;
}

static const char *const rope_type_names[] = {
    [TP_ROPE_DEFAULT] = "default", [TP_ROPE_LINEAR] = "linear", [TP_ROPE_DYNAMIC] = "dynamic",
    [TP_ROPE_YARN] = "yarn", [TP_ROPE_LONGROPE] = "longrope", [TP_ROPE_LLAMA3] = "llama3",
};

/* rope_type, else the older "type", else "default". */
static int rope_type(const cJSON *params, const char *pre, const char *where, tp_rope_type *out,
                     tp_err *err)
{
    const char *type, *key = "rope_type";
    *out = TP_ROPE_DEFAULT;
    if (!params)
        return 0;
    if (tp_json_opt_str(params, pre, "rope_type", where, &type, err) < 0)
        return -1;
    if (!type) {
        key = "type";
        if (tp_json_opt_str(params, pre, "type", where, &type, err) < 0)
            return -1;
    }
    if (!type)
        return 0;
    for (int t = 0; t < (int)(sizeof rope_type_names / sizeof rope_type_names[0]); t++)
        if (strcmp(type, rope_type_names[t]) == 0) {
            *out = (tp_rope_type)t;
            return 0;
        }
    return TP_FAIL(err, "%s: %s%s \"%s\" is not supported (only default, linear, dynamic, yarn, "
                   "longrope and llama3)", where, pre, key, type);
}

/* A number > lo (and finite), required when !has_def. */
static int rope_num_above(const cJSON *params, const char *pre, const char *key, bool has_def,
                          double def, double lo, const char *where, double *out, tp_err *err)
{
    if (tp_json_finite(params, pre, key, has_def, def, where, out, err) < 0)
        return -1;
    if (!(*out > lo))
        return TP_FAIL(err, "%s: key \"%s%s\" = %g must be > %g", where, pre, key, *out, lo);
    return 0;
}

/* standardize_rope_params: llama3, yarn and longrope read the pretraining
 * length from a top-level original_max_position_embeddings when there is
 * one (Phi3 writes it there), else from the rope dict, else
 * max_position_embeddings. */
static int rope_original_max(const cJSON *root, const cJSON *params, const char *pre, int max_pos,
                             const char *where, int *out, tp_err *err)
{
    const char *key = "original_max_position_embeddings";
    if (tp_json_opt(root, key))
        return cfg_int(root, key, false, 0, 2, MAX_POSITION, where, out, err);
    int64_t v;
    if (tp_json_int_in(params, pre, key, true, max_pos, 2, MAX_POSITION, where, &v, err) < 0)
        return -1;
    *out = (int)v;
    return 0;
}

/* longrope's short_factor / long_factor: head_dim / 2 positive numbers. */
static int rope_factor_list(const cJSON *params, const char *pre, const char *key, int n,
                            const char *where, float *out, tp_err *err)
{
    const cJSON *v = tp_json_opt(params, key);
    if (!v)
        return TP_FAIL(err, "%s: missing key \"%s%s\"", where, pre, key);
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) != n)
        return TP_FAIL(err, "%s: key \"%s%s\" is not a list of head_dim / 2 = %d numbers", where, pre,
                       key, n);
    int i = 0;
    for (const cJSON *e = v->child; e; e = e->next, i++) {
        if (!cJSON_IsNumber(e) || !isfinite(e->valuedouble) || !(e->valuedouble > 0))
            return TP_FAIL(err, "%s: %s%s[%d] is not a positive number", where, pre, key, i);
        out[i] = (float)e->valuedouble;   /* torch.tensor(list, dtype=float32) */
    }
    return 0;
}

/* factor for linear, dynamic, yarn and llama3: a missing key is refused
 * (transformers reads rope_parameters["factor"]: a KeyError), naming the
 * type; an explicit null means def when has_null_def (yarn). */
static int rope_factor(const cJSON *params, const char *pre, const char *type, bool has_null_def,
                       double null_def, const char *where, double *out, tp_err *err)
{
    const cJSON *v = params ? cJSON_GetObjectItemCaseSensitive(params, "factor") : NULL;
    if (!v || (cJSON_IsNull(v) && !has_null_def))
        return TP_FAIL(err, "%s: rope type \"%s\" needs key \"%sfactor\"", where, type, pre);
    return rope_num_above(params, pre, "factor", true, null_def, 0, where, out, err);
}

/* transformers' get_mscale (yarn). */
static double yarn_mscale(double scale, double mscale)
{
    return scale <= 1 ? 1.0 : 0.1 * mscale * log(scale) + 1.0;
}

static int parse_rope_yarn(tp_rope_config *r, const cJSON *params, const char *pre, int max_pos,
                           const char *where, tp_err *err)
{
    /* factor: required; null means max_position_embeddings / original */
    if (rope_factor(params, pre, "yarn", true, (double)max_pos / r->original_max_position, where,
                    &r->factor, err) < 0)
        return -1;
    double mscale, mscale_all_dim;
    if (tp_json_finite(params, pre, "mscale", true, 0, where, &mscale, err) < 0 ||
        tp_json_finite(params, pre, "mscale_all_dim", true, 0, where, &mscale_all_dim, err) < 0)
        return -1;
    /* attention_factor: explicit, else from mscale / mscale_all_dim when both
     * are set (and non-zero), else get_mscale(factor). */
    double derived = mscale != 0 && mscale_all_dim != 0
                         ? yarn_mscale(r->factor, mscale) / yarn_mscale(r->factor, mscale_all_dim)
                         : yarn_mscale(r->factor, 1);
    if (rope_num_above(params, pre, "attention_factor", true, derived, 0, where,
                       &r->attention_factor, err) < 0)
        return -1;
    /* `rope_parameters.get("beta_fast") or 32`: 0 and null mean the default */
    if (tp_json_finite(params, pre, "beta_fast", true, 0, where, &r->beta_fast, err) < 0 ||
        tp_json_finite(params, pre, "beta_slow", true, 0, where, &r->beta_slow, err) < 0)
        return -1;
    if (r->beta_fast == 0)
        r->beta_fast = 32;
    if (r->beta_slow == 0)
        r->beta_slow = 1;
    if (!(r->beta_fast > 0) || !(r->beta_slow > 0))
        return TP_FAIL(err, "%s: %s{beta_fast, beta_slow} = {%g, %g} must be > 0", where, pre,
                       r->beta_fast, r->beta_slow);
    const cJSON *tr = tp_json_opt(params, "truncate");
    if (tr && !cJSON_IsBool(tr))
        return TP_FAIL(err, "%s: key \"%struncate\" is not true/false", where, pre);
    r->truncate = !tr || cJSON_IsTrue(tr);
    return 0;
}

static int parse_rope_longrope(tp_rope_config *r, const cJSON *params, const char *pre, int max_pos,
                               int head_dim, const char *where, tp_err *err)
{
    r->n_factors = head_dim / 2;
    if (r->n_factors > TP_ROPE_MAX_FACTORS)
        return TP_FAIL(err, "%s: %slong_factor: head_dim %d is more than longrope supports here (%d)",
                       where, pre, head_dim, 2 * TP_ROPE_MAX_FACTORS);
    if (rope_factor_list(params, pre, "short_factor", r->n_factors, where, r->short_factor, err) < 0 ||
        rope_factor_list(params, pre, "long_factor", r->n_factors, where, r->long_factor, err) < 0 ||
        rope_num_above(params, pre, "factor", true, (double)max_pos / r->original_max_position, 0,
                       where, &r->factor, err) < 0)
        return -1;
    double derived = r->factor <= 1.0 ? 1.0
                     : sqrt(1 + log(r->factor) / log((double)r->original_max_position));
    return rope_num_above(params, pre, "attention_factor", true, derived, 0, where,
                          &r->attention_factor, err);
}

static int parse_rope_llama3(tp_rope_config *r, const cJSON *params, const char *pre,
                             const char *where, tp_err *err)
{
    if (rope_factor(params, pre, "llama3", false, 0, where, &r->factor, err) < 0 ||
        rope_num_above(params, pre, "low_freq_factor", false, 0, 0, where, &r->low_freq_factor, err) < 0 ||
        tp_json_finite(params, pre, "high_freq_factor", false, 0, where, &r->high_freq_factor, err) < 0)
        return -1;
    if (!(r->high_freq_factor > r->low_freq_factor))
        return TP_FAIL(err, "%s: %shigh_freq_factor = %g must be > low_freq_factor = %g", where, pre,
                       r->high_freq_factor, r->low_freq_factor);
    return 0;
}

/* The rope settings of either layout (see tp_rope_config). */
static int parse_rope(tp_model_config *c, const cJSON *root, const char *where, tp_err *err)
{
    tp_rope_config *r = &c->rope;
    const cJSON *params;
    const char *pre;
    if (rope_params(root, where, &params, &pre, err) < 0 || rope_type(params, pre, where, &r->type, err) < 0)
        return -1;
    /* the dict's rope_theta, else the top-level one, else default_theta */
    if (tp_json_finite(root, "", "rope_theta", true, 10000.0, where, &r->theta, err) < 0 ||
        (params && tp_json_finite(params, pre, "rope_theta", true, r->theta, where, &r->theta, err) < 0))
        return -1;
    if (!(r->theta > 1.0))
        return TP_FAIL(err, "%s: rope_theta = %g must be > 1", where, r->theta);
    double prf;
    if (tp_json_finite(root, "", "partial_rotary_factor", true, 1.0, where, &prf, err) < 0 ||
        (params && tp_json_finite(params, pre, "partial_rotary_factor", true, prf, where, &prf, err) < 0))
        return -1;
    if (prf != 1.0)
        return TP_FAIL(err, "%s: partial_rotary_factor = %g is not supported (only 1)", where, prf);
    r->factor = 1;
    r->attention_factor = 1;
    r->max_position = c->max_position;
    r->original_max_position = c->max_position;
    if (r->type == TP_ROPE_YARN || r->type == TP_ROPE_LONGROPE || r->type == TP_ROPE_LLAMA3)
        if (rope_original_max(root, params, pre, c->max_position, where, &r->original_max_position,
                              err) < 0)
            return -1;
    switch (r->type) {
    case TP_ROPE_DEFAULT:
        return 0;
    case TP_ROPE_DYNAMIC:
        if (c->head_dim < 4)   /* the base's exponent is dim / (dim - 2) */
            return TP_FAIL(err, "%s: %srope_type \"dynamic\" needs head_dim >= 4 (it is %d)", where,
                           pre, c->head_dim);
        /* fall through */
    case TP_ROPE_LINEAR:
        return rope_factor(params, pre, rope_type_names[r->type], false, 0, where, &r->factor, err);
    case TP_ROPE_YARN:
        return parse_rope_yarn(r, params, pre, c->max_position, where, err);
    case TP_ROPE_LONGROPE:
        return parse_rope_longrope(r, params, pre, c->max_position, c->head_dim, where, err);
    case TP_ROPE_LLAMA3:
        return parse_rope_llama3(r, params, pre, where, err);
    }
    return 0;
}

/* transformers 5.24's MistralConfig, Qwen2Config and Qwen3Config all declare
 * `sliding_window: int | None = 4096`: a config without the key gets 4096,
 * an explicit null gets none.  qwen2/qwen3 then keep it only when
 * use_sliding_window (default false), for layers >= max_window_layers
 * (default 28) or as layer_types says. */
#define DEFAULT_SLIDING_WINDOW 4096
static int parse_sliding(tp_model_config *c, const cJSON *root, const char *where, tp_err *err)
{
    int win = 0, from = 0;
    if (c->arch == TP_ARCH_LLAMA)
        return 0;
    const cJSON *given = cJSON_GetObjectItemCaseSensitive(root, "sliding_window");
    if (cfg_int(root, "sliding_window", true, given ? 0 : DEFAULT_SLIDING_WINDOW, 0, MAX_POSITION,
                where, &win, err) < 0)
        return -1;
    if (c->arch == TP_ARCH_MISTRAL) {
        c->sliding_window = win;
        c->sliding_from_layer = 0;
        return 0;
    }
    bool use = false;
    if (tp_json_opt_bool(root, "use_sliding_window", false, where, &use, err) < 0)
        return -1;
    if (!use || win == 0)
        return 0;
    if (cfg_int(root, "max_window_layers", true, 28, 0, MAX_POSITION, where, &from, err) < 0)
        return -1;
    const cJSON *types = tp_json_opt(root, "layer_types");
    if (types && cJSON_IsArray(types)) {
        /* The explicit list wins; accept the shape transformers derives
         * (full attention first, sliding after), refuse anything else. */
        if (cJSON_GetArraySize(types) != c->n_layers)
            return TP_FAIL(err, "%s: layer_types has %d entries, num_hidden_layers is %d", where,
                           cJSON_GetArraySize(types), c->n_layers);
        int first_sliding = c->n_layers, i = 0;
        for (const cJSON *t = types->child; t; t = t->next, i++) {
            if (!cJSON_IsString(t))
                return TP_FAIL(err, "%s: layer_types[%d] is not a string", where, i);
            bool sl = strcmp(t->valuestring, "sliding_attention") == 0;
            if (!sl && strcmp(t->valuestring, "full_attention") != 0)
                return TP_FAIL(err, "%s: layer_types[%d] \"%s\" is not supported", where, i,
                               t->valuestring);
            if (sl && first_sliding == c->n_layers)
                first_sliding = i;
            if (!sl && first_sliding < i)
                return TP_FAIL(err, "%s: layer_types: full attention at layer %d after sliding "
                               "layers is not supported", where, i);
        }
        from = first_sliding;
    }
    c->sliding_window = win;
    c->sliding_from_layer = from;
    return 0;
}

static int parse_model_type(tp_model_config *c, const cJSON *root, const char *where, tp_err *err)
{
    const char *mt;
    if (tp_json_opt_str(root, "", "model_type", where, &mt, err) < 0)
        return -1;
    if (!mt || !*mt || strlen(mt) >= sizeof c->model_type)
        return TP_FAIL(err, "%s: key \"model_type\" is missing or not a short string", where);
    strcpy(c->model_type, mt);
    c->arch = TP_ARCH_OTHER;
    for (int a = 0; a < TP_ARCH_OTHER; a++)
        if (strcmp(mt, arch_names[a]) == 0)
            c->arch = (tp_arch)a;
    return 0;
}

/* The sizes every model has, bounded so that products stay exact. */
static int parse_sizes(tp_model_config *c, const cJSON *root, const char *where, tp_err *err)
{
    if (cfg_int(root, "hidden_size", false, 0, 1, MAX_HIDDEN, where, &c->hidden, err) < 0 ||
        cfg_int(root, "num_hidden_layers", false, 0, 1, MAX_LAYERS, where, &c->n_layers, err) < 0 ||
        cfg_int(root, "num_attention_heads", false, 0, 1, MAX_HEADS, where, &c->n_heads, err) < 0 ||
        cfg_int(root, "num_key_value_heads", true, c->n_heads, 1, c->n_heads, where, &c->n_kv_heads,
                err) < 0 ||
        cfg_int(root, "intermediate_size", false, 0, 1, MAX_INTER, where, &c->intermediate, err) < 0 ||
        cfg_int(root, "vocab_size", false, 0, 1, MAX_VOCAB, where, &c->vocab, err) < 0 ||
        cfg_int(root, "max_position_embeddings", true, 4096, 1, MAX_POSITION, where,
                &c->max_position, err) < 0)
        return -1;
    bool derived = c->arch != TP_ARCH_QWEN3;   /* see the comment at the top */
    if (derived && !tp_json_opt(root, "head_dim") && c->hidden % c->n_heads)
        return TP_FAIL(err, "%s: hidden_size %d is not a multiple of num_attention_heads %d and "
                       "there is no head_dim", where, c->hidden, c->n_heads);
    int64_t def_hd = derived ? c->hidden / c->n_heads : 128;
    if (cfg_int(root, "head_dim", true, def_hd, 1, MAX_HEAD_DIM, where, &c->head_dim, err) < 0)
        return -1;
    if ((int64_t)c->n_heads * c->head_dim > MAX_Q_WIDTH)
        return TP_FAIL(err, "%s: num_attention_heads * head_dim = %" PRId64 " is more than %d", where,
                       (int64_t)c->n_heads * c->head_dim, MAX_Q_WIDTH);
    if (c->n_heads % c->n_kv_heads)
        return TP_FAIL(err, "%s: num_attention_heads %d is not a multiple of num_key_value_heads %d",
                       where, c->n_heads, c->n_kv_heads);
    return tp_json_opt_bool(root, "tie_word_embeddings", false, where, &c->tie_embeddings, err);
}

/* What only a model tprun runs needs: the forward pass's settings. */
static int parse_runtime(tp_model_config *c, const cJSON *root, const char *where, tp_err *err)
{
    const char *act;
    if (tp_json_opt_str(root, "", "hidden_act", where, &act, err) < 0)
        return -1;
    if (act && strcmp(act, "silu") != 0)
        return TP_FAIL(err, "%s: hidden_act \"%s\" is not supported (only \"silu\")", where, act);
    if (c->head_dim % 2)
        return TP_FAIL(err, "%s: head_dim = %d must be even for RoPE", where, c->head_dim);
    double eps;
    if (tp_json_finite(root, "", "rms_norm_eps", true, 1e-6, where, &eps, err) < 0)
        return -1;
    if (!((float)eps > 0) || eps > 1) /* > 0 as the float it is stored as */
        return TP_FAIL(err, "%s: rms_norm_eps = %g is not in (0, 1]", where, eps);
    c->rms_eps = (float)eps;
    if (parse_rope(c, root, where, err) < 0 ||
        tp_json_opt_bool(root, "attention_bias", c->arch == TP_ARCH_QWEN2, where,
                         &c->attention_bias, err) < 0 ||
        tp_json_opt_bool(root, "mlp_bias", false, where, &c->mlp_bias, err) < 0)
        return -1;
    /* qwen2's q/k/v always have biases and o_proj never; llama/qwen3's
     * attention_bias covers o_proj too.  The tensors win at load. */
    if (c->arch == TP_ARCH_QWEN2)
        c->attention_bias = true;
    c->o_bias = c->attention_bias && c->arch != TP_ARCH_QWEN2;
    c->qk_norm = c->arch == TP_ARCH_QWEN3;
    int64_t bos;
    if (parse_sliding(c, root, where, err) < 0 ||
        tp_json_int_in(root, "", "bos_token_id", true, -1, -1, INT32_MAX, where, &bos, err) < 0 ||
        tp_json_id_list(root, "eos_token_id", c->eos_ids, (int)(sizeof c->eos_ids / sizeof c->eos_ids[0]),
                        where, &c->n_eos, err) < 0)
        return -1;
    c->bos_id = (int)bos;
    return 0;
}

static int unsupported_model_type(const tp_model_config *c, const char *where, tp_err *err);

/* known_only: refuse another model_type before reading its sizes. */
static int config_parse(tp_model_config *c, const char *json, size_t len, const char *where,
                        bool known_only, tp_err *err)
{
    memset(c, 0, sizeof *c);
    cJSON *root = tp_json_parse_config(json, len, where, err);
    if (!root)
        return -1;
    int rc = -1;
    if (!cJSON_IsObject(root))
        tp_errorf(err, "%s: not a JSON object", where);
    else if (parse_model_type(c, root, where, err) < 0)
        ;
    else if (known_only && c->arch == TP_ARCH_OTHER)
        unsupported_model_type(c, where, err);
    else if (parse_sizes(c, root, where, err) == 0)
        rc = c->arch == TP_ARCH_OTHER ? 0 : parse_runtime(c, root, where, err);
    cJSON_Delete(root);
    return rc;
}

int tp_config_max_length(const tp_model_config *c)
{
    return c->rope.type == TP_ROPE_DYNAMIC ? MAX_POSITION : c->max_position;
}

int tp_config_parse(tp_model_config *c, const char *json, size_t len, const char *where, tp_err *err)
{
    return config_parse(c, json, len, where, false, err);
}

static int unsupported_model_type(const tp_model_config *c, const char *where, tp_err *err)
{
    return TP_FAIL(err, "%s: model_type \"%s\" is not supported by tprun (qwen3, qwen2, llama, "
                   "mistral)", where, c->model_type);
}

int tp_model_config_parse(tp_model_config *c, const char *config_json, tp_err *err)
{
    if (!config_json)
        return TP_FAIL(err, "config.json: missing");
    return config_parse(c, config_json, strlen(config_json), "config.json", true, err);
}

/* ------------------------------------------------------------ the tensors */

static int64_t dim_value(const tp_model_config *c, tp_dim_of d)
{
    switch (d) {
    case TP_DIM_HIDDEN: return c->hidden;
    case TP_DIM_Q: return (int64_t)c->n_heads * c->head_dim;
    case TP_DIM_KV: return (int64_t)c->n_kv_heads * c->head_dim;
    case TP_DIM_HEAD: return c->head_dim;
    case TP_DIM_INTER: return c->intermediate;
    }
    return -1;
}

static const char *const dim_names[] = {
    [TP_DIM_HIDDEN] = "hidden_size", [TP_DIM_Q] = "num_attention_heads * head_dim",
    [TP_DIM_KV] = "num_key_value_heads * head_dim", [TP_DIM_HEAD] = "head_dim",
    [TP_DIM_INTER] = "intermediate_size",
};

/* t must be [want[0], ..., want[ndim-1]]; why names where the sizes come from. */
static int want_shape(const tp_tensor_ref *t, int ndim, const int64_t *want, const char *why,
                      tp_err *err)
{
    bool ok = t->ndim == ndim;
    for (int d = 0; ok && d < ndim; d++)
        ok = (int64_t)t->shape[d] == want[d];
    if (ok)
        return 0;
    char got[96] = "", exp[64] = "";
    for (int d = 0; d < t->ndim && d < TP_MAX_DIMS; d++)
        snprintf(got + strlen(got), sizeof got - strlen(got), "%s%" PRIu64, d ? ", " : "", t->shape[d]);
    for (int d = 0; d < ndim; d++)
        snprintf(exp + strlen(exp), sizeof exp - strlen(exp), "%s%" PRId64, d ? ", " : "", want[d]);
    return TP_FAIL(err, "tensor %s: shape [%s], config.json says [%s] (%s)", t->name, got, exp, why);
}

static int check_row_shape(const tp_model_config *c, const tp_arch_tensor *row, bool is_bias,
                           const tp_tensor_ref *t, tp_err *err)
{
    int64_t want[2] = {dim_value(c, row->dims[0]), row->ndim > 1 ? dim_value(c, row->dims[1]) : 0};
    char why[96];
    snprintf(why, sizeof why, "%s%s%s", dim_names[row->dims[0]], row->ndim > 1 && !is_bias ? ", " : "",
             row->ndim > 1 && !is_bias ? dim_names[row->dims[1]] : "");
    return want_shape(t, is_bias ? 1 : row->ndim, want, why, err);
}

/* "model.layers.N.<module>.<param>" -> N and the rest; false otherwise. */
static bool split_layer_name(const char *name, long *layer, const char **rest)
{
    static const char pre[] = "model.layers.";
    if (strncmp(name, pre, sizeof pre - 1))
        return false;
    const char *s = name + sizeof pre - 1;
    char *end;
    if (*s < '0' || *s > '9')
        return false;
    *layer = strtol(s, &end, 10);
    if (*end != '.')
        return false;
    *rest = end + 1;
    return true;
}

/* The table row of a layer tensor's rest ("mlp.up_proj.weight"); -1: none,
 * -2: a buffer to ignore. */
static long find_row(const tp_model_config *c, const char *rest, bool *is_bias)
{
    for (size_t i = 0; i < sizeof ignored_layer_tensors / sizeof ignored_layer_tensors[0]; i++)
        if (!strcmp(rest, ignored_layer_tensors[i]))
            return -2;
    for (size_t i = 0; i < tp_arch_n_layer_tensors; i++) {
        const tp_arch_tensor *row = &tp_arch_layer_tensors[i];
        size_t n = strlen(row->module);
        if (!row_in_arch(row, c->arch) || strncmp(rest, row->module, n) || rest[n] != '.')
            continue;
        *is_bias = !strcmp(rest + n + 1, "bias");
        if (!strcmp(rest + n + 1, "weight") || (*is_bias && row->bias))
            return (long)i;
    }
    return -1;
}

/* Marks a known layer tensor seen and checks its layer and shape; an
 * unknown one is an error only when report_unknown (a second pass, so that a
 * missing tensor is named before a misnamed one). */
static int check_layer_tensor(const tp_model_config *c, const tp_tensor_ref *t, long layer,
                              const char *rest, bool report_unknown, bool *seen, tp_err *err)
{
    if (layer >= c->n_layers)
        return TP_FAIL(err, "tensor %s: layer %ld, but num_hidden_layers is %d", t->name, layer,
                       c->n_layers);
    bool is_bias = false;
    long row = find_row(c, rest, &is_bias);
    if (row == -2 || (row < 0 && !report_unknown) || (row >= 0 && report_unknown))
        return 0;
    if (row < 0)
        return TP_FAIL(err, "tensor %s: not a tensor of a %s layer (tprun would not use it)",
                       t->name, c->model_type);
    if (!is_bias)
        seen[(size_t)layer * tp_arch_n_layer_tensors + (size_t)row] = true;
    return check_row_shape(c, &tp_arch_layer_tensors[row], is_bias, t, err);
}

static const tp_tensor_ref *find_ref(const tp_tensor_ref *t, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(t[i].name, name))
            return &t[i];
    return NULL;
}

/* The embedding, the final norm and lm_head (unless tied). */
static int check_model_tensors(const tp_model_config *c, const tp_tensor_ref *t, size_t n, tp_err *err)
{
    const int64_t vh[2] = {c->vocab, c->hidden}, h[1] = {c->hidden};
    const tp_tensor_ref *emb = find_ref(t, n, "model.embed_tokens.weight");
    const tp_tensor_ref *norm = find_ref(t, n, "model.norm.weight");
    const tp_tensor_ref *head = find_ref(t, n, "lm_head.weight");
    if (!emb)
        return TP_FAIL(err, "tensor model.embed_tokens.weight is missing");
    if (!norm)
        return TP_FAIL(err, "tensor model.norm.weight is missing");
    if (!head && !c->tie_embeddings)
        return TP_FAIL(err, "tensor lm_head.weight is missing and config.json has no "
                       "\"tie_word_embeddings\": true");
    if (want_shape(emb, 2, vh, "vocab_size, hidden_size", err) < 0 ||
        want_shape(norm, 1, h, "hidden_size", err) < 0 ||
        (head && want_shape(head, 2, vh, "vocab_size, hidden_size", err) < 0))
        return -1;
    return 0;
}

int tp_arch_check_tensors(const tp_model_config *c, const tp_tensor_ref *t, size_t n, tp_err *err)
{
    if (c->arch == TP_ARCH_OTHER)
        return unsupported_model_type(c, "config.json", err);
    if (check_model_tensors(c, t, n, err) < 0)
        return -1;
    bool *seen = calloc((size_t)c->n_layers * tp_arch_n_layer_tensors, sizeof *seen);
    if (!seen)
        return TP_FAIL(err, "out of memory");
    int rc = 0;
    long layer;
    const char *rest;
    for (size_t i = 0; i < n && rc == 0; i++)
        if (split_layer_name(t[i].name, &layer, &rest))
            rc = check_layer_tensor(c, &t[i], layer, rest, false, seen, err);
    for (long l = 0; l < c->n_layers && rc == 0; l++)
        for (size_t r = 0; r < tp_arch_n_layer_tensors && rc == 0; r++)
            if (row_in_arch(&tp_arch_layer_tensors[r], c->arch) &&
                !seen[(size_t)l * tp_arch_n_layer_tensors + r])
                rc = TP_FAIL(err, "tensor model.layers.%ld.%s.weight is missing (model_type %s "
                             "needs it in every layer 0..%d)", l, tp_arch_layer_tensors[r].module,
                             c->model_type, c->n_layers - 1);
    for (size_t i = 0; i < n && rc == 0; i++)
        if (split_layer_name(t[i].name, &layer, &rest))
            rc = check_layer_tensor(c, &t[i], layer, rest, true, seen, err);
    free(seen);
    return rc;
}

int tp_arch_check_index(const char *config_json, const tp_shard_index *ix, tp_err *err)
{
    tp_model_config c;
    tp_err ignored;
    /* A config tpconvert would not have accepted (hand-made test fixtures)
     * describes no architecture to check against. */
    if (!config_json || tp_config_parse(&c, config_json, strlen(config_json), "config.json",
                                        &ignored) < 0 || c.arch == TP_ARCH_OTHER)
        return 0;
    tp_tensor_ref *refs = calloc(ix->n_tensors ? ix->n_tensors : 1, sizeof *refs);
    if (!refs)
        return TP_FAIL(err, "out of memory");
    for (size_t i = 0; i < ix->n_tensors; i++)
        refs[i] = (tp_tensor_ref){ix->tensors[i].name, ix->tensors[i].ndim, ix->tensors[i].global_shape};
    int rc = tp_arch_check_tensors(&c, refs, ix->n_tensors, err);
    free(refs);
    return rc;
}

/* ---------------------------------------------------------------- the plan */

/* The styles whose cut is the one tprun implements for a tensor running
 * `runs` (colwise_gather_output cuts like colwise, rowwise_rep like rowwise). */
static bool style_runs_as(tp_style s, tp_style runs)
{
    switch (runs) {
    case TP_STYLE_COLWISE: return s == TP_STYLE_COLWISE || s == TP_STYLE_COLWISE_GATHER;
    case TP_STYLE_ROWWISE: return s == TP_STYLE_ROWWISE || s == TP_STYLE_ROWWISE_REP;
    default: return s == runs;
    }
}

/* name's style in the plan must satisfy ok(style); runs names the expected
 * style in the message. */
static int check_plan_entry(const tp_plan *p, const char *name, const char *module, bool ok_replicate,
                            tp_style runs, tp_style alt, tp_err *err)
{
    long i = tp_plan_match(p, name);
    tp_style s = i < 0 ? TP_STYLE_REPLICATE : p->styles[i];
    if (style_runs_as(s, runs) || s == alt || (ok_replicate && s == TP_STYLE_REPLICATE))
        return 0;
    return TP_FAIL(err, "%s: %s: style %s is not what tprun runs (%s)", p->source ? p->source : "plan",
                   i < 0 ? module : p->patterns[i], tp_style_name(s), tp_style_name(runs));
}

int tp_arch_check_plan(const tp_model_config *c, const tp_plan *p, tp_err *err)
{
    if (c->arch == TP_ARCH_OTHER)
        return unsupported_model_type(c, "config.json", err);
    if (check_plan_entry(p, "model.embed_tokens.weight", "model.embed_tokens", false,
                         TP_STYLE_REPLICATE, TP_STYLE_VOCAB, err) < 0 ||
        check_plan_entry(p, "model.norm.weight", "model.norm", false, TP_STYLE_REPLICATE,
                         TP_STYLE_REPLICATE, err) < 0 ||
        (!c->tie_embeddings && check_plan_entry(p, "lm_head.weight", "lm_head", true,
                                                TP_STYLE_COLWISE, TP_STYLE_COLWISE, err) < 0))
        return -1;
    char name[256], module[256];
    for (int l = 0; l < c->n_layers; l++)
        for (size_t r = 0; r < tp_arch_n_layer_tensors; r++) {
            const tp_arch_tensor *row = &tp_arch_layer_tensors[r];
            if (!row_in_arch(row, c->arch))
                continue;
            snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, row->module);
            snprintf(module, sizeof module, "model.layers.*.%s", row->module);
            if (check_plan_entry(p, name, module, false, row->runs, row->runs, err) < 0)
                return -1;
        }
    return 0;
}

/* --------------------------------------------------------- built-in plans */

bool tp_model_type_known(const char *model_type)
{
    for (int a = 0; a < TP_ARCH_OTHER; a++)
        if (!strcmp(model_type, arch_names[a]))
            return true;
    return false;
}

int tp_plan_builtin(const char *model_type, tp_plan *out, tp_err *err)
{
    memset(out, 0, sizeof *out);
    int arch = 0;
    while (arch < TP_ARCH_OTHER && strcmp(model_type, arch_names[arch]))
        arch++;
    if (arch == TP_ARCH_OTHER)
        return TP_FAIL(err, "model_type \"%s\" has no built-in plan", model_type);
    char src[128];
    snprintf(src, sizeof src, "built-in plan for %s", model_type);
    if (!(out->source = strdup(src)))
        return TP_FAIL(err, "out of memory");
    for (size_t i = 0; i < tp_arch_n_layer_tensors; i++) {
        const tp_arch_tensor *row = &tp_arch_layer_tensors[i];
        if (!row->plan_style || !row_in_arch(row, (tp_arch)arch))
            continue;
        tp_style st;
        char full[256];
        snprintf(full, sizeof full, "model.layers.*.%s", row->module);
        if (tp_style_parse(row->plan_style, full, &st, err) < 0 || tp_plan_set(out, full, st, err) < 0) {
            tp_plan_free(out);
            return -1;
        }
    }
    /* modeling_*.py: `_tp_plan = {"lm_head": "colwise_gather_output"}`. */
    if (tp_plan_set(out, "lm_head", TP_STYLE_COLWISE_GATHER, err) < 0) {
        tp_plan_free(out);
        return -1;
    }
    return 0;
}
