/* kernels_cuda.cu - the CUDA kernels of the forward pass (see kernels_cuda.h).
 *
 * One short kernel per step, llm.c style: fp32 arithmetic, bf16 only where
 * the big weights are read.  Every kernel has a CPU reference in
 * kernels_cpu.h; tests/test_kernels_cuda.c compares them.  The aim of this
 * first version is correctness with sensible memory access (coalesced rows,
 * shared-memory tiles, no score matrix); tensor-core attention is later work.
 */
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <float.h>
#include <math.h>
#include <limits.h>

#include "kernels_cuda.h"

#define FULL_MASK 0xffffffffu

/* ------------------------------------------------------------ host helpers */

static int cuda_fail(cudaError_t e, const char *what, tp_err *err)
{
    return tp_errorf(err, "%s: %s", what, cudaGetErrorString(e));
}

/* After a launch: configuration errors (too much shared memory, a bad grid)
 * are reported here; faults inside the kernel come at the next sync. */
static int launched(const char *kernel, tp_err *err)
{
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return tp_errorf(err, "cuda kernel %s: launch failed: %s", kernel, cudaGetErrorString(e));
    return 0;
}

static unsigned blocks_for(size_t n, unsigned threads)
{
    size_t b = (n + threads - 1) / threads;
    return b > 65535u * 1024u ? 65535u * 1024u : (unsigned)(b ? b : 1);
}

extern "C" int tpc_device_count(int *count, tp_err *err)
{
    *count = 0;
    cudaError_t e = cudaGetDeviceCount(count);
    if (e != cudaSuccess) {
        *count = 0;
        cudaGetLastError();   /* clear the sticky error */
        return cuda_fail(e, "cudaGetDeviceCount", err);
    }
    return 0;
}

extern "C" int tpc_set_device(int device, tp_err *err)
{
    cudaError_t e = cudaSetDevice(device);
    if (e != cudaSuccess)
        return tp_errorf(err, "cudaSetDevice(%d): %s", device, cudaGetErrorString(e));
    return 0;
}

extern "C" int tpc_malloc(void **ptr, size_t bytes, const char *what, tp_err *err)
{
    *ptr = NULL;
    cudaError_t e = cudaMalloc(ptr, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        *ptr = NULL;
        return tp_errorf(err, "cudaMalloc of %zu bytes for %s: %s", bytes, what, cudaGetErrorString(e));
    }
    return 0;
}

extern "C" void tpc_free(void *ptr)
{
    if (ptr)
        cudaFree(ptr);
}

extern "C" int tpc_allocs_malloc(tpc_allocs *a, void **ptr, size_t bytes, const char *what, tp_err *err)
{
    *ptr = NULL;
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 64;
        void **p = (void **)realloc(a->ptrs, cap * sizeof *p);
        if (!p)
            return tp_errorf(err, "out of memory");
        a->ptrs = p;
        a->cap = cap;
    }
    if (tpc_malloc(ptr, bytes, what, err) < 0)
        return -1;
    a->ptrs[a->n++] = *ptr;
    return 0;
}

extern "C" void tpc_allocs_free(tpc_allocs *a)
{
    for (size_t i = 0; i < a->n; i++)
        tpc_free(a->ptrs[i]);
    free(a->ptrs);
    a->ptrs = NULL;
    a->n = a->cap = 0;
}

extern "C" int tpc_upload(void *dst_dev, const void *src_host, size_t bytes, tp_err *err)
{
    cudaError_t e = cudaMemcpy(dst_dev, src_host, bytes, cudaMemcpyHostToDevice);
    return e == cudaSuccess ? 0 : cuda_fail(e, "cudaMemcpy host to device", err);
}

extern "C" int tpc_download(void *dst_host, const void *src_dev, size_t bytes, tp_err *err)
{
    cudaError_t e = cudaMemcpy(dst_host, src_dev, bytes, cudaMemcpyDeviceToHost);
    return e == cudaSuccess ? 0 : cuda_fail(e, "cudaMemcpy device to host", err);
}

extern "C" int tpc_memset(void *dst_dev, int value, size_t bytes, tp_err *err)
{
    cudaError_t e = cudaMemset(dst_dev, value, bytes);
    return e == cudaSuccess ? 0 : cuda_fail(e, "cudaMemset", err);
}

extern "C" int tpc_stream_create(tpc_stream *s, tp_err *err)
{
    cudaStream_t st = NULL;
    cudaError_t e = cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
    *s = st;
    return e == cudaSuccess ? 0 : cuda_fail(e, "cudaStreamCreate", err);
}

extern "C" void tpc_stream_destroy(tpc_stream s)
{
    if (s)
        cudaStreamDestroy(s);
}

extern "C" int tpc_sync(tpc_stream s, tp_err *err)
{
    cudaError_t e = cudaStreamSynchronize(s);
    return e == cudaSuccess ? 0 : cuda_fail(e, "cudaStreamSynchronize (a kernel failed)", err);
}

/* --------------------------------------------------------- device helpers */

__device__ __forceinline__ float bf16_to_f32(uint16_t b) { return __uint_as_float((uint32_t)b << 16); }

__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

/* Sum over the block, returned to every thread.  The leading barrier lets
 * calls follow each other (sh is reused). */
__device__ float block_sum(float v)
{
    __shared__ float sh[32];
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0)
        sh[wid] = v;
    __syncthreads();
    v = threadIdx.x < (unsigned)nw ? sh[threadIdx.x] : 0.0f;
    if (wid == 0)
        v = warp_sum(v);
    if (threadIdx.x == 0)
        sh[0] = v;
    __syncthreads();
    return sh[0];
}

__device__ double block_sum_d(double v)
{
    __shared__ double sh[32];
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(FULL_MASK, v, o);
    __syncthreads();
    if (lane == 0)
        sh[wid] = v;
    __syncthreads();
    if (wid == 0) {
        v = lane < nw ? sh[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1)
            v += __shfl_xor_sync(FULL_MASK, v, o);
        if (lane == 0)
            sh[0] = v;
    }
    __syncthreads();
    return sh[0];
}

/* (value, index) max with tpk/tp_sample's tie rule: larger value wins, equal
 * values go to the lower index; NaN never wins (index INT_MAX: none yet). */
__device__ __forceinline__ void better_of(float &v, int &i, float v2, int i2)
{
    if (v2 > v || (v2 == v && i2 < i)) {
        v = v2;
        i = i2;
    }
}

__device__ void block_argmax(const float *x, int n, float *best_v, int *best_i)
{
    __shared__ float shv[32];
    __shared__ int shi[32];
    float v = -INFINITY;
    int idx = INT_MAX;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        if (x[i] > v) {   /* ascending i: the first of equal values stays */
            v = x[i];
            idx = i;
        }
    for (int o = 16; o > 0; o >>= 1)
        better_of(v, idx, __shfl_xor_sync(FULL_MASK, v, o), __shfl_xor_sync(FULL_MASK, idx, o));
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) {
        shv[wid] = v;
        shi[wid] = idx;
    }
    __syncthreads();
    if (wid == 0) {
        v = lane < nw ? shv[lane] : -INFINITY;
        idx = lane < nw ? shi[lane] : INT_MAX;
        for (int o = 16; o > 0; o >>= 1)
            better_of(v, idx, __shfl_xor_sync(FULL_MASK, v, o), __shfl_xor_sync(FULL_MASK, idx, o));
        if (lane == 0) {
            shv[0] = v;
            shi[0] = idx == INT_MAX ? 0 : idx;   /* nothing above -inf: index 0, as the CPU */
        }
    }
    __syncthreads();
    *best_v = shv[0];
    *best_i = shi[0];
}

/* -------------------------------------------------------------- embedding */

__global__ void embedding_kernel(float *out, const uint16_t *table, const int32_t *ids, int hidden,
                                 int64_t row_start, int64_t row_end)
{
    int t = blockIdx.x;
    int64_t id = ids[t];
    float *dst = out + (size_t)t * hidden;
    if (id >= row_start && id < row_end) {
        const uint16_t *src = table + (size_t)(id - row_start) * hidden;
        for (int i = threadIdx.x; i < hidden; i += blockDim.x)
            dst[i] = bf16_to_f32(src[i]);
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x)
            dst[i] = 0.0f;
    }
}

extern "C" int tpc_embedding(float *out, const uint16_t *table, const int32_t *ids, int n, int hidden,
                             int64_t row_start, int64_t row_end, tpc_stream s, tp_err *err)
{
    if (n <= 0 || hidden <= 0)
        return n == 0 ? 0 : tp_errorf(err, "cuda kernel embedding: n %d, hidden %d", n, hidden);
    embedding_kernel<<<n, 256, 0, s>>>(out, table, ids, hidden, row_start, row_end);
    return launched("embedding", err);
}

