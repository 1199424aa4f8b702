/* model.c - a rank's model on the CPU and its tensor-parallel forward pass.
 *
 * Megatron-style tensor parallelism as tpconvert cut the weights:
 *   - q/k/v, gate/up (colwise) hold a slice of the output rows: whole heads
 *     of attention, a slice of the intermediate dimension of the MLP;
 *   - o_proj, down_proj (rowwise) hold the matching column slice, so each
 *     rank produces a partial sum of the full hidden state; one all-reduce
 *     per block adds them, and the rowwise bias (reduce_bias) is added once
 *     after it;
 *   - with fewer kv heads than ranks a rank holds the one kv head its q
 *     heads share (replicated kv);
 *   - the lm_head is split by vocabulary rows; the full logits are an
 *     all-gather of the slices.
 * The weight matrices are read where they lie in the loaded rank, in their
 * stored dtype (gemm_cpu.h widens them exactly, in registers or a block in
 * cache at a time); activations, accumulation, norms, biases and the KV
 * cache are fp32, so the result differs from transformers in fp32 only by
 * summation order.  The model borrows lr: it must outlive the model.
 * With device "cuda" no host copy is made: the same checks run, each weight
 * is recorded as a byte range of a loaded tensor (tp_weight_src) and
 * cuda/weights_cuda.cu streams them from the loaded rank to the device.
 */
#include "runtime.h"
#include "kernels_cpu.h"
#include "model_layers.h"
#include "gemm_cpu.h"
#ifdef TP_HAVE_CUDA
#include "cuda/model_cuda.h"
#endif

#include <cblas.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>


/* Tokens [start, start + n) of a batched step: one slot's, at consecutive
 * positions pos0 .. pos0 + n - 1.  Their RoPE rows are cos/sin + t * half
 * for the run's t-th token (the shared table at pos0, or the step's own rows
 * when the frequencies follow the pass). */
struct kv_run {
    int start, n, slot, pos0;
    const float *cos, *sin;
};

struct tp_model {
    tp_model_config cfg;
    tp_comm *comm;
    int rank, world;
    int lq, lkv, li;            /* local q heads, kv heads, intermediate */
    int group;                  /* local q heads per local kv head */
    int max_seq;
    int slots;                  /* sequence slots, each a KV cache of max_seq positions */
    int *slot_len;              /* [slots]: positions each slot's cache holds */
    int *slot_next;             /* [slots]: tp_model_forward_batch's check scratch */

    tp_mat embed;               /* rows [emb_start, emb_end) of the embedding */
    int64_t emb_start, emb_end;
    const float *final_norm;
    tp_mat lm_w;                /* rows [lm_start, lm_end) of the lm_head */
    int64_t lm_start, lm_end;
    int64_t *lm_ranges;         /* [world][2]: every rank's vocabulary rows */
    int vocab_slot;             /* allgather slot per rank (largest slice) */

    tp_layer_weights *layers;
    /* Where every weight is in the loaded rank (both devices; the CUDA
     * upload reads the tensors from there, the CPU only uses it to tell
     * which tensors are present). */
    tp_layer_src *layer_src;
    tp_weight_src embed_src, final_norm_src, lm_src;
    float **owned;              /* fp32 copies of the vectors (cpu) */
    size_t n_owned, cap_owned;

    /* [slot][layer][lkv][max_seq][head_dim], anonymous MAP_NORESERVE
     * mappings of kv_bytes each: pages are touched as positions fill */
    float *kcache, *vcache;
    size_t kv_bytes;
    float *cos_t, *sin_t;       /* [max_seq][head_dim/2], times the rope attention factor */
    float *rope_inv;            /* [head_dim/2]: tpk_rope_rows' scratch */

    int cap_steps;              /* tokens ids / runs / seq_tokens hold */
    int32_t *ids;               /* [cap_steps]: the step's token ids */
    int cap_n;                  /* rows the activation buffers hold */
    float *x, *h, *q, *k, *v, *att, *o, *gate, *up;
    /* the step's runs of one slot's consecutive tokens (tp_model_forward_batch) */
    struct kv_run *runs;
    int n_runs;
    tp_batch_token *seq_tokens; /* tp_model_forward's tokens: slot 0 */
    float *run_cos, *run_sin;   /* [cap_n][head_dim/2]: per-pass RoPE rows of the step's tokens */
    float *lm_in;               /* [cap_n][hidden]: final-normed rows that want logits */
    float *scratch;             /* [lq][TPK_ATT_BLOCK * max_seq] attention scores */
    int cap_logit_rows;         /* rows logit_slot / logit_all hold */
    float *logit_slot, *logit_all;  /* [rows][vocab_slot], [world][rows][vocab_slot] */
    tp_moe_scratch moe_scratch; /* sparse layers' routing and expert buffers */
    float *pick_buf;            /* tp_model_forward_pick: vocab logits, vocab penalised logits, 2 * vocab scratch */

    tp_pool *pool;              /* NULL: one thread */
    char cpu_info[48];          /* tp_model_device_info on the cpu */
#ifdef TP_HAVE_CUDA
    tpcm_model *gpu;            /* device "cuda": the forward pass runs there */
#endif
};

/* ------------------------------------------------------------ helpers */

static void par_for(tp_model *m, size_t n, void (*fn)(size_t, void *), void *arg)
{
    if (m->pool && n > 1)
        tp_pool_parallel_for(m->pool, n, fn, arg);
    else
        for (size_t i = 0; i < n; i++)
            fn(i, arg);
}

/* Row-wise kernels over a step's tokens (norms, SiLU, RoPE): each row's
 * result depends on that row alone, so chunks of rows on the pool give the
 * same bits as one pass.  Worth a fork-join only for many rows: a batched
 * or prefill step, where these ran on one thread while the other waited
 * (~7% of a 16-request server run after the AMX GEMMs). */
#define PAR_ROWS_MIN 8   /* rows per chunk, at least */

typedef struct rows_task {
    void (*fn)(const struct rows_task *t, int r0, int r1);
    int rows, chunk;
    float *x, *out;
    const float *in, *w;
    int dim;
    float eps;
    tp_model *m;
} rows_task;

static void rows_task_run(size_t i, void *arg)
{
    const rows_task *t = arg;
    int r0 = (int)i * t->chunk, r1 = r0 + t->chunk < t->rows ? r0 + t->chunk : t->rows;
    t->fn(t, r0, r1);
}

static void par_rows(tp_model *m, rows_task *t)
{
    int workers = m->pool ? tp_pool_threads(m->pool) + 1 : 1;
    int chunks = t->rows / PAR_ROWS_MIN < workers ? t->rows / PAR_ROWS_MIN : workers;
    if (chunks <= 1) {
        t->fn(t, 0, t->rows);
        return;
    }
    t->chunk = (t->rows + chunks - 1) / chunks;
    tp_pool_parallel_for(m->pool, (size_t)chunks, rows_task_run, t);
}

/* x[r] += in[r] (in may be NULL), out[r] = rmsnorm(x[r]) * w */
static void add_norm_rows(const rows_task *t, int r0, int r1)
{
    size_t o = (size_t)r0 * t->dim;
    tpk_add_rmsnorm(t->x + o, t->in ? t->in + o : NULL, t->out + o, t->w, r1 - r0, t->dim, t->eps);
}

static void add_rmsnorm_par(tp_model *m, float *x, const float *delta, float *out, const float *w,
                            int n, int dim, float eps)
{
    rows_task t = { .fn = add_norm_rows, .rows = n, .x = x, .in = delta, .out = out, .w = w,
                    .dim = dim, .eps = eps };
    par_rows(m, &t);
}

/* x[r] = rmsnorm(x[r]) * w over rows of one head */
static void head_norm_rows(const rows_task *t, int r0, int r1)
{
    tpk_head_rmsnorm(t->x + (size_t)r0 * t->dim, t->w, r1 - r0, t->dim, t->eps);
}

/* x[r] = silu(x[r]) * in[r] */
static void silu_rows(const rows_task *t, int r0, int r1)
{
    size_t o = (size_t)r0 * t->dim;
    tpk_silu_mul(t->x + o, t->in + o, (size_t)(r1 - r0) * t->dim);
}

/* opts->cpu_kernels: a path by name, NULL or "auto" for the best.  The
 * path is process-wide and set only when it changes: ranks run as threads
 * (tests) create their models side by side. */
static int select_cpu_kernels(const char *name, tp_err *err)
{
    if (!name || !strcmp(name, "auto")) {
        tpg_isa best = tpg_best_isa();
        if (tpg_get_isa() != best)
            tpg_set_isa(best);
        return 0;
    }
    for (int i = 0; i < TPG_ISA_COUNT; i++)
        if (!strcmp(name, tpg_isa_name((tpg_isa)i))) {
            if (tpg_get_isa() == (tpg_isa)i || tpg_set_isa((tpg_isa)i) == 0)
                return 0;
            return tp_errorf(err, "--cpu-kernels %s: this CPU cannot run them", name);
        }
    return tp_errorf(err, "--cpu-kernels %s: unknown (amx, avx512, avx2, portable or auto)", name);
}

static int allreduce(tp_model *m, float *buf, size_t n, tp_err *err)
{
    if (m->world == 1)
        return 0;
    return m->comm->ops->allreduce_sum_f32(m->comm, buf, n, err);
}

static const tp_loaded_tensor *find_tensor(const tp_loaded_rank *lr, const char *name)
{
    for (size_t i = 0; i < lr->n_tensors; i++)
        if (lr->tensors[i].info && strcmp(lr->tensors[i].info->name, name) == 0)
            return &lr->tensors[i];
    return NULL;
}

typedef struct loader_ctx {
    tp_model *m;
    const tp_loaded_rank *lr;
    bool no_copy;               /* cuda: check and locate the weights, read nothing */
} loader_ctx;

/* Expected local shape: dims[i] < 0 means "any" (filled in on return). */
static int check_shape(const tp_loaded_rank *lr, const tp_shard_tensor *t, int ndim, int64_t *dims,
                       tp_err *err)
{
    if (t->ndim != ndim)
        return tp_errorf(err, "%s: rank %d: tensor %s has %d dims, expected %d", lr->source,
                         lr->rank, t->name, t->ndim, ndim);
    for (int d = 0; d < ndim; d++) {
        if (dims[d] < 0) {
            dims[d] = (int64_t)t->shape[d];
        } else if ((int64_t)t->shape[d] != dims[d]) {
            char want[96] = "", got[96] = "";
            for (int e = 0; e < ndim; e++) {
                size_t lw = strlen(want), lg = strlen(got);
                snprintf(want + lw, sizeof want - lw, "%s%lld", e ? "," : "", (long long)dims[e]);
                snprintf(got + lg, sizeof got - lg, "%s%llu", e ? "," : "",
                         (unsigned long long)t->shape[e]);
            }
            return tp_errorf(err, "%s: rank %d: tensor %s has local shape [%s], expected [%s] "
                             "(config.json and tp=%d)", lr->source, lr->rank, t->name, got, want,
                             lr->manifest.tp);
        }
    }
    return 0;
}

