"""One run's report:  dschat report OUT   (and every training step, at each checkpoint and at the
end of the run)

    OUT/report.html        key figures, curves, sample answers, every metric's first/last/min/max,
                           health warnings, the run config; self-contained (PNGs inline)
    OUT/report/NAME.png    the same curves as files

Built from the folder's files only (records.py), so it works for a run that is still going.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dschat_cli.report import html as h
from dschat_cli.report.panels import Panel, panel_data, panels_for, xlabel
from dschat_cli.report.records import METRICS, RunRecord, number, read_run, write_atomic

REPORT = "report.html"
FIGURES = "report"  # OUT/report/NAME.png
TITLES = {"sft": "step 1, supervised fine-tuning", "reward": "step 2, reward model",
          "ppo": "step 3, RLHF", "dpo": "DPO"}


@dataclass
class RunReport:
    record: RunRecord
    figures: list[tuple[Panel, bytes]] = field(default_factory=list)  # (panel, PNG)
    key_rows: list[tuple[str, object, object]] = field(default_factory=list)  # label, start, end

    @property
    def html_path(self) -> Path:
        return self.record.folder / REPORT

    def png_path(self, panel: Panel) -> Path:
        return self.record.folder / FIGURES / f"{panel.name}.png"


def build_run_report(record: RunRecord) -> RunReport:
    """Draw the run's panels (matplotlib) and gather its key figures."""
    from dschat_cli.report.render import render_png

    report = RunReport(record, key_rows=key_figures(record))
    for panel in panels_for(record.kind, record.rows):
        drawn = panel_data(panel, record.rows)
        if drawn is not None:
            report.figures.append((panel, render_png(drawn, xlabel(record.kind))))
    return report


def write_run_report(folder: str | Path, where: str = "RUN_DIR") -> RunReport:
    """(Re)write FOLDER/report.html and FOLDER/report/*.png from the folder's files. Each file is
    replaced atomically; PNGs of panels this run no longer has are removed. ReportError (naming
    `where`) when the folder is not a run folder."""
    report = build_run_report(read_run(folder, where))
    save_figures(report.record.folder / FIGURES, [(p.name, png) for p, png in report.figures])
    write_atomic(report.html_path, run_html(report))
    return report


