/* model_cuda.cu - a rank's model on a CUDA device: the forward pass of
 * model.c with the kernels of kernels_cuda.cu and cuBLAS bf16 GEMMs.
 *
 * Weights: weights_cuda.cu puts them on the device (big matrices bf16,
 * norms and biases fp32); the RoPE tables are fp32 too.  Activations
 * and the KV cache are fp32 ([slot][layer][lkv][max_seq][head_dim], as the
 * CPU: one allocation for every sequence slot; the single-sequence pass
 * runs in slot 0).
 * All-reduces: with the nccl backend on device pointers on its stream; with
 * any other backend (single, tcp, mpi) staged through pinned host memory
 * (D2H, host collective, H2D).  Logits: tpcm_forward copies the local
 * vocabulary slice to the host and all-gathers it there (the CPU model's
 * contract, for --logits); tpcm_forward_pick picks the next token on the
 * device and brings back only its id.
 * Decode steps (one token) run as a CUDA graph when the all-reduces can be
 * captured (tp 1, or the nccl backend in enqueue-only mode): the first step
 * captures embedding, layers, lm_head slice and the pick (greedy: argmax,
 * all-gather of the winners, their combination; sampling: all-gather of
 * the logits, tpc_sample_devu, rank 0's id broadcast); later steps copy the
 * fed id, the position and the uniform into device memory and replay it.
 * Prefill and the staged backends launch kernel by kernel.
 * A batched step (tpcm_forward_batch: several slots' tokens, prefill chunks
 * and decode tokens mixed) runs the same layers over all its tokens, with
 * per-token slot, position and RoPE rows on the device for the KV append
 * and the attention (tpc_kv_append_batch, tpc_attention_batch), then the
 * lm_head over the rows that want logits only.  A pure-decode batched step
 * (one token a slot, logits for each) has shapes that depend on its token
 * count alone: it is padded up to a bucket of 1, 2, 4, ... tokens (padding
 * rows have no slot: they write no cache and their logits are dropped) and
 * replays that bucket's graph, captured the first time the bucket is used,
 * when the decode graph is usable; mixed steps and steps past the largest
 * bucket run kernel by kernel.
 */
#include <cuda_runtime.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels_cuda.h"
extern "C" {
#include "kernels_cpu.h"   /* a C header without extern "C" of its own */
}
#include "model_cuda.h"
#include "weights_cuda.h"

/* Buckets of the batched decode graphs: 1, 2, 4, ... 2^(TPCM_BATCH_BUCKETS-1)
 * tokens, so that a server holds at most this many graphs. */
#define TPCM_BATCH_BUCKETS 8

struct tpcm_model {
    tp_model_config cfg;
    tp_comm *comm;
    int rank, world, lq, lkv, li, group, max_seq, slots, device;
    size_t slot_stride;         /* floats between two slots' caches */
    bool nccl, own_stream;
    tpc_stream s;
    tpc_blas blas;

    tpcw_weights w;             /* on the device (weights_cuda.cu) */
    int64_t emb_start, emb_end, lm_start, lm_end;
    int64_t *lm_ranges;
    int vocab_slot;
    tpc_allocs owned;           /* device allocations besides the weights */

    float *kcache, *vcache, *cos_t, *sin_t;   /* caches: slots * slot_stride floats each */
    /* dynamic / longrope (tpk_rope_per_pass): the host tables whose rows
     * each pass recomputes and copies to cos_t / sin_t; NULL otherwise */
    float *host_cos, *host_sin, *host_inv;
    int cap_n;
    float *x, *h, *q, *k, *v, *att, *o, *gate, *up, *logit_slot;
    uint16_t *xb;               /* bf16 activations for the GEMMs */
    int32_t *ids;
    void *dec_ws;
    size_t dec_ws_bytes;
    float *host_stage;          /* pinned: cap_n * hidden floats (staged all-reduce) */
    float *host_slot, *host_all;/* pinned / host logits slices */

    /* Picking the next token on the device (tpcm_forward_pick). */
    tpc_argmax_result *best, *best_all;   /* this rank's winner; every rank's (nccl) */
    tpc_argmax_result *host_best;         /* pinned: world winners */
    float *logits_all;          /* device: world * vocab_slot (nccl all-gather) */
    float *vocab_logits;        /* device: the full vocabulary, for sampling */
    float *sample_ws;           /* device: vocab floats, tpc_sample's workspace */
    uint16_t *wq_ws;            /* device: the largest 8-bit matrix dequantized to bf16 (prefill) */
    int32_t *next_id, *host_next;         /* device / pinned: the picked id */

    /* The decode step as a CUDA graph (see the header comment). */
    int32_t *pos_dev;           /* device: the position the graph reads */
    double *u_dev;              /* device: the sampling graph's uniform */
    int32_t *host_step;         /* pinned: [0] the id fed, [1] its position */
    double *host_u;             /* pinned: the uniform */
    tpc_graph greedy_graph;     /* NULL: not captured (yet) */
    tpc_graph sample_graph;     /* captured with sample_opts (kernel arguments) */
    tp_sampler_opts sample_opts;
    bool graph_usable;          /* tp 1 or nccl, and not turned off */
    char graph_note[160];       /* why graphs are off, for tpcm_describe */
    /* Pure-decode batched steps as graphs (see "batched decode graphs"):
     * batch_graph[b] replays a step of 2^b tokens (NULL: not captured yet),
     * for buckets up to batch_bucket_max tokens. */
    tpc_graph batch_graph[TPCM_BATCH_BUCKETS];
    int batch_bucket_max;

    /* Sparse layers (tpcw_moe): the largest expert count, top_k, local
     * expert rows and local expert count over the layers (0: dense model);
     * device buffers for the router and one expert's tokens, host buffers for
     * the routing, which is grouped by expert on the host
     * (tp_moe_group_by_expert) so that only the chosen experts run. */
    int moe_e, moe_k, moe_i, moe_nl;
    float *moe_logits, *moe_w, *moe_x, *moe_g, *moe_u, *moe_y, *moe_slot_w;
    int32_t *moe_idx, *moe_tok;
    int *host_idx, *host_count, *host_tok;
    float *host_w, *host_slot_w;

    /* A batched step (tpcm_forward_batch): per token its slot, position
     * and RoPE rows (device, and host staging), the rows that want logits
     * (their indices, their normalised hidden rows, this rank's logits of
     * them), for up to cap_batch tokens and cap_rows logit rows. */
    int cap_batch, cap_rows;
    int32_t *b_slot, *b_pos, *b_rows, *host_b;  /* host_b: [4][cap_batch] slot, pos, rows, ids */
    float *b_cos, *b_sin, *host_b_rope;         /* [cap_batch][head_dim / 2]; host: both tables */
    float *lm_in, *lm_out, *host_lm, *host_lm_all;  /* [rows][hidden], [rows][vocab_slot], host, world x host */

    char desc[512];
};

static int cuda_check(cudaError_t e, const char *what, tp_err *err)
{
    if (e == cudaSuccess)
        return 0;
    return tp_errorf(err, "%s: %s", what, cudaGetErrorString(e));
}

static int pick_device(const tpcm_desc *d, int *device, tp_err *err)
{
    int count = 0;
    if (tpc_device_count(&count, err) < 0)
        return -1;
    if (count <= 0)
        return tp_errorf(err, "device \"%s\": no CUDA device", d->device);
    int nccl_dev = tpc_comm_device(d->comm);
    if (nccl_dev >= 0) {
        *device = nccl_dev;   /* the nccl comm already chose */
        return 0;
    }
    int want = 0;
    if (strncmp(d->device, "cuda:", 5) == 0) {
        char *end;
        long v = strtol(d->device + 5, &end, 10);
        if (*end || end == d->device + 5 || v < 0)
            return tp_errorf(err, "device \"%s\": expected cuda or cuda:N", d->device);
        want = (int)v;
        if (want >= count)
            return tp_errorf(err, "device \"%s\": only %d CUDA device(s)", d->device, count);
    } else {
        const char *lr = getenv("LOCAL_RANK");
        if (!lr)
            lr = getenv("OMPI_COMM_WORLD_LOCAL_RANK");
        want = lr ? atoi(lr) % count : 0;   /* several ranks may share one GPU */
        if (want < 0)
            want = 0;
    }
    *device = want;
    return 0;
}

/* The buckets whose batched decode graph is captured now, as
 * " (batched decode graphs for 1 4 8 tokens)"; "" when none is. */
static void describe_buckets(const tpcm_model *g, char *buf, size_t len)
{
    size_t at = 0;
    buf[0] = 0;
    for (int b = 0; b < TPCM_BATCH_BUCKETS && at < len; b++)
        if (g->batch_graph[b])
            at += (size_t)snprintf(buf + at, len - at, "%s %d", at ? "" : " (batched decode graphs for", 1 << b);
    if (at && at < len)
        snprintf(buf + at, len - at, " tokens)");
}

