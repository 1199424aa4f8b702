/* kernels_cuda.h - the CUDA kernels of the forward pass and the NCCL
 * backend's extras (private to runtime/; C-callable, built only where nvcc
 * is found, i.e. with TP_HAVE_CUDA).
 *
 * Each kernel mirrors a CPU reference of kernels_cpu.h (or tp_sample) and
 * tests/test_kernels_cuda.c compares the two.  Conventions:
 *   - weights of the big matrices are bf16 in device memory (uint16_t bit
 *     patterns, as stored in the checkpoint); small vectors (norm weights,
 *     biases) and RoPE tables are fp32 (the model widens them on upload:
 *     exact, and a few KB);
 *   - activations, the KV cache and all arithmetic are fp32;
 *   - every pointer argument is a device pointer unless it says "host";
 *   - every launcher enqueues on the given stream (NULL: the legacy default
 *     stream), returns 0, or -1 with err naming the kernel when an argument
 *     is out of range or the launch failed.  Errors of a kernel that already
 *     runs show up at the next synchronisation (tpc_sync).
 *   - KV cache layout: k_cache / v_cache are [n_kv_heads][max_seq][head_dim]
 *     (one contiguous [pos][head_dim] block per kv head, the layout of
 *     tpk_attention_head's k and v).
 *   - GEMM layout (tpc_gemm_bf16): row-major y[n][out] = x[n][in] . W^T,
 *     W row-major [out][in] (nn.Linear's weight, unchanged from the
 *     checkpoint).  cuBLAS sees it column-major as y^T = op_T(W) . x^T.
 *   - CUDA graphs: a captured step replays fixed kernel arguments and grids,
 *     so what changes per token must be read from device memory.  The token
 *     ids already are (tpc_embedding); the position is, in the *_devpos
 *     launchers given a non-NULL pos_dev (a device int32 that the graph
 *     itself moves on with tpc_advance_pos).  Their grids then do not depend
 *     on the position, and a position that does not fit the cache cannot be
 *     refused by the launcher: the kernels then write nothing (kv append) or
 *     NaN (decode attention) instead of touching memory past the cache.
 *     The plain launchers are the *_devpos ones with pos_dev NULL.
 */
#ifndef TP_KERNELS_CUDA_H
#define TP_KERNELS_CUDA_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#include "shardfmt.h"
#include "runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The CUDA handle types, spelled so that C code needs no CUDA header:
 * tpc_stream is cudaStream_t; tpc_blas is a cuBLAS handle with its own
 * workspace (kernels_cuda.cu). */
typedef struct CUstream_st *tpc_stream;
typedef struct tpc_blas_st *tpc_blas;

/* Largest head_dim the attention kernels take (8 values per lane). */
#define TPC_MAX_HEAD_DIM 256
/* Most KV-cache splits per head of tpc_attention_decode. */
#define TPC_DECODE_MAX_SPLITS 64

/* ------------------------------------------------------ device and memory */

/* Number of CUDA devices; -1 with err "cudaGetDeviceCount: <reason>" when
 * the runtime cannot even count them (no driver, no device nodes). */
int tpc_device_count(int *count, tp_err *err);
int tpc_set_device(int device, tp_err *err);
/* what names the buffer in the out-of-memory message. */
int tpc_malloc(void **ptr, size_t bytes, const char *what, tp_err *err);
void tpc_free(void *ptr);
/* Device allocations freed together (a model's buffers): tpc_allocs_malloc
 * is tpc_malloc that also records the pointer; tpc_allocs_free frees them
 * all and empties the list.  Zero-initialise before use. */
typedef struct tpc_allocs {
    void **ptrs;
    size_t n, cap;
} tpc_allocs;
int tpc_allocs_malloc(tpc_allocs *a, void **ptr, size_t bytes, const char *what, tp_err *err);
void tpc_allocs_free(tpc_allocs *a);
int tpc_upload(void *dst_dev, const void *src_host, size_t bytes, tp_err *err);
int tpc_download(void *dst_host, const void *src_dev, size_t bytes, tp_err *err);
int tpc_memset(void *dst_dev, int value, size_t bytes, tp_err *err);
int tpc_stream_create(tpc_stream *s, tp_err *err);
void tpc_stream_destroy(tpc_stream s);
/* Waits for the stream; reports the first error of the kernels it ran. */
int tpc_sync(tpc_stream s, tp_err *err);

/* ------------------------------------------------------------- kernels */

