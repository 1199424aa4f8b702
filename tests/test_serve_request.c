/* test_serve_request.c - tp_srv_parse_request (runtime/serve_request.c),
 * the parser of tprun --serve's untrusted request bodies, on a table of
 * requests: each bad one must give its HTTP status (400, 404, 413), the
 * field it names (OpenAI's "param") and a message that says why; each good
 * one its fields.  The prompts are compared with what the real tokenizer
 * and chat template give for the same text (tests/serve_fixture.h). */
#include "check.h"
#include "serve_fixture.h"

#include <cJSON.h>

#define MAX_SEQ 64
#define MAX_BODY 4096

static serve_fixture fx;

/* Parses body for kind; r is the new request (the caller releases it). */
static int parse(int kind, const char *body, tp_srv_req **r, tp_srv_bad *b)
{
    *r = tp_srv_req_new(&fx.s);
    if (!*r) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    return tp_srv_parse_request(&fx.s, kind, body, strlen(body), *r, b);
}

/* ------------------------------------------------------------ refusals */

typedef struct bad_case {
    int kind;
    const char *body;
    int status;
    const char *param;      /* NULL: JSON null */
    const char *msg;        /* a part of the message */
    const char *code;       /* NULL: JSON null */
} bad_case;

#define C TP_SRV_COMPLETION
#define H TP_SRV_CHAT
static const bad_case bad_cases[] = {
    { C, "{\"prompt\": \"x\",", 400, NULL, "not a JSON object", NULL },
    { C, "[1, 2]", 400, NULL, "not a JSON object", NULL },
    { C, "", 400, NULL, "not a JSON object", NULL },
    { C, "\"prompt\"", 400, NULL, "not a JSON object", NULL },
    { C, "{\"max_tokens\": 3}", 400, "prompt", "prompt is missing", NULL },
    { C, "{\"prompt\": null}", 400, "prompt", "prompt is missing", NULL },
    { C, "{\"prompt\": 7}", 400, "prompt", "a string or a list of token ids", NULL },
    { C, "{\"prompt\": []}", 400, "prompt", "the prompt is empty", NULL },
    { C, "{\"prompt\": \"\"}", 400, "prompt", "the prompt is empty", NULL },
    { C, "{\"prompt\": [\"a\", \"b\"]}", 400, "prompt", "one prompt: n is 1", NULL },
    { C, "{\"prompt\": [1, 1.5]}", 400, "prompt", "list of token ids", NULL },
    { C, "{\"prompt\": [1, -1]}", 400, "prompt", "outside the vocabulary", NULL },
    { C, "{\"prompt\": [151936]}", 400, "prompt", "token id 151936 is outside the vocabulary (151936)", NULL },
    { C, "{\"prompt\": [1e300]}", 400, "prompt", "outside the vocabulary", NULL },
    { C, "{\"prompt\": [[1, 99999999]]}", 400, "prompt", "outside the vocabulary", NULL },
    { C, "{\"prompt\": \"\xff\"}", 400, "prompt", "invalid UTF-8 at byte 0", NULL },
    { C, "{\"prompt\": \"x\", \"max_tokens\": \"ten\"}", 400, "max_tokens", "an integer", NULL },
    { C, "{\"prompt\": \"x\", \"max_tokens\": 0}", 400, "max_tokens", "out of range", NULL },
    { C, "{\"prompt\": \"x\", \"max_tokens\": 2.5}", 400, "max_tokens", "an integer", NULL },
    { C, "{\"prompt\": \"x\", \"max_tokens\": 5, \"max_completion_tokens\": 0}", 400, "max_completion_tokens",
      "out of range", NULL },
    { C, "{\"prompt\": \"x\", \"temperature\": 5}", 400, "temperature", "out of range", NULL },
    { C, "{\"prompt\": \"x\", \"temperature\": \"hot\"}", 400, "temperature", "a number", NULL },
    { C, "{\"prompt\": \"x\", \"top_p\": 0}", 400, "top_p", "more than 0", NULL },
    { C, "{\"prompt\": \"x\", \"top_p\": 1.5}", 400, "top_p", "out of range", NULL },
    { C, "{\"prompt\": \"x\", \"top_k\": 2.5}", 400, "top_k", "an integer", NULL },
    { C, "{\"prompt\": \"x\", \"top_k\": -2}", 400, "top_k", "out of range", NULL },
    { C, "{\"prompt\": \"x\", \"seed\": 1e30}", 400, "seed", "out of range", NULL },
    { C, "{\"prompt\": \"x\", \"n\": 2}", 400, "n", "n must be 1", NULL },
    { C, "{\"prompt\": \"x\", \"stream\": 1}", 400, "stream", "true or false", NULL },
    { C, "{\"prompt\": \"x\", \"return_token_ids\": \"yes\"}", 400, "return_token_ids", "true or false", NULL },
    { C, "{\"prompt\": \"x\", \"stream_options\": true}", 400, "stream_options", "an object", NULL },
    { C, "{\"prompt\": \"x\", \"stream_options\": {\"include_usage\": 1}}", 400, "include_usage", "true or false",
      NULL },
    { C, "{\"prompt\": \"x\", \"stop\": 3}", 400, "stop", "a string or a list", NULL },
    { C, "{\"prompt\": \"x\", \"stop\": [\"a\", 3]}", 400, "stop", "a string or a list", NULL },
    { C, "{\"prompt\": \"x\", \"stop\": [\"a\", \"b\", \"c\", \"d\", \"e\"]}", 400, "stop", "at most 4", NULL },
    { C, "{\"prompt\": \"x\", \"model\": 3}", 400, "model", "a string", NULL },
    { C, "{\"prompt\": \"x\", \"model\": \"gpt-4\"}", 404, "model", "gpt-4 does not exist", "model_not_found" },
    { C, "{\"prompt\": [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,"
         "33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63,64,65]}",
      400, "prompt", "65 tokens, the context (--max-seq) is 64", "context_length_exceeded" },
    { H, "{\"prompt\": \"x\"}", 400, "messages", "messages is missing", NULL },
    { H, "{\"messages\": \"hi\"}", 400, "messages", "a non-empty list", NULL },
    { H, "{\"messages\": []}", 400, "messages", "a non-empty list", NULL },
    { H, "{\"messages\": [1]}", 400, "messages", "a role string", NULL },
    { H, "{\"messages\": [{\"content\": \"x\"}]}", 400, "messages", "a role string", NULL },
    { H, "{\"messages\": [{\"role\": \"user\", \"content\": 3}]}", 400, "messages", "a string or a list of text parts",
      NULL },
    { H, "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image_url\", \"image_url\": {}}]}]}", 400,
      "messages", "only text content parts", NULL },
    { H, "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\"}]}]}", 400, "messages",
      "only text content parts", NULL },
    { H, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": {}}", 400, "tools", "a list", NULL },
    { H, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"chat_template_kwargs\": []}", 400,
      "chat_template_kwargs", "an object", NULL },
    { H, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"stream\": 1}", 400, "stream", "true or false",
      NULL },
    { H, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"model\": \"other\"}", 404, "model",
      "does not exist", "model_not_found" },
    /* the rendered conversation past the context (64) */
    { H, "{\"messages\": [{\"role\": \"user\", \"content\": \"a a a a a a a a a a a a a a a a a a a a a a a a a "
         "a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a\"}]}",
      400, "messages", "the context (--max-seq) is 64", "context_length_exceeded" },
};
#undef C
#undef H

