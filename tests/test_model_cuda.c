/* test_model_cuda.c - the "cuda" model against the CPU model.
 *
 * Every tests/models/<name>/ is cut here at tp 1 and 2 (as test_model.c
 * does: this file includes it for its in-process comm and its sharding),
 * run on the CPU and with device "cuda" (prefill of the first prompt
 * tokens, then decode steps, then a reset and the prefill again, which must
 * repeat bit for bit), and the logits compared.  A fixture with 3-D (fused
 * expert) tensors is cut by tpconvert itself instead, and every
 * mixture-of-experts fixture is also converted with --expert-parallel at
 * tp 2 (compare_converted).  Where the rope changes with the length
 * (dynamic, longrope) the prompt is long enough for the decode steps to
 * cross the switch.  So are two of test_model.c's
 * synthetic models, whose f16 and f32 weights the upload rounds to bf16,
 * and its qwen3 quantized to fp8 (blocks cut by the tp 2 slices) and int8,
 * whose 8-bit weights and scales go to the device as stored (decode: the
 * 8-bit GEMV; prefill: dequantized to bf16, then cuBLAS).
 *
 * The CPU runs take the ranks built in memory (run_tp); the cuda runs write
 * the same ranks to real rank files (zstd at tp 1, codec none at tp 2; 4 KiB
 * chunks, so tensors span many chunks and the staging ring turns over many
 * times) and open them with defer_tensors, so the weights reach the device
 * through the loader's stream (decode, checksums, pinned staging) as under
 * tprun --device cuda.
 *
 * Tolerance: the CUDA GEMMs round the activations to bf16 (what a bf16
 * transformers model does in its nn.Linear) while the CPU model keeps them
 * fp32, so logits differ by about 2^-9 relative per layer input; we accept
 * |diff| <= 3e-2 * max(1, max |CPU logit|) and require the same argmax
 * wherever the CPU's top two logits are more than that apart.  A wrong head
 * mapping, a missing bias or a misplaced cache row moves logits by O(1).
 *
 * Without a CUDA build or device it exits 77 ("SKIP: ..."): skipped, never
 * counted as passing.  runtime/cuda/emu/run_emu.sh builds it against the
 * CPU emulation of the kernels.
 */
#define main test_model_cpu_main
#include "test_model.c"
#undef main

#ifdef TP_HAVE_CUDA
#include "cuda/kernels_cuda.h"

#include <sys/stat.h>

static int g_compared;

/* The decode graphs against kernel-by-kernel steps, at tp 1 (the
 * in-process comm of tp 2 takes the staged all-reduce, which is never
 * captured): the prompt, then 12 tokens fed back one at a time, greedy and
 * sampled (same seed), must be the same ids both ways (the same logits and
 * the same uniforms), and the graph run must say that it used the graph
 * (a mixture-of-experts model must say that it did not: its routing goes
 * through the host). */
#define GRAPH_STEPS 12
/* Runs the prompt and GRAPH_STEPS fed-back picks; 0 or -1 (err set). */
static int graph_run(const tp_loaded_rank *lr, bool no_graph, const tp_sampler_opts *so, const int32_t *prompt,
                     int n_prompt, int32_t *got, char *info, size_t info_len, bool *sparse, tp_err *err)
{
    tp_model *m = NULL;
    tp_model_opts o = { .max_seq = 64, .threads = 1, .device = "cuda", .no_graph = no_graph };
    if (tp_model_create(&m, (tp_loaded_rank *)lr, NULL, &o, err) < 0)
        return -1;
    tp_rng rng;
    tp_rng_seed(&rng, 11);
    int32_t tok;
    int rc = tp_model_forward_pick(m, prompt, n_prompt, so, &rng, &tok, err);
    for (int i = 0; rc == 0 && i < GRAPH_STEPS; i++) {
        got[i] = tok;
        rc = tp_model_forward_pick(m, &got[i], 1, so, &rng, &tok, err);
    }
    snprintf(info, info_len, "%s", tp_model_device_info(m));
    *sparse = tp_model_get_config(m)->n_experts > 0;
    tp_model_free(m);
    return rc;
}

static void compare_graph(const src_model *s, const char *name, const int32_t *prompt, int n_prompt)
{
    built_rank br;
    build_rank(&br, s, 0, 1);
    const tp_sampler_opts modes[2] = { { .temperature = 0 }, { .temperature = 0.9f, .top_k = 40, .top_p = 0.95f } };
    for (int mode = 0; mode < 2; mode++) {
        const char *what = mode ? "sampled" : "greedy";
        int32_t got[2][GRAPH_STEPS];
        char info[2][512];
        tp_err err = { { 0 } };
        bool sparse = false;
        if (graph_run(&br.lr, false, &modes[mode], prompt, n_prompt, got[0], info[0], sizeof info[0], &sparse,
                      &err) < 0 ||
            graph_run(&br.lr, true, &modes[mode], prompt, n_prompt, got[1], info[1], sizeof info[1], &sparse,
                      &err) < 0) {
            CHECK(0, "%s: %s graph check: %s", name, what, err.msg);
            continue;
        }
        const char *want = sparse ? "no CUDA graph (sparse layers route on the host)" : "decode as a CUDA graph";
        CHECK(strstr(info[0], want) != NULL, "%s: %s: expected \"%s\": %s", name, what, want, info[0]);
        CHECK(strstr(info[1], "no CUDA graph (turned off)") != NULL, "%s: no_graph was not honoured: %s", name,
              info[1]);
        int diff = -1;
        for (int i = 0; i < GRAPH_STEPS && diff < 0; i++)
            if (got[0][i] != got[1][i])
                diff = i;
        CHECK(diff < 0, "%s: %s token %d: graph %d, kernel by kernel %d", name, what, diff, got[0][diff],
              got[1][diff]);
        if (diff < 0) {
            g_compared++;
            printf("%s tp=1: %d %s tokens, decode graph = kernel by kernel\n", name, GRAPH_STEPS, what);
        }
    }
    free_rank(&br, s->n);
}

