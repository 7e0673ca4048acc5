"""`dschat bench --step sft`: step 1's training step (forward, backward, optimizer step) timed."""

from __future__ import annotations

import statistics
import time

import torch

from dschat_cli.config.bench import BenchConfig, bench_sft_config
from dschat_cli.config.ds_config import zero_label
from dschat_cli.config.resolved import ResolvedRun
from dschat_cli.dist import Dist
from dschat_cli.steps.bench.floors import device_name, measure_ceilings, peak_gib, sync
from dschat_cli.steps.bench.ppo import random_prompts
from dschat_cli.steps.common import count_params
from dschat_cli.ui.console import console


def bench_sft(cfg: BenchConfig, dist: Dist, resolved: ResolvedRun) -> dict:
    from dschat_cli.models.loading import load_causal_lm, load_tokenizer, optimizer_groups
    from dschat_cli.steps.common import flops_per_token, init_engine

    sft_cfg = bench_sft_config(cfg)
    dtype_name, ds_config = resolved.dtype, resolved.ds_config("model")
    tokenizer = load_tokenizer(sft_cfg.model)
    with console.status("building the random-weight model"):
        model = load_causal_lm(sft_cfg.model, tokenizer, dtype=dtype_name, ds_config=ds_config,
                               device=dist.device)
    n_params = count_params(model)
    total = cfg.warmup + cfg.steps
    engine = init_engine(model, optimizer_groups(model, weight_decay=0.0, lora_lr=0.0), ds_config,
                         sft_cfg.optim, total)
    on_gpu = dist.device != "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    ceilings = measure_ceilings(dist.device, dtype)
    S = cfg.max_prompt_seq_len + cfg.max_answer_seq_len
    gen = torch.Generator().manual_seed(cfg.seed + dist.rank)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    step_s = []
    phase_s = {"forward": [], "backward": [], "optimizer_step": []}
    engine.train()
    for i in range(total):
        batch = random_prompts(cfg.batch, S, tokenizer, engine.device, gen)
        sync(on_gpu)
        t0 = time.perf_counter()
        loss = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      labels=batch["input_ids"], use_cache=False).loss
        sync(on_gpu)  # each phase between synchronisations: the sums add up to the step
        t1 = time.perf_counter()
        engine.backward(loss)
        sync(on_gpu)
        t2 = time.perf_counter()
        engine.step()
        sync(on_gpu)
        t3 = time.perf_counter()
        if i >= cfg.warmup:
            step_s.append(t3 - t0)
            for name, secs in zip(phase_s, (t1 - t0, t2 - t1, t3 - t2)):
                phase_s[name].append(secs)
        console.print(f"[dim]sft step {i + 1}/{total}{' (warm-up)' if i < cfg.warmup else ''}: "
                      f"{time.perf_counter() - t0:.3f} s, loss {float(loss):.3f}[/dim]")
    step = statistics.mean(step_s)
    tokens = cfg.batch * S * dist.world_size
    flops = flops_per_token(engine.module, n_params, S, cfg.gradient_checkpointing) * tokens
    floor = flops / dist.world_size / (ceilings["matmul_tflops"] * 1e12)
    return {"step": "sft", "device": device_name(dist), "world_size": dist.world_size,
            "dtype": dtype_name, "actor": cfg.actor, "actor_params": n_params,
            "batch_size": cfg.batch, "seq_len": S, "steps": cfg.steps, "warmup": cfg.warmup,
            "zero_stage": cfg.actor_zero_stage, "zero": zero_label(ds_config),
            "ceilings": ceilings,
            "step_seconds": step, "step_seconds_all": step_s, "tokens_per_s": tokens / step,
            "phases": {k: statistics.mean(v) for k, v in phase_s.items()},
            "tflops_per_gpu": flops / dist.world_size / step / 1e12,
            "floor_seconds": floor, "step_x_floor": step / floor,
            "peak_memory_gib": peak_gib(dist, on_gpu)}