/* ---------------------------------------------------------------- rmsnorm */

/* One block per row: the residual add, then the sum of squares, then the
 * scaled output (HF: weight * (x * rsqrt(mean(x^2) + eps))). */
__global__ void add_rmsnorm_kernel(float *x, const float *delta, float *out, const float *w, int dim,
                                   float eps)
{
    float *xr = x + (size_t)blockIdx.x * dim;
    const float *dr = delta ? delta + (size_t)blockIdx.x * dim : NULL;
    float *o = out + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = xr[i];
        if (dr) {
            v += dr[i];
            xr[i] = v;
        }
        ss += v * v;
    }
    ss = block_sum(ss);
    float scale = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x)   /* same thread, same i: sees its own write */
        o[i] = w[i] * (xr[i] * scale);
}

extern "C" int tpc_add_rmsnorm(float *x, const float *delta, float *out, const float *w, int n, int dim,
                               float eps, tpc_stream s, tp_err *err)
{
    if (n <= 0 || dim <= 0)
        return n == 0 ? 0 : tp_errorf(err, "cuda kernel add_rmsnorm: n %d, dim %d", n, dim);
    add_rmsnorm_kernel<<<n, dim >= 1024 ? 1024 : 256, 0, s>>>(x, delta, out, w, dim, eps);
    return launched("add_rmsnorm", err);
}

/* ------------------------------------------------- per-head norm + RoPE */

/* One warp per (token, head) row: optional rmsnorm of the head (qwen3), then
 * the rotate_half RoPE on pairs (i, i + head_dim / 2). */
__global__ void head_norm_rope_kernel(float *x, const float *w, int n, int n_heads, int head_dim,
                                      size_t row_stride, int pos0, const int32_t *pos_dev,
                                      const float *cos_t, const float *sin_t, float eps)
{
    int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
    int row = blockIdx.x * warps + (threadIdx.x >> 5);
    if (pos_dev)
        pos0 = *pos_dev;
    if (row >= n * n_heads || pos0 < 0)
        return;   /* whole warps leave: no block barrier below */
    int t = row / n_heads, h = row % n_heads, half = head_dim / 2;
    float *v = x + (size_t)t * row_stride + (size_t)h * head_dim;
    float scale = 1.0f;
    if (w) {
        float ss = 0.0f;
        for (int d = lane; d < head_dim; d += 32)
            ss += v[d] * v[d];
        ss = warp_sum(ss);
        scale = 1.0f / sqrtf(ss / (float)head_dim + eps);
    }
    const float *c = cos_t + (size_t)(pos0 + t) * half;
    const float *sn = sin_t + (size_t)(pos0 + t) * half;
    for (int i = lane; i < half; i += 32) {
        float a = v[i], b = v[i + half];
        if (w) {
            a = w[i] * (a * scale);
            b = w[i + half] * (b * scale);
        }
        v[i] = a * c[i] - b * sn[i];
        v[i + half] = b * c[i] + a * sn[i];
    }
}

extern "C" int tpc_head_norm_rope_devpos(float *x, const float *w, int n, int n_heads, int head_dim,
                                         size_t row_stride, int pos0, const int32_t *pos_dev,
                                         const float *cos_t, const float *sin_t, float eps, tpc_stream s,
                                         tp_err *err)
{
    if (n == 0)
        return 0;
    if (pos_dev)
        pos0 = 0;   /* read on the device */
    if (n < 0 || n_heads <= 0 || head_dim <= 0 || head_dim % 2 || pos0 < 0)
        return tp_errorf(err, "cuda kernel head_norm_rope: n %d, heads %d, head_dim %d, pos0 %d",
                         n, n_heads, head_dim, pos0);
    int rows = n * n_heads, warps = 4;
    head_norm_rope_kernel<<<(rows + warps - 1) / warps, warps * 32, 0, s>>>(
        x, w, n, n_heads, head_dim, row_stride, pos0, pos_dev, cos_t, sin_t, eps);
    return launched("head_norm_rope", err);
}

extern "C" int tpc_head_norm_rope(float *x, const float *w, int n, int n_heads, int head_dim,
                                  size_t row_stride, int pos0, const float *cos_t, const float *sin_t,
                                  float eps, tpc_stream s, tp_err *err)
{
    return tpc_head_norm_rope_devpos(x, w, n, n_heads, head_dim, row_stride, pos0, NULL, cos_t, sin_t,
                                     eps, s, err);
}

/* ---------------------------------------------------------- KV-cache append */

/* Block (token, kv head).  With pos_dev, a position that does not fit the
 * cache (negative, or past max_seq - n) writes nothing: the launcher cannot
 * check it, and a write past the cache would hit other buffers. */
__global__ void kv_append_kernel(float *k_cache, float *v_cache, int max_seq, const float *k,
                                 const float *v, size_t row_stride, int n_kv_heads, int head_dim,
                                 int pos0, const int32_t *pos_dev)
{
    int t = blockIdx.x / n_kv_heads, h = blockIdx.x % n_kv_heads;
    if (pos_dev) {
        pos0 = *pos_dev;
        if (pos0 < 0 || pos0 > max_seq - (int)(gridDim.x / n_kv_heads))
            return;
    }
    size_t src = (size_t)t * row_stride + (size_t)h * head_dim;
    size_t dst = ((size_t)h * max_seq + pos0 + t) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        k_cache[dst + d] = k[src + d];
        v_cache[dst + d] = v[src + d];
    }
}

extern "C" int tpc_kv_append_devpos(float *k_cache, float *v_cache, int max_seq, const float *k,
                                    const float *v, size_t row_stride, int n, int n_kv_heads, int head_dim,
                                    int pos0, const int32_t *pos_dev, tpc_stream s, tp_err *err)
{
    if (n == 0)
        return 0;
    if (pos_dev)
        pos0 = 0;   /* read (and checked) on the device */
    if (n < 0 || n_kv_heads <= 0 || head_dim <= 0 || pos0 < 0 || (int64_t)pos0 + n > max_seq)
        return tp_errorf(err, "cuda kernel kv_append: %d tokens at position %d do not fit the cache "
                         "of %d (kv heads %d, head_dim %d)", n, pos0, max_seq, n_kv_heads, head_dim);
    kv_append_kernel<<<n * n_kv_heads, 128, 0, s>>>(k_cache, v_cache, max_seq, k, v, row_stride,
                                                   n_kv_heads, head_dim, pos0, pos_dev);
    return launched("kv_append", err);
}

extern "C" int tpc_kv_append(float *k_cache, float *v_cache, int max_seq, const float *k, const float *v,
                             size_t row_stride, int n, int n_kv_heads, int head_dim, int pos0,
                             tpc_stream s, tp_err *err)
{
    return tpc_kv_append_devpos(k_cache, v_cache, max_seq, k, v, row_stride, n, n_kv_heads, head_dim, pos0,
                                NULL, s, err);
}

/* Block (token, kv head) of a batched step: token t's k and v rows into
 * slot slot[t]'s cache at row pos[t]; a slot or position outside the caches
 * writes nothing (the launcher cannot check device arrays). */
__global__ void kv_append_batch_kernel(float *k_cache, float *v_cache, size_t slot_stride, int n_slots,
                                       int max_seq, const float *k, const float *v, size_t row_stride,
                                       int n_kv_heads, int head_dim, const int32_t *slot, const int32_t *pos)
{
    int t = blockIdx.x / n_kv_heads, h = blockIdx.x % n_kv_heads, p = pos[t], sl = slot[t];
    if (p < 0 || p >= max_seq || sl < 0 || sl >= n_slots)
        return;
    size_t src = (size_t)t * row_stride + (size_t)h * head_dim;
    size_t dst = (size_t)sl * slot_stride + ((size_t)h * max_seq + p) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        k_cache[dst + d] = k[src + d];
        v_cache[dst + d] = v[src + d];
    }
}

extern "C" int tpc_kv_append_batch(float *k_cache, float *v_cache, size_t slot_stride, int n_slots, int max_seq,
                                   const float *k, const float *v, size_t row_stride, int n, int n_kv_heads,
                                   int head_dim, const int32_t *slot, const int32_t *pos, tpc_stream s,
                                   tp_err *err)
{
    if (n == 0)
        return 0;
    if (n < 0 || n_kv_heads <= 0 || head_dim <= 0 || n_slots <= 0 || max_seq <= 0 ||
        slot_stride < (size_t)n_kv_heads * max_seq * head_dim)
        return tp_errorf(err, "cuda kernel kv_append_batch: %d tokens into %d slots of %d kv heads x %d "
                         "positions x %d (%zu floats apart)", n, n_slots, n_kv_heads, max_seq, head_dim,
                         slot_stride);
    kv_append_batch_kernel<<<n * n_kv_heads, 128, 0, s>>>(k_cache, v_cache, slot_stride, n_slots, max_seq, k, v,
                                                         row_stride, n_kv_heads, head_dim, slot, pos);
    return launched("kv_append_batch", err);
}