def save_figures(folder: Path, figures: list[tuple[str, bytes]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = set()
    for name, png in figures:
        write_atomic(folder / f"{name}.png", png)
        names.add(f"{name}.png")
    for old in folder.glob("*.png"):  # a panel the run no longer draws
        if old.name not in names:
            old.unlink(missing_ok=True)


def write_report_quietly(folder: str | Path) -> Path | None:
    """For the training steps: write the report, and on any failure print one warning line and
    carry on (a report must never stop training). Returns report.html's path, or None."""
    if not (Path(folder) / METRICS).is_file():  # nothing logged (e.g. not rank 0's folder)
        return None
    try:
        return write_run_report(folder).html_path
    except Exception as e:  # noqa: BLE001 - anything: matplotlib missing, a full disk, a bug
        from dschat_cli.ui.console import warn_line

        first = (str(e).splitlines() or [""])[0][:200]
        warn_line(f"report not written in {folder} ({type(e).__name__}: {first}); training goes "
                  f"on; rebuild it later with: dschat report {folder}")
        return None


# --- key figures ------------------------------------------------------------------------------

def _get(d: dict | None, *path):
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def key_figures(record: RunRecord) -> list[tuple[str, object, object]]:
    """(label, start, end) rows from train_summary.json, most telling first; [] while the run is
    going (the metrics table shows the figures logged so far)."""
    s = record.summary or {}
    if not s or s.get("status") != "completed":
        return []
    kind = record.kind
    rows: list[tuple[str, object, object]] = []
    if kind == "sft":
        rows = [("eval loss (nats per token)", s.get("eval_loss_start"), s.get("eval_loss_end")),
                ("eval perplexity", s.get("eval_ppl_start"), s.get("eval_ppl_end")),
                ("train loss (first -> last step)", s.get("train_loss_first"),
                 s.get("train_loss_last")),
                ("tokens per second", None, s.get("tokens_per_s"))]
    elif kind == "reward":
        a, b = s.get("eval_start"), s.get("eval_end")

        def margin(e):
            c, r = number(_get(e, "chosen")), number(_get(e, "rejected"))
            return None if c is None or r is None else c - r
        rows = [("eval accuracy (chosen > rejected)", _get(a, "accuracy"), _get(b, "accuracy")),
                ("eval chosen score", _get(a, "chosen"), _get(b, "chosen")),
                ("eval rejected score", _get(a, "rejected"), _get(b, "rejected")),
                ("eval margin (chosen - rejected)", margin(a), margin(b)),
                ("train loss (first -> last step)", s.get("train_loss_first"),
                 s.get("train_loss_last")),
                ("pairs per second", None, s.get("pairs_per_s"))]
    elif kind == "dpo":
        rows = [(f"eval {label}", s.get(f"eval_{k}_start"), s.get(f"eval_{k}_end"))
                for k, label in (("accuracy", "implicit-reward accuracy"), ("loss", "loss"),
                                 ("margin", "margin"), ("chosen_reward", "chosen reward"),
                                 ("rejected_reward", "rejected reward"),
                                 ("chosen_logprob", "chosen logprob per token"))]
        rows += [("held-out true reward", s.get("true_reward_heldout_start"),
                  s.get("true_reward_heldout_end")),
                 ("greedy answers: true reward", s.get("greedy_true_reward_start"),
                  s.get("greedy_true_reward_end")),
                 ("train loss (first -> last step)", s.get("train_loss_first"),
                  s.get("train_loss_last"))]
    elif kind == "ppo":
        first, last = s.get("first") or {}, s.get("last") or {}
        rows = [("held-out reward-model score", s.get("reward_heldout_start"),
                 s.get("reward_heldout_end")),
                ("held-out true reward", s.get("true_reward_heldout_start"),
                 s.get("true_reward_heldout_end")),
                ("KL to the reference (first -> last step)", first.get("kl"), last.get("kl")),
                ("batch reward (first -> last step)", first.get("reward"), last.get("reward")),
                ("batch true reward (first -> last step)", first.get("true_reward"),
                 last.get("true_reward")),
                ("greedy answers: true reward", s.get("greedy_true_reward_start"),
                 s.get("greedy_true_reward_end")),
                ("greedy answers: repeated trigrams", s.get("greedy_repetition_start"),
                 s.get("greedy_repetition_end")),
                ("greedy answers: distinct-2", s.get("greedy_distinct_start"),
                 s.get("greedy_distinct_end")),
                ("answer length (first -> last step)", first.get("answer_length"),
                 last.get("answer_length")),
                ("generation seconds", None, s.get("generation_seconds"))]
    rows = [r for r in rows if number(r[1]) is not None or number(r[2]) is not None]
    rows += [("steps", None, s.get("steps")), ("seconds", None, s.get("seconds"))]
    return [r for r in rows if r[2] is not None or r[1] is not None]


def metric_rows(rows: list[dict]) -> list[list]:
    """[key, first, last, min, max, points] for every numeric key, in the order first logged."""
    order: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r.items():
            if k in ("step", "time"):
                continue
            y = number(v)
            if y is not None:
                order.setdefault(k, []).append(y)
    return [[k, ys[0], ys[-1], min(ys), max(ys), len(ys)] for k, ys in order.items()]


# --- the page ---------------------------------------------------------------------------------

def samples_html(samples_start: list | None, samples_end: list | None,
                 before: str = "before", after: str = "after") -> str:
    """Sample answers to the same prompts at the start and end of training, side by side."""
    start, end = list(samples_start or []), list(samples_end or [])
    if not start and not end:
        return "<p>No sample answers recorded for this run.</p>"
    rows = []
    for i in range(max(len(start), len(end))):
        b = start[i] if i < len(start) else {}
        a = end[i] if i < len(end) else {}
        rows.append([a.get("prompt", b.get("prompt", "")), b.get("answer", "-") or "(empty)",
                     b.get("reward"), a.get("answer", "-") or "(empty)", a.get("reward")])
    return h.table(["prompt", before, "score", after, "score"], rows, numeric={2, 4},
                   text={0, 1, 3})


def health_html(rows: list[dict]) -> str:
    notes = []
    for r in rows:
        a = r.get("anomaly")
        if isinstance(a, dict):
            notes.append([r.get("step"), a.get("action", ""), a.get("message") or
                          f"{a.get('figure', '')} = {a.get('value', '')}"])
        c = r.get("lr_change")
        if isinstance(c, dict):
            notes.append([r.get("step"), "resumed",
                          f"{c.get('flag')} changed from {c.get('from')} to {c.get('to')}"])
    if not notes:
        return "<p>No health warnings.</p>"
    return h.table(["step", "action", "what"], notes, text={2})


def run_html(report: RunReport) -> str:
    r = report.record
    kind = r.kind or "run"
    title = f"dschat {kind} report: {r.folder.name}"
    status = r.status
    logged = f"{len(r.rows)} metrics rows" + (f", up to step {r.last_step}"
                                              if r.last_step is not None else "")
    body = [f"<h1>dschat {h.esc(kind)} report{': ' + h.esc(TITLES[kind]) if kind in TITLES else ''}"
            "</h1>",
            f"<p class=\"meta\">{h.esc(r.folder.resolve())}<br>status: <span class=\""
            f"{h.status_class(status)}\">{h.esc(status)}</span> &middot; {h.esc(logged)} &middot; "
            f"generated {h.esc(h.generated_at())}</p>"]
    if not r.summary:
        body.append("<p>The run is still going (or stopped before its summary): the curves "
                    "show what metrics.jsonl holds so far. Rebuild with <code>dschat report "
                    f"{h.esc(r.folder)}</code>.</p>")
    if report.key_rows:
        body += ["<h2>Key figures</h2>",
                 h.table(["figure", "start", "end"], [list(k) for k in report.key_rows],
                         numeric={1, 2})]
    body.append("<h2>Curves</h2>")
    if report.figures:
        body.append("<div class=\"grid\">" + "".join(
            h.figure(png, p.title, f"report/{p.name}.png") for p, png in report.figures)
            + "</div>")
    else:
        body.append("<p>Nothing logged yet.</p>")
    s = r.summary or {}
    tuned = r.kind in ("ppo", "dpo")  # answers of the step-1 model, then of the tuned one
    body += ["<h2>Sample answers (greedy, held-out prompts)</h2>" if tuned else
             "<h2>Sample answers</h2>",
             samples_html(s.get("samples_start"), s.get("samples_end"),
                          "before (step-1 model)" if tuned else "at start",
                          "after" if tuned else "at end")]
    body += ["<h2>Health</h2>", health_html(r.rows)]
    metrics = metric_rows(r.rows)
    if metrics:
        body += ["<h2>Every metric</h2>",
                 h.table(["metric", "first", "last", "min", "max", "points"], metrics,
                         numeric={1, 2, 3, 4, 5})]
    body += ["<h2>Run config</h2>",
             f"<pre>{h.esc(r.config_text or '(no run_config.yaml)')}</pre>"]
    return h.page(title, body)

