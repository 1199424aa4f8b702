/* common.c - small helpers shared by load.c, verify.c and bundle.c, and the
 * one walk over a bundle's entries (tp_ld_tar_walk). */
#include "loader_internal.h"

#include <archive.h>
#include <archive_entry.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------- first error of many */

void tp_ld_err_once_init(tp_ld_err_once *e)
{
    pthread_mutex_init(&e->mu, NULL);
    e->failed = false;
    e->err.msg[0] = '\0';
}

void tp_ld_err_once_set(tp_ld_err_once *e, const tp_err *err)
{
    pthread_mutex_lock(&e->mu);
    if (!e->failed) {
        e->failed = true;
        e->err = *err;
    }
    pthread_mutex_unlock(&e->mu);
}

bool tp_ld_err_once_failed(tp_ld_err_once *e)
{
    pthread_mutex_lock(&e->mu);
    bool failed = e->failed;
    pthread_mutex_unlock(&e->mu);
    return failed;
}

int tp_ld_err_once_take(tp_ld_err_once *e, tp_err *err)
{
    if (!e->failed)
        return 0;
    if (err)
        *err = e->err;
    return -1;
}

void tp_ld_err_once_destroy(tp_ld_err_once *e)
{
    pthread_mutex_destroy(&e->mu);
}

/* --------------------------------------------------------------- manifests */

const tp_manifest_file *tp_ld_manifest_file(const tp_manifest *m, const char *name)
{
    for (size_t i = 0; i < m->n_files; i++)
        if (strcmp(m->files[i].name, name) == 0)
            return &m->files[i];
    return NULL;
}

bool tp_ld_manifest_lists_file(const tp_manifest *m, const char *name)
{
    return tp_ld_manifest_file(m, name) != NULL;
}

int tp_ld_check_copied_size(const tp_manifest_file *f, const char *src, uint64_t size, tp_err *err)
{
    if (size != f->size)
        return tp_errorf(err, "%s: %s: %llu bytes, the manifest says %llu (file truncated or replaced)",
                         src, f->name, (unsigned long long)size, (unsigned long long)f->size);
    return 0;
}

int tp_ld_check_copied_sum(const tp_manifest_file *f, const char *src, uint64_t xxh3, tp_err *err)
{
    if (xxh3 != f->xxh3)
        return tp_errorf(err, "%s: %s: checksum mismatch (file corrupted or replaced)", src, f->name);
    return 0;
}

int tp_ld_check_copied_data(const tp_manifest_file *f, const char *src, const void *data, size_t len,
                            bool verify, tp_err *err)
{
    if (tp_ld_check_copied_size(f, src, len, err) < 0)
        return -1;
    return verify ? tp_ld_check_copied_sum(f, src, tp_xxh3(data, len), err) : 0;
}

tp_ld_entry_kind tp_ld_manifest_classify(const tp_manifest *m, const char *name, int *rank)
{
    if (strcmp(name, TP_MANIFEST_NAME) == 0)
        return TP_LD_ENTRY_MANIFEST;
    if (tp_ld_manifest_lists_file(m, name))
        return TP_LD_ENTRY_COPIED;
    for (int r = 0; r < m->tp; r++) {
        if (m->ranks[r].file && strcmp(m->ranks[r].file, name) == 0) {
            if (rank)
                *rank = r;
            return TP_LD_ENTRY_RANK;
        }
    }
    return TP_LD_ENTRY_UNKNOWN;
}