/* ------------------------------------------------------ attention: common */

#define DPL (TPC_MAX_HEAD_DIM / 32)   /* head dims per lane */

/* Checks shared by both attention launchers. */
static int attention_args(const char *kernel, int max_seq, int n, int pos0, int n_heads, int n_kv_heads,
                          int head_dim, tp_err *err)
{
    if (n < 0 || pos0 < 0 || (int64_t)pos0 + n > max_seq)
        return tp_errorf(err, "cuda kernel %s: %d queries at position %d exceed the cache of %d",
                         kernel, n, pos0, max_seq);
    if (n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads)
        return tp_errorf(err, "cuda kernel %s: %d heads do not share %d kv heads evenly", kernel,
                         n_heads, n_kv_heads);
    if (head_dim <= 0 || head_dim > TPC_MAX_HEAD_DIM)
        return tp_errorf(err, "cuda kernel %s: head_dim %d (1 .. %d supported)", kernel, head_dim,
                         TPC_MAX_HEAD_DIM);
    return 0;
}

__device__ __forceinline__ int window_lo(int p, int window)
{
    return window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
}

/* --------------------------------------------------- attention: prefill */

#define PF_QT 16                      /* queries per block */
#define PF_KT 32                      /* keys per tile (one per lane) */
#define PF_WARPS 4
#define PF_QPW (PF_QT / PF_WARPS)     /* queries per warp */

/* Block (query tile, head).  Per key tile: K and V rows go to shared memory;
 * for each of its queries a warp computes 32 scores (lane j: key j), updates
 * the running max m and denominator l (online softmax), rescales its output
 * accumulator (lane: dims lane + 32 i) and adds P V.  K rows are padded by
 * one float so lane j's reads of row j hit distinct banks. */
__global__ void __launch_bounds__(PF_WARPS * 32)
attention_prefill_kernel(float *out, size_t out_stride, const float *q, size_t q_stride,
                         const float *k_cache, const float *v_cache, int max_seq, int n, int pos0,
                         int group, int hd, int window, float scale)
{
    extern __shared__ float smem[];
    float *sQ = smem, *sK = sQ + PF_QT * hd, *sV = sK + PF_KT * (hd + 1);
    int h = blockIdx.y, kvh = h / group, t0 = blockIdx.x * PF_QT;
    int nq = min(PF_QT, n - t0);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float *K = k_cache + (size_t)kvh * max_seq * hd;
    const float *V = v_cache + (size_t)kvh * max_seq * hd;

    for (int i = threadIdx.x; i < PF_QT * hd; i += blockDim.x) {
        int r = i / hd, d = i % hd;
        sQ[i] = r < nq ? q[(size_t)(t0 + r) * q_stride + (size_t)h * hd + d] : 0.0f;
    }
    float m[PF_QPW], l[PF_QPW], acc[PF_QPW][DPL];
#pragma unroll
    for (int qi = 0; qi < PF_QPW; qi++) {
        m[qi] = -INFINITY;
        l[qi] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++)
            acc[qi][i] = 0.0f;
    }
    int first = pos0 + t0, last = first + nq - 1;
    for (int k0 = window_lo(first, window); k0 <= last; k0 += PF_KT) {
        int nk = min(PF_KT, last - k0 + 1);
        __syncthreads();   /* the previous tile is used up (and sQ is written) */
        for (int i = threadIdx.x; i < nk * hd; i += blockDim.x) {
            int r = i / hd, d = i % hd;
            sK[r * (hd + 1) + d] = K[(size_t)(k0 + r) * hd + d];
            sV[r * hd + d] = V[(size_t)(k0 + r) * hd + d];
        }
        __syncthreads();
#pragma unroll
        for (int qi = 0; qi < PF_QPW; qi++) {
            int r = warp * PF_QPW + qi;
            if (r >= nq)
                continue;   /* warp-uniform */
            int p = first + r, j = k0 + lane;
            float sc = -INFINITY;
            if (lane < nk && j <= p && j >= window_lo(p, window)) {
                const float *qr = sQ + r * hd, *kr = sK + lane * (hd + 1);
                float dot = 0.0f;
                for (int d = 0; d < hd; d++)
                    dot += qr[d] * kr[d];
                sc = dot * scale;
            }
            float tmax = warp_max(sc);
            if (tmax == -INFINITY)
                continue;   /* no key of this tile is visible to query r (warp-uniform) */
            float mnew = fmaxf(m[qi], tmax);
            float corr = expf(m[qi] - mnew);   /* 0 on the first visible tile */
            float pj = expf(sc - mnew);        /* 0 for masked keys */
            l[qi] = l[qi] * corr + warp_sum(pj);
#pragma unroll
            for (int i = 0; i < DPL; i++)
                acc[qi][i] *= corr;
            for (int jj = 0; jj < nk; jj++) {
                float pb = __shfl_sync(FULL_MASK, pj, jj);
#pragma unroll
                for (int i = 0; i < DPL; i++) {
                    int d = lane + 32 * i;
                    if (d < hd)
                        acc[qi][i] += pb * sV[jj * hd + d];
                }
            }
            m[qi] = mnew;
        }
    }
#pragma unroll
    for (int qi = 0; qi < PF_QPW; qi++) {
        int r = warp * PF_QPW + qi;
        if (r >= nq)
            continue;
        float inv = 1.0f / l[qi];   /* l > 0: every query sees its own key */
        float *o = out + (size_t)(t0 + r) * out_stride + (size_t)h * hd;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            int d = lane + 32 * i;
            if (d < hd)
                o[d] = acc[qi][i] * inv;
        }
    }
}

extern "C" int tpc_attention_prefill(float *out, size_t out_stride, const float *q, size_t q_stride,
                                     const float *k_cache, const float *v_cache, int max_seq, int n,
                                     int pos0, int n_heads, int n_kv_heads, int head_dim, int window,
                                     float scale, tpc_stream s, tp_err *err)
{
    if (attention_args("attention_prefill", max_seq, n, pos0, n_heads, n_kv_heads, head_dim, err))
        return -1;
    if (n == 0)
        return 0;
    size_t smem = (size_t)(PF_QT * head_dim + PF_KT * (head_dim + 1) + PF_KT * head_dim) * sizeof(float);
    if (smem > 48 * 1024) {
        /* head_dim > 128: opt in to more than the default 48 KB. */
        cudaError_t e = cudaFuncSetAttribute(attention_prefill_kernel,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess)
            return tp_errorf(err, "cuda kernel attention_prefill: %zu bytes of shared memory for head_dim "
                             "%d: %s", smem, head_dim, cudaGetErrorString(e));
    }
    dim3 grid((n + PF_QT - 1) / PF_QT, n_heads);
    attention_prefill_kernel<<<grid, PF_WARPS * 32, smem, s>>>(out, out_stride, q, q_stride, k_cache,
                                                               v_cache, max_seq, n, pos0,
                                                               n_heads / n_kv_heads, head_dim, window,
                                                               scale);
    return launched("attention_prefill", err);
}

/* ---------------------------------------------------- attention: decode */

#define DC_WARPS 4

/* The keys of a decode step are dealt in splits of at least 32 keys, at most
 * max_splits of them: the chunk of keys per split for a step whose last query
 * sees keys keys (keys >= 1).  The host path sizes its grid with the same
 * rule (so the two paths split alike and give the same bits). */
__host__ __device__ __forceinline__ int decode_chunk(int keys, int max_splits)
{
    int by_keys = (keys + 31) / 32;
    int n_splits = max_splits < by_keys ? max_splits : by_keys;
    return (keys + n_splits - 1) / n_splits;
}

__host__ __device__ __forceinline__ int decode_keys(int pos0, int n, int window)
{
    int keys = pos0 + n;
    return window > 0 && window < keys ? window : keys;
}

/* One block's split of keys [j0, j1) of one query (qr) against one kv
 * head's rows K and V: the keys are dealt to 4 warps, one key at a time per
 * warp (lanes split head_dim: coalesced 4-byte loads, a shuffle-sum for the
 * dot product), each keeping an online softmax; the warps merge in shared
 * memory and the block writes its partial (max, denominator, unnormalised
 * output) to dst.  An empty range writes (-inf, 0, zeros), which the
 * combine skips.  Shared by the decode and the batched kernels, so that a
 * token gives the same bits through either. */
