/* test_manifest.c - manifest.json: write -> read round trip of every field;
 * each kind of bad manifest refused with its own message (missing rank,
 * ranks out of order, file names that leave the directory, bad conversion
 * id, versions, older manifests); the self-checksum (every flipped bit
 * refused); the embedded config against config.json; conversion ids and
 * rank file names. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cJSON.h>

#include "shardfmt.h"
#include "check.h"

static const char *tmpdir; /* check_tmpdir(), set first thing in main */

static tp_manifest sample(tp_manifest_rank *ranks, tp_manifest_file *files)
{
    ranks[0] = (tp_manifest_rank){ 0, "rank-00000-of-00002.tpshard", 123456789012ull, 0x0123456789abcdefull,
                                   9007199254740991ull, 5000, 17 };
    ranks[1] = (tp_manifest_rank){ 1, "rank-00001-of-00002.tpshard", 4096, 0xfedcba9876543210ull, 0, 0, 0 };
    files[0] = (tp_manifest_file){ "config.json", 91, 0x00000000000000ffull };
    files[1] = (tp_manifest_file){ "tokenizer.json", 11422654, 0xffeeddccbbaa9988ull };
    tp_manifest m = {
        .format_version = 1,
        .format = "tpshard",
        .conversion_id = "00112233445566778899aabbccddeeff",
        .tp = 2,
        .model_type = "qwen3",
        .vocab_parallel = true,
        .codec = "zstd",
        .level = 19,
        .config_json = "{\"hidden_size\":64,\"rope_theta\":1000000.0,\"tie_word_embeddings\":false}",
        .plan_json = "{\"*.q_proj\":\"colwise\",\"*.o_proj\":\"rowwise\"}",
        .n_files = 2,
        .files = files,
        .ranks = ranks,
    };
    return m;
}

static void test_round_trip(void)
{
    tp_manifest_rank ranks[2];
    tp_manifest_file files[2];
    tp_manifest m = sample(ranks, files), back;
    tp_err err = { "" };
    CHECK(tp_manifest_write(tmpdir, &m, &err) == 0, "write: %s", err.msg);
    CHECK(tp_manifest_read(tmpdir, &back, &err) == 0, "read: %s", err.msg);
    CHECK(back.format_version == TP_MANIFEST_VERSION && strcmp(back.format, "tpshard") == 0, "format");
    CHECK(strcmp(back.conversion_id, m.conversion_id) == 0, "conversion id");
    CHECK(back.tp == 2 && strcmp(back.model_type, "qwen3") == 0 && back.vocab_parallel, "tp/model/vocab");
    CHECK(strcmp(back.codec, "zstd") == 0 && back.level == 19, "codec/level");
    CHECK(back.n_files == 2 && strcmp(back.files[0].name, "config.json") == 0 &&
              strcmp(back.files[1].name, "tokenizer.json") == 0,
          "files");
    for (size_t i = 0; i < 2 && back.n_files == 2; i++)
        CHECK(back.files[i].size == m.files[i].size && back.files[i].xxh3 == m.files[i].xxh3,
              "files[%zu] size/xxh3 read back differ", i);
    for (int i = 0; i < 2; i++) {
        const tp_manifest_rank *a = &m.ranks[i], *b = &back.ranks[i];
        CHECK(b->rank == i && strcmp(a->file, b->file) == 0 && a->size == b->size && a->checksum == b->checksum &&
                  a->raw_bytes == b->raw_bytes && a->stored_bytes == b->stored_bytes && a->n_tensors == b->n_tensors,
              "rank %d read back differs", i);
    }
    /* config and plan come back as JSON objects with the same content. */
    cJSON *c1 = cJSON_Parse(m.config_json), *c2 = cJSON_Parse(back.config_json);
    CHECK(c2 && cJSON_Compare(c1, c2, 1), "config differs: %s", back.config_json);
    cJSON *p1 = cJSON_Parse(m.plan_json), *p2 = cJSON_Parse(back.plan_json);
    CHECK(p2 && cJSON_Compare(p1, p2, 1), "plan differs: %s", back.plan_json);
    cJSON_Delete(c1), cJSON_Delete(c2), cJSON_Delete(p1), cJSON_Delete(p2);
    tp_manifest_free(&back);

    /* The file: created and tool present, newline at the end, no .tmp left. */
    char *path = tp_path_join(tmpdir, TP_MANIFEST_NAME), *text;
    size_t len;
    CHECK(tp_read_file(path, 1 << 20, &text, &len, &err) == 0, "%s", err.msg);
    CHECK(len > 0 && text[len - 1] == '\n', "manifest ends with a newline");
    CHECK(strstr(text, "\"tool\":\t\"tpconvert 0.1\"") || strstr(text, "\"tool\": \"tpconvert 0.1\""),
          "tool recorded");
    CHECK(strstr(text, "\"created\""), "created recorded");
    free(text), free(path);

    /* A safetensors conversion with no copied files and a null plan. */
    tp_manifest s = sample(ranks, files);
    s.format = "safetensors";
    s.codec = "none";
    s.level = 0;
    s.plan_json = NULL;
    s.n_files = 0;
    ranks[0].file = "rank-00000-of-00002.safetensors";
    ranks[1].file = "rank-00001-of-00002.safetensors";
    CHECK(tp_manifest_write(tmpdir, &s, &err) == 0, "write safetensors: %s", err.msg);
    CHECK(tp_manifest_read(tmpdir, &back, &err) == 0, "read safetensors: %s", err.msg);
    CHECK(strcmp(back.format, "safetensors") == 0 && back.n_files == 0 && strcmp(back.plan_json, "{}") == 0,
          "safetensors manifest");
    tp_manifest_free(&back);

    /* Writing refuses what reading would refuse. */
    tp_manifest w = sample(ranks, files);
    ranks[1].file = "../x";
    CHECK(tp_manifest_write(tmpdir, &w, &err) < 0 && strstr(err.msg, "plain file name"), "write ../x: %s", err.msg);
    w = sample(ranks, files);
    w.config_json = "[1]";
    CHECK(tp_manifest_write(tmpdir, &w, &err) < 0 && strstr(err.msg, "config: config.json is not one JSON object"), "write config");
    w = sample(ranks, files);
    ranks[1].rank = 0;
    CHECK(tp_manifest_write(tmpdir, &w, &err) < 0, "write rank order");
    w = sample(ranks, files);
    files[0].name = "../config.json";
    CHECK(tp_manifest_write(tmpdir, &w, &err) < 0 && strstr(err.msg, "plain file name"), "write copied ../: %s",
          err.msg);

    CHECK(tp_manifest_read("/nonexistent-dir-h2", &back, &err) < 0 && strstr(err.msg, "/nonexistent-dir-h2/manifest.json"),
          "missing manifest names the path: %s", err.msg);
}

