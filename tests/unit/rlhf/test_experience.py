"""Pooling and mini-batching of step-3 experience (rlhf/experience.py) and the advantage
estimator interface (rlhf/advantages.py), on hand-made tensors."""

from dataclasses import replace

import torch

from dschat_cli.config.estimators import ESTIMATORS as SPECS
from dschat_cli.config.ppo import PPOAlgoOptions
from dschat_cli.rlhf.advantages import ESTIMATORS, Advantages, estimate_advantages, gae
from dschat_cli.rlhf.experience import (minibatch_count, minibatch_slices, pool_rollouts,
                                        take_rows, trim_padding)
from dschat_cli.rlhf.ppo import (Rollout, gae_advantages_and_returns, kl_penalised_rewards,
                                 masked_whiten)

PAD = 0


def rollout(prompts, answers, answer_mask, base: float) -> Rollout:
    """A rollout whose prompt rows are left-padded (0 = pad) and answers right-padded; the
    per-token fields are base + column index, so moved columns are easy to spot."""
    prompts = torch.tensor(prompts)
    answers = torch.tensor(answers)
    am = torch.tensor(answer_mask)
    B, A = answers.shape
    per_token = base + torch.arange(A, dtype=torch.float32).expand(B, A).clone()
    return Rollout(prompts=prompts, seq=torch.cat([prompts, answers], 1),
                   attention_mask=torch.cat([(prompts != PAD).long(), am], 1), action_mask=am,
                   logprobs=per_token, ref_logprobs=per_token - 1, values=per_token * 10,
                   scores=torch.full((B,), base))


def test_pool_pads_prompts_left_and_answers_right():
    # rollout 1: prompts of width 2, answers of width 3; rollout 2: width 3 and 1
    r1 = rollout([[0, 5], [6, 7]], [[8, 9, 1], [8, 1, 0]], [[1, 1, 1], [1, 1, 0]], base=1.0)
    r2 = rollout([[5, 6, 7]], [[9]], [[1]], base=2.0)
    p = pool_rollouts([r1, r2], PAD)
    p.check_shapes()
    # P = 3, A = 3: r1's prompt gets one pad column in front, r2's answer two behind
    assert p.prompts.tolist() == [[0, 0, 5], [0, 6, 7], [5, 6, 7]]
    assert p.seq.tolist() == [[0, 0, 5, 8, 9, 1], [0, 6, 7, 8, 1, 0], [5, 6, 7, 9, 0, 0]]
    assert p.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0],
                                         [1, 1, 1, 1, 0, 0]]
    assert p.action_mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    # r1's per-token values stay in their answer columns; r2's one value, then zeros
    assert p.logprobs.tolist() == [[1, 2, 3], [1, 2, 3], [2, 0, 0]]
    assert p.values.tolist() == [[10, 20, 30], [10, 20, 30], [20, 0, 0]]
    assert p.scores.tolist() == [1.0, 1.0, 2.0]


def test_pool_of_one_is_the_rollout_itself():
    r = rollout([[5]], [[8, 1]], [[1, 1]], base=0.0)
    assert pool_rollouts([r], PAD) is r


def test_minibatches_in_order_last_one_shorter():
    assert [(s.start, s.stop) for s in minibatch_slices(8, 8)] == [(0, 8)]
    assert [(s.start, s.stop) for s in minibatch_slices(10, 4)] == [(0, 4), (4, 8), (8, 10)]
    assert minibatch_count(10, 4) == 3 and minibatch_count(8, 8) == 1


def test_trim_drops_columns_no_row_uses():
    r1 = rollout([[0, 5], [6, 7]], [[8, 9, 1], [8, 1, 0]], [[1, 1, 1], [1, 1, 0]], base=1.0)
    r2 = rollout([[5, 6, 7]], [[9]], [[1]], base=2.0)
    pooled = pool_rollouts([r1, r2], PAD)
    # the rows of r1 alone: the pooled first prompt column is padding in both, no answer column
    # is unused (row 0 fills all 3)
    mine = trim_padding(take_rows(pooled, slice(0, 2)))
    assert mine.prompts.tolist() == [[0, 5], [6, 7]]
    assert mine.seq.tolist() == r1.seq.tolist() and torch.equal(mine.logprobs, r1.logprobs)
    # r2's row alone: all 3 prompt columns used, answers cut to the one real column
    theirs = trim_padding(take_rows(pooled, slice(2, 3)))
    assert theirs.seq.tolist() == [[5, 6, 7, 9]] and theirs.action_mask.tolist() == [[1]]


