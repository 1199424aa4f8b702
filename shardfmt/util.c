/* util.c - errors, dtypes, overflow-checked arithmetic, file I/O helpers,
 * checksums, the random generator and the monotonic clock.  The thread pool lives in pool.c and
 * the progress bar in progress.c. */
#include "shardfmt.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "tp_xxhash.h"

/* ------------------------------------------------------------------ errors */

/* Messages quote names and values taken from the input (a model_type, a
 * tensor or entry name): a control character there would break the
 * one-line contract, so each becomes '?'. */
static void one_line(char *msg)
{
    for (unsigned char *p = (unsigned char *)msg; *p; p++)
        if (*p < 0x20 || *p == 0x7f)
            *p = '?';
}

int tp_errorf_(tp_err *err, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        one_line(err->msg);
    }
    return -1;
}

int tp_err_prefix(tp_err *err, const char *fmt, ...)
{
    if (!err)
        return -1;
    char prefix[sizeof err->msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    char old[sizeof err->msg];
    memcpy(old, err->msg, sizeof old);
    old[sizeof old - 1] = '\0';
    /* Concatenate by hand: snprintf("%s: %s") of two full buffers trips
     * -Wformat-truncation, and truncation is what we want anyway. */
    size_t cap = sizeof err->msg, pl = strlen(prefix), ol = strlen(old);
    if (pl > cap - 1)
        pl = cap - 1;
    memcpy(err->msg, prefix, pl);
    size_t at = pl;
    for (const char *sep = ": "; *sep && at < cap - 1; sep++)
        err->msg[at++] = *sep;
    if (ol > cap - 1 - at)
        ol = cap - 1 - at;
    memcpy(err->msg + at, old, ol);
    err->msg[at + ol] = '\0';
    one_line(err->msg);
    return -1;
}

/* ------------------------------------------------------------------ dtypes */

const char *tp_dtype_name(tp_dtype dt)
{
    switch (dt) {
    case TP_BF16: return "BF16";
    case TP_F16:  return "F16";
    case TP_F32:  return "F32";
    case TP_F8_E4M3: return "F8_E4M3";
    case TP_I8:   return "I8";
    default:      return "INVALID";
    }
}

tp_dtype tp_dtype_from_name(const char *name)
{
    if (!name)
        return TP_DTYPE_INVALID;
    if (strcmp(name, "BF16") == 0) return TP_BF16;
    if (strcmp(name, "F16") == 0)  return TP_F16;
    if (strcmp(name, "F32") == 0)  return TP_F32;
    if (strcmp(name, "F8_E4M3") == 0) return TP_F8_E4M3;
    if (strcmp(name, "I8") == 0)   return TP_I8;
    return TP_DTYPE_INVALID;
}

size_t tp_dtype_size(tp_dtype dt)
{
    switch (dt) {
    case TP_BF16:
    case TP_F16:  return 2;
    case TP_F32:  return 4;
    case TP_F8_E4M3:
    case TP_I8:   return 1;
    default:      return 0;
    }
}

static uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float tp_bf16_to_f32(uint16_t h)
{
    return bits_f32((uint32_t)h << 16);
}

uint16_t tp_f32_to_bf16(float f)
{
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        /* NaN: keep the sign and top payload bits, force the quiet bit so
         * that truncating the payload can never turn it into infinity. */
        return (uint16_t)((u >> 16) | 0x0040u);
    }
    /* Round to nearest, ties to even: add 0x7fff plus the lowest kept bit.
     * Finite values just below FLT_MAX correctly round up to infinity. */
    uint32_t lsb = (u >> 16) & 1u;
    return (uint16_t)((u + 0x7fffu + lsb) >> 16);
}

float tp_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (mant == 0) {
            u = sign; /* +-0 */
        } else {
            /* Subnormal: value = mant * 2^-24; normalise into f32. */
            int e = -1;
            do {
                mant <<= 1;
                e++;
            } while ((mant & 0x400u) == 0);
            mant &= 0x3ffu;
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | (mant << 13);
        }
    } else if (exp == 0x1f) {
        u = sign | 0x7f800000u | (mant << 13); /* inf, or NaN with payload */
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    return bits_f32(u);
}

float tp_f8e4m3_to_f32(uint8_t b)
{
    float sign = (b & 0x80u) ? -1.0f : 1.0f;
    unsigned exp = (b >> 3) & 0xfu, mant = b & 0x7u;
    if (exp == 0xf && mant == 0x7)
        return sign * NAN;
    if (exp == 0)
        return sign * ldexpf((float)mant, -9);           /* subnormal: mant * 2^-9 */
    return sign * ldexpf((float)(8u + mant), (int)exp - 10); /* 1.mmm * 2^(exp - 7) */
}

uint8_t tp_f32_to_f8e4m3(float f)
{
    uint32_t u = f32_bits(f);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
    u &= 0x7fffffffu;
    if (u > 0x7f800000u)
        return sign | 0x7fu;
    float a = bits_f32(u);
    if (a >= 448.0f)
        return sign | 0x7eu;                   /* saturate (infinity included) */
    if (a < 0.015625f) {                       /* below 2^-6: subnormal steps of 2^-9 */
        float m = a * 512.0f;                  /* exact: a power-of-two scale */
        uint32_t q = (uint32_t)m;
        float frac = m - (float)q;
        if (frac > 0.5f || (frac == 0.5f && (q & 1u)))
            q++;                               /* q == 8 is the smallest normal, 0x08 */
        return sign | (uint8_t)q;
    }
    /* Normal: keep 3 of the 23 mantissa bits, ties to even; a carry moves
     * into the exponent, which is the right result. */
    uint32_t r = u + 0x7ffffu + ((u >> 20) & 1u);
    int exp = (int)(r >> 23) - 127 + 7;
    uint32_t mant = (r >> 20) & 7u;
    if (exp > 15 || (exp == 15 && mant == 7))
        return sign | 0x7eu;
    return sign | (uint8_t)((uint32_t)exp << 3 | mant);
}

/* ------------------------------------------------------------- arithmetic */

bool tp_mul_size(size_t a, size_t b, size_t *out)
{
    size_t r;
    if (__builtin_mul_overflow(a, b, &r))
        return false;
    *out = r;
    return true;
}

bool tp_add_size(size_t a, size_t b, size_t *out)
{
    size_t r;
    if (__builtin_add_overflow(a, b, &r))
        return false;
    *out = r;
    return true;
}

bool tp_tensor_nbytes(tp_dtype dt, const uint64_t *shape, int ndim, size_t *out)
{
    size_t esize = tp_dtype_size(dt);
    if (esize == 0 || ndim < 0 || ndim > TP_MAX_DIMS)
        return false;
    size_t n = esize;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] > SIZE_MAX)
            return false;
        if (!tp_mul_size(n, (size_t)shape[i], &n))
            return false;
    }
    *out = n;
    return true;
}

/* ------------------------------------------------------------------ files */

static const char *file_kind(mode_t mode)
{
    if (S_ISFIFO(mode))
        return "fifo";
    if (S_ISDIR(mode))
        return "directory";
    if (S_ISCHR(mode))
        return "character device";
    if (S_ISBLK(mode))
        return "block device";
    if (S_ISSOCK(mode))
        return "socket";
    if (S_ISLNK(mode))
        return "symlink";
    return "unknown type";
}

