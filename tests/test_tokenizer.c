/* test_tokenizer.c - the byte-level BPE tokenizer against Hugging Face
 * `tokenizers` (fixtures from tools/make_tokenizer_fixtures.py), plus unit
 * checks of the byte map, the streaming decoder and the error paths.
 * Run from the repository root (tests/run_tests.sh does). */
#include <cJSON.h>
#include <utf8proc.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "runtime.h"
#include "tokenizer_internal.h"
#include "check.h"

#define QWEN3_TOKENIZER "tests/data/qwen3-tokenizer/tokenizer.json.zst"
#define QWEN3_FIXTURES "tests/data/tokenizer-fixtures/qwen3.json"
#define VARIANT_FIXTURES "tests/data/tokenizer-fixtures/variants.json"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what, const tp_err *err)
{
    fprintf(stderr, "test_tokenizer: %s: %s\n", what, err ? err->msg : "");
    exit(1);
}

static cJSON *read_json(const char *path)
{
    char *text;
    size_t n;
    tp_err err;
    if (tp_read_file(path, 64u << 20, &text, &n, &err)) die("reading fixture", &err);
    cJSON *j = cJSON_ParseWithLength(text, n);
    free(text);
    if (!j) die(path, NULL);
    return j;
}

/* The repo's tokenizer.json, decompressed, for the variants. */
static char *read_tokenizer_json(size_t *len)
{
    char *json;
    tp_err err;
    if (tp_read_file_zst(QWEN3_TOKENIZER, 256u << 20, &json, len, &err)) die("reading tokenizer", &err);
    return json;
}

static bool valid_utf8(const char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t len = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
        if (len <= 0) return false;
        i += (size_t)len;
    }
    return true;
}

static char *nfc(const char *s)
{
    utf8proc_uint8_t *out = NULL;
    utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)strlen(s), &out,
                                      UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    if (r < 0) die("utf8proc_map", NULL);
    return (char *)out;
}

static void print_ids(const char *label, const int32_t *ids, size_t n)
{
    fprintf(stderr, "  %s [", label);
    for (size_t i = 0; i < n; i++) fprintf(stderr, "%s%d", i ? ", " : "", (int)ids[i]);
    fprintf(stderr, "]\n");
}

/* Feeds ids one at a time; checks every chunk is valid UTF-8 and that the
 * chunks add up to want. */
static void check_streaming(const tp_tokenizer *tok, const int32_t *ids, size_t n, bool skip_special,
                            const char *want, const char *label)
{
    tp_detok *d = tp_detok_new(tok, skip_special);
    tp_err err;
    size_t cap = strlen(want) + 64, len = 0;
    char *all = malloc(cap * 4 + 16);
    bool ok = d && all;
    for (size_t i = 0; ok && i < n; i++) {
        char *chunk;
        if (tp_detok_push(d, ids[i], &chunk, &err)) {
            CHECK(0, "%s: detok push %d: %s", label, (int)ids[i], err.msg);
            ok = false;
            break;
        }
        size_t cl = strlen(chunk);
        CHECK(valid_utf8(chunk, cl), "%s: streaming chunk %zu is not valid UTF-8", label, i);
        if (len + cl < cap * 4) memcpy(all + len, chunk, cl);
        len += cl;
        free(chunk);
    }
    if (ok) {
        char *rest = tp_detok_flush(d);
        size_t rl = strlen(rest);
        if (len + rl < cap * 4) memcpy(all + len, rest, rl);
        len += rl;
        free(rest);
        CHECK(len == strlen(want) && memcmp(all, want, len) == 0, "%s: streamed text differs from decode", label);
    }
    free(all);
    tp_detok_free(d);
}

