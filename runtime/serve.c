/* serve.c - tprun --serve's scheduler: continuous batching over the model's
 * sequence slots, the step plans every rank runs, sampling, stop strings
 * and the /metrics counters.  The HTTP side is serve_http.c.
 *
 * A step: requests cancelled by their client leave their slot; queued
 * requests take the free slots (their slot is emptied on every rank); then
 * one token for every decoding slot (the id sampled at the previous step)
 * and prompt chunks of the new ones, at most --max-step-tokens in all, go to
 * every rank as one plan, and every rank runs tp_model_forward_batch on it.
 * Rank 0 samples each slot's next id from the logits of its last token. */
#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "serve_internal.h"

/* The prompt tokens one step prefills at most, beside the running
 * requests' decode tokens (tp_serve_opts.max_step_tokens, 0: this): a long
 * prompt is prefilled in chunks between their decode steps, so that their
 * inter-token latency stays bounded; a bigger step runs its matrix products
 * over more tokens at once. */
#define DEFAULT_STEP_TOKENS 256

static int step_tokens(const tp_serve_opts *o)
{
    return o->max_step_tokens > 0 ? o->max_step_tokens : DEFAULT_STEP_TOKENS;
}
/* Idle, rank 0 broadcasts a heartbeat plan this often: the other ranks
 * wait for a plan with their --timeout and so notice a dead rank 0. */
#define HEARTBEAT_S 1.0

/* ------------------------------------------------------------ step plans */

/* A plan on the wire: int32 words [kind, n_reset, n_tokens, reset slots...,
 * (slot, id, logits) per token], sent as its byte length, then the words. */
enum { PLAN_HEARTBEAT = 0, PLAN_STEP = 1, PLAN_STOP = 2 };

typedef struct plan {
    int32_t *w;
    size_t len, cap;   /* words */
} plan;

static int plan_push(plan *p, int32_t v, tp_err *err)
{
    if (p->len == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 256;
        int32_t *w = realloc(p->w, cap * sizeof *w);
        if (!w)
            return tp_errorf(err, "out of memory for a step plan");
        p->w = w;
        p->cap = cap;
    }
    p->w[p->len++] = v;
    return 0;
}

static void plan_begin(plan *p, int kind)
{
    p->len = 0;
    tp_err err;
    /* 3 header words always fit: cap starts at 256 */
    plan_push(p, kind, &err);
    plan_push(p, 0, &err);
    plan_push(p, 0, &err);
}

/* Sends (rank 0) or receives (the others) one plan.  A peer that died
 * makes the broadcast fail within comm->timeout_s. */
static int plan_broadcast(tp_comm *c, plan *p, tp_err *err)
{
    uint32_t bytes = (uint32_t)(p->len * sizeof(int32_t));
    if (c->ops->broadcast(c, &bytes, sizeof bytes, 0, err))
        return -1;
    if (c->rank != 0) {
        if (bytes % sizeof(int32_t) || bytes < 3 * sizeof(int32_t))
            return tp_errorf(err, "rank %d: a step plan of %u bytes from rank 0 is malformed", c->rank, bytes);
        p->len = 0;
        while (p->cap < bytes / sizeof(int32_t))
            if (plan_push(p, 0, err))
                return -1;
        p->len = bytes / sizeof(int32_t);
    }
    return c->ops->broadcast(c, p->w, bytes, 0, err);
}

/* Runs a received (or built) plan on this rank: empties the slots it
 * names, then one batched forward.  logits gets a row per token marked. */
static int plan_run(tp_model *m, const plan *p, tp_batch_token *toks, float *logits, tp_err *err)
{
    int n_reset = p->w[1], n_tok = p->w[2];
    int slots = tp_model_slots(m);
    if (n_reset < 0 || n_tok < 0 || p->len != 3 + (size_t)n_reset + 3 * (size_t)n_tok)
        return tp_errorf(err, "step plan: %zu words do not hold %d resets and %d tokens", p->len, n_reset, n_tok);
    const int32_t *r = p->w + 3, *t = r + n_reset;
    for (int i = 0; i < n_reset; i++) {
        if (r[i] < 0 || r[i] >= slots)
            return tp_errorf(err, "step plan: slot %d outside the %d slots", (int)r[i], slots);
        tp_model_reset_slot(m, r[i]);
    }
    if (n_tok == 0)
        return 0;
    for (int i = 0; i < n_tok; i++) {
        int slot = t[3 * i];
        /* a slot's tokens follow its cache, in order */
        int pos = tp_model_slot_length(m, slot);
        for (int j = i - 1; j >= 0; j--)
            if (toks[j].slot == slot) {
                pos = toks[j].pos + 1;
                break;
            }
        toks[i] = (tp_batch_token){ .slot = slot, .id = t[3 * i + 1], .pos = pos, .logits = t[3 * i + 2] != 0 };
    }
    return tp_model_forward_batch(m, toks, n_tok, logits, err);
}

