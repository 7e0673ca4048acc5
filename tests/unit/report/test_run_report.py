"""A run's report.html and report/*.png: built from the folder's files, holding the run's numbers,
one self-contained page, written atomically, for a finished run and for one still going."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image

from dschat_cli.report import ReportError, read_run, write_report_quietly, write_run_report
from dschat_cli.report.html import fmt
from dschat_cli.report.records import step_kind

EXPECTED_PANELS = {
    "sft": {"loss", "perplexity", "lr", "throughput"},
    "reward": {"loss", "accuracy", "scores", "margin", "lr", "throughput"},
    "dpo": {"loss", "accuracy", "margin", "rewards", "logprob", "lr", "throughput", "grad_norm"},
    "ppo": {"reward", "true_reward", "kl", "losses", "answer_length", "answer_quality",
            "clipfrac", "approx_kl", "reward_spread", "lr", "generation_share", "throughput"},
}


def colours(png: bytes) -> int:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    return len(img.getcolors(maxcolors=1 << 24))


def embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


@pytest.mark.parametrize("kind", sorted(EXPECTED_PANELS))
def test_report_has_the_steps_plots_and_numbers(kind, run_folder):
    out = run_folder(kind)
    r = write_run_report(out)
    html = (out / "report.html").read_text()
    pngs = {p.stem: p.read_bytes() for p in (out / "report").glob("*.png")}
    assert set(pngs) == EXPECTED_PANELS[kind]
    assert r.record.kind == kind and len(r.figures) == len(pngs)
    for name, png in pngs.items():
        img = Image.open(io.BytesIO(png))
        assert img.format == "PNG" and img.size == (640, 360), name
        assert colours(png) > 20, f"{name}.png is (nearly) one colour"
    # self-contained: the same PNGs inline, nothing fetched from elsewhere
    assert sorted(embedded_pngs(html)) == sorted(pngs.values())
    assert not re.search(r'(src|href)="(http|//|report/)', html)
    # the run's numbers: the last value of every metric, the config, the status
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = {k: v for r in rows for k, v in r.items() if isinstance(v, float) and k != "time"}
    for key, value in last.items():
        assert fmt(value) in html, (key, value)
    assert "status: <span class=\"status-completed\">completed</span>" in html
    assert "output_dir: " in html and "Run config" in html
    assert not list(out.glob(".*tmp*")) and not list((out / "report").glob(".*tmp*"))


def test_ppo_key_figures_samples_and_health(run_folder):
    out = run_folder("ppo")
    html = write_run_report(out).html_path.read_text()
    s = json.loads((out / "train_summary.json").read_text())
    # key figures: held-out reward and true reward, start and end; the final batch reward
    for v in (s["reward_heldout_start"], s["reward_heldout_end"], s["true_reward_heldout_end"],
              s["last"]["reward"], s["last"]["kl"]):
        assert f'<td class="num">{fmt(v)}</td>' in html, v
    # the sample answers, before and after, escaped (a prompt's <b> is text, not markup)
    assert "Human: how do I &lt;b&gt;bold&lt;/b&gt; &amp; co? Assistant:" in html
    assert "Use the &lt;b&gt; tag." in html and "<b>" not in html
    assert "(empty)" in html and fmt(2.5) in html
    # the anomaly the health monitor logged
    assert "KL to the reference is 9 (above 5)" in html
    # a value logged as "nan" is no point of the curve, never a crash
    assert "critic_loss" in html


def test_a_run_still_going_gets_a_report_from_its_metrics(run_folder):
    out = run_folder("sft", finished=False, steps=5)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "time": 1.0, "lo')  # the line being written right now
    r = write_run_report(out)
    html = r.html_path.read_text()
    assert r.record.summary is None and "running (no train_summary.json yet)" in html
    assert "up to step 5" in html and "Key figures" not in html
    assert {p.stem for p in (out / "report").glob("*.png")} == EXPECTED_PANELS["sft"]
    assert "No sample answers recorded" in html


def test_missing_keys_draw_no_curve(run_folder):
    """A critic-free run without --true-reward: no critic or true-reward curves, no crash."""
    rows = [{"step": s, "time": 0.0, "actor_loss": 0.1, "reward": 0.1 * s, "kl": 0.01 * s}
            for s in range(1, 5)]
    out = run_folder("ppo", rows=rows, finished=False)
    write_run_report(out)
    assert {p.stem for p in (out / "report").glob("*.png")} == {"reward", "kl", "losses"}


def test_a_panel_gone_from_the_run_loses_its_png_and_files_are_replaced(run_folder):
    out = run_folder("sft")
    write_run_report(out)
    (out / "report" / "old_panel.png").write_bytes(b"stale")
    before = (out / "report.html").stat().st_ino
    write_run_report(out)
    assert not (out / "report" / "old_panel.png").exists()
    assert (out / "report.html").stat().st_ino != before  # a new file renamed over the old one


def test_step_kind_from_resolved_then_config_then_metrics(run_folder):
    for kind in ("sft", "reward", "dpo", "ppo"):
        out = run_folder(kind, name=f"noresolved-{kind}", resolved=False)
        assert read_run(out).kind == kind
    bare = run_folder("dpo", name="bare", resolved=False)
    (bare / "run_config.yaml").unlink()
    assert step_kind(bare, "", read_run(bare).rows) == "dpo"


def test_unknown_step_plots_every_numeric_key(run_folder, tmp_path):
    out = tmp_path / "odd"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "time": 0, "foo": 1.5}\n'
                                       '{"step": 2, "time": 0, "foo": 2.5, "bar": "x"}\n')
    r = write_run_report(out)
    assert r.record.kind == "" and [p.name for p, _ in r.figures] == ["foo"]


def test_bad_folders_name_the_argument(tmp_path):
    with pytest.raises(ReportError) as e:
        write_run_report(tmp_path / "nope")
    assert e.value.where == "RUN_DIR" and "no such folder" in e.value.message
    with pytest.raises(ReportError) as e:
        write_run_report(tmp_path)
    assert "has no metrics.jsonl" in e.value.message
    (tmp_path / "f").write_text("x")
    with pytest.raises(ReportError, match="is a file"):
        write_run_report(tmp_path / "f")
    assert not (tmp_path / "report.html").exists()


def test_write_report_quietly_warns_in_one_line_and_returns_none(run_folder, monkeypatch,
                                                                 capsys):
    from dschat_cli.report import render
    from dschat_cli.ui import console as ui

    out = run_folder("reward")
    monkeypatch.setattr(ui.err_console, "_width", 500)

    def broken(*a, **k):
        raise OSError("No space left on device\nsecond line")
    monkeypatch.setattr(render, "render_png", broken)
    assert write_report_quietly(out) is None
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("warning: report not written")
    assert "OSError: No space left on device" in err and f"dschat report {out}" in err
    assert not (out / "report.html").exists()
    # a folder without metrics (not rank 0's) is no failure: nothing written, nothing said
    assert write_report_quietly(out / "empty") is None and capsys.readouterr().err == ""


def test_reading_the_folder_does_not_import_matplotlib():
    import subprocess
    import sys

    code = ("import sys, dschat_cli.report, dschat_cli.cli.report; "
            "print('matplotlib' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr


def test_trailing_mean_and_smoothed_curves_of_noisy_step3_figures():
    from dschat_cli.report.panels import PANELS, panel_data, trailing_mean

    # window 2: [1], [1, 3], [3, 5], [5, 7] -> 1, 2, 4, 6
    assert trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    kl = next(p for p in PANELS["ppo"] if p.name == "kl")
    rows = [{"step": s, "kl": float(s % 2)} for s in range(1, 21)]  # 1, 0, 1, 0, ...
    drawn = panel_data(kl, rows)
    labels = [label for label, _, _ in drawn.curves]
    assert labels == ["KL (batch mean)", "KL (batch mean): mean of the last 10"]
    assert drawn.curves[1][2][-1] == 0.5 and drawn.curves[1][2][0] == 1.0
    assert len(panel_data(kl, rows[:19]).curves) == 1  # fewer than 2 windows: no mean drawn
