/* codec.c - the chunk codec of the tpshard format (FORMAT.md, "Codecs").
 *
 *   none: stored bytes = raw bytes.
 *   zstd: one independent zstd frame per chunk.  For 2-byte dtypes the chunk
 *         is first rearranged into byte planes (all low bytes, then all high
 *         bytes): the high byte of a bf16 holds the sign and most of the
 *         exponent, which is highly repetitive, and zstd finds that far more
 *         easily when those bytes sit next to each other.
 *
 * Incompressible chunks are still stored as a zstd frame: zstd itself then
 * emits "raw" blocks, costing a few bytes per 128 KiB block, which keeps the
 * format free of a per-chunk codec switch.
 *
 * zstd contexts and the byte-plane scratch are cached per thread (pool
 * workers encode or decode many chunks); a pthread key frees them when the
 * thread exits.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <zstd.h>

#include "shardfmt.h"

/* ------------------------------------------------------ per-thread cache */

typedef struct codec_cache {
    ZSTD_CCtx *cctx;
    ZSTD_DCtx *dctx;
    uint8_t *scratch;
    size_t scratch_cap;
} codec_cache;

static pthread_key_t cache_key;
static pthread_once_t cache_once = PTHREAD_ONCE_INIT;

static void cache_free(void *p)
{
    codec_cache *c = p;
    if (!c)
        return;
    ZSTD_freeCCtx(c->cctx);
    ZSTD_freeDCtx(c->dctx);
    free(c->scratch);
    free(c);
}

static void cache_key_init(void)
{
    pthread_key_create(&cache_key, cache_free);
}

static codec_cache *thread_cache(void)
{
    pthread_once(&cache_once, cache_key_init);
    codec_cache *c = pthread_getspecific(cache_key);
    if (!c) {
        c = calloc(1, sizeof *c);
        if (!c)
            return NULL;
        if (pthread_setspecific(cache_key, c) != 0) {
            free(c);
            return NULL;
        }
    }
    return c;
}

/* A scratch buffer of at least n bytes owned by this thread's cache. */
static uint8_t *thread_scratch(codec_cache *c, size_t n)
{
    if (c->scratch_cap < n) {
        uint8_t *p = realloc(c->scratch, n ? n : 1);
        if (!p)
            return NULL;
        c->scratch = p;
        c->scratch_cap = n;
    }
    return c->scratch;
}

/* ------------------------------------------------------------------ names */

const char *tp_codec_name(tp_codec c)
{
    switch (c) {
    case TP_CODEC_NONE: return "none";
    case TP_CODEC_ZSTD: return "zstd";
    }
    return "?";
}

int tp_codec_from_name(const char *name, tp_codec *out)
{
    if (name && strcmp(name, "none") == 0) {
        *out = TP_CODEC_NONE;
        return 0;
    }
    if (name && strcmp(name, "zstd") == 0) {
        *out = TP_CODEC_ZSTD;
        return 0;
    }
    return -1;
}

/* ------------------------------------------------------------ byte planes */

void tp_byteplanes_split(const uint8_t *src, size_t n_elems, uint8_t *dst)
{
    uint8_t *lo = dst, *hi = dst + n_elems;
    for (size_t i = 0; i < n_elems; i++) {
        lo[i] = src[2 * i];
        hi[i] = src[2 * i + 1];
    }
}

void tp_byteplanes_join(const uint8_t *src, size_t n_elems, uint8_t *dst)
{
    const uint8_t *lo = src, *hi = src + n_elems;
    for (size_t i = 0; i < n_elems; i++) {
        dst[2 * i] = lo[i];
        dst[2 * i + 1] = hi[i];
    }
}

/* ------------------------------------------------------------ encode/decode */

size_t tp_codec_bound(tp_codec c, size_t raw_len)
{
    return c == TP_CODEC_ZSTD ? ZSTD_compressBound(raw_len) : raw_len;
}

