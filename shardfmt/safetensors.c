/* safetensors.c - reading (defensively) and writing safetensors files.
 *
 * Layout (huggingface/safetensors): an 8-byte little-endian u64 N, then N
 * bytes of UTF-8 JSON (possibly padded with trailing spaces), then the data
 * section.  The JSON is an object mapping tensor names to
 *   {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}
 * (offsets relative to the start of the data section), plus an optional
 * "__metadata__": {string: string}.
 *
 * Everything in a header is untrusted.  We check what the reference
 * implementation checks (header bounds, offsets contiguous and covering the
 * data section exactly, byte length = product(shape) * dtype size) and more
 * (unknown keys, duplicate names, exact integers).  Each failure has its own
 * wording, names the file and, where it applies, the tensor.
 */
#include "shardfmt.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cJSON.h>

#define META_KEY "__metadata__"
#define INDEX_NAME "model.safetensors.index.json"
#define SINGLE_NAME "model.safetensors"
/* An index is a small JSON file; this bounds what we read into memory. */
#define MAX_INDEX_BYTES (256u * 1000u * 1000u)
/* cJSON stores numbers as doubles, which hold every integer exactly only
 * below 2^53: anything at or above cannot be trusted to be the written value. */
#define MAX_EXACT_INT 9007199254740992.0

/* -------------------------------------------------------------- messages */

/* Names come from untrusted JSON: make them safe for a one-line message
 * (control characters become '?', long names are cut with "..."). */
typedef struct pname {
    char s[200];
} pname;

static pname printable(const char *in)
{
    pname p;
    size_t o = 0, cap = sizeof p.s;
    for (size_t i = 0; in && in[i]; i++) {
        if (o + 4 >= cap) {
            memcpy(p.s + o, "...", 3);
            o += 3;
            break;
        }
        unsigned char c = (unsigned char)in[i];
        p.s[o++] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
    }
    p.s[o] = '\0';
    return p;
}

/* The safetensors dtype names we recognise but cannot use, so that a model
 * in, say, F64 gets "unsupported" rather than "unknown". */
static const char *const known_dtypes[] = {
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "E8M0", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
    NULL,
};

static bool is_known_dtype(const char *s)
{
    for (size_t i = 0; known_dtypes[i]; i++)
        if (strcmp(s, known_dtypes[i]) == 0)
            return true;
    return false;
}

/* ------------------------------------------------------------- validation */

/* Strict UTF-8 (no overlongs, no surrogates, nothing above U+10FFFF). */
static bool valid_utf8(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t len;
        uint32_t cp;
        if (c >= 0xc2 && c <= 0xdf) { len = 2; cp = c & 0x1f; }
        else if (c >= 0xe0 && c <= 0xef) { len = 3; cp = c & 0x0f; }
        else if (c >= 0xf0 && c <= 0xf4) { len = 4; cp = c & 0x07; }
        else return false;
        if (n - i < len)
            return false;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
            (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += len;
    }
    return true;
}

typedef enum { INT_OK, INT_NOT_NUMBER, INT_NOT_INTEGER, INT_NEGATIVE, INT_TOO_LARGE } int_check;

/* JSON numbers arrive as doubles (see MAX_EXACT_INT). */
static int_check json_uint(const cJSON *v, uint64_t *out)
{
    if (!cJSON_IsNumber(v))
        return INT_NOT_NUMBER;
    double d = v->valuedouble;
    if (!isfinite(d) || d != floor(d))
        return INT_NOT_INTEGER;
    if (d < 0)
        return INT_NEGATIVE;
    if (d >= MAX_EXACT_INT)
        return INT_TOO_LARGE;
    *out = (uint64_t)d;
    return INT_OK;
}

/* Reports a failed json_uint for "<file>: tensor <t>: <what> ...". */
static int int_error(tp_err *err, int_check c, const char *file, const char *tensor,
                     const char *what)
{
    switch (c) {
    case INT_NOT_NUMBER:
        return tp_errorf(err, "%s: tensor %s: %s is not a number", file, tensor, what);
    case INT_NOT_INTEGER:
        return tp_errorf(err, "%s: tensor %s: %s is not an integer", file, tensor, what);
    case INT_NEGATIVE:
        return tp_errorf(err, "%s: tensor %s: %s is negative", file, tensor, what);
    default:
        return tp_errorf(err, "%s: tensor %s: %s is 2^53 or more, too large to be exact", file,
                         tensor, what);
    }
}

/* Parses one tensor entry into t (name already set).  data_len is the size
 * of the data section. */
