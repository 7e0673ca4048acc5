"""`dschat sft` run config: step 1, supervised fine-tuning of the actor."""

from __future__ import annotations

from dataclasses import dataclass

from dschat_cli.config.schema import ConfigError, opt, section
from dschat_cli.config.sections import (DataOptions, DeepSpeedOptions, LaunchOptions, LoraOptions,
                                        ModelOptions, OptimOptions)


@dataclass(frozen=True)
class SFTConfig:
    model: ModelOptions = section(ModelOptions, panel="Model")
    lora: LoraOptions = section(LoraOptions, panel="LoRA")
    data: DataOptions = section(DataOptions, panel="Data")
    optim: OptimOptions = section(OptimOptions, panel="Optimisation")
    deepspeed: DeepSpeedOptions = section(DeepSpeedOptions, panel="DeepSpeed")
    launch: LaunchOptions = section(LaunchOptions, panel="Launch")
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
        if not self.model.model:
            raise ConfigError("--model", "is required (a hub id, a local folder or a preset such as "
                              "opt-125m)")
        if not self.output_dir:
            raise ConfigError("--output-dir", "is required")
        if self.lora.only_optimize_lora and self.lora.lora_dim == 0:
            raise ConfigError("--only-optimize-lora", "needs --lora-dim > 0")
        if self.deepspeed.offload and self.deepspeed.zero_stage == 0:
            raise ConfigError("--offload", "needs --zero-stage 1, 2 or 3")
