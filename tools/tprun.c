/* tprun - runs one rank of a tensor-parallel model converted by tpconvert.
 *
 *   torchrun --nproc-per-node 2 --no-python tprun OUT --prompt "Hello"
 *   mpirun -np 2 tprun OUT --prompt-ids 1,2,3 --json
 *   tprun OUT --prompt "Hi" --chat            (a tp=1 conversion)
 *   mpirun -np 2 tprun OUT --serve --port 8000
 *
 * Each process finds its rank from the launcher's environment (or --rank),
 * loads only its own rank file, and joins the others through the comm
 * backend.  Rank 0 prints; the other ranks stay silent unless they fail. */
#include <cJSON.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "runtime.h"

#define DEFAULT_MAX_NEW 256
#define DEFAULT_CONTEXT_CAP 4096
#define DEFAULT_PORT 8000
#define DEFAULT_MAX_BATCH 8
#define DEFAULT_MAX_QUEUE 64

static const char usage[] =
    "usage: tprun OUT [options]\n"
    "Loads one rank of a tpconvert conversion and runs the tensor-parallel forward pass.\n"
    "OUT is a directory written by tpconvert (--format tpshard), or a node bundle (.tar)\n"
    "of tpbundle.  Sampling defaults come from the model's generation_config.json.\n"
    "\n"
    "What to run (one of):\n"
    "  --prompt TEXT             encode TEXT with the model's tokenizer\n"
    "  --prompt-ids 1,2,3        token ids as given (no tokenizer needed)\n"
    "  -i, --interactive         a conversation on stdin, a line a user turn, rendered with\n"
    "                            the model's chat template (as --chat); /reset\n"
    "                            starts over; a line of invalid UTF-8 is skipped\n"
    "  --load-only               load, print bytes, seconds and GB/s on stderr, exit\n"
    "  --serve                   an OpenAI-compatible HTTP server on rank 0 (every rank runs\n"
    "                            the batched steps): /v1/completions, /v1/chat/completions,\n"
    "                            /v1/models, /health, /metrics; SIGTERM or SIGINT stops it\n"
    "Serving (with --serve):\n"
    "  --host ADDR               address to listen on (default 127.0.0.1)\n"
    "  --port N                  port (default 8000)\n"
    "  --max-batch N             sequence slots run together, each with a KV cache of\n"
    "                            --max-seq tokens (default 8)\n"
    "  --max-queue N             requests waiting for a slot; more get 429 (default 64)\n"
    "  --max-step-tokens N       prompt tokens a step prefills beside the running requests'\n"
    "                            decode tokens (default 256): lower bounds their inter-token\n"
    "                            latency, higher runs bigger products; the same on every rank\n"
    "  --served-model-name NAME  the \"model\" requests name (default: OUT's directory name)\n"
    "Generation:\n"
    "  --chat                    --prompt as a user turn in the model's own chat template\n"
    "                            (chat_template.jinja or tokenizer_config.json's, with the\n"
    "                            generation prompt; ChatML when the model has none)\n"
    "  --max-new-tokens N        tokens to generate, >= 0 (default: generation_config's\n"
    "                            max_new_tokens, else 256)\n"
    "  --temperature T           0 is greedy (default: generation_config's, greedy\n"
    "                            when it has no do_sample true)\n"
    "  --top-k K                 0 is off (default: generation_config's, else 50)\n"
    "  --top-p P                 in (0, 1], 1 is off (default: generation_config's, else 1)\n"
    "  --repetition-penalty X    > 0, transformers' rule, 1 is off (default:\n"
    "                            generation_config's repetition_penalty, else 1)\n"
    "  --seed S                  sampling seed (default: from the clock; rank 0's for all)\n"
    "  --ignore-eos              do not stop at an end-of-sequence token\n"
    "  --max-seq N               KV cache length (default: min(max_position_embeddings, 4096));\n"
    "                            with --serve: per slot, a request's prompt and answer together\n"
    "Output:\n"
    "  --json                    one JSON object: prompt and generated ids, text, timings\n"
    "  --logits                  with --json: the last prompt position's logits\n"
    "  --verbose                 load and speed lines on stderr\n"
    "  --quiet                   no progress bar\n"
    "Ranks and devices:\n"
    "  --rank R                  this process's rank (default: from RANK, OMPI_COMM_WORLD_RANK,\n"
    "                            PMI_RANK or SLURM_PROCID; else 0)\n"
    "  --comm auto|single|tcp|mpi|nccl\n"
    "                            the ranks' backend (default auto: mpi under mpirun, else tcp;\n"
    "                            single for one rank); tcp: rank 0 listens on\n"
    "                            MASTER_ADDR:MASTER_PORT (default 127.0.0.1:29500)\n"
    "  --timeout S               seconds a collective waits for the others (default 60)\n"
    "  --threads N               CPU threads (default: the cores / ranks on this node)\n"
    "  --cpu-kernels NAME        the CPU matrix kernels: amx, avx512, avx2, portable or auto\n"
    "                            (default auto: the best this CPU runs; --verbose names it)\n"
    "  --no-verify               skip the checksums at load\n"
    "  --device cpu|cuda         where the forward pass runs (default cpu)\n"
    "  --gpu N                   with --device cuda: the GPU (default: LOCAL_RANK's)\n"
    "  --no-graph                with --device cuda: no CUDA graph for decode steps\n"
    "  -h, --help                this help\n"
    "\n"
    "Examples:\n"
    "  tprun out/ --prompt \"Hello\" --chat --max-new-tokens 64\n"
    "  tprun out/ --prompt-ids 9707,11 --temperature 0 --json\n"
    "  torchrun --nproc-per-node 2 --no-python tprun out/ -i\n"
    "  mpirun -np 4 tprun out/ --prompt \"Hi\" --repetition-penalty 1.1\n"
    "  mpirun -np 2 tprun out/ --serve --port 8000 --max-batch 16 --served-model-name qwen3\n"
    "    curl localhost:8000/v1/completions -d '{\"prompt\": \"Hello\", \"max_tokens\": 16}'\n";