int tp_open_regular(const char *path, int extra, struct stat *out_st, tp_err *err)
{
    /* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
     * writer forever; the fstat below then refuses it. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | extra);
    if (fd < 0) {
        if (errno == ELOOP && (extra & O_NOFOLLOW))
            return tp_errorf(err, "%s: is a symlink (refused)", path);
        if (errno == ENOENT)
            return tp_errorf(err, "%s: no such file or directory", path);
        return tp_errorf(err, "%s: cannot open: %s", path, strerror(errno));
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return tp_errorf(err, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return tp_errorf(err, "%s: not a regular file (%s)", path, file_kind(st.st_mode));
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0) {
        int e = errno;
        close(fd);
        return tp_errorf(err, "%s: fcntl: %s", path, strerror(e));
    }
    if (out_st)
        *out_st = st;
    return fd;
}

bool tp_safe_file_name(const char *name)
{
    if (!name || !name[0] || name[0] == '.')
        return false;
    size_t n = 0;
    for (const char *p = name; *p; p++, n++)
        if (*p < 0x20 || *p > 0x7e || *p == '/' || *p == '\\')
            return false;
    return n <= 255;
}

/* True when path (absolute, resolved) is dir itself or lies under it. */
static bool path_under(const char *path, const char *dir)
{
    size_t n = strlen(dir);
    if (n == 1 && dir[0] == '/')
        return true;
    return strncmp(path, dir, n) == 0 && (path[n] == '/' || path[n] == '\0');
}

/* For a hub cache snapshot ".../REPO/snapshots/REV": ".../REPO/blobs"
 * (malloc'd), else NULL. */
static char *hub_cache_blobs(const char *real_dir)
{
    char *snapshots = tp_path_dir(real_dir);
    if (!snapshots)
        return NULL;
    const char *base = strrchr(snapshots, '/');
    char *blobs = NULL;
    if (base && strcmp(base + 1, "snapshots") == 0 && base != snapshots) {
        char *repo = strndup(snapshots, (size_t)(base - snapshots));
        blobs = repo ? tp_path_join(repo, "blobs") : NULL;
        free(repo);
    }
    free(snapshots);
    return blobs;
}

int tp_model_file_check(const char *dir, const char *name, tp_err *err)
{
    char *path = tp_path_join(dir, name);
    if (!path)
        return tp_errorf(err, "%s: out of memory", dir);
    struct stat st;
    if (lstat(path, &st) != 0) {
        free(path);
        return 0; /* missing: the caller's open says so */
    }
    int rc = 0;
    char *real_dir = realpath(dir, NULL), *real = realpath(path, NULL), *blobs = NULL;
    if (!real_dir) {
        rc = tp_errorf(err, "%s: cannot resolve: %s", dir, strerror(errno));
    } else if (!real) {
        char target[PATH_MAX];
        ssize_t n = readlink(path, target, sizeof target - 1);
        target[n > 0 ? n : 0] = '\0';
        rc = tp_errorf(err, "%s: symlink to %s, which cannot be resolved: %s", path,
                       n > 0 ? target : "?", strerror(errno));
    } else if (!path_under(real, real_dir) &&
               !((blobs = hub_cache_blobs(real_dir)) && path_under(real, blobs))) {
        rc = tp_errorf(err, "%s: symlink to %s, outside the model directory", path, real);
    }
    free(blobs);
    free(real);
    free(real_dir);
    free(path);
    return rc;
}

/* ------------------------------------------------------------ SIGBUS guard */

/* The guard of the calling thread, NULL outside tp_sigbus_guard(). */
static __thread sigjmp_buf *volatile sigbus_jump;
static struct sigaction sigbus_previous;
static pthread_once_t sigbus_once = PTHREAD_ONCE_INIT;

static void on_sigbus(int sig, siginfo_t *info, void *uctx)
{
    sigjmp_buf *jb = sigbus_jump;
    if (jb) {
        sigbus_jump = NULL;
        siglongjmp(*jb, 1);
    }
    /* Not a guarded read: behave as if we had never been installed. */
    if ((sigbus_previous.sa_flags & SA_SIGINFO) && sigbus_previous.sa_sigaction) {
        sigbus_previous.sa_sigaction(sig, info, uctx);
        return;
    }
    if (sigbus_previous.sa_handler != SIG_DFL && sigbus_previous.sa_handler != SIG_IGN) {
        sigbus_previous.sa_handler(sig);
        return;
    }
    /* Default action: restore it and re-raise; the signal is blocked in this
     * handler, so it is delivered (and kills) on return. */
    signal(SIGBUS, SIG_DFL);
    raise(SIGBUS);
}

static void install_sigbus_handler(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &sigbus_previous);
}

int tp_sigbus_guard(void (*fn)(void *arg), void *arg)
{
    pthread_once(&sigbus_once, install_sigbus_handler);
    sigjmp_buf jb;
    sigjmp_buf *volatile outer = sigbus_jump; /* guards may nest */
    /* savemask 1: the jump out of the handler must unblock SIGBUS again. */
    if (sigsetjmp(jb, 1)) {
        sigbus_jump = outer;
        return -1;
    }
    sigbus_jump = &jb;
    fn(arg);
    sigbus_jump = outer;
    return 0;
}

/* mmap of a zero-length file fails, so empty files point here instead. */
static const uint8_t empty_file[1];

