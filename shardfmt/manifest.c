/* manifest.c - manifest.json of a converted directory (FORMAT.md,
 * "Manifest"), conversion ids and rank file names.
 *
 * tpconvert writes the manifest last, so a directory with a manifest is a
 * finished conversion; the manifest pins every rank file by size and
 * checksum.  Parsing is strict: unknown or duplicate keys, missing ranks,
 * ranks out of order and file names that could leave the directory are all
 * refused, each with its own message.  The manifest's last member,
 * "manifest_xxh3", is a checksum of every byte before its value, so that no field
 * (the embedded config, the plan, the codec, the checksums of the rank and
 * copied files) can change without the readers noticing.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include <zstd.h>

#include "json_internal.h"
#include "shardfmt.h"

#define MAX_MANIFEST_SIZE (64u << 20)
#define CHECKSUM_KEY "manifest_xxh3"
#define CHECKSUM_KEY_QUOTED "\"" CHECKSUM_KEY "\""

void tp_rank_file_name(char *out, size_t cap, int rank, int tp, const char *ext)
{
    snprintf(out, cap, "rank-%05d-of-%05d%s", rank, tp, ext);
}

/* 16 bytes from getrandom(2); /dev/urandom-quality entropy, never blocks
 * after boot.  A failure here (no getrandom at all) falls back to time and
 * address bits, which still makes ids of two conversions differ. */
