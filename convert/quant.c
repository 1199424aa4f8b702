/* quant.c - quantized weights and their scales (FORMAT.md 1.5): names,
 * shapes, how a rank's scale slice follows its weight slice, exact widening
 * of the scales a checkpoint ships, and the --quantize quantizers.
 *
 * The FP8 quantizer is transformers 5.24's Fp8Quantize (integrations/
 * finegrained_fp8.py), which is how FP8 checkpoints are made from bf16 ones:
 * per block, scale = 448 / amax in fp32 (1 for an all-zero block; torch
 * evaluates a float divided by a tensor as reciprocal(amax) * 448), the
 * weight multiplied by it, clamped to +-448 and rounded to e4m3, and the
 * stored weight_scale_inv = 1 / scale.  transformers leaves a weight whose
 * shape the block does not divide in bf16; we quantize it with partial edge
 * blocks (amax over the elements the block has), the layout the format and
 * Qwen's releases already use for such shapes.
 */
#include "convert.h"
#include "json_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define FP8_MAX 448.0f
#define INT8_MAX_Q 127.0f

const char *tp_quant_scale_suffix(tp_quant q)
{
    return q == TP_QUANT_FP8_BLOCK ? "weight_scale_inv" : q == TP_QUANT_INT8_ROW ? "weight_scale" : NULL;
}

const char *tp_quant_method(tp_quant q)
{
    return q == TP_QUANT_FP8_BLOCK ? "fp8" : q == TP_QUANT_INT8_ROW ? "tpshard_int8" : NULL;
}

tp_dtype tp_quant_dtype(tp_quant q)
{
    return q == TP_QUANT_FP8_BLOCK ? TP_F8_E4M3 : q == TP_QUANT_INT8_ROW ? TP_I8 : TP_DTYPE_INVALID;
}

bool tp_quant_scale_name(tp_quant q, const char *weight_name, char *buf, size_t cap)
{
    const char *suffix = tp_quant_scale_suffix(q);
    size_t n = strlen(weight_name);
    if (!suffix || n < 7 || strcmp(weight_name + n - 7, ".weight"))
        return false;
    int w = snprintf(buf, cap, "%.*s.%s", (int)(n - 7), weight_name, suffix);
    return w > 0 && (size_t)w < cap;
}

const char *tp_quant_scale_weight(const char *scale_name, char *weight, size_t cap)
{
    static const char *const suffixes[] = {"weight_scale_inv", "weight_scale"};
    size_t n = strlen(scale_name);
    for (size_t i = 0; i < 2; i++) {
        size_t k = strlen(suffixes[i]);
        if (n > k + 1 && scale_name[n - k - 1] == '.' && !strcmp(scale_name + n - k, suffixes[i]) &&
            n - k + 6 < cap) {
            snprintf(weight, cap, "%.*sweight", (int)(n - k), scale_name);
            return suffixes[i];
        }
    }
    return NULL;
}

static uint64_t ceil_div(uint64_t a, uint64_t b)
{
    return a / b + (a % b != 0);
}

int tp_quant_scale_shape(tp_quant q, const int block[2], const uint64_t *weight_shape, uint64_t *out)
{
    if (q == TP_QUANT_INT8_ROW) {
        out[0] = weight_shape[0];
        return 1;
    }
    out[0] = ceil_div(weight_shape[0], (uint64_t)block[0]);
    out[1] = ceil_div(weight_shape[1], (uint64_t)block[1]);
    return 2;
}

void tp_quant_scale_split(tp_quant q, const int block[2], const tp_split *w, tp_split *out)
{
    memset(out, 0, sizeof *out);
    out->dim = -1;
    if (w->dim < 0 || (q == TP_QUANT_INT8_ROW && w->dim != 0))
        return;   /* whole weight, or int8 cut by columns: every row's scale */
    out->dim = w->dim;
    out->n_ranges = w->n_ranges;
    uint64_t b = q == TP_QUANT_INT8_ROW ? 1 : (uint64_t)block[w->dim];
    for (int k = 0; k < w->n_ranges; k++) {
        out->start[k] = w->start[k] / b;
        out->end[k] = ceil_div(w->end[k], b);
    }
}

float tp_elem_to_f32(tp_dtype dt, const uint8_t *data, size_t i)
{
    uint16_t h;
    float f;
    switch (dt) {
    case TP_BF16: memcpy(&h, data + 2 * i, 2); return tp_bf16_to_f32(h);
    case TP_F16: memcpy(&h, data + 2 * i, 2); return tp_f16_to_f32(h);
    case TP_F32: memcpy(&f, data + 4 * i, 4); return f;
    case TP_F8_E4M3: return tp_f8e4m3_to_f32(data[i]);
    case TP_I8: return (float)(int8_t)data[i];
    default: return NAN;
    }
}

