/* test_util.c - dtype conversions, overflow helpers, checksums, files, the
 * thread pool and the progress bar of shardfmt. */
#include "shardfmt.h"
#include "json_internal.h"

#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include "check.h"

static uint32_t bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static void test_dtypes(void)
{
    CHECK(tp_dtype_from_name("BF16") == TP_BF16);
    CHECK(tp_dtype_from_name("F16") == TP_F16);
    CHECK(tp_dtype_from_name("F32") == TP_F32);
    CHECK(tp_dtype_from_name("F64") == TP_DTYPE_INVALID);
    CHECK(tp_dtype_from_name("bf16") == TP_DTYPE_INVALID);
    CHECK(tp_dtype_from_name(NULL) == TP_DTYPE_INVALID);
    CHECK(strcmp(tp_dtype_name(TP_BF16), "BF16") == 0);
    CHECK(strcmp(tp_dtype_name(TP_F16), "F16") == 0);
    CHECK(strcmp(tp_dtype_name(TP_F32), "F32") == 0);
    CHECK(tp_dtype_size(TP_BF16) == 2 && tp_dtype_size(TP_F16) == 2 && tp_dtype_size(TP_F32) == 4);
    CHECK(tp_dtype_size(TP_DTYPE_INVALID) == 0);
    CHECK(tp_dtype_from_name("F8_E4M3") == TP_F8_E4M3 && tp_dtype_from_name("I8") == TP_I8);
    CHECK(strcmp(tp_dtype_name(TP_F8_E4M3), "F8_E4M3") == 0 && strcmp(tp_dtype_name(TP_I8), "I8") == 0);
    CHECK(tp_dtype_size(TP_F8_E4M3) == 1 && tp_dtype_size(TP_I8) == 1);
    CHECK(tp_dtype_from_name("F8_E5M2") == TP_DTYPE_INVALID);
}

/* e4m3fn against values worked out by hand (torch.float8_e4m3fn agrees),
 * then every byte: decode, encode gives the byte back (but NaN / -0). */
static void test_f8e4m3(void)
{
    CHECK(tp_f8e4m3_to_f32(0x00) == 0.0f);
    CHECK(tp_f8e4m3_to_f32(0x01) == 0.001953125f);   /* 2^-9, smallest subnormal */
    CHECK(tp_f8e4m3_to_f32(0x08) == 0.015625f);      /* 2^-6, smallest normal */
    CHECK(tp_f8e4m3_to_f32(0x38) == 1.0f);
    CHECK(tp_f8e4m3_to_f32(0x7e) == 448.0f);
    CHECK(tp_f8e4m3_to_f32(0xfe) == -448.0f);
    CHECK(isnan(tp_f8e4m3_to_f32(0x7f)) && isnan(tp_f8e4m3_to_f32(0xff)));
    CHECK(tp_f32_to_f8e4m3(1.0f) == 0x38);
    CHECK(tp_f32_to_f8e4m3(1000.0f) == 0x7e && tp_f32_to_f8e4m3(-INFINITY) == 0xfe);
    CHECK(tp_f32_to_f8e4m3(NAN) == 0x7f);
    CHECK(tp_f32_to_f8e4m3(1.0625f) == 0x38);        /* halfway 1 and 1.125: to even */
    CHECK(tp_f32_to_f8e4m3(1.1875f) == 0x3a);        /* halfway 1.125 and 1.25: to even */
    CHECK(tp_f32_to_f8e4m3(0.0009765625f) == 0x00);  /* 2^-10: halfway 0 and 2^-9 */
    CHECK(tp_f32_to_f8e4m3(0.0029296875f) == 0x02);  /* 1.5 * 2^-9: to even */
    CHECK(tp_f32_to_f8e4m3(0.0146484375f) == 0x08);  /* 7.5 * 2^-9 rounds up into the normals */
    CHECK(tp_f32_to_f8e4m3(464.0f) == 0x7e);          /* past max: saturates, never NaN */
    int bad = 0;
    for (int b = 0; b < 256; b++) {
        if (b == 0x7f || b == 0xff || b == 0x80)
            continue;
        if (tp_f32_to_f8e4m3(tp_f8e4m3_to_f32((uint8_t)b)) != b)
            bad++;
    }
    CHECK(bad == 0);
}