/* Finds a tensor, checks its shape and dtype and records where it is (*src:
 * the whole tensor).  *out_t is NULL when the tensor is absent (allowed
 * when !required).  The cpu needs the bytes in memory. */
static int find_weight(loader_ctx *lc, const char *name, bool required, int ndim, int64_t *dims,
                       const tp_loaded_tensor **out_t, tp_weight_src *src, tp_err *err)
{
    const tp_loaded_rank *lr = lc->lr;
    *src = (tp_weight_src){ .tensor = -1 };
    *out_t = NULL;
    const tp_loaded_tensor *lt = find_tensor(lr, name);
    if (!lt) {
        if (required)
            return tp_errorf(err, "%s: rank %d: missing tensor %s", lr->source, lr->rank, name);
        return 0;
    }
    const tp_shard_tensor *t = lt->info;
    if (t->dtype != TP_BF16 && t->dtype != TP_F16 && t->dtype != TP_F32 &&
        t->dtype != TP_F8_E4M3 && t->dtype != TP_I8)
        return tp_errorf(err, "%s: rank %d: tensor %s has unsupported dtype", lr->source, lr->rank,
                         name);
    if (check_shape(lr, t, ndim, dims, err) < 0)
        return -1;
    size_t count = 1;
    for (int d = 0; d < ndim; d++)
        if (!tp_mul_size(count, (size_t)t->shape[d], &count))
            return tp_errorf(err, "%s: tensor %s: size overflows", lr->source, name);
    if (count * tp_dtype_size(t->dtype) != t->raw_size)
        return tp_errorf(err, "%s: rank %d: tensor %s: data size does not match its shape",
                         lr->source, lr->rank, name);
    if (!lc->no_copy && !lt->data)
        return tp_errorf(err, "%s: rank %d: tensor %s is not in memory (opened with "
                         "defer_tensors, or dropped): the cpu model needs tp_load_rank's tensors",
                         lr->source, lr->rank, name);
    *out_t = lt;
    *src = (tp_weight_src){ .tensor = (int)(lt - lr->tensors), .offset = 0, .bytes = t->raw_size };
    return 0;
}

/* Refuses an 8-bit dtype where the model reads floats (vectors, the
 * embedding lookup, the fused expert tensors): names the tensor. */
static int check_float(const tp_loaded_rank *lr, const tp_loaded_tensor *lt, const char *what,
                       tp_err *err)
{
    if (lt && (lt->info->dtype == TP_F8_E4M3 || lt->info->dtype == TP_I8))
        return tp_errorf(err, "%s: rank %d: tensor %s is %s: %s must be bf16, f16 or f32",
                         lr->source, lr->rank, lt->info->name, tp_dtype_name(lt->info->dtype),
                         what);
    return 0;
}

/* The global rows [*r0, *r1) and columns [*c0, *c1) of a 2-d slice (one
 * range along its split dimension, or whole); packed slices (several
 * ranges) are refused: their scales would need one origin per range. */
static int slice_ranges(const tp_loaded_rank *lr, const tp_shard_tensor *t, int64_t *r0,
                        int64_t *r1, int64_t *c0, int64_t *c1, tp_err *err)
{
    *r0 = *c0 = 0;
    *r1 = (int64_t)t->global_shape[0];
    *c1 = (int64_t)t->global_shape[1];
    if (t->split.dim < 0)
        return 0;
    if ((t->split.dim != 0 && t->split.dim != 1) || t->split.n_ranges != 1)
        return tp_errorf(err, "%s: rank %d: tensor %s: an 8-bit weight split along dim %d with %d "
                         "ranges is not supported (one range of rows or columns)", lr->source,
                         lr->rank, t->name, t->split.dim, t->split.n_ranges);
    int64_t s = (int64_t)t->split.start[0], e = (int64_t)t->split.end[0];
    if (e - s != (int64_t)t->shape[t->split.dim] || s < 0 ||
        e > (int64_t)t->global_shape[t->split.dim])
        return tp_errorf(err, "%s: rank %d: tensor %s: split range [%lld, %lld) does not match its "
                         "local shape", lr->source, lr->rank, t->name, (long long)s, (long long)e);
    if (t->split.dim == 0) {
        *r0 = s; *r1 = e;
    } else {
        *c0 = s; *c1 = e;
    }
    return 0;
}

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* The scales of the 8-bit weight wt (FORMAT.md 1.5, "Quantized weights"):
 * P.weight_scale_inv (F8_E4M3: one per block of the slice's block grid) or
 * P.weight_scale (I8: one per local row), F32, its local shape checked
 * against the weight's slice; *q gets its geometry (and, on the cpu, the
 * scales in place in lr); *scale_src where the scale tensor lies. */
static int get_scales(loader_ctx *lc, const tp_loaded_tensor *wt, tpg_quant *q,
                      tp_scale_src *scale_src, tp_err *err)
{
    const tp_loaded_rank *lr = lc->lr;
    const tp_model_config *c = &lc->m->cfg;
    const tp_shard_tensor *t = wt->info;
    bool fp8 = t->dtype == TP_F8_E4M3;
    if (c->quant != (fp8 ? TP_QUANT_FP8_BLOCK : TP_QUANT_INT8_ROW))
        return tp_errorf(err, "%s: rank %d: tensor %s is %s but config.json's quantization_config "
                         "does not declare %s", lr->source, lr->rank, t->name,
                         tp_dtype_name(t->dtype), fp8 ? "fp8 block scales" : "int8 row scales");
    char name[320];
    if (!tp_quant_scale_name(c->quant, t->name, name, sizeof name))
        return tp_errorf(err, "%s: rank %d: tensor %s: an 8-bit tensor's name must end in .weight",
                         lr->source, lr->rank, t->name);
    int64_t r0, r1, c0, c1;
    if (slice_ranges(lr, t, &r0, &r1, &c0, &c1, err) < 0)
        return -1;
    *q = (tpg_quant){ 0 };
    int64_t dims[2];
    if (fp8) {
        int64_t b0 = c->quant_block[0], b1 = c->quant_block[1];
        if (b0 < 1 || b1 < 1)
            return tp_errorf(err, "%s: tensor %s: config.json's weight_block_size is not set",
                             lr->source, t->name);
        /* the block rows / columns the slice touches, as FORMAT.md cuts them */
        dims[0] = ceil_div(r1, b0) - r0 / b0;
        dims[1] = ceil_div(c1, b1) - c0 / b1;
        *q = (tpg_quant){ .stride = (int)dims[1], .block = { (int)b0, (int)b1 },
                          .origin = { (int)(r0 % b0), (int)(c0 % b1) } };
    } else {
        dims[0] = (int64_t)t->shape[0];
    }
    const tp_loaded_tensor *st;
    tp_weight_src ss;
    if (find_weight(lc, name, false, fp8 ? 2 : 1, dims, &st, &ss, err) < 0)
        return tp_err_prefix(err, "scales of %s", t->name);
    if (!st)
        return tp_errorf(err, "%s: rank %d: tensor %s is %s but its scale tensor %s is missing",
                         lr->source, lr->rank, t->name, tp_dtype_name(t->dtype), name);
    if (st->info->dtype != TP_F32)
        return tp_errorf(err, "%s: rank %d: tensor %s is %s: scales must be F32", lr->source,
                         lr->rank, name, tp_dtype_name(st->info->dtype));
    *scale_src = (tp_scale_src){ ss.tensor, ss.offset, ss.bytes };
    if (lc->no_copy)
        return 0;
    const float *scale = (const float *)st->data;
    size_t count = (size_t)dims[0] * (size_t)(fp8 ? dims[1] : 1);
    for (size_t i = 0; i < count; i++)
        if (!isfinite(scale[i]))
            return tp_errorf(err, "%s: rank %d: tensor %s: scale %zu is not finite (%g)",
                             lr->source, lr->rank, name, i, (double)scale[i]);
    q->scale = scale;
    return 0;
}

/* A matrix [dims[0]][dims[1]]: used where it lies in lr, in its stored
 * dtype (no copy; the model reads lr until tp_model_free).  An 8-bit one
 * comes with its scales (get_scales); src->scale says where they lie. */
static int get_matrix(loader_ctx *lc, const char *name, bool required, int64_t *dims,
                      const tp_loaded_tensor **out_t, tp_mat *out, tp_weight_src *src, tp_err *err)
{
    const tp_loaded_tensor *lt;
    *out = (tp_mat){ 0 };
    if (find_weight(lc, name, required, 2, dims, &lt, src, err) < 0)
        return -1;
    if (out_t)
        *out_t = lt;
    if (!lt)
        return 0;
    tpg_quant q = { 0 };
    if ((lt->info->dtype == TP_F8_E4M3 || lt->info->dtype == TP_I8) &&
        get_scales(lc, lt, &q, &src->scale, err) < 0)
        return -1;
    src->q = q;
    src->q.scale = NULL;
    if (!lc->no_copy)
        *out = (tp_mat){ lt->data, lt->info->dtype, q };
    return 0;
}

/* A vector (norm weight, bias) of dims[0] values: an fp32 copy of its own
 * (a few KB per layer), so the elementwise kernels stay fp32. */
static int get_vector(loader_ctx *lc, const char *name, bool required, int64_t *dims,
                      const float **out, tp_weight_src *src, tp_err *err)
{
    tp_model *m = lc->m;
    const tp_loaded_tensor *lt;
    *out = NULL;
    if (find_weight(lc, name, required, 1, dims, &lt, src, err) < 0 ||
        check_float(lc->lr, lt, "a vector", err) < 0)
        return -1;
    if (!lt || lc->no_copy)
        return 0;
    if (m->n_owned == m->cap_owned) {
        size_t cap = m->cap_owned ? m->cap_owned * 2 : 64;
        float **o = realloc(m->owned, cap * sizeof *o);
        if (!o)
            return tp_errorf(err, "out of memory");
        m->owned = o;
        m->cap_owned = cap;
    }
    float *dst = malloc((size_t)dims[0] * sizeof(float));
    if (!dst)
        return tp_errorf(err, "%s: tensor %s: out of memory", lc->lr->source, name);
    m->owned[m->n_owned++] = dst;
    tpk_to_f32(dst, lt->data, lt->info->dtype, (size_t)dims[0]);
    *out = dst;
    return 0;
}

/* The global row range [start, end) a rank holds along dim 0 (whole tensor
 * when replicated).  Anything else (other dims, packed ranges) is refused. */
