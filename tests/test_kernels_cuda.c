/* test_kernels_cuda.c - every CUDA kernel of runtime/cuda/kernels_cuda.h
 * against its CPU reference (kernels_cpu.h, tp_sample) on random inputs of
 * odd sizes.  Tolerances (max |gpu - cpu| / max(1, max |cpu|)):
 *   exact (0)   embedding (bf16 and 8-bit tables), kv_append, f32_to_bf16, argmax, sampling ids,
 *               argmax_combine, router top-k expert ids, gather_rows; the device-position (graph) variants of
 *               head_norm_rope, kv_append and decode attention against the
 *               host-position launchers;
 *   1e-5        rmsnorm, per-head norm + RoPE, silu_mul, bias, router
 *               logits and top-k weights (fp32, other summation order /
 *               expf);
 *   1e-6        scatter_add_rows (a fused multiply-add);
 *   2e-5        attention (online softmax against the two-pass softmax);
 *   1e-4        bf16 GEMM (the CPU reference gets the same bf16-rounded
 *               activations; only the fp32 summation order differs).
 * A decode step captured as a CUDA graph is replayed over many positions
 * against the CPU reference (stream capture; also run by the emulation).
 * Without a CUDA build, or without a visible GPU, it prints one SKIP line
 * and exits 77 (counted as skipped by tests/run_tests.sh). */
#include <stdio.h>
#include <stdlib.h>

#include "check.h"

#ifndef TP_HAVE_CUDA
int main(void)
{
    return check_skip("no CUDA build");
}
#else

#include <math.h>
#include <string.h>

#include "kernels_cpu.h"
#include "gemm_cpu.h"
#include "cuda/kernels_cuda.h"
#include "runtime.h"

static tp_err err;
/* A CUDA call that must work: the test cannot go on without it. */
#define MUST(call) do { if ((call) != 0) { fprintf(stderr, "FAIL %s:%d: %s: %s\n", __FILE__, __LINE__, \
    #call, err.msg); exit(1); } } while (0)

static check_rng rng = {0x2545f4914f6cdd1dull};
static float frand(void) /* uniform in [-1, 1) */
{
    return (float)check_rng_uniform(&rng) * 2.0f - 1.0f;
}
static float *rand_vec(size_t n, float scale)
{
    float *v = malloc((n ? n : 1) * sizeof *v);
    for (size_t i = 0; i < n; i++)
        v[i] = frand() * scale;
    return v;
}

static uint16_t to_bf16(float f) /* round to nearest even, as torch */
{
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float from_bf16(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* max |a - b| / max(1, max |b|); NaN counts as a huge error */
static double rel_err(const float *a, const float *b, size_t n)
{
    double mx = 1.0, d = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (fabs(b[i]) > mx) mx = fabs(b[i]);
        double e = fabs((double)a[i] - b[i]);
        if (!(e <= d)) d = e;
    }
    return d / mx;
}

/* device copies of host arrays */
static void *dev_copy(const void *host, size_t bytes)
{
    void *d;
    MUST(tpc_malloc(&d, bytes, "test buffer", &err));
    if (host)
        MUST(tpc_upload(d, host, bytes, &err));
    return d;
}
static void fetch(void *host, const void *dev, size_t bytes)
{
    MUST(tpc_sync(NULL, &err));
    MUST(tpc_download(host, dev, bytes, &err));
}

/* ------------------------------------------------------------- embedding */

static void test_embedding(void)
{
    int vocab = 1003, hidden = 200, n = 33;
    int64_t lo = 300, hi = 700;
    size_t rows = (size_t)(hi - lo);
    uint16_t *tab = malloc(rows * hidden * sizeof *tab);
    for (size_t i = 0; i < rows * hidden; i++)
        tab[i] = to_bf16(frand());
    int32_t ids[33];
    for (int t = 0; t < n; t++)
        ids[t] = (int32_t)((frand() + 1.0f) * 0.5f * vocab) % vocab;
    ids[0] = 300; ids[1] = 699; ids[2] = 700; ids[3] = 299;   /* the slice's edges */
    float *tab32 = malloc(rows * hidden * sizeof *tab32);
    tpk_to_f32(tab32, tab, TP_BF16, rows * hidden);
    float *ref = malloc((size_t)n * hidden * sizeof *ref), *got = malloc((size_t)n * hidden * sizeof *got);
    tpk_embedding(ref, tab32, ids, n, hidden, lo, hi);
    uint16_t *dtab = dev_copy(tab, rows * hidden * 2);
    int32_t *dids = dev_copy(ids, sizeof ids);
    float *dout = dev_copy(NULL, (size_t)n * hidden * 4);
    MUST(tpc_embedding(dout, dtab, dids, n, hidden, lo, hi, NULL, &err));
    fetch(got, dout, (size_t)n * hidden * 4);
    CHECK(memcmp(got, ref, (size_t)n * hidden * 4) == 0, "embedding: differs from tpk_embedding");
    tpc_free(dtab); tpc_free(dids); tpc_free(dout);
    free(tab); free(tab32); free(ref); free(got);
}

/* An 8-bit table (a tied lm_head's): a vocabulary slice [lo, hi) that
 * starts inside an fp8 block, its scales and block origin cut as model.c
 * cuts them, against tpg_weight on the whole table: bit for bit. */
static void test_embedding_q8(void)
{
    enum { VOCAB = 61, HIDDEN = 40, N = 9, B0 = 24, B1 = 16 };
    const int64_t lo = 30, hi = 61;   /* block row 1 from its row 6 */
    for (int d = 0; d < 2; d++) {
        tp_dtype dt = d ? TP_I8 : TP_F8_E4M3;
        uint8_t w[VOCAB * HIDDEN];
        for (size_t i = 0; i < sizeof w; i++) {
            uint8_t b = (uint8_t)(frand() * 128.0f + 128.0f);
            w[i] = dt == TP_F8_E4M3 && (b & 0x7f) == 0x7f ? (uint8_t)(b ^ 1) : b;   /* no NaN */
        }
        int gr = dt == TP_I8 ? VOCAB : (VOCAB + B0 - 1) / B0, gc = dt == TP_I8 ? 1 : (HIDDEN + B1 - 1) / B1;
        float scale[VOCAB];
        for (int i = 0; i < gr * gc; i++)
            scale[i] = ldexpf(0.75f + 0.25f * frand(), -(i % 5) - 3);
        tpg_job whole = { .w = w, .dt = dt, .rows = VOCAB, .cols = HIDDEN,
                          .q = { .scale = scale, .stride = gc, .block = { B0, B1 } } };
        /* the slice: rows [lo, hi), the scales from its first block row (fp8) or row */
        size_t skip = dt == TP_I8 ? (size_t)lo : (size_t)(lo / B0) * gc;
        uint8_t *dw = dev_copy(w + lo * HIDDEN, (size_t)(hi - lo) * HIDDEN);
        float *dscale = dev_copy(scale + skip, (gr * gc - skip) * sizeof *scale);
        tpc_q8 table = { .w = dw, .dt = dt, .scale = dscale, .stride = gc, .block = { B0, B1 },
                         .origin = { dt == TP_I8 ? 0 : (int)(lo % B0), 0 } };
        int32_t ids[N] = { 30, 60, 29, 0, 47, 31, 48, 35, 54 };   /* edges, outside, block starts */
        float ref[N * HIDDEN], got[N * HIDDEN];
        for (int t = 0; t < N; t++)
            for (int c = 0; c < HIDDEN; c++)
                ref[t * HIDDEN + c] = ids[t] >= lo && ids[t] < hi ? tpg_weight(&whole, ids[t], c) : 0.0f;
        int32_t *dids = dev_copy(ids, sizeof ids);
        float *dout = dev_copy(NULL, sizeof got);
        MUST(tpc_embedding_q8(dout, table, dids, N, HIDDEN, lo, hi, NULL, &err));
        fetch(got, dout, sizeof got);
        CHECK(memcmp(got, ref, sizeof ref) == 0, "embedding_q8 %s: differs from tpg_weight on the whole table",
              tp_dtype_name(dt));
        tpc_free(dw); tpc_free(dscale); tpc_free(dids); tpc_free(dout);
    }
}

/* --------------------------------------------------------------- rmsnorm */

static void test_rmsnorm(void)
{
    int ns[] = { 1, 7, 33 }, dims[] = { 200, 1025 };
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 2; b++)
            for (int with_delta = 0; with_delta < 2; with_delta++) {
                int n = ns[a], dim = dims[b];
                size_t sz = (size_t)n * dim;
                float *x = rand_vec(sz, 3), *d = rand_vec(sz, 1), *w = rand_vec(dim, 1);
                float *xr = malloc(sz * 4), *outr = malloc(sz * 4), *xg = malloc(sz * 4), *outg = malloc(sz * 4);
                memcpy(xr, x, sz * 4);
                tpk_add_rmsnorm(xr, with_delta ? d : NULL, outr, w, n, dim, 1e-6f);
                float *dx = dev_copy(x, sz * 4), *dd = dev_copy(d, sz * 4), *dw = dev_copy(w, dim * 4);
                float *dout = dev_copy(NULL, sz * 4);
                MUST(tpc_add_rmsnorm(dx, with_delta ? dd : NULL, dout, dw, n, dim, 1e-6f, NULL, &err));
                fetch(outg, dout, sz * 4);
                fetch(xg, dx, sz * 4);
                double e1 = rel_err(xg, xr, sz), e2 = rel_err(outg, outr, sz);
                CHECK(e1 < 1e-6 && e2 < 1e-5, "add_rmsnorm n=%d dim=%d delta=%d: x err %g, out err %g",
                      n, dim, with_delta, e1, e2);
                /* in place: out == x */
                MUST(tpc_upload(dx, x, sz * 4, &err));
                MUST(tpc_add_rmsnorm(dx, with_delta ? dd : NULL, dx, dw, n, dim, 1e-6f, NULL, &err));
                fetch(outg, dx, sz * 4);
                e2 = rel_err(outg, outr, sz);
                CHECK(e2 < 1e-5, "add_rmsnorm in place n=%d dim=%d: err %g", n, dim, e2);
                tpc_free(dx); tpc_free(dd); tpc_free(dw); tpc_free(dout);
                free(x); free(d); free(w); free(xr); free(outr); free(xg); free(outg);
            }
}

