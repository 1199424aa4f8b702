/* test_safetensors.c - safetensors writer/reader round trips, model folders
 * with an index, and a set of crafted bad files, each of which must be
 * refused with its own message naming the file. */
#include "shardfmt.h"

#include <dirent.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "check.h"

static const char *tmpdir; /* check_tmpdir(), set first thing in main */

static char *path_in(const char *sub, const char *name)
{
    static char buf[8][1024];
    static int slot;
    char *p = buf[slot++ % 8];
    if (sub)
        snprintf(p, 1024, "%s/%s/%s", tmpdir, sub, name);
    else
        snprintf(p, 1024, "%s/%s", tmpdir, name);
    return p;
}

static void make_dir(const char *sub)
{
    char p[1024];
    snprintf(p, sizeof p, "%s/%s", tmpdir, sub);
    if (mkdir(p, 0755) != 0) {
        perror(p);
        exit(1);
    }
}

static void write_bytes(const char *path, const void *buf, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(buf, 1, len, f) != len || fclose(f) != 0) {
        perror(path);
        exit(1);
    }
}

/* A safetensors image: u64 header length (header_len_override unless it is
 * UINT64_MAX), the header text, then data_len bytes of data (0..255). */
static void write_st_raw(const char *path, const char *header, size_t header_bytes,
                         uint64_t header_len_override, size_t data_len)
{
    uint64_t n = header_len_override != UINT64_MAX ? header_len_override : header_bytes;
    size_t len = 8 + header_bytes + data_len;
    uint8_t *buf = malloc(len);
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)(n >> (8 * i));
    memcpy(buf + 8, header, header_bytes);
    for (size_t i = 0; i < data_len; i++)
        buf[8 + header_bytes + i] = (uint8_t)i;
    write_bytes(path, buf, len);
    free(buf);
}

static void write_st(const char *path, const char *header, size_t data_len)
{
    write_st_raw(path, header, strlen(header), UINT64_MAX, data_len);
}

/* --------------------------------------------------------- round trips */

typedef struct fill_ctx {
    const tp_st_out_tensor *tensors;
    int fail_at; /* -1: never */
    int calls;
} fill_ctx;

static uint8_t pattern_byte(size_t tensor, size_t i)
{
    return (uint8_t)(tensor * 31 + i * 7 + 1);
}

static int fill_pattern(size_t i, uint8_t *dst, size_t nbytes, void *arg, tp_err *err)
{
    fill_ctx *c = arg;
    c->calls++;
    if ((int)i == c->fail_at)
        return tp_errorf(err, "source read failed on purpose");
    for (size_t k = 0; k < nbytes; k++)
        dst[k] = pattern_byte(i, k);
    return 0;
}

static bool dir_has_tmp(const char *dir)
{
    DIR *d = opendir(dir);
    bool found = false;
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (strstr(e->d_name, ".tmp"))
            found = true;
    if (d)
        closedir(d);
    return found;
}

