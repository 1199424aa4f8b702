/* serve_http.c - tprun --serve's HTTP side: libmicrohttpd, the routes, the
 * OpenAI JSON in and out, server-sent events.
 *
 * libmicrohttpd (Debian's libmicrohttpd-dev) parses HTTP: chunked bodies,
 * keep-alive, pipelining, header limits and slow clients are its job, not a
 * hand-written parser's.  It runs a thread per connection (bounded by the
 * connection limit): the thread parses its request, queues it for the
 * scheduler (serve.c) and waits on the request's condition variable; a
 * streamed answer is a response callback that blocks the same way.  While
 * it waits the thread watches its socket, so a client that disconnects
 * frees its slot at the next step. */
#include <cJSON.h>
#include <math.h>
#include <microhttpd.h>
#include <netdb.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <time.h>

#include "serve_internal.h"

/* What bounds the clients, set explicitly rather than left to
 * libmicrohttpd's defaults:
 *   CONNECTION_LIMIT: open connections, each a thread.  A request needs its
 *     connection until answered, and at most max_queue (64) + slots wait or
 *     run, past that 429 comes at once: 256 leaves room for idle keep-alive
 *     and streaming clients.  Past it, new connections wait in the listen
 *     backlog (a flood of idle ones costs 256 threads, no more; no per-IP
 *     limit: the clients of a local server, or behind a proxy, share one).
 *   CONNECTION_TIMEOUT_S: a connection with no traffic for that long (its
 *     headers or body never finishing, an idle keep-alive) is closed and its
 *     thread freed; a request waiting for its answer is not idle in this
 *     sense (its thread is in our handler).  60 s: longer than clients keep
 *     an idle connection alive (httpx 5 s), so the server is never the one
 *     that closes it under a client's new request.
 *   HEADER_MEMORY: request line + headers per connection; more gets 431.
 *   max_body (tp_serve_opts): the body; more gets 413 (BODY_DRAIN_FACTOR). */
#define CONNECTION_LIMIT 256
#define CONNECTION_TIMEOUT_S 60
#define HEADER_MEMORY (64 * 1024)
#define WAIT_SLICE_MS 200           /* how often a waiting thread checks its client */

/* ------------------------------------------------------------ helpers */

/* Whether the client closed its end (or the socket failed). */
static bool peer_gone(int fd)
{
    if (fd < 0)
        return false;
    struct pollfd p = { .fd = fd, .events = POLLIN | POLLRDHUP };
    if (poll(&p, 1, 0) <= 0)
        return false;
    if (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL))
        return true;
    char c;
    return (p.revents & POLLIN) && recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

static int connection_fd(struct MHD_Connection *con)
{
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(con, MHD_CONNECTION_INFO_CONNECTION_FD);
    return ci ? (int)ci->connect_fd : -1;
}

/* Waits (under s->mu) for r->cv, one slice at most; false when the client
 * left.  The client is checked once a slice however often r->cv is
 * signalled: the tokens of a non-streamed answer wake its thread at every
 * step, and a check only on a quiet slice would never come (the slot of a
 * client gone mid-answer stayed taken until max_tokens). */
static bool wait_slice(tp_srv *s, tp_srv_req *r, int fd, double *checked)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += WAIT_SLICE_MS * 1000000L;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    pthread_cond_timedwait(&r->cv, &s->mu, &ts);
    double now = tp_now();
    if (now - *checked < WAIT_SLICE_MS / 1000.0)
        return true;
    *checked = now;
    if (!peer_gone(fd))
        return true;
    r->cancelled = true;
    pthread_cond_broadcast(&s->wake);
    return false;
}

/* Waits (under s->mu) until r is done or r->out holds more than `since`
 * bytes; false when the client left. */
static bool wait_news(tp_srv *s, tp_srv_req *r, int fd, size_t since)
{
    double checked = tp_now();
    while (!r->done && r->out_len == since)
        if (!wait_slice(s, r, fd, &checked))
            return false;
    return true;
}

