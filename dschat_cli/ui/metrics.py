"""Metrics of a run: one JSON object per line in OUTPUT_DIR/metrics.jsonl (rank 0), optionally
mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, path: str | Path | None, tensorboard_dir: str | Path | None = None,
                 mode: str = "w"):
        self.path = Path(path) if path else None
        self.rows = 0  # lines written to the file (in a resumed run: including the kept ones)
        self._fh = open(self.path, mode, encoding="utf-8") if self.path else None
        self._tb = None
        if tensorboard_dir and self._fh is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard not installed
                raise RuntimeError("--enable-tensorboard needs the tensorboard package: "
                                   "pip install tensorboard") from e
            self._tb = SummaryWriter(str(tensorboard_dir))

    def log(self, step: int, **values) -> None:
        if self._fh is None:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        for k, v in values.items():
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)
            row[k] = v
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        self.rows += 1
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
