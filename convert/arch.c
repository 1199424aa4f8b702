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
#include <strings.h>

/* -------------------------------------------------------------- the table */

#define ARCH_BIT(a) (1u << (a))
#define DENSE_ARCHS (ARCH_BIT(TP_ARCH_QWEN3) | ARCH_BIT(TP_ARCH_QWEN2) | ARCH_BIT(TP_ARCH_LLAMA) | \
                     ARCH_BIT(TP_ARCH_MISTRAL))
#define MOE_ARCHS (ARCH_BIT(TP_ARCH_QWEN3_MOE) | ARCH_BIT(TP_ARCH_MIXTRAL))
#define ALL_ARCHS (DENSE_ARCHS | MOE_ARCHS)
#define QWEN3_ARCHS (ARCH_BIT(TP_ARCH_QWEN3) | ARCH_BIT(TP_ARCH_QWEN3_MOE))
/* qwen3_moe's dense layers (mlp_only_layers, decoder_sparse_step) */
#define DENSE_MLP_ARCHS (DENSE_ARCHS | ARCH_BIT(TP_ARCH_QWEN3_MOE))

/* In the order of transformers' base_model_tp_plan (the built-in plan is
 * made from the rows with a plan_style, in this order).  The expert rows:
 * the per-expert layout is the one published on the Hub (transformers 4.x
 * modeling_qwen3_moe.py / modeling_mixtral.py); the fused one is
 * transformers 5's Qwen3MoeExperts / MixtralExperts parameters
 * (gate_up_proj [E, 2 I, H], gate rows first, then up; down_proj [E, H, I]).
 * Their TP cut is transformers' tensor-parallel one: gate/up by output
 * features, down by input features. */
#define NO_SLOT TP_SLOT_NONE
#define S(field) TP_SLOT_##field
const tp_arch_tensor tp_arch_layer_tensors[] = {
    /* module, slot, bias slot, archs, ndim, dims, plan style, runs, kind, bare, part */
    {"input_layernorm", S(attn_norm), NO_SLOT, ALL_ARCHS, 1, {TP_DIM_HIDDEN}, NULL, TP_STYLE_REPLICATE,
     TP_ROW_ALL, false, TP_EXPERT_NONE},
    {"self_attn.q_proj", S(wq), S(bq), ALL_ARCHS, 2, {TP_DIM_Q, TP_DIM_HIDDEN}, "colwise",
     TP_STYLE_COLWISE, TP_ROW_ALL, false, TP_EXPERT_NONE},
    {"self_attn.k_proj", S(wk), S(bk), ALL_ARCHS, 2, {TP_DIM_KV, TP_DIM_HIDDEN}, "colwise",
     TP_STYLE_COLWISE, TP_ROW_ALL, false, TP_EXPERT_NONE},
    {"self_attn.v_proj", S(wv), S(bv), ALL_ARCHS, 2, {TP_DIM_KV, TP_DIM_HIDDEN}, "colwise",
     TP_STYLE_COLWISE, TP_ROW_ALL, false, TP_EXPERT_NONE},
    {"self_attn.q_norm", S(q_norm), NO_SLOT, QWEN3_ARCHS, 1, {TP_DIM_HEAD},
     "replicated_with_grad_allreduce", TP_STYLE_REPLICATE, TP_ROW_ALL, false, TP_EXPERT_NONE},
    {"self_attn.k_norm", S(k_norm), NO_SLOT, QWEN3_ARCHS, 1, {TP_DIM_HEAD},
     "replicated_with_grad_allreduce", TP_STYLE_REPLICATE, TP_ROW_ALL, false, TP_EXPERT_NONE},
    {"self_attn.o_proj", S(wo), S(bo), ALL_ARCHS, 2, {TP_DIM_HIDDEN, TP_DIM_Q}, "rowwise",
     TP_STYLE_ROWWISE, TP_ROW_ALL, false, TP_EXPERT_NONE},
    {"post_attention_layernorm", S(ffn_norm), NO_SLOT, ALL_ARCHS, 1, {TP_DIM_HIDDEN}, NULL,
     TP_STYLE_REPLICATE, TP_ROW_ALL, false, TP_EXPERT_NONE},
    {"mlp.gate_proj", S(wgate), S(bgate), DENSE_MLP_ARCHS, 2, {TP_DIM_INTER, TP_DIM_HIDDEN}, "colwise",
     TP_STYLE_COLWISE, TP_ROW_DENSE, false, TP_EXPERT_NONE},
    {"mlp.up_proj", S(wup), S(bup), DENSE_MLP_ARCHS, 2, {TP_DIM_INTER, TP_DIM_HIDDEN}, "colwise",
     TP_STYLE_COLWISE, TP_ROW_DENSE, false, TP_EXPERT_NONE},
    {"mlp.down_proj", S(wdown), S(bdown), DENSE_MLP_ARCHS, 2, {TP_DIM_HIDDEN, TP_DIM_INTER}, "rowwise",
     TP_STYLE_ROWWISE, TP_ROW_DENSE, false, TP_EXPERT_NONE},
    /* qwen3_moe sparse layers */
    {"mlp.gate", NO_SLOT, NO_SLOT, ARCH_BIT(TP_ARCH_QWEN3_MOE), 2, {TP_DIM_EXPERTS, TP_DIM_HIDDEN}, NULL,
     TP_STYLE_REPLICATE, TP_ROW_SPARSE, false, TP_EXPERT_ROUTER},
    {"mlp.experts.*.gate_proj", NO_SLOT, NO_SLOT, ARCH_BIT(TP_ARCH_QWEN3_MOE), 2,
     {TP_DIM_MOE_INTER, TP_DIM_HIDDEN}, "colwise", TP_STYLE_COLWISE, TP_ROW_EXPERT, false, TP_EXPERT_GATE},
    {"mlp.experts.*.up_proj", NO_SLOT, NO_SLOT, ARCH_BIT(TP_ARCH_QWEN3_MOE), 2,
     {TP_DIM_MOE_INTER, TP_DIM_HIDDEN}, "colwise", TP_STYLE_COLWISE, TP_ROW_EXPERT, false, TP_EXPERT_UP},
    {"mlp.experts.*.down_proj", NO_SLOT, NO_SLOT, ARCH_BIT(TP_ARCH_QWEN3_MOE), 2,
     {TP_DIM_HIDDEN, TP_DIM_MOE_INTER}, "rowwise", TP_STYLE_ROWWISE, TP_ROW_EXPERT, false, TP_EXPERT_DOWN},
    /* mixtral sparse layers: w1 gate, w3 up, w2 down */
    {"block_sparse_moe.gate", NO_SLOT, NO_SLOT, ARCH_BIT(TP_ARCH_MIXTRAL), 2,
     {TP_DIM_EXPERTS, TP_DIM_HIDDEN}, NULL, TP_STYLE_REPLICATE, TP_ROW_SPARSE, false, TP_EXPERT_ROUTER},
    {"block_sparse_moe.experts.*.w1", NO_SLOT, NO_SLOT, ARCH_BIT(TP_ARCH_MIXTRAL), 2,
     {TP_DIM_MOE_INTER, TP_DIM_HIDDEN}, "colwise", TP_STYLE_COLWISE, TP_ROW_EXPERT, false, TP_EXPERT_GATE},
    {"block_sparse_moe.experts.*.w3", NO_SLOT, NO_SLOT, ARCH_BIT(TP_ARCH_MIXTRAL), 2,
     {TP_DIM_MOE_INTER, TP_DIM_HIDDEN}, "colwise", TP_STYLE_COLWISE, TP_ROW_EXPERT, false, TP_EXPERT_UP},
    {"block_sparse_moe.experts.*.w2", NO_SLOT, NO_SLOT, ARCH_BIT(TP_ARCH_MIXTRAL), 2,
     {TP_DIM_HIDDEN, TP_DIM_MOE_INTER}, "rowwise", TP_STYLE_ROWWISE, TP_ROW_EXPERT, false, TP_EXPERT_DOWN},
    /* transformers 5's fused experts (both architectures) */
    {"mlp.experts.gate_up_proj", NO_SLOT, NO_SLOT, ARCH_BIT(TP_ARCH_QWEN3_MOE), 3,
     {TP_DIM_EXPERTS, TP_DIM_2_MOE_INTER, TP_DIM_HIDDEN}, "packed_colwise", TP_STYLE_PACKED_COLWISE,
     TP_ROW_FUSED, true, TP_EXPERT_FUSED_GATE_UP},
    {"mlp.experts.down_proj", NO_SLOT, NO_SLOT, ARCH_BIT(TP_ARCH_QWEN3_MOE), 3,
     {TP_DIM_EXPERTS, TP_DIM_HIDDEN, TP_DIM_MOE_INTER}, "rowwise", TP_STYLE_ROWWISE, TP_ROW_FUSED, true,
     TP_EXPERT_FUSED_DOWN},
};
#undef S
#undef NO_SLOT
const size_t tp_arch_n_layer_tensors = sizeof tp_arch_layer_tensors / sizeof tp_arch_layer_tensors[0];

