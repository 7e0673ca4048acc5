"""DPO math (`dschat dpo`), as pure torch functions.

    masks = answer_masks(ids[:B], ids[B:], attention_mask[:B], attention_mask[B:])
    pi = summed_logprobs(logits, ids, torch.cat(masks))          # (2B,) and token counts
    out = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1)            # loss, per-pair rewards

Which tokens count (DeepSpeed-Chat's rule, step2_dpo_finetuning/main.py): a token of a pair counts
from the first position where the chosen and the rejected sequence differ, up to its row's end.
The prompt is masked by the common prefix of the pair, not by a prompt length, so the rule holds
for any prompt format or chat template (a prompt length in tokens is not even defined when the
prompt and the answer are tokenised as one string). The shared start of the two answers is masked
too: it has the same log-probability in both rows and cancels in the loss, but not in the
reported rewards. Identical rows count every real token (their logits are equal: z = 0).

Padding is taken from the attention mask only (1 = real token, the project's one convention),
never by comparing ids with pad_token_id: DeepSpeed-Chat's `input_ids != pad` also dropped every
eos when the tokenizer pads with eos (OPT's bos = eos = pad), so the end of an answer was never
trained on.

Log-probabilities are summed over the counted tokens, as in the reference (and TRL, OpenRLHF): the
loss is length-sensitive by design.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from dschat_cli.rlhf.logprobs import token_logprobs

LOSS_TYPES = ("sigmoid", "ipo")


class DPOLoss(NamedTuple):
    loss: torch.Tensor  # () mean over the pairs
    losses: torch.Tensor  # (B,) per pair
    chosen_rewards: torch.Tensor  # (B,) beta * (pi_c - ref_c), detached
    rejected_rewards: torch.Tensor  # (B,) beta * (pi_r - ref_r), detached


def divergence_index(chosen_ids: torch.Tensor, rejected_ids: torch.Tensor,
                     chosen_mask: torch.Tensor, rejected_mask: torch.Tensor) -> torch.Tensor:
    """First position where the two rows of each pair differ, in token or in being real.

    All (B, T), right-padded to one T. -> (B,) long; 0 when the rows are identical (then nothing
    is cut, as in the reference). A row that ends where the other goes on differs at its end."""
    real = chosen_mask.bool() | rejected_mask.bool()
    differs = ((chosen_ids != rejected_ids) | (chosen_mask.bool() != rejected_mask.bool())) & real
    T = differs.shape[-1]
    positions = torch.arange(T, device=differs.device).expand_as(differs)
    first = torch.where(differs, positions, torch.full_like(positions, T)).amin(-1)
    return torch.where(first == T, torch.zeros_like(first), first)


def answer_masks(chosen_ids: torch.Tensor, rejected_ids: torch.Tensor,
                 chosen_mask: torch.Tensor, rejected_mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) (B, T) bool: the tokens whose log-probability counts, i.e. real tokens
    at or after the pair's divergence index. Example (pad 0): chosen [5,6,7,8,0] with mask
    [1,1,1,1,0] and rejected [5,6,9,0,0] with mask [1,1,1,0,0] diverge at 2 and give
    [0,0,1,1,0] and [0,0,1,0,0]."""
    start = divergence_index(chosen_ids, rejected_ids, chosen_mask, rejected_mask).unsqueeze(-1)
    positions = torch.arange(chosen_ids.shape[-1], device=chosen_ids.device).unsqueeze(0)
    after = positions >= start
    return chosen_mask.bool() & after, rejected_mask.bool() & after


def summed_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, label_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token_t | tokens_<t) over the tokens t that label_mask marks.

    logits (N, T, V) of a causal LM over input_ids (N, T); label_mask (N, T) bool over token
    positions (answer_masks). The first token has no prediction and never counts.
    -> (sums (N,) float32, counted tokens (N,) long).
    Token t is scored by the logits at position t - 1: labels input_ids[:, 1:] against logits
    positions 0 .. T - 2, the last one unread (given whole rather than as logits[:, :-1], whose
    backward would make a zero-filled copy of the logits, see rlhf/logprobs.py)."""
    mask = label_mask[:, 1:]
    logps = token_logprobs(logits, input_ids[:, 1:])  # (N, T-1) float32
    return (logps * mask).sum(-1), mask.sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, beta: float,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> DPOLoss:
    """DPO on summed log-probabilities, all (B,).

    h = (pi_c - ref_c) - (pi_r - ref_r)
    sigmoid (DeepSpeed-Chat's, conservative DPO with label_smoothing ls):
        loss = -(1 - ls) * logsigmoid(beta h) - ls * logsigmoid(-beta h)
    ipo (Azar et al., as OpenRLHF on summed log-probabilities): loss = (h - 1 / (2 beta))^2
    rewards: chosen beta (pi_c - ref_c), rejected beta (pi_r - ref_r) (the implicit rewards)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    def up(x: torch.Tensor) -> torch.Tensor:  # at least float32 (bf16/fp16 sums lose nats)
        return x.to(torch.promote_types(x.dtype, torch.float32))

    chosen_logratio = up(policy_chosen) - up(ref_chosen)
    rejected_logratio = up(policy_rejected) - up(ref_rejected)
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = (-(1.0 - label_smoothing) * F.logsigmoid(beta * h)
                  - label_smoothing * F.logsigmoid(-beta * h))
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {loss_type!r}: one of {', '.join(LOSS_TYPES)}")
    return DPOLoss(losses.mean(), losses, (beta * chosen_logratio).detach(),
                   (beta * rejected_logratio).detach())


def pair_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """(B,) float: 1 where the chosen reward is higher, 0 where lower, 1/2 on a tie. A tie counts
    one half so that an untrained policy (= the reference: every reward exactly 0) scores chance,
    0.5, not 0."""
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards)
