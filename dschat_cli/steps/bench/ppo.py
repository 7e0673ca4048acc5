"""`dschat bench` (--step ppo): step 3's PPOTrainer on random prompts, every phase timed."""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from dschat_cli.config.bench import BenchConfig, bench_ppo_config
from dschat_cli.config.ds_config import zero_label
from dschat_cli.config.resolved import ResolvedRun
from dschat_cli.dist import Dist
from dschat_cli.steps.bench.floors import (device_name, measure_ceilings, model_shape, peak_gib,
                                           ppo_floors, sync)
from dschat_cli.steps.common import PhaseTimer
from dschat_cli.ui.console import console

PPO_PHASES = ("generation", "actor_forward", "ref_forward", "critic_forward", "reward_forward",
              "actor_train", "critic_train")


def random_prompts(batch: int, length: int, tokenizer, device, generator) -> dict:
    special = set(tokenizer.all_special_ids)
    low = max(special) + 1 if special and max(special) < len(tokenizer) - 1 else 0
    ids = torch.randint(low, len(tokenizer), (batch, length), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def bench_ppo(cfg: BenchConfig, dist: Dist, resolved: ResolvedRun) -> dict:
    from dschat_cli.steps.rl.engines import PPOModels
    from dschat_cli.steps.rl.trainer import PPOTrainer

    ppo_cfg = bench_ppo_config(cfg)
    total = cfg.warmup + cfg.steps
    engines = ["fast", "hf"] if cfg.generation_engine == "both" else [cfg.generation_engine]
    what = "critic and reward models" if cfg.has_critic else "and reward models (no critic)"
    with console.status(f"building random-weight actor, reference, {what}"):
        models = PPOModels.build(ppo_cfg, dist, total * len(engines), total * len(engines),
                                 resolved=resolved)
    on_gpu = dist.device != "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[models.dtype]
    ceilings = measure_ceilings(dist.device, dtype)
    actor, reward = model_shape(models.actor.module), model_shape(models.reward.module)
    critic = model_shape(models.critic.module) if models.critic is not None else None
    # the rollout: cfg.prompts prompts x cfg.samples answers = cfg.batch sequences per GPU
    shape_args = dict(batch=cfg.batch, prompt=cfg.max_prompt_seq_len,
                      answer=cfg.max_answer_seq_len, bytes_per_param=dtype.itemsize,
                      ceilings=ceilings, gradient_checkpointing=cfg.gradient_checkpointing,
                      reward=reward)
    floors = ppo_floors(actor, critic, **shape_args)
    gen = torch.Generator().manual_seed(cfg.seed + dist.rank)
    results = {}
    for engine in engines:
        g = ppo_cfg.generation
        ecfg = dataclasses.replace(ppo_cfg, generation=dataclasses.replace(
            g, generation_engine=engine,
            old_logprobs=g.old_logprobs if engine == "fast" else "forward"))
        trainer = PPOTrainer(models, ecfg, dist, timer=PhaseTimer(enabled=True))
        rollouts = trainer.maker.generator
        rollouts.ignore_eos = True  # answers of exactly --max-answer-seq-len tokens
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        step_s, decode_s, decode_steps = [], 0.0, 0
        for i in range(total):
            if i == cfg.warmup:
                trainer.timer.reset()
            # the trainer answers each prompt cfg.samples times (consecutive rows)
            batch = random_prompts(cfg.prompts, cfg.max_prompt_seq_len, models.tokenizer,
                                    models.actor.device, gen)
            sync(on_gpu)
            t0 = time.perf_counter()
            rollout = trainer.generate_experience(batch)
            trainer.train([rollout])
            sync(on_gpu)
            if i >= cfg.warmup:
                step_s.append(time.perf_counter() - t0)
                if rollouts.engine is not None:
                    decode_s += rollouts.engine.last_timings.get("decode_s", 0.0)
                    decode_steps += rollouts.engine.last_timings.get("decode_steps", 0)
            console.print(f"[dim]{engine} step {i + 1}/{total}"
                          f"{' (warm-up)' if i < cfg.warmup else ''}: "
                          f"{time.perf_counter() - t0:.2f} s[/dim]")
        n = len(step_s)
        phases = {k: v / n for k, v in trainer.timer.seconds.items()}
        tp = rollouts.tensor_parallel
        e_floors = floors if tp is None else ppo_floors(
            actor, critic, **shape_args,
            decode_params=sum(p.numel() for p in tp.replica.parameters()))
        step = statistics.mean(step_s)
        gen_s = phases.get("generation", 0.0)
        if decode_steps:
            decode_ms = decode_s / decode_steps * 1e3
            decode_kind = "decode step"
        else:  # hf: the rollout's time per generated token, prefill included
            decode_ms = gen_s / cfg.max_answer_seq_len * 1e3
            decode_kind = "generated token (prefill included)"
        used = {k: e_floors[k] for k in phases if k in e_floors}
        floor_step = sum(f[2] for f in used.values())
        flops = sum(f[0] for f in used.values())
        tokens = cfg.batch * (cfg.max_prompt_seq_len + cfg.max_answer_seq_len) * dist.world_size
        results[engine] = {
            "step_seconds": step, "step_seconds_all": step_s,
            "tokens_per_s": tokens / step, "samples_per_s": cfg.batch * dist.world_size / step,
            "generation_share": gen_s / step, "decode_ms": decode_ms, "decode_kind": decode_kind,
            "decode_floor_ms": e_floors["decode_step"] * 1e3,
            "decode_x_floor": decode_ms / (e_floors["decode_step"] * 1e3),
            "floor_seconds": floor_step, "step_x_floor": step / floor_step,
            "tflops": flops / step / 1e12,
            "phases": {k: {"seconds": v, "share": v / step,
                           "tflops": e_floors[k][0] / v / 1e12 if k in e_floors and v else None,
                           "floor_seconds": e_floors[k][2] if k in e_floors else None}
                       for k, v in phases.items()},
            "other_seconds": step - sum(phases.values()),
            "logprob_gap": trainer.maker.last_parity[0] if trainer.maker.last_parity else None,
            "old_logprobs": trainer.maker.source.describe(engine == "fast"),
            "decode_step": rollouts.compile_line() if engine == "fast" else None,
            "peak_memory_gib": peak_gib(dist, on_gpu),
            "graph_captures": rollouts.engine.captures if rollouts.engine else None,
            "generation_tensor_parallel": tp.size if tp is not None else 1,
        }
        if rollouts.engine is not None:
            rollouts.engine.release()
        del trainer
    return {"step": "ppo", "device": device_name(dist), "world_size": dist.world_size,
            "dtype": models.dtype, "actor": cfg.actor,
            "critic": cfg.critic if critic is not None else None, "reward": cfg.critic,
            "actor_params": actor.params,
            "critic_params": critic.params if critic is not None else None,
            "reward_params": reward.params,
            "advantage_estimator": cfg.advantage_estimator, "samples_per_prompt": cfg.samples,
            "prompts_per_gpu": cfg.prompts,
            "batch_size": cfg.batch, "micro_batch_size": cfg.micro,
            "max_prompt_seq_len": cfg.max_prompt_seq_len,
            "max_answer_seq_len": cfg.max_answer_seq_len, "steps": cfg.steps, "warmup": cfg.warmup,
            "actor_zero_stage": cfg.actor_zero_stage, "critic_zero_stage": cfg.critic_zero_stage,
            "actor_zero": zero_label(resolved.ds_config("actor")),
            "critic_zero": zero_label(resolved.ds_config("critic")) if critic is not None
            else None,
            "old_logprobs": cfg.old_logprobs,
            "generation_tensor_parallel": cfg.generation_tensor_parallel, "ceilings": ceilings,
            "engines": results}