__device__ void decode_split(float *dst, const float *qr, const float *K, const float *V, int hd, int j0, int j1,
                             float scale)
{
    __shared__ float s_m[DC_WARPS], s_l[DC_WARPS], s_acc[DC_WARPS][TPC_MAX_HEAD_DIM];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float qreg[DPL], acc[DPL], m = -INFINITY, l = 0.0f;
#pragma unroll
    for (int i = 0; i < DPL; i++) {
        int d = lane + 32 * i;
        qreg[i] = d < hd ? qr[d] : 0.0f;
        acc[i] = 0.0f;
    }
    for (int j = j0 + warp; j < j1; j += DC_WARPS) {
        const float *kr = K + (size_t)j * hd, *vr = V + (size_t)j * hd;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            int d = lane + 32 * i;
            if (d < hd)
                dot += qreg[i] * kr[d];
        }
        float sc = warp_sum(dot) * scale;
        float mnew = fmaxf(m, sc), corr = expf(m - mnew), pj = expf(sc - mnew);
        l = l * corr + pj;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            int d = lane + 32 * i;
            acc[i] = acc[i] * corr + (d < hd ? pj * vr[d] : 0.0f);
        }
        m = mnew;
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < DPL; i++)
        if (lane + 32 * i < hd)
            s_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    float mall = -INFINITY;
    for (int w = 0; w < DC_WARPS; w++)
        mall = fmaxf(mall, s_m[w]);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < DC_WARPS; w++)
            if (s_m[w] != -INFINITY)
                o += expf(s_m[w] - mall) * s_acc[w][d];
        dst[2 + d] = o;
    }
    if (threadIdx.x == 0) {
        float lall = 0.0f;
        for (int w = 0; w < DC_WARPS; w++)
            if (s_m[w] != -INFINITY)
                lall += expf(s_m[w] - mall) * s_l[w];
        dst[0] = mall;   /* -inf: an empty split */
        dst[1] = lall;
    }
}

/* Block (split, head, token): decode_split over the split's keys.
 * pos_dev (graph replays): the position comes from the device and the chunk
 * is worked out here from it, by decode_chunk over the grid's splits (sized
 * for max_seq keys, so splits past the last key are empty); a position
 * outside the cache makes every split empty, and the combine's 0 / 0 writes
 * NaN: visible, and nothing is read past the cache. */
__global__ void __launch_bounds__(DC_WARPS * 32)
attention_decode_kernel(float *part, const float *q, size_t q_stride, const float *k_cache,
                        const float *v_cache, int max_seq, int pos0, const int32_t *pos_dev, int n_heads,
                        int group, int hd, int window, float scale, int chunk)
{
    int split = blockIdx.x, h = blockIdx.y, t = blockIdx.z, n_splits = gridDim.x;
    if (pos_dev) {
        int n = gridDim.z;
        pos0 = *pos_dev;
        if (pos0 >= 0 && pos0 <= max_seq - n) {
            chunk = decode_chunk(decode_keys(pos0, n, window), n_splits);
        } else {
            pos0 = 0;
            chunk = 0;   /* every split empty */
        }
    }
    int p = pos0 + t, lo = window_lo(p, window);
    int j0 = lo + split * chunk, j1 = min(p + 1, j0 + chunk);
    const float *K = k_cache + (size_t)(h / group) * max_seq * hd;
    const float *V = v_cache + (size_t)(h / group) * max_seq * hd;
    const float *qr = q + (size_t)t * q_stride + (size_t)h * hd;
    float *dst = part + (((size_t)t * n_heads + h) * n_splits + split) * (hd + 2);
    decode_split(dst, qr, K, V, hd, j0, j1, scale);
}

/* Block (split, head, token) of a batched step: token t reads its slot
 * slot[t]'s cache (k_cache + slot * slot_stride) up to its own position
 * pos[t], with its own chunk (decode_chunk of its keys over the grid's
 * splits, sized for the most keys a cache holds).  A slot or position
 * outside the caches makes the token's splits empty (NaN out, nothing read
 * past the caches): the launcher cannot check device arrays. */
__global__ void __launch_bounds__(DC_WARPS * 32)
attention_batch_kernel(float *part, const float *q, size_t q_stride, const float *k_cache, const float *v_cache,
                       size_t slot_stride, int n_slots, int max_seq, const int32_t *slot, const int32_t *pos,
                       int n_heads, int group, int hd, int window, float scale)
{
    int split = blockIdx.x, h = blockIdx.y, t = blockIdx.z, n_splits = gridDim.x;
    int p = pos[t], sl = slot[t], chunk = 0;
    if (p >= 0 && p < max_seq && sl >= 0 && sl < n_slots)
        chunk = decode_chunk(decode_keys(p, 1, window), n_splits);
    else
        p = sl = 0;
    int lo = window_lo(p, window);
    int j0 = lo + split * chunk, j1 = min(p + 1, j0 + chunk);
    size_t kv = (size_t)sl * slot_stride + (size_t)(h / group) * max_seq * hd;
    const float *qr = q + (size_t)t * q_stride + (size_t)h * hd;
    float *dst = part + (((size_t)t * n_heads + h) * n_splits + split) * (hd + 2);
    decode_split(dst, qr, k_cache + kv, v_cache + kv, hd, j0, j1, scale);
}

/* Block (head, token): merges the splits' partial softmaxes. */
__global__ void attention_combine_kernel(float *out, size_t out_stride, const float *part, int n_heads,
                                         int n_splits, int hd)
{
    int h = blockIdx.x, t = blockIdx.y;
    const float *src = part + ((size_t)t * n_heads + h) * n_splits * (hd + 2);
    float mall = -INFINITY;
    for (int sp = 0; sp < n_splits; sp++)
        mall = fmaxf(mall, src[(size_t)sp * (hd + 2)]);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.0f, l = 0.0f;
        for (int sp = 0; sp < n_splits; sp++) {
            const float *ps = src + (size_t)sp * (hd + 2);
            if (ps[0] == -INFINITY)
                continue;
            float f = expf(ps[0] - mall);
            l += f * ps[1];
            o += f * ps[2 + d];
        }
        out[(size_t)t * out_stride + (size_t)h * hd + d] = o / l;
    }
}

extern "C" size_t tpc_attention_decode_workspace(int n, int n_heads, int head_dim)
{
    /* TPC_DECODE_MAX_SPLITS partials per (token, head): enough for any grid,
     * the position-independent one of the pos_dev path included. */
    if (n <= 0 || n_heads <= 0 || head_dim <= 0)
        return 0;
    return (size_t)n * n_heads * TPC_DECODE_MAX_SPLITS * (head_dim + 2) * sizeof(float);
}

static int sm_count(void)
{
    int dev = 0, sms = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) {
        cudaGetLastError();
        return 108;   /* an A100's count: only sizes the split */
    }
    return sms;
}

/* The splits of a decode grid: enough for about two blocks per
 * multiprocessor over n tokens' n_heads heads, each split at least 32 of
 * the keys the grid is sized for (as decode_chunk), at most
 * TPC_DECODE_MAX_SPLITS. */
static int decode_splits(int keys, int n, int n_heads)
{
    int max_splits = (2 * sm_count() + n_heads * n - 1) / (n_heads * n);
    if (max_splits > TPC_DECODE_MAX_SPLITS)
        max_splits = TPC_DECODE_MAX_SPLITS;
    if (max_splits < 1)
        max_splits = 1;
    int by_keys = (keys + 31) / 32;
    return max_splits < by_keys ? max_splits : by_keys;
}

extern "C" int tpc_attention_decode_devpos(float *out, size_t out_stride, const float *q, size_t q_stride,
                                           const float *k_cache, const float *v_cache, int max_seq, int n,
                                           int pos0, const int32_t *pos_dev, int n_heads, int n_kv_heads,
                                           int head_dim, int window, float scale, void *workspace,
                                           size_t workspace_bytes, tpc_stream s, tp_err *err)
{
    if (pos_dev)
        pos0 = 0;   /* read (and checked) on the device */
    if (attention_args("attention_decode", max_seq, n, pos0, n_heads, n_kv_heads, head_dim, err))
        return -1;
    if (n == 0)
        return 0;
    size_t need = tpc_attention_decode_workspace(n, n_heads, head_dim);
    if (!workspace || workspace_bytes < need)
        return tp_errorf(err, "cuda kernel attention_decode: workspace of %zu bytes, %zu needed",
                         workspace_bytes, need);
    /* Enough splits for about two blocks per multiprocessor, each split at
     * least 32 keys (decode_chunk), sized by the most keys one query sees:
     * this step's (host position), or the most the cache can hold (pos_dev:
     * the grid may not depend on the position; the kernel works out the
     * chunk, and the splits past the last key stay empty). */
    int keys = pos_dev ? decode_keys(max_seq - n, n, window) : decode_keys(pos0, n, window);
    int n_splits = decode_splits(keys, n, n_heads);
    int chunk = (keys + n_splits - 1) / n_splits;
    float *part = (float *)workspace;
    dim3 grid(n_splits, n_heads, n);
    attention_decode_kernel<<<grid, DC_WARPS * 32, 0, s>>>(part, q, q_stride, k_cache, v_cache, max_seq,
                                                           pos0, pos_dev, n_heads, n_heads / n_kv_heads,
                                                           head_dim, window, scale, chunk);
    if (launched("attention_decode", err))
        return -1;
    attention_combine_kernel<<<dim3(n_heads, n), head_dim >= 128 ? 128 : 64, 0, s>>>(
        out, out_stride, part, n_heads, n_splits, head_dim);
    return launched("attention_combine", err);
}

