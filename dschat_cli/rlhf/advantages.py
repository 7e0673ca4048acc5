"""Advantage estimators of step 3: pooled experience in, per-token advantages (and the critic's
targets) out. Pure torch; the arithmetic lives in rlhf/ppo.py.

    scores = shaped_scores(experience.scores, ended, missing_eos_penalty=...)
    adv = estimate_advantages(experience._replace(scores=scores), cfg.ppo, kl_coef=kl.value)

An estimator is a function (Rollout, options) -> Advantages, registered in ESTIMATORS under its
--advantage-estimator name with `needs_critic`: whether it reads the critic's values (and so
whether step 3 builds, trains and saves a critic at all). Options are read by attribute from the
step's PPO section (config/ppo.PPOAlgoOptions), so an estimator with new options adds fields
there and nothing else changes in the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from dschat_cli.rlhf.ppo import (Rollout, gae_advantages_and_returns, kl_penalised_rewards,
                                 masked_whiten)


class Advantages(NamedTuple):
    """advantages: (B, A) float32, 0 on masked positions, what the policy loss weighs.
    returns:    (B, A) float32 targets of the critic's value loss, or None when the estimator
                needs no critic."""

    advantages: torch.Tensor
    returns: torch.Tensor | None


def gae(exp: Rollout, *, kl_ctl: float, clip_reward_value: float, gamma: float, lam: float,
        whiten: bool = False) -> Advantages:
    """DeepSpeed-Chat's PPO: per-token rewards (-kl_ctl * (logprob - ref_logprob), plus the clipped
    score on the last real answer token), then GAE over the critic's values. whiten normalises the
    advantages to mean 0 and variance 1 over the real tokens of the whole pooled experience."""
    rewards = kl_penalised_rewards(exp.logprobs, exp.ref_logprobs, exp.scores, exp.action_mask,
                                   kl_ctl=kl_ctl, clip_reward_value=clip_reward_value)
    adv, ret = gae_advantages_and_returns(exp.values, rewards, exp.action_mask, gamma=gamma,
                                          lam=lam)
    if whiten:
        adv = masked_whiten(adv, exp.action_mask)
    return Advantages(adv, ret)


def shaped_scores(scores: torch.Tensor, ended_with_eos: torch.Tensor, *,
                  missing_eos_penalty: float) -> torch.Tensor:
    """The scores the RL maximises: the reward model's, minus --missing-eos-penalty for every
    answer that did not end with eos (cut at the length limit: an answer that never stops is a
    common way to game a reward model that likes long text). (B,), (B,) bool -> (B,) float32."""
    scores = scores.float()
    if missing_eos_penalty == 0:
        return scores
    return scores - missing_eos_penalty * (~ended_with_eos.bool()).float()


@dataclass(frozen=True)
class Estimator:
    name: str
    needs_critic: bool
    compute: Callable[[Rollout, object, float], Advantages]  # (experience, options, kl_coef)


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator("gae", needs_critic=True, compute=lambda exp, o, kl_coef: gae(
        exp, kl_ctl=kl_coef, clip_reward_value=o.clip_reward_value, gamma=o.gamma, lam=o.lam,
        whiten=o.whiten_advantages)),
}


def estimator_for(opts) -> Estimator:
    """The estimator a step-3 PPO section selects (DeepSpeed-Chat's GAE when it names none)."""
    name = getattr(opts, "advantage_estimator", "gae")
    if name not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


def estimate_advantages(exp: Rollout, opts, kl_coef: float | None = None) -> Advantages:
    """# 3. advantages: the selected estimator over the pooled experience, with the KL coefficient
    of this update (default: the options' fixed kl_ctl)."""
    return estimator_for(opts).compute(exp, opts, opts.settings.kl_coef if kl_coef is None else kl_coef)
