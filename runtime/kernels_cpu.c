/* kernels_cpu.c - fp32 CPU kernels of the forward pass (see kernels_cpu.h). */
#include "kernels_cpu.h"

#include <math.h>
#include <string.h>
#include <cblas.h>

void tpk_embedding_rows(float *out, const void *table, tp_dtype dt, const int32_t *ids, int n,
                        int hidden, int64_t row_start, int64_t row_end)
{
    size_t row_bytes = (size_t)hidden * tp_dtype_size(dt);
    for (int t = 0; t < n; t++) {
        float *dst = out + (size_t)t * hidden;
        int64_t id = ids[t];
        if (id >= row_start && id < row_end)
            tpk_to_f32(dst, (const uint8_t *)table + (size_t)(id - row_start) * row_bytes, dt,
                       (size_t)hidden);
        else
            memset(dst, 0, (size_t)hidden * sizeof(float));
    }
}

void tpk_embedding(float *out, const float *table, const int32_t *ids, int n, int hidden,
                   int64_t row_start, int64_t row_end)
{
    tpk_embedding_rows(out, table, TP_F32, ids, n, hidden, row_start, row_end);
}

/* 1 / sqrt(mean(x^2) + eps).  The sum is kept in double: transformers sums
 * in fp32 (pairwise), double is at least as close to the exact value. */
static float rms_scale(const float *x, int dim, float eps)
{
    double ss = 0.0;
    for (int i = 0; i < dim; i++)
        ss += (double)x[i] * x[i];
    float mean = (float)(ss / dim);
    return 1.0f / sqrtf(mean + eps);
}

void tpk_rmsnorm(float *out, const float *x, const float *w, int n, int dim, float eps)
{
    for (int t = 0; t < n; t++) {
        const float *xr = x + (size_t)t * dim;
        float *o = out + (size_t)t * dim;
        float s = rms_scale(xr, dim, eps);
        /* HF: weight * (x * rsqrt(var + eps)) */
        for (int i = 0; i < dim; i++)
            o[i] = w[i] * (xr[i] * s);
    }
}

void tpk_add_rmsnorm(float *x, const float *delta, float *out, const float *w, int n, int dim,
                     float eps)
{
    if (delta) {
        size_t total = (size_t)n * dim;
        for (size_t i = 0; i < total; i++)
            x[i] += delta[i];
    }
    tpk_rmsnorm(out, x, w, n, dim, eps);
}

void tpk_head_rmsnorm(float *x, const float *w, int n_rows, int head_dim, float eps)
{
    tpk_rmsnorm(x, x, w, n_rows, head_dim, eps);
}

/* base ** (arange(0, dim, 2).float() / dim) in fp32, as torch computes it
 * (the Python float base is taken as an fp32 scalar). */
static float rope_pos_freq(float base, int i, int head_dim)
{
    return powf(base, (float)(2 * i) / (float)head_dim);
}

/* _compute_llama3_parameters on plain frequencies f (fp32 tensor ops with
 * Python-float scalars). */
static void rope_llama3(float *f, int half, const tp_rope_config *r)
{
    float factor = (float)r->factor, lo = (float)r->low_freq_factor;
    float old_ctx = (float)r->original_max_position;
    float low_wl = (float)(r->original_max_position / r->low_freq_factor);
    float high_wl = (float)(r->original_max_position / r->high_freq_factor);
    float span = (float)(r->high_freq_factor - r->low_freq_factor);
    for (int i = 0; i < half; i++) {
        /* wavelengths longer than old_context/low_freq_factor are divided by
         * factor, shorter than old_context/high_freq_factor kept, in between
         * interpolated */
        float wavelen = (float)(2.0 * M_PI) / f[i];
        float scaled = wavelen > low_wl ? f[i] / factor : f[i];
        if (!(wavelen < high_wl) && !(wavelen > low_wl)) {
            float smooth = (old_ctx / wavelen - lo) / span;
            scaled = (1.0f - smooth) * scaled / factor + smooth * scaled;
        }
        f[i] = scaled;
    }
}

/* _compute_yarn_parameters: find_correction_range in double, the ramp and
 * the blend in fp32. */
