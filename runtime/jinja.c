/* jinja.c - the subset of Jinja that Hugging Face chat templates use, as
 * transformers renders them (ImmutableSandboxedEnvironment with
 * trim_blocks and lstrip_blocks, its own tojson, raise_exception and
 * strftime_now, the loopcontrols extension).
 *
 * Three stages: a lexer (template text -> tokens, whitespace control done
 * here, as jinja2's lexer does it), a recursive-descent parser (tokens ->
 * a small AST in the template's arena) and a tree-walking evaluator over
 * dynamically typed values (none, bool, int, float, string, list, dict,
 * namespace, macro, builtin function).
 *
 * Memory: the AST lives in the template's arena; every value of a render
 * lives in that render's arena, freed at once when the render ends.  Both
 * stages report an error by longjmp to their entry point, after the
 * message is written, so that no half-built state needs unwinding: the
 * arenas own everything.  Every resource is bounded (nesting, recursion,
 * loop iterations, output and arena bytes), so no template input can crash
 * the process or run it out of memory. */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cJSON.h>
#include <utf8proc.h>

#include "runtime.h"

/* Bounds (why: a template is input; none of these is reached by a real one). */
#define MAX_NESTING 200               /* parser: nested expressions / blocks */
#define MAX_CALL_DEPTH 100            /* evaluator: nested macro calls and nodes */
#define MAX_LOOP_ITERATIONS 1000000L  /* all loops of one render together */
#define MAX_OUTPUT (16u << 20)        /* rendered text */
#define MAX_ARENA (256u << 20)        /* a render's values */
#define MAX_TEMPLATE (4u << 20)       /* template source */

/* ------------------------------------------------------------------ arena */

typedef struct arena_block {
    struct arena_block *next;
    size_t used, cap;
    max_align_t data[];
} arena_block;

typedef struct arena {
    arena_block *head;
    size_t total, limit;
} arena;

/* NULL when the limit is reached or malloc fails (the caller reports it). */
static void *arena_try_alloc(arena *a, size_t n)
{
    n = (n + sizeof(max_align_t) - 1) / sizeof(max_align_t) * sizeof(max_align_t);
    if (n == 0)
        n = sizeof(max_align_t);
    if (!a->head || a->head->cap - a->head->used < n) {
        size_t cap = n > (64u << 10) ? n : (64u << 10);
        if (a->total + cap > a->limit)
            return NULL;
        arena_block *b = malloc(sizeof *b + cap);
        if (!b)
            return NULL;
        b->next = a->head;
        b->used = 0;
        b->cap = cap;
        a->head = b;
        a->total += cap;
    }
    void *p = (char *)a->head->data + a->head->used;
    a->head->used += n;
    return p;
}

static void arena_free(arena *a)
{
    for (arena_block *b = a->head, *next; b; b = next) {
        next = b->next;
        free(b);
    }
    a->head = NULL;
    a->total = 0;
}

/* ----------------------------------------------------------------- values */

typedef struct str {
    const char *p;
    size_t n;
} str;

typedef enum vtype { V_UNDEF, V_NONE, V_BOOL, V_INT, V_FLOAT, V_STR, V_LIST, V_DICT, V_NS, V_MACRO, V_FUNC } vtype;

typedef struct vlist vlist;
typedef struct vdict vdict;
typedef struct node node;

typedef struct val {
    vtype t;
    union {
        bool b;
        int64_t i;
        double f;
        str s;          /* V_STR; V_UNDEF: what was undefined, for messages */
        vlist *l;       /* V_LIST (tuples too) */
        vdict *d;       /* V_DICT, V_NS */
        const node *m;  /* V_MACRO */
        int fn;         /* V_FUNC */
    };
} val;

struct vlist {
    val *v;
    size_t n, cap;
};

struct vdict {
    val *k, *v;
    size_t n, cap;
};

enum { FN_RANGE, FN_NAMESPACE, FN_RAISE, FN_STRFTIME, FN_DICT };

/* ------------------------------------------------------------------- AST */

typedef enum nkind {
    /* statements */
    N_TEXT, N_OUTPUT, N_IF, N_FOR, N_SET, N_SET_BLOCK, N_MACRO, N_BREAK, N_CONTINUE,
    /* expressions */
    E_CONST, E_NAME, E_ATTR, E_ITEM, E_SLICE, E_CALL, E_FILTER, E_TEST, E_NEG, E_POS, E_NOT,
    E_AND, E_OR, E_BIN, E_CMP, E_IN, E_COND, E_LIST, E_TUPLE, E_DICT,
} nkind;

enum { OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_FLOORDIV, OP_MOD, OP_POW, OP_CONCAT,
       OP_EQ, OP_NE, OP_LT, OP_LE, OP_GT, OP_GE };

typedef struct nodes {
    node **v;
    size_t n, cap;
} nodes;

struct node {
    nkind kind;
    int op;
    bool negate;        /* E_TEST "is not", E_IN "not in" */
    size_t off;         /* byte offset in the source, for messages */
    str name;           /* E_NAME, E_ATTR, E_FILTER, E_TEST, N_MACRO, N_SET_BLOCK */
    val cval;           /* E_CONST */
    node *a, *b, *c;    /* operands; N_FOR: a target, b iterable, c filter; N_SET: a target, b value */
    nodes body, orelse; /* statements; E_CALL/E_FILTER/E_TEST/E_LIST/E_DICT: args in body */
    nodes kw;           /* keyword arguments / macro defaults (E_CONST name in ->name) */
    str *kw_names;
    size_t kw_cap;
};

/* Written by tp_template_parse (and tp_template_set_time) only: renders
 * read it from several threads at once (runtime.h), so whatever a render
 * needs to write goes in its rctx, never here. */
struct tp_template {
    arena ar;
    char *src;          /* the normalised source (newlines as "\n", no trailing newline) */
    size_t len;
    char *name;
    nodes body;
    bool fixed_time;
    struct tm now;      /* strftime_now's time when fixed_time */
};

/* Line and column (1-based, columns in bytes) of a byte offset. */
static void line_col(const char *src, size_t len, size_t off, int *line, int *col)
{
    *line = 1;
    *col = 1;
    for (size_t i = 0; i < off && i < len; i++) {
        if (src[i] == '\n') {
            ++*line;
            *col = 1;
        } else {
            ++*col;
        }
    }
}

/* ------------------------------------------------------------------ lexer */

typedef enum tkind {
    T_EOF, T_TEXT, T_VAR_BEGIN, T_VAR_END, T_BLOCK_BEGIN, T_BLOCK_END,
    T_NAME, T_STRING, T_INT, T_FLOAT, T_OP,
} tkind;

typedef struct token {
    tkind k;
    size_t off;
    str s;              /* T_TEXT, T_NAME, T_STRING (decoded), T_OP */
    int64_t i;
    double f;
} token;

typedef struct parser {
    tp_template *t;
    tp_err *err;
    jmp_buf jb;
    token *toks;
    size_t n_toks, cap_toks, pos;
    int depth;
} parser;

static _Noreturn void parse_fail(parser *p, size_t off, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static _Noreturn void parse_fail(parser *p, size_t off, const char *fmt, ...)
{
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    int line, col;
    line_col(p->t->src, p->t->len, off, &line, &col);
    tp_errorf(p->err, "%s: line %d, column %d: %s", p->t->name, line, col, what);
    longjmp(p->jb, 1);
}

static void *p_alloc(parser *p, size_t n)
{
    void *q = arena_try_alloc(&p->t->ar, n);
    if (!q)
        parse_fail(p, 0, "out of memory for the template");
    memset(q, 0, n);
    return q;
}

static void push_token(parser *p, token tk)
{
    if (p->n_toks == p->cap_toks) {
        size_t cap = p->cap_toks ? p->cap_toks * 2 : 256;
        token *v = p_alloc(p, cap * sizeof *v);
        if (p->n_toks)
            memcpy(v, p->toks, p->n_toks * sizeof *v);
        p->toks = v;
        p->cap_toks = cap;
    }
    p->toks[p->n_toks++] = tk;
}

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
static bool is_name_start(char c) { return isalpha((unsigned char)c) || c == '_'; }
static bool is_name_char(char c) { return isalnum((unsigned char)c) || c == '_'; }

/* Appends one code point as UTF-8. */
static size_t utf8_put(char *dst, uint32_t cp)
{
    utf8proc_ssize_t n = utf8proc_encode_char((utf8proc_int32_t)cp, (utf8proc_uint8_t *)dst);
    return n > 0 ? (size_t)n : 0;
}

/* A string literal at s[i] (the quote); returns the offset after it.  The
 * escapes are Python's (jinja2 decodes literals with unicode-escape). */
static size_t lex_string(parser *p, size_t i, token *tk)
{
    const char *s = p->t->src;
    size_t len = p->t->len, start = i;
    char q = s[i++];
    char *out = p_alloc(p, len - i + 1);
    size_t n = 0;
    for (;;) {
        if (i >= len)
            parse_fail(p, start, "unterminated string literal");
        char c = s[i];
        if (c == q) {
            i++;
            break;
        }
        if (c != '\\') {
            out[n++] = c;
            i++;
            continue;
        }
        if (i + 1 >= len)
            parse_fail(p, start, "unterminated string literal");
        char e = s[i + 1];
        i += 2;
        uint32_t cp = 0;
        int hex = 0;
        switch (e) {
        case 'n': out[n++] = '\n'; break;
        case 't': out[n++] = '\t'; break;
        case 'r': out[n++] = '\r'; break;
        case '0': out[n++] = '\0'; break;
        case 'a': out[n++] = '\a'; break;
        case 'b': out[n++] = '\b'; break;
        case 'f': out[n++] = '\f'; break;
        case 'v': out[n++] = '\v'; break;
        case '\\': case '\'': case '"': out[n++] = e; break;
        case '\n': break;   /* a backslash-newline continues the line */
        case 'x': hex = 2; break;
        case 'u': hex = 4; break;
        case 'U': hex = 8; break;
        default: out[n++] = '\\'; out[n++] = e; break;   /* Python keeps unknown escapes */
        }
        if (hex) {
            for (int k = 0; k < hex; k++, i++) {
                if (i >= len || !isxdigit((unsigned char)s[i]))
                    parse_fail(p, i < len ? i : start, "bad \\%c escape in a string literal", e);
                cp = cp * 16 + (uint32_t)(isdigit((unsigned char)s[i]) ? s[i] - '0' : (tolower((unsigned char)s[i]) - 'a' + 10));
            }
            if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
                parse_fail(p, start, "escape \\%c%X in a string literal is not a valid character", e, cp);
            n += utf8_put(out + n, cp);   /* at most 4 bytes for <= 10 escape chars */
        }
    }
    tk->k = T_STRING;
    tk->s = (str){out, n};
    return i;
}

static size_t lex_number(parser *p, size_t i, token *tk)
{
    const char *s = p->t->src;
    size_t len = p->t->len, start = i;
    bool is_float = false;
    char buf[64];
    size_t n = 0;
    while (i < len && (isdigit((unsigned char)s[i]) || s[i] == '_' ||
                       (s[i] == '.' && !is_float && i + 1 < len && isdigit((unsigned char)s[i + 1])) ||
                       ((s[i] == 'e' || s[i] == 'E') && n > 0))) {
        if (s[i] == '.' || s[i] == 'e' || s[i] == 'E')
            is_float = true;
        if ((s[i] == 'e' || s[i] == 'E') && i + 1 < len && (s[i + 1] == '+' || s[i + 1] == '-')) {
            if (n + 2 >= sizeof buf)
                parse_fail(p, start, "number too long");
            buf[n++] = s[i++];
        }
        if (s[i] != '_') {
            if (n + 1 >= sizeof buf)
                parse_fail(p, start, "number too long");
            buf[n++] = s[i];
        }
        i++;
    }
    buf[n] = '\0';
    char *end;
    if (is_float) {
        tk->k = T_FLOAT;
        tk->f = strtod(buf, &end);
    } else {
        tk->k = T_INT;
        errno = 0;
        long long v = strtoll(buf, &end, 10);
        if (errno)
            parse_fail(p, start, "integer %s is too large", buf);
        tk->i = v;
    }
    if (*end)
        parse_fail(p, start, "bad number '%s'", buf);
    return i;
}

static const char *const two_char_ops[] = {"==", "!=", "<=", ">=", "//", "**"};

/* Tokens inside a tag, up to and including its end ("}}" or "%}", with
 * an optional '-').  Returns the offset after the end; *strip_after: '-'. */
static size_t lex_tag(parser *p, size_t i, bool block, bool *strip_after)
{
    const char *s = p->t->src;
    size_t len = p->t->len, start = i;
    const char *close = block ? "%}" : "}}";
    int brackets = 0;
    for (;;) {
        while (i < len && is_space(s[i]))
            i++;
        if (i >= len)
            parse_fail(p, start, "unclosed tag: '%s' expected", close);
        token tk = {.off = i};
        if (brackets == 0 && s[i] == '-' && i + 2 < len + 0 && s[i + 1] == close[0] && s[i + 2] == close[1]) {
            *strip_after = true;
            push_token(p, (token){.k = block ? T_BLOCK_END : T_VAR_END, .off = i});
            return i + 3;
        }
        if (brackets == 0 && s[i] == close[0] && i + 1 < len && s[i + 1] == close[1]) {
            *strip_after = false;
            push_token(p, (token){.k = block ? T_BLOCK_END : T_VAR_END, .off = i});
            return i + 2;
        }
        char c = s[i];
        if (c == '\'' || c == '"') {
            i = lex_string(p, i, &tk);
        } else if (isdigit((unsigned char)c)) {
            i = lex_number(p, i, &tk);
        } else if (is_name_start(c)) {
            size_t j = i;
            while (j < len && is_name_char(s[j]))
                j++;
            tk.k = T_NAME;
            tk.s = (str){s + i, j - i};
            i = j;
        } else {
            tk.k = T_OP;
            size_t n = 1;
            for (size_t k = 0; k < sizeof two_char_ops / sizeof *two_char_ops; k++)
                if (i + 1 < len && s[i] == two_char_ops[k][0] && s[i + 1] == two_char_ops[k][1])
                    n = 2;
            if (n == 1 && !strchr("+-*/%~<>=()[]{},.:|", c))
                parse_fail(p, i, "unexpected character '%c'", isprint((unsigned char)c) ? c : '?');
            if (c == '(' || c == '[' || c == '{')
                brackets++;
            else if ((c == ')' || c == ']' || c == '}') && brackets > 0)
                brackets--;
            tk.s = (str){s + i, n};
            i += n;
        }
        push_token(p, tk);
    }
}

/* Text between tags, with the whitespace rules applied: strip_before (the
 * previous tag ended with '-'), trim_newline (the previous tag was a block
 * or comment: trim_blocks drops one newline), and the next tag's rules
 * (a '-' strips the text's trailing whitespace; a block or comment tag
 * without '+' takes lstrip_blocks: the spaces and tabs from the line's
 * start up to the tag go). */
static void emit_text(parser *p, size_t from, size_t to, bool strip_before, bool trim_newline, char next_sign,
                      bool next_lstrips)
{
    const char *s = p->t->src;
    size_t a = from, b = to;
    if (strip_before)
        while (a < b && is_space(s[a]))
            a++;
    else if (trim_newline && a < b && s[a] == '\n')
        a++;
    if (next_sign == '-') {
        while (b > a && is_space(s[b - 1]))
            b--;
    } else if (next_sign != '+' && next_lstrips) {
        /* jinja2: the text after its last newline, when that starts a line
         * (a newline in the text, or the text itself starts one) and is
         * only whitespace */
        size_t l = b;
        while (l > a && s[l - 1] != '\n')
            l--;
        bool line_start = l > a || a == 0 || s[a - 1] == '\n';
        bool blank = true;
        for (size_t k = l; k < b; k++)
            blank &= is_space(s[k]);
        if (line_start && blank)
            b = l;
    }
    if (b > a)
        push_token(p, (token){.k = T_TEXT, .off = a, .s = {s + a, b - a}});
}

static void lex(parser *p)
{
    const char *s = p->t->src;
    size_t len = p->t->len, i = 0;
    bool strip_before = false, trim_newline = false;
    for (;;) {
        size_t j = i;
        while (j + 1 < len && !(s[j] == '{' && (s[j + 1] == '{' || s[j + 1] == '%' || s[j + 1] == '#')))
            j++;
        if (j + 1 >= len) {
            emit_text(p, i, len, strip_before, trim_newline, 0, false);
            push_token(p, (token){.k = T_EOF, .off = len});
            return;
        }
        char kind = s[j + 1];
        char sign = j + 2 < len && (s[j + 2] == '-' || s[j + 2] == '+') ? s[j + 2] : 0;
        emit_text(p, i, j, strip_before, trim_newline, sign, kind != '{');
        size_t k = j + 2 + (sign ? 1 : 0);
        if (kind == '#') {
            size_t e = k;
            while (e + 1 < len && !(s[e] == '#' && s[e + 1] == '}'))
                e++;
            if (e + 1 >= len)
                parse_fail(p, j, "unclosed comment: '#}' expected");
            strip_before = e > k && s[e - 1] == '-';
            trim_newline = true;
            i = e + 2;
            continue;
        }
        push_token(p, (token){.k = kind == '%' ? T_BLOCK_BEGIN : T_VAR_BEGIN, .off = j});
        i = lex_tag(p, k, kind == '%', &strip_before);
        trim_newline = kind == '%';
    }
}

/* ----------------------------------------------------------------- parser */

static token *peek(parser *p) { return &p->toks[p->pos]; }
static token *next(parser *p) { token *t = &p->toks[p->pos]; if (t->k != T_EOF) p->pos++; return t; }

static bool str_is(str s, const char *c) { return strlen(c) == s.n && memcmp(s.p, c, s.n) == 0; }
static bool is_op(const token *t, const char *op) { return t->k == T_OP && str_is(t->s, op); }
static bool is_name(const token *t, const char *name) { return t->k == T_NAME && str_is(t->s, name); }

static const char *token_desc(const token *t, char *buf, size_t n)
{
    switch (t->k) {
    case T_EOF: return "the end of the template";
    case T_TEXT: return "text";
    case T_VAR_BEGIN: return "'{{'";
    case T_VAR_END: return "'}}'";
    case T_BLOCK_BEGIN: return "'{%'";
    case T_BLOCK_END: return "'%}'";
    case T_STRING: return "a string";
    case T_INT: case T_FLOAT: return "a number";
    default: snprintf(buf, n, "'%.*s'", (int)(t->s.n > 40 ? 40 : t->s.n), t->s.p); return buf;
    }
}

static _Noreturn void unexpected(parser *p, const token *t, const char *wanted)
{
    char buf[64];
    parse_fail(p, t->off, "expected %s, found %s", wanted, token_desc(t, buf, sizeof buf));
}

static void expect_op(parser *p, const char *op)
{
    if (!is_op(peek(p), op)) {
        char want[16];
        snprintf(want, sizeof want, "'%s'", op);
        unexpected(p, peek(p), want);
    }
    next(p);
}

static str expect_name(parser *p)
{
    if (peek(p)->k != T_NAME)
        unexpected(p, peek(p), "a name");
    return next(p)->s;
}

static node *new_node(parser *p, nkind k, size_t off)
{
    node *n = p_alloc(p, sizeof *n);
    n->kind = k;
    n->off = off;
    return n;
}

static void nodes_push(parser *p, nodes *l, node *n)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 4;
        node **v = p_alloc(p, cap * sizeof *v);
        if (l->n)
            memcpy(v, l->v, l->n * sizeof *v);
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = n;
}

