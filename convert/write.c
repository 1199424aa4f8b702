/* write.c - writing a prepared conversion: one file per rank, the copied
 * configs and tokenizer, manifest.json last.
 *
 * The rank files are streamed: each tensor is added to every rank's writer
 * in turn, and the writers' fill callbacks copy the rank's slice straight out
 * of the mmapped source, one chunk at a time, on the shared pool.  Memory is
 * bounded by the pool's threads x chunk size, never by a tensor.
 *
 * Failure (ENOSPC, a bad tensor, a cancel request) leaves nothing that looks
 * complete: every writer is aborted, every file already renamed into place
 * is removed, and the directory too when this conversion created it.
 */
#include "convert.h"

#include <cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fnmatch.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* Files copied from the model directory when present (config.json always). */
static const char *const copied_names[] = {
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
};
#define N_COPIED (sizeof copied_names / sizeof copied_names[0])

/* ------------------------------------------------------------- slicing */

/* Copies bytes [raw_off, raw_off + len) of rank r's local tensor from the
 * source.  The local tensor, viewed as [outer, held, inner] around the split
 * dim, is for each outer index the concatenation of the ranges; each range of
 * one outer index is contiguous in the source as well. */
static void copy_slice(const tp_cut *c, int r, uint64_t raw_off, uint8_t *dst, size_t len,
                       uint64_t *src_lo, uint64_t *src_hi)
{
    const uint8_t *src = c->src->data;
    const tp_split *sp = &c->splits[r];
    if (sp->dim < 0) {
        memcpy(dst, src + raw_off, len);
        *src_lo = raw_off;
        *src_hi = raw_off + len;
        return;
    }
    *src_lo = UINT64_MAX;
    *src_hi = 0;
    const int d = sp->dim;
    uint64_t inner = tp_dtype_size(c->dtype); /* bytes of one index of the split dim */
    for (int k = d + 1; k < c->ndim; k++)
        inner *= c->global_shape[k];
    const uint64_t held = c->local_shapes[(size_t)r * TP_MAX_DIMS + d];
    const uint64_t local_row = held * inner, global_row = c->global_shape[d] * inner;
    while (len > 0) {
        uint64_t o = raw_off / local_row, within = raw_off % local_row;
        uint64_t range_local = 0; /* local offset (bytes) of the current range within the row */
        int k = 0;
        for (; k < sp->n_ranges; k++) {
            uint64_t bytes = (sp->end[k] - sp->start[k]) * inner;
            if (within < range_local + bytes)
                break;
            range_local += bytes;
        }
        if (k == sp->n_ranges)
            return; /* past the rank's bytes: the callers check raw_off + len first */
        uint64_t range_bytes = (sp->end[k] - sp->start[k]) * inner;
        uint64_t in_range = within - range_local;
        uint64_t n = range_bytes - in_range;
        if (n > len)
            n = len;
        uint64_t from = o * global_row + sp->start[k] * inner + in_range;
        memcpy(dst, src + from, (size_t)n);
        if (from < *src_lo)
            *src_lo = from;
        if (from + n > *src_hi)
            *src_hi = from + n;
        dst += n;
        raw_off += n;
        len -= (size_t)n;
    }
}

/* Drops the mapped source pages a fill has just copied from, so that the
 * resident memory stays bounded by the chunks in flight instead of growing
 * to the model size.  The mapping is read-only and file-backed: another
 * rank's fill that needs a dropped page (replicated tensors, the other
 * columns of a rowwise row) reads it again from the page cache. */
static void drop_source_range(const uint8_t *p, uint64_t len)
{
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0 || !len)
        return;
    uintptr_t a = (uintptr_t)p & ~(uintptr_t)(page - 1);
    uintptr_t e = (uintptr_t)p + (uintptr_t)len;
    madvise((void *)a, e - a, MADV_DONTNEED);
}

typedef struct fill_ctx {
    const tp_cut *cut;
    int rank;
    volatile sig_atomic_t *cancel;
} fill_ctx;

