/* test_load_stream.c - tp_load_stream (loader.h): a rank's tensors piece by
 * piece into a sink's buffers, from a deferred open (defer_tensors) or from
 * tensors already in memory, on small conversions written with the
 * shardfmt writer API (tests/loader_fixture.h; 32 KiB chunks, so lm_head
 * has several).
 *
 * The host sink below has a small ring of buffers and recycles a delivered
 * buffer only when it needs one (as a GPU sink recycles after its copy), and
 * checks the contract on every call: a buffer is acquired at most
 * max_held at a time, no piece exceeds the announced max, pieces come in
 * file order and each tensor's in order without gaps, every acquired buffer
 * is delivered or released. */
#include "loader_fixture.h"

#include <stdatomic.h>

/* ------------------------------------------------------------ host sink */

enum { BUF_FREE, BUF_HELD, BUF_DELIVERED };

typedef struct host_sink {
    size_t n_bufs, buf_bytes;
    uint8_t **bufs;
    int *state;
    size_t *age;              /* delivery number, to recycle the oldest first */
    size_t held, held_peak;
    const tp_loaded_rank *lr;
    uint8_t **out;            /* per tensor, the bytes delivered */
    uint64_t *next_off;
    bool *seen;
    long last_tensor;
    size_t deliveries, fail_at, fail_acquire_at, acquires, releases;
    int contract_errors;
} host_sink;

static void sink_error(host_sink *s, const char *what)
{
    fprintf(stderr, "sink contract: %s\n", what);
    s->contract_errors++;
}

static void *host_acquire(void *arg, size_t bytes, tp_err *err)
{
    host_sink *s = arg;
    s->acquires++;
    if (s->fail_acquire_at && s->acquires == s->fail_acquire_at) {
        tp_errorf(err, "host sink: no memory today");
        return NULL;
    }
    if (bytes > s->buf_bytes)
        sink_error(s, "piece larger than tp_load_stream_max_piece");
    int pick = -1;
    for (size_t i = 0; i < s->n_bufs && pick < 0; i++)
        if (s->state[i] == BUF_FREE)
            pick = (int)i;
    if (pick < 0) {   /* "wait" for the oldest delivered buffer */
        for (size_t i = 0; i < s->n_bufs; i++)
            if (s->state[i] == BUF_DELIVERED && (pick < 0 || s->age[i] < s->age[pick]))
                pick = (int)i;
    }
    if (pick < 0) {
        sink_error(s, "every buffer is held by the stream (a blocking sink would deadlock)");
        tp_errorf(err, "host sink: no free buffer");
        return NULL;
    }
    s->state[pick] = BUF_HELD;
    if (++s->held > s->held_peak)
        s->held_peak = s->held;
    return s->bufs[pick];
}

static int buf_index(host_sink *s, void *buf)
{
    for (size_t i = 0; i < s->n_bufs; i++)
        if (s->bufs[i] == buf)
            return (int)i;
    return -1;
}

static int host_deliver(void *arg, size_t tensor, uint64_t offset, void *buf, size_t bytes, tp_err *err)
{
    host_sink *s = arg;
    int b = buf_index(s, buf);
    if (b < 0 || s->state[b] != BUF_HELD) {
        sink_error(s, "delivered a buffer the stream did not hold");
        return tp_errorf(err, "host sink: bad buffer");
    }
    s->state[b] = BUF_DELIVERED;
    s->age[b] = s->deliveries++;
    s->held--;
    const tp_shard_tensor *t = s->lr->tensors[tensor].info;
    if ((long)tensor < s->last_tensor)
        sink_error(s, "tensors out of file order");
    if ((long)tensor != s->last_tensor && s->last_tensor >= 0) {
        const tp_shard_tensor *prev = s->lr->tensors[s->last_tensor].info;
        if (s->next_off[s->last_tensor] != prev->raw_size)
            sink_error(s, "next tensor before the previous one was complete");
    }
    s->last_tensor = (long)tensor;
    if (offset != s->next_off[tensor])
        sink_error(s, "piece out of order within its tensor (or a gap)");
    if (offset + bytes > t->raw_size) {
        sink_error(s, "piece past the end of its tensor");
        return tp_errorf(err, "host sink: piece past the end");
    }
    if (!s->out[tensor])
        s->out[tensor] = calloc(1, t->raw_size ? t->raw_size : 1);
    memcpy(s->out[tensor] + offset, buf, bytes);
    s->next_off[tensor] = offset + bytes;
    s->seen[tensor] = true;
    if (s->fail_at && s->deliveries == s->fail_at)
        return tp_errorf(err, "host sink: device on fire at delivery %zu", s->deliveries);
    return 0;
}

