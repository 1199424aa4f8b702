// emu.cpp - the block runner, streams and graphs of the CUDA emulation
// (run_emu.sh only; what is and is not modelled: cuda_runtime.h).
#include "cuda_runtime.h"
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
emu_block *emu_cur;
std::vector<char> emu_dyn_smem;
std::mutex emu_atomic_mu;
// One launch at a time: the block state above is global, and
// test_model_cuda runs its tp ranks as host threads that launch at once.
static std::mutex emu_launch_mu;

static void emu_run(dim3 grid, dim3 block, size_t smem, const std::function<void()> &body)
{
    emu_sync_all();   // queued copies land before the kernel reads
    std::lock_guard<std::mutex> one_launch(emu_launch_mu);
    blockDim = block; gridDim = grid;
    int nt = block.x * block.y * block.z;
    emu_dyn_smem.assign(smem + 16, 0);
    for (unsigned bz = 0; bz < grid.z; bz++) for (unsigned by = 0; by < grid.y; by++) for (unsigned bx = 0; bx < grid.x; bx++) {
        emu_block b;
        b.bar = std::make_unique<std::barrier<>>(nt);
        for (int w = 0; w < (nt + 31) / 32; w++) b.warp_bar.push_back(std::make_unique<std::barrier<>>(std::min(32, nt - 32 * w)));
        b.xchg.assign(nt, 0);
        emu_cur = &b;
        std::vector<std::thread> th;
        for (int t = 0; t < nt; t++)
            th.emplace_back([&, t] {
                threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
                blockIdx = dim3(bx, by, bz);
                body();
                b.warp_bar[t / 32]->arrive_and_drop();
                b.bar->arrive_and_drop();
            });
        for (auto &x : th) x.join();
    }
}

// ---- errors

static thread_local cudaError_t emu_last_error = cudaSuccess;

cudaError_t cudaGetLastError()
{
    cudaError_t e = emu_last_error;
    emu_last_error = cudaSuccess;
    return e;
}

// As in CUDA, a failed runtime call is also this thread's last error.
static cudaError_t fail(cudaError_t e)
{
    emu_last_error = e;
    return e;
}

const char *cudaGetErrorString(cudaError_t e)
{
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorIllegalState: return "operation not permitted in the current state (emulated)";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing (emulated)";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture (emulated)";
    case cudaErrorStreamCaptureWrongThread: return "attempt to terminate a thread-local capture sequence from another thread (emulated)";
    default: return "emulated error";
    }
}

// ---- capture bookkeeping

// Captures in Global mode, over all threads; this thread's Global ones; this
// thread's captures in Global or ThreadLocal mode (the ones that forbid its
// unsafe calls).
static std::atomic<int> emu_global_captures{0};
static thread_local int emu_own_global_captures = 0;
static thread_local std::vector<CUstream_st *> emu_own_strict_captures;

cudaError_t emu_unsafe_call()
{
    if (emu_own_strict_captures.empty() && emu_global_captures.load() == emu_own_global_captures)
        return cudaSuccess;
    for (CUstream_st *s : emu_own_strict_captures)
        s->invalidated = true;
    return fail(cudaErrorStreamCaptureUnsupported);
}

static void capture_stopped(CUstream_st *s)
{
    s->capturing = false;
    if (s->mode == cudaStreamCaptureModeGlobal) {
        emu_global_captures--;
        emu_own_global_captures--;
    }
    auto &own = emu_own_strict_captures;
    for (size_t i = 0; i < own.size(); i++)
        if (own[i] == s) {
            own.erase(own.begin() + i);
            break;
        }
}

cudaError_t emu_enqueue(cudaStream_t s, std::function<void()> op)
{
    if (!s || !s->capturing) {
        emu_sync_all();   // queued copies land first, in stream order
        op();
        return cudaSuccess;
    }
    if (s->invalidated)
        return fail(cudaErrorStreamCaptureInvalidated);
    s->graph->ops.push_back(std::move(op));
    return cudaSuccess;
}

void emu_launch(cudaStream_t s, dim3 grid, dim3 block, size_t smem, std::function<void()> body)
{
    cudaError_t e;
    if (!s || !s->capturing)
        e = (emu_run(grid, block, smem, body), cudaSuccess);
    else
        e = emu_enqueue(s, [=] { emu_run(grid, block, smem, body); });
    if (e != cudaSuccess)
        fail(e);
}

// ---- streams

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, int)
{
    *s = new CUstream_st;
    return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t s)
{
    emu_sync_all();
    if (!s)
        return cudaSuccess;
    if (s->capturing) {   // CUDA leaves this undefined; here the capture just ends
        capture_stopped(s);
        delete s->graph;
    }
    delete s;
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s)
{
    if (s && s->capturing) {
        s->invalidated = true;
        return fail(cudaErrorStreamCaptureUnsupported);
    }
    if (!s)   // the legacy stream: unsafe while this thread captures
        if (cudaError_t e = emu_unsafe_call())
            return e;
    emu_sync_all();
    return cudaSuccess;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode)
{
    if (!s)
        return fail(cudaErrorStreamCaptureUnsupported);   // the legacy stream cannot capture
    if (s->capturing)
        return fail(cudaErrorIllegalState);
    s->capturing = true;
    s->invalidated = false;
    s->mode = mode;
    s->owner = std::this_thread::get_id();
    s->graph = new CUgraph_st;
    if (mode == cudaStreamCaptureModeGlobal) {
        emu_global_captures++;
        emu_own_global_captures++;
    }
    if (mode != cudaStreamCaptureModeRelaxed)
        emu_own_strict_captures.push_back(s);
    return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *graph)
{
    *graph = nullptr;
    if (!s || !s->capturing)
        return fail(cudaErrorIllegalState);
    if (s->mode != cudaStreamCaptureModeRelaxed && s->owner != std::this_thread::get_id())
        return fail(cudaErrorStreamCaptureWrongThread);
    capture_stopped(s);
    CUgraph_st *g = s->graph;
    s->graph = nullptr;
    if (s->invalidated) {
        delete g;
        return fail(cudaErrorStreamCaptureInvalidated);
    }
    *graph = g;
    return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus *status)
{
    *status = !s || !s->capturing ? cudaStreamCaptureStatusNone
              : s->invalidated    ? cudaStreamCaptureStatusInvalidated
                                  : cudaStreamCaptureStatusActive;
    return cudaSuccess;
}

// ---- graphs

cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long)
{
    *exec = nullptr;
    if (!graph)
        return fail(cudaErrorInvalidValue);
    *exec = new CUgraphExec_st{ graph->ops };   // a copy: the graph may be destroyed
    return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s)
{
    if (!exec)
        return fail(cudaErrorInvalidValue);
    if (!s || !s->capturing) {
        for (auto &op : exec->ops)
            op();
        return cudaSuccess;
    }
    std::vector<std::function<void()>> ops = exec->ops;   // recorded as a whole (a child graph)
    return emu_enqueue(s, [ops] { for (auto &op : ops) op(); });
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec)
{
    delete exec;
    return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph)
{
    delete graph;
    return cudaSuccess;
}
