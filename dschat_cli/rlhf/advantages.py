"""Advantage estimators of step 3: pooled experience in, per-token advantages (and the critic's
targets) out. Pure torch; the per-token arithmetic they share lives in rlhf/ppo.py.

    scores = shaped_scores(experience.scores, ended, missing_eos_penalty=...)
    adv = estimate_advantages(experience._replace(scores=scores), cfg.ppo, kl_coef=kl.value,
                              group_size=cfg.train.samples_per_prompt)

ESTIMATORS maps each --advantage-estimator name (config/estimators.py: what each needs and its
defaults) to a function (experience, options, kl_coef, group_size) -> Advantages. The options are
the step's PPO section (config/ppo.PPOAlgoOptions); `options.settings` resolves the KL placement,
estimator and coefficient for the estimator.

Shapes and conventions (those of rlhf/ppo.py): B rows of experience, A padded answer tokens;
action_mask (B, A) is True on real answer tokens; advantages are (B, A) float32, 0 on masked
positions. Groups: the n = --samples-per-prompt answers to prompt i are the contiguous rows
i*n .. i*n + n - 1 (generation repeats each prompt n times in place, and pooling rollouts keeps
whole rollouts together), so `group_view` is a reshape to (B / n, n). Every row counts in its
group's baseline, a dropped answer (all-0 mask) too: it was sampled, it just trains no token.

| estimator            | score s (clipped to +- clip_reward_value first) -> advantage          |
|----------------------|-----------------------------------------------------------------------|
| gae                  | per-token rewards (-coef * kl_t, s on the last token), GAE, critic    |
| grpo                 | (s - group mean) / (unbiased group std + 1e-6), on every token        |
| dr-grpo              | s - group mean, on every token                                        |
| rloo                 | s - mean of the group's other answers, on every token                 |
| reinforce++          | per-token rewards, return-to-go (gamma), whitened over the batch      |
| reinforce++-baseline | s - group mean, then as reinforce++                                   |

KL with --kl-placement reward: the per-token estimators (gae, reinforce++, reinforce++-baseline)
put -coef * kl_t on every real token (`kl_penalised_rewards`); the group estimators (grpo,
dr-grpo, rloo) take each answer's score as s - coef * sum_t kl_t before the group baseline
(the sequence-level KL of the RLOO paper and TRL). With --kl-placement loss no KL enters the
advantages: the learner adds coef * the aggregated KL to the actor loss. --whiten-advantages
whitens the result of gae, grpo, dr-grpo and rloo; the reinforce++ pair whiten anyway. "The
batch" is the experience passed in: on several GPUs, each rank's own pooled rollouts.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from dschat_cli.rlhf.kl import kl_estimate
from dschat_cli.rlhf.ppo import (Rollout, gae_advantages_and_returns, kl_penalised_rewards,
                                 masked_sum, masked_whiten)


class Advantages(NamedTuple):
    """advantages: (B, A) float32, 0 on masked positions, what the policy loss weighs.
    returns:    (B, A) float32 targets of the critic's value loss, or None when the estimator
                needs no critic."""

    advantages: torch.Tensor
    returns: torch.Tensor | None


def shaped_scores(scores: torch.Tensor, ended_with_eos: torch.Tensor, *,
                  missing_eos_penalty: float) -> torch.Tensor:
    """The scores the RL maximises: the reward model's, minus --missing-eos-penalty for every
    answer that did not end with eos (cut at the length limit: an answer that never stops is a
    common way to game a reward model that likes long text). (B,), (B,) bool -> (B,) float32."""
    scores = scores.float()
    if missing_eos_penalty == 0:
        return scores
    return scores - missing_eos_penalty * (~ended_with_eos.bool()).float()


# ---------------------------------------------------------------------------------------------
# groups of answers to the same prompt


def group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """The rows of x by prompt: (B, ...) -> (B / n, n, ...), row i*n + j is answer j to prompt i.
    A view (no copy) for a contiguous x."""
    if group_size < 1:
        raise ValueError(f"the group size (--samples-per-prompt) must be >= 1, got {group_size}")
    B = x.shape[0]
    if B % group_size:
        raise ValueError(f"{B} rows of experience do not split into groups of {group_size} answers "
                         f"per prompt (--samples-per-prompt): the rows must be whole groups")
    return x.view(B // group_size, group_size, *x.shape[1:])


def _need_groups(group_size: int, what: str) -> None:
    if group_size < 2:
        raise ValueError(f"{what} compares the answers to the same prompt, so it needs "
                         f"--samples-per-prompt >= 2; got {group_size}")


def _all_equal(groups: torch.Tensor) -> torch.Tensor:
    """(G, n) -> (G,) bool: every score of the group is the same (exactly)."""
    return (groups == groups[:, :1]).all(-1)


def _per_token(per_answer: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """One value per answer on each of its real tokens: (B,), (B, A) -> (B, A) float32."""
    mask = action_mask.bool()
    return torch.where(mask, per_answer.float().unsqueeze(-1).expand(mask.shape),
                       torch.zeros((), dtype=torch.float32, device=per_answer.device))


def group_mean_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each score minus the mean of its group: (B,) -> (B,) float32 (Dr. GRPO, and the first step
    of REINFORCE++-baseline)."""
    g = group_view(scores.float(), group_size)
    return (g - g.mean(-1, keepdim=True)).reshape(-1)


