/* serve_fixture.h - the server state tp_srv_parse_request reads, without a
 * daemon or a model: the real Qwen3 tokenizer (tests/data/qwen3-tokenizer)
 * and Qwen3's chat template (tests/data/templates/qwen3-0.6b.jinja), a
 * model vocabulary of 151,936 ids (Qwen3's, padded past the tokenizer's),
 * served as "tiny".  Paths are relative to the repository root (where
 * run_tests.sh and run_fuzz.sh run).  Shared by tests/test_serve_request.c
 * and tests/fuzz/fuzz_request.c.  Header-only. */
#ifndef TP_TESTS_SERVE_FIXTURE_H
#define TP_TESTS_SERVE_FIXTURE_H

#include <stdio.h>
#include <stdlib.h>

#include "serve_internal.h"

#define SERVE_FIXTURE_TOKENIZER "tests/data/qwen3-tokenizer/tokenizer.json.zst"
#define SERVE_FIXTURE_TEMPLATE "tests/data/templates/qwen3-0.6b.jinja"
#define SERVE_FIXTURE_VOCAB 151936

typedef struct serve_fixture {
    tp_srv s;
    tp_serve_opts o;
    tp_model_config cfg;
    tp_tokenizer *tok;
    tp_template *chat_template;
} serve_fixture;

/* f->s as tp_serve_run would set it up for max_seq and max_body. */
static int serve_fixture_init(serve_fixture *f, int max_seq, size_t max_body, tp_err *err)
{
    *f = (serve_fixture){ 0 };
    char *src = NULL;
    size_t len = 0;
    if (tp_tokenizer_load(&f->tok, SERVE_FIXTURE_TOKENIZER, err) ||
        tp_read_file(SERVE_FIXTURE_TEMPLATE, 1 << 20, &src, &len, err))
        return -1;
    int rc = tp_template_parse(&f->chat_template, src, len, SERVE_FIXTURE_TEMPLATE, err);
    free(src);
    if (rc)
        return -1;
    tp_tokenizer_set_model_vocab(f->tok, SERVE_FIXTURE_VOCAB);
    f->cfg.vocab = SERVE_FIXTURE_VOCAB;
    f->o = (tp_serve_opts){ .max_seq = max_seq, .max_body = max_body, .served_model_name = "tiny",
                            .defaults = { .temperature = 0.7f, .top_p = 0.8f, .top_k = 20 },
                            .chat_template = f->chat_template, .eos_token = "<|im_end|>" };
    f->s = (tp_srv){ .o = &f->o, .tok = f->tok, .cfg = &f->cfg, .max_seq = max_seq, .max_body = max_body,
                     .slots = 1, .max_queue = 1, .accepting = true };
    snprintf(f->s.model_name, sizeof f->s.model_name, "%s", f->o.served_model_name);
    pthread_mutex_init(&f->s.mu, NULL);
    pthread_cond_init(&f->s.wake, NULL);
    return 0;
}

static void serve_fixture_free(serve_fixture *f)
{
    pthread_cond_destroy(&f->s.wake);
    pthread_mutex_destroy(&f->s.mu);
    tp_template_free(f->chat_template);
    tp_tokenizer_free(f->tok);
}

#endif
