/* bundle.c - node bundles: plain tars (pax/ustar, no compression: the rank
 * files are compressed already) that each hold the manifest, the copied
 * files and the rank files of one node.
 *
 * Layout of a bundle, in order: manifest.json (always first, so that a
 * reader can judge every later entry against it), the copied files, then
 * the node's rank files.  Bundles are flat: every entry is a plain file
 * named as in the manifest.
 */
#include "loader_internal.h"

#include <archive.h>
#include <archive_entry.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "tp_xxhash.h"

#define COPY_PIECE (4u << 20)

/* ------------------------------------------------------------------- pack */

typedef struct pack_ctx {
    const char *dir;
    const tp_manifest *m;
    tp_progress *progress;
    uint8_t *piece; /* COPY_PIECE bytes */
} pack_ctx;

/* Streams dir/name into the archive as one entry of exactly size bytes.
 * *sum gets the XXH3 of the bytes written. */
static int pack_file(pack_ctx *ctx, struct archive *a, const char *tar_path, const char *name,
                     uint64_t size, uint64_t *sum, tp_err *err)
{
    char *path = tp_path_join(ctx->dir, name);
    if (!path)
        return tp_errorf(err, "%s: out of memory", ctx->dir);
    int fd = tp_open_regular(path, 0, NULL, err);
    if (fd < 0) {
        free(path);
        return -1;
    }
    struct archive_entry *e = archive_entry_new();
    archive_entry_set_pathname(e, name);
    archive_entry_set_filetype(e, AE_IFREG);
    archive_entry_set_perm(e, 0644);
    archive_entry_set_size(e, (la_int64_t)size);
    archive_entry_set_mtime(e, time(NULL), 0);
    int rc = -1;
    XXH3_state_t *state = XXH3_createState();
    if (!state) {
        tp_errorf(err, "%s: out of memory", path);
        goto out;
    }
    XXH3_64bits_reset(state);
    if (archive_write_header(a, e) != ARCHIVE_OK) {
        tp_errorf(err, "%s: entry %s: %s", tar_path, name, archive_error_string(a));
        goto out;
    }
    uint64_t done = 0;
    while (done < size) {
        size_t want = size - done < COPY_PIECE ? (size_t)(size - done) : COPY_PIECE;
        ssize_t n = read(fd, ctx->piece, want);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            tp_errorf(err, "%s: %s", path, strerror(errno));
            goto out;
        }
        if (n == 0) {
            tp_errorf(err, "%s: shrank while being packed (%llu of %llu bytes)", path,
                      (unsigned long long)done, (unsigned long long)size);
            goto out;
        }
        la_ssize_t w = archive_write_data(a, ctx->piece, (size_t)n);
        if (w != n) {
            tp_errorf(err, "%s: writing entry %s: %s", tar_path, name,
                      w < 0 ? archive_error_string(a) : "short write");
            goto out;
        }
        XXH3_64bits_update(state, ctx->piece, (size_t)n);
        done += (uint64_t)n;
        tp_progress_add(ctx->progress, (uint64_t)n);
    }
    if (sum)
        *sum = XXH3_64bits_digest(state);
    rc = 0;
out:
    if (state)
        XXH3_freeState(state);
    archive_entry_free(e);
    close(fd);
    free(path);
    return rc;
}

static int file_size(const char *dir, const char *name, uint64_t *size, tp_err *err)
{
    char *path = tp_path_join(dir, name);
    if (!path)
        return tp_errorf(err, "%s: out of memory", dir);
    struct stat st;
    int rc = stat(path, &st);
    int e = errno;
    free(path);
    if (rc != 0)
        return tp_errorf(err, "%s: %s %s", dir, name, e == ENOENT ? "is missing" : strerror(e));
    if (!S_ISREG(st.st_mode))
        return tp_errorf(err, "%s: %s is not a regular file", dir, name);
    *size = (uint64_t)st.st_size;
    return 0;
}

