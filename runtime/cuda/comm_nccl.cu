/* comm_nccl.cu - the "nccl" communication backend (CUDA builds only).
 *
 * Setup: the device is LOCAL_RANK's (TP_CUDA_DEVICE overrides it; with one
 * visible device, as under a per-rank CUDA_VISIBLE_DEVICES, device 0).
 * Rank 0 makes the NCCL unique id and hands it to the other ranks over a
 * bootstrap comm opened with tp_comm_open("auto"): MPI when mpirun started
 * the job (TP_HAVE_MPI builds), else the TCP backend's rendezvous at
 * MASTER_ADDR:MASTER_PORT.  The bootstrap comm stays open until close, so
 * that tp_comm_abort can still end an mpirun job with MPI_Abort.
 *
 * Collectives run on this comm's own stream (tpc_comm_stream: the model
 * enqueues its kernels there too).  Buffers are device pointers; host
 * pointers are accepted as well and staged through a device buffer (tp_generate
 * broadcasts a host token id).  Each call returns when the collective has
 * finished, after a watchdog loop: the communicator is non-blocking, and the
 * loop polls ncclCommGetAsyncError and cudaStreamQuery until done, a failure
 * or timeout_s; on a failure or timeout it calls ncclCommAbort (so that no
 * kernel stays stuck waiting for a dead peer) and reports the rank.
 * Enqueue-only mode (tpc_comm_set_enqueue_only, which the CUDA model turns
 * on): collectives on device buffers return once NCCL has put them on the
 * stream, so that the host keeps launching (and a CUDA graph can capture
 * them); the same watchdog then runs in tpc_comm_wait.  NCCL's
 * ring and tree algorithms compute each reduced element once and copy it, so
 * every rank gets the same bits, as the interface promises.
 */
#include <cuda_runtime.h>
#include <nccl.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern "C" {
#include "comm_internal.h"
}
#include "kernels_cuda.h"

typedef struct nccl_impl {
    ncclComm_t comm;
    cudaStream_t stream;
    int device;
    bool broken;          /* aborted after an error: every later call fails */
    tp_comm *boot;        /* the comm that carried the unique id */
    void *stage;          /* device staging buffer for host pointers */
    size_t stage_bytes;
    bool enqueue_only;    /* device-buffer collectives do not wait for the stream */
} nccl_impl;

/* Stops the communicator after an error or a timeout: pending NCCL kernels
 * are cancelled instead of spinning forever on a peer that is gone. */
static void abort_comm(nccl_impl *m)
{
    if (m->comm && !m->broken)
        ncclCommAbort(m->comm);
    m->broken = true;
}

static int nccl_fail(tp_comm *c, const char *op, ncclResult_t r, tp_err *err)
{
    nccl_impl *m = (nccl_impl *)c->impl;
    const char *detail = m->comm ? ncclGetLastError(m->comm) : NULL;
    tp_errorf(err, "rank %d: nccl %s: %s%s%s", c->rank, op, ncclGetErrorString(r),
              detail && *detail ? ": " : "", detail && *detail ? detail : "");
    abort_comm(m);
    return -1;
}

/* The watchdog: waits until the operation just enqueued (and everything
 * before it on the stream) has finished. */
static int wait_done(tp_comm *c, const char *op, ncclResult_t issued, tp_err *err)
{
    nccl_impl *m = (nccl_impl *)c->impl;
    if (issued != ncclSuccess && issued != ncclInProgress)
        return nccl_fail(c, op, issued, err);
    double deadline = c->timeout_s > 0 ? tp_now() + c->timeout_s : 0;
    for (long spin = 0;; spin++) {
        ncclResult_t st = ncclSuccess;
        ncclResult_t q = ncclCommGetAsyncError(m->comm, &st);
        if (q != ncclSuccess)
            return nccl_fail(c, op, q, err);
        if (st != ncclSuccess && st != ncclInProgress)
            return nccl_fail(c, op, st, err);
        if (st == ncclSuccess) {
            cudaError_t e = cudaStreamQuery(m->stream);
            if (e == cudaSuccess)
                return 0;
            if (e != cudaErrorNotReady) {
                tp_errorf(err, "rank %d: nccl %s: CUDA error on the comm stream: %s", c->rank, op,
                          cudaGetErrorString(e));
                abort_comm(m);
                return -1;
            }
        }
        if (deadline && tp_now() > deadline) {
            abort_comm(m);
            return tp_comm_timeout_error(c, op, -1, err);
        }
        if (spin > 2000)
            usleep(50);   /* short collectives finish while spinning; long waits sleep */
    }
}