/* Encodes text, compares with want_ids; returns the ids (caller frees). */
static int32_t *check_encode(const tp_tokenizer *tok, const char *text, const cJSON *want_ids, size_t *n_out,
                             const char *label)
{
    int32_t *ids;
    size_t n;
    tp_err err;
    if (tp_tokenizer_encode(tok, text, strlen(text), &ids, &n, &err)) {
        CHECK(0, "%s: encode failed: %s", label, err.msg);
        *n_out = 0;
        return NULL;
    }
    size_t want_n = (size_t)cJSON_GetArraySize(want_ids);
    bool same = want_n == n;
    size_t i = 0;
    for (const cJSON *e = want_ids->child; same && e; e = e->next, i++) same = (int32_t)e->valuedouble == ids[i];
    CHECK(same, "%s: ids differ from HF for %s", label, text);
    if (!same) {
        print_ids("got ", ids, n);
        int32_t *w = malloc((want_n + 1) * sizeof *w);
        i = 0;
        for (const cJSON *e = want_ids->child; e; e = e->next) w[i++] = (int32_t)e->valuedouble;
        print_ids("want", w, want_n);
        free(w);
    }
    *n_out = n;
    return ids;
}

static void test_qwen3_fixtures(const tp_tokenizer *tok)
{
    cJSON *cases = read_json(QWEN3_FIXTURES);
    int n_cases = 0;
    for (const cJSON *c = cases->child; c; c = c->next, n_cases++) {
        const char *text = cJSON_GetObjectItem(c, "text")->valuestring;
        char label[64];
        snprintf(label, sizeof label, "qwen3 case %d", n_cases);
        size_t n;
        int32_t *ids = check_encode(tok, text, cJSON_GetObjectItem(c, "ids"), &n, label);
        if (!ids) continue;
        char *back;
        tp_err err;
        char *want = nfc(text);
        if (tp_tokenizer_decode(tok, ids, n, false, &back, &err)) {
            CHECK(0, "%s: decode: %s", label, err.msg);
        } else {
            CHECK(strcmp(back, want) == 0, "%s: decode(encode(text)) != NFC(text): got \"%s\"", label, back);
            check_streaming(tok, ids, n, false, back, label);
            free(back);
        }
        free(want);
        free(ids);
    }
    CHECK(n_cases >= 60, "only %d fixture cases", n_cases);
    printf("qwen3 fixtures: %d cases\n", n_cases);
    cJSON_Delete(cases);
}

/* The same edits tools/make_tokenizer_fixtures.py apply_patch() makes. */
static void apply_patch(cJSON *tj, const cJSON *patch)
{
    static const char *const top[] = {"normalizer", "pre_tokenizer", "decoder"};
    for (size_t i = 0; i < 3; i++) {
        const cJSON *v = cJSON_GetObjectItem(patch, top[i]);
        if (v) cJSON_ReplaceItemInObjectCaseSensitive(tj, top[i], cJSON_Duplicate(v, true));
    }
    cJSON *model = cJSON_GetObjectItem(tj, "model");
    const cJSON *pm = cJSON_GetObjectItem(patch, "model");
    for (const cJSON *e = pm ? pm->child : NULL; e; e = e->next) {
        if (cJSON_GetObjectItem(model, e->string))
            cJSON_ReplaceItemInObjectCaseSensitive(model, e->string, cJSON_Duplicate(e, true));
        else
            cJSON_AddItemToObject(model, e->string, cJSON_Duplicate(e, true));
    }
    if (cJSON_IsTrue(cJSON_GetObjectItem(patch, "merges_as_strings"))) {
        cJSON *merges = cJSON_GetObjectItem(model, "merges");
        cJSON *strs = cJSON_CreateArray();
        for (const cJSON *m = merges->child; m; m = m->next) {
            const char *a = m->child->valuestring, *b = m->child->next->valuestring;
            char *s = malloc(strlen(a) + strlen(b) + 2);
            sprintf(s, "%s %s", a, b);
            cJSON_AddItemToArray(strs, cJSON_CreateString(s));
            free(s);
        }
        cJSON_ReplaceItemInObjectCaseSensitive(model, "merges", strs);
    }
    const cJSON *extra = cJSON_GetObjectItem(patch, "added_tokens_append");
    cJSON *added = cJSON_GetObjectItem(tj, "added_tokens");
    for (const cJSON *e = extra ? extra->child : NULL; e; e = e->next)
        cJSON_AddItemToArray(added, cJSON_Duplicate(e, true));
}