static const bool slot_is_matrix[TP_SLOT_COUNT] = {
#define TP_X(field, kind) [TP_SLOT_##field] = SLOT_KIND_##kind,
#define SLOT_KIND_MAT true
#define SLOT_KIND_VEC false
    TP_LAYER_TENSORS(TP_X)
#undef SLOT_KIND_MAT
#undef SLOT_KIND_VEC
#undef TP_X
};

bool tp_layer_slot_is_matrix(tp_layer_slot s)
{
    return s > TP_SLOT_NONE && s < TP_SLOT_COUNT && slot_is_matrix[s];
}

/* Buffers older checkpoints saved that no forward pass reads. */
static const char *const ignored_layer_tensors[] = {"self_attn.rotary_emb.inv_freq"};

static const char *const arch_names[] = {
    [TP_ARCH_QWEN3] = "qwen3", [TP_ARCH_QWEN2] = "qwen2", [TP_ARCH_LLAMA] = "llama",
    [TP_ARCH_MISTRAL] = "mistral", [TP_ARCH_QWEN3_MOE] = "qwen3_moe", [TP_ARCH_MIXTRAL] = "mixtral",
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
#define MAX_EXPERTS (1 << 12)

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
        return tp_errorf(err, "%s: key \"%.*s\" is not an object", where, (int)strlen(*prefix) - 1,
                       *prefix);
    for (const cJSON *child = *params ? (*params)->child : NULL; child; child = child->next)
        if (cJSON_IsObject(child))
            return tp_errorf(err, "%s: %s%s: per-layer-type RoPE parameters are not supported", where,
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
    return tp_errorf(err, "%s: %s%s \"%s\" is not supported (only default, linear, dynamic, yarn, "
                   "longrope and llama3)", where, pre, key, type);
}

/* A number > lo (and finite), required when !has_def. */
static int rope_num_above(const cJSON *params, const char *pre, const char *key, bool has_def,
                          double def, double lo, const char *where, double *out, tp_err *err)
{
    if (tp_json_finite(params, pre, key, has_def, def, where, out, err) < 0)
        return -1;
    if (!(*out > lo))
        return tp_errorf(err, "%s: key \"%s%s\" = %g must be > %g", where, pre, key, *out, lo);
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
        return tp_errorf(err, "%s: missing key \"%s%s\"", where, pre, key);
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) != n)
        return tp_errorf(err, "%s: key \"%s%s\" is not a list of head_dim / 2 = %d numbers", where, pre,
                       key, n);
    int i = 0;
    for (const cJSON *e = v->child; e; e = e->next, i++) {
        if (!cJSON_IsNumber(e) || !isfinite(e->valuedouble) || !(e->valuedouble > 0))
            return tp_errorf(err, "%s: %s%s[%d] is not a positive number", where, pre, key, i);
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
        return tp_errorf(err, "%s: rope type \"%s\" needs key \"%sfactor\"", where, type, pre);
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
        return tp_errorf(err, "%s: %s{beta_fast, beta_slow} = {%g, %g} must be > 0", where, pre,
                       r->beta_fast, r->beta_slow);
    const cJSON *tr = tp_json_opt(params, "truncate");
    if (tr && !cJSON_IsBool(tr))
        return tp_errorf(err, "%s: key \"%struncate\" is not true/false", where, pre);
    r->truncate = !tr || cJSON_IsTrue(tr);
    return 0;
}

