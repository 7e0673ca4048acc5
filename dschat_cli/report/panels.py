"""What each step's report plots: one Panel per figure, its curves named by metrics.jsonl keys
(steps/{sft,reward,dpo}.py and steps/rl/observers.py write them). A key the run did not log draws
no curve, and a panel with no curve is left out: a critic-free run has no critic loss, a run
without --true-reward no true reward. Pure data: no matplotlib here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from dschat_cli.report.records import number


@dataclass(frozen=True)
class Curve:
    key: str  # the metrics.jsonl key (or a derived figure's name)
    label: str
    value: Callable[[dict], object] | None = None  # derived from a row; None: row[key]
    skip_if_constant: bool = False  # e.g. the unsupervised loss, 0.0 when there is no such data
    smooth: int = 0  # > 0: also draw its trailing mean over this many points (a noisy batch
    # figure whose trend is the point: step 3's true reward and KL)

    def of(self, row: dict) -> float | None:
        return number(self.value(row) if self.value is not None else row.get(self.key))


@dataclass(frozen=True)
class Panel:
    name: str  # the PNG's file name (report/NAME.png)
    title: str
    ylabel: str  # with its unit
    curves: tuple[Curve, ...]
    ylim: tuple[float, float] | None = None  # fixed for shares and accuracies (0 to 1)
    log: bool = False  # log y scale (the label says so)
    only_if_varies: bool = False  # e.g. the KL coefficient: a panel only when it is adaptive


SHARE = (-0.02, 1.02)


def _diff(a: str, b: str):
    def value(row: dict):
        x, y = number(row.get(a)), number(row.get(b))
        return None if x is None or y is None else x - y
    return value


def _exp(key: str):
    def value(row: dict):
        x = number(row.get(key))
        return None if x is None else math.exp(min(x, 50.0))
    return value


def _lr(key: str = "lr") -> Panel:
    return Panel("lr", "Learning rate", "learning rate", (Curve(key, "lr"),))


_SFT = (
    Panel("loss", "Loss", "cross-entropy (nats per answer token)",
          (Curve("loss", "train (batch mean)"), Curve("eval_loss", "eval set"))),
    Panel("perplexity", "Perplexity", "perplexity (log scale)",
          (Curve("train_ppl", "train (exp of batch loss)", _exp("loss")),
           Curve("eval_ppl", "eval set")), log=True),
    _lr(),
    Panel("throughput", "Throughput", "tokens per second (all ranks)",
          (Curve("tokens_per_s", "tokens/s"),)),
    Panel("grad_norm", "Gradient norm", "global L2 norm (before clipping)",
          (Curve("grad_norm", "gradient norm"),)),
)

_REWARD = (
    Panel("loss", "Loss", "pairwise loss (nats)", (Curve("loss", "train (batch mean)"),)),
    Panel("accuracy", "Accuracy", "share of pairs scored chosen > rejected",
          (Curve("train_accuracy", "train batch"), Curve("eval_accuracy", "eval set")),
          ylim=SHARE),
    Panel("scores", "Chosen and rejected scores (eval set)", "mean reward score",
          (Curve("eval_chosen", "chosen"), Curve("eval_rejected", "rejected"))),
    Panel("margin", "Score margin (eval set)", "mean chosen - mean rejected score",
          (Curve("eval_margin", "chosen - rejected", _diff("eval_chosen", "eval_rejected")),)),
    _lr(),
    Panel("throughput", "Throughput", "pairs per second (all ranks)",
          (Curve("pairs_per_s", "pairs/s"),)),
    Panel("grad_norm", "Gradient norm", "global L2 norm (before clipping)",
          (Curve("grad_norm", "gradient norm"),)),
)

_DPO = (
    Panel("loss", "Loss", "DPO loss (nats)",
          (Curve("loss", "train (batch mean)"), Curve("eval_loss", "eval set"))),
    Panel("accuracy", "Implicit-reward accuracy",
          "share of pairs with chosen reward > rejected",
          (Curve("train_accuracy", "train batch"), Curve("eval_accuracy", "eval set")),
          ylim=SHARE),
    Panel("margin", "Implicit-reward margin", "chosen - rejected (beta x log-ratio, nats)",
          (Curve("margin", "train batch"), Curve("eval_margin", "eval set"))),
    Panel("rewards", "Implicit rewards", "beta x log-ratio to the reference (nats)",
          (Curve("chosen_reward", "chosen, train batch"),
           Curve("rejected_reward", "rejected, train batch"),
           Curve("eval_chosen_reward", "chosen, eval set"),
           Curve("eval_rejected_reward", "rejected, eval set"))),
    Panel("logprob", "Answer log-probability (eval set)", "logprob per answer token (nats)",
          (Curve("eval_chosen_logprob", "chosen"), Curve("eval_rejected_logprob", "rejected"))),
    _lr(),
    Panel("throughput", "Throughput", "pairs per second (all ranks)",
          (Curve("pairs_per_s", "pairs/s"),)),
    Panel("grad_norm", "Gradient norm", "global L2 norm (before clipping)",
          (Curve("grad_norm", "gradient norm"),)),
)

_PPO = (
    Panel("reward", "Reward-model score (the proxy reward)", "reward-model score",
          (Curve("reward", "sampled answers, batch mean"), Curve("ema_reward", "EMA"))),
    Panel("true_reward", "True reward (--true-reward)", "true reward",
          (Curve("true_reward", "sampled answers, batch mean", smooth=10),
           Curve("greedy_true_reward", "greedy answers to held-out prompts"))),
    Panel("kl", "KL to the reference", "nats per answer (sum over its tokens)",
          (Curve("kl", "KL (batch mean)", smooth=10),)),
    Panel("kl_coef", "KL coefficient (adaptive)", "coefficient", (Curve("kl_coef", "kl_coef"),),
          only_if_varies=True),
    Panel("losses", "Losses", "loss (mean over mini-batches)",
          (Curve("actor_loss", "actor (policy)"), Curve("critic_loss", "critic (value)"),
           Curve("kl_loss", "KL term in the loss"),
           Curve("unsup_loss", "unsupervised", skip_if_constant=True))),
    Panel("answer_length", "Answer length", "tokens per answer (batch mean)",
          (Curve("answer_length", "sampled answers"),)),
    Panel("answer_quality", "Repetition and diversity", "share (0 to 1)",
          (Curve("repetition", "repeated trigrams"), Curve("distinct", "distinct-2"),
           Curve("eos_share", "ended with eos"),
           Curve("greedy_repetition", "greedy: repeated trigrams"),
           Curve("greedy_distinct", "greedy: distinct-2")), ylim=SHARE),
    Panel("clipfrac", "Clip fractions", "share of answer tokens clipped",
          (Curve("clipfrac", "policy ratio"), Curve("value_clipfrac", "value"),
           Curve("clipfrac_lower", "dual clip"))),
    Panel("approx_kl", "Policy change per update (approx. KL to the rollout policy)",
          "nats per token", (Curve("approx_kl", "approx KL"),)),
    Panel("entropy", "Policy entropy (answer tokens, training forward)", "nats per token",
          (Curve("entropy", "actor entropy"),)),
    Panel("reward_spread", "Reward spread", "std of reward-model scores",
          (Curve("reward_std", "over the batch"),
           Curve("group_reward_std", "within a prompt's answers"))),
    _lr("lr_actor"),
    Panel("generation_share", "Generation share", "share of wall time",
          (Curve("generation_share", "generating"),), ylim=SHARE),
    Panel("throughput", "Throughput", "tokens per second (padded, all ranks)",
          (Curve("tokens_per_s", "tokens/s"),)),
    Panel("grad_norm", "Gradient norms", "global L2 norm (before clipping)",
          (Curve("actor_grad_norm", "actor"), Curve("critic_grad_norm", "critic"))),
)

PANELS: dict[str, tuple[Panel, ...]] = {"sft": _SFT, "reward": _REWARD, "dpo": _DPO, "ppo": _PPO}

# the figure of each step the pipeline report shows beside the others
HEADLINE: dict[str, tuple[str, ...]] = {"sft": ("loss",), "reward": ("accuracy",),
                                        "dpo": ("accuracy", "margin"),
                                        "ppo": ("reward", "true_reward", "kl")}

XLABEL = {"ppo": "PPO step (prompt batches generated)"}


def xlabel(kind: str) -> str:
    return XLABEL.get(kind, "optimizer step")


def panels_for(kind: str, rows: list[dict]) -> tuple[Panel, ...]:
    """The step's panels; for a folder whose step is unknown, one panel per numeric key."""
    if kind in PANELS:
        return PANELS[kind]
    skip = {"step", "time", "epoch"}
    keys = sorted({k for r in rows for k, v in r.items()
                   if k not in skip and number(v) is not None})
    return tuple(Panel(k, k, k, (Curve(k, k),)) for k in keys)


