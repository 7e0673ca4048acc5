"""Sampling functions of the fast engine on hand-made logits."""

from __future__ import annotations

import math

import torch

from dschat_cli.generation.sampling import sample_next, top_k_filter, top_p_filter

NEG = float("-inf")


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    assert torch.equal(top_k_filter(logits, 2), torch.tensor([[NEG, 4.0, NEG, 3.0]]))
    assert torch.equal(top_k_filter(logits, 0), logits)  # 0: no limit


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probs 0.5, 0.25, 0.125, 0.125 (logits = log probs)
    logits = torch.log(torch.tensor([[0.125, 0.5, 0.125, 0.25]]))
    # p = 0.7: 0.5 (mass before 0) is kept, 0.25 (before: 0.5 < 0.7) kept, the 0.125s (before:
    # 0.75 >= 0.7) dropped
    out = top_p_filter(logits, 0.7)
    assert torch.isinf(out[0, [0, 2]]).all() and torch.isfinite(out[0, [1, 3]]).all()
    # p tiny: still the most likely token
    out = top_p_filter(logits, 1e-6)
    assert torch.isfinite(out).sum() == 1 and torch.isfinite(out[0, 1])


def test_exponential_race_samples_the_categorical_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(20000, 3)
    noise = torch.empty(20000, 3).exponential_()
    tokens, logprobs = sample_next(logits, noise, do_sample=True, temperature=1.0, top_k=0,
                                   top_p=1.0)
    freq = torch.bincount(tokens, minlength=3).float() / 20000
    assert torch.allclose(freq, probs, atol=0.015), freq
    # logprob is the policy's own: log p(token)
    assert torch.allclose(logprobs, probs.log()[tokens], atol=1e-6)


def test_logprob_ignores_temperature_and_greedy_and_banned_token():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    tok, lp = sample_next(logits, None, do_sample=False, temperature=0.5, top_k=0, top_p=1.0)
    z = math.log(math.exp(2) + math.exp(1) + 1)
    assert tok.item() == 0 and abs(lp.item() - (2 - z)) < 1e-6
    tok, lp = sample_next(logits, None, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
                          banned=0)
    assert tok.item() == 1 and abs(lp.item() - (1 - z)) < 1e-6  # still the raw distribution
