"""`dschat pipeline`: steps 1-3 (or 1 and DPO) in order, each as its own launch (options ->
PipelineConfig)."""

from __future__ import annotations

import typer

from dschat_cli.cli.options import config_command
from dschat_cli.config.pipeline import PipelineConfig


def _run(cfg: PipelineConfig, *, dry_run: bool) -> int:
    from dschat_cli.pipeline import run_pipeline

    return run_pipeline(cfg, dry_run=dry_run)


def register(app: typer.Typer) -> None:
    config_command(app, "pipeline", PipelineConfig, handler=_run,
                   help="Run step 1 (SFT), step 2 (reward model) and step 3 (PPO) in order, with "
                        "size presets, skipping finished steps, and end with a time breakdown; "
                        "--method dpo: step 1, then DPO as step 2.",
                   epilog="Examples: dschat pipeline --demo | dschat pipeline --actor opt-13b "
                          "--reward opt-350m --deployment-type single_node | dschat pipeline "
                          "--demo --method dpo")
