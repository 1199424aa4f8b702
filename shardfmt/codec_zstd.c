/* codec_zstd.c - codec "zstd": one independent zstd frame per chunk.  For
 * 2-byte dtypes the chunk is first rearranged into byte planes (all low
 * bytes, then all high bytes): the high byte of a bf16 holds the sign and
 * most of the exponent, which is highly repetitive, and zstd finds that far
 * more easily when those bytes sit next to each other.
 *
 * Incompressible chunks are still stored as a zstd frame: zstd itself then
 * emits "raw" blocks, costing a few bytes per 128 KiB block, which keeps the
 * format free of a per-chunk codec switch.
 *
 * Also here: tp_read_file_zst, the reader of .zst files (tokenizer.json.zst).
 */
#include <stdlib.h>
#include <string.h>

#include <zstd.h>
#include <zstd_errors.h>

#include "codec_internal.h"

void tp_codec_zstd_cache_free(tp_codec_cache *c)
{
    ZSTD_freeCCtx(c->zstd_cctx);
    ZSTD_freeDCtx(c->zstd_dctx);
}

static size_t zstd_bound(size_t raw_len)
{
    return ZSTD_compressBound(raw_len);
}

static int zstd_encode(int level, tp_dtype dtype, const uint8_t *raw, size_t raw_len, uint8_t *dst,
                       size_t dst_cap, size_t *stored_len, tp_err *err)
{
    tp_codec_cache *cache = tp_codec_thread_cache();
    if (!cache)
        return tp_errorf(err, "codec zstd: out of memory");
    if (!cache->zstd_cctx && !(cache->zstd_cctx = ZSTD_createCCtx()))
        return tp_errorf(err, "codec zstd: cannot create a compression context");
    const uint8_t *src = raw;
    if (tp_dtype_size(dtype) == 2 && raw_len) {
        uint8_t *planes = tp_codec_scratch(cache, raw_len);
        if (!planes)
            return tp_errorf(err, "codec zstd: out of memory for a %zu-byte chunk", raw_len);
        tp_byteplanes_split(raw, raw_len / 2, planes);
        src = planes;
    }
    size_t n = ZSTD_compressCCtx(cache->zstd_cctx, dst, dst_cap, src, raw_len, level);
    if (ZSTD_isError(n))
        return tp_errorf(err, "codec zstd: compress (level %d): %s", level, ZSTD_getErrorName(n));
    *stored_len = n;
    return 0;
}

static int zstd_decode(tp_dtype dtype, const uint8_t *stored, size_t stored_len, uint8_t *dst, size_t raw_len,
                       uint8_t *scratch, tp_err *err)
{
    tp_codec_cache *cache = tp_codec_thread_cache();
    if (!cache)
        return tp_errorf(err, "codec zstd: out of memory");
    if (!cache->zstd_dctx && !(cache->zstd_dctx = ZSTD_createDCtx()))
        return tp_errorf(err, "codec zstd: cannot create a decompression context");
    bool planes = tp_dtype_size(dtype) == 2 && raw_len > 0;
    uint8_t *out = dst;
    if (planes) {
        out = scratch ? scratch : tp_codec_scratch(cache, raw_len);
        if (!out)
            return tp_errorf(err, "codec zstd: out of memory for a %zu-byte chunk", raw_len);
    }
    /* The frame must decode to exactly raw_len bytes: a larger one fails
     * with "destination buffer too small", a shorter one is caught below. */
    size_t n = ZSTD_decompressDCtx(cache->zstd_dctx, out, raw_len, stored, stored_len);
    if (ZSTD_isError(n))
        return tp_errorf(err, "codec zstd: decompress: %s", ZSTD_getErrorName(n));
    if (n != raw_len)
        return tp_errorf(err, "codec zstd: decompressed %zu bytes, expected %zu", n, raw_len);
    if (planes)
        tp_byteplanes_join(out, raw_len / 2, dst);
    return 0;
}

/* ------------------------------------------- exphuf's zstd plane blocks */

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8), p[2] = (uint8_t)(v >> 16), p[3] = (uint8_t)(v >> 24);
}

int tp_zstd_plane_encode(const uint8_t *plane, size_t n, uint8_t *dst, size_t dst_cap, size_t *used,
                         tp_err *err)
{
    tp_codec_cache *cache = tp_codec_thread_cache();
    if (!cache)
        return tp_errorf(err, "codec exphuf: out of memory");
    if (!cache->zstd_cctx && !(cache->zstd_cctx = ZSTD_createCCtx()))
        return tp_errorf(err, "codec exphuf: cannot create a zstd compression context");
    if (dst_cap < 5)
        return 1;
    size_t z = ZSTD_compressCCtx(cache->zstd_cctx, dst + 5, dst_cap - 5, plane, n, 1);
    if (ZSTD_isError(z))
        return ZSTD_getErrorCode(z) == ZSTD_error_dstSize_tooSmall
                   ? 1
                   : tp_errorf(err, "codec exphuf: zstd plane: %s", ZSTD_getErrorName(z));
    if (z > UINT32_MAX)
        return 1;
    dst[0] = TP_PLANE_MODE_ZSTD;
    put32(dst + 1, (uint32_t)z);
    *used = 5 + z;
    return 0;
}

