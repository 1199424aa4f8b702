/* weights_cuda.cu - a rank's weights onto the device (see weights_cuda.h).
 *
 * The source is the loaded rank itself (tpcm_desc: byte ranges of lr's
 * tensors), streamed by the loader (tp_load_stream): a rank opened with
 * defer_tensors is decoded chunk by chunk on the loader's threads straight
 * into our pinned buffers, checksums checked on the way; tensors already in
 * memory are copied into them.  Each buffer goes to the device with
 * cudaMemcpyAsync and comes back to the pool once the event recorded behind
 * its copies has completed, so decoding, hashing and the DMA overlap.
 *
 * Staging: STAGE_MIN..STAGE_MAX pinned buffers of max(4 MiB, the largest
 * chunk) bytes, threads + 2 of them: every decoding thread fills a buffer of
 * its own while two more are in flight to the device (double-buffered DMA).
 * 4 MiB copies run near the PCIe peak (a copy's fixed cost is a few us, 4 MiB
 * take ~160 us at 25 GB/s) and 18 of them (16 threads) are 72 MiB of pinned
 * memory, small next to the weights.
 */
#include <cuda_runtime.h>

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "weights_cuda.h"

#define STAGE_PIECE ((size_t)4 << 20)
#define STAGE_MIN 4
#define STAGE_MAX 34

static int cuda_check(cudaError_t e, const char *what, tp_err *err)
{
    if (e == cudaSuccess)
        return 0;
    return tp_errorf(err, "%s: %s", what, cudaGetErrorString(e));
}

/* Round to nearest even, as torch's .to(torch.bfloat16) (NaN stays NaN). */
static uint16_t f32_bits_to_bf16(uint32_t u)
{
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* n elements of dtype dt in buf become n bf16 values at the start of buf.
 * In place: element i is read before bf16 i is written, and bf16 i only
 * overlaps source elements <= i. */
static void to_bf16_in_place(uint8_t *buf, size_t n, tp_dtype dt)
{
    if (dt == TP_BF16)
        return;
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        if (dt == TP_F32) {
            uint32_t u;
            memcpy(&u, buf + 4 * i, 4);
            h = f32_bits_to_bf16(u);
        } else {
            uint16_t f;
            memcpy(&f, buf + 2 * i, 2);
            float v = tp_f16_to_f32(f);   /* exact */
            uint32_t u;
            memcpy(&u, &v, 4);
            h = f32_bits_to_bf16(u);
        }
        memcpy(buf + 2 * i, &h, 2);
    }
}

static void to_f32(float *dst, const uint8_t *src, size_t n, tp_dtype dt)
{
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        if (dt == TP_F32) {
            memcpy(&dst[i], src + 4 * i, 4);
        } else {
            memcpy(&h, src + 2 * i, 2);
            dst[i] = dt == TP_BF16 ? tp_bf16_to_f32(h) : tp_f16_to_f32(h);
        }
    }
}

/* ------------------------------------------------------------ destinations */

/* What a destination holds on the device: a matrix in bf16, the bytes of an
 * 8-bit matrix as stored, or fp32 (vectors and scales, gathered on the
 * host first). */
typedef enum dest_kind { DEST_BF16, DEST_RAW8, DEST_F32 } dest_kind;

/* One device weight: bytes [off, off + bytes) of a loaded tensor. */
typedef struct dest {
    int tensor;
    uint64_t off, bytes;
    dest_kind kind;
    void *dev;
    float *host;                /* vectors: gathered here, copied when complete */
    uint64_t got;               /* source bytes received */
    struct dest *next;          /* the tensor's other destinations */
} dest;

enum { BUF_FREE, BUF_HELD, BUF_COPYING };

typedef struct sink {
    tpcw_weights *w;
    cudaStream_t s;
    const tp_loaded_rank *lr;
    dest *dests;
    size_t n_dests, cap_dests;
    dest **by_tensor;           /* lr->n_tensors list heads */
    bool *select;               /* the tensors any destination uses */
    size_t n_bufs, buf_bytes, next;
    void **bufs;
    cudaEvent_t *done;
    int *state;
} sink;

static const char *tensor_name(const sink *sk, int t)
{
    return sk->lr->tensors[t].info->name;
}

static bool is_q8(tp_dtype dt) { return dt == TP_F8_E4M3 || dt == TP_I8; }

