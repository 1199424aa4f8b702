/* test_shardmath.c - how tensors are cut: colwise / rowwise / packed_colwise
 * ranges, uneven vocabulary rows, rowwise bias kept whole with reduce_bias,
 * key/value heads replicated when fewer than the ranks (kv=2 tp=4, kv=1
 * tp=8), refusals with the numbers in the message (kv=3 tp=4, heads not
 * divisible, intermediate not divisible), shape checks against config.json,
 * and config.json parsing. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "convert.h"
#include "check.h"

static tp_model_info model(int64_t hidden, int64_t heads, int64_t kv, int64_t head_dim,
                           int64_t inter, int64_t vocab)
{
    tp_model_info mi = {.hidden = hidden, .n_heads = heads, .n_kv_heads = kv, .head_dim = head_dim,
                        .intermediate = inter, .vocab = vocab, .n_layers = 4};
    strcpy(mi.model_type, "llama");
    return mi;
}

static int cut2(tp_cut *c, const tp_model_info *mi, const char *name, uint64_t d0, uint64_t d1,
                tp_style st, int tp, tp_err *err)
{
    uint64_t shape[2] = {d0, d1};
    return tp_cut_make(c, mi, name, TP_BF16, d1 ? 2 : 1, shape, st, tp, err);
}

/* rank r holds [s, e) along dim */
static void expect_range(const tp_cut *c, int r, int dim, uint64_t s, uint64_t e)
{
    const tp_split *sp = &c->splits[r];
    CHECK(sp->dim == dim && sp->n_ranges == 1 && sp->start[0] == s && sp->end[0] == e,
          "%s rank %d: dim %d [%" PRIu64 ", %" PRIu64 ") x%d, want dim %d [%" PRIu64 ", %" PRIu64 ")",
          c->name, r, sp->dim, sp->start[0], sp->end[0], sp->n_ranges, dim, s, e);
}

static void test_split_range(void)
{
    uint64_t s, e;
    CHECK(tp_split_range(12, 4, 3, false, &s, &e) == 0 && s == 9 && e == 12, "even");
    CHECK(tp_split_range(10, 4, 0, false, &s, &e) < 0, "10 over 4 is not even");
    /* torch.chunk: ceil(10/4) = 3 -> 3,3,3,1 */
    CHECK(tp_split_range(10, 4, 2, true, &s, &e) == 0 && s == 6 && e == 9, "uneven rank 2");
    CHECK(tp_split_range(10, 4, 3, true, &s, &e) == 0 && s == 9 && e == 10, "uneven last");
    /* 9 over 4: 3,3,3,0 -> the last rank would be empty */
    CHECK(tp_split_range(9, 4, 3, true, &s, &e) < 0, "empty rank must be refused");
    CHECK(tp_split_range(9, 4, 4, true, &s, &e) < 0, "rank out of range");
}

