#pragma once
// cublas_v2.h (emulation, run_emu.sh only): cublasGemmEx as the documented
// column-major product, computed naively; bf16 A/B and fp32 C only.
#include "cuda_runtime.h"
typedef enum { CUBLAS_STATUS_SUCCESS, CUBLAS_STATUS_NOT_INITIALIZED, CUBLAS_STATUS_ALLOC_FAILED, CUBLAS_STATUS_INVALID_VALUE,
  CUBLAS_STATUS_ARCH_MISMATCH, CUBLAS_STATUS_EXECUTION_FAILED, CUBLAS_STATUS_INTERNAL_ERROR, CUBLAS_STATUS_NOT_SUPPORTED } cublasStatus_t;
typedef enum { CUBLAS_OP_N, CUBLAS_OP_T } cublasOperation_t;
typedef enum { CUDA_R_16BF, CUDA_R_32F } cudaDataType;
typedef enum { CUBLAS_COMPUTE_32F } cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT } cublasGemmAlgo_t;
// The handle holds its stream: a GEMM on a capturing stream is recorded (by
// value: pointers, sizes and the host-side alpha / beta, which cuBLAS reads
// at the call in its default host pointer mode) and runs at the replay.
struct cublasContext { cudaStream_t stream = nullptr; };
typedef struct cublasContext *cublasHandle_t;
inline cublasStatus_t cublasCreate(cublasHandle_t *h) { *h = new cublasContext; return CUBLAS_STATUS_SUCCESS; }
inline cublasStatus_t cublasDestroy(cublasHandle_t h) { delete h; return CUBLAS_STATUS_SUCCESS; }
inline cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) { h->stream = s; return CUBLAS_STATUS_SUCCESS; }
// The emulated GEMM needs no workspace: accepted and ignored.
inline cublasStatus_t cublasSetWorkspace(cublasHandle_t, void *, size_t) { return CUBLAS_STATUS_SUCCESS; }
// The documented column-major semantics for bf16 A/B, fp32 C.
inline void emu_gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha,
    const uint16_t *a, int lda, const uint16_t *b, int ldb, float beta, float *c, int ldc)
{
    emu_sync_all();   // queued copies land before the product reads
    auto bf = [](uint16_t v) { return __uint_as_float((uint32_t)v << 16); };
    for (int j = 0; j < n; j++) for (int i = 0; i < m; i++) {
        float acc = 0;
        for (int l = 0; l < k; l++) {
            float x = ta == CUBLAS_OP_N ? bf(a[i + (size_t)l * lda]) : bf(a[l + (size_t)i * lda]);
            float y = tb == CUBLAS_OP_N ? bf(b[l + (size_t)j * ldb]) : bf(b[j + (size_t)l * ldb]);
            acc += x * y;
        }
        float *cij = &c[i + (size_t)j * ldc];
        *cij = alpha * acc + (beta == 0.0f ? 0.0f : beta * *cij);   /* beta 0: C is not read */
    }
}
inline cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
    const void *alpha, const void *A, cudaDataType at, int lda, const void *B, cudaDataType bt, int ldb,
    const void *beta, void *C, cudaDataType ct, int ldc, cublasComputeType_t, cublasGemmAlgo_t)
{
    if (at != CUDA_R_16BF || bt != CUDA_R_16BF || ct != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (lda < (ta == CUBLAS_OP_N ? m : k) || ldb < (tb == CUBLAS_OP_N ? k : n) || ldc < m) return CUBLAS_STATUS_INVALID_VALUE;
    const uint16_t *a = (const uint16_t *)A, *b = (const uint16_t *)B;
    float *c = (float *)C, al = *(const float *)alpha, be = *(const float *)beta;
    cudaError_t e = emu_enqueue(h->stream, [=] { emu_gemm(ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc); });
    return e == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}
