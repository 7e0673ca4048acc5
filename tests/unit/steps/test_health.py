"""The health monitor's rules on hand-made metric sequences, and what stop / warn do.

    python -m pytest -q tests/unit/steps/test_health.py
"""

from __future__ import annotations

import io
import json
import math
import random

import pytest
from rich.console import Console

from dschat_cli.config.ppo import PPOHealthOptions
from dschat_cli.config.sections import HealthOptions
from dschat_cli.steps.health import (BASELINE_STEPS, FP16_OVERFLOW_STREAK, HealthMonitor,
                                     TrainingAnomaly, resolve_max_kl)
from dschat_cli.ui.metrics import MetricsLog, read_metrics

NAN, INF = float("nan"), float("inf")


def ppo_monitor(**opts) -> HealthMonitor:
    o = PPOHealthOptions(**opts)
    return HealthMonitor("ppo", o, dtype="bf16", max_kl=resolve_max_kl(o.max_kl, 0.1, 5.0),
                         max_answer_seq_len=256,
                         lr_flags={"actor loss": "--actor-learning-rate"})


def ppo_step(m: HealthMonitor, step: int, **figures) -> list:
    """One healthy PPO step unless `figures` says otherwise."""
    f = dict(kl=5.0, answer_length=40.0, ema_reward=0.0, reward_spread=1.0)
    f.update(figures)
    return m.check(step, losses={"actor loss": 0.1, "critic loss": 0.2},
                   grad_norms={"actor gradient norm": [1.0]}, **f)


# --- NaN / inf --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_loss_is_an_anomaly_at_once(bad):
    m = HealthMonitor("sft", HealthOptions(), dtype="bf16")
    assert m.check(1, losses={"loss": 2.3}) == []
    assert m.check(2, losses={"loss": 2.1}) == []
    [a] = m.check(3, losses={"loss": bad})
    assert (a.kind, a.step_name, a.global_step) == ("loss", "sft", 3)
    msg = a.message()
    assert msg.startswith(f"sft step 3: loss is {bad} (must be finite); lower --learning-rate")


def test_advice_names_the_step_flags_and_fp16():
    m = ppo_monitor()
    [a] = m.check(4, losses={"actor loss": NAN, "critic loss": 0.3})
    assert a.message().startswith("ppo step 4: actor loss is nan")
    assert "lower --actor-learning-rate" in a.message()
    fp16 = HealthMonitor("reward", HealthOptions(), dtype="fp16")
    [a] = fp16.check(1, losses={"loss": INF})
    assert "use --dtype bf16" in a.advice, a.message()


def test_non_finite_grad_norm_is_an_anomaly_at_once_outside_fp16():
    m = HealthMonitor("reward", HealthOptions(), dtype="fp32")
    assert m.check(1, losses={"loss": 0.7}, grad_norms={"gradient norm": [3.0, 2.5]}) == []
    assert m.check(2, losses={"loss": 0.7}, grad_norms={"gradient norm": []}) == []
    [a] = m.check(3, losses={"loss": 0.7}, grad_norms={"gradient norm": [2.0, INF]})
    assert (a.kind, a.figure, a.global_step) == ("grad_norm", "gradient norm", 3)
    assert "gradient norm is inf (must be finite)" in a.message()


def test_fp16_tolerates_loss_scale_overflows_but_not_an_endless_run_of_them():
    m = HealthMonitor("sft", HealthOptions(), dtype="fp16")
    # the loss scaler's start: a few overflows, then clean steps; later an isolated overflow
    assert m.check(1, losses={"loss": 3.0}, grad_norms={"gradient norm": [INF] * 17}) == []
    assert m.check(2, losses={"loss": 3.0}, grad_norms={"gradient norm": [5.0, INF, 4.0]}) == []
    # an unbroken run: the 20th overflowing optimizer step in a row is the anomaly
    assert m.check(3, losses={"loss": 3.0},
                   grad_norms={"gradient norm": [INF] * (FP16_OVERFLOW_STREAK - 1)}) == []
    [a] = m.check(4, losses={"loss": 3.0}, grad_norms={"gradient norm": [NAN]})
    assert a.kind == "grad_norm" and f"{FP16_OVERFLOW_STREAK} optimizer steps in a row" in \
        a.threshold


# --- PPO: KL, answer length, reward collapse -------------------------------------------------------

