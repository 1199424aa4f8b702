/* convert.h - a Hugging Face checkpoint (config.json + safetensors) and a
 * tensor-parallel plan -> one file per rank (tpshard or plain safetensors)
 * plus manifest.json.
 *
 * Three steps, so that tpconvert can stop after the second for --dry-run:
 *   1. the plan: pattern -> style, from --plan, else config.json's
 *      "base_model_tp_plan", else a built-in plan per model_type that
 *      reproduces transformers (plus the ForCausalLM "lm_head" entry);
 *   2. tp_conversion_prepare: every source tensor is matched against the plan
 *      and cut: for each rank the global ranges it holds (tp_split), its
 *      local shape and bytes; every check happens here, before a byte is
 *      written;
 *   3. tp_conversion_write: streams each tensor's rank slices straight from
 *      the mmapped source into the rank writers, then copies the configs and
 *      the tokenizer, then writes manifest.json last.  On any failure
 *      (ENOSPC, a cancel request, ...) everything written is removed.
 *
 * Weight layout is torch nn.Linear [out, in].  The cuts:
 *   colwise (and colwise_gather_output, the lm_head's): dim 0 of the weight
 *     and of the bias;
 *   rowwise: dim 1 of the weight; the bias is NOT split: every rank stores it
 *     whole with reduce_bias = true, and the runtime adds it once, after the
 *     all-reduce of the partial products;
 *   packed_colwise: dim 0 holds 2 equal blocks (fused gate_up); a rank holds
 *     its slice of each block (two ranges);
 *   vocab: the embedding split by vocabulary rows (tpconvert's default);
 *   replicate: whole on every rank (also everything the plan does not name).
 * Vocabulary rows (lm_head, vocab-parallel embedding) may split unevenly:
 * ceil(V / tp) rows per rank, the last rank shorter (torch.chunk, as DTensor
 * does).  Attention heads and the intermediate size must divide by tp.  Key /
 * value heads split when num_key_value_heads % tp == 0; with fewer kv heads
 * than ranks (tp % kv == 0) rank r holds kv head r / (tp / kv), so several
 * ranks record the same range.
 *
 * Same error convention as shardfmt.h: 0 / -1 and a tp_err.  Never prints.
 */
#ifndef TP_CONVERT_H
#define TP_CONVERT_H

#include "shardfmt.h"

#include <signal.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ styles */

/* The cuts tpconvert knows.  Each transformers style name (old and new) maps
 * to one of these; see tp_style_parse. */
typedef enum tp_style {
    TP_STYLE_REPLICATE = 0,        /* replicate, replicated_with_grad_allreduce, sequence_parallel */
    TP_STYLE_COLWISE,              /* colwise, local_colwise */
    TP_STYLE_COLWISE_GATHER,       /* colwise_gather_output, colwise_rep */
    TP_STYLE_ROWWISE,              /* rowwise, local_rowwise */
    TP_STYLE_ROWWISE_REP,          /* rowwise_rep, rowwise_split_input */
    TP_STYLE_PACKED_COLWISE,       /* packed_colwise */
    TP_STYLE_PACKED_ROWWISE,       /* packed_rowwise, local_packed_rowwise */
    TP_STYLE_VOCAB,                /* vocab, embedding_rowwise */
    TP_STYLE_EXPERT,               /* ours ("expert", --expert-parallel): whole experts per
                                      rank; a per-expert tensor lives on its owner rank only
                                      (tp_expert_range), a fused [n_experts, ...] tensor is
                                      cut along dim 0 */
} tp_style;

/* The canonical name recorded in the manifest and the rank files. */
const char *tp_style_name(tp_style s);
/* Accepts every alias above.  A style transformers knows but that has no
 * meaning here (MoE, MLA, embedding_colwise, ...) and a name nobody knows are
 * errors; key (the plan pattern, may be NULL) is named in the message. */
int tp_style_parse(const char *name, const char *key, tp_style *out, tp_err *err);

/* -------------------------------------------------------------------- plan */

/* Patterns are full tensor-module names: "model.layers.*.self_attn.q_proj",
 * "lm_head", "model.embed_tokens". */
typedef struct tp_plan {
    size_t n;
    char **patterns;
    tp_style *styles;
    char *source;        /* where it came from, for messages and --dry-run */
} tp_plan;

/* Supported model types: qwen3, qwen2, llama, mistral. */
bool tp_model_type_known(const char *model_type);
/* The built-in plan of a known model type, as transformers resolves it for
 * *ForCausalLM (base_model_tp_plan under "model." + lm_head). */