typedef struct options {
    const char *out;
    int rank;                  /* -1: from the environment */
    const char *comm;
    double timeout_s;
    const char *prompt;
    const char *prompt_ids;
    bool chat, interactive, json, logits, no_verify, load_only, verbose, quiet, ignore_eos;
    bool serve;
    const char *host;          /* --serve: listen address */
    int port, max_batch, max_queue, max_step_tokens;
    const char *served_model_name;   /* NULL: OUT's directory name */
    const char *serve_flag;    /* the last --serve-only flag given, for "add --serve" */
    bool no_graph;             /* cuda: no CUDA graph for decode steps */
    const char *cpu_kernels;   /* NULL: auto */
    int max_new_tokens;        /* -1: generation_config or DEFAULT_MAX_NEW */
    float temperature;         /* < 0: from generation_config */
    int top_k;                 /* < 0: from generation_config */
    float top_p;               /* < 0: from generation_config */
    float repetition_penalty;  /* < 0: from generation_config, else 1 (off) */
    bool has_seed;
    uint64_t seed;
    int threads;               /* 0: cores / ranks on this node */
    int max_seq;               /* 0: min(max_position, 4096) */
    const char *device;        /* "cpu" (default) or "cuda" */
    int gpu;                   /* --gpu N; -1: LOCAL_RANK's (or the nccl comm's) */
} options;

/* ------------------------------------------------------------ the run state */

typedef struct run {
    options o;
    tp_launch launch;
    tp_comm *comm;
    tp_manifest manifest;
    bool have_manifest;
    tp_loaded_rank lr;
    bool have_lr;
    tp_model *model;
    tp_tokenizer *tok;
    /* --chat / -i: the model's chat template, else ChatML (chat_setup) */
    tp_template *chat_template;
    char *bos_token, *eos_token;
    int context;
    double t_start;            /* process start (tp_now), for --load-only */
} run;

static void cleanup(run *r)
{
    tp_tokenizer_free(r->tok);
    tp_template_free(r->chat_template);
    free(r->bos_token);
    free(r->eos_token);
    tp_model_free(r->model);
    if (r->have_lr)
        tp_loaded_rank_free(&r->lr);
    if (r->have_manifest)
        tp_manifest_free(&r->manifest);
}

static int my_rank(const run *r) { return r->comm ? r->comm->rank : (r->launch.rank > 0 ? r->launch.rank : 0); }

/* Prints the error and ends this rank.  A shared error is one every rank
 * meets the same way (a bad flag, a prompt too long): rank 0 alone prints it
 * and the ranks close cleanly.  Any other error may be this rank's alone:
 * it prints, and the job is torn down so that nobody waits for it. */
static void die(run *r, const tp_err *err, bool shared)
{
    if (!shared || my_rank(r) == 0) {
        fflush(stdout);
        fprintf(stderr, "tprun: %s\n", err->msg);
    }
    if (shared)
        tp_comm_close(r->comm);
    else
        tp_comm_abort(r->comm, 1);
    r->comm = NULL;
    cleanup(r);
    exit(1);
}

static void die_msg(run *r, bool shared, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void die_msg(run *r, bool shared, const char *fmt, ...)
{
    tp_err err;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err.msg, sizeof err.msg, fmt, ap);
    va_end(ap);
    die(r, &err, shared);
}

/* ------------------------------------------------------------ flag parsing */

/* Bad flags end the program (on every rank alike) with status 2. */
#define usage_error(...) exit(cli_usage_error(__VA_ARGS__))

static long parse_long(const char *flag, const char *s, long lo, long hi)
{
    long v;
    if (!cli_long(s, lo, hi, &v))
        exit(cli_arg_error("%s %s: expected an integer from %ld to %ld", flag, s, lo, hi));
    return v;
}

static double parse_double(const char *flag, const char *s, double lo, double hi)
{
    double v;
    if (!cli_double(s, lo, hi, &v))
        exit(cli_arg_error("%s %s: expected a number from %g to %g", flag, s, lo, hi));
    return v;
}

