/* test_synth.c - convert/synth.c: the synthetic model directories that the
 * demo, the e2e tests and the benchmark use.  Checks what a converter relies
 * on: real HF tensor names and shapes for each architecture, a config.json
 * that the converter's own parser reads back to the same sizes, values with
 * the intended statistics, byte-identical output for a seed whatever the
 * thread count, sharding with a valid index, the tokenizer copy, and that bad
 * requests leave nothing behind. */
#include "convert.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <dirent.h>
#include "check.h"

static const char *tmp_root; /* check_tmpdir(), set first thing in main */

static char *tmp_path(const char *name)
{
    return tp_path_join(tmp_root, name);
}

static tp_synth_opts tiny(const char *arch)
{
    tp_synth_opts o = {0};
    tp_err err;
    if (tp_synth_preset(&o, "tiny", &err)) {
        fprintf(stderr, "preset tiny: %s\n", err.msg);
        exit(1);
    }
    o.arch = arch;
    o.seed = 7;
    o.quiet = true;
    return o;
}

static void expect_tensor(const tp_st_set *s, const char *name, uint64_t d0, uint64_t d1)
{
    const tp_st_tensor *t = tp_st_set_find(s, name);
    CHECK(t != NULL, "tensor %s missing", name);
    if (!t)
        return;
    CHECK(t->dtype == TP_BF16, "%s: dtype %d", name, t->dtype);
    int ndim = d1 ? 2 : 1;
    CHECK(t->ndim == ndim, "%s: ndim %d, want %d", name, t->ndim, ndim);
    CHECK(t->shape[0] == d0, "%s: dim0 %llu, want %llu", name, (unsigned long long)t->shape[0],
          (unsigned long long)d0);
    if (d1)
        CHECK(t->shape[1] == d1, "%s: dim1 %llu, want %llu", name,
              (unsigned long long)t->shape[1], (unsigned long long)d1);
}

static void stats(const tp_st_tensor *t, double *mean, double *std)
{
    size_t n = t->nbytes / 2;
    double s = 0, s2 = 0;
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, t->data + 2 * i, 2);
        double v = tp_bf16_to_f32(h);
        s += v;
        s2 += v * v;
    }
    *mean = s / n;
    *std = sqrt(s2 / n - *mean * *mean);
}

