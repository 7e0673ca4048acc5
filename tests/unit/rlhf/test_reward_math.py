"""Reward-model math on hand-computed tensors."""

import math

import torch

from dschat_cli.rlhf.reward import (last_real_index, pairwise_divergence_loss,
                                    pairwise_last_token_loss, sequence_scores)


def nls(x: float) -> float:  # -log(sigmoid(x))
    return math.log1p(math.exp(-x))


def test_last_real_index_right_padded_opt_style_bos_equals_pad():
    # OPT: BOS id 2 == pad id 2 at the start of every row. Right padding after the real tokens.
    # row 0: [2, 5, 6, 7, 2, 2] real = first 4 -> last index 3
    # row 1: [2, 5, 2, 2, 2, 2] real = first 2 -> last index 1
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    assert last_real_index(mask).tolist() == [3, 1]
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4, 9.0, 9.0], [0.5, 0.6, 9.0, 9.0, 9.0, 9.0]])
    assert sequence_scores(values, mask).tolist() == [0.4000000059604645, 0.6000000238418579]


def test_last_real_index_left_padded():
    # left padding: real tokens at the end -> last index is T-1 for every non-empty row
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_real_index(mask).tolist() == [3, 3, 3]
    values = torch.arange(12.0).view(3, 4)
    assert sequence_scores(values, mask).tolist() == [3.0, 7.0, 11.0]


def test_divergence_loss_hand_computed():
    # pair 0: chosen  [1 2 3 4 _]  len 4; rejected [1 2 7 _ _] len 3
    #   first difference at t=2 (3 vs 7); end = max(4, 3) = 4 -> t in {2, 3}
    #   deltas: t2: 1.0-0.0 = 1.0 ; t3: 2.0-(-1.0) = 3.0 (rejected value at its pad position counts,
    #   as in the reference)
    # pair 1: identical sequences [5 6 _ _ _] len 2 -> only the last token t=1: delta 0.5-0.5 = 0
    chosen_ids = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 0, 0, 0]])
    rejected_ids = torch.tensor([[1, 2, 7, 0, 0], [5, 6, 0, 0, 0]])
    chosen_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    rejected_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    chosen_values = torch.tensor([[9.0, 9.0, 1.0, 2.0, 9.0], [0.0, 0.5, 0.0, 0.0, 0.0]])
    rejected_values = torch.tensor([[-9.0, -9.0, 0.0, -1.0, 9.0], [0.0, 0.5, 0.0, 0.0, 0.0]])
    loss = pairwise_divergence_loss(chosen_values, rejected_values, chosen_ids, rejected_ids,
                                    chosen_mask, rejected_mask)
    pair0 = (nls(1.0) + nls(3.0)) / 2
    pair1 = nls(0.0)  # log 2
    assert abs(loss.item() - (pair0 + pair1) / 2) < 1e-6


def test_divergence_when_one_answer_extends_the_other_and_pad_equals_token():
    # chosen [4 4 1] (1 = eos = pad id!), rejected [4 4] then padding with id 1.
    # Ids are equal at t=2 (both 1) but only chosen has a real token there: they differ at t=2.
    chosen_ids = torch.tensor([[4, 4, 1]])
    rejected_ids = torch.tensor([[4, 4, 1]])
    chosen_mask = torch.tensor([[1, 1, 1]])
    rejected_mask = torch.tensor([[1, 1, 0]])
    cv = torch.tensor([[0.0, 0.0, 2.0]])
    rv = torch.tensor([[0.0, 0.0, 0.0]])
    loss = pairwise_divergence_loss(cv, rv, chosen_ids, rejected_ids, chosen_mask, rejected_mask)
    assert abs(loss.item() - nls(2.0)) < 1e-6


def test_last_token_loss():
    # mean(-logsigmoid([2-1, 0-1])) = (nls(1) + nls(-1)) / 2
    loss = pairwise_last_token_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert abs(loss.item() - (nls(1.0) + nls(-1.0)) / 2) < 1e-6


def test_loss_gradient_pushes_chosen_up():
    cv = torch.zeros(1, 3, requires_grad=True)
    rv = torch.zeros(1, 3, requires_grad=True)
    ids_c, ids_r = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 5, 6]])
    m = torch.ones(1, 3, dtype=torch.long)
    pairwise_divergence_loss(cv, rv, ids_c, ids_r, m, m).backward()
    assert (cv.grad[0, 1:] < 0).all() and (rv.grad[0, 1:] > 0).all() and cv.grad[0, 0] == 0
