/* tpsynth - writes a synthetic Hugging Face model directory with random bf16
 * weights (the demo, the tests and the benchmarks use it; nothing is
 * downloaded).  The work is in convert/synth.c. */
#include "cli.h"
#include "convert.h"

#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *USAGE =
    "usage: tpsynth [options] OUT_DIR\n"
    "Writes a Hugging Face-style model directory (config.json, generation_config.json,\n"
    "safetensors with the real tensor names, bf16 weights ~ N(0, 0.02^2), norm weights\n"
    "1 + N(0, 0.02^2)).  OUT_DIR is created and must be empty.\n"
    "\n"
    "  --preset NAME        tiny (default), demo, qwen3-0.6b, qwen3-8b, moe-tiny,\n"
    "                       qwen3-30b-a3b-layer (Qwen3-30B-A3B's layer shape, 2 layers)\n"
    "  --arch A             qwen3, qwen2, llama, mistral, qwen3_moe, mixtral (keeps the\n"
    "                       preset's sizes)\n"
    "  --experts N          MoE: experts per layer (moe presets: 8 / 128)\n"
    "  --experts-per-tok K  MoE: experts per token (2 / 8)\n"
    "  --moe-intermediate I MoE: qwen3_moe expert size (32 / 768; mixtral uses --intermediate)\n"
    "  --hidden N  --layers N  --heads N  --kv-heads N  --head-dim N\n"
    "  --intermediate N  --vocab N  --max-position N\n"
    "  --tie | --no-tie     tie_word_embeddings (tied: no lm_head.weight)\n"
    "  --seed N             random seed (default 1); same seed, same bytes\n"
    "  --shard-size BYTES   split into model-0000k-of-0000n.safetensors + index\n"
    "                       (suffix K, M or G: powers of 1024)\n"
    "  --tokenizer PATH     copy tokenizer.json (or decompress tokenizer.json.zst), and\n"
    "                       the tokenizer_config.json beside it if there is one\n"
    "  --threads N          generator threads (default: all cores)\n"
    "  --quiet              no progress bar and no summary line\n"
    "  -h, --help           this help\n"
    "\n"
    "Presets: tiny = qwen3 hidden 64, 2 layers, 4/2 heads, head_dim 16, vocab 512, tied;\n"
    "demo = qwen3 hidden 128, 2 layers, 4/2 heads, head_dim 32, intermediate 384,\n"
    "vocab 151936 (the real Qwen3 vocabulary), tied; qwen3-0.6b and qwen3-8b have the\n"
    "real models' shapes.\n"
    "\n"
    "Examples:\n"
    "  tpsynth --preset demo --tokenizer tests/data/qwen3-tokenizer/tokenizer.json.zst demo/\n"
    "  tpsynth --preset qwen3-0.6b --shard-size 512M q06b/\n"
    "  tpsynth --arch llama --layers 4 --vocab 1000 --no-tie llama/\n";

