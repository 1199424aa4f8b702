/* fuzz_manifest.c - libFuzzer target for the manifest.json parser.  Any
 * input either parses into a manifest whose invariants hold (ranks 0..tp-1
 * in order, plain file names) or fails with a one-line message naming the
 * file; never crash or leak. */
#include "shardfmt.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    tp_manifest m;
    tp_err err;
    /* Mutations would almost all stop at the self-checksum: seal each input
     * (when it ends with the member) so the checks behind it are explored. */
    char *text = malloc(size ? size : 1);
    if (!text)
        return 0;
    memcpy(text, data, size);
    tp_manifest_seal(text, size);
    int rc = tp_manifest_parse(text, size, "fuzz/manifest.json", &m, &err);
    free(text);
    if (rc != 0) {
        if (!strstr(err.msg, "fuzz/manifest.json") || strchr(err.msg, '\n'))
            abort();
        return 0;
    }
    if (m.tp < 1 || m.tp > 4096 || !m.ranks || !m.config_json || !m.plan_json || strlen(m.conversion_id) != 32)
        abort();
    for (int i = 0; i < m.tp; i++)
        if (m.ranks[i].rank != i || strchr(m.ranks[i].file, '/') || strcmp(m.ranks[i].file, "..") == 0)
            abort();
    for (size_t i = 0; i < m.n_files; i++)
        if (!m.files[i].name || strchr(m.files[i].name, '/') || strcmp(m.files[i].name, "..") == 0)
            abort();
    tp_manifest_free(&m);
    return 0;
}