static void parse_args(int argc, char **argv, options *o)
{
    *o = (options){ .rank = -1, .comm = "auto", .timeout_s = 60, .max_new_tokens = -1,
                    .temperature = -1, .top_k = -1, .top_p = -1, .repetition_penalty = -1, .device = "cpu", .gpu = -1,
                    .host = "127.0.0.1", .port = DEFAULT_PORT, .max_batch = DEFAULT_MAX_BATCH,
                    .max_queue = DEFAULT_MAX_QUEUE };
    cli_init_text("tprun", usage);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *val;
#define TAKE() ((val = cli_value(argc, argv, &i)) ? val : (usage_error("%s needs a value", a), ""))
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(usage, stdout);
            exit(0);
        } else if (!strcmp(a, "--rank")) {
            o->rank = (int)parse_long(a, TAKE(), 0, 1000000);
        } else if (!strcmp(a, "--comm")) {
            o->comm = TAKE();
        } else if (!strcmp(a, "--timeout")) {
            o->timeout_s = parse_double(a, TAKE(), 0.001, 1e9);
        } else if (!strcmp(a, "--prompt")) {
            o->prompt = TAKE();
        } else if (!strcmp(a, "--prompt-ids")) {
            o->prompt_ids = TAKE();
        } else if (!strcmp(a, "--chat")) {
            o->chat = true;
        } else if (!strcmp(a, "-i") || !strcmp(a, "--interactive")) {
            o->interactive = true;
        } else if (!strcmp(a, "--max-new-tokens")) {
            o->max_new_tokens = (int)parse_long(a, TAKE(), 0, INT_MAX);
        } else if (!strcmp(a, "--temperature")) {
            o->temperature = (float)parse_double(a, TAKE(), 0, 1000);
        } else if (!strcmp(a, "--top-k")) {
            o->top_k = (int)parse_long(a, TAKE(), 0, INT_MAX);
        } else if (!strcmp(a, "--top-p")) {
            o->top_p = (float)parse_double(a, TAKE(), 1e-9, 1);
        } else if (!strcmp(a, "--repetition-penalty")) {
            o->repetition_penalty = (float)parse_double(a, TAKE(), 1e-6, 1e6);
        } else if (!strcmp(a, "--seed")) {
            const char *s = TAKE();
            if (!cli_size(s, 0, &o->seed))
                usage_error("--seed %s: expected a non-negative integer", s);
            o->has_seed = true;
        } else if (!strcmp(a, "--threads")) {
            o->threads = (int)parse_long(a, TAKE(), 1, 4096);
        } else if (!strcmp(a, "--device")) {
            o->device = TAKE();
            if (strcmp(o->device, "cpu") != 0 && strcmp(o->device, "cuda") != 0)
                usage_error("--device %s: expected cpu or cuda", o->device);
        } else if (!strcmp(a, "--gpu")) {
            o->gpu = (int)parse_long(a, TAKE(), 0, 1024);
        } else if (!strcmp(a, "--max-seq")) {
            o->max_seq = (int)parse_long(a, TAKE(), 1, INT_MAX);
        } else if (!strcmp(a, "--json")) {
            o->json = true;
        } else if (!strcmp(a, "--logits")) {
            o->logits = true;
        } else if (!strcmp(a, "--ignore-eos")) {
            o->ignore_eos = true;
        } else if (!strcmp(a, "--no-verify")) {
            o->no_verify = true;
        } else if (!strcmp(a, "--no-graph")) {
            o->no_graph = true;
        } else if (!strcmp(a, "--cpu-kernels")) {
            o->cpu_kernels = TAKE();
        } else if (!strcmp(a, "--serve")) {
            o->serve = true;
        } else if (!strcmp(a, "--host")) {
            o->serve_flag = a;
            o->host = TAKE();
        } else if (!strcmp(a, "--port")) {
            o->serve_flag = a;
            o->port = (int)parse_long(a, TAKE(), 1, 65535);
        } else if (!strcmp(a, "--max-batch")) {
            o->serve_flag = a;
            o->max_batch = (int)parse_long(a, TAKE(), 1, 4096);
        } else if (!strcmp(a, "--max-queue")) {
            o->serve_flag = a;
            o->max_queue = (int)parse_long(a, TAKE(), 1, 1000000);
        } else if (!strcmp(a, "--max-step-tokens")) {
            o->serve_flag = a;
            o->max_step_tokens = (int)parse_long(a, TAKE(), 1, 1000000);
        } else if (!strcmp(a, "--served-model-name")) {
            o->serve_flag = a;
            o->served_model_name = TAKE();
            if (!o->served_model_name[0])
                usage_error("--served-model-name: the name is empty");
        } else if (!strcmp(a, "--load-only")) {
            o->load_only = true;
        } else if (!strcmp(a, "--verbose")) {
            o->verbose = true;
        } else if (!strcmp(a, "--quiet")) {
            o->quiet = true;
        } else if (a[0] == '-' && a[1]) {
            usage_error("unknown flag %s", a);
        } else if (!o->out) {
            o->out = a;
        } else {
            usage_error("unexpected argument %s (one OUT only)", a);
        }
#undef TAKE
    }
    if (!o->out)
        usage_error("missing OUT (a converted directory or node bundle)");
    if (o->prompt && o->prompt_ids)
        usage_error("give --prompt or --prompt-ids, not both");
    if (o->serve && (o->prompt || o->prompt_ids || o->interactive || o->json || o->load_only || o->chat))
        usage_error("--serve takes its prompts over HTTP: no --prompt, --prompt-ids, --interactive, --json, "
                    "--chat or --load-only");
    if (!o->serve && o->serve_flag)
        usage_error("%s is a --serve flag: add --serve", o->serve_flag);
    if (o->interactive && (o->prompt || o->prompt_ids || o->json))
        usage_error("--interactive reads the prompts from stdin: it takes no --prompt, --prompt-ids or --json");
    if (!o->interactive && !o->load_only && !o->serve && !o->prompt && !o->prompt_ids)
        usage_error("nothing to do: give --prompt TEXT, --prompt-ids 1,2,3, --interactive, --serve or --load-only");
    if (o->chat && o->prompt_ids)
        usage_error("--chat wraps text: use it with --prompt");
    if (o->logits && !o->json)
        usage_error("--logits goes into the --json output: add --json");
    if (o->verbose && o->quiet)
        usage_error("--verbose and --quiet contradict each other");
    /* cuda-only flags would be ignored on the cpu: say so rather than run */
    if (o->gpu >= 0 && strcmp(o->device, "cuda") != 0)
        usage_error("--gpu %d picks a CUDA device: it needs --device cuda (the device is %s)", o->gpu, o->device);
    if (o->no_graph && strcmp(o->device, "cuda") != 0)
        usage_error("--no-graph is about CUDA graphs: it needs --device cuda (the device is %s)", o->device);
    if (o->cpu_kernels && strcmp(o->device, "cpu") != 0)
        usage_error("--cpu-kernels picks the CPU's matrix kernels: it needs --device cpu (the device is %s)",
                    o->device);
}

/* "1,2,3" -> ids.  Every id must be a non-negative integer. */
static int parse_id_list(const char *s, int32_t **ids, int *n, tp_err *err)
{
    size_t cap = 16, len = 0;
    int32_t *v = malloc(cap * sizeof *v);
    const char *p = s;
    while (v) {
        while (*p == ' ')
            p++;
        char *end;
        errno = 0;
        long x = strtol(p, &end, 10);
        if (errno || end == p || x < 0 || x > INT32_MAX) {
            free(v);
            return tp_errorf(err, "--prompt-ids %s: \"%.*s\" is not a token id", s, (int)strcspn(p, ","), p);
        }
        if (len == cap) {
            int32_t *bigger = realloc(v, (cap *= 2) * sizeof *v);
            if (!bigger)
                break;
            v = bigger;
        }
        v[len++] = (int32_t)x;
        p = end;
        while (*p == ' ')
            p++;
        if (*p == '\0') {
            *ids = v;
            *n = (int)len;
            return 0;
        }
        if (*p != ',') {
            free(v);
            return tp_errorf(err, "--prompt-ids %s: expected a comma at \"%s\"", s, p);
        }
        p++;
    }
    free(v);
    return tp_errorf(err, "out of memory");
}

/* ------------------------------------------------------------ setup */