/* Waits (under s->mu) until r is done or its client left. */
static void wait_done(tp_srv *s, tp_srv_req *r, int fd)
{
    double checked = tp_now();
    while (!r->done && wait_slice(s, r, fd, &checked))
        ;
}

static const char *error_type(int status)
{
    switch (status) {
    case 404: return "not_found_error";
    case 429: return "rate_limit_error";
    case 500: case 503: return "server_error";
    default: return "invalid_request_error";
    }
}

/* OpenAI's error object: {"error": {"message", "type", "param", "code"}}. */
static cJSON *error_json(int status, const char *msg, const char *param, const char *code)
{
    cJSON *root = cJSON_CreateObject(), *e = cJSON_AddObjectToObject(root, "error");
    cJSON_AddStringToObject(e, "message", msg);
    cJSON_AddStringToObject(e, "type", error_type(status));
    if (param)
        cJSON_AddStringToObject(e, "param", param);
    else
        cJSON_AddNullToObject(e, "param");
    if (code)
        cJSON_AddStringToObject(e, "code", code);
    else
        cJSON_AddNullToObject(e, "code");
    return root;
}

/* The one place that answers: queues body (taken) with status, counts it
 * and writes the access line. */
static enum MHD_Result respond(tp_srv *s, struct MHD_Connection *con, const char *method, const char *url, int status,
                               char *body, const char *content_type)
{
    if (!body)
        body = strdup("{\"error\": {\"message\": \"out of memory\", \"type\": \"server_error\", \"param\": null, "
                      "\"code\": null}}"),
        status = 500;
    size_t len = body ? strlen(body) : 0;
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, body ? body : (char *)"", body ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
    if (!resp) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
    if (status == 405)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, !strcmp(url, "/v1/models") || !strcmp(url, "/health") ||
                                !strcmp(url, "/metrics") ? "GET" : "POST");
    enum MHD_Result rc = MHD_queue_response(con, (unsigned)status, resp);
    MHD_destroy_response(resp);
    tp_srv_count_status(s, status);
    tp_srv_logf(s, "%s %s %d", method, url, status);
    return rc;
}

static enum MHD_Result respond_json(tp_srv *s, struct MHD_Connection *con, const char *method, const char *url,
                                    int status, cJSON *root)
{
    char *body = root ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return respond(s, con, method, url, status, body, "application/json");
}

static enum MHD_Result respond_error(tp_srv *s, struct MHD_Connection *con, const char *method, const char *url,
                                     int status, const char *msg, const char *param, const char *code)
{
    return respond_json(s, con, method, url, status, error_json(status, msg, param, code));
}

/* ------------------------------------------------------------ response JSON */

static cJSON *usage_json(const tp_srv_req *r)
{
    cJSON *u = cJSON_CreateObject();
    cJSON_AddNumberToObject(u, "prompt_tokens", r->n_prompt);
    cJSON_AddNumberToObject(u, "completion_tokens", r->n_gen);
    cJSON_AddNumberToObject(u, "total_tokens", r->n_prompt + r->n_gen);
    return u;
}

static cJSON *ids_json(const int32_t *ids, int n)
{
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; a && i < n; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber(ids[i]));
    return a;
}

/* The envelope of an answer or a chunk: id, object, created, model. */
static cJSON *envelope(tp_srv *s, const tp_srv_req *r, bool chunk)
{
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "id", r->id);
    cJSON_AddStringToObject(root, "object", r->kind == TP_SRV_CHAT ? (chunk ? "chat.completion.chunk" : "chat.completion")
                                                                   : "text_completion");
    cJSON_AddNumberToObject(root, "created", (double)r->created);
    cJSON_AddStringToObject(root, "model", s->model_name);
    return root;
}