def grpo_advantages(scores: torch.Tensor, action_mask: torch.Tensor, group_size: int, *,
                    scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024): A_i = (r_i - mean_g r) / (std_g r + eps) with the unbiased (n - 1)
    std, as verl, OpenRLHF and TRL; eps 1e-6 is verl's. scale_by_std=False is Dr. GRPO (Liu et al.
    2025): A_i = r_i - mean_g r, since dividing by the std over-weights prompts that are too easy
    or too hard.

    scores: (B,), action_mask: (B, A) -> (B, A) float32: A_i on every real token of answer i, 0 on
    masked positions. A group whose scores are all equal gets exactly 0 (no signal, and no
    rounding noise divided by eps).
    """
    _need_groups(group_size, "GRPO")
    g = group_view(scores.float(), group_size)  # (G, n)
    adv = g - g.mean(-1, keepdim=True)
    if scale_by_std:
        adv = adv / (g.std(-1, unbiased=True, keepdim=True) + eps)
    adv = torch.where(_all_equal(g).unsqueeze(-1), torch.zeros_like(adv), adv)
    return _per_token(adv.reshape(-1), action_mask)


def rloo_advantages(scores: torch.Tensor, action_mask: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): A_i = r_i - (sum_g r - r_i) / (n - 1), the score minus the mean
    of the group's other answers, = n / (n - 1) * (r_i - mean_g r).

    scores: (B,), action_mask: (B, A) -> (B, A) float32, A_i on every real token of answer i.
    """
    _need_groups(group_size, "RLOO")
    g = group_view(scores.float(), group_size)
    baseline = (g.sum(-1, keepdim=True) - g) / (group_size - 1)
    return _per_token((g - baseline).reshape(-1), action_mask)


def group_stats(scores: torch.Tensor, group_size: int) -> tuple[float, float]:
    """(mean over groups of the unbiased std of its scores, share of groups whose scores are all
    equal) for the log; (nan, nan) when group_size is 1. scores: (B,)."""
    if group_size < 2:
        return float("nan"), float("nan")
    g = group_view(scores.detach().float(), group_size)
    if g.shape[0] == 0:
        return float("nan"), float("nan")
    return float(g.std(-1, unbiased=True).mean()), float(_all_equal(g).float().mean())


# ---------------------------------------------------------------------------------------------
# per-token estimators


