/* test_loader.c - tp_load_rank, tp_verify_dir, tp_verify_against and the
 * bundle round trip, on small conversions written with the shardfmt writer
 * API (tests/loader_fixture.h). */
#include "loader_fixture.h"

static const tp_load_opts opts_verify = {.verify = true, .threads = 2, .quiet = true};
static const tp_load_opts opts_fast = {.verify = false, .threads = 2, .quiet = true};

/* Where a tensor's chunk ci lies in a rank file (absolute offset). */
static uint64_t chunk_offset(const char *rank_path, const char *tensor, size_t ci)
{
    tp_shard_reader rd;
    tp_err err;
    if (tp_shard_open(&rd, rank_path, &err) != 0) {
        fprintf(stderr, "%s\n", err.msg);
        exit(2);
    }
    const tp_shard_tensor *t = tp_shard_find(&rd.index, tensor);
    if (!t || ci >= t->n_chunks) {
        fprintf(stderr, "%s: tensor %s has no chunk %zu\n", rank_path, tensor, ci);
        exit(2);
    }
    uint64_t off = t->chunks[ci].offset + t->chunks[ci].stored_size / 2;
    tp_shard_close(&rd);
    return off;
}

static bool inside(const void *p, const void *base, size_t size)
{
    return (const uint8_t *)p >= (const uint8_t *)base &&
           (const uint8_t *)p < (const uint8_t *)base + size;
}

static void test_load(const fx_model *m, const char *dir, tp_codec codec)
{
    tp_err err;
    for (int r = 0; r < 4; r++) {
        tp_loaded_rank lr;
        CHECK_OK(tp_load_rank(&lr, dir, r, &opts_verify, &err), err);
        if (lr.n_tensors == 0)
            continue;
        fx_check_loaded(m, &lr, 4);
        CHECK(lr.config_json && strstr(lr.config_json, "\"llama\""));
        CHECK(lr.tokenizer_json && lr.tokenizer_json_len > 0 && strstr(lr.tokenizer_json, "BPE"));
        CHECK(lr.generation_config_json == NULL);
        CHECK(lr.raw_bytes > 0 && lr.stored_bytes > 0);
        CHECK(lr.load_seconds >= 0);
        CHECK(lr.manifest.tp == 4);
        for (size_t i = 0; i < lr.n_tensors; i++) {
            if (codec == TP_CODEC_NONE) {
                /* In place: a pointer into the mapping, nothing copied. */
                CHECK(inside(lr.tensors[i].data, lr.reader.map.data, lr.reader.map.size));
            } else {
                CHECK(lr.owned && lr.tensors[i].data >= lr.owned);
            }
        }
        if (codec == TP_CODEC_NONE) {
            CHECK(lr.owned == NULL);
            CHECK(lr.raw_bytes == lr.stored_bytes);
        }
        tp_loaded_rank_free(&lr);

        /* verify off: the same bytes. */
        CHECK_OK(tp_load_rank(&lr, dir, r, &opts_fast, &err), err);
        if (lr.n_tensors)
            fx_check_loaded(m, &lr, 4);
        tp_loaded_rank_free(&lr);

        /* Opened deferred, then materialised: the same bytes, the same
         * statistics; materialising a loaded rank does nothing. */
        tp_load_opts defer = opts_verify;
        defer.defer_tensors = true;
        CHECK_OK(tp_load_rank(&lr, dir, r, &defer, &err), err);
        CHECK(lr.deferred && lr.n_tensors && lr.tensors[0].data == NULL);
        CHECK_OK(tp_loaded_rank_materialise(&lr, &err), err);
        CHECK(!lr.deferred);
        fx_check_loaded(m, &lr, 4);
        CHECK(lr.raw_bytes > 0 && lr.stored_bytes > 0 && (codec != TP_CODEC_NONE || lr.owned == NULL));
        CHECK_OK(tp_loaded_rank_materialise(&lr, &err), err);
        tp_loaded_rank_free(&lr);
    }
    /* NULL opts means the defaults (verify on). */
    tp_loaded_rank lr;
    CHECK_OK(tp_load_rank(&lr, dir, 1, NULL, &err), err);
    tp_loaded_rank_free(&lr);

    tp_manifest man;
    CHECK_OK(tp_load_manifest(dir, &man, &err), err);
    CHECK(man.tp == 4);
    tp_manifest_free(&man);
}

