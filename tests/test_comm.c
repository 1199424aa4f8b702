/* test_comm.c - the communication backends.
 *
 * "single": collectives are identities.  "tcp": 2 and 4 ranks as forked
 * processes on 127.0.0.1 (a free port picked by the kernel): all-reduce,
 * all-gather, broadcast from several roots, barrier, a large all-reduce, and
 * bit-identical sums on every rank.  Failures: a rank that never arrives, a
 * rank that skips a collective, a rank that exits mid-way: the others must
 * fail within the timeout (2 s here) with a message, never hang.
 * tp_launch_detect: the launchers' variables and malformed values. */
#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "runtime.h"
#include "check.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* A port nobody listens on right now. */
static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) || getsockname(fd, (struct sockaddr *)&a, &len)) {
        perror("free_port");
        exit(2);
    }
    close(fd);
    return ntohs(a.sin_port);
}

/* ------------------------------------------------------------ single */

static void test_single(void)
{
    tp_launch l = { .rank = 0, .world = 1, .local_world = 1 };
    tp_comm *c;
    tp_err err = { { 0 } };
    CHECK(tp_comm_open(&c, "auto", &l, 5, &err) == 0, "auto with world 1: %s", err.msg);
    if (!c) return;
    CHECK(!strcmp(c->ops->name, "single"), "auto with world 1 gave %s", c->ops->name);
    float buf[3] = { 1.5f, -2, 3 }, out[3] = { 0 };
    CHECK(c->ops->allreduce_sum_f32(c, buf, 3, &err) == 0 && buf[0] == 1.5f && buf[1] == -2 && buf[2] == 3,
          "single all-reduce must leave the buffer as is");
    CHECK(c->ops->allgather_f32(c, buf, out, 3, &err) == 0 && !memcmp(buf, out, sizeof buf), "single all-gather copies");
    CHECK(c->ops->broadcast(c, buf, sizeof buf, 0, &err) == 0, "single broadcast");
    CHECK(c->ops->broadcast(c, buf, sizeof buf, 1, &err) == -1, "broadcast from root 1 in world 1 must fail");
    CHECK(c->ops->barrier(c, &err) == 0, "single barrier");
    tp_comm_close(c);

    tp_launch two = { .rank = 0, .world = 2, .local_world = 2 };
    CHECK(tp_comm_open(&c, "single", &two, 5, &err) == -1 && strstr(err.msg, "world size is 2"),
          "single with world 2 must fail: %s", err.msg);
    CHECK(tp_comm_open(&c, "bogus", &l, 5, &err) == -1 && strstr(err.msg, "unknown backend"), "bogus: %s", err.msg);
#ifndef TP_HAVE_CUDA
    CHECK(tp_comm_open(&c, "nccl", &l, 5, &err) == -1 && strstr(err.msg, "no CUDA"), "nccl in a CPU build: %s", err.msg);
#endif
}

/* ------------------------------------------------------------ forked ranks */

typedef int (*rank_fn)(int rank, int world, void *arg);

/* Runs fn in `world` forked processes (rank r gets fn(r, ...)); returns the
 * number of ranks that failed.  A hung rank is killed after hard_limit_s and
 * counts as failed, so a hang shows up as a failure, not a stuck test. */
static int run_ranks(int world, int port, rank_fn fn, void *arg, double hard_limit_s, const int *skip)
{
    pid_t pids[16];
    for (int r = 0; r < world; r++) {
        pids[r] = -1;
        if (skip && skip[r]) continue;
        fflush(stderr);
        pid_t p = fork();
        if (p == 0) {
            char ps[16];
            snprintf(ps, sizeof ps, "%d", port);
            setenv("MASTER_ADDR", "127.0.0.1", 1);
            setenv("TP_COMM_PORT", ps, 1);
            check_set_prefix("rank %d: ", r);
            _exit(fn(r, world, arg) ? 1 : 0);
        }
        pids[r] = p;
    }
    int failed = 0;
    double end = now_s() + hard_limit_s;
    for (int r = 0; r < world; r++) {
        if (pids[r] < 0) continue;
        int status = 0;
        for (;;) {
            pid_t w = waitpid(pids[r], &status, WNOHANG);
            if (w == pids[r]) break;
            if (now_s() > end) {
                fprintf(stderr, "rank %d hung: killed\n", r);
                kill(pids[r], SIGKILL);
                waitpid(pids[r], &status, 0);
                status = 1 << 8;
                break;
            }
            usleep(10000);
        }
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failed++;
    }
    return failed;
}

