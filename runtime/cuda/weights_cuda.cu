/* weights_cuda.cu - a rank's weights onto the device (see weights_cuda.h).
 *
 * Today the source is the CPU model's fp32 copies (tpcm_desc): each matrix
 * is rounded back to bf16 (exact for a bf16 checkpoint) into one of two
 * pinned staging buffers while the other buffer's cudaMemcpyAsync runs.
 */
#include <cuda_runtime.h>

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "weights_cuda.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cuda_check(cudaError_t e, const char *what, tp_err *err)
{
    if (e == cudaSuccess)
        return 0;
    return tp_errorf(err, "%s: %s", what, cudaGetErrorString(e));
}

static int dev_alloc(tpcw_weights *w, void **p, size_t bytes, tp_err *err)
{
    *p = NULL;
    if (w->n_owned == w->cap_owned) {
        size_t cap = w->cap_owned ? w->cap_owned * 2 : 64;
        void **o = (void **)realloc(w->owned, cap * sizeof *o);
        if (!o)
            return tp_errorf(err, "out of memory");
        w->owned = o;
        w->cap_owned = cap;
    }
    if (tpc_malloc(p, bytes ? bytes : 1, "weights", err) < 0)
        return -1;
    w->owned[w->n_owned++] = *p;
    return 0;
}

/* Round to nearest even, as torch's .to(torch.bfloat16) (NaN stays NaN). */
static void f32_to_bf16(uint16_t *dst, const float *src, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &src[i], 4);
        if ((u & 0x7fffffffu) > 0x7f800000u)
            dst[i] = (uint16_t)((u >> 16) | 0x40);
        else
            dst[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
}

#define STAGE_BYTES ((size_t)8 << 20)

typedef struct stager {
    void *buf[2];
    cudaEvent_t done[2];
    int next;
} stager;

static int stager_open(stager *st, tp_err *err)
{
    memset(st, 0, sizeof *st);
    for (int i = 0; i < 2; i++) {
        if (cuda_check(cudaMallocHost(&st->buf[i], STAGE_BYTES), "cudaMallocHost (staging)", err) < 0 ||
            cuda_check(cudaEventCreateWithFlags(&st->done[i], cudaEventDisableTiming), "cudaEventCreate",
                       err) < 0)
            return -1;
    }
    return 0;
}

static void stager_close(stager *st)
{
    for (int i = 0; i < 2; i++) {
        if (st->done[i])
            cudaEventDestroy(st->done[i]);
        if (st->buf[i])
            cudaFreeHost(st->buf[i]);
    }
}

/* Copies count fp32 host values to dst as bf16 (as_bf16) or fp32, chunk by
 * chunk: while chunk i's copy runs, the host fills the other buffer. */
static int stage_copy(tpcw_weights *w, tpc_stream s, stager *st, void *dst, const float *src, size_t count, bool as_bf16,
                      tp_err *err)
{
    size_t esz = as_bf16 ? 2 : 4, per = STAGE_BYTES / esz;
    for (size_t off = 0; off < count; off += per) {
        size_t c = count - off < per ? count - off : per;
        int b = st->next;
        st->next ^= 1;
        if (cuda_check(cudaEventSynchronize(st->done[b]), "upload", err) < 0)
            return -1;
        if (as_bf16)
            f32_to_bf16((uint16_t *)st->buf[b], src + off, c);
        else
            memcpy(st->buf[b], src + off, c * 4);
        if (cuda_check(cudaMemcpyAsync((char *)dst + off * esz, st->buf[b], c * esz, cudaMemcpyHostToDevice,
                                       (cudaStream_t)s), "cudaMemcpyAsync (weights)", err) < 0 ||
            cuda_check(cudaEventRecord(st->done[b], (cudaStream_t)s), "cudaEventRecord", err) < 0)
            return -1;
        w->bytes += (double)(c * esz);
    }
    return 0;
}

static int up_mat(tpcw_weights *w, tpc_stream s, stager *st, uint16_t **dst, const float *src, size_t count, tp_err *err)
{
    *dst = NULL;
    if (!src)
        return 0;
    if (dev_alloc(w, (void **)dst, count * 2, err) < 0)
        return -1;
    return stage_copy(w, s, st, *dst, src, count, true, err);
}