static void test_refusals(const fx_model *m, const char *root, const char *good)
{
    tp_err err;
    tp_loaded_rank lr;
    char want[1200];
    snprintf(want, sizeof want, "%s: rank 5 is not in this conversion (tp=4)", good);
    CHECK_FAILS(tp_load_rank(&lr, good, 5, &opts_verify, &err), err, want);
    CHECK_FAILS(tp_load_rank(&lr, good, -1, &opts_verify, &err), err,
                "rank -1 is not in this conversion (tp=4)");
    CHECK_FAILS(tp_load_rank(&lr, "/nonexistent/conv", 0, &opts_verify, &err), err,
                "/nonexistent/conv");

    /* A missing rank file: the others still load. */
    char *dir = fx_path(root, "missing");
    fx_copy(good, dir);
    char *r3 = fx_path(dir, "rank-00003-of-00004.tpshard");
    unlink(r3);
    CHECK_FAILS(tp_load_rank(&lr, dir, 3, &opts_verify, &err), err,
                "rank file rank-00003-of-00004.tpshard is missing");
    CHECK_OK(tp_load_rank(&lr, dir, 0, &opts_verify, &err), err);
    tp_loaded_rank_free(&lr);
    tp_verify_report rep;
    CHECK_FAILS(tp_verify_dir(dir, 2, true, &rep, &err), err,
                "rank file rank-00003-of-00004.tpshard is missing");
    free(r3);
    free(dir);

    /* Rank files from two conversions of the same model. */
    char *other = fx_path(root, "other"), *mixed = fx_path(root, "mixed");
    fx_conv_opts o = {.tp = 4, .codec = TP_CODEC_ZSTD};
    char id_other[33];
    fx_write_conversion(m, other, &o, id_other);
    fx_copy(good, mixed);
    char *from = fx_path(other, "rank-00001-of-00004.tpshard");
    char *to = fx_path(mixed, "rank-00001-of-00004.tpshard");
    fx_copy(from, to);
    CHECK_FAILS(tp_load_rank(&lr, mixed, 1, &opts_verify, &err), err,
                "ranks from two conversions");
    CHECK(strstr(err.msg, id_other) != NULL);
    CHECK(strstr(err.msg, "rank file rank-00001-of-00004.tpshard belongs to conversion") != NULL);
    CHECK_FAILS(tp_verify_dir(mixed, 2, true, &rep, &err), err, "ranks from two conversions");
    free(from);
    free(to);
    free(other);
    free(mixed);

    /* A rank file one byte longer than the manifest says. */
    dir = fx_path(root, "longer");
    fx_copy(good, dir);
    char *r2 = fx_path(dir, "rank-00002-of-00004.tpshard");
    FILE *f = fopen(r2, "ab");
    fputc(0, f);
    fclose(f);
    CHECK_FAILS(tp_load_rank(&lr, dir, 2, &opts_verify, &err), err, "bytes, the manifest says");
    CHECK(strstr(err.msg, "rank-00002-of-00004.tpshard") != NULL);
    CHECK_FAILS(tp_verify_dir(dir, 2, true, &rep, &err), err, "rank-00002-of-00004.tpshard");
    free(r2);
    free(dir);

    /* A manifest whose checksum for rank 0 is wrong. */
    dir = fx_path(root, "badsum");
    fx_copy(good, dir);
    tp_manifest man;
    CHECK_OK(tp_manifest_read(dir, &man, &err), err);
    man.ranks[0].checksum ^= 1;
    CHECK_OK(tp_manifest_write(dir, &man, &err), err);
    tp_manifest_free(&man);
    CHECK_FAILS(tp_load_rank(&lr, dir, 0, &opts_verify, &err), err, "index checksum");
    CHECK_OK(tp_load_rank(&lr, dir, 1, &opts_verify, &err), err);
    tp_loaded_rank_free(&lr);
    CHECK_FAILS(tp_verify_dir(dir, 2, true, &rep, &err), err, "index checksum");
    free(dir);
}

/* A flipped data byte is caught with verify on.  With verify off nothing is
 * hashed, so the load of a "none" tensor succeeds with the wrong byte: that
 * is the documented price of the fast path. */