static int row_range(const tp_loaded_rank *lr, const tp_shard_tensor *t, int64_t *start,
                     int64_t *end, tp_err *err)
{
    if (t->split.dim < 0) {
        *start = 0;
        *end = (int64_t)t->global_shape[0];
    } else if (t->split.dim == 0 && t->split.n_ranges == 1) {
        *start = (int64_t)t->split.start[0];
        *end = (int64_t)t->split.end[0];
    } else {
        return tp_errorf(err, "%s: rank %d: tensor %s: split along dim %d with %d ranges is not "
                         "supported here (expected rows, one range)", lr->source, lr->rank,
                         t->name, t->split.dim, t->split.n_ranges);
    }
    if (*end - *start != (int64_t)t->shape[0] || *start < 0 ||
        *end > (int64_t)t->global_shape[0])
        return tp_errorf(err, "%s: rank %d: tensor %s: split range [%lld, %lld) does not match "
                         "its local shape", lr->source, lr->rank, t->name, (long long)*start,
                         (long long)*end);
    return 0;
}

/* A colwise weight [local_rows, in] or rowwise [out, local_cols] must be cut
 * as tensor parallelism needs when world > 1. */
static int check_split(const tp_loaded_rank *lr, const tp_shard_tensor *t, int want_dim,
                       int world, tp_err *err)
{
    if (world == 1)
        return 0;
    if (t->split.dim != want_dim || t->split.n_ranges != 1)
        return tp_errorf(err, "%s: rank %d: tensor %s: expected a split along dim %d (%s), found "
                         "dim %d with %d ranges", lr->source, lr->rank, t->name, want_dim,
                         want_dim == 0 ? "colwise" : "rowwise", t->split.dim, t->split.n_ranges);
    return 0;
}

/* --------------------------------------------------------- model creation */

/* A layer's slots by convert.h's tp_layer_slot: where the table's rows
 * land in tp_layer_weights (a tp_mat or a const float *) and tp_layer_src. */
static const size_t weight_slot_offset[TP_SLOT_COUNT] = {
#define TP_X(field, kind) [TP_SLOT_##field] = offsetof(tp_layer_weights, field),
    TP_LAYER_TENSORS(TP_X)
#undef TP_X
};
static const size_t src_slot_offset[TP_SLOT_COUNT] = {
#define TP_X(field, kind) [TP_SLOT_##field] = offsetof(tp_layer_src, field),
    TP_LAYER_TENSORS(TP_X)
#undef TP_X
};

static void *weight_slot(tp_layer_weights *L, tp_layer_slot s)
{
    return (char *)L + weight_slot_offset[s];
}

static tp_weight_src *src_slot(tp_layer_src *S, tp_layer_slot s)
{
    return (tp_weight_src *)((char *)S + src_slot_offset[s]);
}

/* The shard tensor behind a slot (NULL: absent). */
static const tp_shard_tensor *slot_tensor(const tp_loaded_rank *lr, const tp_layer_src *S, tp_layer_slot s)
{
    int i = src_slot((tp_layer_src *)S, s)->tensor;
    return i >= 0 ? lr->tensors[i].info : NULL;
}

/* The dimension a tensor-parallel cut splits (colwise: rows, rowwise:
 * columns), -1 for a replicated row. */
static int row_split_dim(const tp_arch_tensor *row)
{
    return row->runs == TP_STYLE_COLWISE ? 0 : row->runs == TP_STYLE_ROWWISE ? 1 : -1;
}

/* A table row with a slot: its weight in its slot (global shape, the split
 * dimension left to the file: the checks after the loop relate the local
 * sizes), then its bias, if the rank has one, of the weight's local rows. */
static int load_slot_row(loader_ctx *lc, int l, const tp_arch_tensor *row, tp_err *err)
{
    tp_model *m = lc->m;
    tp_layer_weights *L = &m->layers[l];
    tp_layer_src *S = &m->layer_src[l];
    int64_t dims[3];
    for (int d = 0; d < row->ndim; d++)
        dims[d] = tp_dim_value(&m->cfg, row->dims[d]);
    int split = row_split_dim(row);
    if (split >= 0 && m->world > 1)
        dims[split] = -1;
    char name[256];
    if (!tp_arch_tensor_name(row, l, -1, name, sizeof name))
        return tp_errorf(err, "%s: layer %d: tensor name too long", lc->lr->source, l);
    if (tp_layer_slot_is_matrix(row->slot)) {
        const tp_loaded_tensor *t;
        if (get_matrix(lc, name, true, dims, &t, weight_slot(L, row->slot), src_slot(S, row->slot), err) < 0 ||
            (split >= 0 && check_split(lc->lr, t->info, split, m->world, err) < 0))
            return -1;
    } else if (get_vector(lc, name, true, dims, weight_slot(L, row->slot), src_slot(S, row->slot), err) < 0) {
        return -1;
    }
    if (row->bias_slot == TP_SLOT_NONE)
        return 0;
    /* colwise: the rank's rows of the bias; rowwise: whole, added after the all-reduce */
    int64_t bias_dims[1] = { dims[0] };
    if (!tp_arch_bias_name(row, l, name, sizeof name))
        return tp_errorf(err, "%s: layer %d: tensor name too long", lc->lr->source, l);
    return get_vector(lc, name, false, bias_dims, weight_slot(L, row->bias_slot), src_slot(S, row->bias_slot), err);
}

/* How many heads of head_dim a q or k weight's local rows hold; the first
 * layer decides (*local), the others must agree. */
static int check_heads(const tp_loaded_rank *lr, const tp_shard_tensor *t, int64_t hd, int n_heads,
                       const char *key, int *local, tp_err *err)
{
    int64_t rows = (int64_t)t->shape[0];
    if (t->global_shape[0] != (uint64_t)(n_heads * hd) || rows % hd || rows == 0)
        return tp_errorf(err, "%s: rank %d: tensor %s: %lld local rows / global %llu do not hold "
                         "whole heads of head_dim %lld (%s %d)", lr->source, lr->rank, t->name,
                         (long long)rows, (unsigned long long)t->global_shape[0], (long long)hd, key, n_heads);
    if (*local > 0 && rows != *local * hd)
        return tp_errorf(err, "%s: rank %d: tensor %s has %lld local rows, expected %lld as in layer 0 "
                         "(config.json and tp=%d)", lr->source, lr->rank, t->name, (long long)rows,
                         (long long)(*local * hd), lr->manifest.tp);
    *local = (int)(rows / hd);
    return 0;
}

/* What the table cannot say about attention: q and k hold whole heads, as
 * many in every layer; every local q head finds its kv head among the
 * local ones; v is cut like k; o_proj's columns are the q rows; biases on
 * all of q/k/v or none. */
static int check_attention(loader_ctx *lc, int l, tp_err *err)
{
    tp_model *m = lc->m;
    const tp_model_config *c = &m->cfg;
    const tp_loaded_rank *lr = lc->lr;
    const tp_layer_src *S = &m->layer_src[l];
    const int64_t hd = c->head_dim;
    const tp_shard_tensor *tq = slot_tensor(lr, S, TP_SLOT_wq), *tk = slot_tensor(lr, S, TP_SLOT_wk);
    const tp_shard_tensor *tv = slot_tensor(lr, S, TP_SLOT_wv), *to = slot_tensor(lr, S, TP_SLOT_wo);
    if (check_heads(lr, tq, hd, c->n_heads, "num_attention_heads", &m->lq, err) < 0 ||
        check_heads(lr, tk, hd, c->n_kv_heads, "num_key_value_heads", &m->lkv, err) < 0)
        return -1;
    if (m->lq % m->lkv)
        return tp_errorf(err, "%s: rank %d: layer %d holds %d q heads and %d kv heads: not a "
                         "multiple", lr->source, lr->rank, l, m->lq, m->lkv);
    m->group = m->lq / m->lkv;
    /* global q head g uses kv head g / (n_heads / n_kv_heads) */
    int64_t qs = 0, qe = 0, ks = 0, ke = 0;
    if (row_range(lr, tq, &qs, &qe, err) < 0 || row_range(lr, tk, &ks, &ke, err) < 0)
        return -1;
    int per_kv = c->n_heads / c->n_kv_heads;
    for (int i = 0; i < m->lq; i++) {
        int64_t g = qs / hd + i;
        int64_t want_kv = g / per_kv;
        int64_t have_kv = ks / hd + i / m->group;
        if (qs % hd || ks % hd || want_kv != have_kv)
            return tp_errorf(err, "%s: rank %d: tensors %s / k_proj: local q head %d (global "
                             "%lld) needs kv head %lld, the rank holds kv rows [%lld, %lld)",
                             lr->source, lr->rank, tq->name, i, (long long)g, (long long)want_kv,
                             (long long)ks, (long long)ke);
    }
    if (tv->shape[0] != tk->shape[0] || tv->global_shape[0] != tk->global_shape[0] ||
        tv->split.dim != tk->split.dim ||
        (tv->split.dim >= 0 && tv->split.start[0] != tk->split.start[0]))
        return tp_errorf(err, "%s: rank %d: tensor %s is not cut like k_proj", lr->source,
                         lr->rank, tv->name);
    if (to->shape[1] != (uint64_t)(m->lq * hd))
        return tp_errorf(err, "%s: rank %d: tensor %s has %llu local columns, the rank's q heads "
                         "need %lld", lr->source, lr->rank, to->name, (unsigned long long)to->shape[1],
                         (long long)(m->lq * hd));
    bool bq = S->bq.tensor >= 0;
    if (bq != (S->bk.tensor >= 0) || bq != (S->bv.tensor >= 0))
        return tp_errorf(err, "%s: rank %d: layer %d has biases on some of q/k/v only", lr->source,
                         lr->rank, l);
    return 0;
}

/* A dense MLP: gate and up hold the same local rows, down as many
 * columns, in every dense layer (the first one decides m->li). */
static int check_dense_mlp(loader_ctx *lc, int l, tp_err *err)
{
    tp_model *m = lc->m;
    const tp_loaded_rank *lr = lc->lr;
    const tp_layer_src *S = &m->layer_src[l];
    const tp_shard_tensor *tg = slot_tensor(lr, S, TP_SLOT_wgate), *tu = slot_tensor(lr, S, TP_SLOT_wup);
    const tp_shard_tensor *td = slot_tensor(lr, S, TP_SLOT_wdown);
    int64_t li = m->li > 0 ? m->li : (int64_t)tg->shape[0];
    const tp_shard_tensor *bad = (int64_t)tg->shape[0] != li ? tg : (int64_t)tu->shape[0] != li ? tu
                               : (int64_t)td->shape[1] != li ? td : NULL;
    if (bad)
        return tp_errorf(err, "%s: rank %d: tensor %s: local shape [%llu,%llu], the rank's MLP "
                         "holds %lld intermediate rows (config.json and tp=%d)", lr->source, lr->rank,
                         bad->name, (unsigned long long)bad->shape[0], (unsigned long long)bad->shape[1],
                         (long long)li, lr->manifest.tp);
    m->li = (int)li;
    return 0;
}

