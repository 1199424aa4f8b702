/* check_reference.c - compares one `tprun --json --logits` output with the
 * reference.json of a fixture model (made by tools/make_fixtures.py with
 * transformers in float32), and optionally with another tprun output (the
 * tp=1 run, to hold tp=2/4 to a tighter bound).
 *
 *   check_reference REF.json PROMPT_INDEX OUT.json [--against TP1.json]
 *                   [--tol 1e-3] [--tp-tol 1e-4]
 *
 * Logits: max |ours - reference| <= tol * max(1, max |reference|).
 * Greedy tokens: identical to the reference's, except that at a step whose
 * reference margin (top1 - top2 logit) is within the logit tolerance the
 * two may legitimately pick different tokens; from there on the sequences
 * are not comparable and the check stops there (and says so).
 * With --against: the logits within tp_tol * max(1, max |logit|) of the
 * other run's, and the same tokens under the same near-tie rule.
 *
 * Built by tests/e2e_tprun.sh with cc (C and cJSON only). */
#include <cJSON.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "check_reference: %s: cannot open\n", path);
        exit(2);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    if (!s || fread(s, 1, (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "check_reference: %s: cannot read\n", path);
        exit(2);
    }
    s[n] = 0;
    fclose(f);
    return s;
}

static cJSON *load_json(const char *path)
{
    char *s = slurp(path);
    cJSON *j = cJSON_Parse(s);
    free(s);
    if (!j || !cJSON_IsObject(j)) {
        fprintf(stderr, "check_reference: %s: not a JSON object\n", path);
        exit(2);
    }
    return j;
}

/* A numeric array as doubles; exits when the key is missing or not numbers. */
static double *numbers(const cJSON *obj, const char *key, const char *path, int *n)
{
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!cJSON_IsArray(a)) {
        fprintf(stderr, "check_reference: %s: no array \"%s\"\n", path, key);
        exit(2);
    }
    *n = cJSON_GetArraySize(a);
    double *v = malloc(((size_t)*n + 1) * sizeof *v);
    int i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, a) {
        if (!cJSON_IsNumber(e)) {
            fprintf(stderr, "check_reference: %s: \"%s\"[%d] is not a number\n", path, key, i);
            exit(2);
        }
        v[i++] = e->valuedouble;
    }
    return v;
}

static int failures;

static void compare_logits(const char *what, const double *ref, int n_ref, const double *got, int n_got, double tol)
{
    if (n_ref != n_got) {
        printf("FAIL %s: %d logits, the reference has %d\n", what, n_got, n_ref);
        failures++;
        return;
    }
    double max_ref = 0, max_diff = 0;
    int worst = 0;
    for (int i = 0; i < n_ref; i++) {
        max_ref = fmax(max_ref, fabs(ref[i]));
        double d = fabs(ref[i] - got[i]);
        if (d > max_diff || d != d) {
            max_diff = d;
            worst = i;
        }
    }
    double bound = tol * fmax(1, max_ref);
    bool ok = max_diff <= bound;
    printf("%s %s: max |dlogit| %.3g at id %d (bound %.3g)\n", ok ? "ok  " : "FAIL", what, max_diff, worst, bound);
    if (!ok)
        failures++;
}

/* Tokens equal up to the first step whose reference margin is within
 * margin_tol (a near tie), where a difference is allowed and comparison stops. */
static void compare_tokens(const char *what, const double *want, int n_want, const double *got, int n_got,
                           const double *margins, int n_margins, double margin_tol)
{
    int n = n_want < n_got ? n_want : n_got;
    for (int s = 0; s < n; s++) {
        if (want[s] == got[s])
            continue;
        double m = s < n_margins ? margins[s] : INFINITY;
        if (m <= margin_tol) {
            printf("ok   %s: tokens agree for %d steps; step %d differs (%g vs %g) at a near tie "
                   "(reference margin %.3g <= %.3g), not compared further\n", what, s, s, got[s], want[s], m, margin_tol);
            return;
        }
        printf("FAIL %s: step %d generated %g, expected %g (reference margin %.3g > %.3g)\n",
               what, s, got[s], want[s], m, margin_tol);
        failures++;
        return;
    }
    if (n_got != n_want) {
        printf("FAIL %s: %d tokens generated, expected %d\n", what, n_got, n_want);
        failures++;
        return;
    }
    printf("ok   %s: all %d tokens identical\n", what, n);
}

/* Helper modes for the shell script (no jq needed):
 *   check_reference REF.json --n-prompts      number of prompts
 *   check_reference REF.json --ids I          prompt I's ids as 1,2,3
 *   check_reference OUT.json --text           tprun's "text", raw */
