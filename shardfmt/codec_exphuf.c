/* codec_exphuf.c - codec "exphuf": exponent planes, then each plane coded on
 * its own (raw, constant or canonical Huffman; codec_huf.c).
 *
 * ZipNN's observation: in a float weight only the exponent carries little
 * entropy (bf16 weights: 2.5-3 bits of its 8), the sign and mantissa are
 * close to random.  The zstd codec's byte planes put the sign into the
 * exponent's byte and the exponent's low bit into the mantissa's byte;
 * giving the exponent a byte of its own and coding that byte with an order-0
 * Huffman code gets close to the exponent's entropy, and the mantissa plane
 * is stored as it is (a copy to decode).  tp_expplanes_split (codec.c) says
 * which bits go into which plane for each dtype; 1-byte dtypes (fp8, int8)
 * are one plane of whole values, coded by zstd (plane mode 3: it stores
 * the same as our Huffman code there and decodes faster).
 *
 * Chunk: a 5-byte header (layout, element count), then either the raw bytes
 * (when the planes would not be smaller: random data, tiny chunks) or the
 * planes one after the other, each a block as codec_huf.c writes it, and
 * nothing after the last (FORMAT.md 2). */
#include <string.h>

#include "codec_internal.h"

/* Chunk header: u8 layout, u32 LE element count. */
#define EXPHUF_HEADER 5
enum { LAYOUT_RAW = 0, LAYOUT_PLANES = 1 };

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8), p[2] = (uint8_t)(v >> 16), p[3] = (uint8_t)(v >> 24);
}

/* Bytes of the planes of n elements: 1.5 x the raw size for F16 (whose
 * 3 planes hold 5, 8 and 3 bits), the raw size otherwise. */
static size_t planes_size(tp_dtype dtype, size_t n)
{
    return n * (size_t)tp_expplanes_count(dtype);
}

/* A chunk whose planes would not be smaller is stored as it is. */
static size_t exphuf_bound(size_t raw_len)
{
    return raw_len + EXPHUF_HEADER;
}

/* Which entropy coder a dtype's planes get, by measurement (FORMAT.md 2.2):
 * on the 8-bit dtypes (one plane of whole values, 6-7 bits of entropy)
 * zstd stores the same as our Huffman code and decodes faster; on the
 * exponent planes of the wider dtypes (2-3 bits) ours wins both ways. */
static bool plane_by_zstd(tp_dtype dtype)
{
    return tp_dtype_size(dtype) == 1;
}

/* The planes of raw, coded back to back at dst; 1 when they would not be
 * smaller than raw_len (then the chunk is stored raw). */
static int encode_planes(tp_dtype dtype, const uint8_t *raw, size_t raw_len, uint8_t *dst, size_t *used, tp_err *err)
{
    size_t n = raw_len / tp_dtype_size(dtype);
    tp_codec_cache *cache = tp_codec_thread_cache();
    uint8_t *planes = cache ? tp_codec_scratch(cache, planes_size(dtype, n)) : NULL;
    if (!planes)
        return tp_errorf(err, "codec exphuf: out of memory for a %zu-byte chunk", raw_len);
    tp_expplanes_split(dtype, raw, n, planes);
    size_t pos = 0;
    for (int p = 0; p < tp_expplanes_count(dtype); p++) {
        size_t plane_used;
        int rc = plane_by_zstd(dtype)
                     ? tp_zstd_plane_encode(planes + (size_t)p * n, n, dst + pos, raw_len - pos, &plane_used, err)
                     : tp_huf_plane_encode(planes + (size_t)p * n, n, dst + pos, raw_len - pos, &plane_used);
        if (rc != 0)
            return rc;
        pos += plane_used;
    }
    *used = pos;
    return pos < raw_len ? 0 : 1;
}