static void test_bf16(void)
{
    CHECK(tp_f32_to_bf16(1.0f) == 0x3f80);
    CHECK(tp_f32_to_bf16(-2.0f) == 0xc000);
    CHECK(tp_f32_to_bf16(0.0f) == 0x0000);
    CHECK(tp_f32_to_bf16(-0.0f) == 0x8000);
    CHECK(tp_bf16_to_f32(0x3f80) == 1.0f);
    CHECK(tp_bf16_to_f32(0x4049) == from_bits(0x40490000u));
    /* Ties go to even: 1 + 2^-8 sits exactly between 0x3f80 and 0x3f81. */
    CHECK(tp_f32_to_bf16(from_bits(0x3f808000u)) == 0x3f80);
    /* ... and 0x3f818000 between 0x3f81 (odd) and 0x3f82 (even). */
    CHECK(tp_f32_to_bf16(from_bits(0x3f818000u)) == 0x3f82);
    /* Just above a tie rounds up, just below rounds down. */
    CHECK(tp_f32_to_bf16(from_bits(0x3f808001u)) == 0x3f81);
    CHECK(tp_f32_to_bf16(from_bits(0x3f807fffu)) == 0x3f80);
    /* Infinity stays infinity; FLT_MAX rounds up to infinity. */
    CHECK(tp_f32_to_bf16(INFINITY) == 0x7f80);
    CHECK(tp_f32_to_bf16(-INFINITY) == 0xff80);
    CHECK(tp_f32_to_bf16(from_bits(0x7f7fffffu)) == 0x7f80);
    /* A NaN whose payload sits only in the low bits must stay NaN. */
    uint16_t n = tp_f32_to_bf16(from_bits(0x7f800001u));
    CHECK((n & 0x7f80) == 0x7f80 && (n & 0x007f) != 0);
    CHECK(isnan(tp_bf16_to_f32(n)));
    CHECK(isnan(tp_bf16_to_f32(tp_f32_to_bf16(NAN))));
    /* Subnormal f32 round trip through bf16. */
    CHECK(tp_f32_to_bf16(from_bits(0x00010000u)) == 0x0001);
    CHECK(bits(tp_bf16_to_f32(0x0001)) == 0x00010000u);
    /* Every bf16 value round-trips exactly through f32. */
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = tp_bf16_to_f32((uint16_t)h);
        if (isnan(f))
            continue;
        if (tp_f32_to_bf16(f) != h)
            bad++;
    }
    CHECK(bad == 0);
}

static void test_f16(void)
{
    CHECK(tp_f16_to_f32(0x3c00) == 1.0f);
    CHECK(tp_f16_to_f32(0xc000) == -2.0f);
    CHECK(tp_f16_to_f32(0x7bff) == 65504.0f);
    CHECK(tp_f16_to_f32(0x0400) == ldexpf(1.0f, -14));     /* smallest normal */
    CHECK(tp_f16_to_f32(0x0001) == ldexpf(1.0f, -24));     /* smallest subnormal */
    CHECK(tp_f16_to_f32(0x03ff) == 1023.0f * ldexpf(1.0f, -24)); /* largest subnormal */
    CHECK(tp_f16_to_f32(0x8001) == -ldexpf(1.0f, -24));
    CHECK(bits(tp_f16_to_f32(0x8000)) == 0x80000000u);     /* -0 */
    CHECK(tp_f16_to_f32(0x7c00) == INFINITY);
    CHECK(tp_f16_to_f32(0xfc00) == -INFINITY);
    CHECK(isnan(tp_f16_to_f32(0x7e00)));
    CHECK(isnan(tp_f16_to_f32(0x7c01)));
    CHECK(tp_f16_to_f32(0x3555) == 0x155 * ldexpf(1.0f, -12) + 0.25f);
    /* Every finite f16 equals sign * mant * 2^(exp) computed independently. */
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        int e = (h >> 10) & 0x1f, m = h & 0x3ff;
        if (e == 0x1f)
            continue;
        float want = e == 0 ? ldexpf((float)m, -24) : ldexpf((float)(m + 1024), e - 25);
        if (h & 0x8000)
            want = -want;
        if (bits(tp_f16_to_f32((uint16_t)h)) != bits(want))
            bad++;
    }
    CHECK(bad == 0);
}

static void test_overflow(void)
{
    size_t r = 0;
    CHECK(tp_mul_size(3, 5, &r) && r == 15);
    CHECK(!tp_mul_size(SIZE_MAX / 2 + 1, 2, &r));
    CHECK(tp_mul_size(0, SIZE_MAX, &r) && r == 0);
    CHECK(tp_add_size(SIZE_MAX - 1, 1, &r) && r == SIZE_MAX);
    CHECK(!tp_add_size(SIZE_MAX, 1, &r));
    uint64_t shape[TP_MAX_DIMS] = {3, 4, 5};
    CHECK(tp_tensor_nbytes(TP_F32, shape, 3, &r) && r == 240);
    CHECK(tp_tensor_nbytes(TP_BF16, shape, 0, &r) && r == 2); /* scalar */
    uint64_t zero[] = {7, 0, 9};
    CHECK(tp_tensor_nbytes(TP_F16, zero, 3, &r) && r == 0);
    uint64_t huge[] = {1ull << 32, 1ull << 31};
    CHECK(!tp_tensor_nbytes(TP_F32, huge, 2, &r)); /* 2^63 * 4 */
    uint64_t big[] = {1ull << 31, 1ull << 31};
    CHECK(!tp_tensor_nbytes(TP_F32, big, 2, &r)); /* 2^62 * 4 = 2^64 */
    CHECK(tp_tensor_nbytes(TP_F16, big, 2, &r) && r == (size_t)1 << 63);
    CHECK(!tp_tensor_nbytes(TP_DTYPE_INVALID, shape, 1, &r));
    CHECK(!tp_tensor_nbytes(TP_F32, shape, TP_MAX_DIMS + 1, &r));
}

