/* fuzz_codec.c - libFuzzer target for the chunk codecs (every row of the
 * table, every dtype).
 *
 * Input: byte 0 picks the codec (b % TP_CODEC_COUNT) and the dtype
 * (b / 4 % 5); bytes 1-3 a raw size (u24 LE, made a whole number of
 * elements); bytes 4-5 a position and byte 6 an xor mask; the rest is the
 * payload.  Each input is used three ways:
 *   1. the payload decoded as a stored chunk of that raw size (untrusted
 *      bytes straight into the decoder);
 *   2. the payload encoded as raw data and decoded back: must be identical;
 *   3. that encoding with the byte at the position xor-ed, decoded: the
 *      Huffman tables and streams are then valid up to one damaged byte,
 *      which reaches deeper than random bytes do.
 * Decoding writes into a buffer of exactly the raw size (ASan catches a
 * byte more); a failure must say "codec" and stay on one line.
 * Seeds (corpus/fuzz_codec/): bf16, f16, f32, fp8 and int8 weight-like
 * payloads, and exphuf / zstd chunks of them, written by a throw-away
 * program around tp_codec_encode in the format above. */
#include "shardfmt.h"

#include <stdlib.h>
#include <string.h>

#define MAX_RAW (1u << 20)

static const tp_dtype dtypes[] = { TP_BF16, TP_F16, TP_F32, TP_F8_E4M3, TP_I8 };

static void check_message(const tp_err *err)
{
    if (!strstr(err->msg, "codec") || strchr(err->msg, '\n'))
        abort();
}

static void decode_untrusted(tp_codec c, tp_dtype dt, const uint8_t *stored, size_t stored_len, size_t raw_len)
{
    uint8_t *dst = malloc(raw_len ? raw_len : 1);
    if (!dst)
        return;
    tp_err err;
    if (tp_codec_decode(c, dt, stored, stored_len, dst, raw_len, NULL, &err) != 0)
        check_message(&err);
    free(dst);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 7)
        return 0;
    tp_codec c = (tp_codec)(data[0] % TP_CODEC_COUNT);
    tp_dtype dt = dtypes[data[0] / 4 % (sizeof dtypes / sizeof *dtypes)];
    size_t es = tp_dtype_size(dt);
    size_t raw_len = ((size_t)data[1] | (size_t)data[2] << 8 | (size_t)data[3] << 16) % MAX_RAW / es * es;
    size_t pos = (size_t)data[4] | (size_t)data[5] << 8;
    uint8_t mask = data[6];
    const uint8_t *payload = data + 7;
    size_t n = size - 7;

    decode_untrusted(c, dt, payload, n, raw_len);

    size_t len = n / es * es, cap = tp_codec_bound(c, len), stored_len = 0;
    uint8_t *enc = malloc(cap ? cap : 1), *back = malloc(len ? len : 1);
    tp_err err;
    if (enc && back) {
        if (tp_codec_encode(c, tp_codec_get(c)->default_level, dt, payload, len, enc, cap, &stored_len, &err) != 0)
            abort(); /* encoding whole elements into the bound cannot fail */
        if (tp_codec_decode(c, dt, enc, stored_len, back, len, NULL, &err) != 0 || memcmp(back, payload, len) != 0)
            abort();
        if (stored_len) {
            enc[pos % stored_len] ^= mask ? mask : 1;
            decode_untrusted(c, dt, enc, stored_len, len);
        }
    }
    free(enc);
    free(back);
    return 0;
}