void tp_new_conversion_id(char out[33])
{
    uint8_t bytes[16];
    size_t got = 0;
    while (got < sizeof bytes) {
        ssize_t n = getrandom(bytes + got, sizeof bytes - got, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    if (got < sizeof bytes) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t a = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
        uint64_t b = tp_xxh3(&ts, sizeof ts) ^ (uint64_t)(uintptr_t)&ts;
        memcpy(bytes, &a, 8);
        memcpy(bytes + 8, &b, 8);
    }
    tp_hex_bytes(bytes, sizeof bytes, out);
}

/* -------------------------------------------------------- self-checksum */

static bool json_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static size_t skip_space_back(const char *text, size_t i)
{
    while (i > 0 && json_space(text[i - 1]))
        i--;
    return i;
}

/* Finds the member "manifest_xxh3": "<16 hex>" that must close the text:
 * *value_at gets the offset of its 16 hex digits (the checksum covers
 * [0, value_at): everything before its own value).  Matched from the
 * end, byte by byte: the key must follow ',', '{' or white space, so that
 * an escaped quote inside some string cannot pass for it; the text's last
 * '}' closes the top-level object, so this is that object's last member. */
static int locate_checksum(const char *text, size_t len, size_t *value_at)
{
    size_t i = skip_space_back(text, len);
    if (i == 0 || text[i - 1] != '}')
        return -1;
    i = skip_space_back(text, i - 1);
    if (i < 18 || text[i - 1] != '"' || text[i - 18] != '"')
        return -1;
    size_t digits = i - 17;
    if (!tp_is_lower_hex(text + digits, 16))
        return -1;
    i = skip_space_back(text, i - 18);
    if (i == 0 || text[i - 1] != ':')
        return -1;
    i = skip_space_back(text, i - 1);
    size_t klen = strlen(CHECKSUM_KEY_QUOTED);
    if (i < klen + 1 || memcmp(text + i - klen, CHECKSUM_KEY_QUOTED, klen) != 0)
        return -1;
    i -= klen;
    if (text[i - 1] != ',' && text[i - 1] != '{' && !json_space(text[i - 1]))
        return -1;
    *value_at = digits;
    return 0;
}

int tp_manifest_seal(char *text, size_t len)
{
    size_t value_at;
    if (locate_checksum(text, len, &value_at) < 0)
        return -1;
    char hex[17];
    tp_hex64(tp_xxh3(text, value_at), hex);
    memcpy(text + value_at, hex, 16);
    return 0;
}

/* The member must be present, last, and match the bytes before it. */
static int check_self_checksum(const cJSON *root, const char *text, size_t len, const char *name, tp_err *err)
{
    const char *value;
    if (tp_json_str(root, CHECKSUM_KEY, 64, false, name, &value, err) < 0)
        return -1;
    size_t value_at;
    if (locate_checksum(text, len, &value_at) < 0 || strlen(value) != 16 ||
        memcmp(text + value_at, value, 16) != 0)
        return tp_errorf(err, "%s: \"%s\" must be the last member, 16 lowercase hex digits", name, CHECKSUM_KEY);
    uint64_t want;
    if (tp_parse_hex64(value, &want) < 0 || tp_xxh3(text, value_at) != want)
        return tp_errorf(err, "%s: checksum mismatch (the manifest was edited or corrupted after tpconvert wrote it)",
                       name);
    return 0;
}

void tp_manifest_free(tp_manifest *m)
{
    if (!m)
        return;
    free(m->format);
    free(m->model_type);
    free(m->codec);
    free(m->config_json);
    free(m->plan_json);
    if (m->files)
        for (size_t i = 0; i < m->n_files; i++)
            free(m->files[i].name);
    free(m->files);
    if (m->ranks)
        for (int i = 0; i < m->tp; i++)
            free(m->ranks[i].file);
    free(m->ranks);
    memset(m, 0, sizeof *m);
}

/* ------------------------------------------------------------------ write */

static int check_for_write(const tp_manifest *m, const char *path, tp_err *err)
{
    if (!m->format || (strcmp(m->format, "tpshard") != 0 && strcmp(m->format, "safetensors") != 0))
        return tp_errorf(err, "%s: format must be \"tpshard\" or \"safetensors\"", path);
    if (!tp_is_conversion_id(m->conversion_id))
        return tp_errorf(err, "%s: conversion id must be 32 lowercase hex digits", path);
    if (m->tp < 1 || m->tp > TP_MAX_TP || !m->ranks)
        return tp_errorf(err, "%s: tp %d out of range [1, %d]", path, m->tp, TP_MAX_TP);
    if (!m->model_type || !*m->model_type || !m->codec)
        return tp_errorf(err, "%s: model_type and codec are required", path);
    for (int i = 0; i < m->tp; i++)
        if (m->ranks[i].rank != i || !m->ranks[i].file || !tp_safe_file_name(m->ranks[i].file))
            return tp_errorf(err, "%s: rank entry %d is not rank %d with a plain file name", path, i, i);
    for (size_t i = 0; i < m->n_files; i++) {
        if (!m->files[i].name || !tp_safe_file_name(m->files[i].name))
            return tp_errorf(err, "%s: copied file name \"%s\" is not a plain file name", path,
                             m->files[i].name ? m->files[i].name : "");
        if (m->files[i].size > TP_MAX_COPIED_FILE)
            return tp_errorf(err, "%s: %llu bytes, more than the %u a copied file may have", m->files[i].name,
                           (unsigned long long)m->files[i].size, TP_MAX_COPIED_FILE);
    }
    return 0;
}

/* A JSON object from text (NULL text: an empty object).  The whole text
 * must be that one object: a text cut short (by a NUL byte, say) is refused
 * here, naming the file it came from, not by a reader of the manifest. */
static cJSON *object_from_text(const char *text, const char *what, const char *source, const char *path,
                               tp_err *err)
{
    if (!text)
        return cJSON_CreateObject();
    const char *end = NULL;
    cJSON *o = cJSON_ParseWithOpts(text, &end, 1);
    if (!o || !cJSON_IsObject(o)) {
        const char *at = o ? text : cJSON_GetErrorPtr();
        size_t off = at && at >= text ? (size_t)(at - text) : 0;
        cJSON_Delete(o);
        tp_errorf(err, "%s: %s: %s is not one JSON object (parse stops at byte %zu)", path, what, source, off);
        return NULL;
    }
    return o;
}

static void iso8601_now(char out[32])
{
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(out, 32, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static cJSON *file_json(const tp_manifest_file *f)
{
    char hex[17];
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "name", f->name);
    tp_json_add_u64(o, "size", f->size);
    tp_hex64(f->xxh3, hex);
    cJSON_AddStringToObject(o, "xxh3", hex);
    return o;
}

static cJSON *rank_json(const tp_manifest_rank *r)
{
    char hex[17];
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "rank", r->rank);
    cJSON_AddStringToObject(o, "file", r->file);
    tp_json_add_u64(o, "size", r->size);
    tp_hex64(r->checksum, hex);
    cJSON_AddStringToObject(o, "checksum", hex);
    tp_json_add_u64(o, "raw_bytes", r->raw_bytes);
    tp_json_add_u64(o, "stored_bytes", r->stored_bytes);
    tp_json_add_u64(o, "tensors", r->n_tensors);
    return o;
}

/* What is about to be written must read back: a field the writer let
 * through but a reader refuses (a control character in model_type, say)
 * fails the conversion here, before the manifest exists. */
static int read_back(const char *text, size_t len, const char *path, tp_err *err)
{
    tp_manifest back;
    if (tp_manifest_parse(text, len, path, &back, err) < 0)
        return tp_err_prefix(err, "the manifest would not read back");
    tp_manifest_free(&back);
    return 0;
}

int tp_manifest_write(const char *dir, const tp_manifest *m, tp_err *err)
{
    char *path = tp_path_join(dir, TP_MANIFEST_NAME);
    if (!path)
        return tp_errorf(err, "%s: out of memory", dir);
    cJSON *config = NULL, *plan = NULL;
    if (check_for_write(m, path, err) < 0 ||
        !(config = object_from_text(m->config_json, "config", "config.json", path, err)) ||
        !(plan = object_from_text(m->plan_json, "plan", "the plan", path, err))) {
        cJSON_Delete(config);
        free(path);
        return -1;
    }
    char created[32];
    iso8601_now(created);
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "format", m->format);
    cJSON_AddNumberToObject(root, "format_version", TP_MANIFEST_VERSION);
    cJSON_AddStringToObject(root, "conversion_id", m->conversion_id);
    cJSON_AddStringToObject(root, "created", created);
    cJSON_AddStringToObject(root, "tool", "tpconvert 0.1");
    cJSON_AddNumberToObject(root, "tp", m->tp);
    cJSON_AddStringToObject(root, "model_type", m->model_type);
    cJSON_AddBoolToObject(root, "vocab_parallel", m->vocab_parallel);
    cJSON_AddBoolToObject(root, "expert_parallel", m->expert_parallel);
    cJSON_AddStringToObject(root, "codec", m->codec);
    cJSON_AddNumberToObject(root, "level", m->level);
    cJSON_AddItemToObject(root, "config", config);
    cJSON_AddItemToObject(root, "plan", plan);
    cJSON *files = cJSON_AddArrayToObject(root, "files");
    for (size_t i = 0; i < m->n_files; i++)
        cJSON_AddItemToArray(files, file_json(&m->files[i]));
    cJSON *ranks = cJSON_AddArrayToObject(root, "ranks");
    for (int i = 0; i < m->tp; i++)
        cJSON_AddItemToArray(ranks, rank_json(&m->ranks[i]));
    cJSON_AddStringToObject(root, CHECKSUM_KEY, "0000000000000000"); /* last; sealed below */
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    int rc;
    if (!text) {
        rc = tp_errorf(err, "%s: out of memory", path);
    } else {
        size_t len = strlen(text);
        text[len] = '\n'; /* end the file with a newline, replacing the NUL */
        rc = tp_manifest_seal(text, len + 1) == 0 ? read_back(text, len + 1, path, err)
                                                   : tp_errorf(err, "%s: cannot place the checksum", path);
        if (rc == 0)
            rc = tp_write_file_atomic(path, text, len + 1, err);
        free(text);
    }
    free(path);
    return rc;
}

