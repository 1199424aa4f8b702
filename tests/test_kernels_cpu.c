/* test_kernels_cpu.c - every CPU kernel against a naive double-precision
 * version on odd sizes; RoPE against values computed by transformers;
 * attention against softmax(QK^T * scale + mask) V written out in full. */
#include "kernels_cpu.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;
#define CHECK(cond, ...) do { if (!(cond)) { failures++; fprintf(stderr, "FAIL %s:%d: ", \
    __FILE__, __LINE__); fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); } } while (0)

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float frand(void) /* uniform in [-1, 1) */
{
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return (float)((rng_state >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}
static float *rand_vec(size_t n, float scale)
{
    float *v = malloc(n * sizeof *v);
    for (size_t i = 0; i < n; i++)
        v[i] = frand() * scale;
    return v;
}

/* max |a - b| / max(1, max |b|) over n values */
static double rel_err(const float *a, const double *b, size_t n)
{
    double mx = 1.0, d = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (fabs(b[i]) > mx) mx = fabs(b[i]);
        double e = fabs((double)a[i] - b[i]);
        if (!(e <= d)) d = e;   /* NaN counts as a huge error */
    }
    return d / mx;
}

static void test_matmul(void)
{
    int shapes[][3] = { { 1, 37, 23 }, { 5, 37, 23 }, { 7, 1, 3 }, { 3, 129, 65 } };
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int n = shapes[s][0], in = shapes[s][1], out = shapes[s][2];
        float *x = rand_vec((size_t)n * in, 1), *w = rand_vec((size_t)out * in, 1);
        float *b = rand_vec((size_t)out, 1), *y = malloc((size_t)n * out * sizeof *y);
        double *ref = malloc((size_t)n * out * sizeof *ref);
        for (int with_bias = 0; with_bias < 2; with_bias++) {
            tpk_matmul(y, x, w, with_bias ? b : NULL, n, in, out);
            for (int t = 0; t < n; t++)
                for (int o = 0; o < out; o++) {
                    double acc = with_bias ? b[o] : 0.0;
                    for (int i = 0; i < in; i++)
                        acc += (double)x[t * in + i] * w[o * in + i];
                    ref[t * out + o] = acc;
                }
            double e = rel_err(y, ref, (size_t)n * out);
            CHECK(e < 1e-5, "matmul n=%d in=%d out=%d bias=%d: rel err %g", n, in, out, with_bias, e);
        }
        free(x); free(w); free(b); free(y); free(ref);
    }
}

static void naive_rms(const float *x, const float *w, int dim, float eps, double *out)
{
    double ss = 0;
    for (int i = 0; i < dim; i++)
        ss += (double)x[i] * x[i];
    double s = 1.0 / sqrt(ss / dim + eps);
    for (int i = 0; i < dim; i++)
        out[i] = w[i] * x[i] * s;
}

