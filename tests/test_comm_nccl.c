/* test_comm_nccl.c - the "nccl" comm backend (runtime/cuda/comm_nccl.cu).
 *
 * Always checked: --comm nccl is refused with a clear error where it cannot
 * work (a build without CUDA; a CUDA build on a machine without a GPU).
 * With one GPU: a world-1 communicator (all-reduce, all-gather, broadcast,
 * barrier on device and host buffers).  With two or more: two forked ranks
 * meeting through the TCP rendezvous (sums, gathers, a broadcast from rank
 * 1), then the watchdog: rank 1 leaves, rank 0's all-reduce must fail
 * within its timeout instead of hanging.
 * All CUDA work happens in forked children (a process must not fork after
 * initialising CUDA).  Without a GPU the collectives never run: the test
 * then says so and exits 77 (skipped), after the error checks. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "runtime.h"
#include "check.h"

static int open_nccl(tp_comm **c, int rank, int world, double timeout, tp_err *err)
{
    tp_launch l = { .rank = rank, .world = world, .local_rank = rank, .source = "test" };
    return tp_comm_open(c, "nccl", &l, timeout, err);
}

#ifndef TP_HAVE_CUDA
int main(void)
{
    tp_comm *c = NULL;
    tp_err err = { "" };
    CHECK(open_nccl(&c, 0, 1, 5, &err) == -1 && c == NULL && strstr(err.msg, "no CUDA"),
          "--comm nccl in a build without CUDA: %s", err.msg);
    if (check_failures)
        return check_finish("test_comm_nccl");
    return check_skip("no CUDA build (checked: --comm nccl is refused with a clear error)");
}
#else

#include "cuda/kernels_cuda.h"

/* Runs fn in a child; returns its exit status (or 99 when it crashed). */
static int in_child(int (*fn)(void *), void *arg)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        int rc = fn(arg);
        fflush(NULL);   /* _exit does not flush stdio */
        _exit(rc);
    }
    int st = 0;
    if (pid < 0 || waitpid(pid, &st, 0) < 0)
        return 99;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 99;
}

/* exit status: 0 no device (and --comm nccl refused properly), 1 bad
 * refusal, 2 + count when devices are there (capped) */
static int probe(void *arg)
{
    int count = 0;
    tp_err err = { "" };
    if (tpc_device_count(&count, &err) || count == 0) {
        tp_comm *c = NULL;
        tp_err e2 = { "" };
        if (open_nccl(&c, 0, 1, 5, &e2) == 0 || c != NULL || !strstr(e2.msg, "cudaGetDeviceCount")) {
            fprintf(stderr, "FAIL: --comm nccl without a GPU: %s\n", e2.msg);
            return 1;
        }
        printf("no GPU: %s; --comm nccl refused: %s\n", count == 0 && !err.msg[0] ? "0 devices" : err.msg,
               e2.msg);
        return 0;
    }
    return 2 + (count > 8 ? 8 : count);
}

static int device_floats(float **d, const float *host, size_t n, tp_err *err)
{
    if (tpc_malloc((void **)d, n * sizeof(float), "test", err))
        return -1;
    return host ? tpc_upload(*d, host, n * sizeof(float), err) : 0;
}

static int single_rank(void *arg)
{
    tp_comm *c = NULL;
    tp_err err = { "" };
    if (open_nccl(&c, 0, 1, 30, &err)) {
        fprintf(stderr, "FAIL: world-1 nccl open: %s\n", err.msg);
        return 1;
    }
    int bad = 0;
    if (!tpc_comm_stream(c) || tpc_comm_device(c) != 0)
        bad++, fprintf(stderr, "FAIL: stream/device accessors\n");
    float host[5] = { 1, 2, 3, 4, 5 }, back[10] = { 0 }, *dev = NULL, *dev2 = NULL;
    if (device_floats(&dev, host, 5, &err) || device_floats(&dev2, NULL, 10, &err) ||
        c->ops->allreduce_sum_f32(c, dev, 5, &err) || c->ops->allgather_f32(c, dev, dev2, 5, &err) ||
        c->ops->broadcast(c, dev, 20, 0, &err) || c->ops->barrier(c, &err) ||
        tpc_download(back, dev2, 5 * sizeof(float), &err)) {
        fprintf(stderr, "FAIL: world-1 collectives on device buffers: %s\n", err.msg);
        return 1;
    }
    if (memcmp(back, host, sizeof host))
        bad++, fprintf(stderr, "FAIL: world-1 all-gather changed the values\n");
    /* host buffers are staged */
    if (c->ops->allreduce_sum_f32(c, host, 5, &err) || c->ops->allgather_f32(c, host, back, 5, &err)) {
        fprintf(stderr, "FAIL: world-1 collectives on host buffers: %s\n", err.msg);
        return 1;
    }
    if (memcmp(back, host, sizeof host) || host[4] != 5)
        bad++, fprintf(stderr, "FAIL: world-1 host collectives changed the values\n");
    if (c->ops->broadcast(c, host, 4, 1, &err) != -1)
        bad++, fprintf(stderr, "FAIL: broadcast from root 1 of world 1 accepted\n");
    tpc_free(dev);
    tpc_free(dev2);
    tp_comm_close(c);
    return bad;
}

