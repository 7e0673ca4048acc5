"""`dschat doctor`: is this machine ready? The checks live in dschat_cli/doctor.py; this module
only prints them. Nothing heavy is imported here (torch loads when the GPU check runs)."""

from __future__ import annotations

import json
from typing import Optional

import typer

_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def doctor(
    output_dir: Optional[str] = typer.Option(
        None, "--output-dir", help="Where the run will write (free disk is checked there) "
        "\\[default: the current folder]."),
    data_cache_dir: Optional[str] = typer.Option(
        None, "--data-cache-dir", help="Where tokenised data will be cached "
        "\\[default: ~/.cache/dschat/data]."),
    procs_per_node: Optional[int] = typer.Option(
        None, "--procs-per-node", min=1, help="Training processes per node, for the /dev/shm "
        "check \\[default: one per GPU seen]."),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
) -> None:
    """Check this machine: Python and package versions against dschat's minimums, GPUs and their
    memory, NCCL, /dev/shm, free disk in the output and cache folders, and the hub. Exits 1 if
    any check fails."""
    from dschat_cli.doctor import run_checks, verdict

    checks = run_checks(output_dir=output_dir, cache_dir=data_cache_dir,
                        procs_per_node=procs_per_node)
    failed = any(c.status == "fail" for c in checks)
    if as_json:
        typer.echo(json.dumps({"ok": not failed, "verdict": verdict(checks),
                               "checks": [c.to_dict() for c in checks]}, indent=2))
        raise typer.Exit(1 if failed else 0)

    from rich.table import Table
    from rich.text import Text

    from dschat_cli.ui.console import console

    table = Table(title="dschat doctor", title_justify="left", show_lines=False)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("found")
    table.add_column("fix / note")
    for c in checks:
        table.add_row(Text(c.name), Text(c.status, style=_STYLE[c.status]), Text(c.found),
                      Text(c.fix, style="dim" if c.status == "ok" else ""))
    console.print(table)
    for c in checks:  # the failures' fixes once more, unwrapped, ready to copy
        if c.status == "fail":
            console.print(Text.assemble(("fail ", "bold red"), f"{c.name}: {c.fix}"),
                          soft_wrap=True)
    line = verdict(checks)
    style = "bold red" if failed else ("yellow" if any(c.status == "warn" for c in checks)
                                       else "green")
    console.print(Text(line, style=style))
    raise typer.Exit(1 if failed else 0)


def register(app: typer.Typer) -> None:
    app.command("doctor", epilog="Example: dschat doctor --output-dir out --procs-per-node 8   |   "
                "dschat doctor --json")(doctor)