static int open_tcp(tp_comm **c, int rank, int world, double timeout, tp_err *err)
{
    tp_launch l = { .rank = rank, .world = world, .local_world = world };
    return tp_comm_open(c, "tcp", &l, timeout, err);
}

/* CHECK inside a forked rank: its FAIL line starts with "rank N: " (set by
 * run_ranks) and the failure is also counted in the rank's own `bad`, which
 * the rank returns: the parent never sees a child's check counters, only
 * its exit status. */
#define RCHECK(cond, ...)                                                     \
    do {                                                                      \
        int failed_before_ = check_failures;                                  \
        CHECK(cond, __VA_ARGS__);                                             \
        bad += check_failures - failed_before_;                               \
    } while (0)

/* A value that makes the sum depend on the order of additions. */
static float contribution(int rank, size_t i) { return (float)(sin((double)(i * 31 + rank * 7)) * pow(10, (int)(i % 7) - 3)); }

static int collectives_rank(int rank, int world, void *arg)
{
    int bad = 0;
    tp_comm *c;
    tp_err err = { { 0 } };
    if (open_tcp(&c, rank, world, 10, &err)) {
        fprintf(stderr, "rank %d: open: %s\n", rank, err.msg);
        return 1;
    }
    RCHECK(!strcmp(c->ops->name, "tcp") && c->rank == rank && c->world == world, "comm fields");

    /* all-reduce: exact small integers, then an order-sensitive sum */
    float small[5];
    for (int i = 0; i < 5; i++) small[i] = (float)(rank * 10 + i);
    RCHECK(c->ops->allreduce_sum_f32(c, small, 5, &err) == 0, "allreduce: %s", err.msg);
    for (int i = 0; i < 5; i++) {
        float want = 0;
        for (int r = 0; r < world; r++) want += (float)(r * 10 + i);
        RCHECK(small[i] == want, "allreduce[%d] = %g, want %g", i, small[i], want);
    }
    enum { BIG = 1 << 20 };   /* 4 MiB: more than socket buffers hold */
    float *big = malloc(BIG * sizeof *big);
    for (size_t i = 0; i < BIG; i++) big[i] = contribution(rank, i);
    RCHECK(c->ops->allreduce_sum_f32(c, big, BIG, &err) == 0, "big allreduce: %s", err.msg);
    size_t off = 0;
    for (size_t i = 0; i < BIG; i++) {
        float want = contribution(0, i);
        for (int r = 1; r < world; r++) want += contribution(r, i);
        if (big[i] != want) off++;
    }
    RCHECK(off == 0, "big allreduce: %zu of %d values differ from ((b0+b1)+b2)+...", off, BIG);
    /* bit-identical on every rank: broadcast rank 0's copy and compare */
    float *ref = malloc(BIG * sizeof *ref);
    memcpy(ref, big, BIG * sizeof *ref);
    RCHECK(c->ops->broadcast(c, ref, BIG * sizeof *ref, 0, &err) == 0, "broadcast big: %s", err.msg);
    RCHECK(!memcmp(ref, big, BIG * sizeof *ref), "all-reduce results differ between rank 0 and rank %d", rank);

    /* all-gather */
    float part[3] = { (float)rank, (float)rank + 0.5f, -(float)rank }, all[48];
    RCHECK(c->ops->allgather_f32(c, part, all, 3, &err) == 0, "allgather: %s", err.msg);
    for (int r = 0; r < world; r++)
        RCHECK(all[r * 3] == r && all[r * 3 + 1] == r + 0.5f && all[r * 3 + 2] == -r, "allgather part %d", r);
    /* in place: the send buffer is this rank's slot of recv */
    for (int r = 0; r < world; r++) all[r] = r == rank ? 100.0f + rank : -1;
    RCHECK(c->ops->allgather_f32(c, all + rank, all, 1, &err) == 0, "allgather in place: %s", err.msg);
    for (int r = 0; r < world; r++) RCHECK(all[r] == 100.0f + r, "allgather in place part %d = %g", r, all[r]);

    /* broadcast from every root */
    for (int root = 0; root < world; root++) {
        char msg[32];
        if (rank == root) snprintf(msg, sizeof msg, "hello from %d", root);
        else memset(msg, 'x', sizeof msg);
        RCHECK(c->ops->broadcast(c, msg, sizeof msg, root, &err) == 0, "broadcast root %d: %s", root, err.msg);
        char want[32];
        snprintf(want, sizeof want, "hello from %d", root);
        RCHECK(!strcmp(msg, want), "broadcast root %d gave '%.31s'", root, msg);
    }
    RCHECK(c->ops->broadcast(c, small, 4, world, &err) == -1, "broadcast from a root outside the world must fail");
    for (int i = 0; i < 3; i++) RCHECK(c->ops->barrier(c, &err) == 0, "barrier: %s", err.msg);
    tp_comm_close(c);
    free(big);
    free(ref);
    return bad;
}

