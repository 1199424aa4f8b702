/* test_shard.c - the tpshard rank file: writer -> reader round trips over
 * dtypes, splits, both codecs (also mixed in one file), chunk sizes and
 * pools; in-place access for codec none; every class of damage caught with
 * its own message (a data byte, an index byte, a header byte, truncation, a
 * re-sealed index that lies); failures that leave no file behind. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "shard_internal.h"
#include "shardfmt.h"
#include "check.h"

static const char *tmpdir; /* check_tmpdir(), set first thing in main */
static const char *CID = "0123456789abcdef0123456789abcdef";

/* ------------------------------------------------------------ test tensors */

typedef struct tensor_case {
    tp_shard_tensor_desc d;
    uint8_t *data;          /* expected raw bytes */
    size_t size;
    atomic_size_t filled;   /* bytes handed out by fill() */
    int fail_at_chunk_off;  /* >= 0: fill fails at this raw offset */
} tensor_case;

/* Weight-like bytes: small normal-ish values, so zstd has something to do. */
static void make_data(tensor_case *tc, uint64_t seed)
{
    if (!tp_tensor_nbytes(tc->d.dtype, tc->d.shape, tc->d.ndim, &tc->size))
        abort();
    tc->data = malloc(tc->size + 1);
    size_t es = tp_dtype_size(tc->d.dtype);
    for (size_t i = 0; i < tc->size / es; i++) {
        uint64_t h = check_mix64(seed * 1000003 + i);
        float f = (float)((int)(h % 2001) - 1000) * 0.00004f * (float)(1 + (h >> 40) % 3);
        if (es == 4)
            memcpy(tc->data + 4 * i, &f, 4);
        else {
            uint16_t b = tp_f32_to_bf16(f);
            memcpy(tc->data + 2 * i, &b, 2);
        }
    }
    tc->fail_at_chunk_off = -1;
}

static int fill(void *arg, uint64_t raw_off, uint8_t *dst, size_t len, tp_err *err)
{
    tensor_case *tc = arg;
    if (raw_off > tc->size || len > tc->size - raw_off)
        return tp_errorf(err, "fill: range [%llu, +%zu) outside %zu bytes", (unsigned long long)raw_off, len,
                         tc->size);
    if (tc->fail_at_chunk_off >= 0 && raw_off == (uint64_t)tc->fail_at_chunk_off)
        return tp_errorf(err, "source.safetensors: tensor %s: simulated read error", tc->d.name);
    memcpy(dst, tc->data + raw_off, len);
    atomic_fetch_add(&tc->filled, len);
    return 0;
}

static tp_split replicated(void)
{
    return (tp_split){ .dim = -1 };
}

static tp_split split1(int dim, uint64_t s, uint64_t e)
{
    return (tp_split){ .dim = dim, .n_ranges = 1, .start = { s }, .end = { e } };
}

enum { N_CASES = 8 };

/* A rank-1-of-2 set of tensors: row and column splits, a fused tensor with
 * two ranges, replicated, odd sizes, empty, 0-dimensional, and a large one
 * spanning many chunks. */
static void make_cases(tensor_case *tc)
{
    memset(tc, 0, N_CASES * sizeof *tc);
    tc[0].d = (tp_shard_tensor_desc){ "model.embed_tokens.weight", TP_BF16, 2, { 300, 64 }, { 600, 64 },
                                      split1(0, 300, 600), "vocab", false };
    tc[1].d = (tp_shard_tensor_desc){ "model.layers.0.mlp.gate_up_proj.weight", TP_BF16, 2, { 100, 64 },
                                      { 200, 64 },
                                      { .dim = 0, .n_ranges = 2, .start = { 50, 150 }, .end = { 100, 200 } },
                                      "colwise_packed", false };
    tc[2].d = (tp_shard_tensor_desc){ "model.norm.weight", TP_F32, 1, { 64 }, { 64 }, replicated(), "replicate",
                                      false };
    tc[3].d = (tp_shard_tensor_desc){ "model.layers.0.self_attn.o_proj.weight", TP_F16, 2, { 33, 7 }, { 33, 14 },
                                      split1(1, 7, 14), "rowwise", false };
    tc[4].d = (tp_shard_tensor_desc){ "empty", TP_BF16, 2, { 0, 64 }, { 0, 64 }, replicated(), "", false };
    tc[5].d = (tp_shard_tensor_desc){ "scalar", TP_F32, 0, { 0 }, { 0 }, replicated(), NULL, false };
    tc[6].d = (tp_shard_tensor_desc){ "model.layers.0.mlp.down_proj.bias", TP_F32, 1, { 5 }, { 5 }, replicated(),
                                      "rowwise", true };
    tc[7].d = (tp_shard_tensor_desc){ "lm_head.weight", TP_BF16, 2, { 1024, 701 }, { 2048, 701 },
                                      split1(0, 1024, 2048), "colwise", false };
    for (int i = 0; i < N_CASES; i++)
        make_data(&tc[i], (uint64_t)i + 1);
}

