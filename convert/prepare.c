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

/* ------------------------------------------------------ quantized weights */

/* A quantization scale's name (either scheme): the weight's name into buf. */
static bool scale_name(const char *name, char *weight, size_t cap)
{
    return tp_quant_scale_weight(name, weight, cap) != NULL;
}

static bool is_8bit(tp_dtype dt)
{
    return dt == TP_F8_E4M3 || dt == TP_I8;
}

/* --quantize: the config it is asked of, rewritten with the
 * quantization_config the shards will have (the runtime reads it from the
 * manifest's config and the copied config.json). */
static int quantize_config(tp_conversion *c, const tp_prepare_opts *o, const char *cfg_path,
                           tp_err *err)
{
    const char *flag = o->quantize == TP_QUANT_FP8_BLOCK ? "--quantize fp8" : "--quantize int8";
    const tp_model_config *cfg = &c->model.cfg;
    if (cfg->quant != TP_QUANT_NONE)
        return tp_errorf(err, "%s: %s is already quantized (quantization_config.quant_method \"%s\")",
                         flag, cfg_path, tp_quant_method(cfg->quant));
    if (cfg->arch == TP_ARCH_OTHER)
        return tp_errorf(err, "%s: %s: model_type \"%s\" is not one tprun runs", flag, cfg_path,
                         cfg->model_type);
    size_t len;
    char *json = tp_quant_config_json(c->config_json, c->config_len, o->quantize, o->quantize_lm_head,
                                      &len, err);
    if (!json)
        return tp_err_prefix(err, "%s", cfg_path);
    free(c->config_json);
    c->config_json = json;
    c->config_len = len;
    return tp_model_info_parse(c->config_json, c->config_len, cfg_path, &c->model, err);
}

/* Whether --quantize quantizes source tensor t: the linear layers, and
 * lm_head's table (a tied model's embedding, stored once) only with
 * --quantize-lm-head. */
static bool to_quantize(const tp_conversion *c, const tp_prepare_opts *o, const tp_st_tensor *t)
{
    if (o->quantize == TP_QUANT_NONE || t->ndim != 2 || is_8bit(t->dtype))
        return false;
    if (!strcmp(t->name, tp_arch_lm_head_tensor(&c->model.cfg)))
        return o->quantize_lm_head;
    return strcmp(t->name, "lm_head.weight") && tp_arch_quantizable(c->model.cfg.arch, t->name);
}

/* --quantize of one weight: the whole tensor quantized into the cut's
 * owned_data (global blocks, before any cut), its scale cut appended. */
static int quantize_cut(tp_conversion *c, tp_cut *w, const tp_st_tensor *t, tp_err *err)
{
    const tp_model_config *cfg = &c->model.cfg;
    uint64_t rows = t->shape[0], cols = t->shape[1], sshape[2];
    int snd = tp_quant_scale_shape(cfg->quant, cfg->quant_block, t->shape, sshape);
    size_t n_scales = (size_t)(snd == 2 ? sshape[0] * sshape[1] : sshape[0]);
    size_t n_elems = (size_t)(rows * cols);
    uint8_t *q = malloc(n_elems ? n_elems : 1);
    float *scale = malloc(sizeof *scale * (n_scales ? n_scales : 1));
    int rc = q && scale ? 0 : tp_errorf(err, "tensor %s: out of memory", t->name);
    if (rc == 0 && cfg->quant == TP_QUANT_FP8_BLOCK)
        rc = tp_quantize_fp8_block(t->name, t->dtype, t->data, rows, cols, cfg->quant_block, q, scale,
                                   err);
    else if (rc == 0)
        rc = tp_quantize_int8_row(t->name, t->dtype, t->data, rows, cols, (int8_t *)q, scale, err);
    char name[1100];
    if (rc == 0 && !tp_quant_scale_name(cfg->quant, t->name, name, sizeof name))
        rc = tp_errorf(err, "tensor %s: no scale name for it", t->name);
    if (rc < 0) {
        free(q);
        free(scale);
        return -1;
    }
    w->owned_data = q;
    if (tp_cut_make_scale(&c->cuts[c->n_cuts], &c->model, w, name, cfg->quant, cfg->quant_block, snd,
                          sshape, scale, err) < 0) {
        free(scale);
        return -1;
    }
    c->n_cuts++;
    return 0;
}