extern "C" int tpc_attention_decode(float *out, size_t out_stride, const float *q, size_t q_stride,
                                    const float *k_cache, const float *v_cache, int max_seq, int n,
                                    int pos0, int n_heads, int n_kv_heads, int head_dim, int window,
                                    float scale, void *workspace, size_t workspace_bytes, tpc_stream s,
                                    tp_err *err)
{
    return tpc_attention_decode_devpos(out, out_stride, q, q_stride, k_cache, v_cache, max_seq, n, pos0, NULL,
                                       n_heads, n_kv_heads, head_dim, window, scale, workspace,
                                       workspace_bytes, s, err);
}

extern "C" int tpc_attention_batch(float *out, size_t out_stride, const float *q, size_t q_stride,
                                   const float *k_cache, const float *v_cache, size_t slot_stride, int n_slots,
                                   int max_seq, int n, const int32_t *slot, const int32_t *pos, int n_heads,
                                   int n_kv_heads, int head_dim, int window, float scale, void *workspace,
                                   size_t workspace_bytes, tpc_stream s, tp_err *err)
{
    /* n may exceed max_seq (several slots' tokens): the positions are per token */
    if (attention_args("attention_batch", max_seq, 0, 0, n_heads, n_kv_heads, head_dim, err))
        return -1;
    if (n < 0 || max_seq <= 0)
        return tp_errorf(err, "cuda kernel attention_batch: %d tokens, a cache of %d", n, max_seq);
    if (n_slots <= 0 || slot_stride < (size_t)n_kv_heads * max_seq * head_dim)
        return tp_errorf(err, "cuda kernel attention_batch: %d slots %zu floats apart do not hold %d kv heads "
                         "of %d positions", n_slots, slot_stride, n_kv_heads, max_seq);
    if (n == 0)
        return 0;
    size_t need = tpc_attention_decode_workspace(n, n_heads, head_dim);
    if (!workspace || workspace_bytes < need)
        return tp_errorf(err, "cuda kernel attention_batch: workspace of %zu bytes, %zu needed",
                         workspace_bytes, need);
    /* sized for the most keys one token can see: the splits past a token's
     * last key stay empty */
    int keys = decode_keys(max_seq - 1, 1, window);
    int n_splits = decode_splits(keys, n, n_heads);
    dim3 grid(n_splits, n_heads, n);
    attention_batch_kernel<<<grid, DC_WARPS * 32, 0, s>>>((float *)workspace, q, q_stride, k_cache, v_cache,
                                                          slot_stride, n_slots, max_seq, slot, pos, n_heads,
                                                          n_heads / n_kv_heads, head_dim, window, scale);
    if (launched("attention_batch", err))
        return -1;
    attention_combine_kernel<<<dim3(n_heads, n), head_dim >= 128 ? 128 : 64, 0, s>>>(
        out, out_stride, (const float *)workspace, n_heads, n_splits, head_dim);
    return launched("attention_combine", err);
}

/* ------------------------------------------------- elementwise kernels */

__global__ void silu_mul_kernel(float *gate, const float *up, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

extern "C" int tpc_silu_mul(float *gate, const float *up, size_t n, tpc_stream s, tp_err *err)
{
    if (n == 0)
        return 0;
    silu_mul_kernel<<<blocks_for(n, 256), 256, 0, s>>>(gate, up, n);
    return launched("silu_mul", err);
}

__global__ void add_bias_kernel(float *y, const float *b, size_t total, int dim)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
        y[i] += b[i % dim];
}

extern "C" int tpc_add_bias(float *y, const float *b, int n, int dim, tpc_stream s, tp_err *err)
{
    if (n <= 0 || dim <= 0)
        return n == 0 ? 0 : tp_errorf(err, "cuda kernel add_bias: n %d, dim %d", n, dim);
    size_t total = (size_t)n * dim;
    add_bias_kernel<<<blocks_for(total, 256), 256, 0, s>>>(y, b, total, dim);
    return launched("add_bias", err);
}

/* ------------------------------------------------------ mixture of experts */

/* p[a] before p[b] in the top k: tpk_router_topk's order (kernels_cpu.c). */
__device__ static bool router_before(float pa, int a, float pb, int b)
{
    return pa > pb || (pa == pb && a < b);
}

/* One thread per token: the softmax's max and sum in the CPU's order, then
 * the k winners by k scans (k is small: 2..8), each taking the best expert
 * ranked after the previous winner. */
__global__ void router_topk_kernel(int32_t *idx, float *weight, const float *logits, int n, int E, int k,
                                   bool renorm)
{
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n)
        return;
    const float *l = logits + (size_t)t * E;
    float mx = l[0];
    for (int e = 1; e < E; e++)
        mx = l[e] > mx ? l[e] : mx;
    float sum = 0.0f;
    for (int e = 0; e < E; e++)
        sum += expf(l[e] - mx);
    float total = 0.0f, prev_p = 0.0f;
    int prev = -1;
    for (int j = 0; j < k; j++) {
        int best = -1;
        float best_p = 0.0f;
        for (int e = 0; e < E; e++) {
            float p = expf(l[e] - mx) / sum;
            if (prev >= 0 && !router_before(prev_p, prev, p, e))
                continue;   /* ranked at or before an earlier winner */
            if (best < 0 || router_before(p, e, best_p, best)) {
                best = e;
                best_p = p;
            }
        }
        idx[(size_t)t * k + j] = best;
        weight[(size_t)t * k + j] = best_p;
        total += best_p;
        prev = best;
        prev_p = best_p;
    }
    if (renorm)
        for (int j = 0; j < k; j++)
            weight[(size_t)t * k + j] /= total;
}

extern "C" int tpc_router_topk(int32_t *idx, float *weight, const float *logits, int n, int n_experts, int k,
                               bool renorm, tpc_stream s, tp_err *err)
{
    if (n < 0 || n_experts <= 0 || k <= 0 || k > n_experts)
        return tp_errorf(err, "cuda kernel router_topk: n %d, n_experts %d, k %d", n, n_experts, k);
    if (n == 0)
        return 0;
    router_topk_kernel<<<blocks_for((size_t)n, 64), 64, 0, s>>>(idx, weight, logits, n, n_experts, k, renorm);
    return launched("router_topk", err);
}

/* One block per (token, expert): the dot product of the fp32 row with the
 * bf16 router row, fp32 products and sums (block_sum). */
__global__ void router_logits_kernel(float *logits, const float *x, const uint16_t *w, int E, int H)
{
    int t = blockIdx.x / E, e = blockIdx.x % E;
    const float *xr = x + (size_t)t * H;
    const uint16_t *wr = w + (size_t)e * H;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        acc += xr[i] * bf16_to_f32(wr[i]);
    acc = block_sum(acc);
    if (threadIdx.x == 0)
        logits[(size_t)t * E + e] = acc;
}

extern "C" int tpc_router_logits(float *logits, const float *x, const uint16_t *w, int n, int n_experts, int hidden,
                                 tpc_stream s, tp_err *err)
{
    if (n < 0 || n_experts <= 0 || hidden <= 0 || (size_t)n * n_experts > 0x7fffffffu)
        return tp_errorf(err, "cuda kernel router_logits: n %d, n_experts %d, hidden %d", n, n_experts, hidden);
    if (n == 0)
        return 0;
    router_logits_kernel<<<(unsigned)(n * n_experts), 128, 0, s>>>(logits, x, w, n_experts, hidden);
    return launched("router_logits", err);
}

__global__ void gather_rows_kernel(float *x, const float *h, const int32_t *tok, size_t total, int dim)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
        x[i] = h[(size_t)tok[i / dim] * dim + i % dim];
}

extern "C" int tpc_gather_rows(float *x, const float *h, const int32_t *tok, int m, int dim, tpc_stream s,
                               tp_err *err)
{
    if (m < 0 || dim <= 0)
        return tp_errorf(err, "cuda kernel gather_rows: m %d, dim %d", m, dim);
    size_t total = (size_t)m * dim;
    if (total == 0)
        return 0;
    gather_rows_kernel<<<blocks_for(total, 256), 256, 0, s>>>(x, h, tok, total, dim);
    return launched("gather_rows", err);
}

