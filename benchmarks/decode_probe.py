"""Decode-speed probe of the fast rollout engine vs transformers' generate, on one GPU:

    python benchmarks/decode_probe.py [PRESET] [BATCH] [PROMPT] [NEW]

Random weights of a preset architecture (the architecture sets the cost), bf16. Prints prefill
and per-decode-step times, the bandwidth floor of a decode step, and the logprob gap between the
engine and the model's forward pass."""
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dschat_cli.generation.fast import FastGenerator, logprob_gap
from dschat_cli.models.presets import preset_config
from dschat_cli.rlhf.ppo import answer_logprobs

preset = sys.argv[1] if len(sys.argv) > 1 else "opt-1.3b"
B, P, N = (int(x) for x in (sys.argv[2:5] if len(sys.argv) > 4 else (64, 256, 256)))
raw = dict(preset_config(preset))
cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
V = cfg.vocab_size
ids = torch.randint(10, V - 10, (B, P), device="cuda")
mask = torch.ones(B, P, dtype=torch.long, device="cuda")


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    return r, time.perf_counter() - t


for bucket in (32, 64, 1 << 20):
    for backend in (None, "math", "efficient", "cudnn"):
        gen = FastGenerator(model, eos_token_id=2, pad_token_id=1, max_new_tokens=N,
                            ignore_eos=True, bucket=bucket, attention_backend=backend)
        gen.profile = True
        try:
            for i in range(2):
                out, s = timed(lambda: gen.generate(ids, mask))
        except Exception as e:  # a backend may not support this mask/shape
            print(f"bucket {bucket} backend {backend}: failed ({type(e).__name__}: {e})"[:200])
            continue
        t = gen.last_timings
        print(f"bucket {bucket} backend {backend}: rollout {s:.3f} s, prefill "
              f"{t['prefill_s'] * 1e3:.1f} ms, decode {t['decode_s'] / t['decode_steps'] * 1e3:.2f} "
              f"ms/step, captures {gen.captures}")
        gen.release()
n_params = sum(p.numel() for p in model.parameters())
kv = 2 * cfg.num_hidden_layers * B * (P + N) * cfg.hidden_size * 2
print(f"bandwidth floor at 4.3 TB/s: {(n_params * 2 + kv) / 4.3e12 * 1e3:.2f} ms/step "
      f"(weights {n_params * 2 / 1e9:.2f} GB, full KV {kv / 1e9:.2f} GB)")
with torch.no_grad():
    logits = model(input_ids=out.seq, attention_mask=torch.ones_like(out.seq), use_cache=False).logits
fwd = answer_logprobs(logits, out.seq, P)
print("logprob gap mean/max:", logprob_gap(out.logprobs, fwd, torch.ones_like(fwd)))
print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