/* The ranks other than 0: run rank 0's plans until a stop plan. */
static int follow(tp_model *m, tp_comm *c, const tp_serve_opts *o, tp_err *err)
{
    const tp_model_config *cfg = tp_model_get_config(m);
    int slots = tp_model_slots(m), step = step_tokens(o);
    plan p = { 0 };
    tp_batch_token *toks = malloc(((size_t)step + (size_t)slots) * sizeof *toks);
    float *logits = malloc((size_t)slots * (size_t)cfg->vocab * sizeof *logits);
    int rc = -1;
    if (!toks || !logits) {
        tp_errorf(err, "out of memory for %d slots", slots);
        goto out;
    }
    for (;;) {
        if (plan_broadcast(c, &p, err))
            goto out;
        if (p.w[0] == PLAN_STOP)
            break;
        if (p.w[0] == PLAN_HEARTBEAT)
            continue;
        if (p.w[2] > step + slots) {
            tp_errorf(err, "step plan: %d tokens, more than the %d a step holds (--max-step-tokens %d, "
                      "--max-batch %d: every rank needs the same)", (int)p.w[2], step + slots, step, slots);
            goto out;
        }
        if (plan_run(m, &p, toks, logits, err))
            goto out;
    }
    rc = 0;
out:
    free(p.w);
    free(toks);
    free(logits);
    return rc;
}

/* ------------------------------------------------------------ requests */

tp_srv_req *tp_srv_req_new(tp_srv *s)
{
    tp_srv_req *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->refs = 1;
    r->slot = -1;
    pthread_cond_init(&r->cv, NULL);
    pthread_mutex_lock(&s->mu);
    s->live_reqs++;
    pthread_mutex_unlock(&s->mu);
    return r;
}

static void req_free(tp_srv_req *r)
{
    free(r->prompt);
    for (int i = 0; i < r->n_stops; i++)
        free(r->stops[i]);
    free(r->out);
    free(r->gen);
    free(r->text);
    tp_detok_free(r->detok);
    pthread_cond_destroy(&r->cv);
    free(r);
}

static void release_locked(tp_srv *s, tp_srv_req *r)
{
    if (--r->refs == 0) {
        s->live_reqs--;
        req_free(r);
    }
}

void tp_srv_req_release(tp_srv *s, tp_srv_req *r)
{
    pthread_mutex_lock(&s->mu);
    release_locked(s, r);
    pthread_cond_broadcast(&s->wake);
    pthread_mutex_unlock(&s->mu);
}

void tp_srv_cancel(tp_srv *s, tp_srv_req *r)
{
    pthread_mutex_lock(&s->mu);
    r->cancelled = true;
    pthread_cond_broadcast(&s->wake);
    pthread_mutex_unlock(&s->mu);
}

int tp_srv_submit(tp_srv *s, tp_srv_req *r, const char **why)
{
    int status = 0;
    pthread_mutex_lock(&s->mu);
    if (!s->accepting) {
        status = 503;
        *why = "the server is shutting down";
    } else if (s->q_len >= s->max_queue) {
        status = 429;
        *why = "the request queue is full: try again later";
    } else {
        r->gen = malloc(((size_t)r->max_tokens + 1) * sizeof *r->gen);
        if (!r->gen) {
            status = 500;
            *why = "out of memory";
        } else {
            r->refs++;
            r->t_queued = tp_now();
            s->queue[(s->q_head + s->q_len++) % s->max_queue] = r;
            pthread_cond_broadcast(&s->wake);
        }
    }
    pthread_mutex_unlock(&s->mu);
    return status;
}

int tp_srv_buf_append(char **buf, size_t *len, size_t *cap, const char *p, size_t n)
{
    if (*len + n + 1 > *cap) {
        size_t c = *cap ? *cap : 256;
        while (c < *len + n + 1)
            c *= 2;
        char *b = realloc(*buf, c);
        if (!b)
            return -1;
        *buf = b;
        *cap = c;
    }
    memcpy(*buf + *len, p, n);
    *len += n;
    (*buf)[*len] = '\0';
    return 0;
}

/* Ends r with an error status (under s->mu). */
static void fail_locked(tp_srv_req *r, int status, const char *msg)
{
    if (r->done)
        return;
    r->error_status = status;
    snprintf(r->error_msg, sizeof r->error_msg, "%s", msg);
    r->done = true;
    pthread_cond_broadcast(&r->cv);
}

/* ------------------------------------------------------------ metrics */

static const double hist_bounds[TP_SRV_N_BUCKETS] = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30 };

static void hist_add(tp_srv_hist *h, double v)
{
    int i = 0;
    while (i < TP_SRV_N_BUCKETS && v > hist_bounds[i])
        i++;
    h->count[i]++;
    h->sum += v;
}

static const char *const status_names[6] = { "200", "400", "404", "413", "429", "5xx" };

void tp_srv_count_status(tp_srv *s, int status)
{
    int i = status == 200 ? 0 : status == 404 ? 2 : status == 413 ? 3 : status == 429 ? 4
            : status >= 500 ? 5 : 1;
    pthread_mutex_lock(&s->mu);
    s->by_status[i]++;
    pthread_mutex_unlock(&s->mu);
}

static void hist_text(char **b, size_t *len, size_t *cap, const char *name, const char *help, const tp_srv_hist *h)
{
    char line[256];
    int n = snprintf(line, sizeof line, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    tp_srv_buf_append(b, len, cap, line, (size_t)n);
    unsigned long long cum = 0;
    for (int i = 0; i <= TP_SRV_N_BUCKETS; i++) {
        cum += h->count[i];
        if (i < TP_SRV_N_BUCKETS)
            n = snprintf(line, sizeof line, "%s_bucket{le=\"%g\"} %llu\n", name, hist_bounds[i], cum);
        else
            n = snprintf(line, sizeof line, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name,
                         cum, name, h->sum, name, cum);
        tp_srv_buf_append(b, len, cap, line, (size_t)n);
    }
}

char *tp_srv_metrics_text(tp_srv *s)
{
    char *b = NULL, line[1024];
    size_t len = 0, cap = 0;
    pthread_mutex_lock(&s->mu);
    int n = snprintf(line, sizeof line, "# HELP tpshard_requests_total HTTP requests answered, by status.\n"
                     "# TYPE tpshard_requests_total counter\n");
    tp_srv_buf_append(&b, &len, &cap, line, (size_t)n);
    for (int i = 0; i < 6; i++) {
        n = snprintf(line, sizeof line, "tpshard_requests_total{status=\"%s\"} %llu\n", status_names[i],
                     s->by_status[i]);
        tp_srv_buf_append(&b, &len, &cap, line, (size_t)n);
    }
    n = snprintf(line, sizeof line,
                 "# HELP tpshard_prompt_tokens_total Prompt tokens of the requests admitted.\n"
                 "# TYPE tpshard_prompt_tokens_total counter\ntpshard_prompt_tokens_total %llu\n"
                 "# HELP tpshard_generation_tokens_total Tokens generated.\n"
                 "# TYPE tpshard_generation_tokens_total counter\ntpshard_generation_tokens_total %llu\n"
                 "# HELP tpshard_queue_length Requests waiting for a slot.\n"
                 "# TYPE tpshard_queue_length gauge\ntpshard_queue_length %d\n"
                 "# HELP tpshard_running_requests Requests in the running batch.\n"
                 "# TYPE tpshard_running_requests gauge\ntpshard_running_requests %d\n",
                 s->prompt_tokens, s->generated_tokens, s->q_len, s->running);
    tp_srv_buf_append(&b, &len, &cap, line, (size_t)n);
    hist_text(&b, &len, &cap, "tpshard_time_to_first_token_seconds", "From arrival to the first generated token.",
              &s->ttft);
    hist_text(&b, &len, &cap, "tpshard_inter_token_latency_seconds", "Between two tokens of one request.", &s->itl);
    pthread_mutex_unlock(&s->mu);
    return b;
}

void tp_srv_logf(tp_srv *s, const char *fmt, ...)
{
    if (!s->o->log)
        return;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    s->o->log(s->o->log_arg, line);
}

/* ------------------------------------------------------------ the scheduler */

typedef struct sched {
    tp_srv *s;
    tp_model *m;
    tp_comm *c;
    tp_srv_req **running;       /* by slot; NULL: free */
    plan p;
    tp_batch_token *toks;
    float *logits, *scratch, *penalised;
    int32_t *seen;              /* prompt + generated, for the repetition penalty */
    size_t seen_cap;
} sched;

/* Where the text can be shown so far: up to an occurrence of a stop string
 * (then *stop_at is set), else short of a tail that could begin one. */
static size_t visible_end(const tp_srv_req *r, bool *stop_at)
{
    size_t end = r->text_len;
    *stop_at = false;
    for (int i = 0; i < r->n_stops; i++) {
        const char *hit = memmem(r->text, r->text_len, r->stops[i], strlen(r->stops[i]));
        if (hit && (size_t)(hit - r->text) <= end) {
            end = (size_t)(hit - r->text);
            *stop_at = true;
        }
    }
    if (*stop_at)
        return end;
    size_t safe = end;
    for (int i = 0; i < r->n_stops; i++) {
        size_t k = strlen(r->stops[i]);
        for (size_t keep = k - 1 < end ? k - 1 : end; keep > 0; keep--)
            if (!memcmp(r->text + end - keep, r->stops[i], keep)) {
                if (end - keep < safe)
                    safe = end - keep;
                break;
            }
    }
    return safe;
}

/* Hands text[text_sent..upto) to the HTTP side (under s->mu). */
static int publish_locked(tp_srv_req *r, size_t upto)
{
    if (upto <= r->text_sent)
        return 0;
    if (tp_srv_buf_append(&r->out, &r->out_len, &r->out_cap, r->text + r->text_sent, upto - r->text_sent))
        return -1;
    r->text_sent = upto;
    pthread_cond_broadcast(&r->cv);
    return 0;
}

/* The request leaves its slot: done with reason, the scheduler's ref dropped. */
static void finish(sched *k, tp_srv_req *r, const char *reason)
{
    tp_srv *s = k->s;
    pthread_mutex_lock(&s->mu);
    if (!r->done && !r->error_status) {
        r->finish_reason = reason;
        r->done = true;
        pthread_cond_broadcast(&r->cv);
    }
    if (r->slot >= 0) {
        k->running[r->slot] = NULL;
        s->running--;
    }
    r->slot = -1;
    release_locked(s, r);
    pthread_mutex_unlock(&s->mu);
}

static bool is_eos(const tp_srv *s, int32_t id)
{
    for (int i = 0; i < s->o->n_eos; i++)
        if (s->o->eos_ids[i] == id)
            return true;
    return false;
}

/* Adds decoded text; returns -1 when out of memory. */
static int add_text(tp_srv_req *r, char *piece)
{
    int rc = piece ? tp_srv_buf_append(&r->text, &r->text_len, &r->text_cap, piece, strlen(piece)) : 0;
    free(piece);
    return rc;
}

/* One sampled id for r: record it, turn it into text, decide whether r ends. */
static void take_token(sched *k, tp_srv_req *r, int32_t id)
{
    tp_srv *s = k->s;
    double now = tp_now();
    pthread_mutex_lock(&s->mu);
    r->gen[r->n_gen++] = id;
    s->generated_tokens++;
    hist_add(r->n_gen == 1 ? &s->ttft : &s->itl, r->n_gen == 1 ? now - r->t_queued : now - r->t_last);
    pthread_mutex_unlock(&s->mu);
    r->t_last = now;

    const char *reason = NULL;
    tp_err err;
    char *piece = NULL;
    if (is_eos(s, id)) {
        reason = "stop";
    } else if (tp_detok_push(r->detok, id, &piece, &err) || add_text(r, piece)) {
        pthread_mutex_lock(&s->mu);
        fail_locked(r, 500, err.msg);
        pthread_mutex_unlock(&s->mu);
        finish(k, r, NULL);
        return;
    }
    if (!reason && r->n_gen >= r->max_tokens)
        reason = "length";
    /* the next step would feed this id at position n_prompt + n_gen - 1 */
    if (!reason && r->n_prompt + r->n_gen > k->s->max_seq)
        reason = "length";
    if (reason && add_text(r, tp_detok_flush(r->detok)))
        reason = "length";
    bool stop_at;
    size_t end = visible_end(r, &stop_at);
    if (stop_at)
        reason = "stop";
    else if (reason)
        end = r->text_len;   /* nothing follows: a partial stop string is just text */
    pthread_mutex_lock(&s->mu);
    if (publish_locked(r, end))
        fail_locked(r, 500, "out of memory");
    pthread_mutex_unlock(&s->mu);
    if (reason)
        finish(k, r, reason);
}

/* Picks r's next id from its logits row (rank 0 only: the id goes to the
 * other ranks in the next plan). */
static int32_t pick(sched *k, tp_srv_req *r, const float *row)
{
    int vocab = k->s->cfg->vocab;
    tp_sampler_opts so = r->sampler;
    if (so.repetition_penalty > 0 && so.repetition_penalty != 1.0f) {
        size_t n = (size_t)r->n_prompt + (size_t)r->n_gen;
        if (n <= k->seen_cap) {
            memcpy(k->seen, r->prompt, (size_t)r->n_prompt * sizeof *k->seen);
            memcpy(k->seen + r->n_prompt, r->gen, (size_t)r->n_gen * sizeof *k->seen);
            so.seen = k->seen;
            so.n_seen = n;
            tp_repetition_penalty(row, k->penalised, vocab, k->seen, n, so.repetition_penalty);
            row = k->penalised;
        }
    }
    return tp_sample(row, vocab, &so, &r->rng, k->scratch);
}

/* Empties every slot whose client went away and fills free slots from the
 * queue; the newly admitted slots go into the plan's resets. */
static void admit(sched *k)
{
    tp_srv *s = k->s;
    for (int i = 0; i < s->slots; i++) {
        tp_srv_req *r = k->running[i];
        bool gone;
        pthread_mutex_lock(&s->mu);
        gone = r && r->cancelled;
        pthread_mutex_unlock(&s->mu);
        if (gone) {
            tp_srv_logf(s, "%s: client gone, slot %d freed", r->id, i);
            finish(k, r, "stop");
        }
    }
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < s->slots && s->q_len > 0; i++) {
        if (k->running[i])
            continue;
        tp_srv_req *r = NULL;
        while (s->q_len > 0 && !r) {
            r = s->queue[s->q_head];
            s->q_head = (s->q_head + 1) % s->max_queue;
            s->q_len--;
            if (r->cancelled) {   /* left while queued */
                release_locked(s, r);
                r = NULL;
            }
        }
        if (!r)
            break;
        r->detok = tp_detok_new(s->tok, true);
        if (!r->detok) {
            fail_locked(r, 500, "out of memory");
            release_locked(s, r);
            continue;
        }
        tp_rng_seed(&r->rng, r->sampler.seed);
        r->slot = i;
        r->n_fed = 0;
        k->running[i] = r;
        s->running++;
        s->prompt_tokens += (unsigned long long)r->n_prompt;
        tp_err err;
        plan_push(&k->p, i, &err);   /* a reset: room was made in plan_begin's caller */
        k->p.w[1]++;
    }
    pthread_mutex_unlock(&s->mu);
}

/* The step's tokens: each decoding slot's last id, then prompt chunks. */
static int plan_tokens(sched *k, tp_err *err)
{
    tp_srv *s = k->s;
    int budget = step_tokens(s->o);
    for (int i = 0; i < s->slots; i++) {
        tp_srv_req *r = k->running[i];
        if (!r || r->n_fed < r->n_prompt)
            continue;
        if (plan_push(&k->p, i, err) || plan_push(&k->p, r->gen[r->n_gen - 1], err) || plan_push(&k->p, 1, err))
            return -1;
        k->p.w[2]++;
    }
    for (int i = 0; i < s->slots && budget > 0; i++) {
        tp_srv_req *r = k->running[i];
        if (!r || r->n_fed >= r->n_prompt)
            continue;
        int chunk = r->n_prompt - r->n_fed < budget ? r->n_prompt - r->n_fed : budget;
        for (int j = 0; j < chunk; j++) {
            int at = r->n_fed + j;
            if (plan_push(&k->p, i, err) || plan_push(&k->p, r->prompt[at], err) ||
                plan_push(&k->p, at == r->n_prompt - 1, err))
                return -1;
        }
        k->p.w[2] += chunk;
        budget -= chunk;
    }
    return 0;
}

/* After the forward: advance the prompts and sample where a row came back. */
static void after_step(sched *k)
{
    const int32_t *t = k->p.w + 3 + k->p.w[1];
    int n_tok = k->p.w[2], row = 0;
    size_t vocab = (size_t)k->s->cfg->vocab;
    for (int i = 0; i < n_tok; i++) {
        tp_srv_req *r = k->running[t[3 * i]];
        if (r && r->n_fed < r->n_prompt)
            r->n_fed++;
        if (!t[3 * i + 2])
            continue;
        const float *logits = k->logits + (size_t)row++ * vocab;
        if (r)
            take_token(k, r, pick(k, r, logits));
    }
}

