"""`dschat sft`: step 1, supervised fine-tuning (options -> SFTConfig -> launch)."""

from __future__ import annotations

import typer

from dschat_cli.cli.options import config_command
from dschat_cli.config.sft import SFTConfig


def _run(cfg: SFTConfig, *, dry_run: bool) -> int:
    from dschat_cli.launch.checks import DS_CONFIGS, VALIDATORS
    from dschat_cli.launch.step import launch_training

    return launch_training("sft", cfg, dry_run=dry_run, validate=VALIDATORS["sft"],
                           ds_configs=DS_CONFIGS.get("sft"))


def register(app: typer.Typer) -> None:
    config_command(app, "sft", SFTConfig, handler=_run,
                   help="Step 1: supervised fine-tuning of the actor on prompt + chosen answers.",
                   epilog="Example: dschat sft --model facebook/opt-1.3b --data-path "
                          "Dahoas/rm-static --output-dir out/actor")
