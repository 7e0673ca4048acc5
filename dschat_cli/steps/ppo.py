"""Step 3, RLHF with PPO:  dschat ppo --actor-model SFT_DIR --critic-model REWARD_DIR --output-dir OUT

Four models: the actor (trained, generates), the critic (trained, initialised from the reward
model), the reference (frozen copy of the initial actor) and the reward model (frozen). Per PPO
step:  # 1. generate  # 2. score  # 3. advantages  # 4. update  — the RL math is in rlhf/ppo.py.

Also a small Python API for custom loops:

    models = PPOModels.build(cfg, dist, total_actor_steps, total_critic_steps)
    trainer = PPOTrainer(models, cfg, dist)
    rollout = trainer.generate_experience(batch)       # batch: left-padded prompt ids and mask
    stats = trainer.train([rollout])                   # PPOStats
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from dschat_cli.config.ds_config import resolve_dtype
from dschat_cli.config.ppo import PPOConfig
from dschat_cli.dist import Dist
from dschat_cli.generation.fast import FastGenerator, Generated, check_parity
from dschat_cli.generation.rollout import rollout_context
from dschat_cli.models.loading import (apply_lora, gathered_state_dict, load_causal_lm,
                                       load_tokenizer, materialize, optimizer_groups, save_hf_model)
from dschat_cli.models.reward import (build_reward_model, check_same_tokenizer, positions_from_mask,
                                      save_reward_model)
from dschat_cli.rlhf.ppo import (PPOStats, Rollout, answer_logprobs, answer_positions, ema_update,
                                 gae_advantages_and_returns, kl_penalised_rewards, masked_mean,
                                 masked_whiten, policy_loss, sequence_kl, value_loss)
from dschat_cli.rlhf.reward import sequence_scores
from dschat_cli.config.ppo_ds import ppo_ds_configs
from dschat_cli.config.schedule import ppo_schedule
from dschat_cli.steps.common import (PhaseTimer, count_params, move_batch, peak_memory_gib,
                                     print_summary, seed_everything)
from dschat_cli.steps.checkpoint import CheckpointManager, Cycle, own_generator, skip_batches
from dschat_cli.steps.health import GradNorms, HealthMonitor, resolve_max_kl
from dschat_cli.ui.console import console
from dschat_cli.ui.progress import fmt_metrics, train_progress


@dataclass
class PPOModels:
    """The four models as DeepSpeed engines, plus the tokenizer they share."""
    actor: object
    ref: object
    critic: object
    reward: object
    tokenizer: object
    dtype: str
    ds_configs: dict

    @classmethod
    def build(cls, cfg: PPOConfig, dist: Dist, actor_steps: int, critic_steps: int) -> "PPOModels":
        import deepspeed
        from transformers import get_scheduler

        from dschat_cli.config.sections import ModelOptions

        on_gpu = dist.device != "cpu"
        dtype = resolve_dtype(cfg.deepspeed.dtype, has_gpu=on_gpu,
                              bf16_supported=on_gpu and torch.cuda.is_bf16_supported())
        out = Path(cfg.output_dir).expanduser().resolve()
        tb_dir = str(out / "tensorboard") if cfg.deepspeed.enable_tensorboard else None
        configs = ppo_ds_configs(cfg, world_size=dist.world_size, dtype=dtype,
                                 torch_adam=cfg.train.torch_adam or not on_gpu,
                                 tensorboard_dir=tb_dir)
        tokenizer = load_tokenizer(cfg.actor)
        reward_opts = ModelOptions(model=cfg.reward_model,
                                   trust_remote_code=cfg.critic.trust_remote_code) \
            if cfg.reward_model else _frozen(cfg.critic)
        reward_tok = load_tokenizer(cfg.critic)
        check_same_tokenizer(tokenizer, reward_tok, flag="--critic-model",
                             other_path=str(cfg.critic.model))

        def engine(model, config, optim, total):
            if optim is None:  # frozen: no optimizer, parameters partitioned under ZeRO-3
                eng, *_ = deepspeed.initialize(model=model, config=config)
                eng.eval()
                return eng
            groups = optimizer_groups(model, weight_decay=optim.weight_decay,
                                      lora_lr=optim.lora_lr)
            eng, *_ = deepspeed.initialize(
                model=model, model_parameters=groups, config=config,
                lr_scheduler=lambda opt: get_scheduler(optim.scheduler, opt,
                                                       num_warmup_steps=optim.warmup,
                                                       num_training_steps=total))
            return eng

        actor_model = load_causal_lm(cfg.actor, tokenizer, dtype=dtype, ds_config=configs["actor"],
                                     device=dist.device)
        actor_model = apply_lora(actor_model, cfg.actor_lora, flag_prefix="actor-")
        a_opt = _Opt(cfg.train.actor_weight_decay, cfg.actor_lora.lora_learning_rate,
                     cfg.train.lr_scheduler_type, cfg.train.num_warmup_steps)
        actor = engine(actor_model, configs["actor"], a_opt, actor_steps)

        ref_model = load_causal_lm(_frozen(cfg.actor), tokenizer, dtype=dtype,
                                   ds_config=configs["ref"], device=dist.device)
        ref = engine(ref_model, configs["ref"], None, 0)

        torch.manual_seed(cfg.seed)  # LoRA of the critic starts identical on every rank
        critic_model = build_reward_model(cfg.critic, tokenizer, dtype=dtype,
                                          ds_config=configs["critic"], device=dist.device,
                                          lora=cfg.critic_lora)
        c_opt = _Opt(cfg.train.critic_weight_decay, cfg.critic_lora.lora_learning_rate,
                     cfg.train.lr_scheduler_type, cfg.train.num_warmup_steps)
        critic = engine(critic_model, configs["critic"], c_opt, critic_steps)

        reward_model = build_reward_model(reward_opts, tokenizer, dtype=dtype,
                                          ds_config=configs["reward"], device=dist.device,
                                          flag="--reward-model")
        reward = engine(reward_model, configs["reward"], None, 0)
        return cls(actor=actor, ref=ref, critic=critic, reward=reward, tokenizer=tokenizer,
                   dtype=dtype, ds_configs=configs)


@dataclass(frozen=True)
class _Opt:
    weight_decay: float
    lora_lr: float
    scheduler: str
    warmup: int


def _frozen(opts):
    """The frozen copy of a model's options: no gradient checkpointing (it only runs in eval
    mode, so its dropout setting never applies)."""
    import dataclasses

    return dataclasses.replace(opts, dropout=None, gradient_checkpointing=False)


class PPOTrainer:
    """generate_experience(batch) -> Rollout; train([Rollout, ...]) -> PPOStats."""

    def __init__(self, models: PPOModels, cfg: PPOConfig, dist: Dist, unsup_iter=None):
        self.m = models
        self.cfg = cfg
        self.dist = dist
        self.unsup_iter = unsup_iter
        self.actor_zero3 = cfg.deepspeed.actor_zero_stage == 3
        # EMA of the actor's parameters (fp32), kept on rank 0: on the GPU beside the model, or
        # on the CPU under ZeRO-3 where the model itself is partitioned
        self.ema: dict[str, torch.Tensor] | None = None
        if cfg.ppo.enable_ema:
            self.ema = self._actor_params(to_cpu=self.actor_zero3)
        self.last_generation_s = 0.0
        self.rollouts = 0  # rollouts generated so far (numbers the parity checks)
        self.last_parity: tuple[float, float] | None = None  # (mean, max) logprob gap
        # the fast engine, built at the first rollout (None with --generation-engine hf)
        self.generator: FastGenerator | None = None
        self.tp_rollout = None  # --generation-tensor-parallel > 1: the sharded actor copy
        self.ignore_eos = False  # benchmarks: answers of exactly --max-answer-seq-len tokens
        self.timer = PhaseTimer(enabled=False)  # per-phase seconds (dschat bench enables it)
        # the global gradient norm of each optimizer step, for the health monitor
        self.grad_norms = {"actor": GradNorms(models.actor), "critic": GradNorms(models.critic)}
        # Models are built (identically on every rank); from here each rank samples its own
        # answers, so the sampling seed differs per rank.
        torch.manual_seed(cfg.seed + dist.rank)

    # 1. generate -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Generated:
        """Sample answers for left-padded prompts: (B, P) -> Generated(seq (B, P + A), logprobs
        (B, A) or None with the hf engine). Under actor ZeRO-3 the parameters are gathered once
        for the whole rollout, not once per token."""
        g = self.cfg.generation
        tok = self.m.tokenizer
        module = self.m.actor.module
        if g.generation_engine == "fast":
            fast_kwargs = dict(
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                max_new_tokens=g.max_answer_seq_len, do_sample=g.do_sample,
                temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                ignore_eos=self.ignore_eos, max_prompt_len=self.cfg.data.max_prompt_seq_len)
            if g.generation_tensor_parallel > 1:
                return self._generate_tensor_parallel(input_ids, attention_mask, fast_kwargs)
            if self.generator is None:
                self.generator = FastGenerator(module, **fast_kwargs)
                self.generator.profile = self.timer.enabled  # split prefill/decode
            with rollout_context(module, zero3=self.actor_zero3):
                return self.generator.generate(input_ids, attention_mask)
        import deepspeed

        kwargs = dict(max_new_tokens=g.max_answer_seq_len, do_sample=g.do_sample,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      use_cache=True)
        if self.ignore_eos:
            kwargs["min_new_tokens"] = g.max_answer_seq_len
        if g.do_sample:
            kwargs.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.actor_zero3 and self.dist.world_size > 1:
            kwargs["synced_gpus"] = True  # ranks may stop at different lengths
        gather = (deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
                  if self.actor_zero3 else contextlib.nullcontext())
        module.eval()
        with gather:
            seq = module.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return Generated(seq=seq, logprobs=None)

    def _generate_tensor_parallel(self, input_ids, attention_mask, fast_kwargs) -> Generated:
        """--generation-tensor-parallel N: the ranks of a group decode together on a sharded
        copy of the actor, refreshed from the trained weights before every rollout."""
        from dschat_cli.config.schema import ConfigError
        from dschat_cli.generation.tensor_parallel import FLAG, TensorParallelRollout

        module = self.m.actor.module
        if self.tp_rollout is None:
            try:
                self.tp_rollout = TensorParallelRollout(
                    module, size=self.cfg.generation.generation_tensor_parallel,
                    device=input_ids.device, dtype=next(module.parameters()).dtype,
                    fast_kwargs=fast_kwargs)
            except ValueError as e:
                raise ConfigError(FLAG, str(e)) from None
            self.generator = self.tp_rollout.fast
            self.generator.profile = self.timer.enabled
        self.tp_rollout.refresh(module, zero3=self.actor_zero3)
        return self.tp_rollout.generate(input_ids, attention_mask)

    @torch.no_grad()
    def generate_experience(self, batch: dict) -> Rollout:
        """# 1. generate, # 2. score: one rollout from a batch of left-padded prompts."""
        # experience is scored as the policy acts: dropout off (train() turns it back on)
        self.m.actor.eval()
        self.m.critic.eval()
        dev = self.m.actor.device
        prompts = batch["input_ids"].to(dev)
        prompt_mask = batch["attention_mask"].to(dev)
        self.rollouts += 1
        t0 = time.perf_counter()
        with self.timer("generation"):
            gen = self.generate(prompts, prompt_mask)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.last_generation_s = time.perf_counter() - t0
        seq = gen.seq
        P = prompts.shape[1]
        answer = seq[:, P:]
        # an answer ends at its first eos (kept); what follows is padding
        is_eos = (answer == self.m.tokenizer.eos_token_id).long()
        real = (is_eos.cumsum(1) - is_eos) == 0
        # answers of <= 1 token are dropped: they stay in the batch (so every rank keeps the same
        # number of rows and mini-batches) but their action mask is zero: no loss, no statistics
        action_mask = real.long() * (real.sum(1, keepdim=True) > 1).long()
        attention_mask = torch.cat([prompt_mask, real.long()], dim=1)
        pos = positions_from_mask(attention_mask)

        # 2. score
        g = self.cfg.generation
        from_generation = g.old_logprobs == "generation" and gen.logprobs is not None
        check = gen.logprobs is not None and (
            not from_generation or (self.rollouts - 1) % g.parity_check_interval == 0)
        if from_generation and not check:
            logprobs = gen.logprobs
        else:
            with self.timer("actor_forward"):
                logprobs = answer_logprobs(self.m.actor(input_ids=seq, attention_mask=attention_mask,
                                                        position_ids=pos, use_cache=False).logits,
                                           seq, P)
            if check:  # the engine's own logprobs must agree with the actor's forward pass
                self.last_parity = check_parity(gen.logprobs, logprobs, real.long(),
                                                tolerance=g.parity_tolerance, step=self.rollouts)
                if from_generation:
                    logprobs = gen.logprobs
        with self.timer("ref_forward"):
            ref_logprobs = answer_logprobs(self.m.ref(input_ids=seq, attention_mask=attention_mask,
                                                      position_ids=pos, use_cache=False).logits,
                                           seq, P)
        with self.timer("critic_forward"):
            values = answer_positions(self.m.critic(seq, attention_mask, position_ids=pos), P)
        with self.timer("reward_forward"):
            scores = sequence_scores(self.m.reward(seq, attention_mask, position_ids=pos),
                                     attention_mask)
        return Rollout(prompts=prompts, seq=seq, attention_mask=attention_mask,
                       action_mask=action_mask, logprobs=logprobs.float(),
                       ref_logprobs=ref_logprobs.float(), values=values.float().detach(),
                       scores=scores.float())

    # 3. advantages + 4. update -------------------------------------------------------------------
    def train(self, experience: list[Rollout]) -> PPOStats:
        c = self.cfg.ppo
        mb = self.cfg.train.per_device_training_batch_size
        prepared = []
        for r in experience:
            rewards = kl_penalised_rewards(r.logprobs, r.ref_logprobs, r.scores, r.action_mask,
                                           kl_ctl=c.kl_ctl, clip_reward_value=c.clip_reward_value)
            adv, ret = gae_advantages_and_returns(r.values, rewards, r.action_mask, gamma=c.gamma,
                                                  lam=c.lam)
            if c.whiten_advantages:
                adv = masked_whiten(adv, r.action_mask)
            prepared.append((r, adv, ret))
        sums: dict[str, float] = {}
        n = 0
        self.m.actor.train()
        self.m.critic.train()
        for _ in range(self.cfg.train.ppo_epochs):
            for r, adv, ret in prepared:
                P = r.prompts.shape[1]
                for i in range(0, r.seq.shape[0], mb):
                    s = slice(i, i + mb)
                    seq, att, am = r.seq[s], r.attention_mask[s], r.action_mask[s]
                    pos = positions_from_mask(att)
                    with self.timer("actor_train"):
                        logits = self.m.actor(input_ids=seq, attention_mask=att,
                                              position_ids=pos, use_cache=False).logits
                        lp = answer_logprobs(logits, seq, P)
                        a_loss, clipfrac, approx_kl = policy_loss(lp, r.logprobs[s], adv[s], am,
                                                                  cliprange=c.cliprange)
                        self.m.actor.backward(a_loss)
                        self.m.actor.step()
                    self.grad_norms["actor"].poll()
                    u_loss = torch.zeros(())
                    if self.unsup_iter is not None:
                        ub = move_batch(next(self.unsup_iter), self.m.actor.device)
                        u_loss = self.m.actor(**ub, use_cache=False).loss
                        self.m.actor.backward(u_loss * self.cfg.data.unsup_coef)
                        self.m.actor.step()
                        self.grad_norms["actor"].poll()
                    with self.timer("critic_train"):
                        values = answer_positions(self.m.critic(seq, att, position_ids=pos), P)
                        c_loss, vclip = value_loss(values.float(), r.values[s], ret[s], am,
                                                   cliprange_value=c.cliprange_value)
                        self.m.critic.backward(c_loss)
                        self.m.critic.step()
                    self.grad_norms["critic"].poll()
                    if self.cfg.ppo.enable_ema:
                        self._update_ema()
                    for k, v in (("actor_loss", a_loss), ("critic_loss", c_loss),
                                 ("unsup_loss", u_loss), ("clipfrac", clipfrac),
                                 ("value_clipfrac", vclip), ("approx_kl", approx_kl)):
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                    n += 1
        all_mask = torch.cat([r.action_mask for r, _, _ in prepared])
        mean = {k: self.dist.all_reduce_mean(v / max(n, 1)) for k, v in sums.items()}
        return PPOStats(
            actor_loss=mean["actor_loss"], critic_loss=mean["critic_loss"],
            unsup_loss=mean["unsup_loss"],
            reward=self.dist.all_reduce_mean(_kept_mean(prepared)),
            kl=self.dist.all_reduce_mean(torch.stack([sequence_kl(r.logprobs, r.ref_logprobs,
                                                                  r.action_mask)
                                                      for r, _, _ in prepared]).mean()).item(),
            answer_length=self.dist.all_reduce_mean(all_mask.sum(1).float().mean()).item(),
            clipfrac=mean["clipfrac"], value_clipfrac=mean["value_clipfrac"],
            approx_kl=mean["approx_kl"],
            advantage_mean=self.dist.all_reduce_mean(torch.stack([masked_mean(a, r.action_mask)
                                                                  for r, a, _ in prepared]).mean()).item(),
            return_mean=self.dist.all_reduce_mean(torch.stack([masked_mean(t, r.action_mask)
                                                               for r, _, t in prepared]).mean()).item())

    @torch.no_grad()
    def _actor_params(self, to_cpu: bool) -> dict[str, torch.Tensor] | None:
        """{name: fp32 copy} of the actor's full parameters on rank 0 (None elsewhere)."""
        import deepspeed

        out = {}
        for name, p in self.m.actor.module.named_parameters():
            ctx = (deepspeed.zero.GatheredParameters([p], modifier_rank=None)
                   if self.actor_zero3 else contextlib.nullcontext())
            with ctx:
                if self.dist.is_main:
                    out[name] = p.detach().float().to("cpu" if to_cpu else p.device, copy=True)
        return out if self.dist.is_main else None

    @torch.no_grad()
    def _update_ema(self, beta: float = 0.992) -> None:
        """ema = beta * ema + (1 - beta) * actor, after every actor update (every rank calls it:
        ZeRO-3 gathers)."""
        import deepspeed

        for name, p in self.m.actor.module.named_parameters():
            ctx = (deepspeed.zero.GatheredParameters([p], modifier_rank=None)
                   if self.actor_zero3 else contextlib.nullcontext())
            with ctx:
                if self.ema is not None:
                    ema_update([self.ema[name]], [p.detach().float().to(self.ema[name].device)],
                               beta=beta)

    def ema_state_dict(self) -> dict | None:
        """The actor's full state with EMA parameters, on rank 0 (every rank calls it)."""
        sd = gathered_state_dict(self.m.actor.module, zero_stage=self.cfg.deepspeed.actor_zero_stage,
                                 is_main=self.dist.is_main)
        if sd is None or self.ema is None:
            return None
        for name, value in self.ema.items():
            sd[name] = value.to(device="cpu", dtype=sd[name].dtype)
        return sd

    @torch.no_grad()
    def mean_reward(self, loader) -> float:
        """Mean reward score of sampled answers to held-out prompts (all ranks)."""
        total, count = 0.0, 0
        for batch in loader:
            r = self.generate_experience(batch)
            keep = r.action_mask.sum(1) > 0
            total += float(r.scores[keep].sum())
            count += int(keep.sum())
        total = self.dist.all_reduce_sum(total)
        count = self.dist.all_reduce_sum(count)
        return total / count if count else float("nan")


