/* model_layers.h - one layer's weights as the forward pass reads them
 * (private to runtime/).  The CPU model (model.c) reads the matrices where
 * they lie in the loaded rank, in their stored dtype, and holds fp32 copies
 * of the vectors only; the CUDA model (cuda/weights_cuda.cu) puts the same tensors on the
 * device, read straight from the loaded rank (tp_layer_src says where each
 * comes from).  NULL / tensor -1 means the tensor is absent (a bias the
 * model does not have, q/k norms outside qwen3). */
#ifndef TP_MODEL_LAYERS_H
#define TP_MODEL_LAYERS_H

#include <stdint.h>

#include "shardfmt.h"

/* A weight matrix [rows][cols] row-major, in place in the loaded rank (the
 * mapping of a codec-none rank file, or the loader's decoded block) in its
 * stored dtype.  data NULL: absent. */
typedef struct tp_mat {
    const void *data;
    tp_dtype dtype;
} tp_mat;

/* X(field, kind): every tensor of a layer, once.  kind MAT is a matrix
 * (a tp_mat on the CPU, bf16 on a GPU), VEC a vector: norm weights, biases
 * (fp32 everywhere: they are tiny).
 * It generates tp_layer_weights, tp_layer_src and cuda's tpcw_layer. */
#define TP_LAYER_TENSORS(X) \
    X(attn_norm, VEC) X(ffn_norm, VEC) X(q_norm, VEC) X(k_norm, VEC) \
    X(wq, MAT) X(wk, MAT) X(wv, MAT) X(wo, MAT) \
    X(bq, VEC) X(bk, VEC) X(bv, VEC) X(bo, VEC) \
    X(wgate, MAT) X(wup, MAT) X(wdown, MAT) \
    X(bgate, VEC) X(bup, VEC) X(bdown, VEC)

#define TP_CPU_FIELD_MAT tp_mat
#define TP_CPU_FIELD_VEC const float *
typedef struct tp_layer_weights {
#define TP_X(field, kind) TP_CPU_FIELD_##kind field;
    TP_LAYER_TENSORS(TP_X)
#undef TP_X
    int window;                 /* sliding window of this layer, 0: none */
} tp_layer_weights;

/* Where a weight's bytes are in the loaded rank: lr->tensors[tensor], bytes
 * [offset, offset + bytes) of its raw data (a row range when the lm_head is
 * a slice of a full tensor).  tensor -1: absent. */
typedef struct tp_weight_src {
    int tensor;
    uint64_t offset, bytes;
} tp_weight_src;

typedef struct tp_layer_src {
#define TP_X(field, kind) tp_weight_src field;
    TP_LAYER_TENSORS(TP_X)
#undef TP_X
    int window;                 /* as in tp_layer_weights */
} tp_layer_src;

#endif