static int shard_fill(void *arg, uint64_t raw_off, uint8_t *dst, size_t len, tp_err *err)
{
    const fill_ctx *f = arg;
    if (f->cancel && *f->cancel)
        return tp_errorf(err, "interrupted");
    if (raw_off + len > f->cut->rank_bytes[f->rank])
        return tp_errorf(err, "tensor %s: rank %d: fill [%" PRIu64 ", +%zu) is past its %" PRIu64
                         " bytes", f->cut->name, f->rank, raw_off, len, f->cut->rank_bytes[f->rank]);
    uint64_t lo, hi;
    copy_slice(f->cut, f->rank, raw_off, dst, len, &lo, &hi);
    if (hi > lo)
        drop_source_range(f->cut->src->data + lo, hi - lo);
    return 0;
}

/* ------------------------------------------------------------ bookkeeping */

/* What this conversion put on disk, to remove on failure. */
typedef struct written {
    char *dir;
    bool created_dir;
    size_t n;
    char **paths;
} written;

static int note_written(written *w, const char *path, tp_err *err)
{
    char **np = realloc(w->paths, (w->n + 1) * sizeof *np);
    if (!np)
        return tp_errorf(err, "out of memory");
    w->paths = np;
    if (!(w->paths[w->n] = strdup(path)))
        return tp_errorf(err, "out of memory");
    w->n++;
    return 0;
}

/* Removes every file of a directory this conversion created (tmp files of
 * aborted writers included), then the directory. */
static void remove_created_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
                continue;
            char *p = tp_path_join(dir, e->d_name);
            if (p)
                unlink(p);
            free(p);
        }
        closedir(d);
    }
    rmdir(dir);
}

static void undo_written(written *w)
{
    /* manifest first if it was the last thing written: nothing looks complete */
    for (size_t i = w->n; i-- > 0;)
        unlink(w->paths[i]);
    if (w->created_dir)
        remove_created_dir(w->dir);
    else
        tp_fsync_dir(w->dir, NULL);
}

static void written_free(written *w)
{
    for (size_t i = 0; i < w->n; i++)
        free(w->paths[i]);
    free(w->paths);
    free(w->dir);
    memset(w, 0, sizeof *w);
}

/* ---------------------------------------------------------- output dir */

/* The names a previous conversion may have left, removed by --force. */
static bool old_conversion_file(const char *name)
{
    static const char *const globs[] = {
        "rank-*-of-*.tpshard", "rank-*-of-*.safetensors", "rank-*-of-*.tmp", "*.tpshard.tmp",
        "*.safetensors.tmp", "node-*-of-*.tar", "node-*-of-*.tar.tmp", TP_MANIFEST_NAME ".tmp",
    };
    for (size_t i = 0; i < sizeof globs / sizeof globs[0]; i++)
        if (!fnmatch(globs[i], name, 0))
            return true;
    for (size_t i = 0; i < N_COPIED; i++)
        if (!strcmp(name, copied_names[i]))
            return true;
    return false;
}

static int count_entries(const char *dir, size_t *n, tp_err *err)
{
    DIR *d = opendir(dir);
    if (!d)
        return tp_errorf(err, "%s: %s", dir, strerror(errno));
    struct dirent *e;
    *n = 0;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            (*n)++;
    closedir(d);
    return 0;
}

static int clear_old_conversion(const char *dir, tp_err *err)
{
    /* manifest.json first: from here on the directory never looks complete. */
    char *man = tp_path_join(dir, TP_MANIFEST_NAME);
    if (!man)
        return tp_errorf(err, "out of memory");
    int rc = unlink(man);
    int e = errno;
    free(man);
    if (rc < 0 && e != ENOENT)
        return tp_errorf(err, "%s/%s: cannot remove: %s", dir, TP_MANIFEST_NAME, strerror(e));
    if (tp_fsync_dir(dir, err) < 0)
        return -1;
    DIR *d = opendir(dir);
    if (!d)
        return tp_errorf(err, "%s: %s", dir, strerror(errno));
    struct dirent *de;
    rc = 0;
    while ((de = readdir(d))) {
        if (!old_conversion_file(de->d_name))
            continue;
        char *p = tp_path_join(dir, de->d_name);
        if (!p || (unlink(p) < 0 && errno != ENOENT)) {
            rc = tp_errorf(err, "%s/%s: cannot remove: %s", dir, de->d_name,
                           p ? strerror(errno) : "out of memory");
            free(p);
            break;
        }
        free(p);
    }
    closedir(d);
    return rc;
}

