/* test_gemm_cpu.c - every GEMV/GEMM path this CPU can run (forced with
 * tpg_set_isa), for bf16, f16 and f32 weights, against tpg_matmul_ref, and
 * for fp8 (e4m3, block scales) and int8 (row scales) against tpg_job_ref,
 * with slices whose block origin is not 0:
 * odd sizes (tails, partial tiles, partial blocks), one thread and a pool,
 * batches of jobs, and guard values around each output (nothing written
 * outside y). */
#include "gemm_cpu.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int failures;
#define CHECK(cond, ...) do { if (!(cond)) { failures++; fprintf(stderr, "FAIL %s:%d: ", \
    __FILE__, __LINE__); fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); } } while (0)

static uint64_t rng_state = 0x2545f4914f6cdd1dull;
static float frand(void) /* uniform in [-1, 1) */
{
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return (float)((rng_state >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}

static uint16_t to_bf16(float f)   /* truncation: any bf16 value will do */
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)(u >> 16);
}

static uint16_t to_f16(float f)    /* |f| < 1: normal or subnormal halves */
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t sign = (u >> 16) & 0x8000u;
    int e = (int)((u >> 23) & 0xff) - 127 + 15;
    uint32_t mant = u & 0x7fffffu;
    if (e <= 0)
        return (uint16_t)sign;  /* tiny: zero */
    return (uint16_t)(sign | ((uint32_t)e << 10) | (mant >> 13));
}

/* Random weights [rows][cols] in dtype dt and their fp32 values. */
static void *rand_weights(tp_dtype dt, size_t count, float *values)
{
    void *w = malloc(count * (dt == TP_F32 ? 4 : 2) + 1);
    for (size_t i = 0; i < count; i++) {
        float f = frand() * 0.5f;
        if (dt == TP_BF16) {
            ((uint16_t *)w)[i] = to_bf16(f);
            values[i] = tp_bf16_to_f32(((uint16_t *)w)[i]);
        } else if (dt == TP_F16) {
            ((uint16_t *)w)[i] = to_f16(f);
            values[i] = tp_f16_to_f32(((uint16_t *)w)[i]);
        } else {
            ((float *)w)[i] = f;
            values[i] = f;
        }
    }
    return w;
}

#define GUARD 8
static const float GUARD_VALUE = -12345.0f;

/* One job set up with its reference result and the bound of fp32
 * summation in any order: |err| <= cols * 2^-23 * sum |x w| (+ a hair). */
typedef struct job_case {
    tpg_job job;
    float *ybuf;        /* GUARD + n * rows + GUARD */
    float *want;
    double *bound;
    void *w;
    float *x;
} job_case;

/* The reference and bounds of c for its current x. */
static void case_expect(job_case *c)
{
    const tpg_job *j = &c->job;
    tpg_matmul_ref(c->want, c->x, j->n, c->w, j->dt, j->rows, j->cols);
    for (int t = 0; t < j->n; t++)
        for (int o = 0; o < j->rows; o++) {
            double s = 0;
            for (int i = 0; i < j->cols; i++)
                s += fabs((double)c->x[(size_t)t * j->cols + i] * tpg_weight(j, o, i));
            c->bound[(size_t)t * j->rows + o] = (j->cols + 2) * 1.2e-7 * s + 1e-30;
        }
}

static void make_case(job_case *c, tp_dtype dt, int n, int rows, int cols)
{
    size_t wn = (size_t)rows * cols, yn = (size_t)n * rows;
    float *wv = malloc((wn ? wn : 1) * sizeof *wv);
    c->w = rand_weights(dt, wn, wv);
    c->x = malloc(((size_t)n * cols + 1) * sizeof *c->x);
    for (size_t i = 0; i < (size_t)n * cols; i++)
        c->x[i] = frand() * 2.0f;
    c->ybuf = malloc((yn + 2 * GUARD) * sizeof *c->ybuf);
    for (size_t i = 0; i < yn + 2 * GUARD; i++)
        c->ybuf[i] = GUARD_VALUE;
    c->want = malloc((yn + 1) * sizeof *c->want);
    c->bound = malloc((yn + 1) * sizeof *c->bound);
    tpg_matmul_ref(c->want, c->x, n, c->w, dt, rows, cols);
    for (int t = 0; t < n; t++)
        for (int o = 0; o < rows; o++) {
            double s = 0;
            for (int i = 0; i < cols; i++)
                s += fabs((double)c->x[(size_t)t * cols + i] * wv[(size_t)o * cols + i]);
            c->bound[(size_t)t * rows + o] = (cols + 2) * 1.2e-7 * s + 1e-30;
        }
    free(wv);
    c->job = (tpg_job){ .y = c->ybuf + GUARD, .x = c->x, .n = n, .w = c->w, .dt = dt,
                        .rows = rows, .cols = cols };
}

