"""The Python API for custom RLHF loops on dschat's step-3 parts (examples/custom_ppo_loop.py):

    models = PPOModels.build(cfg, dist, actor_steps, critic_steps)
    trainer = PPOTrainer(models, cfg, dist)
    rollout = trainer.generate_experience(batch)   # 1. generate + 2. score (left-padded prompts)
    stats = trainer.train([rollout, ...])           # 3. advantages + 4. update -> PPOStats

`dschat ppo` (steps/ppo.py) runs the same parts, trainer.maker and trainer.learner, in its loop.
"""

from __future__ import annotations

import torch

from dschat_cli.config.ppo import PPOConfig
from dschat_cli.dist import Dist
from dschat_cli.rlhf.advantages import estimate_advantages
from dschat_cli.rlhf.experience import pool_rollouts
from dschat_cli.rlhf.ppo import PPOStats, Rollout
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
        # Models are built (identically on every rank); from here each rank samples its own
        # answers, so the sampling seed differs per rank.
        torch.manual_seed(cfg.seed + dist.rank)

    def generate_experience(self, batch: dict) -> Rollout:
        return self.maker.make(batch)

    def train(self, rollouts: list[Rollout]) -> PPOStats:
        experience = pool_rollouts(rollouts, self.models.tokenizer.pad_token_id)
        return self.learner.update(experience, estimate_advantages(experience, self.cfg.ppo))
