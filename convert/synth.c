/* synth.c - writes a synthetic Hugging Face model directory (config.json,
 * generation_config.json, safetensors with the real HF tensor names, and
 * optionally the tokenizer) with random bf16 weights.  Used by the demo, the
 * tests and the conversion benchmark, so that no checkpoint is downloaded.
 *
 * Values: weights and biases N(0, 0.02^2), norm weights 1 + N(0, 0.02^2),
 * drawn by table lookup: a 65536-entry table of bf16 normal quantiles indexed
 * by 16 random bits (bf16 has 8 significant bits, so the quantised
 * distribution is indistinguishable from a sampled one; tails stop at about
 * 4.3 sigma).  Each 1 MiB block of a tensor has its own xoshiro256** stream
 * (tp_rng) seeded from (seed, tensor index, block), so the output is the same
 * for any number of threads, and blocks are filled in parallel.  Tensors stream
 * through tp_st_write's fill callback: there is never a whole-model buffer.
 */
#include "convert.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <dirent.h>

#include <cJSON.h>

#define SYNTH_STD 0.02
#define SYNTH_BLOCK_ELEMS (1u << 19)   /* 1 MiB of bf16 */
#define SYNTH_TOKENIZER_MAX (256u << 20)

/* ------------------------------------------------------------- presets */

static void set_dims(tp_synth_opts *o, const char *arch, int hidden, int layers, int heads,
                     int kv_heads, int head_dim, int intermediate, int vocab, bool tie,
                     int max_position)
{
    o->arch = arch;
    o->hidden = hidden;
    o->layers = layers;
    o->heads = heads;
    o->kv_heads = kv_heads;
    o->head_dim = head_dim;
    o->intermediate = intermediate;
    o->vocab = vocab;
    o->tie = tie;
    o->max_position = max_position;
}

int tp_synth_preset(tp_synth_opts *o, const char *preset, tp_err *err)
{
    if (!strcmp(preset, "tiny"))
        set_dims(o, "qwen3", 64, 2, 4, 2, 16, 128, 512, true, 256);
    else if (!strcmp(preset, "demo"))
        set_dims(o, "qwen3", 128, 2, 4, 2, 32, 384, 151936, true, 40960);
    else if (!strcmp(preset, "qwen3-0.6b"))
        set_dims(o, "qwen3", 1024, 28, 16, 8, 128, 3072, 151936, true, 40960);
    else if (!strcmp(preset, "qwen3-8b"))
        set_dims(o, "qwen3", 4096, 36, 32, 8, 128, 12288, 151936, false, 40960);
    else if (!strcmp(preset, "moe-tiny"))
        set_dims(o, "qwen3_moe", 64, 2, 4, 2, 16, 128, 512, false, 256);
    else if (!strcmp(preset, "qwen3-30b-a3b-layer"))
        /* Qwen3-30B-A3B's shape, 2 of its 48 layers (the fp32 weights of
         * 2 layers, the embedding and lm_head take ~7.5 GB at tp 1) */
        set_dims(o, "qwen3_moe", 2048, 2, 32, 4, 128, 6144, 151936, false, 40960);
    else
        return tp_errorf(err, "--preset %s: unknown (demo, tiny, qwen3-0.6b, qwen3-8b, moe-tiny, "
                         "qwen3-30b-a3b-layer)", preset);
    bool big = !strcmp(preset, "qwen3-30b-a3b-layer");
    o->experts = big ? 128 : 8;
    o->experts_per_tok = big ? 8 : 2;
    o->moe_intermediate = big ? 768 : 32;
    return 0;
}

/* What config.json says per architecture beyond the sizes (tpsynth writes
 * the architectures tprun runs; their tensors come from convert/arch.c's
 * table). */
typedef struct arch_info {
    const char *arch, *class_name;
    double rope_theta;
} arch_info;

