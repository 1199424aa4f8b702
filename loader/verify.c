/* verify.c - checksum verification of a converted directory, and the bit
 * for bit comparison of a conversion with its source model.
 *
 * Memory stays bounded: tensors are decoded one at a time into a buffer
 * that is reused (it grows to the largest local tensor), and the comparison
 * with the source works slice by slice on each rank's local tensor against
 * the matching region of the (mapped) source tensor, never building a full
 * global tensor.
 */
#include "loader_internal.h"
#include "convert.h"

#include <cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* ------------------------------------------------------ an open conversion */

typedef struct rank_view {
    int rank;
    char *path;
    bool is_st;             /* safetensors export */
    tp_shard_reader reader; /* tpshard */
    bool reader_open;
    tp_st_file st; /* safetensors */
    bool st_open;
    cJSON *splits; /* safetensors: __metadata__ "tp_splits" */
} rank_view;

typedef struct conversion {
    const char *dir;
    tp_manifest m;
    bool m_read;
    bool is_st;
    rank_view *ranks;
} conversion;

static void conversion_close(conversion *c)
{
    if (c->ranks) {
        for (int r = 0; r < c->m.tp; r++) {
            rank_view *v = &c->ranks[r];
            if (v->reader_open)
                tp_shard_close(&v->reader);
            if (v->st_open)
                tp_st_close(&v->st);
            cJSON_Delete(v->splits);
            free(v->path);
        }
        free(c->ranks);
    }
    if (c->m_read)
        tp_manifest_free(&c->m);
    memset(c, 0, sizeof *c);
}

static const char *st_meta(const tp_st_file *f, const char *key)
{
    for (size_t i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta_keys[i], key) == 0)
            return f->meta_values[i];
    return NULL;
}

static int open_rank_tpshard(conversion *c, rank_view *v, tp_err *err)
{
    const tp_manifest_rank *mr = &c->m.ranks[v->rank];
    struct stat st;
    if (stat(v->path, &st) != 0)
        return tp_errorf(err, "%s: rank file %s %s", c->dir, mr->file,
                         errno == ENOENT ? "is missing" : strerror(errno));
    tp_err open_err;
    if (tp_shard_open(&v->reader, v->path, &open_err) < 0) {
        memset(&v->reader, 0, sizeof v->reader);
        if ((uint64_t)st.st_size != mr->size)
            return tp_errorf(err, "%s: rank file %s is %llu bytes, the manifest says %llu (%s)",
                             c->dir, mr->file, (unsigned long long)st.st_size,
                             (unsigned long long)mr->size, open_err.msg);
        if (err)
            *err = open_err;
        return -1;
    }
    v->reader_open = true;
    const tp_shard_index *ix = &v->reader.index;
    if (tp_ld_check_index(ix, &c->m, v->rank, mr->file, v->reader.map.size, err) < 0)
        return tp_err_prefix(err, "%s", c->dir);
    uint64_t raw = 0, stored = 0;
    for (size_t i = 0; i < ix->n_tensors; i++) {
        raw += ix->tensors[i].raw_size;
        stored += ix->tensors[i].stored_size;
    }
    if (raw != mr->raw_bytes || stored != mr->stored_bytes)
        return tp_errorf(err,
                         "%s: rank file %s holds %llu raw / %llu stored bytes, the manifest says "
                         "%llu / %llu",
                         c->dir, mr->file, (unsigned long long)raw, (unsigned long long)stored,
                         (unsigned long long)mr->raw_bytes, (unsigned long long)mr->stored_bytes);
    return 0;
}

static int open_rank_safetensors(conversion *c, rank_view *v, tp_err *err)
{
    const tp_manifest_rank *mr = &c->m.ranks[v->rank];
    struct stat st;
    if (stat(v->path, &st) != 0)
        return tp_errorf(err, "%s: rank file %s %s", c->dir, mr->file,
                         errno == ENOENT ? "is missing" : strerror(errno));
    if ((uint64_t)st.st_size != mr->size)
        return tp_errorf(err, "%s: rank file %s is %llu bytes, the manifest says %llu", c->dir,
                         mr->file, (unsigned long long)st.st_size, (unsigned long long)mr->size);
    if (tp_st_open(&v->st, v->path, err) < 0) {
        memset(&v->st, 0, sizeof v->st);
        return -1;
    }
    v->st_open = true;
    uint64_t sum = tp_xxh3(v->st.map.data, v->st.map.size);
    if (sum != mr->checksum) {
        char got[17], want[17];
        tp_hex64(sum, got);
        tp_hex64(mr->checksum, want);
        return tp_errorf(err,
                         "%s: rank file %s: checksum %s, the manifest says %s (file corrupted)",
                         c->dir, mr->file, got, want);
    }
    if (v->st.n_tensors != mr->n_tensors)
        return tp_errorf(err, "%s: rank file %s holds %zu tensors, the manifest says %zu", c->dir,
                         mr->file, v->st.n_tensors, mr->n_tensors);
    const char *splits = st_meta(&v->st, "tp_splits");
    if (splits) {
        v->splits = cJSON_Parse(splits);
        if (!v->splits || !cJSON_IsObject(v->splits))
            return tp_errorf(err, "%s: rank file %s: __metadata__ tp_splits is not a JSON object",
                             c->dir, mr->file);
    }
    return 0;
}

