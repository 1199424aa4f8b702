/* chat.c - the ChatML turns tprun --chat and -i feed the model (Qwen's
 * format).  Plain formatting, not the model's Jinja chat template: the
 * user's text goes between fixed markers.  Kept in the runtime, apart from
 * tprun, so that a fuzz target (tests/fuzz/fuzz_chat.c) reaches it. */
#include <stdlib.h>
#include <string.h>

#include "runtime.h"

static const char user_open[] = "<|im_start|>user\n";
static const char user_close[] = "<|im_end|>\n<|im_start|>assistant\n";

/* What ends the previous answer before the next user turn. */
static const char *turn_opening(tp_chat_prev prev)
{
    switch (prev) {
    case TP_CHAT_AFTER_EOS: return "\n";            /* the answer ended with its <|im_end|> */
    case TP_CHAT_AFTER_CUT: return "<|im_end|>\n";  /* cut by max_new_tokens: close it */
    default: return "";                             /* first turn */
    }
}

int tp_chat_format_turn(const char *user, size_t len, tp_chat_prev prev, char **text, size_t *text_len,
                        tp_err *err)
{
    *text = NULL;
    *text_len = 0;
    size_t bad = tp_utf8_first_invalid(user, len);
    if (bad != len)
        return tp_errorf(err, "invalid UTF-8 at byte %zu of your input", bad);
    const char *open = turn_opening(prev);
    size_t n_open = strlen(open), n_user_open = sizeof user_open - 1, n_close = sizeof user_close - 1;
    size_t n = n_open + n_user_open + len + n_close;
    char *s = malloc(n + 1);
    if (!s)
        return tp_errorf(err, "out of memory for a chat turn of %zu bytes", len);
    /* memcpy, not printf: the user's text may hold NUL bytes */
    char *p = s;
    memcpy(p, open, n_open);
    p += n_open;
    memcpy(p, user_open, n_user_open);
    p += n_user_open;
    memcpy(p, user, len);
    p += len;
    memcpy(p, user_close, n_close);
    p += n_close;
    *p = '\0';
    *text = s;
    *text_len = n;
    return 0;
}
