"""PPO math on tiny hand-computed tensors; the arithmetic is written next to each expectation."""

import math

import pytest
import torch

from dschat_cli.rlhf.ppo import (PPOStats, Rollout, answer_lengths, answer_logprobs,
                                 answer_positions, ema_update, gae_advantages_and_returns,
                                 kl_penalised_rewards, logprobs_from_logits, masked_mean,
                                 masked_sum, masked_var, masked_whiten, policy_loss,
                                 sequence_kl, value_loss)


def close(actual, expected, tol=1e-5):
    actual = torch.as_tensor(actual, dtype=torch.float32)
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=tol, rtol=0), (actual, expected)


# ---------------------------------------------------------------------------------------------
# log-probabilities and slicing


def test_logprobs_from_logits_hand_computed():
    # logits = log([1, 2, 3]) -> softmax = [1/6, 2/6, 3/6]
    # label 2 -> log(3/6) = log 0.5 = -0.693147 ; label 0 -> log(1/6) = -1.791759
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]))  # (1, 2, 3)
    labels = torch.tensor([[2, 0]])
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    close(out, [[math.log(0.5), math.log(1 / 6)]])


def test_logprobs_from_logits_is_numerically_safe_and_float32_for_bf16():
    # logits [1000, 0]: softmax = [1/(1+e^-1000), e^-1000/(1+...)] -> log p = [~0, -1000]
    # (a naive exp would overflow; logsumexp subtracts the max first)
    logits = torch.tensor([[[1000.0, 0.0], [1000.0, 0.0]]], dtype=torch.bfloat16)
    out = logprobs_from_logits(logits, torch.tensor([[0, 1]]))
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    close(out, [[0.0, -1000.0]])
    # same numbers as gather(log_softmax) on random logits
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    expected = logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(logprobs_from_logits(logits, labels), expected)


def test_answer_positions_and_answer_logprobs():
    # P = 2, A = 3, T = 5: answer token k = seq[:, 2 + k] is predicted at position 1 + k,
    # so the answer positions are 1, 2, 3 (position 4 predicts nothing).
    x = torch.arange(10.0).view(2, 5)  # row 0: 0..4, row 1: 5..9
    close(answer_positions(x, 2), [[1.0, 2.0, 3.0], [6.0, 7.0, 8.0]])
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 6, generator=g)
    seq = torch.randint(0, 6, (2, 5), generator=g)
    full = logprobs_from_logits(logits[:, :-1], seq[:, 1:])  # the reference's (B, T-1)
    out = answer_logprobs(logits, seq, prompt_length=2)
    assert out.shape == (2, 3)
    close(out, full[:, 1:])  # the reference's [:, start:] with start = P - 1 = 1
    with pytest.raises(ValueError):
        answer_positions(x, 0)


def test_answer_lengths():
    # row 0: 3 real answer tokens, row 1: 1
    assert answer_lengths(torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])).tolist() == [3, 1]


# ---------------------------------------------------------------------------------------------
# masked statistics

X = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, float("nan"), float("inf")]])
M = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # row 2 shorter


def test_masked_mean_global_and_per_row_ignores_garbage():
    # global: (1 + 2 + 3 + 4 + 5) / 5 = 15 / 5 = 3   (100, nan, inf are masked out)
    close(masked_mean(X, M), 3.0)
    close(masked_sum(X, M), 15.0)
    # per row: (1 + 2 + 3) / 3 = 2 ; (4 + 5) / 2 = 4.5
    close(masked_mean(X, M, dim=-1), [2.0, 4.5])
    # an all-masked row gives 0, not nan
    close(masked_mean(X, torch.zeros_like(M), dim=-1), [0.0, 0.0])


def test_masked_var():
    # real values 1, 2, 3, 4, 5 ; mean 3 ; squared deviations 4, 1, 0, 1, 4 -> sum 10
    # population var = 10 / 5 = 2 ; unbiased = 10 / 4 = 2.5
    close(masked_var(X, M), 2.0)
    close(masked_var(X, M, unbiased=True), 2.5)


