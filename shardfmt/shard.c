/* shard.c - the tpshard rank file: writer, defensive reader, chunk decoding.
 * FORMAT.md beside this file is the specification; this file implements
 * exactly what it says.
 *
 *   [0, 4096)             header (magic, version, index position, checksums)
 *   [4096, index_offset)  tensor data, each tensor on a 4096-byte boundary
 *   [index_offset, end)   the index: UTF-8 JSON describing every tensor
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tp_xxhash.h"

#include "json_internal.h"
#include "shard_internal.h"
#include "shardfmt.h"

static const uint8_t shard_magic[8] = { 'T', 'P', 'S', 'H', 'A', 'R', 'D', 0 };

#define MAX_NAME_LEN 1024
#define MAX_STYLE_LEN 64

/* ------------------------------------------------------------ little endian */

static void put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_u32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t get_u64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t align_up(uint64_t v)
{
    return (v + TP_ALIGN - 1) / TP_ALIGN * TP_ALIGN;
}

/* ------------------------------------------------------------ index (shared) */

void tp_shard_index_free(tp_shard_index *ix)
{
    if (!ix)
        return;
    for (size_t i = 0; i < ix->n_tensors; i++) {
        free(ix->tensors[i].name);
        free(ix->tensors[i].style);
        free(ix->tensors[i].chunks);
    }
    free(ix->tensors);
    memset(ix, 0, sizeof *ix);
}

const tp_shard_tensor *tp_shard_find(const tp_shard_index *ix, const char *name)
{
    for (size_t i = 0; i < ix->n_tensors; i++)
        if (strcmp(ix->tensors[i].name, name) == 0)
            return &ix->tensors[i];
    return NULL;
}

/* Local shape, global shape and split must describe the same cut (used by
 * the writer on its input and by the reader on the index). */
static int check_geometry(const char *where, int ndim, const uint64_t *shape,
                          const uint64_t *global, const tp_split *s, tp_err *err)
{
    if (ndim < 0 || ndim > TP_MAX_DIMS)
        return tp_errorf(err, "%s: %d dimensions (at most %d)", where, ndim, TP_MAX_DIMS);
    if (s->dim == -1) {
        if (s->n_ranges != 0)
            return tp_errorf(err, "%s: replicated tensor with split ranges", where);
        for (int d = 0; d < ndim; d++)
            if (shape[d] != global[d])
                return tp_errorf(err, "%s: replicated, but local dim %d is %llu and global %llu", where, d,
                                 (unsigned long long)shape[d], (unsigned long long)global[d]);
        return 0;
    }
    if (s->dim < 0 || s->dim >= ndim)
        return tp_errorf(err, "%s: split dim %d outside a %d-dimensional tensor", where, s->dim, ndim);
    if (s->n_ranges < 1 || s->n_ranges > TP_MAX_RANGES)
        return tp_errorf(err, "%s: %d split ranges (1 to %d allowed)", where, s->n_ranges, TP_MAX_RANGES);
    for (int d = 0; d < ndim; d++)
        if (d != s->dim && shape[d] != global[d])
            return tp_errorf(err, "%s: dim %d is not split, but local is %llu and global %llu", where, d,
                             (unsigned long long)shape[d], (unsigned long long)global[d]);
    uint64_t total = 0;
    for (int k = 0; k < s->n_ranges; k++) {
        if (s->start[k] > s->end[k] || s->end[k] > global[s->dim])
            return tp_errorf(err, "%s: split range [%llu, %llu) outside global dim %d of size %llu", where,
                             (unsigned long long)s->start[k], (unsigned long long)s->end[k], s->dim,
                             (unsigned long long)global[s->dim]);
        for (int j = 0; j < k; j++)
            if (s->start[k] < s->end[j] && s->start[j] < s->end[k])
                return tp_errorf(err, "%s: split ranges %d and %d overlap", where, j, k);
        total += s->end[k] - s->start[k]; /* no overflow: each <= global, ranges disjoint */
    }
    if (total != shape[s->dim])
        return tp_errorf(err, "%s: split ranges cover %llu along dim %d but the local size is %llu", where,
                         (unsigned long long)total, s->dim, (unsigned long long)shape[s->dim]);
    return 0;
}

/* What the reader accepts for a name or a style: bounded, printable. */
static bool text_ok(const char *s, size_t max_len, bool allow_empty)
{
    size_t n = s ? strlen(s) : 0;
    if ((n == 0 && !allow_empty) || n > max_len)
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
            return false;
    return true;
}

/* JSON holds integers exactly only below 2^53. */
static bool dims_exact(const uint64_t *dims, int ndim)
{
    for (int d = 0; d < ndim; d++)
        if (dims[d] >= (1ull << 53))
            return false;
    return true;
}

/* ================================================================== writer */

/* One chunk in flight: filled (and encoded) on a pool thread, consumed in
 * order by the thread that called tp_shard_writer_add. */
typedef struct chunk_slot {
    struct tp_shard_writer *w;
    struct add_ctx *ctx;
    uint64_t raw_off;
    size_t raw_len;
    uint64_t file_off;      /* codec none: where the job writes */
    uint8_t *raw;           /* chunk_size bytes */
    uint8_t *enc;           /* the codec's bound of chunk_size, allocated on first use */
    size_t enc_cap;
    size_t stored_len;
    uint64_t hash;          /* of the stored bytes */
    int rc;
    bool done;
    tp_err err;
} chunk_slot;

/* What the jobs of the tensor being added share. */
typedef struct add_ctx {
    const char *name;
    tp_shard_fill_fn fill;
    void *arg;
    tp_dtype dtype;
    tp_codec codec;
    int level;
} add_ctx;