static int fill_from(void *arg, uint64_t raw_off, uint8_t *dst, size_t len, tp_err *err)
{
    memcpy(dst, (const uint8_t *)arg + raw_off, len);
    return 0;
}

/* Writes s cut at tp = world into dir as a conversion (rank files with the
 * shardfmt writer, manifest.json carrying the config). */
static int write_conversion(const src_model *s, int world, tp_codec codec, const char *dir, tp_err *err)
{
    tp_manifest man;
    memset(&man, 0, sizeof man);
    man.format_version = TP_FORMAT_VERSION;
    man.format = (char *)"tpshard";
    tp_new_conversion_id(man.conversion_id);
    man.tp = world;
    man.model_type = (char *)"test";
    man.codec = (char *)tp_codec_name(codec);
    man.level = 3;
    man.config_json = s->config_json;
    man.plan_json = (char *)"{}";
    man.ranks = calloc((size_t)world, sizeof *man.ranks);
    char names[MAX_WORLD][64];
    int rc = 0;
    for (int r = 0; r < world && rc == 0; r++) {
        tp_rank_file_name(names[r], sizeof names[r], r, world, "tpshard");
        char *path = tp_path_join(dir, names[r]);
        built_rank b;
        build_rank(&b, s, r, world);
        tp_shard_writer_opts wo = { .codec = codec, .level = 3, .chunk_size = 4096 };
        tp_shard_writer *w = NULL;
        rc = tp_shard_writer_open(&w, path, man.conversion_id, r, world, &wo, err);
        for (size_t i = 0; i < s->n && rc == 0; i++) {
            const tp_shard_tensor *in = b.lts[i].info;
            tp_shard_tensor_desc d;
            memset(&d, 0, sizeof d);
            d.name = in->name;
            d.dtype = in->dtype;
            d.ndim = in->ndim;
            memcpy(d.shape, in->shape, sizeof d.shape);
            memcpy(d.global_shape, in->global_shape, sizeof d.global_shape);
            d.split = in->split;
            d.style = "test";
            d.reduce_bias = in->reduce_bias;
            rc = tp_shard_writer_add(w, &d, fill_from, (void *)b.lts[i].data, err);
        }
        if (w && rc == 0) {
            man.ranks[r].rank = r;
            man.ranks[r].file = names[r];
            man.ranks[r].n_tensors = s->n;
            rc = tp_shard_writer_finish(w, &man.ranks[r].checksum, &man.ranks[r].size,
                                        &man.ranks[r].raw_bytes, &man.ranks[r].stored_bytes, err);
        } else if (w) {
            tp_shard_writer_abort(w);
        }
        free_rank(&b, s->n);
        free(path);
    }
    if (rc == 0)
        rc = tp_manifest_write(dir, &man, err);
    free(man.ranks);
    return rc;
}