static void test_variants(void)
{
    size_t len;
    char *json = read_tokenizer_json(&len);
    cJSON *variants = read_json(VARIANT_FIXTURES);
    for (const cJSON *v = variants->child; v; v = v->next) {
        const char *name = cJSON_GetObjectItem(v, "name")->valuestring;
        cJSON *tj = cJSON_ParseWithLength(json, len);
        apply_patch(tj, cJSON_GetObjectItem(v, "patch"));
        char *patched = cJSON_PrintUnformatted(tj);
        cJSON_Delete(tj);
        tp_tokenizer *tok;
        tp_err err;
        if (tp_tokenizer_load_mem(&tok, patched, strlen(patched), name, &err)) {
            CHECK(0, "variant %s: load: %s", name, err.msg);
            free(patched);
            continue;
        }
        free(patched);
        int i = 0;
        for (const cJSON *c = cJSON_GetObjectItem(v, "cases")->child; c; c = c->next, i++) {
            char label[96];
            snprintf(label, sizeof label, "variant %s case %d", name, i);
            size_t n;
            int32_t *ids = check_encode(tok, cJSON_GetObjectItem(c, "text")->valuestring,
                                        cJSON_GetObjectItem(c, "ids"), &n, label);
            if (!ids) continue;
            static const char *const keys[2] = {"decoded", "decoded_skip_special"};
            for (int skip = 0; skip < 2; skip++) {
                const char *want = cJSON_GetObjectItem(c, keys[skip])->valuestring;
                char *back;
                if (tp_tokenizer_decode(tok, ids, n, skip, &back, &err)) {
                    CHECK(0, "%s: decode: %s", label, err.msg);
                    continue;
                }
                CHECK(strcmp(back, want) == 0, "%s: %s: got \"%s\" want \"%s\"", label, keys[skip], back, want);
                check_streaming(tok, ids, n, skip, back, label);
                free(back);
            }
            free(ids);
        }
        printf("variant %s: %d cases\n", name, i);
        tp_tokenizer_free(tok);
    }
    cJSON_Delete(variants);
    free(json);
}

static void test_byte_map(void)
{
    uint32_t t[256];
    tp_tok_bytes_to_unicode(t);
    bool seen[512] = {0};
    int distinct = 0;
    for (int b = 0; b < 256; b++) {
        CHECK(t[b] < 512, "byte %d maps to U+%04X", b, t[b]);
        if (t[b] < 512 && !seen[t[b]]) { seen[t[b]] = true; distinct++; }
    }
    CHECK(distinct == 256, "bytes_to_unicode is not a bijection (%d distinct)", distinct);
    CHECK(t[0] == 0x100 && t[' '] == 0x120 && t['\n'] == 0x10A && t['A'] == 'A' && t[0xAD] == 0x143 &&
              t[0xFF] == 0xFF,
          "bytes_to_unicode differs from GPT-2's");
}

static void test_streaming_bytes(const tp_tokenizer *tok)
{
    /* Byte-level tokens of single bytes: "ä" is byte 0xE4, "¸" 0xB8, "Ń" 0xAD. */
    int32_t e4 = tp_tokenizer_token_id(tok, "\xC3\xA4"), b8 = tp_tokenizer_token_id(tok, "\xC2\xB8");
    int32_t ad = tp_tokenizer_token_id(tok, "\xC5\x83"), a = tp_tokenizer_token_id(tok, "a");
    CHECK(e4 >= 0 && b8 >= 0 && ad >= 0 && a >= 0, "byte tokens missing");
    tp_detok *d = tp_detok_new(tok, false);
    tp_err err;
    char *out;
    const int32_t seq[] = {e4, a, e4, b8, ad, e4};
    const char *want[] = {"", ("\xEF\xBF\xBD" "a"), "", "", "\xE4\xB8\xAD", ""};
    for (int i = 0; i < 6; i++) {
        if (tp_detok_push(d, seq[i], &out, &err)) { CHECK(0, "push: %s", err.msg); break; }
        CHECK(strcmp(out, want[i]) == 0, "streaming step %d: got \"%s\" want \"%s\"", i, out, want[i]);
        free(out);
    }
    out = tp_detok_flush(d);
    CHECK(out && strcmp(out, "\xEF\xBF\xBD") == 0, "flush of a dangling lead byte should be U+FFFD");
    free(out);
    CHECK(tp_detok_push(d, 999999, &out, &err) == -1 && strstr(err.msg, "999999"), "detok unknown id: %s", err.msg);
    tp_detok_free(d);

    /* The lossy reader: one U+FFFD per maximal invalid subpart. */
    tp_tok_buf b = {0};
    size_t used;
    const uint8_t bad[] = {0xF0, 0x9F, 0x98, 'x', 0xED, 0xA0, 0x80, 0xC0, 0xE2, 0x82};
    CHECK(tp_tok_utf8_lossy(&b, bad, sizeof bad, false, &used) && used == 8,
          "lossy: held back %zu bytes", sizeof bad - used);
    CHECK(b.p && strcmp(b.p, "\xEF\xBF\xBDx\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD") == 0,
          "lossy: wrong replacement: %s", b.p);
    free(b.p);
}

