/* test_st_export.c - what tp_conversion_write puts on disk, checked slice by
 * slice against the source with an index computation of its own (element by
 * element, not the writer's run copy):
 *   - --format safetensors: one file per rank with the source names, local
 *     shapes, __metadata__ format/tp_rank/tp_size/conversion_id and tp_splits
 *     (dim, ranges, style, reduce_bias) equal to the cut; manifest checksum =
 *     XXH3 of the file;
 *   - tpshard (none and zstd): every tensor read back with tp_shard_read_tensor;
 *   - models: qwen3-tiny at tp 4 (kv heads replicated), llama-bias at tp 2
 *     (rowwise bias whole, reduce_bias), qwen2-tiny (two input files), and a
 *     synthetic model written here with a fused gate_up (packed_colwise: two
 *     ranges), an uneven vocabulary (10 rows over 4 ranks), an F32 tensor and
 *     --vocab-parallel.
 * Runs from the repository root (tests/run_tests.sh does). */
#include <cJSON.h>
#include <dirent.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "convert.h"
#include "check.h"

static const char *tmp_root; /* check_tmpdir(), set first thing in main */

/* Compares a rank's local tensor with the source, element by element: local
 * index i along the split dim is global start_k + (i - offset of range k). */
static void compare_local(const char *what, const tp_st_tensor *src, const tp_split *sp,
                          const uint64_t *local_shape, const uint8_t *local)
{
    const int nd = src->ndim;
    const size_t el = tp_dtype_size(src->dtype);
    uint64_t n = 1;
    for (int d = 0; d < nd; d++)
        n *= local_shape[d];
    uint64_t idx[TP_MAX_DIMS] = {0};
    for (uint64_t e = 0; e < n; e++) {
        /* idx = unravel(e, local_shape) */
        uint64_t rem = e;
        for (int d = nd - 1; d >= 0; d--) {
            idx[d] = rem % local_shape[d];
            rem /= local_shape[d];
        }
        uint64_t g = 0;
        for (int d = 0; d < nd; d++) {
            uint64_t gi = idx[d];
            if (sp->dim == d) {
                uint64_t off = 0;
                int k = 0;
                while (k < sp->n_ranges && gi >= off + (sp->end[k] - sp->start[k]))
                    off += sp->end[k] - sp->start[k], k++;
                if (k == sp->n_ranges) {
                    CHECK(0, "%s: local index %" PRIu64 " past the ranges", what, gi);
                    return;
                }
                gi = sp->start[k] + (gi - off);
            }
            g = g * src->shape[d] + gi;
        }
        if (memcmp(local + e * el, src->data + g * el, el)) {
            CHECK(0, "%s: element %" PRIu64 " (global %" PRIu64 ") differs", what, e, g);
            return;
        }
    }
}

static const char *meta(const tp_st_file *f, const char *key)
{
    for (size_t i = 0; i < f->n_meta; i++)
        if (!strcmp(f->meta_keys[i], key))
            return f->meta_values[i];
    return NULL;
}

static void check_split_json(const char *file, const cJSON *splits, const tp_cut *cut, int r)
{
    const cJSON *o = cJSON_GetObjectItemCaseSensitive(splits, cut->name);
    CHECK(cJSON_IsObject(o), "%s: tp_splits has no %s", file, cut->name);
    if (!cJSON_IsObject(o))
        return;
    const tp_split *sp = &cut->splits[r];
    const cJSON *dim = cJSON_GetObjectItemCaseSensitive(o, "dim");
    const cJSON *style = cJSON_GetObjectItemCaseSensitive(o, "style");
    const cJSON *rb = cJSON_GetObjectItemCaseSensitive(o, "reduce_bias");
    const cJSON *ranges = cJSON_GetObjectItemCaseSensitive(o, "ranges");
    CHECK(cJSON_IsNumber(dim) && dim->valueint == sp->dim, "%s: %s dim", file, cut->name);
    CHECK(cJSON_IsString(style) && !strcmp(style->valuestring, tp_style_name(cut->style)),
          "%s: %s style", file, cut->name);
    CHECK(cJSON_IsBool(rb) && cJSON_IsTrue(rb) == cut->reduce_bias, "%s: %s reduce_bias", file, cut->name);
    int want = sp->dim >= 0 ? sp->n_ranges : 0;
    CHECK(cJSON_IsArray(ranges) && cJSON_GetArraySize(ranges) == want, "%s: %s ranges", file, cut->name);
    for (int k = 0; k < want && cJSON_IsArray(ranges); k++) {
        const cJSON *p = cJSON_GetArrayItem(ranges, k);
        CHECK(cJSON_GetArrayItem(p, 0) && cJSON_GetArrayItem(p, 1) &&
              (uint64_t)cJSON_GetArrayItem(p, 0)->valuedouble == sp->start[k] &&
              (uint64_t)cJSON_GetArrayItem(p, 1)->valuedouble == sp->end[k],
              "%s: %s range %d", file, cut->name, k);
    }
}