static int cores(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

/* The world size must be the manifest's tp. */
static void check_world(run *r)
{
    tp_launch *l = &r->launch;
    int tp = r->manifest.tp;
    if (l->world == 0) {   /* --rank alone */
        l->world = tp;
        l->local_world = tp;
        if (l->rank >= tp)
            die_msg(r, false, "--rank %d: %s was converted for tp=%d (ranks 0 to %d)", l->rank, r->o.out, tp, tp - 1);
    }
    if (l->world == tp)
        return;
    if (l->world_source)
        die_msg(r, true, "launched with %s=%d but %s was converted for tp=%d", l->world_source, l->world, r->o.out, tp);
    die_msg(r, true, "launched as a single process but %s was converted for tp=%d: start %d ranks, e.g. "
            "torchrun --nproc-per-node %d --no-python tprun %s ..., or mpirun -np %d tprun %s ...",
            r->o.out, tp, tp, tp, r->o.out, tp, r->o.out);
}

/* After loading, all ranks meet once.  Loading a large rank file can take
 * much longer than a collective, so this one wait is more generous; a rank
 * that failed to load has already torn the job down. */
static void wait_for_loaded_ranks(run *r)
{
    tp_err err;
    double saved = r->comm->timeout_s;
    r->comm->timeout_s = saved * 10 > 600 ? saved * 10 : 600;
    if (r->comm->ops->barrier(r->comm, &err))
        die(r, &err, false);
    r->comm->timeout_s = saved;
}

static bool on_cuda(const run *r) { return strcmp(r->o.device, "cuda") == 0; }

/* The conversion's tokenizer.json, if it has one; its text is freed once
 * parsed (11 MB for Qwen3's). */
static void load_tokenizer(run *r)
{
    tp_err err;
    if (!r->lr.tokenizer_json)
        return;
    if (tp_tokenizer_load_mem(&r->tok, r->lr.tokenizer_json, r->lr.tokenizer_json_len, "tokenizer.json", &err))
        die(r, &err, true);
    free(r->lr.tokenizer_json);
    r->lr.tokenizer_json = NULL;
    r->lr.tokenizer_json_len = 0;
}

/* For the cuda device the rank is only opened here: the model streams the
 * tensors to the GPU (decoded and checked on the way, tp_load_stream), so
 * nothing is decoded twice and no host copy of the weights is made. */
static void load(run *r)
{
    tp_err err;
    /* The CPU opens the rank first too, to parse the tokenizer before the
     * weights are touched: its transient memory (~75 MB for Qwen3's) then
     * does not stack on them in the peak RSS. */
    tp_load_opts lo = { .verify = !r->o.no_verify, .threads = r->o.threads, .quiet = r->o.quiet || my_rank(r) != 0,
                        .defer_tensors = true };
    if (tp_load_rank(&r->lr, r->o.out, r->launch.rank, &lo, &err))
        die(r, &err, false);
    r->have_lr = true;
    if (!r->o.load_only)   /* --load-only measures the weights alone */
        load_tokenizer(r);
    if (!on_cuda(r) && tp_loaded_rank_materialise(&r->lr, &err)) {
        r->have_lr = false;
        die(r, &err, false);
    }
    wait_for_loaded_ranks(r);
    if (r->o.verbose && my_rank(r) == 0 && r->lr.deferred) {
        fprintf(stderr, "tprun: opened rank 0 of %d from %s: %.1f MB (%.1f MB stored) in %.3f s; the tensors "
                "stream to the device with the model; comm %s, %d threads\n", r->comm->world, r->o.out,
                r->lr.raw_bytes / 1e6, r->lr.stored_bytes / 1e6, r->lr.load_seconds, r->comm->ops->name,
                r->o.threads);
    } else if (r->o.verbose && my_rank(r) == 0) {
        double s = r->lr.load_seconds > 0 ? r->lr.load_seconds : 1e-9;
        fprintf(stderr, "tprun: loaded rank 0 of %d from %s: %.1f MB (%.1f MB stored) in %.3f s, %.2f GB/s; "
                "comm %s, %d threads\n", r->comm->world, r->o.out, r->lr.raw_bytes / 1e6, r->lr.stored_bytes / 1e6,
                r->lr.load_seconds, r->lr.raw_bytes / s / 1e9, r->comm->ops->name, r->o.threads);
    }
}

static void create_model(run *r)
{
    tp_err err;
    tp_model_config cfg;
    const char *cfg_text = r->manifest.config_json ? r->manifest.config_json : r->lr.config_json;
    if (!cfg_text || tp_model_config_parse(&cfg, cfg_text, &err))
        die_msg(r, true, "%s: %s", r->o.out, cfg_text ? err.msg : "config.json: missing");   /* err.msg names config.json */
    int max_len = tp_config_max_length(&cfg);   /* dynamic RoPE: not capped by max_position_embeddings */
    r->context = r->o.max_seq > 0 ? r->o.max_seq : (max_len < DEFAULT_CONTEXT_CAP ? max_len : DEFAULT_CONTEXT_CAP);
    if (r->o.max_seq > max_len)
        die_msg(r, true, "--max-seq %d is more than the model's max_position_embeddings (%d)", r->o.max_seq,
                cfg.max_position);
    char device[32];
    if (r->o.gpu >= 0 && !strcmp(r->o.device, "cuda"))
        snprintf(device, sizeof device, "cuda:%d", r->o.gpu);
    else
        snprintf(device, sizeof device, "%s", r->o.device);
    tp_model_opts mo = { .max_seq = r->context, .threads = r->o.threads, .device = device,
                         .no_graph = r->o.no_graph, .cpu_kernels = r->o.cpu_kernels, .slots = r->o.serve ? r->o.max_batch : 1 };
    if (tp_model_create(&r->model, &r->lr, r->comm, &mo, &err))
        die(r, &err, false);
    if (r->o.verbose && my_rank(r) == 0)
        fprintf(stderr, "tprun: model on %s\n", tp_model_device_info(r->model));
    /* The cuda model holds device copies: the deferred rank's mapping is not
     * needed any more.  The CPU model reads its weights in place from r->lr
     * (freed after the model, in cleanup). */
    if (on_cuda(r))
        tp_loaded_rank_drop_tensors(&r->lr);
    /* Ids the model has and the tokenizer lacks decode as nothing. */
    if (r->tok)
        tp_tokenizer_set_model_vocab(r->tok, (size_t)cfg.vocab);
}

/* Sampling: generation_config.json's defaults (do_sample false means
 * greedy, as in transformers), then the flags. */
static void sampler_setup(run *r, const tp_gen_config *g, tp_sampler_opts *s)
{
    bool sample = g->has_do_sample && g->do_sample;
    s->temperature = sample ? (g->has_temperature ? g->temperature : 1.0f) : 0.0f;
    s->top_k = g->has_top_k ? g->top_k : 50;   /* transformers' defaults */
    s->top_p = g->has_top_p ? g->top_p : 1.0f;
    if (r->o.temperature >= 0)
        s->temperature = r->o.temperature;
    if (r->o.top_k >= 0)
        s->top_k = r->o.top_k;
    if (r->o.top_p >= 0)
        s->top_p = r->o.top_p;
    s->repetition_penalty = r->o.repetition_penalty >= 0 ? r->o.repetition_penalty
                            : g->has_repetition_penalty ? g->repetition_penalty : 1.0f;
    /* Every rank must draw with the same seed: rank 0 picks one. */
    uint64_t seed = r->o.has_seed ? r->o.seed : ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid();
    tp_err err;
    if (r->comm->ops->broadcast(r->comm, &seed, sizeof seed, 0, &err))
        die(r, &err, false);
    s->seed = seed;
}

/* Rank 0 decides the prompt (the ranks' arguments should agree, but the
 * one that prints is the one that counts); the others receive it. */
static void share_ids(run *r, int32_t **ids, int *n, tp_err *err_out)
{
    tp_err err;
    int32_t count = my_rank(r) == 0 ? *n : 0;
    if (r->comm->ops->broadcast(r->comm, &count, sizeof count, 0, &err))
        die(r, &err, false);
    if (my_rank(r) != 0) {
        free(*ids);
        *ids = malloc(((size_t)count + 1) * sizeof **ids);
        if (!*ids)
            die_msg(r, false, "out of memory for %d prompt ids", (int)count);
        *n = count;
    }
    if (count > 0 && r->comm->ops->broadcast(r->comm, *ids, (size_t)count * sizeof **ids, 0, &err))
        die(r, &err, false);
    (void)err_out;
}

/* ------------------------------------------------------------ chat template */

/* --chat and -i: the model's own chat template (every rank reads the same
 * copied files, so a bad template stops them all alike), else ChatML. */
static void chat_setup(run *r)
{
    tp_err err;
    if (tp_template_load(&r->chat_template, &r->bos_token, &r->eos_token, &r->lr, &err))
        die_msg(r, true, "%s: %s", r->o.out, err.msg);
    bool own = r->chat_template != NULL;
    if (!own && tp_template_chatml(&r->chat_template, &err))
        die(r, &err, true);
    if (r->o.verbose && my_rank(r) == 0)
        fprintf(stderr, "tprun: chat template: %s\n", own ? "the model's" : "ChatML (the model has none)");
}

/* Appends {"role": "user", "content": text}.  The text must be valid
 * UTF-8 without NUL bytes ("invalid UTF-8 at byte K of your input"). */
static int user_turn(cJSON *messages, const char *text, size_t len, tp_err *err)
{
    size_t bad = tp_utf8_first_invalid(text, len);
    if (bad != len)
        return tp_errorf(err, "invalid UTF-8 at byte %zu of your input", bad);
    if (memchr(text, '\0', len))
        return tp_errorf(err, "a NUL byte at byte %zu of your input", (size_t)((const char *)memchr(text, '\0', len) - text));
    cJSON *m = cJSON_CreateObject();
    if (!m || !cJSON_AddStringToObject(m, "role", "user") || !cJSON_AddStringToObject(m, "content", text) ||
        !cJSON_AddItemToArray(messages, m)) {
        cJSON_Delete(m);
        return tp_errorf(err, "out of memory for a chat turn of %zu bytes", len);
    }
    return 0;
}

/* The conversation rendered for the model's next answer. */
static int chat_text(run *r, const cJSON *messages, char **text, size_t *len, tp_err *err)
{
    return tp_chat_render(r->chat_template, r->bos_token, r->eos_token, messages, true, text, len, err);
}

/* The prompt ids, on rank 0 (other ranks get them from share_ids). */
static void prompt_ids(run *r, int32_t **ids, int *n)
{
    tp_err err;
    *ids = NULL;
    *n = 0;
    if (my_rank(r) == 0) {
        if (r->o.prompt_ids) {
            if (parse_id_list(r->o.prompt_ids, ids, n, &err))
                die(r, &err, true);
        } else {
            if (!r->tok)
                die_msg(r, true, "%s has no tokenizer.json, so --prompt cannot be encoded: use --prompt-ids 1,2,3",
                        r->o.out);
            char *text = NULL;
            size_t text_len = strlen(r->o.prompt), nn = 0;
            if (r->o.chat) {
                cJSON *messages = cJSON_CreateArray();
                if (!messages || user_turn(messages, r->o.prompt, text_len, &err) ||
                    chat_text(r, messages, &text, &text_len, &err))
                    die_msg(r, true, "--prompt: %s", err.msg);
                cJSON_Delete(messages);
            } else if (!(text = strdup(r->o.prompt))) {
                die_msg(r, false, "out of memory");
            }
            int rc = tp_tokenizer_encode(r->tok, text, text_len, ids, &nn, &err);
            free(text);
            if (rc)
                die(r, &err, true);
            *n = (int)nn;
        }
    } else if (!r->o.prompt_ids && !r->tok) {
        die_msg(r, true, "no tokenizer");   /* rank 0 says it */
    }
    share_ids(r, ids, n, &err);
}

/* ------------------------------------------------------------ streaming */

typedef struct stream {
    run *r;
    tp_detok *detok;     /* NULL: print ids */
    bool print;          /* rank 0, not --json */
} stream;

static int on_token(int32_t id, void *arg, tp_err *err)
{
    stream *s = arg;
    if (!s->print)
        return 0;
    if (s->detok) {
        char *text = NULL;
        if (tp_detok_push(s->detok, id, &text, err))
            return -1;
        fputs(text, stdout);
        free(text);
    } else {
        printf("%d ", (int)id);
    }
    fflush(stdout);
    return 0;
}

static void stream_end(stream *s)
{
    if (!s->print)
        return;
    if (s->detok) {
        char *rest = tp_detok_flush(s->detok);
        if (rest)
            fputs(rest, stdout);
        free(rest);
    }
    putchar('\n');
    fflush(stdout);
}

/* Text mode says why an answer ended early at a full context (--json has
 * "stop": "context"). */
static void report_context_full(const run *r, const tp_gen_result *g)
{
    if (g->stopped_context && my_rank(r) == 0 && !r->o.json)
        fprintf(stderr, "tprun: stopped: context full (%d tokens)\n", r->context);
}

static void report_speed(const run *r, const tp_gen_result *g)
{
    if (!r->o.verbose || my_rank(r) != 0)
        return;
    fprintf(stderr, "tprun: prefill %d tokens in %.3f s (%.1f tokens/s); decode %d tokens in %.3f s (%.1f tokens/s)%s\n",
            g->n_prefill, g->prefill_s, g->prefill_s > 0 ? g->n_prefill / g->prefill_s : 0.0, g->n_decode, g->decode_s,
            g->decode_s > 0 ? g->n_decode / g->decode_s : 0.0,
            g->stopped_eos ? ", stopped at end of sequence" : g->stopped_context ? ", stopped: context full" : "");
}

/* ------------------------------------------------------------ JSON */

static cJSON *id_array(const int32_t *ids, size_t n)
{
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; a && i < n; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber(ids[i]));
    return a;
}