static void test_decode_errors(const tp_tokenizer *tok)
{
    tp_err err;
    char *text = NULL;
    int32_t ids[2] = {9707, 151669};
    CHECK(tp_tokenizer_decode(tok, ids, 2, false, &text, &err) == -1 && strstr(err.msg, "151669") &&
              strstr(err.msg, "size 151669"),
          "unknown id: %s", err.msg);
    ids[1] = -5;
    CHECK(tp_tokenizer_decode(tok, ids, 2, false, &text, &err) == -1 && strstr(err.msg, "-5"), "negative id: %s",
          err.msg);
    int32_t special[3] = {151644, 9707, 151645};
    CHECK(tp_tokenizer_decode(tok, special, 3, true, &text, &err) == 0 && strcmp(text, "Hello") == 0,
          "skip_special: %s", text ? text : err.msg);
    free(text);
    int32_t *out;
    size_t n;
    CHECK(tp_tokenizer_encode(tok, "ab\xFF", 3, &out, &n, &err) == -1 && strstr(err.msg, "UTF-8") &&
              strstr(err.msg, "byte 2"),
          "invalid UTF-8 input: %s", err.msg);
}

/* Qwen3's model vocabulary (151,936) is padded past the tokenizer's 151,669
 * entries, and sampling can produce a padding id: decoded as nothing (as HF
 * tokenizers' decode does), never an error; ids outside the model's
 * vocabulary still are. */
static void test_model_vocab_padding(tp_tokenizer *tok)
{
    tp_err err;
    char *text = NULL;
    tp_tokenizer_set_model_vocab(tok, 151936);
    int32_t ids[4] = {9707, 151669, 151935, 9707};
    CHECK(tp_tokenizer_decode(tok, ids, 4, false, &text, &err) == 0 && strcmp(text, "HelloHello") == 0,
          "padding ids must decode as nothing: %s", text ? text : err.msg);
    free(text);
    text = NULL;
    tp_detok *d = tp_detok_new(tok, true);
    char *out = NULL;
    CHECK(tp_detok_push(d, 151700, &out, &err) == 0 && out && out[0] == '\0', "detok padding id: %s",
          out ? out : err.msg);
    free(out);
    out = NULL;
    CHECK(tp_detok_push(d, 151936, &out, &err) == -1 && strstr(err.msg, "151936") && strstr(err.msg, "model"),
          "detok id = model vocab must be an error: %s", err.msg);
    CHECK(tp_detok_push(d, -1, &out, &err) == -1 && strstr(err.msg, "-1"), "detok negative id: %s", err.msg);
    tp_detok_free(d);
    ids[1] = 200000;
    CHECK(tp_tokenizer_decode(tok, ids, 2, false, &text, &err) == -1 && strstr(err.msg, "200000"),
          "decode beyond the model vocab: %s", err.msg);
    ids[1] = -3;
    CHECK(tp_tokenizer_decode(tok, ids, 2, false, &text, &err) == -1 && strstr(err.msg, "-3"),
          "decode negative id: %s", err.msg);
    tp_tokenizer_set_model_vocab(tok, 0);
}