static bool same_str(const char *a, const char *b)
{
    return a == b || (a && b && !strcmp(a, b));
}

static void test_bad_requests(void)
{
    for (size_t i = 0; i < sizeof bad_cases / sizeof bad_cases[0]; i++) {
        const bad_case *c = &bad_cases[i];
        tp_srv_req *r;
        tp_srv_bad b;
        int rc = parse(c->kind, c->body, &r, &b);
        CHECK(rc == -1 && b.status == c->status, "case %zu %s: rc %d status %d, want %d (%s)", i, c->body, rc,
              b.status, c->status, b.msg);
        CHECK(rc == 0 || (same_str(b.param, c->param) && strstr(b.msg, c->msg) && same_str(b.code, c->code) &&
                          !strchr(b.msg, '\n')),
              "case %zu %s: param %s code %s message '%s', want param %s code %s and '%s'", i, c->body,
              b.param ? b.param : "null", b.code ? b.code : "null", b.msg, c->param ? c->param : "null",
              c->code ? c->code : "null", c->msg);
        tp_srv_req_release(&fx.s, r);
    }
}

/* A body over max_body is 413 whatever it holds; at the limit it is read. */
static void test_body_size(void)
{
    char *body = malloc(MAX_BODY + 2);
    int n = snprintf(body, MAX_BODY + 2, "{\"prompt\": [1], \"max_tokens\": 2, \"x\": \"");
    memset(body + n, 'a', MAX_BODY + 2 - (size_t)n);
    body[MAX_BODY - 2] = '"';
    body[MAX_BODY - 1] = '}';
    body[MAX_BODY] = '\0';
    tp_srv_req *r;
    tp_srv_bad b;
    CHECK(parse(TP_SRV_COMPLETION, body, &r, &b) == 0, "a body of exactly max_body: %s", b.msg);
    tp_srv_req_release(&fx.s, r);
    body[MAX_BODY] = ' ';   /* one byte more: valid JSON still, but too big */
    body[MAX_BODY + 1] = '\0';
    CHECK(parse(TP_SRV_COMPLETION, body, &r, &b) == -1 && b.status == 413 && b.param == NULL &&
              strstr(b.msg, "larger than the server's limit (4096 bytes)"),
          "max_body + 1: status %d '%s'", b.status, b.msg);
    tp_srv_req_release(&fx.s, r);
    CHECK(tp_srv_check_body_size(&fx.s, (size_t)-1, &b) == -1 && b.status == 413, "SIZE_MAX bytes");
    CHECK(tp_srv_check_body_size(&fx.s, MAX_BODY, &b) == 0, "max_body bytes");
    free(body);
}