int tp_plan_builtin(const char *model_type, tp_plan *out, tp_err *err);
/* A JSON object pattern -> style.  base_prefixed: keys are relative to the
 * base model (config.json's base_model_tp_plan): "model." is prepended.
 * Otherwise (a --plan file) a key that starts with "model." or is "lm_head"
 * (or "lm_head.*") is taken as is, anything else gets "model.". */
int tp_plan_parse(const char *json, size_t len, const char *source, bool base_prefixed,
                  tp_plan *out, tp_err *err);
/* Adds or replaces one entry. */
int tp_plan_set(tp_plan *p, const char *pattern, tp_style style, tp_err *err);
/* The style for a tensor name, the way transformers' _get_parameter_plan
 * looks it up: the exact name, then its module (name minus the last part),
 * then the same two with layer numbers turned into "*".  Returns the entry
 * index, or -1 (not named: replicated). */
long tp_plan_match(const tp_plan *p, const char *tensor_name);
/* {"pattern": "style", ...}, malloc'd. */
char *tp_plan_to_json(const tp_plan *p);
void tp_plan_free(tp_plan *p);
/* transformers' replace_layer_number_by_wildcard: ".3." -> ".*.", ".3" at
 * the end -> ".*".  Writes into out (cap bytes); false when it does not fit. */
bool tp_wildcard_layers(const char *name, char *out, size_t cap);

/* The plan a conversion uses: plan_path's if given, else config.json's
 * base_model_tp_plan (plus the built-in lm_head entry), else the built-in
 * one.  An unknown model_type without plan_path is refused with a message
 * that says how to give a plan.  vocab_parallel adds "model.embed_tokens":
 * "vocab" unless the plan names the embedding already. */
int tp_plan_resolve(const char *config_json, size_t config_len, const char *plan_path,
                    bool vocab_parallel, tp_plan *out, tp_err *err);

/* ----------------------------------------------------------- model config */

/* The architectures tprun runs; TP_ARCH_OTHER: any other model_type (its
 * sizes are parsed so that a --plan can convert it for other runtimes). */
typedef enum tp_arch {
    TP_ARCH_QWEN3, TP_ARCH_QWEN2, TP_ARCH_LLAMA, TP_ARCH_MISTRAL, TP_ARCH_QWEN3_MOE, TP_ARCH_MIXTRAL,
    TP_ARCH_OTHER
} tp_arch;

/* mlp_only_layers entries kept (a longer list is refused, naming the key). */
#define TP_MAX_MLP_ONLY 256

/* The RoPE variants of transformers' modeling_rope_utils.py (5.24). */
typedef enum tp_rope_type {
    TP_ROPE_DEFAULT, TP_ROPE_LINEAR, TP_ROPE_DYNAMIC, TP_ROPE_YARN, TP_ROPE_LONGROPE, TP_ROPE_LLAMA3,
} tp_rope_type;

#define TP_ROPE_MAX_FACTORS 256   /* longrope lists: head_dim / 2 entries, head_dim <= 512 */

/* The rope settings of config.json with transformers' defaults resolved
 * (either spelling: rope_scaling + top-level rope_theta, or
 * rope_parameters).  Only the fields of `type` mean anything. */
typedef struct tp_rope_config {
    tp_rope_type type;
    double theta;
    double factor;                /* linear, dynamic, yarn, llama3; longrope: see attention_factor */
    double attention_factor;      /* cos and sin are multiplied by it: yarn and longrope (explicit,
                                     or derived as transformers derives it), 1 otherwise */
    int max_position;             /* dynamic: max_position_embeddings, where scaling starts */
    int original_max_position;    /* yarn, longrope, llama3 (top-level key wins, as in transformers) */
    double low_freq_factor, high_freq_factor;  /* llama3 */
    double beta_fast, beta_slow;  /* yarn (32 and 1 when absent or 0) */
    bool truncate;                /* yarn: floor/ceil the correction range (default true) */
    int n_factors;                /* longrope: head_dim / 2 */
    float short_factor[TP_ROPE_MAX_FACTORS], long_factor[TP_ROPE_MAX_FACTORS];
} tp_rope_config;

/* config.json as tpconvert and tprun both read it (convert/arch.c). */
typedef enum tp_quant { TP_QUANT_NONE = 0, TP_QUANT_FP8_BLOCK, TP_QUANT_INT8_ROW } tp_quant;

