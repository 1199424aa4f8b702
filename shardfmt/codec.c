/* codec.c - the chunk codecs of the tpshard format (FORMAT.md, "Codecs") as a
 * table: one row per codec, its code in codec_NAME.c.  The public entry
 * points check what every codec needs (element size, buffer sizes) and then
 * call the row.  Also here: the per-thread codec cache, and the byte and
 * exponent plane transforms that the codecs use.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "codec_internal.h"

#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* ------------------------------------------------------------------ table */

/* Indexed by tp_codec.  Adding a codec: an id in shardfmt.h, a row here, a
 * file codec_NAME.c defining tp_codec_row_NAME, and FORMAT.md section 2. */
static const tp_codec_row *const codec_table[TP_CODEC_COUNT] = {
    [TP_CODEC_NONE] = &tp_codec_row_none,
    [TP_CODEC_ZSTD] = &tp_codec_row_zstd,
    [TP_CODEC_EXPHUF] = &tp_codec_row_exphuf,
};

static const tp_codec_row *row_of(tp_codec c)
{
    return (unsigned)c < TP_CODEC_COUNT ? codec_table[c] : NULL;
}

const tp_codec_info *tp_codec_get(tp_codec c)
{
    const tp_codec_row *r = row_of(c);
    return r ? &r->info : NULL;
}

const char *tp_codec_name(tp_codec c)
{
    const tp_codec_row *r = row_of(c);
    return r ? r->info.name : "?";
}

int tp_codec_from_name(const char *name, tp_codec *out)
{
    for (int i = 0; name && i < TP_CODEC_COUNT; i++)
        if (strcmp(name, codec_table[i]->info.name) == 0) {
            *out = codec_table[i]->info.id;
            return 0;
        }
    return -1;
}

static char names_text[128];
static pthread_once_t names_once = PTHREAD_ONCE_INIT;

static void names_init(void)
{
    for (int i = 0; i < TP_CODEC_COUNT; i++) {
        if (i)
            strcat(names_text, "|");
        strcat(names_text, codec_table[i]->info.name);
    }
}

const char *tp_codec_names(void)
{
    pthread_once(&names_once, names_init);
    return names_text;
}

bool tp_codec_level_ok(tp_codec c, int level)
{
    const tp_codec_row *r = row_of(c);
    if (!r)
        return false;
    if (r->info.min_level == r->info.max_level)
        return true;
    return level >= r->info.min_level && level <= r->info.max_level;
}

/* ------------------------------------------------------- per-thread cache */

static pthread_key_t cache_key;
static pthread_once_t cache_once = PTHREAD_ONCE_INIT;

void tp_codec_zstd_cache_free(tp_codec_cache *c); /* codec_zstd.c */

static void cache_free(void *p)
{
    tp_codec_cache *c = p;
    if (!c)
        return;
    tp_codec_zstd_cache_free(c);
    free(c->scratch);
    free(c->scratch2);
    free(c);
}

static void cache_key_init(void)
{
    pthread_key_create(&cache_key, cache_free);
}