/* Every rank must hold the same tensor names (with the same dtype). */
/* A tensor that only one rank holds: an expert's own tensor in an
 * expert-parallel conversion. */
static bool owner_only(const conversion *c, const char *name)
{
    long layer, expert;
    tp_expert_part part = tp_arch_expert_part(name, &layer, &expert);
    return c->m.expert_parallel && expert >= 0 &&
           (part == TP_EXPERT_GATE || part == TP_EXPERT_UP || part == TP_EXPERT_DOWN);
}

/* The tensors every rank holds (all but the owner-only ones). */
static size_t n_shared_tensors(const conversion *c, const rank_view *v)
{
    size_t n = v->is_st ? v->st.n_tensors : v->reader.index.n_tensors, k = 0;
    for (size_t i = 0; i < n; i++)
        k += !owner_only(c, v->is_st ? v->st.tensors[i].name : v->reader.index.tensors[i].name);
    return k;
}

static int check_ranks_agree(conversion *c, tp_err *err)
{
    for (int r = 1; r < c->m.tp; r++) {
        rank_view *a = &c->ranks[0], *b = &c->ranks[r];
        size_t n = c->is_st ? a->st.n_tensors : a->reader.index.n_tensors;
        size_t na = n_shared_tensors(c, a), nb = n_shared_tensors(c, b);
        if (na != nb)
            return tp_errorf(err, "%s: rank 0 holds %zu tensors, rank %d holds %zu", c->dir, na, r,
                             nb);
        for (size_t i = 0; i < n; i++) {
            const char *name;
            tp_dtype da, db;
            if (owner_only(c, c->is_st ? a->st.tensors[i].name : a->reader.index.tensors[i].name))
                continue;
            if (c->is_st) {
                name = a->st.tensors[i].name;
                da = a->st.tensors[i].dtype;
                const tp_st_tensor *t = tp_st_find(&b->st, name);
                if (!t)
                    return tp_errorf(err, "%s: tensor %s is in rank 0 but not in rank %d", c->dir,
                                     name, r);
                db = t->dtype;
            } else {
                const tp_shard_tensor *ta = &a->reader.index.tensors[i];
                name = ta->name;
                da = ta->dtype;
                const tp_shard_tensor *t = tp_shard_find(&b->reader.index, name);
                if (!t)
                    return tp_errorf(err, "%s: tensor %s is in rank 0 but not in rank %d", c->dir,
                                     name, r);
                db = t->dtype;
                if (t->ndim != ta->ndim ||
                    memcmp(t->global_shape, ta->global_shape, sizeof(uint64_t) * (size_t)t->ndim) ||
                    t->split.dim != ta->split.dim)
                    return tp_errorf(err,
                                     "%s: tensor %s: rank %d disagrees with rank 0 on the global "
                                     "shape or the split dimension",
                                     c->dir, name, r);
            }
            if (da != db)
                return tp_errorf(err, "%s: tensor %s is %s in rank 0 but %s in rank %d", c->dir,
                                 name, tp_dtype_name(da), tp_dtype_name(db), r);
        }
    }
    return 0;
}

static int drop_copied(void *arg, const tp_manifest_file *f, char *text, size_t len, tp_err *err)
{
    free(text);
    return 0;
}

/* Every copied file present, with the manifest's size and XXH3: the rule
 * tp_load_rank applies too (tp_ld_check_copied_files). */
static int check_copied_files(conversion *c, tp_err *err)
{
    return tp_ld_check_copied_files(c->dir, &c->m, true, drop_copied, NULL, err);
}

/* Reads the manifest and opens every rank file, checking each against the
 * manifest (size, checksum, conversion id, tensor count and bytes). */