/* The sample as a cJSON tree, for editing into bad manifests. */
static cJSON *good_tree(void)
{
    tp_manifest_rank ranks[2];
    tp_manifest_file files[2];
    tp_manifest m = sample(ranks, files);
    tp_err err;
    char *path = tp_path_join(tmpdir, TP_MANIFEST_NAME), *text = NULL;
    size_t len;
    cJSON *root = NULL;
    if (tp_manifest_write(tmpdir, &m, &err) == 0 && tp_read_file(path, 1 << 20, &text, &len, &err) == 0)
        root = cJSON_Parse(text);
    free(text), free(path);
    if (!root) {
        fprintf(stderr, "cannot build the sample manifest\n");
        exit(1);
    }
    return root;
}

/* The tree as text with a valid self-checksum, so that an edit is judged by
 * the check it is aimed at (the checksum would refuse every edit first).
 * "manifest_xxh3" is moved last; a tree without one stays without. */
static char *sealed_text(cJSON *root)
{
    cJSON *sum = cJSON_DetachItemFromObjectCaseSensitive(root, "manifest_xxh3");
    if (sum)
        cJSON_AddItemToObject(root, "manifest_xxh3", sum);
    char *text = cJSON_PrintUnformatted(root);
    if (sum)
        tp_manifest_seal(text, strlen(text));
    return text;
}

static void expect_refused(const char *what, cJSON *root, const char *want)
{
    char *text = sealed_text(root);
    tp_manifest m;
    tp_err err = { "" };
    int rc = tp_manifest_parse(text, strlen(text), "dir/manifest.json", &m, &err);
    CHECK(rc < 0, "%s: must be refused", what);
    if (rc == 0)
        tp_manifest_free(&m);
    else
        CHECK(strstr(err.msg, want) && strstr(err.msg, "dir/manifest.json"),
              "%s: message \"%s\" should name the file and say \"%s\"", what, err.msg, want);
    free(text);
    cJSON_Delete(root);
}