typedef struct tp_model_config {
    tp_arch arch;
    char model_type[64];
    int hidden, n_layers, n_heads, n_kv_heads, head_dim, intermediate, vocab;
    int max_position;
    float rms_eps;
    tp_rope_config rope;
    bool tie_embeddings;
    bool attention_bias;   /* q/k/v biases (qwen2 always) */
    bool o_bias, mlp_bias;
    int sliding_window;    /* 0: none (mistral may set one) */
    int sliding_from_layer;/* layers >= this use sliding_window (qwen2/qwen3
                              max_window_layers; 0 for mistral) */
    bool qk_norm;          /* qwen3, qwen3_moe: per-head rmsnorm of q and k before rope */
    /* Mixture of experts (qwen3_moe, mixtral; n_experts 0: every layer dense).
     * A sparse layer (tp_config_layer_sparse) replaces the MLP by a router
     * [n_experts, hidden] and n_experts SwiGLU experts of moe_intermediate
     * (mixtral: intermediate_size); a token's output is the sum over its top
     * n_experts_per_tok experts of softmax(router) weight x expert(x), the
     * weights renormalised to sum 1 when norm_topk_prob (mixtral: always). */
    int n_experts, n_experts_per_tok, moe_intermediate;
    bool norm_topk_prob;
    int decoder_sparse_step;                 /* qwen3_moe: every step-th layer is sparse */
    int n_mlp_only; int mlp_only[TP_MAX_MLP_ONLY]; /* qwen3_moe mlp_only_layers (< n_layers) */
    int bos_id;
    int n_eos; int eos_ids[8];
    /* config.json's quantization_config: how the linear weights are stored
     * (FORMAT.md, "Quantized weights").  TP_QUANT_FP8_BLOCK: F8_E4M3 with
     * weight_scale_inv per quant_block[0] x quant_block[1] block;
     * TP_QUANT_INT8_ROW: I8 with weight_scale per output row (quant_block
     * unused).  A linear layer kept in its float dtype (modules_to_not_convert,
     * the router, lm_head) is simply a float tensor without a scale. */
    tp_quant quant;
    int quant_block[2];
    /* quantization_config.modules_to_not_convert: n_quant_skip module names
     * (no ".weight"), NUL-separated in quant_skip; -1 when the key is absent
     * or null (transformers then keeps lm_head unquantized).  Ask
     * tp_config_module_quantized rather than reading these. */
    int n_quant_skip;
    char quant_skip[8192];
} tp_model_config;

/* The one config.json parser.  json: len bytes (a NUL byte is refused);
 * where names the file in messages, every error names the key.  Duplicate
 * keys at any depth: the last one wins, as in Python's json.  Sizes are
 * bounded (hidden_size <= 2^20, heads and head_dim <= 2^16, heads * head_dim
 * <= 2^24, intermediate_size <= 2^24, vocab_size < 2^24, layers <= 2^16), so
 * every product of two of them fits in 64 bits.  Defaults are transformers'
 * per model_type.  For the four architectures tprun runs, every setting the
 * runtime does not implement is refused here (a rope type other than
 * default, linear, dynamic, yarn, longrope and llama3, per-layer-type rope
 * parameters, partial_rotary_factor != 1, hidden_act other than silu, ...);
 * any other model_type gets arch TP_ARCH_OTHER and only its sizes. */
int tp_config_parse(tp_model_config *c, const char *json, size_t len, const char *where, tp_err *err);
/* The longest sequence the model may run: max_position_embeddings, except
 * with dynamic RoPE, whose scaling exists to run past it (then 1 << 30).
 * tprun's default KV length is the smaller of this and 4096. */
int tp_config_max_length(const tp_model_config *c);
/* Whether layer `layer` has experts, as transformers decides it:
 * (layer not in mlp_only_layers) and n_experts > 0 and
 * (layer + 1) % decoder_sparse_step == 0. */
bool tp_config_layer_sparse(const tp_model_config *c, int layer);
/* Whether config.json declares module (a tensor name less ".weight":
 * "model.layers.0.self_attn.q_proj", "lm_head") quantized: c->quant is set
 * and modules_to_not_convert does not name it, matched as transformers'
 * should_convert_module does (a listed name is a prefix of the module up to
 * a "." boundary, or a suffix of it); without the key, lm_head is not
 * quantized (transformers' default skip list).  Which modules may be
 * quantized at all is tp_arch_quantizable's business. */
bool tp_config_module_quantized(const tp_model_config *c, const char *module);
/* tprun's view: tp_config_parse of NUL-terminated text as "config.json",
 * refusing TP_ARCH_OTHER (naming model_type). */
int tp_model_config_parse(tp_model_config *c, const char *config_json, tp_err *err);

/* ------------------------------------------------- what tprun can run */

/* X(slot, kind): every tensor slot of a decoder layer that the forward pass
 * reads, once.  kind MAT is a weight matrix (a tp_mat in place on the CPU,
 * bf16 on a GPU), VEC a vector: norm weights, biases (fp32 everywhere: they
 * are tiny).  It generates tp_layer_slot below, and the runtime's
 * tp_layer_weights, tp_layer_src and cuda's tpcw_layer (runtime/model_layers.h);
 * the table's rows say which tensor fills which slot.  The experts of a
 * sparse layer have no slot: their row's part says where they go. */
