"""`dschat eval-reward`: score chosen/rejected pairs (or single answers) with a reward model."""

from __future__ import annotations

import typer

from dschat_cli.cli.options import config_command, show_config
from dschat_cli.config.eval_reward import EvalRewardConfig


def _run(cfg: EvalRewardConfig, *, dry_run: bool) -> int:
    if dry_run:
        return show_config(cfg)
    from dschat_cli.eval.reward import run_eval_reward

    run_eval_reward(cfg)
    return 0


def register(app: typer.Typer) -> None:
    config_command(app, "eval-reward", EvalRewardConfig, handler=_run,
                   help="Score chosen/rejected answers with a reward model: per-pair table, "
                        "accuracy, mean scores (or single answers with --answer).",
                   epilog="Example: dschat eval-reward --path out/reward (scores its held-out "
                          "pairs)",
                   dry_run_help="Print the resolved config and exit.")
