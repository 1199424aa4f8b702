/* load.c - one rank's tensors into memory, from a converted directory or a
 * node bundle.
 *
 * Codec "none" tensors are used in place (pointers into the mapping or the
 * bundle image); compressed ones are decoded into one allocation, chunk by
 * chunk on a thread pool.  With opts->verify every chunk checksum and every
 * tensor checksum is checked.  With verify off nothing is hashed: a flipped
 * data byte in a "none" tensor, or in a zstd frame that still decodes, goes
 * unnoticed - that is the price of the fast path.  With opts->defer_tensors
 * nothing is decoded here: stream.c's tp_load_stream does it on the way to
 * its sink.
 */
#include "loader_internal.h"
#include "tp_xxhash.h"

#include <archive.h>
#include <archive_entry.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

/* Decompressed tensors start on this boundary inside the owned block. */
#define TENSOR_ALIGN 256u

static const tp_load_opts default_opts = {.verify = true, .threads = 0, .quiet = false};

/* ------------------------------------------------------------- manifest */

/* Facts tp_load_rank needs before it touches any rank file. */
static int check_loadable(const tp_manifest *m, const char *path, int rank, tp_err *err)
{
    if (!m->format || strcmp(m->format, "tpshard") != 0)
        return tp_errorf(err,
                         "%s: this is a %s-format export; tprun reads tpshard conversions "
                         "(convert again without --format %s)",
                         path, m->format ? m->format : "unknown", m->format ? m->format : "");
    if (rank < 0 || rank >= m->tp)
        return tp_errorf(err, "%s: rank %d is not in this conversion (tp=%d)", path, rank, m->tp);
    return 0;
}

int tp_load_manifest(const char *path, tp_manifest *m, tp_err *err)
{
    memset(m, 0, sizeof *m);
    if (tp_ld_is_directory(path)) {
        if (tp_manifest_read(path, m, err) < 0)
            return -1;
        if (tp_ld_manifest_sanity(m, path, err) < 0) {
            tp_manifest_free(m);
            memset(m, 0, sizeof *m);
            return -1;
        }
        return 0;
    }
    struct archive *a;
    if (tp_ld_tar_open_read(path, &a, err) < 0)
        return -1;
    int rc = tp_ld_tar_read_manifest(a, path, m, err);
    tp_ld_tar_close_read(a);
    return rc;
}

/* -------------------------------------------------------- copied files */

/* Where a copied file's text goes in tp_loaded_rank (NULL: not kept). */
static char **copied_slot(tp_loaded_rank *lr, const char *name, size_t **len_slot)
{
    *len_slot = NULL;
    if (strcmp(name, "config.json") == 0)
        return &lr->config_json;
    if (strcmp(name, "generation_config.json") == 0)
        return &lr->generation_config_json;
    if (strcmp(name, "tokenizer.json") == 0) {
        *len_slot = &lr->tokenizer_json_len;
        return &lr->tokenizer_json;
    }
    if (strcmp(name, "tokenizer_config.json") == 0)
        return &lr->tokenizer_config_json;
    if (strcmp(name, "chat_template.jinja") == 0)
        return &lr->chat_template_jinja;
    return NULL;
}

/* config.json is mandatory: the copied file, or else the manifest's copy. */
static int finish_config(tp_loaded_rank *lr, tp_err *err)
{
    if (lr->config_json)
        return 0;
    if (lr->manifest.config_json) {
        lr->config_json = strdup(lr->manifest.config_json);
        if (!lr->config_json)
            return tp_errorf(err, "%s: out of memory", lr->source);
        return 0;
    }
    return tp_errorf(err, "%s: no config.json (neither a copied file nor in the manifest)",
                     lr->source);
}

/* A copied file's bytes against the manifest: size always, XXH3 with
 * verify; config.json also against the manifest's embedded config, so the
 * copy a reader takes does not matter. */
static int check_copied_text(const tp_manifest *m, const tp_manifest_file *f, const char *src, const char *text,
                             size_t len, bool verify, tp_err *err)
{
    if (tp_ld_check_copied_data(f, src, text, len, verify, err) < 0)
        return -1;
    if (strcmp(f->name, "config.json") == 0)
        return tp_manifest_check_config_copy(m, text, len, src, err);
    return 0;
}

