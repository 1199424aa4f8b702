/* tpinspect - what a converted directory holds: format, conversion id, tp,
 * model type, codec, per-rank raw / stored bytes, tensor count and the
 * compression ratio per dtype.  --json prints the same as one JSON object;
 * --rank R lists one rank's tensors (offsets, sizes, splits);
 * --rank R --tensor NAME --dump FILE writes one tensor's decoded bytes. */
#include "cli.h"
#include "convert.h"
#include "loader.h"

#include <cJSON.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *prog = "tpinspect";

static void usage(FILE *f)
{
    fprintf(f,
            "usage: %s OUT [--json] [--rank R [--tensor NAME --dump FILE]]\n"
            "  OUT                   a converted directory\n"
            "  --json                print the summary as one JSON object\n"
            "  --rank R              list rank R's tensors (name, dtype, shapes, split,\n"
            "                        codec, file offset, stored / raw bytes, chunks)\n"
            "  --rank R --tensor NAME --dump FILE\n"
            "                        write the raw decoded bytes of one tensor of rank R\n"
            "  -h, --help            this help\n"
            "\n"
            "Examples:\n"
            "  %s out/\n"
            "  %s out/ --rank 1\n"
            "  %s out/ --rank 0 --tensor model.embed_tokens.weight --dump embed.bin\n",
            prog, prog, prog, prog);
}

/* Totals per dtype (index by tp_dtype). */
typedef struct dtype_stats {
    uint64_t raw, stored;
    size_t tensors;
} dtype_stats;
#define N_DTYPES (TP_I8 + 1)   /* every tp_dtype, the 8-bit ones included */

typedef struct rank_stats {
    uint64_t raw, stored;
    size_t tensors;
} rank_stats;

static double ratio(uint64_t raw, uint64_t stored)
{
    return stored ? (double)raw / (double)stored : 1.0;
}

static bool is_8bit(tp_dtype dt) { return dt == TP_F8_E4M3 || dt == TP_I8; }

/* Opens every rank file (index only) and sums bytes per rank and dtype;
 * *embed_q8: the embedding is 8-bit (a tied lm_head's table quantized,
 * tpconvert --quantize-lm-head). */
static int gather(const char *dir, const tp_manifest *m, rank_stats *ranks, dtype_stats *dts,
                  bool *embed_q8, tp_err *err)
{
    *embed_q8 = false;
    bool st = strcmp(m->format, "safetensors") == 0;
    for (int r = 0; r < m->tp; r++) {
        char *path = tp_path_join(dir, m->ranks[r].file);
        if (!path)
            return tp_errorf(err, "%s: out of memory", dir);
        if (st) {
            tp_st_file f;
            int rc = tp_st_open(&f, path, err);
            free(path);
            if (rc < 0)
                return -1;
            for (size_t i = 0; i < f.n_tensors; i++) {
                const tp_st_tensor *t = &f.tensors[i];
                dts[t->dtype].raw += t->nbytes;
                dts[t->dtype].stored += t->nbytes;
                dts[t->dtype].tensors++;
                *embed_q8 |= !strcmp(t->name, "model.embed_tokens.weight") && is_8bit(t->dtype);
                ranks[r].raw += t->nbytes;
                ranks[r].stored += t->nbytes;
            }
            ranks[r].tensors = f.n_tensors;
            tp_st_close(&f);
            continue;
        }
        tp_shard_reader rd;
        int rc = tp_shard_open(&rd, path, err);
        free(path);
        if (rc < 0)
            return -1;
        for (size_t i = 0; i < rd.index.n_tensors; i++) {
            const tp_shard_tensor *t = &rd.index.tensors[i];
            dts[t->dtype].raw += t->raw_size;
            dts[t->dtype].stored += t->stored_size;
            dts[t->dtype].tensors++;
            *embed_q8 |= !strcmp(t->name, "model.embed_tokens.weight") && is_8bit(t->dtype);
            ranks[r].raw += t->raw_size;
            ranks[r].stored += t->stored_size;
        }
        ranks[r].tensors = rd.index.n_tensors;
        tp_shard_close(&rd);
    }
    return 0;
}

/* The embedded config's quantization_config (FORMAT.md 1.5), parsed the
 * way tprun parses it; false when there is none (or no config). */