static void test_checksums(void)
{
    CHECK(tp_xxh3("", 0) == 0x2d06800538d394c2ull);
    CHECK(tp_xxh3("abc", 3) != tp_xxh3("abd", 3));
    char hex[17];
    tp_hex64(0x2d06800538d394c2ull, hex);
    CHECK(strcmp(hex, "2d06800538d394c2") == 0);
    tp_hex64(0, hex);
    CHECK(strcmp(hex, "0000000000000000") == 0);
    uint64_t v = 0;
    CHECK(tp_parse_hex64("2d06800538d394c2", &v) == 0 && v == 0x2d06800538d394c2ull);
    CHECK(tp_parse_hex64("FFFFFFFFFFFFFFFF", &v) == 0 && v == UINT64_MAX);
    CHECK(tp_parse_hex64("2d06800538d394c", &v) == -1);   /* 15 digits */
    CHECK(tp_parse_hex64("2d06800538d394c22", &v) == -1); /* 17 digits */
    CHECK(tp_parse_hex64("2d06800538d394cg", &v) == -1);
    CHECK(tp_parse_hex64("", &v) == -1);
    CHECK(tp_parse_hex64(NULL, &v) == -1);
    /* Failure leaves the output alone. */
    v = 7;
    CHECK(tp_parse_hex64("2d06800538d394cg", &v) == -1 && v == 7);
    /* Round trip of values with every digit. */
    const uint64_t samples[] = {1, 0x0123456789abcdefull, 0xfedcba9876543210ull, UINT64_MAX};
    for (size_t i = 0; i < sizeof samples / sizeof samples[0]; i++) {
        tp_hex64(samples[i], hex);
        CHECK(strlen(hex) == 16 && tp_is_lower_hex(hex, 16));
        CHECK(tp_parse_hex64(hex, &v) == 0 && v == samples[i]);
    }
    tp_hex64(0x0123456789abcdefull, hex);
    CHECK(strcmp(hex, "0123456789abcdef") == 0);
    /* Bytes keep their order, each as two digits. */
    const uint8_t bytes[] = {0x00, 0x0f, 0xa0, 0xff, 0x12};
    char out[2 * sizeof bytes + 1];
    memset(out, 'x', sizeof out);
    tp_hex_bytes(bytes, sizeof bytes, out);
    CHECK(strcmp(out, "000fa0ff12") == 0);
    tp_hex_bytes(bytes, 0, out);
    CHECK(out[0] == '\0');
    /* Lowercase only, exactly n characters looked at. */
    CHECK(tp_is_lower_hex("09af", 4) && tp_is_lower_hex("09afZ", 4));
    CHECK(!tp_is_lower_hex("09aF", 4) && !tp_is_lower_hex("09ag", 4) && !tp_is_lower_hex("09a", 4));
    CHECK(tp_is_lower_hex("", 0));
    /* A conversion id is 32 of them. */
    char id[33];
    tp_new_conversion_id(id);
    CHECK(strlen(id) == 32 && tp_is_lower_hex(id, 32));
}

/* tp_rng's sequence is a promise (sampling and tpsynth's bytes depend on
 * it): these are xoshiro256** seeded by splitmix64, from the reference. */
static void test_rng(void)
{
    static const struct { uint64_t seed, first[4]; } want[] = {
        {0, {0x99ec5f36cb75f2b4ull, 0xbf6e1f784956452aull, 0x1a5f849d4933e6e0ull, 0x6aa594f1262d2d2cull}},
        {1, {0xb3f2af6d0fc710c5ull, 0x853b559647364ceaull, 0x92f89756082a4514ull, 0x642e1c7bc266a3a7ull}},
        {0xdeadbeef, {0xc5555444a74d7e83ull, 0x65c30d37b4b16e38ull, 0x54f773200a4efa23ull, 0x429aed75fb958af7ull}},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        tp_rng r;
        tp_rng_seed(&r, want[i].seed);
        for (int k = 0; k < 4; k++)
            CHECK(tp_rng_next(&r) == want[i].first[k]);
    }
    tp_rng r;
    tp_rng_seed(&r, 42);
    CHECK(tp_rng_uniform(&r) == 0.08386297105988216); /* (0x...>>11) * 2^-53 */
    double lo = 1, hi = 0;
    for (int k = 0; k < 100000; k++) {
        double u = tp_rng_uniform(&r);
        lo = u < lo ? u : lo;
        hi = u > hi ? u : hi;
    }
    CHECK(lo >= 0 && lo < 0.001 && hi < 1 && hi > 0.999);
}

/* tp_json_id_list: config.json's and generation_config.json's eos_token_id. */
static int id_list(const char *json, int32_t *ids, int max_n, int *n, tp_err *err)
{
    cJSON *root = cJSON_Parse(json);
    CHECK(root != NULL);
    int rc = root ? tp_json_id_list(root, "eos_token_id", ids, max_n, "g.json", n, err) : -1;
    cJSON_Delete(root);
    return rc;
}