/* A name that may be joined to a directory: plain, no separators. */
int tp_ld_manifest_sanity(const tp_manifest *m, const char *src, tp_err *err)
{
    if (m->tp < 1)
        return tp_errorf(err, "%s: manifest: tp %d is not positive", src, m->tp);
    if (!m->ranks)
        return tp_errorf(err, "%s: manifest: no rank entries", src);
    for (int r = 0; r < m->tp; r++) {
        if (m->ranks[r].rank != r)
            return tp_errorf(err, "%s: manifest: rank entry %d says rank %d", src, r,
                             m->ranks[r].rank);
        if (!tp_safe_file_name(m->ranks[r].file))
            return tp_errorf(err, "%s: manifest: rank %d file name \"%s\" is not a plain file name",
                             src, r, m->ranks[r].file ? m->ranks[r].file : "");
        for (int q = 0; q < r; q++)
            if (strcmp(m->ranks[q].file, m->ranks[r].file) == 0)
                return tp_errorf(err, "%s: manifest: ranks %d and %d share the file %s", src, q, r,
                                 m->ranks[r].file);
    }
    for (size_t i = 0; i < m->n_files; i++) {
        const char *name = m->files[i].name;
        if (!tp_safe_file_name(name))
            return tp_errorf(err, "%s: manifest: copied file name \"%s\" is not a plain file name",
                             src, name ? name : "");
        if (strcmp(name, TP_MANIFEST_NAME) == 0)
            return tp_errorf(err, "%s: manifest: lists itself as a copied file", src);
        int r;
        if (tp_ld_manifest_classify(m, name, &r) == TP_LD_ENTRY_RANK)
            return tp_errorf(err, "%s: manifest: copied file %s is also a rank file", src, name);
        for (size_t j = 0; j < i; j++)
            if (strcmp(name, m->files[j].name) == 0)
                return tp_errorf(err, "%s: manifest: copied file %s listed twice", src, name);
    }
    return 0;
}

/* ------------------------------------------------------------------ bundles */

int tp_ld_bundle_check_name(const char *bundle, const char *name, tp_err *err)
{
    if (!name || !name[0])
        return tp_errorf(err, "%s: an entry has an empty name", bundle);
    if (name[0] == '/')
        return tp_errorf(err, "%s: entry %s: absolute path refused", bundle, name);
    /* ".." as any path component. */
    for (const char *p = name; *p;) {
        const char *slash = strchr(p, '/');
        size_t len = slash ? (size_t)(slash - p) : strlen(p);
        if (len == 2 && p[0] == '.' && p[1] == '.')
            return tp_errorf(err, "%s: entry %s: \"..\" in path refused", bundle, name);
        p += len;
        if (*p == '/')
            p++;
    }
    if (strchr(name, '/'))
        return tp_errorf(err, "%s: entry %s: directories refused (bundles are flat)", bundle, name);
    if (strcmp(name, ".") == 0)
        return tp_errorf(err, "%s: entry \".\" refused", bundle);
    if (strlen(name) >= 256)
        return tp_errorf(err, "%s: entry name longer than 255 bytes refused", bundle);
    return 0;
}

int tp_ld_bundle_check_type(const char *bundle, struct archive_entry *e, tp_err *err)
{
    const char *name = archive_entry_pathname(e);
    if (!name)
        name = "?";
    if (archive_entry_hardlink(e))
        return tp_errorf(err, "%s: entry %s: hard link refused", bundle, name);
    if (archive_entry_symlink(e) || archive_entry_filetype(e) == AE_IFLNK)
        return tp_errorf(err, "%s: entry %s: symbolic link refused", bundle, name);
    switch (archive_entry_filetype(e)) {
    case AE_IFREG:
        break;
    case AE_IFDIR:
        return tp_errorf(err, "%s: entry %s: directory refused (bundles are flat)", bundle, name);
    case AE_IFCHR:
    case AE_IFBLK:
        return tp_errorf(err, "%s: entry %s: device file refused", bundle, name);
    case AE_IFIFO:
        return tp_errorf(err, "%s: entry %s: FIFO refused", bundle, name);
    default:
        return tp_errorf(err, "%s: entry %s: not a regular file (type 0%o)", bundle, name,
                         (unsigned)archive_entry_filetype(e));
    }
    if (archive_entry_sparse_count(e) > 0)
        return tp_errorf(err, "%s: entry %s: sparse file refused", bundle, name);
    if (!archive_entry_size_is_set(e) || archive_entry_size(e) < 0)
        return tp_errorf(err, "%s: entry %s: no size in header", bundle, name);
    return 0;
}