/* ------------------------------------------------------------------ parse */

static int parse_rank(const cJSON *o, int i, const char *name, tp_manifest_rank *r, tp_err *err)
{
    char where[1200];
    snprintf(where, sizeof where, "%s: ranks[%d]", name, i);
    if (!cJSON_IsObject(o))
        return tp_errorf(err, "%s: must be an object", where);
    static const char *const keys[] = { "rank", "file", "size", "checksum", "raw_bytes", "stored_bytes",
                                        "tensors", NULL };
    const char *file, *checksum;
    uint64_t n_tensors;
    if (tp_json_check_keys(o, keys, where, err) < 0 || tp_json_int(o, "rank", 0, TP_MAX_TP - 1, where, &r->rank, err) < 0)
        return -1;
    if (r->rank != i)
        return tp_errorf(err, "%s: is rank %d (ranks must be listed 0..tp-1 in order)", where, r->rank);
    if (tp_json_str(o, "file", 4096, false, where, &file, err) < 0)
        return -1;
    if (!tp_safe_file_name(file))
        return tp_errorf(err, "%s: file \"%s\" is not a plain file name in the directory", where, file);
    if (tp_json_u64(o, "size", UINT64_MAX, where, &r->size, err) < 0 ||
        tp_json_str(o, "checksum", 64, false, where, &checksum, err) < 0)
        return -1;
    if (tp_parse_hex64(checksum, &r->checksum) < 0)
        return tp_errorf(err, "%s: checksum \"%s\" is not 16 hex digits", where, checksum);
    if (tp_json_u64(o, "raw_bytes", UINT64_MAX, where, &r->raw_bytes, err) < 0 ||
        tp_json_u64(o, "stored_bytes", UINT64_MAX, where, &r->stored_bytes, err) < 0 ||
        tp_json_u64(o, "tensors", UINT64_MAX, where, &n_tensors, err) < 0)
        return -1;
    r->n_tensors = (size_t)n_tensors;
    if (!(r->file = strdup(file)))
        return tp_errorf(err, "%s: out of memory", where);
    return 0;
}

