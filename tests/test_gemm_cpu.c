/* test_gemm_cpu.c - every GEMV/GEMM path this CPU can run (forced with
 * tpg_set_isa), for bf16, f16 and f32 weights, against tpg_matmul_ref:
 * odd sizes (tails, partial tiles, partial blocks), one thread and a pool,
 * batches of jobs, and guard values around each output (nothing written
 * outside y). */
#include "gemm_cpu.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    c->job = (tpg_job){ c->ybuf + GUARD, c->x, n, c->w, dt, rows, cols };
}

static const char *dt_name(tp_dtype dt)
{
    return dt == TP_BF16 ? "bf16" : dt == TP_F16 ? "f16" : "f32";
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

static void free_case(job_case *c)
{
    free(c->w); free(c->x); free(c->ybuf); free(c->want); free(c->bound);
}

static const tp_dtype DTYPES[] = { TP_BF16, TP_F16, TP_F32 };
/* tails of 32/16/8 lanes (95: the bf16 GEMV's 31-column tail), partial tiles (6x4, 3x4), several GEMM blocks (cols
 * 4096: 8 rows per block), a GEMV block of 32 rows and a bit */
static const int NS[] = { 1, 2, 5, 7, 13 };
static const int SHAPES[][2] = { { 1, 1 }, { 3, 7 }, { 5, 16 }, { 37, 33 }, { 64, 100 },
                                 { 9, 257 }, { 21, 4096 }, { 70, 64 }, { 6, 95 } };

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
    printf("  %s: %d products and a batch of %d checked\n", what, cases, NJ);
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