def test_pooled_rows_give_a_causal_lm_the_same_logprobs():
    """The extra padding changes no real token's position and is never attended to: a model's
    answer logprobs of pooled rows equal those of the rows in their own rollout."""
    from transformers import OPTConfig, OPTForCausalLM

    from dschat_cli.models.reward import positions_from_mask
    from dschat_cli.rlhf.ppo import answer_logprobs

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=16,
                                     max_position_embeddings=32, pad_token_id=PAD)).eval()

    def lp(r):
        logits = model(input_ids=r.seq, attention_mask=r.attention_mask,
                       position_ids=positions_from_mask(r.attention_mask)).logits
        return answer_logprobs(logits, r.seq, r.prompts.shape[1])

    r1 = rollout([[0, 5], [6, 7]], [[8, 9, 1], [8, 1, 0]], [[1, 1, 1], [1, 1, 0]], base=1.0)
    r2 = rollout([[5, 6, 7]], [[9]], [[1]], base=2.0)
    pooled = pool_rollouts([r1, r2], PAD)
    with torch.no_grad():
        own = [lp(r1), lp(r2)]
        both = lp(pooled)
    mask = pooled.action_mask.bool()
    expected = torch.zeros_like(both)
    expected[:2, :3], expected[2:, :1] = own[0], own[1]
    assert torch.allclose(both[mask], expected[mask], atol=1e-5)


def test_gae_estimator_is_the_reference_arithmetic():
    r = rollout([[5], [6]], [[8, 9, 1], [8, 1, 0]], [[1, 1, 1], [1, 1, 0]], base=1.0)
    got = gae(r, kl_ctl=0.1, clip_reward_value=5.0, gamma=1.0, lam=0.95)
    rewards = kl_penalised_rewards(r.logprobs, r.ref_logprobs, r.scores, r.action_mask,
                                   kl_ctl=0.1, clip_reward_value=5.0)
    adv, ret = gae_advantages_and_returns(r.values, rewards, r.action_mask, gamma=1.0, lam=0.95)
    assert torch.equal(got.advantages, adv) and torch.equal(got.returns, ret)
    # by hand, row 1 (two real tokens, values 10 and 20, kl 1 per token, score 1):
    # rewards -0.1 and -0.1 + 1 = 0.9; delta_1 = 0.9 - 20 = -19.1; A_1 = -19.1
    # delta_0 = -0.1 + 20 - 10 = 9.9; A_0 = 9.9 + 0.95 * -19.1 = -8.245
    assert got.advantages[1].tolist() == [pytest_approx(-8.245), pytest_approx(-19.1), 0.0]
    white = gae(r, kl_ctl=0.1, clip_reward_value=5.0, gamma=1.0, lam=0.95, whiten=True)
    assert torch.allclose(white.advantages, masked_whiten(adv, r.action_mask))


def test_estimator_registry_selects_by_option():
    # the arithmetic has exactly the estimators the config offers
    assert ESTIMATORS.keys() == SPECS.keys()
    r = rollout([[5]], [[8, 1]], [[1, 1]], base=1.0)
    opts = replace(PPOAlgoOptions(), advantage_estimator="gae", kl_ctl=0.1)
    out = estimate_advantages(r, opts)
    assert isinstance(out, Advantages) and out.returns is not None
    assert opts.settings.needs_critic
    # same as calling gae with the options' values
    assert torch.equal(out.advantages, gae(r, kl_ctl=0.1, clip_reward_value=5.0, gamma=1.0,
                                           lam=0.95).advantages)
    # a critic-free estimator returns no critic targets
    free = estimate_advantages(r, replace(opts, advantage_estimator="reinforce++"))
    assert free.returns is None


def pytest_approx(x):
    import pytest

    return pytest.approx(x, abs=1e-5)


def test_missing_eos_penalty_and_kl_coefficient_override():
    from dschat_cli.rlhf.advantages import shaped_scores

    scores = torch.tensor([1.0, 2.0, -1.0])
    ended = torch.tensor([True, False, False])
    assert shaped_scores(scores, ended, missing_eos_penalty=0.0).tolist() == [1.0, 2.0, -1.0]
    assert shaped_scores(scores, ended, missing_eos_penalty=0.5).tolist() == [1.0, 1.5, -1.5]

    opts = replace(PPOAlgoOptions(), advantage_estimator="gae", kl_ctl=0.1)
    r = rollout([[5]], [[8, 1]], [[1, 1]], base=1.0)  # kl 1 per token
    # kl_coef 0.3 instead of 0.1: rewards -0.3 and -0.3 + 1 = 0.7; values 10, 20
    # A_1 = 0.7 - 20 = -19.3; A_0 = -0.3 + 20 - 10 + 0.95 * -19.3 = -8.635
    adv = estimate_advantages(r, opts, kl_coef=0.3).advantages
    assert adv[0].tolist() == [pytest_approx(-8.635), pytest_approx(-19.3)]
