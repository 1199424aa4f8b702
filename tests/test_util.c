/* test_util.c - dtype conversions, overflow helpers, checksums, files, the
 * thread pool and the progress bar of shardfmt. */
#include "shardfmt.h"

#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int failures;
#define CHECK(cond)                                                              \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            failures++;                                                          \
        }                                                                        \
    } while (0)

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

static void test_files(void)
{
    char dir[] = "/tmp/test_util.XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
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
    CHECK(strstr(err.msg, missing) && strstr(err.msg, "No such file"));
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

int main(void)
{
    test_dtypes();
    test_bf16();
    test_f16();
    test_overflow();
    test_checksums();
    test_errors();
    test_files();
    test_pool();
    test_progress();
    if (failures) {
        fprintf(stderr, "test_util: %d check(s) failed\n", failures);
        return 1;
    }
    printf("test_util: all checks passed\n");
    return 0;
}