static void rope_yarn(float *f, int head_dim, const tp_rope_config *r)
{
    int half = head_dim / 2;
    double dim = head_dim, base = r->theta, orig = r->original_max_position;
    double low = dim * log(orig / (r->beta_fast * 2 * M_PI)) / (2 * log(base));
    double high = dim * log(orig / (r->beta_slow * 2 * M_PI)) / (2 * log(base));
    if (r->truncate) {
        low = floor(low);
        high = ceil(high);
    }
    low = low > 0 ? low : 0;
    high = high < dim - 1 ? high : dim - 1;
    if (low == high)
        high += 0.001;   /* "Prevent singularity" */
    float lo_f = (float)low, span = (float)(high - low), factor = (float)r->factor;
    for (int i = 0; i < half; i++) {
        float pos_freq = rope_pos_freq((float)base, i, head_dim);
        float extrapolation = 1.0f / pos_freq;
        float interpolation = 1.0f / (factor * pos_freq);
        float ramp = ((float)i - lo_f) / span;
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        float extrapolation_factor = 1.0f - ramp;
        f[i] = interpolation * (1.0f - extrapolation_factor) + extrapolation * extrapolation_factor;
    }
}

/* _compute_dynamic_ntk_parameters: at init (seq_len = max_position) the
 * base is computed with Python floats; in dynamic_frequency_update seq_len
 * is an int64 tensor, so the whole base expression is fp32. */
static float rope_dynamic_base(const tp_rope_config *r, int head_dim, int seq_len)
{
    double expo = (double)head_dim / (head_dim - 2);
    if (seq_len <= r->max_position) {
        double L = r->max_position;
        return (float)(r->theta * pow(r->factor * L / L - (r->factor - 1), expo));
    }
    float grown = (float)r->factor * (float)seq_len / (float)r->max_position - (float)(r->factor - 1);
    return (float)r->theta * powf(grown, (float)expo);
}

void tpk_rope_inv_freq(float *inv_freq, int head_dim, const tp_rope_config *r, int seq_len)
{
    int half = head_dim / 2;
    if (r->type == TP_ROPE_YARN) {
        rope_yarn(inv_freq, head_dim, r);
        return;
    }
    float base = r->type == TP_ROPE_DYNAMIC ? rope_dynamic_base(r, head_dim, seq_len) : (float)r->theta;
    bool long_factors = seq_len > r->original_max_position;
    for (int i = 0; i < half; i++) {
        float pos_freq = rope_pos_freq(base, i, head_dim);
        if (r->type == TP_ROPE_LONGROPE)   /* 1 / (ext_factors * base ** ...) */
            pos_freq *= long_factors ? r->long_factor[i] : r->short_factor[i];
        inv_freq[i] = 1.0f / pos_freq;
        if (r->type == TP_ROPE_LINEAR)
            inv_freq[i] /= (float)r->factor;
    }
    if (r->type == TP_ROPE_LLAMA3)
        rope_llama3(inv_freq, half, r);
}

bool tpk_rope_per_pass(const tp_rope_config *r)
{
    return r->type == TP_ROPE_DYNAMIC || r->type == TP_ROPE_LONGROPE;
}

/* The rows of positions [first, first + n), written at cos_rows[0..n) /
 * sin_rows[0..n): cos/sin of (float)pos * inv_freq, times scale. */
static void rope_fill(float *cos_rows, float *sin_rows, const float *inv_freq, int half, int first, int n,
                      float scale)
{
    for (int t = 0; t < n; t++)
        for (int i = 0; i < half; i++) {
            float angle = (float)(first + t) * inv_freq[i];   /* fp32 product, as HF */
            cos_rows[(size_t)t * half + i] = (float)cos((double)angle) * scale;
            sin_rows[(size_t)t * half + i] = (float)sin((double)angle) * scale;
        }
}

void tpk_rope_rows_at(float *cos_rows, float *sin_rows, float *inv, int head_dim, const tp_rope_config *r,
                      int seq_len, int first, int n)
{
    tpk_rope_inv_freq(inv, head_dim, r, seq_len);
    rope_fill(cos_rows, sin_rows, inv, head_dim / 2, first, n, (float)r->attention_factor);
}

