"""Step 3, RLHF with PPO:  dschat ppo --actor-model SFT_DIR --critic-model REWARD_DIR --output-dir OUT

Four models: the actor (trained, generates), the critic (trained, initialised from the reward
model), the reference (frozen copy of the initial actor) and the reward model (frozen); a
critic-free estimator (--advantage-estimator grpo, rloo, ...) has the other three. The loop:

    # 1. generate  # 2. score     one rollout per prompt batch        steps/rl/experience.py
    ... --generation-batches rollouts pooled into one experience         rlhf/experience.py
    # 3. advantages               a pure function of the experience    rlhf/advantages.py
    # 4. update                   --ppo-epochs over its mini-batches    steps/rl/learner.py

Metrics, health checks, progress and checkpoints watch the loop (steps/rl/observers.py); the run
state a checkpoint needs to continue is one record (steps/rl/state.py). The Python API for custom
loops is steps/rl/trainer.PPOTrainer.
"""

from __future__ import annotations

import time
from pathlib import Path

from dschat_cli.config.ds_config import zero_label
from dschat_cli.config.ppo import PPOConfig
from dschat_cli.config.resolved import ResolvedRun
from dschat_cli.config.schedule import ppo_schedule
from dschat_cli.dist import Dist
from dschat_cli.rlhf.experience import pool_rollouts
from dschat_cli.steps.checkpoint import CheckpointManager, skip_batches
from dschat_cli.steps.common import count_params, peak_memory_gib, print_summary, seed_everything
from dschat_cli.steps.health import HealthMonitor, resolve_max_kl
from dschat_cli.steps.rl.data import prompt_loaders, unsupervised_batches
from dschat_cli.steps.rl.engines import PPOModels
from dschat_cli.steps.rl.experience import Heldout
from dschat_cli.steps.rl.observers import (Checkpointer, Clock, GreedyProbe, HealthWatch,
                                           MetricsRecorder, ProgressView, Update, reward_spread)
from dschat_cli.steps.rl.state import RunState
from dschat_cli.steps.rl.trainer import PPOTrainer
from dschat_cli.ui.console import console
from dschat_cli.ui.progress import train_progress

# re-exported: the step-3 API custom loops import from here
__all__ = ["PPOModels", "PPOTrainer", "run"]


