#pragma once
// cublas_v2.h (emulation, run_emu.sh only): cublasGemmEx as the documented
// column-major product, computed naively; bf16 A/B and fp32 C only.
#include "cuda_runtime.h"
typedef struct cublasContext *cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS, CUBLAS_STATUS_NOT_INITIALIZED, CUBLAS_STATUS_ALLOC_FAILED, CUBLAS_STATUS_INVALID_VALUE,
  CUBLAS_STATUS_ARCH_MISMATCH, CUBLAS_STATUS_EXECUTION_FAILED, CUBLAS_STATUS_INTERNAL_ERROR, CUBLAS_STATUS_NOT_SUPPORTED } cublasStatus_t;
typedef enum { CUBLAS_OP_N, CUBLAS_OP_T } cublasOperation_t;
typedef enum { CUDA_R_16BF, CUDA_R_32F } cudaDataType;
typedef enum { CUBLAS_COMPUTE_32F } cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT } cublasGemmAlgo_t;
inline cublasStatus_t cublasCreate(cublasHandle_t *h) { *h = (cublasHandle_t)malloc(1); return CUBLAS_STATUS_SUCCESS; }
inline cublasStatus_t cublasDestroy(cublasHandle_t h) { free(h); return CUBLAS_STATUS_SUCCESS; }
inline cublasStatus_t cublasSetStream(cublasHandle_t, cudaStream_t) { return CUBLAS_STATUS_SUCCESS; }
// The documented column-major semantics for bf16 A/B, fp32 C.
inline cublasStatus_t cublasGemmEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
    const void *alpha, const void *A, cudaDataType at, int lda, const void *B, cudaDataType bt, int ldb,
    const void *beta, void *C, cudaDataType ct, int ldc, cublasComputeType_t, cublasGemmAlgo_t)
{
    emu_sync_all();   // queued copies land before the product reads
    if (at != CUDA_R_16BF || bt != CUDA_R_16BF || ct != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
    auto bf = [](uint16_t b) { return __uint_as_float((uint32_t)b << 16); };
    const uint16_t *a = (const uint16_t *)A, *b = (const uint16_t *)B; float *c = (float *)C;
    if (lda < (ta == CUBLAS_OP_N ? m : k) || ldb < (tb == CUBLAS_OP_N ? k : n) || ldc < m) return CUBLAS_STATUS_INVALID_VALUE;
    for (int j = 0; j < n; j++) for (int i = 0; i < m; i++) {
        float acc = 0;
        for (int l = 0; l < k; l++) {
            float x = ta == CUBLAS_OP_N ? bf(a[i + (size_t)l * lda]) : bf(a[l + (size_t)i * lda]);
            float y = tb == CUBLAS_OP_N ? bf(b[l + (size_t)j * ldb]) : bf(b[j + (size_t)l * ldb]);
            acc += x * y;
        }
        float be = *(const float *)beta, *cij = &c[i + (size_t)j * ldc];
        *cij = *(const float *)alpha * acc + (be == 0.0f ? 0.0f : be * *cij);   /* beta 0: C is not read */
    }
    return CUBLAS_STATUS_SUCCESS;
}
