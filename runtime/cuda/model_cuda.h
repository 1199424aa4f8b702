/* model_cuda.h - the CUDA forward pass of a rank's model (private to
 * runtime/; built only with TP_HAVE_CUDA).
 *
 * model.c builds and checks the rank's structure exactly as for the CPU
 * (local heads, kv-head mapping, lm_head vocabulary slice, reduce_bias) and
 * then hands it over in a tpcm_desc; weights_cuda.cu puts the weights on
 * the device and model_cuda.cu runs tp_model_forward's work there. */
#ifndef TP_MODEL_CUDA_H
#define TP_MODEL_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "runtime.h"
#include "model_layers.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The rank's checked structure and where each weight is in the loaded
 * rank (byte ranges of lr's tensors, tp_weight_src); only read by
 * tpcm_create, which streams the weights from lr (tp_load_stream: a
 * deferred rank is decoded and checked on the way, tensors in memory are
 * copied).  The caller may drop lr's tensors afterwards. */
typedef struct tpcm_desc {
    const tp_model_config *cfg;
    tp_comm *comm;
    int rank, world;
    int lq, lkv, li, group, max_seq;
    int slots;              /* sequence slots, each a KV cache of max_seq positions (0: 1) */
    const tp_loaded_rank *lr;
    tp_weight_src embed;
    int64_t emb_start, emb_end;
    tp_weight_src final_norm;
    tp_weight_src lm_w;         /* rows [lm_start, lm_end): may be a range of embed's tensor */
    int64_t lm_start, lm_end;
    const int64_t *lm_ranges;
    int vocab_slot;
    const tp_layer_src *layers;
    const char *device;     /* "cuda" or "cuda:N" */
    bool no_graph;          /* launch decode steps kernel by kernel (no CUDA graph) */
} tpcm_desc;

typedef struct tpcm_model tpcm_model;

int tpcm_create(tpcm_model **out, const tpcm_desc *d, tp_err *err);
void tpcm_free(tpcm_model *g);
/* tp_model_forward on the device at position pos (ids already checked). */
int tpcm_forward(tpcm_model *g, const int32_t *ids, int n, int pos, float *logits, tp_err *err);
/* tp_model_forward_pick on the device: the layers, this rank's logits
 * slice, then greedy (per-rank winners combined) or tpc_sample with u over
 * the gathered logits.  Only the id comes back to the host; it is the same
 * on every rank.  u is ignored when greedy. */
int tpcm_forward_pick(tpcm_model *g, const int32_t *ids, int n, int pos, const tp_sampler_opts *o, double u,
                      int32_t *next, tp_err *err);
/* tp_model_forward_batch on the device (t already checked by model.c's
 * check_batch): the GEMMs over all n tokens, RoPE, the KV append and the
 * attention of each token at its own slot and position, then the lm_head
 * over the tokens that ask for logits only (one row of vocab floats each,
 * in order, gathered across ranks; logits NULL: none).  slot_len_after:
 * each slot's length at the end of the step, the pass length of the RoPE
 * types whose frequencies follow it (dynamic, longrope). */
int tpcm_forward_batch(tpcm_model *g, const tp_batch_token *t, int n, const int *slot_len_after, float *logits,
                       tp_err *err);
/* Bytes uploaded and the seconds it took (weights only). */
void tpcm_upload_stats(const tpcm_model *g, double *bytes, double *seconds);
/* A one-line description: device, bytes, GB/s, comm path, CUDA graph. */
const char *tpcm_describe(const tpcm_model *g);

#ifdef __cplusplus
}
#endif
#endif
