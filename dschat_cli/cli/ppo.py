"""`dschat ppo`: step 3, RLHF with PPO (options -> PPOConfig -> launch)."""

from __future__ import annotations

import typer

from dschat_cli.cli.options import config_command
from dschat_cli.config.ppo import PPOConfig
from dschat_cli.config.steps import step


def _run(cfg: PPOConfig, *, dry_run: bool) -> int:
    from dschat_cli.launch.step import launch_training

    return launch_training("ppo", cfg, dry_run=dry_run)


def register(app: typer.Typer) -> None:
    config_command(app, "ppo", PPOConfig, handler=_run,
                   help=step("ppo").summary,
                   epilog="Example: dschat ppo --actor-model out/actor --critic-model out/reward "
                          "--data-path Dahoas/rm-static --output-dir out/ppo")
