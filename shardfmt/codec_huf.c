/* codec_huf.c - a canonical Huffman coder of byte planes, for the exponent
 * plane of codec exphuf (and whichever other plane it shrinks).
 *
 * Why our own: the exponent plane of bf16 weights has ~20 distinct values
 * and 2.5-3 bits of entropy; an order-0 code is all it needs, and a decoder
 * that looks up 11 bits at a time gets ~3-4 symbols per lookup from it.
 * libzstd does not export its HUF_* functions, and ZSTD_compress over the
 * plane spends bytes on matches and block headers (tpcodecbench compares).
 *
 * Block layout (FORMAT.md 2 is the spec):
 *   mode 0 raw:      u8 0, then the n bytes
 *   mode 1 constant: u8 1, u8 value           (n >= 1, every byte = value)
 *   mode 2 Huffman:  u8 2, 128 bytes of code lengths (symbol 2k in the low
 *                    nibble of byte k, 2k+1 in the high one; 0 = unused,
 *                    else 1..11), 4 x u32 LE stream sizes, the 4 streams.
 * The plane is cut into 4 segments of ceil(n/4) bytes (the last ones
 * shorter, possibly empty), each coded as its own bit stream so the decoder
 * runs four independent dependency chains.  Codes are canonical (DEFLATE's
 * rule: shorter codes first, then by symbol), written first bit first
 * starting at bit 0 of each byte (LSB first), the last byte zero-padded. */
#include <string.h>

#include "codec_internal.h"

#define HUF_MAX_LEN 11
#define HUF_TABLE_BITS 11
#define HUF_TABLE_SIZE (1u << HUF_TABLE_BITS)
#define HUF_STREAMS 4
#define HUF_HEADER (1 + 128 + 4 * HUF_STREAMS)

enum { MODE_RAW = 0, MODE_CONST = 1, MODE_HUF = 2 };

static size_t segment_len(size_t n)
{
    return (n + HUF_STREAMS - 1) / HUF_STREAMS;
}

/* Symbols [begin, end) of the plane that stream k codes. */
static void segment(size_t n, int k, size_t *begin, size_t *end)
{
    size_t seg = segment_len(n), b = seg * (size_t)k;
    *begin = b < n ? b : n;
    *end = b + seg < n ? b + seg : n;
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8), p[2] = (uint8_t)(v >> 16), p[3] = (uint8_t)(v >> 24);
}

static uint32_t reverse_bits(uint32_t code, int len)
{
    uint32_t r = 0;
    for (int i = 0; i < len; i++)
        r = r << 1 | (code >> i & 1);
    return r;
}

/* Canonical codes (DEFLATE's assignment), bit-reversed for LSB-first
 * streams.  lens must describe a complete code (checked by the callers). */
static void canonical_codes(const uint8_t lens[256], uint32_t codes[256])
{
    uint32_t count[HUF_MAX_LEN + 1] = {0}, next[HUF_MAX_LEN + 2] = {0};
    for (int s = 0; s < 256; s++)
        count[lens[s]]++;
    count[0] = 0;
    uint32_t code = 0;
    for (int len = 1; len <= HUF_MAX_LEN; len++) {
        code = (code + count[len - 1]) << 1;
        next[len] = code;
    }
    for (int s = 0; s < 256; s++)
        codes[s] = lens[s] ? reverse_bits(next[lens[s]]++, lens[s]) : 0;
}

/* ---------------------------------------------------------------- encoder */

/* Huffman code lengths of the used symbols of freq, at most HUF_MAX_LEN:
 * when the optimal code is longer, the counts are halved (kept >= 1) and
 * the code rebuilt, which flattens the rare tail; a few rounds at most.
 * Deterministic (ties go to the lower-sorted node). */
static void build_lengths(const uint64_t freq_in[256], uint8_t lens[256])
{
    uint64_t freq[256];
    memcpy(freq, freq_in, sizeof freq);
    for (;;) {
        int sym[256], m = 0;
        for (int s = 0; s < 256; s++)
            if (freq[s])
                sym[m++] = s;
        /* insertion sort by (freq, symbol): m <= 256 */
        for (int i = 1; i < m; i++) {
            int s = sym[i], j = i;
            while (j > 0 && freq[sym[j - 1]] > freq[s])
                sym[j] = sym[j - 1], j--;
            sym[j] = s;
        }
        uint64_t weight[512];
        int parent[512], depth[512];
        for (int i = 0; i < m; i++)
            weight[i] = freq[sym[i]];
        int leaf = 0, inner = m, next = m; /* two queues: leaves [leaf, m), inner nodes [inner, next) */
        while (next < 2 * m - 1) {
            int pick[2];
            for (int k = 0; k < 2; k++) {
                if (leaf < m && (inner == next || weight[leaf] <= weight[inner]))
                    pick[k] = leaf++;
                else
                    pick[k] = inner++;
            }
            weight[next] = weight[pick[0]] + weight[pick[1]];
            parent[pick[0]] = parent[pick[1]] = next;
            next++;
        }
        int max_depth = 0;
        depth[2 * m - 2] = 0;
        for (int i = 2 * m - 3; i >= 0; i--) {
            depth[i] = depth[parent[i]] + 1;
            if (depth[i] > max_depth)
                max_depth = depth[i];
        }
        if (max_depth <= HUF_MAX_LEN) {
            memset(lens, 0, 256);
            for (int i = 0; i < m; i++)
                lens[sym[i]] = (uint8_t)depth[i];
            return;
        }
        for (int s = 0; s < 256; s++)
            if (freq[s])
                freq[s] = freq[s] / 2 | 1;
    }
}