struct tp_shard_writer {
    int fd;
    char *path, *tmp_path;
    char conversion_id[33];
    int rank, tp;
    tp_codec codec;
    int level;
    size_t chunk_size;
    tp_pool *pool;
    tp_progress *progress;
    uint64_t end;           /* end of the data written so far */
    tp_shard_index ix;      /* tensors written so far */
    size_t cap;
    uint64_t raw_total, stored_total;
    bool failed;
    size_t n_slots;
    chunk_slot *slots;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

void tp_shard_writer_set_codec(tp_shard_writer *w, tp_codec codec, int level)
{
    w->codec = codec;
    w->level = level;
}

int tp_shard_writer_open(tp_shard_writer **out, const char *path, const char *conversion_id,
                         int rank, int tp, const tp_shard_writer_opts *opts, tp_err *err)
{
    *out = NULL;
    static const tp_shard_writer_opts defaults = { .codec = TP_CODEC_NONE };
    if (!opts)
        opts = &defaults;
    if (!tp_is_conversion_id(conversion_id))
        return tp_errorf(err, "%s: conversion id must be 32 lowercase hex digits", path);
    if (tp < 1 || tp > TP_MAX_TP || rank < 0 || rank >= tp)
        return tp_errorf(err, "%s: rank %d of tp %d is out of range", path, rank, tp);
    const tp_codec_info *ci = tp_codec_get(opts->codec);
    if (!ci)
        return tp_errorf(err, "%s: unknown codec %d", path, (int)opts->codec);
    if (!tp_codec_level_ok(opts->codec, opts->level))
        return tp_errorf(err, "%s: %s level %d outside [%d, %d]", path, ci->name, opts->level, ci->min_level,
                         ci->max_level);
    size_t chunk = opts->chunk_size ? opts->chunk_size : TP_DEFAULT_CHUNK;
    /* A multiple of every element size (1, 2, 4) so that chunks never split
     * an element, whatever the dtype. */
    if (chunk % 4 != 0 || chunk > TP_SHARD_MAX_CHUNK)
        return tp_errorf(err, "%s: chunk size %zu must be a multiple of 4 and at most %u", path, chunk,
                         TP_SHARD_MAX_CHUNK);

    tp_shard_writer *w = calloc(1, sizeof *w);
    if (!w)
        return tp_errorf(err, "%s: out of memory", path);
    w->fd = -1;
    w->path = strdup(path);
    w->tmp_path = malloc(strlen(path) + 5);
    int threads = opts->pool ? tp_pool_threads(opts->pool) : 1;
    w->n_slots = 2 * (size_t)(threads > 0 ? threads : 1);
    w->slots = calloc(w->n_slots, sizeof *w->slots);
    if (!w->path || !w->tmp_path || !w->slots) {
        free(w->path), free(w->tmp_path), free(w->slots), free(w);
        return tp_errorf(err, "%s: out of memory", path);
    }
    sprintf(w->tmp_path, "%s.tmp", path);
    memcpy(w->conversion_id, conversion_id, 33);
    w->rank = rank;
    w->tp = tp;
    w->codec = opts->codec;
    w->level = opts->level;
    w->chunk_size = chunk;
    w->pool = opts->pool;
    w->progress = opts->progress;
    w->end = TP_SHARD_HEADER_SIZE;
    w->ix.rank = rank;
    w->ix.tp = tp;
    memcpy(w->ix.conversion_id, conversion_id, 33);
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    w->fd = open(w->tmp_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (w->fd < 0) {
        tp_errorf(err, "%s: cannot create: %s", w->tmp_path, strerror(errno));
        tp_shard_writer_abort(w);
        return -1;
    }
    *out = w;
    return 0;
}

static void writer_free(tp_shard_writer *w)
{
    if (w->fd >= 0)
        close(w->fd);
    for (size_t i = 0; i < w->n_slots; i++) {
        free(w->slots[i].raw);
        free(w->slots[i].enc);
    }
    free(w->slots);
    tp_shard_index_free(&w->ix);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    free(w->path);
    free(w->tmp_path);
    free(w);
}

void tp_shard_writer_abort(tp_shard_writer *w)
{
    if (!w)
        return;
    unlink(w->tmp_path);
    writer_free(w);
}

/* The pool job: fill one chunk, then either write it in place (codec none,
 * whose offset is known) or encode it for the in-order consumer. */
static void chunk_job(void *p)
{
    chunk_slot *s = p;
    add_ctx *c = s->ctx;
    int rc = c->fill(c->arg, s->raw_off, s->raw, s->raw_len, &s->err);
    if (rc == 0 && c->codec == TP_CODEC_NONE) {
        s->stored_len = s->raw_len;
        s->hash = tp_xxh3(s->raw, s->raw_len);
        rc = tp_pwrite_all(s->w->fd, s->raw, s->raw_len, s->file_off, s->w->tmp_path, &s->err);
    } else if (rc == 0) {
        rc = tp_codec_encode(c->codec, c->level, c->dtype, s->raw, s->raw_len, s->enc, s->enc_cap,
                             &s->stored_len, &s->err);
        if (rc == 0)
            s->hash = tp_xxh3(s->enc, s->stored_len);
        else
            tp_err_prefix(&s->err, "%s: tensor %s", s->w->tmp_path, c->name);
    }
    pthread_mutex_lock(&s->w->mu);
    s->rc = rc;
    s->done = true;
    pthread_cond_broadcast(&s->w->cv);
    pthread_mutex_unlock(&s->w->mu);
}

/* Every codec but none encodes into s->enc, which must hold the codec's
 * bound of a chunk; the codec may change between tensors (it is recorded
 * per tensor), so the buffer grows when a codec with a larger bound comes. */
static int slot_buffers(tp_shard_writer *w, chunk_slot *s, tp_codec codec, tp_err *err)
{
    if (!s->raw && !(s->raw = malloc(w->chunk_size)))
        return tp_errorf(err, "%s: out of memory for a %zu-byte chunk", w->tmp_path, w->chunk_size);
    size_t need = tp_codec_bound(codec, w->chunk_size);
    if (codec != TP_CODEC_NONE && s->enc_cap < need) {
        uint8_t *enc = realloc(s->enc, need);
        if (!enc)
            return tp_errorf(err, "%s: out of memory for a %zu-byte chunk", w->tmp_path, need);
        s->enc = enc;
        s->enc_cap = need;
    }
    return 0;
}

static void wait_slot(tp_shard_writer *w, chunk_slot *s)
{
    pthread_mutex_lock(&w->mu);
    while (!s->done)
        pthread_cond_wait(&w->cv, &w->mu);
    pthread_mutex_unlock(&w->mu);
}

static int check_desc(const tp_shard_writer *w, const tp_shard_tensor_desc *d, tp_err *err)
{
    if (!text_ok(d->name, MAX_NAME_LEN, false))
        return tp_errorf(err, "%s: tensor name \"%s\" is empty, too long or has control characters",
                         w->path, d->name ? d->name : "");
    if (tp_shard_find(&w->ix, d->name))
        return tp_errorf(err, "%s: tensor %s added twice", w->path, d->name);
    if (tp_dtype_size(d->dtype) == 0)
        return tp_errorf(err, "%s: tensor %s: unsupported dtype", w->path, d->name);
    if (d->style && !text_ok(d->style, MAX_STYLE_LEN, true))
        return tp_errorf(err, "%s: tensor %s: style is longer than %d bytes or has control characters", w->path,
                       d->name, MAX_STYLE_LEN);
    if (d->ndim < 0 || d->ndim > TP_MAX_DIMS || !dims_exact(d->shape, d->ndim) ||
        !dims_exact(d->global_shape, d->ndim))
        return tp_errorf(err, "%s: tensor %s: bad number of dimensions or a dimension of 2^53 or more", w->path,
                       d->name);
    char where[MAX_NAME_LEN + 1200];
    snprintf(where, sizeof where, "%s: tensor %s", w->path, d->name);
    tp_split split = d->split;
    if (split.dim == -1)
        split.n_ranges = 0; /* ranges mean nothing for a replicated tensor */
    return check_geometry(where, d->ndim, d->shape, d->global_shape, &split, err);
}

/* Streams the tensor's chunks through a window of n_slots jobs: jobs fill
 * and encode out of order, this thread hashes the raw bytes and places the
 * stored bytes in chunk order, and a slot is refilled only once consumed, so
 * memory stays at n_slots chunks whatever the tensor size.  Fills t's chunk
 * list, stored_size and xxh3.  On failure waits for every job still
 * running before returning (the slots are reused). */
static int write_chunks(tp_shard_writer *w, add_ctx *c, tp_shard_tensor *t, tp_err *err)
{
    XXH3_state_t *raw_hash = XXH3_createState();
    if (!raw_hash)
        return tp_errorf(err, "%s: out of memory", w->tmp_path);
    XXH3_64bits_reset(raw_hash);
    uint64_t pos = t->offset;
    size_t next_submit = 0, next_done = 0;
    int rc = 0;
    while (next_done < t->n_chunks) {
        while (rc == 0 && next_submit < t->n_chunks && next_submit - next_done < w->n_slots) {
            chunk_slot *s = &w->slots[next_submit % w->n_slots];
            if (slot_buffers(w, s, c->codec, err) < 0) {
                rc = -1;
                break;
            }
            s->w = w;
            s->ctx = c;
            s->raw_off = (uint64_t)next_submit * w->chunk_size;
            s->raw_len = t->chunks[next_submit].raw_size;
            s->file_off = t->offset + s->raw_off; /* used by codec none only */
            s->done = false;
            s->rc = 0;
            if (w->pool)
                tp_pool_submit(w->pool, chunk_job, s);
            else
                chunk_job(s);
            next_submit++;
        }
        if (next_done == next_submit)
            break; /* failed before submitting anything more */
        chunk_slot *s = &w->slots[next_done % w->n_slots];
        wait_slot(w, s);
        next_done++;
        if (rc != 0)
            continue; /* draining after a failure */
        if (s->rc != 0) {
            *err = s->err;
            rc = -1;
            continue;
        }
        XXH3_64bits_update(raw_hash, s->raw, s->raw_len);
        tp_chunk_info *ci = &t->chunks[next_done - 1];
        ci->offset = pos;
        ci->stored_size = s->stored_len;
        ci->xxh3 = s->hash;
        if (c->codec != TP_CODEC_NONE &&
            tp_pwrite_all(w->fd, s->enc, s->stored_len, pos, w->tmp_path, err) < 0) {
            rc = -1;
            continue;
        }
        pos += s->stored_len;
        if (w->progress)
            tp_progress_add(w->progress, s->raw_len);
    }
    t->xxh3 = XXH3_64bits_digest(raw_hash);
    XXH3_freeState(raw_hash);
    t->stored_size = pos - t->offset;
    return rc;
}

int tp_shard_writer_add(tp_shard_writer *w, const tp_shard_tensor_desc *desc,
                        tp_shard_fill_fn fill, void *arg, tp_err *err)
{
    if (w->failed)
        return tp_errorf(err, "%s: writer failed earlier", w->path);
    if (check_desc(w, desc, err) < 0)
        return -1;
    size_t raw_size;
    if (!tp_tensor_nbytes(desc->dtype, desc->shape, desc->ndim, &raw_size) || raw_size >= (1ull << 53))
        return tp_errorf(err, "%s: tensor %s: size overflows", w->path, desc->name);
    if (w->ix.n_tensors == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 64;
        tp_shard_tensor *grown = realloc(w->ix.tensors, cap * sizeof *grown);
        if (!grown)
            return tp_errorf(err, "%s: out of memory", w->path);
        w->ix.tensors = grown;
        w->cap = cap;
    }
    tp_shard_tensor *t = &w->ix.tensors[w->ix.n_tensors];
    memset(t, 0, sizeof *t);
    t->name = strdup(desc->name);
    t->style = strdup(desc->style ? desc->style : "");
    t->n_chunks = (raw_size + w->chunk_size - 1) / w->chunk_size;
    t->chunks = calloc(t->n_chunks ? t->n_chunks : 1, sizeof *t->chunks);
    if (!t->name || !t->style || !t->chunks) {
        free(t->name), free(t->style), free(t->chunks);
        return tp_errorf(err, "%s: out of memory", w->path);
    }
    t->dtype = desc->dtype;
    t->ndim = desc->ndim;
    memcpy(t->shape, desc->shape, sizeof t->shape);
    memcpy(t->global_shape, desc->global_shape, sizeof t->global_shape);
    t->split = desc->split;
    if (t->split.dim == -1)
        t->split.n_ranges = 0;
    t->reduce_bias = desc->reduce_bias;
    t->codec = w->codec;
    t->offset = align_up(w->end);
    t->raw_size = raw_size;
    for (size_t i = 0; i < t->n_chunks; i++) {
        uint64_t off = (uint64_t)i * w->chunk_size;
        t->chunks[i].raw_size = raw_size - off < w->chunk_size ? raw_size - off : w->chunk_size;
    }
    w->ix.n_tensors++; /* owned by the index from here on, freed with it */

    add_ctx c = { .name = t->name, .fill = fill, .arg = arg, .dtype = t->dtype,
                  .codec = t->codec, .level = w->level };
    if (write_chunks(w, &c, t, err) < 0) {
        w->failed = true;
        return -1;
    }
    w->end = t->offset + t->stored_size;
    w->raw_total += t->raw_size;
    w->stored_total += t->stored_size;
    return 0;
}

/* ------------------------------------------------------------ index JSON */

static cJSON *u64_array(const uint64_t *v, int n)
{
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; a && i < n; i++)
        cJSON_AddItemToArray(a, tp_json_u64_item(v[i]));
    return a;
}

static cJSON *tensor_json(const tp_shard_tensor *t, size_t chunk_size)
{
    char hex[17];
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "name", t->name);
    cJSON_AddStringToObject(o, "dtype", tp_dtype_name(t->dtype));
    cJSON_AddItemToObject(o, "shape", u64_array(t->shape, t->ndim));
    cJSON_AddItemToObject(o, "global_shape", u64_array(t->global_shape, t->ndim));
    if (t->split.dim < 0) {
        cJSON_AddNullToObject(o, "split");
    } else {
        cJSON *split = cJSON_AddObjectToObject(o, "split");
        cJSON_AddNumberToObject(split, "dim", t->split.dim);
        cJSON *ranges = cJSON_AddArrayToObject(split, "ranges");
        for (int k = 0; k < t->split.n_ranges; k++) {
            uint64_t r[2] = { t->split.start[k], t->split.end[k] };
            cJSON_AddItemToArray(ranges, u64_array(r, 2));
        }
    }
    cJSON_AddStringToObject(o, "style", t->style);
    cJSON_AddBoolToObject(o, "reduce_bias", t->reduce_bias);
    cJSON_AddStringToObject(o, "codec", tp_codec_name(t->codec));
    tp_json_add_u64(o, "offset", t->offset);
    tp_json_add_u64(o, "stored_size", t->stored_size);
    tp_json_add_u64(o, "raw_size", t->raw_size);
    tp_hex64(t->xxh3, hex);
    cJSON_AddStringToObject(o, "xxh3", hex);
    tp_json_add_u64(o, "chunk_size", chunk_size);
    cJSON *chunks = cJSON_AddArrayToObject(o, "chunks");
    for (size_t i = 0; i < t->n_chunks; i++) {
        cJSON *c = cJSON_CreateArray();
        cJSON_AddItemToArray(c, tp_json_u64_item(t->chunks[i].stored_size));
        tp_hex64(t->chunks[i].xxh3, hex);
        cJSON_AddItemToArray(c, cJSON_CreateString(hex));
        cJSON_AddItemToArray(chunks, c);
    }
    return o;
}

