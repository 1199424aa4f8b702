/* codec_internal.h - what the codec files of shardfmt share; not part of the
 * public API (shardfmt.h is).
 *
 * Every codec is one row of the table in codec.c and one file
 * (codec_none.c, codec_zstd.c, codec_exphuf.c): adding a codec is a row, a
 * file and an id in tp_codec.  tp_codec_encode / tp_codec_decode check the
 * element size and the buffer sizes common to all codecs, then call the
 * row, so a row's functions may rely on:
 *   - raw_len is a whole number of tp_dtype_size(dtype) bytes, dtype valid;
 *   - encode: dst holds dst_cap >= row.bound(raw_len) bytes;
 *   - decode: dst holds exactly raw_len bytes; scratch is NULL or holds
 *     raw_len bytes.  Stored bytes are untrusted: every read is
 *     bounds-checked and the result must be exactly raw_len bytes. */
#ifndef TP_CODEC_INTERNAL_H
#define TP_CODEC_INTERNAL_H

#include "shardfmt.h"

typedef struct tp_codec_row {
    tp_codec_info info;
    size_t (*bound)(size_t raw_len);
    int (*encode)(int level, tp_dtype dtype, const uint8_t *raw, size_t raw_len,
                  uint8_t *dst, size_t dst_cap, size_t *stored_len, tp_err *err);
    int (*decode)(tp_dtype dtype, const uint8_t *stored, size_t stored_len,
                  uint8_t *dst, size_t raw_len, uint8_t *scratch, tp_err *err);
} tp_codec_row;

extern const tp_codec_row tp_codec_row_none;   /* codec_none.c */
extern const tp_codec_row tp_codec_row_zstd;   /* codec_zstd.c */
extern const tp_codec_row tp_codec_row_exphuf; /* codec_exphuf.c */

/* ------------------------------------------------- per-thread codec state */

/* Pool workers encode or decode many chunks: contexts and scratch buffers
 * are cached per thread and freed by a pthread key when the thread exits. */
typedef struct tp_codec_cache {
    void *zstd_cctx;        /* ZSTD_CCtx, created by codec_zstd.c */
    void *zstd_dctx;        /* ZSTD_DCtx */
    uint8_t *scratch;
    size_t scratch_cap;
    uint8_t *scratch2;
    size_t scratch2_cap;
} tp_codec_cache;

/* This thread's cache (NULL only when out of memory). */
tp_codec_cache *tp_codec_thread_cache(void);
/* A buffer of at least n bytes owned by the cache (scratch or scratch2,
 * independent of each other), NULL when out of memory. */
uint8_t *tp_codec_scratch(tp_codec_cache *c, size_t n);
uint8_t *tp_codec_scratch2(tp_codec_cache *c, size_t n);

/* tp_expplanes_join with each plane wherever it lies (a raw plane is read
 * in place from the stored chunk).  planes has tp_expplanes_count(dt)
 * entries, at most TP_EXPPLANES_MAX. */
#define TP_EXPPLANES_MAX 4
void tp_expplanes_join_planes(tp_dtype dt, const uint8_t *const planes[], size_t n_elems, uint8_t *dst);

/* ------------------------------------------ zstd planes (codec_zstd.c) */

/* Plane block mode 3 of codec exphuf: u8 3, u32 LE frame size Z, one zstd
 * frame of Z bytes (level 1) that decodes to exactly the plane's N bytes.
 * encode returns 0 with *used set, 1 when the block would not fit in
 * dst_cap bytes, -1 on a zstd failure.  decode refuses anything but such
 * a block inside avail bytes. */
#define TP_PLANE_MODE_ZSTD 3
int tp_zstd_plane_encode(const uint8_t *plane, size_t n, uint8_t *dst, size_t dst_cap, size_t *used,
                         tp_err *err);
int tp_zstd_plane_decode(const uint8_t *src, size_t avail, size_t n, uint8_t *buf, size_t *used, tp_err *err);

/* ------------------------------------------------ Huffman (codec_huf.c) */

/* A canonical Huffman coder of byte planes, each plane in a block of its own:
 *   u8 mode: 0 raw (then n bytes), 1 constant (then 1 byte: every byte of the
 *   plane), 2 Huffman (then 128 bytes of code lengths, 4 u32 stream sizes,
 *   the 4 streams).  FORMAT.md section 2 gives the exact layout. */

/* Encodes plane[0, n) at dst, choosing the smallest mode; Huffman only when
 * it saves at least 1/32 of the plane (what it costs in decode speed is not
 * worth less).  Returns 0 with *used = the bytes written, or 1 when that
 * does not fit in dst_cap bytes (dst then holds nothing meaningful).
 * Cannot fail otherwise: no allocation. */
int tp_huf_plane_encode(const uint8_t *plane, size_t n, uint8_t *dst, size_t dst_cap, size_t *used);
/* Decodes one plane of n bytes that starts at src (avail bytes left in the
 * stored chunk).  Raw planes are not copied: *out points into src.
 * Otherwise the plane is written to buf (n bytes) and *out = buf.  *used
 * gets the bytes consumed.  Refuses any input that is not exactly a plane
 * of n bytes. */
int tp_huf_plane_decode(const uint8_t *src, size_t avail, size_t n, uint8_t *buf, const uint8_t **out,
                        size_t *used, tp_err *err);

#endif