@torch.no_grad()
def returns_to_go(rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum over the row's real tokens s >= t of gamma^(number of real tokens between) * r_s.

    rewards, action_mask: (B, A) -> (B, A) float32, 0 on masked positions; a hole in the middle of
    a row is skipped, as in GAE (this is GAE with values 0 and lambda 1).
    """
    zero_values = torch.zeros(rewards.shape, dtype=torch.float32, device=rewards.device)
    returns, _ = gae_advantages_and_returns(zero_values, rewards, action_mask, gamma=gamma,
                                            lam=1.0)
    return returns


def reinforce_pp_advantages(token_rewards: torch.Tensor, action_mask: torch.Tensor,
                            gamma: float) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): the return-to-go of the per-token rewards, whitened over all real
    tokens of the batch with the population variance (OpenRLHF's): (G - mean) / sqrt(var + 1e-8).

    token_rewards, action_mask: (B, A) -> (B, A) float32, 0 on masked positions.
    """
    return masked_whiten(returns_to_go(token_rewards, action_mask, gamma), action_mask)


def gae(exp: Rollout, *, kl_ctl: float, clip_reward_value: float, gamma: float, lam: float,
        whiten: bool = False, kl_estimator: str = "k1") -> Advantages:
    """DeepSpeed-Chat's PPO: per-token rewards (-kl_ctl * kl_t, with kl_t = logprob - ref_logprob
    for k1, plus the clipped score on the last real answer token), then GAE over the critic's
    values. whiten normalises the advantages to mean 0 and variance 1 over the real tokens of the
    whole pooled experience."""
    rewards = kl_penalised_rewards(exp.logprobs, exp.ref_logprobs, exp.scores, exp.action_mask,
                                   kl_ctl=kl_ctl, clip_reward_value=clip_reward_value,
                                   kl_estimator=kl_estimator)
    adv, ret = gae_advantages_and_returns(exp.values, rewards, exp.action_mask, gamma=gamma,
                                          lam=lam)
    if whiten:
        adv = masked_whiten(adv, exp.action_mask)
    return Advantages(adv, ret)


# ---------------------------------------------------------------------------------------------
# the registry: (experience, options, kl_coef, group_size) -> Advantages


def _reward_kl_coef(opts, kl_coef: float) -> float:
    """The coefficient of the KL in the reward: 0 when the KL goes into the loss instead."""
    return kl_coef if opts.settings.kl_placement == "reward" else 0.0


def _clipped(scores: torch.Tensor, opts) -> torch.Tensor:
    c = opts.clip_reward_value
    return scores.float().clamp(-c, c)


def _group_scores(exp: Rollout, opts, kl_coef: float) -> torch.Tensor:
    """Each answer's score for a group estimator: clipped, minus coef * its summed KL when the KL
    is in the reward. (B,) float32."""
    scores = _clipped(exp.scores, opts)
    coef = _reward_kl_coef(opts, kl_coef)
    if coef == 0:
        return scores
    kl = kl_estimate(exp.logprobs, exp.ref_logprobs, opts.settings.kl_estimator, exp.action_mask)
    return scores - coef * masked_sum(kl, exp.action_mask, dim=-1)


def _maybe_whiten(adv: torch.Tensor, exp: Rollout, opts) -> torch.Tensor:
    return masked_whiten(adv, exp.action_mask) if opts.whiten_advantages else adv


def _token_rewards(exp: Rollout, scores: torch.Tensor, opts, kl_coef: float) -> torch.Tensor:
    """Per-token rewards of already-clipped scores (clipped once, before any baseline)."""
    return kl_penalised_rewards(exp.logprobs, exp.ref_logprobs, scores, exp.action_mask,
                                kl_ctl=_reward_kl_coef(opts, kl_coef), clip_reward_value=math.inf,
                                kl_estimator=opts.settings.kl_estimator)


def _gae(exp: Rollout, opts, kl_coef: float, group_size: int) -> Advantages:
    return gae(exp, kl_ctl=_reward_kl_coef(opts, kl_coef), clip_reward_value=opts.clip_reward_value,
               gamma=opts.gamma, lam=opts.lam, whiten=opts.whiten_advantages,
               kl_estimator=opts.settings.kl_estimator)


def _grpo(exp: Rollout, opts, kl_coef: float, group_size: int) -> Advantages:
    adv = grpo_advantages(_group_scores(exp, opts, kl_coef), exp.action_mask, group_size)
    return Advantages(_maybe_whiten(adv, exp, opts), None)


def _dr_grpo(exp: Rollout, opts, kl_coef: float, group_size: int) -> Advantages:
    adv = grpo_advantages(_group_scores(exp, opts, kl_coef), exp.action_mask, group_size,
                          scale_by_std=False)
    return Advantages(_maybe_whiten(adv, exp, opts), None)


def _rloo(exp: Rollout, opts, kl_coef: float, group_size: int) -> Advantages:
    adv = rloo_advantages(_group_scores(exp, opts, kl_coef), exp.action_mask, group_size)
    return Advantages(_maybe_whiten(adv, exp, opts), None)


def _reinforce_pp(exp: Rollout, opts, kl_coef: float, group_size: int) -> Advantages:
    rewards = _token_rewards(exp, _clipped(exp.scores, opts), opts, kl_coef)
    return Advantages(reinforce_pp_advantages(rewards, exp.action_mask, opts.gamma), None)


def _reinforce_pp_baseline(exp: Rollout, opts, kl_coef: float, group_size: int) -> Advantages:
    _need_groups(group_size, "REINFORCE++-baseline")
    scores = group_mean_baseline(_clipped(exp.scores, opts), group_size)
    rewards = _token_rewards(exp, scores, opts, kl_coef)
    return Advantages(reinforce_pp_advantages(rewards, exp.action_mask, opts.gamma), None)


Estimator = Callable[[Rollout, object, float, int], Advantages]

ESTIMATORS: dict[str, Estimator] = {
    "gae": _gae,
    "grpo": _grpo,
    "dr-grpo": _dr_grpo,
    "rloo": _rloo,
    "reinforce++": _reinforce_pp,
    "reinforce++-baseline": _reinforce_pp_baseline,
}


def estimate_advantages(exp: Rollout, opts, kl_coef: float | None = None,
                        group_size: int = 1) -> Advantages:
    """# 3. advantages: the selected estimator (opts.advantage_estimator, opts a
    config/ppo.PPOAlgoOptions) over the pooled experience, with the KL coefficient of this update
    (None: the estimator's, opts.settings.kl_coef) and group_size answers per prompt in
    contiguous rows. The critic-free estimators return returns=None."""
    s = opts.settings
    if s.estimator.needs_group:
        _need_groups(group_size, f"--advantage-estimator {s.estimator.name}")
    coef = s.kl_coef if kl_coef is None else kl_coef
    return ESTIMATORS[s.estimator.name](exp, opts, coef, group_size)