static void test_corruption(const fx_model *m, const char *root, const char *good_none,
                            const char *good_zstd)
{
    tp_err err;
    tp_loaded_rank lr;
    tp_verify_report rep;
    char *dir = fx_path(root, "corrupt-none");
    fx_copy(good_none, dir);
    char *r1 = fx_path(dir, "rank-00001-of-00004.tpshard");
    fx_flip_byte(r1, chunk_offset(r1, "lm_head.weight", 1));
    CHECK_FAILS(tp_load_rank(&lr, dir, 1, &opts_verify, &err), err, "lm_head.weight");
    /* Deferred, the checks happen when it is materialised (which frees lr). */
    tp_load_opts defer = opts_verify;
    defer.defer_tensors = true;
    CHECK_OK(tp_load_rank(&lr, dir, 1, &defer, &err), err);
    CHECK_FAILS(tp_loaded_rank_materialise(&lr, &err), err, "lm_head.weight");
    CHECK(lr.tensors == NULL && lr.source == NULL);
    CHECK_OK(tp_load_rank(&lr, dir, 1, &opts_fast, &err), err);
    const tp_loaded_tensor *lt = tp_loaded_find(&lr, "lm_head.weight");
    CHECK(lt != NULL);
    if (lt) {
        tp_split sp = fx_split(&m->t[7], 1, 4);
        uint64_t shape[TP_MAX_DIMS];
        size_t nb;
        uint8_t *want = fx_local(&m->t[7], &sp, shape, &nb);
        CHECK(nb == lt->info->raw_size && memcmp(want, lt->data, nb) != 0);
        free(want);
    }
    tp_loaded_rank_free(&lr);
    CHECK_OK(tp_load_rank(&lr, dir, 0, &opts_verify, &err), err); /* other ranks fine */
    tp_loaded_rank_free(&lr);
    CHECK_FAILS(tp_verify_dir(dir, 2, true, &rep, &err), err, "lm_head.weight");
    CHECK(strstr(err.msg, "rank 1") != NULL);

    /* The same file in a bundle: verify and load from the tar catch it. */
    char *bdir = fx_path(root, "corrupt-bundles");
    char **paths;
    size_t n;
    CHECK_OK(tp_bundle_pack(dir, 4, bdir, true, &paths, &n, &err), err);
    if (n == 1) {
        size_t held;
        CHECK_FAILS(tp_bundle_verify(paths[0], &held, &err), err, "lm_head.weight");
        CHECK_FAILS(tp_load_rank(&lr, paths[0], 1, &opts_verify, &err), err, "lm_head.weight");
        free(paths[0]);
        free(paths);
    }
    free(bdir);
    free(r1);
    free(dir);

    dir = fx_path(root, "corrupt-zstd");
    fx_copy(good_zstd, dir);
    char *r2 = fx_path(dir, "rank-00002-of-00004.tpshard");
    fx_flip_byte(r2, chunk_offset(r2, "lm_head.weight", 1));
    CHECK_FAILS(tp_load_rank(&lr, dir, 2, &opts_verify, &err), err, "lm_head.weight");
    CHECK_FAILS(tp_verify_dir(dir, 2, true, &rep, &err), err, "lm_head.weight");
    free(r2);
    free(dir);
}

/* Offset of the first occurrence of needle in a file (exits when absent). */
static uint64_t offset_of(const char *path, const char *needle)
{
    char *text;
    size_t len;
    tp_err err;
    if (tp_read_file(path, (size_t)1 << 26, &text, &len, &err) != 0) {
        fprintf(stderr, "%s\n", err.msg);
        exit(2);
    }
    const char *hit = memmem(text, len, needle, strlen(needle));
    if (!hit) {
        fprintf(stderr, "%s: no \"%s\"\n", path, needle);
        exit(2);
    }
    uint64_t off = (uint64_t)(hit - text);
    free(text);
    return off;
}

/* The copied files are pinned by size and XXH3 like the rank files: a
 * damaged tokenizer.json or config.json is refused by the loader (from a
 * directory or a bundle), tp_verify_dir, tpbundle pack, verify and unpack.
 * With verify off only the size is checked (the documented fast path). */
