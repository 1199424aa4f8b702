/* test_model.c - the model and its tensor-parallel forward pass.
 *
 * Ranks run in this process as threads joined by a small in-memory comm
 * (barrier-based all-reduce / all-gather), each fed its own rank built here
 * by slicing the full weights the way tpconvert's plan does (colwise q/k/v,
 * gate/up; rowwise o/down with reduce_bias biases; kv heads replicated when
 * there are fewer than ranks; vocabulary rows of lm_head; optionally a
 * vocab-parallel embedding).  No MPI, no converter needed.
 *
 *  1. synthetic models covering every feature (qk-norm, q/k/v/o/mlp biases,
 *     sliding windows, llama3 RoPE, tied / vocab-parallel embeddings, kv
 *     replication, odd vocabularies, bf16/f16/f32) against a naive
 *     double-precision forward written out below, at tp 1, 2, 4, prefill and
 *     decode;
 *  2. every tests/models/<name>/ against its reference.json (transformers,
 *     fp32): last-position logits of each prompt and the greedy tokens, at
 *     tp 1, 2 and 4;
 *  3. config parsing and the errors that name the key or the tensor;
 *  4. 8-bit weights (fp8 with block scales, int8 with row scales; FORMAT.md
 *     1.5) against the same model with the dequantized weights in f32, at
 *     tp 1, 2, 4, with blocks that the slices cut through.
 *
 * Tolerance: the weights are bf16 values, exact in fp32, so the runtime and
 * transformers (fp32) compute the same function and differ only in the
 * order of fp32 summations (matmul, softmax, norms, and across ranks the
 * all-reduce): about 1e-6 relative per dot product, growing slowly through
 * the layers.  We accept |diff| <= 1e-3 * max(1, max |reference logit|) for
 * transformers (whose logits are stored to 6 significant digits) and
 * 1e-4 * max(1, max |logit|) against the double-precision naive forward and
 * between tp sizes.  A real bug (a wrong head mapping, a bias added twice, a
 * RoPE pair swapped) moves logits by O(0.1 .. 1).
 */
#include "runtime.h"

#include <cJSON.h>
#include <dirent.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "check.h"

#define MAX_WORLD 8

/* ------------------------------------------------------- in-memory comm */

typedef struct hub {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int world, arrived;
    unsigned gen;
    const void *ptr[MAX_WORLD];
} hub;