static int conversion_open(conversion *c, const char *dir, tp_err *err)
{
    memset(c, 0, sizeof *c);
    c->dir = dir;
    if (tp_manifest_read(dir, &c->m, err) < 0) {
        memset(&c->m, 0, sizeof c->m);
        return -1;
    }
    c->m_read = true;
    if (tp_ld_manifest_sanity(&c->m, dir, err) < 0)
        return -1;
    if (strcmp(c->m.format, "safetensors") == 0)
        c->is_st = true;
    else if (strcmp(c->m.format, "tpshard") != 0)
        return tp_errorf(err, "%s: manifest: unknown format \"%s\"", dir, c->m.format);
    c->ranks = calloc((size_t)c->m.tp, sizeof *c->ranks);
    if (!c->ranks)
        return tp_errorf(err, "%s: out of memory", dir);
    for (int r = 0; r < c->m.tp; r++) {
        rank_view *v = &c->ranks[r];
        v->rank = r;
        v->is_st = c->is_st;
        v->path = tp_path_join(dir, c->m.ranks[r].file);
        if (!v->path)
            return tp_errorf(err, "%s: out of memory", dir);
        int rc = c->is_st ? open_rank_safetensors(c, v, err) : open_rank_tpshard(c, v, err);
        if (rc < 0)
            return -1;
    }
    if (check_ranks_agree(c, err) < 0)
        return -1;
    /* Complete for its architecture (ranks agree, so rank 0's list speaks
     * for all): a tensor missing on every rank is refused, named. */
    if (!c->is_st && tp_arch_check_index(c->m.config_json, &c->ranks[0].reader.index, err) < 0)
        return tp_err_prefix(err, "%s", dir);
    return check_copied_files(c, err);
}

/* ------------------------------------------------------------ verify_dir */

/* A buffer that grows to the largest tensor decoded so far. */
typedef struct grow_buf {
    uint8_t *data;
    size_t cap;
} grow_buf;

static int grow_buf_reserve(grow_buf *b, size_t n, tp_err *err)
{
    if (n <= b->cap)
        return 0;
    uint8_t *p = realloc(b->data, n ? n : 1);
    if (!p)
        return tp_errorf(err, "cannot allocate %zu bytes", n);
    b->data = p;
    b->cap = n;
    return 0;
}

static uint64_t total_stored(const conversion *c)
{
    uint64_t total = 0;
    for (int r = 0; r < c->m.tp; r++)
        total += c->m.ranks[r].stored_bytes ? c->m.ranks[r].stored_bytes : c->m.ranks[r].size;
    return total;
}

int tp_verify_dir(const char *dir, int threads, bool quiet, tp_verify_report *rep, tp_err *err)
{
    tp_verify_report local = {0};
    conversion c;
    grow_buf buf = {0};
    tp_pool *pool = NULL;
    tp_progress *progress = NULL;
    int rc = -1;
    if (conversion_open(&c, dir, err) < 0)
        goto out;
    local.ranks = (size_t)c.m.tp;
    if (c.is_st) {
        /* conversion_open already hashed every byte of every file. */
        for (int r = 0; r < c.m.tp; r++) {
            local.tensors += c.ranks[r].st.n_tensors;
            local.bytes += c.ranks[r].st.map.size;
        }
        rc = 0;
        goto out;
    }
    pool = tp_pool_create(threads);
    if (!pool) {
        tp_errorf(err, "%s: cannot start %d threads", dir, threads);
        goto out;
    }
    progress = tp_progress_start("verifying", total_stored(&c), quiet);
    for (int r = 0; r < c.m.tp; r++) {
        const tp_shard_reader *rd = &c.ranks[r].reader;
        for (size_t i = 0; i < rd->index.n_tensors; i++) {
            const tp_shard_tensor *t = &rd->index.tensors[i];
            if (grow_buf_reserve(&buf, (size_t)t->raw_size, err) < 0) {
                tp_err_prefix(err, "%s: rank %d: tensor %s", dir, r, t->name);
                goto out;
            }
            if (tp_shard_read_tensor(rd, t, buf.data, pool, true, err) < 0) {
                tp_err_prefix(err, "%s: rank %d", dir, r);
                goto out;
            }
            local.tensors++;
            local.chunks += t->n_chunks;
            local.bytes += t->raw_size;
            tp_progress_add(progress, t->stored_size);
        }
    }
    rc = 0;
out:
    tp_progress_finish(progress);
    if (pool)
        tp_pool_destroy(pool);
    free(buf.data);
    conversion_close(&c);
    if (rep)
        *rep = local;
    return rc;
}

/* -------------------------------------------------------- verify_against */

/* One rank's view of one tensor, ready to compare with the source. */
typedef struct local_tensor {
    tp_dtype dtype;
    int ndim;
    uint64_t shape[TP_MAX_DIMS];
    bool has_global; /* tpshard records the global shape */
    uint64_t global_shape[TP_MAX_DIMS];
    tp_split split;
    const uint8_t *data;
    size_t nbytes;
} local_tensor;

