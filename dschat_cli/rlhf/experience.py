"""Pooling and mini-batching of step-3 experience, as pure torch functions.

    experience = pool_rollouts(buffer, pad_token_id)      # --generation-batches rollouts -> one
    for rows in minibatch_slices(len(experience.scores), per_device_training_batch_size):
        mini = take_rows(experience, rows)

DeepSpeed-Chat collects the experience of --generation-batches rollouts first and only then cuts
it into mini-batches of --per-device-training-batch-size rows, so a mini-batch may hold rows of
several rollouts. Rollouts differ in their padded widths (each prompt batch is left-padded to its
longest prompt, each answer batch right-padded to its longest answer), so pooling pads them to a
common (P, A): prompts further on the left, answers further on the right. Position ids come from
the attention mask (models/reward.positions_from_mask), so the extra padding changes no real
token's position and masked positions are never read: the pooled rows compute the same numbers
as the rollouts they came from.

The Rollout record and the mask convention (1 = real token) are documented in rlhf/ppo.py.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from dschat_cli.rlhf.ppo import Rollout


def pool_rollouts(rollouts: Sequence[Rollout], pad_token_id: int) -> Rollout:
    """Concatenate rollouts row-wise into one Rollout of sum(B_i) rows.

    Rollout i has prompts (B_i, P_i) and answers (B_i, A_i); the result has P = max P_i and
    A = max A_i: prompt columns are added on the left (pad id, mask 0), answer columns on the
    right (pad id, mask 0, logprobs / values 0). One rollout is returned as it is.
    """
    if not rollouts:
        raise ValueError("pool_rollouts needs at least one rollout")
    if len(rollouts) == 1:
        return rollouts[0]
    P = max(r.prompts.shape[1] for r in rollouts)
    A = max(r.seq.shape[1] - r.prompts.shape[1] for r in rollouts)
    parts = [_pad_to(r, P, A, pad_token_id) for r in rollouts]
    return Rollout(*(None if any(f is None for f in fields) else torch.cat(fields, dim=0)
                     for fields in zip(*parts)))


def _pad_to(r: Rollout, P: int, A: int, pad_token_id: int) -> Rollout:
    p = r.prompts.shape[1]
    a = r.seq.shape[1] - p
    left, right = P - p, A - a
    if left == 0 and right == 0:
        return r

    def ids(x):  # (B, p + a) -> (B, P + A): pad id on both sides
        return F.pad(x, (left, right), value=pad_token_id)

    def mask(x):  # 0 on the added columns
        return F.pad(x, (left, right), value=0)

    def answer(x):  # (B, a) -> (B, A)
        return F.pad(x, (0, right), value=0)

    return Rollout(prompts=F.pad(r.prompts, (left, 0), value=pad_token_id),
                   seq=ids(r.seq), attention_mask=mask(r.attention_mask),
                   action_mask=answer(r.action_mask), logprobs=answer(r.logprobs),
                   ref_logprobs=answer(r.ref_logprobs), values=answer(r.values),
                   scores=r.scores, true_scores=r.true_scores)


def minibatch_slices(n_rows: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of `batch_size` rows over n_rows (the last one shorter if it must),
    in order, as DeepSpeed-Chat's MiniDataset cuts its experience."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n_rows, batch_size):
        yield slice(start, min(start + batch_size, n_rows))


def take_rows(x, rows: slice):
    """The rows of a Rollout (or of any NamedTuple of tensors with the batch first; None fields
    stay None)."""
    return type(x)(*(None if t is None else t[rows] for t in x))


def minibatch_count(n_rows: int, batch_size: int) -> int:
    """How many slices minibatch_slices(n_rows, batch_size) yields."""
    return -(-n_rows // batch_size)


def trim_padding(r: Rollout) -> Rollout:
    """Drop the columns that no row of `r` uses: prompt columns on the left where every row is
    padding, answer columns on the right after every row's last real token (one answer column
    is always kept). A mini-batch of pooled rows then costs what its own rows need."""
    P = r.prompts.shape[1]
    used = r.attention_mask.bool().any(0)  # (P + A,)
    prompt_used = used[:P].nonzero()
    left = int(prompt_used[0]) if len(prompt_used) else P - 1
    answer_used = r.action_mask.bool().any(0).nonzero()
    A = max(int(answer_used[-1]) + 1 if len(answer_used) else 1, 1)
    if left == 0 and A == r.seq.shape[1] - P:
        return r
    return Rollout(prompts=r.prompts[:, left:], seq=r.seq[:, left:P + A],
                   attention_mask=r.attention_mask[:, left:P + A],
                   action_mask=r.action_mask[:, :A], logprobs=r.logprobs[:, :A],
                   ref_logprobs=r.ref_logprobs[:, :A], values=r.values[:, :A], scores=r.scores,
                   true_scores=r.true_scores)
