/* prepare.c - a conversion before any byte is written: config.json, the
 * plan, the source weights and the cut of every tensor. */
#include "convert.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

void tp_conversion_free(tp_conversion *c)
{
    if (!c)
        return;
    for (size_t i = 0; i < c->n_cuts; i++)
        tp_cut_free(&c->cuts[i]);
    free(c->cuts);
    free(c->rank_total);
    tp_plan_free(&c->plan);
    free(c->config_json);
    free(c->model_dir);
    if (c->src_open)
        tp_st_set_close(&c->src);
    memset(c, 0, sizeof *c);
}

/* Index of the file of the set that holds t (the set's tensors point into
 * its files' tensor arrays). */
static size_t file_of(const tp_st_set *s, const tp_st_tensor *t)
{
    for (size_t f = 0; f < s->n_files; f++) {
        const tp_st_file *file = &s->files[f];
        if (t >= file->tensors && t < file->tensors + file->n_tensors)
            return f;
    }
    return 0;
}

typedef struct order_key {
    size_t file;
    uint64_t begin;
    const tp_st_tensor *t;
} order_key;

static int cmp_order(const void *a, const void *b)
{
    const order_key *x = a, *y = b;
    if (x->file != y->file)
        return x->file < y->file ? -1 : 1;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    return 0;
}

/* The tied / untied lm_head must agree with the checkpoint. */
static int check_lm_head(const tp_conversion *c, tp_err *err)
{
    bool has_head = tp_st_set_find(&c->src, "lm_head.weight") != NULL;
    bool has_embed = tp_st_set_find(&c->src, "model.embed_tokens.weight") != NULL;
    if (!has_embed)
        return tp_errorf(err, "%s: no tensor model.embed_tokens.weight", c->model_dir);
    if (!has_head && !c->model.tie_word_embeddings)
        return tp_errorf(err, "%s: no tensor lm_head.weight and config.json has no "
                         "\"tie_word_embeddings\": true", c->model_dir);
    return 0;
}

/* The style the plan gives a tensor name (replicate when not named). */
static tp_style style_for(const tp_plan *p, const char *name)
{
    long i = tp_plan_match(p, name);
    return i < 0 ? TP_STYLE_REPLICATE : p->styles[i];
}

/* The model-wide divisibility rules, checked once up front so that the first
 * message is about the model, not whichever tensor comes first in the file.
 * Only for what the plan actually cuts (layer 0 stands for every layer; the
 * per-tensor cuts check each layer again). */
static int check_model_split(const tp_conversion *c, tp_err *err)
{
    const tp_model_info *mi = &c->model;
    const int tp = c->tp;
    if (style_for(&c->plan, "model.layers.0.self_attn.q_proj.weight") != TP_STYLE_REPLICATE ||
        style_for(&c->plan, "model.layers.0.self_attn.o_proj.weight") != TP_STYLE_REPLICATE) {
        if (mi->n_heads % tp)
            return tp_errorf(err, "num_attention_heads=%" PRId64 " cannot be split over tp=%d: "
                             "each rank needs whole attention heads", mi->n_heads, tp);
    }
    if (style_for(&c->plan, "model.layers.0.self_attn.k_proj.weight") != TP_STYLE_REPLICATE ||
        style_for(&c->plan, "model.layers.0.self_attn.v_proj.weight") != TP_STYLE_REPLICATE) {
        int64_t kv = mi->n_kv_heads;
        if (kv % tp && !(kv < tp && tp % kv == 0))
            return tp_errorf(err, "num_key_value_heads=%" PRId64 " cannot be split over tp=%d: "
                             "needs num_key_value_heads %% tp == 0, or fewer kv heads than ranks "
                             "with tp %% num_key_value_heads == 0", kv, tp);
    }
    static const char *const mlp[] = {
        "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.gate_up_proj.weight",
    };
    for (size_t i = 0; i < sizeof mlp / sizeof mlp[0]; i++)
        if (style_for(&c->plan, mlp[i]) != TP_STYLE_REPLICATE && mi->intermediate % tp)
            return tp_errorf(err, "intermediate_size=%" PRId64 " cannot be split over tp=%d",
                             mi->intermediate, tp);
    return 0;
}

int tp_conversion_prepare(tp_conversion *c, const char *model_dir, int tp, const char *plan_path,
                          bool vocab_parallel, tp_err *err)
{
    tp_prepare_opts o = {.plan_path = plan_path, .vocab_parallel = vocab_parallel};
    return tp_conversion_prepare_opts(c, model_dir, tp, &o, err);
}