static void free_cases(tensor_case *tc)
{
    for (int i = 0; i < N_CASES; i++)
        free(tc[i].data);
}

static char *path_in_tmp(const char *name)
{
    return tp_path_join(tmpdir, name);
}

static bool exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

typedef struct written {
    uint64_t index_xxh3, file_size, raw, stored;
} written;

/* The codec of tensor i in a mixed file: every codec of the table in turn,
 * so that a writer opened with one codec meets every other. */
static tp_codec mixed_codec(int i)
{
    return (tp_codec)(i % TP_CODEC_COUNT);
}

/* Writes the cases to path; mixed: alternate codecs tensor by tensor. */
static int write_cases(const char *path, tensor_case *tc, tp_codec codec, size_t chunk, tp_pool *pool, bool mixed,
                       written *out)
{
    tp_shard_writer_opts o = { .codec = codec, .level = 3, .chunk_size = chunk, .pool = pool };
    tp_shard_writer *w;
    tp_err err = { "" };
    if (tp_shard_writer_open(&w, path, CID, 1, 2, &o, &err) < 0) {
        CHECK(0, "open writer: %s", err.msg);
        return -1;
    }
    for (int i = 0; i < N_CASES; i++) {
        if (mixed)
            tp_shard_writer_set_codec(w, mixed_codec(i), 3);
        atomic_store(&tc[i].filled, 0);
        if (tp_shard_writer_add(w, &tc[i].d, fill, &tc[i], &err) < 0) {
            CHECK(0, "add %s: %s", tc[i].d.name, err.msg);
            tp_shard_writer_abort(w);
            return -1;
        }
        CHECK(atomic_load(&tc[i].filled) == tc[i].size, "%s: fill handed out %zu of %zu bytes", tc[i].d.name,
              (size_t)atomic_load(&tc[i].filled), tc[i].size);
    }
    if (tp_shard_writer_finish(w, &out->index_xxh3, &out->file_size, &out->raw, &out->stored, &err) < 0) {
        CHECK(0, "finish: %s", err.msg);
        return -1;
    }
    return 0;
}

static void check_read_back(const char *path, tensor_case *tc, tp_codec codec, bool mixed, tp_pool *pool,
                            const written *wr)
{
    tp_shard_reader r;
    tp_err err = { "" };
    if (tp_shard_open(&r, path, &err) < 0) {
        CHECK(0, "open %s: %s", path, err.msg);
        return;
    }
    const tp_shard_index *ix = &r.index;
    CHECK(ix->rank == 1 && ix->tp == 2 && strcmp(ix->conversion_id, CID) == 0, "rank/tp/id read back");
    CHECK(ix->n_tensors == N_CASES, "%zu tensors", ix->n_tensors);
    CHECK(ix->index_xxh3 == wr->index_xxh3, "index checksum reported by finish differs from the file's");
    struct stat st;
    CHECK(stat(path, &st) == 0 && (uint64_t)st.st_size == wr->file_size && ix->file_size == wr->file_size,
          "file size reported by finish");
    char tmp[1024];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    CHECK(!exists(tmp), "finish must leave no .tmp file");
    uint64_t raw_total = 0, stored_total = 0;
    for (int i = 0; i < N_CASES; i++) {
        const tp_shard_tensor_desc *d = &tc[i].d;
        const tp_shard_tensor *t = tp_shard_find(ix, d->name);
        if (!t) {
            CHECK(0, "tensor %s missing", d->name);
            continue;
        }
        tp_codec want = mixed ? mixed_codec(i) : codec;
        CHECK(t->dtype == d->dtype && t->ndim == d->ndim && t->codec == want, "%s: dtype/ndim/codec", d->name);
        CHECK(memcmp(t->shape, d->shape, sizeof(uint64_t) * d->ndim) == 0 &&
                  memcmp(t->global_shape, d->global_shape, sizeof(uint64_t) * d->ndim) == 0,
              "%s: shapes", d->name);
        CHECK(t->split.dim == d->split.dim && t->split.n_ranges == d->split.n_ranges, "%s: split", d->name);
        for (int k = 0; k < d->split.n_ranges; k++)
            CHECK(t->split.start[k] == d->split.start[k] && t->split.end[k] == d->split.end[k], "%s: range %d",
                  d->name, k);
        CHECK(strcmp(t->style, d->style ? d->style : "") == 0 && t->reduce_bias == d->reduce_bias,
              "%s: style/reduce_bias", d->name);
        CHECK(t->raw_size == tc[i].size && t->offset % TP_ALIGN == 0, "%s: raw size / alignment", d->name);
        raw_total += t->raw_size;
        stored_total += t->stored_size;

        uint8_t *buf = malloc(t->raw_size + 1);
        memset(buf, 0xEE, t->raw_size + 1);
        int rc = tp_shard_read_tensor(&r, t, buf, pool, true, &err);
        CHECK(rc == 0, "read %s: %s", d->name, err.msg);
        CHECK(rc != 0 || memcmp(buf, tc[i].data, t->raw_size) == 0, "%s: bytes differ after the round trip",
              d->name);
        CHECK(buf[t->raw_size] == 0xEE, "%s: read wrote past the end", d->name);
        /* Chunk by chunk, last first: chunks are independent. */
        memset(buf, 0xEE, t->raw_size);
        for (size_t c = t->n_chunks; c-- > 0;)
            CHECK(tp_shard_read_chunk(&r, t, c, buf, true, &err) == 0, "read %s chunk %zu: %s", d->name, c, err.msg);
        CHECK(memcmp(buf, tc[i].data, t->raw_size) == 0, "%s: chunk-wise read differs", d->name);
        free(buf);

        const uint8_t *inplace = tp_shard_tensor_inplace(&r, t);
        if (want == TP_CODEC_NONE) {
            CHECK(inplace && (uintptr_t)inplace % TP_ALIGN == 0, "%s: codec none must be usable in place, aligned",
                  d->name);
            CHECK(inplace && memcmp(inplace, tc[i].data, t->raw_size) == 0, "%s: in-place bytes", d->name);
            CHECK(t->stored_size == t->raw_size, "%s: codec none stores raw", d->name);
        } else {
            CHECK(inplace == NULL, "%s: a %s tensor has no in-place form", d->name, tp_codec_name(want));
        }
    }
    CHECK(raw_total == wr->raw && stored_total == wr->stored, "finish's raw/stored totals");
    tp_shard_close(&r);
}

