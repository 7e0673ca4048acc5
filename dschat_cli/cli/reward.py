"""`dschat reward`: step 2, the reward model (options -> RewardConfig -> launch)."""

from __future__ import annotations

import typer

from dschat_cli.cli.options import config_command
from dschat_cli.config.reward import RewardConfig
from dschat_cli.config.steps import step


def _run(cfg: RewardConfig, *, dry_run: bool) -> int:
    from dschat_cli.launch.step import launch_training

    return launch_training("reward", cfg, dry_run=dry_run)


def register(app: typer.Typer) -> None:
    config_command(app, "reward", RewardConfig, handler=_run,
                   help=step("reward").summary,
                   epilog="Example: dschat reward --model facebook/opt-350m --data-path "
                          "Dahoas/rm-static --output-dir out/reward")
