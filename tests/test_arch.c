/* test_arch.c - convert/arch.c: the one config.json parser (defaults,
 * last-wins duplicates, NUL, bounds) and the "can tprun run this?" checks
 * (tensors, plan). */
#include "convert.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "check.h"

#define SIZE_AUTO ((size_t)-1)

#define BASE "\"hidden_size\": 64, \"num_hidden_layers\": 2, \"num_attention_heads\": 4, " \
             "\"num_key_value_heads\": 2, \"intermediate_size\": 128, \"vocab_size\": 512"

static int parse(const char *json, tp_model_config *c, tp_err *err)
{
    return tp_config_parse(c, json, strlen(json), "config.json", err);
}

static void expect_refused(const char *json, size_t len, const char *needle)
{
    tp_model_config c;
    tp_err err = {{0}};
    if (len == SIZE_AUTO)
        len = strlen(json);
    int rc = tp_config_parse(&c, json, len, "config.json", &err);
    CHECK(rc < 0 && strstr(err.msg, needle) && strstr(err.msg, "config.json"),
          "%.70s: rc %d, message \"%s\" should name \"%s\"", json, rc, err.msg, needle);
}

static void test_config(void)
{
    tp_model_config c;
    tp_err err = {{0}};
    /* transformers' Qwen3Config: head_dim = 128 when absent; llama derives it */
    CHECK(parse("{\"model_type\": \"qwen3\", " BASE "}", &c, &err) == 0 && c.head_dim == 128,
          "qwen3 head_dim default: %d %s", c.head_dim, err.msg);
    tp_model_info mi;
    const char *q3 = "{\"model_type\": \"qwen3\", " BASE "}";
    CHECK(tp_model_info_parse(q3, strlen(q3), "config.json", &mi, &err) == 0 && mi.head_dim == 128,
          "converter's view of qwen3 head_dim: %lld", (long long)mi.head_dim);
    CHECK(parse("{\"model_type\": \"llama\", " BASE "}", &c, &err) == 0 && c.head_dim == 16,
          "llama head_dim default: %d", c.head_dim);
    /* the last duplicate wins, at any depth, for both views */
    const char *dup = "{\"model_type\": \"llama\", " BASE ", \"vocab_size\": 256, "
                      "\"rope_scaling\": {\"rope_type\": \"yarn\", \"rope_type\": \"default\"}}";
    CHECK(parse(dup, &c, &err) == 0 && c.vocab == 256, "duplicate vocab_size: %d %s", c.vocab, err.msg);
    CHECK(tp_model_config_parse(&c, dup, &err) == 0 && c.vocab == 256, "runtime view: %d", c.vocab);
    CHECK(tp_model_info_parse(dup, strlen(dup), "config.json", &mi, &err) == 0 && mi.vocab == 256,
          "converter view: %lld", (long long)mi.vocab);
    /* a plan resolved from the same text sees the same model_type */
    const char *dup_mt = "{\"model_type\": \"gpt2\", \"model_type\": \"llama\", " BASE "}";
    tp_plan p;
    CHECK(tp_plan_resolve(dup_mt, strlen(dup_mt), NULL, false, &p, &err) == 0, "plan: %s", err.msg);
    tp_plan_free(&p);
    CHECK(parse(dup_mt, &c, &err) == 0 && c.arch == TP_ARCH_LLAMA, "last model_type wins");

    char nul[] = "{\"model_type\": \"llama\", " BASE "}";
    nul[3] = '\0';
    expect_refused(nul, sizeof nul - 1, "NUL");
    expect_refused("{\"model_type\": \"llama\", " BASE ", \"hidden_size\": 1e12}", SIZE_AUTO, "hidden_size");
    expect_refused("{\"model_type\": \"llama\", " BASE ", \"intermediate_size\": 1e12}", (size_t)-1,
                   "intermediate_size");
    expect_refused("{\"model_type\": \"llama\", " BASE ", \"num_attention_heads\": 65536, "
                   "\"num_key_value_heads\": 1, \"head_dim\": 65536}", SIZE_AUTO, "head_dim");
    expect_refused("{\"model_type\": \"llama\", " BASE ", \"rope_scaling\": {\"type\": \"yarn\"}}",
                   SIZE_AUTO, "yarn");
    expect_refused("{\"model_type\": \"llama\", " BASE ", \"rope_parameters\": {\"rope_type\": \"linear\"}}",
                   SIZE_AUTO, "linear");
    expect_refused("{\"model_type\": \"qwen3\", " BASE ", \"hidden_act\": \"gelu\"}", SIZE_AUTO, "hidden_act");
    expect_refused("{\"model_type\": \"llama\", " BASE ", \"partial_rotary_factor\": 0.5}", (size_t)-1,
                   "partial_rotary_factor");
    expect_refused("{\"model_type\": \"llama\", " BASE ", \"eos_token_id\": [1, \"2\"]}", (size_t)-1,
                   "eos_token_id");
    /* an unknown architecture: sizes only for the converter, refused by tprun */
    CHECK(parse("{\"model_type\": \"gpt_custom\", " BASE ", \"hidden_act\": \"gelu\"}", &c, &err) == 0 &&
          c.arch == TP_ARCH_OTHER, "other arch: %s", err.msg);
    CHECK(tp_model_config_parse(&c, "{\"model_type\": \"gpt2\"}", &err) < 0 && strstr(err.msg, "gpt2"),
          "runtime refuses gpt2: %s", err.msg);
}