/* ---------------------------------------------------- head norm + RoPE */

static void test_head_norm_rope(void)
{
    int hds[] = { 64, 128 };
    for (int a = 0; a < 2; a++)
        for (int kind = 0; kind < 3; kind++)   /* default, llama3, yarn (attention factor != 1) */
            for (int with_norm = 0; with_norm < 2; with_norm++) {
                int hd = hds[a], n = 7, heads = 3, pos0 = 130, n_pos = pos0 + n, half = hd / 2;
                size_t stride = (size_t)(heads + 2) * hd + 5;   /* a qkv row with room around the heads */
                tp_rope_config rp = { .type = TP_ROPE_DEFAULT, .theta = 1000000.0, .factor = 1,
                                      .attention_factor = 1, .original_max_position = 8192 };
                if (kind == 1)
                    rp = (tp_rope_config){ .type = TP_ROPE_LLAMA3, .theta = 500000.0, .factor = 8,
                                           .attention_factor = 1, .original_max_position = 8192,
                                           .low_freq_factor = 1, .high_freq_factor = 4 };
                if (kind == 2)
                    rp = (tp_rope_config){ .type = TP_ROPE_YARN, .theta = 10000.0, .factor = 4,
                                           .attention_factor = 1.1386294361119891, .original_max_position = 64,
                                           .beta_fast = 32, .beta_slow = 1, .truncate = true };
                float *inv = malloc(half * 4), *cs = malloc((size_t)n_pos * half * 4), *sn = malloc((size_t)n_pos * half * 4);
                tpk_rope_rows(cs, sn, inv, hd, &rp, 0, 0, n_pos);
                size_t sz = (size_t)n * stride;
                float *x = rand_vec(sz, 2), *w = rand_vec(hd, 1), *ref = malloc(sz * 4), *got = malloc(sz * 4);
                memcpy(ref, x, sz * 4);
                if (with_norm)
                    for (int t = 0; t < n; t++)
                        tpk_head_rmsnorm(ref + (size_t)t * stride, w, heads, hd, 1e-6f);
                tpk_rope(ref, n, heads, hd, stride, pos0, cs, sn);
                float *dx = dev_copy(x, sz * 4), *dw = dev_copy(w, hd * 4);
                float *dc = dev_copy(cs, (size_t)n_pos * half * 4), *ds = dev_copy(sn, (size_t)n_pos * half * 4);
                MUST(tpc_head_norm_rope(dx, with_norm ? dw : NULL, n, heads, hd, stride, pos0, dc, ds, 1e-6f,
                                        NULL, &err));
                fetch(got, dx, sz * 4);
                double e = rel_err(got, ref, sz);
                CHECK(e < 1e-5, "head_norm_rope hd=%d rope kind %d norm=%d: err %g", hd, kind, with_norm, e);
                tpc_free(dx); tpc_free(dw); tpc_free(dc); tpc_free(ds);
                free(inv); free(cs); free(sn); free(x); free(w); free(ref); free(got);
            }
}

/* --------------------------------------------------- KV cache + attention */

typedef struct att_case {
    int n, pos0, heads, kv_heads, hd, window;
} att_case;

/* Fills the caches' first pos0 rows at random, appends n tokens with
 * tpc_kv_append (checked against the expected cache), then runs prefill and
 * decode attention against tpk_attention_head per head. */
static void run_attention_case(const att_case *c, bool decode)
{
    int n = c->n, hd = c->hd, max_seq = c->pos0 + n + 3, kvh = c->kv_heads, heads = c->heads;
    int group = heads / kvh;
    size_t cache_sz = (size_t)kvh * max_seq * hd;
    float *kc = rand_vec(cache_sz, 1), *vc = rand_vec(cache_sz, 1);
    /* the new tokens' q, k, v in one qkv row per token */
    size_t qkv_stride = (size_t)(heads + 2 * kvh) * hd;
    float *qkv = rand_vec((size_t)n * qkv_stride, 1);
    const float *q = qkv, *k = qkv + (size_t)heads * hd, *v = k + (size_t)kvh * hd;
    float *dkc = dev_copy(kc, cache_sz * 4), *dvc = dev_copy(vc, cache_sz * 4);
    float *dqkv = dev_copy(qkv, (size_t)n * qkv_stride * 4);
    MUST(tpc_kv_append(dkc, dvc, max_seq, dqkv + (size_t)heads * hd, dqkv + (size_t)(heads + kvh) * hd,
                       qkv_stride, n, kvh, hd, c->pos0, NULL, &err));
    for (int t = 0; t < n; t++)
        for (int h = 0; h < kvh; h++) {
            memcpy(kc + ((size_t)h * max_seq + c->pos0 + t) * hd, k + (size_t)t * qkv_stride + (size_t)h * hd, hd * 4);
            memcpy(vc + ((size_t)h * max_seq + c->pos0 + t) * hd, v + (size_t)t * qkv_stride + (size_t)h * hd, hd * 4);
        }
    float *gk = malloc(cache_sz * 4), *gv = malloc(cache_sz * 4);
    fetch(gk, dkc, cache_sz * 4);
    fetch(gv, dvc, cache_sz * 4);
    if (!decode)
        CHECK(!memcmp(gk, kc, cache_sz * 4) && !memcmp(gv, vc, cache_sz * 4),
              "kv_append n=%d pos0=%d kv_heads=%d hd=%d: cache differs", n, c->pos0, kvh, hd);

    float scale = 1.0f / sqrtf((float)hd);
    size_t out_stride = (size_t)heads * hd + 3;
    float *ref = calloc((size_t)n * out_stride, 4), *got = calloc((size_t)n * out_stride, 4);
    float *scratch = malloc((size_t)(c->pos0 + n) * 4);
    for (int h = 0; h < heads; h++)
        tpk_attention_head(ref + (size_t)h * hd, out_stride, q + (size_t)h * hd, qkv_stride,
                           kc + (size_t)(h / group) * max_seq * hd, vc + (size_t)(h / group) * max_seq * hd,
                           n, c->pos0, hd, c->window, scale, scratch);
    float *dout = dev_copy(got, (size_t)n * out_stride * 4);   /* zeros: the gaps stay 0 */
    if (decode) {
        size_t ws = tpc_attention_decode_workspace(n, heads, hd);
        void *dws = dev_copy(NULL, ws);
        MUST(tpc_attention_decode(dout, out_stride, dqkv, qkv_stride, dkc, dvc, max_seq, n, c->pos0, heads,
                                  kvh, hd, c->window, scale, dws, ws, NULL, &err));
        tpc_free(dws);
    } else {
        MUST(tpc_attention_prefill(dout, out_stride, dqkv, qkv_stride, dkc, dvc, max_seq, n, c->pos0, heads,
                                   kvh, hd, c->window, scale, NULL, &err));
    }
    fetch(got, dout, (size_t)n * out_stride * 4);
    double e = rel_err(got, ref, (size_t)n * out_stride);
    CHECK(e < 2e-5, "attention %s n=%d pos0=%d heads=%d/%d hd=%d window=%d: err %g",
          decode ? "decode" : "prefill", n, c->pos0, heads, kvh, hd, c->window, e);
    tpc_free(dkc); tpc_free(dvc); tpc_free(dqkv); tpc_free(dout);
    free(kc); free(vc); free(qkv); free(gk); free(gv); free(ref); free(got); free(scratch);
}

static void test_attention(void)
{
    /* cache lengths (pos0 + n) 1, 7, 33, 130, 1000; GQA groups 1, 2, 4;
     * head dims 64, 80 (not a multiple of 32), 128, 256 (> 48 KB of shared
     * memory in prefill); sliding windows shorter than the cache */
    static const att_case prefill[] = {
        { 1, 0, 2, 1, 64, 0 },    { 7, 0, 4, 2, 64, 0 },     { 33, 0, 4, 4, 128, 0 },
        { 33, 97, 6, 2, 128, 0 }, { 130, 0, 2, 1, 80, 0 },   { 40, 960, 4, 1, 128, 0 },
        { 40, 960, 4, 2, 128, 100 }, { 33, 0, 2, 2, 64, 5 }, { 17, 113, 2, 1, 256, 0 },
        { 20, 10, 4, 2, 256, 9 },
    };
    static const att_case decode[] = {
        { 1, 0, 2, 1, 64, 0 },    { 1, 129, 4, 2, 128, 0 },  { 1, 999, 8, 2, 128, 0 },
        { 1, 999, 4, 4, 64, 300 }, { 7, 123, 4, 1, 80, 0 },  { 7, 993, 2, 2, 256, 0 },
        { 1, 5000, 16, 8, 128, 0 }, { 3, 40, 2, 1, 128, 10 },
    };
    for (size_t i = 0; i < sizeof prefill / sizeof prefill[0]; i++)
        run_attention_case(&prefill[i], false);
    for (size_t i = 0; i < sizeof decode / sizeof decode[0]; i++)
        run_attention_case(&decode[i], true);
}

