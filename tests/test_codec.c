/* test_codec.c - the chunk codec: round trips of both codecs over every
 * dtype and awkward sizes, byte planes as an inverse pair, decoding that
 * refuses wrong sizes and damaged frames, and the point of byte planes: a
 * bf16 N(0, 0.02) weight compresses clearly better with them. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shardfmt.h"
#include "check.h"

static check_rng rng = {0x9e3779b97f4a7c15ull};

static double rng_normal(double sigma)
{
    double u1 = ((check_rng_next(&rng) >> 11) + 1.0) / 9007199254740993.0; /* (0, 1]: log(u1) is finite */
    double u2 = check_rng_uniform(&rng);
    return sigma * sqrt(-2 * log(u1)) * cos(2 * M_PI * u2);
}

/* Weight-like data of the dtype: n_elems values of N(0, 0.02). */
static uint8_t *weights(tp_dtype dt, size_t n_elems)
{
    size_t es = tp_dtype_size(dt);
    uint8_t *buf = malloc(n_elems * es + 1);
    for (size_t i = 0; i < n_elems; i++) {
        float f = (float)rng_normal(0.02);
        if (dt == TP_F32) {
            memcpy(buf + 4 * i, &f, 4);
        } else {
            /* F16 is exercised with the same bit patterns as BF16: the codec
             * only sees bytes. */
            uint16_t h = tp_f32_to_bf16(f);
            memcpy(buf + 2 * i, &h, 2);
        }
    }
    return buf;
}

static void round_trip(tp_codec c, tp_dtype dt, size_t n_elems)
{
    size_t es = tp_dtype_size(dt), raw_len = n_elems * es;
    uint8_t *raw = weights(dt, n_elems);
    size_t cap = tp_codec_bound(c, raw_len);
    uint8_t *stored = malloc(cap + 1), *back = malloc(raw_len + 1), *scratch = malloc(raw_len + 1);
    size_t stored_len = 0;
    tp_err err = { "" };
    int rc = tp_codec_encode(c, 3, es, raw, raw_len, stored, cap, &stored_len, &err);
    CHECK(rc == 0, "encode %s %s %zu elems: %s", tp_codec_name(c), tp_dtype_name(dt), n_elems, err.msg);
    if (rc == 0) {
        CHECK(stored_len <= cap, "stored %zu over the bound %zu", stored_len, cap);
        if (c == TP_CODEC_NONE)
            CHECK(stored_len == raw_len && memcmp(stored, raw, raw_len) == 0, "codec none must store raw bytes");
        memset(back, 0xAB, raw_len + 1);
        rc = tp_codec_decode(c, es, stored, stored_len, back, raw_len, scratch, &err);
        CHECK(rc == 0, "decode %s %s %zu elems: %s", tp_codec_name(c), tp_dtype_name(dt), n_elems, err.msg);
        CHECK(rc != 0 || memcmp(back, raw, raw_len) == 0, "round trip %s %s %zu elems differs", tp_codec_name(c),
              tp_dtype_name(dt), n_elems);
        CHECK(back[raw_len] == 0xAB, "decode wrote past the end (%s %s %zu)", tp_codec_name(c), tp_dtype_name(dt),
              n_elems);
        /* The same without a caller scratch buffer (the codec's own). */
        rc = tp_codec_decode(c, es, stored, stored_len, back, raw_len, NULL, &err);
        CHECK(rc == 0 && memcmp(back, raw, raw_len) == 0, "decode without scratch %s %s: %s", tp_codec_name(c),
              tp_dtype_name(dt), err.msg);
        /* Wrong expected sizes are refused, never silently padded. */
        if (raw_len >= es) {
            CHECK(tp_codec_decode(c, es, stored, stored_len, back, raw_len - es, scratch, &err) < 0,
                  "decode into a smaller buffer must fail (%s %s %zu)", tp_codec_name(c), tp_dtype_name(dt), n_elems);
        }
        uint8_t *big = malloc(raw_len + es);
        CHECK(tp_codec_decode(c, es, stored, stored_len, big, raw_len + es, NULL, &err) < 0,
              "decode into a larger buffer must fail (%s %s %zu)", tp_codec_name(c), tp_dtype_name(dt), n_elems);
        free(big);
    }
    free(raw), free(stored), free(back), free(scratch);
}

static void test_round_trips(void)
{
    const tp_dtype dts[] = { TP_BF16, TP_F16, TP_F32 };
    const tp_codec cs[] = { TP_CODEC_NONE, TP_CODEC_ZSTD };
    for (int ci = 0; ci < 2; ci++)
        for (int di = 0; di < 3; di++) {
            size_t es = tp_dtype_size(dts[di]), chunk_elems = TP_DEFAULT_CHUNK / es;
            /* empty, one element, odd counts, exactly a chunk and a chunk
             * plus/minus one element (2 bytes for the 2-byte dtypes). */
            size_t counts[] = { 0, 1, 3, 7, 1001, chunk_elems, chunk_elems - 1, chunk_elems + 1 };
            for (size_t k = 0; k < sizeof counts / sizeof *counts; k++)
                round_trip(cs[ci], dts[di], counts[k]);
        }
}