static int parse_entry(const cJSON *e, tp_st_tensor *t, const char *file, const char *tname,
                       uint64_t data_len, tp_err *err)
{
    if (!cJSON_IsObject(e))
        return tp_errorf(err, "%s: tensor %s: entry is not a JSON object", file, tname);
    const cJSON *dtype = NULL, *shape = NULL, *offsets = NULL;
    for (const cJSON *k = e->child; k; k = k->next) {
        const cJSON **slot = NULL;
        if (strcmp(k->string, "dtype") == 0) slot = &dtype;
        else if (strcmp(k->string, "shape") == 0) slot = &shape;
        else if (strcmp(k->string, "data_offsets") == 0) slot = &offsets;
        if (!slot)
            return tp_errorf(err, "%s: tensor %s: unexpected key \"%s\"", file, tname,
                             printable(k->string).s);
        if (*slot)
            return tp_errorf(err, "%s: tensor %s: key \"%s\" appears twice", file, tname, k->string);
        *slot = k;
    }
    if (!dtype)
        return tp_errorf(err, "%s: tensor %s: missing \"dtype\"", file, tname);
    if (!shape)
        return tp_errorf(err, "%s: tensor %s: missing \"shape\"", file, tname);
    if (!offsets)
        return tp_errorf(err, "%s: tensor %s: missing \"data_offsets\"", file, tname);

    if (!cJSON_IsString(dtype))
        return tp_errorf(err, "%s: tensor %s: dtype is not a string", file, tname);
    t->dtype = tp_dtype_from_name(dtype->valuestring);
    if (t->dtype == TP_DTYPE_INVALID) {
        if (is_known_dtype(dtype->valuestring))
            return tp_errorf(err, "%s: unsupported dtype %s for tensor %s (supported: BF16, F16, F32, F8_E4M3, I8)",
                             file, dtype->valuestring, tname);
        return tp_errorf(err, "%s: tensor %s: unknown dtype \"%s\"", file, tname,
                         printable(dtype->valuestring).s);
    }

    if (!cJSON_IsArray(shape))
        return tp_errorf(err, "%s: tensor %s: shape is not an array", file, tname);
    int ndim = cJSON_GetArraySize(shape);
    if (ndim > TP_MAX_DIMS)
        return tp_errorf(err, "%s: tensor %s: shape has %d dimensions, more than the %d supported",
                         file, tname, ndim, TP_MAX_DIMS);
    t->ndim = 0;
    for (const cJSON *d = shape->child; d; d = d->next) {
        char what[32];
        snprintf(what, sizeof what, "shape[%d]", t->ndim);
        int_check c = json_uint(d, &t->shape[t->ndim]);
        if (c != INT_OK)
            return int_error(err, c, file, tname, what);
        t->ndim++;
    }

    if (!cJSON_IsArray(offsets) || cJSON_GetArraySize(offsets) != 2)
        return tp_errorf(err, "%s: tensor %s: data_offsets is not an array of two integers", file, tname);
    int_check c = json_uint(offsets->child, &t->begin);
    if (c != INT_OK)
        return int_error(err, c, file, tname, "data_offsets[0]");
    c = json_uint(offsets->child->next, &t->end);
    if (c != INT_OK)
        return int_error(err, c, file, tname, "data_offsets[1]");
    if (t->begin > t->end)
        return tp_errorf(err, "%s: tensor %s: data_offsets begin %llu is after end %llu", file, tname,
                         (unsigned long long)t->begin, (unsigned long long)t->end);

    if (!tp_tensor_nbytes(t->dtype, t->shape, t->ndim, &t->nbytes))
        return tp_errorf(err, "%s: tensor %s: shape is too large (byte size overflows)", file, tname);
    if (t->end - t->begin != t->nbytes)
        return tp_errorf(err, "%s: tensor %s: data_offsets span %llu bytes but %s shape needs %zu",
                         file, tname, (unsigned long long)(t->end - t->begin),
                         tp_dtype_name(t->dtype), t->nbytes);
    if (t->end > data_len)
        return tp_errorf(err, "%s: tensor %s: data_offsets [%llu, %llu) lie outside the data section "
                              "(%llu bytes)",
                         file, tname, (unsigned long long)t->begin, (unsigned long long)t->end,
                         (unsigned long long)data_len);
    return 0;
}

typedef struct meta_kv {
    const char *key, *value; /* owned by the cJSON tree */
} meta_kv;

static int cmp_meta_kv(const void *a, const void *b)
{
    return strcmp(((const meta_kv *)a)->key, ((const meta_kv *)b)->key);
}

/* Fills f->meta_* sorted by key.  Duplicates are found by sorting, not by
 * comparing every pair: a 100 MB header can hold millions of keys. */
