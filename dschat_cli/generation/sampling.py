"""Token sampling as pure tensor functions, safe inside a CUDA graph (no host sync, no data-
dependent shapes). Used by the fast rollout engine; tested on hand-made logits.

The random draw comes from outside as `noise`, a (B, V) tensor of Exp(1) samples: the token
argmax_v probs[v] / noise[v] is distributed exactly as Categorical(probs) (the exponential race),
so the graph itself holds no RNG state.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, -inf elsewhere. logits: (B, V) float."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1) the k-th largest
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p
    (always at least the most likely one), -inf elsewhere. logits: (B, V) float."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # mass of the tokens ranked before each one; a token is dropped once that mass reaches p
    before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def sample_next(logits: torch.Tensor, noise: torch.Tensor | None, *, do_sample: bool,
                temperature: float, top_k: int, top_p: float,
                banned: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token of each row and its log-probability under the policy.

    logits: (B, V) raw logits (any float dtype); noise: (B, V) Exp(1) draws (ignored when greedy).
    Returns tokens (B,) long and logprobs (B,) float32 = log_softmax(raw logits)[token]: the
    policy's own probability, independent of temperature/top-k/top-p, which only shape the
    sampling (the same quantity the actor's forward pass gives PPO as old logprobs).
    `banned`: a token id never sampled (eos while a minimum answer length is enforced).
    """
    raw = logits.float()
    shaped = raw
    if banned is not None:
        shaped = shaped.clone()
        shaped[:, banned] = NEG_INF
    if do_sample:
        shaped = shaped / temperature
        shaped = top_p_filter(top_k_filter(shaped, top_k), top_p)
        probs = torch.softmax(shaped, dim=-1)
        tokens = torch.argmax(probs / noise, dim=-1)
    else:
        tokens = torch.argmax(shaped, dim=-1)
    logprobs = torch.log_softmax(raw, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs
