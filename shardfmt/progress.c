/* progress.c - a one-line progress bar on stderr. */
#include "shardfmt.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct tp_progress {
    char label[64];
    uint64_t total;
    atomic_uint_fast64_t done;
    bool enabled;            /* stderr is a terminal and not quiet */
    double t_start;
    pthread_mutex_t draw_mu; /* one drawer at a time; others skip */
    double t_last_draw;      /* guarded by draw_mu */
    bool drawn;              /* guarded by draw_mu */
};

tp_progress *tp_progress_start(const char *label, uint64_t total_bytes, bool quiet)
{
    tp_progress *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    snprintf(p->label, sizeof p->label, "%s", label ? label : "");
    p->total = total_bytes;
    atomic_init(&p->done, 0);
    p->enabled = !quiet && isatty(2);
    p->t_start = tp_now();
    pthread_mutex_init(&p->draw_mu, NULL);
    return p;
}

/* "123.4 MB" below 10 GB, "12.34 GB" above, so the width stays steady. */
static void fmt_bytes(char *out, size_t cap, uint64_t b)
{
    if (b >= 10ull * 1000 * 1000 * 1000)
        snprintf(out, cap, "%.2f GB", (double)b / 1e9);
    else
        snprintf(out, cap, "%.1f MB", (double)b / 1e6);
}

static void fmt_eta(char *out, size_t cap, double secs)
{
    if (!(secs >= 0) || secs > 359999) {
        snprintf(out, cap, "--:--");
        return;
    }
    unsigned s = (unsigned)(secs + 0.5);
    if (s >= 3600)
        snprintf(out, cap, "%u:%02u:%02u", s / 3600, s / 60 % 60, s % 60);
    else
        snprintf(out, cap, "%u:%02u", s / 60, s % 60);
}

static void draw(tp_progress *p, double now)
{
    uint64_t done = atomic_load(&p->done);
    double elapsed = now - p->t_start;
    double rate = elapsed > 0 ? (double)done / elapsed : 0;
    double pct = p->total ? 100.0 * (double)done / (double)p->total : 0;
    if (pct > 100)
        pct = 100;
    char sdone[32], stotal[32], eta[32];
    fmt_bytes(sdone, sizeof sdone, done);
    fmt_bytes(stotal, sizeof stotal, p->total);
    fmt_eta(eta, sizeof eta, rate > 0 && p->total >= done ? (double)(p->total - done) / rate : -1);
    /* \r to the line start, \033[K clears what a longer previous line left. */
    fprintf(stderr, "\r%s  %s / %s  %.1f MB/s  ETA %s  %3.0f%%\033[K", p->label, sdone, stotal,
            rate / 1e6, eta, pct);
    fflush(stderr);
    p->drawn = true;
    p->t_last_draw = now;
}

void tp_progress_add(tp_progress *p, uint64_t bytes)
{
    if (!p)
        return;
    atomic_fetch_add(&p->done, bytes);
    if (!p->enabled)
        return;
    /* Workers never block on drawing: whoever holds the lock draws. */
    if (pthread_mutex_trylock(&p->draw_mu) != 0)
        return;
    double now = tp_now();
    if (!p->drawn || now - p->t_last_draw >= 0.1)
        draw(p, now);
    pthread_mutex_unlock(&p->draw_mu);
}

void tp_progress_finish(tp_progress *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->draw_mu);
    if (p->enabled && p->drawn) {
        fputs("\r\033[K", stderr);
        fflush(stderr);
    }
    pthread_mutex_unlock(&p->draw_mu);
    pthread_mutex_destroy(&p->draw_mu);
    free(p);
}
