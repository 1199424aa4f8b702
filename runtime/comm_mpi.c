/* comm_mpi.c - the "mpi" backend (Open MPI), compiled only with TP_HAVE_MPI.
 *
 * Every collective is the non-blocking MPI variant polled with MPI_Test
 * against a deadline: a rank that never arrives gives a timeout error (and
 * tprun then calls MPI_Abort) instead of a hang.  A rank that dies makes
 * mpirun end the job.
 *
 * All-reduce is a reduce to rank 0 followed by a broadcast: the sum is made
 * in one place, so every rank ends with the same bits whatever algorithm
 * Open MPI picks for the reduction. */
#ifdef TP_HAVE_MPI
#include <limits.h>
#include <mpi.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "comm_internal.h"

typedef struct mpi_impl {
    bool we_initialized;   /* MPI_Finalize only what we started */
    bool failed;           /* after a timeout the job can only be aborted */
} mpi_impl;

/* Largest element count per MPI call (counts are int). */
#define MPI_PIECE ((size_t)INT_MAX / 2)

static int mpi_error(tp_comm *c, const char *op, int code, tp_err *err)
{
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(code, msg, &len);
    ((mpi_impl *)c->impl)->failed = true;
    return tp_errorf(err, "rank %d: %s: %s", c->rank, op, msg);
}

/* Polls one request until it completes or the deadline passes.  Spins for a
 * short while (collectives in decode are microseconds), then sleeps a little
 * between tests so that a long wait does not burn a core. */
static int wait_request(tp_comm *c, MPI_Request *req, const char *op, tp_err *err)
{
    double start = MPI_Wtime();
    for (long polls = 0;; polls++) {
        int done = 0;
        int rc = MPI_Test(req, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS)
            return mpi_error(c, op, rc, err);
        if (done)
            return 0;
        double waited = MPI_Wtime() - start;
        if (c->timeout_s > 0 && waited > c->timeout_s) {
            ((mpi_impl *)c->impl)->failed = true;
            return tp_comm_timeout_error(c, op, -1, err);
        }
        if (waited > 0.002) {
            struct timespec pause = { 0, 50 * 1000 };
            nanosleep(&pause, NULL);
        }
    }
}

static int mpi_allreduce(tp_comm *c, float *buf, size_t n, tp_err *err)
{
    for (size_t off = 0; off < n; off += MPI_PIECE) {
        int count = (int)(n - off < MPI_PIECE ? n - off : MPI_PIECE);
        MPI_Request req;
        void *send = c->rank == 0 ? MPI_IN_PLACE : (void *)(buf + off);
        int rc = MPI_Ireduce(send, buf + off, count, MPI_FLOAT, MPI_SUM, 0, MPI_COMM_WORLD, &req);
        if (rc != MPI_SUCCESS)
            return mpi_error(c, "all-reduce", rc, err);
        if (wait_request(c, &req, "all-reduce", err))
            return -1;
        rc = MPI_Ibcast(buf + off, count, MPI_FLOAT, 0, MPI_COMM_WORLD, &req);
        if (rc != MPI_SUCCESS)
            return mpi_error(c, "all-reduce", rc, err);
        if (wait_request(c, &req, "all-reduce", err))
            return -1;
    }
    return 0;
}

static int mpi_allgather(tp_comm *c, const float *send, float *recv, size_t n_per_rank, tp_err *err)
{
    if (n_per_rank > MPI_PIECE)
        return tp_errorf(err, "rank %d: all-gather of %zu floats per rank is more than MPI takes in one call",
                         c->rank, n_per_rank);
    const void *src = send == recv + (size_t)c->rank * n_per_rank ? MPI_IN_PLACE : (const void *)send;
    MPI_Request req;
    int rc = MPI_Iallgather(src, (int)n_per_rank, MPI_FLOAT, recv, (int)n_per_rank, MPI_FLOAT,
                            MPI_COMM_WORLD, &req);
    if (rc != MPI_SUCCESS)
        return mpi_error(c, "all-gather", rc, err);
    return wait_request(c, &req, "all-gather", err);
}

static int mpi_broadcast(tp_comm *c, void *buf, size_t bytes, int root, tp_err *err)
{
    if (root < 0 || root >= c->world)
        return tp_errorf(err, "rank %d: broadcast: root %d is not a rank of world size %d", c->rank, root, c->world);
    for (size_t off = 0; off < bytes; off += MPI_PIECE) {
        int count = (int)(bytes - off < MPI_PIECE ? bytes - off : MPI_PIECE);
        MPI_Request req;
        int rc = MPI_Ibcast((char *)buf + off, count, MPI_BYTE, root, MPI_COMM_WORLD, &req);
        if (rc != MPI_SUCCESS)
            return mpi_error(c, "broadcast", rc, err);
        if (wait_request(c, &req, "broadcast", err))
            return -1;
    }
    return 0;
}

static int mpi_barrier(tp_comm *c, tp_err *err)
{
    MPI_Request req;
    int rc = MPI_Ibarrier(MPI_COMM_WORLD, &req);
    if (rc != MPI_SUCCESS)
        return mpi_error(c, "barrier", rc, err);
    return wait_request(c, &req, "barrier", err);
}

static void mpi_close(tp_comm *c)
{
    mpi_impl *m = c->impl;
    if (!m)
        return;
    if (m->failed)
        MPI_Abort(MPI_COMM_WORLD, 1);   /* a peer is stuck or gone: Finalize would hang */
    if (m->we_initialized) {
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (!finalized)
            MPI_Finalize();
    }
    free(m);
    c->impl = NULL;
}

void tp_comm_mpi_abort(tp_comm *c, int code)
{
    MPI_Abort(MPI_COMM_WORLD, code ? code : 1);
    exit(code ? code : 1);   /* MPI_Abort does not return; this keeps the compiler sure of it */
}

const tp_comm_ops tp_comm_mpi_ops = {
    .name = "mpi",
    .allreduce_sum_f32 = mpi_allreduce,
    .allgather_f32 = mpi_allgather,
    .broadcast = mpi_broadcast,
    .barrier = mpi_barrier,
    .close = mpi_close,
};

int tp_comm_mpi_open(tp_comm *c, tp_err *err)
{
    mpi_impl *m = calloc(1, sizeof *m);
    if (!m)
        return tp_errorf(err, "out of memory");
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
        int provided = 0;
        /* Only the main thread calls MPI; compute threads never do. */
        if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
            free(m);
            return tp_errorf(err, "--comm mpi: MPI_Init_thread failed");
        }
        m->we_initialized = true;
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    int rank = -1, size = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    c->impl = m;
    c->ops = &tp_comm_mpi_ops;
    if (rank != c->rank || size != c->world) {
        tp_errorf(err, "--comm mpi: MPI says rank %d of %d but the launch environment says rank %d of %d",
                  rank, size, c->rank, c->world);
        mpi_close(c);
        c->ops = NULL;
        return -1;
    }
    return 0;
}
#endif
