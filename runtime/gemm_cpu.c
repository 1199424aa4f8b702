/* gemm_cpu.c - GEMV / GEMM over bf16, f16, f32, fp8 (e4m3) and int8
 * weights (see gemm_cpu.h).
 *
 * A path is three functions: a GEMV over a range of rows for one token, a
 * widening of stored weights to fp32, and a GEMM tile (TILE_T tokens x
 * TILE_R rows, full dot products); and optionally two GEMMs of its own, one
 * for a few tokens over bf16 as stored and one by transposed panels.  The
 * driver below is shared: it cuts every job into blocks of rows, hands the
 * blocks out to the pool's threads and, for n > 1 without a GEMM of the
 * path's own, widens a block once into the thread's buffer before running
 * the tiles over it.  The x86 paths are compiled with target
 * attributes only, so the rest of the build assumes nothing about the CPU.
 */
#include "gemm_cpu.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define TPG_X86 1
#endif

#define TILE_T_MAX 3                        /* the largest tile of the paths that have one */
#define TILE_R_MAX 4
#define GEMV_BLOCK_ROWS 32                  /* rows per claimed block, n == 1, at least */
#define GEMV_BLOCK_BYTES (64 * 1024)        /* and at least this many weight bytes */
#define GEMM_BLOCK_BYTES (128 * 1024)       /* widened rows per block: stays in L2 */
#define BATCH_MAX 8                         /* jobs per parallel section */
#define FEW_TOKENS 48                       /* bf16 GEMMs of up to this many tokens: bf16_few */
#define PANEL_ROWS 32                       /* rows of a panel_block block */
#define AMX_ROWS 32                         /* rows of an amx_block block: two tiles */
#define AMX_TOKENS 16                       /* tokens per AMX B tile */
#define AMX_PARTS 3                         /* bf16 parts of an fp32 x */
#define AMX_TILE_DWORDS 256                 /* an AMX tile: 16 rows x 64 bytes */
#define VNNI_MAX_COLS 65536                 /* int8 VNNI GEMV: int32 sums stay below 2^31 */
#define FEW_BLOCK_BYTES (192 * 1024)        /* bf16_few: rows per block, in L2 */
#define BF16_PREFETCH_ROWS 4                /* bf16 GEMV: prefetch this many rows ahead */
#define Q8_PREFETCH_ROWS 4                  /* 8-bit GEMV: the same */
/* The GEMVs also prefetch into L2 this many bytes ahead of the row being
 * read (within the rows of the claimed block).  Measured on the 2-core Xeon
 * (bench: two threads over 512 MiB of int8 rows): without it the 8-bit GEMV
 * streamed 12 GB/s, with it 15 GB/s, against 20 GB/s for a plain read. */
#define FAR_PREFETCH_BYTES (16 * 1024)
/* The same for each lane of a GEMV that reads its rows as several
 * sequential streams (lane_rows). */
#define LANE_FAR_BYTES (8 * 1024)

typedef struct tpg_path {
    /* y[r] for r in [r0, r1): one token x, rows of j's weight. */
    void (*gemv_rows)(float *y, const float *x, const tpg_job *j, int r0, int r1);
    /* dst[(r - r0) * cols + c] = W[r][c] for r in [r0, r1): exact for float
     * dtypes, tpg_weight's fp32 product for 8-bit ones. */
    void (*widen_rows)(float *dst, const tpg_job *j, int r0, int r1);
    /* out[t * tile_r + r] = xr[t] . wr[r] over cols (fp32 rows); NULL when
     * panel_block runs every GEMM. */
    void (*tile)(float *out, const float *const *xr, const float *const *wr, int cols);
    int tile_t, tile_r;
    /* Optional (NULL: none): bf16 GEMM for at most FEW_TOKENS tokens, the
     * weights read where they lie (no widening): y rows [r0, r1) of every
     * token, x given split by split_x.  For few tokens, widening a block
     * cost as much as the tiles that used it. */
    void (*bf16_few)(const tpg_job *j, const float *xs, int r0, int r1);
    /* xs[t][...] = token t's first cols - cols % 32 columns in the order
     * bf16_few reads them. */
    void (*split_x)(float *xs, const float *x, int n, int cols);
    /* Optional (NULL: widen and tile): the GEMM of rows [r0, r1), at most
     * PANEL_ROWS of them, for all of j's tokens; buf holds 2 * PANEL_ROWS *
     * cols floats. */
    void (*panel_block)(const tpg_job *j, int r0, int r1, float *buf);
    /* Optional (NULL: none): GEMM on matrix tiles, rows [r0, r1), at most
     * AMX_ROWS of them, for all of j's tokens, x packed by pack_x; buf as
     * panel_block's; for the jobs amx_takes. */
    void (*amx_block)(const tpg_job *j, const uint32_t *xp, int r0, int r1, float *buf);
    bool (*amx_takes)(const tpg_job *j);
    void (*pack_x)(uint32_t *xp, const float *x, int n, int cols);
    /* Optional (NULL: none): int8 GEMV, rows [r0, r1) of one token, on x
     * prepared once per call by prep_i8 (i8_token_floats a token). */
    void (*gemv_i8)(float *y, const float *x, const uint32_t *xp, const tpg_job *j, int r0, int r1);
    void (*prep_i8)(uint32_t *xp, const float *x, int n, int cols);
    size_t (*i8_token_floats)(int cols);
} tpg_path;

static size_t elem_size(tp_dtype dt) { return tp_dtype_size(dt); }

/* Dwords of AMX-packed x for n tokens of cols columns (amx_pack_x). */
static size_t amx_packed_dwords(int n, int cols)
{
    size_t groups = ((size_t)n + AMX_TOKENS - 1) / AMX_TOKENS;
    return groups * (size_t)(cols / 32) * AMX_PARTS * AMX_TILE_DWORDS;
}

/* The L2 prefetch distance of a GEMV whose next unread row is `next` in a
 * block ending at row r1, of row_bytes each: FAR_PREFETCH_BYTES, cut so the
 * prefetches stay inside the block (the rows after it may be another
 * thread's). */
static inline size_t far_prefetch(size_t row_bytes, int next, int r1)
{
    size_t left = (size_t)(r1 - next) * row_bytes;
    return left < FAR_PREFETCH_BYTES ? left : FAR_PREFETCH_BYTES;
}

static bool is_q8(tp_dtype dt) { return dt == TP_F8_E4M3 || dt == TP_I8; }

/* e4m3 byte -> fp32, as tp_f8e4m3_to_f32, from a table built once. */
static float fp8_table[256];
static pthread_once_t fp8_table_once = PTHREAD_ONCE_INIT;
static void fp8_table_fill(void)
{
    for (int b = 0; b < 256; b++)
        fp8_table[b] = tp_f8e4m3_to_f32((uint8_t)b);
}
static const float *fp8_lut(void)
{
    pthread_once(&fp8_table_once, fp8_table_fill);
    return fp8_table;
}

/* ------------------------------------------------- 8-bit weight layout
 *
 * An fp8 row's columns fall into segments that share one scale: the first
 * is [0, block[1] - origin[1]), then block[1] columns each (the last cut at
 * cols).  Segment k uses scale_row[k].  An int8 row is one segment whose
 * scale is the row's.  The SIMD GEMVs multiply x by the segment's scale
 * (once for several rows that share a scale row) instead of every weight. */
static inline const float *fp8_scale_row(const tpg_job *j, int r)
{
    return j->q.scale + (size_t)((j->q.origin[0] + r) / j->q.block[0]) * (size_t)j->q.stride;
}

static inline int fp8_first_segment(const tpg_job *j)
{
    int first = j->q.block[1] - j->q.origin[1];
    return first < j->cols ? first : j->cols;
}

/* How many rows from r (below r1, at most max) share r's fp8 scale row:
 * the SIMD GEMVs run such rows together over one scaled x. */
static inline int fp8_rows_sharing(const tpg_job *j, int r, int r1, int max)
{
    int b0 = j->q.block[0];
    int left_in_block = b0 - (j->q.origin[0] + r) % b0;
    int n = r1 - r < max ? r1 - r : max;
    return n < left_in_block ? n : left_in_block;
}

static inline float bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;   /* bf16 is the top half of an fp32 */
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* One stored element as fp32 (tails and the reference). */
static inline float weight_at(const void *w, tp_dtype dt, size_t i)
{
    if (dt == TP_BF16)
        return bf16_to_f32(((const uint16_t *)w)[i]);
    if (dt == TP_F16)
        return tp_f16_to_f32(((const uint16_t *)w)[i]);
    return ((const float *)w)[i];
}

float tpg_weight(const tpg_job *j, int r, int c)
{
    size_t i = (size_t)r * (size_t)j->cols + (size_t)c;
    if (j->dt == TP_F8_E4M3)
        return tp_f8e4m3_to_f32(((const uint8_t *)j->w)[i]) *
               fp8_scale_row(j, r)[(j->q.origin[1] + c) / j->q.block[1]];
    if (j->dt == TP_I8)
        return (float)((const int8_t *)j->w)[i] * j->q.scale[r];
    return weight_at(j->w, j->dt, i);
}

/* ------------------------------------------------------------ reference */

void tpg_job_ref(const tpg_job *j)
{
    for (int t = 0; t < j->n; t++)
        for (int o = 0; o < j->rows; o++) {
            double s = 0.0;
            for (int i = 0; i < j->cols; i++)
                s += (double)j->x[(size_t)t * j->cols + i] * tpg_weight(j, o, i);
            j->y[(size_t)t * j->rows + o] = (float)s;
        }
}

void tpg_matmul_ref(float *y, const float *x, int n, const void *w, tp_dtype dt, int rows,
                    int cols)
{
    for (int t = 0; t < n; t++)
        for (int o = 0; o < rows; o++) {
            double s = 0.0;
            for (int i = 0; i < cols; i++)
                s += (double)x[(size_t)t * cols + i] * weight_at(w, dt, (size_t)o * cols + i);
            y[(size_t)t * rows + o] = (float)s;
        }
}

/* ------------------------------------------------------------- portable */

static void widen_portable(float *dst, const void *src, tp_dtype dt, size_t count)
{
    if (dt == TP_F32) {
        memcpy(dst, src, count * sizeof *dst);
    } else if (dt == TP_BF16) {
        const uint16_t *s = src;
        for (size_t i = 0; i < count; i++)
            dst[i] = bf16_to_f32(s[i]);
    } else {
        const uint16_t *s = src;
        for (size_t i = 0; i < count; i++)
            dst[i] = tp_f16_to_f32(s[i]);
    }
}

/* Eight partial sums: independent chains the compiler can vectorise. */
static float dot_portable(const float *x, const float *w, int n)
{
    float part[8] = { 0 };
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++)
            part[j] += x[i + j] * w[i + j];
    float s = 0.0f;
    for (; i < n; i++)
        s += x[i] * w[i];
    for (int j = 0; j < 8; j++)
        s += part[j];
    return s;
}

#define PORTABLE_CHUNK 512

static void gemv_portable(float *y, const float *x, const void *w, tp_dtype dt, int r0, int r1,
                          int cols)
{
    float buf[PORTABLE_CHUNK];
    size_t es = elem_size(dt);
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w + (size_t)r * cols * es;
        if (dt == TP_F32) {
            y[r] = dot_portable(x, (const float *)row, cols);
            continue;
        }
        float s = 0.0f;
        for (int i = 0; i < cols; i += PORTABLE_CHUNK) {
            int c = cols - i < PORTABLE_CHUNK ? cols - i : PORTABLE_CHUNK;
            widen_portable(buf, row + (size_t)i * es, dt, (size_t)c);
            s += dot_portable(x + i, buf, c);
        }
        y[r] = s;
    }
}

