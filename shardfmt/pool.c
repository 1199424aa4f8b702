/* pool.c - a fixed pool of worker threads running jobs from a FIFO queue. */
#include "shardfmt.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

/* A thread with nothing to do spins this long before it sleeps on a
 * condition variable.  The decode step of a model is a hundred or so short
 * parallel sections per token with a little serial work between them; a
 * futex wake-up costs tens of microseconds on a VM, and paying it twice per
 * section (the helper's start, the caller's finish) cost a few percent of
 * decode speed.  Work that is not that fine-grained loses at most this much
 * CPU per idle period. */
#define SPIN_NS 200000L

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Spins until *flag is non-zero or SPIN_NS passed; returns the flag. */
static size_t spin_until_nonzero(atomic_size_t *flag)
{
    long long deadline = 0;
    for (unsigned i = 0;; i++) {
        size_t v = atomic_load_explicit(flag, memory_order_acquire);
        if (v)
            return v;
        if ((i & 63) == 0) {
            long long t = now_ns();
            if (!deadline)
                deadline = t + SPIN_NS;
            else if (t > deadline)
                return 0;
        }
        cpu_relax();
    }
}

typedef struct job {
    tp_job_fn fn;
    void *arg;
    struct job *next;
} job;

struct tp_pool {
    pthread_mutex_t mu;
    pthread_cond_t work_ready;   /* queue became non-empty, or shutting down */
    pthread_cond_t all_done;     /* unfinished dropped to 0 */
    job *head, *tail;
    size_t unfinished;           /* queued + running */
    atomic_size_t queued;        /* jobs in the queue (read without mu by spinners) */
    bool stopping;
    int nthreads;
    pthread_t *threads;
};

static void *worker_main(void *p)
{
    tp_pool *pool = p;
    pthread_mutex_lock(&pool->mu);
    for (;;) {
        if (!pool->head && !pool->stopping) {
            pthread_mutex_unlock(&pool->mu);
            spin_until_nonzero(&pool->queued);
            pthread_mutex_lock(&pool->mu);
        }
        while (!pool->head && !pool->stopping)
            pthread_cond_wait(&pool->work_ready, &pool->mu);
        if (!pool->head && pool->stopping)
            break;
        job *j = pool->head;
        pool->head = j->next;
        if (!pool->head)
            pool->tail = NULL;
        atomic_fetch_sub(&pool->queued, 1);
        pthread_mutex_unlock(&pool->mu);
        j->fn(j->arg);
        free(j);
        pthread_mutex_lock(&pool->mu);
        if (--pool->unfinished == 0)
            pthread_cond_broadcast(&pool->all_done);
    }
    pthread_mutex_unlock(&pool->mu);
    return NULL;
}

tp_pool *tp_pool_create(int nthreads)
{
    if (nthreads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        nthreads = n > 0 ? (int)n : 1;
    }
    tp_pool *pool = calloc(1, sizeof *pool);
    if (!pool)
        return NULL;
    pool->threads = calloc((size_t)nthreads, sizeof *pool->threads);
    if (!pool->threads) {
        free(pool);
        return NULL;
    }
    pthread_mutex_init(&pool->mu, NULL);
    atomic_init(&pool->queued, 0);
    pthread_cond_init(&pool->work_ready, NULL);
    pthread_cond_init(&pool->all_done, NULL);
    for (int i = 0; i < nthreads; i++) {
        if (pthread_create(&pool->threads[i], NULL, worker_main, pool) != 0)
            break;
        pool->nthreads++;
    }
    if (pool->nthreads == 0) {
        tp_pool_destroy(pool);
        return NULL;
    }
    return pool;
}

int tp_pool_threads(const tp_pool *pool)
{
    return pool ? pool->nthreads : 1;
}

void tp_pool_submit(tp_pool *pool, tp_job_fn fn, void *arg)
{
    job *j = pool ? malloc(sizeof *j) : NULL;
    if (!j) {
        /* No pool (or no memory for the queue entry): run it here, which
         * keeps the "every submitted job runs" guarantee. */
        fn(arg);
        return;
    }
    j->fn = fn;
    j->arg = arg;
    j->next = NULL;
    pthread_mutex_lock(&pool->mu);
    if (pool->tail)
        pool->tail->next = j;
    else
        pool->head = j;
    pool->tail = j;
    pool->unfinished++;
    atomic_fetch_add(&pool->queued, 1);
    pthread_cond_signal(&pool->work_ready);
    pthread_mutex_unlock(&pool->mu);
}