/* ------------------------------------------------- batched step (slots) */

/* The CPU reference of tpc_kv_append_batch + tpc_attention_batch: token t's
 * k, v rows into slot slot[t]'s cache rows pos[t] (kc, vc: n_slots caches
 * slot_stride floats apart), then each token's heads by tpk_attention_head
 * as one query at pos[t] over its slot's cache. */
static void batch_reference(float *out, size_t out_stride, const float *qkv, size_t qkv_stride, float *kc,
                            float *vc, size_t slot_stride, int max_seq, int n, const int32_t *slot,
                            const int32_t *pos, int heads, int kvh, int hd, int window, float scale)
{
    const float *k = qkv + (size_t)heads * hd, *v = k + (size_t)kvh * hd;
    for (int t = 0; t < n; t++)
        for (int h = 0; h < kvh; h++) {
            size_t dst = (size_t)slot[t] * slot_stride + ((size_t)h * max_seq + pos[t]) * hd;
            memcpy(kc + dst, k + (size_t)t * qkv_stride + (size_t)h * hd, (size_t)hd * 4);
            memcpy(vc + dst, v + (size_t)t * qkv_stride + (size_t)h * hd, (size_t)hd * 4);
        }
    float *scratch = malloc((size_t)max_seq * 4);
    for (int t = 0; t < n; t++)
        for (int h = 0; h < heads; h++) {
            size_t kv = (size_t)slot[t] * slot_stride + (size_t)(h / (heads / kvh)) * max_seq * hd;
            tpk_attention_head(out + (size_t)t * out_stride + (size_t)h * hd, out_stride,
                               qkv + (size_t)t * qkv_stride + (size_t)h * hd, qkv_stride, kc + kv, vc + kv, 1,
                               pos[t], hd, window, scale, scratch);
        }
    free(scratch);
}

/* A continuous-batching step: 3 slots (caches padded apart), a prefill
 * chunk of slot 1 (positions 0..4) between decode tokens of slots 0 and 2
 * (one at the last row of the cache) and a chunk of slot 0 cut around them;
 * the caches after the append bit for bit, the attention within 2e-5 of
 * the reference.  Then one token with a slot outside the caches: nothing
 * written, NaN out (the other tokens unchanged). */
static void run_batch_case(int heads, int kvh, int hd, int window)
{
    enum { N_SLOTS = 3, MAX_SEQ = 40, N = 10 };
    static const int32_t slot[N] = { 0, 1, 1, 1, 1, 1, 2, 0, 0, 2 };
    static const int32_t pos[N] = { 17, 0, 1, 2, 3, 4, 39, 18, 19, 38 };
    size_t per_slot = (size_t)kvh * MAX_SEQ * hd, slot_stride = per_slot + 5, cache_sz = N_SLOTS * slot_stride;
    float *kc = rand_vec(cache_sz, 1), *vc = rand_vec(cache_sz, 1);
    size_t qkv_stride = (size_t)(heads + 2 * kvh) * hd, out_stride = (size_t)heads * hd + 3;
    float *qkv = rand_vec((size_t)N * qkv_stride, 1);
    float *dkc = dev_copy(kc, cache_sz * 4), *dvc = dev_copy(vc, cache_sz * 4);
    float *dqkv = dev_copy(qkv, (size_t)N * qkv_stride * 4);
    int32_t *dslot = dev_copy(slot, sizeof slot), *dpos = dev_copy(pos, sizeof pos);
    float scale = 1.0f / sqrtf((float)hd);
    float *ref = calloc((size_t)N * out_stride, 4), *got = calloc((size_t)N * out_stride, 4);
    batch_reference(ref, out_stride, qkv, qkv_stride, kc, vc, slot_stride, MAX_SEQ, N, slot, pos, heads, kvh, hd,
                    window, scale);
    MUST(tpc_kv_append_batch(dkc, dvc, slot_stride, N_SLOTS, MAX_SEQ, dqkv + (size_t)heads * hd,
                             dqkv + (size_t)(heads + kvh) * hd, qkv_stride, N, kvh, hd, dslot, dpos, NULL, &err));
    float *gk = malloc(cache_sz * 4), *gv = malloc(cache_sz * 4);
    fetch(gk, dkc, cache_sz * 4);
    fetch(gv, dvc, cache_sz * 4);
    CHECK(!memcmp(gk, kc, cache_sz * 4) && !memcmp(gv, vc, cache_sz * 4),
          "kv_append_batch kv_heads=%d hd=%d: caches differ from the reference", kvh, hd);
    float *dout = dev_copy(got, (size_t)N * out_stride * 4);   /* zeros: the gaps stay 0 */
    size_t ws = tpc_attention_decode_workspace(N, heads, hd);
    void *dws = dev_copy(NULL, ws);
    MUST(tpc_attention_batch(dout, out_stride, dqkv, qkv_stride, dkc, dvc, slot_stride, N_SLOTS, MAX_SEQ, N, dslot,
                             dpos, heads, kvh, hd, window, scale, dws, ws, NULL, &err));
    fetch(got, dout, (size_t)N * out_stride * 4);
    double e = rel_err(got, ref, (size_t)N * out_stride);
    CHECK(e < 2e-5, "attention_batch heads=%d/%d hd=%d window=%d: err %g", heads, kvh, hd, window, e);

    /* token 4 in slot 3 of 3, token 1 in slot -1 (a batched decode graph's
     * padding row): not written, NaN; the others as before */
    int32_t bad[N];
    memcpy(bad, slot, sizeof bad);
    bad[4] = N_SLOTS;
    bad[1] = -1;
    MUST(tpc_upload(dslot, bad, sizeof bad, &err));
    MUST(tpc_upload(dkc, kc, cache_sz * 4, &err));
    MUST(tpc_upload(dvc, vc, cache_sz * 4, &err));
    MUST(tpc_kv_append_batch(dkc, dvc, slot_stride, N_SLOTS, MAX_SEQ, dqkv + (size_t)heads * hd,
                             dqkv + (size_t)(heads + kvh) * hd, qkv_stride, N, kvh, hd, dslot, dpos, NULL, &err));
    MUST(tpc_attention_batch(dout, out_stride, dqkv, qkv_stride, dkc, dvc, slot_stride, N_SLOTS, MAX_SEQ, N, dslot,
                             dpos, heads, kvh, hd, window, scale, dws, ws, NULL, &err));
    fetch(gk, dkc, cache_sz * 4);
    fetch(got, dout, (size_t)N * out_stride * 4);
    CHECK(!memcmp(gk, kc, cache_sz * 4), "kv_append_batch: a token outside the slots was written");
    bool nan_row = true;
    for (int d = 0; d < heads * hd; d++)
        nan_row = nan_row && isnan(got[4 * out_stride + (size_t)d]) && isnan(got[1 * out_stride + (size_t)d]);
    CHECK(nan_row, "attention_batch: a token outside the slots did not give NaN");
    tpc_free(dkc); tpc_free(dvc); tpc_free(dqkv); tpc_free(dout); tpc_free(dslot); tpc_free(dpos); tpc_free(dws);
    free(kc); free(vc); free(qkv); free(gk); free(gv); free(ref); free(got);
}

static void test_attention_batch(void)
{
    run_batch_case(4, 2, 80, 0);     /* head_dim not a multiple of 32 */
    run_batch_case(2, 1, 64, 6);     /* a sliding window shorter than most positions */
    run_batch_case(4, 4, 128, 0);
}

/* ----------------------------------------------------------- elementwise */

static void test_elementwise(void)
{
    size_t n = 1003 * 7;
    float *g = rand_vec(n, 6), *u = rand_vec(n, 2), *ref = malloc(n * 4), *got = malloc(n * 4);
    memcpy(ref, g, n * 4);
    tpk_silu_mul(ref, u, n);
    float *dg = dev_copy(g, n * 4), *du = dev_copy(u, n * 4);
    MUST(tpc_silu_mul(dg, du, n, NULL, &err));
    fetch(got, dg, n * 4);
    double e = rel_err(got, ref, n);
    CHECK(e < 1e-5, "silu_mul: err %g", e);

    int rows = 7, dim = 1003;
    float *b = rand_vec(dim, 1), *db = dev_copy(b, dim * 4);
    memcpy(ref, g, n * 4);
    tpk_add_bias(ref, b, rows, dim);
    MUST(tpc_upload(dg, g, n * 4, &err));
    MUST(tpc_add_bias(dg, db, rows, dim, NULL, &err));
    fetch(got, dg, n * 4);
    CHECK(memcmp(got, ref, n * 4) == 0, "add_bias: differs from tpk_add_bias");

    /* bf16 rounding: random values plus ties-to-even and carry cases */
    float special[] = { 1.00390625f, 1.01171875f, 3.3895314e38f, -0.0f, 1e-40f, 65504.0f };
    memcpy(g, special, sizeof special);
    uint16_t *hb = malloc(n * 2), *gb = malloc(n * 2);
    for (size_t i = 0; i < n; i++)
        hb[i] = to_bf16(g[i]);
    uint16_t *dbf = dev_copy(NULL, n * 2);
    MUST(tpc_upload(dg, g, n * 4, &err));
    MUST(tpc_f32_to_bf16(dbf, dg, n, NULL, &err));
    fetch(gb, dbf, n * 2);
    CHECK(memcmp(gb, hb, n * 2) == 0, "f32_to_bf16: differs from round-to-nearest-even");
    tpc_free(dg); tpc_free(du); tpc_free(db); tpc_free(dbf);
    free(g); free(u); free(ref); free(got); free(b); free(hb); free(gb);
}