/* The index text, or NULL when out of memory. */
static char *index_text(const tp_shard_writer *w)
{
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "format", "tpshard");
    cJSON_AddNumberToObject(root, "format_version", TP_FORMAT_VERSION);
    cJSON_AddStringToObject(root, "conversion_id", w->conversion_id);
    cJSON_AddNumberToObject(root, "rank", w->rank);
    cJSON_AddNumberToObject(root, "tp", w->tp);
    cJSON *tensors = cJSON_AddArrayToObject(root, "tensors");
    for (size_t i = 0; i < w->ix.n_tensors; i++)
        cJSON_AddItemToArray(tensors, tensor_json(&w->ix.tensors[i], w->chunk_size));
    char *text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return text;
}

static void header_bytes(uint8_t hdr[TP_SHARD_HEADER_SIZE], uint64_t index_offset, uint64_t index_length,
                         uint64_t file_size, uint64_t index_xxh3)
{
    memset(hdr, 0, TP_SHARD_HEADER_SIZE);
    memcpy(hdr, shard_magic, 8);
    put_u32(hdr + 8, TP_FORMAT_VERSION);
    put_u32(hdr + 12, 0);
    put_u64(hdr + 16, index_offset);
    put_u64(hdr + 24, index_length);
    put_u64(hdr + 32, file_size);
    put_u64(hdr + 40, index_xxh3);
    put_u64(hdr + 48, tp_xxh3(hdr, TP_SHARD_HEADER_HASHED));
}

