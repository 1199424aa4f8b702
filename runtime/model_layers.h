/* model_layers.h - one layer's weights as the forward pass reads them
 * (private to runtime/).  The CPU model (model.c) reads the matrices where
 * they lie in the loaded rank, in their stored dtype, and holds fp32 copies
 * of the vectors only; the CUDA model (cuda/weights_cuda.cu) puts the same tensors on the
 * device, read straight from the loaded rank (tp_layer_src says where each
 * comes from).  NULL / tensor -1 means the tensor is absent (a bias the
 * model does not have, q/k norms outside qwen3). */
#ifndef TP_MODEL_LAYERS_H
#define TP_MODEL_LAYERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "shardfmt.h"
#include "convert.h"
#include "gemm_cpu.h"

/* A weight matrix [rows][cols] row-major, in place in the loaded rank (the
 * mapping of a codec-none rank file, or the loader's decoded block) in its
 * stored dtype.  data NULL: absent.  An 8-bit weight (TP_F8_E4M3, TP_I8)
 * carries its scales in q (in place too: the loaded scale tensor), with the
 * block origin of the rank's slice; q is zero for float weights. */
typedef struct tp_mat {
    const void *data;
    tp_dtype dtype;
    tpg_quant q;
} tp_mat;

#ifndef __cplusplus
/* The product y[n][rows] = x[n][cols] . w^T as a gemm_cpu job. */
static inline tpg_job tp_mat_job(float *y, const float *x, int n, tp_mat w, int rows, int cols)
{
    return (tpg_job){ .y = y, .x = x, .n = n, .w = w.data, .dt = w.dtype, .rows = rows,
                      .cols = cols, .q = w.q };
}
#endif


/* convert.h's TP_LAYER_TENSORS(X) (every slot of a layer, once, the same
 * list the architecture table fills) generates tp_layer_weights,
 * tp_layer_src and cuda's tpcw_layer. */

/* Where a weight's bytes are in the loaded rank: lr->tensors[tensor], bytes
 * [offset, offset + bytes) of its raw data (a row range when the lm_head is
 * a slice of a full tensor).  tensor -1: absent.  When that tensor is 8-bit
 * (F8_E4M3, I8; only then) its scales are in the same way at *scale (the
 * whole scale tensor) and q holds their geometry (q.scale NULL: the device
 * puts them where it will). */
typedef struct tp_scale_src {
    int tensor;
    uint64_t offset, bytes;
} tp_scale_src;
typedef struct tp_weight_src {
    int tensor;
    uint64_t offset, bytes;
    tp_scale_src scale;
    tpg_quant q;
} tp_weight_src;

#define TP_CPU_FIELD_MAT tp_mat
#define TP_CPU_FIELD_VEC const float *
/* A sparse (mixture-of-experts) layer's MLP as the CPU forward reads it
 * (runtime/moe.c).  With tensor-parallel experts a rank holds rows
 * [r*I/tp, (r+1)*I/tp) of every expert's gate/up and the matching columns of
 * its down; expert-parallel, experts [expert_lo, expert_hi) whole.  Either
 * way the rank's output is a partial sum that the MLP's all-reduce adds up. */
typedef struct tp_moe_weights {
    tp_mat router;              /* [n_experts][hidden], on every rank */
    int n_experts, top_k;
    bool renorm;                /* norm_topk_prob (mixtral: always) */
    int expert_lo, expert_hi;   /* the local experts */
    int inter;                  /* rows of each local expert's gate / up */
    /* [expert_hi - expert_lo] each, in place in the loaded rank: gate and up
     * [inter][hidden], down [hidden][inter] */
    tp_mat *gate, *up, *down;
    /* Where the same matrices lie in the loaded rank (tp_weight_src, below),
     * for the CUDA model, which streams them to the device: the router, and
     * [expert_hi - expert_lo] each for gate / up / down (a block of the fused
     * tensor in the fused layout).  Filled on every device. */
    tp_weight_src router_src, *gate_src, *up_src, *down_src;
} tp_moe_weights;

/* Grown on demand by tp_moe_forward; zero-initialised before first use. */
typedef struct tp_moe_scratch {
    size_t cap_n;               /* tokens the buffers hold */
    float *logits, *weight, *x, *g, *u, *y;
    int *idx, *count, *slot_tok;
    float *slot_w;
} tp_moe_scratch;

/* out[n][hidden] = this rank's share of the sparse MLP of h[n][hidden]: the
 * router and top-k for every token, then each local expert once over the
 * tokens routed to it (prefill groups the tokens by expert; a decode step
 * reads only its top_k experts' weights).  The caller all-reduces out. */
int tp_moe_forward(const tp_moe_weights *w, const float *h, int n, int hidden, float *out,
                   tp_moe_scratch *s, tp_pool *pool, tp_err *err);
void tp_moe_scratch_free(tp_moe_scratch *s);
/* Buckets the n * top_k routed (token, weight) pairs of idx / weight
 * ([n][top_k], global expert ids) that fall on w's local experts, by local
 * expert: expert e's tokens (in token order) and weights are slots
 * [count[e], count[e + 1]) of slot_tok / slot_w.  count holds
 * expert_hi - expert_lo + 1 ints, slot_tok / slot_w n * top_k.  Shared by
 * the CPU forward and the CUDA one (which routes on the host). */
#ifdef __cplusplus
extern "C" {
#endif
void tp_moe_group_by_expert(const tp_moe_weights *w, int n, const int *idx, const float *weight, int *count,
                            int *slot_tok, float *slot_w);
#ifdef __cplusplus
}
#endif

typedef struct tp_layer_weights {
#define TP_X(field, kind) TP_CPU_FIELD_##kind field;
    TP_LAYER_TENSORS(TP_X)
#undef TP_X
    int window;                 /* sliding window of this layer, 0: none */
    tp_moe_weights *moe;        /* sparse layer (then the MLP fields are NULL); NULL: dense */
} tp_layer_weights;

typedef struct tp_layer_src {
#define TP_X(field, kind) tp_weight_src field;
    TP_LAYER_TENSORS(TP_X)
#undef TP_X
    int window;                 /* as in tp_layer_weights */
    /* sparse layer: its shape and expert sources (tp_moe_weights' *_src,
     * owned by the CPU structure); NULL: dense */
    const tp_moe_weights *moe;
} tp_layer_src;

#endif
