"""The option sections shared by the training commands.

Each field's help text is its flag's `--help`. Defaults follow DeepSpeed-Chat (see
shared/reference) unless a comment gives the reason for a change.
"""

from __future__ import annotations

from dataclasses import dataclass

from dschat_cli.config.schema import ConfigError, opt

# transformers' schedules that are a function of the step. Not reduce_lr_on_plateau: DeepSpeed
# steps the scheduler without a metric (it falls back to passing the batch size), so the rate
# would be cut every few steps whatever the loss does.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
              "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
DTYPES = ("auto", "bf16", "fp16", "fp32")
FP32_GRAD_ACCUM = ("auto", "on", "off")
FP32_GRAD_ACCUM_HELP = (
    "Accumulate and clip the gradients in fp32 (DeepSpeed's BF16_Optimizer): no bf16 rounding "
    "between micro-batches, and a faster optimizer step (one inf/nan test of the global norm "
    "instead of one per tensor), for 4 more bytes per trained parameter kept on the GPU. "
    "DeepSpeed does it for bf16 training at ZeRO-1 without --offload only; auto: on there, off "
    "elsewhere.")
DEPLOYMENTS = ("single_gpu", "single_node", "multi_node")
TRACKERS = ("tensorboard", "wandb")  # --report-to's experiment trackers (ui/metrics.py feeds them)
WANDB_PROJECT = "dschat"


@dataclass(frozen=True)
class ModelOptions:
    model: str | None = opt(None, "Hugging Face causal LM id, local folder, or architecture preset "
                            "(opt-125m ... opt-66b, llama-2-7b, llama-2-13b; a preset alone means its "
                            "hub weights, with --random-init a random model of that architecture).")
    tokenizer: str | None = opt(None, "Tokenizer id or folder, if not the model's own.")
    random_init: bool = opt(False, "Build the model from its config with random weights (benchmarks, "
                            "smoke runs); the result is untrained.")
    dropout: float | None = opt(None, "Set every dropout probability of the model config to this "
                                "value (0.0 disables dropout); unset keeps the model's own.",
                                min=0.0, max=1.0)
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass: less "
                                       "memory, about 30% more compute.")
    trust_remote_code: bool = opt(False, "Run the Python code a model folder or hub repo ships "
                                  "for an architecture transformers lacks (config.json auto_map; "
                                  "transformers' trust_remote_code). A security risk: that code "
                                  "runs with your permissions; give it only for models you trust. "
                                  "Without it such a model is refused before launch.")


@dataclass(frozen=True)
class LoraOptions:
    lora_dim: int = opt(0, "LoRA rank; 0 trains all weights, > 0 adds LoRA adapters (peft).", min=0)
    lora_alpha: float | None = opt(None, "LoRA alpha; unset uses the rank, i.e. scaling 1 as "
                                   "DeepSpeed-Chat.", min=0.0)
    lora_module_name: str = opt("", "Add LoRA to the Linear layers whose qualified name contains "
                                "this text (e.g. 'decoder.layers.' or 'self_attn'); empty: every "
                                "Linear layer except the output head.")
    only_optimize_lora: bool = opt(False, "Freeze all weights but the LoRA adapters.")
    lora_learning_rate: float = opt(5e-4, "Learning rate of the LoRA adapter weights.", min=0.0)


@dataclass(frozen=True)
class DataOptions:
    data_path: tuple[str, ...] = opt(("Dahoas/rm-static",), "Data source, repeatable: a hub dataset "
                                     "name (Dahoas/rm-static, Dahoas/full-hh-rlhf, ...), local/jsonfile "
                                     "(with --data-dir), a folder saved with save_to_disk, or a "
                                     ".json/.jsonl/.parquet file.")
    data_dir: str | None = opt(None, "Folder with train.json and eval.json for --data-path "
                               "local/jsonfile.")
    data_split: str = opt("2,4,4", "Relative sizes of the three disjoint parts of every source, for "
                          "step 1, 2 and 3 (e.g. 2,4,4 or 10,0,0).")
    sft_only_data_path: tuple[str, ...] = opt((), "Extra source used only by step 1, whole (no split), "
                                              "repeatable.")
    data_cache_dir: str = opt("~/.cache/dschat/data", "Where tokenised data is cached (keyed by "
                              "everything that changes it). Put it on node-local or shared storage; "
                              "each node builds what it lacks.")
    max_seq_len: int = opt(512, "Maximum tokens of prompt + answer; longer samples are truncated.",
                           min=8)
    max_train_samples: int = opt(0, "Use at most this many training samples (0: all); for smoke "
                                 "runs.", min=0)
    max_eval_samples: int = opt(0, "Use at most this many eval samples (0: all).", min=0)

    def __post_init__(self) -> None:
        parse_split(self.data_split)