/* Reads {"dim":D,"ranges":[[s,e],...]} of the safetensors export. */
static int parse_st_split(const cJSON *splits, const char *name, const char *file, tp_split *out,
                          tp_err *err)
{
    memset(out, 0, sizeof *out);
    out->dim = -1;
    const cJSON *s = splits ? cJSON_GetObjectItemCaseSensitive(splits, name) : NULL;
    if (!s)
        return 0;
    if (!cJSON_IsObject(s))
        return tp_errorf(err, "%s: tp_splits: tensor %s: not an object", file, name);
    const cJSON *dim = cJSON_GetObjectItemCaseSensitive(s, "dim");
    if (!dim || cJSON_IsNull(dim))
        return 0;
    if (!cJSON_IsNumber(dim) || dim->valuedouble != (double)(int)dim->valuedouble ||
        dim->valuedouble < -1 || dim->valuedouble >= TP_MAX_DIMS)
        return tp_errorf(err, "%s: tp_splits: tensor %s: bad \"dim\"", file, name);
    out->dim = (int)dim->valuedouble;
    if (out->dim < 0)
        return 0;
    const cJSON *ranges = cJSON_GetObjectItemCaseSensitive(s, "ranges");
    int n = cJSON_IsArray(ranges) ? cJSON_GetArraySize(ranges) : -1;
    if (n < 1 || n > TP_MAX_RANGES)
        return tp_errorf(err, "%s: tp_splits: tensor %s: \"ranges\" must hold 1 to %d pairs", file,
                         name, TP_MAX_RANGES);
    out->n_ranges = n;
    for (int k = 0; k < n; k++) {
        const cJSON *pair = cJSON_GetArrayItem(ranges, k);
        const cJSON *a = cJSON_GetArrayItem(pair, 0), *b = cJSON_GetArrayItem(pair, 1);
        if (!cJSON_IsArray(pair) || cJSON_GetArraySize(pair) != 2 || !cJSON_IsNumber(a) ||
            !cJSON_IsNumber(b) || a->valuedouble < 0 || b->valuedouble < 0 ||
            a->valuedouble > 9.0e15 || b->valuedouble > 9.0e15)
            return tp_errorf(err, "%s: tp_splits: tensor %s: range %d is not [start, end]", file,
                             name, k);
        out->start[k] = (uint64_t)a->valuedouble;
        out->end[k] = (uint64_t)b->valuedouble;
    }
    return 0;
}

/* Fills lt with rank v's copy of name (decoded into buf for tpshard). */
static int get_local(const conversion *c, rank_view *v, const char *name, grow_buf *buf,
                     tp_pool *pool, local_tensor *lt, tp_verify_report *rep, tp_err *err)
{
    memset(lt, 0, sizeof *lt);
    if (v->is_st) {
        const tp_st_tensor *t = tp_st_find(&v->st, name);
        if (!t)
            return tp_errorf(err, "%s: rank %d: tensor %s of the source is missing", c->dir,
                             v->rank, name);
        lt->dtype = t->dtype;
        lt->ndim = t->ndim;
        memcpy(lt->shape, t->shape, sizeof lt->shape);
        lt->data = t->data;
        lt->nbytes = t->nbytes;
        rep->bytes += t->nbytes;
        return parse_st_split(v->splits, name, c->m.ranks[v->rank].file, &lt->split, err);
    }
    const tp_shard_tensor *t = tp_shard_find(&v->reader.index, name);
    if (!t)
        return tp_errorf(err, "%s: rank %d: tensor %s of the source is missing", c->dir, v->rank,
                         name);
    if (grow_buf_reserve(buf, (size_t)t->raw_size, err) < 0)
        return tp_err_prefix(err, "%s: rank %d: tensor %s", c->dir, v->rank, name);
    if (tp_shard_read_tensor(&v->reader, t, buf->data, pool, true, err) < 0)
        return tp_err_prefix(err, "%s: rank %d", c->dir, v->rank);
    lt->dtype = t->dtype;
    lt->ndim = t->ndim;
    memcpy(lt->shape, t->shape, sizeof lt->shape);
    lt->has_global = true;
    memcpy(lt->global_shape, t->global_shape, sizeof lt->global_shape);
    lt->split = t->split;
    lt->data = buf->data;
    lt->nbytes = (size_t)t->raw_size;
    rep->chunks += t->n_chunks;
    rep->bytes += t->raw_size;
    return 0;
}

/* "[3, 17]": the multi-dimensional index of flat element e of shape. */
static void format_index(uint64_t e, const uint64_t *shape, int ndim, char *out, size_t cap)
{
    uint64_t idx[TP_MAX_DIMS] = {0};
    for (int d = ndim - 1; d >= 0; d--) {
        uint64_t n = shape[d] ? shape[d] : 1;
        idx[d] = e % n;
        e /= n;
    }
    size_t used = (size_t)snprintf(out, cap, "[");
    for (int d = 0; d < ndim && used < cap; d++)
        used += (size_t)snprintf(out + used, cap - used, "%s%" PRIu64, d ? ", " : "", idx[d]);
    if (used < cap)
        snprintf(out + used, cap - used, "]");
}