/* Names, shapes and config of one architecture. */
static void test_arch(const char *arch, bool tie)
{
    tp_synth_opts o = tiny(arch);
    o.tie = tie;
    o.head_dim = !strcmp(arch, "qwen2") ? 16 : 32;   /* qwen2: hidden / heads */
    char name[64];
    snprintf(name, sizeof name, "%s-%d", arch, tie);
    char *dir = tmp_path(name);
    tp_err err = {{0}};
    int rc = tp_synth_write(dir, &o, &err);
    CHECK(rc == 0, "%s: %s", name, err.msg);
    if (rc) {
        free(dir);
        return;
    }
    tp_st_set s = {0};
    rc = tp_st_set_open(&s, dir, &err);
    CHECK(rc == 0, "%s: open: %s", name, err.msg);
    if (rc == 0) {
        bool qwen3 = !strcmp(arch, "qwen3"), qwen2 = !strcmp(arch, "qwen2");
        uint64_t H = 64, Q = 4 * o.head_dim, KV = 2 * o.head_dim, I = 128, V = 512;
        size_t want = 2 + (tie ? 0 : 1) + 2 * (9 + (qwen3 ? 2 : 0) + (qwen2 ? 3 : 0));
        CHECK(s.n_tensors == want, "%s: %zu tensors, want %zu", name, s.n_tensors, want);
        expect_tensor(&s, "model.embed_tokens.weight", V, H);
        expect_tensor(&s, "model.norm.weight", H, 0);
        if (tie)
            CHECK(!tp_st_set_find(&s, "lm_head.weight"), "%s: lm_head present though tied", name);
        else
            expect_tensor(&s, "lm_head.weight", V, H);
        for (int l = 0; l < 2; l++) {
            char n[128];
#define T(suffix, d0, d1) \
    (snprintf(n, sizeof n, "model.layers.%d.%s", l, suffix), expect_tensor(&s, n, d0, d1))
            T("input_layernorm.weight", H, 0);
            T("post_attention_layernorm.weight", H, 0);
            T("self_attn.q_proj.weight", Q, H);
            T("self_attn.k_proj.weight", KV, H);
            T("self_attn.v_proj.weight", KV, H);
            T("self_attn.o_proj.weight", H, Q);
            T("mlp.gate_proj.weight", I, H);
            T("mlp.up_proj.weight", I, H);
            T("mlp.down_proj.weight", H, I);
            if (qwen3) {
                T("self_attn.q_norm.weight", (uint64_t)o.head_dim, 0);
                T("self_attn.k_norm.weight", (uint64_t)o.head_dim, 0);
            }
            if (qwen2) {
                T("self_attn.q_proj.bias", Q, 0);
                T("self_attn.k_proj.bias", KV, 0);
                T("self_attn.v_proj.bias", KV, 0);
            }
#undef T
        }
        /* Values: weights N(0, 0.02^2), norms 1 + N(0, 0.02^2). */
        double mean, std;
        stats(tp_st_set_find(&s, "model.embed_tokens.weight"), &mean, &std);
        CHECK(fabs(mean) < 0.002 && fabs(std - 0.02) < 0.002, "%s: embed mean %g std %g", name,
              mean, std);
        stats(tp_st_set_find(&s, "model.norm.weight"), &mean, &std);
        CHECK(fabs(mean - 1) < 0.01 && std > 0.01 && std < 0.03, "%s: norm mean %g std %g", name,
              mean, std);
        tp_st_set_close(&s);
    }
    /* config.json as the converter reads it. */
    char *cfg_path = tp_path_join(dir, "config.json"), *cfg;
    size_t len;
    rc = tp_read_file(cfg_path, 1 << 20, &cfg, &len, &err);
    CHECK(rc == 0, "%s: %s", name, err.msg);
    if (rc == 0) {
        tp_model_info mi;
        rc = tp_model_info_parse(cfg, len, cfg_path, &mi, &err);
        CHECK(rc == 0, "%s: %s", name, err.msg);
        if (rc == 0) {
            CHECK(!strcmp(mi.model_type, arch), "%s: model_type %s", name, mi.model_type);
            CHECK(mi.hidden == 64 && mi.n_layers == 2 && mi.n_heads == 4 && mi.n_kv_heads == 2 &&
                      mi.head_dim == o.head_dim && mi.intermediate == 128 && mi.vocab == 512 &&
                      mi.tie_word_embeddings == tie,
                  "%s: config sizes read back differ", name);
        }
        free(cfg);
    }
    free(cfg_path);
    char *gen = tp_path_join(dir, "generation_config.json");
    CHECK(access(gen, F_OK) == 0, "%s: no generation_config.json", name);
    free(gen);
    free(dir);
}

/* Every architecture, mixture-of-experts included: the tensors written are
 * the ones convert/arch.c's table says the config.json written beside them
 * needs (the runnable check tpconvert and tprun use accepts them: none
 * missing, none extra, every shape right), with the Hub's expert names, and
 * tp_synth_param_count counts exactly them. */
static void test_table_archs(void)
{
    const char *archs[] = {"qwen3", "qwen2", "llama", "mistral", "qwen3_moe", "mixtral"};
    for (size_t i = 0; i < sizeof archs / sizeof archs[0]; i++) {
        tp_synth_opts o = tiny(archs[i]);
        o.tie = i % 2;
        o.experts = 4;
        if (!strcmp(archs[i], "qwen2"))
            o.head_dim = 16;
        char name[64];
        snprintf(name, sizeof name, "table-%s", archs[i]);
        char *dir = tmp_path(name), *cfg_path = tp_path_join(dir, "config.json"), *cfg = NULL;
        tp_err err = {{0}};
        tp_st_set s = {0};
        size_t len;
        tp_model_config c;
        int rc = tp_synth_write(dir, &o, &err);
        if (rc == 0)
            rc = tp_st_set_open(&s, dir, &err);
        if (rc == 0)
            rc = tp_read_file(cfg_path, 1 << 20, &cfg, &len, &err);
        if (rc == 0)
            rc = tp_config_parse(&c, cfg, len, cfg_path, &err);
        CHECK(rc == 0, "%s: %s", name, err.msg);
        if (rc == 0) {
            tp_tensor_ref *refs = calloc(s.n_tensors, sizeof *refs);
            uint64_t params = 0;
            for (size_t t = 0; t < s.n_tensors; t++) {
                refs[t] = (tp_tensor_ref){s.tensors[t]->name, s.tensors[t]->ndim, s.tensors[t]->shape,
                                          s.tensors[t]->dtype};
                params += s.tensors[t]->nbytes / 2;
            }
            CHECK(tp_arch_check_tensors(&c, refs, s.n_tensors, &err) == 0, "%s: %s", name, err.msg);
            CHECK(params == tp_synth_param_count(&o), "%s: %llu parameters written, count says %llu", name,
                  (unsigned long long)params, (unsigned long long)tp_synth_param_count(&o));
            free(refs);
            if (!strcmp(archs[i], "qwen3_moe"))
                expect_tensor(&s, "model.layers.1.mlp.experts.3.down_proj.weight", 64, 32);
            if (!strcmp(archs[i], "mixtral"))
                expect_tensor(&s, "model.layers.1.block_sparse_moe.experts.3.w3.weight", 128, 64);
        }
        tp_st_set_close(&s);
        free(cfg), free(cfg_path), free(dir);
    }
}

