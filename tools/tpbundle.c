/* tpbundle - node bundles of a converted directory.
 *   tpbundle pack OUT --ranks-per-node K [--out DIR] [--quiet]
 *   tpbundle unpack BUNDLE.tar DEST
 *   tpbundle verify BUNDLE.tar */
#include "loader.h"

#include <stdlib.h>
#include <string.h>

static const char *prog = "tpbundle";

static void usage(FILE *f)
{
    fprintf(f,
            "usage: %s pack OUT --ranks-per-node K [--out DIR] [--quiet]\n"
            "       %s unpack BUNDLE.tar DEST\n"
            "       %s verify BUNDLE.tar\n"
            "  pack    writes node-NNNNN-of-MMMMM.tar files (K ranks each) into DIR\n"
            "          (default: OUT itself, as tpconvert --bundle does)\n"
            "  unpack  extracts a bundle into DEST (created; must be empty if it exists)\n"
            "  verify  checks the bundle's manifest and every checksum of its rank files\n",
            prog, prog, prog);
}

static int bad_usage(const char *fmt, const char *arg)
{
    fprintf(stderr, "%s: ", prog);
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    usage(stderr);
    return 2;
}

static int fail(const tp_err *err)
{
    fprintf(stderr, "%s: %s\n", prog, err->msg);
    return 1;
}

static int cmd_pack(int argc, char **argv)
{
    const char *dir = NULL, *out = NULL;
    int k = 0;
    bool quiet = false;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--ranks-per-node") == 0) {
            if (++i >= argc)
                return bad_usage("flag %s needs a number", a);
            char *end;
            long n = strtol(argv[i], &end, 10);
            if (*end || end == argv[i] || n < 1 || n > 1000000)
                return bad_usage("flag --ranks-per-node: \"%s\" is not a positive count", argv[i]);
            k = (int)n;
        } else if (strcmp(a, "--out") == 0) {
            if (++i >= argc)
                return bad_usage("flag %s needs a directory", a);
            out = argv[i];
        } else if (strcmp(a, "--quiet") == 0) {
            quiet = true;
        } else if (a[0] == '-') {
            return bad_usage("unknown flag %s", a);
        } else if (!dir) {
            dir = a;
        } else {
            return bad_usage("unexpected argument %s", a);
        }
    }
    if (!dir)
        return bad_usage("%s", "pack: missing OUT (a converted directory)");
    if (!k)
        return bad_usage("%s", "pack: flag --ranks-per-node is required");
    tp_err err;
    char **paths;
    size_t n;
    if (!out)
        out = dir;
    if (tp_bundle_pack(dir, k, out, quiet, &paths, &n, &err) < 0)
        return fail(&err);
    for (size_t i = 0; i < n; i++) {
        printf("%s\n", paths[i]);
        free(paths[i]);
    }
    free(paths);
    return 0;
}

static int cmd_unpack(int argc, char **argv)
{
    for (int i = 0; i < argc; i++)
        if (argv[i][0] == '-')
            return bad_usage("unknown flag %s", argv[i]);
    if (argc != 2)
        return bad_usage("%s", "unpack needs BUNDLE.tar and DEST");
    tp_err err;
    if (tp_bundle_unpack(argv[0], argv[1], &err) < 0)
        return fail(&err);
    printf("%s: unpacked %s into %s\n", prog, argv[0], argv[1]);
    return 0;
}

static int cmd_verify(int argc, char **argv)
{
    for (int i = 0; i < argc; i++)
        if (argv[i][0] == '-')
            return bad_usage("unknown flag %s", argv[i]);
    if (argc != 1)
        return bad_usage("%s", "verify needs exactly one BUNDLE.tar");
    tp_err err;
    size_t n;
    if (tp_bundle_verify(argv[0], &n, &err) < 0)
        return fail(&err);
    printf("%s: OK: %s holds %zu rank file%s, every checksum matches\n", prog, argv[0], n,
           n == 1 ? "" : "s");
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return bad_usage("%s", "missing command (pack, unpack or verify)");
    const char *cmd = argv[1];
    if (strcmp(cmd, "-h") == 0 || strcmp(cmd, "--help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(cmd, "pack") == 0)
        return cmd_pack(argc - 2, argv + 2);
    if (strcmp(cmd, "unpack") == 0)
        return cmd_unpack(argc - 2, argv + 2);
    if (strcmp(cmd, "verify") == 0)
        return cmd_verify(argc - 2, argv + 2);
    return bad_usage("unknown command %s (pack, unpack or verify)", cmd);
}