int tp_shard_writer_finish(tp_shard_writer *w, uint64_t *index_xxh3, uint64_t *file_size,
                           uint64_t *raw_bytes, uint64_t *stored_bytes, tp_err *err)
{
    if (w->failed) {
        tp_errorf(err, "%s: writer failed earlier", w->path);
        tp_shard_writer_abort(w);
        return -1;
    }
    char *text = index_text(w);
    if (!text) {
        tp_errorf(err, "%s: out of memory for the index", w->path);
        tp_shard_writer_abort(w);
        return -1;
    }
    size_t len = strlen(text);
    uint64_t index_offset = w->end;
    uint64_t size = index_offset + len;
    uint64_t ixh = tp_xxh3(text, len);
    uint8_t hdr[TP_SHARD_HEADER_SIZE];
    header_bytes(hdr, index_offset, len, size, ixh);
    /* Index first, header last: a file whose header is written is complete. */
    int rc = tp_pwrite_all(w->fd, text, len, index_offset, w->tmp_path, err);
    free(text);
    if (rc == 0 && ftruncate(w->fd, (off_t)size) != 0)
        rc = tp_errorf(err, "%s: cannot set size: %s", w->tmp_path, strerror(errno));
    if (rc == 0)
        rc = tp_pwrite_all(w->fd, hdr, sizeof hdr, 0, w->tmp_path, err);
    if (rc == 0) {
        /* The commit closes the descriptor and removes what it fails on. */
        rc = tp_file_commit(w->fd, w->tmp_path, w->path, err);
        w->fd = -1;
    }
    if (rc < 0) {
        tp_shard_writer_abort(w);
        return -1;
    }
    if (index_xxh3)
        *index_xxh3 = ixh;
    if (file_size)
        *file_size = size;
    if (raw_bytes)
        *raw_bytes = w->raw_total;
    if (stored_bytes)
        *stored_bytes = w->stored_total;
    writer_free(w);
    return 0;
}