/* Refuses to pack a directory whose rank files do not match the manifest. */
static int check_rank_file(const char *dir, const tp_manifest *m, int r, tp_err *err)
{
    uint64_t size;
    if (file_size(dir, m->ranks[r].file, &size, err) < 0)
        return -1;
    if (size != m->ranks[r].size)
        return tp_errorf(err, "%s: rank file %s is %llu bytes, the manifest says %llu", dir,
                         m->ranks[r].file, (unsigned long long)size,
                         (unsigned long long)m->ranks[r].size);
    if (strcmp(m->format, "tpshard") != 0)
        return 0; /* the safetensors checksum is checked while streaming */
    char *path = tp_path_join(dir, m->ranks[r].file);
    tp_shard_reader rd;
    int rc = tp_shard_open(&rd, path, err);
    free(path);
    if (rc < 0)
        return -1;
    rc = tp_ld_check_index(&rd.index, m, r, m->ranks[r].file, rd.map.size, err);
    tp_shard_close(&rd);
    return rc < 0 ? tp_err_prefix(err, "%s", dir) : 0;
}

static int pack_node(pack_ctx *ctx, int node, int n_nodes, int first, int last, const char *out_dir,
                     char **out_path, tp_err *err)
{
    const tp_manifest *m = ctx->m;
    char name[64];
    snprintf(name, sizeof name, "node-%05d-of-%05d.tar", node, n_nodes);
    char *final_path = tp_path_join(out_dir, name);
    size_t tmp_len = strlen(final_path) + 5;
    char *tmp_path = malloc(tmp_len);
    if (!final_path || !tmp_path) {
        free(final_path);
        free(tmp_path);
        return tp_errorf(err, "%s: out of memory", out_dir);
    }
    snprintf(tmp_path, tmp_len, "%s.tmp", final_path);
    int rc = -1;
    struct archive *a = NULL;
    int fd = open(tmp_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        tp_errorf(err, "%s: %s", tmp_path, strerror(errno));
        goto out;
    }
    a = archive_write_new();
    if (!a || archive_write_set_format_pax_restricted(a) != ARCHIVE_OK ||
        archive_write_add_filter_none(a) != ARCHIVE_OK ||
        archive_write_set_bytes_in_last_block(a, 1) != ARCHIVE_OK ||
        archive_write_open_fd(a, fd) != ARCHIVE_OK) {
        tp_errorf(err, "%s: %s", tmp_path, a ? archive_error_string(a) : "out of memory");
        goto out;
    }
    uint64_t size, sum;
    if (file_size(ctx->dir, TP_MANIFEST_NAME, &size, err) < 0 ||
        pack_file(ctx, a, tmp_path, TP_MANIFEST_NAME, size, NULL, err) < 0)
        goto out;
    for (size_t i = 0; i < m->n_files; i++) {
        const tp_manifest_file *f = &m->files[i];
        if (file_size(ctx->dir, f->name, &size, err) < 0 ||
            tp_ld_check_copied_size(f, ctx->dir, size, err) < 0 ||
            pack_file(ctx, a, tmp_path, f->name, size, &sum, err) < 0 ||
            tp_ld_check_copied_sum(f, ctx->dir, sum, err) < 0)
            goto out;
    }
    for (int r = first; r < last; r++) {
        if (pack_file(ctx, a, tmp_path, m->ranks[r].file, m->ranks[r].size, &sum, err) < 0)
            goto out;
        if (strcmp(m->format, "safetensors") == 0 && sum != m->ranks[r].checksum) {
            tp_errorf(err, "%s: rank file %s: checksum differs from the manifest's (corrupted)",
                      ctx->dir, m->ranks[r].file);
            goto out;
        }
    }
    if (archive_write_close(a) != ARCHIVE_OK) {
        tp_errorf(err, "%s: %s", tmp_path, archive_error_string(a));
        goto out;
    }
    {
        int commit = tp_file_commit(fd, tmp_path, final_path, err); /* closes fd */
        fd = -1;
        if (commit < 0)
            goto out;
    }
    rc = 0;
out:
    if (a)
        archive_write_free(a);
    if (fd >= 0)
        close(fd);
    if (rc < 0) {
        unlink(tmp_path);
        free(final_path);
    } else if (out_path) {
        *out_path = final_path;
    } else {
        free(final_path);
    }
    free(tmp_path);
    return rc;
}

