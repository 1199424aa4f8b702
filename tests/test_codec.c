/* test_codec.c - the chunk codecs: the table (names, ids, levels), round
 * trips of every codec over every dtype and awkward sizes (empty, one
 * element, odd counts, a chunk and one element either side), byte and
 * exponent planes as inverse pairs with the documented bit layout, decoding
 * that refuses wrong sizes and damaged chunks without writing outside its
 * buffer, and the point of the plane codecs: bf16 N(0, 0.02) weights
 * compress clearly better with them. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shardfmt.h"
#include "check.h"

static check_rng rng = {0x9e3779b97f4a7c15ull};

static const tp_dtype all_dtypes[] = { TP_BF16, TP_F16, TP_F32, TP_F8_E4M3, TP_I8 };
#define N_DTYPES (sizeof all_dtypes / sizeof *all_dtypes)

static double rng_normal(double sigma)
{
    double u1 = ((check_rng_next(&rng) >> 11) + 1.0) / 9007199254740993.0; /* (0, 1]: log(u1) is finite */
    double u2 = check_rng_uniform(&rng);
    return sigma * sqrt(-2 * log(u1)) * cos(2 * M_PI * u2);
}

/* f32 -> IEEE half, truncating the mantissa; the values drawn here are in
 * half's normal range (|x| < 1, above 2^-14 but for a few). */
static uint16_t to_f16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = u >> 16 & 0x8000;
    int e = (int)(u >> 23 & 0xff) - 127 + 15;
    if (e <= 0)
        return (uint16_t)sign; /* flush the tiny ones to zero */
    return (uint16_t)(sign | (uint32_t)e << 10 | (u >> 13 & 0x3ff));
}

/* Weight-like data of the dtype: n_elems values of N(0, 0.02) (8-bit ones
 * scaled as a quantizer would: amax 0.08 maps to 448 / 127). */
static uint8_t *weights(tp_dtype dt, size_t n_elems)
{
    size_t es = tp_dtype_size(dt);
    uint8_t *buf = malloc(n_elems * es + 1);
    for (size_t i = 0; i < n_elems; i++) {
        float f = (float)rng_normal(0.02);
        uint16_t h;
        switch (dt) {
        case TP_F32: memcpy(buf + 4 * i, &f, 4); break;
        case TP_BF16: h = tp_f32_to_bf16(f); memcpy(buf + 2 * i, &h, 2); break;
        case TP_F16: h = to_f16(f); memcpy(buf + 2 * i, &h, 2); break;
        case TP_F8_E4M3: buf[i] = tp_f32_to_f8e4m3(f / 0.08f * 448); break;
        default: {
            float q = roundf(f / 0.08f * 127);
            buf[i] = (uint8_t)(int8_t)(q > 127 ? 127 : q < -127 ? -127 : q);
        }
        }
    }
    return buf;
}

static uint8_t *random_bytes(size_t n)
{
    uint8_t *b = malloc(n + 1);
    for (size_t i = 0; i < n; i++)
        b[i] = (uint8_t)check_rng_next(&rng);
    return b;
}

/* Encodes raw with c, checks the bound, decodes it back (with and without
 * a scratch buffer) and checks that wrong sizes are refused.  Returns the
 * stored size. */
