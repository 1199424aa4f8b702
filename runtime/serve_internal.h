/* serve_internal.h - what the scheduler (serve.c) and the HTTP side
 * (serve_http.c) share (private to the runtime).
 *
 * Threads: libmicrohttpd runs one thread per connection; each parses its
 * request into a tp_srv_req and hands it to the scheduler through a bounded
 * queue (tp_srv_submit).  The scheduler (the thread that called
 * tp_serve_run on rank 0) runs the steps and writes each request's output
 * into the request under srv->mu, signalling req->cv; the connection thread
 * waits on it and writes the HTTP response (whole, or SSE chunks). */
#ifndef TP_SERVE_INTERNAL_H
#define TP_SERVE_INTERNAL_H

#include <pthread.h>
#include <stdarg.h>

#include "runtime.h"

enum { TP_SRV_COMPLETION, TP_SRV_CHAT };

#define TP_SRV_MAX_STOPS 4   /* OpenAI's limit on stop strings */

typedef struct tp_srv_req {
    /* Filled by the HTTP side before tp_srv_submit, read-only afterwards. */
    int kind;                   /* TP_SRV_COMPLETION or TP_SRV_CHAT */
    bool stream, include_usage, return_token_ids;
    char id[48];                /* "cmpl-..." / "chatcmpl-..." */
    long created;               /* unix seconds */
    int32_t *prompt;            /* malloc'd */
    int n_prompt;
    int max_tokens;             /* >= 1; capped by the context in the scheduler */
    tp_sampler_opts sampler;    /* seed: the request's (has_seed), or one drawn by the HTTP side */
    bool has_seed;
    char *stops[TP_SRV_MAX_STOPS];
    int n_stops;

    /* Shared, under srv->mu. */
    int refs;                   /* the HTTP side's and the scheduler's */
    bool cancelled;             /* the client went away: free the slot at the next step */
    bool done;                  /* finish_reason or error set, out complete */
    int error_status;           /* != 0: failed with this HTTP status (error_msg says why) */
    char error_msg[sizeof(((tp_err *)0)->msg)];
    const char *finish_reason;  /* "stop" or "length" once done without error */
    char *out;                  /* text ready for the client, not yet taken (malloc'd) */
    size_t out_len, out_cap;
    int32_t *gen;               /* generated ids (eos included), max_tokens + 1 room */
    int n_gen;
    pthread_cond_t cv;          /* signalled when out grows or done is set */

    /* The scheduler's own (no lock needed). */
    int slot;                   /* -1: not running */
    int n_fed;                  /* prompt tokens in the slot's cache */
    tp_detok *detok;
    char *text;                 /* the whole answer so far, for stop strings */
    size_t text_len, text_cap, text_sent;
    tp_rng rng;
    double t_queued, t_first, t_last;
} tp_srv_req;

/* Prometheus histogram: cumulative counts per upper bound (seconds). */
#define TP_SRV_N_BUCKETS 12
typedef struct tp_srv_hist {
    unsigned long long count[TP_SRV_N_BUCKETS + 1];   /* the last one is +Inf */
    double sum;
} tp_srv_hist;

typedef struct tp_srv {
    const tp_serve_opts *o;
    const tp_tokenizer *tok;
    const tp_model_config *cfg;
    int max_seq, slots, max_queue;
    size_t max_body;
    char model_name[256];

    pthread_mutex_t mu;
    pthread_cond_t wake;        /* the scheduler: a request arrived or was cancelled */
    tp_srv_req **queue;         /* FIFO of max_queue */
    int q_head, q_len;
    bool accepting;             /* false: stopping or failed; new requests get 503 */
    int live_reqs;              /* requests made and not yet freed */
    tp_rng seed_rng;            /* seeds for requests without one (under mu) */

    /* /metrics, under mu */
    unsigned long long by_status[6];   /* 200 400 404 413 429 5xx (see tp_srv_count_status) */
    unsigned long long prompt_tokens, generated_tokens;
    int running;
    tp_srv_hist ttft, itl;

    void *http;                 /* serve_http.c's state */
} tp_srv;

/* serve.c */
/* Appends p[0..n) to the growing NUL-terminated buffer *buf (length *len,
 * capacity *cap; all three start at 0/NULL).  -1 when out of memory (the
 * buffer is then unchanged). */
int tp_srv_buf_append(char **buf, size_t *len, size_t *cap, const char *p, size_t n);
/* Queues req (its refs becomes 2: the caller's and the scheduler's).
 * Returns 0, or the HTTP status to answer instead: 429 when the queue is
 * full, 503 when the server stops; *why then says it in one line. */
int tp_srv_submit(tp_srv *s, tp_srv_req *req, const char **why);
/* A new request with refs 1 (the caller's), counted in s->live_reqs until
 * its last release; NULL when out of memory. */
tp_srv_req *tp_srv_req_new(tp_srv *s);
/* Drops one reference (either side), freeing req with the last one. */
void tp_srv_req_release(tp_srv *s, tp_srv_req *req);
/* The client is gone: the scheduler frees its slot at the next step. */
void tp_srv_cancel(tp_srv *s, tp_srv_req *req);
/* Counts one answered request by its HTTP status (the one place that does). */
void tp_srv_count_status(tp_srv *s, int status);
/* The Prometheus text of /metrics (malloc'd). */
char *tp_srv_metrics_text(tp_srv *s);
/* One log line through tp_serve_opts.log (nothing when it is NULL). */
void tp_srv_logf(tp_srv *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* serve_request.c: an OpenAI request body -> the request's fields.  A pure
 * function of the bytes: no daemon, no model, no lock, no randomness (s is
 * only read: tok, cfg->vocab, max_seq, max_body, model_name, and o's
 * chat_template, bos/eos tokens and sampling defaults), so that it can be
 * fuzzed (tests/fuzz/fuzz_request.c) and unit-tested
 * (tests/test_serve_request.c) on its own.  Called from libmicrohttpd's
 * connection threads at once: everything it calls is safe for that
 * (runtime.h: tp_tokenizer_encode, tp_template_render). */

/* Why a request is refused: its HTTP status and OpenAI's error fields. */
typedef struct tp_srv_bad {
    int status;                 /* 400; 404: unknown model, no chat template; 413; 500: out of memory */
    char msg[256];              /* one line, names the field */
    const char *param, *code;   /* static strings or NULL (JSON null) */
} tp_srv_bad;

/* 0 when a body of len bytes is within s->max_body, else -1 with *b the
 * 413 (the HTTP side checks Content-Length and a chunked body's running
 * length with it; tp_srv_parse_request again). */
int tp_srv_check_body_size(const tp_srv *s, size_t len, tp_srv_bad *b);
/* Parses body[0..len) (any bytes; no NUL needed) as a request to
 * /v1/completions (kind TP_SRV_COMPLETION) or /v1/chat/completions
 * (TP_SRV_CHAT: messages rendered with s->o->chat_template, then encoded)
 * into r's request fields: kind, stream, include_usage, return_token_ids,
 * prompt / n_prompt (1..max_seq ids, each below cfg->vocab), max_tokens
 * (capped so the answer ends within max_seq), sampler (+ has_seed: seed
 * left to the caller when false), stops.  Not id or created.  0, or -1 with
 * *b filled; r may then hold some fields (tp_srv_req_release frees them). */
int tp_srv_parse_request(const tp_srv *s, int kind, const char *body, size_t len, tp_srv_req *r,
                         tp_srv_bad *b);

/* serve_http.c */
int tp_srv_http_start(tp_srv *s, tp_err *err);
void tp_srv_http_stop(tp_srv *s);

#endif