/* A qwen3 layout of 2 layers from config BASE (head_dim 32), minus `drop`,
 * plus `extra`. */
typedef struct tensor_set {
    size_t n;
    char names[160][96];
    uint64_t shapes[160][3];
    int ndims[160];
    tp_tensor_ref refs[160];
} tensor_set;

static void add(tensor_set *s, const char *name, int ndim, uint64_t d0, uint64_t d1)
{
    snprintf(s->names[s->n], sizeof s->names[0], "%s", name);
    s->shapes[s->n][0] = d0;
    s->shapes[s->n][1] = d1;
    s->ndims[s->n] = ndim;
    s->refs[s->n] = (tp_tensor_ref){s->names[s->n], ndim, s->shapes[s->n], TP_BF16};
    s->n++;
}

static void qwen3_tensors(tensor_set *s, int layers, const char *drop)
{
    memset(s, 0, sizeof *s);
    add(s, "model.embed_tokens.weight", 2, 512, 64);
    add(s, "model.norm.weight", 1, 64, 0);
    add(s, "lm_head.weight", 2, 512, 64);
    for (int l = 0; l < layers; l++) {
        char n[96];
        for (size_t r = 0; r < tp_arch_n_layer_tensors; r++) {
            const tp_arch_tensor *row = &tp_arch_layer_tensors[r];
            if (!(row->archs & (1u << TP_ARCH_QWEN3)))
                continue;
            snprintf(n, sizeof n, "model.layers.%d.%s.weight", l, row->module);
            if (drop && !strcmp(n, drop))
                continue;
            uint64_t d[2];
            for (int k = 0; k < row->ndim; k++)
                d[k] = row->dims[k] == TP_DIM_HIDDEN ? 64 : row->dims[k] == TP_DIM_Q ? 128
                     : row->dims[k] == TP_DIM_KV ? 64 : row->dims[k] == TP_DIM_HEAD ? 32 : 128;
            add(s, n, row->ndim, d[0], row->ndim > 1 ? d[1] : 0);
        }
    }
}

static void test_tensors(void)
{
    tp_model_config c;
    tp_err err = {{0}};
    CHECK(parse("{\"model_type\": \"qwen3\", \"head_dim\": 32, " BASE "}", &c, &err) == 0, "%s", err.msg);
    tensor_set s;
    qwen3_tensors(&s, 2, NULL);
    CHECK(tp_arch_check_tensors(&c, s.refs, s.n, &err) == 0, "complete qwen3: %s", err.msg);
    qwen3_tensors(&s, 2, "model.layers.1.self_attn.k_norm.weight");
    CHECK(tp_arch_check_tensors(&c, s.refs, s.n, &err) < 0 &&
          strstr(err.msg, "model.layers.1.self_attn.k_norm.weight"), "missing k_norm: %s", err.msg);
    qwen3_tensors(&s, 1, NULL);   /* num_hidden_layers 2, weights for 1 */
    CHECK(tp_arch_check_tensors(&c, s.refs, s.n, &err) < 0 && strstr(err.msg, "model.layers.1."),
          "missing layer: %s", err.msg);
    qwen3_tensors(&s, 3, NULL);
    CHECK(tp_arch_check_tensors(&c, s.refs, s.n, &err) < 0 && strstr(err.msg, "num_hidden_layers"),
          "extra layer: %s", err.msg);
    qwen3_tensors(&s, 2, NULL);
    add(&s, "model.layers.0.mlp.gate_up_proj.weight", 2, 256, 64);
    CHECK(tp_arch_check_tensors(&c, s.refs, s.n, &err) < 0 && strstr(err.msg, "gate_up_proj"),
          "unknown layer tensor: %s", err.msg);
    qwen3_tensors(&s, 2, NULL);
    add(&s, "model.layers.0.self_attn.rotary_emb.inv_freq", 1, 16, 0);
    add(&s, "model.layers.0.self_attn.q_proj.bias", 1, 128, 0);
    CHECK(tp_arch_check_tensors(&c, s.refs, s.n, &err) == 0, "inv_freq and a bias: %s", err.msg);
    qwen3_tensors(&s, 2, NULL);
    s.shapes[4][0] = 100;        /* after the 3 model tensors and input_layernorm: q_proj */
    CHECK(tp_arch_check_tensors(&c, s.refs, s.n, &err) < 0 && strstr(err.msg, "q_proj") &&
          strstr(err.msg, "head_dim"), "misshapen q_proj: %s", err.msg);
}

/* tpverify's view: a rank file's tensor list and the manifest's config. */
/* Every tensor of a MoE config c in the per-expert layout (fused: the
 * fused one), experts [lo, hi), minus `drop`; sizes from c. */
static void moe_tensors(tensor_set *s, const tp_model_config *c, bool fused, int lo, int hi,
                        const char *drop)
{
    memset(s, 0, sizeof *s);
    add(s, "model.embed_tokens.weight", 2, (uint64_t)c->vocab, (uint64_t)c->hidden);
    add(s, "model.norm.weight", 1, (uint64_t)c->hidden, 0);
    add(s, "lm_head.weight", 2, (uint64_t)c->vocab, (uint64_t)c->hidden);
    for (int l = 0; l < c->n_layers; l++) {
        for (size_t r = 0; r < tp_arch_n_layer_tensors; r++) {
            const tp_arch_tensor *row = &tp_arch_layer_tensors[r];
            if (!tp_arch_row_in_layer(c, row, l, fused))
                continue;
            for (int e = row->kind == TP_ROW_EXPERT ? lo : 0; e < (row->kind == TP_ROW_EXPERT ? hi : 1); e++) {
                char n[96];
                tp_arch_tensor_name(row, l, e, n, sizeof n);
                if (drop && !strcmp(n, drop))
                    continue;
                uint64_t d[3] = {0};
                for (int k = 0; k < row->ndim; k++)
                    d[k] = (uint64_t)tp_dim_value(c, row->dims[k]);
                add(s, n, row->ndim, d[0], d[1]);
                s->shapes[s->n - 1][2] = d[2];
            }
        }
    }
}

