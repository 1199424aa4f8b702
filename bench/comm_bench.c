/* comm_bench.c - all-reduce latency of our CPU backends (make bench-comm).
 *
 *   comm_bench BACKEND WORLD N ITERS PORT
 *
 * Forks WORLD ranks on 127.0.0.1 joined by BACKEND ("tcp"), each
 * all-reducing N floats ITERS times after a few warm-up rounds, and prints
 * one line from rank 0: "ours tcp world=W n=N min_us=.. median_us=..".
 * Each iteration starts with a barrier-free all-reduce, the way the model
 * calls it after o_proj and down_proj. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "runtime.h"

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int run_rank(const char *backend, int rank, int world, size_t n, int iters)
{
    tp_launch l = { .rank = rank, .world = world, .local_world = world };
    tp_comm *c;
    tp_err err = { { 0 } };
    if (tp_comm_open(&c, backend, &l, 60, &err)) {
        fprintf(stderr, "rank %d: %s\n", rank, err.msg);
        return 1;
    }
    float *buf = malloc(n * sizeof *buf);
    double *t = malloc((size_t)iters * sizeof *t);
    for (size_t i = 0; i < n; i++) buf[i] = (float)(rank + 1) * 1e-3f;
    for (int it = -5; it < iters; it++) {
        double t0 = tp_now();
        if (c->ops->allreduce_sum_f32(c, buf, n, &err)) {
            fprintf(stderr, "rank %d: %s\n", rank, err.msg);
            return 1;
        }
        if (it >= 0) t[it] = tp_now() - t0;
    }
    if (rank == 0) {
        qsort(t, (size_t)iters, sizeof *t, cmp_double);
        printf("ours %s world=%d n=%zu min_us=%.1f median_us=%.1f\n", backend, world, n, t[0] * 1e6,
               t[iters / 2] * 1e6);
    }
    tp_comm_close(c);
    free(buf);
    free(t);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: comm_bench BACKEND WORLD N ITERS PORT\n");
        return 2;
    }
    const char *backend = argv[1];
    int world = atoi(argv[2]), iters = atoi(argv[4]);
    size_t n = (size_t)atol(argv[3]);
    if (world < 2 || world > 16 || n == 0 || iters < 1) {
        fprintf(stderr, "comm_bench: bad arguments\n");
        return 2;
    }
    setenv("MASTER_ADDR", "127.0.0.1", 1);
    setenv("TP_COMM_PORT", argv[5], 1);
    fflush(stdout);
    pid_t pids[16];
    for (int r = 0; r < world; r++) {
        pids[r] = fork();
        if (pids[r] == 0) {
            int rc = run_rank(backend, r, world, n, iters);
            fflush(stdout); /* _exit does not flush */
            _exit(rc);
        }
    }
    int failed = 0;
    for (int r = 0; r < world; r++) {
        int st;
        waitpid(pids[r], &st, 0);
        failed += !(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    return failed ? 1 : 0;
}