static void test_copied_files(const char *root, const char *good)
{
    tp_err err;
    tp_loaded_rank lr;
    tp_verify_report rep;
    const char *mismatch = "tokenizer.json: checksum mismatch (file corrupted or replaced)";

    /* Same size, one byte changed. */
    char *dir = fx_path(root, "copied-flip");
    fx_copy(good, dir);
    char *tok = fx_path(dir, "tokenizer.json");
    fx_flip_byte(tok, offset_of(tok, "BPE"));
    CHECK_FAILS(tp_load_rank(&lr, dir, 0, &opts_verify, &err), err, mismatch);
    CHECK(strncmp(err.msg, dir, strlen(dir)) == 0);
    CHECK_FAILS(tp_load_rank(&lr, dir, 0, NULL, &err), err, mismatch);
    CHECK_OK(tp_load_rank(&lr, dir, 0, &opts_fast, &err), err);
    CHECK(lr.tokenizer_json && strstr(lr.tokenizer_json, "BPE") == NULL); /* the damaged bytes */
    tp_loaded_rank_free(&lr);
    CHECK_FAILS(tp_verify_dir(dir, 2, true, &rep, &err), err, mismatch);
    char *bdir = fx_path(root, "copied-flip-bundles");
    CHECK_FAILS(tp_bundle_pack(dir, 4, bdir, true, NULL, NULL, &err), err, mismatch);
    free(bdir);
    free(tok);
    free(dir);

    /* config.json one byte longer: the size says so, verify on or off. */
    dir = fx_path(root, "copied-grow");
    fx_copy(good, dir);
    char *cfg = fx_path(dir, "config.json");
    char cmd[2400];
    snprintf(cmd, sizeof cmd, "printf ' ' >>'%s'", cfg);
    if (fx_run(cmd) != 0)
        exit(2);
    char want[128];
    snprintf(want, sizeof want, "config.json: %zu bytes, the manifest says %zu", strlen(fx_config_json) + 1,
             strlen(fx_config_json));
    CHECK_FAILS(tp_load_rank(&lr, dir, 1, &opts_verify, &err), err, want);
    CHECK_FAILS(tp_load_rank(&lr, dir, 1, &opts_fast, &err), err, want);
    CHECK_FAILS(tp_verify_dir(dir, 2, true, &rep, &err), err, want);
    free(cfg);
    free(dir);

    /* A good bundle whose tokenizer.json is damaged inside the tar. */
    bdir = fx_path(root, "copied-bundles");
    char **paths = NULL;
    size_t n = 0;
    CHECK_OK(tp_bundle_pack(good, 4, bdir, true, &paths, &n, &err), err);
    CHECK(n == 1);
    if (n == 1) {
        size_t held;
        CHECK_OK(tp_bundle_verify(paths[0], &held, &err), err);
        fx_flip_byte(paths[0], offset_of(paths[0], "BPE"));
        CHECK_FAILS(tp_bundle_verify(paths[0], &held, &err), err, mismatch);
        CHECK(strncmp(err.msg, paths[0], strlen(paths[0])) == 0);
        CHECK_FAILS(tp_load_rank(&lr, paths[0], 3, &opts_verify, &err), err, mismatch);
        CHECK_OK(tp_load_rank(&lr, paths[0], 3, &opts_fast, &err), err);
        tp_loaded_rank_free(&lr);
        char *out = fx_path(root, "copied-unpacked");
        CHECK_FAILS(tp_bundle_unpack(paths[0], out, &err), err, mismatch);
        struct stat st;
        CHECK(stat(out, &st) != 0); /* nothing half-extracted left behind */
        free(out);
    }
    for (size_t i = 0; i < n; i++)
        free(paths[i]);
    free(paths);
    free(bdir);
}

/* Rewrites dir's manifest with one copied file's entry set to the size and
 * XXH3 of text (added to the list when absent), as a tpconvert that
 * copied text would have written it. */
static void pin_copied_file(const char *dir, const char *name, const char *text)
{
    tp_manifest man;
    tp_err err;
    if (tp_manifest_read(dir, &man, &err) != 0) {
        fprintf(stderr, "%s\n", err.msg);
        exit(2);
    }
    tp_manifest_file *f = NULL;
    for (size_t i = 0; i < man.n_files; i++)
        if (strcmp(man.files[i].name, name) == 0)
            f = &man.files[i];
    if (!f) {
        man.files = realloc(man.files, (man.n_files + 1) * sizeof *man.files);
        f = &man.files[man.n_files++];
        f->name = strdup(name);
    }
    f->size = strlen(text);
    f->xxh3 = tp_xxh3(text, strlen(text));
    if (tp_manifest_write(dir, &man, &err) != 0) {
        fprintf(stderr, "%s\n", err.msg);
        exit(2);
    }
    tp_manifest_free(&man);
}

/* tprun and tpverify apply one rule to the manifest's files list: a listed
 * file that tprun does not read is still required and checked, and
 * config.json must hold the manifest's embedded config. */
