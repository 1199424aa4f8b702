/* test_bundle.c - hostile bundles.  Tars are built here with libarchive
 * itself (absolute paths, "..", links, devices, duplicates, oversized and
 * unknown entries, ...); each must be refused by tp_bundle_unpack with a
 * specific message and leave nothing behind, and be refused by
 * tp_bundle_verify and tp_load_rank too. */
#include "loader_fixture.h"
#include "loader_internal.h"

#include <archive.h>
#include <archive_entry.h>

typedef enum tb_type { TB_FILE, TB_SYMLINK, TB_HARDLINK, TB_DIR, TB_CHARDEV, TB_END } tb_type;

typedef struct tb_entry {
    const char *name;
    tb_type type;
    const void *data;
    size_t len;
    int64_t declared; /* > 0: header size (libarchive pads with zeros) */
    const char *link;
} tb_entry;

static void tb_write(const char *path, const tb_entry *entries)
{
    struct archive *a = archive_write_new();
    archive_write_set_format_pax_restricted(a);
    archive_write_add_filter_none(a);
    if (archive_write_open_filename(a, path) != ARCHIVE_OK) {
        fprintf(stderr, "%s: %s\n", path, archive_error_string(a));
        exit(2);
    }
    for (const tb_entry *x = entries; x->type != TB_END; x++) {
        struct archive_entry *e = archive_entry_new();
        archive_entry_set_pathname(e, x->name);
        archive_entry_set_perm(e, 0644);
        archive_entry_set_mtime(e, 1700000000, 0);
        switch (x->type) {
        case TB_FILE:
            archive_entry_set_filetype(e, AE_IFREG);
            archive_entry_set_size(e, x->declared > 0 ? x->declared : (int64_t)x->len);
            break;
        case TB_SYMLINK:
            archive_entry_set_filetype(e, AE_IFLNK);
            archive_entry_set_symlink(e, x->link);
            archive_entry_set_size(e, 0);
            break;
        case TB_HARDLINK:
            archive_entry_set_filetype(e, AE_IFREG);
            archive_entry_set_hardlink(e, x->link);
            archive_entry_set_size(e, 0);
            break;
        case TB_DIR:
            archive_entry_set_filetype(e, AE_IFDIR);
            archive_entry_set_perm(e, 0755);
            archive_entry_set_size(e, 0);
            break;
        case TB_CHARDEV:
            archive_entry_set_filetype(e, AE_IFCHR);
            archive_entry_set_rdevmajor(e, 1);
            archive_entry_set_rdevminor(e, 3);
            archive_entry_set_size(e, 0);
            break;
        case TB_END:
            break;
        }
        if (archive_write_header(a, e) != ARCHIVE_OK) {
            fprintf(stderr, "%s: %s: %s\n", path, x->name, archive_error_string(a));
            exit(2);
        }
        if (x->type == TB_FILE && x->len)
            archive_write_data(a, x->data, x->len);
        archive_entry_free(e);
    }
    archive_write_close(a);
    archive_write_free(a);
}

static char *slurp(const char *dir, const char *name, size_t *len)
{
    char *path = tp_path_join(dir, name), *text;
    tp_err err;
    if (tp_read_file(path, (size_t)1 << 28, &text, len, &err) != 0) {
        fprintf(stderr, "%s\n", err.msg);
        exit(2);
    }
    free(path);
    return text;
}

static bool dir_is_empty(const char *dir)
{
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "test -d '%s' && test -z \"$(ls -A '%s')\"", dir, dir);
    return system(cmd) == 0;
}

/* Unpack must fail with want and leave nothing: a fresh destination is
 * removed, an existing empty one stays empty.  verify and load refuse too. */
static void expect_refused(const char *root, const char *tar, const char *want, bool check_load)
{
    tp_err err;
    char *fresh = fx_path(root, "dest-fresh"), *empty = fx_path(root, "dest-empty");
    CHECK_FAILS(tp_bundle_unpack(tar, fresh, &err), err, want);
    CHECK(access(fresh, F_OK) != 0);
    mkdir(empty, 0755);
    CHECK_FAILS(tp_bundle_unpack(tar, empty, &err), err, want);
    CHECK(dir_is_empty(empty));
    rmdir(empty);
    size_t n;
    CHECK_FAILS(tp_bundle_verify(tar, &n, &err), err, want);
    if (check_load) {
        tp_loaded_rank lr;
        tp_load_opts o = {.verify = true, .threads = 1, .quiet = true};
        CHECK_FAILS(tp_load_rank(&lr, tar, 0, &o, &err), err, want);
    }
    free(fresh);
    free(empty);
}

/* What a tp_ld_tar_walk reported, for test_tar_walk. */
typedef struct walk_log {
    int manifests, ends, fail_at; /* fail_at: on_entry call that fails (-1: none) */
    size_t manifest_len;
    char order[8][64];
    int n;
    bool seen_rank[2], seen_file[2];
} walk_log;

