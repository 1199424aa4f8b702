/* fuzz_request.c - libFuzzer target for tprun --serve's request parser
 * (tp_srv_parse_request, runtime/serve_request.c): the raw bytes of a POST
 * body, parsed as a /v1/completions request and as a /v1/chat/completions
 * one (messages rendered with Qwen3's chat template, then encoded with the
 * real Qwen3 tokenizer: tests/serve_fixture.h; run from the repository
 * root).  Either the request's fields, within the limits the scheduler
 * relies on (1..max_seq prompt ids inside the vocabulary, an answer that
 * ends within the context, at most 4 non-empty stop strings, sampling in
 * range), or an OpenAI error: 400, 404 or 413 with a message.  Never crash,
 * leak or hit UB; every request is freed (live_reqs back to 0). */
#include "../serve_fixture.h"

#include <stdlib.h>
#include <string.h>

#define MAX_SEQ 4096
#define MAX_BODY 65536   /* run_fuzz.sh's -max_len: some inputs reach it */

static serve_fixture *fixture(void)
{
    static serve_fixture fx;
    static bool ready;
    tp_err err;
    if (!ready && serve_fixture_init(&fx, MAX_SEQ, MAX_BODY - 1, &err)) {
        fprintf(stderr, "fuzz_request: %s\n", err.msg);   /* a fuzzer without its fixture tests nothing */
        abort();
    }
    ready = true;
    return &fx;
}

static void check_parsed(const serve_fixture *fx, const tp_srv_req *r, int kind)
{
    if (r->kind != kind || r->n_prompt < 1 || r->n_prompt > MAX_SEQ || !r->prompt)
        abort();
    for (int i = 0; i < r->n_prompt; i++)
        if (r->prompt[i] < 0 || r->prompt[i] >= fx->cfg.vocab)
            abort();
    if (r->max_tokens < 1 || r->n_prompt + r->max_tokens > MAX_SEQ + 1)
        abort();
    if (r->n_stops < 0 || r->n_stops > TP_SRV_MAX_STOPS)
        abort();
    for (int i = 0; i < r->n_stops; i++)
        if (!r->stops[i] || !r->stops[i][0])
            abort();
    const tp_sampler_opts *so = &r->sampler;
    if (!(so->temperature >= 0 && so->temperature <= 2) || !(so->top_p > 0 && so->top_p <= 1) || so->top_k < 0 ||
        so->seen || (!r->has_seed && so->seed))
        abort();
    /* every chat turn of Qwen3's template opens with <|im_start|> */
    if (kind == TP_SRV_CHAT && r->prompt[0] != tp_tokenizer_token_id(fx->tok, "<|im_start|>"))
        abort();
}

static void check_refused(const tp_srv_bad *b, size_t size)
{
    if (b->status != 400 && b->status != 404 && b->status != 413)
        abort();
    if ((b->status == 413) != (size > MAX_BODY - 1) || !b->msg[0])
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    serve_fixture *fx = fixture();
    /* the body as the HTTP side hands it over: not NUL-terminated */
    char *body = malloc(size ? size : 1);
    memcpy(body, data, size);
    static const int kinds[] = { TP_SRV_COMPLETION, TP_SRV_CHAT };
    for (int k = 0; k < 2; k++) {
        tp_srv_req *r = tp_srv_req_new(&fx->s);
        tp_srv_bad b;
        if (tp_srv_parse_request(&fx->s, kinds[k], body, size, r, &b) == 0)
            check_parsed(fx, r, kinds[k]);
        else
            check_refused(&b, size);
        tp_srv_req_release(&fx->s, r);
    }
    free(body);
    if (fx->s.live_reqs != 0)
        abort();
    return 0;
}