static tp_tensor_ref *find_set(tensor_set *s, const char *name)
{
    for (size_t i = 0; i < s->n; i++)
        if (!strcmp(s->names[i], name))
            return &s->refs[i];
    return NULL;
}

#define MOE_BASE BASE ", \"num_experts\": 4, \"num_experts_per_tok\": 2, \"moe_intermediate_size\": 32"

static void test_moe_config(void)
{
    tp_model_config c;
    tp_err err = {{0}};
    /* transformers' defaults: qwen3_moe 128 experts, top 8, 768, norm_topk_prob false, head_dim derived */
    CHECK(parse("{\"model_type\": \"qwen3_moe\", " BASE "}", &c, &err) == 0 && c.n_experts == 128 &&
          c.n_experts_per_tok == 8 && c.moe_intermediate == 768 && !c.norm_topk_prob &&
          c.decoder_sparse_step == 1 && c.head_dim == 16 && c.qk_norm,
          "qwen3_moe defaults: %d %d %d %d %s", c.n_experts, c.n_experts_per_tok, c.moe_intermediate,
          c.head_dim, err.msg);
    /* mixtral: 8 experts, top 2 renormalised, experts of intermediate_size, eps 1e-5 */
    CHECK(parse("{\"model_type\": \"mixtral\", " BASE "}", &c, &err) == 0 && c.n_experts == 8 &&
          c.n_experts_per_tok == 2 && c.moe_intermediate == 128 && c.norm_topk_prob &&
          c.rms_eps == 1e-5f && !c.qk_norm, "mixtral defaults: %s", err.msg);
    /* both spellings of the expert count */
    CHECK(parse("{\"model_type\": \"qwen3_moe\", " BASE ", \"num_local_experts\": 6, "
                "\"num_experts_per_tok\": 2}", &c, &err) == 0 && c.n_experts == 6,
          "num_local_experts: %d %s", c.n_experts, err.msg);
    expect_refused("{\"model_type\": \"qwen3_moe\", " BASE ", \"num_local_experts\": 6, "
                   "\"num_experts\": 8}", SIZE_AUTO, "num_local_experts");
    expect_refused("{\"model_type\": \"qwen3_moe\", " MOE_BASE ", \"num_experts_per_tok\": 5}",
                   SIZE_AUTO, "num_experts_per_tok");
    expect_refused("{\"model_type\": \"qwen3_moe\", " MOE_BASE ", \"mlp_only_layers\": [\"0\"]}",
                   SIZE_AUTO, "mlp_only_layers");
    /* which layers are sparse: (l not in mlp_only_layers) and (l + 1) % step == 0 */
    CHECK(parse("{\"model_type\": \"qwen3_moe\", " MOE_BASE ", \"decoder_sparse_step\": 2}", &c,
                &err) == 0 && !tp_config_layer_sparse(&c, 0) && tp_config_layer_sparse(&c, 1),
          "decoder_sparse_step 2: %s", err.msg);
    CHECK(parse("{\"model_type\": \"qwen3_moe\", " MOE_BASE ", \"mlp_only_layers\": [1, 7]}", &c,
                &err) == 0 && tp_config_layer_sparse(&c, 0) && !tp_config_layer_sparse(&c, 1) &&
          c.n_mlp_only == 1, "mlp_only_layers: %s", err.msg);
    /* configuration_qwen3_moe.py has no max_window_layers: the window is every layer's */
    CHECK(parse("{\"model_type\": \"qwen3_moe\", " MOE_BASE ", \"use_sliding_window\": true, "
                "\"sliding_window\": 32, \"max_window_layers\": 1}", &c, &err) == 0 &&
          c.sliding_window == 32 && c.sliding_from_layer == 0, "qwen3_moe window: %d from %d %s",
          c.sliding_window, c.sliding_from_layer, err.msg);
    CHECK(parse("{\"model_type\": \"qwen3_moe\", " MOE_BASE ", \"num_experts\": 0}", &c, &err) == 0 &&
          !tp_config_layer_sparse(&c, 0), "0 experts: dense: %s", err.msg);
}

