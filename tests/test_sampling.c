/* test_sampling.c - tp_sample and tp_rng: greedy ties, top-k 1 and a tiny
 * top-p equal greedy, empirical distributions against an independent
 * computation of the expected probabilities, seed determinism. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime.h"
#include "check.h"

static tp_sampler_opts opts(float t, int k, float p, uint64_t seed)
{
    return (tp_sampler_opts){ .temperature = t, .top_k = k, .top_p = p, .seed = seed };
}

static void test_greedy(void)
{
    tp_rng rng;
    tp_rng_seed(&rng, 1);
    tp_sampler_opts g = opts(0, 0, 1, 1);
    float ties[] = { 1, 3, 3, 2, 3 };
    CHECK(tp_sample(ties, 5, &g, &rng, NULL) == 1, "greedy tie must go to the lowest id");
    float first[] = { 7, 7 };
    CHECK(tp_sample(first, 2, &g, &rng, NULL) == 0, "greedy tie at id 0");
    float nan_first[] = { NAN, 1, 2, -INFINITY };
    CHECK(tp_sample(nan_first, 4, &g, &rng, NULL) == 2, "NaN must never win");
    float neg[] = { -5, -4, -9 };
    CHECK(tp_sample(neg, 3, &g, &rng, NULL) == 1, "greedy over negative logits");
}

/* top_k 1 and top_p tiny give exactly greedy whatever the temperature. */
static void test_degenerate_equal_greedy(void)
{
    enum { V = 1000 };
    float *logits = malloc(V * sizeof *logits), *scratch = malloc(2 * V * sizeof(float));
    tp_rng data;
    tp_rng_seed(&data, 42);
    for (int trial = 0; trial < 50; trial++) {
        for (int i = 0; i < V; i++)
            logits[i] = (float)(tp_rng_uniform(&data) * 10 - 5);
        if (trial % 5 == 0)   /* make a tie at the top */
            logits[V - 1] = logits[V / 2] = 20;
        tp_sampler_opts g = opts(0, 0, 1, 0);
        tp_rng rng;
        tp_rng_seed(&rng, (uint64_t)trial);
        int32_t greedy = tp_sample(logits, V, &g, &rng, scratch);
        tp_sampler_opts k1 = opts(1.5f, 1, 1, 0), p_tiny = opts(1.5f, 0, 1e-6f, 0), both = opts(0.7f, 40, 1e-6f, 0);
        for (int d = 0; d < 5; d++) {
            CHECK(tp_sample(logits, V, &k1, &rng, scratch) == greedy, "top_k 1 != greedy (trial %d)", trial);
            CHECK(tp_sample(logits, V, &p_tiny, &rng, scratch) == greedy, "tiny top_p != greedy (trial %d)", trial);
            CHECK(tp_sample(logits, V, &both, &rng, NULL) == greedy, "top_k 40 + tiny top_p != greedy (trial %d)", trial);
        }
    }
    free(logits);
    free(scratch);
}

typedef struct pi { double p; int id; } pi;
static int pi_desc(const void *a, const void *b)
{
    const pi *x = a, *y = b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return x->id - y->id;
}

/* The expected distribution, computed the plain way: full sort, cut, renormalise. */
static void expected_probs(const float *logits, int v, float t, int k, float top_p, double *out)
{
    pi *a = malloc((size_t)v * sizeof *a);
    double mx = -INFINITY, sum = 0;
    for (int i = 0; i < v; i++) mx = fmax(mx, logits[i]);
    for (int i = 0; i < v; i++) { a[i].p = exp((logits[i] - mx) / t); a[i].id = i; sum += a[i].p; }
    for (int i = 0; i < v; i++) a[i].p /= sum;
    qsort(a, (size_t)v, sizeof *a, pi_desc);
    int n = k > 0 && k < v ? k : v;
    double m = 0;
    for (int i = 0; i < n; i++) m += a[i].p;
    if (top_p < 1) {
        double cum = 0;
        int keep = 0;
        while (keep < n) { cum += a[keep++].p; if (cum >= top_p * m) break; }
        n = keep;
    }
    double kept = 0;
    for (int i = 0; i < n; i++) kept += a[i].p;
    memset(out, 0, (size_t)v * sizeof *out);
    for (int i = 0; i < n; i++) out[a[i].id] = a[i].p / kept;
    free(a);
}

