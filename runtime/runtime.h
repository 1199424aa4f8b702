/* runtime.h - everything tprun needs above the loader: the tokenizer, the
 * communication interface, the model and its tensor-parallel forward pass,
 * sampling and generation.
 *
 * Same error convention as shardfmt.h: 0 / -1 and a tp_err.
 */
#ifndef TP_RUNTIME_H
#define TP_RUNTIME_H

#include "shardfmt.h"
#include "loader.h"
#include "convert.h"

#ifdef __cplusplus
extern "C" {
#endif

/* --------------------------------------------------------------- tokenizer */

/* A Hugging Face tokenizer.json byte-level BPE tokenizer (Qwen2/Qwen3,
 * Llama-3 style): NFC normaliser, the pre-tokenizer's split regex (PCRE2),
 * byte-to-unicode mapping, merges by rank, added tokens matched first.
 * Configurations it does not implement are refused with an error naming the
 * key.  Encoding adds no BOS/EOS (HF's add_special_tokens=False).
 *
 * Threads: a loaded tokenizer is only read.  tp_tokenizer_encode,
 * tp_tokenizer_decode, tp_tokenizer_token_id, tp_tokenizer_vocab_size and
 * tp_detok_new may run in several threads at once on the same tokenizer:
 * each call keeps its scratch (PCRE2 match data, BPE buffers) to itself and
 * nothing is cached in the tokenizer (tprun --serve encodes in every
 * connection thread while its scheduler decodes).  tp_tokenizer_set_model_vocab
 * writes it: call it before the tokenizer is shared.  A tp_detok is one
 * stream's state: one thread at a time. */
typedef struct tp_tokenizer tp_tokenizer;

/* The path may end in ".zst" (zstd-compressed tokenizer.json). */
int tp_tokenizer_load(tp_tokenizer **tok, const char *tokenizer_json_path, tp_err *err);
int tp_tokenizer_load_mem(tp_tokenizer **tok, const char *json, size_t len, const char *name, tp_err *err);
void tp_tokenizer_free(tp_tokenizer *tok);
/* Encodes UTF-8 text (added/special tokens inside the text are recognised).
 * *ids is malloc'd. */
int tp_tokenizer_encode(const tp_tokenizer *tok, const char *text, size_t len,
                        int32_t **ids, size_t *n_ids, tp_err *err);
/* Vocabulary size including added tokens (largest id + 1). */
size_t tp_tokenizer_vocab_size(const tp_tokenizer *tok);
/* Id of a token string ("<|im_end|>"), or -1. */
int32_t tp_tokenizer_token_id(const tp_tokenizer *tok, const char *token);
/* The model's vocabulary size (config.json's vocab_size), for decoding.  A
 * model's vocabulary is often padded past the tokenizer's (Qwen3: 151,936
 * ids, 151,669 tokens) and sampling can produce such an id: after this call,
 * an id in [0, model_vocab) without a token decodes to nothing (empty text),
 * as Hugging Face tokenizers' decode skips ids it does not know; the id stays
 * in the generated ids.  A negative id, or one >= model_vocab that is not a
 * token either, is still an error.  Without the call (tptok, no model) every
 * unknown id is an error. */
void tp_tokenizer_set_model_vocab(tp_tokenizer *tok, size_t model_vocab);

/* The byte offset of the first invalid UTF-8 sequence in text[0..n), or n
 * when it is all valid (overlong forms, surrogates and code points past
 * U+10FFFF are invalid, as for Rust's str). */
size_t tp_utf8_first_invalid(const char *text, size_t n);

/* Streaming decoder: feed ids one at a time, get back the bytes that are now
 * complete UTF-8 (never half a character).  tp_detok_flush() returns what is
 * left (invalid trailing bytes become U+FFFD). */
typedef struct tp_detok tp_detok;
tp_detok *tp_detok_new(const tp_tokenizer *tok, bool skip_special);
/* Appends the newly complete text to *out (malloc'd, NUL-terminated, may be
 * empty); the caller frees it.  An unknown id is an error, except as
 * tp_tokenizer_set_model_vocab says (then it adds nothing). */
int tp_detok_push(tp_detok *d, int32_t id, char **out, tp_err *err);
char *tp_detok_flush(tp_detok *d);
void tp_detok_free(tp_detok *d);
/* Whole-sequence decode (malloc'd, NUL-terminated). */
int tp_tokenizer_decode(const tp_tokenizer *tok, const int32_t *ids, size_t n, bool skip_special,
                        char **text, tp_err *err);

/* -------------------------------------------------------------------- chat */

/* A parsed Jinja chat template (the subset real chat templates use: Qwen2.5,
 * Qwen3, Llama 3.x, Mistral), rendered as transformers' apply_chat_template
 * renders it (runtime/jinja.c says what is supported).
 *
 * Threads: a parsed template is only read while it renders.
 * tp_template_render and tp_chat_render may run in several threads at once
 * on the same template (and the same ctx, which is only read): each render
 * has its own arena, variables and output, and strftime_now uses
 * localtime_r (tprun --serve renders in every connection thread).
 * tp_template_set_time writes it: call it before the template is shared. */
typedef struct tp_template tp_template;
struct cJSON;
/* name: for messages ("tokenizer_config.json: chat_template").  An
 * unsupported construct fails here with its line and column and what it is
 * ("line 3, column 9: filter 'wordcount' is not supported"). */
int tp_template_parse(tp_template **t, const char *src, size_t len, const char *name, tp_err *err);
/* ctx: a cJSON object of the template's variables, as transformers'
 * apply_chat_template passes them: messages (array of {role, content,
 * tool_calls?, ...}), tools (may be absent), add_generation_prompt,
 * bos_token, eos_token, plus extra kwargs (enable_thinking ...).  *out:
 * malloc'd, NUL-terminated.  raise_exception("...") in the template fails
 * with that message ("NAME: the message").  A JSON number is an int when it
 * is integral (cJSON keeps no distinction), else a float.  Bounded: loop
 * iterations, nesting, output (16 MiB) and memory; errors name the line and
 * column. */
int tp_template_render(const tp_template *t, const struct cJSON *ctx, char **out, size_t *out_len,
                       tp_err *err);
void tp_template_free(tp_template *t);
/* strftime_now's clock: now NULL is the local time at each call (the
 * default); else always *now (tests). */
struct tm;
void tp_template_set_time(tp_template *t, const struct tm *now);
/* The model's template, from a loaded rank's copied files:
 * lr->chat_template_jinja (chat_template.jinja, as transformers 5 saves it)
 * first, else tokenizer_config.json's "chat_template" (a string, or a list of
 * {name, template}: the one named "default").  *bos_token / *eos_token
 * (malloc'd, or NULL when absent) are tokenizer_config.json's (a string or
 * an {"content": ...} object).  *t NULL (return 0) when the model has no
 * template.  Errors name the file. */
int tp_template_load(tp_template **t, char **bos_token, char **eos_token, const tp_loaded_rank *lr,
                     tp_err *err);
/* The ChatML template (Qwen's turns): the fallback for a model without a
 * chat template of its own. */
int tp_template_chatml(tp_template **t, tp_err *err);
/* Renders messages (a cJSON array of {role, content}) with t as
 * apply_chat_template does: bos_token / eos_token (NULL: left undefined),
 * add_generation_prompt, nothing else (enable_thinking and the like keep
 * the template's default).  *out malloc'd, NUL-terminated. */
int tp_chat_render(const tp_template *t, const char *bos_token, const char *eos_token,
                   const struct cJSON *messages, bool add_generation_prompt, char **out, size_t *out_len,
                   tp_err *err);

/* ------------------------------------------------------------ communication */

/* The three collectives tensor parallelism needs, behind one interface.
 * Backends: "single" (one rank), "tcp" (our own sockets, no MPI needed:
 * rank 0 listens on MASTER_ADDR:MASTER_PORT, default 127.0.0.1:29500, a
 * star, fine for small world sizes; TP_COMM_PORT overrides the port, and
 * under torchrun's agent store, which holds MASTER_PORT itself, the port
 * after it is used), "mpi" (Open MPI), "nccl" (CUDA builds).
 * Every call gives up with an error after timeout_s seconds instead of
 * hanging when a peer died or never arrived (timeout_s <= 0: wait forever,
 * e.g. while rank 0 waits for the user's next line).  Results are
 * bit-identical on every rank (sums are made in one place, in rank order). */
typedef struct tp_comm tp_comm;

typedef struct tp_comm_ops {
    const char *name;
    int (*allreduce_sum_f32)(tp_comm *c, float *buf, size_t n, tp_err *err);
    /* recv holds n_per_rank * world floats, rank r's part at r * n_per_rank */
    int (*allgather_f32)(tp_comm *c, const float *send, float *recv, size_t n_per_rank, tp_err *err);
    int (*broadcast)(tp_comm *c, void *buf, size_t bytes, int root, tp_err *err);
    int (*barrier)(tp_comm *c, tp_err *err);
    void (*close)(tp_comm *c);
} tp_comm_ops;

struct tp_comm {
    const tp_comm_ops *ops;
    int rank, world;
    double timeout_s;
    void *impl;
};

/* Where this process sits, from --rank or the launcher's environment:
 * RANK/WORLD_SIZE/LOCAL_RANK (torchrun), OMPI_COMM_WORLD_RANK/SIZE and
 * PMI_RANK/PMI_SIZE (mpirun), SLURM_PROCID/SLURM_NTASKS (srun).
 * cli_rank < 0 means not given.  *source names where the rank came from. */
typedef struct tp_launch {
    int rank, world, local_rank;   /* world 0: only --rank given, take the manifest's tp */
    const char *source;      /* "--rank", "RANK", "OMPI_COMM_WORLD_RANK", ... */
    bool under_mpirun;
    const char *world_source; /* "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", ... or NULL */
    int local_world;         /* ranks on this node (threads are shared among them) */
    /* What this rank loaded, set by the caller (tprun: the manifest's
     * conversion id; tp_launch_detect leaves it NULL).  When set,
     * tp_comm_open refuses to join ranks that loaded another conversion. */
    const char *conversion_id;
} tp_launch;
int tp_launch_detect(tp_launch *l, int cli_rank, tp_err *err);

/* backend: "auto" (world > 1: mpi under mpirun, else tcp; world 1: single),
 * "single", "tcp", "mpi", "nccl".  With l->conversion_id set, the ranks
 * check each other as they join: the tcp hello carries the id and the world
 * size (rank 0 refuses a peer that differs, and tells it why), and every
 * backend then runs tp_comm_check_peers before returning. */
int tp_comm_open(tp_comm **c, const char *backend, const tp_launch *l, double timeout_s, tp_err *err);
/* A collective (an all-gather over the comm's own vtable, so any backend):
 * every rank learns every rank's conversion id and world size, and all
 * fail alike at the first rank that differs from rank 0: "rank 1 loaded
 * conversion <id1>, rank 0 <id0>: every rank must load the same
 * conversion".  conversion_id may be NULL (compared as no id). */
int tp_comm_check_peers(tp_comm *c, const char *conversion_id, tp_err *err);
void tp_comm_close(tp_comm *c);
/* After an error: ends the whole job (MPI_Abort under MPI; the other
 * backends close their sockets, so the peers get an error at once). */
void tp_comm_abort(tp_comm *c, int code);

/* ------------------------------------------------------------------- model */

/* tp_model_config and tp_model_config_parse (the one config.json parser)
 * live in convert.h: tpconvert and tprun read config.json the same way. */

/* A rank's model: its local weights (fp32 on the CPU backend), the local
 * head counts, and the KV cache. */
typedef struct tp_model tp_model;

typedef struct tp_model_opts {
    int max_seq;            /* KV cache length (0: min(max_position, 4096)) */
    int threads;            /* CPU threads (0: all cores) */
    const char *device;     /* "cpu" or "cuda" */
    bool no_graph;          /* cuda: decode steps kernel by kernel, no CUDA graph */
    /* cpu: the matrix kernels, "amx", "avx512", "avx2" or "portable"; NULL
     * or "auto": the best this CPU runs.  Process-wide; tp_model_create
     * refuses a name it does not know or a path this CPU cannot run. */
    const char *cpu_kernels;
    /* Sequence slots (tprun --max-batch), each with its own KV cache of
     * max_seq positions; 0 or 1: one sequence (slot 0).  The KV memory is
     * reserved, not touched (an anonymous MAP_NORESERVE mapping): its pages
     * are used as sequences grow.  tp_model_create refuses, naming
     * --max-batch and --max-seq, when slots x max_seq x the per-token KV
     * bytes exceed the machine's physical memory (device "cuda": the
     * device memory left free by the weights; its caches are allocated
     * there, not reserved). */
    int slots;
} tp_model_opts;

/* Builds rank comm->rank's model from its loaded tensors (found by their
 * Hugging Face names; every local shape checked against config.json and the
 * tp size, errors name the tensor).  Collective: every rank calls it (the
 * ranks exchange their vocabulary ranges).  comm may be NULL for tp = 1.
 * The cpu needs lr's tensors in memory (tp_load_rank without
 * defer_tensors) and reads the weight matrices where they lie, in their
 * stored dtype (norms and biases are copied to fp32): lr must stay loaded,
 * tensors not dropped, until tp_model_free.  "cuda" makes no host copy: it
 * streams the tensors to the device with tp_load_stream (from the rank file
 * when lr was opened with defer_tensors, else from memory); lr may be freed
 * (or its tensors dropped) right afterwards. */
int tp_model_create(tp_model **m, tp_loaded_rank *lr, tp_comm *comm, const tp_model_opts *opts, tp_err *err);
void tp_model_free(tp_model *m);
const tp_model_config *tp_model_get_config(const tp_model *m);
void tp_model_reset(tp_model *m);   /* empties the KV cache of every slot */
int tp_model_position(const tp_model *m);   /* slot 0's length */
/* Where the forward pass runs, one line: "cpu, <path> kernels", or for
 * "cuda" the device, the weight bytes uploaded, the upload's GB/s and the
 * all-reduce path. */
const char *tp_model_device_info(const tp_model *m);
/* The weights put on the device: bytes written there and the seconds from
 * the first allocation to the last copy done (tprun --load-only prints
 * them).  0 and 0 for the cpu. */
void tp_model_weight_stats(const tp_model *m, double *bytes, double *seconds);
/* Runs ids[0..n) at the current position and appends them to the cache.
 * When logits is non-NULL it receives the full-vocabulary logits of the last
 * position (gathered across ranks; identical on every rank).  Collective:
 * every rank passes the same ids, and logits NULL or not on all of them. */
int tp_model_forward(tp_model *m, const int32_t *ids, int n, float *logits, tp_err *err);

/* One token of a batched step (tp_model_forward_batch). */
typedef struct tp_batch_token {
    int slot;       /* 0 .. slots - 1 */
    int32_t id;
    int pos;        /* its position in its sequence: a slot's tokens come in
                       order, the first at the slot's current length (what
                       its cache holds), the next at pos + 1, ... */
    bool logits;    /* wants its logits row */
} tp_batch_token;

/* One step over the tokens t[0..n) of several sequences (new prompts'
 * prefill chunks and running sequences' decode tokens mixed, in any order
 * as long as each slot's tokens are in position order): the matrix products
 * run over all n tokens at once (GEMM, not one GEMV per sequence), the
 * attention of each token over its own slot's cache (sliding windows per
 * slot), mixture-of-experts layers through the same grouped path.  Each
 * slot's cache grows by its tokens.  logits: one row of vocab floats per token with logits set, in order,
 * gathered across ranks (identical on every rank); NULL: no logits are
 * computed, whatever the tokens say.  RoPE types whose frequencies follow the pass
 * (dynamic, longrope) take, for each slot, the length its sequence reaches
 * in this step, as transformers does for one sequence's pass: a batch gives
 * every sequence what running it alone with the same chunks gives.
 * Nothing changes when a token is refused (the error names the token's
 * index, slot and position).  Collective: every rank passes the same tokens.
 * tp_model_forward is this call with ids at slot 0, logits on the last. */
int tp_model_forward_batch(tp_model *m, const tp_batch_token *t, int n, float *logits, tp_err *err);
int tp_model_slots(const tp_model *m);
/* The positions slot's cache holds (-1 for a slot outside [0, slots)). */
int tp_model_slot_length(const tp_model *m, int slot);
/* Empties slot's cache, for a new sequence (a slot outside [0, slots):
 * no-op).  Its pages stay with the process, for the slot's next sequence:
 * the memory a run uses is bounded by the longest sequences its slots held. */
void tp_model_reset_slot(tp_model *m, int slot);

/* ---------------------------------------------------------------- sampling */

typedef struct tp_sampler_opts {
    float temperature;      /* 0: greedy */
    int top_k;              /* 0: off */
    float top_p;            /* 1: off */
    uint64_t seed;
    /* transformers' RepetitionPenaltyLogitsProcessor, applied to the logits
     * before everything above (greedy too); 0 or 1: off.  It covers the ids
     * seen[0..n_seen): the prompt and what was generated so far (tp_generate
     * fills them in; callers of tp_model_pick set them themselves). */
    float repetition_penalty;
    const int32_t *seen;
    size_t n_seen;
} tp_sampler_opts;

/* The draws come from tp_rng (shardfmt.h). */
/* Picks a token from full logits (vocab entries).  Greedy ties go to the
 * lowest id.  scratch: NULL (allocated inside) or 2 * vocab floats.  It does
 * not apply o->repetition_penalty: tp_model_pick does, on a copy. */
int32_t tp_sample(const float *logits, int vocab, const tp_sampler_opts *o, tp_rng *rng, float *scratch);
/* Whether o's repetition penalty changes anything (set, not 1, ids seen). */
bool tp_repetition_penalty_on(const tp_sampler_opts *o);
/* out = logits with transformers' repetition penalty: for every distinct id
 * of seen[0..n) inside [0, vocab), a logit < 0 is multiplied by penalty, any
 * other divided by it.  out must not overlap logits (then repeated ids are
 * penalised once, as transformers' gather/scatter does). */
void tp_repetition_penalty(const float *logits, float *out, int vocab, const int32_t *seen, size_t n, float penalty);
/* Whether tp_sample takes the argmax (temperature <= 0 or top_k 1): it then
 * draws nothing from the rng. */
bool tp_sampler_is_greedy(const tp_sampler_opts *o);

/* Picking a model's next token (model.c).  tp_model_pick: the repetition
 * penalty on a copy of the logits (logits themselves are left as they are),
 * tp_sample over the full logits (identical on every rank), then rank 0's
 * id broadcast so that the ranks never drift apart.  Collective. */
int tp_model_pick(tp_model *m, const float *logits, const tp_sampler_opts *o, tp_rng *rng,
                  int32_t *next, tp_err *err);
/* tp_model_forward of ids[0..n), then the next token picked from the last
 * position's logits by tp_model_pick's rules, drawing from rng exactly as
 * tp_sample would (nothing when greedy).  *next is the same on every rank.
 * On device "cuda" the logits stay on the GPU and only the id comes back,
 * except with a repetition penalty: then they come to the host and
 * tp_model_pick picks there.  Collective. */
int tp_model_forward_pick(tp_model *m, const int32_t *ids, int n, const tp_sampler_opts *o,
                          tp_rng *rng, int32_t *next, tp_err *err);

/* -------------------------------------------------------------- generation */

/* What generation_config.json says (every field optional; has_* tells
 * which were there).  eos_token_id may be an int or a list. */
typedef struct tp_gen_config {
    bool has_do_sample, do_sample;
    bool has_temperature, has_top_k, has_top_p;
    float temperature, top_p;
    int top_k;
    bool has_repetition_penalty;
    float repetition_penalty;   /* > 0 */
    int max_new_tokens;     /* 0: not given (a negative one is an error) */
    int n_eos;
    int32_t eos_ids[8];
} tp_gen_config;
/* json may be NULL (no file): an empty config.  Errors name the key. */
int tp_gen_config_parse(tp_gen_config *g, const char *json, tp_err *err);

/* Called for every generated token (end-of-sequence ids included), in
 * order, on every rank; returns 0, or -1 with err filled to stop. */
typedef int (*tp_token_fn)(int32_t id, void *arg, tp_err *err);

typedef struct tp_gen_opts {
    int max_new_tokens;
    tp_sampler_opts sampler;
    /* The ids already in the model's cache before ids (a conversation's
     * earlier turns): the repetition penalty covers them too. */
    const int32_t *history;
    size_t n_history;
    const int32_t *eos_ids; /* generation stops after one of these (n_eos 0: never) */
    int n_eos;
    int context;            /* the model's KV cache length (tp_model_opts.max_seq) */
    tp_token_fn on_token;   /* may be NULL */
    void *arg;
    float *prompt_logits;   /* non-NULL: gets the last prompt position's logits (vocab floats) */
} tp_gen_opts;

typedef struct tp_gen_result {
    int32_t *ids;           /* generated ids (malloc'd) */
    size_t n_ids;
    /* The last generated id is not in the KV cache yet (generation stops
     * before feeding it): a conversation feeds it first on its next turn.
     * -1 when nothing was generated. */
    int32_t pending;
    bool stopped_eos, stopped_context;
    int n_prefill, n_decode;        /* tokens run through the model in each phase */
    double prefill_s, decode_s;
} tp_gen_result;

/* The checks tp_generate makes before it starts: ids inside the vocabulary
 * ("prompt id 999999 is outside the vocabulary (151936)") and the prompt
 * fitting the context after what the cache holds ("prompt has N tokens, the
 * context is M"). */
int tp_gen_check_prompt(const tp_model *m, const int32_t *ids, int n, int context, tp_err *err);
/* Prefills ids[0..n) at the model's current position (one forward call),
 * then generates one token at a time until max_new_tokens, an
 * end-of-sequence id or a full context.  The repetition penalty (if any)
 * covers history, ids and the ids generated so far.  Every rank samples with the same
 * rng; rank 0's choice is broadcast so that the ranks never drift apart. */
int tp_generate(tp_model *m, tp_comm *comm, tp_rng *rng, const int32_t *ids, int n,
                const tp_gen_opts *o, tp_gen_result *res, tp_err *err);
void tp_gen_result_free(tp_gen_result *r);

/* ------------------------------------------------------------------- serve */

/* tprun --serve: an OpenAI-compatible HTTP server (libmicrohttpd) with
 * continuous batching over the model's sequence slots (runtime/serve.c: the
 * scheduler; runtime/serve_http.c: HTTP, routes, OpenAI JSON, SSE).
 *
 * Every rank calls tp_serve_run.  Rank 0 listens and schedules: each step it
 * broadcasts a step plan (the slots to empty, then the step's tokens) and
 * every rank runs it through tp_model_forward_batch, so the ranks can never
 * diverge; only rank 0 samples.  Idle, rank 0 broadcasts a heartbeat plan
 * every second, so the others' --timeout notices a dead rank 0; a dead peer
 * makes rank 0's collective fail: pending requests get 503 and tp_serve_run
 * returns -1.  *stop (set from a signal handler; rank 0 reads it) stops
 * admission (new requests get 503), lets running requests finish for
 * grace_s seconds, cancels the rest, sends a stop plan to every rank and
 * returns 0.  Requests are parsed, rendered (chat_template) and encoded
 * (tok) in libmicrohttpd's connection threads, several at once, without a
 * lock: the thread contracts of the tokenizer and the template above. */
typedef struct tp_serve_opts {
    const char *host;               /* rank 0 listens here (default "127.0.0.1") */
    int port;                       /* 0: 8000 */
    int max_seq;                    /* the model's tp_model_opts.max_seq: a request's prompt and
                                     * answer together (finish_reason "length" there) */
    int max_queue;                  /* requests waiting for a slot (0: 64); more get 429 */
    int max_step_tokens;            /* prompt tokens one step prefills besides the decode
                                     * tokens (0: 256); the same on every rank */
    const char *served_model_name;  /* "model" in requests and /v1/models */
    tp_sampler_opts defaults;       /* sampling when a request says nothing (seed ignored) */
    const int32_t *eos_ids;         /* a generated one ends the answer with finish_reason "stop" */
    int n_eos;
    double grace_s;                 /* after *stop: how long running requests may finish (0: 30) */
    size_t max_body;                /* request body limit in bytes (0: 1 MiB); more get 413 */
    /* /v1/chat/completions renders messages (and tools) with this template
     * (tp_template_load's, or tp_template_chatml's), bos_token and
     * eos_token as its variables (NULL: undefined); chat_template_kwargs
     * in a request add variables (enable_thinking ...).  NULL template:
     * the endpoint answers 404. */
    const tp_template *chat_template;
    const char *bos_token, *eos_token;
    const volatile int *stop;       /* rank 0: non-zero asks for a clean stop; may be NULL */
    /* Rank 0's access and event lines (one line, no newline), NULL: none.
     * The library never prints: the caller decides where they go. */
    void (*log)(void *arg, const char *line);
    void *log_arg;
} tp_serve_opts;

/* m must have been created with tp_model_opts.slots >= 1 (the batch size:
 * --max-batch).
 * tok: the model's tokenizer, needed on rank 0 (NULL is an error there). */
int tp_serve_run(tp_model *m, tp_comm *comm, const tp_tokenizer *tok, const tp_serve_opts *o, tp_err *err);

#ifdef __cplusplus
}
#endif
#endif