__global__ void scatter_add_rows_kernel(float *out, const float *y, const int32_t *tok, const float *w,
                                        size_t total, int dim)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        size_t j = i / dim;
        out[(size_t)tok[j] * dim + i % dim] += w[j] * y[i];
    }
}

extern "C" int tpc_scatter_add_rows(float *out, const float *y, const int32_t *tok, const float *w, int m, int dim,
                                    tpc_stream s, tp_err *err)
{
    if (m < 0 || dim <= 0)
        return tp_errorf(err, "cuda kernel scatter_add_rows: m %d, dim %d", m, dim);
    size_t total = (size_t)m * dim;
    if (total == 0)
        return 0;
    scatter_add_rows_kernel<<<blocks_for(total, 256), 256, 0, s>>>(out, y, tok, w, total, dim);
    return launched("scatter_add_rows", err);
}

__global__ void f32_to_bf16_kernel(uint16_t *dst, const float *src, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __bfloat16_as_ushort(__float2bfloat16_rn(src[i]));
}

extern "C" int tpc_f32_to_bf16(uint16_t *dst, const float *src, size_t n, tpc_stream s, tp_err *err)
{
    if (n == 0)
        return 0;
    f32_to_bf16_kernel<<<blocks_for(n, 256), 256, 0, s>>>(dst, src, n);
    return launched("f32_to_bf16", err);
}

/* ------------------------------------------------------------- argmax */

__global__ void argmax_kernel(tpc_argmax_result *res, const float *x, int n, int32_t id_offset)
{
    float v;
    int i;
    block_argmax(x, n, &v, &i);
    if (threadIdx.x == 0) {
        res->value = v;
        res->id = id_offset + i;
    }
}

extern "C" int tpc_argmax(tpc_argmax_result *out, const float *logits, int n, int32_t id_offset,
                          tpc_stream s, tp_err *err)
{
    if (n <= 0)
        return tp_errorf(err, "cuda kernel argmax: %d logits", n);
    /* One block: a vocabulary slice is at most a few hundred KB. */
    argmax_kernel<<<1, 1024, 0, s>>>(out, logits, n, id_offset);
    return launched("argmax", err);
}

/* The ranks' winners of a vocab-parallel greedy pick (gathered into one
 * array): better_of's rule over (value, id), NaN taken as -inf so that it
 * never wins; when nothing is above -inf the lowest id wins, i.e. the first
 * slice's id_offset, as tpc_argmax over the whole vocabulary would say. */
__global__ void argmax_combine_kernel(int32_t *out_id, const tpc_argmax_result *per_rank, int world)
{
    float v = -INFINITY;
    int id = INT_MAX;
    for (int r = 0; r < world; r++) {
        float rv = per_rank[r].value;
        if (rv != rv)
            rv = -INFINITY;
        if (rv > v || (rv == v && per_rank[r].id < id)) {
            v = rv;
            id = per_rank[r].id;
        }
    }
    *out_id = id;
}

extern "C" int tpc_argmax_combine(int32_t *out_id, const tpc_argmax_result *per_rank, int world,
                                  tpc_stream s, tp_err *err)
{
    if (world <= 0)
        return tp_errorf(err, "cuda kernel argmax_combine: %d ranks", world);
    argmax_combine_kernel<<<1, 1, 0, s>>>(out_id, per_rank, world);
    return launched("argmax_combine", err);
}

/* --------------------------------------------- device-side position */

__global__ void set_i32_kernel(int32_t *dst, int32_t value) { *dst = value; }

__global__ void advance_pos_kernel(int32_t *pos_dev, int by) { *pos_dev += by; }

extern "C" int tpc_set_i32(int32_t *dst, int32_t value, tpc_stream s, tp_err *err)
{
    set_i32_kernel<<<1, 1, 0, s>>>(dst, value);
    return launched("set_i32", err);
}

extern "C" int tpc_advance_pos(int32_t *pos_dev, int by, tpc_stream s, tp_err *err)
{
    advance_pos_kernel<<<1, 1, 0, s>>>(pos_dev, by);
    return launched("advance_pos", err);
}

/* ------------------------------------------------------------ CUDA graphs */

/* A failed capture call leaves its (not sticky) error as the thread's last
 * error, which the next launcher's cudaGetLastError would blame on itself:
 * cleared once reported. */
static int capture_fail(cudaError_t e, const char *what, tp_err *err)
{
    cudaGetLastError();
    return cuda_fail(e, what, err);
}

extern "C" int tpc_capture_begin(tpc_stream s, tp_err *err)
{
    if (!s)
        return tp_errorf(err, "cudaStreamBeginCapture: the legacy default stream cannot be captured "
                         "(use a stream of tpc_stream_create)");
    /* Thread-local: the tp ranks of one process may be threads, each
     * capturing its own stream while another still loads or prefills; in
     * Global mode one rank's capture would forbid the others' cudaMalloc and
     * synchronous copies.  This thread's own unsafe calls stay forbidden. */
    cudaError_t e = cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
    return e == cudaSuccess ? 0 : capture_fail(e, "cudaStreamBeginCapture", err);
}

extern "C" int tpc_capture_end(tpc_stream s, tpc_graph *graph, tp_err *err)
{
    *graph = NULL;
    cudaGraph_t g = NULL;
    cudaError_t e = cudaStreamEndCapture(s, &g);
    if (e != cudaSuccess) {
        if (g)
            cudaGraphDestroy(g);
        return capture_fail(e, "cudaStreamEndCapture (the capture failed)", err);
    }
    cudaGraphExec_t exec = NULL;
    e = cudaGraphInstantiate(&exec, g, 0);
    cudaGraphDestroy(g);   /* the executable graph is a copy */
    if (e != cudaSuccess)
        return capture_fail(e, "cudaGraphInstantiate", err);
    *graph = exec;
    return 0;
}

extern "C" int tpc_graph_launch(tpc_graph graph, tpc_stream s, tp_err *err)
{
    cudaError_t e = cudaGraphLaunch(graph, s);
    return e == cudaSuccess ? 0 : capture_fail(e, "cudaGraphLaunch", err);
}

extern "C" void tpc_graph_destroy(tpc_graph graph)
{
    if (graph)
        cudaGraphExecDestroy(graph);
}

/* ------------------------------------------------------------ sampling */

/* Which tokens are still in the running: probability above the floor F, or
 * equal to it with an id up to the cut C (ties at the floor: lower ids
 * first, as tp_sample's order); never probability 0. */
struct sample_set {
    float floor;
    int cut;
};

__device__ __forceinline__ bool in_set(float p, int i, sample_set set)
{
    return p > 0.0f && (p > set.floor || (p == set.floor && i <= set.cut));
}

struct sample_shared {
    double hist[256];
    double chunk[1024];
    int counts[1024];
    double acc;
    int sel, owner, local, found, ties;
};

/* Radix descent over the bits of the set's probabilities (non-negative
 * floats order like their bit patterns), largest first.  Finds the value tau
 * where the weight (1 per element, or its probability) of the elements above
 * tau stays below target while including tau's reaches it (reach_ge:
 * >= target; else > target).  *above: the weight strictly above tau.  false
 * when the whole set does not reach target. */
__device__ bool radix_descend(const float *p, int n, sample_set set, bool by_mass, double target,
                              bool reach_ge, float *tau, double *above, sample_shared *sh)
{
    uint32_t prefix = 0, mask = 0;
    double acc = 0.0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x)
            sh->hist[i] = 0.0;
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            float v = p[i];
            uint32_t b = __float_as_uint(v);
            if (in_set(v, i, set) && (b & mask) == prefix)
                atomicAdd(&sh->hist[(b >> shift) & 255u], by_mass ? (double)v : 1.0);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int sel = -1;
            for (int d = 255; d >= 0; d--) {
                double w = sh->hist[d];
                if (w == 0.0)
                    continue;
                if (reach_ge ? acc + w >= target : acc + w > target) {
                    sel = d;
                    break;
                }
                acc += w;
            }
            sh->sel = sel;
            sh->acc = acc;
        }
        __syncthreads();
        int sel = sh->sel;
        acc = sh->acc;
        if (sel < 0)
            return false;
        prefix |= (uint32_t)sel << shift;
        mask |= 255u << shift;
    }
    *tau = __uint_as_float(prefix);
    *above = acc;
    return true;
}

/* The id of the r-th (1-based) member of the set equal to tau in id order
 * (r is clamped to the number of them, returned in *ties); each thread scans
 * a contiguous range of ids so that the ranges concatenate in order. */