static void free_case(job_case *c)
{
    free(c->w); free(c->x); free(c->ybuf); free(c->want); free(c->bound);
}

/* An 8-bit case: random e4m3 bytes (NaN bytes excluded) with a block grid
 * [B0 x B1 blocks] seen from origin (o0, o1) and three spare floats per grid
 * row (stride > grid columns), or random int8 with a scale per row.  The
 * scales are powers of two times [0.5, 1): varied, never subnormal. */
static void make_q8_case(job_case *c, tp_dtype dt, int n, int rows, int cols, int b0, int b1,
                         int o0, int o1)
{
    size_t wn = (size_t)rows * cols, yn = (size_t)n * rows;
    uint8_t *w = malloc(wn + 1);
    for (size_t i = 0; i < wn; i++) {
        uint8_t b = (uint8_t)(frand() * 128.0f + 128.0f);
        if (dt == TP_F8_E4M3 && (b & 0x7f) == 0x7f)
            b ^= 1;   /* 0x7e: 448, the largest finite */
        w[i] = b;
    }
    tpg_quant q = { 0 };
    size_t ns;
    if (dt == TP_F8_E4M3) {
        int grid_rows = (o0 + rows - 1) / b0 + 1, grid_cols = (o1 + cols - 1) / b1 + 1;
        q = (tpg_quant){ .stride = grid_cols + 3, .block = { b0, b1 }, .origin = { o0, o1 } };
        ns = (size_t)grid_rows * q.stride;
    } else {
        ns = (size_t)rows;
    }
    float *scale = malloc((ns + 1) * sizeof *scale);
    for (size_t i = 0; i < ns; i++)
        scale[i] = ldexpf(0.75f + 0.25f * frand(), -(int)(i % 13) - 2);
    q.scale = scale;
    c->w = w;
    c->x = malloc(((size_t)n * cols + 1) * sizeof *c->x);
    for (size_t i = 0; i < (size_t)n * cols; i++)
        c->x[i] = frand() * 2.0f;
    c->ybuf = malloc((yn + 2 * GUARD) * sizeof *c->ybuf);
    for (size_t i = 0; i < yn + 2 * GUARD; i++)
        c->ybuf[i] = GUARD_VALUE;
    c->want = malloc((yn + 1) * sizeof *c->want);
    c->bound = malloc((yn + 1) * sizeof *c->bound);
    c->job = (tpg_job){ .y = c->want, .x = c->x, .n = n, .w = w, .dt = dt, .rows = rows,
                        .cols = cols, .q = q };
    tpg_job_ref(&c->job);
    /* the reference's weights, from FORMAT.md's formula written out here */
    int bad = 0;
    for (int r = 0; r < rows && !bad; r++)
        for (int i = 0; i < cols; i++) {
            float v = dt == TP_I8 ? (float)(int8_t)w[(size_t)r * cols + i] * scale[r]
                    : tp_f8e4m3_to_f32(w[(size_t)r * cols + i]) *
                      scale[(size_t)((o0 + r) / b0) * q.stride + (o1 + i) / b1];
            if (tpg_weight(&c->job, r, i) != v && !bad++)
                CHECK(0, "tpg_weight %s [%d][%d] = %g, FORMAT.md says %g", dt == TP_I8 ? "int8"
                      : "fp8", r, i, tpg_weight(&c->job, r, i), v);
        }
    for (int t = 0; t < n; t++)
        for (int o = 0; o < rows; o++) {
            double sum = 0;
            for (int i = 0; i < cols; i++)
                sum += fabs((double)c->x[(size_t)t * cols + i] * tpg_weight(&c->job, o, i));
            /* summation order, plus one rounding more per product (the
             * scale applied to x or to the sum) */
            c->bound[(size_t)t * rows + o] = (cols + 4) * 1.2e-7 * sum + 1e-30;
        }
    c->job.y = c->ybuf + GUARD;
}

static void free_q8_case(job_case *c)
{
    free((void *)c->job.q.scale);
    free_case(c);
}

