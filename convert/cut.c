/* cut.c - the sizes of a model from config.json, and how one tensor is cut
 * for every rank.
 *
 * How each style shards weight and bias follows transformers 5.24.0
 * distributed/tensor_parallel.py:
 *   ColwiseParallel.shard_param: Shard(ndim - 2), i.e. dim 0 of a Linear
 *     weight [out, in] and dim 0 (Shard(-1)) of its 1-D bias;
 *   RowwiseParallel.shard_param: "bias is replicated (added after the
 *     row-reduce); weight shards on input dim (-1)" -> we store the bias
 *     whole on every rank with reduce_bias = true; the runtime adds it once
 *     after the all-reduce (the forward hides it during the local matmul);
 *   PackedColwiseParallel: _StridedShard(dim=ndim-2, split_factor=2): the
 *     dim holds 2 blocks, rank r gets its slice of each.  transformers cuts a
 *     1-D parameter of a packed layer with a plain Shard(-1); we cut a packed
 *     bias like its weight rows instead, so that the bias entries a rank
 *     holds belong to the output rows it computes;
 *   PackedRowwiseParallel: _StridedShard(dim=-1, split_factor=2) for the
 *     weight, Replicate() for a 1-D bias;
 *   EmbeddingParallel(shard_dim=0) ("embedding_rowwise", our "vocab"):
 *     Shard(0), the vocabulary rows.
 * DTensor's Shard splits like torch.chunk: ceil(n / tp) per rank, the last
 * ranks shorter.  We allow that only for vocabulary rows; heads and the
 * intermediate size must divide.  Key/value heads fewer than the ranks are
 * replicated (rank r gets kv head r / (tp / kv)): transformers cannot do this
 * (get_kv_heads_per_rank returns None), the runtime can.
 */
#include "convert.h"

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------- model sizes */

int tp_model_info_parse(const char *json, size_t len, const char *path, tp_model_info *mi,
                        tp_err *err)
{
    memset(mi, 0, sizeof *mi);
    if (tp_config_parse(&mi->cfg, json, len, path, err) < 0)
        return -1;
    const tp_model_config *c = &mi->cfg;
    snprintf(mi->model_type, sizeof mi->model_type, "%s", c->model_type);
    mi->hidden = c->hidden;
    mi->n_heads = c->n_heads;
    mi->n_kv_heads = c->n_kv_heads;
    mi->head_dim = c->head_dim;
    mi->intermediate = c->intermediate;
    mi->vocab = c->vocab;
    mi->n_layers = c->n_layers;
    mi->tie_word_embeddings = c->tie_embeddings;
    return 0;
}

/* ----------------------------------------------------------- tensor roles */

/* What a tensor is, from its name, for the shape checks and the head rules. */
typedef enum role {
    R_OTHER = 0,
    R_EMBED, R_LM_HEAD, R_NORM, R_HEAD_NORM,
    R_Q, R_KV, R_O, R_GATE_UP_ONE, R_GATE_UP_FUSED, R_DOWN,
    /* experts (convert/arch.c names them and checks their shapes) */
    R_ROUTER, R_EXPERT_GATE_UP, R_EXPERT_DOWN, R_EXPERTS_GATE_UP, R_EXPERTS_DOWN,
} role;

typedef struct tensor_role {
    role r;
    bool is_bias;
    long layer;       /* -1 when not in a layer */
    long expert;      /* a per-expert tensor's expert, else -1 */
} tensor_role;

static bool ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && !strcmp(s + a - b, suffix);
}

