/* fuzz_chat.c - libFuzzer target for a chat turn rendered with the ChatML
 * fallback template and the tokenizer behind it: random user text (valid
 * UTF-8 without NUL, what tprun lets through) -> tp_chat_render ->
 * tp_tokenizer_encode with the real Qwen3 tokenizer
 * (tests/data/qwen3-tokenizer, loaded once; run from the repository root,
 * or set TP_FUZZ_TOKENIZER).  The text must come out between the ChatML
 * markers, untouched (never read as template syntax), and encode into ids
 * inside the vocabulary.  Never crash or leak. */
#include "runtime.h"

#include <cJSON.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static tp_tokenizer *tokenizer(void)
{
    static tp_tokenizer *tok;
    if (!tok) {
        const char *path = getenv("TP_FUZZ_TOKENIZER");
        tp_err err;
        if (!path)
            path = "tests/data/qwen3-tokenizer/tokenizer.json.zst";
        if (tp_tokenizer_load(&tok, path, &err)) {
            fprintf(stderr, "fuzz_chat: %s\n", err.msg);   /* a fuzzer without its tokenizer tests nothing */
            abort();
        }
    }
    return tok;
}

static const char user_open[] = "<|im_start|>user\n";
static const char user_close[] = "<|im_end|>\n<|im_start|>assistant\n";

static tp_template *chatml(void)
{
    static tp_template *t;
    tp_err err;
    if (!t && tp_template_chatml(&t, &err)) {
        fprintf(stderr, "fuzz_chat: %s\n", err.msg);
        abort();
    }
    return t;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *user = (const char *)data;
    if (tp_utf8_first_invalid(user, size) != size || memchr(user, '\0', size))
        return 0;   /* tprun refuses these before rendering */
    tp_tokenizer *tok = tokenizer();
    char *text = malloc(size + 1);
    memcpy(text, user, size);
    text[size] = '\0';
    cJSON *messages = cJSON_CreateArray(), *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "role", "user");
    cJSON_AddStringToObject(m, "content", text);
    cJSON_AddItemToArray(messages, m);
    char *out = NULL;
    size_t out_len = 0;
    tp_err err;
    if (tp_chat_render(chatml(), NULL, NULL, messages, true, &out, &out_len, &err))
        abort();   /* any valid text renders */
    size_t n_uo = sizeof user_open - 1, n_uc = sizeof user_close - 1;
    if (out_len != n_uo + size + n_uc || out[out_len] != '\0' || memcmp(out, user_open, n_uo) != 0 ||
        memcmp(out + n_uo, user, size) != 0 || memcmp(out + n_uo + size, user_close, n_uc) != 0)
        abort();
    int32_t *ids = NULL;
    size_t n = 0;
    if (tp_tokenizer_encode(tok, out, out_len, &ids, &n, &err))
        abort();   /* valid UTF-8 always encodes */
    /* at least the markers: <|im_start|> user \n ... <|im_end|> \n <|im_start|> assistant \n */
    if (n < 7)
        abort();
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || (size_t)ids[i] >= tp_tokenizer_vocab_size(tok))
            abort();
    free(ids);
    free(out);
    free(text);
    cJSON_Delete(messages);
    return 0;
}
