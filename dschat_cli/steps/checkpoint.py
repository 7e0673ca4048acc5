"""Resumable step-level checkpoints:  dschat sft|reward|ppo ... --save-interval N [--resume auto]

What a checkpoint holds (layout in config/checkpoints.py):
  - each trained engine's full DeepSpeed state through its own save_checkpoint/load_checkpoint:
    module weights (LoRA included), optimizer, LR scheduler, loss scaler, ZeRO partitions;
  - each rank's RNG states (python, numpy, torch CPU, CUDA), saved as tensors and loaded with
    torch.load(weights_only=True);
  - the step's "trainer state" (JSON): global step, data position (epoch, batches consumed in it),
    the metric history the summary is built from, the health monitor's state, the run's config
    and world size, and the learning-rate changes of earlier resumes;
  - optional extra tensors (PPO: the actor's EMA) as safetensors.

A run resumed from it continues exactly: same batches in the same order, same dropout masks and
samples, same optimizer updates (bit-identical in fp32 on CPU; the tests check it). The one option
that may change is a peak learning rate (config/checkpoints.py LR_OPTIONS): the restored schedule
then continues as if the run had had the new peak from its start (continue_schedule).

Writes are atomic: every rank writes its part, a barrier, then rank 0 writes complete.json and only
then points `latest` at the folder (temp file + os.replace), and only then prunes folders beyond
--keep-last. A crash at any point leaves `latest` on a complete checkpoint (or absent).

    ckpt = CheckpointManager(cfg, dist, out)         # validates --resume (ConfigError)
    state, tensors = ckpt.load({"model": engine})    # (None, None) unless resuming
    metrics = ckpt.metrics_log(path, resolved, state)  # metrics.jsonl, cut to the checkpoint's
    ...
    if ckpt.due(step):                               # at an update boundary
        ckpt.save(step, {"model": engine}, state={...})
    ckpt.save_final(step, {"model": engine}, state={..., "finished": True})
    ckpt.latest()                                    # Path of the newest complete checkpoint
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
from pathlib import Path

import torch

from dschat_cli.config.checkpoints import (CHECKPOINTS, LATEST, MARKER, RESTART, STATE,
                                           checkpoint_problem, latest_name,
                                           learning_rate_changes, resolve_resume, step_folders,
                                           step_name, step_of)
from dschat_cli.config.resolved import ResolvedRun
from dschat_cli.config.schema import ConfigError, to_dict
from dschat_cli.dist import Dist
from dschat_cli.ui.metrics import MetricsLog

TENSORS = "tensors.safetensors"


class CheckpointManager:
    """Saves and restores one training step's checkpoints under OUTPUT_DIR/checkpoints. Every
    method is called on every rank (DeepSpeed's save/load are collective)."""

    def __init__(self, cfg, dist: Dist, out: Path):
        self.opts = cfg.checkpoint
        self.cfg = cfg
        self.dist = dist
        self.root = Path(out) / CHECKPOINTS
        self.config = to_dict(cfg)
        self.resume_from: Path | None = resolve_resume(cfg, dist.world_size)
        self.last_step = step_of(self.resume_from) if self.resume_from is not None else 0
        self.metrics: MetricsLog | None = None
        # peak learning rates changed on resume, this one's and earlier ones' (saved along):
        # [{"flag", "from", "to", "step"}]
        self.lr_changes: list[dict] = []
        if dist.is_main and self.root.is_dir():
            # `latest` names where this run's history is: the checkpoint it resumes, or nothing for
            # a fresh run (so `--resume auto` never picks up a replaced run's checkpoints)
            if self.resume_from is not None and self.resume_from.parent == self.root:
                _write_atomic(self.root / LATEST, self.resume_from.name)
            else:
                (self.root / LATEST).unlink(missing_ok=True)
        dist.barrier()

    @property
    def enabled(self) -> bool:
        return self.opts.save_interval > 0

    def due(self, step: int, engines: dict) -> bool:
        """True at the first save opportunity at or after each multiple of --save-interval (PPO
        saves only at update boundaries, which may fall between the multiples) where no engine
        holds the gradients of an unfinished accumulation window (a checkpoint has none)."""
        n = self.opts.save_interval
        return n > 0 and step // n > self.last_step // n and all(
            e.micro_steps % e.gradient_accumulation_steps() == 0 for e in engines.values())

    def latest(self) -> Path | None:
        """The newest complete checkpoint of this run (None before the first one)."""
        name = latest_name(self.root)
        if name is None or checkpoint_problem(self.root / name) is not None:
            return None
        return self.root / name

    # --- save ---------------------------------------------------------------------------------
    def save(self, step: int, engines: dict, state: dict,
             tensors: dict[str, torch.Tensor] | None = None) -> Path:
        """Write checkpoint `step`: the engines (all ranks), this rank's RNG, rank 0's `state` (a
        JSON-able dict) and `tensors` (rank 0's, may be None). Returns its folder once it is
        complete and `latest`."""
        folder = self.root / step_name(step)
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if folder.exists():  # a crash's leftover, or a replaced run's: never mixed with ours
                shutil.rmtree(folder)
            folder.mkdir()
        self.dist.barrier()
        for tag, engine in engines.items():
            engine.save_checkpoint(str(folder), tag=tag, save_latest=False)
        torch.save(_rng_state(), folder / f"rng_rank{self.dist.rank:05d}.pt")
        if self.dist.is_main:
            record = {**state, "step": step, "world_size": self.dist.world_size,
                      "metrics_rows": self.metrics.rows if self.metrics is not None else 0,
                      "engines": list(engines), "config": self.config,
                      "lr_changes": self.lr_changes}
            (folder / STATE).write_text(json.dumps(record) + "\n", encoding="utf-8")
            if tensors:
                from safetensors.torch import save_file

                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                          str(folder / TENSORS))
        self.dist.barrier()  # every rank's files are written (closed) before the marker
        if self.dist.is_main:
            self._commit(folder, step)
            self._report()
        self.dist.barrier()
        self.last_step = step
        return folder

    def _report(self) -> None:
        """Rank 0, after a checkpoint: the run's report.html and plots, from metrics.jsonl so far
        (dschat_cli/report/; ~1 s). A failure warns in one line and never stops training."""
        from dschat_cli.report import write_report_quietly

        if self.metrics is not None and self.metrics.path is not None:
            write_report_quietly(self.metrics.path.parent)

    def save_final(self, step: int, engines: dict, state: dict,
                   tensors: dict[str, torch.Tensor] | None = None) -> Path | None:
        """The end-of-training checkpoint (when checkpoints are on). Skipped when the last one is
        of this very step: resuming that one replays only the final evaluation."""
        if not self.enabled:
            return None
        if self.last_step == step and self.latest() is not None:
            return self.latest()
        return self.save(step, engines, state, tensors)

    def _commit(self, folder: Path, step: int) -> None:
        """Rank 0, after every rank wrote its files: make them durable, mark the folder complete,
        point `latest` at it, then prune."""
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            _fsync(path)
            files[str(path.relative_to(folder))] = path.stat().st_size
        marker = {"step": step, "world_size": self.dist.world_size, "files": files}
        _write_atomic(folder / MARKER, json.dumps(marker, indent=1) + "\n")
        _write_atomic(self.root / LATEST, folder.name)
        self._prune(step)

    def _prune(self, step: int) -> None:
        """Keep the newest --keep-last complete checkpoints up to `step`. Folders beyond `step`
        belong to a run this one replaced or resumed from an earlier point; incomplete ones are
        crash leftovers: both go."""
        keep, drop = [], []
        for f in step_folders(self.root):
            s = step_of(f)
            if s == step:
                continue
            (keep if s < step and checkpoint_problem(f) is None else drop).append(f)
        drop += keep[:max(0, len(keep) - (self.opts.keep_last - 1))]
        for f in drop:
            shutil.rmtree(f, ignore_errors=True)

    # --- load ---------------------------------------------------------------------------------
    def load(self, engines: dict) -> tuple[dict | None, dict[str, torch.Tensor] | None]:
        """Restore the engines and this rank's RNG from the checkpoint given by --resume; returns
        (trainer state, rank 0's extra tensors). (None, None) when the run starts fresh. Call it
        right before the training loop: it sets the RNG streams the loop continues."""
        folder = self.resume_from
        if folder is None:
            return None, None
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
        missing = [t for t in engines if t not in state.get("engines", [])]
        if missing:
            raise ConfigError("--resume", f"checkpoint {folder} has no {missing[0]} engine state; "
                              f"{RESTART}")
        for tag, engine in engines.items():
            # this run's peak learning rate of each param group, before the checkpoint's
            # scheduler state replaces them with the ones it was written with
            scheduler = getattr(engine, "lr_scheduler", None)
            peaks = list(scheduler.base_lrs) if hasattr(scheduler, "lr_lambdas") else None
            try:
                path, _ = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
            except Exception as e:  # a damaged file whose size is right
                raise ConfigError("--resume", _unreadable(folder, f"{tag}: {type(e).__name__}: "
                                                          f"{str(e).splitlines()[0][:200]}"))
            if path is None:
                raise ConfigError("--resume", _unreadable(folder, f"{tag}/ has no engine state"))
            continue_schedule(scheduler, peaks)
        changes = [{**c, "step": state["step"]} for c in learning_rate_changes(state, self.cfg)]
        self.lr_changes = [*state.get("lr_changes", []), *changes]
        for c in changes:
            from dschat_cli.ui.console import console

            scaled = (f" (the schedule's values from step {c['step']} on x "
                      f"{c['to'] / c['from']:.4g})") if c["from"] else ""
            console.print(f"{c['flag']} changed from {c['from']:g} to {c['to']:g} on resume"
                          f"{scaled}", markup=False)
        tensors = None
        if self.dist.is_main and (folder / TENSORS).is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(folder / TENSORS))
        rng = folder / f"rng_rank{self.dist.rank:05d}.pt"
        try:
            _set_rng_state(torch.load(rng, weights_only=True))
        except Exception as e:
            raise ConfigError("--resume", _unreadable(folder, f"{rng.name}: {type(e).__name__}"))
        return state, tensors

    def metrics_log(self, path: Path | None, resolved: ResolvedRun | None,
                    state: dict | None) -> MetricsLog:
        """The run's MetricsLog, feeding the trackers of the run record (config/resolved.py;
        W&B gets the run config; no record: metrics.jsonl only). Resumed: metrics.jsonl keeps the
        rows written up to the checkpoint (later ones are logged again) and is appended to, and
        W&B continues the stopped run's W&B run."""
        tensorboard = resolved.tensorboard_dir if resolved else None
        wandb = {**resolved.wandb, "config": self.config} if resolved and resolved.wandb else None
        if state is None or path is None:
            self.metrics = MetricsLog(path, tensorboard, wandb=wandb)
            return self.metrics
        keep = int(state.get("metrics_rows", 0))
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []
        _write_atomic(path, "".join(lines[:keep]))
        self.metrics = MetricsLog(path, tensorboard, mode="a", wandb=wandb)
        self.metrics.rows = min(keep, len(lines))
        for c in self.lr_changes[len(state.get("lr_changes", [])):]:  # this resume's
            self.metrics.log(c["step"], lr_change={k: c[k] for k in ("flag", "from", "to")})
        return self.metrics

    def summary_rows(self) -> list[tuple[str, str]]:
        """The summary table's line for learning rates changed on resume (none: no line)."""
        if not self.lr_changes:
            return []
        return [("learning rate changed on resume", "; ".join(
            f"{c['flag']} {c['from']:g} -> {c['to']:g} at step {c['step']}"
            for c in self.lr_changes))]