int tp_ld_check_copied_files(const char *dir, const tp_manifest *m, bool verify, tp_ld_copied_fn take, void *arg,
                             tp_err *err)
{
    for (size_t i = 0; i < m->n_files; i++) {
        const tp_manifest_file *f = &m->files[i];
        char *path = tp_path_join(dir, f->name);
        if (!path)
            return tp_errorf(err, "%s: out of memory", dir);
        struct stat st;
        int rc = stat(path, &st);
        if (rc != 0 || !S_ISREG(st.st_mode)) {
            free(path);
            return tp_errorf(err, "%s: copied file %s listed in the manifest is missing", dir, f->name);
        }
        if (tp_ld_check_copied_size(f, dir, (uint64_t)st.st_size, err) < 0) {
            free(path);
            return -1;
        }
        char *text = NULL;
        size_t len = 0;
        rc = tp_read_file(path, TP_MAX_COPIED_FILE, &text, &len, err);
        free(path);
        if (rc == 0)
            rc = check_copied_text(m, f, dir, text, len, verify, err);
        if (rc == 0)
            rc = take(arg, f, text, len, err); /* takes text */
        else
            free(text);
        if (rc < 0)
            return -1;
    }
    return 0;
}

/* tp_ld_check_copied_files' taker for tp_load_rank: keeps the texts the
 * runtime reads (copied_slot), frees the others. */
static int keep_copied(void *arg, const tp_manifest_file *f, char *text, size_t len, tp_err *err)
{
    tp_loaded_rank *lr = arg;
    size_t *len_slot;
    char **slot = copied_slot(lr, f->name, &len_slot);
    if (!slot) {
        free(text);
        return 0;
    }
    free(*slot);
    *slot = text;
    if (len_slot)
        *len_slot = len;
    return 0;
}

static int read_copied_files_dir(tp_loaded_rank *lr, bool verify, tp_err *err)
{
    if (tp_ld_check_copied_files(lr->source, &lr->manifest, verify, keep_copied, lr, err) < 0)
        return -1;
    return finish_config(lr, err);
}

/* ------------------------------------------------------------ directory */

static int open_rank_dir(tp_loaded_rank *lr, tp_err *err)
{
    const tp_manifest *m = &lr->manifest;
    const char *file = m->ranks[lr->rank].file;
    char *path = tp_path_join(lr->source, file);
    if (!path)
        return tp_errorf(err, "%s: out of memory", lr->source);
    struct stat st;
    if (stat(path, &st) != 0) {
        int e = errno;
        free(path);
        if (e == ENOENT)
            return tp_errorf(err, "%s: rank file %s is missing", lr->source, file);
        return tp_errorf(err, "%s: rank file %s: %s", lr->source, file, strerror(e));
    }
    tp_err open_err;
    if (tp_shard_open(&lr->reader, path, &open_err) < 0) {
        memset(&lr->reader, 0, sizeof lr->reader);
        free(path);
        /* A size mismatch says more than the parse error it causes. */
        if ((uint64_t)st.st_size != m->ranks[lr->rank].size)
            return tp_errorf(err, "%s: rank file %s is %llu bytes, the manifest says %llu (%s)",
                             lr->source, file, (unsigned long long)st.st_size,
                             (unsigned long long)m->ranks[lr->rank].size, open_err.msg);
        if (err)
            *err = open_err;
        return -1;
    }
    free(path);
    if (tp_ld_check_index(&lr->reader.index, m, lr->rank, file, lr->reader.map.size, err) < 0)
        return tp_err_prefix(err, "%s", lr->source);
    return 0;
}

static int load_from_dir(tp_loaded_rank *lr, bool verify, tp_err *err)
{
    if (tp_manifest_read(lr->source, &lr->manifest, err) < 0)
        return -1;
    if (tp_ld_manifest_sanity(&lr->manifest, lr->source, err) < 0)
        return -1;
    if (check_loadable(&lr->manifest, lr->source, lr->rank, err) < 0)
        return -1;
    if (open_rank_dir(lr, err) < 0)
        return -1;
    return read_copied_files_dir(lr, verify, err);
}

/* --------------------------------------------------------------- bundle */

/* The one walk over the bundle (tp_ld_tar_walk) keeps this rank's file
 * image and the copied files the runtime needs, and skips every other
 * rank's data unread. */
typedef struct bundle_scan {
    tp_loaded_rank *lr;
    bool verify;
    size_t image_len;
} bundle_scan;

static int scan_manifest(void *arg, const tp_manifest *m, const uint8_t *json, size_t len, tp_err *err)
{
    bundle_scan *s = arg;
    return check_loadable(m, s->lr->source, s->lr->rank, err);
}

