"""`dschat eval`: prompt evaluation, baseline vs fine-tuned (runs in this process, CPU or GPU)."""

from __future__ import annotations

import typer

from dschat_cli.cli.options import config_command, show_config
from dschat_cli.config.eval import EvalConfig


def _run(cfg: EvalConfig, *, dry_run: bool) -> int:
    if dry_run:
        return show_config(cfg)
    from dschat_cli.eval.prompts import run_eval

    run_eval(cfg)
    return 0


def register(app: typer.Typer) -> None:
    config_command(app, "eval", EvalConfig, handler=_run,
                   help="Prompt evaluation: the same prompts through a baseline and a fine-tuned "
                        "model, answers side by side.",
                   epilog="Example: dschat eval --baseline facebook/opt-1.3b --finetuned "
                          "out/actor-models/1.3b",
                   dry_run_help="Print the resolved config and exit.")