static size_t round_trip_bytes(tp_codec c, tp_dtype dt, const uint8_t *raw, size_t raw_len, const char *what)
{
    size_t es = tp_dtype_size(dt);
    const char *cn = tp_codec_name(c), *dn = tp_dtype_name(dt);
    size_t cap = tp_codec_bound(c, raw_len);
    uint8_t *stored = malloc(cap + 1), *back = malloc(raw_len + 1), *scratch = malloc(raw_len + 1);
    size_t stored_len = 0;
    tp_err err = { "" };
    int rc = tp_codec_encode(c, tp_codec_get(c)->default_level, dt, raw, raw_len, stored, cap, &stored_len, &err);
    CHECK(rc == 0, "encode %s %s %s %zu bytes: %s", cn, dn, what, raw_len, err.msg);
    if (rc == 0) {
        CHECK(stored_len <= cap, "stored %zu over the bound %zu", stored_len, cap);
        if (c == TP_CODEC_NONE)
            CHECK(stored_len == raw_len && memcmp(stored, raw, raw_len) == 0, "codec none must store raw bytes");
        memset(back, 0xAB, raw_len + 1);
        rc = tp_codec_decode(c, dt, stored, stored_len, back, raw_len, scratch, &err);
        CHECK(rc == 0, "decode %s %s %s %zu bytes: %s", cn, dn, what, raw_len, err.msg);
        CHECK(rc != 0 || memcmp(back, raw, raw_len) == 0, "round trip %s %s %s %zu bytes differs", cn, dn, what,
              raw_len);
        CHECK(back[raw_len] == 0xAB, "decode wrote past the end (%s %s %s %zu)", cn, dn, what, raw_len);
        /* The same without a caller scratch buffer (the codec's own). */
        memset(back, 0xAB, raw_len + 1);
        rc = tp_codec_decode(c, dt, stored, stored_len, back, raw_len, NULL, &err);
        CHECK(rc == 0 && memcmp(back, raw, raw_len) == 0, "decode without scratch %s %s %s: %s", cn, dn, what,
              err.msg);
        /* Wrong expected sizes are refused, never silently padded. */
        if (raw_len >= es)
            CHECK(tp_codec_decode(c, dt, stored, stored_len, back, raw_len - es, scratch, &err) < 0,
                  "decode into a smaller buffer must fail (%s %s %s %zu)", cn, dn, what, raw_len);
        uint8_t *big = malloc(raw_len + es);
        CHECK(tp_codec_decode(c, dt, stored, stored_len, big, raw_len + es, NULL, &err) < 0,
              "decode into a larger buffer must fail (%s %s %s %zu)", cn, dn, what, raw_len);
        free(big);
    }
    free(stored), free(back), free(scratch);
    return stored_len;
}

static void test_round_trips(void)
{
    for (int c = 0; c < TP_CODEC_COUNT; c++)
        for (size_t di = 0; di < N_DTYPES; di++) {
            tp_dtype dt = all_dtypes[di];
            size_t es = tp_dtype_size(dt), chunk_elems = TP_DEFAULT_CHUNK / es;
            /* empty, one element, odd counts, exactly a chunk and a chunk
             * plus/minus one element. */
            size_t counts[] = { 0, 1, 2, 3, 7, 63, 1001, 4099, chunk_elems, chunk_elems - 1, chunk_elems + 1 };
            for (size_t k = 0; k < sizeof counts / sizeof *counts; k++) {
                size_t n = counts[k];
                uint8_t *w = weights(dt, n);
                round_trip_bytes((tp_codec)c, dt, w, n * es, "weights");
                free(w);
                /* Every bit pattern (NaN, inf, subnormals) must survive too. */
                if (n > 65536)
                    continue;
                uint8_t *r = random_bytes(n * es);
                round_trip_bytes((tp_codec)c, dt, r, n * es, "random");
                memset(r, 0x3c, n * es);
                round_trip_bytes((tp_codec)c, dt, r, n * es, "constant");
                free(r);
            }
        }
}

/* A skewed plane whose optimal Huffman code is far longer than the coder's
 * 11-bit limit: symbol k appears 2^k times. */
static void test_long_codes(void)
{
    size_t n = 0;
    uint8_t *raw = malloc(1u << 20);
    for (int k = 0; k < 20 && n < (1u << 20); k++)
        for (size_t j = 0; j < ((size_t)1 << k) && n < (1u << 20); j++)
            raw[n++] = (uint8_t)(k * 13);
    size_t stored = round_trip_bytes(TP_CODEC_EXPHUF, TP_I8, raw, n, "skewed");
    CHECK(stored < n / 10 * 3, "a plane of ~2 bits of entropy per byte must shrink (%zu of %zu)", stored, n);
    free(raw);
}

