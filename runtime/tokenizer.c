/* tokenizer.c - byte-level BPE from a Hugging Face tokenizer.json, doing what
 * the `tokenizers` library does for Qwen2/Qwen3 and Llama-3 style files:
 *
 *   encode: added tokens are cut out of the raw text first (leftmost-longest,
 *           honouring single_word/lstrip/rstrip); the rest is normalised
 *           (NFC/NFD/NFKC/NFKD via utf8proc), tokens marked "normalized" are
 *           cut out of that, then the pre-tokenizer splits it (PCRE2 for the
 *           Split regexes, ByteLevel last), and each piece's bytes are merged
 *           by rank (the lowest-rank adjacent pair first, leftmost on ties).
 *   decode: each id's bytes (the byte-level characters mapped back) are
 *           concatenated and read as UTF-8, invalid bytes becoming U+FFFD.
 *
 * Anything the file configures that we do not implement is refused with a
 * message naming the key, rather than silently tokenising differently.
 * tp_tokenizer_encode() does not add BOS/EOS (add_special_tokens=False).
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>
#include <cJSON.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include "tp_xxhash.h"

#include <stdlib.h>
#include <string.h>

#include "runtime.h"
#include "tokenizer_internal.h"

/* The regex ByteLevel(use_regex=true) splits with (GPT-2's). */
static const char GPT2_SPLIT_REGEX[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/* ------------------------------------------------------------ small utils */

bool tp_tok_buf_append(tp_tok_buf *b, const void *data, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) return false;
        b->p = p;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->n, data, n);
    b->n += n;
    b->p[b->n] = '\0';
    return true;
}

typedef struct i32vec {
    int32_t *v;
    size_t n, cap;
} i32vec;

static bool i32vec_push(i32vec *a, int32_t x)
{
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 64;
        int32_t *v = realloc(a->v, cap * sizeof *v);
        if (!v) return false;
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = x;
    return true;
}

void tp_tok_bytes_to_unicode(uint32_t table[256])
{
    uint32_t next = 256;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        table[b] = printable ? (uint32_t)b : next++;
    }
}

static size_t utf8_put(uint32_t cp, char *out)
{
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

enum { UTF8_OK, UTF8_BAD, UTF8_SHORT };

/* Classifies the sequence starting at s[0] (n >= 1).  *len: its length when
 * OK, the maximal invalid subpart when BAD, n when SHORT (a valid prefix
 * that the end of the buffer cut). */
static int utf8_scan(const uint8_t *s, size_t n, size_t *len)
{
    uint8_t c = s[0];
    if (c < 0x80) { *len = 1; return UTF8_OK; }
    size_t need;
    uint8_t lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c == 0xE0) { need = 2; lo = 0xA0; }
    else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) need = 2;
    else if (c == 0xED) { need = 2; hi = 0x9F; }   /* no surrogates */
    else if (c == 0xF0) { need = 3; lo = 0x90; }   /* no overlongs */
    else if (c >= 0xF1 && c <= 0xF3) need = 3;
    else if (c == 0xF4) { need = 3; hi = 0x8F; }   /* <= U+10FFFF */
    else { *len = 1; return UTF8_BAD; }
    for (size_t i = 1; i <= need; i++) {
        if (i >= n) { *len = n; return UTF8_SHORT; }
        uint8_t l = i == 1 ? lo : 0x80, h = i == 1 ? hi : 0xBF;
        if (s[i] < l || s[i] > h) { *len = i; return UTF8_BAD; }
    }
    *len = need + 1;
    return UTF8_OK;
}