/* Enqueue-only: a non-blocking communicator may still be enqueueing when
 * the call returns (ncclInProgress); this waits for that (host side only,
 * legal while a stream is being captured), not for the stream. */
static int wait_enqueued(tp_comm *c, const char *op, ncclResult_t issued, tp_err *err)
{
    nccl_impl *m = (nccl_impl *)c->impl;
    if (issued != ncclSuccess && issued != ncclInProgress)
        return nccl_fail(c, op, issued, err);
    double deadline = c->timeout_s > 0 ? tp_now() + c->timeout_s : 0;
    for (;;) {
        ncclResult_t st = ncclSuccess;
        ncclResult_t q = ncclCommGetAsyncError(m->comm, &st);
        if (q != ncclSuccess)
            return nccl_fail(c, op, q, err);
        if (st == ncclSuccess)
            return 0;
        if (st != ncclInProgress)
            return nccl_fail(c, op, st, err);
        if (deadline && tp_now() > deadline) {
            abort_comm(m);
            return tp_comm_timeout_error(c, op, -1, err);
        }
    }
}

/* How a collective on device buffers finishes: waited for, or only enqueued. */
static int finish(tp_comm *c, const char *op, ncclResult_t issued, bool device_buffers, tp_err *err)
{
    nccl_impl *m = (nccl_impl *)c->impl;
    return m->enqueue_only && device_buffers ? wait_enqueued(c, op, issued, err) : wait_done(c, op, issued, err);
}

static int usable(tp_comm *c, const char *op, tp_err *err)
{
    nccl_impl *m = (nccl_impl *)c->impl;
    if (!m || m->broken)
        return tp_errorf(err, "rank %d: nccl %s: the communicator was aborted after an earlier error",
                         c->rank, op);
    return 0;
}

static bool is_host_pointer(const void *p)
{
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        cudaGetLastError();
        return true;
    }
    return a.type == cudaMemoryTypeUnregistered || a.type == cudaMemoryTypeHost;
}

static int stage_reserve(tp_comm *c, size_t bytes, const char *op, tp_err *err)
{
    nccl_impl *m = (nccl_impl *)c->impl;
    if (m->stage_bytes >= bytes)
        return 0;
    cudaFree(m->stage);
    m->stage = NULL;
    m->stage_bytes = 0;
    if (cudaMalloc(&m->stage, bytes) != cudaSuccess) {
        cudaGetLastError();
        m->stage = NULL;
        return tp_errorf(err, "rank %d: nccl %s: cannot allocate %zu bytes of device memory to stage a "
                         "host buffer", c->rank, op, bytes);
    }
    m->stage_bytes = bytes;
    return 0;
}

static int copy_on_stream(tp_comm *c, void *dst, const void *src, size_t bytes, const char *op, tp_err *err)
{
    nccl_impl *m = (nccl_impl *)c->impl;
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, m->stream);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(m->stream);
    if (e != cudaSuccess)
        return tp_errorf(err, "rank %d: nccl %s: staging copy: %s", c->rank, op, cudaGetErrorString(e));
    return 0;
}

static int nccl_allreduce(tp_comm *c, float *buf, size_t n, tp_err *err)
{
    const char *op = "all-reduce";
    if (usable(c, op, err))
        return -1;
    if (n == 0)
        return 0;
    nccl_impl *m = (nccl_impl *)c->impl;
    size_t bytes = n * sizeof(float);
    float *dev = buf;
    bool host = is_host_pointer(buf);
    if (host) {
        if (stage_reserve(c, bytes, op, err) || copy_on_stream(c, m->stage, buf, bytes, op, err))
            return -1;
        dev = (float *)m->stage;
    }
    if (finish(c, op, ncclAllReduce(dev, dev, n, ncclFloat32, ncclSum, m->comm, m->stream), !host, err))
        return -1;
    return host ? copy_on_stream(c, buf, dev, bytes, op, err) : 0;
}

static int nccl_allgather(tp_comm *c, const float *send, float *recv, size_t n_per_rank, tp_err *err)
{
    const char *op = "all-gather";
    if (usable(c, op, err))
        return -1;
    if (n_per_rank == 0)
        return 0;
    nccl_impl *m = (nccl_impl *)c->impl;
    size_t part = n_per_rank * sizeof(float), all = part * (size_t)c->world;
    const float *dsend = send;
    float *drecv = recv;
    bool host_send = is_host_pointer(send), host_recv = is_host_pointer(recv);
    if (host_send || host_recv) {
        /* stage: [all gathered][this rank's part] */
        if (stage_reserve(c, all + part, op, err))
            return -1;
        float *st = (float *)m->stage;
        if (host_recv)
            drecv = st;
        if (host_send) {
            dsend = st + n_per_rank * (size_t)c->world;
            if (copy_on_stream(c, (void *)dsend, send, part, op, err))
                return -1;
        }
    }
    if (finish(c, op, ncclAllGather(dsend, drecv, n_per_rank, ncclFloat32, m->comm, m->stream),
               !host_send && !host_recv, err))
        return -1;
    return host_recv ? copy_on_stream(c, recv, drecv, all, op, err) : 0;
}

