"""`dschat bench` run config: the reference's benchmark setting (SPEC.md section 4) on random
weights of real architectures: step 3 (or step 1) for N steps after warm-up, per-phase timings."""

from __future__ import annotations

from dataclasses import dataclass

from dschat_cli.config.schema import ConfigError, opt, section
from dschat_cli.config.sections import DTYPES, LaunchOptions


@dataclass(frozen=True)
class BenchConfig:
    step: str = opt("ppo", "What to measure: ppo (step 3: generation, scoring, actor and critic "
                    "training) or sft (step 1: the actor's training step).", choices=("ppo", "sft"))
    actor: str = opt("opt-1.3b", "Actor architecture: a preset (opt-125m ... opt-66b, llama-2-7b, "
                     "...) or a local model folder; weights are random either way.")
    critic: str = opt("opt-350m", "Critic and reward model architecture (ppo).")
    batch_size: int = opt(64, "Prompts per GPU per PPO step (generation batch = training batch); "
                          "sequences per GPU per step for sft.", min=1)
    max_prompt_seq_len: int = opt(256, "Tokens in every prompt (exactly, for a benchmark).", min=4)
    max_answer_seq_len: int = opt(256, "Tokens in every generated answer (exactly, for a benchmark: "
                                  "eos is suppressed). For sft the sequence is prompt + answer "
                                  "tokens.", min=2)
    steps: int = opt(5, "Measured steps (after the warm-up).", min=1)
    warmup: int = opt(2, "Warm-up steps (compilation, CUDA graph capture, allocator), not "
                      "measured.", min=0)
    generation_engine: str = opt("both", "ppo: measure the fast engine, transformers' generate "
                                 "(hf), or both one after the other.",
                                 choices=("fast", "hf", "both"))
    old_logprobs: str = opt("forward", "ppo: as `dschat ppo --old-logprobs` (generation skips the "
                            "actor's scoring forward; fast engine only).",
                            choices=("forward", "generation"))
    generation_tensor_parallel: int = opt(1, "ppo: as `dschat ppo --generation-tensor-parallel` "
                                          "(fast engine only).", min=1)
    actor_zero_stage: int = opt(2, "ZeRO stage of the actor (and reference).", choices=(0, 1, 2, 3))
    critic_zero_stage: int = opt(2, "ZeRO stage of the critic (and reward model).",
                                 choices=(0, 1, 2, 3))
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass.")
    dtype: str = opt("auto", "Precision; auto is bf16 where supported.", choices=DTYPES)
    torch_adam: bool = opt(False, "torch's AdamW instead of DeepSpeed's fused Adam.")
    json: str | None = opt(None, "Also write the results as JSON to this file.")
    output_dir: str | None = opt(None, "Folder for the run's records (default: a new temporary "
                                 "folder).")
    launch: LaunchOptions = section(LaunchOptions, panel="Launch")
    seed: int = opt(1234, "Random seed.")

    @property
    def overwrite(self) -> bool:  # the launcher's output-dir check: a bench folder is reusable
        return True

    def check(self) -> None:
        if self.generation_engine == "hf" and self.old_logprobs == "generation":
            raise ConfigError("--old-logprobs generation", "needs --generation-engine fast or both")
        if self.generation_engine == "hf" and self.generation_tensor_parallel > 1:
            raise ConfigError("--generation-tensor-parallel", "needs --generation-engine fast or "
                              "both")


def bench_ppo_config(cfg: BenchConfig):
    """The `dschat ppo` config the benchmark's step 3 runs (random-weight models, one PPO epoch
    over one generation batch per step, no warm-up of the learning rate)."""
    from dschat_cli.config.ppo import (PPOConfig, PPODeepSpeedOptions, PPOGenerationOptions,
                                       PPOTrainOptions, PromptDataOptions)
    from dschat_cli.config.sections import ModelOptions

    def model(name):
        return ModelOptions(model=name, random_init=True,
                            gradient_checkpointing=cfg.gradient_checkpointing)

    engine = "hf" if cfg.generation_engine == "hf" else "fast"
    return PPOConfig(
        actor=model(cfg.actor), critic=model(cfg.critic),
        data=PromptDataOptions(max_prompt_seq_len=cfg.max_prompt_seq_len),
        train=PPOTrainOptions(per_device_generation_batch_size=cfg.batch_size,
                              per_device_training_batch_size=cfg.batch_size,
                              num_warmup_steps=0, torch_adam=cfg.torch_adam,
                              test_stop_step=cfg.warmup + cfg.steps),
        generation=PPOGenerationOptions(max_answer_seq_len=cfg.max_answer_seq_len,
                                        generation_engine=engine,
                                        old_logprobs=cfg.old_logprobs if engine == "fast"
                                        else "forward",
                                        generation_tensor_parallel=cfg.generation_tensor_parallel
                                        if engine == "fast" else 1),
        deepspeed=PPODeepSpeedOptions(actor_zero_stage=cfg.actor_zero_stage,
                                      critic_zero_stage=cfg.critic_zero_stage, dtype=cfg.dtype),
        launch=cfg.launch, output_dir=cfg.output_dir, overwrite=True, seed=cfg.seed)


def bench_sft_config(cfg: BenchConfig):
    """The `dschat sft` config the benchmark's step 1 runs."""
    from dschat_cli.config.sections import DataOptions, DeepSpeedOptions, ModelOptions, OptimOptions
    from dschat_cli.config.sft import SFTConfig

    return SFTConfig(
        model=ModelOptions(model=cfg.actor, random_init=True,
                           gradient_checkpointing=cfg.gradient_checkpointing),
        data=DataOptions(max_seq_len=cfg.max_prompt_seq_len + cfg.max_answer_seq_len),
        optim=OptimOptions(per_device_train_batch_size=cfg.batch_size, num_train_epochs=1,
                           max_steps=cfg.warmup + cfg.steps, torch_adam=cfg.torch_adam),
        deepspeed=DeepSpeedOptions(zero_stage=cfg.actor_zero_stage, dtype=cfg.dtype),
        launch=cfg.launch, output_dir=cfg.output_dir, overwrite=True, seed=cfg.seed)


def bench_ds_configs(cfg: BenchConfig, *, world_size: int, dtype: str, torch_adam: bool,
                     tensorboard_dir: str | None, job_name: str) -> dict[str, dict]:
    """The DeepSpeed configs the benchmark's run builds, by role: step 3's four, or step 1's one
    model (TensorBoard job JOB_NAME; the benchmark writes no TensorBoard files)."""
    if cfg.step == "sft":
        from dschat_cli.config.ds_config import model_ds_configs

        return model_ds_configs(bench_sft_config(cfg), world_size=world_size, dtype=dtype,
                                torch_adam=torch_adam, tensorboard_dir=tensorboard_dir,
                                job_name=job_name)
    from dschat_cli.config.ppo_ds import ppo_ds_configs

    return ppo_ds_configs(bench_ppo_config(cfg), world_size=world_size, dtype=dtype,
                          torch_adam=torch_adam, tensorboard_dir=tensorboard_dir,
                          job_name=job_name)