static uint32_t utf8_get(const uint8_t *s, size_t len)
{
    if (len == 1) return s[0];
    if (len == 2) return ((uint32_t)(s[0] & 0x1F) << 6) | (s[1] & 0x3F);
    if (len == 3) return ((uint32_t)(s[0] & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
    return ((uint32_t)(s[0] & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) |
           ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
}

bool tp_tok_utf8_lossy(tp_tok_buf *out, const uint8_t *s, size_t n, bool final, size_t *consumed)
{
    static const char REPLACEMENT[] = "\xEF\xBF\xBD";
    size_t i = 0;
    while (i < n) {
        size_t run = i;   /* copy runs of valid text in one go */
        size_t len = 0;
        int st = UTF8_OK;
        while (run < n && (st = utf8_scan(s + run, n - run, &len)) == UTF8_OK) run += len;
        if (!tp_tok_buf_append(out, s + i, run - i)) return false;
        i = run;
        if (i == n) break;
        if (st == UTF8_SHORT && !final) break;
        if (!tp_tok_buf_append(out, REPLACEMENT, 3)) return false;
        i += len;
    }
    if (consumed) *consumed = i;
    if (!out->p && !tp_tok_buf_append(out, "", 0)) return false;
    return true;
}

size_t tp_utf8_first_invalid(const char *text, size_t n)
{
    const uint8_t *s = (const uint8_t *)text;
    size_t i = 0, len;
    while (i < n) {
        if (s[i] < 0x80) { i++; continue; }
        if (utf8_scan(s + i, n - i, &len) != UTF8_OK) return i;
        i += len;
    }
    return n;
}

/* Unicode White_Space (what Rust's char::is_whitespace and regex \s use). */
static bool is_white_space(uint32_t cp)
{
    return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
           cp == 0x205F || cp == 0x3000;
}

/* Rust regex's Unicode \w: letters, marks, decimal digits, connector
 * punctuation, joiners (letter numbers too, being Alphabetic). */
static bool is_word_char(uint32_t cp)
{
    if (cp == 0x200C || cp == 0x200D) return true;
    switch (utf8proc_category((utf8proc_int32_t)cp)) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ME: case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_PC:
        return true;
    default:
        return false;
    }
}

/* The code point that ends s[0..n) (valid UTF-8, n > 0). */
static uint32_t last_cp(const uint8_t *s, size_t n, size_t *len)
{
    size_t i = n - 1;
    while (i > 0 && (s[i] & 0xC0) == 0x80 && n - i < 4) i--;
    *len = n - i;
    return utf8_get(s + i, n - i);
}

static uint32_t first_cp(const uint8_t *s, size_t n, size_t *len)
{
    utf8_scan(s, n, len);
    return utf8_get(s, *len);
}

/* ------------------------------------------------------------- hash maps */

/* Slots for n keys in an open-addressing table: at most 3/4 full, so
 * linear probes stay short, and with power-of-two sizes a table ends up
 * between 3/8 and 3/4 full (Qwen3's 151k tokens: 262144 slots, not 524288). */
static size_t hash_min_slots(size_t n) { return n + n / 3 + 1; }

/* Strings -> id.  A slot holds the key's hash (high 32 bits) and id + 1
 * (0: empty); keys live in the owner's per-id string table, compared only
 * when the hashes agree (which keeps loading fast: fewer cache misses). */
typedef struct strmap {
    uint64_t *slots;
    size_t mask;
} strmap;

static uint64_t str_hash(const void *s, size_t n) { return XXH3_64bits(s, n); }

static bool strmap_init(strmap *m, size_t n_keys)
{
    size_t cap = 16;
    while (cap < hash_min_slots(n_keys)) cap *= 2;
    m->slots = calloc(cap, sizeof *m->slots);
    m->mask = cap - 1;
    return m->slots != NULL;
}

typedef struct tok_str {
    const char *s;   /* NULL: id not used */
    uint32_t len;
} tok_str;

/* Returns the id of s, or -1; on -1, *slot_out gets the slot value to store
 * (strmap_value) at index *slot_out. */
static int32_t strmap_find(const strmap *m, const tok_str *strs, const char *s, size_t n, size_t *slot_out)
{
    uint64_t h = str_hash(s, n);
    uint64_t tag = h & 0xFFFFFFFF00000000ull;
    size_t i = h & m->mask;
    for (;;) {
        uint64_t v = m->slots[i];
        if (v == 0) { if (slot_out) *slot_out = i; return -1; }
        if ((v & 0xFFFFFFFF00000000ull) == tag) {
            uint32_t id = (uint32_t)v - 1;
            const tok_str *t = &strs[id];
            if (t->len == n && memcmp(t->s, s, n) == 0) return (int32_t)id;
        }
        i = (i + 1) & m->mask;
    }
}

static void strmap_store(strmap *m, size_t slot, const char *s, size_t n, int32_t id)
{
    m->slots[slot] = (str_hash(s, n) & 0xFFFFFFFF00000000ull) | ((uint64_t)(uint32_t)id + 1);
}

/* (left id, right id) -> (rank, merged id). */
typedef struct mergemap {
    uint64_t *keys;       /* key | MERGE_USED; 0: empty */
    uint32_t *rank;
    int32_t *merged;
    size_t mask;
} mergemap;

#define MERGE_USED (1ull << 63)

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27; x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static bool mergemap_init(mergemap *m, size_t n)
{
    size_t cap = 16;
    while (cap < hash_min_slots(n)) cap *= 2;
    m->keys = calloc(cap, sizeof *m->keys);
    m->rank = malloc(cap * sizeof *m->rank);
    m->merged = malloc(cap * sizeof *m->merged);
    m->mask = cap - 1;
    return m->keys && m->rank && m->merged;
}

static size_t mergemap_slot(const mergemap *m, int32_t a, int32_t b)
{
    uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) | MERGE_USED;
    size_t i = mix64(key) & m->mask;
    while (m->keys[i] != 0 && m->keys[i] != key) i = (i + 1) & m->mask;
    return i;
}

static bool mergemap_get(const mergemap *m, int32_t a, int32_t b, uint32_t *rank, int32_t *merged)
{
    size_t i = mergemap_slot(m, a, b);
    if (m->keys[i] == 0) return false;
    *rank = m->rank[i];
    *merged = m->merged[i];
    return true;
}

/* ---------------------------------------------------------- the tokenizer */

enum { NORM_NFC, NORM_NFD, NORM_NFKC, NORM_NFKD };
#define MAX_NORM_STEPS 8
#define MAX_PRE_STEPS 8

typedef struct pre_step {
    enum { PRE_SPLIT, PRE_BYTELEVEL } kind;
    pcre2_code *re;           /* PRE_SPLIT, or PRE_BYTELEVEL with use_regex */
    bool add_prefix_space;    /* PRE_BYTELEVEL */
} pre_step;

typedef struct added_tok {
    char *content;
    size_t len;
    char *pattern;            /* what is matched: content, normalised when normalized */
    size_t pattern_len;
    int32_t id;
    bool special, single_word, lstrip, rstrip, normalized;
} added_tok;

struct tp_tokenizer {
    char *name;
    /* model */
    size_t n_ids;             /* largest id + 1 (vocab and added tokens) */
    size_t n_vocab;           /* largest model.vocab id + 1 */
    size_t model_vocab;       /* tp_tokenizer_set_model_vocab; 0: not set */
    tok_str *vocab;           /* [n_vocab] byte-level token strings of the model vocab */
    char *vocab_arena;
    strmap vocab_map;
    mergemap merges;
    uint32_t byte_cp[256];    /* bytes_to_unicode() */
    int32_t byte_tok[256];    /* id of each byte's one-character token, -1: none */
    int32_t unk_id;           /* -1: none */
    bool fuse_unk, ignore_merges;
    /* normaliser and pre-tokenizer */
    int n_norm;
    int norm[MAX_NORM_STEPS];
    int n_pre;
    pre_step pre[MAX_PRE_STEPS];
    /* added tokens */
    size_t n_added;
    added_tok *added;
    uint8_t first_byte_raw[32], first_byte_norm[32];   /* bitsets of patterns' first bytes */
    /* decoding: every id's bytes */
    uint32_t *dec_off, *dec_len;
    uint8_t *dec_flags;       /* DEC_KNOWN | DEC_SPECIAL */
    uint8_t *dec_arena;
};

enum { DEC_KNOWN = 1, DEC_SPECIAL = 2 };

size_t tp_tokenizer_vocab_size(const tp_tokenizer *tok) { return tok->n_ids; }

void tp_tokenizer_set_model_vocab(tp_tokenizer *tok, size_t model_vocab) { tok->model_vocab = model_vocab; }

void tp_tokenizer_free(tp_tokenizer *tok)
{
    if (!tok) return;
    free(tok->name);
    free(tok->vocab);
    free(tok->vocab_arena);
    free(tok->vocab_map.slots);
    free(tok->merges.keys);
    free(tok->merges.rank);
    free(tok->merges.merged);
    for (int i = 0; i < tok->n_pre; i++) pcre2_code_free(tok->pre[i].re);
    for (size_t i = 0; i < tok->n_added; i++) {
        if (tok->added[i].pattern != tok->added[i].content) free(tok->added[i].pattern);
        free(tok->added[i].content);
    }
    free(tok->added);
    free(tok->dec_off);
    free(tok->dec_len);
    free(tok->dec_flags);
    free(tok->dec_arena);
    free(tok);
}

int32_t tp_tokenizer_token_id(const tp_tokenizer *tok, const char *token)
{
    size_t n = strlen(token);
    for (size_t i = 0; i < tok->n_added; i++)
        if (tok->added[i].len == n && memcmp(tok->added[i].content, token, n) == 0) return tok->added[i].id;
    return strmap_find(&tok->vocab_map, tok->vocab, token, n, NULL);
}

/* --------------------------------------------------------------- loading */

static const char *json_type_name(const cJSON *j)
{
    if (!j) return "missing";
    if (cJSON_IsNull(j)) return "null";
    if (cJSON_IsBool(j)) return "a boolean";
    if (cJSON_IsNumber(j)) return "a number";
    if (cJSON_IsString(j)) return "a string";
    if (cJSON_IsArray(j)) return "an array";
    if (cJSON_IsObject(j)) return "an object";
    return "invalid";
}

/* Optional boolean: absent or null gives def. */
static int get_bool(const cJSON *obj, const char *key, bool def, bool *out, const char *name,
                    const char *where, tp_err *err)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!j || cJSON_IsNull(j)) { *out = def; return 0; }
    if (!cJSON_IsBool(j))
        return tp_errorf(err, "%s: %s.%s must be a boolean, not %s", name, where, key, json_type_name(j));
    *out = cJSON_IsTrue(j);
    return 0;
}