/* One choice: text (or the chat message / delta) and finish_reason. */
static cJSON *choice_json(const tp_srv_req *r, const char *text, bool chunk, bool role, const char *finish)
{
    cJSON *c = cJSON_CreateObject();
    cJSON_AddNumberToObject(c, "index", 0);
    if (r->kind == TP_SRV_CHAT) {
        cJSON *m = cJSON_AddObjectToObject(c, chunk ? "delta" : "message");
        if (role)
            cJSON_AddStringToObject(m, "role", "assistant");
        if (text)
            cJSON_AddStringToObject(m, "content", text);
    } else {
        cJSON_AddStringToObject(c, "text", text ? text : "");
    }
    cJSON_AddNullToObject(c, "logprobs");
    if (finish)
        cJSON_AddStringToObject(c, "finish_reason", finish);
    else
        cJSON_AddNullToObject(c, "finish_reason");
    return c;
}

/* The whole answer of a request that is done (under s->mu). */
static cJSON *answer_json(tp_srv *s, const tp_srv_req *r)
{
    cJSON *root = envelope(s, r, false);
    cJSON *choices = cJSON_AddArrayToObject(root, "choices");
    cJSON *c = choice_json(r, r->out ? r->out : "", false, true, r->finish_reason);
    if (r->return_token_ids) {
        cJSON_AddItemToObject(c, "prompt_token_ids", ids_json(r->prompt, r->n_prompt));
        cJSON_AddItemToObject(c, "token_ids", ids_json(r->gen, r->n_gen));
    }
    cJSON_AddItemToArray(choices, c);
    cJSON_AddItemToObject(root, "usage", usage_json(r));
    return root;
}

/* ------------------------------------------------------------ streaming */

typedef struct stream {
    tp_srv *s;
    tp_srv_req *r;
    int fd;
    char *buf;                 /* SSE bytes not yet handed to libmicrohttpd */
    size_t len, cap, pos;
    bool ended;                /* "data: [DONE]" is in buf */
} stream;

/* Appends text to the SSE bytes (out of memory: the event is cut short,
 * and the client sees broken JSON rather than a crash). */
static void sse_text(stream *st, const char *text)
{
    tp_srv_buf_append(&st->buf, &st->len, &st->cap, text, strlen(text));
}

/* Appends "data: JSON\n\n" (root taken). */
static void sse_event(stream *st, cJSON *root)
{
    char *json = root ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    if (!json)
        return;
    sse_text(st, "data: ");
    sse_text(st, json);
    sse_text(st, "\n\n");
    free(json);
}

static cJSON *chunk_json(stream *st, const char *text, bool role, const char *finish)
{
    cJSON *root = envelope(st->s, st->r, true);
    cJSON_AddItemToArray(cJSON_AddArrayToObject(root, "choices"), choice_json(st->r, text, true, role, finish));
    if (st->r->include_usage)
        cJSON_AddNullToObject(root, "usage");
    return root;
}

/* Takes what the scheduler produced (under s->mu) into SSE events. */
static void stream_take(stream *st)
{
    tp_srv_req *r = st->r;
    if (r->out_len > 0) {
        sse_event(st, chunk_json(st, r->out, false, NULL));
        r->out_len = 0;
        r->out[0] = '\0';
    }
    if (!r->done)
        return;
    if (r->error_status) {
        sse_event(st, error_json(r->error_status, r->error_msg, NULL, NULL));
    } else {
        sse_event(st, chunk_json(st, r->kind == TP_SRV_CHAT ? NULL : "", false, r->finish_reason));
        if (r->include_usage) {
            cJSON *root = envelope(st->s, r, true);
            cJSON_AddArrayToObject(root, "choices");
            cJSON_AddItemToObject(root, "usage", usage_json(r));
            sse_event(st, root);
        }
    }
    sse_text(st, "data: [DONE]\n\n");
    st->ended = true;
}