static size_t first_diff(const uint8_t *a, const uint8_t *b, size_t n)
{
    size_t i = 0;
    while (i < n && a[i] == b[i])
        i++;
    return i;
}

static int mismatch(const conversion *c, int rank, const tp_st_tensor *s, uint64_t global_elem,
                    tp_err *err)
{
    char where[256];
    format_index(global_elem, s->shape, s->ndim, where, sizeof where);
    return tp_errorf(
        err,
        "%s: rank %d: tensor %s differs from the source at element %s (flat index %" PRIu64 ")",
        c->dir, rank, s->name, where, global_elem);
}

/* A covered interval of the split dimension, for the coverage check. */
typedef struct interval {
    uint64_t start, end;
} interval;

static int cmp_interval(const void *a, const void *b)
{
    const interval *x = a, *y = b;
    return x->start < y->start ? -1 : x->start > y->start ? 1 : 0;
}

/* Compares one rank's local tensor with the source; appends the ranges it
 * holds to cover (room for TP_MAX_RANGES). */
static int compare_local(const conversion *c, int rank, const tp_st_tensor *s,
                         const local_tensor *lt, interval *cover, size_t *n_cover, tp_err *err)
{
    const char *name = s->name;
    if (lt->dtype != s->dtype)
        return tp_errorf(err, "%s: rank %d: tensor %s is %s, the source is %s", c->dir, rank, name,
                         tp_dtype_name(lt->dtype), tp_dtype_name(s->dtype));
    if (lt->ndim != s->ndim)
        return tp_errorf(err, "%s: rank %d: tensor %s has %d dimensions, the source %d", c->dir,
                         rank, name, lt->ndim, s->ndim);
    if (lt->has_global && memcmp(lt->global_shape, s->shape, sizeof(uint64_t) * (size_t)s->ndim))
        return tp_errorf(err,
                         "%s: rank %d: tensor %s: recorded global shape differs from the source's",
                         c->dir, rank, name);
    const tp_split *sp = &lt->split;
    size_t el = tp_dtype_size(s->dtype);
    if (sp->dim < 0) {
        if (memcmp(lt->shape, s->shape, sizeof(uint64_t) * (size_t)s->ndim) ||
            lt->nbytes != s->nbytes)
            return tp_errorf(
                err, "%s: rank %d: tensor %s is replicated but its shape differs from the source's",
                c->dir, rank, name);
        size_t at = first_diff(lt->data, s->data, s->nbytes);
        if (at < s->nbytes)
            return mismatch(c, rank, s, at / el, err);
        return 0;
    }
    int d = sp->dim;
    if (d >= s->ndim || sp->n_ranges < 1 || sp->n_ranges > TP_MAX_RANGES)
        return tp_errorf(err, "%s: rank %d: tensor %s: bad split (dim %d, %d ranges)", c->dir, rank,
                         name, d, sp->n_ranges);
    uint64_t held = 0;
    for (int k = 0; k < sp->n_ranges; k++) {
        if (sp->start[k] >= sp->end[k] || sp->end[k] > s->shape[d])
            return tp_errorf(err,
                             "%s: rank %d: tensor %s: range [%" PRIu64 ", %" PRIu64
                             ") is outside dim %d of size %" PRIu64,
                             c->dir, rank, name, sp->start[k], sp->end[k], d, s->shape[d]);
        held += sp->end[k] - sp->start[k];
    }
    for (int k = 0; k < s->ndim; k++) {
        uint64_t want = k == d ? held : s->shape[k];
        if (lt->shape[k] != want)
            return tp_errorf(
                err, "%s: rank %d: tensor %s: local dim %d is %" PRIu64 ", the split says %" PRIu64,
                c->dir, rank, name, k, lt->shape[k], want);
    }
    /* View both as [outer, dim d, inner]; compare each range's rows. */
    uint64_t outer = 1, inner = el;
    for (int k = 0; k < d; k++)
        outer *= s->shape[k];
    for (int k = d + 1; k < s->ndim; k++)
        inner *= s->shape[k];
    uint64_t global_d = s->shape[d];
    uint64_t local_off = 0;
    for (int k = 0; k < sp->n_ranges; k++) {
        uint64_t len = sp->end[k] - sp->start[k];
        for (uint64_t o = 0; o < outer; o++) {
            const uint8_t *mine = lt->data + (o * held + local_off) * inner;
            const uint8_t *theirs = s->data + (o * global_d + sp->start[k]) * inner;
            size_t n = (size_t)(len * inner);
            size_t at = first_diff(mine, theirs, n);
            if (at < n) {
                uint64_t byte = (o * global_d + sp->start[k]) * inner + at;
                return mismatch(c, rank, s, byte / el, err);
            }
        }
        cover[(*n_cover)++] = (interval){sp->start[k], sp->end[k]};
        local_off += len;
    }
    return 0;
}