static void test_moe_tensors(void)
{
    tp_model_config c;
    tp_err err = {{0}};
    tensor_set s;
    CHECK(parse("{\"model_type\": \"qwen3_moe\", " MOE_BASE ", \"decoder_sparse_step\": 2}", &c,
                &err) == 0, "%s", err.msg);
    moe_tensors(&s, &c, false, 0, 4, NULL);
    CHECK(tp_arch_check_tensors(&c, s.refs, s.n, &err) == 0, "complete qwen3_moe: %s", err.msg);
    moe_tensors(&s, &c, true, 0, 4, NULL);
    CHECK(tp_arch_check_tensors(&c, s.refs, s.n, &err) == 0, "fused qwen3_moe: %s", err.msg);
    /* a missing expert tensor is named */
    moe_tensors(&s, &c, false, 0, 4, "model.layers.1.mlp.experts.3.up_proj.weight");
    CHECK(tp_arch_check_tensors(&c, s.refs, s.n, &err) < 0 &&
          strstr(err.msg, "model.layers.1.mlp.experts.3.up_proj.weight is missing"), "missing: %s", err.msg);
    /* a wrong shape is named with the key it comes from */
    moe_tensors(&s, &c, false, 0, 4, NULL);
    find_set(&s, "model.layers.1.mlp.experts.2.down_proj.weight")->shape = (const uint64_t[]){64, 16};
    CHECK(tp_arch_check_tensors(&c, s.refs, s.n, &err) < 0 &&
          strstr(err.msg, "experts.2.down_proj.weight") && strstr(err.msg, "moe_intermediate_size"),
          "shape: %s", err.msg);
    /* an expert count that disagrees with config.json: the router, an extra expert */
    moe_tensors(&s, &c, false, 0, 4, NULL);
    find_set(&s, "model.layers.1.mlp.gate.weight")->shape = (const uint64_t[]){3, 64};
    CHECK(tp_arch_check_tensors(&c, s.refs, s.n, &err) < 0 && strstr(err.msg, "mlp.gate.weight") &&
          strstr(err.msg, "num_experts"), "router: %s", err.msg);
    moe_tensors(&s, &c, false, 0, 5, NULL);
    CHECK(tp_arch_check_tensors(&c, s.refs, s.n, &err) < 0 && strstr(err.msg, "experts.4.") &&
          strstr(err.msg, "num_experts = 4"), "expert 4 of 4: %s", err.msg);
    /* a dense MLP in a sparse layer (or experts in a dense one) */
    moe_tensors(&s, &c, false, 0, 4, NULL);
    snprintf(s.names[s.n - 1], sizeof s.names[0], "model.layers.0.mlp.experts.0.gate_proj.weight");
    CHECK(tp_arch_check_tensors(&c, s.refs, s.n, &err) < 0 && strstr(err.msg, "layer 0 is dense"),
          "expert in a dense layer: %s", err.msg);
    /* an expert-parallel rank: experts [2, 4) only */
    moe_tensors(&s, &c, false, 2, 4, NULL);
    CHECK(tp_arch_check_rank_tensors(&c, s.refs, s.n, 2, 4, &err) == 0, "rank 1 of 2: %s", err.msg);
    CHECK(tp_arch_check_tensors(&c, s.refs, s.n, &err) < 0 && strstr(err.msg, "experts.0."),
          "whole model lacks experts 0, 1: %s", err.msg);
    moe_tensors(&s, &c, false, 1, 4, NULL);
    CHECK(tp_arch_check_rank_tensors(&c, s.refs, s.n, 2, 4, &err) < 0 &&
          strstr(err.msg, "expert 1 is not one of this rank's"), "foreign expert: %s", err.msg);
    /* mixtral's names */
    CHECK(parse("{\"model_type\": \"mixtral\", " BASE ", \"num_local_experts\": 4}", &c, &err) == 0,
          "%s", err.msg);
    moe_tensors(&s, &c, false, 0, 4, NULL);
    CHECK(find_set(&s, "model.layers.1.block_sparse_moe.experts.3.w2.weight") &&
          tp_arch_check_tensors(&c, s.refs, s.n, &err) == 0, "mixtral: %s", err.msg);
    long layer, expert;
    CHECK(tp_arch_expert_part("model.layers.1.block_sparse_moe.experts.3.w3.weight", &layer, &expert) ==
          TP_EXPERT_UP && layer == 1 && expert == 3, "expert part");
    CHECK(tp_arch_expert_part("model.layers.1.mlp.gate_proj.weight", &layer, &expert) == TP_EXPERT_NONE,
          "dense gate_proj is not an expert");
    /* --expert-parallel needs tp | num_experts, and names the key */
    tp_plan p;
    CHECK(tp_plan_builtin("mixtral", &p, &err) == 0, "%s", err.msg);
    CHECK(tp_plan_expert_parallel(&c, &p, 3, &err) < 0 && strstr(err.msg, "--expert-parallel") &&
          strstr(err.msg, "num_local_experts"), "tp 3: %s", err.msg);
    CHECK(tp_plan_expert_parallel(&c, &p, 2, &err) == 0 &&
          tp_arch_check_plan(&c, &p, &err) == 0 &&
          p.styles[tp_plan_match(&p, "model.layers.0.block_sparse_moe.experts.1.w1.weight")] ==
          TP_STYLE_EXPERT, "expert plan: %s", err.msg);
    tp_plan_free(&p);
}