static void test_colwise_rowwise(void)
{
    tp_model_info mi = model(64, 4, 4, 16, 128, 512);
    tp_err err = {{0}};
    tp_cut c;
    CHECK(cut2(&c, &mi, "model.layers.0.self_attn.q_proj.weight", 64, 64, TP_STYLE_COLWISE, 4, &err) == 0,
          "%s", err.msg);
    for (int r = 0; r < 4; r++) {
        expect_range(&c, r, 0, 16u * r, 16u * (r + 1));
        CHECK(c.local_shapes[r * TP_MAX_DIMS] == 16 && c.local_shapes[r * TP_MAX_DIMS + 1] == 64, "q local shape");
        CHECK(c.rank_bytes[r] == 16 * 64 * 2, "q bytes %" PRIu64, c.rank_bytes[r]);
    }
    CHECK(!c.reduce_bias, "no reduce on colwise");
    tp_cut_free(&c);

    CHECK(cut2(&c, &mi, "model.layers.0.self_attn.q_proj.bias", 64, 0, TP_STYLE_COLWISE, 2, &err) == 0, "%s", err.msg);
    expect_range(&c, 1, 0, 32, 64);
    tp_cut_free(&c);

    /* rowwise: the weight's dim 1 */
    CHECK(cut2(&c, &mi, "model.layers.1.mlp.down_proj.weight", 64, 128, TP_STYLE_ROWWISE, 4, &err) == 0, "%s", err.msg);
    for (int r = 0; r < 4; r++)
        expect_range(&c, r, 1, 32u * r, 32u * (r + 1));
    CHECK(c.local_shapes[3 * TP_MAX_DIMS] == 64 && c.local_shapes[3 * TP_MAX_DIMS + 1] == 32, "down local");
    tp_cut_free(&c);
    CHECK(cut2(&c, &mi, "model.layers.1.self_attn.o_proj.weight", 64, 64, TP_STYLE_ROWWISE, 2, &err) == 0, "%s", err.msg);
    expect_range(&c, 1, 1, 32, 64);
    tp_cut_free(&c);

    /* rowwise bias: whole on every rank, reduce_bias */
    CHECK(cut2(&c, &mi, "model.layers.1.self_attn.o_proj.bias", 64, 0, TP_STYLE_ROWWISE, 4, &err) == 0, "%s", err.msg);
    CHECK(c.dim == -1 && c.reduce_bias, "rowwise bias: dim %d reduce %d", c.dim, c.reduce_bias);
    for (int r = 0; r < 4; r++)
        CHECK(c.splits[r].dim == -1 && c.local_shapes[r * TP_MAX_DIMS] == 64 && c.rank_bytes[r] == 128,
              "rowwise bias whole on rank %d", r);
    tp_cut_free(&c);

    /* replicate */
    CHECK(cut2(&c, &mi, "model.norm.weight", 64, 0, TP_STYLE_REPLICATE, 4, &err) == 0, "%s", err.msg);
    CHECK(c.dim == -1 && !c.reduce_bias && c.rank_bytes[3] == 128, "replicated norm");
    tp_cut_free(&c);

    /* tp=1: one range covering everything */
    CHECK(cut2(&c, &mi, "model.layers.0.mlp.up_proj.weight", 128, 64, TP_STYLE_COLWISE, 1, &err) == 0, "%s", err.msg);
    expect_range(&c, 0, 0, 0, 128);
    tp_cut_free(&c);
}

static void test_packed(void)
{
    tp_model_info mi = model(64, 4, 4, 16, 128, 512);
    tp_err err = {{0}};
    tp_cut c;
    /* fused gate_up [2*I, H]: blocks [0,128) and [128,256); rank r of 4 gets
     * [32r, 32r+32) and [128+32r, 128+32r+32) */
    CHECK(cut2(&c, &mi, "model.layers.0.mlp.gate_up_proj.weight", 256, 64, TP_STYLE_PACKED_COLWISE, 4,
               &err) == 0, "%s", err.msg);
    for (int r = 0; r < 4; r++) {
        const tp_split *sp = &c.splits[r];
        CHECK(sp->dim == 0 && sp->n_ranges == 2 && sp->start[0] == 32u * r && sp->end[0] == 32u * r + 32 &&
              sp->start[1] == 128 + 32u * r && sp->end[1] == 128 + 32u * r + 32,
              "packed rank %d: [%" PRIu64 ",%" PRIu64 ") [%" PRIu64 ",%" PRIu64 ")", r, sp->start[0],
              sp->end[0], sp->start[1], sp->end[1]);
        CHECK(c.local_shapes[r * TP_MAX_DIMS] == 64, "packed local rows");
    }
    tp_cut_free(&c);
    /* its bias is cut like the weight rows */
    CHECK(cut2(&c, &mi, "model.layers.0.mlp.gate_up_proj.bias", 256, 0, TP_STYLE_PACKED_COLWISE, 2,
               &err) == 0, "%s", err.msg);
    CHECK(c.splits[1].n_ranges == 2 && c.splits[1].start[0] == 64 && c.splits[1].start[1] == 192,
          "packed bias");
    tp_cut_free(&c);
    /* intermediate 128 over tp=3 */
    CHECK(cut2(&c, &mi, "model.layers.0.mlp.gate_up_proj.weight", 256, 64, TP_STYLE_PACKED_COLWISE, 3,
               &err) < 0, "packed 128 over 3 accepted");
    CHECK(strstr(err.msg, "intermediate_size=128") && strstr(err.msg, "tp=3"), "%s", err.msg);
    /* packed on q_proj rows (heads, not blocks) is refused */
    CHECK(cut2(&c, &mi, "model.layers.0.self_attn.q_proj.weight", 64, 64, TP_STYLE_PACKED_COLWISE, 2,
               &err) < 0, "packed q_proj accepted");
}