/* run_tp, through real rank files opened with defer_tensors. */
static int run_tp_files(const src_model *s, int world, tp_codec codec, const int32_t *ids, int n_prefill,
                        int n_steps, float *logits)
{
    tp_err err = { { 0 } };
    static int n_dirs; /* one fresh directory per call, removed at its end */
    char dir[600];
    snprintf(dir, sizeof dir, "%s/conv-%d", check_tmpdir(), n_dirs++);
    if (mkdir(dir, 0700) != 0) {
        CHECK(0, "%s tp=%d: mkdir %s: %s", s->name, world, dir, strerror(errno));
        return -1;
    }
    tp_loaded_rank lr[MAX_WORLD];
    tp_loaded_rank *lrs[MAX_WORLD];
    tp_load_opts lo = { .verify = true, .threads = 2, .quiet = true, .defer_tensors = true };
    int loaded = 0, rc = -1;
    if (write_conversion(s, world, codec, dir, &err) < 0) {
        CHECK(0, "%s tp=%d: writing a conversion: %s", s->name, world, err.msg);
    } else {
        for (; loaded < world; loaded++) {
            if (tp_load_rank(&lr[loaded], dir, loaded, &lo, &err) < 0) {
                CHECK(0, "%s tp=%d: %s", s->name, world, err.msg);
                break;
            }
            CHECK(lr[loaded].deferred && lr[loaded].n_tensors == s->n, "%s: not a deferred open", s->name);
            lrs[loaded] = &lr[loaded];
        }
        if (loaded == world)
            rc = run_ranks(s->name, lrs, world, s->vocab, ids, n_prefill, n_steps, logits);
    }
    for (int r = 0; r < loaded; r++)
        tp_loaded_rank_free(&lr[r]);
    if (check_rmtree(dir) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
    return rc;
}

/* The largest tp compare_src runs (run_emu.sh quick sets 1). */
static int g_max_tp = 2;

#define MAX_PROMPT 48
/* The ids a comparison feeds: n_prefill prompt ids, then n_steps decode
 * steps.  5 + 4 in general; where the rope changes with the sequence
 * length (dynamic past max_position_embeddings, longrope past
 * original_max_position_embeddings) the prompt stops 2 short of that
 * length, so that the decode steps cross it on the device too. */
static void prompt_for(const char *config_json, int vocab, int32_t *ids, int *n_prefill, int *n_steps)
{
    tp_model_config c;
    tp_err err = { { 0 } };
    *n_prefill = 5;
    *n_steps = 4;
    if (config_json && tp_model_config_parse(&c, config_json, &err) == 0) {
        int at = c.rope.type == TP_ROPE_DYNAMIC ? c.rope.max_position
               : c.rope.type == TP_ROPE_LONGROPE ? c.rope.original_max_position : 0;
        if (at - 2 > *n_prefill && at - 2 + *n_steps <= MAX_PROMPT)
            *n_prefill = at - 2;
    }
    for (int i = 0; i < *n_prefill + *n_steps; i++)
        ids[i] = (int32_t)((i * 7919 + 13) % vocab);
}

/* cuda's logits (gpu) against the cpu's, [n_steps][V] each: within 3e-2 of
 * max(1, max |cpu logit|), and the same argmax where the cpu's top two are
 * further apart than that.  Counts a comparison when it ran. */
static void compare_logits(const char *name, const char *what, int w, const float *cpu, const float *gpu, int V,
                           int n_steps)
{
    double worst_rel = 0;
    for (int st = 0; st < n_steps; st++) {
        const float *a = cpu + (size_t)st * V, *b = gpu + (size_t)st * V;
        double mx = 1, worst = 0;
        for (int i = 0; i < V; i++)
            if (fabs(a[i]) > mx)
                mx = fabs(a[i]);
        for (int i = 0; i < V; i++) {
            double d = fabs((double)a[i] - b[i]);
            if (!(d <= worst))
                worst = d;   /* NaN sticks */
        }
        double tol = 3e-2 * mx;
        if (!(worst / mx <= worst_rel))
            worst_rel = worst / mx;   /* NaN sticks here too */
        CHECK(worst <= tol, "%s tp=%d step %d: cuda logits differ from cpu by %g (tol %g)", name, w, st, worst,
              tol);
        int ta = argmax(a, V), tb = argmax(b, V);
        double second = -INFINITY;
        for (int i = 0; i < V; i++)
            if (i != ta && a[i] > second)
                second = a[i];
        if (a[ta] - second > tol)
            CHECK(ta == tb, "%s tp=%d step %d: cuda argmax %d, cpu %d", name, w, st, tb, ta);
    }
    g_compared++;
    printf("%s tp=%d (%s): cuda vs cpu over %d steps: max |diff| / max(1, max |logit|) = %.2e\n", name, w, what,
           n_steps, worst_rel);
}

/* Batched steps on the device (tp_model_forward_batch, continuous
 * batching): BB_SLOTS prompts of different lengths, one per slot,
 * fed in chunks of BB_CHUNK while the slots already past their prompt
 * decode (so steps mix prefill chunks and decode tokens, in a slot order
 * that flips every step), BB_GEN greedy tokens each, picked from the cuda
 * logits and fed back, at tp 1 and 2 (ranks as threads: the staged
 * all-reduces and the gathered logits rows).  The same steps run on the
 * CPU model (tp 1, slots too, fed the same tokens): every logits row
 * within compare_logits' bound of the CPU's.  And each
 * prompt run alone on the device (tp_model_forward, one slot) must pick
 * the same tokens, wherever its top two logits are further apart than that
 * bound (a nearer tie may flip with the summation order).  Then a KV cache
 * larger than the device is refused at create, naming --max-batch. */
enum { BB_SLOTS = 3, BB_GEN = 4, BB_CHUNK = 5, BB_MAX_SEQ = 48 };
static const int BB_LENS[BB_SLOTS] = { 9, 3, 14 };   /* 14 + 3 fed back: past longrope's 16 */

typedef struct bb_seq {
    int fed, gen;       /* prompt tokens fed, tokens generated */
} bb_seq;

/* The ids of prompt p (deterministic, inside the vocabulary). */
static int32_t bb_id(int p, int i, int vocab)
{
    return (int32_t)((i * 7919 + p * 104729 + 17) % vocab);
}

/* Each prompt alone on the device: its BB_GEN greedy tokens and, for each,
 * whether the top two logits were further apart than compare_logits'
 * bound (a token that must match). */
static int bb_alone(const tp_loaded_rank *lr, int V, int32_t tok[BB_SLOTS][BB_GEN], bool firm[BB_SLOTS][BB_GEN],
                    tp_err *err)
{
    tp_model *m = NULL;
    tp_model_opts o = { .max_seq = BB_MAX_SEQ, .threads = 1, .device = "cuda" };
    float *logits = malloc((size_t)V * sizeof *logits);
    int rc = tp_model_create(&m, (tp_loaded_rank *)lr, NULL, &o, err);
    for (int p = 0; p < BB_SLOTS && rc == 0; p++) {
        int32_t ids[BB_MAX_SEQ];
        for (int i = 0; i < BB_LENS[p]; i++)
            ids[i] = bb_id(p, i, V);
        tp_model_reset(m);
        rc = tp_model_forward(m, ids, BB_LENS[p], logits, err);
        for (int g = 0; g < BB_GEN && rc == 0; g++) {
            int best = argmax(logits, V);
            double mx = 1, second = -INFINITY;
            for (int i = 0; i < V; i++) {
                mx = fabs(logits[i]) > mx ? fabs(logits[i]) : mx;
                if (i != best && logits[i] > second)
                    second = logits[i];
            }
            tok[p][g] = best;
            firm[p][g] = logits[best] - second > 3e-2 * mx;
            if (g + 1 < BB_GEN)
                rc = tp_model_forward(m, &tok[p][g], 1, logits, err);
        }
    }
    tp_model_free(m);
    free(logits);
    return rc;
}

/* The next step's tokens of every slot, slot order reversed on odd steps:
 * the next chunk of a prompt (logits on its last token), or the last
 * generated token. */
static int bb_step_tokens(const bb_seq *q, int32_t tok[BB_SLOTS][BB_GEN], int step, int V, tp_batch_token *t)
{
    int n = 0;
    for (int i = 0; i < BB_SLOTS; i++) {
        int s = step % 2 ? BB_SLOTS - 1 - i : i, len = BB_LENS[s];
        if (q[s].gen == BB_GEN)
            continue;
        if (q[s].fed < len) {
            int c = len - q[s].fed < BB_CHUNK ? len - q[s].fed : BB_CHUNK;
            for (int k = q[s].fed; k < q[s].fed + c; k++)
                t[n++] = (tp_batch_token){ s, bb_id(s, k, V), k, k == len - 1 };
        } else {
            t[n++] = (tp_batch_token){ s, tok[s][q[s].gen - 1], len + q[s].gen - 1, true };
        }
    }
    return n;
}

/* Runs the batched schedule on m until every slot has its BB_GEN tokens;
 * rows (BB_SLOTS * BB_GEN rows of vocab floats) gets the logits rows in
 * step order.  pick: the fed-back tokens are tok, filled from m's logits
 * (argmax); else tok is read (another run's picks, fed as they were).  *steps
 * and *most: the steps and the most tokens in one. */
static int bb_run(tp_model *m, int V, int32_t tok[BB_SLOTS][BB_GEN], bool pick, float *rows, int *steps, int *most,
                  tp_err *err)
{
    bb_seq q[BB_SLOTS] = { { 0, 0 } };
    int n_rows = 0;
    *most = 0;
    for (int done = 0, st = 0; done < BB_SLOTS; st++) {
        tp_batch_token t[BB_SLOTS * BB_CHUNK];
        int n = bb_step_tokens(q, tok, st, V, t);
        *most = n > *most ? n : *most;
        *steps = st + 1;
        if (tp_model_forward_batch(m, t, n, rows + (size_t)n_rows * V, err) < 0)
            return -1;
        for (int i = 0; i < n; i++) {
            bb_seq *sq = &q[t[i].slot];
            if (t[i].pos < BB_LENS[t[i].slot])
                sq->fed++;
            if (!t[i].logits)
                continue;
            const float *row = rows + (size_t)n_rows++ * V;
            if (pick)
                tok[t[i].slot][sq->gen] = argmax(row, V);
            sq->gen++;
        }
        done = 0;
        for (int sl = 0; sl < BB_SLOTS; sl++) {
            int want = q[sl].fed + (q[sl].gen ? q[sl].gen - 1 : 0);   /* prompt, then the tokens fed back */
            if (tp_model_slot_length(m, sl) != want)
                return tp_errorf(err, "step %d: slot %d holds %d positions, %d were fed", st, sl,
                                 tp_model_slot_length(m, sl), want);
            done += q[sl].gen == BB_GEN;
        }
    }
    return 0;
}

typedef struct bb_job {
    tp_loaded_rank *lr;
    tp_comm *comm;
    const char *device;
    int V, steps, most, rc;
    bool pick;
    int32_t tok[BB_SLOTS][BB_GEN];
    float *rows;
    tp_err err;
} bb_job;

static void *bb_rank_main(void *arg)
{
    bb_job *j = arg;
    tp_model *m = NULL;
    tp_model_opts o = { .max_seq = BB_MAX_SEQ, .threads = 1, .device = j->device, .slots = BB_SLOTS };
    j->rc = tp_model_create(&m, j->lr, j->comm, &o, &j->err);
    if (j->rc == 0)
        j->rc = bb_run(m, j->V, j->tok, j->pick, j->rows, &j->steps, &j->most, &j->err);
    tp_model_free(m);
    return NULL;
}

/* bb_run on the ranks lrs[0..world) as threads (in-process comm); rank 0's
 * job in *out (its rows malloc'd), checked equal on every rank. */
static int bb_ranks(tp_loaded_rank **lrs, int world, const char *device, int V, bool pick,
                    int32_t tok[BB_SLOTS][BB_GEN], bb_job *out, const char *name)
{
    tp_comm comms[MAX_WORLD];
    bb_job jobs[MAX_WORLD];
    pthread_t th[MAX_WORLD];
    hub h = { .world = world };
    pthread_mutex_init(&h.mu, NULL);
    pthread_cond_init(&h.cv, NULL);
    size_t bytes = (size_t)BB_SLOTS * BB_GEN * V * sizeof(float);
    for (int r = 0; r < world; r++) {
        comms[r] = (tp_comm){ .ops = &hub_ops, .rank = r, .world = world, .timeout_s = 60, .impl = &h };
        jobs[r] = (bb_job){ .lr = lrs[r], .comm = world > 1 ? &comms[r] : NULL, .device = device, .V = V,
                            .pick = pick, .rows = calloc(1, bytes) };
        memcpy(jobs[r].tok, tok, sizeof jobs[r].tok);
        pthread_create(&th[r], NULL, bb_rank_main, &jobs[r]);
    }
    int rc = 0;
    for (int r = 0; r < world; r++) {
        pthread_join(th[r], NULL);
        if (jobs[r].rc < 0) {
            CHECK(0, "%s tp=%d rank %d batched on %s: %s", name, world, r, device, jobs[r].err.msg);
            rc = -1;
        }
    }
    for (int r = 1; r < world; r++) {
        if (rc == 0)
            CHECK(memcmp(jobs[r].rows, jobs[0].rows, bytes) == 0, "%s tp=%d batched on %s: rank %d's logits "
                  "differ from rank 0's", name, world, device, r);
        free(jobs[r].rows);
    }
    pthread_mutex_destroy(&h.mu);
    pthread_cond_destroy(&h.cv);
    *out = jobs[0];
    return rc;
}

/* The batched schedule on cuda at tp = world against the cpu (tp 1, fed
 * cuda's tokens) and each prompt alone on cuda. */
static void compare_batched_tp(const src_model *s, int world, const int32_t alone[BB_SLOTS][BB_GEN],
                               const bool firm[BB_SLOTS][BB_GEN])
{
    const int V = s->vocab;
    built_rank br[MAX_WORLD], one;
    tp_loaded_rank *lrs[MAX_WORLD], *one_lr[1];
    for (int r = 0; r < world; r++) {
        build_rank(&br[r], s, r, world);
        lrs[r] = &br[r].lr;
    }
    build_rank(&one, s, 0, 1);
    one_lr[0] = &one.lr;
    int32_t tok[BB_SLOTS][BB_GEN] = { { 0 } };
    bb_job gpu, cpu;
    int rc = bb_ranks(lrs, world, "cuda", V, true, tok, &gpu, s->name);
    if (rc == 0)
        rc = bb_ranks(one_lr, 1, "cpu", V, false, gpu.tok, &cpu, s->name);
    else
        cpu.rows = NULL;
    if (rc == 0) {
        int rows = BB_SLOTS * BB_GEN;
        compare_logits(s->name, "batched steps, cuda vs cpu tp_model_forward_batch", world, cpu.rows, gpu.rows, V,
                       rows);
        int firm_n = 0, differ = 0;
        for (int p = 0; p < BB_SLOTS; p++)
            for (int g = 0; g < BB_GEN && firm[p][g]; g++) {   /* past a near tie the feeds may differ */
                firm_n++;
                differ += gpu.tok[p][g] != alone[p][g];
            }
        CHECK(differ == 0, "%s tp=%d: %d of %d greedy tokens batched on cuda differ from each prompt alone",
              s->name, world, differ, firm_n);
        CHECK(firm_n > 0, "%s: no greedy token clear of a near tie to compare", s->name);
        printf("%s tp=%d: %d batched steps (up to %d tokens), %d of %d greedy tokens as each prompt alone\n",
               s->name, world, gpu.steps, gpu.most, firm_n - differ, firm_n);
    }
    free(gpu.rows);
    free(cpu.rows);
    for (int r = 0; r < world; r++)
        free_rank(&br[r], s->n);
    free_rank(&one, s->n);
}

static void compare_batched(const src_model *s)
{
    built_rank br;
    build_rank(&br, s, 0, 1);
    tp_err err = { { 0 } };
    int32_t alone[BB_SLOTS][BB_GEN];
    bool firm[BB_SLOTS][BB_GEN];
    if (bb_alone(&br.lr, s->vocab, alone, firm, &err) < 0)
        CHECK(0, "%s: each prompt alone on cuda: %s", s->name, err.msg);
    else
        for (int w = 1; w <= 2; w++)
            if (s->n_heads % w == 0 && s->intermediate % w == 0 &&
                (s->n_kv < w ? w % s->n_kv == 0 : s->n_kv % w == 0))
                compare_batched_tp(s, w, alone, firm);

    /* a KV cache no device holds: refused at create, naming the flags */
    tp_model_opts huge = { .max_seq = BB_MAX_SEQ, .threads = 1, .device = "cuda", .slots = 1 << 24 };
    tp_model *m = NULL;
    err.msg[0] = 0;
    CHECK(tp_model_create(&m, &br.lr, NULL, &huge, &err) < 0 && strstr(err.msg, "--max-batch 16777216") &&
              strstr(err.msg, "device's free memory"),
          "%s: a KV cache of 2^24 slots on cuda: %s", s->name, m ? "accepted" : err.msg);
    tp_model_free(m);
    free_rank(&br, s->n);
}

/* fn on the fixture in dir when its tensors are 2-D (cut here) and, with
 * dense_only, it has no sparse layers. */
static void run_on_fixture(const char *dir, const char *name, bool dense_only,
                           void (*fn)(const src_model *))
{
    tp_err err = { { 0 } };
    src_model *s = malloc(sizeof *s);
    tp_st_set set;
    memset(&set, 0, sizeof set);
    tp_model_config c;
    if (load_hf(s, &set, dir, name, &err) < 0)
        CHECK(0, "%s: %s", name, err.msg);
    else if (!has_3d_tensor(s) &&
             (!dense_only || (tp_model_config_parse(&c, s->config_json, &err) == 0 && c.n_experts == 0)))
        fn(s);
    free_src(s);
    free(s);
    tp_st_set_close(&set);
}

static void compare_batched_fixture(const char *dir, const char *name)
{
    run_on_fixture(dir, name, false, compare_batched);
}

/* Batched decode graphs (tpcm_forward_batch: a pure-decode step, one token
 * a slot, logits for each, padded up to a bucket of 1, 2, 4, 8 ... tokens
 * and replayed from that bucket's graph).  BG_SLOTS slots are prefilled in
 * one mixed step (kernel by kernel), then the steps of BG_SCHEDULE feed
 * each listed slot its greedy token: 3 tokens (bucket 4, one padding row),
 * 1, 5 (bucket 8), 3 again at other slots and positions (bucket 4
 * replayed), a mixed step between replays (a slot listed twice: a chunk of
 * two tokens), 6 (bucket 8 replayed), 2, 3.  Run with graphs on and off
 * (the same fed tokens) the logits rows must agree; the run with graphs
 * must say which buckets it captured (so that the comparison is not of two
 * kernel-by-kernel runs), and every row is compared with the CPU model's
 * batched forward fed the same tokens (compare_logits: its bound and the
 * same greedy token wherever the CPU's top two are apart).
 * On the emulation the two runs must be equal bit for bit: its GEMM is the
 * naive product and at these sizes the attention's split count does not
 * depend on the token count.  On a GPU cuBLAS may pick another algorithm
 * for a bucket's row count than for the step's own, and the attention
 * splits the keys by the grid's row count, which changes the order of fp32
 * sums; a last-bit difference may then move one bf16 rounding of an
 * activation (2^-8 relative), hence BG_GPU_TOL there. */
enum { BG_SLOTS = 6, BG_MAX_SEQ = 48, BG_ROWS = 64, BG_FED = 64 };
#define BG_GPU_TOL 1e-2
static const int BG_PROMPT[BG_SLOTS] = { 5, 2, 7, 3, 14, 4 };   /* slot 4 decodes past longrope's 16 */
static const int BG_SCHEDULE[][BG_SLOTS + 1] = {   /* each step's slots, -1 ends it */
    { 4, 0, 2, -1 }, { 5, -1 }, { 1, 3, 5, 0, 2, -1 }, { 2, 4, 1, -1 }, { 3, 3, 0, -1 },
    { 5, 4, 3, 2, 1, 0, -1 }, { 3, 1, -1 }, { 1, 0, 4, -1 },
};
#define BG_CAPTURED "(batched decode graphs for 1 2 4 8 tokens)"

typedef struct bg_result {
    float *rows;            /* n_rows rows of vocab floats, in step order */
    int n_rows;
    char info[512];         /* tp_model_device_info at the end */
} bg_result;

/* One step of BG_SCHEDULE (st) into t: each listed slot's next token at
 * its length (the greedy token of its last row, from fed[] when !pick, else
 * picked and recorded there), a slot listed again a fixed id after it, the
 * last token of each slot wanting logits.  Returns the token count. */
static int bg_step_tokens(int st, int V, const float *last[BG_SLOTS], int len[BG_SLOTS], bool pick,
                          int32_t *fed, int *n_fed, tp_batch_token *t)
{
    int n = 0;
    for (int k = 0; BG_SCHEDULE[st][k] >= 0; k++) {
        int s = BG_SCHEDULE[st][k];
        bool again = k > 0 && BG_SCHEDULE[st][k - 1] == s, more = BG_SCHEDULE[st][k + 1] == s;
        int32_t id = (int32_t)((len[s] * 31 + 7) % V);
        if (!again) {
            if (pick)
                fed[*n_fed] = argmax(last[s], V);
            id = fed[(*n_fed)++];
        }
        t[n++] = (tp_batch_token){ s, id, len[s]++, !more };
    }
    return n;
}

/* The prefill step and BG_SCHEDULE on a model of BG_SLOTS slots on device
 * (no_graph: the cuda graphs off); pick: the fed tokens are its own greedy
 * picks, recorded in fed, else read from fed. */
static int bg_run(const tp_loaded_rank *lr, const char *device, bool no_graph, int V, bool pick, int32_t *fed,
                  bg_result *res, tp_err *err)
{
    tp_model *m = NULL;
    tp_model_opts o = { .max_seq = BG_MAX_SEQ, .threads = 1, .device = device, .slots = BG_SLOTS,
                        .no_graph = no_graph };
    res->rows = calloc((size_t)BG_ROWS * V, sizeof *res->rows);
    res->n_rows = 0;
    if (tp_model_create(&m, (tp_loaded_rank *)lr, NULL, &o, err) < 0)
        return -1;
    tp_batch_token t[BG_ROWS];
    const float *last[BG_SLOTS];
    int len[BG_SLOTS] = { 0 }, n = 0, n_fed = 0, rc = 0;
    for (int s = 0; s < BG_SLOTS; s++)
        for (int i = 0; i < BG_PROMPT[s]; i++, len[s]++)
            t[n++] = (tp_batch_token){ s, bb_id(s, i, V), i, i == BG_PROMPT[s] - 1 };
    for (int st = -1; rc == 0 && st < (int)(sizeof BG_SCHEDULE / sizeof BG_SCHEDULE[0]); st++) {
        if (st >= 0)
            n = bg_step_tokens(st, V, last, len, pick, fed, &n_fed, t);
        float *out = res->rows + (size_t)res->n_rows * V;
        rc = tp_model_forward_batch(m, t, n, out, err);
        for (int i = 0; rc == 0 && i < n; i++)
            if (t[i].logits)
                last[t[i].slot] = res->rows + (size_t)res->n_rows++ * V;
    }
    snprintf(res->info, sizeof res->info, "%s", tp_model_device_info(m));
    tp_model_free(m);
    return rc;
}

/* Largest |a - b| over n floats (NaN: infinity). */
static double bg_max_diff(const float *a, const float *b, size_t n)
{
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= worst))
            worst = d == d ? d : INFINITY;
    }
    return worst;
}