/* A sparse layer's MLP before its rows load: the router and top-k
 * settings, this rank's experts and their local size. */
static int moe_setup(loader_ctx *lc, int l, tp_err *err)
{
    tp_model *m = lc->m;
    const tp_model_config *c = &m->cfg;
    const tp_loaded_rank *lr = lc->lr;
    bool ep = lr->manifest.expert_parallel;
    tp_moe_weights *w = calloc(1, sizeof *w);
    if (!w)
        return tp_errorf(err, "out of memory");
    m->layers[l].moe = w;
    m->layer_src[l].moe = w;
    w->n_experts = c->n_experts;
    w->top_k = c->n_experts_per_tok;
    w->renorm = c->norm_topk_prob;
    w->expert_lo = 0;
    w->expert_hi = c->n_experts;
    if (ep && tp_expert_range(c->n_experts, m->world, m->rank, &w->expert_lo, &w->expert_hi, err) < 0)
        return tp_err_prefix(err, "%s", lr->source);
    if (!ep && c->moe_intermediate % m->world)
        return tp_errorf(err, "%s: moe_intermediate_size %d is not a multiple of tp %d", lr->source,
                         c->moe_intermediate, m->world);
    w->inter = ep ? c->moe_intermediate : c->moe_intermediate / m->world;
    size_t ne = (size_t)(w->expert_hi - w->expert_lo);
    w->gate = calloc(ne, sizeof *w->gate);
    w->up = calloc(ne, sizeof *w->up);
    w->down = calloc(ne, sizeof *w->down);
    w->gate_src = calloc(ne, sizeof *w->gate_src);
    w->up_src = calloc(ne, sizeof *w->up_src);
    w->down_src = calloc(ne, sizeof *w->down_src);
    if (!w->gate || !w->up || !w->down || !w->gate_src || !w->up_src || !w->down_src)
        return tp_errorf(err, "out of memory");
    return 0;
}

/* An expert row's local shape: the table's, with the expert size this
 * rank's (a slice, or whole when expert-parallel) and the fused tensors'
 * expert count this rank's.  *split: the dimension the rank's cut must be
 * along (-1: whole), *ranges: how many ranges it records. */
static void expert_local_shape(const tp_model *m, const tp_moe_weights *w, const tp_arch_tensor *row,
                               bool ep, int64_t *dims, int *split, int *ranges)
{
    *split = -1;
    *ranges = row->runs == TP_STYLE_PACKED_COLWISE ? 2 : 1;
    for (int d = 0; d < row->ndim; d++) {
        tp_dim_of of = row->dims[d];
        dims[d] = of == TP_DIM_MOE_INTER ? w->inter : of == TP_DIM_2_MOE_INTER ? 2 * (int64_t)w->inter
                : of == TP_DIM_EXPERTS && row->kind == TP_ROW_FUSED ? w->expert_hi - w->expert_lo
                : tp_dim_value(&m->cfg, of);
        bool inter = of == TP_DIM_MOE_INTER || of == TP_DIM_2_MOE_INTER;
        if (ep ? of == TP_DIM_EXPERTS && row->kind == TP_ROW_FUSED : inter)
            *split = d;
    }
    if (ep)
        *ranges = 1;
}

/* Whether t is cut as the rank's share needs (world 1: anything whole). */
static bool expert_cut_ok(const tp_model *m, const tp_moe_weights *w, const tp_shard_tensor *t, bool ep,
                          int split, int ranges)
{
    if (split < 0)
        return t->split.dim == -1 || (!ep && m->world == 1);
    if (m->world == 1 && !ep)
        return true;
    return t->split.dim == split && t->split.n_ranges == ranges &&
           (!ep || t->split.start[0] == (uint64_t)w->expert_lo);
}

/* The router (whole on every rank), one expert's gate / up / down (per
 * expert, for each local expert), or a fused tensor holding every local
 * expert (its blocks: gate rows then up rows, or down), all read in place. */
static int load_expert_row(loader_ctx *lc, int l, const tp_arch_tensor *row, tp_err *err)
{
    tp_model *m = lc->m;
    const tp_loaded_rank *lr = lc->lr;
    tp_moe_weights *w = m->layers[l].moe;
    bool ep = lr->manifest.expert_parallel;
    int64_t dims[3];
    int split, ranges;
    expert_local_shape(m, w, row, ep, dims, &split, &ranges);
    bool per_expert = row->kind == TP_ROW_EXPERT;
    int lo = per_expert ? w->expert_lo : 0, hi = per_expert ? w->expert_hi : 1;
    char name[256];
    for (int e = lo; e < hi; e++) {
        const tp_loaded_tensor *t;
        tp_weight_src src;
        tp_mat mat;
        if (!tp_arch_tensor_name(row, l, e, name, sizeof name))
            return tp_errorf(err, "%s: layer %d: tensor name too long", lr->source, l);
        /* a 2-d row (router, one expert's matrix) may be 8-bit with its
         * scales; the fused 3-d tensors must be float */
        if (row->ndim == 2 ? get_matrix(lc, name, true, dims, &t, &mat, &src, err) < 0
                           : find_weight(lc, name, true, row->ndim, dims, &t, &src, err) < 0 ||
                                 check_float(lr, t, "the fused expert layout", err) < 0)
            return -1;
        if (!expert_cut_ok(m, w, t->info, ep, split, ranges))
            return tp_errorf(err, "%s: rank %d: tensor %s is not cut as %s (split along dim %d with "
                             "%d ranges)", lr->source, lr->rank, name,
                             row->part == TP_EXPERT_ROUTER ? "a router, whole on every rank"
                             : ep ? "expert-parallel experts" : "tensor-parallel experts",
                             t->info->split.dim, t->info->split.n_ranges);
        if (row->ndim != 2)
            mat = lc->no_copy ? (tp_mat){ 0 } : (tp_mat){ .data = t->data, .dtype = t->info->dtype };
        int k = e - w->expert_lo;
        switch (row->part) {
        case TP_EXPERT_ROUTER: w->router = mat; w->router_src = src; break;
        case TP_EXPERT_GATE: w->gate[k] = mat; w->gate_src[k] = src; break;
        case TP_EXPERT_UP: w->up[k] = mat; w->up_src[k] = src; break;
        case TP_EXPERT_DOWN: w->down[k] = mat; w->down_src[k] = src; break;
        case TP_EXPERT_FUSED_GATE_UP: case TP_EXPERT_FUSED_DOWN: {
            /* [local experts][rows][cols]: expert e's block(s) by offset */
            bool gate_up = row->part == TP_EXPERT_FUSED_GATE_UP;
            size_t es = tp_dtype_size(t->info->dtype);
            uint64_t block = (uint64_t)(gate_up ? dims[1] / 2 : dims[1]) * (uint64_t)dims[2] * es;
            for (int x = 0; x < w->expert_hi - w->expert_lo; x++) {
                uint64_t at = (uint64_t)x * (gate_up ? 2 : 1) * block;
                tp_weight_src *first = gate_up ? &w->gate_src[x] : &w->down_src[x];
                tp_mat *first_mat = gate_up ? &w->gate[x] : &w->down[x];
                *first = (tp_weight_src){ .tensor = src.tensor, .offset = at, .bytes = block };
                if (!lc->no_copy)
                    *first_mat = (tp_mat){ .data = (const uint8_t *)t->data + at, .dtype = t->info->dtype };
                if (gate_up) {
                    w->up_src[x] = (tp_weight_src){ .tensor = src.tensor, .offset = at + block, .bytes = block };
                    if (!lc->no_copy)
                        w->up[x] = (tp_mat){ .data = (const uint8_t *)t->data + at + block,
                                         .dtype = t->info->dtype };
                }
            }
            break;
        }
        case TP_EXPERT_NONE: break;
        }
    }
    return 0;
}

/* Whether sparse layer l holds its experts in the fused layout (any fused
 * row of the architecture present). */
static bool layer_fused(loader_ctx *lc, int l)
{
    char name[256];
    for (size_t r = 0; r < tp_arch_n_layer_tensors; r++) {
        const tp_arch_tensor *row = &tp_arch_layer_tensors[r];
        if (row->kind == TP_ROW_FUSED && tp_arch_row_in_layer(&lc->m->cfg, row, l, true) &&
            tp_arch_tensor_name(row, l, -1, name, sizeof name) && find_tensor(lc->lr, name))
            return true;
    }
    return false;
}

/* One decoder layer: every row the architecture's table has for this
 * layer's kind (dense or sparse, per-expert or fused experts) into its
 * slot, or into the sparse MLP; then what is specific to attention and the
 * MLP, and the sliding window. */
static int load_layer(loader_ctx *lc, int l, tp_err *err)
{
    tp_model *m = lc->m;
    const tp_model_config *c = &m->cfg;
    bool sparse = tp_config_layer_sparse(c, l);
    bool fused = sparse && layer_fused(lc, l);
    if (sparse && moe_setup(lc, l, err) < 0)
        return -1;
    for (size_t r = 0; r < tp_arch_n_layer_tensors; r++) {
        const tp_arch_tensor *row = &tp_arch_layer_tensors[r];
        if (!tp_arch_row_in_layer(c, row, l, fused))
            continue;
        if ((row->slot != TP_SLOT_NONE ? load_slot_row(lc, l, row, err)
                                       : load_expert_row(lc, l, row, err)) < 0)
            return -1;
    }
    if (check_attention(lc, l, err) < 0 || (!sparse && check_dense_mlp(lc, l, err) < 0))
        return -1;
    m->layers[l].window = (c->sliding_window > 0 && l >= c->sliding_from_layer) ? c->sliding_window : 0;
    m->layer_src[l].window = m->layers[l].window;
    return 0;
}

/* Moves an 8-bit matrix's scale geometry s rows down (fp8: the block
 * origin; int8: the row scales); returns how many floats the scales start
 * further on.  0 for float dtypes. */
static size_t quant_skip_rows(tpg_quant *q, tp_dtype dt, int64_t s)
{
    if (dt == TP_I8)
        return (size_t)s;
    if (dt != TP_F8_E4M3)
        return 0;
    int64_t o = q->origin[0] + s;
    q->origin[0] = (int)(o % q->block[0]);
    return (size_t)(o / q->block[0]) * (size_t)q->stride;
}

/* Embedding and lm_head.  The embedding is replicated (rows [0, V)) or
 * vocab-parallel (a row range; the lookup's zeros for other rows are filled
 * in by an all-reduce).  The lm_head is the embedding when tied, else
 * lm_head.weight; a rank computes only its vocabulary rows: the split's rows
 * when the tensor is cut, else rows [r*ceil(V/tp), ...) of the full tensor
 * (a pointer offset, no copy). */
