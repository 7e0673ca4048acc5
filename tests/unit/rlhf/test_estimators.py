"""The critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++(-baseline)), the KL estimators,
loss aggregation and the clip variants of the policy loss, on hand-computed tensors.

The expected values are those of /work/shared/reference/rl-methods.md section 7 (computed in
float64); the arithmetic is written next to each."""

import math
from dataclasses import replace

import pytest
import torch

from dschat_cli.config.ppo import PPOAlgoOptions
from dschat_cli.rlhf.advantages import (estimate_advantages, group_mean_baseline, group_stats,
                                        group_view, grpo_advantages, reinforce_pp_advantages,
                                        returns_to_go, rloo_advantages)
from dschat_cli.rlhf.kl import kl_estimate
from dschat_cli.rlhf.ppo import (Rollout, aggregate_loss, kl_penalised_rewards, masked_mean,
                                 masked_var, policy_loss)


def close(actual, expected, tol=1e-5):
    actual = torch.as_tensor(actual, dtype=torch.float32)
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=tol, rtol=0), (actual, expected)


def experience(scores, action_mask, kl=None) -> Rollout:
    """A rollout with the given scores (B,) and answer mask (B, A); logprobs - ref_logprobs = kl
    (default 0); the ids are irrelevant to the estimators."""
    mask = torch.tensor(action_mask)
    B, A = mask.shape
    kl = torch.zeros(B, A) if kl is None else torch.tensor(kl, dtype=torch.float32)
    lp = torch.full((B, A), -1.0) + kl
    prompts = torch.ones(B, 1, dtype=torch.long)
    return Rollout(prompts=prompts, seq=torch.ones(B, 1 + A, dtype=torch.long),
                   attention_mask=torch.cat([torch.ones(B, 1, dtype=torch.long), mask], 1),
                   action_mask=mask, logprobs=lp, ref_logprobs=torch.full((B, A), -1.0),
                   values=torch.zeros(B, A), scores=torch.tensor(scores, dtype=torch.float32))


def options(estimator, **kw) -> PPOAlgoOptions:
    return replace(PPOAlgoOptions(), advantage_estimator=estimator, **kw)


ONE_TOKEN = torch.ones(4, 1)  # four answers of one real token each: A is one column
R1234 = torch.tensor([1.0, 2.0, 3.0, 4.0])

# ---------------------------------------------------------------------------------------------
# 1.-2. GRPO


@pytest.mark.parametrize("eps, big, small", [
    # mean 2.5, unbiased std sqrt(5/3) = 1.2909944487; A = (r - 2.5) / (1.2909944487 + eps)
    (1e-6, 1.1618941, 0.3872980),   # verl
    (1e-9, 1.1618950, 0.3872983),   # OpenRLHF
    (1e-4, 1.1618050, 0.3872683),   # TRL: 1.5 / 1.2910944 = 1.1618050, 0.5 / 1.2910944
])
def test_grpo_group_1234_with_each_frameworks_eps(eps, big, small):
    adv = grpo_advantages(R1234, ONE_TOKEN, 4, eps=eps)
    # 2e-7: the eps 1e-6 and 1e-9 answers differ by 9e-7, so the right eps is pinned
    close(adv[:, 0], [-big, -small, small, big], tol=2e-7)


def test_grpo_uses_the_unbiased_std():
    # the biased std sqrt(5/4) = 1.1180340 would give +-1.3416396 and +-0.4472132
    adv = grpo_advantages(R1234, ONE_TOKEN, 4)[:, 0]
    biased = torch.tensor([-1.3416396, -0.4472132, 0.4472132, 1.3416396])
    assert not torch.allclose(adv, biased, atol=1e-2)
    close(adv, [-1.1618941, -0.3872980, 0.3872980, 1.1618941])