static void tile_portable(float *out, const float *const *xr, const float *const *wr, int cols)
{
    out[0] = dot_portable(xr[0], wr[0], cols);
}

/* count 8-bit weights from src as their unscaled values (e4m3 or int8). */
static void q8_unscaled(float *dst, const uint8_t *src, tp_dtype dt, int count)
{
    if (dt == TP_F8_E4M3) {
        const float *lut = fp8_lut();
        for (int i = 0; i < count; i++)
            dst[i] = lut[src[i]];
    } else {
        for (int i = 0; i < count; i++)
            dst[i] = (float)(int8_t)src[i];
    }
}

/* One row of an 8-bit weight dotted with x: each segment's unscaled dot
 * product times its scale. */
static float q8_row_portable(const float *x, const tpg_job *j, int r)
{
    float buf[PORTABLE_CHUNK];
    const uint8_t *row = (const uint8_t *)j->w + (size_t)r * j->cols;
    bool fp8 = j->dt == TP_F8_E4M3;
    const float *srow = fp8 ? fp8_scale_row(j, r) : NULL;
    int seg_end = fp8 ? fp8_first_segment(j) : j->cols;
    float total = 0.0f;
    for (int c = 0, k = 0; c < j->cols; k++) {
        float part = 0.0f;
        for (; c < seg_end; c += PORTABLE_CHUNK) {
            int n = seg_end - c < PORTABLE_CHUNK ? seg_end - c : PORTABLE_CHUNK;
            q8_unscaled(buf, row + c, j->dt, n);
            part += dot_portable(x + c, buf, n);
        }
        c = seg_end;
        total += part * (fp8 ? srow[k] : j->q.scale[r]);
        seg_end = c + j->q.block[1] < j->cols ? c + j->q.block[1] : j->cols;
    }
    return total;
}

/* Rows [r0, r1) of an 8-bit weight as fp32 values (tpg_weight, exactly). */
static void q8_widen_portable(float *dst, const tpg_job *j, int r0, int r1)
{
    const float *lut = fp8_lut();
    for (int r = r0; r < r1; r++, dst += j->cols) {
        const uint8_t *row = (const uint8_t *)j->w + (size_t)r * j->cols;
        if (j->dt == TP_I8) {
            for (int c = 0; c < j->cols; c++)
                dst[c] = (float)(int8_t)row[c] * j->q.scale[r];
            continue;
        }
        const float *srow = fp8_scale_row(j, r);
        int b1 = j->q.block[1], o1 = j->q.origin[1];
        for (int c = 0; c < j->cols; c++)
            dst[c] = lut[row[c]] * srow[(o1 + c) / b1];
    }
}

static void gemv_job_portable(float *y, const float *x, const tpg_job *j, int r0, int r1)
{
    if (!is_q8(j->dt)) {
        gemv_portable(y, x, j->w, j->dt, r0, r1, j->cols);
        return;
    }
    for (int r = r0; r < r1; r++)
        y[r] = q8_row_portable(x, j, r);
}

static void widen_rows_portable(float *dst, const tpg_job *j, int r0, int r1)
{
    if (is_q8(j->dt))
        q8_widen_portable(dst, j, r0, r1);
    else
        widen_portable(dst, (const uint8_t *)j->w + (size_t)r0 * j->cols * elem_size(j->dt),
                       j->dt, (size_t)(r1 - r0) * j->cols);
}

/* ------------------------------------------------------------------ avx2 */

#ifdef TPG_X86
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

/* Eight stored weights from w + i as fp32; dt is a constant at every call. */
AVX2_TARGET INLINE __m256 avx2_load8(const void *w, tp_dtype dt, size_t i)
{
    if (dt == TP_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i))), 16));
    if (dt == TP_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
    return _mm256_loadu_ps((const float *)w + i);
}

AVX2_TARGET INLINE float avx2_hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Four rows at a time: x is loaded once for four weight streams. */
AVX2_TARGET INLINE void avx2_gemv_dt(float *y, const float *x, const void *w, tp_dtype dt, int r0,
                                     int r1, int cols)
{
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        const void *w0 = (const uint8_t *)w + (size_t)r * cols * elem_size(dt);
        size_t stride = (size_t)cols;   /* elements between rows */
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int i = 0;
        for (; i + 8 <= cols; i += 8) {
            __m256 xv = _mm256_loadu_ps(x + i);
            a0 = _mm256_fmadd_ps(xv, avx2_load8(w0, dt, (size_t)i), a0);
            a1 = _mm256_fmadd_ps(xv, avx2_load8(w0, dt, stride + i), a1);
            a2 = _mm256_fmadd_ps(xv, avx2_load8(w0, dt, 2 * stride + i), a2);
            a3 = _mm256_fmadd_ps(xv, avx2_load8(w0, dt, 3 * stride + i), a3);
        }
        float s[4] = { avx2_hsum(a0), avx2_hsum(a1), avx2_hsum(a2), avx2_hsum(a3) };
        for (; i < cols; i++)
            for (int k = 0; k < 4; k++)
                s[k] += x[i] * weight_at(w0, dt, k * stride + i);
        for (int k = 0; k < 4; k++)
            y[r + k] = s[k];
    }
    for (; r < r1; r++) {
        const void *wr = (const uint8_t *)w + (size_t)r * cols * elem_size(dt);
        __m256 a = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= cols; i += 8)
            a = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), avx2_load8(wr, dt, (size_t)i), a);
        float s = avx2_hsum(a);
        for (; i < cols; i++)
            s += x[i] * weight_at(wr, dt, (size_t)i);
        y[r] = s;
    }
}

/* bf16 GEMV, 16 columns a step: the AVX-512 path's shift/mask split (see
 * avx512_bf16_rows) on 32-byte loads.  x's even and odd columns come from
 * two in-lane shuffles and a 64-bit permute that puts them in column order. */
AVX2_TARGET INLINE void avx2_bf16_rows(float *s, const float *x, const uint16_t *w0, size_t stride,
                                       int nr, int cols16)
{
    const __m256i odd_mask = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 ae[4], ao[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++)
        ae[k] = ao[k] = _mm256_setzero_ps();
    for (int i = 0; i < cols16; i += 16) {
        __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
        /* per 128-bit lane: x0[0] x0[2] x1[0] x1[2] | x0[4] x0[6] x1[4] x1[6] */
        __m256 xe = _mm256_shuffle_ps(x0, x1, _MM_SHUFFLE(2, 0, 2, 0));
        __m256 xo = _mm256_shuffle_ps(x0, x1, _MM_SHUFFLE(3, 1, 3, 1));
        xe = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(xe), _MM_SHUFFLE(3, 1, 2, 0)));
        xo = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(xo), _MM_SHUFFLE(3, 1, 2, 0)));
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            if (k >= nr)
                break;
            const uint16_t *p = w0 + k * stride + i;
            _mm_prefetch((const char *)(p + BF16_PREFETCH_ROWS * stride), _MM_HINT_T0);
            __m256i v = _mm256_loadu_si256((const __m256i *)p);
            ae[k] = _mm256_fmadd_ps(xe, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), ae[k]);
            ao[k] = _mm256_fmadd_ps(xo, _mm256_castsi256_ps(_mm256_and_si256(v, odd_mask)), ao[k]);
        }
    }
    for (int k = 0; k < nr; k++)
        s[k] = avx2_hsum(_mm256_add_ps(ae[k], ao[k]));
}

AVX2_TARGET static void avx2_gemv_bf16(float *y, const float *x, const uint16_t *w, int r0, int r1,
                                       int cols)
{
    int cols16 = cols - cols % 16;
    size_t stride = (size_t)cols;
    for (int r = r0; r < r1; r += 4) {
        int nr = r1 - r < 4 ? r1 - r : 4;
        const uint16_t *w0 = w + (size_t)r * stride;
        float s[4];
        if (nr == 4)
            avx2_bf16_rows(s, x, w0, stride, 4, cols16);
        else
            avx2_bf16_rows(s, x, w0, stride, nr, cols16);
        for (int k = 0; k < nr; k++) {
            for (int i = cols16; i < cols; i++)
                s[k] += x[i] * bf16_to_f32(w0[k * stride + i]);
            y[r + k] = s[k];
        }
    }
}

AVX2_TARGET static void gemv_avx2(float *y, const float *x, const void *w, tp_dtype dt, int r0,
                                  int r1, int cols)
{
    if (dt == TP_BF16)
        avx2_gemv_bf16(y, x, w, r0, r1, cols);
    else if (dt == TP_F16)
        avx2_gemv_dt(y, x, w, TP_F16, r0, r1, cols);
    else
        avx2_gemv_dt(y, x, w, TP_F32, r0, r1, cols);
}

AVX2_TARGET static void widen_avx2(float *dst, const void *src, tp_dtype dt, size_t count)
{
    size_t i = 0;
    if (dt == TP_BF16)
        for (; i + 8 <= count; i += 8)
            _mm256_storeu_ps(dst + i, avx2_load8(src, TP_BF16, i));
    else if (dt == TP_F16)
        for (; i + 8 <= count; i += 8)
            _mm256_storeu_ps(dst + i, avx2_load8(src, TP_F16, i));
    for (; i < count; i++)
        dst[i] = weight_at(src, dt, i);
}

/* ---- 8-bit weights, shared by the AVX2 and AVX-512 paths.
 * 16 e4m3 bytes as f16 bit patterns whose values are the e4m3 values times
 * 2^-8, exactly: a byte sign-extended to 16 bits and shifted left by 7 puts
 * its sign in bit 15 and its exponent and mantissa in f16's fields (bias 15
 * instead of 7: hence 2^-8; e4m3 subnormals land on f16 subnormals, which
 * vcvtph2ps widens exactly, so no fp32 denormal is ever made); the AND
 * clears the sign's copy in the exponent's top bit.  Four cheap ops per 16
 * weights instead of a table gather.  The e4m3 NaN bytes 0x7f / 0xff read
 * as +-480 * 2^-8 here (the reference gives NaN): a weight is never NaN. */
AVX2_TARGET INLINE __m256i f8_to_f16x16(__m128i b)
{
    __m256i h = _mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7);
    return _mm256_and_si256(h, _mm256_set1_epi16((short)0xBFFF));
}

/* The unit of the SIMD lanes' weights: e4m3 lanes hold value * 2^-8, so
 * their x is scaled by 256 more; int8 lanes hold the integer. */
#define FP8_LANE_SCALE 256.0f

/* One 8-bit weight in lane units (scalar tails). */
INLINE float q8_lane(uint8_t b, tp_dtype dt)
{
    if (dt == TP_F8_E4M3)
        return fp8_table[b] * (1.0f / FP8_LANE_SCALE);
    return (float)(int8_t)b;
}

/* 16 weights from p in lane units: columns [0, 8) in *lo, [8, 16) in *hi. */
AVX2_TARGET INLINE void avx2_q8x16(__m256 *lo, __m256 *hi, const uint8_t *p, tp_dtype dt)
{
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    if (dt == TP_F8_E4M3) {
        __m256i h = f8_to_f16x16(b);
        *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
        *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
    } else {
        *lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        *hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
    }
}

/* nr (<= 4) rows from w0, stride bytes apart, over columns [c0, c1):
 * acc[2k], acc[2k + 1] += (x * xs) . row k in lane units (two chains a row),
 * the columns past the last 16 into tail[k]. */