#define TP_LAYER_TENSORS(X) \
    X(attn_norm, VEC) X(ffn_norm, VEC) X(q_norm, VEC) X(k_norm, VEC) \
    X(wq, MAT) X(wk, MAT) X(wv, MAT) X(wo, MAT) \
    X(bq, VEC) X(bk, VEC) X(bv, VEC) X(bo, VEC) \
    X(wgate, MAT) X(wup, MAT) X(wdown, MAT) \
    X(bgate, VEC) X(bup, VEC) X(bdown, VEC)

typedef enum tp_layer_slot {
    TP_SLOT_NONE = -1,        /* an expert row (see tp_expert_part), or a row without a bias */
#define TP_X(field, kind) TP_SLOT_##field,
    TP_LAYER_TENSORS(TP_X)
#undef TP_X
    TP_SLOT_COUNT
} tp_layer_slot;

/* Whether a slot holds a matrix (kind MAT) rather than a vector. */
bool tp_layer_slot_is_matrix(tp_layer_slot s);

/* One tensor of a decoder layer ("model.layers.N." + module + ".weight"),
 * the description the built-in plan, the runnable check, the runtime's
 * loading and tpsynth share.  Adding an architecture is a bit in archs on the
 * rows it has, plus its config defaults in arch.c. */
typedef enum tp_dim_of {
    TP_DIM_HIDDEN, TP_DIM_Q /* heads * head_dim */, TP_DIM_KV /* kv heads * head_dim */,
    TP_DIM_HEAD, TP_DIM_INTER,
    TP_DIM_EXPERTS /* n_experts */, TP_DIM_MOE_INTER /* moe_intermediate */,
    TP_DIM_2_MOE_INTER /* 2 * moe_intermediate (fused gate_up) */,
} tp_dim_of;

/* The global size a dimension has under config c (-1 for an unknown d). */
int64_t tp_dim_value(const tp_model_config *c, tp_dim_of d);

/* What an expert tensor is, from its name alone (both checkpoint layouts,
 * both architectures). */
typedef enum tp_expert_part {
    TP_EXPERT_NONE = 0,
    TP_EXPERT_ROUTER,         /* mlp.gate / block_sparse_moe.gate [n_experts, hidden] */
    TP_EXPERT_GATE, TP_EXPERT_UP, TP_EXPERT_DOWN,  /* one expert's [I, H], [I, H], [H, I] */
    TP_EXPERT_FUSED_GATE_UP,  /* mlp.experts.gate_up_proj [n_experts, 2 I, H] */
    TP_EXPERT_FUSED_DOWN,     /* mlp.experts.down_proj [n_experts, H, I] */
} tp_expert_part;
/* Which layers have a row, and in which checkpoint layout. */
typedef enum tp_row_kind {
    TP_ROW_ALL = 0,       /* every layer */
    TP_ROW_DENSE,         /* layers with a dense MLP */
    TP_ROW_SPARSE,        /* sparse layers, either expert layout (the router) */
    TP_ROW_EXPERT,        /* sparse layers, one tensor per expert: module has "experts.*." */
    TP_ROW_FUSED,         /* sparse layers, all experts in one 3-D tensor [n_experts, ...] */
} tp_row_kind;

typedef struct tp_arch_tensor {
    const char *module;       /* "self_attn.q_proj"; "*" stands for the expert number */
    tp_layer_slot slot;       /* the forward pass's slot of the weight (TP_SLOT_NONE: experts) */
    tp_layer_slot bias_slot;  /* the slot of its optional bias [dims[0]] (a local slice when
                                 runs is colwise; whole otherwise); TP_SLOT_NONE: never a bias.
                                 All-or-none per layer is the runtime's rule. */
    unsigned archs;           /* bit (1u << tp_arch) per architecture that has it */
    int ndim;
    tp_dim_of dims[3];        /* the weight's global shape */
    const char *plan_style;   /* transformers' base_model_tp_plan style, NULL: not in it */
    tp_style runs;            /* the cut tprun's forward pass implements (tensor-parallel experts) */
    tp_row_kind kind;
    bool bare;                /* a bare nn.Parameter: the name has no ".weight" */
    tp_expert_part part;      /* what it is in a sparse layer (TP_EXPERT_NONE elsewhere) */
} tp_arch_tensor;
extern const tp_arch_tensor tp_arch_layer_tensors[];
extern const size_t tp_arch_n_layer_tensors;