static void host_release(void *arg, void *buf)
{
    host_sink *s = arg;
    int b = buf_index(s, buf);
    if (b < 0 || s->state[b] != BUF_HELD) {
        sink_error(s, "released a buffer the stream did not hold");
        return;
    }
    s->state[b] = BUF_FREE;
    s->held--;
    s->releases++;
}

static void sink_open(host_sink *s, const tp_loaded_rank *lr, size_t n_bufs, size_t buf_bytes)
{
    memset(s, 0, sizeof *s);
    s->n_bufs = n_bufs;
    s->buf_bytes = buf_bytes;
    s->bufs = calloc(n_bufs, sizeof *s->bufs);
    s->state = calloc(n_bufs, sizeof *s->state);
    s->age = calloc(n_bufs, sizeof *s->age);
    for (size_t i = 0; i < n_bufs; i++)
        s->bufs[i] = malloc(buf_bytes);
    s->lr = lr;
    s->out = calloc(lr->n_tensors, sizeof *s->out);
    s->next_off = calloc(lr->n_tensors, sizeof *s->next_off);
    s->seen = calloc(lr->n_tensors, sizeof *s->seen);
    s->last_tensor = -1;
}

/* After the stream: no buffer may still be held by it. */
static void sink_close(host_sink *s)
{
    for (size_t i = 0; i < s->n_bufs; i++) {
        if (s->state[i] == BUF_HELD)
            sink_error(s, "a buffer acquired by the stream was neither delivered nor released");
        free(s->bufs[i]);
    }
    CHECK(s->held_peak <= s->n_bufs);
    CHECK(s->contract_errors == 0);
    for (size_t i = 0; i < s->lr->n_tensors; i++)
        free(s->out[i]);
    free(s->out);
    free(s->next_off);
    free(s->seen);
    free(s->bufs);
    free(s->state);
    free(s->age);
}

static tp_stream_sink host_sink_ops(size_t max_held)
{
    return (tp_stream_sink){.acquire = host_acquire, .deliver = host_deliver, .release = host_release,
                            .max_held = max_held};
}

/* Streams lr (selected tensors) and compares every byte with ref's. */
static void stream_and_compare(const tp_loaded_rank *lr, const tp_loaded_rank *ref, const tp_stream_opts *so,
                               size_t n_bufs, const char *what)
{
    tp_err err;
    host_sink s;
    size_t maxp = tp_load_stream_max_piece(lr, so);
    sink_open(&s, lr, n_bufs, maxp);
    tp_stream_sink ops = host_sink_ops(n_bufs);
    tp_stream_stats stats;
    CHECK_OK(tp_load_stream(lr, &ops, &s, so, &stats, &err), err);
    uint64_t want_bytes = 0;
    for (size_t i = 0; i < lr->n_tensors; i++) {
        const tp_shard_tensor *t = lr->tensors[i].info;
        bool sel = !so->select || so->select[i];
        if (!sel) {
            CHECK(!s.seen[i], "%s: tensor %s delivered but not selected", what, t->name);
            continue;
        }
        want_bytes += t->raw_size;
        const tp_loaded_tensor *rt = tp_loaded_find(ref, t->name);
        CHECK(rt != NULL);
        if (!rt)
            continue;
        CHECK(s.next_off[i] == t->raw_size && (!t->raw_size || memcmp(s.out[i], rt->data, t->raw_size) == 0),
              "%s: rank %d tensor %s: streamed bytes differ from tp_load_rank's", what, lr->rank, t->name);
    }
    CHECK(stats.bytes == want_bytes);
    CHECK(stats.pieces == s.deliveries);
    CHECK(stats.seconds >= 0);
    CHECK(s.releases == 0);
    sink_close(&s);
}

/* ------------------------------------------------------------------ tests */

static const tp_load_opts open_full = {.verify = true, .threads = 2, .quiet = true};
static const tp_load_opts open_defer = {.verify = true, .threads = 2, .quiet = true, .defer_tensors = true};