int tp_quant_scales_to_f32(const char *name, tp_dtype dt, const uint8_t *data, size_t n, float *out,
                           tp_err *err)
{
    if (dt != TP_BF16 && dt != TP_F16 && dt != TP_F32)
        return tp_errorf(err, "tensor %s: dtype %s: a scale must be BF16, F16 or F32", name,
                       tp_dtype_name(dt));
    for (size_t i = 0; i < n; i++) {
        out[i] = tp_elem_to_f32(dt, data, i);
        if (!isfinite(out[i]) || !(out[i] > 0))
            return tp_errorf(err, "tensor %s: element %zu is %g; scales must be finite and > 0", name,
                           i, (double)out[i]);
    }
    return 0;
}

/* Row r of a [rows, cols] float weight into f32 (exact), non-finite
 * refused. */
static int row_to_f32(const char *name, tp_dtype dt, const uint8_t *w, uint64_t r, uint64_t cols,
                      float *out, tp_err *err)
{
    size_t base = (size_t)(r * cols);
    for (uint64_t c = 0; c < cols; c++) {
        out[c] = tp_elem_to_f32(dt, w, base + c);
        if (!isfinite(out[c]))
            return tp_errorf(err, "tensor %s: element [%llu, %llu] is not finite; it cannot be "
                           "quantized", name, (unsigned long long)r, (unsigned long long)c);
    }
    return 0;
}

int tp_quantize_fp8_block(const char *name, tp_dtype dt, const uint8_t *w, uint64_t rows,
                          uint64_t cols, const int block[2], uint8_t *q, float *scale_inv,
                          tp_err *err)
{
    const uint64_t b0 = (uint64_t)block[0], b1 = (uint64_t)block[1];
    const uint64_t bcols = ceil_div(cols, b1);
    size_t band_elems = (size_t)(b0 * cols);
    float *band = malloc(sizeof *band * (band_elems ? band_elems : 1));
    float *scale = malloc(sizeof *scale * (size_t)(bcols ? bcols : 1));
    if (!band || !scale) {
        free(band);
        free(scale);
        return tp_errorf(err, "tensor %s: out of memory", name);
    }
    int rc = 0;
    for (uint64_t r0 = 0; r0 < rows && rc == 0; r0 += b0) {
        uint64_t nr = rows - r0 < b0 ? rows - r0 : b0;
        for (uint64_t i = 0; i < nr && rc == 0; i++)
            rc = row_to_f32(name, dt, w, r0 + i, cols, band + i * cols, err);
        if (rc < 0)
            break;
        for (uint64_t bc = 0; bc < bcols; bc++) {
            uint64_t c0 = bc * b1, c1 = c0 + b1 < cols ? c0 + b1 : cols;
            float amax = 0;
            for (uint64_t i = 0; i < nr; i++)
                for (uint64_t c = c0; c < c1; c++)
                    amax = fmaxf(amax, fabsf(band[i * cols + c]));
            /* transformers writes 448 / amax, which torch evaluates as
             * reciprocal(amax) * 448: two fp32 roundings, kept here */
            scale[bc] = amax > 0 ? (1.0f / amax) * FP8_MAX : 1.0f;
            scale_inv[(r0 / b0) * bcols + bc] = 1.0f / scale[bc];
        }
        for (uint64_t i = 0; i < nr; i++)
            for (uint64_t c = 0; c < cols; c++) {
                float v = band[i * cols + c] * scale[c / b1];
                v = fminf(fmaxf(v, -FP8_MAX), FP8_MAX);   /* torch.clamp, then .to(e4m3) */
                q[(r0 + i) * cols + c] = tp_f32_to_f8e4m3(v);
            }
    }
    free(band);
    free(scale);
    return rc;
}

int tp_quantize_int8_row(const char *name, tp_dtype dt, const uint8_t *w, uint64_t rows,
                         uint64_t cols, int8_t *q, float *scale, tp_err *err)
{
    float *row = malloc(sizeof *row * (size_t)(cols ? cols : 1));
    if (!row)
        return tp_errorf(err, "tensor %s: out of memory", name);
    int rc = 0;
    for (uint64_t r = 0; r < rows && rc == 0; r++) {
        rc = row_to_f32(name, dt, w, r, cols, row, err);
        float amax = 0;
        for (uint64_t c = 0; rc == 0 && c < cols; c++)
            amax = fmaxf(amax, fabsf(row[c]));
        scale[r] = amax > 0 ? amax / INT8_MAX_Q : 1.0f;
        for (uint64_t c = 0; rc == 0 && c < cols; c++) {
            /* nearbyintf: the default rounding mode, to nearest even */
            float v = nearbyintf(row[c] / scale[r]);
            q[r * cols + c] = (int8_t)fminf(fmaxf(v, -INT8_MAX_Q), INT8_MAX_Q);
        }
    }
    free(row);
    return rc;
}