static void test_table(void)
{
    tp_codec c;
    for (int i = 0; i < TP_CODEC_COUNT; i++) {
        const tp_codec_info *info = tp_codec_get((tp_codec)i);
        CHECK(info && (int)info->id == i, "row %d has id %d", i, info ? (int)info->id : -1);
        if (!info)
            continue;
        CHECK(tp_codec_from_name(info->name, &c) == 0 && c == info->id, "%s by name", info->name);
        CHECK(strcmp(tp_codec_name(info->id), info->name) == 0, "name of %d", i);
        CHECK(info->min_level <= info->default_level && info->default_level <= info->max_level,
              "%s: default level %d outside [%d, %d]", info->name, info->default_level, info->min_level,
              info->max_level);
        CHECK(info->dtypes && info->dtypes[0], "%s says which dtypes it serves", info->name);
        CHECK(strstr(tp_codec_names(), info->name) != NULL, "%s listed in \"%s\"", info->name, tp_codec_names());
        CHECK(tp_codec_bound(info->id, 1000) >= 1000, "%s: bound below the raw size", info->name);
    }
    CHECK(tp_codec_get((tp_codec)TP_CODEC_COUNT) == NULL && tp_codec_get((tp_codec)-1) == NULL, "unknown ids");
    CHECK(strcmp(tp_codec_name((tp_codec)99), "?") == 0, "unknown id's name");
    CHECK(tp_codec_from_name("lz4", &c) < 0 && tp_codec_from_name("ZSTD", &c) < 0 && tp_codec_from_name(NULL, &c) < 0,
          "unknown codec names");
    CHECK(strcmp(tp_codec_names(), "none|zstd|exphuf") == 0, "names: %s", tp_codec_names());
    CHECK(tp_codec_level_ok(TP_CODEC_ZSTD, 1) && tp_codec_level_ok(TP_CODEC_ZSTD, 22) &&
              !tp_codec_level_ok(TP_CODEC_ZSTD, 0) && !tp_codec_level_ok(TP_CODEC_ZSTD, 23),
          "zstd levels are 1..22");
    CHECK(tp_codec_level_ok(TP_CODEC_NONE, 7) && tp_codec_level_ok(TP_CODEC_EXPHUF, 0),
          "codecs without levels ignore the level");
    CHECK(tp_codec_get(TP_CODEC_DEFAULT) != NULL, "the default codec is in the table");
}

static void test_bad_inputs(void)
{
    tp_err err = { "" };
    uint8_t raw[16] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16 }, out[64];
    size_t n;
    for (int c = 0; c < TP_CODEC_COUNT; c++) {
        CHECK_FAILS(tp_codec_encode((tp_codec)c, 1, TP_BF16, raw, 15, out, sizeof out, &n, &err), err, "whole number");
        CHECK_FAILS(tp_codec_encode((tp_codec)c, 1, TP_F32, raw, 6, out, sizeof out, &n, &err), err, "whole number");
        CHECK_FAILS(tp_codec_encode((tp_codec)c, 1, TP_DTYPE_INVALID, raw, 6, out, sizeof out, &n, &err), err,
                    "dtype");
        CHECK_FAILS(tp_codec_encode((tp_codec)c, 1, TP_BF16, raw, 16, out, 8, &n, &err), err, "bound");
    }
    CHECK_FAILS(tp_codec_encode(TP_CODEC_ZSTD, 99, TP_BF16, raw, 16, out, sizeof out, &n, &err), err,
                "level 99 outside [1, 22]");
    CHECK_FAILS(tp_codec_encode((tp_codec)7, 1, TP_BF16, raw, 16, out, sizeof out, &n, &err), err, "unknown codec");
    CHECK_FAILS(tp_codec_decode(TP_CODEC_NONE, TP_BF16, raw, 16, out, 14, NULL, &err), err, "differs");

    /* A zstd frame, damaged: truncated, and garbage. */
    uint8_t big[4096];
    for (size_t i = 0; i < sizeof big; i++)
        big[i] = (uint8_t)(i * 7 % 13);
    size_t cap = tp_codec_bound(TP_CODEC_ZSTD, sizeof big);
    uint8_t *enc = malloc(cap), back[4096];
    CHECK(tp_codec_encode(TP_CODEC_ZSTD, 3, TP_BF16, big, sizeof big, enc, cap, &n, &err) == 0, "encode: %s", err.msg);
    CHECK_FAILS(tp_codec_decode(TP_CODEC_ZSTD, TP_BF16, enc, n - 1, back, sizeof back, NULL, &err), err, "zstd");
    CHECK(tp_codec_decode(TP_CODEC_ZSTD, TP_BF16, raw, sizeof raw, back, sizeof back, NULL, &err) < 0,
          "garbage must fail to decode");
    CHECK(tp_codec_decode(TP_CODEC_ZSTD, TP_BF16, enc, 0, back, sizeof back, NULL, &err) < 0, "an empty frame must fail");
    free(enc);
}