static const char *dt_name(tp_dtype dt)
{
    return dt == TP_BF16 ? "bf16" : dt == TP_F16 ? "f16" : dt == TP_F32 ? "f32"
         : dt == TP_F8_E4M3 ? "fp8" : "int8";
}

/* Checks c's output against the reference and the guards; returns the
 * number of mismatches (reported once per case). */
static int check_case(const job_case *c, const char *what)
{
    const tpg_job *j = &c->job;
    size_t yn = (size_t)j->n * j->rows;
    int bad = 0;
    for (size_t i = 0; i < GUARD; i++)
        if (c->ybuf[i] != GUARD_VALUE || c->ybuf[GUARD + yn + i] != GUARD_VALUE)
            bad++;
    if (bad) {
        CHECK(0, "%s: %s n=%d rows=%d cols=%d: wrote outside y", what, dt_name(j->dt), j->n,
              j->rows, j->cols);
        return bad;
    }
    for (size_t i = 0; i < yn; i++) {
        double e = fabs((double)j->y[i] - c->want[i]);
        if (!(e <= c->bound[i])) {
            CHECK(0, "%s: %s n=%d rows=%d cols=%d: y[%zu][%zu] = %.9g, reference %.9g (bound %.3g)",
                  what, dt_name(j->dt), j->n, j->rows, j->cols, i / j->rows, i % j->rows,
                  j->y[i], c->want[i], c->bound[i]);
            return 1;
        }
    }
    return 0;
}


static const tp_dtype DTYPES[] = { TP_BF16, TP_F16, TP_F32 };
/* tails of 32/16/8 lanes (95: the bf16 GEMV's 31-column tail), partial tiles (6x4, 3x4; 49 rows: a last panel of 17), several GEMM blocks (cols
 * 4096: 8 rows per block), a GEMV block of 32 rows and a bit */
/* n up to 48 runs bf16 as few-token tiles (4 tokens x 6 rows), 50 widened tiles */
static const int NS[] = { 1, 2, 5, 7, 13, 50 };
/* AMX (bf16, cols a multiple of 32): 70 x 64 is two 32-row blocks and a
 * last block of 6 rows (panel), 48 x 96 a block of one tile, 17 x 32 one
 * tile and a row; n = 50 is four token groups, the last of 2 tokens. */
static const int SHAPES[][2] = { { 1, 1 }, { 3, 7 }, { 5, 16 }, { 37, 33 }, { 64, 100 },
                                 { 9, 257 }, { 21, 4096 }, { 70, 64 }, { 6, 95 }, { 49, 40 },
                                 { 48, 96 }, { 17, 32 } };

static void test_path(tpg_isa isa, tp_pool *pool)
{
    char what[64];
    snprintf(what, sizeof what, "%s, %s", tpg_isa_name(isa), pool ? "pool of 3" : "one thread");
    int cases = 0;
    for (size_t d = 0; d < sizeof DTYPES / sizeof DTYPES[0]; d++)
        for (size_t s = 0; s < sizeof SHAPES / sizeof SHAPES[0]; s++)
            for (size_t k = 0; k < sizeof NS / sizeof NS[0]; k++) {
                job_case c;
                make_case(&c, DTYPES[d], NS[k], SHAPES[s][0], SHAPES[s][1]);
                tpg_matmul(c.job.y, c.job.x, c.job.n, c.job.w, c.job.dt, c.job.rows, c.job.cols,
                           pool);
                check_case(&c, what);
                free_case(&c);
                cases++;
            }
    /* a batch of mixed jobs (more than one parallel section's worth), GEMV and GEMM */
    enum { NJ = 11 };
    job_case cs[NJ];
    tpg_job jobs[NJ];
    for (int i = 0; i < NJ; i++) {
        make_case(&cs[i], DTYPES[i % 3], i % 2 ? 1 : 1 + i, 5 + 7 * i, 16 * i + 3);
        jobs[i] = cs[i].job;
    }
    tpg_matmul_batch(jobs, NJ, pool);
    for (int i = 0; i < NJ; i++) {
        check_case(&cs[i], what);
        free_case(&cs[i]);
    }
    /* q, k and v: three jobs over one x (split once for all three), and a
     * fourth of the same shape over another x (not shared) */
    job_case qkv[4];
    make_case(&qkv[3], TP_BF16, 6, 7, 96);
    jobs[3] = qkv[3].job;
    for (int i = 0; i < 3; i++) {
        make_case(&qkv[i], TP_BF16, 6, 7 + 6 * i, 96);
        if (i) {   /* the same values, and the jobs given the same pointer */
            memcpy(qkv[i].x, qkv[0].x, (size_t)6 * 96 * sizeof(float));
            case_expect(&qkv[i]);
            qkv[i].job.x = qkv[0].x;
        }
        jobs[i] = qkv[i].job;
    }
    tpg_matmul_batch(jobs, 4, pool);
    for (int i = 0; i < 4; i++) {
        check_case(&qkv[i], what);
        free_case(&qkv[i]);
    }
    printf("  %s: %d products and batches of %d and 4 checked\n", what, cases, NJ);
}