static ssize_t stream_read(void *cls, uint64_t pos, char *out, size_t max)
{
    stream *st = cls;
    if (st->pos == st->len) {
        if (st->ended)
            return MHD_CONTENT_READER_END_OF_STREAM;
        st->len = st->pos = 0;
        pthread_mutex_lock(&st->s->mu);
        bool alive = wait_news(st->s, st->r, st->fd, 0);
        if (alive)
            stream_take(st);
        pthread_mutex_unlock(&st->s->mu);
        if (!alive)
            return MHD_CONTENT_READER_END_WITH_ERROR;
        if (st->len == 0)
            return 0;
    }
    size_t n = st->len - st->pos < max ? st->len - st->pos : max;
    memcpy(out, st->buf + st->pos, n);
    st->pos += n;
    return (ssize_t)n;
}

static void stream_free(void *cls)
{
    stream *st = cls;
    pthread_mutex_lock(&st->s->mu);
    bool unfinished = !st->r->done;
    pthread_mutex_unlock(&st->s->mu);
    if (unfinished) {
        tp_srv_logf(st->s, "%s: stream closed before the end", st->r->id);
        tp_srv_cancel(st->s, st->r);
    }
    tp_srv_req_release(st->s, st->r);
    free(st->buf);
    free(st);
}

static enum MHD_Result start_stream(tp_srv *s, struct MHD_Connection *con, const char *url, tp_srv_req *r)
{
    stream *st = calloc(1, sizeof *st);
    if (!st) {
        tp_srv_cancel(s, r);
        tp_srv_req_release(s, r);
        return respond_error(s, con, "POST", url, 500, "out of memory", NULL, NULL);
    }
    *st = (stream){ .s = s, .r = r, .fd = connection_fd(con) };
    if (r->kind == TP_SRV_CHAT)   /* OpenAI's first chunk: the role, empty content */
        sse_event(st, chunk_json(st, "", true, NULL));
    struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, stream_read, st, stream_free);
    if (!resp) {
        stream_free(st);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    enum MHD_Result rc = MHD_queue_response(con, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp);
    tp_srv_count_status(s, 200);
    tp_srv_logf(s, "POST %s 200 (stream %s)", url, r->id);
    return rc;
}

/* ------------------------------------------------------------ routes */

/* A connection's request body as it arrives. */
typedef struct body {
    char *data;                 /* NULL once the body is over the limit: the rest is only counted */
    size_t len, cap;
    size_t received;            /* every byte so far, kept or not */
} body;

/* What the parser leaves to the server: the id, the time, a seed when the
 * request has none (from the server's generator, under s->mu). */
static void name_request(tp_srv *s, tp_srv_req *r)
{
    pthread_mutex_lock(&s->mu);
    uint64_t id = tp_rng_next(&s->seed_rng);
    if (!r->has_seed)
        r->sampler.seed = tp_rng_next(&s->seed_rng);
    pthread_mutex_unlock(&s->mu);
    snprintf(r->id, sizeof r->id, "%s-%016llx", r->kind == TP_SRV_CHAT ? "chatcmpl" : "cmpl", (unsigned long long)id);
    r->created = (long)time(NULL);
}

static enum MHD_Result generate(tp_srv *s, struct MHD_Connection *con, const char *url, int kind, body *bd)
{
    tp_srv_bad b = { 0 };
    tp_srv_req *r = tp_srv_req_new(s);
    if (!r)
        return respond_error(s, con, "POST", url, 500, "out of memory", NULL, NULL);
    if (tp_srv_check_body_size(s, bd->received, &b) ||
        tp_srv_parse_request(s, kind, bd->data ? bd->data : "", bd->len, r, &b)) {
        tp_srv_req_release(s, r);
        return respond_error(s, con, "POST", url, b.status, b.msg, b.param, b.code);
    }
    name_request(s, r);
    const char *why = NULL;
    int status = tp_srv_submit(s, r, &why);
    if (status) {
        tp_srv_req_release(s, r);
        return respond_error(s, con, "POST", url, status, why, NULL, NULL);
    }
    if (r->stream)
        return start_stream(s, con, url, r);
    int fd = connection_fd(con);
    pthread_mutex_lock(&s->mu);
    wait_done(s, r, fd);
    bool gone = !r->done;
    cJSON *answer = gone || r->error_status ? NULL : answer_json(s, r);
    int err_status = r->error_status;
    char err_msg[sizeof r->error_msg];
    snprintf(err_msg, sizeof err_msg, "%s", r->error_msg);
    pthread_mutex_unlock(&s->mu);
    if (gone) {
        tp_srv_logf(s, "%s: client gone before the answer", r->id);
        tp_srv_req_release(s, r);
        return MHD_NO;
    }
    tp_srv_req_release(s, r);
    if (err_status)
        return respond_error(s, con, "POST", url, err_status, err_msg, NULL, NULL);
    return respond_json(s, con, "POST", url, 200, answer);
}