/* Absent, null or "" is fine; anything else is a feature we do not have. */
static int require_empty_string(const cJSON *obj, const char *key, const char *name, tp_err *err)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!j || cJSON_IsNull(j) || (cJSON_IsString(j) && j->valuestring[0] == '\0')) return 0;
    return tp_errorf(err, "%s: model.%s is set; only byte-level BPE without it is supported", name, key);
}

static int parse_vocab(tp_tokenizer *tok, const cJSON *vocab, const char *name, tp_err *err)
{
    if (!cJSON_IsObject(vocab))
        return tp_errorf(err, "%s: model.vocab must be an object, not %s", name, json_type_name(vocab));
    size_t count = 0, bytes = 0;
    int64_t max_id = -1;
    for (const cJSON *e = vocab->child; e; e = e->next) {
        double v = e->valuedouble;
        if (!cJSON_IsNumber(e) || v < 0 || v > TP_TOK_MAX_ID || v != (double)(int64_t)v)
            return tp_errorf(err, "%s: model.vocab[\"%s\"]: id must be an integer in [0, %d]", name,
                             e->string, TP_TOK_MAX_ID);
        if ((int64_t)v > max_id) max_id = (int64_t)v;
        count++;
        bytes += strlen(e->string) + 1;
    }
    if (count == 0) return tp_errorf(err, "%s: model.vocab is empty", name);
    tok->n_ids = tok->n_vocab = (size_t)max_id + 1;
    tok->vocab = calloc(tok->n_vocab, sizeof *tok->vocab);
    tok->vocab_arena = malloc(bytes);
    if (!tok->vocab || !tok->vocab_arena || !strmap_init(&tok->vocab_map, count))
        return tp_errorf(err, "%s: out of memory for %zu vocab entries", name, count);
    char *arena = tok->vocab_arena;
    for (const cJSON *e = vocab->child; e; e = e->next) {
        int32_t id = (int32_t)e->valuedouble;
        size_t len = strlen(e->string), slot;
        if (tok->vocab[id].s)
            return tp_errorf(err, "%s: model.vocab: id %d is given to both \"%s\" and \"%s\"", name, (int)id,
                             tok->vocab[id].s, e->string);
        memcpy(arena, e->string, len + 1);
        if (strmap_find(&tok->vocab_map, tok->vocab, arena, len, &slot) >= 0)
            return tp_errorf(err, "%s: model.vocab: \"%s\" appears twice", name, e->string);
        tok->vocab[id].s = arena;
        tok->vocab[id].len = (uint32_t)len;
        strmap_store(&tok->vocab_map, slot, arena, len, id);
        arena += len + 1;
    }
    return 0;
}

static int parse_merges(tp_tokenizer *tok, const cJSON *merges, const char *name, tp_err *err)
{
    if (!cJSON_IsArray(merges))
        return tp_errorf(err, "%s: model.merges must be an array, not %s", name, json_type_name(merges));
    size_t n = (size_t)cJSON_GetArraySize(merges);
    if (!mergemap_init(&tok->merges, n)) return tp_errorf(err, "%s: out of memory for %zu merges", name, n);
    tp_tok_buf joined = {0};
    size_t rank = 0;
    int rc = 0;
    for (const cJSON *m = merges->child; m && rc == 0; m = m->next, rank++) {
        const char *a, *b;
        size_t alen, blen;
        if (cJSON_IsString(m)) {          /* "a b" (tokenizers < 0.20 writes these) */
            const char *s = m->valuestring, *sp = strchr(s, ' ');
            if (!sp || sp == s || sp[1] == '\0' || strchr(sp + 1, ' ')) {
                rc = tp_errorf(err, "%s: model.merges[%zu]: \"%s\" is not two tokens separated by one space",
                               name, rank, s);
                break;
            }
            a = s; alen = (size_t)(sp - s);
            b = sp + 1; blen = strlen(b);
        } else if (cJSON_IsArray(m) && cJSON_GetArraySize(m) == 2 && cJSON_IsString(m->child) &&
                   cJSON_IsString(m->child->next)) {   /* ["a", "b"] */
            a = m->child->valuestring; alen = strlen(a);
            b = m->child->next->valuestring; blen = strlen(b);
        } else {
            rc = tp_errorf(err, "%s: model.merges[%zu] must be \"a b\" or [\"a\", \"b\"]", name, rank);
            break;
        }
        int32_t ia = strmap_find(&tok->vocab_map, tok->vocab, a, alen, NULL);
        int32_t ib = strmap_find(&tok->vocab_map, tok->vocab, b, blen, NULL);
        joined.n = 0;
        if (!tp_tok_buf_append(&joined, a, alen) || !tp_tok_buf_append(&joined, b, blen)) {
            rc = tp_errorf(err, "%s: out of memory", name);
            break;
        }
        int32_t iab = strmap_find(&tok->vocab_map, tok->vocab, joined.p, joined.n, NULL);
        if (ia < 0 || ib < 0 || iab < 0) {
            rc = tp_errorf(err, "%s: model.merges[%zu]: \"%.*s\" is not in model.vocab", name, rank,
                           (int)(ia < 0 ? alen : ib < 0 ? blen : joined.n),
                           ia < 0 ? a : ib < 0 ? b : joined.p);
            break;
        }
        /* A repeated pair keeps its later rank, as the HashMap HF builds does. */
        size_t slot = mergemap_slot(&tok->merges, ia, ib);
        tok->merges.keys[slot] = ((uint64_t)(uint32_t)ia << 32 | (uint32_t)ib) | MERGE_USED;
        tok->merges.rank[slot] = (uint32_t)rank;
        tok->merges.merged[slot] = iab;
    }
    free(joined.p);
    return rc;
}

static int parse_model(tp_tokenizer *tok, const cJSON *model, const char *name, tp_err *err)
{
    if (!cJSON_IsObject(model))
        return tp_errorf(err, "%s: \"model\" must be an object, not %s", name, json_type_name(model));
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(model, "type");
    if (!cJSON_IsString(type) || strcmp(type->valuestring, "BPE") != 0)
        return tp_errorf(err, "%s: model.type is %s%s%s; only \"BPE\" is supported", name,
                         cJSON_IsString(type) ? "\"" : "", cJSON_IsString(type) ? type->valuestring : json_type_name(type),
                         cJSON_IsString(type) ? "\"" : "");
    const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(model, "dropout");
    if (dropout && !cJSON_IsNull(dropout) && !(cJSON_IsNumber(dropout) && dropout->valuedouble == 0))
        return tp_errorf(err, "%s: model.dropout is set; BPE dropout is not supported", name);
    bool byte_fallback;
    if (get_bool(model, "byte_fallback", false, &byte_fallback, name, "model", err) ||
        get_bool(model, "fuse_unk", false, &tok->fuse_unk, name, "model", err) ||
        get_bool(model, "ignore_merges", false, &tok->ignore_merges, name, "model", err) ||
        require_empty_string(model, "continuing_subword_prefix", name, err) ||
        require_empty_string(model, "end_of_word_suffix", name, err))
        return -1;
    if (byte_fallback)
        return tp_errorf(err, "%s: model.byte_fallback is true; only byte-level BPE without it is supported", name);
    if (parse_vocab(tok, cJSON_GetObjectItemCaseSensitive(model, "vocab"), name, err) ||
        parse_merges(tok, cJSON_GetObjectItemCaseSensitive(model, "merges"), name, err))
        return -1;
    tok->unk_id = -1;
    const cJSON *unk = cJSON_GetObjectItemCaseSensitive(model, "unk_token");
    if (unk && !cJSON_IsNull(unk)) {
        if (!cJSON_IsString(unk)) return tp_errorf(err, "%s: model.unk_token must be a string or null", name);
        tok->unk_id = strmap_find(&tok->vocab_map, tok->vocab, unk->valuestring, strlen(unk->valuestring), NULL);
        if (tok->unk_id < 0)
            return tp_errorf(err, "%s: model.unk_token \"%s\" is not in model.vocab", name, unk->valuestring);
    }
    tp_tok_bytes_to_unicode(tok->byte_cp);
    for (int b = 0; b < 256; b++) {
        char ch[4];
        size_t len = utf8_put(tok->byte_cp[b], ch);
        tok->byte_tok[b] = strmap_find(&tok->vocab_map, tok->vocab, ch, len, NULL);
    }
    return 0;
}

