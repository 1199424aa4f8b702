/* kernels_cpu.h - the CPU kernels of the forward pass (private to runtime/).
 *
 * Each kernel is small, fp32, and written to be the reference that a CUDA
 * kernel is later tested against.  Layouts are row-major; "n" is the number
 * of tokens (rows) processed together.  Conventions follow the Hugging Face
 * modeling code of qwen2/qwen3/llama/mistral so that results differ from
 * transformers (fp32) only by summation order.
 */
#ifndef TP_KERNELS_CPU_H
#define TP_KERNELS_CPU_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#include "shardfmt.h"
#include "convert.h"   /* tp_rope_config */

/* out[t] = table[ids[t] - row_start] for ids inside [row_start, row_end),
 * zeros otherwise (a vocab-parallel embedding: the all-reduce that follows
 * adds the one rank's row).  ids must already be checked against the full
 * vocabulary. */
void tpk_embedding(float *out, const float *table, const int32_t *ids, int n, int hidden,
                   int64_t row_start, int64_t row_end);
/* The same over a table in its stored dtype (bf16, f16, f32), rows widened
 * as they are looked up: the model's embedding read in place. */
void tpk_embedding_rows(float *out, const void *table, tp_dtype dt, const int32_t *ids, int n,
                        int hidden, int64_t row_start, int64_t row_end);

/* out[t] = w * x[t] / sqrt(mean(x[t]^2) + eps)  (HF LlamaRMSNorm).  out may
 * equal x. */
void tpk_rmsnorm(float *out, const float *x, const float *w, int n, int dim, float eps);

/* Fused residual add + rmsnorm: x[t] += delta[t]; out[t] = rmsnorm(x[t]).
 * delta may be NULL (plain rmsnorm of x). */
void tpk_add_rmsnorm(float *x, const float *delta, float *out, const float *w, int n, int dim,
                     float eps);

/* Per-head rmsnorm in place (qwen3 q_norm / k_norm): x is n_rows rows of
 * head_dim values (tokens * heads), each normalised with the same w. */
void tpk_head_rmsnorm(float *x, const float *w, int n_rows, int head_dim, float eps);

/* RoPE, as transformers 5.24's modeling_rope_utils.py and *RotaryEmbedding
 * compute it (r: the parsed config, convert.h).
 *
 * inv_freq[i] for i in [0, head_dim/2) of a forward pass whose positions
 * end at seq_len - 1, computed in fp32 where transformers uses fp32 tensors
 * and in double where it uses Python floats.  seq_len matters only for the
 * two types whose frequencies follow the sequence (tpk_rope_per_pass):
 *   dynamic: while seq_len <= max_position_embeddings the plain frequencies;
 *     past it the NTK base for that length (dynamic_frequency_update
 *     recomputes them whenever a pass reaches past the longest seen so far);
 *   longrope: short_factor while seq_len <= original_max_position_embeddings,
 *     long_factor past it (longrope_frequency_update, every pass).
 * seq_len <= 0 gives what transformers builds at init. */
void tpk_rope_inv_freq(float *inv_freq, int head_dim, const tp_rope_config *r, int seq_len);

/* Whether the frequencies depend on the pass (dynamic, longrope): then the
 * model refills the table rows of each pass with tpk_rope_rows before
 * rotating.  Keys already in the KV cache keep the rotation of the pass
 * that wrote them, as in transformers' generate with a cache. */
bool tpk_rope_per_pass(const tp_rope_config *r);

/* Rows [first, first + n) of the cos/sin tables ([pos][head_dim/2]) for a
 * pass whose positions end at seq_len - 1: angle = (float)pos * inv_freq[i]
 * in fp32, cos and sin times r->attention_factor (yarn, longrope; 1
 * otherwise), as the rotary embedding's forward does.  inv_scratch holds
 * head_dim / 2 floats. */
void tpk_rope_rows(float *cos_t, float *sin_t, float *inv_scratch, int head_dim,
                   const tp_rope_config *r, int seq_len, int first, int n);

/* The same rows written from cos_rows / sin_rows[0] on (row t: position
 * first + t), for a table that holds only a pass's tokens (the batched
 * forward: each slot's rows with its own seq_len). */
void tpk_rope_rows_at(float *cos_rows, float *sin_rows, float *inv_scratch, int head_dim,
                      const tp_rope_config *r, int seq_len, int first, int n);

/* cos/sin tables [n_pos][head_dim/2] of given inverse frequencies, without
 * attention factor: angle = (float)pos * inv_freq[i]. */
void tpk_rope_table(float *cos_t, float *sin_t, const float *inv_freq, int head_dim, int n_pos);

/* Rotates n tokens x n_heads heads in place (HF rotate_half convention: the
 * pairs are (i, i + head_dim/2)).  Token t sits at position pos0 + t; its
 * heads start at x + t * row_stride + h * head_dim. */