static int skip_entry(const char *path, const tp_ld_tar_entry *ent, tp_err *err)
{
    if (archive_read_data_skip(ent->a) != ARCHIVE_OK)
        return tp_errorf(err, "%s: entry %s: %s", path, ent->name, archive_error_string(ent->a));
    return 0;
}

static int scan_rank(bundle_scan *s, const tp_ld_tar_entry *ent, tp_err *err)
{
    tp_loaded_rank *lr = s->lr;
    const char *path = lr->source;
    uint64_t want = lr->manifest.ranks[ent->rank].size;
    if (ent->rank != lr->rank)
        return skip_entry(path, ent, err);
    if ((uint64_t)ent->size != want)
        return tp_errorf(err, "%s: rank file %s is %lld bytes, the manifest says %llu", path, ent->name,
                         (long long)ent->size, (unsigned long long)want);
    return tp_ld_tar_read_entry(ent->a, ent->e, path, (size_t)want, &lr->bundle_image, &s->image_len, err);
}

static int scan_copied(bundle_scan *s, const tp_ld_tar_entry *ent, tp_err *err)
{
    tp_loaded_rank *lr = s->lr;
    const char *path = lr->source;
    size_t *len_slot;
    char **slot = copied_slot(lr, ent->name, &len_slot);
    if (!slot) {
        if (tp_ld_check_copied_size(ent->file, path, (uint64_t)ent->size, err) < 0)
            return -1;
        return skip_entry(path, ent, err);
    }
    uint8_t *buf;
    size_t len;
    if (tp_ld_tar_read_entry(ent->a, ent->e, path, TP_MAX_COPIED_FILE, &buf, &len, err) < 0)
        return -1;
    *slot = (char *)buf;
    if (check_copied_text(&lr->manifest, ent->file, path, (const char *)buf, len, s->verify, err) < 0)
        return -1;
    if (len_slot)
        *len_slot = len;
    return 0;
}

static int scan_entry(void *arg, const tp_ld_tar_entry *ent, tp_err *err)
{
    return ent->kind == TP_LD_ENTRY_RANK ? scan_rank(arg, ent, err) : scan_copied(arg, ent, err);
}

static int scan_end(void *arg, const bool *have_rank, const bool *have_file, tp_err *err)
{
    bundle_scan *s = arg;
    const tp_loaded_rank *lr = s->lr;
    const tp_manifest *m = &lr->manifest;
    const char *path = lr->source;
    if (!lr->bundle_image) {
        bool any = false;
        for (int r = 0; r < m->tp; r++)
            any |= have_rank[r];
        char held[256];
        tp_ld_format_rank_set(have_rank, m->tp, held, sizeof held);
        if (any)
            return tp_errorf(err, "%s holds ranks %s, not rank %d", path, held, lr->rank);
        return tp_errorf(err, "%s holds no rank file (wanted rank %d)", path, lr->rank);
    }
    for (size_t i = 0; i < m->n_files; i++)
        if (!have_file[i])
            return tp_errorf(err, "%s: copied file %s listed in the manifest is missing", path,
                             m->files[i].name);
    return 0;
}

static int load_from_bundle(tp_loaded_rank *lr, bool verify, tp_err *err)
{
    static const tp_ld_tar_walker scan = {scan_manifest, scan_entry, scan_end};
    bundle_scan s = {.lr = lr, .verify = verify};
    if (tp_ld_tar_walk(lr->source, &lr->manifest, &scan, &s, err) < 0)
        return -1;
    size_t image_len = s.image_len;

    const char *file = lr->manifest.ranks[lr->rank].file;
    char name[1024];
    snprintf(name, sizeof name, "%s:%s", lr->source, file);
    if (tp_shard_parse(&lr->reader.index, lr->bundle_image, image_len, name, err) < 0) {
        memset(&lr->reader.index, 0, sizeof lr->reader.index);
        return -1;
    }
    /* The reader reads through map.data; the image is ours, not a mapping. */
    lr->reader.map.data = lr->bundle_image;
    lr->reader.map.size = image_len;
    lr->reader.map.path = strdup(name);
    if (tp_ld_check_index(&lr->reader.index, &lr->manifest, lr->rank, file, image_len, err) < 0)
        return tp_err_prefix(err, "%s", lr->source);
    return finish_config(lr, err);
}

/* ---------------------------------------------------------- materialise */