/* Records where a weight goes and allocates its device buffer (*dst);
 * an absent weight (tensor -1) stays NULL.  Destinations are linked by
 * index later (the array may still grow). */
static int add_dest(sink *sk, const tp_weight_src *src, dest_kind kind, void **dst, tp_err *err)
{
    *dst = NULL;
    if (src->tensor < 0)
        return 0;
    const tp_loaded_rank *lr = sk->lr;
    if ((size_t)src->tensor >= lr->n_tensors || !lr->tensors[src->tensor].info)
        return tp_errorf(err, "weight source: tensor %d is not in the loaded rank", src->tensor);
    const tp_shard_tensor *t = lr->tensors[src->tensor].info;
    size_t es = tp_dtype_size(t->dtype);
    if (kind == DEST_RAW8 ? !is_q8(t->dtype)
                          : t->dtype != TP_BF16 && t->dtype != TP_F16 && t->dtype != TP_F32)
        return tp_errorf(err, "tensor %s: dtype %s is not supported here", t->name,
                         tp_dtype_name(t->dtype));
    if (src->offset > t->raw_size || src->bytes > t->raw_size - src->offset || src->offset % es ||
        src->bytes % es)
        return tp_errorf(err, "tensor %s: bytes [%llu, +%llu) are not whole elements inside its %llu bytes",
                         t->name, (unsigned long long)src->offset, (unsigned long long)src->bytes,
                         (unsigned long long)t->raw_size);
    for (size_t i = 0; i < sk->n_dests; i++)
        if (sk->dests[i].tensor == src->tensor && sk->dests[i].kind != kind)
            return tp_errorf(err, "tensor %s: used both as a matrix and as a vector", t->name);
    if (sk->n_dests == sk->cap_dests) {
        size_t cap = sk->cap_dests ? sk->cap_dests * 2 : 64;
        dest *d = (dest *)realloc(sk->dests, cap * sizeof *d);
        if (!d)
            return tp_errorf(err, "out of memory");
        sk->dests = d;
        sk->cap_dests = cap;
    }
    size_t n = (size_t)(src->bytes / es);
    dest *d = &sk->dests[sk->n_dests];
    memset(d, 0, sizeof *d);
    d->tensor = src->tensor;
    d->off = src->offset;
    d->bytes = src->bytes;
    d->kind = kind;
    size_t dev_es = kind == DEST_BF16 ? 2 : kind == DEST_RAW8 ? 1 : 4;
    if (tpc_allocs_malloc(&sk->w->owned, &d->dev, n * dev_es, "weights", err) < 0)
        return tp_err_prefix(err, "tensor %s", t->name);
    if (kind == DEST_F32 && !(d->host = (float *)malloc(n ? n * 4 : 1)))
        return tp_errorf(err, "out of memory");
    sk->n_dests++;
    *dst = d->dev;
    return 0;
}

/* A matrix: bf16 on the device, or an 8-bit one as stored with its scale
 * tensor in fp32 and the slice's scale geometry (src->q, model.c). */
static int add_mat(sink *sk, const tp_weight_src *src, tpcw_mat *m, tp_err *err)
{
    memset(m, 0, sizeof *m);
    if (src->tensor < 0 || (size_t)src->tensor >= sk->lr->n_tensors ||
        !sk->lr->tensors[src->tensor].info || !is_q8(sk->lr->tensors[src->tensor].info->dtype))
        return add_dest(sk, src, DEST_BF16, (void **)&m->bf16, err);
    tp_weight_src scale = { .tensor = src->scale.tensor, .offset = src->scale.offset,
                            .bytes = src->scale.bytes };
    void *w = NULL, *sc = NULL;
    if (add_dest(sk, src, DEST_RAW8, &w, err) < 0 || add_dest(sk, &scale, DEST_F32, &sc, err) < 0)
        return -1;
    m->q8 = (tpc_q8){ .w = (const uint8_t *)w, .dt = sk->lr->tensors[src->tensor].info->dtype,
                      .scale = (const float *)sc, .stride = src->q.stride,
                      .block = { src->q.block[0], src->q.block[1] },
                      .origin = { src->q.origin[0], src->q.origin[1] } };
    if (src->bytes > sk->w->q8_max_elems)
        sk->w->q8_max_elems = (size_t)src->bytes;
    return 0;
}