/* Integer products that every summation order gets exactly: bf16 weights
 * in {-2..2}, x integers of 17 bits (so an fp32 x needs all three of the
 * AMX path's bf16 parts), 64 columns, so |partial sums| <= 2^24.  Any path
 * that drops or misplaces a bit of x, a column or a token is off by at
 * least 1; the rounding bound of check_case is too loose to see that. */
static void test_exact_path(tpg_isa isa, tp_pool *pool)
{
    enum { ROWS = 87, COLS = 64, NMAX = 37 };   /* blocks of 32, 32 and 23 rows */
    static const int ns[] = { 1, 3, 16, 17, NMAX };
    uint16_t *w = malloc((size_t)ROWS * COLS * sizeof *w);
    float *x = malloc((size_t)NMAX * COLS * sizeof *x), *y = malloc((size_t)NMAX * ROWS * sizeof *y);
    int8_t *wi = malloc((size_t)ROWS * COLS);
    for (int i = 0; i < ROWS * COLS; i++) {
        wi[i] = (int8_t)((int)((frand() + 1.0f) * 2.5f) - 2);
        w[i] = tp_f32_to_bf16((float)wi[i]);
    }
    for (int i = 0; i < NMAX * COLS; i++)
        x[i] = (float)((65536 + (int)((frand() + 1.0f) * 32767.0f)) * (i % 3 ? 1 : -1));
    int bad = 0;
    for (size_t k = 0; k < sizeof ns / sizeof ns[0]; k++) {
        tpg_matmul(y, x, ns[k], w, TP_BF16, ROWS, COLS, pool);
        for (int t = 0; t < ns[k]; t++)
            for (int o = 0; o < ROWS; o++) {
                long long want = 0;
                for (int i = 0; i < COLS; i++)
                    want += (long long)wi[o * COLS + i] * (long long)x[t * COLS + i];
                if (y[(size_t)t * ROWS + o] != (float)want && !bad++)
                    CHECK(0, "%s%s: exact products, n=%d: y[%d][%d] = %.1f, want %lld",
                          tpg_isa_name(isa), pool ? " (pool)" : "", ns[k], t, o,
                          y[(size_t)t * ROWS + o], want);
            }
    }
    free(w); free(x); free(y); free(wi);
}

/* bf16 weights that end where an unreadable page begins, in shapes whose
 * last block has fewer rows than a tile (70 = 32 + 32 + 6, 17 = 16 + 1,
 * 5): a path that reads past the matrix faults here.  AMX tile loads are
 * not seen by AddressSanitizer, so this is their out-of-bounds check. */
static void test_weights_at_page_end(tpg_isa isa, tp_pool *pool)
{
    static const int shapes[][2] = { { 70, 64 }, { 17, 96 }, { 5, 32 } };
    long page = sysconf(_SC_PAGESIZE);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int rows = shapes[s][0], cols = shapes[s][1], n = 20;
        size_t bytes = (size_t)rows * cols * 2, span = (bytes + (size_t)page - 1) / page * page;
        char *map = mmap(NULL, span + (size_t)page, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        CHECK(map != MAP_FAILED, "mmap");
        if (map == MAP_FAILED)
            return;
        CHECK(mprotect(map + span, (size_t)page, PROT_NONE) == 0, "mprotect");
        job_case c;
        make_case(&c, TP_BF16, n, rows, cols);
        uint16_t *w = (uint16_t *)(map + span - bytes);
        memcpy(w, c.w, bytes);
        c.job.w = w;
        tpg_matmul_batch(&c.job, 1, pool);   /* a read past the end faults here */
        char what[64];
        snprintf(what, sizeof what, "%s%s, weights at a page end", tpg_isa_name(isa),
                 pool ? " (pool)" : "");
        check_case(&c, what);
        c.job.w = c.w;
        free_case(&c);
        munmap(map, span + (size_t)page);
    }
}