def test_max_kl_default_is_where_the_penalty_outweighs_any_reward():
    assert resolve_max_kl(None, kl_ctl=0.1, clip_reward_value=5.0) == pytest.approx(100.0)
    assert resolve_max_kl(None, kl_ctl=0.02, clip_reward_value=5.0) == pytest.approx(500.0)
    assert resolve_max_kl(None, kl_ctl=0.0, clip_reward_value=5.0) is None  # no penalty: off
    assert resolve_max_kl(0.0, kl_ctl=0.1, clip_reward_value=5.0) is None  # 0 disables
    assert resolve_max_kl(30.0, kl_ctl=0.1, clip_reward_value=5.0) == 30.0


def test_kl_above_the_limit_for_patience_steps():
    m = ppo_monitor()  # limit 100, patience 3
    assert ppo_step(m, 1, kl=150.0) == [] and ppo_step(m, 2, kl=150.0) == []
    assert ppo_step(m, 3, kl=90.0) == []  # back under: the count restarts
    assert ppo_step(m, 4, kl=120.0) == [] and ppo_step(m, 5, kl=130.0) == []
    [a] = ppo_step(m, 6, kl=140.0)
    assert a.kind == "kl" and a.global_step == 6
    assert a.message() == ("ppo step 6: KL to the reference is 140 (above --max-kl 100 for 3 PPO "
                           "steps); raise --kl-ctl or lower --actor-learning-rate")
    assert ppo_step(m, 7, kl=150.0) == []  # reported once while it lasts
    derived = HealthMonitor("ppo", PPOHealthOptions(anomaly_patience=1), max_kl=100.0,
                            max_kl_note="the default, 2 x --clip-reward-value / --kl-ctl")
    [a] = ppo_step(derived, 1, kl=101.0)
    assert "(above --max-kl 100; the default, 2 x --clip-reward-value / --kl-ctl)" in a.message()


def test_answer_length_collapse_and_its_cap():
    m = ppo_monitor(anomaly_patience=2)
    assert ppo_step(m, 1, answer_length=1.5) == []
    [a] = ppo_step(m, 2, answer_length=0.0)
    assert a.kind == "answer_length"
    assert "mean answer length (tokens) is 0 (below --min-answer-length 2 for 2 PPO steps)" in \
        a.message()
    # answers of at most 2 tokens by design: the limit is capped at 1 token
    short = HealthMonitor("ppo", PPOHealthOptions(anomaly_patience=1), max_answer_seq_len=2)
    assert ppo_step(short, 1, answer_length=1.5) == []
    assert [a.kind for a in ppo_step(short, 2, answer_length=0.5)] == ["answer_length"]
    off = HealthMonitor("ppo", PPOHealthOptions(min_answer_length=0, anomaly_patience=1))
    assert ppo_step(off, 1, answer_length=0.0) == []


def noisy_run(steps: int, seed: int, batch: int = 16):
    """A healthy PPO run: the mean reward climbs from 0 to 1.5 with batch noise (reward spread
    1.0, so a batch mean varies by 1/sqrt(batch)); KL grows to ~30 nats; answers of ~40 tokens."""
    rng = random.Random(seed)
    ema = None
    for t in range(1, steps + 1):
        reward = 1.5 * t / steps + rng.gauss(0, 1 / math.sqrt(batch))
        ema = reward if ema is None else 0.9 * ema + 0.1 * reward
        yield t, dict(kl=30.0 * t / steps + rng.gauss(0, 3), answer_length=40 + rng.gauss(0, 5),
                      ema_reward=ema, reward_spread=abs(1.0 + rng.gauss(0, 0.2)))


@pytest.mark.parametrize("seed", range(5))
def test_normal_noise_is_no_anomaly(seed):
    m = ppo_monitor(anomaly_patience=1)  # the strictest setting
    for t, figures in noisy_run(300, seed, batch=4):
        assert ppo_step(m, t, **figures) == [], (t, figures)


def test_ema_reward_falling_far_below_its_best_is_a_collapse():
    m = ppo_monitor()  # drop 2 x baseline spread, patience 3
    ema, found = None, []
    # baseline spread 0.5; reward climbs to 2.0 by step 20, then crashes to -2.0
    rewards = [0.1 * t for t in range(1, 21)] + [-2.0] * 30
    for t, r in enumerate(rewards, start=1):
        ema = r if ema is None else 0.9 * ema + 0.1 * r
        found += ppo_step(m, t, ema_reward=ema, reward_spread=0.5)
    [a] = found
    assert a.kind == "reward_drop" and a.global_step > 20
    # the EMA had fallen more than 2 x 0.5 below its best (reached at step 20) 3 steps before
    assert a.value < ema_at(rewards, 20) - 1.0
    assert "--reward-collapse-drop 2 x the baseline reward spread 0.5 for 3 PPO steps" in \
        a.message()
    assert "reward collapse" in a.advice


def ema_at(rewards: list[float], t: int) -> float:
    ema = None
    for r in rewards[:t]:
        ema = r if ema is None else 0.9 * ema + 0.1 * r
    return ema


