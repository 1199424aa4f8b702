/* comm_tcp.c - the "tcp" backend: tensor parallelism across processes with
 * nothing but sockets, so that torchrun (or a test that forks) can start the
 * ranks without MPI.
 *
 * Topology: a star.  Rank 0 listens on MASTER_ADDR:MASTER_PORT (defaults
 * 127.0.0.1:29500, as torchrun) and every other rank connects to it.  An
 * all-reduce sends every rank's buffer to rank 0, which sums them in rank
 * order and sends the sum back, so every rank ends with the same bits.  Rank
 * 0 moves (world - 1) * 2 buffers per collective: fine for the small world
 * sizes of CPU tensor parallelism on one or a few nodes, not meant for 64.
 *
 * Every message starts with a header (op, sequence number, byte count) that
 * the receiver checks, so ranks that disagree about the order of collectives
 * get an error instead of silently mixing buffers.  Every socket operation
 * waits with poll() against the collective's deadline, so a dead or missing
 * peer gives an error within timeout_s, and a peer that closes its socket
 * gives one at once.
 *
 * Joining: each rank's hello carries its rank, the world size and the
 * conversion id it loaded.  Rank 0 answers every rank with an ack, or, when
 * a hello does not fit (another world size, another conversion, a rank
 * twice), with a refusal that holds the reason as text: rank 0 and the
 * ranks that joined so far all end with that one message. */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "comm_internal.h"

#define TCP_MAGIC 0x4d435054u   /* "TPCM" */
#define TCP_VERSION 2u          /* 2: the hello carries the conversion id */
#define MAX_REFUSAL 1024        /* bytes of a refusal's text */

enum { OP_HELLO = 1, OP_ACK, OP_ALLREDUCE, OP_ALLGATHER, OP_BROADCAST, OP_BARRIER, OP_REFUSE };

typedef struct msg_header {
    uint32_t magic, op, seq, arg;  /* arg: hello's rank / broadcast's root */
    uint64_t bytes;                 /* payload that follows */
} msg_header;

/* A hello's payload (seq: TCP_VERSION, arg: the rank). */
typedef struct hello_body {
    uint64_t world;
    char conversion_id[32];         /* zeros: none given */
} hello_body;

typedef struct tcp_impl {
    char conversion_id[32]; /* what this rank loaded, for the hello (zeros: none) */
    int *fds;            /* rank 0: fds[r] is rank r's socket; others: fds[0] is rank 0's */
    uint32_t seq;        /* collectives so far, the same on every rank */
    float *scratch;      /* rank 0's receive buffer for all-reduce */
    size_t scratch_n;
    char where[300];     /* "127.0.0.1:29500" for messages */
} tcp_impl;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* 0 means no deadline (timeout_s <= 0). */
static double deadline_after(double timeout_s) { return timeout_s > 0 ? now_s() + timeout_s : 0; }

/* Milliseconds left for poll(), -1 for no deadline, 0 when past it. */
static int ms_left(double deadline)
{
    if (deadline == 0)
        return -1;
    double left = deadline - now_s();
    if (left <= 0)
        return 0;
    return left > 1e6 ? 1000000000 : (int)(left * 1000) + 1;
}

static const char *op_name(uint32_t op)
{
    switch (op) {
    case OP_HELLO: return "hello";
    case OP_ACK: return "hello";
    case OP_ALLREDUCE: return "all-reduce";
    case OP_ALLGATHER: return "all-gather";
    case OP_BROADCAST: return "broadcast";
    case OP_BARRIER: return "barrier";
    case OP_REFUSE: return "hello";
    }
    return "message";
}

static int peer_closed(const tp_comm *c, const char *op, int peer, tp_err *err)
{
    return tp_errorf(err, "rank %d: %s: rank %d closed its connection (it exited or crashed)",
                     c->rank, op, peer);
}

