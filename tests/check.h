/* check.h - the plumbing every unit test program (tests/test_*.c) shares:
 * one way to assert, to make a temporary directory, to draw test data and to
 * end.  Header-only (static functions and macros): include it once per test
 * program.
 *
 *   CHECK(cond)               counts one check; if cond is false, counts a
 *   CHECK(cond, fmt, ...)     failure and prints "FAIL file:line: " and the
 *                             printf-style message, or the condition's text
 *                             when there is none, on stderr.  The test goes
 *                             on.  CHECK(0, fmt, ...) reports a failure found
 *                             otherwise.
 *   CHECK_OK(call, err)       call (tp_err convention: 0 or -1) must return 0;
 *                             else prints err.msg.
 *   CHECK_FAILS(call, err, want)
 *                             call must fail (non-zero) with an err.msg that
 *                             contains want; err.msg is cleared first so a
 *                             stale message cannot pass.
 *   check_total, check_failures
 *                             checks run and failed so far in this process.
 *   check_set_prefix(fmt, ...) text printed before every FAIL line from now
 *                             on (e.g. "rank 1: " in a forked rank).
 *   check_tmpdir()            one fresh directory, made on first call under
 *                             $TMPDIR (default /tmp) with mkdtemp, named after
 *                             the program; removed with everything in it when
 *                             the program exits (atexit), unless KEEP_TMP is
 *                             set, and never by a forked child.
 *   check_rmtree(path)        removes path and everything under it.
 *   check_rng                 a small seedable PRNG (splitmix64) for test
 *                             data; check_mix64 is its mixing function, a
 *                             good 64-bit hash of an index on its own.
 *   check_finish(name)        prints "NAME: all N checks passed" (stdout) or
 *                             "NAME: K of N checks failed" (stderr) and
 *                             returns the exit code for main: 0 or 1.
 *   check_skip(fmt, ...)      prints "SKIP: " and the printf-style reason
 *                             (the last line run_tests.sh shows) and
 *                             returns 77.
 *
 * Exit codes (what tests/run_tests.sh expects): 0 every check passed,
 * 1 a check failed (or the test could not run its checks), 77 skipped. */
#ifndef TP_TESTS_CHECK_H
#define TP_TESTS_CHECK_H

#include <errno.h>
#include <ftw.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Each test uses a different subset of these helpers. */
#pragma GCC diagnostic ignored "-Wunused-function"

/* ------------------------------------------------------------- checking */

static int check_total;    /* checks run */
static int check_failures; /* checks that failed */
static char check_prefix_[64];

__attribute__((format(printf, 1, 2))) static void check_set_prefix(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(check_prefix_, sizeof check_prefix_, fmt, ap);
    va_end(ap);
}

/* Counts one check; on failure counts it, prints the start of a FAIL line,
 * "FAIL file:line: ", and returns false (the caller ends the line). */
static bool check_tally_(bool ok, const char *file, int line)
{
    check_total++;
    if (ok)
        return true;
    check_failures++;
    fprintf(stderr, "%sFAIL %s:%d: ", check_prefix_, file, line);
    return false;
}

__attribute__((format(printf, 1, 2))) static void check_say_(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

/* The FAIL line says the message when there is one, else the condition:
 * with a message, __VA_OPT__ prints it and puts the condition's line under
 * an if (0).  (__VA_OPT__: GCC >= 8, clang >= 12, in every C mode; it keeps
 * printf format checks on the message.) */
#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (!check_tally_(!!(cond), __FILE__, __LINE__)) {                    \
            __VA_OPT__(check_say_(__VA_ARGS__); if (0))                       \
            check_say_("%s", #cond);                                          \
        }                                                                     \
    } while (0)

/* The call must succeed (return 0); prints the error otherwise. */
#define CHECK_OK(call, err)                                                   \
    do {                                                                      \
        if (!check_tally_((call) == 0, __FILE__, __LINE__))                   \
            check_say_("%s failed: %s", #call, (err).msg);                    \
    } while (0)

/* The call must fail with a message containing want. */
#define CHECK_FAILS(call, err, want)                                          \
    do {                                                                      \
        (err).msg[0] = 0;                                                     \
        bool failed_ = (call) != 0;                                           \
        if (!check_tally_(failed_ && strstr((err).msg, want), __FILE__,       \
                          __LINE__)) {                                        \
            if (!failed_)                                                     \
                check_say_("%s succeeded, expected an error with \"%s\"",     \
                           #call, want);                                      \
            else                                                              \
                check_say_("%s: message \"%s\" lacks \"%s\"", #call,          \
                           (err).msg, want);                                  \
        }                                                                     \
    } while (0)

static int check_finish(const char *name)
{
    if (check_failures) {
        fprintf(stderr, "%s: %d of %d checks failed\n", name, check_failures, check_total);
        return 1;
    }
    printf("%s: all %d checks passed\n", name, check_total);
    return 0;
}

__attribute__((format(printf, 1, 2))) static int check_skip(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("SKIP: ", stdout);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
    return 77;
}

/* ------------------------------------------------------ temporary files */

static int check_rmtree_one_(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    if (remove(path) != 0 && errno != ENOENT)
        fprintf(stderr, "note: cannot remove %s: %s\n", path, strerror(errno));
    return 0;
}

/* Removes path and everything under it (symlinks themselves, not their
 * targets); a missing path is fine.  0, or -1 when some of it remained. */
static int check_rmtree(const char *path)
{
    nftw(path, check_rmtree_one_, 16, FTW_DEPTH | FTW_PHYS);
    return access(path, F_OK) == 0 ? -1 : 0;
}

/* Short enough that tests may build paths under it in fixed buffers. */
static char check_tmpdir_[512];
static pid_t check_tmpdir_owner_;

static void check_tmpdir_remove_(void)
{
    if (getpid() == check_tmpdir_owner_) /* a forked child exiting leaves it */
        check_rmtree(check_tmpdir_);
}

/* The program's temporary directory (see the top of this file).  A test
 * that cannot make one cannot run: it exits 1. */
static const char *check_tmpdir(void)
{
    if (check_tmpdir_[0])
        return check_tmpdir_;
    const char *base = getenv("TMPDIR");
    int n = snprintf(check_tmpdir_, sizeof check_tmpdir_, "%s/%s.XXXXXX", base && *base ? base : "/tmp",
                     program_invocation_short_name);
    if (n < 0 || (size_t)n >= sizeof check_tmpdir_) {
        fprintf(stderr, "check_tmpdir: $TMPDIR/%s.XXXXXX is longer than %zu bytes\n", program_invocation_short_name,
                sizeof check_tmpdir_ - 1);
        exit(1);
    }
    if (!mkdtemp(check_tmpdir_)) {
        fprintf(stderr, "check_tmpdir: mkdtemp %s: %s\n", check_tmpdir_, strerror(errno));
        exit(1);
    }
    check_tmpdir_owner_ = getpid();
    if (getenv("KEEP_TMP"))
        fprintf(stderr, "note: KEEP_TMP is set: %s is kept\n", check_tmpdir_);
    else
        atexit(check_tmpdir_remove_);
    return check_tmpdir_;
}

/* ----------------------------------------------------------------- rng */

/* splitmix64's mixing function: every input bit moves every output bit. */
static inline uint64_t check_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* splitmix64: same seed, same sequence, on every platform. */
typedef struct check_rng {
    uint64_t state;
} check_rng;

static inline check_rng check_rng_seed(uint64_t seed)
{
    return (check_rng){seed};
}

static inline uint64_t check_rng_next(check_rng *r)
{
    return check_mix64(r->state += 0x9e3779b97f4a7c15ull);
}

/* Uniform in [0, 1), 53 bits. */
static inline double check_rng_uniform(check_rng *r)
{
    return (double)(check_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

#endif