static const arch_info ARCHS[] = {
    {"qwen3", "Qwen3ForCausalLM", 1000000.0},
    {"qwen2", "Qwen2ForCausalLM", 1000000.0},
    {"llama", "LlamaForCausalLM", 500000.0},
    {"mistral", "MistralForCausalLM", 1000000.0},
    {"qwen3_moe", "Qwen3MoeForCausalLM", 1000000.0},
    {"mixtral", "MixtralForCausalLM", 1000000.0},
};

static const arch_info *arch_lookup(const char *arch)
{
    for (size_t i = 0; i < sizeof ARCHS / sizeof ARCHS[0]; i++)
        if (!strcmp(ARCHS[i].arch, arch))
            return &ARCHS[i];
    return NULL;
}

static bool arch_moe(const char *arch)
{
    return !strcmp(arch, "qwen3_moe") || !strcmp(arch, "mixtral");
}

static int check_opts(const tp_synth_opts *o, tp_err *err)
{
    if (!o->arch || !arch_lookup(o->arch))
        return tp_errorf(err, "--arch %s: unknown (qwen3, qwen2, llama, mistral, qwen3_moe, "
                         "mixtral)", o->arch ? o->arch : "(none)");
    if (arch_moe(o->arch) && (o->experts < 1 || o->experts > 4096 || o->experts_per_tok < 1 ||
                              o->experts_per_tok > o->experts || o->moe_intermediate < 1 ||
                              o->moe_intermediate > (1 << 24)))
        return tp_errorf(err, "--experts %d, --experts-per-tok %d, --moe-intermediate %d: need "
                         "1 <= experts-per-tok <= experts <= 4096", o->experts,
                         o->experts_per_tok, o->moe_intermediate);
    struct { const char *flag; int v; } dims[] = {
        {"--hidden", o->hidden}, {"--layers", o->layers}, {"--heads", o->heads},
        {"--kv-heads", o->kv_heads}, {"--head-dim", o->head_dim},
        {"--intermediate", o->intermediate}, {"--vocab", o->vocab},
        {"--max-position", o->max_position},
    };
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++)
        if (dims[i].v <= 0 || dims[i].v > (1 << 24))
            return tp_errorf(err, "%s %d: must be in 1..%d", dims[i].flag, dims[i].v, 1 << 24);
    if (o->heads % o->kv_heads)
        return tp_errorf(err, "--heads %d: not a multiple of --kv-heads %d", o->heads, o->kv_heads);
    /* Qwen2's config has no head_dim: it is hidden / heads. */
    if (!strcmp(o->arch, "qwen2") && o->head_dim * o->heads != o->hidden)
        return tp_errorf(err, "--head-dim %d: qwen2 needs head_dim * heads == hidden (%d)",
                         o->head_dim, o->hidden);
    return 0;
}

/* --------------------------------------------------------- tensor list */

typedef enum { VAL_WEIGHT, VAL_NORM } synth_value;

typedef struct synth_tensor {
    char name[96];
    int ndim;
    uint64_t shape[3];
    synth_value value;
    size_t nbytes;
} synth_tensor;

typedef struct synth_list {
    synth_tensor *t;
    size_t n, cap;
} synth_list;

/* Appends a bf16 tensor of shape [ndim] named name. */
static int list_add(synth_list *l, synth_value value, const char *name, int ndim, const uint64_t *shape,
                    tp_err *err)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 64;
        synth_tensor *t = realloc(l->t, cap * sizeof *t);
        if (!t)
            return tp_errorf(err, "tpsynth: out of memory for the tensor list");
        l->t = t;
        l->cap = cap;
    }
    synth_tensor *t = &l->t[l->n];
    memset(t, 0, sizeof *t);
    if ((size_t)snprintf(t->name, sizeof t->name, "%s", name) >= sizeof t->name)
        return tp_errorf(err, "tpsynth: tensor name %s is too long", name);
    t->value = value;
    t->ndim = ndim;
    t->nbytes = 2;
    for (int d = 0; d < ndim; d++) {
        t->shape[d] = shape[d];
        t->nbytes *= (size_t)shape[d];
    }
    l->n++;
    return 0;
}

/* One table row of layer `layer` (expert e, or -1), with its bias when the
 * config says the layer has one.  1-D weights are norms (mean 1). */
