/* cublas_lazy.cu - cuBLAS loaded on first use instead of at program start.
 *
 * Why: libcublas needs libcublasLt, and merely loading libcublasLt makes
 * about 210 MB resident (an empty program linked with -lcublasLt peaks at
 * 212 MB RSS on the development machine: its relocations and constructors
 * touch that much).  Linked normally, every tprun paid it, on the CPU too,
 * where it was most of the gap between a rank's peak RSS and its rank file.
 *
 * So the programs do not link -lcublas.  They link these definitions of the
 * few cuBLAS entry points the CUDA model calls, under the names cublas_v2.h
 * gives them; the first call dlopens libcublas.so.<CUBLAS_VER_MAJOR> (found
 * through the program's run path, like the other CUDA libraries) and every
 * call forwards to the real function.  A cuBLAS function used without an
 * entry here fails at link time, naming it: add it to TP_CUBLAS_FUNCS.
 *
 * Not part of the CPU emulation (run_emu.sh), which has its own cuBLAS. */
#include <cublas_v2.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>


#define TP_STR_(x) #x
#define TP_STR(x) TP_STR_(x)
#define TP_CUBLAS_SONAME "libcublas.so." TP_STR(CUBLAS_VER_MAJOR)

/* X(name, (parameters), (arguments)): the functions forwarded, each returning cublasStatus_t. */
#define TP_CUBLAS_FUNCS(X)                                                                         \
    X(cublasCreate_v2, (cublasHandle_t *handle), (handle))                                       \
    X(cublasDestroy_v2, (cublasHandle_t handle), (handle))                                       \
    X(cublasSetStream_v2, (cublasHandle_t handle, cudaStream_t stream), (handle, stream))        \
    X(cublasSetWorkspace_v2, (cublasHandle_t handle, void *workspace, size_t bytes),             \
      (handle, workspace, bytes))                                                                 \
    X(cublasGemmEx,                                                                               \
      (cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,   \
       int k, const void *alpha, const void *A, cudaDataType Atype, int lda, const void *B,      \
       cudaDataType Btype, int ldb, const void *beta, void *C, cudaDataType Ctype, int ldc,      \
       cublasComputeType_t computeType, cublasGemmAlgo_t algo),                                   \
      (handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc, \
       computeType, algo))

static struct {
#define TP_X(name, params, args) cublasStatus_t(*name) params;
    TP_CUBLAS_FUNCS(TP_X)
#undef TP_X
    bool loaded;
    char error[256];
} real;

static pthread_once_t real_once = PTHREAD_ONCE_INIT;

static void load_real(void)
{
    void *lib = dlopen(TP_CUBLAS_SONAME, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        snprintf(real.error, sizeof real.error, "cannot load %s: %s", TP_CUBLAS_SONAME, dlerror());
        return;
    }
#define TP_X(name, params, args)                                                                  \
    if (!(*(void **)&real.name = dlsym(lib, #name))) {                                            \
        snprintf(real.error, sizeof real.error, "%s has no %s", TP_CUBLAS_SONAME, #name);         \
        return;                                                                                   \
    }
    TP_CUBLAS_FUNCS(TP_X)
#undef TP_X
    real.loaded = true;
}

extern "C" const char *tpcu_blas_load_error(void)
{
    pthread_once(&real_once, load_real);
    return real.loaded ? NULL : real.error;
}

extern "C" {
#define TP_X(name, params, args)                                                                  \
    cublasStatus_t CUBLASWINAPI name params                                                       \
    {                                                                                             \
        if (tpcu_blas_load_error())                                                               \
            return CUBLAS_STATUS_NOT_INITIALIZED;                                                 \
        return real.name args;                                                                    \
    }
TP_CUBLAS_FUNCS(TP_X)
#undef TP_X
}
