/* comm.c - tp_comm_open's backend choice and the "single" backend.
 *
 * With one rank every collective is the identity: all-reduce leaves the
 * buffer as is, all-gather copies, broadcast and barrier do nothing. */
#include <stdlib.h>
#include <string.h>

#include "comm_internal.h"

static int single_allreduce(tp_comm *c, float *buf, size_t n, tp_err *err) { return 0; }

static int single_allgather(tp_comm *c, const float *send, float *recv, size_t n_per_rank, tp_err *err)
{
    if (recv != send)
        memmove(recv, send, n_per_rank * sizeof(float));
    return 0;
}

static int single_broadcast(tp_comm *c, void *buf, size_t bytes, int root, tp_err *err)
{
    if (root != 0)
        return tp_errorf(err, "broadcast: root %d does not exist (world size 1)", root);
    return 0;
}

static int single_barrier(tp_comm *c, tp_err *err) { return 0; }
static void single_close(tp_comm *c) { (void)c; }

static const tp_comm_ops single_ops = {
    .name = "single",
    .allreduce_sum_f32 = single_allreduce,
    .allgather_f32 = single_allgather,
    .broadcast = single_broadcast,
    .barrier = single_barrier,
    .close = single_close,
};

int tp_comm_timeout_error(const tp_comm *c, const char *op, int waiting_for, tp_err *err)
{
    if (waiting_for < 0)
        return tp_errorf(err, "rank %d: %s timed out after %g s waiting for the other ranks "
                         "(a rank died or never started?)", c->rank, op, c->timeout_s);
    return tp_errorf(err, "rank %d: %s timed out after %g s waiting for the other ranks "
                     "(rank %d did not answer: a rank died or never started?)",
                     c->rank, op, c->timeout_s, waiting_for);
}

/* "auto": several ranks talk MPI when mpirun started them (and MPI is built
 * in), our TCP backend otherwise; one rank needs nothing. */
static const char *resolve_auto(const tp_launch *l)
{
    if (l->world <= 1)
        return "single";
#ifdef TP_HAVE_MPI
    if (l->under_mpirun)
        return "mpi";
#endif
    return "tcp";
}

int tp_comm_open(tp_comm **out, const char *backend, const tp_launch *l, double timeout_s, tp_err *err)
{
    *out = NULL;
    if (!backend || !strcmp(backend, "auto"))
        backend = resolve_auto(l);
    if (l->world < 1 || l->rank < 0 || l->rank >= l->world)
        return tp_errorf(err, "--comm %s: rank %d is not inside world size %d", backend, l->rank, l->world);

    tp_comm *c = calloc(1, sizeof *c);
    if (!c)
        return tp_errorf(err, "out of memory");
    c->rank = l->rank;
    c->world = l->world;
    c->timeout_s = timeout_s;

    int rc = 0;
    if (!strcmp(backend, "single")) {
        if (l->world != 1) {
            rc = tp_errorf(err, "--comm single: the world size is %d; single runs one rank only "
                           "(use --comm tcp or mpi)", l->world);
        } else {
            c->ops = &single_ops;
        }
    } else if (!strcmp(backend, "tcp")) {
        rc = tp_comm_tcp_open(c, l->conversion_id, err);
    } else if (!strcmp(backend, "mpi")) {
#ifdef TP_HAVE_MPI
        rc = tp_comm_mpi_open(c, err);
#else
        rc = tp_errorf(err, "--comm mpi: this build has no MPI (install Open MPI's mpicc and rebuild, "
                       "or use --comm tcp)");
#endif
    } else if (!strcmp(backend, "nccl")) {
#ifdef TP_HAVE_CUDA
        rc = tp_comm_nccl_open(c, l, err);
#else
        rc = tp_errorf(err, "--comm nccl: this build has no CUDA (rebuild where nvcc is found, "
                       "or use --comm tcp or mpi)");
#endif
    } else {
        rc = tp_errorf(err, "--comm %s: unknown backend (auto, single, tcp, mpi, nccl)", backend);
    }
    if (rc) {
        free(c);
        return -1;
    }
    if (l->conversion_id && tp_comm_check_peers(c, l->conversion_id, err)) {
        tp_comm_close(c);
        return -1;
    }
    *out = c;
    return 0;
}

/* ------------------------------------------------------------ peer check */

/* What each rank contributes: its world size, then its conversion id, one
 * character per float (exact in a float; 0 for no id). */
#define PEER_ID_CHARS 32
#define PEER_FLOATS (1 + PEER_ID_CHARS)

static void peer_record(const tp_comm *c, const char *conversion_id, float *rec)
{
    rec[0] = (float)c->world;
    size_t n = conversion_id ? strnlen(conversion_id, PEER_ID_CHARS) : 0;
    for (size_t i = 0; i < PEER_ID_CHARS; i++)
        rec[1 + i] = i < n ? (float)(unsigned char)conversion_id[i] : 0.0f;
}

static void peer_id_text(const float *rec, char out[PEER_ID_CHARS + 1])
{
    size_t n = 0;
    for (; n < PEER_ID_CHARS && rec[1 + n] > 0 && rec[1 + n] < 256; n++)
        out[n] = (char)(int)rec[1 + n];
    out[n] = 0;
    if (n == 0)
        snprintf(out, PEER_ID_CHARS + 1, "(none)");
}

int tp_comm_check_peers(tp_comm *c, const char *conversion_id, tp_err *err)
{
    if (c->world <= 1)
        return 0;
    float *all = calloc((size_t)c->world * PEER_FLOATS, sizeof *all);
    float mine[PEER_FLOATS];
    if (!all)
        return tp_errorf(err, "rank %d: out of memory", c->rank);
    peer_record(c, conversion_id, mine);
    if (c->ops->allgather_f32(c, mine, all, PEER_FLOATS, err)) {
        free(all);
        return tp_err_prefix(err, "rank %d: checking that every rank loaded the same conversion", c->rank);
    }
    int rc = 0;
    const float *root = all;
    for (int r = 1; r < c->world && rc == 0; r++) {
        const float *rec = all + (size_t)r * PEER_FLOATS;
        char id_r[PEER_ID_CHARS + 1], id_0[PEER_ID_CHARS + 1];
        if (rec[0] != root[0])
            rc = tp_errorf(err, "rank %d runs with world size %g, rank 0 with %g: every rank must run the same "
                           "world size", r, rec[0], root[0]);
        else if (memcmp(rec + 1, root + 1, PEER_ID_CHARS * sizeof *rec) != 0) {
            peer_id_text(rec, id_r);
            peer_id_text(root, id_0);
            rc = tp_errorf(err, "rank %d loaded conversion %s, rank 0 %s: every rank must load the same conversion",
                           r, id_r, id_0);
        }
    }
    free(all);
    return rc;
}

void tp_comm_close(tp_comm *c)
{
    if (!c)
        return;
    if (c->ops && c->ops->close)
        c->ops->close(c);
    free(c);
}

void tp_comm_abort(tp_comm *c, int code)
{
    if (!c)
        return;
#ifdef TP_HAVE_MPI
    if (c->ops == &tp_comm_mpi_ops)
        tp_comm_mpi_abort(c, code);   /* does not return */
#endif
#ifdef TP_HAVE_CUDA
    if (c->ops == &tp_comm_nccl_ops)
        tp_comm_nccl_abort(c, code);  /* ncclCommAbort; MPI_Abort under mpirun */
#endif
    tp_comm_close(c);
}