static void test_copied_rule(const char *root, const char *good)
{
    tp_err err;
    tp_loaded_rank lr;
    tp_verify_report rep;

    /* A listed file the runtime does not use, absent from the directory. */
    char *dir = fx_path(root, "rule-missing");
    fx_copy(good, dir);
    const char *vocab = "hello\nworld\n";
    pin_copied_file(dir, "vocab.txt", vocab);
    const char *missing = "copied file vocab.txt listed in the manifest is missing";
    CHECK_FAILS(tp_load_rank(&lr, dir, 0, &opts_verify, &err), err, missing);
    CHECK_FAILS(tp_load_rank(&lr, dir, 0, &opts_fast, &err), err, missing);
    CHECK_FAILS(tp_verify_dir(dir, 2, true, &rep, &err), err, missing);
    /* Present: both accept it; damaged: both refuse it. */
    char *path = fx_path(dir, "vocab.txt");
    fx_write_text(path, vocab);
    CHECK_OK(tp_load_rank(&lr, dir, 0, &opts_verify, &err), err);
    tp_loaded_rank_free(&lr);
    CHECK_OK(tp_verify_dir(dir, 2, true, &rep, &err), err);
    fx_write_text(path, "jello\nworld\n");
    const char *damaged = "vocab.txt: checksum mismatch (file corrupted or replaced)";
    CHECK_FAILS(tp_load_rank(&lr, dir, 0, &opts_verify, &err), err, damaged);
    CHECK_FAILS(tp_verify_dir(dir, 2, true, &rep, &err), err, damaged);
    free(path);
    free(dir);

    /* config.json replaced, its size and XXH3 pinned anew: the manifest's
     * embedded config (what the model reads) no longer matches it. */
    dir = fx_path(root, "rule-config");
    fx_copy(good, dir);
    path = fx_path(dir, "config.json");
    char *other = strdup(fx_config_json);
    char *digit = strpbrk(other, "123456789");
    *digit = *digit == '9' ? '8' : (char)(*digit + 1);
    fx_write_text(path, other);
    pin_copied_file(dir, "config.json", other);
    const char *differs = "config.json differs from the config in manifest.json";
    CHECK_FAILS(tp_load_rank(&lr, dir, 0, &opts_verify, &err), err, differs);
    CHECK_FAILS(tp_load_rank(&lr, dir, 0, &opts_fast, &err), err, differs);
    CHECK_FAILS(tp_verify_dir(dir, 2, true, &rep, &err), err, differs);
    char *bdir = fx_path(root, "rule-config-bundles");
    char **paths = NULL;
    size_t n = 0;
    CHECK_OK(tp_bundle_pack(dir, 4, bdir, true, &paths, &n, &err), err);
    if (n == 1)
        CHECK_FAILS(tp_load_rank(&lr, paths[0], 1, &opts_verify, &err), err, differs);
    for (size_t i = 0; i < n; i++)
        free(paths[i]);
    free(paths);
    free(bdir);
    free(other);
    free(path);
    free(dir);
}

