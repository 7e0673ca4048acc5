"""# 4. update: the actor (and the critic) over one pooled experience, in mini-batches.

    learner = Learner(models, cfg, dist, unsup_iter=..., ema=..., timer=...)
    stats = learner.update(experience, advantages)     # PPOStats, the same on every rank

--ppo-epochs passes over the experience, each cut in order into mini-batches of
--per-device-training-batch-size rows (rows of several rollouts may share a mini-batch, as in
DeepSpeed-Chat). Per mini-batch: one actor step on the clipped surrogate (aggregated by
--loss-aggregation, plus the KL to the reference with --kl-placement loss), one on the
unsupervised LM loss with --unsup-coef when mixing, one critic step on the clipped value loss
(when the estimator has a critic), then the EMA. A mini-batch whose answers are all masked out
on every rank (all answers <= 1 token) is skipped: no backward, no optimizer or scheduler step.
"""

from __future__ import annotations

import torch

from dschat_cli.config.ppo import PPOConfig
from dschat_cli.dist import Dist
from dschat_cli.models.reward import positions_from_mask
from dschat_cli.rlhf.advantages import Advantages, group_stats
from dschat_cli.rlhf.experience import minibatch_slices, take_rows, trim_padding
from dschat_cli.rlhf.kl import kl_estimate
from dschat_cli.rlhf.logprobs import answer_logits_kwargs
from dschat_cli.rlhf.ppo import (PPOStats, Rollout, aggregate_loss, answer_logprobs,
                                 answer_positions, masked_mean, masked_sum, policy_loss,
                                 sequence_kl, value_loss)
from dschat_cli.steps.common import PhaseTimer, move_batch
from dschat_cli.steps.health import GradNorms
from dschat_cli.steps.rl.experience import answer_quality