def test_reward_spread_collapsing_to_zero_is_a_collapse():
    m = ppo_monitor(anomaly_patience=2)
    spreads = [1.0, 1.2, 0.8] + [0.9] * 5 + [0.01] * 4
    kinds = [(t, a.kind) for t, s in enumerate(spreads, start=1)
             for a in ppo_step(m, t, reward_spread=s)]
    assert kinds == [(10, "reward_spread")]


def test_reward_rules_need_a_baseline_spread():
    """No spread yet (one answer per step: nan) or a spread of 0: the reward rules stay off."""
    m = ppo_monitor(anomaly_patience=1)
    for t in range(1, 10):
        assert ppo_step(m, t, ema_reward=-t * 10.0, reward_spread=NAN) == []
    flat = ppo_monitor(anomaly_patience=1)
    for t in range(1, 10):
        assert ppo_step(flat, t, ema_reward=-t * 10.0, reward_spread=0.0) == []
    assert BASELINE_STEPS == 3


def test_reward_rules_can_be_disabled():
    m = ppo_monitor(anomaly_patience=1, reward_collapse_drop=0, reward_collapse_spread=0)
    for t, s in enumerate([1.0, 1.0, 1.0, 0.0, 0.0], start=1):
        assert ppo_step(m, t, ema_reward=-100.0 * t, reward_spread=s) == []


# --- stop and warn ----------------------------------------------------------------------------------

def test_stop_records_the_anomaly_writes_the_summary_and_raises(tmp_path):
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    kept = tmp_path / "checkpoints" / "step_000001"
    m = HealthMonitor("sft", HealthOptions(on_anomaly="stop"), summary_path=tmp_path /
                      "train_summary.json", last_checkpoint=lambda: kept)
    printer = Console(record=True, width=200)
    m.act(m.check(1, losses={"loss": 2.0}), metrics=metrics, printer=printer)
    metrics.log(2, loss=NAN)
    with pytest.raises(TrainingAnomaly) as e:
        m.act(m.check(2, losses={"loss": NAN}), metrics=metrics, printer=printer)
    assert e.value.anomaly.global_step == 2 and e.value.last_checkpoint == kept
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[-1]["step"] == 2 and rows[-1]["anomaly"]["kind"] == "loss"
    assert rows[-1]["anomaly"]["value"] == "nan" and rows[-1]["anomaly"]["action"] == "stop"
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["status"] == "stopped" and summary["steps"] == 2
    assert summary["model_saved"] is False and summary["last_checkpoint"] == str(kept)
    assert summary["anomaly"]["message"] == e.value.anomaly.message()
    assert printer.export_text() == ""  # the worker prints the one error line


def test_warn_prints_once_per_episode_and_continues(tmp_path):
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    m = HealthMonitor("reward", HealthOptions(on_anomaly="warn"),
                      summary_path=tmp_path / "train_summary.json")
    printer = Console(record=True, width=300)
    for step, loss in enumerate([0.7, NAN, NAN, NAN, 0.6, INF], start=1):
        m.act(m.check(step, losses={"loss": loss}), metrics=metrics, printer=printer)
    lines = [ln for ln in printer.export_text().splitlines() if ln]
    assert lines == [
        "warning: reward step 2: loss is nan (must be finite); lower --learning-rate (and keep "
        "--gradient-clipping on) (--on-anomaly warn: training continues)",
        "warning: reward step 6: loss is inf (must be finite); lower --learning-rate (and keep "
        "--gradient-clipping on) (--on-anomaly warn: training continues)"]
    assert [a["global_step"] for a in m.history] == [2, 6]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2, 6]
    assert not (tmp_path / "train_summary.json").exists()
    assert m.summary_rows() == [("anomalies (warned)", "loss at step 2; loss at step 6")]


# --- checkpoints ------------------------------------------------------------------------------------