/* "[a, b, ...]" */
static void shape_str(const uint64_t *shape, int ndim, char *out, size_t cap)
{
    size_t used = (size_t)snprintf(out, cap, "[");
    for (int d = 0; d < ndim && used < cap; d++)
        used += (size_t)snprintf(out + used, cap - used, "%s%" PRIu64, d ? ", " : "", shape[d]);
    if (used < cap)
        snprintf(out + used, cap - used, "]");
}

static int cmp_cut_name(const void *a, const void *b)
{
    return strcmp((*(tp_cut *const *)a)->name, (*(tp_cut *const *)b)->name);
}

/* The cut of a source scale tensor t, whose weight's cut is among the
 * sorted cuts: the scale must belong to an 8-bit weight of the config's
 * scheme, have the shape the weight and the block imply, and hold finite
 * positive values; it is widened to F32 and cut as FORMAT.md 1.5 says. */
static int add_source_scale(tp_conversion *c, const tp_st_tensor *t, tp_cut *const *sorted, size_t n,
                            tp_err *err)
{
    const tp_model_config *cfg = &c->model.cfg;
    char wname[1100], want_name[1100];
    scale_name(t->name, wname, sizeof wname);
    tp_cut key = {.name = wname}, *kp = &key;
    tp_cut *const *found = bsearch(&kp, sorted, n, sizeof *sorted, cmp_cut_name);
    const tp_cut *w = found ? *found : NULL;
    if (cfg->quant == TP_QUANT_NONE)
        return tp_errorf(err, "tensor %s: a quantization scale, but config.json has no "
                         "quantization_config", t->name);
    if (!w || !is_8bit(w->dtype))
        return tp_errorf(err, "tensor %s: a quantization scale, but its weight %s is %s", t->name,
                         wname, w ? tp_dtype_name(w->dtype) : "missing");
    if (!tp_quant_scale_name(cfg->quant, wname, want_name, sizeof want_name) ||
        strcmp(want_name, t->name))
        return tp_errorf(err, "tensor %s: config.json's quant_method \"%s\" names the scale of %s %s",
                         t->name, tp_quant_method(cfg->quant), wname, want_name);
    uint64_t want[2];
    int nd = tp_quant_scale_shape(cfg->quant, cfg->quant_block, w->global_shape, want);
    if (t->ndim != nd || t->shape[0] != want[0] || (nd == 2 && t->shape[1] != want[1])) {
        char got[96], need[64];
        shape_str(t->shape, t->ndim, got, sizeof got);
        shape_str(want, nd, need, sizeof need);
        return tp_errorf(err, "tensor %s: shape %s, but weight %s [%" PRIu64 ", %" PRIu64 "] needs %s "
                         "(%s)", t->name, got, wname, w->global_shape[0], w->global_shape[1], need,
                         cfg->quant == TP_QUANT_FP8_BLOCK ? "one per weight_block_size block"
                                                          : "one per row");
    }
    size_t count = (size_t)(nd == 2 ? want[0] * want[1] : want[0]);
    float *f = malloc(sizeof *f * (count ? count : 1));
    if (!f)
        return tp_errorf(err, "tensor %s: out of memory", t->name);
    if (tp_quant_scales_to_f32(t->name, t->dtype, t->data, count, f, err) < 0 ||
        tp_cut_make_scale(&c->cuts[c->n_cuts], &c->model, w, t->name, cfg->quant, cfg->quant_block, nd,
                          want, f, err) < 0) {
        free(f);
        return -1;
    }
    c->n_cuts++;
    return 0;
}

/* The scale tensors of the source, after every other tensor is cut. */
static int add_source_scales(tp_conversion *c, const order_key *order, size_t n, tp_err *err)
{
    size_t n_weights = c->n_cuts;
    tp_cut **sorted = malloc(sizeof *sorted * (n_weights ? n_weights : 1));
    if (!sorted)
        return tp_errorf(err, "out of memory");
    for (size_t i = 0; i < n_weights; i++)
        sorted[i] = &c->cuts[i];
    qsort(sorted, n_weights, sizeof *sorted, cmp_cut_name);
    char wname[1100];
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++)
        if (scale_name(order[i].t->name, wname, sizeof wname)) {
            rc = add_source_scale(c, order[i].t, sorted, n_weights, err);
            if (rc == 0)
                c->source_bytes += order[i].t->nbytes;
        }
    free(sorted);
    return rc;
}

/* An 8-bit source tensor: only a 2-D weight of a model whose config says
 * how it is quantized (the runnable check names the rest). */
static int check_8bit_source(const tp_conversion *c, const tp_st_tensor *t, tp_err *err)
{
    const tp_model_config *cfg = &c->model.cfg;
    if (!is_8bit(t->dtype))
        return 0;
    if (cfg->quant == TP_QUANT_NONE || cfg->arch == TP_ARCH_OTHER)
        return tp_errorf(err, "tensor %s: dtype %s, but config.json %s", t->name,
                         tp_dtype_name(t->dtype), cfg->quant == TP_QUANT_NONE
                             ? "has no quantization_config"
                             : "is of a model_type tprun does not run");
    if (t->ndim != 2 || t->dtype != tp_quant_dtype(cfg->quant))
        return tp_errorf(err, "tensor %s: dtype %s with %d dimensions: quant_method \"%s\" stores "
                         "2-D %s weights", t->name, tp_dtype_name(t->dtype), t->ndim,
                         tp_quant_method(cfg->quant), tp_dtype_name(tp_quant_dtype(cfg->quant)));
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
    tp_quant source_quant = c->model.cfg.quant;
    if (rc == 0 && o->quantize != TP_QUANT_NONE && quantize_config(c, o, cfg_path, err) < 0)
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
    /* room for a scale per weight (--quantize) */
    c->cuts = calloc(n ? 2 * n : 1, sizeof *c->cuts);
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
        char wname[1100];
        if (scale_name(t->name, wname, sizeof wname))
            continue;   /* cut after its weight: add_source_scales */
        bool quantize = to_quantize(c, o, t);
        tp_dtype dtype = quantize ? tp_quant_dtype(o->quantize) : t->dtype;
        if ((source_quant == TP_QUANT_NONE && is_8bit(t->dtype) &&
             tp_errorf(err, "tensor %s: dtype %s, but config.json has no quantization_config", t->name,
                       tp_dtype_name(t->dtype)) < 0) ||
            check_8bit_source(c, t, err) < 0 ||
            tp_cut_make(cut, &c->model, t->name, dtype, t->ndim, t->shape, style, tp, err) < 0) {
            free(order);
            tp_err_prefix(err, "%s", model_dir);
            goto fail;
        }
        cut->src = t;
        cut->plan_entry = pi;
        c->n_cuts++;
        if (quantize && quantize_cut(c, cut, t, err) < 0) {
            free(order);
            tp_err_prefix(err, "%s", model_dir);
            goto fail;
        }
        if (cut->style == TP_STYLE_VOCAB && !strcmp(t->name, "model.embed_tokens.weight"))
            c->vocab_parallel = true;
        c->source_bytes += t->nbytes;
    }
    if (add_source_scales(c, order, n, err) < 0) {
        free(order);
        tp_err_prefix(err, "%s", model_dir);
        goto fail;
    }
    free(order);
    for (size_t i = 0; i < c->n_cuts; i++)
        for (int r = 0; r < tp; r++)
            c->rank_total[r] += c->cuts[i].rank_bytes[r];
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
        refs[i] = (tp_tensor_ref){c->cuts[i].name, c->cuts[i].ndim, c->cuts[i].global_shape,
                                  c->cuts[i].dtype};
    int rc = tp_arch_check_tensors(cfg, refs, c->n_cuts, err);
    free(refs);
    if (rc == 0 && check_plan)
        rc = tp_arch_check_plan(cfg, &c->plan, err);
    if (rc < 0)
        tp_err_prefix(err, "%s: tprun cannot run this conversion", c->model_dir);
    return rc;
}