static void test_verify(const fx_model *m, const char *root, const char *src, const char *good_none,
                        const char *good_zstd)
{
    tp_err err;
    tp_verify_report rep;
    CHECK_OK(tp_verify_dir(good_none, 2, true, &rep, &err), err);
    CHECK(rep.ranks == 4 && rep.tensors == 4 * m->n && rep.chunks >= rep.tensors && rep.bytes > 0);
    CHECK_OK(tp_verify_dir(good_zstd, 0, true, &rep, &err), err);
    CHECK(rep.ranks == 4 && rep.tensors == 4 * m->n);

    CHECK_OK(tp_verify_against(good_none, src, 2, true, &rep, &err), err);
    CHECK(rep.compared_tensors == m->n && rep.tensors == 4 * m->n);
    CHECK_OK(tp_verify_against(good_zstd, src, 2, true, &rep, &err), err);
    CHECK(rep.compared_tensors == m->n);

    /* Other tp sizes: tp=1 (everything whole), tp=2. */
    for (int tp = 1; tp <= 2; tp++) {
        char *dir = fx_path(root, "tp%d", tp);
        fx_conv_opts o = {.tp = tp, .codec = TP_CODEC_ZSTD};
        fx_write_conversion(m, dir, &o, NULL);
        CHECK_OK(tp_verify_against(dir, src, 2, true, &rep, &err), err);
        CHECK(rep.ranks == (size_t)tp && rep.compared_tensors == m->n);
        tp_loaded_rank lr;
        CHECK_OK(tp_load_rank(&lr, dir, tp - 1, &opts_verify, &err), err);
        fx_check_loaded(m, &lr, tp);
        tp_loaded_rank_free(&lr);
        free(dir);
    }

    /* A source that differs in one element of a split tensor (q_proj row 20
     * is on rank 2 of 4) and of a replicated one. */
    fx_model m2;
    fx_model_init(&m2);
    m2.t[1].data[(20 * 16 + 3) * 2] ^= 1;
    m2.t[6].data[5 * 4] ^= 1;
    char *src2 = fx_path(root, "model-changed");
    fx_write_source(&m2, src2);
    CHECK_FAILS(tp_verify_against(good_zstd, src2, 2, true, &rep, &err), err,
                "rank 0: tensor model.layers.0.input_layernorm.weight differs from the source at element [5]");
    m2.t[6].data[5 * 4] ^= 1;
    fx_write_source(&m2, src2);
    CHECK_FAILS(tp_verify_against(good_zstd, src2, 2, true, &rep, &err), err,
                "rank 2: tensor model.layers.0.self_attn.q_proj.weight differs from the source at element [20, 3]");
    /* rowwise (dim 1): o_proj column 30 of row 2 is on rank 3. */
    m2.t[1].data[(20 * 16 + 3) * 2] ^= 1;
    m2.t[3].data[(2 * 32 + 30) * 2] ^= 1;
    fx_write_source(&m2, src2);
    CHECK_FAILS(tp_verify_against(good_none, src2, 2, true, &rep, &err), err,
                "rank 3: tensor model.layers.0.self_attn.o_proj.weight differs from the source at element [2, 30]");
    /* packed: second half of gate_up, row 16 + 5 = 21 is on rank 1 (4 rows per rank per half). */
    m2.t[3].data[(2 * 32 + 30) * 2] ^= 1;
    m2.t[4].data[(21 * 16) * 2 + 1] ^= 1;
    fx_write_source(&m2, src2);
    CHECK_FAILS(tp_verify_against(good_none, src2, 2, true, &rep, &err), err,
                "rank 1: tensor model.layers.0.mlp.gate_up_proj.weight differs from the source at element [21, 0]");
    /* kv: row 5 is head 1, held by ranks 2 and 3; rank 2 is checked first. */
    m2.t[4].data[(21 * 16) * 2 + 1] ^= 1;
    m2.t[2].data[(5 * 16 + 1) * 2] ^= 1;
    fx_write_source(&m2, src2);
    CHECK_FAILS(tp_verify_against(good_none, src2, 2, true, &rep, &err), err,
                "rank 2: tensor model.layers.0.self_attn.k_proj.weight differs from the source at element [5, 1]");
    fx_model_free(&m2);
    free(src2);

    /* A conversion that dropped a tensor of the source. */
    char *dropped = fx_path(root, "dropped");
    fx_conv_opts o = {.tp = 4, .codec = TP_CODEC_ZSTD, .skip_tensor = "model.layers.0.mlp.down_proj.weight"};
    fx_write_conversion(m, dropped, &o, NULL);
    CHECK_OK(tp_verify_dir(dropped, 2, true, &rep, &err), err);
    CHECK_FAILS(tp_verify_against(dropped, src, 2, true, &rep, &err), err,
                "tensor model.layers.0.mlp.down_proj.weight of the source is missing");
    free(dropped);

    /* A source without lm_head: the conversion's lm_head is extra. */
    fx_model m3;
    fx_model_init(&m3);
    free(m3.t[7].data);
    m3.n = 7;
    char *src3 = fx_path(root, "model-nohead");
    fx_write_source(&m3, src3);
    CHECK_FAILS(tp_verify_against(good_zstd, src3, 2, true, &rep, &err), err,
                "tensor lm_head.weight is not in the source model");
    fx_model_free(&m3);
    free(src3);

    /* Rank 2 claims rank 1's rows of lm_head: rows [64, 96) are nobody's. */
    char *gap = fx_path(root, "gap");
    fx_conv_opts og = {.tp = 4, .codec = TP_CODEC_NONE, .gap_rank = 2};
    fx_write_conversion(m, gap, &og, NULL);
    CHECK_OK(tp_verify_dir(gap, 2, true, &rep, &err), err);
    CHECK_FAILS(tp_verify_against(gap, src, 2, true, &rep, &err), err,
                "tensor lm_head.weight: indices [64, 96) of dim 0 are held by no rank");
    free(gap);
}