static void test_round_trip(void)
{
    const tp_st_out_tensor ts[] = {
        {"model.embed.weight", TP_BF16, 2, {3, 5}},
        {"b.norm", TP_F16, 1, {7}},
        {"scalar", TP_F32, 0, {0}},
        {"empty", TP_F32, 2, {0, 5}},
        {"a.cube", TP_F32, 3, {2, 3, 4}},
        {"deep", TP_BF16, 8, {1, 2, 1, 2, 1, 2, 1, 3}},
    };
    size_t n = sizeof ts / sizeof ts[0];
    const char *meta[] = {"format", "pt", "note", "round trip \"quoted\"", NULL};
    char *path = path_in(NULL, "rt.safetensors");
    tp_err err = {{0}};
    fill_ctx fc = {ts, -1, 0};
    CHECK(tp_st_write(path, ts, n, meta, fill_pattern, &fc, &err) == 0);
    CHECK(fc.calls == (int)n);
    CHECK(!dir_has_tmp(tmpdir));

    tp_st_file f;
    if (tp_st_open(&f, path, &err) != 0) {
        CHECK(0, "open: %s", err.msg);
        return;
    }
    CHECK(f.n_tensors == n);
    CHECK(f.header_len % 8 == 0);
    CHECK(((8 + f.header_len) % 8) == 0);
    /* sorted by name */
    for (size_t i = 1; i < f.n_tensors; i++)
        CHECK(strcmp(f.tensors[i - 1].name, f.tensors[i].name) < 0);
    uint64_t expect_begin = 0;
    for (size_t i = 0; i < n; i++) {
        const tp_st_tensor *t = tp_st_find(&f, ts[i].name);
        CHECK(t != NULL);
        if (!t)
            continue;
        size_t nb = 0;
        CHECK(tp_tensor_nbytes(ts[i].dtype, ts[i].shape, ts[i].ndim, &nb));
        CHECK(t->dtype == ts[i].dtype);
        CHECK(t->ndim == ts[i].ndim);
        CHECK(memcmp(t->shape, ts[i].shape, sizeof(uint64_t) * (size_t)ts[i].ndim) == 0);
        CHECK(t->nbytes == nb);
        /* tensors are laid out in the order given */
        CHECK(t->begin == expect_begin && t->end == expect_begin + nb);
        expect_begin += nb;
        int bad = 0;
        for (size_t k = 0; k < nb; k++)
            bad += t->data[k] != pattern_byte(i, k);
        CHECK(bad == 0);
    }
    CHECK(tp_st_find(&f, "scalar")->nbytes == 4);
    CHECK(tp_st_find(&f, "empty")->nbytes == 0);
    CHECK(tp_st_find(&f, "missing") == NULL);
    CHECK(f.map.size == 8 + f.header_len + expect_begin);
    CHECK(f.n_meta == 2);
    bool saw_note = false;
    for (size_t i = 0; i < f.n_meta; i++)
        if (strcmp(f.meta_keys[i], "note") == 0)
            saw_note = strcmp(f.meta_values[i], "round trip \"quoted\"") == 0;
    CHECK(saw_note);
    /* The header is padded with spaces, and __metadata__ comes first. */
    const char *h = (const char *)f.map.data + 8;
    CHECK(strncmp(h, "{\"__metadata__\"", 15) == 0);
    CHECK(h[f.header_len - 1] == ' ' || h[f.header_len - 1] == '}');

    /* tp_st_parse over the same bytes (not owned) sees the same thing. */
    tp_st_file g;
    CHECK(tp_st_parse(&g, f.map.data, f.map.size, "in-memory", &err) == 0);
    CHECK(g.n_tensors == n && g.map.path == NULL);
    tp_st_close(&g);
    tp_st_close(&f);

    /* No tensors at all: a valid file with header "{}". */
    char *empty = path_in(NULL, "none.safetensors");
    CHECK(tp_st_write(empty, NULL, 0, NULL, fill_pattern, &fc, &err) == 0);
    CHECK(tp_st_open(&f, empty, &err) == 0 && f.n_tensors == 0 && f.n_meta == 0);
    tp_st_close(&f);

    /* A failing fill: error names the file and tensor, nothing is left. */
    char *failed = path_in(NULL, "failed.safetensors");
    fill_ctx bad = {ts, 2, 0};
    CHECK(tp_st_write(failed, ts, n, NULL, fill_pattern, &bad, &err) == -1);
    CHECK(strstr(err.msg, failed) && strstr(err.msg, "tensor scalar") &&
          strstr(err.msg, "failed on purpose"));
    CHECK(access(failed, F_OK) != 0);
    CHECK(!dir_has_tmp(tmpdir));

    /* Duplicate names and bad dtypes are refused before anything is written. */
    const tp_st_out_tensor dup[] = {{"x", TP_F32, 1, {2}}, {"x", TP_F32, 1, {2}}};
    CHECK(tp_st_write(failed, dup, 2, NULL, fill_pattern, &fc, &err) == -1);
    CHECK(strstr(err.msg, "duplicate tensor name x") != NULL);
    const char *dup_meta[] = {"k", "1", "k", "2", NULL};
    CHECK(tp_st_write(failed, ts, n, dup_meta, fill_pattern, &fc, &err) == -1);
    CHECK(strstr(err.msg, "metadata key k given twice") != NULL);
    const tp_st_out_tensor inval[] = {{"x", TP_DTYPE_INVALID, 1, {2}}};
    CHECK(tp_st_write(failed, inval, 1, NULL, fill_pattern, &fc, &err) == -1);
    CHECK(strstr(err.msg, "invalid dtype") != NULL);
    CHECK(access(failed, F_OK) != 0);

    /* An unwritable destination reports the temporary path. */
    char *nodir = path_in("does-not-exist", "x.safetensors");
    CHECK(tp_st_write(nodir, ts, n, NULL, fill_pattern, &fc, &err) == -1);
    CHECK(strstr(err.msg, "x.safetensors.tmp: cannot create") != NULL);
}