int tp_zstd_plane_decode(const uint8_t *src, size_t avail, size_t n, uint8_t *buf, size_t *used, tp_err *err)
{
    if (avail < 5 || src[0] != TP_PLANE_MODE_ZSTD)
        return tp_errorf(err, "zstd plane: header truncated");
    size_t z = (size_t)src[1] | (size_t)src[2] << 8 | (size_t)src[3] << 16 | (size_t)src[4] << 24;
    if (z > avail - 5)
        return tp_errorf(err, "zstd plane: frame of %zu bytes runs past the chunk", z);
    tp_codec_cache *cache = tp_codec_thread_cache();
    if (!cache)
        return tp_errorf(err, "zstd plane: out of memory");
    if (!cache->zstd_dctx && !(cache->zstd_dctx = ZSTD_createDCtx()))
        return tp_errorf(err, "zstd plane: cannot create a decompression context");
    size_t r = ZSTD_decompressDCtx(cache->zstd_dctx, buf, n, src + 5, z);
    if (ZSTD_isError(r))
        return tp_errorf(err, "zstd plane: %s", ZSTD_getErrorName(r));
    if (r != n)
        return tp_errorf(err, "zstd plane: decompressed %zu bytes, expected %zu", r, n);
    *used = 5 + z;
    return 0;
}

const tp_codec_row tp_codec_row_zstd = {
    .info = { .id = TP_CODEC_ZSTD, .name = "zstd", .min_level = 1, .max_level = 22, .default_level = 1,
              .dtypes = "zstd frame per chunk; 2-byte dtypes split into low/high byte planes first" },
    .bound = zstd_bound,
    .encode = zstd_encode,
    .decode = zstd_decode,
};

/* ------------------------------------------------------------ .zst files */

static bool is_zst_name(const char *path)
{
    size_t n = strlen(path);
    return n > 4 && strcmp(path + n - 4, ".zst") == 0;
}

/* Decodes every frame of packed into a malloc'd, NUL-terminated buffer.
 * Streaming, so a frame need not record its size; the buffer grows by
 * doubling up to max_size + 1 bytes, one byte more than allowed being how
 * an over-long result shows. */
static int zstd_decode_capped(const char *path, const char *packed, size_t packed_len, size_t max_size,
                              char **out, size_t *out_len, tp_err *err)
{
    size_t limit = max_size + 1;
    unsigned long long recorded = ZSTD_getFrameContentSize(packed, packed_len);
    size_t cap = recorded < limit ? (size_t)recorded + 1 : (size_t)1 << 20;
    if (cap > limit)
        cap = limit;
    ZSTD_DStream *ds = ZSTD_createDStream();
    char *buf = malloc(cap + 1);
    size_t len = 0;
    int rc = 0;
    if (!ds || !buf)
        rc = tp_errorf(err, "%s: out of memory", path);
    ZSTD_inBuffer in = {packed, packed_len, 0};
    while (rc == 0) {
        if (len == cap) { /* < limit: a full limit is over max_size, refused below */
            size_t ncap = cap > limit / 2 ? limit : cap * 2;
            char *nb = realloc(buf, ncap + 1);
            if (!nb) {
                rc = tp_errorf(err, "%s: out of memory", path);
                break;
            }
            buf = nb;
            cap = ncap;
        }
        ZSTD_outBuffer o = {buf, cap, len};
        size_t r = ZSTD_decompressStream(ds, &o, &in);
        len = o.pos;
        if (ZSTD_isError(r))
            rc = tp_errorf(err, "%s: zstd: %s", path, ZSTD_getErrorName(r));
        else if (len > max_size)
            rc = tp_errorf(err, "%s: decompresses to more than %zu bytes", path, max_size);
        else if (r == 0 && in.pos == in.size)
            break; /* the last frame is complete */
        else if (in.pos == in.size && o.pos < o.size)
            rc = tp_errorf(err, "%s: zstd: truncated frame", path); /* zstd wants input there is not */
    }
    ZSTD_freeDStream(ds);
    if (rc < 0) {
        free(buf);
        return -1;
    }
    buf[len] = '\0';
    *out = buf;
    if (out_len)
        *out_len = len;
    return 0;
}

int tp_read_file_zst(const char *path, size_t max_size, char **out, size_t *out_len, tp_err *err)
{
    if (!is_zst_name(path))
        return tp_read_file(path, max_size, out, out_len, err);
    *out = NULL;
    if (out_len)
        *out_len = 0;
    char *packed;
    size_t packed_len;
    if (tp_read_file(path, max_size, &packed, &packed_len, err) < 0)
        return -1;
    int rc = zstd_decode_capped(path, packed, packed_len, max_size, out, out_len, err);
    free(packed);
    return rc;
}
