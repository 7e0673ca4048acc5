"""PPO math for step 3, as pure torch functions (no DeepSpeed, no models).

Conventions (the same as dschat_cli/rlhf/reward.py):

- Masks are 1 (True) on real tokens, 0 on padding. Positions always come from masks, never from
  comparing token ids with the pad id (OPT's BOS equals its pad id; Llama models often pad with
  eos).
- Every per-token tensor here is over the ANSWER tokens only, shape (B, A), where A is the
  (padded) answer length. Answer token k of row b is seq[b, P + k]; it was produced by the action
  taken in the state seq[b, :P + k], so its logprob comes from the logits at position P - 1 + k and
  its value from the critic at position P - 1 + k. `answer_positions` does that slicing. This is
  the reference's ``[:, start:]`` with ``start = prompt_length - 1``.
- action_mask (B, A) is 1 on answer tokens that are real (generated up to and including eos), 0 on
  the padding after them. Rows are usually right-padded (a real prefix, then padding); the functions
  also accept holes in the middle of a row and treat them as "not an action" (see each docstring).
- Reductions follow the reference: a masked mean over the whole micro-batch is
  sum(x * mask) / sum(mask), so every real token weighs the same whatever its row's length. The
  policy loss can instead weigh every answer the same, or normalise by a constant length
  (`aggregate_loss`, --loss-aggregation).
- The arithmetic is done in float32, whatever the input dtype.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import torch

from dschat_cli.config.estimators import LOSS_AGGREGATIONS
from dschat_cli.rlhf.kl import kl_estimate
from dschat_cli.rlhf.logprobs import token_logprobs
from dschat_cli.rlhf.reward import last_real_index


class Rollout(NamedTuple):
    """One generation batch of experience (all tensors on one device, no gradients).

    B = batch size, P = padded prompt length (prompts are left-padded), A = padded answer length
    (answers are right-padded).

    prompts:        (B, P) long, the prompt ids, left-padded.
    seq:            (B, P + A) long, prompts followed by the generated answers.
    attention_mask: (B, P + A) 0/1, 1 on real tokens (prompt and answer).
    action_mask:    (B, A) 0/1, 1 on the answer tokens that count: attention_mask[:, P:] (the
                    generated tokens up to and including eos), except that an answer of <= 1
                    real token is dropped (its row is all 0 here; its attention mask keeps it).
    logprobs:       (B, A) float32, log pi_actor(answer token k | state) at generation time.
    ref_logprobs:   (B, A) float32, the same under the frozen reference (SFT) model.
    values:         (B, A) float32, critic value of the state before each answer token (read
                    only by the estimators with a critic).
    scores:         (B,) float32, reward-model score of each whole sequence (prompt + answer),
                    read at its last real token; unclipped.
    true_scores:    (B,) float32 or None, a known true reward of each answer (--true-reward), for
                    reporting only: never trained on.
    """

    prompts: torch.Tensor
    seq: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    true_scores: torch.Tensor | None = None

    def check_shapes(self) -> None:
        """Raise ValueError with a readable message if the fields' shapes disagree."""
        if self.prompts.dim() != 2 or self.seq.dim() != 2:
            raise ValueError(f"Rollout.prompts and Rollout.seq must be 2-D, got shapes "
                             f"{tuple(self.prompts.shape)} and {tuple(self.seq.shape)}")
        B, P = self.prompts.shape
        A = self.seq.shape[-1] - P
        if A < 1:
            raise ValueError(f"Rollout has no answer tokens (seq length {P + A}, "
                             f"prompt length {P})")
        expected = {"seq": (B, P + A), "attention_mask": (B, P + A), "action_mask": (B, A),
                    "logprobs": (B, A), "ref_logprobs": (B, A), "values": (B, A), "scores": (B,),
                    "true_scores": (B,)}
        for name, shape in expected.items():
            if getattr(self, name) is None:
                continue
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"Rollout.{name} has shape {got}, expected {shape} "
                                 f"(B={B}, P={P}, A={A})")