AVX2_TARGET INLINE void avx2_q8_span(__m256 *acc, float *tail, const float *x, const uint8_t *w0,
                                     size_t stride, int nr, int c0, int c1, float xs, tp_dtype dt)
{
    const __m256 sv = _mm256_set1_ps(xs);
    int i = c0;
    for (; i + 16 <= c1; i += 16) {
        __m256 x0 = _mm256_mul_ps(_mm256_loadu_ps(x + i), sv);
        __m256 x1 = _mm256_mul_ps(_mm256_loadu_ps(x + i + 8), sv);
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            if (k >= nr)
                break;
            const uint8_t *p = w0 + k * stride + i;
            _mm_prefetch((const char *)(p + Q8_PREFETCH_ROWS * stride), _MM_HINT_T0);
            __m256 lo, hi;
            avx2_q8x16(&lo, &hi, p, dt);
            acc[2 * k] = _mm256_fmadd_ps(x0, lo, acc[2 * k]);
            acc[2 * k + 1] = _mm256_fmadd_ps(x1, hi, acc[2 * k + 1]);
        }
    }
    for (; i < c1; i++)
        for (int k = 0; k < nr; k++)
            tail[k] += x[i] * xs * q8_lane(w0[k * stride + i], dt);
}

/* s[k] = row r + k of j dotted with x, k < nr (rows sharing a scale row
 * when fp8).  fp8: segment by segment, x scaled by the segment's scale;
 * int8: the whole row, then each sum times its row's scale. */
AVX2_TARGET INLINE void avx2_q8_rows(float *s, const float *x, const tpg_job *j, int r, int nr,
                                     tp_dtype dt)
{
    const uint8_t *w0 = (const uint8_t *)j->w + (size_t)r * j->cols;
    size_t stride = (size_t)j->cols;
    __m256 acc[8];
    float tail[4] = { 0 };
#pragma GCC unroll 8
    for (int k = 0; k < 8; k++)
        acc[k] = _mm256_setzero_ps();
    if (dt == TP_F8_E4M3) {
        const float *srow = fp8_scale_row(j, r);
        int end = fp8_first_segment(j);
        for (int c = 0, k = 0; c < j->cols; k++) {
            avx2_q8_span(acc, tail, x, w0, stride, nr, c, end, srow[k] * FP8_LANE_SCALE, dt);
            c = end;
            end = c + j->q.block[1] < j->cols ? c + j->q.block[1] : j->cols;
        }
        for (int k = 0; k < nr; k++)
            s[k] = avx2_hsum(_mm256_add_ps(acc[2 * k], acc[2 * k + 1])) + tail[k];
    } else {
        avx2_q8_span(acc, tail, x, w0, stride, nr, 0, j->cols, 1.0f, dt);
        for (int k = 0; k < nr; k++)
            s[k] = (avx2_hsum(_mm256_add_ps(acc[2 * k], acc[2 * k + 1])) + tail[k]) *
                   j->q.scale[r + k];
    }
}

AVX2_TARGET INLINE void avx2_gemv_q8_dt(float *y, const float *x, const tpg_job *j, int r0, int r1,
                                        tp_dtype dt)
{
    for (int r = r0; r < r1;) {
        int nr = dt == TP_F8_E4M3 ? fp8_rows_sharing(j, r, r1, 4) : (r1 - r < 4 ? r1 - r : 4);
        float s[4];
        if (nr == 4)   /* the common case, with a constant trip count inside */
            avx2_q8_rows(s, x, j, r, 4, dt);
        else
            avx2_q8_rows(s, x, j, r, nr, dt);
        for (int k = 0; k < nr; k++)
            y[r + k] = s[k];
        r += nr;
    }
}

/* Rows [r0, r1) of j as fp32 values: (lanes * scale * unit), which is
 * exactly tpg_weight's product (the unit is a power of two). */
AVX2_TARGET static void avx2_widen_q8(float *dst, const tpg_job *j, int r0, int r1)
{
    const bool fp8 = j->dt == TP_F8_E4M3;
    for (int r = r0; r < r1; r++, dst += j->cols) {
        const uint8_t *row = (const uint8_t *)j->w + (size_t)r * j->cols;
        const float *srow = fp8 ? fp8_scale_row(j, r) : &j->q.scale[r];
        int end = fp8 ? fp8_first_segment(j) : j->cols;
        for (int c = 0, k = 0; c < j->cols; k++) {
            float sc = srow[k];
            __m256 sv = _mm256_set1_ps(fp8 ? sc * FP8_LANE_SCALE : sc);
            int i = c;
            for (; i + 16 <= end; i += 16) {
                __m256 lo, hi;
                if (fp8)
                    avx2_q8x16(&lo, &hi, row + i, TP_F8_E4M3);
                else
                    avx2_q8x16(&lo, &hi, row + i, TP_I8);
                _mm256_storeu_ps(dst + i, _mm256_mul_ps(lo, sv));
                _mm256_storeu_ps(dst + i + 8, _mm256_mul_ps(hi, sv));
            }
            for (; i < end; i++)
                dst[i] = (fp8 ? fp8_table[row[i]] : (float)(int8_t)row[i]) * sc;
            c = end;
            end = c + j->q.block[1] < j->cols ? c + j->q.block[1] : j->cols;
        }
    }
}

AVX2_TARGET static void gemv_job_avx2(float *y, const float *x, const tpg_job *j, int r0, int r1)
{
    if (j->dt == TP_F8_E4M3)
        avx2_gemv_q8_dt(y, x, j, r0, r1, TP_F8_E4M3);
    else if (j->dt == TP_I8)
        avx2_gemv_q8_dt(y, x, j, r0, r1, TP_I8);
    else
        gemv_avx2(y, x, j->w, j->dt, r0, r1, j->cols);
}

AVX2_TARGET static void widen_rows_avx2(float *dst, const tpg_job *j, int r0, int r1)
{
    if (is_q8(j->dt))
        avx2_widen_q8(dst, j, r0, r1);
    else
        widen_avx2(dst, (const uint8_t *)j->w + (size_t)r0 * j->cols * elem_size(j->dt), j->dt,
                   (size_t)(r1 - r0) * j->cols);
}

/* 3 tokens x 4 rows: 12 accumulators + 3 x + 1 w = the 16 ymm registers. */
#define AVX2_TT 3
#define AVX2_TR 4
AVX2_TARGET static void tile_avx2(float *out, const float *const *xr, const float *const *wr,
                                  int cols)
{
    __m256 acc[AVX2_TT][AVX2_TR];
#pragma GCC unroll 16
    for (int t = 0; t < AVX2_TT; t++)
#pragma GCC unroll 16
        for (int r = 0; r < AVX2_TR; r++)
            acc[t][r] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= cols; i += 8) {
        __m256 xv[AVX2_TT];
#pragma GCC unroll 16
        for (int t = 0; t < AVX2_TT; t++)
            xv[t] = _mm256_loadu_ps(xr[t] + i);
#pragma GCC unroll 16
        for (int r = 0; r < AVX2_TR; r++) {
            __m256 wv = _mm256_loadu_ps(wr[r] + i);
#pragma GCC unroll 16
            for (int t = 0; t < AVX2_TT; t++)
                acc[t][r] = _mm256_fmadd_ps(xv[t], wv, acc[t][r]);
        }
    }
    for (int t = 0; t < AVX2_TT; t++)
        for (int r = 0; r < AVX2_TR; r++) {
            float s = avx2_hsum(acc[t][r]);
            for (int k = i; k < cols; k++)
                s += xr[t][k] * wr[r][k];
            out[t * AVX2_TR + r] = s;
        }
}

/* --------------------------------------------------------------- avx-512 */

#define AVX512_TARGET __attribute__((target("avx512f,avx2,fma,f16c")))

AVX512_TARGET INLINE __m512 avx512_load16(const void *w, tp_dtype dt, size_t i)
{
    if (dt == TP_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i))),
            16));
    if (dt == TP_F16)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i)));
    return _mm512_loadu_ps((const float *)w + i);
}

AVX512_TARGET INLINE void avx512_gemv_dt(float *y, const float *x, const void *w, tp_dtype dt,
                                         int r0, int r1, int cols)
{
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        const void *w0 = (const uint8_t *)w + (size_t)r * cols * elem_size(dt);
        size_t stride = (size_t)cols;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int i = 0;
        for (; i + 16 <= cols; i += 16) {
            __m512 xv = _mm512_loadu_ps(x + i);
            a0 = _mm512_fmadd_ps(xv, avx512_load16(w0, dt, (size_t)i), a0);
            a1 = _mm512_fmadd_ps(xv, avx512_load16(w0, dt, stride + i), a1);
            a2 = _mm512_fmadd_ps(xv, avx512_load16(w0, dt, 2 * stride + i), a2);
            a3 = _mm512_fmadd_ps(xv, avx512_load16(w0, dt, 3 * stride + i), a3);
        }
        float s[4] = { _mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1),
                       _mm512_reduce_add_ps(a2), _mm512_reduce_add_ps(a3) };
        for (; i < cols; i++)
            for (int k = 0; k < 4; k++)
                s[k] += x[i] * weight_at(w0, dt, k * stride + i);
        for (int k = 0; k < 4; k++)
            y[r + k] = s[k];
    }
    for (; r < r1; r++) {
        const void *wr = (const uint8_t *)w + (size_t)r * cols * elem_size(dt);
        __m512 a = _mm512_setzero_ps();
        int i = 0;
        for (; i + 16 <= cols; i += 16)
            a = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), avx512_load16(wr, dt, (size_t)i), a);
        float s = _mm512_reduce_add_ps(a);
        for (; i < cols; i++)
            s += x[i] * weight_at(wr, dt, (size_t)i);
        y[r] = s;
    }
}

/* bf16 GEMV, 32 columns a step.  One 64-byte load holds 32 bf16 as 16
 * 32-bit lanes; lane j's low half is column 2j, its high half column 2j+1.
 * A shift by 16 makes the low halves fp32 and masking off the low 16 bits
 * makes the high halves fp32: two cheap ALU ops per 32 weights instead of
 * two port-5 widenings per 16 (vpmovzxwd).  x is split into its even and
 * odd columns to match, once per step for all four rows.  Each row keeps an
 * even and an odd accumulator (eight independent FMA chains), and the next
 * group of rows is prefetched: the loop waits on memory, not on FMAs. */