static tensor_role classify(const char *name)
{
    tensor_role tr = {R_OTHER, false, -1, -1};
    switch (tp_arch_expert_part(name, &tr.layer, &tr.expert)) {
    case TP_EXPERT_NONE: tr.layer = -1; tr.expert = -1; break;
    case TP_EXPERT_ROUTER: tr.r = R_ROUTER; return tr;
    case TP_EXPERT_GATE: case TP_EXPERT_UP: tr.r = R_EXPERT_GATE_UP; return tr;
    case TP_EXPERT_DOWN: tr.r = R_EXPERT_DOWN; return tr;
    case TP_EXPERT_FUSED_GATE_UP: tr.r = R_EXPERTS_GATE_UP; return tr;
    case TP_EXPERT_FUSED_DOWN: tr.r = R_EXPERTS_DOWN; return tr;
    }
    if (!strcmp(name, "model.embed_tokens.weight")) {
        tr.r = R_EMBED;
        return tr;
    }
    if (!strcmp(name, "lm_head.weight")) {
        tr.r = R_LM_HEAD;
        return tr;
    }
    if (!strcmp(name, "model.norm.weight")) {
        tr.r = R_NORM;
        return tr;
    }
    const char *pre = "model.layers.";
    if (strncmp(name, pre, strlen(pre)))
        return tr;
    const char *s = name + strlen(pre);
    char *end;
    long l = strtol(s, &end, 10);
    if (end == s || *end != '.')
        return tr;
    const char *rest = end + 1;
    static const struct {
        const char *module;
        role r;
    } mods[] = {
        {"self_attn.q_proj", R_Q}, {"self_attn.k_proj", R_KV}, {"self_attn.v_proj", R_KV},
        {"self_attn.o_proj", R_O}, {"mlp.gate_proj", R_GATE_UP_ONE}, {"mlp.up_proj", R_GATE_UP_ONE},
        {"mlp.gate_up_proj", R_GATE_UP_FUSED}, {"mlp.down_proj", R_DOWN},
        {"input_layernorm", R_NORM}, {"post_attention_layernorm", R_NORM},
        {"self_attn.q_norm", R_HEAD_NORM}, {"self_attn.k_norm", R_HEAD_NORM},
    };
    for (size_t i = 0; i < sizeof mods / sizeof mods[0]; i++) {
        size_t n = strlen(mods[i].module);
        if (strncmp(rest, mods[i].module, n) || rest[n] != '.')
            continue;
        const char *param = rest + n + 1;
        if (strcmp(param, "weight") && strcmp(param, "bias"))
            continue;
        tr.r = mods[i].r;
        tr.is_bias = !strcmp(param, "bias");
        tr.layer = l;
        return tr;
    }
    return tr;
}

static int want_shape(const char *name, int ndim, const uint64_t *shape, int want_ndim, int64_t d0,
                      int64_t d1, const char *why, tp_err *err)
{
    bool ok = ndim == want_ndim && (int64_t)shape[0] == d0 && (want_ndim < 2 || (int64_t)shape[1] == d1);
    if (ok)
        return 0;
    char got[160] = "[", tmp[32];
    for (int i = 0; i < ndim; i++) {
        snprintf(tmp, sizeof tmp, "%s%" PRIu64, i ? ", " : "", shape[i]);
        strncat(got, tmp, sizeof got - strlen(got) - 2);
    }
    strcat(got, "]");
    if (want_ndim == 1)
        return tp_errorf(err, "tensor %s: shape %s, config.json says [%" PRId64 "] (%s)", name, got,
                         d0, why);
    return tp_errorf(err, "tensor %s: shape %s, config.json says [%" PRId64 ", %" PRId64 "] (%s)",
                     name, got, d0, d1, why);
}

