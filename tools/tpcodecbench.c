/* tpcodecbench - the chunk codecs side by side on a model's 16-bit tensors:
 * each chunk is encoded and decoded, single-threaded, with
 *   exphuf   tpshard's exponent planes + our Huffman coder,
 *   zstd     tpshard's byte planes + zstd,
 *   plain    zstd on the bytes as they are,
 *   expzstd  exponent planes, each plane through ZSTD_compress (zstd's own
 *            Huffman/FSE instead of ours; a measurement, not a codec),
 * and the ratios (stored / raw) and GB/s of raw bytes are printed.  Used by
 * bench/bench_convert.sh (make bench-convert). */
#include "cli.h"
#include "shardfmt.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <zstd.h>

static const char *USAGE =
    "usage: tpcodecbench [--level N] [--chunk BYTES] [--max-bytes BYTES] MODEL.safetensors|MODEL_DIR\n"
    "Encodes and decodes each BF16/F16 tensor in chunks (default 1 MiB), one thread, with:\n"
    "  exphuf   exponent planes + Huffman (tpshard codec exphuf)\n"
    "  zstd     byte planes + zstd (tpshard codec zstd)\n"
    "  plain    zstd on the bytes as they are\n"
    "  expzstd  exponent planes, each through zstd (zstd's Huffman/FSE in place of ours)\n"
    "and prints stored/raw and single-thread GB/s of raw bytes, encode and decode, timed\n"
    "in the thread's CPU time (so other processes on the machine do not count).\n"
    "The last line is key=value for scripts.\n"
    "\n"
    "  --level N            zstd level of the zstd-based rows, 1..22 (default 1, as tpconvert)\n"
    "  --chunk BYTES        raw bytes per chunk, even (default 1 MiB; K/M/G suffix ok)\n"
    "  --max-bytes BYTES    stop after this many raw bytes (default: all)\n"
    "  -h, --help           this help\n"
    "\n"
    "Examples:\n"
    "  tpcodecbench Qwen3-0.6B/\n"
    "  tpcodecbench --max-bytes 256M Qwen3-0.6B/model.safetensors\n";

enum { M_EXPHUF, M_ZSTD, M_PLAIN, M_EXPZSTD, N_METHODS };
static const char *const method_name[N_METHODS] = { "exphuf", "zstd", "plain", "expzstd" };
static const char *const method_what[N_METHODS] = {
    "exponent planes + Huffman (exphuf)", "byte planes + zstd (zstd)", "plain zstd",
    "exponent planes + zstd per plane" };

typedef struct totals {
    uint64_t raw;
    uint64_t stored[N_METHODS];
    double enc_s[N_METHODS], dec_s[N_METHODS];
} totals;

typedef struct bufs {
    uint8_t *enc, *back, *planes, *planes_back;
    size_t enc_cap;
    ZSTD_CCtx *cctx;
    ZSTD_DCtx *dctx;
} bufs;

/* expzstd: each exponent plane is a zstd frame (u32 size before it) or, when
 * zstd does not shrink it, stored raw (size 0xffffffff). */
static int expzstd_encode(tp_dtype dt, const uint8_t *raw, size_t len, int level, bufs *b, size_t *stored,
                          tp_err *err)
{
    size_t n = len / tp_dtype_size(dt), pos = 0;
    tp_expplanes_split(dt, raw, n, b->planes);
    for (int p = 0; p < tp_expplanes_count(dt); p++) {
        const uint8_t *plane = b->planes + (size_t)p * n;
        size_t z = ZSTD_compressCCtx(b->cctx, b->enc + pos + 4, b->enc_cap - pos - 4, plane, n, level);
        if (ZSTD_isError(z))
            return tp_errorf(err, "zstd: %s", ZSTD_getErrorName(z));
        uint32_t tag = (uint32_t)z;
        if (z >= n) {
            memcpy(b->enc + pos + 4, plane, n);
            z = n;
            tag = UINT32_MAX;
        }
        memcpy(b->enc + pos, &tag, 4);
        pos += 4 + z;
    }
    *stored = pos;
    return 0;
}

static int expzstd_decode(tp_dtype dt, size_t len, bufs *b, tp_err *err)
{
    size_t n = len / tp_dtype_size(dt), pos = 0;
    for (int p = 0; p < tp_expplanes_count(dt); p++) {
        uint32_t tag;
        memcpy(&tag, b->enc + pos, 4);
        uint8_t *plane = b->planes_back + (size_t)p * n;
        if (tag == UINT32_MAX) {
            memcpy(plane, b->enc + pos + 4, n);
            pos += 4 + n;
            continue;
        }
        size_t r = ZSTD_decompressDCtx(b->dctx, plane, n, b->enc + pos + 4, tag);
        if (ZSTD_isError(r) || r != n)
            return tp_errorf(err, "zstd: decode failed");
        pos += 4 + tag;
    }
    tp_expplanes_join(dt, b->planes_back, n, b->back);
    return 0;
}

/* This thread's CPU seconds: on a shared machine, wall time would count the
 * other processes' turns too. */
static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* One chunk with one method: sizes and times added to tot; the decoded
 * bytes are compared with the input. */