int tp_bundle_pack(const char *dir, int ranks_per_node, const char *out_dir, bool quiet,
                   char ***out_paths, size_t *n_out, tp_err *err)
{
    if (out_paths)
        *out_paths = NULL;
    if (n_out)
        *n_out = 0;
    if (ranks_per_node < 1)
        return tp_errorf(err, "ranks per node must be at least 1 (got %d)", ranks_per_node);
    if (!out_dir)
        out_dir = ".";
    tp_manifest m;
    if (tp_load_manifest(dir, &m, err) < 0)
        return -1;
    if (!tp_ld_is_directory(dir)) {
        tp_manifest_free(&m);
        return tp_errorf(err, "%s: not a converted directory", dir);
    }
    int n_nodes = (m.tp + ranks_per_node - 1) / ranks_per_node;
    char **paths = calloc((size_t)n_nodes, sizeof *paths);
    pack_ctx ctx = {.dir = dir, .m = &m, .piece = malloc(COPY_PIECE)};
    int rc = -1, made = 0;
    if (!paths || !ctx.piece) {
        tp_errorf(err, "%s: out of memory", dir);
        goto out;
    }
    if (mkdir(out_dir, 0755) != 0 && errno != EEXIST) {
        tp_errorf(err, "%s: %s", out_dir, strerror(errno));
        goto out;
    }
    /* Check everything before writing anything. */
    uint64_t total = 0, size;
    for (int r = 0; r < m.tp; r++) {
        if (check_rank_file(dir, &m, r, err) < 0)
            goto out;
        total += m.ranks[r].size;
    }
    /* The manifest and the copied files go into every node's bundle. */
    if (file_size(dir, TP_MANIFEST_NAME, &size, err) < 0)
        goto out;
    total += size * (uint64_t)n_nodes;
    for (size_t i = 0; i < m.n_files; i++) {
        if (file_size(dir, m.files[i].name, &size, err) < 0 ||
            tp_ld_check_copied_size(&m.files[i], dir, size, err) < 0)
            goto out;
        total += size * (uint64_t)n_nodes;
    }
    ctx.progress = tp_progress_start("packing", total, quiet);
    for (int n = 0; n < n_nodes; n++) {
        int first = n * ranks_per_node;
        int last = first + ranks_per_node < m.tp ? first + ranks_per_node : m.tp;
        if (pack_node(&ctx, n, n_nodes, first, last, out_dir, &paths[n], err) < 0)
            goto out;
        made++;
    }
    if (tp_fsync_dir(out_dir, err) < 0)
        goto out;
    rc = 0;
out:
    tp_progress_finish(ctx.progress);
    if (rc < 0) {
        /* Leave nothing that looks like a complete set. */
        for (int n = 0; n < made; n++)
            unlink(paths[n]);
    }
    if (rc == 0 && out_paths) {
        *out_paths = paths;
        if (n_out)
            *n_out = (size_t)n_nodes;
    } else if (paths) {
        for (int n = 0; n < n_nodes; n++)
            free(paths[n]);
        free(paths);
    }
    free(ctx.piece);
    tp_manifest_free(&m);
    return rc;
}

/* ----------------------------------------------------------------- unpack */

/* The files unpack created, so that a failure removes them all. */
typedef struct extracted {
    char *tmp_path, *final_path;
    bool renamed;
} extracted;

typedef struct unpack_state {
    const char *tar_path, *dest;
    bool created_dest;
    extracted *files;
    size_t n_files, cap;
} unpack_state;

static void unpack_cleanup(unpack_state *u, bool failed)
{
    for (size_t i = 0; i < u->n_files; i++) {
        if (failed) {
            unlink(u->files[i].tmp_path);
            if (u->files[i].renamed)
                unlink(u->files[i].final_path);
        }
        free(u->files[i].tmp_path);
        free(u->files[i].final_path);
    }
    free(u->files);
    if (failed && u->created_dest)
        rmdir(u->dest);
}

static int prepare_dest(unpack_state *u, tp_err *err)
{
    if (mkdir(u->dest, 0755) == 0) {
        u->created_dest = true;
        return 0;
    }
    if (errno != EEXIST)
        return tp_errorf(err, "%s: %s", u->dest, strerror(errno));
    DIR *d = opendir(u->dest);
    if (!d)
        return tp_errorf(err, "%s: %s", u->dest, strerror(errno));
    struct dirent *de;
    bool empty = true;
    while ((de = readdir(d)))
        if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0)
            empty = false;
    closedir(d);
    if (!empty)
        return tp_errorf(err, "%s: destination exists and is not empty", u->dest);
    return 0;
}

