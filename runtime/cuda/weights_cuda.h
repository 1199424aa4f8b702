/* weights_cuda.h - a rank's weights in device memory (private to runtime/;
 * built only with TP_HAVE_CUDA).
 *
 * The big matrices are bf16 (uint16_t bit patterns, [out][in] as in the
 * checkpoint), the small vectors (norm weights, biases) fp32.  NULL means
 * the tensor is absent, as in tp_layer_weights.  model_cuda.cu reads these;
 * weights_cuda.cu fills them and owns the device memory. */
#ifndef TP_WEIGHTS_CUDA_H
#define TP_WEIGHTS_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "kernels_cuda.h"
#include "model_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tpcw_layer {
    float *attn_norm, *ffn_norm, *q_norm, *k_norm;
    uint16_t *wq, *wk, *wv, *wo, *wgate, *wup, *wdown;
    float *bq, *bk, *bv, *bo, *bgate, *bup, *bdown;
    int window;
} tpcw_layer;

typedef struct tpcw_weights {
    uint16_t *embed;            /* rows [emb_start, emb_end) */
    uint16_t *lm_w;             /* rows [lm_start, lm_end); may point into embed */
    float *final_norm;
    tpcw_layer *layers;         /* cfg->n_layers */
    void **owned;               /* device allocations, freed by tpcw_free */
    size_t n_owned, cap_owned;
    double bytes, seconds;      /* weight bytes put on the device, and how long it took */
} tpcw_weights;

/* Puts d's weights on the current device, on stream s, and waits for them.
 * On failure everything allocated so far is freed. */
int tpcw_upload(tpcw_weights *w, const tpcm_desc *d, tpc_stream s, tp_err *err);
void tpcw_free(tpcw_weights *w);

#ifdef __cplusplus
}
#endif
#endif
