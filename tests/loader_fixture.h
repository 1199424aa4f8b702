/* loader_fixture.h - small conversions built directly with the shardfmt
 * writer API, so that the loader's tests do not depend on tpconvert.
 * Included by tests/test_loader.c, test_bundle.c and test_load_stream.c
 * (static only; the checking and temporary directory come from check.h). */
#ifndef TP_LOADER_FIXTURE_H
#define TP_LOADER_FIXTURE_H

#include "loader.h"
#include "check.h"

/* Each test uses a different subset of these helpers. */
#pragma GCC diagnostic ignored "-Wunused-function"

#include <cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---------------------------------------------------------------- files */

static char *fx_path(const char *dir, const char *fmt, ...)
{
    char name[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    return tp_path_join(dir, name);
}

static int fx_run(const char *cmd)
{
    int rc = system(cmd);
    if (rc != 0)
        fprintf(stderr, "command failed (%d): %s\n", rc, cmd);
    return rc;
}

static void fx_copy(const char *from, const char *to)
{
    char cmd[2400];
    snprintf(cmd, sizeof cmd, "cp -a '%s' '%s'", from, to);
    if (fx_run(cmd) != 0)
        exit(2);
}

/* XORs one byte of a file at off. */
static void fx_flip_byte(const char *path, uint64_t off)
{
    int fd = open(path, O_RDWR);
    uint8_t b;
    if (fd < 0 || pread(fd, &b, 1, (off_t)off) != 1) {
        fprintf(stderr, "flip %s@%llu: %s\n", path, (unsigned long long)off, strerror(errno));
        exit(2);
    }
    b ^= 0x5a;
    if (pwrite(fd, &b, 1, (off_t)off) != 1)
        exit(2);
    close(fd);
}

static void fx_write_text(const char *path, const char *text)
{
    tp_err err;
    if (tp_write_file_atomic(path, text, strlen(text), &err) != 0) {
        fprintf(stderr, "%s\n", err.msg);
        exit(2);
    }
}

/* --------------------------------------------------------------- model */

typedef enum fx_split_kind {
    FX_REPLICATED,
    FX_EVEN,     /* dim cut in tp equal parts */
    FX_PACKED,   /* two halves along dim, each cut in tp parts (fused gate_up) */
    FX_KV,       /* FX_KV_HEADS heads along dim; ranks share a head when tp > heads */
} fx_split_kind;

#define FX_KV_HEADS 2

typedef struct fx_tensor {
    const char *name;
    tp_dtype dtype;
    int ndim;
    uint64_t shape[TP_MAX_DIMS];
    int dim;
    fx_split_kind kind;
    const char *style;
    uint8_t *data;
    size_t nbytes;
} fx_tensor;

typedef struct fx_model {
    size_t n;
    fx_tensor t[12];
} fx_model;

static void fx_add(fx_model *m, const char *name, tp_dtype dt, int ndim, uint64_t d0, uint64_t d1,
                   int dim, fx_split_kind kind, const char *style)
{
    fx_tensor *t = &m->t[m->n++];
    memset(t, 0, sizeof *t);
    t->name = name;
    t->dtype = dt;
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->dim = dim;
    t->kind = kind;
    t->style = style;
    if (!tp_tensor_nbytes(dt, t->shape, ndim, &t->nbytes))
        exit(2);
    t->data = malloc(t->nbytes);
    check_rng rng = check_rng_seed(0x9e3779b97f4a7c15ull ^ (uint64_t)strlen(name) * 0x100000001b3ull ^ m->n);
    size_t n = t->nbytes / tp_dtype_size(dt);
    for (size_t i = 0; i < n; i++) {
        /* Smallish normal-looking weights: realistic for the byte-plane codec. */
        float v = (float)((int64_t)(check_rng_next(&rng) % 20001) - 10000) / 40000.0f;
        if (dt == TP_F32) {
            memcpy(t->data + 4 * i, &v, 4);
        } else {
            uint16_t h = tp_f32_to_bf16(v); /* F16 tensors just hold these bits too */
            memcpy(t->data + 2 * i, &h, 2);
        }
    }
}

static void fx_model_init(fx_model *m)
{
    memset(m, 0, sizeof *m);
    fx_add(m, "model.embed_tokens.weight", TP_BF16, 2, 64, 16, 0, FX_EVEN, "vocab");
    fx_add(m, "model.layers.0.self_attn.q_proj.weight", TP_BF16, 2, 32, 16, 0, FX_EVEN, "colwise");
    fx_add(m, "model.layers.0.self_attn.k_proj.weight", TP_BF16, 2, 8, 16, 0, FX_KV, "kv_colwise");
    fx_add(m, "model.layers.0.self_attn.o_proj.weight", TP_BF16, 2, 16, 32, 1, FX_EVEN, "rowwise");
    fx_add(m, "model.layers.0.mlp.gate_up_proj.weight", TP_BF16, 2, 32, 16, 0, FX_PACKED,
           "packed_colwise");
    fx_add(m, "model.layers.0.mlp.down_proj.weight", TP_F16, 2, 16, 16, 1, FX_EVEN, "rowwise");
    fx_add(m, "model.layers.0.input_layernorm.weight", TP_F32, 1, 16, 0, -1, FX_REPLICATED,
           "replicated");
    /* 512 KiB: several chunks per rank with the 32 KiB chunk size below. */
    fx_add(m, "lm_head.weight", TP_F32, 2, 128, 1024, 0, FX_EVEN, "colwise");
}

static void fx_model_free(fx_model *m)
{
    for (size_t i = 0; i < m->n; i++)
        free(m->t[i].data);
}

static tp_split fx_split(const fx_tensor *t, int rank, int tp)
{
    tp_split sp;
    memset(&sp, 0, sizeof sp);
    sp.dim = t->kind == FX_REPLICATED ? -1 : t->dim;
    if (sp.dim < 0)
        return sp;
    uint64_t d = t->shape[t->dim];
    sp.n_ranges = 1;
    switch (t->kind) {
    case FX_EVEN:
        sp.start[0] = d * (uint64_t)rank / (uint64_t)tp;
        sp.end[0] = d * (uint64_t)(rank + 1) / (uint64_t)tp;
        break;
    case FX_PACKED: {
        uint64_t h = d / 2;
        sp.n_ranges = 2;
        for (int k = 0; k < 2; k++) {
            sp.start[k] = (uint64_t)k * h + h * (uint64_t)rank / (uint64_t)tp;
            sp.end[k] = (uint64_t)k * h + h * (uint64_t)(rank + 1) / (uint64_t)tp;
        }
        break;
    }
    case FX_KV:
        if (tp <= FX_KV_HEADS) {
            sp.start[0] = d * (uint64_t)rank / (uint64_t)tp;
            sp.end[0] = d * (uint64_t)(rank + 1) / (uint64_t)tp;
        } else {
            uint64_t head = (uint64_t)rank * FX_KV_HEADS / (uint64_t)tp, rows = d / FX_KV_HEADS;
            sp.start[0] = head * rows;
            sp.end[0] = (head + 1) * rows;
        }
        break;
    case FX_REPLICATED:
        break;
    }
    return sp;
}

/* The local bytes and shape of t under split sp (malloc'd). */
static uint8_t *fx_local(const fx_tensor *t, const tp_split *sp, uint64_t *shape, size_t *nbytes)
{
    memcpy(shape, t->shape, sizeof t->shape);
    if (sp->dim < 0) {
        uint8_t *p = malloc(t->nbytes);
        memcpy(p, t->data, t->nbytes);
        *nbytes = t->nbytes;
        return p;
    }
    int d = sp->dim;
    uint64_t held = 0;
    for (int k = 0; k < sp->n_ranges; k++)
        held += sp->end[k] - sp->start[k];
    shape[d] = held;
    size_t el = tp_dtype_size(t->dtype);
    uint64_t outer = 1, inner = el;
    for (int k = 0; k < d; k++)
        outer *= t->shape[k];
    for (int k = d + 1; k < t->ndim; k++)
        inner *= t->shape[k];
    *nbytes = (size_t)(outer * held * inner);
    uint8_t *p = malloc(*nbytes ? *nbytes : 1), *w = p;
    for (uint64_t o = 0; o < outer; o++)
        for (int k = 0; k < sp->n_ranges; k++) {
            size_t n = (size_t)((sp->end[k] - sp->start[k]) * inner);
            memcpy(w, t->data + (o * t->shape[d] + sp->start[k]) * inner, n);
            w += n;
        }
    return p;
}

/* ------------------------------------------------------- source model dir */

typedef struct fx_fill_src {
    const fx_model *m;
} fx_fill_src;

static int fx_fill_source(size_t i, uint8_t *dst, size_t nbytes, void *arg, tp_err *err)
{
    const fx_model *m = arg;
    memcpy(dst, m->t[i].data, nbytes);
    return 0;
}

static const char *fx_config_json =
    "{\"model_type\": \"llama\", \"hidden_size\": 16, \"num_attention_heads\": 4, "
    "\"num_key_value_heads\": 2, \"vocab_size\": 64}\n";

/* Writes model_dir/config.json and model.safetensors from m. */
static void fx_write_source(const fx_model *m, const char *model_dir)
{
    mkdir(model_dir, 0755);
    char *cfg = fx_path(model_dir, "config.json");
    fx_write_text(cfg, fx_config_json);
    free(cfg);
    tp_st_out_tensor out[12];
    for (size_t i = 0; i < m->n; i++) {
        memset(&out[i], 0, sizeof out[i]);
        out[i].name = m->t[i].name;
        out[i].dtype = m->t[i].dtype;
        out[i].ndim = m->t[i].ndim;
        memcpy(out[i].shape, m->t[i].shape, sizeof out[i].shape);
    }
    char *path = fx_path(model_dir, "model.safetensors");
    tp_err err;
    if (tp_st_write(path, out, m->n, NULL, fx_fill_source, (void *)m, &err) != 0) {
        fprintf(stderr, "fx_write_source: %s\n", err.msg);
        exit(2);
    }
    free(path);
}

/* ------------------------------------------------------------ conversions */

typedef struct fx_fill_arg {
    const uint8_t *local;
} fx_fill_arg;

static int fx_fill_local(void *arg, uint64_t raw_off, uint8_t *dst, size_t len, tp_err *err)
{
    const fx_fill_arg *a = arg;
    memcpy(dst, a->local + raw_off, len);
    return 0;
}

typedef struct fx_conv_opts {
    int tp;
    tp_codec codec;
    const char *format;        /* "tpshard" (default) or "safetensors" */
    const char *conversion_id; /* NULL: a fresh one */
    const char *skip_tensor;   /* leave this tensor out of every rank */
    int gap_rank;              /* > 0: this rank claims the previous rank's lm_head rows (a hole) */
} fx_conv_opts;

static void fx_rank_name(char *out, size_t cap, int r, int tp, const char *ext)
{
    snprintf(out, cap, "rank-%05d-of-%05d.%s", r, tp, ext);
}

static int fx_write_rank_tpshard(const fx_model *m, const char *path, const char *id, int r,
                                 const fx_conv_opts *o, tp_manifest_rank *mr, tp_err *err)
{
    tp_shard_writer_opts wo = {.codec = o->codec, .level = 3, .chunk_size = 32768};
    tp_shard_writer *w;
    if (tp_shard_writer_open(&w, path, id, r, o->tp, &wo, err) != 0)
        return -1;
    size_t n = 0;
    for (size_t i = 0; i < m->n; i++) {
        const fx_tensor *t = &m->t[i];
        if (o->skip_tensor && strcmp(t->name, o->skip_tensor) == 0)
            continue;
        tp_shard_tensor_desc d;
        memset(&d, 0, sizeof d);
        d.name = t->name;
        d.dtype = t->dtype;
        d.ndim = t->ndim;
        memcpy(d.global_shape, t->shape, sizeof d.global_shape);
        d.split = fx_split(t, r, o->tp);
        if (o->gap_rank > 0 && r == o->gap_rank && strcmp(t->name, "lm_head.weight") == 0 && d.split.dim == 0) {
            /* Claim the previous rank's rows instead of our own: a hole. */
            uint64_t len = d.split.end[0] - d.split.start[0];
            d.split.start[0] -= len;
            d.split.end[0] -= len;
        }
        d.style = t->style;
        d.reduce_bias = false;
        size_t nb;
        uint8_t *local = fx_local(t, &d.split, d.shape, &nb);
        fx_fill_arg fa = {local};
        int rc = tp_shard_writer_add(w, &d, fx_fill_local, &fa, err);
        free(local);
        if (rc != 0) {
            tp_shard_writer_abort(w);
            return -1;
        }
        n++;
    }
    if (tp_shard_writer_finish(w, &mr->checksum, &mr->size, &mr->raw_bytes, &mr->stored_bytes,
                               err) != 0)
        return -1;
    mr->n_tensors = n;
    return 0;
}

typedef struct fx_st_fill {
    uint8_t **locals;
} fx_st_fill;

static int fx_fill_st(size_t i, uint8_t *dst, size_t nbytes, void *arg, tp_err *err)
{
    fx_st_fill *f = arg;
    memcpy(dst, f->locals[i], nbytes);
    return 0;
}

/* The safetensors export: tp_splits metadata as tpconvert writes it. */
static int fx_write_rank_st(const fx_model *m, const char *path, int r, const fx_conv_opts *o,
                            tp_manifest_rank *mr, tp_err *err)
{
    tp_st_out_tensor out[12];
    uint8_t *locals[12];
    size_t n = 0;
    uint64_t raw = 0;
    cJSON *splits = cJSON_CreateObject();
    for (size_t i = 0; i < m->n; i++) {
        const fx_tensor *t = &m->t[i];
        if (o->skip_tensor && strcmp(t->name, o->skip_tensor) == 0)
            continue;
        tp_split sp = fx_split(t, r, o->tp);
        memset(&out[n], 0, sizeof out[n]);
        out[n].name = t->name;
        out[n].dtype = t->dtype;
        out[n].ndim = t->ndim;
        size_t nb;
        locals[n] = fx_local(t, &sp, out[n].shape, &nb);
        raw += nb;
        if (sp.dim >= 0) {
            cJSON *s = cJSON_AddObjectToObject(splits, t->name);
            cJSON_AddNumberToObject(s, "dim", sp.dim);
            cJSON *ranges = cJSON_AddArrayToObject(s, "ranges");
            for (int k = 0; k < sp.n_ranges; k++) {
                cJSON *pair = cJSON_CreateArray();
                cJSON_AddItemToArray(pair, cJSON_CreateNumber((double)sp.start[k]));
                cJSON_AddItemToArray(pair, cJSON_CreateNumber((double)sp.end[k]));
                cJSON_AddItemToArray(ranges, pair);
            }
            cJSON_AddStringToObject(s, "style", t->style);
            cJSON_AddBoolToObject(s, "reduce_bias", 0);
        }
        n++;
    }
    /* tp_st_write wants tensors sorted by name. */
    for (size_t i = 1; i < n; i++)
        for (size_t j = i; j > 0 && strcmp(out[j - 1].name, out[j].name) > 0; j--) {
            tp_st_out_tensor tt = out[j];
            out[j] = out[j - 1];
            out[j - 1] = tt;
            uint8_t *tl = locals[j];
            locals[j] = locals[j - 1];
            locals[j - 1] = tl;
        }
    char *json = cJSON_PrintUnformatted(splits);
    cJSON_Delete(splits);
    const char *meta[] = {"tp_splits", json, NULL};
    fx_st_fill f = {locals};
    int rc = tp_st_write(path, out, n, meta, fx_fill_st, &f, err);
    free(json);
    for (size_t i = 0; i < n; i++)
        free(locals[i]);
    if (rc != 0)
        return -1;
    char *text;
    size_t len;
    if (tp_read_file(path, (size_t)1 << 30, &text, &len, err) != 0)
        return -1;
    mr->checksum = tp_xxh3(text, len);
    mr->size = len;
    free(text);
    mr->raw_bytes = raw;
    mr->stored_bytes = mr->size;
    mr->n_tensors = n;
    return 0;
}

/* Writes a conversion of m into dir (created): rank files, config.json,
 * tokenizer.json and manifest.json.  The id used goes to id_out. */
static void fx_write_conversion(const fx_model *m, const char *dir, const fx_conv_opts *o,
                                char id_out[33])
{
    tp_err err;
    mkdir(dir, 0755);
    bool st = o->format && strcmp(o->format, "safetensors") == 0;
    char id[33];
    if (o->conversion_id)
        snprintf(id, sizeof id, "%s", o->conversion_id);
    else
        tp_new_conversion_id(id);
    if (id_out)
        memcpy(id_out, id, 33);
    tp_manifest man;
    memset(&man, 0, sizeof man);
    man.format_version = TP_FORMAT_VERSION;
    man.format = (char *)(st ? "safetensors" : "tpshard");
    memcpy(man.conversion_id, id, 33);
    man.tp = o->tp;
    man.model_type = (char *)"llama";
    man.vocab_parallel = true;
    man.codec = (char *)tp_codec_name(st ? TP_CODEC_NONE : o->codec);
    man.level = 3;
    man.config_json = (char *)fx_config_json;
    man.plan_json = (char *)"{\"*\": \"test\"}";
    /* The copied files, pinned by size and XXH3 like tpconvert does. */
    static const char fx_tokenizer_json[] = "{\"version\": \"1.0\", \"model\": {\"type\": \"BPE\"}}\n";
    tp_manifest_file files[] = {
        {(char *)"config.json", strlen(fx_config_json), tp_xxh3(fx_config_json, strlen(fx_config_json))},
        {(char *)"tokenizer.json", strlen(fx_tokenizer_json), tp_xxh3(fx_tokenizer_json, strlen(fx_tokenizer_json))},
    };
    man.n_files = 2;
    man.files = files;
    man.ranks = calloc((size_t)o->tp, sizeof *man.ranks);
    char names[64][64];
    for (int r = 0; r < o->tp; r++) {
        fx_rank_name(names[r], sizeof names[r], r, o->tp, st ? "safetensors" : "tpshard");
        char *path = tp_path_join(dir, names[r]);
        man.ranks[r].rank = r;
        man.ranks[r].file = names[r];
        int rc = st ? fx_write_rank_st(m, path, r, o, &man.ranks[r], &err)
                    : fx_write_rank_tpshard(m, path, id, r, o, &man.ranks[r], &err);
        free(path);
        if (rc != 0) {
            fprintf(stderr, "fx_write_conversion: %s\n", err.msg);
            exit(2);
        }
    }
    char *cfg = fx_path(dir, "config.json"), *tok = fx_path(dir, "tokenizer.json");
    fx_write_text(cfg, fx_config_json);
    fx_write_text(tok, fx_tokenizer_json);
    free(cfg);
    free(tok);
    if (tp_manifest_write(dir, &man, &err) != 0) {
        fprintf(stderr, "fx_write_conversion: %s\n", err.msg);
        exit(2);
    }
    free(man.ranks);
}

/* Checks a loaded rank holds exactly m's slices for that rank. */
static void fx_check_loaded(const fx_model *m, const tp_loaded_rank *lr, int tp)
{
    CHECK(lr->n_tensors == m->n);
    for (size_t i = 0; i < m->n; i++) {
        const fx_tensor *t = &m->t[i];
        const tp_loaded_tensor *lt = tp_loaded_find(lr, t->name);
        CHECK(lt != NULL);
        if (!lt)
            continue;
        tp_split sp = fx_split(t, lr->rank, tp);
        uint64_t shape[TP_MAX_DIMS];
        size_t nb;
        uint8_t *want = fx_local(t, &sp, shape, &nb);
        CHECK(lt->info->raw_size == nb);
        CHECK(lt->info->dtype == t->dtype);
        CHECK(lt->info->split.dim == sp.dim);
        CHECK(memcmp(lt->info->shape, shape, sizeof(uint64_t) * (size_t)t->ndim) == 0);
        CHECK(lt->info->raw_size != nb || memcmp(lt->data, want, nb) == 0, "rank %d tensor %s: data differs",
              lr->rank, t->name);
        free(want);
    }
}

#endif