static int nccl_broadcast(tp_comm *c, void *buf, size_t bytes, int root, tp_err *err)
{
    const char *op = "broadcast";
    if (root < 0 || root >= c->world)
        return tp_errorf(err, "rank %d: broadcast: root %d is not a rank of world size %d", c->rank, root,
                         c->world);
    if (usable(c, op, err))
        return -1;
    if (bytes == 0)
        return 0;
    nccl_impl *m = (nccl_impl *)c->impl;
    void *dev = buf;
    bool host = is_host_pointer(buf);
    if (host) {
        if (stage_reserve(c, bytes, op, err) || copy_on_stream(c, m->stage, buf, bytes, op, err))
            return -1;
        dev = m->stage;
    }
    if (finish(c, op, ncclBroadcast(dev, dev, bytes, ncclUint8, root, m->comm, m->stream), !host, err))
        return -1;
    return host ? copy_on_stream(c, buf, dev, bytes, op, err) : 0;
}

static int nccl_barrier(tp_comm *c, tp_err *err)
{
    const char *op = "barrier";
    if (usable(c, op, err) || stage_reserve(c, sizeof(float), op, err))
        return -1;
    nccl_impl *m = (nccl_impl *)c->impl;
    float *one = (float *)m->stage;
    return wait_done(c, op, ncclAllReduce(one, one, 1, ncclFloat32, ncclSum, m->comm, m->stream), err);
}

/* A clean shutdown finalises (flushes) and destroys the communicator; when
 * finalising does not finish in time the communicator is aborted instead. */
static void nccl_close(tp_comm *c)
{
    nccl_impl *m = (nccl_impl *)c->impl;
    if (!m)
        return;
    if (m->comm && !m->broken) {
        ncclResult_t r = ncclCommFinalize(m->comm), st = ncclInProgress;
        double limit = c->timeout_s > 0 && c->timeout_s < 30 ? c->timeout_s : 30;
        double deadline = tp_now() + limit;
        while (r == ncclSuccess || r == ncclInProgress) {
            if (ncclCommGetAsyncError(m->comm, &st) != ncclSuccess || st != ncclInProgress)
                break;
            if (tp_now() > deadline)
                break;
            usleep(100);
        }
        if ((r == ncclSuccess || r == ncclInProgress) && st == ncclSuccess)
            ncclCommDestroy(m->comm);
        else
            ncclCommAbort(m->comm);
    }
    m->comm = NULL;
    if (m->stage)
        cudaFree(m->stage);
    if (m->stream)
        cudaStreamDestroy(m->stream);
    tp_comm_close(m->boot);
    free(m);
    c->impl = NULL;
}

extern "C" const tp_comm_ops tp_comm_nccl_ops = {
    "nccl", nccl_allreduce, nccl_allgather, nccl_broadcast, nccl_barrier, nccl_close,
};

extern "C" void tp_comm_nccl_abort(tp_comm *c, int code)
{
    nccl_impl *m = (nccl_impl *)c->impl;
    if (!m)
        return;
    abort_comm(m);
    tp_comm *boot = m->boot;
    m->boot = NULL;
    tp_comm_abort(boot, code);   /* MPI_Abort under mpirun: does not return */
}

extern "C" tpc_stream tpc_comm_stream(const tp_comm *c)
{
    return c && c->ops == &tp_comm_nccl_ops && c->impl ? ((nccl_impl *)c->impl)->stream : NULL;
}

extern "C" int tpc_comm_device(const tp_comm *c)
{
    return c && c->ops == &tp_comm_nccl_ops && c->impl ? ((nccl_impl *)c->impl)->device : -1;
}

extern "C" void tpc_comm_set_enqueue_only(tp_comm *c, bool on)
{
    if (c && c->ops == &tp_comm_nccl_ops && c->impl)
        ((nccl_impl *)c->impl)->enqueue_only = on;
}

extern "C" int tpc_comm_wait(tp_comm *c, tp_err *err)
{
    if (usable(c, "wait", err))
        return -1;
    return wait_done(c, "collective", ncclSuccess, err);
}

/* ------------------------------------------------------------------ setup */