/* ================================================================== reader */

typedef struct parse_ctx {
    const char *name;        /* file name for messages */
    uint64_t data_end;       /* index_offset: tensor data must end before it */
} parse_ctx;

static int parse_header(const uint8_t *buf, size_t len, const char *name, uint64_t *index_offset,
                        uint64_t *index_length, uint64_t *index_xxh3, tp_err *err)
{
    if (len < TP_SHARD_HEADER_SIZE)
        return tp_errorf(err, "%s: %zu bytes, shorter than the %u-byte tpshard header (truncated?)", name, len,
                         TP_SHARD_HEADER_SIZE);
    if (memcmp(buf, shard_magic, 8) != 0)
        return tp_errorf(err, "%s: not a tpshard file (bad magic)", name);
    uint32_t version = get_u32(buf + 8);
    if (version > TP_FORMAT_VERSION)
        return tp_errorf(err, "%s: format version %u is newer than this build supports (%d)", name, version,
                         TP_FORMAT_VERSION);
    if (tp_xxh3(buf, TP_SHARD_HEADER_HASHED) != get_u64(buf + 48))
        return tp_errorf(err, "%s: header checksum mismatch (header corrupted)", name);
    if (version != TP_FORMAT_VERSION)
        return tp_errorf(err, "%s: unsupported format version %u", name, version);
    if (get_u32(buf + 12) != 0)
        return tp_errorf(err, "%s: unknown header flags 0x%x", name, get_u32(buf + 12));
    for (size_t i = 56; i < TP_SHARD_HEADER_SIZE; i++)
        if (buf[i] != 0)
            return tp_errorf(err, "%s: reserved header byte %zu is not zero (header corrupted)", name, i);
    uint64_t off = get_u64(buf + 16), ilen = get_u64(buf + 24), size = get_u64(buf + 32);
    if (size != len)
        return tp_errorf(err, "%s: file is %zu bytes but its header says %llu (truncated or appended to)", name,
                         len, (unsigned long long)size);
    if (off < TP_SHARD_HEADER_SIZE || off > size || ilen != size - off || ilen == 0)
        return tp_errorf(err, "%s: index at [%llu, +%llu) does not end the %llu-byte file", name,
                         (unsigned long long)off, (unsigned long long)ilen, (unsigned long long)size);
    *index_offset = off;
    *index_length = ilen;
    *index_xxh3 = get_u64(buf + 40);
    return 0;
}

static int parse_u64_array(const cJSON *a, const char *key, const char *where, uint64_t *out,
                           int max, int *n_out, tp_err *err)
{
    if (!cJSON_IsArray(a))
        return tp_errorf(err, "%s: \"%s\" must be an array", where, key);
    int n = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, a) {
        if (n == max)
            return tp_errorf(err, "%s: \"%s\" has more than %d entries", where, key, max);
        if (tp_json_u64_value(v, UINT64_MAX, key, where, &out[n], err) < 0)
            return -1;
        n++;
    }
    *n_out = n;
    return 0;
}

static int parse_split(const cJSON *v, int ndim, const char *where, tp_split *s, tp_err *err)
{
    memset(s, 0, sizeof *s);
    s->dim = -1;
    if (cJSON_IsNull(v))
        return 0;
    if (!cJSON_IsObject(v))
        return tp_errorf(err, "%s: \"split\" must be null or an object", where);
    static const char *const keys[] = { "dim", "ranges", NULL };
    if (tp_json_check_keys(v, keys, where, err) < 0)
        return -1;
    if (tp_json_int(v, "dim", 0, ndim > 0 ? ndim - 1 : 0, where, &s->dim, err) < 0)
        return -1;
    if (ndim == 0)
        return tp_errorf(err, "%s: a 0-dimensional tensor cannot be split", where);
    const cJSON *ranges = tp_json_need(v, "ranges", where, err);
    if (!ranges)
        return -1;
    if (!cJSON_IsArray(ranges))
        return tp_errorf(err, "%s: split \"ranges\" must be an array", where);
    const cJSON *r;
    cJSON_ArrayForEach(r, ranges) {
        if (s->n_ranges == TP_MAX_RANGES)
            return tp_errorf(err, "%s: more than %d split ranges", where, TP_MAX_RANGES);
        uint64_t se[2];
        int n;
        if (parse_u64_array(r, "ranges", where, se, 2, &n, err) < 0)
            return -1;
        if (n != 2)
            return tp_errorf(err, "%s: a split range must be [start, end]", where);
        s->start[s->n_ranges] = se[0];
        s->end[s->n_ranges] = se[1];
        s->n_ranges++;
    }
    return 0;
}

static int parse_hex_field(const cJSON *v, const char *key, const char *where, uint64_t *out, tp_err *err)
{
    if (!cJSON_IsString(v) || !v->valuestring || strlen(v->valuestring) != 16 ||
        tp_parse_hex64(v->valuestring, out) < 0)
        return tp_errorf(err, "%s: \"%s\" must be 16 hex digits", where, key);
    return 0;
}

/* Chunk list: sizes consistent with the codec and summing to stored_size. */
static int parse_chunks(const cJSON *a, tp_shard_tensor *t, uint64_t chunk_size, const char *where, tp_err *err)
{
    if (!cJSON_IsArray(a))
        return tp_errorf(err, "%s: \"chunks\" must be an array", where);
    uint64_t expect = t->raw_size / chunk_size + (t->raw_size % chunk_size != 0);
    size_t n = (size_t)cJSON_GetArraySize(a);
    if (n != expect)
        return tp_errorf(err, "%s: %zu chunks, but %llu raw bytes in chunks of %llu make %llu", where, n,
                         (unsigned long long)t->raw_size, (unsigned long long)chunk_size,
                         (unsigned long long)expect);
    t->chunks = calloc(n ? n : 1, sizeof *t->chunks);
    if (!t->chunks)
        return tp_errorf(err, "%s: out of memory", where);
    t->n_chunks = n;
    uint64_t pos = t->offset, raw_left = t->raw_size;
    size_t i = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, a) {
        tp_chunk_info *ci = &t->chunks[i];
        if (!cJSON_IsArray(c) || cJSON_GetArraySize(c) != 2)
            return tp_errorf(err, "%s: chunk %zu must be [stored_size, \"xxh3\"]", where, i);
        ci->raw_size = raw_left < chunk_size ? raw_left : chunk_size;
        raw_left -= ci->raw_size;
        if (tp_json_u64_value(c->child, UINT64_MAX, "chunks", where, &ci->stored_size, err) < 0 ||
            parse_hex_field(c->child->next, "chunks", where, &ci->xxh3, err) < 0)
            return -1;
        if (ci->stored_size == 0 || ci->stored_size > tp_codec_bound(t->codec, ci->raw_size) ||
            (t->codec == TP_CODEC_NONE && ci->stored_size != ci->raw_size))
            return tp_errorf(err, "%s: chunk %zu stores %llu bytes for %llu raw bytes (codec %s)", where, i,
                             (unsigned long long)ci->stored_size, (unsigned long long)ci->raw_size,
                             tp_codec_name(t->codec));
        ci->offset = pos;
        pos += ci->stored_size; /* bounded by the compress bound of a chunk: no overflow */
        if (pos - t->offset > t->stored_size)
            return tp_errorf(err, "%s: chunks store more than stored_size %llu", where,
                             (unsigned long long)t->stored_size);
        i++;
    }
    if (pos - t->offset != t->stored_size)
        return tp_errorf(err, "%s: chunks store %llu bytes but stored_size is %llu", where,
                         (unsigned long long)(pos - t->offset), (unsigned long long)t->stored_size);
    return 0;
}

static int parse_tensor(const cJSON *o, size_t i, const parse_ctx *pc, tp_shard_tensor *t, tp_err *err)
{
    char where[MAX_NAME_LEN + 1200];
    snprintf(where, sizeof where, "%s: index tensor %zu", pc->name, i);
    if (!cJSON_IsObject(o))
        return tp_errorf(err, "%s: must be an object", where);
    static const char *const keys[] = { "name", "dtype", "shape", "global_shape", "split", "style",
                                        "reduce_bias", "codec", "offset", "stored_size", "raw_size", "xxh3",
                                        "chunk_size", "chunks", NULL };
    const char *name, *dtype, *style, *codec;
    if (tp_json_check_keys(o, keys, where, err) < 0 ||
        tp_json_str(o, "name", MAX_NAME_LEN, false, where, &name, err) < 0)
        return -1;
    if (!(t->name = strdup(name)))
        return tp_errorf(err, "%s: out of memory", where);
    snprintf(where, sizeof where, "%s: tensor %s", pc->name, name);

    if (tp_json_str(o, "dtype", 16, false, where, &dtype, err) < 0)
        return -1;
    if ((t->dtype = tp_dtype_from_name(dtype)) == TP_DTYPE_INVALID)
        return tp_errorf(err, "%s: unsupported dtype \"%s\"", where, dtype);
    const cJSON *shape = tp_json_need(o, "shape", where, err), *gshape = tp_json_need(o, "global_shape", where, err);
    int gdim;
    if (!shape || !gshape || parse_u64_array(shape, "shape", where, t->shape, TP_MAX_DIMS, &t->ndim, err) < 0 ||
        parse_u64_array(gshape, "global_shape", where, t->global_shape, TP_MAX_DIMS, &gdim, err) < 0)
        return -1;
    if (gdim != t->ndim)
        return tp_errorf(err, "%s: shape has %d dims but global_shape %d", where, t->ndim, gdim);
    const cJSON *split = tp_json_need(o, "split", where, err);
    if (!split || parse_split(split, t->ndim, where, &t->split, err) < 0 ||
        check_geometry(where, t->ndim, t->shape, t->global_shape, &t->split, err) < 0)
        return -1;
    if (tp_json_str(o, "style", MAX_STYLE_LEN, true, where, &style, err) < 0 ||
        tp_json_bool(o, "reduce_bias", where, &t->reduce_bias, err) < 0 ||
        tp_json_str(o, "codec", 16, false, where, &codec, err) < 0)
        return -1;
    if (!(t->style = strdup(style)))
        return tp_errorf(err, "%s: out of memory", where);
    if (tp_codec_from_name(codec, &t->codec) < 0)
        return tp_errorf(err, "%s: unknown codec \"%s\"", where, codec);

    uint64_t chunk_size;
    const cJSON *xxh3 = tp_json_need(o, "xxh3", where, err), *chunks = tp_json_need(o, "chunks", where, err);
    if (tp_json_u64(o, "offset", UINT64_MAX, where, &t->offset, err) < 0 ||
        tp_json_u64(o, "stored_size", UINT64_MAX, where, &t->stored_size, err) < 0 ||
        tp_json_u64(o, "raw_size", UINT64_MAX, where, &t->raw_size, err) < 0 ||
        tp_json_u64(o, "chunk_size", TP_SHARD_MAX_CHUNK, where, &chunk_size, err) < 0 || !xxh3 || !chunks ||
        parse_hex_field(xxh3, "xxh3", where, &t->xxh3, err) < 0)
        return -1;
    size_t nbytes;
    if (!tp_tensor_nbytes(t->dtype, t->shape, t->ndim, &nbytes) || nbytes != t->raw_size)
        return tp_errorf(err, "%s: raw_size %llu does not match its shape and dtype", where,
                         (unsigned long long)t->raw_size);
    if (chunk_size == 0 || chunk_size % tp_dtype_size(t->dtype) != 0)
        return tp_errorf(err, "%s: chunk_size %llu is not a positive multiple of the element size", where,
                         (unsigned long long)chunk_size);
    if (t->offset % TP_ALIGN != 0 || t->offset < TP_SHARD_HEADER_SIZE || t->offset > pc->data_end ||
        t->stored_size > pc->data_end - t->offset)
        return tp_errorf(err, "%s: data [%llu, +%llu) is unaligned or outside the data region [%u, %llu)", where,
                         (unsigned long long)t->offset, (unsigned long long)t->stored_size,
                         TP_SHARD_HEADER_SIZE, (unsigned long long)pc->data_end);
    return parse_chunks(chunks, t, chunk_size, where, err);
}