/* Every request still queued or running gets status and msg. */
static void fail_all(sched *k, int status, const char *msg)
{
    tp_srv *s = k->s;
    pthread_mutex_lock(&s->mu);
    s->accepting = false;
    while (s->q_len > 0) {
        tp_srv_req *r = s->queue[s->q_head];
        s->q_head = (s->q_head + 1) % s->max_queue;
        s->q_len--;
        fail_locked(r, status, msg);
        release_locked(s, r);
    }
    for (int i = 0; i < s->slots; i++) {
        tp_srv_req *r = k->running[i];
        if (!r)
            continue;
        fail_locked(r, status, msg);
        k->running[i] = NULL;
        s->running--;
        r->slot = -1;
        release_locked(s, r);
    }
    pthread_mutex_unlock(&s->mu);
}

static bool any_running(const sched *k)
{
    for (int i = 0; i < k->s->slots; i++)
        if (k->running[i])
            return true;
    return false;
}

/* Rank 0's loop until a stop (0) or a failed collective (-1). */
static int schedule(sched *k, tp_err *err)
{
    tp_srv *s = k->s;
    double t_stop = 0, last_plan = tp_now();
    double grace = s->o->grace_s > 0 ? s->o->grace_s : 30;
    for (;;) {
        if (s->o->stop && *s->o->stop && t_stop == 0) {
            t_stop = tp_now();
            tp_srv_logf(s, "stopping: no new requests; %g s for the running ones", grace);
            pthread_mutex_lock(&s->mu);
            s->accepting = false;
            pthread_mutex_unlock(&s->mu);
        }
        if (t_stop > 0 && tp_now() - t_stop > grace && any_running(k))
            fail_all(k, 503, "the server stopped before the answer was complete");
        plan_begin(&k->p, PLAN_STEP);
        admit(k);
        if (t_stop > 0 && !any_running(k)) {
            pthread_mutex_lock(&s->mu);
            bool queued = s->q_len > 0;
            pthread_mutex_unlock(&s->mu);
            if (!queued)
                return 0;
        }
        if (plan_tokens(k, err))
            return -1;
        if (k->p.w[2] == 0 && k->p.w[1] == 0) {
            /* idle: wait for work, a heartbeat at least every HEARTBEAT_S */
            pthread_mutex_lock(&s->mu);
            if (s->q_len == 0) {
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                ts.tv_nsec += 100 * 1000 * 1000;
                if (ts.tv_nsec >= 1000000000) {
                    ts.tv_sec++;
                    ts.tv_nsec -= 1000000000;
                }
                pthread_cond_timedwait(&s->wake, &s->mu, &ts);
            }
            pthread_mutex_unlock(&s->mu);
            if (tp_now() - last_plan < HEARTBEAT_S)
                continue;
            plan_begin(&k->p, PLAN_HEARTBEAT);
        }
        last_plan = tp_now();
        if (plan_broadcast(k->c, &k->p, err) || (k->p.w[0] == PLAN_STEP && plan_run(k->m, &k->p, k->toks, k->logits, err)))
            return -1;
        if (k->p.w[0] == PLAN_STEP)
            after_step(k);
    }
}

