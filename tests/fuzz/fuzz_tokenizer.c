/* fuzz_tokenizer.c - libFuzzer target for tokenizer.json (runtime/tokenizer.c).
 *
 * The input is loaded as a tokenizer.json.  Any input either loads or fails
 * with a one-line message naming the file.  When it loads, a few strings
 * made from the input itself (the whole input as text, its first bytes,
 * a fixed sentence with special tokens; each cut at its first NUL, as the
 * decoders return C strings) are encoded; every id
 * must lie inside the vocabulary and decode, and the streaming decoder must
 * give the same text as the whole-sequence decode.  Ids made from the
 * input's bytes are decoded too (unknown ids must fail cleanly). */
#include "runtime.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NAME "fuzz/tokenizer.json"
#define MAX_TEXT 4096

static void check_message(const tp_err *err)
{
    if (!strstr(err->msg, NAME) || strchr(err->msg, '\n'))
        abort(); /* messages name the file and stay on one line */
}

/* The streaming decoder's text for ids, or NULL when an id is refused. */
static char *stream_decode(const tp_tokenizer *tok, const int32_t *ids, size_t n)
{
    tp_detok *d = tp_detok_new(tok, false);
    if (!d)
        return NULL;
    size_t len = 0;
    char *all = calloc(1, 1);
    tp_err err;
    for (size_t i = 0; all && i < n; i++) {
        char *piece;
        if (tp_detok_push(d, ids[i], &piece, &err) != 0) {
            check_message(&err);
            free(all);
            all = NULL;
            break;
        }
        size_t pl = strlen(piece);
        char *grown = realloc(all, len + pl + 1);
        if (grown) {
            memcpy(grown + len, piece, pl + 1);
            len += pl;
        } else {
            free(all);
        }
        all = grown;
        free(piece);
    }
    char *rest = all ? tp_detok_flush(d) : NULL;
    if (rest) {
        size_t rl = strlen(rest);
        char *grown = realloc(all, len + rl + 1);
        if (grown)
            memcpy(grown + len, rest, rl + 1);
        else
            free(all);
        all = grown;
        free(rest);
    }
    tp_detok_free(d);
    return all;
}

static void encode_and_decode(const tp_tokenizer *tok, const char *text, size_t len)
{
    int32_t *ids;
    size_t n;
    tp_err err;
    if (tp_tokenizer_encode(tok, text, len, &ids, &n, &err) != 0) {
        check_message(&err);
        return;
    }
    size_t vocab = tp_tokenizer_vocab_size(tok);
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || (size_t)ids[i] >= vocab)
            abort();
    char *whole;
    if (tp_tokenizer_decode(tok, ids, n, false, &whole, &err) != 0)
        abort(); /* ids the encoder made must decode */
    char *streamed = stream_decode(tok, ids, n);
    if (streamed && strcmp(streamed, whole) != 0)
        abort();
    free(streamed);
    free(whole);
    if (tp_tokenizer_decode(tok, ids, n, true, &whole, &err) != 0)
        abort();
    free(whole);
    free(ids);
}

/* Ids from the input's bytes, some outside the vocabulary. */
static void decode_input_ids(const tp_tokenizer *tok, const uint8_t *data, size_t size)
{
    int32_t ids[64];
    size_t n = 0;
    size_t vocab = tp_tokenizer_vocab_size(tok);
    for (size_t i = 0; i + 1 < size && n < 64; i += 2)
        ids[n++] = (int32_t)(((size_t)data[i] << 8 | data[i + 1]) % (vocab + 2)) - 1;
    char *text;
    tp_err err;
    if (tp_tokenizer_decode(tok, ids, n, false, &text, &err) != 0)
        check_message(&err);
    else
        free(text);
    free(stream_decode(tok, ids, n));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    tp_tokenizer *tok = NULL;
    tp_err err;
    if (tp_tokenizer_load_mem(&tok, (const char *)data, size, NAME, &err) != 0) {
        if (tok)
            abort(); /* a refusal leaves nothing behind */
        check_message(&err);
        return 0;
    }
    static const char sentence[] = "Hello, world! <|endoftext|><think> 12 345\r\n\t caf\xc3\xa9 \xe4\xbd\xa0\xe5\xa5\xbd";
    encode_and_decode(tok, sentence, sizeof sentence - 1);
    size_t text_len = strnlen((const char *)data, size < MAX_TEXT ? size : MAX_TEXT);
    encode_and_decode(tok, (const char *)data, text_len);
    encode_and_decode(tok, (const char *)data, text_len < 16 ? text_len : 16);
    decode_input_ids(tok, data, size);
    tp_tokenizer_free(tok);
    return 0;
}