static void test_index(void)
{
    tp_err err = {{0}};
    const char *cfg = "{\"model_type\": \"qwen3\", \"head_dim\": 32, " BASE "}";
    tensor_set s;
    qwen3_tensors(&s, 2, "model.layers.0.mlp.up_proj.weight");
    tp_shard_tensor tensors[64];
    memset(tensors, 0, sizeof tensors);
    for (size_t i = 0; i < s.n; i++) {
        tensors[i].name = s.names[i];
        tensors[i].ndim = s.ndims[i];
        memcpy(tensors[i].global_shape, s.shapes[i], sizeof s.shapes[i]);
    }
    tp_shard_index ix = {.n_tensors = s.n, .tensors = tensors};
    CHECK(tp_arch_check_index(cfg, &ix, &err) < 0 && strstr(err.msg, "model.layers.0.mlp.up_proj.weight"),
          "index without up_proj: %s", err.msg);
    qwen3_tensors(&s, 2, NULL);
    for (size_t i = 0; i < s.n; i++) {
        tensors[i].name = s.names[i];
        tensors[i].ndim = s.ndims[i];
        memcpy(tensors[i].global_shape, s.shapes[i], sizeof s.shapes[i]);
    }
    ix.n_tensors = s.n;
    CHECK(tp_arch_check_index(cfg, &ix, &err) == 0, "complete index: %s", err.msg);
    /* another architecture: nothing to check against */
    CHECK(tp_arch_check_index("{\"model_type\": \"gpt_custom\", " BASE "}", &ix, &err) == 0,
          "other arch: %s", err.msg);
}

static void test_plan(void)
{
    tp_model_config c;
    tp_err err = {{0}};
    CHECK(parse("{\"model_type\": \"llama\", " BASE "}", &c, &err) == 0, "%s", err.msg);
    tp_plan p;
    CHECK(tp_plan_builtin("llama", &p, &err) == 0, "%s", err.msg);
    CHECK(tp_arch_check_plan(&c, &p, &err) == 0, "built-in plan: %s", err.msg);
    CHECK(tp_plan_set(&p, "model.embed_tokens", TP_STYLE_VOCAB, &err) == 0 &&
          tp_arch_check_plan(&c, &p, &err) == 0, "vocab-parallel: %s", err.msg);
    tp_plan_free(&p);
    const char *bad = "{\"layers.*.self_attn.q_proj\": \"colwise\", \"layers.*.self_attn.k_proj\": \"colwise\", "
                      "\"layers.*.self_attn.v_proj\": \"colwise\", \"layers.*.self_attn.o_proj\": \"colwise\", "
                      "\"layers.*.mlp.gate_proj\": \"colwise\", \"layers.*.mlp.up_proj\": \"colwise\", "
                      "\"layers.*.mlp.down_proj\": \"rowwise\"}";
    CHECK(tp_plan_parse(bad, strlen(bad), "plan.json", false, &p, &err) == 0, "%s", err.msg);
    CHECK(tp_arch_check_plan(&c, &p, &err) < 0 && strstr(err.msg, "plan.json") &&
          strstr(err.msg, "model.layers.*.self_attn.o_proj") && strstr(err.msg, "style colwise") &&
          strstr(err.msg, "(rowwise)"), "o_proj colwise: %s", err.msg);
    tp_plan_free(&p);
    const char *partial = "{\"layers.*.self_attn.q_proj\": \"colwise\"}";
    CHECK(tp_plan_parse(partial, strlen(partial), "plan.json", false, &p, &err) == 0, "%s", err.msg);
    CHECK(tp_arch_check_plan(&c, &p, &err) < 0 && strstr(err.msg, "k_proj") && strstr(err.msg, "replicate"),
          "unnamed k_proj: %s", err.msg);
    tp_plan_free(&p);
}

/* Every row fills the slot its shape fits (a matrix slot for a 2-D weight,
 * vector slots for 1-D weights and biases), and each architecture's dense
 * layer fills every slot at most once: the runtime loads a layer by walking
 * the table, so a slot claimed twice or by the wrong kind of tensor would
 * load the wrong weight. */
static void test_slots(void)
{
    for (int a = 0; a < TP_ARCH_OTHER; a++) {
        int fills[TP_SLOT_COUNT] = {0};
        for (size_t r = 0; r < tp_arch_n_layer_tensors; r++) {
            const tp_arch_tensor *row = &tp_arch_layer_tensors[r];
            if (!(row->archs & (1u << a)))
                continue;
            bool expert = row->part != TP_EXPERT_NONE;
            CHECK(expert == (row->slot == TP_SLOT_NONE), "arch %d %s: an expert row has no slot, "
                  "every other row one (slot %d)", a, row->module, row->slot);
            if (row->slot != TP_SLOT_NONE) {
                fills[row->slot]++;
                CHECK(tp_layer_slot_is_matrix(row->slot) == (row->ndim == 2), "%s: slot kind vs ndim %d",
                      row->module, row->ndim);
            }
            if (row->bias_slot != TP_SLOT_NONE) {
                fills[row->bias_slot]++;
                CHECK(!tp_layer_slot_is_matrix(row->bias_slot) && row->ndim == 2,
                      "%s: a bias is a vector, of a matrix", row->module);
            }
        }
        for (int sl = 0; sl < TP_SLOT_COUNT; sl++)
            CHECK(fills[sl] <= 1, "arch %d: slot %d filled by %d rows", a, sl, fills[sl]);
        /* every architecture has attention and a dense MLP's slots (qwen3_moe's dense layers) or
         * experts (mixtral) */
        CHECK(fills[TP_SLOT_wq] && fills[TP_SLOT_wo] && fills[TP_SLOT_attn_norm] && fills[TP_SLOT_bq],
              "arch %d: attention slots", a);
    }
    CHECK(!tp_layer_slot_is_matrix(TP_SLOT_NONE) && !tp_layer_slot_is_matrix(TP_SLOT_COUNT),
          "out-of-range slots are no matrices");
    /* which rows a layer has */
    tp_model_config c;
    tp_err err = {{0}};
    CHECK(parse("{\"model_type\": \"qwen3_moe\", " MOE_BASE ", \"mlp_only_layers\": [0]}", &c, &err) == 0,
          "%s", err.msg);
    int in_layer[2][2] = {{0}};   /* [layer][fused]: rows */
    for (int l = 0; l < 2; l++)
        for (int f = 0; f < 2; f++)
            for (size_t r = 0; r < tp_arch_n_layer_tensors; r++)
                in_layer[l][f] += tp_arch_row_in_layer(&c, &tp_arch_layer_tensors[r], l, f);
    /* 8 attention rows + 3 dense MLP rows; sparse: router + 3 per-expert rows or 2 fused rows */
    CHECK(in_layer[0][0] == 11 && in_layer[0][1] == 11 && in_layer[1][0] == 12 && in_layer[1][1] == 11,
          "rows per layer: %d %d %d %d", in_layer[0][0], in_layer[0][1], in_layer[1][0], in_layer[1][1]);
    CHECK(tp_dim_value(&c, TP_DIM_2_MOE_INTER) == 64 && tp_dim_value(&c, TP_DIM_KV) == 32,
          "dims: %lld %lld", (long long)tp_dim_value(&c, TP_DIM_2_MOE_INTER),
          (long long)tp_dim_value(&c, TP_DIM_KV));
    char name[64];
    CHECK(tp_arch_bias_name(&tp_arch_layer_tensors[1], 3, name, sizeof name) &&
          !strcmp(name, "model.layers.3.self_attn.q_proj.bias") &&
          !tp_arch_bias_name(&tp_arch_layer_tensors[1], 3, name, 20), "bias name: %s", name);
}

