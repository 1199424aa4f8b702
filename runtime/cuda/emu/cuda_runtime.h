// cuda_runtime.h (emulation) - the subset of the CUDA runtime that
// runtime/cuda/kernels_cuda.cu uses, on the host, for run_emu.sh only: each
// block runs its threads as std::threads (blocks one after another),
// __shared__ is static storage, __syncthreads a std::barrier, shuffles go
// through a per-warp exchange array with warp barriers.  Never on an include
// path of the real build.  Streams, stream capture and graphs: see below.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>
#include <math.h>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
struct dim3 { unsigned x = 1, y = 1, z = 1; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
extern thread_local dim3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
typedef int cudaError_t;
// The codes of the real runtime (driver_types.h), for the ones emulated.
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2, cudaErrorIllegalState = 401,
       cudaErrorNotReady = 600, cudaErrorStreamCaptureUnsupported = 900, cudaErrorStreamCaptureInvalidated = 901,
       cudaErrorStreamCaptureWrongThread = 908 };
typedef struct CUstream_st *cudaStream_t;
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice, cudaMemcpyDefault };
enum { cudaStreamNonBlocking = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };
const char *cudaGetErrorString(cudaError_t e);
// Returns and clears this thread's last launch error (a launch into a
// capture that went wrong; the emulation has no other launch errors).
cudaError_t cudaGetLastError();
inline cudaError_t cudaGetDeviceCount(int *c) { *c = 1; return 0; }
inline cudaError_t cudaSetDevice(int) { return 0; }
inline cudaError_t cudaGetDevice(int *d) { *d = 0; return 0; }
inline cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr, int) { *v = 132; return 0; }

// Asynchronous copies (cudaMemcpyAsync) with a pinned host side are queued
// and run at the latest moment a real device could run them: the next
// synchronisation (cudaEventSynchronize runs the queue up to where that
// event was recorded; cudaStreamSynchronize, cudaMemcpy, cudaMemset,
// cudaFree, cudaFreeHost, a kernel launch and a cuBLAS call run all of it).
// So a pinned staging buffer reused before the event behind its copy has
// completed shows up as wrong weights.  With a pageable host side the copy
// runs at once, as CUDA stages pageable memory before returning.  Not
// emulated: separate streams (one queue for all, in issue order), copies
// overlapping kernels, event timing.  While a stream captures, its copies
// are recorded like its kernels (below) and run at the graph's replay.
struct emu_copy { void *d; const void *s; size_t n; };
struct CUevent_st { uint64_t seq = 0; };
typedef struct CUevent_st *cudaEvent_t;
enum { cudaEventDisableTiming = 2 };
struct emu_async_state {
    std::mutex mu;
    std::vector<emu_copy> queue;
    uint64_t done = 0;                       // copies run so far (the queue starts there)
    std::vector<std::pair<const char *, size_t>> pinned;   // cudaMallocHost blocks
};
inline emu_async_state &emu_async() { static emu_async_state st; return st; }
inline void emu_run_until(uint64_t seq)      // runs the queued copies with index < seq
{
    emu_async_state &st = emu_async();
    std::lock_guard<std::mutex> g(st.mu);
    size_t k = 0;
    while (k < st.queue.size() && st.done + k < seq) {
        memcpy(st.queue[k].d, st.queue[k].s, st.queue[k].n);
        k++;
    }
    st.queue.erase(st.queue.begin(), st.queue.begin() + (long)k);
    st.done += k;
}
inline void emu_sync_all() { emu_run_until(UINT64_MAX); }
inline bool emu_is_pinned(const void *p)
{
    emu_async_state &st = emu_async();
    std::lock_guard<std::mutex> g(st.mu);
    for (auto &b : st.pinned)
        if ((const char *)p >= b.first && (const char *)p < b.first + b.second)
            return true;
    return false;
}