static void test_bad_inputs(void)
{
    tp_err err = { "" };
    uint8_t raw[16] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16 }, out[64];
    size_t n;
    CHECK(tp_codec_encode(TP_CODEC_ZSTD, 3, 2, raw, 15, out, sizeof out, &n, &err) < 0 &&
              strstr(err.msg, "whole number"), "an odd byte count of a 2-byte dtype must fail: %s", err.msg);
    CHECK(tp_codec_encode(TP_CODEC_NONE, 3, 4, raw, 6, out, sizeof out, &n, &err) < 0,
          "6 bytes of a 4-byte dtype must fail");
    CHECK(tp_codec_encode(TP_CODEC_NONE, 0, 2, raw, 16, out, 8, &n, &err) < 0, "codec none into a short buffer");
    CHECK(tp_codec_decode(TP_CODEC_NONE, 2, raw, 16, out, 14, NULL, &err) < 0, "codec none with the wrong size");

    /* A zstd frame, damaged: truncated, and garbage. */
    uint8_t big[4096];
    for (size_t i = 0; i < sizeof big; i++)
        big[i] = (uint8_t)(i * 7 % 13);
    size_t cap = tp_codec_bound(TP_CODEC_ZSTD, sizeof big);
    uint8_t *enc = malloc(cap), back[4096];
    CHECK(tp_codec_encode(TP_CODEC_ZSTD, 3, 2, big, sizeof big, enc, cap, &n, &err) == 0, "encode: %s", err.msg);
    CHECK(tp_codec_decode(TP_CODEC_ZSTD, 2, enc, n - 1, back, sizeof back, NULL, &err) < 0 &&
              strstr(err.msg, "zstd"), "a truncated frame must fail: %s", err.msg);
    CHECK(tp_codec_decode(TP_CODEC_ZSTD, 2, raw, sizeof raw, back, sizeof back, NULL, &err) < 0,
          "garbage must fail to decode");
    CHECK(tp_codec_decode(TP_CODEC_ZSTD, 2, enc, 0, back, sizeof back, NULL, &err) < 0, "an empty frame must fail");
    free(enc);

    tp_codec c;
    CHECK(tp_codec_from_name("zstd", &c) == 0 && c == TP_CODEC_ZSTD, "zstd by name");
    CHECK(tp_codec_from_name("none", &c) == 0 && c == TP_CODEC_NONE, "none by name");
    CHECK(tp_codec_from_name("lz4", &c) < 0 && tp_codec_from_name("ZSTD", &c) < 0, "unknown codec names");
    CHECK(strcmp(tp_codec_name(TP_CODEC_ZSTD), "zstd") == 0 && strcmp(tp_codec_name(TP_CODEC_NONE), "none") == 0,
          "codec names");
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
    uint8_t *a = malloc(2 * n), *p = malloc(2 * n), *b = malloc(2 * n);
    for (size_t i = 0; i < 2 * n; i++)
        a[i] = (uint8_t)check_rng_next(&rng);
    tp_byteplanes_split(a, n, p);
    tp_byteplanes_join(p, n, b);
    CHECK(memcmp(a, b, 2 * n) == 0, "join(split(x)) == x on random data");
    tp_byteplanes_join(a, n, p);
    tp_byteplanes_split(p, n, b);
    CHECK(memcmp(a, b, 2 * n) == 0, "split(join(x)) == x on random data");
    free(a), free(p), free(b);
}

static double ratio(size_t elem_size, const uint8_t *raw, size_t len)
{
    size_t cap = tp_codec_bound(TP_CODEC_ZSTD, len), n = 0;
    uint8_t *enc = malloc(cap);
    tp_err err = { "" };
    CHECK(tp_codec_encode(TP_CODEC_ZSTD, 3, elem_size, raw, len, enc, cap, &n, &err) == 0, "encode: %s", err.msg);
    free(enc);
    return (double)n / (double)len;
}

/* The reason for byte planes: bf16 weights' high bytes (sign, exponent) are
 * highly repetitive, the low bytes (mantissa) nearly random. */
static void test_bf16_compression(void)
{
    size_t n = TP_DEFAULT_CHUNK / 2;
    uint8_t *w = weights(TP_BF16, n);
    double with_planes = ratio(2, w, 2 * n), without = ratio(1, w, 2 * n);
    printf("bf16 N(0,0.02), 1 MiB, zstd -3: %.3f of raw with byte planes, %.3f without\n", with_planes, without);
    CHECK(with_planes <= 0.75, "byte planes should compress bf16 weights to <= 0.75 (got %.3f)", with_planes);
    CHECK(with_planes < without - 0.05, "byte planes (%.3f) should beat no planes (%.3f) clearly", with_planes,
          without);
    free(w);
}

int main(void)
{
    test_round_trips();
    test_bad_inputs();
    test_byteplanes();
    test_bf16_compression();
    return check_finish("test_codec");
}