void tpk_rope_rows(float *cos_t, float *sin_t, float *inv, int head_dim, const tp_rope_config *r,
                   int seq_len, int first, int n)
{
    size_t at = (size_t)first * (size_t)(head_dim / 2);
    tpk_rope_rows_at(cos_t + at, sin_t + at, inv, head_dim, r, seq_len, first, n);
}

void tpk_rope_table(float *cos_t, float *sin_t, const float *inv_freq, int head_dim, int n_pos)
{
    rope_fill(cos_t, sin_t, inv_freq, head_dim / 2, 0, n_pos, 1.0f);
}

void tpk_rope(float *x, int n, int n_heads, int head_dim, size_t row_stride, int pos0,
              const float *cos_t, const float *sin_t)
{
    int half = head_dim / 2;
    for (int t = 0; t < n; t++) {
        const float *c = cos_t + (size_t)(pos0 + t) * half;
        const float *s = sin_t + (size_t)(pos0 + t) * half;
        for (int h = 0; h < n_heads; h++) {
            float *v = x + (size_t)t * row_stride + (size_t)h * head_dim;
            for (int i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                /* x*cos + rotate_half(x)*sin, rotate_half = cat(-x2, x1) */
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i] + a * s[i];
            }
        }
    }
}

void tpk_attention_head(float *out, size_t out_stride, const float *q, size_t q_stride,
                        const float *k, const float *v, int n, int pos0, int head_dim,
                        int window, float scale, float *scratch)
{
    for (int t = 0; t < n; t++) {
        int p = pos0 + t;
        int lo = (window > 0 && p - window + 1 > 0) ? p - window + 1 : 0;
        const float *qt = q + (size_t)t * q_stride;
        float mx = -INFINITY;
        for (int j = lo; j <= p; j++) {
            const float *kj = k + (size_t)j * head_dim;
            float dot = 0.0f;
            for (int d = 0; d < head_dim; d++)
                dot += qt[d] * kj[d];
            dot *= scale;
            scratch[j] = dot;
            if (dot > mx)
                mx = dot;
        }
        double sum = 0.0;
        for (int j = lo; j <= p; j++) {
            float e = expf(scratch[j] - mx);
            scratch[j] = e;
            sum += e;
        }
        float inv = (float)(1.0 / sum);
        float *o = out + (size_t)t * out_stride;
        memset(o, 0, (size_t)head_dim * sizeof(float));
        for (int j = lo; j <= p; j++) {
            float wgt = scratch[j] * inv;
            const float *vj = v + (size_t)j * head_dim;
            for (int d = 0; d < head_dim; d++)
                o[d] += wgt * vj[d];
        }
    }
}

void tpk_attn_block_keys(int first, int b, int window, int *klo, int *nk)
{
    int lo = (window > 0 && first - window + 1 > 0) ? first - window + 1 : 0;
    *klo = lo;
    *nk = first + b - lo;
}

void tpk_attn_scores(float *S, const float *q, size_t q_stride, const float *k, int b, int klo,
                     int nk, int head_dim, float scale)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, b, nk, head_dim, scale, q, (int)q_stride,
                k + (size_t)klo * head_dim, head_dim, 0.0f, S, nk);
}

void tpk_attn_softmax_row(float *s, int p, int klo, int nk, int window)
{
    int lo = (window > 0 && p - window + 1 > klo) ? p - window + 1 : klo;
    float mx = -INFINITY;
    for (int j = lo; j <= p; j++)
        if (s[j - klo] > mx)
            mx = s[j - klo];
    double sum = 0.0;
    for (int j = klo; j < klo + nk; j++) {
        float e = (j >= lo && j <= p) ? expf(s[j - klo] - mx) : 0.0f;
        s[j - klo] = e;
        sum += e;
    }
    float inv = (float)(1.0 / sum);
    for (int j = 0; j < nk; j++)
        s[j] *= inv;
}

void tpk_attn_weighted_sum(float *out, size_t out_stride, const float *S, const float *v, int b,
                           int klo, int nk, int head_dim)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, b, head_dim, nk, 1.0f, S, nk,
                v + (size_t)klo * head_dim, head_dim, 0.0f, out, (int)out_stride);
}

