"""What a report is drawn from: a run folder's files, read without torch or matplotlib.

    OUT/metrics.jsonl       one row per logged step (ui/metrics.py), read as far as it is written
    OUT/train_summary.json  the run's summary (absent while the run is still going)
    OUT/run_config.yaml     the resolved run config, shown verbatim
    OUT/resolved.json       the run record; its "step" says which step wrote the folder
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

STEP_KINDS = ("sft", "reward", "ppo", "dpo")
METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"
RUN_CONFIG = "run_config.yaml"


class ReportError(Exception):
    """Bad input to a report: `where` names the argument, `message` what is wrong and the fix."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where, self.message = where, message


@dataclass
class RunRecord:
    folder: Path
    kind: str  # sft | reward | ppo | dpo, or "" when the folder does not say
    rows: list[dict]  # metrics.jsonl, in order
    summary: dict | None  # train_summary.json; None while the run is going
    config_text: str  # run_config.yaml verbatim ("" when missing)

    @property
    def status(self) -> str:
        if not self.summary:
            return "running (no train_summary.json yet)"
        return str(self.summary.get("status", "unknown"))

    @property
    def last_step(self) -> int | None:
        steps = [r["step"] for r in self.rows if isinstance(r.get("step"), int)]
        return max(steps) if steps else None


def read_run(folder: str | Path, where: str = "RUN_DIR") -> RunRecord:
    """The run in `folder`; ReportError(where, ...) when it is not a run folder."""
    folder = Path(folder).expanduser()
    check_folder(folder, where)
    if not (folder / METRICS).is_file():
        raise ReportError(where, f"{folder} has no {METRICS}: give the --output-dir of a dschat "
                                 "sft, reward, dpo or ppo run (or a pipeline's output folder)")
    rows = read_rows(folder / METRICS)
    summary = read_json(folder / SUMMARY) or None
    config_text = _read_text(folder / RUN_CONFIG)
    return RunRecord(folder, step_kind(folder, config_text, rows), rows, summary, config_text)


def check_folder(folder: Path, where: str) -> None:
    if not folder.exists():
        raise ReportError(where, f"no such folder: {folder}")
    if not folder.is_dir():
        raise ReportError(where, f"{folder} is a file, not a run folder")


def read_rows(path: Path) -> list[dict]:
    """metrics.jsonl's rows. A run still going may be writing the last line: a line that does
    not parse is skipped, never an error."""
    rows = []
    for line in _read_text(path).splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def step_kind(folder: Path, config_text: str = "", rows: list[dict] | None = None) -> str:
    """Which step wrote the folder: resolved.json's "step", else the run config's sections (each
    step's config has its own: ppo's `ppo`, dpo's `dpo`, reward's `loss`), else the metrics'
    keys."""
    step = read_json(folder / "resolved.json").get("step")
    if step in STEP_KINDS:
        return step
    top = set()
    for line in config_text.splitlines():
        if line and not line[0].isspace() and ":" in line:
            top.add(line.split(":", 1)[0].strip())
    for kind, marker in (("ppo", "ppo"), ("dpo", "dpo"), ("reward", "loss")):
        if marker in top:
            return kind
    if "model" in top:
        return "sft"
    keys = {k for r in rows or [] for k in r}
    if "actor_loss" in keys:
        return "ppo"
    if "eval_margin" in keys or "margin" in keys:
        return "dpo"
    if "eval_accuracy" in keys or "train_accuracy" in keys:
        return "reward"
    if "eval_ppl" in keys:
        return "sft"
    return ""


def number(v) -> float | None:
    """A finite float, or None (missing, text such as "nan" written for non-finite values,
    booleans, dicts)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the rows that hold a finite number for it."""
    xs, ys = [], []
    for r in rows:
        y = number(r.get(key))
        if y is not None and isinstance(r.get("step"), int):
            xs.append(r["step"])
            ys.append(y)
    return xs, ys


def write_atomic(path: Path, data: bytes | str) -> None:
    """Readers see the old file or the new one, never a part of one (temp file + os.replace)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def read_json(path: Path) -> dict:
    """A JSON object file's contents; {} when missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
