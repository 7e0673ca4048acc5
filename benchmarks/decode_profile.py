"""Where the fast engine's decode step spends its time, kernel by kernel, and what compiling the
decoder layers (torch.compile) does to it, on one GPU:

    python benchmarks/decode_profile.py [PRESET] [BATCH] [PROMPT] [NEW] [MODES]

MODES: comma-separated of graph (the engine as it ships), unfused (the same with separate q/k/v
projections: fuse_qkv=False), profile (eager decode steps under
torch.profiler: summed kernel time per step by kernel, beside the graph's replay time), compile
(each decoder layer compiled with torch.compile, then the same CUDA graphs), stepcompile (the
engine's compile_decode: the whole decode step compiled as one graph, then the CUDA graphs). Random weights of a
preset architecture, bf16, eos suppressed (every answer is NEW tokens long).
"""
import sys
import time
from collections import defaultdict

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dschat_cli.generation.fast import FastGenerator, logprob_gap
from dschat_cli.models.presets import preset_config
from dschat_cli.rlhf.ppo import answer_logprobs

preset = sys.argv[1] if len(sys.argv) > 1 else "opt-1.3b"
B, P, N = (int(x) for x in (sys.argv[2:5] if len(sys.argv) > 4 else (64, 256, 256)))
modes = (sys.argv[5] if len(sys.argv) > 5 else "graph,profile,compile").split(",")
raw = dict(preset_config(preset))
cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
torch.manual_seed(0)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
ids = torch.randint(10, cfg.vocab_size - 10, (B, P), device="cuda")
mask = torch.ones(B, P, dtype=torch.long, device="cuda")
n_params = sum(p.numel() for p in model.parameters())
layers = cfg.num_hidden_layers
kv_mean = 2 * layers * B * (P + N / 2) * cfg.hidden_size * 2
floor_ms = (n_params * 2 + kv_mean) / 4.1e12 * 1e3
print(f"{preset} batch {B}, {P} + {N} tokens: decode floor {floor_ms:.2f} ms/step at 4.1 TB/s "
      f"(weights {n_params * 2 / 1e9:.2f} GB, KV at the mean context {kv_mean / 1e9:.2f} GB)",
      flush=True)


def rollout(gen, times=2):
    out = None
    for _ in range(times):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = gen.generate(ids, mask)
        torch.cuda.synchronize()
        s = time.perf_counter() - t
    t = gen.last_timings
    return out, s, t["prefill_s"] * 1e3, t["decode_s"] / t["decode_steps"] * 1e3


def engine(**kw):
    gen = FastGenerator(model, eos_token_id=2, pad_token_id=1, max_new_tokens=N, ignore_eos=True,
                        max_prompt_seq_len=P, **kw)
    gen.profile = True
    return gen


def check(out, label):
    with torch.no_grad():
        logits = model(input_ids=out.seq, attention_mask=torch.ones_like(out.seq),
                       use_cache=False).logits
    fwd = answer_logprobs(logits, out.seq, P)
    mean, worst = logprob_gap(out.logprobs, fwd, torch.ones_like(fwd))
    print(f"  {label}: logprob gap to the forward pass mean {mean:.4f} max {worst:.4f}", flush=True)
    del logits


if "graph" in modes:
    gen = engine()
    out, s, pre, dec = rollout(gen)
    print(f"graph: rollout {s:.3f} s, prefill {pre:.1f} ms, decode {dec:.3f} ms/step "
          f"({dec / floor_ms:.2f}x floor), captures {gen.captures}", flush=True)
    check(out, "graph")
    gen.release()

if "unfused" in modes:
    gen = engine(fuse_qkv=False)
    out, s, pre, dec = rollout(gen)
    print(f"unfused q/k/v + graph: rollout {s:.3f} s, prefill {pre:.1f} ms, decode {dec:.3f} "
          f"ms/step ({dec / floor_ms:.2f}x floor), captures {gen.captures}", flush=True)
    check(out, "unfused")
    gen.release()

if "profile" in modes:
    from torch.profiler import ProfilerActivity, profile

    gen = engine(use_cuda_graph=False)
    rollout(gen, times=1)  # warm-up
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out, s, pre, dec = rollout(gen, times=1)
    per_name = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_name[e.name][0] += e.device_time_total if hasattr(e, "device_time_total") \
                else e.cuda_time_total
            per_name[e.name][1] += 1
    total_us = sum(v[0] for v in per_name.values())
    steps = N  # the prefill's kernels are counted too: report per rollout and per step
    print(f"profile (eager): rollout {s:.3f} s, kernel time summed {total_us / 1e3:.1f} ms per "
          f"rollout = {total_us / 1e3 / steps:.3f} ms per token (prefill included), "
          f"{sum(v[1] for v in per_name.values()) / steps:.0f} kernels per token", flush=True)
    for name, (us, n) in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:30]:
        print(f"  {us / 1e3 / steps:7.3f} ms/token {n / steps:6.1f}x  {name[:110]}")
    gen.release()

if "compile" in modes:
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = 64
    base = model.model.decoder if hasattr(model.model, "decoder") else model.model
    t = time.perf_counter()
    for layer in base.layers:
        layer.compile()
    gen = engine()
    out, s, pre, dec = rollout(gen, times=1)
    print(f"compile: first rollout (compiles) {time.perf_counter() - t:.1f} s", flush=True)
    out, s, pre, dec = rollout(gen, times=2)
    print(f"compile (layers) + graph: rollout {s:.3f} s, prefill {pre:.1f} ms, decode "
          f"{dec:.3f} ms/step ({dec / floor_ms:.2f}x floor), captures {gen.captures}", flush=True)
    check(out, "compile")
    gen.release()
if "stepcompile" in modes:  # the engine's own option: the whole decode step, one graph
    t = time.perf_counter()
    gen = engine(compile_decode=True)
    out, s, pre, dec = rollout(gen, times=1)
    print(f"stepcompile: first rollout (compiles) {time.perf_counter() - t:.1f} s, failure: "
          f"{gen.compile_failure}", flush=True)
    out, s, pre, dec = rollout(gen, times=2)
    print(f"stepcompile + graph: rollout {s:.3f} s, prefill {pre:.1f} ms, decode "
          f"{dec:.3f} ms/step ({dec / floor_ms:.2f}x floor), captures {gen.captures}", flush=True)
    check(out, "stepcompile")
    gen.release()
print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