static void update_desc(tpcm_model *g)
{
    char buckets[96];
    describe_buckets(g, buckets, sizeof buckets);
    snprintf(g->desc, sizeof g->desc, "cuda:%d, %.1f MB of weights uploaded at %.2f GB/s, all-reduce %s, %s%s",
             g->device, g->w.bytes / 1e6, g->w.seconds > 0 ? g->w.bytes / g->w.seconds / 1e9 : 0.0,
             g->nccl ? "nccl on device" : g->world > 1 ? "staged through host memory" : "none (tp 1)",
             g->graph_note, buckets);
}

/* Every graph (the decode step's and the batched buckets'): before the
 * buffers they were captured with are freed. */
static void drop_graphs(tpcm_model *g)
{
    tpc_graph_destroy(g->greedy_graph);
    tpc_graph_destroy(g->sample_graph);
    g->greedy_graph = g->sample_graph = NULL;
    bool had_batch = false;
    for (int b = 0; b < TPCM_BATCH_BUCKETS; b++) {
        had_batch |= g->batch_graph[b] != NULL;
        tpc_graph_destroy(g->batch_graph[b]);
        g->batch_graph[b] = NULL;
    }
    if (had_batch)
        update_desc(g);
}

/* The buffers of tpcm_forward_pick: a few vocabularies of floats. */
static int alloc_pick_buffers(tpcm_model *g, tp_err *err)
{
    size_t V = (size_t)g->cfg.vocab, W = (size_t)g->world;
    if (tpc_allocs_malloc(&g->owned, (void **)&g->best, sizeof *g->best, "token pick", err) < 0 ||
        tpc_allocs_malloc(&g->owned, (void **)&g->best_all, W * sizeof *g->best_all, "token pick", err) < 0 ||
        tpc_allocs_malloc(&g->owned, (void **)&g->logits_all, W * g->vocab_slot * 4, "logits", err) < 0 ||
        tpc_allocs_malloc(&g->owned, (void **)&g->vocab_logits, V * 4, "logits", err) < 0 ||
        tpc_allocs_malloc(&g->owned, (void **)&g->sample_ws, V * 4, "sampling workspace", err) < 0 ||
        tpc_allocs_malloc(&g->owned, (void **)&g->next_id, 4, "token pick", err) < 0 ||
        tpc_allocs_malloc(&g->owned, (void **)&g->pos_dev, 4, "position", err) < 0 ||
        tpc_allocs_malloc(&g->owned, (void **)&g->u_dev, sizeof(double), "sampling", err) < 0)
        return -1;
    return cuda_check(cudaMallocHost((void **)&g->host_best, W * sizeof *g->host_best), "cudaMallocHost", err) < 0 ||
                   cuda_check(cudaMallocHost((void **)&g->host_next, 4), "cudaMallocHost", err) < 0 ||
                   cuda_check(cudaMallocHost((void **)&g->host_step, 8), "cudaMallocHost", err) < 0 ||
                   cuda_check(cudaMallocHost((void **)&g->host_u, sizeof(double)), "cudaMallocHost", err) < 0
               ? -1
               : 0;
}

/* The largest sparse-layer dimensions, for the buffers (all 0: dense). */
static void moe_dims(tpcm_model *g)
{
    for (int l = 0; l < g->cfg.n_layers; l++) {
        const tpcw_moe *m = g->w.layers[l].moe;
        if (!m)
            continue;
        const tp_moe_weights *sh = m->shape;
        int nl = sh->expert_hi - sh->expert_lo;
        g->moe_e = sh->n_experts > g->moe_e ? sh->n_experts : g->moe_e;
        g->moe_k = sh->top_k > g->moe_k ? sh->top_k : g->moe_k;
        g->moe_i = sh->inter > g->moe_i ? sh->inter : g->moe_i;
        g->moe_nl = nl > g->moe_nl ? nl : g->moe_nl;
    }
}

static void free_moe_buffers(tpcm_model *g)
{
    float **f[] = { &g->moe_logits, &g->moe_w, &g->moe_x, &g->moe_g, &g->moe_u, &g->moe_y, &g->moe_slot_w };
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) {
        tpc_free(*f[i]);
        *f[i] = NULL;
    }
    tpc_free(g->moe_idx); tpc_free(g->moe_tok);
    g->moe_idx = g->moe_tok = NULL;
    free(g->host_idx); free(g->host_count); free(g->host_tok); free(g->host_w); free(g->host_slot_w);
    g->host_idx = g->host_count = g->host_tok = NULL;
    g->host_w = g->host_slot_w = NULL;
}

/* The sparse layers' buffers for n tokens (nothing for a dense model). */
static int alloc_moe_buffers(tpcm_model *g, int n, tp_err *err)
{
    free_moe_buffers(g);
    if (g->moe_e == 0)
        return 0;
    size_t N = (size_t)n, NK = N * g->moe_k, H = g->cfg.hidden, I = g->moe_i;
    if (tpc_malloc((void **)&g->moe_logits, N * g->moe_e * 4, "router logits", err) < 0 ||
        tpc_malloc((void **)&g->moe_w, NK * 4, "routing", err) < 0 ||
        tpc_malloc((void **)&g->moe_idx, NK * 4, "routing", err) < 0 ||
        tpc_malloc((void **)&g->moe_tok, NK * 4, "routing", err) < 0 ||
        tpc_malloc((void **)&g->moe_slot_w, NK * 4, "routing", err) < 0 ||
        tpc_malloc((void **)&g->moe_x, N * H * 4, "expert activations", err) < 0 ||
        tpc_malloc((void **)&g->moe_y, N * H * 4, "expert activations", err) < 0 ||
        tpc_malloc((void **)&g->moe_g, N * I * 4, "expert activations", err) < 0 ||
        tpc_malloc((void **)&g->moe_u, N * I * 4, "expert activations", err) < 0)
        return -1;
    g->host_idx = (int *)malloc(NK * sizeof(int));
    g->host_w = (float *)malloc(NK * sizeof(float));
    g->host_tok = (int *)malloc(NK * sizeof(int));
    g->host_slot_w = (float *)malloc(NK * sizeof(float));
    g->host_count = (int *)malloc(((size_t)g->moe_nl + 1) * sizeof(int));
    if (!g->host_idx || !g->host_w || !g->host_tok || !g->host_slot_w || !g->host_count)
        return tp_errorf(err, "out of memory");
    return 0;
}

/* Refuses, before allocating it, a KV cache (k and v of slots x max_seq
 * positions of every layer's local kv heads, fp32) larger than the device
 * memory still free once the weights are there; sets slot_stride. */