static int parse_metadata(tp_st_file *f, const cJSON *meta, const char *file, tp_err *err)
{
    if (cJSON_IsNull(meta))
        return 0;
    if (!cJSON_IsObject(meta))
        return tp_errorf(err, "%s: __metadata__ is not a JSON object", file);
    size_t n = (size_t)cJSON_GetArraySize(meta);
    if (n == 0)
        return 0;
    meta_kv *kv = calloc(n, sizeof *kv);
    f->meta_keys = calloc(n, sizeof *f->meta_keys);
    f->meta_values = calloc(n, sizeof *f->meta_values);
    int rc = 0;
    if (!kv || !f->meta_keys || !f->meta_values)
        rc = tp_errorf(err, "%s: out of memory", file);
    size_t k = 0;
    for (const cJSON *e = meta->child; e && rc == 0; e = e->next, k++) {
        if (!cJSON_IsString(e))
            rc = tp_errorf(err, "%s: __metadata__ value for key %s is not a string", file,
                           printable(e->string).s);
        else
            kv[k] = (meta_kv){e->string, e->valuestring};
    }
    if (rc == 0) {
        qsort(kv, n, sizeof *kv, cmp_meta_kv);
        for (size_t i = 1; i < n && rc == 0; i++)
            if (strcmp(kv[i - 1].key, kv[i].key) == 0)
                rc = tp_errorf(err, "%s: __metadata__ key %s appears twice", file,
                               printable(kv[i].key).s);
    }
    for (size_t i = 0; i < n && rc == 0; i++) {
        f->meta_keys[i] = strdup(kv[i].key);
        f->meta_values[i] = strdup(kv[i].value);
        f->n_meta = i + 1; /* so that tp_st_close frees what was copied */
        if (!f->meta_keys[i] || !f->meta_values[i])
            rc = tp_errorf(err, "%s: out of memory", file);
    }
    free(kv);
    return rc;
}

static int cmp_tensor_name(const void *a, const void *b)
{
    return strcmp(((const tp_st_tensor *)a)->name, ((const tp_st_tensor *)b)->name);
}

/* Orders by begin, then end, so zero-byte tensors sort before the tensor
 * that starts at the same offset. */
static int cmp_tensor_offsets(const void *a, const void *b)
{
    const tp_st_tensor *x = *(const tp_st_tensor *const *)a, *y = *(const tp_st_tensor *const *)b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* The tensors must tile [0, data_len) exactly: no overlap, no hole, nothing
 * left over at the end (the reference's InvalidOffset and
 * MetadataIncompleteBuffer). */
static int check_coverage(const tp_st_file *f, const char *file, uint64_t data_len, tp_err *err)
{
    const tp_st_tensor **by_off = malloc((f->n_tensors ? f->n_tensors : 1) * sizeof *by_off);
    if (!by_off)
        return tp_errorf(err, "%s: out of memory", file);
    for (size_t i = 0; i < f->n_tensors; i++)
        by_off[i] = &f->tensors[i];
    qsort(by_off, f->n_tensors, sizeof *by_off, cmp_tensor_offsets);
    uint64_t covered = 0;
    const tp_st_tensor *prev = NULL;
    int rc = 0;
    for (size_t i = 0; i < f->n_tensors && rc == 0; i++) {
        const tp_st_tensor *t = by_off[i];
        if (t->begin < covered)
            rc = tp_errorf(err, "%s: tensors %s and %s overlap (bytes %llu..%llu of the data section)",
                           file, printable(prev->name).s, printable(t->name).s,
                           (unsigned long long)t->begin, (unsigned long long)covered);
        else if (t->begin > covered)
            rc = tp_errorf(err, "%s: hole in the data section: bytes [%llu, %llu) before tensor %s "
                                "belong to no tensor",
                           file, (unsigned long long)covered, (unsigned long long)t->begin,
                           printable(t->name).s);
        covered = t->end;
        prev = t;
    }
    free(by_off);
    if (rc == 0 && covered != data_len)
        rc = tp_errorf(err, "%s: data section has %llu bytes but the tensors cover only %llu "
                            "(trailing bytes belong to no tensor)",
                       file, (unsigned long long)data_len, (unsigned long long)covered);
    return rc;
}

/* Checks the header's framing and returns its JSON parsed. */
static int parse_header_json(const uint8_t *buf, size_t len, const char *file, uint64_t *header_len,
                             cJSON **out, tp_err *err)
{
    if (len < 8)
        return tp_errorf(err, "%s: file is %zu bytes, too short for a safetensors header "
                              "(need at least 8)", file, len);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = (n << 8) | buf[i];
    if (n > TP_ST_MAX_HEADER)
        return tp_errorf(err, "%s: header length %llu is above the limit of %u bytes", file,
                         (unsigned long long)n, TP_ST_MAX_HEADER);
    if (n > len - 8)
        return tp_errorf(err, "%s: header length %llu runs past the end of the file (%zu bytes)",
                         file, (unsigned long long)n, len);
    const uint8_t *h = buf + 8;
    if (n == 0 || h[0] != '{')
        return tp_errorf(err, "%s: header does not start with '{'", file);
    if (memchr(h, 0, n))
        return tp_errorf(err, "%s: header contains a NUL byte", file);
    if (!valid_utf8(h, n))
        return tp_errorf(err, "%s: header is not valid UTF-8", file);
    /* Only JSON whitespace may follow the closing brace (the writer pads
     * with spaces); cJSON alone would also skip control characters. */
    size_t last = n - 1;
    while (last > 0 && (h[last] == ' ' || h[last] == '\t' || h[last] == '\n' || h[last] == '\r'))
        last--;
    if (h[last] != '}')
        return tp_errorf(err, "%s: header JSON is followed by something other than spaces", file);
    /* Copy so that cJSON sees a NUL-terminated string. */
    char *text = malloc(n + 1);
    if (!text)
        return tp_errorf(err, "%s: out of memory for a %llu byte header", file, (unsigned long long)n);
    memcpy(text, h, n);
    text[n] = '\0';
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(text, &end, 1);
    size_t at = end ? (size_t)(end - text) : 0;
    free(text);
    if (!root)
        return tp_errorf(err, "%s: header is not valid JSON (error near byte %zu of the header)", file,
                         at);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return tp_errorf(err, "%s: header is not a JSON object", file);
    }
    *header_len = n;
    *out = root;
    return 0;
}