static void test_vocab(void)
{
    tp_model_info mi = model(64, 4, 4, 16, 128, 509);
    tp_err err = {{0}};
    tp_cut c;
    /* 509 over 4: ceil = 128 -> 128, 128, 128, 125 */
    CHECK(cut2(&c, &mi, "lm_head.weight", 509, 64, TP_STYLE_COLWISE_GATHER, 4, &err) == 0, "%s", err.msg);
    for (int r = 0; r < 3; r++)
        expect_range(&c, r, 0, 128u * r, 128u * (r + 1));
    expect_range(&c, 3, 0, 384, 509);
    CHECK(c.local_shapes[3 * TP_MAX_DIMS] == 125 && c.rank_bytes[3] == 125 * 64 * 2, "last rank shorter");
    tp_cut_free(&c);
    CHECK(cut2(&c, &mi, "model.embed_tokens.weight", 509, 64, TP_STYLE_VOCAB, 8, &err) == 0, "%s", err.msg);
    expect_range(&c, 7, 0, 448, 509); /* ceil(509/8) = 64 */
    tp_cut_free(&c);
    /* a vocabulary so small a rank would be empty */
    tp_model_info small = model(64, 4, 4, 16, 128, 9);
    CHECK(cut2(&c, &small, "lm_head.weight", 9, 64, TP_STYLE_COLWISE_GATHER, 4, &err) < 0, "empty rank");
    CHECK(strstr(err.msg, "lm_head.weight") && strstr(err.msg, "rank 3"), "%s", err.msg);
    /* uneven is only for vocabulary rows: up_proj rows must divide */
    tp_model_info odd = model(64, 4, 4, 16, 130, 512);
    CHECK(cut2(&c, &odd, "model.layers.0.mlp.up_proj.weight", 130, 64, TP_STYLE_COLWISE, 4, &err) < 0, "odd inter");
    CHECK(strstr(err.msg, "intermediate_size=130") && strstr(err.msg, "tp=4") &&
          strstr(err.msg, "model.layers.0.mlp.up_proj.weight"), "%s", err.msg);
}

static void test_kv(void)
{
    tp_err err = {{0}};
    tp_cut c;
    /* kv=2, tp=4, head_dim 16: ranks 0,1 hold kv head 0, ranks 2,3 kv head 1 */
    tp_model_info mi = model(64, 4, 2, 16, 128, 512);
    CHECK(cut2(&c, &mi, "model.layers.0.self_attn.k_proj.weight", 32, 64, TP_STYLE_COLWISE, 4, &err) == 0,
          "%s", err.msg);
    expect_range(&c, 0, 0, 0, 16);
    expect_range(&c, 1, 0, 0, 16);
    expect_range(&c, 2, 0, 16, 32);
    expect_range(&c, 3, 0, 16, 32);
    CHECK(c.local_shapes[2 * TP_MAX_DIMS] == 16, "kv local rows");
    tp_cut_free(&c);
    /* and its bias the same */
    CHECK(cut2(&c, &mi, "model.layers.0.self_attn.v_proj.bias", 32, 0, TP_STYLE_COLWISE, 4, &err) == 0, "%s", err.msg);
    expect_range(&c, 3, 0, 16, 32);
    tp_cut_free(&c);
    /* kv=2, tp=2: a plain split */
    CHECK(cut2(&c, &mi, "model.layers.0.self_attn.v_proj.weight", 32, 64, TP_STYLE_COLWISE, 2, &err) == 0, "%s", err.msg);
    expect_range(&c, 1, 0, 16, 32);
    tp_cut_free(&c);

    /* kv=1, tp=8 (8 heads of 8): every rank holds the one kv head */
    tp_model_info mq = model(64, 8, 1, 8, 128, 512);
    CHECK(cut2(&c, &mq, "model.layers.3.self_attn.k_proj.weight", 8, 64, TP_STYLE_COLWISE, 8, &err) == 0, "%s", err.msg);
    for (int r = 0; r < 8; r++)
        expect_range(&c, r, 0, 0, 8);
    tp_cut_free(&c);
    /* q heads still split: rank 5 holds head 5 */
    CHECK(cut2(&c, &mq, "model.layers.3.self_attn.q_proj.weight", 64, 64, TP_STYLE_COLWISE, 8, &err) == 0, "%s", err.msg);
    expect_range(&c, 5, 0, 40, 48);
    tp_cut_free(&c);

    /* kv=3, tp=4: refused with the numbers */
    tp_model_info m3 = model(96, 12, 3, 8, 128, 512);
    CHECK(cut2(&c, &m3, "model.layers.0.self_attn.k_proj.weight", 24, 96, TP_STYLE_COLWISE, 4, &err) < 0,
          "kv=3 tp=4 accepted");
    CHECK(strstr(err.msg, "num_key_value_heads=3 cannot be split over tp=4") &&
          strstr(err.msg, "model.layers.0.self_attn.k_proj.weight"), "%s", err.msg);
    /* kv=4, tp=8 with 8 heads... tp % kv == 0 -> replicated pairs */
    tp_model_info m4 = model(64, 8, 4, 8, 128, 512);
    CHECK(cut2(&c, &m4, "model.layers.0.self_attn.k_proj.weight", 32, 64, TP_STYLE_COLWISE, 8, &err) == 0, "%s", err.msg);
    expect_range(&c, 5, 0, 16, 24); /* rank 5 -> kv head 5 / 2 = 2 */
    tp_cut_free(&c);
}