static void compare_batch_graphs(const src_model *s)
{
    const int V = s->vocab;
    built_rank br;
    build_rank(&br, s, 0, 1);
    int32_t fed[BG_FED];
    bg_result on = { 0 }, off = { 0 }, cpu = { 0 };
    tp_err err = { { 0 } };
    if (bg_run(&br.lr, "cuda", false, V, true, fed, &on, &err) < 0 ||
        bg_run(&br.lr, "cuda", true, V, false, fed, &off, &err) < 0 ||
        bg_run(&br.lr, "cpu", false, V, false, fed, &cpu, &err) < 0) {
        CHECK(0, "%s: batched decode graphs: %s", s->name, err.msg);
    } else {
        CHECK(strstr(on.info, BG_CAPTURED) != NULL, "%s: expected \"%s\": %s", s->name, BG_CAPTURED, on.info);
        CHECK(strstr(off.info, "no CUDA graph (turned off)") && !strstr(off.info, "batched decode graphs"),
              "%s: no_graph was not honoured by batched steps: %s", s->name, off.info);
        CHECK(on.n_rows == off.n_rows && on.n_rows == cpu.n_rows, "%s: %d, %d and %d logits rows", s->name,
              on.n_rows, off.n_rows, cpu.n_rows);
        size_t floats = (size_t)on.n_rows * V;
        double worst = bg_max_diff(on.rows, off.rows, floats);
#ifdef TP_CUDA_EMU
        CHECK(memcmp(on.rows, off.rows, floats * sizeof(float)) == 0,
              "%s: batched decode graphs vs kernel by kernel: logits differ (max |diff| %g), expected the same bits",
              s->name, worst);
#else
        double mx = 1;
        for (size_t i = 0; i < floats; i++)
            mx = fabs(off.rows[i]) > mx ? fabs(off.rows[i]) : mx;
        CHECK(worst <= BG_GPU_TOL * mx, "%s: batched decode graphs vs kernel by kernel: max |diff| %g (tol %g)",
              s->name, worst, BG_GPU_TOL * mx);
#endif
        compare_logits(s->name, "batched decode graphs, cuda vs cpu tp_model_forward_batch", 1, cpu.rows, on.rows,
                       V, on.n_rows);
        printf("%s tp=1: %d batched steps, graphs vs kernel by kernel: max |diff| %g over %d rows\n", s->name,
               1 + (int)(sizeof BG_SCHEDULE / sizeof BG_SCHEDULE[0]), worst, on.n_rows);
    }
    free(on.rows);
    free(off.rows);
    free(cpu.rows);
    free_rank(&br, s->n);
}