static int add_norm_step(tp_tokenizer *tok, const cJSON *n, const char *where, const char *name, tp_err *err)
{
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(n, "type");
    if (!cJSON_IsString(type)) return tp_errorf(err, "%s: %s.type must be a string", name, where);
    const char *t = type->valuestring;
    if (strcmp(t, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "normalizers");
        if (!cJSON_IsArray(list)) return tp_errorf(err, "%s: %s.normalizers must be an array", name, where);
        int i = 0;
        for (const cJSON *e = list->child; e; e = e->next, i++) {
            char sub[128];
            snprintf(sub, sizeof sub, "%s.normalizers[%d]", where, i);
            if (add_norm_step(tok, e, sub, name, err)) return -1;
        }
        return 0;
    }
    int kind;
    if (strcmp(t, "NFC") == 0) kind = NORM_NFC;
    else if (strcmp(t, "NFD") == 0) kind = NORM_NFD;
    else if (strcmp(t, "NFKC") == 0) kind = NORM_NFKC;
    else if (strcmp(t, "NFKD") == 0) kind = NORM_NFKD;
    else return tp_errorf(err, "%s: %s.type \"%s\" is not supported (NFC, NFD, NFKC, NFKD, Sequence)", name, where, t);
    if (tok->n_norm == MAX_NORM_STEPS) return tp_errorf(err, "%s: %s: too many normalizers", name, where);
    tok->norm[tok->n_norm++] = kind;
    return 0;
}

static int compile_regex(pcre2_code **out, const char *pattern, bool literal, const char *where,
                         const char *name, tp_err *err)
{
    int code;
    PCRE2_SIZE off;
    uint32_t opts = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
    *out = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED, opts, &code, &off, NULL);
    if (!*out) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        return tp_errorf(err, "%s: %s: regex does not compile at offset %zu: %s", name, where, (size_t)off,
                         (const char *)msg);
    }
    pcre2_jit_compile(*out, PCRE2_JIT_COMPLETE);   /* falls back to the interpreter when JIT is missing */
    return 0;
}

static int add_pre_step(tp_tokenizer *tok, const cJSON *p, const char *where, const char *name, tp_err *err)
{
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(p, "type");
    if (!cJSON_IsString(type)) return tp_errorf(err, "%s: %s.type must be a string", name, where);
    const char *t = type->valuestring;
    if (tok->n_pre > 0 && tok->pre[tok->n_pre - 1].kind == PRE_BYTELEVEL)
        return tp_errorf(err, "%s: %s: \"%s\" after ByteLevel is not supported (ByteLevel must come last)",
                         name, where, t);
    if (tok->n_pre == MAX_PRE_STEPS) return tp_errorf(err, "%s: %s: too many pre-tokenizers", name, where);
    pre_step *st = &tok->pre[tok->n_pre];
    if (strcmp(t, "Split") == 0) {
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(p, "pattern");
        const cJSON *re = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
        const cJSON *lit = cJSON_GetObjectItemCaseSensitive(pat, "String");
        const cJSON *behavior = cJSON_GetObjectItemCaseSensitive(p, "behavior");
        bool invert;
        if (!cJSON_IsString(re) && !cJSON_IsString(lit))
            return tp_errorf(err, "%s: %s.pattern must be {\"Regex\": ...} or {\"String\": ...}", name, where);
        if (!cJSON_IsString(behavior) || strcmp(behavior->valuestring, "Isolated") != 0)
            return tp_errorf(err, "%s: %s.behavior %s%s%s is not supported (only \"Isolated\")", name, where,
                             cJSON_IsString(behavior) ? "\"" : "",
                             cJSON_IsString(behavior) ? behavior->valuestring : json_type_name(behavior),
                             cJSON_IsString(behavior) ? "\"" : "");
        if (get_bool(p, "invert", false, &invert, name, where, err)) return -1;
        if (invert) return tp_errorf(err, "%s: %s.invert is true; not supported", name, where);
        char sub[160];
        snprintf(sub, sizeof sub, "%s.pattern", where);
        if (compile_regex(&st->re, cJSON_IsString(re) ? re->valuestring : lit->valuestring, !cJSON_IsString(re),
                          sub, name, err))
            return -1;
        st->kind = PRE_SPLIT;
    } else if (strcmp(t, "ByteLevel") == 0) {
        bool use_regex;
        /* Defaults are HF's: add_prefix_space true, use_regex true. */
        if (get_bool(p, "add_prefix_space", true, &st->add_prefix_space, name, where, err) ||
            get_bool(p, "use_regex", true, &use_regex, name, where, err))
            return -1;
        st->re = NULL;
        if (use_regex && compile_regex(&st->re, GPT2_SPLIT_REGEX, false, where, name, err)) return -1;
        st->kind = PRE_BYTELEVEL;
    } else {
        return tp_errorf(err, "%s: %s.type \"%s\" is not supported (Split, ByteLevel, Sequence)", name, where, t);
    }
    tok->n_pre++;
    return 0;
}