/* The shape a tensor of a known role must have. */
static int check_shape(const tp_model_info *mi, const char *name, const tensor_role *tr, int ndim,
                       const uint64_t *shape, tp_err *err)
{
    /* mi may come from anywhere (tests build it by hand): the products are
     * checked, not trusted to tp_model_info_parse's bounds. */
    size_t q_sz, kv_sz, i2_sz;
    if (mi->hidden < 0 || mi->n_heads < 0 || mi->n_kv_heads < 0 || mi->head_dim < 0 ||
        mi->intermediate < 0 || mi->vocab < 0 ||
        !tp_mul_size((size_t)mi->n_heads, (size_t)mi->head_dim, &q_sz) || q_sz > INT64_MAX ||
        !tp_mul_size((size_t)mi->n_kv_heads, (size_t)mi->head_dim, &kv_sz) || kv_sz > INT64_MAX ||
        !tp_mul_size(2, (size_t)mi->intermediate, &i2_sz) || i2_sz > INT64_MAX)
        return tp_errorf(err, "tensor %s: the model sizes overflow", name);
    const int64_t H = mi->hidden, q = (int64_t)q_sz, kv = (int64_t)kv_sz;
    const int64_t I = mi->intermediate, V = mi->vocab;
    if (tr->layer >= mi->n_layers)
        return tp_errorf(err, "tensor %s: layer %ld, but num_hidden_layers is %" PRId64, name,
                         tr->layer, mi->n_layers);
    switch (tr->r) {
    case R_EMBED:
    case R_LM_HEAD:
        return want_shape(name, ndim, shape, 2, V, H, "vocab_size, hidden_size", err);
    case R_NORM:
        return want_shape(name, ndim, shape, 1, H, 0, "hidden_size", err);
    case R_HEAD_NORM:
        return want_shape(name, ndim, shape, 1, mi->head_dim, 0, "head_dim", err);
    case R_Q:
        return tr->is_bias ? want_shape(name, ndim, shape, 1, q, 0, "num_attention_heads * head_dim", err)
                           : want_shape(name, ndim, shape, 2, q, H,
                                        "num_attention_heads * head_dim, hidden_size", err);
    case R_KV:
        return tr->is_bias ? want_shape(name, ndim, shape, 1, kv, 0, "num_key_value_heads * head_dim", err)
                           : want_shape(name, ndim, shape, 2, kv, H,
                                        "num_key_value_heads * head_dim, hidden_size", err);
    case R_O:
        return tr->is_bias ? want_shape(name, ndim, shape, 1, H, 0, "hidden_size", err)
                           : want_shape(name, ndim, shape, 2, H, q,
                                        "hidden_size, num_attention_heads * head_dim", err);
    case R_GATE_UP_ONE:
        return tr->is_bias ? want_shape(name, ndim, shape, 1, I, 0, "intermediate_size", err)
                           : want_shape(name, ndim, shape, 2, I, H, "intermediate_size, hidden_size", err);
    case R_GATE_UP_FUSED:
        return tr->is_bias ? want_shape(name, ndim, shape, 1, (int64_t)i2_sz, 0, "2 * intermediate_size", err)
                           : want_shape(name, ndim, shape, 2, (int64_t)i2_sz, H,
                                        "2 * intermediate_size, hidden_size", err);
    case R_DOWN:
        return tr->is_bias ? want_shape(name, ndim, shape, 1, H, 0, "hidden_size", err)
                           : want_shape(name, ndim, shape, 2, H, I, "hidden_size, intermediate_size", err);
    case R_ROUTER:
    case R_EXPERT_GATE_UP:
    case R_EXPERT_DOWN:
    case R_EXPERTS_GATE_UP:
    case R_EXPERTS_DOWN:
        /* tp_arch_check_tensors checks these (with the layer's kind) */
    case R_OTHER:
        break;
    }
    return 0;
}

/* ------------------------------------------------------------ split math */

int tp_split_range(uint64_t size, int tp, int rank, bool uneven, uint64_t *start, uint64_t *end)
{
    if (tp < 1 || rank < 0 || rank >= tp)
        return -1;
    uint64_t per;
    if (uneven) {
        per = size / (uint64_t)tp + (size % (uint64_t)tp != 0); /* torch.chunk */
    } else {
        if (size % (uint64_t)tp)
            return -1;
        per = size / (uint64_t)tp;
    }
    uint64_t s = per * (uint64_t)rank, e = s + per;
    if (e > size)
        e = size;
    if (s >= e)
        return -1; /* this rank would hold nothing */
    *start = s;
    *end = e;
    return 0;
}

/* How a tensor's split dim is structured, for the divisibility rules. */
typedef enum unit_kind {
    U_PLAIN,      /* any even split */
    U_Q_HEADS,    /* num_attention_heads heads of head_dim */
    U_KV_HEADS,   /* num_key_value_heads heads of head_dim (may replicate) */
    U_INTER,      /* the intermediate size */
    U_MOE_INTER,  /* an expert's intermediate size */
    U_EXPERTS,    /* whole experts (--expert-parallel) */
    U_VOCAB,      /* vocabulary rows: uneven allowed */
} unit_kind;

