/* json_internal.h - strict cJSON accessors shared by shard.c and manifest.c.
 *
 * Everything read from an index or a manifest is untrusted: each accessor
 * checks the JSON type and range and reports "<where>: <key> ..." so that a
 * message names the file and the entry.  Integers must be exact: JSON numbers
 * are doubles, so only integral values below 2^53 are accepted.
 */
#ifndef TP_JSON_INTERNAL_H
#define TP_JSON_INTERNAL_H

#include <stdlib.h>
#include <string.h>

#include <cJSON.h>

#include "shardfmt.h"

/* tp_errorf, with a -1 the compiler can see (silences maybe-uninitialized
 * warnings on outputs that failing paths leave unset). */
#define TP_FAIL(...) (tp_errorf(__VA_ARGS__), -1)

#define TP_JSON_MAX_INT 9007199254740992.0 /* 2^53: first double that is not exact */

/* Parses len bytes (not necessarily NUL-terminated) as one JSON value.  The
 * bytes are copied so that cJSON always sees a terminated string. */
static inline cJSON *tp_json_parse(const void *buf, size_t len)
{
    char *text = malloc(len + 1);
    if (!text)
        return NULL;
    memcpy(text, buf, len);
    text[len] = 0;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(text, &end, 1);
    free(text);
    return root;
}

/* Rejects unknown and duplicate keys: a duplicate would make the meaning of
 * the object depend on which copy a reader picks. */
static inline int tp_json_check_keys(const cJSON *obj, const char *const *allowed,
                                     const char *where, tp_err *err)
{
    for (const cJSON *it = obj->child; it; it = it->next) {
        bool known = false;
        for (size_t i = 0; allowed[i]; i++)
            known = known || strcmp(it->string, allowed[i]) == 0;
        if (!known) {
            bool printable = strlen(it->string) <= 64;
            for (const char *c = it->string; printable && *c; c++)
                printable = (unsigned char)*c >= 0x20 && *c != 0x7f;
            return TP_FAIL(err, "%s: unknown key \"%s\"", where, printable ? it->string : "(unprintable)");
        }
        for (const cJSON *o = obj->child; o != it; o = o->next)
            if (strcmp(o->string, it->string) == 0)
                return TP_FAIL(err, "%s: duplicate key \"%s\"", where, it->string);
    }
    return 0;
}

static inline const cJSON *tp_json_need(const cJSON *obj, const char *key, const char *where, tp_err *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v)
        tp_errorf(err, "%s: missing \"%s\"", where, key);
    return v;
}

/* An exact non-negative integer <= max (and < 2^53). */
static inline int tp_json_u64_value(const cJSON *v, uint64_t max, const char *key,
                                    const char *where, uint64_t *out, tp_err *err)
{
    if (!cJSON_IsNumber(v))
        return TP_FAIL(err, "%s: \"%s\" must be a number", where, key);
    double d = v->valuedouble;
    if (!(d >= 0) || d >= TP_JSON_MAX_INT || d != (double)(uint64_t)d)
        return TP_FAIL(err, "%s: \"%s\" must be a non-negative integer below 2^53", where, key);
    uint64_t u = (uint64_t)d;
    if (u > max)
        return TP_FAIL(err, "%s: \"%s\" is %llu, above the limit %llu", where, key,
                         (unsigned long long)u, (unsigned long long)max);
    *out = u;
    return 0;
}

static inline int tp_json_u64(const cJSON *obj, const char *key, uint64_t max, const char *where,
                              uint64_t *out, tp_err *err)
{
    const cJSON *v = tp_json_need(obj, key, where, err);
    return v ? tp_json_u64_value(v, max, key, where, out, err) : -1;
}

static inline int tp_json_int(const cJSON *obj, const char *key, int lo, int hi, const char *where,
                              int *out, tp_err *err)
{
    const cJSON *v = tp_json_need(obj, key, where, err);
    if (!v)
        return -1;
    if (!cJSON_IsNumber(v))
        return TP_FAIL(err, "%s: \"%s\" must be a number", where, key);
    double d = v->valuedouble;
    if (!(d >= lo && d <= hi) || d != (double)(long long)d)
        return TP_FAIL(err, "%s: \"%s\" must be an integer in [%d, %d]", where, key, lo, hi);
    *out = (int)d;
    return 0;
}

/* A string without control characters, 1..max_len bytes (0.. if allow_empty). */
static inline int tp_json_str(const cJSON *obj, const char *key, size_t max_len, bool allow_empty,
                              const char *where, const char **out, tp_err *err)
{
    const cJSON *v = tp_json_need(obj, key, where, err);
    if (!v)
        return -1;
    if (!cJSON_IsString(v) || !v->valuestring)
        return TP_FAIL(err, "%s: \"%s\" must be a string", where, key);
    size_t n = strlen(v->valuestring);
    if (n == 0 && !allow_empty)
        return TP_FAIL(err, "%s: \"%s\" is empty", where, key);
    if (n > max_len)
        return TP_FAIL(err, "%s: \"%s\" is longer than %zu bytes", where, key, max_len);
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)v->valuestring[i] < 0x20 || v->valuestring[i] == 0x7f)
            return TP_FAIL(err, "%s: \"%s\" contains a control character", where, key);
    *out = v->valuestring;
    return 0;
}

static inline int tp_json_bool(const cJSON *obj, const char *key, const char *where, bool *out, tp_err *err)
{
    const cJSON *v = tp_json_need(obj, key, where, err);
    if (!v)
        return -1;
    if (!cJSON_IsBool(v))
        return TP_FAIL(err, "%s: \"%s\" must be true or false", where, key);
    *out = cJSON_IsTrue(v);
    return 0;
}

/* 32 lowercase hex digits (a conversion id). */
static inline bool tp_is_conversion_id(const char *s)
{
    if (!s || strlen(s) != 32)
        return false;
    for (int i = 0; i < 32; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return false;
    return true;
}

/* A JSON number holding an exact unsigned integer (cJSON's own printer
 * would go through a double). */
static inline cJSON *tp_json_add_u64(cJSON *obj, const char *key, uint64_t v)
{
    char buf[24];
    snprintf(buf, sizeof buf, "%llu", (unsigned long long)v);
    return cJSON_AddRawToObject(obj, key, buf);
}

static inline cJSON *tp_json_u64_item(uint64_t v)
{
    char buf[24];
    snprintf(buf, sizeof buf, "%llu", (unsigned long long)v);
    return cJSON_CreateRaw(buf);
}

#endif
