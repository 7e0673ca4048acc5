"""`dschat bench`: the reference's benchmark setting on random weights of real architectures.

    dschat bench                          # step 3: opt-1.3b actor, opt-350m critic/reward, 256+256
    dschat bench --advantage-estimator grpo   # no critic; 64 answers = 8 prompts x 8 per GPU
    dschat bench --step sft --actor opt-1.3b --batch-size 32
    dschat bench --step dpo --actor-zero-stage 0 --batch-size 8   # 8 pairs of 2 x (256 + 256)

Step 3 runs the real PPOTrainer (the code `dschat ppo` runs) on synthetic prompts of exactly
--max-prompt-seq-len tokens, answers of exactly --max-answer-seq-len tokens (eos suppressed), warm-up steps, then
--steps measured steps, with every phase timed between GPU synchronisations. --batch-size counts
answers (sequences): --batch-size / --samples-per-prompt prompts per GPU, each answered
--samples-per-prompt times, so the tokens per step, and tokens/s, compare like for like across
estimators; a critic-free estimator (grpo, ...) has no critic phases. Each phase is set
against its floor: the FLOPs it must do at the device's measured matmul speed, or the bytes it
must move at its measured copy bandwidth, whichever is larger. FLOPs counted per token of a
forward pass: 2 x (matmul parameters) + 4 x layers x hidden x sequence length (attention scores
and values), the output head only on the positions whose logits the step needs (step 3's answer
tokens, a prefill's last position, DPO's answers); backward is 2x forward. A decode step must read every weight once and the KV cache
written so far.

DPO runs `dschat dpo`'s own pieces (steps/dpo.py's reference, forward and logprobs, rlhf/dpo.py's
loss, its DeepSpeed configs) on --batch-size random pairs per GPU: a shared prompt of exactly
--max-prompt-seq-len tokens, then a chosen and a rejected answer of --max-answer-seq-len tokens
each that differ from their first token. Its phases: the reference's forward (none with
--precompute-ref-logprobs), the policy's forward (logits, logprobs, loss) and backward, and the
optimizer step. tokens/s counts the tokens of both sequences of every pair.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from dschat_cli.config.bench import (BenchConfig, bench_dpo_config, bench_ppo_config,
                                     bench_sft_config)
from dschat_cli.config.resolved import ResolvedRun
from dschat_cli.dist import Dist
from dschat_cli.report.records import write_atomic
from dschat_cli.steps.common import PhaseTimer, count_params, seed_everything
from dschat_cli.ui.console import console

PPO_PHASES = ("generation", "actor_forward", "ref_forward", "critic_forward", "reward_forward",
              "actor_train", "critic_train")


# device ceilings ---------------------------------------------------------------------------------
def measure_ceilings(device: str, dtype: torch.dtype) -> dict:
    """Measured matmul FLOP/s (square matmuls in the training dtype) and copy bandwidth (bytes
    read + written per second) of this device: the denominators of every floor."""
    on_gpu = device != "cpu"
    n = 8192 if on_gpu else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = _best_seconds(lambda: a @ b, on_gpu, reps=10)
    size = (1 << 30) if on_gpu else (1 << 24)  # bytes
    x = torch.empty(size, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    cp = _best_seconds(lambda: y.copy_(x), on_gpu, reps=10)
    return {"matmul_tflops": 2 * n ** 3 / mm / 1e12, "copy_gbps": 2 * size / cp / 1e9}


def _best_seconds(fn, on_gpu: bool, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        _sync(on_gpu)
        t = time.perf_counter()
        fn()
        _sync(on_gpu)
        best = min(best, time.perf_counter() - t)
    return best


def _sync(on_gpu: bool) -> None:
    if on_gpu:
        torch.cuda.synchronize()


# model shapes and FLOPs --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shape:
    params: int         # all parameters (what a decode step reads)
    matmul_params: int  # parameters used as matmul weights (input embeddings excluded without head)
    layers: int
    hidden: int
    head_params: int = 0  # of matmul_params, the output head's (vocab x hidden; 0: a value head)

    def forward_flops(self, tokens: int, seq_len: int, head_tokens: int | None = None) -> float:
        """A forward pass over `tokens` tokens of `seq_len`-token sequences whose output head
        runs on `head_tokens` of them (default all): only the positions whose logits the step
        needs count (step 3 scores the answer tokens; a prefill samples from its last
        position), so a phase that computes more is measured against the work it must do."""
        body = self.matmul_params - self.head_params
        head = tokens if head_tokens is None else head_tokens
        return (tokens * (2 * body + 4 * self.layers * self.hidden * seq_len)
                + head * 2 * self.head_params)


def model_shape(module) -> Shape:
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    cfg = getattr(base, "config", None) or base.backbone.config
    layers = next(getattr(cfg, k) for k in ("num_hidden_layers", "n_layer", "num_layers")
                  if getattr(cfg, k, None))
    hidden = next(getattr(cfg, k) for k in ("hidden_size", "n_embd", "d_model")
                  if getattr(cfg, k, None))
    n = count_params(module)
    has_head = hasattr(base, "get_output_embeddings") and base.get_output_embeddings() is not None
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else \
        base.backbone.get_input_embeddings()
    emb_n = getattr(emb.weight, "ds_numel", emb.weight.numel())
    head = base.get_output_embeddings() if has_head else None
    head_n = getattr(head.weight, "ds_numel", head.weight.numel()) if head is not None else 0
    return Shape(params=n, matmul_params=n if has_head else n - emb_n, layers=layers,
                 hidden=hidden, head_params=head_n)


def ppo_floors(actor: Shape, critic: Shape | None, *, batch: int, prompt: int, answer: int,
               bytes_per_param: int, ceilings: dict, gradient_checkpointing: bool,
               decode_params: int | None = None, reward: Shape | None = None) -> dict:
    """{phase: (flops, bytes, floor seconds)} for one PPO step on one GPU, and the decode step's
    bandwidth floor in seconds ('decode_step'). `batch`: the rollout's sequences (prompts x
    samples per prompt; each prompt is prefilled once per answer). `critic` None: a critic-free
    estimator, no critic_forward or critic_train. `reward`: the reward model (default: the
    critic's shape). `decode_params`: the parameters a decode step reads on one GPU (default all
    of the actor's; tensor-parallel generation: its shard). Under N-way tensor parallelism a GPU
    decodes N x batch rows with 1/N of the heads: the same KV cache bytes and about the same
    FLOPs."""
    reward = reward or critic
    weights = (actor.params if decode_params is None else decode_params) * bytes_per_param
    mm = ceilings["matmul_tflops"] * 1e12
    bw = ceilings["copy_gbps"] * 1e9
    S = prompt + answer
    tokens = batch * S
    recompute = 4 / 3 if gradient_checkpointing else 1.0
    out = {}
    # generation: the prefill is compute-bound; each decode step reads all weights and the KV
    # cache so far (2 tensors x layers x batch x context x hidden, 2 bytes), and does 2N flops
    # per token
    prefill_flops = actor.forward_flops(batch * prompt, prompt, head_tokens=batch)
    gen_flops, gen_bytes, decode_floor = prefill_flops, 0.0, prefill_flops / mm
    for t in range(1, answer):
        ctx = prompt + t
        kv = 2 * actor.layers * batch * ctx * actor.hidden * bytes_per_param
        step_bytes = weights + kv
        step_flops = actor.forward_flops(batch, ctx)
        gen_flops += step_flops
        gen_bytes += step_bytes
        decode_floor += max(step_bytes / bw, step_flops / mm)
    out["generation"] = (gen_flops, gen_bytes, decode_floor)
    for name, shape in (("actor_forward", actor), ("ref_forward", actor),
                        ("critic_forward", critic), ("reward_forward", reward)):
        if shape is None:
            continue
        # the actor's and reference's logits: the answer positions only (rewards and values
        # come from small heads)
        f = shape.forward_flops(tokens, S, head_tokens=batch * answer)
        out[name] = (f, 0.0, f / mm)
    for name, shape in (("actor_train", actor), ("critic_train", critic)):
        if shape is None:
            continue
        f = 3 * shape.forward_flops(tokens, S, head_tokens=batch * answer) * recompute
        # Adam: read+write fp32 master weight and two moments, read the gradient: ~20 B/param
        b = 20.0 * shape.params
        out[name] = (f, b, f / mm + b / bw)
    mid = prompt + answer // 2
    out["decode_step"] = (weights + 2 * actor.layers * batch * mid * actor.hidden
                          * bytes_per_param) / bw
    return out


DPO_PHASES = ("ref_forward", "policy_forward", "policy_backward", "optimizer_step")
ADAM_BYTES = 28  # per trained parameter: fp32 master weight and both moments read and written
# (24 B), the gradient read and the bf16 weight written (2 + 2 B)


def dpo_floors(policy: Shape, *, pairs: int, seq_len: int, ceilings: dict,
               gradient_checkpointing: bool, reference: bool, answer: int | None = None) -> dict:
    """{phase: (flops, bytes, floor seconds)} of one DPO step on one GPU over `pairs` pairs =
    2 x pairs sequences of seq_len tokens: the reference's forward (when `reference`), the
    policy's forward and backward (2x forward; + one forward recomputed with gradient
    checkpointing), and Adam's pass over the weights and its states (bytes, not FLOPs). The
    output head counts on each sequence's `answer` tokens (default all): the logprobs of DPO are
    the answers'."""
    mm = ceilings["matmul_tflops"] * 1e12
    bw = ceilings["copy_gbps"] * 1e9
    f = policy.forward_flops(2 * pairs * seq_len, seq_len,
                             head_tokens=None if answer is None else 2 * pairs * answer)
    back = (3 if gradient_checkpointing else 2) * f
    out = {"policy_forward": (f, 0.0, f / mm), "policy_backward": (back, 0.0, back / mm)}
    if reference:
        out["ref_forward"] = (f, 0.0, f / mm)
    b = float(ADAM_BYTES * policy.params)
    out["optimizer_step"] = (0.0, b, b / bw)
    return out