static bool files_equal(const char *a, const char *b)
{
    char *x, *y;
    size_t nx, ny;
    tp_err err;
    if (tp_read_file(a, 1 << 30, &x, &nx, &err) || tp_read_file(b, 1 << 30, &y, &ny, &err))
        return false;
    bool eq = nx == ny && !memcmp(x, y, nx);
    free(x);
    free(y);
    return eq;
}

/* Same seed: same bytes for 1 or 2 threads; another seed: other bytes.
 * Uses a model larger than one 1 MiB block so that blocks run in parallel. */
static void test_determinism(void)
{
    tp_synth_opts o = tiny("qwen3");
    o.vocab = 20000;   /* embedding 2.5 MB: three blocks */
    char *d1 = tmp_path("det1"), *d2 = tmp_path("det2"), *d3 = tmp_path("det3");
    tp_err err = {{0}};
    o.threads = 1;
    CHECK(tp_synth_write(d1, &o, &err) == 0, "det1: %s", err.msg);
    o.threads = 2;
    CHECK(tp_synth_write(d2, &o, &err) == 0, "det2: %s", err.msg);
    o.seed = 8;
    CHECK(tp_synth_write(d3, &o, &err) == 0, "det3: %s", err.msg);
    char *f1 = tp_path_join(d1, "model.safetensors"), *f2 = tp_path_join(d2, "model.safetensors"),
         *f3 = tp_path_join(d3, "model.safetensors");
    CHECK(files_equal(f1, f2), "seed 7 differs between 1 and 2 threads");
    CHECK(!files_equal(f1, f3), "seeds 7 and 8 gave the same bytes");
    CHECK(tp_synth_param_count(&o) == 20000ull * 64 + 2 * (64 * 64 * 2 + 2 * 32 * 64 + 3 * 128 * 64 +
                                                             2 * 64 + 2 * 16) + 64,
          "param count %llu", (unsigned long long)tp_synth_param_count(&o));
    free(f1), free(f2), free(f3), free(d1), free(d2), free(d3);
}

static void test_sharded(void)
{
    tp_synth_opts o = tiny("llama");
    o.tie = false;
    o.shard_size = 40000;   /* embed (64 KiB) alone in a file, the rest grouped */
    char *dir = tmp_path("sharded");
    tp_err err = {{0}};
    int rc = tp_synth_write(dir, &o, &err);
    CHECK(rc == 0, "sharded: %s", err.msg);
    tp_st_set s = {0};
    if (rc == 0) {
        rc = tp_st_set_open(&s, dir, &err);
        CHECK(rc == 0, "sharded: open: %s", err.msg);
    }
    if (rc == 0) {
        CHECK(s.n_files > 2, "sharded: %zu files", s.n_files);
        CHECK(s.n_tensors == 21, "sharded: %zu tensors", s.n_tensors);
        for (size_t f = 0; f < s.n_files; f++)
            CHECK(strstr(s.file_names[f], "-of-") != NULL, "file name %s", s.file_names[f]);
        tp_st_set_close(&s);
    }
    char *single = tp_path_join(dir, "model.safetensors");
    CHECK(access(single, F_OK) != 0, "sharded: model.safetensors written too");
    free(single);
    free(dir);
}