/* The bundle's descriptor behind libarchive (archive_read_open_fd would
 * leave the descriptor open at close).  Skips seek, so that reading one
 * rank's entry of a large bundle does not read the others. */
#define TAR_READ_BLOCK (1u << 20)
typedef struct tar_source {
    int fd;
    void *buf;
} tar_source;

static la_ssize_t tar_read_cb(struct archive *a, void *p, const void **out)
{
    tar_source *src = p;
    for (;;) {
        ssize_t n = read(src->fd, src->buf, TAR_READ_BLOCK);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            archive_set_error(a, errno, "read: %s", strerror(errno));
        *out = src->buf;
        return n;
    }
}

static la_int64_t tar_skip_cb(struct archive *a, void *p, la_int64_t request)
{
    (void)a;
    tar_source *src = p;
    off_t here = lseek(src->fd, 0, SEEK_CUR);
    if (here < 0 || lseek(src->fd, (off_t)request, SEEK_CUR) < 0)
        return 0; /* libarchive then reads through instead */
    return request;
}

static int tar_close_cb(struct archive *a, void *p)
{
    (void)a;
    tar_source *src = p;
    close(src->fd);
    free(src->buf);
    free(src);
    return ARCHIVE_OK;
}

int tp_ld_tar_open_read(const char *path, struct archive **out, tp_err *err)
{
    struct archive *a = archive_read_new();
    if (!a)
        return tp_errorf(err, "%s: out of memory", path);
    /* Bundles are plain tars: no compression filter is enabled, so a
     * compressed file is refused rather than inflated. */
    archive_read_support_format_tar(a);
    /* Opened here, not by libarchive: a FIFO or a device is refused at
     * once instead of blocking or being read as a stream. */
    int fd = tp_open_regular(path, 0, NULL, err);
    if (fd < 0) {
        archive_read_free(a);
        return -1;
    }
    tar_source *src = malloc(sizeof *src);
    if (!src || !(src->buf = malloc(TAR_READ_BLOCK))) {
        free(src);
        close(fd);
        archive_read_free(a);
        return tp_errorf(err, "%s: out of memory", path);
    }
    src->fd = fd;
    archive_read_set_callback_data(a, src);
    archive_read_set_read_callback(a, tar_read_cb);
    archive_read_set_skip_callback(a, tar_skip_cb);
    archive_read_set_close_callback(a, tar_close_cb);
    if (archive_read_open1(a) != ARCHIVE_OK) {
        /* the close callback has run (or runs in free): fd and src are freed */
        tp_errorf(err, "%s: cannot open bundle: %s", path, archive_error_string(a));
        archive_read_free(a);
        return -1;
    }
    *out = a;
    return 0;
}

void tp_ld_tar_close_read(struct archive *a)
{
    if (a) {
        archive_read_close(a);
        archive_read_free(a);
    }
}

int tp_ld_tar_read_entry(struct archive *a, struct archive_entry *e, const char *path, size_t cap,
                         uint8_t **out, size_t *out_len, tp_err *err)
{
    const char *name = archive_entry_pathname(e);
    int64_t size = archive_entry_size(e);
    if (size < 0 || (uint64_t)size > cap)
        return tp_errorf(err, "%s: entry %s is %lld bytes, more than the %zu allowed", path, name,
                         (long long)size, cap);
    uint8_t *buf = malloc((size_t)size + 1);
    if (!buf)
        return tp_errorf(err, "%s: entry %s: cannot allocate %lld bytes", path, name,
                         (long long)size);
    size_t got = 0;
    while (got < (size_t)size) {
        size_t want = (size_t)size - got;
        if (want > (64u << 20))
            want = 64u << 20;
        la_ssize_t n = archive_read_data(a, buf + got, want);
        if (n < 0) {
            tp_errorf(err, "%s: entry %s: %s", path, name, archive_error_string(a));
            free(buf);
            return -1;
        }
        if (n == 0) {
            tp_errorf(err, "%s: entry %s: truncated (%zu of %lld bytes)", path, name, got,
                      (long long)size);
            free(buf);
            return -1;
        }
        got += (size_t)n;
    }
    buf[got] = 0;
    *out = buf;
    *out_len = got;
    return 0;
}