/* Every index of the split dimension must be held by some rank. */
static int check_coverage(const conversion *c, const tp_st_tensor *s, int dim, interval *cover,
                          size_t n, tp_err *err)
{
    qsort(cover, n, sizeof *cover, cmp_interval);
    uint64_t reached = 0;
    for (size_t i = 0; i < n; i++) {
        if (cover[i].start > reached)
            break;
        if (cover[i].end > reached)
            reached = cover[i].end;
    }
    if (reached < s->shape[dim]) {
        uint64_t gap_end = s->shape[dim];
        for (size_t i = 0; i < n; i++)
            if (cover[i].start > reached && cover[i].start < gap_end)
                gap_end = cover[i].start;
        return tp_errorf(
            err, "%s: tensor %s: indices [%" PRIu64 ", %" PRIu64 ") of dim %d are held by no rank",
            c->dir, s->name, reached, gap_end, dim);
    }
    return 0;
}

/* Conversion tensors the source does not have are errors. */
typedef struct requant requant;
static bool requant_scale(const requant *rq, const tp_st_set *src, const char *name);

static int check_no_extra(const conversion *c, const tp_st_set *src, const requant *rq,
                          const char *model_dir, tp_err *err)
{
    for (int r = 0; r < c->m.tp; r++) {
        const rank_view *v = &c->ranks[r];
        size_t n = v->is_st ? v->st.n_tensors : v->reader.index.n_tensors;
        for (size_t i = 0; i < n; i++) {
            const char *name = v->is_st ? v->st.tensors[i].name : v->reader.index.tensors[i].name;
            if (!tp_st_set_find(src, name) && !requant_scale(rq, src, name))
                return tp_errorf(err, "%s: rank %d: tensor %s is not in the source model %s",
                                 c->dir, r, name, model_dir);
        }
    }
    return 0;
}

/* The one rank whose file holds a source tensor, or -1 when every rank
 * holds a part: under --expert-parallel a per-expert tensor is whole in the
 * file of the rank that owns its expert (n_experts / tp experts each). */
static int owner_rank(const conversion *c, int n_experts, const char *name)
{
    long layer, expert;
    if (!c->m.expert_parallel || n_experts < c->m.tp)
        return -1;
    tp_expert_part part = tp_arch_expert_part(name, &layer, &expert);
    if ((part != TP_EXPERT_GATE && part != TP_EXPERT_UP && part != TP_EXPERT_DOWN) || expert < 0)
        return -1;
    return (int)(expert / (n_experts / c->m.tp));
}

/* An expert-parallel conversion's expert count, from its config.json. */
static int conversion_experts(const conversion *c, int *n_experts, tp_err *err)
{
    *n_experts = 0;
    if (!c->m.expert_parallel)
        return 0;
    tp_model_config cfg;
    const char *js = c->m.config_json ? c->m.config_json : "";
    if (tp_config_parse(&cfg, js, strlen(js), "manifest config", err) < 0)
        return tp_err_prefix(err, "%s", c->dir);
    int lo, hi;
    if (tp_expert_range(cfg.n_experts, c->m.tp, 0, &lo, &hi, err) < 0)
        return tp_err_prefix(err, "%s: manifest says expert_parallel", c->dir);
    *n_experts = cfg.n_experts;
    return 0;
}

/* A rank that is not the owner of an owner-only tensor must not have it. */
static int check_not_held(const conversion *c, int r, const char *name, int owner, tp_err *err)
{
    const rank_view *v = &c->ranks[r];
    bool has = v->is_st ? tp_st_find(&v->st, name) != NULL
                        : tp_shard_find(&v->reader.index, name) != NULL;
    if (has)
        return tp_errorf(err, "%s: rank %d: holds tensor %s, whose expert is rank %d's "
                         "(expert parallel)", c->dir, r, name, owner);
    return 0;
}

/* A checkpoint's BF16 / F16 quantization scale (P.weight_scale_inv,
 * P.weight_scale) is stored as F32 by tpconvert (FORMAT.md 1.5): the source
 * is compared after the same exact widening.  Fills *wide (data malloc'd)
 * and returns 1 when s is such a scale, 0 when it is compared as it is. */
static int widened_scale(const tp_st_tensor *s, tp_st_tensor *wide, tp_err *err)
{
    char weight[1024];
    bool scale = tp_quant_scale_weight(s->name, weight, sizeof weight) != NULL;
    if (!scale || (s->dtype != TP_BF16 && s->dtype != TP_F16))
        return 0;
    size_t count = s->nbytes / tp_dtype_size(s->dtype);
    float *f = malloc(sizeof *f * (count ? count : 1));
    if (!f)
        return tp_errorf(err, "out of memory");
    if (tp_quant_scales_to_f32(s->name, s->dtype, s->data, count, f, err) < 0) {
        free(f);
        return -1;
    }
    *wide = *s;
    wide->dtype = TP_F32;
    wide->data = (const uint8_t *)f;
    wide->nbytes = count * sizeof *f;
    return 1;
}

