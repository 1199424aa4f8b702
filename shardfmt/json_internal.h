/* json_internal.h - strict cJSON accessors: the one place where JSON values
 * are read and checked (shard.c, manifest.c; convert/arch.c for config.json).
 *
 * Everything read from an index or a manifest is untrusted: each accessor
 * checks the JSON type and range and reports "<where>: <key> ..." so that a
 * message names the file and the entry.  Integers must be exact: JSON numbers
 * are doubles, so only integral values below 2^53 are accepted.
 */
#ifndef TP_JSON_INTERNAL_H
#define TP_JSON_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cJSON.h>

#include "shardfmt.h"


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

/* Whether name is in the open-addressing set (cap a power of two, more
 * than twice the names added); adds it when not. */
static inline bool tp_json_name_seen(const char **set, size_t cap, const char *name)
{
    uint64_t h = 14695981039346656037ull;               /* FNV-1a */
    for (const unsigned char *p = (const unsigned char *)name; *p; p++)
        h = (h ^ *p) * 1099511628211ull;
    for (size_t i = (size_t)h & (cap - 1);; i = (i + 1) & (cap - 1)) {
        if (!set[i]) {
            set[i] = name;
            return false;
        }
        if (strcmp(set[i], name) == 0)
            return true;
    }
}

/* Python's json (and so transformers) keeps the LAST of duplicate keys;
 * cJSON's lookups find the first.  Removes, in every object at every depth,
 * each member that a later member of the same name overrides, so that every
 * reader of the tree sees what Python sees.  Linear in the members (a set of
 * the names seen, walking back from the last): tokenizer.json's vocab has
 * 151k of them. */
static inline void tp_json_keep_last(cJSON *node)
{
    if (!node)
        return;
    size_t n = 0;
    for (cJSON *it = node->child; it; it = it->next)
        n++;
    if (cJSON_IsObject(node) && n > 1) {
        size_t cap = 4;
        while (cap < 2 * n + 2)
            cap *= 2;
        cJSON **items = malloc(n * sizeof *items);
        const char **set = calloc(cap, sizeof *set);
        if (items && set) {
            size_t i = 0;
            for (cJSON *it = node->child; it; it = it->next)
                items[i++] = it;
            while (i-- > 0)
                if (items[i]->string && tp_json_name_seen(set, cap, items[i]->string))
                    cJSON_Delete(cJSON_DetachItemViaPointer(node, items[i]));
        } else {
            /* out of memory: the same result, quadratically */
            for (cJSON *it = node->child; it;) {
                cJSON *next = it->next;
                bool overridden = false;
                for (const cJSON *later = next; later && it->string && !overridden; later = later->next)
                    overridden = later->string && strcmp(later->string, it->string) == 0;
                if (overridden)
                    cJSON_Delete(cJSON_DetachItemViaPointer(node, it));
                it = next;
            }
        }
        free(items);
        free(set);
    }
    for (cJSON *it = node->child; it; it = it->next)
        tp_json_keep_last(it);
}

/* A configuration file (config.json, a --plan file, ...) as Python's json
 * reads it: one JSON value, duplicate keys resolved last-wins.  A NUL byte
 * is refused (Python's json.load refuses it too, and a text copied into the
 * manifest could not hold it).  NULL with "<where>: ..." in err on failure. */
static inline cJSON *tp_json_parse_config(const void *buf, size_t len, const char *where, tp_err *err)
{
    const char *nul = memchr(buf, 0, len);
    if (nul) {
        tp_errorf(err, "%s: contains a NUL byte at offset %zu", where, (size_t)(nul - (const char *)buf));
        return NULL;
    }
    cJSON *root = tp_json_parse(buf, len);
    if (!root) {
        tp_errorf(err, "%s: not valid JSON", where);
        return NULL;
    }
    tp_json_keep_last(root);
    return root;
}

/* The optional-key getters below treat a missing key and JSON null alike
 * (transformers' configs write null for "use the default"): *out = def. */
static inline const cJSON *tp_json_opt(const cJSON *obj, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return v && !cJSON_IsNull(v) ? v : NULL;
}

/* An integer in [lo, hi] (|lo|, |hi| < 2^53); required when !has_def.
 * prefix is put before the key in messages ("rope_scaling." or ""). */
static inline int tp_json_int_in(const cJSON *obj, const char *prefix, const char *key, bool has_def,
                                 int64_t def, int64_t lo, int64_t hi, const char *where,
                                 int64_t *out, tp_err *err)
{
    const cJSON *v = tp_json_opt(obj, key);
    if (!v) {
        if (!has_def)
            return tp_errorf(err, "%s: missing key \"%s%s\"", where, prefix, key);
        *out = def;
        return 0;
    }
    double d = cJSON_IsNumber(v) ? v->valuedouble : 0;
    if (!cJSON_IsNumber(v) || !(d >= (double)lo && d <= (double)hi) || d != (double)(int64_t)d)
        return tp_errorf(err, "%s: key \"%s%s\" = %.17g is not an integer in [%lld, %lld]", where,
                       prefix, key, cJSON_IsNumber(v) ? d : NAN, (long long)lo, (long long)hi);
    *out = (int64_t)d;
    return 0;
}