static bool manifest_quant(const tp_manifest *m, tp_model_config *cfg)
{
    tp_err ignored;
    const char *js = m->config_json;
    return js && tp_config_parse(cfg, js, strlen(js), "config.json", &ignored) == 0 &&
           cfg->quant != TP_QUANT_NONE;
}

/* "fp8 (e4m3 weights, one F32 scale per 128x128 block), kept unquantized: lm_head";
 * embed_q8: ", lm_head (tied to the embedding) quantized" instead. */
static void quant_text(const tp_model_config *cfg, bool embed_q8, char *out, size_t cap)
{
    size_t used;
    if (cfg->quant == TP_QUANT_FP8_BLOCK)
        used = (size_t)snprintf(out, cap, "fp8 (e4m3 weights, one F32 scale per %dx%d block)",
                                cfg->quant_block[0], cfg->quant_block[1]);
    else
        used = (size_t)snprintf(out, cap, "int8 (%s: int8 weights, one F32 scale per row)",
                                tp_quant_method(cfg->quant));
    const char *p = cfg->quant_skip;
    for (int i = 0; i < cfg->n_quant_skip && used < cap; i++, p += strlen(p) + 1)
        used += (size_t)snprintf(out + used, cap - used, "%s%s", i ? " " : ", kept unquantized: ", p);
    if (cfg->n_quant_skip < 0 && used < cap)
        used += (size_t)snprintf(out + used, cap - used, ", kept unquantized: lm_head");
    if (embed_q8 && used < cap)
        snprintf(out + used, cap - used, ", lm_head (tied to the embedding) quantized");
}

static void print_text(const char *dir, const tp_manifest *m, const rank_stats *ranks,
                       const dtype_stats *dts, bool embed_q8)
{
    uint64_t raw = 0, stored = 0;
    printf("%s\n", dir);
    printf("  format         %s (version %d)\n", m->format, m->format_version);
    printf("  conversion id  %s\n", m->conversion_id);
    printf("  model type     %s\n", m->model_type ? m->model_type : "?");
    printf("  tp             %d%s%s\n", m->tp, m->vocab_parallel ? " (vocab parallel)" : "",
           m->expert_parallel ? " (expert parallel)" : "");
    static tp_model_config cfg;   /* large: off the stack */
    char quant[512] = "none";
    if (manifest_quant(m, &cfg))
        quant_text(&cfg, embed_q8, quant, sizeof quant);
    printf("  quantization   %s\n", quant);
    printf("  codec          %s", m->codec ? m->codec : "?");
    if (m->codec && strcmp(m->codec, "zstd") == 0)
        printf(" level %d", m->level);
    printf("\n  copied files  ");
    for (size_t i = 0; i < m->n_files; i++)
        printf(" %s", m->files[i].name);
    printf("%s\n", m->n_files ? "" : " none");
    printf("  %-5s %-36s %8s %14s %14s %7s\n", "rank", "file", "tensors", "raw bytes",
           "stored bytes", "ratio");
    for (int r = 0; r < m->tp; r++) {
        printf("  %-5d %-36s %8zu %14llu %14llu %7.3f\n", r, m->ranks[r].file, ranks[r].tensors,
               (unsigned long long)ranks[r].raw, (unsigned long long)ranks[r].stored,
               ratio(ranks[r].raw, ranks[r].stored));
        raw += ranks[r].raw;
        stored += ranks[r].stored;
    }
    printf("  %-7s %-34s %8s %14s %14s %7s\n", "dtype", "", "tensors", "raw bytes", "stored bytes",
           "ratio");
    for (int d = 1; d < N_DTYPES; d++)
        if (dts[d].tensors)
            printf("  %-7s %-34s %8zu %14llu %14llu %7.3f\n", tp_dtype_name((tp_dtype)d), "",
                   dts[d].tensors, (unsigned long long)dts[d].raw,
                   (unsigned long long)dts[d].stored, ratio(dts[d].raw, dts[d].stored));
    printf("  total: %llu raw bytes, %llu stored, ratio %.3f\n", (unsigned long long)raw,
           (unsigned long long)stored, ratio(raw, stored));
}