static int add_vec(sink *sk, const tp_weight_src *src, float **dst, tp_err *err)
{
    return add_dest(sk, src, DEST_F32, (void **)dst, err);
}
#define TPCW_ADD_MAT add_mat
#define TPCW_ADD_VEC add_vec

/* A sparse layer's router and local experts (one destination each). */
static int plan_moe(sink *sk, const tp_moe_weights *mw, tpcw_layer *L, tp_err *err)
{
    size_t ne = (size_t)(mw->expert_hi - mw->expert_lo);
    tpcw_moe *m = (tpcw_moe *)calloc(1, sizeof *m);
    if (!m)
        return tp_errorf(err, "out of memory");
    L->moe = m;   /* freed by tpcw_free, even when the rest fails */
    m->shape = mw;
    m->gate = (tpcw_mat *)calloc(ne ? ne : 1, sizeof *m->gate);
    m->up = (tpcw_mat *)calloc(ne ? ne : 1, sizeof *m->up);
    m->down = (tpcw_mat *)calloc(ne ? ne : 1, sizeof *m->down);
    if (!m->gate || !m->up || !m->down)
        return tp_errorf(err, "out of memory");
    /* the router stays bf16 (tpc_router_logits) */
    if (add_dest(sk, &mw->router_src, DEST_BF16, (void **)&m->router, err) < 0)
        return -1;
    for (size_t e = 0; e < ne; e++)
        if (add_mat(sk, &mw->gate_src[e], &m->gate[e], err) < 0 ||
            add_mat(sk, &mw->up_src[e], &m->up[e], err) < 0 ||
            add_mat(sk, &mw->down_src[e], &m->down[e], err) < 0)
            return tp_err_prefix(err, "expert %d", mw->expert_lo + (int)e);
    if (!m->router)
        return tp_errorf(err, "sparse layer without a router");
    return 0;
}