/* TP_CUDA_DEVICE, else LOCAL_RANK's device, else device 0 when only one is
 * visible (CUDA_VISIBLE_DEVICES set per rank). */
static int pick_device(const tp_comm *c, const tp_launch *l, int *device, tp_err *err)
{
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return tp_errorf(err, "--comm nccl: rank %d: no usable CUDA device (cudaGetDeviceCount: %s)", c->rank,
                         cudaGetErrorString(e));
    }
    if (count <= 0)
        return tp_errorf(err, "--comm nccl: rank %d: no CUDA device (cudaGetDeviceCount: 0)", c->rank);
    const char *env = getenv("TP_CUDA_DEVICE");
    if (env && *env) {
        char *end;
        errno = 0;
        long v = strtol(env, &end, 10);
        if (errno || *end || end == env || v < 0 || v >= count)
            return tp_errorf(err, "TP_CUDA_DEVICE=%s: not a device index below %d", env, count);
        *device = (int)v;
        return 0;
    }
    if (l->local_rank >= 0 && l->local_rank < count)
        *device = l->local_rank;
    else if (count == 1)
        *device = 0;
    else
        return tp_errorf(err, "--comm nccl: rank %d has local rank %d but this node shows %d CUDA devices "
                         "(set TP_CUDA_DEVICE or CUDA_VISIBLE_DEVICES)", c->rank, l->local_rank, count);
    return 0;
}

/* Non-blocking init, so that a rank that never arrives gives a timeout
 * instead of a hang. */
static int init_comm(tp_comm *c, nccl_impl *m, ncclUniqueId id, tp_err *err)
{
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclResult_t r = ncclCommInitRankConfig(&m->comm, c->world, id, c->rank, &config);
    if (r != ncclSuccess && r != ncclInProgress) {
        tp_errorf(err, "--comm nccl: rank %d: ncclCommInitRankConfig: %s", c->rank, ncclGetErrorString(r));
        if (m->comm)
            ncclCommAbort(m->comm);
        m->comm = NULL;
        return -1;
    }
    double deadline = c->timeout_s > 0 ? tp_now() + c->timeout_s : 0;
    for (;;) {
        ncclResult_t st = ncclInProgress;
        ncclCommGetAsyncError(m->comm, &st);
        if (st == ncclSuccess)
            return 0;
        if (st != ncclInProgress) {
            tp_errorf(err, "--comm nccl: rank %d: communicator setup failed: %s", c->rank, ncclGetErrorString(st));
            break;
        }
        if (deadline && tp_now() > deadline) {
            tp_comm_timeout_error(c, "nccl setup", -1, err);
            break;
        }
        usleep(1000);
    }
    ncclCommAbort(m->comm);
    m->comm = NULL;
    return -1;
}

extern "C" int tp_comm_nccl_open(tp_comm *c, const tp_launch *l, tp_err *err)
{
    nccl_impl *m = (nccl_impl *)calloc(1, sizeof *m);
    if (!m)
        return tp_errorf(err, "out of memory");
    c->impl = m;
    c->ops = &tp_comm_nccl_ops;
    int rc = -1;
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    cudaError_t e;
    ncclResult_t r;
    if (pick_device(c, l, &m->device, err))
        goto fail;
    if ((e = cudaSetDevice(m->device)) != cudaSuccess ||
        (e = cudaStreamCreateWithFlags(&m->stream, cudaStreamNonBlocking)) != cudaSuccess) {
        tp_errorf(err, "--comm nccl: rank %d: device %d: %s", c->rank, m->device, cudaGetErrorString(e));
        goto fail;
    }
    if (c->rank == 0 && (r = ncclGetUniqueId(&id)) != ncclSuccess) {
        tp_errorf(err, "--comm nccl: rank 0: ncclGetUniqueId: %s", ncclGetErrorString(r));
        goto fail;
    }
    /* The id travels over MPI (mpirun) or our TCP rendezvous. */
    if (tp_comm_open(&m->boot, "auto", l, c->timeout_s, err)) {
        tp_err inner = *err;
        tp_errorf(err, "--comm nccl: sharing the NCCL id: %s", inner.msg);
        goto fail;
    }
    if (m->boot->ops->broadcast(m->boot, &id, sizeof id, 0, err)) {
        tp_err inner = *err;
        tp_errorf(err, "--comm nccl: sharing the NCCL id over %s: %s", m->boot->ops->name, inner.msg);
        goto fail;
    }
    if (init_comm(c, m, id, err))
        goto fail;
    rc = 0;
fail:
    if (rc) {
        nccl_close(c);
        c->ops = NULL;
    }
    return rc;
}