static int hub_barrier(tp_comm *c, tp_err *err)
{
    hub *h = c->impl;
    pthread_mutex_lock(&h->mu);
    unsigned gen = h->gen;
    if (++h->arrived == h->world) {
        h->arrived = 0;
        h->gen++;
        pthread_cond_broadcast(&h->cv);
        pthread_mutex_unlock(&h->mu);
        return 0;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += (time_t)c->timeout_s;
    while (h->gen == gen) {
        if (pthread_cond_timedwait(&h->cv, &h->mu, &ts) != 0 && h->gen == gen) {
            pthread_mutex_unlock(&h->mu);
            return tp_errorf(err, "test comm: rank %d timed out at a barrier", c->rank);
        }
    }
    pthread_mutex_unlock(&h->mu);
    return 0;
}

static int hub_allreduce(tp_comm *c, float *buf, size_t n, tp_err *err)
{
    hub *h = c->impl;
    h->ptr[c->rank] = buf;
    if (hub_barrier(c, err) < 0)
        return -1;
    float *sum = calloc(n ? n : 1, sizeof *sum);
    for (int r = 0; r < c->world; r++) {       /* same order on every rank */
        const float *b = h->ptr[r];
        for (size_t i = 0; i < n; i++)
            sum[i] += b[i];
    }
    int rc = hub_barrier(c, err);
    if (rc == 0)
        memcpy(buf, sum, n * sizeof *sum);
    free(sum);
    return rc;
}

static int hub_allgather(tp_comm *c, const float *send, float *recv, size_t n, tp_err *err)
{
    hub *h = c->impl;
    h->ptr[c->rank] = send;
    if (hub_barrier(c, err) < 0)
        return -1;
    for (int r = 0; r < c->world; r++)
        memcpy(recv + (size_t)r * n, h->ptr[r], n * sizeof(float));
    return hub_barrier(c, err);
}

static int hub_broadcast(tp_comm *c, void *buf, size_t bytes, int root, tp_err *err)
{
    hub *h = c->impl;
    h->ptr[c->rank] = buf;
    if (hub_barrier(c, err) < 0)
        return -1;
    if (c->rank != root)
        memcpy(buf, h->ptr[root], bytes);
    return hub_barrier(c, err);
}

static void hub_close(tp_comm *c) { (void)c; }

static const tp_comm_ops hub_ops = {
    .name = "test-threads", .allreduce_sum_f32 = hub_allreduce, .allgather_f32 = hub_allgather,
    .broadcast = hub_broadcast, .barrier = hub_barrier, .close = hub_close,
};

/* ------------------------------------------------- source models, sharding */

typedef struct src_tensor {
    char name[160];
    tp_dtype dt;
    int ndim;
    uint64_t shape[2];
    const uint8_t *bytes;
    uint8_t *owned;
} src_tensor;

typedef struct src_model {
    char name[64];
    char *config_json;
    size_t n;
    src_tensor t[512];
    /* what the sharder needs to know */
    int n_heads, n_kv, head_dim, intermediate, vocab;
    bool vocab_parallel;
    int q_block[2];   /* fp8 weight_block_size: how *.weight_scale_inv is cut */
} src_model;

static float src_val(const src_tensor *t, size_t i)
{
    uint16_t h;
    switch (t->dt) {
    case TP_BF16: memcpy(&h, t->bytes + 2 * i, 2); return tp_bf16_to_f32(h);
    case TP_F16: memcpy(&h, t->bytes + 2 * i, 2); return tp_f16_to_f32(h);
    case TP_F8_E4M3: return tp_f8e4m3_to_f32(t->bytes[i]);
    case TP_I8: return (float)(int8_t)t->bytes[i];
    default: { float f; memcpy(&f, t->bytes + 4 * i, 4); return f; }
    }
}

static const src_tensor *src_find(const src_model *s, const char *name)
{
    for (size_t i = 0; i < s->n; i++)
        if (strcmp(s->t[i].name, name) == 0)
            return &s->t[i];
    return NULL;
}

static bool ends_with(const char *s, const char *suf)
{
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

static void plan_split(const src_model *s, const src_tensor *t, int rank, int world, tp_split *sp,
                       bool *reduce_bias);

/* A scale tensor is cut along its weight's split (FORMAT.md 1.5): fp8 block
 * rows / columns [floor(start / B), ceil(end / B)), so that neighbouring
 * ranks may share a block; int8 row scales like a colwise weight's rows,
 * whole for a rowwise one.  False when t is not a scale tensor. */
static bool plan_scale_split(const src_model *s, const src_tensor *t, int rank, int world,
                             tp_split *sp)
{
    bool fp8 = ends_with(t->name, ".weight_scale_inv");
    if (!fp8 && !ends_with(t->name, ".weight_scale"))
        return false;
    char wname[160];
    snprintf(wname, sizeof wname, "%.*s", (int)(strstr(t->name, ".weight_scale") - t->name + 7),
             t->name);
    const src_tensor *w = src_find(s, wname);
    bool rb;
    plan_split(s, w, rank, world, sp, &rb);
    if (sp->dim < 0)
        return true;
    if (!fp8) {
        if (sp->dim == 1)
            sp->dim = -1;
        return true;
    }
    uint64_t b = (uint64_t)s->q_block[sp->dim];
    sp->start[0] /= b;
    sp->end[0] = (sp->end[0] + b - 1) / b;
    return true;
}

/* The plan: which dim is split and this rank's range of it. */
static void plan_split(const src_model *s, const src_tensor *t, int rank, int world, tp_split *sp,
                       bool *reduce_bias)
{
    memset(sp, 0, sizeof *sp);
    sp->dim = -1;
    *reduce_bias = false;
    if (world == 1 || plan_scale_split(s, t, rank, world, sp))
        return;
    const char *n = t->name;
    uint64_t rows = t->shape[0];
    long layer, expert;   /* experts: mixtral's w1/w3 colwise, w2 rowwise, like gate/up/down */
    tp_expert_part part = tp_arch_expert_part(n, &layer, &expert);
    bool colwise = strstr(n, "q_proj.") || strstr(n, "k_proj.") || strstr(n, "v_proj.") ||
                   strstr(n, "gate_proj.") || strstr(n, "up_proj.") || part == TP_EXPERT_GATE ||
                   part == TP_EXPERT_UP;
    bool rowwise = strstr(n, "o_proj.") || strstr(n, "down_proj.") || part == TP_EXPERT_DOWN;
    if (colwise) {
        sp->dim = 0;
        sp->n_ranges = 1;
        if ((strstr(n, "k_proj.") || strstr(n, "v_proj.")) && s->n_kv < world) {
            int kvh = rank / (world / s->n_kv);   /* replicated kv head */
            sp->start[0] = (uint64_t)kvh * s->head_dim;
            sp->end[0] = sp->start[0] + s->head_dim;
        } else {
            sp->start[0] = rows / world * rank;
            sp->end[0] = rows / world * (rank + 1);
        }
    } else if (rowwise) {
        if (ends_with(n, ".bias")) {
            *reduce_bias = true;
        } else {
            uint64_t cols = t->shape[1];
            sp->dim = 1;
            sp->n_ranges = 1;
            sp->start[0] = cols / world * rank;
            sp->end[0] = cols / world * (rank + 1);
        }
    } else if (strcmp(n, "lm_head.weight") == 0 ||
               (strcmp(n, "model.embed_tokens.weight") == 0 && s->vocab_parallel)) {
        uint64_t per = (rows + world - 1) / world;
        sp->dim = 0;
        sp->n_ranges = 1;
        sp->start[0] = per * rank < rows ? per * rank : rows;
        sp->end[0] = per * (rank + 1) < rows ? per * (rank + 1) : rows;
    }
}

typedef struct built_rank {
    tp_loaded_rank lr;
    tp_shard_tensor *infos;
    tp_loaded_tensor *lts;
} built_rank;

static void build_rank(built_rank *b, const src_model *s, int rank, int world)
{
    memset(b, 0, sizeof *b);
    b->infos = calloc(s->n, sizeof *b->infos);
    b->lts = calloc(s->n, sizeof *b->lts);
    for (size_t i = 0; i < s->n; i++) {
        const src_tensor *t = &s->t[i];
        tp_shard_tensor *in = &b->infos[i];
        in->name = (char *)t->name;
        in->dtype = t->dt;
        in->ndim = t->ndim;
        plan_split(s, t, rank, world, &in->split, &in->reduce_bias);
        size_t es = tp_dtype_size(t->dt);
        uint64_t rows = t->shape[0], cols = t->ndim == 2 ? t->shape[1] : 1;
        uint64_t r0 = 0, r1 = rows, c0 = 0, c1 = cols;
        if (in->split.dim == 0) { r0 = in->split.start[0]; r1 = in->split.end[0]; }
        if (in->split.dim == 1) { c0 = in->split.start[0]; c1 = in->split.end[0]; }
        for (int d = 0; d < t->ndim; d++)
            in->global_shape[d] = in->shape[d] = t->shape[d];
        in->shape[0] = r1 - r0;
        if (t->ndim == 2)
            in->shape[1] = c1 - c0;
        in->raw_size = (r1 - r0) * (c1 - c0) * es;
        uint8_t *data = malloc(in->raw_size ? in->raw_size : 1);
        for (uint64_t r = r0; r < r1; r++)
            memcpy(data + (r - r0) * (c1 - c0) * es, t->bytes + (r * cols + c0) * es,
                   (c1 - c0) * es);
        b->lts[i].info = in;
        b->lts[i].data = data;
    }
    b->lr.rank = rank;
    b->lr.manifest.tp = world;
    b->lr.manifest.config_json = s->config_json;
    b->lr.source = (char *)s->name;
    b->lr.n_tensors = s->n;
    b->lr.tensors = b->lts;
}

static void free_rank(built_rank *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free((void *)b->lts[i].data);
    free(b->lts);
    free(b->infos);
}

/* ------------------------------------------------- running ranks as threads */

typedef struct rank_job {
    tp_loaded_rank *lr;
    tp_comm *comm;
    const int32_t *ids;
    int n_prefill, n_steps, vocab;
    float *logits;          /* [n_steps][vocab] */
    int rc;
    tp_err err;
} rank_job;

static int g_threads = 1;   /* CPU threads of each rank's model */
/* tp_model_opts.device of each rank's model (test_model_cuda.c, which
 * includes this file, switches it to "cuda"). */
static const char *g_device = "cpu";

/* tp_model_forward_pick against the logits rank_main just got: greedy must
 * pick their argmax (after the prefill, and after one decode step), exactly;
 * sampling must draw what tp_sample draws from them with the same rng, and
 * leave the rng where tp_sample leaves it. */
static int check_picks(tp_model *m, rank_job *j)
{
    tp_sampler_opts greedy = { .temperature = 0 };
    tp_sampler_opts sampled = { .temperature = 0.8f, .top_k = 20, .top_p = 0.9f };
    tp_rng r_model, r_ref;
    tp_rng_seed(&r_model, 7);
    tp_rng_seed(&r_ref, 7);
    int32_t got, want;
    tp_model_reset(m);
    if (tp_model_forward_pick(m, j->ids, j->n_prefill, &greedy, &r_model, &got, &j->err) < 0)
        return -1;
    if (got != (want = tp_sample(j->logits, j->vocab, &greedy, &r_ref, NULL)))
        return tp_errorf(&j->err, "greedy pick after the prefill: %d, argmax of the logits %d", got, want);
    if (j->n_steps > 1) {
        if (tp_model_forward_pick(m, j->ids + j->n_prefill, 1, &greedy, &r_model, &got, &j->err) < 0)
            return -1;
        if (got != (want = tp_sample(j->logits + j->vocab, j->vocab, &greedy, &r_ref, NULL)))
            return tp_errorf(&j->err, "greedy pick after a decode step: %d, argmax of the logits %d", got, want);
    }
    tp_model_reset(m);
    if (tp_model_forward_pick(m, j->ids, j->n_prefill, &sampled, &r_model, &got, &j->err) < 0)
        return -1;
    if (got != (want = tp_sample(j->logits, j->vocab, &sampled, &r_ref, NULL)))
        return tp_errorf(&j->err, "sampled pick after the prefill: %d, tp_sample %d", got, want);
    if (memcmp(&r_model, &r_ref, sizeof r_ref) != 0)
        return tp_errorf(&j->err, "the pick drew from the rng differently from tp_sample");
    return 0;
}

/* Prefills ids[0..n_prefill) (logits step 0), then decodes ids[n_prefill ..]
 * one at a time (logits steps 1..); then resets and prefills again, which
 * must give bit-identical step-0 logits; then check_picks. */
static void *rank_main(void *arg)
{
    rank_job *j = arg;
    tp_model *m = NULL;
    tp_model_opts o = { .max_seq = 256, .threads = g_threads, .device = g_device };
    j->rc = -1;
    if (tp_model_create(&m, j->lr, j->comm, &o, &j->err) < 0)
        return NULL;
    if (tp_model_forward(m, j->ids, j->n_prefill, j->logits, &j->err) < 0)
        goto out;
    for (int s = 1; s < j->n_steps; s++)
        if (tp_model_forward(m, j->ids + j->n_prefill + s - 1, 1,
                             j->logits + (size_t)s * j->vocab, &j->err) < 0)
            goto out;
    if (tp_model_position(m) != j->n_prefill + j->n_steps - 1) {
        tp_errorf(&j->err, "position %d after the run", tp_model_position(m));
        goto out;
    }
    tp_model_reset(m);
    float *again = malloc((size_t)j->vocab * sizeof *again);
    if (tp_model_forward(m, j->ids, j->n_prefill, again, &j->err) < 0) {
        free(again);
        goto out;
    }
    if (memcmp(again, j->logits, (size_t)j->vocab * sizeof *again) != 0)
        tp_errorf(&j->err, "logits after tp_model_reset differ from the first run");
    else if (check_picks(m, j) == 0)
        j->rc = 0;
    free(again);
out:
    tp_model_free(m);
    return NULL;
}

/* Runs the ranks lrs[0..world) as threads; on success logits (of rank 0,
 * checked equal on every rank) is [n_steps][vocab]. */
static int run_ranks(const char *name, tp_loaded_rank **lrs, int world, int vocab,
                     const int32_t *ids, int n_prefill, int n_steps, float *logits)
{
    tp_comm comms[MAX_WORLD];
    rank_job jobs[MAX_WORLD];
    pthread_t th[MAX_WORLD];
    hub h = { .world = world };
    pthread_mutex_init(&h.mu, NULL);
    pthread_cond_init(&h.cv, NULL);
    size_t per = (size_t)n_steps * vocab;
    for (int r = 0; r < world; r++) {
        comms[r] = (tp_comm){ .ops = &hub_ops, .rank = r, .world = world, .timeout_s = 20,
                              .impl = &h };
        jobs[r] = (rank_job){ .lr = lrs[r], .comm = &comms[r], .ids = ids, .n_prefill = n_prefill,
                              .n_steps = n_steps, .vocab = vocab,
                              .logits = malloc(per * sizeof(float)) };
        pthread_create(&th[r], NULL, rank_main, &jobs[r]);
    }
    int rc = 0;
    for (int r = 0; r < world; r++) {
        pthread_join(th[r], NULL);
        if (jobs[r].rc < 0) {
            CHECK(0, "%s tp=%d rank %d: %s", name, world, r, jobs[r].err.msg);
            rc = -1;
        }
    }
    if (rc == 0) {
        memcpy(logits, jobs[0].logits, per * sizeof(float));
        for (int r = 1; r < world; r++)
            CHECK(memcmp(jobs[r].logits, logits, per * sizeof(float)) == 0,
                  "%s tp=%d: rank %d's logits differ from rank 0's", name, world, r);
    }
    for (int r = 0; r < world; r++)
        free(jobs[r].logits);
    pthread_mutex_destroy(&h.mu);
    pthread_cond_destroy(&h.cv);
    return rc;
}

/* The same from full weights cut here at tp = world. */
static int run_tp(const src_model *s, int world, const int32_t *ids, int n_prefill, int n_steps,
                  float *logits)
{
    built_rank br[MAX_WORLD];
    tp_loaded_rank *lrs[MAX_WORLD];
    for (int r = 0; r < world; r++) {
        build_rank(&br[r], s, r, world);
        lrs[r] = &br[r].lr;
    }
    int rc = run_ranks(s->name, lrs, world, s->vocab, ids, n_prefill, n_steps, logits);
    for (int r = 0; r < world; r++)
        free_rank(&br[r], s->n);
    return rc;
}

/* max |a - b| / max(1, max |b|) */
static double logit_err(const float *a, const float *b, int n)
{
    double mx = 1.0, d = 0.0;
    for (int i = 0; i < n; i++) {
        if (fabs(b[i]) > mx) mx = fabs(b[i]);
        double e = fabs((double)a[i] - b[i]);
        if (!(e <= d)) d = e;
    }
    return d / mx;
}

static int argmax(const float *v, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

/* --------------------------------------------------- batched sequences */

/* BATCH_PROMPTS prompts of mixed lengths, run twice on every rank: one at
 * a time (tp_model_forward, prefill in chunks of BATCH_CHUNK tokens, then
 * BATCH_GEN - 1 greedy decode steps), and as continuous batching does it
 * through tp_model_forward_batch: BATCH_SLOTS slots, fewer than the
 * prompts, so slots are freed and reused; each step holds the running
 * sequences' decode tokens and the new prompts' next chunks, in a slot order
 * that alternates, and on odd steps a chunk is cut in two around the other
 * slots' tokens (one slot's tokens in two runs).  The same chunks give
 * dynamic / longrope RoPE the same pass lengths both ways.  Greedy tokens
 * must be identical, logits within 1e-5 (relative, logit_err). */
enum { BATCH_PROMPTS = 6, BATCH_GEN = 6, BATCH_SLOTS = 3, BATCH_CHUNK = 8 };
static const int BATCH_LENS[BATCH_PROMPTS] = { 13, 2, 40, 21, 1, 9 };
#define BATCH_TOL 1e-5

typedef struct batch_job {
    tp_loaded_rank *lr;
    tp_comm *comm;
    int vocab;
    int32_t *const *prompts;            /* [BATCH_PROMPTS], lengths BATCH_LENS */
    float *ref;                         /* [prompt][gen][vocab], one at a time */
    int32_t ref_tok[BATCH_PROMPTS][BATCH_GEN];
    int32_t tok[BATCH_PROMPTS][BATCH_GEN];   /* batched */
    double worst;                       /* max logit_err batched vs one at a time */
    int steps, max_step;                /* batched steps, most tokens in one */
    int rc;
    tp_err err;
} batch_job;

static float *ref_row(batch_job *j, int p, int g)
{
    return j->ref + ((size_t)p * BATCH_GEN + (size_t)g) * (size_t)j->vocab;
}

static int batch_one_at_a_time(tp_model *m, batch_job *j)
{
    for (int p = 0; p < BATCH_PROMPTS; p++) {
        tp_model_reset(m);
        for (int off = 0; off < BATCH_LENS[p]; off += BATCH_CHUNK) {
            int n = BATCH_LENS[p] - off < BATCH_CHUNK ? BATCH_LENS[p] - off : BATCH_CHUNK;
            bool last = off + n == BATCH_LENS[p];
            if (tp_model_forward(m, j->prompts[p] + off, n, last ? ref_row(j, p, 0) : NULL, &j->err) < 0)
                return -1;
        }
        for (int g = 0;; g++) {
            j->ref_tok[p][g] = argmax(ref_row(j, p, g), j->vocab);
            if (g + 1 == BATCH_GEN)
                break;
            if (tp_model_forward(m, &j->ref_tok[p][g], 1, ref_row(j, p, g + 1), &j->err) < 0)
                return -1;
        }
    }
    return 0;
}

typedef struct batch_seq {
    int prompt;     /* -1: the slot is free */
    int fed;        /* prompt tokens in the cache (or in this step) */
    int gen;        /* tokens generated */
    int cached;     /* positions the slot's cache holds after this step */
} batch_seq;

/* Prompt tokens slot s's sequence takes in a step: a chunk. */
static int batch_chunk(const batch_seq *q)
{
    int left = BATCH_LENS[q->prompt] - q->fed;
    return left < BATCH_CHUNK ? left : BATCH_CHUNK;
}

/* Appends slot s's tokens to the step t (*n): take more of its prompt
 * (while it has some left), or its last generated token. */
static void batch_push(batch_job *j, batch_seq *q, int s, tp_batch_token *t, int *n, int take)
{
    int p = q->prompt, len = BATCH_LENS[p];
    if (q->fed < len)
        for (int i = 0; i < take; i++, q->fed++)
            t[(*n)++] = (tp_batch_token){ s, j->prompts[p][q->fed], q->fed, q->fed == len - 1 };
    else
        t[(*n)++] = (tp_batch_token){ s, j->tok[p][q->gen - 1], len + q->gen - 1, true };
    q->cached = q->fed < len ? q->fed : len + q->gen;
}

static int batch_continuous(tp_model *m, batch_job *j)
{
    batch_seq q[BATCH_SLOTS];
    for (int s = 0; s < BATCH_SLOTS; s++)
        q[s] = (batch_seq){ .prompt = -1 };
    tp_batch_token t[BATCH_SLOTS * BATCH_CHUNK];
    float *logits = malloc((size_t)BATCH_SLOTS * j->vocab * sizeof *logits);
    bool diverged[BATCH_PROMPTS] = { false };
    int next = 0, done = 0, rc = -1;
    for (j->steps = 0; done < BATCH_PROMPTS; j->steps++) {
        for (int s = 0; s < BATCH_SLOTS; s++)
            if (q[s].prompt < 0 && next < BATCH_PROMPTS) {
                if (tp_model_slot_length(m, s) != 0) {
                    tp_errorf(&j->err, "slot %d holds %d positions after its reset", s, tp_model_slot_length(m, s));
                    goto out;
                }
                q[s] = (batch_seq){ .prompt = next++ };
            }
        int n = 0, rest = 0, rest_slot = -1;
        bool odd = j->steps % 2;
        for (int i = 0; i < BATCH_SLOTS; i++) {
            int s = odd ? BATCH_SLOTS - 1 - i : i;
            if (q[s].prompt < 0)
                continue;
            int c = q[s].fed < BATCH_LENS[q[s].prompt] ? batch_chunk(&q[s]) : 0;
            if (odd && rest_slot < 0 && c >= 2) {   /* the chunk's first half now */
                rest = c - c / 2;
                rest_slot = s;
                c /= 2;
            }
            batch_push(j, &q[s], s, t, &n, c);
        }
        if (rest_slot >= 0)   /* the cut chunk's second half, after the other slots */
            batch_push(j, &q[rest_slot], rest_slot, t, &n, rest);
        if (n > j->max_step)
            j->max_step = n;
        if (tp_model_forward_batch(m, t, n, logits, &j->err) < 0)
            goto out;
        int row = 0;
        for (int i = 0; i < n; i++) {
            if (!t[i].logits)
                continue;
            batch_seq *sq = &q[t[i].slot];
            int p = sq->prompt, g = sq->gen++;
            const float *got = logits + (size_t)row++ * j->vocab;
            j->tok[p][g] = argmax(got, j->vocab);
            if (!diverged[p]) {   /* past a different token the inputs differ */
                double e = logit_err(got, ref_row(j, p, g), j->vocab);
                if (e > j->worst)
                    j->worst = e;
                diverged[p] = j->tok[p][g] != j->ref_tok[p][g];
            }
        }
        for (int s = 0; s < BATCH_SLOTS; s++) {
            if (q[s].prompt < 0)
                continue;
            if (tp_model_slot_length(m, s) != q[s].cached) {
                tp_errorf(&j->err, "step %d: slot %d holds %d positions, %d were fed", j->steps, s,
                          tp_model_slot_length(m, s), q[s].cached);
                goto out;
            }
            if (q[s].gen == BATCH_GEN) {   /* finished: its slot goes to the next prompt */
                tp_model_reset_slot(m, s);
                q[s].prompt = -1;
                done++;
            }
        }
    }
    rc = 0;
out:
    free(logits);
    return rc;
}

static void *batch_rank_main(void *arg)
{
    batch_job *j = arg;
    tp_model *one = NULL, *many = NULL;
    tp_model_opts o1 = { .max_seq = 64, .threads = g_threads, .device = "cpu" };
    tp_model_opts ob = { .max_seq = 64, .threads = g_threads, .device = "cpu", .slots = BATCH_SLOTS };
    j->rc = -1;
    if (tp_model_create(&one, j->lr, j->comm, &o1, &j->err) == 0 && batch_one_at_a_time(one, j) == 0 &&
        tp_model_create(&many, j->lr, j->comm, &ob, &j->err) == 0 && tp_model_slots(many) == BATCH_SLOTS &&
        batch_continuous(many, j) == 0)
        j->rc = 0;
    tp_model_free(one);
    tp_model_free(many);
    return NULL;
}

/* The batched run against one at a time, ranks lrs[0..world) as threads. */
static void check_batched(const char *name, tp_loaded_rank **lrs, int world, int vocab)
{
    int32_t *prompts[BATCH_PROMPTS];
    check_rng rng = { 0x9e3779b97f4a7c15ull ^ (uint64_t)vocab };
    for (int p = 0; p < BATCH_PROMPTS; p++) {
        prompts[p] = malloc((size_t)BATCH_LENS[p] * sizeof *prompts[p]);
        for (int i = 0; i < BATCH_LENS[p]; i++)
            prompts[p][i] = (int32_t)(check_rng_uniform(&rng) * vocab);
    }
    tp_comm comms[MAX_WORLD];
    batch_job *jobs = calloc((size_t)world, sizeof *jobs);
    pthread_t th[MAX_WORLD];
    hub h = { .world = world };
    pthread_mutex_init(&h.mu, NULL);
    pthread_cond_init(&h.cv, NULL);
    for (int r = 0; r < world; r++) {
        comms[r] = (tp_comm){ .ops = &hub_ops, .rank = r, .world = world, .timeout_s = 20, .impl = &h };
        jobs[r] = (batch_job){ .lr = lrs[r], .comm = world > 1 ? &comms[r] : NULL, .vocab = vocab,
                               .prompts = prompts,
                               .ref = malloc((size_t)BATCH_PROMPTS * BATCH_GEN * vocab * sizeof(float)) };
        pthread_create(&th[r], NULL, batch_rank_main, &jobs[r]);
    }
    bool ran = true;
    for (int r = 0; r < world; r++) {
        pthread_join(th[r], NULL);
        if (jobs[r].rc < 0) {
            CHECK(0, "%s tp=%d rank %d batched: %s", name, world, r, jobs[r].err.msg);
            ran = false;
        }
    }
    if (ran) {
        batch_job *j = &jobs[0];
        int differ = 0;
        for (int p = 0; p < BATCH_PROMPTS; p++)
            for (int g = 0; g < BATCH_GEN; g++)
                differ += j->tok[p][g] != j->ref_tok[p][g];
        CHECK(differ == 0, "%s tp=%d: %d of %d greedy tokens batched differ from one at a time", name, world,
              differ, BATCH_PROMPTS * BATCH_GEN);
        CHECK(j->worst <= BATCH_TOL, "%s tp=%d: batched logits differ from one at a time by %g (relative)",
              name, world, j->worst);
        for (int r = 1; r < world; r++)
            CHECK(memcmp(jobs[r].tok, j->tok, sizeof j->tok) == 0, "%s tp=%d: rank %d's batched tokens differ",
                  name, world, r);
        printf("%-28s tp=%d  batched (%d prompts, %d slots, %d steps, up to %d tokens a step): greedy %d/%d, "
               "max rel diff vs one at a time %.2e\n", name, world, BATCH_PROMPTS, BATCH_SLOTS, j->steps,
               j->max_step, BATCH_PROMPTS * BATCH_GEN - differ, BATCH_PROMPTS * BATCH_GEN, j->worst);
    }
    for (int r = 0; r < world; r++)
        free(jobs[r].ref);
    free(jobs);
    for (int p = 0; p < BATCH_PROMPTS; p++)
        free(prompts[p]);
    pthread_mutex_destroy(&h.mu);
    pthread_cond_destroy(&h.cv);
}

/* check_batched on full weights cut here at tp = world. */
static void check_batched_tp(const src_model *s, int world)
{
    built_rank br[MAX_WORLD];
    tp_loaded_rank *lrs[MAX_WORLD];
    for (int r = 0; r < world; r++) {
        build_rank(&br[r], s, r, world);
        lrs[r] = &br[r].lr;
    }
    check_batched(s->name, lrs, world, s->vocab);
    for (int r = 0; r < world; r++)
        free_rank(&br[r], s->n);
}

/* ------------------------------------------------------ synthetic models */

typedef struct spec {
    const char *name, *model_type;
    int hidden, layers, heads, kv, head_dim, inter, vocab;
    bool explicit_head_dim, tie, vocab_parallel, qkv_bias, o_bias, mlp_bias, new_rope_layout;
    float theta;
    bool llama3;
    int sliding, max_window_layers;   /* qwen2: use_sliding_window when sliding > 0 */
    tp_dtype dt;
    int tps[3];
} spec;

static const spec SPECS[] = {
    { "syn-qwen3", "qwen3", 48, 2, 4, 2, 16, 40, 37, true, true, false, false, false, false, true,
      1e6f, false, 0, 0, TP_BF16, { 1, 2, 4 } },
    { "syn-qwen2-sliding", "qwen2", 32, 3, 4, 2, 8, 24, 50, false, false, false, true, false, false,
      false, 1e6f, false, 3, 1, TP_F16, { 1, 2, 0 } },
    { "syn-llama3-vocab-parallel", "llama", 32, 2, 4, 1, 8, 24, 45, false, true, true, true, true,
      true, false, 1e4f, true, 0, 0, TP_F32, { 1, 2, 4 } },
    { "syn-mistral-sliding", "mistral", 32, 2, 4, 2, 8, 24, 41, true, false, false, false, false,
      false, true, 1e4f, false, 4, 0, TP_BF16, { 1, 2, 0 } },
};

static check_rng rng = {0x243f6a8885a308d3ull};

static uint16_t f32_to_f16(float f) /* small normal values only (|f| < 2) */
{
    if (f == 0.0f) return 0;
    uint16_t sign = f < 0 ? 0x8000 : 0;
    float a = fabsf(f);
    int e;
    float m = frexpf(a, &e);                 /* a = m * 2^e, m in [0.5, 1) */
    int exp16 = e - 1 + 15;
    if (exp16 <= 0) return sign;             /* flush tiny values */
    uint32_t mant = (uint32_t)lrintf((m * 2.0f - 1.0f) * 1024.0f);
    if (mant == 1024) { mant = 0; exp16++; }
    return (uint16_t)(sign | (exp16 << 10) | mant);
}

static void add_tensor(src_model *s, const spec *sp, const char *name, uint64_t r, uint64_t c,
                       double center, double scale)
{
    src_tensor *t = &s->t[s->n++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->dt = sp->dt;
    t->ndim = c ? 2 : 1;
    t->shape[0] = r;
    t->shape[1] = c;
    size_t cnt = r * (c ? c : 1), es = tp_dtype_size(sp->dt);
    t->owned = malloc(cnt * es);
    for (size_t i = 0; i < cnt; i++) {
        float v = (float)(center + scale * (2.0 * check_rng_uniform(&rng) - 1.0));
        if (sp->dt == TP_BF16) { uint16_t h = tp_f32_to_bf16(v); memcpy(t->owned + 2 * i, &h, 2); }
        else if (sp->dt == TP_F16) { uint16_t h = f32_to_f16(v); memcpy(t->owned + 2 * i, &h, 2); }
        else memcpy(t->owned + 4 * i, &v, 4);
    }
    t->bytes = t->owned;
}

static void make_synthetic(src_model *s, const spec *sp)
{
    memset(s, 0, sizeof *s);
    snprintf(s->name, sizeof s->name, "%s", sp->name);
    s->n_heads = sp->heads; s->n_kv = sp->kv; s->head_dim = sp->head_dim;
    s->intermediate = sp->inter; s->vocab = sp->vocab; s->vocab_parallel = sp->vocab_parallel;
    char rope[512], extra[512] = "", hd[64] = "";
    if (sp->new_rope_layout)
        snprintf(rope, sizeof rope, "\"rope_parameters\": {\"rope_type\": \"default\", "
                 "\"rope_theta\": %g}", sp->theta);
    else if (sp->llama3)
        snprintf(rope, sizeof rope, "\"rope_theta\": %g, \"rope_scaling\": {\"type\": \"llama3\", "
                 "\"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, "
                 "\"original_max_position_embeddings\": 64}", sp->theta);
    else
        snprintf(rope, sizeof rope, "\"rope_theta\": %g, \"rope_scaling\": null", sp->theta);
    if (sp->explicit_head_dim)
        snprintf(hd, sizeof hd, "\"head_dim\": %d,", sp->head_dim);
    if (strcmp(sp->model_type, "qwen2") == 0 && sp->sliding)
        snprintf(extra, sizeof extra, "\"use_sliding_window\": true, \"sliding_window\": %d, "
                 "\"max_window_layers\": %d,", sp->sliding, sp->max_window_layers);
    else if (strcmp(sp->model_type, "mistral") == 0)
        snprintf(extra, sizeof extra, "\"sliding_window\": %d,", sp->sliding);
    char cfg[2048];
    snprintf(cfg, sizeof cfg,
             "{\"model_type\": \"%s\", \"hidden_size\": %d, \"num_hidden_layers\": %d, "
             "\"num_attention_heads\": %d, \"num_key_value_heads\": %d, %s \"intermediate_size\": %d, "
             "\"vocab_size\": %d, \"max_position_embeddings\": 512, \"rms_norm_eps\": 1e-5, %s, "
             "\"tie_word_embeddings\": %s, \"attention_bias\": %s, \"mlp_bias\": %s, %s "
             "\"hidden_act\": \"silu\", \"bos_token_id\": 1, \"eos_token_id\": [2, 3]}",
             sp->model_type, sp->hidden, sp->layers, sp->heads, sp->kv, hd, sp->inter, sp->vocab,
             rope, sp->tie ? "true" : "false", sp->o_bias ? "true" : "false",
             sp->mlp_bias ? "true" : "false", extra);
    s->config_json = strdup(cfg);

    int H = sp->hidden, qd = sp->heads * sp->head_dim, kd = sp->kv * sp->head_dim;
    double w = 0.25;
    char n[160];
    add_tensor(s, sp, "model.embed_tokens.weight", sp->vocab, H, 0, 1.0);
    add_tensor(s, sp, "model.norm.weight", H, 0, 1.0, 0.3);
    if (!sp->tie)
        add_tensor(s, sp, "lm_head.weight", sp->vocab, H, 0, w);
    for (int l = 0; l < sp->layers; l++) {
#define N(suffix) (snprintf(n, sizeof n, "model.layers.%d.%s", l, suffix), n)
        add_tensor(s, sp, N("input_layernorm.weight"), H, 0, 1.0, 0.3);
        add_tensor(s, sp, N("post_attention_layernorm.weight"), H, 0, 1.0, 0.3);
        add_tensor(s, sp, N("self_attn.q_proj.weight"), qd, H, 0, w);
        add_tensor(s, sp, N("self_attn.k_proj.weight"), kd, H, 0, w);
        add_tensor(s, sp, N("self_attn.v_proj.weight"), kd, H, 0, w);
        add_tensor(s, sp, N("self_attn.o_proj.weight"), H, qd, 0, w);
        if (sp->qkv_bias) {
            add_tensor(s, sp, N("self_attn.q_proj.bias"), qd, 0, 0, 0.3);
            add_tensor(s, sp, N("self_attn.k_proj.bias"), kd, 0, 0, 0.3);
            add_tensor(s, sp, N("self_attn.v_proj.bias"), kd, 0, 0, 0.3);
        }
        if (sp->o_bias)
            add_tensor(s, sp, N("self_attn.o_proj.bias"), H, 0, 0, 0.3);
        if (strcmp(sp->model_type, "qwen3") == 0) {
            add_tensor(s, sp, N("self_attn.q_norm.weight"), sp->head_dim, 0, 1.0, 0.3);
            add_tensor(s, sp, N("self_attn.k_norm.weight"), sp->head_dim, 0, 1.0, 0.3);
        }
        add_tensor(s, sp, N("mlp.gate_proj.weight"), sp->inter, H, 0, w);
        add_tensor(s, sp, N("mlp.up_proj.weight"), sp->inter, H, 0, w);
        add_tensor(s, sp, N("mlp.down_proj.weight"), H, sp->inter, 0, w);
        if (sp->mlp_bias) {
            add_tensor(s, sp, N("mlp.gate_proj.bias"), sp->inter, 0, 0, 0.3);
            add_tensor(s, sp, N("mlp.up_proj.bias"), sp->inter, 0, 0, 0.3);
            add_tensor(s, sp, N("mlp.down_proj.bias"), H, 0, 0, 0.3);
        }
#undef N
    }
}

static void free_src(src_model *s)
{
    for (size_t i = 0; i < s->n; i++)
        free(s->t[i].owned);
    free(s->config_json);
}

/* ---------------------------------------------- naive double forward pass */

static double *dvec(const src_model *s, const char *name) /* NULL if absent */
{
    const src_tensor *t = src_find(s, name);
    if (!t) return NULL;
    size_t cnt = t->shape[0] * (t->ndim == 2 ? t->shape[1] : 1);
    double *v = malloc(cnt * sizeof *v);
    for (size_t i = 0; i < cnt; i++)
        v[i] = src_val(t, i);
    return v;
}

static void nrms(double *x, const double *w, int dim, double eps)
{
    double ss = 0;
    for (int i = 0; i < dim; i++) ss += x[i] * x[i];
    double sc = 1.0 / sqrt(ss / dim + eps);
    for (int i = 0; i < dim; i++) x[i] = x[i] * sc * w[i];
}

/* y[out] = W[out][in] x + b */
static void nlin(double *y, const double *w, const double *b, const double *x, int in, int out)
{
    for (int o = 0; o < out; o++) {
        double a = b ? b[o] : 0;
        for (int i = 0; i < in; i++) a += w[(size_t)o * in + i] * x[i];
        y[o] = a;
    }
}

static void nrope(double *v, int hd, int pos, const spec *sp)
{
    for (int i = 0; i < hd / 2; i++) {
        double f = pow(sp->theta, -2.0 * i / hd);
        if (sp->llama3) {   /* factor 8, low 1, high 4, original 64 */
            double wl = 2 * M_PI / f, lo_wl = 64.0 / 1.0, hi_wl = 64.0 / 4.0;
            if (wl > lo_wl) f /= 8.0;
            else if (wl >= hi_wl) {
                double sm = (64.0 / wl - 1.0) / (4.0 - 1.0);
                f = (1 - sm) * f / 8.0 + sm * f;
            }
        }
        double a = pos * f, x1 = v[i], x2 = v[i + hd / 2];
        v[i] = x1 * cos(a) - x2 * sin(a);
        v[i + hd / 2] = x2 * cos(a) + x1 * sin(a);
    }
}

/* Last-position logits of ids[0..n), from the full weights, all in double. */
static void naive_forward(const src_model *s, const spec *sp, const int32_t *ids, int n,
                          float *logits)
{
    int H = sp->hidden, hd = sp->head_dim, qd = sp->heads * hd, kd = sp->kv * hd, I = sp->inter;
    double eps = 1e-5;
    double *emb = dvec(s, "model.embed_tokens.weight");
    double *x = calloc((size_t)n * H, sizeof *x), *h = malloc((size_t)H * sizeof *h);
    double *q = malloc((size_t)n * qd * sizeof *q), *k = malloc((size_t)n * kd * sizeof *k);
    double *v = malloc((size_t)n * kd * sizeof *v), *att = malloc((size_t)qd * sizeof *att);
    double *o = malloc((size_t)H * sizeof *o), *g = malloc((size_t)I * sizeof *g);
    double *u = malloc((size_t)I * sizeof *u), *sc = malloc((size_t)n * sizeof *sc);
    for (int t = 0; t < n; t++)
        memcpy(x + (size_t)t * H, emb + (size_t)ids[t] * H, (size_t)H * sizeof *x);
    char nm[160];
    for (int l = 0; l < sp->layers; l++) {
#define W(suffix) (snprintf(nm, sizeof nm, "model.layers.%d.%s", l, suffix), dvec(s, nm))
        double *an = W("input_layernorm.weight"), *fn = W("post_attention_layernorm.weight");
        double *wq = W("self_attn.q_proj.weight"), *wk = W("self_attn.k_proj.weight");
        double *wv = W("self_attn.v_proj.weight"), *wo = W("self_attn.o_proj.weight");
        double *bq = W("self_attn.q_proj.bias"), *bk = W("self_attn.k_proj.bias");
        double *bv = W("self_attn.v_proj.bias"), *bo = W("self_attn.o_proj.bias");
        double *qn = W("self_attn.q_norm.weight"), *kn = W("self_attn.k_norm.weight");
        double *wg = W("mlp.gate_proj.weight"), *wu = W("mlp.up_proj.weight");
        double *wd = W("mlp.down_proj.weight"), *bg = W("mlp.gate_proj.bias");
        double *bu = W("mlp.up_proj.bias"), *bd = W("mlp.down_proj.bias");
#undef W
        int window = 0;
        if (strcmp(sp->model_type, "mistral") == 0) window = sp->sliding;
        if (strcmp(sp->model_type, "qwen2") == 0 && l >= sp->max_window_layers) window = sp->sliding;
        for (int t = 0; t < n; t++) {
            memcpy(h, x + (size_t)t * H, (size_t)H * sizeof *h);
            nrms(h, an, H, eps);
            nlin(q + (size_t)t * qd, wq, bq, h, H, qd);
            nlin(k + (size_t)t * kd, wk, bk, h, H, kd);
            nlin(v + (size_t)t * kd, wv, bv, h, H, kd);
            for (int hh = 0; hh < sp->heads; hh++) {
                if (qn) nrms(q + (size_t)t * qd + hh * hd, qn, hd, eps);
                nrope(q + (size_t)t * qd + hh * hd, hd, t, sp);
            }
            for (int hh = 0; hh < sp->kv; hh++) {
                if (kn) nrms(k + (size_t)t * kd + hh * hd, kn, hd, eps);
                nrope(k + (size_t)t * kd + hh * hd, hd, t, sp);
            }
        }
        double *xn = malloc((size_t)n * H * sizeof *xn);
        for (int t = 0; t < n; t++) {
            for (int hh = 0; hh < sp->heads; hh++) {
                int kvh = hh / (sp->heads / sp->kv);
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j <= t; j++) {
                    if (window > 0 && !(j > t - window)) { sc[j] = -INFINITY; continue; }
                    double d = 0;
                    for (int e = 0; e < hd; e++)
                        d += q[(size_t)t * qd + hh * hd + e] * k[(size_t)j * kd + kvh * hd + e];
                    sc[j] = d / sqrt((double)hd);
                    if (sc[j] > mx) mx = sc[j];
                }
                for (int j = 0; j <= t; j++) {
                    sc[j] = sc[j] == -INFINITY ? 0 : exp(sc[j] - mx);
                    sum += sc[j];
                }
                for (int e = 0; e < hd; e++) {
                    double a = 0;
                    for (int j = 0; j <= t; j++) a += sc[j] / sum * v[(size_t)j * kd + kvh * hd + e];
                    att[hh * hd + e] = a;
                }
            }
            nlin(o, wo, bo, att, qd, H);
            for (int i = 0; i < H; i++) xn[(size_t)t * H + i] = x[(size_t)t * H + i] + o[i];
        }
        memcpy(x, xn, (size_t)n * H * sizeof *x);
        free(xn);
        for (int t = 0; t < n; t++) {
            memcpy(h, x + (size_t)t * H, (size_t)H * sizeof *h);
            nrms(h, fn, H, eps);
            nlin(g, wg, bg, h, H, I);
            nlin(u, wu, bu, h, H, I);
            for (int i = 0; i < I; i++) g[i] = g[i] / (1 + exp(-g[i])) * u[i];
            nlin(o, wd, bd, g, I, H);
            for (int i = 0; i < H; i++) x[(size_t)t * H + i] += o[i];
        }
        double *all[] = { an, fn, wq, wk, wv, wo, bq, bk, bv, bo, qn, kn, wg, wu, wd, bg, bu, bd };
        for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free(all[i]);
    }
    double *fnw = dvec(s, "model.norm.weight");
    double *lm = sp->tie ? emb : dvec(s, "lm_head.weight");
    memcpy(h, x + (size_t)(n - 1) * H, (size_t)H * sizeof *h);
    nrms(h, fnw, H, eps);
    for (int r = 0; r < sp->vocab; r++) {
        double a = 0;
        for (int i = 0; i < H; i++) a += lm[(size_t)r * H + i] * h[i];
        logits[r] = (float)a;
    }
    if (lm != emb) free(lm);
    free(fnw); free(emb); free(x); free(h); free(q); free(k); free(v); free(att); free(o);
    free(g); free(u); free(sc);
}

static void test_synthetic(const spec *sp)
{
    src_model *s = malloc(sizeof *s);
    make_synthetic(s, sp);
    enum { PREFILL = 37, STEPS = 5, TOTAL = PREFILL + STEPS - 1 };   /* two query blocks */
    int32_t ids[TOTAL];
    for (int i = 0; i < TOTAL; i++)
        ids[i] = (int32_t)(check_rng_uniform(&rng) * sp->vocab);
    ids[0] = sp->vocab - 1;   /* the last row: the uneven last vocabulary slice */
    float *want = malloc((size_t)STEPS * sp->vocab * sizeof *want);
    for (int st = 0; st < STEPS; st++)
        naive_forward(s, sp, ids, PREFILL + st, want + (size_t)st * sp->vocab);
    float *tp1 = malloc((size_t)STEPS * sp->vocab * sizeof *tp1);
    float *got = malloc((size_t)STEPS * sp->vocab * sizeof *got);
    /* the tp sizes, then tp=1 again with 3 threads (thread pool, OpenBLAS threads) */
    for (int i = 0; i < 4; i++) {
        int world = i < 3 ? sp->tps[i] : 1;
        if (world == 0)
            continue;
        g_threads = i < 3 ? 1 : 3;
        int rc = run_tp(s, world, ids, PREFILL, STEPS, got);
        g_threads = 1;
        if (rc < 0)
            continue;
        double worst = 0;
        for (int st = 0; st < STEPS; st++) {
            double e = logit_err(got + (size_t)st * sp->vocab, want + (size_t)st * sp->vocab,
                                 sp->vocab);
            if (e > worst) worst = e;
            CHECK(e <= 1e-4, "%s tp=%d step %d: logits differ from the naive forward by %g "
                  "(relative)", sp->name, world, st, e);
            if (world == 1)
                memcpy(tp1 + (size_t)st * sp->vocab, got + (size_t)st * sp->vocab,
                       (size_t)sp->vocab * sizeof *got);
            else
                CHECK(logit_err(got + (size_t)st * sp->vocab, tp1 + (size_t)st * sp->vocab,
                                sp->vocab) <= 1e-4, "%s tp=%d step %d differs from tp=1",
                      sp->name, world, st);
        }
        printf("%-28s tp=%d%s  max rel diff vs naive %.2e over %d steps\n", sp->name, world,
               i < 3 ? "" : " (3 threads)", worst, STEPS);
    }
    /* several sequences in one batch, at tp 1 and 2 (every spec cuts at 2) */
    check_batched_tp(s, 1);
    check_batched_tp(s, 2);
    free(want); free(tp1); free(got);
    free_src(s);
    free(s);
}

/* ------------------------------------------------ transformers references */

static int load_hf(src_model *s, tp_st_set *set, const char *dir, const char *name, tp_err *err)
{
    memset(s, 0, sizeof *s);
    snprintf(s->name, sizeof s->name, "%s", name);
    char *path = tp_path_join(dir, "config.json");
    size_t len;
    int rc = tp_read_file(path, 1 << 20, &s->config_json, &len, err);
    free(path);
    if (rc < 0 || tp_st_set_open(set, dir, err) < 0)
        return -1;
    tp_model_config c;
    if (tp_model_config_parse(&c, s->config_json, err) < 0)
        return -1;
    s->n_heads = c.n_heads; s->n_kv = c.n_kv_heads; s->head_dim = c.head_dim;
    s->intermediate = c.intermediate; s->vocab = c.vocab;
    s->q_block[0] = c.quant_block[0];
    s->q_block[1] = c.quant_block[1];
    if (set->n_tensors > sizeof s->t / sizeof s->t[0])
        return tp_errorf(err, "%s: too many tensors for the test", dir);
    for (size_t i = 0; i < set->n_tensors; i++) {
        const tp_st_tensor *t = set->tensors[i];
        src_tensor *d = &s->t[s->n++];
        snprintf(d->name, sizeof d->name, "%s", t->name);
        d->dt = t->dtype;
        d->ndim = t->ndim;
        d->shape[0] = t->shape[0];
        d->shape[1] = t->ndim == 2 ? t->shape[1] : 0;
        d->bytes = t->data;
        /* BF16 / F16 scales (as some FP8 releases ship them) are widened to
         * F32, as tpconvert stores them (FORMAT.md 1.5); free_src frees them */
        if ((ends_with(d->name, ".weight_scale_inv") || ends_with(d->name, ".weight_scale")) &&
            d->dt != TP_F32) {
            size_t cnt = d->shape[0] * (d->ndim == 2 ? d->shape[1] : 1);
            float *f = malloc((cnt ? cnt : 1) * sizeof *f);
            for (size_t k = 0; k < cnt; k++)
                f[k] = src_val(d, k);
            d->owned = (uint8_t *)f;
            d->bytes = d->owned;
            d->dt = TP_F32;
        }
    }
    return 0;
}

/* Runs ids (prompt then the reference's greedy tokens) at tp = world. */
typedef int (*runner_fn)(void *ctx, int world, const int32_t *ids, int n_prefill, int n_steps,
                         float *logits);

/* Every prompt of reference.json at every tp in worlds: the last logits and
 * the greedy tokens against transformers, and tp > 1 against tp = 1 when
 * worlds starts with 1. */
static void compare_reference(const char *name, const char *ref_path, int V, const int *worlds,
                              int n_worlds, runner_fn run, void *ctx)
{
    tp_err err = { { 0 } };
    char *ref_text = NULL;
    size_t len;
    if (tp_read_file(ref_path, 64 << 20, &ref_text, &len, &err) < 0) {
        CHECK(0, "%s: %s", name, err.msg);
        return;
    }
    cJSON *ref = cJSON_Parse(ref_text);
    const cJSON *prompts = cJSON_GetObjectItem(ref, "prompts");
    CHECK(cJSON_IsArray(prompts) && cJSON_GetArraySize(prompts) > 0, "%s: no prompts", ref_path);
    const cJSON *p;
    int pi = 0;
    cJSON_ArrayForEach(p, prompts) {
        const cJSON *jids = cJSON_GetObjectItem(p, "ids"), *jl = cJSON_GetObjectItem(p, "last_logits");
        const cJSON *jg = cJSON_GetObjectItem(p, "greedy"), *jm = cJSON_GetObjectItem(p, "greedy_margins");
        int n = cJSON_GetArraySize(jids), ng = cJSON_GetArraySize(jg);
        if (n < 1 || cJSON_GetArraySize(jl) != V || ng < 1 || cJSON_GetArraySize(jm) != ng) {
            CHECK(0, "%s: prompt %d: malformed reference (or vocab %d)", ref_path, pi, V);
            break;
        }
        int32_t *ids = malloc((size_t)(n + ng) * sizeof *ids);
        float *want = malloc((size_t)V * sizeof *want);
        for (int i = 0; i < n; i++) ids[i] = cJSON_GetArrayItem(jids, i)->valueint;
        for (int i = 0; i < ng; i++) ids[n + i] = cJSON_GetArrayItem(jg, i)->valueint;
        for (int i = 0; i < V; i++) want[i] = (float)cJSON_GetArrayItem(jl, i)->valuedouble;
        double scale = 1.0;
        for (int i = 0; i < V; i++) if (fabs(want[i]) > scale) scale = fabs(want[i]);
        float *got = malloc((size_t)ng * V * sizeof *got), *tp1 = malloc((size_t)ng * V * sizeof *tp1);
        bool have_tp1 = false;
        for (int wi = 0; wi < n_worlds; wi++) {
            int world = worlds[wi];
            if (run(ctx, world, ids, n, ng, got) < 0)
                continue;
            double e = logit_err(got, want, V);
            CHECK(e <= 1e-3, "%s prompt %d (%d tokens) tp=%d: last logits differ from transformers "
                  "by %g (relative to max %g)", name, pi, n, world, e, scale);
            int mism = 0;
            for (int st = 0; st < ng; st++) {
                double margin = cJSON_GetArrayItem(jm, st)->valuedouble;
                int am = argmax(got + (size_t)st * V, V);
                /* a near tie (margin within the tolerance) may go either way */
                if (am != ids[n + st] && margin > 2e-3 * scale)
                    mism++;
            }
            CHECK(mism == 0, "%s prompt %d tp=%d: %d of %d greedy tokens differ from transformers",
                  name, pi, world, mism, ng);
            if (world == 1) {
                memcpy(tp1, got, (size_t)ng * V * sizeof *got);
                have_tp1 = true;
            } else if (have_tp1) {
                for (int st = 0; st < ng; st++)
                    CHECK(logit_err(got + (size_t)st * V, tp1 + (size_t)st * V, V) <= 1e-4,
                          "%s prompt %d tp=%d step %d differs from tp=1", name, pi, world, st);
            }
            printf("%-28s prompt %d (%3d tokens) tp=%d  max rel diff %.2e, greedy %d/%d\n", name,
                   pi, n, world, e, ng - mism, ng);
        }
        free(ids); free(want); free(got); free(tp1);
        pi++;
    }
    cJSON_Delete(ref);
    free(ref_text);
}

static int run_src(void *ctx, int world, const int32_t *ids, int n_prefill, int n_steps,
                   float *logits)
{
    return run_tp(ctx, world, ids, n_prefill, n_steps, logits);
}

static bool has_3d_tensor(const src_model *s)
{
    for (size_t i = 0; i < s->n; i++)
        if (s->t[i].ndim > 2)
            return true;
    return false;
}

static void test_reference_model(const char *dir, const char *name)
{
    tp_err err = { { 0 } };
    src_model *s = malloc(sizeof *s);
    tp_st_set set;
    memset(&set, 0, sizeof set);
    if (load_hf(s, &set, dir, name, &err) < 0) {
        CHECK(0, "%s: %s", name, err.msg);
    } else if (has_3d_tensor(s)) {
        /* this hand-made splitter cuts 2-D tensors only: tests/e2e_tprun.sh
         * runs the fused-expert fixture through tpconvert */
        printf("%-28s skipped here: 3-D (fused expert) tensors\n", name);
    } else {
        /* the tp sizes this model can be cut into, as tpconvert allows */
        int worlds[3], nw = 0;
        static const int tps[] = { 1, 2, 4 };
        for (int ti = 0; ti < 3; ti++) {
            int w = tps[ti];
            if (s->n_heads % w == 0 && s->intermediate % w == 0 &&
                (s->n_kv < w ? w % s->n_kv == 0 : s->n_kv % w == 0))
                worlds[nw++] = w;
        }
        char *ref_path = tp_path_join(dir, "reference.json");
        compare_reference(name, ref_path, s->vocab, worlds, nw, run_src, s);
        free(ref_path);
        for (int wi = 0; wi < nw && worlds[wi] <= 2; wi++)
            check_batched_tp(s, worlds[wi]);
    }
    free_src(s);
    free(s);
    tp_st_set_close(&set);
}

static void test_reference_models(void)
{
    const char *root = "tests/models";
    DIR *d = opendir(root);
    CHECK(d != NULL, "%s: cannot open (run from the repository root)", root);
    if (!d)
        return;
    int count = 0;
    char *names[64];
    struct dirent *e;
    while ((e = readdir(d)) && count < 64)
        if (e->d_name[0] != '.')
            names[count++] = strdup(e->d_name);
    closedir(d);
    int tested = 0;
    for (int i = 0; i < count; i++) {
        char *dir = tp_path_join(root, names[i]);
        char *ref = tp_path_join(dir, "reference.json");
        FILE *f = fopen(ref, "r");
        if (f) {
            fclose(f);
            test_reference_model(dir, names[i]);
            tested++;
        }
        free(ref); free(dir); free(names[i]);
    }
    CHECK(tested > 0, "%s: no model with a reference.json", root);
}

/* ------------------------------------------------------ config and errors */

static void expect_cfg_error(const char *json, const char *needle)
{
    tp_model_config c;
    tp_err err = { { 0 } };
    int rc = tp_model_config_parse(&c, json, &err);
    CHECK(rc < 0 && strstr(err.msg, needle), "config error for %.60s...: rc %d, message \"%s\", "
          "expected it to name \"%s\"", json, rc, err.msg, needle);
}

static void test_config(void)
{
    tp_model_config c;
    tp_err err = { { 0 } };
    const char *base = "{\"model_type\": \"llama\", \"hidden_size\": 64, \"num_hidden_layers\": 2, "
                       "\"num_attention_heads\": 4, \"intermediate_size\": 128, \"vocab_size\": 512";
    char buf[1024];
    snprintf(buf, sizeof buf, "%s}", base);
    CHECK(tp_model_config_parse(&c, buf, &err) == 0, "minimal llama config: %s", err.msg);
    CHECK(c.n_kv_heads == 4 && c.head_dim == 16 && c.rope.theta == 10000.0 && c.rope.type == TP_ROPE_DEFAULT &&
          c.bos_id == -1 && c.n_eos == 0 && c.sliding_window == 0,
          "defaults: kv %d head_dim %d theta %g", c.n_kv_heads, c.head_dim, c.rope.theta);

    /* old layout: top-level rope_theta + rope_scaling{type} */
    snprintf(buf, sizeof buf, "%s, \"rope_theta\": 500000.0, \"rope_scaling\": {\"type\": \"llama3\", "
             "\"factor\": 32.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, "
             "\"original_max_position_embeddings\": 8192}, \"eos_token_id\": [128001, 128009]}", base);
    CHECK(tp_model_config_parse(&c, buf, &err) == 0 && c.rope.theta == 500000.0 && c.rope.type == TP_ROPE_LLAMA3 &&
          c.rope.factor == 32.0 && c.rope.original_max_position == 8192 && c.n_eos == 2 &&
          c.eos_ids[1] == 128009, "old rope layout: %s", err.msg);
    /* new layout: rope_parameters with rope_theta inside */
    snprintf(buf, sizeof buf, "%s, \"rope_parameters\": {\"rope_type\": \"llama3\", \"rope_theta\": "
             "250000.0, \"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, "
             "\"original_max_position_embeddings\": 64}}", base);
    CHECK(tp_model_config_parse(&c, buf, &err) == 0 && c.rope.theta == 250000.0 && c.rope.type == TP_ROPE_LLAMA3 &&
          c.rope.original_max_position == 64, "new rope layout: %s", err.msg);

    /* qwen2: sliding only with use_sliding_window, from max_window_layers */
    const char *q2 = "{\"model_type\": \"qwen2\", \"hidden_size\": 64, \"num_hidden_layers\": 4, "
                     "\"num_attention_heads\": 4, \"intermediate_size\": 128, \"vocab_size\": 512, "
                     "\"sliding_window\": 32, \"max_window_layers\": 2";
    snprintf(buf, sizeof buf, "%s, \"use_sliding_window\": false}", q2);
    CHECK(tp_model_config_parse(&c, buf, &err) == 0 && c.sliding_window == 0 && c.attention_bias,
          "qwen2 without use_sliding_window: window %d", c.sliding_window);
    snprintf(buf, sizeof buf, "%s, \"use_sliding_window\": true}", q2);
    CHECK(tp_model_config_parse(&c, buf, &err) == 0 && c.sliding_window == 32 &&
          c.sliding_from_layer == 2, "qwen2 sliding: window %d from %d", c.sliding_window,
          c.sliding_from_layer);
    /* transformers 5.24's defaults when the key is absent: sliding_window
     * 4096 (mistral, qwen2, qwen3), max_window_layers 28; null: no window */
    const char *q3 = "{\"model_type\": \"qwen3\", \"hidden_size\": 64, \"num_hidden_layers\": 30, "
                     "\"num_attention_heads\": 4, \"intermediate_size\": 128, \"vocab_size\": 512, "
                     "\"use_sliding_window\": true}";
    CHECK(tp_model_config_parse(&c, q3, &err) == 0 && c.sliding_window == 4096 &&
          c.sliding_from_layer == 28, "qwen3 default window: %d from %d (%s)", c.sliding_window,
          c.sliding_from_layer, err.msg);
    const char *mi = "{\"model_type\": \"mistral\", \"hidden_size\": 64, \"num_hidden_layers\": 2, "
                     "\"num_attention_heads\": 4, \"intermediate_size\": 128, \"vocab_size\": 512";
    snprintf(buf, sizeof buf, "%s}", mi);
    CHECK(tp_model_config_parse(&c, buf, &err) == 0 && c.sliding_window == 4096 && c.sliding_from_layer == 0,
          "mistral without sliding_window: window %d (%s)", c.sliding_window, err.msg);
    snprintf(buf, sizeof buf, "%s, \"sliding_window\": null}", mi);
    CHECK(tp_model_config_parse(&c, buf, &err) == 0 && c.sliding_window == 0,
          "mistral sliding_window null: window %d (%s)", c.sliding_window, err.msg);

    expect_cfg_error("{\"model_type\": \"gpt2\"}", "gpt2");
    /* fuzz_config: an rms_norm_eps that is 0 as a float */
    snprintf(buf, sizeof buf, "%s, \"rms_norm_eps\": 1e-66}", base);
    expect_cfg_error(buf, "rms_norm_eps");
    /* fuzz_config: hidden_size < heads and no head_dim gave head_dim 0 */
    expect_cfg_error("{\"model_type\": \"mistral\", \"hidden_size\": 1, \"num_hidden_layers\": 2, "
                     "\"num_attention_heads\": 4, \"intermediate_size\": 8, \"vocab_size\": 512}", "head_dim");
    expect_cfg_error("[1]", "object");
    expect_cfg_error("{\"model_type\": \"llama\", \"num_hidden_layers\": 2}", "hidden_size");
    snprintf(buf, sizeof buf, "%s, \"rope_scaling\": {\"rope_type\": \"proportional\", \"factor\": 4.0}}", base);
    expect_cfg_error(buf, "proportional");   /* yarn and linear run since issue 9 */
    snprintf(buf, sizeof buf, "%s, \"num_key_value_heads\": 3}", base);
    expect_cfg_error(buf, "num_key_value_heads");
    snprintf(buf, sizeof buf, "%s, \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0}}", base);
    expect_cfg_error(buf, "low_freq_factor");
    expect_cfg_error("{\"model_type\": \"qwen3\", \"hidden_size\": 64, \"num_hidden_layers\": 2, "
                     "\"num_attention_heads\": 4, \"intermediate_size\": 128, "
                     "\"vocab_size\": \"many\"}", "vocab_size");
    snprintf(buf, sizeof buf, "%s, \"rope_parameters\": {\"full_attention\": {\"rope_type\": "
             "\"default\", \"rope_theta\": 1e6}}}", base);
    expect_cfg_error(buf, "full_attention");
    snprintf(buf, sizeof buf, "%s, \"hidden_act\": \"gelu\"}", base);
    expect_cfg_error(buf, "hidden_act");
}

/* Model creation must refuse wrong tensors and name them. */
static void expect_create_error(src_model *s, int rank, int world, tp_comm *comm, const char *needle)
{
    built_rank b;
    build_rank(&b, s, rank, world);
    tp_model *m = NULL;
    tp_err err = { { 0 } };
    tp_model_opts o = { .max_seq = 32, .threads = 1 };
    int rc = tp_model_create(&m, &b.lr, comm, &o, &err);
    CHECK(rc < 0 && m == NULL && strstr(err.msg, needle),
          "create error: rc %d, message \"%s\", expected it to name \"%s\"", rc, err.msg, needle);
    tp_model_free(m);
    free_rank(&b, s->n);
}

static void test_create_errors(void)
{
    src_model *s = malloc(sizeof *s);
    make_synthetic(s, &SPECS[0]);   /* qwen3, tied */
    /* a rank of a tp=2 conversion given to a single-rank run */
    expect_create_error(s, 0, 2, NULL, "tp=2");

    src_tensor saved;
    src_tensor *q = (src_tensor *)src_find(s, "model.layers.1.self_attn.q_proj.weight");
    saved = *q;
    q->shape[0] -= 1;   /* no longer whole heads */
    expect_create_error(s, 0, 1, NULL, "model.layers.1.self_attn.q_proj.weight");
    *q = saved;

    src_tensor *dn = (src_tensor *)src_find(s, "model.layers.0.mlp.down_proj.weight");
    saved = *dn;
    dn->shape[1] = 20;   /* intermediate 40 in the config */
    expect_create_error(s, 0, 1, NULL, "model.layers.0.mlp.down_proj.weight");
    *dn = saved;

    src_tensor *kn = (src_tensor *)src_find(s, "model.layers.1.self_attn.k_norm.weight");
    saved = *kn;
    snprintf(kn->name, sizeof kn->name, "model.layers.1.self_attn.k_norm.renamed");
    expect_create_error(s, 0, 1, NULL, "model.layers.1.self_attn.k_norm.weight");
    *kn = saved;

    /* the cpu converts tensors in memory: a deferred open's NULL data is
     * refused by name (only the cuda device streams from the file) */
    {
        built_rank b;
        build_rank(&b, s, 0, 1);
        const uint8_t *keep = b.lts[3].data;
        b.lts[3].data = NULL;
        tp_model *m = NULL;
        tp_err err = { { 0 } };
        tp_model_opts o = { .max_seq = 32, .threads = 1, .device = "cpu" };
        CHECK(tp_model_create(&m, &b.lr, NULL, &o, &err) < 0 && strstr(err.msg, b.lts[3].info->name) &&
              strstr(err.msg, "defer_tensors"), "cpu model on a tensor without data: \"%s\"", err.msg);
        b.lts[3].data = keep;
        free_rank(&b, s->n);
    }

    /* an untied config needs lm_head.weight */
    char *cfg = s->config_json;
    char *tie = strstr(cfg, "\"tie_word_embeddings\": true");
    CHECK(tie != NULL, "synthetic qwen3 config is tied");
    if (tie) {
        memcpy(tie, "\"tie_word_embeddings\":false", 27);
        expect_create_error(s, 0, 1, NULL, "lm_head.weight");
    }
    free_src(s);
    free(s);
}

/* ------------------------------------------------------- 8-bit weights */

static bool is_linear_weight(const char *name)
{
    static const char *const LINEAR[] = { "q_proj.weight", "k_proj.weight", "v_proj.weight",
                                          "o_proj.weight", "gate_proj.weight", "up_proj.weight",
                                          "down_proj.weight", "lm_head.weight" };
    for (size_t i = 0; i < sizeof LINEAR / sizeof LINEAR[0]; i++)
        if (ends_with(name, LINEAR[i]))
            return true;
    return false;
}

/* A copy of s whose tensors point at s's bytes (s must outlive it). */
static src_model *src_view(const src_model *s)
{
    src_model *v = malloc(sizeof *v);
    memcpy(v, s, sizeof *v);
    for (size_t i = 0; i < v->n; i++)
        v->t[i].owned = NULL;
    v->config_json = strdup(s->config_json);
    return v;
}

static uint8_t *tensor_buffer(src_tensor *t, tp_dtype dt, size_t count)
{
    t->dt = dt;
    t->owned = malloc(count * tp_dtype_size(dt) + 1);
    t->bytes = t->owned;
    return t->owned;
}

/* Quantizes every linear weight of s as tpconvert --quantize does (fp8: one
 * scale = amax / 448 per B0 x B1 block; int8: amax / 127 per row, rounded
 * to nearest) into *qm (8-bit weights + scale tensors, the config's
 * quantization_config added) and *dm (the dequantized values in f32, the
 * original config).  Both borrow s's other tensors.  tied_table: the
 * embedding too (a tied model's lm_head table, --quantize-lm-head). */
static void quantize_src_table(const src_model *s, tp_dtype qdt, int b0, int b1, bool tied_table,
                               src_model **qm, src_model **dm)
{
    src_model *q = src_view(s), *d = src_view(s);
    bool fp8 = qdt == TP_F8_E4M3;
    q->q_block[0] = b0;
    q->q_block[1] = b1;
    char qc[256];
    /* modules_to_not_convert [] (nothing skipped): lm_head is quantized too */
    snprintf(qc, sizeof qc, fp8 ? ", \"quantization_config\": {\"quant_method\": \"fp8\", "
             "\"weight_block_size\": [%d, %d], \"activation_scheme\": \"dynamic\", "
             "\"modules_to_not_convert\": []}}"
             : ", \"quantization_config\": {\"quant_method\": \"tpshard_int8\", "
             "\"modules_to_not_convert\": []}}", b0, b1);
    size_t len = strlen(q->config_json);
    q->config_json = realloc(q->config_json, len + strlen(qc) + 1);
    strcpy(strrchr(q->config_json, '}'), qc);
    size_t n0 = s->n;
    for (size_t i = 0; i < n0; i++) {
        const src_tensor *t = &s->t[i];
        bool table = tied_table && strcmp(t->name, "model.embed_tokens.weight") == 0;
        if (t->ndim != 2 || !(is_linear_weight(t->name) || table))
            continue;
        size_t R = t->shape[0], C = t->shape[1];
        size_t gr = fp8 ? (R + b0 - 1) / b0 : R, gc = fp8 ? (C + b1 - 1) / b1 : 1;
        src_tensor *st = &q->t[q->n++];
        snprintf(st->name, sizeof st->name, "%s%s", t->name, fp8 ? "_scale_inv" : "_scale");
        st->ndim = fp8 ? 2 : 1;
        st->shape[0] = gr;
        st->shape[1] = fp8 ? gc : 0;
        float *scale = (float *)tensor_buffer(st, TP_F32, gr * gc);
        for (size_t bi = 0; bi < gr; bi++)
            for (size_t bj = 0; bj < gc; bj++) {
                size_t rs = fp8 ? bi * b0 : bi, re = fp8 ? rs + b0 : rs + 1;
                size_t cs = fp8 ? bj * b1 : 0, ce = fp8 ? cs + b1 : C;
                float amax = 0;
                for (size_t r = rs; r < re && r < R; r++)
                    for (size_t c = cs; c < ce && c < C; c++)
                        amax = fmaxf(amax, fabsf(src_val(t, r * C + c)));
                scale[bi * gc + bj] = amax > 0 ? amax / (fp8 ? 448.0f : 127.0f) : 1.0f;
            }
        uint8_t *qb = tensor_buffer(&q->t[i], qdt, R * C);
        float *dv = (float *)tensor_buffer(&d->t[i], TP_F32, R * C);
        for (size_t r = 0; r < R; r++)
            for (size_t c = 0; c < C; c++) {
                float sc = fp8 ? scale[(r / b0) * gc + c / b1] : scale[r];
                float v = src_val(t, r * C + c) / sc;
                size_t k = r * C + c;
                if (fp8) {
                    qb[k] = tp_f32_to_f8e4m3(v);
                    dv[k] = tp_f8e4m3_to_f32(qb[k]) * sc;
                } else {
                    long iv = lrintf(v);
                    qb[k] = (uint8_t)(int8_t)(iv > 127 ? 127 : iv < -127 ? -127 : iv);
                    dv[k] = (float)(int8_t)qb[k] * sc;
                }
            }
    }
    *qm = q;
    *dm = d;
}

/* The linear weights only (tpconvert --quantize without --quantize-lm-head
 * on a tied model; test_model_cuda.c's models). */
static void quantize_src(const src_model *s, tp_dtype qdt, int b0, int b1, src_model **qm,
                         src_model **dm)
{
    quantize_src_table(s, qdt, b0, b1, false, qm, dm);
}

static void free_view(src_model *v)
{
    free_src(v);
    free(v);
}

/* The quantized model at tp 1, 2, 4 against the naive forward of the
 * dequantized one: the same function (the runtime's products differ only
 * in where the scale is applied and in summation order).  tied: lm_head is
 * the embedding, quantized once (--quantize-lm-head of a tied model): the
 * lookup and the logits both read the 8-bit table; vocabulary rows 37 cut
 * at tp 2 into [0, 19) and [19, 37), at tp 4 at 10, 20, 30, so that the
 * vocab-parallel embedding's and the lm_head's slices start inside 24-row
 * fp8 blocks (replicated: the lm_head's rows are offset in place). */
static void test_quantized_model(tp_dtype qdt, bool tied, bool vocab_parallel)
{
    /* qwen3, quantizing lm_head too; blocks of 24 x 12 rows x columns:
     * every tp > 1 cuts blocks (q rows 32 / 16 per rank, gate / up 20 / 10,
     * o / down columns likewise) */
    spec sp = SPECS[0];
    static char name[64];
    snprintf(name, sizeof name, "syn-qwen3-%s%s%s", qdt == TP_F8_E4M3 ? "fp8" : "int8",
             tied ? "-tied" : "", vocab_parallel ? "-vp" : "");
    sp.name = name;
    sp.tie = tied;
    sp.vocab_parallel = vocab_parallel;
    src_model *s = malloc(sizeof *s), *q, *d;
    make_synthetic(s, &sp);
    quantize_src_table(s, qdt, 24, 12, tied, &q, &d);
    snprintf(q->name, sizeof q->name, "%s", sp.name);
    enum { PREFILL = 9, STEPS = 3 };
    int32_t ids[PREFILL + STEPS];
    for (int i = 0; i < PREFILL + STEPS; i++)
        ids[i] = (int32_t)(check_rng_uniform(&rng) * sp.vocab);
    float *want = malloc((size_t)STEPS * sp.vocab * sizeof *want);
    float *got = malloc((size_t)STEPS * sp.vocab * sizeof *got);
    for (int st = 0; st < STEPS; st++)
        naive_forward(d, &sp, ids, PREFILL + st, want + (size_t)st * sp.vocab);
    static const int WORLDS[] = { 1, 2, 4 };
    for (int w = 0; w < 3; w++) {
        if (run_tp(q, WORLDS[w], ids, PREFILL, STEPS, got) < 0)
            continue;
        double worst = 0;
        for (int st = 0; st < STEPS; st++) {
            double e = logit_err(got + (size_t)st * sp.vocab, want + (size_t)st * sp.vocab,
                                 sp.vocab);
            if (e > worst) worst = e;
        }
        CHECK(worst <= 1e-4, "%s tp=%d: logits differ from the dequantized model's by %g "
              "(relative)", sp.name, WORLDS[w], worst);
        printf("%-28s tp=%d  max rel diff vs dequantized f32 %.2e over %d steps\n", sp.name,
               WORLDS[w], worst, STEPS);
    }
    /* and the quantization is real: the original weights give other logits */
    naive_forward(s, &sp, ids, PREFILL, got);
    CHECK(logit_err(got, want, sp.vocab) > 1e-4, "%s: quantizing changed nothing", sp.name);
    free(want); free(got);
    free_view(q); free_view(d);
    free_src(s);
    free(s);
}

static src_tensor *src_find_mut(src_model *s, const char *name)
{
    return (src_tensor *)src_find(s, name);
}

/* Bad 8-bit tensors are refused by name. */
static void test_quantized_errors(void)
{
    spec sp = SPECS[0];
    src_model *s = malloc(sizeof *s), *q, *d;
    make_synthetic(s, &sp);
    quantize_src(s, TP_F8_E4M3, 24, 12, &q, &d);
    const char *sname = "model.layers.1.mlp.down_proj.weight_scale_inv";
    src_tensor *st = src_find_mut(q, sname), saved = *st;
    /* a block column short: columns [0, 40) need block columns [0, 4) */
    st->shape[1] -= 1;
    expect_create_error(q, 0, 1, NULL, sname);
    *st = saved;
    snprintf(st->name, sizeof st->name, "model.layers.1.mlp.down_proj.renamed");
    expect_create_error(q, 0, 1, NULL, sname);
    *st = saved;
    float keep = ((float *)st->owned)[3];
    ((float *)st->owned)[3] = NAN;
    expect_create_error(q, 0, 1, NULL, sname);
    ((float *)st->owned)[3] = keep;
    st->dt = TP_BF16;
    expect_create_error(q, 0, 1, NULL, sname);
    *st = saved;
    /* 8-bit weights without quantization_config */
    char *cfg = q->config_json;
    q->config_json = s->config_json;
    expect_create_error(q, 0, 1, NULL, "model.layers.0.self_attn.q_proj.weight");
    q->config_json = cfg;
    /* an 8-bit norm */
    src_tensor *nt = src_find_mut(q, "model.norm.weight"), nsaved = *nt;
    nt->dt = TP_I8;
    expect_create_error(q, 0, 1, NULL, "model.norm.weight");
    *nt = nsaved;
    free_view(q); free_view(d);
    /* an 8-bit embedding: only as a tied lm_head's table, declared so */
    src_model *qt, *dt;
    quantize_src_table(s, TP_I8, 24, 12, true, &qt, &dt);
    char *declared = qt->config_json, *skip = strstr(declared, "\"modules_to_not_convert\": []");
    size_t head = (size_t)(skip - declared), cap = strlen(declared) + 32;
    qt->config_json = malloc(cap);
    snprintf(qt->config_json, cap, "%.*s\"modules_to_not_convert\": [\"lm_head\"]}}", (int)head,
             declared);
    expect_create_error(qt, 0, 1, NULL, "keeps lm_head, which is tied to it, unquantized");
    free(qt->config_json);
    qt->config_json = declared;
    free_view(qt); free_view(dt);
    spec untied = SPECS[0];
    untied.tie = false;
    src_model *su = malloc(sizeof *su);
    make_synthetic(su, &untied);
    quantize_src_table(su, TP_I8, 24, 12, true, &qt, &dt);
    expect_create_error(qt, 0, 1, NULL, "model.embed_tokens.weight: dtype I8");
    free_view(qt); free_view(dt);
    free_src(su);
    free(su);
    free_src(s);
    free(s);
}

/* A directory written by tpconvert: every rank loaded with the real loader
 * (checksums verified), run as threads, compared with reference.json. */
typedef struct converted_ctx {
    tp_loaded_rank *lrs[MAX_WORLD];
    int world, vocab;
} converted_ctx;

static int run_converted(void *ctx, int world, const int32_t *ids, int n_prefill, int n_steps,
                         float *logits)
{
    converted_ctx *c = ctx;
    if (world != c->world)
        return -1;
    return run_ranks("converted", c->lrs, c->world, c->vocab, ids, n_prefill, n_steps, logits);
}

/* Every rank of a tpconvert directory, loaded with the real loader
 * (checksums verified): *loaded of them (== *world on success). */
static int load_converted(const char *dir, tp_loaded_rank *lr, int *world, int *vocab, int *loaded)
{
    tp_err err = { { 0 } };
    tp_manifest man;
    *loaded = 0;
    if (tp_load_manifest(dir, &man, &err) < 0) {
        fprintf(stderr, "test_model: %s\n", err.msg);
        return -1;
    }
    *world = man.tp;
    tp_model_config cfg;
    int rc = tp_model_config_parse(&cfg, man.config_json, &err);
    tp_manifest_free(&man);
    if (rc < 0 || *world < 1 || *world > MAX_WORLD) {
        fprintf(stderr, "test_model: %s: %s\n", dir, rc < 0 ? err.msg : "tp out of range");
        return -1;
    }
    *vocab = cfg.vocab;
    tp_load_opts lo = { .verify = true, .threads = 1, .quiet = true };
    for (; *loaded < *world; (*loaded)++)
        if (tp_load_rank(&lr[*loaded], dir, *loaded, &lo, &err) < 0) {
            CHECK(0, "%s", err.msg);
            return -1;
        }
    return 0;
}

static int test_converted(const char *dir, const char *ref_path)
{
    tp_loaded_rank lr[MAX_WORLD];
    converted_ctx c = { 0 };
    int loaded = 0;
    if (load_converted(dir, lr, &c.world, &c.vocab, &loaded) < 0 && loaded == 0 && !check_failures)
        return 1;
    for (int r = 0; r < loaded; r++)
        c.lrs[r] = &lr[r];
    if (loaded == c.world)
        compare_reference(dir, ref_path, c.vocab, &c.world, 1, run_converted, &c);
    for (int r = 0; r < loaded; r++)
        tp_loaded_rank_free(&lr[r]);
    if (check_failures)
        return check_finish("test_model --converted");
    printf("model: %s (tp=%d) matches %s\n", dir, c.world, ref_path);
    return 0;
}

/* --batch DIR: check_batched on a tpconvert directory's ranks (every
 * layout tpconvert writes, the fused experts included). */
static int test_batch_converted(const char *dir)
{
    tp_loaded_rank lr[MAX_WORLD];
    tp_loaded_rank *lrs[MAX_WORLD];
    int world = 0, vocab = 0, loaded = 0;
    if (load_converted(dir, lr, &world, &vocab, &loaded) < 0 && loaded == 0 && !check_failures)
        return 1;
    for (int r = 0; r < loaded; r++)
        lrs[r] = &lr[r];
    if (loaded == world)
        check_batched(dir, lrs, world, vocab);
    for (int r = 0; r < loaded; r++)
        tp_loaded_rank_free(&lr[r]);
    return check_finish("test_model --batch");
}

/* Bad calls to a working model: named errors, and the model stays usable. */
/* The cpu model reads its matrices where they lie in the loaded rank (no
 * copy): zeroing one there after tp_model_create changes the logits. */
static void check_weights_in_place(tp_model *m, built_rank *b, const src_model *s,
                                   const int32_t *ids, float *logits)
{
    const char *name = "model.layers.0.mlp.down_proj.weight";
    const tp_loaded_tensor *lt = NULL;
    for (size_t i = 0; i < s->n; i++)
        if (strcmp(b->lts[i].info->name, name) == 0)
            lt = &b->lts[i];
    CHECK(lt != NULL, "%s not in the test rank", name);
    if (!lt)
        return;
    size_t nb = lt->info->raw_size, vocab = (size_t)tp_model_get_config(m)->vocab;
    float *again = malloc(vocab * sizeof *again);
    uint8_t *saved = malloc(nb);
    tp_err err = { { 0 } };
    memcpy(saved, lt->data, nb);
    tp_model_reset(m);
    CHECK(tp_model_forward(m, ids, 3, logits, &err) == 0, "forward: %s", err.msg);
    memset((void *)lt->data, 0, nb);
    tp_model_reset(m);
    CHECK(tp_model_forward(m, ids, 3, again, &err) == 0, "forward: %s", err.msg);
    CHECK(memcmp(logits, again, vocab * sizeof *again) != 0, "zeroing %s in the loaded rank did "
          "not change the logits: the model reads a copy", name);
    memcpy((void *)lt->data, saved, nb);
    tp_model_reset(m);
    CHECK(tp_model_forward(m, ids, 3, again, &err) == 0 &&
          memcmp(logits, again, vocab * sizeof *again) == 0, "restored %s: other logits", name);
    free(saved);
    free(again);
}

/* Sequence slots: the KV memory refused at create when it cannot fit, and
 * bad batched steps refused by token, slot and position, changing nothing. */
static void check_batch_errors(built_rank *b)
{
    tp_model *m = NULL;
    tp_err err = { { 0 } };
    tp_model_opts o = { .max_seq = 1 << 20, .threads = 1, .slots = 1 << 24 };
    CHECK(tp_model_create(&m, &b->lr, NULL, &o, &err) < 0 && strstr(err.msg, "--max-batch 16777216") &&
          strstr(err.msg, "--max-seq 1048576"), "a KV cache past the memory: \"%s\"", err.msg);
    o = (tp_model_opts){ .max_seq = 8, .threads = 1, .slots = -1 };
    CHECK(tp_model_create(&m, &b->lr, NULL, &o, &err) < 0 && strstr(err.msg, "--max-batch -1"),
          "negative slots: \"%s\"", err.msg);
    o = (tp_model_opts){ .max_seq = 8, .threads = 1, .slots = 2, .device = "cuda" };
    CHECK(tp_model_create(&m, &b->lr, NULL, &o, &err) < 0 && strstr(err.msg, "cuda"),
          "two slots on device cuda: \"%s\"", err.msg);
    o = (tp_model_opts){ .max_seq = 8, .threads = 1, .slots = 2 };
    if (tp_model_create(&m, &b->lr, NULL, &o, &err) < 0) {
        CHECK(0, "create with 2 slots: %s", err.msg);
        return;
    }
    float *logits = malloc(2 * 50 * sizeof *logits);
    tp_batch_token bad_slot[] = { { 0, 1, 0, false }, { 2, 1, 0, true } };
    CHECK(tp_model_forward_batch(m, bad_slot, 2, logits, &err) < 0 && strstr(err.msg, "batch token 1") &&
          strstr(err.msg, "slot 2") && strstr(err.msg, "--max-batch"), "slot 2 of 2: \"%s\"", err.msg);
    tp_batch_token bad_id[] = { { 1, 50, 0, true } };
    CHECK(tp_model_forward_batch(m, bad_id, 1, logits, &err) < 0 && strstr(err.msg, "token id 50") &&
          strstr(err.msg, "slot 1"), "id 50 of 50: \"%s\"", err.msg);
    tp_batch_token gap[] = { { 0, 1, 0, false }, { 0, 2, 2, true } };
    CHECK(tp_model_forward_batch(m, gap, 2, logits, &err) < 0 &&
          strstr(err.msg, "slot 0's next position is 1, the token says 2"), "a skipped position: \"%s\"", err.msg);
    tp_batch_token past[9];
    for (int i = 0; i < 9; i++)
        past[i] = (tp_batch_token){ 1, 3, i, i == 8 };
    CHECK(tp_model_forward_batch(m, past, 9, logits, &err) < 0 && strstr(err.msg, "slot 1 position 8") &&
          strstr(err.msg, "--max-seq"), "9 positions in a cache of 8: \"%s\"", err.msg);
    CHECK(tp_model_slot_length(m, 0) == 0 && tp_model_slot_length(m, 1) == 0, "refused steps changed a slot");
    /* interleaved slots; two rows of logits, in token order */
    tp_batch_token ok[] = { { 1, 4, 0, true }, { 0, 5, 0, false }, { 1, 6, 1, true } };
    CHECK(tp_model_forward_batch(m, ok, 3, logits, &err) == 0, "a mixed step: %s", err.msg);
    CHECK(tp_model_slot_length(m, 0) == 1 && tp_model_slot_length(m, 1) == 2 && tp_model_slot_length(m, 2) == -1 &&
          tp_model_position(m) == 1 && tp_model_slots(m) == 2, "slot lengths after a mixed step");
    /* slot 1's second row is what one sequence 4, 6 gives (its cache reset) */
    tp_model_reset_slot(m, 1);
    CHECK(tp_model_slot_length(m, 1) == 0 && tp_model_slot_length(m, 0) == 1, "reset of slot 1 only");
    float *alone = malloc(50 * sizeof *alone);
    tp_batch_token seq[] = { { 1, 4, 0, false }, { 1, 6, 1, true } };
    CHECK(tp_model_forward_batch(m, seq, 2, alone, &err) == 0, "slot 1 again: %s", err.msg);
    CHECK(logit_err(alone, logits + 50, 50) <= 1e-5, "slot 1's logits alone differ from the mixed step's by %g",
          logit_err(alone, logits + 50, 50));
    free(alone);
    free(logits);
    tp_model_free(m);
}

static void test_forward_errors(void)
{
    src_model *s = malloc(sizeof *s);
    make_synthetic(s, &SPECS[1]);   /* qwen2, vocab 50 */
    built_rank b;
    build_rank(&b, s, 0, 1);
    tp_model *m = NULL;
    tp_err err = { { 0 } };
    tp_model_opts o = { .max_seq = 8, .threads = 1, .device = "cuda" };
    CHECK(tp_model_create(&m, &b.lr, NULL, &o, &err) < 0 && strstr(err.msg, "cuda"),
          "device cuda on the cpu path: \"%s\"", err.msg);
    o.device = "cpu";
    if (tp_model_create(&m, &b.lr, NULL, &o, &err) < 0) {
        CHECK(0, "create: %s", err.msg);
    } else {
        float *logits = malloc(50 * sizeof *logits);
        int32_t ids[9] = { 1, 2, 3, 4, 5, 6, 7, 8, 9 }, bad = 50;
        CHECK(tp_model_forward(m, &bad, 1, logits, &err) < 0 && strstr(err.msg, "50"),
              "token id 50 of 50: \"%s\"", err.msg);
        CHECK(tp_model_forward(m, ids, 9, logits, &err) < 0 && strstr(err.msg, "max-seq"),
              "9 tokens into a cache of 8: \"%s\"", err.msg);
        CHECK(tp_model_position(m) == 0, "position moved by failed calls");
        CHECK(tp_model_forward(m, ids, 8, logits, &err) == 0, "8 tokens: %s", err.msg);
        CHECK(tp_model_forward(m, ids, 1, logits, &err) < 0, "a 9th token fits a cache of 8");
        tp_model_reset(m);
        CHECK(tp_model_forward(m, ids, 1, NULL, &err) == 0 && tp_model_position(m) == 1,
              "forward without logits: %s", err.msg);
        const tp_model_config *c = tp_model_get_config(m);
        CHECK(c->arch == TP_ARCH_QWEN2 && c->attention_bias && !c->o_bias && c->vocab == 50 &&
              c->n_eos == 2 && c->eos_ids[0] == 2 && c->bos_id == 1, "config of the model");
        check_weights_in_place(m, &b, s, ids, logits);
        free(logits);
        tp_model_free(m);
    }
    check_batch_errors(&b);
    if (b.lts)
        free_rank(&b, s->n);
    free_src(s);
    free(s);
}

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "--converted") == 0 && strcmp(argv[3], "--reference") == 0)
        return test_converted(argv[2], argv[4]);
    if (argc == 3 && strcmp(argv[1], "--batch") == 0)
        return test_batch_converted(argv[2]);
    if (argc != 1) {
        fprintf(stderr, "usage: test_model [--converted DIR --reference REFERENCE.json | --batch DIR]\n");
        return 2;
    }
    test_config();
    test_create_errors();
    test_forward_errors();
    for (size_t i = 0; i < sizeof SPECS / sizeof SPECS[0]; i++)
        test_synthetic(&SPECS[i]);
    test_quantized_model(TP_F8_E4M3, false, false);
    test_quantized_model(TP_I8, false, false);
    for (int vp = 0; vp < 2; vp++) {
        test_quantized_model(TP_F8_E4M3, true, vp);
        test_quantized_model(TP_I8, true, vp);
    }
    test_quantized_errors();
    test_reference_models();
    return check_finish("test_model");
}
