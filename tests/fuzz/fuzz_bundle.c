/* fuzz_bundle.c - libFuzzer target for node bundles (loader/bundle.c).
 *
 * The input is a tar image.  It is written to a file in a private
 * temporary directory (the bundle code reads tars by path), then
 *   - tp_bundle_verify: the manifest, every entry's name, type and size and
 *     every checksum of the rank and copied files it holds;
 *   - tp_bundle_unpack into <tmp>/out: on success <tmp>/out holds only
 *     regular files; on failure <tmp>/out is gone (nothing half-written);
 *     either way nothing else appears in <tmp> (no entry escapes it).
 * Errors must name the bundle or the destination and stay on one line. */
#include "loader.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char work[PATH_MAX];     /* the private temporary directory */
static char tar_path[PATH_MAX]; /* <work>/in.tar */
static char dest[PATH_MAX];     /* <work>/out */

static void remove_work(void)
{
    unlink(tar_path);
    rmdir(work);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(work, sizeof work, "%s/fuzz_bundle.XXXXXX", base);
    if (!mkdtemp(work))
        abort();
    snprintf(tar_path, sizeof tar_path, "%s/in.tar", work);
    snprintf(dest, sizeof dest, "%s/out", work);
    atexit(remove_work);
    return 0;
}

static void check_message(const tp_err *err)
{
    if (!strstr(err->msg, work) || strchr(err->msg, '\n'))
        abort();
}

static void write_input(const uint8_t *data, size_t size)
{
    int fd = open(tar_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        abort();
    tp_err err;
    if (tp_write_all(fd, data, size, tar_path, &err) != 0)
        abort();
    close(fd);
}

/* Checks that <work> holds in.tar and, when want_out, the directory out
 * with regular files only (removed here); aborts on anything else. */
static void check_and_clean(bool want_out)
{
    DIR *d = opendir(work);
    if (!d)
        abort();
    struct dirent *de;
    bool saw_out = false;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..") || !strcmp(de->d_name, "in.tar"))
            continue;
        if (strcmp(de->d_name, "out") != 0)
            abort(); /* something escaped the destination */
        saw_out = true;
    }
    closedir(d);
    if (saw_out != want_out)
        abort(); /* a failed unpack left its destination behind, or a good one none */
    if (!want_out)
        return;
    d = opendir(dest);
    if (!d)
        abort();
    int dfd = dirfd(d);
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        struct stat st;
        if (fstatat(dfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode))
            abort(); /* only plain files may come out of a bundle */
        if (de->d_name[0] == '.')
            abort(); /* a temporary name survived */
        unlinkat(dfd, de->d_name, 0);
    }
    closedir(d);
    if (rmdir(dest) != 0)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    write_input(data, size);
    tp_err err;
    size_t n_ranks = 0;
    if (tp_bundle_verify(tar_path, &n_ranks, &err) != 0)
        check_message(&err);
    else if (n_ranks == 0)
        abort(); /* a verified bundle holds at least one rank file */
    int rc = tp_bundle_unpack(tar_path, dest, &err);
    if (rc != 0)
        check_message(&err);
    check_and_clean(rc == 0);
    return 0;
}