int tp_mmap_open(tp_mmap *m, const char *path, tp_err *err)
{
    memset(m, 0, sizeof *m);
    struct stat st;
    int fd = tp_open_regular(path, 0, &st, err);
    if (fd < 0)
        return -1;
    if ((uint64_t)st.st_size > SIZE_MAX) {
        close(fd);
        return tp_errorf(err, "%s: file too large to map", path);
    }
    size_t size = (size_t)st.st_size;
    const uint8_t *data = empty_file;
    if (size > 0) {
        void *p = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            int e = errno;
            close(fd);
            return tp_errorf(err, "%s: mmap failed: %s", path, strerror(e));
        }
        data = p;
    }
    close(fd); /* the mapping stays valid */
    m->path = strdup(path);
    if (!m->path) {
        if (size > 0)
            munmap((void *)data, size);
        return tp_errorf(err, "%s: out of memory", path);
    }
    m->data = data;
    m->size = size;
    return 0;
}

void tp_mmap_close(tp_mmap *m)
{
    if (!m)
        return;
    if (m->data && m->data != empty_file && m->size > 0 && m->path)
        munmap((void *)m->data, m->size);
    free(m->path);
    memset(m, 0, sizeof *m);
}

int tp_write_all(int fd, const void *buf, size_t len, const char *path, tp_err *err)
{
    const uint8_t *p = buf;
    while (len > 0) {
        /* Linux caps a single write at ~2 GiB; ask for at most 1 GiB. */
        size_t want = len < (1u << 30) ? len : (1u << 30);
        ssize_t n = write(fd, p, want);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return tp_errorf(err, "%s: write failed: %s", path, strerror(errno));
        }
        if (n == 0)
            return tp_errorf(err, "%s: write failed: wrote 0 bytes", path);
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

int tp_pwrite_all(int fd, const void *buf, size_t len, uint64_t off, const char *path, tp_err *err)
{
    const uint8_t *p = buf;
    if (off > (uint64_t)INT64_MAX)
        return tp_errorf(err, "%s: write offset %llu too large", path, (unsigned long long)off);
    while (len > 0) {
        size_t want = len < (1u << 30) ? len : (1u << 30);
        ssize_t n = pwrite(fd, p, want, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return tp_errorf(err, "%s: write failed at offset %llu: %s", path,
                             (unsigned long long)off, strerror(errno));
        }
        if (n == 0)
            return tp_errorf(err, "%s: write failed at offset %llu: wrote 0 bytes", path,
                             (unsigned long long)off);
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

int tp_read_file(const char *path, size_t max_size, char **out, size_t *out_len, tp_err *err)
{
    *out = NULL;
    if (out_len)
        *out_len = 0;
    struct stat st;
    int fd = tp_open_regular(path, 0, &st, err);
    if (fd < 0)
        return -1;
    if (S_ISREG(st.st_mode) && (uint64_t)st.st_size > max_size) {
        close(fd);
        return tp_errorf(err, "%s: file is %llu bytes, more than the %zu allowed", path,
                         (unsigned long long)st.st_size, max_size);
    }
    /* Read until EOF rather than trusting st_size (the file may grow while
     * we read), but never past max_size. */
    size_t cap = S_ISREG(st.st_mode) ? (size_t)st.st_size + 1 : 4096;
    if (cap > max_size + 1 || cap == 0)
        cap = max_size + 1;
    char *buf = malloc(cap + 1);
    if (!buf) {
        close(fd);
        return tp_errorf(err, "%s: out of memory", path);
    }
    size_t len = 0;
    for (;;) {
        if (len == cap) {
            if (cap > max_size) {
                free(buf);
                close(fd);
                return tp_errorf(err, "%s: file is more than the %zu bytes allowed", path, max_size);
            }
            size_t ncap = cap * 2 > max_size + 1 ? max_size + 1 : cap * 2;
            char *nb = realloc(buf, ncap + 1);
            if (!nb) {
                free(buf);
                close(fd);
                return tp_errorf(err, "%s: out of memory", path);
            }
            buf = nb;
            cap = ncap;
        }
        ssize_t n = read(fd, buf + len, cap - len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            free(buf);
            close(fd);
            return tp_errorf(err, "%s: read failed: %s", path, strerror(e));
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    if (len > max_size) {
        free(buf);
        return tp_errorf(err, "%s: file is more than the %zu bytes allowed", path, max_size);
    }
    buf[len] = '\0';
    *out = buf;
    if (out_len)
        *out_len = len;
    return 0;
}

char *tp_path_dir(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return strdup(".");
    if (slash == path)
        return strdup("/");
    return strndup(path, (size_t)(slash - path));
}

int tp_fsync_dir(const char *dir, tp_err *err)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return tp_errorf(err, "%s: cannot open directory: %s", dir, strerror(errno));
    /* Some file systems do not support fsync on directories (EINVAL); the
     * rename is then as durable as that file system makes it. */
    if (fsync(fd) != 0 && errno != EINVAL && errno != EROFS) {
        int e = errno;
        close(fd);
        return tp_errorf(err, "%s: fsync failed: %s", dir, strerror(e));
    }
    close(fd);
    return 0;
}

int tp_write_file_atomic(const char *path, const void *buf, size_t len, tp_err *err)
{
    char tmp[PATH_MAX];
    int n = snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    if (n < 0 || (size_t)n >= sizeof tmp)
        return tp_errorf(err, "%s: path too long", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return tp_errorf(err, "%s: cannot create: %s", tmp, strerror(errno));
    if (tp_write_all(fd, buf, len, tmp, err) != 0) {
        close(fd);
        unlink(tmp);
        return -1;
    }
    return tp_file_commit(fd, tmp, path, err);
}

int tp_file_commit(int fd, const char *tmp_path, const char *final_path, tp_err *err)
{
    int rc = 0;
    if (fsync(fd) != 0)
        rc = tp_errorf(err, "%s: fsync failed: %s", tmp_path, strerror(errno));
    /* close() reports delayed write errors (NFS): a failed close is a failed write. */
    if (close(fd) != 0 && rc == 0)
        rc = tp_errorf(err, "%s: close failed: %s", tmp_path, strerror(errno));
    if (rc == 0 && rename(tmp_path, final_path) != 0)
        rc = tp_errorf(err, "%s: cannot rename to %s: %s", tmp_path, final_path, strerror(errno));
    if (rc < 0) {
        unlink(tmp_path);
        return -1;
    }
    /* Without the directory's fsync the rename may not survive a crash. */
    char *dir = tp_path_dir(final_path);
    rc = dir ? tp_fsync_dir(dir, err) : tp_errorf(err, "%s: out of memory", final_path);
    free(dir);
    if (rc < 0)
        unlink(final_path);
    return rc;
}

char *tp_path_join(const char *dir, const char *name)
{
    size_t dl = strlen(dir), nl = strlen(name);
    bool need_slash = dl > 0 && dir[dl - 1] != '/';
    char *out = malloc(dl + need_slash + nl + 1);
    if (!out)
        return NULL;
    memcpy(out, dir, dl);
    if (need_slash)
        out[dl] = '/';
    memcpy(out + dl + need_slash, name, nl + 1);
    return out;
}

/* --------------------------------------------------------------- checksums */

uint64_t tp_xxh3(const void *data, size_t len)
{
    return (uint64_t)XXH3_64bits(data, len);
}

void tp_hex_bytes(const uint8_t *bytes, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[bytes[i] >> 4];
        out[2 * i + 1] = digits[bytes[i] & 0xf];
    }
    out[2 * n] = '\0';
}

void tp_hex64(uint64_t v, char out[17])
{
    uint8_t big_endian[8];
    for (int i = 7; i >= 0; i--, v >>= 8)
        big_endian[i] = (uint8_t)v;
    tp_hex_bytes(big_endian, sizeof big_endian, out);
}

bool tp_is_lower_hex(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return false;
    return true;
}

int tp_parse_hex64(const char *s, uint64_t *out)
{
    /* Exactly 16 hex digits, as tp_hex64 writes them. */
    if (!s)
        return -1;
    uint64_t v = 0;
    int i;
    for (i = 0; i < 16; i++) {
        char c = s[i];
        unsigned d;
        if (c >= '0' && c <= '9') d = (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') d = (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') d = (unsigned)(c - 'A' + 10);
        else return -1;
        v = (v << 4) | d;
    }
    if (s[i] != '\0')
        return -1;
    *out = v;
    return 0;
}

/* -------------------------------------------------------------------- rng */

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void tp_rng_seed(tp_rng *r, uint64_t seed)
{
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&seed);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t tp_rng_next(tp_rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double tp_rng_uniform(tp_rng *r) { return (double)(tp_rng_next(r) >> 11) * 0x1.0p-53; }

/* ------------------------------------------------------------------- clock */

double tp_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