/* Dense fixtures only: sparse layers have no graph (routing on the host). */
static void compare_batch_graphs_fixture(const char *dir, const char *name)
{
    run_on_fixture(dir, name, true, compare_batch_graphs);
}

/* The CPU (ranks in memory) against cuda (rank files, deferred) at tp 1 and 2. */
static void compare_src_logits(const src_model *s)
{
    static const int tps[] = { 1, 2 };
    const int V = s->vocab;
    int32_t ids[MAX_PROMPT];
    int n_prefill, n_steps;
    prompt_for(s->config_json, V, ids, &n_prefill, &n_steps);
    for (int ti = 0; ti < 2 && tps[ti] <= g_max_tp; ti++) {
        int w = tps[ti];
        if (!(s->n_heads % w == 0 && s->intermediate % w == 0 &&
              (s->n_kv < w ? w % s->n_kv == 0 : s->n_kv % w == 0)))
            continue;
        size_t per = (size_t)n_steps * V;
        float *cpu = malloc(per * sizeof *cpu), *gpu = malloc(per * sizeof *gpu);
        g_device = "cpu";
        int rc = run_tp(s, w, ids, n_prefill, n_steps, cpu);
        g_device = "cuda";
        tp_codec codec = w == 1 ? TP_CODEC_ZSTD : TP_CODEC_NONE;
        if (rc == 0 && run_tp_files(s, w, codec, ids, n_prefill, n_steps, gpu) == 0) {
            char what[96];
            snprintf(what, sizeof what, "%s weights, %s rank files, prompt %d", tp_dtype_name(s->t[0].dt),
                     tp_codec_name(codec), n_prefill);
            compare_logits(s->name, what, w, cpu, gpu, V, n_steps);
        }
        g_device = "cpu";
        free(cpu);
        free(gpu);
    }
}