def trailing_mean(values: list[float], n: int) -> list[float]:
    """Each value's mean with the up to n - 1 values before it: [1, 3, 5], n=2 -> [1, 2, 4]."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= n:
            total -= values[i - n]
        out.append(total / min(i + 1, n))
    return out


@dataclass
class Drawn:
    """A panel's data: [(label, steps, values)] for the curves the run logged."""
    panel: Panel
    curves: list[tuple[str, list[int], list[float]]]


def panel_data(panel: Panel, rows: list[dict]) -> Drawn | None:
    """The panel's curves from the rows; None when it has nothing to draw."""
    curves = []
    for c in panel.curves:
        xs, ys = [], []
        for r in rows:
            y = c.of(r)
            if y is not None and isinstance(r.get("step"), int):
                xs.append(r["step"])
                ys.append(y)
        if not ys or (c.skip_if_constant and max(ys) == min(ys)):
            continue
        curves.append((c.label, xs, ys))
        if c.smooth and len(ys) >= 2 * c.smooth:
            curves.append((f"{c.label}: mean of the last {c.smooth}", xs,
                           trailing_mean(ys, c.smooth)))
    if not curves:
        return None
    if panel.only_if_varies and all(max(ys) == min(ys) for _, _, ys in curves):
        return None
    return Drawn(panel, curves)