AVX512_TARGET INLINE __m512 bf16_even(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
AVX512_TARGET INLINE __m512 bf16_odd(__m512i v)
{
    return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* Rows [r, r + nr) (nr <= 4) over columns [0, cols - cols % 32). */
AVX512_TARGET INLINE void avx512_bf16_rows(float *s, const float *x, const uint16_t *w0,
                                           size_t stride, int nr, int cols32, size_t far)
{
    const __m512i even_idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd_idx = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    __m512 ae[4], ao[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++)
        ae[k] = ao[k] = _mm512_setzero_ps();
    for (int i = 0; i < cols32; i += 32) {
        __m512 x0 = _mm512_loadu_ps(x + i), x1 = _mm512_loadu_ps(x + i + 16);
        __m512 xe = _mm512_permutex2var_ps(x0, even_idx, x1);
        __m512 xo = _mm512_permutex2var_ps(x0, odd_idx, x1);
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            if (k >= nr)
                break;
            const uint16_t *p = w0 + k * stride + i;
            _mm_prefetch((const char *)(p + BF16_PREFETCH_ROWS * stride), _MM_HINT_T0);
            _mm_prefetch((const char *)p + far, _MM_HINT_T1);
            __m512i v = _mm512_loadu_si512(p);
            ae[k] = _mm512_fmadd_ps(xe, bf16_even(v), ae[k]);
            ao[k] = _mm512_fmadd_ps(xo, bf16_odd(v), ao[k]);
        }
    }
    for (int k = 0; k < nr; k++)
        s[k] = _mm512_reduce_add_ps(_mm512_add_ps(ae[k], ao[k]));
}

AVX512_TARGET static void avx512_gemv_bf16(float *y, const float *x, const uint16_t *w, int r0,
                                           int r1, int cols)
{
    int cols32 = cols - cols % 32;
    size_t stride = (size_t)cols;
    for (int r = r0; r < r1; r += 4) {
        int nr = r1 - r < 4 ? r1 - r : 4;
        const uint16_t *w0 = w + (size_t)r * stride;
        size_t far = far_prefetch(stride * 2, r + nr, r1);
        float s[4];
        if (nr == 4)   /* the common case, with a constant trip count inside */
            avx512_bf16_rows(s, x, w0, stride, 4, cols32, far);
        else
            avx512_bf16_rows(s, x, w0, stride, nr, cols32, far);
        for (int k = 0; k < nr; k++) {
            for (int i = cols32; i < cols; i++)
                s[k] += x[i] * bf16_to_f32(w0[k * stride + i]);
            y[r + k] = s[k];
        }
    }
}

/* Rows [r0, r1) as `lanes` lanes, each a contiguous share of `lane` rows,
 * one row of each at a time: that many sequential streams, which the
 * prefetchers follow better than neighbouring rows inside one page when
 * rows are short (see gemv_prepared_vnni; for the bf16 GEMV, whose rows are
 * twice as long, lanes measured the same as neighbouring rows).  Sets the
 * rows rr[] of step i of the lanes and their L2 prefetch distances far[];
 * returns how many. */
static int lane_rows(int *rr, size_t *far, size_t row_bytes, int r0, int r1, int lanes, int lane,
                     int i)
{
    int nr = 0;
    for (int k = 0; k < lanes; k++) {
        int r = r0 + k * lane + i, end = r0 + (k + 1) * lane < r1 ? r0 + (k + 1) * lane : r1;
        if (r >= end)
            continue;
        size_t f = far_prefetch(row_bytes, r + 1, end);
        rr[nr] = r;
        far[nr] = f < LANE_FAR_BYTES ? f : LANE_FAR_BYTES;
        nr++;
    }
    return nr;
}

AVX512_TARGET static void gemv_avx512(float *y, const float *x, const void *w, tp_dtype dt,
                                      int r0, int r1, int cols)
{
    if (dt == TP_BF16)
        avx512_gemv_bf16(y, x, w, r0, r1, cols);
    else if (dt == TP_F16)
        avx512_gemv_dt(y, x, w, TP_F16, r0, r1, cols);
    else
        avx512_gemv_dt(y, x, w, TP_F32, r0, r1, cols);
}

AVX512_TARGET static void widen_avx512(float *dst, const void *src, tp_dtype dt, size_t count)
{
    size_t i = 0;
    if (dt == TP_BF16)
        for (; i + 16 <= count; i += 16)
            _mm512_storeu_ps(dst + i, avx512_load16(src, TP_BF16, i));
    else if (dt == TP_F16)
        for (; i + 16 <= count; i += 16)
            _mm512_storeu_ps(dst + i, avx512_load16(src, TP_F16, i));
    for (; i < count; i++)
        dst[i] = weight_at(src, dt, i);
}

/* ---- 8-bit weights: as the AVX2 code above, 16 lanes a register. */
AVX512_TARGET INLINE __m512 avx512_q8x16(const uint8_t *p, tp_dtype dt)
{
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    if (dt == TP_F8_E4M3)
        return _mm512_cvtph_ps(f8_to_f16x16(b));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

/* The columns [c0, c1) of nr rows: 64 a step (one cache line of each row),
 * then 32, 16 and single ones.  far: the L2 prefetch distance in bytes (0:
 * none, the prefetch then touches the line being read). */
AVX512_TARGET INLINE void avx512_q8_span(__m512 *acc, float *tail, const float *x,
                                         const uint8_t *w0, size_t stride, int nr, int c0, int c1,
                                         float xs, tp_dtype dt, size_t far)
{
    const __m512 sv = _mm512_set1_ps(xs);
    int i = c0;
    for (; i + 64 <= c1; i += 64) {
        __m512 x0 = _mm512_mul_ps(_mm512_loadu_ps(x + i), sv);
        __m512 x1 = _mm512_mul_ps(_mm512_loadu_ps(x + i + 16), sv);
        __m512 x2 = _mm512_mul_ps(_mm512_loadu_ps(x + i + 32), sv);
        __m512 x3 = _mm512_mul_ps(_mm512_loadu_ps(x + i + 48), sv);
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            if (k >= nr)
                break;
            const uint8_t *p = w0 + k * stride + i;
            _mm_prefetch((const char *)(p + Q8_PREFETCH_ROWS * stride), _MM_HINT_T0);
            _mm_prefetch((const char *)(p + far), _MM_HINT_T1);
            acc[2 * k] = _mm512_fmadd_ps(x0, avx512_q8x16(p, dt), acc[2 * k]);
            acc[2 * k + 1] = _mm512_fmadd_ps(x1, avx512_q8x16(p + 16, dt), acc[2 * k + 1]);
            acc[2 * k] = _mm512_fmadd_ps(x2, avx512_q8x16(p + 32, dt), acc[2 * k]);
            acc[2 * k + 1] = _mm512_fmadd_ps(x3, avx512_q8x16(p + 48, dt), acc[2 * k + 1]);
        }
    }
    if (i + 32 <= c1) {
        __m512 x0 = _mm512_mul_ps(_mm512_loadu_ps(x + i), sv);
        __m512 x1 = _mm512_mul_ps(_mm512_loadu_ps(x + i + 16), sv);
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            if (k >= nr)
                break;
            const uint8_t *p = w0 + k * stride + i;
            _mm_prefetch((const char *)(p + Q8_PREFETCH_ROWS * stride), _MM_HINT_T0);
            acc[2 * k] = _mm512_fmadd_ps(x0, avx512_q8x16(p, dt), acc[2 * k]);
            acc[2 * k + 1] = _mm512_fmadd_ps(x1, avx512_q8x16(p + 16, dt), acc[2 * k + 1]);
        }
        i += 32;
    }
    if (i + 16 <= c1) {
        __m512 x0 = _mm512_mul_ps(_mm512_loadu_ps(x + i), sv);
        for (int k = 0; k < nr; k++)
            acc[2 * k] = _mm512_fmadd_ps(x0, avx512_q8x16(w0 + k * stride + i, dt), acc[2 * k]);
        i += 16;
    }
    for (; i < c1; i++)
        for (int k = 0; k < nr; k++)
            tail[k] += x[i] * xs * q8_lane(w0[k * stride + i], dt);
}

AVX512_TARGET INLINE void avx512_q8_rows(float *s, const float *x, const tpg_job *j, int r, int nr,
                                         tp_dtype dt, size_t far)
{
    const uint8_t *w0 = (const uint8_t *)j->w + (size_t)r * j->cols;
    size_t stride = (size_t)j->cols;
    __m512 acc[8];
    float tail[4] = { 0 };
#pragma GCC unroll 8
    for (int k = 0; k < 8; k++)
        acc[k] = _mm512_setzero_ps();
    if (dt == TP_F8_E4M3) {
        const float *srow = fp8_scale_row(j, r);
        int end = fp8_first_segment(j);
        for (int c = 0, k = 0; c < j->cols; k++) {
            avx512_q8_span(acc, tail, x, w0, stride, nr, c, end, srow[k] * FP8_LANE_SCALE, dt, far);
            c = end;
            end = c + j->q.block[1] < j->cols ? c + j->q.block[1] : j->cols;
        }
        for (int k = 0; k < nr; k++)
            s[k] = _mm512_reduce_add_ps(_mm512_add_ps(acc[2 * k], acc[2 * k + 1])) + tail[k];
    } else {
        avx512_q8_span(acc, tail, x, w0, stride, nr, 0, j->cols, 1.0f, dt, far);
        for (int k = 0; k < nr; k++)
            s[k] = (_mm512_reduce_add_ps(_mm512_add_ps(acc[2 * k], acc[2 * k + 1])) + tail[k]) *
                   j->q.scale[r + k];
    }
}

AVX512_TARGET INLINE void avx512_gemv_q8_dt(float *y, const float *x, const tpg_job *j, int r0,
                                            int r1, tp_dtype dt)
{
    for (int r = r0; r < r1;) {
        int nr = dt == TP_F8_E4M3 ? fp8_rows_sharing(j, r, r1, 4) : (r1 - r < 4 ? r1 - r : 4);
        size_t far = far_prefetch(j->cols, r + nr, r1);
        float s[4];
        if (nr == 4)
            avx512_q8_rows(s, x, j, r, 4, dt, far);
        else
            avx512_q8_rows(s, x, j, r, nr, dt, far);
        for (int k = 0; k < nr; k++)
            y[r + k] = s[k];
        r += nr;
    }
}

AVX512_TARGET static void avx512_widen_q8(float *dst, const tpg_job *j, int r0, int r1)
{
    const bool fp8 = j->dt == TP_F8_E4M3;
    for (int r = r0; r < r1; r++, dst += j->cols) {
        const uint8_t *row = (const uint8_t *)j->w + (size_t)r * j->cols;
        const float *srow = fp8 ? fp8_scale_row(j, r) : &j->q.scale[r];
        int end = fp8 ? fp8_first_segment(j) : j->cols;
        for (int c = 0, k = 0; c < j->cols; k++) {
            float sc = srow[k];
            __m512 sv = _mm512_set1_ps(fp8 ? sc * FP8_LANE_SCALE : sc);
            int i = c;
            for (; i + 16 <= end; i += 16)
                _mm512_storeu_ps(dst + i, _mm512_mul_ps(fp8 ? avx512_q8x16(row + i, TP_F8_E4M3)
                                                            : avx512_q8x16(row + i, TP_I8), sv));
            for (; i < end; i++)
                dst[i] = (fp8 ? fp8_table[row[i]] : (float)(int8_t)row[i]) * sc;
            c = end;
            end = c + j->q.block[1] < j->cols ? c + j->q.block[1] : j->cols;
        }
    }
}

AVX512_TARGET static void gemv_job_avx512(float *y, const float *x, const tpg_job *j, int r0,
                                          int r1)
{
    if (j->dt == TP_F8_E4M3)
        avx512_gemv_q8_dt(y, x, j, r0, r1, TP_F8_E4M3);
    else if (j->dt == TP_I8)
        avx512_gemv_q8_dt(y, x, j, r0, r1, TP_I8);
    else
        gemv_avx512(y, x, j->w, j->dt, r0, r1, j->cols);
}

/* ---- int8 GEMV by VNNI dot products on x in 32-bit fixed point.
 *
 * The float int8 GEMV spends three vector ops a 16 weights (widen, convert,
 * FMA).  Here each token's x becomes integers once per call: x_int =
 * round(x * 2^(30-e)), e the exponent just above max|x| (so |x_int| <=
 * 2^30), written as four signed byte digits (x_int = d0 + 2^8 d1 + 2^16 d2 +
 * 2^24 d3, each in [-128, 127]) in four planes.  VPDPBUSD multiplies 64
 * unsigned bytes by 64 signed ones into 16 int32 sums, so 64 weights of a
 * row cost one XOR (w + 128 as an unsigned byte) and four VPDPBUSD:
 * sum (w + 128) d = sum w d + 128 sum d, and sum d is the token's.
 *
 * The integer dot product is exact; the one approximation is x_int: each
 * x is rounded to a multiple of 2^(e-30), an error of at most 2^-31 of the
 * token's max|x| (none for an x within 2^7 of the max, whose 24 bits all
 * fall on the grid).  For activations whose max is within 2^10 of the
 * typical |x| that is below fp32's own rounding of the sum; the bound the
 * tests hold this path to is fp32's plus 2^(e-31) sum|w|.  Six digits
 * (2^-47 of the max) measured 8% slower decode on the 2-core Xeon, four
 * digits 10% faster than the float GEMV.  A token with a NaN, an Inf or a
 * tiny max|x| (< 2^-96) keeps the float GEMV. */
#define VNNI_DIGITS 4
#define VNNI_LANES 4         /* rows at a time, one from each lane (lane_rows) */
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")))