/* Writes the bit stream of plane[0, n) at dst; returns its size (known in
 * advance by the caller, so dst is large enough). */
static size_t write_stream(const uint8_t *plane, size_t n, const uint8_t lens[256], const uint32_t codes[256],
                           uint8_t *dst)
{
    uint64_t acc = 0;
    unsigned bits = 0;
    size_t pos = 0;
    for (size_t i = 0; i < n; i++) {
        acc |= (uint64_t)codes[plane[i]] << bits;
        bits += lens[plane[i]];
        if (bits >= 32) { /* bits < 32 + HUF_MAX_LEN: no overflow */
            put32(dst + pos, (uint32_t)acc);
            pos += 4;
            acc >>= 32;
            bits -= 32;
        }
    }
    for (; bits > 0; bits = bits > 8 ? bits - 8 : 0) {
        dst[pos++] = (uint8_t)acc;
        acc >>= 8;
    }
    return pos;
}

int tp_huf_plane_encode(const uint8_t *plane, size_t n, uint8_t *dst, size_t dst_cap, size_t *used)
{
    uint64_t freq[HUF_STREAMS][256] = {{0}}, total[256] = {0};
    for (int k = 0; k < HUF_STREAMS; k++) {
        size_t b, e;
        segment(n, k, &b, &e);
        for (size_t i = b; i < e; i++)
            freq[k][plane[i]]++;
    }
    int distinct = 0;
    for (int s = 0; s < 256; s++) {
        for (int k = 0; k < HUF_STREAMS; k++)
            total[s] += freq[k][s];
        distinct += total[s] != 0;
    }
    if (distinct == 1) {
        if (dst_cap < 2)
            return 1;
        dst[0] = MODE_CONST;
        dst[1] = plane[0];
        *used = 2;
        return 0;
    }
    uint8_t lens[256] = {0};
    uint64_t stream_bytes[HUF_STREAMS], huf_size = HUF_HEADER;
    if (distinct > 1) {
        build_lengths(total, lens);
        for (int k = 0; k < HUF_STREAMS; k++) {
            uint64_t bits = 0;
            for (int s = 0; s < 256; s++)
                bits += freq[k][s] * lens[s];
            stream_bytes[k] = (bits + 7) / 8;
            huf_size += stream_bytes[k];
        }
    }
    /* Huffman only when it saves 1/32 of the plane: a near-random plane
     * (the mantissas) would gain a fraction of a percent and decode far
     * slower than a copy. */
    if (distinct == 0 || huf_size > n - n / 32 || stream_bytes[0] > UINT32_MAX) {
        if (dst_cap < n + 1)
            return 1;
        dst[0] = MODE_RAW;
        if (n)
            memcpy(dst + 1, plane, n);
        *used = n + 1;
        return 0;
    }
    if (dst_cap < huf_size)
        return 1;
    uint32_t codes[256];
    canonical_codes(lens, codes);
    dst[0] = MODE_HUF;
    for (int k = 0; k < 128; k++)
        dst[1 + k] = (uint8_t)(lens[2 * k] | lens[2 * k + 1] << 4);
    size_t pos = HUF_HEADER;
    for (int k = 0; k < HUF_STREAMS; k++) {
        size_t b, e;
        segment(n, k, &b, &e);
        put32(dst + 1 + 128 + 4 * k, (uint32_t)stream_bytes[k]);
        pos += write_stream(plane + b, e - b, lens, codes, dst + pos);
    }
    *used = pos;
    return 0;
}

/* ---------------------------------------------------------------- decoder */

/* One lookup of HUF_TABLE_BITS bits: up to 4 whole codes that fit in them. */
typedef struct huf_entry {
    uint32_t syms;   /* symbol k in byte k */
    uint8_t n_syms;  /* >= 1 for a complete code */
    uint8_t bits;    /* bits of those n_syms codes */
    uint8_t len1;    /* bits of the first code alone */
    uint8_t pad;
} huf_entry;