/* exphuf chunks with damage: every truncation and a trailing byte are
 * refused with "codec exphuf"; flipped bytes either fail or decode to
 * something, never outside the buffer (the byte after it is a canary). */
static void test_exphuf_damage(void)
{
    size_t n_elems = 20000, raw_len = 2 * n_elems;
    uint8_t *raw = weights(TP_BF16, n_elems);
    size_t cap = tp_codec_bound(TP_CODEC_EXPHUF, raw_len), n = 0;
    uint8_t *enc = malloc(cap + 1), *back = malloc(raw_len + 1);
    tp_err err = { "" };
    CHECK_OK(tp_codec_encode(TP_CODEC_EXPHUF, 0, TP_BF16, raw, raw_len, enc, cap, &n, &err), err);
    CHECK(enc[0] == 1 && enc[5] == 2, "bf16 weights are split into planes (layout %u) and the exponent plane is "
          "Huffman-coded (mode %u)", enc[0], enc[5]);
    int refused = 0, tried = 0;
    for (size_t len = 0; len < n; len += len < 300 ? 1 : 997) {
        tried++;
        refused += tp_codec_decode(TP_CODEC_EXPHUF, TP_BF16, enc, len, back, raw_len, NULL, &err) < 0 &&
                   strstr(err.msg, "codec exphuf") != NULL;
    }
    CHECK(refused == tried, "every truncation must be refused (%d of %d were)", refused, tried);
    enc[n] = 0;
    CHECK_FAILS(tp_codec_decode(TP_CODEC_EXPHUF, TP_BF16, enc, n + 1, back, raw_len, NULL, &err), err,
                "after the last plane");
    uint8_t *bad = malloc(n);
    memcpy(bad, enc, n);
    bad[0] = 9;
    CHECK_FAILS(tp_codec_decode(TP_CODEC_EXPHUF, TP_BF16, bad, n, back, raw_len, NULL, &err), err, "layout 9");
    memcpy(bad, enc, n);
    bad[1] ^= 1;
    CHECK_FAILS(tp_codec_decode(TP_CODEC_EXPHUF, TP_BF16, bad, n, back, raw_len, NULL, &err), err, "elements");
    memcpy(bad, enc, n);
    bad[5] = 9;
    CHECK_FAILS(tp_codec_decode(TP_CODEC_EXPHUF, TP_BF16, bad, n, back, raw_len, NULL, &err), err, "plane mode 9");
    memcpy(bad, enc, n);
    bad[6] = 0xff; /* code lengths 15, 15 */
    CHECK_FAILS(tp_codec_decode(TP_CODEC_EXPHUF, TP_BF16, bad, n, back, raw_len, NULL, &err), err, "code length");
    memcpy(bad, enc, n);
    for (int k = 6; k < 6 + 128; k++)
        bad[k] = 0x11; /* 256 codes of length 1: over-subscribed */
    CHECK_FAILS(tp_codec_decode(TP_CODEC_EXPHUF, TP_BF16, bad, n, back, raw_len, NULL, &err), err, "complete code");
    memcpy(bad, enc, n);
    bad[6 + 128]++; /* stream 0 one byte longer, stream 1 starts a byte later */
    CHECK(tp_codec_decode(TP_CODEC_EXPHUF, TP_BF16, bad, n, back, raw_len, NULL, &err) < 0,
          "stream sizes that do not add up must fail");
    for (int trial = 0; trial < 2000; trial++) {
        memcpy(bad, enc, n);
        for (int f = 0; f < 1 + trial % 4; f++)
            bad[check_rng_next(&rng) % n] ^= (uint8_t)(1u << (check_rng_next(&rng) % 8));
        back[raw_len] = 0xAB;
        (void)tp_codec_decode(TP_CODEC_EXPHUF, TP_BF16, bad, n, back, raw_len, NULL, &err);
        if (back[raw_len] != 0xAB) {
            CHECK(0, "a damaged chunk was decoded past the end of its buffer");
            break;
        }
    }
    free(bad), free(raw), free(enc), free(back);
}