void tp_pool_wait(tp_pool *pool)
{
    if (!pool)
        return;
    pthread_mutex_lock(&pool->mu);
    while (pool->unfinished > 0)
        pthread_cond_wait(&pool->all_done, &pool->mu);
    pthread_mutex_unlock(&pool->mu);
}

void tp_pool_destroy(tp_pool *pool)
{
    if (!pool)
        return;
    pthread_mutex_lock(&pool->mu);
    pool->stopping = true; /* workers drain the queue, then exit */
    pthread_cond_broadcast(&pool->work_ready);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 0; i < pool->nthreads; i++)
        pthread_join(pool->threads[i], NULL);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->work_ready);
    pthread_cond_destroy(&pool->all_done);
    free(pool->threads);
    free(pool);
}

/* parallel_for shares one heap context between the caller and helper jobs.
 * Indices are claimed from an atomic counter, and the caller claims too, so
 * a parallel_for called from inside a pool job cannot deadlock waiting for
 * helpers that never get a thread: the caller only waits for indices that a
 * running thread has already claimed.  Helpers that start late find nothing
 * left; the last reference frees the context. */
typedef struct pfor_ctx {
    void (*fn)(size_t i, void *arg);
    void *arg;
    size_t n;
    atomic_size_t next;
    atomic_int refs;
    pthread_mutex_t mu;
    pthread_cond_t done_cv;
    atomic_size_t done;      /* indices finished; changed under mu, read by the spinning caller */
    atomic_size_t all_done;  /* done == n (a flag the caller can spin on) */
} pfor_ctx;

static void pfor_release(pfor_ctx *c)
{
    if (atomic_fetch_sub(&c->refs, 1) == 1) {
        pthread_mutex_destroy(&c->mu);
        pthread_cond_destroy(&c->done_cv);
        free(c);
    }
}

static void pfor_run(pfor_ctx *c)
{
    size_t mine = 0;
    for (;;) {
        size_t i = atomic_fetch_add(&c->next, 1);
        if (i >= c->n)
            break;
        c->fn(i, c->arg);
        mine++;
    }
    if (mine > 0) {
        pthread_mutex_lock(&c->mu);
        if (atomic_fetch_add(&c->done, mine) + mine == c->n) {
            atomic_store_explicit(&c->all_done, 1, memory_order_release);
            pthread_cond_broadcast(&c->done_cv);
        }
        pthread_mutex_unlock(&c->mu);
    }
}

static void pfor_job(void *p)
{
    pfor_ctx *c = p;
    pfor_run(c);
    pfor_release(c);
}

void tp_pool_parallel_for(tp_pool *pool, size_t n, void (*fn)(size_t i, void *arg), void *arg)
{
    if (n == 0)
        return;
    int nthreads = tp_pool_threads(pool);
    pfor_ctx *c = pool && n > 1 ? calloc(1, sizeof *c) : NULL;
    if (!c) {
        for (size_t i = 0; i < n; i++)
            fn(i, arg);
        return;
    }
    c->fn = fn;
    c->arg = arg;
    c->n = n;
    atomic_init(&c->next, 0);
    atomic_init(&c->done, 0);
    atomic_init(&c->all_done, 0);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->done_cv, NULL);
    size_t helpers = (size_t)nthreads < n ? (size_t)nthreads : n - 1;
    atomic_init(&c->refs, (int)helpers + 1);
    for (size_t h = 0; h < helpers; h++)
        tp_pool_submit(pool, pfor_job, c);
    pfor_run(c);
    spin_until_nonzero(&c->all_done);
    pthread_mutex_lock(&c->mu);
    while (atomic_load(&c->done) < c->n)
        pthread_cond_wait(&c->done_cv, &c->mu);
    pthread_mutex_unlock(&c->mu);
    pfor_release(c);
}