tp_codec_cache *tp_codec_thread_cache(void)
{
    pthread_once(&cache_once, cache_key_init);
    tp_codec_cache *c = pthread_getspecific(cache_key);
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

static uint8_t *grow(uint8_t **buf, size_t *cap, size_t n)
{
    if (*cap < n || !*buf) {
        uint8_t *p = realloc(*buf, n ? n : 1);
        if (!p)
            return NULL;
        *buf = p;
        *cap = n;
    }
    return *buf;
}

uint8_t *tp_codec_scratch(tp_codec_cache *c, size_t n)
{
    return grow(&c->scratch, &c->scratch_cap, n);
}

uint8_t *tp_codec_scratch2(tp_codec_cache *c, size_t n)
{
    return grow(&c->scratch2, &c->scratch2_cap, n);
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

/* -------------------------------------------------------- exponent planes */

/* Plane 0 is the exponent field, alone in its byte, because that is the
 * one part of a weight with little entropy (2-3 bits out of 8 for bf16
 * weights); the sign goes with the mantissa, which is close to random.
 *   BF16: E = bits 7..14;  S|M = sign << 7 | bits 0..6
 *   F16:  E = bits 10..14; M = bits 0..7; S|M = sign << 2 | bits 8..9
 *   F32:  E = bits 23..30; M = bits 0..7; M = bits 8..15; S|M = sign << 7 | bits 16..22
 *   1-byte dtypes (F8_E4M3, I8): one plane, the bytes as they are (its
 *   Huffman code captures the whole value's distribution). */
int tp_expplanes_count(tp_dtype dt)
{
    switch (dt) {
    case TP_BF16: return 2;
    case TP_F16: return 3;
    case TP_F32: return 4;
    default: return (int)tp_dtype_size(dt);
    }
}

static void split_bf16(const uint8_t *src, size_t n, uint8_t *dst)
{
    uint8_t *e = dst, *sm = dst + n;
    for (size_t i = 0; i < n; i++) {
        uint16_t v = (uint16_t)(src[2 * i] | src[2 * i + 1] << 8);
        e[i] = (uint8_t)(v >> 7);
        sm[i] = (uint8_t)((v >> 8 & 0x80) | (v & 0x7f));
    }
}

/* The decoder's hot loop besides Huffman: 16 elements a step with SSE2
 * (every x86-64 has it), the rest one at a time. */
static void join_bf16(const uint8_t *const planes[], size_t n, uint8_t *dst)
{
    const uint8_t *e = planes[0], *sm = planes[1];
    size_t i = 0;
#ifdef __SSE2__
    const __m128i m7f = _mm_set1_epi8(0x7f), m80 = _mm_set1_epi8((char)0x80);
    for (; i + 16 <= n; i += 16) {
        __m128i ev = _mm_loadu_si128((const __m128i *)(const void *)(e + i));
        __m128i sv = _mm_loadu_si128((const __m128i *)(const void *)(sm + i));
        /* low byte: exponent bit 0, then 7 mantissa bits; high byte: sign,
         * then exponent bits 7..1.  16-bit shifts, masked per byte. */
        __m128i lo = _mm_or_si128(_mm_and_si128(sv, m7f), _mm_and_si128(_mm_slli_epi16(ev, 7), m80));
        __m128i hi = _mm_or_si128(_mm_and_si128(sv, m80), _mm_and_si128(_mm_srli_epi16(ev, 1), m7f));
        _mm_storeu_si128((__m128i *)(void *)(dst + 2 * i), _mm_unpacklo_epi8(lo, hi));
        _mm_storeu_si128((__m128i *)(void *)(dst + 2 * i + 16), _mm_unpackhi_epi8(lo, hi));
    }
#endif
    for (; i < n; i++) {
        uint16_t v = (uint16_t)((sm[i] & 0x80) << 8 | e[i] << 7 | (sm[i] & 0x7f));
        dst[2 * i] = (uint8_t)v;
        dst[2 * i + 1] = (uint8_t)(v >> 8);
    }
}

static void split_f16(const uint8_t *src, size_t n, uint8_t *dst)
{
    uint8_t *e = dst, *m = dst + n, *sm = dst + 2 * n;
    for (size_t i = 0; i < n; i++) {
        uint16_t v = (uint16_t)(src[2 * i] | src[2 * i + 1] << 8);
        e[i] = (uint8_t)(v >> 10 & 0x1f);
        m[i] = (uint8_t)v;
        sm[i] = (uint8_t)((v >> 13 & 0x4) | (v >> 8 & 0x3));
    }
}

static void join_f16(const uint8_t *const planes[], size_t n, uint8_t *dst)
{
    const uint8_t *e = planes[0], *m = planes[1], *sm = planes[2];
    for (size_t i = 0; i < n; i++) {
        /* Masks keep a corrupt plane byte from spilling into other fields. */
        uint16_t v = (uint16_t)((sm[i] & 0x4) << 13 | (e[i] & 0x1f) << 10 | (sm[i] & 0x3) << 8 | m[i]);
        dst[2 * i] = (uint8_t)v;
        dst[2 * i + 1] = (uint8_t)(v >> 8);
    }
}

static void split_f32(const uint8_t *src, size_t n, uint8_t *dst)
{
    uint8_t *e = dst, *m0 = dst + n, *m1 = dst + 2 * n, *sm = dst + 3 * n;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *b = src + 4 * i;
        e[i] = (uint8_t)(b[3] << 1 | b[2] >> 7);
        m0[i] = b[0];
        m1[i] = b[1];
        sm[i] = (uint8_t)((b[3] & 0x80) | (b[2] & 0x7f));
    }
}

static void join_f32(const uint8_t *const planes[], size_t n, uint8_t *dst)
{
    const uint8_t *e = planes[0], *m0 = planes[1], *m1 = planes[2], *sm = planes[3];
    for (size_t i = 0; i < n; i++) {
        uint8_t *b = dst + 4 * i;
        b[0] = m0[i];
        b[1] = m1[i];
        b[2] = (uint8_t)((e[i] & 1) << 7 | (sm[i] & 0x7f));
        b[3] = (uint8_t)((sm[i] & 0x80) | e[i] >> 1);
    }
}

void tp_expplanes_split(tp_dtype dt, const uint8_t *src, size_t n_elems, uint8_t *dst)
{
    switch (dt) {
    case TP_BF16: split_bf16(src, n_elems, dst); return;
    case TP_F16: split_f16(src, n_elems, dst); return;
    case TP_F32: split_f32(src, n_elems, dst); return;
    default:
        if (n_elems)
            memcpy(dst, src, n_elems * tp_dtype_size(dt));
        return;
    }
}

void tp_expplanes_join_planes(tp_dtype dt, const uint8_t *const planes[], size_t n_elems, uint8_t *dst)
{
    switch (dt) {
    case TP_BF16: join_bf16(planes, n_elems, dst); return;
    case TP_F16: join_f16(planes, n_elems, dst); return;
    case TP_F32: join_f32(planes, n_elems, dst); return;
    default:
        if (n_elems)
            memcpy(dst, planes[0], n_elems * tp_dtype_size(dt));
        return;
    }
}

void tp_expplanes_join(tp_dtype dt, const uint8_t *src, size_t n_elems, uint8_t *dst)
{
    const uint8_t *planes[TP_EXPPLANES_MAX];
    for (int p = 0; p < tp_expplanes_count(dt); p++)
        planes[p] = src + (size_t)p * n_elems;
    tp_expplanes_join_planes(dt, planes, n_elems, dst);
}

/* ------------------------------------------------------------ encode/decode */

size_t tp_codec_bound(tp_codec c, size_t raw_len)
{
    const tp_codec_row *r = row_of(c);
    return r ? r->bound(raw_len) : raw_len;
}

static int check_chunk(const tp_codec_row *r, tp_codec c, tp_dtype dtype, size_t raw_len, const char *what,
                       tp_err *err)
{
    if (!r)
        return tp_errorf(err, "unknown codec %d", (int)c);
    size_t elem_size = tp_dtype_size(dtype);
    if (elem_size == 0)
        return tp_errorf(err, "codec %s %s: unsupported dtype %d", r->info.name, what, (int)dtype);
    if (raw_len % elem_size != 0)
        return tp_errorf(err, "codec %s %s: chunk of %zu bytes is not a whole number of %zu-byte elements",
                         r->info.name, what, raw_len, elem_size);
    return 0;
}

int tp_codec_encode(tp_codec c, int level, tp_dtype dtype,
                    const uint8_t *raw, size_t raw_len,
                    uint8_t *dst, size_t dst_cap, size_t *stored_len, tp_err *err)
{
    const tp_codec_row *r = row_of(c);
    if (check_chunk(r, c, dtype, raw_len, "encode", err) < 0)
        return -1;
    if (!tp_codec_level_ok(c, level))
        return tp_errorf(err, "codec %s: level %d outside [%d, %d]", r->info.name, level, r->info.min_level,
                         r->info.max_level);
    if (dst_cap < r->bound(raw_len))
        return tp_errorf(err, "codec %s: output buffer of %zu bytes is under the bound %zu for %zu raw bytes",
                         r->info.name, dst_cap, r->bound(raw_len), raw_len);
    return r->encode(level, dtype, raw, raw_len, dst, dst_cap, stored_len, err);
}

int tp_codec_decode(tp_codec c, tp_dtype dtype,
                    const uint8_t *stored, size_t stored_len,
                    uint8_t *dst, size_t raw_len, uint8_t *scratch, tp_err *err)
{
    const tp_codec_row *r = row_of(c);
    if (check_chunk(r, c, dtype, raw_len, "decode", err) < 0)
        return -1;
    return r->decode(dtype, stored, stored_len, dst, raw_len, scratch, err);
}