void tpk_rope(float *x, int n, int n_heads, int head_dim, size_t row_stride, int pos0,
              const float *cos_t, const float *sin_t);

/* Causal GQA attention for one query head over a KV cache.
 *   q:      n query rows for this head, q + t * q_stride (head_dim values)
 *   k, v:   the cache of this head's kv head, [>= pos0 + n][head_dim]
 *   out:    out + t * out_stride receives head_dim values
 * Query t at position p = pos0 + t attends keys j in [lo, p] with
 * lo = max(0, p - window + 1) when window > 0 (mistral's sliding window:
 * kv_idx > q_idx - window), else 0.  scores = q.k * scale, softmax in fp32
 * (max-subtracted, two passes), scratch holds pos0 + n floats. */
void tpk_attention_head(float *out, size_t out_stride, const float *q, size_t q_stride,
                        const float *k, const float *v, int n, int pos0, int head_dim,
                        int window, float scale, float *scratch);

/* The same attention with the two products in cblas sgemm, queries taken
 * TPK_ATT_BLOCK at a time: scores S = Q_blk K^T * scale, masked softmax of
 * each row, out = S V.  scratch holds TPK_ATT_BLOCK * (pos0 + n) floats.
 * Same results as tpk_attention_head up to summation order.  The three
 * steps are exposed so that the model can run the sgemms (threaded by
 * OpenBLAS) and the softmax rows (on its own pool) as separate phases. */
#define TPK_ATT_BLOCK 32
void tpk_attention_head_blocked(float *out, size_t out_stride, const float *q, size_t q_stride,
                                const float *k, const float *v, int n, int pos0, int head_dim,
                                int window, float scale, float *scratch);

/* One token's attention for `heads` query heads that share one KV head
 * (grouped-query attention): q and out hold the heads one after another,
 * [heads][head_dim], all at position pos.  The same results as
 * tpk_attention_head_blocked on each head with n = 1, in one pair of
 * sgemms: the keys and values are read once for the group, not once a
 * head.  heads <= TPK_ATT_BLOCK; scratch holds heads * (pos + 1) floats. */
void tpk_attention_group_one(float *out, const float *q, int heads, const float *k,
                             const float *v, int pos, int head_dim, int window, float scale,
                             float *scratch);

/* The keys [*klo, *klo + *nk) that a block of b queries at positions
 * first .. first + b - 1 can see (causal, and window when > 0). */
void tpk_attn_block_keys(int first, int b, int window, int *klo, int *nk);
/* S[r][j] = scale * q_r . k_(klo + j), r < b, j < nk; S is [b][nk]. */
void tpk_attn_scores(float *S, const float *q, size_t q_stride, const float *k, int b, int klo,
                     int nk, int head_dim, float scale);
/* One row of S for the query at position p: softmax over the visible keys
 * [max(klo, p - window + 1), p], every other entry set to 0. */
void tpk_attn_softmax_row(float *s, int p, int klo, int nk, int window);
/* out_r = sum_j S[r][j] v_(klo + j). */
void tpk_attn_weighted_sum(float *out, size_t out_stride, const float *S, const float *v, int b,
                           int klo, int nk, int head_dim);

/* gate[i] = silu(gate[i]) * up[i] = gate / (1 + exp(-gate)) * up. */
void tpk_silu_mul(float *gate, const float *up, size_t n);

/* y[n][out] = x[n][in] . W^T (+ bias), W is [out][in] row-major
 * (nn.Linear's weight).  cblas sgemm (sgemv for n = 1) on fp32 weights: the
 * fp32 reference the CUDA tests compare with; the CPU model multiplies by
 * its weights in their stored dtype with gemm_cpu.h instead. */
void tpk_matmul(float *y, const float *x, const float *w, const float *bias, int n, int in, int out);

/* y[t][i] += b[i] for n rows of dim values. */
void tpk_add_bias(float *y, const float *b, int n, int dim);

/* The router of a mixture-of-experts layer for one token (transformers'
 * Qwen3MoeTopKRouter / Mixtral's): p = softmax(logits) over all n_experts
 * in fp32; the k largest p, largest first, into idx[k] and weight[k];
 * with renorm the k weights are divided by their sum (norm_topk_prob;
 * Mixtral always).  Ties: torch.topk leaves their order unspecified (on the
 * CPU it returns [1, 3] for three equal values at 1, 2, 3); here the lower
 * expert index wins.  The reference fixtures keep the k-th and (k+1)-th
 * probabilities apart, so no test depends on it.  k <= n_experts. */
void tpk_router_topk(const float *logits, int n_experts, int k, bool renorm, int *idx, float *weight);

/* Converts count elements of a bf16/f16/f32 buffer to fp32 (exact). */
void tpk_to_f32(float *dst, const void *src, tp_dtype dt, size_t count);

#endif