static void test_api(const tp_tokenizer *tok)
{
    CHECK(tp_tokenizer_vocab_size(tok) == 151669, "vocab size %zu", tp_tokenizer_vocab_size(tok));
    CHECK(tp_tokenizer_token_id(tok, "<|im_end|>") == 151645, "<|im_end|> id");
    CHECK(tp_tokenizer_token_id(tok, "<|endoftext|>") == 151643, "<|endoftext|> id");
    CHECK(tp_tokenizer_token_id(tok, "Hello") == 9707, "Hello id");
    CHECK(tp_tokenizer_token_id(tok, "no such token here") == -1, "missing token");
    /* Text containing a NUL byte goes through as the byte it is. */
    int32_t *ids;
    size_t n;
    tp_err err;
    char *back = NULL;
    CHECK(tp_tokenizer_encode(tok, "a\0b", 3, &ids, &n, &err) == 0 && n >= 2, "NUL in text: %s", err.msg);
    CHECK(tp_tokenizer_decode(tok, ids, n, false, &back, &err) == 0 && memcmp(back, "a\0b", 4) == 0,
          "NUL round trip");
    free(back);
    free(ids);
    CHECK(tp_tokenizer_encode(tok, "", 0, &ids, &n, &err) == 0 && n == 0 && ids, "empty text");
    free(ids);
}

/* Long inputs: one huge pre-tokenizer piece each (regex backtracking, BPE
 * heap) must work and round-trip. */
static void test_long_inputs(const tp_tokenizer *tok)
{
    const char *fill[] = {" ", "=", "a", "\n", "\xE4\xB8\xAD", " x", "!?"};
    for (size_t f = 0; f < sizeof fill / sizeof fill[0]; f++) {
        size_t unit = strlen(fill[f]), reps = 300000 / unit, n;
        char *text = malloc(reps * unit + 1);
        for (size_t i = 0; i < reps; i++) memcpy(text + i * unit, fill[f], unit);
        text[reps * unit] = '\0';
        int32_t *ids;
        tp_err err;
        double t0 = now_s();
        if (tp_tokenizer_encode(tok, text, reps * unit, &ids, &n, &err)) {
            CHECK(0, "long input %zu: %s", f, err.msg);
        } else {
            char *back = NULL;
            CHECK(tp_tokenizer_decode(tok, ids, n, false, &back, &err) == 0 && strcmp(back, text) == 0,
                  "long input %zu does not round-trip", f);
            printf("long input %zu (%zu bytes): %zu ids in %.3f s\n", f, reps * unit, n, now_s() - t0);
            free(back);
            free(ids);
        }
        free(text);
    }
}

/* A tiny hand-made tokenizer.json: the 256 byte tokens plus what extra adds. */
static char *mini_json_flags(const char *model_flags, const char *extra_vocab, const char *merges, const char *rest)
{
    uint32_t t[256];
    tp_tok_bytes_to_unicode(t);
    cJSON *vocab = cJSON_CreateObject();
    for (int b = 0; b < 256; b++) {
        char s[5] = {0};
        utf8proc_encode_char((utf8proc_int32_t)t[b], (utf8proc_uint8_t *)s);
        cJSON_AddNumberToObject(vocab, s, b);
    }
    char *v = cJSON_PrintUnformatted(vocab);
    cJSON_Delete(vocab);
    v[strlen(v) - 1] = '\0';   /* drop the closing brace to append extra entries */
    size_t cap = strlen(model_flags) + strlen(v) + strlen(extra_vocab) + strlen(merges) + strlen(rest) + 256;
    char *json = malloc(cap);
    snprintf(json, cap, "{\"model\":{\"type\":\"BPE\",%s\"vocab\":%s%s},\"merges\":%s}%s}", model_flags, v,
             extra_vocab, merges, rest);
    free(v);
    return json;
}

static char *mini_json(const char *extra_vocab, const char *merges, const char *rest)
{
    return mini_json_flags("", extra_vocab, merges, rest);
}

/* ignore_merges: a piece that is a vocab entry is taken whole even when the
 * merges cannot build it.  Expected ids are HF tokenizers' for this file. */