static int parse_int(const char *flag, const char *s, int *out)
{
    long v;
    if (!cli_long(s, 0, INT_MAX, &v)) {
        cli_msg("%s %s: not a non-negative integer", flag, s);
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* An integer, with suffix also "64K", "1M", "2GB" (powers of 1024). */
static int parse_u64(const char *flag, const char *s, bool suffix, uint64_t *out)
{
    static const char *const why[] = {
        [CLI_SIZE_NEGATIVE] = "must not be negative",
        [CLI_SIZE_NOT_NUMBER] = "not an integer",
        [CLI_SIZE_BAD_TAIL] = "not an integer (with an optional K/M/G suffix)",
    };
    cli_size_status st = cli_size_parse(s, suffix ? CLI_SIZE_SUFFIX | CLI_SIZE_SUFFIX_B : 0, out);
    if (st != CLI_SIZE_OK) {
        cli_msg("%s %s: %s", flag, s, why[st]);
        return -1;
    }
    return 0;
}

enum {
    OPT_PRESET = 256, OPT_ARCH, OPT_HIDDEN, OPT_LAYERS, OPT_HEADS, OPT_KV_HEADS, OPT_HEAD_DIM,
    OPT_INTERMEDIATE, OPT_VOCAB, OPT_MAX_POS, OPT_TIE, OPT_NO_TIE, OPT_SEED, OPT_SHARD,
    OPT_TOKENIZER, OPT_THREADS, OPT_QUIET, OPT_HELP, OPT_EXPERTS, OPT_EXPERTS_PER_TOK,
    OPT_MOE_INTER,
};

static const struct option LONGOPTS[] = {
    {"preset", required_argument, 0, OPT_PRESET},
    {"arch", required_argument, 0, OPT_ARCH},
    {"hidden", required_argument, 0, OPT_HIDDEN},
    {"layers", required_argument, 0, OPT_LAYERS},
    {"heads", required_argument, 0, OPT_HEADS},
    {"kv-heads", required_argument, 0, OPT_KV_HEADS},
    {"head-dim", required_argument, 0, OPT_HEAD_DIM},
    {"intermediate", required_argument, 0, OPT_INTERMEDIATE},
    {"vocab", required_argument, 0, OPT_VOCAB},
    {"max-position", required_argument, 0, OPT_MAX_POS},
    {"tie", no_argument, 0, OPT_TIE},
    {"no-tie", no_argument, 0, OPT_NO_TIE},
    {"seed", required_argument, 0, OPT_SEED},
    {"shard-size", required_argument, 0, OPT_SHARD},
    {"tokenizer", required_argument, 0, OPT_TOKENIZER},
    {"threads", required_argument, 0, OPT_THREADS},
    {"quiet", no_argument, 0, OPT_QUIET},
    {"experts", required_argument, 0, OPT_EXPERTS},
    {"experts-per-tok", required_argument, 0, OPT_EXPERTS_PER_TOK},
    {"moe-intermediate", required_argument, 0, OPT_MOE_INTER},
    {"help", no_argument, 0, OPT_HELP},   /* also -h */
    {0, 0, 0, 0},
};

int main(int argc, char **argv)
{
    tp_err err = {{0}};
    tp_synth_opts o = {0};
    o.seed = 1;
    cli_init_text("tpsynth", USAGE);
    /* The preset is applied first, wherever it sits on the command line,
     * so that the other flags override it. */
    const char *preset = "tiny";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--preset") && i + 1 < argc)
            preset = argv[i + 1];
        else if (!strncmp(argv[i], "--preset=", 9))
            preset = argv[i] + 9;
        else if (!strcmp(argv[i], "--"))
            break;
    }
    if (tp_synth_preset(&o, preset, &err))
        return cli_arg_error("%s", err.msg);
    int c;
    struct { int opt; int *dst; const char *flag; } ints[] = {
        {OPT_HIDDEN, &o.hidden, "--hidden"}, {OPT_LAYERS, &o.layers, "--layers"},
        {OPT_HEADS, &o.heads, "--heads"}, {OPT_KV_HEADS, &o.kv_heads, "--kv-heads"},
        {OPT_HEAD_DIM, &o.head_dim, "--head-dim"},
        {OPT_INTERMEDIATE, &o.intermediate, "--intermediate"}, {OPT_VOCAB, &o.vocab, "--vocab"},
        {OPT_MAX_POS, &o.max_position, "--max-position"}, {OPT_THREADS, &o.threads, "--threads"},
        {OPT_EXPERTS, &o.experts, "--experts"},
        {OPT_EXPERTS_PER_TOK, &o.experts_per_tok, "--experts-per-tok"},
        {OPT_MOE_INTER, &o.moe_intermediate, "--moe-intermediate"},
    };
    opterr = 0;
    while ((c = getopt_long(argc, argv, "h", LONGOPTS, NULL)) != -1) {
        bool done = false;
        for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
            if (c == ints[i].opt) {
                if (parse_int(ints[i].flag, optarg, ints[i].dst))
                    return 2;
                done = true;
            }
        if (done)
            continue;
        switch (c) {
        case OPT_PRESET: break;
        case OPT_ARCH: o.arch = optarg; break;
        case OPT_TIE: o.tie = true; break;
        case OPT_NO_TIE: o.tie = false; break;
        case OPT_SEED:
            if (parse_u64("--seed", optarg, false, &o.seed))
                return 2;
            break;
        case OPT_SHARD:
            if (parse_u64("--shard-size", optarg, true, &o.shard_size))
                return 2;
            if (o.shard_size == 0)
                return cli_arg_error("--shard-size %s: must be positive", optarg);
            break;
        case OPT_TOKENIZER: o.tokenizer_path = optarg; break;
        case OPT_QUIET: o.quiet = true; break;
        case 'h':
        case OPT_HELP: fputs(USAGE, stdout); return 0;
        default:
            return cli_help_error(optopt ? "%s: missing or unexpected argument" : "%s: unknown option",
                                  argv[optind - 1]);
        }
    }
    if (optind + 1 != argc)
        return cli_help_error("%s", optind == argc ? "missing OUT_DIR" : "more than one OUT_DIR");
    const char *out = argv[optind];
    double t0 = tp_now();
    if (tp_synth_write(out, &o, &err))
        return cli_fail(&err);
    double dt = tp_now() - t0;
    if (!o.quiet) {
        uint64_t params = tp_synth_param_count(&o);
        double gb = params * 2.0 / 1e9;
        printf("tpsynth: wrote %s: %s, %.1fM parameters, %.2f GB bf16 in %.2f s (%.0f MB/s)\n",
               out, o.arch, params / 1e6, gb, dt, dt > 0 ? gb * 1e3 / dt : 0.0);
    }
    return 0;
}
