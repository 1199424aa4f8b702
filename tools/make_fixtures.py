#!/usr/bin/env python3
"""Writes the tiny reference models under tests/models/ (committed, so the
tests need no Python).  Regenerate with:

    python3 tools/make_fixtures.py            # all models
    python3 tools/make_fixtures.py llama-tiny # just one
    python3 tools/make_fixtures.py --rope-reference  # tests/test_kernels_cpu.c's RoPE numbers

Each tests/models/<name>/ holds a Hugging Face model directory made by the
real transformers config and *ForCausalLM classes (config.json,
generation_config.json, model.safetensors in bf16; qwen2-tiny is sharded
into model-0000k-of-0000n.safetensors + model.safetensors.index.json) and
reference.json:

    {
      "model": name, "torch": version, "transformers": version,
      "note": ...,
      "eos_ids": [...],                       # never produced below
      "prompts": [
        {"ids": [...],                        # random, seeded, within vocab
         "last_logits": [vocab floats],       # float32 forward, 6 significant digits
         "greedy": [16 ids],                  # greedy continuation, eos ignored
         "greedy_margins": [16 floats]},      # top1 - top2 logit at each step
        ...]
    }

The reference runs in float32 on the bf16-rounded weights (the saved model
loaded back with dtype=float32, eager attention), which is what the C runtime
computes after widening bf16 to fp32.  Weights, norm weights and biases are
all random and non-trivial (norms are not ones, biases not zeros), with a
larger init range than a real model so that greedy tokens are well
separated; tests should still treat a step whose margin is tiny as a near
tie.

config.json is written the way checkpoints on the Hub look (top-level
rope_theta and rope_scaling, "torch_dtype"), except for mistral-tiny, which
keeps the transformers>=5 spelling ("rope_parameters" with rope_theta inside,
"dtype"), so that config parsers are tested on both.
"""
import json
import math
import os
import shutil
import sys

import torch
import transformers
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, MixtralConfig,
                          MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "models")
N_NEW = 16
PROMPT_LENS = [5, 17, 40, 100]   # 100 > original_max_position_embeddings of llama-tiny
INIT_STD = 0.1

COMMON = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
              max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=INIT_STD,
              bos_token_id=1, eos_token_id=2, hidden_act="silu")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# name -> (config class, model class, extra config, legacy config.json, seed)