static int parse_pre_tokenizer(tp_tokenizer *tok, const cJSON *p, const char *name, tp_err *err)
{
    if (!cJSON_IsObject(p))
        return tp_errorf(err, "%s: pre_tokenizer is %s; byte-level BPE needs a ByteLevel pre_tokenizer", name,
                         json_type_name(p));
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(p, "type");
    if (cJSON_IsString(type) && strcmp(type->valuestring, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers");
        if (!cJSON_IsArray(list)) return tp_errorf(err, "%s: pre_tokenizer.pretokenizers must be an array", name);
        int i = 0;
        for (const cJSON *e = list->child; e; e = e->next, i++) {
            char where[64];
            snprintf(where, sizeof where, "pre_tokenizer.pretokenizers[%d]", i);
            if (add_pre_step(tok, e, where, name, err)) return -1;
        }
    } else if (add_pre_step(tok, p, "pre_tokenizer", name, err)) {
        return -1;
    }
    if (tok->n_pre == 0 || tok->pre[tok->n_pre - 1].kind != PRE_BYTELEVEL)
        return tp_errorf(err, "%s: pre_tokenizer has no ByteLevel step; only byte-level BPE is supported", name);
    return 0;
}

static int parse_decoder(const cJSON *d, const char *name, tp_err *err)
{
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(d, "type");
    if (!cJSON_IsObject(d) || !cJSON_IsString(type) || strcmp(type->valuestring, "ByteLevel") != 0)
        return tp_errorf(err, "%s: decoder is %s%s%s; only \"ByteLevel\" is supported", name,
                         cJSON_IsString(type) ? "\"" : "", cJSON_IsString(type) ? type->valuestring : json_type_name(d),
                         cJSON_IsString(type) ? "\"" : "");
    return 0;
}

/* Runs the normaliser over s[0..n) (valid UTF-8) into a malloc'd string. */
static int normalize(const tp_tokenizer *tok, const char *s, size_t n, char **out, size_t *out_len, tp_err *err)
{
    char *cur = malloc(n + 1);
    if (!cur) return tp_errorf(err, "%s: out of memory normalising %zu bytes", tok->name, n);
    memcpy(cur, s, n);
    cur[n] = '\0';
    size_t len = n;
    for (int i = 0; i < tok->n_norm; i++) {
        int opt = UTF8PROC_STABLE;
        switch (tok->norm[i]) {
        case NORM_NFC: opt |= UTF8PROC_COMPOSE; break;
        case NORM_NFD: opt |= UTF8PROC_DECOMPOSE; break;
        case NORM_NFKC: opt |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT; break;
        default: opt |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT; break;
        }
        utf8proc_uint8_t *res = NULL;
        utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)cur, (utf8proc_ssize_t)len, &res,
                                          (utf8proc_option_t)opt);
        free(cur);
        if (r < 0) return tp_errorf(err, "%s: normaliser: %s", tok->name, utf8proc_errmsg(r));
        cur = (char *)res;
        len = (size_t)r;
    }
    *out = cur;
    *out_len = len;
    return 0;
}

static int parse_added_tokens(tp_tokenizer *tok, const cJSON *list, const char *name, tp_err *err)
{
    if (!list || cJSON_IsNull(list)) return 0;
    if (!cJSON_IsArray(list))
        return tp_errorf(err, "%s: added_tokens must be an array, not %s", name, json_type_name(list));
    size_t n = (size_t)cJSON_GetArraySize(list);
    tok->added = calloc(n ? n : 1, sizeof *tok->added);
    if (!tok->added) return tp_errorf(err, "%s: out of memory", name);
    size_t i = 0;
    for (const cJSON *e = list->child; e; e = e->next, i++) {
        char where[64];
        snprintf(where, sizeof where, "added_tokens[%zu]", i);
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(e, "content");
        if (!cJSON_IsObject(e) || !cJSON_IsString(content))
            return tp_errorf(err, "%s: %s.content must be a string", name, where);
        double v = cJSON_IsNumber(id) ? id->valuedouble : -1;
        if (v < 0 || v > TP_TOK_MAX_ID || v != (double)(int64_t)v)
            return tp_errorf(err, "%s: %s (\"%s\"): id must be an integer in [0, %d]", name, where,
                             content->valuestring, TP_TOK_MAX_ID);
        added_tok a = {.id = (int32_t)v};
        if (get_bool(e, "special", false, &a.special, name, where, err) ||
            get_bool(e, "single_word", false, &a.single_word, name, where, err) ||
            get_bool(e, "lstrip", false, &a.lstrip, name, where, err) ||
            get_bool(e, "rstrip", false, &a.rstrip, name, where, err) ||
            get_bool(e, "normalized", !a.special, &a.normalized, name, where, err))
            return -1;
        a.len = strlen(content->valuestring);
        if (a.len == 0) continue;   /* HF ignores empty added tokens */
        if (tp_utf8_first_invalid(content->valuestring, a.len) != a.len)
            return tp_errorf(err, "%s: %s.content is not valid UTF-8", name, where);
        /* HF keeps the model's id for a token the vocab already has; a file that
         * says otherwise is ambiguous, so refuse it. */
        int32_t in_vocab = strmap_find(&tok->vocab_map, tok->vocab, content->valuestring, a.len, NULL);
        if (in_vocab >= 0 && in_vocab != a.id)
            return tp_errorf(err, "%s: %s: \"%s\" has id %d but model.vocab gives it %d", name, where,
                             content->valuestring, (int)a.id, (int)in_vocab);
        if (in_vocab < 0 && (size_t)a.id < tok->n_vocab && tok->vocab[a.id].s)
            return tp_errorf(err, "%s: %s: id %d of \"%s\" is already model.vocab's \"%s\"", name, where, (int)a.id,
                             content->valuestring, tok->vocab[a.id].s);
        for (size_t k = 0; k < tok->n_added; k++) {
            if (tok->added[k].id == a.id)
                return tp_errorf(err, "%s: %s: id %d is used twice", name, where, (int)a.id);
            if (tok->added[k].len == a.len && memcmp(tok->added[k].content, content->valuestring, a.len) == 0)
                return tp_errorf(err, "%s: %s: \"%s\" appears twice", name, where, content->valuestring);
        }
        if (!(a.content = strdup(content->valuestring))) return tp_errorf(err, "%s: out of memory", name);
        a.pattern = a.content;
        a.pattern_len = a.len;
        tok->added[tok->n_added++] = a;
        if ((size_t)a.id >= tok->n_ids) tok->n_ids = (size_t)a.id + 1;
    }
    /* Tokens marked normalized are matched in the normalised text, so their
     * pattern is their normalised content (as HF's refresh_added_tokens). */
    for (size_t k = 0; k < tok->n_added; k++) {
        added_tok *a = &tok->added[k];
        if (!a->normalized || tok->n_norm == 0) continue;
        char *p;
        size_t plen;
        if (normalize(tok, a->content, a->len, &p, &plen, err)) return -1;
        a->pattern = p;
        a->pattern_len = plen;
    }
    for (size_t k = 0; k < tok->n_added; k++) {
        uint8_t b = (uint8_t)tok->added[k].pattern[0];
        if (tok->added[k].pattern_len == 0) continue;
        uint8_t *set = tok->added[k].normalized ? tok->first_byte_norm : tok->first_byte_raw;
        set[b >> 3] |= (uint8_t)(1u << (b & 7));
    }
    return 0;
}

/* Precomputes every id's decoded bytes: the byte-level characters mapped back
 * to bytes, or the token's own UTF-8 when a character is not one of the 256
 * (what HF's ByteLevel decoder does).  Added tokens go through the same
 * decoder in HF, so they do here too. */