class Learner:
    def __init__(self, models, cfg: PPOConfig, dist: Dist, *, unsup_iter=None, ema=None,
                 timer: PhaseTimer | None = None):
        self.m = models
        self.cfg = cfg
        self.dist = dist
        self.unsup_iter = unsup_iter  # Cycle over LM blocks when mixing the unsupervised loss
        self.ema = ema  # ActorEMA or None
        self.timer = timer or PhaseTimer(enabled=False)
        # the global gradient norm of each optimizer step, for the health monitor
        self.grad_norms = {"actor": GradNorms(models.actor)}
        if models.critic is not None:
            self.grad_norms["critic"] = GradNorms(models.critic)
        self.skipped_minibatches = 0  # all answers masked out on every rank: no step taken

    def update(self, exp: Rollout, adv: Advantages, kl_coef: float | None = None) -> PPOStats:
        """`kl_coef`: this update's KL coefficient (adaptive KL moves it; default the run's), used
        here when the KL is a loss term (--kl-placement loss)."""
        c, t, s = self.cfg.ppo, self.cfg.train, self.cfg.ppo.settings
        kl_coef = s.kl_coef if kl_coef is None else kl_coef
        kl_in_loss = s.kl_placement == "loss" and kl_coef > 0
        max_len = self.cfg.generation.max_answer_seq_len  # Dr. GRPO's constant normaliser
        train_critic = adv.returns is not None and self.m.critic is not None
        self.m.actor.train()
        if train_critic:
            self.m.critic.train()
        sums: dict[str, float] = {}
        n = 0
        entropy_sum = entropy_tokens = 0.0
        for _ in range(t.ppo_epochs):
            for rows in minibatch_slices(exp.seq.shape[0], t.per_device_training_batch_size):
                mini = trim_padding(take_rows(exp, rows))
                A = mini.action_mask.shape[1]
                if not self._any_real_answer(mini.action_mask):
                    self.skipped_minibatches += 1
                    continue
                P = mini.prompts.shape[1]
                seq, att, am = mini.seq, mini.attention_mask, mini.action_mask
                pos = positions_from_mask(att)
                with self.timer("actor_train"):
                    # logits (Bt, A + 1, V) of the answer positions only (all P + A positions
                    # for a model without logits_to_keep); the logprobs' autograd node keeps them
                    # for the backward, which frees them: no name here holds them longer
                    lp, entropy = answer_logprobs(
                        self.m.actor(input_ids=seq, attention_mask=att, position_ids=pos,
                                     use_cache=False,
                                     **answer_logits_kwargs(self.m.actor, seq, P)).logits,
                        seq, P, entropy=True)
                    pl = policy_loss(lp, mini.logprobs, adv.advantages[rows, :A], am,
                                     cliprange=s.cliprange_low, cliprange_high=s.cliprange_high,
                                     dual_clip=s.dual_clip, aggregation=s.loss_aggregation,
                                     max_len=max_len)
                    a_loss, loss = pl.loss, pl.loss
                    kl_loss = torch.full((), float("nan"))
                    if kl_in_loss:  # GRPO style: + coef x KL(actor || reference) in the loss
                        kl_loss = aggregate_loss(kl_estimate(lp, mini.ref_logprobs,
                                                             s.kl_estimator),
                                                 am, s.loss_aggregation, max_len=max_len)
                        loss = loss + kl_coef * kl_loss
                    self.m.actor.backward(loss)
                    self.m.actor.step()
                self.grad_norms["actor"].poll()
                u_loss = torch.zeros(())
                if self.unsup_iter is not None:
                    ub = move_batch(next(self.unsup_iter), self.m.actor.device)
                    u_loss = self.m.actor(**ub, use_cache=False).loss
                    self.m.actor.backward(u_loss * self.cfg.data.unsup_coef)
                    self.m.actor.step()
                    self.grad_norms["actor"].poll()
                c_loss = vclip = torch.zeros(())
                if train_critic:
                    with self.timer("critic_train"):
                        values = answer_positions(self.m.critic(seq, att, position_ids=pos), P)
                        c_loss, vclip = value_loss(values.float(), mini.values,
                                                   adv.returns[rows, :A], am,
                                                   cliprange_value=c.cliprange_value)
                        self.m.critic.backward(c_loss)
                        self.m.critic.step()
                    self.grad_norms["critic"].poll()
                if self.ema is not None:
                    self.ema.update()
                for k, v in (("actor_loss", a_loss), ("critic_loss", c_loss),
                             ("unsup_loss", u_loss), ("clipfrac", pl.clipfrac),
                             ("value_clipfrac", vclip), ("approx_kl", pl.approx_kl),
                             ("clipfrac_lower", pl.clipfrac_lower), ("kl_loss", kl_loss)):
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                # the policy's entropy, summed over real answer tokens (a token-weighted mean
                # below: a rank's mini-batch without real tokens adds nothing, not a 0)
                entropy_sum += float(masked_sum(entropy, am))
                entropy_tokens += float(am.sum())
                n += 1
        stats = self._stats(exp, adv, sums, n)._replace(
            entropy=self._token_mean(entropy_sum, entropy_tokens))
        if not train_critic:  # no critic: its figures do not exist (not 0)
            stats = stats._replace(critic_loss=float("nan"), value_clipfrac=float("nan"),
                                   return_mean=float("nan"))
        return stats

    def _any_real_answer(self, action_mask: torch.Tensor) -> bool:
        """Whether any rank's mini-batch has a real answer token (all ranks decide alike: they
        must take the same optimizer steps)."""
        return self.dist.all_reduce_sum(float(action_mask.sum())) > 0

    def _token_mean(self, total: float, tokens: float) -> float:
        """A per-token figure's mean over every rank's real answer tokens (nan without any)."""
        tokens = self.dist.all_reduce_sum(tokens)
        return self.dist.all_reduce_sum(total) / tokens if tokens else float("nan")

    def _stats(self, exp: Rollout, adv: Advantages, sums: dict, n: int) -> PPOStats:
        mean = {k: self.dist.all_reduce_mean(v / n) if n else float("nan")
                for k, v in sums.items()}
        nan = float("nan")
        kept = exp.action_mask.sum(1) > 0
        scores = exp.scores[kept]
        avg = self.dist.all_reduce_mean
        returns = adv.returns if adv.returns is not None else torch.zeros_like(adv.advantages)
        return PPOStats(
            actor_loss=mean.get("actor_loss", nan), critic_loss=mean.get("critic_loss", nan),
            unsup_loss=mean.get("unsup_loss", nan),
            reward=avg(float(scores.mean()) if len(scores) else nan),
            kl=avg(sequence_kl(exp.logprobs, exp.ref_logprobs, exp.action_mask)).item(),
            answer_length=avg(exp.action_mask.sum(1).float().mean()).item(),
            clipfrac=mean.get("clipfrac", nan), value_clipfrac=mean.get("value_clipfrac", nan),
            approx_kl=mean.get("approx_kl", nan),
            advantage_mean=avg(masked_mean(adv.advantages, exp.action_mask)).item(),
            return_mean=avg(masked_mean(returns, exp.action_mask)).item(), minibatches=n,
            kl_loss=mean.get("kl_loss", nan), clipfrac_lower=mean.get("clipfrac_lower", nan),
            **self._group_figures(exp),
            **answer_quality(exp, kept, self.m.tokenizer.eos_token_id, self.dist))

    def _group_figures(self, exp: Rollout) -> dict:
        """The spread of the scores within each prompt's group of answers, and the share of groups
        whose scores are all equal (they give a group estimator no signal), over all ranks."""
        n = self.cfg.train.samples_per_prompt
        spread, zero_share = group_stats(exp.scores, n)
        if n < 2:
            return {"group_reward_std": spread, "zero_std_groups": zero_share}
        avg = self.dist.all_reduce_mean
        return {"group_reward_std": avg(spread), "zero_std_groups": avg(zero_share)}