/* Whether layer `layer` of config c has the row: c's architecture has it,
 * and the row's kind fits the layer (dense rows in dense layers, the router
 * in sparse ones, per-expert rows in sparse layers unless fused, the fused
 * rows in sparse layers when fused: the layer's experts are in transformers
 * 5's fused layout). */
bool tp_arch_row_in_layer(const tp_model_config *c, const tp_arch_tensor *row, int layer, bool fused);

/* Whether config c says a layer's tensors carry the bias of this slot, as
 * transformers builds the modules (attention_bias: q/k/v, and o_proj except
 * qwen2's; mlp_bias: gate/up/down).  The checkpoint wins at load; tpsynth
 * writes what this says. */
bool tp_config_has_bias(const tp_model_config *c, tp_layer_slot bias_slot);

/* The row of architecture a for an expert part in the per-expert (fused
 * false) or the fused layout; NULL when a has none. */
const tp_arch_tensor *tp_arch_expert_row(tp_arch a, tp_expert_part part, bool fused);
/* "model.layers.L.<module with * = expert>.weight" (no ".weight" for a bare
 * row) into buf; false when it does not fit. */
bool tp_arch_tensor_name(const tp_arch_tensor *row, long layer, long expert, char *buf, size_t cap);
/* The same with ".bias" (a row with a bias_slot). */
bool tp_arch_bias_name(const tp_arch_tensor *row, long layer, char *buf, size_t cap);

/* A tensor by name and global shape (source, rank file or loaded rank). */
typedef struct tp_tensor_ref {
    const char *name;
    int ndim;
    const uint64_t *shape;
    tp_dtype dtype;           /* TP_DTYPE_INVALID: not known (then an 8-bit weight's scale
                                 is not required, only checked when present) */
} tp_tensor_ref;

/* Whether tprun can run these tensors with this config: a known
 * architecture (else names model_type); every tensor the forward pass needs
 * in layers 0..num_hidden_layers-1 plus the embedding, the final norm and
 * lm_head (unless tied) present with the shape config.json implies (names
 * the missing or misshapen tensor); no layer tensor beyond num_hidden_layers
 * or unknown to the architecture.  Other tensors outside the layers are
 * ignored. */
int tp_arch_check_tensors(const tp_model_config *c, const tp_tensor_ref *t, size_t n, tp_err *err);
/* Whether every tensor tprun uses gets, from the plan, the cut its forward
 * pass implements (the table's runs; embedding: replicate or vocab; lm_head:
 * colwise(_gather_output) or replicate; norms: replicate).  The message names
 * the plan's source, the pattern and both styles. */
int tp_arch_check_plan(const tp_model_config *c, const tp_plan *p, tp_err *err);
/* The same for one rank's tensors: per-expert tensors must be there for
 * experts [expert_lo, expert_hi) only (an expert-parallel rank), and one
 * outside that range is an error.  tp_arch_check_tensors is this with
 * [0, n_experts). */
int tp_arch_check_rank_tensors(const tp_model_config *c, const tp_tensor_ref *t, size_t n,
                               int expert_lo, int expert_hi, tp_err *err);

/* Whether tprun can run weight `name` (".weight" included) quantized: the
 * 2-D linear layers of the table (q/k/v/o, gate/up/down, per-expert
 * gate/up/down; not the router, the norms or transformers 5's fused 3-D
 * experts) and lm_head. */
bool tp_arch_quantizable(tp_arch a, const char *name);
/* The table lm_head multiplies by: "model.embed_tokens.weight" when tied
 * (tie_word_embeddings; then it may be 8-bit, quantized as an lm_head,
 * only if config.json declares lm_head quantized), else "lm_head.weight". */
const char *tp_arch_lm_head_tensor(const tp_model_config *c);

/* *layer and *expert (-1 when not a per-expert tensor) are filled when the
 * result is not TP_EXPERT_NONE. */
tp_expert_part tp_arch_expert_part(const char *name, long *layer, long *expert);
/* The experts [*lo, *hi) rank holds under --expert-parallel: n_experts / tp
 * each, in order.  -1 (and a message naming the flag and the key) when
 * n_experts is not a multiple of tp. */
int tp_expert_range(int n_experts, int tp, int rank, int *lo, int *hi, tp_err *err);
/* --expert-parallel: every expert tensor of the plan becomes TP_STYLE_EXPERT
 * (the router stays replicated); refuses a dense model or a n_experts that
 * tp does not divide. */
int tp_plan_expert_parallel(const tp_model_config *c, tp_plan *p, int tp, tp_err *err);

/* tp_arch_check_tensors on a rank file's tensor list (global shapes) and the
 * manifest's config.json text; a model_type tprun does not run is not
 * checked (0).  For tpverify. */