static int convert(const char *model, int tp, const char *plan, bool vp, tp_out_format fmt,
                   tp_codec codec, const char *out, tp_conversion *c)
{
    tp_err err = {{0}};
    if (tp_conversion_prepare(c, model, tp, plan, vp, &err) < 0) {
        CHECK(0, "prepare %s tp %d: %s", model, tp, err.msg);
        return -1;
    }
    tp_write_opts o = {.format = fmt, .codec = codec, .level = 3, .chunk_size = 4096, .threads = 2,
                       .quiet = true};
    if (tp_conversion_write(c, out, &o, NULL, &err) < 0) {
        CHECK(0, "write %s tp %d: %s", model, tp, err.msg);
        tp_conversion_free(c);
        return -1;
    }
    return 0;
}

static void check_manifest(const char *out, const tp_conversion *c, const char *format)
{
    tp_manifest m;
    tp_err err = {{0}};
    if (tp_manifest_read(out, &m, &err) < 0) {
        CHECK(0, "%s: manifest: %s", out, err.msg);
        return;
    }
    CHECK(!strcmp(m.format, format) && m.tp == c->tp && m.vocab_parallel == c->vocab_parallel,
          "%s: manifest format %s tp %d vp %d", out, m.format, m.tp, m.vocab_parallel);
    CHECK(!strcmp(m.model_type, c->model.model_type), "%s: model_type", out);
    bool has_cfg = false;
    for (size_t i = 0; i < m.n_files; i++)
        has_cfg |= !strcmp(m.files[i].name, "config.json");
    CHECK(has_cfg, "%s: config.json not in files", out);
    CHECK(m.plan_json && strstr(m.plan_json, "lm_head"), "%s: plan_json", out);
    /* the manifest embeds config.json as an object: compare as JSON */
    cJSON *a = m.config_json ? cJSON_Parse(m.config_json) : NULL;
    cJSON *b = cJSON_ParseWithLength(c->config_json, c->config_len);
    CHECK(a && b && cJSON_Compare(a, b, true), "%s: config_json differs", out);
    cJSON_Delete(a);
    cJSON_Delete(b);
    for (int r = 0; r < m.tp; r++) {
        CHECK(m.ranks[r].n_tensors == c->n_cuts, "%s: rank %d tensors", out, r);
        if (!strcmp(format, "safetensors")) {
            char *p = tp_path_join(out, m.ranks[r].file);
            tp_mmap mm;
            if (tp_mmap_open(&mm, p, &err) == 0) {
                CHECK(tp_xxh3(mm.data, mm.size) == m.ranks[r].checksum && mm.size == m.ranks[r].size,
                      "%s: rank %d checksum/size", out, r);
                tp_mmap_close(&mm);
            } else {
                CHECK(0, "%s", err.msg);
            }
            free(p);
        }
    }
    tp_manifest_free(&m);
}