/* ------------------------------------------------------------------ GEMM */

static void test_gemm(void)
{
    tpc_blas h;
    MUST(tpc_blas_create(&h, NULL, &err));
    int ns[] = { 1, 7, 33 };
    int in = 200, out = 1003;
    uint16_t *w = malloc((size_t)out * in * 2);
    for (size_t i = 0; i < (size_t)out * in; i++)
        w[i] = to_bf16(frand() * 0.1f);
    float *w32 = malloc((size_t)out * in * 4), *bias = rand_vec(out, 1);
    tpk_to_f32(w32, w, TP_BF16, (size_t)out * in);
    uint16_t *dw = dev_copy(w, (size_t)out * in * 2);
    float *dbias = dev_copy(bias, out * 4);
    for (int a = 0; a < 3; a++)
        for (int with_bias = 0; with_bias < 2; with_bias++) {
            int n = ns[a];
            float *x = rand_vec((size_t)n * in, 2), *xr = malloc((size_t)n * in * 4);
            for (size_t i = 0; i < (size_t)n * in; i++)
                xr[i] = from_bf16(to_bf16(x[i]));
            float *ref = malloc((size_t)n * out * 4), *got = malloc((size_t)n * out * 4);
            tpk_matmul(ref, xr, w32, with_bias ? bias : NULL, n, in, out);
            float *dx = dev_copy(x, (size_t)n * in * 4), *dy = dev_copy(NULL, (size_t)n * out * 4);
            uint16_t *dxb = dev_copy(NULL, (size_t)n * in * 2);
            MUST(tpc_gemm_bf16(h, dy, dx, dxb, dw, with_bias ? dbias : NULL, n, in, out, NULL, &err));
            fetch(got, dy, (size_t)n * out * 4);
            double e = rel_err(got, ref, (size_t)n * out);
            CHECK(e < 1e-4, "gemm_bf16 n=%d in=%d out=%d bias=%d: err %g", n, in, out, with_bias, e);
            tpc_free(dx); tpc_free(dy); tpc_free(dxb);
            free(x); free(xr); free(ref); free(got);
        }
    tpc_free(dw); tpc_free(dbias);
    free(w); free(w32); free(bias);
    tpc_blas_destroy(h);
}

/* ------------------------------------------------------ 8-bit weights */

/* 8-bit weights against gemm_cpu's reference (tpg_job_ref: each weight
 * dequantized in fp32 as FORMAT.md says, double accumulation): the GEMV
 * with fp32 activations; the dequantization to bf16 bit for bit; the
 * prefill path (bf16 weights and activations) against the same product of
 * the bf16-rounded operands.  fp8 block grids with slices whose origin is
 * not 0, odd blocks, and a grid stride wider than the slice's. */
static void test_gemm_q8(void)
{
    static const int GEOM[][4] = { { 128, 128, 0, 0 }, { 128, 128, 96, 32 }, { 3, 5, 2, 4 } };
    const int in = 200, out = 67;
    tpc_blas h;
    MUST(tpc_blas_create(&h, NULL, &err));
    for (int d = 0; d < 2; d++)
        for (int g = 0; g < 3; g++) {
            tp_dtype dt = d ? TP_I8 : TP_F8_E4M3;
            if (dt == TP_I8 && g > 0)
                break;
            const char *dn = dt == TP_I8 ? "int8" : "fp8";
            uint8_t *w = malloc((size_t)out * in);
            for (size_t i = 0; i < (size_t)out * in; i++) {
                uint8_t b = (uint8_t)(frand() * 128.0f + 128.0f);
                w[i] = dt == TP_F8_E4M3 && (b & 0x7f) == 0x7f ? (uint8_t)(b ^ 1) : b;
            }
            tpg_quant q = { 0 };
            size_t ns = (size_t)out;
            if (dt == TP_F8_E4M3) {
                const int *gm = GEOM[g];
                int gr = (gm[2] + out - 1) / gm[0] + 1, gc = (gm[3] + in - 1) / gm[1] + 1;
                q = (tpg_quant){ .stride = gc + 2, .block = { gm[0], gm[1] },
                                 .origin = { gm[2], gm[3] } };
                ns = (size_t)gr * q.stride;
            }
            float *scale = malloc(ns * sizeof *scale);
            for (size_t i = 0; i < ns; i++)
                scale[i] = ldexpf(0.75f + 0.25f * frand(), -(int)(i % 7) - 3);
            q.scale = scale;
            uint8_t *dw = dev_copy(w, (size_t)out * in);
            float *dscale = dev_copy(scale, ns * sizeof *scale);
            tpc_q8 wq = { .w = dw, .dt = dt, .scale = dscale, .stride = q.stride,
                          .block = { q.block[0], q.block[1] },
                          .origin = { q.origin[0], q.origin[1] } };
            /* the dequantized weights, bit for bit */
            uint16_t *dwb = dev_copy(NULL, (size_t)out * in * 2);
            uint16_t *wb = malloc((size_t)out * in * 2);
            MUST(tpc_dequant_q8_bf16(dwb, wq, out, in, NULL, &err));
            fetch(wb, dwb, (size_t)out * in * 2);
            tpg_job jw = { .w = w, .dt = dt, .rows = out, .cols = in, .q = q };
            float *wr = malloc((size_t)out * in * 4);
            int bad = 0;
            for (int r = 0; r < out; r++)
                for (int c = 0; c < in; c++) {
                    wr[(size_t)r * in + c] = from_bf16(to_bf16(tpg_weight(&jw, r, c)));
                    if (wb[(size_t)r * in + c] != to_bf16(tpg_weight(&jw, r, c)) && !bad++)
                        CHECK(0, "dequant_q8_bf16 %s geometry %d: [%d][%d] = %#x, want %#x", dn, g,
                              r, c, wb[(size_t)r * in + c], to_bf16(tpg_weight(&jw, r, c)));
                }
            float *bias = rand_vec(out, 1);
            float *dbias = dev_copy(bias, out * 4);
            static const int NS[] = { 1, 3, TPC_Q8_GEMV_MAX_N + 5 };
            for (int k = 0; k < 3; k++) {
                int n = NS[k];
                float *x = rand_vec((size_t)n * in, 2);
                float *ref = malloc((size_t)n * out * 4), *got = malloc((size_t)n * out * 4);
                if (n <= TPC_Q8_GEMV_MAX_N) {
                    jw.x = x; jw.y = ref; jw.n = n;
                    tpg_job_ref(&jw);
                } else {   /* bf16 operands, as tpc_gemm_bf16 */
                    float *xr = malloc((size_t)n * in * 4);
                    for (size_t i = 0; i < (size_t)n * in; i++)
                        xr[i] = from_bf16(to_bf16(x[i]));
                    tpk_matmul(ref, xr, wr, NULL, n, in, out);
                    free(xr);
                }
                for (int t = 0; t < n; t++)
                    for (int o = 0; o < out; o++)
                        ref[(size_t)t * out + o] += bias[o];
                float *dx = dev_copy(x, (size_t)n * in * 4), *dy = dev_copy(NULL, (size_t)n * out * 4);
                uint16_t *dxb = dev_copy(NULL, (size_t)n * in * 2);
                MUST(tpc_gemm_q8(h, dy, dx, dxb, wq, dwb, dbias, n, in, out, NULL, &err));
                fetch(got, dy, (size_t)n * out * 4);
                double e = rel_err(got, ref, (size_t)n * out);
                CHECK(e < (n <= TPC_Q8_GEMV_MAX_N ? 1e-5 : 1e-4), "gemm_q8 %s geometry %d n=%d: err %g",
                      dn, g, n, e);
                tpc_free(dx); tpc_free(dy); tpc_free(dxb);
                free(x); free(ref); free(got);
            }
            tpc_free(dw); tpc_free(dscale); tpc_free(dwb); tpc_free(dbias);
            free(w); free(scale); free(wb); free(wr); free(bias);
        }
    /* a block origin outside its block is refused, naming the kernel */
    tpc_q8 badq = { .w = (const uint8_t *)&err, .dt = TP_F8_E4M3, .scale = (const float *)&err,
                    .stride = 4, .block = { 16, 16 }, .origin = { 16, 0 } };
    CHECK(tpc_gemv_q8(NULL, NULL, badq, NULL, 1, 32, 8, NULL, &err) < 0 &&
          strstr(err.msg, "gemv_q8"), "a bad fp8 origin: \"%s\"", err.msg);
    tpc_blas_destroy(h);
}

/* ------------------------------------------------------ argmax, sampling */

