/* fuzz_safetensors.c - libFuzzer target for the safetensors header parser.
 * Any input must either parse (and then every tensor must lie inside the
 * buffer) or fail with a one-line message; never crash or leak. */
#include "shardfmt.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    tp_st_file f;
    tp_err err;
    if (tp_st_parse(&f, data, size, "fuzz", &err) != 0) {
        if (!strstr(err.msg, "fuzz") || strchr(err.msg, '\n'))
            abort(); /* messages name the file and stay on one line */
        return 0;
    }
    uint64_t covered = 0;
    for (size_t i = 0; i < f.n_tensors; i++) {
        const tp_st_tensor *t = &f.tensors[i];
        if (t->data < data || t->nbytes > size || t->data + t->nbytes > data + size)
            abort();
        if (tp_st_find(&f, t->name) != t)
            abort();
        /* touch the bytes so that ASan sees any out-of-bounds pointer */
        volatile uint8_t sink = 0;
        if (t->nbytes)
            sink ^= t->data[0] ^ t->data[t->nbytes - 1];
        (void)sink;
        covered += t->nbytes;
    }
    if (8 + f.header_len + covered != size)
        abort(); /* tensors must cover the data section exactly */
    tp_st_close(&f);
    return 0;
}