static int log_manifest(void *arg, const tp_manifest *m, const uint8_t *json, size_t len, tp_err *err)
{
    walk_log *w = arg;
    w->manifests++;
    w->manifest_len = len;
    return m->tp == 2 && w->n == 0 ? 0 : tp_errorf(err, "manifest hook saw the wrong state");
}

static int log_entry(void *arg, const tp_ld_tar_entry *ent, tp_err *err)
{
    walk_log *w = arg;
    if (w->n == w->fail_at)
        return tp_errorf(err, "stop at %s", ent->name);
    bool copied = ent->kind == TP_LD_ENTRY_COPIED && ent->file && strcmp(ent->file->name, ent->name) == 0;
    if (w->n < 8)
        snprintf(w->order[w->n], sizeof w->order[0], "%s %d %s", ent->name,
                 ent->kind == TP_LD_ENTRY_RANK ? ent->rank : -1, copied ? "file" : "-");
    w->n++;
    if (w->n == 2) { /* read one entry's data; the walk skips the others' */
        uint8_t *data;
        size_t len;
        if (tp_ld_tar_read_entry(ent->a, ent->e, "walk", (size_t)ent->size, &data, &len, err) < 0)
            return -1;
        free(data);
    }
    return 0;
}

static int log_end(void *arg, const bool *seen_rank, const bool *seen_file, tp_err *err)
{
    walk_log *w = arg;
    w->ends++;
    memcpy(w->seen_rank, seen_rank, sizeof w->seen_rank);
    memcpy(w->seen_file, seen_file, sizeof w->seen_file);
    return 0;
}

/* The shared walk on its own: manifest first, entries in tar order with
 * what they are, the end with what was seen; a hook's error stops it. */
static void test_tar_walk(const char *tar, const tb_entry *good, size_t man_len)
{
    static const tp_ld_tar_walker walker = {log_manifest, log_entry, log_end};
    tp_err err;
    tp_manifest m;
    tb_write(tar, good);
    walk_log w = {.fail_at = -1};
    CHECK_OK(tp_ld_tar_walk(tar, &m, &walker, &w, &err), err);
    CHECK(m.tp == 2 && m.n_files == 2);
    CHECK(w.manifests == 1 && w.manifest_len == man_len && w.ends == 1 && w.n == 3);
    CHECK(strcmp(w.order[0], "config.json -1 file") == 0);
    CHECK(strcmp(w.order[1], "tokenizer.json -1 file") == 0);
    CHECK(strcmp(w.order[2], "rank-00000-of-00002.tpshard 0 -") == 0);
    CHECK(w.seen_rank[0] && !w.seen_rank[1] && w.seen_file[0] && w.seen_file[1]);
    tp_manifest_free(&m);
    /* An on_entry error ends the walk with it: no more entries, no end. */
    w = (walk_log){.fail_at = 1};
    CHECK_FAILS(tp_ld_tar_walk(tar, &m, &walker, &w, &err), err, "stop at tokenizer.json");
    CHECK(w.n == 1 && w.ends == 0);
    tp_manifest_free(&m);
    /* An on_manifest error: no entry at all. */
    w = (walk_log){.fail_at = -1, .n = 5};
    CHECK_FAILS(tp_ld_tar_walk(tar, &m, &walker, &w, &err), err, "manifest hook saw the wrong state");
    CHECK(w.n == 5 && w.ends == 0);
    tp_manifest_free(&m);
}