static void check_safetensors(const char *model, int tp, const char *plan, bool vp)
{
    char out[512];
    snprintf(out, sizeof out, "%s/st-%s-%d", tmp_root, strrchr(model, '/') + 1, tp);
    tp_conversion c;
    if (convert(model, tp, plan, vp, TP_OUT_SAFETENSORS, TP_CODEC_NONE, out, &c) < 0)
        return;
    tp_err err = {{0}};
    char conv_id[64] = "";
    for (int r = 0; r < tp; r++) {
        char name[64];
        tp_rank_file_name(name, sizeof name, r, tp, ".safetensors");
        char *path = tp_path_join(out, name);
        tp_st_file f;
        if (tp_st_open(&f, path, &err) < 0) {
            CHECK(0, "%s", err.msg);
            free(path);
            continue;
        }
        char rs[16], ts[16];
        snprintf(rs, sizeof rs, "%d", r);
        snprintf(ts, sizeof ts, "%d", tp);
        CHECK(meta(&f, "format") && !strcmp(meta(&f, "format"), "pt"), "%s: format", path);
        CHECK(meta(&f, "tp_rank") && !strcmp(meta(&f, "tp_rank"), rs), "%s: tp_rank", path);
        CHECK(meta(&f, "tp_size") && !strcmp(meta(&f, "tp_size"), ts), "%s: tp_size", path);
        const char *id = meta(&f, "conversion_id");
        CHECK(id && strlen(id) == 32, "%s: conversion_id", path);
        if (id && r == 0)
            snprintf(conv_id, sizeof conv_id, "%s", id);
        else if (id)
            CHECK(!strcmp(id, conv_id), "%s: conversion_id differs from rank 0", path);
        cJSON *splits = meta(&f, "tp_splits") ? cJSON_Parse(meta(&f, "tp_splits")) : NULL;
        CHECK(cJSON_IsObject(splits), "%s: tp_splits is not a JSON object", path);
        CHECK(f.n_tensors == c.n_cuts, "%s: %zu tensors, want %zu", path, f.n_tensors, c.n_cuts);
        for (size_t i = 0; i < c.n_cuts; i++) {
            const tp_cut *cut = &c.cuts[i];
            const tp_st_tensor *t = tp_st_find(&f, cut->name);
            CHECK(t != NULL, "%s: no tensor %s", path, cut->name);
            if (!t)
                continue;
            const uint64_t *ls = &cut->local_shapes[(size_t)r * TP_MAX_DIMS];
            CHECK(t->dtype == cut->dtype && t->ndim == cut->ndim &&
                  !memcmp(t->shape, ls, sizeof(uint64_t) * (size_t)t->ndim),
                  "%s: %s local shape", path, cut->name);
            if (splits)
                check_split_json(path, splits, cut, r);
            char what[400];
            snprintf(what, sizeof what, "%s: %s", path, cut->name);
            compare_local(what, cut->src, &cut->splits[r], ls, t->data);
        }
        cJSON_Delete(splits);
        tp_st_close(&f);
        free(path);
    }
    check_manifest(out, &c, "safetensors");
    tp_conversion_free(&c);
}

static void check_tpshard(const char *model, int tp, const char *plan, bool vp, tp_codec codec)
{
    char out[512];
    snprintf(out, sizeof out, "%s/ts-%s-%d-%s", tmp_root, strrchr(model, '/') + 1, tp,
             tp_codec_name(codec));
    tp_conversion c;
    if (convert(model, tp, plan, vp, TP_OUT_TPSHARD, codec, out, &c) < 0)
        return;
    tp_err err = {{0}};
    for (int r = 0; r < tp; r++) {
        char name[64];
        tp_rank_file_name(name, sizeof name, r, tp, ".tpshard");
        char *path = tp_path_join(out, name);
        tp_shard_reader rd;
        if (tp_shard_open(&rd, path, &err) < 0) {
            CHECK(0, "%s", err.msg);
            free(path);
            continue;
        }
        CHECK(rd.index.rank == r && rd.index.tp == tp, "%s: rank/tp in the header", path);
        CHECK(rd.index.n_tensors == c.n_cuts, "%s: tensors", path);
        for (size_t i = 0; i < c.n_cuts; i++) {
            const tp_cut *cut = &c.cuts[i];
            const tp_shard_tensor *t = tp_shard_find(&rd.index, cut->name);
            CHECK(t != NULL, "%s: no tensor %s", path, cut->name);
            if (!t)
                continue;
            const uint64_t *ls = &cut->local_shapes[(size_t)r * TP_MAX_DIMS];
            const tp_split *sp = &cut->splits[r];
            CHECK(t->split.dim == sp->dim && (sp->dim < 0 || (t->split.n_ranges == sp->n_ranges &&
                  !memcmp(t->split.start, sp->start, sizeof(uint64_t) * (size_t)sp->n_ranges) &&
                  !memcmp(t->split.end, sp->end, sizeof(uint64_t) * (size_t)sp->n_ranges))),
                  "%s: %s split", path, cut->name);
            CHECK(t->reduce_bias == cut->reduce_bias && t->style && !strcmp(t->style, tp_style_name(cut->style)),
                  "%s: %s style/reduce_bias", path, cut->name);
            CHECK(!memcmp(t->shape, ls, sizeof(uint64_t) * (size_t)t->ndim) &&
                  !memcmp(t->global_shape, cut->global_shape, sizeof(uint64_t) * (size_t)t->ndim),
                  "%s: %s shapes", path, cut->name);
            uint8_t *buf = malloc(t->raw_size ? t->raw_size : 1);
            if (tp_shard_read_tensor(&rd, t, buf, NULL, true, &err) < 0) {
                CHECK(0, "%s", err.msg);
            } else {
                char what[400];
                snprintf(what, sizeof what, "%s: %s", path, cut->name);
                compare_local(what, cut->src, sp, ls, buf);
            }
            free(buf);
        }
        tp_shard_close(&rd);
        free(path);
    }
    check_manifest(out, &c, "tpshard");
    tp_conversion_free(&c);
}