static int add_row(synth_list *l, const tp_model_config *c, const tp_arch_tensor *row, int layer, long e,
                   tp_err *err)
{
    uint64_t shape[3];
    char name[128];
    for (int d = 0; d < row->ndim; d++)
        shape[d] = (uint64_t)tp_dim_value(c, row->dims[d]);
    if (!tp_arch_tensor_name(row, layer, e, name, sizeof name) ||
        list_add(l, row->ndim == 1 ? VAL_NORM : VAL_WEIGHT, name, row->ndim, shape, err) < 0)
        return tp_errorf(err, "tpsynth: layer %d: tensor name too long (%s)", layer, row->module);
    if (row->bias_slot == TP_SLOT_NONE || !tp_config_has_bias(c, row->bias_slot))
        return 0;
    if (!tp_arch_bias_name(row, layer, name, sizeof name) ||
        list_add(l, VAL_WEIGHT, name, 1, shape, err) < 0)
        return tp_errorf(err, "tpsynth: layer %d: tensor name too long (%s)", layer, row->module);
    return 0;
}

/* A layer's tensors, as convert/arch.c's table lists them for the layer's
 * kind (experts in the per-expert layout, as published on the Hub): the
 * table's order, each weight followed by its bias, the experts last and
 * expert by expert. */
static int add_layer(synth_list *l, const tp_model_config *c, int layer, tp_err *err)
{
    for (size_t r = 0; r < tp_arch_n_layer_tensors; r++) {
        const tp_arch_tensor *row = &tp_arch_layer_tensors[r];
        if (row->kind != TP_ROW_EXPERT && tp_arch_row_in_layer(c, row, layer, false) &&
            add_row(l, c, row, layer, -1, err) < 0)
            return -1;
    }
    for (long e = 0; e < c->n_experts; e++)
        for (size_t r = 0; r < tp_arch_n_layer_tensors; r++) {
            const tp_arch_tensor *row = &tp_arch_layer_tensors[r];
            if (row->kind == TP_ROW_EXPERT && tp_arch_row_in_layer(c, row, layer, false) &&
                add_row(l, c, row, layer, e, err) < 0)
                return -1;
        }
    return 0;
}

static char *config_json(const tp_synth_opts *o);

/* The tensors of the model: those the config.json it writes asks for, read
 * back with the parser tpconvert and tprun use. */
static int build_list(const tp_synth_opts *o, synth_list *l, tp_err *err)
{
    char *cfg = config_json(o);
    if (!cfg)
        return tp_errorf(err, "tpsynth: out of memory");
    tp_model_config c;
    int rc = tp_config_parse(&c, cfg, strlen(cfg), "tpsynth's config.json", err);
    free(cfg);
    if (rc < 0)
        return -1;
    const uint64_t vh[2] = {(uint64_t)c.vocab, (uint64_t)c.hidden}, h[1] = {(uint64_t)c.hidden};
    if (list_add(l, VAL_WEIGHT, "model.embed_tokens.weight", 2, vh, err) < 0)
        return -1;
    for (int i = 0; i < c.n_layers; i++)
        if (add_layer(l, &c, i, err) < 0)
            return -1;
    if (list_add(l, VAL_NORM, "model.norm.weight", 1, h, err) < 0)
        return -1;
    if (!c.tie_embeddings && list_add(l, VAL_WEIGHT, "lm_head.weight", 2, vh, err) < 0)
        return -1;
    return 0;
}

/* ------------------------------------------------------------- values */

/* Acklam's rational approximation of the standard normal quantile (relative
 * error < 1.2e-9, far below bf16 resolution). */