static cJSON *rate(double count, double seconds)
{
    return seconds > 0 && count > 0 ? cJSON_CreateNumber(count / seconds) : cJSON_CreateNull();
}

static void print_json(run *r, const int32_t *ids, int n, const tp_gen_result *g, const float *logits, int vocab)
{
    cJSON *root = cJSON_CreateObject();
    cJSON_AddItemToObject(root, "prompt_ids", id_array(ids, (size_t)n));
    cJSON_AddItemToObject(root, "generated_ids", id_array(g->ids, g->n_ids));
    char *text = NULL;
    tp_err err;
    if (r->tok && tp_tokenizer_decode(r->tok, g->ids, g->n_ids, true, &text, &err))
        die(r, &err, true);
    if (text)
        cJSON_AddStringToObject(root, "text", text);
    else
        cJSON_AddNullToObject(root, "text");
    free(text);
    cJSON *t = cJSON_AddObjectToObject(root, "timings");
    cJSON_AddNumberToObject(t, "load_s", r->lr.load_seconds);
    cJSON_AddItemToObject(t, "prefill_tokens_per_s", rate(g->n_prefill, g->prefill_s));
    cJSON_AddItemToObject(t, "decode_tokens_per_s", rate(g->n_decode, g->decode_s));
    cJSON_AddStringToObject(root, "stop", g->stopped_eos ? "eos" : g->stopped_context ? "context" : "max_new_tokens");
    if (logits) {
        cJSON *a = cJSON_CreateArray();
        for (int i = 0; a && i < vocab; i++)
            cJSON_AddItemToArray(a, isfinite(logits[i]) ? cJSON_CreateNumber(logits[i]) : cJSON_CreateNull());
        cJSON_AddItemToObject(root, "logits", a);
    }
    char *s = cJSON_PrintUnformatted(root);
    if (!s)
        die_msg(r, false, "out of memory printing JSON");
    puts(s);
    fflush(stdout);
    free(s);
    cJSON_Delete(root);
}

