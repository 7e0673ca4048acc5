"""`dschat report RUN_DIR`: rebuilds a run's report (also one still going) or a pipeline's; bad
input is one line naming RUN_DIR, exit code 2, nothing written. And the training steps' hooks:
the end-of-run summary and every checkpoint write the report."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dschat_cli.cli.app import app


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], terminal_width=300)


def test_report_of_a_run_and_of_a_run_still_going(run_folder):
    out = run_folder("dpo")
    r = invoke("report", out)
    assert r.exit_code == 0, r.output
    assert f"dpo report written to {out / 'report.html'} (8 plots" in r.output
    going = run_folder("sft", name="going", finished=False)
    r = invoke("report", going)
    assert r.exit_code == 0 and "run still going" in r.output
    assert (going / "report.html").is_file()


def test_report_of_a_pipeline_folder(run_folder, tmp_path):
    run_folder("sft", name="demo/actor-models/tiny")
    r = invoke("report", tmp_path / "demo")
    assert r.exit_code == 0, r.output
    assert "pipeline report written to" in r.output
    assert (tmp_path / "demo" / "report.html").is_file()
    assert (tmp_path / "demo" / "actor-models" / "tiny" / "report.html").is_file()


@pytest.mark.parametrize("case, message", [
    ("missing", "error: RUN_DIR: no such folder: "),
    ("empty", "has no metrics.jsonl: give the --output-dir of a dschat"),
    ("file", "is a file, not a run folder"),
])
def test_bad_run_dir_is_one_line_and_exit_2(case, message, tmp_path):
    target = {"missing": tmp_path / "nope", "empty": tmp_path / "empty",
              "file": tmp_path / "file.txt"}[case]
    if case == "empty":
        target.mkdir()
    if case == "file":
        target.write_text("x")
    before = sorted(tmp_path.rglob("*"))
    r = invoke("report", target)
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: RUN_DIR: ") and message in lines[0]
    assert "Traceback" not in r.output and sorted(tmp_path.rglob("*")) == before


def test_write_summary_json_writes_the_report(run_folder):
    from dschat_cli.steps.common import write_summary_json

    out = run_folder("reward", finished=False)
    write_summary_json(out, {"steps": 12, "status": "completed", "eval_end": {"accuracy": 0.9},
                             "bad": float("nan")})
    assert json.loads((out / "train_summary.json").read_text())["bad"] is None
    html = (out / "report.html").read_text()
    assert "status-completed" in html and "Key figures" in html and "0.9000" in html


def test_each_checkpoint_writes_the_report_and_a_failure_never_stops_training(
        run_folder, monkeypatch, capsys):
    from pathlib import Path

    from dschat_cli.config.schema import from_flags
    from dschat_cli.config.sft import SFTConfig
    from dschat_cli.dist import Dist
    from dschat_cli.report import render
    from dschat_cli.steps.checkpoint import CheckpointManager

    class Engine:
        def save_checkpoint(self, save_dir, tag, save_latest):
            (Path(save_dir) / tag).mkdir(parents=True)

    out = run_folder("sft", finished=False, steps=4)
    cfg = from_flags(SFTConfig, model="m", output_dir=str(out), save_interval=2)
    ckpt = CheckpointManager(cfg, Dist(rank=0, local_rank=0, world_size=1, device="cpu"), out)
    metrics = ckpt.metrics_log(out / "metrics.jsonl", None, None)  # a fresh run: truncated
    for step in (1, 2):
        metrics.log(step, loss=2.0 / step, lr=1e-3)
    ckpt.save(2, {"model": Engine()}, {})
    html = (out / "report.html").read_text()
    assert "up to step 2" in html and "running (no train_summary.json yet)" in html

    def broken(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(render, "render_png", broken)
    metrics.log(4, loss=0.5, lr=1e-3)
    folder = ckpt.save(4, {"model": Engine()}, {})  # no exception
    metrics.close()
    assert ckpt.latest() == folder
    assert "warning: report not written" in capsys.readouterr().err
    assert "up to step 2" in (out / "report.html").read_text()  # the last good one is kept