__device__ int nth_tie(const float *p, int n, sample_set set, float tau, int r, int *ties,
                       sample_shared *sh)
{
    int per = (n + blockDim.x - 1) / blockDim.x;
    int lo = threadIdx.x * per, hi = min(n, lo + per), cnt = 0;
    for (int i = lo; i < hi; i++)
        cnt += p[i] == tau && in_set(p[i], i, set);
    __syncthreads();
    sh->counts[threadIdx.x] = cnt;
    __syncthreads();
    if (threadIdx.x == 0) {
        int total = 0;
        for (unsigned w = 0; w < blockDim.x; w++)
            total += sh->counts[w];
        int want = r < 1 ? 1 : (r > total ? total : r), acc = 0;
        sh->ties = total;
        sh->owner = -1;
        for (unsigned w = 0; w < blockDim.x && total > 0; w++) {
            if (acc + sh->counts[w] >= want) {
                sh->owner = (int)w;
                sh->local = want - acc;
                break;
            }
            acc += sh->counts[w];
        }
        sh->found = -1;
    }
    __syncthreads();
    if ((int)threadIdx.x == sh->owner) {
        int k = 0;
        for (int i = lo; i < hi; i++)
            if (p[i] == tau && in_set(p[i], i, set) && ++k == sh->local) {
                sh->found = i;
                break;
            }
    }
    __syncthreads();
    *ties = sh->ties;
    return sh->found;
}

/* With no top-k / top-p filter tp_sample draws in id order (no sort): the
 * first id whose running sum passes target; fallback when rounding leaves
 * target past the end.  Each thread sums a contiguous range of ids. */
__device__ int draw_in_id_order(const float *p, int n, double target, int fallback, sample_shared *sh)
{
    int per = (n + blockDim.x - 1) / blockDim.x;
    int lo = threadIdx.x * per, hi = min(n, lo + per);
    double sum = 0.0;
    for (int i = lo; i < hi; i++)
        sum += p[i];
    __syncthreads();
    sh->chunk[threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        double cum = 0.0;
        sh->owner = -1;
        for (unsigned w = 0; w < blockDim.x; w++) {
            if (target < cum + sh->chunk[w]) {
                sh->owner = (int)w;
                sh->acc = cum;
                break;
            }
            cum += sh->chunk[w];
        }
        sh->found = fallback;
    }
    __syncthreads();
    if ((int)threadIdx.x == sh->owner) {
        double cum = sh->acc;
        for (int i = lo; i < hi; i++) {
            cum += p[i];
            if (target < cum) {
                sh->found = i;
                break;
            }
        }
    }
    __syncthreads();
    return sh->found;
}

__device__ double set_mass(const float *p, int n, sample_set set)
{
    double m = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        if (in_set(p[i], i, set))
            m += p[i];
    return block_sum_d(m);
}

/* One block of 1024 threads does the whole draw (see tpc_sample). */
__global__ void __launch_bounds__(1024)
sample_kernel(int32_t *out_id, const float *logits, int vocab, float temperature, int top_k, float top_p,
              double u, const double *u_dev, float *probs)
{
    if (u_dev)
        u = *u_dev;   /* a graph replays the kernel: the draw comes from memory */
    __shared__ sample_shared sh;
    float maxv;
    int best;
    block_argmax(logits, vocab, &maxv, &best);
    if (!(temperature > 0.0f) || top_k == 1 || maxv == -INFINITY) {
        if (threadIdx.x == 0)
            *out_id = best;
        return;
    }
    /* Unnormalised softmax as tp_sample computes it; NaN logits get 0. */
    double inv_t = 1.0 / temperature, total = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float l = logits[i];
        float pr = l == l ? (float)exp(((double)l - maxv) * inv_t) : 0.0f;
        probs[i] = pr;
        total += pr;
    }
    total = block_sum_d(total);   /* its barriers also publish probs */

    sample_set set = { 0.0f, INT_MAX };
    double mass = total;
    int k = top_k > 0 && top_k < vocab ? top_k : vocab;
    double tp = top_p > 0.0f && top_p < 1.0f ? top_p : 1.0;
    if (k == vocab && tp == 1.0) {
        int pick = draw_in_id_order(probs, vocab, u * total, best, &sh);
        if (threadIdx.x == 0)
            *out_id = pick;
        return;
    }
    float tau;
    double above;
    int ties;
    if (k < vocab && radix_descend(probs, vocab, set, false, (double)k, true, &tau, &above, &sh)) {
        /* the k most likely: everything above tau, then ties in id order */
        int cut = nth_tie(probs, vocab, set, tau, k - (int)above, &ties, &sh);
        set.floor = tau;
        set.cut = cut;
        mass = set_mass(probs, vocab, set);
    }
    double kept = mass;
    if (tp < 1.0 && radix_descend(probs, vocab, set, true, tp * mass, true, &tau, &above, &sh)) {
        /* the smallest prefix reaching top_p of the mass */
        int need = (int)ceil((tp * mass - above) / tau);
        int cut = nth_tie(probs, vocab, set, tau, need, &ties, &sh);
        need = need < 1 ? 1 : (need > ties ? ties : need);
        kept = above + (double)need * tau;
        set.floor = tau;
        set.cut = cut;
    }
    double target = u * kept;
    int pick;
    if (radix_descend(probs, vocab, set, true, target, false, &tau, &above, &sh)) {
        pick = nth_tie(probs, vocab, set, tau, (int)floor((target - above) / tau) + 1, &ties, &sh);
    } else {
        /* rounding put u * kept past the end: the last in order, i.e. the
         * least likely member, the highest id among equals */
        __shared__ float s_min;
        __shared__ int s_id;
        if (threadIdx.x == 0) {
            s_min = INFINITY;
            s_id = -1;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < vocab; i += blockDim.x)
            if (in_set(probs[i], i, set))
                atomicMin((int *)&s_min, __float_as_int(probs[i]));   /* positive floats order as ints */
        __syncthreads();
        for (int i = threadIdx.x; i < vocab; i += blockDim.x)
            if (in_set(probs[i], i, set) && probs[i] == s_min)
                atomicMax(&s_id, i);
        __syncthreads();
        pick = s_id < 0 ? best : s_id;
    }
    if (threadIdx.x == 0)
        *out_id = pick < 0 ? best : pick;
}

extern "C" int tpc_sample(int32_t *out_id, const float *logits, int vocab, float temperature, int top_k,
                          float top_p, double u, float *workspace, tpc_stream s, tp_err *err)
{
    if (vocab <= 0)
        return tp_errorf(err, "cuda kernel sample: vocabulary of %d", vocab);
    if (!(u >= 0.0 && u < 1.0))
        return tp_errorf(err, "cuda kernel sample: uniform %g is not in [0, 1)", u);
    sample_kernel<<<1, 1024, 0, s>>>(out_id, logits, vocab, temperature, top_k, top_p, u, NULL, workspace);
    return launched("sample", err);
}

extern "C" int tpc_sample_devu(int32_t *out_id, const float *logits, int vocab, float temperature, int top_k,
                               float top_p, const double *u_dev, float *workspace, tpc_stream s, tp_err *err)
{
    if (vocab <= 0)
        return tp_errorf(err, "cuda kernel sample: vocabulary of %d", vocab);
    if (!u_dev)
        return tp_errorf(err, "cuda kernel sample: no device uniform");
    sample_kernel<<<1, 1024, 0, s>>>(out_id, logits, vocab, temperature, top_k, top_p, 0.0, u_dev, workspace);
    return launched("sample", err);
}

/* ----------------------------------------------------------------- GEMM */

static const char *blas_status(cublasStatus_t st)
{
    switch (st) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "invalid value";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "architecture mismatch";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "execution failed";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "internal error";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "not supported";
    default: return "error";
    }
}

/* The handle and a workspace of our own: with cublasSetWorkspace cuBLAS
 * never allocates while a graph is being captured (it would otherwise
 * cudaMalloc on first use of some algorithms).  32 MiB: what the cuBLAS
 * documentation recommends for Hopper (4 MiB elsewhere). */
#define BLAS_WORKSPACE_BYTES ((size_t)32 << 20)

struct tpc_blas_st {
    cublasHandle_t handle;
    void *workspace;
};

/* Why cuBLAS could not be loaded (cublas_lazy.cu, which dlopens it on first
 * use); weak: the CPU emulation links a cuBLAS of its own and not that file. */
extern "C" const char *tpcu_blas_load_error(void) __attribute__((weak));