typedef struct two_ranks {
    int rank;
    int port;
    bool leave_early;   /* rank 1 exits after setup: the watchdog test */
} two_ranks;

static int two_rank_body(void *arg)
{
    two_ranks *t = arg;
    char port[16];
    snprintf(port, sizeof port, "%d", t->port);
    setenv("MASTER_ADDR", "127.0.0.1", 1);
    setenv("TP_COMM_PORT", port, 1);
    tp_comm *c = NULL;
    tp_err err = { "" };
    if (open_nccl(&c, t->rank, 2, t->leave_early ? 5 : 60, &err)) {
        fprintf(stderr, "FAIL: rank %d: nccl open: %s\n", t->rank, err.msg);
        return 1;
    }
    if (t->leave_early) {
        if (t->rank == 1)
            _exit(0);   /* gone without a word */
        float x[4] = { 1, 2, 3, 4 };
        int rc = c->ops->allreduce_sum_f32(c, x, 4, &err);
        if (rc != -1) {
            fprintf(stderr, "FAIL: all-reduce with a departed peer succeeded\n");
            return 1;
        }
        printf("rank 0 after rank 1 left: %s\n", err.msg);
        tp_comm_abort(c, 1);
        return 0;
    }
    int bad = 0;
    float v[3] = { 1.0f + t->rank, 10.0f * (t->rank + 1), -0.5f }, *dv = NULL, *dall = NULL, all[6];
    if (device_floats(&dv, v, 3, &err) || device_floats(&dall, NULL, 6, &err) ||
        c->ops->allreduce_sum_f32(c, dv, 3, &err) || tpc_download(v, dv, sizeof v, &err) ||
        c->ops->allgather_f32(c, dv, dall, 3, &err) || tpc_download(all, dall, sizeof all, &err)) {
        fprintf(stderr, "FAIL: rank %d: %s\n", t->rank, err.msg);
        return 1;
    }
    if (v[0] != 3 || v[1] != 30 || v[2] != -1)
        bad++, fprintf(stderr, "FAIL: rank %d: all-reduce gave %g %g %g\n", t->rank, v[0], v[1], v[2]);
    if (all[0] != 3 || all[3] != 3 || all[5] != -1)
        bad++, fprintf(stderr, "FAIL: rank %d: all-gather wrong\n", t->rank);
    int32_t token = t->rank == 1 ? 4242 : -1;
    if (c->ops->broadcast(c, &token, sizeof token, 1, &err) || c->ops->barrier(c, &err)) {
        fprintf(stderr, "FAIL: rank %d: %s\n", t->rank, err.msg);
        return 1;
    }
    if (token != 4242)
        bad++, fprintf(stderr, "FAIL: rank %d: broadcast from rank 1 gave %d\n", t->rank, token);
    tpc_free(dv);
    tpc_free(dall);
    tp_comm_close(c);
    return bad;
}

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) || getsockname(fd, (struct sockaddr *)&a, &len))
        return 29611;
    close(fd);
    return ntohs(a.sin_port);
}

/* Both ranks at once, each in its own process. */
static void run_two(bool leave_early)
{
    int port = free_port();
    pid_t pids[2];
    for (int r = 0; r < 2; r++) {
        fflush(NULL);
        pids[r] = fork();
        if (pids[r] == 0) {
            two_ranks t = { r, port, leave_early };
            int rc = two_rank_body(&t);
            fflush(NULL);
            _exit(rc);
        }
    }
    for (int r = 0; r < 2; r++) {
        int st = 0;
        waitpid(pids[r], &st, 0);
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "two ranks%s: rank %d failed",
              leave_early ? " (watchdog)" : "", r);
    }
}

int main(void)
{
    int p = in_child(probe, NULL);
    if (p == 1 || p == 99)
        return 1;
    if (p == 0)
        return check_skip("no GPU (checked only that --comm nccl is refused; no collective ran)");
    int devices = p - 2;
    CHECK(in_child(single_rank, NULL) == 0, "world-1 nccl communicator");
    if (devices >= 2) {
        run_two(false);
        run_two(true);
    } else {
        printf("one GPU: the two-rank checks need two\n");
    }
    return check_finish("test_comm_nccl");
}
#endif