/* ------------------------------------------------------------ good requests */

/* ids of text with the fixture's tokenizer (malloc'd). */
static int32_t *encode(const char *text, size_t *n)
{
    int32_t *ids = NULL;
    tp_err err;
    if (tp_tokenizer_encode(fx.tok, text, strlen(text), &ids, n, &err)) {
        CHECK(0, "encode: %s", err.msg);
        *n = 0;
    }
    return ids;
}

static bool prompt_is(const tp_srv_req *r, const char *text)
{
    size_t n;
    int32_t *ids = encode(text, &n);
    bool same = ids && (size_t)r->n_prompt == n && !memcmp(r->prompt, ids, n * sizeof *ids);
    free(ids);
    return same;
}

static void test_completions(void)
{
    tp_srv_req *r;
    tp_srv_bad b;
    CHECK(parse(TP_SRV_COMPLETION, "{\"model\": \"tiny\", \"prompt\": \"The capital of France is\"}", &r, &b) == 0,
          "%s", b.msg);
    CHECK(r->kind == TP_SRV_COMPLETION && prompt_is(r, "The capital of France is"), "text prompt");
    CHECK(r->max_tokens == 16 && !r->stream && !r->include_usage && !r->return_token_ids && r->n_stops == 0,
          "defaults: max_tokens %d", r->max_tokens);
    CHECK(r->sampler.temperature == 0.7f && r->sampler.top_p == 0.8f && r->sampler.top_k == 20 && !r->has_seed,
          "the server's sampling defaults");
    tp_srv_req_release(&fx.s, r);

    CHECK(parse(TP_SRV_COMPLETION,
                "{\"prompt\": [[9707, 11, 151935]], \"max_tokens\": 5, \"temperature\": 0, \"top_p\": 0.5, "
                "\"top_k\": -1, \"seed\": -3, \"stream\": true, \"stream_options\": {\"include_usage\": true}, "
                "\"return_token_ids\": true, \"stop\": [\"a\", \"\", \"bc\"], \"n\": 1, \"logprobs\": null, "
                "\"future_field\": {\"a\": [1]}, \"user\": null}",
                &r, &b) == 0,
          "%s", b.msg);
    CHECK(r->n_prompt == 3 && r->prompt[0] == 9707 && r->prompt[1] == 11 && r->prompt[2] == 151935,
          "ids: a list of one list, the last id of the padded vocabulary");
    CHECK(r->max_tokens == 5 && r->stream && r->include_usage && r->return_token_ids, "flags");
    CHECK(r->sampler.temperature == 0 && r->sampler.top_p == 0.5f && r->sampler.top_k == 0 && r->has_seed &&
              r->sampler.seed == (uint64_t)-3,
          "sampling: seed %llu", (unsigned long long)r->sampler.seed);
    CHECK(r->n_stops == 2 && !strcmp(r->stops[0], "a") && !strcmp(r->stops[1], "bc"), "stops without \"\"");
    tp_srv_req_release(&fx.s, r);

    /* max_completion_tokens wins; the answer is capped at the context */
    CHECK(parse(TP_SRV_COMPLETION, "{\"prompt\": [\"hi\"], \"stop\": \"x\", \"max_tokens\": 1000000, "
                                   "\"max_completion_tokens\": 3}",
                &r, &b) == 0 && r->max_tokens == 3 && r->n_stops == 1 && prompt_is(r, "hi"),
          "max_completion_tokens: %d (%s)", r->max_tokens, b.msg);
    tp_srv_req_release(&fx.s, r);
    CHECK(parse(TP_SRV_COMPLETION, "{\"prompt\": [1, 2, 3, 4], \"max_tokens\": 1000000000}", &r, &b) == 0 &&
              r->max_tokens == MAX_SEQ - 4 + 1,
          "max_tokens capped to %d: %d", MAX_SEQ - 3, r->max_tokens);
    tp_srv_req_release(&fx.s, r);
    /* a prompt of exactly max_seq: one token to answer */
    char body[512] = "{\"prompt\": [";
    for (int i = 0; i < MAX_SEQ; i++)
        snprintf(body + strlen(body), sizeof body - strlen(body), "%s%d", i ? "," : "", i);
    strcat(body, "], \"max_tokens\": 9}");
    CHECK(parse(TP_SRV_COMPLETION, body, &r, &b) == 0 && r->n_prompt == MAX_SEQ && r->max_tokens == 1,
          "a prompt of max_seq: max_tokens %d (%s)", r->max_tokens, b.msg);
    tp_srv_req_release(&fx.s, r);
}