static void compare_src(const src_model *s)
{
    int32_t ids[MAX_PROMPT];
    int n_prefill, n_steps;
    compare_src_logits(s);
    prompt_for(NULL, s->vocab, ids, &n_prefill, &n_steps);
    compare_graph(s, s->name, ids, n_prefill);
}

/* Loads every rank of the conversion in dir (defer: as the cuda device
 * opens them); the count loaded. */
static int load_ranks(const char *dir, int world, bool defer, tp_loaded_rank *lr, tp_loaded_rank **lrs)
{
    tp_load_opts lo = { .verify = true, .threads = 2, .quiet = true, .defer_tensors = defer };
    tp_err err = { { 0 } };
    int loaded = 0;
    for (; loaded < world; loaded++) {
        if (tp_load_rank(&lr[loaded], dir, loaded, &lo, &err) < 0) {
            CHECK(0, "%s rank %d: %s", dir, loaded, err.msg);
            break;
        }
        lrs[loaded] = &lr[loaded];
    }
    return loaded;
}

/* tpconvert's own cut of the model directory `dir` at tp = world
 * (expert_parallel: whole experts per rank), loaded as tprun loads it: the
 * cpu model on the decoded ranks against cuda on the same files opened with
 * defer_tensors.  This is how the fused expert layout (3-D tensors, which
 * test_model.c's splitter does not cut) and --expert-parallel reach the
 * cuda model. */