/* ------------------------------------------------------------ one prompt */

static void run_once(run *r, const tp_gen_opts *base, tp_rng *rng)
{
    tp_err err;
    int32_t *ids;
    int n;
    prompt_ids(r, &ids, &n);
    if (tp_gen_check_prompt(r->model, ids, n, r->context, &err))
        die(r, &err, true);
    int vocab = tp_model_get_config(r->model)->vocab;
    float *logits = r->o.logits ? malloc((size_t)vocab * sizeof *logits) : NULL;
    if (r->o.logits && !logits)
        die_msg(r, false, "out of memory");
    stream s = { .r = r, .print = my_rank(r) == 0 && !r->o.json };
    if (s.print && r->tok)
        s.detok = tp_detok_new(r->tok, true);
    tp_gen_opts go = *base;
    go.on_token = on_token;
    go.arg = &s;
    go.prompt_logits = logits;
    tp_gen_result g;
    if (tp_generate(r->model, r->comm, rng, ids, n, &go, &g, &err))
        die(r, &err, false);
    stream_end(&s);
    tp_detok_free(s.detok);
    report_context_full(r, &g);
    if (r->o.json && my_rank(r) == 0)
        print_json(r, ids, n, &g, logits, vocab);
    report_speed(r, &g);
    tp_gen_result_free(&g);
    free(logits);
    free(ids);
}

/* ------------------------------------------------------------ interactive */

enum { TURN_TEXT = 1, TURN_REPREFILL = 2, TURN_RESET = 3, TURN_END = 4 };

/* Rank 0's view of the conversation: its messages, and the text that the
 * KV cache holds (with the pending id of the last answer, not in the cache
 * yet) so that a turn whose rendering extends it feeds only the rest. */
typedef struct chat_state {
    cJSON *messages;
    char *cached;           /* rendered prompt + the answer's text, specials kept */
    size_t cached_len;
    char *prompt;           /* this turn's rendering, until its answer is in */
    size_t prompt_len;
    int32_t pending;
} chat_state;

static void chat_clear(chat_state *c)
{
    cJSON_Delete(c->messages);
    c->messages = cJSON_CreateArray();
    free(c->cached);
    c->cached = strdup("");
    c->cached_len = 0;
    c->pending = -1;
}

/* Rank 0 reads lines until one is a command or a turn that renders, and
 * turns it into the ids to feed.  The whole conversation is rendered with
 * the chat template each turn: when the text extends what the cache holds,
 * the ids are the pending id and the encoded rest (TURN_TEXT); else the
 * whole text, after a reset (TURN_REPREFILL: e.g. Qwen3 drops the thinking
 * of earlier answers).  A line that is not valid UTF-8, or that the template
 * refuses, is reported and skipped: the conversation goes on. */