/* Code lengths from the header, refused unless they form a complete
 * prefix code (Kraft sum exactly 1) of at least two symbols: then every
 * HUF_TABLE_BITS-bit pattern decodes, so no lookup can fail. */
static int read_lengths(const uint8_t *src, uint8_t lens[256], tp_err *err)
{
    uint32_t kraft = 0;
    int used = 0;
    for (int k = 0; k < 128; k++) {
        lens[2 * k] = src[k] & 15;
        lens[2 * k + 1] = src[k] >> 4;
    }
    for (int s = 0; s < 256; s++) {
        if (!lens[s])
            continue;
        if (lens[s] > HUF_MAX_LEN)
            return tp_errorf(err, "huffman: code length %d over %d", lens[s], HUF_MAX_LEN);
        kraft += 1u << (HUF_MAX_LEN - lens[s]);
        used++;
    }
    if (used < 2 || kraft != 1u << HUF_MAX_LEN)
        return tp_errorf(err, "huffman: code lengths do not form a complete code");
    return 0;
}

static void build_table(const uint8_t lens[256], huf_entry table[HUF_TABLE_SIZE])
{
    uint32_t codes[256];
    canonical_codes(lens, codes);
    uint8_t sym1[HUF_TABLE_SIZE], len1[HUF_TABLE_SIZE];
    for (int s = 0; s < 256; s++)
        for (uint32_t i = codes[s]; lens[s] && i < HUF_TABLE_SIZE; i += 1u << lens[s])
            sym1[i] = (uint8_t)s, len1[i] = lens[s];
    for (uint32_t i = 0; i < HUF_TABLE_SIZE; i++) {
        huf_entry e = {0};
        e.len1 = len1[i];
        while (e.n_syms < 4) {
            uint32_t rest = i >> e.bits; /* the bits not yet used, zero above */
            if (len1[rest] > HUF_TABLE_BITS - e.bits)
                break; /* that code does not end inside this lookup */
            e.syms |= (uint32_t)sym1[rest] << (8 * e.n_syms);
            e.bits = (uint8_t)(e.bits + len1[rest]);
            e.n_syms++;
        }
        table[i] = e;
    }
}

typedef struct bit_reader {
    const uint8_t *start, *p, *end;
    uint64_t buf;     /* bits at and above bit `count` may hold the next bytes already */
    unsigned count;   /* valid bits in buf */
    uint8_t *out, *out_end;
} bit_reader;

static uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8); /* little-endian hosts only, as the rest of the format */
    return v;
}

/* Branchless refill (F. Giesen's "variant 4"): needs 8 readable bytes at p. */
static inline void refill_fast(bit_reader *r)
{
    r->buf |= load64(r->p) << r->count;
    r->p += (63 - r->count) >> 3;
    r->count |= 56;
}

static inline void decode4(bit_reader *r, const huf_entry *t)
{
    for (int k = 0; k < 4; k++) { /* 4 x 11 bits <= 56 */
        huf_entry e = t[r->buf & (HUF_TABLE_SIZE - 1)];
        memcpy(r->out, &e.syms, 4);
        r->out += e.n_syms;
        r->buf >>= e.bits;
        r->count -= e.bits;
    }
}

static inline bool fast_ok(const bit_reader *r)
{
    return r->end - r->p >= 8 && r->out_end - r->out >= 16;
}

/* Rounds of refill + decode4 that every stream can run without a check: a
 * round reads at most 7 new bytes (and loads 8) and writes at most 16. */
static size_t safe_rounds(const bit_reader *r)
{
    size_t rounds = SIZE_MAX;
    for (int k = 0; k < HUF_STREAMS; k++) {
        size_t in = (size_t)(r[k].end - r[k].p), out = (size_t)(r[k].out_end - r[k].out);
        size_t by_in = in >= 8 ? (in - 8) / 7 + 1 : 0, by_out = out >= 16 ? (out - 16) / 16 + 1 : 0;
        size_t k_rounds = by_in < by_out ? by_in : by_out;
        if (k_rounds < rounds)
            rounds = k_rounds;
    }
    return rounds;
}

/* The four streams together while all are far from their ends.  The state
 * lives in scalar locals (macros, not arrays): a byte store through an
 * output pointer may alias anything in memory, and the compiler would
 * reload the state after every symbol. */
#define HUF_REFILL(k)                                \
    do {                                             \
        buf##k |= load64(p##k) << count##k;          \
        p##k += (63 - count##k) >> 3;                \
        count##k |= 56;                              \
    } while (0)