static int prepare_out_dir(const char *dir, bool force, bool *created, tp_err *err)
{
    struct stat st;
    *created = false;
    if (stat(dir, &st) < 0) {
        if (errno != ENOENT)
            return tp_errorf(err, "%s: %s", dir, strerror(errno));
        if (mkdir(dir, 0755) < 0)
            return tp_errorf(err, "%s: cannot create: %s", dir, strerror(errno));
        *created = true;
        return 0;
    }
    if (!S_ISDIR(st.st_mode))
        return tp_errorf(err, "%s: exists and is not a directory", dir);
    size_t n = 0;
    if (count_entries(dir, &n, err) < 0)
        return -1;
    if (n == 0)
        return 0;
    if (!force)
        return tp_errorf(err, "%s: output directory is not empty (use --force to replace a "
                         "previous conversion)", dir);
    return clear_old_conversion(dir, err);
}

/* ------------------------------------------------------------ rank files */

typedef struct rank_result {
    char file[64];
    uint64_t size, checksum, raw, stored;
} rank_result;

static int write_tpshard(const tp_conversion *c, const char *dir, const tp_write_opts *o,
                         const char *conv_id, tp_pool *pool, tp_progress *prog, rank_result *res,
                         written *wr, tp_err *err)
{
    const int tp = c->tp;
    tp_shard_writer **w = calloc((size_t)tp, sizeof *w);
    fill_ctx *ctx = calloc(c->n_cuts * (size_t)tp + 1, sizeof *ctx);
    char **paths = calloc((size_t)tp, sizeof *paths);
    int rc = -1;
    if (!w || !ctx || !paths) {
        tp_errorf(err, "out of memory");
        goto out;
    }
    tp_shard_writer_opts wo = {
        .codec = o->codec, .level = o->level, .chunk_size = o->chunk_size,
        .pool = pool, .progress = prog,
    };
    for (int r = 0; r < tp; r++) {
        tp_rank_file_name(res[r].file, sizeof res[r].file, r, tp, ".tpshard");
        if (!(paths[r] = tp_path_join(dir, res[r].file))) {
            tp_errorf(err, "out of memory");
            goto out;
        }
        if (tp_shard_writer_open(&w[r], paths[r], conv_id, r, tp, &wo, err) < 0) {
            w[r] = NULL;
            goto out;
        }
    }
    for (size_t i = 0; i < c->n_cuts; i++) {
        const tp_cut *cut = &c->cuts[i];
        for (int r = 0; r < tp; r++) {
            if (o->cancel && *o->cancel) {
                tp_errorf(err, "interrupted");
                goto out;
            }
            tp_shard_tensor_desc desc = {
                .name = cut->name, .dtype = cut->dtype, .ndim = cut->ndim,
                .split = cut->splits[r], .style = tp_style_name(cut->style),
                .reduce_bias = cut->reduce_bias,
            };
            memcpy(desc.shape, &cut->local_shapes[(size_t)r * TP_MAX_DIMS], sizeof desc.shape);
            memcpy(desc.global_shape, cut->global_shape, sizeof desc.global_shape);
            fill_ctx *f = &ctx[i * (size_t)tp + (size_t)r];
            *f = (fill_ctx){cut, r, o->cancel};
            if (tp_shard_writer_add(w[r], &desc, shard_fill, f, err) < 0)
                goto out; /* the writer's message names its file */
        }
    }
    for (int r = 0; r < tp; r++) {
        tp_shard_writer *wr_r = w[r];
        w[r] = NULL; /* finish frees it, success or not */
        if (tp_shard_writer_finish(wr_r, &res[r].checksum, &res[r].size, &res[r].raw,
                                   &res[r].stored, err) < 0)
            goto out;
        if (note_written(wr, paths[r], err) < 0)
            goto out;
    }
    rc = 0;
out:
    if (w)
        for (int r = 0; r < tp; r++)
            if (w[r])
                tp_shard_writer_abort(w[r]);
    if (paths)
        for (int r = 0; r < tp; r++)
            free(paths[r]);
    free(paths);
    free(ctx);
    free(w);
    return rc;
}