static void test_tcp_collectives(int world)
{
    int port = free_port();
    int failed = run_ranks(world, port, collectives_rank, NULL, 60, NULL);
    CHECK(failed == 0, "tcp collectives with %d ranks: %d ranks failed", world, failed);
}

/* --------------------------------------------------------- failure modes */

typedef struct expect_fail {
    const char *want;         /* substring of the error */
    int behaviour;            /* see the rank functions */
} expect_fail;

/* The ranks that are started wait for one that never comes. */
static int never_arrives_rank(int rank, int world, void *arg)
{
    const expect_fail *e = arg;
    tp_comm *c = NULL;
    tp_err err = { { 0 } };
    double t0 = now_s();
    int rc = open_tcp(&c, rank, world, 2, &err);
    double took = now_s() - t0;
    int bad = 0;
    RCHECK(rc == -1, "open must fail when a rank never arrives");
    RCHECK(strstr(err.msg, e->want) != NULL, "message '%s' lacks '%s'", err.msg, e->want);
    RCHECK(took >= 1.5 && took < 4, "gave up after %.2f s, the timeout is 2 s", took);
    if (rc == 0) tp_comm_close(c);
    return bad;
}

static void test_never_arrives(void)
{
    int skip_last[2] = { 0, 1 };
    expect_fail e = { "timed out after 2 s (rank 1 never connected", 0 };
    CHECK(run_ranks(2, free_port(), never_arrives_rank, &e, 10, skip_last) == 0, "rank 0 alone must time out");
    int skip_root[3] = { 1, 0, 0 };
    expect_fail e2 = { "could not reach rank 0 at 127.0.0.1:", 0 };
    CHECK(run_ranks(3, free_port(), never_arrives_rank, &e2, 10, skip_root) == 0, "ranks without rank 0 must time out");
}

/* All connect; the last rank then never joins the all-reduce (it sleeps). */
static int skips_collective_rank(int rank, int world, void *arg)
{
    tp_comm *c;
    tp_err err = { { 0 } };
    int bad = 0;
    if (open_tcp(&c, rank, world, 2, &err)) {
        fprintf(stderr, "rank %d: open: %s\n", rank, err.msg);
        return 1;
    }
    if (rank == world - 1) {
        sleep(4);
        tp_comm_close(c);
        return 0;
    }
    float buf[4] = { 1, 2, 3, 4 };
    double t0 = now_s();
    int rc = c->ops->allreduce_sum_f32(c, buf, 4, &err);
    double took = now_s() - t0;
    RCHECK(rc == -1, "all-reduce must fail when a rank never joins");
    /* Rank 0 waits for the sleeper and times out.  The other ranks wait for
     * rank 0, whose deadline expires at about the same moment: they either
     * time out themselves or see rank 0 give up and close first. */
    bool timed_out = strstr(err.msg, "all-reduce timed out after 2 s waiting for the other ranks") != NULL;
    bool saw_root_close = rank != 0 && strstr(err.msg, "rank 0 closed its connection") != NULL;
    RCHECK(timed_out || saw_root_close, "message: %s", err.msg);
    char who[64];
    snprintf(who, sizeof who, "rank %d: ", rank);
    RCHECK(strncmp(err.msg, who, strlen(who)) == 0, "message must start with '%s': %s", who, err.msg);
    RCHECK(took >= 1.5 && took < 3.5, "gave up after %.2f s, the timeout is 2 s", took);
    tp_comm_close(c);
    return bad;
}