static void test_json_id_list(void)
{
    tp_err err = {{0}};
    int32_t ids[3];
    int n = -1;
    CHECK(id_list("{}", ids, 3, &n, &err) == 0 && n == 0);
    CHECK(id_list("{\"eos_token_id\": null}", ids, 3, &n, &err) == 0 && n == 0);
    CHECK(id_list("{\"eos_token_id\": []}", ids, 3, &n, &err) == 0 && n == 0);
    CHECK(id_list("{\"eos_token_id\": 7}", ids, 3, &n, &err) == 0 && n == 1 && ids[0] == 7);
    CHECK(id_list("{\"eos_token_id\": [0, 2147483647, 5]}", ids, 3, &n, &err) == 0 && n == 3 && ids[0] == 0 &&
          ids[1] == INT32_MAX && ids[2] == 5);
    const char *bad[] = {"{\"eos_token_id\": \"2\"}", "{\"eos_token_id\": [1, -2]}", "{\"eos_token_id\": 1.5}",
                         "{\"eos_token_id\": 2147483648}", "{\"eos_token_id\": [1, null]}", "{\"eos_token_id\": {}}",
                         "{\"eos_token_id\": [1, 2, 3, 4]}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err.msg[0] = '\0';
        CHECK(id_list(bad[i], ids, 3, &n, &err) == -1);
        CHECK(strncmp(err.msg, "g.json: key \"eos_token_id\" ", 27) == 0);
    }
    CHECK(strstr(err.msg, "lists more than 3 ids") != NULL);
}

/* TP_MAX_TP is the bound the shard writer applies (as the manifest, the
 * index reader and tpconvert do): TP_MAX_TP ranks open, one more does not. */
static void test_max_tp(void)
{
    char *dir = tp_path_join(check_tmpdir(), "tp");
    CHECK(mkdir(dir, 0700) == 0);
    char *path = tp_path_join(dir, "r.tpshard");
    char id[33];
    tp_new_conversion_id(id);
    tp_err err = {{0}};
    tp_shard_writer *w = NULL;
    CHECK(tp_shard_writer_open(&w, path, id, TP_MAX_TP - 1, TP_MAX_TP, NULL, &err) == 0 && w);
    if (w)
        tp_shard_writer_abort(w);
    CHECK(tp_shard_writer_open(&w, path, id, 0, TP_MAX_TP + 1, NULL, &err) == -1);
    CHECK(strstr(err.msg, path) && strstr(err.msg, "rank 0 of tp 4097 is out of range"));
    CHECK(TP_MAX_TP == 4096); /* FORMAT.md states it */
    rmdir(dir);
    free(dir);
    free(path);
}

static void test_errors(void)
{
    tp_err err = {{0}};
    CHECK(tp_errorf(&err, "%s: tensor %s: bad", "f.safetensors", "w") == -1);
    CHECK(strcmp(err.msg, "f.safetensors: tensor w: bad") == 0);
    CHECK(tp_err_prefix(&err, "rank %d", 3) == -1);
    CHECK(strcmp(err.msg, "rank 3: f.safetensors: tensor w: bad") == 0);
    CHECK(tp_errorf(NULL, "x") == -1);
    /* Long messages are truncated, never overflow. */
    char longs[3000];
    memset(longs, 'x', sizeof longs - 1);
    longs[sizeof longs - 1] = '\0';
    tp_errorf(&err, "%s", longs);
    CHECK(strlen(err.msg) == sizeof err.msg - 1);
    tp_err_prefix(&err, "%s", longs);
    CHECK(strlen(err.msg) == sizeof err.msg - 1);
    /* Messages stay on one line even when they quote input with control
     * characters (a config.json "model_type": "mi\nstral", found by
     * fuzz_config). */
    tp_errorf(&err, "config.json: model_type \"%s\" is not supported", "mi\n\r\tstral\x1b");
    CHECK(strcmp(err.msg, "config.json: model_type \"mi???stral?\" is not supported") == 0);
    tp_err_prefix(&err, "a\nb");
    CHECK(strncmp(err.msg, "a?b: config.json", 16) == 0);
}

/* Writes buf to dir/name (for the .zst cases); returns the malloc'd path. */
static char *put_file(const char *dir, const char *name, const void *buf, size_t len)
{
    tp_err err;
    char *path = tp_path_join(dir, name);
    CHECK(path && tp_write_file_atomic(path, buf, len, &err) == 0);
    return path;
}

/* One zstd frame of src; with_size false leaves the size out of the frame
 * header (as a streaming compressor does). */
static size_t zst_frame(const void *src, size_t len, bool with_size, uint8_t *dst, size_t cap)
{
    ZSTD_CCtx *c = ZSTD_createCCtx();
    ZSTD_CCtx_setParameter(c, ZSTD_c_contentSizeFlag, with_size ? 1 : 0);
    size_t n = ZSTD_compress2(c, dst, cap, src, len);
    ZSTD_freeCCtx(c);
    CHECK(!ZSTD_isError(n));
    return ZSTD_isError(n) ? 0 : n;
}