static void test_chat(void)
{
    tp_srv_req *r;
    tp_srv_bad b;
    const char *want = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n";
    CHECK(parse(TP_SRV_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}", &r, &b) == 0, "%s",
          b.msg);
    CHECK(r->kind == TP_SRV_CHAT && prompt_is(r, want), "chat: the Qwen3 template's turn");
    CHECK(r->max_tokens == MAX_SEQ - r->n_prompt + 1, "chat: max_tokens defaults to the room left (%d)",
          r->max_tokens);
    tp_srv_req_release(&fx.s, r);
    /* content parts are joined; null fields are defaults */
    CHECK(parse(TP_SRV_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"h\"}, "
                             "{\"type\": \"text\", \"text\": \"i\"}]}], \"tools\": null, \"stop\": null}",
                &r, &b) == 0 && prompt_is(r, want),
          "content parts: %s", b.msg);
    tp_srv_req_release(&fx.s, r);
    /* a kwarg cannot undo the server's add_generation_prompt */
    CHECK(parse(TP_SRV_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], "
                             "\"chat_template_kwargs\": {\"add_generation_prompt\": false}}",
                &r, &b) == 0 && prompt_is(r, want),
          "add_generation_prompt kwarg: %s", b.msg);
    tp_srv_req_release(&fx.s, r);
    /* enable_thinking false: Qwen3's empty think block */
    CHECK(parse(TP_SRV_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], "
                             "\"chat_template_kwargs\": {\"enable_thinking\": false}}",
                &r, &b) == 0 && prompt_is(r, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n"
                                             "</think>\n\n"),
          "enable_thinking false: %s", b.msg);
    tp_srv_req_release(&fx.s, r);
    /* tools go into the system turn */
    CHECK(parse(TP_SRV_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"max_completion_tokens\": 1, "
                             "\"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\"}}]}",
                &r, &b) == -1 && b.status == 400 && b.code && !strcmp(b.code, "context_length_exceeded"),
          "tools make the prompt longer than 64: %d %s", b.status, b.msg);
    tp_srv_req_release(&fx.s, r);
}