static enum MHD_Result models(tp_srv *s, struct MHD_Connection *con, const char *url)
{
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "object", "list");
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "id", s->model_name);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", (double)time(NULL));
    cJSON_AddStringToObject(m, "owned_by", "tpshard");
    cJSON_AddNumberToObject(m, "max_model_len", s->max_seq);
    cJSON_AddItemToArray(cJSON_AddArrayToObject(root, "data"), m);
    return respond_json(s, con, "GET", url, 200, root);
}

enum { ROUTE_NONE, ROUTE_MODELS, ROUTE_COMPLETIONS, ROUTE_CHAT, ROUTE_HEALTH, ROUTE_METRICS };

static int route_of(const char *url, bool *post)
{
    static const struct { const char *url; int route; bool post; } routes[] = {
        { "/v1/models", ROUTE_MODELS, false },      { "/v1/completions", ROUTE_COMPLETIONS, true },
        { "/v1/chat/completions", ROUTE_CHAT, true }, { "/health", ROUTE_HEALTH, false },
        { "/metrics", ROUTE_METRICS, false },
    };
    for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++)
        if (!strcmp(url, routes[i].url)) {
            *post = routes[i].post;
            return routes[i].route;
        }
    return ROUTE_NONE;
}

/* A Content-Length header's value (libmicrohttpd has checked it is a
 * number); one past the size_t range saturates, so it is over any limit. */
static size_t content_length(const char *v)
{
    unsigned long long n = strtoull(v, NULL, 10);
    return n > SIZE_MAX ? SIZE_MAX : (size_t)n;
}

/* Keeps a piece of the body, or only counts it once the body is over the
 * limit (a chunked body has no Content-Length to refuse it early): memory
 * stays bounded by max_body whatever the client sends.  -1: out of memory.
 * libmicrohttpd (0.9.75) cannot queue an answer in the middle of an upload
 * (MHD_queue_response fails there): a chunked body over the limit is read
 * to its end and answered 413, up to BODY_DRAIN_FACTOR times the limit;
 * past that the connection is closed without an answer, so a client that
 * never ends its body holds no connection for long. */