int tp_st_parse(tp_st_file *f, const uint8_t *buf, size_t len, const char *name, tp_err *err)
{
    memset(f, 0, sizeof *f);
    f->map.data = buf; /* not owned: map.path stays NULL */
    f->map.size = len;
    cJSON *root = NULL;
    uint64_t header_len = 0;
    if (parse_header_json(buf, len, name, &header_len, &root, err) != 0)
        return -1;
    f->header_len = header_len;
    uint64_t data_len = (uint64_t)len - 8 - header_len;
    const uint8_t *data = buf + 8 + header_len;

    size_t n_entries = (size_t)cJSON_GetArraySize(root);
    f->tensors = calloc(n_entries ? n_entries : 1, sizeof *f->tensors);
    if (!f->tensors) {
        cJSON_Delete(root);
        return tp_errorf(err, "%s: out of memory", name);
    }
    bool seen_meta = false;
    int rc = 0;
    for (const cJSON *e = root->child; e && rc == 0; e = e->next) {
        if (strcmp(e->string, META_KEY) == 0) {
            if (seen_meta)
                rc = tp_errorf(err, "%s: __metadata__ appears twice", name);
            else
                rc = parse_metadata(f, e, name, err);
            seen_meta = true;
            continue;
        }
        tp_st_tensor *t = &f->tensors[f->n_tensors];
        t->name = strdup(e->string);
        if (!t->name) {
            rc = tp_errorf(err, "%s: out of memory", name);
            break;
        }
        f->n_tensors++;
        rc = parse_entry(e, t, name, printable(e->string).s, data_len, err);
        if (rc == 0)
            t->data = data + t->begin; /* begin <= end <= data_len checked */
    }
    cJSON_Delete(root);
    if (rc == 0) {
        qsort(f->tensors, f->n_tensors, sizeof *f->tensors, cmp_tensor_name);
        /* cJSON keeps duplicate keys; so does a name with "\u0000" in it
         * once truncated.  Either way one name would mean two tensors. */
        for (size_t i = 1; i < f->n_tensors && rc == 0; i++)
            if (strcmp(f->tensors[i - 1].name, f->tensors[i].name) == 0)
                rc = tp_errorf(err, "%s: duplicate tensor name %s", name,
                               printable(f->tensors[i].name).s);
    }
    if (rc == 0)
        rc = check_coverage(f, name, data_len, err);
    if (rc != 0) {
        tp_st_close(f);
        return -1;
    }
    return 0;
}

int tp_st_open(tp_st_file *f, const char *path, tp_err *err)
{
    memset(f, 0, sizeof *f);
    tp_mmap map;
    if (tp_mmap_open(&map, path, err) != 0)
        return -1;
    if (tp_st_parse(f, map.data, map.size, path, err) != 0) {
        tp_mmap_close(&map);
        return -1;
    }
    f->map = map; /* now owned: tp_st_close unmaps it */
    return 0;
}

void tp_st_close(tp_st_file *f)
{
    if (!f)
        return;
    for (size_t i = 0; i < f->n_tensors; i++)
        free(f->tensors[i].name);
    free(f->tensors);
    for (size_t i = 0; i < f->n_meta; i++) {
        free(f->meta_keys[i]);
        free(f->meta_values[i]);
    }
    free(f->meta_keys);
    free(f->meta_values);
    if (f->map.path) /* only tp_st_open's mappings are ours */
        tp_mmap_close(&f->map);
    memset(f, 0, sizeof *f);
}

const tp_st_tensor *tp_st_find(const tp_st_file *f, const char *name)
{
    tp_st_tensor key = {.name = (char *)name};
    return bsearch(&key, f->tensors, f->n_tensors, sizeof *f->tensors, cmp_tensor_name);
}