/* All connect and do one all-reduce; then `victim` exits and the others
 * must get an error naming it at once (no waiting for the timeout). */
static int exits_midway_rank(int rank, int world, void *arg)
{
    int victim = *(const int *)arg;
    tp_comm *c;
    tp_err err = { { 0 } };
    int bad = 0;
    if (open_tcp(&c, rank, world, 30, &err)) {
        fprintf(stderr, "rank %d: open: %s\n", rank, err.msg);
        return 1;
    }
    float buf[4] = { 1, 2, 3, 4 };
    RCHECK(c->ops->allreduce_sum_f32(c, buf, 4, &err) == 0, "first all-reduce: %s", err.msg);
    if (rank == victim)
        _exit(0);   /* gone without a word, as a crash would be */
    double t0 = now_s();
    int rc = c->ops->allreduce_sum_f32(c, buf, 4, &err);
    double took = now_s() - t0;
    RCHECK(rc == -1, "all-reduce must fail after rank %d exited", victim);
    /* Rank 0 sees the victim's socket close; when rank 0 is the victim the
     * others see rank 0's; when another rank dies, rank 0 fails and closes,
     * so the rest see rank 0 close. */
    char want[64];
    snprintf(want, sizeof want, "rank %d closed its connection", rank == 0 ? victim : 0);
    RCHECK(strstr(err.msg, want) != NULL, "message '%s' lacks '%s'", err.msg, want);
    RCHECK(took < 5, "took %.2f s to notice (the timeout is 30 s)", took);
    tp_comm_close(c);
    return bad;
}

static void test_failures(void)
{
    test_never_arrives();
    CHECK(run_ranks(3, free_port(), skips_collective_rank, NULL, 15, NULL) == 0,
          "a rank that skips a collective: the others must time out in 2 s");
    int victim = 1;
    CHECK(run_ranks(2, free_port(), exits_midway_rank, &victim, 20, NULL) == 0, "rank 1 exits mid-way (2 ranks)");
    victim = 0;
    CHECK(run_ranks(3, free_port(), exits_midway_rank, &victim, 20, NULL) == 0, "rank 0 exits mid-way (3 ranks)");
    victim = 2;
    CHECK(run_ranks(4, free_port(), exits_midway_rank, &victim, 20, NULL) == 0, "rank 2 exits mid-way (4 ranks)");
}

/* A port already taken: rank 0 says so instead of waiting. */
static void test_port_in_use(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof a;
    bind(fd, (struct sockaddr *)&a, sizeof a);
    listen(fd, 1);
    getsockname(fd, (struct sockaddr *)&a, &len);
    char ps[16];
    snprintf(ps, sizeof ps, "%d", ntohs(a.sin_port));
    setenv("MASTER_ADDR", "127.0.0.1", 1);
    setenv("TP_COMM_PORT", ps, 1);
    tp_comm *c;
    tp_err err = { { 0 } };
    CHECK(open_tcp(&c, 0, 2, 2, &err) == -1 && strstr(err.msg, "cannot listen on 127.0.0.1:") &&
          strstr(err.msg, "Address already in use"), "port in use: %s", err.msg);
    setenv("TP_COMM_PORT", "http", 1);
    CHECK(open_tcp(&c, 0, 2, 2, &err) == -1 && strstr(err.msg, "TP_COMM_PORT=http is not a TCP port"), "bad port: %s", err.msg);
    unsetenv("TP_COMM_PORT");
    unsetenv("MASTER_ADDR");
    close(fd);
}

/* ----------------------------------------------------------- launch */

static const char *launch_vars[] = { "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_RANK", "PMI_SIZE",
    "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", NULL };

static void clear_launch_env(void)
{
    for (int i = 0; launch_vars[i]; i++) unsetenv(launch_vars[i]);
}

