"""`dschat reward` run config: step 2, the reward model."""

from __future__ import annotations

from dataclasses import dataclass

from dschat_cli.config.schema import opt, section
from dschat_cli.config.sections import (CheckpointOptions, DataOptions, DeepSpeedOptions,
                                        HealthOptions, LaunchOptions, LoraOptions, ModelOptions,
                                        OptimOptions, ReportOptions, check_single_model_run)


@dataclass(frozen=True)
class RewardOptimOptions(OptimOptions):
    """Step 2 defaults of DeepSpeed-Chat's OPT-350M reward script."""
    learning_rate: float = opt(5e-5, "Peak learning rate (DeepSpeed-Chat's step-2 default).",
                               min=0.0)
    weight_decay: float = opt(0.1, "AdamW weight decay (not applied to biases and norm weights).",
                              min=0.0)
    num_train_epochs: int = opt(1, "Passes over the training pairs.", min=1)
    per_device_train_batch_size: int = opt(16, "Pairs per GPU per micro-batch (each pair is two "
                                           "sequences; global batch = this x GPUs x gradient "
                                           "accumulation).", min=1)
    per_device_eval_batch_size: int = opt(16, "Eval pairs per GPU per batch.", min=1)


@dataclass(frozen=True)
class RewardConfig:
    model: ModelOptions = section(ModelOptions, panel="Model")
    lora: LoraOptions = section(LoraOptions, panel="LoRA")
    data: DataOptions = section(DataOptions, panel="Data")
    optim: RewardOptimOptions = section(RewardOptimOptions, panel="Optimisation")
    deepspeed: DeepSpeedOptions = section(DeepSpeedOptions, panel="DeepSpeed")
    launch: LaunchOptions = section(LaunchOptions, panel="Launch")
    health: HealthOptions = section(HealthOptions, panel="Health")
    checkpoint: CheckpointOptions = section(CheckpointOptions, panel="Checkpoints")
    report: ReportOptions = section(ReportOptions, panel="Reporting")
    output_dir: str | None = opt(None, "Folder for the reward model, run config, DeepSpeed JSON, logs "
                                 "and metrics.")
    overwrite: bool = opt(False, "Allow writing into a non-empty --output-dir.")
    seed: int = opt(1234, "Random seed (data split, shuffling, value-head initialisation).")
    loss: str = opt("divergence", "Pairwise loss: divergence (DeepSpeed-Chat's: -logsigmoid(r_chosen "
                    "- r_rejected) averaged over the tokens from where the answers differ to the "
                    "later end) or last-token (on the two sequence scores only).",
                    choices=("divergence", "last-token"))
    eval_interval: int = opt(0, "Also evaluate every N optimizer steps (0: at the end of each epoch "
                             "only).", min=0)

    def check(self) -> None:
        """Cross-field checks that need no file system."""
        check_single_model_run(self, "opt-350m")