static int check_elem_size(size_t elem_size, size_t raw_len, const char *what, tp_err *err)
{
    if (elem_size == 0)
        return tp_errorf(err, "codec %s: element size 0", what);
    if (raw_len % elem_size != 0)
        return tp_errorf(err, "codec %s: chunk of %zu bytes is not a whole number of %zu-byte elements",
                         what, raw_len, elem_size);
    return 0;
}

int tp_codec_encode(tp_codec c, int level, size_t elem_size,
                    const uint8_t *raw, size_t raw_len,
                    uint8_t *dst, size_t dst_cap, size_t *stored_len, tp_err *err)
{
    if (check_elem_size(elem_size, raw_len, "encode", err) < 0)
        return -1;
    if (c == TP_CODEC_NONE) {
        if (dst_cap < raw_len)
            return tp_errorf(err, "codec none: output buffer of %zu bytes too small for %zu", dst_cap, raw_len);
        if (raw_len)
            memcpy(dst, raw, raw_len);
        *stored_len = raw_len;
        return 0;
    }
    if (c != TP_CODEC_ZSTD)
        return tp_errorf(err, "unknown codec %d", (int)c);

    codec_cache *cache = thread_cache();
    if (!cache)
        return tp_errorf(err, "codec zstd: out of memory");
    if (!cache->cctx && !(cache->cctx = ZSTD_createCCtx()))
        return tp_errorf(err, "codec zstd: cannot create a compression context");
    const uint8_t *src = raw;
    if (elem_size == 2 && raw_len) {
        uint8_t *planes = thread_scratch(cache, raw_len);
        if (!planes)
            return tp_errorf(err, "codec zstd: out of memory for a %zu-byte chunk", raw_len);
        tp_byteplanes_split(raw, raw_len / 2, planes);
        src = planes;
    }
    size_t n = ZSTD_compressCCtx(cache->cctx, dst, dst_cap, src, raw_len, level);
    if (ZSTD_isError(n))
        return tp_errorf(err, "codec zstd: compress (level %d): %s", level, ZSTD_getErrorName(n));
    *stored_len = n;
    return 0;
}

int tp_codec_decode(tp_codec c, size_t elem_size,
                    const uint8_t *stored, size_t stored_len,
                    uint8_t *dst, size_t raw_len, uint8_t *scratch, tp_err *err)
{
    if (check_elem_size(elem_size, raw_len, "decode", err) < 0)
        return -1;
    if (c == TP_CODEC_NONE) {
        if (stored_len != raw_len)
            return tp_errorf(err, "codec none: stored size %zu differs from raw size %zu", stored_len, raw_len);
        if (raw_len)
            memcpy(dst, stored, raw_len);
        return 0;
    }
    if (c != TP_CODEC_ZSTD)
        return tp_errorf(err, "unknown codec %d", (int)c);

    codec_cache *cache = thread_cache();
    if (!cache)
        return tp_errorf(err, "codec zstd: out of memory");
    if (!cache->dctx && !(cache->dctx = ZSTD_createDCtx()))
        return tp_errorf(err, "codec zstd: cannot create a decompression context");
    bool planes = elem_size == 2 && raw_len > 0;
    uint8_t *out = dst;
    if (planes) {
        out = scratch ? scratch : thread_scratch(cache, raw_len);
        if (!out)
            return tp_errorf(err, "codec zstd: out of memory for a %zu-byte chunk", raw_len);
    }
    /* The frame must decode to exactly raw_len bytes: a larger one fails
     * with "destination buffer too small", a shorter one is caught below. */
    size_t n = ZSTD_decompressDCtx(cache->dctx, out, raw_len, stored, stored_len);
    if (ZSTD_isError(n))
        return tp_errorf(err, "codec zstd: decompress: %s", ZSTD_getErrorName(n));
    if (n != raw_len)
        return tp_errorf(err, "codec zstd: decompressed %zu bytes, expected %zu", n, raw_len);
    if (planes)
        tp_byteplanes_join(out, raw_len / 2, dst);
    return 0;
}

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
