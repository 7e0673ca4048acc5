"""What the answers look like, as numbers a run can log and a monitor can judge: repetition,
diversity and how answers end. Pure torch over token ids; no tokenizer, no model.

    repeated_ngram_fraction(answers, action_mask, n=3)   # (B,) per answer, 0 = no n-gram repeats
    distinct_ngrams(answers, action_mask, n=2)           # one figure for the batch, 1 = all unique
    ended_with_eos(answers, action_mask, eos_token_id)   # (B,) bool: stopped, not cut at the limit

A reward model is a proxy and PPO exploits it: the classic exploit is an answer that repeats a
token or a phrase ("Of course!!!!!!!!"), and the classic collapse is every prompt getting the same
answer. The first shows as a high repeated n-gram fraction, the second as a low distinct-n across
the batch. Natural sentences repeat few trigrams (a sentence of 20 words repeats none, typically)
and a batch of answers to different questions shares few bigrams.

answers: (B, A) long, the answer tokens; action_mask: (B, A) 0/1, 1 on the tokens that count
(see rlhf/ppo.py: a right-padded real prefix per row).
"""

from __future__ import annotations

import torch


def _rows(answers: torch.Tensor, action_mask: torch.Tensor) -> list[list[int]]:
    lengths = action_mask.long().sum(-1).tolist()
    ids = answers.tolist()
    return [row[:n] for row, n in zip(ids, lengths)]


def _ngrams(row: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]


def repeated_ngram_fraction(answers: torch.Tensor, action_mask: torch.Tensor,
                            n: int = 3) -> torch.Tensor:
    """Per answer: the share of its n-grams that already occurred earlier in the same answer.

    (B, A), (B, A) -> (B,) float32 in [0, 1); 0 for an answer shorter than n + 1 tokens (it
    cannot repeat an n-gram). "a b a b a b" with n=2: n-grams ab ba ab ba ab, three of five seen
    before -> 0.6; "! ! ! ! !" with n=3: three trigrams, two repeats -> 0.667.
    """
    out = []
    for row in _rows(answers, action_mask):
        grams = _ngrams(row, n)
        if not grams:
            out.append(0.0)
            continue
        out.append((len(grams) - len(set(grams))) / len(grams))
    return torch.tensor(out, dtype=torch.float32)


def distinct_ngrams(answers: torch.Tensor, action_mask: torch.Tensor, n: int = 2) -> float:
    """distinct-n over the batch: unique n-grams / all n-grams, over every answer's n-grams
    (nan when no answer has n tokens). 1.0: no n-gram occurs twice anywhere; a batch where every
    answer is the same sentence of k n-grams gives 1 / B."""
    grams = [g for row in _rows(answers, action_mask) for g in _ngrams(row, n)]
    if not grams:
        return float("nan")
    return len(set(grams)) / len(grams)


def ended_with_eos(answers: torch.Tensor, action_mask: torch.Tensor,
                   eos_token_id: int) -> torch.Tensor:
    """(B,) bool: the answer's last counted token is eos (it stopped by itself); False for an
    answer cut at --max-answer-seq-len and for a dropped answer (no counted token)."""
    lengths = action_mask.long().sum(-1)
    last = (lengths - 1).clamp(min=0).unsqueeze(-1)
    return (answers.gather(-1, last).squeeze(-1) == eos_token_id) & (lengths > 0)