static double normal_quantile(double p)
{
    static const double a[] = {-3.969683028665376e+01, 2.209460984245205e+02,
                               -2.759285104469687e+02, 1.383577518672690e+02,
                               -3.066479806614716e+01, 2.506628277459239e+00};
    static const double b[] = {-5.447609879822406e+01, 1.615858368580409e+02,
                               -1.556989798598866e+02, 6.680131188771972e+01,
                               -1.328068155288572e+01};
    static const double c[] = {-7.784894002430293e-03, -3.223964580411365e-01,
                               -2.400758277161838e+00, -2.549732539343734e+00,
                               4.374664141464968e+00, 2.938163982698783e+00};
    static const double d[] = {7.784695709041462e-03, 3.224671290700398e-01,
                               2.445134137142996e+00, 3.754408661907416e+00};
    const double lo = 0.02425, hi = 1 - lo;
    if (p < lo) {
        double q = sqrt(-2 * log(p));
        return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
               ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
    }
    if (p > hi) {
        double q = sqrt(-2 * log(1 - p));
        return -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
               ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
    }
    double q = p - 0.5, r = q * q;
    return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
           (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
}

static void fill_table(uint16_t *table, double mean, double std)
{
    for (uint32_t i = 0; i < 65536; i++)
        table[i] = tp_f32_to_bf16((float)(mean + std * normal_quantile((i + 0.5) / 65536.0)));
}

/* The stream of one block: tp_rng seeded from (seed, tensor, block) mixed
 * by two odd multipliers, so that neighbouring blocks and tensors get
 * unrelated streams. */
static void block_rng_seed(tp_rng *r, uint64_t seed, uint64_t tensor, uint64_t block)
{
    tp_rng_seed(r, seed ^ (tensor * 0xd1342543de82ef95ull) ^ (block * 0xaf251af3b0f025b5ull));
}

typedef struct synth_ctx {
    const synth_list *list;
    const size_t *file_first;   /* list index of each file's first tensor */
    size_t file;                /* the file being written */
    uint64_t seed;
    uint16_t weight_table[65536], norm_table[65536];
    tp_pool *pool;
    tp_progress *progress;
    /* the tensor being filled, for the parallel blocks */
    size_t cur;
    uint16_t *dst;
    size_t n_elems;
} synth_ctx;

static void fill_block(size_t block, void *arg)
{
    synth_ctx *c = arg;
    const uint16_t *table =
        c->list->t[c->cur].value == VAL_NORM ? c->norm_table : c->weight_table;
    size_t begin = block * SYNTH_BLOCK_ELEMS;
    size_t end = begin + SYNTH_BLOCK_ELEMS < c->n_elems ? begin + SYNTH_BLOCK_ELEMS : c->n_elems;
    tp_rng r;
    block_rng_seed(&r, c->seed, c->cur, block);
    uint16_t *dst = c->dst;
    size_t i = begin;
    for (; i + 4 <= end; i += 4) {
        uint64_t x = tp_rng_next(&r);
        dst[i] = table[x & 0xffff];
        dst[i + 1] = table[(x >> 16) & 0xffff];
        dst[i + 2] = table[(x >> 32) & 0xffff];
        dst[i + 3] = table[x >> 48];
    }
    uint64_t x = tp_rng_next(&r);
    for (; i < end; i++, x >>= 16)
        dst[i] = table[x & 0xffff];
    if (c->progress)
        tp_progress_add(c->progress, (uint64_t)(end - begin) * 2);
}

/* tp_st_write callback: i is the index within the current file. */
static int fill_tensor(size_t i, uint8_t *dst, size_t nbytes, void *arg, tp_err *err)
{
    synth_ctx *c = arg;
    c->cur = c->file_first[c->file] + i;
    const synth_tensor *t = &c->list->t[c->cur];
    if (nbytes != t->nbytes)
        return tp_errorf(err, "tensor %s: writer asked for %zu bytes, expected %zu", t->name,
                         nbytes, t->nbytes);
    c->dst = (uint16_t *)dst;
    c->n_elems = nbytes / 2;
    size_t blocks = (c->n_elems + SYNTH_BLOCK_ELEMS - 1) / SYNTH_BLOCK_ELEMS;
    if (c->pool)
        tp_pool_parallel_for(c->pool, blocks, fill_block, c);
    else
        for (size_t b = 0; b < blocks; b++)
            fill_block(b, c);
    return 0;
}

/* ------------------------------------------------------------- config */

/* bos / eos ids: the real ones when the vocabulary is the real one. */
static void special_ids(const tp_synth_opts *o, int *bos, int eos[2], int *n_eos)
{
    bool qwen = !strcmp(o->arch, "qwen3") || !strcmp(o->arch, "qwen2") || !strcmp(o->arch, "qwen3_moe");
    if (qwen && o->vocab >= 151936) {
        *bos = 151643;          /* <|endoftext|> */
        eos[0] = 151645;        /* <|im_end|> */
        eos[1] = 151643;
        *n_eos = 2;
    } else if (!strcmp(o->arch, "llama") && o->vocab >= 128256) {
        *bos = 128000;
        eos[0] = 128001;
        eos[1] = 128009;
        *n_eos = 2;
    } else {
        *bos = 1;
        eos[0] = 2;
        *n_eos = 1;
    }
}

static char *config_json(const tp_synth_opts *o)
{
    const arch_info *a = arch_lookup(o->arch);
    bool qwen = !strcmp(o->arch, "qwen3") || !strcmp(o->arch, "qwen2") || !strcmp(o->arch, "qwen3_moe");
    int bos, eos[2], n_eos;
    special_ids(o, &bos, eos, &n_eos);
    cJSON *j = cJSON_CreateObject();
    cJSON *archs = cJSON_AddArrayToObject(j, "architectures");
    cJSON_AddItemToArray(archs, cJSON_CreateString(a->class_name));
    if (strcmp(o->arch, "qwen2") != 0 && strcmp(o->arch, "mistral") != 0)
        cJSON_AddBoolToObject(j, "attention_bias", false);
    cJSON_AddNumberToObject(j, "attention_dropout", 0.0);
    cJSON_AddNumberToObject(j, "bos_token_id", bos);
    cJSON_AddNumberToObject(j, "eos_token_id", eos[0]);
    if (strcmp(o->arch, "qwen2") != 0)
        cJSON_AddNumberToObject(j, "head_dim", o->head_dim);
    cJSON_AddStringToObject(j, "hidden_act", "silu");
    cJSON_AddNumberToObject(j, "hidden_size", o->hidden);
    cJSON_AddNumberToObject(j, "initializer_range", SYNTH_STD);
    cJSON_AddNumberToObject(j, "intermediate_size", o->intermediate);
    cJSON_AddNumberToObject(j, "max_position_embeddings", o->max_position);
    if (qwen)
        cJSON_AddNumberToObject(j, "max_window_layers", o->layers);
    if (!strcmp(o->arch, "llama"))
        cJSON_AddBoolToObject(j, "mlp_bias", false);
    cJSON_AddStringToObject(j, "model_type", o->arch);
    if (!strcmp(o->arch, "qwen3_moe")) {
        /* as Qwen3-30B-A3B's config.json spells them */
        cJSON_AddNumberToObject(j, "decoder_sparse_step", 1);
        cJSON_AddItemToObject(j, "mlp_only_layers", cJSON_CreateArray());
        cJSON_AddNumberToObject(j, "moe_intermediate_size", o->moe_intermediate);
        cJSON_AddBoolToObject(j, "norm_topk_prob", true);
        cJSON_AddNumberToObject(j, "num_experts", o->experts);
    } else if (!strcmp(o->arch, "mixtral")) {
        cJSON_AddNumberToObject(j, "num_local_experts", o->experts);
    }
    if (arch_moe(o->arch))
        cJSON_AddNumberToObject(j, "num_experts_per_tok", o->experts_per_tok);
    cJSON_AddNumberToObject(j, "num_attention_heads", o->heads);
    cJSON_AddNumberToObject(j, "num_hidden_layers", o->layers);
    cJSON_AddNumberToObject(j, "num_key_value_heads", o->kv_heads);
    cJSON_AddNumberToObject(j, "rms_norm_eps", 1e-6);
    cJSON_AddNullToObject(j, "rope_scaling");
    cJSON_AddNumberToObject(j, "rope_theta", a->rope_theta);
    if (qwen || !strcmp(o->arch, "mistral") || arch_moe(o->arch))
        cJSON_AddNullToObject(j, "sliding_window");
    cJSON_AddBoolToObject(j, "tie_word_embeddings", o->tie);
    cJSON_AddStringToObject(j, "torch_dtype", "bfloat16");
    cJSON_AddStringToObject(j, "transformers_version", "4.51.0");
    cJSON_AddBoolToObject(j, "use_cache", true);
    if (qwen)
        cJSON_AddBoolToObject(j, "use_sliding_window", false);
    cJSON_AddNumberToObject(j, "vocab_size", o->vocab);
    char *s = cJSON_Print(j);
    cJSON_Delete(j);
    return s;
}

static char *generation_config_json(const tp_synth_opts *o)
{
    int bos, eos[2], n_eos;
    special_ids(o, &bos, eos, &n_eos);
    cJSON *j = cJSON_CreateObject();
    cJSON_AddNumberToObject(j, "bos_token_id", bos);
    cJSON *e = cJSON_AddArrayToObject(j, "eos_token_id");
    for (int i = 0; i < n_eos; i++)
        cJSON_AddItemToArray(e, cJSON_CreateNumber(eos[i]));
    cJSON_AddStringToObject(j, "transformers_version", "4.51.0");
    char *s = cJSON_Print(j);
    cJSON_Delete(j);
    return s;
}

/* ------------------------------------------------------------- files */

/* Files written so far, removed again if a later step fails. */
typedef struct written {
    char **paths;
    size_t n, cap;
} written;

/* Takes ownership of path.  Returns -1 (and removes the file, since nobody
 * could clean it up later) when out of memory. */
static int remember(written *w, char *path, tp_err *err)
{
    if (w->n == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 16;
        char **p = realloc(w->paths, cap * sizeof *p);
        if (!p) {
            unlink(path);
            free(path);
            return tp_errorf(err, "out of memory");
        }
        w->paths = p;
        w->cap = cap;
    }
    w->paths[w->n++] = path;
    return 0;
}

static void unwind(written *w, bool remove_files)
{
    for (size_t i = 0; i < w->n; i++) {
        if (remove_files)
            unlink(w->paths[i]);
        free(w->paths[i]);
    }
    free(w->paths);
    memset(w, 0, sizeof *w);
}

static int write_text(const char *dir, const char *name, const char *text, written *w, tp_err *err)
{
    char *path = tp_path_join(dir, name);
    if (!path)
        return tp_errorf(err, "%s/%s: out of memory", dir, name);
    if (tp_write_file_atomic(path, text, strlen(text), err)) {
        free(path);
        return -1;
    }
    return remember(w, path, err);
}

/* The tokenizer files, read and checked before anything is written. */
typedef struct tok_files {
    char *tokenizer, *config;   /* config NULL when there is none beside the source */
} tok_files;

static int load_tokenizer(const char *src, tok_files *t, tp_err *err)
{
    size_t len;
    if (tp_read_file_zst(src, SYNTH_TOKENIZER_MAX, &t->tokenizer, &len, err))
        return -1;
    /* A tokenizer.json is a JSON object with a "model"; catch a wrong file early. */
    cJSON *j = cJSON_ParseWithLength(t->tokenizer, len);
    bool ok = j && cJSON_IsObject(j) && cJSON_GetObjectItemCaseSensitive(j, "model");
    cJSON_Delete(j);
    if (!ok)
        return tp_errorf(err, "%s: not a tokenizer.json (no JSON object with a \"model\")", src);
    if (strlen(t->tokenizer) != len)
        return tp_errorf(err, "%s: contains a NUL byte", src);
    /* tokenizer_config.json beside the source, if there is one. */
    char *src_dir = tp_path_dir(src);
    char *cfg_path = src_dir ? tp_path_join(src_dir, "tokenizer_config.json") : NULL;
    free(src_dir);
    if (!cfg_path)
        return tp_errorf(err, "%s: out of memory", src);
    int rc = 0;
    if (access(cfg_path, F_OK) == 0) {
        size_t cfg_len;
        rc = tp_read_file(cfg_path, SYNTH_TOKENIZER_MAX, &t->config, &cfg_len, err);
        if (rc == 0) {
            j = cJSON_ParseWithLength(t->config, cfg_len);
            if (!j || !cJSON_IsObject(j))
                rc = tp_errorf(err, "%s: not a JSON object", cfg_path);
            cJSON_Delete(j);
        }
    }
    free(cfg_path);
    return rc;
}

static int make_dir(const char *dir, tp_err *err)
{
    char *p = strdup(dir);
    if (!p)
        return tp_errorf(err, "%s: out of memory", dir);
    for (char *s = p + 1; *s; s++) {
        if (*s != '/')
            continue;
        *s = 0;
        if (mkdir(p, 0755) && errno != EEXIST) {
            int e = errno;
            free(p);
            return tp_errorf(err, "%s: mkdir: %s", dir, strerror(e));
        }
        *s = '/';
    }
    int rc = mkdir(p, 0755) && errno != EEXIST ? -1 : 0;
    int e = errno;
    free(p);
    if (rc)
        return tp_errorf(err, "%s: mkdir: %s", dir, strerror(e));
    return 0;
}

/* Refuses an output directory that already holds files: a synthetic model
 * must never be mixed with (or overwrite) another one. */
static int check_empty_dir(const char *dir, tp_err *err)
{
    DIR *d = opendir(dir);
    if (!d)
        return tp_errorf(err, "%s: %s", dir, strerror(errno));
    struct dirent *e;
    int rc = 0;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            rc = tp_errorf(err, "%s: not empty (holds %s)", dir, e->d_name);
            break;
        }
    closedir(d);
    return rc;
}

/* Groups tensors into files of at most shard_size bytes (at least one
 * tensor each).  file_first gets n_files + 1 entries. */
static size_t plan_files(const synth_list *l, uint64_t shard_size, size_t *file_first)
{
    size_t n_files = 0;
    uint64_t in_file = 0;
    for (size_t i = 0; i < l->n; i++) {
        if (i == 0 || (shard_size && in_file + l->t[i].nbytes > shard_size && in_file > 0)) {
            file_first[n_files++] = i;
            in_file = 0;
        }
        in_file += l->t[i].nbytes;
    }
    file_first[n_files] = l->n;
    return n_files;
}

static char *index_json(const synth_list *l, const size_t *file_first, size_t n_files)
{
    uint64_t total = 0;
    for (size_t i = 0; i < l->n; i++)
        total += l->t[i].nbytes;
    cJSON *j = cJSON_CreateObject();
    cJSON *meta = cJSON_AddObjectToObject(j, "metadata");
    cJSON_AddNumberToObject(meta, "total_size", (double)total);
    cJSON *map = cJSON_AddObjectToObject(j, "weight_map");
    for (size_t f = 0; f < n_files; f++) {
        char name[64];
        snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", f + 1, n_files);
        for (size_t i = file_first[f]; i < file_first[f + 1]; i++)
            cJSON_AddStringToObject(map, l->t[i].name, name);
    }
    char *s = cJSON_Print(j);
    cJSON_Delete(j);
    return s;
}

static int write_weights(const char *dir, const tp_synth_opts *o, const synth_list *l,
                         written *w, tp_err *err)
{
    size_t *file_first = malloc((l->n + 1) * sizeof *file_first);
    synth_ctx *c = calloc(1, sizeof *c);
    tp_st_out_tensor *outs = calloc(l->n, sizeof *outs);
    if (!file_first || !c || !outs) {
        free(file_first);
        free(c);
        free(outs);
        return tp_errorf(err, "%s: out of memory", dir);
    }
    size_t n_files = plan_files(l, o->shard_size, file_first);
    for (size_t i = 0; i < l->n; i++) {
        outs[i].name = l->t[i].name;
        outs[i].dtype = TP_BF16;
        outs[i].ndim = l->t[i].ndim;
        for (int d = 0; d < l->t[i].ndim; d++)
            outs[i].shape[d] = l->t[i].shape[d];
    }
    c->list = l;
    c->file_first = file_first;
    c->seed = o->seed;
    fill_table(c->weight_table, 0.0, SYNTH_STD);
    fill_table(c->norm_table, 1.0, SYNTH_STD);
    c->pool = tp_pool_create(o->threads);
    uint64_t total = 0;
    for (size_t i = 0; i < l->n; i++)
        total += l->t[i].nbytes;
    c->progress = tp_progress_start("tpsynth", total, o->quiet);
    static const char *const meta[] = {"format", "pt", NULL};
    int rc = 0;
    for (size_t f = 0; f < n_files && rc == 0; f++) {
        char name[64];
        if (n_files == 1)
            snprintf(name, sizeof name, "model.safetensors");
        else
            snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", f + 1, n_files);
        char *path = tp_path_join(dir, name);
        if (!path) {
            rc = tp_errorf(err, "%s/%s: out of memory", dir, name);
            break;
        }
        c->file = f;
        rc = tp_st_write(path, outs + file_first[f], file_first[f + 1] - file_first[f], meta,
                         fill_tensor, c, err);
        if (rc)
            free(path);
        else
            rc = remember(w, path, err);
    }
    if (rc == 0 && n_files > 1) {
        char *idx = index_json(l, file_first, n_files);
        rc = idx ? write_text(dir, "model.safetensors.index.json", idx, w, err)
                 : tp_errorf(err, "%s: out of memory", dir);
        free(idx);
    }
    tp_progress_finish(c->progress);
    if (c->pool)
        tp_pool_destroy(c->pool);
    free(file_first);
    free(c);
    free(outs);
    return rc;
}