def test_grpo_all_equal_group_is_zero_and_binary_group():
    adv = grpo_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0]), ONE_TOKEN, 4)
    assert torch.isfinite(adv).all() and torch.equal(adv, torch.zeros(4, 1))
    # equal scores whose float32 mean is not exactly the score (0.9 x 3): still exactly 0, not
    # the rounding error / eps (0.0555 here)
    assert torch.equal(grpo_advantages(torch.full((3,), 0.9), torch.ones(3, 1), 3),
                       torch.zeros(3, 1))
    # [1, 0, 0, 0]: mean 0.25, unbiased std sqrt(0.75 / 3) = 0.5
    # A = 0.75 / 0.500001 = 1.499997, -0.25 / 0.500001 = -0.499999
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), ONE_TOKEN, 4)
    close(adv[:, 0], [1.499997, -0.499999, -0.499999, -0.499999], tol=1e-6)


def test_group_advantages_fill_every_real_token_and_zero_the_padding():
    # group of 2, answers of 3 and 1 real tokens: mean 2, unbiased std sqrt(2) -> -+0.7071063
    # (eps 1e-6); dr-grpo -+1; rloo -+2 on every real token; padding 0
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    scores = torch.tensor([1.0, 3.0])
    a = 1 / (math.sqrt(2) + 1e-6)
    close(grpo_advantages(scores, mask, 2), [[-a, -a, -a], [a, 0, 0]])
    close(grpo_advantages(scores, mask, 2, scale_by_std=False), [[-1, -1, -1], [1, 0, 0]])
    close(rloo_advantages(scores, mask, 2), [[-2, -2, -2], [2, 0, 0]])
    for est in ("grpo", "dr-grpo", "rloo"):
        adv = estimate_advantages(experience([1.0, 3.0], mask.tolist()), options(est),
                                  group_size=2).advantages
        assert adv[0].unique().numel() == 1 and adv[0, 0] != 0  # one value per answer
        assert adv[1, 0] != 0 and torch.equal(adv[1, 1:], torch.zeros(2))


# ---------------------------------------------------------------------------------------------
# 3.-4. Dr. GRPO, REINFORCE++-baseline's group step, RLOO


def test_dr_grpo_and_group_mean_baseline():
    # [1, 2, 3, 4] - 2.5
    close(grpo_advantages(R1234, ONE_TOKEN, 4, scale_by_std=False)[:, 0], [-1.5, -0.5, 0.5, 1.5])
    close(group_mean_baseline(R1234, 4), [-1.5, -0.5, 0.5, 1.5])


def test_rloo():
    # baselines (10 - r) / 3 = [3, 8/3, 7/3, 2]; A = r - b = [-2, -2/3, 2/3, 2] = 4/3 (r - 2.5)
    adv = rloo_advantages(R1234, ONE_TOKEN, 4)[:, 0]
    close(adv, [-2.0, -2 / 3, 2 / 3, 2.0])
    close(R1234 - adv, [3.0, 8 / 3, 7 / 3, 2.0])
    close(adv, 4 / 3 * (R1234 - 2.5))
    # [1, 0, 0, 0]: baselines [0, 1/3, 1/3, 1/3]
    close(rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), ONE_TOKEN, 4)[:, 0],
          [1.0, -1 / 3, -1 / 3, -1 / 3])


def test_groups_are_contiguous_rows():
    # rows 0-1 answer prompt 0, rows 2-3 prompt 1: [1, 2 | 10, 20] -> means 1.5 and 15
    # (grouping rows 0, 2 and 1, 3 would give [-4.5, -9, 4.5, 9])
    scores = torch.tensor([1.0, 2.0, 10.0, 20.0])
    close(grpo_advantages(scores, ONE_TOKEN, 2, scale_by_std=False)[:, 0], [-0.5, 0.5, -5, 5])
    close(rloo_advantages(scores, ONE_TOKEN, 2)[:, 0], [-1.0, 1.0, -10.0, 10.0])
    assert group_view(scores, 2).tolist() == [[1.0, 2.0], [10.0, 20.0]]


def test_group_view_refuses_partial_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_view(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="samples-per-prompt"):
        grpo_advantages(R1234, ONE_TOKEN, 1)
    with pytest.raises(ValueError, match="samples-per-prompt"):
        estimate_advantages(experience([1.0, 2.0], [[1], [1]]), options("rloo"), group_size=1)