def test_a_monitor_restored_from_its_state_continues_like_the_uninterrupted_one():
    """state_dict() goes through JSON into a checkpoint (after step 5 here); the resumed run's
    monitor must judge the following steps as the uninterrupted one does. The EMA reward peaked
    (3.0) and the baseline spread (0.5) was measured before the checkpoint, and the drop streak
    had begun: only with all three restored is step 6 a collapse. A fresh monitor would take the
    falling EMA for its best and 2.0 for the baseline spread, and would forget the KL anomaly
    warned at step 2."""
    figures = [dict(kl=150.0, ema_reward=1.0, reward_spread=0.5),
               dict(kl=150.0, ema_reward=2.0, reward_spread=0.5),
               dict(ema_reward=3.0, reward_spread=0.5), dict(ema_reward=3.0, reward_spread=0.5)] \
        + [dict(ema_reward=1.5 - 0.1 * t, reward_spread=2.0) for t in range(6)]
    quiet = dict(metrics=MetricsLog(None), printer=Console(file=io.StringIO()))

    def run(m: HealthMonitor, first: int, last: int) -> list[tuple[int, str]]:
        found = []
        for t in range(first, last + 1):
            anomalies = ppo_step(m, t, **figures[t - 1])
            m.act(anomalies, **quiet)
            found += [(t, a.kind) for a in anomalies]
        return found

    def monitor() -> HealthMonitor:
        return ppo_monitor(anomaly_patience=2, on_anomaly="warn")

    whole = monitor()
    assert run(whole, 1, 10) == [(2, "kl"), (6, "reward_drop")]
    before = monitor()
    run(before, 1, 5)
    saved = json.loads(json.dumps(before.state_dict(), allow_nan=False))  # plain JSON
    resumed, fresh = monitor(), monitor()
    resumed.load_state_dict(saved)
    assert run(resumed, 6, 10) == [(6, "reward_drop")]
    assert resumed.state_dict() == whole.state_dict()
    assert [a["kind"] for a in resumed.history] == ["kl", "reward_drop"]
    assert run(fresh, 6, 10) == []


# --- degenerate answers ---------------------------------------------------------------------------

def test_repetition_above_the_limit_for_patience_steps_is_an_anomaly():
    m = ppo_monitor(max_repetition=0.5, anomaly_patience=3)
    assert ppo_step(m, 1, repetition=0.02, distinct=0.8) == []
    assert ppo_step(m, 2, repetition=0.7, distinct=0.8) == []
    assert ppo_step(m, 3, repetition=0.9, distinct=0.8) == []
    [a] = ppo_step(m, 4, repetition=0.95, distinct=0.8)  # third step in a row above 0.5
    assert a.kind == "repetition" and a.global_step == 4
    assert "above --max-repetition 0.5 for 3 PPO steps" in a.message()
    assert "exploiting the reward model" in a.message()
    assert ppo_step(m, 5, repetition=0.95, distinct=0.8) == []  # reported once while it lasts


def test_diversity_collapse_against_its_baseline():
    m = ppo_monitor(diversity_collapse=0.3, anomaly_patience=2)
    for step, d in enumerate([0.8, 0.7, 0.9], start=1):  # baseline 0.8
        assert ppo_step(m, step, repetition=0.0, distinct=d) == []
    assert ppo_step(m, 4, repetition=0.0, distinct=0.25) == []  # below 0.24? no: 0.25 > 0.24
    assert ppo_step(m, 5, repetition=0.0, distinct=0.2) == []   # first below 0.3 x 0.8 = 0.24
    [a] = ppo_step(m, 6, repetition=0.0, distinct=0.1)
    assert a.kind == "diversity" and "below --diversity-collapse 0.3 x its baseline 0.8" \
        in a.message(), a.message()
    # the baseline is part of the state: a resumed monitor judges alike
    again = ppo_monitor(diversity_collapse=0.3, anomaly_patience=2)
    again.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert again._distinct_baseline == pytest.approx([0.8, 0.7, 0.9])


def test_zero_disables_the_answer_rules():
    m = ppo_monitor(max_repetition=0.0, diversity_collapse=0.0, anomaly_patience=1)
    for step in range(1, 8):
        assert ppo_step(m, step, repetition=1.0, distinct=0.01 if step > 3 else 0.9) == []


def test_greedy_repetition_counts_consecutive_checks_not_steps():
    """Greedy checks run every --greedy-check-interval steps; the steps between them (None) do
    not break the streak, a healthy check does."""
    m = ppo_monitor(max_repetition=0.5, anomaly_patience=2)
    assert ppo_step(m, 10, repetition=0.0, distinct=0.8, greedy_repetition=0.9) == []
    assert ppo_step(m, 11, repetition=0.0, distinct=0.8) == []  # no check this step
    assert ppo_step(m, 20, repetition=0.0, distinct=0.8, greedy_repetition=0.1) == []  # healthy
    assert ppo_step(m, 30, repetition=0.0, distinct=0.8, greedy_repetition=0.8) == []
    assert ppo_step(m, 35, repetition=0.0, distinct=0.8) == []
    [a] = ppo_step(m, 40, repetition=0.0, distinct=0.8, greedy_repetition=0.85)
    assert a.kind == "repetition" and a.global_step == 40
    assert "greedy answers to held-out prompts is 0.85" in a.message()
    assert "for 2 greedy checks in a row" in a.message() and "dschat chat" in a.message()