static void test_round_trips(tensor_case *tc)
{
    tp_pool *pool = tp_pool_create(2);
    struct {
        tp_codec codec;
        size_t chunk;
        bool use_pool, mixed;
    } runs[] = {
        { TP_CODEC_NONE, 0, false, false },         { TP_CODEC_ZSTD, 0, true, false },
        { TP_CODEC_ZSTD, 65536, true, false },      { TP_CODEC_NONE, 65536, true, false },
        { TP_CODEC_ZSTD, 4100, false, false },      { TP_CODEC_ZSTD, 4096, true, true },
        { TP_CODEC_NONE, 12, true, true },
        /* A codec other than zstd that encodes: its chunks need the encode
         * buffer too (the writer once allocated it for zstd only). */
        { TP_CODEC_EXPHUF, 0, true, false },        { TP_CODEC_EXPHUF, 4100, false, false },
        { TP_CODEC_EXPHUF, 4096, true, true },
    };
    for (size_t k = 0; k < sizeof runs / sizeof *runs; k++) {
        char name[64];
        snprintf(name, sizeof name, "rt-%zu.tpshard", k);
        char *path = path_in_tmp(name);
        written wr;
        tp_pool *p = runs[k].use_pool ? pool : NULL;
        if (write_cases(path, tc, runs[k].codec, runs[k].chunk, p, runs[k].mixed, &wr) == 0) {
            check_read_back(path, tc, runs[k].codec, runs[k].mixed, pool, &wr);
            check_read_back(path, tc, runs[k].codec, runs[k].mixed, NULL, &wr);
            if (runs[k].codec != TP_CODEC_NONE && !runs[k].mixed)
                CHECK(wr.stored < wr.raw, "%s should compress the test weights (%llu of %llu)",
                      tp_codec_name(runs[k].codec), (unsigned long long)wr.stored, (unsigned long long)wr.raw);
        }
        free(path);
    }
    /* Writing is deterministic: the same input gives the same bytes. */
    char *a = path_in_tmp("det-a.tpshard"), *b = path_in_tmp("det-b.tpshard");
    written wa, wb;
    if (write_cases(a, tc, TP_CODEC_ZSTD, 8192, pool, false, &wa) == 0 &&
        write_cases(b, tc, TP_CODEC_ZSTD, 8192, NULL, false, &wb) == 0)
        CHECK(wa.index_xxh3 == wb.index_xxh3 && wa.file_size == wb.file_size,
              "pool and no pool must write the same file");
    free(a), free(b);
    tp_pool_destroy(pool);
}

/* ------------------------------------------------------------ damage */