// ---- streams, stream capture and graphs
// Everything runs synchronously on the host: a stream is an identity (for
// its capture state), work on a stream that is not capturing runs at once.
// While a stream captures, the work enqueued on it (emu_launch, i.e. every
// kernel launch, cudaMemcpyAsync, cudaMemsetAsync, cublasGemmEx, a
// cudaGraphLaunch) is recorded by value (the pointers, sizes and scalars of
// the call, not the memory they point to) instead of run; cudaGraphLaunch
// runs the recorded list in order.  As in CUDA: the legacy default stream
// (NULL) cannot be captured; cudaStreamSynchronize of a capturing stream
// fails and invalidates the capture; in Global / ThreadLocal mode the
// capturing thread may not call cudaMalloc, cudaFree, cudaMemcpy, cudaMemset
// or synchronise the legacy stream (Global: neither may any other thread),
// which fails with cudaErrorStreamCaptureUnsupported and invalidates the
// thread's captures, so that cudaStreamEndCapture reports
// cudaErrorStreamCaptureInvalidated; ending a Global / ThreadLocal capture
// from another thread fails with cudaErrorStreamCaptureWrongThread.
// Not modelled: real concurrency between streams or with the host (nothing
// is ever in flight), graph-node dependencies other than one stream's order
// (no event fork/join across streams: cudaEventRecord is a no-op), the rule
// that captured host<->device copies need pinned host memory, NCCL (the
// emulation has no nccl comm), graph updates (cudaGraphExecUpdate).
enum cudaStreamCaptureMode { cudaStreamCaptureModeGlobal = 0, cudaStreamCaptureModeThreadLocal = 1,
                             cudaStreamCaptureModeRelaxed = 2 };
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1,
                               cudaStreamCaptureStatusInvalidated = 2 };
struct CUgraph_st { std::vector<std::function<void()>> ops; };
struct CUgraphExec_st { std::vector<std::function<void()>> ops; };
typedef struct CUgraph_st *cudaGraph_t;
typedef struct CUgraphExec_st *cudaGraphExec_t;
struct CUstream_st {
    bool capturing = false, invalidated = false;
    cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal;
    std::thread::id owner;
    CUgraph_st *graph = nullptr;   // the work recorded so far
};
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, int flags);
inline cudaError_t cudaStreamCreate(cudaStream_t *s) { return cudaStreamCreateWithFlags(s, 0); }
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *graph);
cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus *status);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long flags);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);
cudaError_t cudaGraphDestroy(cudaGraph_t graph);
// Runs op now, or records it when s captures (an error when that capture is
// already invalidated).
cudaError_t emu_enqueue(cudaStream_t s, std::function<void()> op);
// 0 when this thread may make a call that CUDA forbids during a Global /
// ThreadLocal capture; else invalidates the thread's captures and returns
// cudaErrorStreamCaptureUnsupported.
cudaError_t emu_unsafe_call();