static int parse_ranks(const cJSON *root, const char *name, tp_manifest *m, tp_err *err)
{
    const cJSON *ranks = tp_json_need(root, "ranks", name, err);
    if (!ranks)
        return -1;
    if (!cJSON_IsArray(ranks))
        return tp_errorf(err, "%s: \"ranks\" must be an array", name);
    int n = cJSON_GetArraySize(ranks);
    if (n < m->tp)
        return tp_errorf(err, "%s: lists %d ranks but tp is %d (rank %d missing)", name, n, m->tp, n);
    if (n > m->tp)
        return tp_errorf(err, "%s: lists %d ranks but tp is %d", name, n, m->tp);
    if (!(m->ranks = calloc((size_t)m->tp, sizeof *m->ranks)))
        return tp_errorf(err, "%s: out of memory", name);
    int i = 0;
    const cJSON *r;
    cJSON_ArrayForEach(r, ranks) {
        if (parse_rank(r, i, name, &m->ranks[i], err) < 0)
            return -1;
        for (int j = 0; j < i; j++)
            if (strcmp(m->ranks[j].file, m->ranks[i].file) == 0)
                return tp_errorf(err, "%s: ranks %d and %d share the file %s", name, j, i, m->ranks[i].file);
        i++;
    }
    return 0;
}

static int parse_file(const cJSON *o, size_t i, const char *name, tp_manifest_file *f, tp_err *err)
{
    char where[1200];
    snprintf(where, sizeof where, "%s: files[%zu]", name, i);
    if (!cJSON_IsObject(o))
        return tp_errorf(err, "%s: must be an object {\"name\", \"size\", \"xxh3\"}", where);
    static const char *const keys[] = { "name", "size", "xxh3", NULL };
    const char *file, *sum;
    if (tp_json_check_keys(o, keys, where, err) < 0 || tp_json_str(o, "name", 4096, false, where, &file, err) < 0)
        return -1;
    if (!tp_safe_file_name(file))
        return tp_errorf(err, "%s: name \"%s\" is not a plain file name in the directory", where, file);
    if (tp_json_u64(o, "size", UINT64_MAX, where, &f->size, err) < 0 ||
        tp_json_str(o, "xxh3", 64, false, where, &sum, err) < 0)
        return -1;
    if (f->size > TP_MAX_COPIED_FILE)
        return tp_errorf(err, "%s: %s is %llu bytes, more than the %u a copied file may have", where, file,
                       (unsigned long long)f->size, TP_MAX_COPIED_FILE);
    if (tp_parse_hex64(sum, &f->xxh3) < 0)
        return tp_errorf(err, "%s: xxh3 \"%s\" is not 16 hex digits", where, sum);
    if (!(f->name = strdup(file)))
        return tp_errorf(err, "%s: out of memory", where);
    return 0;
}