static int check_kv_fits(tpcm_model *g, tp_err *err)
{
    const tp_model_config *c = &g->cfg;
    size_t per_token = (size_t)c->n_layers * (size_t)g->lkv * (size_t)c->head_dim * sizeof(float);
    size_t each = 0, both = 0, free_b = 0, total_b = 0;
    bool ok = tp_mul_size(per_token, (size_t)g->max_seq, &each) && tp_mul_size(each, (size_t)g->slots, &each) &&
              tp_mul_size(each, 2, &both);
    if (cuda_check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo", err) < 0)
        return -1;
    if (!ok || both > free_b)
        return tp_errorf(err, "a KV cache of --max-batch %d x --max-seq %d positions x %zu bytes a token (%.3g GB) "
                         "exceeds the device's free memory (%.3g GB of %.3g GB after the weights): lower "
                         "--max-batch or --max-seq", g->slots, g->max_seq, 2 * per_token,
                         ok ? (double)both / 1e9 : INFINITY, (double)free_b / 1e9, (double)total_b / 1e9);
    g->slot_stride = (size_t)c->n_layers * (size_t)g->lkv * (size_t)g->max_seq * (size_t)c->head_dim;
    return 0;
}

/* The largest batched decode bucket for a model of `slots` slots: the
 * power of two that holds them all (a pure-decode step has one token a
 * slot), at most 2^(TPCM_BATCH_BUCKETS-1); larger steps run kernel by
 * kernel. */
static int largest_bucket(int slots)
{
    int b = 1;
    while (b < slots && b < 1 << (TPCM_BATCH_BUCKETS - 1))
        b *= 2;
    return b;
}

int tpcm_create(tpcm_model **out, const tpcm_desc *d, tp_err *err)
{
    *out = NULL;
    tpcm_model *g = (tpcm_model *)calloc(1, sizeof *g);
    if (!g)
        return tp_errorf(err, "out of memory");
    g->cfg = *d->cfg;
    g->comm = d->comm;
    g->rank = d->rank; g->world = d->world;
    g->lq = d->lq; g->lkv = d->lkv; g->li = d->li; g->group = d->group; g->max_seq = d->max_seq;
    g->slots = d->slots > 1 ? d->slots : 1;
    g->emb_start = d->emb_start; g->emb_end = d->emb_end;
    g->lm_start = d->lm_start; g->lm_end = d->lm_end; g->vocab_slot = d->vocab_slot;
    g->nccl = tpc_comm_stream(d->comm) != NULL;
    const tp_model_config *c = &g->cfg;
    size_t hd = c->head_dim, half = hd / 2;

    if (hd > TPC_MAX_HEAD_DIM || hd % 2) {
        tp_errorf(err, "head_dim %zu: the CUDA kernels take even head_dim up to %d", hd, TPC_MAX_HEAD_DIM);
        goto fail;
    }
    if (pick_device(d, &g->device, err) < 0 || tpc_set_device(g->device, err) < 0)
        goto fail;
    if (g->nccl) {
        g->s = tpc_comm_stream(d->comm);
    } else {
        if (tpc_stream_create(&g->s, err) < 0)
            goto fail;
        g->own_stream = true;
    }
    if (tpc_blas_create(&g->blas, g->s, err) < 0)
        goto fail;
    g->lm_ranges = (int64_t *)malloc((size_t)g->world * 2 * sizeof *g->lm_ranges);
    if (!g->lm_ranges) {
        tp_errorf(err, "out of memory");
        goto fail;
    }
    memcpy(g->lm_ranges, d->lm_ranges, (size_t)g->world * 2 * sizeof *g->lm_ranges);

    if (tpcw_upload(&g->w, d, g->s, err) < 0 || check_kv_fits(g, err) < 0)
        goto fail;
    if (g->w.q8_max_elems &&
        tpc_allocs_malloc(&g->owned, (void **)&g->wq_ws, g->w.q8_max_elems * 2, "dequantized weights", err) < 0)
        goto fail;
    moe_dims(g);

    {
        size_t total = g->slot_stride * (size_t)g->slots;
        float *ct = (float *)malloc((size_t)g->max_seq * half * sizeof(float));
        float *sn = (float *)malloc((size_t)g->max_seq * half * sizeof(float));
        float *inv = (float *)malloc(half * sizeof(float));
        int rc = -1;
        if (ct && sn && inv) {
            /* the CPU's tables (kernels_cpu.c), what transformers builds at init */
            tpk_rope_rows(ct, sn, inv, (int)hd, &c->rope, 0, 0, g->max_seq);
            size_t tb = (size_t)g->max_seq * half * sizeof(float);
            rc = (tpc_allocs_malloc(&g->owned, (void **)&g->kcache, total * 4, "KV cache (--max-batch, --max-seq)",
                                    err) < 0 ||
                  tpc_allocs_malloc(&g->owned, (void **)&g->vcache, total * 4, "KV cache (--max-batch, --max-seq)",
                                    err) < 0 ||
                  tpc_allocs_malloc(&g->owned, (void **)&g->cos_t, tb, "rope table", err) < 0 ||
                  tpc_allocs_malloc(&g->owned, (void **)&g->sin_t, tb, "rope table", err) < 0 ||
                  tpc_upload(g->cos_t, ct, tb, err) < 0 || tpc_upload(g->sin_t, sn, tb, err) < 0 ||
                  tpc_allocs_malloc(&g->owned, (void **)&g->logit_slot, (size_t)g->vocab_slot * 4, "logits", err) < 0)
                     ? -1 : 0;
        } else {
            tp_errorf(err, "out of memory");
        }
        if (rc == 0 && tpk_rope_per_pass(&c->rope)) {
            g->host_cos = ct; g->host_sin = sn; g->host_inv = inv;   /* kept for refresh_rope */
        } else {
            free(ct); free(sn); free(inv);
        }
        if (rc < 0)
            goto fail;
    }
    if (cuda_check(cudaMallocHost((void **)&g->host_slot, (size_t)g->vocab_slot * 4), "cudaMallocHost", err) < 0)
        goto fail;
    g->host_all = (float *)malloc((size_t)g->vocab_slot * g->world * sizeof(float));
    if (!g->host_all) {
        tp_errorf(err, "out of memory");
        goto fail;
    }
    if (alloc_pick_buffers(g, err) < 0)
        goto fail;
    if (g->nccl)
        tpc_comm_set_enqueue_only(g->comm, true);   /* waits happen in wait_stream */
    /* sparse layers bring the routing to the host each step: not capturable */
    g->graph_usable = !d->no_graph && (g->world == 1 || g->nccl) && g->moe_e == 0;
    g->batch_bucket_max = largest_bucket(g->slots);
    snprintf(g->graph_note, sizeof g->graph_note, "%s",
             g->graph_usable ? "decode as a CUDA graph"
             : d->no_graph   ? "no CUDA graph (turned off)"
             : g->moe_e      ? "no CUDA graph (sparse layers route on the host)"
                             : "no CUDA graph (the staged all-reduce runs on the host)");
    update_desc(g);
    *out = g;
    return 0;
fail:
    tpcm_free(g);
    return -1;
}

static void free_batch_buffers(tpcm_model *g)
{
    tpc_free(g->b_slot); tpc_free(g->b_pos); tpc_free(g->b_rows); tpc_free(g->b_cos); tpc_free(g->b_sin);
    g->b_slot = g->b_pos = g->b_rows = NULL;
    g->b_cos = g->b_sin = NULL;
    free(g->host_b); free(g->host_b_rope);
    g->host_b = NULL;
    g->host_b_rope = NULL;
    g->cap_batch = 0;
}

static void free_logit_rows(tpcm_model *g)
{
    tpc_free(g->lm_in); tpc_free(g->lm_out);
    g->lm_in = g->lm_out = NULL;
    free(g->host_lm); free(g->host_lm_all);
    g->host_lm = g->host_lm_all = NULL;
    g->cap_rows = 0;
}

void tpcm_free(tpcm_model *g)
{
    if (!g)
        return;
    if (g->s)
        cudaStreamSynchronize((cudaStream_t)g->s);
    tpc_allocs_free(&g->owned);
    tpcw_free(&g->w);
    tpc_free(g->x); tpc_free(g->h); tpc_free(g->q); tpc_free(g->k); tpc_free(g->v);
    tpc_free(g->att); tpc_free(g->o); tpc_free(g->gate); tpc_free(g->up); tpc_free(g->xb);
    tpc_free(g->ids); tpc_free(g->dec_ws);
    free_moe_buffers(g);
    free_batch_buffers(g);
    free_logit_rows(g);
    if (g->host_stage)
        cudaFreeHost(g->host_stage);
    if (g->host_slot)
        cudaFreeHost(g->host_slot);
    if (g->host_best)
        cudaFreeHost(g->host_best);
    if (g->host_next)
        cudaFreeHost(g->host_next);
    if (g->host_step)
        cudaFreeHost(g->host_step);
    if (g->host_u)
        cudaFreeHost(g->host_u);
    drop_graphs(g);
    free(g->host_all);
    free(g->host_cos); free(g->host_sin); free(g->host_inv);
    free(g->lm_ranges);
    if (g->blas)
        tpc_blas_destroy(g->blas);
    if (g->own_stream)
        tpc_stream_destroy(g->s);
    free(g);
}

void tpcm_upload_stats(const tpcm_model *g, double *bytes, double *seconds)
{
    *bytes = g->w.bytes;
    *seconds = g->w.seconds;
}

const char *tpcm_describe(const tpcm_model *g) { return g->desc; }

/* ---------------------------------------------------------- forward pass */

static int ensure_buffers(tpcm_model *g, int n, tp_err *err)
{
    if (n <= g->cap_n)
        return 0;
    const tp_model_config *c = &g->cfg;
    size_t H = c->hidden, qd = (size_t)g->lq * c->head_dim, kd = (size_t)g->lkv * c->head_dim,
           I = (size_t)g->li, widest = H > qd ? H : qd;
    if (I > widest)
        widest = I;
    if ((size_t)g->moe_i > widest)
        widest = (size_t)g->moe_i;
    struct { float **p; size_t per_row; } bufs[] = {
        { &g->x, H }, { &g->h, H }, { &g->q, qd }, { &g->k, kd }, { &g->v, kd },
        { &g->att, qd }, { &g->o, H }, { &g->gate, I }, { &g->up, I },
    };
    drop_graphs(g);   /* they hold the old pointers */
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        tpc_free(*bufs[i].p);
        *bufs[i].p = NULL;
        if (tpc_malloc((void **)bufs[i].p, (size_t)n * bufs[i].per_row * 4, "activations", err) < 0)
            return -1;
    }
    tpc_free(g->xb); g->xb = NULL;
    tpc_free(g->ids); g->ids = NULL;
    tpc_free(g->dec_ws); g->dec_ws = NULL;
    if (g->host_stage)
        cudaFreeHost(g->host_stage);
    g->host_stage = NULL;
    g->dec_ws_bytes = tpc_attention_decode_workspace(n, g->lq, c->head_dim);
    if (tpc_malloc((void **)&g->xb, (size_t)n * widest * 2, "activations", err) < 0 ||
        tpc_malloc((void **)&g->ids, (size_t)n * 4, "token ids", err) < 0 ||
        tpc_malloc(&g->dec_ws, g->dec_ws_bytes, "attention workspace", err) < 0 ||
        cuda_check(cudaMallocHost((void **)&g->host_stage, (size_t)n * H * 4), "cudaMallocHost", err) < 0 ||
        alloc_moe_buffers(g, n, err) < 0)
        return -1;
    g->cap_n = n;
    return 0;
}