static void test_norms(void)
{
    int n = 3, dim = 67;
    float eps = 1e-6f;
    float *x = rand_vec((size_t)n * dim, 3), *w = rand_vec(dim, 1), *d = rand_vec((size_t)n * dim, 1);
    float *out = malloc((size_t)n * dim * sizeof *out);
    double *ref = malloc((size_t)n * dim * sizeof *ref);

    tpk_rmsnorm(out, x, w, n, dim, eps);
    for (int t = 0; t < n; t++)
        naive_rms(x + t * dim, w, dim, eps, ref + t * dim);
    CHECK(rel_err(out, ref, (size_t)n * dim) < 1e-6, "rmsnorm: rel err %g",
          rel_err(out, ref, (size_t)n * dim));

    /* fused add: x becomes x + d, out its norm */
    float *xs = malloc((size_t)n * dim * sizeof *xs);
    memcpy(xs, x, (size_t)n * dim * sizeof *xs);
    tpk_add_rmsnorm(xs, d, out, w, n, dim, eps);
    float *sum = malloc((size_t)n * dim * sizeof *sum);
    for (int i = 0; i < n * dim; i++) {
        sum[i] = x[i] + d[i];
        CHECK(xs[i] == sum[i], "add_rmsnorm: residual %d is %g, expected %g", i, xs[i], sum[i]);
    }
    for (int t = 0; t < n; t++)
        naive_rms(sum + t * dim, w, dim, eps, ref + t * dim);
    CHECK(rel_err(out, ref, (size_t)n * dim) < 1e-6, "add_rmsnorm: rel err %g",
          rel_err(out, ref, (size_t)n * dim));

    /* per head: 3 tokens x 5 heads of 6 */
    int hd = 6, rows = 15;
    float *hx = rand_vec((size_t)rows * hd, 2), *hw = rand_vec(hd, 1);
    double *href = malloc((size_t)rows * hd * sizeof *href);
    for (int r = 0; r < rows; r++)
        naive_rms(hx + r * hd, hw, hd, eps, href + r * hd);
    tpk_head_rmsnorm(hx, hw, rows, hd, eps);
    CHECK(rel_err(hx, href, (size_t)rows * hd) < 1e-6, "head_rmsnorm: rel err %g",
          rel_err(hx, href, (size_t)rows * hd));
    free(x); free(w); free(d); free(out); free(ref); free(xs); free(sum);
    free(hx); free(hw); free(href);
}

static void test_embedding(void)
{
    int V = 11, H = 5;
    float *table = rand_vec((size_t)V * H, 1);
    int32_t ids[4] = { 0, 10, 4, 7 };
    float out[4 * 5];
    tpk_embedding(out, table, ids, 4, H, 0, V);
    for (int t = 0; t < 4; t++)
        CHECK(memcmp(out + t * H, table + ids[t] * H, H * sizeof(float)) == 0, "embedding row %d", t);
    /* vocab-parallel slice: rows [4, 8) of the table */
    tpk_embedding(out, table + 4 * H, ids, 4, H, 4, 8);
    for (int t = 0; t < 4; t++)
        for (int i = 0; i < H; i++) {
            float want = (ids[t] >= 4 && ids[t] < 8) ? table[ids[t] * H + i] : 0.0f;
            CHECK(out[t * H + i] == want, "slice embedding row %d col %d: %g, want %g", t, i,
                  out[t * H + i], want);
        }
    /* a bf16 table read in place: rows widened exactly, a slice's other ids zero */
    uint16_t *bf = malloc((size_t)V * H * sizeof *bf);
    for (int i = 0; i < V * H; i++)
        bf[i] = (uint16_t)(0x3c00 + 37 * i);   /* distinct normal values */
    tpk_embedding_rows(out, bf + 4 * H, TP_BF16, ids, 4, H, 4, 8);
    for (int t = 0; t < 4; t++)
        for (int i = 0; i < H; i++) {
            float want = (ids[t] >= 4 && ids[t] < 8) ? tp_bf16_to_f32(bf[ids[t] * H + i]) : 0.0f;
            CHECK(out[t * H + i] == want, "bf16 embedding row %d col %d: %g, want %g", t, i,
                  out[t * H + i], want);
        }
    free(bf);
    free(table);
}

