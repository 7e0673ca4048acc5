"""The four DeepSpeed configs of step 3, from the one builder (no torch import: the CLI's
--dry-run shows them)."""

from __future__ import annotations

from dschat_cli.config.ds_config import eval_ds_config, train_ds_config
from dschat_cli.config.ppo import PPOConfig


def ppo_ds_configs(cfg: PPOConfig, *, world_size: int, dtype: str, torch_adam: bool,
                   tensorboard_dir: str | None, job_name: str = "ppo") -> dict[str, dict]:
    """The DeepSpeed configs by role (actor and critic train; ref and reward are frozen), all from
    the one builder; no critic role for a critic-free estimator. The actor's TensorBoard job is
    JOB_NAME_actor. The frozen models score whole rollouts: prompts x --samples-per-prompt rows."""
    d, t = cfg.deepspeed, cfg.train
    rows = t.per_device_generation_batch_size * t.samples_per_prompt
    configs = {
        "actor": train_ds_config(cfg.deepspeed_for("actor"), cfg.optim_for("actor"),
                                 world_size=world_size, dtype=dtype, torch_adam=torch_adam,
                                 tensorboard_dir=tensorboard_dir, job_name=f"{job_name}_actor"),
        "critic": train_ds_config(cfg.deepspeed_for("critic"), cfg.optim_for("critic"),
                                  world_size=world_size, dtype=dtype, torch_adam=torch_adam,
                                  tensorboard_dir=None, job_name=f"{job_name}_critic"),
        "ref": eval_ds_config(zero_stage=d.actor_zero_stage, offload=d.offload_reference_model,
                              dtype=dtype, micro_batch_size=rows,
                              world_size=world_size),
        "reward": eval_ds_config(zero_stage=d.critic_zero_stage, offload=d.offload_reward_model,
                                 dtype=dtype, micro_batch_size=rows,
                                 world_size=world_size),
    }
    if not cfg.has_critic:
        del configs["critic"]
    return configs
