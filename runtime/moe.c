/* moe.c - the sparse (mixture-of-experts) MLP of qwen3_moe and mixtral on
 * the CPU, as transformers computes it (Qwen3MoeSparseMoeBlock,
 * MixtralSparseMoeBlock): router logits h . R^T, softmax over all experts
 * in fp32, the top k, renormalised when norm_topk_prob; every token's
 * output is sum_k weight_k * down_e(silu(gate_e(h)) * up_e(h)).
 *
 * The tokens are grouped by expert, so that each local expert runs once,
 * as one matrix product over the tokens routed to it (prefill), and an
 * expert no token chose is never read (a decode step touches top_k
 * experts).  The matrices are read in place in their stored dtype by
 * runtime/gemm_cpu (the router and every expert matmul), on the model's
 * thread pool.
 */
#include "gemm_cpu.h"
#include "kernels_cpu.h"
#include "model_layers.h"

#include <stdlib.h>
#include <string.h>

void tp_moe_scratch_free(tp_moe_scratch *s)
{
    if (!s)
        return;
    free(s->logits); free(s->weight); free(s->x); free(s->g); free(s->u); free(s->y);
    free(s->idx); free(s->count); free(s->slot_tok); free(s->slot_w);
    memset(s, 0, sizeof *s);
}

static int grow(void **p, size_t bytes)
{
    void *q = realloc(*p, bytes ? bytes : 1);
    if (!q)
        return -1;
    *p = q;
    return 0;
}

static int scratch_reserve(tp_moe_scratch *s, const tp_moe_weights *w, int n, int hidden, tp_err *err)
{
    if ((size_t)n <= s->cap_n && s->count)
        return 0;
    size_t N = (size_t)n, E = (size_t)w->n_experts, K = (size_t)w->top_k, H = (size_t)hidden;
    size_t I = (size_t)w->inter;
    if (grow((void **)&s->logits, N * E * sizeof(float)) < 0 ||
        grow((void **)&s->weight, N * K * sizeof(float)) < 0 ||
        grow((void **)&s->idx, N * K * sizeof(int)) < 0 ||
        grow((void **)&s->x, N * H * sizeof(float)) < 0 ||
        grow((void **)&s->y, N * H * sizeof(float)) < 0 ||
        grow((void **)&s->g, N * I * sizeof(float)) < 0 ||
        grow((void **)&s->u, N * I * sizeof(float)) < 0 ||
        grow((void **)&s->count, (E + 1) * sizeof(int)) < 0 ||
        grow((void **)&s->slot_tok, N * K * sizeof(int)) < 0 ||
        grow((void **)&s->slot_w, N * K * sizeof(float)) < 0)
        return tp_errorf(err, "moe: out of memory for %d tokens", n);
    s->cap_n = N;
    return 0;
}

/* y[m][H] = down . (silu(gate . x) * (up . x)) for one local expert e over
 * m gathered rows x[m][H]; g and u are [m][inter] scratch. */
static void expert_ffn(const tp_moe_weights *w, int e, const float *x, int m, int hidden, float *g,
                       float *u, float *y, tp_pool *pool)
{
    tpg_job gate_up[2] = { tp_mat_job(g, x, m, w->gate[e], w->inter, hidden),
                           tp_mat_job(u, x, m, w->up[e], w->inter, hidden) };
    tpg_matmul_batch(gate_up, 2, pool);
    tpk_silu_mul(g, u, (size_t)m * (size_t)w->inter);
    tpg_job down = tp_mat_job(y, g, m, w->down[e], hidden, w->inter);
    tpg_matmul_batch(&down, 1, pool);
}

void tp_moe_group_by_expert(const tp_moe_weights *w, int n, const int *idx, const float *weight, int *count,
                            int *slot_tok, float *slot_w)
{
    int nl = w->expert_hi - w->expert_lo;
    memset(count, 0, (size_t)(nl + 1) * sizeof(int));
    for (int i = 0; i < n * w->top_k; i++) {
        int e = idx[i] - w->expert_lo;
        if (e >= 0 && e < nl)
            count[e + 1]++;
    }
    for (int e = 0; e < nl; e++)
        count[e + 1] += count[e];
    /* fill in token order, so each expert's rows are in token order */
    int fill[nl > 0 ? nl : 1];
    memcpy(fill, count, (size_t)nl * sizeof(int));
    for (int i = 0; i < n * w->top_k; i++) {
        int e = idx[i] - w->expert_lo;
        if (e < 0 || e >= nl)
            continue;
        slot_tok[fill[e]] = i / w->top_k;
        slot_w[fill[e]] = weight[i];
        fill[e]++;
    }
}

int tp_moe_forward(const tp_moe_weights *w, const float *h, int n, int hidden, float *out,
                   tp_moe_scratch *s, tp_pool *pool, tp_err *err)
{
    if (scratch_reserve(s, w, n, hidden, err) < 0)
        return -1;
    const size_t H = (size_t)hidden;
    tpg_job router = tp_mat_job(s->logits, h, n, w->router, w->n_experts, hidden);
    tpg_matmul_batch(&router, 1, pool);
    for (int t = 0; t < n; t++)
        tpk_router_topk(s->logits + (size_t)t * (size_t)w->n_experts, w->n_experts, w->top_k,
                        w->renorm, s->idx + (size_t)t * (size_t)w->top_k,
                        s->weight + (size_t)t * (size_t)w->top_k);
    tp_moe_group_by_expert(w, n, s->idx, s->weight, s->count, s->slot_tok, s->slot_w);
    memset(out, 0, (size_t)n * H * sizeof(float));
    for (int e = 0; e < w->expert_hi - w->expert_lo; e++) {
        int lo = s->count[e], m = s->count[e + 1] - lo;
        if (m == 0)
            continue;   /* never read: no token chose it */
        for (int j = 0; j < m; j++)
            memcpy(s->x + (size_t)j * H, h + (size_t)s->slot_tok[lo + j] * H, H * sizeof(float));
        expert_ffn(w, e, s->x, m, hidden, s->g, s->u, s->y, pool);
        for (int j = 0; j < m; j++) {
            float *o = out + (size_t)s->slot_tok[lo + j] * H;
            const float *y = s->y + (size_t)j * H;
            float wt = s->slot_w[lo + j];
            for (size_t i = 0; i < H; i++)
                o[i] += wt * y[i];
        }
    }
    return 0;
}