static int parse_files(const cJSON *root, const char *name, tp_manifest *m, tp_err *err)
{
    const cJSON *files = tp_json_need(root, "files", name, err);
    if (!files)
        return -1;
    if (!cJSON_IsArray(files))
        return tp_errorf(err, "%s: \"files\" must be an array", name);
    size_t n = (size_t)cJSON_GetArraySize(files);
    if (!(m->files = calloc(n ? n : 1, sizeof *m->files)))
        return tp_errorf(err, "%s: out of memory", name);
    const cJSON *f;
    cJSON_ArrayForEach(f, files) {
        tp_manifest_file *entry = &m->files[m->n_files];
        int rc = parse_file(f, m->n_files, name, entry, err);
        m->n_files++; /* counted even on failure: tp_manifest_free frees its name */
        if (rc < 0)
            return -1;
        for (size_t j = 0; j + 1 < m->n_files; j++)
            if (strcmp(m->files[j].name, entry->name) == 0)
                return tp_errorf(err, "%s: file %s listed twice", name, entry->name);
    }
    return 0;
}

/* The printed text of a member that must be an object. */
static int object_text(const cJSON *root, const char *key, const char *name, char **out, tp_err *err)
{
    const cJSON *v = tp_json_need(root, key, name, err);
    if (!v)
        return -1;
    if (!cJSON_IsObject(v))
        return tp_errorf(err, "%s: \"%s\" must be an object", name, key);
    if (!(*out = cJSON_PrintUnformatted(v)))
        return tp_errorf(err, "%s: out of memory", name);
    return 0;
}

static bool iso8601_ok(const char *s)
{
    /* YYYY-MM-DDTHH:MM:SSZ */
    static const char shape[] = "dddd-dd-ddTdd:dd:ddZ";
    if (strlen(s) != sizeof shape - 1)
        return false;
    for (size_t i = 0; shape[i]; i++)
        if (shape[i] == 'd' ? !(s[i] >= '0' && s[i] <= '9') : s[i] != shape[i])
            return false;
    return true;
}

/* The version comes first: a manifest of another version may lack the
 * checksum or have other keys, and deserves a message saying so. */
static int check_version(const cJSON *root, const char *name, tp_manifest *m, tp_err *err)
{
    if (tp_json_int(root, "format_version", 0, 1 << 30, name, &m->format_version, err) < 0)
        return -1;
    if (m->format_version > TP_MANIFEST_VERSION)
        return tp_errorf(err, "%s: format version %d is newer than this build supports (%d)", name,
                         m->format_version, TP_MANIFEST_VERSION);
    if (m->format_version < TP_MANIFEST_VERSION)
        return tp_errorf(err, "%s: format version %d was made by an older tpconvert (this build reads %d): "
                       "convert again", name, m->format_version, TP_MANIFEST_VERSION);
    return 0;
}