/* cut.c's shape products are checked, whatever tp_model_info holds
 * (run under -fsanitize=undefined to see no signed overflow). */
static void test_cut_overflow(void)
{
    tp_err err = {{0}};
    tp_model_info mi = {.hidden = 64, .n_heads = 1000000000000LL, .n_kv_heads = 1,
                        .head_dim = 1000000000000LL, .intermediate = 128, .vocab = 512, .n_layers = 2};
    uint64_t shape[2] = {128, 64};
    tp_cut c;
    CHECK(tp_cut_make(&c, &mi, "model.layers.0.self_attn.q_proj.weight", TP_BF16, 2, shape,
                      TP_STYLE_COLWISE, 2, &err) < 0 && strstr(err.msg, "overflow"),
          "huge heads * head_dim: %s", err.msg);
}

/* quantization_config: Qwen's FP8 releases, our int8, and every refusal. */
#define Q3 "{\"model_type\": \"qwen3\", " BASE ", \"quantization_config\": "

static void test_quant_config(void)
{
    tp_model_config c;
    tp_err err = {{0}};
    CHECK(parse("{\"model_type\": \"qwen3\", " BASE "}", &c, &err) == 0 && c.quant == TP_QUANT_NONE &&
          !tp_config_module_quantized(&c, "model.layers.0.self_attn.q_proj"), "no quantization_config");
    /* Qwen3-0.6B-FP8's, as released */
    CHECK(parse(Q3 "{\"activation_scheme\": \"dynamic\", \"fmt\": \"e4m3\", \"quant_method\": \"fp8\", "
                "\"weight_block_size\": [128, 64]}}", &c, &err) == 0 &&
          c.quant == TP_QUANT_FP8_BLOCK && c.quant_block[0] == 128 && c.quant_block[1] == 64,
          "qwen fp8: %d [%d, %d] %s", c.quant, c.quant_block[0], c.quant_block[1], err.msg);
    /* no modules_to_not_convert: transformers keeps lm_head unquantized */
    CHECK(tp_config_module_quantized(&c, "model.layers.1.mlp.down_proj") &&
          !tp_config_module_quantized(&c, "lm_head"), "default skip list");
    /* weight_block_size absent: transformers' (128, 128) */
    CHECK(parse(Q3 "{\"quant_method\": \"fp8\"}}", &c, &err) == 0 && c.quant_block[0] == 128 &&
          c.quant_block[1] == 128, "default block: %s", err.msg);
    /* Qwen3-30B-A3B-FP8's list: the routers and lm_head, by name */
    CHECK(parse(Q3 "{\"quant_method\": \"fp8\", \"activation_scheme\": \"DYNAMIC\", "
                "\"modules_to_not_convert\": [\"lm_head\", \"model.layers.1.mlp.gate\", \"o_proj\"]}}",
                &c, &err) == 0 && c.n_quant_skip == 3, "skip list: %s", err.msg);
    CHECK(!tp_config_module_quantized(&c, "lm_head") &&
          !tp_config_module_quantized(&c, "model.layers.1.mlp.gate") &&
          tp_config_module_quantized(&c, "model.layers.1.mlp.gate_proj") &&
          tp_config_module_quantized(&c, "model.layers.11.mlp.gate") &&
          !tp_config_module_quantized(&c, "model.layers.0.self_attn.o_proj") &&
          tp_config_module_quantized(&c, "model.layers.0.self_attn.q_proj"),
          "should_convert_module: prefix at a boundary, or suffix");
    /* an explicit empty list quantizes lm_head too */
    CHECK(parse(Q3 "{\"quant_method\": \"fp8\", \"modules_to_not_convert\": []}}", &c, &err) == 0 &&
          tp_config_module_quantized(&c, "lm_head"), "empty list: %s", err.msg);
    CHECK(parse(Q3 "{\"quant_method\": \"fp8\", \"ignored_layers\": [\"lm_head\", \"q_proj\"]}}", &c,
                &err) == 0 && !tp_config_module_quantized(&c, "model.layers.0.self_attn.q_proj"),
          "ignored_layers alias: %s", err.msg);
    /* ours */
    CHECK(parse(Q3 "{\"quant_method\": \"tpshard_int8\", \"modules_to_not_convert\": [\"lm_head\"]}}",
                &c, &err) == 0 && c.quant == TP_QUANT_INT8_ROW &&
          tp_config_module_quantized(&c, "model.layers.0.mlp.up_proj"), "int8: %s", err.msg);
    CHECK(parse(Q3 "null}", &c, &err) == 0 && c.quant == TP_QUANT_NONE, "null: %s", err.msg);

    expect_refused(Q3 "{\"quant_method\": \"awq\"}}", SIZE_AUTO, "quant_method \"awq\"");
    expect_refused(Q3 "{\"weight_block_size\": [128, 128]}}", SIZE_AUTO, "quantization_config.quant_method");
    expect_refused(Q3 "[1]}", SIZE_AUTO, "quantization_config");
    expect_refused(Q3 "{\"quant_method\": \"fp8\", \"activation_scheme\": \"static\"}}", SIZE_AUTO,
                   "activation_scheme \"static\"");
    expect_refused(Q3 "{\"quant_method\": \"fp8\", \"fmt\": \"e5m2\"}}", SIZE_AUTO, "fmt \"e5m2\"");
    expect_refused(Q3 "{\"quant_method\": \"fp8\", \"scale_fmt\": \"ue8m0\"}}", SIZE_AUTO, "scale_fmt");
    expect_refused(Q3 "{\"quant_method\": \"fp8\", \"expert_dtype\": \"fp4\"}}", SIZE_AUTO, "expert_dtype");
    expect_refused(Q3 "{\"quant_method\": \"fp8\", \"weight_block_size\": null}}", SIZE_AUTO,
                   "weight_block_size");
    expect_refused(Q3 "{\"quant_method\": \"fp8\", \"weight_block_size\": [128]}}", SIZE_AUTO,
                   "weight_block_size");
    expect_refused(Q3 "{\"quant_method\": \"fp8\", \"weight_block_size\": [128, 0]}}", SIZE_AUTO,
                   "weight_block_size[1]");
    expect_refused(Q3 "{\"quant_method\": \"fp8\", \"weight_block_size\": [128, 1.5]}}", SIZE_AUTO,
                   "weight_block_size[1]");
    expect_refused(Q3 "{\"quant_method\": \"fp8\", \"modules_to_convert\": [\"model.embed_tokens\"]}}",
                   SIZE_AUTO, "modules_to_convert");
    expect_refused(Q3 "{\"quant_method\": \"fp8\", \"modules_to_not_convert\": \"lm_head\"}}", SIZE_AUTO,
                   "modules_to_not_convert");
    expect_refused(Q3 "{\"quant_method\": \"fp8\", \"modules_to_not_convert\": [\"lm_head\", 3]}}",
                   SIZE_AUTO, "modules_to_not_convert[1]");
    expect_refused(Q3 "{\"quant_method\": \"fp8\", \"modules_to_not_convert\": [\"layers.*.gate\"]}}",
                   SIZE_AUTO, "regular expression");
    expect_refused(Q3 "{\"quant_method\": \"tpshard_int8\", \"weight_block_size\": [1, 1]}}", SIZE_AUTO,
                   "weight_block_size");
}

