"""Seeded three-way split of a source's rows, one disjoint part per step (`--data-split 2,4,4`).

As DeepSpeed-Chat: one `np.random.RandomState(seed)` permutation of range(N) per source and set
(train, eval), cut at the cumulative fractions of the split; step p takes part p. The same seed
therefore gives every step the same permutation, so the three steps never see each other's rows,
even though each step runs as its own launch. Unlike the reference, nothing is written to disk:
the indices are recomputed in microseconds.

Boundaries are `round_half_up(N * cumsum(split) / sum(split))`, so they are monotone, the last is
N, and a part of size 0 is always empty (the reference rounds each part and shifts the error onto
the first one; on the usual sizes both give the same cuts).
"""

from __future__ import annotations

import numpy as np

from dschat_cli.config.schema import ConfigError
from dschat_cli.config.sections import parse_split

__all__ = ["split_boundaries", "permutation", "phase_indices", "carve_indices"]


def split_boundaries(n: int, weights: tuple[int, ...] | list[int]) -> list[int]:
    """[0, b1, ..., n]: part i is [b_i, b_{i+1}). Exact integer arithmetic (no float drift)."""
    total = sum(weights)
    if n < 0 or total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"bad split {weights} of {n} rows")
    out, cum = [0], 0
    for w in weights:
        cum += w
        out.append((2 * n * cum + total) // (2 * total))  # round half up of n*cum/total
    return out


def permutation(n: int, seed: int) -> np.ndarray:
    """The reference's shuffle: RandomState(seed).shuffle(arange(n)) (same draws as permutation)."""
    return np.random.RandomState(seed).permutation(n)


def _part(n: int, weights: tuple[int, ...], part: int, seed: int) -> list[int]:
    b = split_boundaries(n, weights)
    return permutation(n, seed)[b[part]:b[part + 1]].tolist()


def phase_indices(n: int, split: str | tuple[int, int, int], phase: int, seed: int, *,
                  source: str = "the data", allow_empty: bool = False) -> list[int]:
    """Row indices (into a set of `n` rows) that step `phase` (1, 2 or 3) uses.

    Deterministic in (n, split, seed); the three phases are disjoint and together cover range(n).
    An empty result raises ConfigError("--data-split") unless `allow_empty` (used for eval sets,
    which may legitimately be too small to give every step a row).
    """
    weights = parse_split(split) if isinstance(split, str) else tuple(int(w) for w in split)
    if phase not in (1, 2, 3):
        raise ValueError(f"phase must be 1, 2 or 3, got {phase}")
    idx = _part(n, weights, phase - 1, seed)
    if not idx and not allow_empty:
        text = ",".join(str(w) for w in weights)
        if weights[phase - 1] == 0:
            fix = f"give step {phase} a positive share, e.g. --data-split 2,4,4"
        else:
            fix = f"use a larger source or give step {phase} a larger share of --data-split"
        raise ConfigError("--data-split", f"'{text}' leaves step {phase} no rows of {source} "
                          f"({n} rows); {fix}")
    return idx


def carve_indices(n: int, seed: int, eval_parts: int = 1, of: int = 10) -> tuple[list[int], list[int]]:
    """(train, eval) indices for a source without its own eval set: the reference's seeded "9,1"
    train_eval split. Unlike it, at least one eval row is kept when n >= 2 (so tiny local files
    still get an eval set)."""
    b = split_boundaries(n, (of - eval_parts, eval_parts))
    cut = b[1]
    if n >= 2 and cut == n:
        cut = n - 1
    perm = permutation(n, seed)
    return perm[:cut].tolist(), perm[cut:].tolist()