/* Prepared x of one token: this header, the digit planes of the first
 * cols64 columns (cols64 bytes each), then the last columns' x_int. */
typedef struct vnni_x {
    double unit;                     /* the value of x_int == 1; 0: use the float GEMV */
    int64_t digit_sum[VNNI_DIGITS];  /* per plane, the sum of its digits */
} vnni_x;
#define VNNI_HEADER 64               /* the header's slot: the planes start 64-byte aligned */
_Static_assert(sizeof(vnni_x) <= VNNI_HEADER, "vnni_x outgrew its slot");

static size_t vnni_token_floats(int cols)
{
    int cols64 = cols - cols % 64, tail = cols - cols64;
    size_t bytes = VNNI_HEADER + VNNI_DIGITS * (size_t)cols64 + 4 * (size_t)tail;
    return ((bytes + 63) / 64) * 16;   /* 64-byte slots, so planes stay aligned */
}

VNNI_TARGET static void vnni_prepare_token(vnni_x *h, const float *x, int cols)
{
    int cols64 = cols - cols % 64;
    int8_t *plane = (int8_t *)h + VNNI_HEADER;
    int32_t *tail = (int32_t *)(plane + VNNI_DIGITS * (size_t)cols64);
    __m512 mx = _mm512_setzero_ps();
    __mmask16 nan = 0;
    int i = 0;
    for (; i + 16 <= cols; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
    }
    float m = _mm512_reduce_max_ps(mx);
    for (; i < cols; i++) {
        nan |= isnan(x[i]);
        m = fabsf(x[i]) > m ? fabsf(x[i]) : m;
    }
    memset(h, 0, sizeof *h);
    if (nan || !(m <= 3.0e38f) || (m > 0 && m < 0x1p-96f))
        return;   /* NaN, Inf or tiny: unit 0, the float GEMV */
    int e = 0;
    if (m > 0)
        frexpf(m, &e);   /* m < 2^e */
    h->unit = ldexp(1.0, e - 30);
    const float to_int = ldexpf(1.0f, 30 - e);
    const __m512 to_int16 = _mm512_set1_ps(to_int);
    __m512i sum[VNNI_DIGITS];
    for (int d = 0; d < VNNI_DIGITS; d++)
        sum[d] = _mm512_setzero_si512();
    for (i = 0; i < cols64; i += 16) {
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), to_int16));
        for (int d = 0; d < VNNI_DIGITS; d++) {
            /* the low byte as a signed digit; what is left is a multiple of 256 */
            __m512i dg = d < VNNI_DIGITS - 1 ? _mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24) : v;
            _mm_storeu_si128((__m128i *)(plane + (size_t)d * cols64 + i), _mm512_cvtepi32_epi8(dg));
            sum[d] = _mm512_add_epi32(sum[d], dg);
            v = _mm512_srai_epi32(_mm512_sub_epi32(v, dg), 8);
        }
    }
    for (int d = 0; d < VNNI_DIGITS; d++)
        h->digit_sum[d] = _mm512_reduce_add_epi32(sum[d]);
    for (i = cols64; i < cols; i++)
        tail[i - cols64] = (int32_t)lrintf(x[i] * to_int);
}

VNNI_TARGET static void vnni_prepare(uint32_t *xp, const float *x, int n, int cols)
{
    size_t tok = vnni_token_floats(cols);
    for (int t = 0; t < n; t++)
        vnni_prepare_token((vnni_x *)(xp + (size_t)t * tok), x + (size_t)t * cols, cols);
}

/* dot[k] = sum over the columns of row[k] . x_int, exact, k < nr <=
 * VNNI_LANES; far[k]: row k's L2 prefetch distance in bytes. */
VNNI_TARGET INLINE void vnni_rows(int64_t *dot, const vnni_x *h, int cols, const int8_t *const *row,
                                  int nr, const size_t *far)
{
    int cols64 = cols - cols % 64;
    const int8_t *plane = (const int8_t *)h + VNNI_HEADER;
    const int32_t *tail = (const int32_t *)(plane + VNNI_DIGITS * (size_t)cols64);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[VNNI_LANES][VNNI_DIGITS];
#pragma GCC unroll 4
    for (int k = 0; k < VNNI_LANES; k++)
#pragma GCC unroll 4
        for (int d = 0; d < VNNI_DIGITS; d++)
            acc[k][d] = _mm512_setzero_si512();
    for (int i = 0; i < cols64; i += 64) {
        __m512i dg[VNNI_DIGITS];
#pragma GCC unroll 4
        for (int d = 0; d < VNNI_DIGITS; d++)
            dg[d] = _mm512_load_si512(plane + (size_t)d * cols64 + i);
#pragma GCC unroll 4
        for (int k = 0; k < VNNI_LANES; k++) {
            if (k >= nr)
                break;
            const int8_t *p = row[k] + i;
            _mm_prefetch((const char *)(p + Q8_PREFETCH_ROWS * (size_t)cols), _MM_HINT_T0);
            _mm_prefetch((const char *)(p + far[k]), _MM_HINT_T1);
            __m512i wu = _mm512_xor_si512(_mm512_loadu_si512(p), flip);   /* w + 128 */
#pragma GCC unroll 4
            for (int d = 0; d < VNNI_DIGITS; d++)
                acc[k][d] = _mm512_dpbusd_epi32(acc[k][d], wu, dg[d]);
        }
    }
    for (int k = 0; k < nr; k++) {
        int64_t s = 0;
        for (int d = 0; d < VNNI_DIGITS; d++)   /* int32 lanes' sum: < 2^31 for cols <= 2^16 */
            s += ((int64_t)_mm512_reduce_add_epi32(acc[k][d]) - 128 * h->digit_sum[d]) * (1ll << (8 * d));
        for (int i = cols64; i < cols; i++)
            s += (int64_t)row[k][i] * tail[i - cols64];
        dot[k] = s;
    }
}

/* y[r] for rows [r0, r1) of an int8 job, one token prepared by vnni_prepare.
 * The rows are read as four lanes (lane_rows), each a contiguous quarter
 * of the range, one row of each at a time: four sequential streams.  Four
 * consecutive rows read side by side are four streams inside one 4 KiB
 * page for rows of 1 KiB, which the hardware prefetchers follow worse (two
 * threads, 0.6B layer shapes, before lanes: f32 rows streamed 29.5 GB/s,
 * bf16 26.5, int8 24). */
VNNI_TARGET static void gemv_prepared_vnni(float *y, const float *x, const uint32_t *xp,
                                           const tpg_job *j, int r0, int r1)
{
    const vnni_x *h = (const vnni_x *)xp;
    if (h->unit == 0) {
        gemv_job_avx512(y, x, j, r0, r1);
        return;
    }
    int lane = (r1 - r0 + VNNI_LANES - 1) / VNNI_LANES, cols = j->cols;
    const int8_t *w = (const int8_t *)j->w;
    for (int i = 0; i < lane; i++) {
        int rr[VNNI_LANES];
        size_t far[VNNI_LANES];
        int nr = lane_rows(rr, far, (size_t)cols, r0, r1, VNNI_LANES, lane, i);
        const int8_t *row[VNNI_LANES];
        for (int k = 0; k < nr; k++)
            row[k] = w + (size_t)rr[k] * cols;
        int64_t dot[VNNI_LANES];
        if (nr == VNNI_LANES)
            vnni_rows(dot, h, cols, row, VNNI_LANES, far);
        else
            vnni_rows(dot, h, cols, row, nr, far);
        for (int k = 0; k < nr; k++)
            y[rr[k]] = (float)((double)dot[k] * h->unit * (double)j->q.scale[rr[k]]);
    }
}

AVX512_TARGET static void widen_rows_avx512(float *dst, const tpg_job *j, int r0, int r1)
{
    if (is_q8(j->dt))
        avx512_widen_q8(dst, j, r0, r1);
    else
        widen_avx512(dst, (const uint8_t *)j->w + (size_t)r0 * j->cols * elem_size(j->dt),
                     j->dt, (size_t)(r1 - r0) * j->cols);
}

/* ---- bf16 GEMM for few tokens, on the weights as stored.  Each 64-byte
 * load of a row is widened in registers by the shift / mask of
 * avx512_bf16_rows, so x comes split: per 32 columns, its 16 even columns,
 * then its 16 odd ones.  A tile is up to 4 tokens x 6 rows (24
 * accumulators); the block's rows stay in L2 while each group of 4 tokens
 * (in L1) passes over them. */
#define FEW_TR 6

AVX512_TARGET static void split_x_avx512(float *xs, const float *x, int n, int cols)
{
    const __m512i even_idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd_idx = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    int cols32 = cols - cols % 32;
    for (int t = 0; t < n; t++, xs += cols32, x += cols)
        for (int i = 0; i < cols32; i += 32) {
            __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
            _mm512_storeu_ps(xs + i, _mm512_permutex2var_ps(a, even_idx, b));
            _mm512_storeu_ps(xs + i + 16, _mm512_permutex2var_ps(a, odd_idx, b));
        }
}

/* out[t * FEW_TR + r] = xs[t] . wr[r] over the first cols32 columns, for tt
 * tokens (a constant at every call, so the loops unroll). */
AVX512_TARGET INLINE void few_tile(float *out, const float *const *xs, const uint16_t *const *wr,
                                   int cols32, int tt, size_t ahead)
{
    __m512 acc[4][FEW_TR];
#pragma GCC unroll 4
    for (int t = 0; t < tt; t++)
#pragma GCC unroll 6
        for (int r = 0; r < FEW_TR; r++)
            acc[t][r] = _mm512_setzero_ps();
    for (int i = 0; i < cols32; i += 32) {
        __m512 xe[4], xo[4];
#pragma GCC unroll 4
        for (int t = 0; t < tt; t++) {
            xe[t] = _mm512_loadu_ps(xs[t] + i);
            xo[t] = _mm512_loadu_ps(xs[t] + i + 16);
        }
#pragma GCC unroll 6
        for (int r = 0; r < FEW_TR; r++) {
            if (ahead)
                _mm_prefetch((const char *)(wr[r] + i) + ahead, _MM_HINT_T0);
            __m512i v = _mm512_loadu_si512(wr[r] + i);
            __m512 we = bf16_even(v), wo = bf16_odd(v);
#pragma GCC unroll 4
            for (int t = 0; t < tt; t++) {
                acc[t][r] = _mm512_fmadd_ps(xe[t], we, acc[t][r]);
                acc[t][r] = _mm512_fmadd_ps(xo[t], wo, acc[t][r]);
            }
        }
    }
    for (int t = 0; t < tt; t++)
        for (int r = 0; r < FEW_TR; r++)
            out[t * FEW_TR + r] = _mm512_reduce_add_ps(acc[t][r]);
}

AVX512_TARGET static void bf16_few_avx512(const tpg_job *j, const float *xs, int r0, int r1)
{
    int cols = j->cols, cols32 = cols - cols % 32, nr = r1 - r0;
    const uint16_t *w = (const uint16_t *)j->w + (size_t)r0 * cols;
    const float *xt[4];
    const uint16_t *wr[FEW_TR];
    float out[4 * FEW_TR];
    for (int t0 = 0; t0 < j->n; t0 += 4) {
        int tt = j->n - t0 < 4 ? j->n - t0 : 4;
        for (int t = 0; t < tt; t++)
            xt[t] = xs + (size_t)(t0 + t) * cols32;
        for (int rr = 0; rr < nr; rr += FEW_TR) {
            /* a tile past the last row repeats it; only valid results are stored */
            for (int r = 0; r < FEW_TR; r++)
                wr[r] = w + (size_t)(rr + r < nr ? rr + r : nr - 1) * cols;
            /* the first pass over the block brings it from memory: it
             * prefetches the next group of rows as it reads this one */
            size_t ahead = t0 == 0 && rr + 2 * FEW_TR <= nr ? (size_t)FEW_TR * cols * 2 : 0;
            switch (tt) {
            case 4: few_tile(out, xt, wr, cols32, 4, ahead); break;
            case 3: few_tile(out, xt, wr, cols32, 3, ahead); break;
            case 2: few_tile(out, xt, wr, cols32, 2, ahead); break;
            default: few_tile(out, xt, wr, cols32, 1, ahead); break;
            }
            for (int t = 0; t < tt; t++) {
                const float *x = j->x + (size_t)(t0 + t) * cols;
                for (int r = 0; r < FEW_TR && rr + r < nr; r++) {
                    float s = out[t * FEW_TR + r];
                    for (int i = cols32; i < cols; i++)
                        s += x[i] * bf16_to_f32(wr[r][i]);
                    j->y[(size_t)(t0 + t) * j->rows + r0 + rr + r] = s;
                }
            }
        }
    }
}