/* Writes the current entry's data to a new temporary file in dest; *sum
 * (may be NULL) gets the XXH3 of the bytes written. */
static int extract_entry(unpack_state *u, struct archive *a, const char *name, uint64_t size,
                         const uint8_t *prefix_data, uint64_t *sum, tp_err *err)
{
    if (u->n_files == u->cap) {
        size_t cap = u->cap ? u->cap * 2 : 8;
        extracted *f = realloc(u->files, cap * sizeof *f);
        if (!f)
            return tp_errorf(err, "%s: out of memory", u->dest);
        u->files = f;
        u->cap = cap;
    }
    extracted *x = &u->files[u->n_files];
    memset(x, 0, sizeof *x);
    x->final_path = tp_path_join(u->dest, name);
    size_t len = strlen(name) + 8;
    char *tmp_name = malloc(len);
    if (!x->final_path || !tmp_name) {
        free(x->final_path);
        free(tmp_name);
        return tp_errorf(err, "%s: out of memory", u->dest);
    }
    snprintf(tmp_name, len, ".%s.tmp", name);
    x->tmp_path = tp_path_join(u->dest, tmp_name);
    free(tmp_name);
    if (!x->tmp_path) {
        free(x->final_path);
        return tp_errorf(err, "%s: out of memory", u->dest);
    }
    int fd = open(x->tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        int e = errno;
        free(x->tmp_path);
        free(x->final_path);
        return tp_errorf(err, "%s: %s", u->dest, strerror(e));
    }
    u->n_files++; /* from here on, cleanup removes it */
    uint8_t *piece = NULL;
    XXH3_state_t *state = NULL;
    int rc = -1;
    if (prefix_data) {
        /* Already in memory (the manifest). */
        if (tp_write_all(fd, prefix_data, (size_t)size, x->tmp_path, err) < 0)
            goto out;
        if (fsync(fd) != 0) {
            tp_errorf(err, "%s: fsync: %s", x->tmp_path, strerror(errno));
            goto out;
        }
        rc = 0;
        goto out;
    }
    piece = malloc(COPY_PIECE);
    state = XXH3_createState();
    if (!piece || !state) {
        tp_errorf(err, "%s: out of memory", u->dest);
        goto out;
    }
    XXH3_64bits_reset(state);
    uint64_t done = 0;
    for (;;) {
        la_ssize_t n = archive_read_data(a, piece, COPY_PIECE);
        if (n < 0) {
            tp_errorf(err, "%s: entry %s: %s", u->tar_path, name, archive_error_string(a));
            goto out;
        }
        if (n == 0)
            break;
        done += (uint64_t)n;
        if (done > size) {
            tp_errorf(err, "%s: entry %s: more data than its %llu bytes", u->tar_path, name,
                      (unsigned long long)size);
            goto out;
        }
        if (tp_write_all(fd, piece, (size_t)n, x->tmp_path, err) < 0)
            goto out;
        XXH3_64bits_update(state, piece, (size_t)n);
    }
    if (done != size) {
        tp_errorf(err, "%s: entry %s: truncated (%llu of %llu bytes)", u->tar_path, name,
                  (unsigned long long)done, (unsigned long long)size);
        goto out;
    }
    if (fsync(fd) != 0) {
        tp_errorf(err, "%s: fsync: %s", x->tmp_path, strerror(errno));
        goto out;
    }
    if (sum)
        *sum = XXH3_64bits_digest(state);
    rc = 0;
out:
    free(piece);
    if (state)
        XXH3_freeState(state);
    if (close(fd) != 0 && rc == 0)
        rc = tp_errorf(err, "%s: close: %s", x->tmp_path, strerror(errno));
    return rc;
}

/* The sizes of an entry against the manifest (tp_ld_tar_walk has checked
 * the rest): a rank file's must be the manifest's, a copied file's too, and
 * within the copied files' cap. */