static void test_read_file_zst(void)
{
    char *dir = tp_path_join(check_tmpdir(), "zst");
    CHECK(mkdir(dir, 0700) == 0);
    tp_err err = {{0}};
    char *buf = NULL;
    size_t len = 0;
    enum { TEXT = 100000 };
    char *text = malloc(TEXT);
    for (size_t i = 0; i < TEXT; i++)
        text[i] = (char)('a' + (i * 7 + i / 13) % 26);
    size_t cap = ZSTD_compressBound(2 * TEXT);
    uint8_t *z = malloc(cap);

    /* A name without .zst is read as it is, even when it holds zstd. */
    size_t zn = zst_frame(text, TEXT, true, z, cap);
    char *plain = put_file(dir, "t.json", z, zn);
    CHECK(tp_read_file_zst(plain, 1u << 20, &buf, &len, &err) == 0 && len == zn && memcmp(buf, z, zn) == 0);
    free(buf);
    /* With .zst: decoded, NUL-terminated; with or without a recorded size. */
    for (int with_size = 0; with_size < 2; with_size++) {
        zn = zst_frame(text, TEXT, with_size, z, cap);
        char *path = put_file(dir, "t.json.zst", z, zn);
        CHECK(tp_read_file_zst(path, TEXT, &buf, &len, &err) == 0);
        CHECK(len == TEXT && memcmp(buf, text, TEXT) == 0 && buf[TEXT] == '\0');
        free(buf);
        /* The bound is on the decoded bytes: one byte less is refused. */
        CHECK(tp_read_file_zst(path, TEXT - 1, &buf, &len, &err) == -1 && buf == NULL);
        CHECK(strstr(err.msg, path) && strstr(err.msg, "decompresses to more than 99999 bytes"));
        free(path);
    }
    /* Two frames back to back decode as their concatenation. */
    zn = zst_frame(text, TEXT / 2, true, z, cap);
    zn += zst_frame(text + TEXT / 2, TEXT - TEXT / 2, false, z + zn, cap - zn);
    char *two = put_file(dir, "two.zst", z, zn);
    CHECK(tp_read_file_zst(two, TEXT, &buf, &len, &err) == 0 && len == TEXT && memcmp(buf, text, TEXT) == 0);
    free(buf);
    /* Truncated: every cut is refused, naming the file. */
    size_t cuts[] = {0, 1, zn / 2, zn - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        char *cut = put_file(dir, "cut.zst", z, cuts[i]);
        CHECK(tp_read_file_zst(cut, TEXT, &buf, &len, &err) == -1 && buf == NULL);
        CHECK(strstr(err.msg, cut) && strstr(err.msg, ": zstd: "));
        free(cut);
    }
    /* Not zstd at all. */
    char *junk = put_file(dir, "junk.zst", "this is not zstd", 16);
    CHECK(tp_read_file_zst(junk, TEXT, &buf, &len, &err) == -1);
    CHECK(strstr(err.msg, junk) && strstr(err.msg, ": zstd: "));
    /* A small file that inflates far past the bound stops at the bound. */
    char *zeros = calloc(64u << 20, 1);
    zn = zst_frame(zeros, 64u << 20, false, z, cap);
    CHECK(zn < cap / 4);
    char *bomb = put_file(dir, "bomb.zst", z, zn);
    CHECK(tp_read_file_zst(bomb, 1u << 20, &buf, &len, &err) == -1);
    CHECK(strstr(err.msg, bomb) && strstr(err.msg, "decompresses to more than 1048576 bytes"));
    /* A missing .zst says so, as tp_read_file does. */
    char *missing = tp_path_join(dir, "nope.zst");
    CHECK(tp_read_file_zst(missing, TEXT, &buf, &len, &err) == -1);
    CHECK(strstr(err.msg, missing) && strstr(err.msg, "no such file or directory"));

    const char *made[] = {"t.json", "t.json.zst", "two.zst", "cut.zst", "junk.zst", "bomb.zst"};
    for (size_t i = 0; i < sizeof made / sizeof made[0]; i++) {
        char *f = tp_path_join(dir, made[i]);
        unlink(f);
        free(f);
    }
    rmdir(dir);
    free(dir);
    free(plain);
    free(two);
    free(junk);
    free(bomb);
    free(missing);
    free(zeros);
    free(z);
    free(text);
}

