/* stream.c - a rank's tensors, decoded piece by piece into a caller's
 * buffers (tp_load_stream, see loader.h).
 *
 * The caller's thread plans the pieces in file order, acquires a buffer for
 * each from the sink and submits the piece to a pool; the pool decodes (or
 * copies) it into that buffer, checking each chunk's XXH3 on the way
 * (tp_shard_decode_chunk, the same function tp_load_rank's chunks go
 * through).  The caller's thread retires pieces strictly in order: it
 * feeds the tensor's streamed XXH3, compares it after the tensor's last
 * piece and delivers.  At most sink->max_held pieces are in flight, so a
 * sink with that many buffers never waits on us, and acquiring in order
 * means the oldest piece always has its buffer: no deadlock.  Errors are
 * reported in file order (the first piece that failed, not the first to
 * fail on the clock), so messages are deterministic.
 */
#include "loader_internal.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include "tp_xxhash.h"

#define DEFAULT_PIECE ((size_t)4 << 20)

typedef struct stream stream;

/* One piece in flight: planned by the caller's thread, filled by a worker. */
typedef struct piece {
    stream *st;
    size_t tensor;
    uint64_t offset;          /* within the tensor's raw bytes */
    size_t bytes;
    size_t chunk0, n_chunks;  /* deferred: chunks [chunk0, chunk0 + n_chunks); else 0 */
    uint8_t *buf;
    bool done, failed;        /* under st->mu */
    tp_err err;
} piece;

struct stream {
    const tp_loaded_rank *lr;
    const tp_stream_sink *sink;
    void *arg;
    bool verify;
    size_t piece_bytes;
    tp_pool *pool;
    tp_progress *progress;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_bool stop;         /* workers skip pieces once an error is known */
    piece *ring;
    size_t window, head, count;
    XXH3_state_t *hash;       /* the current tensor's raw bytes */
    tp_stream_stats stats;
    bool failed;
    tp_err err;
};

/* --------------------------------------------------------------- planning */

static bool selected(const tp_stream_opts *o, size_t i)
{
    return !o->select || o->select[i];
}

/* Read from the rank file (not yet in memory). */
static bool from_file(const tp_loaded_rank *lr, size_t i)
{
    return !lr->tensors[i].data;
}

static size_t norm_piece_bytes(const tp_stream_opts *o)
{
    size_t p = o->piece_bytes ? o->piece_bytes : DEFAULT_PIECE;
    p &= ~(size_t)15;          /* whole elements of every dtype */
    return p < 16 ? 16 : p;
}

static size_t largest_chunk(const tp_shard_tensor *t)
{
    size_t m = 0;
    for (size_t c = 0; c < t->n_chunks; c++)
        if (t->chunks[c].raw_size > m)
            m = (size_t)t->chunks[c].raw_size;
    return m;
}

size_t tp_load_stream_max_piece(const tp_loaded_rank *lr, const tp_stream_opts *opts)
{
    tp_stream_opts def = {0};
    const tp_stream_opts *o = opts ? opts : &def;
    size_t pb = norm_piece_bytes(o), most = 1;
    for (size_t i = 0; i < lr->n_tensors; i++) {
        const tp_shard_tensor *t = lr->tensors[i].info;
        if (!t || !selected(o, i))
            continue;
        size_t want = t->raw_size < pb ? (size_t)t->raw_size : pb;
        if (from_file(lr, i)) {
            size_t big = largest_chunk(t);
            want = t->codec == TP_CODEC_NONE ? (big > want ? big : want) : big;
        }
        if (want > most)
            most = want;
    }
    return most;
}

/* The next piece of tensor i starting at chunk *ci / byte *off; false when
 * the tensor is done. */
static bool next_piece(const stream *st, size_t i, size_t *ci, uint64_t *off, piece *p)
{
    const tp_shard_tensor *t = st->lr->tensors[i].info;
    if (*off >= t->raw_size)
        return false;
    p->tensor = i;
    p->offset = *off;
    p->chunk0 = *ci;
    p->n_chunks = 0;
    if (!from_file(st->lr, i)) {
        uint64_t left = t->raw_size - *off;
        p->bytes = left < st->piece_bytes ? (size_t)left : st->piece_bytes;
    } else if (t->codec != TP_CODEC_NONE) {
        p->n_chunks = 1;
        p->bytes = (size_t)t->chunks[*ci].raw_size;
    } else {
        /* Whole chunks (each has its own checksum) up to piece_bytes. */
        size_t bytes = 0, n = 0;
        while (*ci + n < t->n_chunks &&
               (n == 0 || bytes + t->chunks[*ci + n].raw_size <= st->piece_bytes))
            bytes += (size_t)t->chunks[*ci + n++].raw_size;
        p->n_chunks = n;
        p->bytes = bytes;
    }
    *ci += p->n_chunks;
    *off += p->bytes;
    return true;
}

