/* tpconvert - a Hugging Face checkpoint -> per-rank tensor-parallel shards.
 *
 *   tpconvert --tp N MODEL_DIR OUT_DIR [options]
 *
 * See usage() for the options.  The work is in convert/ (convert.h); this is
 * the argument parsing, the --dry-run table, the SIGINT handler and the
 * optional node bundles (loader.h).
 */
#include "cli.h"
#include "convert.h"
#include "loader.h"

#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *prog = "tpconvert";

static void usage(FILE *f)
{
    fprintf(f,
"usage: tpconvert --tp N MODEL_DIR OUT_DIR [options]\n"
"\n"
"Cuts a Hugging Face model directory (config.json + *.safetensors) into one file\n"
"per tensor-parallel rank plus manifest.json.  Supported model_type: qwen3, qwen2,\n"
"llama, mistral (others need --plan).\n"
"\n"
"  --tp N                 number of ranks (required)\n"
"  --plan FILE.json       the whole plan by hand: {\"pattern\": \"style\", ...}, e.g.\n"
"                         {\"layers.*.self_attn.q_proj\": \"colwise\", \"lm_head\": \"colwise_gather_output\"}\n"
"                         (keys relative to the base model, or starting with \"model.\",\n"
"                         or \"lm_head\"); replaces config.json's base_model_tp_plan and\n"
"                         the built-in plan; anything not named is replicated (the\n"
"                         embedding too, when the plan names it: it wins over the\n"
"                         default vocabulary cut)\n"
"  --replicate-embedding  keep the whole embedding on every rank (default: cut by\n"
"                         vocabulary rows, as vLLM does: each rank holds 1/tp of it\n"
"                         and an all-reduce sums the looked-up rows)\n"
"  --vocab-parallel       the default; accepted for older command lines\n"
"  --expert-parallel      MoE: each rank holds num_experts/tp whole experts (default: every\n"
"                         rank holds 1/tp of every expert)\n"
"  --quantize fp8|int8    quantize the linear layers of a bf16/f16/f32 checkpoint:\n"
"                         fp8: e4m3, one scale per 128x128 block (amax / 448, as Qwen's\n"
"                         FP8 releases); int8: symmetric, one scale per output row\n"
"                         (amax / 127).  Embedding, norms, router and lm_head stay as\n"
"                         they are; config.json gets the quantization_config\n"
"  --quantize-lm-head     with --quantize: lm_head too (when tied: the shared embedding)\n"
"  --compress none|zstd|exphuf\n"
"                         codec of the tpshard files (default exphuf: the exponent in\n"
"                         a byte plane of its own, Huffman-coded; on bf16 weights it\n"
"                         stores less than zstd and decodes ~2x faster, FORMAT.md 2)\n"
"  --level N              zstd level 1..22, with --compress zstd only (default 1: on\n"
"                         byte planes it beats 3 in both ratio and speed, see README)\n"
"  --chunk-size BYTES     raw bytes per compressed chunk (default %u; K/M suffix ok)\n"
"  --format tpshard|safetensors\n"
"                         default tpshard; safetensors: one plain safetensors file per\n"
"                         rank (no codec), for other runtimes: tprun runs tpshard only.\n"
"                         A tpshard conversion must be one tprun runs (known\n"
"                         model_type, every layer tensor, the plan's cuts); that is\n"
"                         checked first\n"
"  --threads N            worker threads (default: all cores)\n"
"  --dry-run              print the plan, the cut of every tensor and the bytes per\n"
"                         rank; write nothing\n"
"  --force                replace a previous conversion in OUT_DIR (only a conversion:\n"
"                         other files there are refused); the new one is written\n"
"                         beside it and swapped in when complete, so a failure or\n"
"                         Ctrl-C leaves the old one whole\n"
"  -q, --quiet            no output on success\n"
"  -v, --verbose          print the plan too\n"
"  --bundle               also pack node bundles (tar) into OUT_DIR\n"
"  --ranks-per-node K     ranks per bundle (default: all ranks in one)\n"
"  -h, --help             this help\n"
"\n"
"Examples:\n"
"  tpconvert --tp 4 Qwen3-0.6B out/\n"
"  tpconvert --tp 2 --dry-run Qwen3-0.6B\n"
"  tpconvert --tp 8 --compress none --bundle --ranks-per-node 4 Qwen3-8B out8/\n", TP_DEFAULT_CHUNK);
}

static volatile sig_atomic_t interrupted;

static void on_signal(int sig)
{
    (void)sig;
    interrupted = 1;
}