static void test_files(void)
{
    char *dir = tp_path_join(check_tmpdir(), "files");
    CHECK(mkdir(dir, 0700) == 0);
    tp_err err = {{0}};
    char *p = tp_path_join(dir, "a.bin");
    char *q = tp_path_join("d/", "x");
    CHECK(strcmp(q, "d/x") == 0);
    free(q);

    CHECK(tp_write_file_atomic(p, "hello", 5, &err) == 0);
    char *buf = NULL;
    size_t len = 0;
    CHECK(tp_read_file(p, 100, &buf, &len, &err) == 0);
    CHECK(len == 5 && buf && strcmp(buf, "hello") == 0);
    free(buf);
    /* Over the cap: refused, message names the file. */
    CHECK(tp_read_file(p, 4, &buf, &len, &err) == -1);
    CHECK(strstr(err.msg, p) != NULL && strstr(err.msg, "allowed") != NULL);
    /* Missing file: message names it and says why. */
    char *missing = tp_path_join(dir, "nope");
    CHECK(tp_read_file(missing, 100, &buf, &len, &err) == -1);
    CHECK(strstr(err.msg, missing) && strstr(err.msg, "no such file or directory"));
    tp_mmap m;
    CHECK(tp_mmap_open(&m, missing, &err) == -1);
    CHECK(strstr(err.msg, missing) != NULL);
    free(missing);

    /* mmap a file and an empty file. */
    CHECK(tp_mmap_open(&m, p, &err) == 0);
    CHECK(m.size == 5 && memcmp(m.data, "hello", 5) == 0 && strcmp(m.path, p) == 0);
    tp_mmap_close(&m);
    char *e = tp_path_join(dir, "empty");
    CHECK(tp_write_file_atomic(e, "", 0, &err) == 0);
    CHECK(tp_mmap_open(&m, e, &err) == 0);
    CHECK(m.size == 0 && m.data != NULL);
    tp_mmap_close(&m);
    CHECK(tp_read_file(e, 10, &buf, &len, &err) == 0 && len == 0 && buf[0] == '\0');
    free(buf);
    CHECK(tp_mmap_open(&m, dir, &err) == -1);

    /* Overwrite keeps no temporary behind. */
    CHECK(tp_write_file_atomic(p, "bye", 3, &err) == 0);
    CHECK(tp_read_file(p, 100, &buf, &len, &err) == 0 && len == 3 && strcmp(buf, "bye") == 0);
    free(buf);
    char tmpname[4096];
    snprintf(tmpname, sizeof tmpname, "%s.tmp.%ld", p, (long)getpid());
    CHECK(access(tmpname, F_OK) != 0);

    /* Writing into a directory that does not exist names the temp path. */
    char *bad = tp_path_join(dir, "no/such/file");
    CHECK(tp_write_file_atomic(bad, "x", 1, &err) == -1);
    CHECK(strstr(err.msg, "no/such/file.tmp.") != NULL);
    free(bad);

    /* write errors carry the path and errno text: /dev/full gives ENOSPC. */
    FILE *full = fopen("/dev/full", "w");
    if (full) {
        CHECK(tp_write_all(fileno(full), "abc", 3, "out/x.tmp", &err) == -1);
        CHECK(strcmp(err.msg, "out/x.tmp: write failed: No space left on device") == 0);
        fclose(full);
    }
    CHECK(tp_write_all(-1, "abc", 3, "bad-fd", &err) == -1);
    CHECK(strstr(err.msg, "bad-fd: write failed") != NULL);
    CHECK(tp_fsync_dir(dir, &err) == 0);

    /* pwrite at an offset leaves a hole of zeros before it. */
    FILE *f = fopen(p, "w+");
    CHECK(f != NULL);
    CHECK(tp_pwrite_all(fileno(f), "XY", 2, 6, p, &err) == 0);
    fclose(f);
    CHECK(tp_read_file(p, 100, &buf, &len, &err) == 0 && len == 8);
    CHECK(memcmp(buf, "\0\0\0\0\0\0XY", 8) == 0);
    free(buf);

    unlink(p);
    unlink(e);
    rmdir(dir);
    free(dir);
    free(p);
    free(e);
}

static atomic_int counter;
static void count_job(void *arg)
{
    atomic_fetch_add(&counter, *(int *)arg);
}

static void mark_index(size_t i, void *arg)
{
    atomic_int *marks = arg;
    atomic_fetch_add(&marks[i], 1);
}

typedef struct nested_arg { tp_pool *pool; atomic_int *marks; } nested_arg;
static void nested_outer(size_t i, void *arg)
{
    nested_arg *a = arg;
    /* A parallel_for inside a pool job must not deadlock. */
    tp_pool_parallel_for(a->pool, 10, mark_index, a->marks + i * 10);
}

static void test_pool(void)
{
    for (int threads = 1; threads <= 4; threads += 3) {
        tp_pool *pool = tp_pool_create(threads);
        CHECK(pool != NULL);
        CHECK(tp_pool_threads(pool) == threads);
        atomic_store(&counter, 0);
        int one = 1;
        for (int i = 0; i < 1000; i++)
            tp_pool_submit(pool, count_job, &one);
        tp_pool_wait(pool);
        CHECK(atomic_load(&counter) == 1000);
        tp_pool_wait(pool); /* waiting with nothing queued returns */

        enum { N = 10007 };
        static atomic_int marks[N];
        for (int i = 0; i < N; i++)
            atomic_store(&marks[i], 0);
        tp_pool_parallel_for(pool, N, mark_index, marks);
        int wrong = 0;
        for (int i = 0; i < N; i++)
            wrong += atomic_load(&marks[i]) != 1;
        CHECK(wrong == 0);
        tp_pool_parallel_for(pool, 0, mark_index, marks); /* no-op */
        tp_pool_parallel_for(pool, 1, mark_index, marks);
        CHECK(atomic_load(&marks[0]) == 2);

        static atomic_int nested[100];
        for (int i = 0; i < 100; i++)
            atomic_store(&nested[i], 0);
        nested_arg na = {pool, nested};
        tp_pool_parallel_for(pool, 10, nested_outer, &na);
        wrong = 0;
        for (int i = 0; i < 100; i++)
            wrong += atomic_load(&nested[i]) != 1;
        CHECK(wrong == 0);

        /* Jobs still queued at destroy time run before the workers exit. */
        atomic_store(&counter, 0);
        for (int i = 0; i < 500; i++)
            tp_pool_submit(pool, count_job, &one);
        tp_pool_destroy(pool);
        CHECK(atomic_load(&counter) == 500);
    }
    /* NULL pool: everything runs on the calling thread. */
    CHECK(tp_pool_threads(NULL) == 1);
    atomic_store(&counter, 0);
    int two = 2;
    tp_pool_submit(NULL, count_job, &two);
    CHECK(atomic_load(&counter) == 2);
    static atomic_int m3[3];
    tp_pool_parallel_for(NULL, 3, mark_index, m3);
    CHECK(atomic_load(&m3[0]) == 1 && atomic_load(&m3[2]) == 1);
    tp_pool *dflt = tp_pool_create(0);
    CHECK(dflt && tp_pool_threads(dflt) >= 1);
    tp_pool_destroy(dflt);
}