#define BODY_DRAIN_FACTOR 4
static int keep_body(const tp_srv *s, body *bd, const char *piece, size_t n)
{
    bd->received += n;
    if (bd->received > s->max_body) {
        free(bd->data);
        *bd = (body){ .received = bd->received };
        return 0;
    }
    return tp_srv_buf_append(&bd->data, &bd->len, &bd->cap, piece, n);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *con, const char *url, const char *method,
                                  const char *version, const char *upload, size_t *upload_size, void **con_cls)
{
    tp_srv *s = cls;
    body *bd = *con_cls;
    bool post = false;
    int route = route_of(url, &post);
    if (!bd) {   /* the headers are in: answer at once what needs no body */
        if (route == ROUTE_NONE)
            return respond_error(s, con, method, url, 404, "no such route", NULL, NULL);
        if (strcmp(method, post ? "POST" : "GET"))
            return respond_error(s, con, method, url, 405, "method not allowed on this route", NULL, NULL);
        /* a body announced too big is refused before any of it is read */
        const char *cl = MHD_lookup_connection_value(con, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        tp_srv_bad b = { 0 };
        if (cl && tp_srv_check_body_size(s, content_length(cl), &b))
            return respond_error(s, con, method, url, b.status, b.msg, NULL, NULL);
        if (!(bd = calloc(1, sizeof *bd)))
            return MHD_NO;
        *con_cls = bd;
        return MHD_YES;
    }
    if (*upload_size > 0) {
        if (keep_body(s, bd, upload, *upload_size))
            return MHD_NO;
        *upload_size = 0;
        if (bd->received / BODY_DRAIN_FACTOR > s->max_body) {
            tp_srv_logf(s, "%s %s: closed after %zu bytes of a chunked body (limit %zu)", method, url, bd->received,
                        s->max_body);
            return MHD_NO;
        }
        return MHD_YES;
    }
    switch (route) {
    case ROUTE_MODELS: return models(s, con, url);
    case ROUTE_HEALTH: {
        pthread_mutex_lock(&s->mu);
        bool ok = s->accepting;
        pthread_mutex_unlock(&s->mu);
        return respond(s, con, method, url, ok ? 200 : 503,
                       strdup(ok ? "{\"status\": \"ok\"}" : "{\"status\": \"stopping\"}"), "application/json");
    }
    case ROUTE_METRICS: return respond(s, con, method, url, 200, tp_srv_metrics_text(s), "text/plain; version=0.0.4");
    case ROUTE_COMPLETIONS: return generate(s, con, url, TP_SRV_COMPLETION, bd);
    default: return generate(s, con, url, TP_SRV_CHAT, bd);
    }
}

static void on_completed(void *cls, struct MHD_Connection *con, void **con_cls, enum MHD_RequestTerminationCode code)
{
    body *bd = *con_cls;
    if (bd) {
        free(bd->data);
        free(bd);
    }
    *con_cls = NULL;
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    line[strcspn(line, "\n")] = '\0';
    tp_srv_logf(cls, "libmicrohttpd: %s", line);
}

/* ------------------------------------------------------------ start, stop */

int tp_srv_http_start(tp_srv *s, tp_err *err)
{
    const char *host = s->o->host && s->o->host[0] ? s->o->host : "127.0.0.1";
    int port = s->o->port > 0 ? s->o->port : 8000;
    char port_s[16];
    snprintf(port_s, sizeof port_s, "%d", port);
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE }, *ai;
    int gai = getaddrinfo(host, port_s, &hints, &ai);
    if (gai)
        return tp_errorf(err, "--host %s: %s", host, gai_strerror(gai));
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_ERROR_LOG;
    if (ai->ai_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    struct MHD_Daemon *d = MHD_start_daemon(
        flags, (uint16_t)port, NULL, NULL, on_request, s,
        MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, s,
        MHD_OPTION_SOCK_ADDR, ai->ai_addr,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)CONNECTION_LIMIT,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)CONNECTION_TIMEOUT_S,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)HEADER_MEMORY,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
        MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!d)
        return tp_errorf(err, "--port %d: cannot listen on %s:%d (in use, or not an address of this host?)", port,
                         host, port);
    s->http = d;
    tp_srv_logf(s, "listening on http://%s:%d (model %s, %d slots of %d tokens)", host, port, s->model_name, s->slots,
                s->max_seq);
    return 0;
}

/* Stops the daemon once the connections still open have finished (at most
 * STOP_DRAIN_S): a request is released when its answer is queued, not when
 * it has been sent, and stopping at once would cut off the answers just
 * given (the 503s to running requests when a rank died, the last answers
 * at SIGTERM).  A kept-alive idle connection only delays the stop. */
#define STOP_DRAIN_S 2.0
void tp_srv_http_stop(tp_srv *s)
{
    if (!s->http)
        return;
    double t0 = tp_now();
    while (tp_now() - t0 < STOP_DRAIN_S) {
        const union MHD_DaemonInfo *info =
            MHD_get_daemon_info(s->http, MHD_DAEMON_INFO_CURRENT_CONNECTIONS);
        if (!info || info->num_connections == 0)
            break;
        usleep(10 * 1000);
    }
    MHD_stop_daemon(s->http);
    s->http = NULL;
}