/* int8 rows over x that the AMX path's VNNI GEMV turns into 32-bit fixed
 * point (x_int = x * 2^(30-e), four byte digits): exact integer products
 * (every path exact: 17-bit integers x, int8 w, sums below 2^24); a token
 * with an Inf, one with a NaN and one tiny (max|x| < 2^-96), which take
 * the float GEMV (non-finite results where the reference has them); and
 * a token whose max|x| is 2^20 times the rest.  The bound is fp32's, plus
 * for the AMX path its contract's 2^(e-31) sum|w| (each x rounded to a
 * multiple of 2^(e-30)): the outlier's own weight is sometimes 0, and then
 * the fixed point's rounding of the small x is all there is. */
static void test_int8_fixed_point(tpg_isa isa, tp_pool *pool)
{
    enum { ROWS = 37, COLS = 200 };   /* 200: three 64-column steps and a tail of 8 */
    char what[64];
    snprintf(what, sizeof what, "%s%s, int8 fixed point", tpg_isa_name(isa), pool ? " (pool)" : "");
    int8_t *w = malloc((size_t)ROWS * COLS);
    float scale[ROWS], x[COLS], y[ROWS];
    double want[ROWS];
    for (int i = 0; i < ROWS * COLS; i++)
        w[i] = (int8_t)((int)((frand() + 1.0f) * 2.5f) - 2);
    for (int r = 0; r < ROWS; r++)
        scale[r] = 1.0f;
    tpg_job j = { .y = y, .x = x, .n = 1, .w = w, .dt = TP_I8, .rows = ROWS, .cols = COLS,
                  .q = { .scale = scale } };
    for (int c = 0; c < 5; c++) {
        for (int i = 0; i < COLS; i++)
            x[i] = c == 0 ? (float)((65536 + (int)((frand() + 1.0f) * 32767.0f)) * (i % 3 ? 1 : -1))
                 : c == 3 ? ldexpf(frand(), -100)
                 : c == 4 ? (i == 77 ? 1.0e6f : frand())
                          : frand();
        if (c == 1)
            x[130] = INFINITY;
        if (c == 2)
            x[7] = NAN;
        tpg_matmul_batch(&j, 1, pool);
        int bad = 0;
        for (int r = 0; r < ROWS && !bad; r++) {
            double sum = 0, mag = 0;
            for (int i = 0; i < COLS; i++) {
                sum += (double)w[r * COLS + i] * x[i];
                mag += fabs((double)w[r * COLS + i] * x[i]);
            }
            want[r] = sum;
            double fixed = 0;   /* the fixed point's share of the bound */
            if (isa == TPG_AMX && c == 4) {
                int e = ilogb(1.0e6) + 1;   /* max|x| < 2^e */
                for (int i = 0; i < COLS; i++)
                    fixed += ldexp(fabs((double)w[r * COLS + i]), e - 31);
            }
            bool ok = c == 0 ? y[r] == (float)sum
                    : !isfinite(sum) ? !isfinite(y[r]) && (isnan(sum) == isnan(y[r]))
                                     : fabs(y[r] - sum) <= (COLS + 4) * 1.2e-7 * mag + fixed + 1e-30;
            if (!ok && !bad++)
                CHECK(0, "%s, case %d: y[%d] = %.9g, reference %.9g", what, c, r, y[r], want[r]);
        }
    }
    free(w);
}

/* 8-bit block geometries: block sizes and the slice's origin inside its
 * first block (a rank's slice that starts inside a block), 128 x 128 as
 * published, small blocks so that rows of one SIMD group straddle block
 * rows, and odd ones whose segments end between SIMD steps.  The AMX path
 * takes fp8 whose column blocks fall on 32-column steps: 128 x 128 from
 * origins 0 and (96, 32), and 8 x 64 from (3, 32) (a tile's 16 rows under
 * three scale rows, segments of 32 then 64 columns). */
static const int Q8_BLOCKS[][4] = { { 128, 128, 0, 0 }, { 128, 128, 96, 32 }, { 4, 16, 1, 5 },
                                    { 3, 5, 2, 4 }, { 128, 128, 127, 127 }, { 2, 32, 0, 16 },
                                    { 8, 64, 3, 32 } };
static const int Q8_SHAPES[][2] = { { 1, 1 }, { 3, 7 }, { 37, 33 }, { 9, 257 }, { 70, 64 },
                                    { 6, 95 }, { 5, 300 }, { 33, 1024 } };