static void test_progress(void)
{
    /* Quiet: never draws; add and finish are safe, also with NULL. */
    tp_progress *p = tp_progress_start("test", 1000, true);
    CHECK(p != NULL);
    tp_progress_add(p, 500);
    tp_progress_add(p, 500);
    tp_progress_finish(p);
    tp_progress_add(NULL, 1);
    tp_progress_finish(NULL);
    double t0 = tp_now();
    usleep(20000);
    double t1 = tp_now();
    CHECK(t1 - t0 >= 0.015 && t1 - t0 < 5);
}

/* The one file-name rule: plain, printable, not hidden, bounded. */
static void test_safe_file_name(void)
{
    CHECK(tp_safe_file_name("rank-00000-of-00002.tpshard"));
    CHECK(tp_safe_file_name("model-00001-of-00002.safetensors"));
    CHECK(!tp_safe_file_name(NULL) && !tp_safe_file_name(""));
    CHECK(!tp_safe_file_name(".") && !tp_safe_file_name(".."));
    CHECK(!tp_safe_file_name(".hidden") && !tp_safe_file_name(".out.tpconvert-abc123"));
    CHECK(!tp_safe_file_name("a/b") && !tp_safe_file_name("a\\b") && !tp_safe_file_name("/etc"));
    CHECK(!tp_safe_file_name("a\nb") && !tp_safe_file_name("a\x7f") && !tp_safe_file_name("caf\xc3\xa9"));
    char longname[300];
    memset(longname, 'a', sizeof longname);
    longname[255] = '\0';
    CHECK(tp_safe_file_name(longname));
    longname[255] = 'a';
    longname[256] = '\0';
    CHECK(!tp_safe_file_name(longname));
}

static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "test_util: blocked on a FIFO\n";
    write(2, msg, sizeof msg - 1);
    _exit(1);
}

/* Inputs: a FIFO never blocks, anything but a regular file is refused by
 * name and kind; commit is all or nothing. */