static int judge_entry(const char *tar_path, const tp_manifest *m, const tp_ld_tar_entry *ent, tp_err *err)
{
    if (ent->kind == TP_LD_ENTRY_RANK) {
        if ((uint64_t)ent->size != m->ranks[ent->rank].size)
            return tp_errorf(err, "%s: entry %s is %lld bytes, the manifest says %llu", tar_path, ent->name,
                             (long long)ent->size, (unsigned long long)m->ranks[ent->rank].size);
        return 0;
    }
    if ((uint64_t)ent->size > TP_SMALL_FILE_CAP)
        return tp_errorf(err, "%s: entry %s is %lld bytes, more than the %u allowed", tar_path, ent->name,
                         (long long)ent->size, TP_SMALL_FILE_CAP);
    return tp_ld_check_copied_size(ent->file, tar_path, (uint64_t)ent->size, err);
}

/* Every copied file arrived, and at least one rank file (both unpack's and
 * verify's rule); *n_ranks (may be NULL) gets how many. */
static int check_all_copied(const char *tar_path, const tp_manifest *m, const bool *seen_rank,
                            const bool *seen_file, size_t *n_ranks, tp_err *err)
{
    for (size_t i = 0; i < m->n_files; i++)
        if (!seen_file[i])
            return tp_errorf(err, "%s: copied file %s listed in the manifest is missing", tar_path,
                             m->files[i].name);
    size_t n = 0;
    for (int r = 0; r < m->tp; r++)
        n += seen_rank[r];
    if (n == 0)
        return tp_errorf(err, "%s: the bundle holds no rank file", tar_path);
    if (n_ranks)
        *n_ranks = n;
    return 0;
}

typedef struct unpack_walk {
    unpack_state u;
    tp_manifest m;
} unpack_walk;

/* The manifest, judged before dest is touched, is the first file written. */
static int unpack_manifest(void *arg, const tp_manifest *m, const uint8_t *json, size_t len, tp_err *err)
{
    unpack_walk *w = arg;
    if (prepare_dest(&w->u, err) < 0)
        return -1;
    return extract_entry(&w->u, NULL, TP_MANIFEST_NAME, len, json, NULL, err);
}

static int unpack_entry(void *arg, const tp_ld_tar_entry *ent, tp_err *err)
{
    unpack_walk *w = arg;
    const char *tar_path = w->u.tar_path;
    const tp_manifest *m = &w->m;
    if (judge_entry(tar_path, m, ent, err) < 0)
        return -1;
    uint64_t sum;
    if (extract_entry(&w->u, ent->a, ent->name, (uint64_t)ent->size, NULL, &sum, err) < 0)
        return -1;
    if (ent->kind == TP_LD_ENTRY_COPIED)
        return tp_ld_check_copied_sum(ent->file, tar_path, sum, err);
    if (strcmp(m->format, "tpshard") != 0)
        return 0;
    /* Cheap: the index only.  Chunk checksums are tpbundle verify's. */
    int r = ent->rank;
    tp_shard_reader rd;
    if (tp_shard_open(&rd, w->u.files[w->u.n_files - 1].tmp_path, err) < 0)
        return tp_err_prefix(err, "%s: entry %s", tar_path, m->ranks[r].file);
    int ok = tp_ld_check_index(&rd.index, m, r, m->ranks[r].file, rd.map.size, err);
    tp_shard_close(&rd);
    return ok < 0 ? tp_err_prefix(err, "%s", tar_path) : 0;
}

static int unpack_end(void *arg, const bool *seen_rank, const bool *seen_file, tp_err *err)
{
    unpack_walk *w = arg;
    return check_all_copied(w->u.tar_path, &w->m, seen_rank, seen_file, NULL, err);
}

int tp_bundle_unpack(const char *tar_path, const char *dest_dir, tp_err *err)
{
    static const tp_ld_tar_walker walker = {unpack_manifest, unpack_entry, unpack_end};
    unpack_walk w = {.u = {.tar_path = tar_path, .dest = dest_dir}};
    int rc = -1;
    if (tp_ld_tar_walk(tar_path, &w.m, &walker, &w, err) < 0)
        goto out;
    unpack_state *u = &w.u;
    /* Everything arrived: give the files their names, manifest (entry 0) last. */
    for (size_t i = u->n_files; i-- > 0;) {
        if (rename(u->files[i].tmp_path, u->files[i].final_path) != 0) {
            tp_errorf(err, "%s: rename: %s", u->files[i].final_path, strerror(errno));
            goto out;
        }
        u->files[i].renamed = true;
    }
    if (tp_fsync_dir(dest_dir, err) < 0)
        goto out;
    rc = 0;
out:
    unpack_cleanup(&w.u, rc < 0);
    tp_manifest_free(&w.m);
    return rc;
}