def test_group_stats():
    # group 1 [1, 2, 3, 4]: unbiased std 1.2909944; group 2 [5, 5, 5, 5]: 0 (all equal)
    # mean std 0.6454972, share of all-equal groups 1/2
    spread, zero = group_stats(torch.tensor([1.0, 2, 3, 4, 5, 5, 5, 5]), 4)
    assert spread == pytest.approx(0.6454972) and zero == 0.5
    assert all(math.isnan(x) for x in group_stats(R1234, 1))


# ---------------------------------------------------------------------------------------------
# 5. REINFORCE++

K1 = [[0.1, 0.2, 0.3], [0.05, -0.05, 0.0]]
MASK5 = [[1, 1, 1], [1, 1, 0]]
# beta 0.1, gamma 1, scores [1, 0]
# token rewards: [[-0.01, -0.02, -0.03 + 1], [-0.005, 0.005, 0]]
# returns:       [[0.94, 0.95, 0.97], [0.0, 0.005, 0]]
# mean over 5 tokens 0.573; variance 0.217076 (population), 0.271345 (unbiased)
OPENRLHF_5 = [[0.78769876, 0.80916194, 0.85208830], [-1.22984029, -1.21910870, 0.0]]
VERL_5 = [[0.70453917, 0.72373642, 0.76213093], [-1.10000258, -1.09040395, 0.0]]


def test_reinforce_pp_hand_computed():
    mask = torch.tensor(MASK5)
    lp = torch.tensor(K1)
    rewards = kl_penalised_rewards(lp, torch.zeros(2, 3), torch.tensor([1.0, 0.0]), mask,
                                   kl_ctl=0.1, clip_reward_value=5.0)
    close(rewards, [[-0.01, -0.02, 0.97], [-0.005, 0.005, 0.0]])
    close(returns_to_go(rewards, mask, 1.0), [[0.94, 0.95, 0.97], [0.0, 0.005, 0.0]])
    adv = reinforce_pp_advantages(rewards, mask, 1.0)
    close(adv, OPENRLHF_5)  # population variance, as OpenRLHF
    assert not torch.allclose(adv, torch.tensor(VERL_5), atol=1e-2)
    # the same through the registry (reinforce++ puts k1 in the reward by default)
    out = estimate_advantages(experience([1.0, 0.0], MASK5, kl=K1),
                              options("reinforce++", kl_ctl=0.1))
    close(out.advantages, OPENRLHF_5)
    assert out.returns is None


def test_returns_to_go_discounts_and_skips_holes():
    # gamma 0.5, row [1, hole, 2, 4]: G_3 = 4, G_2 = 2 + 0.5 * 4 = 4, G_0 = 1 + 0.5 * 4 = 3
    g = returns_to_go(torch.tensor([[1.0, 9.0, 2.0, 4.0]]), torch.tensor([[1, 0, 1, 1]]), 0.5)
    close(g, [[3.0, 0.0, 4.0, 4.0]])


def test_reinforce_pp_baseline_subtracts_the_group_mean_first():
    # two prompts, two one-token answers each, no KL; scores [1, 3 | 10, 12]
    # baseline: [-1, 1, -1, 1] -> already mean 0, variance 1 -> [-1, 1, -1, 1]
    # (plain reinforce++ whitens [1, 3, 10, 12]: mean 6.5, std sqrt(21.25) = 4.609772)
    exp = experience([1.0, 3.0, 10.0, 12.0], [[1]] * 4)
    adv = estimate_advantages(exp, options("reinforce++-baseline", clip_reward_value=20.0,
                                           kl_ctl=0.0), group_size=2).advantages
    close(adv[:, 0], [-1.0, 1.0, -1.0, 1.0])
    plain = estimate_advantages(exp, options("reinforce++", clip_reward_value=20.0,
                                             kl_ctl=0.0)).advantages
    close(plain[:, 0], (torch.tensor([1.0, 3.0, 10.0, 12.0]) - 6.5) / math.sqrt(21.25))