static void check_distribution(const char *what, const float *logits, int v, tp_sampler_opts o)
{
    enum { DRAWS = 20000 };
    double expect[16], seen[16] = { 0 };
    expected_probs(logits, v, o.temperature, o.top_k, o.top_p, expect);
    tp_rng rng;
    tp_rng_seed(&rng, o.seed);
    float scratch[32];
    for (int d = 0; d < DRAWS; d++) {
        int32_t id = tp_sample(logits, v, &o, &rng, scratch);
        CHECK(id >= 0 && id < v, "%s: id %d out of range", what, id);
        if (id >= 0 && id < v) seen[id] += 1.0 / DRAWS;
    }
    /* 20000 draws: the standard deviation of a frequency is at most 0.0035;
     * 0.015 is > 4 sigma, and a token the filters removed must never appear. */
    for (int i = 0; i < v; i++) {
        CHECK(fabs(seen[i] - expect[i]) < 0.015, "%s: token %d drawn %.4f of the time, expected %.4f",
              what, i, seen[i], expect[i]);
        if (expect[i] == 0)
            CHECK(seen[i] == 0, "%s: token %d was filtered out but drawn", what, i);
    }
}

static void test_distributions(void)
{
    float logits[] = { 0.0f, 1.0f, 2.0f, 0.5f, -1.0f, 1.5f };
    int v = 6;
    check_distribution("softmax T=1", logits, v, opts(1, 0, 1, 7));
    check_distribution("softmax T=0.5", logits, v, opts(0.5f, 0, 1, 8));
    check_distribution("softmax T=2", logits, v, opts(2, 0, 1, 9));
    check_distribution("top_k 3", logits, v, opts(1, 3, 1, 10));
    check_distribution("top_p 0.8", logits, v, opts(1, 0, 0.8f, 11));
    check_distribution("top_k 4 + top_p 0.7", logits, v, opts(0.8f, 4, 0.7f, 12));
}

static void test_seed(void)
{
    float logits[] = { 0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f, 0.7f, 0.8f };
    tp_sampler_opts o = opts(1, 0, 1, 0);
    int32_t a[200], b[200], c[200];
    tp_rng r1, r2, r3;
    tp_rng_seed(&r1, 1234);
    tp_rng_seed(&r2, 1234);
    tp_rng_seed(&r3, 1235);
    for (int i = 0; i < 200; i++) {
        a[i] = tp_sample(logits, 8, &o, &r1, NULL);
        b[i] = tp_sample(logits, 8, &o, &r2, NULL);
        c[i] = tp_sample(logits, 8, &o, &r3, NULL);
    }
    CHECK(!memcmp(a, b, sizeof a), "the same seed must give the same draws");
    CHECK(memcmp(a, c, sizeof a) != 0, "different seeds gave identical 200 draws");

    /* uniform: in [0, 1), mean near 1/2 */
    tp_rng r;
    tp_rng_seed(&r, 0);
    double sum = 0, lo = 1, hi = 0;
    for (int i = 0; i < 100000; i++) {
        double u = tp_rng_uniform(&r);
        sum += u; lo = fmin(lo, u); hi = fmax(hi, u);
    }
    CHECK(lo >= 0 && hi < 1, "uniform out of [0,1): %g %g", lo, hi);
    CHECK(fabs(sum / 100000 - 0.5) < 0.01, "uniform mean %g", sum / 100000);
}

/* A large vocabulary with nucleus filtering (the path that skips most of the
 * sort) must match the plain computation too. */
static void large_vocab_case(const char *what, float spread, int draws)
{
    enum { V = 50000 };
    float *logits = malloc(V * sizeof *logits);
    tp_rng data;
    tp_rng_seed(&data, 99);
    for (int i = 0; i < V; i++)
        logits[i] = (float)(tp_rng_uniform(&data) * spread);
    logits[123] = 12; logits[456] = 11.5f; logits[789] = 11;
    double *expect = malloc(V * sizeof *expect);
    expected_probs(logits, V, 1, 0, 0.9f, expect);
    tp_sampler_opts o = opts(1, 0, 0.9f, 5);
    tp_rng rng;
    tp_rng_seed(&rng, 5);
    float *scratch = malloc(2 * V * sizeof(float));
    int bad = 0;
    for (int d = 0; d < draws; d++) {
        int32_t id = tp_sample(logits, V, &o, &rng, scratch);
        if (id < 0 || id >= V || expect[id] == 0) bad++;
    }
    CHECK(bad == 0, "%s: top_p 0.9 over 50000 tokens drew %d tokens outside the nucleus", what, bad);
    free(logits); free(expect); free(scratch);
}

