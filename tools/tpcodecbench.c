/* tpcodecbench - how much byte planes help: compresses every 16-bit tensor of
 * a safetensors file (or model directory) in chunks, once with tpshard's codec
 * (byte planes, then zstd) and once with plain zstd at the same level, and
 * prints both ratios and single-thread speeds.  Used by bench/bench_convert.sh. */
#include "cli.h"
#include "shardfmt.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <zstd.h>

static const char *USAGE =
    "usage: tpcodecbench [--level N] [--chunk BYTES] [--max-bytes BYTES] MODEL.safetensors|MODEL_DIR\n"
    "Compresses each BF16/F16 tensor in chunks (default 1 MiB) with byte planes + zstd\n"
    "(tpshard's codec) and with plain zstd at the same level (default 3); prints the\n"
    "ratios (raw / compressed) and single-thread MB/s of raw input.  --max-bytes stops\n"
    "after that many raw bytes (default: all).  The last line is key=value for scripts.\n"
    "\n"
    "  --level N            zstd level of both, 1..22 (default 3)\n"
    "  --chunk BYTES        raw bytes per chunk, even (default 1 MiB; K/M/G suffix ok)\n"
    "  --max-bytes BYTES    stop after this many raw bytes (default: all)\n"
    "  -h, --help           this help\n"
    "\n"
    "Examples:\n"
    "  tpcodecbench Qwen3-0.6B/\n"
    "  tpcodecbench --level 1 --max-bytes 256M Qwen3-0.6B/model.safetensors\n";

typedef struct totals {
    uint64_t raw, planes, plain;
    double planes_s, plain_s;
} totals;

static int bench_tensor(const tp_st_tensor *t, int level, size_t chunk, uint64_t budget,
                        uint8_t *dst, size_t dst_cap, totals *tot, tp_err *err)
{
    for (size_t off = 0; off < t->nbytes && tot->raw < budget; off += chunk) {
        size_t len = t->nbytes - off < chunk ? t->nbytes - off : chunk;
        if (len > budget - tot->raw)
            len = (budget - tot->raw) & ~(uint64_t)1;  /* stop at --max-bytes, whole elements */
        if (len == 0)
            break;
        const uint8_t *raw = t->data + off;
        size_t stored;
        double t0 = tp_now();
        if (tp_codec_encode(TP_CODEC_ZSTD, level, 2, raw, len, dst, dst_cap, &stored, err))
            return tp_err_prefix(err, "tensor %s", t->name);
        double t1 = tp_now();
        size_t plain = ZSTD_compress(dst, dst_cap, raw, len, level);
        double t2 = tp_now();
        if (ZSTD_isError(plain))
            return tp_errorf(err, "tensor %s: zstd: %s", t->name, ZSTD_getErrorName(plain));
        /* Sizes as produced: what tpshard stores, and what plain zstd makes. */
        tot->planes += stored;
        tot->plain += plain;
        tot->raw += len;
        tot->planes_s += t1 - t0;
        tot->plain_s += t2 - t1;
    }
    return 0;
}