static void test_refusals(void)
{
    tp_err err = {{0}};
    tp_cut c;
    tp_model_info mi = model(64, 4, 2, 16, 128, 512);
    /* heads 4 over tp 3 */
    CHECK(cut2(&c, &mi, "model.layers.0.self_attn.q_proj.weight", 64, 64, TP_STYLE_COLWISE, 3, &err) < 0, "tp 3");
    CHECK(strstr(err.msg, "num_attention_heads=4 cannot be split over tp=3") &&
          strstr(err.msg, "q_proj.weight"), "%s", err.msg);
    CHECK(cut2(&c, &mi, "model.layers.0.self_attn.o_proj.weight", 64, 64, TP_STYLE_ROWWISE, 8, &err) < 0, "o tp 8");
    CHECK(strstr(err.msg, "num_attention_heads=4") && strstr(err.msg, "tp=8"), "%s", err.msg);
    /* shape mismatches name the tensor */
    CHECK(cut2(&c, &mi, "model.layers.0.self_attn.q_proj.weight", 48, 64, TP_STYLE_COLWISE, 2, &err) < 0, "q rows");
    CHECK(strstr(err.msg, "model.layers.0.self_attn.q_proj.weight") && strstr(err.msg, "[48, 64]") &&
          strstr(err.msg, "[64, 64]"), "%s", err.msg);
    CHECK(cut2(&c, &mi, "model.layers.0.self_attn.k_proj.weight", 64, 64, TP_STYLE_COLWISE, 2, &err) < 0, "k rows");
    CHECK(strstr(err.msg, "k_proj.weight") && strstr(err.msg, "num_key_value_heads"), "%s", err.msg);
    CHECK(cut2(&c, &mi, "model.layers.0.mlp.down_proj.weight", 128, 64, TP_STYLE_ROWWISE, 2, &err) < 0, "down transposed");
    CHECK(cut2(&c, &mi, "model.layers.9.mlp.up_proj.weight", 128, 64, TP_STYLE_COLWISE, 2, &err) < 0, "layer 9 of 4");
    CHECK(strstr(err.msg, "layer 9"), "%s", err.msg);
    CHECK(cut2(&c, &mi, "model.norm.weight", 65, 0, TP_STYLE_REPLICATE, 2, &err) < 0, "norm size");
    CHECK(cut2(&c, &mi, "model.embed_tokens.weight", 511, 64, TP_STYLE_REPLICATE, 2, &err) < 0, "vocab rows");
    CHECK(strstr(err.msg, "vocab_size"), "%s", err.msg);
    /* an unknown tensor is cut generically: even split required */
    CHECK(cut2(&c, &mi, "model.extra.weight", 10, 4, TP_STYLE_COLWISE, 4, &err) < 0, "10 over 4");
    CHECK(strstr(err.msg, "model.extra.weight"), "%s", err.msg);
    CHECK(cut2(&c, &mi, "model.extra.weight", 12, 4, TP_STYLE_COLWISE, 4, &err) == 0, "%s", err.msg);
    expect_range(&c, 3, 0, 9, 12);
    tp_cut_free(&c);
}