static void test_safetensors_export(const fx_model *m, const char *root, const char *src)
{
    tp_err err;
    tp_verify_report rep;
    tp_loaded_rank lr;
    char *dir = fx_path(root, "st");
    fx_conv_opts o = {.tp = 4, .format = "safetensors"};
    fx_write_conversion(m, dir, &o, NULL);
    CHECK_FAILS(tp_load_rank(&lr, dir, 0, &opts_verify, &err), err, "tprun reads tpshard conversions");
    CHECK_OK(tp_verify_dir(dir, 2, true, &rep, &err), err);
    CHECK(rep.ranks == 4 && rep.tensors == 4 * m->n);
    CHECK_OK(tp_verify_against(dir, src, 2, true, &rep, &err), err);
    CHECK(rep.compared_tensors == m->n);

    /* A wrong byte in the data of rank 3's last tensor. */
    char *r3 = fx_path(dir, "rank-00003-of-00004.safetensors");
    struct stat st;
    stat(r3, &st);
    fx_flip_byte(r3, (uint64_t)st.st_size - 7);
    CHECK_FAILS(tp_verify_dir(dir, 2, true, &rep, &err), err, "rank-00003-of-00004.safetensors");
    CHECK(strstr(err.msg, "checksum") != NULL);
    free(r3);
    free(dir);
}