int tp_arch_check_index(const char *config_json, const tp_shard_index *ix, tp_err *err);

/* ----------------------------------------------------------- model shapes */

/* The sizes the cuts need, as 64-bit values, derived from tp_config_parse's
 * result (cfg). */
typedef struct tp_model_info {
    char model_type[64];
    int64_t hidden, n_heads, n_kv_heads, head_dim, intermediate, vocab, n_layers;
    bool tie_word_embeddings;
    tp_model_config cfg;
} tp_model_info;

/* tp_config_parse, then the sizes copied into mi (path for messages).
 * Unknown model types are accepted here (the plan step refuses them). */
int tp_model_info_parse(const char *json, size_t len, const char *path, tp_model_info *mi,
                        tp_err *err);

/* -------------------------------------------------------------------- cuts */

/* One tensor cut for every rank. */
typedef struct tp_cut {
    char *name;
    const tp_st_tensor *src;      /* NULL when made from a shape alone (tests) */
    tp_style style;
    long plan_entry;              /* index in the plan that named it, -1: not named (replicated) */
    int dim;                      /* -1: replicated */
    bool reduce_bias;             /* bias of a row-parallel layer: add once after the all-reduce */
    tp_dtype dtype;
    int ndim;
    uint64_t global_shape[TP_MAX_DIMS];
    int tp;
    int owner;                    /* -1: every rank holds a part; else only this rank holds
                                     the tensor (a per-expert tensor under --expert-parallel);
                                     the other ranks' files do not have it */
    tp_split *splits;             /* [tp] */
    uint64_t *local_shapes;       /* [tp * TP_MAX_DIMS] */
    uint64_t *rank_bytes;         /* [tp] */
    uint8_t *owned_data;          /* the whole global tensor in dtype, made by the converter
                                     (a scale widened to F32, a --quantize weight or scale);
                                     NULL: the slices are copied from src */
} tp_cut;

/* Cuts one tensor: checks its shape against the model (q_proj rows ==
 * heads * head_dim, ...) and the split (head boundaries, kv heads, even
 * division except for vocabulary rows).  Errors name the tensor. */
int tp_cut_make(tp_cut *c, const tp_model_info *mi, const char *name, tp_dtype dtype, int ndim,
                const uint64_t *shape, tp_style style, int tp, tp_err *err);
void tp_cut_free(tp_cut *c);
/* The cut of quantized weight w's scale tensor `name` (F32, global shape
 * shape / ndim from tp_quant_scale_shape): every rank holds the scales its
 * weight slice uses (tp_quant_scale_split), with w's style and owner.
 * data (the whole scale as F32) becomes the cut's owned_data on success.
 * Refused, naming the weight, when one rank's weight ranges would need the
 * same block twice (a packed cut through a block). */
int tp_cut_make_scale(tp_cut *sc, const tp_model_info *mi, const tp_cut *w, const char *name,
                      tp_quant q, const int block[2], int ndim, const uint64_t *shape, float *data,
                      tp_err *err);

/* The range [*start, *end) of [0, size) that rank holds: size / tp each
 * (size % tp must be 0), or with uneven torch.chunk's split (ceil(size / tp)
 * each, the last ranks shorter).  -1 when it does not divide or the rank
 * would hold nothing.  Exposed for tests. */
int tp_split_range(uint64_t size, int tp, int rank, bool uneven, uint64_t *start, uint64_t *end);

/* ------------------------------------------------- quantized weights (1.5) */

/* convert/quant.c: FORMAT.md 1.5, "Quantized weights".  A quantized weight
 * P.weight has its scale P.<suffix> beside it. */

/* "weight_scale_inv" (block FP8), "weight_scale" (row int8), NULL (none). */
const char *tp_quant_scale_suffix(tp_quant q);
/* quantization_config.quant_method: "fp8", "tpshard_int8", NULL (none). */
const char *tp_quant_method(tp_quant q);
/* The 8-bit dtype of q's weights (TP_F8_E4M3, TP_I8; TP_DTYPE_INVALID). */
tp_dtype tp_quant_dtype(tp_quant q);
/* "P.weight" -> "P.<suffix>" into buf; false when name does not end in
 * ".weight", q is none or it does not fit. */
bool tp_quant_scale_name(tp_quant q, const char *weight_name, char *buf, size_t cap);
/* The inverse: "P.weight_scale_inv" or "P.weight_scale" (either scheme)
 * -> "P.weight" into weight (cap bytes) and the suffix returned; NULL when
 * the name is not a scale's (or the weight's name does not fit). */