typedef struct st_fill_ctx {
    const tp_conversion *c;
    int rank;
    volatile sig_atomic_t *cancel;
    tp_progress *prog;
} st_fill_ctx;

static int st_fill(size_t i, uint8_t *dst, size_t nbytes, void *arg, tp_err *err)
{
    const st_fill_ctx *f = arg;
    const tp_cut *cut = &f->c->cuts[i];
    if (f->cancel && *f->cancel)
        return tp_errorf(err, "interrupted");
    if (nbytes != cut->rank_bytes[f->rank])
        return tp_errorf(err, "tensor %s: rank %d: %zu bytes asked, %" PRIu64 " held", cut->name,
                         f->rank, nbytes, cut->rank_bytes[f->rank]);
    uint64_t lo, hi;
    copy_slice(cut, f->rank, 0, dst, nbytes, &lo, &hi);
    if (hi > lo)
        drop_source_range(cut->src->data + lo, hi - lo);
    tp_progress_add(f->prog, nbytes);
    return 0;
}

/* The tp_splits metadata: {"name": {"dim", "ranges", "style", "reduce_bias",
 * "global_shape"}} as one JSON string. */
static char *splits_json(const tp_conversion *c, int r)
{
    cJSON *root = cJSON_CreateObject();
    if (!root)
        return NULL;
    for (size_t i = 0; i < c->n_cuts; i++) {
        const tp_cut *cut = &c->cuts[i];
        const tp_split *sp = &cut->splits[r];
        cJSON *o = cJSON_AddObjectToObject(root, cut->name);
        cJSON *ranges = o ? cJSON_AddArrayToObject(o, "ranges") : NULL;
        cJSON *gs = o ? cJSON_AddArrayToObject(o, "global_shape") : NULL;
        if (!o || !ranges || !gs || !cJSON_AddNumberToObject(o, "dim", sp->dim) ||
            !cJSON_AddStringToObject(o, "style", tp_style_name(cut->style)) ||
            !cJSON_AddBoolToObject(o, "reduce_bias", cut->reduce_bias))
            goto fail;
        for (int k = 0; k < (sp->dim >= 0 ? sp->n_ranges : 0); k++) {
            cJSON *pair = cJSON_CreateArray();
            if (!pair)
                goto fail;
            cJSON_AddItemToArray(ranges, pair);
            cJSON_AddItemToArray(pair, cJSON_CreateNumber((double)sp->start[k]));
            cJSON_AddItemToArray(pair, cJSON_CreateNumber((double)sp->end[k]));
        }
        for (int k = 0; k < cut->ndim; k++)
            cJSON_AddItemToArray(gs, cJSON_CreateNumber((double)cut->global_shape[k]));
    }
    char *s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return s;
fail:
    cJSON_Delete(root);
    return NULL;
}