/* ---------------------------------------------------- a packed model */

typedef struct synth_t {
    const char *name;
    tp_dtype dt;
    int ndim;
    uint64_t d0, d1;
} synth_t;

static const synth_t synth_tensors[] = {
    {"model.embed_tokens.weight", TP_BF16, 2, 10, 8},
    {"lm_head.weight", TP_BF16, 2, 10, 8},
    {"model.norm.weight", TP_BF16, 1, 8, 0},
    {"model.layers.0.input_layernorm.weight", TP_F32, 1, 8, 0},
    {"model.layers.0.post_attention_layernorm.weight", TP_BF16, 1, 8, 0},
    {"model.layers.0.self_attn.q_proj.weight", TP_BF16, 2, 8, 8},
    {"model.layers.0.self_attn.k_proj.weight", TP_BF16, 2, 4, 8},
    {"model.layers.0.self_attn.v_proj.weight", TP_BF16, 2, 4, 8},
    {"model.layers.0.self_attn.v_proj.bias", TP_BF16, 1, 4, 0},
    {"model.layers.0.self_attn.o_proj.weight", TP_BF16, 2, 8, 8},
    {"model.layers.0.mlp.gate_up_proj.weight", TP_BF16, 2, 16, 8},
    {"model.layers.0.mlp.gate_up_proj.bias", TP_BF16, 1, 16, 0},
    {"model.layers.0.mlp.down_proj.weight", TP_BF16, 2, 8, 8},
    {"model.layers.0.mlp.down_proj.bias", TP_BF16, 1, 8, 0},
};
#define N_SYNTH (sizeof synth_tensors / sizeof synth_tensors[0])

/* Every element a different value, so a misplaced one shows. */
static int synth_fill(size_t i, uint8_t *dst, size_t nbytes, void *arg, tp_err *err)
{
    for (size_t b = 0; b < nbytes; b++)
        dst[b] = (uint8_t)((i * 131 + b * 7 + b / 256) & 0xff);
    return 0;
}

static const char *write_packed_model(char *plan_path, size_t cap)
{
    static char dir[512];
    snprintf(dir, sizeof dir, "%s/packed-model", tmp_root);
    mkdir(dir, 0755);
    tp_err err = {{0}};
    const char *cfg = "{\"model_type\": \"llama\", \"hidden_size\": 8, \"num_attention_heads\": 4, "
                      "\"num_key_value_heads\": 2, \"head_dim\": 2, \"intermediate_size\": 8, "
                      "\"vocab_size\": 10, \"num_hidden_layers\": 1, \"tie_word_embeddings\": false}";
    char *p = tp_path_join(dir, "config.json");
    CHECK(tp_write_file_atomic(p, cfg, strlen(cfg), &err) == 0, "%s", err.msg);
    free(p);
    tp_st_out_tensor ts[N_SYNTH];
    for (size_t i = 0; i < N_SYNTH; i++) {
        memset(&ts[i], 0, sizeof ts[i]);
        ts[i].name = synth_tensors[i].name;
        ts[i].dtype = synth_tensors[i].dt;
        ts[i].ndim = synth_tensors[i].ndim;
        ts[i].shape[0] = synth_tensors[i].d0;
        ts[i].shape[1] = synth_tensors[i].d1;
    }
    p = tp_path_join(dir, "model.safetensors");
    CHECK(tp_st_write(p, ts, N_SYNTH, NULL, synth_fill, NULL, &err) == 0, "%s", err.msg);
    free(p);
    snprintf(plan_path, cap, "%s/packed-plan.json", tmp_root);
    const char *plan = "{\"layers.*.self_attn.q_proj\": \"colwise\", \"layers.*.self_attn.k_proj\": "
                       "\"colwise\", \"layers.*.self_attn.v_proj\": \"colwise\", "
                       "\"layers.*.self_attn.o_proj\": \"rowwise\", \"layers.*.mlp.gate_up_proj\": "
                       "\"packed_colwise\", \"layers.*.mlp.down_proj\": \"rowwise\", "
                       "\"lm_head\": \"colwise_rep\"}";
    CHECK(tp_write_file_atomic(plan_path, plan, strlen(plan), &err) == 0, "%s", err.msg);
    return dir;
}