static cJSON *rank_entry(cJSON *root, int i)
{
    return cJSON_GetArrayItem(cJSON_GetObjectItem(root, "ranks"), i);
}

static cJSON *file_entry(cJSON *root, int i)
{
    return cJSON_GetArrayItem(cJSON_GetObjectItem(root, "files"), i);
}

static void set(cJSON *obj, const char *key, cJSON *v)
{
    cJSON_ReplaceItemInObjectCaseSensitive(obj, key, v);
}

static void test_refusals(void)
{
    /* The unedited tree parses (so each refusal below is the edit's doing). */
    {
        cJSON *root = good_tree();
        char *text = sealed_text(root);
        tp_manifest m;
        tp_err err;
        CHECK(tp_manifest_parse(text, strlen(text), "good", &m, &err) == 0, "good manifest: %s", err.msg);
        tp_manifest_free(&m);
        free(text);
        cJSON_Delete(root);
    }
    cJSON *r;

    r = good_tree();
    cJSON_DeleteItemFromArray(cJSON_GetObjectItem(r, "ranks"), 1);
    expect_refused("missing rank", r, "lists 1 ranks but tp is 2 (rank 1 missing)");

    r = good_tree();
    set(r, "tp", cJSON_CreateNumber(1));
    expect_refused("extra rank", r, "lists 2 ranks but tp is 1");

    r = good_tree();
    set(rank_entry(r, 0), "rank", cJSON_CreateNumber(1));
    set(rank_entry(r, 1), "rank", cJSON_CreateNumber(0));
    expect_refused("ranks out of order", r, "ranks[0]: is rank 1 (ranks must be listed 0..tp-1 in order)");

    const char *bad_names[] = { "../rank-00000-of-00002.tpshard", "sub/rank.tpshard", "/etc/passwd", "..", ".", "",
                                "a\\b" };
    for (size_t k = 0; k < sizeof bad_names / sizeof *bad_names; k++) {
        r = good_tree();
        set(rank_entry(r, 1), "file", cJSON_CreateString(bad_names[k]));
        char what[64];
        snprintf(what, sizeof what, "rank file \"%s\"", bad_names[k]);
        expect_refused(what, r, k == 5 ? "\"file\" is empty" : "ranks[1]: file");
    }
    /* Copied files: {"name", "size", "xxh3"} objects, every field checked. */
    for (size_t k = 0; k < sizeof bad_names / sizeof *bad_names; k++) {
        r = good_tree();
        set(file_entry(r, 1), "name", cJSON_CreateString(bad_names[k]));
        char what[64];
        snprintf(what, sizeof what, "copied file \"%s\"", bad_names[k]);
        expect_refused(what, r, k == 5 ? "files[1]: \"name\" is empty" : "files[1]: name");
    }
    r = good_tree();
    cJSON_AddItemToArray(cJSON_GetObjectItem(r, "files"), cJSON_CreateString("tokenizer_config.json"));
    expect_refused("copied file as a bare name (old form)", r, "files[2]: must be an object");
    r = good_tree();
    cJSON_AddItemToArray(cJSON_GetObjectItem(r, "files"), cJSON_Duplicate(file_entry(r, 0), 1));
    expect_refused("copied file twice", r, "file config.json listed twice");
    r = good_tree();
    cJSON_DeleteItemFromObject(file_entry(r, 1), "size");
    expect_refused("copied file without size", r, "files[1]");
    r = good_tree();
    cJSON_DeleteItemFromObject(file_entry(r, 0), "xxh3");
    expect_refused("copied file without xxh3", r, "files[0]");
    r = good_tree();
    cJSON_DeleteItemFromObject(file_entry(r, 0), "name");
    expect_refused("copied file without name", r, "files[0]");
    r = good_tree();
    set(file_entry(r, 1), "size", cJSON_CreateNumber(-1));
    expect_refused("copied file size -1", r, "files[1]");
    r = good_tree();
    set(file_entry(r, 1), "size", cJSON_CreateString("12"));
    expect_refused("copied file size as a string", r, "files[1]");
    const char *bad_sums[] = { "ffeeddccbbaa998", "ffeeddccbbaa99880", "ffeeddccbbaa998g", "", "0x0eddccbbaa9988" };
    for (size_t k = 0; k < sizeof bad_sums / sizeof *bad_sums; k++) {
        r = good_tree();
        set(file_entry(r, 1), "xxh3", cJSON_CreateString(bad_sums[k]));
        expect_refused("copied file xxh3", r, k == 3 ? "files[1]: \"xxh3\" is empty" : "is not 16 hex digits");
    }
    r = good_tree();
    set(file_entry(r, 1), "xxh3", cJSON_CreateNumber(1234));
    expect_refused("copied file xxh3 as a number", r, "files[1]");
    r = good_tree();
    cJSON_AddNumberToObject(file_entry(r, 0), "mtime", 1);
    expect_refused("copied file with an unknown key", r, "mtime");
    r = good_tree();
    set(rank_entry(r, 1), "file", cJSON_CreateString("rank-00000-of-00002.tpshard"));
    expect_refused("two ranks, one file", r, "share the file");

    const char *bad_ids[] = { "00112233445566778899AABBCCDDEEFF", "0011", "00112233445566778899aabbccddeeff00",
                              "g0112233445566778899aabbccddeeff" };
    for (size_t k = 0; k < sizeof bad_ids / sizeof *bad_ids; k++) {
        r = good_tree();
        set(r, "conversion_id", cJSON_CreateString(bad_ids[k]));
        expect_refused("conversion id", r, "is not 32 lowercase hex digits");
    }

    r = good_tree();
    set(r, "format_version", cJSON_CreateNumber(3));
    expect_refused("newer version", r, "format version 3 is newer than this build supports (2)");
    r = good_tree();
    set(r, "format_version", cJSON_CreateNumber(0));
    expect_refused("version 0", r, "made by an older tpconvert");
    /* A version 1 manifest, as tpconvert wrote it before the checksum. */
    r = good_tree();
    set(r, "format_version", cJSON_CreateNumber(1));
    cJSON_DeleteItemFromObject(r, "manifest_xxh3");
    expect_refused("version 1", r, "format version 1 was made by an older tpconvert (this build reads 2): convert again");
    r = good_tree();
    cJSON_DeleteItemFromObject(r, "manifest_xxh3");
    expect_refused("no checksum", r, "missing \"manifest_xxh3\"");
    r = good_tree();
    set(file_entry(r, 1), "size", cJSON_CreateNumber((double)TP_MAX_COPIED_FILE + 1));
    expect_refused("copied file too large", r, "files[1]: tokenizer.json is 67108865 bytes, more than the 67108864");
    r = good_tree();
    set(r, "format_version", cJSON_CreateString("1"));
    expect_refused("version as a string", r, "\"format_version\" must be a number");

    r = good_tree();
    set(r, "tp", cJSON_CreateNumber(0));
    expect_refused("tp 0", r, "\"tp\" must be an integer in [1, 4096]");
    r = good_tree();
    set(r, "tp", cJSON_CreateNumber(5000));
    expect_refused("tp 5000", r, "\"tp\" must be an integer in [1, 4096]");
    r = good_tree();
    set(r, "format", cJSON_CreateString("gguf"));
    expect_refused("format", r, "format \"gguf\"");
    r = good_tree();
    set(r, "codec", cJSON_CreateString("lz4"));
    expect_refused("codec", r, "unknown codec \"lz4\"");
    r = good_tree();
    set(r, "level", cJSON_CreateNumber(99));
    expect_refused("level", r, "\"level\" must be an integer");
    r = good_tree();
    set(r, "config", cJSON_CreateString("{}"));
    expect_refused("config as a string", r, "\"config\" must be an object");
    r = good_tree();
    set(r, "created", cJSON_CreateString("yesterday"));
    expect_refused("created", r, "not an ISO-8601 UTC time");
    r = good_tree();
    set(rank_entry(r, 0), "checksum", cJSON_CreateString("xyz"));
    expect_refused("checksum", r, "checksum \"xyz\" is not 16 hex digits");
    r = good_tree();
    set(rank_entry(r, 0), "size", cJSON_CreateNumber(1.5));
    expect_refused("fractional size", r, "ranks[0]: \"size\" must be a non-negative integer");
    r = good_tree();
    set(rank_entry(r, 0), "size", cJSON_CreateNumber(-1));
    expect_refused("negative size", r, "\"size\" must be a non-negative integer");
    r = good_tree();
    cJSON_DeleteItemFromObject(rank_entry(r, 0), "checksum");
    expect_refused("missing checksum", r, "ranks[0]: missing \"checksum\"");
    r = good_tree();
    cJSON_AddNumberToObject(r, "extra", 1);
    expect_refused("unknown key", r, "unknown key \"extra\"");
    r = good_tree();
    cJSON_AddStringToObject(r, "model_type", "llama"); /* a second "model_type" */
    expect_refused("duplicate key", r, "duplicate key \"model_type\"");
    r = good_tree();
    cJSON_DeleteItemFromObject(r, "vocab_parallel");
    expect_refused("missing key", r, "missing \"vocab_parallel\"");
    r = good_tree();
    set(r, "vocab_parallel", cJSON_CreateNumber(1));
    expect_refused("bool as a number", r, "\"vocab_parallel\" must be true or false");
    r = good_tree();
    set(r, "format", cJSON_CreateString("safetensors"));
    expect_refused("safetensors with zstd", r, "codec \"none\"");

    /* Not JSON at all, or cut short. */
    tp_manifest m;
    tp_err err = { "" };
    const char *texts[] = { "", "{", "[]", "null", "{\"format\":\"tpshard\"", "{} {}" };
    const char *wants[] = { "not valid JSON", "not valid JSON", "not a JSON object", "not a JSON object",
                            "not valid JSON", "not valid JSON" };
    for (size_t k = 0; k < sizeof texts / sizeof *texts; k++) {
        int rc = tp_manifest_parse(texts[k], strlen(texts[k]), "m.json", &m, &err);
        CHECK(rc < 0 && strstr(err.msg, wants[k]), "text \"%s\": got \"%s\"", texts[k], rc < 0 ? err.msg : "success");
        if (rc == 0)
            tp_manifest_free(&m);
    }
}

