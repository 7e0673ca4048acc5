"""`dschat sft`: step 1, supervised fine-tuning (options -> SFTConfig -> launch)."""

from __future__ import annotations

import typer

from dschat_cli.cli.options import config_command
from dschat_cli.config.sft import SFTConfig
from dschat_cli.config.steps import step


def _run(cfg: SFTConfig, *, dry_run: bool) -> int:
    from dschat_cli.launch.step import launch_training

    return launch_training("sft", cfg, dry_run=dry_run)


def register(app: typer.Typer) -> None:
    config_command(app, "sft", SFTConfig, handler=_run,
                   help=step("sft").summary,
                   epilog="Example: dschat sft --model facebook/opt-1.3b --data-path "
                          "Dahoas/rm-static --output-dir out/actor")
