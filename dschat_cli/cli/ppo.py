"""`dschat ppo`: step 3, RLHF with PPO (options -> PPOConfig -> launch)."""

from __future__ import annotations

import typer

from dschat_cli.cli.options import config_command
from dschat_cli.config.ppo import PPOConfig


def _ds_configs(cfg: PPOConfig, plan, hw) -> dict[str, dict]:
    from dschat_cli.config.ds_config import resolve_dtype
    from dschat_cli.steps.ppo_configs import ppo_ds_configs

    dtype = resolve_dtype(cfg.deepspeed.dtype, has_gpu=hw.gpus > 0, bf16_supported=hw.bf16)
    tb = f"{cfg.output_dir}/tensorboard" if cfg.deepspeed.enable_tensorboard else None
    configs = ppo_ds_configs(cfg, world_size=plan.world_size, dtype=dtype,
                             torch_adam=cfg.train.torch_adam or hw.gpus == 0, tensorboard_dir=tb)
    return {f"ds_config_{name}.json": c for name, c in configs.items()}


def _validate(cfg: PPOConfig) -> None:
    """Everything that can fail before any GPU work: folders, kinds, tokenizers, LoRA, data."""
    from dschat_cli.config.sections import ModelOptions
    from dschat_cli.data.prepare import load_phase_rows
    from dschat_cli.models.loading import check_lora_targets, check_model_source, load_tokenizer
    from dschat_cli.models.reward import check_reward_dir, check_same_tokenizer, is_random_preset

    check_model_source(cfg.actor, flag="--actor-model")
    critics = [("--critic-model", cfg.critic)]
    if cfg.reward_model:
        critics.append(("--reward-model", ModelOptions(model=cfg.reward_model)))
    actor_tok = load_tokenizer(cfg.actor)
    for flag, opts in critics:
        if is_random_preset(opts):  # an untrained architecture preset (benchmarks)
            check_model_source(opts, flag=flag)
        else:
            check_reward_dir(str(opts.model), flag)
        check_same_tokenizer(actor_tok, load_tokenizer(opts), flag=flag, other_path=str(opts.model))
    check_lora_targets(cfg.actor, cfg.actor_lora, flag_prefix="actor-")
    check_lora_targets(cfg.critic, cfg.critic_lora, backbone_only=True, flag_prefix="critic-")
    load_phase_rows(cfg.data.as_data_options(), phase=3, seed=cfg.seed)


def _run(cfg: PPOConfig, *, dry_run: bool) -> int:
    from dschat_cli.launch.step import launch_training

    return launch_training("ppo", cfg, dry_run=dry_run, validate=_validate, ds_configs=_ds_configs)


def register(app: typer.Typer) -> None:
    config_command(app, "ppo", PPOConfig, handler=_run,
                   help="Step 3: RLHF with PPO (actor, critic from the reward model, frozen "
                        "reference and reward models).",
                   epilog="Example: dschat ppo --actor-model out/actor --critic-model out/reward "
                          "--data-path Dahoas/rm-static --output-dir out/ppo")