def test_masked_whiten_mean0_var1_masked_zero():
    # (x - 3) / sqrt(2): [-2, -1, 0] / 1.414214 = [-1.414214, -0.707107, 0]
    #                    [ 1,  2]    / 1.414214 = [ 0.707107,  1.414214]
    # masked positions (100, nan, inf) -> 0
    s = 1 / math.sqrt(2.0)
    out = masked_whiten(X, M)
    close(out, [[-2 * s, -s, 0.0, 0.0], [s, 2 * s, 0.0, 0.0]])
    close(masked_mean(out, M), 0.0)
    close(masked_var(out, M), 1.0)
    # shift_mean=False: add the mean back -> [3 - 1.414214, 3 - 0.707107, 3, 3.707107, 4.414214]
    out = masked_whiten(X, M, shift_mean=False)
    close(out, [[3 - 2 * s, 3 - s, 3.0, 0.0], [3 + s, 3 + 2 * s, 0.0, 0.0]])
    close(masked_mean(out, M), 3.0)
    close(masked_var(out, M), 1.0)


# ---------------------------------------------------------------------------------------------
# rewards


def test_kl_penalised_rewards_clips_both_signs_and_uses_the_mask():
    # kl_ctl = 0.1, clip_reward_value = 5
    # row 0 (4 real tokens): lp - ref = [-1+1.5, -2+2, -0.5+1.5, -1+0.5] = [0.5, 0, 1.0, -0.5]
    #   -0.1 * that = [-0.05, 0, -0.1, 0.05]; score 7 -> clipped to 5 on the last token (k=3):
    #   0.05 + 5 = 5.05
    # row 1 (2 real tokens, padding after): lp - ref = [-1+0.8, -1+1.2] = [-0.2, 0.2]
    #   -0.1 * that = [0.02, -0.02]; score -9 -> clipped to -5 on its last real token (k=1):
    #   -0.02 - 5 = -5.02 ; the padding (logprob 9, ref 0) gives 0, not -0.9
    lp = torch.tensor([[-1.0, -2.0, -0.5, -1.0], [-1.0, -1.0, 9.0, 9.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.5, -0.5], [-0.8, -1.2, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    scores = torch.tensor([7.0, -9.0])
    r = kl_penalised_rewards(lp, ref, scores, mask, kl_ctl=0.1, clip_reward_value=5.0)
    close(r, [[-0.05, 0.0, -0.1, 5.05], [0.02, -5.02, 0.0, 0.0]])


def test_kl_penalised_rewards_score_inside_clip_range_and_empty_row():
    # row 0: lp == ref everywhere -> no KL term; score 2.5 is inside [-5, 5] -> unchanged on k=2
    #        (mask [1, 1, 1, 0]; the pad id is irrelevant, only the mask is read)
    # row 1: score -3 inside the range; kl_ctl 0.5 * (lp - ref = 1.0) = -0.5 on k=0 -> -0.5 - 3
    # row 2: no real answer token at all -> all zeros, the score goes nowhere
    lp = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-1.0, 0.0, 0.0, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    scores = torch.tensor([2.5, -3.0, 4.0])
    r = kl_penalised_rewards(lp, ref, scores, mask, kl_ctl=0.5, clip_reward_value=5.0)
    close(r, [[0.0, 0.0, 2.5, 0.0], [-3.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_sequence_kl():
    # row 0: sum(lp - ref) = 0.5 + 0 + 1.0 - 0.5 = 1.0 ; row 1: -0.2 + 0.2 = 0 (padding ignored)
    # mean over rows = (1.0 + 0) / 2 = 0.5
    lp = torch.tensor([[-1.0, -2.0, -0.5, -1.0], [-1.0, -1.0, 9.0, 9.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.5, -0.5], [-0.8, -1.2, 0.0, 0.0]])
    close(sequence_kl(lp, ref, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])), 0.5)


# ---------------------------------------------------------------------------------------------
# GAE


def test_gae_gamma1_lam095_with_a_shorter_row():
    # gamma = 1, lam = 0.95; delta_t = r_t + V_{t+1} - V_t ; A_t = delta_t + 0.95 * A_{t+1}
    # row 0: V = [1, 2, 3], r = [0, 0, 1], all real
    #   t=2: delta = 1 + 0 - 3 = -2                ; A2 = -2
    #   t=1: delta = 0 + 3 - 2 = 1                 ; A1 = 1 + 0.95 * -2   = -0.9
    #   t=0: delta = 0 + 2 - 1 = 1                 ; A0 = 1 + 0.95 * -0.9 = 0.145
    #   returns = A + V = [1.145, 1.1, 1.0]
    # row 1: V = [0.5, -1, 7(pad)], r = [0.2, 3, 9(pad)], mask [1, 1, 0]
    #   t=2: padding -> A = 0, and the value after the last real token is 0 (not 7)
    #   t=1: delta = 3 + 0 - (-1) = 4              ; A1 = 4
    #   t=0: delta = 0.2 + (-1) - 0.5 = -1.3       ; A0 = -1.3 + 0.95 * 4 = 2.5
    #   returns = [2.5 + 0.5, 4 - 1, 0] = [3, 3, 0]
    values = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 7.0]], requires_grad=True)
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.2, 3.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae_advantages_and_returns(values, rewards, mask, gamma=1.0, lam=0.95)
    close(adv, [[0.145, -0.9, -2.0], [2.5, 4.0, 0.0]])
    close(ret, [[1.145, 1.1, 1.0], [3.0, 3.0, 0.0]])
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_gamma09_lam1_is_monte_carlo():
    # gamma = 0.9, lam = 1: A_t = (discounted return G_t) - V_t, returns = G_t
    # row 0: V = [1, 2, 3, 4], r = [1, 0, 0, 10]
    #   t=3: delta = 10 + 0 - 4 = 6                       ; A3 = 6
    #   t=2: delta = 0 + 0.9*4 - 3 = 0.6                  ; A2 = 0.6 + 0.9*6   = 6.0
    #   t=1: delta = 0 + 0.9*3 - 2 = 0.7                  ; A1 = 0.7 + 0.9*6.0 = 6.1
    #   t=0: delta = 1 + 0.9*2 - 1 = 1.8                  ; A0 = 1.8 + 0.9*6.1 = 7.29
    #   returns = [8.29, 8.1, 9, 10]; check: G3 = 10, G2 = 0.9*10 = 9, G1 = 0.9*9 = 8.1,
    #   G0 = 1 + 0.9*8.1 = 8.29
    # row 1 (shorter): V = [0.5, 1, 99, 99], r = [0, 2, 99, 99], mask [1, 1, 0, 0]
    #   t=1: delta = 2 + 0 - 1 = 1                        ; A1 = 1
    #   t=0: delta = 0 + 0.9*1 - 0.5 = 0.4                ; A0 = 0.4 + 0.9*1 = 1.3
    #   returns = [1.8, 2, 0, 0]; check: G1 = 2, G0 = 0.9*2 = 1.8
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 99.0, 99.0]])
    rewards = torch.tensor([[1.0, 0.0, 0.0, 10.0], [0.0, 2.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = gae_advantages_and_returns(values, rewards, mask, gamma=0.9, lam=1.0)
    close(adv, [[7.29, 6.1, 6.0, 6.0], [1.3, 1.0, 0.0, 0.0]])
    close(ret, [[8.29, 8.1, 9.0, 10.0], [1.8, 2.0, 0.0, 0.0]])


def test_gae_skips_a_hole_in_the_middle_of_a_row():
    # gamma = 0.9, lam = 1; V = [1, 50, 2], r = [0, 50, 3], mask [1, 0, 1]: t=1 is not an action
    #   t=2: delta = 3 + 0 - 2 = 1                        ; A2 = 1
    #   t=1: skipped -> A1 = 0, return 0; the next real token (t=2) carries over
    #   t=0: delta = 0 + 0.9*V2 - V0 = 1.8 - 1 = 0.8      ; A0 = 0.8 + 0.9*1 = 1.7
    #   returns = [2.7, 0, 3]; check: G0 = 0.9*3 = 2.7
    adv, ret = gae_advantages_and_returns(torch.tensor([[1.0, 50.0, 2.0]]),
                                          torch.tensor([[0.0, 50.0, 3.0]]),
                                          torch.tensor([[1, 0, 1]]), gamma=0.9, lam=1.0)
    close(adv, [[1.7, 0.0, 1.0]])
    close(ret, [[2.7, 0.0, 3.0]])


def _reference_rewards_and_gae(lp, ref, scores, action_mask, values, kl_ctl, clip, gamma, lam):
    """DeepSpeed-Chat's compute_rewards + train_rlhf zeroing + get_advantages_and_returns,
    transcribed with start = 0 (answer-only tensors)."""
    rewards = -kl_ctl * (lp - ref)
    start = 0
    ends = start + action_mask[:, start:].sum(1) + 1
    reward_clip = torch.clamp(scores, -clip, clip)
    for j in range(lp.shape[0]):
        rewards[j, start:ends[j]][-1] += reward_clip[j]
    values = values.clone()
    for i in range(rewards.shape[0]):
        rewards[i, ends[i]:] = 0
        values[i, ends[i]:] = 0
    lastgaelam = 0
    advantages_reversed = []
    length = rewards.size()[-1]
    for t in reversed(range(start, length)):
        nextvalues = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return rewards, advantages, advantages + values[:, start:]


def test_matches_the_reference_for_full_length_answers_and_documents_the_difference():
    g = torch.Generator().manual_seed(2)
    lp, ref, values = (torch.randn(2, 4, generator=g) for _ in range(3))
    scores = torch.tensor([6.0, -1.5])
    full = torch.ones(2, 4, dtype=torch.long)
    r_ref, a_ref, ret_ref = _reference_rewards_and_gae(lp, ref, scores, full, values,
                                                       0.1, 5.0, 1.0, 0.95)
    r = kl_penalised_rewards(lp, ref, scores, full, kl_ctl=0.1, clip_reward_value=5.0)
    a, ret = gae_advantages_and_returns(values, r, full, gamma=1.0, lam=0.95)
    close(r, r_ref)
    close(a, a_ref)
    close(ret, ret_ref)
    # An answer that stopped early (2 real tokens of 4): the reference's `ends` is 3, so its score
    # lands on k=2, the first padding position; here it lands on k=1, the last real token.
    short = torch.tensor([[1, 1, 0, 0]])
    r_ref, _, _ = _reference_rewards_and_gae(torch.zeros(1, 4), torch.zeros(1, 4),
                                             torch.tensor([1.0]), short, torch.zeros(1, 4),
                                             0.1, 5.0, 1.0, 0.95)
    close(r_ref, [[0.0, 0.0, 1.0, 0.0]])
    r = kl_penalised_rewards(torch.zeros(1, 4), torch.zeros(1, 4), torch.tensor([1.0]), short,
                             kl_ctl=0.1, clip_reward_value=5.0)
    close(r, [[0.0, 1.0, 0.0, 0.0]])


# ---------------------------------------------------------------------------------------------
# policy loss

# cliprange 0.2 -> the ratio is clamped to [0.8, 1.2]
# row 0 (4 real): log-ratio = [ln 1.5, ln 0.5, ln 1.1, ln 1.1], adv = [1, 1, -1, -2]
#   k0: ratio 1.5, A= 1: unclipped -1.5, clipped -1*1.2 = -1.2 -> max -1.2   (clip active)
#   k1: ratio 0.5, A= 1: unclipped -0.5, clipped -1*0.8 = -0.8 -> max -0.5
#   k2: ratio 1.1, A=-1: unclipped  1.1, clipped  1.1          -> max  1.1
#   k3: ratio 1.1, A=-2: unclipped  2.2, clipped  2.2          -> max  2.2
# row 1 (2 real, padding holds garbage): log-ratio = [ln 0.5, 0], adv = [-1, 3]
#   k0: ratio 0.5, A=-1: unclipped  0.5, clipped  0.8          -> max  0.8   (clip active)
#   k1: ratio 1.0, A= 3: unclipped -3,   clipped -3            -> max -3
# loss = (-1.2 - 0.5 + 1.1 + 2.2 + 0.8 - 3) / 6 = -0.6 / 6 = -0.1
# clipfrac = 2 / 6
# approx_kl = 0.5 * (ln1.5^2 + ln0.5^2 + 2 ln1.1^2 + ln0.5^2 + 0) / 6
#           = 0.5 * (0.164402 + 0.480453 + 2*0.009084 + 0.480453) / 6 = 0.5 * 1.143476 / 6
#           = 0.095290
OLD = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, 0.0, 0.0]])
LOG_RATIO = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1), math.log(1.1)],
                          [math.log(0.5), 0.0, 0.0, 0.0]])