static void test_q8_path(tpg_isa isa, tp_pool *pool)
{
    char what[64];
    snprintf(what, sizeof what, "%s, %s", tpg_isa_name(isa), pool ? "pool of 3" : "one thread");
    int cases = 0;
    static const tp_dtype Q8[] = { TP_F8_E4M3, TP_I8 };
    for (size_t d = 0; d < 2; d++)
        for (size_t b = 0; b < sizeof Q8_BLOCKS / sizeof Q8_BLOCKS[0]; b++) {
            if (Q8[d] == TP_I8 && b > 0)
                break;   /* int8 has no blocks */
            for (size_t s = 0; s < sizeof Q8_SHAPES / sizeof Q8_SHAPES[0]; s++)
                for (size_t k = 0; k < sizeof NS / sizeof NS[0]; k++) {
                    const int *g = Q8_BLOCKS[b];
                    job_case c;
                    make_q8_case(&c, Q8[d], NS[k], Q8_SHAPES[s][0], Q8_SHAPES[s][1], g[0], g[1],
                                 g[2], g[3]);
                    tpg_matmul_batch(&c.job, 1, pool);
                    if (check_case(&c, what))
                        fprintf(stderr, "  (blocks %d x %d, origin %d, %d)\n", g[0], g[1], g[2],
                                g[3]);
                    free_q8_case(&c);
                    cases++;
                }
        }
    /* fp8, int8 and bf16 jobs in one parallel section, GEMV and GEMM */
    enum { NJ = 6 };
    job_case cs[NJ];
    tpg_job jobs[NJ];
    for (int i = 0; i < NJ; i++) {
        if (i % 3 == 2)
            make_case(&cs[i], TP_BF16, i % 2 ? 1 : 4, 40 + i, 200 + i);
        else
            make_q8_case(&cs[i], i % 3 ? TP_I8 : TP_F8_E4M3, i % 2 ? 1 : 4, 40 + i, 200 + i,
                         8, 64, i, 3 * i);
        jobs[i] = cs[i].job;
    }
    tpg_matmul_batch(jobs, NJ, pool);
    for (int i = 0; i < NJ; i++) {
        check_case(&cs[i], what);
        if (i % 3 == 2)
            free_case(&cs[i]);
        else
            free_q8_case(&cs[i]);
    }
    printf("  %s: %d 8-bit products and a mixed batch of %d checked\n", what, cases, NJ);
}

int main(void)
{
    CHECK(tpg_set_isa(TPG_ISA_COUNT) < 0, "an unknown path was accepted");
    CHECK(tpg_isa_supported(TPG_PORTABLE), "the portable path must always run");
    tpg_isa best = tpg_get_isa();
    CHECK(tpg_isa_supported(best), "the chosen path %s is not supported", tpg_isa_name(best));
    tp_pool *pool = tp_pool_create(2);   /* with the caller: three workers */
    int run = 0;
    for (int isa = 0; isa < TPG_ISA_COUNT; isa++) {
        if (!tpg_isa_supported((tpg_isa)isa)) {
            printf("  %s: not run, this CPU lacks it\n", tpg_isa_name((tpg_isa)isa));
            CHECK(tpg_set_isa((tpg_isa)isa) < 0, "%s forced on a CPU without it",
                  tpg_isa_name((tpg_isa)isa));
            continue;
        }
        CHECK(tpg_set_isa((tpg_isa)isa) == 0 && tpg_get_isa() == (tpg_isa)isa, "forcing %s",
              tpg_isa_name((tpg_isa)isa));
        test_path((tpg_isa)isa, NULL);
        test_path((tpg_isa)isa, pool);
        test_exact_path((tpg_isa)isa, NULL);
        test_exact_path((tpg_isa)isa, pool);
        test_weights_at_page_end((tpg_isa)isa, NULL);
        test_weights_at_page_end((tpg_isa)isa, pool);
        test_q8_path((tpg_isa)isa, NULL);
        test_q8_path((tpg_isa)isa, pool);
        test_int8_fixed_point((tpg_isa)isa, NULL);
        test_int8_fixed_point((tpg_isa)isa, pool);
        run++;
    }
    tp_pool_destroy(pool);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("gemm_cpu: %d path(s) checked, all passed (default path: %s)\n", run,
           tpg_isa_name(best));
    return 0;
}