static void test_bundle_round_trip(const fx_model *m, const char *root, const char *src,
                                   const char *good)
{
    tp_err err;
    char *out = fx_path(root, "bundles");
    char **paths = NULL;
    size_t n = 0;
    CHECK_OK(tp_bundle_pack(good, 2, out, true, &paths, &n, &err), err);
    CHECK(n == 2);
    if (n != 2)
        return;
    CHECK(strstr(paths[0], "node-00000-of-00002.tar") != NULL);
    CHECK(strstr(paths[1], "node-00001-of-00002.tar") != NULL);
    for (int r = 0; r < 4; r++) {
        tp_loaded_rank from_tar, from_dir;
        CHECK_OK(tp_load_rank(&from_tar, paths[r / 2], r, &opts_verify, &err), err);
        CHECK_OK(tp_load_rank(&from_dir, good, r, &opts_verify, &err), err);
        if (from_tar.n_tensors == 0 || from_dir.n_tensors == 0)
            continue;
        CHECK(from_tar.bundle_image != NULL);
        fx_check_loaded(m, &from_tar, 4);
        CHECK(from_tar.n_tensors == from_dir.n_tensors);
        for (size_t i = 0; i < from_tar.n_tensors && i < from_dir.n_tensors; i++) {
            CHECK(from_tar.tensors[i].info->raw_size == from_dir.tensors[i].info->raw_size);
            CHECK(memcmp(from_tar.tensors[i].data, from_dir.tensors[i].data,
                         (size_t)from_dir.tensors[i].info->raw_size) == 0);
        }
        CHECK(from_tar.config_json && strcmp(from_tar.config_json, from_dir.config_json) == 0);
        CHECK(from_tar.tokenizer_json_len == from_dir.tokenizer_json_len);
        tp_loaded_rank_free(&from_tar);
        tp_loaded_rank_free(&from_dir);
    }
    tp_loaded_rank lr;
    char want[1200];
    snprintf(want, sizeof want, "%s holds ranks 2-3, not rank 0", paths[1]);
    CHECK_FAILS(tp_load_rank(&lr, paths[1], 0, &opts_verify, &err), err, want);
    CHECK_FAILS(tp_load_rank(&lr, paths[1], 4, &opts_verify, &err), err,
                "rank 4 is not in this conversion (tp=4)");
    tp_manifest man;
    CHECK_OK(tp_load_manifest(paths[1], &man, &err), err);
    CHECK(man.tp == 4);
    tp_manifest_free(&man);
    size_t held = 0;
    CHECK_OK(tp_bundle_verify(paths[1], &held, &err), err);
    CHECK(held == 2);

    /* pack -> unpack -> load and verify */
    char *dest = fx_path(root, "unpacked");
    CHECK_OK(tp_bundle_unpack(paths[1], dest, &err), err);
    const char *expect[] = {"manifest.json", "config.json", "tokenizer.json",
                            "rank-00002-of-00004.tpshard", "rank-00003-of-00004.tpshard"};
    for (size_t i = 0; i < 5; i++) {
        char *p = fx_path(dest, "%s", expect[i]);
        CHECK(access(p, R_OK) == 0);
        free(p);
    }
    char *absent = fx_path(dest, "rank-00000-of-00004.tpshard");
    CHECK(access(absent, F_OK) != 0);
    free(absent);
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "test $(ls -A '%s' | wc -l) -eq 5", dest);
    CHECK(system(cmd) == 0);
    CHECK_OK(tp_load_rank(&lr, dest, 3, &opts_verify, &err), err);
    if (lr.n_tensors)
        fx_check_loaded(m, &lr, 4);
    tp_loaded_rank_free(&lr);
    CHECK_FAILS(tp_load_rank(&lr, dest, 0, &opts_verify, &err), err,
                "rank file rank-00000-of-00004.tpshard is missing");
    /* Unpacking into a directory that is not empty is refused. */
    CHECK_FAILS(tp_bundle_unpack(paths[0], dest, &err), err, "not empty");

    /* Three ranks per node: the second node holds rank 3 alone. */
    char *out3 = fx_path(root, "bundles3");
    char **p3;
    size_t n3;
    CHECK_OK(tp_bundle_pack(good, 3, out3, true, &p3, &n3, &err), err);
    CHECK(n3 == 2);
    if (n3 == 2) {
        CHECK(strstr(p3[1], "node-00001-of-00002.tar") != NULL);
        CHECK_FAILS(tp_load_rank(&lr, p3[1], 2, &opts_verify, &err), err, "holds ranks 3, not rank 2");
        CHECK_OK(tp_bundle_verify(p3[1], &held, &err), err);
        CHECK(held == 1);
        for (size_t i = 0; i < n3; i++)
            free(p3[i]);
        free(p3);
    }
    CHECK_FAILS(tp_bundle_pack(good, 0, out3, true, NULL, NULL, &err), err, "at least 1");

    /* One bundle with every rank: pack -> unpack -> a complete directory
     * that verifies, against the source too. */
    char *out4 = fx_path(root, "bundles4"), *whole = fx_path(root, "unpacked-whole");
    CHECK_OK(tp_bundle_pack(good, 4, out4, true, &p3, &n3, &err), err);
    CHECK(n3 == 1);
    if (n3 == 1) {
        CHECK(strstr(p3[0], "node-00000-of-00001.tar") != NULL);
        CHECK_OK(tp_bundle_unpack(p3[0], whole, &err), err);
        tp_verify_report rep;
        CHECK_OK(tp_verify_dir(whole, 2, true, &rep, &err), err);
        CHECK(rep.ranks == 4 && rep.tensors == 4 * m->n);
        CHECK_OK(tp_verify_against(whole, src, 2, true, &rep, &err), err);
        CHECK(rep.compared_tensors == m->n);
        free(p3[0]);
        free(p3);
    }
    free(out4);
    free(whole);
    free(out3);
    free(dest);
    for (size_t i = 0; i < n; i++)
        free(paths[i]);
    free(paths);
    free(out);
}

int main(void)
{
    fx_model m;
    fx_model_init(&m);
    const char *root = check_tmpdir();
    char *src = fx_path(root, "model");
    fx_write_source(&m, src);
    char *none = fx_path(root, "conv-none"), *zstd = fx_path(root, "conv-zstd");
    fx_conv_opts on = {.tp = 4, .codec = TP_CODEC_NONE};
    fx_conv_opts oz = {.tp = 4, .codec = TP_CODEC_ZSTD};
    fx_write_conversion(&m, none, &on, NULL);
    fx_write_conversion(&m, zstd, &oz, NULL);

    test_load(&m, none, TP_CODEC_NONE);
    test_load(&m, zstd, TP_CODEC_ZSTD);
    test_refusals(&m, root, zstd);
    test_corruption(&m, root, none, zstd);
    test_copied_files(root, zstd);
    test_copied_rule(root, zstd);
    test_verify(&m, root, src, none, zstd);
    test_safetensors_export(&m, root, src);
    test_bundle_round_trip(&m, root, src, zstd);

    free(src);
    free(none);
    free(zstd);
    fx_model_free(&m);
    return check_finish("test_loader");
}