def run(cfg: PPOConfig, dist: Dist) -> dict:
    from torch.utils.data import DataLoader, DistributedSampler

    from dschat_cli.data.prompts import collate_prompts, prompt_datasets, prompt_drop_counts

    # setup ------------------------------------------------------------------------------------
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir).expanduser().resolve()
    t = cfg.train
    tokenizer = load_tokenizer(cfg.actor)
    with console.status("tokenising prompts"):
        train_prompts, eval_prompts = prompt_datasets(cfg.data.as_data_options(), tokenizer,
                                                      max_prompt_len=cfg.data.max_prompt_seq_len,
                                                      seed=cfg.seed)
    dropped = prompt_drop_counts(train_prompts).get("too_long", 0)
    if dropped:
        console.print(f"[warn]{dropped} training prompt(s) longer than --max-prompt-seq-len "
                      f"{cfg.data.max_prompt_seq_len} tokens dropped")
    collate = partial(collate_prompts, pad_token_id=tokenizer.pad_token_id)
    sampler = DistributedSampler(train_prompts, num_replicas=dist.world_size, rank=dist.rank,
                                 shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(train_prompts, batch_size=t.per_device_generation_batch_size,
                        sampler=sampler, collate_fn=collate, drop_last=True,
                        generator=own_generator())
    eval_loader = DataLoader(eval_prompts, batch_size=t.per_device_generation_batch_size,
                             sampler=DistributedSampler(eval_prompts, num_replicas=dist.world_size,
                                                        rank=dist.rank, shuffle=False),
                             collate_fn=collate, generator=own_generator()) \
        if len(eval_prompts) else None
    if len(loader) == 0:
        from dschat_cli.config.schema import ConfigError

        raise ConfigError("--per-device-generation-batch-size",
                          f"{t.per_device_generation_batch_size} x {dist.world_size} GPU(s) is more "
                          f"than the {len(train_prompts)} step-3 prompts; use a smaller batch")
    schedule = ppo_schedule(len(loader), t, unsupervised=bool(cfg.data.unsupervised_dataset_name))
    ppo_steps, optimizer_steps, actor_steps = (schedule.ppo_steps, schedule.optimizer_steps,
                                               schedule.actor_steps)

    with console.status("loading actor, reference, critic and reward models"):
        models = PPOModels.build(cfg, dist, actor_steps, optimizer_steps)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for name, config in models.ds_configs.items():
            (out / f"ds_config_{name}.json").write_text(json.dumps(config, indent=2) + "\n")
    unsup_iter = None
    if cfg.data.unsupervised_dataset_name:
        from dschat_cli.data.prompts import collate_lm_blocks, unsupervised_dataset

        blocks = unsupervised_dataset(cfg.data.unsupervised_dataset_name,
                                      cfg.data.unsupervised_dataset_config_name, tokenizer,
                                      block_size=cfg.data.max_prompt_seq_len
                                      + cfg.generation.max_answer_seq_len,
                                      seed=cfg.seed, cache_dir=cfg.data.data_cache_dir)
        unsup_loader = DataLoader(blocks, batch_size=t.per_device_training_batch_size,
                                  sampler=DistributedSampler(blocks, num_replicas=dist.world_size,
                                                             rank=dist.rank, shuffle=True,
                                                             seed=cfg.seed),
                                  collate_fn=collate_lm_blocks, drop_last=True,
                                  generator=own_generator())
        unsup_iter = Cycle(unsup_loader)
    trainer = PPOTrainer(models, cfg, dist, unsup_iter=unsup_iter)
    ckpt = CheckpointManager(cfg, dist, out)
    engines = {"actor": models.actor, "critic": models.critic}  # ref and reward stay frozen
    # resuming: the engines, and the RNG streams (after the trainer seeded its own) the loop
    # continues; the EMA and the unsupervised data position
    state, ema = ckpt.load(engines)
    if state is not None and unsup_iter is not None:
        unsup_iter = trainer.unsup_iter = Cycle(unsup_loader, *state["unsup"])
    if ema is not None and trainer.ema is not None:
        trainer.ema = {k: ema[k].to(v.device) for k, v in trainer.ema.items()}
    if state is not None:  # numbers the parity checks: which rollouts get one
        trainer.rollouts = state["rollouts"]
    metrics = ckpt.metrics_log(out / "metrics.jsonl" if dist.is_main else None,
                               str(out / "tensorboard") if cfg.deepspeed.enable_tensorboard
                               else None, state)
    max_kl = resolve_max_kl(cfg.health.max_kl, cfg.ppo.kl_ctl, cfg.ppo.clip_reward_value)
    # streaks, baseline reward spread, best EMA reward, anomalies continue on resume
    health = HealthMonitor.for_run(
        "ppo", cfg.health, dtype=models.dtype, out=out, is_main=dist.is_main,
        last_checkpoint=ckpt.latest, state=state, max_kl=max_kl,
        max_answer_len=cfg.generation.max_answer_seq_len,
        max_kl_note="" if cfg.health.max_kl is not None else
        "the default, 2 x --clip-reward-value / --kl-ctl",
        lr_flags={"actor loss": "--actor-learning-rate", "unsupervised loss": "--unsup-coef",
                  "actor gradient norm": "--actor-learning-rate",
                  "critic loss": "--critic-learning-rate",
                  "critic gradient norm": "--critic-learning-rate"})
    console.print(
        f"[bold]ppo[/bold]: actor {count_params(models.actor.module) / 1e6:.1f}M, critic "
        f"{count_params(models.critic.module) / 1e6:.1f}M parameters; {len(train_prompts)} train / "
        f"{len(eval_prompts)} held-out prompts; {dist.placement}, "
        f"{models.dtype}; ZeRO actor {cfg.deepspeed.actor_zero_stage} / critic "
        f"{cfg.deepspeed.critic_zero_stage}; {ppo_steps} PPO steps of "
        f"{t.per_device_generation_batch_size * dist.world_size} prompts")

    if state is None:
        reward_start = trainer.mean_reward(eval_loader) if eval_loader is not None \
            else float("nan")
        if eval_loader is not None:
            console.print(f"held-out reward before PPO: {reward_start:.4f}")
        step, epoch, batch_pos, ema_reward, history, gen_s, train_s, seconds = \
            0, 1, 0, None, [], 0.0, 0.0, 0.0
    else:  # continue after the update the checkpoint was written at (finished: after the loop)
        step, epoch, batch_pos, ema_reward, history, gen_s, train_s, seconds, reward_start = (
            state[k] for k in ("step", "epoch", "batch", "ema_reward", "history", "gen_s",
                               "train_s", "seconds", "reward_start"))
        console.print(f"resumed from {ckpt.resume_from}: PPO step {step}, epoch {epoch}",
                      markup=False)
    start_epoch = t.num_train_epochs + 1 if state and state["finished"] else epoch

    def snapshot(epoch: int, batch: int, finished: bool = False) -> dict:
        """What a checkpoint records besides engines, RNG and EMA: `batch` prompt batches of
        `epoch` done, none of them waiting in the experience buffer."""
        return {"epoch": epoch, "batch": batch, "finished": finished, "ema_reward": ema_reward,
                "history": history, "gen_s": gen_s, "train_s": train_s,
                "reward_start": reward_start, "seconds": time.perf_counter() - t_start,
                "unsup": unsup_iter.position if unsup_iter is not None else None,
                "rollouts": trainer.rollouts, "health": health.state_dict()}

    # the PPO loop -------------------------------------------------------------------------------
    buffer = []
    t_start = time.perf_counter() - seconds
    t_step = time.perf_counter()
    with train_progress(dist.is_main) as progress:
        task = progress.add_task("ppo", total=ppo_steps, completed=step, metrics="")
        for epoch in range(start_epoch, t.num_train_epochs + 1):
            sampler.set_epoch(epoch)
            skip = batch_pos if epoch == start_epoch else 0
            for batch_pos, batch in enumerate(skip_batches(loader, skip), start=skip + 1):
                if step >= ppo_steps:  # resumed from a checkpoint of the last step
                    break
                # 1. generate + 2. score
                rollout = trainer.generate_experience(batch)
                gen_s += trainer.last_generation_s
                buffer.append(rollout)
                step += 1
                if cfg.generation.print_answers and step % cfg.generation.print_answers_interval == 0:
                    _print_answer(progress.console, tokenizer, rollout)
                if len(buffer) == t.generation_batches or step == ppo_steps:
                    # 3. advantages + 4. update
                    t0 = time.perf_counter()
                    reward_std = _reward_spread(buffer, dist)
                    stats = trainer.train(buffer)
                    train_s += time.perf_counter() - t0
                    buffer = []
                    e2e = time.perf_counter() - t_step
                    t_step = time.perf_counter()
                    if math.isfinite(stats.reward):  # nan: no answer kept (all <= 1 token)
                        ema_reward = stats.reward if ema_reward is None else 0.9 * ema_reward + 0.1 * stats.reward
                    samples = t.per_device_generation_batch_size * dist.world_size * t.generation_batches
                    tokens = samples * (rollout.seq.shape[1])
                    norms = {k: g.take() for k, g in trainer.grad_norms.items()}
                    row = dict(epoch=epoch, **stats._asdict(),
                               ema_reward=float("nan") if ema_reward is None else ema_reward,
                               reward_std=reward_std, seconds=e2e, generation_share=trainer.last_generation_s * t.generation_batches / e2e,
                               samples_per_s=samples / e2e, tokens_per_s=tokens / e2e,
                               lr_actor=models.actor.get_lr()[0],
                               **{f"{k}_grad_norm": g.reported for k, g in trainer.grad_norms.items()
                                  if g.reported is not None})
                    if trainer.last_parity is not None:  # fast engine vs forward, last check
                        row["logprob_gap"] = trainer.last_parity[0]
                    history.append({"step": step, **row})
                    metrics.log(step, **row)
                    # before any save: a stop leaves what was saved earlier as it was
                    losses = {"actor loss": stats.actor_loss, "critic loss": stats.critic_loss}
                    if unsup_iter is not None:
                        losses["unsupervised loss"] = stats.unsup_loss
                    health.act(health.check(
                        step, losses=losses, grad_norms={f"{k} gradient norm": v
                                                         for k, v in norms.items()},
                        kl=stats.kl, answer_length=stats.answer_length,
                        ema_reward=ema_reward, reward_spread=reward_std),
                        metrics=metrics, printer=progress.console)
                    progress.update(task, completed=step, metrics=fmt_metrics(
                        reward=stats.reward, ema=row["ema_reward"], kl=stats.kl, actor=stats.actor_loss,
                        critic=stats.critic_loss, clip=stats.clipfrac, len=stats.answer_length,
                        **{"gen": f"{row['generation_share']:.0%}",
                           "samples/s": f"{row['samples_per_s']:.1f}", "s/step": f"{e2e:.2f}"}))
                    if ckpt.due(step, engines):  # the buffer is empty: an update boundary
                        ckpt.save(step, engines, snapshot(epoch, batch_pos), tensors=trainer.ema)
                if step >= ppo_steps:
                    break
            if step >= ppo_steps:
                break
    ckpt.save_final(step, engines, snapshot(epoch, batch_pos, finished=True), tensors=trainer.ema)
    elapsed = time.perf_counter() - t_start

    reward_end = trainer.mean_reward(eval_loader) if eval_loader is not None else float("nan")
    # save ---------------------------------------------------------------------------------------
    with console.status(f"saving to {out}"):
        save_hf_model(models.actor.module, tokenizer, out / "actor",
                      zero_stage=cfg.deepspeed.actor_zero_stage, is_main=dist.is_main)
        save_reward_model(models.critic.module, tokenizer, out / "critic",
                          zero_stage=cfg.deepspeed.critic_zero_stage, is_main=dist.is_main)
        if cfg.ppo.enable_ema:
            ema_sd = trainer.ema_state_dict()
            if dist.is_main:
                materialize(models.actor.module, ema_sd).save_pretrained(out / "actor_ema")
                tokenizer.save_pretrained(out / "actor_ema")
    first, last = (history[0], history[-1]) if history else ({}, {})
    result = {"steps": step, "seconds": elapsed, "generation_seconds": gen_s,
              "train_seconds": train_s, "reward_heldout_start": reward_start,
              "reward_heldout_end": reward_end, "first": first, "last": last,
              "world_size": dist.world_size, "output_dir": str(out), "status": "completed",
              "anomalies": health.history, "health": health.state_dict(),
              "lr_changes": ckpt.lr_changes, "peak_memory_gib": peak_memory_gib(dist)}
    if dist.is_main:
        from dschat_cli.steps.common import write_summary_json

        write_summary_json(out, result)
    metrics.close()
    print_summary("ppo summary", [
        ("PPO steps", str(step)),
        ("held-out reward (before -> after)", f"{reward_start:.4f} -> {reward_end:.4f}"),
        ("batch reward (first -> last step)",
         f"{first.get('reward', float('nan')):.4f} -> {last.get('reward', float('nan')):.4f}"),
        ("KL to reference (last step)", f"{last.get('kl', float('nan')):.4f}"),
        ("answer length (last step)", f"{last.get('answer_length', float('nan')):.1f} tokens"),
        ("time", f"{elapsed:.1f} s (generation {gen_s:.1f} s, training {train_s:.1f} s)"),
        ("saved", f"{out / 'actor'}, {out / 'critic'}"
                  + (f", {out / 'actor_ema'}" if cfg.ppo.enable_ema else "")),
        *ckpt.summary_rows(),
        *health.summary_rows(),
    ])
    dist.barrier()
    return result


def _reward_spread(experience: list[Rollout], dist: Dist) -> float:
    """Standard deviation of the kept answers' reward scores over all ranks (nan with < 2)."""
    scores = torch.cat([r.scores[r.action_mask.sum(1) > 0] for r in experience]).double()
    n = dist.all_reduce_sum(float(len(scores)))
    total = dist.all_reduce_sum(float(scores.sum()))
    squares = dist.all_reduce_sum(float((scores ** 2).sum()))
    if n < 2:
        return float("nan")
    return math.sqrt(max(squares - total * total / n, 0.0) / (n - 1))


def _kept_mean(prepared) -> float:
    """Mean score of the answers that were kept (dropped ones, <= 1 token, do not count)."""
    scores = torch.cat([r.scores[r.action_mask.sum(1) > 0] for r, _, _ in prepared])
    return float(scores.mean()) if len(scores) else float("nan")


def _print_answer(printer, tokenizer, rollout: Rollout) -> None:
    from rich.text import Text

    P = rollout.prompts.shape[1]
    prompt = tokenizer.decode(rollout.seq[0, :P], skip_special_tokens=True)
    answer = tokenizer.decode(rollout.seq[0, P:][rollout.attention_mask[0, P:].bool()],
                              skip_special_tokens=True)
    printer.print(Text(f"prompt: {prompt.strip()}\nanswer: {answer.strip()}  "
                       f"(reward {float(rollout.scores[0]):.3f})"))