/* Sends or receives exactly len bytes before the deadline. */
static int io_full(const tp_comm *c, int fd, int peer, void *buf, size_t len, bool writing,
                   double deadline, const char *op, tp_err *err)
{
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = writing ? send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT)
                            : recv(fd, p, len, MSG_DONTWAIT);
        if (n > 0) {
            p += n;
            len -= (size_t)n;
            continue;
        }
        if (n == 0 && !writing)
            return peer_closed(c, op, peer, err);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN))
            return peer_closed(c, op, peer, err);
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            return tp_errorf(err, "rank %d: %s: socket to rank %d: %s", c->rank, op, peer, strerror(errno));
        struct pollfd pfd = { .fd = fd, .events = writing ? POLLOUT : POLLIN };
        int wait = ms_left(deadline);
        if (wait == 0)
            return tp_comm_timeout_error(c, op, peer, err);
        int r = poll(&pfd, 1, wait);
        if (r < 0 && errno != EINTR)
            return tp_errorf(err, "rank %d: %s: poll: %s", c->rank, op, strerror(errno));
        if (r == 0)
            return tp_comm_timeout_error(c, op, peer, err);
        /* readable/writable or an error condition: the next send/recv says which */
    }
    return 0;
}

static int send_msg(const tp_comm *c, int fd, int peer, uint32_t op, uint32_t seq, uint32_t arg,
                    const void *payload, uint64_t bytes, double deadline, tp_err *err)
{
    msg_header h = { TCP_MAGIC, op, seq, arg, bytes };
    if (io_full(c, fd, peer, &h, sizeof h, true, deadline, op_name(op), err))
        return -1;
    return bytes ? io_full(c, fd, peer, (void *)payload, bytes, true, deadline, op_name(op), err) : 0;
}

/* Receives a header, checks it is the expected message, then the payload. */
static int recv_msg(const tp_comm *c, int fd, int peer, uint32_t op, uint32_t seq, uint32_t arg,
                    void *payload, uint64_t bytes, double deadline, tp_err *err)
{
    msg_header h;
    const char *name = op_name(op);
    if (io_full(c, fd, peer, &h, sizeof h, false, deadline, name, err))
        return -1;
    if (h.magic != TCP_MAGIC)
        return tp_errorf(err, "rank %d: %s: rank %d sent bytes that are not a tprun message", c->rank, name, peer);
    if (h.op != op || h.seq != seq || h.arg != arg || h.bytes != bytes)
        return tp_errorf(err, "rank %d: %s #%u: rank %d sent %s #%u of %llu bytes instead of %llu "
                         "(the ranks disagree about the order or size of collectives)",
                         c->rank, name, seq, peer, op_name(h.op), h.seq,
                         (unsigned long long)h.bytes, (unsigned long long)bytes);
    return bytes ? io_full(c, fd, peer, payload, bytes, false, deadline, name, err) : 0;
}

static int tcp_allreduce(tp_comm *c, float *buf, size_t n, tp_err *err)
{
    tcp_impl *t = c->impl;
    uint32_t seq = t->seq++;
    double deadline = deadline_after(c->timeout_s);
    uint64_t bytes = (uint64_t)n * sizeof(float);
    if (c->rank != 0) {
        if (send_msg(c, t->fds[0], 0, OP_ALLREDUCE, seq, 0, buf, bytes, deadline, err))
            return -1;
        return recv_msg(c, t->fds[0], 0, OP_ALLREDUCE, seq, 0, buf, bytes, deadline, err);
    }
    if (t->scratch_n < n) {
        float *s = realloc(t->scratch, n * sizeof(float));
        if (!s)
            return tp_errorf(err, "rank 0: all-reduce: out of memory for %zu floats", n);
        t->scratch = s;
        t->scratch_n = n;
    }
    /* ((b0 + b1) + b2) + ...: one fixed order, made only here. */
    for (int r = 1; r < c->world; r++) {
        if (recv_msg(c, t->fds[r], r, OP_ALLREDUCE, seq, 0, t->scratch, bytes, deadline, err))
            return -1;
        for (size_t i = 0; i < n; i++)
            buf[i] += t->scratch[i];
    }
    for (int r = 1; r < c->world; r++)
        if (send_msg(c, t->fds[r], r, OP_ALLREDUCE, seq, 0, buf, bytes, deadline, err))
            return -1;
    return 0;
}

