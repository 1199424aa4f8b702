/* test_plan.c - tensor-parallel plans: the layer-number wildcard, matching
 * (exact, module, "*", prefix handling), the built-in plan of each model
 * type, style aliases, unknown / unsupported styles, config.json's
 * base_model_tp_plan over the built-in one and --plan over both. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "convert.h"
#include "check.h"

/* The style a tensor gets, as a name; "-" when the plan does not name it. */
static const char *style_of(const tp_plan *p, const char *tensor)
{
    long i = tp_plan_match(p, tensor);
    return i < 0 ? "-" : tp_style_name(p->styles[i]);
}

static void test_wildcard(void)
{
    static const char *cases[][2] = {
        {"model.layers.3.self_attn.q_proj.weight", "model.layers.*.self_attn.q_proj.weight"},
        {"model.layers.12", "model.layers.*"},
        {"model.layers.0.mlp.w1.weight", "model.layers.*.mlp.w1.weight"}, /* w1 keeps its 1 */
        {"a.1.2.b", "a.*.2.b"},       /* re.sub does not overlap: ".1." eats the dot */
        {"a.1.x2.b", "a.*.x2.b"},
        {"lm_head.weight", "lm_head.weight"},
        {"x.10a.y", "x.10a.y"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char out[128];
        CHECK(tp_wildcard_layers(cases[i][0], out, sizeof out), "%s: did not fit", cases[i][0]);
        CHECK(!strcmp(out, cases[i][1]), "%s -> %s, want %s", cases[i][0], out, cases[i][1]);
    }
    char tiny[8];
    CHECK(!tp_wildcard_layers("model.layers.3.x", tiny, sizeof tiny), "overflow must be reported");
}

static void test_builtin(void)
{
    const char *types[] = {"qwen3", "qwen2", "llama", "mistral"};
    for (size_t t = 0; t < 4; t++) {
        tp_plan p;
        tp_err err = {{0}};
        CHECK(tp_plan_builtin(types[t], &p, &err) == 0, "%s: %s", types[t], err.msg);
        CHECK(tp_model_type_known(types[t]), "%s must be known", types[t]);
        /* transformers 5.24 base_model_tp_plan under "model." + lm_head */
        CHECK(!strcmp(style_of(&p, "model.layers.0.self_attn.q_proj.weight"), "colwise"), "%s q", types[t]);
        CHECK(!strcmp(style_of(&p, "model.layers.7.self_attn.k_proj.bias"), "colwise"), "%s k bias", types[t]);
        CHECK(!strcmp(style_of(&p, "model.layers.1.self_attn.v_proj.weight"), "colwise"), "%s v", types[t]);
        CHECK(!strcmp(style_of(&p, "model.layers.1.self_attn.o_proj.weight"), "rowwise"), "%s o", types[t]);
        CHECK(!strcmp(style_of(&p, "model.layers.1.self_attn.o_proj.bias"), "rowwise"), "%s o bias", types[t]);
        CHECK(!strcmp(style_of(&p, "model.layers.2.mlp.gate_proj.weight"), "colwise"), "%s gate", types[t]);
        CHECK(!strcmp(style_of(&p, "model.layers.2.mlp.up_proj.weight"), "colwise"), "%s up", types[t]);
        CHECK(!strcmp(style_of(&p, "model.layers.2.mlp.down_proj.weight"), "rowwise"), "%s down", types[t]);
        CHECK(!strcmp(style_of(&p, "lm_head.weight"), "colwise_gather_output"), "%s lm_head", types[t]);
        /* not named: replicated */
        CHECK(!strcmp(style_of(&p, "model.embed_tokens.weight"), "-"), "%s embed", types[t]);
        CHECK(!strcmp(style_of(&p, "model.norm.weight"), "-"), "%s norm", types[t]);
        CHECK(!strcmp(style_of(&p, "model.layers.0.input_layernorm.weight"), "-"), "%s ln", types[t]);
        /* the base plan lives under "model.": a bare name does not match */
        CHECK(!strcmp(style_of(&p, "layers.0.self_attn.q_proj.weight"), "-"), "%s prefix", types[t]);
        /* a parameter of a submodule of a planned module is not the module's */
        CHECK(!strcmp(style_of(&p, "model.layers.0.self_attn.q_proj.lora.weight"), "-"), "%s child", types[t]);
        const char *qn = style_of(&p, "model.layers.0.self_attn.q_norm.weight");
        if (t == 0)
            CHECK(!strcmp(qn, "replicate"), "qwen3 q_norm is replicated_with_grad_allreduce: %s", qn);
        else
            CHECK(!strcmp(qn, "-"), "%s has no q_norm entry: %s", types[t], qn);
        tp_plan_free(&p);
    }
    tp_plan p;
    tp_err err = {{0}};
    CHECK(tp_plan_builtin("gpt2", &p, &err) < 0, "gpt2 has no built-in plan");
    CHECK(!tp_model_type_known("gpt2"), "gpt2 is not known");
}

static void test_aliases(void)
{
    static const struct { const char *name, *canon; } ok[] = {
        {"colwise", "colwise"}, {"local_colwise", "colwise"},
        {"colwise_rep", "colwise_gather_output"}, {"colwise_gather_output", "colwise_gather_output"},
        {"rowwise", "rowwise"}, {"local_rowwise", "rowwise"},
        {"rowwise_rep", "rowwise_rep"}, {"rowwise_split_input", "rowwise_rep"},
        {"replicate", "replicate"}, {"replicated_with_grad_allreduce", "replicate"},
        {"sequence_parallel", "replicate"},
        {"packed_colwise", "packed_colwise"}, {"packed_rowwise", "packed_rowwise"},
        {"local_packed_rowwise", "packed_rowwise"},
        {"vocab", "vocab"}, {"embedding_rowwise", "vocab"},
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        tp_style s;
        tp_err err = {{0}};
        CHECK(tp_style_parse(ok[i].name, "k", &s, &err) == 0, "%s: %s", ok[i].name, err.msg);
        CHECK(!strcmp(tp_style_name(s), ok[i].canon), "%s -> %s, want %s", ok[i].name,
              tp_style_name(s), ok[i].canon);
    }
    tp_style s;
    tp_err err = {{0}};
    CHECK(tp_style_parse("diagonal", "layers.*.mlp.up_proj", &s, &err) < 0, "unknown style accepted");
    CHECK(strstr(err.msg, "diagonal") && strstr(err.msg, "layers.*.mlp.up_proj"),
          "message must name the key and the style: %s", err.msg);
    CHECK(tp_style_parse("moe_tp_experts", "layers.*.mlp.experts", &s, &err) < 0, "MoE style accepted");
    CHECK(strstr(err.msg, "moe_tp_experts") && strstr(err.msg, "not support"), "%s", err.msg);
}

static void test_parse_and_prefix(void)
{
    const char *json = "{\"layers.*.mlp.up_proj\": \"colwise\", \"model.layers.*.mlp.down_proj\": "
                       "\"local_rowwise\", \"lm_head\": \"colwise_rep\", \"layers.0.mlp.up_proj\": "
                       "\"replicate\", \"model.norm.weight\": \"replicate\"}";
    tp_plan p;
    tp_err err = {{0}};
    CHECK(tp_plan_parse(json, strlen(json), "plan.json", false, &p, &err) == 0, "%s", err.msg);
    CHECK(p.n == 5, "5 entries, got %zu", p.n);
    CHECK(!strcmp(style_of(&p, "model.layers.3.mlp.up_proj.weight"), "colwise"), "bare key gets model.");
    CHECK(!strcmp(style_of(&p, "model.layers.3.mlp.down_proj.weight"), "rowwise"), "model. key kept");
    CHECK(!strcmp(style_of(&p, "lm_head.weight"), "colwise_gather_output"), "lm_head stays top level");
    /* a concrete layer key wins over the wildcard */
    CHECK(!strcmp(style_of(&p, "model.layers.0.mlp.up_proj.weight"), "replicate"), "concrete key");
    CHECK(!strcmp(style_of(&p, "model.layers.10.mlp.up_proj.weight"), "colwise"), "layer 10 is not 0");
    /* a parameter key matches itself */
    CHECK(!strcmp(style_of(&p, "model.norm.weight"), "replicate"), "parameter key");
    tp_plan_free(&p);

    /* base_prefixed: every key gets "model." (config.json's base_model_tp_plan) */
    const char *base = "{\"layers.*.self_attn.q_proj\": \"colwise\"}";
    CHECK(tp_plan_parse(base, strlen(base), "cfg", true, &p, &err) == 0, "%s", err.msg);
    CHECK(p.n == 1 && !strcmp(p.patterns[0], "model.layers.*.self_attn.q_proj"), "prefixed: %s",
          p.n ? p.patterns[0] : "");
    tp_plan_free(&p);

    static const char *bad[] = {
        "[1, 2]", "{\"layers.*.q\": 3}", "{\"layers.*.q\": \"sideways\"}", "{\"\": \"colwise\"}",
        "{\"a..b\": \"colwise\"}", "{\"a b\": \"colwise\"}", "{not json",
        "{\"layers.*.q\": \"colwise\", \"model.layers.*.q\": \"rowwise\"}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err.msg[0] = 0;
        CHECK(tp_plan_parse(bad[i], strlen(bad[i]), "bad.json", false, &p, &err) < 0, "accepted %s", bad[i]);
        CHECK(strstr(err.msg, "bad.json") != NULL, "message must name the file: %s", err.msg);
    }
    const char *unk = "{\"layers.*.mlp.up_proj\": \"sideways\"}";
    CHECK(tp_plan_parse(unk, strlen(unk), "bad.json", false, &p, &err) < 0, "unknown style");
    CHECK(strstr(err.msg, "sideways") && strstr(err.msg, "layers.*.mlp.up_proj"), "%s", err.msg);

    /* round trip through JSON */
    CHECK(tp_plan_builtin("qwen3", &p, &err) == 0, "%s", err.msg);
    char *j = tp_plan_to_json(&p);
    tp_plan q;
    CHECK(j && tp_plan_parse(j, strlen(j), "rt", false, &q, &err) == 0, "%s", err.msg);
    CHECK(q.n == p.n, "round trip %zu vs %zu", q.n, p.n);
    for (size_t i = 0; i < p.n && i < q.n; i++)
        CHECK(!strcmp(p.patterns[i], q.patterns[i]) && p.styles[i] == q.styles[i], "entry %zu", i);
    free(j);
    tp_plan_free(&q);
    tp_plan_free(&p);
}

static char *write_tmp(const char *text)
{
    char *path = strdup("/tmp/test_plan_XXXXXX");
    int fd = mkstemp(path);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text)) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
    close(fd);
    return path;
}