static void test_launch(void)
{
    tp_launch l;
    tp_err err = { { 0 } };
    clear_launch_env();
    CHECK(tp_launch_detect(&l, -1, &err) == 0 && l.rank == 0 && l.world == 1 && !l.under_mpirun, "no launcher");
    CHECK(tp_launch_detect(&l, 1, &err) == 0 && l.rank == 1 && l.world == 0 && !strcmp(l.source, "--rank"),
          "--rank alone leaves the world size to the manifest");

    setenv("RANK", "1", 1); setenv("WORLD_SIZE", "2", 1); setenv("LOCAL_RANK", "1", 1); setenv("LOCAL_WORLD_SIZE", "2", 1);
    CHECK(tp_launch_detect(&l, -1, &err) == 0 && l.rank == 1 && l.world == 2 && l.local_rank == 1 &&
          l.local_world == 2 && !strcmp(l.source, "RANK") && !strcmp(l.world_source, "WORLD_SIZE") && !l.under_mpirun,
          "torchrun variables");
    CHECK(tp_launch_detect(&l, 1, &err) == 0 && l.rank == 1 && l.world == 2, "--rank agreeing with RANK");
    CHECK(tp_launch_detect(&l, 0, &err) == -1 && strstr(err.msg, "--rank 0 contradicts RANK=1"), "contradiction: %s", err.msg);
    setenv("WORLD_SIZE", "two", 1);
    CHECK(tp_launch_detect(&l, -1, &err) == -1 && strstr(err.msg, "WORLD_SIZE=two is not"), "malformed: %s", err.msg);
    setenv("WORLD_SIZE", "1", 1);
    CHECK(tp_launch_detect(&l, -1, &err) == -1 && strstr(err.msg, "RANK=1 is not below WORLD_SIZE=1"), "rank >= world: %s", err.msg);
    unsetenv("WORLD_SIZE");
    CHECK(tp_launch_detect(&l, -1, &err) == -1 && strstr(err.msg, "RANK is set but WORLD_SIZE is not"), "missing size: %s", err.msg);
    setenv("RANK", "-3", 1);
    CHECK(tp_launch_detect(&l, -1, &err) == -1 && strstr(err.msg, "RANK=-3"), "negative: %s", err.msg);
    clear_launch_env();

    setenv("OMPI_COMM_WORLD_RANK", "3", 1); setenv("OMPI_COMM_WORLD_SIZE", "4", 1);
    setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1", 1); setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2", 1);
    CHECK(tp_launch_detect(&l, -1, &err) == 0 && l.rank == 3 && l.world == 4 && l.local_rank == 1 && l.local_world == 2 &&
          l.under_mpirun && !strcmp(l.world_source, "OMPI_COMM_WORLD_SIZE"), "mpirun variables");
    clear_launch_env();
    setenv("PMI_RANK", "0", 1); setenv("PMI_SIZE", "2", 1);
    CHECK(tp_launch_detect(&l, -1, &err) == 0 && l.rank == 0 && l.world == 2 && l.under_mpirun &&
          l.local_world == 2, "PMI variables (local size unknown: all ranks assumed local)");
    clear_launch_env();
    setenv("SLURM_PROCID", "5", 1); setenv("SLURM_NTASKS", "8", 1); setenv("SLURM_LOCALID", "1", 1);
    setenv("SLURM_NTASKS_PER_NODE", "4", 1);
    CHECK(tp_launch_detect(&l, -1, &err) == 0 && l.rank == 5 && l.world == 8 && l.local_rank == 1 && l.local_world == 4 &&
          !l.under_mpirun && !strcmp(l.source, "SLURM_PROCID"), "srun variables");
    setenv("SLURM_LOCALID", "x1", 1);
    CHECK(tp_launch_detect(&l, -1, &err) == -1 && strstr(err.msg, "SLURM_LOCALID=x1"), "malformed local id: %s", err.msg);
    clear_launch_env();
}

/* --------------------------------------------------- joining the right peers */

#define ID_A "0123456789abcdef0123456789abcdef"
#define ID_B "fedcba9876543210fedcba9876543210"
#define WANT_MIXED "rank 1 loaded conversion " ID_B ", rank 0 " ID_A ": every rank must load the same conversion"

/* Rank 1 of 3 loaded another conversion: the tcp hello says so, and every
 * rank (the refused one, rank 0, and rank 2 if it joined first) fails with
 * that one message, within the timeout. */
