/* weights_cuda.h - a rank's weights in device memory (private to runtime/;
 * built only with TP_HAVE_CUDA).
 *
 * The big matrices are bf16 (uint16_t bit patterns, [out][in] as in the
 * checkpoint), or, stored 8-bit (FORMAT.md 1.5), their bytes as stored and
 * their scales in fp32 (tpcw_mat); the small vectors (norm weights, biases)
 * fp32.  NULL means the tensor is absent, as in tp_layer_weights.
 * model_cuda.cu reads these; weights_cuda.cu fills them and owns the device
 * memory. */
#ifndef TP_WEIGHTS_CUDA_H
#define TP_WEIGHTS_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "kernels_cuda.h"
#include "model_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A weight matrix on the device: bf16, or (bf16 NULL) 8-bit with its
 * scales in q8 (tpc_gemm_q8).  Both NULL: absent. */
typedef struct tpcw_mat {
    const uint16_t *bf16;
    tpc_q8 q8;
} tpcw_mat;

/* model_layers.h's TP_LAYER_TENSORS: MAT fields tpcw_mat, VEC fields fp32. */
#define TPCW_MAT_FIELD tpcw_mat
#define TPCW_VEC_FIELD float *
/* A sparse layer on the device: the router (bf16) and each local expert's
 * matrices; shape is the CPU structure's (counts, top_k, renorm, the
 * local experts and their rows), which the model keeps until tp_model_free. */
typedef struct tpcw_moe {
    const tp_moe_weights *shape;
    uint16_t *router;           /* [n_experts][hidden] */
    tpcw_mat *gate, *up;        /* host arrays of [expert_hi - expert_lo], device [inter][hidden] */
    tpcw_mat *down;             /* the same, [hidden][inter] */
} tpcw_moe;

typedef struct tpcw_layer {
#define TP_X(field, kind) TPCW_##kind##_FIELD field;
    TP_LAYER_TENSORS(TP_X)
#undef TP_X
    int window;
    tpcw_moe *moe;              /* sparse layer (the dense MLP fields are NULL); NULL: dense */
} tpcw_layer;

typedef struct tpcw_weights {
    const uint16_t *embed;      /* rows [emb_start, emb_end); NULL when 8-bit: */
    tpc_q8 embed_q8;            /* an 8-bit table (a tied lm_head's, --quantize-lm-head) */
    tpcw_mat lm_w;              /* rows [lm_start, lm_end); may be embed's or embed_q8's */
    float *final_norm;
    tpcw_layer *layers;         /* n_layers */
    int n_layers;
    tpc_allocs owned;           /* device allocations, freed by tpcw_free */
    double bytes, seconds;      /* weight bytes put on the device, and how long it took */
    double source_bytes;        /* decoded bytes streamed from the loaded rank */
    size_t q8_max_elems;        /* the largest 8-bit matrix (tpc_gemm_q8's bf16 workspace) */
} tpcw_weights;

/* Puts d's weights on the current device, on stream s, and waits for them:
 * a device buffer per weight, allocated up front, then one tp_load_stream
 * over the tensors used, through pinned staging buffers (each recycled once
 * the event recorded behind its copies has completed).  bf16 matrices are
 * copied as they are; f16/f32 matrices are rounded to bf16 in the pinned
 * buffer first; vectors are gathered as fp32 on the host and copied when
 * complete; 8-bit matrices are copied as they are, their scales as vectors.
 * On failure everything allocated so far is freed. */
int tpcw_upload(tpcw_weights *w, const tpcm_desc *d, tpc_stream s, tp_err *err);
void tpcw_free(tpcw_weights *w);

#ifdef __cplusplus
}
#endif
#endif