static void test_tokenizer(void)
{
    /* A tokenizer.json compressed with zstd, and its tokenizer_config.json. */
    const char *src = "tests/data/qwen3-tokenizer/tokenizer.json.zst";
    if (access(src, F_OK) != 0) {
        CHECK(0, "%s missing (run from the repository root)", src);
        return;
    }
    tp_synth_opts o = tiny("qwen3");
    o.tokenizer_path = src;
    char *dir = tmp_path("tok");
    tp_err err = {{0}};
    CHECK(tp_synth_write(dir, &o, &err) == 0, "tok: %s", err.msg);
    char *tj = tp_path_join(dir, "tokenizer.json"), *text;
    size_t len;
    if (tp_read_file(tj, 64 << 20, &text, &len, &err) == 0) {
        CHECK(len > 1000000 && strstr(text, "\"<|im_end|>\"") != NULL,
              "tokenizer.json: %zu bytes, no <|im_end|>", len);
        free(text);
    } else {
        CHECK(0, "tokenizer.json: %s", err.msg);
    }
    char *tc = tp_path_join(dir, "tokenizer_config.json");
    CHECK(files_equal(tc, "tests/data/qwen3-tokenizer/tokenizer_config.json"),
          "tokenizer_config.json not copied");
    free(tj), free(tc), free(dir);

    /* Not a tokenizer: refused before anything is written. */
    char *bad = tmp_path("bad.json");
    tp_write_file_atomic(bad, "{\"a\": 1}", 8, &err);
    o.tokenizer_path = bad;
    dir = tmp_path("tok-bad");
    err.msg[0] = 0;
    CHECK(tp_synth_write(dir, &o, &err) == -1, "bad tokenizer accepted");
    CHECK(strstr(err.msg, "bad.json") != NULL, "message does not name the file: %s", err.msg);
    CHECK(access(dir, F_OK) != 0, "directory left behind after a refused tokenizer");
    free(bad), free(dir);
}

static void test_refusals(void)
{
    tp_err err = {{0}};
    tp_synth_opts o = tiny("qwen3");
    /* A non-empty directory is never written into. */
    char *dir = tmp_path("full");
    mkdir(dir, 0755);
    char *keep = tp_path_join(dir, "keep.txt");
    tp_write_file_atomic(keep, "x", 1, &err);
    CHECK(tp_synth_write(dir, &o, &err) == -1 && strstr(err.msg, "not empty"), "non-empty: %s",
          err.msg);
    char *cfg = tp_path_join(dir, "config.json");
    CHECK(access(cfg, F_OK) != 0 && access(keep, F_OK) == 0, "non-empty dir was touched");
    free(cfg), free(keep), free(dir);

    tp_synth_opts b = o;
    b.arch = "gpt2";
    dir = tmp_path("r1");
    CHECK(tp_synth_write(dir, &b, &err) == -1 && strstr(err.msg, "--arch gpt2"), "arch: %s", err.msg);
    CHECK(access(dir, F_OK) != 0, "r1 created");
    b = o;
    b.heads = 3;
    CHECK(tp_synth_write(dir, &b, &err) == -1 && strstr(err.msg, "--heads"), "heads: %s", err.msg);
    b = o;
    b.hidden = 0;
    CHECK(tp_synth_write(dir, &b, &err) == -1 && strstr(err.msg, "--hidden"), "hidden: %s", err.msg);
    b = o;
    b.arch = "qwen2";
    b.head_dim = 32;   /* 4 * 32 != 64 */
    CHECK(tp_synth_write(dir, &b, &err) == -1 && strstr(err.msg, "qwen2"), "qwen2: %s", err.msg);
    CHECK(tp_synth_preset(&b, "nope", &err) == -1 && strstr(err.msg, "nope"), "preset: %s", err.msg);
    CHECK(access(dir, F_OK) != 0, "r1 created by a refused request");
    free(dir);
}

int main(void)
{
    tmp_root = check_tmpdir();
    const char *archs[] = {"qwen3", "qwen2", "llama", "mistral"};
    for (int i = 0; i < 4; i++) {
        test_arch(archs[i], true);
        test_arch(archs[i], false);
    }
    test_table_archs();
    test_determinism();
    test_sharded();
    test_tokenizer();
    test_refusals();
    return check_finish("test_synth");
}
