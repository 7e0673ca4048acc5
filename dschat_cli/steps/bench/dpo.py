"""`dschat bench --step dpo`: `dschat dpo`'s step on random pairs, every phase timed."""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from dschat_cli.config.bench import BenchConfig, bench_dpo_config
from dschat_cli.config.ds_config import zero_label
from dschat_cli.config.resolved import ResolvedRun
from dschat_cli.dist import Dist
from dschat_cli.steps.bench.floors import (device_name, dpo_floors, measure_ceilings, model_shape,
                                           peak_gib, sync)
from dschat_cli.steps.common import PhaseTimer, count_params
from dschat_cli.ui.console import console


def _random_pairs(pairs: int, prompt: int, answer: int, tokenizer, generator) -> dict:
    """`pairs` pairs as collate_pairs lays them out (input_ids (2B, P + A), rows 0..B-1 chosen,
    B..2B-1 rejected; no padding): one random prompt per pair, shared by its two rows, then two
    random answers that differ from their first token (so every answer token counts)."""
    special = set(tokenizer.all_special_ids)
    high = len(tokenizer)
    low = max(special) + 1 if special and max(special) < high - 2 else 0
    shared = torch.randint(low, high, (pairs, prompt), generator=generator)
    chosen = torch.randint(low, high, (pairs, answer), generator=generator)
    rejected = torch.randint(low, high, (pairs, answer), generator=generator)
    rejected[:, 0] = low + (chosen[:, 0] - low + 1) % (high - low)
    ids = torch.cat([torch.cat([shared, chosen], 1), torch.cat([shared, rejected], 1)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def bench_dpo(cfg: BenchConfig, dist: Dist, resolved: ResolvedRun) -> dict:
    import gc

    from dschat_cli.models.loading import load_causal_lm, load_tokenizer, optimizer_groups
    from dschat_cli.rlhf.dpo import dpo_loss
    from dschat_cli.steps.common import ds_initialize, init_engine, move_batch
    from dschat_cli.steps.dpo import Reference, forward_logits, pair_logprobs

    dpo_cfg = bench_dpo_config(cfg)
    dtype_name, ds_config = resolved.dtype, resolved.ds_config("model")
    tokenizer = load_tokenizer(dpo_cfg.model)
    on_gpu = dist.device != "cpu"
    total = cfg.warmup + cfg.steps
    S = cfg.max_prompt_seq_len + cfg.max_answer_seq_len
    gen = torch.Generator().manual_seed(cfg.seed + dist.rank)
    batches = [_random_pairs(cfg.batch, cfg.max_prompt_seq_len, cfg.max_answer_seq_len,
                             tokenizer, gen) for _ in range(total)]
    # as steps/dpo.py: the reference copy first, from the same seed as the policy (both start from
    # the same random weights); with --precompute-ref-logprobs it scores every batch, then is freed
    torch.manual_seed(cfg.seed)
    ref_opts = dataclasses.replace(dpo_cfg.model, gradient_checkpointing=False)
    with console.status("building the random-weight reference copy"):
        ref_model = load_causal_lm(ref_opts, tokenizer, dtype=dtype_name,
                                   ds_config=resolved.ds_config("ref"), device=dist.device)
        ref_engine = ds_initialize(model=ref_model, config=resolved.ds_config("ref"))
        ref_engine.eval()
    del ref_model
    reference, precomputed = Reference(engine=ref_engine), None
    if cfg.precompute_ref_logprobs:
        precomputed = [reference.compute(move_batch(b, dist.device)) for b in batches]
        getattr(ref_engine, "destroy", lambda: None)()  # hooks and partitions, as steps/dpo.py
        reference.engine = None
        del ref_engine
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    torch.manual_seed(cfg.seed)
    with console.status("building the random-weight policy"):
        model = load_causal_lm(dpo_cfg.model, tokenizer, dtype=dtype_name, ds_config=ds_config,
                               device=dist.device)
    n_params = count_params(model)
    engine = init_engine(model, optimizer_groups(model, weight_decay=dpo_cfg.optim.weight_decay,
                                                 lora_lr=0.0), ds_config, dpo_cfg.optim, total)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    ceilings = measure_ceilings(dist.device, dtype)
    shape = model_shape(engine.module)
    floors = dpo_floors(shape, pairs=cfg.batch, seq_len=S, ceilings=ceilings,
                        gradient_checkpointing=cfg.gradient_checkpointing,
                        reference=precomputed is None, answer=cfg.max_answer_seq_len)
    d = dpo_cfg.dpo
    timer = PhaseTimer(enabled=True)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    step_s, losses = [], []
    engine.train()
    for i in range(total):
        if i == cfg.warmup:
            timer.reset()
        sync(on_gpu)
        t0 = time.perf_counter()
        batch = move_batch(batches[i], engine.device)
        if precomputed is None:
            with timer("ref_forward"):
                ref = reference.compute(batch)  # (B, 2), no grad
        else:
            ref = precomputed[i]
        with timer("policy_forward"):
            pc, pr, _, _ = pair_logprobs(forward_logits(engine, batch), batch)
            out = dpo_loss(pc, pr, ref[:, 0], ref[:, 1], beta=d.beta,
                           label_smoothing=d.label_smoothing, loss_type=d.loss_type)
        with timer("policy_backward"):
            engine.backward(out.loss)
        with timer("optimizer_step"):
            engine.step()
        losses.append(out.loss.item())  # the step's loop reads its loss every micro-batch too
        sync(on_gpu)
        if i >= cfg.warmup:
            step_s.append(time.perf_counter() - t0)
        console.print(f"[dim]dpo step {i + 1}/{total}{' (warm-up)' if i < cfg.warmup else ''}: "
                      f"{time.perf_counter() - t0:.3f} s, loss {losses[-1]:.4f}[/dim]")
    n = len(step_s)
    step = statistics.mean(step_s)
    phases = {k: v / n for k, v in timer.seconds.items()}
    flops = sum(f[0] for k, f in floors.items() if k in phases)
    floor = sum(f[2] for k, f in floors.items() if k in phases)
    tokens = 2 * cfg.batch * S * dist.world_size  # chosen + rejected, prompt in each
    return {"step": "dpo", "device": device_name(dist), "world_size": dist.world_size,
            "dtype": dtype_name, "actor": cfg.actor, "actor_params": n_params,
            "batch_size": cfg.batch, "sequences_per_gpu": 2 * cfg.batch,
            "max_prompt_seq_len": cfg.max_prompt_seq_len,
            "max_answer_seq_len": cfg.max_answer_seq_len, "seq_len": S, "tokens_per_pair": 2 * S,
            "steps": cfg.steps, "warmup": cfg.warmup, "zero_stage": cfg.actor_zero_stage,
            "zero": zero_label(resolved.ds_config("model")),
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "reference": "precomputed" if precomputed is not None else "copy",
            "loss_type": d.loss_type, "beta": d.beta, "ceilings": ceilings,
            "step_seconds": step, "step_seconds_all": step_s, "tokens_per_s": tokens / step,
            "pairs_per_s": cfg.batch * dist.world_size / step,
            "tflops_per_gpu": flops / step / 1e12, "floor_seconds": floor,
            "step_x_floor": step / floor,
            "phases": {k: {"seconds": v, "share": v / step,
                           "tflops": floors[k][0] / v / 1e12 if floors[k][0] and v else None,
                           "floor_seconds": floors[k][2]} for k, v in phases.items()},
            "other_seconds": step - sum(phases.values()),
            "loss_first": losses[0], "loss_last": losses[-1],
            "peak_memory_gib": peak_gib(dist, on_gpu)}