/* A chunk to decode (and check), or, chunk == WHOLE_TENSOR, an in-place
 * (codec none) tensor whose chunk sums and tensor sum are checked in one
 * pass: each chunk is hashed from memory, then fed to the tensor's streamed
 * sum while it is still in cache, so its bytes come from DRAM once, not
 * twice (the tensor sum of a decoded tensor is a pass of its own, after). */
typedef struct chunk_job {
    uint32_t tensor;
    uint32_t chunk;
} chunk_job;
#define WHOLE_TENSOR UINT32_MAX

typedef struct materialise_ctx {
    tp_loaded_rank *lr;
    const tp_load_opts *opts;
    chunk_job *jobs;
    tp_progress *progress;
    tp_ld_err_once failure;
} materialise_ctx;

/* An in-place tensor's checks (jobs exist only with verify). */
static void inplace_tensor_check(materialise_ctx *ctx, uint32_t ti)
{
    const tp_shard_reader *r = &ctx->lr->reader;
    const tp_shard_tensor *t = &r->index.tensors[ti];
    XXH3_state_t *sum = XXH3_createState();
    tp_err e;
    if (!sum || XXH3_64bits_reset(sum) != XXH_OK) {
        tp_errorf(&e, "%s: rank %d: out of memory", ctx->lr->source, ctx->lr->rank);
        tp_ld_err_once_set(&ctx->failure, &e);
        XXH3_freeState(sum);
        return;
    }
    for (size_t ci = 0; ci < t->n_chunks && !tp_ld_err_once_failed(&ctx->failure); ci++) {
        const tp_chunk_info *c = &t->chunks[ci];
        const uint8_t *p = r->map.data + c->offset;
        if (tp_xxh3(p, (size_t)c->stored_size) != c->xxh3) {
            tp_errorf(&e, "%s: rank %d: tensor %s: chunk %zu checksum mismatch (data corrupted)",
                      ctx->lr->source, ctx->lr->rank, t->name, ci);
            tp_ld_err_once_set(&ctx->failure, &e);
        }
        XXH3_64bits_update(sum, p, (size_t)c->stored_size);
        tp_progress_add(ctx->progress, c->stored_size);
    }
    if (!tp_ld_err_once_failed(&ctx->failure) && XXH3_64bits_digest(sum) != t->xxh3) {
        tp_ld_tensor_sum_mismatch(&e, ctx->lr, t);
        tp_ld_err_once_set(&ctx->failure, &e);
    }
    XXH3_freeState(sum);
}

static void chunk_job_run(size_t i, void *arg)
{
    materialise_ctx *ctx = arg;
    if (tp_ld_err_once_failed(&ctx->failure))
        return;
    if (ctx->jobs[i].chunk == WHOLE_TENSOR) {
        inplace_tensor_check(ctx, ctx->jobs[i].tensor);
        return;
    }
    const tp_shard_reader *r = &ctx->lr->reader;
    const tp_shard_tensor *t = &r->index.tensors[ctx->jobs[i].tensor];
    const tp_chunk_info *c = &t->chunks[ctx->jobs[i].chunk];
    uint8_t *dst = (uint8_t *)ctx->lr->tensors[ctx->jobs[i].tensor].data;
    tp_err e;
    if (tp_shard_read_chunk(r, t, ctx->jobs[i].chunk, dst, ctx->opts->verify, &e) < 0) {
        tp_ld_rank_err_prefix(&e, ctx->lr);
        tp_ld_err_once_set(&ctx->failure, &e);
    }
    tp_progress_add(ctx->progress, c->stored_size);
}

static void tensor_sum_run(size_t i, void *arg)
{
    materialise_ctx *ctx = arg;
    if (tp_ld_err_once_failed(&ctx->failure))
        return;
    const tp_shard_tensor *t = &ctx->lr->reader.index.tensors[i];
    if (t->codec == TP_CODEC_NONE)
        return;   /* checked with its chunks (inplace_tensor_check) */
    if (tp_xxh3(ctx->lr->tensors[i].data, (size_t)t->raw_size) != t->xxh3) {
        tp_err e;
        tp_ld_tensor_sum_mismatch(&e, ctx->lr, t);
        tp_ld_err_once_set(&ctx->failure, &e);
    }
}

