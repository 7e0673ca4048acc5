"""`dschat sft` run config: step 1, supervised fine-tuning of the actor."""

from __future__ import annotations

from dataclasses import dataclass

from dschat_cli.config.schema import opt, section
from dschat_cli.config.sections import (CheckpointOptions, DataOptions, DeepSpeedOptions,
                                        HealthOptions, LaunchOptions, LoraOptions, ModelOptions,
                                        OptimOptions, ReportOptions, check_single_model_run)


@dataclass(frozen=True)
class SFTConfig:
    model: ModelOptions = section(ModelOptions, panel="Model")
    lora: LoraOptions = section(LoraOptions, panel="LoRA")
    data: DataOptions = section(DataOptions, panel="Data")
    optim: OptimOptions = section(OptimOptions, panel="Optimisation")
    deepspeed: DeepSpeedOptions = section(DeepSpeedOptions, panel="DeepSpeed")
    launch: LaunchOptions = section(LaunchOptions, panel="Launch")
    health: HealthOptions = section(HealthOptions, panel="Health")
    checkpoint: CheckpointOptions = section(CheckpointOptions, panel="Checkpoints")
    report: ReportOptions = section(ReportOptions, panel="Reporting")
    output_dir: str | None = opt(None, "Folder for the trained model, run config, DeepSpeed JSON, "
                                 "logs and metrics.")
    overwrite: bool = opt(False, "Allow writing into a non-empty --output-dir.")
    seed: int = opt(1234, "Random seed (data split, shuffling, initialisation).")
    mask_prompt: bool = opt(True, "Compute the loss on the answer only (DeepSpeed-Chat also trains on "
                            "the prompt: use --no-mask-prompt to match it).")
    eval_interval: int = opt(0, "Also evaluate every N optimizer steps (0: at the end of each epoch "
                             "only).", min=0)

    def check(self) -> None:
        """Cross-field checks that need no file system."""
        check_single_model_run(self, "opt-125m")
