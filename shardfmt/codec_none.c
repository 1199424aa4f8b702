/* codec_none.c - codec "none": the stored bytes are the raw bytes, so a
 * reader that maps the file can use the tensor in place. */
#include <string.h>

#include "codec_internal.h"

static size_t none_bound(size_t raw_len)
{
    return raw_len;
}

static int none_encode(int level, tp_dtype dtype, const uint8_t *raw, size_t raw_len, uint8_t *dst,
                       size_t dst_cap, size_t *stored_len, tp_err *err)
{
    if (raw_len)
        memcpy(dst, raw, raw_len);
    *stored_len = raw_len;
    return 0;
}

static int none_decode(tp_dtype dtype, const uint8_t *stored, size_t stored_len, uint8_t *dst, size_t raw_len,
                       uint8_t *scratch, tp_err *err)
{
    if (stored_len != raw_len)
        return tp_errorf(err, "codec none: stored size %zu differs from raw size %zu", stored_len, raw_len);
    if (raw_len)
        memcpy(dst, stored, raw_len);
    return 0;
}

const tp_codec_row tp_codec_row_none = {
    .info = { .id = TP_CODEC_NONE, .name = "none", .dtypes = "every dtype: stored as it is (used in place)" },
    .bound = none_bound,
    .encode = none_encode,
    .decode = none_decode,
};