int main(void)
{
    fx_model m;
    fx_model_init(&m);
    const char *root = check_tmpdir();
    char *conv = fx_path(root, "conv");
    fx_conv_opts o = {.tp = 2, .codec = TP_CODEC_ZSTD};
    fx_write_conversion(&m, conv, &o, NULL);

    size_t man_len, cfg_len, tok_len, r0_len, r1_len;
    char *man = slurp(conv, "manifest.json", &man_len);
    char *cfg = slurp(conv, "config.json", &cfg_len);
    char *tok = slurp(conv, "tokenizer.json", &tok_len);
    char *r0 = slurp(conv, "rank-00000-of-00002.tpshard", &r0_len);
    char *r1 = slurp(conv, "rank-00001-of-00002.tpshard", &r1_len);
    const char *R0 = "rank-00000-of-00002.tpshard", *R1 = "rank-00001-of-00002.tpshard";
#define F(name, data, len) {name, TB_FILE, data, len, 0, NULL}
#define MAN F("manifest.json", man, man_len)
#define CFG F("config.json", cfg, cfg_len)
#define TOK F("tokenizer.json", tok, tok_len)
#define RANK0 F(R0, r0, r0_len)
#define END {NULL, TB_END, NULL, 0, 0, NULL}
    char *tar = fx_path(root, "b.tar");
    tp_err err;

    {
        tb_entry e[] = {MAN, CFG, TOK, RANK0, END};
        test_tar_walk(tar, e, man_len);
    }
    /* The builder itself makes a good bundle: the baseline. */
    {
        tb_entry e[] = {MAN, CFG, TOK, RANK0, F(R1, r1, r1_len), END};
        tb_write(tar, e);
        char *dest = fx_path(root, "good");
        CHECK_OK(tp_bundle_unpack(tar, dest, &err), err);
        size_t n = 0;
        CHECK_OK(tp_bundle_verify(tar, &n, &err), err);
        CHECK(n == 2);
        tp_loaded_rank lr;
        tp_load_opts lo = {.verify = true, .threads = 1, .quiet = true};
        CHECK_OK(tp_load_rank(&lr, tar, 1, &lo, &err), err);
        if (lr.n_tensors)
            fx_check_loaded(&m, &lr, 2);
        tp_loaded_rank_free(&lr);
        CHECK_OK(tp_load_rank(&lr, dest, 0, &lo, &err), err);
        tp_loaded_rank_free(&lr);
        check_rmtree(dest);
        free(dest);
    }
    {
        tb_entry e[] = {MAN, CFG, TOK, RANK0, F("/tmp/evil", "x", 1), END};
        tb_write(tar, e);
        expect_refused(root, tar, "entry /tmp/evil: absolute path refused", true);
    }
    {
        tb_entry e[] = {MAN, CFG, TOK, RANK0, F("../evil", "x", 1), END};
        tb_write(tar, e);
        expect_refused(root, tar, "entry ../evil: \"..\" in path refused", true);
    }
    {
        tb_entry e[] = {MAN, CFG, RANK0, F("sub/tokenizer.json", tok, tok_len), END};
        tb_write(tar, e);
        expect_refused(root, tar, "entry sub/tokenizer.json: directories refused (bundles are flat)", true);
    }
    {
        tb_entry e[] = {MAN, CFG, RANK0, {"tokenizer.json", TB_SYMLINK, NULL, 0, 0, "/etc/passwd"}, END};
        tb_write(tar, e);
        expect_refused(root, tar, "entry tokenizer.json: symbolic link refused", true);
    }
    {
        tb_entry e[] = {MAN, CFG, RANK0, {"tokenizer.json", TB_HARDLINK, NULL, 0, 0, "config.json"}, END};
        tb_write(tar, e);
        expect_refused(root, tar, "entry tokenizer.json: hard link refused", true);
    }
    {
        tb_entry e[] = {MAN, CFG, RANK0, {"tokenizer.json", TB_DIR, NULL, 0, 0, NULL}, END};
        tb_write(tar, e);
        expect_refused(root, tar, "refused (bundles are flat)", true);
    }
    {
        tb_entry e[] = {MAN, CFG, RANK0, {"tokenizer.json", TB_CHARDEV, NULL, 0, 0, NULL}, END};
        tb_write(tar, e);
        expect_refused(root, tar, "entry tokenizer.json: device file refused", true);
    }
    {
        tb_entry e[] = {MAN, CFG, TOK, RANK0, CFG, END};
        tb_write(tar, e);
        expect_refused(root, tar, "entry config.json appears twice", true);
    }
    {
        tb_entry e[] = {MAN, CFG, TOK, RANK0, MAN, END};
        tb_write(tar, e);
        expect_refused(root, tar, "entry manifest.json appears twice", true);
    }
    {
        tb_entry e[] = {MAN, CFG, TOK, RANK0, RANK0, END};
        tb_write(tar, e);
        expect_refused(root, tar, "entry rank-00000-of-00002.tpshard appears twice", false);
    }
    {
        tb_entry e[] = {MAN, CFG, TOK, RANK0, F("evil.sh", "#!/bin/sh\n", 10), END};
        tb_write(tar, e);
        expect_refused(root, tar, "entry evil.sh is not listed in the bundle's manifest", true);
    }
    {
        /* A rank entry larger than the manifest says (zero padded). */
        tb_entry e[] = {MAN, CFG, TOK, {R0, TB_FILE, r0, r0_len, (int64_t)r0_len + 4096, NULL}, END};
        tb_write(tar, e);
        char want[200];
        snprintf(want, sizeof want, "is %zu bytes, the manifest says %zu", r0_len + 4096, r0_len);
        expect_refused(root, tar, want, true);
    }
    {
        /* A copied file over the 64 MiB cap. */
        tb_entry e[] = {MAN, CFG, RANK0, {"tokenizer.json", TB_FILE, tok, tok_len, (64 << 20) + 1, NULL}, END};
        tb_write(tar, e);
        expect_refused(root, tar, "entry tokenizer.json is 67108865 bytes, more than the 67108864 allowed", true);
    }
    {
        tb_entry e[] = {CFG, MAN, TOK, RANK0, END};
        tb_write(tar, e);
        expect_refused(root, tar, "first entry is config.json, expected manifest.json", true);
    }
    {
        tb_entry e[] = {F("manifest.json", "{\"format\": ", 11), CFG, TOK, RANK0, END};
        tb_write(tar, e);
        expect_refused(root, tar, "manifest.json", true);
    }
    {
        tb_entry e[] = {MAN, CFG, TOK, END};
        tb_write(tar, e);
        expect_refused(root, tar, "holds no rank file", false);
        tp_loaded_rank lr;
        CHECK_FAILS(tp_load_rank(&lr, tar, 0, NULL, &err), err, "holds no rank file (wanted rank 0)");
    }
    {
        tb_entry e[] = {MAN, CFG, RANK0, END};
        tb_write(tar, e);
        expect_refused(root, tar, "copied file tokenizer.json listed in the manifest is missing", true);
    }
    {
        /* A rank file from another conversion under the right name. */
        char *other = fx_path(root, "other");
        fx_write_conversion(&m, other, &o, NULL);
        size_t len;
        char *foreign = slurp(other, R0, &len);
        tb_entry e[] = {MAN, CFG, TOK, F(R0, foreign, len), END};
        tb_write(tar, e);
        expect_refused(root, tar, "ranks from two conversions", true);
        free(foreign);
        free(other);
    }
    {
        /* A tar cut short in the middle of the rank file. */
        tb_entry e[] = {MAN, CFG, TOK, RANK0, END};
        tb_write(tar, e);
        struct stat st;
        stat(tar, &st);
        CHECK(truncate(tar, 3072 + (off_t)r0_len / 2) == 0 || st.st_size < 3072);
        expect_refused(root, tar, "b.tar", true);
    }
    {
        /* Not a tar at all. */
        fx_write_text(tar, "this is not a tar file, just text that goes on for a while ......\n");
        expect_refused(root, tar, "b.tar", true);
    }

    /* Random damage to the headers and the manifest: whatever happens, no
     * crash, and a failed unpack leaves nothing behind. */
    {
        tb_entry e[] = {MAN, CFG, TOK, RANK0, END};
        tb_write(tar, e);
        size_t len;
        char *image = slurp(root, "b.tar", &len);
        check_rng rng = check_rng_seed(12345);
        /* unpack fsyncs every file: on tmpfs when there is one, that is free. */
        char *shm = strdup("/dev/shm/tpload-XXXXXX");
        if (access("/dev/shm", W_OK) != 0 || !mkdtemp(shm)) {
            free(shm);
            shm = NULL;
        }
        char *dest = fx_path(shm ? shm : root, "dest-fuzz");
        int refused = 0, rounds = 150;
        for (int iter = 0; iter < rounds; iter++) {
            char *copy = malloc(len);
            memcpy(copy, image, len);
            int flips = 1 + (int)(check_rng_next(&rng) % 4);
            for (int k = 0; k < flips; k++) {
                /* Mostly the first 4 KiB: headers, the manifest, config.json. */
                size_t at = check_rng_next(&rng) % 8 ? check_rng_next(&rng) % 4096 : check_rng_next(&rng) % len;
                copy[at % len] ^= (char)(1 + check_rng_next(&rng) % 255);
            }
            FILE *f = fopen(tar, "wb"); /* no fsync: many rounds */
            CHECK(f && fwrite(copy, 1, len, f) == len);
            if (f)
                fclose(f);
            free(copy);
            if (tp_bundle_unpack(tar, dest, &err) == 0) {
                check_rmtree(dest);
            } else {
                refused++;
                CHECK(access(dest, F_OK) != 0);
            }
            size_t n;
            tp_bundle_verify(tar, &n, &err);
            tp_loaded_rank lr;
            tp_load_opts lo = {.verify = true, .threads = 1, .quiet = true};
            if (tp_load_rank(&lr, tar, 0, &lo, &err) == 0)
                tp_loaded_rank_free(&lr);
        }
        printf("damaged bundles: %d of %d refused by unpack\n", refused, rounds);
        CHECK(refused > rounds / 3);
        free(dest);
        if (shm) {
            check_rmtree(shm);
            free(shm);
        }
        free(image);
    }

    char cmd[1200];
    snprintf(cmd, sizeof cmd, "test -z \"$(ls -A '%s' | grep dest)\"", root);
    CHECK(system(cmd) == 0);
    free(conv);
    free(tar);
    free(man);
    free(cfg);
    free(tok);
    free(r0);
    free(r1);
    fx_model_free(&m);
    return check_finish("test_bundle");
}