static int32_t host_argmax(const float *x, int n)
{
    int32_t best = 0;
    float bv = -INFINITY;
    for (int i = 0; i < n; i++)
        if (x[i] > bv) {
            bv = x[i];
            best = i;
        }
    return best;
}

static void test_argmax(void)
{
    int vocab = 1003;
    float *x = rand_vec(vocab, 5);
    x[17] = NAN;
    x[500] = 9.0f; x[900] = 9.0f; x[501] = 9.0f;   /* ties: the lowest id wins */
    tpc_argmax_result r, *dr = dev_copy(NULL, sizeof r);
    float *dx = dev_copy(x, vocab * 4);
    MUST(tpc_argmax(dr, dx, vocab, 1000, NULL, &err));
    fetch(&r, dr, sizeof r);
    CHECK(r.id == 1500 && r.value == 9.0f, "argmax: got id %d value %g, want 1500 and 9", r.id, r.value);
    /* a slice in the middle, and every value -inf */
    MUST(tpc_argmax(dr, dx + 600, 403, 600, NULL, &err));
    fetch(&r, dr, sizeof r);
    CHECK(r.id == 900, "argmax slice: got id %d, want 900", r.id);
    for (int i = 0; i < 33; i++)
        x[i] = -INFINITY;
    MUST(tpc_upload(dx, x, 33 * 4, &err));
    MUST(tpc_argmax(dr, dx, 33, 7, NULL, &err));
    fetch(&r, dr, sizeof r);
    CHECK(r.id == 7, "argmax of all -inf: got id %d, want the slice's first id 7", r.id);
    tpc_free(dr); tpc_free(dx);
    free(x);
}

static void test_sample(void)
{
    int vocabs[] = { 1003, 151936 };
    struct { float temp; int k; float p; } opts[] = {
        { 0.0f, 0, 1.0f }, { 0.7f, 1, 1.0f }, { 1.0f, 0, 1.0f }, { 0.7f, 5, 1.0f }, { 0.7f, 50, 0.9f },
        { 1.3f, 0, 0.5f }, { 0.6f, 20, 0.95f }, { 1.0f, 0, 0.999f }, { 2.0f, 2000, 1.0f },
    };
    for (int a = 0; a < 2; a++) {
        int vocab = vocabs[a];
        float *logits = malloc((size_t)vocab * 4);
        for (int quant = 0; quant < 2; quant++) {
            /* quantised logits give many exactly equal probabilities: the
             * tie rules (lower ids first) matter */
            for (int i = 0; i < vocab; i++) {
                float l = frand() * 8.0f;
                logits[i] = quant ? floorf(l * 2.0f) / 2.0f : l;
            }
            logits[vocab / 3] = NAN;
            float *dl = dev_copy(logits, (size_t)vocab * 4), *dws = dev_copy(NULL, (size_t)vocab * 4);
            int32_t *did = dev_copy(NULL, 4);
            double *du = dev_copy(NULL, sizeof(double));
            for (size_t o = 0; o < sizeof opts / sizeof opts[0]; o++) {
                tp_sampler_opts so = { .temperature = opts[o].temp, .top_k = opts[o].k, .top_p = opts[o].p };
                tp_rng rng;
                tp_rng_seed(&rng, 1000 + o + 10 * quant);
                int mismatches = 0;
                for (int draw = 0; draw < 12; draw++) {
                    tp_rng peek = rng;
                    double u = tp_rng_uniform(&peek);
                    int32_t want = tp_sample(logits, vocab, &so, &rng, NULL), got = -1;
                    if (draw % 2 == 0) {
                        MUST(tpc_sample(did, dl, vocab, so.temperature, so.top_k, so.top_p, u, dws, NULL, &err));
                    } else {   /* odd draws: the graph launcher, u from device memory */
                        MUST(tpc_upload(du, &u, sizeof u, &err));
                        MUST(tpc_sample_devu(did, dl, vocab, so.temperature, so.top_k, so.top_p, du, dws, NULL,
                                             &err));
                    }
                    fetch(&got, did, 4);
                    if (got != want && mismatches++ < 3)
                        fprintf(stderr, "  sample vocab=%d quant=%d T=%g k=%d p=%g u=%.17g: gpu %d, cpu %d\n",
                                vocab, quant, so.temperature, so.top_k, so.top_p, u, got, want);
                }
                CHECK(mismatches == 0, "sample vocab=%d quant=%d T=%g k=%d p=%g: %d of 12 draws differ",
                      vocab, quant, so.temperature, so.top_k, so.top_p, mismatches);
            }
            tpc_free(dl); tpc_free(dws); tpc_free(did); tpc_free(du);
        }
        free(logits);
    }
    /* greedy agrees with the host argmax */
    float x[5] = { 1, 3, NAN, 3, 2 };
    float *dx = dev_copy(x, sizeof x);
    int32_t *did = dev_copy(NULL, 4), got = -1;
    float *dws = dev_copy(NULL, sizeof x);
    MUST(tpc_sample(did, dx, 5, 0.0f, 0, 1.0f, 0.5, dws, NULL, &err));
    fetch(&got, did, 4);
    CHECK(got == host_argmax(x, 5) && got == 1, "greedy sample: got %d, want 1", got);
    /* a bad uniform is refused */
    CHECK(tpc_sample(did, dx, 5, 1.0f, 0, 1.0f, 1.0, dws, NULL, &err) == -1 && strstr(err.msg, "uniform"),
          "sample with u = 1 accepted");
    tpc_free(dx); tpc_free(did); tpc_free(dws);
}

/* ------------------------------------- device positions (graph replays) */

static void set_pos(int32_t *dpos, int32_t p)
{
    MUST(tpc_upload(dpos, &p, sizeof p, &err));
}

/* head_norm_rope and kv_append with the position from the device give the
 * same bits as with the host position, at several positions, through one
 * launch (the same arguments) for all of them. */
static void test_devpos_rope_kv(void)
{
    int hds[] = { 64, 80 };
    int32_t *dpos = dev_copy(NULL, 4);
    for (int a = 0; a < 2; a++)
        for (int with_norm = 0; with_norm < 2; with_norm++) {
            int hd = hds[a], n = 3, heads = 3, n_pos = 200, half = hd / 2;
            size_t stride = (size_t)(heads + 1) * hd + 3;
            tp_rope_config rp = { .type = TP_ROPE_DEFAULT, .theta = 1000000.0, .factor = 1, .attention_factor = 1 };
            float *inv = malloc(half * 4), *cs = malloc((size_t)n_pos * half * 4), *sn = malloc((size_t)n_pos * half * 4);
            tpk_rope_inv_freq(inv, hd, &rp, 0);
            tpk_rope_table(cs, sn, inv, hd, n_pos);
            size_t sz = (size_t)n * stride;
            float *x = rand_vec(sz, 2), *w = rand_vec(hd, 1), *want = malloc(sz * 4), *got = malloc(sz * 4);
            float *dx = dev_copy(x, sz * 4), *dw = dev_copy(w, hd * 4);
            float *dc = dev_copy(cs, (size_t)n_pos * half * 4), *ds = dev_copy(sn, (size_t)n_pos * half * 4);
            int positions[] = { 0, 1, 31, 32, 130, n_pos - n };
            for (int i = 0; i < 6; i++) {
                int p = positions[i];
                MUST(tpc_upload(dx, x, sz * 4, &err));
                MUST(tpc_head_norm_rope(dx, with_norm ? dw : NULL, n, heads, hd, stride, p, dc, ds, 1e-6f, NULL, &err));
                fetch(want, dx, sz * 4);
                MUST(tpc_upload(dx, x, sz * 4, &err));
                set_pos(dpos, p);
                MUST(tpc_head_norm_rope_devpos(dx, with_norm ? dw : NULL, n, heads, hd, stride, 0, dpos, dc, ds,
                                               1e-6f, NULL, &err));
                fetch(got, dx, sz * 4);
                CHECK(!memcmp(got, want, sz * 4), "head_norm_rope_devpos hd=%d norm=%d pos=%d: differs from the "
                      "host-position launch", hd, with_norm, p);
            }
            tpc_free(dx); tpc_free(dw); tpc_free(dc); tpc_free(ds);
            free(inv); free(cs); free(sn); free(x); free(w); free(want); free(got);
        }

    /* kv append: n 1 and 3, 3 kv heads of 80; out-of-range positions write nothing */
    for (int n = 1; n <= 3; n += 2) {
        int kvh = 3, hd = 80, max_seq = 70;
        size_t cache_sz = (size_t)kvh * max_seq * hd, stride = (size_t)(2 * kvh) * hd + 7;
        float *kc = rand_vec(cache_sz, 1), *kv = rand_vec((size_t)n * stride, 1);
        float *want_k = malloc(cache_sz * 4), *want_v = malloc(cache_sz * 4);
        float *got_k = malloc(cache_sz * 4), *got_v = malloc(cache_sz * 4);
        float *dk = dev_copy(kc, cache_sz * 4), *dv = dev_copy(kc, cache_sz * 4), *dkv = dev_copy(kv, (size_t)n * stride * 4);
        const float *src_k = dkv, *src_v = dkv + (size_t)kvh * hd;
        int positions[] = { 0, 1, 32, 33, max_seq - n };
        for (int i = 0; i < 5; i++) {
            int p = positions[i];
            MUST(tpc_upload(dk, kc, cache_sz * 4, &err));
            MUST(tpc_upload(dv, kc, cache_sz * 4, &err));
            MUST(tpc_kv_append(dk, dv, max_seq, src_k, src_v, stride, n, kvh, hd, p, NULL, &err));
            fetch(want_k, dk, cache_sz * 4);
            fetch(want_v, dv, cache_sz * 4);
            MUST(tpc_upload(dk, kc, cache_sz * 4, &err));
            MUST(tpc_upload(dv, kc, cache_sz * 4, &err));
            set_pos(dpos, p);
            MUST(tpc_kv_append_devpos(dk, dv, max_seq, src_k, src_v, stride, n, kvh, hd, 0, dpos, NULL, &err));
            fetch(got_k, dk, cache_sz * 4);
            fetch(got_v, dv, cache_sz * 4);
            CHECK(!memcmp(got_k, want_k, cache_sz * 4) && !memcmp(got_v, want_v, cache_sz * 4),
                  "kv_append_devpos n=%d pos=%d: cache differs from the host-position launch", n, p);
        }
        int bad[] = { max_seq - n + 1, max_seq, -1 };
        for (int i = 0; i < 3; i++) {
            MUST(tpc_upload(dk, kc, cache_sz * 4, &err));
            set_pos(dpos, bad[i]);
            MUST(tpc_kv_append_devpos(dk, dv, max_seq, src_k, src_v, stride, n, kvh, hd, 0, dpos, NULL, &err));
            fetch(got_k, dk, cache_sz * 4);
            CHECK(!memcmp(got_k, kc, cache_sz * 4), "kv_append_devpos n=%d at position %d of %d: wrote the cache",
                  n, bad[i], max_seq);
        }
        tpc_free(dk); tpc_free(dv); tpc_free(dkv);
        free(kc); free(kv); free(want_k); free(want_v); free(got_k); free(got_v);
    }
    tpc_free(dpos);
}