extern "C" int tpc_blas_create(tpc_blas *out, tpc_stream s, tp_err *err)
{
    *out = NULL;
    tpc_blas b = (tpc_blas)calloc(1, sizeof *b);
    if (!b)
        return tp_errorf(err, "out of memory");
    cublasStatus_t st = cublasCreate(&b->handle);
    if (st != CUBLAS_STATUS_SUCCESS) {
        free(b);
        const char *why = tpcu_blas_load_error ? tpcu_blas_load_error() : NULL;
        return tp_errorf(err, "cublasCreate: %s", why ? why : blas_status(st));
    }
    if (tpc_malloc(&b->workspace, BLAS_WORKSPACE_BYTES, "cuBLAS workspace", err) < 0) {
        tpc_blas_destroy(b);
        return -1;
    }
    st = cublasSetWorkspace(b->handle, b->workspace, BLAS_WORKSPACE_BYTES);
    if (st != CUBLAS_STATUS_SUCCESS) {
        tpc_blas_destroy(b);
        return tp_errorf(err, "cublasSetWorkspace: %s", blas_status(st));
    }
    cublasSetStream(b->handle, s);
    *out = b;
    return 0;
}

extern "C" void tpc_blas_destroy(tpc_blas b)
{
    if (!b)
        return;
    if (b->handle)
        cublasDestroy(b->handle);
    tpc_free(b->workspace);
    free(b);
}

extern "C" int tpc_gemm_bf16(tpc_blas h, float *y, const float *x, uint16_t *x_bf16, const uint16_t *w,
                             const float *bias, int n, int in, int out, tpc_stream s, tp_err *err)
{
    if (n == 0)
        return 0;
    if (n < 0 || in <= 0 || out <= 0)
        return tp_errorf(err, "gemm: n %d, in %d, out %d", n, in, out);
    if (x && tpc_f32_to_bf16(x_bf16, x, (size_t)n * in, s, err))
        return -1;
    cublasSetStream(h->handle, s);
    const float alpha = 1.0f, beta = 0.0f;
    /* column-major: y^T[out][n] = W^T' (W is [in][out] column-major, op T) . x^T[in][n] */
    cublasStatus_t st = cublasGemmEx(h->handle, CUBLAS_OP_T, CUBLAS_OP_N, out, n, in, &alpha, w, CUDA_R_16BF, in,
                                     x_bf16, CUDA_R_16BF, in, &beta, y, CUDA_R_32F, out,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS)
        return tp_errorf(err, "cublasGemmEx bf16 %dx%d . %dx%d: %s", n, in, out, in, blas_status(st));
    return bias ? tpc_add_bias(y, bias, n, out, s, err) : 0;
}

/* ------------------------------------------------------ 8-bit weights */

/* e4m3fn -> fp32, exactly as tp_f8e4m3_to_f32 (NaN for 0x7f / 0xff). */
__device__ __forceinline__ float f8e4m3_to_f32(uint8_t b)
{
    uint32_t e = (b >> 3) & 0xfu, m = b & 0x7u;
    float v;
    if (e == 0xfu && m == 0x7u)
        v = __uint_as_float(0x7fc00000u);
    else if (e == 0)
        v = (float)m * (1.0f / 512.0f);   /* subnormal: m * 2^-9 */
    else
        v = __uint_as_float(((e + 120u) << 23) | (m << 20));
    return (b & 0x80u) ? -v : v;
}

/* W[r][c] of an 8-bit weight in fp32: the stored value times its scale,
 * one fp32 rounding (tpg_weight). */
__device__ __forceinline__ float q8_weight(const tpc_q8 &w, int r, int c, int cols)
{
    uint8_t b = w.w[(size_t)r * cols + c];
    if (w.dt == TP_I8)
        return (float)(int8_t)b * w.scale[r];
    const float *srow = w.scale + (size_t)((w.origin[0] + r) / w.block[0]) * w.stride;
    return f8e4m3_to_f32(b) * srow[(w.origin[1] + c) / w.block[1]];
}

#define Q8_WARPS 8

/* One warp per (token, row): lanes stride over the columns, warp_sum. */
__global__ void __launch_bounds__(Q8_WARPS * 32)
gemv_q8_kernel(float *y, const float *x, tpc_q8 w, const float *bias, int n, int in, int out)
{
    int lane = threadIdx.x & 31;
    size_t job = (size_t)blockIdx.x * Q8_WARPS + (threadIdx.x >> 5);
    if (job >= (size_t)n * out)
        return;
    int t = (int)(job / out), r = (int)(job % out);
    const float *xr = x + (size_t)t * in;
    float acc = 0.0f;
    for (int c = lane; c < in; c += 32)
        acc += xr[c] * q8_weight(w, r, c, in);
    acc = warp_sum(acc);
    if (lane == 0)
        y[(size_t)t * out + r] = acc + (bias ? bias[r] : 0.0f);
}

static int q8_args(const char *kernel, const tpc_q8 &w, int rows, int cols, tp_err *err)
{
    if (rows <= 0 || cols <= 0 || !w.w || !w.scale)
        return tp_errorf(err, "cuda kernel %s: %d x %d, weight %p, scales %p", kernel, rows, cols,
                         (const void *)w.w, (const void *)w.scale);
    if (w.dt == TP_F8_E4M3 && (w.block[0] < 1 || w.block[1] < 1 || w.origin[0] < 0 ||
                               w.origin[1] < 0 || w.origin[0] >= w.block[0] ||
                               w.origin[1] >= w.block[1] ||
                               w.stride < (w.origin[1] + cols - 1) / w.block[1] + 1))
        return tp_errorf(err, "cuda kernel %s: fp8 blocks %d x %d, origin %d, %d, stride %d for "
                         "%d columns", kernel, w.block[0], w.block[1], w.origin[0], w.origin[1],
                         w.stride, cols);
    if (w.dt != TP_F8_E4M3 && w.dt != TP_I8)
        return tp_errorf(err, "cuda kernel %s: dtype %s is not 8-bit", kernel, tp_dtype_name(w.dt));
    return 0;
}

extern "C" int tpc_gemv_q8(float *y, const float *x, tpc_q8 w, const float *bias, int n, int in,
                           int out, tpc_stream s, tp_err *err)
{
    if (n == 0)
        return 0;
    if (n < 0 || q8_args("gemv_q8", w, out, in, err) < 0)
        return n < 0 ? tp_errorf(err, "cuda kernel gemv_q8: n %d", n) : -1;
    size_t blocks = ((size_t)n * out + Q8_WARPS - 1) / Q8_WARPS;
    if (blocks > 0x7fffffffu)
        return tp_errorf(err, "cuda kernel gemv_q8: %d tokens x %d rows", n, out);
    gemv_q8_kernel<<<(unsigned)blocks, Q8_WARPS * 32, 0, s>>>(y, x, w, bias, n, in, out);
    return launched("gemv_q8", err);
}

__global__ void dequant_q8_bf16_kernel(uint16_t *dst, tpc_q8 w, int cols, size_t total)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __bfloat16_as_ushort(
            __float2bfloat16_rn(q8_weight(w, (int)(i / cols), (int)(i % cols), cols)));
}

extern "C" int tpc_dequant_q8_bf16(uint16_t *dst, tpc_q8 w, int rows, int cols, tpc_stream s,
                                   tp_err *err)
{
    if (q8_args("dequant_q8_bf16", w, rows, cols, err) < 0)
        return -1;
    size_t total = (size_t)rows * cols;
    dequant_q8_bf16_kernel<<<blocks_for(total, 256), 256, 0, s>>>(dst, w, cols, total);
    return launched("dequant_q8_bf16", err);
}

__global__ void embedding_q8_kernel(float *out, tpc_q8 table, const int32_t *ids, int hidden,
                                    int64_t row_start, int64_t row_end)
{
    int t = blockIdx.x;
    int64_t id = ids[t];
    float *dst = out + (size_t)t * hidden;
    bool mine = id >= row_start && id < row_end;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        dst[i] = mine ? q8_weight(table, (int)(id - row_start), i, hidden) : 0.0f;
}

extern "C" int tpc_embedding_q8(float *out, tpc_q8 table, const int32_t *ids, int n, int hidden,
                                int64_t row_start, int64_t row_end, tpc_stream s, tp_err *err)
{
    if (n == 0)
        return 0;
    if (n < 0 || q8_args("embedding_q8", table, (int)(row_end - row_start), hidden, err) < 0)
        return n < 0 ? tp_errorf(err, "cuda kernel embedding_q8: n %d", n) : -1;
    embedding_q8_kernel<<<n, 256, 0, s>>>(out, table, ids, hidden, row_start, row_end);
    return launched("embedding_q8", err);
}

extern "C" int tpc_gemm_q8(tpc_blas h, float *y, const float *x, uint16_t *x_bf16, tpc_q8 w,
                           uint16_t *w_bf16, const float *bias, int n, int in, int out,
                           tpc_stream s, tp_err *err)
{
    if (n <= TPC_Q8_GEMV_MAX_N)
        return tpc_gemv_q8(y, x, w, bias, n, in, out, s, err);
    if (tpc_dequant_q8_bf16(w_bf16, w, out, in, s, err) < 0)
        return -1;
    return tpc_gemm_bf16(h, y, x, x_bf16, w_bf16, bias, n, in, out, s, err);
}