/* A large vocabulary with nucleus filtering must match the plain
 * computation: a peaked distribution (the pre-filter leaves a handful of
 * candidates) and a flat one (the nucleus spans most of the vocabulary). */
static void test_large_vocab_top_p(void)
{
    large_vocab_case("peaked", -8, 1000);
    large_vocab_case("flat", 2, 100);
}

/* transformers' RepetitionPenaltyLogitsProcessor, values worked out by hand:
 * for each distinct seen id, logit < 0 -> logit * penalty, else / penalty. */
static void test_repetition_penalty(void)
{
    const float logits[6] = {2.0f, -1.0f, 0.5f, 3.0f, -2.0f, 0.0f};
    /* 1 twice (penalised once), 9 and -1 outside the vocabulary (ignored) */
    const int32_t seen[7] = {0, 1, 1, 4, 5, 9, -1};
    const float want[6] = {1.0f, -2.0f, 0.5f, 3.0f, -4.0f, 0.0f};
    float out[6];
    tp_repetition_penalty(logits, out, 6, seen, 7, 2.0f);
    for (int i = 0; i < 6; i++)
        CHECK(out[i] == want[i], "penalty 2: logit %d is %g, want %g", i, out[i], want[i]);
    const float want_half[6] = {4.0f, -0.5f, 0.5f, 3.0f, -1.0f, 0.0f};   /* penalty < 1 rewards repeats */
    tp_repetition_penalty(logits, out, 6, seen, 7, 0.5f);
    for (int i = 0; i < 6; i++)
        CHECK(out[i] == want_half[i], "penalty 0.5: logit %d is %g, want %g", i, out[i], want_half[i]);

    tp_sampler_opts o = opts(0, 0, 1, 0);
    CHECK(!tp_repetition_penalty_on(&o), "penalty 0 (unset) must be off");
    o.repetition_penalty = 1.0f;
    o.seen = seen;
    o.n_seen = 7;
    CHECK(!tp_repetition_penalty_on(&o), "penalty 1 must be off");
    o.repetition_penalty = 1.3f;
    CHECK(tp_repetition_penalty_on(&o), "penalty 1.3 with ids seen must be on");
    o.n_seen = 0;
    CHECK(!tp_repetition_penalty_on(&o), "no ids seen: nothing to penalise");

    /* Greedy after the penalty: 3.0 / 1.25 = 2.4 < 2.9, so id 1 wins. */
    const float close[3] = {3.0f, 2.9f, -5.0f};
    const int32_t first[1] = {0};
    float pen[3];
    tp_rng rng;
    tp_rng_seed(&rng, 0);
    tp_sampler_opts g = opts(0, 0, 1, 0);
    CHECK(tp_sample(close, 3, &g, &rng, NULL) == 0, "greedy without penalty");
    tp_repetition_penalty(close, pen, 3, first, 1, 1.25f);
    CHECK(pen[0] == 2.4f && tp_sample(pen, 3, &g, &rng, NULL) == 1, "greedy after penalty 1.25: %g", pen[0]);
}