static void test_rope(void)
{
    /* default: theta^(-2i/d) */
    float inv[8];
    tpk_rope_params p = { .theta = 10000.0f };
    tpk_rope_inv_freq(inv, 8, &p);
    double want_def[4] = { 1.0, 0.1, 0.01, 0.001 };
    for (int i = 0; i < 4; i++)
        CHECK(fabs(inv[i] - want_def[i]) <= 1e-6 * want_def[i], "inv_freq[%d] = %.9g, want %g", i,
              inv[i], want_def[i]);

    /* llama3 scaling, head_dim 16, theta 5e5, factor 8, low 1, high 4,
     * original 64: covers all three regimes.  Values printed by
     * transformers 5 ROPE_INIT_FUNCTIONS["llama3"]. */
    tpk_rope_params p3 = { .theta = 500000.0f, .llama3 = true, .factor = 8.0f,
                           .low_freq_factor = 1.0f, .high_freq_factor = 4.0f,
                           .original_max_position = 64 };
    double want3[8] = { 1.0, 0.07940301299095154, 0.004700753837823868, 0.0009115831344388425,
                        0.00017677668074611574, 3.428102354519069e-05, 6.647869668086059e-06,
                        1.289173155782919e-06 };
    tpk_rope_inv_freq(inv, 16, &p3);
    for (int i = 0; i < 8; i++)
        CHECK(fabs(inv[i] - want3[i]) <= 2e-6 * want3[i], "llama3 inv_freq[%d] = %.9g, want %.9g",
              i, inv[i], want3[i]);

    /* rotation: head_dim 4, pairs (0,2) and (1,3); 2 tokens at positions
     * 3 and 4, 2 heads, rows padded to stride 9. */
    float inv4[2] = { 1.0f, 0.01f };
    float cos_t[5 * 2], sin_t[5 * 2];
    tpk_rope_table(cos_t, sin_t, inv4, 4, 5);
    float x[2 * 9];
    for (int i = 0; i < 18; i++)
        x[i] = (float)(i + 1);
    float orig[18];
    memcpy(orig, x, sizeof x);
    tpk_rope(x, 2, 2, 4, 9, 3, cos_t, sin_t);
    for (int t = 0; t < 2; t++)
        for (int h = 0; h < 2; h++) {
            const float *o = orig + t * 9 + h * 4;
            const float *r = x + t * 9 + h * 4;
            double pos = 3 + t;
            for (int i = 0; i < 2; i++) {
                double a = pos * (i ? 0.01 : 1.0);
                double w0 = o[i] * cos(a) - o[i + 2] * sin(a);
                double w1 = o[i + 2] * cos(a) + o[i] * sin(a);
                CHECK(fabs(r[i] - w0) < 1e-5 && fabs(r[i + 2] - w1) < 1e-5,
                      "rope t=%d h=%d i=%d: (%g, %g), want (%g, %g)", t, h, i, r[i], r[i + 2], w0, w1);
            }
        }
    CHECK(x[8] == 9.0f && x[17] == 18.0f, "rope wrote past the heads into the row padding");
}

/* softmax(q K^T * scale + causal/window mask) V, written out in full. */
static void naive_attention(double *out, const float *q, const float *k, const float *v, int n,
                            int pos0, int hd, int window, double scale)
{
    int total = pos0 + n;
    double *s = malloc((size_t)total * sizeof *s);
    for (int t = 0; t < n; t++) {
        int p = pos0 + t;
        double mx = -INFINITY;
        for (int j = 0; j < total; j++) {
            bool visible = j <= p && (window <= 0 || j > p - window);
            if (!visible) { s[j] = -INFINITY; continue; }
            double d = 0;
            for (int e = 0; e < hd; e++)
                d += (double)q[t * hd + e] * k[j * hd + e];
            s[j] = d * scale;
            if (s[j] > mx) mx = s[j];
        }
        double sum = 0;
        for (int j = 0; j < total; j++) {
            s[j] = s[j] == -INFINITY ? 0.0 : exp(s[j] - mx);
            sum += s[j];
        }
        for (int e = 0; e < hd; e++) {
            double acc = 0;
            for (int j = 0; j < total; j++)
                acc += s[j] / sum * v[j * hd + e];
            out[t * hd + e] = acc;
        }
    }
    free(s);
}