# the three benchmarks ----------------------------------------------------------------------------
def run(cfg: BenchConfig, dist: Dist, resolved: ResolvedRun) -> dict:
    seed_everything(cfg.seed)
    bench = {"sft": _bench_sft, "dpo": _bench_dpo, "ppo": _bench_ppo}[cfg.step]
    try:
        result = {**bench(cfg, dist, resolved), "status": "ok"}
    except torch.OutOfMemoryError as e:
        if dist.world_size > 1:  # the other ranks wait in a collective: no clean way on
            raise
        # one GPU: a result in its own right (the launch's batch search tries a smaller one)
        result = {"step": cfg.step, "device": _device_name(dist), "world_size": 1,
                  "batch_size": cfg.batch, "status": "out_of_memory",
                  "error": str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"}
        console.print(f"[warn]batch {cfg.batch}: out of GPU memory[/warn] ({result['error']})")
        if dist.is_main:
            Path(resolved.output_dir).mkdir(parents=True, exist_ok=True)
            write_atomic(Path(resolved.output_dir) / "bench.json",
                         json.dumps(result, indent=2) + "\n")
        return result
    if dist.is_main:
        out = Path(resolved.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(result, indent=2) + "\n"
        write_atomic(out / "bench.json", text)
        if cfg.json:
            write_atomic(Path(cfg.json).expanduser(), text)
        _print(result)
    dist.barrier()
    return result


def _random_prompts(batch: int, length: int, tokenizer, device, generator) -> dict:
    special = set(tokenizer.all_special_ids)
    low = max(special) + 1 if special and max(special) < len(tokenizer) - 1 else 0
    ids = torch.randint(low, len(tokenizer), (batch, length), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _bench_ppo(cfg: BenchConfig, dist: Dist, resolved: ResolvedRun) -> dict:
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
            batch = _random_prompts(cfg.prompts, cfg.max_prompt_seq_len, models.tokenizer,
                                    models.actor.device, gen)
            _sync(on_gpu)
            t0 = time.perf_counter()
            rollout = trainer.generate_experience(batch)
            trainer.train([rollout])
            _sync(on_gpu)
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
            "peak_memory_gib": _peak_gib(dist, on_gpu),
            "graph_captures": rollouts.engine.captures if rollouts.engine else None,
            "generation_tensor_parallel": tp.size if tp is not None else 1,
        }
        if rollouts.engine is not None:
            rollouts.engine.release()
        del trainer
    return {"step": "ppo", "device": _device_name(dist), "world_size": dist.world_size,
            "dtype": models.dtype, "actor": cfg.actor,
            "critic": cfg.critic if critic is not None else None, "reward": cfg.critic,
            "actor_params": actor.params,
            "critic_params": critic.params if critic is not None else None,
            "reward_params": reward.params,
            "advantage_estimator": cfg.advantage_estimator, "samples_per_prompt": cfg.samples,
            "prompts_per_gpu": cfg.prompts,
            "batch_size": cfg.batch, "max_prompt_seq_len": cfg.max_prompt_seq_len,
            "max_answer_seq_len": cfg.max_answer_seq_len, "steps": cfg.steps, "warmup": cfg.warmup,
            "actor_zero_stage": cfg.actor_zero_stage, "critic_zero_stage": cfg.critic_zero_stage,
            "old_logprobs": cfg.old_logprobs,
            "generation_tensor_parallel": cfg.generation_tensor_parallel, "ceilings": ceilings,
            "engines": results}


def _bench_sft(cfg: BenchConfig, dist: Dist, resolved: ResolvedRun) -> dict:
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
        batch = _random_prompts(cfg.batch, S, tokenizer, engine.device, gen)
        _sync(on_gpu)
        t0 = time.perf_counter()
        loss = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      labels=batch["input_ids"], use_cache=False).loss
        _sync(on_gpu)  # each phase between synchronisations: the sums add up to the step
        t1 = time.perf_counter()
        engine.backward(loss)
        _sync(on_gpu)
        t2 = time.perf_counter()
        engine.step()
        _sync(on_gpu)
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
    return {"step": "sft", "device": _device_name(dist), "world_size": dist.world_size,
            "dtype": dtype_name, "actor": cfg.actor, "actor_params": n_params,
            "batch_size": cfg.batch, "seq_len": S, "steps": cfg.steps, "warmup": cfg.warmup,
            "zero_stage": cfg.actor_zero_stage, "ceilings": ceilings,
            "step_seconds": step, "step_seconds_all": step_s, "tokens_per_s": tokens / step,
            "phases": {k: statistics.mean(v) for k, v in phase_s.items()},
            "tflops_per_gpu": flops / dist.world_size / step / 1e12,
            "floor_seconds": floor, "step_x_floor": step / floor,
            "peak_memory_gib": _peak_gib(dist, on_gpu)}


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


def _bench_dpo(cfg: BenchConfig, dist: Dist, resolved: ResolvedRun) -> dict:
    import gc

    import deepspeed

    from dschat_cli.models.loading import load_causal_lm, load_tokenizer, optimizer_groups
    from dschat_cli.rlhf.dpo import dpo_loss
    from dschat_cli.steps.common import init_engine, move_batch
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
        ref_engine, *_ = deepspeed.initialize(model=ref_model, config=resolved.ds_config("ref"))
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
        _sync(on_gpu)
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
        _sync(on_gpu)
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
    return {"step": "dpo", "device": _device_name(dist), "world_size": dist.world_size,
            "dtype": dtype_name, "actor": cfg.actor, "actor_params": n_params,
            "batch_size": cfg.batch, "sequences_per_gpu": 2 * cfg.batch,
            "max_prompt_seq_len": cfg.max_prompt_seq_len,
            "max_answer_seq_len": cfg.max_answer_seq_len, "seq_len": S, "tokens_per_pair": 2 * S,
            "steps": cfg.steps, "warmup": cfg.warmup, "zero_stage": cfg.actor_zero_stage,
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
            "peak_memory_gib": _peak_gib(dist, on_gpu)}


def _peak_gib(dist: Dist, on_gpu: bool) -> float | None:
    if not on_gpu:
        return None
    return dist.all_reduce_max(torch.cuda.max_memory_allocated() / 2**30)


def _device_name(dist: Dist) -> str:
    if dist.device == "cpu":
        return "cpu"
    return f"{dist.world_size} x {torch.cuda.get_device_name()}"


# the report --------------------------------------------------------------------------------------
def _print(r: dict) -> None:
    from rich.table import Table

    c = r["ceilings"]
    console.print(f"[bold]dschat bench[/bold] {r['step']}: {r['device']}, {r['dtype']}; measured "
                  f"ceilings: matmul {_fmt(c['matmul_tflops'], '.0f')} TFLOP/s, copy "
                  f"{c['copy_gbps']:.0f} GB/s")
    if r["step"] == "dpo":
        _print_dpo(r)
        return
    if r["step"] == "sft":
        t = Table(title=f"step 1: {r['actor']} ({r['actor_params'] / 1e6:.0f}M), batch "
                        f"{r['batch_size']} x {r['seq_len']} tokens per GPU, "
                        f"ZeRO-{r['zero_stage']}",
                  title_justify="left")
        ph = r.get("phases") or {}
        cols = ("s/step", "forward s", "backward s", "optimizer step s", "tokens/s",
                "TFLOP/s per GPU", "x floor", "peak GiB")
        for col in cols:
            t.add_column(col, justify="right")
        t.add_row(f"{r['step_seconds']:.3f}",
                  *(_fmt(ph.get(k), ".3f") for k in ("forward", "backward", "optimizer_step")),
                  f"{r['tokens_per_s']:,.0f}", _fmt(r['tflops_per_gpu'], ".0f"),
                  f"{r['step_x_floor']:.2f}", _fmt(r["peak_memory_gib"], ".1f"))
        console.print(t)
        return
    engines = r["engines"]
    est, k = r.get("advantage_estimator", "gae"), r.get("samples_per_prompt", 1)
    models = (f"critic {r['critic']}" if r.get("critic") else
              f"reward {r.get('reward')}, no critic ({est})")
    batch = f"{r['batch_size']} answers per GPU ({r['prompts_per_gpu']} prompts x {k})" \
        if k > 1 else f"batch {r['batch_size']} per GPU"
    t = Table(title=f"step 3 per phase (seconds per PPO step): actor {r['actor']}, {models}, "
                    f"{batch}, {r['max_prompt_seq_len']} + {r['max_answer_seq_len']} tokens",
              title_justify="left")
    t.add_column("phase")
    for e in engines:
        t.add_column(f"{e} s", justify="right")
        t.add_column(f"{e} TFLOP/s", justify="right")
    t.add_column("floor s", justify="right")
    names = [p for p in PPO_PHASES if any(p in v["phases"] for v in engines.values())]
    first = next(iter(engines.values()))
    for p in names:
        row = [p.replace("_", " ")]
        for v in engines.values():
            ph = v["phases"].get(p)
            row += [_fmt(ph and ph["seconds"], ".3f"), _fmt(ph and ph["tflops"], ".0f")]
        fl = next((v["phases"][p]["floor_seconds"] for v in engines.values() if p in v["phases"]),
                  None)
        t.add_row(*row, _fmt(fl, ".3f"))
    t.add_row("other", *sum(([f"{v['other_seconds']:.3f}", ""] for v in engines.values()), []), "")
    t.add_row("[bold]step", *sum(([f"{v['step_seconds']:.3f}", _fmt(v['tflops'], ".0f")]
                                  for v in engines.values()), []),
              f"{first['floor_seconds']:.3f}")
    console.print(t)
    s = Table(title=f"step 3 summary ({est})", title_justify="left")
    for col in ("engine", "tokens/s", "answers/s", "gen", "decode ms", "floor ms", "x floor",
                "step x floor", "lp gap", "peak GiB"):
        s.add_column(col, justify="right")
    for e, v in engines.items():
        s.add_row(e, f"{v['tokens_per_s']:,.0f}", f"{v['samples_per_s']:.1f}",
                  f"{v['generation_share']:.0%}", f"{v['decode_ms']:.2f}",
                  f"{v['decode_floor_ms']:.2f}", f"{v['decode_x_floor']:.2f}",
                  f"{v['step_x_floor']:.2f}", _fmt(v["logprob_gap"], ".4f"),
                  _fmt(v["peak_memory_gib"], ".1f"))
    console.print(s)
    console.print("[dim]gen: generation's share of the step; decode ms: per decode step (fast) or "
                  "per generated token including the prefill (hf); floor ms: weights + KV cache at "
                  "the mean context over the measured copy bandwidth; lp gap: mean |logprob| "
                  "difference, fast engine vs forward; tokens/s: prompt + answer tokens of every "
                  "answer (sequence) of all GPUs per second[/dim]")


def _print_dpo(r: dict) -> None:
    from rich.table import Table

    P, A, B = r["max_prompt_seq_len"], r["max_answer_seq_len"], r["batch_size"]
    ref = ("reference precomputed (no reference forward)" if r["reference"] == "precomputed"
           else "reference: a frozen copy")
    t = Table(title=f"DPO step per phase: policy {r['actor']} ({r['actor_params'] / 1e6:.0f}M), "
                    f"{B} pairs per GPU = {2 * B} sequences of {P} + {A} tokens (chosen and "
                    f"rejected share the prompt: pairs of 2 x {P + A} tokens), "
                    f"ZeRO-{r['zero_stage']}, {ref}", title_justify="left")
    for col, just in (("phase", "left"), ("s", "right"), ("share", "right"),
                      ("TFLOP/s", "right"), ("floor s", "right"), ("x floor", "right")):
        t.add_column(col, justify=just)
    for name in DPO_PHASES:
        ph = r["phases"].get(name)
        if ph is None:
            continue
        t.add_row(name.replace("_", " "), f"{ph['seconds']:.4f}", f"{ph['share']:.0%}",
                  _fmt(ph["tflops"], ".0f"), f"{ph['floor_seconds']:.4f}",
                  f"{ph['seconds'] / ph['floor_seconds']:.2f}" if ph["floor_seconds"] else "-")
    step = r["step_seconds"]
    t.add_row("other", f"{r['other_seconds']:.4f}", f"{r['other_seconds'] / step:.0%}", "", "", "")
    t.add_row("[bold]step", f"{step:.4f}", "100%", _fmt(r["tflops_per_gpu"], ".0f"),
              f"{r['floor_seconds']:.4f}", f"{r['step_x_floor']:.2f}")
    console.print(t)
    s = Table(title="DPO summary", title_justify="left")
    for col in ("tokens/s", "pairs/s", "TFLOP/s per GPU", "step x floor", "loss", "peak GiB"):
        s.add_column(col, justify="right")
    s.add_row(f"{r['tokens_per_s']:,.0f}", f"{r['pairs_per_s']:.1f}",
              _fmt(r["tflops_per_gpu"], ".0f"), f"{r['step_x_floor']:.2f}",
              f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}", _fmt(r["peak_memory_gib"], ".1f"))
    console.print(s)
    console.print("[dim]tokens/s: the tokens of both sequences of every pair (chosen and rejected, "
                  "the shared prompt counted in each) of all GPUs per second; TFLOP/s: the "
                  "policy's forward + backward and the reference's forward, 2 x matmul "
                  "parameters + 4 x layers x hidden x sequence length per token and forward "
                  "(backward 2x), over the whole step; floor: the FLOPs at the measured matmul "
                  "speed, the optimizer step's bytes (28 per parameter) at the measured copy "
                  "bandwidth; other: the batch's copy to the GPU and the loss read back[/dim]")


def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if spec == ".0f" and abs(v) < 10:  # small figures (CPU runs) keep their digits
        spec = ".3g"
    return format(v, spec)