/* generation_config.json: the sampling defaults and eos ids tprun starts from. */
static void test_gen_config(void)
{
    tp_gen_config g;
    tp_err err = { { 0 } };
    CHECK(tp_gen_config_parse(&g, NULL, &err) == 0 && g.n_eos == 0 && !g.has_do_sample, "no file: empty config");
    CHECK(tp_gen_config_parse(&g, "{\"eos_token_id\": 151645, \"do_sample\": true, \"temperature\": 0.6, "
                              "\"top_k\": 20, \"top_p\": 0.95}", &err) == 0, "qwen3 style: %s", err.msg);
    CHECK(g.n_eos == 1 && g.eos_ids[0] == 151645 && g.has_do_sample && g.do_sample && g.has_temperature &&
          fabsf(g.temperature - 0.6f) < 1e-6 && g.top_k == 20 && fabsf(g.top_p - 0.95f) < 1e-6, "qwen3 style values");
    CHECK(tp_gen_config_parse(&g, "{\"eos_token_id\": [509, 508], \"do_sample\": false}", &err) == 0 &&
          g.n_eos == 2 && g.eos_ids[0] == 509 && g.eos_ids[1] == 508 && !g.do_sample && !g.has_temperature,
          "eos list");
    CHECK(tp_gen_config_parse(&g, "{\"eos_token_id\": null}", &err) == 0 && g.n_eos == 0, "eos null");
    CHECK(tp_gen_config_parse(&g, "{\"eos_token_id\": \"2\"}", &err) == -1 && strstr(err.msg, "eos_token_id"),
          "eos as a string: %s", err.msg);
    CHECK(tp_gen_config_parse(&g, "{\"eos_token_id\": [1, -2]}", &err) == -1 && strstr(err.msg, "eos_token_id"),
          "negative eos: %s", err.msg);
    CHECK(tp_gen_config_parse(&g, "{\"eos_token_id\": [1, 2, 3, 4, 5, 6, 7, 8, 9]}", &err) == -1 &&
              strstr(err.msg, "generation_config.json: key \"eos_token_id\" lists more than 8 ids"),
          "nine eos ids: %s", err.msg);
    CHECK(tp_gen_config_parse(&g, "{\"eos_token_id\": []}", &err) == 0 && g.n_eos == 0, "eos []: %s", err.msg);
    CHECK(tp_gen_config_parse(&g, "{\"temperature\": \"hot\"}", &err) == -1 && strstr(err.msg, "temperature"),
          "temperature as a string: %s", err.msg);
    CHECK(tp_gen_config_parse(&g, "{\"top_p\": 1.5}", &err) == -1 && strstr(err.msg, "top_p"), "top_p 1.5: %s", err.msg);
    CHECK(tp_gen_config_parse(&g, "{\"top_k\": 2.5}", &err) == -1 && strstr(err.msg, "top_k"), "top_k 2.5: %s", err.msg);
    CHECK(tp_gen_config_parse(&g, "{\"do_sample\": 1}", &err) == -1 && strstr(err.msg, "do_sample"), "do_sample 1: %s", err.msg);
    CHECK(tp_gen_config_parse(&g, "[1,2]", &err) == -1 && strstr(err.msg, "not a JSON object"), "array: %s", err.msg);
    CHECK(tp_gen_config_parse(&g, "{\"eos_token_id\": [1", &err) == -1, "truncated JSON");
    CHECK(tp_gen_config_parse(&g, "{\"repetition_penalty\": 1.1, \"max_new_tokens\": 100}", &err) == 0 &&
              g.has_repetition_penalty && fabsf(g.repetition_penalty - 1.1f) < 1e-6 && g.max_new_tokens == 100,
          "repetition_penalty 1.1: %s", err.msg);
    CHECK(tp_gen_config_parse(&g, "{}", &err) == 0 && !g.has_repetition_penalty && g.max_new_tokens == 0, "empty");
    CHECK(tp_gen_config_parse(&g, "{\"repetition_penalty\": 0}", &err) == -1 && strstr(err.msg, "repetition_penalty"),
          "repetition_penalty 0: %s", err.msg);
    CHECK(tp_gen_config_parse(&g, "{\"repetition_penalty\": -1.2}", &err) == -1 &&
              strstr(err.msg, "repetition_penalty"), "repetition_penalty -1.2: %s", err.msg);
    CHECK(tp_gen_config_parse(&g, "{\"repetition_penalty\": \"1.1\"}", &err) == -1 &&
              strstr(err.msg, "repetition_penalty"), "repetition_penalty as a string: %s", err.msg);
    CHECK(tp_gen_config_parse(&g, "{\"max_new_tokens\": -5}", &err) == -1 && strstr(err.msg, "max_new_tokens"),
          "max_new_tokens -5: %s", err.msg);
    CHECK(tp_gen_config_parse(&g, "{\"max_new_tokens\": 2.5}", &err) == -1 && strstr(err.msg, "max_new_tokens"),
          "max_new_tokens 2.5: %s", err.msg);
}

int main(void)
{
    test_gen_config();
    test_repetition_penalty();
    test_greedy();
    test_degenerate_equal_greedy();
    test_distributions();
    test_seed();
    test_large_vocab_top_p();
    return check_finish("test_sampling");
}