/* An FP8 qwen3 (blocks of 32 x 32 on BASE's sizes): every linear weight
 * F8_E4M3 with its weight_scale_inv, unless it is `keep`; `drop` left out. */
static void fp8_tensors(tensor_set *s, const char *keep, const char *drop)
{
    qwen3_tensors(s, 2, NULL);
    size_t n = s->n;
    for (size_t i = 0; i < n; i++) {
        if (s->ndims[i] != 2 || !strncmp(s->names[i], "model.embed", 11) ||
            !strcmp(s->names[i], "lm_head.weight") || (keep && !strcmp(s->names[i], keep)))
            continue;
        s->refs[i].dtype = TP_F8_E4M3;
        char scale[96];
        snprintf(scale, sizeof scale, "%.*s_scale_inv", (int)strlen(s->names[i]), s->names[i]);
        if (drop && !strcmp(scale, drop))
            continue;
        add(s, scale, 2, (s->shapes[i][0] + 31) / 32, (s->shapes[i][1] + 31) / 32);
    }
}

static size_t ref_index(const tensor_set *s, const char *name)
{
    for (size_t i = 0; i < s->n; i++)
        if (!strcmp(s->names[i], name))
            return i;
    return 0;
}

static void expect_tensors_refused(const tp_model_config *c, const tensor_set *s, const char *needle)
{
    tp_err err = {{0}};
    int rc = tp_arch_check_tensors(c, s->refs, s->n, &err);
    CHECK(rc < 0 && strstr(err.msg, needle), "rc %d, message \"%s\" should name \"%s\"", rc, err.msg,
          needle);
}

#define FP8_CFG(extra) "{\"model_type\": \"qwen3\", \"head_dim\": 32, " BASE ", \"quantization_config\": " \
    "{\"quant_method\": \"fp8\", \"weight_block_size\": [32, 32]" extra "}}"

