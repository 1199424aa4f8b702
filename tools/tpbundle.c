/* tpbundle - node bundles of a converted directory.
 *   tpbundle pack OUT --ranks-per-node K [--out DIR] [--quiet]
 *   tpbundle unpack BUNDLE.tar DEST
 *   tpbundle verify BUNDLE.tar */
#include "cli.h"
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
            "  verify  checks the bundle's manifest and every checksum of its rank and copied files\n"
            "\n"
            "  --ranks-per-node K  pack: ranks per node bundle (required)\n"
            "  --out DIR           pack: where the bundles go (default: OUT)\n"
            "  --quiet             pack: no progress and no list of bundles\n"
            "  -h, --help          this help\n"
            "\n"
            "Examples:\n"
            "  %s pack out/ --ranks-per-node 2\n"
            "  %s verify out/node-00001-of-00002.tar\n"
            "  %s unpack out/node-00001-of-00002.tar node1/\n",
            prog, prog, prog, prog, prog, prog);
}

static int cmd_pack(int argc, char **argv)
{
    const char *dir = NULL, *out = NULL;
    int k = 0;
    bool quiet = false;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--ranks-per-node") == 0) {
            const char *v = cli_value(argc, argv, &i);
            if (!v)
                return cli_usage_error("flag %s needs a number", a);
            long n;
            if (!cli_long(v, 1, 1000000, &n))
                return cli_usage_error("flag --ranks-per-node: \"%s\" is not a positive count", v);
            k = (int)n;
        } else if (strcmp(a, "--out") == 0) {
            if (!(out = cli_value(argc, argv, &i)))
                return cli_usage_error("flag %s needs a directory", a);
        } else if (strcmp(a, "--quiet") == 0) {
            quiet = true;
        } else if (cli_operand(a, &dir)) {
            return 2;
        }
    }
    if (!dir)
        return cli_usage_error("pack: missing OUT (a converted directory)");
    if (!k)
        return cli_usage_error("pack: flag --ranks-per-node is required");
    tp_err err;
    char **paths;
    size_t n;
    if (!out)
        out = dir;
    if (tp_bundle_pack(dir, k, out, quiet, &paths, &n, &err) < 0)
        return cli_fail(&err);
    for (size_t i = 0; i < n; i++) {
        printf("%s\n", paths[i]);
        free(paths[i]);
    }
    free(paths);
    return 0;
}

static int cmd_unpack(int argc, char **argv)
{
    if (cli_no_flags(argc, argv))
        return 2;
    if (argc != 2)
        return cli_usage_error("unpack needs BUNDLE.tar and DEST");
    tp_err err;
    if (tp_bundle_unpack(argv[0], argv[1], &err) < 0)
        return cli_fail(&err);
    printf("%s: unpacked %s into %s\n", prog, argv[0], argv[1]);
    return 0;
}

static int cmd_verify(int argc, char **argv)
{
    if (cli_no_flags(argc, argv))
        return 2;
    if (argc != 1)
        return cli_usage_error("verify needs exactly one BUNDLE.tar");
    tp_err err;
    size_t n;
    if (tp_bundle_verify(argv[0], &n, &err) < 0)
        return cli_fail(&err);
    printf("%s: OK: %s holds %zu rank file%s, every checksum matches\n", prog, argv[0], n,
           n == 1 ? "" : "s");
    return 0;
}

int main(int argc, char **argv)
{
    cli_init(prog, usage);
    if (argc < 2)
        return cli_usage_error("missing command (pack, unpack or verify)");
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
    return cli_usage_error("unknown command %s (pack, unpack or verify)", cmd);
}
