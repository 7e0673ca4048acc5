"""`dschat dpo`: DeepSpeed-Chat's DPO step (options -> DPOConfig -> launch)."""

from __future__ import annotations

import typer

from dschat_cli.cli.options import config_command
from dschat_cli.config.dpo import DPOConfig
from dschat_cli.config.steps import step


def _run(cfg: DPOConfig, *, dry_run: bool) -> int:
    from dschat_cli.launch.step import launch_training

    return launch_training("dpo", cfg, dry_run=dry_run)


def register(app: typer.Typer) -> None:
    config_command(app, "dpo", DPOConfig, handler=_run,
                   help=step("dpo").summary,
                   epilog="Example: dschat dpo --model out/actor --data-path Dahoas/rm-static "
                          "--output-dir out/dpo")