static unit_kind split_unit(const tensor_role *tr, int dim)
{
    switch (tr->r) {
    case R_EMBED:
    case R_LM_HEAD:
        return dim == 0 ? U_VOCAB : U_PLAIN;
    case R_Q:
        return dim == 0 ? U_Q_HEADS : U_PLAIN;
    case R_KV:
        return dim == 0 ? U_KV_HEADS : U_PLAIN;
    case R_O:
        return dim == 1 ? U_Q_HEADS : U_PLAIN;
    case R_GATE_UP_ONE:
    case R_GATE_UP_FUSED:
        return dim == 0 ? U_INTER : U_PLAIN;
    case R_DOWN:
        return dim == 1 ? U_INTER : U_PLAIN;
    case R_EXPERT_GATE_UP:
        return dim == 0 ? U_MOE_INTER : U_PLAIN;
    case R_EXPERT_DOWN:
        return dim == 1 ? U_MOE_INTER : U_PLAIN;
    case R_EXPERTS_GATE_UP:
        return dim == 0 ? U_EXPERTS : dim == 1 ? U_MOE_INTER : U_PLAIN;
    case R_EXPERTS_DOWN:
        return dim == 0 ? U_EXPERTS : dim == 2 ? U_MOE_INTER : U_PLAIN;
    default:
        return U_PLAIN;
    }
}

/* The range of rank r along a dim of `size`, under the unit rules. */
static int unit_range(const tp_model_info *mi, const char *name, const char *style, unit_kind u,
                      uint64_t size, int tp, int r, uint64_t *s, uint64_t *e, tp_err *err)
{
    switch (u) {
    case U_Q_HEADS:
        if (mi->n_heads % tp)
            return tp_errorf(err, "num_attention_heads=%" PRId64 " cannot be split over tp=%d: "
                             "each rank needs whole attention heads (tensor %s, %s)",
                             mi->n_heads, tp, name, style);
        break;
    case U_KV_HEADS: {
        const int64_t kv = mi->n_kv_heads, d = mi->head_dim;
        if (kv % tp == 0)
            break;
        if (kv < tp && tp % kv == 0) {
            /* Replicated kv heads: the tp/kv ranks whose q heads share kv head
             * h all hold it.  Rank r's q heads [r*H/tp, (r+1)*H/tp) use kv
             * head (r*H/tp) / (H/kv) = r / (tp/kv). */
            int64_t h = r / (tp / kv);
            *s = (uint64_t)(h * d);
            *e = (uint64_t)((h + 1) * d);
            return 0;
        }
        return tp_errorf(err, "num_key_value_heads=%" PRId64 " cannot be split over tp=%d: "
                         "needs num_key_value_heads %% tp == 0, or fewer kv heads than ranks with "
                         "tp %% num_key_value_heads == 0 (tensor %s, %s)", kv, tp, name, style);
    }
    case U_INTER:
        if (mi->intermediate % tp)
            return tp_errorf(err, "intermediate_size=%" PRId64 " cannot be split over tp=%d "
                             "(tensor %s, %s)", mi->intermediate, tp, name, style);
        break;
    case U_MOE_INTER:
        if (mi->cfg.moe_intermediate % tp)
            return tp_errorf(err, "%s=%d cannot be split over tp=%d (tensor %s, %s; "
                             "--expert-parallel keeps experts whole)",
                             mi->cfg.arch == TP_ARCH_MIXTRAL ? "intermediate_size" :
                             "moe_intermediate_size", mi->cfg.moe_intermediate, tp, name, style);
        break;
    case U_EXPERTS: {
        int lo, hi;
        if (tp_expert_range(mi->cfg.n_experts, tp, r, &lo, &hi, err) < 0)
            return tp_err_prefix(err, "tensor %s", name);
        if ((uint64_t)mi->cfg.n_experts != size)
            return tp_errorf(err, "tensor %s: %" PRIu64 " experts, config.json says %d", name, size,
                             mi->cfg.n_experts);
        *s = (uint64_t)lo;
        *e = (uint64_t)hi;
        return 0;
    }
    case U_VOCAB:
        if (tp_split_range(size, tp, r, true, s, e) < 0)
            return tp_errorf(err, "tensor %s (%s): %" PRIu64 " vocabulary rows over tp=%d leave "
                             "rank %d with no rows", name, style, size, tp, r);
        return 0;
    case U_PLAIN:
        break;
    }
    if (tp_split_range(size, tp, r, false, s, e) < 0)
        return tp_errorf(err, "tensor %s (%s): dimension of size %" PRIu64 " cannot be split "
                         "evenly over tp=%d", name, style, size, tp);
    return 0;
}