def run(cfg: PPOConfig, dist: Dist, resolved: ResolvedRun) -> dict:
    from dschat_cli.models.loading import load_tokenizer

    # setup --------------------------------------------------------------------------------------
    seed_everything(cfg.seed)
    out = Path(resolved.output_dir)
    t = cfg.train
    tokenizer = load_tokenizer(cfg.actor)
    data = prompt_loaders(cfg, dist, tokenizer)
    schedule = ppo_schedule(len(data.train), t, unsupervised=bool(cfg.data.unsupervised_dataset_name))
    rl = cfg.ppo.settings
    with console.status("loading actor, reference, critic and reward models" if cfg.has_critic
                        else "loading actor, reference and reward models"):
        models = PPOModels.build(cfg, dist, schedule.actor_steps, schedule.optimizer_steps,
                                 resolved=resolved)
    trainer = PPOTrainer(models, cfg, dist,
                         unsup_iter=unsupervised_batches(cfg, dist, tokenizer, resolved.max_seq_len))
    maker, learner = trainer.maker, trainer.learner
    ckpt = CheckpointManager(cfg, dist, out)
    state, saved = _start_or_resume(ckpt, models, trainer)  # sets the RNG streams the loop goes on
    metrics = ckpt.metrics_log(out / "metrics.jsonl" if dist.is_main else None, resolved, saved)
    health = _health_monitor(cfg, dist, models, out, ckpt, saved)
    critic = (f"critic {count_params(models.critic.module) / 1e6:.1f}M" if models.critic
              is not None else "no critic")
    answers = (f" x {t.samples_per_prompt} answers" if t.samples_per_prompt > 1 else "")
    console.print(f"algorithm: {_algorithm_line(cfg)}", markup=False)
    console.print(
        f"[bold]ppo[/bold]: actor "
        f"{count_params(models.actor.module) / 1e6:.1f}M parameters, {critic}; {data.n_train} "
        f"train / {data.n_heldout} held-out prompts; {dist.placement}, {models.dtype}; actor "
        f"{zero_label(resolved.ds_config('actor'))} / {'critic' if cfg.has_critic else 'reward'} "
        f"{zero_label(resolved.ds_config('critic' if cfg.has_critic else 'reward'))}; "
        f"{schedule.ppo_steps} PPO steps of "
        f"{t.per_device_generation_batch_size * dist.world_size} prompts{answers}, "
        f"{schedule.optimizer_steps} optimizer steps")
    console.print(f"old logprobs: {maker.source.describe(cfg.generation.generation_engine == 'fast')}",
                  markup=False)
    if cfg.generation.generation_engine == "fast":
        console.print(f"decode step: {maker.generator.compile_reason}", markup=False)
    if saved is None and data.heldout is not None:
        start = maker.heldout(data.heldout, cfg.health.greedy_check_prompts)
        state.heldout_start = start.summary("start")
        console.print(f"held-out reward before PPO: {start.line()}", markup=False)

    # the PPO loop -------------------------------------------------------------------------------
    nan = float("nan")
    buffer, clock, gen_s, t_start = [], Clock(), 0.0, time.perf_counter() - state.seconds
    checkpointer = Checkpointer(ckpt, models.trained, ema=trainer.ema, extras=lambda: {
        "seconds": time.perf_counter() - t_start, "rollouts": maker.rollouts,
        "old_logprobs": maker.source.state_dict(), "last_parity": maker.last_parity,
        "kl_coef": trainer.kl.value,
        "health": health.state_dict(),
        "unsup": learner.unsup_iter.position if learner.unsup_iter is not None else None})
    with train_progress(dist.is_main) as progress:
        view = ProgressView(progress, progress.add_task("ppo", total=schedule.ppo_steps,
                                                        completed=state.step, metrics=""),
                            tokenizer=tokenizer, print_answers=cfg.generation.print_answers,
                            interval=cfg.generation.print_answers_interval)
        h = cfg.health
        observers = [GreedyProbe(maker, data.heldout, interval=h.greedy_check_interval,
                                 prompts=h.greedy_check_prompts,
                                 eos_token_id=tokenizer.eos_token_id, dist=dist),
                     MetricsRecorder(metrics, dist=dist, models=models, learner=learner,
                                     maker=maker),
                     HealthWatch(health, unsupervised=learner.unsup_iter is not None,
                                 printer=progress.console, metrics=metrics,
                                 critic=models.critic is not None),  # before any save
                     view, checkpointer]
        for batch in _prompt_batches(data, state, t.num_train_epochs, schedule.ppo_steps):
            buffer.append(maker.make(batch))                       # 1. generate + 2. score
            gen_s += maker.last_generation_s
            state.step += 1
            view.after_rollout(state, buffer[-1])
            if len(buffer) < t.generation_batches and state.step < schedule.ppo_steps:
                continue
            t0 = time.perf_counter()
            experience = pool_rollouts(buffer, tokenizer.pad_token_id)
            advantages = trainer.advantages(experience)            # 3. advantages
            stats = trainer.learn(experience, advantages)          # 4. update
            state.train_s += time.perf_counter() - t0
            state.gen_s += gen_s
            state.update_ema_reward(stats.reward)
            update = Update(state=state, stats=stats, experience=experience,
                            rollouts=len(buffer), seconds=clock.lap(), generation_s=gen_s,
                            reward_spread=reward_spread(experience, dist),
                            grad_norms={k: g.take() for k, g in learner.grad_norms.items()})
            buffer, gen_s = [], 0.0
            for observer in observers:
                observer.after_update(update)
    state.finished = True
    checkpointer.save_final(state)
    elapsed = time.perf_counter() - t_start
    # save ---------------------------------------------------------------------------------------
    end = maker.heldout(data.heldout, cfg.health.greedy_check_prompts) \
        if data.heldout is not None else Heldout(nan, nan, 0)
    if cfg.health.greedy_check_interval and end.greedy:  # the model about to be handed back
        health.act(health.check(state.step, losses={},
                                greedy_repetition=end.greedy["greedy_repetition"]),
                   metrics=metrics, printer=console)
    _save_models(cfg, models, trainer, out, dist)
    result = _summary(cfg, dist, state, end, elapsed, out, ckpt, health, optimizer_steps={
        "actor": models.actor.global_steps, "planned_actor": schedule.actor_steps,
        **({"critic": models.critic.global_steps, "planned_critic": schedule.optimizer_steps}
           if models.critic is not None else {}),
        "skipped_minibatches": learner.skipped_minibatches},
        old_logprobs=maker.source.describe(cfg.generation.generation_engine == "fast"),
        decode=maker.generator.compile_line() if cfg.generation.generation_engine == "fast"
        else None)
    metrics.close()
    dist.barrier()
    return result