static void kw_push(parser *p, node *call, str name, node *value)
{
    if (call->kw.n == call->kw_cap) {
        size_t cap = call->kw_cap ? call->kw_cap * 2 : 4;
        str *names = p_alloc(p, cap * sizeof *names);
        if (call->kw.n)
            memcpy(names, call->kw_names, call->kw.n * sizeof *names);
        call->kw_names = names;
        call->kw_cap = cap;
    }
    call->kw_names[call->kw.n] = name;
    nodes_push(p, &call->kw, value);
}

static void enter(parser *p, size_t off)
{
    if (++p->depth > MAX_NESTING)
        parse_fail(p, off, "nested more than %d deep", MAX_NESTING);
}

static node *parse_expr(parser *p);
static node *parse_or(parser *p);
static node *parse_unary(parser *p, bool with_filter);

/* ( args ) after a callee, filter or test: positional then name=value. */
static void parse_args(parser *p, node *call)
{
    expect_op(p, "(");
    while (!is_op(peek(p), ")")) {
        if (call->body.n || call->kw.n)
            expect_op(p, ",");
        if (is_op(peek(p), ")"))
            break;   /* trailing comma */
        token *t = peek(p);
        if (t->k == T_NAME && is_op(&p->toks[p->pos + 1], "=")) {
            next(p);
            next(p);
            kw_push(p, call, t->s, parse_expr(p));
        } else {
            if (call->kw.n)
                parse_fail(p, t->off, "positional argument after a keyword argument");
            nodes_push(p, &call->body, parse_expr(p));
        }
    }
    next(p);
}

static const char *const known_filters[] = {
    "abs", "capitalize", "count", "d", "default", "first", "float", "indent", "int", "items", "join", "last",
    "length", "list", "lower", "map", "reject", "rejectattr", "replace", "reverse", "safe", "select",
    "selectattr", "string", "title", "tojson", "trim", "unique", "upper", "e", "escape", "sort", "dictsort",
    "min", "max", "sum", "round", "wordcount",
};
/* listed above but not implemented: reported as not supported */
static const char *const unsupported_filters[] = {"e", "escape", "sort", "dictsort", "min", "max", "sum", "round",
                                                  "wordcount"};

static const char *const known_tests[] = {
    "boolean", "callable", "defined", "divisibleby", "eq", "equalto", "even", "false", "float", "ge", "gt",
    "in", "integer", "iterable", "le", "lower", "lt", "mapping", "ne", "none", "number", "odd", "sameas",
    "sequence", "string", "true", "undefined", "upper", "==", "!=", "<", "<=", ">", ">=",
};

static bool in_list(str s, const char *const *list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (str_is(s, list[i]))
            return true;
    return false;
}
#define IN_LIST(s, l) in_list((s), (l), sizeof(l) / sizeof *(l))

static node *parse_filter(parser *p, node *operand)
{
    token *t = next(p);   /* '|' */
    size_t name_off = peek(p)->off;
    str name = expect_name(p);
    if (!IN_LIST(name, known_filters) || IN_LIST(name, unsupported_filters))
        parse_fail(p, name_off, "filter '%.*s' is not supported", (int)name.n, name.p);
    node *f = new_node(p, E_FILTER, t->off);
    f->name = name;
    f->a = operand;
    if (is_op(peek(p), "("))
        parse_args(p, f);
    return f;
}

static node *parse_test(parser *p, node *operand)
{
    token *t = next(p);   /* 'is' */
    node *n = new_node(p, E_TEST, t->off);
    n->a = operand;
    if (is_name(peek(p), "not")) {
        next(p);
        n->negate = true;
    }
    token *nt = peek(p);
    str name;
    if (nt->k == T_NAME)
        name = next(p)->s;
    else if (nt->k == T_OP && IN_LIST(nt->s, known_tests))
        name = next(p)->s;
    else
        unexpected(p, nt, "a test name");
    if (!IN_LIST(name, known_tests))
        parse_fail(p, nt->off, "test '%.*s' is not supported", (int)name.n, name.p);
    n->name = name;
    token *after = peek(p);
    if (is_op(after, "(")) {
        parse_args(p, n);
    } else if (after->k == T_STRING || after->k == T_INT || after->k == T_FLOAT ||
               (after->k == T_NAME && !is_name(after, "and") && !is_name(after, "or") && !is_name(after, "else") &&
                !is_name(after, "if") && !is_name(after, "in") && !is_name(after, "is") && !is_name(after, "not"))) {
        /* one argument without parentheses: "is divisibleby 3", "is sameas none" */
        nodes_push(p, &n->body, parse_unary(p, false));
    }
    return n;
}

static node *parse_primary(parser *p)
{
    token *t = next(p);
    node *n;
    switch (t->k) {
    case T_NAME:
        n = new_node(p, E_CONST, t->off);
        if (str_is(t->s, "true") || str_is(t->s, "True"))
            n->cval = (val){.t = V_BOOL, .b = true};
        else if (str_is(t->s, "false") || str_is(t->s, "False"))
            n->cval = (val){.t = V_BOOL, .b = false};
        else if (str_is(t->s, "none") || str_is(t->s, "None"))
            n->cval = (val){.t = V_NONE};
        else {
            n->kind = E_NAME;
            n->name = t->s;
        }
        return n;
    case T_STRING: {
        /* adjacent literals concatenate, as in Python */
        str s = t->s;
        while (peek(p)->k == T_STRING) {
            str more = next(p)->s;
            char *c = p_alloc(p, s.n + more.n + 1);
            memcpy(c, s.p, s.n);
            memcpy(c + s.n, more.p, more.n);
            s = (str){c, s.n + more.n};
        }
        n = new_node(p, E_CONST, t->off);
        n->cval = (val){.t = V_STR, .s = s};
        return n;
    }
    case T_INT:
        n = new_node(p, E_CONST, t->off);
        n->cval = (val){.t = V_INT, .i = t->i};
        return n;
    case T_FLOAT:
        n = new_node(p, E_CONST, t->off);
        n->cval = (val){.t = V_FLOAT, .f = t->f};
        return n;
    case T_OP:
        if (str_is(t->s, "(")) {
            if (is_op(peek(p), ")")) {
                next(p);
                return new_node(p, E_TUPLE, t->off);
            }
            node *e = parse_expr(p);
            if (!is_op(peek(p), ","))  {
                expect_op(p, ")");
                return e;
            }
            n = new_node(p, E_TUPLE, t->off);
            nodes_push(p, &n->body, e);
            while (is_op(peek(p), ",")) {
                next(p);
                if (is_op(peek(p), ")"))
                    break;
                nodes_push(p, &n->body, parse_expr(p));
            }
            expect_op(p, ")");
            return n;
        }
        if (str_is(t->s, "[")) {
            n = new_node(p, E_LIST, t->off);
            while (!is_op(peek(p), "]")) {
                if (n->body.n)
                    expect_op(p, ",");
                if (is_op(peek(p), "]"))
                    break;
                nodes_push(p, &n->body, parse_expr(p));
            }
            next(p);
            return n;
        }
        if (str_is(t->s, "{")) {
            n = new_node(p, E_DICT, t->off);
            while (!is_op(peek(p), "}")) {
                if (n->body.n)
                    expect_op(p, ",");
                if (is_op(peek(p), "}"))
                    break;
                nodes_push(p, &n->body, parse_expr(p));
                expect_op(p, ":");
                nodes_push(p, &n->body, parse_expr(p));
            }
            next(p);
            return n;
        }
        break;
    default:
        break;
    }
    p->pos--;
    unexpected(p, t, "an expression");
}

/* .name, [index], [a:b:c], (call) after a primary. */
static node *parse_postfix(parser *p, node *n)
{
    for (;;) {
        token *t = peek(p);
        if (is_op(t, ".")) {
            next(p);
            token *nt = next(p);
            node *a = new_node(p, E_ATTR, t->off);
            a->a = n;
            if (nt->k == T_NAME) {
                a->name = nt->s;
            } else if (nt->k == T_INT) {   /* foo.0 is foo[0] */
                a->kind = E_ITEM;
                a->b = new_node(p, E_CONST, nt->off);
                a->b->cval = (val){.t = V_INT, .i = nt->i};
            } else {
                p->pos--;
                unexpected(p, nt, "an attribute name");
            }
            n = a;
        } else if (is_op(t, "[")) {
            next(p);
            node *idx[3] = {0};
            int colons = 0;
            for (;;) {
                if (is_op(peek(p), ":")) {
                    next(p);
                    if (++colons > 2)
                        parse_fail(p, t->off, "a slice takes at most start:stop:step");
                    continue;
                }
                if (is_op(peek(p), "]"))
                    break;
                if (idx[colons])
                    unexpected(p, peek(p), "':' or ']'");
                idx[colons] = parse_expr(p);
            }
            next(p);
            node *s = new_node(p, colons ? E_SLICE : E_ITEM, t->off);
            s->a = n;
            if (colons) {
                s->b = idx[0];
                s->c = idx[1];
                nodes_push(p, &s->body, idx[2]);   /* step, maybe NULL */
            } else {
                if (!idx[0])
                    parse_fail(p, t->off, "empty subscript");
                s->b = idx[0];
            }
            n = s;
        } else if (is_op(t, "(")) {
            node *c = new_node(p, E_CALL, t->off);
            c->a = n;
            parse_args(p, c);
            n = c;
        } else {
            return n;
        }
    }
}

static node *parse_unary(parser *p, bool with_filter)
{
    token *t = peek(p);
    enter(p, t->off);
    node *n;
    if (is_op(t, "-") || is_op(t, "+")) {
        next(p);
        n = new_node(p, is_op(t, "-") ? E_NEG : E_POS, t->off);
        n->a = parse_unary(p, false);
    } else {
        n = parse_postfix(p, parse_primary(p));
    }
    while (with_filter) {
        if (is_op(peek(p), "|"))
            n = parse_filter(p, n);
        else if (is_name(peek(p), "is"))
            n = parse_test(p, n);
        else if (is_op(peek(p), "("))
            n = parse_postfix(p, n);
        else
            break;
    }
    p->depth--;
    return n;
}

static node *binary(parser *p, nkind k, int op, size_t off, node *a, node *b)
{
    node *n = new_node(p, k, off);
    n->op = op;
    n->a = a;
    n->b = b;
    return n;
}

static node *parse_pow(parser *p)
{
    node *n = parse_unary(p, true);
    while (is_op(peek(p), "**")) {
        size_t off = next(p)->off;
        n = binary(p, E_BIN, OP_POW, off, n, parse_unary(p, true));
    }
    return n;
}

static node *parse_math2(parser *p)
{
    node *n = parse_pow(p);
    for (;;) {
        token *t = peek(p);
        int op = is_op(t, "*") ? OP_MUL : is_op(t, "/") ? OP_DIV : is_op(t, "//") ? OP_FLOORDIV
                 : is_op(t, "%") ? OP_MOD : -1;
        if (op < 0)
            return n;
        next(p);
        n = binary(p, E_BIN, op, t->off, n, parse_pow(p));
    }
}