static void test_quant_tensors(void)
{
    tp_model_config c, plain, skip_q;
    tp_err err = {{0}};
    CHECK(parse(FP8_CFG(""), &c, &err) == 0, "%s", err.msg);
    CHECK(parse("{\"model_type\": \"qwen3\", \"head_dim\": 32, " BASE "}", &plain, &err) == 0, "%s",
          err.msg);
    CHECK(parse(FP8_CFG(", \"modules_to_not_convert\": [\"lm_head\", \"q_proj\"]"), &skip_q, &err) == 0,
          "%s", err.msg);
    tensor_set s;
    fp8_tensors(&s, NULL, NULL);
    CHECK(tp_arch_check_tensors(&c, s.refs, s.n, &err) == 0, "complete fp8 qwen3: %s", err.msg);
    /* a float weight the config would quantize is still runnable */
    fp8_tensors(&s, "model.layers.0.mlp.up_proj.weight", NULL);
    CHECK(tp_arch_check_tensors(&c, s.refs, s.n, &err) == 0, "one bf16 linear: %s", err.msg);

    fp8_tensors(&s, NULL, "model.layers.1.self_attn.o_proj.weight_scale_inv");
    expect_tensors_refused(&c, &s, "tensor model.layers.1.self_attn.o_proj.weight_scale_inv is missing "
                                   "(the scale of F8_E4M3 weight model.layers.1.self_attn.o_proj.weight)");
    fp8_tensors(&s, NULL, NULL);
    s.shapes[ref_index(&s, "model.layers.0.mlp.down_proj.weight_scale_inv")][1] = 3;
    expect_tensors_refused(&c, &s, "tensor model.layers.0.mlp.down_proj.weight_scale_inv: shape [2, 3], "
                                   "config.json says [2, 4]");
    fp8_tensors(&s, NULL, NULL);
    expect_tensors_refused(&plain, &s, "F8_E4M3, but config.json has no quantization_config");
    expect_tensors_refused(&skip_q, &s, "does not quantize model.layers.0.self_attn.q_proj "
                                        "(modules_to_not_convert)");
    /* a scale beside a float weight */
    fp8_tensors(&s, "model.layers.1.mlp.gate_proj.weight", NULL);
    add(&s, "model.layers.1.mlp.gate_proj.weight_scale_inv", 2, 4, 2);
    expect_tensors_refused(&c, &s, "its weight model.layers.1.mlp.gate_proj.weight is BF16, not quantized");
    /* the wrong scheme's dtype and scale name */
    fp8_tensors(&s, NULL, NULL);
    s.refs[ref_index(&s, "model.layers.0.self_attn.v_proj.weight")].dtype = TP_I8;
    expect_tensors_refused(&c, &s, "dtype I8, but config.json's quant_method \"fp8\" stores F8_E4M3");
    fp8_tensors(&s, NULL, NULL);
    add(&s, "model.layers.0.self_attn.v_proj.weight_scale", 1, 64, 0);
    expect_tensors_refused(&c, &s, "names its scales *.weight_scale_inv");
    /* what tprun runs only unquantized: a norm, a bias, and lm_head unless declared */
    fp8_tensors(&s, NULL, NULL);
    s.refs[ref_index(&s, "model.layers.0.self_attn.q_norm.weight")].dtype = TP_F8_E4M3;
    expect_tensors_refused(&c, &s, "tprun runs this tensor only unquantized");
    fp8_tensors(&s, NULL, NULL);
    s.refs[ref_index(&s, "lm_head.weight")].dtype = TP_F8_E4M3;
    add(&s, "lm_head.weight_scale_inv", 2, 16, 2);
    expect_tensors_refused(&c, &s, "does not quantize lm_head");
    tp_model_config all;
    CHECK(parse(FP8_CFG(", \"modules_to_not_convert\": []"), &all, &err) == 0, "%s", err.msg);
    CHECK(tp_arch_check_tensors(&all, s.refs, s.n, &err) == 0, "quantized lm_head, declared: %s", err.msg);
    s.n--;
    expect_tensors_refused(&all, &s, "tensor lm_head.weight_scale_inv is missing");

    CHECK(tp_arch_quantizable(TP_ARCH_QWEN3, "model.layers.3.mlp.down_proj.weight") &&
          tp_arch_quantizable(TP_ARCH_QWEN3, "lm_head.weight") &&
          tp_arch_quantizable(TP_ARCH_QWEN3_MOE, "model.layers.0.mlp.experts.7.up_proj.weight") &&
          !tp_arch_quantizable(TP_ARCH_QWEN3_MOE, "model.layers.0.mlp.gate.weight") &&
          !tp_arch_quantizable(TP_ARCH_QWEN3_MOE, "model.layers.0.mlp.experts.gate_up_proj") &&
          !tp_arch_quantizable(TP_ARCH_QWEN3, "model.layers.0.input_layernorm.weight") &&
          !tp_arch_quantizable(TP_ARCH_QWEN3, "model.layers.0.self_attn.q_proj.bias") &&
          !tp_arch_quantizable(TP_ARCH_QWEN3, "model.embed_tokens.weight"),
          "tp_arch_quantizable: linear layers and lm_head only");
}

int main(void)
{
    test_cut_overflow();
    test_config();
    test_tensors();
    test_moe_config();
    test_moe_tensors();
    test_index();
    test_plan();
    test_quant_config();
    test_quant_tensors();
    test_slots();
    return check_finish("test_arch");
}