/* The first entry, which must be manifest.json: parsed into *m and
 * sanity-checked; *json (malloc'd) and *len get its bytes.  On failure *m
 * is zeroed and *json NULL. */
static int read_manifest_entry(struct archive *a, const char *path, tp_manifest *m, uint8_t **json,
                               size_t *len, tp_err *err)
{
    *json = NULL;
    memset(m, 0, sizeof *m);
    struct archive_entry *e;
    int rc = archive_read_next_header(a, &e);
    if (rc == ARCHIVE_EOF)
        return tp_errorf(err, "%s: empty bundle (no %s)", path, TP_MANIFEST_NAME);
    if (rc < ARCHIVE_WARN)
        return tp_errorf(err, "%s: not a readable tar: %s", path, archive_error_string(a));
    const char *name = archive_entry_pathname(e);
    if (tp_ld_bundle_check_name(path, name, err) < 0)
        return -1;
    if (strcmp(name, TP_MANIFEST_NAME) != 0)
        return tp_errorf(err, "%s: first entry is %s, expected %s", path, name, TP_MANIFEST_NAME);
    if (tp_ld_bundle_check_type(path, e, err) < 0)
        return -1;
    if (tp_ld_tar_read_entry(a, e, path, TP_SMALL_FILE_CAP, json, len, err) < 0)
        return -1;
    char src[600];
    snprintf(src, sizeof src, "%s: %s", path, TP_MANIFEST_NAME);
    if (tp_manifest_parse((const char *)*json, *len, src, m, err) < 0 || tp_ld_manifest_sanity(m, path, err) < 0) {
        tp_manifest_free(m);
        free(*json);
        *json = NULL;
        return -1;
    }
    return 0;
}

int tp_ld_tar_read_manifest(struct archive *a, const char *path, tp_manifest *m, tp_err *err)
{
    uint8_t *json;
    size_t len;
    if (read_manifest_entry(a, path, m, &json, &len, err) < 0)
        return -1;
    free(json);
    return 0;
}

/* Checks an entry after the manifest and says what it is: a valid name and
 * type, listed in the manifest, the first of its name. */
static int judge_tar_entry(const char *path, const tp_manifest *m, struct archive *a, struct archive_entry *e,
                           bool *seen_rank, bool *seen_file, tp_ld_tar_entry *ent, tp_err *err)
{
    const char *name = archive_entry_pathname(e);
    if (tp_ld_bundle_check_name(path, name, err) < 0 || tp_ld_bundle_check_type(path, e, err) < 0)
        return -1;
    *ent = (tp_ld_tar_entry){.a = a, .e = e, .name = name, .size = archive_entry_size(e), .rank = -1};
    ent->kind = tp_ld_manifest_classify(m, name, &ent->rank);
    bool *seen = NULL;
    switch (ent->kind) {
    case TP_LD_ENTRY_UNKNOWN:
        return tp_errorf(err, "%s: entry %s is not listed in the bundle's manifest", path, name);
    case TP_LD_ENTRY_MANIFEST:
        return tp_errorf(err, "%s: entry %s appears twice", path, name);
    case TP_LD_ENTRY_RANK:
        seen = &seen_rank[ent->rank];
        break;
    case TP_LD_ENTRY_COPIED:
        ent->file = tp_ld_manifest_file(m, name);
        seen = &seen_file[ent->file - m->files];
        break;
    }
    if (*seen)
        return tp_errorf(err, "%s: entry %s appears twice", path, name);
    *seen = true;
    return 0;
}

