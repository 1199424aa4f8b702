/* model_layers.h - one layer's weights as the forward pass reads them
 * (private to runtime/).  The CPU model (model.c) owns them as fp32 host
 * arrays; the CUDA model (cuda/model_cuda.cu) uploads the same struct.
 * NULL means the tensor is absent (a bias the model does not have, q/k norms
 * outside qwen3). */
#ifndef TP_MODEL_LAYERS_H
#define TP_MODEL_LAYERS_H

typedef struct tp_layer_weights {
    const float *attn_norm, *ffn_norm, *q_norm, *k_norm;
    const float *wq, *wk, *wv, *wo;
    const float *bq, *bk, *bv, *bo;
    const float *wgate, *wup, *wdown;
    const float *bgate, *bup, *bdown;
    int window;                 /* sliding window of this layer, 0: none */
} tp_layer_weights;

#endif