static void test_round_trip(const fx_model *m, const char *dir, int tp, const char *bundle)
{
    tp_err err;
    for (int r = 0; r < tp; r++) {
        tp_loaded_rank ref, def;
        CHECK_OK(tp_load_rank(&ref, dir, r, &open_full, &err), err);
        CHECK_OK(tp_load_rank(&def, bundle ? bundle : dir, r, &open_defer, &err), err);
        fx_check_loaded(m, &ref, tp);
        CHECK(def.deferred);
        CHECK(def.n_tensors == ref.n_tensors && def.raw_bytes == ref.raw_bytes);
        CHECK(def.config_json != NULL);
        for (size_t i = 0; i < def.n_tensors; i++)
            CHECK(def.tensors[i].data == NULL && def.tensors[i].info != NULL);
        /* several piece sizes (4 KiB: one chunk per piece; two 32 KiB chunks per none piece;
         * the default), thread counts and ring sizes */
        static const size_t pieces[] = {4096, 65536, 0};
        static const int threads[] = {1, 3, 2};
        static const size_t rings[] = {1, 3, 8};
        for (int k = 0; k < 3; k++) {
            tp_stream_opts so = {.verify = true, .threads = threads[k], .quiet = true, .piece_bytes = pieces[k]};
            stream_and_compare(&def, &ref, &so, rings[k], "deferred");
            /* from memory: tp_load_rank's own tensors */
            stream_and_compare(&ref, &ref, &so, rings[k], "in memory");
        }
        /* opts NULL: the rank's own (verify on, 2 threads) */
        {
            host_sink s;
            sink_open(&s, &def, 4, tp_load_stream_max_piece(&def, NULL));
            tp_stream_sink ops = host_sink_ops(4);
            CHECK_OK(tp_load_stream(&def, &ops, &s, NULL, NULL, &err), err);
            sink_close(&s);
        }
        /* a subset: every other tensor */
        bool *sel = calloc(def.n_tensors, sizeof *sel);
        for (size_t i = 0; i < def.n_tensors; i += 2)
            sel[i] = true;
        tp_stream_opts so = {.verify = true, .threads = 2, .quiet = true, .select = sel};
        stream_and_compare(&def, &ref, &so, 2, "subset");
        free(sel);
        tp_loaded_rank_free(&ref);
        tp_loaded_rank_free(&def);
    }
}

/* The stream stops at a flipped byte and names the file, tensor and chunk. */
static void test_corruption(const char *root, const char *good, tp_codec codec)
{
    tp_err err;
    char *dir = fx_path(root, "stream-corrupt-%s", tp_codec_name(codec));
    fx_copy(good, dir);
    char *r1 = fx_path(dir, "rank-00001-of-00002.tpshard");
    tp_shard_reader rd;
    CHECK_OK(tp_shard_open(&rd, r1, &err), err);
    const tp_shard_tensor *t = tp_shard_find(&rd.index, "lm_head.weight");
    CHECK(t && t->n_chunks > 2);
    uint64_t off = t ? t->chunks[1].offset + t->chunks[1].stored_size / 2 : 0;
    uint64_t chunk_raw = t ? t->chunks[0].raw_size : 0;
    tp_shard_close(&rd);
    fx_flip_byte(r1, off);

    tp_loaded_rank def;
    CHECK_OK(tp_load_rank(&def, dir, 1, &open_defer, &err), err);   /* opening reads no data */
    for (int verify = 1; verify >= 0; verify--) {
        host_sink s;
        tp_stream_opts so = {.verify = verify, .threads = 2, .quiet = true, .piece_bytes = 65536};
        sink_open(&s, &def, 3, tp_load_stream_max_piece(&def, &so));
        tp_stream_sink ops = host_sink_ops(3);
        int rc = tp_load_stream(&def, &ops, &s, &so, NULL, &err);
        if (verify) {
            CHECK(rc != 0);
            CHECK(strstr(err.msg, "lm_head.weight") != NULL);
            CHECK(strstr(err.msg, "chunk 1") != NULL);
            CHECK(strstr(err.msg, "rank-00001-of-00002.tpshard") != NULL);
            CHECK(strstr(err.msg, "checksum") != NULL);
            if (rc == 0 || !strstr(err.msg, "lm_head.weight"))
                fprintf(stderr, "corruption (%s): got \"%s\"\n", tp_codec_name(codec), rc ? err.msg : "success");
            /* nothing of lm_head past the bad chunk was delivered */
            size_t li = (size_t)(tp_loaded_find(&def, "lm_head.weight") - def.tensors);
            CHECK(s.next_off[li] <= chunk_raw);
        } else if (codec == TP_CODEC_NONE) {
            /* unverified, a flipped byte of a "none" tensor goes through */
            CHECK_OK(rc, err);
        } else {
            /* a zstd frame with a flipped byte may or may not decode: either way no hang, no leak */
            (void)rc;
        }
        sink_close(&s);
    }
    tp_loaded_rank_free(&def);
    check_rmtree(dir);
    free(dir);
    free(r1);
}