static void test_byteplanes(void)
{
    const uint8_t src[8] = { 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08 };
    const uint8_t want[8] = { 0x01, 0x03, 0x05, 0x07, 0x02, 0x04, 0x06, 0x08 };
    uint8_t planes[8], back[8];
    tp_byteplanes_split(src, 4, planes);
    CHECK(memcmp(planes, want, 8) == 0, "planes must be all low bytes then all high bytes");
    tp_byteplanes_join(planes, 4, back);
    CHECK(memcmp(back, src, 8) == 0, "join must invert split");

    size_t n = 100003;
    uint8_t *a = random_bytes(2 * n), *p = malloc(2 * n), *b = malloc(2 * n);
    tp_byteplanes_split(a, n, p);
    tp_byteplanes_join(p, n, b);
    CHECK(memcmp(a, b, 2 * n) == 0, "join(split(x)) == x on random data");
    tp_byteplanes_join(a, n, p);
    tp_byteplanes_split(p, n, b);
    CHECK(memcmp(a, b, 2 * n) == 0, "split(join(x)) == x on random data");
    free(a), free(p), free(b);
}

/* The bit layout FORMAT.md 2 documents, one element of each dtype. */
static void test_expplanes(void)
{
    uint8_t planes[8], back[8];
    /* bf16 0xC1A5: sign 1, exponent 0x83, mantissa 0x25 */
    const uint8_t bf[2] = { 0xA5, 0xC1 };
    CHECK(tp_expplanes_count(TP_BF16) == 2, "bf16 planes");
    tp_expplanes_split(TP_BF16, bf, 1, planes);
    CHECK(planes[0] == 0x83 && planes[1] == 0xA5, "bf16 planes %02x %02x", planes[0], planes[1]);
    /* f16 0xB6A5: sign 1, exponent 0x0D, mantissa 0x2A5 */
    const uint8_t hf[2] = { 0xA5, 0xB6 };
    CHECK(tp_expplanes_count(TP_F16) == 3, "f16 planes");
    tp_expplanes_split(TP_F16, hf, 1, planes);
    CHECK(planes[0] == 0x0D && planes[1] == 0xA5 && planes[2] == 0x06, "f16 planes %02x %02x %02x", planes[0],
          planes[1], planes[2]);
    /* f32 0xC1234567: sign 1, exponent 0x82, mantissa 0x234567 */
    const uint8_t f[4] = { 0x67, 0x45, 0x23, 0xC1 };
    CHECK(tp_expplanes_count(TP_F32) == 4, "f32 planes");
    tp_expplanes_split(TP_F32, f, 1, planes);
    CHECK(planes[0] == 0x82 && planes[1] == 0x67 && planes[2] == 0x45 && planes[3] == 0xA3,
          "f32 planes %02x %02x %02x %02x", planes[0], planes[1], planes[2], planes[3]);
    CHECK(tp_expplanes_count(TP_F8_E4M3) == 1 && tp_expplanes_count(TP_I8) == 1, "8-bit dtypes: one plane");

    for (size_t di = 0; di < N_DTYPES; di++) {
        tp_dtype dt = all_dtypes[di];
        size_t n = 4097, len = n * tp_dtype_size(dt);
        uint8_t *a = random_bytes(len), *p = malloc(n * (size_t)tp_expplanes_count(dt)), *b = malloc(len + 1);
        tp_expplanes_split(dt, a, n, p);
        tp_expplanes_join(dt, p, n, b + 1); /* an odd address: the join must not assume alignment */
        CHECK(memcmp(a, b + 1, len) == 0, "%s: join(split(x)) == x", tp_dtype_name(dt));
        free(a), free(p), free(b);
    }
    (void)back;
}

