"""Health checks at every logged step:  dschat sft|reward|ppo ... [--on-anomaly stop|warn]

    monitor = HealthMonitor("ppo", cfg.health, dtype=dtype, lr_flags=..., summary_path=...)
    monitor.act(monitor.check(step, losses=..., grad_norms=..., kl=..., answer_length=...,
                              ema_reward=..., reward_spread=...), metrics=metrics, printer=printer)

`check` is pure (plain floats in, `Anomaly` records out; unit-tested on hand-made sequences);
`act` records each anomaly in metrics.jsonl and then, with `--on-anomaly stop` (the default),
writes a "stopped" train_summary.json and raises `TrainingAnomaly`, which the worker turns into
one `error:` line and exit code 1. The step raises from inside its loop, before any checkpoint or
model save of that step, so whatever was saved before the anomaly stays as it was. With
`--on-anomaly warn` it prints a yellow line and training continues.

The rules (figures are global: every rank computes the same values and decides alike):

- loss: every loss of the step must be finite (at once).
- gradient norm: DeepSpeed's global gradient norm of every optimizer step must be finite (at
  once). ZeRO 1-3 skip a step with a NaN/inf gradient silently (and report the norm as inf), so
  without this check a broken run would go on without learning. In fp16 an inf norm is also how
  the dynamic loss scaler detects overflow: it skips the step and halves the scale, so fp16 only
  counts FP16_OVERFLOW_STREAK overflowing optimizer steps in a row (the scaler needs 17 to fall
  from its initial 2^16 to its minimum 1, hysteresis 2 included).
- step 3 (PPO) only, each of these must hold for --anomaly-patience consecutive PPO steps:
  - KL to the reference above --max-kl. Unset, the limit is 2 x --clip-reward-value / --kl-ctl
    (100 nats with the defaults): the clipped score can gain at most 2 x clip over the reference's
    answer, so beyond that KL the penalty outweighs any reward the actor could earn; its return is
    below the reference policy's own, i.e. the optimisation has diverged.
  - mean answer length below --min-answer-length tokens (capped at half of --max-answer-seq-len,
    so a run with very short answers by design is not flagged): the actor learnt to stop at once.
  - reward collapse, measured against the baseline reward spread: the mean standard deviation of
    the batch rewards (across the answers of one PPO step, all ranks) over the first
    BASELINE_STEPS steps where it is defined (>= 2 kept answers). (a) the EMA reward more than
    --reward-collapse-drop baseline spreads below its best; (b) the spread of the batch rewards
    below --reward-collapse-spread x the baseline (every prompt gets an alike answer). Normal
    noise stays far from either: the EMA of batch means moves by a fraction of one spread. With a
    baseline spread of 0 (one answer per step, or a constant reward model) both are off.
  - degenerate answers, the classic reward-model exploits (the proxy reward rises while the
    answers get worse, so the reward rules above cannot see them): (a) the mean share of repeated
    trigrams in the kept answers (rlhf/quality.py) above --max-repetition (0.5: natural sentences
    repeat almost none, "Of course!!!!!!!!" repeats nearly all); (b) distinct-2 across the step's
    answers below --diversity-collapse x its baseline (the first BASELINE_STEPS steps): every
    prompt gets an alike answer.

In warn mode an anomaly is reported when it starts and again only after its condition cleared,
not at every step it persists. The monitor's state (streaks, baseline spreads, best EMA reward,
the anomalies recorded) is part of every checkpoint (state_dict / load_state_dict), so a resumed
run judges its steps exactly as the uninterrupted run would.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

FP16_OVERFLOW_STREAK = 20
BASELINE_STEPS = 3


class TrainingAnomaly(RuntimeError):
    """A run stopped by its health monitor (--on-anomaly stop): a training failure, exit code 1."""

    def __init__(self, anomaly: "Anomaly", last_checkpoint: Path | None = None):
        super().__init__(anomaly.message())
        self.anomaly = anomaly
        self.last_checkpoint = last_checkpoint  # the newest complete checkpoint, left as it was


@dataclass(frozen=True)
class Anomaly:
    step_name: str  # sft | reward | ppo
    global_step: int
    kind: str  # loss | grad_norm | kl | answer_length | reward_drop | reward_spread |
    #            repetition | diversity
    figure: str  # "actor loss", "KL to the reference", ...
    value: float
    threshold: str  # the limit and where it comes from, in words
    advice: str
    # the learning-rate flag the advice lowers, if any: the one fix `--resume` accepts, so the
    # stop message offers to continue from the last checkpoint with it
    lr_flag: str | None = None

    @property
    def where(self) -> str:
        return f"{self.step_name} step {self.global_step}"

    @property
    def detail(self) -> str:
        return f"{self.figure} is {_fmt(self.value)} ({self.threshold}); {self.advice}"

    def message(self) -> str:
        return f"{self.where}: {self.detail}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["value"] = self.value if math.isfinite(self.value) else str(self.value)
        d["message"] = self.message()
        return d


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def resolve_max_kl(max_kl: float | None, kl_ctl: float, clip_reward_value: float) -> float | None:
    """The KL limit in nats, or None when off (0, or unset with no KL penalty to derive it from)."""
    if max_kl is not None:
        return max_kl or None
    if kl_ctl <= 0 or clip_reward_value <= 0:
        return None
    return 2 * clip_reward_value / kl_ctl


@dataclass
class _Streak:
    """Consecutive steps a condition held, and whether it was already reported."""
    count: int = 0
    reported: bool = False

    def update(self, holds: bool, need: int) -> bool:
        """True when the condition has just held `need` steps in a row (edge-triggered)."""
        if not holds:
            self.count, self.reported = 0, False
            return False
        self.count += 1
        if self.count >= need and not self.reported:
            self.reported = True
            return True
        return False


@dataclass
class HealthMonitor:
    """Per-step health checks of one training step. `opts` is the config's health section
    (on_anomaly; PPO's adds max_kl, min_answer_length, reward_collapse_drop,
    reward_collapse_spread, anomaly_patience)."""
    step_name: str
    opts: object
    dtype: str = "fp32"
    # figure label -> the learning-rate flag to lower ("loss" -> "--learning-rate")
    lr_flags: Mapping[str, str] = field(default_factory=dict)
    summary_path: Path | None = None  # rank 0's train_summary.json, written when a run stops
    last_checkpoint: Callable[[], Path | None] | None = None  # the newest complete checkpoint
    # PPO only: the KL limit (resolve_max_kl) and --max-answer-seq-len
    max_kl: float | None = None
    max_kl_note: str = ""  # how an unset --max-kl was derived
    max_answer_seq_len: int | None = None
    history: list[dict] = field(default_factory=list)

    @classmethod
    def for_run(cls, step_name: str, opts, *, dtype: str, out: Path, is_main: bool,
                last_checkpoint, state: dict | None, **rules) -> "HealthMonitor":
        """The monitor of a training step: rank 0 writes OUT/train_summary.json when it stops a
        run; a resumed run continues the checkpoint's streaks, baselines and anomalies (older
        checkpoints have none: it starts afresh)."""
        monitor = cls(step_name, opts, dtype=dtype, last_checkpoint=last_checkpoint,
                      summary_path=Path(out) / "train_summary.json" if is_main else None, **rules)
        if state is not None and "health" in state:
            monitor.load_state_dict(state["health"])
        return monitor

    def __post_init__(self) -> None:
        self._streaks: dict[str, _Streak] = {}
        self._baseline: list[float] = []
        self._best_ema = -math.inf
        self._distinct_baseline: list[float] = []

    # the rules ----------------------------------------------------------------------------------
    def check(self, step: int, *, losses: Mapping[str, float],
              grad_norms: Mapping[str, Sequence[float]] | None = None, kl: float | None = None,
              answer_length: float | None = None, ema_reward: float | None = None,
              reward_spread: float | None = None, repetition: float | None = None,
              distinct: float | None = None,
              greedy_repetition: float | None = None) -> list[Anomaly]:
        """The anomalies that start at global step `step`. losses: {label: value};
        grad_norms: {label: norms of the optimizer steps since the last check}."""
        found: list[Anomaly] = []

        def new(kind, figure, value, threshold, advice, lr_flag) -> None:
            found.append(Anomaly(self.step_name, step, kind, figure, float(value), threshold,
                                 advice, lr_flag))

        for label, value in losses.items():
            if self._streak(f"loss:{label}").update(not math.isfinite(value), 1):
                new("loss", label, value, "must be finite", *self._nan_advice(label))
        for label, norms in (grad_norms or {}).items():
            s = self._streak(f"grad:{label}")
            limit = FP16_OVERFLOW_STREAK if self.dtype == "fp16" else 1
            for norm in norms:
                if s.update(not math.isfinite(norm), limit):
                    threshold = ("must be finite" if limit == 1 else
                                 f"inf/NaN for {limit} optimizer steps in a row: more overflows "
                                 "than fp16 loss scaling can absorb")
                    new("grad_norm", label, norm, threshold, *self._nan_advice(label))
        if self.step_name == "ppo":
            self._check_ppo(new, kl, answer_length, ema_reward, reward_spread)
            self._check_answers(new, repetition, distinct, greedy_repetition)
        return found

    def _check_ppo(self, new, kl, answer_length, ema_reward, reward_spread) -> None:
        o = self.opts
        need = o.anomaly_patience
        after = f" for {need} PPO steps" if need > 1 else ""
        tame = "lower --actor-learning-rate or raise --kl-ctl"
        if self.max_kl is not None and kl is not None and \
                self._streak("kl").update(kl > self.max_kl, need):
            new("kl", "KL to the reference", kl,
                f"above --max-kl {_fmt(self.max_kl)}{after}"
                + (f"; {self.max_kl_note}" if self.max_kl_note else ""),
                "raise --kl-ctl or lower --actor-learning-rate", "--actor-learning-rate")
        min_len = o.min_answer_length
        if self.max_answer_seq_len:
            min_len = min(min_len, self.max_answer_seq_len / 2)
        if min_len > 0 and answer_length is not None and \
                self._streak("length").update(answer_length < min_len, need):
            new("answer_length", "mean answer length (tokens)", answer_length,
                f"below --min-answer-length {_fmt(min_len)}{after}",
                f"{tame}; check that the reward model does not favour short answers",
                "--actor-learning-rate")

        if reward_spread is not None and math.isfinite(reward_spread) and \
                len(self._baseline) < BASELINE_STEPS:
            self._baseline.append(reward_spread)
        base = sum(self._baseline) / len(self._baseline) if self._baseline else 0.0
        if ema_reward is not None and math.isfinite(ema_reward):
            self._best_ema = max(self._best_ema, ema_reward)
            drop = self._best_ema - ema_reward
            armed = o.reward_collapse_drop > 0 and len(self._baseline) == BASELINE_STEPS \
                and base > 0
            if self._streak("drop").update(armed and drop > o.reward_collapse_drop * base, need):
                new("reward_drop", "EMA reward", ema_reward,
                    f"{_fmt(drop)} below its best {_fmt(self._best_ema)}, more than "
                    f"--reward-collapse-drop {_fmt(o.reward_collapse_drop)} x the baseline reward "
                    f"spread {_fmt(base)}{after}", f"reward collapse: {tame}",
                    "--actor-learning-rate")
        if reward_spread is not None and math.isfinite(reward_spread):
            armed = o.reward_collapse_spread > 0 and len(self._baseline) == BASELINE_STEPS \
                and base > 0
            limit = o.reward_collapse_spread * base
            if self._streak("spread").update(armed and reward_spread < limit, need):
                new("reward_spread", "reward spread (std across answers)", reward_spread,
                    f"below --reward-collapse-spread {_fmt(o.reward_collapse_spread)} x its "
                    f"baseline {_fmt(base)}{after}: every prompt gets an alike answer",
                    f"reward collapse: {tame}", "--actor-learning-rate")

    def _check_answers(self, new, repetition, distinct, greedy_repetition) -> None:
        """Degenerate answers, the classic reward-model exploits: stuck repeating a word or a
        phrase (in the sampled answers, or in the greedy answers of the periodic check, counted
        over consecutive checks), or one answer for every prompt."""
        o = self.opts
        need = o.anomaly_patience
        after = f" for {need} PPO steps" if need > 1 else ""
        advice = ("the actor is exploiting the reward model: raise --kl-ctl (or set --kl-target), "
                  "lower --actor-learning-rate, and check the reward model on degenerate answers "
                  "(dschat eval-reward)")
        checks = f" for {need} greedy checks in a row" if need > 1 else ""
        for key, value, figure, over, what in (
                ("repetition", repetition, "share of repeated trigrams in the answers", after,
                 "answers stuck repeating a word or phrase"),
                ("greedy_repetition", greedy_repetition, "share of repeated trigrams in the greedy "
                 "answers to held-out prompts", checks,
                 "what `dschat chat` would say is stuck repeating a word or phrase")):
            if o.max_repetition > 0 and value is not None and math.isfinite(value) and \
                    self._streak(key).update(value > o.max_repetition, need):
                new("repetition", figure, value,
                    f"above --max-repetition {_fmt(o.max_repetition)}{over}: {what}", advice,
                    "--actor-learning-rate")
        if distinct is None or not math.isfinite(distinct):
            return
        if len(self._distinct_baseline) < BASELINE_STEPS:
            self._distinct_baseline.append(distinct)
        base = sum(self._distinct_baseline) / len(self._distinct_baseline)
        armed = o.diversity_collapse > 0 and len(self._distinct_baseline) == BASELINE_STEPS \
            and base > 0
        limit = o.diversity_collapse * base
        if self._streak("diversity").update(armed and distinct < limit, need):
            new("diversity", "distinct-2 of the answers", distinct,
                f"below --diversity-collapse {_fmt(o.diversity_collapse)} x its baseline "
                f"{_fmt(base)}{after}: every prompt gets an alike answer", advice,
                "--actor-learning-rate")

    def _streak(self, key: str) -> _Streak:
        return self._streaks.setdefault(key, _Streak())

    def _nan_advice(self, label: str) -> tuple[str, str | None]:
        """(advice, the learning-rate flag it lowers or None)."""
        lr = self.lr_flags.get(label, "--learning-rate")
        lr_flag = lr if lr.endswith("learning-rate") else None  # not --unsup-coef
        if self.dtype == "fp16":
            return f"use --dtype bf16 (fp16 overflows) or lower {lr}", lr_flag
        return f"lower {lr} (and keep --gradient-clipping on)", lr_flag

    # checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything `check` and `act` carry from step to step, as plain JSON."""
        return {"streaks": {k: [s.count, s.reported] for k, s in self._streaks.items()},
                "baseline_reward_spreads": list(self._baseline),
                "best_ema_reward": self._best_ema if math.isfinite(self._best_ema) else None,
                "baseline_distinct": list(self._distinct_baseline),
                "anomalies": [dict(a) for a in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self._streaks = {k: _Streak(int(c), bool(r)) for k, (c, r) in state["streaks"].items()}
        self._baseline = [float(x) for x in state["baseline_reward_spreads"]]
        best = state["best_ema_reward"]
        self._best_ema = -math.inf if best is None else float(best)
        self._distinct_baseline = [float(x) for x in state.get("baseline_distinct", [])]
        self.history = [dict(a) for a in state["anomalies"]]

    # what to do --------------------------------------------------------------------------------
    def act(self, anomalies: list[Anomaly], *, metrics, printer) -> None:
        """Record each anomaly in metrics.jsonl; warn, or stop: write the stopped summary and
        raise TrainingAnomaly (the caller saves nothing after this)."""
        from rich.markup import escape

        stop = self.opts.on_anomaly == "stop"
        for a in anomalies:
            record = {**a.as_dict(), "action": self.opts.on_anomaly}
            self.history.append(record)
            metrics.log(a.global_step, anomaly=record)
        if not anomalies:
            return
        if stop:
            first = anomalies[0]
            checkpoint = self.last_checkpoint() if self.last_checkpoint is not None else None
            self._write_stopped_summary(first, checkpoint)
            metrics.close()
            raise TrainingAnomaly(first, checkpoint)
        for a in anomalies:
            printer.print(f"[warn]warning:[/warn] {escape(a.message())} (--on-anomaly warn: "
                          "training continues)", soft_wrap=True)

    def summary_rows(self) -> list[tuple[str, str]]:
        """The summary table's line for anomalies passed in warn mode (none: no line)."""
        if not self.history:
            return []
        return [("anomalies (warned)", "; ".join(f"{a['figure']} at step {a['global_step']}"
                                                 for a in self.history))]

    def _write_stopped_summary(self, anomaly: Anomaly, checkpoint: Path | None) -> None:
        if self.summary_path is None:
            return
        summary = {"status": "stopped", "step": self.step_name, "steps": anomaly.global_step,
                   "anomaly": anomaly.as_dict(), "anomalies": self.history, "model_saved": False,
                   "last_checkpoint": str(checkpoint) if checkpoint is not None else None,
                   "output_dir": str(self.summary_path.parent)}
        clean = json.loads(json.dumps(summary), parse_constant=lambda _: None)
        self.summary_path.write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")


class GradNorms:
    """The global gradient norm of each optimizer step of one DeepSpeed engine.

    Call poll() after every engine.step(); take() returns the norms of the optimizer steps since
    the last take(). DeepSpeed keeps the norm (before clipping) under ZeRO 1-3 and with its
    fp16/bf16 optimizers; at ZeRO-0 in fp32 it keeps none and the plain torch optimizer applies a
    NaN gradient to the weights. There a step pre-hook on the optimizer measures the norm (after
    DeepSpeed's clipping, which keeps NaN/inf as NaN), so the NaN stops the run before its step
    is saved; such a measured norm is only used for the check (`reported` stays None)."""

    def __init__(self, engine):
        self.engine = engine
        self._seen = engine.global_steps
        self._norms: list[float] = []
        self._measured = None
        self.reported: float | None = None  # DeepSpeed's norm of the last optimizer step
        opt = getattr(engine, "optimizer", None)
        if opt is not None and not hasattr(opt, "_global_grad_norm") \
                and hasattr(opt, "register_step_pre_hook"):
            opt.register_step_pre_hook(self._measure)

    def _measure(self, optimizer, args, kwargs) -> None:
        import torch

        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self._measured = torch.nn.utils.get_total_norm(grads) if grads else None

    def poll(self) -> None:
        steps = self.engine.global_steps
        if steps == self._seen:
            return
        self._seen = steps
        norm = self.engine.get_global_grad_norm()
        self.reported = None if norm is None else float(norm)
        if norm is None and self._measured is not None:
            norm, self._measured = self._measured, None
        if norm is not None:
            self._norms.append(float(norm))

    def take(self) -> list[float]:
        out, self._norms = self._norms, []
        return out
