"""Curves in one line of terminal text, for the pipeline's summary table:

    sparkline([0.1, 0.3, 0.2, 0.8])          -> '▁▃▂█'
    trend(rewards, width=24)                 -> '▁▂▂▃▅▆▇█ 0.12 -> 0.80'
    metric_trend(OUT / "step3-models/x", "kl")  # the same, read from a run's metrics.jsonl
    step_curves("ppo", OUT / "step3-models/x")  # [(figure, trend)]: the pipeline summary's lines

No dependency (the terminal's unicode block characters); no matplotlib.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from dschat_cli.report.records import METRICS, number, read_rows, series

BLOCKS = "▁▂▃▄▅▆▇█"


def _shrink(values: list[float | None], width: int) -> list[float | None]:
    """`width` buckets of consecutive values, each their mean (missing values left out)."""
    out = []
    n = len(values)
    for i in range(width):
        part = [v for v in values[i * n // width:(i + 1) * n // width] if v is not None]
        out.append(sum(part) / len(part) if part else None)
    return out


def sparkline(values: Iterable, width: int | None = None, lo: float | None = None,
              hi: float | None = None) -> str:
    """One block character per value, the lowest value ▁ and the highest █ (or `lo`/`hi`, to
    share a scale between lines). A missing or non-finite value is a space; a flat series is
    drawn at mid height. With `width`, a longer series is averaged down to `width` characters."""
    vals = [number(v) for v in values]
    if width is not None and width > 0 and len(vals) > width:
        vals = _shrink(vals, width)
    finite = [v for v in vals if v is not None]
    if not finite:
        return " " * len(vals)
    lo = min(finite) if lo is None else lo
    hi = max(finite) if hi is None else hi
    top = len(BLOCKS) - 1
    out = []
    for v in vals:
        if v is None:
            out.append(" ")
        elif hi <= lo:
            out.append(BLOCKS[top // 2])
        else:
            out.append(BLOCKS[min(top, max(0, round((v - lo) / (hi - lo) * top)))])
    return "".join(out)


def trend(values: Iterable, width: int = 24, spec: str = ".3g") -> str:
    """'▁▂▅█ 0.12 -> 0.8': the sparkline and the first and last finite values ('' if none)."""
    vals = list(values)
    finite = [x for x in (number(v) for v in vals) if x is not None]
    if not finite:
        return ""
    return f"{sparkline(vals, width)} {format(finite[0], spec)} -> {format(finite[-1], spec)}"


def metric_trend(run_dir: str | Path, key: str, width: int = 24, spec: str = ".3g") -> str:
    """trend() of one metrics.jsonl key of a run folder ('' when the run has no such figure)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return ""
    return trend(series(read_rows(path), key)[1], width, spec)


# the curves `dschat pipeline` prints under its time table, per step: (metrics.jsonl key, label)
CURVES: dict[str, tuple[tuple[str, str], ...]] = {
    "sft": (("loss", "train loss"),),
    "reward": (("loss", "train loss"), ("eval_accuracy", "eval accuracy")),
    "dpo": (("loss", "train loss"), ("margin", "implicit-reward margin")),
    "ppo": (("reward", "reward-model score"), ("true_reward", "true reward"),
            ("kl", "KL to the reference")),
}


def step_curves(kind: str, run_dir: str | Path, width: int = 24) -> list[tuple[str, str]]:
    """[(label, trend)] of the step's CURVES that its run folder logged."""
    path = Path(run_dir) / METRICS
    if kind not in CURVES or not path.is_file():
        return []
    rows = read_rows(path)
    out = []
    for key, label in CURVES[kind]:
        line = trend(series(rows, key)[1], width)
        if line:
            out.append((label, line))
    return out