static int load_embeddings(loader_ctx *lc, tp_err *err)
{
    tp_model *m = lc->m;
    const tp_loaded_rank *lr = lc->lr;
    const int64_t H = m->cfg.hidden, V = m->cfg.vocab;
    int64_t d1[1] = { H }, d2[2] = { -1, H };
    const tp_loaded_tensor *te, *tl = NULL;

    /* an 8-bit embedding only as a tied lm_head's table (tpconvert
     * --quantize-lm-head; convert/arch.c checked its config) */
    if (get_matrix(lc, "model.embed_tokens.weight", true, d2, &te, &m->embed, &m->embed_src,
                   err) < 0 ||
        (!m->cfg.tie_embeddings && check_float(lr, te, "an embedding not tied to lm_head", err) < 0) ||
        row_range(lr, te->info, &m->emb_start, &m->emb_end, err) < 0)
        return -1;
    if (get_vector(lc, "model.norm.weight", true, d1, &m->final_norm, &m->final_norm_src,
                   err) < 0)
        return -1;

    tp_mat w;
    tp_weight_src ws;
    int64_t start, end;
    if (m->cfg.tie_embeddings) {
        w = m->embed; ws = m->embed_src; start = m->emb_start; end = m->emb_end;
    } else {
        d2[0] = -1; d2[1] = H;
        if (get_matrix(lc, "lm_head.weight", true, d2, &tl, &w, &ws, err) < 0 ||
            row_range(lr, tl->info, &start, &end, err) < 0)
            return -1;
    }
    if (start == 0 && end == V && m->world > 1) {
        int64_t per = (V + m->world - 1) / m->world;
        int64_t s = per * m->rank, e = s + per < V ? s + per : V;
        if (s > V)
            s = V;
        tp_dtype dt = lr->tensors[ws.tensor].info->dtype;
        size_t es = tp_dtype_size(dt);
        if (w.data) {
            w.data = (const uint8_t *)w.data + (size_t)s * H * es;
            w.q.scale += quant_skip_rows(&w.q, dt, s);
        }
        uint64_t moved = quant_skip_rows(&ws.q, dt, s) * sizeof(float);
        ws.scale.offset += moved;
        ws.scale.bytes -= moved;
        start = s;
        end = e > s ? e : s;
        ws.offset = (uint64_t)s * H * es;
        ws.bytes = (uint64_t)(end - start) * H * es;
    }
    m->lm_w = w;
    m->lm_src = ws;
    m->lm_start = start;
    m->lm_end = end;
    return 0;
}

/* Every rank learns every rank's vocabulary rows (one small all-gather; the
 * values are < 2^24 so floats hold them exactly) and checks that they
 * partition [0, V). */
static int exchange_vocab_ranges(tp_model *m, tp_err *err)
{
    m->lm_ranges = calloc((size_t)m->world * 2, sizeof *m->lm_ranges);
    if (!m->lm_ranges)
        return tp_errorf(err, "out of memory");
    if (m->world == 1) {
        m->lm_ranges[0] = m->lm_start;
        m->lm_ranges[1] = m->lm_end;
    } else {
        float mine[2] = { (float)m->lm_start, (float)m->lm_end };
        float *all = malloc((size_t)m->world * 2 * sizeof *all);
        if (!all)
            return tp_errorf(err, "out of memory");
        if (m->comm->ops->allgather_f32(m->comm, mine, all, 2, err) < 0) {
            free(all);
            return tp_err_prefix(err, "exchanging lm_head vocabulary ranges");
        }
        for (int r = 0; r < 2 * m->world; r++)
            m->lm_ranges[r] = (int64_t)all[r];
        free(all);
    }
    int64_t total = 0, V = m->cfg.vocab;
    m->vocab_slot = 1;
    for (int r = 0; r < m->world; r++) {
        int64_t s = m->lm_ranges[2 * r], e = m->lm_ranges[2 * r + 1];
        if (s < 0 || e < s || e > V)
            return tp_errorf(err, "rank %d: lm_head rows [%lld, %lld) are outside the vocabulary",
                             r, (long long)s, (long long)e);
        for (int q = 0; q < r; q++) {
            int64_t s2 = m->lm_ranges[2 * q], e2 = m->lm_ranges[2 * q + 1];
            if (s < e2 && s2 < e)
                return tp_errorf(err, "ranks %d and %d both hold lm_head rows [%lld, %lld)", q, r,
                                 (long long)(s > s2 ? s : s2), (long long)(e < e2 ? e : e2));
        }
        total += e - s;
        if (e - s > m->vocab_slot)
            m->vocab_slot = (int)(e - s);
    }
    if (total != V)
        return tp_errorf(err, "the ranks' lm_head rows cover %lld of %lld vocabulary entries",
                         (long long)total, (long long)V);
    return 0;
}

/* An anonymous mapping of bytes, reserved, not touched (zero pages until
 * written); NULL when it cannot be mapped. */