uint64_t tp_synth_param_count(const tp_synth_opts *o)
{
    synth_list l = {0};
    tp_err err;
    uint64_t n = 0;
    if (check_opts(o, &err) == 0 && build_list(o, &l, &err) == 0)
        for (size_t i = 0; i < l.n; i++)
            n += l.t[i].nbytes / 2;
    free(l.t);
    return n;
}

int tp_synth_write(const char *out_dir, const tp_synth_opts *o, tp_err *err)
{
    if (check_opts(o, err))
        return -1;
    tok_files tok = {0};
    if (o->tokenizer_path && load_tokenizer(o->tokenizer_path, &tok, err)) {
        free(tok.tokenizer);
        free(tok.config);
        return -1;
    }
    struct stat st;
    bool existed = stat(out_dir, &st) == 0;
    synth_list l = {0};
    written w = {0};
    int rc = make_dir(out_dir, err);
    if (rc == 0)
        rc = check_empty_dir(out_dir, err);
    if (rc) {
        free(tok.tokenizer);
        free(tok.config);
        return -1;
    }
    rc = build_list(o, &l, err);
    /* Weights first and config.json last: a directory left by a crash never
     * looks like a complete model; after an error the files are removed. */
    if (rc == 0)
        rc = write_weights(out_dir, o, &l, &w, err);
    if (rc == 0 && tok.tokenizer)
        rc = write_text(out_dir, "tokenizer.json", tok.tokenizer, &w, err);
    if (rc == 0 && tok.config)
        rc = write_text(out_dir, "tokenizer_config.json", tok.config, &w, err);
    char *gen = rc == 0 ? generation_config_json(o) : NULL;
    if (rc == 0)
        rc = gen ? write_text(out_dir, "generation_config.json", gen, &w, err)
                 : tp_errorf(err, "%s: out of memory", out_dir);
    free(gen);
    char *cfg = rc == 0 ? config_json(o) : NULL;
    if (rc == 0)
        rc = cfg ? write_text(out_dir, "config.json", cfg, &w, err)
                 : tp_errorf(err, "%s: out of memory", out_dir);
    free(cfg);
    if (rc == 0)
        rc = tp_fsync_dir(out_dir, err);
    unwind(&w, rc != 0);
    if (rc != 0 && !existed)
        rmdir(out_dir);     /* only succeeds when empty: nothing else is lost */
    free(l.t);
    free(tok.tokenizer);
    free(tok.config);
    return rc;
}