/* The sample manifest's file, as tpconvert writes it. */
static __attribute__((noinline)) char *sample_text(size_t *len)
{
    tp_manifest_rank ranks[2];
    tp_manifest_file files[2];
    tp_manifest m = sample(ranks, files);
    tp_err err;
    char *path = tp_path_join(tmpdir, TP_MANIFEST_NAME), *text = NULL;
    if (tp_manifest_write(tmpdir, &m, &err) != 0 || tp_read_file(path, 1 << 20, &text, len, &err) != 0) {
        fprintf(stderr, "cannot write the sample manifest: %s\n", err.msg);
        exit(1);
    }
    free(path);
    return text;
}

static bool parses(const char *text, size_t len, tp_err *err)
{
    tp_manifest m;
    if (tp_manifest_parse(text, len, "dir/manifest.json", &m, err) < 0)
        return false;
    tp_manifest_free(&m);
    return true;
}

/* Every bit of the file up to the checksum's last digit matters: a flip
 * anywhere (the config's rms_norm_eps, a rank's checksum, the codec, the
 * checksum itself) is refused. */
static void test_self_checksum(void)
{
    size_t len;
    char *text = sample_text(&len);
    tp_err err = { "" };
    CHECK(parses(text, len, &err), "the sample parses: %s", err.msg);
    const char *last = strstr(text, "\"manifest_xxh3\"");
    CHECK(last && strstr(last + 1, "\"manifest_xxh3\"") == NULL, "one checksum member");
    size_t end = (size_t)(strrchr(text, '"') - text); /* the checksum's closing quote */
    size_t accepted = 0;
    for (size_t i = 0; i < end; i++)
        for (int bit = 0; bit < 8; bit++) {
            text[i] ^= (char)(1 << bit);
            if (parses(text, len, &err)) {
                accepted++;
                fprintf(stderr, "accepted: bit %d of byte %zu\n", bit, i);
            }
            text[i] ^= (char)(1 << bit);
        }
    CHECK(accepted == 0, "%zu of %zu single-bit flips were accepted", accepted, end * 8);

    /* A value edited in place (the attack of the issue): the checksum names it. */
    char *edit = strstr(text, "\"hidden_size\":\t64");
    CHECK(edit != NULL, "sample holds hidden_size 64");
    if (edit) {
        edit[strlen("\"hidden_size\":\t6")] = '5';
        CHECK(!parses(text, len, &err) && strstr(err.msg, "dir/manifest.json: checksum mismatch"),
              "edited config: %s", err.msg);
        CHECK(tp_manifest_seal(text, len) == 0 && parses(text, len, &err),
              "resealed, the edit is judged on its own: %s", err.msg);
    }
    /* The member must close the file. */
    char moved[] = "{\"manifest_xxh3\": \"0000000000000000\", \"format_version\": 2}";
    CHECK(!parses(moved, strlen(moved), &err) && strstr(err.msg, "must be the last member"), "moved: %s", err.msg);
    CHECK(tp_manifest_seal(moved, strlen(moved)) == -1, "seal needs the member last");
    free(text);
}