static void test_config(void)
{
    tp_model_info mi;
    tp_err err = {{0}};
    const char *q2 = "{\"model_type\": \"qwen2\", \"hidden_size\": 64, \"num_attention_heads\": 4, "
                     "\"num_key_value_heads\": 2, \"intermediate_size\": 128, \"vocab_size\": 512, "
                     "\"num_hidden_layers\": 2, \"tie_word_embeddings\": false}";
    CHECK(tp_model_info_parse(q2, strlen(q2), "c.json", &mi, &err) == 0, "%s", err.msg);
    CHECK(mi.head_dim == 16 && mi.n_kv_heads == 2 && !mi.tie_word_embeddings && !strcmp(mi.model_type, "qwen2"),
          "qwen2 head_dim default");
    const char *q3 = "{\"model_type\": \"qwen3\", \"hidden_size\": 64, \"num_attention_heads\": 4, "
                     "\"head_dim\": 32, \"intermediate_size\": 128, \"vocab_size\": 512, "
                     "\"num_hidden_layers\": 2, \"tie_word_embeddings\": true, \"num_key_value_heads\": null}";
    CHECK(tp_model_info_parse(q3, strlen(q3), "c.json", &mi, &err) == 0, "%s", err.msg);
    CHECK(mi.head_dim == 32 && mi.n_kv_heads == 4 && mi.tie_word_embeddings, "explicit head_dim, kv default");
    static const char *bad[] = {
        "[]", "{\"model_type\": 3}", "{\"model_type\": \"llama\"}",
        "{\"model_type\": \"llama\", \"hidden_size\": -64, \"num_attention_heads\": 4, \"intermediate_size\": 1, "
        "\"vocab_size\": 1, \"num_hidden_layers\": 1}",
        "{\"model_type\": \"llama\", \"hidden_size\": 64.5, \"num_attention_heads\": 4, \"intermediate_size\": 1, "
        "\"vocab_size\": 1, \"num_hidden_layers\": 1}",
        "{\"model_type\": \"llama\", \"hidden_size\": 64, \"num_attention_heads\": 4, \"num_key_value_heads\": 3, "
        "\"intermediate_size\": 1, \"vocab_size\": 1, \"num_hidden_layers\": 1}",
        "{\"model_type\": \"llama\", \"hidden_size\": 64, \"num_attention_heads\": \"4\", \"intermediate_size\": 1, "
        "\"vocab_size\": 1, \"num_hidden_layers\": 1}",
        "{\"model_type\": \"llama\", \"hidden_size\": 66, \"num_attention_heads\": 4, \"intermediate_size\": 1, "
        "\"vocab_size\": 1, \"num_hidden_layers\": 1}",
        "{\"model_type\": \"llama\", \"hidden_size\": 64, \"num_attention_heads\": 4, \"intermediate_size\": 1, "
        "\"vocab_size\": 1, \"num_hidden_layers\": 1, \"tie_word_embeddings\": \"yes\"}",
        "{\"model_type\"",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err.msg[0] = 0;
        CHECK(tp_model_info_parse(bad[i], strlen(bad[i]), "c.json", &mi, &err) < 0, "accepted bad config %zu", i);
        CHECK(strstr(err.msg, "c.json") != NULL, "config %zu: message must name the file: %s", i, err.msg);
    }
}

int main(void)
{
    test_split_range();
    test_colwise_rowwise();
    test_packed();
    test_vocab();
    test_kv();
    test_refusals();
    test_config();
    return check_finish("test_shardmath");
}