static int up_vec(tpcw_weights *w, tpc_stream s, stager *st, float **dst, const float *src, size_t count, tp_err *err)
{
    *dst = NULL;
    if (!src)
        return 0;
    if (dev_alloc(w, (void **)dst, count * 4, err) < 0)
        return -1;
    return stage_copy(w, s, st, *dst, src, count, false, err);
}

static int upload_layer(tpcw_weights *w, tpc_stream s, stager *st, const tpcm_desc *d, const tp_layer_weights *src,
                        tpcw_layer *L, tp_err *err)
{
    size_t H = d->cfg->hidden, hd = d->cfg->head_dim, qd = d->lq * hd, kd = d->lkv * hd, I = d->li;
    L->window = src->window;
    return up_vec(w, s, st, &L->attn_norm, src->attn_norm, H, err) < 0 ||
                   up_vec(w, s, st, &L->ffn_norm, src->ffn_norm, H, err) < 0 ||
                   up_vec(w, s, st, &L->q_norm, src->q_norm, hd, err) < 0 ||
                   up_vec(w, s, st, &L->k_norm, src->k_norm, hd, err) < 0 ||
                   up_mat(w, s, st, &L->wq, src->wq, qd * H, err) < 0 ||
                   up_mat(w, s, st, &L->wk, src->wk, kd * H, err) < 0 ||
                   up_mat(w, s, st, &L->wv, src->wv, kd * H, err) < 0 ||
                   up_mat(w, s, st, &L->wo, src->wo, H * qd, err) < 0 ||
                   up_vec(w, s, st, &L->bq, src->bq, qd, err) < 0 || up_vec(w, s, st, &L->bk, src->bk, kd, err) < 0 ||
                   up_vec(w, s, st, &L->bv, src->bv, kd, err) < 0 || up_vec(w, s, st, &L->bo, src->bo, H, err) < 0 ||
                   up_mat(w, s, st, &L->wgate, src->wgate, I * H, err) < 0 ||
                   up_mat(w, s, st, &L->wup, src->wup, I * H, err) < 0 ||
                   up_mat(w, s, st, &L->wdown, src->wdown, H * I, err) < 0 ||
                   up_vec(w, s, st, &L->bgate, src->bgate, I, err) < 0 ||
                   up_vec(w, s, st, &L->bup, src->bup, I, err) < 0 ||
                   up_vec(w, s, st, &L->bdown, src->bdown, H, err) < 0
               ? -1
               : 0;
}


int tpcw_upload(tpcw_weights *w, const tpcm_desc *d, tpc_stream s, tp_err *err)
{
    memset(w, 0, sizeof *w);
    const tp_model_config *c = d->cfg;
    size_t H = c->hidden;
    stager st;
    if (stager_open(&st, err) < 0)
        goto fail;
    w->layers = (tpcw_layer *)calloc((size_t)c->n_layers, sizeof *w->layers);
    if (!w->layers) {
        tp_errorf(err, "out of memory");
        goto fail;
    }
    {
        double t0 = now_s();
        if (up_mat(w, s, &st, &w->embed, d->embed, (size_t)(d->emb_end - d->emb_start) * H, err) < 0 ||
            up_vec(w, s, &st, &w->final_norm, d->final_norm, H, err) < 0)
            goto fail;
        if (d->lm_w == d->embed && d->lm_start == d->emb_start && d->lm_end == d->emb_end) {
            w->lm_w = w->embed;   /* tied, same rows: share */
        } else if (up_mat(w, s, &st, &w->lm_w, d->lm_w, (size_t)(d->lm_end - d->lm_start) * H, err) < 0) {
            goto fail;
        }
        for (int l = 0; l < c->n_layers; l++)
            if (upload_layer(w, s, &st, d, &d->layers[l], &w->layers[l], err) < 0) {
                tp_err_prefix(err, "layer %d upload", l);
                goto fail;
            }
        if (tpc_sync(s, err) < 0)
            goto fail;
        w->seconds = now_s() - t0;
    }
    stager_close(&st);
    return 0;
fail:
    if (s)
        cudaStreamSynchronize((cudaStream_t)s);   /* no copy may still read the staging buffers */
    stager_close(&st);
    tpcw_free(w);
    return -1;
}

void tpcw_free(tpcw_weights *w)
{
    for (size_t i = 0; i < w->n_owned; i++)
        tpc_free(w->owned[i]);
    free(w->owned);
    free(w->layers);
    memset(w, 0, sizeof *w);
}