int tp_ld_tar_walk(const char *path, tp_manifest *m, const tp_ld_tar_walker *w, void *arg, tp_err *err)
{
    memset(m, 0, sizeof *m);
    struct archive *a;
    if (tp_ld_tar_open_read(path, &a, err) < 0)
        return -1;
    uint8_t *json;
    size_t len;
    int rc = read_manifest_entry(a, path, m, &json, &len, err);
    if (rc == 0 && w->on_manifest)
        rc = w->on_manifest(arg, m, json, len, err);
    free(json);
    bool *seen_rank = NULL, *seen_file = NULL;
    if (rc == 0) {
        seen_rank = calloc((size_t)m->tp, sizeof *seen_rank);
        seen_file = calloc(m->n_files + 1, sizeof *seen_file);
        if (!seen_rank || !seen_file)
            rc = tp_errorf(err, "%s: out of memory", path);
    }
    while (rc == 0) {
        struct archive_entry *e;
        int h = archive_read_next_header(a, &e);
        if (h == ARCHIVE_EOF)
            break;
        if (h < ARCHIVE_WARN) {
            rc = tp_errorf(err, "%s: %s", path, archive_error_string(a));
            break;
        }
        tp_ld_tar_entry ent;
        rc = judge_tar_entry(path, m, a, e, seen_rank, seen_file, &ent, err);
        if (rc == 0)
            rc = w->on_entry(arg, &ent, err);
    }
    if (rc == 0 && w->on_end)
        rc = w->on_end(arg, seen_rank, seen_file, err);
    free(seen_rank);
    free(seen_file);
    tp_ld_tar_close_read(a);
    return rc < 0 ? -1 : 0;
}

void tp_ld_format_rank_set(const bool *have, int tp, char *out, size_t cap)
{
    size_t used = 0;
    out[0] = 0;
    for (int r = 0; r < tp; r++) {
        if (!have[r])
            continue;
        int end = r;
        while (end + 1 < tp && have[end + 1])
            end++;
        int n = end > r ? snprintf(out + used, cap - used, "%s%d-%d", used ? "," : "", r, end)
                        : snprintf(out + used, cap - used, "%s%d", used ? "," : "", r);
        if (n < 0 || (size_t)n >= cap - used)
            break;
        used += (size_t)n;
        r = end;
    }
    if (!used)
        snprintf(out, cap, "no ranks");
}

bool tp_ld_is_directory(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* ------------------------------------------------------------- rank checks */

int tp_ld_check_index(const tp_shard_index *ix, const tp_manifest *m, int rank, const char *file,
                      uint64_t actual_size, tp_err *err)
{
    const tp_manifest_rank *mr = &m->ranks[rank];
    if (strcmp(ix->conversion_id, m->conversion_id) != 0)
        return tp_errorf(err,
                         "rank file %s belongs to conversion %s, the manifest to %s: ranks from "
                         "two conversions",
                         file, ix->conversion_id, m->conversion_id);
    if (ix->rank != rank || ix->tp != m->tp)
        return tp_errorf(
            err, "rank file %s says rank %d of tp %d, the manifest lists it as rank %d of %d", file,
            ix->rank, ix->tp, rank, m->tp);
    if (actual_size != mr->size)
        return tp_errorf(err, "rank file %s is %llu bytes, the manifest says %llu", file,
                         (unsigned long long)actual_size, (unsigned long long)mr->size);
    if (ix->index_xxh3 != mr->checksum) {
        char got[17], want[17];
        tp_hex64(ix->index_xxh3, got);
        tp_hex64(mr->checksum, want);
        return tp_errorf(err, "rank file %s: index checksum %s, the manifest says %s", file, got,
                         want);
    }
    if (ix->n_tensors != mr->n_tensors)
        return tp_errorf(err, "rank file %s holds %zu tensors, the manifest says %zu", file,
                         ix->n_tensors, mr->n_tensors);
    return 0;
}

/* ------------------------------------------------------------ rank data */

int tp_ld_rank_err_prefix(tp_err *err, const tp_loaded_rank *lr)
{
    return tp_err_prefix(err, "%s: rank %d", lr->source, lr->rank);
}

int tp_ld_tensor_sum_mismatch(tp_err *err, const tp_loaded_rank *lr, const tp_shard_tensor *t)
{
    return tp_errorf(err, "%s: rank %d: tensor %s: checksum of the decoded bytes mismatch (data corrupted)",
                     lr->source, lr->rank, t->name);
}