static int print_json(const tp_manifest *m, const rank_stats *ranks, const dtype_stats *dts,
                      bool embed_q8)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "format", m->format);
    cJSON_AddNumberToObject(o, "format_version", m->format_version);
    cJSON_AddStringToObject(o, "conversion_id", m->conversion_id);
    cJSON_AddNumberToObject(o, "tp", m->tp);
    cJSON_AddStringToObject(o, "model_type", m->model_type ? m->model_type : "");
    cJSON_AddBoolToObject(o, "vocab_parallel", m->vocab_parallel);
    cJSON_AddBoolToObject(o, "expert_parallel", m->expert_parallel);
    static tp_model_config cfg;   /* large: off the stack */
    if (manifest_quant(m, &cfg)) {
        cJSON *q = cJSON_AddObjectToObject(o, "quantization");
        cJSON_AddStringToObject(q, "quant_method", tp_quant_method(cfg.quant));
        cJSON_AddStringToObject(q, "weight_dtype", tp_dtype_name(tp_quant_dtype(cfg.quant)));
        cJSON_AddStringToObject(q, "scale_suffix", tp_quant_scale_suffix(cfg.quant));
        if (cfg.quant == TP_QUANT_FP8_BLOCK) {
            cJSON *b = cJSON_AddArrayToObject(q, "weight_block_size");
            cJSON_AddItemToArray(b, cJSON_CreateNumber(cfg.quant_block[0]));
            cJSON_AddItemToArray(b, cJSON_CreateNumber(cfg.quant_block[1]));
        }
        cJSON *skip = cJSON_AddArrayToObject(q, "modules_to_not_convert");
        const char *p = cfg.quant_skip;
        for (int i = 0; i < cfg.n_quant_skip; i++, p += strlen(p) + 1)
            cJSON_AddItemToArray(skip, cJSON_CreateString(p));
        if (cfg.n_quant_skip < 0)
            cJSON_AddItemToArray(skip, cJSON_CreateString("lm_head"));
        cJSON_AddBoolToObject(q, "tied_lm_head_quantized", embed_q8);
    } else {
        cJSON_AddNullToObject(o, "quantization");
    }
    cJSON_AddStringToObject(o, "codec", m->codec ? m->codec : "");
    cJSON_AddNumberToObject(o, "level", m->level);
    cJSON *files = cJSON_AddArrayToObject(o, "files");
    for (size_t i = 0; i < m->n_files; i++)
        cJSON_AddItemToArray(files, cJSON_CreateString(m->files[i].name));
    cJSON *jr = cJSON_AddArrayToObject(o, "ranks");
    uint64_t raw = 0, stored = 0;
    size_t tensors = 0;
    for (int r = 0; r < m->tp; r++) {
        cJSON *x = cJSON_CreateObject();
        cJSON_AddNumberToObject(x, "rank", r);
        cJSON_AddStringToObject(x, "file", m->ranks[r].file);
        cJSON_AddNumberToObject(x, "size", (double)m->ranks[r].size);
        cJSON_AddNumberToObject(x, "tensors", (double)ranks[r].tensors);
        cJSON_AddNumberToObject(x, "raw_bytes", (double)ranks[r].raw);
        cJSON_AddNumberToObject(x, "stored_bytes", (double)ranks[r].stored);
        cJSON_AddNumberToObject(x, "ratio", ratio(ranks[r].raw, ranks[r].stored));
        cJSON_AddItemToArray(jr, x);
        raw += ranks[r].raw;
        stored += ranks[r].stored;
        tensors += ranks[r].tensors;
    }
    cJSON *jd = cJSON_AddObjectToObject(o, "dtypes");
    for (int d = 1; d < N_DTYPES; d++) {
        if (!dts[d].tensors)
            continue;
        cJSON *x = cJSON_AddObjectToObject(jd, tp_dtype_name((tp_dtype)d));
        cJSON_AddNumberToObject(x, "tensors", (double)dts[d].tensors);
        cJSON_AddNumberToObject(x, "raw_bytes", (double)dts[d].raw);
        cJSON_AddNumberToObject(x, "stored_bytes", (double)dts[d].stored);
        cJSON_AddNumberToObject(x, "ratio", ratio(dts[d].raw, dts[d].stored));
    }
    cJSON_AddNumberToObject(o, "tensors", (double)tensors);
    cJSON_AddNumberToObject(o, "raw_bytes", (double)raw);
    cJSON_AddNumberToObject(o, "stored_bytes", (double)stored);
    cJSON_AddNumberToObject(o, "ratio", ratio(raw, stored));
    char *text = cJSON_Print(o);
    cJSON_Delete(o);
    if (!text)
        return -1;
    printf("%s\n", text);
    free(text);
    return 0;
}