/* tpk_embedding with a bf16 table of rows [row_start, row_end) (ids on the
 * device, already checked against the full vocabulary). */
int tpc_embedding(float *out, const uint16_t *table, const int32_t *ids, int n, int hidden,
                  int64_t row_start, int64_t row_end, tpc_stream s, tp_err *err);

/* tpk_add_rmsnorm: x[t] += delta[t] (delta may be NULL), out[t] =
 * rmsnorm(x[t]) * w.  out may equal x. */
int tpc_add_rmsnorm(float *x, const float *delta, float *out, const float *w, int n, int dim,
                    float eps, tpc_stream s, tp_err *err);

/* tpk_head_rmsnorm (when w is non-NULL: qwen3's q_norm / k_norm) followed
 * by tpk_rope, fused, in place.  Token t's heads start at
 * x + t * row_stride + h * head_dim; its position is pos0 + t.  cos_t/sin_t
 * are [n_pos][head_dim / 2] tables made on the host by the CPU's
 * tpk_rope_rows (so every rope type and its attention factor is the CPU's)
 * and copied to the device. */
int tpc_head_norm_rope(float *x, const float *w, int n, int n_heads, int head_dim, size_t row_stride,
                       int pos0, const float *cos_t, const float *sin_t, float eps, tpc_stream s,
                       tp_err *err);
/* The same with the position from the device when pos_dev is non-NULL (pos0
 * is then ignored): token t's position is *pos_dev + t, which the caller
 * keeps inside cos_t/sin_t's n_pos rows (the kernel knows no n_pos; a
 * negative position leaves x unchanged). */
int tpc_head_norm_rope_devpos(float *x, const float *w, int n, int n_heads, int head_dim,
                              size_t row_stride, int pos0, const int32_t *pos_dev, const float *cos_t,
                              const float *sin_t, float eps, tpc_stream s, tp_err *err);

/* Copies the n tokens' k and v heads (token t's kv head h at
 * k + t * row_stride + h * head_dim) into cache rows pos0 .. pos0 + n - 1. */
int tpc_kv_append(float *k_cache, float *v_cache, int max_seq, const float *k, const float *v,
                  size_t row_stride, int n, int n_kv_heads, int head_dim, int pos0, tpc_stream s,
                  tp_err *err);
/* pos_dev non-NULL: rows *pos_dev .. *pos_dev + n - 1 (pos0 ignored); when
 * they do not fit [0, max_seq) nothing is written. */
int tpc_kv_append_devpos(float *k_cache, float *v_cache, int max_seq, const float *k, const float *v,
                         size_t row_stride, int n, int n_kv_heads, int head_dim, int pos0,
                         const int32_t *pos_dev, tpc_stream s, tp_err *err);

/* Causal GQA attention of n query tokens (positions pos0 ..) against the
 * cache, for every head: query head h reads kv head h / (n_heads /
 * n_kv_heads).  q: token t head h at q + t * q_stride + h * head_dim; out
 * likewise with out_stride.  window > 0: mistral's sliding window (keys
 * j > p - window), as tpk_attention_head.
 * Prefill: tiles of 16 queries x 32 keys in shared memory, online softmax
 * (flash-attention style: no score matrix in memory). */
int tpc_attention_prefill(float *out, size_t out_stride, const float *q, size_t q_stride,
                          const float *k_cache, const float *v_cache, int max_seq, int n, int pos0,
                          int n_heads, int n_kv_heads, int head_dim, int window, float scale,
                          tpc_stream s, tp_err *err);

/* The same for a few query tokens (decode: n = 1): the keys of each head are
 * split over up to TPC_DECODE_MAX_SPLITS blocks (each at least 32 keys) so
 * that one token still fills the GPU; a second kernel combines the partial
 * softmaxes.  workspace holds tpc_attention_decode_workspace(n, n_heads,
 * head_dim) bytes: room for TPC_DECODE_MAX_SPLITS splits, which covers both
 * launchers at any position and max_seq. */
size_t tpc_attention_decode_workspace(int n, int n_heads, int head_dim);
int tpc_attention_decode(float *out, size_t out_stride, const float *q, size_t q_stride,
                         const float *k_cache, const float *v_cache, int max_seq, int n, int pos0,
                         int n_heads, int n_kv_heads, int head_dim, int window, float scale,
                         void *workspace, size_t workspace_bytes, tpc_stream s, tp_err *err);