/* ---- GEMM by panels: the block's rows are widened to fp32 and transposed
 * into a panel, panel[k][r] for its 32 rows, so that a tile
 * of up to 12 tokens x 32 rows is 24 accumulators fed by broadcasts of x:
 * per column, 2 panel loads and 12 broadcast loads for 24 FMAs, and no
 * horizontal sums at the end.  The 6 x 4 dot-product tiles this path had
 * before (as the AVX2 path's) needed 10 loads for 24 FMAs and a horizontal
 * sum per result.  On the 2-core Xeon (bf16,
 * the 0.6B layer shapes, 2 threads) this took a 256-token GEMM from 206
 * to 283 GFLOP/s and a 128-token one from 215 to 245-269. */
#define PANEL_TT 12

/* r[i] lane j -> r[j] lane i, for 16 x 16 32-bit lanes. */
AVX512_TARGET INLINE void transpose16(__m512i r[16])
{
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    /* r[4g + m], 128-bit lane L: rows 4g..4g+3 at column 4L + m */
    for (int g = 0; g < 4; g++) {
        r[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        r[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        r[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        r[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int m = 0; m < 4; m++) {
        __m512i a = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x88);
        __m512i b = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xdd);
        __m512i c = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x88);
        __m512i d = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xdd);
        t[m] = _mm512_shuffle_i32x4(a, c, 0x88);
        t[8 + m] = _mm512_shuffle_i32x4(a, c, 0xdd);
        t[4 + m] = _mm512_shuffle_i32x4(b, d, 0x88);
        t[12 + m] = _mm512_shuffle_i32x4(b, d, 0xdd);
    }
    for (int i = 0; i < 16; i++)
        r[i] = t[i];
}

/* panel[k * PANEL_ROWS + r] = W[r][k] for r < nr, 0 for nr <= r < 32, W
 * being nr rows of cols values of dtype dt (bf16, f16 or f32) at w. */
AVX512_TARGET static void pack_panel(float *panel, const void *w, tp_dtype dt, int nr, int cols)
{
    /* bf16: a 32-bit lane holds two columns, so one transpose moves 32 of
     * them; the shift and mask of bf16_even / bf16_odd then widen each */
    bool pairs = dt == TP_BF16;
    int step = pairs ? 32 : 16;
    int done = cols - cols % step;
    size_t row_bytes = (size_t)cols * elem_size(dt);
    for (int half = 0; half < 2; half++) {
        for (int k0 = 0; k0 < done; k0 += step) {
            __m512i v[16];
            for (int r = 0; r < 16; r++) {
                int rr = half * 16 + r;
                const char *row = (const char *)w + rr * row_bytes;
                v[r] = rr >= nr ? _mm512_setzero_si512()
                       : pairs  ? _mm512_loadu_si512(row + (size_t)k0 * 2)
                                : _mm512_castps_si512(avx512_load16(row, dt, (size_t)k0));
            }
            transpose16(v);
            for (int k = 0; k < 16; k++) {
                if (pairs) {
                    float *col = panel + (size_t)(k0 + 2 * k) * PANEL_ROWS + half * 16;
                    _mm512_store_ps(col, bf16_even(v[k]));
                    _mm512_store_ps(col + PANEL_ROWS, bf16_odd(v[k]));
                } else {
                    _mm512_store_si512(panel + (size_t)(k0 + k) * PANEL_ROWS + half * 16, v[k]);
                }
            }
        }
        for (int k = done; k < cols; k++)
            for (int r = 0; r < 16; r++) {
                int rr = half * 16 + r;
                panel[(size_t)k * PANEL_ROWS + rr] =
                    rr < nr ? weight_at((const char *)w + rr * row_bytes, dt, (size_t)k) : 0.0f;
            }
    }
}

/* y[t][0..nr) = x[t] . panel rows, for tt tokens (a constant at every call). */
AVX512_TARGET INLINE void panel_tile(float *y, size_t ystride, const float *x, size_t xstride,
                                     const float *panel, int cols, int tt, int nr)
{
    __m512 c0[PANEL_TT], c1[PANEL_TT];
#pragma GCC unroll 12
    for (int t = 0; t < tt; t++)
        c0[t] = c1[t] = _mm512_setzero_ps();
    for (int k = 0; k < cols; k++) {
        __m512 b0 = _mm512_load_ps(panel + (size_t)k * PANEL_ROWS);
        __m512 b1 = _mm512_load_ps(panel + (size_t)k * PANEL_ROWS + 16);
#pragma GCC unroll 12
        for (int t = 0; t < tt; t++) {
            __m512 a = _mm512_set1_ps(x[(size_t)t * xstride + k]);
            c0[t] = _mm512_fmadd_ps(a, b0, c0[t]);
            c1[t] = _mm512_fmadd_ps(a, b1, c1[t]);
        }
    }
    __mmask16 m0 = nr >= 16 ? 0xFFFF : (__mmask16)((1u << nr) - 1);
    __mmask16 m1 = nr >= 32 ? 0xFFFF : nr > 16 ? (__mmask16)((1u << (nr - 16)) - 1) : 0;
    for (int t = 0; t < tt; t++) {
        _mm512_mask_storeu_ps(y + (size_t)t * ystride, m0, c0[t]);
        _mm512_mask_storeu_ps(y + (size_t)t * ystride + 16, m1, c1[t]);
    }
}

AVX512_TARGET static void widen_rows_avx512(float *dst, const tpg_job *j, int r0, int r1);

AVX512_TARGET static void panel_block_avx512(const tpg_job *j, int r0, int r1, float *buf)
{
    int cols = j->cols, nr = r1 - r0;
    float *panel = buf + (size_t)PANEL_ROWS * cols;
    if (is_q8(j->dt)) {   /* dequantized to fp32 first, scales and all */
        widen_rows_avx512(buf, j, r0, r1);
        pack_panel(panel, buf, TP_F32, nr, cols);
    } else {
        pack_panel(panel, (const char *)j->w + (size_t)r0 * cols * elem_size(j->dt), j->dt, nr, cols);
    }
    for (int t0 = 0; t0 < j->n;) {
        int left = j->n - t0;
        int tt = left >= 12 ? 12 : left >= 8 ? 8 : left >= 4 ? 4 : left;
        float *y = j->y + (size_t)t0 * j->rows + r0;
        const float *x = j->x + (size_t)t0 * cols;
        switch (tt) {
        case 12: panel_tile(y, j->rows, x, cols, panel, cols, 12, nr); break;
        case 8: panel_tile(y, j->rows, x, cols, panel, cols, 8, nr); break;
        case 4: panel_tile(y, j->rows, x, cols, panel, cols, 4, nr); break;
        case 3: panel_tile(y, j->rows, x, cols, panel, cols, 3, nr); break;
        case 2: panel_tile(y, j->rows, x, cols, panel, cols, 2, nr); break;
        default: panel_tile(y, j->rows, x, cols, panel, cols, 1, nr); break;
        }
        t0 += tt;
    }
}

/* ---- GEMM on AMX tiles (bf16, int8 or fp8 weights, cols a multiple of 32).
 * A tile product C[16 rows][16 tokens] += A . B takes A as 16 weight rows
 * of 32 bf16 each, loaded from the rows where they lie (bf16) or from the
 * block widened to bf16 (8-bit: exact, the scales applied to the sums),
 * and B as the tokens' x in AMX's pair layout.  x is fp32, so it is split
 * into three bf16 parts, x = hi + mid + lo, each the top 16 bits of what is
 * left (truncation: each subtraction is exact).  Three parts hold all 24
 * bits of an fp32 significand, and a bf16 x bf16 product is exact in fp32,
 * so the tiles sum the same exact products as the fp32 paths, only in
 * another order (and in three passes): the contract of gemm_cpu.h holds.
 * Tiny parts are flushed by AMX (denormals), an error below 2^-100 of x;
 * an Inf in x splits into Inf and NaNs (Inf - Inf), so its products are
 * NaN where the fp32 paths may give an Inf.
 *
 * Packed x (amx_pack_x): per group of 16 tokens, per step of 32 columns,
 * per part, one 1 KiB B tile: row kp holds, for each token t, the dword
 * (bf16 of column 2kp, bf16 of column 2kp + 1); tokens past n are zero.
 *
 * A block is AMX_ROWS rows: two A tiles share each B tile load.  The rows
 * of a block that do not fill a tile (the job's last rows % 16) run through
 * panel_block.  Prefetching the thread's next block while the tiles work
 * (into L1, L2, or by loads) measured no faster: with 16 tokens the tiles
 * and the loads of A from memory take turns, ~45 ms a 0.6B layer stack
 * against ~32 ms for one token's GEMV. */
#define AMX_TARGET __attribute__((target("avx512f,avx512bw,avx2,fma,f16c,amx-tile,amx-bf16")))

AMX_TARGET static void amx_pack_x(uint32_t *xp, const float *x, int n, int cols)
{
    /* output word 2j + e takes the top half of column 2j + e: the odd
     * words of a (columns 0..15) or of b (16..31, index + 32) */
    static const uint16_t pair_words[32] = { 1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21,
                                             23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43,
                                             45, 47, 49, 51, 53, 55, 57, 59, 61, 63 };
    const __m512i idx = _mm512_loadu_si512(pair_words);
    const __m512i top = _mm512_set1_epi32((int)0xFFFF0000u);
    int steps = cols / 32, groups = (n + AMX_TOKENS - 1) / AMX_TOKENS;
    for (int g = 0; g < groups; g++)
        for (int s = 0; s < steps; s++) {
            __m512i part[AMX_PARTS][16];
            for (int t = 0; t < AMX_TOKENS; t++) {
                int tok = g * AMX_TOKENS + t;
                if (tok >= n) {
                    for (int p = 0; p < AMX_PARTS; p++)
                        part[p][t] = _mm512_setzero_si512();
                    continue;
                }
                const float *xt = x + (size_t)tok * cols + (size_t)s * 32;
                __m512 a = _mm512_loadu_ps(xt), b = _mm512_loadu_ps(xt + 16);
                for (int p = 0; p < AMX_PARTS; p++) {
                    __m512 ah = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), top));
                    __m512 bh = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(b), top));
                    part[p][t] = _mm512_permutex2var_epi16(_mm512_castps_si512(ah), idx,
                                                           _mm512_castps_si512(bh));
                    a = _mm512_sub_ps(a, ah);
                    b = _mm512_sub_ps(b, bh);
                }
            }
            uint32_t *tile = xp + ((size_t)g * steps + s) * AMX_PARTS * AMX_TILE_DWORDS;
            for (int p = 0; p < AMX_PARTS; p++) {
                transpose16(part[p]);   /* [token][pair] -> [pair][token] */
                for (int kp = 0; kp < 16; kp++)
                    _mm512_storeu_si512(tile + p * AMX_TILE_DWORDS + kp * 16, part[p][kp]);
            }
        }
}

/* The tile shapes: every tile 16 rows of 64 bytes.  Loaded once per
 * thread (the configuration is thread state, kept across calls). */
static _Thread_local bool amx_configured;

AMX_TARGET static void amx_configure(void)
{
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
    amx_configured = true;
}

/* dst = nr 8-bit rows of cols as bf16, exactly: an int8 as its integer, an
 * e4m3 as its value * 2^-8 (the f16 lanes of avx512_q8x16, FP8_LANE_SCALE);
 * both have at most 8 significant bits, so the fp32's top half is exact. */
AMX_TARGET static void amx_widen_q8(uint16_t *dst, const uint8_t *w, tp_dtype dt, int nr, int cols)
{
    size_t count = (size_t)nr * cols;   /* cols is a multiple of 32 */
    for (size_t i = 0; i < count; i += 16) {
        __m512 f = avx512_q8x16(w + i, dt);
        __m512i top = _mm512_srli_epi32(_mm512_castps_si512(f), 16);   /* the low half is zero */
        _mm256_storeu_si256((__m256i *)(dst + i), _mm512_cvtepi32_epi16(top));
    }
}

/* c[i] = the tiles' sums over steps [s0, s1) for `tiles` (1 or 2, never 0:
 * a tile load reads 16 rows whatever the block holds) A tiles
 * of 16 rows at w (stride bytes a row) and the B tiles of one token group
 * at b (that group's step 0). */
AMX_TARGET static void amx_tiles(float c[2][16][16], int tiles, const char *w, size_t stride,
                                 const uint32_t *b, int s0, int s1)
{
    b += (size_t)s0 * AMX_PARTS * AMX_TILE_DWORDS;
    if (tiles == 2) {
        _tile_zero(0);
        _tile_zero(1);
        for (int s = s0; s < s1; s++, b += AMX_PARTS * AMX_TILE_DWORDS) {
            _tile_loadd(2, w + (size_t)s * 64, stride);
            _tile_loadd(3, w + 16 * stride + (size_t)s * 64, stride);
            _tile_loadd(4, b, 64);
            _tile_loadd(5, b + AMX_TILE_DWORDS, 64);
            _tile_loadd(6, b + 2 * AMX_TILE_DWORDS, 64);
            _tile_dpbf16ps(0, 2, 4);
            _tile_dpbf16ps(1, 3, 4);
            _tile_dpbf16ps(0, 2, 5);
            _tile_dpbf16ps(1, 3, 5);
            _tile_dpbf16ps(0, 2, 6);
            _tile_dpbf16ps(1, 3, 6);
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
    } else {
        _tile_zero(0);
        for (int s = s0; s < s1; s++, b += AMX_PARTS * AMX_TILE_DWORDS) {
            _tile_loadd(2, w + (size_t)s * 64, stride);
            _tile_loadd(4, b, 64);
            _tile_loadd(5, b + AMX_TILE_DWORDS, 64);
            _tile_loadd(6, b + 2 * AMX_TILE_DWORDS, 64);
            _tile_dpbf16ps(0, 2, 4);
            _tile_dpbf16ps(0, 2, 5);
            _tile_dpbf16ps(0, 2, 6);
        }
        _tile_stored(0, c[0], 64);
    }
}

/* Whether amx_block takes j: bf16, int8, or fp8 whose scale blocks start
 * and end on the tiles' 32-column steps. */
static bool amx_takes(const tpg_job *j)
{
    if (j->cols % 32)
        return false;
    if (j->dt == TP_F8_E4M3)
        return j->q.block[1] % 32 == 0 && j->q.origin[1] % 32 == 0;
    return j->dt == TP_BF16 || j->dt == TP_I8;
}

/* Rows [r0, r1) for all tokens.  bf16 rows are read where they lie; 8-bit
 * rows are first widened to bf16 in buf.  The tiles sum a segment of
 * columns at a time, all of them but for fp8, whose segments are its scale
 * blocks: each segment's sums times the row's block scale are added up in
 * fp32 (as the fp8 GEMV scales x per segment); int8's row scale goes on the
 * total. */
AMX_TARGET static void amx_block(const tpg_job *j, const uint32_t *xp, int r0, int r1, float *buf)
{
    if (!amx_configured)
        amx_configure();
    int cols = j->cols, steps = cols / 32, groups = (j->n + AMX_TOKENS - 1) / AMX_TOKENS;
    int tiles = (r1 - r0) / 16, rows = tiles * 16;
    bool fp8 = j->dt == TP_F8_E4M3;
    size_t stride = (size_t)cols * 2;
    const char *w = (const char *)j->w + (size_t)r0 * stride;
    if (is_q8(j->dt)) {
        amx_widen_q8((uint16_t *)buf, (const uint8_t *)j->w + (size_t)r0 * cols, j->dt, rows, cols);
        w = (const char *)buf;
    }
    /* steps per segment: the first (a slice may start inside a scale block), then the rest */
    int first = fp8 ? fp8_first_segment(j) / 32 : steps, each = fp8 ? j->q.block[1] / 32 : steps;
    const float *srow[AMX_ROWS];   /* fp8: each row's scale row */
    for (int m = 0; fp8 && m < rows; m++)
        srow[m] = fp8_scale_row(j, r0 + m);
    float c[2][16][16], acc[2][16][16];
    for (int g = 0; tiles > 0 && g < groups; g++) {   /* fewer than 16 rows: all panel_block's */
        int tn = j->n - g * AMX_TOKENS < AMX_TOKENS ? j->n - g * AMX_TOKENS : AMX_TOKENS;
        const uint32_t *b = xp + (size_t)g * steps * AMX_PARTS * AMX_TILE_DWORDS;
        memset(acc, 0, sizeof acc);
        for (int s0 = 0, k = 0; s0 < steps; k++) {
            int s1 = s0 + (k == 0 ? first : each) < steps ? s0 + (k == 0 ? first : each) : steps;
            amx_tiles(c, tiles, w, stride, b, s0, s1);
            for (int m = 0; m < rows; m++) {   /* a row of c: its 16 tokens */
                __m512 f = _mm512_set1_ps(fp8 ? srow[m][k] * FP8_LANE_SCALE : 1.0f);
                float *a = acc[m / 16][m % 16];
                _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_loadu_ps(c[m / 16][m % 16]), f,
                                                    _mm512_loadu_ps(a)));
            }
            s0 = s1;
        }
        for (int t = 0; t < tn; t++) {
            float *y = j->y + (size_t)(g * AMX_TOKENS + t) * j->rows + r0;
            for (int m = 0; m < rows; m++)
                y[m] = j->dt == TP_I8 ? acc[m / 16][m % 16][t] * j->q.scale[r0 + m]
                                      : acc[m / 16][m % 16][t];
        }
    }
    if (rows < r1 - r0)   /* buf's widened rows are no longer needed */
        panel_block_avx512(j, r0 + rows, r1, buf);
}
#endif /* TPG_X86 */

/* ------------------------------------------------------------- dispatch */

static const tpg_path PATHS[TPG_ISA_COUNT] = {
    [TPG_PORTABLE] = { gemv_job_portable, widen_rows_portable, tile_portable, 1, 1 },
#ifdef TPG_X86
    [TPG_AVX2] = { gemv_job_avx2, widen_rows_avx2, tile_avx2, AVX2_TT, AVX2_TR },
    [TPG_AVX512] = { gemv_job_avx512, widen_rows_avx512, NULL, 0, 0,   /* GEMMs by panel_block */
                     bf16_few_avx512, split_x_avx512, panel_block_avx512 },
    [TPG_AMX] = { gemv_job_avx512, widen_rows_avx512, NULL, 0, 0, bf16_few_avx512,
                  split_x_avx512, panel_block_avx512, amx_block, amx_takes, amx_pack_x,
                  gemv_prepared_vnni, vnni_prepare, vnni_token_floats },
#endif
};

static const char *const ISA_NAMES[TPG_ISA_COUNT] = { "portable", "avx2", "avx512", "amx" };

const char *tpg_isa_name(tpg_isa isa)
{
    return isa >= 0 && isa < TPG_ISA_COUNT ? ISA_NAMES[isa] : "?";
}

#ifdef TPG_X86
/* F16C from CPUID leaf 1 (ECX bit 29): clang 14's __builtin_cpu_supports
 * does not know "f16c", and the fuzz build compiles this file with clang. */
static bool has_f16c(void)
{
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define ARCH_REQ_XCOMP_PERM 0x1023   /* asm/prctl.h, Linux 5.16 */
#define XFEATURE_XTILEDATA 18
#endif

/* AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22), AVX-512BW for
 * the packing, AVX-512 VNNI for the int8 GEMV and, on Linux, the kernel's leave to use the tile state
 * (asked once for the process; without it the first tile instruction
 * faults).  Elsewhere AMX is not used. */
static bool amx_granted;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static void amx_ask(void)
{
    unsigned a, b, c, d;
    __builtin_cpu_init();
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22)) ||
        !__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512vnni"))
        return;
#if defined(__linux__)
    amx_granted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#endif
}
static bool amx_usable(void)
{
    pthread_once(&amx_once, amx_ask);
    return amx_granted;
}
#endif

bool tpg_isa_supported(tpg_isa isa)
{
    switch (isa) {
    case TPG_PORTABLE:
        return true;
#ifdef TPG_X86
    case TPG_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
    case TPG_AVX512:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f");
    case TPG_AMX:
        return amx_usable();
#endif
    default:
        return false;
    }
}

static int g_isa = -1;   /* -1: not chosen yet */

tpg_isa tpg_best_isa(void)
{
    for (int i = TPG_ISA_COUNT - 1; i > TPG_PORTABLE; i--)
        if (tpg_isa_supported((tpg_isa)i))
            return (tpg_isa)i;
    return TPG_PORTABLE;
}

tpg_isa tpg_get_isa(void)
{
    if (g_isa < 0)
        g_isa = tpg_best_isa();
    return (tpg_isa)g_isa;
}

int tpg_set_isa(tpg_isa isa)
{
    if (!tpg_isa_supported(isa))
        return -1;
    g_isa = isa;
    return 0;
}

/* --------------------------------------------------------------- driver */

/* How a job's blocks run. */
typedef enum job_mode {
    BY_GEMV,    /* one token: the path's GEMV (also the fallback without buffers) */
    BY_TILES,   /* widen each block once, then tiles of tokens x rows over it */
    BY_FEW,     /* few tokens of bf16: bf16_few on the stored rows */
    BY_PANEL,   /* the path's panel_block */
    BY_AMX,     /* the path's amx_block, x packed by its pack_x */
    BY_INT8,    /* one token of int8: the path's gemv_i8, x prepared by its prep_i8 */
} job_mode;

typedef struct batch_ctx {
    const tpg_job *jobs;
    int count;
    const tpg_path *path;
    job_mode mode[BATCH_MAX];
    const void *xs[BATCH_MAX];      /* BY_FEW: x split by split_x; BY_AMX: packed by pack_x;
                                       BY_INT8: prepared by prep_i8 */
    int block_rows[BATCH_MAX];
    size_t first_block[BATCH_MAX + 1];
    float *scratch;                 /* worker i: scratch + i * scratch_floats */
    size_t scratch_floats;
    float *split;                   /* the xs, one per distinct x */
    size_t workers;
    atomic_size_t next_block;
} batch_ctx;

/* Rows [r0, r1) of job j for all its tokens: widen them once (f32 is used
 * in place; 8-bit weights are dequantized), then every tile of tokens x rows
 * over the widened block. */
