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
 * 8-bit weights (FORMAT.md, "Quantized weights") carry their scales
 * (tpg_quant): W[o][i] = fp8(w[o][i]) * block scale, or int8 * row scale,
 * dequantized in registers.  Activations stay fp32 and accumulation fp32:
 * no int8 dot products on 8-bit activations (as llama.cpp's q8_0 does),
 * which would change the math against the reference.  Applying the scale
 * to x (fp8, per column block) or to the row's sum (int8) rounds
 * differently from dequantizing each weight first: a few fp32 ulps per
 * product, the same order as summation order.  One exception, on the
 * "amx" path (which has AVX-512 VNNI): the one-token int8 GEMV takes x as
 * 32-bit fixed point (x rounded to a multiple of 2^-30 of the token's
 * max|x|) and sums exact integer products; its error bound is fp32's plus
 * 2^-31 max|x| sum|w| (gemm_cpu.c, "int8 GEMV by VNNI").
 *
 *   n == 1 (decode): a GEMV that streams each weight row once, widening in
 *          registers.
 *   n  > 1 (prefill): a block of rows is widened once into a per-thread
 *          buffer that stays in cache, then multiplied by every token, a tile
 *          of tokens x rows at a time: each weight byte is read once per call.
 *          On the "amx" path bf16 rows go to AMX tiles as stored, x split
 *          into three bf16 parts that hold it exactly.
 *
 * Paths, picked at run time from the CPU's features: AMX-BF16 with AVX-512
 * VNNI (and the kernel's leave to use the tiles), AVX-512F, AVX2+FMA+F16C,
 * portable C.  Only gemm_cpu.c is compiled with them enabled (function target
 * attributes), so the build runs on any x86-64 (or other) CPU.
 * tpg_matmul_ref is the scalar reference the paths are tested against.
 */
#ifndef TP_GEMM_CPU_H
#define TP_GEMM_CPU_H

#include <stdbool.h>

#include "shardfmt.h"

/* The scales of an 8-bit weight slice (all zero for bf16 / f16 / f32).
 *   TP_F8_E4M3: scale is the slice's block grid, row-major with `stride`
 *     floats per grid row; local element [r][c] uses
 *     scale[(origin[0] + r) / block[0] * stride + (origin[1] + c) / block[1]],
 *     where origin = (r0 % B0, c0 % B1) for a slice starting at global row r0
 *     and column c0 (FORMAT.md's "local block").
 *   TP_I8: scale[r], one per local row (stride, block, origin unused). */
typedef struct tpg_quant {
    const float *scale;
    int stride;
    int block[2];
    int origin[2];
} tpg_quant;

/* One product: y[n][rows] = x[n][cols] . W^T, W [rows][cols] of dtype dt
 * (TP_BF16, TP_F16, TP_F32, or TP_F8_E4M3 / TP_I8 with q filled in;
 * anything else is a caller bug). */
typedef struct tpg_job {
    float *y;
    const float *x;
    int n;
    const void *w;
    tp_dtype dt;
    int rows, cols;
    tpg_quant q;
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

/* The scalar reference: plain loops, double accumulation, single thread
 * (float dtypes). */
void tpg_matmul_ref(float *y, const float *x, int n, const void *w, tp_dtype dt, int rows,
                    int cols);
/* The same for any job, 8-bit ones included: each weight dequantized as
 * FORMAT.md says (tpg_weight), then double accumulation. */
void tpg_job_ref(const tpg_job *j);
/* W[r][c] of j as fp32: an 8-bit weight times its scale, in fp32 (what
 * FORMAT.md defines as the weight's value); a float weight widened. */
float tpg_weight(const tpg_job *j, int r, int c);

/* Instruction-set paths, in increasing preference. */
typedef enum tpg_isa {
    TPG_PORTABLE = 0,   /* C, whatever the compiler vectorises */
    TPG_AVX2,           /* AVX2 + FMA + F16C, 8 lanes */
    TPG_AVX512,         /* AVX-512F, 16 lanes */
    TPG_AMX,            /* AVX-512 plus AMX-BF16 tiles (bf16 GEMMs), VNNI (int8 GEMV) */
    TPG_ISA_COUNT
} tpg_isa;

const char *tpg_isa_name(tpg_isa isa);   /* "portable", "avx2", "avx512", "amx" */
bool tpg_isa_supported(tpg_isa isa);     /* this CPU can run it */
/* The best path this CPU runs. */
tpg_isa tpg_best_isa(void);
/* The path in use: the best supported one unless tpg_set_isa chose. */
tpg_isa tpg_get_isa(void);
/* Forces a path (tests, comparisons); -1 when this CPU cannot run it.
 * Not thread-safe against running products: call it between them. */
int tpg_set_isa(tpg_isa isa);

#endif
