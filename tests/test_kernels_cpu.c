/* test_kernels_cpu.c - every CPU kernel against a naive double-precision
 * version on odd sizes; RoPE against values computed by transformers;
 * attention against softmax(QK^T * scale + mask) V written out in full. */
#include "kernels_cpu.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "check.h"

static check_rng rng = {0x9e3779b97f4a7c15ull};
static float frand(void) /* uniform in [-1, 1) */
{
    return (float)check_rng_uniform(&rng) * 2.0f - 1.0f;
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

/* The rope types of transformers 5.24 through the one config parser
 * (tp_config_parse: both spellings) and tpk_rope_inv_freq, against the
 * inv_freq and attention factor transformers' own ROPE_INIT_FUNCTIONS give
 * (llama, head_dim 16, rope_theta 10000), printed by
 *     python3 tools/make_fixtures.py --rope-reference
 * seq_len: the length of the pass (0: at init), as dynamic_rope_update
 * passes it. */
static void test_rope_types(void)
{
    static const struct {
        const char *name, *rope;   /* the config.json keys */
        int max_pos, seq_len;
        double att, inv[8];
    } cases[] = {
        { "linear", "\"rope_scaling\": {\"type\": \"linear\", \"factor\": 4.0}", 256, 0,
          1.0, { 0.25, 0.07905694097280502, 0.02500000037252903, 0.007905694656074047, 0.0024999999441206455, 0.0007905694656074047, 0.0002500000118743628, 7.905694656074047e-05 } },
        { "dynamic_init", "\"rope_scaling\": {\"rope_type\": \"dynamic\", \"factor\": 2.0}", 16, 0,
          1.0, { 1.0, 0.3162277638912201, 0.10000000149011612, 0.03162277862429619, 0.009999999776482582, 0.003162277862429619, 0.0010000000474974513, 0.0003162277862429619 } },
        { "dynamic_16", "\"rope_scaling\": {\"rope_type\": \"dynamic\", \"factor\": 2.0}", 16, 16,
          1.0, { 1.0, 0.3162277638912201, 0.10000000149011612, 0.03162277862429619, 0.009999999776482582, 0.003162277862429619, 0.0010000000474974513, 0.0003162277862429619 } },
        { "dynamic_21", "\"rope_parameters\": {\"rope_type\": \"dynamic\", \"factor\": 2.0}", 16, 21,
          1.0, { 1.0, 0.295038104057312, 0.08704748004674911, 0.025682320818305016, 0.007577263284474611, 0.002235581399872899, 0.0006595816230401397, 0.00019460170005913824 } },
        { "yarn", "\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": 64}", 256, 0,
          1.138629436111989, { 1.0, 0.23717081546783447, 0.04999999701976776, 0.007905694656074047, 0.0024999999441206455, 0.0007905694656074047, 0.0002500000118743628, 7.905694656074047e-05 } },
        /* correction range (2.016, 3.82): truncate false keeps the fractions */
        { "yarn_mscale", "\"rope_parameters\": {\"rope_type\": \"yarn\", \"factor\": 8.0, \"original_max_position_embeddings\": 256, "
          "\"mscale\": 2.0, \"mscale_all_dim\": 1.0, \"beta_fast\": 4.0, \"beta_slow\": 0.5, \"truncate\": false}", 2048, 0,
          1.1721471588322, { 1.0, 0.3162277638912201, 0.10000000149011612, 0.016548309475183487, 0.0012499999720603228, 0.00039528473280370235, 0.0001250000059371814, 3.9528473280370235e-05 } },
        { "longrope_short", "\"rope_scaling\": {\"type\": \"longrope\", \"short_factor\": [1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0], "
          "\"long_factor\": [1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0], \"original_max_position_embeddings\": 16}", 64, 16,
          1.224744871391589, { 1.0, 0.2529822289943695, 0.06666667014360428, 0.015811389312148094, 0.004000000189989805, 0.0010540926596149802, 0.0002500000118743628, 5.270462861517444e-05 } },
        { "longrope_long", "\"rope_parameters\": {\"rope_type\": \"longrope\", \"short_factor\": [1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0], "
          "\"long_factor\": [1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0], \"original_max_position_embeddings\": 16}", 64, 17,
          1.224744871391589, { 1.0, 0.21081849932670593, 0.05000000074505806, 0.010540924966335297, 0.0020000000949949026, 0.00039528473280370235, 7.69230755395256e-05, 1.5058465578476898e-05 } },
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        char json[1024];
        snprintf(json, sizeof json, "{\"model_type\": \"llama\", \"hidden_size\": 64, \"num_hidden_layers\": 1, "
                 "\"num_attention_heads\": 4, \"head_dim\": 16, \"intermediate_size\": 128, \"vocab_size\": 32, "
                 "\"max_position_embeddings\": %d, \"rope_theta\": 10000.0, %s}", cases[k].max_pos, cases[k].rope);
        tp_model_config c;
        tp_err err = { { 0 } };
        if (tp_config_parse(&c, json, strlen(json), "config.json", &err) < 0) {
            CHECK(0, "rope %s: %s", cases[k].name, err.msg);
            continue;
        }
        CHECK(fabs(c.rope.attention_factor - cases[k].att) <= 1e-12 * cases[k].att,
              "rope %s: attention factor %.17g, want %.17g", cases[k].name, c.rope.attention_factor, cases[k].att);
        float inv[8];
        tpk_rope_inv_freq(inv, 16, &c.rope, cases[k].seq_len);
        for (int i = 0; i < 8; i++)
            CHECK(fabs(inv[i] - cases[k].inv[i]) <= 1e-6 * cases[k].inv[i],
                  "rope %s: inv_freq[%d] = %.9g, want %.9g", cases[k].name, i, inv[i], cases[k].inv[i]);
    }

    /* the tables carry the attention factor, and a pass's rows follow its
     * length: yarn's cos(0) is the factor; longrope's rows of a pass ending
     * at 17 use long_factor, of one ending at 16 short_factor */
    const char *lr = "{\"model_type\": \"llama\", \"hidden_size\": 64, \"num_hidden_layers\": 1, "
                     "\"num_attention_heads\": 4, \"head_dim\": 16, \"intermediate_size\": 128, \"vocab_size\": 32, "
                     "\"max_position_embeddings\": 64, \"rope_scaling\": {\"type\": \"longrope\", "
                     "\"short_factor\": [1, 1, 1, 1, 1, 1, 1, 1], \"long_factor\": [2, 2, 2, 2, 2, 2, 2, 2], "
                     "\"original_max_position_embeddings\": 16}}";
    tp_model_config c;
    tp_err err = { { 0 } };
    CHECK(tp_config_parse(&c, lr, strlen(lr), "config.json", &err) == 0, "longrope config: %s", err.msg);
    CHECK(tpk_rope_per_pass(&c.rope), "longrope is per pass");
    float cs[17 * 8], sn[17 * 8], scratch[8];
    tpk_rope_rows(cs, sn, scratch, 16, &c.rope, 16, 0, 16);
    tpk_rope_rows(cs, sn, scratch, 16, &c.rope, 17, 16, 1);
    float att = (float)c.rope.attention_factor;
    CHECK(cs[0] == att && sn[0] == 0, "longrope row 0: cos %g sin %g, want %g 0", cs[0], sn[0], att);
    CHECK(fabsf(cs[15 * 8] - cosf(15.0f) * att) < 1e-6f, "row 15 (short factor): %g", cs[15 * 8]);
    CHECK(fabsf(cs[16 * 8] - cosf(8.0f) * att) < 1e-6f, "row 16 (long factor 2: angle 8): %g, want %g",
          cs[16 * 8], cosf(8.0f) * att);
}