/* ----------------------------------------------------------------- verify */

/* Checks one rank file held in memory: index vs manifest and every
 * checksum (tpshard), or the file checksum and structure (safetensors). */
static int verify_rank_image(const char *tar_path, const tp_manifest *m, int r, uint8_t *image,
                             size_t len, tp_pool *pool, tp_err *err)
{
    const char *file = m->ranks[r].file;
    char name[1024];
    snprintf(name, sizeof name, "%s:%s", tar_path, file);
    if (strcmp(m->format, "safetensors") == 0) {
        if (tp_xxh3(image, len) != m->ranks[r].checksum)
            return tp_errorf(err, "%s: checksum differs from the manifest's (corrupted)", name);
        tp_st_file st;
        if (tp_st_parse(&st, image, len, name, err) < 0)
            return -1;
        tp_st_close(&st);
        return 0;
    }
    tp_shard_reader rd;
    memset(&rd, 0, sizeof rd);
    if (tp_shard_parse(&rd.index, image, len, name, err) < 0)
        return -1;
    rd.map.data = image;
    rd.map.size = len;
    rd.map.path = name;
    int rc = tp_ld_check_index(&rd.index, m, r, file, len, err);
    if (rc < 0)
        tp_err_prefix(err, "%s", tar_path);
    uint8_t *buf = NULL;
    size_t cap = 0;
    for (size_t i = 0; rc == 0 && i < rd.index.n_tensors; i++) {
        const tp_shard_tensor *t = &rd.index.tensors[i];
        if (t->raw_size > cap) {
            uint8_t *p = realloc(buf, (size_t)t->raw_size);
            if (!p) {
                rc = tp_errorf(err, "%s: tensor %s: out of memory", name, t->name);
                break;
            }
            buf = p;
            cap = (size_t)t->raw_size;
        }
        if (tp_shard_read_tensor(&rd, t, buf, pool, true, err) < 0)
            rc = tp_err_prefix(err, "%s: rank %d", tar_path, r);
    }
    free(buf);
    tp_shard_index_free(&rd.index);
    return rc;
}

typedef struct verify_walk {
    const char *tar_path;
    tp_manifest m;
    tp_pool *pool;
    size_t *n_ranks;
} verify_walk;

static int verify_entry(void *arg, const tp_ld_tar_entry *ent, tp_err *err)
{
    verify_walk *w = arg;
    const tp_manifest *m = &w->m;
    if (judge_entry(w->tar_path, m, ent, err) < 0)
        return -1;
    uint8_t *data;
    size_t len;
    size_t cap = ent->kind == TP_LD_ENTRY_RANK ? (size_t)m->ranks[ent->rank].size : TP_SMALL_FILE_CAP;
    if (tp_ld_tar_read_entry(ent->a, ent->e, w->tar_path, cap, &data, &len, err) < 0)
        return -1;
    int ok = ent->kind == TP_LD_ENTRY_RANK
                 ? verify_rank_image(w->tar_path, m, ent->rank, data, len, w->pool, err)
                 : tp_ld_check_copied_data(ent->file, w->tar_path, data, len, true, err);
    free(data);
    return ok;
}

static int verify_end(void *arg, const bool *seen_rank, const bool *seen_file, tp_err *err)
{
    verify_walk *w = arg;
    return check_all_copied(w->tar_path, &w->m, seen_rank, seen_file, w->n_ranks, err);
}

int tp_bundle_verify(const char *tar_path, size_t *n_ranks, tp_err *err)
{
    static const tp_ld_tar_walker walker = {NULL, verify_entry, verify_end};
    if (n_ranks)
        *n_ranks = 0;
    verify_walk w = {.tar_path = tar_path, .n_ranks = n_ranks, .pool = tp_pool_create(0)};
    if (!w.pool)
        return tp_errorf(err, "%s: out of memory", tar_path);
    int rc = tp_ld_tar_walk(tar_path, &w.m, &walker, &w, err);
    tp_pool_destroy(w.pool);
    tp_manifest_free(&w.m);
    return rc;
}