static int exphuf_encode(int level, tp_dtype dtype, const uint8_t *raw, size_t raw_len, uint8_t *dst,
                         size_t dst_cap, size_t *stored_len, tp_err *err)
{
    size_t n = raw_len / tp_dtype_size(dtype), used = 0;
    if (raw_len > UINT32_MAX)
        return tp_errorf(err, "codec exphuf: a chunk of %zu bytes is over 4 GiB", raw_len);
    put32(dst + 1, (uint32_t)n);
    int rc = encode_planes(dtype, raw, raw_len, dst + EXPHUF_HEADER, &used, err);
    if (rc < 0)
        return -1;
    if (rc == 0) {
        dst[0] = LAYOUT_PLANES;
    } else {
        dst[0] = LAYOUT_RAW;
        if (raw_len)
            memcpy(dst + EXPHUF_HEADER, raw, raw_len);
        used = raw_len;
    }
    *stored_len = EXPHUF_HEADER + used;
    return 0;
}

static int exphuf_decode(tp_dtype dtype, const uint8_t *stored, size_t stored_len, uint8_t *dst, size_t raw_len,
                         uint8_t *scratch, tp_err *err)
{
    size_t n = raw_len / tp_dtype_size(dtype);
    if (stored_len < EXPHUF_HEADER)
        return tp_errorf(err, "codec exphuf: chunk of %zu bytes is shorter than its header", stored_len);
    uint32_t count = (uint32_t)stored[1] | (uint32_t)stored[2] << 8 | (uint32_t)stored[3] << 16 |
                     (uint32_t)stored[4] << 24;
    if (count != n)
        return tp_errorf(err, "codec exphuf: chunk holds %u elements, expected %zu", count, n);
    stored += EXPHUF_HEADER;
    stored_len -= EXPHUF_HEADER;
    if (stored[-EXPHUF_HEADER] == LAYOUT_RAW) {
        if (stored_len != raw_len)
            return tp_errorf(err, "codec exphuf: raw chunk of %zu bytes, expected %zu", stored_len, raw_len);
        if (raw_len)
            memcpy(dst, stored, raw_len);
        return 0;
    }
    if (stored[-EXPHUF_HEADER] != LAYOUT_PLANES)
        return tp_errorf(err, "codec exphuf: unknown chunk layout %u", stored[-EXPHUF_HEADER]);
    /* F16's three planes take 1.5 x raw_len: the caller's scratch (raw_len
     * bytes) serves the others only. */
    uint8_t *buf = planes_size(dtype, n) <= raw_len ? scratch : NULL;
    if (!buf) {
        tp_codec_cache *cache = tp_codec_thread_cache();
        if (!cache || !(buf = tp_codec_scratch(cache, planes_size(dtype, n))))
            return tp_errorf(err, "codec exphuf: out of memory for a %zu-byte chunk", raw_len);
    }
    const uint8_t *plane[TP_EXPPLANES_MAX];
    size_t pos = 0;
    for (int p = 0; p < tp_expplanes_count(dtype); p++) {
        size_t used;
        int rc;
        if (pos < stored_len && stored[pos] == TP_PLANE_MODE_ZSTD) {
            plane[p] = buf + (size_t)p * n;
            rc = tp_zstd_plane_decode(stored + pos, stored_len - pos, n, buf + (size_t)p * n, &used, err);
        } else {
            rc = tp_huf_plane_decode(stored + pos, stored_len - pos, n, buf + (size_t)p * n, &plane[p], &used, err);
        }
        if (rc < 0)
            return tp_err_prefix(err, "codec exphuf: plane %d", p);
        pos += used;
    }
    if (pos != stored_len)
        return tp_errorf(err, "codec exphuf: %zu bytes after the last plane", stored_len - pos);
    tp_expplanes_join_planes(dtype, plane, n, dst);
    return 0;
}

const tp_codec_row tp_codec_row_exphuf = {
    .info = { .id = TP_CODEC_EXPHUF, .name = "exphuf",
              .dtypes = "exponent byte plane Huffman-coded, mantissa planes raw (BF16, F16, F32); "
                        "1-byte dtypes (F8_E4M3, I8) one plane through zstd" },
    .bound = exphuf_bound,
    .encode = exphuf_encode,
    .decode = exphuf_decode,
};
