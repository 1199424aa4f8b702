/* cli.h - the command-line plumbing the program mains in tools/ share: the
 * "prog: message" lines on stderr with their exit codes, "flag needs a
 * value", and number parsing with range checks.  Header-only (static inline)
 * because every tool is one translation unit and a thin main; libraries never
 * print, so this does not belong in a library layer.
 *
 * Call cli_init() (or cli_init_text()) first in main.  Exit codes: 2 for a
 * bad command line, 1 for a failure while working. */
#ifndef TP_TOOLS_CLI_H
#define TP_TOOLS_CLI_H

#include "shardfmt.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static const char *cli_prog = "?";
static void (*cli_usage_fn)(FILE *f);
static const char *cli_usage_text;

/* The program name that prefixes every message, and its usage: a function
 * that prints it to f, or a fixed text. */
static inline void cli_init(const char *prog, void (*usage)(FILE *f))
{
    cli_prog = prog;
    cli_usage_fn = usage;
    cli_usage_text = NULL;
}

static inline void cli_init_text(const char *prog, const char *usage_text)
{
    cli_prog = prog;
    cli_usage_fn = NULL;
    cli_usage_text = usage_text;
}

static inline void cli_print_usage(FILE *f)
{
    if (cli_usage_fn)
        cli_usage_fn(f);
    else if (cli_usage_text)
        fputs(cli_usage_text, f);
}

/* "prog: message" on stderr. */
static inline void cli_msg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static inline void cli_msg(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", cli_prog);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static inline void cli_try_help(void)
{
    fprintf(stderr, "try %s --help\n", cli_prog);
}

/* "prog: message" and the exit status, for `return cli_...(...)` in main.
 * Macros so that cli_msg's printf format check covers every call. */
/* A bad command line: the message, then the usage; 2. */
#define cli_usage_error(...) (cli_msg(__VA_ARGS__), cli_print_usage(stderr), 2)
/* A bad command line, the message alone; 2. */
#define cli_arg_error(...) (cli_msg(__VA_ARGS__), 2)
/* A bad command line, then "try prog --help"; 2. */
#define cli_help_error(...) (cli_msg(__VA_ARGS__), cli_try_help(), 2)
/* A failure while working; 1. */
#define cli_failf(...) (cli_msg(__VA_ARGS__), 1)

static inline int cli_fail(const tp_err *err)
{
    return cli_failf("%s", err->msg);
}

/* The value of the flag at argv[*i]: advances *i and returns argv[*i], or
 * NULL (and *i unchanged) when the flag is the last argument. */
static inline const char *cli_value(int argc, char **argv, int *i)
{
    if (*i + 1 >= argc)
        return NULL;
    return argv[++*i];
}

/* The end of a flag loop that takes one operand: an unknown flag, the
 * operand into *slot, or a second operand.  Returns 0, or 2 after the usage
 * error. */
static inline int cli_operand(const char *a, const char **slot)
{
    if (a[0] == '-')
        return cli_usage_error("unknown flag %s", a);
    if (*slot)
        return cli_usage_error("unexpected argument %s", a);
    *slot = a;
    return 0;
}

/* For a command that takes no flags: 0, or 2 after the usage error naming
 * the first argument that looks like one. */
static inline int cli_no_flags(int argc, char **argv)
{
    for (int i = 0; i < argc; i++)
        if (argv[i][0] == '-')
            return cli_usage_error("unknown flag %s", argv[i]);
    return 0;
}

/* A decimal integer (strtol's syntax, nothing after it) in [lo, hi]. */
static inline bool cli_long(const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

/* A number (strtod's syntax, nothing after it) in [lo, hi]; NaN never is. */
static inline bool cli_double(const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi))
        return false;
    *out = v;
    return true;
}

/* Sizes: a non-negative decimal integer, with CLI_SIZE_SUFFIX a K, M or G
 * (either case: powers of 1024) after it, and with CLI_SIZE_SUFFIX_B also a
 * B or b after the suffix ("64KB"). */
enum { CLI_SIZE_SUFFIX = 1, CLI_SIZE_SUFFIX_B = 2 };

typedef enum cli_size_status {
    CLI_SIZE_OK,
    CLI_SIZE_NEGATIVE,   /* a '-' sign */
    CLI_SIZE_NOT_NUMBER, /* no digits, or more than 64 bits of them */
    CLI_SIZE_BAD_TAIL,   /* something after the number (or its suffix), or the suffix overflows */
} cli_size_status;

static inline cli_size_status cli_size_parse(const char *s, unsigned flags, uint64_t *out)
{
    const char *p = s;
    while (*p == ' ' || (*p >= '\t' && *p <= '\r'))
        p++;
    if (*p == '-')   /* strtoull would negate it into a huge value */
        return CLI_SIZE_NEGATIVE;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s)
        return CLI_SIZE_NOT_NUMBER;
    uint64_t mul = 1;
    if ((flags & (CLI_SIZE_SUFFIX | CLI_SIZE_SUFFIX_B)) && *end) {
        switch (*end) {
        case 'K': case 'k': mul = 1ull << 10; break;
        case 'M': case 'm': mul = 1ull << 20; break;
        case 'G': case 'g': mul = 1ull << 30; break;
        default: return CLI_SIZE_BAD_TAIL;
        }
        end++;
        if ((flags & CLI_SIZE_SUFFIX_B) && (*end == 'B' || *end == 'b'))
            end++;
    }
    if (*end || v > UINT64_MAX / mul)
        return CLI_SIZE_BAD_TAIL;
    *out = v * mul;
    return CLI_SIZE_OK;
}

static inline bool cli_size(const char *s, unsigned flags, uint64_t *out)
{
    return cli_size_parse(s, flags, out) == CLI_SIZE_OK;
}

#endif