def _unreadable(folder: Path, what: str) -> str:
    return (f"checkpoint {folder} could not be loaded ({what}); point --resume at an older "
            f"step_* folder, or {RESTART}")


def continue_schedule(scheduler, peaks: list[float] | None) -> None:
    """After load_checkpoint restored `scheduler` (transformers' schedulers are LambdaLR: lr =
    base_lr x factor(step), one base_lr per param group) and its optimizer: every group whose
    peak in `peaks` (this run's, taken before the load) differs from the restored base_lr gets the
    schedule it would have had with that peak from the start. Its base_lr becomes the new peak
    (scaled by new/old) and its current lr new peak x factor(restored step), so the very next
    optimizer step already uses it (DeepSpeed steps the optimizer, then the scheduler). Groups
    differ: weight decay or not share --learning-rate, LoRA adapters have --lora-learning-rate."""
    if not peaks or peaks == scheduler.base_lrs:  # unchanged: the restored state bit for bit
        return
    groups = scheduler.optimizer.param_groups
    for i, (group, new) in enumerate(zip(groups, peaks)):
        scheduler.base_lrs[i] = group["initial_lr"] = new
        group["lr"] = new * scheduler.lr_lambdas[i](scheduler.last_epoch)  # LambdaLR's formula
    scheduler._last_lr = [g["lr"] for g in groups]