static uint8_t *slurp(const char *path, size_t *len)
{
    char *text;
    tp_err err;
    if (tp_read_file(path, 1u << 30, &text, len, &err) < 0) {
        CHECK(0, "%s", err.msg);
        return NULL;
    }
    return (uint8_t *)text;
}

static void spit(const char *path, const uint8_t *buf, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(buf, 1, len, f) != len || fclose(f) != 0)
        CHECK(0, "cannot write %s", path);
}

static uint64_t le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* A file whose open must fail with a message containing want. */
static void expect_open_fails(const char *what, const uint8_t *buf, size_t len, const char *want)
{
    char *path = path_in_tmp("damaged.tpshard");
    spit(path, buf, len);
    tp_shard_reader r;
    tp_err err = { "" };
    int rc = tp_shard_open(&r, path, &err);
    CHECK(rc < 0, "%s: open must fail", what);
    if (rc == 0)
        tp_shard_close(&r);
    else
        CHECK(strstr(err.msg, want) && strstr(err.msg, path), "%s: message \"%s\" should name the file and say \"%s\"",
              what, err.msg, want);
    /* The in-memory entry agrees. */
    tp_shard_index ix;
    CHECK(tp_shard_parse(&ix, buf, len, "mem", &err) < 0, "%s: parse must fail", what);
    free(path);
}

/* Replaces the index by new_index and re-seals header checksums: the file is
 * then self-consistent at the byte level, so only semantic checks remain. */
static uint8_t *reseal(const uint8_t *buf, const char *new_index, size_t *len_out)
{
    uint64_t off = le64(buf + 16);
    size_t ilen = strlen(new_index), len = off + ilen;
    uint8_t *out = malloc(len);
    memcpy(out, buf, off);
    memcpy(out + off, new_index, ilen);
    put64(out + 24, ilen);
    put64(out + 32, len);
    put64(out + 40, tp_xxh3(new_index, ilen));
    put64(out + 48, tp_xxh3(out, 48));
    *len_out = len;
    return out;
}

static char *index_of(const uint8_t *buf)
{
    uint64_t off = le64(buf + 16), ilen = le64(buf + 24);
    return strndup((const char *)buf + off, ilen);
}

/* index with the first occurrence of from replaced by to, re-sealed. */
static void expect_index_edit_fails(const char *what, const uint8_t *buf, const char *from, const char *to,
                                    const char *want)
{
    char *ix = index_of(buf);
    char *at = strstr(ix, from);
    if (!at) {
        CHECK(0, "%s: test setup: \"%s\" not in the index", what, from);
        free(ix);
        return;
    }
    size_t n = strlen(ix) - strlen(from) + strlen(to);
    char *edited = malloc(n + 1);
    snprintf(edited, n + 1, "%.*s%s%s", (int)(at - ix), ix, to, at + strlen(from));
    size_t len;
    uint8_t *out = reseal(buf, edited, &len);
    expect_open_fails(what, out, len, want);
    free(out), free(edited), free(ix);
}