static int tcp_allgather(tp_comm *c, const float *send, float *recv, size_t n_per_rank, tp_err *err)
{
    tcp_impl *t = c->impl;
    uint32_t seq = t->seq++;
    double deadline = deadline_after(c->timeout_s);
    uint64_t part = (uint64_t)n_per_rank * sizeof(float), all = part * (uint64_t)c->world;
    if (c->rank != 0) {
        if (send_msg(c, t->fds[0], 0, OP_ALLGATHER, seq, 0, send, part, deadline, err))
            return -1;
        return recv_msg(c, t->fds[0], 0, OP_ALLGATHER, seq, 0, recv, all, deadline, err);
    }
    memmove(recv, send, part);
    for (int r = 1; r < c->world; r++)
        if (recv_msg(c, t->fds[r], r, OP_ALLGATHER, seq, 0, recv + (size_t)r * n_per_rank, part, deadline, err))
            return -1;
    for (int r = 1; r < c->world; r++)
        if (send_msg(c, t->fds[r], r, OP_ALLGATHER, seq, 0, recv, all, deadline, err))
            return -1;
    return 0;
}

/* A root other than 0 first hands its buffer to rank 0, which sends it on. */
static int tcp_broadcast(tp_comm *c, void *buf, size_t bytes, int root, tp_err *err)
{
    tcp_impl *t = c->impl;
    if (root < 0 || root >= c->world)
        return tp_errorf(err, "rank %d: broadcast: root %d is not a rank of world size %d", c->rank, root, c->world);
    uint32_t seq = t->seq++;
    double deadline = deadline_after(c->timeout_s);
    if (c->rank != 0) {
        if (c->rank == root)
            return send_msg(c, t->fds[0], 0, OP_BROADCAST, seq, (uint32_t)root, buf, bytes, deadline, err);
        return recv_msg(c, t->fds[0], 0, OP_BROADCAST, seq, (uint32_t)root, buf, bytes, deadline, err);
    }
    if (root != 0 && recv_msg(c, t->fds[root], root, OP_BROADCAST, seq, (uint32_t)root, buf, bytes, deadline, err))
        return -1;
    for (int r = 1; r < c->world; r++)
        if (r != root && send_msg(c, t->fds[r], r, OP_BROADCAST, seq, (uint32_t)root, buf, bytes, deadline, err))
            return -1;
    return 0;
}

static int tcp_barrier(tp_comm *c, tp_err *err)
{
    tcp_impl *t = c->impl;
    uint32_t seq = t->seq++;
    double deadline = deadline_after(c->timeout_s);
    if (c->rank != 0) {
        if (send_msg(c, t->fds[0], 0, OP_BARRIER, seq, 0, NULL, 0, deadline, err))
            return -1;
        return recv_msg(c, t->fds[0], 0, OP_BARRIER, seq, 0, NULL, 0, deadline, err);
    }
    for (int r = 1; r < c->world; r++)
        if (recv_msg(c, t->fds[r], r, OP_BARRIER, seq, 0, NULL, 0, deadline, err))
            return -1;
    for (int r = 1; r < c->world; r++)
        if (send_msg(c, t->fds[r], r, OP_BARRIER, seq, 0, NULL, 0, deadline, err))
            return -1;
    return 0;
}

static void tcp_close(tp_comm *c)
{
    tcp_impl *t = c->impl;
    if (!t)
        return;
    for (int r = 0; r < c->world; r++)
        if (t->fds[r] >= 0)
            close(t->fds[r]);
    free(t->fds);
    free(t->scratch);
    free(t);
    c->impl = NULL;
}