char *tp_quant_config_json(const char *config_json, size_t len, tp_quant q, bool quantize_lm_head,
                           size_t *out_len, tp_err *err)
{
    cJSON *root = tp_json_parse_config(config_json, len, "config.json", err);
    if (!root)
        return NULL;
    cJSON *qc = cJSON_CreateObject();
    cJSON *skip = cJSON_CreateArray();
    bool ok = qc && skip;
    if (ok && q == TP_QUANT_FP8_BLOCK) {
        /* the keys and order of Qwen3-*-FP8's config.json */
        cJSON *bs = cJSON_CreateArray();
        ok = cJSON_AddStringToObject(qc, "activation_scheme", "dynamic") &&
             cJSON_AddStringToObject(qc, "fmt", "e4m3") && bs &&
             cJSON_AddItemToArray(bs, cJSON_CreateNumber(128)) &&
             cJSON_AddItemToArray(bs, cJSON_CreateNumber(128));
        if (!ok)
            cJSON_Delete(bs);
        ok = ok && cJSON_AddStringToObject(qc, "quant_method", "fp8") &&
             cJSON_AddItemToObject(qc, "weight_block_size", bs);
    } else if (ok) {
        ok = cJSON_AddStringToObject(qc, "quant_method", tp_quant_method(q)) != NULL;
    }
    if (ok && !quantize_lm_head)
        ok = cJSON_AddItemToArray(skip, cJSON_CreateString("lm_head"));
    if (ok) {
        ok = cJSON_AddItemToObject(qc, "modules_to_not_convert", skip);
        skip = NULL;
    }
    cJSON_DeleteItemFromObjectCaseSensitive(root, "quantization_config");
    if (ok) {
        ok = cJSON_AddItemToObject(root, "quantization_config", qc);
        qc = NULL;
    }
    char *text = ok ? cJSON_Print(root) : NULL;
    cJSON_Delete(skip);
    cJSON_Delete(qc);
    cJSON_Delete(root);
    if (!text) {
        tp_errorf(err, "out of memory");
        return NULL;
    }
    *out_len = strlen(text);
    return text;
}

int tp_cut_make_scale(tp_cut *sc, const tp_model_info *mi, const tp_cut *w, const char *name,
                      tp_quant q, const int block[2], int ndim, const uint64_t *shape, float *data,
                      tp_err *err)
{
    /* made whole first, then given the weight's per-rank cover */
    if (tp_cut_make(sc, mi, name, TP_F32, ndim, shape, TP_STYLE_REPLICATE, w->tp, err) < 0)
        return -1;
    sc->style = w->style;
    sc->owner = w->owner;
    sc->dim = -1;
    for (int r = 0; r < w->tp; r++) {
        tp_split *sp = &sc->splits[r];
        uint64_t *ls = &sc->local_shapes[(size_t)r * TP_MAX_DIMS];
        if (w->owner >= 0 && r != w->owner) {
            *sp = w->splits[r];
            memset(ls, 0, sizeof(uint64_t) * (size_t)ndim);
            sc->rank_bytes[r] = 0;
            continue;
        }
        tp_quant_scale_split(q, block, &w->splits[r], sp);
        sc->dim = sp->dim;
        if (sp->dim < 0)
            continue;
        uint64_t held = 0;
        for (int k = 0; k < sp->n_ranges; k++) {
            for (int j = 0; j < k; j++)
                if (sp->start[k] < sp->end[j] && sp->start[j] < sp->end[k]) {
                    tp_cut_free(sc);
                    return tp_errorf(err, "tensor %s: rank %d's slices of dimension %d share a "
                                   "quantization block; this cut of a quantized weight is not "
                                   "supported", w->name, r, sp->dim);
                }
            held += sp->end[k] - sp->start[k];
        }
        ls[sp->dim] = held;
        size_t nb;
        if (!tp_tensor_nbytes(TP_F32, ls, ndim, &nb)) {
            tp_cut_free(sc);
            return tp_errorf(err, "tensor %s: size overflows", name);
        }
        sc->rank_bytes[r] = nb;
    }
    sc->owned_data = (uint8_t *)data;
    return 0;
}
