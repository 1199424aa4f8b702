#!/usr/bin/env python3
"""bench_gpu_reference.py - the baselines tprun's GPU path will be compared to.

Run by bench/bench_gpu.sh (make bench-gpu); each subcommand prints one JSON
line on stdout (everything else goes to stderr):

  load-tp      transformers from_pretrained(tp_plan="auto") under torchrun
               (--nproc-per-node N): seconds until the weights are on the GPU
  load-st      safetensors.torch.load_file(device="cuda") of every *.safetensors
               file: seconds and GB/s
  generate     transformers generate, greedy: decode tokens/s (NEW tokens after
               a PROMPT-token prompt) and prefill tokens/s (one forward of
               PREFILL tokens); the weights' bytes, for the bandwidth bound
  bandwidth    device-to-device copy bandwidth (torch), the memory roofline:
               a decode step reads every weight once, so decode tokens/s
               * weight bytes / copy bandwidth is the fraction of the bound

Times are medians of --repeat runs after one warm-up, with
torch.cuda.synchronize() before every clock read.  --device cpu exists only to
smoke-test this script on a machine without a GPU; its numbers say nothing
about GPUs and bench_gpu.sh never uses it.
"""
import argparse
import glob
import json
import os
import statistics
import sys
import time


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeat, torch, device):
    fn()  # warm-up: kernels compiled / autotuned, allocator primed
    times = []
    for _ in range(repeat):
        sync(torch, device)
        t0 = time.perf_counter()
        fn()
        sync(torch, device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def need_gpu(torch, device):
    if device == "cuda" and not torch.cuda.is_available():
        log("bench_gpu_reference: torch.cuda.is_available() is False: no GPU, nothing measured")
        sys.exit(2)


def gpu_name(torch, device):
    return torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke test, not a GPU number)"


def cmd_load_tp(a):
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    need_gpu(torch, a.device)
    if "LOCAL_RANK" not in os.environ:
        log("bench_gpu_reference: load-tp must run under torchrun (tp_plan='auto' needs torch.distributed)")
        sys.exit(1)
    local = int(os.environ["LOCAL_RANK"])
    if a.device == "cuda":
        torch.cuda.set_device(local)
    sync(torch, a.device)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, tp_plan="auto")
    sync(torch, a.device)
    seconds = time.perf_counter() - t0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"bench": "load-tp", "seconds": round(seconds, 3), "world": world,
                          "device": gpu_name(torch, a.device),
                          "param_device": str(next(model.parameters()).device)}), flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cmd_load_st(a):
    import torch
    from safetensors.torch import load_file

    need_gpu(torch, a.device)
    files = sorted(glob.glob(os.path.join(a.model, "*.safetensors")))
    if not files:
        log(f"bench_gpu_reference: {a.model}: no *.safetensors files")
        sys.exit(1)
    nbytes = sum(os.path.getsize(f) for f in files)

    def load():
        tensors = [load_file(f, device=a.device) for f in files]
        sync(torch, a.device)
        del tensors

    med, times = median_time(load, a.repeat, torch, a.device)
    print(json.dumps({"bench": "load-st", "seconds": round(med, 3), "bytes": nbytes,
                      "gb_per_s": round(nbytes / med / 1e9, 2), "runs": [round(t, 3) for t in times],
                      "device": gpu_name(torch, a.device),
                      "note": "files are probably in the page cache (it is not dropped)"}), flush=True)


def cmd_generate(a):
    import torch
    from transformers import AutoModelForCausalLM

    need_gpu(torch, a.device)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).to(a.device).eval()
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    # random ids: the weights are random too, so text would mean nothing
    prompt = torch.randint(0, cfg.vocab_size, (1, a.prompt), generator=gen).to(a.device)
    long_prompt = torch.randint(0, cfg.vocab_size, (1, a.prefill), generator=gen).to(a.device)
    # no early stop: every run makes exactly the tokens asked for
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def gen_n(n):
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)
        assert out.shape[1] == a.prompt + n, out.shape

    t_new, _ = median_time(lambda: gen_n(a.new), a.repeat, torch, a.device)
    t_one, _ = median_time(lambda: gen_n(1), a.repeat, torch, a.device)
    decode_tps = (a.new - 1) / (t_new - t_one) if t_new > t_one else float("nan")

    def prefill():
        with torch.inference_mode():
            model(long_prompt, use_cache=False)

    t_pre, _ = median_time(prefill, a.repeat, torch, a.device)
    print(json.dumps({
        "bench": "generate", "device": gpu_name(torch, a.device),
        "prompt": a.prompt, "new": a.new, "seconds_new": round(t_new, 4), "seconds_one": round(t_one, 4),
        "decode_tokens_per_s": round(decode_tps, 1),
        "prefill_tokens": a.prefill, "prefill_seconds": round(t_pre, 4),
        "prefill_tokens_per_s": round(a.prefill / t_pre, 1),
        "weight_bytes": weight_bytes, "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "note": "decode tokens/s = (new - 1) / (time(new tokens) - time(1 token)), greedy, batch 1",
    }), flush=True)


def cmd_bandwidth(a):
    import torch

    need_gpu(torch, a.device)
    n = a.bytes
    src = torch.empty(n, dtype=torch.uint8, device=a.device)
    dst = torch.empty_like(src)
    src.fill_(1)
    med, times = median_time(lambda: dst.copy_(src), a.repeat, torch, a.device)
    # a copy reads n bytes and writes n bytes
    print(json.dumps({"bench": "bandwidth", "bytes": n, "seconds": med,
                      "gb_per_s": round(2 * n / med / 1e9, 1), "device": gpu_name(torch, a.device),
                      "note": "device-to-device copy, read + write bytes counted"}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["load-tp", "load-st", "generate", "bandwidth"])
    p.add_argument("--model", help="Hugging Face model directory")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--bytes", type=int, default=1 << 30)
    a = p.parse_args()
    if a.what != "bandwidth" and not a.model:
        p.error(f"{a.what} needs --model")
    if a.repeat < 1 or a.new < 2 or a.prompt < 1 or a.prefill < 1:
        p.error("--repeat and --prompt, --prefill must be >= 1, --new >= 2")
    {"load-tp": cmd_load_tp, "load-st": cmd_load_st, "generate": cmd_generate,
     "bandwidth": cmd_bandwidth}[a.what](a)


if __name__ == "__main__":
    main()