const char *tp_quant_scale_weight(const char *scale_name, char *weight, size_t cap);
/* The scale's global shape for a [rows, cols] weight: block FP8
 * [ceil(rows / B0), ceil(cols / B1)] (2 dims), row int8 [rows] (1 dim).
 * Returns the number of dimensions. */
int tp_quant_scale_shape(tp_quant q, const int block[2], const uint64_t *weight_shape,
                         uint64_t *out);
/* The split of the scale that a rank holding the weight's split w needs
 * (FORMAT.md 1.5): block FP8, the blocks its ranges touch along w's dim
 * (ranges of different ranks may overlap); row int8, its rows when cut by
 * rows, everything when cut by columns.  One range per range of w (w's
 * ranges must touch disjoint blocks: the caller checks). */
void tp_quant_scale_split(tp_quant q, const int block[2], const tp_split *w, tp_split *out);
/* n scales of dtype dt (BF16, F16 or F32) widened exactly to F32, each
 * checked finite and > 0; errors name the tensor and the element. */
int tp_quant_scales_to_f32(const char *name, tp_dtype dt, const uint8_t *data, size_t n,
                           float *out, tp_err *err);
/* Element i of a BF16 / F16 / F32 / F8_E4M3 / I8 array as an F32 value
 * (exact). */
float tp_elem_to_f32(tp_dtype dt, const uint8_t *data, size_t i);
/* Quantizes a [rows, cols] float weight (dt BF16, F16 or F32) the way
 * transformers' Fp8Quantize does, with edge blocks allowed: per block of
 * block[0] x block[1] (global blocks, before any cut), amax = max |w| in
 * fp32; scale = (1 / amax) * 448 (torch's evaluation of 448 / amax; 1 when
 * amax is 0); q = e4m3(w * scale) (round
 * to nearest even); scale_inv = 1 / scale, both divisions in fp32.
 * q: rows * cols bytes; scale_inv: the scale shape above.  Refuses (naming
 * the tensor) a non-finite weight. */
int tp_quantize_fp8_block(const char *name, tp_dtype dt, const uint8_t *w, uint64_t rows,
                          uint64_t cols, const int block[2], uint8_t *q, float *scale_inv,
                          tp_err *err);
/* Symmetric int8 per output row: scale = amax / 127 in fp32 (1 when the row
 * is zero), q = w / scale rounded to nearest even, clamped to [-127, 127]. */
int tp_quantize_int8_row(const char *name, tp_dtype dt, const uint8_t *w, uint64_t rows,
                         uint64_t cols, int8_t *q, float *scale, tp_err *err);
/* config_json with "quantization_config" set for q (fp8: as Qwen's releases
 * write it, [128, 128] blocks; int8: ours), lm_head listed in
 * modules_to_not_convert unless quantize_lm_head; malloc'd, NULL on error. */
char *tp_quant_config_json(const char *config_json, size_t len, tp_quant q, bool quantize_lm_head,
                           size_t *out_len, tp_err *err);

/* -------------------------------------------------------------- conversion */

typedef enum tp_out_format {
    TP_OUT_TPSHARD = 0,
    TP_OUT_SAFETENSORS,
} tp_out_format;

typedef struct tp_conversion {
    char *model_dir;
    int tp;
    bool vocab_parallel;          /* the embedding was cut by vocabulary rows */
    bool expert_parallel;         /* experts whole per rank (manifest "expert_parallel") */
    tp_model_info model;
    tp_plan plan;
    char *config_json;
    size_t config_len;
    tp_st_set src;
    bool src_open;
    size_t n_cuts;
    tp_cut *cuts;                 /* source order: by file, then by offset */
    uint64_t *rank_total;         /* [tp] bytes per rank */
    uint64_t source_bytes;
} tp_conversion;

/* Reads config.json, resolves the plan, opens the weights and cuts every
 * tensor.  Writes nothing.  vocab_parallel (tpconvert's default): the
 * embedding is cut by vocabulary rows unless the plan names it; false
 * (--replicate-embedding): it stays whole, and a plan that cuts it is
 * refused. */
int tp_conversion_prepare(tp_conversion *c, const char *model_dir, int tp, const char *plan_path,
                          bool vocab_parallel, tp_err *err);
/* The same with every choice: */
typedef struct tp_prepare_opts {
    const char *plan_path;        /* NULL: config's or built-in plan */
    bool vocab_parallel;
    bool expert_parallel;         /* whole experts per rank (tp_plan_expert_parallel) */
    /* --quantize: the quantizable linear weights (tp_arch_quantizable) of a
     * float checkpoint are quantized whole, then cut as a quantized
     * checkpoint's; config.json gets the quantization_config. */
    tp_quant quantize;
    bool quantize_lm_head;        /* lm_head too (when tied: the shared embedding table) */
} tp_prepare_opts;
int tp_conversion_prepare_opts(tp_conversion *c, const char *model_dir, int tp,
                               const tp_prepare_opts *o, tp_err *err);