/* A finite number; required when !has_def. */
static inline int tp_json_finite(const cJSON *obj, const char *prefix, const char *key, bool has_def,
                                 double def, const char *where, double *out, tp_err *err)
{
    const cJSON *v = tp_json_opt(obj, key);
    if (!v) {
        if (!has_def)
            return tp_errorf(err, "%s: missing key \"%s%s\"", where, prefix, key);
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        return tp_errorf(err, "%s: key \"%s%s\" is not a finite number", where, prefix, key);
    *out = v->valuedouble;
    return 0;
}

static inline int tp_json_opt_bool(const cJSON *obj, const char *key, bool def, const char *where,
                                   bool *out, tp_err *err)
{
    const cJSON *v = tp_json_opt(obj, key);
    if (!v) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsBool(v))
        return tp_errorf(err, "%s: key \"%s\" is not true/false", where, key);
    *out = cJSON_IsTrue(v);
    return 0;
}

/* A string or NULL when absent/null; an error when it is something else. */
static inline int tp_json_opt_str(const cJSON *obj, const char *prefix, const char *key,
                                  const char *where, const char **out, tp_err *err)
{
    const cJSON *v = tp_json_opt(obj, key);
    *out = NULL;
    if (v && (!cJSON_IsString(v) || !v->valuestring))
        return tp_errorf(err, "%s: key \"%s%s\" is not a string", where, prefix, key);
    if (v)
        *out = v->valuestring;
    return 0;
}

/* "key": 5 or "key": [5, 7] (transformers' eos_token_id): at most max_n
 * token ids in [0, INT32_MAX]; absent or null gives *n = 0. */
static inline int tp_json_id_list(const cJSON *obj, const char *key, int32_t *ids, int max_n,
                                  const char *where, int *n, tp_err *err)
{
    const cJSON *v = tp_json_opt(obj, key);
    *n = 0;
    if (!v)
        return 0;
    if (!cJSON_IsNumber(v) && !cJSON_IsArray(v))
        return tp_errorf(err, "%s: key \"%s\" is neither a token id nor a list of them", where, key);
    const cJSON *e = cJSON_IsArray(v) ? v->child : v;
    for (; e; e = cJSON_IsArray(v) ? e->next : NULL) {
        double d = cJSON_IsNumber(e) ? e->valuedouble : -1;
        if (!(d >= 0 && d <= INT32_MAX) || d != (double)(int64_t)d)
            return tp_errorf(err, "%s: key \"%s\" holds something that is not a token id", where, key);
        if (*n == max_n)
            return tp_errorf(err, "%s: key \"%s\" lists more than %d ids", where, key, max_n);
        ids[(*n)++] = (int32_t)d;
    }
    return 0;
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
            return tp_errorf(err, "%s: unknown key \"%s\"", where, printable ? it->string : "(unprintable)");
        }
        for (const cJSON *o = obj->child; o != it; o = o->next)
            if (strcmp(o->string, it->string) == 0)
                return tp_errorf(err, "%s: duplicate key \"%s\"", where, it->string);
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
        return tp_errorf(err, "%s: \"%s\" must be a number", where, key);
    double d = v->valuedouble;
    if (!(d >= 0) || d >= TP_JSON_MAX_INT || d != (double)(uint64_t)d)
        return tp_errorf(err, "%s: \"%s\" must be a non-negative integer below 2^53", where, key);
    uint64_t u = (uint64_t)d;
    if (u > max)
        return tp_errorf(err, "%s: \"%s\" is %llu, above the limit %llu", where, key,
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
        return tp_errorf(err, "%s: \"%s\" must be a number", where, key);
    double d = v->valuedouble;
    if (!(d >= lo && d <= hi) || d != (double)(long long)d)
        return tp_errorf(err, "%s: \"%s\" must be an integer in [%d, %d]", where, key, lo, hi);
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
        return tp_errorf(err, "%s: \"%s\" must be a string", where, key);
    size_t n = strlen(v->valuestring);
    if (n == 0 && !allow_empty)
        return tp_errorf(err, "%s: \"%s\" is empty", where, key);
    if (n > max_len)
        return tp_errorf(err, "%s: \"%s\" is longer than %zu bytes", where, key, max_len);
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)v->valuestring[i] < 0x20 || v->valuestring[i] == 0x7f)
            return tp_errorf(err, "%s: \"%s\" contains a control character", where, key);
    *out = v->valuestring;
    return 0;
}

static inline int tp_json_bool(const cJSON *obj, const char *key, const char *where, bool *out, tp_err *err)
{
    const cJSON *v = tp_json_need(obj, key, where, err);
    if (!v)
        return -1;
    if (!cJSON_IsBool(v))
        return tp_errorf(err, "%s: \"%s\" must be true or false", where, key);
    *out = cJSON_IsTrue(v);
    return 0;
}

/* 32 lowercase hex digits (a conversion id). */
static inline bool tp_is_conversion_id(const char *s)
{
    return s && strlen(s) == 32 && tp_is_lower_hex(s, 32);
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