static node *parse_concat(parser *p)
{
    node *n = parse_math2(p);
    while (is_op(peek(p), "~")) {
        size_t off = next(p)->off;
        n = binary(p, E_BIN, OP_CONCAT, off, n, parse_math2(p));
    }
    return n;
}

static node *parse_math1(parser *p)
{
    node *n = parse_concat(p);
    for (;;) {
        token *t = peek(p);
        int op = is_op(t, "+") ? OP_ADD : is_op(t, "-") ? OP_SUB : -1;
        if (op < 0)
            return n;
        next(p);
        n = binary(p, E_BIN, op, t->off, n, parse_concat(p));
    }
}

static node *parse_compare(parser *p)
{
    node *n = parse_math1(p);
    for (;;) {
        token *t = peek(p);
        int op = is_op(t, "==") ? OP_EQ : is_op(t, "!=") ? OP_NE : is_op(t, "<") ? OP_LT : is_op(t, "<=") ? OP_LE
                 : is_op(t, ">") ? OP_GT : is_op(t, ">=") ? OP_GE : -1;
        if (op >= 0) {
            next(p);
            n = binary(p, E_CMP, op, t->off, n, parse_math1(p));
        } else if (is_name(t, "in")) {
            next(p);
            n = binary(p, E_IN, 0, t->off, n, parse_math1(p));
        } else if (is_name(t, "not") && is_name(&p->toks[p->pos + 1], "in")) {
            next(p);
            next(p);
            n = binary(p, E_IN, 0, t->off, n, parse_math1(p));
            n->negate = true;
        } else {
            return n;
        }
    }
}

static node *parse_not(parser *p)
{
    token *t = peek(p);
    if (is_name(t, "not")) {
        next(p);
        enter(p, t->off);
        node *n = new_node(p, E_NOT, t->off);
        n->a = parse_not(p);
        p->depth--;
        return n;
    }
    return parse_compare(p);
}

static node *parse_and(parser *p)
{
    node *n = parse_not(p);
    while (is_name(peek(p), "and")) {
        size_t off = next(p)->off;
        n = binary(p, E_AND, 0, off, n, parse_not(p));
    }
    return n;
}

static node *parse_or(parser *p)
{
    node *n = parse_and(p);
    while (is_name(peek(p), "or")) {
        size_t off = next(p)->off;
        n = binary(p, E_OR, 0, off, n, parse_and(p));
    }
    return n;
}

/* x if cond else y (else optional: undefined) */
static node *parse_expr(parser *p)
{
    enter(p, peek(p)->off);
    node *n = parse_or(p);
    while (is_name(peek(p), "if")) {
        token *t = next(p);
        node *c = new_node(p, E_COND, t->off);
        c->a = n;
        c->b = parse_or(p);
        if (is_name(peek(p), "else")) {
            next(p);
            c->c = parse_expr(p);
        }
        n = c;
    }
    p->depth--;
    return n;
}

/* Assignment / loop target: a name, ns.attr, or names separated by commas. */
static node *parse_target(parser *p, bool allow_attr)
{
    token *t = peek(p);
    str name = expect_name(p);
    node *n = new_node(p, E_NAME, t->off);
    n->name = name;
    if (allow_attr && is_op(peek(p), ".")) {
        next(p);
        node *a = new_node(p, E_ATTR, t->off);
        a->a = n;
        a->name = expect_name(p);
        return a;
    }
    if (!is_op(peek(p), ","))
        return n;
    node *tuple = new_node(p, E_TUPLE, t->off);
    nodes_push(p, &tuple->body, n);
    while (is_op(peek(p), ",")) {
        next(p);
        token *nt = peek(p);
        node *m = new_node(p, E_NAME, nt->off);
        m->name = expect_name(p);
        nodes_push(p, &tuple->body, m);
    }
    return tuple;
}

static void expect_block_end(parser *p)
{
    if (peek(p)->k != T_BLOCK_END)
        unexpected(p, peek(p), "'%}'");
    next(p);
}

static void parse_body(parser *p, nodes *body, const char *const *ends, size_t n_ends, str *which, size_t opened);

#define ENDS(...) (const char *const[]){__VA_ARGS__}, sizeof((const char *const[]){__VA_ARGS__}) / sizeof(char *)

static node *parse_if(parser *p, size_t off)
{
    node *n = new_node(p, N_IF, off);
    n->a = parse_expr(p);
    expect_block_end(p);
    str end;
    parse_body(p, &n->body, ENDS("elif", "else", "endif"), &end, n->off);
    if (str_is(end, "elif")) {
        nodes_push(p, &n->orelse, parse_if(p, p->toks[p->pos - 1].off));
        return n;   /* the nested if consumed the endif */
    }
    if (str_is(end, "else")) {
        expect_block_end(p);
        parse_body(p, &n->orelse, ENDS("endif"), &end, n->off);
    }
    expect_block_end(p);
    return n;
}

static node *parse_for(parser *p, size_t off)
{
    node *n = new_node(p, N_FOR, off);
    n->a = parse_target(p, false);
    if (!is_name(peek(p), "in"))
        unexpected(p, peek(p), "'in'");
    next(p);
    n->b = parse_or(p);   /* not parse_expr: "if" here filters the loop */
    if (is_name(peek(p), "if")) {
        next(p);
        n->c = parse_or(p);
    }
    if (is_name(peek(p), "recursive"))
        parse_fail(p, peek(p)->off, "recursive loops are not supported");
    expect_block_end(p);
    str end;
    parse_body(p, &n->body, ENDS("else", "endfor"), &end, n->off);
    if (str_is(end, "else")) {
        expect_block_end(p);
        parse_body(p, &n->orelse, ENDS("endfor"), &end, n->off);
    }
    expect_block_end(p);
    return n;
}

static node *parse_set(parser *p, size_t off)
{
    node *n = new_node(p, N_SET, off);
    n->a = parse_target(p, true);
    if (peek(p)->k == T_BLOCK_END && n->a->kind == E_NAME) {
        /* {% set x %}...{% endset %}: the rendered body */
        next(p);
        n->kind = N_SET_BLOCK;
        str end;
        parse_body(p, &n->body, ENDS("endset"), &end, n->off);
        expect_block_end(p);
        return n;
    }
    expect_op(p, "=");
    n->b = parse_expr(p);
    if (is_op(peek(p), ",")) {   /* set a, b = 1, 2 */
        node *t = new_node(p, E_TUPLE, n->b->off);
        nodes_push(p, &t->body, n->b);
        while (is_op(peek(p), ",")) {
            next(p);
            nodes_push(p, &t->body, parse_expr(p));
        }
        n->b = t;
    }
    expect_block_end(p);
    return n;
}

static node *parse_macro(parser *p, size_t off)
{
    node *n = new_node(p, N_MACRO, off);
    n->name = expect_name(p);
    expect_op(p, "(");
    /* parameters: names in kw_names, defaults (or NULL) in kw */
    while (!is_op(peek(p), ")")) {
        if (n->kw.n)
            expect_op(p, ",");
        str pname = expect_name(p);
        node *def = NULL;
        if (is_op(peek(p), "=")) {
            next(p);
            def = parse_expr(p);
        }
        kw_push(p, n, pname, def);
    }
    next(p);
    expect_block_end(p);
    str end;
    parse_body(p, &n->body, ENDS("endmacro"), &end, n->off);
    if (peek(p)->k == T_NAME)
        next(p);   /* {% endmacro name %} */
    expect_block_end(p);
    return n;
}

/* One {% ... %} statement (the '{%' consumed).  *end receives an end
 * keyword that belongs to the caller ("endif", "else", ...). */
static node *parse_statement(parser *p, const char *const *ends, size_t n_ends, str *end)
{
    token *t = peek(p);
    if (t->k != T_NAME)
        unexpected(p, t, "a statement name");
    for (size_t i = 0; i < n_ends; i++)
        if (str_is(t->s, ends[i])) {
            next(p);
            *end = t->s;
            return NULL;
        }
    next(p);
    str kw = t->s;
    if (str_is(kw, "if"))
        return parse_if(p, t->off);
    if (str_is(kw, "for"))
        return parse_for(p, t->off);
    if (str_is(kw, "set"))
        return parse_set(p, t->off);
    if (str_is(kw, "macro"))
        return parse_macro(p, t->off);
    if (str_is(kw, "break") || str_is(kw, "continue")) {
        expect_block_end(p);
        return new_node(p, str_is(kw, "break") ? N_BREAK : N_CONTINUE, t->off);
    }
    static const char *const block_words[] = {"endif", "endfor", "endset", "endmacro", "elif", "else"};
    if (IN_LIST(kw, block_words))
        parse_fail(p, t->off, "'%.*s' without its opening block", (int)kw.n, kw.p);
    parse_fail(p, t->off, "statement '%.*s' is not supported", (int)(kw.n > 40 ? 40 : kw.n), kw.p);
}

/* Statements until one of ends (or the end of the template when n_ends is 0). */
static void parse_body(parser *p, nodes *body, const char *const *ends, size_t n_ends, str *which, size_t opened)
{
    size_t start = opened;
    enter(p, start);
    for (;;) {
        token *t = next(p);
        if (t->k == T_EOF) {
            if (n_ends == 0) {
                p->depth--;
                return;
            }
            parse_fail(p, start, "block not closed: '%s' expected before the end of the template", ends[n_ends - 1]);
        }
        if (t->k == T_TEXT) {
            node *n = new_node(p, N_TEXT, t->off);
            n->cval = (val){.t = V_STR, .s = t->s};
            nodes_push(p, body, n);
        } else if (t->k == T_VAR_BEGIN) {
            node *n = new_node(p, N_OUTPUT, t->off);
            n->a = parse_expr(p);
            if (peek(p)->k != T_VAR_END)
                unexpected(p, peek(p), "'}}'");
            next(p);
            nodes_push(p, body, n);
        } else if (t->k == T_BLOCK_BEGIN) {
            node *n = parse_statement(p, ends, n_ends, which);
            if (!n) {
                p->depth--;
                return;
            }
            nodes_push(p, body, n);
        } else {
            char buf[64];
            parse_fail(p, t->off, "unexpected %s", token_desc(t, buf, sizeof buf));
        }
    }
}

/* Newlines as "\n" and no final newline: what jinja2's lexer does with the
 * source (keep_trailing_newline is off in transformers). */
static char *normalise_source(const char *src, size_t len, size_t *out_len)
{
    char *s = malloc(len + 1);
    if (!s)
        return NULL;
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (src[i] == '\r') {
            s[n++] = '\n';
            if (i + 1 < len && src[i + 1] == '\n')
                i++;
        } else {
            s[n++] = src[i];
        }
    }
    if (n > 0 && s[n - 1] == '\n')
        n--;
    s[n] = '\0';
    *out_len = n;
    return s;
}

void tp_template_free(tp_template *t)
{
    if (!t)
        return;
    arena_free(&t->ar);
    free(t->src);
    free(t->name);
    free(t);
}

int tp_template_parse(tp_template **out, const char *src, size_t len, const char *name, tp_err *err)
{
    *out = NULL;
    if (!name)
        name = "chat template";
    if (len > MAX_TEMPLATE)
        return tp_errorf(err, "%s: %zu bytes, more than the %u a template may have", name, len, MAX_TEMPLATE);
    size_t bad = tp_utf8_first_invalid(src, len);
    if (bad != len)
        return tp_errorf(err, "%s: invalid UTF-8 at byte %zu", name, bad);
    if (memchr(src, '\0', len))
        return tp_errorf(err, "%s: holds a NUL byte", name);
    tp_template *t = calloc(1, sizeof *t);
    if (!t)
        return tp_errorf(err, "%s: out of memory", name);
    t->ar.limit = (size_t)MAX_TEMPLATE * 64;
    t->name = strdup(name);
    t->src = normalise_source(src, len, &t->len);
    if (!t->name || !t->src) {
        tp_template_free(t);
        return tp_errorf(err, "%s: out of memory", name);
    }
    parser p = {.t = t, .err = err};
    if (setjmp(p.jb)) {
        tp_template_free(t);
        return -1;
    }
    lex(&p);
    str none;
    parse_body(&p, &t->body, NULL, 0, &none, 0);
    *out = t;
    return 0;
}

void tp_template_set_time(tp_template *t, const struct tm *now)
{
    t->fixed_time = now != NULL;
    if (now)
        t->now = *now;
}

/* -------------------------------------------------------------- evaluator */

typedef struct frame {
    struct frame *parent;
    vdict vars;
} frame;

typedef struct sbuf {
    char *p;
    size_t n, cap;
} sbuf;

typedef struct rctx {
    const tp_template *t;
    tp_err *err;
    jmp_buf jb;
    arena ar;
    sbuf *out;
    int depth;
    long iterations;
    frame *globals;
    int loop_ctl;   /* 0, N_BREAK or N_CONTINUE while unwinding a loop body */
} rctx;

