/* tpverify - checks a converted directory: every checksum of every rank
 * file against the manifest, and with --against every tensor bit for bit
 * against the source model.  OUT may also be a node bundle (tar).  Exit 0
 * only when everything matches. */
#include "cli.h"
#include "loader.h"

#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *prog = "tpverify";

static void usage(FILE *f)
{
    fprintf(f,
            "usage: %s OUT [--against MODEL_DIR] [--threads N] [--quiet]\n"
            "  OUT                 a converted directory (tpconvert's output), or a node\n"
            "                      bundle (.tar: its manifest and rank files are checked)\n"
            "  --against MODEL_DIR also compare every tensor with the source model\n"
            "  --threads N         decompression threads (default: all cores)\n"
            "  --quiet             no progress bar\n"
            "  -h, --help          this help\n"
            "\n"
            "Examples:\n"
            "  tpverify out/\n"
            "  tpverify out/ --against Qwen3-0.6B/\n"
            "  tpverify out/node-00000-of-00002.tar\n",
            prog);
}

int main(int argc, char **argv)
{
    const char *out = NULL, *against = NULL;
    int threads = 0;
    bool quiet = false;
    cli_init(prog, usage);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--against") == 0) {
            if (!(against = cli_value(argc, argv, &i)))
                return cli_usage_error("flag %s needs a model directory", a);
        } else if (strcmp(a, "--threads") == 0) {
            const char *v = cli_value(argc, argv, &i);
            if (!v)
                return cli_usage_error("flag %s needs a number", a);
            long n;
            if (!cli_long(v, 0, 4096, &n))
                return cli_usage_error("flag --threads: \"%s\" is not a thread count (0-4096)", v);
            threads = (int)n;
        } else if (strcmp(a, "--quiet") == 0) {
            quiet = true;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        } else if (cli_operand(a, &out)) {
            return 2;
        }
    }
    if (!out)
        return cli_usage_error("missing OUT (a converted directory)");

    tp_err err;
    struct stat st;
    if (stat(out, &st) == 0 && S_ISREG(st.st_mode)) {
        /* A node bundle: its manifest and every checksum of its rank files. */
        if (against) {
            return cli_arg_error("--against needs a converted directory; %s is a file (unpack the "
                                 "bundle first)",
                                 out);
        }
        size_t n_ranks;
        double t0 = tp_now();
        if (tp_bundle_verify(out, &n_ranks, &err) < 0)
            return cli_fail(&err);
        printf("%s: OK: bundle %s: %zu rank file%s, every checksum matches (%.2f s)\n", prog, out,
               n_ranks, n_ranks == 1 ? "" : "s", tp_now() - t0);
        return 0;
    }
    tp_verify_report rep;
    double t0 = tp_now();
    int rc = against ? tp_verify_against(out, against, threads, quiet, &rep, &err)
                     : tp_verify_dir(out, threads, quiet, &rep, &err);
    double secs = tp_now() - t0;
    if (rc < 0)
        return cli_fail(&err);
    double gb = (double)rep.bytes / 1e9;
    char amount[32];
    if (rep.bytes >= 1000000000ull)
        snprintf(amount, sizeof amount, "%.2f GB", gb);
    else if (rep.bytes >= 1000000ull)
        snprintf(amount, sizeof amount, "%.1f MB", (double)rep.bytes / 1e6);
    else
        snprintf(amount, sizeof amount, "%.1f kB", (double)rep.bytes / 1e3);
    printf("%s: OK: %zu rank%s, %zu tensors, %s checked in %.2f s (%.2f GB/s)", prog, rep.ranks,
           rep.ranks == 1 ? "" : "s", rep.tensors, amount, secs, secs > 0 ? gb / secs : 0.0);
    if (against)
        printf(", %zu source tensors identical bit for bit", rep.compared_tensors);
    printf("\n");
    return 0;
}
