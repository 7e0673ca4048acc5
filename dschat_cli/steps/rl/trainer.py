"""The Python API for custom RLHF loops on dschat's step-3 parts (examples/custom_ppo_loop.py):

    models = PPOModels.build(cfg, dist, actor_steps, critic_steps)   # critic None: critic-free
    trainer = PPOTrainer(models, cfg, dist)
    rollout = trainer.generate_experience(batch)   # 1. generate + 2. score (left-padded prompts;
                                                    # --samples-per-prompt answers to each)
    stats = trainer.train([rollout, ...])           # 3. advantages + 4. update -> PPOStats

`dschat ppo` (steps/ppo.py) runs the same parts in its loop: trainer.maker, trainer.advantages,
trainer.learner, and trainer.kl, the KL coefficient (fixed, or adaptive with --kl-target).
"""

from __future__ import annotations

import torch

from dschat_cli.config.ppo import PPOConfig
from dschat_cli.dist import Dist
from dschat_cli.rlhf.advantages import Advantages, estimate_advantages, shaped_scores
from dschat_cli.rlhf.experience import pool_rollouts
from dschat_cli.rlhf.kl import kl_controller
from dschat_cli.rlhf.ppo import PPOStats, Rollout
from dschat_cli.rlhf.quality import ended_with_eos
from dschat_cli.steps.common import PhaseTimer
from dschat_cli.steps.rl.ema import ActorEMA
from dschat_cli.steps.rl.experience import ExperienceMaker
from dschat_cli.steps.rl.learner import Learner


class PPOTrainer:
    def __init__(self, models, cfg: PPOConfig, dist: Dist, unsup_iter=None,
                 timer: PhaseTimer | None = None):
        self.models = models
        self.cfg = cfg
        self.timer = timer or PhaseTimer(enabled=False)  # per-phase seconds (dschat bench)
        self.ema = ActorEMA(models.actor, zero3=cfg.deepspeed.actor_zero_stage == 3,
                            is_main=dist.is_main) if cfg.ppo.enable_ema else None
        self.maker = ExperienceMaker(models, cfg, dist, timer=self.timer)
        self.maker.generator.profile = self.timer.enabled  # split prefill / decode
        self.learner = Learner(models, cfg, dist, unsup_iter=unsup_iter, ema=self.ema,
                               timer=self.timer)
        self.kl = kl_controller(cfg.ppo.settings.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
        self.dist = dist
        # Models are built (identically on every rank); from here each rank samples its own
        # answers, so the sampling seed differs per rank.
        torch.manual_seed(cfg.seed + dist.rank)

    def generate_experience(self, batch: dict) -> Rollout:
        return self.maker.make(batch)

    def advantages(self, experience: Rollout) -> Advantages:
        """# 3. advantages: the scores shaped (--missing-eos-penalty), then the estimator
        (--advantage-estimator) with this update's KL coefficient."""
        P = experience.prompts.shape[1]
        ended = ended_with_eos(experience.seq[:, P:], experience.action_mask,
                               self.models.tokenizer.eos_token_id)
        scores = shaped_scores(experience.scores, ended,
                               missing_eos_penalty=self.cfg.ppo.missing_eos_penalty)
        return estimate_advantages(experience._replace(scores=scores), self.cfg.ppo,
                                   kl_coef=self.kl.value,
                                   group_size=self.cfg.train.samples_per_prompt)

    def learn(self, experience: Rollout, advantages: Advantages) -> PPOStats:
        """# 4. update, then the adaptive KL coefficient follows the measured KL. The stats'
        kl_coef is the coefficient this update's rewards used."""
        kl_coef = self.kl.value
        stats = self.learner.update(experience, advantages, kl_coef=kl_coef)
        self.kl.update(stats.kl, experience.seq.shape[0] * self.dist.world_size)
        return stats._replace(kl_coef=kl_coef)

    def train(self, rollouts: list[Rollout]) -> PPOStats:
        experience = pool_rollouts(rollouts, self.models.tokenizer.pad_token_id)
        return self.learn(experience, self.advantages(experience))