static int parse_top(const cJSON *root, const char *text, size_t len, const char *name, tp_manifest *m,
                     tp_err *err)
{
    if (!cJSON_IsObject(root))
        return tp_errorf(err, "%s: not a JSON object", name);
    static const char *const keys[] = { "format", "format_version", "conversion_id", "created", "tool", "tp",
                                        "model_type", "vocab_parallel", "expert_parallel", "codec", "level",
                                        "config", "plan",
                                        "files", "ranks", CHECKSUM_KEY, NULL };
    const char *s;
    if (check_version(root, name, m, err) < 0 || tp_json_check_keys(root, keys, name, err) < 0 ||
        check_self_checksum(root, text, len, name, err) < 0)
        return -1;
    if (tp_json_str(root, "format", 32, false, name, &s, err) < 0)
        return -1;
    if (strcmp(s, "tpshard") != 0 && strcmp(s, "safetensors") != 0)
        return tp_errorf(err, "%s: format \"%s\" is neither \"tpshard\" nor \"safetensors\"", name, s);
    if (!(m->format = strdup(s)) || tp_json_str(root, "conversion_id", 64, false, name, &s, err) < 0)
        return m->format ? -1 : tp_errorf(err, "%s: out of memory", name);
    if (!tp_is_conversion_id(s))
        return tp_errorf(err, "%s: conversion_id \"%s\" is not 32 lowercase hex digits", name, s);
    memcpy(m->conversion_id, s, 33);
    if (tp_json_str(root, "created", 64, false, name, &s, err) < 0)
        return -1;
    if (!iso8601_ok(s))
        return tp_errorf(err, "%s: created \"%s\" is not an ISO-8601 UTC time (YYYY-MM-DDTHH:MM:SSZ)", name, s);
    if (tp_json_str(root, "tool", 128, false, name, &s, err) < 0 ||
        tp_json_int(root, "tp", 1, TP_MAX_TP, name, &m->tp, err) < 0 ||
        tp_json_str(root, "model_type", 64, false, name, &s, err) < 0)
        return -1;
    if (!(m->model_type = strdup(s)))
        return tp_errorf(err, "%s: out of memory", name);
    if (tp_json_bool(root, "vocab_parallel", name, &m->vocab_parallel, err) < 0 ||
        tp_json_opt_bool(root, "expert_parallel", false, name, &m->expert_parallel, err) < 0 ||
        tp_json_str(root, "codec", 16, false, name, &s, err) < 0)
        return -1;
    tp_codec codec;
    if (tp_codec_from_name(s, &codec) < 0)
        return tp_errorf(err, "%s: unknown codec \"%s\"", name, s);
    if (strcmp(m->format, "safetensors") == 0 && codec != TP_CODEC_NONE)
        return tp_errorf(err, "%s: a safetensors conversion has codec \"none\", not \"%s\"", name, s);
    if (!(m->codec = strdup(s)))
        return tp_errorf(err, "%s: out of memory", name);
    if (tp_json_int(root, "level", ZSTD_minCLevel(), ZSTD_maxCLevel(), name, &m->level, err) < 0 ||
        object_text(root, "config", name, &m->config_json, err) < 0 ||
        object_text(root, "plan", name, &m->plan_json, err) < 0 || parse_files(root, name, m, err) < 0)
        return -1;
    return parse_ranks(root, name, m, err);
}

int tp_manifest_parse(const char *json, size_t len, const char *name, tp_manifest *m, tp_err *err)
{
    memset(m, 0, sizeof *m);
    cJSON *root = tp_json_parse(json, len);
    if (!root)
        return tp_errorf(err, "%s: not valid JSON", name);
    int rc = parse_top(root, json, len, name, m, err);
    cJSON_Delete(root);
    if (rc < 0) {
        tp_manifest_free(m); /* frees whatever was filled in */
        return -1;
    }
    return 0;
}

int tp_manifest_read(const char *dir, tp_manifest *m, tp_err *err)
{
    memset(m, 0, sizeof *m);
    char *path = tp_path_join(dir, TP_MANIFEST_NAME);
    if (!path)
        return tp_errorf(err, "%s: out of memory", dir);
    char *text;
    size_t len;
    int rc = tp_read_file(path, MAX_MANIFEST_SIZE, &text, &len, err);
    if (rc == 0) {
        rc = tp_manifest_parse(text, len, path, m, err);
        free(text);
    }
    free(path);
    return rc;
}

/* ------------------------------------------------------- config copies */

int tp_manifest_check_config_copy(const tp_manifest *m, const char *text, size_t len, const char *src,
                                  tp_err *err)
{
    /* The manifest holds the config as cJSON printed it; printing the
     * copied file's value the same way makes the two comparable text. */
    cJSON *copy = cJSON_ParseWithLength(text, len);
    if (!copy || !cJSON_IsObject(copy)) {
        cJSON_Delete(copy);
        return tp_errorf(err, "%s: config.json is not a JSON object", src);
    }
    char *printed = cJSON_PrintUnformatted(copy);
    cJSON_Delete(copy);
    if (!printed)
        return tp_errorf(err, "%s: out of memory", src);
    bool same = m->config_json && strcmp(printed, m->config_json) == 0;
    free(printed);
    if (!same)
        return tp_errorf(err, "%s: config.json differs from the config in %s (one of them was replaced)", src,
                         TP_MANIFEST_NAME);
    return 0;
}