static void test_ignore_merges(void)
{
    const char *rest = ",\"normalizer\":null,\"pre_tokenizer\":{\"type\":\"ByteLevel\",\"add_prefix_space\":false,"
                       "\"use_regex\":true},\"decoder\":{\"type\":\"ByteLevel\"}";
    const int32_t want[2][6] = {{120, 121, 122, 32, 256, 99}, {257, 32, 256, 99}};
    const size_t want_n[2] = {6, 4};
    for (int im = 0; im < 2; im++) {
        char *json = mini_json_flags(im ? "\"ignore_merges\":true," : "\"ignore_merges\":false,",
                                     ",\"ab\":256,\"xyz\":257", "[[\"a\",\"b\"]]", rest);
        tp_tokenizer *tok;
        tp_err err;
        int32_t *ids;
        size_t n;
        if (tp_tokenizer_load_mem(&tok, json, strlen(json), "mini.json", &err)) {
            CHECK(0, "ignore_merges mini: %s", err.msg);
        } else {
            if (tp_tokenizer_encode(tok, "xyz abc", 7, &ids, &n, &err) == 0) {
                CHECK(n == want_n[im] && memcmp(ids, want[im], n * sizeof *ids) == 0, "ignore_merges=%d ids", im);
                if (n != want_n[im]) print_ids("got", ids, n);
                free(ids);
            } else {
                CHECK(0, "ignore_merges encode: %s", err.msg);
            }
            tp_tokenizer_free(tok);
        }
        free(json);
    }
}

#define MINI_REST ",\"normalizer\":null,\"pre_tokenizer\":{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"use_regex\":false},\"decoder\":{\"type\":\"ByteLevel\"}"

static void expect_load_error(const char *json, const char *needle, const char *label)
{
    tp_tokenizer *tok = NULL;
    tp_err err = {{0}};
    int rc = tp_tokenizer_load_mem(&tok, json, strlen(json), "bad.json", &err);
    CHECK(rc == -1 && tok == NULL && strstr(err.msg, needle) && strstr(err.msg, "bad.json"),
          "%s: want an error containing \"%s\", got rc %d \"%s\"", label, needle, rc, err.msg);
    tp_tokenizer_free(tok);
}