class PPOStats(NamedTuple):
    """What one update reports (python floats, for logging): losses and fractions are means over
    its mini-batches, the rest is over its pooled experience, all averaged over ranks.

    actor_loss:      clipped-surrogate policy loss.
    critic_loss:     clipped value loss (already times 0.5).
    unsup_loss:      unsupervised LM loss mixed into the actor (0.0 when not mixing).
    reward:          mean reward-model score (unclipped) of the answers kept (dropped ones, of
                     <= 1 token, do not count); nan when none was kept.
    kl:              mean over rows of sum over action_mask tokens of (logprob - ref_logprob).
    answer_length:   mean number of action_mask tokens per row (a dropped answer counts 0).
    clipfrac:        fraction of real tokens where the policy ratio clip is active.
    value_clipfrac:  fraction of real tokens where the value clip is active.
    approx_kl:       masked mean of 0.5 * (logprob - old_logprob)^2 (new vs rollout policy).
    advantage_mean:  masked mean of the advantages.
    return_mean:     masked mean of the returns.
    minibatches:     mini-batches trained on in this update (0: every one had no real answer
                     token, the losses are nan as none was computed).
    kl_coef:         the KL coefficient the update's rewards used (--kl-ctl, or adaptive).
    repetition:      mean over kept answers of their repeated-trigram share (rlhf/quality.py).
    distinct:        distinct-2 of the kept answers (per rank, averaged over ranks).
    eos_share:       share of kept answers that ended with eos (the rest hit the length limit).
    true_reward:     mean --true-reward of the kept answers (nan without one).
    kl_loss:         mean over mini-batches of the aggregated per-token KL estimate
                     (--kl-estimator, --loss-aggregation) that enters the actor loss times kl_coef;
                     nan when the KL is in the reward instead (--kl-placement reward).
    clipfrac_lower:  fraction of real tokens where the dual clip is active (negative advantage,
                     loss capped at --dual-clip x |advantage|); 0 without --dual-clip.
    group_reward_std: mean over prompts of the unbiased std of the scores of its group of answers
                     (--samples-per-prompt); nan with one answer per prompt.
    zero_std_groups: share of prompts whose answers all got the same score: a group estimator
                     gives them advantage 0, so they teach nothing; nan with one answer per prompt.
    entropy:         the actor's entropy -sum_v p log p per answer token (nats, 0 to
                     log(vocab)), from its training forwards (dropout on; a later --ppo-epochs
                     pass sees the updated actor), averaged over every real answer token trained
                     on (all mini-batches and ranks); a policy collapsing onto one answer shows
                     it falling towards 0; nan when no mini-batch was trained on.
    """

    actor_loss: float
    critic_loss: float
    unsup_loss: float
    reward: float
    kl: float
    answer_length: float
    clipfrac: float
    value_clipfrac: float
    approx_kl: float
    advantage_mean: float
    return_mean: float
    minibatches: int = 0
    kl_coef: float = float("nan")
    repetition: float = float("nan")
    distinct: float = float("nan")
    eos_share: float = float("nan")
    true_reward: float = float("nan")
    kl_loss: float = float("nan")
    clipfrac_lower: float = float("nan")
    group_reward_std: float = float("nan")
    zero_std_groups: float = float("nan")
    entropy: float = float("nan")


