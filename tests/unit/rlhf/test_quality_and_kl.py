"""Answer-quality figures (rlhf/quality.py) and the KL controllers (rlhf/kl.py), by hand."""

import math

import pytest
import torch

from dschat_cli.rlhf.kl import AdaptiveKL, FixedKL, kl_controller
from dschat_cli.rlhf.quality import distinct_ngrams, ended_with_eos, repeated_ngram_fraction

EOS = 1


def batch(rows, width=8):
    """Right-padded answers (pad 0) and their action mask."""
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def test_repeated_ngram_fraction():
    ids, mask = batch([[5, 6, 5, 6, 5, 6],      # bigrams 56 65 56 65 56: 3 of 5 seen before
                       [9, 9, 9, 9, 9],         # trigrams 999 x3: 2 of 3 repeat (n=3 below)
                       [2, 3, 4, 5, 6, 7, 8],   # nothing repeats
                       [4],                     # too short to repeat
                       []])                     # dropped answer
    assert repeated_ngram_fraction(ids, mask, n=2).tolist() == pytest.approx(
        [0.6, 0.75, 0.0, 0.0, 0.0])             # row 2: bigrams 99 x4, 3 repeats
    assert repeated_ngram_fraction(ids, mask, n=3).tolist() == pytest.approx(
        [0.5, 2 / 3, 0.0, 0.0, 0.0])            # row 1: 565 656 565 656: 2 of 4


def test_padding_is_never_counted():
    ids, mask = batch([[2, 3]])
    ids[0, 2:] = 7  # garbage after the answer: masked out
    assert repeated_ngram_fraction(ids, mask, n=1).tolist() == [0.0]


def test_distinct_ngrams():
    same, mask = batch([[1, 2, 3], [1, 2, 3]])
    # bigrams 12 23 12 23: 2 unique of 4 = 1 / B for B identical answers
    assert distinct_ngrams(same, mask, n=2) == pytest.approx(0.5)
    diff, mask = batch([[1, 2, 3], [4, 5, 6]])
    assert distinct_ngrams(diff, mask, n=2) == pytest.approx(1.0)
    short, mask = batch([[1], []])
    assert math.isnan(distinct_ngrams(short, mask, n=2))


def test_ended_with_eos():
    ids, mask = batch([[5, 6, EOS], [5, 6, 7, 8, 9, 10, 11, 12], [], [EOS]])
    assert ended_with_eos(ids, mask, EOS).tolist() == [True, False, False, True]


def test_fixed_kl_ignores_the_measured_kl():
    kl = kl_controller(0.1, target=None)
    assert isinstance(kl, FixedKL)
    kl.update(50.0, 64)
    assert kl.value == 0.1


def test_adaptive_kl_steers_towards_the_target():
    kl = kl_controller(0.1, target=6.0, horizon=10000)
    assert isinstance(kl, AdaptiveKL)
    # KL 12 (2x target): error clipped to +0.2; x (1 + 0.2 * 64 / 10000) = x 1.00128
    kl.update(12.0, 64)
    assert kl.value == pytest.approx(0.100128)
    # KL 6.6: error +0.1 -> x 1.00064
    kl.update(6.6, 64)
    assert kl.value == pytest.approx(0.100128 * 1.00064)
    # KL 3 (half the target): error -0.5 clipped to -0.2 -> x 0.99872
    before = kl.value
    kl.update(3.0, 64)
    assert kl.value == pytest.approx(before * 0.99872)
    kl.update(float("nan"), 64)  # nothing measured: unchanged
    assert kl.value == pytest.approx(before * 0.99872)
    restored = kl_controller(0.1, target=6.0, horizon=10000)
    restored.load_state_dict(kl.state_dict())
    assert restored.value == kl.value