static int bench_chunk(int m, tp_dtype dt, const uint8_t *raw, size_t len, int level, bufs *b, totals *tot,
                       tp_err *err)
{
    size_t stored = 0;
    double t0 = cpu_now();
    int rc = 0;
    switch (m) {
    case M_EXPHUF:
        rc = tp_codec_encode(TP_CODEC_EXPHUF, 0, dt, raw, len, b->enc, b->enc_cap, &stored, err);
        break;
    case M_ZSTD:
        rc = tp_codec_encode(TP_CODEC_ZSTD, level, dt, raw, len, b->enc, b->enc_cap, &stored, err);
        break;
    case M_PLAIN:
        stored = ZSTD_compressCCtx(b->cctx, b->enc, b->enc_cap, raw, len, level);
        if (ZSTD_isError(stored))
            rc = tp_errorf(err, "zstd: %s", ZSTD_getErrorName(stored));
        break;
    default:
        rc = expzstd_encode(dt, raw, len, level, b, &stored, err);
    }
    double t1 = cpu_now();
    if (rc)
        return -1;
    switch (m) {
    case M_EXPHUF:
        rc = tp_codec_decode(TP_CODEC_EXPHUF, dt, b->enc, stored, b->back, len, b->planes_back, err);
        break;
    case M_ZSTD:
        rc = tp_codec_decode(TP_CODEC_ZSTD, dt, b->enc, stored, b->back, len, b->planes_back, err);
        break;
    case M_PLAIN: {
        size_t r = ZSTD_decompressDCtx(b->dctx, b->back, len, b->enc, stored);
        if (ZSTD_isError(r) || r != len)
            rc = tp_errorf(err, "zstd: decode failed");
        break;
    }
    default:
        rc = expzstd_decode(dt, len, b, err);
    }
    double t2 = cpu_now();
    if (rc)
        return -1;
    if (memcmp(raw, b->back, len) != 0)
        return tp_errorf(err, "%s: decoded bytes differ from the input", method_name[m]);
    tot->stored[m] += stored;
    tot->enc_s[m] += t1 - t0;
    tot->dec_s[m] += t2 - t1;
    return 0;
}

static int bench_tensor(const tp_st_tensor *t, int level, size_t chunk, uint64_t budget, bufs *b, totals *tot,
                        tp_err *err)
{
    for (size_t off = 0; off < t->nbytes && tot->raw < budget; off += chunk) {
        size_t len = t->nbytes - off < chunk ? t->nbytes - off : chunk;
        if (len > budget - tot->raw)
            len = (budget - tot->raw) & ~(uint64_t)1;  /* stop at --max-bytes, whole elements */
        if (len == 0)
            break;
        for (int m = 0; m < N_METHODS; m++)
            if (bench_chunk(m, t->dtype, t->data + off, len, level, b, tot, err) < 0)
                return tp_err_prefix(err, "tensor %s", t->name);
        tot->raw += len;
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

static double gbs(uint64_t bytes, double s)
{
    return s > 0 ? bytes / s / 1e9 : 0;
}

static void report(const char *path, size_t used, uint64_t chunk, int level, const totals *tot)
{
    printf("%s: %zu tensors, %.1f MB of 16-bit data, %llu-byte chunks, zstd level %d (1 thread)\n", path, used,
           tot->raw / 1e6, (unsigned long long)chunk, level);
    printf("  %-36s %8s %10s %10s\n", "method", "stored", "enc GB/s", "dec GB/s");
    for (int m = 0; m < N_METHODS; m++)
        printf("  %-36s %8.4f %10.3f %10.3f\n", method_what[m], (double)tot->stored[m] / tot->raw,
               gbs(tot->raw, tot->enc_s[m]), gbs(tot->raw, tot->dec_s[m]));
    printf("raw_bytes=%llu", (unsigned long long)tot->raw);
    for (int m = 0; m < N_METHODS; m++)
        printf(" %s_bytes=%llu %s_stored=%.4f %s_enc_gbs=%.3f %s_dec_gbs=%.3f", method_name[m],
               (unsigned long long)tot->stored[m], method_name[m], (double)tot->stored[m] / tot->raw,
               method_name[m], gbs(tot->raw, tot->enc_s[m]), method_name[m], gbs(tot->raw, tot->dec_s[m]));
    /* The keys of the earlier two-method version (raw / stored), which
     * scripts read: planes = codec zstd, plain = plain zstd. */
    printf(" planes_ratio=%.4f plain_ratio=%.4f\n", (double)tot->raw / tot->stored[M_ZSTD],
           (double)tot->raw / tot->stored[M_PLAIN]);
}

int main(int argc, char **argv)
{
    int level = 1;
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
    /* Room for the largest of the methods' outputs (expzstd: 4 frames). */
    bufs b = { .enc_cap = ZSTD_compressBound(chunk) + 64 };
    for (int c = 0; c < TP_CODEC_COUNT; c++)
        if (tp_codec_bound((tp_codec)c, chunk) > b.enc_cap)
            b.enc_cap = tp_codec_bound((tp_codec)c, chunk);
    b.enc = malloc(b.enc_cap);
    b.back = malloc(chunk);
    b.planes = malloc(chunk);
    b.planes_back = malloc(chunk);
    b.cctx = ZSTD_createCCtx();
    b.dctx = ZSTD_createDCtx();
    totals tot = {0};
    size_t used = 0;
    int rc = b.enc && b.back && b.planes && b.planes_back && b.cctx && b.dctx ? 0 : tp_errorf(&err, "out of memory");
    for (size_t i = 0; i < n && rc == 0 && tot.raw < budget; i++) {
        const tp_st_tensor *t = tensors[i];
        if (tp_dtype_size(t->dtype) != 2)
            continue;
        rc = bench_tensor(t, level, chunk, budget, &b, &tot, &err);
        used++;
    }
    free(b.enc), free(b.back), free(b.planes), free(b.planes_back);
    ZSTD_freeCCtx(b.cctx);
    ZSTD_freeDCtx(b.dctx);
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
    report(path, used, chunk, level, &tot);
    return 0;
}
