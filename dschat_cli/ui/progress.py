"""Rich progress with ETA and live metrics for the training loops (rank 0 draws; other ranks get a
no-op)."""

from __future__ import annotations

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from dschat_cli.ui.console import console


def train_progress(enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[metrics]}", style="metric"),
        console=console,
        disable=not enabled,
        transient=False,
        refresh_per_second=4,
    )


def fmt_metrics(**values) -> str:
    parts = []
    for k, v in values.items():
        if v is None:
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return "  ".join(parts)