void tpk_attention_head_blocked(float *out, size_t out_stride, const float *q, size_t q_stride,
                                const float *k, const float *v, int n, int pos0, int head_dim,
                                int window, float scale, float *scratch)
{
    for (int t0 = 0; t0 < n; t0 += TPK_ATT_BLOCK) {
        int b = n - t0 < TPK_ATT_BLOCK ? n - t0 : TPK_ATT_BLOCK;
        int first = pos0 + t0, klo, nk;
        tpk_attn_block_keys(first, b, window, &klo, &nk);
        tpk_attn_scores(scratch, q + (size_t)t0 * q_stride, q_stride, k, b, klo, nk, head_dim,
                        scale);
        for (int r = 0; r < b; r++)
            tpk_attn_softmax_row(scratch + (size_t)r * nk, first + r, klo, nk, window);
        tpk_attn_weighted_sum(out + (size_t)t0 * out_stride, out_stride, scratch, v, b, klo, nk,
                              head_dim);
    }
}

void tpk_attention_group_one(float *out, const float *q, int heads, const float *k,
                             const float *v, int pos, int head_dim, int window, float scale,
                             float *scratch)
{
    int klo, nk;
    tpk_attn_block_keys(pos, 1, window, &klo, &nk);
    tpk_attn_scores(scratch, q, (size_t)head_dim, k, heads, klo, nk, head_dim, scale);
    for (int h = 0; h < heads; h++)
        tpk_attn_softmax_row(scratch + (size_t)h * nk, pos, klo, nk, window);
    tpk_attn_weighted_sum(out, (size_t)head_dim, scratch, v, heads, klo, nk, head_dim);
}

void tpk_silu_mul(float *gate, const float *up, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

void tpk_add_bias(float *y, const float *b, int n, int dim)
{
    for (int t = 0; t < n; t++) {
        float *r = y + (size_t)t * dim;
        for (int i = 0; i < dim; i++)
            r[i] += b[i];
    }
}

void tpk_matmul(float *y, const float *x, const float *w, const float *bias, int n, int in, int out)
{
    if (n == 1)
        cblas_sgemv(CblasRowMajor, CblasNoTrans, out, in, 1.0f, w, in, x, 1, 0.0f, y, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, x, in, w, in,
                    0.0f, y, out);
    if (bias)
        tpk_add_bias(y, bias, n, out);
}

void tpk_to_f32(float *dst, const void *src, tp_dtype dt, size_t count)
{
    if (dt == TP_F32) {
        memcpy(dst, src, count * sizeof(float));
    } else if (dt == TP_BF16) {
        /* bf16 is the top half of an fp32: exact. */
        const uint16_t *s = src;
        uint32_t *d = (uint32_t *)dst;
        for (size_t i = 0; i < count; i++)
            d[i] = (uint32_t)s[i] << 16;
    } else if (dt == TP_F16) {
        const uint16_t *s = src;
        for (size_t i = 0; i < count; i++)
            dst[i] = tp_f16_to_f32(s[i]);
    }
}

/* Whether expert a ranks before b: larger probability, then lower index. */
static bool router_before(const float *p, int a, int b)
{
    return p[a] > p[b] || (p[a] == p[b] && a < b);
}

void tpk_router_topk(const float *logits, int n_experts, int k, bool renorm, int *idx, float *weight)
{
    float mx = logits[0];
    for (int e = 1; e < n_experts; e++)
        mx = logits[e] > mx ? logits[e] : mx;
    /* softmax, unnormalised first: the top k by exp(l - max) is the top k by p */
    float sum = 0.0f;
    float p[n_experts];
    for (int e = 0; e < n_experts; e++) {
        p[e] = expf(logits[e] - mx);
        sum += p[e];
    }
    for (int e = 0; e < n_experts; e++)
        p[e] /= sum;
    /* insertion into a sorted top-k list: k is small (2..8) */
    int n = 0;
    for (int e = 0; e < n_experts; e++) {
        if (n == k && !router_before(p, e, idx[k - 1]))
            continue;
        int j = n < k ? n++ : k - 1;
        while (j > 0 && router_before(p, e, idx[j - 1])) {
            idx[j] = idx[j - 1];
            j--;
        }
        idx[j] = e;
    }
    float total = 0.0f;
    for (int j = 0; j < k; j++) {
        weight[j] = p[idx[j]];
        total += weight[j];
    }
    if (renorm)
        for (int j = 0; j < k; j++)
            weight[j] /= total;
}