/* The writer refuses what would not read back, naming where it came from. */
static void test_write_refusals(void)
{
    tp_manifest_rank ranks[2];
    tp_manifest_file files[2];
    tp_err err = { "" };
    tp_manifest w = sample(ranks, files);
    /* config.json with a NUL byte inside a string: the text ends there. */
    static const char nul_config[] = "{\"model_type\": \"qwen3\0x\", \"hidden_size\": 64}";
    w.config_json = (char *)nul_config;
    CHECK(tp_manifest_write(tmpdir, &w, &err) < 0 && strstr(err.msg, "config: config.json is not one JSON object"),
          "config cut by a NUL: %s", err.msg);
    w = sample(ranks, files);
    w.config_json = "{\"a\": 1} trailing";
    CHECK(tp_manifest_write(tmpdir, &w, &err) < 0 && strstr(err.msg, "config.json is not one JSON object"),
          "config with trailing bytes: %s", err.msg);
    w = sample(ranks, files);
    w.model_type = "qwen\t3";
    CHECK(tp_manifest_write(tmpdir, &w, &err) < 0 && strstr(err.msg, "would not read back") &&
              strstr(err.msg, "model_type"),
          "model_type with a tab: %s", err.msg);
    w = sample(ranks, files);
    files[1].size = (uint64_t)TP_MAX_COPIED_FILE + 1;
    CHECK(tp_manifest_write(tmpdir, &w, &err) < 0 && strstr(err.msg, "tokenizer.json: 67108865 bytes, more than"),
          "copied file too large: %s", err.msg);
}