static bool dir_empty(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return false;
    struct dirent *e;
    bool empty = true;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            empty = false;
    closedir(d);
    return empty;
}

/* A cancel request (what tpconvert's SIGINT handler sets) fails the write
 * and leaves nothing: the directory is removed when the write created it,
 * emptied again when it existed. */
static void check_cancel(void)
{
    tp_conversion c;
    tp_err err = {{0}};
    if (tp_conversion_prepare(&c, "tests/models/llama-tiny", 2, NULL, false, &err) < 0) {
        CHECK(0, "%s", err.msg);
        return;
    }
    volatile sig_atomic_t cancel = 1;
    char out[512];
    snprintf(out, sizeof out, "%s/cancelled", tmp_root);
    for (int fmt = 0; fmt < 2; fmt++) {
        tp_write_opts o = {.format = fmt ? TP_OUT_SAFETENSORS : TP_OUT_TPSHARD,
                           .codec = TP_CODEC_ZSTD, .level = 3, .quiet = true, .cancel = &cancel};
        CHECK(tp_conversion_write(&c, out, &o, NULL, &err) < 0, "cancelled write succeeded");
        CHECK(strstr(err.msg, "interrupted") != NULL, "message: %s", err.msg);
        CHECK(access(out, F_OK) != 0, "%s left behind after a cancel", out);
        mkdir(out, 0755);
        CHECK(tp_conversion_write(&c, out, &o, NULL, &err) < 0, "cancelled write succeeded");
        CHECK(dir_empty(out), "%s: files left behind after a cancel", out);
        rmdir(out);
    }
    /* a bad level is refused before anything is created */
    tp_write_opts bad = {.format = TP_OUT_TPSHARD, .codec = TP_CODEC_ZSTD, .level = 99, .quiet = true};
    CHECK(tp_conversion_write(&c, out, &bad, NULL, &err) < 0 && access(out, F_OK) != 0, "level 99");
    tp_conversion_free(&c);
}

int main(void)
{
    tmp_root = check_tmpdir();
    const char *models[][2] = {
        {"tests/models/qwen3-tiny", "4"}, {"tests/models/llama-bias", "2"},
        {"tests/models/qwen2-tiny", "2"}, {"tests/models/qwen3-kv1", "4"},
    };
    for (size_t i = 0; i < sizeof models / sizeof models[0]; i++) {
        if (access(models[i][0], F_OK) != 0) {
            CHECK(0, "%s missing (run from the repository root)", models[i][0]);
            continue;
        }
        int tp = atoi(models[i][1]);
        check_safetensors(models[i][0], tp, NULL, false);
        check_tpshard(models[i][0], tp, NULL, false, TP_CODEC_ZSTD);
    }
    check_safetensors("tests/models/qwen3-tiny", 2, NULL, true);

    char plan[600];
    const char *packed = write_packed_model(plan, sizeof plan);
    tp_conversion c;
    tp_err err = {{0}};
    if (tp_conversion_prepare(&c, packed, 4, plan, true, &err) == 0) {
        const tp_cut *gu = NULL, *lm = NULL, *db = NULL;
        for (size_t i = 0; i < c.n_cuts; i++) {
            if (!strcmp(c.cuts[i].name, "model.layers.0.mlp.gate_up_proj.weight"))
                gu = &c.cuts[i];
            if (!strcmp(c.cuts[i].name, "lm_head.weight"))
                lm = &c.cuts[i];
            if (!strcmp(c.cuts[i].name, "model.layers.0.mlp.down_proj.bias"))
                db = &c.cuts[i];
        }
        CHECK(gu && gu->splits[1].n_ranges == 2 && gu->splits[1].start[0] == 2 &&
              gu->splits[1].start[1] == 10, "gate_up packed ranges");
        CHECK(lm && lm->splits[3].start[0] == 9 && lm->splits[3].end[0] == 10, "uneven lm_head");
        CHECK(db && db->reduce_bias && db->dim == -1, "down_proj.bias reduce");
        CHECK(c.vocab_parallel, "vocab_parallel");
        tp_conversion_free(&c);
    } else {
        CHECK(0, "packed model: %s", err.msg);
    }
    check_safetensors(packed, 4, plan, true);
    check_tpshard(packed, 4, plan, true, TP_CODEC_NONE);
    check_tpshard(packed, 4, plan, true, TP_CODEC_ZSTD);
    check_tpshard(packed, 2, plan, false, TP_CODEC_NONE);
    check_cancel();

    return check_finish("test_st_export");
}
