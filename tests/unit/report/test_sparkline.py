"""Curves in one line of terminal text (the pipeline's summary shows step 3's reward and KL)."""

from __future__ import annotations

import json

from dschat_cli.report import metric_trend, sparkline, trend


def test_lowest_to_highest_block_and_gaps():
    # (v - 0) / (0.8 - 0) x 7 -> 0, 2.6, 0.9, 7 -> blocks 0, 3, 1, 7
    assert sparkline([0.0, 0.3, 0.1, 0.8]) == "▁▄▂█"
    assert sparkline([1, None, float("nan"), "nan", 2]) == "▁   █"
    assert sparkline([]) == "" and sparkline([None, None]) == "  "


def test_flat_series_at_mid_height_and_a_shared_scale():
    assert sparkline([5, 5, 5]) == "▄▄▄"
    assert sparkline([0.5], lo=0.0, hi=1.0) == "▅"  # 0.5 x 7 = 3.5 -> round half to even: 4
    assert sparkline([-1, 2], lo=0.0, hi=1.0) == "▁█"  # clamped to the given range


def test_width_averages_buckets():
    # 8 values into 4 buckets of 2: means 0.5, 2.5, 4.5, 6.5 -> 0, 7/3, 14/3, 7 -> 0, 2, 5, 7
    assert sparkline(range(8), width=4) == "▁▃▆█"
    assert len(sparkline(range(1000), width=24)) == 24
    assert sparkline([1, 2], width=10) == "▁█"  # never stretched


def test_trend_and_metric_trend(tmp_path):
    assert trend([0.12, None, 0.5, 0.8]) == "▁ ▅█ 0.12 -> 0.8"
    assert trend([None]) == ""
    rows = [{"step": s, "time": 0, "reward": s / 10, "kl": 0.01} for s in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert metric_trend(tmp_path, "reward") == "▁▃▆█ 0.1 -> 0.4"
    assert metric_trend(tmp_path, "kl", spec=".2f") == "▄▄▄▄ 0.01 -> 0.01"
    assert metric_trend(tmp_path, "true_reward") == ""
    assert metric_trend(tmp_path / "missing", "reward") == ""


def test_step_curves_show_the_steps_headline_figures_it_logged(tmp_path):
    from dschat_cli.report.sparkline import step_curves

    # step 3 without --true-reward: reward and KL, no true-reward line
    rows = [{"step": s, "time": 0, "reward": s / 10, "kl": 0.5 * s} for s in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert step_curves("ppo", tmp_path) == [("reward-model score", "▁▃▆█ 0.1 -> 0.4"),
                                            ("KL to the reference", "▁▃▆█ 0.5 -> 2")]
    assert step_curves("sft", tmp_path) == []  # no "loss" key
    assert step_curves("unknown", tmp_path) == [] and step_curves("ppo", tmp_path / "no") == []


def test_pipeline_summary_prints_and_writes_step3_curves(tmp_path, capsys):
    from dschat_cli.config.pipeline import PipelineConfig
    from dschat_cli.config.schema import from_flags
    from dschat_cli.pipeline import _summarise, plan_pipeline

    cfg = from_flags(PipelineConfig, output_dir=str(tmp_path))
    plans = plan_pipeline(cfg)
    ppo = plans[2]
    ppo.out.mkdir(parents=True)
    rows = [{"step": s, "time": 0, "reward": s / 10, "true_reward": 0.7 + s / 100, "kl": 0.5}
            for s in range(1, 5)]
    (ppo.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # step 1 did not run this time: an older run's metrics in its folder are not shown
    plans[0].out.mkdir(parents=True)
    (plans[0].out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    summary_rows = [{"step": 1, "name": "sft", "status": "not run", "seconds": None, "metrics": {}},
                    {"step": 3, "name": "ppo", "status": "ran", "seconds": 9.0, "metrics": {}}]
    _summarise(cfg, plans, summary_rows, 9.0, tmp_path)
    out = capsys.readouterr().out
    assert "curves over training" in out and "▁▃▆█ 0.71 -> 0.74" in out and "train loss" not in out
    md = (tmp_path / "summary.md").read_text()
    assert "step 3 (ppo)   reward-model score     ▁▃▆█ 0.1 -> 0.4" in md
    assert "step 3 (ppo)   KL to the reference    ▄▄▄▄ 0.5 -> 0.5" in md