static double ratio(tp_codec c, tp_dtype dt, const uint8_t *raw, size_t len)
{
    size_t cap = tp_codec_bound(c, len), n = 0;
    uint8_t *enc = malloc(cap);
    tp_err err = { "" };
    CHECK(tp_codec_encode(c, tp_codec_get(c)->default_level, dt, raw, len, enc, cap, &n, &err) == 0, "encode: %s",
          err.msg);
    free(enc);
    return (double)n / (double)len;
}

/* The reason for the plane codecs: bf16 weights' exponents are highly
 * repetitive, the mantissas nearly random.  The order-0 entropy of bf16
 * N(0, 0.02) is 0.657 of raw with the exponent in a plane of its own
 * (8 + 2.55 bits of 16); byte planes + zstd reach ~0.68. */
static void test_compression(void)
{
    size_t n = TP_DEFAULT_CHUNK / 2;
    uint8_t *w = weights(TP_BF16, n);
    double exphuf = ratio(TP_CODEC_EXPHUF, TP_BF16, w, 2 * n), planes = ratio(TP_CODEC_ZSTD, TP_BF16, w, 2 * n);
    double plain = ratio(TP_CODEC_ZSTD, TP_I8, w, 2 * n); /* a 1-byte dtype: no planes */
    printf("bf16 N(0,0.02), 1 MiB: exphuf %.4f, byte planes + zstd -1 %.4f, plain zstd -1 %.4f of raw\n", exphuf,
           planes, plain);
    CHECK(exphuf <= 0.665, "exphuf should compress bf16 weights to <= 0.665 (got %.4f)", exphuf);
    CHECK(planes <= 0.75, "byte planes should compress bf16 weights to <= 0.75 (got %.3f)", planes);
    CHECK(planes < plain - 0.05, "byte planes (%.3f) should beat no planes (%.3f) clearly", planes, plain);
    CHECK(exphuf < planes - 0.01, "exphuf (%.4f) should beat byte planes + zstd (%.4f)", exphuf, planes);
    free(w);
    /* 8-bit weights compress too: fp8 e4m3 and int8 of the same values. */
    const tp_dtype q[] = { TP_F8_E4M3, TP_I8 };
    for (int k = 0; k < 2; k++) {
        uint8_t *b = weights(q[k], TP_DEFAULT_CHUNK);
        double r = ratio(TP_CODEC_EXPHUF, q[k], b, TP_DEFAULT_CHUNK), z = ratio(TP_CODEC_ZSTD, q[k], b, TP_DEFAULT_CHUNK);
        printf("%s of N(0,0.02) weights, 1 MiB: exphuf %.4f, zstd -1 %.4f of raw\n", tp_dtype_name(q[k]), r, z);
        CHECK(r < 0.9 && r <= z + 0.001, "%s: exphuf %.4f should shrink it as zstd does (%.4f)",
              tp_dtype_name(q[k]), r, z);
        /* ... by zstd, plane mode 3 (FORMAT.md 2.2: it decodes faster there) */
        size_t cap = tp_codec_bound(TP_CODEC_EXPHUF, TP_DEFAULT_CHUNK), n = 0;
        uint8_t *enc = malloc(cap);
        tp_err err = { "" };
        CHECK_OK(tp_codec_encode(TP_CODEC_EXPHUF, 0, q[k], b, TP_DEFAULT_CHUNK, enc, cap, &n, &err), err);
        CHECK(enc[0] == 1 && enc[5] == 3, "%s: layout %u, plane mode %u (want 1, 3)", tp_dtype_name(q[k]), enc[0],
              enc[5]);
        for (size_t len = 0; len < n; len += len < 40 ? 1 : 4099) /* every truncation refused */
            CHECK(tp_codec_decode(TP_CODEC_EXPHUF, q[k], enc, len, b, TP_DEFAULT_CHUNK, NULL, &err) < 0,
                  "%s: a chunk cut to %zu bytes must fail", tp_dtype_name(q[k]), len);
        free(enc);
        free(b);
    }
}

int main(void)
{
    test_table();
    test_round_trips();
    test_long_codes();
    test_bad_inputs();
    test_exphuf_damage();
    test_byteplanes();
    test_expplanes();
    test_compression();
    return check_finish("test_codec");
}