/* Writes the decoded bytes of one tensor of one rank to file. */
static int dump_tensor(const char *dir, const tp_manifest *m, int rank, const char *name,
                       const char *file, tp_err *err)
{
    if (rank < 0 || rank >= m->tp)
        return tp_errorf(err, "%s: rank %d is not in this conversion (tp=%d)", dir, rank, m->tp);
    char *path = tp_path_join(dir, m->ranks[rank].file);
    if (!path)
        return tp_errorf(err, "%s: out of memory", dir);
    int rc;
    if (strcmp(m->format, "safetensors") == 0) {
        tp_st_file f;
        rc = tp_st_open(&f, path, err);
        if (rc == 0) {
            const tp_st_tensor *t = tp_st_find(&f, name);
            rc = t ? tp_write_file_atomic(file, t->data, t->nbytes, err)
                   : tp_errorf(err, "%s: rank %d has no tensor %s", dir, rank, name);
            tp_st_close(&f);
        }
        free(path);
        return rc;
    }
    tp_shard_reader rd;
    rc = tp_shard_open(&rd, path, err);
    free(path);
    if (rc < 0)
        return -1;
    const tp_shard_tensor *t = tp_shard_find(&rd.index, name);
    if (!t) {
        tp_shard_close(&rd);
        return tp_errorf(err, "%s: rank %d has no tensor %s", dir, rank, name);
    }
    uint8_t *buf = malloc(t->raw_size ? (size_t)t->raw_size : 1);
    if (!buf)
        rc = tp_errorf(err, "%s: tensor %s: cannot allocate %llu bytes", dir, name,
                       (unsigned long long)t->raw_size);
    else if (tp_shard_read_tensor(&rd, t, buf, NULL, true, err) < 0)
        rc = -1;
    else
        rc = tp_write_file_atomic(file, buf, (size_t)t->raw_size, err);
    free(buf);
    tp_shard_close(&rd);
    return rc;
}

static void shape_text(const uint64_t *shape, int ndim, char *out, size_t cap)
{
    size_t used = (size_t)snprintf(out, cap, "[");
    for (int d = 0; d < ndim && used < cap; d++)
        used += (size_t)snprintf(out + used, cap - used, "%s%llu", d ? "," : "",
                                 (unsigned long long)shape[d]);
    if (used < cap)
        snprintf(out + used, cap - used, "]");
}

static void split_text(const tp_split *sp, char *out, size_t cap)
{
    if (sp->dim < 0) {
        snprintf(out, cap, "replicated");
        return;
    }
    size_t used = (size_t)snprintf(out, cap, "dim%d:", sp->dim);
    for (int k = 0; k < sp->n_ranges && used < cap; k++)
        used += (size_t)snprintf(out + used, cap - used, "%s%llu-%llu", k ? "," : "",
                                 (unsigned long long)sp->start[k], (unsigned long long)sp->end[k]);
}

