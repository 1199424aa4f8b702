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

void tpk_rope_inv_freq(float *inv_freq, int head_dim, const tpk_rope_params *p)
{
    int half = head_dim / 2;
    for (int i = 0; i < half; i++) {
        /* torch: base ** (arange(0, dim, 2).float() / dim), in fp32 */
        float expo = (float)(2 * i) / (float)head_dim;
        float f = 1.0f / powf(p->theta, expo);
        if (p->llama3) {
            /* _compute_llama3_parameters: wavelengths longer than
             * old_context/low_freq_factor are divided by factor, shorter than
             * old_context/high_freq_factor kept, in between interpolated. */
            float old_ctx = (float)p->original_max_position;
            float low_wl = old_ctx / p->low_freq_factor;
            float high_wl = old_ctx / p->high_freq_factor;
            float wavelen = (float)(2.0 * M_PI) / f;
            float scaled = wavelen > low_wl ? f / p->factor : f;
            if (!(wavelen < high_wl) && !(wavelen > low_wl)) {
                float smooth = (old_ctx / wavelen - p->low_freq_factor) /
                               (p->high_freq_factor - p->low_freq_factor);
                scaled = (1.0f - smooth) * scaled / p->factor + smooth * scaled;
            }
            f = scaled;
        }
        inv_freq[i] = f;
    }
}

void tpk_rope_table(float *cos_t, float *sin_t, const float *inv_freq, int head_dim, int n_pos)
{
    int half = head_dim / 2;
    for (int p = 0; p < n_pos; p++)
        for (int i = 0; i < half; i++) {
            float angle = (float)p * inv_freq[i];   /* fp32 product, as HF */
            cos_t[(size_t)p * half + i] = (float)cos((double)angle);
            sin_t[(size_t)p * half + i] = (float)sin((double)angle);
        }
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