static int build_decoder(tp_tokenizer *tok, tp_err *err)
{
    uint32_t b2u[256];
    int16_t u2b[512];
    tp_tok_bytes_to_unicode(b2u);
    for (int i = 0; i < 512; i++) u2b[i] = -1;
    for (int b = 0; b < 256; b++) u2b[b2u[b]] = (int16_t)b;

    const char **strs = calloc(tok->n_ids, sizeof *strs);
    size_t *lens = calloc(tok->n_ids, sizeof *lens);
    tok->dec_off = calloc(tok->n_ids, sizeof *tok->dec_off);
    tok->dec_len = calloc(tok->n_ids, sizeof *tok->dec_len);
    tok->dec_flags = calloc(tok->n_ids, 1);
    if (!strs || !lens || !tok->dec_off || !tok->dec_len || !tok->dec_flags) {
        free(strs); free(lens);
        return tp_errorf(err, "%s: out of memory", tok->name);
    }
    size_t total = 0;
    for (size_t id = 0; id < tok->n_vocab; id++)
        if (tok->vocab[id].s) { strs[id] = tok->vocab[id].s; lens[id] = tok->vocab[id].len; }
    for (size_t k = 0; k < tok->n_added; k++) {
        strs[tok->added[k].id] = tok->added[k].content;
        lens[tok->added[k].id] = tok->added[k].len;
        tok->dec_flags[tok->added[k].id] |= tok->added[k].special ? DEC_SPECIAL : 0;
    }
    for (size_t id = 0; id < tok->n_ids; id++) total += lens[id];
    if (total > UINT32_MAX) {
        free(strs); free(lens);
        return tp_errorf(err, "%s: vocabulary strings too large", tok->name);
    }
    tok->dec_arena = malloc(total ? total : 1);
    if (!tok->dec_arena) {
        free(strs); free(lens);
        return tp_errorf(err, "%s: out of memory", tok->name);
    }
    size_t off = 0;
    for (size_t id = 0; id < tok->n_ids; id++) {
        if (!strs[id]) continue;
        const uint8_t *s = (const uint8_t *)strs[id];
        size_t n = lens[id], i = 0, out = off, len;
        bool all_mapped = true;
        while (i < n) {
            if (utf8_scan(s + i, n - i, &len) != UTF8_OK) { all_mapped = false; break; }
            uint32_t cp = utf8_get(s + i, len);
            if (cp >= 512 || u2b[cp] < 0) { all_mapped = false; break; }
            tok->dec_arena[out++] = (uint8_t)u2b[cp];
            i += len;
        }
        if (!all_mapped) {
            memcpy(tok->dec_arena + off, s, n);
            out = off + n;
        }
        tok->dec_off[id] = (uint32_t)off;
        tok->dec_len[id] = (uint32_t)(out - off);
        tok->dec_flags[id] |= DEC_KNOWN;
        off = out;
    }
    free(strs);
    free(lens);
    return 0;
}

/* The parsed tree of a large tokenizer.json is ~60 MB of small blocks
 * (Qwen3: 151k vocab members, 151k merge arrays of two strings).  glibc
 * keeps freed small blocks in its heap, and the tables built meanwhile sit
 * between them, so the heap cannot shrink from its top: without a trim the
 * whole tree stays resident for the life of the process (and in tprun's
 * peak RSS).  malloc_trim hands every free page back. */
static void release_freed_heap(void)
{
#ifdef __GLIBC__
    malloc_trim(0);
#endif
}

int tp_tokenizer_load_mem(tp_tokenizer **out, const char *json, size_t len, const char *name, tp_err *err)
{
    *out = NULL;
    if (!name) name = "tokenizer.json";
    if (len > TP_TOK_MAX_JSON) return tp_errorf(err, "%s: %zu bytes is larger than the %u-byte limit", name, len, TP_TOK_MAX_JSON);
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        size_t off = at && at >= json && at <= json + len ? (size_t)(at - json) : 0;
        return tp_errorf(err, "%s: not valid JSON (near byte %zu)", name, off);
    }
    tp_tokenizer *tok = calloc(1, sizeof *tok);
    if (!tok || !(tok->name = strdup(name))) {
        cJSON_Delete(root);
        free(tok);
        return tp_errorf(err, "%s: out of memory", name);
    }
    int rc = -1;
    const cJSON *normalizer = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
    if (!cJSON_IsObject(root)) {
        tp_errorf(err, "%s: top level must be an object", name);
    } else if (parse_model(tok, cJSON_GetObjectItemCaseSensitive(root, "model"), name, err)) {
    } else if (normalizer && !cJSON_IsNull(normalizer) && add_norm_step(tok, normalizer, "normalizer", name, err)) {
    } else if (parse_pre_tokenizer(tok, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), name, err)) {
    } else if (parse_decoder(cJSON_GetObjectItemCaseSensitive(root, "decoder"), name, err)) {
    } else if (parse_added_tokens(tok, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"), name, err)) {
    } else if (build_decoder(tok, err)) {
    } else {
        rc = 0;
    }
    cJSON_Delete(root);
    release_freed_heap();
    if (rc) {
        tp_tokenizer_free(tok);
        return -1;
    }
    *out = tok;
    return 0;
}

int tp_tokenizer_load(tp_tokenizer **tok, const char *path, tp_err *err)
{
    *tok = NULL;
    char *json;
    size_t len;
    if (tp_read_file_zst(path, TP_TOK_MAX_JSON, &json, &len, err)) return -1;
    int rc = tp_tokenizer_load_mem(tok, json, len, path, err);
    free(json);
    return rc;
}

/* -------------------------------------------------------------- encoding */

typedef struct merge_cand {
    uint32_t rank;
    int32_t pos;
    int32_t merged;
} merge_cand;

/* Everything an encode writes lives here, never in the tokenizer: encodes
 * run in several threads at once on one tokenizer (runtime.h). */
typedef struct enc_ctx {
    const tp_tokenizer *tok;
    pcre2_match_data *md;
    i32vec *out;
    tp_err *err;
    /* BPE scratch */
    int32_t *sym, *prev, *next;
    size_t sym_cap;
    merge_cand *heap;
    size_t heap_n, heap_cap;
    tp_tok_buf scratch;
} enc_ctx;

static bool cand_less(const merge_cand *a, const merge_cand *b)
{
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static bool heap_push(enc_ctx *c, merge_cand m)
{
    if (c->heap_n == c->heap_cap) {
        size_t cap = c->heap_cap ? c->heap_cap * 2 : 64;
        merge_cand *h = realloc(c->heap, cap * sizeof *h);
        if (!h) return false;
        c->heap = h;
        c->heap_cap = cap;
    }
    size_t i = c->heap_n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!cand_less(&m, &c->heap[parent])) break;
        c->heap[i] = c->heap[parent];
        i = parent;
    }
    c->heap[i] = m;
    return true;
}

static merge_cand heap_pop(enc_ctx *c)
{
    merge_cand top = c->heap[0], last = c->heap[--c->heap_n];
    size_t i = 0, n = c->heap_n;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= n) break;
        if (child + 1 < n && cand_less(&c->heap[child + 1], &c->heap[child])) child++;
        if (!cand_less(&c->heap[child], &last)) break;
        c->heap[i] = c->heap[child];
        i = child;
    }
    if (n) c->heap[i] = last;
    return top;
}

static bool push_pair(enc_ctx *c, int32_t left)
{
    int32_t right = c->next[left];
    uint32_t rank;
    int32_t merged;
    if (right < 0 || !mergemap_get(&c->tok->merges, c->sym[left], c->sym[right], &rank, &merged)) return true;
    return heap_push(c, (merge_cand){rank, left, merged});
}

static int oom(enc_ctx *c) { return tp_errorf(c->err, "%s: out of memory while encoding", c->tok->name); }

/* One pre-tokenized piece: its bytes, merged by rank.  The candidate heap
 * holds every adjacent pair that has a merge; stale entries (a side already
 * merged away) are skipped when popped, as HF's Word::merge_all does. */