static void test_rope(void)
{
    /* default: theta^(-2i/d) */
    float inv[8];
    tp_rope_config p = { .type = TP_ROPE_DEFAULT, .theta = 10000.0, .factor = 1, .attention_factor = 1 };
    tpk_rope_inv_freq(inv, 8, &p, 0);
    double want_def[4] = { 1.0, 0.1, 0.01, 0.001 };
    for (int i = 0; i < 4; i++)
        CHECK(fabs(inv[i] - want_def[i]) <= 1e-6 * want_def[i], "inv_freq[%d] = %.9g, want %g", i,
              inv[i], want_def[i]);

    /* llama3 scaling, head_dim 16, theta 5e5, factor 8, low 1, high 4,
     * original 64: covers all three regimes.  Values printed by
     * transformers 5 ROPE_INIT_FUNCTIONS["llama3"]. */
    tp_rope_config p3 = { .type = TP_ROPE_LLAMA3, .theta = 500000.0, .factor = 8.0,
                          .attention_factor = 1, .low_freq_factor = 1.0, .high_freq_factor = 4.0,
                          .original_max_position = 64 };
    double want3[8] = { 1.0, 0.07940301299095154, 0.004700753837823868, 0.0009115831344388425,
                        0.00017677668074611574, 3.428102354519069e-05, 6.647869668086059e-06,
                        1.289173155782919e-06 };
    tpk_rope_inv_freq(inv, 16, &p3, 0);
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
    /* one token of a group of 3 query heads over one KV head: each head as
     * the blocked version computes it alone */
    {
        int heads = 3, gpos = 9, gtotal = gpos + 1;
        float *gq = rand_vec((size_t)heads * hd, 2), *gk = rand_vec((size_t)gtotal * hd, 2);
        float *gv = rand_vec((size_t)gtotal * hd, 1);
        float gout[3 * 6], alone[6], gscratch[3 * 10], ascratch[TPK_ATT_BLOCK * 10];
        int gwindows[] = { 0, 4, 1 };
        for (size_t w = 0; w < sizeof gwindows / sizeof gwindows[0]; w++) {
            tpk_attention_group_one(gout, gq, heads, gk, gv, gpos, hd, gwindows[w], 0.4f, gscratch);
            for (int h = 0; h < heads; h++) {
                tpk_attention_head_blocked(alone, hd, gq + h * hd, hd, gk, gv, 1, gpos, hd,
                                           gwindows[w], 0.4f, ascratch);
                for (int e = 0; e < hd; e++)
                    CHECK(fabsf(gout[h * hd + e] - alone[e]) <= 1e-6f * (1.0f + fabsf(alone[e])),
                          "group attention window %d head %d: %g vs %g alone", gwindows[w], h,
                          gout[h * hd + e], alone[e]);
            }
        }
        free(gq); free(gk); free(gv);
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

/* tpk_router_topk against a double-precision softmax and a full sort. */
static void test_router(void)
{
    enum { E = 16 };
    float logits[E];
    uint64_t st = 12345;
    for (int trial = 0; trial < 50; trial++) {
        for (int e = 0; e < E; e++) {
            st = st * 6364136223846793005ull + 1442695040888963407ull;
            logits[e] = (float)((int)(st >> 40) % 2000 - 1000) / 250.0f;
        }
        double p[E], sum = 0, mx = logits[0];
        for (int e = 1; e < E; e++)
            mx = logits[e] > mx ? logits[e] : mx;
        for (int e = 0; e < E; e++)
            sum += p[e] = exp(logits[e] - mx);
        int order[E];
        for (int e = 0; e < E; e++)
            order[e] = e;
        for (int i = 1; i < E; i++)   /* insertion sort: larger p first, lower index on ties */
            for (int j = i; j > 0 && (p[order[j]] > p[order[j - 1]] ||
                                      (p[order[j]] == p[order[j - 1]] && order[j] < order[j - 1])); j--) {
                int t = order[j]; order[j] = order[j - 1]; order[j - 1] = t;
            }
        for (int k = 1; k <= 8; k *= 2)
            for (int renorm = 0; renorm < 2; renorm++) {
                int idx[8];
                float w[8];
                tpk_router_topk(logits, E, k, renorm, idx, w);
                double top = 0;
                for (int j = 0; j < k; j++)
                    top += p[order[j]] / sum;
                for (int j = 0; j < k; j++) {
                    double want = p[order[j]] / sum / (renorm ? top : 1.0);
                    CHECK(idx[j] == order[j], "router trial %d k %d: slot %d is expert %d, want %d",
                          trial, k, j, idx[j], order[j]);
                    CHECK(fabs(w[j] - want) < 1e-6, "router trial %d k %d renorm %d: weight %g, want %g",
                          trial, k, renorm, w[j], want);
                }
            }
    }
    /* ties: the lower index first; equal logits give equal weights */
    float tied[6] = {0.5f, 2.0f, 2.0f, -1.0f, 2.0f, 0.0f};
    int idx[3];
    float w[3];
    tpk_router_topk(tied, 6, 2, false, idx, w);
    CHECK(idx[0] == 1 && idx[1] == 2 && w[0] == w[1], "router ties: %d %d", idx[0], idx[1]);
    tpk_router_topk(tied, 6, 3, true, idx, w);
    CHECK(idx[2] == 4 && fabs(w[0] + w[1] + w[2] - 1.0) < 1e-6, "router renorm: %d %g", idx[2],
          w[0] + w[1] + w[2]);
    /* k = n_experts: every expert once */
    int all[6];
    float wall[6];
    tpk_router_topk(tied, 6, 6, false, all, wall);
    CHECK(all[0] == 1 && all[1] == 2 && all[2] == 4 && all[3] == 0 && all[4] == 5 && all[5] == 3,
          "router k = n: %d %d %d %d %d %d", all[0], all[1], all[2], all[3], all[4], all[5]);
}

int main(void)
{
    test_router();
    test_matmul();
    test_norms();
    test_embedding();
    test_rope();
    test_rope_types();
    test_attention();
    test_silu_and_convert();
    return check_finish("test_kernels_cpu");
}