/* Waits for the model's stream: under the nccl comm's watchdog when the
 * stream carries enqueue-only collectives (a dead peer is a timeout naming
 * the rank, not a hang), else tpc_sync. */
static int wait_stream(tpcm_model *g, tp_err *err)
{
    return g->nccl ? tpc_comm_wait(g->comm, err) : tpc_sync(g->s, err);
}

/* Sum of buf over the ranks: nccl on the device, else through host memory. */
static int allreduce(tpcm_model *g, float *buf, size_t n, tp_err *err)
{
    if (g->world == 1)
        return 0;
    if (g->nccl)
        return g->comm->ops->allreduce_sum_f32(g->comm, buf, n, err);
    cudaStream_t s = (cudaStream_t)g->s;
    if (cuda_check(cudaMemcpyAsync(g->host_stage, buf, n * 4, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync", err) < 0 ||
        tpc_sync(g->s, err) < 0 ||
        g->comm->ops->allreduce_sum_f32(g->comm, g->host_stage, n, err) < 0 ||
        cuda_check(cudaMemcpyAsync(buf, g->host_stage, n * 4, cudaMemcpyHostToDevice, s), "cudaMemcpyAsync", err) < 0)
        return -1;
    /* the next collective reuses host_stage: the copy must have read it */
    return tpc_sync(g->s, err);
}

static int gemm(tpcm_model *g, float *y, const float *x, const tpcw_mat &w, const float *b, int n, int in,
                int out, tp_err *err)
{
    if (w.q8.w)   /* 8-bit: the GEMV for decode, dequantized to bf16 into wq_ws for prefill */
        return tpc_gemm_q8(g->blas, y, x, g->xb, w.q8, g->wq_ws, b, n, in, out, g->s, err);
    return tpc_gemm_bf16(g->blas, y, x, g->xb, w.bf16, b, n, in, out, g->s, err);
}

/* A batched step's RoPE, KV append and attention of layer l (the q, k, v
 * of its n tokens in g->q, g->k, g->v; slot 0's cache of layer l at
 * kv_off): each token with its own RoPE rows (b_cos / b_sin row t), slot
 * and position (b_slot, b_pos). */
static int batch_attention(tpcm_model *g, int l, int n, size_t kv_off, float scale, tp_err *err)
{
    const tp_model_config *c = &g->cfg;
    const tpcw_layer *L = &g->w.layers[l];
    int hd = c->head_dim, qd = g->lq * hd, kd = g->lkv * hd;
    return tpc_head_norm_rope(g->q, c->qk_norm ? L->q_norm : NULL, n, g->lq, hd, (size_t)qd, 0, g->b_cos, g->b_sin,
                              c->rms_eps, g->s, err) < 0 ||
                   tpc_head_norm_rope(g->k, c->qk_norm ? L->k_norm : NULL, n, g->lkv, hd, (size_t)kd, 0, g->b_cos,
                                      g->b_sin, c->rms_eps, g->s, err) < 0 ||
                   tpc_kv_append_batch(g->kcache + kv_off, g->vcache + kv_off, g->slot_stride, g->slots, g->max_seq,
                                       g->k, g->v, (size_t)kd, n, g->lkv, hd, g->b_slot, g->b_pos, g->s, err) < 0 ||
                   tpc_attention_batch(g->att, (size_t)qd, g->q, (size_t)qd, g->kcache + kv_off, g->vcache + kv_off,
                                       g->slot_stride, g->slots, g->max_seq, n, g->b_slot, g->b_pos, g->lq, g->lkv,
                                       hd, L->window, scale, g->dec_ws, g->dec_ws_bytes, g->s, err) < 0
               ? -1
               : 0;
}

/* The attention's output projection (g->att to g->o), its all-reduce and
 * bias. */
static int attention_out(tpcm_model *g, int l, int n, tp_err *err)
{
    const tpcw_layer *L = &g->w.layers[l];
    int H = g->cfg.hidden, qd = g->lq * g->cfg.head_dim;
    if (gemm(g, g->o, g->att, L->wo, NULL, n, qd, H, err) < 0)
        return -1;
    if (allreduce(g, g->o, (size_t)n * H, err) < 0)
        return tp_err_prefix(err, "layer %d attention all-reduce", l);
    return L->bo ? tpc_add_bias(g->o, L->bo, n, H, g->s, err) : 0;
}

/* pos_dev non-NULL (graph capture): the position is read on the device.
 * batched: the tokens of a batched step (batch_attention), pos ignored. */
static int attention_block(tpcm_model *g, int l, int n, int pos, const int32_t *pos_dev, bool batched, tp_err *err)
{
    const tp_model_config *c = &g->cfg;
    const tpcw_layer *L = &g->w.layers[l];
    int H = c->hidden, hd = c->head_dim, qd = g->lq * hd, kd = g->lkv * hd;
    size_t kv_off = (size_t)l * g->lkv * g->max_seq * hd;
    float scale = 1.0f / sqrtf((float)hd);
    if (gemm(g, g->q, g->h, L->wq, L->bq, n, H, qd, err) < 0 || gemm(g, g->k, g->h, L->wk, L->bk, n, H, kd, err) < 0 ||
        gemm(g, g->v, g->h, L->wv, L->bv, n, H, kd, err) < 0)
        return -1;
    if (batched) {
        if (batch_attention(g, l, n, kv_off, scale, err) < 0)
            return -1;
        return attention_out(g, l, n, err);
    }
    if (tpc_head_norm_rope_devpos(g->q, c->qk_norm ? L->q_norm : NULL, n, g->lq, hd, (size_t)qd, pos, pos_dev,
                                  g->cos_t, g->sin_t, c->rms_eps, g->s, err) < 0 ||
        tpc_head_norm_rope_devpos(g->k, c->qk_norm ? L->k_norm : NULL, n, g->lkv, hd, (size_t)kd, pos, pos_dev,
                                  g->cos_t, g->sin_t, c->rms_eps, g->s, err) < 0 ||
        tpc_kv_append_devpos(g->kcache + kv_off, g->vcache + kv_off, g->max_seq, g->k, g->v, (size_t)kd, n, g->lkv,
                             hd, pos, pos_dev, g->s, err) < 0)
        return -1;
    int rc = n == 1 ? tpc_attention_decode_devpos(g->att, (size_t)qd, g->q, (size_t)qd, g->kcache + kv_off,
                                                  g->vcache + kv_off, g->max_seq, n, pos, pos_dev, g->lq, g->lkv, hd,
                                                  L->window, scale, g->dec_ws, g->dec_ws_bytes, g->s, err)
                    : tpc_attention_prefill(g->att, (size_t)qd, g->q, (size_t)qd, g->kcache + kv_off,
                                            g->vcache + kv_off, g->max_seq, n, pos, g->lq, g->lkv, hd, L->window,
                                            scale, g->s, err);
    return rc < 0 ? -1 : attention_out(g, l, n, err);
}

/* One local expert over its m tokens (slots [lo, lo + m) of moe_tok /
 * moe_slot_w): gathered, down(silu(gate x) * up x), added into g->o with
 * each token's routing weight. */
static int run_expert(tpcm_model *g, const tpcw_moe *M, int e, int lo, int m, tp_err *err)
{
    int H = g->cfg.hidden, I = M->shape->inter;
    return tpc_gather_rows(g->moe_x, g->h, g->moe_tok + lo, m, H, g->s, err) < 0 ||
                   gemm(g, g->moe_g, g->moe_x, M->gate[e], NULL, m, H, I, err) < 0 ||
                   gemm(g, g->moe_u, g->moe_x, M->up[e], NULL, m, H, I, err) < 0 ||
                   tpc_silu_mul(g->moe_g, g->moe_u, (size_t)m * I, g->s, err) < 0 ||
                   gemm(g, g->moe_y, g->moe_g, M->down[e], NULL, m, I, H, err) < 0 ||
                   tpc_scatter_add_rows(g->o, g->moe_y, g->moe_tok + lo, g->moe_slot_w + lo, m, H, g->s, err) < 0
               ? -1
               : 0;
}

/* A sparse layer (runtime/moe.c on the device): router logits (fp32
 * activations, as the CPU: tpc_router_logits) and top-k on the device, the n * top_k choices to the host, grouped by local expert
 * there (tp_moe_group_by_expert, as the CPU), and each chosen local expert
 * run once over its tokens (a decode step reads only its top_k experts'
 * weights), then the MLP's all-reduce of the partial sums. */
static int moe_block(tpcm_model *g, int l, int n, tp_err *err)
{
    const tpcw_moe *M = g->w.layers[l].moe;
    const tp_moe_weights *sh = M->shape;
    int H = g->cfg.hidden, E = sh->n_experts, K = sh->top_k;
    size_t nk = (size_t)n * K;
    cudaStream_t s = (cudaStream_t)g->s;
    static_assert(sizeof(int) == sizeof(int32_t), "host and device expert ids share a layout");
    if (tpc_router_logits(g->moe_logits, g->h, M->router, n, E, H, g->s, err) < 0 ||
        tpc_router_topk(g->moe_idx, g->moe_w, g->moe_logits, n, E, K, sh->renorm, g->s, err) < 0 ||
        cuda_check(cudaMemcpyAsync(g->host_idx, g->moe_idx, nk * 4, cudaMemcpyDeviceToHost, s),
                   "cudaMemcpyAsync (routing)", err) < 0 ||
        cuda_check(cudaMemcpyAsync(g->host_w, g->moe_w, nk * 4, cudaMemcpyDeviceToHost, s),
                   "cudaMemcpyAsync (routing)", err) < 0 ||
        tpc_sync(g->s, err) < 0)
        return tp_err_prefix(err, "layer %d router", l);
    tp_moe_group_by_expert(sh, n, g->host_idx, g->host_w, g->host_count, g->host_tok, g->host_slot_w);
    int nl = sh->expert_hi - sh->expert_lo, routed = g->host_count[nl];
    /* pageable sources: read when cudaMemcpyAsync returns; rewritten only
     * after the next layer's tpc_sync */
    if ((routed > 0 &&
         (cuda_check(cudaMemcpyAsync(g->moe_tok, g->host_tok, (size_t)routed * 4, cudaMemcpyHostToDevice, s),
                     "cudaMemcpyAsync (routing)", err) < 0 ||
          cuda_check(cudaMemcpyAsync(g->moe_slot_w, g->host_slot_w, (size_t)routed * 4, cudaMemcpyHostToDevice, s),
                     "cudaMemcpyAsync (routing)", err) < 0)) ||
        cuda_check(cudaMemsetAsync(g->o, 0, (size_t)n * H * 4, s), "cudaMemsetAsync", err) < 0)
        return tp_err_prefix(err, "layer %d", l);
    for (int e = 0; e < nl; e++) {
        int lo = g->host_count[e], m = g->host_count[e + 1] - lo;
        if (m > 0 && run_expert(g, M, e, lo, m, err) < 0)   /* m == 0: never read */
            return tp_err_prefix(err, "layer %d expert %d", l, sh->expert_lo + e);
    }
    if (allreduce(g, g->o, (size_t)n * H, err) < 0)
        return tp_err_prefix(err, "layer %d moe all-reduce", l);
    return 0;
}

static int mlp_block(tpcm_model *g, int l, int n, tp_err *err)
{
    const tpcw_layer *L = &g->w.layers[l];
    int H = g->cfg.hidden;
    if (L->moe)
        return moe_block(g, l, n, err);
    if (gemm(g, g->gate, g->h, L->wgate, L->bgate, n, H, g->li, err) < 0 ||
        gemm(g, g->up, g->h, L->wup, L->bup, n, H, g->li, err) < 0 ||
        tpc_silu_mul(g->gate, g->up, (size_t)n * g->li, g->s, err) < 0 ||
        gemm(g, g->o, g->gate, L->wdown, NULL, n, g->li, H, err) < 0)
        return -1;
    if (allreduce(g, g->o, (size_t)n * H, err) < 0)
        return tp_err_prefix(err, "layer %d mlp all-reduce", l);
    return L->bdown ? tpc_add_bias(g->o, L->bdown, n, H, g->s, err) : 0;
}

/* The final norm of the last of n rows and this rank's slice of the
 * lm_head into logit_slot (device). */
static int logits_slice(tpcm_model *g, int n, tp_err *err)
{
    const tp_model_config *c = &g->cfg;
    int H = c->hidden, cnt = (int)(g->lm_end - g->lm_start);
    size_t last = (size_t)(n - 1) * H;
    if (tpc_add_rmsnorm(g->x + last, g->o + last, g->h + last, g->w.final_norm, 1, H, c->rms_eps, g->s, err) < 0)
        return -1;
    return cnt > 0 ? gemm(g, g->logit_slot, g->h + last, g->w.lm_w, NULL, 1, H, cnt, err) : 0;
}

/* Every rank's slice in host_all (slot r holds rank r's rows): the slice
 * comes back and is all-gathered on the host (host buffers: the nccl
 * backend stages them itself).  tp 1: host_slot holds the logits. */
static int logits_gather_host(tpcm_model *g, tp_err *err)
{
    int cnt = (int)(g->lm_end - g->lm_start);
    if (cnt > 0 && cuda_check(cudaMemcpyAsync(g->host_slot, g->logit_slot, (size_t)cnt * 4, cudaMemcpyDeviceToHost,
                                              (cudaStream_t)g->s), "cudaMemcpyAsync (logits)", err) < 0)
        return -1;
    if (wait_stream(g, err) < 0)
        return -1;
    for (int i = cnt; i < g->vocab_slot; i++)
        g->host_slot[i] = 0.0f;
    if (g->world > 1 &&
        g->comm->ops->allgather_f32(g->comm, g->host_slot, g->host_all, (size_t)g->vocab_slot, err) < 0)
        return tp_err_prefix(err, "logits all-gather");
    return 0;
}

/* The full logits on the host, in vocabulary order. */
static int logits_to_host(tpcm_model *g, float *logits, tp_err *err)
{
    if (logits_gather_host(g, err) < 0)
        return -1;
    if (g->world == 1) {
        memcpy(logits, g->host_slot, (size_t)(g->lm_end - g->lm_start) * sizeof(float));
        return 0;
    }
    for (int r = 0; r < g->world; r++) {
        int64_t s = g->lm_ranges[2 * r], e = g->lm_ranges[2 * r + 1];
        memcpy(logits + s, g->host_all + (size_t)r * g->vocab_slot, (size_t)(e - s) * sizeof(float));
    }
    return 0;
}

/* Embedding of the n ids in g->ids (device) and every layer, at position
 * pos, or *pos_dev when pos_dev is non-NULL; batched: each token at its own
 * slot and position (the b_* buffers, filled by tpcm_forward_batch). */
static int layers(tpcm_model *g, int n, int pos, const int32_t *pos_dev, bool batched, tp_err *err)
{
    const tp_model_config *c = &g->cfg;
    int H = c->hidden;
    if ((g->w.embed ? tpc_embedding(g->x, g->w.embed, g->ids, n, H, g->emb_start, g->emb_end, g->s, err)
                    : tpc_embedding_q8(g->x, g->w.embed_q8, g->ids, n, H, g->emb_start, g->emb_end, g->s,
                                       err)) < 0)
        return -1;
    if (!(g->emb_start == 0 && g->emb_end == c->vocab) && allreduce(g, g->x, (size_t)n * H, err) < 0)
        return tp_err_prefix(err, "embedding all-reduce");
    for (int l = 0; l < c->n_layers; l++) {
        if (tpc_add_rmsnorm(g->x, l ? g->o : NULL, g->h, g->w.layers[l].attn_norm, n, H, c->rms_eps, g->s, err) < 0 ||
            attention_block(g, l, n, pos, pos_dev, batched, err) < 0 ||
            tpc_add_rmsnorm(g->x, g->o, g->h, g->w.layers[l].ffn_norm, n, H, c->rms_eps, g->s, err) < 0 ||
            mlp_block(g, l, n, err) < 0)
            return -1;
    }
    return 0;
}

/* dynamic / longrope: the table rows of the pass over [pos, pos + n),
 * computed on the host as the CPU computes them (tpk_rope_rows) and copied
 * on the stream ahead of the pass.  The host rows are only rewritten after
 * the previous pass has been waited for. */
static int refresh_rope(tpcm_model *g, int n, int pos, tp_err *err)
{
    if (!g->host_cos)
        return 0;
    int hd = g->cfg.head_dim;
    size_t half = (size_t)hd / 2, off = (size_t)pos * half, bytes = (size_t)n * half * sizeof(float);
    tpk_rope_rows(g->host_cos, g->host_sin, g->host_inv, hd, &g->cfg.rope, pos + n, pos, n);
    cudaStream_t s = (cudaStream_t)g->s;
    if (cuda_check(cudaMemcpyAsync(g->cos_t + off, g->host_cos + off, bytes, cudaMemcpyHostToDevice, s),
                   "cudaMemcpyAsync (rope rows)", err) < 0 ||
        cuda_check(cudaMemcpyAsync(g->sin_t + off, g->host_sin + off, bytes, cudaMemcpyHostToDevice, s),
                   "cudaMemcpyAsync (rope rows)", err) < 0)
        return -1;
    return 0;
}

/* ids[0..n) (host) to the device, then layers() at pos. */
static int run_layers(tpcm_model *g, const int32_t *ids, int n, int pos, tp_err *err)
{
    if (tpc_set_device(g->device, err) < 0 || ensure_buffers(g, n, err) < 0 || refresh_rope(g, n, pos, err) < 0)
        return -1;
    /* ids is pageable: cudaMemcpyAsync has read it when it returns */
    if (cuda_check(cudaMemcpyAsync(g->ids, ids, (size_t)n * 4, cudaMemcpyHostToDevice, (cudaStream_t)g->s),
                   "cudaMemcpyAsync (ids)", err) < 0)
        return -1;
    return layers(g, n, pos, NULL, false, err);
}

int tpcm_forward(tpcm_model *g, const int32_t *ids, int n, int pos, float *logits, tp_err *err)
{
    if (run_layers(g, ids, n, pos, err) < 0)
        return -1;
    if (!logits)
        return wait_stream(g, err);
    return logits_slice(g, n, err) < 0 ? -1 : logits_to_host(g, logits, err);
}

/* ------------------------------------------------------- batched step */

/* The per-token buffers of a batched step of n tokens (device and host). */
static int ensure_batch_buffers(tpcm_model *g, int n, tp_err *err)
{
    if (n <= g->cap_batch)
        return 0;
    drop_graphs(g);   /* they hold the old pointers */
    free_batch_buffers(g);
    size_t N = (size_t)n, half = (size_t)g->cfg.head_dim / 2;
    if (tpc_malloc((void **)&g->b_slot, N * 4, "batch slots", err) < 0 ||
        tpc_malloc((void **)&g->b_pos, N * 4, "batch positions", err) < 0 ||
        tpc_malloc((void **)&g->b_rows, N * 4, "batch logit rows", err) < 0 ||
        tpc_malloc((void **)&g->b_cos, N * half * 4, "batch rope rows", err) < 0 ||
        tpc_malloc((void **)&g->b_sin, N * half * 4, "batch rope rows", err) < 0)
        return -1;
    g->host_b = (int32_t *)malloc(4 * N * sizeof(int32_t));
    g->host_b_rope = (float *)malloc(2 * N * half * sizeof(float));
    if (!g->host_b || !g->host_b_rope)
        return tp_errorf(err, "out of memory");
    g->cap_batch = n;
    return 0;
}

/* The buffers of rows logit rows: normalised hidden rows, this rank's
 * logits of them (device and host), every rank's (host). */
static int ensure_logit_rows(tpcm_model *g, int rows, tp_err *err)
{
    if (rows <= g->cap_rows)
        return 0;
    drop_graphs(g);   /* they hold the old pointers */
    free_logit_rows(g);
    size_t R = (size_t)rows, slot = (size_t)g->vocab_slot;
    if (tpc_malloc((void **)&g->lm_in, R * g->cfg.hidden * 4, "logit rows", err) < 0 ||
        tpc_malloc((void **)&g->lm_out, R * slot * 4, "logit rows", err) < 0)
        return -1;
    g->host_lm = (float *)malloc(R * slot * sizeof(float));
    g->host_lm_all = (float *)malloc(R * slot * g->world * sizeof(float));
    if (!g->host_lm || !g->host_lm_all)
        return tp_errorf(err, "out of memory for the logits of %d tokens", rows);
    g->cap_rows = rows;
    return 0;
}

/* Each token's RoPE rows into b_cos / b_sin (row t: token t), the part the
 * host does: for the rope types whose frequencies follow the pass (dynamic,
 * longrope) computed as the CPU's batched step computes them
 * (tpk_rope_rows_at with the length the token's slot reaches in this step)
 * and copied; nothing for the others (batch_rope_gather). */
static int batch_rope_host(tpcm_model *g, const tp_batch_token *t, int n, const int *slot_len_after, tp_err *err)
{
    if (!g->host_cos)
        return 0;
    int hd = g->cfg.head_dim;
    size_t half = (size_t)hd / 2;
    float *rc = g->host_b_rope, *rs = g->host_b_rope + (size_t)n * half;
    for (int i = 0; i < n; i++)
        tpk_rope_rows_at(rc + (size_t)i * half, rs + (size_t)i * half, g->host_inv, hd, &g->cfg.rope,
                         slot_len_after[t[i].slot], t[i].pos, 1);
    /* pageable: read when cudaMemcpyAsync returns */
    cudaStream_t s = (cudaStream_t)g->s;
    return cuda_check(cudaMemcpyAsync(g->b_cos, rc, (size_t)n * half * 4, cudaMemcpyHostToDevice, s),
                      "cudaMemcpyAsync (rope rows)", err) < 0 ||
                   cuda_check(cudaMemcpyAsync(g->b_sin, rs, (size_t)n * half * 4, cudaMemcpyHostToDevice, s),
                              "cudaMemcpyAsync (rope rows)", err) < 0
               ? -1
               : 0;
}

/* The other rope types' rows: the shared table's rows at the tokens'
 * positions (b_pos), gathered on the device (a graph can record it). */
static int batch_rope_gather(tpcm_model *g, int n, tp_err *err)
{
    int half = g->cfg.head_dim / 2;
    if (g->host_cos)
        return 0;   /* batch_rope_host copied them */
    return tpc_gather_rows(g->b_cos, g->cos_t, g->b_pos, n, half, g->s, err) < 0 ||
                   tpc_gather_rows(g->b_sin, g->sin_t, g->b_pos, n, half, g->s, err) < 0
               ? -1
               : 0;
}

/* The step's ids, slots and positions to the device, and the indices of
 * the tokens that want logits to b_rows; *rows: how many (0 when logits
 * are not asked for).  Tokens [n, padded) are padding (a batched decode
 * graph's bucket): slot -1, which the batched append and attention kernels
 * treat as no slot (nothing written, nothing read: the row's attention is
 * NaN, and stays in its own row through the row-wise GEMMs and norms), id
 * 0 and position 0 (valid rows of the embedding and rope tables); they want
 * logits when the real tokens do, and their rows are never read back. */
static int upload_batch(tpcm_model *g, const tp_batch_token *t, int n, int padded, bool want_logits, int *rows,
                        tp_err *err)
{
    size_t N = (size_t)padded;
    int32_t *slot = g->host_b, *pos = slot + N, *idx = pos + N, *ids = idx + N;
    int r = 0;
    for (int i = 0; i < padded; i++) {
        bool pad = i >= n;
        slot[i] = pad ? -1 : t[i].slot;
        pos[i] = pad ? 0 : t[i].pos;
        ids[i] = pad ? 0 : t[i].id;
        if (want_logits && (pad || t[i].logits))
            idx[r++] = i;
    }
    /* pageable: read when cudaMemcpyAsync returns */
    cudaStream_t s = (cudaStream_t)g->s;
    *rows = r;
    if (cuda_check(cudaMemcpyAsync(g->b_slot, slot, N * 4, cudaMemcpyHostToDevice, s), "cudaMemcpyAsync (slots)",
                   err) < 0 ||
        cuda_check(cudaMemcpyAsync(g->b_pos, pos, N * 4, cudaMemcpyHostToDevice, s), "cudaMemcpyAsync (positions)",
                   err) < 0 ||
        (r > 0 && cuda_check(cudaMemcpyAsync(g->b_rows, idx, (size_t)r * 4, cudaMemcpyHostToDevice, s),
                             "cudaMemcpyAsync (logit rows)", err) < 0))
        return -1;
    return cuda_check(cudaMemcpyAsync(g->ids, ids, N * 4, cudaMemcpyHostToDevice, s), "cudaMemcpyAsync (ids)", err);
}

/* The device half of the logits: the final norm of the step's n rows, the
 * `rows` rows that want logits gathered (b_rows), one lm_head product over
 * them into lm_out [rows][cnt].  ensure_logit_rows first. */
static int logit_rows_device(tpcm_model *g, int n, int rows, tp_err *err)
{
    const tp_model_config *c = &g->cfg;
    int H = c->hidden, cnt = (int)(g->lm_end - g->lm_start);
    return tpc_add_rmsnorm(g->x, g->o, g->h, g->w.final_norm, n, H, c->rms_eps, g->s, err) < 0 ||
                   tpc_gather_rows(g->lm_in, g->h, g->b_rows, rows, H, g->s, err) < 0 ||
                   (cnt > 0 && gemm(g, g->lm_out, g->lm_in, g->w.lm_w, NULL, rows, H, cnt, err) < 0)
               ? -1
               : 0;
}

/* The host half: the first `rows` rows of lm_out back, and the rows of
 * every rank put at their vocabulary columns in logits [rows][vocab]. */
static int logit_rows_host(tpcm_model *g, int rows, float *logits, tp_err *err)
{
    int cnt = (int)(g->lm_end - g->lm_start);
    size_t V = (size_t)g->cfg.vocab, slot = (size_t)g->vocab_slot;
    /* [rows][cnt] dense, then zeros up to rows * vocab_slot, as the CPU's lm_head */
    if (cnt > 0 && cuda_check(cudaMemcpyAsync(g->host_lm, g->lm_out, (size_t)rows * cnt * 4, cudaMemcpyDeviceToHost,
                                              (cudaStream_t)g->s), "cudaMemcpyAsync (logits)", err) < 0)
        return -1;
    if (wait_stream(g, err) < 0)
        return -1;
    if (g->world == 1) {
        memcpy(logits, g->host_lm, (size_t)rows * V * sizeof(float));
        return 0;
    }
    for (size_t i = (size_t)rows * (size_t)cnt; i < (size_t)rows * slot; i++)
        g->host_lm[i] = 0.0f;
    if (g->comm->ops->allgather_f32(g->comm, g->host_lm, g->host_lm_all, (size_t)rows * slot, err) < 0)
        return tp_err_prefix(err, "logits all-gather");
    for (int r = 0; r < g->world; r++) {
        int64_t a = g->lm_ranges[2 * r], e = g->lm_ranges[2 * r + 1];
        const float *part = g->host_lm_all + (size_t)r * rows * slot;
        for (int k = 0; k < rows; k++)
            memcpy(logits + (size_t)k * V + a, part + (size_t)k * (size_t)(e - a), (size_t)(e - a) * sizeof(float));
    }
    return 0;
}

/* The device work of a batched step of n tokens whose inputs are on the
 * device already (ids, b_slot, b_pos, b_rows; b_cos / b_sin for the rope
 * types the host computes): rope rows, layers, and the lm_head over `rows`
 * rows (0: none).  It reads nothing from the host: what a batched decode
 * graph records. */
static int batch_step_device(tpcm_model *g, int n, int rows, tp_err *err)
{
    if (batch_rope_gather(g, n, err) < 0 || layers(g, n, 0, NULL, true, err) < 0)
        return -1;
    return rows > 0 ? logit_rows_device(g, n, rows, err) : 0;
}

/* Graphs are off for this model from now on (tpcm_describe says why). */
static void graphs_off(tpcm_model *g, const char *what, const tp_err *why)
{
    g->graph_usable = false;
    snprintf(g->graph_note, sizeof g->graph_note, "%s capture failed (%.100s)", what, why->msg);
    update_desc(g);
}

/* Records body(g, arg) on the model's stream into *graph.  Nothing runs. */
typedef int (*graph_body)(tpcm_model *g, const void *arg, tp_err *err);
static int capture_graph(tpcm_model *g, graph_body body, const void *arg, tpc_graph *graph, tp_err *err)
{
    *graph = NULL;
    if (tpc_capture_begin(g->s, err) < 0)
        return -1;
    tp_err body_err;
    int rc = body(g, arg, &body_err);
    int end = tpc_capture_end(g->s, graph, err);   /* always ends the capture */
    if (rc < 0) {
        tpc_graph_destroy(*graph);
        *graph = NULL;
        *err = body_err;
        return -1;
    }
    return end;
}

/* ------------------------------------------------ batched decode graphs */

/* A batched step that a graph can replay: pure decode, i.e. every token
 * wants logits and is the only token of its slot (then the step's shapes
 * depend on n alone: the slots and positions are read from the device),
 * with graphs usable and n within the largest bucket.  Returns its bucket
 * (the power of two >= n), or 0: kernel by kernel. */
static int decode_bucket(const tpcm_model *g, const tp_batch_token *t, int n, const float *logits)
{
    if (!g->graph_usable || !logits || n < 1 || n > g->batch_bucket_max)
        return 0;
    for (int i = 0; i < n; i++) {
        if (!t[i].logits)
            return 0;
        for (int j = 0; j < i; j++)   /* n is at most a bucket: quadratic is nothing here */
            if (t[j].slot == t[i].slot)
                return 0;   /* two tokens of one slot: a prefill chunk */
    }
    int bucket = 1;
    while (bucket < n)
        bucket *= 2;
    return bucket;
}

static int bucket_index(int bucket)
{
    int b = 0;
    while ((1 << b) < bucket)
        b++;
    return b;
}

static int batch_graph_body(tpcm_model *g, const void *bucket, tp_err *err)
{
    int n = *(const int *)bucket;
    return batch_step_device(g, n, n, err);
}

/* A pure-decode step of n tokens by replaying the graph of its bucket
 * (captured the first time the bucket is used): the tokens and the padding
 * up to the bucket go to the fixed device buffers the graph reads, it runs,
 * and the n real rows of logits come back.  Returns 1 when the capture
 * failed: graphs are then off for this model and the caller runs the step
 * kernel by kernel. */
static int batch_step_graph(tpcm_model *g, const tp_batch_token *t, int n, int bucket, const int *slot_len_after,
                            float *logits, tp_err *err)
{
    int rows = 0, most = g->batch_bucket_max;
    /* every buffer first (none may be allocated or freed while capturing),
     * for the largest bucket: a larger bucket later would otherwise grow
     * them and drop the graphs captured so far */
    if (ensure_buffers(g, most, err) < 0 || ensure_batch_buffers(g, most, err) < 0 ||
        ensure_logit_rows(g, most, err) < 0 || upload_batch(g, t, n, bucket, true, &rows, err) < 0 ||
        batch_rope_host(g, t, n, slot_len_after, err) < 0)
        return -1;
    tpc_graph *graph = &g->batch_graph[bucket_index(bucket)];
    if (!*graph) {
        tp_err cap;
        if (capture_graph(g, batch_graph_body, &bucket, graph, &cap) < 0) {
            graphs_off(g, "batched decode graph", &cap);
            return 1;
        }
        update_desc(g);
    }
    if (tpc_graph_launch(*graph, g->s, err) < 0)
        return -1;
    return logit_rows_host(g, n, logits, err);
}

int tpcm_forward_batch(tpcm_model *g, const tp_batch_token *t, int n, const int *slot_len_after, float *logits,
                       tp_err *err)
{
    if (tpc_set_device(g->device, err) < 0)
        return -1;
    int bucket = decode_bucket(g, t, n, logits);
    if (bucket > 0) {
        int rc = batch_step_graph(g, t, n, bucket, slot_len_after, logits, err);
        if (rc <= 0)
            return rc;
    }
    int rows = 0;
    if (ensure_buffers(g, n, err) < 0 || ensure_batch_buffers(g, n, err) < 0 ||
        upload_batch(g, t, n, n, logits != NULL, &rows, err) < 0 ||
        ensure_logit_rows(g, rows, err) < 0 || batch_rope_host(g, t, n, slot_len_after, err) < 0 ||
        batch_step_device(g, n, rows, err) < 0)
        return -1;
    return rows == 0 ? wait_stream(g, err) : logit_rows_host(g, rows, logits, err);
}

/* ------------------------------------------------------------ token pick */

/* This rank's greedy winner of its lm_head slice into best (device); with no
 * rows here (more ranks than rows) a record that never wins. */
static int rank_winner(tpcm_model *g, tp_err *err)
{
    int cnt = (int)(g->lm_end - g->lm_start);
    if (cnt > 0)
        return tpc_argmax(g->best, g->logit_slot, cnt, (int32_t)g->lm_start, g->s, err);
    return tpc_set_i32((int32_t *)&g->best->value, (int32_t)0xff800000u /* -inf */, g->s, err) < 0 ||
                   tpc_set_i32(&g->best->id, (int32_t)g->lm_start, g->s, err) < 0
               ? -1
               : 0;
}

/* Every rank's logits slice (slot r of rows, world slots of vocab_slot
 * floats, on the device or the host as kind says) into vocab_logits at its
 * vocabulary rows. */
static int slices_to_vocab(tpcm_model *g, const float *rows, cudaMemcpyKind kind, tp_err *err)
{
    for (int r = 0; r < g->world; r++) {
        int64_t a = g->lm_ranges[2 * r], e = g->lm_ranges[2 * r + 1];
        if (e > a && cuda_check(cudaMemcpyAsync(g->vocab_logits + a, rows + (size_t)r * g->vocab_slot,
                                                (size_t)(e - a) * 4, kind, (cudaStream_t)g->s),
                                "cudaMemcpyAsync (logits)", err) < 0)
            return -1;
    }
    return 0;
}

/* The next token from logit_slot into next_id (device), o NULL: greedy,
 * without leaving the device: what a graph step records, and the eager
 * pick of tp 1 and nccl.  Greedy: every rank's best of its slice (tpc_argmax),
 * all-gathered (8 bytes per rank), combined (ties: the lowest id; NaN never
 * wins), which is exactly tp_sample's argmax over the gathered logits.
 * Sampling: the logits all-gathered and put in vocabulary order,
 * tpc_sample_devu with *u_dev, rank 0's id broadcast. */
static int pick_on_device(tpcm_model *g, const tp_sampler_opts *o, tp_err *err)
{
    int W = g->world;
    if (!o) {
        if (rank_winner(g, err) < 0)
            return -1;
        if (W > 1 && g->comm->ops->allgather_f32(g->comm, (const float *)g->best, (float *)g->best_all, 2, err) < 0)
            return tp_err_prefix(err, "token pick all-gather");
        return tpc_argmax_combine(g->next_id, W > 1 ? g->best_all : g->best, W, g->s, err);
    }
    const float *full = g->logit_slot;
    if (W > 1) {
        if (g->comm->ops->allgather_f32(g->comm, g->logit_slot, g->logits_all, (size_t)g->vocab_slot, err) < 0)
            return tp_err_prefix(err, "logits all-gather");
        if (slices_to_vocab(g, g->logits_all, cudaMemcpyDeviceToDevice, err) < 0)
            return -1;
        full = g->vocab_logits;
    }
    if (tpc_sample_devu(g->next_id, full, g->cfg.vocab, o->temperature, o->top_k, o->top_p, g->u_dev, g->sample_ws,
                        g->s, err) < 0)
        return -1;
    /* rank 0's draw for everybody, as on the CPU (device buffer: stays in the graph) */
    if (W > 1 && g->comm->ops->broadcast(g->comm, g->next_id, 4, 0, err) < 0)
        return tp_err_prefix(err, "token broadcast");
    return 0;
}

/* The staged backends (tcp, mpi at tp > 1): the collectives run on host
 * buffers, so what pick_on_device gathers on the device goes through the
 * host and back: greedy, the winners (then tpc_argmax_combine on the
 * device); sampling, the logits (then tpc_sample; rank 0's id broadcast). */
static int pick_staged(tpcm_model *g, const tp_sampler_opts *o, double u, int32_t *next, tp_err *err)
{
    cudaStream_t s = (cudaStream_t)g->s;
    int W = g->world;
    if (!o) {
        tpc_argmax_result own;
        if (rank_winner(g, err) < 0 ||
            cuda_check(cudaMemcpyAsync(g->host_best, g->best, sizeof own, cudaMemcpyDeviceToHost, s),
                       "cudaMemcpyAsync (token pick)", err) < 0 ||
            tpc_sync(g->s, err) < 0)
            return -1;
        own = g->host_best[0];
        if (g->comm->ops->allgather_f32(g->comm, (const float *)&own, (float *)g->host_best, 2, err) < 0)
            return tp_err_prefix(err, "token pick all-gather");
        if (cuda_check(cudaMemcpyAsync(g->best_all, g->host_best, W * sizeof own, cudaMemcpyHostToDevice, s),
                       "cudaMemcpyAsync (token pick)", err) < 0 ||
            tpc_argmax_combine(g->next_id, g->best_all, W, g->s, err) < 0)
            return -1;
    } else {
        if (logits_gather_host(g, err) < 0 || slices_to_vocab(g, g->host_all, cudaMemcpyHostToDevice, err) < 0 ||
            tpc_sample(g->next_id, g->vocab_logits, g->cfg.vocab, o->temperature, o->top_k, o->top_p, u,
                       g->sample_ws, g->s, err) < 0)
            return -1;
    }
    if (cuda_check(cudaMemcpyAsync(g->host_next, g->next_id, 4, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync (token)",
                   err) < 0 ||
        tpc_sync(g->s, err) < 0)
        return -1;
    int32_t id = *g->host_next;
    if (o && g->comm->ops->broadcast(g->comm, &id, sizeof id, 0, err) < 0)
        return tp_err_prefix(err, "token broadcast");
    *next = id;
    return 0;
}

/* The eager pick (prefill, --no-graph, and the staged backends). */
static int pick_eager(tpcm_model *g, const tp_sampler_opts *o, double u, int32_t *next, tp_err *err)
{
    if (g->world > 1 && !g->nccl)
        return pick_staged(g, o, u, next, err);
    cudaStream_t s = (cudaStream_t)g->s;
    *g->host_u = u;   /* pinned; rewritten only after this pick's wait */
    if ((o && cuda_check(cudaMemcpyAsync(g->u_dev, g->host_u, sizeof(double), cudaMemcpyHostToDevice, s),
                         "cudaMemcpyAsync (uniform)", err) < 0) ||
        pick_on_device(g, o, err) < 0 ||
        cuda_check(cudaMemcpyAsync(g->host_next, g->next_id, 4, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync (token)",
                   err) < 0 ||
        wait_stream(g, err) < 0)
        return -1;
    *next = *g->host_next;
    return 0;
}

/* ------------------------------------------------------ decode graph */

/* One decode step that reads everything that changes per token from device
 * memory (g->ids[0], *g->pos_dev, *g->u_dev) and leaves the picked id in
 * host_next: what a graph records. */
static int decode_step_body(tpcm_model *g, const tp_sampler_opts *o, tp_err *err)
{
    if (layers(g, 1, 0, g->pos_dev, false, err) < 0 || logits_slice(g, 1, err) < 0 || pick_on_device(g, o, err) < 0)
        return -1;
    return cuda_check(cudaMemcpyAsync(g->host_next, g->next_id, 4, cudaMemcpyDeviceToHost, (cudaStream_t)g->s),
                      "cudaMemcpyAsync (token)", err);
}

static int decode_graph_body(tpcm_model *g, const void *o, tp_err *err)
{
    return decode_step_body(g, (const tp_sampler_opts *)o, err);
}

static bool same_sampler(const tp_sampler_opts *a, const tp_sampler_opts *b)
{
    return a->temperature == b->temperature && a->top_k == b->top_k && a->top_p == b->top_p;
}

/* A decode step by graph replay (o NULL: greedy): the id fed, its position
 * and the uniform go to the device, the graph runs, the picked id comes
 * back.  Returns 1 when the capture failed: graphs are then off for this
 * model (tpcm_describe says why) and the caller runs the step eagerly. */
static int decode_step_graph(tpcm_model *g, int32_t id, int pos, const tp_sampler_opts *o, double u, int32_t *next,
                             tp_err *err)
{
    cudaStream_t s = (cudaStream_t)g->s;
    if (tpc_set_device(g->device, err) < 0 || ensure_buffers(g, 1, err) < 0 || refresh_rope(g, 1, pos, err) < 0)
        return -1;
    /* the pinned inputs are only rewritten after the previous step's wait */
    g->host_step[0] = id;
    g->host_step[1] = pos;
    *g->host_u = u;
    if (cuda_check(cudaMemcpyAsync(g->ids, &g->host_step[0], 4, cudaMemcpyHostToDevice, s), "cudaMemcpyAsync (id)",
                   err) < 0 ||
        cuda_check(cudaMemcpyAsync(g->pos_dev, &g->host_step[1], 4, cudaMemcpyHostToDevice, s),
                   "cudaMemcpyAsync (position)", err) < 0 ||
        (o && cuda_check(cudaMemcpyAsync(g->u_dev, g->host_u, sizeof(double), cudaMemcpyHostToDevice, s),
                         "cudaMemcpyAsync (uniform)", err) < 0))
        return -1;
    if (o && g->sample_graph && !same_sampler(o, &g->sample_opts)) {
        tpc_graph_destroy(g->sample_graph);   /* captured with other kernel arguments */
        g->sample_graph = NULL;
    }
    tpc_graph *graph = o ? &g->sample_graph : &g->greedy_graph;
    if (!*graph) {
        tp_err cap;
        if (capture_graph(g, decode_graph_body, o, graph, &cap) < 0) {
            graphs_off(g, "decode graph", &cap);
            return 1;
        }
        if (o)
            g->sample_opts = *o;
    }
    if (tpc_graph_launch(*graph, g->s, err) < 0 || wait_stream(g, err) < 0)
        return -1;
    *next = *g->host_next;
    return 0;
}

int tpcm_forward_pick(tpcm_model *g, const int32_t *ids, int n, int pos, const tp_sampler_opts *o, double u,
                      int32_t *next, tp_err *err)
{
    bool greedy = tp_sampler_is_greedy(o);
    if (n == 1 && g->graph_usable) {
        int rc = decode_step_graph(g, ids[0], pos, greedy ? NULL : o, u, next, err);
        if (rc <= 0)
            return rc;
    }
    if (run_layers(g, ids, n, pos, err) < 0 || logits_slice(g, n, err) < 0)
        return -1;
    return pick_eager(g, greedy ? NULL : o, u, next, err);
}