static int write_safetensors(const tp_conversion *c, const char *dir, const tp_write_opts *o,
                             const char *conv_id, tp_progress *prog, rank_result *res, written *wr,
                             tp_err *err)
{
    tp_st_out_tensor *ts = calloc(c->n_cuts + 1, sizeof *ts);
    if (!ts)
        return tp_errorf(err, "out of memory");
    int rc = -1;
    for (int r = 0; r < c->tp; r++) {
        if (o->cancel && *o->cancel) {
            tp_errorf(err, "interrupted");
            goto out;
        }
        for (size_t i = 0; i < c->n_cuts; i++) {
            const tp_cut *cut = &c->cuts[i];
            ts[i].name = cut->name;
            ts[i].dtype = cut->dtype;
            ts[i].ndim = cut->ndim;
            memcpy(ts[i].shape, &cut->local_shapes[(size_t)r * TP_MAX_DIMS], sizeof ts[i].shape);
        }
        char rank_s[16], tp_s[16];
        snprintf(rank_s, sizeof rank_s, "%d", r);
        snprintf(tp_s, sizeof tp_s, "%d", c->tp);
        char *splits = splits_json(c, r);
        if (!splits) {
            tp_errorf(err, "out of memory");
            goto out;
        }
        const char *meta[] = {
            "format", "pt", "tp_rank", rank_s, "tp_size", tp_s, "conversion_id", conv_id,
            "tp_splits", splits, NULL,
        };
        tp_rank_file_name(res[r].file, sizeof res[r].file, r, c->tp, ".safetensors");
        char *path = tp_path_join(dir, res[r].file);
        st_fill_ctx f = {c, r, o->cancel, prog};
        int wrc = path ? tp_st_write(path, ts, c->n_cuts, meta, st_fill, &f, err)
                       : tp_errorf(err, "out of memory");
        free(splits);
        if (wrc < 0 || note_written(wr, path, err) < 0) {
            free(path);
            goto out;
        }
        /* The manifest's checksum of a safetensors rank: XXH3 of the file. */
        tp_mmap m;
        if (tp_mmap_open(&m, path, err) < 0) {
            free(path);
            goto out;
        }
        res[r].size = m.size;
        res[r].checksum = tp_xxh3(m.data, m.size);
        tp_mmap_close(&m);
        free(path);
        res[r].raw = res[r].stored = c->rank_total[r];
    }
    rc = 0;
out:
    free(ts);
    return rc;
}

/* ---------------------------------------------------------- other files */

/* Each copied file's entry gets the size and XXH3 of the bytes written, so
 * the loader catches a damaged config.json or tokenizer.json like a damaged
 * rank file. */
static int copy_files(const tp_conversion *c, const char *dir, tp_manifest_file *present,
                      size_t *n_present, written *wr, tp_err *err)
{
    *n_present = 0;
    for (size_t i = 0; i < N_COPIED; i++) {
        const char *name = copied_names[i];
        char *src = tp_path_join(c->model_dir, name), *dst = tp_path_join(dir, name);
        char *text = NULL;
        size_t len = 0;
        uint64_t sum = 0;
        int rc = 0;
        if (!src || !dst) {
            rc = tp_errorf(err, "out of memory");
        } else if (!strcmp(name, "config.json")) {
            len = c->config_len;
            sum = tp_xxh3(c->config_json, len);
            rc = tp_write_file_atomic(dst, c->config_json, c->config_len, err);
        } else if (access(src, F_OK) == 0) {
            rc = tp_read_file(src, TP_MAX_COPIED_FILE, &text, &len, err);
            if (rc == 0) {
                sum = tp_xxh3(text, len);
                rc = tp_write_file_atomic(dst, text, len, err);
            }
        } else {
            free(src);
            free(dst);
            continue;
        }
        if (rc == 0)
            rc = note_written(wr, dst, err);
        free(text);
        free(src);
        free(dst);
        if (rc < 0)
            return -1;
        present[(*n_present)++] = (tp_manifest_file){.name = (char *)name, .size = len, .xxh3 = sum};
    }
    return 0;
}

/* --------------------------------------------------------------- main */

/* True when both name the same existing directory (--force must never
 * clear the source's config.json). */
