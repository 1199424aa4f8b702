/* fuzz_shard.c - libFuzzer target for the tpshard reader.
 *
 * Each input is parsed twice: as it is (header checks), and "re-sealed" -
 * file size, index length and both checksums recomputed - so that mutations
 * of the JSON index get past the checksums and reach the index validation.
 * A parsed index is then trusted the way a loader trusts it: every tensor is
 * decoded (with and without verification), which must stay inside the
 * buffer.  Errors must name the file and stay on one line. */
#include "shardfmt.h"

#include <stdlib.h>
#include <string.h>

#define MAX_DECODE (16u << 20)

static void check_message(const tp_err *err)
{
    if (!strstr(err->msg, "fuzz") || strchr(err->msg, '\n'))
        abort();
}

static void exercise(const uint8_t *data, size_t size)
{
    tp_shard_reader r;
    tp_err err;
    memset(&r, 0, sizeof r);
    if (tp_shard_parse(&r.index, data, size, "fuzz", &err) != 0) {
        check_message(&err);
        return;
    }
    r.map.data = data;
    r.map.size = size;
    r.map.path = (char *)"fuzz";
    for (size_t i = 0; i < r.index.n_tensors; i++) {
        const tp_shard_tensor *t = &r.index.tensors[i];
        if (tp_shard_find(&r.index, t->name) != t)
            abort(); /* names are unique */
        if (t->offset % TP_ALIGN || t->offset + t->stored_size > size)
            abort();
        const uint8_t *in = tp_shard_tensor_inplace(&r, t);
        if (in && t->raw_size)
            (void)*(volatile const uint8_t *)(in + t->raw_size - 1);
        if (t->raw_size > MAX_DECODE)
            continue;
        uint8_t *dst = malloc(t->raw_size ? t->raw_size : 1);
        if (!dst)
            continue;
        for (int verify = 0; verify < 2; verify++)
            if (tp_shard_read_tensor(&r, t, dst, NULL, verify, &err) != 0)
                check_message(&err);
        free(dst);
    }
    tp_shard_index_free(&r.index);
}

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    exercise(data, size);
    if (size <= 4096)
        return 0;
    uint8_t *copy = malloc(size);
    if (!copy)
        return 0;
    memcpy(copy, data, size);
    uint64_t off = get64(copy + 16);
    if (off < 4096 || off >= size)
        off = 4096;
    put64(copy + 16, off);
    put64(copy + 24, size - off);
    put64(copy + 32, size);
    put64(copy + 40, tp_xxh3(copy + off, size - off));
    put64(copy + 48, tp_xxh3(copy, 48));
    exercise(copy, size);
    free(copy);
    return 0;
}