ADV = torch.tensor([[1.0, 1.0, -1.0, -2.0], [-1.0, 3.0, 50.0, 50.0]])
PMASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])


def _policy_inputs():
    lp = OLD + LOG_RATIO
    lp[1, 2:] = torch.tensor([float("inf"), 1e4])  # garbage on the padding
    return lp.requires_grad_()


def test_policy_loss_hand_computed():
    out = policy_loss(_policy_inputs(), OLD, ADV, PMASK, cliprange=0.2)
    loss, clipfrac, approx_kl = out.loss, out.clipfrac, out.approx_kl
    close(loss, -0.1)
    close(clipfrac, 2 / 6)
    close(approx_kl, 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2
                            + 2 * math.log(1.1) ** 2) / 6)
    close(approx_kl, 0.095290)
    assert loss.requires_grad and not clipfrac.requires_grad and not approx_kl.requires_grad
    close(out.clipfrac_lower, 0.0)  # no dual clip by default


def test_policy_loss_gradient_direction():
    # d loss / d lp = -A * ratio / 6 where the unclipped term is taken, 0 where the clip is active
    #   row 0: k0 clipped -> 0 ; k1: -1*0.5/6 ; k2: +1*1.1/6 ; k3: +2*1.1/6
    #   row 1: k0 clipped -> 0 ; k1: -3*1/6 = -0.5 ; padding -> 0 (no nan despite inf there)
    # so gradient descent raises the positive-advantage tokens' logprobs, lowers the negative ones
    lp = _policy_inputs()
    loss = policy_loss(lp, OLD, ADV, PMASK, cliprange=0.2).loss
    loss.backward()
    close(lp.grad, [[0.0, -0.5 / 6, 1.1 / 6, 2.2 / 6], [0.0, -0.5, 0.0, 0.0]])
    # one SGD step: the negative-advantage tokens' logprobs go down, the loss goes down
    with torch.no_grad():
        stepped = (lp - 0.1 * lp.grad).masked_fill(~PMASK.bool(), 0.0).requires_grad_()
    new_loss = policy_loss(stepped, OLD, ADV, PMASK, cliprange=0.2).loss
    assert new_loss.item() < loss.item()
    assert (stepped[0, 2:] < lp[0, 2:]).all()      # A = -1, -2: logprob decreased
    assert stepped[1, 1] > lp[1, 1]                # A = 3: logprob increased


