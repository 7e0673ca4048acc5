"""Reward-model math, as pure torch functions.

Mask convention everywhere in dschat: attention_mask is 1 (True) on real tokens, 0 on padding.
Pad ids are never compared with tokens (OPT's BOS equals its pad id; Llama models often pad with
eos), so positions come from masks only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for right- or left-padded rows.

    attention_mask: (B, T) of 0/1 -> (B,) long. A row without real tokens gives 0.
    """
    T = attention_mask.shape[-1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.zeros_like(positions)).amax(-1)


def sequence_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The score of a sequence is the value at its last real token. values: (B, T) -> (B,)."""
    idx = last_real_index(attention_mask)
    return values.gather(-1, idx.unsqueeze(-1)).squeeze(-1)


def pairwise_divergence_loss(chosen_values: torch.Tensor, rejected_values: torch.Tensor,
                             chosen_ids: torch.Tensor, rejected_ids: torch.Tensor,
                             chosen_mask: torch.Tensor, rejected_mask: torch.Tensor) -> torch.Tensor:
    """DeepSpeed-Chat's pairwise loss, without its pad-id heuristics.

    All inputs (B, T), right-padded to the same T. For each pair, the loss is
    mean over t in [d, e) of -logsigmoid(chosen_values[t] - rejected_values[t]), where d is the
    first position at which the two sequences differ (in token or in being real) and e the later of
    their two ends. Identical sequences use only their last token (d = e - 1). Returns the mean over
    pairs (a scalar).
    """
    chosen_len = chosen_mask.sum(-1)
    rejected_len = rejected_mask.sum(-1)
    differs = (chosen_ids != rejected_ids) | (chosen_mask != rejected_mask)
    differs = differs & (chosen_mask.bool() | rejected_mask.bool())
    losses = []
    for i in range(chosen_values.shape[0]):
        diverge = differs[i].nonzero()
        if len(diverge) == 0:
            end = int(chosen_len[i])
            start = end - 1
        else:
            end = int(torch.maximum(chosen_len[i], rejected_len[i]))
            start = int(diverge[0])
        delta = chosen_values[i, start:end] - rejected_values[i, start:end]
        losses.append(-F.logsigmoid(delta.float()).mean())
    return torch.stack(losses).mean()


def pairwise_last_token_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss on the sequence scores only: mean of -logsigmoid(s_chosen - s_rejected)."""
    return -F.logsigmoid((chosen_scores - rejected_scores).float()).mean()