static int parse_rope_longrope(tp_rope_config *r, const cJSON *params, const char *pre, int max_pos,
                               int head_dim, const char *where, tp_err *err)
{
    r->n_factors = head_dim / 2;
    if (r->n_factors > TP_ROPE_MAX_FACTORS)
        return tp_errorf(err, "%s: %slong_factor: head_dim %d is more than longrope supports here (%d)",
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
        return tp_errorf(err, "%s: %shigh_freq_factor = %g must be > low_freq_factor = %g", where, pre,
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
        return tp_errorf(err, "%s: rope_theta = %g must be > 1", where, r->theta);
    double prf;
    if (tp_json_finite(root, "", "partial_rotary_factor", true, 1.0, where, &prf, err) < 0 ||
        (params && tp_json_finite(params, pre, "partial_rotary_factor", true, prf, where, &prf, err) < 0))
        return -1;
    if (prf != 1.0)
        return tp_errorf(err, "%s: partial_rotary_factor = %g is not supported (only 1)", where, prf);
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
            return tp_errorf(err, "%s: %srope_type \"dynamic\" needs head_dim >= 4 (it is %d)", where,
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
 * an explicit null gets none (MixtralConfig and Qwen3MoeConfig default to
 * None).  qwen2/qwen3 then keep it only when use_sliding_window (default
 * false), for layers >= max_window_layers (default 28) or as layer_types
 * says. */
#define DEFAULT_SLIDING_WINDOW 4096
static int parse_moe(tp_model_config *c, const cJSON *root, const char *where, tp_err *err);

static int parse_sliding(tp_model_config *c, const cJSON *root, const char *where, tp_err *err)
{
    int win = 0, from = 0;
    if (c->arch == TP_ARCH_LLAMA)
        return 0;
    const cJSON *given = cJSON_GetObjectItemCaseSensitive(root, "sliding_window");
    bool moe = c->arch == TP_ARCH_MIXTRAL || c->arch == TP_ARCH_QWEN3_MOE;
    int def_win = given || moe ? 0 : DEFAULT_SLIDING_WINDOW;
    if (cfg_int(root, "sliding_window", true, def_win, 0, MAX_POSITION, where, &win, err) < 0)
        return -1;
    if (c->arch == TP_ARCH_MISTRAL || c->arch == TP_ARCH_MIXTRAL) {
        c->sliding_window = win;
        c->sliding_from_layer = 0;
        return 0;
    }
    bool use = false;
    if (tp_json_opt_bool(root, "use_sliding_window", false, where, &use, err) < 0)
        return -1;
    if (!use || win == 0)
        return 0;
    if (c->arch == TP_ARCH_QWEN3_MOE) {
        /* configuration_qwen3_moe.py has no max_window_layers: with
         * use_sliding_window every layer slides. */
        c->sliding_window = win;
        c->sliding_from_layer = 0;
        return 0;
    }
    if (cfg_int(root, "max_window_layers", true, 28, 0, MAX_POSITION, where, &from, err) < 0)
        return -1;
    const cJSON *types = tp_json_opt(root, "layer_types");
    if (types && cJSON_IsArray(types)) {
        /* The explicit list wins; accept the shape transformers derives
         * (full attention first, sliding after), refuse anything else. */
        if (cJSON_GetArraySize(types) != c->n_layers)
            return tp_errorf(err, "%s: layer_types has %d entries, num_hidden_layers is %d", where,
                           cJSON_GetArraySize(types), c->n_layers);
        int first_sliding = c->n_layers, i = 0;
        for (const cJSON *t = types->child; t; t = t->next, i++) {
            if (!cJSON_IsString(t))
                return tp_errorf(err, "%s: layer_types[%d] is not a string", where, i);
            bool sl = strcmp(t->valuestring, "sliding_attention") == 0;
            if (!sl && strcmp(t->valuestring, "full_attention") != 0)
                return tp_errorf(err, "%s: layer_types[%d] \"%s\" is not supported", where, i,
                               t->valuestring);
            if (sl && first_sliding == c->n_layers)
                first_sliding = i;
            if (!sl && first_sliding < i)
                return tp_errorf(err, "%s: layer_types: full attention at layer %d after sliding "
                               "layers is not supported", where, i);
        }
        from = first_sliding;
    }
    c->sliding_window = win;
    c->sliding_from_layer = from;
    return 0;
}

/* mlp_only_layers: a list of layer indices (null: none).  Entries past
 * the last layer change nothing and are dropped. */
static int parse_mlp_only(tp_model_config *c, const cJSON *root, const char *where, tp_err *err)
{
    const cJSON *v = tp_json_opt(root, "mlp_only_layers");
    if (!v)
        return 0;
    if (!cJSON_IsArray(v))
        return tp_errorf(err, "%s: key \"mlp_only_layers\" is not a list of layer indices", where);
    for (const cJSON *e = v->child; e; e = e->next) {
        double d = cJSON_IsNumber(e) ? e->valuedouble : -1;
        if (!(d >= 0 && d <= INT32_MAX) || d != floor(d))
            return tp_errorf(err, "%s: key \"mlp_only_layers\" holds something that is not a layer "
                           "index", where);
        if (d >= c->n_layers)
            continue;
        if (c->n_mlp_only == TP_MAX_MLP_ONLY)
            return tp_errorf(err, "%s: key \"mlp_only_layers\" lists more than %d layers", where,
                           TP_MAX_MLP_ONLY);
        c->mlp_only[c->n_mlp_only++] = (int)d;
    }
    return 0;
}

/* The expert count, in either spelling: "num_experts" (qwen3_moe as
 * released) or "num_local_experts" (mixtral; transformers 5 writes it for
 * qwen3_moe too).  Both present and different: refused, naming both. */
static int parse_n_experts(tp_model_config *c, const cJSON *root, const char *where, int def,
                           tp_err *err)
{
    int a = -1, b = -1;
    bool has_a = tp_json_opt(root, "num_experts") != NULL;
    bool has_b = tp_json_opt(root, "num_local_experts") != NULL;
    if ((has_a && cfg_int(root, "num_experts", false, 0, 0, MAX_EXPERTS, where, &a, err) < 0) ||
        (has_b && cfg_int(root, "num_local_experts", false, 0, 0, MAX_EXPERTS, where, &b, err) < 0))
        return -1;
    if (has_a && has_b && a != b)
        return tp_errorf(err, "%s: keys \"num_experts\" (%d) and \"num_local_experts\" (%d) disagree",
                       where, a, b);
    c->n_experts = has_a ? a : has_b ? b : def;
    return 0;
}

/* The mixture-of-experts keys, with transformers' defaults
 * (configuration_qwen3_moe.py, configuration_mixtral.py).  Training-only
 * keys (router_aux_loss_coef, output_router_logits, router_jitter_noise)
 * do not change the forward pass and are ignored. */
static int parse_moe(tp_model_config *c, const cJSON *root, const char *where, tp_err *err)
{
    bool qwen = c->arch == TP_ARCH_QWEN3_MOE;
    if (!qwen && c->arch != TP_ARCH_MIXTRAL)
        return 0;
    c->decoder_sparse_step = 1;
    if (parse_n_experts(c, root, where, qwen ? 128 : 8, err) < 0 ||
        cfg_int(root, "num_experts_per_tok", true, qwen ? 8 : 2, 1, MAX_EXPERTS, where,
                &c->n_experts_per_tok, err) < 0)
        return -1;
    if (qwen) {
        if (cfg_int(root, "moe_intermediate_size", true, 768, 1, MAX_INTER, where,
                    &c->moe_intermediate, err) < 0 ||
            tp_json_opt_bool(root, "norm_topk_prob", false, where, &c->norm_topk_prob, err) < 0 ||
            cfg_int(root, "decoder_sparse_step", true, 1, 1, MAX_LAYERS, where,
                    &c->decoder_sparse_step, err) < 0 ||
            parse_mlp_only(c, root, where, err) < 0)
            return -1;
    } else {
        /* MixtralSparseMoeBlock: experts of intermediate_size, top-k always
         * renormalised. */
        c->moe_intermediate = c->intermediate;
        c->norm_topk_prob = true;
        if (c->n_experts < 1)
            return tp_errorf(err, "%s: key \"num_local_experts\" = 0: mixtral needs experts", where);
    }
    if (c->n_experts > 0 && c->n_experts_per_tok > c->n_experts)
        return tp_errorf(err, "%s: key \"num_experts_per_tok\" = %d is more than the %d experts", where,
                       c->n_experts_per_tok, c->n_experts);
    return 0;
}

bool tp_config_layer_sparse(const tp_model_config *c, int layer)
{
    if (c->n_experts <= 0 || c->decoder_sparse_step <= 0)
        return false;
    for (int i = 0; i < c->n_mlp_only; i++)
        if (c->mlp_only[i] == layer)
            return false;
    return (layer + 1) % c->decoder_sparse_step == 0;
}

static int parse_model_type(tp_model_config *c, const cJSON *root, const char *where, tp_err *err)
{
    const char *mt;
    if (tp_json_opt_str(root, "", "model_type", where, &mt, err) < 0)
        return -1;
    if (!mt || !*mt || strlen(mt) >= sizeof c->model_type)
        return tp_errorf(err, "%s: key \"model_type\" is missing or not a short string", where);
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
        return tp_errorf(err, "%s: hidden_size %d is not a multiple of num_attention_heads %d and "
                       "there is no head_dim", where, c->hidden, c->n_heads);
    int64_t def_hd = derived ? c->hidden / c->n_heads : 128;
    if (cfg_int(root, "head_dim", true, def_hd, 1, MAX_HEAD_DIM, where, &c->head_dim, err) < 0)
        return -1;
    if ((int64_t)c->n_heads * c->head_dim > MAX_Q_WIDTH)
        return tp_errorf(err, "%s: num_attention_heads * head_dim = %" PRId64 " is more than %d", where,
                       (int64_t)c->n_heads * c->head_dim, MAX_Q_WIDTH);
    if (c->n_heads % c->n_kv_heads)
        return tp_errorf(err, "%s: num_attention_heads %d is not a multiple of num_key_value_heads %d",
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
        return tp_errorf(err, "%s: hidden_act \"%s\" is not supported (only \"silu\")", where, act);
    if (c->head_dim % 2)
        return tp_errorf(err, "%s: head_dim = %d must be even for RoPE", where, c->head_dim);
    double eps;
    if (tp_json_finite(root, "", "rms_norm_eps", true, c->arch == TP_ARCH_MIXTRAL ? 1e-5 : 1e-6,
                       where, &eps, err) < 0)
        return -1;
    if (!((float)eps > 0) || eps > 1) /* > 0 as the float it is stored as */
        return tp_errorf(err, "%s: rms_norm_eps = %g is not in (0, 1]", where, eps);
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
    c->qk_norm = c->arch == TP_ARCH_QWEN3 || c->arch == TP_ARCH_QWEN3_MOE;
    int64_t bos;
    if (parse_moe(c, root, where, err) < 0 || parse_sliding(c, root, where, err) < 0 ||
        tp_json_int_in(root, "", "bos_token_id", true, -1, -1, INT32_MAX, where, &bos, err) < 0 ||
        tp_json_id_list(root, "eos_token_id", c->eos_ids, (int)(sizeof c->eos_ids / sizeof c->eos_ids[0]),
                        where, &c->n_eos, err) < 0)
        return -1;
    c->bos_id = (int)bos;
    return 0;
}

/* ------------------------------------------------- quantization_config */

/* Our own quant_method for `tpconvert --quantize int8` (FORMAT.md 1.5). */
#define TP_INT8_QUANT_METHOD "tpshard_int8"
#define MAX_QUANT_BLOCK (1 << 16)

/* A string key of quantization_config that, when present, must equal want
 * (case-insensitive when fold, as transformers lowers activation_scheme). */
static int quant_str_is(const cJSON *q, const char *key, const char *want, bool fold,
                        const char *where, tp_err *err)
{
    const char *v;
    if (tp_json_opt_str(q, "quantization_config.", key, where, &v, err) < 0)
        return -1;
    if (v && (fold ? strcasecmp(v, want) : strcmp(v, want)))
        return tp_errorf(err, "%s: quantization_config.%s \"%s\" is not supported (only \"%s\")", where,
                       key, v, want);
    return 0;
}

/* weight_block_size: two positive integers (transformers' default
 * [128, 128] when absent); null means one scale per tensor, which is not
 * the block scheme we implement. */
static int parse_quant_block(tp_model_config *c, const cJSON *q, const char *where, tp_err *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(q, "weight_block_size");
    c->quant_block[0] = c->quant_block[1] = 128;
    if (!v)
        return 0;
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) != 2)
        return tp_errorf(err, "%s: quantization_config.weight_block_size is not a list of two "
                       "positive integers (per-tensor scales are not supported)", where);
    int i = 0;
    for (const cJSON *e = v->child; e; e = e->next, i++) {
        double d = cJSON_IsNumber(e) ? e->valuedouble : 0;
        if (!(d >= 1 && d <= MAX_QUANT_BLOCK) || d != floor(d))
            return tp_errorf(err, "%s: quantization_config.weight_block_size[%d] is not an integer in "
                           "[1, %d]", where, i, MAX_QUANT_BLOCK);
        c->quant_block[i] = (int)d;
    }
    return 0;
}

/* modules_to_not_convert: module names.  transformers reads each entry as
 * a regular expression too; Qwen's and DeepSeek's lists are plain names,
 * and only those are accepted (a "." in a name is taken literally). */
static int parse_quant_skip(tp_model_config *c, const cJSON *q, const char *key, const char *where,
                            tp_err *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(q, key);
    c->n_quant_skip = -1;
    if (!v || cJSON_IsNull(v))
        return 0;
    if (!cJSON_IsArray(v))
        return tp_errorf(err, "%s: quantization_config.%s is not a list of module names", where, key);
    size_t used = 0;
    c->n_quant_skip = 0;
    for (const cJSON *e = v->child; e; e = e->next, c->n_quant_skip++) {
        if (!cJSON_IsString(e) || !e->valuestring[0])
            return tp_errorf(err, "%s: quantization_config.%s[%d] is not a module name", where, key,
                           c->n_quant_skip);
        if (strpbrk(e->valuestring, "*+?[](){}|^$\\"))
            return tp_errorf(err, "%s: quantization_config.%s[%d] \"%s\" is a regular expression; only "
                           "module names are supported", where, key, c->n_quant_skip, e->valuestring);
        size_t len = strlen(e->valuestring) + 1;
        if (len > sizeof c->quant_skip - used)
            return tp_errorf(err, "%s: quantization_config.%s is longer than %zu bytes", where, key,
                           sizeof c->quant_skip);
        memcpy(c->quant_skip + used, e->valuestring, len);
        used += len;
    }
    return 0;
}

/* quantization_config (absent or null: not quantized).  "fp8" is
 * transformers' FineGrainedFP8Config as Qwen's and DeepSeek's releases
 * write it; TP_INT8_QUANT_METHOD is ours (FORMAT.md 1.5).  Everything that
 * would change what the stored bytes mean and that we do not implement is
 * refused, naming the key. */
static int parse_quant(tp_model_config *c, const cJSON *root, const char *where, tp_err *err)
{
    const cJSON *q = cJSON_GetObjectItemCaseSensitive(root, "quantization_config");
    c->quant = TP_QUANT_NONE;
    c->n_quant_skip = -1;
    if (!q || cJSON_IsNull(q))
        return 0;
    if (!cJSON_IsObject(q))
        return tp_errorf(err, "%s: key \"quantization_config\" is not an object", where);
    const char *method;
    if (tp_json_opt_str(q, "quantization_config.", "quant_method", where, &method, err) < 0)
        return -1;
    if (!method)
        return tp_errorf(err, "%s: missing key \"quantization_config.quant_method\"", where);
    if (!strcmp(method, TP_INT8_QUANT_METHOD)) {
        static const char *const keys[] = {"quant_method", "modules_to_not_convert", NULL};
        c->quant = TP_QUANT_INT8_ROW;
        char qwhere[256];
        snprintf(qwhere, sizeof qwhere, "%s: quantization_config", where);
        if (tp_json_check_keys(q, keys, qwhere, err) < 0)
            return -1;
        return parse_quant_skip(c, q, "modules_to_not_convert", where, err);
    }
    if (strcmp(method, "fp8"))
        return tp_errorf(err, "%s: quantization_config.quant_method \"%s\" is not supported (only "
                       "\"fp8\", and \"%s\" as tpconvert --quantize int8 writes it)", where, method,
                       TP_INT8_QUANT_METHOD);
    c->quant = TP_QUANT_FP8_BLOCK;
    const cJSON *mtc = cJSON_GetObjectItemCaseSensitive(q, "modules_to_convert");
    if (mtc && !cJSON_IsNull(mtc) && !(cJSON_IsArray(mtc) && !mtc->child))
        return tp_errorf(err, "%s: quantization_config.modules_to_convert (quantized embeddings) is "
                       "not supported", where);
    if (cJSON_GetObjectItemCaseSensitive(q, "ignored_layers") &&
        cJSON_GetObjectItemCaseSensitive(q, "modules_to_not_convert"))
        return tp_errorf(err, "%s: quantization_config has both modules_to_not_convert and "
                       "ignored_layers", where);
    if (quant_str_is(q, "activation_scheme", "dynamic", true, where, err) < 0 ||
        quant_str_is(q, "fmt", "e4m3", false, where, err) < 0 ||
        quant_str_is(q, "scale_fmt", "float", false, where, err) < 0 ||
        quant_str_is(q, "expert_dtype", "fp8", false, where, err) < 0 ||
        parse_quant_block(c, q, where, err) < 0)
        return -1;
    /* MiniMax's spelling, which transformers accepts as an alias */
    bool alias = cJSON_GetObjectItemCaseSensitive(q, "ignored_layers") != NULL;
    return parse_quant_skip(c, q, alias ? "ignored_layers" : "modules_to_not_convert", where, err);
}

/* transformers' should_convert_module for one plain name. */
static bool skip_name_matches(const char *pattern, const char *module)
{
    size_t pl = strlen(pattern), ml = strlen(module);
    if (pl <= ml && !strncmp(module, pattern, pl) &&
        (module[pl] == '.' || module[pl] == 0 || (pl && pattern[pl - 1] == '.')))
        return true;
    return pl <= ml && !strcmp(module + ml - pl, pattern);
}

bool tp_config_module_quantized(const tp_model_config *c, const char *module)
{
    if (c->quant == TP_QUANT_NONE)
        return false;
    if (c->n_quant_skip < 0)
        return strcmp(module, "lm_head") != 0;
    const char *p = c->quant_skip;
    for (int i = 0; i < c->n_quant_skip; i++, p += strlen(p) + 1)
        if (skip_name_matches(p, module))
            return false;
    return true;
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
    else if (parse_sizes(c, root, where, err) == 0 && parse_quant(c, root, where, err) == 0)
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
    return tp_errorf(err, "%s: model_type \"%s\" is not supported by tprun (qwen3, qwen2, llama, "
                   "mistral, qwen3_moe, mixtral)", where, c->model_type);
}

int tp_model_config_parse(tp_model_config *c, const char *config_json, tp_err *err)
{
    if (!config_json)
        return tp_errorf(err, "config.json: missing");
    return config_parse(c, config_json, strlen(config_json), "config.json", true, err);
}

/* ------------------------------------------------------------ the tensors */

int64_t tp_dim_value(const tp_model_config *c, tp_dim_of d)
{
    switch (d) {
    case TP_DIM_HIDDEN: return c->hidden;
    case TP_DIM_Q: return (int64_t)c->n_heads * c->head_dim;
    case TP_DIM_KV: return (int64_t)c->n_kv_heads * c->head_dim;
    case TP_DIM_HEAD: return c->head_dim;
    case TP_DIM_INTER: return c->intermediate;
    case TP_DIM_EXPERTS: return c->n_experts;
    case TP_DIM_MOE_INTER: return c->moe_intermediate;
    case TP_DIM_2_MOE_INTER: return 2 * (int64_t)c->moe_intermediate;
    }
    return -1;
}

static const char *dim_name(const tp_model_config *c, tp_dim_of d)
{
    bool mixtral = c->arch == TP_ARCH_MIXTRAL;
    switch (d) {
    case TP_DIM_HIDDEN: return "hidden_size";
    case TP_DIM_Q: return "num_attention_heads * head_dim";
    case TP_DIM_KV: return "num_key_value_heads * head_dim";
    case TP_DIM_HEAD: return "head_dim";
    case TP_DIM_INTER: return "intermediate_size";
    case TP_DIM_EXPERTS: return mixtral ? "num_local_experts" : "num_experts";
    case TP_DIM_MOE_INTER: return mixtral ? "intermediate_size" : "moe_intermediate_size";
    case TP_DIM_2_MOE_INTER: return mixtral ? "2 * intermediate_size" : "2 * moe_intermediate_size";
    }
    return "?";
}

/* t must be [want[0], ..., want[ndim-1]]; why names where the sizes come from. */
static int want_shape(const tp_tensor_ref *t, int ndim, const int64_t *want, const char *why,
                      tp_err *err)
{
    bool ok = t->ndim == ndim;
    for (int d = 0; ok && d < ndim; d++)
        ok = (int64_t)t->shape[d] == want[d];
    if (ok)
        return 0;
    char got[96] = "", exp[80] = "";
    for (int d = 0; d < t->ndim && d < TP_MAX_DIMS; d++)
        snprintf(got + strlen(got), sizeof got - strlen(got), "%s%" PRIu64, d ? ", " : "", t->shape[d]);
    for (int d = 0; d < ndim; d++)
        snprintf(exp + strlen(exp), sizeof exp - strlen(exp), "%s%" PRId64, d ? ", " : "", want[d]);
    return tp_errorf(err, "tensor %s: shape [%s], config.json says [%s] (%s)", t->name, got, exp, why);
}

static int check_row_shape(const tp_model_config *c, const tp_arch_tensor *row, bool is_bias,
                           const tp_tensor_ref *t, tp_err *err)
{
    int ndim = is_bias ? 1 : row->ndim;
    int64_t want[3] = {0};
    char why[160] = "";
    for (int d = 0; d < ndim; d++) {
        want[d] = tp_dim_value(c, row->dims[d]);
        snprintf(why + strlen(why), sizeof why - strlen(why), "%s%s", d ? ", " : "",
                 dim_name(c, row->dims[d]));
    }
    return want_shape(t, ndim, want, why, err);
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

/* rest starts with the row's module, "*" matching a decimal expert number;
 * *after: what follows the module.  *expert: -1 without "*". */
static bool match_module(const char *pat, const char *rest, long *expert, const char **after)
{
    *expert = -1;
    while (*pat) {
        if (*pat == '*') {
            if (*rest < '0' || *rest > '9' || (rest[0] == '0' && rest[1] >= '0' && rest[1] <= '9'))
                return false;
            char *end;
            *expert = strtol(rest, &end, 10);
            if (*expert < 0 || *expert > MAX_EXPERTS)
                return false;
            rest = end;
            pat++;
        } else if (*pat++ != *rest++) {
            return false;
        }
    }
    *after = rest;
    return true;
}

/* The table row of a layer tensor's rest ("mlp.up_proj.weight") in arch a
 * (TP_ARCH_OTHER: any); -1: none, -2: a buffer to ignore. */
static long find_row(tp_arch a, const char *rest, bool *is_bias, long *expert)
{
    for (size_t i = 0; i < sizeof ignored_layer_tensors / sizeof ignored_layer_tensors[0]; i++)
        if (!strcmp(rest, ignored_layer_tensors[i]))
            return -2;
    for (size_t i = 0; i < tp_arch_n_layer_tensors; i++) {
        const tp_arch_tensor *row = &tp_arch_layer_tensors[i];
        const char *after;
        if ((a != TP_ARCH_OTHER && !row_in_arch(row, a)) || !match_module(row->module, rest, expert, &after))
            continue;
        *is_bias = false;
        if (row->bare) {
            if (!*after)
                return (long)i;
            continue;
        }
        if (*after != '.')
            continue;
        *is_bias = !strcmp(after + 1, "bias");
        if (!strcmp(after + 1, "weight") || (*is_bias && row->bias_slot != TP_SLOT_NONE))
            return (long)i;
    }
    return -1;
}

const tp_arch_tensor *tp_arch_expert_row(tp_arch a, tp_expert_part part, bool fused)
{
    for (size_t i = 0; i < tp_arch_n_layer_tensors; i++) {
        const tp_arch_tensor *row = &tp_arch_layer_tensors[i];
        if (row_in_arch(row, a) && row->part == part &&
            (part == TP_EXPERT_ROUTER || (row->kind == TP_ROW_FUSED) == fused))
            return row;
    }
    return NULL;
}

/* "model.layers.L.<module with * = expert>" + suffix into buf. */
static bool row_tensor_name(const tp_arch_tensor *row, long layer, long expert, const char *suffix,
                            char *buf, size_t cap)
{
    size_t used = (size_t)snprintf(buf, cap, "model.layers.%ld.", layer);
    for (const char *p = row->module; *p && used < cap; p++) {
        if (*p == '*')
            used += (size_t)snprintf(buf + used, cap - used, "%ld", expert);
        else
            buf[used++] = *p;
    }
    if (used < cap)
        used += (size_t)snprintf(buf + used, cap - used, "%s", suffix);
    return used < cap;
}

bool tp_arch_tensor_name(const tp_arch_tensor *row, long layer, long expert, char *buf, size_t cap)
{
    return row_tensor_name(row, layer, expert, row->bare ? "" : ".weight", buf, cap);
}

bool tp_arch_bias_name(const tp_arch_tensor *row, long layer, char *buf, size_t cap)
{
    return row_tensor_name(row, layer, -1, ".bias", buf, cap);
}

bool tp_config_has_bias(const tp_model_config *c, tp_layer_slot bias_slot)
{
    switch (bias_slot) {
    case TP_SLOT_bq: case TP_SLOT_bk: case TP_SLOT_bv: return c->attention_bias;
    case TP_SLOT_bo: return c->o_bias;
    case TP_SLOT_bgate: case TP_SLOT_bup: case TP_SLOT_bdown: return c->mlp_bias;
    default: return false;
    }
}

bool tp_arch_row_in_layer(const tp_model_config *c, const tp_arch_tensor *row, int layer, bool fused)
{
    if (!row_in_arch(row, c->arch))
        return false;
    bool sparse = tp_config_layer_sparse(c, layer);
    switch (row->kind) {
    case TP_ROW_ALL: return true;
    case TP_ROW_DENSE: return !sparse;
    case TP_ROW_SPARSE: return sparse;
    case TP_ROW_EXPERT: return sparse && !fused;
    case TP_ROW_FUSED: return sparse && fused;
    }
    return false;
}

tp_expert_part tp_arch_expert_part(const char *name, long *layer, long *expert)
{
    const char *rest;
    bool is_bias;
    if (!split_layer_name(name, layer, &rest))
        return TP_EXPERT_NONE;
    long r = find_row(TP_ARCH_OTHER, rest, &is_bias, expert);
    return r >= 0 && !is_bias ? tp_arch_layer_tensors[r].part : TP_EXPERT_NONE;
}

int tp_expert_range(int n_experts, int tp, int rank, int *lo, int *hi, tp_err *err)
{
    if (tp < 1 || n_experts < 1 || n_experts % tp)
        return tp_errorf(err, "--expert-parallel: num_experts = %d (config.json) is not a multiple of "
                       "tp = %d", n_experts, tp);
    *lo = rank * (n_experts / tp);
    *hi = *lo + n_experts / tp;
    return 0;
}

/* What the check needs to know about the tensors of every layer: which
 * (row, expert) slots were seen, and which sparse layers use the fused
 * layout. */
typedef struct layer_seen {
    const tp_model_config *c;
    size_t slots;             /* per layer */
    size_t *base;             /* [row]: its first slot */
    bool *seen;               /* [layer][slot] */
    bool *fused;              /* [layer] */
    /* [layer][slot]: the weight's dtype (TP_DTYPE_INVALID: not known; an
     * 8-bit one needs its scale), and whether its scale was seen */
    uint8_t *weight_dtype;
    bool *scale_seen;
    int expert_lo, expert_hi;
} layer_seen;

static size_t slot_index(const layer_seen *ls, long layer, size_t row, long expert)
{
    return (size_t)layer * ls->slots + ls->base[row] + (size_t)(expert > 0 ? expert : 0);
}

static bool *slot(layer_seen *ls, long layer, size_t row, long expert)
{
    return &ls->seen[slot_index(ls, layer, row, expert)];
}

/* Whether layer l must have the row: dense rows in dense layers, the router
 * and the experts (of this rank, in the layer's layout) in sparse ones. */
static bool row_wanted(const layer_seen *ls, long l, const tp_arch_tensor *row)
{
    return tp_arch_row_in_layer(ls->c, row, (int)l, ls->fused[l]);
}

/* A known tensor in a layer or for an expert that should not have it. */
static int check_placement(const layer_seen *ls, const tp_tensor_ref *t, long layer,
                           const tp_arch_tensor *row, long expert, tp_err *err)
{
    const tp_model_config *c = ls->c;
    if (!row_wanted(ls, layer, row))
        return tp_errorf(err, "tensor %s: layer %ld is %s (num_experts %d, decoder_sparse_step %d, "
                       "mlp_only_layers), this tensor belongs to a %s", t->name, layer,
                       tp_config_layer_sparse(c, (int)layer) ? "sparse" : "dense", c->n_experts,
                       c->decoder_sparse_step,
                       row->kind == TP_ROW_DENSE ? "dense MLP" :
                       row->kind == TP_ROW_EXPERT ? "layer of per-expert tensors (this layer has "
                                                    "the fused experts)" :
                       row->kind == TP_ROW_FUSED ? "layer of fused experts (this layer has "
                                                   "per-expert tensors)" : "sparse layer");
    if (expert >= c->n_experts)
        return tp_errorf(err, "tensor %s: expert %ld, but config.json says %s = %d", t->name, expert,
                       dim_name(c, TP_DIM_EXPERTS), c->n_experts);
    if (expert >= 0 && (expert < ls->expert_lo || expert >= ls->expert_hi))
        return tp_errorf(err, "tensor %s: expert %ld is not one of this rank's experts [%d, %d)",
                       t->name, expert, ls->expert_lo, ls->expert_hi);
    return 0;
}

/* A row tprun runs quantized: a 2-D linear layer, not the router. */
static bool row_quantizable(const tp_arch_tensor *row)
{
    return row->ndim == 2 && row->part != TP_EXPERT_ROUTER && row->kind != TP_ROW_FUSED;
}

bool tp_arch_quantizable(tp_arch a, const char *name)
{
    const char *rest;
    long layer, expert;
    bool is_bias;
    if (!strcmp(name, "lm_head.weight"))
        return true;
    if (!split_layer_name(name, &layer, &rest))
        return false;
    long r = find_row(a, rest, &is_bias, &expert);
    return r >= 0 && !is_bias && row_quantizable(&tp_arch_layer_tensors[r]);
}

/* The module of a weight or scale name: the name up to its last ".". */
static void module_of(const char *name, char *buf, size_t cap)
{
    const char *dot = strrchr(name, '.');
    size_t n = dot ? (size_t)(dot - name) : strlen(name);
    snprintf(buf, cap, "%.*s", (int)(n < cap ? n : cap - 1), name);
}

/* An 8-bit weight (or the scale of one) must be one the config declares
 * quantized, in the config's scheme, of a layer tprun runs quantized. */
static int check_quant_declared(const tp_model_config *c, const tp_tensor_ref *t, bool quantizable,
                                const char *what, tp_err *err)
{
    char module[256];
    module_of(t->name, module, sizeof module);
    if (c->quant == TP_QUANT_NONE)
        return tp_errorf(err, "tensor %s: %s, but config.json has no quantization_config", t->name, what);
    if (!quantizable)
        return tp_errorf(err, "tensor %s: %s, but tprun runs this tensor only unquantized (only the "
                       "linear layers and lm_head may be quantized)", t->name, what);
    if (!tp_config_module_quantized(c, module))
        return tp_errorf(err, "tensor %s: %s, but config.json's quantization_config does not quantize "
                       "%s (modules_to_not_convert)", t->name, what, module);
    return 0;
}

/* An 8-bit weight: the config's dtype, declared quantized.  *needs_scale
 * is set when its scale must be there. */
static int check_quant_weight(const tp_model_config *c, const tp_tensor_ref *t, bool quantizable,
                              bool *needs_scale, tp_err *err)
{
    *needs_scale = false;
    if (t->dtype != TP_F8_E4M3 && t->dtype != TP_I8)
        return 0;
    char what[64];
    snprintf(what, sizeof what, "dtype %s", tp_dtype_name(t->dtype));
    if (check_quant_declared(c, t, quantizable, what, err) < 0)
        return -1;
    if (t->dtype != tp_quant_dtype(c->quant))
        return tp_errorf(err, "tensor %s: dtype %s, but config.json's quant_method \"%s\" stores %s", t->name,
                       tp_dtype_name(t->dtype), tp_quant_method(c->quant),
                       tp_dtype_name(tp_quant_dtype(c->quant)));
    *needs_scale = true;
    return 0;
}

/* A scale's shape: the config's scheme applied to the weight's shape as the
 * config implies it (want: the weight's dims; why: their names). */
static int check_scale_ref(const tp_model_config *c, const tp_tensor_ref *t, const char *suffix,
                           bool quantizable, const int64_t *want_w, const char *why, tp_err *err)
{
    if (check_quant_declared(c, t, quantizable, "a quantization scale", err) < 0)
        return -1;
    if (strcmp(suffix, tp_quant_scale_suffix(c->quant)))
        return tp_errorf(err, "tensor %s: config.json's quant_method \"%s\" names its scales "
                       "*.%s", t->name, tp_quant_method(c->quant), tp_quant_scale_suffix(c->quant));
    uint64_t w[2] = {(uint64_t)want_w[0], (uint64_t)want_w[1]}, sh[2];
    int nd = tp_quant_scale_shape(c->quant, c->quant_block, w, sh);
    int64_t want[2] = {(int64_t)sh[0], (int64_t)sh[1]};
    char scale_why[256];
    if (c->quant == TP_QUANT_FP8_BLOCK)
        snprintf(scale_why, sizeof scale_why, "[%s] in blocks of %d x %d", why, c->quant_block[0],
                 c->quant_block[1]);
    else
        snprintf(scale_why, sizeof scale_why, "one per row of [%s]", why);
    return want_shape(t, nd, want, scale_why, err);
}

/* A layer tensor's scale, first pass: row known, scale checked and seen. */
static int check_layer_scale(layer_seen *ls, const tp_tensor_ref *t, long layer, const char *wrest,
                             const char *suffix, bool report_unknown, tp_err *err)
{
    const tp_model_config *c = ls->c;
    bool is_bias = false;
    long expert;
    long row = find_row(c->arch, wrest, &is_bias, &expert);
    if (row >= 0 && is_bias)
        row = -1;
    if ((row < 0 && !report_unknown) || (row >= 0 && report_unknown))
        return 0;
    if (row < 0)
        return tp_errorf(err, "tensor %s: not a tensor of a %s layer (tprun would not use it)",
                       t->name, c->model_type);
    const tp_arch_tensor *r = &tp_arch_layer_tensors[row];
    if (check_placement(ls, t, layer, r, expert, err) < 0)
        return -1;
    int64_t want_w[2] = {tp_dim_value(c, r->dims[0]), r->ndim > 1 ? tp_dim_value(c, r->dims[1]) : 1};
    char why[160];
    snprintf(why, sizeof why, "%s, %s", dim_name(c, r->dims[0]),
             r->ndim > 1 ? dim_name(c, r->dims[1]) : "1");
    if (check_scale_ref(c, t, suffix, row_quantizable(r), want_w, why, err) < 0)
        return -1;
    ls->scale_seen[slot_index(ls, layer, (size_t)row, expert)] = true;
    return 0;
}

/* First pass (report_unknown false): marks a known layer tensor seen and
 * checks its layer, placement and shape; second pass: an unknown one is an
 * error (so that a missing tensor is named before a misnamed one). */
static int check_layer_tensor(layer_seen *ls, const tp_tensor_ref *t, long layer, const char *rest,
                              bool report_unknown, tp_err *err)
{
    const tp_model_config *c = ls->c;
    if (layer >= c->n_layers)
        return tp_errorf(err, "tensor %s: layer %ld, but num_hidden_layers is %d", t->name, layer,
                       c->n_layers);
    char wrest[256];
    const char *suffix = tp_quant_scale_weight(rest, wrest, sizeof wrest);
    if (suffix)
        return check_layer_scale(ls, t, layer, wrest, suffix, report_unknown, err);
    bool is_bias = false;
    long expert;
    long row = find_row(c->arch, rest, &is_bias, &expert);
    if (row == -2 || (row < 0 && !report_unknown) || (row >= 0 && report_unknown))
        return 0;
    if (row < 0)
        return tp_errorf(err, "tensor %s: not a tensor of a %s layer (tprun would not use it)",
                       t->name, c->model_type);
    const tp_arch_tensor *r = &tp_arch_layer_tensors[row];
    if (check_placement(ls, t, layer, r, expert, err) < 0)
        return -1;
    if (!is_bias) {
        bool needs_scale;
        *slot(ls, layer, (size_t)row, expert) = true;
        if (check_quant_weight(c, t, row_quantizable(r), &needs_scale, err) < 0)
            return -1;
        ls->weight_dtype[slot_index(ls, layer, (size_t)row, expert)] = (uint8_t)t->dtype;
    } else if (t->dtype == TP_F8_E4M3 || t->dtype == TP_I8) {
        return tp_errorf(err, "tensor %s: dtype %s: a bias is never quantized", t->name,
                       tp_dtype_name(t->dtype));
    }
    return check_row_shape(c, r, is_bias, t, err);
}

static bool is_8bit(int dt)
{
    return dt == TP_F8_E4M3 || dt == TP_I8;
}

/* A quantized weight and its scale go together (FORMAT.md 1.5): an 8-bit
 * weight without its scale, or a scale beside a float weight, is refused. */
static int check_scale_pair(const tp_model_config *c, const char *weight, int wdt, bool has_scale,
                            tp_err *err)
{
    char scale[300];
    tp_quant q = c->quant != TP_QUANT_NONE ? c->quant : TP_QUANT_FP8_BLOCK;
    if (!tp_quant_scale_name(q, weight, scale, sizeof scale))
        snprintf(scale, sizeof scale, "%s_scale", weight);
    if (is_8bit(wdt) && !has_scale)
        return tp_errorf(err, "tensor %s is missing (the scale of %s weight %s)", scale,
                       tp_dtype_name((tp_dtype)wdt), weight);
    if (has_scale && wdt != TP_DTYPE_INVALID && !is_8bit(wdt))
        return tp_errorf(err, "tensor %s: its weight %s is %s, not quantized", scale, weight,
                       tp_dtype_name((tp_dtype)wdt));
    return 0;
}

/* The embedding, the final norm and lm_head (unless tied). */
static const tp_tensor_ref *find_ref(const tp_tensor_ref *t, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(t[i].name, name))
            return &t[i];
    return NULL;
}

const char *tp_arch_lm_head_tensor(const tp_model_config *c)
{
    return c->tie_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
}

/* The scale of table `name` (lm_head.weight, or the tied embedding), if
 * any (either suffix), and the pair rule.  head: the table, NULL when
 * absent.  A quantized tied table is lm_head too: the config must not keep
 * lm_head unquantized (FORMAT.md 1.5). */
static int check_head_quant(const tp_model_config *c, const tp_tensor_ref *t, size_t n,
                            const char *name, const tp_tensor_ref *head, tp_err *err)
{
    char inv_name[64], row_name[64];
    snprintf(inv_name, sizeof inv_name, "%s_scale_inv", name);
    snprintf(row_name, sizeof row_name, "%s_scale", name);
    const tp_tensor_ref *scale = find_ref(t, n, inv_name);
    const char *suffix = "weight_scale_inv";
    if (!scale) {
        scale = find_ref(t, n, row_name);
        suffix = "weight_scale";
    }
    bool needs_scale = false;
    if (head && check_quant_weight(c, head, true, &needs_scale, err) < 0)
        return -1;
    if (head && is_8bit(head->dtype) && strcmp(name, "lm_head.weight") &&
        !tp_config_module_quantized(c, "lm_head"))
        return tp_errorf(err, "tensor %s: dtype %s, but config.json's quantization_config keeps "
                       "lm_head, which is tied to it, unquantized (modules_to_not_convert)", head->name,
                       tp_dtype_name(head->dtype));
    if (scale && !head)
        return tp_errorf(err, "tensor %s: there is no %s", scale->name, name);
    const int64_t vh[2] = {c->vocab, c->hidden};
    if (scale && check_scale_ref(c, scale, suffix, true, vh, "vocab_size, hidden_size", err) < 0)
        return -1;
    return head ? check_scale_pair(c, head->name, head->dtype, scale != NULL, err) : 0;
}

static int check_model_tensors(const tp_model_config *c, const tp_tensor_ref *t, size_t n, tp_err *err)
{
    const int64_t vh[2] = {c->vocab, c->hidden}, h[1] = {c->hidden};
    const tp_tensor_ref *emb = find_ref(t, n, "model.embed_tokens.weight");
    const tp_tensor_ref *norm = find_ref(t, n, "model.norm.weight");
    const tp_tensor_ref *head = find_ref(t, n, "lm_head.weight");
    if (!emb)
        return tp_errorf(err, "tensor model.embed_tokens.weight is missing");
    if (!norm)
        return tp_errorf(err, "tensor model.norm.weight is missing");
    if (!head && !c->tie_embeddings)
        return tp_errorf(err, "tensor lm_head.weight is missing and config.json has no "
                       "\"tie_word_embeddings\": true");
    if (want_shape(emb, 2, vh, "vocab_size, hidden_size", err) < 0 ||
        want_shape(norm, 1, h, "hidden_size", err) < 0 ||
        (head && want_shape(head, 2, vh, "vocab_size, hidden_size", err) < 0))
        return -1;
    /* the embedding may be 8-bit only as the tied lm_head's table */
    bool emb_bad = is_8bit(emb->dtype) && !c->tie_embeddings;
    if (emb_bad || is_8bit(norm->dtype))
        return tp_errorf(err, "tensor %s: dtype %s: only linear layers (and an embedding tied to "
                       "lm_head) may be quantized", emb_bad ? emb->name : norm->name,
                       tp_dtype_name(emb_bad ? emb->dtype : norm->dtype));
    if (c->tie_embeddings && check_head_quant(c, t, n, emb->name, emb, err) < 0)
        return -1;
    return check_head_quant(c, t, n, "lm_head.weight", head, err);
}

/* A sparse layer holding any fused expert tensor uses the fused layout. */
static void find_fused_layers(layer_seen *ls, const tp_tensor_ref *t, size_t n)
{
    long layer, expert;
    const char *rest;
    bool is_bias;
    for (size_t i = 0; i < n; i++)
        if (split_layer_name(t[i].name, &layer, &rest) && layer < ls->c->n_layers) {
            long r = find_row(ls->c->arch, rest, &is_bias, &expert);
            if (r >= 0 && tp_arch_layer_tensors[r].kind == TP_ROW_FUSED)
                ls->fused[layer] = true;
        }
}

static int report_missing(const layer_seen *ls, long l, const tp_arch_tensor *row, long expert,
                          tp_err *err)
{
    char name[256];
    tp_arch_tensor_name(row, l, expert, name, sizeof name);
    const char *which = row->kind == TP_ROW_ALL ? "every layer" :
                        row->kind == TP_ROW_DENSE ? "every dense layer" : "every sparse layer";
    return tp_errorf(err, "tensor %s is missing (model_type %s needs it in %s of 0..%d)", name,
                   ls->c->model_type, which, ls->c->n_layers - 1);
}

static int check_layer_scales(const layer_seen *ls, long l, size_t r, long expert, tp_err *err)
{
    size_t i = slot_index(ls, l, r, expert);
    if (!is_8bit(ls->weight_dtype[i]) && !ls->scale_seen[i])
        return 0;
    char name[256];
    tp_arch_tensor_name(&tp_arch_layer_tensors[r], l, expert, name, sizeof name);
    return check_scale_pair(ls->c, name, ls->weight_dtype[i], ls->scale_seen[i], err);
}

static int check_missing(layer_seen *ls, tp_err *err)
{
    for (long l = 0; l < ls->c->n_layers; l++)
        for (size_t r = 0; r < tp_arch_n_layer_tensors; r++) {
            const tp_arch_tensor *row = &tp_arch_layer_tensors[r];
            if (!row_wanted(ls, l, row))
                continue;
            long lo = row->kind == TP_ROW_EXPERT ? ls->expert_lo : 0;
            long hi = row->kind == TP_ROW_EXPERT ? ls->expert_hi : 1;
            for (long e = lo; e < hi; e++) {
                long expert = row->kind == TP_ROW_EXPERT ? e : -1;
                if (!*slot(ls, l, r, e))
                    return report_missing(ls, l, row, expert, err);
                if (check_layer_scales(ls, l, r, expert, err) < 0)
                    return -1;
            }
        }
    return 0;
}

static int layer_seen_init(layer_seen *ls, const tp_model_config *c, int lo, int hi, tp_err *err)
{
    memset(ls, 0, sizeof *ls);
    ls->c = c;
    ls->expert_lo = lo;
    ls->expert_hi = hi;
    ls->base = calloc(tp_arch_n_layer_tensors, sizeof *ls->base);
    if (!ls->base)
        return tp_errorf(err, "out of memory");
    for (size_t r = 0; r < tp_arch_n_layer_tensors; r++) {
        ls->base[r] = ls->slots;
        bool per_expert = tp_arch_layer_tensors[r].kind == TP_ROW_EXPERT;
        ls->slots += per_expert && c->n_experts > 0 ? (size_t)c->n_experts : 1;
    }
    ls->seen = calloc((size_t)c->n_layers * ls->slots, sizeof *ls->seen);
    ls->fused = calloc((size_t)c->n_layers, sizeof *ls->fused);
    ls->weight_dtype = calloc((size_t)c->n_layers * ls->slots, sizeof *ls->weight_dtype);
    ls->scale_seen = calloc((size_t)c->n_layers * ls->slots, sizeof *ls->scale_seen);
    if (!ls->seen || !ls->fused || !ls->weight_dtype || !ls->scale_seen)
        return tp_errorf(err, "out of memory");
    return 0;
}

static void layer_seen_free(layer_seen *ls)
{
    free(ls->base);
    free(ls->seen);
    free(ls->fused);
    free(ls->weight_dtype);
    free(ls->scale_seen);
}

int tp_arch_check_rank_tensors(const tp_model_config *c, const tp_tensor_ref *t, size_t n,
                               int expert_lo, int expert_hi, tp_err *err)
{
    if (c->arch == TP_ARCH_OTHER)
        return unsupported_model_type(c, "config.json", err);
    if (check_model_tensors(c, t, n, err) < 0)
        return -1;
    layer_seen ls;
    int rc = layer_seen_init(&ls, c, expert_lo, expert_hi, err);
    long layer;
    const char *rest;
    if (rc == 0)
        find_fused_layers(&ls, t, n);
    for (size_t i = 0; i < n && rc == 0; i++)
        if (split_layer_name(t[i].name, &layer, &rest))
            rc = check_layer_tensor(&ls, &t[i], layer, rest, false, err);
    if (rc == 0)
        rc = check_missing(&ls, err);
    for (size_t i = 0; i < n && rc == 0; i++)
        if (split_layer_name(t[i].name, &layer, &rest))
            rc = check_layer_tensor(&ls, &t[i], layer, rest, true, err);
    layer_seen_free(&ls);
    return rc;
}

int tp_arch_check_tensors(const tp_model_config *c, const tp_tensor_ref *t, size_t n, tp_err *err)
{
    return tp_arch_check_rank_tensors(c, t, n, 0, c->n_experts, err);
}

/* The experts a rank file holds: all, unless its per-expert tensors were
 * cut with the expert style (an expert-parallel rank). */
static int index_expert_range(const tp_model_config *c, const tp_shard_index *ix, int *lo, int *hi,
                              tp_err *err)
{
    *lo = 0;
    *hi = c->n_experts;
    for (size_t i = 0; i < ix->n_tensors; i++) {
        long layer, expert;
        const tp_shard_tensor *t = &ix->tensors[i];
        if (t->style && !strcmp(t->style, tp_style_name(TP_STYLE_EXPERT)) &&
            tp_arch_expert_part(t->name, &layer, &expert) != TP_EXPERT_NONE && expert >= 0)
            return tp_expert_range(c->n_experts, ix->tp, ix->rank, lo, hi, err);
    }
    return 0;
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
    int lo, hi;
    if (index_expert_range(&c, ix, &lo, &hi, err) < 0)
        return -1;
    tp_tensor_ref *refs = calloc(ix->n_tensors ? ix->n_tensors : 1, sizeof *refs);
    if (!refs)
        return tp_errorf(err, "out of memory");
    for (size_t i = 0; i < ix->n_tensors; i++)
        refs[i] = (tp_tensor_ref){ix->tensors[i].name, ix->tensors[i].ndim, ix->tensors[i].global_shape,
                                  ix->tensors[i].dtype};
    int rc = tp_arch_check_rank_tensors(&c, refs, ix->n_tensors, lo, hi, err);
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
    return tp_errorf(err, "%s: %s: style %s is not what tprun runs (%s)", p->source ? p->source : "plan",
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
    for (int l = 0; l < c->n_layers; l++) {
        for (size_t r = 0; r < tp_arch_n_layer_tensors; r++) {
            const tp_arch_tensor *row = &tp_arch_layer_tensors[r];
            /* either expert layout may be in the checkpoint: both must run */
            if (!tp_arch_row_in_layer(c, row, l, false) && !tp_arch_row_in_layer(c, row, l, true))
                continue;
            /* Experts run tensor-parallel (the table's cut) or expert-parallel. */
            bool expert = row->kind == TP_ROW_EXPERT || row->kind == TP_ROW_FUSED;
            tp_arch_tensor_name(row, l, 0, name, sizeof name);
            snprintf(module, sizeof module, "model.layers.*.%s", row->module);
            if (check_plan_entry(p, name, module, false, row->runs,
                                 expert ? TP_STYLE_EXPERT : row->runs, err) < 0)
                return -1;
        }
    }
    return 0;
}

int tp_plan_expert_parallel(const tp_model_config *c, tp_plan *p, int tp, tp_err *err)
{
    if (c->n_experts <= 0)
        return tp_errorf(err, "--expert-parallel: model_type %s has no experts (num_experts)",
                       c->model_type);
    if (c->n_experts % tp)
        return tp_errorf(err, "--expert-parallel: %s = %d is not a multiple of tp = %d",
                       dim_name(c, TP_DIM_EXPERTS), c->n_experts, tp);
    char full[256];
    for (size_t i = 0; i < tp_arch_n_layer_tensors; i++) {
        const tp_arch_tensor *row = &tp_arch_layer_tensors[i];
        if (!row_in_arch(row, c->arch) || (row->kind != TP_ROW_EXPERT && row->kind != TP_ROW_FUSED))
            continue;
        snprintf(full, sizeof full, "model.layers.*.%s", row->module);
        if (tp_plan_set(p, full, TP_STYLE_EXPERT, err) < 0)
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
        return tp_errorf(err, "model_type \"%s\" has no built-in plan", model_type);
    char src[128];
    snprintf(src, sizeof src, "built-in plan for %s", model_type);
    if (!(out->source = strdup(src)))
        return tp_errorf(err, "out of memory");
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