typedef struct devpos_case {
    int n, max_seq, heads, kv_heads, hd, window;
} devpos_case;

/* Decode attention with the position from the device: one launch
 * (arguments, grid) for every position; the same bits as the host-position
 * launcher, and the CPU reference within the attention tolerance. */
static void run_devpos_decode(const devpos_case *c)
{
    int n = c->n, hd = c->hd, max_seq = c->max_seq, kvh = c->kv_heads, heads = c->heads, group = heads / kvh;
    size_t cache_sz = (size_t)kvh * max_seq * hd, q_stride = (size_t)heads * hd + 5;
    size_t out_stride = (size_t)heads * hd + 3, out_sz = (size_t)n * out_stride;
    float *kc = rand_vec(cache_sz, 1), *vc = rand_vec(cache_sz, 1), *q = rand_vec((size_t)n * q_stride, 1);
    float *dkc = dev_copy(kc, cache_sz * 4), *dvc = dev_copy(vc, cache_sz * 4), *dq = dev_copy(q, (size_t)n * q_stride * 4);
    float *ref = calloc(out_sz, 4), *want = calloc(out_sz, 4), *got = calloc(out_sz, 4);
    float *dout = dev_copy(got, out_sz * 4), *scratch = malloc((size_t)max_seq * 4);
    int32_t *dpos = dev_copy(NULL, 4);
    size_t ws = tpc_attention_decode_workspace(n, heads, hd);
    void *dws = dev_copy(NULL, ws);
    float scale = 1.0f / sqrtf((float)hd);
    int positions[] = { 0, 1, 31 - n + 1, 32 - n + 1, 33, c->window > 0 ? c->window - n + 1 : 65, max_seq / 2,
                        max_seq - n };
    for (int i = 0; i < 8; i++) {
        int p = positions[i];
        if (p < 0 || p > max_seq - n)
            continue;
        for (int h = 0; h < heads; h++)
            tpk_attention_head(ref + (size_t)h * hd, out_stride, q + (size_t)h * hd, q_stride,
                               kc + (size_t)(h / group) * max_seq * hd, vc + (size_t)(h / group) * max_seq * hd,
                               n, p, hd, c->window, scale, scratch);
        MUST(tpc_attention_decode(dout, out_stride, dq, q_stride, dkc, dvc, max_seq, n, p, heads, kvh, hd,
                                  c->window, scale, dws, ws, NULL, &err));
        fetch(want, dout, out_sz * 4);
        set_pos(dpos, p);
        MUST(tpc_memset(dout, 0, out_sz * 4, &err));
        MUST(tpc_attention_decode_devpos(dout, out_stride, dq, q_stride, dkc, dvc, max_seq, n, 0, dpos, heads, kvh,
                                         hd, c->window, scale, dws, ws, NULL, &err));
        fetch(got, dout, out_sz * 4);
        double e = rel_err(got, ref, out_sz);
        CHECK(e < 2e-5, "attention_decode_devpos n=%d pos=%d max_seq=%d heads=%d/%d hd=%d window=%d: err %g",
              n, p, max_seq, heads, kvh, hd, c->window, e);
        CHECK(!memcmp(got, want, out_sz * 4), "attention_decode_devpos n=%d pos=%d max_seq=%d heads=%d/%d hd=%d "
              "window=%d: differs from the host-position launch", n, p, max_seq, heads, kvh, hd, c->window);
    }
    /* a position past the cache reads nothing and gives NaN rows */
    set_pos(dpos, max_seq - n + 1);
    MUST(tpc_attention_decode_devpos(dout, out_stride, dq, q_stride, dkc, dvc, max_seq, n, 0, dpos, heads, kvh,
                                     hd, c->window, scale, dws, ws, NULL, &err));
    fetch(got, dout, out_sz * 4);
    CHECK(isnan(got[0]) && isnan(got[(size_t)(n - 1) * out_stride + (size_t)heads * hd - 1]),
          "attention_decode_devpos at position %d of %d: not NaN (%g)", max_seq - n + 1, max_seq, got[0]);
    tpc_free(dkc); tpc_free(dvc); tpc_free(dq); tpc_free(dout); tpc_free(dpos); tpc_free(dws);
    free(kc); free(vc); free(q); free(ref); free(want); free(got); free(scratch);
}