/* A file system that refuses to grow (here RLIMIT_FSIZE, in a child
 * process) must give an error naming the file and leave nothing behind. */
static void test_write_no_space(void)
{
    char *path = path_in(NULL, "big.safetensors");
    pid_t pid = fork();
    if (pid == 0) {
        signal(SIGXFSZ, SIG_IGN);
        struct rlimit rl = {65536, 65536};
        setrlimit(RLIMIT_FSIZE, &rl);
        const tp_st_out_tensor big[] = {{"w", TP_F32, 2, {1024, 1024}}};
        fill_ctx fc = {big, -1, 0};
        tp_err err = {{0}};
        int rc = tp_st_write(path, big, 1, NULL, fill_pattern, &fc, &err);
        bool ok = rc == -1 && strstr(err.msg, "big.safetensors.tmp: write failed") &&
                  strstr(err.msg, "File too large") && fc.calls == 0;
        if (!ok)
            fprintf(stderr, "  no-space write: rc %d, message \"%s\"\n", rc, err.msg);
        _exit(ok ? 0 : 1);
    }
    int status = 0;
    CHECK(pid > 0 && waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(access(path, F_OK) != 0);
    CHECK(!dir_has_tmp(tmpdir));
}

/* A header hand-written like another tool would: whitespace padding and a
 * newline after the object are legal. */
static void test_foreign_headers(void)
{
    tp_err err = {{0}};
    tp_st_file f;
    char *p = path_in(NULL, "padded.safetensors");
    write_st(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}   \n  ", 8);
    CHECK(tp_st_open(&f, p, &err) == 0);
    if (f.n_tensors == 1) {
        CHECK(f.tensors[0].data[0] == 0 && f.tensors[0].data[7] == 7);
    }
    tp_st_close(&f);
    p = path_in(NULL, "metaonly.safetensors");
    write_st(p, "{\"__metadata__\":{\"a\":\"b\"}}", 0);
    CHECK(tp_st_open(&f, p, &err) == 0 && f.n_tensors == 0 && f.n_meta == 1);
    tp_st_close(&f);
    p = path_in(NULL, "metanull.safetensors");
    write_st(p, "{\"__metadata__\":null, \"w\":{\"dtype\":\"BF16\",\"shape\":[],\"data_offsets\":[0,2]}}", 2);
    CHECK(tp_st_open(&f, p, &err) == 0 && f.n_tensors == 1 && f.tensors[0].ndim == 0);
    tp_st_close(&f);
    /* Zero-byte tensors may sit anywhere, including between others. */
    p = path_in(NULL, "zeros.safetensors");
    write_st(p, "{\"a\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[0,2]},"
                "\"z\":{\"dtype\":\"F16\",\"shape\":[0],\"data_offsets\":[2,2]},"
                "\"b\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[2,4]}}", 4);
    CHECK(tp_st_open(&f, p, &err) == 0 && f.n_tensors == 3);
    tp_st_close(&f);
}

/* ------------------------------------------------------------ bad files */

typedef struct bad_case {
    const char *file;
    const char *header;
    size_t data_len;
    const char *expect;       /* distinctive substring of the message */
} bad_case;

#define ENTRY(name, dtype, shape, offs) \
    "\"" name "\":{\"dtype\":\"" dtype "\",\"shape\":" shape ",\"data_offsets\":" offs "}"

static const bad_case bad_cases[] = {
    {"bad-json.safetensors", "{\"w\": {\"dtype\": }", 0, "is not valid JSON"},
    {"not-object.safetensors", "[1, 2, 3]", 0, "does not start with '{'"},
    {"trailing-garbage.safetensors", "{} x", 0, "followed by something other than spaces"},
    {"entry-not-object.safetensors", "{\"w\": [1]}", 0, "tensor w: entry is not a JSON object"},
    {"missing-shape.safetensors", "{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4,
     "tensor w: missing \"shape\""},
    {"extra-key.safetensors",
     "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"bias\":1}}", 4,
     "tensor w: unexpected key \"bias\""},
    {"twice-key.safetensors",
     "{\"w\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
     "tensor w: key \"dtype\" appears twice"},
    {"dtype-number.safetensors", "{\"w\":{\"dtype\":32,\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
     "tensor w: dtype is not a string"},
    {"unknown-dtype.safetensors", "{" ENTRY("w", "Q7", "[1]", "[0,4]") "}", 4,
     "tensor w: unknown dtype \"Q7\""},
    {"unsupported-dtype.safetensors", "{" ENTRY("w", "F64", "[1]", "[0,8]") "}", 8,
     "unsupported dtype F64 for tensor w (supported: BF16, F16, F32, F8_E4M3, I8)"},
    {"unsupported-u8.safetensors", "{" ENTRY("w", "U8", "[4]", "[0,4]") "}", 4,
     "unsupported dtype U8 for tensor w"},
    {"wrong-length.safetensors", "{" ENTRY("w", "F32", "[2]", "[0,4]") "}", 4,
     "tensor w: data_offsets span 4 bytes but F32 shape needs 8"},
    {"outside.safetensors", "{" ENTRY("w", "F32", "[2]", "[0,8]") "}", 4,
     "tensor w: data_offsets [0, 8) lie outside the data section (4 bytes)"},
    {"overlap.safetensors",
     "{" ENTRY("a", "F32", "[2]", "[0,8]") "," ENTRY("b", "F32", "[2]", "[4,12]") "}", 12,
     "tensors a and b overlap"},
    {"hole.safetensors",
     "{" ENTRY("a", "F32", "[1]", "[0,4]") "," ENTRY("b", "F32", "[1]", "[8,12]") "}", 12,
     "hole in the data section: bytes [4, 8) before tensor b"},
    {"leading-hole.safetensors", "{" ENTRY("a", "F32", "[1]", "[4,8]") "}", 8,
     "hole in the data section: bytes [0, 4) before tensor a"},
    {"trailing-data.safetensors", "{" ENTRY("a", "F32", "[1]", "[0,4]") "}", 8,
     "data section has 8 bytes but the tensors cover only 4"},
    {"duplicate.safetensors",
     "{" ENTRY("a", "F32", "[1]", "[0,4]") "," ENTRY("a", "F32", "[1]", "[4,8]") "}", 8,
     "duplicate tensor name a"},
    {"negative-shape.safetensors", "{" ENTRY("w", "F32", "[-1]", "[0,4]") "}", 4,
     "tensor w: shape[0] is negative"},
    {"fraction-shape.safetensors", "{" ENTRY("w", "F32", "[2, 1.5]", "[0,4]") "}", 4,
     "tensor w: shape[1] is not an integer"},
    {"string-shape.safetensors", "{" ENTRY("w", "F32", "[\"2\"]", "[0,8]") "}", 8,
     "tensor w: shape[0] is not a number"},
    {"huge-shape.safetensors", "{" ENTRY("w", "F32", "[9007199254740992]", "[0,4]") "}", 4,
     "tensor w: shape[0] is 2^53 or more"},
    {"overflow-shape.safetensors", "{" ENTRY("w", "F32", "[4294967296, 4294967296]", "[0,4]") "}", 4,
     "tensor w: shape is too large (byte size overflows)"},
    {"shape-not-array.safetensors", "{" ENTRY("w", "F32", "4", "[0,4]") "}", 4,
     "tensor w: shape is not an array"},
    {"too-many-dims.safetensors", "{" ENTRY("w", "F32", "[1,1,1,1,1,1,1,1,1]", "[0,4]") "}", 4,
     "tensor w: shape has 9 dimensions, more than the 8 supported"},
    {"offsets-arity.safetensors", "{" ENTRY("w", "F32", "[1]", "[0,4,8]") "}", 8,
     "tensor w: data_offsets is not an array of two integers"},
    {"offsets-negative.safetensors", "{" ENTRY("w", "F32", "[0]", "[0,-4]") "}", 4,
     "tensor w: data_offsets[1] is negative"},
    {"offsets-reversed.safetensors", "{" ENTRY("w", "F32", "[1]", "[4,0]") "}", 4,
     "tensor w: data_offsets begin 4 is after end 0"},
    {"meta-not-string.safetensors", "{\"__metadata__\":{\"k\":1}}", 0,
     "__metadata__ value for key k is not a string"},
    {"meta-not-object.safetensors", "{\"__metadata__\":[\"k\"]}", 0,
     "__metadata__ is not a JSON object"},
    {"meta-dup-key.safetensors", "{\"__metadata__\":{\"k\":\"a\",\"j\":\"c\",\"k\":\"b\"}}", 0,
     "__metadata__ key k appears twice"},
    {"meta-twice.safetensors", "{\"__metadata__\":{},\"__metadata__\":{}}", 0,
     "__metadata__ appears twice"},
};

static void expect_open_fails(const char *path, const char *expect)
{
    tp_err err = {{0}};
    tp_st_file f;
    int rc = tp_st_open(&f, path, &err);
    CHECK(rc == -1);
    if (rc == 0) {
        fprintf(stderr, "  %s: opened but should have failed (%s)\n", path, expect);
        tp_st_close(&f);
        return;
    }
    if (getenv("VERBOSE"))
        printf("  refused: %s\n", err.msg);
    CHECK(strstr(err.msg, expect) && strstr(err.msg, path) && !strchr(err.msg, '\n'),
          "%s: message \"%s\" lacks \"%s\" or the path", path, err.msg, expect);
}

static void test_bad_files(void)
{
    make_dir("bad");
    /* The messages must all differ: one wording per failure. */
    char seen[64][1024];
    size_t n_seen = 0;
    for (size_t i = 0; i < sizeof bad_cases / sizeof bad_cases[0]; i++) {
        const bad_case *c = &bad_cases[i];
        char *p = path_in("bad", c->file);
        write_st(p, c->header, c->data_len);
        expect_open_fails(p, c->expect);
        tp_err err = {{0}};
        tp_st_file f;
        if (tp_st_open(&f, p, &err) == 0)
            tp_st_close(&f);
        /* strip the path so that only the wording is compared */
        const char *wording = err.msg + strlen(p);
        for (size_t k = 0; k < n_seen; k++)
            CHECK(strcmp(seen[k], wording) != 0, "%s: same message as another case: %s", p, err.msg);
        if (n_seen < 64)
            snprintf(seen[n_seen++], sizeof seen[0], "%s", wording);
    }

    /* Framing errors need raw bytes. */
    char *p = path_in("bad", "truncated.safetensors");
    write_bytes(p, "\x10\0\0\0\0", 5);
    expect_open_fails(p, "file is 5 bytes, too short for a safetensors header");
    p = path_in("bad", "empty.safetensors");
    write_bytes(p, "", 0);
    expect_open_fails(p, "file is 0 bytes, too short");
    p = path_in("bad", "header-too-large.safetensors");
    write_st_raw(p, "{}", 2, 200000000, 0);
    expect_open_fails(p, "header length 200000000 is above the limit of 100000000 bytes");
    p = path_in("bad", "header-beyond-file.safetensors");
    write_st_raw(p, "{}      ", 8, 100, 0);
    expect_open_fails(p, "header length 100 runs past the end of the file (16 bytes)");
    p = path_in("bad", "header-zero.safetensors");
    write_st_raw(p, "", 0, 0, 0);
    expect_open_fails(p, "header does not start with '{'");
    p = path_in("bad", "nul.safetensors");
    write_st_raw(p, "{\"a\0\":1}", 8, UINT64_MAX, 0);
    expect_open_fails(p, "header contains a NUL byte");
    p = path_in("bad", "utf8.safetensors");
    write_st_raw(p, "{\"\xc3\x28\":1}", 8, UINT64_MAX, 0);
    expect_open_fails(p, "header is not valid UTF-8");
    /* A name with a control character prints as '?', on one line. */
    p = path_in("bad", "ctrl-name.safetensors");
    write_st(p, "{\"a\\nb\": 1}", 0);
    expect_open_fails(p, "tensor a?b: entry is not a JSON object");
    /* "a" and "a\u0000b" are different JSON keys but the same C string. */
    p = path_in("bad", "nul-escape.safetensors");
    write_st(p, "{" ENTRY("a", "F32", "[1]", "[0,4]") "," ENTRY("a\\u0000b", "F32", "[1]", "[4,8]") "}", 8);
    expect_open_fails(p, "duplicate tensor name a");
    /* Not a file at all. */
    expect_open_fails(path_in(NULL, "bad"), "not a regular file");
    expect_open_fails(path_in("bad", "missing.safetensors"), "missing.safetensors: no such file or directory");
}

/* ------------------------------------------------------- model folders */

static void write_index(const char *sub, const char *weight_map)
{
    char json[4096];
    snprintf(json, sizeof json, "{\"metadata\": {\"total_size\": 16}, \"weight_map\": {%s}}", weight_map);
    write_bytes(path_in(sub, "model.safetensors.index.json"), json, strlen(json));
}

static void expect_set_fails(const char *sub, const char *expect, const char *must_name)
{
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/%s", tmpdir, sub);
    tp_err err = {{0}};
    tp_st_set s;
    int rc = tp_st_set_open(&s, dir, &err);
    CHECK(rc == -1);
    if (rc == 0) {
        fprintf(stderr, "  %s: set opened but should have failed (%s)\n", dir, expect);
        tp_st_set_close(&s);
        return;
    }
    if (getenv("VERBOSE"))
        printf("  refused: %s\n", err.msg);
    CHECK(strstr(err.msg, expect) && strstr(err.msg, must_name), "%s: message \"%s\" lacks \"%s\" or \"%s\"", dir,
          err.msg, expect, must_name);
}

#define TWO_FILES_MAP                                                      \
    "\"x\": \"m-1.safetensors\", \"y\": \"m-1.safetensors\", "             \
    "\"z\": \"m-2.safetensors\""

static void make_two_files(const char *sub)
{
    make_dir(sub);
    write_st(path_in(sub, "m-1.safetensors"),
             "{" ENTRY("x", "F32", "[1]", "[0,4]") "," ENTRY("y", "BF16", "[2]", "[4,8]") "}", 8);
    write_st(path_in(sub, "m-2.safetensors"), "{" ENTRY("z", "F16", "[2,2]", "[0,8]") "}", 8);
}

static void test_sets(void)
{
    tp_err err = {{0}};
    tp_st_set s;

    make_two_files("good");
    write_index("good", TWO_FILES_MAP);
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/good", tmpdir);
    if (tp_st_set_open(&s, dir, &err) != 0) {
        CHECK(0, "set open: %s", err.msg);
    } else {
        CHECK(s.n_files == 2 && s.n_tensors == 3);
        CHECK(strcmp(s.file_names[0], "m-1.safetensors") == 0);
        CHECK(strcmp(s.file_names[1], "m-2.safetensors") == 0);
        const tp_st_tensor *z = tp_st_set_find(&s, "z");
        CHECK(z && z->dtype == TP_F16 && z->ndim == 2 && z->nbytes == 8 && z->data[7] == 7);
        const tp_st_tensor *y = tp_st_set_find(&s, "y");
        CHECK(y && y->dtype == TP_BF16 && y->data[0] == 4);
        CHECK(tp_st_set_find(&s, "x") == tp_st_find(&s.files[0], "x"));
        CHECK(tp_st_set_find(&s, "w") == NULL);
        for (size_t i = 1; i < s.n_tensors; i++)
            CHECK(strcmp(s.tensors[i - 1]->name, s.tensors[i]->name) < 0);
        tp_st_set_close(&s);
    }

    /* One file, no index. */
    make_dir("single");
    write_st(path_in("single", "model.safetensors"), "{" ENTRY("w", "F32", "[1]", "[0,4]") "}", 4);
    snprintf(dir, sizeof dir, "%s/single", tmpdir);
    CHECK(tp_st_set_open(&s, dir, &err) == 0);
    CHECK(s.n_files == 1 && s.n_tensors == 1 && tp_st_set_find(&s, "w") != NULL);
    tp_st_set_close(&s);

    make_dir("nothing");
    expect_set_fails("nothing", "no model.safetensors or model.safetensors.index.json", "nothing");

    /* A broken single file: the error names it. */
    make_dir("single-bad");
    write_st(path_in("single-bad", "model.safetensors"), "{" ENTRY("w", "F64", "[1]", "[0,8]") "}", 8);
    expect_set_fails("single-bad", "unsupported dtype F64", "single-bad/model.safetensors");

    make_two_files("missing-file");
    write_index("missing-file", TWO_FILES_MAP ", \"q\": \"m-3.safetensors\"");
    expect_set_fails("missing-file", "weight_map names file m-3.safetensors (e.g. for tensor q), which does not exist",
                     "model.safetensors.index.json");

    make_two_files("missing-tensor");
    write_index("missing-tensor", TWO_FILES_MAP ", \"q\": \"m-2.safetensors\"");
    expect_set_fails("missing-tensor", "weight_map puts tensor q in m-2.safetensors, but that file has no such tensor",
                     "model.safetensors.index.json");

    make_two_files("not-indexed");
    write_index("not-indexed", "\"x\": \"m-1.safetensors\", \"z\": \"m-2.safetensors\"");
    expect_set_fails("not-indexed", "tensor y is in m-1.safetensors but not in the weight_map",
                     "model.safetensors.index.json");

    make_two_files("in-two-files");
    write_st(path_in("in-two-files", "m-2.safetensors"),
             "{" ENTRY("z", "F16", "[2,2]", "[0,8]") "," ENTRY("x", "F32", "[1]", "[8,12]") "}", 12);
    write_index("in-two-files", TWO_FILES_MAP);
    expect_set_fails("in-two-files", "tensor x is in both m-1.safetensors and m-2.safetensors", "in-two-files");

    make_two_files("listed-twice");
    write_index("listed-twice", TWO_FILES_MAP ", \"x\": \"m-1.safetensors\"");
    expect_set_fails("listed-twice", "weight_map lists tensor x twice", "model.safetensors.index.json");

    make_two_files("escape");
    write_index("escape", TWO_FILES_MAP ", \"q\": \"../good/m-1.safetensors\"");
    expect_set_fails("escape", "\"../good/m-1.safetensors\" is not a plain file name",
                     "model.safetensors.index.json");

    make_two_files("dotdot");
    write_index("dotdot", "\"x\": \"..\"");
    expect_set_fails("dotdot", "\"..\" is not a plain file name", "model.safetensors.index.json");

    make_two_files("not-string");
    write_index("not-string", "\"x\": 1");
    expect_set_fails("not-string", "weight_map entry for tensor x is not a string", "model.safetensors.index.json");

    make_dir("no-weight-map");
    write_bytes(path_in("no-weight-map", "model.safetensors.index.json"), "{\"metadata\":{}}", 15);
    expect_set_fails("no-weight-map", "missing \"weight_map\" object", "model.safetensors.index.json");

    make_dir("index-bad-json");
    write_bytes(path_in("index-bad-json", "model.safetensors.index.json"), "{\"weight_map\":", 14);
    expect_set_fails("index-bad-json", "not valid JSON", "model.safetensors.index.json");

    make_two_files("empty-map");
    write_index("empty-map", "");
    expect_set_fails("empty-map", "weight_map is empty", "model.safetensors.index.json");

    /* A bad shard behind a good index: the message names that shard. */
    make_two_files("bad-shard");
    write_st(path_in("bad-shard", "m-2.safetensors"), "{" ENTRY("z", "F16", "[2,2]", "[0,8]") "}", 4);
    write_index("bad-shard", TWO_FILES_MAP);
    expect_set_fails("bad-shard", "tensor z: data_offsets [0, 8) lie outside", "bad-shard/m-2.safetensors");
}

int main(void)
{
    tmpdir = check_tmpdir();
    test_round_trip();
    test_write_no_space();
    test_foreign_headers();
    test_bad_files();
    test_sets();
    return check_finish("test_safetensors");
}
