"""Metrics of a run: one JSON object per line in OUTPUT_DIR/metrics.jsonl (rank 0), and the same
numbers under the same names to the experiment trackers of --report-to: TensorBoard (add_scalar)
and Weights & Biases (wandb.log(..., step=step)). Only numbers go to the trackers (no bools,
strings or dicts such as a resume's lr_change).

    metrics = MetricsLog(out / "metrics.jsonl", tensorboard_dir=record.tensorboard_dir,
                         wandb={**record.wandb, "config": to_dict(cfg)})
    metrics.log(step, loss=2.31, lr=9.6e-6)
    metrics.close()                  # also wandb.finish(), and W&B's files complete on disk
"""

from __future__ import annotations

import json
import math
import secrets
import time
from pathlib import Path

WANDB_RUN_ID = "wandb_run_id"  # OUTPUT_DIR/wandb_run_id: the run's W&B id, for --resume


class MetricsLog:
    def __init__(self, path: str | Path | None, tensorboard_dir: str | Path | None = None,
                 mode: str = "w", wandb: dict | None = None):
        """`wandb`: wandb.init's arguments (project, name, job_type, dir, config); None: no wandb.
        mode "a" continues a resumed run: metrics.jsonl is appended to, and wandb continues the
        W&B run whose id the first run left in DIR/wandb_run_id."""
        self.path = Path(path) if path else None
        self.rows = 0  # lines written to the file (in a resumed run: including the kept ones)
        self._fh = open(self.path, mode, encoding="utf-8") if self.path else None
        self._tb = None
        self._wandb = None
        self._wandb_from = 0  # a resumed W&B run takes only steps after the ones it has
        if tensorboard_dir and self._fh is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard not installed (checks.py says so before launch)
                raise RuntimeError("--report-to tensorboard needs the tensorboard package: "
                                   "pip install tensorboard") from e
            self._tb = SummaryWriter(str(tensorboard_dir))
        if wandb and self._fh is not None:
            self._wandb = _start_wandb(wandb, resume=mode == "a")
            self._wandb_from = self._wandb.step if mode == "a" else 0

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
        numbers = {k: v for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)
        # W&B refuses (with a warning) steps below the ones a resumed run already has: the rows
        # between the checkpoint and where the stopped run got to are there already
        if self._wandb is not None and numbers and step >= self._wandb_from:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            import wandb
            self._wandb.finish()
            self._wandb = None
            # finish() returns before W&B's service has written the run out (it closes the
            # run's stream in the background): an offline run's OUT/wandb/.../run-ID.wandb may
            # still hold only its header. teardown waits for the service to stop, so the whole
            # run is on disk when the step returns (a Python caller can read or `wandb sync` it
            # at once). The next wandb.init starts a fresh service, as checks.py's login check
            # already does before every step.
            wandb.teardown()


def _start_wandb(init: dict, *, resume: bool):
    """wandb.init with `init` (its dir is the output folder). A fresh run gets a new id, kept in
    DIR/wandb_run_id; a resumed one reads it back and continues that W&B run (resume="allow":
    also when the first run never reached W&B's server, e.g. offline). console="off" leaves the
    terminal to dschat (W&B would otherwise capture and re-print stdout), quiet drops its
    end-of-run summary; WANDB_MODE=offline and the other WANDB_* settings apply as usual."""
    try:
        import wandb
    except ImportError as e:  # checks.py says so before launch
        raise RuntimeError("--report-to wandb needs the wandb package: "
                           "pip install 'dschat[wandb]'") from e
    id_file = Path(init["dir"]) / WANDB_RUN_ID
    run_id = id_file.read_text(encoding="utf-8").strip() if resume and id_file.is_file() else ""
    if not run_id:
        run_id = secrets.token_hex(4)  # 8 characters from [0-9a-f], as W&B's own ids
        id_file.write_text(run_id + "\n", encoding="utf-8")
    return wandb.init(**init, id=run_id, resume="allow",
                      settings=wandb.Settings(console="off", quiet=True))


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