/* ------------------------------------------------------------ tp_serve_run */

static int sched_init(sched *k, tp_srv *s, tp_model *m, tp_comm *c, tp_err *err)
{
    size_t vocab = (size_t)s->cfg->vocab;
    *k = (sched){ .s = s, .m = m, .c = c };
    k->running = calloc((size_t)s->slots, sizeof *k->running);
    k->toks = malloc(((size_t)step_tokens(s->o) + (size_t)s->slots) * sizeof *k->toks);
    k->logits = malloc((size_t)s->slots * vocab * sizeof *k->logits);
    k->scratch = malloc(2 * vocab * sizeof *k->scratch);
    k->penalised = malloc(vocab * sizeof *k->penalised);
    k->seen_cap = (size_t)s->max_seq + 1;
    k->seen = malloc(k->seen_cap * sizeof *k->seen);
    s->queue = calloc((size_t)s->max_queue, sizeof *s->queue);
    if (!k->running || !k->toks || !k->logits || !k->scratch || !k->penalised || !k->seen || !s->queue)
        return tp_errorf(err, "out of memory for %d slots of a %zu-token vocabulary", s->slots, vocab);
    return 0;
}

static void sched_free(sched *k)
{
    free(k->running);
    free(k->toks);
    free(k->logits);
    free(k->scratch);
    free(k->penalised);
    free(k->seen);
    free(k->p.w);
}

/* Gives the connection threads a moment to write the last answers. */
static void wait_released(tp_srv *s, double seconds)
{
    double t0 = tp_now();
    pthread_mutex_lock(&s->mu);
    while (s->live_reqs > 0 && tp_now() - t0 < seconds) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 50 * 1000 * 1000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_cond_timedwait(&s->wake, &s->mu, &ts);
    }
    pthread_mutex_unlock(&s->mu);
}

static int stop_followers(tp_comm *c, tp_err *err)
{
    plan p = { 0 };
    plan_begin(&p, PLAN_STOP);
    int rc = p.w ? plan_broadcast(c, &p, err) : tp_errorf(err, "out of memory");
    free(p.w);
    return rc;
}

int tp_serve_run(tp_model *m, tp_comm *comm, const tp_tokenizer *tok, const tp_serve_opts *o, tp_err *err)
{
    if (comm && comm->rank != 0)
        return follow(m, comm, o, err);
    tp_srv s = { .o = o, .tok = tok, .cfg = tp_model_get_config(m), .slots = tp_model_slots(m),
                 .max_queue = o->max_queue > 0 ? o->max_queue : 64,
                 .max_body = o->max_body > 0 ? o->max_body : 1 << 20, .accepting = true };
    s.max_seq = o->max_seq;
    snprintf(s.model_name, sizeof s.model_name, "%s", o->served_model_name ? o->served_model_name : "model");
    tp_rng_seed(&s.seed_rng, ((uint64_t)time(NULL) << 20) ^ (uint64_t)(uintptr_t)&s);
    pthread_mutex_init(&s.mu, NULL);
    pthread_cond_init(&s.wake, NULL);
    sched k;
    int rc = -1;
    if (!tok) {
        tp_errorf(err, "--serve needs the model's tokenizer.json (the conversion has none)");
        if (comm)
            stop_followers(comm, &(tp_err){ 0 });
        goto out;
    }
    if (sched_init(&k, &s, m, comm, err) || tp_srv_http_start(&s, err)) {
        if (comm)
            stop_followers(comm, &(tp_err){ 0 });
        sched_free(&k);
        goto out;
    }
    rc = schedule(&k, err);
    if (rc == 0 && comm)
        rc = stop_followers(comm, err);
    if (rc)
        fail_all(&k, 503, err->msg);
    wait_released(&s, 5);
    tp_srv_http_stop(&s);
    sched_free(&k);
out:
    free(s.queue);
    pthread_cond_destroy(&s.wake);
    pthread_mutex_destroy(&s.mu);
    return rc;
}