/* A --quantize conversion (its config quantized, the source's not) is
 * compared with the source quantized exactly as tpconvert does
 * (tp_quantize_fp8_block / tp_quantize_int8_row, whole tensors): each 8-bit
 * weight and its F32 scale, bit for bit. */
struct requant {
    bool on;
    tp_model_config cfg;      /* the conversion's config */
};

/* Under requant, the scale of a source weight the conversion quantized
 * (compared in compare_source_tensor). */
static bool requant_scale(const requant *rq, const tp_st_set *src, const char *name)
{
    const char *suffix = rq->on ? tp_quant_scale_suffix(rq->cfg.quant) : NULL;
    size_t n = strlen(name), k = suffix ? strlen(suffix) : 0;
    char weight[1100];
    if (!suffix || n <= k + 1 || strcmp(name + n - k, suffix) || name[n - k - 1] != '.' ||
        n - k + 7 > sizeof weight)
        return false;
    snprintf(weight, sizeof weight, "%.*sweight", (int)(n - k), name);
    return tp_st_set_find(src, weight) != NULL;
}

static int requant_open(const conversion *c, const char *model_dir, requant *rq, tp_err *err)
{
    tp_err ignored;
    rq->on = false;
    const char *js = c->m.config_json;
    if (!js || tp_config_parse(&rq->cfg, js, strlen(js), "config.json", &ignored) < 0 ||
        rq->cfg.quant == TP_QUANT_NONE)
        return 0;
    char *path = tp_path_join(model_dir, "config.json"), *text = NULL;
    size_t len;
    if (!path)
        return tp_errorf(err, "out of memory");
    static tp_model_config src_cfg;   /* large: off the stack */
    int rc = tp_read_file(path, 16u << 20, &text, &len, err);
    if (rc == 0)
        rc = tp_config_parse(&src_cfg, text, len, path, err);
    rq->on = rc == 0 && src_cfg.quant == TP_QUANT_NONE;
    free(text);
    free(path);
    return rc;
}

/* The dtype of tensor name in the first rank file that holds it. */
static tp_dtype held_dtype(const conversion *c, const char *name)
{
    for (int r = 0; r < c->m.tp; r++) {
        const rank_view *v = &c->ranks[r];
        if (v->is_st) {
            const tp_st_tensor *t = tp_st_find(&v->st, name);
            if (t)
                return t->dtype;
        } else {
            const tp_shard_tensor *t = tp_shard_find(&v->reader.index, name);
            if (t)
                return t->dtype;
        }
    }
    return TP_DTYPE_INVALID;
}

/* The quantized source weight qw and its scale qs (data malloc'd into
 * *qbuf, *sbuf) when the conversion holds s quantized; 1 then, else 0. */
static int requant_tensor(const conversion *c, const requant *rq, const tp_st_tensor *s,
                          tp_st_tensor *qw, tp_st_tensor *qs, char *scale_name, size_t cap,
                          void **qbuf, void **sbuf, tp_err *err)
{
    tp_dtype qdt = tp_quant_dtype(rq->cfg.quant);
    if (!rq->on || s->ndim != 2 || (s->dtype != TP_BF16 && s->dtype != TP_F16 && s->dtype != TP_F32) ||
        held_dtype(c, s->name) != qdt || !tp_quant_scale_name(rq->cfg.quant, s->name, scale_name, cap))
        return 0;
    uint64_t rows = s->shape[0], cols = s->shape[1], sshape[2];
    int snd = tp_quant_scale_shape(rq->cfg.quant, rq->cfg.quant_block, s->shape, sshape);
    size_t n_scales = (size_t)(snd == 2 ? sshape[0] * sshape[1] : sshape[0]);
    size_t n = (size_t)(rows * cols);
    *qbuf = malloc(n ? n : 1);
    *sbuf = malloc(sizeof(float) * (n_scales ? n_scales : 1));
    if (!*qbuf || !*sbuf)
        return tp_errorf(err, "out of memory");
    int rc = rq->cfg.quant == TP_QUANT_FP8_BLOCK
                 ? tp_quantize_fp8_block(s->name, s->dtype, s->data, rows, cols, rq->cfg.quant_block,
                                         *qbuf, *sbuf, err)
                 : tp_quantize_int8_row(s->name, s->dtype, s->data, rows, cols, *qbuf, *sbuf, err);
    if (rc < 0)
        return -1;
    *qw = *s;
    qw->dtype = qdt;
    qw->data = *qbuf;
    qw->nbytes = n;
    memset(qs, 0, sizeof *qs);
    qs->name = scale_name;
    qs->dtype = TP_F32;
    qs->ndim = snd;
    memcpy(qs->shape, sshape, sizeof sshape);
    qs->data = *sbuf;
    qs->nbytes = n_scales * sizeof(float);
    return 1;
}