static int mixed_conversions_rank(int rank, int world, void *arg)
{
    tp_launch l = { .rank = rank, .world = world, .local_world = world, .conversion_id = rank == 1 ? ID_B : ID_A };
    tp_comm *c = NULL;
    tp_err err = { { 0 } };
    int bad = 0;
    int rc = tp_comm_open(&c, "tcp", &l, 5, &err);
    RCHECK(rc == -1, "joining ranks of two conversions must fail");
    if (rank != 2) /* rank 2 may connect after rank 0 gave up: it then times out */
        RCHECK(strstr(err.msg, WANT_MIXED) != NULL, "message '%s' lacks '%s'", err.msg, WANT_MIXED);
    if (rc == 0) tp_comm_close(c);
    return bad;
}

/* Rank 1 thinks the world has 3 ranks, rank 0 has 2: rank 0 refuses that
 * peer with a message, and the peer gets the same message. */
static int wrong_world_rank(int rank, int world, void *arg)
{
    tp_launch l = { .rank = rank, .world = rank == 0 ? 2 : 3, .local_world = 2, .conversion_id = ID_A };
    tp_comm *c = NULL;
    tp_err err = { { 0 } };
    int bad = 0;
    int rc = tp_comm_open(&c, "tcp", &l, 5, &err);
    const char *want = "as rank 1 of world size 3, but this job has world size 2: refused";
    RCHECK(rc == -1, "a peer with another world size must be refused");
    RCHECK(strstr(err.msg, want) != NULL, "message '%s' lacks '%s'", err.msg, want);
    if (rank == 1)
        RCHECK(strstr(err.msg, "rank 1 was refused by rank 0 at 127.0.0.1:") != NULL, "peer's message: %s", err.msg);
    if (rc == 0) tp_comm_close(c);
    return bad;
}

/* The backend-independent check, over an open comm (the hello let the
 * ranks in: no id was given there): every rank fails alike. */
static int check_peers_rank(int rank, int world, void *arg)
{
    const bool *mixed = arg;
    tp_comm *c = NULL;
    tp_err err = { { 0 } };
    int bad = 0;
    if (open_tcp(&c, rank, world, 5, &err)) {
        fprintf(stderr, "rank %d: open: %s\n", rank, err.msg);
        return 1;
    }
    const char *id = *mixed && rank == 1 ? ID_B : ID_A;
    int rc = tp_comm_check_peers(c, id, &err);
    if (*mixed) {
        RCHECK(rc == -1, "check_peers must fail");
        RCHECK(strstr(err.msg, WANT_MIXED) != NULL, "message '%s' lacks '%s'", err.msg, WANT_MIXED);
    } else {
        RCHECK(rc == 0, "check_peers of one conversion: %s", err.msg);
        float x = 1.0f;
        RCHECK(c->ops->allreduce_sum_f32(c, &x, 1, &err) == 0 && x == (float)world, "all-reduce after the check");
    }
    tp_comm_close(c);
    return bad;
}

static void test_peers(void)
{
    CHECK(run_ranks(2, free_port(), mixed_conversions_rank, NULL, 15, NULL) == 0, "tcp hello, two conversions, 2 ranks");
    int skip_2[3] = { 0, 0, 1 };
    CHECK(run_ranks(3, free_port(), mixed_conversions_rank, NULL, 15, skip_2) == 0,
          "tcp hello, two conversions, rank 2 absent");
    CHECK(run_ranks(2, free_port(), wrong_world_rank, NULL, 15, NULL) == 0, "tcp hello, wrong world size");
    bool mixed = true, same = false;
    CHECK(run_ranks(3, free_port(), check_peers_rank, &mixed, 15, NULL) == 0, "tp_comm_check_peers, two conversions");
    CHECK(run_ranks(3, free_port(), check_peers_rank, &same, 15, NULL) == 0, "tp_comm_check_peers, one conversion");
    /* One rank: nothing to compare. */
    tp_launch one = { .rank = 0, .world = 1, .local_world = 1, .conversion_id = ID_A };
    tp_comm *c = NULL;
    tp_err err = { { 0 } };
    CHECK(tp_comm_open(&c, "single", &one, 5, &err) == 0, "single with an id: %s", err.msg);
    tp_comm_close(c);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    test_launch();
    test_single();
    test_tcp_collectives(2);
    test_tcp_collectives(4);
    test_port_in_use();
    test_failures();
    test_peers();
    return check_finish("test_comm");
}