/* The embedded config and config.json: the same value, or refused. */
static void test_config_copy(void)
{
    tp_manifest_rank ranks[2];
    tp_manifest_file files[2];
    tp_manifest m = sample(ranks, files), back;
    tp_err err = { "" };
    CHECK(tp_manifest_write(tmpdir, &m, &err) == 0 && tp_manifest_read(tmpdir, &back, &err) == 0, "%s", err.msg);
    const char *same = "{\n  \"hidden_size\": 64,\n  \"rope_theta\": 1000000.0,\n  \"tie_word_embeddings\": false\n}\n";
    CHECK(tp_manifest_check_config_copy(&back, same, strlen(same), "out", &err) == 0, "same config: %s", err.msg);
    const char *eps = "{\"hidden_size\": 64, \"rope_theta\": 1000000.0, \"tie_word_embeddings\": true}";
    CHECK(tp_manifest_check_config_copy(&back, eps, strlen(eps), "out", &err) < 0 &&
              strstr(err.msg, "out: config.json differs from the config in manifest.json"),
          "changed config: %s", err.msg);
    CHECK(tp_manifest_check_config_copy(&back, "[]", 2, "out", &err) < 0 &&
              strstr(err.msg, "out: config.json is not a JSON object"), "not an object: %s", err.msg);
    tp_manifest_free(&back);
}

static void test_names_and_ids(void)
{
    char name[64];
    tp_rank_file_name(name, sizeof name, 1, 4, ".tpshard");
    CHECK(strcmp(name, "rank-00001-of-00004.tpshard") == 0, "rank file name: %s", name);
    tp_rank_file_name(name, sizeof name, 0, 2, ".safetensors");
    CHECK(strcmp(name, "rank-00000-of-00002.safetensors") == 0, "rank file name: %s", name);

    char a[33], b[33];
    tp_new_conversion_id(a);
    tp_new_conversion_id(b);
    CHECK(strlen(a) == 32 && strspn(a, "0123456789abcdef") == 32, "conversion id shape: %s", a);
    CHECK(strcmp(a, b) != 0, "two conversion ids must differ");
}

int main(void)
{
    tmpdir = check_tmpdir();
    test_round_trip();
    test_refusals();
    test_self_checksum();
    test_write_refusals();
    test_config_copy();
    test_names_and_ids();
    char *path = tp_path_join(tmpdir, TP_MANIFEST_NAME);
    unlink(path);
    free(path);
    CHECK(rmdir(tmpdir) == 0, "%s not empty once manifest.json is gone (a temporary file left behind?)", tmpdir);
    return check_finish("test_manifest");
}
