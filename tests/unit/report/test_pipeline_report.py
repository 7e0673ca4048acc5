"""The pipeline's report: the steps with links to their own reports, their headline curves, and
step 3's answers before and after, from OUT/summary.json and the step folders."""

from __future__ import annotations

import base64
import json
import re

from dschat_cli.report import is_pipeline_root, write_pipeline_report


def pipeline_root(tmp_path, make_run, with_summary: bool = True):
    root = tmp_path / "demo"
    sft = make_run(root / "actor-models" / "tiny", "sft")
    reward = make_run(root / "reward-models" / "tiny", "reward")
    ppo = make_run(root / "step3-models" / "tiny", "ppo")
    if with_summary:
        s = json.loads((ppo / "train_summary.json").read_text())
        rows = [{"step": 1, "name": "sft", "status": "ran", "seconds": 30.0,
                 "metrics": {"eval_ppl_start": 500.0, "eval_ppl_end": 160.0}},
                {"step": 2, "name": "reward", "status": "done earlier", "seconds": 20.0,
                 "metrics": {"accuracy_end": 0.97}},
                {"step": 3, "name": "ppo", "status": "ran", "seconds": 150.0,
                 "metrics": {k: s[k] for k in ("samples_start", "samples_end")}}]
        (root / "summary.json").write_text(json.dumps({"actor": "tiny", "reward": "tiny",
                                                       "total_seconds": 200.0, "steps": rows}))
    return root, sft, reward, ppo


def test_links_each_steps_report_with_headline_curves_and_answers(tmp_path, make_run):
    root, sft, reward, ppo = pipeline_root(tmp_path, make_run)
    assert is_pipeline_root(root) and not is_pipeline_root(sft)
    path = write_pipeline_report(root)
    html = path.read_text()
    assert path == root / "report.html"
    for d in (sft, reward, ppo):  # each step's own report, written and linked relatively
        assert (d / "report.html").is_file()
        rel = d.relative_to(root).as_posix() + "/report.html"
        assert f'href="{rel}"' in html
    # headline curves: sft loss, reward accuracy, step 3's reward, true reward and KL
    pngs = sorted(p.name for p in (root / "report").glob("*.png"))
    assert pngs == ["step1-sft-0.png", "step2-reward-0.png", "step3-ppo-0.png",
                    "step3-ppo-1.png", "step3-ppo-2.png"]
    inline = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert sorted(base64.b64decode(b) for b in inline) == \
        sorted((root / "report" / n).read_bytes() for n in pngs)
    for title in ("True reward", "KL to the reference", "Reward-model score"):
        assert f"step 3 (ppo): {title}" in html
    # status, time, key figures and the answers before and after step 3
    assert "done earlier" in html and "2.5 min" in html and "total time 3.3 min" in html
    assert "held-out reward-model score 0.7043 -&gt; 1.2345" in html
    assert "before (step-1 model)" in html and "Use the &lt;b&gt; tag." in html


def test_a_dpo_pipeline(tmp_path, make_run):
    root = tmp_path / "dpo-demo"
    make_run(root / "actor-models" / "tiny", "sft")
    dpo = make_run(root / "dpo-models" / "tiny", "dpo")
    rows = [{"step": 1, "name": "sft", "status": "ran", "seconds": 3.0, "metrics": {}},
            {"step": 2, "name": "dpo", "status": "ran", "seconds": 27.0, "metrics": {}}]
    (root / "summary.json").write_text(json.dumps({"method": "dpo", "actor": "tiny",
                                                   "total_seconds": 30.0, "steps": rows}))
    assert is_pipeline_root(root)
    html = write_pipeline_report(root).read_text()
    assert "dschat pipeline report (dpo)" in html and "reward model:" not in html
    assert 'href="dpo-models/tiny/report.html"' in html and (dpo / "report.html").is_file()
    assert "before and after step 2 (dpo)" in html and "Use the &lt;b&gt; tag." in html
    dpo_html = (dpo / "report.html").read_text()
    assert ("<td>held-out true reward</td><td class=\"num\">0.6980</td>"
            "<td class=\"num\">0.7640</td>") in dpo_html
    assert sorted(p.name for p in (root / "report").glob("*.png")) == \
        ["step1-sft-0.png", "step2-dpo-0.png", "step2-dpo-1.png"]
    # before summary.json exists, the folders say which method it is
    (root / "summary.json").unlink()
    assert "dschat pipeline report (dpo)" in write_pipeline_report(root).read_text()


def test_up_to_date_step_reports_are_reused_and_rebuild_redraws(tmp_path, make_run):
    root, sft, _, _ = pipeline_root(tmp_path, make_run)
    write_pipeline_report(root)
    mtime = (sft / "report.html").stat().st_mtime_ns
    write_pipeline_report(root)
    assert (sft / "report.html").stat().st_mtime_ns == mtime
    write_pipeline_report(root, rebuild=True)
    assert (sft / "report.html").stat().st_mtime_ns != mtime


def test_a_pipeline_in_its_first_step_and_given_step_folders(tmp_path, make_run):
    root, sft, reward, ppo = pipeline_root(tmp_path, make_run, with_summary=False)
    (sft / "train_summary.json").unlink()  # step 1 still going
    other = make_run(tmp_path / "elsewhere", "ppo")
    html = write_pipeline_report(root, {"ppo": other}).read_text()
    assert "no summary.json yet" in html and "running (no train_summary.json yet)" in html
    assert (other / "report.html").is_file() and not (ppo / "report.html").exists()
    assert str((other / "report.html").resolve()) in html


def test_a_step_whose_report_fails_is_named_and_the_page_still_written(tmp_path, make_run, monkeypatch):
    from dschat_cli.report import render

    root, *_ = pipeline_root(tmp_path, make_run)

    def broken(*a, **k):
        raise ValueError("cannot draw")
    monkeypatch.setattr(render, "render_png", broken)
    html = write_pipeline_report(root).read_text()
    assert html.count("ValueError: cannot draw") == 3