static void shape_str(char *out, size_t cap, const uint64_t *shape, int ndim)
{
    size_t o = 0;
    o += (size_t)snprintf(out + o, cap - o, "[");
    for (int i = 0; i < ndim && o < cap; i++)
        o += (size_t)snprintf(out + o, cap - o, "%s%" PRIu64, i ? ", " : "", shape[i]);
    if (o < cap)
        snprintf(out + o, cap - o, "]");
}

static void human(char *out, size_t cap, uint64_t b)
{
    if (b >= (1ull << 30))
        snprintf(out, cap, "%.2f GiB", (double)b / (1ull << 30));
    else if (b >= (1ull << 20))
        snprintf(out, cap, "%.2f MiB", (double)b / (1ull << 20));
    else if (b >= (1ull << 10))
        snprintf(out, cap, "%.1f KiB", (double)b / (1ull << 10));
    else
        snprintf(out, cap, "%" PRIu64 " B", b);
}

/* The --dry-run report on stdout. */
static void print_plan(const tp_conversion *c)
{
    printf("model: %s (%s), tp=%d%s%s\n", c->model_dir, c->model.model_type, c->tp,
           c->vocab_parallel ? ", vocab-parallel embedding" : "",
           c->expert_parallel ? ", expert-parallel" : "");
    printf("plan: %s\n", c->plan.source ? c->plan.source : "?");
    for (size_t i = 0; i < c->plan.n; i++)
        printf("  %-44s %s\n", c->plan.patterns[i], tp_style_name(c->plan.styles[i]));
    printf("\n%-48s %-22s %-14s %-26s %14s\n", "tensor", "style", "global shape",
           "per-rank shape", "bytes/rank");
    size_t n_rep = 0;
    for (size_t i = 0; i < c->n_cuts; i++) {
        const tp_cut *cut = &c->cuts[i];
        char gs[64], ls[96], last[64];
        shape_str(gs, sizeof gs, cut->global_shape, cut->ndim);
        shape_str(ls, sizeof ls, cut->local_shapes, cut->ndim);
        const uint64_t *lshape = &cut->local_shapes[(size_t)(c->tp - 1) * TP_MAX_DIMS];
        if (cut->owner >= 0) {
            snprintf(ls, sizeof ls, "whole, rank %d only", cut->owner);
        } else if (memcmp(lshape, cut->local_shapes, sizeof(uint64_t) * (size_t)cut->ndim)) {
            shape_str(last, sizeof last, lshape, cut->ndim);
            size_t l = strlen(ls);
            snprintf(ls + l, sizeof ls - l, " (last %s)", last);
        }
        uint64_t maxb = 0;
        for (int r = 0; r < c->tp; r++)
            if (cut->rank_bytes[r] > maxb)
                maxb = cut->rank_bytes[r];
        char style[40];
        snprintf(style, sizeof style, "%s%s", tp_style_name(cut->style),
                 cut->reduce_bias ? " (reduce)" : "");
        printf("%-48s %-22s %-14s %-26s %14" PRIu64 "\n", cut->name, style, gs, ls, maxb);
        if (cut->dim < 0 && cut->owner < 0)
            n_rep++;
    }
    uint64_t maxr = 0;
    for (int r = 0; r < c->tp; r++)
        if (c->rank_total[r] > maxr)
            maxr = c->rank_total[r];
    uint64_t ideal = (c->source_bytes + (uint64_t)c->tp - 1) / (uint64_t)c->tp;
    char a[32], b[32], s[32];
    human(a, sizeof a, maxr);
    human(b, sizeof b, ideal);
    human(s, sizeof s, c->source_bytes);
    printf("\nsource: %zu tensors, %" PRIu64 " bytes (%s)\n", c->n_cuts, c->source_bytes, s);
    printf("per rank (max over ranks): %" PRIu64 " bytes (%s); ideal total/tp: %" PRIu64
           " bytes (%s); overhead %.1f%%\n", maxr, a, ideal, b,
           ideal ? 100.0 * ((double)maxr - (double)ideal) / (double)ideal : 0.0);
    printf("replicated on every rank (%zu):\n", n_rep);
    for (size_t i = 0; i < c->n_cuts; i++) {
        const tp_cut *cut = &c->cuts[i];
        if (cut->dim >= 0 || cut->owner >= 0)
            continue;
        printf("  %s%s\n", cut->name,
               cut->reduce_bias ? " (rowwise bias, added once after the all-reduce)"
               : cut->plan_entry < 0 ? " (not in the plan)" : "");
    }
    /* Like transformers' verify_tp_plan: rules that matched nothing (a typo
     * in --plan, or lm_head of a tied model). */
    bool header = false;
    for (size_t p = 0; p < c->plan.n; p++) {
        bool used = false;
        for (size_t i = 0; i < c->n_cuts && !used; i++)
            used = c->cuts[i].plan_entry == (long)p;
        if (used)
            continue;
        if (!header)
            printf("plan entries that match no tensor:\n");
        header = true;
        printf("  %s\n", c->plan.patterns[p]);
    }
}

