"""Run reports: curves, key figures, sample answers and the run config of a training run, as one
self-contained HTML page with PNG plots (matplotlib, imported only when a report is drawn).

    dschat report OUT                       # rebuild from OUT's files, also while the run goes on
    write_run_report(out)                   # -> RunReport; OUT/report.html, OUT/report/*.png
    write_report_quietly(out)               # the training steps' call: a failure warns, never raises
    write_pipeline_report(root, {"sft": dir, ...})   # `dschat pipeline`'s OUT/report.html
    sparkline(values) / trend(values)       # a curve in one line of terminal text

records.py reads the folder, panels.py says what each step plots, render.py draws, html.py and
run.py / pipeline.py write the pages.
"""

from dschat_cli.report.pipeline import is_pipeline_root, write_pipeline_report
from dschat_cli.report.records import ReportError, read_run
from dschat_cli.report.run import write_report_quietly, write_run_report
from dschat_cli.report.sparkline import metric_trend, sparkline, trend

__all__ = ["ReportError", "is_pipeline_root", "metric_trend", "read_run", "sparkline", "trend",
           "write_pipeline_report", "write_report_quietly", "write_run_report"]