def _algorithm_line(cfg: PPOConfig) -> str:
    """'grpo, 8 answers per prompt, KL k3 in the loss x 0.04, seq-mean-token-mean' and so on."""
    s, n = cfg.ppo.settings, cfg.train.samples_per_prompt
    kl = (f"KL {s.kl_estimator} in the {s.kl_placement} x {s.kl_coef:g}" if s.kl_coef > 0
          else "no KL penalty")
    if cfg.ppo.kl_target is not None:
        kl += f" (adaptive, target {cfg.ppo.kl_target:g})"
    clip = f"clip {s.cliprange_low:g}" + (f"/{s.cliprange_high:g}" if s.cliprange_high !=
                                          s.cliprange_low else "") \
        + (f", dual-clip {s.dual_clip:g}" if s.dual_clip is not None else "")
    return ", ".join([s.estimator.name + ("" if s.needs_critic else " (no critic)"),
                      *([f"{n} answers per prompt"] if n > 1 else []), kl, s.loss_aggregation,
                      clip])


def _prompt_batches(data, state: RunState, epochs: int, ppo_steps: int):
    """The training prompt batches from where `state` stands (a resumed run skips the batches it
    already trained on), recording the position in `state` as they are handed out."""
    start_epoch = epochs + 1 if state.finished else state.epoch
    for epoch in range(start_epoch, epochs + 1):
        data.sampler.set_epoch(epoch)
        skip = state.batch if epoch == start_epoch else 0
        for position, batch in enumerate(skip_batches(data.train, skip), start=skip + 1):
            if state.step >= ppo_steps:  # resumed from a checkpoint of the last step
                return
            state.epoch, state.batch = epoch, position
            yield batch


def _start_or_resume(ckpt: CheckpointManager, models: PPOModels,
                     trainer: PPOTrainer) -> tuple[RunState, dict | None]:
    """(a fresh RunState, None), or the state of the checkpoint --resume names and its whole
    saved record, with the engines, the RNG streams, the EMA, the unsupervised data position and
    the parity-check count and where old logprobs come from restored."""
    saved, tensors = ckpt.load(models.trained)
    if saved is None:
        return RunState(), None
    state = RunState.from_dict(saved)
    if trainer.ema is not None:
        trainer.ema.load(tensors)
    if state.unsup is not None and trainer.learner.unsup_iter is not None:
        trainer.learner.unsup_iter.epoch, trainer.learner.unsup_iter.index = state.unsup
    trainer.maker.rollouts = state.rollouts
    trainer.maker.source.load_state_dict(state.old_logprobs)
    if state.last_parity is not None:
        trainer.maker.last_parity = tuple(state.last_parity)
    if state.kl_coef is not None:
        trainer.kl.value = state.kl_coef
    console.print(f"resumed from {ckpt.resume_from}: PPO step {state.step}, epoch {state.epoch}",
                  markup=False)
    return state, saved


def _health_monitor(cfg: PPOConfig, dist: Dist, models, out: Path, ckpt, saved: dict | None):
    """Streaks, baseline reward spread, best EMA reward and anomalies continue on resume."""
    return HealthMonitor.for_run(
        "ppo", cfg.health, dtype=models.dtype, out=out, is_main=dist.is_main,
        last_checkpoint=ckpt.latest, state=saved,
        max_kl=resolve_max_kl(cfg.health.max_kl, cfg.ppo.settings.kl_coef,
                              cfg.ppo.clip_reward_value),
        max_answer_seq_len=cfg.generation.max_answer_seq_len,
        max_kl_note="" if cfg.health.max_kl is not None else
        "the default, 2 x --clip-reward-value / the KL coefficient",
        lr_flags={"actor loss": "--actor-learning-rate", "unsupervised loss": "--unsup-coef",
                  "actor gradient norm": "--actor-learning-rate",
                  "critic loss": "--critic-learning-rate",
                  "critic gradient norm": "--critic-learning-rate"})


def _save_models(cfg: PPOConfig, models: PPOModels, trainer: PPOTrainer, out: Path,
                 dist: Dist) -> None:
    from dschat_cli.models.loading import materialize, save_hf_model
    from dschat_cli.models.reward import save_reward_model

    with console.status(f"saving to {out}"):
        save_hf_model(models.actor.module, models.tokenizer, out / "actor",
                      zero_stage=cfg.deepspeed.actor_zero_stage, is_main=dist.is_main)
        if models.critic is not None:
            save_reward_model(models.critic.module, models.tokenizer, out / "critic",
                              zero_stage=cfg.deepspeed.critic_zero_stage, is_main=dist.is_main)
        if trainer.ema is not None:
            ema_sd = trainer.ema.state_dict(cfg.deepspeed.actor_zero_stage)
            if dist.is_main:
                materialize(models.actor.module, ema_sd).save_pretrained(out / "actor_ema")
                models.tokenizer.save_pretrained(out / "actor_ema")


