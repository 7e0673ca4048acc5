"""`dschat dpo` run config: DeepSpeed-Chat's DPO step (step2_dpo_finetuning), and its DeepSpeed
configs.

Preference pairs (the step-2 part of --data-split, as the reference) train the policy directly
against a frozen reference; no reward model, no PPO. Defaults follow the reference's shipped
OPT-350M script (training_scripts/opt/single_node/run_350m.sh): lr 5e-5, weight decay 0.1, one
epoch, 4 pairs per GPU, dropout 0.0, beta 0.1; not its argparse default lr of 1e-3, which its own
scripts override (about 100x too high for DPO).

The reference model is the starting model, frozen:
  - a second copy, sharded like the policy (ZeRO-3 with --zero-stage 3, else a full replica) and
    with --offload-reference-model kept in CPU memory (ZeRO-3 parameter offload, which DeepSpeed
    runs at any policy stage; the reference's flag did nothing below ZeRO-3);
  - or, with --precompute-ref-logprobs, that copy scores the train and eval pairs once before
    training and is freed: no second model in memory while the policy trains;
  - or, with LoRA and --only-optimize-lora, the policy itself with its adapters switched off
    (peft's disable_adapter): the frozen base is the starting model, so there is no copy at all.
    (LoRA that also trains the base weights needs the copy.)

With a known --true-reward (the demo's judge) the run also reports what the policy says to the
held-out prompts before and after training, as step 3 does (HeldoutOptions).

No torch import here: --dry-run and `dschat --help` build these.
"""

from __future__ import annotations

from dataclasses import dataclass

from dschat_cli.config.ds_config import eval_ds_config, train_ds_config
from dschat_cli.config.schema import ConfigError, opt, section
from dschat_cli.config.sections import (CheckpointOptions, DataOptions, DeepSpeedOptions,
                                        HealthOptions, LaunchOptions, LoraOptions, ModelOptions,
                                        OptimOptions, ReportOptions, check_single_model_run)

LOSS_TYPES = ("sigmoid", "ipo")  # as rlhf/dpo.py (config/ imports no torch)
TRUE_REWARDS = ("none", "demo")  # as `dschat ppo --true-reward` (steps/rl/experience.py's judges)


@dataclass(frozen=True)
class DPOModelOptions(ModelOptions):
    dropout: float | None = opt(0.0, "Set every dropout probability of the model config to this "
                                "value (null in a --config YAML keeps the model's own). 0.0 by "
                                "default, as the reference's scripts pass: with dropout the policy "
                                "differs from the reference before any update.", min=0.0, max=1.0)


@dataclass(frozen=True)
class DPOOptimOptions(OptimOptions):
    """The defaults of DeepSpeed-Chat's OPT-350M DPO script."""
    learning_rate: float = opt(5e-5, "Peak learning rate (DeepSpeed-Chat's OPT-350M DPO script; "
                               "its argparse default 1e-3 is far too high).", min=0.0)
    weight_decay: float = opt(0.1, "AdamW weight decay (not applied to biases and norm weights).",
                              min=0.0)
    num_train_epochs: int = opt(1, "Passes over the training pairs.", min=1)
    per_device_train_batch_size: int = opt(4, "Pairs per GPU per micro-batch (each pair is two "
                                           "sequences; global batch = this x GPUs x gradient "
                                           "accumulation).", min=1)
    per_device_eval_batch_size: int = opt(4, "Eval pairs per GPU per batch (also the batch of "
                                          "--precompute-ref-logprobs).", min=1)


@dataclass(frozen=True)
class DPOLossOptions:
    beta: float = opt(0.1, "DPO beta: the strength of the implicit KL to the reference (larger "
                      "stays closer).", min=0.0)
    label_smoothing: float = opt(0.0, "Conservative DPO (cDPO): the assumed share of pairs whose "
                                 "labels are flipped, in [0, 0.5); sigmoid loss only.", min=0.0,
                                 max=0.5)
    loss_type: str = opt("sigmoid", "sigmoid: DPO (DeepSpeed-Chat's); ipo: IPO's squared loss "
                         "(h - 1/(2 beta))^2 on summed log-probabilities, as OpenRLHF.",
                         choices=LOSS_TYPES)


@dataclass(frozen=True)
class ReferenceOptions:
    precompute_ref_logprobs: bool = opt(False, "Score every train and eval pair with the "
                                        "reference once, before training, then free it: no second "
                                        "model in memory while the policy trains.")
    offload_reference_model: bool = opt(False, "Keep the reference copy in CPU memory and stream "
                                        "its weights in per forward pass (ZeRO-3 parameter "
                                        "offload, at any --zero-stage). Not with LoRA and "
                                        "--only-optimize-lora, whose reference is the policy "
                                        "itself.")


