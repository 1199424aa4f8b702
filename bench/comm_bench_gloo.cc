// comm_bench_gloo.cc - the same all-reduce measurement as comm_bench.c, with
// Gloo (Debian's libgloo-dev, the collective library PyTorch uses on CPUs):
// TCP transport on 127.0.0.1, ranks forked, rendezvous through Gloo's
// FileStore (Debian's Gloo has no TCP store).  Ring all-reduce, the default.
//
//   comm_bench_gloo WORLD N ITERS STORE_DIR
#include <gloo/allreduce.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/file_store.h>
#include <gloo/transport/tcp/device.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

static double now_s()
{
    using namespace std::chrono;
    return duration<double>(steady_clock::now().time_since_epoch()).count();
}

static int run_rank(int rank, int world, size_t n, int iters, const char *store_dir)
{
    gloo::transport::tcp::attr attr("127.0.0.1");
    auto dev = gloo::transport::tcp::CreateDevice(attr);
    gloo::rendezvous::FileStore store(store_dir);
    auto ctx = std::make_shared<gloo::rendezvous::Context>(rank, world);
    ctx->connectFullMesh(store, dev);
    std::vector<float> buf(n, (rank + 1) * 1e-3f);
    std::vector<double> t;
    for (int it = -5; it < iters; it++) {
        double t0 = now_s();
        gloo::AllreduceOptions opts(ctx);
        opts.setOutput(buf.data(), n);
        opts.setReduceFunction(static_cast<void (*)(void *, const void *, const void *, size_t)>(
            &gloo::sum<float>));
        gloo::allreduce(opts);
        if (it >= 0) t.push_back(now_s() - t0);
    }
    if (rank == 0) {
        std::sort(t.begin(), t.end());
        printf("gloo ring world=%d n=%zu min_us=%.1f median_us=%.1f\n", world, n, t[0] * 1e6,
               t[t.size() / 2] * 1e6);
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: comm_bench_gloo WORLD N ITERS STORE_DIR\n");
        return 2;
    }
    int world = atoi(argv[1]), iters = atoi(argv[3]);
    size_t n = (size_t)atol(argv[2]);
    if (world < 2 || world > 16 || n == 0 || iters < 1) {
        fprintf(stderr, "comm_bench_gloo: bad arguments\n");
        return 2;
    }
    fflush(stdout);
    std::vector<pid_t> pids;
    for (int r = 0; r < world; r++) {
        pid_t p = fork();
        if (p == 0) {
            int rc = run_rank(r, world, n, iters, argv[4]);
            fflush(stdout); // _exit does not flush
            _exit(rc);
        }
        pids.push_back(p);
    }
    int failed = 0;
    for (pid_t p : pids) {
        int st;
        waitpid(p, &st, 0);
        failed += !(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    return failed ? 1 : 0;
}