static int bpe_piece(enc_ctx *c, const uint8_t *s, size_t n)
{
    const tp_tokenizer *tok = c->tok;
    if (n == 0) return 0;
    if (tok->ignore_merges) {   /* a piece that is a whole token is taken as it is */
        c->scratch.n = 0;
        for (size_t i = 0; i < n; i++) {
            char ch[4];
            if (!tp_tok_buf_append(&c->scratch, ch, utf8_put(tok->byte_cp[s[i]], ch))) return oom(c);
        }
        int32_t id = strmap_find(&tok->vocab_map, tok->vocab, c->scratch.p, c->scratch.n, NULL);
        if (id >= 0) return i32vec_push(c->out, id) ? 0 : oom(c);
    }
    if (n > c->sym_cap) {
        free(c->sym); free(c->prev); free(c->next);
        c->sym = malloc(n * sizeof *c->sym);
        c->prev = malloc(n * sizeof *c->prev);
        c->next = malloc(n * sizeof *c->next);
        c->sym_cap = n;
        if (!c->sym || !c->prev || !c->next) { c->sym_cap = 0; return oom(c); }
    }
    int32_t m = 0;
    bool last_unk = false;
    for (size_t i = 0; i < n; i++) {
        int32_t id = tok->byte_tok[s[i]];
        if (id < 0) {   /* a byte the vocab lacks: unk (fused when asked), or dropped as HF does without unk */
            if (tok->unk_id < 0 || (tok->fuse_unk && last_unk)) continue;
            id = tok->unk_id;
            last_unk = true;
        } else {
            last_unk = false;
        }
        c->sym[m++] = id;
    }
    for (int32_t i = 0; i < m; i++) {
        c->prev[i] = i - 1;
        c->next[i] = i + 1 < m ? i + 1 : -1;
    }
    c->heap_n = 0;
    for (int32_t i = 0; i + 1 < m; i++)
        if (!push_pair(c, i)) return oom(c);
    while (c->heap_n) {
        merge_cand top = heap_pop(c);
        int32_t right = c->next[top.pos];
        if (c->sym[top.pos] < 0 || right < 0) continue;   /* merged away, or last */
        uint32_t rank;
        int32_t merged;
        if (!mergemap_get(&tok->merges, c->sym[top.pos], c->sym[right], &rank, &merged) || merged != top.merged)
            continue;                                      /* stale */
        c->sym[top.pos] = merged;
        c->sym[right] = -1;
        c->next[top.pos] = c->next[right];
        if (c->next[right] >= 0) c->prev[c->next[right]] = top.pos;
        if (c->prev[top.pos] >= 0 && !push_pair(c, c->prev[top.pos])) return oom(c);
        if (!push_pair(c, top.pos)) return oom(c);
    }
    for (int32_t i = m ? 0 : -1; i >= 0; i = c->next[i])
        if (!i32vec_push(c->out, c->sym[i])) return oom(c);
    return 0;
}

static int pre_tokenize(enc_ctx *c, const char *s, size_t n, int step);

/* Isolated split: every match and every gap between matches is a piece. */
static int split_regex(enc_ctx *c, const pcre2_code *re, const char *s, size_t n, int step)
{
    size_t pos = 0, last = 0;
    while (pos <= n) {
        int rc = pcre2_match(re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK, c->md, NULL);
        if (rc == PCRE2_ERROR_JIT_STACKLIMIT)   /* deep backtracking: the interpreter keeps its frames on the heap */
            rc = pcre2_match(re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, c->md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return tp_errorf(c->err, "%s: pre_tokenizer regex: %s", c->tok->name, (const char *)msg);
        }
        const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(c->md);
        size_t ms = ov[0], me = ov[1];
        if (me == ms) {   /* an empty match splits nothing: step over one character */
            size_t len = 1;
            if (me < n) utf8_scan((const uint8_t *)s + me, n - me, &len);
            pos = me + len;
            continue;
        }
        if (ms > last && pre_tokenize(c, s + last, ms - last, step + 1)) return -1;
        if (pre_tokenize(c, s + ms, me - ms, step + 1)) return -1;
        last = pos = me;
    }
    if (last < n && pre_tokenize(c, s + last, n - last, step + 1)) return -1;
    return 0;
}

static int pre_tokenize(enc_ctx *c, const char *s, size_t n, int step)
{
    if (n == 0) return 0;
    if (step == c->tok->n_pre) return bpe_piece(c, (const uint8_t *)s, n);
    const pre_step *st = &c->tok->pre[step];
    if (st->kind == PRE_SPLIT) return split_regex(c, st->re, s, n, step);
    /* ByteLevel (always last): optional prefix space, optional GPT-2 split,
     * then the pieces' bytes go to BPE. */
    char *owned = NULL;
    if (st->add_prefix_space && s[0] != ' ') {
        if (!(owned = malloc(n + 1))) return oom(c);
        owned[0] = ' ';
        memcpy(owned + 1, s, n);
        s = owned;
        n++;
    }
    int rc = st->re ? split_regex(c, st->re, s, n, step) : bpe_piece(c, (const uint8_t *)s, n);
    free(owned);
    return rc;
}

typedef struct span {
    size_t start, end;
    int32_t added;   /* index into tok->added, or -1 for text */
} span;

typedef struct spanvec {
    span *v;
    size_t n, cap;
} spanvec;

static bool spanvec_push(spanvec *a, span s)
{
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 16;
        span *v = realloc(a->v, cap * sizeof *v);
        if (!v) return false;
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = s;
    return true;
}

/* The leftmost-longest added token at or after pos among the set (raw or
 * normalized patterns), or -1. */
static int32_t find_added_at(const tp_tokenizer *tok, bool normalized, const uint8_t *s, size_t n, size_t pos,
                             size_t *mstart)
{
    const uint8_t *first = normalized ? tok->first_byte_norm : tok->first_byte_raw;
    for (size_t p = pos; p < n; p++) {
        if (!(first[s[p] >> 3] & (1u << (s[p] & 7)))) continue;
        int32_t best = -1;
        for (size_t k = 0; k < tok->n_added; k++) {
            const added_tok *a = &tok->added[k];
            if (a->normalized != normalized || a->pattern_len > n - p) continue;
            if (best >= 0 && a->pattern_len <= tok->added[best].pattern_len) continue;
            if (memcmp(s + p, a->pattern, a->pattern_len) == 0) best = (int32_t)k;
        }
        if (best >= 0) { *mstart = p; return best; }
    }
    return -1;
}

/* HF's AddedVocabulary::find_matches: spans covering s[0..n), added tokens
 * and the text between them. */