static void test_damage(tensor_case *tc)
{
    char *path = path_in_tmp("good.tpshard");
    written wr;
    if (write_cases(path, tc, TP_CODEC_ZSTD, 65536, NULL, false, &wr) < 0)
        return;
    size_t len;
    uint8_t *good = slurp(path, &len);
    if (!good)
        return;
    uint8_t *bad = malloc(len);

    /* A resealed but unchanged index must still open (guards the helpers). */
    {
        char *ix = index_of(good);
        size_t l2;
        uint8_t *same = reseal(good, ix, &l2);
        tp_shard_index pix;
        tp_err err;
        CHECK(l2 == len && memcmp(same, good, len) == 0, "reseal of the same index must give the same file");
        CHECK(tp_shard_parse(&pix, same, l2, "same", &err) == 0, "unchanged file: %s", err.msg);
        tp_shard_index_free(&pix);
        free(same), free(ix);
    }

    /* 1. One byte of a data chunk: open works, the read names the chunk. */
    tp_shard_reader r;
    tp_err err = { "" };
    if (tp_shard_open(&r, path, &err) == 0) {
        const tp_shard_tensor *t = tp_shard_find(&r.index, "lm_head.weight");
        CHECK(t && t->n_chunks > 5, "lm_head should span several chunks");
        uint64_t at = t ? t->chunks[3].offset + t->chunks[3].stored_size / 2 : 0;
        tp_shard_close(&r);
        memcpy(bad, good, len);
        bad[at] ^= 0x10;
        char *dpath = path_in_tmp("data-flip.tpshard");
        spit(dpath, bad, len);
        tp_pool *pool = tp_pool_create(2);
        CHECK(tp_shard_open(&r, dpath, &err) == 0, "a data flip must not stop open: %s", err.msg);
        t = tp_shard_find(&r.index, "lm_head.weight");
        uint8_t *buf = malloc(t->raw_size);
        for (int with_pool = 0; with_pool < 2; with_pool++) {
            int rc = tp_shard_read_tensor(&r, t, buf, with_pool ? pool : NULL, true, &err);
            CHECK(rc < 0 && strstr(err.msg, "tensor lm_head.weight: chunk 3 checksum mismatch (stored bytes corrupted)") &&
                      strstr(err.msg, dpath),
                  "data flip (pool %d): got \"%s\"", with_pool, err.msg);
        }
        CHECK(tp_shard_read_chunk(&r, t, 2, buf, true, &err) == 0, "chunk 2 is intact: %s", err.msg);
        CHECK(tp_shard_read_tensor(&r, tp_shard_find(&r.index, "model.norm.weight"), buf, NULL, true, &err) == 0,
              "other tensors still read: %s", err.msg);
        free(buf);
        tp_shard_close(&r);
        tp_pool_destroy(pool);
        free(dpath);
    }

    /* 2. One byte of the index. */
    uint64_t ioff = le64(good + 16);
    memcpy(bad, good, len);
    bad[ioff + (len - ioff) / 2] ^= 0x01;
    expect_open_fails("index flip", bad, len, "index checksum mismatch (index corrupted)");

    /* 3. Header bytes: each hashed field, the checksum itself, a reserved byte. */
    const struct {
        size_t at;
        const char *want;
    } hdr[] = {
        { 0, "bad magic" },           { 7, "bad magic" },
        { 8, "newer than this build supports (1)" },
        { 12, "header checksum mismatch" }, { 17, "header checksum mismatch" },
        { 25, "header checksum mismatch" }, { 33, "header checksum mismatch" },
        { 41, "header checksum mismatch" }, { 50, "header checksum mismatch" },
        { 100, "reserved header byte 100" }, { 4095, "reserved header byte 4095" },
    };
    for (size_t k = 0; k < sizeof hdr / sizeof *hdr; k++) {
        memcpy(bad, good, len);
        bad[hdr[k].at] ^= 0x04;
        char what[64];
        snprintf(what, sizeof what, "header byte %zu", hdr[k].at);
        expect_open_fails(what, bad, len, hdr[k].want);
    }
    /* A genuinely newer file (consistent checksum) is named as such. */
    memcpy(bad, good, len);
    bad[8] = 2;
    put64(bad + 48, tp_xxh3(bad, 48));
    expect_open_fails("version 2", bad, len, "format version 2 is newer than this build supports (1)");

    /* 4. Truncation, appending, and files too short for a header. */
    expect_open_fails("truncated by one byte", good, len - 1, "truncated");
    expect_open_fails("truncated into the data", good, 5000, "truncated");
    expect_open_fails("shorter than a header", good, 100, "shorter than the 4096-byte tpshard header");
    expect_open_fails("empty file", good, 0, "shorter than");
    {
        uint8_t *longer = malloc(len + 1);
        memcpy(longer, good, len);
        longer[len] = 0;
        expect_open_fails("appended to", longer, len + 1, "appended");
        free(longer);
    }

    /* 5. A re-sealed index that lies: checksums fine, meaning wrong. */
    const tp_shard_index *gix = NULL;
    tp_shard_reader gr;
    if (tp_shard_open(&gr, path, &err) == 0) {
        gix = &gr.index;
        const tp_shard_tensor *norm = tp_shard_find(gix, "model.norm.weight");
        char from[64], to[64], hex[17];
        tp_hex64(norm->xxh3, hex);
        snprintf(from, sizeof from, "\"xxh3\":\"%s\"", hex);
        tp_hex64(norm->xxh3 ^ 1, hex);
        snprintf(to, sizeof to, "\"xxh3\":\"%s\"", hex);
        char *ix = index_of(good), *at = strstr(ix, from);
        CHECK(at != NULL, "norm's checksum in the index");
        if (at) {
            memcpy(at, to, strlen(to));
            size_t l2;
            uint8_t *lie = reseal(good, ix, &l2);
            char *lpath = path_in_tmp("lie.tpshard");
            spit(lpath, lie, l2);
            tp_shard_reader lr;
            CHECK(tp_shard_open(&lr, lpath, &err) == 0, "a tensor-checksum lie still opens: %s", err.msg);
            uint8_t buf[256];
            const tp_shard_tensor *t = tp_shard_find(&lr.index, "model.norm.weight");
            CHECK(tp_shard_read_tensor(&lr, t, buf, NULL, true, &err) < 0 &&
                      strstr(err.msg, "tensor model.norm.weight: tensor checksum mismatch"),
                  "tensor checksum lie: got \"%s\"", err.msg);
            CHECK(tp_shard_read_tensor(&lr, t, buf, NULL, false, &err) == 0, "verify off skips the checksum");
            tp_shard_close(&lr);
            free(lie), free(lpath);
        }
        free(ix);

        const tp_shard_tensor *emb = tp_shard_find(gix, "model.embed_tokens.weight");
        const tp_shard_tensor *gu = tp_shard_find(gix, "model.layers.0.mlp.gate_up_proj.weight");
        char s1[64], s2[64];
        snprintf(s1, sizeof s1, "\"offset\":%llu", (unsigned long long)emb->offset);
        snprintf(s2, sizeof s2, "\"offset\":%llu", (unsigned long long)emb->offset + 8);
        expect_index_edit_fails("unaligned offset", good, s1, s2, "unaligned or outside the data region");
        snprintf(s2, sizeof s2, "\"offset\":%llu", (unsigned long long)gu->offset);
        expect_index_edit_fails("overlapping tensors", good, s1, s2, "overlap");
        snprintf(s2, sizeof s2, "\"offset\":%llu", (unsigned long long)ioff + 4096);
        expect_index_edit_fails("offset past the data", good, s1, s2, "outside the data region");
        expect_index_edit_fails("offset in the header", good, s1, "\"offset\":0", "outside the data region");
        const tp_shard_tensor *norm2 = tp_shard_find(gix, "model.norm.weight");
        snprintf(s1, sizeof s1, "\"stored_size\":%llu,", (unsigned long long)norm2->stored_size);
        snprintf(s2, sizeof s2, "\"stored_size\":%llu,", (unsigned long long)norm2->stored_size + 1);
        expect_index_edit_fails("stored_size", good, s1, s2, "but stored_size is");
    } else {
        CHECK(0, "open good: %s", err.msg);
    }
    if (gix)
        tp_shard_close(&gr);

    expect_index_edit_fails("duplicate name", good, "\"name\":\"model.norm.weight\"",
                            "\"name\":\"model.embed_tokens.weight\"", "appears twice");
    expect_index_edit_fails("unknown dtype", good, "\"dtype\":\"F32\"", "\"dtype\":\"F64\"", "unsupported dtype \"F64\"");
    expect_index_edit_fails("replicated shape", good, "\"shape\":[64]", "\"shape\":[65]",
                            "replicated, but local dim 0 is 65 and global 64");
    expect_index_edit_fails("raw_size", good, "\"shape\":[64],\"global_shape\":[64]",
                            "\"shape\":[32],\"global_shape\":[32]", "raw_size 256 does not match");
    expect_index_edit_fails("range outside", good, "[[300,600]]", "[[300,601]]", "outside global dim 0");
    expect_index_edit_fails("ranges too short", good, "[[300,600]]", "[[300,599]]", "cover 299 along dim 0");
    expect_index_edit_fails("overlapping ranges", good, "[[50,100],[150,200]]", "[[50,100],[60,110]]", "overlap");
    expect_index_edit_fails("split dim", good, "\"dim\":1", "\"dim\":2", "\"dim\" must be an integer in [0, 1]");
    expect_index_edit_fails("rank >= tp", good, "\"rank\":1", "\"rank\":2", "rank 2 is not below tp 2");
    expect_index_edit_fails("codec", good, "\"codec\":\"zstd\"", "\"codec\":\"lz4\"", "unknown codec \"lz4\"");
    expect_index_edit_fails("fractional number", good, "\"raw_size\":256", "\"raw_size\":256.5", "integer");
    expect_index_edit_fails("2^53", good, "\"raw_size\":256", "\"raw_size\":9007199254740992", "below 2^53");
    expect_index_edit_fails("negative", good, "\"raw_size\":256", "\"raw_size\":-256", "non-negative");
    expect_index_edit_fails("unknown key", good, "\"style\":", "\"stile\":", "unknown key \"stile\"");
    expect_index_edit_fails("duplicate key", good, "\"style\":\"replicate\"", "\"style\":\"replicate\",\"style\":\"x\"",
                            "duplicate key \"style\"");
    expect_index_edit_fails("conversion id", good, CID, "0123456789ABCDEF0123456789abcdef", "conversion_id");
    expect_index_edit_fails("format", good, "\"format\":\"tpshard\"", "\"format\":\"other\"", "not \"tpshard\"");
    expect_index_edit_fails("not JSON", good, "{", "[{", "not valid JSON");
    expect_index_edit_fails("chunk count", good, "\"chunk_size\":65536", "\"chunk_size\":16384",
                            "1 chunks, but 38400 raw bytes in chunks of 16384 make 3");
    expect_index_edit_fails("chunk size vs dtype", good, "\"chunk_size\":65536", "\"chunk_size\":65537",
                            "not a positive multiple");
    expect_index_edit_fails("control char", good, "\"name\":\"scalar\"", "\"name\":\"sca\\nlar\"",
                            "control character");

    free(good), free(bad), free(path);
}