/* pos_dev non-NULL: the queries' positions are *pos_dev .. (pos0 ignored).
 * The grid is sized for the most keys the cache holds (max_seq, or the
 * window), the same for every position; the kernel splits the keys of the
 * actual position exactly as tpc_attention_decode would (same bits), and
 * the splits past the last key write an empty partial that the combine
 * skips.  A position with *pos_dev + n > max_seq (or < 0) gives NaN rows. */
int tpc_attention_decode_devpos(float *out, size_t out_stride, const float *q, size_t q_stride,
                                const float *k_cache, const float *v_cache, int max_seq, int n, int pos0,
                                const int32_t *pos_dev, int n_heads, int n_kv_heads, int head_dim,
                                int window, float scale, void *workspace, size_t workspace_bytes,
                                tpc_stream s, tp_err *err);

/* A batched step (tp_model_forward_batch): n tokens of several sequences,
 * each with its own cache.  The caches of n_slots slots lie slot_stride
 * floats apart (slot s's [n_kv_heads][max_seq][head_dim] block starts at
 * k_cache + s * slot_stride); slot and pos are device arrays of n entries:
 * token t's slot and position.  A slot or position outside [0, n_slots) /
 * [0, max_seq) cannot be refused (the launcher does not read device
 * memory): the append writes nothing for it, the attention gives NaN.
 * model_cuda.cu's batched decode graphs rely on it: their padding rows
 * have slot -1.
 * tpc_kv_append_batch: token t's k and v heads (at k + t * row_stride + h *
 * head_dim) into its slot's rows pos[t]. */
int tpc_kv_append_batch(float *k_cache, float *v_cache, size_t slot_stride, int n_slots, int max_seq,
                        const float *k, const float *v, size_t row_stride, int n, int n_kv_heads, int head_dim,
                        const int32_t *slot, const int32_t *pos, tpc_stream s, tp_err *err);
/* Each token's causal GQA attention over its own slot's cache, keys
 * [0, pos[t]] (window > 0: the last window of them), as tpk_attention_head
 * gives one query at pos[t]: the decode kernel (key splits, then their
 * combine) with per-token slots and positions, one grid for the whole step.
 * A slot's tokens of this step must be in its cache already
 * (tpc_kv_append_batch first).  workspace: tpc_attention_decode_workspace(n,
 * n_heads, head_dim) bytes. */
int tpc_attention_batch(float *out, size_t out_stride, const float *q, size_t q_stride, const float *k_cache,
                        const float *v_cache, size_t slot_stride, int n_slots, int max_seq, int n,
                        const int32_t *slot, const int32_t *pos, int n_heads, int n_kv_heads, int head_dim,
                        int window, float scale, void *workspace, size_t workspace_bytes, tpc_stream s,
                        tp_err *err);

/* tpk_silu_mul: gate[i] = silu(gate[i]) * up[i]. */
int tpc_silu_mul(float *gate, const float *up, size_t n, tpc_stream s, tp_err *err);

/* tpk_add_bias: y[t][i] += b[i]. */
int tpc_add_bias(float *y, const float *b, int n, int dim, tpc_stream s, tp_err *err);

/* Router logits[n][n_experts] = x[n][hidden] . W^T with W bf16
 * [n_experts][hidden], in fp32 throughout: unlike tpc_gemm_bf16 the
 * activations are not rounded to bf16, so that the top-k choice sees what
 * the CPU model (runtime/moe.c) sees and a near-tie is not flipped by the
 * rounding.  One block per (token, expert). */
int tpc_router_logits(float *logits, const float *x, const uint16_t *w, int n, int n_experts, int hidden,
                      tpc_stream s, tp_err *err);

/* tpk_router_topk for each of n tokens: logits [n][n_experts] to idx and
 * weight [n][k] (softmax in fp32, the k largest probabilities in descending
 * order, ties to the lower expert, renormalised when renorm).  One thread
 * per token; k <= n_experts. */
int tpc_router_topk(int32_t *idx, float *weight, const float *logits, int n, int n_experts, int k, bool renorm,
                    tpc_stream s, tp_err *err);

/* Mixture-of-experts token routing: gather x[j] = h[tok[j]] and scatter
 * out[tok[j]] += w[j] * y[j] for j < m, rows of dim floats; tok and w are
 * device arrays.  The m tokens must be distinct (one expert's tokens), so
 * that the scatter's rows never collide. */