def _summary(cfg: PPOConfig, dist: Dist, state: RunState, end: Heldout, elapsed: float,
             out: Path, ckpt, health, optimizer_steps: dict, old_logprobs: str,
             decode: str | None) -> dict:
    from dschat_cli.steps.common import write_summary_json

    nan = float("nan")
    first, last = (state.history[0], state.history[-1]) if state.history else ({}, {})
    start = state.heldout_start or Heldout(nan, nan, 0).summary("start")
    result = {"steps": state.step, "advantage_estimator": cfg.ppo.advantage_estimator,
              "samples_per_prompt": cfg.train.samples_per_prompt, "seconds": elapsed, "generation_seconds": state.gen_s,
              "train_seconds": state.train_s, **start, **end.summary("end"),
              "first": first, "last": last,
              "world_size": dist.world_size, "output_dir": str(out), "status": "completed",
              "anomalies": health.history, "health": health.state_dict(),
              "lr_changes": ckpt.lr_changes, "peak_memory_gib": peak_memory_gib(dist),
              "optimizer_steps": optimizer_steps, "old_logprobs": old_logprobs,
              "decode_step": decode}
    if dist.is_main:
        write_summary_json(out, result)

    def pm(key: str) -> str:  # "mean ± stderr" of a held-out figure
        return f"{result[key]:.4f} ± {result[key + '_stderr']:.4f}"

    rows = [("algorithm", _algorithm_line(cfg)), ("PPO steps", str(state.step)),
            ("held-out reward (before -> after)",
             f"{pm('reward_heldout_start')} -> {pm('reward_heldout_end')} "
             f"(n={result['heldout_end_n']}, ± one standard error)")]
    if cfg.ppo.true_reward != "none":
        rows.append((f"held-out true reward, {cfg.ppo.true_reward} (before -> after)",
                     f"{pm('true_reward_heldout_start')} -> {pm('true_reward_heldout_end')}"))
    if "greedy_repetition_end" in result:
        rows.append(("greedy answers to held-out prompts (before -> after)",
                     (f"true reward {result.get('greedy_true_reward_start', nan):.3f} -> "
                      f"{result['greedy_true_reward_end']:.3f}, "
                      if "greedy_true_reward_end" in result else "")
                     + f"repeated trigrams {result.get('greedy_repetition_start', nan):.3f} -> "
                     f"{result['greedy_repetition_end']:.3f}, distinct-2 "
                     f"{result.get('greedy_distinct_start', nan):.3f} -> "
                     f"{result['greedy_distinct_end']:.3f}"))
    for before, after in list(zip(start["samples_start"], end.samples))[:2]:
        rows.append((f"greedy answer to: {after['prompt']}",
                     f"before: {before['answer']}\nafter:  {after['answer']}"))
    print_summary("ppo summary", [
        *rows,
        ("batch reward (first -> last step)",
         f"{first.get('reward', nan):.4f} -> {last.get('reward', nan):.4f}"),
        ("KL to reference (last step)", f"{last.get('kl', nan):.4f}"),
        ("answer length (last step)", f"{last.get('answer_length', nan):.1f} tokens"),
        ("answers (last step)", f"repeated trigrams {last.get('repetition', nan):.3f}, distinct-2 "
                                f"{last.get('distinct', nan):.3f}, ended with eos "
                                f"{last.get('eos_share', nan):.0%}"),
        *([("answer groups (last step)",
            f"reward spread within a group {last.get('group_reward_std', nan):.4f}, groups with "
            f"all-equal rewards (no signal) {last.get('zero_std_groups', nan):.0%}")]
          if cfg.train.samples_per_prompt > 1 else []),
        ("optimizer steps (run / planned)",
         f"actor {optimizer_steps['actor']} / {optimizer_steps['planned_actor']}, "
         + (f"critic {optimizer_steps['critic']} / {optimizer_steps['planned_critic']}"
            if "critic" in optimizer_steps else "no critic")
         + (f"; {optimizer_steps['skipped_minibatches']} mini-batch(es) with no real answer "
            "token skipped" if optimizer_steps["skipped_minibatches"] else "")),
        ("time", f"{elapsed:.1f} s (generation {state.gen_s:.1f} s, training "
                 f"{state.train_s:.1f} s)"),
        ("old logprobs (PPO's ratio)", old_logprobs),
        *([("decode step", decode)] if decode else []),
        ("saved", f"{out / 'actor'}" + (f", {out / 'critic'}" if cfg.has_critic else "")
                  + (f", {out / 'actor_ema'}" if cfg.ppo.enable_ema else "")),
        *ckpt.summary_rows(),
        *health.summary_rows(),
    ])
    return result