static void test_open_regular_and_commit(void)
{
    char *dir = tp_path_join(check_tmpdir(), "safe");
    CHECK(mkdir(dir, 0700) == 0);
    char fifo[128], reg[128], tmpf[128], fin[128], missing[160];
    snprintf(fifo, sizeof fifo, "%s/manifest.json", dir);
    snprintf(reg, sizeof reg, "%s/reg", dir);
    CHECK(mkfifo(fifo, 0644) == 0);
    signal(SIGALRM, on_alarm);
    alarm(10);
    tp_err err = {{0}};
    CHECK(tp_open_regular(fifo, 0, NULL, &err) < 0);
    CHECK(strstr(err.msg, "manifest.json: not a regular file (fifo)") != NULL);
    tp_mmap m;
    CHECK(tp_mmap_open(&m, fifo, &err) < 0 && strstr(err.msg, "(fifo)"));
    char *text = NULL;
    size_t len = 0;
    CHECK(tp_read_file(fifo, 100, &text, &len, &err) < 0 && strstr(err.msg, "(fifo)"));
    CHECK(tp_read_file(dir, 100, &text, &len, &err) < 0 && strstr(err.msg, "(directory)"));
    alarm(0);
    CHECK(tp_write_file_atomic(reg, "abc", 3, &err) == 0);
    struct stat st;
    int fd = tp_open_regular(reg, 0, &st, &err);
    CHECK(fd >= 0 && st.st_size == 3 && !(fcntl(fd, F_GETFL) & O_NONBLOCK));
    if (fd >= 0)
        close(fd);

    /* commit: tmp renamed to final, nothing else left */
    snprintf(tmpf, sizeof tmpf, "%s/f.tmp", dir);
    snprintf(fin, sizeof fin, "%s/f", dir);
    fd = open(tmpf, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    CHECK(fd >= 0 && write(fd, "xyz", 3) == 3);
    CHECK(tp_file_commit(fd, tmpf, fin, &err) == 0);
    CHECK(access(tmpf, F_OK) != 0 && access(fin, F_OK) == 0);
    /* a failed rename (no such directory) removes the tmp file */
    snprintf(missing, sizeof missing, "%s/no-such-dir/f", dir);
    fd = open(tmpf, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    CHECK(fd >= 0);
    CHECK(tp_file_commit(fd, tmpf, missing, &err) < 0 && strstr(err.msg, "cannot rename"));
    CHECK(access(tmpf, F_OK) != 0);
    unlink(fin);
    unlink(reg);
    unlink(fifo);
    rmdir(dir);
    free(dir);
}

/* Symlinks out of a model directory are refused; into a hub cache's blobs
 * from its snapshot they are not. */
static void test_model_file_check(void)
{
    char *root = tp_path_join(check_tmpdir(), "links");
    CHECK(mkdir(root, 0700) == 0);
    char p[512], q[512];
    tp_err err = {{0}};
#define P(...) (snprintf(p, sizeof p, __VA_ARGS__), p)
    CHECK(mkdir(P("%s/model", root), 0755) == 0);
    CHECK(tp_write_file_atomic(P("%s/outside.json", root), "{}", 2, &err) == 0);
    CHECK(tp_write_file_atomic(P("%s/model/real.json", root), "{}", 2, &err) == 0);
    CHECK(symlink("real.json", P("%s/model/inside.json", root)) == 0);
    snprintf(q, sizeof q, "%s/outside.json", root);
    CHECK(symlink(q, P("%s/model/tokenizer.json", root)) == 0);
    CHECK(symlink("../outside.json", P("%s/model/rel.json", root)) == 0);
    CHECK(symlink("nowhere", P("%s/model/dangling.json", root)) == 0);
    snprintf(q, sizeof q, "%s/model", root);
    CHECK(tp_model_file_check(q, "real.json", &err) == 0);
    CHECK(tp_model_file_check(q, "inside.json", &err) == 0);
    CHECK(tp_model_file_check(q, "absent.json", &err) == 0);
    CHECK(tp_model_file_check(q, "tokenizer.json", &err) < 0);
    CHECK(strstr(err.msg, "tokenizer.json: symlink to ") && strstr(err.msg, "outside the model directory"));
    CHECK(tp_model_file_check(q, "rel.json", &err) < 0);
    CHECK(tp_model_file_check(q, "dangling.json", &err) < 0 && strstr(err.msg, "cannot be resolved"));
    /* hub cache: snapshots/REV/x -> ../../blobs/H is fine; outside blobs is not */
    CHECK(mkdir(P("%s/models--a--b", root), 0755) == 0);
    CHECK(mkdir(P("%s/models--a--b/blobs", root), 0755) == 0);
    CHECK(mkdir(P("%s/models--a--b/refs", root), 0755) == 0);
    CHECK(mkdir(P("%s/models--a--b/snapshots", root), 0755) == 0);
    CHECK(mkdir(P("%s/models--a--b/snapshots/rev", root), 0755) == 0);
    CHECK(tp_write_file_atomic(P("%s/models--a--b/blobs/h1", root), "{}", 2, &err) == 0);
    CHECK(tp_write_file_atomic(P("%s/models--a--b/refs/main", root), "{}", 2, &err) == 0);
    CHECK(symlink("../../blobs/h1", P("%s/models--a--b/snapshots/rev/config.json", root)) == 0);
    CHECK(symlink("../../refs/main", P("%s/models--a--b/snapshots/rev/other.json", root)) == 0);
    snprintf(q, sizeof q, "%s/models--a--b/snapshots/rev", root);
    CHECK(tp_model_file_check(q, "config.json", &err) == 0);
    CHECK(tp_model_file_check(q, "other.json", &err) < 0);
#undef P
    CHECK(check_rmtree(root) == 0);
    free(root);
}

typedef struct copy_job {
    uint8_t *dst;
    const uint8_t *src;
    size_t n;
} copy_job;

static void run_copy(void *arg)
{
    copy_job *j = arg;
    memcpy(j->dst, j->src, j->n);
}

/* A mapping whose file is truncated: the guarded copy fails instead of the
 * process dying by SIGBUS; an intact one copies. */
static void test_sigbus_guard(void)
{
    char path[] = "/tmp/test_util_sigbus.XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    const size_t size = 1 << 16;
    uint8_t *buf = malloc(size);
    memset(buf, 7, size);
    tp_err err = {{0}};
    CHECK(tp_write_all(fd, buf, size, path, &err) == 0);
    close(fd);
    tp_mmap m;
    CHECK(tp_mmap_open(&m, path, &err) == 0);
    memset(buf, 0, size);
    copy_job j = {buf, m.data, size};
    CHECK(tp_sigbus_guard(run_copy, &j) == 0 && buf[size - 1] == 7);
    CHECK(truncate(path, 0) == 0);
    CHECK(tp_sigbus_guard(run_copy, &j) == -1);
    CHECK(tp_sigbus_guard(run_copy, &j) == -1); /* SIGBUS is unblocked again after the jump */
    copy_job none = {buf, m.data, 0};
    CHECK(tp_sigbus_guard(run_copy, &none) == 0);
    tp_mmap_close(&m);
    unlink(path);
    free(buf);
}

int main(void)
{
    test_dtypes();
    test_f8e4m3();
    test_bf16();
    test_f16();
    test_overflow();
    test_checksums();
    test_rng();
    test_json_id_list();
    test_max_tp();
    test_errors();
    test_files();
    test_read_file_zst();
    test_pool();
    test_progress();
    test_safe_file_name();
    test_open_regular_and_commit();
    test_model_file_check();
    test_sigbus_guard();
    return check_finish("test_util");
}