int main(int argc, char **argv)
{
    long tp = 0, level = 1, threads = 0, rpn = 0;
    const char *plan = NULL, *dirs[2] = {NULL, NULL};
    int n_dirs = 0;
    bool vocab_parallel = true, dry_run = false, force = false, quiet = false, verbose = false;
    bool bundle = false, level_given = false, compress_given = false, vocab_given = false;
    bool expert_parallel = false, quantize_lm_head = false;
    tp_quant quantize = TP_QUANT_NONE;
    tp_write_opts wo = {.format = TP_OUT_TPSHARD, .codec = TP_CODEC_DEFAULT};
    uint64_t chunk = TP_DEFAULT_CHUNK;

    cli_init(prog, usage);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = NULL;
#define NEED_VALUE()                                                                     \
    do {                                                                                 \
        if (!(v = cli_value(argc, argv, &i)))                                            \
            return cli_arg_error("%s needs a value (see --help)", a);                    \
    } while (0)
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--tp")) {
            NEED_VALUE();
            if (!cli_long(v, 1, TP_MAX_TP, &tp))
                return cli_arg_error("--tp %s: expected an integer from 1 to %d", v, TP_MAX_TP);
        } else if (!strcmp(a, "--plan")) {
            NEED_VALUE();
            plan = v;
        } else if (!strcmp(a, "--vocab-parallel")) {
            vocab_given = true;
        } else if (!strcmp(a, "--replicate-embedding")) {
            vocab_parallel = false;
        } else if (!strcmp(a, "--expert-parallel")) {
            expert_parallel = true;
        } else if (!strcmp(a, "--quantize")) {
            NEED_VALUE();
            if (!strcmp(v, "fp8"))
                quantize = TP_QUANT_FP8_BLOCK;
            else if (!strcmp(v, "int8"))
                quantize = TP_QUANT_INT8_ROW;
            else
                return cli_arg_error("--quantize %s: expected fp8 or int8", v);
        } else if (!strcmp(a, "--quantize-lm-head")) {
            quantize_lm_head = true;
        } else if (!strcmp(a, "--compress")) {
            NEED_VALUE();
            int c = tp_codec_from_name(v, &wo.codec);
            if (c < 0)
                return cli_arg_error("--compress %s: expected one of %s", v, tp_codec_names());
            compress_given = true;
        } else if (!strcmp(a, "--level")) {
            NEED_VALUE();
            if (!cli_long(v, 1, 22, &level))
                return cli_arg_error("--level %s: expected a zstd level from 1 to 22", v);
            level_given = true;
        } else if (!strcmp(a, "--chunk-size")) {
            NEED_VALUE();
            if (!cli_size(v, CLI_SIZE_SUFFIX, &chunk) || chunk < 4096 || chunk > (1u << 30) || chunk % 4)
                return cli_arg_error("--chunk-size %s: expected a multiple of 4 from 4096 to 1G bytes", v);
        } else if (!strcmp(a, "--format")) {
            NEED_VALUE();
            if (!strcmp(v, "tpshard"))
                wo.format = TP_OUT_TPSHARD;
            else if (!strcmp(v, "safetensors"))
                wo.format = TP_OUT_SAFETENSORS;
            else
                return cli_arg_error("--format %s: expected tpshard or safetensors", v);
        } else if (!strcmp(a, "--threads")) {
            NEED_VALUE();
            if (!cli_long(v, 1, 1024, &threads))
                return cli_arg_error("--threads %s: expected an integer from 1 to 1024", v);
        } else if (!strcmp(a, "--dry-run")) {
            dry_run = true;
        } else if (!strcmp(a, "--force")) {
            force = true;
        } else if (!strcmp(a, "--quiet") || !strcmp(a, "-q")) {
            quiet = true;
        } else if (!strcmp(a, "--verbose") || !strcmp(a, "-v")) {
            verbose = true;
        } else if (!strcmp(a, "--bundle")) {
            bundle = true;
        } else if (!strcmp(a, "--ranks-per-node")) {
            NEED_VALUE();
            if (!cli_long(v, 1, TP_MAX_TP, &rpn))
                return cli_arg_error("--ranks-per-node %s: expected an integer from 1 to %d", v, TP_MAX_TP);
        } else if (a[0] == '-' && a[1]) {
            return cli_arg_error("unknown option %s (see --help)", a);
        } else {
            if (n_dirs == 2)
                return cli_arg_error("unexpected argument %s (MODEL_DIR and OUT_DIR are already given)", a);
            dirs[n_dirs++] = a;
        }