static void gemm_block(const tpg_path *p, const tpg_job *j, int r0, int r1, float *buf)
{
    int nr = r1 - r0, cols = j->cols;
    const float *wb;
    if (j->dt == TP_F32) {
        wb = (const float *)j->w + (size_t)r0 * cols;
    } else {
        p->widen_rows(buf, j, r0, r1);
        wb = buf;
    }
    const float *xr[TILE_T_MAX], *wr[TILE_R_MAX];
    float out[TILE_T_MAX * TILE_R_MAX];
    for (int t0 = 0; t0 < j->n; t0 += p->tile_t) {
        /* a tile past the last token or row repeats it; only valid results are stored */
        for (int t = 0; t < p->tile_t; t++)
            xr[t] = j->x + (size_t)(t0 + t < j->n ? t0 + t : j->n - 1) * cols;
        for (int rr = 0; rr < nr; rr += p->tile_r) {
            for (int r = 0; r < p->tile_r; r++)
                wr[r] = wb + (size_t)(rr + r < nr ? rr + r : nr - 1) * cols;
            p->tile(out, xr, wr, cols);
            for (int t = 0; t < p->tile_t && t0 + t < j->n; t++)
                for (int r = 0; r < p->tile_r && rr + r < nr; r++)
                    j->y[(size_t)(t0 + t) * j->rows + r0 + rr + r] = out[t * p->tile_r + r];
        }
    }
}

/* The index of the job that block b belongs to. */
static int job_of(const batch_ctx *c, size_t b)
{
    int ji = 0;
    while (b >= c->first_block[ji + 1])
        ji++;
    return ji;
}

/* Blocks [b, b + count) of one job (count > 1 for GEMV jobs only). */
static void run_blocks(batch_ctx *c, size_t b, size_t count, float *buf)
{
    int ji = job_of(c, b);
    const tpg_job *j = &c->jobs[ji];
    int r0 = (int)(b - c->first_block[ji]) * c->block_rows[ji];
    size_t end_rows = (size_t)r0 + count * (size_t)c->block_rows[ji];
    int r1 = end_rows < (size_t)j->rows ? (int)end_rows : j->rows;
    if (c->mode[ji] == BY_TILES) {
        gemm_block(c->path, j, r0, r1, buf);
        return;
    }
    if (c->mode[ji] == BY_FEW) {
        c->path->bf16_few(j, c->xs[ji], r0, r1);
        return;
    }
    if (c->mode[ji] == BY_PANEL) {
        c->path->panel_block(j, r0, r1, buf);
        return;
    }
    if (c->mode[ji] == BY_INT8) {
        c->path->gemv_i8(j->y, j->x, c->xs[ji], j, r0, r1);
        return;
    }
    if (c->mode[ji] == BY_AMX) {
        c->path->amx_block(j, c->xs[ji], r0, r1, buf);
        return;
    }
    for (int t = 0; t < j->n; t++)
        c->path->gemv_rows(j->y + (size_t)t * j->rows, j->x + (size_t)t * j->cols, j, r0, r1);
}

/* How many blocks from b to claim at once: one for a GEMM (its blocks are
 * sized for the cache); for a GEMV, guided: a share of what is left, down
 * to one block at the end, within b's job.  A GEMV's L2 prefetch stops at
 * the end of what its thread claimed, and each restart costs the stream
 * its lead: claims of a few 64 KiB blocks at first and single ones at the
 * end keep both long streams and a balanced finish.  0.6B layer stack, 2
 * threads, ms a token: int8 23.2-25.3 -> 20.4-22.6, bf16 39.6-43.0 ->
 * 36.7-37.3; tprun decode +10% for both. */
static size_t claim_size(const batch_ctx *c, size_t b)
{
    int ji = job_of(c, b);
    if (c->mode[ji] != BY_GEMV && c->mode[ji] != BY_INT8)
        return 1;
    size_t share = (c->first_block[c->count] - b) / (2 * c->workers);
    size_t in_job = c->first_block[ji + 1] - b;
    return share < 1 ? 1 : share > in_job ? in_job : share;
}

/* Worker i claims blocks until none are left; its widening buffer is its own. */
static void worker(size_t i, void *arg)
{
    batch_ctx *c = arg;
    float *buf = c->scratch ? c->scratch + i * c->scratch_floats : NULL;
    size_t total = c->first_block[c->count];
    size_t b = atomic_load(&c->next_block), take;
    for (;;) {
        do {
            if (b >= total)
                return;
            take = claim_size(c, b);
        } while (!atomic_compare_exchange_weak(&c->next_block, &b, b + take));
        run_blocks(c, b, take, buf);
        b = atomic_load(&c->next_block);
    }
}

/* Rows per GEMV block: GEMV_BLOCK_ROWS, or more when rows are short, so
 * that each block is a stream of GEMV_BLOCK_BYTES for the prefetchers. */
static int gemv_block_rows(const tpg_job *j)
{
    size_t row_bytes = (size_t)j->cols * elem_size(j->dt);
    size_t rows = row_bytes ? GEMV_BLOCK_BYTES / row_bytes : GEMV_BLOCK_ROWS;
    rows -= rows % 4;
    return rows > GEMV_BLOCK_ROWS ? (int)rows : GEMV_BLOCK_ROWS;
}

/* Rows per GEMM block: as many as fit GEMM_BLOCK_BYTES widened, a multiple
 * of the tile's rows. */
static int gemm_block_rows(int cols)
{
    size_t rows = GEMM_BLOCK_BYTES / ((size_t)cols * sizeof(float));
    rows -= rows % TILE_R_MAX;
    if (rows < TILE_R_MAX)
        rows = TILE_R_MAX;
    if (rows > 256)
        rows = 256;
    return (int)rows;
}

/* Rows per bf16_few block: FEW_BLOCK_BYTES of stored rows, a multiple of
 * the tile's rows. */
static int few_block_rows(int cols)
{
    size_t rows = FEW_BLOCK_BYTES / ((size_t)cols * 2);
    rows -= rows % FEW_TR;
    return rows < FEW_TR ? FEW_TR : rows > 384 ? 384 : (int)rows;
}

static job_mode mode_of(const tpg_path *p, const tpg_job *j)
{
    if (j->n == 1 && p->gemv_i8 && j->dt == TP_I8 && j->cols <= VNNI_MAX_COLS)
        return BY_INT8;
    if (j->n <= 1)
        return BY_GEMV;
    if (p->amx_block && p->amx_takes(j))
        return BY_AMX;
    if (p->bf16_few && j->dt == TP_BF16 && j->n <= FEW_TOKENS)
        return BY_FEW;
    return p->panel_block ? BY_PANEL : BY_TILES;
}

/* Floats (or dwords) of prepared x that job j needs in mode m: BY_FEW's
 * split, BY_AMX's packing, BY_INT8's fixed point; 0 for the other modes. */
static size_t prepared_size(const tpg_path *p, const tpg_job *j, job_mode m)
{
    if (m == BY_FEW)
        return (size_t)j->n * (size_t)j->cols;
    if (m == BY_AMX)
        return amx_packed_dwords(j->n, j->cols);
    if (m == BY_INT8)
        return (size_t)j->n * p->i8_token_floats(j->cols);
    return 0;
}

/* Prepare the x of every BY_FEW, BY_AMX and BY_INT8 job into c->split, once for
 * jobs of one mode that share it (q, k and v do); if that memory cannot be
 * allocated, those jobs run BY_GEMV. */
static void split_inputs(batch_ctx *c)
{
    size_t floats = 0, at = 0;
    for (int i = 0; i < c->count; i++)
        floats += (prepared_size(c->path, &c->jobs[i], c->mode[i]) + 15) & ~(size_t)15;
    if (!floats)
        return;
    c->split = aligned_alloc(64, floats * sizeof(float));
    for (int i = 0; i < c->count; i++) {
        const tpg_job *j = &c->jobs[i];
        size_t size = prepared_size(c->path, j, c->mode[i]);
        if (!size)
            continue;
        if (!c->split) {
            c->mode[i] = BY_GEMV;   /* block_rows stay: a GEMV block of any size is valid */
            continue;
        }
        for (int k = 0; k < i && !c->xs[i]; k++)
            if (c->mode[k] == c->mode[i] && c->jobs[k].x == j->x && c->jobs[k].n == j->n &&
                c->jobs[k].cols == j->cols)
                c->xs[i] = c->xs[k];
        if (c->xs[i])
            continue;
        if (c->mode[i] == BY_FEW)
            c->path->split_x(c->split + at, j->x, j->n, j->cols);
        else if (c->mode[i] == BY_AMX)
            c->path->pack_x((uint32_t *)(c->split + at), j->x, j->n, j->cols);
        else
            c->path->prep_i8((uint32_t *)(c->split + at), j->x, j->n, j->cols);
        c->xs[i] = c->split + at;
        at += (size + 15) & ~(size_t)15;
    }
}

static void run_batch(const tpg_job *jobs, int count, tp_pool *pool)
{
    fp8_lut();   /* the table the 8-bit paths' tails read, built before the threads start */
    batch_ctx c = { .jobs = jobs, .count = count, .path = &PATHS[tpg_get_isa()] };
    size_t widen_floats = 0;
    c.first_block[0] = 0;
    for (int i = 0; i < count; i++) {
        const tpg_job *j = &jobs[i];
        c.mode[i] = mode_of(c.path, j);
        c.block_rows[i] = c.mode[i] == BY_TILES ? gemm_block_rows(j->cols)
                          : c.mode[i] == BY_FEW ? few_block_rows(j->cols)
                          : c.mode[i] == BY_PANEL ? PANEL_ROWS
                          : c.mode[i] == BY_AMX   ? AMX_ROWS
                                                  : gemv_block_rows(j);
        size_t need = c.mode[i] == BY_PANEL || c.mode[i] == BY_AMX
                      ? 2 * (size_t)PANEL_ROWS * j->cols
                      : c.mode[i] == BY_TILES && j->dt != TP_F32 ? (size_t)c.block_rows[i] * j->cols
                                                                 : 0;
        if (need > widen_floats)
            widen_floats = need;
        size_t blocks = j->rows > 0 && j->n > 0
                        ? ((size_t)j->rows + c.block_rows[i] - 1) / c.block_rows[i] : 0;
        c.first_block[i + 1] = c.first_block[i] + blocks;
    }
    size_t total = c.first_block[count];
    size_t workers = pool ? (size_t)tp_pool_threads(pool) + 1 : 1;
    if (workers > total)
        workers = total;
    if (workers == 0)
        return;
    c.workers = workers;
    if (widen_floats) {
        c.scratch_floats = (widen_floats + 15) & ~(size_t)15;   /* 64-byte aligned slots */
        c.scratch = aligned_alloc(64, workers * c.scratch_floats * sizeof(float));
        if (!c.scratch)   /* no buffers: one token at a time, same result */
            for (int i = 0; i < count; i++)
                if (c.mode[i] == BY_PANEL || c.mode[i] == BY_AMX ||
                    (c.mode[i] == BY_TILES && jobs[i].dt != TP_F32))
                    c.mode[i] = BY_GEMV;
        /* block_rows stay as counted: a GEMV block of any size is valid */
    }
    split_inputs(&c);
    atomic_init(&c.next_block, 0);
    if (workers == 1)
        worker(0, &c);
    else
        tp_pool_parallel_for(pool, workers, worker, &c);
    free(c.scratch);
    free(c.split);
}

void tpg_matmul_batch(const tpg_job *jobs, int count, tp_pool *pool)
{
    for (int i = 0; i < count; i += BATCH_MAX)
        run_batch(jobs + i, count - i < BATCH_MAX ? count - i : BATCH_MAX, pool);
}

void tpg_matmul(float *y, const float *x, int n, const void *w, tp_dtype dt, int rows, int cols,
                tp_pool *pool)
{
    tpg_job j = { .y = y, .x = x, .n = n, .w = w, .dt = dt, .rows = rows, .cols = cols };
    tpg_matmul_batch(&j, 1, pool);
}