/* Sets every tensor's data pointer; allocates the block for decoded ones. */
static int place_tensors(tp_loaded_rank *lr, tp_err *err)
{
    const tp_shard_index *ix = &lr->reader.index;
    size_t owned_size = 0;
    for (size_t i = 0; i < ix->n_tensors; i++) {
        const tp_shard_tensor *t = &ix->tensors[i];
        lr->raw_bytes += t->raw_size;
        lr->stored_bytes += t->stored_size;
        if (t->codec == TP_CODEC_NONE)
            continue;
        size_t padded = ((size_t)t->raw_size + TENSOR_ALIGN - 1) / TENSOR_ALIGN * TENSOR_ALIGN;
        if (padded < t->raw_size || !tp_add_size(owned_size, padded, &owned_size))
            return tp_errorf(err, "%s: rank %d: tensor sizes overflow", lr->source, lr->rank);
    }
    if (owned_size) {
        void *block = NULL;
        if (posix_memalign(&block, 4096, owned_size) != 0)
            return tp_errorf(err, "%s: rank %d: cannot allocate %zu bytes for the decoded tensors",
                             lr->source, lr->rank, owned_size);
        lr->owned = block;
        /* Decompression writes every byte of this block once; huge pages
         * cut the page faults (measured: 1.19 GB zstd load, 2 cores, mean
         * 0.67 s against 0.74 s).  Only advice: ignored where THP is off. */
        madvise(block, owned_size, MADV_HUGEPAGE);
    }
    size_t off = 0;
    for (size_t i = 0; i < ix->n_tensors; i++) {
        const tp_shard_tensor *t = &ix->tensors[i];
        lr->tensors[i].info = t;
        if (t->codec == TP_CODEC_NONE) {
            lr->tensors[i].data = tp_shard_tensor_inplace(&lr->reader, t);
            if (!lr->tensors[i].data && t->raw_size)
                return tp_errorf(err, "%s: rank %d: tensor %s: no in-place data", lr->source,
                                 lr->rank, t->name);
        } else {
            lr->tensors[i].data = lr->owned + off;
            off += ((size_t)t->raw_size + TENSOR_ALIGN - 1) / TENSOR_ALIGN * TENSOR_ALIGN;
        }
    }
    return 0;
}

/* defer_tensors: the tensors' descriptions and sizes, no data. */
static int describe_tensors(tp_loaded_rank *lr, tp_err *err)
{
    const tp_shard_index *ix = &lr->reader.index;
    lr->n_tensors = ix->n_tensors;
    lr->tensors = calloc(ix->n_tensors ? ix->n_tensors : 1, sizeof *lr->tensors);
    if (!lr->tensors)
        return tp_errorf(err, "%s: out of memory", lr->source);
    for (size_t i = 0; i < ix->n_tensors; i++) {
        lr->tensors[i].info = &ix->tensors[i];
        lr->raw_bytes += ix->tensors[i].raw_size;
        lr->stored_bytes += ix->tensors[i].stored_size;
    }
    lr->deferred = true;
    return 0;
}

static int materialise(tp_loaded_rank *lr, const tp_load_opts *opts, tp_err *err)
{
    const tp_shard_index *ix = &lr->reader.index;
    if (opts->defer_tensors)
        return describe_tensors(lr, err);
    lr->n_tensors = ix->n_tensors;
    lr->tensors = calloc(ix->n_tensors ? ix->n_tensors : 1, sizeof *lr->tensors);
    if (!lr->tensors)
        return tp_errorf(err, "%s: out of memory", lr->source);
    if (place_tensors(lr, err) < 0)
        return -1;

    /* A job per chunk that must be decoded or checked. */
    size_t n_jobs = 0;
    uint64_t job_bytes = 0;
    for (size_t i = 0; i < ix->n_tensors; i++) {
        const tp_shard_tensor *t = &ix->tensors[i];
        if (t->codec == TP_CODEC_NONE && !opts->verify)
            continue;
        n_jobs += t->codec == TP_CODEC_NONE ? 1 : t->n_chunks;
        job_bytes += t->stored_size;
    }
    if (n_jobs == 0)
        return 0;
    materialise_ctx ctx = {.lr = lr, .opts = opts};
    ctx.jobs = malloc(n_jobs * sizeof *ctx.jobs);
    if (!ctx.jobs)
        return tp_errorf(err, "%s: out of memory", lr->source);
    size_t j = 0;
    for (size_t i = 0; i < ix->n_tensors; i++) {
        const tp_shard_tensor *t = &ix->tensors[i];
        if (t->codec == TP_CODEC_NONE && !opts->verify)
            continue;
        if (t->codec == TP_CODEC_NONE)
            ctx.jobs[j++] = (chunk_job){(uint32_t)i, WHOLE_TENSOR};
        else
            for (size_t c = 0; c < t->n_chunks; c++)
                ctx.jobs[j++] = (chunk_job){(uint32_t)i, (uint32_t)c};
    }
    tp_ld_err_once_init(&ctx.failure);
    tp_pool *pool = tp_pool_create(opts->threads);
    if (!pool) {
        free(ctx.jobs);
        tp_ld_err_once_destroy(&ctx.failure);
        return tp_errorf(err, "%s: cannot start %d threads", lr->source, opts->threads);
    }
    char label[64];
    snprintf(label, sizeof label, "loading rank %d", lr->rank);
    ctx.progress = tp_progress_start(label, job_bytes, opts->quiet);
    tp_pool_parallel_for(pool, n_jobs, chunk_job_run, &ctx);
    tp_progress_finish(ctx.progress);
    if (opts->verify && !tp_ld_err_once_failed(&ctx.failure))
        tp_pool_parallel_for(pool, ix->n_tensors, tensor_sum_run, &ctx);
    tp_pool_destroy(pool);
    free(ctx.jobs);
    int rc = tp_ld_err_once_take(&ctx.failure, err);
    tp_ld_err_once_destroy(&ctx.failure);
    return rc;
}