static _Noreturn void fail(rctx *r, const node *at, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static _Noreturn void fail(rctx *r, const node *at, const char *fmt, ...)
{
    char what[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (at) {
        int line, col;
        line_col(r->t->src, r->t->len, at->off, &line, &col);
        tp_errorf(r->err, "%s: line %d, column %d: %s", r->t->name, line, col, what);
    } else {
        tp_errorf(r->err, "%s: %s", r->t->name, what);
    }
    longjmp(r->jb, 1);
}

static void *r_alloc(rctx *r, size_t n)
{
    void *q = arena_try_alloc(&r->ar, n);
    if (!q)
        fail(r, NULL, "rendering needs more than %u MiB", MAX_ARENA >> 20);
    return q;
}

static void sbuf_add(rctx *r, sbuf *b, const char *s, size_t n)
{
    if (n == 0)
        return;
    if (b->n + n > MAX_OUTPUT)
        fail(r, NULL, "the rendered text would exceed %u MiB", MAX_OUTPUT >> 20);
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        while (cap < b->n + n)
            cap *= 2;
        char *q = r_alloc(r, cap);
        if (b->n)
            memcpy(q, b->p, b->n);
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}

static void sbuf_puts(rctx *r, sbuf *b, const char *s) { sbuf_add(r, b, s, strlen(s)); }

static str sbuf_str(sbuf *b) { return (str){b->p ? b->p : "", b->n}; }

static val mkstr(const char *p, size_t n) { return (val){.t = V_STR, .s = {p, n}}; }
static val mkint(int64_t i) { return (val){.t = V_INT, .i = i}; }
static val mkbool(bool b) { return (val){.t = V_BOOL, .b = b}; }
static val mkundef(str what) { return (val){.t = V_UNDEF, .s = what}; }
static val cstr(const char *s) { return mkstr(s, strlen(s)); }

static val r_strdup(rctx *r, const char *s, size_t n)
{
    char *c = r_alloc(r, n + 1);
    memcpy(c, s, n);
    c[n] = '\0';
    return mkstr(c, n);
}

static vlist *new_list(rctx *r, size_t cap)
{
    vlist *l = r_alloc(r, sizeof *l);
    l->n = 0;
    l->cap = cap ? cap : 4;
    l->v = r_alloc(r, l->cap * sizeof *l->v);
    return l;
}

static void list_push(rctx *r, vlist *l, val v)
{
    if (l->n == l->cap) {
        size_t cap = l->cap * 2;
        val *nv = r_alloc(r, cap * sizeof *nv);
        memcpy(nv, l->v, l->n * sizeof *nv);
        l->v = nv;
        l->cap = cap;
    }
    l->v[l->n++] = v;
}

static val mklist(vlist *l) { return (val){.t = V_LIST, .l = l}; }

static vdict *new_dict(rctx *r)
{
    vdict *d = r_alloc(r, sizeof *d);
    memset(d, 0, sizeof *d);
    return d;
}

static bool val_eq(const val *a, const val *b);

static val *dict_find(const vdict *d, const val *key)
{
    for (size_t i = 0; i < d->n; i++)
        if (val_eq(&d->k[i], key))
            return &d->v[i];
    return NULL;
}

static val *dict_find_str(const vdict *d, str key)
{
    val k = mkstr(key.p, key.n);
    return dict_find(d, &k);
}

static void dict_set(rctx *r, vdict *d, val key, val v)
{
    val *have = dict_find(d, &key);
    if (have) {
        *have = v;
        return;
    }
    if (d->n == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 4;
        val *nk = r_alloc(r, cap * sizeof *nk), *nv = r_alloc(r, cap * sizeof *nv);
        if (d->n) {
            memcpy(nk, d->k, d->n * sizeof *nk);
            memcpy(nv, d->v, d->n * sizeof *nv);
        }
        d->k = nk;
        d->v = nv;
        d->cap = cap;
    }
    d->k[d->n] = key;
    d->v[d->n++] = v;
}

static const char *type_name(vtype t)
{
    switch (t) {
    case V_UNDEF: return "undefined";
    case V_NONE: return "none";
    case V_BOOL: return "boolean";
    case V_INT: return "integer";
    case V_FLOAT: return "float";
    case V_STR: return "string";
    case V_LIST: return "list";
    case V_DICT: return "dict";
    case V_NS: return "namespace";
    case V_MACRO: return "macro";
    default: return "function";
    }
}

/* ---------------------------------------------------- UTF-8 code points */

/* Byte offset of code point k in s (s.n when k is past the end). */
static size_t cp_offset(str s, size_t k)
{
    size_t i = 0;
    while (i < s.n && k > 0) {
        i++;
        while (i < s.n && ((unsigned char)s.p[i] & 0xC0) == 0x80)
            i++;
        k--;
    }
    return i;
}

static size_t cp_count(str s)
{
    size_t n = 0;
    for (size_t i = 0; i < s.n; i++)
        n += ((unsigned char)s.p[i] & 0xC0) != 0x80;
    return n;
}

/* Decodes the code point at s[*i], advancing *i (valid UTF-8: the source
 * and cJSON's strings are checked). */
static int32_t cp_next(str s, size_t *i)
{
    utf8proc_int32_t cp = -1;
    utf8proc_ssize_t n = utf8proc_iterate((const utf8proc_uint8_t *)s.p + *i, (utf8proc_ssize_t)(s.n - *i), &cp);
    if (n <= 0) {
        (*i)++;
        return 0xFFFD;
    }
    *i += (size_t)n;
    return cp;
}

/* Python's str.isspace() code points (what strip() and split() remove). */
static bool py_space(int32_t c)
{
    return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

static bool cp_in(int32_t c, str chars)
{
    for (size_t i = 0; i < chars.n;)
        if (cp_next(chars, &i) == c)
            return true;
    return false;
}

/* strip: chars NULL means whitespace. */
static str strip_str(str s, const str *chars, bool left, bool right)
{
    size_t a = 0, b = s.n;
    while (left && a < b) {
        size_t j = a;
        int32_t c = cp_next(s, &j);
        if (chars ? !cp_in(c, *chars) : !py_space(c))
            break;
        a = j;
    }
    while (right && b > a) {
        size_t j = b - 1;
        while (j > a && ((unsigned char)s.p[j] & 0xC0) == 0x80)
            j--;
        size_t k = j;
        int32_t c = cp_next(s, &k);
        if (chars ? !cp_in(c, *chars) : !py_space(c))
            break;
        b = j;
    }
    return (str){s.p + a, b - a};
}

/* ------------------------------------------------- str(), repr(), json */

/* Python's repr() of a float: the shortest digits that read back exactly. */
static void float_repr(double f, char *buf, size_t n)
{
    if (isnan(f)) {
        snprintf(buf, n, "nan");
        return;
    }
    if (isinf(f)) {
        snprintf(buf, n, f > 0 ? "inf" : "-inf");
        return;
    }
    char e[40];
    int prec = 1;
    for (; prec <= 17; prec++) {
        snprintf(e, sizeof e, "%.*e", prec - 1, f);
        if (strtod(e, NULL) == f)
            break;
    }
    /* e is d.ddddde[+-]XX: digits and decimal exponent */
    char digits[24];
    size_t nd = 0;
    const char *q = e;
    bool neg = *q == '-';
    if (neg)
        q++;
    for (; *q && *q != 'e'; q++)
        if (isdigit((unsigned char)*q))
            digits[nd++] = *q;
    int exp10 = atoi(q + 1);
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    digits[nd] = '\0';
    char *o = buf;
    size_t left = n;
#define PUT(...) do { int w_ = snprintf(o, left, __VA_ARGS__); if (w_ < 0 || (size_t)w_ >= left) return; o += w_; left -= (size_t)w_; } while (0)
    if (neg)
        PUT("-");
    if (exp10 < -4 || exp10 >= 16) {
        PUT("%c", digits[0]);
        if (nd > 1)
            PUT(".%s", digits + 1);
        PUT("e%c%02d", exp10 < 0 ? '-' : '+', exp10 < 0 ? -exp10 : exp10);
    } else if (exp10 < 0) {
        PUT("0.");
        for (int k = -1; k > exp10; k--)
            PUT("0");
        PUT("%s", digits);
    } else {
        for (int k = 0; k <= exp10; k++)
            PUT("%c", (size_t)k < nd ? digits[k] : '0');
        PUT(".");
        if ((size_t)exp10 + 1 < nd)
            PUT("%s", digits + exp10 + 1);
        else
            PUT("0");
    }
#undef PUT
}

static void put_str(rctx *r, sbuf *b, const val *v, bool repr);

static void put_repr_string(rctx *r, sbuf *b, str s)
{
    bool has_single = memchr(s.p, '\'', s.n) != NULL, has_double = memchr(s.p, '"', s.n) != NULL;
    char q = has_single && !has_double ? '"' : '\'';
    sbuf_add(r, b, &q, 1);
    for (size_t i = 0; i < s.n; i++) {
        unsigned char c = (unsigned char)s.p[i];
        char esc[8];
        if (c == '\\' || c == (unsigned char)q) {
            esc[0] = '\\';
            esc[1] = (char)c;
            sbuf_add(r, b, esc, 2);
        } else if (c == '\n') {
            sbuf_puts(r, b, "\\n");
        } else if (c == '\r') {
            sbuf_puts(r, b, "\\r");
        } else if (c == '\t') {
            sbuf_puts(r, b, "\\t");
        } else if (c < 0x20 || c == 0x7f) {
            snprintf(esc, sizeof esc, "\\x%02x", c);
            sbuf_puts(r, b, esc);
        } else {
            sbuf_add(r, b, s.p + i, 1);
        }
    }
    sbuf_add(r, b, &q, 1);
}

/* str(v) (repr false) or repr(v), as Python writes them. */
static void put_str(rctx *r, sbuf *b, const val *v, bool repr)
{
    char num[64];
    switch (v->t) {
    case V_UNDEF: break;
    case V_NONE: sbuf_puts(r, b, "None"); break;
    case V_BOOL: sbuf_puts(r, b, v->b ? "True" : "False"); break;
    case V_INT: snprintf(num, sizeof num, "%lld", (long long)v->i); sbuf_puts(r, b, num); break;
    case V_FLOAT: float_repr(v->f, num, sizeof num); sbuf_puts(r, b, num); break;
    case V_STR:
        if (repr)
            put_repr_string(r, b, v->s);
        else
            sbuf_add(r, b, v->s.p, v->s.n);
        break;
    case V_LIST:
        sbuf_puts(r, b, "[");
        for (size_t i = 0; i < v->l->n; i++) {
            if (i)
                sbuf_puts(r, b, ", ");
            put_str(r, b, &v->l->v[i], true);
        }
        sbuf_puts(r, b, "]");
        break;
    case V_DICT: case V_NS:
        sbuf_puts(r, b, v->t == V_NS ? "<Namespace {" : "{");
        for (size_t i = 0; i < v->d->n; i++) {
            if (i)
                sbuf_puts(r, b, ", ");
            put_str(r, b, &v->d->k[i], true);
            sbuf_puts(r, b, ": ");
            put_str(r, b, &v->d->v[i], true);
        }
        sbuf_puts(r, b, v->t == V_NS ? "}>" : "}");
        break;
    case V_MACRO: sbuf_puts(r, b, "<Macro>"); break;
    case V_FUNC: sbuf_puts(r, b, "<function>"); break;
    }
}

static str to_str(rctx *r, const val *v)
{
    if (v->t == V_STR)
        return v->s;
    sbuf b = {0};
    put_str(r, &b, v, false);
    return sbuf_str(&b);
}

typedef struct json_opts {
    int indent;           /* < 0: none */
    bool ensure_ascii, sort_keys;
    str item_sep, key_sep;
} json_opts;

static void json_string(rctx *r, sbuf *b, str s, bool ensure_ascii)
{
    sbuf_puts(r, b, "\"");
    for (size_t i = 0; i < s.n;) {
        unsigned char c = (unsigned char)s.p[i];
        char esc[16];
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            sbuf_add(r, b, esc, 2);
            i++;
        } else if (c < 0x20) {
            const char *named = c == '\n' ? "\\n" : c == '\r' ? "\\r" : c == '\t' ? "\\t" : c == '\b' ? "\\b"
                                : c == '\f' ? "\\f" : NULL;
            if (named) {
                sbuf_puts(r, b, named);
            } else {
                snprintf(esc, sizeof esc, "\\u%04x", c);
                sbuf_puts(r, b, esc);
            }
            i++;
        } else if (c >= 0x80 && ensure_ascii) {
            int32_t cp = cp_next(s, &i);
            if (cp >= 0x10000) {
                cp -= 0x10000;
                snprintf(esc, sizeof esc, "\\u%04x\\u%04x", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
            } else {
                snprintf(esc, sizeof esc, "\\u%04x", cp);
            }
            sbuf_puts(r, b, esc);
        } else {
            sbuf_add(r, b, s.p + i, 1);
            i++;
        }
    }
    sbuf_puts(r, b, "\"");
}

static void json_newline(rctx *r, sbuf *b, const json_opts *o, int level)
{
    if (o->indent < 0)
        return;
    sbuf_puts(r, b, "\n");
    for (int i = 0; i < o->indent * level; i++)
        sbuf_puts(r, b, " ");
}

static int cmp_str(str a, str b)
{
    int c = memcmp(a.p, b.p, a.n < b.n ? a.n : b.n);
    return c ? c : (a.n > b.n) - (a.n < b.n);
}

/* Python's json.dumps, as transformers' tojson calls it. */
static void json_dump(rctx *r, sbuf *b, const val *v, const json_opts *o, int level, const node *at)
{
    char num[64];
    if (level > MAX_CALL_DEPTH)
        fail(r, at, "tojson: nested more than %d deep", MAX_CALL_DEPTH);
    switch (v->t) {
    case V_NONE: sbuf_puts(r, b, "null"); break;
    case V_BOOL: sbuf_puts(r, b, v->b ? "true" : "false"); break;
    case V_INT: snprintf(num, sizeof num, "%lld", (long long)v->i); sbuf_puts(r, b, num); break;
    case V_FLOAT:
        if (isnan(v->f))
            sbuf_puts(r, b, "NaN");
        else if (isinf(v->f))
            sbuf_puts(r, b, v->f > 0 ? "Infinity" : "-Infinity");
        else {
            float_repr(v->f, num, sizeof num);
            sbuf_puts(r, b, num);
        }
        break;
    case V_STR: json_string(r, b, v->s, o->ensure_ascii); break;
    case V_LIST:
        if (v->l->n == 0) {
            sbuf_puts(r, b, "[]");
            break;
        }
        sbuf_puts(r, b, "[");
        for (size_t i = 0; i < v->l->n; i++) {
            if (i)
                sbuf_add(r, b, o->item_sep.p, o->item_sep.n);
            json_newline(r, b, o, level + 1);
            json_dump(r, b, &v->l->v[i], o, level + 1, at);
        }
        json_newline(r, b, o, level);
        sbuf_puts(r, b, "]");
        break;
    case V_DICT: {
        const vdict *d = v->d;
        if (d->n == 0) {
            sbuf_puts(r, b, "{}");
            break;
        }
        size_t *order = r_alloc(r, d->n * sizeof *order);
        for (size_t i = 0; i < d->n; i++) {
            if (d->k[i].t != V_STR)
                fail(r, at, "tojson: a dict key is a %s, not a string", type_name(d->k[i].t));
            order[i] = i;
        }
        if (o->sort_keys)   /* insertion sort: dicts here are small */
            for (size_t i = 1; i < d->n; i++)
                for (size_t j = i; j > 0 && cmp_str(d->k[order[j - 1]].s, d->k[order[j]].s) > 0; j--) {
                    size_t t = order[j];
                    order[j] = order[j - 1];
                    order[j - 1] = t;
                }
        sbuf_puts(r, b, "{");
        for (size_t i = 0; i < d->n; i++) {
            if (i)
                sbuf_add(r, b, o->item_sep.p, o->item_sep.n);
            json_newline(r, b, o, level + 1);
            json_string(r, b, d->k[order[i]].s, o->ensure_ascii);
            sbuf_add(r, b, o->key_sep.p, o->key_sep.n);
            json_dump(r, b, &d->v[order[i]], o, level + 1, at);
        }
        json_newline(r, b, o, level);
        sbuf_puts(r, b, "}");
        break;
    }
    default:
        fail(r, at, "tojson: a %s is not JSON serializable", type_name(v->t));
    }
}

/* ---------------------------------------------------- values from cJSON */

static val from_json(rctx *r, const cJSON *j, int depth)
{
    if (depth > MAX_NESTING)
        fail(r, NULL, "the variables are nested more than %d deep", MAX_NESTING);
    if (cJSON_IsNull(j))
        return (val){.t = V_NONE};
    if (cJSON_IsBool(j))
        return mkbool(cJSON_IsTrue(j));
    if (cJSON_IsNumber(j)) {
        /* cJSON keeps no int/float distinction: an integral value within
         * 2^53 is an int, as it nearly always was in the request. */
        double d = j->valuedouble;
        if (d == floor(d) && fabs(d) <= 9007199254740992.0)
            return mkint((int64_t)d);
        return (val){.t = V_FLOAT, .f = d};
    }
    if (cJSON_IsString(j)) {
        const char *s = j->valuestring ? j->valuestring : "";
        size_t n = strlen(s);
        if (tp_utf8_first_invalid(s, n) != n)
            fail(r, NULL, "a variable's string is not valid UTF-8");
        return mkstr(s, n);   /* cJSON's memory outlives the render */
    }
    if (cJSON_IsArray(j)) {
        vlist *l = new_list(r, (size_t)cJSON_GetArraySize(j));
        for (const cJSON *c = j->child; c; c = c->next)
            list_push(r, l, from_json(r, c, depth + 1));
        return mklist(l);
    }
    if (cJSON_IsObject(j)) {
        vdict *d = new_dict(r);
        for (const cJSON *c = j->child; c; c = c->next)
            dict_set(r, d, cstr(c->string ? c->string : ""), from_json(r, c, depth + 1));
        return (val){.t = V_DICT, .d = d};
    }
    return (val){.t = V_NONE};
}

/* -------------------------------------------------------- value helpers */

static bool truthy(const val *v)
{
    switch (v->t) {
    case V_UNDEF: case V_NONE: return false;
    case V_BOOL: return v->b;
    case V_INT: return v->i != 0;
    case V_FLOAT: return v->f != 0;
    case V_STR: return v->s.n != 0;
    case V_LIST: return v->l->n != 0;
    case V_DICT: return v->d->n != 0;
    default: return true;
    }
}

static bool is_num(const val *v) { return v->t == V_INT || v->t == V_FLOAT || v->t == V_BOOL; }
static double num_of(const val *v) { return v->t == V_FLOAT ? v->f : v->t == V_INT ? (double)v->i : v->b; }
static bool is_intlike(const val *v) { return v->t == V_INT || v->t == V_BOOL; }
static int64_t int_of(const val *v) { return v->t == V_INT ? v->i : v->b; }

static bool val_eq(const val *a, const val *b)
{
    if (is_num(a) && is_num(b)) {
        if (is_intlike(a) && is_intlike(b))
            return int_of(a) == int_of(b);
        return num_of(a) == num_of(b);
    }
    if (a->t != b->t)
        return false;
    switch (a->t) {
    case V_UNDEF: case V_NONE: return true;
    case V_STR: return a->s.n == b->s.n && memcmp(a->s.p, b->s.p, a->s.n) == 0;
    case V_LIST:
        if (a->l->n != b->l->n)
            return false;
        for (size_t i = 0; i < a->l->n; i++)
            if (!val_eq(&a->l->v[i], &b->l->v[i]))
                return false;
        return true;
    case V_DICT:
        if (a->d->n != b->d->n)
            return false;
        for (size_t i = 0; i < a->d->n; i++) {
            const val *other = dict_find(b->d, &a->d->k[i]);
            if (!other || !val_eq(&a->d->v[i], other))
                return false;
        }
        return true;
    case V_NS: return a->d == b->d;
    case V_MACRO: return a->m == b->m;
    case V_FUNC: return a->fn == b->fn;
    default: return false;
    }
}

static void need_defined(rctx *r, const node *at, const val *v)
{
    if (v->t == V_UNDEF)
        fail(r, at, "'%.*s' is undefined", (int)(v->s.n > 80 ? 80 : v->s.n), v->s.p);
}

/* What a for loop or a filter iterates: lists as they are, dict keys,
 * string characters; undefined is empty. */
static vlist *iter_list(rctx *r, const node *at, const val *v)
{
    switch (v->t) {
    case V_UNDEF: return new_list(r, 1);
    case V_LIST: return v->l;
    case V_DICT: {
        vlist *l = new_list(r, v->d->n);
        for (size_t i = 0; i < v->d->n; i++)
            list_push(r, l, v->d->k[i]);
        return l;
    }
    case V_STR: {
        vlist *l = new_list(r, v->s.n);
        for (size_t i = 0; i < v->s.n;) {
            size_t j = i;
            cp_next(v->s, &j);
            list_push(r, l, mkstr(v->s.p + i, j - i));
            i = j;
        }
        return l;
    }
    default:
        fail(r, at, "a %s is not iterable", type_name(v->t));
    }
}

/* Python index normalisation: negative from the end; false when outside. */
static bool norm_index(int64_t i, size_t n, size_t *out)
{
    if (i < 0)
        i += (int64_t)n;
    if (i < 0 || (uint64_t)i >= n)
        return false;
    *out = (size_t)i;
    return true;
}

/* obj[key] (jinja2's getitem, then the attribute) and obj.name (getattr,
 * then the item): both end in undefined rather than an error. */
static val get_item(rctx *r, const node *at, const val *obj, const val *key)
{
    need_defined(r, at, obj);
    if ((obj->t == V_DICT || obj->t == V_NS)) {
        val *v = dict_find(obj->d, key);
        if (v)
            return *v;
    } else if (obj->t == V_LIST && is_intlike(key)) {
        size_t i;
        if (norm_index(int_of(key), obj->l->n, &i))
            return obj->l->v[i];
    } else if (obj->t == V_STR && is_intlike(key)) {
        size_t n = cp_count(obj->s), i;
        if (norm_index(int_of(key), n, &i)) {
            size_t a = cp_offset(obj->s, i), b = cp_offset(obj->s, i + 1);
            return mkstr(obj->s.p + a, b - a);
        }
    }
    sbuf what = {0};
    put_str(r, &what, obj->t == V_STR ? &(val){.t = V_STR, .s = {"str object", 10}} : obj, false);
    sbuf_puts(r, &what, " has no element ");
    put_str(r, &what, key, true);
    return mkundef(sbuf_str(&what));
}

static val get_attr(rctx *r, const node *at, const val *obj, str name)
{
    need_defined(r, at, obj);
    if (obj->t == V_DICT || obj->t == V_NS) {
        val *v = dict_find_str(obj->d, name);
        if (v)
            return *v;
    }
    sbuf what = {0};
    sbuf_puts(r, &what, type_name(obj->t));
    sbuf_puts(r, &what, " object has no attribute '");
    sbuf_add(r, &what, name.p, name.n);
    sbuf_puts(r, &what, "'");
    return mkundef(sbuf_str(&what));
}

/* ------------------------------------------------------------ variables */

static val *scope_find(frame *f, str name)
{
    for (; f; f = f->parent) {
        val *v = dict_find_str(&f->vars, name);
        if (v)
            return v;
    }
    return NULL;
}

static void scope_set(rctx *r, frame *f, str name, val v)
{
    dict_set(r, &f->vars, mkstr(name.p, name.n), v);
}

static frame *push_frame(rctx *r, frame *parent)
{
    frame *f = r_alloc(r, sizeof *f);
    memset(f, 0, sizeof *f);
    f->parent = parent;
    return f;
}

/* ------------------------------------------------------------- evaluate */

static val eval(rctx *r, frame *f, const node *n);
static void exec_body(rctx *r, frame *f, const nodes *body);

typedef struct args {
    val *pos;
    size_t n_pos;
    str *kw_names;
    val *kw;
    size_t n_kw;
} args;

static args eval_args(rctx *r, frame *f, const node *call)
{
    args a = {.n_pos = call->body.n, .n_kw = call->kw.n, .kw_names = call->kw_names};
    a.pos = r_alloc(r, (a.n_pos + 1) * sizeof *a.pos);
    a.kw = r_alloc(r, (a.n_kw + 1) * sizeof *a.kw);
    for (size_t i = 0; i < a.n_pos; i++)
        a.pos[i] = eval(r, f, call->body.v[i]);
    for (size_t i = 0; i < a.n_kw; i++)
        a.kw[i] = eval(r, f, call->kw.v[i]);
    return a;
}

/* Argument k of a filter / function / method: positional k, else the
 * keyword name, else NULL. */
static const val *arg(const args *a, size_t k, const char *name)
{
    if (k < a->n_pos)
        return &a->pos[k];
    for (size_t i = 0; name && i < a->n_kw; i++)
        if (str_is(a->kw_names[i], name))
            return &a->kw[i];
    return NULL;
}

static void check_arity(rctx *r, const node *at, const args *a, size_t max_pos, const char *const *kw_ok, size_t n_kw_ok,
                        const char *what)
{
    if (a->n_pos > max_pos)
        fail(r, at, "%s takes at most %zu positional arguments, %zu given", what, max_pos, a->n_pos);
    for (size_t i = 0; i < a->n_kw; i++) {
        bool ok = false;
        for (size_t k = 0; k < n_kw_ok; k++)
            ok |= str_is(a->kw_names[i], kw_ok[k]);
        if (!ok)
            fail(r, at, "%s: unexpected keyword argument '%.*s'", what, (int)a->kw_names[i].n, a->kw_names[i].p);
    }
}
#define ARITY(r, at, a, max, what, ...) \
    check_arity(r, at, a, max, (const char *const[]){"", __VA_ARGS__}, \
                sizeof((const char *const[]){"", __VA_ARGS__}) / sizeof(char *), what)

static str want_str(rctx *r, const node *at, const val *v, const char *what)
{
    if (!v || v->t != V_STR)
        fail(r, at, "%s: a string expected, got %s", what, v ? type_name(v->t) : "nothing");
    return v->s;
}

static int64_t want_int(rctx *r, const node *at, const val *v, const char *what)
{
    if (!v || !is_intlike(v))
        fail(r, at, "%s: an integer expected, got %s", what, v ? type_name(v->t) : "nothing");
    return int_of(v);
}

static val concat_str(rctx *r, str a, str b)
{
    char *c = r_alloc(r, a.n + b.n + 1);
    memcpy(c, a.p, a.n);
    memcpy(c + a.n, b.p, b.n);
    c[a.n + b.n] = '\0';
    return mkstr(c, a.n + b.n);
}

/* s.replace(old, new[, count]) */
static val replace_str(rctx *r, str s, str old, str rep, int64_t count)
{
    sbuf b = {0};
    size_t i = 0;
    int64_t done = 0;
    if (old.n == 0) {   /* Python inserts rep between every character */
        for (size_t k = 0; k <= s.n && (count < 0 || done < count);) {
            sbuf_add(r, &b, rep.p, rep.n);
            done++;
            if (k == s.n)
                break;
            size_t j = k;
            cp_next(s, &j);
            sbuf_add(r, &b, s.p + k, j - k);
            k = j;
            i = j;
        }
        sbuf_add(r, &b, s.p + i, s.n - i);
        return mkstr(b.p ? b.p : "", b.n);
    }
    while (i < s.n && (count < 0 || done < count)) {
        const char *hit = memmem(s.p + i, s.n - i, old.p, old.n);
        if (!hit)
            break;
        sbuf_add(r, &b, s.p + i, (size_t)(hit - (s.p + i)));
        sbuf_add(r, &b, rep.p, rep.n);
        i = (size_t)(hit - s.p) + old.n;
        done++;
    }
    sbuf_add(r, &b, s.p + i, s.n - i);
    return mkstr(b.p ? b.p : "", b.n);
}

/* upper/lower/title/capitalize through utf8proc's simple case mappings. */
enum { CASE_UPPER, CASE_LOWER, CASE_TITLE, CASE_CAPITALIZE };
static val change_case(rctx *r, str s, int how)
{
    char *o = r_alloc(r, s.n * 3 + 1);   /* a case mapping at most triples a UTF-8 sequence's length */
    size_t n = 0;
    bool word_start = true, first = true;
    for (size_t i = 0; i < s.n;) {
        int32_t c = cp_next(s, &i), m;
        switch (how) {
        case CASE_UPPER: m = utf8proc_toupper(c); break;
        case CASE_LOWER: m = utf8proc_tolower(c); break;
        case CASE_TITLE: m = word_start ? utf8proc_totitle(c) : utf8proc_tolower(c); break;
        default: m = first ? utf8proc_totitle(c) : utf8proc_tolower(c); break;
        }
        bool cased = utf8proc_tolower(c) != c || utf8proc_toupper(c) != c || utf8proc_totitle(c) != c;
        word_start = !cased && !(how == CASE_TITLE && utf8proc_category(c) >= UTF8PROC_CATEGORY_LU &&
                                 utf8proc_category(c) <= UTF8PROC_CATEGORY_LO);
        first = false;
        n += utf8_put(o + n, (uint32_t)m);
    }
    o[n] = '\0';
    return mkstr(o, n);
}

static bool starts_or_ends(rctx *r, const node *at, str s, const val *affix, bool ends)
{
    if (affix && affix->t == V_LIST) {
        for (size_t i = 0; i < affix->l->n; i++)
            if (starts_or_ends(r, at, s, &affix->l->v[i], ends))
                return true;
        return false;
    }
    str a = want_str(r, at, affix, ends ? "endswith" : "startswith");
    if (a.n > s.n)
        return false;
    return memcmp(ends ? s.p + s.n - a.n : s.p, a.p, a.n) == 0;
}

/* s.split(sep=None, maxsplit=-1) */
static val split_str(rctx *r, const node *at, str s, const val *sep, int64_t maxsplit)
{
    vlist *l = new_list(r, 4);
    if (sep && sep->t != V_NONE) {
        str d = want_str(r, at, sep, "split");
        if (d.n == 0)
            fail(r, at, "split: empty separator");
        size_t i = 0;
        while (maxsplit < 0 || (int64_t)l->n < maxsplit) {
            const char *hit = memmem(s.p + i, s.n - i, d.p, d.n);
            if (!hit)
                break;
            list_push(r, l, mkstr(s.p + i, (size_t)(hit - (s.p + i))));
            i = (size_t)(hit - s.p) + d.n;
        }
        list_push(r, l, mkstr(s.p + i, s.n - i));
        return mklist(l);
    }
    /* whitespace runs separate; none at either end */
    size_t i = 0;
    for (;;) {
        while (i < s.n) {
            size_t j = i;
            if (!py_space(cp_next(s, &j)))
                break;
            i = j;
        }
        if (i >= s.n)
            break;
        if (maxsplit >= 0 && (int64_t)l->n >= maxsplit) {
            str rest = strip_str((str){s.p + i, s.n - i}, NULL, false, true);
            list_push(r, l, mkstr(rest.p, rest.n));
            break;
        }
        size_t start = i;
        while (i < s.n) {
            size_t j = i;
            if (py_space(cp_next(s, &j)))
                break;
            i = j;
        }
        list_push(r, l, mkstr(s.p + start, i - start));
    }
    return mklist(l);
}

static val str_method(rctx *r, const node *at, str s, str name, const args *a)
{
    if (str_is(name, "startswith") || str_is(name, "endswith")) {
        ARITY(r, at, a, 1, "startswith/endswith");
        return mkbool(starts_or_ends(r, at, s, arg(a, 0, NULL), str_is(name, "endswith")));
    }
    if (str_is(name, "strip") || str_is(name, "lstrip") || str_is(name, "rstrip")) {
        ARITY(r, at, a, 1, "strip");
        const val *chars = arg(a, 0, NULL);
        str c;
        if (chars && chars->t != V_NONE)
            c = want_str(r, at, chars, "strip");
        str out = strip_str(s, chars && chars->t != V_NONE ? &c : NULL, name.p[0] != 'r', name.p[0] != 'l');
        return mkstr(out.p, out.n);
    }
    if (str_is(name, "split")) {
        ARITY(r, at, a, 2, "split", "sep", "maxsplit");
        const val *m = arg(a, 1, "maxsplit");
        return split_str(r, at, s, arg(a, 0, "sep"), m ? want_int(r, at, m, "split") : -1);
    }
    if (str_is(name, "upper") || str_is(name, "lower") || str_is(name, "title") || str_is(name, "capitalize")) {
        ARITY(r, at, a, 0, "upper/lower");
        return change_case(r, s, str_is(name, "upper") ? CASE_UPPER : str_is(name, "lower") ? CASE_LOWER
                                 : str_is(name, "title") ? CASE_TITLE : CASE_CAPITALIZE);
    }
    if (str_is(name, "replace")) {
        ARITY(r, at, a, 3, "replace");
        const val *c = arg(a, 2, NULL);
        return replace_str(r, s, want_str(r, at, arg(a, 0, NULL), "replace"), want_str(r, at, arg(a, 1, NULL), "replace"),
                           c ? want_int(r, at, c, "replace") : -1);
    }
    if (str_is(name, "find") || str_is(name, "count")) {
        ARITY(r, at, a, 1, "find/count");
        str sub = want_str(r, at, arg(a, 0, NULL), "find");
        if (str_is(name, "count")) {
            int64_t k = 0;
            if (sub.n == 0)
                return mkint((int64_t)cp_count(s) + 1);
            for (size_t i = 0; i <= s.n;) {
                const char *hit = memmem(s.p + i, s.n - i, sub.p, sub.n);
                if (!hit)
                    break;
                k++;
                i = (size_t)(hit - s.p) + sub.n;
            }
            return mkint(k);
        }
        const char *hit = memmem(s.p, s.n, sub.p, sub.n);
        return mkint(hit ? (int64_t)cp_count((str){s.p, (size_t)(hit - s.p)}) : -1);
    }
    if (str_is(name, "join")) {
        ARITY(r, at, a, 1, "join");
        vlist *l = iter_list(r, at, arg(a, 0, NULL) ? arg(a, 0, NULL) : &(val){.t = V_UNDEF});
        sbuf b = {0};
        for (size_t i = 0; i < l->n; i++) {
            if (i)
                sbuf_add(r, &b, s.p, s.n);
            str e = want_str(r, at, &l->v[i], "join");
            sbuf_add(r, &b, e.p, e.n);
        }
        return mkstr(b.p ? b.p : "", b.n);
    }
    fail(r, at, "method '%.*s' of a string is not supported", (int)name.n, name.p);
}

static val dict_items(rctx *r, const vdict *d)
{
    vlist *l = new_list(r, d->n);
    for (size_t i = 0; i < d->n; i++) {
        vlist *pair = new_list(r, 2);
        list_push(r, pair, d->k[i]);
        list_push(r, pair, d->v[i]);
        list_push(r, l, mklist(pair));
    }
    return mklist(l);
}

static val method_call(rctx *r, const node *at, const val *obj, str name, const args *a)
{
    need_defined(r, at, obj);
    if (obj->t == V_STR)
        return str_method(r, at, obj->s, name, a);
    if (obj->t == V_DICT) {
        if (str_is(name, "items") || str_is(name, "keys") || str_is(name, "values")) {
            ARITY(r, at, a, 0, "items/keys/values");
            if (name.p[0] == 'i')
                return dict_items(r, obj->d);
            vlist *l = new_list(r, obj->d->n);
            for (size_t i = 0; i < obj->d->n; i++)
                list_push(r, l, name.p[0] == 'k' ? obj->d->k[i] : obj->d->v[i]);
            return mklist(l);
        }
        if (str_is(name, "get")) {
            ARITY(r, at, a, 2, "get");
            const val *k = arg(a, 0, NULL), *def = arg(a, 1, NULL);
            if (!k)
                fail(r, at, "get: a key expected");
            val *v = dict_find(obj->d, k);
            return v ? *v : def ? *def : (val){.t = V_NONE};
        }
    }
    if (obj->t == V_LIST && (str_is(name, "append") || str_is(name, "pop") || str_is(name, "insert") ||
                             str_is(name, "extend") || str_is(name, "remove") || str_is(name, "clear")))
        fail(r, at, "method '%.*s' of a list is not supported (the template sandbox does not change lists)",
             (int)name.n, name.p);
    fail(r, at, "method '%.*s' of a %s is not supported", (int)name.n, name.p, type_name(obj->t));
}

static bool run_test(rctx *r, const node *at, str name, const val *v, const args *a);
static val apply_filter(rctx *r, const node *at, str name, val v, const args *a);

/* map / select / reject / selectattr / rejectattr */
static val filter_seq(rctx *r, const node *at, str name, const val *v, const args *a)
{
    vlist *in = iter_list(r, at, v), *out = new_list(r, in->n);
    bool is_map = str_is(name, "map");
    bool attr = str_is(name, "selectattr") || str_is(name, "rejectattr");
    bool keep_if = str_is(name, "select") || str_is(name, "selectattr");
    if (is_map) {
        const val *attribute = arg(a, a->n_pos ? 999 : 0, "attribute");
        if (attribute) {
            const val *def = arg(a, 999, "default");
            for (size_t i = 0; i < in->n; i++) {
                val e = attribute->t == V_INT ? get_item(r, at, &in->v[i], attribute)
                                              : get_attr(r, at, &in->v[i], want_str(r, at, attribute, "map"));
                list_push(r, out, e.t == V_UNDEF && def ? *def : e);
            }
            return mklist(out);
        }
        str fname = want_str(r, at, arg(a, 0, NULL), "map");
        if (!IN_LIST(fname, known_filters) || IN_LIST(fname, unsupported_filters))
            fail(r, at, "filter '%.*s' is not supported", (int)fname.n, fname.p);
        args rest = {.pos = a->pos + 1, .n_pos = a->n_pos - 1, .kw_names = a->kw_names, .kw = a->kw, .n_kw = a->n_kw};
        for (size_t i = 0; i < in->n; i++)
            list_push(r, out, apply_filter(r, at, fname, in->v[i], &rest));
        return mklist(out);
    }
    size_t first_test_arg = attr ? 1 : 0;
    str attr_name = {0};
    if (attr)
        attr_name = want_str(r, at, arg(a, 0, NULL), name.p);
    const val *test = arg(a, first_test_arg, NULL);
    str tname = test ? want_str(r, at, test, name.p) : (str){0};
    if (test && !IN_LIST(tname, known_tests))
        fail(r, at, "test '%.*s' is not supported", (int)tname.n, tname.p);
    args targs = {.pos = a->pos + first_test_arg + 1,
                  .n_pos = a->n_pos > first_test_arg + 1 ? a->n_pos - first_test_arg - 1 : 0};
    for (size_t i = 0; i < in->n; i++) {
        val e = attr ? get_attr(r, at, &in->v[i], attr_name) : in->v[i];
        bool ok = test ? run_test(r, at, tname, &e, &targs) : truthy(&e);
        if (ok == keep_if)
            list_push(r, out, in->v[i]);
    }
    return mklist(out);
}

static json_opts tojson_opts(rctx *r, const node *at, const args *a)
{
    ARITY(r, at, a, 0, "tojson", "indent", "ensure_ascii", "sort_keys", "separators");
    json_opts o = {.indent = -1};
    const val *indent = arg(a, 999, "indent"), *ea = arg(a, 999, "ensure_ascii"), *sk = arg(a, 999, "sort_keys"),
              *sep = arg(a, 999, "separators");
    if (indent && indent->t != V_NONE) {
        int64_t k = want_int(r, at, indent, "tojson indent");
        o.indent = k < 0 ? 0 : k > 64 ? 64 : (int)k;
    }
    o.ensure_ascii = ea && truthy(ea);
    o.sort_keys = sk && truthy(sk);
    o.item_sep = o.indent >= 0 ? (str){",", 1} : (str){", ", 2};
    o.key_sep = (str){": ", 2};
    if (sep && sep->t != V_NONE) {
        if (sep->t != V_LIST || sep->l->n != 2)
            fail(r, at, "tojson separators: a pair of strings expected");
        o.item_sep = want_str(r, at, &sep->l->v[0], "tojson separators");
        o.key_sep = want_str(r, at, &sep->l->v[1], "tojson separators");
    }
    return o;
}

static val to_number(rctx *r, const val *v, bool want_float, const val *def)
{
    if (is_num(v))
        return want_float ? (val){.t = V_FLOAT, .f = num_of(v)} : v->t == V_FLOAT ? mkint((int64_t)v->f) : mkint(int_of(v));
    if (v->t == V_STR) {
        char buf[64];
        str s = strip_str(v->s, NULL, true, true);
        if (s.n && s.n < sizeof buf) {
            memcpy(buf, s.p, s.n);
            buf[s.n] = '\0';
            char *end;
            errno = 0;
            if (!want_float) {
                long long i = strtoll(buf, &end, 10);
                if (!*end && !errno)
                    return mkint(i);
            }
            double d = strtod(buf, &end);
            if (!*end)
                return want_float ? (val){.t = V_FLOAT, .f = d} : mkint((int64_t)d);
        }
    }
    return def ? *def : want_float ? (val){.t = V_FLOAT, .f = 0} : mkint(0);
}

static val indent_str(rctx *r, const node *at, str s, const args *a)
{
    ARITY(r, at, a, 3, "indent", "width", "first", "blank");
    const val *w = arg(a, 0, "width"), *first = arg(a, 1, "first"), *blank = arg(a, 2, "blank");
    str pad = {"    ", 4};
    if (w && w->t == V_STR)
        pad = w->s;
    else if (w) {
        int64_t k = want_int(r, at, w, "indent");
        char *p = r_alloc(r, k > 0 ? (size_t)(k > 256 ? 256 : k) : 1);
        pad = (str){p, k > 0 ? (size_t)(k > 256 ? 256 : k) : 0};
        memset(p, ' ', pad.n);
    }
    sbuf b = {0};
    bool line_start = true, first_line = true;
    for (size_t i = 0; i < s.n; i++) {
        if (line_start) {
            /* the line's content decides "blank" */
            size_t e = i;
            while (e < s.n && s.p[e] != '\n')
                e++;
            bool is_blank = strip_str((str){s.p + i, e - i}, NULL, true, true).n == 0;
            if ((!first_line || (first && truthy(first))) && (!is_blank || (blank && truthy(blank))))
                sbuf_add(r, &b, pad.p, pad.n);
            line_start = false;
        }
        sbuf_add(r, &b, s.p + i, 1);
        if (s.p[i] == '\n') {
            line_start = true;
            first_line = false;
        }
    }
    if (s.n == 0 && first && truthy(first))
        sbuf_add(r, &b, pad.p, pad.n);
    return mkstr(b.p ? b.p : "", b.n);
}

static val apply_filter(rctx *r, const node *at, str name, val v, const args *a)
{
#define F(x) str_is(name, x)
    if (F("safe")) {
        return v;
    }
    if (F("default") || F("d")) {
        ARITY(r, at, a, 2, "default", "default_value", "boolean");
        const val *def = arg(a, 0, "default_value"), *boolean = arg(a, 1, "boolean");
        bool use = v.t == V_UNDEF || (boolean && truthy(boolean) && !truthy(&v));
        return use ? (def ? *def : cstr("")) : v;
    }
    if (F("length") || F("count")) {
        ARITY(r, at, a, 0, "length");
        switch (v.t) {
        case V_UNDEF: return mkint(0);
        case V_STR: return mkint((int64_t)cp_count(v.s));
        case V_LIST: return mkint((int64_t)v.l->n);
        case V_DICT: return mkint((int64_t)v.d->n);
        default: fail(r, at, "length: a %s has no length", type_name(v.t));
        }
    }
    if (F("tojson")) {
        json_opts o = tojson_opts(r, at, a);
        need_defined(r, at, &v);
        sbuf b = {0};
        json_dump(r, &b, &v, &o, 0, at);
        return mkstr(b.p ? b.p : "", b.n);
    }
    if (F("string")) {
        ARITY(r, at, a, 0, "string");
        str s = to_str(r, &v);
        return mkstr(s.p, s.n);
    }
    if (F("items")) {
        ARITY(r, at, a, 0, "items");
        if (v.t == V_UNDEF)
            return mklist(new_list(r, 1));
        if (v.t != V_DICT)
            fail(r, at, "items: a dict expected, got %s", type_name(v.t));
        return dict_items(r, v.d);
    }
    if (F("list")) {
        ARITY(r, at, a, 0, "list");
        vlist *src = iter_list(r, at, &v), *l = new_list(r, src->n);
        for (size_t i = 0; i < src->n; i++)
            list_push(r, l, src->v[i]);
        return mklist(l);
    }
    if (F("map") || F("select") || F("reject") || F("selectattr") || F("rejectattr"))
        return filter_seq(r, at, name, &v, a);
    if (F("join")) {
        ARITY(r, at, a, 2, "join", "d", "attribute");
        const val *sep = arg(a, 0, "d"), *attribute = arg(a, 1, "attribute");
        str d = sep ? want_str(r, at, sep, "join") : (str){"", 0};
        vlist *l = iter_list(r, at, &v);
        sbuf b = {0};
        for (size_t i = 0; i < l->n; i++) {
            if (i)
                sbuf_add(r, &b, d.p, d.n);
            val e = attribute ? get_attr(r, at, &l->v[i], want_str(r, at, attribute, "join")) : l->v[i];
            put_str(r, &b, &e, false);
        }
        return mkstr(b.p ? b.p : "", b.n);
    }
    if (F("first") || F("last")) {
        ARITY(r, at, a, 0, "first/last");
        vlist *l = iter_list(r, at, &v);
        if (l->n == 0)
            return mkundef((str){"empty sequence", 14});
        return F("first") ? l->v[0] : l->v[l->n - 1];
    }
    if (F("reverse")) {
        ARITY(r, at, a, 0, "reverse");
        if (v.t == V_STR) {
            char *o = r_alloc(r, v.s.n + 1);
            size_t n = v.s.n;
            for (size_t i = 0; i < v.s.n;) {
                size_t j = i;
                cp_next(v.s, &j);
                memcpy(o + n - (j - i), v.s.p + i, j - i);
                n -= j - i;
                i = j;
            }
            return mkstr(o, v.s.n);
        }
        vlist *src = iter_list(r, at, &v), *l = new_list(r, src->n);
        for (size_t i = src->n; i > 0; i--)
            list_push(r, l, src->v[i - 1]);
        return mklist(l);
    }
    if (F("unique")) {
        ARITY(r, at, a, 0, "unique");
        vlist *src = iter_list(r, at, &v), *l = new_list(r, src->n);
        for (size_t i = 0; i < src->n; i++) {
            bool seen = false;
            for (size_t k = 0; k < l->n && !seen; k++)
                seen = val_eq(&l->v[k], &src->v[i]);
            if (!seen)
                list_push(r, l, src->v[i]);
        }
        return mklist(l);
    }
    if (F("int") || F("float")) {
        ARITY(r, at, a, 1, "int/float", "default");
        return to_number(r, &v, F("float"), arg(a, 0, "default"));
    }
    if (F("abs")) {
        ARITY(r, at, a, 0, "abs");
        if (v.t == V_FLOAT)
            return (val){.t = V_FLOAT, .f = fabs(v.f)};
        if (is_intlike(&v) && int_of(&v) != INT64_MIN)
            return mkint(int_of(&v) < 0 ? -int_of(&v) : int_of(&v));
        fail(r, at, "abs: a number expected, got %s", type_name(v.t));
    }
    /* the string filters: str(value) first, as jinja2's soft_str */
    str s = to_str(r, &v);
    if (F("trim")) {
        ARITY(r, at, a, 1, "trim", "chars");
        const val *chars = arg(a, 0, "chars");
        str c;
        if (chars && chars->t != V_NONE)
            c = want_str(r, at, chars, "trim");
        str t = strip_str(s, chars && chars->t != V_NONE ? &c : NULL, true, true);
        return mkstr(t.p, t.n);
    }
    if (F("upper") || F("lower") || F("title") || F("capitalize")) {
        ARITY(r, at, a, 0, "upper/lower");
        return change_case(r, s, F("upper") ? CASE_UPPER : F("lower") ? CASE_LOWER : F("title") ? CASE_TITLE
                                                                                           : CASE_CAPITALIZE);
    }
    if (F("replace")) {
        ARITY(r, at, a, 3, "replace", "old", "new", "count");
        const val *c = arg(a, 2, "count");
        return replace_str(r, s, want_str(r, at, arg(a, 0, "old"), "replace"), want_str(r, at, arg(a, 1, "new"), "replace"),
                           c && c->t != V_NONE ? want_int(r, at, c, "replace") : -1);
    }
    if (F("indent"))
        return indent_str(r, at, s, a);
#undef F
    fail(r, at, "filter '%.*s' is not supported", (int)name.n, name.p);
}

static bool all_case(str s, bool upper)
{
    bool cased = false;
    for (size_t i = 0; i < s.n;) {
        int32_t c = cp_next(s, &i);
        if (upper ? utf8proc_tolower(c) != c && utf8proc_toupper(c) == c : utf8proc_toupper(c) != c && utf8proc_tolower(c) == c)
            cased = true;
        else if (upper ? utf8proc_toupper(c) != c : utf8proc_tolower(c) != c)
            return false;
    }
    return cased;
}

static int compare(rctx *r, const node *at, const val *a, const val *b);

static bool run_test(rctx *r, const node *at, str name, const val *v, const args *a)
{
#define T(x) str_is(name, x)
    const val *x = arg(a, 0, NULL);
    if (T("defined")) return v->t != V_UNDEF;
    if (T("undefined")) return v->t == V_UNDEF;
    if (T("none")) return v->t == V_NONE;
    if (T("string")) return v->t == V_STR;
    if (T("number")) return is_num(v);
    if (T("integer")) return v->t == V_INT;
    if (T("float")) return v->t == V_FLOAT;
    if (T("boolean")) return v->t == V_BOOL;
    if (T("true")) return v->t == V_BOOL && v->b;
    if (T("false")) return v->t == V_BOOL && !v->b;
    if (T("mapping")) return v->t == V_DICT;
    if (T("iterable")) return v->t == V_STR || v->t == V_LIST || v->t == V_DICT;
    if (T("sequence")) return v->t == V_STR || v->t == V_LIST || v->t == V_DICT;
    if (T("callable")) return v->t == V_MACRO || v->t == V_FUNC;
    if (T("lower") || T("upper")) return v->t == V_STR && all_case(v->s, T("upper"));
    if (T("even") || T("odd") || T("divisibleby")) {
        int64_t k = want_int(r, at, v, "test");
        if (T("divisibleby")) {
            int64_t d = want_int(r, at, x, "divisibleby");
            if (d == 0)
                fail(r, at, "divisibleby 0");
            return d == -1 || k % d == 0;
        }
        return (k % 2 != 0) == T("odd");
    }
    if (!x)
        fail(r, at, "test '%.*s' needs an argument", (int)name.n, name.p);
    if (T("eq") || T("equalto") || T("==")) return val_eq(v, x);
    if (T("ne") || T("!=")) return !val_eq(v, x);
    if (T("sameas")) return v->t == x->t && (v->t == V_NONE || v->t == V_UNDEF || (v->t == V_BOOL && v->b == x->b) || val_eq(v, x));
    if (T("lt") || T("<")) return compare(r, at, v, x) < 0;
    if (T("le") || T("<=")) return compare(r, at, v, x) <= 0;
    if (T("gt") || T(">")) return compare(r, at, v, x) > 0;
    if (T("ge") || T(">=")) return compare(r, at, v, x) >= 0;
    if (T("in")) {
        if (x->t == V_STR)
            return v->t == V_STR && memmem(x->s.p, x->s.n, v->s.p, v->s.n) != NULL;
        if (x->t == V_DICT)
            return dict_find(x->d, v) != NULL;
        vlist *l = iter_list(r, at, x);
        for (size_t i = 0; i < l->n; i++)
            if (val_eq(&l->v[i], v))
                return true;
        return false;
    }
#undef T
    fail(r, at, "test '%.*s' is not supported", (int)name.n, name.p);
}

static int compare(rctx *r, const node *at, const val *a, const val *b)
{
    if (is_num(a) && is_num(b)) {
        if (is_intlike(a) && is_intlike(b))
            return (int_of(a) > int_of(b)) - (int_of(a) < int_of(b));
        double x = num_of(a), y = num_of(b);
        return (x > y) - (x < y);
    }
    if (a->t == V_STR && b->t == V_STR)
        return cmp_str(a->s, b->s);
    need_defined(r, at, a);
    need_defined(r, at, b);
    fail(r, at, "cannot order a %s and a %s", type_name(a->t), type_name(b->t));
}

static bool contains(rctx *r, const node *at, const val *needle, const val *hay)
{
    need_defined(r, at, hay);
    if (hay->t == V_STR) {
        if (needle->t != V_STR)
            fail(r, at, "'in <string>' needs a string on the left, not a %s", type_name(needle->t));
        return memmem(hay->s.p, hay->s.n, needle->s.p, needle->s.n) != NULL || needle->s.n == 0;
    }
    if (hay->t == V_DICT || hay->t == V_NS)
        return dict_find(hay->d, needle) != NULL;
    if (hay->t == V_LIST) {
        for (size_t i = 0; i < hay->l->n; i++)
            if (val_eq(&hay->l->v[i], needle))
                return true;
        return false;
    }
    fail(r, at, "'in' needs a string, list or dict on the right, not a %s", type_name(hay->t));
}

static val arith(rctx *r, const node *at, int op, val a, val b)
{
    if (op == OP_CONCAT)
        return concat_str(r, to_str(r, &a), to_str(r, &b));
    need_defined(r, at, &a);
    need_defined(r, at, &b);
    if (op == OP_ADD && a.t == V_STR && b.t == V_STR)
        return concat_str(r, a.s, b.s);
    if (op == OP_ADD && a.t == V_LIST && b.t == V_LIST) {
        vlist *l = new_list(r, a.l->n + b.l->n);
        for (size_t i = 0; i < a.l->n; i++)
            list_push(r, l, a.l->v[i]);
        for (size_t i = 0; i < b.l->n; i++)
            list_push(r, l, b.l->v[i]);
        return mklist(l);
    }
    if (op == OP_MUL && ((a.t == V_STR && is_intlike(&b)) || (b.t == V_STR && is_intlike(&a)))) {
        str s = a.t == V_STR ? a.s : b.s;
        int64_t k = a.t == V_STR ? int_of(&b) : int_of(&a);
        if (k <= 0 || s.n == 0)
            return cstr("");
        if ((uint64_t)k > MAX_OUTPUT / s.n)
            fail(r, at, "string repeated past %u MiB", MAX_OUTPUT >> 20);
        char *o = r_alloc(r, s.n * (size_t)k + 1);
        for (int64_t i = 0; i < k; i++)
            memcpy(o + (size_t)i * s.n, s.p, s.n);
        return mkstr(o, s.n * (size_t)k);
    }
    if (!is_num(&a) || !is_num(&b))
        fail(r, at, "unsupported operand types for an arithmetic operator: %s and %s", type_name(a.t), type_name(b.t));
    if (is_intlike(&a) && is_intlike(&b) && op != OP_DIV) {
        int64_t x = int_of(&a), y = int_of(&b), z = 0;
        switch (op) {
        case OP_ADD: if (__builtin_add_overflow(x, y, &z)) goto overflow; return mkint(z);
        case OP_SUB: if (__builtin_sub_overflow(x, y, &z)) goto overflow; return mkint(z);
        case OP_MUL: if (__builtin_mul_overflow(x, y, &z)) goto overflow; return mkint(z);
        case OP_FLOORDIV: case OP_MOD: {
            if (y == 0)
                fail(r, at, "integer division or modulo by zero");
            if (x == INT64_MIN && y == -1)
                goto overflow;
            int64_t q = x / y, m = x % y;
            if (m != 0 && ((m < 0) != (y < 0))) {   /* Python floors */
                q--;
                m += y;
            }
            return mkint(op == OP_MOD ? m : q);
        }
        case OP_POW:
            if (y < 0)
                return (val){.t = V_FLOAT, .f = pow((double)x, (double)y)};
            z = 1;
            for (int64_t i = 0; i < y; i++) {
                if (__builtin_mul_overflow(z, x, &z))
                    goto overflow;
                if (z == 0 || z == 1)
                    break;
            }
            return mkint(z);
        }
    }
    double x = num_of(&a), y = num_of(&b);
    switch (op) {
    case OP_ADD: return (val){.t = V_FLOAT, .f = x + y};
    case OP_SUB: return (val){.t = V_FLOAT, .f = x - y};
    case OP_MUL: return (val){.t = V_FLOAT, .f = x * y};
    case OP_POW: return (val){.t = V_FLOAT, .f = pow(x, y)};
    default:
        if (y == 0)
            fail(r, at, "division by zero");
        if (op == OP_DIV)
            return (val){.t = V_FLOAT, .f = x / y};
        if (op == OP_FLOORDIV)
            return (val){.t = V_FLOAT, .f = floor(x / y)};
        double m = fmod(x, y);
        if (m != 0 && ((m < 0) != (y < 0)))
            m += y;
        return (val){.t = V_FLOAT, .f = m};
    }
overflow:
    fail(r, at, "integer overflow");
}

/* Python slicing s[a:b:c] over n items: the indices it takes. */
static size_t slice_indices(int64_t n, const val *a, const val *b, const val *c, int64_t *start, int64_t *step)
{
    int64_t st = c && c->t != V_NONE ? int_of(c) : 1;
    int64_t lo, hi;
    if (st > 0) {
        lo = a && a->t != V_NONE ? int_of(a) : 0;
        hi = b && b->t != V_NONE ? int_of(b) : n;
        if (lo < 0) lo += n;
        if (hi < 0) hi += n;
        lo = lo < 0 ? 0 : lo > n ? n : lo;
        hi = hi < 0 ? 0 : hi > n ? n : hi;
        *start = lo;
        *step = st;
        return hi > lo ? (size_t)((hi - lo + st - 1) / st) : 0;
    }
    lo = a && a->t != V_NONE ? int_of(a) : n - 1;
    hi = b && b->t != V_NONE ? int_of(b) : -1 - n;   /* "before the start" */
    if (lo < 0) lo += n;
    if (hi < 0) hi += n;
    lo = lo < -1 ? -1 : lo > n - 1 ? n - 1 : lo;
    hi = hi < -1 ? -1 : hi > n - 1 ? n - 1 : hi;
    *start = lo;
    *step = st;
    return lo > hi ? (size_t)((lo - hi + (-st) - 1) / (-st)) : 0;
}

static val eval_slice(rctx *r, frame *f, const node *n)
{
    val obj = eval(r, f, n->a);
    val lo = n->b ? eval(r, f, n->b) : (val){.t = V_NONE};
    val hi = n->c ? eval(r, f, n->c) : (val){.t = V_NONE};
    val step = n->body.v[0] ? eval(r, f, n->body.v[0]) : (val){.t = V_NONE};
    need_defined(r, n, &obj);
    const val *parts[3] = {&lo, &hi, &step};
    for (int i = 0; i < 3; i++)
        if (parts[i]->t != V_NONE && !is_intlike(parts[i]))
            fail(r, n, "slice indices must be integers, not %s", type_name(parts[i]->t));
    if (step.t != V_NONE && int_of(&step) == 0)
        fail(r, n, "slice step cannot be zero");
    int64_t start, st;
    if (obj.t == V_LIST) {
        size_t k = slice_indices((int64_t)obj.l->n, &lo, &hi, &step, &start, &st);
        vlist *l = new_list(r, k);
        for (size_t i = 0; i < k; i++)
            list_push(r, l, obj.l->v[start + (int64_t)i * st]);
        return mklist(l);
    }
    if (obj.t == V_STR) {
        size_t ncp = cp_count(obj.s);
        size_t k = slice_indices((int64_t)ncp, &lo, &hi, &step, &start, &st);
        if (st == 1) {
            size_t a = cp_offset(obj.s, (size_t)start), b = cp_offset(obj.s, (size_t)start + k);
            return mkstr(obj.s.p + a, b - a);
        }
        sbuf b = {0};
        for (size_t i = 0; i < k; i++) {
            size_t idx = (size_t)(start + (int64_t)i * st);
            size_t a0 = cp_offset(obj.s, idx), a1 = cp_offset(obj.s, idx + 1);
            sbuf_add(r, &b, obj.s.p + a0, a1 - a0);
        }
        return mkstr(b.p ? b.p : "", b.n);
    }
    fail(r, n, "a %s cannot be sliced", type_name(obj.t));
}

static val call_macro(rctx *r, const node *at, const node *m, const args *a);

static val call_function(rctx *r, const node *at, int fn, const args *a)
{
    switch (fn) {
    case FN_RAISE: {
        const val *msg = arg(a, 0, NULL);
        str s = msg ? to_str(r, msg) : (str){"", 0};
        tp_errorf(r->err, "%s: %.*s", r->t->name, (int)(s.n > 900 ? 900 : s.n), s.p);
        longjmp(r->jb, 1);
    }
    case FN_STRFTIME: {
        ARITY(r, at, a, 1, "strftime_now");
        str fmt = want_str(r, at, arg(a, 0, NULL), "strftime_now");
        struct tm tm;
        if (r->t->fixed_time) {
            tm = r->t->now;
        } else {
            time_t now = time(NULL);
            localtime_r(&now, &tm);
        }
        char cfmt[256], out[512];
        if (fmt.n >= sizeof cfmt)
            fail(r, at, "strftime_now: format too long");
        memcpy(cfmt, fmt.p, fmt.n);
        cfmt[fmt.n] = '\0';
        size_t n = strftime(out, sizeof out, cfmt, &tm);
        return r_strdup(r, out, n);
    }
    case FN_RANGE: {
        ARITY(r, at, a, 3, "range");
        int64_t lo = 0, hi, st = 1;
        if (a->n_pos == 0)
            fail(r, at, "range expects at least 1 argument");
        if (a->n_pos == 1) {
            hi = want_int(r, at, &a->pos[0], "range");
        } else {
            lo = want_int(r, at, &a->pos[0], "range");
            hi = want_int(r, at, &a->pos[1], "range");
            if (a->n_pos == 3)
                st = want_int(r, at, &a->pos[2], "range");
        }
        if (st == 0)
            fail(r, at, "range: step must not be zero");
        vlist *l = new_list(r, 8);
        for (int64_t i = lo; st > 0 ? i < hi : i > hi; i += st) {
            if (l->n >= (size_t)MAX_LOOP_ITERATIONS)
                fail(r, at, "range of more than %ld items", MAX_LOOP_ITERATIONS);
            list_push(r, l, mkint(i));
            if ((st > 0 && i > INT64_MAX - st) || (st < 0 && i < INT64_MIN - st))
                break;
        }
        return mklist(l);
    }
    case FN_NAMESPACE: case FN_DICT: {
        vdict *d = new_dict(r);
        for (size_t i = 0; i < a->n_pos; i++) {
            if (a->pos[i].t != V_DICT && a->pos[i].t != V_NS)
                fail(r, at, "%s: a positional argument must be a dict", fn == FN_DICT ? "dict" : "namespace");
            for (size_t k = 0; k < a->pos[i].d->n; k++)
                dict_set(r, d, a->pos[i].d->k[k], a->pos[i].d->v[k]);
        }
        for (size_t i = 0; i < a->n_kw; i++)
            dict_set(r, d, mkstr(a->kw_names[i].p, a->kw_names[i].n), a->kw[i]);
        return (val){.t = fn == FN_DICT ? V_DICT : V_NS, .d = d};
    }
    }
    fail(r, at, "unknown function");
}

static val eval_call(rctx *r, frame *f, const node *n)
{
    const node *callee = n->a;
    if (callee->kind == E_ATTR) {
        val obj = eval(r, f, callee->a);
        /* a dict/namespace member that is callable is called; otherwise a method */
        if (obj.t == V_DICT || obj.t == V_NS) {
            val *member = dict_find_str(obj.d, callee->name);
            if (member && (member->t == V_MACRO || member->t == V_FUNC)) {
                args a = eval_args(r, f, n);
                return member->t == V_MACRO ? call_macro(r, n, member->m, &a) : call_function(r, n, member->fn, &a);
            }
        }
        args a = eval_args(r, f, n);
        return method_call(r, n, &obj, callee->name, &a);
    }
    val fn = eval(r, f, callee);
    args a = eval_args(r, f, n);
    if (fn.t == V_MACRO)
        return call_macro(r, n, fn.m, &a);
    if (fn.t == V_FUNC)
        return call_function(r, n, fn.fn, &a);
    if (fn.t == V_UNDEF && callee->kind == E_NAME)
        fail(r, n, "function '%.*s' is not supported", (int)callee->name.n, callee->name.p);
    need_defined(r, n, &fn);
    fail(r, n, "a %s is not callable", type_name(fn.t));
}

static val eval(rctx *r, frame *f, const node *n)
{
    if (++r->depth > MAX_CALL_DEPTH * 4)
        fail(r, n, "evaluation nested more than %d deep", MAX_CALL_DEPTH * 4);
    val v;
    switch (n->kind) {
    case E_CONST: v = n->cval; break;
    case E_NAME: {
        val *found = scope_find(f, n->name);
        v = found ? *found : mkundef(n->name);
        break;
    }
    case E_ATTR: {
        val obj = eval(r, f, n->a);
        v = get_attr(r, n, &obj, n->name);
        break;
    }
    case E_ITEM: {
        val obj = eval(r, f, n->a), key = eval(r, f, n->b);
        v = get_item(r, n, &obj, &key);
        break;
    }
    case E_SLICE: v = eval_slice(r, f, n); break;
    case E_CALL: v = eval_call(r, f, n); break;
    case E_FILTER: {
        val operand = eval(r, f, n->a);
        args a = eval_args(r, f, n);
        v = apply_filter(r, n, n->name, operand, &a);
        break;
    }
    case E_TEST: {
        val operand = eval(r, f, n->a);
        args a = eval_args(r, f, n);
        v = mkbool(run_test(r, n, n->name, &operand, &a) != n->negate);
        break;
    }
    case E_NEG: case E_POS: {
        val x = eval(r, f, n->a);
        need_defined(r, n, &x);
        if (!is_num(&x))
            fail(r, n, "bad operand type for unary %c: %s", n->kind == E_NEG ? '-' : '+', type_name(x.t));
        if (n->kind == E_POS)
            v = x.t == V_BOOL ? mkint(x.b) : x;
        else if (x.t == V_FLOAT)
            v = (val){.t = V_FLOAT, .f = -x.f};
        else if (int_of(&x) == INT64_MIN)
            fail(r, n, "integer overflow");
        else
            v = mkint(-int_of(&x));
        break;
    }
    case E_NOT: { val x = eval(r, f, n->a); v = mkbool(!truthy(&x)); break; }
    case E_AND: { val x = eval(r, f, n->a); v = truthy(&x) ? eval(r, f, n->b) : x; break; }
    case E_OR: { val x = eval(r, f, n->a); v = truthy(&x) ? x : eval(r, f, n->b); break; }
    case E_BIN: v = arith(r, n, n->op, eval(r, f, n->a), eval(r, f, n->b)); break;
    case E_CMP: {
        val x = eval(r, f, n->a), y = eval(r, f, n->b);
        if (n->op == OP_EQ || n->op == OP_NE)
            v = mkbool(val_eq(&x, &y) == (n->op == OP_EQ));
        else {
            int c = compare(r, n, &x, &y);
            v = mkbool(n->op == OP_LT ? c < 0 : n->op == OP_LE ? c <= 0 : n->op == OP_GT ? c > 0 : c >= 0);
        }
        break;
    }
    case E_IN: {
        val x = eval(r, f, n->a), y = eval(r, f, n->b);
        v = mkbool(contains(r, n, &x, &y) != n->negate);
        break;
    }
    case E_COND: {
        val c = eval(r, f, n->b);
        v = truthy(&c) ? eval(r, f, n->a) : n->c ? eval(r, f, n->c) : mkundef((str){"the else of an if expression", 28});
        break;
    }
    case E_LIST: case E_TUPLE: {
        vlist *l = new_list(r, n->body.n);
        for (size_t i = 0; i < n->body.n; i++)
            list_push(r, l, eval(r, f, n->body.v[i]));
        v = mklist(l);
        break;
    }
    case E_DICT: {
        vdict *d = new_dict(r);
        for (size_t i = 0; i + 1 < n->body.n; i += 2)
            dict_set(r, d, eval(r, f, n->body.v[i]), eval(r, f, n->body.v[i + 1]));
        v = (val){.t = V_DICT, .d = d};
        break;
    }
    default:
        fail(r, n, "not an expression");
    }
    r->depth--;
    return v;
}

static void count_iteration(rctx *r, const node *at)
{
    if (++r->iterations > MAX_LOOP_ITERATIONS)
        fail(r, at, "more than %ld loop iterations", MAX_LOOP_ITERATIONS);
}

/* Binds a loop / set target: one name, or names unpacked from a sequence. */
static void bind_target(rctx *r, frame *f, const node *target, val v)
{
    if (target->kind == E_NAME) {
        scope_set(r, f, target->name, v);
        return;
    }
    vlist *l = iter_list(r, target, &v);
    if (l->n != target->body.n)
        fail(r, target, "cannot unpack %zu values into %zu names", l->n, target->body.n);
    for (size_t i = 0; i < l->n; i++)
        scope_set(r, f, target->body.v[i]->name, l->v[i]);
}

static void exec_for(rctx *r, frame *f, const node *n)
{
    val seq = eval(r, f, n->b);
    vlist *all = iter_list(r, n->b, &seq), *items = all;
    if (n->c) {   /* the filter runs before the loop, so loop.length counts what it keeps */
        items = new_list(r, all->n);
        frame *tf = push_frame(r, f);
        for (size_t i = 0; i < all->n; i++) {
            count_iteration(r, n);
            tf->vars.n = 0;
            bind_target(r, tf, n->a, all->v[i]);
            val keep = eval(r, tf, n->c);
            if (truthy(&keep))
                list_push(r, items, all->v[i]);
        }
    }
    if (items->n == 0) {
        exec_body(r, f, &n->orelse);
        return;
    }
    /* one frame and one loop object for the whole loop, refilled each
     * iteration: a long loop allocates nothing per iteration */
    frame *lf = push_frame(r, f);
    vdict *loop = new_dict(r);
    size_t len = items->n;
    for (size_t i = 0; i < len; i++) {
        count_iteration(r, n);
        lf->vars.n = 0;
        loop->n = 0;
        dict_set(r, loop, cstr("index0"), mkint((int64_t)i));
        dict_set(r, loop, cstr("index"), mkint((int64_t)i + 1));
        dict_set(r, loop, cstr("revindex0"), mkint((int64_t)(len - i - 1)));
        dict_set(r, loop, cstr("revindex"), mkint((int64_t)(len - i)));
        dict_set(r, loop, cstr("first"), mkbool(i == 0));
        dict_set(r, loop, cstr("last"), mkbool(i + 1 == len));
        dict_set(r, loop, cstr("length"), mkint((int64_t)len));
        dict_set(r, loop, cstr("depth"), mkint(1));
        dict_set(r, loop, cstr("depth0"), mkint(0));
        dict_set(r, loop, cstr("previtem"), i ? items->v[i - 1] : mkundef((str){"loop.previtem", 13}));
        dict_set(r, loop, cstr("nextitem"), i + 1 < len ? items->v[i + 1] : mkundef((str){"loop.nextitem", 13}));
        scope_set(r, lf, (str){"loop", 4}, (val){.t = V_DICT, .d = loop});
        bind_target(r, lf, n->a, items->v[i]);
        exec_body(r, lf, &n->body);
        int ctl = r->loop_ctl;
        r->loop_ctl = 0;
        if (ctl == N_BREAK)
            break;
    }
}

static void exec_set(rctx *r, frame *f, const node *n)
{
    val v = eval(r, f, n->b);
    if (n->a->kind == E_ATTR) {
        val obj = eval(r, f, n->a->a);
        if (obj.t != V_NS)
            fail(r, n->a, "cannot assign an attribute of a %s: only a namespace() takes assignments", type_name(obj.t));
        dict_set(r, obj.d, mkstr(n->a->name.p, n->a->name.n), v);
        return;
    }
    bind_target(r, f, n->a, v);
}

/* Renders body into a string of its own (set blocks, macro calls). */
static str capture(rctx *r, frame *f, const nodes *body)
{
    sbuf b = {0}, *saved = r->out;
    r->out = &b;
    exec_body(r, f, body);
    r->out = saved;
    return sbuf_str(&b);
}

static val call_macro(rctx *r, const node *at, const node *m, const args *a)
{
    if (r->depth > MAX_CALL_DEPTH)
        fail(r, at, "macro calls nested more than %d deep", MAX_CALL_DEPTH);
    if (a->n_pos > m->kw.n)
        fail(r, at, "macro '%.*s' takes %zu arguments, %zu given", (int)m->name.n, m->name.p, m->kw.n, a->n_pos);
    frame *mf = push_frame(r, r->globals);
    for (size_t i = 0; i < m->kw.n; i++) {
        const val *given = arg(a, i, NULL);
        for (size_t k = 0; !given && k < a->n_kw; k++)
            if (a->kw_names[k].n == m->kw_names[i].n && !memcmp(a->kw_names[k].p, m->kw_names[i].p, a->kw_names[k].n))
                given = &a->kw[k];
        val v = given ? *given : m->kw.v[i] ? eval(r, mf, m->kw.v[i]) : mkundef(m->kw_names[i]);
        scope_set(r, mf, m->kw_names[i], v);
    }
    for (size_t k = 0; k < a->n_kw; k++) {
        bool known = false;
        for (size_t i = 0; i < m->kw.n; i++)
            known |= a->kw_names[k].n == m->kw_names[i].n && !memcmp(a->kw_names[k].p, m->kw_names[i].p, a->kw_names[k].n);
        if (!known)
            fail(r, at, "macro '%.*s' has no parameter '%.*s'", (int)m->name.n, m->name.p, (int)a->kw_names[k].n,
                 a->kw_names[k].p);
    }
    r->depth++;
    str s = capture(r, mf, &m->body);
    r->depth--;
    r->loop_ctl = 0;
    return mkstr(s.p, s.n);
}

static void exec_node(rctx *r, frame *f, const node *n)
{
    switch (n->kind) {
    case N_TEXT: sbuf_add(r, r->out, n->cval.s.p, n->cval.s.n); break;
    case N_OUTPUT: {
        val v = eval(r, f, n->a);
        put_str(r, r->out, &v, false);
        break;
    }
    case N_IF: {
        val c = eval(r, f, n->a);
        exec_body(r, f, truthy(&c) ? &n->body : &n->orelse);
        break;
    }
    case N_FOR: exec_for(r, f, n); break;
    case N_SET: exec_set(r, f, n); break;
    case N_SET_BLOCK: {
        str s = capture(r, f, &n->body);
        scope_set(r, f, n->a->name, mkstr(s.p, s.n));
        break;
    }
    case N_MACRO: scope_set(r, f, n->name, (val){.t = V_MACRO, .m = n}); break;
    case N_BREAK: case N_CONTINUE: r->loop_ctl = n->kind; break;
    default: fail(r, n, "not a statement");
    }
}

static void exec_body(rctx *r, frame *f, const nodes *body)
{
    for (size_t i = 0; i < body->n && !r->loop_ctl; i++)
        exec_node(r, f, body->v[i]);
}

int tp_template_render(const tp_template *t, const cJSON *ctx, char **out, size_t *out_len, tp_err *err)
{
    *out = NULL;
    if (out_len)
        *out_len = 0;
    if (ctx && !cJSON_IsObject(ctx))
        return tp_errorf(err, "%s: the variables must be a JSON object", t->name);
    rctx r = {.t = t, .err = err, .ar = {.limit = MAX_ARENA}};
    if (setjmp(r.jb)) {
        arena_free(&r.ar);
        return -1;
    }
    r.globals = push_frame(&r, NULL);
    static const struct { const char *name; int fn; } builtins[] = {
        {"range", FN_RANGE}, {"namespace", FN_NAMESPACE}, {"raise_exception", FN_RAISE},
        {"strftime_now", FN_STRFTIME}, {"dict", FN_DICT},
    };
    for (size_t i = 0; i < sizeof builtins / sizeof *builtins; i++)
        scope_set(&r, r.globals, (str){builtins[i].name, strlen(builtins[i].name)}, (val){.t = V_FUNC, .fn = builtins[i].fn});
    for (const cJSON *c = ctx ? ctx->child : NULL; c; c = c->next)
        if (c->string)
            scope_set(&r, r.globals, (str){c->string, strlen(c->string)}, from_json(&r, c, 0));
    /* the template's own top-level sets go in a frame above the variables */
    frame *top = push_frame(&r, r.globals);
    r.globals = top;
    sbuf b = {0};
    r.out = &b;
    exec_body(&r, top, &t->body);
    char *s = malloc(b.n + 1);
    if (!s) {
        arena_free(&r.ar);
        return tp_errorf(err, "%s: out of memory for %zu bytes of output", t->name, b.n);
    }
    if (b.n)
        memcpy(s, b.p, b.n);
    s[b.n] = '\0';
    arena_free(&r.ar);
    *out = s;
    if (out_len)
        *out_len = b.n;
    return 0;
}