static const tp_comm_ops tcp_ops = {
    .name = "tcp",
    .allreduce_sum_f32 = tcp_allreduce,
    .allgather_f32 = tcp_allgather,
    .broadcast = tcp_broadcast,
    .barrier = tcp_barrier,
    .close = tcp_close,
};

/* ------------------------------------------------------------------ setup */

static int set_socket_opts(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/* MASTER_PORT as torchrun sets it.  Under torchrun's agent store the agent
 * itself listens on MASTER_PORT, so we take the next port; TP_COMM_PORT
 * overrides both. */
static int comm_port(int *port, tp_err *err)
{
    const char *name = "TP_COMM_PORT";
    const char *s = getenv(name);
    int bump = 0;
    if (!s || !*s) {
        name = "MASTER_PORT";
        s = getenv(name);
        const char *agent = getenv("TORCHELASTIC_USE_AGENT_STORE");
        if (agent && (!strcmp(agent, "True") || !strcmp(agent, "true") || !strcmp(agent, "1")))
            bump = 1;
    }
    if (!s || !*s) {
        *port = 29500;
        return 0;
    }
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < 1 || v + bump > 65535)
        return tp_errorf(err, "%s=%s is not a TCP port number", name, s);
    *port = (int)v + bump;
    return 0;
}

static int resolve(const char *host, int port, bool passive, struct addrinfo **res, tp_err *err)
{
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                              .ai_flags = passive ? AI_PASSIVE : 0 };
    int rc = getaddrinfo(host, ps, &hints, res);
    if (rc)
        return tp_errorf(err, "MASTER_ADDR=%s: %s", host, gai_strerror(rc));
    return 0;
}

static void id_text(const char id[32], char out[33])
{
    memcpy(out, id, 32);
    out[32] = 0;
    if (!out[0])
        snprintf(out, 33, "(none)");
}

/* Rank 0's verdict on a hello: fills *peer, or returns -1 with the reason
 * (which refuse_all then sends to the ranks). */
static int judge_hello(const tp_comm *c, const tcp_impl *t, int fd, const msg_header *h, double deadline,
                       int *peer, tp_err *err)
{
    int r = (int)h->arg;
    if (h->seq != TCP_VERSION)
        return tp_errorf(err, "rank 0: rank %d at %s speaks tprun's tcp protocol version %u, rank 0 version %u "
                         "(every rank must run the same tprun build)", r, t->where, h->seq, TCP_VERSION);
    hello_body b;
    if (h->bytes != sizeof b)
        return tp_errorf(err, "rank 0: rank %d sent a hello of %llu bytes, not %zu", r,
                         (unsigned long long)h->bytes, sizeof b);
    if (io_full(c, fd, r, &b, sizeof b, false, deadline, "hello", err))
        return -1;
    if (b.world != (uint64_t)c->world || r < 1 || r >= c->world)
        return tp_errorf(err, "rank 0: a process connected to %s as rank %d of world size %llu, but this job "
                         "has world size %d: refused", t->where, r, (unsigned long long)b.world, c->world);
    if (t->fds[r] >= 0)
        return tp_errorf(err, "rank 0: two processes connected to %s as rank %d: refused", t->where, r);
    if (memcmp(b.conversion_id, t->conversion_id, sizeof b.conversion_id) != 0) {
        char theirs[33], ours[33];
        id_text(b.conversion_id, theirs);
        id_text(t->conversion_id, ours);
        return tp_errorf(err, "rank %d loaded conversion %s, rank 0 %s: every rank must load the same "
                         "conversion", r, theirs, ours);
    }
    *peer = r;
    return 0;
}

/* Sends the reason rank 0 gives up to the refused process and to every rank
 * that joined so far (they wait for their ack), so that each ends with the
 * same message rather than "rank 0 closed its connection".  Best effort. */
