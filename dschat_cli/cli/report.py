"""`dschat report RUN_DIR`: rebuild a run's report.html (plots, key figures, sample answers, run
config) from its files, also while the run is still going. A `dschat pipeline` output folder gets
the pipeline's report, linking the steps' own (rebuilt too). The work is in dschat_cli/report/;
matplotlib is imported there, only when drawing."""

from __future__ import annotations

from pathlib import Path

import typer


HELP = ("Write RUN_DIR/report.html and RUN_DIR/report/*.png from RUN_DIR's metrics.jsonl, "
        "train_summary.json and run_config.yaml: the step's curves, key figures, sample answers "
        "and run config in one self-contained page. Works while the run is still going. For a "
        "pipeline's folder: one page linking each step's report, with the step-3 answers before "
        "and after. Training steps write their report themselves at each checkpoint and at the "
        "end.")


def report(
    run_dir: str = typer.Argument(..., metavar="RUN_DIR", show_default=False,
                                  help="The --output-dir of a dschat sft, reward, dpo or ppo run, "
                                       "or of a dschat pipeline."),
) -> None:
    from rich.text import Text

    from dschat_cli.report import (ReportError, is_pipeline_root, write_pipeline_report,
                                   write_run_report)
    from dschat_cli.ui.console import console, error_line

    folder = Path(run_dir).expanduser()
    try:
        if folder.is_dir() and is_pipeline_root(folder):
            path = write_pipeline_report(folder, rebuild=True)
            console.print(Text(f"pipeline report written to {path}"), soft_wrap=True)
            return
        r = write_run_report(folder)
    except ReportError as e:
        error_line(e.where, e.message)
        raise typer.Exit(2) from None
    except ImportError as e:  # matplotlib missing from a hand-made environment
        error_line("RUN_DIR", f"cannot draw plots ({e}); install it: pip install matplotlib")
        raise typer.Exit(2) from None
    state = "" if r.record.summary else " (run still going: no train_summary.json yet)"
    console.print(Text(f"{r.record.kind or 'run'} report written to {r.html_path} "
                       f"({len(r.figures)} plots in {r.record.folder / 'report'}){state}"),
                  soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("report", help=HELP, epilog="Example: dschat report out/step3   |   dschat report "
                "dschat-demo   (a pipeline's folder)")(report)