inline cudaError_t cudaMalloc(void **p, size_t n)
{
    if (cudaError_t e = emu_unsafe_call()) return e;
    *p = calloc(1, n); return *p ? 0 : cudaErrorMemoryAllocation;
}
// The emulated device's memory: a fixed 16 GiB, 12 GiB of it free (the
// model's KV-cache check reads it; allocations are host memory and do not
// count).
inline cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b)
{
    *free_b = (size_t)12 << 30; *total_b = (size_t)16 << 30; return 0;
}
inline cudaError_t cudaFree(void *p) { if (cudaError_t e = emu_unsafe_call()) return e; emu_sync_all(); free(p); return 0; }
inline cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind)
{
    if (cudaError_t e = emu_unsafe_call()) return e;
    emu_sync_all(); memcpy(d, s, n); return 0;
}
inline cudaError_t cudaMemset(void *d, int v, size_t n) { if (cudaError_t e = emu_unsafe_call()) return e; emu_sync_all(); memset(d, v, n); return 0; }
// Recorded while st captures; else queued (pinned host side) or run at once
// after what is queued (pageable), as described above.
inline cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind k, cudaStream_t st)
{
    if (st && st->capturing)
        return emu_enqueue(st, [=] { memcpy(d, s, n); });
    const void *host = k == cudaMemcpyDeviceToHost ? d : s;
    if (k == cudaMemcpyDefault || k == cudaMemcpyDeviceToDevice || !emu_is_pinned(host)) {
        emu_sync_all();
        memcpy(d, s, n);
        return 0;
    }
    emu_async_state &q = emu_async();
    std::lock_guard<std::mutex> g(q.mu);
    q.queue.push_back({d, s, n});
    return 0;
}
inline cudaError_t cudaMemsetAsync(void *d, int v, size_t n, cudaStream_t st)
{
    return emu_enqueue(st, [=] { memset(d, v, n); });
}
inline cudaError_t cudaMallocHost(void **p, size_t n)
{
    *p = malloc(n ? n : 1);
    if (!*p)
        return 2;
    emu_async_state &st = emu_async();
    std::lock_guard<std::mutex> g(st.mu);
    st.pinned.push_back({(const char *)*p, n ? n : 1});
    return 0;
}
inline cudaError_t cudaFreeHost(void *p)
{
    emu_sync_all();   // the real call waits for the device too
    emu_async_state &st = emu_async();
    {
        std::lock_guard<std::mutex> g(st.mu);
        for (size_t i = 0; i < st.pinned.size(); i++)
            if (st.pinned[i].first == (const char *)p) {
                st.pinned.erase(st.pinned.begin() + (long)i);
                break;
            }
    }
    free(p);
    return 0;
}
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, int) { *e = new CUevent_st(); return 0; }
inline cudaError_t cudaEventDestroy(cudaEvent_t e) { delete e; return 0; }
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t)
{
    emu_async_state &st = emu_async();
    std::lock_guard<std::mutex> g(st.mu);
    e->seq = st.done + st.queue.size();
    return 0;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t e) { emu_run_until(e->seq); return 0; }
template <class F> cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return 0; }

// ---- block execution
struct emu_block {
    std::unique_ptr<std::barrier<>> bar;
    std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
    std::vector<double> xchg;   // per thread slot (doubles hold float/int/double)
};
extern emu_block *emu_cur;
extern std::vector<char> emu_dyn_smem;
extern std::mutex emu_atomic_mu;
inline float *emu_smem() { return (float *)emu_dyn_smem.data(); }
inline void __syncthreads() { emu_cur->bar->arrive_and_wait(); }
template <class T> T emu_shfl(T v, int src_lane)
{
    int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    int w = tid / 32, base = w * 32;
    auto &wb = *emu_cur->warp_bar[w];
    T tmp;
    double slot; memcpy(&slot, &v, sizeof v);   // raw bits
    emu_cur->xchg[tid] = slot;
    wb.arrive_and_wait();
    double got = emu_cur->xchg[base + (src_lane & 31)];
    memcpy(&tmp, &got, sizeof tmp);
    wb.arrive_and_wait();
    return tmp;
}
template <class T> T __shfl_xor_sync(unsigned, T v, int o) { return emu_shfl(v, (int)((threadIdx.x & 31) ^ o)); }
template <class T> T __shfl_sync(unsigned, T v, int l) { return emu_shfl(v, l); }
inline double atomicAdd(double *p, double v) { std::lock_guard<std::mutex> g(emu_atomic_mu); double o = *p; *p += v; return o; }
inline int atomicMin(int *p, int v) { std::lock_guard<std::mutex> g(emu_atomic_mu); int o = *p; if (v < o) *p = v; return o; }
inline int atomicMax(int *p, int v) { std::lock_guard<std::mutex> g(emu_atomic_mu); int o = *p; if (v > o) *p = v; return o; }
inline float __uint_as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline int __float_as_int(float f) { int u; memcpy(&u, &f, 4); return u; }
using std::min; using std::max;

// A kernel launch on stream s (rewrite.py's translation of <<<...>>>): runs
// its blocks one after another now, or is recorded while s captures.
void emu_launch(cudaStream_t s, dim3 grid, dim3 block, size_t smem, std::function<void()> body);
