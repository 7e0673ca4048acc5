"""The pipeline's report:  dschat report OUT   (OUT: a `dschat pipeline --output-dir`)

    OUT/report.html        the steps (status, time, key figures, a link to each step's own
                           report), each step's headline curves (step 3: reward, true reward,
                           KL), and the held-out answers before and after step 3
    OUT/report/*.png       those curves as files

`dschat pipeline` calls write_pipeline_report(root, {step name: folder}) after its summary.json.
The step folders come from that mapping, else from summary.json's rows ("out"), else from the
pipeline's layout (OUT/actor-models/*, OUT/reward-models/*, OUT/step3-models/*: the folder of the
step whose metrics.jsonl was written last).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dschat_cli.config.steps import METHODS, Step, pipeline_steps
from dschat_cli.report import html as h
from dschat_cli.report.panels import HEADLINE, PANELS
from dschat_cli.report.records import (METRICS, SUMMARY, check_folder, read_json, read_run,
                                       step_kind, write_atomic)
from dschat_cli.report.run import FIGURES, REPORT, RunReport, key_figures, samples_html, \
    save_figures, write_run_report

PIPELINE_SUMMARY = "summary.json"


def is_pipeline_root(folder: str | Path) -> bool:
    """A `dschat pipeline` output folder: its summary.json lists steps, or it has a step folder
    (a pipeline still in its first step has no summary.json yet)."""
    folder = Path(folder)
    if (folder / METRICS).is_file():
        return False
    if isinstance(read_json(folder / PIPELINE_SUMMARY).get("steps"), list):
        return True
    return any((folder / s.pipeline_dir).is_dir() for m in METHODS for s in pipeline_steps(m))


def pipeline_method(root: Path, summary: dict) -> str:
    """summary.json's "method"; before it exists, the method whose step folders are there
    (--method dpo has OUT/dpo-models, rlhf OUT/reward-models and OUT/step3-models)."""
    if summary.get("method") in METHODS:
        return summary["method"]
    names = {r.get("name") for r in summary.get("steps") or [] if isinstance(r, dict)}

    def score(method: str) -> int:
        return sum(s.name in names or (root / s.pipeline_dir).is_dir()
                   for s in pipeline_steps(method) if s.number != 1)
    return max(METHODS, key=score)  # ties: the first, the default


@dataclass
class StepEntry:
    spec: Step
    row: dict  # summary.json's row ({} when the pipeline has not written one for it)
    folder: Path | None
    error: str = ""  # why its report could not be written
    figures: list[tuple[str, bytes]] = field(default_factory=list)  # (title, PNG), headline

    @property
    def label(self) -> str:
        return f"step {self.spec.number} ({self.spec.name})"


def write_pipeline_report(root: str | Path, step_dirs: dict[str, str | Path] | None = None, *,
                          rebuild: bool = False, where: str = "RUN_DIR") -> Path:
    """(Re)write ROOT/report.html (and ROOT/report/*.png). Each step's own report is rebuilt when
    it is missing or older than the step's metrics (always with `rebuild`). A step whose report
    fails is named with the reason in the page; the page is still written. Returns its path."""
    root = Path(root).expanduser()
    check_folder(root, where)
    summary = read_json(root / PIPELINE_SUMMARY)
    rows = {r.get("name"): r for r in summary.get("steps") or [] if isinstance(r, dict)}
    method = pipeline_method(root, summary)
    entries = []
    for spec in pipeline_steps(method):
        row = rows.get(spec.name, {})
        folder = _step_folder(root, spec, row, (step_dirs or {}).get(spec.name))
        if folder is None and not row:
            continue
        entries.append(StepEntry(spec, row, folder))
    figures: list[tuple[str, bytes]] = []
    reports: dict[str, RunReport | None] = {}
    for e in entries:
        reports[e.spec.name] = _step_report(e, rebuild)
        for i, (title, png) in enumerate(e.figures):
            figures.append((f"step{e.spec.number}-{e.spec.name}-{i}", png))
    save_figures(root / FIGURES, figures)
    page = _page(root, summary, method, entries, reports)
    write_atomic(root / REPORT, page)
    return root / REPORT


def _step_folder(root: Path, spec: Step, row: dict, given) -> Path | None:
    for f in (given, row.get("out"), row.get("output_dir")):
        if f and Path(f).is_dir():
            return Path(f)
    base = root / spec.pipeline_dir
    if not base.is_dir():
        return None
    found = [d for d in base.iterdir() if d.is_dir() and (d / METRICS).is_file()
             and step_kind(d) in (spec.name, "")]
    return max(found, key=lambda d: (d / METRICS).stat().st_mtime) if found else None


def _stale(folder: Path) -> bool:
    report = folder / REPORT
    if not report.is_file():
        return True
    newest = max((folder / f).stat().st_mtime for f in (METRICS, SUMMARY)
                 if (folder / f).is_file())
    return report.stat().st_mtime < newest


def _step_report(e: StepEntry, rebuild: bool) -> RunReport | None:
    """The step's record (and its report rebuilt when due); its headline PNGs in e.figures."""
    if e.folder is None or not (e.folder / METRICS).is_file():
        return None
    try:
        if rebuild or _stale(e.folder):
            report = write_run_report(e.folder)
            pngs = {p.name: (p.title, png) for p, png in report.figures}
        else:
            report = RunReport(read_run(e.folder))
            report.key_rows = key_figures(report.record)
            titles = {p.name: p.title for p in PANELS.get(report.record.kind, ())}
            pngs = {}
            for name in HEADLINE.get(report.record.kind, ()):
                f = e.folder / FIGURES / f"{name}.png"
                if f.is_file():
                    pngs[name] = (titles.get(name, name), f.read_bytes())
        e.figures = [pngs[n] for n in HEADLINE.get(report.record.kind, ()) if n in pngs]
        return report
    except Exception as exc:  # noqa: BLE001 - one step's problem must not hide the others
        e.error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        return None


def _seconds(v) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v / 60:.1f} min" if v >= 120 else f"{v:.1f} s"


def _figures_text(report: RunReport | None, n: int = 3) -> str:
    if report is None:
        return ""
    return "; ".join(f"{label} {h.fmt(a)} -> {h.fmt(b)}" if a is not None else
                     f"{label} {h.fmt(b)}" for label, a, b in report.key_rows[:n])


def _page(root: Path, summary: dict, method: str, entries: list[StepEntry],
          reports: dict[str, RunReport | None]) -> str:
    models = [f"actor: {summary.get('actor', '-')}"] + (
        [f"reward model: {summary['reward']}"] if summary.get("reward") else [])
    meta = [*models, f"total time {_seconds(summary.get('total_seconds'))}",
            f"generated {h.generated_at()}"]
    body = [f"<h1>dschat pipeline report ({h.esc(method)})</h1>",
            f"<p class=\"meta\">{h.esc(root.resolve())}<br>"
            + " &middot; ".join(h.esc(m) for m in meta) + "</p>"]
    if not summary:
        body.append("<p>The pipeline has written no summary.json yet (still in its first run):"
                    " the steps below are what its folders hold so far.</p>")
    rows = []
    for e in entries:
        report = reports.get(e.spec.name)
        status = e.row.get("status") or (report.record.status if report else "not started")
        seconds = e.row.get("seconds")
        if seconds is None and report is not None and report.record.summary:
            seconds = report.record.summary.get("seconds")
        if report is not None:
            href = (e.folder / REPORT).resolve()
            try:
                href = href.relative_to(root.resolve())
            except ValueError:
                pass
            link = ("html", f"<a href=\"{h.esc(href.as_posix())}\">{h.esc(href.as_posix())}</a>")
        else:
            link = e.error or ("no metrics yet" if e.folder else "no folder")
        rows.append([e.label, status, _seconds(seconds), _figures_text(report), link])
    body += ["<h2>Steps</h2>",
             h.table(["step", "status", "time", "key figures (start -> end)", "step report"],
                     rows, text={3})]
    shown = [(e, title, png) for e in entries for title, png in e.figures]
    body.append("<h2>Curves</h2>")
    if shown:
        body.append("<div class=\"grid\">" + "".join(
            h.figure(png, f"{e.label}: {title}", f"{e.label}: {title}")
            for e, title, png in shown) + "</div>")
    else:
        body.append("<p>No step has logged metrics yet.</p>")
    # the held-out answers of the last step that has them (step 3, or DPO's step 2)
    for e in reversed(entries):
        report = reports.get(e.spec.name)
        s = (report.record.summary if report is not None else None) or {}
        m = e.row.get("metrics") or {}
        start = s.get("samples_start") or m.get("samples_start")
        end = s.get("samples_end") or m.get("samples_end")
        if e.spec.number == 1 or not (start or end):
            continue
        body += [f"<h2>Held-out answers (greedy), before and after {h.esc(e.label)}</h2>",
                 samples_html(start, end, "before (step-1 model)", f"after {e.label}")]
        break
    return h.page("dschat pipeline report", body)