def test_scores_are_clipped_before_the_baseline():
    # clip 5: [10, 0] -> [5, 0] -> Dr. GRPO [2.5, -2.5] (not [5, -5]); REINFORCE++-baseline's
    # shaped score 2.5 is not clipped again
    exp = experience([10.0, 0.0], [[1], [1]])
    adv = estimate_advantages(exp, options("dr-grpo", clip_reward_value=5.0), group_size=2)
    close(adv.advantages[:, 0], [2.5, -2.5])
    # REINFORCE++-baseline, clip 1.5, groups of 3:
    #   [10, -10, -10] -> [1.5, -1.5, -1.5] -> minus the mean -0.5 -> [2, -1, -1]
    #   (2 > 1.5 is not clipped again: that would give [1.5, -1, -1])
    #   [0.3, 0, 0] -> minus the mean 0.1 -> [0.2, -0.1, -0.1]
    # whitened: mean 0, population variance (4 + 1 + 1 + 0.04 + 0.01 + 0.01) / 6 = 1.01
    exp = experience([10.0, -10.0, -10.0, 0.3, 0.0, 0.0], [[1]] * 6)
    out = estimate_advantages(exp, options("reinforce++-baseline", clip_reward_value=1.5,
                                           kl_ctl=0.0), group_size=3).advantages
    close(out[:, 0], torch.tensor([2.0, -1.0, -1.0, 0.2, -0.1, -0.1]) / math.sqrt(1.01))


def test_group_kl_in_the_reward_lowers_the_answer_with_more_kl():
    # equal scores 1; answer 0 has k1 [0.5, 0.5] (sum 1), answer 1 has 0
    # rloo (KL in the reward, k1), coef 0.1: scores [0.9, 1.0] -> A = [-0.1, 0.1]
    exp = experience([1.0, 1.0], [[1, 1], [1, 1]], kl=[[0.5, 0.5], [0.0, 0.0]])
    adv = estimate_advantages(exp, options("rloo", kl_ctl=0.1), group_size=2).advantages
    close(adv, [[-0.1, -0.1], [0.1, 0.1]])
    # grpo with the KL in the reward: [0.9, 1.0] -> mean 0.95, std 0.0707107 -> -+0.7071
    adv = estimate_advantages(exp, options("grpo", kl_ctl=0.1, kl_placement="reward",
                                           kl_estimator="k1"), group_size=2).advantages
    close(adv[:, 0], [-0.05 / (math.sqrt(0.005) + 1e-6), 0.05 / (math.sqrt(0.005) + 1e-6)])
    # the kl_coef argument (adaptive KL) overrides the options' coefficient: 0.3 -> [-0.3, 0.3]
    adv = estimate_advantages(exp, options("rloo", kl_ctl=0.1), kl_coef=0.3,
                              group_size=2).advantages
    close(adv[:, 0], [-0.3, 0.3])
    # GRPO's default puts the KL in the loss: none in the advantages -> equal scores -> 0
    adv = estimate_advantages(exp, options("grpo", kl_ctl=0.1), group_size=2).advantages
    assert torch.equal(adv, torch.zeros(2, 2))


def test_whiten_advantages_option_for_a_group_estimator():
    # rloo [-2, -2/3, 2/3, 2]: mean 0, population variance 20/9 -> / 1.490712
    exp = experience([1.0, 2.0, 3.0, 4.0], [[1]] * 4)
    adv = estimate_advantages(exp, options("rloo", kl_ctl=0.0, whiten_advantages=True),
                              group_size=4).advantages
    close(adv[:, 0], torch.tensor([-2.0, -2 / 3, 2 / 3, 2.0]) / math.sqrt(20 / 9))
    close(masked_var(adv, exp.action_mask), 1.0)


# ---------------------------------------------------------------------------------------------
# 6. KL estimators