def test_policy_loss_single_negative_advantage_token():
    # one token, ratio 1, A = -1: loss = -A * ratio = 1, d loss / d lp = 1 > 0 -> descent lowers lp
    lp = torch.tensor([[-0.7]], requires_grad=True)
    loss, clipfrac, approx_kl, _ = policy_loss(lp, torch.tensor([[-0.7]]), torch.tensor([[-1.0]]),
                                               torch.tensor([[1]]), cliprange=0.2)
    loss.backward()
    close(loss, 1.0)
    close(lp.grad, [[1.0]])
    close(clipfrac, 0.0)
    close(approx_kl, 0.0)


# ---------------------------------------------------------------------------------------------
# value loss


def test_value_loss_hand_computed():
    # cliprange_value 0.2: v_clip = clamp(v, old - 0.2, old + 0.2)
    # row 0:
    #   k0: v 1.0, old 0.5 -> v_clip 0.7; R 2.0: (1-2)^2 = 1, (0.7-2)^2 = 1.69 -> 1.69 (clipped)
    #   k1: v 0.5, old 0.5 -> v_clip 0.5; R 0.0: 0.25, 0.25                     -> 0.25
    #   k2: v 2.0, old 2.5 -> v_clip 2.3; R 1.0: (2-1)^2 = 1, (2.3-1)^2 = 1.69 -> 1.69 (clipped)
    # row 1 (2 real):
    #   k0: v 0.0, old 1.0 -> v_clip 0.8; R 0.0: 0, 0.64                       -> 0.64 (clipped)
    #   k1: v 1.0, old 0.5 -> v_clip 0.7; R 0.6: (0.4)^2 = 0.16, (0.1)^2 = 0.01 -> 0.16
    #   k2: padding (v 9, R -9 would give 324) -> ignored
    # loss = 0.5 * (1.69 + 0.25 + 1.69 + 0.64 + 0.16) / 5 = 0.5 * 4.43 / 5 = 0.443
    # clipfrac = 3 / 5
    values = torch.tensor([[1.0, 0.5, 2.0], [0.0, 1.0, 9.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 2.5], [1.0, 0.5, 9.0]])
    returns = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.6, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, clipfrac = value_loss(values, old, returns, mask, cliprange_value=0.2)
    close(loss, 0.443)
    close(clipfrac, 0.6)
    loss.backward()
    # gradient: 0.5 * 2 * (v - R) / 5 where the unclipped error is the max, 0 where the clip is
    # active (v_clip is constant there):
    #   row 0: k0 0 ; k1 (0.5 - 0)/5 = 0.1 ; k2 0     row 1: k0 0 ; k1 (1.0 - 0.6)/5 = 0.08 ; pad 0
    close(values.grad, [[0.0, 0.1, 0.0], [0.0, 0.08, 0.0]])