static int plan(sink *sk, const tpcm_desc *d, tp_err *err)
{
    tpcw_weights *w = sk->w;
    /* an 8-bit embedding (a tied lm_head's table) stays 8-bit, as a matrix */
    tpcw_mat embed;
    if (add_mat(sk, &d->embed, &embed, err) < 0 || add_vec(sk, &d->final_norm, &w->final_norm, err) < 0)
        return -1;
    w->embed = embed.bf16;
    w->embed_q8 = embed.q8;
    if (d->lm_w.tensor == d->embed.tensor && d->lm_w.offset == d->embed.offset &&
        d->lm_w.bytes == d->embed.bytes)
        w->lm_w = embed;   /* tied, same rows: share */
    else if (add_mat(sk, &d->lm_w, &w->lm_w, err) < 0)
        return -1;
    for (int l = 0; l < d->cfg->n_layers; l++) {
        const tp_layer_src *src = &d->layers[l];
        tpcw_layer *L = &w->layers[l];
        L->window = src->window;
#define TP_X(field, kind)                                                                   \
        if (TPCW_ADD_##kind(sk, &src->field, &L->field, err) < 0)                           \
            return tp_err_prefix(err, "layer %d", l);
        TP_LAYER_TENSORS(TP_X)
#undef TP_X
        if (src->moe && plan_moe(sk, src->moe, L, err) < 0)
            return tp_err_prefix(err, "layer %d", l);
    }
    sk->by_tensor = (dest **)calloc(sk->lr->n_tensors + 1, sizeof *sk->by_tensor);
    sk->select = (bool *)calloc(sk->lr->n_tensors + 1, sizeof *sk->select);
    if (!sk->by_tensor || !sk->select)
        return tp_errorf(err, "out of memory");
    for (size_t i = sk->n_dests; i-- > 0;) {
        dest *ds = &sk->dests[i];
        ds->next = sk->by_tensor[ds->tensor];
        sk->by_tensor[ds->tensor] = ds;
        sk->select[ds->tensor] = true;
    }
    return 0;
}

/* ------------------------------------------------------------ staging */

static int stage_open(sink *sk, size_t n, size_t bytes, tp_err *err)
{
    sk->bufs = (void **)calloc(n, sizeof *sk->bufs);
    sk->done = (cudaEvent_t *)calloc(n, sizeof *sk->done);
    sk->state = (int *)calloc(n, sizeof *sk->state);
    if (!sk->bufs || !sk->done || !sk->state)
        return tp_errorf(err, "out of memory");
    sk->n_bufs = n;
    sk->buf_bytes = bytes;
    for (size_t i = 0; i < n; i++)
        if (cuda_check(cudaMallocHost(&sk->bufs[i], bytes), "cudaMallocHost (staging)", err) < 0 ||
            cuda_check(cudaEventCreateWithFlags(&sk->done[i], cudaEventDisableTiming), "cudaEventCreate", err) < 0)
            return -1;
    return 0;
}

/* The caller has synchronised the stream: no copy reads a buffer any more. */
static void sink_close(sink *sk)
{
    for (size_t i = 0; i < sk->n_bufs; i++) {
        if (sk->done && sk->done[i])
            cudaEventDestroy(sk->done[i]);
        if (sk->bufs && sk->bufs[i])
            cudaFreeHost(sk->bufs[i]);
    }
    for (size_t i = 0; i < sk->n_dests; i++)
        free(sk->dests[i].host);
    free(sk->bufs);
    free(sk->done);
    free(sk->state);
    free(sk->dests);
    free(sk->by_tensor);
    free(sk->select);
}

static int buf_index(const sink *sk, const void *buf)
{
    for (size_t i = 0; i < sk->n_bufs; i++)
        if (sk->bufs[i] == buf)
            return (int)i;
    return -1;
}

/* Buffers are handed out round robin: the stream acquires and delivers in
 * order and holds at most n_bufs, so the next one in turn is never held by
 * it; we only wait for its last copies to finish. */
static void *sink_acquire(void *arg, size_t bytes, tp_err *err)
{
    sink *sk = (sink *)arg;
    if (bytes > sk->buf_bytes) {
        tp_errorf(err, "staging: a %zu-byte piece, the buffers hold %zu", bytes, sk->buf_bytes);
        return NULL;
    }
    size_t b = sk->next;
    sk->next = (sk->next + 1) % sk->n_bufs;
    if (sk->state[b] == BUF_HELD) {
        tp_errorf(err, "staging: buffer %zu is still held by the loader", b);
        return NULL;
    }
    if (sk->state[b] == BUF_COPYING &&
        cuda_check(cudaEventSynchronize(sk->done[b]), "weights upload (staging buffer)", err) < 0)
        return NULL;
    sk->state[b] = BUF_HELD;
    return sk->bufs[b];
}

static void sink_release(void *arg, void *buf)
{
    sink *sk = (sink *)arg;
    int b = buf_index(sk, buf);
    if (b >= 0)
        sk->state[b] = BUF_FREE;
}

static int sink_deliver(void *arg, size_t tensor, uint64_t offset, void *buf, size_t bytes, tp_err *err)
{
    sink *sk = (sink *)arg;
    int b = buf_index(sk, buf);
    if (b < 0)
        return tp_errorf(err, "staging: a buffer that is not ours");
    sk->state[b] = BUF_FREE;   /* until a copy reads it */
    dest *list = tensor < sk->lr->n_tensors ? sk->by_tensor[tensor] : NULL;
    if (!list)
        return 0;
    tp_dtype dt = sk->lr->tensors[tensor].info->dtype;
    size_t es = tp_dtype_size(dt);
    if (offset % es || bytes % es)
        return tp_errorf(err, "tensor %s: piece [%llu, +%zu) is not whole elements", tensor_name(sk, (int)tensor),
                         (unsigned long long)offset, bytes);
    uint8_t *p = (uint8_t *)buf;
    if (list->kind == DEST_BF16)   /* every destination of this tensor is one (add_dest) */
        to_bf16_in_place(p, bytes / es, dt);
    bool copied = false;
    for (dest *d = list; d; d = d->next) {
        uint64_t a = offset > d->off ? offset : d->off;
        uint64_t e = offset + bytes < d->off + d->bytes ? offset + bytes : d->off + d->bytes;
        if (a >= e)
            continue;
        size_t first = (size_t)((a - offset) / es), n = (size_t)((e - a) / es);
        size_t at = (size_t)((a - d->off) / es);
        if (d->kind != DEST_F32) {
            size_t des = d->kind == DEST_BF16 ? 2 : 1;   /* device bytes per element */
            if (cuda_check(cudaMemcpyAsync((uint8_t *)d->dev + at * des, p + des * first, n * des,
                                           cudaMemcpyHostToDevice, sk->s), "cudaMemcpyAsync (weights)", err) < 0)
                return tp_err_prefix(err, "tensor %s", tensor_name(sk, (int)tensor));
            sk->w->bytes += (double)(n * des);
            copied = true;
        } else {
            to_f32(d->host + at, p + first * es, n, dt);
        }
        d->got += e - a;
        if (d->kind == DEST_F32 && d->got == d->bytes) {
            /* tiny; pageable source, so a plain synchronous copy */
            if (tpc_upload(d->dev, d->host, (size_t)(d->bytes / es) * 4, err) < 0)
                return tp_err_prefix(err, "tensor %s", tensor_name(sk, (int)tensor));
            sk->w->bytes += (double)(d->bytes / es * 4);
        }
    }
    if (copied) {
        if (cuda_check(cudaEventRecord(sk->done[b], sk->s), "cudaEventRecord", err) < 0)
            return -1;
        sk->state[b] = BUF_COPYING;
    }
    return 0;
}

static size_t stage_count(const tp_loaded_rank *lr)
{
    long threads = lr->threads;
    if (threads <= 0)
        threads = sysconf(_SC_NPROCESSORS_ONLN);
    size_t n = threads > 0 ? (size_t)threads + 2 : STAGE_MIN;
    return n < STAGE_MIN ? STAGE_MIN : n > STAGE_MAX ? STAGE_MAX : n;
}

int tpcw_upload(tpcw_weights *w, const tpcm_desc *d, tpc_stream s, tp_err *err)
{
    memset(w, 0, sizeof *w);
    double t0 = tp_now();
    sink sk;
    memset(&sk, 0, sizeof sk);
    sk.w = w;
    sk.s = (cudaStream_t)s;
    sk.lr = d->lr;
    tp_stream_opts so = {};
    tp_stream_stats stats = {};
    if (!d->lr) {
        tp_errorf(err, "weights upload: no loaded rank");
        goto fail;
    }
    so.verify = d->lr->verify;
    so.threads = d->lr->threads;
    so.quiet = d->lr->quiet;
    so.piece_bytes = STAGE_PIECE;
    w->layers = (tpcw_layer *)calloc((size_t)d->cfg->n_layers, sizeof *w->layers);
    w->n_layers = w->layers ? d->cfg->n_layers : 0;
    if (!w->layers) {
        tp_errorf(err, "out of memory");
        goto fail;
    }
    if (plan(&sk, d, err) < 0)
        goto fail;
    so.select = sk.select;
    if (stage_open(&sk, stage_count(d->lr), tp_load_stream_max_piece(d->lr, &so), err) < 0)
        goto fail;
    {
        tp_stream_sink ops = {};
        ops.acquire = sink_acquire;
        ops.deliver = sink_deliver;
        ops.release = sink_release;
        ops.max_held = sk.n_bufs;
        if (tp_load_stream(d->lr, &ops, &sk, &so, &stats, err) < 0 || tpc_sync(s, err) < 0)
            goto fail;
    }
    for (size_t i = 0; i < sk.n_dests; i++)
        if (sk.dests[i].got != sk.dests[i].bytes) {
            tp_errorf(err, "weights upload: tensor %s: %llu of %llu bytes arrived", tensor_name(&sk, sk.dests[i].tensor),
                      (unsigned long long)sk.dests[i].got, (unsigned long long)sk.dests[i].bytes);
            goto fail;
        }
    w->seconds = tp_now() - t0;
    w->source_bytes = (double)stats.bytes;
    sink_close(&sk);
    return 0;
fail:
    cudaStreamSynchronize((cudaStream_t)s);   /* no copy may still read the staging buffers */
    sink_close(&sk);
    tpcw_free(w);
    return -1;
}

void tpcw_free(tpcw_weights *w)
{
    tpc_allocs_free(&w->owned);
    for (int l = 0; w->layers && l < w->n_layers; l++)
        if (w->layers[l].moe) {
            tpcw_moe *m = w->layers[l].moe;
            free(m->gate); free(m->up); free(m->down);
            free(m);
        }
    free(w->layers);
    memset(w, 0, sizeof *w);
}