static int read_turn(run *r, chat_state *c, long *line_no, int32_t **ids, int *n)
{
    tp_err err;
    char *line = NULL, *text = NULL;
    size_t cap = 0, text_len = 0;
    for (;;) {
        if (isatty(STDIN_FILENO)) {
            fputs("> ", stderr);
            fflush(stderr);
        }
        ssize_t len = getline(&line, &cap, stdin);
        if (len < 0) {
            free(line);
            return TURN_END;
        }
        ++*line_no;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        if (!strcmp(line, "/reset")) {
            free(line);
            return TURN_RESET;
        }
        if (user_turn(c->messages, line, (size_t)len, &err) == 0) {
            if (chat_text(r, c->messages, &text, &text_len, &err) == 0)
                break;
            cJSON_DeleteItemFromArray(c->messages, cJSON_GetArraySize(c->messages) - 1);
        }
        fprintf(stderr, "tprun: line %ld: %s; skipped\n", *line_no, err.msg);
    }
    free(line);
    bool extends = text_len >= c->cached_len && !memcmp(text, c->cached, c->cached_len);
    size_t from = extends ? c->cached_len : 0;
    int32_t *enc = NULL;
    size_t ne = 0;
    if (tp_tokenizer_encode(r->tok, text + from, text_len - from, &enc, &ne, &err))
        die(r, &err, false);
    int extra = extends && c->pending >= 0 ? 1 : 0;
    *ids = malloc((ne + 1) * sizeof **ids);
    if (!*ids)
        die_msg(r, false, "out of memory");
    if (extra)
        (*ids)[0] = c->pending;
    memcpy(*ids + extra, enc, ne * sizeof *enc);
    free(enc);
    *n = (int)ne + extra;
    free(c->prompt);
    c->prompt = text;
    c->prompt_len = text_len;
    return extends ? TURN_TEXT : TURN_REPREFILL;
}

/* Rank 0, after an answer: the answer joins the messages (as the user saw
 * it, special tokens left out) and the cache's text becomes this turn's
 * prompt and the answer with its special tokens (the end of turn). */
static void answer_done(run *r, chat_state *c, const tp_gen_result *g)
{
    tp_err err;
    char *shown = NULL, *raw = NULL;
    if (tp_tokenizer_decode(r->tok, g->ids, g->n_ids, true, &shown, &err) ||
        tp_tokenizer_decode(r->tok, g->ids, g->n_ids, false, &raw, &err))
        die(r, &err, false);
    cJSON *m = cJSON_CreateObject();
    if (!m || !cJSON_AddStringToObject(m, "role", "assistant") || !cJSON_AddStringToObject(m, "content", shown) ||
        !cJSON_AddItemToArray(c->messages, m))
        die_msg(r, false, "out of memory");
    size_t n_raw = strlen(raw);
    char *cached = malloc(c->prompt_len + n_raw + 1);
    if (!cached)
        die_msg(r, false, "out of memory");
    memcpy(cached, c->prompt, c->prompt_len);
    memcpy(cached + c->prompt_len, raw, n_raw + 1);
    free(c->cached);
    c->cached = cached;
    c->cached_len = c->prompt_len + n_raw;
    c->pending = g->pending;
    free(shown);
    free(raw);
}

static void interactive(run *r, const tp_gen_opts *base, tp_rng *rng)
{
    tp_err err;
    if (!r->tok)
        die_msg(r, true, "%s has no tokenizer.json: --interactive needs one", r->o.out);
    chat_state chat = {0};
    if (my_rank(r) == 0) {
        chat_clear(&chat);
        if (!chat.messages || !chat.cached)
            die_msg(r, false, "out of memory");
    }
    long line_no = 0;   /* lines read from stdin, for messages */
    /* Every id in the cache: the repetition penalty covers them, as it
     * would the whole chat fed again to transformers. */
    int32_t *conv = NULL;
    size_t n_conv = 0;
    for (;;) {
        int32_t *ids = NULL;
        int n = 0;
        int32_t cmd = 0;
        if (my_rank(r) == 0)
            cmd = read_turn(r, &chat, &line_no, &ids, &n);
        /* The others wait for the user as long as it takes. */
        double saved = r->comm->timeout_s;
        r->comm->timeout_s = 0;
        if (r->comm->ops->broadcast(r->comm, &cmd, sizeof cmd, 0, &err))
            die(r, &err, false);
        r->comm->timeout_s = saved;
        if (cmd == TURN_END) {
            free(ids);
            break;
        }
        if (cmd == TURN_RESET || cmd == TURN_REPREFILL) {
            tp_model_reset(r->model);
            n_conv = 0;
        }
        if (cmd == TURN_RESET) {
            /* Start over as if tprun had just started: the same first line
             * then gets the same answer. */
            tp_rng_seed(rng, base->sampler.seed);
            free(ids);
            if (my_rank(r) == 0) {
                chat_clear(&chat);
                fprintf(stderr, "(conversation cleared)\n");
            }
            continue;
        }
        share_ids(r, &ids, &n, &err);
        if (tp_gen_check_prompt(r->model, ids, n, r->context, &err)) {
            if (my_rank(r) == 0) {
                fprintf(stderr, "tprun: %s: /reset to start a new conversation\n", err.msg);
                /* the turn never reached the model */
                cJSON_DeleteItemFromArray(chat.messages, cJSON_GetArraySize(chat.messages) - 1);
                if (cmd == TURN_REPREFILL) {   /* the cache was emptied for it */
                    chat.cached[0] = '\0';
                    chat.cached_len = 0;
                    chat.pending = -1;
                }
            }
            free(ids);
            continue;
        }
        stream s = { .r = r, .print = my_rank(r) == 0, .detok = my_rank(r) == 0 ? tp_detok_new(r->tok, true) : NULL };
        tp_gen_opts go = *base;
        go.on_token = on_token;
        go.arg = &s;
        go.history = conv;
        go.n_history = n_conv;
        tp_gen_result g;
        if (tp_generate(r->model, r->comm, rng, ids, n, &go, &g, &err))
            die(r, &err, false);
        stream_end(&s);
        tp_detok_free(s.detok);
        report_context_full(r, &g);
        report_speed(r, &g);
        if (my_rank(r) == 0)
            answer_done(r, &chat, &g);
        int32_t *longer = realloc(conv, (n_conv + (size_t)n + g.n_ids) * sizeof *conv);
        if (!longer)
            die_msg(r, false, "out of memory");
        conv = longer;
        memcpy(conv + n_conv, ids, (size_t)n * sizeof *ids);
        memcpy(conv + n_conv + n, g.ids, g.n_ids * sizeof *g.ids);
        n_conv += (size_t)n + g.n_ids;
        tp_gen_result_free(&g);
        free(ids);
    }
    free(conv);
    cJSON_Delete(chat.messages);
    free(chat.cached);
    free(chat.prompt);
}