/* ------------------------------------------------------------------ API */

int tp_load_rank(tp_loaded_rank *lr, const char *path, int rank, const tp_load_opts *opts,
                 tp_err *err)
{
    memset(lr, 0, sizeof *lr);
    const tp_load_opts *o = opts ? opts : &default_opts;
    double t0 = tp_now();
    lr->rank = rank;
    lr->verify = o->verify;
    lr->threads = o->threads;
    lr->quiet = o->quiet;
    lr->source = strdup(path);
    if (!lr->source)
        return tp_errorf(err, "%s: out of memory", path);
    struct stat st;
    int rc;
    if (stat(path, &st) != 0)
        rc = tp_errorf(err, "%s: %s", path, strerror(errno));
    else if (S_ISDIR(st.st_mode))
        rc = load_from_dir(lr, o->verify, err);
    else if (S_ISREG(st.st_mode))
        rc = load_from_bundle(lr, o->verify, err);
    else
        rc = tp_errorf(err, "%s: neither a converted directory nor a bundle file", path);
    if (rc == 0)
        rc = materialise(lr, o, err);
    if (rc < 0) {
        tp_loaded_rank_free(lr);
        return -1;
    }
    lr->load_seconds = tp_now() - t0;
    return 0;
}

int tp_loaded_rank_materialise(tp_loaded_rank *lr, tp_err *err)
{
    if (!lr->deferred)
        return 0;
    double t0 = tp_now();
    free(lr->tensors);
    lr->tensors = NULL;
    lr->raw_bytes = lr->stored_bytes = 0;
    lr->deferred = false;
    tp_load_opts o = {.verify = lr->verify, .threads = lr->threads, .quiet = lr->quiet};
    if (materialise(lr, &o, err) < 0) {
        tp_loaded_rank_free(lr);
        return -1;
    }
    lr->load_seconds += tp_now() - t0;
    return 0;
}

const tp_loaded_tensor *tp_loaded_find(const tp_loaded_rank *lr, const char *name)
{
    const tp_shard_tensor *t = tp_shard_find(&lr->reader.index, name);
    if (!t)
        return NULL;
    return &lr->tensors[t - lr->reader.index.tensors];
}

void tp_loaded_rank_drop_tensors(tp_loaded_rank *lr)
{
    if (lr->bundle_image) {
        /* Not a mapping: free the index and the image ourselves. */
        tp_shard_index_free(&lr->reader.index);
        free(lr->reader.map.path);
        free(lr->bundle_image);
    } else if (lr->reader.map.data) {
        tp_shard_close(&lr->reader);
    }
    free(lr->owned);
    free(lr->tensors);
    memset(&lr->reader, 0, sizeof lr->reader);
    lr->bundle_image = NULL;
    lr->owned = NULL;
    lr->tensors = NULL;
    lr->n_tensors = 0;
    lr->deferred = false;
}

void tp_loaded_rank_free(tp_loaded_rank *lr)
{
    if (!lr)
        return;
    tp_loaded_rank_drop_tensors(lr);
    tp_manifest_free(&lr->manifest);
    free(lr->source);
    free(lr->config_json);
    free(lr->generation_config_json);
    free(lr->tokenizer_json);
    free(lr->tokenizer_config_json);
    free(lr->chat_template_jinja);
    memset(lr, 0, sizeof *lr);
}