static void compare_converted(const char *dir, const char *name, int world, bool expert_parallel)
{
    static int n_dirs;
    char out[600], label[128];
    snprintf(out, sizeof out, "%s/tpconvert-%d", check_tmpdir(), n_dirs++);
    snprintf(label, sizeof label, "%s%s", name, expert_parallel ? " expert-parallel" : "");
    tp_err err = { { 0 } };
    tp_conversion conv;
    tp_prepare_opts po = { .vocab_parallel = true, .expert_parallel = expert_parallel };
    tp_write_opts wo = { .codec = world == 1 ? TP_CODEC_ZSTD : TP_CODEC_NONE, .level = 3, .chunk_size = 4096,
                         .threads = 2, .quiet = true };
    tp_write_report rep;
    int rc = tp_conversion_prepare_opts(&conv, dir, world, &po, &err);
    if (rc == 0)
        rc = tp_conversion_check_runnable(&conv, true, &err);
    if (rc == 0)
        rc = tp_conversion_write(&conv, out, &wo, &rep, &err);
    int V = (int)conv.model.vocab;
    int32_t ids[MAX_PROMPT];
    int n_prefill = 0, n_steps = 0;
    if (rc == 0)
        prompt_for(conv.config_json, V, ids, &n_prefill, &n_steps);
    tp_conversion_free(&conv);
    if (rc < 0) {
        CHECK(0, "%s tp=%d: tpconvert: %s", label, world, err.msg);
        return;
    }
    tp_loaded_rank cpu_lr[MAX_WORLD], gpu_lr[MAX_WORLD];
    tp_loaded_rank *cpu_lrs[MAX_WORLD], *gpu_lrs[MAX_WORLD];
    int n_cpu = load_ranks(out, world, false, cpu_lr, cpu_lrs);
    int n_gpu = n_cpu == world ? load_ranks(out, world, true, gpu_lr, gpu_lrs) : 0;
    if (n_gpu == world) {
        CHECK(cpu_lr[0].manifest.expert_parallel == expert_parallel, "%s: manifest expert_parallel %d",
              label, cpu_lr[0].manifest.expert_parallel);
        size_t per = (size_t)n_steps * V;
        float *cpu = malloc(per * sizeof *cpu), *gpu = malloc(per * sizeof *gpu);
        g_device = "cpu";
        rc = run_ranks(label, cpu_lrs, world, V, ids, n_prefill, n_steps, cpu);
        g_device = "cuda";
        if (rc == 0 && run_ranks(label, gpu_lrs, world, V, ids, n_prefill, n_steps, gpu) == 0) {
            char what[96];
            snprintf(what, sizeof what, "tpconvert, %s, prompt %d", world == 1 ? "zstd" : "none", n_prefill);
            compare_logits(label, what, world, cpu, gpu, V, n_steps);
        }
        g_device = "cpu";
        free(cpu);
        free(gpu);
    }
    for (int r = 0; r < n_gpu; r++)
        tp_loaded_rank_free(&gpu_lr[r]);
    for (int r = 0; r < n_cpu; r++)
        tp_loaded_rank_free(&cpu_lr[r]);
    if (check_rmtree(out) != 0)
        fprintf(stderr, "could not remove %s\n", out);
}

