/* gemm_cpu.h - matrix products over weights in their stored dtype (private
 * to runtime/).
 *
 * The CPU forward pass reads every weight matrix where it lies: in the rank
 * file's mapping (codec none) or in the loader's one decoded block, as bf16,
 * f16 or f32.  These kernels multiply fp32 activations by such a matrix with
 * fp32 accumulation:
 *
 *     y[t][o] = sum_i x[t][i] * W[o][i]     t < n, o < rows, i < cols
 *
 * W is [rows][cols] row-major (nn.Linear's weight), x is [n][cols], y is
 * [n][rows], all dense.  Weights are widened exactly (bf16 and f16 fit in
 * fp32), so the result differs from an fp32 product only by summation order.
 *
 *   n == 1 (decode): a GEMV that streams each weight row once, widening in
 *          registers.
 *   n  > 1 (prefill): a block of rows is widened once into a per-thread
 *          buffer that stays in cache, then multiplied by every token, a tile
 *          of tokens x rows at a time: each weight byte is read once per call.
 *
 * Paths, picked at run time from the CPU's features: AVX-512F, AVX2+FMA+F16C,
 * portable C.  Only gemm_cpu.c is compiled with them enabled (function target
 * attributes), so the build runs on any x86-64 (or other) CPU.
 * tpg_matmul_ref is the scalar reference the paths are tested against.
 */
#ifndef TP_GEMM_CPU_H
#define TP_GEMM_CPU_H

#include <stdbool.h>

#include "shardfmt.h"

/* One product: y[n][rows] = x[n][cols] . W^T, W [rows][cols] of dtype dt
 * (TP_BF16, TP_F16 or TP_F32; anything else is a caller bug). */
typedef struct tpg_job {
    float *y;
    const float *x;
    int n;
    const void *w;
    tp_dtype dt;
    int rows, cols;
} tpg_job;

/* Runs jobs[0..count) on the pool (NULL: this thread) as one parallel
 * section: their row blocks are shared out together, so products that do
 * not depend on each other (q/k/v, gate/up) cost one fork-join.  The jobs'
 * outputs must not overlap their inputs or each other.  Never fails: if the
 * widening buffers cannot be allocated the tokens are multiplied one at a
 * time (GEMV), slower but the same result. */
void tpg_matmul_batch(const tpg_job *jobs, int count, tp_pool *pool);

/* One product (tpg_matmul_batch of one job). */
void tpg_matmul(float *y, const float *x, int n, const void *w, tp_dtype dt, int rows, int cols,
                tp_pool *pool);

/* The scalar reference: plain loops, double accumulation, single thread. */
void tpg_matmul_ref(float *y, const float *x, int n, const void *w, tp_dtype dt, int rows,
                    int cols);

/* Instruction-set paths, in increasing preference. */
typedef enum tpg_isa {
    TPG_PORTABLE = 0,   /* C, whatever the compiler vectorises */
    TPG_AVX2,           /* AVX2 + FMA + F16C, 8 lanes */
    TPG_AVX512,         /* AVX-512F, 16 lanes */
    TPG_ISA_COUNT
} tpg_isa;

const char *tpg_isa_name(tpg_isa isa);   /* "portable", "avx2", "avx512" */
bool tpg_isa_supported(tpg_isa isa);     /* this CPU can run it */
/* The path in use: the best supported one unless tpg_set_isa chose. */
tpg_isa tpg_get_isa(void);
/* Forces a path (tests, comparisons); -1 when this CPU cannot run it.
 * Not thread-safe against running products: call it between them. */
int tpg_set_isa(tpg_isa isa);

#endif