int tpc_gather_rows(float *x, const float *h, const int32_t *tok, int m, int dim, tpc_stream s, tp_err *err);
int tpc_scatter_add_rows(float *out, const float *y, const int32_t *tok, const float *w, int m, int dim,
                         tpc_stream s, tp_err *err);

/* Round to nearest even, as torch's .to(torch.bfloat16). */
int tpc_f32_to_bf16(uint16_t *dst, const float *src, size_t n, tpc_stream s, tp_err *err);

/* Greedy pick over a vocabulary slice: the largest logit (ties: the lowest
 * id; NaN never wins; all -inf/NaN: id_offset).  *out (device) receives the
 * value and id_offset + index, so that the ranks of a vocab-parallel lm_head
 * can combine their slices' winners. */
typedef struct tpc_argmax_result {
    float value;
    int32_t id;
} tpc_argmax_result;
int tpc_argmax(tpc_argmax_result *out, const float *logits, int n, int32_t id_offset, tpc_stream s,
               tp_err *err);

/* The greedy id of a vocab-parallel lm_head from its world ranks' tpc_argmax
 * results, gathered into per_rank (device): the largest value, ties to the
 * lowest id, NaN never wins; when every value is -inf (or NaN) the lowest
 * id, i.e. the first slice's id_offset.  *out_id (device) receives it. */
int tpc_argmax_combine(int32_t *out_id, const tpc_argmax_result *per_rank, int world, tpc_stream s,
                       tp_err *err);

/* tp_sample on the device over full-vocabulary logits (gathered first):
 * temperature <= 0 or top_k 1: greedy; else softmax(logits / temperature),
 * top-k, then top-p over the most likely first (ties: lower ids first), and
 * the draw with the uniform u in [0, 1) (tp_rng_uniform on the host, the
 * same on every rank); with neither filter the draw walks the ids in order,
 * as tp_sample does.  Only the id comes back: *out_id (device).
 * workspace: vocab floats.  Selection works by radix descent over the
 * probabilities' bits, not a sort; sums differ from tp_sample's only in
 * rounding, so the same u gives the same id except on a knife edge. */
int tpc_sample(int32_t *out_id, const float *logits, int vocab, float temperature, int top_k,
               float top_p, double u, float *workspace, tpc_stream s, tp_err *err);
/* The same with u read from the device (*u_dev, which the caller keeps in
 * [0, 1)): for a captured graph, whose kernel arguments are fixed. */
int tpc_sample_devu(int32_t *out_id, const float *logits, int vocab, float temperature, int top_k,
                    float top_p, const double *u_dev, float *workspace, tpc_stream s, tp_err *err);

/* ------------------------------------------- device position, graphs */

/* *dst = value, and *pos_dev += by, as kernels on the stream: a captured
 * graph can move its own position on (no host copy in the graph). */
int tpc_set_i32(int32_t *dst, int32_t value, tpc_stream s, tp_err *err);
int tpc_advance_pos(int32_t *pos_dev, int by, tpc_stream s, tp_err *err);

/* Stream capture into an executable graph (tpc_graph is cudaGraphExec_t).
 * tpc_capture_begin starts capturing s (not NULL: the legacy default stream
 * cannot be captured) in cudaStreamCaptureModeThreadLocal: the tp ranks of
 * one process may be threads that capture while others still allocate or
 * copy synchronously, which Global mode would forbid; this thread must not
 * call cudaMalloc, tpc_upload/tpc_download/tpc_memset or tpc_sync(s) until
 * tpc_capture_end.  Kernels launched on s in between are recorded, not run.
 * Always pair begin with end, even after a failed launcher: end stops the
 * capture, and fails (-1, *graph NULL) when the capture went wrong.
 * tpc_graph_launch replays the recorded work on s in stream order. */
typedef struct CUgraphExec_st *tpc_graph;
int tpc_capture_begin(tpc_stream s, tp_err *err);
int tpc_capture_end(tpc_stream s, tpc_graph *graph, tp_err *err);
int tpc_graph_launch(tpc_graph graph, tpc_stream s, tp_err *err);
void tpc_graph_destroy(tpc_graph graph);

/* ---------------------------------------------------------------- GEMM */

int tpc_blas_create(tpc_blas *h, tpc_stream s, tp_err *err);
void tpc_blas_destroy(tpc_blas h);
/* y[n][out] = x[n][in] . W^T (+ bias[out]), W bf16 [out][in].  The
 * activations are rounded to bf16 into x_bf16 (workspace of n * in values;
 * x NULL: x_bf16 already holds them), then cublasGemmEx multiplies bf16 x
 * bf16 with fp32 accumulation (CUBLAS_COMPUTE_32F) into fp32 y: what a bf16
 * transformers model computes in its nn.Linear, except that the result stays
 * fp32.  bias may be NULL. */