@dataclass(frozen=True)
class HeldoutOptions:
    """What the policy says, before and after training: with a known --true-reward, one sampled
    answer to each held-out prompt (the eval pairs' prompts) is judged, and the greedy answers to
    the first --greedy-check-prompts are shown (step 3's held-out check, steps/heldout.py)."""
    true_reward: str = opt("none", "A known true reward of the policy's answers to the held-out "
                           "prompts, reported before and after training and never trained on: "
                           "demo is the demo task's programmatic judge (dschat pipeline --demo "
                           "--method dpo sets it); none: no answers are generated.",
                           choices=TRUE_REWARDS)
    max_answer_seq_len: int = opt(128, "Maximum tokens of a held-out answer (with --true-reward).",
                                  min=2)
    greedy_check_prompts: int = opt(8, "Held-out prompts answered greedily (what `dschat chat` "
                                    "says) before and after training, shown in the summary (with "
                                    "--true-reward).", min=1)
    generation_engine: str = opt("fast", "fast: dschat's rollout engine (static KV cache); hf: "
                                 "transformers' generate (with --true-reward).",
                                 choices=("fast", "hf"))


@dataclass(frozen=True)
class DPOConfig:
    model: DPOModelOptions = section(DPOModelOptions, panel="Model")
    lora: LoraOptions = section(LoraOptions, panel="LoRA")
    data: DataOptions = section(DataOptions, panel="Data")
    optim: DPOOptimOptions = section(DPOOptimOptions, panel="Optimisation")
    dpo: DPOLossOptions = section(DPOLossOptions, panel="DPO")
    reference: ReferenceOptions = section(ReferenceOptions, panel="Reference model")
    deepspeed: DeepSpeedOptions = section(DeepSpeedOptions, panel="DeepSpeed")
    launch: LaunchOptions = section(LaunchOptions, panel="Launch")
    health: HealthOptions = section(HealthOptions, panel="Health")
    checkpoint: CheckpointOptions = section(CheckpointOptions, panel="Checkpoints")
    report: ReportOptions = section(ReportOptions, panel="Reporting")
    heldout: HeldoutOptions = section(HeldoutOptions, panel="Held-out answers")
    output_dir: str | None = opt(None, "Folder for the trained model, run config, DeepSpeed JSON, "
                                 "logs and metrics.")
    overwrite: bool = opt(False, "Allow writing into a non-empty --output-dir.")
    seed: int = opt(1234, "Random seed (data split, shuffling, initialisation).")
    eval_interval: int = opt(0, "Also evaluate every N optimizer steps (0: before training and at "
                             "the end of each epoch only).", min=0)

    @property
    def reference_is_base(self) -> bool:
        """The reference is the policy with its LoRA adapters off (no second model): LoRA that
        trains the adapters only, so the base weights stay the starting model."""
        return self.lora.lora_dim > 0 and self.lora.only_optimize_lora

    @property
    def reference_copy(self) -> bool:
        """A second model (the reference copy) is loaded, for the run or for the precompute."""
        return not self.reference_is_base

    def check(self) -> None:
        """Cross-field checks that need no file system."""
        check_single_model_run(self, "opt-350m")
        d = self.dpo
        if d.beta <= 0:
            raise ConfigError("--beta", f"{d.beta:g} must be > 0 (DeepSpeed-Chat's default: 0.1)")
        if d.label_smoothing >= 0.5:
            raise ConfigError("--label-smoothing", f"{d.label_smoothing:g} must be below 0.5 (at "
                              "0.5 the loss ignores which answer was chosen)")
        if d.loss_type == "ipo" and d.label_smoothing > 0:
            raise ConfigError("--label-smoothing", "applies to --loss-type sigmoid only; drop it "
                              "with --loss-type ipo")
        if self.reference.offload_reference_model and self.reference_is_base:
            raise ConfigError("--offload-reference-model", "with --lora-dim and "
                              "--only-optimize-lora the reference is the policy with its adapters "
                              "off: there is no second model to offload; drop the flag")


def dpo_ds_configs(cfg: DPOConfig, *, world_size: int, dtype: str, torch_adam: bool,
                   tensorboard_dir: str | None, job_name: str = "dpo") -> dict[str, dict]:
    """{"model": the policy's config, "ref": the frozen reference copy's}, both from the one
    builder (config/ds_config.py). The reference follows the policy's ZeRO stage (stage 3 stays
    partitioned, stages 0-2 become a full replica: it has no optimizer states or gradients to
    shard); --offload-reference-model makes it ZeRO-3 with parameter offload at any stage. No
    "ref" role when the reference is the policy with its adapters off."""
    configs = {"model": train_ds_config(cfg.deepspeed, cfg.optim, world_size=world_size,
                                        dtype=dtype, torch_adam=torch_adam,
                                        tensorboard_dir=tensorboard_dir, job_name=job_name)}
    if cfg.reference_copy:
        configs["ref"] = eval_ds_config(
            zero_stage=cfg.deepspeed.zero_stage, offload=cfg.reference.offload_reference_model,
            dtype=dtype, world_size=world_size,
            micro_batch_size=max(cfg.optim.per_device_train_batch_size,
                                 cfg.optim.per_device_eval_batch_size))
    return configs