/* ---------------------------------------------------------------- workers */

static void fill_piece(piece *p)
{
    stream *st = p->st;
    const tp_loaded_rank *lr = st->lr;
    const tp_loaded_tensor *lt = &lr->tensors[p->tensor];
    bool failed = false;
    tp_err e = {{0}};
    if (atomic_load(&st->stop)) {
        failed = true;   /* never delivered: the stream is stopping */
        tp_errorf(&e, "stream stopped");
    } else if (lt->data) {
        memcpy(p->buf, lt->data + p->offset, p->bytes);
    } else {
        size_t at = 0;
        for (size_t c = p->chunk0; c < p->chunk0 + p->n_chunks && !failed; c++) {
            if (tp_shard_decode_chunk(&lr->reader, lt->info, c, p->buf + at, st->verify, &e) < 0) {
                tp_ld_rank_err_prefix(&e, lr);
                failed = true;
            }
            at += (size_t)lt->info->chunks[c].raw_size;
        }
    }
    pthread_mutex_lock(&st->mu);
    p->failed = failed;
    if (failed)
        p->err = e;
    p->done = true;
    pthread_cond_broadcast(&st->cv);
    pthread_mutex_unlock(&st->mu);
}

static void piece_job(void *arg)
{
    fill_piece(arg);
}

/* ------------------------------------------------------------- retiring */

static void fail(stream *st, const tp_err *e)
{
    if (!st->failed) {
        st->failed = true;
        st->err = *e;
    }
    atomic_store(&st->stop, true);
}

static void release(stream *st, piece *p)
{
    if (p->buf && st->sink->release)
        st->sink->release(st->arg, p->buf);
    p->buf = NULL;
}

static void wait_done(stream *st, piece *p)
{
    pthread_mutex_lock(&st->mu);
    while (!p->done)
        pthread_cond_wait(&st->cv, &st->mu);
    pthread_mutex_unlock(&st->mu);
}

/* The tensor's streamed checksum, at its last piece. */
static int check_tensor_sum(stream *st, const piece *p, tp_err *err)
{
    const tp_shard_tensor *t = st->lr->tensors[p->tensor].info;
    if (p->offset == 0)
        XXH3_64bits_reset(st->hash);
    XXH3_64bits_update(st->hash, p->buf, p->bytes);
    if (p->offset + p->bytes == t->raw_size && XXH3_64bits_digest(st->hash) != t->xxh3)
        return tp_ld_tensor_sum_mismatch(err, st->lr, t);
    return 0;
}

/* Waits for the oldest piece and delivers it (or, once failed, releases). */
static void retire_front(stream *st)
{
    piece *p = &st->ring[st->head];
    st->head = (st->head + 1) % st->window;
    st->count--;
    wait_done(st, p);
    tp_err e = {{0}};
    if (st->failed) {
        release(st, p);
        return;
    }
    if (p->failed) {
        fail(st, &p->err);
        release(st, p);
        return;
    }
    const tp_loaded_tensor *lt = &st->lr->tensors[p->tensor];
    if (st->verify && from_file(st->lr, p->tensor) && check_tensor_sum(st, p, &e) < 0) {
        fail(st, &e);
        release(st, p);
        return;
    }
    uint8_t *buf = p->buf;
    p->buf = NULL;   /* the sink's from here, whatever deliver returns */
    if (st->sink->deliver(st->arg, p->tensor, p->offset, buf, p->bytes, &e) < 0) {
        fail(st, &e);
        return;
    }
    st->stats.bytes += p->bytes;
    st->stats.pieces++;
    for (size_t c = p->chunk0; c < p->chunk0 + p->n_chunks; c++)
        st->stats.stored_bytes += lt->info->chunks[c].stored_size;
    tp_progress_add(st->progress, p->bytes);
}

static void drain(stream *st)
{
    while (st->count)
        retire_front(st);
}

/* A tensor of 0 bytes gets no piece; its checksum (of nothing) is still
 * checked, after everything before it so that errors stay in file order. */
static void empty_tensor(stream *st, size_t i)
{
    const tp_shard_tensor *t = st->lr->tensors[i].info;
    drain(st);
    if (!st->failed && st->verify && from_file(st->lr, i) && tp_xxh3("", 0) != t->xxh3) {
        tp_err e;
        tp_ld_tensor_sum_mismatch(&e, st->lr, t);
        fail(st, &e);
    }
}

