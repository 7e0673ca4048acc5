"""Run folders as the training steps leave them (metrics.jsonl, train_summary.json,
run_config.yaml, resolved.json), written from hand-made rows: the report tests need no training.

    run_folder("ppo")                          # TMP/out: a finished step-3 run, 12 PPO steps
    run_folder("sft", finished=False)          # still going: no train_summary.json
    make_run(path, "reward")                   # the same, in a folder of the test's choice
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

PROMPT = "Human: how do I <b>bold</b> & co? Assistant:"  # escaped in the HTML, never markup


def rows_for(kind: str, steps: int) -> list[dict]:
    rows: list[dict] = []
    t = 1_700_000_000.0
    if kind == "sft":
        rows.append({"step": 0, "time": t, "eval_loss": 6.2, "eval_ppl": math.exp(6.2)})
        for s in range(1, steps + 1):
            rows.append({"step": s, "time": t + s, "epoch": 1, "loss": 6.0 - 0.1 * s,
                         "lr": 1e-3 * (1 - s / steps), "tokens_per_s": 20000.0 + 10 * s,
                         "tflops_per_gpu": 0.02})
        rows.append({"step": steps, "time": t + steps, "eval_loss": 5.1, "eval_ppl": math.exp(5.1)})
    elif kind == "reward":
        rows.append({"step": 0, "time": t, "eval_chosen": 0.1, "eval_rejected": 0.0,
                     "eval_accuracy": 0.6})
        for s in range(1, steps + 1):
            rows.append({"step": s, "time": t + s, "epoch": 1, "loss": 0.7 / s,
                         "train_accuracy": min(1.0, 0.5 + 0.05 * s), "lr": 1e-3,
                         "pairs_per_s": 400.0, "tokens_per_s": 40000.0})
        rows.append({"step": steps, "time": t + steps, "eval_chosen": 3.3, "eval_rejected": -3.1,
                     "eval_accuracy": 0.96875})
    elif kind == "dpo":
        rows.append({"step": 0, "time": t, "eval_loss": 0.693, "eval_accuracy": 0.5,
                     "eval_chosen_reward": 0.0, "eval_rejected_reward": 0.0, "eval_margin": 0.0,
                     "eval_chosen_logprob": -6.2, "eval_rejected_logprob": -6.2})
        for s in range(1, steps + 1):
            rows.append({"step": s, "time": t + s, "epoch": 1, "loss": 0.69 - 0.02 * s,
                         "train_accuracy": 0.9, "chosen_reward": 0.05 * s,
                         "rejected_reward": -0.03 * s, "margin": 0.08 * s, "lr": 5e-5,
                         "pairs_per_s": 150.0, "tokens_per_s": 15000.0, "grad_norm": 0.2})
        rows.append({"step": steps, "time": t + steps, "eval_loss": 0.45, "eval_accuracy": 1.0,
                     "eval_chosen_reward": 0.3, "eval_rejected_reward": -0.2, "eval_margin": 0.5,
                     "eval_chosen_logprob": -6.1, "eval_rejected_logprob": -6.4})
    elif kind == "ppo":
        for s in range(1, steps + 1):
            rows.append({"step": s, "time": t + s, "epoch": 1, "actor_loss": -0.3 + 0.01 * s,
                         "critic_loss": 2.0 / s, "unsup_loss": 0.0, "reward": -0.5 + 0.1 * s,
                         "kl": 0.01 * s, "answer_length": 8.0 + s, "clipfrac": 0.01 * s,
                         "value_clipfrac": 0.2, "approx_kl": 0.001, "advantage_mean": 0.1,
                         "return_mean": 0.2, "minibatches": 2, "kl_coef": 0.1,
                         "repetition": 0.05, "distinct": 0.9, "eos_share": 0.5,
                         "true_reward": 0.7 + 0.01 * s, "ema_reward": -0.5 + 0.05 * s,
                         "reward_std": 1.0, "seconds": 0.07, "generation_share": 0.25,
                         "samples_per_s": 55.0, "tokens_per_s": 1600.0 + s,
                         "lr_actor": 1e-4 * (1 - s / steps)})
        rows[3]["anomaly"] = {"step_name": "ppo", "global_step": 4, "kind": "kl",
                              "figure": "KL to the reference", "value": 9.0, "action": "warn",
                              "message": "KL to the reference is 9 (above 5); lower the lr"}
        rows[5]["critic_loss"] = "nan"  # how MetricsLog writes a non-finite value
    return rows


def summary_for(kind: str, rows: list[dict], steps: int) -> dict:
    common = {"steps": steps, "seconds": 12.5, "world_size": 1, "status": "completed"}
    if kind == "sft":
        return {**common, "eval_loss_start": 6.2, "eval_loss_end": 5.1,
                "eval_ppl_start": math.exp(6.2), "eval_ppl_end": math.exp(5.1),
                "train_loss_first": rows[1]["loss"], "train_loss_last": rows[-2]["loss"],
                "tokens_per_s": 20100.0}
    if kind == "reward":
        return {**common, "eval_start": {"chosen": 0.1, "rejected": 0.0, "accuracy": 0.6},
                "eval_end": {"chosen": 3.3, "rejected": -3.1, "accuracy": 0.96875},
                "train_loss_first": 0.7, "train_loss_last": 0.7 / steps, "pairs_per_s": 400.0}
    samples = [{"prompt": PROMPT, "answer": "!!!!", "reward": 0.25},
               {"prompt": "Human: another? Assistant:", "answer": "", "reward": -1.0}]
    after = [{"prompt": PROMPT, "answer": "Use the <b> tag.", "reward": 2.5},
             {"prompt": "Human: another? Assistant:", "answer": "Yes.", "reward": 1.5}]
    if kind == "dpo":  # with --true-reward: held-out answers before and after
        return {**common, "eval_accuracy_start": 0.5, "eval_accuracy_end": 1.0,
                "eval_loss_start": 0.693, "eval_loss_end": 0.45, "eval_margin_start": 0.0,
                "eval_margin_end": 0.5, "true_reward_heldout_start": 0.698,
                "true_reward_heldout_end": 0.764, "samples_start": samples,
                "samples_end": after}
    return {**common, "reward_heldout_start": 0.7043, "reward_heldout_end": 1.2345,
            "true_reward_heldout_start": 0.71, "true_reward_heldout_end": 0.8,
            "samples_start": samples, "samples_end": after, "first": rows[0], "last": rows[-1],
            "generation_seconds": 3.0}


CONFIGS = {"sft": "model:\n  model: tiny\noptim:\n  learning_rate: 0.001\n",
           "reward": "model:\n  model: tiny\nloss: last-token\n",
           "dpo": "model:\n  model: tiny\ndpo:\n  beta: 0.1\n",
           "ppo": "actor:\n  model: sft\nppo:\n  kl_ctl: 0.1\n"}


def write_run(out: Path, kind: str, *, steps: int = 12, finished: bool = True,
             resolved: bool = True, rows: list[dict] | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rows = rows_for(kind, steps) if rows is None else rows
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "run_config.yaml").write_text(CONFIGS[kind] + f"output_dir: {out}\n")
    if resolved:
        (out / "resolved.json").write_text(json.dumps({"step": kind, "output_dir": str(out)}))
    if finished:
        (out / "train_summary.json").write_text(json.dumps(summary_for(kind, rows, steps)))
    return out


@pytest.fixture
def run_folder(tmp_path):
    def make(kind: str, name: str = "out", **kw) -> Path:
        return write_run(tmp_path / name, kind, **kw)
    return make


@pytest.fixture
def make_run():
    return write_run