int tpc_gemm_bf16(tpc_blas h, float *y, const float *x, uint16_t *x_bf16, const uint16_t *w,
                  const float *bias, int n, int in, int out, tpc_stream s, tp_err *err);

/* ------------------------------------------------------ 8-bit weights */

/* An 8-bit weight [out][in] on the device with its scales (FORMAT.md 1.5,
 * as gemm_cpu.h's tpg_quant): dt TP_F8_E4M3, element [r][c] =
 * e4m3(w[r][c]) * scale[(origin[0] + r) / block[0] * stride +
 * (origin[1] + c) / block[1]]; dt TP_I8, int8(w[r][c]) * scale[r].  w and
 * scale are device pointers; the struct itself is passed by value. */
typedef struct tpc_q8 {
    const uint8_t *w;
    tp_dtype dt;
    const float *scale;
    int stride, block[2], origin[2];
} tpc_q8;

/* y[n][out] = x[n][in] . W^T for an 8-bit W, fp32 activations (not rounded
 * to bf16) and fp32 accumulation, each weight dequantized in registers to
 * the fp32 value tpg_weight gives: the decode GEMV (one warp per output row
 * and token; meant for small n).  bias may be NULL. */
int tpc_gemv_q8(float *y, const float *x, tpc_q8 w, const float *bias, int n, int in, int out,
                tpc_stream s, tp_err *err);
/* dst[r][c] = W[r][c] rounded to bf16 (round to nearest even), rows * cols. */
int tpc_dequant_q8_bf16(uint16_t *dst, tpc_q8 w, int rows, int cols, tpc_stream s, tp_err *err);
/* Most tokens tpc_gemm_q8 multiplies with the GEMV. */
#define TPC_Q8_GEMV_MAX_N 8
/* The product for any n: up to TPC_Q8_GEMV_MAX_N tokens tpc_gemv_q8; more
 * (prefill) dequantizes W into w_bf16 (workspace of out * in values) and
 * runs tpc_gemm_bf16 (x rounded to bf16 into x_bf16, as the bf16 model
 * does).  cuBLASLt's FP8 GEMM is not used: it needs fp8 activations, which
 * would change the math against the fp32-activation reference. */
int tpc_gemm_q8(tpc_blas h, float *y, const float *x, uint16_t *x_bf16, tpc_q8 w, uint16_t *w_bf16,
                const float *bias, int n, int in, int out, tpc_stream s, tp_err *err);
/* tpc_embedding over an 8-bit table of rows [row_start, row_end) (a tied
 * lm_head's, tpconvert --quantize-lm-head): each value of the token's row
 * dequantized to the fp32 value tpg_weight gives (the row's scale through
 * the slice's block origin); zeros for ids outside the rows. */
int tpc_embedding_q8(float *out, tpc_q8 table, const int32_t *ids, int n, int hidden, int64_t row_start,
                     int64_t row_end, tpc_stream s, tp_err *err);

/* ------------------------------------------------------- NCCL backend */

/* For a comm opened with backend "nccl" (comm_nccl.cu): the stream its
 * collectives run on (the model runs its kernels there too, so that no
 * extra synchronisation is needed) and its device; NULL / -1 otherwise.
 * The nccl backend's buffers are device pointers (host pointers work too,
 * staged through a device buffer: fine for a token id, slow for
 * activations).  Its unique id travels over tp_comm_open("auto"): MPI under
 * mpirun, else the tcp backend's rendezvous at MASTER_ADDR:MASTER_PORT. */
tpc_stream tpc_comm_stream(const tp_comm *c);
int tpc_comm_device(const tp_comm *c);
/* Enqueue-only mode (nccl comm; a no-op for others): collectives on
 * device buffers return once enqueued on tpc_comm_stream instead of waiting
 * for it, so that the host keeps launching and a graph capture can record
 * them.  tpc_comm_wait then waits for the stream under the comm's watchdog:
 * an NCCL error, a CUDA error on the stream or --timeout aborts the
 * communicator and names the rank.  Host buffers are always waited for. */
void tpc_comm_set_enqueue_only(tp_comm *c, bool on);
int tpc_comm_wait(tp_comm *c, tp_err *err);

#ifdef __cplusplus
}
#endif
#endif