# ---------------------------------------------------------------------------------------------
# EMA


def test_ema_update_in_place():
    # beta 0.992: 0.992 * 1 + 0.008 * 3    = 0.992 + 0.024 = 1.016
    #             0.992 * 2 + 0.008 * (-2) = 1.984 - 0.016 = 1.968
    # second tensor with beta 0.992: 0.992 * 0 + 0.008 * 10 = 0.08
    ema = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    params = [torch.nn.Parameter(torch.tensor([3.0, -2.0])),
              torch.nn.Parameter(torch.tensor([[10.0]]))]
    ptrs = [e.data_ptr() for e in ema]
    ema_update(ema, params)
    close(ema[0], [1.016, 1.968])
    close(ema[1], [[0.08]])
    assert [e.data_ptr() for e in ema] == ptrs
    assert not ema[0].requires_grad
    # beta 0.5: the midpoint; bf16 EMA tensor with fp32 params is cast
    e = torch.tensor([1.0, 3.0], dtype=torch.bfloat16)
    ema_update([e], [torch.tensor([3.0, 5.0])], beta=0.5)
    assert e.dtype == torch.bfloat16
    close(e.float(), [2.0, 4.0])


def test_ema_update_rejects_mismatched_lists():
    with pytest.raises(ValueError):
        ema_update([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)])
    with pytest.raises(ValueError):
        ema_update([torch.zeros(2)], [torch.zeros(3)])


# ---------------------------------------------------------------------------------------------
# containers


def test_rollout_shapes():
    B, P, A = 2, 3, 4
    r = Rollout(prompts=torch.zeros(B, P, dtype=torch.long),
                seq=torch.zeros(B, P + A, dtype=torch.long),
                attention_mask=torch.ones(B, P + A, dtype=torch.long),
                action_mask=torch.ones(B, A, dtype=torch.long),
                logprobs=torch.zeros(B, A), ref_logprobs=torch.zeros(B, A),
                values=torch.zeros(B, A), scores=torch.zeros(B))
    r.check_shapes()
    with pytest.raises(ValueError, match="values"):
        r._replace(values=torch.zeros(B, P + A)).check_shapes()
    with pytest.raises(ValueError, match="no answer tokens"):
        r._replace(seq=torch.zeros(B, P, dtype=torch.long)).check_shapes()
    assert "approx_kl" in PPOStats._fields and "critic_loss" in PPOStats._fields
    # the fields added for the critic-free estimators default to nan (not reported)
    stats = PPOStats(*([0.0] * 11))
    for name in ("kl_loss", "clipfrac_lower", "group_reward_std", "zero_std_groups"):
        assert math.isnan(getattr(stats, name))