int tp_conversion_prepare_opts(tp_conversion *c, const char *model_dir, int tp,
                               const tp_prepare_opts *o, tp_err *err)
{
    const char *plan_path = o->plan_path;
    bool vocab_parallel = o->vocab_parallel;
    memset(c, 0, sizeof *c);
    if (tp < 1 || tp > TP_MAX_TP)
        return tp_errorf(err, "--tp %d: must be between 1 and %d", tp, TP_MAX_TP);
    c->tp = tp;
    if (!(c->model_dir = strdup(model_dir)))
        return tp_errorf(err, "out of memory");
    char *cfg_path = tp_path_join(model_dir, "config.json");
    if (!cfg_path)
        return tp_errorf(err, "out of memory");
    /* The same symlink rule as every other file read from the model
     * directory (tp_model_file_check), before reading a byte: --dry-run too. */
    int rc = tp_model_file_check(model_dir, "config.json", err);
    if (rc == 0)
        rc = tp_read_file(cfg_path, 16u << 20, &c->config_json, &c->config_len, err);
    if (rc == 0 && tp_model_info_parse(c->config_json, c->config_len, cfg_path, &c->model, err) < 0)
        rc = -1;
    free(cfg_path);
    if (rc < 0)
        goto fail;
    if (tp_plan_resolve(c->config_json, c->config_len, plan_path, vocab_parallel, &c->plan, err) < 0)
        goto fail;
    c->expert_parallel = o->expert_parallel;
    if (o->expert_parallel && tp_plan_expert_parallel(&c->model.cfg, &c->plan, tp, err) < 0) {
        tp_err_prefix(err, "%s/config.json", model_dir);
        goto fail;
    }
    if (check_model_split(c, err) < 0) {
        tp_err_prefix(err, "%s/config.json", model_dir);
        goto fail;
    }
    if (tp_st_set_open(&c->src, model_dir, err) < 0)
        goto fail;
    c->src_open = true;
    if (check_lm_head(c, err) < 0)
        goto fail;

    size_t n = c->src.n_tensors;
    order_key *order = calloc(n ? n : 1, sizeof *order);
    c->cuts = calloc(n ? n : 1, sizeof *c->cuts);
    c->rank_total = calloc((size_t)tp, sizeof *c->rank_total);
    if (!order || !c->cuts || !c->rank_total) {
        free(order);
        tp_errorf(err, "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < n; i++) {
        order[i].t = c->src.tensors[i];
        order[i].file = file_of(&c->src, order[i].t);
        order[i].begin = order[i].t->begin;
    }
    /* Source order, so that the files are read front to back once. */
    qsort(order, n, sizeof *order, cmp_order);
    for (size_t i = 0; i < n; i++) {
        const tp_st_tensor *t = order[i].t;
        long pi = tp_plan_match(&c->plan, t->name);
        tp_style style = pi >= 0 ? c->plan.styles[pi] : TP_STYLE_REPLICATE;
        tp_cut *cut = &c->cuts[c->n_cuts];
        if (t->dtype == TP_F8_E4M3 || t->dtype == TP_I8) {
            /* Quantized checkpoints are not read yet (FORMAT.md's convention
             * is there; the converter and the runtime are not). */
            free(order);
            tp_errorf(err, "%s: tensor %s: dtype %s: quantized checkpoints are not supported yet",
                      model_dir, t->name, tp_dtype_name(t->dtype));
            goto fail;
        }
        if (tp_cut_make(cut, &c->model, t->name, t->dtype, t->ndim, t->shape, style, tp, err) < 0) {
            free(order);
            tp_err_prefix(err, "%s", model_dir);
            goto fail;
        }
        cut->src = t;
        cut->plan_entry = pi;
        c->n_cuts++;
        if (cut->style == TP_STYLE_VOCAB && !strcmp(t->name, "model.embed_tokens.weight"))
            c->vocab_parallel = true;
        c->source_bytes += t->nbytes;
        for (int r = 0; r < tp; r++)
            c->rank_total[r] += cut->rank_bytes[r];
    }
    free(order);
    /* vocab_parallel is the default wish, and a plan that names the
     * embedding keeps its own cut; but asking for a replicated embedding
     * from a plan that cuts it would silently give the other. */
    if (!vocab_parallel && c->vocab_parallel) {
        tp_errorf(err, "--replicate-embedding: the plan (%s) cuts model.embed_tokens by "
                  "vocabulary rows", c->plan.source ? c->plan.source : "?");
        goto fail;
    }
    return 0;
fail:
    tp_conversion_free(c);
    return -1;
}

int tp_conversion_check_runnable(const tp_conversion *c, bool check_plan, tp_err *err)
{
    const tp_model_config *cfg = &c->model.cfg;
    if (cfg->arch == TP_ARCH_OTHER && !check_plan)
        return 0;
    tp_tensor_ref *refs = calloc(c->n_cuts ? c->n_cuts : 1, sizeof *refs);
    if (!refs)
        return tp_errorf(err, "out of memory");
    for (size_t i = 0; i < c->n_cuts; i++)
        refs[i] = (tp_tensor_ref){c->cuts[i].name, c->cuts[i].ndim, c->cuts[i].global_shape};
    int rc = tp_arch_check_tensors(cfg, refs, c->n_cuts, err);
    free(refs);
    if (rc == 0 && check_plan)
        rc = tp_arch_check_plan(cfg, &c->plan, err);
    if (rc < 0)
        tp_err_prefix(err, "%s: tprun cannot run this conversion", c->model_dir);
    return rc;
}