/* ---------------------------------------------------------- model folders */

static int cmp_tensor_ptr_name(const void *a, const void *b)
{
    return strcmp((*(const tp_st_tensor *const *)a)->name, (*(const tp_st_tensor *const *)b)->name);
}

static int cmp_str_ptr(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* An index entry: tensor name -> file name, both owned by the cJSON tree. */
typedef struct wm_entry {
    const char *tensor;
    const char *file;
} wm_entry;

static int cmp_wm(const void *a, const void *b)
{
    return strcmp(((const wm_entry *)a)->tensor, ((const wm_entry *)b)->tensor);
}

/* Which file of the set holds the tensor (by pointer). */
static size_t file_of(const tp_st_set *s, const tp_st_tensor *t)
{
    for (size_t i = 0; i < s->n_files; i++)
        if (t >= s->files[i].tensors && t < s->files[i].tensors + s->files[i].n_tensors)
            return i;
    return 0;
}

/* Collects every tensor of every file, sorted by name; names must be
 * unique across files. */
static int build_tensor_list(tp_st_set *s, const char *where, tp_err *err)
{
    size_t n = 0;
    for (size_t i = 0; i < s->n_files; i++)
        n += s->files[i].n_tensors;
    s->tensors = malloc((n ? n : 1) * sizeof *s->tensors);
    if (!s->tensors)
        return tp_errorf(err, "%s: out of memory", where);
    for (size_t i = 0; i < s->n_files; i++)
        for (size_t k = 0; k < s->files[i].n_tensors; k++)
            s->tensors[s->n_tensors++] = &s->files[i].tensors[k];
    qsort(s->tensors, s->n_tensors, sizeof *s->tensors, cmp_tensor_ptr_name);
    for (size_t i = 1; i < s->n_tensors; i++)
        if (strcmp(s->tensors[i - 1]->name, s->tensors[i]->name) == 0)
            return tp_errorf(err, "%s: tensor %s is in both %s and %s", where,
                             printable(s->tensors[i]->name).s,
                             s->file_names[file_of(s, s->tensors[i - 1])],
                             s->file_names[file_of(s, s->tensors[i])]);
    return 0;
}

static int open_set_file(tp_st_set *s, const char *dir, const char *name, tp_err *err)
{
    char *path = tp_path_join(dir, name);
    s->file_names[s->n_files] = strdup(name);
    if (!path || !s->file_names[s->n_files]) {
        free(path);
        free(s->file_names[s->n_files]);
        s->file_names[s->n_files] = NULL;
        return tp_errorf(err, "%s: out of memory", dir);
    }
    /* A shard linked from outside the model directory is refused. */
    int rc = tp_model_file_check(dir, name, err);
    if (rc == 0)
        rc = tp_st_open(&s->files[s->n_files], path, err);
    free(path);
    if (rc != 0) {
        free(s->file_names[s->n_files]);
        s->file_names[s->n_files] = NULL;
        return -1;
    }
    s->n_files++;
    return 0;
}

static int open_indexed(tp_st_set *s, const char *dir, const char *index_path, tp_err *err)
{
    char *text = NULL;
    size_t len = 0;
    if (tp_read_file(index_path, MAX_INDEX_BYTES, &text, &len, err) != 0)
        return -1;
    if (memchr(text, 0, len)) {
        free(text);
        return tp_errorf(err, "%s: contains a NUL byte", index_path);
    }
    cJSON *root = cJSON_ParseWithOpts(text, NULL, 1);
    free(text);
    if (!root)
        return tp_errorf(err, "%s: not valid JSON", index_path);
    int rc = 0;
    wm_entry *wm = NULL;
    char **files = NULL;
    size_t n_wm = 0, n_files = 0;
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(root)) {
        rc = tp_errorf(err, "%s: not a JSON object", index_path);
        goto out;
    }
    if (!cJSON_IsObject(map)) {
        rc = tp_errorf(err, "%s: missing \"weight_map\" object", index_path);
        goto out;
    }
    size_t n = (size_t)cJSON_GetArraySize(map);
    wm = calloc(n ? n : 1, sizeof *wm);
    files = calloc(n ? n : 1, sizeof *files);
    if (!wm || !files) {
        rc = tp_errorf(err, "%s: out of memory", index_path);
        goto out;
    }
    for (const cJSON *e = map->child; e; e = e->next) {
        if (!cJSON_IsString(e)) {
            rc = tp_errorf(err, "%s: weight_map entry for tensor %s is not a string", index_path,
                           printable(e->string).s);
            goto out;
        }
        if (!tp_safe_file_name(e->valuestring)) {
            rc = tp_errorf(err, "%s: weight_map entry for tensor %s: \"%s\" is not a plain file name",
                           index_path, printable(e->string).s, printable(e->valuestring).s);
            goto out;
        }
        wm[n_wm].tensor = e->string;
        wm[n_wm].file = e->valuestring;
        n_wm++;
        files[n_files++] = e->valuestring;
    }
    qsort(wm, n_wm, sizeof *wm, cmp_wm);
    for (size_t i = 1; i < n_wm; i++)
        if (strcmp(wm[i - 1].tensor, wm[i].tensor) == 0) {
            rc = tp_errorf(err, "%s: weight_map lists tensor %s twice", index_path,
                           printable(wm[i].tensor).s);
            goto out;
        }
    /* The distinct file names, sorted (files are opened in name order). */
    qsort(files, n_files, sizeof *files, cmp_str_ptr);
    size_t uniq = 0;
    for (size_t i = 0; i < n_files; i++)
        if (uniq == 0 || strcmp(files[uniq - 1], files[i]) != 0)
            files[uniq++] = files[i];
    n_files = uniq;
    if (n_files == 0) {
        rc = tp_errorf(err, "%s: weight_map is empty", index_path);
        goto out;
    }
    s->files = calloc(n_files, sizeof *s->files);
    s->file_names = calloc(n_files, sizeof *s->file_names);
    if (!s->files || !s->file_names) {
        rc = tp_errorf(err, "%s: out of memory", index_path);
        goto out;
    }
    for (size_t i = 0; i < n_files && rc == 0; i++) {
        char *path = tp_path_join(dir, files[i]);
        struct stat st;
        if (path && stat(path, &st) != 0 && errno == ENOENT) {
            const char *some_tensor = "";
            for (size_t k = 0; k < n_wm; k++)
                if (strcmp(wm[k].file, files[i]) == 0) {
                    some_tensor = wm[k].tensor;
                    break;
                }
            rc = tp_errorf(err, "%s: weight_map names file %s (e.g. for tensor %s), which does not exist",
                           index_path, printable(files[i]).s, printable(some_tensor).s);
        } else {
            rc = open_set_file(s, dir, files[i], err);
        }
        free(path);
    }
    if (rc != 0)
        goto out;
    /* Every index entry must be in the file it names... */
    for (size_t k = 0; k < n_wm; k++) {
        const tp_st_file *f = NULL;
        for (size_t i = 0; i < s->n_files; i++)
            if (strcmp(s->file_names[i], wm[k].file) == 0)
                f = &s->files[i];
        if (!f || !tp_st_find(f, wm[k].tensor)) {
            rc = tp_errorf(err, "%s: weight_map puts tensor %s in %s, but that file has no such tensor",
                           index_path, printable(wm[k].tensor).s, wm[k].file);
            goto out;
        }
    }
    /* ... no tensor may be in two files ... */
    if ((rc = build_tensor_list(s, dir, err)) != 0)
        goto out;
    /* ... and every tensor of the files must be in the index. */
    for (size_t i = 0; i < s->n_tensors; i++) {
        wm_entry key = {.tensor = s->tensors[i]->name};
        if (!bsearch(&key, wm, n_wm, sizeof *wm, cmp_wm)) {
            rc = tp_errorf(err, "%s: tensor %s is in %s but not in the weight_map", index_path,
                           printable(s->tensors[i]->name).s, s->file_names[file_of(s, s->tensors[i])]);
            goto out;
        }
    }
out:
    free(wm);
    free(files);
    cJSON_Delete(root);
    return rc;
}