/* A fixture: cut here (2-D tensors) at tp 1 and 2, or by tpconvert when it
 * has 3-D (fused expert) tensors; with graph, also the decode graph check.
 * A mixture-of-experts fixture also runs --expert-parallel at tp 2. */
static void compare_fixture(const char *dir, const char *name, bool graph)
{
    tp_err err = { { 0 } };
    src_model *s = malloc(sizeof *s);
    tp_st_set set;
    memset(&set, 0, sizeof set);
    bool moe = false;
    if (load_hf(s, &set, dir, name, &err) < 0) {
        CHECK(0, "%s: %s", name, err.msg);
    } else {
        tp_model_config c;
        moe = tp_model_config_parse(&c, s->config_json, &err) == 0 && c.n_experts > 0;
        if (has_3d_tensor(s)) {   /* test_model.c's splitter cuts 2-D tensors only */
            for (int w = 1; w <= g_max_tp; w++)
                compare_converted(dir, name, w, false);
        } else if (graph) {
            compare_src(s);
        } else {
            compare_src_logits(s);
        }
    }
    free_src(s);
    free(s);
    tp_st_set_close(&set);
    if (moe && g_max_tp >= 2)
        compare_converted(dir, name, 2, true);
}

static void compare_model(const char *dir, const char *name)
{
    compare_fixture(dir, name, true);
}

/* run_emu.sh quick calls the comparisons one by one: each must have
 * compared something since the previous mark (a skipped one never passes). */
static int g_mark;
static void expect_compared(const char *what)
{
    CHECK(g_compared > g_mark, "%s was not compared", what);
    g_mark = g_compared;
}

static void compare_synthetic(const spec *sp)
{
    src_model *s = malloc(sizeof *s);
    make_synthetic(s, sp);
    compare_src(s);
    free_src(s);
    free(s);
}

/* test_model.c's quantized qwen3 (lm_head quantized too), cpu vs cuda. */
static void compare_quantized(tp_dtype qdt)
{
    spec sp = SPECS[0];
    sp.tie = false;
    src_model *s = malloc(sizeof *s), *q, *d;
    make_synthetic(s, &sp);
    quantize_src(s, qdt, 24, 12, &q, &d);
    snprintf(q->name, sizeof q->name, "syn-qwen3-%s", qdt == TP_I8 ? "int8" : "fp8");
    compare_src(q);
    free_view(q);
    free_view(d);
    free_src(s);
    free(s);
}
#endif

int main(void)
{
#ifndef TP_HAVE_CUDA
    return check_skip("no GPU: this build has no CUDA");
#else
    tp_err err = { { 0 } };
    int count = 0;
    if (tpc_device_count(&count, &err) < 0 || count == 0)
        return check_skip("no GPU (%s)", count == 0 && !err.msg[0] ? "no CUDA device" : err.msg);
    const char *root = "tests/models";
    DIR *d = opendir(root);
    CHECK(d != NULL, "%s: cannot open (run from the repository root)", root);
    if (d) {
        struct dirent *e;
        char *names[64];
        int n = 0;
        while ((e = readdir(d)) && n < 64)
            if (e->d_name[0] != '.' && strcmp(e->d_name, "README.md") != 0)
                names[n++] = strdup(e->d_name);
        closedir(d);
        for (int i = 0; i < n; i++) {
            char *dir = tp_path_join(root, names[i]);
            compare_model(dir, names[i]);
            compare_batched_fixture(dir, names[i]);
            compare_batch_graphs_fixture(dir, names[i]);
            free(dir);
            free(names[i]);
        }
    }
    compare_synthetic(&SPECS[1]);   /* f16 weights, qwen2 sliding window, q/k/v biases */
    compare_synthetic(&SPECS[2]);   /* f32 weights, llama3 rope, vocab-parallel, every bias */
    compare_quantized(TP_F8_E4M3);
    compare_quantized(TP_I8);
    CHECK(g_compared > 0, "no model was compared");
    printf("%d comparisons\n", g_compared);
    return check_finish("test_model_cuda");
#endif
}