void tp_cut_free(tp_cut *c)
{
    if (!c)
        return;
    free(c->name);
    free(c->splits);
    free(c->local_shapes);
    free(c->rank_bytes);
    free(c->owned_data);
    memset(c, 0, sizeof *c);
}

/* Which dim a style cuts and whether the tensor stays whole with
 * reduce_bias; returns dim or -1 (replicated). */
static int style_dim(tp_style style, const char *name, int ndim, bool *reduce_bias)
{
    bool is_bias = ends_with(name, ".bias");
    *reduce_bias = false;
    switch (style) {
    case TP_STYLE_REPLICATE:
        return -1;
    case TP_STYLE_COLWISE:
    case TP_STYLE_COLWISE_GATHER:
    case TP_STYLE_PACKED_COLWISE:
        return ndim >= 2 ? ndim - 2 : 0;      /* Shard(ndim - 2), 1-D: Shard(-1) */
    case TP_STYLE_ROWWISE:
    case TP_STYLE_ROWWISE_REP:
    case TP_STYLE_PACKED_ROWWISE:
        if (is_bias) {                        /* Replicate(), added after the reduce */
            *reduce_bias = true;
            return -1;
        }
        return ndim - 1;                      /* Shard(-1) */
    case TP_STYLE_VOCAB:
        return 0;                             /* Shard(0) */
    case TP_STYLE_EXPERT:                     /* whole experts: the expert dim of a */
        return ndim == 3 ? 0 : -1;            /* fused tensor, else whole on its owner */
    }
    return -1;
}

/* --expert-parallel on one tensor: a per-expert tensor lives whole on the
 * rank that owns its expert (*owner); a fused one is cut along its expert
 * dim (*owner -1). */
static int expert_owner(const tp_model_info *mi, const char *name, const tensor_role *tr, int tp,
                        int *owner, tp_err *err)
{
    *owner = -1;
    if (tr->r == R_EXPERTS_GATE_UP || tr->r == R_EXPERTS_DOWN)
        return 0;
    /* Another tensor under an expert module (a misnamed weight, a buffer)
     * stays whole on every rank: tp_arch_check_tensors names it for tprun. */
    if (tr->r != R_EXPERT_GATE_UP && tr->r != R_EXPERT_DOWN)
        return 0;
    int lo, hi;
    if (tp_expert_range(mi->cfg.n_experts, tp, 0, &lo, &hi, err) < 0)
        return tp_err_prefix(err, "tensor %s", name);
    if (tr->expert >= mi->cfg.n_experts)
        return tp_errorf(err, "tensor %s: expert %ld, but config.json says %d experts", name,
                         tr->expert, mi->cfg.n_experts);
    *owner = (int)(tr->expert / (hi - lo));
    return 0;
}