MODELS = {
    "qwen3-tiny": (Qwen3Config, Qwen3ForCausalLM,
                   dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        tie_word_embeddings=True, rope_theta=1000000.0,
                        use_sliding_window=False, sliding_window=None, max_window_layers=2),
                   True, 101),
    # kv heads 1 < tp for tp 2 and 4; head_dim 32 so q_proj is 128 x 64 (heads*head_dim != hidden,
    # as in the real Qwen3-0.6B).
    "qwen3-kv1": (Qwen3Config, Qwen3ForCausalLM,
                  dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                       tie_word_embeddings=True, rope_theta=1000000.0,
                       use_sliding_window=False, sliding_window=None, max_window_layers=2),
                  True, 102),
    "qwen2-tiny": (Qwen2Config, Qwen2ForCausalLM,
                   dict(num_attention_heads=4, num_key_value_heads=2,
                        tie_word_embeddings=False, rope_theta=1000000.0,
                        use_sliding_window=False, sliding_window=None, max_window_layers=2),
                   True, 103),
    "llama-tiny": (LlamaConfig, LlamaForCausalLM,
                   dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        tie_word_embeddings=False, rope_theta=10000.0,
                        rope_scaling=dict(LLAMA3_ROPE)),
                   True, 104),
    # o_proj and down_proj biases: a rowwise layer's bias must be added once.
    "llama-bias": (LlamaConfig, LlamaForCausalLM,
                   dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        tie_word_embeddings=False, rope_theta=10000.0,
                        attention_bias=True, mlp_bias=True),
                   True, 105),
    "mistral-tiny": (MistralConfig, MistralForCausalLM,
                     dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          tie_word_embeddings=False, rope_theta=10000.0, sliding_window=None),
                     False, 106),
    # The RoPE variants (issue 9).  Linear: the older "type" key.
    "llama-linear": (LlamaConfig, LlamaForCausalLM,
                     dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          tie_word_embeddings=False, rope_theta=10000.0,
                          rope_scaling={"type": "linear", "factor": 4.0}),
                     True, 107),
    # yarn as Qwen3 ships it for long contexts: factor 4 over 64 positions
    # (the 100-token prompt is past it), attention factor 0.1 ln 4 + 1.
    "qwen3-yarn": (Qwen3Config, Qwen3ForCausalLM,
                   dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        tie_word_embeddings=True, rope_theta=1000000.0,
                        use_sliding_window=False, sliding_window=None, max_window_layers=2,
                        rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 64}),
                   True, 108),
    # dynamic NTK scales past max_position_embeddings = 16: every prompt but
    # the 5-token one starts past it, that one crosses it while generating.
    # transformers 5 spelling (rope_parameters).
    "llama-dynamic": (LlamaConfig, LlamaForCausalLM,
                      dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=16,
                           rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
                      False, 109),
    # longrope: short_factor up to 16 positions, long_factor past them;
    # factor = 256 / 16, attention factor sqrt(1 + ln 16 / ln 16).
    "llama-longrope": (LlamaConfig, LlamaForCausalLM,
                       dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            tie_word_embeddings=False, rope_theta=10000.0,
                            rope_scaling={"rope_type": "longrope",
                                          "short_factor": [1.0, 1.1, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0],
                                          "long_factor": [1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0],
                                          "original_max_position_embeddings": 16}),
                       True, 110),
    # config.json without head_dim: Qwen3Config's default is 128 (not
    # hidden / heads = 16), so q_proj is 512 x 64.
    "qwen3-nohd": (Qwen3Config, Qwen3ForCausalLM,
                   dict(num_attention_heads=4, num_key_value_heads=2,
                        tie_word_embeddings=True, rope_theta=1000000.0,
                        use_sliding_window=False, sliding_window=None, max_window_layers=2),
                   True, 111),
    # The source of the quantized fixtures (issue 11): hidden 256 and
    # q/k/v/o 256 / 128 wide, so that 128 x 128 blocks are real, and
    # intermediate 384, so that tp 4's slice (96 rows) starts and ends inside
    # blocks.  kv heads 2: at tp 4 each kv head is on two ranks.
    "qwen3-q256": (Qwen3Config, Qwen3ForCausalLM,
                   dict(hidden_size=256, intermediate_size=384, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                        rope_theta=1000000.0, use_sliding_window=False, sliding_window=None,
                        max_window_layers=2),
                   True, 112),
}

# Keys removed from the Hub-style config.json (transformers writes them all).
LEGACY_DROP = {"qwen3-nohd": ["head_dim"]}

# The rope types whose frequencies follow the length of each forward pass
# (transformers' dynamic_rope_update): their reference comes from generate()
# with the KV cache, see make().
PER_PASS_ROPE = ("dynamic", "longrope")


# Keys patched into the Hub-style config.json.  Qwen2.5 checkpoints carry a
# sliding_window with use_sliding_window false: the window must be ignored.
# 32 is shorter than the 40- and 100-token prompts, so a runtime that applied
# it would get other logits.
LEGACY_EXTRA = {"qwen2-tiny": {"sliding_window": 32}}