static void test_mini_and_errors(void)
{
    /* Merge order: "aaa" with only a+a merges left to right into [aa, a];
     * ranks decide between overlapping pairs ("abc": b+c ranks first). */
    char *json = mini_json(",\"aa\":256,\"bc\":257,\"ab\":258,\"abc\":259", "[[\"a\",\"a\"],\"b c\",[\"a\",\"b\"],\"a bc\"]",
                           MINI_REST);
    tp_tokenizer *tok;
    tp_err err;
    if (tp_tokenizer_load_mem(&tok, json, strlen(json), "mini.json", &err)) {
        CHECK(0, "mini tokenizer: %s", err.msg);
    } else {
        int32_t *ids;
        size_t n;
        CHECK(tp_tokenizer_encode(tok, "aaa", 3, &ids, &n, &err) == 0 && n == 2 && ids[0] == 256 && ids[1] == 'a' - 0,
              "mini aaa");
        free(ids);
        CHECK(tp_tokenizer_encode(tok, "abc", 3, &ids, &n, &err) == 0 && n == 1 && ids[0] == 259, "mini abc");
        free(ids);
        CHECK(tp_tokenizer_encode(tok, "aaaa", 4, &ids, &n, &err) == 0 && n == 2 && ids[0] == 256 && ids[1] == 256,
              "mini aaaa");
        free(ids);
        tp_tokenizer_free(tok);
    }
    free(json);

    expect_load_error("{\"model\": [", "not valid JSON", "truncated JSON");
    expect_load_error("[]", "top level", "array at top");
    json = mini_json("", "[]", MINI_REST);
    char *p = strstr(json, "\"BPE\"");
    memcpy(p, "\"WPE\"", 5);
    expect_load_error(json, "model.type", "WordPiece-like model");
    free(json);
    expect_load_error("{\"model\":{\"type\":\"BPE\",\"vocab\":[],\"merges\":[]}}", "model.vocab", "vocab array");
    expect_load_error("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":-1},\"merges\":[]}}", "model.vocab[\"a\"]",
                      "negative id");
    expect_load_error("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":1,\"b\":1},\"merges\":[]}}", "id 1",
                      "duplicate id");
    struct { const char *extra, *merges, *rest, *needle; } bad[] = {
        {"", "[\"a\"]", MINI_REST, "model.merges[0]"},
        {"", "[\"a  b\"]", MINI_REST, "model.merges[0]"},
        {"", "[[\"a\",\"b\"]]", MINI_REST, "\"ab\" is not in model.vocab"},
        {"", "[[\"a\",\"zz\"]]", MINI_REST, "\"zz\" is not in model.vocab"},
        {",\"aa\":256", "[[\"a\",\"a\"],7]", MINI_REST, "model.merges[1]"},
        {"", "{}", MINI_REST, "model.merges must be an array"},
        {"", "[]", ",\"normalizer\":{\"type\":\"Lowercase\"},\"pre_tokenizer\":{\"type\":\"ByteLevel\"},\"decoder\":{\"type\":\"ByteLevel\"}",
         "normalizer.type \"Lowercase\""},
        {"", "[]", ",\"normalizer\":{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"NFC\"},{\"type\":\"Strip\"}]},\"pre_tokenizer\":{\"type\":\"ByteLevel\"},\"decoder\":{\"type\":\"ByteLevel\"}",
         "normalizer.normalizers[1].type \"Strip\""},
        {"", "[]", ",\"pre_tokenizer\":{\"type\":\"Whitespace\"},\"decoder\":{\"type\":\"ByteLevel\"}",
         "pre_tokenizer.type \"Whitespace\""},
        {"", "[]", ",\"pre_tokenizer\":null,\"decoder\":{\"type\":\"ByteLevel\"}", "pre_tokenizer is null"},
        {"", "[]", ",\"pre_tokenizer\":{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"Regex\":\"a\"},\"behavior\":\"Removed\",\"invert\":false},{\"type\":\"ByteLevel\"}]},\"decoder\":{\"type\":\"ByteLevel\"}",
         "pre_tokenizer.pretokenizers[0].behavior \"Removed\""},
        {"", "[]", ",\"pre_tokenizer\":{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"Regex\":\"(a\"},\"behavior\":\"Isolated\",\"invert\":false},{\"type\":\"ByteLevel\"}]},\"decoder\":{\"type\":\"ByteLevel\"}",
         "pre_tokenizer.pretokenizers[0].pattern: regex does not compile"},
        {"", "[]", ",\"pre_tokenizer\":{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"Regex\":\"a\"},\"behavior\":\"Isolated\",\"invert\":false}]},\"decoder\":{\"type\":\"ByteLevel\"}",
         "no ByteLevel"},
        {"", "[]", ",\"pre_tokenizer\":{\"type\":\"ByteLevel\"},\"decoder\":{\"type\":\"WordPiece\"}", "decoder is \"WordPiece\""},
        {"", "[]", ",\"pre_tokenizer\":{\"type\":\"ByteLevel\"}", "decoder is missing"},
        {"", "[]", MINI_REST ",\"added_tokens\":[{\"id\":5,\"content\":\"<x>\"}]", "id 5 of \"<x>\" is already"},
        {"", "[]", MINI_REST ",\"added_tokens\":[{\"id\":300,\"content\":\"a\"}]", "\"a\" has id 300 but model.vocab gives it"},
        {"", "[]", MINI_REST ",\"added_tokens\":[{\"id\":300,\"content\":\"<x>\"},{\"id\":301,\"content\":\"<x>\"}]", "appears twice"},
        {"", "[]", MINI_REST ",\"added_tokens\":[{\"id\":300,\"content\":\"<x>\",\"lstrip\":\"yes\"}]", "added_tokens[0].lstrip must be a boolean"},
        {"", "[]", MINI_REST ",\"added_tokens\":[{\"id\":1e9,\"content\":\"<x>\"}]", "added_tokens[0] (\"<x>\"): id must be"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        json = mini_json(bad[i].extra, bad[i].merges, bad[i].rest);
        char label[32];
        snprintf(label, sizeof label, "bad case %zu", i);
        expect_load_error(json, bad[i].needle, label);
        free(json);
    }
    /* Model flags we do not implement are refused by name. */
    const char *flags[][2] = {{"\"byte_fallback\":true,", "model.byte_fallback"},
                              {"\"dropout\":0.1,", "model.dropout"},
                              {"\"continuing_subword_prefix\":\"##\",", "model.continuing_subword_prefix"},
                              {"\"unk_token\":\"<unk>\",", "model.unk_token \"<unk>\""},
                              {"\"ignore_merges\":1,", "model.ignore_merges must be a boolean"}};
    for (size_t i = 0; i < 5; i++) {
        json = mini_json("", "[]", MINI_REST);
        p = strstr(json, "\"vocab\"");
        size_t fl = strlen(flags[i][0]);
        char *j2 = malloc(strlen(json) + fl + 1);
        memcpy(j2, json, (size_t)(p - json));
        memcpy(j2 + (p - json), flags[i][0], fl);
        strcpy(j2 + (p - json) + fl, p);
        expect_load_error(j2, flags[i][1], flags[i][1]);
        free(j2);
        free(json);
    }
}