static float *map_reserved(size_t bytes)
{
    void *p = mmap(NULL, bytes ? bytes : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static void free_kv(tp_model *m)
{
    if (m->kcache)
        munmap(m->kcache, m->kv_bytes ? m->kv_bytes : 1);
    if (m->vcache)
        munmap(m->vcache, m->kv_bytes ? m->kv_bytes : 1);
    m->kcache = m->vcache = NULL;
}

/* Refuses a KV cache larger than the machine's memory, before reserving it:
 * slots x max_seq x the per-token bytes (k and v of every local kv head of
 * every layer, fp32). */
static int check_kv_fits(const tp_model *m, size_t *bytes_each, tp_err *err)
{
    const tp_model_config *c = &m->cfg;
    size_t per_token = (size_t)c->n_layers * (size_t)m->lkv * (size_t)c->head_dim * sizeof(float);
    size_t each = 0, both = 0;
    bool ok = tp_mul_size(per_token, (size_t)m->max_seq, &each) &&
              tp_mul_size(each, (size_t)m->slots, &each) && tp_mul_size(each, 2, &both);
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    double phys = pages > 0 && page > 0 ? (double)pages * (double)page : 0;
    if (!ok || (phys > 0 && (double)both > phys))
        return tp_errorf(err, "a KV cache of --max-batch %d x --max-seq %d positions x %zu bytes a token "
                         "(%.3g GB) exceeds this machine's memory (%.3g GB): lower --max-batch or --max-seq",
                         m->slots, m->max_seq, 2 * per_token, ok ? (double)both / 1e9 : INFINITY, phys / 1e9);
    *bytes_each = each;
    return 0;
}

/* host_kv false (device cuda): no host KV cache (the device model checks
 * and allocates its own), only the slot lengths and RoPE tables. */
static int alloc_caches(tp_model *m, bool host_kv, tp_err *err)
{
    const tp_model_config *c = &m->cfg;
    if (host_kv && check_kv_fits(m, &m->kv_bytes, err) < 0)
        return -1;
    if (host_kv) {
        m->kcache = map_reserved(m->kv_bytes);
        m->vcache = map_reserved(m->kv_bytes);
        m->scratch = malloc((size_t)m->lq * TPK_ATT_BLOCK * m->max_seq * sizeof(float));
    }
    m->slot_len = calloc((size_t)m->slots, sizeof *m->slot_len);
    m->slot_next = calloc((size_t)m->slots, sizeof *m->slot_next);
    size_t half = (size_t)c->head_dim / 2;
    m->cos_t = malloc((size_t)m->max_seq * half * sizeof(float));
    m->sin_t = malloc((size_t)m->max_seq * half * sizeof(float));
    m->rope_inv = malloc(half * sizeof(float));
    if ((host_kv && (!m->kcache || !m->vcache || !m->scratch)) || !m->slot_len || !m->slot_next || !m->cos_t ||
        !m->sin_t || !m->rope_inv)
        return tp_errorf(err, "out of memory for a KV cache of --max-batch %d x --max-seq %d positions",
                         m->slots, m->max_seq);
    /* what transformers builds at init; dynamic and longrope compute the
     * rows of each pass (plan_runs) */
    tpk_rope_rows(m->cos_t, m->sin_t, m->rope_inv, c->head_dim, &c->rope, 0, 0, m->max_seq);
    return 0;
}

#ifdef TP_HAVE_CUDA
/* Hands the checked structure and where each weight is in lr to
 * model_cuda.cu, which streams them onto the device (weights_cuda.cu) and
 * allocates the KV caches of every slot there. */
static int to_device(tp_model *m, const tp_loaded_rank *lr, const char *device, bool no_graph, tp_err *err)
{
    tpcm_desc d = {
        .cfg = &m->cfg, .comm = m->comm, .rank = m->rank, .world = m->world, .lq = m->lq,
        .lkv = m->lkv, .li = m->li, .group = m->group, .max_seq = m->max_seq, .slots = m->slots,
        .lr = lr, .embed = m->embed_src, .emb_start = m->emb_start, .emb_end = m->emb_end,
        .final_norm = m->final_norm_src, .lm_w = m->lm_src, .lm_start = m->lm_start,
        .lm_end = m->lm_end, .lm_ranges = m->lm_ranges, .vocab_slot = m->vocab_slot,
        .layers = m->layer_src, .device = device, .no_graph = no_graph,
    };

    int rc = tpcm_create(&m->gpu, &d, err);
    if (rc < 0)
        return tp_err_prefix(err, "device \"%s\"", device);
    for (size_t i = 0; i < m->n_owned; i++)
        free(m->owned[i]);
    m->n_owned = 0;
    /* sparse layers keep their tp_moe_weights (freed by tp_model_free; its
     * tp_mat arrays are empty under no_copy) */
    for (int l = 0; l < m->cfg.n_layers; l++)
        m->layers[l] = (tp_layer_weights){ .moe = m->layers[l].moe };
    m->embed = m->lm_w = (tp_mat){ 0 };
    m->final_norm = NULL;
    return 0;
}
#endif

/* The one "can tprun run this?" check (convert/arch.c) on the rank's
 * tensors (global shapes): names a missing or misshapen tensor before any
 * weight is touched; the loaders below then check the local cuts. */
static int check_runnable(const tp_loaded_rank *lr, const tp_model_config *cfg, tp_err *err)
{
    tp_tensor_ref *refs = calloc(lr->n_tensors ? lr->n_tensors : 1, sizeof *refs);
    if (!refs)
        return tp_errorf(err, "out of memory");
    size_t n = 0;
    for (size_t i = 0; i < lr->n_tensors; i++)
        if (lr->tensors[i].info)
            refs[n++] = (tp_tensor_ref){ lr->tensors[i].info->name, lr->tensors[i].info->ndim,
                                         lr->tensors[i].info->global_shape,
                                         lr->tensors[i].info->dtype };
    int lo = 0, hi = cfg->n_experts, rc = 0;
    if (lr->manifest.expert_parallel)
        rc = tp_expert_range(cfg->n_experts, lr->manifest.tp, lr->rank, &lo, &hi, err);
    if (rc == 0)
        rc = tp_arch_check_rank_tensors(cfg, refs, n, lo, hi, err);
    free(refs);
    if (rc < 0)
        tp_err_prefix(err, "%s: rank %d", lr->source, lr->rank);
    return rc;
}

int tp_model_create(tp_model **out, tp_loaded_rank *lr, tp_comm *comm, const tp_model_opts *opts,
                    tp_err *err)
{
    *out = NULL;
    tp_model_opts def = { 0 };
    if (!opts)
        opts = &def;
    bool cuda = opts->device && (strcmp(opts->device, "cuda") == 0 ||
                                 strncmp(opts->device, "cuda:", 5) == 0);
    if (opts->device && strcmp(opts->device, "cpu") != 0 && !cuda)
        return tp_errorf(err, "device \"%s\": expected cpu, cuda or cuda:N", opts->device);
#ifndef TP_HAVE_CUDA
    if (cuda)
        return tp_errorf(err, "device \"%s\": this build has no CUDA (nvcc was not found, or "
                         "NOCUDA=1)", opts->device);
#endif
    tp_model *m = calloc(1, sizeof *m);
    if (!m)
        return tp_errorf(err, "out of memory");
    /* cpu: the matrices are read in place from lr; cuda: nothing is read
     * here, the device streams the tensors from lr. */
    loader_ctx lc = { .m = m, .lr = lr, .no_copy = cuda };
    const char *cfg_text = lr->manifest.config_json ? lr->manifest.config_json : lr->config_json;
    if (tp_model_config_parse(&m->cfg, cfg_text, err) < 0) {
        tp_err_prefix(err, "%s", lr->source ? lr->source : "model");
        goto fail;
    }
    m->comm = comm;
    m->rank = comm ? comm->rank : 0;
    m->world = comm ? comm->world : 1;
    if (lr->manifest.tp != m->world || lr->rank != m->rank) {
        tp_errorf(err, "%s: rank %d of a tp=%d conversion, but this process is rank %d of %d",
                  lr->source, lr->rank, lr->manifest.tp, m->rank, m->world);
        goto fail;
    }
    int max_len = tp_config_max_length(&m->cfg);
    m->max_seq = opts->max_seq > 0 ? opts->max_seq : (max_len < 4096 ? max_len : 4096);
    m->slots = opts->slots > 1 ? opts->slots : 1;
    if (opts->slots < 0) {
        tp_errorf(err, "--max-batch %d: expected 1 or more sequence slots", opts->slots);
        goto fail;
    }
    if (select_cpu_kernels(opts->cpu_kernels, err) < 0)
        goto fail;
    snprintf(m->cpu_info, sizeof m->cpu_info, "cpu, %s kernels", tpg_isa_name(tpg_get_isa()));
    int threads = opts->threads;
    if (threads <= 0) {
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        threads = cores > 0 ? (int)cores : 1;
    }
    /* Process-wide.  OpenBLAS runs only inside pool jobs (attention), one
     * call per thread: its own threads would only spin beside the pool's. */
    openblas_set_num_threads(1);
    if (threads > 1) {
        /* tp_pool_parallel_for's caller works too: threads - 1 helpers */
        m->pool = tp_pool_create(threads - 1);
        if (!m->pool) {
            tp_errorf(err, "cannot start %d threads", threads);
            goto fail;
        }
    }

    m->layers = calloc((size_t)m->cfg.n_layers, sizeof *m->layers);
    m->layer_src = calloc((size_t)m->cfg.n_layers, sizeof *m->layer_src);
    if (!m->layers || !m->layer_src) {
        tp_errorf(err, "out of memory");
        goto fail;
    }
    for (int l = 0; l < m->cfg.n_layers; l++) {
        /* absent until find_weight finds it (q/k norms are not even looked for outside qwen3) */
#define TP_X(field, kind) m->layer_src[l].field.tensor = -1;
        TP_LAYER_TENSORS(TP_X)
#undef TP_X
    }
    if (check_runnable(lr, &m->cfg, err) < 0 || load_embeddings(&lc, err) < 0)
        goto fail;
    for (int l = 0; l < m->cfg.n_layers; l++)
        if (load_layer(&lc, l, err) < 0)
            goto fail;
    /* What the tensors say wins over config flags. */
    const tp_layer_src *S0 = &m->layer_src[0];
    m->cfg.attention_bias = S0->bq.tensor >= 0;
    m->cfg.o_bias = S0->bo.tensor >= 0;
    m->cfg.mlp_bias = S0->bgate.tensor >= 0 || S0->bup.tensor >= 0 || S0->bdown.tensor >= 0;
    if (exchange_vocab_ranges(m, err) < 0 || alloc_caches(m, !cuda, err) < 0)
        goto fail;
#ifdef TP_HAVE_CUDA
    if (cuda && to_device(m, lr, opts->device, opts->no_graph, err) < 0)
        goto fail;
#endif
    *out = m;
    return 0;
fail:
    tp_model_free(m);
    return -1;
}

void tp_model_free(tp_model *m)
{
    if (!m)
        return;
#ifdef TP_HAVE_CUDA
    tpcm_free(m->gpu);
#endif
    for (size_t i = 0; i < m->n_owned; i++)
        free(m->owned[i]);
    free(m->owned);
    for (int l = 0; m->layers && l < m->cfg.n_layers; l++)
        if (m->layers[l].moe) {
            tp_moe_weights *w = m->layers[l].moe;
            free(w->gate); free(w->up); free(w->down);
            free(w->gate_src); free(w->up_src); free(w->down_src);
            free(w);
        }
    tp_moe_scratch_free(&m->moe_scratch);
    free(m->layers);
    free(m->layer_src);
    free(m->lm_ranges);
    free_kv(m);
    free(m->slot_len);
    free(m->slot_next);
    free(m->ids);
    free(m->runs);
    free(m->seq_tokens);
    free(m->run_cos);
    free(m->run_sin);
    free(m->lm_in);
    free(m->cos_t);
    free(m->sin_t);
    free(m->rope_inv);
    free(m->scratch);
    free(m->logit_slot);
    free(m->logit_all);
    free(m->pick_buf);
    free(m->x); free(m->h); free(m->q); free(m->k); free(m->v);
    free(m->att); free(m->o); free(m->gate); free(m->up);
    if (m->pool)
        tp_pool_destroy(m->pool);
    free(m);
}

const tp_model_config *tp_model_get_config(const tp_model *m) { return &m->cfg; }
void tp_model_reset(tp_model *m)
{
    memset(m->slot_len, 0, (size_t)m->slots * sizeof *m->slot_len);
}
int tp_model_position(const tp_model *m) { return m->slot_len[0]; }
int tp_model_slots(const tp_model *m) { return m->slots; }
int tp_model_slot_length(const tp_model *m, int slot)
{
    return slot >= 0 && slot < m->slots ? m->slot_len[slot] : -1;
}
void tp_model_reset_slot(tp_model *m, int slot)
{
    /* the stale positions are never read: attention sees [0, length) only */
    if (slot >= 0 && slot < m->slots)
        m->slot_len[slot] = 0;
}
const char *tp_model_device_info(const tp_model *m)
{
#ifdef TP_HAVE_CUDA
    if (m->gpu)
        return tpcm_describe(m->gpu);
#endif
    return m->cpu_info;
}

void tp_model_weight_stats(const tp_model *m, double *bytes, double *seconds)
{
    *bytes = *seconds = 0;
#ifdef TP_HAVE_CUDA
    if (m->gpu)
        tpcm_upload_stats(m->gpu, bytes, seconds);
#else
    (void)m;
#endif
}

/* ------------------------------------------------------------ forward pass */

/* The step's per-token buffers (ids, runs, tp_model_forward's tokens), on
 * every device. */
static int ensure_step_buffers(tp_model *m, int n, tp_err *err)
{
    if (n <= m->cap_steps)
        return 0;
    int32_t *ids = realloc(m->ids, (size_t)n * sizeof *ids);
    if (ids)
        m->ids = ids;
    struct kv_run *runs = realloc(m->runs, (size_t)n * sizeof *runs);
    if (runs)
        m->runs = runs;
    tp_batch_token *toks = realloc(m->seq_tokens, (size_t)n * sizeof *toks);
    if (toks)
        m->seq_tokens = toks;
    if (!ids || !runs || !toks)
        return tp_errorf(err, "out of memory for a step of %d tokens", n);
    m->cap_steps = n;
    return 0;
}

/* The cpu activations of n tokens. */
static int ensure_buffers(tp_model *m, int n, tp_err *err)
{
    if (n <= m->cap_n)
        return 0;
    const tp_model_config *c = &m->cfg;
    size_t H = (size_t)c->hidden, qd = (size_t)m->lq * c->head_dim,
           kd = (size_t)m->lkv * c->head_dim, inter = (size_t)m->li, half = (size_t)c->head_dim / 2;
    struct { float **p; size_t per_row; } bufs[] = {
        { &m->x, H }, { &m->h, H }, { &m->q, qd }, { &m->k, kd }, { &m->v, kd },
        { &m->att, qd }, { &m->o, H }, { &m->gate, inter }, { &m->up, inter },
        { &m->run_cos, half }, { &m->run_sin, half }, { &m->lm_in, H },
    };
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        /* 64-byte aligned, so that every row (a multiple of 16 floats in the
         * usual shapes) starts a cache line: the GEMM tiles' 64-byte loads of
         * unaligned rows each touched two lines (a 128-token GEMM ran 15-20%
         * slower).  Contents are not kept: a step writes them before it reads.
         * (A model without dense MLPs has inter 0: keep a valid pointer.) */
        size_t bytes = ((size_t)n * bufs[i].per_row + 1) * sizeof(float);
        free(*bufs[i].p);
        *bufs[i].p = aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (!*bufs[i].p) {
            m->cap_n = 0;
            return tp_errorf(err, "out of memory for %d tokens of activations", n);
        }
    }
    m->cap_n = n;
    return 0;
}

/* logit_slot / logit_all for rows rows of logits (world > 1). */
static int ensure_logit_rows(tp_model *m, int rows, tp_err *err)
{
    if (rows <= m->cap_logit_rows)
        return 0;
    size_t per = (size_t)rows * (size_t)m->vocab_slot;
    float *slot = realloc(m->logit_slot, per * sizeof *slot);
    if (slot)
        m->logit_slot = slot;
    float *all = realloc(m->logit_all, per * (size_t)m->world * sizeof *all);
    if (all)
        m->logit_all = all;
    if (!slot || !all)
        return tp_errorf(err, "out of memory for %d rows of logits", rows);
    m->cap_logit_rows = rows;
    return 0;
}

/* y[n][rows] = x[n][cols] . W^T, W in its stored dtype where it lies. */
static void matmul(float *y, const float *x, int n, tp_mat w, int rows, int cols, tp_pool *pool)
{
    tpg_job j = tp_mat_job(y, x, n, w, rows, cols);
    tpg_matmul_batch(&j, 1, pool);
}

/* Where slot's cache of layer l, local kv head h starts: [max_seq][head_dim]. */
static size_t kv_offset(const tp_model *m, int slot, int l, int h)
{
    return (((size_t)slot * (size_t)m->cfg.n_layers + (size_t)l) * (size_t)m->lkv + (size_t)h) *
           (size_t)m->max_seq * (size_t)m->cfg.head_dim;
}

/* Attention of every local head over the KV caches, one pool job per KV
 * head: its query heads run through the step's runs, each over its own
 * slot's cache; a run's two products run in single-threaded OpenBLAS sgemm
 * (on the fp32 cache it still beats a hand-written loop), its softmax rows
 * between them, in the query head's own slice of scratch.  A run of one
 * token (a decode step) takes the KV head's query heads together: one
 * read of the cache and one pair of sgemms for the group. */
typedef struct attn_ctx {
    tp_model *m;
    int l;
} attn_ctx;

static float *head_scores(tp_model *m, int h)
{
    return m->scratch + (size_t)h * TPK_ATT_BLOCK * m->max_seq;
}

static void attn_kv_head_job(size_t i, void *arg)
{
    attn_ctx *a = arg;
    tp_model *m = a->m;
    int g = (int)i, hd = m->cfg.head_dim, h0 = g * m->group, window = m->layers[a->l].window;
    size_t qd = (size_t)m->lq * hd;
    float scale = 1.0f / sqrtf((float)hd);
    for (int ri = 0; ri < m->n_runs; ri++) {
        const struct kv_run *r = &m->runs[ri];
        size_t kv_off = kv_offset(m, r->slot, a->l, g);
        const float *kc = m->kcache + kv_off, *vc = m->vcache + kv_off;
        size_t row = (size_t)r->start * qd + (size_t)h0 * hd;
        if (r->n == 1 && m->group > 1 && m->group <= TPK_ATT_BLOCK) {
            tpk_attention_group_one(m->att + row, m->q + row, m->group, kc, vc, r->pos0, hd, window,
                                    scale, head_scores(m, h0));
            continue;
        }
        for (int h = h0; h < h0 + m->group; h++, row += (size_t)hd)
            tpk_attention_head_blocked(m->att + row, qd, m->q + row, qd, kc, vc, r->n, r->pos0, hd,
                                       window, scale, head_scores(m, h));
    }
}

static void attention(tp_model *m, int l)
{
    attn_ctx a = { m, l };
    par_for(m, (size_t)m->lkv, attn_kv_head_job, &a);
}

/* Each run's k and v into its slot's cache at its positions. */
static void store_kv(tp_model *m, int l)
{
    int hd = m->cfg.head_dim;
    size_t row = (size_t)hd * sizeof(float);
    for (int ri = 0; ri < m->n_runs; ri++) {
        const struct kv_run *r = &m->runs[ri];
        for (int h = 0; h < m->lkv; h++) {
            size_t off = kv_offset(m, r->slot, l, h) + (size_t)r->pos0 * hd;
            for (int t = 0; t < r->n; t++) {
                size_t src = ((size_t)(r->start + t) * m->lkv + h) * hd;
                memcpy(m->kcache + off + (size_t)t * hd, m->k + src, row);
                memcpy(m->vcache + off + (size_t)t * hd, m->v + src, row);
            }
        }
    }
}

/* RoPE of t->dim heads of tokens [r0, r1), each in its run's positions. */
static void rope_rows(const rows_task *t, int r0, int r1)
{
    tp_model *m = t->m;
    int hd = m->cfg.head_dim;
    size_t stride = (size_t)t->dim * hd;
    for (int ri = 0; ri < m->n_runs; ri++) {
        const struct kv_run *r = &m->runs[ri];
        int a = r->start > r0 ? r->start : r0, b = r->start + r->n < r1 ? r->start + r->n : r1;
        if (a < b)
            tpk_rope(t->x + (size_t)a * stride, b - a, t->dim, hd, stride, a - r->start, r->cos,
                     r->sin);
    }
}

/* RoPE of n_heads heads of the step's n tokens, each run with its own rows. */
static void rope_runs(tp_model *m, float *x, int n, int n_heads)
{
    rows_task t = { .fn = rope_rows, .rows = n, .x = x, .dim = n_heads, .m = m };
    par_rows(m, &t);
}

static int attention_block(tp_model *m, int l, int n, tp_err *err)
{
    const tp_model_config *c = &m->cfg;
    const tp_layer_weights *L = &m->layers[l];
    int H = c->hidden, hd = c->head_dim, qd = m->lq * hd, kd = m->lkv * hd;

    /* q, k and v share their input: one parallel section */
    tpg_job qkv[3] = { tp_mat_job(m->q, m->h, n, L->wq, qd, H), tp_mat_job(m->k, m->h, n, L->wk, kd, H),
                       tp_mat_job(m->v, m->h, n, L->wv, kd, H) };
    tpg_matmul_batch(qkv, 3, m->pool);
    if (L->bq)
        tpk_add_bias(m->q, L->bq, n, qd);
    if (L->bk)
        tpk_add_bias(m->k, L->bk, n, kd);
    if (L->bv)
        tpk_add_bias(m->v, L->bv, n, kd);
    if (c->qk_norm) {
        rows_task tq = { .fn = head_norm_rows, .rows = n * m->lq, .x = m->q, .w = L->q_norm,
                         .dim = hd, .eps = c->rms_eps };
        rows_task tk = { .fn = head_norm_rows, .rows = n * m->lkv, .x = m->k, .w = L->k_norm,
                         .dim = hd, .eps = c->rms_eps };
        par_rows(m, &tq);
        par_rows(m, &tk);
    }
    rope_runs(m, m->q, n, m->lq);
    rope_runs(m, m->k, n, m->lkv);
    store_kv(m, l);
    attention(m, l);
    /* partial o = att . Wo_local^T; the bias once, after the sum */
    matmul(m->o, m->att, n, L->wo, H, qd, m->pool);
    if (allreduce(m, m->o, (size_t)n * H, err) < 0)
        return tp_err_prefix(err, "layer %d attention all-reduce", l);
    if (L->bo)
        tpk_add_bias(m->o, L->bo, n, H);
    return 0;
}

/* A sparse layer's MLP: this rank's experts' partial sum, then the same
 * all-reduce as the dense MLP's rowwise down_proj. */
static int moe_block(tp_model *m, int l, int n, tp_err *err)
{
    int H = m->cfg.hidden;
    if (tp_moe_forward(m->layers[l].moe, m->h, n, H, m->o, &m->moe_scratch, m->pool, err) < 0)
        return tp_err_prefix(err, "layer %d", l);
    if (allreduce(m, m->o, (size_t)n * H, err) < 0)
        return tp_err_prefix(err, "layer %d moe all-reduce", l);
    return 0;
}

static int mlp_block(tp_model *m, int l, int n, tp_err *err)
{
    const tp_layer_weights *L = &m->layers[l];
    int H = m->cfg.hidden;
    if (L->moe)
        return moe_block(m, l, n, err);
    tpg_job gate_up[2] = { tp_mat_job(m->gate, m->h, n, L->wgate, m->li, H),
                           tp_mat_job(m->up, m->h, n, L->wup, m->li, H) };
    tpg_matmul_batch(gate_up, 2, m->pool);
    if (L->bgate)
        tpk_add_bias(m->gate, L->bgate, n, m->li);
    if (L->bup)
        tpk_add_bias(m->up, L->bup, n, m->li);
    rows_task silu = { .fn = silu_rows, .rows = n, .x = m->gate, .in = m->up, .dim = m->li };
    par_rows(m, &silu);
    matmul(m->o, m->gate, n, L->wdown, H, m->li, m->pool);
    if (allreduce(m, m->o, (size_t)n * H, err) < 0)
        return tp_err_prefix(err, "layer %d mlp all-reduce", l);
    if (L->bdown)
        tpk_add_bias(m->o, L->bdown, n, H);
    return 0;
}

/* The step's token rows of the embedding into m->x (zeros for ids outside
 * [emb_start, emb_end): vocab parallel, the all-reduce fills them in).  A
 * float table is widened (tpk_embedding_rows); an 8-bit one, a tied
 * lm_head's table, is dequantized by tpg_weight, the definition the
 * lm_head's products are checked against, so the lookup reads each value
 * exactly as the logits do (its scale found through the slice's block
 * origin, which a vocabulary slice may start inside). */
static void embedding_lookup(tp_model *m, int n)
{
    int H = m->cfg.hidden;
    if (m->embed.dtype != TP_F8_E4M3 && m->embed.dtype != TP_I8) {
        tpk_embedding_rows(m->x, m->embed.data, m->embed.dtype, m->ids, n, H, m->emb_start,
                           m->emb_end);
        return;
    }
    tpg_job table = tp_mat_job(NULL, NULL, 0, m->embed, (int)(m->emb_end - m->emb_start), H);
    for (int t = 0; t < n; t++) {
        float *dst = m->x + (size_t)t * H;
        int64_t id = m->ids[t];
        bool mine = id >= m->emb_start && id < m->emb_end;
        for (int c = 0; c < H; c++)
            dst[c] = mine ? tpg_weight(&table, (int)(id - m->emb_start), c) : 0.0f;
    }
}

/* Logits of rows normalised rows in[rows][hidden] into logits[rows][vocab]:
 * the local slice of each (one product over all rows), padded to
 * vocab_slot, all-gathered, then each rank's slice put at its vocabulary
 * rows. */
static int lm_head(tp_model *m, const float *in, int rows, float *logits, tp_err *err)
{
    int H = m->cfg.hidden, cnt = (int)(m->lm_end - m->lm_start);
    size_t V = (size_t)m->cfg.vocab, slot = (size_t)m->vocab_slot;
    if (m->world == 1) {   /* the one slice is the whole vocabulary */
        matmul(logits, in, rows, m->lm_w, cnt, H, m->pool);
        return 0;
    }
    if (ensure_logit_rows(m, rows, err) < 0)
        return -1;
    /* [rows][cnt] dense, then zeros up to rows * vocab_slot */
    if (cnt > 0)
        matmul(m->logit_slot, in, rows, m->lm_w, cnt, H, m->pool);
    for (size_t i = (size_t)rows * (size_t)cnt; i < (size_t)rows * slot; i++)
        m->logit_slot[i] = 0.0f;
    if (m->comm->ops->allgather_f32(m->comm, m->logit_slot, m->logit_all, (size_t)rows * slot, err) < 0)
        return tp_err_prefix(err, "logits all-gather");
    for (int r = 0; r < m->world; r++) {
        int64_t s = m->lm_ranges[2 * r], e = m->lm_ranges[2 * r + 1];
        const float *part = m->logit_all + (size_t)r * rows * slot;
        for (int k = 0; k < rows; k++)
            memcpy(logits + (size_t)k * V + s, part + (size_t)k * (size_t)(e - s),
                   (size_t)(e - s) * sizeof(float));
    }
    return 0;
}

/* The final norm of the tokens that want logits (their rows gathered into
 * lm_in), then one lm_head over them. */
static int batch_logits(tp_model *m, const tp_batch_token *t, int n, float *logits, tp_err *err)
{
    const tp_model_config *c = &m->cfg;
    size_t H = (size_t)c->hidden;
    int rows = 0;
    for (int i = 0; i < n; i++)
        if (t[i].logits)
            tpk_add_rmsnorm(m->x + (size_t)i * H, m->o + (size_t)i * H, m->lm_in + (size_t)rows++ * H,
                            m->final_norm, 1, c->hidden, c->rms_eps);
    return rows ? lm_head(m, m->lm_in, rows, logits, err) : 0;
}

static int check_forward(const tp_model *m, const int32_t *ids, int n, tp_err *err)
{
    const tp_model_config *c = &m->cfg;
    int pos = m->slot_len[0];
    if (n <= 0)
        return tp_errorf(err, "forward: %d tokens", n);
    if (n > m->max_seq - pos)
        return tp_errorf(err, "forward: %d tokens at position %d exceed the KV cache of %d "
                         "positions (--max-seq)", n, pos, m->max_seq);
    for (int t = 0; t < n; t++)
        if (ids[t] < 0 || ids[t] >= c->vocab)
            return tp_errorf(err, "forward: token id %d is outside the vocabulary [0, %d)",
                             ids[t], c->vocab);
    return 0;
}

/* Every token of a step, before anything changes: its slot, its id and its
 * position (the slot's length, then one more for each of the slot's earlier
 * tokens in the step).  On return slot_next holds each slot's length after
 * the step. */
static int check_batch(tp_model *m, const tp_batch_token *t, int n, tp_err *err)
{
    if (n <= 0)
        return tp_errorf(err, "forward: %d tokens", n);
    memcpy(m->slot_next, m->slot_len, (size_t)m->slots * sizeof *m->slot_next);
    for (int i = 0; i < n; i++) {
        int s = t[i].slot;
        if (s < 0 || s >= m->slots)
            return tp_errorf(err, "batch token %d: slot %d is outside [0, %d) (--max-batch)", i, s, m->slots);
        if (t[i].id < 0 || t[i].id >= m->cfg.vocab)
            return tp_errorf(err, "batch token %d (slot %d, position %d): token id %d is outside the "
                             "vocabulary [0, %d)", i, s, t[i].pos, t[i].id, m->cfg.vocab);
        if (t[i].pos != m->slot_next[s])
            return tp_errorf(err, "batch token %d: slot %d's next position is %d, the token says %d", i, s,
                             m->slot_next[s], t[i].pos);
        if (t[i].pos >= m->max_seq)
            return tp_errorf(err, "batch token %d: slot %d position %d is past the KV cache of %d "
                             "positions (--max-seq)", i, s, t[i].pos, m->max_seq);
        m->slot_next[s]++;
    }
    return 0;
}

/* The step's runs (maximal spans of one slot's consecutive tokens) and
 * their RoPE rows: the shared table's, or for dynamic / longrope rows with
 * the frequencies of the length the slot reaches in this step (slot_next,
 * from check_batch), as one sequence's pass has in transformers. */
static void plan_runs(tp_model *m, const tp_batch_token *t, int n)
{
    const tp_model_config *c = &m->cfg;
    size_t half = (size_t)c->head_dim / 2;
    m->n_runs = 0;
    for (int i = 0; i < n; i++) {
        struct kv_run *r = m->n_runs ? &m->runs[m->n_runs - 1] : NULL;
        if (r && r->slot == t[i].slot && r->pos0 + r->n == t[i].pos)
            r->n++;
        else
            m->runs[m->n_runs++] = (struct kv_run){ .start = i, .n = 1, .slot = t[i].slot, .pos0 = t[i].pos };
    }
    bool per_pass = tpk_rope_per_pass(&c->rope);
    for (int ri = 0; ri < m->n_runs; ri++) {
        struct kv_run *r = &m->runs[ri];
        if (!per_pass) {
            r->cos = m->cos_t + (size_t)r->pos0 * half;
            r->sin = m->sin_t + (size_t)r->pos0 * half;
            continue;
        }
        float *rc = m->run_cos + (size_t)r->start * half, *rs = m->run_sin + (size_t)r->start * half;
        tpk_rope_rows_at(rc, rs, m->rope_inv, c->head_dim, &c->rope, m->slot_next[r->slot], r->pos0, r->n);
        r->cos = rc;
        r->sin = rs;
    }
}

#ifdef TP_HAVE_CUDA
/* One sequence in slot 0 that wants at most its last token's logits
 * (tp_model_forward) takes the device's single-sequence pass (its prefill
 * kernels); any other step the device's batched one. */
static int forward_device(tp_model *m, const tp_batch_token *t, int n, float *logits, tp_err *err)
{
    bool one_seq = true;
    for (int i = 0; i < n && one_seq; i++)
        one_seq = t[i].slot == 0 && (!t[i].logits || i == n - 1);
    int rc;
    if (one_seq) {
        for (int i = 0; i < n; i++)
            m->ids[i] = t[i].id;
        rc = tpcm_forward(m->gpu, m->ids, n, m->slot_len[0], t[n - 1].logits ? logits : NULL, err);
    } else {
        rc = tpcm_forward_batch(m->gpu, t, n, m->slot_next, logits, err);
    }
    if (rc < 0)
        return -1;
    memcpy(m->slot_len, m->slot_next, (size_t)m->slots * sizeof *m->slot_len);
    return 0;
}
#endif

int tp_model_forward_batch(tp_model *m, const tp_batch_token *t, int n, float *logits, tp_err *err)
{
    const tp_model_config *c = &m->cfg;
    if (check_batch(m, t, n, err) < 0 || ensure_step_buffers(m, n, err) < 0)
        return -1;
#ifdef TP_HAVE_CUDA
    if (m->gpu)
        return forward_device(m, t, n, logits, err);
#endif
    if (ensure_buffers(m, n, err) < 0)
        return -1;
    int H = c->hidden;
    plan_runs(m, t, n);
    for (int i = 0; i < n; i++)
        m->ids[i] = t[i].id;

    embedding_lookup(m, n);
    if (!(m->emb_start == 0 && m->emb_end == c->vocab) &&
        allreduce(m, m->x, (size_t)n * H, err) < 0)
        return tp_err_prefix(err, "embedding all-reduce");

    for (int l = 0; l < c->n_layers; l++) {
        /* residual += previous block's output, fused with this block's norm */
        add_rmsnorm_par(m, m->x, l ? m->o : NULL, m->h, m->layers[l].attn_norm, n, H, c->rms_eps);
        if (attention_block(m, l, n, err) < 0)
            return -1;
        add_rmsnorm_par(m, m->x, m->o, m->h, m->layers[l].ffn_norm, n, H, c->rms_eps);
        if (mlp_block(m, l, n, err) < 0)
            return -1;
    }
    memcpy(m->slot_len, m->slot_next, (size_t)m->slots * sizeof *m->slot_len);
    return logits ? batch_logits(m, t, n, logits, err) : 0;
}

/* One sequence: ids at slot 0's next positions, the last one's logits. */
int tp_model_forward(tp_model *m, const int32_t *ids, int n, float *logits, tp_err *err)
{
    if (check_forward(m, ids, n, err) < 0 || ensure_step_buffers(m, n, err) < 0)
        return -1;
    for (int i = 0; i < n; i++)
        m->seq_tokens[i] = (tp_batch_token){ .slot = 0, .id = ids[i], .pos = m->slot_len[0] + i,
                                             .logits = logits && i == n - 1 };
    return tp_model_forward_batch(m, m->seq_tokens, n, logits, err);
}

/* ------------------------------------------------------------ token pick */

static float *pick_buffer(tp_model *m, tp_err *err)
{
    if (!m->pick_buf && !(m->pick_buf = malloc((size_t)m->cfg.vocab * 4 * sizeof(float))))
        tp_errorf(err, "out of memory for the logits of %d tokens", m->cfg.vocab);
    return m->pick_buf;
}

int tp_model_pick(tp_model *m, const float *logits, const tp_sampler_opts *o, tp_rng *rng, int32_t *next,
                  tp_err *err)
{
    float *buf = pick_buffer(m, err);
    if (!buf)
        return -1;
    size_t V = (size_t)m->cfg.vocab;
    if (tp_repetition_penalty_on(o)) {
        /* on a copy: the caller's logits (--logits) stay the model's own */
        tp_repetition_penalty(logits, buf + V, m->cfg.vocab, o->seen, o->n_seen, o->repetition_penalty);
        logits = buf + V;
    }
    int32_t tok = tp_sample(logits, m->cfg.vocab, o, rng, buf + 2 * V);
    /* Every rank drew from the same logits with the same rng; rank 0's draw
     * is the one everybody uses, whatever rounding might do. */
    if (m->world > 1 && m->comm->ops->broadcast(m->comm, &tok, sizeof tok, 0, err) < 0)
        return tp_err_prefix(err, "token broadcast");
    *next = tok;
    return 0;
}

int tp_model_forward_pick(tp_model *m, const int32_t *ids, int n, const tp_sampler_opts *o, tp_rng *rng,
                          int32_t *next, tp_err *err)
{
#ifdef TP_HAVE_CUDA
    /* With a repetition penalty the logits come to the host (tp_model_forward
     * below) and tp_model_pick penalises and picks there: the device pick
     * has no penalty. */
    if (m->gpu && !tp_repetition_penalty_on(o)) {
        if (check_forward(m, ids, n, err) < 0)
            return -1;
        double u = tp_sampler_is_greedy(o) ? 0.0 : tp_rng_uniform(rng);   /* tp_sample's one draw */
        if (tpcm_forward_pick(m->gpu, ids, n, m->slot_len[0], o, u, next, err) < 0)
            return -1;
        m->slot_len[0] += n;
        return 0;
    }
#endif
    float *logits = pick_buffer(m, err);
    if (!logits || tp_model_forward(m, ids, n, logits, err) < 0)
        return -1;
    return tp_model_pick(m, logits, o, rng, next, err);
}