/* A sink that fails stops the stream with its own message; the buffers in
 * flight come back through release. */
static void test_sink_failure(const char *dir)
{
    tp_err err;
    tp_loaded_rank def;
    CHECK_OK(tp_load_rank(&def, dir, 0, &open_defer, &err), err);
    for (size_t n = 1; n <= 7; n += 3) {
        host_sink s;
        tp_stream_opts so = {.verify = true, .threads = 3, .quiet = true, .piece_bytes = 16};
        sink_open(&s, &def, 4, tp_load_stream_max_piece(&def, &so));
        s.fail_at = n;
        tp_stream_sink ops = host_sink_ops(4);
        CHECK_FAILS(tp_load_stream(&def, &ops, &s, &so, NULL, &err), err, "device on fire");
        CHECK(s.deliveries == n);
        CHECK(s.held == 0);
        sink_close(&s);
    }
    /* acquire fails */
    {
        host_sink s;
        tp_stream_opts so = {.verify = true, .threads = 2, .quiet = true, .piece_bytes = 16};
        sink_open(&s, &def, 4, tp_load_stream_max_piece(&def, &so));
        s.fail_acquire_at = 6;
        tp_stream_sink ops = host_sink_ops(4);
        CHECK_FAILS(tp_load_stream(&def, &ops, &s, &so, NULL, &err), err, "no memory today");
        CHECK(s.held == 0);
        CHECK(s.releases > 0);
        sink_close(&s);
    }
    /* a bad sink */
    {
        tp_stream_sink ops = host_sink_ops(0);
        CHECK_FAILS(tp_load_stream(&def, &ops, NULL, NULL, NULL, &err), err, "max_held");
    }
    /* the tensors dropped: nothing to stream from */
    tp_loaded_rank_drop_tensors(&def);
    tp_loaded_rank ref;
    CHECK_OK(tp_load_rank(&ref, dir, 0, &open_defer, &err), err);
    tp_loaded_rank_drop_tensors(&ref);
    CHECK(ref.n_tensors == 0);   /* no tensors left: an empty stream */
    {
        host_sink s;
        sink_open(&s, &ref, 1, 16);
        tp_stream_sink ops = host_sink_ops(1);
        CHECK_OK(tp_load_stream(&ref, &ops, &s, NULL, NULL, &err), err);
        CHECK(s.deliveries == 0);
        sink_close(&s);
    }
    tp_loaded_rank_free(&ref);
    tp_loaded_rank_free(&def);
}

int main(void)
{
    fx_model m;
    fx_model_init(&m);
    const char *root = check_tmpdir();
    tp_err err;
    char *dirs[2][2];
    static const tp_codec codecs[] = {TP_CODEC_NONE, TP_CODEC_ZSTD};
    for (int c = 0; c < 2; c++)
        for (int tpi = 0; tpi < 2; tpi++) {
            int tp = tpi + 1;
            dirs[c][tpi] = fx_path(root, "conv-%s-tp%d", tp_codec_name(codecs[c]), tp);
            fx_conv_opts o = {.tp = tp, .codec = codecs[c]};
            fx_write_conversion(&m, dirs[c][tpi], &o, NULL);
            test_round_trip(&m, dirs[c][tpi], tp, NULL);
        }
    /* deferred from a node bundle (the rank file image read into memory) */
    {
        char *out = fx_path(root, "bundles");
        char **paths = NULL;
        size_t n = 0;
        CHECK_OK(tp_bundle_pack(dirs[1][1], 2, out, true, &paths, &n, &err), err);
        if (n == 1)
            test_round_trip(&m, dirs[1][1], 2, paths[0]);
        for (size_t i = 0; i < n; i++)
            free(paths[i]);
        free(paths);
        free(out);
    }
    test_corruption(root, dirs[0][1], TP_CODEC_NONE);
    test_corruption(root, dirs[1][1], TP_CODEC_ZSTD);
    test_sink_failure(dirs[1][1]);
    test_sink_failure(dirs[0][0]);

    for (int c = 0; c < 2; c++)
        for (int tpi = 0; tpi < 2; tpi++)
            free(dirs[c][tpi]);
    fx_model_free(&m);
    return check_finish("test_load_stream");
}
