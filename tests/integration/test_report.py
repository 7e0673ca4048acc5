"""A real training run leaves its report, and the report renders in a browser.

    dschat sft ... --output-dir OUT        -> OUT/report.html, OUT/report/*.png
    chromium --headless --screenshot=shot.png file://OUT/report.html

The run is the session's shared in-process SFT run (test_sft.py trains the same one), so this
module adds no training. The screenshot test needs a chromium binary: `.ci/run` installs Debian's
`chromium` when it is missing; without one the test is skipped, saying so.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess

import pytest

from dschat_cli.report.html import fmt

WINDOW = (1280, 1600)


@pytest.fixture(scope="module")
def sft_out(sft_run):
    result, out = sft_run("opt", 0, 8)
    assert result.code == 0, result.explain()
    return out


def test_a_finished_run_has_its_report(sft_out, invoke_dschat):
    from PIL import Image

    html = (sft_out / "report.html").read_text()
    summary = json.loads((sft_out / "train_summary.json").read_text())
    pngs = {p.stem: p for p in (sft_out / "report").glob("*.png")}
    assert {"loss", "perplexity", "lr", "throughput"} <= set(pngs)
    for p in pngs.values():
        img = Image.open(p).convert("RGB")
        assert len(img.getcolors(1 << 24)) > 20, p.name
    assert "status-completed" in html
    for key in ("eval_loss_start", "eval_loss_end", "eval_ppl_end", "train_loss_last"):
        assert fmt(summary[key]) in html, key
    assert f"steps</td><td class=\"num\">-</td><td class=\"num\">{summary['steps']}</td>" in html
    # and `dschat report` rebuilds the same page from the files
    r = invoke_dschat("report", sft_out)
    assert r.code == 0 and "sft report written to" in r.output, r.explain()
    assert {p.stem for p in (sft_out / "report").glob("*.png")} == set(pngs)


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(chromium() is None, reason="no chromium binary on PATH (.ci/run installs "
                                                 "Debian's `chromium`; apt-get install chromium)")
def test_the_report_renders_in_headless_chromium(sft_out, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    cmd = [chromium(), "--headless", "--disable-gpu", "--hide-scrollbars",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}",
           (sft_out / "report.html").resolve().as_uri()]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # chromium refuses to run as root with its sandbox
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    assert img.size == WINDOW
    # not blank: the plots' lines, text and anti-aliasing give thousands of colours, and a
    # fair share of the page is not white (a blank or error page has a handful)
    assert len(img.getcolors(1 << 24)) > 500
    import numpy as np

    inked = float((np.asarray(img, dtype=np.int32).sum(-1) < 720).mean())
    assert inked > 0.03, inked