# ---------------------------------------------------------------------------------------------
# log-probabilities and slicing


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position, in float32.

    logits: (B, T, V) any float dtype; labels: (B, T) long -> (B, T) float32.
    logit[label] - logsumexp(logits), computed in float32 chunk by chunk (rlhf/logprobs.py): no
    float32 copy of the whole (B, T, V) is made, in the forward or the backward.
    """
    return token_logprobs(logits, labels)


def answer_positions(x: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """The positions of a full-sequence tensor that act on the answer tokens.

    x: (B, P + A, ...) logits or critic values over the whole sequence -> (B, A, ...):
    x[:, P - 1 : P + A - 1], the state just before each answer token (the reference's
    ``values[:, :-1][:, start:]`` with ``start = P - 1``).
    """
    if prompt_length < 1:
        raise ValueError(f"prompt_length must be >= 1, got {prompt_length}")
    return x[:, prompt_length - 1:-1]


def answer_logprobs(logits: torch.Tensor, seq: torch.Tensor, prompt_length: int, *,
                    entropy: bool = False):
    """Log-probabilities of the answer tokens only (and, with entropy=True, the entropy of the
    policy at each answer position).

    logits: (B, K, V), the logits of the LAST K positions of seq (B, P + A): K = P + A (the
    whole sequence) or K = A + 1 (what a forward with ``logits_to_keep=A + 1`` returns, see
    rlhf/logprobs.py `answer_logits_kwargs`); any K >= A + 1 works.
    -> (B, A) float32; element k is log p(seq[:, P + k] | seq[:, :P + k]), read from the logits
    of sequence position P - 1 + k, i.e. kept position K - A - 1 + k (`answer_positions` for
    K = P + A). With entropy=True: (logprobs, entropy), entropy (B, A) float32 in nats, no
    gradient. Only those A positions go through the softmax, in float32 chunks.
    """
    A = seq.shape[1] - prompt_length
    K = logits.shape[1]
    if prompt_length < 1 or K < A + 1:
        raise ValueError(f"answer_logprobs needs the logits of at least the last A + 1 = {A + 1} "
                         f"positions and a prompt (P = {prompt_length}); got {K} positions")
    return token_logprobs(logits, seq[:, prompt_length:], start=K - A - 1, entropy=entropy)


def answer_lengths(action_mask: torch.Tensor) -> torch.Tensor:
    """Number of real answer tokens per row. action_mask: (B, A) -> (B,) long."""
    return action_mask.long().sum(-1)


# ---------------------------------------------------------------------------------------------
# masked statistics


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x where mask is true; masked positions may hold anything, even inf or nan."""
    x = torch.where(mask.bool(), x.float(), torch.zeros((), dtype=torch.float32, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask), over everything (dim=None, a scalar) or along `dim`.

    x, mask: same shape (e.g. (B, A)). An all-masked slice gives 0, not nan.
    """
    count = mask.float().sum() if dim is None else mask.float().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of the real entries of x (a scalar), population (1/n) by default.

    unbiased=True applies Bessel's correction n / (n - 1) (TRL's default); dschat whitens with the
    population variance so that the whitened entries have variance exactly 1.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x.float() - mean) ** 2, mask)
    if unbiased:
        n = mask.float().sum()
        var = var * n / (n - 1).clamp(min=1.0)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the real entries; masked entries become 0.

    x, mask: (B, A) -> (B, A) float32. shift_mean=False adds the mean back (scales only).
    The reference does not whiten advantages; this is here for the option.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x.float() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------------
# rewards and advantages


def kl_penalised_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor,
                         action_mask: torch.Tensor, *, kl_ctl: float, clip_reward_value: float,
                         kl_estimator: str = "k1") -> torch.Tensor:
    """Per-token rewards: a KL penalty on every real answer token, the clipped score on the last.

    logprobs, ref_logprobs, action_mask: (B, A); scores: (B,) -> rewards (B, A) float32, 0 on
    masked positions.

        rewards[b, k] = -kl_ctl * kl[b, k]                                    if action_mask[b, k]
        rewards[b, last_b] += clamp(scores[b], -clip_reward_value, clip_reward_value)

    where kl = kl_estimate(logprobs, ref_logprobs, kl_estimator) (k1, the default, is
    logprobs - ref_logprobs) and last_b is the last real answer token of row b (from action_mask).
    A row without real answer tokens gets all zeros. clip_reward_value may be inf (no clip).

    Differs from the reference's ``compute_rewards``: there ``ends = start +
    action_mask[:, start:].sum(1) + 1`` and the score goes on ``rewards[j, start:ends[j]][-1]``,
    i.e. one position PAST the last real answer token whenever the answer stopped before the end
    (the first padding position, whose KL term and critic value then also enter the GAE), and at
    the wrong place if a row's mask is not a real prefix (the count, not the position, is used).
    Here the score lands on the last real token; for answers that fill all A positions the two
    agree.
    """
    mask = action_mask.bool()
    kl = kl_estimate(logprobs, ref_logprobs, kl_estimator, action_mask)
    rewards = torch.where(mask, -kl_ctl * kl, torch.zeros_like(kl))
    clipped = scores.float().clamp(-clip_reward_value, clip_reward_value)
    has_answer = mask.any(-1)
    last = last_real_index(action_mask).unsqueeze(-1)
    bonus = torch.where(has_answer, clipped, torch.zeros_like(clipped)).unsqueeze(-1)
    return rewards.scatter_add(-1, last, bonus)


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                action_mask: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the summed per-token KL estimate (logprobs - ref_logprobs), a scalar.

    logprobs, ref_logprobs, action_mask: (B, A). The log's "KL" figure.
    """
    return masked_sum(logprobs.float() - ref_logprobs.float(), action_mask, dim=-1).mean()


@torch.no_grad()
def gae_advantages_and_returns(values: torch.Tensor, rewards: torch.Tensor,
                               action_mask: torch.Tensor, *, gamma: float,
                               lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the answer tokens, backwards in time.

    values, rewards, action_mask: (B, A) -> (advantages, returns), both (B, A) float32, detached.

    For the real tokens t of a row, with t' the next real token of that row:
        delta_t = rewards_t + gamma * V_{t'} - V_t
        A_t     = delta_t + gamma * lam * A_{t'}
    and V_{t'} = A_{t'} = 0 after the row's last real token (the episode ends there).
    returns = advantages + values on real tokens. Masked positions contribute nothing and get
    advantage 0 and return 0 (whatever values/rewards they hold); a hole in the middle of a row is
    skipped, not treated as an episode end.

    Differs from the reference's ``get_advantages_and_returns``: it runs over all positions from
    ``start`` to the end after zeroing rewards and values from ``ends`` on, and ``ends`` is one past
    the last real answer token (see kl_penalised_rewards), so for an answer that stopped early the
    critic's value (and the KL term) at the first padding position still enters the GAE, and the
    padding positions get non-zero advantages (which the masked losses then ignore). Here the value
    after the last real token is exactly 0. For answers that fill all A positions the two agree.
    """
    mask = action_mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=values.device)
    values = torch.where(mask, values.float(), zero)
    rewards = torch.where(mask, rewards.float(), zero)
    B, A = values.shape
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(B, dtype=torch.float32, device=values.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(A)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m, adv, zero)
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv, next_adv)
    returns = advantages + values
    return advantages, returns


# ---------------------------------------------------------------------------------------------
# losses


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str,
                   max_len: int | None = None) -> torch.Tensor:
    """One number from a per-token loss (--loss-aggregation; verl's ``agg_loss``).

    per_token, mask: (B, A) -> a float32 scalar, differentiable in per_token. Masked positions may
    hold anything (even inf); an all-masked batch gives 0, not nan.

        token-mean:              sum(L * M) / sum(M)           every real token weighs the same
        seq-mean-token-mean:     mean over rows with >= 1 real token of sum_t(L * M) / sum_t(M)
                                 (every answer weighs the same; GRPO's paper)
        seq-mean-token-sum-norm: sum(L * M) / (B * max_len)     B = rows, max_len a constant
                                 (Dr. GRPO: no length bias from a per-answer or per-batch count)
    """
    if mode == "token-mean":
        return masked_mean(per_token, mask)
    if mode == "seq-mean-token-mean":
        has_token = mask.bool().any(-1)  # (B,)
        per_row = masked_mean(per_token, mask, dim=-1)  # (B,), 0 on rows without a real token
        return masked_mean(per_row, has_token)
    if mode == "seq-mean-token-sum-norm":
        if max_len is None or max_len < 1:
            raise ValueError("loss aggregation seq-mean-token-sum-norm needs max_len >= 1 (the "
                             f"--max-answer-seq-len), got {max_len}")
        return masked_sum(per_token, mask) / (per_token.shape[0] * max_len)
    raise ValueError(f"unknown loss aggregation {mode!r}; one of {', '.join(LOSS_AGGREGATIONS)}")


class PolicyLoss(NamedTuple):
    """What `policy_loss` returns: float32 scalars, only loss carries a gradient.

    loss:           the aggregated clipped surrogate.
    clipfrac:       masked share of tokens where the ratio clip is active.
    approx_kl:      masked mean of 0.5 * (logprobs - old_logprobs)^2.
    clipfrac_lower: masked share of tokens where the dual clip is active (0 without it).
    """

    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    clipfrac_lower: torch.Tensor


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                action_mask: torch.Tensor, *, cliprange: float, cliprange_high: float | None = None,
                dual_clip: float | None = None, aggregation: str = "token-mean",
                max_len: int | None = None) -> PolicyLoss:
    """PPO clipped surrogate (the reference's ``actor_loss_fn``), with DAPO's clip-higher and
    dual-clip PPO (Ye et al. 2020) as options.

    logprobs (with grad), old_logprobs, advantages, action_mask: (B, A) -> PolicyLoss.

        ratio     = exp(logprobs - old_logprobs)
        unclipped = -adv * ratio
        clipped   = -adv * clamp(ratio, 1 - cliprange, 1 + cliprange_high)
        per_token = max(unclipped, clipped)
        per_token = min(per_token, dual_clip * -adv)    where adv < 0, with dual_clip (verl's rule)
        loss      = aggregate_loss(per_token, action_mask, aggregation, max_len)
        clipfrac       = masked_mean(clipped > unclipped): the ratio clip is active
        clipfrac_lower = masked_mean(adv < 0 and max(unclipped, clipped) > dual_clip * -adv)
        approx_kl      = masked_mean(0.5 * (logprobs - old_logprobs) ** 2)

    cliprange_high None is cliprange (the symmetric clip). Without dual clip, a token the actor has
    made far less likely than at sampling time (ratio >> 1) with a negative advantage has an
    unbounded loss -adv * ratio; dual_clip (> 1, e.g. 3) caps it. The defaults are the reference.

    The log-ratio is zeroed on masked positions before the exp, so garbage there (even inf) gives
    neither a nan loss nor a nan gradient.
    """
    mask = action_mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)
    log_ratio = torch.where(mask, logprobs.float() - old_logprobs.float(), zero)
    advantages = torch.where(mask, advantages.float().detach(), zero)
    ratio = torch.exp(log_ratio)
    high = cliprange if cliprange_high is None else cliprange_high
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(mask)
    if dual_clip is not None:
        cap = -advantages * dual_clip
        dual_active = (advantages < 0) & (per_token > cap)
        per_token = torch.where(advantages < 0, torch.minimum(per_token, cap), per_token)
    loss = aggregate_loss(per_token, mask, aggregation, max_len)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        clipfrac_lower = masked_mean(dual_active.float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
    return PolicyLoss(loss, clipfrac, approx_kl, clipfrac_lower)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               action_mask: torch.Tensor, *,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (the reference's ``critic_loss_fn``).

    values (with grad), old_values, returns, action_mask: (B, A) -> (loss, clipfrac), float32
    scalars; only loss carries a gradient.

        v_clip = clamp(values, old_values - c, old_values + c)
        loss   = 0.5 * masked_mean(max((values - returns)^2, (v_clip - returns)^2))
        clipfrac = masked_mean(clipped error > unclipped error)
    """
    mask = action_mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=values.device)
    values = torch.where(mask, values.float(), zero)
    old_values = torch.where(mask, old_values.float().detach(), zero)
    returns = torch.where(mask, returns.float().detach(), zero)
    v_clip = torch.maximum(torch.minimum(values, old_values + cliprange_value),
                           old_values - cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (v_clip - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


# ---------------------------------------------------------------------------------------------
# EMA of the actor


@torch.no_grad()
def ema_update(ema_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor],
               beta: float = 0.992) -> None:
    """ema = beta * ema + (1 - beta) * param, in place, pairwise over two iterables of tensors.

    The reference's ``ema = lerp(param, ema, 0.992)``. Both iterables must have the same length
    and pairwise the same shapes; params may have another dtype (they are cast to the EMA's).
    """
    for ema, param in zip(ema_params, params, strict=True):
        if ema.shape != param.shape:
            raise ValueError(f"EMA tensor of shape {tuple(ema.shape)} paired with a parameter of "
                             f"shape {tuple(param.shape)}")
        ema.lerp_(param.detach().to(dtype=ema.dtype, device=ema.device), 1.0 - beta)