def own_generator() -> torch.Generator:
    """For a DataLoader: without its own generator, every iter(loader) draws a seed from the global
    torch RNG, so dropout and sampling would depend on when loaders are iterated, and a run resumed
    mid-epoch (which starts its iterators at other moments) would not continue exactly. The
    samplers shuffle with their own seeded generators; this one only seeds (unused) workers."""
    return torch.Generator().manual_seed(0)


def skip_batches(loader, n: int):
    """`loader` without its first `n` batches of the current epoch (call the sampler's set_epoch
    first), for continuing an epoch mid-way. Skips sample indices, so no skipped batch is loaded
    or collated."""
    if n <= 0:
        return loader
    from torch.utils.data import DataLoader

    return DataLoader(loader.dataset, batch_size=loader.batch_size,
                      sampler=_Skip(loader.sampler, n * loader.batch_size),
                      collate_fn=loader.collate_fn, drop_last=loader.drop_last,
                      generator=loader.generator)


class _Skip:
    def __init__(self, sampler, n: int):
        self.sampler, self.n = sampler, n

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.n, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.n)


class Cycle:
    """Endless batches of `loader`, epoch after epoch (PPO's unsupervised data). `position` is
    (epoch, batches consumed in it), saved in checkpoints; Cycle(loader, *position) continues."""

    def __init__(self, loader, epoch: int = 0, index: int = 0):
        self.loader, self.epoch, self.index = loader, epoch, index
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._it is None:
                if hasattr(self.loader.sampler, "set_epoch"):
                    self.loader.sampler.set_epoch(self.epoch)
                self._it = iter(skip_batches(self.loader, self.index))
            try:
                batch = next(self._it)
            except StopIteration:
                self._it, self.epoch, self.index = None, self.epoch + 1, 0
                continue
            self.index += 1
            return batch

    @property
    def position(self) -> list[int]:
        return [self.epoch, self.index]


# --- RNG ------------------------------------------------------------------------------------

def _rng_state() -> dict:
    """This rank's RNG states as tensors and plain values (loadable with weights_only=True)."""
    version, py_state, gauss = random.getstate()
    state = {"python_version": version, "python": torch.tensor(py_state, dtype=torch.int64),
             "python_gauss": gauss, "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached": float(cached)}
    except ImportError:  # pragma: no cover
        pass
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"].tolist()),
                     state["python_gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("numpy") is not None:
        import numpy as np

        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["cached"]))


# --- files ----------------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """Readers see the old content or the new one, never a part (temp file + os.replace)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:
        _fsync(path.parent)
    except OSError:  # pragma: no cover - directories cannot be fsynced on some file systems
        pass