static int cmp_by_offset(const void *a, const void *b)
{
    const tp_shard_tensor *x = *(tp_shard_tensor *const *)a, *y = *(tp_shard_tensor *const *)b;
    if (x->offset != y->offset)
        return x->offset < y->offset ? -1 : 1;
    return x->stored_size < y->stored_size ? -1 : x->stored_size > y->stored_size;
}

static int cmp_by_name(const void *a, const void *b)
{
    return strcmp((*(tp_shard_tensor *const *)a)->name, (*(tp_shard_tensor *const *)b)->name);
}

/* Names unique and data ranges disjoint, in O(n log n). */
static int check_tensor_set(const tp_shard_index *ix, const char *name, tp_err *err)
{
    if (ix->n_tensors < 2)
        return 0;
    tp_shard_tensor **v = malloc(ix->n_tensors * sizeof *v);
    if (!v)
        return tp_errorf(err, "%s: out of memory", name);
    for (size_t i = 0; i < ix->n_tensors; i++)
        v[i] = &ix->tensors[i];
    int rc = 0;
    qsort(v, ix->n_tensors, sizeof *v, cmp_by_name);
    for (size_t i = 1; i < ix->n_tensors && rc == 0; i++)
        if (strcmp(v[i - 1]->name, v[i]->name) == 0)
            rc = tp_errorf(err, "%s: tensor %s appears twice in the index", name, v[i]->name);
    qsort(v, ix->n_tensors, sizeof *v, cmp_by_offset);
    for (size_t i = 1; i < ix->n_tensors && rc == 0; i++)
        if (v[i - 1]->offset + v[i - 1]->stored_size > v[i]->offset)
            rc = tp_errorf(err, "%s: tensors %s and %s overlap", name, v[i - 1]->name, v[i]->name);
    free(v);
    return rc;
}

static int parse_index(tp_shard_index *ix, const cJSON *root, const parse_ctx *pc, tp_err *err)
{
    const char *name = pc->name;
    char where[1200];
    snprintf(where, sizeof where, "%s: index", name);
    if (!cJSON_IsObject(root))
        return tp_errorf(err, "%s: not a JSON object", where);
    static const char *const keys[] = { "format", "format_version", "conversion_id", "rank", "tp", "tensors", NULL };
    const char *format, *cid;
    int version;
    if (tp_json_check_keys(root, keys, where, err) < 0 ||
        tp_json_str(root, "format", 32, false, where, &format, err) < 0)
        return -1;
    if (strcmp(format, "tpshard") != 0)
        return tp_errorf(err, "%s: format is \"%s\", not \"tpshard\"", where, format);
    if (tp_json_int(root, "format_version", 0, 1 << 30, where, &version, err) < 0)
        return -1;
    if (version != TP_FORMAT_VERSION)
        return tp_errorf(err, "%s: format_version %d differs from the header's %d", where, version, TP_FORMAT_VERSION);
    if (tp_json_str(root, "conversion_id", 64, false, where, &cid, err) < 0)
        return -1;
    if (!tp_is_conversion_id(cid))
        return tp_errorf(err, "%s: conversion_id \"%s\" is not 32 lowercase hex digits", where, cid);
    memcpy(ix->conversion_id, cid, 33);
    if (tp_json_int(root, "tp", 1, TP_MAX_TP, where, &ix->tp, err) < 0 ||
        tp_json_int(root, "rank", 0, TP_MAX_TP - 1, where, &ix->rank, err) < 0)
        return -1;
    if (ix->rank >= ix->tp)
        return tp_errorf(err, "%s: rank %d is not below tp %d", where, ix->rank, ix->tp);
    const cJSON *tensors = tp_json_need(root, "tensors", where, err);
    if (!tensors)
        return -1;
    if (!cJSON_IsArray(tensors))
        return tp_errorf(err, "%s: \"tensors\" must be an array", where);
    size_t n = (size_t)cJSON_GetArraySize(tensors);
    ix->tensors = calloc(n ? n : 1, sizeof *ix->tensors);
    if (!ix->tensors)
        return tp_errorf(err, "%s: out of memory", where);
    ix->n_tensors = n; /* every entry is zeroed, so a partial index frees cleanly */
    size_t i = 0;
    const cJSON *t;
    cJSON_ArrayForEach(t, tensors) {
        if (parse_tensor(t, i, pc, &ix->tensors[i], err) < 0)
            return -1;
        i++;
    }
    return check_tensor_set(ix, name, err);
}