#define HUF_STEP(k)                                           \
    do {                                                      \
        huf_entry e##k = t[buf##k & (HUF_TABLE_SIZE - 1)];    \
        memcpy(out##k, &e##k.syms, 4);                        \
        out##k += e##k.n_syms;                                \
        buf##k >>= e##k.bits;                                 \
        count##k -= e##k.bits;                                \
    } while (0)
#define HUF_LOAD(k) const uint8_t *p##k = r[k].p; uint64_t buf##k = r[k].buf; \
    unsigned count##k = r[k].count; uint8_t *out##k = r[k].out
#define HUF_SAVE(k) (r[k].p = p##k, r[k].buf = buf##k, r[k].count = count##k, r[k].out = out##k)

static void decode_streams_fast(bit_reader *r, const huf_entry *t)
{
    HUF_LOAD(0); HUF_LOAD(1); HUF_LOAD(2); HUF_LOAD(3);
    for (size_t rounds; (rounds = safe_rounds(r)) > 0;) {
        while (rounds--) {
            HUF_REFILL(0); HUF_REFILL(1); HUF_REFILL(2); HUF_REFILL(3);
            for (int j = 0; j < 4; j++) { /* 4 x 11 bits <= 56 */
                HUF_STEP(0); HUF_STEP(1); HUF_STEP(2); HUF_STEP(3);
            }
        }
        HUF_SAVE(0), HUF_SAVE(1), HUF_SAVE(2), HUF_SAVE(3);
    }
}

/* The rest of one stream, one symbol at a time, reading byte by byte. */
static int decode_tail(bit_reader *r, const huf_entry *t, tp_err *err)
{
    while (r->out < r->out_end) {
        while (r->count <= 56 && r->p < r->end) {
            r->buf |= (uint64_t)*r->p++ << r->count;
            r->count += 8;
        }
        uint64_t valid = r->count >= 64 ? ~0ull : (1ull << r->count) - 1;
        huf_entry e = t[(r->buf & valid) & (HUF_TABLE_SIZE - 1)];
        if (e.len1 > r->count)
            return tp_errorf(err, "huffman: stream ends inside a code");
        *r->out++ = (uint8_t)e.syms;
        r->buf >>= e.len1;
        r->count -= e.len1;
    }
    return 0;
}

int tp_huf_plane_decode(const uint8_t *src, size_t avail, size_t n, uint8_t *buf, const uint8_t **out,
                        size_t *used, tp_err *err)
{
    if (avail < 1)
        return tp_errorf(err, "huffman: plane missing (chunk truncated)");
    if (src[0] == MODE_RAW) {
        if (avail - 1 < n)
            return tp_errorf(err, "huffman: raw plane of %zu bytes truncated to %zu", n, avail - 1);
        *out = src + 1;
        *used = n + 1;
        return 0;
    }
    if (src[0] == MODE_CONST) {
        if (avail < 2 || n == 0)
            return tp_errorf(err, "huffman: bad constant plane");
        memset(buf, src[1], n);
        *out = buf;
        *used = 2;
        return 0;
    }
    if (src[0] != MODE_HUF)
        return tp_errorf(err, "huffman: unknown plane mode %u", src[0]);
    if (avail < HUF_HEADER)
        return tp_errorf(err, "huffman: plane header truncated");
    uint8_t lens[256];
    if (read_lengths(src + 1, lens, err) < 0)
        return -1;
    bit_reader r[HUF_STREAMS];
    size_t pos = HUF_HEADER;
    for (int k = 0; k < HUF_STREAMS; k++) {
        size_t len = get32(src + 1 + 128 + 4 * k), b, e;
        if (len > avail - pos)
            return tp_errorf(err, "huffman: stream %d of %zu bytes runs past the chunk", k, len);
        segment(n, k, &b, &e);
        r[k] = (bit_reader){ .start = src + pos, .p = src + pos, .end = src + pos + len,
                             .out = buf + b, .out_end = buf + e };
        pos += len;
    }
    huf_entry table[HUF_TABLE_SIZE];
    build_table(lens, table);
    decode_streams_fast(r, table);
    for (int k = 0; k < HUF_STREAMS; k++) {
        while (fast_ok(&r[k])) {
            refill_fast(&r[k]);
            decode4(&r[k], table);
        }
        if (decode_tail(&r[k], table, err) < 0)
            return tp_err_prefix(err, "stream %d", k);
        /* Every byte of the stream used, and none past it. */
        size_t consumed_bits = (size_t)(r[k].p - r[k].start) * 8 - r[k].count;
        if ((consumed_bits + 7) / 8 != (size_t)(r[k].end - r[k].start))
            return tp_errorf(err, "huffman: stream %d has %zu bytes, its symbols use %zu", k,
                             (size_t)(r[k].end - r[k].start), (consumed_bits + 7) / 8);
    }
    *out = buf;
    *used = pos;
    return 0;
}