static void test_resolve(void)
{
    tp_plan p;
    tp_err err = {{0}};
    const char *plain = "{\"model_type\": \"llama\"}";
    CHECK(tp_plan_resolve(plain, strlen(plain), NULL, false, &p, &err) == 0, "%s", err.msg);
    CHECK(strstr(p.source, "built-in"), "source %s", p.source);
    CHECK(!strcmp(style_of(&p, "model.layers.0.mlp.down_proj.weight"), "rowwise"), "built-in down");
    CHECK(!strcmp(style_of(&p, "model.embed_tokens.weight"), "-"), "embedding replicated by default");
    tp_plan_free(&p);

    CHECK(tp_plan_resolve(plain, strlen(plain), NULL, true, &p, &err) == 0, "%s", err.msg);
    CHECK(!strcmp(style_of(&p, "model.embed_tokens.weight"), "vocab"), "--vocab-parallel embedding");
    tp_plan_free(&p);

    /* config.json's base_model_tp_plan replaces the built-in base plan; the
     * ForCausalLM lm_head entry stays */
    const char *cfg = "{\"model_type\": \"qwen3\", \"base_model_tp_plan\": "
                      "{\"layers.*.mlp.down_proj\": \"replicate\", \"layers.*.self_attn.q_proj\": \"colwise\"}}";
    CHECK(tp_plan_resolve(cfg, strlen(cfg), NULL, false, &p, &err) == 0, "%s", err.msg);
    CHECK(!strcmp(style_of(&p, "model.layers.1.mlp.down_proj.weight"), "replicate"), "config plan");
    CHECK(!strcmp(style_of(&p, "model.layers.1.mlp.up_proj.weight"), "-"), "built-in entries gone");
    CHECK(!strcmp(style_of(&p, "lm_head.weight"), "colwise_gather_output"), "lm_head kept");
    CHECK(strstr(p.source, "base_model_tp_plan"), "source %s", p.source);
    tp_plan_free(&p);

    /* --plan replaces both */
    char *plan = write_tmp("{\"layers.*.mlp.up_proj\": \"local_colwise\", \"lm_head\": \"replicate\"}");
    CHECK(tp_plan_resolve(cfg, strlen(cfg), plan, false, &p, &err) == 0, "%s", err.msg);
    CHECK(!strcmp(style_of(&p, "model.layers.1.mlp.up_proj.weight"), "colwise"), "--plan entry");
    CHECK(!strcmp(style_of(&p, "model.layers.1.mlp.down_proj.weight"), "-"), "config plan overridden");
    CHECK(!strcmp(style_of(&p, "lm_head.weight"), "replicate"), "--plan lm_head");
    CHECK(p.n == 2, "only the file's entries, got %zu", p.n);
    tp_plan_free(&p);

    /* unknown model type: refused with the way out; with --plan accepted */
    const char *gpt = "{\"model_type\": \"gpt2\"}";
    CHECK(tp_plan_resolve(gpt, strlen(gpt), NULL, false, &p, &err) < 0, "gpt2 accepted");
    CHECK(strstr(err.msg, "gpt2") && strstr(err.msg, "--plan") && strstr(err.msg, "colwise"),
          "message must say how to give a plan: %s", err.msg);
    CHECK(tp_plan_resolve(gpt, strlen(gpt), plan, false, &p, &err) == 0, "%s", err.msg);
    tp_plan_free(&p);
    unlink(plan);
    free(plan);

    char *badplan = write_tmp("{\"layers.*.mlp.up_proj\": \"zigzag\"}");
    CHECK(tp_plan_resolve(plain, strlen(plain), badplan, false, &p, &err) < 0, "bad --plan accepted");
    CHECK(strstr(err.msg, badplan) && strstr(err.msg, "zigzag") && strstr(err.msg, "layers.*.mlp.up_proj"),
          "%s", err.msg);
    unlink(badplan);
    free(badplan);
    CHECK(tp_plan_resolve(plain, strlen(plain), "/nonexistent/plan.json", false, &p, &err) < 0, "missing file");
    CHECK(strstr(err.msg, "/nonexistent/plan.json"), "%s", err.msg);

    const char *badcfg = "{\"model_type\": \"llama\", \"base_model_tp_plan\": {\"layers.*.x\": \"sideways\"}}";
    CHECK(tp_plan_resolve(badcfg, strlen(badcfg), NULL, false, &p, &err) < 0, "bad config plan");
    CHECK(strstr(err.msg, "sideways"), "%s", err.msg);
    const char *nomt = "{\"hidden_size\": 4}";
    CHECK(tp_plan_resolve(nomt, strlen(nomt), NULL, false, &p, &err) < 0, "no model_type");
}

int main(void)
{
    test_wildcard();
    test_builtin();
    test_aliases();
    test_parse_and_prefix();
    test_resolve();
    return check_finish("test_plan");
}