static void refuse_all(const tp_comm *c, const tcp_impl *t, int refused_fd, double deadline, const tp_err *why)
{
    size_t n = strnlen(why->msg, MAX_REFUSAL);
    tp_err ignored;
    send_msg(c, refused_fd, -1, OP_REFUSE, TCP_VERSION, 0, why->msg, n, deadline, &ignored);
    for (int r = 1; r < c->world; r++)
        if (t->fds[r] >= 0)
            send_msg(c, t->fds[r], r, OP_REFUSE, TCP_VERSION, 0, why->msg, n, deadline, &ignored);
}

/* A rank's wait for rank 0's answer to its hello: an ack, or a refusal
 * whose text becomes this rank's error. */
static int await_ack(const tp_comm *c, const tcp_impl *t, int fd, double deadline, tp_err *err)
{
    msg_header h;
    if (io_full(c, fd, 0, &h, sizeof h, false, deadline, "hello", err))
        return -1;
    if (h.magic == TCP_MAGIC && h.op == OP_REFUSE && h.bytes <= MAX_REFUSAL) {
        char why[MAX_REFUSAL + 1];
        if (io_full(c, fd, 0, why, (size_t)h.bytes, false, deadline, "hello", err))
            return -1;
        why[h.bytes] = 0;
        return tp_errorf(err, "%s (rank %d was refused by rank 0 at %s)", why, c->rank, t->where);
    }
    if (h.magic != TCP_MAGIC || h.op != OP_ACK || h.seq != TCP_VERSION || h.bytes != 0)
        return tp_errorf(err, "rank %d: hello: rank 0 at %s answered with something other than an ack "
                         "(another tprun version?)", c->rank, t->where);
    return 0;
}

/* Rank 0: listen, then accept until every other rank has said hello. */
static int root_setup(tp_comm *c, tcp_impl *t, const char *host, int port, tp_err *err)
{
    /* Loopback stays loopback; any other address is served on every interface. */
    bool loopback = !strcmp(host, "127.0.0.1") || !strcmp(host, "localhost") || !strcmp(host, "::1");
    struct addrinfo *ai;
    if (resolve(loopback ? host : NULL, port, true, &ai, err))
        return -1;
    int lfd = -1, bind_errno = 0;
    for (struct addrinfo *a = ai; a && lfd < 0; a = a->ai_next) {
        lfd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (lfd < 0)
            continue;
        int one = 1;
        setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(lfd, a->ai_addr, a->ai_addrlen) || listen(lfd, c->world + 8)) {
            bind_errno = errno;
            close(lfd);
            lfd = -1;
        }
    }
    freeaddrinfo(ai);
    if (lfd < 0)
        return tp_errorf(err, "rank 0: cannot listen on %s: %s%s", t->where, strerror(bind_errno),
                         bind_errno == EADDRINUSE ? " (another job on this port? set MASTER_PORT)" : "");
    set_socket_opts(lfd);

    double deadline = deadline_after(c->timeout_s);
    int joined = 0, rc = 0;
    while (joined < c->world - 1) {
        struct pollfd pfd = { .fd = lfd, .events = POLLIN };
        int wait = ms_left(deadline), r = wait == 0 ? 0 : poll(&pfd, 1, wait);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            int missing = 1;
            while (missing < c->world && t->fds[missing] >= 0)
                missing++;
            rc = tp_errorf(err, "rank 0: waiting for the other ranks to connect to %s timed out after %g s "
                           "(rank %d never connected: a rank died or never started?)",
                           t->where, c->timeout_s, missing);
            break;
        }
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0)
            continue;
        set_socket_opts(fd);
        msg_header h;
        tp_err stray;
        if (io_full(c, fd, -1, &h, sizeof h, false, deadline, "hello", &stray) || h.magic != TCP_MAGIC ||
            h.op != OP_HELLO) {
            close(fd);   /* a stray connection: keep waiting for the real ranks */
            continue;
        }
        int peer = -1;
        rc = judge_hello(c, t, fd, &h, deadline, &peer, err);
        if (rc) {
            refuse_all(c, t, fd, deadline, err);
            close(fd);
            break;
        }
        t->fds[peer] = fd;
        joined++;
    }
    close(lfd);
    if (rc)
        return -1;
    for (int r = 1; r < c->world; r++)
        if (send_msg(c, t->fds[r], r, OP_ACK, TCP_VERSION, 0, NULL, 0, deadline, err))
            return -1;
    return 0;
}