static void test_files(void)
{
    tp_tokenizer *tok = NULL;
    tp_err err;
    CHECK(tp_tokenizer_load(&tok, "/nonexistent/tokenizer.json", &err) == -1 && strstr(err.msg, "/nonexistent"),
          "missing file: %s", err.msg);
    /* A truncated .zst is an error that names the file. */
    char *z;
    size_t zn;
    if (tp_read_file(QWEN3_TOKENIZER, 64u << 20, &z, &zn, &err)) die("read", &err);
    char path[] = "/tmp/test_tokenizer_XXXXXX.json.zst";
    int fd = mkstemps(path, 9);
    if (fd < 0) die("mkstemps", NULL);
    ssize_t w = write(fd, z, zn / 2);
    close(fd);
    CHECK(w == (ssize_t)(zn / 2), "write tmp");
    CHECK(tp_tokenizer_load(&tok, path, &err) == -1 && strstr(err.msg, path) && strstr(err.msg, "zstd"),
          "truncated zst: %s", err.msg);
    /* Garbage with a .zst name. */
    FILE *f = fopen(path, "wb");
    fputs("this is not zstd", f);
    fclose(f);
    CHECK(tp_tokenizer_load(&tok, path, &err) == -1 && strstr(err.msg, "zstd"), "garbage zst: %s", err.msg);
    unlink(path);
    free(z);
}

/* Resident bytes of this process (Linux /proc/self/statm), -1 elsewhere. */
static long long resident_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long long size, resident;
    int got = f ? fscanf(f, "%lld %lld", &size, &resident) : 0;
    if (f) fclose(f);
    return got == 2 ? resident * sysconf(_SC_PAGESIZE) : -1;
}

/* What loading leaves resident is the tokenizer's tables (~20 MB for Qwen3's
 * 151k tokens), not the parsed JSON tree it was built from: that tree
 * (~60 MB of small blocks) is freed and handed back to the system.  tprun's
 * peak RSS counts whatever stays. */
static void check_load_footprint(long long before, long long after)
{
    if (before < 0 || after < 0) {
        printf("resident size after loading: not checked (no /proc/self/statm)\n");
        return;
    }
    long long grew = after - before;
    printf("resident size grew by %.1f MB while loading\n", grew / 1e6);
#ifndef __SANITIZE_ADDRESS__
    CHECK(grew < 40000000, "loading left %.1f MB resident (the tables need ~20 MB)", grew / 1e6);
#endif
}

int main(void)
{
    tp_tokenizer *tok;
    tp_err err;
    long long rss0 = resident_bytes();
    double t0 = now_s(), c0 = cpu_s();
    if (tp_tokenizer_load(&tok, QWEN3_TOKENIZER, &err)) die("load", &err);
    double load_s = now_s() - t0, load_cpu = cpu_s() - c0;
    printf("loaded %s (%zu ids) in %.3f s wall, %.3f s CPU\n", QWEN3_TOKENIZER, tp_tokenizer_vocab_size(tok), load_s,
           load_cpu);
    check_load_footprint(rss0, resident_bytes());
    /* CPU time, so that a busy machine does not flake; typical is ~0.2 s.
     * Not under AddressSanitizer (make check-san), many times slower. */
#ifndef __SANITIZE_ADDRESS__
    CHECK(load_cpu < 1.0, "loading took %.2f s of CPU", load_cpu);
#endif

    test_byte_map();
    test_api(tok);
    test_qwen3_fixtures(tok);
    test_streaming_bytes(tok);
    test_decode_errors(tok);
    test_long_inputs(tok);
    test_model_vocab_padding(tok);
    tp_tokenizer_free(tok);
    test_variants();
    test_mini_and_errors();
    test_ignore_merges();
    test_files();

    return check_finish("test_tokenizer");
}