/* ------------------------------------------------------------ failures */

static void test_failures(tensor_case *tc)
{
    char *path = path_in_tmp("fail.tpshard"), tmp[1024];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    tp_err err = { "" };
    tp_pool *pool = tp_pool_create(2);
    tp_shard_writer_opts o = { .codec = TP_CODEC_ZSTD, .level = 1, .chunk_size = 65536, .pool = pool };
    tp_shard_writer *w;

    /* abort removes the temporary file and leaves nothing at path. */
    CHECK(tp_shard_writer_open(&w, path, CID, 0, 1, &o, &err) == 0, "open: %s", err.msg);
    CHECK(tp_shard_writer_add(w, &tc[0].d, fill, &tc[0], &err) == 0, "add: %s", err.msg);
    CHECK(exists(tmp) && !exists(path), "the writer works on path.tmp");
    tp_shard_writer_abort(w);
    CHECK(!exists(tmp) && !exists(path), "abort must leave no file");

    /* A fill error in the middle of a many-chunk tensor, on the pool. */
    CHECK(tp_shard_writer_open(&w, path, CID, 0, 1, &o, &err) == 0, "open: %s", err.msg);
    tc[7].fail_at_chunk_off = 5 * 65536;
    int rc = tp_shard_writer_add(w, &tc[7].d, fill, &tc[7], &err);
    tc[7].fail_at_chunk_off = -1;
    CHECK(rc < 0 && strstr(err.msg, "simulated read error"), "fill error must fail add: \"%s\"", err.msg);
    CHECK(tp_shard_writer_add(w, &tc[2].d, fill, &tc[2], &err) < 0 && strstr(err.msg, "failed earlier"),
          "a failed writer refuses more tensors");
    CHECK(tp_shard_writer_finish(w, NULL, NULL, NULL, NULL, &err) < 0 && strstr(err.msg, "failed earlier"),
          "a failed writer cannot finish");
    CHECK(!exists(tmp) && !exists(path), "a failed finish leaves no file");

    /* Bad descriptions are refused before anything is written. */
    CHECK(tp_shard_writer_open(&w, path, CID, 0, 1, &o, &err) == 0, "open: %s", err.msg);
    CHECK(tp_shard_writer_add(w, &tc[2].d, fill, &tc[2], &err) == 0, "add: %s", err.msg);
    CHECK(tp_shard_writer_add(w, &tc[2].d, fill, &tc[2], &err) < 0 && strstr(err.msg, "added twice"),
          "duplicate name: \"%s\"", err.msg);
    tp_shard_tensor_desc d = tc[0].d;
    d.name = "bad.split";
    d.split.end[0] = 599;
    CHECK(tp_shard_writer_add(w, &d, fill, &tc[0], &err) < 0 && strstr(err.msg, "tensor bad.split: split ranges cover"),
          "inconsistent split: \"%s\"", err.msg);
    d = tc[0].d;
    d.name = "";
    CHECK(tp_shard_writer_add(w, &d, fill, &tc[0], &err) < 0, "empty name");
    d = tc[4].d; /* [0, 64]: a huge dimension beside a zero one keeps the size 0 */
    d.name = "huge";
    d.shape[1] = d.global_shape[1] = 1ull << 53;
    CHECK(tp_shard_writer_add(w, &d, fill, &tc[4], &err) < 0 && strstr(err.msg, "2^53"), "huge dim: \"%s\"",
          err.msg);
    d = tc[2].d;
    d.name = "styled";
    d.style = "col\nwise";
    CHECK(tp_shard_writer_add(w, &d, fill, &tc[2], &err) < 0 && strstr(err.msg, "control characters"),
          "style with a newline: \"%s\"", err.msg);
    tp_shard_writer_abort(w);
    CHECK(!exists(tmp) && !exists(path), "abort after errors leaves no file");

    CHECK(tp_shard_writer_open(&w, path, "xyz", 0, 1, &o, &err) < 0 && strstr(err.msg, "conversion id"), "bad id");
    CHECK(tp_shard_writer_open(&w, path, CID, 2, 2, &o, &err) < 0 && strstr(err.msg, "rank 2 of tp 2"), "bad rank");
    tp_shard_writer_opts odd = o;
    odd.chunk_size = 4097;
    CHECK(tp_shard_writer_open(&w, path, CID, 0, 1, &odd, &err) < 0 && strstr(err.msg, "chunk size"), "bad chunk");
    tp_shard_writer_opts lvl = o;
    lvl.level = 99;
    CHECK(tp_shard_writer_open(&w, path, CID, 0, 1, &lvl, &err) < 0 && strstr(err.msg, "zstd level 99"), "bad level");
    char *nodir = path_in_tmp("no/such/dir/x.tpshard");
    CHECK(tp_shard_writer_open(&w, nodir, CID, 0, 1, &o, &err) < 0 && strstr(err.msg, "no/such/dir"), "bad dir: %s",
          err.msg);
    free(nodir);

    /* A write error (the file size limit stands in for a full disk). */
    struct rlimit old;
    getrlimit(RLIMIT_FSIZE, &old);
    signal(SIGXFSZ, SIG_IGN);
    struct rlimit small = { 256 * 1024, old.rlim_max };
    if (setrlimit(RLIMIT_FSIZE, &small) == 0) {
        tp_shard_writer_opts none = o;
        none.codec = TP_CODEC_NONE;
        for (int k = 0; k < 2; k++) {
            CHECK(tp_shard_writer_open(&w, path, CID, 0, 1, k ? &o : &none, &err) == 0, "open: %s", err.msg);
            rc = tp_shard_writer_add(w, &tc[7].d, fill, &tc[7], &err);
            if (k == 1 && rc == 0) /* zstd may fit under the limit: add more */
                rc = tp_shard_writer_add(w, &(tp_shard_tensor_desc){ .name = "x", .dtype = TP_BF16, .ndim = 2,
                                                                     .shape = { 1024, 701 }, .global_shape = { 2048, 701 },
                                                                     .split = tc[7].d.split },
                                         fill, &tc[7], &err);
            if (rc == 0)
                rc = tp_shard_writer_finish(w, NULL, NULL, NULL, NULL, &err);
            else
                tp_shard_writer_abort(w);
            CHECK(rc < 0 && strstr(err.msg, tmp), "a write past the size limit must fail naming the file: \"%s\"",
                  err.msg);
            CHECK(!exists(tmp) && !exists(path), "a write error leaves no file");
        }
        setrlimit(RLIMIT_FSIZE, &old);
    } else {
        fprintf(stderr, "note: setrlimit(RLIMIT_FSIZE) refused, write-error case not run\n");
    }
    signal(SIGXFSZ, SIG_DFL);
    tp_pool_destroy(pool);
    free(path);
}