/* Other ranks: connect to rank 0, retrying until the deadline (rank 0 may
 * not listen yet), then hello and wait for the acknowledgement. */
static int peer_setup(tp_comm *c, tcp_impl *t, const char *host, int port, tp_err *err)
{
    struct addrinfo *ai;
    if (resolve(host, port, false, &ai, err))
        return -1;
    double deadline = deadline_after(c->timeout_s);
    int fd = -1, last_errno = ETIMEDOUT;
    while (fd < 0) {
        for (struct addrinfo *a = ai; a && fd < 0; a = a->ai_next) {
            fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
            if (fd < 0)
                continue;
            set_socket_opts(fd);
            if (connect(fd, a->ai_addr, a->ai_addrlen) == 0)
                break;
            if (errno == EINPROGRESS) {
                struct pollfd pfd = { .fd = fd, .events = POLLOUT };
                int wait = ms_left(deadline);
                if (wait < 0 || wait > 1000)
                    wait = 1000;
                int soerr = ETIMEDOUT;
                socklen_t len = sizeof soerr;
                if (poll(&pfd, 1, wait) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) == 0 && soerr == 0)
                    break;
                last_errno = soerr;
            } else {
                last_errno = errno;
            }
            close(fd);
            fd = -1;
        }
        if (fd >= 0)
            break;
        if (ms_left(deadline) == 0) {
            freeaddrinfo(ai);
            return tp_errorf(err, "rank %d: could not reach rank 0 at %s within %g s (%s: is rank 0 running, "
                             "with the same MASTER_ADDR and MASTER_PORT?)", c->rank, t->where, c->timeout_s,
                             strerror(last_errno));
        }
        struct timespec pause = { 0, 50 * 1000 * 1000 };
        nanosleep(&pause, NULL);
    }
    freeaddrinfo(ai);
    t->fds[0] = fd;
    /* The version in seq, our rank in arg; the world size and the
     * conversion id in the payload. */
    hello_body b = { .world = (uint64_t)c->world };
    memcpy(b.conversion_id, t->conversion_id, sizeof b.conversion_id);
    if (send_msg(c, fd, 0, OP_HELLO, TCP_VERSION, (uint32_t)c->rank, &b, sizeof b, deadline, err))
        return -1;
    return await_ack(c, t, fd, deadline, err);
}

int tp_comm_tcp_open(tp_comm *c, const char *conversion_id, tp_err *err)
{
    tcp_impl *t = calloc(1, sizeof *t);
    int *fds = t ? malloc((size_t)c->world * sizeof *fds) : NULL;
    if (!fds) {
        free(t);
        return tp_errorf(err, "out of memory");
    }
    if (conversion_id)
        memcpy(t->conversion_id, conversion_id, strnlen(conversion_id, sizeof t->conversion_id));
    for (int r = 0; r < c->world; r++)
        fds[r] = -1;
    t->fds = fds;
    c->impl = t;
    c->ops = &tcp_ops;

    const char *host = getenv("MASTER_ADDR");
    if (!host || !*host)
        host = "127.0.0.1";
    int port = 0;
    if (comm_port(&port, err)) {
        tcp_close(c);
        return -1;
    }
    snprintf(t->where, sizeof t->where, "%s:%d", host, port);
    int rc = c->rank == 0 ? root_setup(c, t, host, port, err) : peer_setup(c, t, host, port, err);
    if (rc) {
        tcp_close(c);
        c->ops = NULL;
        return -1;
    }
    return 0;
}
