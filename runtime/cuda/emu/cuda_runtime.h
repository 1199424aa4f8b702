// cuda_runtime.h (emulation) - the subset of the CUDA runtime that
// runtime/cuda/kernels_cuda.cu uses, on the host, for run_emu.sh only: each
// block runs its threads as std::threads (blocks one after another),
// __shared__ is static storage, __syncthreads a std::barrier, shuffles go
// through a per-warp exchange array with warp barriers.  Never on an include
// path of the real build.
#pragma once
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
enum { cudaSuccess = 0, cudaErrorNotReady = 600 };
typedef struct CUstream_st *cudaStream_t;
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDefault };
enum { cudaStreamNonBlocking = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };
inline const char *cudaGetErrorString(cudaError_t) { return "emulated error"; }
inline cudaError_t cudaGetLastError() { return 0; }
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
// overlapping kernels, event timing.
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
inline cudaError_t cudaMalloc(void **p, size_t n) { *p = calloc(1, n); return *p ? 0 : 2; }
inline cudaError_t cudaFree(void *p) { emu_sync_all(); free(p); return 0; }
inline cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind) { emu_sync_all(); memcpy(d, s, n); return 0; }
inline cudaError_t cudaMemset(void *d, int v, size_t n) { emu_sync_all(); memset(d, v, n); return 0; }
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, int) { *s = nullptr; return 0; }
inline cudaError_t cudaStreamDestroy(cudaStream_t) { emu_sync_all(); return 0; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { emu_sync_all(); return 0; }
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
inline cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind k, cudaStream_t)
{
    const void *host = k == cudaMemcpyDeviceToHost ? d : s;
    if (k == cudaMemcpyDefault || !emu_is_pinned(host)) {
        emu_sync_all();   // after what is queued, in stream order
        memcpy(d, s, n);
        return 0;
    }
    emu_async_state &st = emu_async();
    std::lock_guard<std::mutex> g(st.mu);
    st.queue.push_back({d, s, n});
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

void emu_launch(dim3 grid, dim3 block, size_t smem, std::function<void()> body);