void tp_conversion_free(tp_conversion *c);
/* What tpconvert runs before writing (and before --dry-run prints): the
 * prepared conversion is one tprun can run (tp_arch_check_tensors on the
 * source tensors; with check_plan also tp_arch_check_plan).  A model_type
 * tprun does not run is refused when check_plan (tpshard output), else
 * accepted unchecked (a safetensors export for other runtimes). */
int tp_conversion_check_runnable(const tp_conversion *c, bool check_plan, tp_err *err);

typedef struct tp_write_opts {
    tp_out_format format;
    tp_codec codec;
    int level;
    size_t chunk_size;            /* 0: TP_DEFAULT_CHUNK */
    int threads;                  /* tpshard encoding threads, 0: all cores */
    bool quiet;                   /* no progress bar */
    bool force;                   /* replace an existing conversion in out_dir */
    /* Set (e.g. by a SIGINT handler) to stop: checked between tensors and
     * chunks; the write fails with "interrupted" and cleans up.  May be NULL. */
    volatile sig_atomic_t *cancel;
} tp_write_opts;

typedef struct tp_write_report {
    char conversion_id[33];
    uint64_t raw_bytes, stored_bytes;
    size_t n_files_copied;
    double seconds;
} tp_write_report;

/* Writes out_dir.  out_dir must not exist or be empty, else it is refused
 * unless opts->force, which replaces only a conversion: out_dir must hold a
 * manifest.json of ours (and only its files, bundles and leftovers of an
 * interrupted run) or only such leftovers; anything else is refused naming
 * the first foreign file.  Everything is written into a temporary sibling
 * ".NAME.tpconvert-XXXXXX" (locked while in use; stale ones of killed runs
 * are removed) and swapped in only when complete (manifest written last and
 * fsynced): on any failure or cancel out_dir is left as it was, old
 * conversion intact, and the temporary directory is removed.  A symlinked
 * out_dir replaces the directory it names; a mount point is refused (the
 * rename cannot cross file systems).  Files copied when present:
 * config.json (always), generation_config.json, tokenizer.json,
 * tokenizer_config.json: each must be a regular file inside the model
 * directory (hub cache blobs allowed, see tp_model_file_check) holding a
 * JSON object, and is written with mode 0644 (less any umask) whatever the
 * source's mode.  A source file truncated while mapped is an error naming
 * it ("file changed while being read"), not a SIGBUS. */
int tp_conversion_write(const tp_conversion *c, const char *out_dir, const tp_write_opts *opts,
                        tp_write_report *rep, tp_err *err);

/* ------------------------------------------------ synthetic models (H6) */

/* A synthetic Hugging Face model directory with random bf16 weights
 * (convert/synth.c; tools/tpsynth.c is its command line). */
typedef struct tp_synth_opts {
    const char *arch;            /* "qwen3", "qwen2", "llama", "mistral", "qwen3_moe", "mixtral" */
    int hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, max_position;
    /* qwen3_moe / mixtral: every layer sparse, per-expert tensors as on the
     * Hub; moe_intermediate: qwen3_moe's expert size (mixtral's experts
     * have intermediate).  Ignored by the dense architectures. */
    int experts, experts_per_tok, moe_intermediate;
    bool tie;                    /* tie_word_embeddings (no lm_head.weight) */
    uint64_t seed;
    uint64_t shard_size;         /* bytes per safetensors file; 0: one model.safetensors */
    const char *tokenizer_path;  /* tokenizer.json or tokenizer.json.zst to copy; NULL: none */
    int threads;                 /* 0: all cores */
    bool quiet;                  /* no progress bar */
} tp_synth_opts;

/* Sets arch and dimensions of a named preset ("tiny", "demo", "qwen3-0.6b",
 * "qwen3-8b", "moe-tiny", "qwen3-30b-a3b-layer": Qwen3-30B-A3B's layer shape,
 * 2 layers); leaves seed, shard_size, tokenizer_path, threads, quiet. */
int tp_synth_preset(tp_synth_opts *o, const char *preset, tp_err *err);
/* Writes out_dir (created; must be empty): model safetensors (sharded with
 * an index when shard_size is set), tokenizer files, generation_config.json
 * and, last, config.json.  On failure the files written are removed. */
int tp_synth_write(const char *out_dir, const tp_synth_opts *o, tp_err *err);
/* Parameters of the model o describes (0 when o is invalid). */
uint64_t tp_synth_param_count(const tp_synth_opts *o);

#ifdef __cplusplus
}
#endif
#endif