int tp_shard_parse(tp_shard_index *ix, const uint8_t *buf, size_t len, const char *name, tp_err *err)
{
    memset(ix, 0, sizeof *ix);
    uint64_t off, ilen, ixh;
    if (parse_header(buf, len, name, &off, &ilen, &ixh, err) < 0)
        return -1;
    if (tp_xxh3(buf + off, ilen) != ixh)
        return tp_errorf(err, "%s: index checksum mismatch (index corrupted)", name);
    cJSON *root = tp_json_parse(buf + off, ilen);
    if (!root)
        return tp_errorf(err, "%s: index is not valid JSON", name);
    parse_ctx pc = { .name = name, .data_end = off };
    int rc = parse_index(ix, root, &pc, err);
    cJSON_Delete(root);
    if (rc < 0) {
        tp_shard_index_free(ix);
        return -1;
    }
    ix->file_size = len;
    ix->index_xxh3 = ixh;
    return 0;
}

int tp_shard_open(tp_shard_reader *r, const char *path, tp_err *err)
{
    memset(r, 0, sizeof *r);
    if (tp_mmap_open(&r->map, path, err) < 0)
        return -1;
    if (tp_shard_parse(&r->index, r->map.data, r->map.size, path, err) < 0) {
        tp_mmap_close(&r->map);
        return -1;
    }
    return 0;
}

void tp_shard_close(tp_shard_reader *r)
{
    if (!r)
        return;
    tp_shard_index_free(&r->index);
    tp_mmap_close(&r->map);
}

/* ------------------------------------------------------------ decoding */

static const char *reader_name(const tp_shard_reader *r)
{
    return r->map.path ? r->map.path : "tpshard";
}

int tp_shard_decode_chunk(const tp_shard_reader *r, const tp_shard_tensor *t, size_t ci, uint8_t *dst,
                          bool verify, tp_err *err)
{
    if (ci >= t->n_chunks)
        return tp_errorf(err, "%s: tensor %s: no chunk %zu (it has %zu)", reader_name(r), t->name, ci, t->n_chunks);
    const tp_chunk_info *c = &t->chunks[ci];
    const uint8_t *stored = r->map.data + c->offset;
    if (verify && tp_xxh3(stored, c->stored_size) != c->xxh3)
        return tp_errorf(err, "%s: tensor %s: chunk %zu checksum mismatch (stored bytes corrupted)", reader_name(r),
                         t->name, ci);
    if (tp_codec_decode(t->codec, t->dtype, stored, c->stored_size, dst, c->raw_size, NULL, err) < 0)
        return tp_err_prefix(err, "%s: tensor %s: chunk %zu", reader_name(r), t->name, ci);
    return 0;
}

int tp_shard_read_chunk(const tp_shard_reader *r, const tp_shard_tensor *t, size_t ci,
                        uint8_t *dst_tensor, bool verify, tp_err *err)
{
    if (ci >= t->n_chunks)
        return tp_errorf(err, "%s: tensor %s: no chunk %zu (it has %zu)", reader_name(r), t->name, ci, t->n_chunks);
    /* Every chunk but the last holds chunk_size raw bytes, chunk 0 included. */
    return tp_shard_decode_chunk(r, t, ci, dst_tensor + ci * t->chunks[0].raw_size, verify, err);
}

typedef struct read_job {
    const tp_shard_reader *r;
    const tp_shard_tensor *t;
    uint8_t *dst;
    bool verify;
    pthread_mutex_t mu;
    size_t failed_chunk;     /* lowest failing chunk, so the message is deterministic */
    tp_err err;
} read_job;

static void read_one(size_t i, void *p)
{
    read_job *j = p;
    tp_err e;
    if (tp_shard_read_chunk(j->r, j->t, i, j->dst, j->verify, &e) == 0)
        return;
    pthread_mutex_lock(&j->mu);
    if (i < j->failed_chunk) {
        j->failed_chunk = i;
        j->err = e;
    }
    pthread_mutex_unlock(&j->mu);
}

int tp_shard_read_tensor(const tp_shard_reader *r, const tp_shard_tensor *t, uint8_t *dst,
                         tp_pool *pool, bool verify, tp_err *err)
{
    if (pool && t->n_chunks > 1) {
        read_job j = { .r = r, .t = t, .dst = dst, .verify = verify, .failed_chunk = SIZE_MAX };
        pthread_mutex_init(&j.mu, NULL);
        tp_pool_parallel_for(pool, t->n_chunks, read_one, &j);
        pthread_mutex_destroy(&j.mu);
        if (j.failed_chunk != SIZE_MAX) {
            if (err)
                *err = j.err;
            return -1;
        }
    } else {
        for (size_t i = 0; i < t->n_chunks; i++)
            if (tp_shard_read_chunk(r, t, i, dst, verify, err) < 0)
                return -1;
    }
    if (verify && tp_xxh3(dst, t->raw_size) != t->xxh3)
        return tp_errorf(err, "%s: tensor %s: tensor checksum mismatch (decoded bytes differ from those written)",
                         reader_name(r), t->name);
    return 0;
}

const uint8_t *tp_shard_tensor_inplace(const tp_shard_reader *r, const tp_shard_tensor *t)
{
    return t->codec == TP_CODEC_NONE ? r->map.data + t->offset : NULL;
}