/* ------------------------------------------------------------ memory */

static int fill_synthetic(void *arg, uint64_t raw_off, uint8_t *dst, size_t len, tp_err *err)
{
    for (size_t i = 0; i + 1 < len; i += 2) {
        uint64_t h = check_mix64(raw_off + i);
        uint16_t b = tp_f32_to_bf16((float)((int)(h % 2001) - 1000) * 0.00004f);
        memcpy(dst + i, &b, 2);
    }
    return 0;
}

static long maxrss_kb(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss;
}

/* Writing a 64 MiB tensor keeps about 2 x threads chunks in memory, not the
 * tensor.  Runs first, while the process is still small, so that the
 * high-water mark measures the writer. */
static void test_memory_bound(void)
{
    char *path = path_in_tmp("big.tpshard");
    tp_pool *pool = tp_pool_create(2);
    tp_shard_writer_opts o = { .codec = TP_CODEC_ZSTD, .level = 1, .chunk_size = 1u << 20, .pool = pool };
    tp_shard_writer *w;
    tp_err err = { "" };
    long before = maxrss_kb();
    CHECK(tp_shard_writer_open(&w, path, CID, 0, 1, &o, &err) == 0, "open: %s", err.msg);
    tp_shard_tensor_desc d = { "big", TP_BF16, 2, { 8192, 4096 }, { 8192, 4096 }, replicated(), "replicate", false };
    CHECK(tp_shard_writer_add(w, &d, fill_synthetic, NULL, &err) == 0, "add: %s", err.msg);
    uint64_t raw = 0;
    CHECK(tp_shard_writer_finish(w, NULL, NULL, &raw, NULL, &err) == 0, "finish: %s", err.msg);
    long grew = maxrss_kb() - before;
    printf("writing a %llu MiB tensor grew the peak RSS by %ld KiB\n", (unsigned long long)(raw >> 20), grew);
    CHECK(raw == 64u << 20 && grew < 32 * 1024, "the writer should hold a few chunks, not the tensor (grew %ld KiB)",
          grew);
    unlink(path);
    tp_pool_destroy(pool);
    free(path);
}

int main(void)
{
    tmpdir = check_tmpdir();
    test_memory_bound();
    tensor_case tc[N_CASES];
    make_cases(tc);
    test_round_trips(tc);
    test_damage(tc);
    test_failures(tc);
    free_cases(tc);
    return check_finish("test_shard");
}