static void test_devpos_decode(void)
{
    /* GQA groups 1, 3, 4; odd head counts; head dims 64, 80, 128; sliding
     * windows; n 1 and 3; up to 38 splits (max_seq 1200) */
    static const devpos_case cases[] = {
        { 1, 300, 6, 2, 128, 0 }, { 1, 200, 3, 3, 80, 0 }, { 1, 300, 4, 1, 64, 50 },
        { 3, 100, 2, 1, 64, 10 }, { 1, 1200, 3, 1, 64, 0 },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        run_devpos_decode(&cases[i]);
}

/* -------------------------------------------- argmax combine, positions */

/* The whole vocabulary's argmax (host_argmax's rule) from per-slice winners. */
static void test_argmax_combine(void)
{
    tpc_argmax_result *dres = dev_copy(NULL, 8 * sizeof(tpc_argmax_result));
    int32_t *did = dev_copy(NULL, 4), got = -1;
    struct { int world; tpc_argmax_result r[4]; int32_t want; const char *what; } cases[] = {
        { 3, { { 1.0f, 5 }, { 3.0f, 250 }, { 2.0f, 600 } }, 250, "largest value" },
        { 3, { { 3.0f, 900 }, { 3.0f, 250 }, { 3.0f, 600 } }, 250, "ties: the lowest id" },
        { 3, { { NAN, 0 }, { -5.0f, 250 }, { NAN, 600 } }, 250, "NaN never wins" },
        { 3, { { -INFINITY, 600 }, { -INFINITY, 250 }, { -INFINITY, 0 } }, 0, "all -inf: the lowest id" },
        { 3, { { NAN, 600 }, { -INFINITY, 250 }, { NAN, 100 } }, 100, "NaN and -inf: the lowest id" },
        { 4, { { -INFINITY, 0 }, { INFINITY, 300 }, { INFINITY, 200 }, { 1e38f, 100 } }, 200, "+inf ties" },
        { 1, { { 0.5f, 42 } }, 42, "one rank" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        MUST(tpc_upload(dres, cases[i].r, (size_t)cases[i].world * sizeof(tpc_argmax_result), &err));
        MUST(tpc_argmax_combine(did, dres, cases[i].world, NULL, &err));
        fetch(&got, did, 4);
        CHECK(got == cases[i].want, "argmax_combine (%s): got %d, want %d", cases[i].what, got, cases[i].want);
    }
    CHECK(tpc_argmax_combine(did, dres, 0, NULL, &err) == -1 && strstr(err.msg, "argmax_combine"),
          "argmax_combine of 0 ranks accepted");

    /* tpc_argmax per slice, then the combine, against the host argmax of the
     * whole vocabulary: a tie across slices, NaN, -inf slices */
    int vocab = 1003, world = 4, slice = (vocab + world - 1) / world;
    float *x = rand_vec(vocab, 5);
    float *dx = dev_copy(NULL, vocab * 4);
    for (int round = 0; round < 4; round++) {
        if (round == 1) {
            x[700] = 9.0f; x[260] = 9.0f; x[900] = 9.0f;   /* tie over three slices */
            x[10] = NAN;
        } else if (round == 2) {
            for (int i = 0; i < 2 * slice; i++)
                x[i] = -INFINITY;   /* the first two slices have nothing above -inf */
        } else if (round == 3) {
            for (int i = 0; i < vocab; i++)
                x[i] = i % 7 ? -INFINITY : NAN;
        }
        MUST(tpc_upload(dx, x, vocab * 4, &err));
        for (int r = 0; r < world; r++) {
            int lo = r * slice, cnt = lo + slice > vocab ? vocab - lo : slice;
            MUST(tpc_argmax(dres + r, dx + lo, cnt, lo, NULL, &err));
        }
        MUST(tpc_argmax_combine(did, dres, world, NULL, &err));
        fetch(&got, did, 4);
        int32_t want = host_argmax(x, vocab);
        CHECK(got == want, "argmax + argmax_combine round %d: got %d, want %d", round, got, want);
    }
    tpc_free(dres); tpc_free(did); tpc_free(dx);
    free(x);
}

static void test_advance_pos(void)
{
    int32_t *dpos = dev_copy(NULL, 4), got = -1;
    MUST(tpc_set_i32(dpos, 5, NULL, &err));
    fetch(&got, dpos, 4);
    CHECK(got == 5, "set_i32: got %d, want 5", got);
    MUST(tpc_advance_pos(dpos, 1, NULL, &err));
    MUST(tpc_advance_pos(dpos, 3, NULL, &err));
    fetch(&got, dpos, 4);
    CHECK(got == 9, "advance_pos 5 + 1 + 3: got %d", got);
    MUST(tpc_advance_pos(dpos, -9, NULL, &err));
    fetch(&got, dpos, 4);
    CHECK(got == 0, "advance_pos 9 - 9: got %d", got);
    tpc_free(dpos);
}

/* ----------------------------------------------------------- CUDA graphs */

/* One decode step (RoPE of q and k, kv append, decode attention, the
 * position moved on) captured once on a stream of tpc_stream_create (the
 * legacy stream cannot capture) and replayed for a run of positions and
 * after a jump, each replay against the CPU reference. */
static void run_graph_decode(int heads, int kvh, int hd, int window, int max_seq)
{
    int group = heads / kvh, half = hd / 2;
    size_t qkv_stride = (size_t)(heads + 2 * kvh) * hd, cache_sz = (size_t)kvh * max_seq * hd;
    size_t out_stride = (size_t)heads * hd;
    tpc_stream s;
    MUST(tpc_stream_create(&s, &err));
    tp_rope_config rp = { .type = TP_ROPE_DEFAULT, .theta = 10000.0, .factor = 1, .attention_factor = 1 };
    float *inv = malloc(half * 4), *cs = malloc((size_t)max_seq * half * 4), *sn = malloc((size_t)max_seq * half * 4);
    tpk_rope_inv_freq(inv, hd, &rp, 0);
    tpk_rope_table(cs, sn, inv, hd, max_seq);
    float *kc = rand_vec(cache_sz, 1), *vc = rand_vec(cache_sz, 1);
    float *ref = malloc(out_stride * 4), *got = malloc(out_stride * 4), *scratch = malloc((size_t)max_seq * 4);
    float *dkc = dev_copy(kc, cache_sz * 4), *dvc = dev_copy(vc, cache_sz * 4);
    float *dc = dev_copy(cs, (size_t)max_seq * half * 4), *ds = dev_copy(sn, (size_t)max_seq * half * 4);
    float *dqkv = dev_copy(NULL, qkv_stride * 4), *dout = dev_copy(NULL, out_stride * 4);
    float *dk = dqkv + (size_t)heads * hd, *dv = dk + (size_t)kvh * hd;
    int32_t *dpos = dev_copy(NULL, 4);
    size_t ws = tpc_attention_decode_workspace(1, heads, hd);
    void *dws = dev_copy(NULL, ws);
    float scale = 1.0f / sqrtf((float)hd);
    set_pos(dpos, 0);
    MUST(tpc_memset(dout, 0, out_stride * 4, &err));
    MUST(tpc_sync(NULL, &err));

    tpc_graph g = NULL;
    MUST(tpc_capture_begin(s, &err));
    int rc = tpc_head_norm_rope_devpos(dqkv, NULL, 1, heads + kvh, hd, qkv_stride, 0, dpos, dc, ds, 1e-6f, s, &err);
    rc = rc ? rc : tpc_kv_append_devpos(dkc, dvc, max_seq, dk, dv, qkv_stride, 1, kvh, hd, 0, dpos, s, &err);
    rc = rc ? rc : tpc_attention_decode_devpos(dout, out_stride, dqkv, qkv_stride, dkc, dvc, max_seq, 1, 0, dpos,
                                               heads, kvh, hd, window, scale, dws, ws, s, &err);
    rc = rc ? rc : tpc_advance_pos(dpos, 1, s, &err);
    int end_rc = tpc_capture_end(s, &g, &err);   /* always: it stops the capture */
    MUST(rc);
    MUST(end_rc);
    /* captured, not run: the position and the output are untouched */
    int32_t pos_now = -1;
    fetch(&pos_now, dpos, 4);
    fetch(got, dout, out_stride * 4);
    CHECK(pos_now == 0 && got[0] == 0.0f && got[out_stride - 1] == 0.0f,
          "graph capture ran the work (position %d, out[0] %g)", pos_now, got[0]);

    int steps = 0, bad = 0;
    double worst = 0.0;
    for (int p = 0; p < max_seq; p++) {
        if (p == 41) {   /* a jump: the graph only reads the position */
            p = max_seq - 3;
            set_pos(dpos, p);
        }
        float *qkv = rand_vec(qkv_stride, 1);
        MUST(tpc_upload(dqkv, qkv, qkv_stride * 4, &err));
        MUST(tpc_sync(NULL, &err));   /* the pageable upload is done before s reads it */
        /* the CPU step: RoPE of q and k at p, the cache row, attention */
        tpk_rope(qkv, 1, heads + kvh, hd, qkv_stride, p, cs, sn);
        for (int h = 0; h < kvh; h++) {
            memcpy(kc + ((size_t)h * max_seq + p) * hd, qkv + (size_t)(heads + h) * hd, hd * 4);
            memcpy(vc + ((size_t)h * max_seq + p) * hd, qkv + (size_t)(heads + kvh + h) * hd, hd * 4);
        }
        for (int h = 0; h < heads; h++)
            tpk_attention_head(ref + (size_t)h * hd, out_stride, qkv + (size_t)h * hd, qkv_stride,
                               kc + (size_t)(h / group) * max_seq * hd, vc + (size_t)(h / group) * max_seq * hd,
                               1, p, hd, window, scale, scratch);
        MUST(tpc_graph_launch(g, s, &err));
        MUST(tpc_sync(s, &err));
        fetch(got, dout, out_stride * 4);
        fetch(&pos_now, dpos, 4);
        double e = rel_err(got, ref, out_stride);
        if (e > worst)
            worst = e;
        if ((!(e < 2e-5) || pos_now != p + 1) && bad++ < 3)
            fprintf(stderr, "  graph replay heads=%d/%d hd=%d window=%d pos %d: err %g, position after %d\n",
                    heads, kvh, hd, window, p, e, pos_now);
        steps++;
        free(qkv);
    }
    CHECK(bad == 0, "graph decode heads=%d/%d hd=%d window=%d: %d of %d replays wrong (worst err %g)",
          heads, kvh, hd, window, bad, steps, worst);
    float *gk = malloc(cache_sz * 4);
    fetch(gk, dkc, cache_sz * 4);
    double e = rel_err(gk, kc, cache_sz);
    CHECK(e < 1e-5, "graph decode heads=%d/%d hd=%d: k cache after the replays: err %g", heads, kvh, hd, e);

    /* synchronising a capturing stream is refused and spoils the capture:
     * tpc_capture_end says so, and the stream works afterwards */
    tpc_graph g2 = NULL;
    MUST(tpc_capture_begin(s, &err));
    MUST(tpc_advance_pos(dpos, 1, s, &err));
    CHECK(tpc_sync(s, &err) == -1, "tpc_sync of a capturing stream accepted");
    CHECK(tpc_capture_end(s, &g2, &err) == -1 && g2 == NULL, "a spoilt capture gave a graph");
    MUST(tpc_advance_pos(dpos, 1, s, &err));
    MUST(tpc_sync(s, &err));
    int32_t before = pos_now;
    fetch(&pos_now, dpos, 4);
    CHECK(pos_now == before + 1, "after a spoilt capture: position %d, want %d", pos_now, before + 1);
    CHECK(tpc_capture_begin(NULL, &err) == -1, "capture of the legacy default stream accepted");

    tpc_graph_destroy(g);
    tpc_stream_destroy(s);
    tpc_free(dkc); tpc_free(dvc); tpc_free(dc); tpc_free(ds); tpc_free(dqkv); tpc_free(dout);
    tpc_free(dpos); tpc_free(dws);
    free(inv); free(cs); free(sn); free(kc); free(vc); free(ref); free(got); free(scratch); free(gk);
}

static void test_graph_decode(void)
{
    run_graph_decode(6, 2, 80, 0, 96);    /* GQA, head_dim not a multiple of 32, 3 splits */
    run_graph_decode(3, 1, 64, 24, 80);   /* sliding window */
}

/* bad arguments give errors naming the kernel, before any launch */
/* ------------------------------------------------------ mixture of experts */

/* tpc_router_topk against tpk_router_topk, token by token: the same expert
 * ids in the same order (exact: quantised logits make equal probabilities,
 * where the lower expert must win, as on the CPU), weights within 1e-5
 * (device expf).  Expert counts of Mixtral (8), Qwen1.5-MoE (60) and Qwen3-MoE
 * (128); k of 1, 2 (Mixtral) and 8 (Qwen3). */
static void test_router_topk(void)
{
    const int n = 37, experts[] = { 8, 60, 128 }, ks[] = { 1, 2, 8 };
    for (size_t a = 0; a < 3; a++)
        for (size_t b = 0; b < 3; b++)
            for (int variant = 0; variant < 4; variant++) {
                int E = experts[a], k = ks[b];
                bool renorm = variant & 1, quant = variant & 2;
                float *logits = rand_vec((size_t)n * E, 4);
                if (quant)
                    for (int i = 0; i < n * E; i++)
                        logits[i] = floorf(logits[i]);   /* a few distinct values: many ties */
                int *ref_idx = malloc((size_t)n * k * sizeof(int));
                float *ref_w = malloc((size_t)n * k * 4), *got_w = malloc((size_t)n * k * 4);
                int32_t *got_idx = malloc((size_t)n * k * 4);
                for (int t = 0; t < n; t++)
                    tpk_router_topk(logits + (size_t)t * E, E, k, renorm, ref_idx + (size_t)t * k,
                                    ref_w + (size_t)t * k);
                float *dl = dev_copy(logits, (size_t)n * E * 4), *dw = dev_copy(NULL, (size_t)n * k * 4);
                int32_t *di = dev_copy(NULL, (size_t)n * k * 4);
                MUST(tpc_router_topk(di, dw, dl, n, E, k, renorm, NULL, &err));
                fetch(got_idx, di, (size_t)n * k * 4);
                fetch(got_w, dw, (size_t)n * k * 4);
                int bad = -1;
                for (int i = 0; i < n * k && bad < 0; i++)
                    if (got_idx[i] != ref_idx[i])
                        bad = i;
                CHECK(bad < 0, "router_topk E=%d k=%d renorm=%d quant=%d: token %d slot %d: expert %d, cpu %d", E,
                      k, renorm, quant, bad / k, bad % k, bad >= 0 ? got_idx[bad] : 0, bad >= 0 ? ref_idx[bad] : 0);
                double e = rel_err(got_w, ref_w, (size_t)n * k);
                CHECK(e < 1e-5, "router_topk E=%d k=%d renorm=%d quant=%d: weights err %g", E, k, renorm, quant, e);
                tpc_free(dl); tpc_free(dw); tpc_free(di);
                free(logits); free(ref_idx); free(ref_w); free(got_w); free(got_idx);
            }
    CHECK(tpc_router_topk(NULL, NULL, NULL, 1, 8, 9, false, NULL, &err) == -1 && strstr(err.msg, "router_topk"),
          "router_topk with k > n_experts accepted");
}

/* tpc_router_logits against a double-precision loop over the same bf16
 * weights and unrounded fp32 activations (a bf16-rounded input would be off
 * by ~2^-9 relative and fail the 1e-5 bound). */
static void test_router_logits(void)
{
    const int n = 5, E = 60, H = 1003;
    float *x = rand_vec((size_t)n * H, 2), *wf = rand_vec((size_t)E * H, 1);
    float *ref = malloc((size_t)n * E * 4), *got = malloc((size_t)n * E * 4);
    uint16_t *w = malloc((size_t)E * H * 2);
    for (int i = 0; i < E * H; i++)
        w[i] = to_bf16(wf[i]);
    for (int t = 0; t < n; t++)
        for (int e = 0; e < E; e++) {
            double acc = 0;
            for (int i = 0; i < H; i++)
                acc += (double)x[(size_t)t * H + i] * from_bf16(w[(size_t)e * H + i]);
            ref[(size_t)t * E + e] = (float)acc;
        }
    float *dx = dev_copy(x, (size_t)n * H * 4), *dl = dev_copy(NULL, (size_t)n * E * 4);
    uint16_t *dw = dev_copy(w, (size_t)E * H * 2);
    MUST(tpc_router_logits(dl, dx, dw, n, E, H, NULL, &err));
    fetch(got, dl, (size_t)n * E * 4);
    double e = rel_err(got, ref, (size_t)n * E);
    CHECK(e < 1e-5, "router_logits: err %g", e);
    tpc_free(dx); tpc_free(dl); tpc_free(dw);
    free(x); free(wf); free(ref); free(got); free(w);
}

/* The expert's token gather and weighted scatter-add against host loops. */
static void test_moe_rows(void)
{
    const int n = 9, dim = 1003, m = 4;
    const int32_t tok[4] = { 7, 0, 3, 8 };
    const float w[4] = { 0.25f, -1.5f, 0.125f, 3.0f };
    float *h = rand_vec((size_t)n * dim, 3), *y = rand_vec((size_t)m * dim, 2), *out = rand_vec((size_t)n * dim, 1);
    float *ref = malloc((size_t)n * dim * 4), *got = malloc((size_t)n * dim * 4);
    float *dh = dev_copy(h, (size_t)n * dim * 4), *dy = dev_copy(y, (size_t)m * dim * 4);
    float *dout = dev_copy(out, (size_t)n * dim * 4), *dx = dev_copy(NULL, (size_t)m * dim * 4);
    float *dwt = dev_copy(w, sizeof w);
    int32_t *dtok = dev_copy(tok, sizeof tok);
    MUST(tpc_gather_rows(dx, dh, dtok, m, dim, NULL, &err));
    fetch(got, dx, (size_t)m * dim * 4);
    for (int j = 0; j < m; j++)
        memcpy(ref + (size_t)j * dim, h + (size_t)tok[j] * dim, (size_t)dim * 4);
    CHECK(memcmp(got, ref, (size_t)m * dim * 4) == 0, "gather_rows: rows differ");
    memcpy(ref, out, (size_t)n * dim * 4);
    for (int j = 0; j < m; j++)
        for (int i = 0; i < dim; i++)
            ref[(size_t)tok[j] * dim + i] += w[j] * y[(size_t)j * dim + i];
    MUST(tpc_scatter_add_rows(dout, dy, dtok, dwt, m, dim, NULL, &err));
    fetch(got, dout, (size_t)n * dim * 4);
    double e = rel_err(got, ref, (size_t)n * dim);
    CHECK(e < 1e-6, "scatter_add_rows: err %g", e);   /* an fma may round once instead of twice */
    tpc_free(dh); tpc_free(dy); tpc_free(dout); tpc_free(dx); tpc_free(dwt); tpc_free(dtok);
    free(h); free(y); free(out); free(ref); free(got);
}

static void test_argument_errors(void)
{
    CHECK(tpc_attention_prefill(NULL, 0, NULL, 0, NULL, NULL, 10, 5, 8, 2, 1, 64, 0, 1.0f, NULL, &err) == -1 &&
          strstr(err.msg, "attention_prefill"), "prefill past the cache accepted");
    CHECK(tpc_attention_decode(NULL, 0, NULL, 0, NULL, NULL, 10, 1, 0, 3, 2, 64, 0, 1.0f, NULL, 0, NULL, &err) == -1,
          "3 heads over 2 kv heads accepted");
    CHECK(tpc_attention_prefill(NULL, 0, NULL, 0, NULL, NULL, 10, 1, 0, 2, 1, 512, 0, 1.0f, NULL, &err) == -1 &&
          strstr(err.msg, "head_dim 512"), "head_dim 512 accepted: %s", err.msg);
    CHECK(tpc_kv_append(NULL, NULL, 4, NULL, NULL, 0, 2, 1, 64, 3, NULL, &err) == -1 && strstr(err.msg, "kv_append"),
          "kv_append past the cache accepted");
    CHECK(tpc_attention_decode(NULL, 0, NULL, 0, NULL, NULL, 10, 1, 0, 2, 1, 64, 0, 1.0f, NULL, 0, NULL, &err) == -1 &&
          strstr(err.msg, "workspace"), "decode without a workspace accepted");
    CHECK(tpc_attention_batch(NULL, 0, NULL, 0, NULL, NULL, 100, 2, 10, 1, NULL, NULL, 2, 1, 64, 0, 1.0f, NULL, 0,
                              NULL, &err) == -1 && strstr(err.msg, "attention_batch"),
          "batched attention over slots closer than a cache accepted");
    CHECK(tpc_kv_append_batch(NULL, NULL, 100, 2, 10, NULL, NULL, 0, 1, 1, 64, NULL, NULL, NULL, &err) == -1 &&
          strstr(err.msg, "kv_append_batch"), "batched append into slots closer than a cache accepted");
}

int main(void)
{
    int count = 0;
    if (tpc_device_count(&count, &err))
        return check_skip("no GPU (%s)", err.msg);
    if (count == 0)
        return check_skip("no GPU (cudaGetDeviceCount: 0 devices)");
    MUST(tpc_set_device(0, &err));
    test_argument_errors();
    test_embedding();
    test_rmsnorm();
    test_head_norm_rope();
    test_attention();
    test_attention_batch();
    test_elementwise();
    test_gemm();
    test_gemm_q8();
    test_embedding_q8();
    test_argmax();
    test_router_logits();
    test_router_topk();
    test_moe_rows();
    test_sample();
    test_devpos_rope_kv();
    test_devpos_decode();
    test_argmax_combine();
    test_advance_pos();
    test_graph_decode();
    return check_finish("test_kernels_cuda");
}
#endif