def test_kl_estimators_hand_computed():
    # d = -1 - (-1.5) = 0.5:  k1 0.5, k2 0.125, k3 = e^-0.5 - 1 + 0.5 = 0.1065306597
    # d = -1.5 - (-1) = -0.5: k1 -0.5, k2 0.125, k3 = e^0.5 - 1 - 0.5 = 0.1487212707
    lp = torch.tensor([[-1.0, -1.5, -0.7]])
    ref = torch.tensor([[-1.5, -1.0, -0.7]])  # last: lp = ref -> 0 for all three
    close(kl_estimate(lp, ref, "k1"), [[0.5, -0.5, 0.0]], tol=1e-7)
    close(kl_estimate(lp, ref, "k2"), [[0.125, 0.125, 0.0]], tol=1e-7)
    close(kl_estimate(lp, ref, "k3"), [[0.1065306597, 0.1487212707, 0.0]], tol=1e-7)
    g = torch.Generator().manual_seed(0)
    d = torch.randn(64, generator=g) * 3
    assert (kl_estimate(d, torch.zeros(64), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(lp, ref, "k4")


def test_k3_is_clamped_like_verl():
    # d = -100 -> clamped to -20: e^20 - 21 = 4.85e8 -> capped at 10 (unclamped, e^100 is inf in
    # float32 and its gradient 0 * inf = nan); d = -5: e^5 - 6 = 142 -> 10
    # d = 30 -> clamped to 20: e^-20 + 19 = 19 -> 10; d = 2: e^-2 + 1 = 1.135335 (under the cap)
    lp = torch.tensor([-100.0, -5.0, 30.0, 2.0], requires_grad=True)
    k3 = kl_estimate(lp, torch.zeros(4), "k3")
    close(k3, [10.0, 10.0, 10.0, math.exp(-2) + 1])
    k3.sum().backward()
    assert torch.isfinite(lp.grad).all()


def test_kl_estimate_mask_zeroes_garbage_without_nan_gradients():
    lp = torch.tensor([[0.5, float("inf")]], requires_grad=True)
    mask = torch.tensor([[1, 0]])
    for kind in ("k1", "k2", "k3"):
        out = kl_estimate(lp, torch.zeros(1, 2), kind, mask)
        assert out[0, 1] == 0
        (g,) = torch.autograd.grad(out.sum(), lp)
        assert torch.isfinite(g).all() and g[0, 1] == 0


def test_kl_penalised_rewards_with_another_estimator():
    # k3 per token: d = 0.5 -> 0.1065306597; coef 0.1 -> -0.0106531; score 1 on the last token
    lp = torch.tensor([[-1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.5]])
    r = kl_penalised_rewards(lp, ref, torch.tensor([1.0]), torch.tensor([[1, 1]]), kl_ctl=0.1,
                             clip_reward_value=5.0, kl_estimator="k3")
    close(r, [[-0.01065306597, 1 - 0.01065306597]], tol=1e-7)
    # k1 (the default): -0.05 per token
    close(kl_penalised_rewards(lp, ref, torch.tensor([1.0]), torch.tensor([[1, 1]]), kl_ctl=0.1,
                               clip_reward_value=5.0), [[-0.05, 0.95]])


# ---------------------------------------------------------------------------------------------
# 9. the clip variants of the policy loss


def one_token_loss(ratio, adv, **kw):
    lp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    out = policy_loss(lp, torch.zeros(1, 1), torch.tensor([[adv]]), torch.tensor([[1]]),
                      cliprange=0.2, **kw)
    (grad,) = torch.autograd.grad(out.loss, lp)
    return out, float(grad)


def test_ppo_clip_cases():
    # ratio 1.5, A +1: max(-1.5, -1.2) = -1.2, clipped (no gradient)
    out, grad = one_token_loss(1.5, 1.0)
    close(out.loss, -1.2)
    close(out.clipfrac, 1.0)
    assert grad == 0
    # ratio 0.5, A -1: max(0.5, 0.8) = 0.8, clipped
    out, _ = one_token_loss(0.5, -1.0)
    close(out.loss, 0.8)
    close(out.clipfrac, 1.0)
    # ratio 1.1, A +1: -1.1, not clipped
    out, _ = one_token_loss(1.1, 1.0)
    close(out.loss, -1.1)
    close(out.clipfrac, 0.0)


def test_dual_clip_caps_a_negative_advantage():
    # ratio 5, A -1: max(5, 1.2) = 5 (the ratio clip is not active: 1.2 < 5)
    out, grad = one_token_loss(5.0, -1.0)
    close(out.loss, 5.0)
    close(out.clipfrac, 0.0)
    close(out.clipfrac_lower, 0.0)
    assert grad == pytest.approx(5.0)
    # dual clip 3: min(5, 3 * 1) = 3, counted in clipfrac_lower, not in clipfrac; no gradient
    out, grad = one_token_loss(5.0, -1.0, dual_clip=3.0)
    close(out.loss, 3.0)
    close(out.clipfrac, 0.0)
    close(out.clipfrac_lower, 1.0)
    assert grad == 0
    # a positive advantage is never dual-clipped: ratio 5, A +1 -> -1.2 (ratio clip)
    out, _ = one_token_loss(5.0, 1.0, dual_clip=3.0)
    close(out.loss, -1.2)
    close(out.clipfrac_lower, 0.0)
    # under the cap nothing changes: ratio 1.1, A -1 -> 1.1
    out, _ = one_token_loss(1.1, -1.0, dual_clip=3.0)
    close(out.loss, 1.1)
    close(out.clipfrac_lower, 0.0)


def test_clip_higher():
    # ratio 1.25, A +1: cliprange 0.2 -> clipped at 1.2, loss -1.2
    out, grad = one_token_loss(1.25, 1.0)
    close(out.loss, -1.2)
    close(out.clipfrac, 1.0)
    assert grad == 0
    # cliprange_high 0.28 -> upper clip 1.28 > 1.25: not clipped, loss -1.25, gradient -1.25
    out, grad = one_token_loss(1.25, 1.0, cliprange_high=0.28)
    close(out.loss, -1.25)
    close(out.clipfrac, 0.0)
    assert grad == pytest.approx(-1.25)
    # the lower clip stays at 1 - cliprange: ratio 0.5, A -1 -> 0.8
    out, _ = one_token_loss(0.5, -1.0, cliprange_high=0.28)
    close(out.loss, 0.8)


# ---------------------------------------------------------------------------------------------
# 10. loss aggregation

L = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
LM = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_loss_aggregation_hand_computed():
    # token-mean: (1 + 2 + 3 + 4) / 4 = 2.5
    close(aggregate_loss(L, LM, "token-mean"), 2.5)
    # seq-mean-token-mean: (6 / 3 + 4 / 1) / 2 = 3.0
    close(aggregate_loss(L, LM, "seq-mean-token-mean"), 3.0)
    # seq-mean-token-sum-norm: 10 / (2 rows * 3) = 1.6666667
    close(aggregate_loss(L, LM, "seq-mean-token-sum-norm", max_len=3), 10 / 6)
    # a constant max_len, not the batch's padded width: 10 / (2 * 5) = 1
    close(aggregate_loss(L, LM, "seq-mean-token-sum-norm", max_len=5), 1.0)
    with pytest.raises(ValueError, match="max_len"):
        aggregate_loss(L, LM, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(L, LM, "bogus")


def test_loss_aggregation_empty_rows_and_garbage():
    garbage = L.clone()
    garbage[1, 1:] = float("inf")
    # a row with no real token is left out of seq-mean-token-mean: (6 / 3) / 1 = 2
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    close(aggregate_loss(garbage, mask, "seq-mean-token-mean"), 2.0)
    # all masked: 0, not nan
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        close(aggregate_loss(garbage, torch.zeros_like(mask), mode, max_len=3), 0.0)
        close(aggregate_loss(garbage, LM, mode, max_len=3),
              {"token-mean": 2.5, "seq-mean-token-mean": 3.0,
               "seq-mean-token-sum-norm": 10 / 6}[mode])


def test_policy_loss_aggregation_weighs_answers():
    # ratio 1 everywhere: per-token loss = -A; A = [[1, 1, 1], [-2, pad, pad]]
    # token-mean: (-3 + 2) / 4 = -0.25; seq-mean-token-mean: (-1 + 2) / 2 = 0.5
    # seq-mean-token-sum-norm, max_len 4: (-3 + 2) / 8 = -0.125
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, 7.0, 7.0]])
    lp = torch.zeros(2, 3)
    for mode, want in (("token-mean", -0.25), ("seq-mean-token-mean", 0.5),
                       ("seq-mean-token-sum-norm", -0.125)):
        out = policy_loss(lp, lp, adv, LM, cliprange=0.2, aggregation=mode, max_len=4)
        close(out.loss, want)
        close(out.clipfrac, 0.0)
    # the default is token-mean, the reference's masked mean
    close(policy_loss(lp, lp, adv, LM, cliprange=0.2).loss, masked_mean(-adv, LM))