static void test_attention(void)
{
    int hd = 6, n = 7, pos0 = 3, total = pos0 + n;
    int windows[] = { 0, 4, 1, 100 };
    float *q = rand_vec((size_t)n * hd, 2), *k = rand_vec((size_t)total * hd, 2);
    float *v = rand_vec((size_t)total * hd, 1);
    float *out = malloc((size_t)n * hd * sizeof *out), *scratch = malloc(total * sizeof(float));
    double *ref = malloc((size_t)n * hd * sizeof *ref);
    for (size_t w = 0; w < sizeof windows / sizeof windows[0]; w++) {
        float scale = 1.0f / sqrtf((float)hd);
        tpk_attention_head(out, hd, q, hd, k, v, n, pos0, hd, windows[w], scale, scratch);
        naive_attention(ref, q, k, v, n, pos0, hd, windows[w], scale);
        double e = rel_err(out, ref, (size_t)n * hd);
        CHECK(e < 1e-5, "attention window %d: rel err %g", windows[w], e);
    }
    /* the blocked (prefill) version: several blocks, windows shorter and
     * longer than a block */
    {
        int bn = 2 * TPK_ATT_BLOCK + 7, bpos0 = 5, btotal = bpos0 + bn;
        float *bq = rand_vec((size_t)bn * hd, 2), *bk = rand_vec((size_t)btotal * hd, 2);
        float *bv = rand_vec((size_t)btotal * hd, 1);
        float *bout = malloc((size_t)bn * hd * sizeof *bout);
        float *bscratch = malloc((size_t)TPK_ATT_BLOCK * btotal * sizeof(float));
        double *bref = malloc((size_t)bn * hd * sizeof *bref);
        int bwindows[] = { 0, 3, TPK_ATT_BLOCK + 5, 1000 };
        for (size_t w = 0; w < sizeof bwindows / sizeof bwindows[0]; w++) {
            tpk_attention_head_blocked(bout, hd, bq, hd, bk, bv, bn, bpos0, hd, bwindows[w], 0.4f,
                                       bscratch);
            naive_attention(bref, bq, bk, bv, bn, bpos0, hd, bwindows[w], 0.4f);
            double e = rel_err(bout, bref, (size_t)bn * hd);
            CHECK(e < 1e-5, "blocked attention window %d: rel err %g", bwindows[w], e);
        }
        free(bq); free(bk); free(bv); free(bout); free(bscratch); free(bref);
    }
    /* window 1: each query sees only its own key, so the output is v[p] */
    tpk_attention_head(out, hd, q, hd, k, v, n, pos0, hd, 1, 0.5f, scratch);
    for (int t = 0; t < n; t++)
        for (int e = 0; e < hd; e++)
            CHECK(fabsf(out[t * hd + e] - v[(pos0 + t) * hd + e]) < 1e-6, "window 1: t=%d", t);
    free(q); free(k); free(v); free(out); free(scratch); free(ref);
}

static void test_silu_and_convert(void)
{
    size_t n = 33;
    float *g = rand_vec(n, 6), *u = rand_vec(n, 1);
    double ref[33];
    for (size_t i = 0; i < n; i++)
        ref[i] = g[i] / (1.0 + exp(-(double)g[i])) * u[i];
    tpk_silu_mul(g, u, n);
    CHECK(rel_err(g, ref, n) < 1e-6, "silu_mul: rel err %g", rel_err(g, ref, n));

    uint16_t bf[4] = { 0x3f80, 0xc040, 0x0000, 0x3e00 };   /* 1, -3, 0, 0.125 */
    float want[4] = { 1.0f, -3.0f, 0.0f, 0.125f }, got[4];
    tpk_to_f32(got, bf, TP_BF16, 4);
    CHECK(memcmp(got, want, sizeof want) == 0, "bf16 -> f32");
    uint16_t hf[4] = { 0x3c00, 0xc200, 0x0000, 0x3000 };   /* 1, -3, 0, 0.125 */
    tpk_to_f32(got, hf, TP_F16, 4);
    CHECK(memcmp(got, want, sizeof want) == 0, "f16 -> f32: %g %g %g %g", got[0], got[1], got[2],
          got[3]);
    tpk_to_f32(got, want, TP_F32, 4);
    CHECK(memcmp(got, want, sizeof want) == 0, "f32 -> f32");
    free(g); free(u);
}

int main(void)
{
    test_matmul();
    test_norms();
    test_embedding();
    test_rope();
    test_attention();
    test_silu_and_convert();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("kernels_cpu: all checks passed\n");
    return 0;
}