/* Plans, acquires and submits every piece of tensor i. */
static void stream_tensor(stream *st, size_t i)
{
    const tp_shard_tensor *t = st->lr->tensors[i].info;
    if (t->raw_size == 0) {
        empty_tensor(st, i);
        return;
    }
    size_t ci = 0;
    uint64_t off = 0;
    piece next;
    while (!st->failed && next_piece(st, i, &ci, &off, &next)) {
        while (st->count == st->window)
            retire_front(st);
        if (st->failed)
            return;
        tp_err e = {{0}};
        void *buf = st->sink->acquire(st->arg, next.bytes, &e);
        if (!buf) {
            if (!e.msg[0])
                tp_errorf(&e, "the sink gave no buffer for %zu bytes", next.bytes);
            fail(st, &e);
            return;
        }
        piece *p = &st->ring[(st->head + st->count) % st->window];
        *p = next;
        p->st = st;
        p->buf = buf;
        p->done = p->failed = false;
        st->count++;
        tp_pool_submit(st->pool, piece_job, p);
    }
}

/* Every selected tensor must have bytes to stream, from memory or the file. */
static int check_sources(const tp_loaded_rank *lr, const tp_stream_opts *o, tp_err *err)
{
    for (size_t i = 0; i < lr->n_tensors; i++) {
        const tp_loaded_tensor *lt = &lr->tensors[i];
        if (!selected(o, i))
            continue;
        if (!lt->info)
            return tp_errorf(err, "%s: rank %d: tensor %zu has no description", lr->source, lr->rank, i);
        if (lt->data || lt->info->raw_size == 0)
            continue;
        if (!lr->reader.map.data)
            return tp_errorf(err, "%s: rank %d: tensor %s: neither in memory nor in a mapped rank file "
                             "(tensors dropped?)", lr->source, lr->rank, lt->info->name);
        uint64_t sum = 0;
        for (size_t c = 0; c < lt->info->n_chunks; c++)
            sum += lt->info->chunks[c].raw_size;
        if (sum != lt->info->raw_size)
            return tp_errorf(err, "%s: rank %d: tensor %s: chunks hold %llu bytes, the tensor %llu",
                             lr->source, lr->rank, lt->info->name, (unsigned long long)sum,
                             (unsigned long long)lt->info->raw_size);
    }
    return 0;
}

int tp_load_stream(const tp_loaded_rank *lr, const tp_stream_sink *sink, void *arg,
                   const tp_stream_opts *opts, tp_stream_stats *stats, tp_err *err)
{
    double t0 = tp_now();
    tp_stream_opts own = {.verify = lr->verify, .threads = lr->threads, .quiet = lr->quiet};
    const tp_stream_opts *o = opts ? opts : &own;
    if (stats)
        memset(stats, 0, sizeof *stats);
    if (!sink || !sink->acquire || !sink->deliver || sink->max_held < 1)
        return tp_errorf(err, "%s: rank %d: stream: the sink needs acquire, deliver and max_held >= 1",
                         lr->source, lr->rank);
    if (check_sources(lr, o, err) < 0)
        return -1;
    stream st = {.lr = lr, .sink = sink, .arg = arg, .verify = o->verify,
                 .piece_bytes = norm_piece_bytes(o), .window = sink->max_held};
    atomic_init(&st.stop, false);
    st.ring = calloc(st.window, sizeof *st.ring);
    st.hash = XXH3_createState();
    st.pool = tp_pool_create(o->threads);
    if (!st.ring || !st.hash || !st.pool) {
        free(st.ring);
        if (st.hash)
            XXH3_freeState(st.hash);
        if (st.pool)
            tp_pool_destroy(st.pool);
        return tp_errorf(err, "%s: rank %d: stream: out of memory or threads", lr->source, lr->rank);
    }
    pthread_mutex_init(&st.mu, NULL);
    pthread_cond_init(&st.cv, NULL);
    uint64_t total = 0;
    for (size_t i = 0; i < lr->n_tensors; i++)
        if (selected(o, i))
            total += lr->tensors[i].info->raw_size;
    char label[64];
    snprintf(label, sizeof label, "loading rank %d", lr->rank);
    st.progress = tp_progress_start(label, total, o->quiet);

    for (size_t i = 0; i < lr->n_tensors && !st.failed; i++)
        if (selected(o, i))
            stream_tensor(&st, i);
    drain(&st);   /* delivers the rest, or (failed) releases what is in flight */

    tp_progress_finish(st.progress);
    tp_pool_destroy(st.pool);
    pthread_mutex_destroy(&st.mu);
    pthread_cond_destroy(&st.cv);
    XXH3_freeState(st.hash);
    free(st.ring);
    st.stats.seconds = tp_now() - t0;
    if (stats)
        *stats = st.stats;
    if (st.failed) {
        if (err)
            *err = st.err;
        return -1;
    }
    return 0;
}
