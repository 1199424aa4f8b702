/* sampling.c - picking the next token from full-vocabulary logits.
 *
 * temperature 0: greedy (the largest logit; ties go to the lowest id).
 * Otherwise: softmax of logits / temperature, keep the top_k most likely,
 * keep the smallest prefix of those (most likely first) whose renormalised
 * mass reaches top_p, renormalise, draw.  Every rank holds the same logits
 * and the same seed, so they draw the same token (tprun still broadcasts
 * rank 0's choice).  Candidates are ordered by probability, ties by lower
 * id, so top_k 1 and a tiny top_p both give exactly the greedy token.
 * A repetition penalty (transformers' rule) changes the logits first. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "runtime.h"

/* -------------------------------------------------------------- picking */

static int32_t argmax(const float *logits, int vocab)
{
    int32_t best = 0;
    float best_v = -INFINITY;
    for (int i = 0; i < vocab; i++)
        if (logits[i] > best_v) {   /* strict: ties keep the lower id; NaN never wins */
            best_v = logits[i];
            best = i;
        }
    return best;
}

typedef struct candidate {
    float p;
    int32_t id;
} candidate;

/* Most likely first; equal probabilities: lower id first. */
static int by_prob_desc(const void *a, const void *b)
{
    const candidate *x = a, *y = b;
    if (x->p != y->p)
        return x->p > y->p ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* Smallest value kept when only the k largest of v[0..n) survive:
 * quickselect on a copy (tmp, n floats). */
static float kth_largest(const float *v, int n, int k, float *tmp)
{
    memcpy(tmp, v, (size_t)n * sizeof *tmp);
    int lo = 0, hi = n - 1, want = k - 1;   /* index in descending order */
    while (lo < hi) {
        float pivot = tmp[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (tmp[i] > pivot) i++;
            while (tmp[j] < pivot) j--;
            if (i <= j) {
                float t = tmp[i]; tmp[i] = tmp[j]; tmp[j] = t;
                i++; j--;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else break;
    }
    return tmp[want];
}

/* ---------------------------------------------------- repetition penalty */

bool tp_repetition_penalty_on(const tp_sampler_opts *o)
{
    return o->repetition_penalty > 0 && o->repetition_penalty != 1.0f && o->seen && o->n_seen > 0;
}

void tp_repetition_penalty(const float *logits, float *out, int vocab, const int32_t *seen, size_t n, float penalty)
{
    memcpy(out, logits, (size_t)vocab * sizeof *out);
    /* Reading from logits and writing to out makes a repeated id harmless:
     * it is penalised once, like transformers' gather then scatter. */
    for (size_t i = 0; i < n; i++) {
        int32_t id = seen[i];
        if (id < 0 || id >= vocab)
            continue;
        float l = logits[id];
        out[id] = l < 0 ? l * penalty : l / penalty;
    }
}

/* -------------------------------------------------------------- sampling */

bool tp_sampler_is_greedy(const tp_sampler_opts *o) { return !(o->temperature > 0) || o->top_k == 1; }

int32_t tp_sample(const float *logits, int vocab, const tp_sampler_opts *o, tp_rng *rng, float *scratch)
{
    if (vocab <= 0)
        return 0;
    if (tp_sampler_is_greedy(o))
        return argmax(logits, vocab);

    float *probs = scratch, *own = NULL;
    if (!probs) {
        own = malloc((size_t)vocab * 2 * sizeof(float));
        if (!own)
            return argmax(logits, vocab);   /* no memory to sample: the best token is the safe answer */
        probs = own;
    }
    /* Unnormalised softmax; NaN logits get probability 0. */
    float max = logits[argmax(logits, vocab)];
    double inv_t = 1.0 / o->temperature, total = 0;
    for (int i = 0; i < vocab; i++) {
        float l = logits[i];
        probs[i] = l == l ? (float)exp(((double)l - max) * inv_t) : 0.0f;
        total += probs[i];
    }

    /* Which tokens can be in the result.  With top-k: those at or above the
     * k-th largest probability.  Without, for top_p < 1: those at or above
     * (1 - top_p) / vocab of the mass, since everything below holds less than
     * 1 - top_p of it together and the nucleus never reaches it.  Either way
     * the sort stays small. */
    int k = o->top_k > 0 && o->top_k < vocab ? o->top_k : vocab;
    double top_p = o->top_p > 0 && o->top_p < 1 ? o->top_p : 1;
    if (k == vocab && top_p == 1) {
        /* No filter: draw straight from the softmax, in id order (no sort). */
        double u = tp_rng_uniform(rng) * total, cum = 0;
        int32_t pick = argmax(logits, vocab);
        for (int i = 0; i < vocab; i++) {
            cum += probs[i];
            if (u < cum) {
                pick = i;
                break;
            }
        }
        free(own);
        return pick;
    }
    float floor_p = 0;
    if (k < vocab)
        floor_p = kth_largest(probs, vocab, k, probs + vocab);
    else if (top_p < 1)
        floor_p = (float)((1 - top_p) / vocab * total);
    size_t n_cand = 0;
    for (int i = 0; i < vocab; i++)
        if (probs[i] >= floor_p && probs[i] > 0)
            n_cand++;
    candidate *cand = malloc((n_cand ? n_cand : 1) * sizeof *cand);
    if (!cand) {
        free(own);
        return argmax(logits, vocab);
    }
    n_cand = 0;
    for (int i = 0; i < vocab; i++)
        if (probs[i] >= floor_p && probs[i] > 0)
            cand[n_cand++] = (candidate){ probs[i], i };
    free(own);
    if (n_cand == 0) {
        free(cand);
        return argmax(logits, vocab);
    }
    qsort(cand, n_cand, sizeof *cand, by_prob_desc);

    /* The mass top-p is measured against: what top-k kept, else everything. */
    double mass = total;
    if (k < vocab) {
        if (n_cand > (size_t)k)
            n_cand = (size_t)k;   /* ties at the k-th value: the lower ids stay */
        mass = 0;
        for (size_t i = 0; i < n_cand; i++)
            mass += cand[i].p;
    }
    double kept_mass = 0;
    size_t keep = 0;
    while (keep < n_cand) {
        kept_mass += cand[keep++].p;
        if (top_p < 1 && kept_mass >= top_p * mass)
            break;
    }
    n_cand = keep;

    double u = tp_rng_uniform(rng) * kept_mass, cum = 0;
    int32_t pick = cand[n_cand - 1].id;   /* rounding leftovers land on the last one */
    for (size_t i = 0; i < n_cand; i++) {
        cum += cand[i].p;
        if (u < cum) {
            pick = cand[i].id;
            break;
        }
    }
    free(cand);
    return pick;
}
