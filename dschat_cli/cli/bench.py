"""`dschat bench`: throughput of step 3 (or step 1) in the reference's benchmark setting, per phase,
against the device's measured ceilings (options -> BenchConfig -> launch)."""

from __future__ import annotations

import dataclasses

import typer

from dschat_cli.cli.options import config_command
from dschat_cli.config.bench import BenchConfig


def _validate(cfg: BenchConfig) -> None:
    from dschat_cli.config.sections import ModelOptions
    from dschat_cli.models.loading import check_model_source

    check_model_source(ModelOptions(model=cfg.actor, random_init=True), flag="--actor")
    if cfg.step == "ppo":
        check_model_source(ModelOptions(model=cfg.critic, random_init=True), flag="--critic")


def _ds_configs(cfg: BenchConfig, plan, hw) -> dict[str, dict]:
    from dschat_cli.config.bench import bench_ppo_config, bench_sft_config
    from dschat_cli.launch.checks import ppo_planned_configs
    from dschat_cli.launch.step import planned_ds_config

    if cfg.step == "sft":
        return {"ds_config.json": planned_ds_config(bench_sft_config(cfg), plan, hw, "bench")}
    return ppo_planned_configs(bench_ppo_config(cfg), plan, hw)


def _run(cfg: BenchConfig, *, dry_run: bool) -> int:
    from dschat_cli.launch.step import launch_training

    if cfg.output_dir is None:
        import tempfile

        cfg = dataclasses.replace(cfg, output_dir=tempfile.mkdtemp(prefix="dschat-bench-"))
    return launch_training("bench", cfg, dry_run=dry_run, validate=_validate,
                           ds_configs=_ds_configs)


def register(app: typer.Typer) -> None:
    config_command(app, "bench", BenchConfig, handler=_run,
                   help="Measure step 3 (or step 1) in DeepSpeed-Chat's benchmark setting on random "
                        "weights: per-phase seconds, tokens/s, TFLOP/s, decode speed against the "
                        "memory-bandwidth floor; the fast engine beside transformers' generate.",
                   epilog="Example: dschat bench --actor opt-1.3b --critic opt-350m --batch-size 64 "
                          "--json bench.json")