def parse_split(text: str) -> tuple[int, int, int]:
    """'2,4,4' -> (2, 4, 4); exactly three non-negative integers with a positive sum."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        nums = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError("data.data_split", f"'{text}' must be three integers like 2,4,4") from None
    if len(nums) != 3:
        raise ConfigError("data.data_split", f"'{text}' has {len(nums)} parts; give three (one per "
                          "step), like 2,4,4")
    if any(n < 0 for n in nums) or sum(nums) == 0:
        raise ConfigError("data.data_split", f"'{text}': parts must be >= 0 with a positive sum")
    return nums  # type: ignore[return-value]


@dataclass(frozen=True)
class OptimOptions:
    learning_rate: float = opt(9.65e-6, "Peak learning rate (DeepSpeed-Chat's OPT-1.3B step-1 "
                               "script).", min=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay (not applied to biases and norm weights).",
                              min=0.0)
    adam_beta1: float = opt(0.9, "AdamW beta1.", min=0.0, max=1.0)
    adam_beta2: float = opt(0.95, "AdamW beta2 (DeepSpeed-Chat uses 0.95).", min=0.0, max=1.0)
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.", min=0.0)
    lr_scheduler_type: str = opt("cosine", "Learning-rate schedule (transformers' get_scheduler).",
                                 choices=SCHEDULERS)
    num_warmup_steps: int = opt(0, "Linear warm-up optimizer steps.", min=0)
    num_train_epochs: int = opt(16, "Passes over the training data (16 in the reference's "
                                "OPT-1.3B script).", min=1)
    max_steps: int = opt(0, "Stop after this many optimizer steps (0: run all epochs).", min=0)
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.", min=1)
    per_device_train_batch_size: int = opt(16, "Training micro-batch per GPU (global batch = this x "
                                           "GPUs x gradient accumulation).", min=1)
    per_device_eval_batch_size: int = opt(16, "Eval batch per GPU.", min=1)
    gradient_clipping: float = opt(1.0, "Clip the global gradient norm to this (0 disables).",
                                   min=0.0)
    torch_adam: bool = opt(False, "Use torch's AdamW instead of DeepSpeed's fused (GPU) or CPU "
                           "(offload) Adam, which compile at first use (~1 min). Always on without "
                           "a GPU.")


@dataclass(frozen=True)
class DeepSpeedOptions:
    zero_stage: int = opt(0, "ZeRO stage: 0 none, 1 optimizer states, 2 + gradients, 3 + "
                          "parameters partitioned over GPUs.", choices=(0, 1, 2, 3))
    offload: bool = opt(False, "Offload optimizer states (ZeRO >= 1) and, with ZeRO-3, parameters "
                        "to CPU memory.")
    dtype: str = opt("auto", "Training precision; auto is bf16 on GPUs that support it, else fp16 "
                     "on GPU, fp32 on CPU.", choices=DTYPES)
    fp32_grad_accum: str = opt("auto", FP32_GRAD_ACCUM_HELP, choices=FP32_GRAD_ACCUM)
    enable_tensorboard: bool = opt(False, "Also write TensorBoard event files (to "
                                   "OUTPUT_DIR/tensorboard): DeepSpeed-Chat's name for "
                                   "--report-to tensorboard.")


@dataclass(frozen=True)
class ReportOptions:
    """Experiment trackers: every metric a step writes to metrics.jsonl also goes, under the same
    name and step, to each tracker chosen (rank 0 only)."""
    report_to: tuple[str, ...] = opt(
        ("none",), "Experiment trackers that also get the run's metrics, under their "
        "metrics.jsonl names; repeatable (--report-to tensorboard --report-to wandb). tensorboard: "
        "event files in OUTPUT_DIR/tensorboard (--enable-tensorboard is the same); wandb: Weights & "
        "Biases (pip install 'dschat\\[wandb]'; `wandb login`, or WANDB_MODE=offline to keep the run "
        "in OUTPUT_DIR/wandb for a later `wandb sync`); none: metrics.jsonl only.",
        choices=("none", *TRACKERS))
    wandb_project: str = opt(WANDB_PROJECT, "W&B project of the run (with --report-to wandb).")
    wandb_run_name: str | None = opt(None, "W&B run name (with --report-to wandb); unset: the "
                                     "--output-dir folder's name.")

    def __post_init__(self) -> None:
        check_report_to(self.report_to)
        if "wandb" not in self.report_to:
            if self.wandb_project != WANDB_PROJECT:
                raise ConfigError("report.wandb_project", "needs --report-to wandb")
            if self.wandb_run_name is not None:
                raise ConfigError("report.wandb_run_name", "needs --report-to wandb")

    @property
    def trackers(self) -> tuple[str, ...]:
        """The chosen trackers, once each, in TRACKERS order (none: ())."""
        return tuple(t for t in TRACKERS if t in self.report_to)


def check_report_to(report_to: tuple[str, ...], where: str = "report.report_to") -> None:
    """none means no tracker, so it comes alone."""
    others = [t for t in dict.fromkeys(report_to) if t != "none"]
    if "none" in report_to and others:
        raise ConfigError(where, f"none cannot be combined with {', '.join(others)}; give the "
                          "trackers, or none alone")


@dataclass(frozen=True)
class LaunchOptions:
    deployment_type: str = opt("single_gpu", "single_gpu: one GPU; single_node: all (or --num-gpus) "
                               "GPUs of this machine; multi_node: the hosts of --hostfile.",
                               choices=DEPLOYMENTS)
    num_gpus: int | None = opt(None, "GPUs per node (default: 1 for single_gpu, all for the others). "
                               "Without a GPU: worker processes on CPU.", min=1)
    include: str | None = opt(None, "DeepSpeed --include, e.g. 'localhost:0,2' or "
                              "'worker-0@worker-1:0,2'.")
    hostfile: str | None = opt(None, "DeepSpeed hostfile for multi_node ('host slots=N' per line).")
    master_addr: str | None = opt(None, "Address of the first node (multi_node).")
    master_port: int | None = opt(None, "Rendezvous port (default: a free one).", min=1, max=65535)
    launcher: str = opt("deepspeed", "deepspeed: launch workers with deepspeed.launcher; none: run "
                        "one worker in this process (world size 1, for debugging).",
                        choices=("deepspeed", "none"))


@dataclass(frozen=True)
class HealthOptions:
    """The health monitor of a training step (steps/health.py has the rules)."""
    on_anomaly: str = opt("stop", "What to do when a logged step's health check finds an anomaly "
                          "(a NaN/inf loss or gradient norm; in step 3 also runaway KL, collapsing "
                          "answers or reward): stop (exit code 1, the anomaly recorded in "
                          "metrics.jsonl and train_summary.json, nothing saved after it, so the last "
                          "checkpoint stays intact) or warn (a yellow line; training continues).",
                          choices=("stop", "warn"))


@dataclass(frozen=True)
class CheckpointOptions:
    """Resumable checkpoints (see steps/checkpoint.py): OUTPUT_DIR/checkpoints/step_NNNNNN/."""
    save_interval: int = opt(0, "Write a resumable checkpoint (DeepSpeed engine state with optimizer "
                             "and scheduler, RNG states, data position) to OUTPUT_DIR/checkpoints "
                             "every N optimizer steps (dschat ppo: every N PPO steps, at the next "
                             "PPO update) and at the end of training; 0: no checkpoints.", min=0)
    resume: str | None = opt(None, "Continue a stopped run: 'auto' resumes from OUTPUT_DIR's latest "
                             "complete checkpoint (or starts fresh if there is none); a path resumes "
                             "from that checkpoint folder (OUTPUT_DIR/checkpoints/step_NNNNNN). The "
                             "run's options must match the checkpoint's, except the peak learning "
                             "rates: a changed one scales the restored schedule by new/old.")
    keep_last: int = opt(2, "Keep the N newest checkpoints; older ones are deleted once a newer one "
                         "is complete.", min=1)


def check_single_model_run(cfg, example_model: str) -> None:
    """Cross-field checks shared by `dschat sft` and `dschat reward` (no file system)."""
    if not cfg.model.model:
        raise ConfigError("--model", "is required (a hub id, a local folder or a preset such as "
                          f"{example_model})")
    if not cfg.output_dir:
        raise ConfigError("--output-dir", "is required")
    if cfg.lora.only_optimize_lora and cfg.lora.lora_dim == 0:
        raise ConfigError("--only-optimize-lora", "needs --lora-dim > 0")
    if cfg.deepspeed.offload and cfg.deepspeed.zero_stage == 0:
        raise ConfigError("--offload", "needs --zero-stage 1, 2 or 3")
