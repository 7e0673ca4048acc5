"""`dschat reward`: step 2, the reward model (options -> RewardConfig -> launch)."""

from __future__ import annotations

import typer

from dschat_cli.cli.options import config_command
from dschat_cli.config.reward import RewardConfig


def _validate(cfg: RewardConfig) -> None:
    from dschat_cli.data.prepare import load_phase_rows
    from dschat_cli.models.loading import check_lora_targets, check_model_source

    check_model_source(cfg.model)
    check_lora_targets(cfg.model, cfg.lora, backbone_only=True)
    train, _ = load_phase_rows(cfg.data, phase=2, seed=cfg.seed)
    if all(r is None or not str(r).strip() for r in train["rejected"]):
        from dschat_cli.config.schema import ConfigError

        raise ConfigError("--data-path", "the step-2 part of the data has no rejected answers (an "
                          "SFT-only source?); the reward model needs chosen/rejected pairs")


def _run(cfg: RewardConfig, *, dry_run: bool) -> int:
    from dschat_cli.launch.step import launch_training

    return launch_training("reward", cfg, dry_run=dry_run, validate=_validate)


def register(app: typer.Typer) -> None:
    config_command(app, "reward", RewardConfig, handler=_run,
                   help="Step 2: train a reward model (backbone + scalar value head) on "
                        "chosen/rejected pairs.",
                   epilog="Example: dschat reward --model facebook/opt-350m --data-path "
                          "Dahoas/rm-static --output-dir out/reward")
