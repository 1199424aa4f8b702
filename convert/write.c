/* write.c - writing a prepared conversion: one file per rank, the copied
 * configs and tokenizer, manifest.json last.
 *
 * The rank files are streamed: each tensor is added to every rank's writer
 * in turn, and the writers' fill callbacks copy the rank's slice straight out
 * of the mmapped source, one chunk at a time, on the shared pool.  Memory is
 * bounded by the pool's threads x chunk size, never by a tensor.
 *
 * Everything is written into a fresh temporary sibling of OUT (same parent,
 * ".OUT.tpconvert-XXXXXX", flock'ed while in use) and only a complete
 * conversion, manifest written and fsynced, is swapped in by rename.  Failure
 * (ENOSPC, a bad tensor, a truncated source, SIGINT) removes the temporary
 * directory and leaves OUT as it was: absent, empty, or the old conversion.
 */
#include "convert.h"
#include "json_internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* Files copied from the model directory when present (config.json always).
 * chat_template.jinja: where transformers 5 saves the chat template. */
static const char *const copied_names[] = {
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
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
    const uint8_t *src = c->owned_data ? c->owned_data : c->src->data;
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

/* One guarded copy: copy_slice's arguments, run by tp_sigbus_guard. */
typedef struct slice_copy {
    const tp_cut *cut;
    int rank;
    uint64_t raw_off;
    uint8_t *dst;
    size_t len;
    uint64_t lo, hi;
} slice_copy;

static void run_slice_copy(void *arg)
{
    slice_copy *s = arg;
    copy_slice(s->cut, s->rank, s->raw_off, s->dst, s->len, &s->lo, &s->hi);
}

/* Test hook for tests/e2e_convert.sh: with TPCONVERT_TEST_TRUNCATE_SOURCE
 * set, the first copy truncates its source file first, so the path of a
 * model file truncated mid-conversion runs deterministically. */
static void test_truncate_source(const char *src_path)
{
    static volatile sig_atomic_t done;
    if (!done && getenv("TPCONVERT_TEST_TRUNCATE_SOURCE")) {
        done = 1;
        if (truncate(src_path, 0) != 0)
            done = 1;
    }
}

/* Copies rank r's bytes [raw_off, +len) of the cut from the mapped source
 * file src_path; a source truncated under the mapping is an error, not a
 * SIGBUS that kills the process with files half-written. */
static int guarded_slice(const tp_cut *cut, int r, const char *src_path, uint64_t raw_off,
                         uint8_t *dst, size_t len, tp_err *err)
{
    slice_copy sc = {cut, r, raw_off, dst, len, 0, 0};
    if (cut->owned_data) {          /* made in memory by the converter: nothing mapped */
        copy_slice(cut, r, raw_off, dst, len, &sc.lo, &sc.hi);
        return 0;
    }
    test_truncate_source(src_path);
    if (tp_sigbus_guard(run_slice_copy, &sc) < 0)
        return tp_errorf(err, "%s: file changed while being read (truncated?)", src_path);
    if (sc.hi > sc.lo)
        drop_source_range(cut->src->data + sc.lo, sc.hi - sc.lo);
    return 0;
}

/* The path of the source file that holds the cut's tensor, for messages. */
static const char *source_path(const tp_conversion *c, const tp_cut *cut)
{
    for (size_t i = 0; i < c->src.n_files; i++) {
        const tp_st_file *f = &c->src.files[i];
        if (cut->src >= f->tensors && cut->src < f->tensors + f->n_tensors)
            return f->map.path;
    }
    return c->model_dir;
}

/* Whether rank r's file has the cut's tensor (an expert-parallel
 * per-expert tensor is only in its owner's). */
static bool cut_on_rank(const tp_cut *cut, int r)
{
    return cut->owner < 0 || cut->owner == r;
}

static size_t rank_tensor_count(const tp_conversion *c, int r)
{
    size_t n = 0;
    for (size_t i = 0; i < c->n_cuts; i++)
        n += cut_on_rank(&c->cuts[i], r);
    return n;
}

typedef struct fill_ctx {
    const tp_cut *cut;
    int rank;
    volatile sig_atomic_t *cancel;
    const char *src_path;
} fill_ctx;

static int shard_fill(void *arg, uint64_t raw_off, uint8_t *dst, size_t len, tp_err *err)
{
    const fill_ctx *f = arg;
    if (f->cancel && *f->cancel)
        return tp_errorf(err, "interrupted");
    if (raw_off + len > f->cut->rank_bytes[f->rank])
        return tp_errorf(err, "tensor %s: rank %d: fill [%" PRIu64 ", +%zu) is past its %" PRIu64
                         " bytes", f->cut->name, f->rank, raw_off, len, f->cut->rank_bytes[f->rank]);
    return guarded_slice(f->cut, f->rank, f->src_path, raw_off, dst, len, err);
}

/* ---------------------------------------------------------- output dir */

/* Removes a flat directory this conversion wrote (or an old conversion
 * already swapped out): every entry, then the directory. */
static mode_t current_umask(void)
{
    mode_t m = umask(022);
    umask(m);
    return m;
}

static void remove_flat_dir(const char *dir)
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

/* Names an interrupted tpconvert leaves inside a directory it wrote into:
 * "X.tmp" (rank files, bundles) and "X.tmp.PID" (small files). */
static bool leftover_name(const char *name)
{
    return !fnmatch("*.tmp", name, 0) || !fnmatch("*.tmp.[0-9]*", name, 0);
}

/* A file of the conversion m describes (or of its bundles). */
static bool conversion_file(const tp_manifest *m, const char *name)
{
    if (!strcmp(name, TP_MANIFEST_NAME) || !fnmatch("node-*-of-*.tar", name, 0))
        return true;
    for (int r = 0; r < m->tp; r++)
        if (!strcmp(name, m->ranks[r].file))
            return true;
    for (size_t i = 0; i < m->n_files; i++)
        if (!strcmp(name, m->files[i].name))
            return true;
    return false;
}

typedef enum out_state {
    OUT_ABSENT,      /* OUT does not exist */
    OUT_REPLACEABLE, /* empty, a conversion, or leftovers of an interrupted run */
} out_state;

static int no_dots(const struct dirent *e)
{
    return strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
}

/* The first entry (in name order) that --force must not delete, or NULL:
 * with a manifest of ours, anything it does not list (nor a bundle, nor a
 * leftover); without one, anything but a leftover.  Only plain files count
 * as ours: a directory named rank-0.tpshard is foreign. */
static const char *first_foreign(const char *dir, struct dirent **ents, int n,
                                 const tp_manifest *m)
{
    for (int i = 0; i < n; i++) {
        const char *name = ents[i]->d_name;
        char *p = tp_path_join(dir, name);
        struct stat st;
        bool plain = p && lstat(p, &st) == 0 && S_ISREG(st.st_mode);
        free(p);
        if (!plain || !(leftover_name(name) || (m && conversion_file(m, name))))
            return name;
    }
    return NULL;
}

/* Decides what may happen to OUT; refuses, naming the file, whatever --force
 * must not replace. */
static int judge_out_dir(const char *dir, bool force, out_state *state, tp_err *err)
{
    struct stat st;
    if (stat(dir, &st) < 0) {
        if (errno != ENOENT)
            return tp_errorf(err, "%s: %s", dir, strerror(errno));
        if (lstat(dir, &st) == 0)
            return tp_errorf(err, "%s: is a symlink to a missing directory", dir);
        *state = OUT_ABSENT;
        return 0;
    }
    if (!S_ISDIR(st.st_mode))
        return tp_errorf(err, "%s: exists and is not a directory", dir);
    *state = OUT_REPLACEABLE;
    struct dirent **ents = NULL;
    int n = scandir(dir, &ents, no_dots, alphasort);
    if (n < 0)
        return tp_errorf(err, "%s: %s", dir, strerror(errno));
    int rc = 0;
    char *man_path = tp_path_join(dir, TP_MANIFEST_NAME);
    struct stat mst;
    bool has_manifest = man_path && lstat(man_path, &mst) == 0;
    tp_manifest m;
    memset(&m, 0, sizeof m);
    if (n == 0) {
        rc = 0;
    } else if (has_manifest && !force) {
        rc = tp_errorf(err, "%s: output directory holds a conversion (use --force to replace it)",
                       dir);
    } else if (has_manifest && tp_manifest_read(dir, &m, err) < 0) {
        rc = tp_err_prefix(err, "%s: --force replaces only a tpconvert conversion, and its "
                           "manifest.json is not one", dir);
    } else {
        const char *foreign = first_foreign(dir, ents, n, has_manifest ? &m : NULL);
        if (foreign && has_manifest)
            rc = tp_errorf(err, "%s: %s is not part of the conversion there: --force replaces "
                           "only a conversion; move it away first", dir, foreign);
        else if (foreign)
            rc = tp_errorf(err, "%s: output directory is not empty and holds no conversion "
                           "(no %s; first entry: %s)", dir, TP_MANIFEST_NAME, foreign);
        else if (!has_manifest && !force)
            rc = tp_errorf(err, "%s: holds only leftovers of an interrupted tpconvert run (%s): "
                           "use --force to replace them", dir, ents[0]->d_name);
    }
    tp_manifest_free(&m);
    free(man_path);
    for (int i = 0; i < n; i++)
        free(ents[i]);
    free(ents);
    return rc;
}

/* The temporary sibling directory the conversion is written into. */
typedef struct work_dir {
    char *out;      /* OUT, symlinks resolved when it exists */
    char *parent;   /* its parent directory */
    char *path;     /* parent/.NAME.tpconvert-XXXXXX */
    int lock_fd;    /* the flock that marks it in use */
} work_dir;

/* ".NAME.tpconvert-" for OUT's base name, malloc'd. */
static char *work_prefix(const char *out)
{
    const char *base = strrchr(out, '/');
    base = base ? base + 1 : out;
    char *p = malloc(strlen(base) + 16);
    if (p)
        sprintf(p, ".%s.tpconvert-", base);
    return p;
}

/* Removes temporary directories of OUT left by killed runs (nobody holds
 * their lock); refuses when one is in use: another tpconvert is writing OUT
 * right now. */
static int sweep_stale_work_dirs(const work_dir *w, tp_err *err)
{
    char *prefix = work_prefix(w->out);
    DIR *d = prefix ? opendir(w->parent) : NULL;
    if (!d) {
        free(prefix);
        return tp_errorf(err, "%s: %s", w->parent, prefix ? strerror(errno) : "out of memory");
    }
    int rc = 0;
    struct dirent *e;
    while (rc == 0 && (e = readdir(d))) {
        if (strncmp(e->d_name, prefix, strlen(prefix)) || strlen(e->d_name) != strlen(prefix) + 6)
            continue;
        char *p = tp_path_join(w->parent, e->d_name);
        int fd = p ? open(p, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) : -1;
        if (fd >= 0 && flock(fd, LOCK_EX | LOCK_NB) == 0)
            remove_flat_dir(p); /* its writer is gone */
        else if (fd >= 0)
            rc = tp_errorf(err, "%s: another tpconvert is writing this output right now (%s is in "
                           "use)", w->out, p);
        if (fd >= 0)
            close(fd);
        free(p);
    }
    closedir(d);
    free(prefix);
    return rc;
}

/* Creates the temporary sibling of out_dir and locks it.  OUT that is a
 * mount point is refused here, before any work: the final rename could not
 * cross file systems. */
static int work_dir_open(work_dir *w, const char *out_dir, out_state state, tp_err *err)
{
    memset(w, 0, sizeof *w);
    w->lock_fd = -1;
    /* Resolve a symlinked OUT: the directory it names is what is replaced. */
    w->out = state == OUT_ABSENT ? strdup(out_dir) : realpath(out_dir, NULL);
    if (!w->out)
        return tp_errorf(err, "%s: %s", out_dir, strerror(errno));
    size_t l = strlen(w->out);
    while (l > 1 && w->out[l - 1] == '/')
        w->out[--l] = '\0';
    if (!(w->parent = tp_path_dir(w->out)))
        return tp_errorf(err, "out of memory");
    struct stat so, sp;
    if (stat(w->parent, &sp) < 0)
        return tp_errorf(err, "%s: %s", w->parent, strerror(errno));
    if (state != OUT_ABSENT && stat(w->out, &so) == 0 && so.st_dev != sp.st_dev)
        return tp_errorf(err, "%s: is a mount point: tpconvert writes the conversion beside it and "
                         "renames it into place, which cannot cross file systems; give a "
                         "directory inside it", out_dir);
    if (sweep_stale_work_dirs(w, err) < 0)
        return -1;
    char *prefix = work_prefix(w->out);
    char *tmpl = prefix ? malloc(strlen(prefix) + 7) : NULL;
    if (tmpl)
        sprintf(tmpl, "%sXXXXXX", prefix);
    w->path = tmpl ? tp_path_join(w->parent, tmpl) : NULL;
    free(prefix);
    free(tmpl);
    if (!w->path)
        return tp_errorf(err, "out of memory");
    if (!mkdtemp(w->path)) {
        int e = errno;
        free(w->path);
        w->path = NULL;
        return tp_errorf(err, "%s: cannot create a directory beside it: %s", out_dir, strerror(e));
    }
    chmod(w->path, 0755 & ~current_umask()); /* mkdtemp makes 0700; OUT is shared like any dir */
    w->lock_fd = open(w->path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (w->lock_fd < 0 || flock(w->lock_fd, LOCK_EX | LOCK_NB) != 0)
        return tp_errorf(err, "%s: cannot lock: %s", w->path, strerror(errno));
    return 0;
}

/* Removes the temporary directory (when it is still there) and frees. */
static void work_dir_close(work_dir *w)
{
    if (w->path)
        remove_flat_dir(w->path);
    if (w->lock_fd >= 0)
        close(w->lock_fd);
    free(w->path);
    free(w->parent);
    free(w->out);
    memset(w, 0, sizeof *w);
    w->lock_fd = -1;
}

/* Puts the complete conversion in place: OUT absent, a plain rename;
 * otherwise an atomic exchange (where the file system has none: OUT renamed
 * aside, the new one renamed in, the old one back on failure), then the old
 * contents, now in the temporary directory, are removed.  At no point is
 * OUT a mixture of the two. */
static int work_dir_install(work_dir *w, out_state state, tp_err *err)
{
    if (state == OUT_ABSENT) {
        if (rename(w->path, w->out) != 0)
            return tp_errorf(err, "%s: cannot rename %s to it: %s", w->out, w->path,
                             strerror(errno));
    } else if (renameat2(AT_FDCWD, w->path, AT_FDCWD, w->out, RENAME_EXCHANGE) != 0) {
        if (errno != EINVAL && errno != ENOSYS)
            return tp_errorf(err, "%s: cannot swap the new conversion in: %s (the old one is "
                             "untouched)", w->out, strerror(errno));
        char *aside = malloc(strlen(w->path) + 5);
        if (!aside)
            return tp_errorf(err, "out of memory");
        sprintf(aside, "%s.old", w->path);
        if (rename(w->out, aside) != 0) {
            tp_errorf(err, "%s: cannot move the old conversion aside: %s", w->out, strerror(errno));
            free(aside);
            return -1;
        }
        if (rename(w->path, w->out) != 0) {
            int e = errno;
            rename(aside, w->out);
            free(aside);
            return tp_errorf(err, "%s: cannot rename the new conversion in: %s (the old one is "
                             "back)", w->out, strerror(e));
        }
        remove_flat_dir(aside);
        free(aside);
        free(w->path);
        w->path = NULL;
    }
    if (state == OUT_ABSENT) {
        free(w->path);
        w->path = NULL; /* nothing left to remove */
    }
    /* After an exchange w->path holds the old contents: work_dir_close
     * removes them. */
    return tp_fsync_dir(w->parent, err);
}

/* ------------------------------------------------------------ rank files */

typedef struct rank_result {
    char file[64];
    uint64_t size, checksum, raw, stored;
} rank_result;

static int write_tpshard(const tp_conversion *c, const char *dir, const tp_write_opts *o,
                         const char *conv_id, tp_pool *pool, tp_progress *prog, rank_result *res,
                         tp_err *err)
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
            if (!cut_on_rank(cut, r))
                continue;
            tp_shard_tensor_desc desc = {
                .name = cut->name, .dtype = cut->dtype, .ndim = cut->ndim,
                .split = cut->splits[r], .style = tp_style_name(cut->style),
                .reduce_bias = cut->reduce_bias,
            };
            memcpy(desc.shape, &cut->local_shapes[(size_t)r * TP_MAX_DIMS], sizeof desc.shape);
            memcpy(desc.global_shape, cut->global_shape, sizeof desc.global_shape);
            fill_ctx *f = &ctx[i * (size_t)tp + (size_t)r];
            *f = (fill_ctx){cut, r, o->cancel, source_path(c, cut)};
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
    const size_t *cut_of;   /* the rank's i-th tensor is cut cut_of[i] */
} st_fill_ctx;

static int st_fill(size_t i, uint8_t *dst, size_t nbytes, void *arg, tp_err *err)
{
    const st_fill_ctx *f = arg;
    const tp_cut *cut = &f->c->cuts[f->cut_of[i]];
    if (f->cancel && *f->cancel)
        return tp_errorf(err, "interrupted");
    if (nbytes != cut->rank_bytes[f->rank])
        return tp_errorf(err, "tensor %s: rank %d: %zu bytes asked, %" PRIu64 " held", cut->name,
                         f->rank, nbytes, cut->rank_bytes[f->rank]);
    if (guarded_slice(cut, f->rank, source_path(f->c, cut), 0, dst, nbytes, err) < 0)
        return -1;
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
        if (!cut_on_rank(cut, r))
            continue;
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
                             const char *conv_id, tp_progress *prog, rank_result *res, tp_err *err)
{
    tp_st_out_tensor *ts = calloc(c->n_cuts + 1, sizeof *ts);
    size_t *cut_of = calloc(c->n_cuts + 1, sizeof *cut_of);
    if (!ts || !cut_of) {
        free(ts);
        free(cut_of);
        return tp_errorf(err, "out of memory");
    }
    int rc = -1;
    for (int r = 0; r < c->tp; r++) {
        if (o->cancel && *o->cancel) {
            tp_errorf(err, "interrupted");
            goto out;
        }
        size_t n_ts = 0;
        for (size_t i = 0; i < c->n_cuts; i++) {
            const tp_cut *cut = &c->cuts[i];
            if (!cut_on_rank(cut, r))
                continue;
            cut_of[n_ts] = i;
            ts[n_ts].name = cut->name;
            ts[n_ts].dtype = cut->dtype;
            ts[n_ts].ndim = cut->ndim;
            memcpy(ts[n_ts].shape, &cut->local_shapes[(size_t)r * TP_MAX_DIMS], sizeof ts[n_ts].shape);
            n_ts++;
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
        st_fill_ctx f = {c, r, o->cancel, prog, cut_of};
        int wrc = path ? tp_st_write(path, ts, n_ts, meta, st_fill, &f, err)
                       : tp_errorf(err, "out of memory");
        free(splits);
        if (wrc < 0) {
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
    free(cut_of);
    return rc;
}

/* ---------------------------------------------------------- other files */

/* A file copied from the model directory, read and checked before any
 * byte of the conversion is written. */
typedef struct copied_file {
    const char *name;
    const char *text;   /* config.json: the conversion's own copy */
    char *owned;        /* the others: read here */
    size_t len;
} copied_file;

/* A copied *.json must be what it claims: one JSON object, no NUL byte
 * (the same reading as config.json's, tp_json_parse_config). */
static int check_json_object(const char *path, const char *text, size_t len, tp_err *err)
{
    cJSON *root = tp_json_parse_config(text, len, path, err);
    if (!root)
        return -1;
    bool object = cJSON_IsObject(root);
    cJSON_Delete(root);
    return object ? 0 : tp_errorf(err, "%s: not a JSON object", path);
}

/* Reads the files to copy: each must be a regular file inside the model
 * directory (a symlink out of it is refused) and, but for the template, valid JSON.  Absent files
 * are skipped, except config.json, which prepare has read already. */
static int read_copied_files(const tp_conversion *c, copied_file *out, size_t *n, tp_err *err)
{
    *n = 0;
    for (size_t i = 0; i < N_COPIED; i++) {
        const char *name = copied_names[i];
        char *src = tp_path_join(c->model_dir, name);
        if (!src)
            return tp_errorf(err, "out of memory");
        struct stat st;
        bool config = !strcmp(name, "config.json");
        if (!config && lstat(src, &st) != 0 && errno == ENOENT) {
            free(src);
            continue;
        }
        copied_file *f = &out[*n];
        *f = (copied_file){.name = name};
        int rc = tp_model_file_check(c->model_dir, name, err);
        if (rc == 0 && config) {
            f->text = c->config_json;
            f->len = c->config_len;
        } else if (rc == 0) {
            rc = tp_read_file(src, TP_MAX_COPIED_FILE, &f->owned, &f->len, err);
            f->text = f->owned;
        }
        if (rc == 0 && strcmp(name, "chat_template.jinja") != 0)   /* the others are JSON */
            rc = check_json_object(src, f->text, f->len, err);
        free(src);
        (*n)++; /* counted even on failure, so that its buffer is freed */
        if (rc < 0)
            return -1;
    }
    return 0;
}

static void free_copied_files(copied_file *files, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(files[i].owned);
}

/* Writes the copied files, mode 0644 whatever the source's mode (they are
 * read by every rank's user; a private source stays private through the
 * directory's own permissions).  Each entry gets the size and XXH3 of the
 * bytes written, so the loader catches a damaged config.json or
 * tokenizer.json like a damaged rank file. */
static int write_copied_files(const copied_file *files, size_t n, const char *dir,
                              tp_manifest_file *present, tp_err *err)
{
    for (size_t i = 0; i < n; i++) {
        char *dst = tp_path_join(dir, files[i].name);
        int rc = dst ? tp_write_file_atomic(dst, files[i].text, files[i].len, err)
                     : tp_errorf(err, "out of memory");
        free(dst);
        if (rc < 0)
            return -1;
        present[i] = (tp_manifest_file){.name = (char *)files[i].name, .size = files[i].len,
                                        .xxh3 = tp_xxh3(files[i].text, files[i].len)};
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

/* Writes the rank files, the copied files and manifest.json into dir. */
static int write_conversion(const tp_conversion *c, const char *dir, const tp_write_opts *opts,
                            const copied_file *copied, size_t n_copied, tp_write_report *rep,
                            tp_err *err)
{
    tp_pool *pool = NULL;
    tp_progress *prog = NULL;
    char conv_id[33];
    tp_new_conversion_id(conv_id);
    rank_result *res = calloc((size_t)c->tp, sizeof *res);
    tp_manifest_rank *mr = calloc((size_t)c->tp, sizeof *mr);
    char *plan_json = tp_plan_to_json(&c->plan);
    int rc = -1;
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
        if (write_tpshard(c, dir, opts, conv_id, pool, prog, res, err) < 0)
            goto out;
    } else if (write_safetensors(c, dir, opts, conv_id, prog, res, err) < 0) {
        goto out;
    }
    tp_progress_finish(prog);
    prog = NULL;
    tp_manifest_file present[N_COPIED];
    if (write_copied_files(copied, n_copied, dir, present, err) < 0)
        goto out;
    uint64_t raw = 0, stored = 0;
    for (int r = 0; r < c->tp; r++) {
        mr[r] = (tp_manifest_rank){
            .rank = r, .file = res[r].file, .size = res[r].size, .checksum = res[r].checksum,
            .raw_bytes = res[r].raw, .stored_bytes = res[r].stored, .n_tensors = rank_tensor_count(c, r),
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
        .expert_parallel = c->expert_parallel,
        .codec = (char *)(opts->format == TP_OUT_TPSHARD ? tp_codec_name(opts->codec) : "none"),
        .level = opts->format == TP_OUT_TPSHARD && opts->codec == TP_CODEC_ZSTD ? opts->level : 0,
        .config_json = c->config_json,
        .plan_json = plan_json,
        .n_files = n_copied,
        .files = present,
        .ranks = mr,
    };
    memcpy(m.conversion_id, conv_id, sizeof m.conversion_id);
    if (opts->cancel && *opts->cancel) {
        tp_errorf(err, "interrupted");
        goto out;
    }
    if (tp_manifest_write(dir, &m, err) < 0)
        goto out;
    if (rep) {
        memcpy(rep->conversion_id, conv_id, sizeof rep->conversion_id);
        rep->raw_bytes = raw;
        rep->stored_bytes = stored;
        rep->n_files_copied = n_copied;
    }
    rc = 0;
out:
    tp_progress_finish(prog);
    if (pool)
        tp_pool_destroy(pool);
    free(res);
    free(mr);
    free(plan_json);
    return rc;
}

int tp_conversion_write(const tp_conversion *c, const char *out_dir, const tp_write_opts *opts,
                        tp_write_report *rep, tp_err *err)
{
    double t0 = tp_now();
    if (opts->format == TP_OUT_TPSHARD && opts->codec == TP_CODEC_ZSTD &&
        (opts->level < 1 || opts->level > 22))
        return tp_errorf(err, "--level %d: zstd levels are 1 to 22", opts->level);
    if (same_dir(out_dir, c->model_dir))
        return tp_errorf(err, "%s: the output directory is the model directory", out_dir);
    out_state state;
    if (judge_out_dir(out_dir, opts->force, &state, err) < 0)
        return -1;
    copied_file copied[N_COPIED];
    size_t n_copied = 0;
    work_dir w = {.lock_fd = -1};
    int rc = -1;
    if (read_copied_files(c, copied, &n_copied, err) == 0 &&
        work_dir_open(&w, out_dir, state, err) == 0) {
        if (write_conversion(c, w.path, opts, copied, n_copied, rep, err) == 0) {
            if (opts->cancel && *opts->cancel)
                tp_errorf(err, "interrupted");
            else
                rc = work_dir_install(&w, state, err);
        }
    }
    work_dir_close(&w); /* on failure: the temporary directory and all in it */
    free_copied_files(copied, n_copied);
    if (rc == 0 && rep)
        rep->seconds = tp_now() - t0;
    return rc;
}