/* The name exists, as anything: a dangling symlink is present (and refused
 * by the checks that follow), not "missing". */
static bool present(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

int tp_st_set_open(tp_st_set *s, const char *model_dir, tp_err *err)
{
    memset(s, 0, sizeof *s);
    char *index_path = tp_path_join(model_dir, INDEX_NAME);
    char *single_path = tp_path_join(model_dir, SINGLE_NAME);
    int rc = 0;
    if (!index_path || !single_path) {
        rc = tp_errorf(err, "%s: out of memory", model_dir);
    } else if (present(index_path)) {
        rc = tp_model_file_check(model_dir, INDEX_NAME, err);
        if (rc == 0)
            rc = open_indexed(s, model_dir, index_path, err);
    } else if (present(single_path)) {
        s->files = calloc(1, sizeof *s->files);
        s->file_names = calloc(1, sizeof *s->file_names);
        if (!s->files || !s->file_names)
            rc = tp_errorf(err, "%s: out of memory", model_dir);
        else if ((rc = open_set_file(s, model_dir, SINGLE_NAME, err)) == 0)
            rc = build_tensor_list(s, model_dir, err);
    } else {
        rc = tp_errorf(err, "%s: no model.safetensors or model.safetensors.index.json", model_dir);
    }
    free(index_path);
    free(single_path);
    if (rc != 0)
        tp_st_set_close(s);
    return rc;
}

void tp_st_set_close(tp_st_set *s)
{
    if (!s)
        return;
    for (size_t i = 0; i < s->n_files; i++) {
        tp_st_close(&s->files[i]);
        free(s->file_names[i]);
    }
    free(s->files);
    free(s->file_names);
    free(s->tensors);
    memset(s, 0, sizeof *s);
}

const tp_st_tensor *tp_st_set_find(const tp_st_set *s, const char *name)
{
    tp_st_tensor key = {.name = (char *)name};
    const tp_st_tensor *kp = &key;
    const tp_st_tensor *const *hit =
        bsearch(&kp, s->tensors, s->n_tensors, sizeof *s->tensors, cmp_tensor_ptr_name);
    return hit ? *hit : NULL;
}

/* ------------------------------------------------------------------ write */

/* Integers go in as raw JSON text: cJSON would print doubles, which turn
 * into exponent notation from 1e15 on. */
static cJSON *json_u64(uint64_t v)
{
    char buf[24];
    snprintf(buf, sizeof buf, "%llu", (unsigned long long)v);
    return cJSON_CreateRaw(buf);
}

static bool add_or_free(cJSON *obj, const char *key, cJSON *item)
{
    if (!item)
        return false;
    if (!cJSON_AddItemToObject(obj, key, item)) {
        cJSON_Delete(item);
        return false;
    }
    return true;
}

static bool append_or_free(cJSON *arr, cJSON *item)
{
    if (!item)
        return false;
    if (!cJSON_AddItemToArray(arr, item)) {
        cJSON_Delete(item);
        return false;
    }
    return true;
}

/* Checks the tensor list and computes each tensor's byte size. */
static int check_out_tensors(const char *path, const tp_st_out_tensor *tensors, size_t n,
                             size_t *nbytes, tp_err *err)
{
    for (size_t i = 0; i < n; i++) {
        const tp_st_out_tensor *t = &tensors[i];
        if (!t->name)
            return tp_errorf(err, "%s: tensor #%zu has no name", path, i);
        if (strcmp(t->name, META_KEY) == 0)
            return tp_errorf(err, "%s: a tensor cannot be called __metadata__", path);
        if (t->ndim < 0 || t->ndim > TP_MAX_DIMS)
            return tp_errorf(err, "%s: tensor %s: %d dimensions", path, t->name, t->ndim);
        if (tp_dtype_size(t->dtype) == 0)
            return tp_errorf(err, "%s: tensor %s: invalid dtype", path, t->name);
        if (!tp_tensor_nbytes(t->dtype, t->shape, t->ndim, &nbytes[i]))
            return tp_errorf(err, "%s: tensor %s: shape too large", path, t->name);
        for (int d = 0; d < t->ndim; d++)
            if (t->shape[d] >= (uint64_t)MAX_EXACT_INT)
                return tp_errorf(err, "%s: tensor %s: shape[%d] too large for JSON", path, t->name, d);
    }
    const char **names = malloc((n ? n : 1) * sizeof *names);
    if (!names)
        return tp_errorf(err, "%s: out of memory", path);
    for (size_t i = 0; i < n; i++)
        names[i] = tensors[i].name;
    qsort(names, n, sizeof *names, cmp_str_ptr);
    int rc = 0;
    for (size_t i = 1; i < n && rc == 0; i++)
        if (strcmp(names[i - 1], names[i]) == 0)
            rc = tp_errorf(err, "%s: duplicate tensor name %s", path, names[i]);
    free(names);
    return rc;
}

/* The header text, padded with spaces to a multiple of 8 as the reference
 * writer does (so the data section starts 8-aligned). */
static char *build_header(const char *path, const tp_st_out_tensor *tensors, size_t n,
                          const size_t *nbytes, const char *const *meta_kv, size_t *header_len,
                          uint64_t *data_len, tp_err *err)
{
    cJSON *root = cJSON_CreateObject();
    bool ok = root != NULL;
    if (ok && meta_kv && meta_kv[0]) {
        cJSON *meta = cJSON_CreateObject();
        ok = add_or_free(root, META_KEY, meta);
        for (size_t i = 0; ok && meta_kv[i]; i += 2) {
            if (!meta_kv[i + 1]) {
                cJSON_Delete(root);
                tp_errorf(err, "%s: metadata key %s has no value", path, meta_kv[i]);
                return NULL;
            }
            for (size_t k = 0; k < i; k += 2)
                if (strcmp(meta_kv[k], meta_kv[i]) == 0) {
                    cJSON_Delete(root);
                    tp_errorf(err, "%s: metadata key %s given twice", path, meta_kv[i]);
                    return NULL;
                }
            ok = add_or_free(meta, meta_kv[i], cJSON_CreateString(meta_kv[i + 1]));
        }
    }
    uint64_t off = 0;
    for (size_t i = 0; ok && i < n; i++) {
        const tp_st_out_tensor *t = &tensors[i];
        cJSON *e = cJSON_CreateObject(), *shape = cJSON_CreateArray(), *offs = cJSON_CreateArray();
        ok = e && shape && offs;
        ok = ok && add_or_free(e, "dtype", cJSON_CreateString(tp_dtype_name(t->dtype)));
        for (int d = 0; ok && d < t->ndim; d++)
            ok = append_or_free(shape, json_u64(t->shape[d]));
        ok = ok && append_or_free(offs, json_u64(off)) && append_or_free(offs, json_u64(off + nbytes[i]));
        if (ok) {
            cJSON_AddItemToObject(e, "shape", shape);
            cJSON_AddItemToObject(e, "data_offsets", offs);
            shape = offs = NULL;
            ok = add_or_free(root, t->name, e);
            e = NULL;
        }
        cJSON_Delete(e);
        cJSON_Delete(shape);
        cJSON_Delete(offs);
        off += nbytes[i];
    }
    char *json = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    if (!json) {
        tp_errorf(err, "%s: out of memory building the header", path);
        return NULL;
    }
    size_t len = strlen(json), padded = (len + 7) / 8 * 8;
    char *out = realloc(json, padded + 1);
    if (!out) {
        free(json);
        tp_errorf(err, "%s: out of memory building the header", path);
        return NULL;
    }
    memset(out + len, ' ', padded - len);
    out[padded] = '\0';
    if (padded > TP_ST_MAX_HEADER) {
        free(out);
        tp_errorf(err, "%s: header would be %zu bytes, above the %u limit", path, padded,
                  TP_ST_MAX_HEADER);
        return NULL;
    }
    *header_len = padded;
    *data_len = off;
    return out;
}

int tp_st_write(const char *path, const tp_st_out_tensor *tensors, size_t n,
                const char *const *meta_kv, tp_st_fill_fn fill, void *arg, tp_err *err)
{
    size_t *nbytes = calloc(n ? n : 1, sizeof *nbytes);
    if (!nbytes)
        return tp_errorf(err, "%s: out of memory", path);
    size_t header_len = 0;
    uint64_t data_len = 0, total = 0;
    char *header = NULL, *tmp = NULL;
    uint8_t *map = MAP_FAILED;
    int fd = -1, rc = -1;
    if (check_out_tensors(path, tensors, n, nbytes, err) != 0)
        goto out;
    header = build_header(path, tensors, n, nbytes, meta_kv, &header_len, &data_len, err);
    if (!header)
        goto out;
    if (__builtin_add_overflow((uint64_t)header_len + 8, data_len, &total) || total > SIZE_MAX ||
        total > (uint64_t)INT64_MAX) {
        tp_errorf(err, "%s: file would be too large", path);
        goto out;
    }
    if (asprintf(&tmp, "%s.tmp", path) < 0) {
        tmp = NULL;
        tp_errorf(err, "%s: out of memory", path);
        goto out;
    }
    fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        tp_errorf(err, "%s: cannot create: %s", tmp, strerror(errno));
        goto out;
    }
    /* Reserve the blocks before mapping: a store into a sparse mapping on a
     * full disk is a SIGBUS, not an error we could report. */
    int fe = posix_fallocate(fd, 0, (off_t)total);
    if (fe != 0) {
        tp_errorf(err, "%s: write failed: cannot allocate %llu bytes: %s", tmp,
                  (unsigned long long)total, strerror(fe));
        goto fail;
    }
    map = mmap(NULL, (size_t)total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        tp_errorf(err, "%s: mmap failed: %s", tmp, strerror(errno));
        goto fail;
    }
    for (int i = 0; i < 8; i++)
        map[i] = (uint8_t)((uint64_t)header_len >> (8 * i));
    memcpy(map + 8, header, header_len);
    uint8_t *data = map + 8 + header_len;
    uint64_t off = 0;
    for (size_t i = 0; i < n; i++) {
        if (fill(i, data + off, nbytes[i], arg, err) != 0) {
            tp_err_prefix(err, "%s: tensor %s", path, tensors[i].name);
            goto fail;
        }
        off += nbytes[i];
    }
    if (msync(map, (size_t)total, MS_SYNC) != 0) {
        tp_errorf(err, "%s: write failed: %s", tmp, strerror(errno));
        goto fail;
    }
    munmap(map, (size_t)total);
    map = MAP_FAILED;
    rc = tp_file_commit(fd, tmp, path, err); /* closes fd, removes tmp on failure */
    fd = -1;
    goto out;
fail:
    if (map != MAP_FAILED)
        munmap(map, (size_t)total);
    if (fd >= 0)
        close(fd);
    fd = -1;
    unlink(tmp);
out:
    if (fd >= 0)
        close(fd);
    free(tmp);
    free(header);
    free(nbytes);
    return rc;
}