/* ------------------------------------------------------------ --load-only */

/* Loads (on cuda: the weights go to the device with the model), meets the
 * other ranks, prints one line and ends: the bytes, the seconds and GB/s of
 * the load, the time since the process started. */
static void load_only(run *r)
{
    tp_err err;
    double bytes = r->lr.raw_bytes, secs = r->lr.load_seconds;
    const char *where = "in memory";
    if (on_cuda(r)) {
        create_model(r);
        tp_model_weight_stats(r->model, &bytes, &secs);
        where = "on the device";
    }
    if (r->comm->ops->barrier(r->comm, &err))
        die(r, &err, false);
    if (my_rank(r) == 0)
        fprintf(stderr, "tprun: load-only: rank 0 of %d: %.1f MB of weights %s in %.3f s, %.2f GB/s, "
                "%.3f s after process start; %s\n", r->comm->world, bytes / 1e6, where, secs,
                secs > 0 ? bytes / secs / 1e9 : 0.0, tp_now() - r->t_start,
                r->model ? tp_model_device_info(r->model) : "cpu");
    tp_comm_close(r->comm);
    r->comm = NULL;
    cleanup(r);
}

/* ------------------------------------------------------------ --serve */

/* Set by SIGTERM / SIGINT: tp_serve_run (rank 0) stops admission, lets the
 * running requests finish and ends every rank. */
static volatile int stop_requested;

static void on_stop_signal(int sig) { stop_requested = 1; }

static void serve_log(void *arg, const char *line) { fprintf(stderr, "tprun: serve: %s\n", line); }

/* OUT's last path component without a trailing "/" or ".tar". */
static void default_model_name(const char *out, char *name, size_t size)
{
    size_t len = strlen(out);
    while (len > 1 && out[len - 1] == '/')
        len--;
    size_t start = len;
    while (start > 0 && out[start - 1] != '/')
        start--;
    if (len - start > 4 && !strncmp(out + len - 4, ".tar", 4))
        len -= 4;
    snprintf(name, size, "%.*s", (int)(len - start), out + start);
}

static void serve(run *r, const tp_gen_opts *go)
{
    tp_err err;
    char name[256];
    default_model_name(r->o.out, name, sizeof name);
    struct sigaction sa = { .sa_handler = on_stop_signal };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);   /* a client gone mid-answer is an error to handle, not a signal */
    tp_serve_opts so = { .host = r->o.host, .port = r->o.port, .max_seq = r->context, .max_queue = r->o.max_queue,
                         .max_step_tokens = r->o.max_step_tokens,
                         .served_model_name = r->o.served_model_name ? r->o.served_model_name : name,
                         .defaults = go->sampler, .eos_ids = go->eos_ids, .n_eos = go->n_eos,
                         .chat_template = r->chat_template, .bos_token = r->bos_token,
                         .eos_token = r->eos_token, .stop = &stop_requested,
                         .log = r->o.verbose ? serve_log : NULL };
    if (!r->tok)   /* every rank loaded the same files: all stop alike */
        die_msg(r, true, "%s has no tokenizer.json: --serve needs one", r->o.out);
    if (tp_serve_run(r->model, r->comm, r->tok, &so, &err))
        die(r, &err, false);
}

/* ------------------------------------------------------------ main */

int main(int argc, char **argv)
{
    run r = { 0 };
    tp_err err;
    r.t_start = tp_now();
    parse_args(argc, argv, &r.o);

    if (tp_launch_detect(&r.launch, r.o.rank, &err))
        die(&r, &err, true);
    if (tp_load_manifest(r.o.out, &r.manifest, &err))
        die(&r, &err, true);
    r.have_manifest = true;
    check_world(&r);
    if (r.o.threads == 0) {
        /* Ranks on one node share its cores (OpenBLAS and our pool both
         * follow this number), so 2 ranks on 2 cores do not oversubscribe. */
        int local = r.launch.local_world > 0 ? r.launch.local_world : 1;
        r.o.threads = cores() / local > 0 ? cores() / local : 1;
    }
    r.launch.conversion_id = r.manifest.conversion_id; /* the ranks refuse to join another conversion */
    if (tp_comm_open(&r.comm, r.o.comm, &r.launch, r.o.timeout_s, &err))
        die(&r, &err, false);
    load(&r);
    if (r.o.load_only) {
        load_only(&r);
        return 0;
    }
    create_model(&r);

    tp_gen_config gc;
    if (tp_gen_config_parse(&gc, r.lr.generation_config_json, &err))
        die_msg(&r, true, "%s: %s", r.o.out, err.msg);
    const tp_model_config *cfg = tp_model_get_config(r.model);
    tp_gen_opts go = { .context = r.context };
    sampler_setup(&r, &gc, &go.sampler);
    go.max_new_tokens = r.o.max_new_tokens >= 0 ? r.o.max_new_tokens
                        : gc.max_new_tokens > 0 ? gc.max_new_tokens : DEFAULT_MAX_NEW;
    int32_t cfg_eos[8];
    for (int i = 0; i < cfg->n_eos && i < 8; i++)
        cfg_eos[i] = cfg->eos_ids[i];
    if (!r.o.ignore_eos) {
        go.eos_ids = gc.n_eos ? gc.eos_ids : cfg_eos;
        go.n_eos = gc.n_eos ? gc.n_eos : (cfg->n_eos < 8 ? cfg->n_eos : 8);
    }
    tp_rng rng;
    tp_rng_seed(&rng, go.sampler.seed);
    if (r.o.chat || r.o.interactive || r.o.serve)
        chat_setup(&r);

    if (r.o.serve)
        serve(&r, &go);
    else if (r.o.interactive)
        interactive(&r, &go, &rng);
    else
        run_once(&r, &go, &rng);

    if (r.comm->ops->barrier(r.comm, &err))
        die(&r, &err, false);
    tp_comm_close(r.comm);
    r.comm = NULL;
    cleanup(&r);
    return 0;
}