/* The buffers and counters one comparison shares. */
typedef struct compare_ctx {
    conversion *c;
    grow_buf *buf;
    tp_pool *pool;
    interval *cover;
    tp_verify_report *rep;
    int n_experts;
} compare_ctx;

/* Every rank's slice of s against s; the ranks must cover it. */
static int compare_across_ranks(compare_ctx *x, const tp_st_tensor *s, tp_err *err)
{
    conversion *c = x->c;
    size_t n_cover = 0;
    int split_dim = -2; /* -2: not seen yet */
    int owner = owner_rank(c, x->n_experts, s->name);
    for (int r = 0; r < c->m.tp; r++) {
        local_tensor lt;
        if (owner >= 0 && r != owner) {
            if (check_not_held(c, r, s->name, owner, err) < 0)
                return -1;
            continue;
        }
        if (get_local(c, &c->ranks[r], s->name, x->buf, x->pool, &lt, x->rep, err) < 0)
            return -1;
        if (split_dim == -2)
            split_dim = lt.split.dim;
        if (split_dim != lt.split.dim)
            return tp_errorf(err, "%s: tensor %s: rank %d splits dim %d, rank 0 dim %d", c->dir,
                             s->name, r, lt.split.dim, split_dim);
        if (compare_local(c, r, s, &lt, x->cover, &n_cover, err) < 0)
            return -1;
        x->rep->tensors++;
    }
    if (split_dim >= 0 && check_coverage(c, s, split_dim, x->cover, n_cover, err) < 0)
        return -1;
    x->rep->compared_tensors++;
    return 0;
}

/* One source tensor: as it is, its scale widened (widened_scale), or
 * quantized with its scale (requant_tensor). */
static int compare_source_tensor(compare_ctx *x, const requant *rq, const tp_st_tensor *s,
                                 const char *model_dir, tp_err *err)
{
    tp_st_tensor alt, scale;
    void *a = NULL, *b = NULL;
    char scale_name[1100];
    int rc = widened_scale(s, &alt, err);
    if (rc > 0)
        a = (void *)alt.data;
    else if (rc == 0)
        rc = requant_tensor(x->c, rq, s, &alt, &scale, scale_name, sizeof scale_name, &a, &b, err);
    if (rc < 0)
        tp_err_prefix(err, "%s", model_dir);
    else if (rc == 0)
        rc = compare_across_ranks(x, s, err);
    else
        rc = compare_across_ranks(x, &alt, err);
    if (rc >= 0 && b)
        rc = compare_across_ranks(x, &scale, err);
    free(a);
    free(b);
    return rc < 0 ? -1 : 0;
}

int tp_verify_against(const char *dir, const char *model_dir, int threads, bool quiet,
                      tp_verify_report *rep, tp_err *err)
{
    tp_verify_report local = {0};
    conversion c;
    tp_st_set src;
    bool src_open = false;
    grow_buf buf = {0};
    tp_pool *pool = NULL;
    tp_progress *progress = NULL;
    interval *cover = NULL;
    static requant rq;   /* large: off the stack */
    int rc = -1;
    if (conversion_open(&c, dir, err) < 0)
        goto out;
    int n_experts;
    if (conversion_experts(&c, &n_experts, err) < 0)
        goto out;
    if (tp_st_set_open(&src, model_dir, err) < 0)
        goto out;
    src_open = true;
    local.ranks = (size_t)c.m.tp;
    if (requant_open(&c, model_dir, &rq, err) < 0 || check_no_extra(&c, &src, &rq, model_dir, err) < 0)
        goto out;
    pool = tp_pool_create(threads);
    cover = malloc(sizeof *cover * (size_t)c.m.tp * TP_MAX_RANGES);
    if (!pool || !cover) {
        tp_errorf(err, "%s: out of memory", dir);
        goto out;
    }
    uint64_t total = 0;
    for (size_t i = 0; i < src.n_tensors; i++)
        total += src.tensors[i]->nbytes;
    progress = tp_progress_start("comparing", total, quiet);
    compare_ctx x = {&c, &buf, pool, cover, &local, n_experts};
    for (size_t i = 0; i < src.n_tensors; i++) {
        if (compare_source_tensor(&x, &rq, src.tensors[i], model_dir, err) < 0)
            goto out;
        tp_progress_add(progress, src.tensors[i]->nbytes);
    }
    rc = 0;
out:
    tp_progress_finish(progress);
    if (pool)
        tp_pool_destroy(pool);
    free(cover);
    free(buf.data);
    if (src_open)
        tp_st_set_close(&src);
    conversion_close(&c);
    if (rep)
        *rep = local;
    return rc;
}