static int parse_size(const char *flag, const char *s, uint64_t *out)
{
    if (!cli_size(s, CLI_SIZE_SUFFIX, out) || *out == 0) {
        cli_msg("%s %s: not a positive size (K/M/G suffix allowed)", flag, s);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    int level = 3;
    uint64_t chunk = TP_DEFAULT_CHUNK, budget = UINT64_MAX;
    const char *path = NULL;
    cli_init_text("tpcodecbench", USAGE);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(USAGE, stdout);
            return 0;
        } else if (!strcmp(a, "--level") && i + 1 < argc) {
            long v;
            if (!cli_long(argv[++i], 1, ZSTD_maxCLevel(), &v))
                return cli_arg_error("--level %s: must be 1..%d", argv[i], ZSTD_maxCLevel());
            level = (int)v;
        } else if (!strcmp(a, "--chunk") && i + 1 < argc) {
            if (parse_size("--chunk", argv[++i], &chunk))
                return 2;
            if (chunk % 2 || chunk > (1ull << 30))
                return cli_arg_error("--chunk %s: must be even and at most 1 GiB", argv[i]);
        } else if (!strcmp(a, "--max-bytes") && i + 1 < argc) {
            if (parse_size("--max-bytes", argv[++i], &budget))
                return 2;
        } else if (a[0] == '-' && a[1]) {
            return cli_help_error("%s: unknown option or missing value", a);
        } else if (path) {
            return cli_arg_error("more than one input (%s, %s)", path, a);
        } else {
            path = a;
        }
    }
    if (!path) {
        cli_print_usage(stderr);
        return 2;
    }
    tp_err err = {{0}};
    tp_st_set set = {0};
    tp_st_file single = {0};
    struct stat st;
    bool is_dir = stat(path, &st) == 0 && S_ISDIR(st.st_mode);
    const tp_st_tensor **tensors;
    size_t n;
    if (is_dir) {
        if (tp_st_set_open(&set, path, &err))
            return cli_fail(&err);
        tensors = set.tensors;
        n = set.n_tensors;
    } else {
        if (tp_st_open(&single, path, &err))
            return cli_fail(&err);
        n = single.n_tensors;
        tensors = malloc((n ? n : 1) * sizeof *tensors);
        if (!tensors)
            return cli_failf("out of memory");
        for (size_t i = 0; i < n; i++)
            tensors[i] = &single.tensors[i];
    }
    size_t cap = tp_codec_bound(TP_CODEC_ZSTD, chunk);
    size_t zcap = ZSTD_compressBound(chunk);
    if (zcap > cap)
        cap = zcap;
    uint8_t *dst = malloc(cap);
    totals tot = {0};
    size_t used = 0;
    int rc = dst ? 0 : -1;
    if (!dst)
        tp_errorf(&err, "out of memory");
    for (size_t i = 0; i < n && rc == 0 && tot.raw < budget; i++) {
        const tp_st_tensor *t = tensors[i];
        if (tp_dtype_size(t->dtype) != 2)
            continue;
        rc = bench_tensor(t, level, chunk, budget, dst, cap, &tot, &err);
        used++;
    }
    free(dst);
    if (is_dir)
        tp_st_set_close(&set);
    else {
        free(tensors);
        tp_st_close(&single);
    }
    if (rc)
        return cli_failf("%s: %s", path, err.msg);
    if (tot.raw == 0)
        return cli_failf("%s: no 16-bit tensors", path);
    double mb = tot.raw / 1e6;
    double r_planes = (double)tot.raw / tot.planes, r_plain = (double)tot.raw / tot.plain;
    printf("%s: %zu tensors, %.1f MB of 16-bit data, %llu-byte chunks, zstd level %d (1 thread)\n",
           path, used, mb, (unsigned long long)chunk, level);
    printf("  byte planes + zstd: ratio %.4f (%.1f%% saved), %.0f MB/s\n", r_planes,
           100.0 * (1 - 1 / r_planes), tot.planes_s > 0 ? mb / tot.planes_s : 0);
    printf("  plain zstd:         ratio %.4f (%.1f%% saved), %.0f MB/s\n", r_plain,
           100.0 * (1 - 1 / r_plain), tot.plain_s > 0 ? mb / tot.plain_s : 0);
    printf("raw_bytes=%llu planes_bytes=%llu plain_bytes=%llu planes_ratio=%.4f plain_ratio=%.4f "
           "planes_mbps=%.0f plain_mbps=%.0f\n",
           (unsigned long long)tot.raw, (unsigned long long)tot.planes,
           (unsigned long long)tot.plain, r_planes, r_plain,
           tot.planes_s > 0 ? mb / tot.planes_s : 0, tot.plain_s > 0 ? mb / tot.plain_s : 0);
    return 0;
}