def randomize_(model, gen):
    """Every parameter gets random values: matrices N(0, INIT_STD^2), norm
    weights uniform in [0.5, 1.5] (the final norm in [2, 4]), biases
    N(0, 0.1^2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "model.norm.weight":
                # Larger, so that logits spread out (std ~3) and greedy
                # tokens are well separated; the layers keep their balance.
                p.copy_(2.0 + 2.0 * torch.rand(p.shape, generator=gen))
            elif name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(INIT_STD * torch.randn(p.shape, generator=gen))


def legacy_config(path, rope_theta, rope_scaling, extra, drop=()):
    """Rewrites config.json the way Hub checkpoints spell it."""
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(extra)
    for k in drop:
        cfg.pop(k)
    cfg.pop("rope_parameters", None)
    cfg.pop("layer_types", None)    # transformers>=5 only; derived from the rest
    cfg["rope_theta"] = rope_theta
    cfg["rope_scaling"] = rope_scaling
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def patch_json(path, **kv):
    with open(path) as f:
        obj = json.load(f)
    obj.update(kv)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def sig6(x):
    return float(f"{x:.6g}")


def greedy(model, ids):
    """Greedy continuation by full re-forward each step (no cache, no eos),
    with the top1 - top2 margin of every step."""
    seq = list(ids)
    out, margins = [], []
    with torch.no_grad():
        for _ in range(N_NEW):
            logits = model(torch.tensor([seq])).logits[0, -1]
            top = torch.topk(logits, 2)
            tok = int(top.indices[0])
            out.append(tok)
            margins.append(sig6(float(top.values[0] - top.values[1])))
            seq.append(tok)
    return out, margins


def greedy_cached(model, ids):
    """Greedy continuation as generate() makes it: the prompt in one pass,
    then one token per pass with the KV cache (eos ignored), with the
    top1 - top2 margin of every step.  For dynamic and longrope this is
    not the same as re-running the whole sequence: at each pass
    dynamic_rope_update recomputes inv_freq for that pass's length
    (max(position_ids) + 1) and rotates only the new queries and keys with
    it; the keys already in the cache keep the rotation of the pass that
    wrote them."""
    g = model.generate(torch.tensor([ids]), max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                       do_sample=False, eos_token_id=None, pad_token_id=0, num_beams=1,
                       output_logits=True, return_dict_in_generate=True)
    out = g.sequences[0, len(ids):].tolist()
    margins = []
    for step, logits in enumerate(g.logits):
        top = torch.topk(logits[0].float(), 2)
        assert int(top.indices[0]) == out[step]
        margins.append(sig6(float(top.values[0] - top.values[1])))
    return out, margins


def load_reference(out_dir):
    """The saved bf16 weights, loaded back in float32 (eager attention)."""
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    return model


def make(name):
    cfg_cls, model_cls, extra, legacy, seed = MODELS[name]
    out_dir = os.path.join(ROOT, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)

    rope_scaling = extra.pop("rope_scaling", None)
    rope_theta = extra.pop("rope_theta")
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope = dict(rope_scaling, rope_theta=rope_theta)
    config = cfg_cls(**dict(COMMON, **extra), rope_parameters=rope)
    torch.manual_seed(seed)
    model = model_cls(config)
    gen = torch.Generator().manual_seed(seed)
    randomize_(model, gen)
    model = model.to(torch.bfloat16)
    # qwen2-tiny is saved in two shards with model.safetensors.index.json,
    # as large checkpoints are.
    model.save_pretrained(out_dir, max_shard_size="150KB" if name == "qwen2-tiny" else "50GB")
    for fn in os.listdir(out_dir):
        os.chmod(os.path.join(out_dir, fn), 0o644)
    cfg_path = os.path.join(out_dir, "config.json")
    if legacy:
        legacy_config(cfg_path, rope_theta, rope_scaling, LEGACY_EXTRA.get(name, {}),
                      LEGACY_DROP.get(name, ()))

    # The reference: the saved bf16 weights, loaded back in float32.
    ref_model = load_reference(out_dir)
    layer_types = getattr(ref_model.config, "layer_types", None) or []
    assert all(t == "full_attention" for t in layer_types), (name, layer_types)
    rp = ref_model.config.rope_parameters
    assert rp["rope_theta"] == rope_theta, (name, rp)
    if rope_scaling:
        want_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
        assert rp["rope_type"] == want_type and rp.get("factor") == rope_scaling.get("factor"), (name, rp)
    per_pass = rp["rope_type"] in PER_PASS_ROPE
    sd = ref_model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v.float()), (name, k)

    pgen = torch.Generator().manual_seed(seed + 1000)
    vocab = config.vocab_size
    prompts = []
    for n in PROMPT_LENS:
        ids = torch.randint(3, vocab, (n,), generator=pgen).tolist()
        if per_pass:
            # dynamic's rotary embedding keeps the longest length it has
            # seen (max_seq_len_cached) across calls: a fresh model per
            # prompt, so that each reference is that prompt's alone.
            ref_model = load_reference(out_dir)
        with torch.no_grad():
            logits = ref_model(torch.tensor([ids])).logits[0, -1]
        if per_pass:
            toks, margins = greedy_cached(load_reference(out_dir), ids)
            prompts.append({"ids": ids, "last_logits": [sig6(x) for x in logits.tolist()],
                            "greedy": toks, "greedy_margins": margins})
            continue
        toks, margins = greedy(ref_model, ids)
        # Cross-check the manual loop against generate() with the KV cache.
        g = ref_model.generate(torch.tensor([ids]), max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                               do_sample=False, eos_token_id=None, pad_token_id=0,
                               num_beams=1)
        assert g[0, n:].tolist() == toks, (name, n, g[0, n:].tolist(), toks)
        prompts.append({"ids": ids, "last_logits": [sig6(x) for x in logits.tolist()],
                        "greedy": toks, "greedy_margins": margins})

    # eos ids: the two highest ids that no greedy continuation produced, so
    # that a runtime which stops at eos still makes all 16 tokens.
    produced = {t for p in prompts for t in p["greedy"]}
    eos = [t for t in range(vocab - 1, 2, -1) if t not in produced][:2]
    patch_json(cfg_path, eos_token_id=eos[0], bos_token_id=1)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": eos, "do_sample": False,
                   "transformers_version": transformers.__version__}, f, indent=2)
        f.write("\n")

    ref = {
        "model": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "note": "float32 forward of the bf16 weights; greedy ignores eos; "
                "logits rounded to 6 significant digits",
        "n_new": N_NEW,
        "eos_ids": eos,
        "prompts": prompts,
    }
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(ref, f, separators=(",", ":"))
        f.write("\n")
    min_margin = min(m for p in prompts for m in p["greedy_margins"])
    spread = max(float(torch.tensor(p["last_logits"]).std()) for p in prompts)
    print(f"{name}: eos {eos}, smallest greedy margin {min_margin:.4f}, "
          f"logit std {spread:.3f}")


# Mixture-of-experts models: 8 experts (4 for mixtral-tiny), experts of 32
# (mixtral: intermediate_size 128), so that tp 4 splits every expert and
# --expert-parallel at tp 4 gives each rank whole experts.
# name -> (config class, model class, extra config, legacy config.json, seed)
MOE_MODELS = {
    # norm_topk_prob true; config.json with the Hub's "num_experts" spelling.
    "qwen3moe-tiny": (Qwen3MoeConfig, Qwen3MoeForCausalLM,
                      dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           tie_word_embeddings=False, rope_theta=1000000.0,
                           num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                           norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
                      True, 201),
    # norm_topk_prob false, top 3, layer 0 a dense MLP (mlp_only_layers);
    # transformers 5's spelling (num_local_experts, rope_parameters).
    "qwen3moe-dense": (Qwen3MoeConfig, Qwen3MoeForCausalLM,
                       dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            tie_word_embeddings=True, rope_theta=1000000.0,
                            num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                            norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[0]),
                       False, 202),
    # softmax top 2, renormalised; experts of intermediate_size.
    "mixtral-tiny": (MixtralConfig, MixtralForCausalLM,
                     dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          tie_word_embeddings=False, rope_theta=1000000.0, sliding_window=None,
                          num_local_experts=4, num_experts_per_tok=2),
                     True, 203),
}
# The smallest gap between the k-th and the (k+1)-th router probability
# over every position the tests run must be at least this: the runtime
# differs from torch by fp32 summation order (~1e-6), so a smaller gap could
# pick another expert.
MIN_ROUTER_GAP = 2e-4


def router_stats(out_dir, k):
    """Over every position of every reference run (prompt + greedy tokens):
    the smallest top-k boundary gap of the router probabilities, and the
    experts never chosen per sparse layer."""
    with open(os.path.join(out_dir, "reference.json")) as f:
        ref = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    probs = {}
    hooks = []
    for name, mod in model.named_modules():
        if name.endswith("mlp.gate") or name.endswith("block_sparse_moe.gate"):
            def hook(m, inp, out, name=name):
                logits = out[0] if isinstance(out, tuple) else out
                probs.setdefault(name, []).append(torch.softmax(logits.float(), dim=-1))
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for p in ref["prompts"]:
            seq = p["ids"] + p["greedy"][:-1]
            model(torch.tensor([seq]))
    gap, unused = 1.0, {}
    for name, chunks in probs.items():
        pr = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks])
        top = torch.topk(pr, k + 1, dim=-1)
        gap = min(gap, float((top.values[:, k - 1] - top.values[:, k]).min()))
        chosen = set(top.indices[:, :k].flatten().tolist())
        missing = sorted(set(range(pr.shape[-1])) - chosen)
        if missing:
            unused[name] = missing
    for h in hooks:
        h.remove()
    return gap, unused, len(probs)


def make_moe(name):
    """make() for a MoE model, re-seeded until routing is comfortable: no
    near tie at the top-k boundary and every expert used in every layer."""
    cfg_cls, model_cls, extra, legacy, seed = MOE_MODELS[name]
    for attempt in range(40):
        MODELS[name] = (cfg_cls, model_cls, dict(extra), legacy, seed + 1000 * attempt)
        make(name)
        out_dir = os.path.join(ROOT, name)
        gap, unused, n_sparse = router_stats(out_dir, extra["num_experts_per_tok"])
        print(f"{name}: seed {seed + 1000 * attempt}: {n_sparse} sparse layers, smallest "
              f"top-k gap {gap:.2e}, unused experts {unused or 'none'}")
        if gap >= MIN_ROUTER_GAP and not unused:
            break
    else:
        sys.exit(f"make_fixtures.py: {name}: no seed gave comfortable routing")
    if name.startswith("qwen3moe") and legacy:
        # The Hub's Qwen3-MoE configs say "num_experts"; transformers 5
        # writes "num_local_experts".
        cfg_path = os.path.join(out_dir, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["num_experts"] = cfg.pop("num_local_experts")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")


def make_fused(src_name, name):
    """A copy of src_name in the layout transformers 5's Qwen3MoeExperts
    holds in memory: per layer mlp.experts.gate_up_proj [E, 2 I, H] (gate
    rows, then up) and mlp.experts.down_proj [E, H, I], bare parameters.
    Same weights, so src_name's reference.json holds."""
    from safetensors.torch import load_file, save_file
    src, out_dir = os.path.join(ROOT, src_name), os.path.join(ROOT, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    sd = load_file(os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    n_exp = cfg.get("num_experts", cfg.get("num_local_experts"))
    out = {}
    for k, v in sd.items():
        if ".mlp.experts." not in k:
            out[k] = v
    for l in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{l}.mlp.experts."
        if pre + "0.gate_proj.weight" not in sd:
            continue
        out[pre + "gate_up_proj"] = torch.stack([
            torch.cat([sd[f"{pre}{e}.gate_proj.weight"], sd[f"{pre}{e}.up_proj.weight"]])
            for e in range(n_exp)]).contiguous()
        out[pre + "down_proj"] = torch.stack([sd[f"{pre}{e}.down_proj.weight"]
                                              for e in range(n_exp)]).contiguous()
    save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for fn in ("config.json", "generation_config.json", "reference.json"):
        shutil.copy(os.path.join(src, fn), os.path.join(out_dir, fn))
    for fn in os.listdir(out_dir):
        os.chmod(os.path.join(out_dir, fn), 0o644)
    print(f"{name}: {src_name}'s weights, experts fused")


# ------------------------------------------------------- quantized fixtures
#
# FP8 as Qwen's Qwen3-*-FP8 releases: config.json's quantization_config
# {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
# "weight_block_size": [128, 128]}, every linear layer of the decoder
# F8_E4M3 with weight_scale_inv [ceil(out / 128), ceil(in / 128)]; the
# embedding, the norms and the (tied) lm_head stay bf16.  The quantizer is
# transformers' Fp8Quantize (integrations/finegrained_fp8.py), extended to
# partial edge blocks the way tpconvert --quantize fp8 does it; on shapes
# the block divides, the two are checked equal below.
FP8_BLOCK = 128
QUANT_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QWEN_FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                   "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
# name -> (bf16 source fixture, scale dtype, split into two files, lm_head too)
FP8_MODELS = {
    # F32 scales, and every scale in another file than its weight
    "qwen3-fp8": ("qwen3-q256", torch.float32, True, False),
    # BF16 scales, one file
    "qwen3-fp8-bf16s": ("qwen3-q256", torch.bfloat16, False, False),
    # tpconvert --quantize fp8 --quantize-lm-head's reference: the tied
    # embedding / lm_head table quantized too (F32 scales, one file)
    "qwen3-fp8-head": ("qwen3-q256", torch.float32, False, True),
}
# tpconvert --quantize int8's reference (our own quant_method):
# name -> (bf16 source fixture, lm_head too)
INT8_MODELS = {"qwen3-int8": ("qwen3-q256", False), "qwen3-int8-head": ("qwen3-q256", True)}
# the table a tied lm_head reads (quantized with --quantize-lm-head)
TIED_TABLE = "model.embed_tokens.weight"


def quant_fp8(w):
    """(e4m3 weight, fp32 weight_scale_inv) of a 2-D weight, per
    FP8_BLOCK x FP8_BLOCK block (partial at the edges): scale = 448 / amax in
    fp32 (1 for a zero block; torch computes it as (1 / amax) * 448),
    q = e4m3(clamp(w * scale)), inv = 1 / scale."""
    wf = w.float()
    rows, cols = wf.shape
    nbr, nbc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    fmax = torch.finfo(torch.float8_e4m3fn).max
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    inv = torch.empty(nbr, nbc, dtype=torch.float32)
    for i in range(nbr):
        for j in range(nbc):
            blk = wf[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK]
            amax = blk.abs().amax()
            # fmax / amax as transformers computes it: a Python float divided by
            # a tensor is torch's reciprocal(amax) * fmax, two fp32 roundings
            scale = torch.where(amax > 0, fmax / amax, torch.tensor(1.0))
            inv[i, j] = 1.0 / scale
            q[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK] = \
                torch.clamp(blk * scale, min=-fmax, max=fmax).to(torch.float8_e4m3fn)
    return q, inv


def check_against_transformers(w, q, inv):
    """On a shape the block divides, quant_fp8 must be transformers' own."""
    from types import SimpleNamespace
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.utils.quantization_config import FineGrainedFP8Config
    op = Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config()))
    out = op.convert({"x.weight": w})
    assert torch.equal(out["x.weight"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(out["x.weight_scale_inv"], inv)


def quant_int8(w):
    """(int8 weight, fp32 weight_scale) per output row: scale = amax / 127
    (1 for a zero row), q = round-half-even(w / scale) clamped to 127."""
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(wf / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def is_quant_linear(name):
    parts = name.split(".")
    return name.startswith("model.layers.") and len(parts) >= 2 and parts[-1] == "weight" and \
        parts[-2] in QUANT_LINEAR


def to_quantize(name, head):
    """What tpconvert --quantize quantizes: the linear layers, and with
    --quantize-lm-head (head) the tied lm_head's table, the embedding."""
    return is_quant_linear(name) or (head and name == TIED_TABLE)


def reference_prompts(model, vocab, seed):
    """make()'s prompts, last-position logits and greedy tokens for model."""
    pgen = torch.Generator().manual_seed(seed + 1000)
    prompts = []
    for n in PROMPT_LENS:
        ids = torch.randint(3, vocab, (n,), generator=pgen).tolist()
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        toks, margins = greedy(model, ids)
        prompts.append({"ids": ids, "last_logits": [sig6(x) for x in logits.tolist()],
                        "greedy": toks, "greedy_margins": margins})
    return prompts


def write_quant_fixture(name, src_name, tensors, dequant, quant_config, split, note):
    """tests/models/<name>: src_name's config with quant_config, tensors
    (split: every scale in a second file), and the reference of transformers'
    fp32 forward on the dequantized weights (dequant: name -> fp32)."""
    from safetensors.torch import load_file, save_file
    src, out_dir = os.path.join(ROOT, src_name), os.path.join(ROOT, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    if split:
        scales = {k: v for k, v in tensors.items() if "_scale" in k}
        rest = {k: v for k, v in tensors.items() if "_scale" not in k}
        files = {"model-00001-of-00002.safetensors": rest, "model-00002-of-00002.safetensors": scales}
        weight_map = {k: fn for fn, part in files.items() for k in part}
        for fn, part in files.items():
            save_file(part, os.path.join(out_dir, fn), metadata={"format": "pt"})
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                      f, indent=2)
            f.write("\n")
    else:
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = quant_config
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    shutil.copy(os.path.join(src, "generation_config.json"), out_dir)

    # The reference: the model in fp32 with the dequantized weights.
    cfg.pop("quantization_config")
    config = Qwen3Config(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
    model = Qwen3ForCausalLM(config)
    sd = load_file(os.path.join(src, "model.safetensors"))
    full = {k: v.float() for k, v in sd.items()}
    full.update(dequant)
    missing, unexpected = model.load_state_dict(full, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    model.tie_weights()
    model = model.float().eval()
    model.config._attn_implementation = "eager"
    with open(os.path.join(src, "reference.json")) as f:
        src_ref = json.load(f)
    prompts = reference_prompts(model, config.vocab_size, MODELS[src_name][4])
    produced = {t for p in prompts for t in p["greedy"]}
    assert not produced & set(src_ref["eos_ids"]), (name, src_ref["eos_ids"])
    ref = {"model": name, "torch": torch.__version__, "transformers": transformers.__version__,
           "note": note, "n_new": N_NEW, "eos_ids": src_ref["eos_ids"], "prompts": prompts}
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(ref, f, separators=(",", ":"))
        f.write("\n")
    for fn in os.listdir(out_dir):
        os.chmod(os.path.join(out_dir, fn), 0o644)
    err = max(float((torch.tensor(p["last_logits"]) - torch.tensor(q["last_logits"])).abs().max())
              for p, q in zip(prompts, src_ref["prompts"]))
    print(f"{name}: max |logit - {src_name}'s| {err:.4f}, smallest greedy margin "
          f"{min(m for p in prompts for m in p['greedy_margins']):.4f}")


def make_fp8(name):
    from safetensors.torch import load_file
    src_name, scale_dtype, split, head = FP8_MODELS[name]
    sd = load_file(os.path.join(ROOT, src_name, "model.safetensors"))
    tensors, dequant = {}, {}
    for k, v in sd.items():
        if not to_quantize(k, head):
            tensors[k] = v
            continue
        q, inv = quant_fp8(v)
        if v.shape[0] % FP8_BLOCK == 0 and v.shape[1] % FP8_BLOCK == 0:
            check_against_transformers(v, q, inv)
        inv = inv.to(scale_dtype)
        tensors[k] = q
        tensors[k[:-len("weight")] + "weight_scale_inv"] = inv
        nr, nc = v.shape
        dequant[k] = q.float() * inv.float().repeat_interleave(FP8_BLOCK, 0)[:nr] \
                                             .repeat_interleave(FP8_BLOCK, 1)[:, :nc]
    config = dict(QWEN_FP8_CONFIG)
    if head:   # as tpconvert writes it: nothing kept unquantized
        config["modules_to_not_convert"] = []
    write_quant_fixture(name, src_name, tensors, dequant, config, split,
                        "float32 forward of the dequantized fp8 weights (e4m3 x weight_scale_inv "
                        f"as {str(scale_dtype)}, widened to fp32); greedy ignores eos; logits "
                        "rounded to 6 significant digits")


def make_int8(name):
    from safetensors.torch import load_file
    src_name, head = INT8_MODELS[name]
    sd = load_file(os.path.join(ROOT, src_name, "model.safetensors"))
    tensors, dequant = {}, {}
    for k, v in sd.items():
        if not to_quantize(k, head):
            tensors[k] = v
            continue
        q, scale = quant_int8(v)
        tensors[k] = q
        tensors[k[:-len("weight")] + "weight_scale"] = scale
        dequant[k] = q.float() * scale[:, None]
    write_quant_fixture(name, src_name, tensors, dequant,
                        {"quant_method": "tpshard_int8", "modules_to_not_convert": [] if head else ["lm_head"]},
                        False,
                        "float32 forward of the dequantized int8 weights (int8 x weight_scale per "
                        "row); greedy ignores eos; logits rounded to 6 significant digits")


# The configurations tests/test_kernels_cpu.c checks tpk_rope_inv_freq and
# the attention factor on (llama, head_dim 16): (name, rope dict, seq_len
# of the pass or None for init, max_position_embeddings).
LONGROPE_SHORT = [1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0]
LONGROPE_LONG = [1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0]
ROPE_REFERENCE = [
    ("linear", {"rope_type": "linear", "factor": 4.0}, None, 256),
    ("dynamic_init", {"rope_type": "dynamic", "factor": 2.0}, None, 16),
    ("dynamic_21", {"rope_type": "dynamic", "factor": 2.0}, 21, 16),
    ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, None, 256),
    # correction range (2.016, 3.82): truncating it (floor/ceil) changes the ramp
    ("yarn_mscale", {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256,
                     "mscale": 2.0, "mscale_all_dim": 1.0, "beta_fast": 4.0, "beta_slow": 0.5,
                     "truncate": False}, None, 2048),
    ("longrope_short", {"rope_type": "longrope", "short_factor": LONGROPE_SHORT,
                        "long_factor": LONGROPE_LONG, "original_max_position_embeddings": 16}, 16, 64),
    ("longrope_long", {"rope_type": "longrope", "short_factor": LONGROPE_SHORT,
                       "long_factor": LONGROPE_LONG, "original_max_position_embeddings": 16}, 17, 64),
]


def rope_reference():
    """Prints transformers' own inv_freq and attention factor for
    ROPE_REFERENCE, as C literals.  dynamic and longrope get seq_len the way
    dynamic_rope_update passes it (a tensor: max(position_ids) + 1)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for name, rope, seq_len, max_pos in ROPE_REFERENCE:
        cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, num_hidden_layers=1,
                          max_position_embeddings=max_pos,
                          rope_parameters=dict(rope, rope_theta=10000.0))
        fn = ROPE_INIT_FUNCTIONS[cfg.rope_parameters["rope_type"]]
        sl = None if seq_len is None else torch.tensor(seq_len)
        inv, att = fn(cfg, "cpu", seq_len=sl)
        vals = ", ".join(repr(float(x)) for x in inv.tolist())
        print(f'    {{ "{name}", {float(att)!r}, {{ {vals} }} }},')


def main():
    if sys.argv[1:] == ["--rope-reference"]:
        rope_reference()
        return
    derived = list(FP8_MODELS) + list(INT8_MODELS)   # after their bf16 source
    names = sys.argv[1:] or list(MODELS) + list(MOE_MODELS) + ["qwen3moe-fused"] + derived
    for n in names:
        if n not in MODELS and n not in MOE_MODELS and n != "qwen3moe-fused" and n not in derived:
            sys.exit(f"make_fixtures.py: unknown model {n} (known: {', '.join(MODELS)}, "
                     f"{', '.join(MOE_MODELS)}, {', '.join(derived)})")
    torch.set_num_threads(1)   # reproducible reductions
    for n in names:
        if n in MOE_MODELS:
            make_moe(n)
        elif n == "qwen3moe-fused":
            make_fused("qwen3moe-tiny", n)
        elif n in FP8_MODELS:
            make_fp8(n)
        elif n in INT8_MODELS:
            make_int8(n)
        else:
            make(n)


if __name__ == "__main__":
    main()
