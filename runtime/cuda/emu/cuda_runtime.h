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
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice, cudaMemcpyDefault };
enum { cudaStreamNonBlocking = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };
inline const char *cudaGetErrorString(cudaError_t) { return "emulated error"; }
inline cudaError_t cudaGetLastError() { return 0; }
inline cudaError_t cudaGetDeviceCount(int *c) { *c = 1; return 0; }
inline cudaError_t cudaSetDevice(int) { return 0; }
inline cudaError_t cudaGetDevice(int *d) { *d = 0; return 0; }
inline cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr, int) { *v = 132; return 0; }
inline cudaError_t cudaMalloc(void **p, size_t n) { *p = calloc(1, n); return *p ? 0 : 2; }
inline cudaError_t cudaFree(void *p) { free(p); return 0; }
inline cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind) { memcpy(d, s, n); return 0; }
inline cudaError_t cudaMemset(void *d, int v, size_t n) { memset(d, v, n); return 0; }
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, int) { *s = nullptr; return 0; }
inline cudaError_t cudaStreamDestroy(cudaStream_t) { return 0; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return 0; }
// model_cuda.cu's upload and staging: everything is synchronous host memory.
typedef struct CUevent_st *cudaEvent_t;
enum { cudaEventDisableTiming = 2 };
inline cudaError_t cudaMallocHost(void **p, size_t n) { *p = malloc(n ? n : 1); return *p ? 0 : 2; }
inline cudaError_t cudaFreeHost(void *p) { free(p); return 0; }
inline cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind, cudaStream_t) { memcpy(d, s, n); return 0; }
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, int) { *e = nullptr; return 0; }
inline cudaError_t cudaEventDestroy(cudaEvent_t) { return 0; }
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return 0; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return 0; }
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