static bool same_dir(const char *a, const char *b)
{
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

int tp_conversion_write(const tp_conversion *c, const char *out_dir, const tp_write_opts *opts,
                        tp_write_report *rep, tp_err *err)
{
    double t0 = tp_now();
    written wr = {0};
    tp_pool *pool = NULL;
    tp_progress *prog = NULL;
    rank_result *res = NULL;
    tp_manifest_rank *mr = NULL;
    char *plan_json = NULL;
    int rc = -1;
    if (opts->format == TP_OUT_TPSHARD && opts->codec == TP_CODEC_ZSTD &&
        (opts->level < 1 || opts->level > 22))
        return tp_errorf(err, "--level %d: zstd levels are 1 to 22", opts->level);
    if (same_dir(out_dir, c->model_dir))
        return tp_errorf(err, "%s: the output directory is the model directory", out_dir);
    if (!(wr.dir = strdup(out_dir)))
        return tp_errorf(err, "out of memory");
    if (prepare_out_dir(out_dir, opts->force, &wr.created_dir, err) < 0) {
        written_free(&wr);
        return -1;
    }
    char conv_id[33];
    tp_new_conversion_id(conv_id);
    res = calloc((size_t)c->tp, sizeof *res);
    mr = calloc((size_t)c->tp, sizeof *mr);
    plan_json = tp_plan_to_json(&c->plan);
    if (!res || !mr || !plan_json) {
        tp_errorf(err, "out of memory");
        goto out;
    }
    uint64_t total = 0;
    for (int r = 0; r < c->tp; r++)
        total += c->rank_total[r];
    prog = tp_progress_start("converting", total, opts->quiet);
    if (opts->format == TP_OUT_TPSHARD) {
        if (!(pool = tp_pool_create(opts->threads))) {
            tp_errorf(err, "cannot start %d threads", opts->threads);
            goto out;
        }
        if (write_tpshard(c, out_dir, opts, conv_id, pool, prog, res, &wr, err) < 0)
            goto out;
    } else if (write_safetensors(c, out_dir, opts, conv_id, prog, res, &wr, err) < 0) {
        goto out;
    }
    tp_progress_finish(prog);
    prog = NULL;
    if (opts->cancel && *opts->cancel) {
        tp_errorf(err, "interrupted");
        goto out;
    }
    tp_manifest_file present[N_COPIED];
    size_t n_present;
    if (copy_files(c, out_dir, present, &n_present, &wr, err) < 0)
        goto out;

    uint64_t raw = 0, stored = 0;
    for (int r = 0; r < c->tp; r++) {
        mr[r] = (tp_manifest_rank){
            .rank = r, .file = res[r].file, .size = res[r].size, .checksum = res[r].checksum,
            .raw_bytes = res[r].raw, .stored_bytes = res[r].stored, .n_tensors = c->n_cuts,
        };
        raw += res[r].raw;
        stored += res[r].stored;
    }
    tp_manifest m = {
        .format_version = TP_FORMAT_VERSION,
        .format = opts->format == TP_OUT_TPSHARD ? "tpshard" : "safetensors",
        .tp = c->tp,
        .model_type = (char *)c->model.model_type,
        .vocab_parallel = c->vocab_parallel,
        .codec = (char *)(opts->format == TP_OUT_TPSHARD ? tp_codec_name(opts->codec) : "none"),
        .level = opts->format == TP_OUT_TPSHARD && opts->codec == TP_CODEC_ZSTD ? opts->level : 0,
        .config_json = c->config_json,
        .plan_json = plan_json,
        .n_files = n_present,
        .files = present,
        .ranks = mr,
    };
    memcpy(m.conversion_id, conv_id, sizeof m.conversion_id);
    if (opts->cancel && *opts->cancel) {
        tp_errorf(err, "interrupted");
        goto out;
    }
    char *man_path = tp_path_join(out_dir, TP_MANIFEST_NAME);
    if (!man_path || note_written(&wr, man_path, err) < 0) {
        free(man_path);
        if (!man_path)
            tp_errorf(err, "out of memory");
        goto out;
    }
    free(man_path);
    if (tp_manifest_write(out_dir, &m, err) < 0)
        goto out;
    if (rep) {
        memcpy(rep->conversion_id, conv_id, sizeof rep->conversion_id);
        rep->raw_bytes = raw;
        rep->stored_bytes = stored;
        rep->n_files_copied = n_present;
        rep->seconds = tp_now() - t0;
    }
    rc = 0;
out:
    tp_progress_finish(prog);
    if (pool)
        tp_pool_destroy(pool);
    if (rc < 0)
        undo_written(&wr);
    written_free(&wr);
    free(res);
    free(mr);
    free(plan_json);
    return rc;
}