static int split_added(enc_ctx *c, bool normalized, const char *text, size_t n, spanvec *out)
{
    const tp_tokenizer *tok = c->tok;
    const uint8_t *s = (const uint8_t *)text;
    size_t search = 0, start_offset = 0, ms;
    out->n = 0;
    int32_t k;
    while (search < n && (k = find_added_at(tok, normalized, s, n, search, &ms)) >= 0) {
        const added_tok *a = &tok->added[k];
        size_t start = ms, stop = ms + a->pattern_len, len;
        search = stop;   /* the matcher moves on past a match even when it is discarded */
        if (a->single_word) {
            bool word_before = start > 0 && is_word_char(last_cp(s, start, &len));
            bool word_after = stop < n && is_word_char(first_cp(s + stop, n - stop, &len));
            if (word_before || word_after) continue;
        }
        if (a->lstrip) {
            size_t ns = start;
            while (ns > 0) {
                uint32_t cp = last_cp(s, ns, &len);
                if (!is_white_space(cp)) break;
                ns -= len;
            }
            start = ns > start_offset ? ns : start_offset;
        }
        if (a->rstrip) {
            while (stop < n) {
                uint32_t cp = first_cp(s + stop, n - stop, &len);
                if (!is_white_space(cp)) break;
                stop += len;
            }
        }
        if (start < start_offset) continue;   /* inside what an rstrip already took */
        if (start_offset < start && !spanvec_push(out, (span){start_offset, start, -1})) return oom(c);
        if (!spanvec_push(out, (span){start, stop, k})) return oom(c);
        start_offset = stop;
    }
    if (start_offset < n && !spanvec_push(out, (span){start_offset, n, -1})) return oom(c);
    return 0;
}

/* Text between raw added tokens: normalise, cut normalized added tokens,
 * pre-tokenize and BPE the rest. */
static int encode_text(enc_ctx *c, const char *s, size_t n)
{
    char *norm;
    size_t norm_len;
    if (normalize(c->tok, s, n, &norm, &norm_len, c->err)) return -1;
    spanvec spans = {0};
    int rc = split_added(c, true, norm, norm_len, &spans);
    for (size_t i = 0; rc == 0 && i < spans.n; i++) {
        const span *sp = &spans.v[i];
        if (sp->added >= 0)
            rc = i32vec_push(c->out, c->tok->added[sp->added].id) ? 0 : oom(c);
        else
            rc = pre_tokenize(c, norm + sp->start, sp->end - sp->start, 0);
    }
    free(spans.v);
    free(norm);
    return rc;
}

int tp_tokenizer_encode(const tp_tokenizer *tok, const char *text, size_t len, int32_t **ids, size_t *n_ids,
                        tp_err *err)
{
    *ids = NULL;
    *n_ids = 0;
    size_t bad = tp_utf8_first_invalid(text, len);
    if (bad != len) return tp_errorf(err, "%s: input text is not valid UTF-8 (byte %zu)", tok->name, bad);
    i32vec out = {0};
    enc_ctx c = {.tok = tok, .out = &out, .err = err};
    spanvec spans = {0};
    int rc = 0;
    for (int i = 0; i < tok->n_pre && !c.md; i++)
        if (tok->pre[i].re && !(c.md = pcre2_match_data_create(1, NULL))) rc = oom(&c);
    if (rc == 0) rc = split_added(&c, false, text, len, &spans);
    for (size_t i = 0; rc == 0 && i < spans.n; i++) {
        const span *sp = &spans.v[i];
        if (sp->added >= 0)
            rc = i32vec_push(&out, tok->added[sp->added].id) ? 0 : oom(&c);
        else
            rc = encode_text(&c, text + sp->start, sp->end - sp->start);
    }
    free(spans.v);
    pcre2_match_data_free(c.md);
    free(c.sym); free(c.prev); free(c.next);
    free(c.heap);
    free(c.scratch.p);
    if (rc) {
        free(out.v);
        return -1;
    }
    if (!out.v && !(out.v = malloc(sizeof *out.v))) return tp_errorf(err, "%s: out of memory", tok->name);
    *ids = out.v;
    *n_ids = out.n;
    return 0;
}

/* -------------------------------------------------------------- decoding */

static int id_bytes(const tp_tokenizer *tok, int32_t id, bool skip_special, const uint8_t **s, size_t *n,
                    tp_err *err)
{
    bool known = id >= 0 && (size_t)id < tok->n_ids && (tok->dec_flags[id] & DEC_KNOWN);
    if (!known && id >= 0 && (size_t)id < tok->model_vocab) {
        /* An id of the model's (padded) vocabulary without a token: nothing,
         * as Hugging Face tokenizers' decode skips ids it does not know. */
        *n = 0;
        *s = tok->dec_arena;
        return 0;
    }
    if (!known && tok->model_vocab)
        return tp_errorf(err, "%s: token id %d is outside the model's vocabulary (%zu ids)", tok->name, (int)id,
                         tok->model_vocab);
    if (!known)
        return tp_errorf(err, "%s: token id %d is not in the vocabulary (size %zu)", tok->name, (int)id, tok->n_ids);
    if (skip_special && (tok->dec_flags[id] & DEC_SPECIAL)) {
        *n = 0;
        *s = tok->dec_arena;
        return 0;
    }
    *s = tok->dec_arena + tok->dec_off[id];
    *n = tok->dec_len[id];
    return 0;
}

int tp_tokenizer_decode(const tp_tokenizer *tok, const int32_t *ids, size_t n, bool skip_special, char **text,
                        tp_err *err)
{
    *text = NULL;
    tp_tok_buf raw = {0}, out = {0};
    for (size_t i = 0; i < n; i++) {
        const uint8_t *s = NULL;
        size_t len = 0;
        if (id_bytes(tok, ids[i], skip_special, &s, &len, err)) { free(raw.p); return -1; }
        if (!tp_tok_buf_append(&raw, s, len)) { free(raw.p); return tp_errorf(err, "%s: out of memory", tok->name); }
    }
    bool ok = tp_tok_utf8_lossy(&out, (const uint8_t *)raw.p, raw.n, true, NULL);
    free(raw.p);
    if (!ok) { free(out.p); return tp_errorf(err, "%s: out of memory", tok->name); }
    *text = out.p;
    return 0;
}

struct tp_detok {
    const tp_tokenizer *tok;
    bool skip_special;
    uint8_t pending[4];   /* an incomplete UTF-8 sequence held back (at most 3 bytes) */
    size_t n_pending;
};

tp_detok *tp_detok_new(const tp_tokenizer *tok, bool skip_special)
{
    tp_detok *d = calloc(1, sizeof *d);
    if (d) {
        d->tok = tok;
        d->skip_special = skip_special;
    }
    return d;
}

void tp_detok_free(tp_detok *d) { free(d); }

int tp_detok_push(tp_detok *d, int32_t id, char **out, tp_err *err)
{
    *out = NULL;
    const uint8_t *s = NULL;
    size_t n = 0, consumed = 0;
    if (id_bytes(d->tok, id, d->skip_special, &s, &n, err)) return -1;
    tp_tok_buf raw = {0}, text = {0};
    bool ok = tp_tok_buf_append(&raw, d->pending, d->n_pending) && tp_tok_buf_append(&raw, s, n) &&
              tp_tok_utf8_lossy(&text, (const uint8_t *)raw.p, raw.n, false, &consumed);
    if (ok) {
        /* What is left is a valid prefix of one character: at most 3 bytes. */
        d->n_pending = raw.n - consumed;
        memcpy(d->pending, raw.p + consumed, d->n_pending);
    }
    free(raw.p);
    if (!ok) {
        free(text.p);
        return tp_errorf(err, "%s: out of memory", d->tok->name);
    }
    *out = text.p;
    return 0;
}

char *tp_detok_flush(tp_detok *d)
{
    tp_tok_buf text = {0};
    if (!tp_tok_utf8_lossy(&text, d->pending, d->n_pending, true, NULL)) {
        free(text.p);
        return NULL;
    }
    d->n_pending = 0;
    return text.p;
}
