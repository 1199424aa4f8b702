/* fuzz_chat.c - libFuzzer target for the chat turn formatting and the
 * tokenizer behind it: random user text (the first byte picks what ended
 * the previous answer) -> tp_chat_format_turn -> tp_tokenizer_encode with
 * the real Qwen3 tokenizer (tests/data/qwen3-tokenizer, loaded once; run
 * from the repository root, or set TP_FUZZ_TOKENIZER).  Invalid UTF-8 must
 * be refused with a one-line message naming its offset in the user's text;
 * anything else must become a turn with the ChatML markers around the text
 * and encode into ids inside the vocabulary.  Never crash or leak. */
#include "runtime.h"

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

/* The error names the first invalid byte, and that byte is where
 * tp_utf8_first_invalid says. */
static void check_refusal(const char *user, size_t len, const tp_err *err)
{
    char want[64];
    snprintf(want, sizeof want, "at byte %zu of your input", tp_utf8_first_invalid(user, len));
    if (tp_utf8_first_invalid(user, len) == len || !strstr(err->msg, want) || strchr(err->msg, '\n'))
        abort();
}

static void check_turn(const char *user, size_t len, tp_chat_prev prev, const char *text, size_t text_len)
{
    static const char *const opening[] = {"", "\n", "<|im_end|>\n"};
    size_t n_open = strlen(opening[prev]), n_uo = sizeof user_open - 1, n_uc = sizeof user_close - 1;
    if (text_len != n_open + n_uo + len + n_uc || text[text_len] != '\0' ||
        memcmp(text, opening[prev], n_open) != 0 || memcmp(text + n_open, user_open, n_uo) != 0 ||
        memcmp(text + n_open + n_uo, user, len) != 0 || memcmp(text + n_open + n_uo + len, user_close, n_uc) != 0)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    tp_tokenizer *tok = tokenizer();
    tp_chat_prev prev = (tp_chat_prev)(data[0] % 3);
    const char *user = (const char *)data + 1;
    size_t len = size - 1;
    char *text = NULL;
    size_t text_len = 0;
    tp_err err;
    if (tp_chat_format_turn(user, len, prev, &text, &text_len, &err)) {
        if (text)
            abort();
        check_refusal(user, len, &err);
        return 0;
    }
    check_turn(user, len, prev, text, text_len);
    int32_t *ids = NULL;
    size_t n = 0;
    if (tp_tokenizer_encode(tok, text, text_len, &ids, &n, &err))
        abort();   /* valid UTF-8 always encodes */
    /* at least the markers: <|im_start|> user \n ... <|im_end|> \n <|im_start|> assistant \n */
    if (n < 7)
        abort();
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || (size_t)ids[i] >= tp_tokenizer_vocab_size(tok))
            abort();
    free(ids);
    free(text);
    return 0;
}