#undef NEED_VALUE
    }
    if (!tp)
        return cli_arg_error("--tp N is required (see --help)");
    if (n_dirs < 2 && !(dry_run && n_dirs == 1))
        return cli_arg_error("MODEL_DIR and OUT_DIR are required (see --help)");
    if (quiet && verbose)
        return cli_arg_error("--quiet and --verbose exclude each other");
    if (vocab_given && !vocab_parallel)
        return cli_arg_error("--vocab-parallel and --replicate-embedding exclude each other");
    if (quantize_lm_head && quantize == TP_QUANT_NONE)
        return cli_arg_error("--quantize-lm-head needs --quantize fp8|int8");
    if (rpn && !bundle)
        return cli_arg_error("--ranks-per-node needs --bundle");
    if (rpn > tp)
        return cli_arg_error("--ranks-per-node %ld: more than --tp %ld", rpn, tp);
    if (wo.format == TP_OUT_SAFETENSORS && level_given)
        return cli_arg_error("--level applies to --format tpshard only (not --format safetensors)");
    if (wo.format == TP_OUT_SAFETENSORS && compress_given)
        return cli_arg_error("--compress applies to --format tpshard only (--format safetensors is never compressed)");
    const tp_codec_info *codec = tp_codec_get(wo.codec);
    if (level_given && codec->min_level == codec->max_level)
        return cli_arg_error("--level is the zstd level: it means nothing with --compress %s%s", codec->name,
                             compress_given ? "" : " (the default; add --compress zstd)");
    if (!level_given)
        level = codec->default_level;
    if (bundle && wo.format != TP_OUT_TPSHARD)
        return cli_arg_error("--bundle needs --format tpshard");
    wo.level = (int)level;
    wo.chunk_size = chunk;
    wo.threads = (int)threads;
    wo.quiet = quiet;
    wo.force = force;
    wo.cancel = &interrupted;

    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    tp_err err = {{0}};
    tp_conversion conv;
    tp_prepare_opts popts = {.plan_path = plan, .vocab_parallel = vocab_parallel,
                             .expert_parallel = expert_parallel, .quantize = quantize,
                             .quantize_lm_head = quantize_lm_head};
    if (tp_conversion_prepare_opts(&conv, dirs[0], (int)tp, &popts, &err) < 0)
        return cli_fail(&err);
    /* Before --dry-run prints and before anything is written: a tpshard
     * conversion must be one tprun runs (tensors and plan); a safetensors
     * export (for other runtimes) only needs complete tensors. */
    if (tp_conversion_check_runnable(&conv, wo.format == TP_OUT_TPSHARD, &err) < 0) {
        tp_conversion_free(&conv);
        return cli_fail(&err);
    }
    if (dry_run) {
        print_plan(&conv);
        tp_conversion_free(&conv);
        return 0;
    }
    if (verbose)
        print_plan(&conv);
    tp_write_report rep;
    if (tp_conversion_write(&conv, dirs[1], &wo, &rep, &err) < 0) {
        /* The conversion is written beside OUT_DIR and swapped in only when
         * complete, so a failed run leaves OUT_DIR exactly as it found it. */
        cli_msg("%s%s%s%s", err.msg, interrupted ? " (nothing of this run was left behind; " : "",
                interrupted ? dirs[1] : "",
                interrupted ? " is as it was, a previous conversion there intact)" : "");
        tp_conversion_free(&conv);
        return interrupted ? 130 : 1;
    }
    if (!quiet && wo.format == TP_OUT_SAFETENSORS)
        cli_msg("note: --format safetensors writes plain safetensors files for other tools; tprun does not run "
                "them (it reads --format tpshard conversions)");
    if (!quiet) {
        char a[32], b[32];
        human(a, sizeof a, rep.raw_bytes);
        human(b, sizeof b, rep.stored_bytes);
        printf("%s: %d rank%s, %zu tensors, %s -> %s (%s) in %.2f s, conversion %s\n", dirs[1],
               conv.tp, conv.tp == 1 ? "" : "s", conv.n_cuts, a, b,
               wo.format == TP_OUT_TPSHARD ? tp_codec_name(wo.codec) : "safetensors", rep.seconds,
               rep.conversion_id);
    }
    int rc = 0;
    if (bundle) {
        char **paths = NULL;
        size_t n = 0;
        if (tp_bundle_pack(dirs[1], rpn ? (int)rpn : (int)tp, dirs[1], quiet, &paths, &n, &err) < 0) {
            cli_msg("--bundle: %s (the conversion in %s is complete)", err.msg, dirs[1]);
            rc = 1;
        } else {
            for (size_t i = 0; i < n; i++) {
                if (!quiet)
                    printf("bundle: %s\n", paths[i]);
                free(paths[i]);
            }
            free(paths);
        }
    }
    tp_conversion_free(&conv);
    return rc;
}