int tp_cut_make(tp_cut *c, const tp_model_info *mi, const char *name, tp_dtype dtype, int ndim,
                const uint64_t *shape, tp_style style, int tp, tp_err *err)
{
    memset(c, 0, sizeof *c);
    if (ndim < 1 || ndim > TP_MAX_DIMS)
        return tp_errorf(err, "tensor %s: %d dimensions are not supported", name, ndim);
    if (tp < 1)
        return tp_errorf(err, "tensor %s: tp=%d", name, tp);
    tensor_role tr = classify(name);
    if (check_shape(mi, name, &tr, ndim, shape, err) < 0)
        return -1;
    const char *sname = tp_style_name(style);
    bool reduce_bias;
    int dim = style_dim(style, name, ndim, &reduce_bias);
    if (style == TP_STYLE_VOCAB && ndim != 2)
        return tp_errorf(err, "tensor %s: style vocab needs a 2-D embedding, got %d dimensions",
                         name, ndim);
    c->name = strdup(name);
    c->splits = calloc((size_t)tp, sizeof *c->splits);
    c->local_shapes = calloc((size_t)tp * TP_MAX_DIMS, sizeof *c->local_shapes);
    c->rank_bytes = calloc((size_t)tp, sizeof *c->rank_bytes);
    if (!c->name || !c->splits || !c->local_shapes || !c->rank_bytes) {
        tp_cut_free(c);
        return tp_errorf(err, "out of memory");
    }
    c->owner = -1;
    if (style == TP_STYLE_EXPERT && expert_owner(mi, name, &tr, tp, &c->owner, err) < 0) {
        tp_cut_free(c);
        return -1;
    }
    c->style = style;
    c->plan_entry = -1;
    c->dim = dim;
    c->reduce_bias = reduce_bias;
    c->dtype = dtype;
    c->ndim = ndim;
    c->tp = tp;
    memcpy(c->global_shape, shape, sizeof(uint64_t) * (size_t)ndim);
    bool packed = style == TP_STYLE_PACKED_COLWISE || style == TP_STYLE_PACKED_ROWWISE;
    unit_kind u = dim >= 0 ? split_unit(&tr, dim) : U_PLAIN;
    if (packed && dim >= 0) {
        /* The dim is 2 blocks (gate, up); each block splits like the unit
         * would (the fused gate_up of intermediate_size each). */
        bool fused_gate_up = (u == U_INTER && tr.r == R_GATE_UP_FUSED) ||
                             (u == U_MOE_INTER && tr.r == R_EXPERTS_GATE_UP);
        if (!fused_gate_up && u != U_PLAIN) {
            tp_cut_free(c);
            return tp_errorf(err, "tensor %s: style %s on a dimension that is not packed", name, sname);
        }
        if (shape[dim] % 2) {
            tp_cut_free(c);
            return tp_errorf(err, "tensor %s (%s): dimension %d of size %" PRIu64 " is not 2 equal "
                             "blocks", name, sname, dim, shape[dim]);
        }
    }
    for (int r = 0; r < tp; r++) {
        tp_split *sp = &c->splits[r];
        uint64_t *ls = &c->local_shapes[(size_t)r * TP_MAX_DIMS];
        memcpy(ls, shape, sizeof(uint64_t) * (size_t)ndim);
        if (c->owner >= 0 && r != c->owner) {
            /* not in this rank's file: no shape, no bytes */
            memset(ls, 0, sizeof(uint64_t) * (size_t)ndim);
            sp->dim = -1;
            sp->n_ranges = 0;
            continue;
        } else if (dim < 0) {
            sp->dim = -1;
            sp->n_ranges = 0;
        } else if (packed) {
            uint64_t block = shape[dim] / 2, s, e;
            if (unit_range(mi, name, sname, u, block, tp, r, &s, &e, err) < 0) {
                tp_cut_free(c);
                return -1;
            }
            sp->dim = dim;
            sp->n_ranges = 2;
            for (int b = 0; b < 2; b++) {
                sp->start[b] = (uint64_t)b * block + s;
                sp->end[b] = (uint64_t)b * block + e;
            }
            ls[dim] = 2 * (e - s);
        } else {
            uint64_t s, e;
            if (unit_range(mi, name, sname, u, shape[dim], tp, r, &s, &e, err) < 0) {
                tp_cut_free(c);
                return -1;
            }
            sp->dim = dim;
            sp->n_ranges = 1;
            sp->start[0] = s;
            sp->end[0] = e;
            ls[dim] = e - s;
        }
        size_t nb;
        if (!tp_tensor_nbytes(dtype, ls, ndim, &nb)) {
            tp_cut_free(c);
            return tp_errorf(err, "tensor %s: size overflows", name);
        }
        c->rank_bytes[r] = nb;
    }
    return 0;
}