/* The template's own refusal, and a server without a template. */
static void test_chat_template_errors(void)
{
    tp_template *t;
    tp_err err;
    const char *src = "{{ raise_exception('only user turns') }}";
    CHECK_OK(tp_template_parse(&t, src, strlen(src), "raising", &err), err);
    fx.o.chat_template = t;
    tp_srv_req *r;
    tp_srv_bad b;
    CHECK(parse(TP_SRV_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}", &r, &b) == -1 &&
              b.status == 400 && same_str(b.param, "messages") && strstr(b.msg, "only user turns"),
          "raise_exception: %d %s", b.status, b.msg);
    tp_srv_req_release(&fx.s, r);
    fx.o.chat_template = NULL;
    CHECK(parse(TP_SRV_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}", &r, &b) == -1 &&
              b.status == 404 && strstr(b.msg, "no chat template"),
          "no template: %d %s", b.status, b.msg);
    tp_srv_req_release(&fx.s, r);
    fx.o.chat_template = fx.chat_template;
    tp_template_free(t);
}

/* The HTTP side parses in libmicrohttpd's connection threads at once, on
 * one tokenizer and one template (runtime.h: safe for that).  Each thread
 * must get what one thread alone gets; under -fsanitize=thread this is the
 * check that they share no mutable state. */
#define N_THREADS 4
#define N_ROUNDS 8
static const char *const parallel_bodies[] = {
    ("{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": "
     "\"Qu'est-ce que c'est? \u00e9\u4e2d\"}], \"chat_template_kwargs\": {\"enable_thinking\": false}}"),
    "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"Hi <|im_end|> there\"}]}]}",
    "{\"prompt\": \"The capital of France is\", \"stop\": [\".\"]}",
    "{\"prompt\": \"  spaces\\n\\nand 12345 numbers!!\"}",
};
#define N_BODIES (sizeof parallel_bodies / sizeof parallel_bodies[0])

typedef struct parallel_want {
    int32_t *ids;
    int n;
} parallel_want;
static parallel_want parallel_wants[N_BODIES];

static int kind_of(const char *body)
{
    return strstr(body, "\"messages\"") ? TP_SRV_CHAT : TP_SRV_COMPLETION;
}

static void *parallel_worker(void *arg)
{
    int *mismatches = arg;
    for (int round = 0; round < N_ROUNDS; round++)
        for (size_t i = 0; i < N_BODIES; i++) {
            tp_srv_req *r = tp_srv_req_new(&fx.s);
            tp_srv_bad b;
            const parallel_want *w = &parallel_wants[i];
            if (!r || tp_srv_parse_request(&fx.s, kind_of(parallel_bodies[i]), parallel_bodies[i],
                                           strlen(parallel_bodies[i]), r, &b) ||
                r->n_prompt != w->n || memcmp(r->prompt, w->ids, (size_t)w->n * sizeof *w->ids))
                ++*mismatches;
            if (r)
                tp_srv_req_release(&fx.s, r);
        }
    return NULL;
}

static void test_parallel(void)
{
    for (size_t i = 0; i < N_BODIES; i++) {
        tp_srv_req *r;
        tp_srv_bad b;
        CHECK(parse(kind_of(parallel_bodies[i]), parallel_bodies[i], &r, &b) == 0, "%s: %s", parallel_bodies[i],
              b.msg);
        parallel_wants[i].n = r->n_prompt;
        parallel_wants[i].ids = r->prompt;
        r->prompt = NULL;
        tp_srv_req_release(&fx.s, r);
    }
    pthread_t th[N_THREADS];
    int mismatches[N_THREADS] = { 0 };
    for (int t = 0; t < N_THREADS; t++)
        CHECK(pthread_create(&th[t], NULL, parallel_worker, &mismatches[t]) == 0, "pthread_create");
    for (int t = 0; t < N_THREADS; t++) {
        pthread_join(th[t], NULL);
        CHECK(mismatches[t] == 0, "thread %d: %d of %zu parses differ from one thread's", t, mismatches[t],
              N_ROUNDS * N_BODIES);
    }
    for (size_t i = 0; i < N_BODIES; i++)
        free(parallel_wants[i].ids);
}

int main(void)
{
    tp_err err;
    if (serve_fixture_init(&fx, MAX_SEQ, MAX_BODY, &err)) {
        fprintf(stderr, "test_serve_request: %s\n", err.msg);
        return 1;
    }
    test_bad_requests();
    test_body_size();
    test_completions();
    test_chat();
    test_chat_template_errors();
    test_parallel();
    CHECK(fx.s.live_reqs == 0, "%d requests not freed", fx.s.live_reqs);
    serve_fixture_free(&fx);
    return check_finish("test_serve_request");
}