/* One line (or JSON object) per tensor of a tpshard rank file. */
static int list_rank(const char *dir, const tp_manifest *m, int rank, bool json, tp_err *err)
{
    if (rank < 0 || rank >= m->tp)
        return tp_errorf(err, "%s: rank %d is not in this conversion (tp=%d)", dir, rank, m->tp);
    if (strcmp(m->format, "tpshard") != 0)
        return tp_errorf(err, "%s: --rank lists tpshard rank files; this is a %s export", dir,
                         m->format);
    char *path = tp_path_join(dir, m->ranks[rank].file);
    if (!path)
        return tp_errorf(err, "%s: out of memory", dir);
    tp_shard_reader rd;
    int rc = tp_shard_open(&rd, path, err);
    free(path);
    if (rc < 0)
        return -1;
    cJSON *arr = json ? cJSON_CreateArray() : NULL;
    if (!json)
        printf("%-56s %-7s %-14s %-14s %-22s %-5s %10s %10s %10s %6s\n", "tensor", "dtype", "shape",
               "global", "split", "codec", "offset", "stored", "raw", "chunks");
    for (size_t i = 0; i < rd.index.n_tensors; i++) {
        const tp_shard_tensor *t = &rd.index.tensors[i];
        char shape[128], global[128], split[128];
        shape_text(t->shape, t->ndim, shape, sizeof shape);
        shape_text(t->global_shape, t->ndim, global, sizeof global);
        split_text(&t->split, split, sizeof split);
        if (!json) {
            printf("%-56s %-7s %-14s %-14s %-22s %-5s %10llu %10llu %10llu %6zu\n", t->name,
                   tp_dtype_name(t->dtype), shape, global, split, tp_codec_name(t->codec),
                   (unsigned long long)t->offset, (unsigned long long)t->stored_size,
                   (unsigned long long)t->raw_size, t->n_chunks);
            continue;
        }
        cJSON *x = cJSON_CreateObject();
        cJSON_AddStringToObject(x, "name", t->name);
        cJSON_AddStringToObject(x, "dtype", tp_dtype_name(t->dtype));
        cJSON_AddStringToObject(x, "shape", shape);
        cJSON_AddStringToObject(x, "global_shape", global);
        cJSON_AddStringToObject(x, "split", split);
        cJSON_AddStringToObject(x, "style", t->style ? t->style : "");
        cJSON_AddBoolToObject(x, "reduce_bias", t->reduce_bias);
        cJSON_AddStringToObject(x, "codec", tp_codec_name(t->codec));
        cJSON_AddNumberToObject(x, "offset", (double)t->offset);
        cJSON_AddNumberToObject(x, "stored_bytes", (double)t->stored_size);
        cJSON_AddNumberToObject(x, "raw_bytes", (double)t->raw_size);
        cJSON_AddNumberToObject(x, "chunks", (double)t->n_chunks);
        cJSON_AddItemToArray(arr, x);
    }
    tp_shard_close(&rd);
    if (json) {
        char *text = cJSON_Print(arr);
        cJSON_Delete(arr);
        if (!text)
            return tp_errorf(err, "out of memory");
        printf("%s\n", text);
        free(text);
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *dir = NULL, *tensor = NULL, *dump = NULL;
    int rank = -1;
    bool json = false, have_rank = false;
    cli_init(prog, usage);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--json") == 0) {
            json = true;
        } else if (strcmp(a, "--rank") == 0) {
            const char *v = cli_value(argc, argv, &i);
            if (!v)
                return cli_usage_error("flag %s needs a number", a);
            long n;
            if (!cli_long(v, 0, 1000000, &n))
                return cli_usage_error("flag --rank: \"%s\" is not a rank", v);
            rank = (int)n;
            have_rank = true;
        } else if (strcmp(a, "--tensor") == 0) {
            if (!(tensor = cli_value(argc, argv, &i)))
                return cli_usage_error("flag %s needs a tensor name", a);
        } else if (strcmp(a, "--dump") == 0) {
            if (!(dump = cli_value(argc, argv, &i)))
                return cli_usage_error("flag %s needs a file name", a);
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        } else if (cli_operand(a, &dir)) {
            return 2;
        }
    }
    if (!dir)
        return cli_usage_error("missing OUT (a converted directory)");
    if ((tensor || dump) && !(have_rank && tensor && dump))
        return cli_usage_error("flags --tensor and --dump go together, with --rank");

    tp_err err;
    struct stat st;
    if (stat(dir, &st) == 0 && !S_ISDIR(st.st_mode)) {
        tp_errorf(&err, "%s: not a directory (for a bundle: tpbundle verify, or unpack it first)",
                  dir);
        return cli_fail(&err);
    }
    tp_manifest m;
    if (tp_load_manifest(dir, &m, &err) < 0)
        return cli_fail(&err);
    int rc = 0;
    if (dump) {
        if (dump_tensor(dir, &m, rank, tensor, dump, &err) < 0)
            rc = cli_fail(&err);
        tp_manifest_free(&m);
        return rc;
    }
    if (have_rank) {
        if (list_rank(dir, &m, rank, json, &err) < 0)
            rc = cli_fail(&err);
        tp_manifest_free(&m);
        return rc;
    }
    rank_stats *ranks = calloc((size_t)m.tp, sizeof *ranks);
    dtype_stats dts[N_DTYPES];
    memset(dts, 0, sizeof dts);
    bool embed_q8 = false;
    if (!ranks) {
        tp_errorf(&err, "out of memory");
        rc = cli_fail(&err);
    } else if (gather(dir, &m, ranks, dts, &embed_q8, &err) < 0) {
        rc = cli_fail(&err);
    } else if (json) {
        if (print_json(&m, ranks, dts, embed_q8) < 0) {
            tp_errorf(&err, "out of memory");
            rc = cli_fail(&err);
        }
    } else {
        print_text(dir, &m, ranks, dts, embed_q8);
    }
    free(ranks);
    tp_manifest_free(&m);
    return rc;
}