static int helper_mode(int argc, char **argv)
{
    cJSON *ref = load_json(argv[1]);
    const cJSON *prompts = cJSON_GetObjectItemCaseSensitive(ref, "prompts");
    if (!strcmp(argv[2], "--text")) {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(ref, "text");
        if (!cJSON_IsString(t)) {
            fprintf(stderr, "check_reference: %s: no string \"text\"\n", argv[1]);
            return 2;
        }
        fputs(t->valuestring, stdout);
    } else if (!strcmp(argv[2], "--n-prompts")) {
        printf("%d\n", cJSON_GetArraySize(prompts));
    } else if (!strcmp(argv[2], "--ids") && argc == 4) {
        const cJSON *p = cJSON_GetArrayItem(prompts, atoi(argv[3]));
        int n = 0;
        double *ids = p ? numbers(p, "ids", argv[1], &n) : NULL;
        if (!ids) {
            fprintf(stderr, "check_reference: %s: no prompt %s\n", argv[1], argv[3]);
            return 2;
        }
        for (int i = 0; i < n; i++)
            printf(i ? ",%.0f" : "%.0f", ids[i]);
        printf("\n");
        free(ids);
    } else {
        fprintf(stderr, "check_reference: unknown mode %s\n", argv[2]);
        return 2;
    }
    cJSON_Delete(ref);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && !strncmp(argv[2], "--", 2))
        return helper_mode(argc, argv);
    if (argc < 4) {
        fprintf(stderr, "usage: check_reference REF.json PROMPT_INDEX OUT.json [--against TP1.json] "
                        "[--tol X] [--tp-tol Y]\n");
        return 2;
    }
    const char *ref_path = argv[1], *out_path = argv[3], *against = NULL;
    int pi = atoi(argv[2]);
    double tol = 1e-3, tp_tol = 1e-4;
    for (int i = 4; i < argc; i++) {
        if (!strcmp(argv[i], "--against") && i + 1 < argc) against = argv[++i];
        else if (!strcmp(argv[i], "--tol") && i + 1 < argc) tol = atof(argv[++i]);
        else if (!strcmp(argv[i], "--tp-tol") && i + 1 < argc) tp_tol = atof(argv[++i]);
        else { fprintf(stderr, "check_reference: unknown argument %s\n", argv[i]); return 2; }
    }
    cJSON *ref = load_json(ref_path), *out = load_json(out_path);
    const cJSON *prompts = cJSON_GetObjectItemCaseSensitive(ref, "prompts");
    const cJSON *p = cJSON_GetArrayItem(prompts, pi);
    if (!p) {
        fprintf(stderr, "check_reference: %s: no prompt %d\n", ref_path, pi);
        return 2;
    }
    int n_ids, n_out_ids, n_ref_logits, n_logits, n_greedy, n_gen, n_margins;
    double *ids = numbers(p, "ids", ref_path, &n_ids);
    double *out_ids = numbers(out, "prompt_ids", out_path, &n_out_ids);
    if (n_ids != n_out_ids || memcmp(ids, out_ids, (size_t)n_ids * sizeof *ids)) {
        printf("FAIL prompt ids differ from the reference's prompt %d\n", pi);
        failures++;
    }
    double *ref_logits = numbers(p, "last_logits", ref_path, &n_ref_logits);
    double *logits = numbers(out, "logits", out_path, &n_logits);
    double *greedy = numbers(p, "greedy", ref_path, &n_greedy);
    double *gen = numbers(out, "generated_ids", out_path, &n_gen);
    double *margins = numbers(p, "greedy_margins", ref_path, &n_margins);
    double max_ref = 0;
    for (int i = 0; i < n_ref_logits; i++) max_ref = fmax(max_ref, fabs(ref_logits[i]));
    /* A flip is possible where the true margin is within twice our logit
     * error bound (each of the two logits may be off by the bound). */
    double margin_tol = 2 * tol * fmax(1, max_ref);
    compare_logits("logits vs transformers", ref_logits, n_ref_logits, logits, n_logits, tol);
    compare_tokens("greedy tokens vs transformers", greedy, n_greedy, gen, n_gen, margins, n_margins, margin_tol);
    if (against) {
        cJSON *base = load_json(against);
        int n_base_logits, n_base_gen;
        double *base_logits = numbers(base, "logits", against, &n_base_logits);
        double *base_gen = numbers(base, "generated_ids", against, &n_base_gen);
        compare_logits("logits vs tp=1", base_logits, n_base_logits, logits, n_logits, tp_tol);
        compare_tokens("greedy tokens vs tp=1", base_gen, n_base_gen, gen, n_gen, margins, n_margins,
                       2 * tp_tol * fmax(1, max_ref));
        free(base_logits);
        free(base_gen);
        cJSON_Delete(base);
    }
    free(ids); free(out_ids); free(ref_logits); free(logits); free(greedy); free(gen); free(margins);
    cJSON_Delete(ref);
    cJSON_Delete(out);
    return failures ? 1 : 0;
}
