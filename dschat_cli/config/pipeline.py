"""`dschat pipeline` config, and the size presets that pick each step's ZeRO stage and batch sizes.

The presets follow the shape of DeepSpeed-Chat's per-size scripts (1.3B on one GPU: ZeRO-0;
1.3B on a node: ZeRO-2; 6.7B and larger: ZeRO-3; the 350M reward model: ZeRO-0). The batch sizes
are dschat's own, sized for 80 GB-class GPUs at 512 tokens (step 1/2) and 256 + 256 tokens
(step 3). DPO (--method dpo) is sized as a step that trains one model, like step 1. Every value is
overridable: per-step YAML (--sft-config, --reward-config, --ppo-config, --dpo-config) and the
pipeline's own flags win over the preset.
"""

from __future__ import annotations

from dataclasses import dataclass

from dschat_cli.config.estimators import ESTIMATORS
from dschat_cli.config.schema import ConfigError, opt, section
from dschat_cli.config.sections import TRACKERS, LaunchOptions, check_report_to, parse_split
from dschat_cli.config.steps import METHODS


@dataclass(frozen=True)
class SizePreset:
    name: str
    zero_stage: dict[str, int]  # per deployment type: single_gpu / single_node / multi_node
    train_batch: int  # step-1 micro-batch per GPU
    grad_accum_single_gpu: int  # keeps the single-GPU global batch near the multi-GPU one
    ppo_batch: int  # step-3 generation = training batch per GPU
    gradient_checkpointing: bool


# upper bound of parameters (billions) -> preset
SIZE_PRESETS: list[tuple[float, SizePreset]] = [
    (0.5, SizePreset("<=350m", {"single_gpu": 0, "single_node": 0, "multi_node": 0}, 16, 1, 32, False)),
    (2.0, SizePreset("1.3b", {"single_gpu": 0, "single_node": 2, "multi_node": 2}, 8, 2, 16, False)),
    (4.0, SizePreset("2.7b", {"single_gpu": 2, "single_node": 2, "multi_node": 2}, 8, 2, 16, True)),
    (10.0, SizePreset("6.7b", {"single_gpu": 3, "single_node": 3, "multi_node": 3}, 4, 4, 8, True)),
    (20.0, SizePreset("13b", {"single_gpu": 3, "single_node": 3, "multi_node": 3}, 4, 4, 4, True)),
    (1e9, SizePreset("30b+", {"single_gpu": 3, "single_node": 3, "multi_node": 3}, 2, 8, 2, True)),
]


def size_preset(params: int | None) -> SizePreset:
    """The preset for a model of `params` parameters (unknown size: the 1.3B preset)."""
    if params is None:
        return SIZE_PRESETS[1][1]
    for bound, preset in SIZE_PRESETS:
        if params <= bound * 1e9:
            return preset
    return SIZE_PRESETS[-1][1]


@dataclass(frozen=True)
class PipelineDataOptions:
    data_path: tuple[str, ...] = opt(("Dahoas/rm-static",), "Data source for all three steps, "
                                     "repeatable (see `dschat sft --help`).")
    data_dir: str | None = opt(None, "Folder with train.json and eval.json for --data-path "
                               "local/jsonfile.")
    data_split: str = opt("2,4,4", "Relative sizes of the parts for steps 1, 2 and 3.")
    data_cache_dir: str = opt("~/.cache/dschat/data", "Where tokenised data is cached.")

    def __post_init__(self) -> None:
        parse_split(self.data_split)


@dataclass(frozen=True)
class PipelineReportOptions:
    """Each step's ReportOptions (config/sections.py), given once for all of them."""
    report_to: tuple[str, ...] = opt((), "Experiment trackers of every step, repeatable (as "
                                     "`dschat sft --report-to`): tensorboard, wandb (each step "
                                     "a W&B run named after its folder, its job type the step), "
                                     "none; unset: each step YAML's value, or none.",
                                     choices=("none", *TRACKERS))
    wandb_project: str | None = opt(None, "W&B project of every step (with --report-to wandb); "
                                    "unset: each step YAML's value, or dschat.")

    def __post_init__(self) -> None:
        check_report_to(self.report_to)


@dataclass(frozen=True)
class PipelineConfig:
    actor: str = opt("opt-1.3b", "Actor model: a preset or size (opt-13b, 13b, llama-2-7b), a hub "
                     "id (facebook/opt-13b) or a local folder.")
    reward: str = opt("opt-350m", "Reward/critic base model (same forms as --actor); it must use "
                      "the actor's tokenizer.")
    method: str = opt(METHODS[0], "rlhf: step 1 (SFT), step 2 (reward model), step 3 (PPO or "
                      "--advantage-estimator); dpo: step 1 (SFT), then `dschat dpo` as step 2 on "
                      "the step-2 part of the data (DeepSpeed-Chat's step2_dpo_finetuning), no "
                      "reward model, no step 3.", choices=METHODS)
    steps: tuple[str, ...] = opt((), "Steps to run, by number or name: repeatable or "
                                 "comma-separated (--steps 2,3; --steps dpo); unset: every step "
                                 "of --method. Earlier steps' outputs must exist.")
    output_dir: str = opt("./output", "Root folder: actor-models/NAME, reward-models/NAME, "
                          "step3-models/NAME (--method dpo: dpo-models/NAME), summary.md and "
                          "summary.json.")
    random_init: bool = opt(False, "Build every preset-named model with random weights "
                            "(benchmarks, smoke runs).")
    actor_zero_stage: int | None = opt(None, "ZeRO stage for steps 1 and 3's actor and the DPO "
                                       "step's policy (default: the size preset's).",
                                       choices=(0, 1, 2, 3))
    reward_zero_stage: int | None = opt(None, "ZeRO stage for step 2 and step 3's critic (default: "
                                        "the size preset's).", choices=(0, 1, 2, 3))
    sft_config: str | None = opt(None, "YAML of step-1 options (as an sft run_config.yaml); any "
                                 "`dschat sft` option.")
    reward_config: str | None = opt(None, "YAML of step-2 options (any `dschat reward` option).")
    ppo_config: str | None = opt(None, "YAML of step-3 options (any `dschat ppo` option).")
    dpo_config: str | None = opt(None, "YAML of the DPO step's options with --method dpo (any "
                                 "`dschat dpo` option: --beta, --loss-type, ...).")
    advantage_estimator: str | None = opt(None, "Step 3's estimator (`dschat ppo "
                                          "--advantage-estimator`): gae (PPO with a critic), or "
                                          "critic-free grpo, dr-grpo, rloo, reinforce++, "
                                          "reinforce++-baseline; unset: the step YAML's, or gae.",
                                          choices=tuple(ESTIMATORS))
    samples_per_prompt: int | None = opt(None, "Step 3's answers per prompt (`dschat ppo "
                                         "--samples-per-prompt`); unset: the step YAML's, else 1 "
                                         "(the demo: 4 for the estimators that need a group).",
                                         min=1)
    min_reward_accuracy: float = opt(0.6, "Stop before step 3 unless the reward model's held-out "
                                     "accuracy reaches this.", min=0.0, max=1.0)
    rerun: bool = opt(False, "Re-run steps that already finished (default: skip them), and start "
                      "interrupted steps from the beginning instead of their latest checkpoint.")
    save_interval: int | None = opt(None, "Each step writes a resumable checkpoint every N of its "
                                    "optimizer steps (step 3: PPO steps), so a pipeline run again "
                                    "after a kill continues the interrupted step; unset: the step "
                                    "YAML's value or 0 (no checkpoints).", min=0)
    keep_last: int | None = opt(None, "Checkpoints each step keeps (unset: the step YAML's value "
                                "or 2).", min=1)
    demo: bool = opt(False, "Built-in demo: a tiny model and tokenizer built locally, a bundled "
                     "synthetic preference dataset, all three steps on CPU in a few minutes; no "
                     "download.")
    seed: int = opt(1234, "Random seed of every step.")
    data: PipelineDataOptions = section(PipelineDataOptions, panel="Data")
    launch: LaunchOptions = section(LaunchOptions, panel="Launch")
    report: PipelineReportOptions = section(PipelineReportOptions, panel="Reporting")

    @property
    def step_numbers(self) -> list[int]:
        """The --steps of --method, by number, in order (all of them when --steps is unset)."""
        from dschat_cli.config.steps import STEPS, pipeline_steps

        rows = pipeline_steps(self.method)
        known = {**{str(s.number): s.number for s in rows}, **{s.name: s.number for s in rows}}
        names = [f"{s.number} ({s.name})" for s in rows]
        names = ", ".join(names[:-1]) + f" and/or {names[-1]}"
        out: list[int] = []
        for item in self.steps:
            for part in str(item).replace(" ", ",").split(","):
                if not part:
                    continue
                if part.lower() not in known:
                    other = [m for s in STEPS if part.lower() in (str(s.number), s.name)
                             for m in s.methods if m != self.method]
                    what = (f"is a step of --method {other[0]}, not of --method {self.method}"
                            if other else f"is not a step of --method {self.method}")
                    raise ConfigError("--steps", f"'{part}' {what}; use {names}")
                if known[part.lower()] not in out:
                    out.append(known[part.lower()])
        if self.steps and not out:
            raise ConfigError("--steps", "names no step")
        return sorted(out) if out else [s.number for s in rows]

    def check(self) -> None:
        _ = self.step_numbers
        from dschat_cli.config.steps import pipeline_steps

        names = [s.name for s in pipeline_steps(self.method)]
        for field, step in _STEP_OPTIONS.items():
            if getattr(self, field) is not None and step not in names:
                flag = "--" + field.replace("_", "-")
                raise ConfigError(flag, f"sets `dschat {step}`, which --method {self.method} "
                                  f"does not run (its steps: {', '.join(names)}); drop "
                                  f"{flag} or pick the --method that runs it")


# pipeline options that only one step reads (unset: None), refused when --method skips that step
_STEP_OPTIONS = {"reward_zero_stage": "reward", "reward_config": "reward", "ppo_config": "ppo",
                 "advantage_estimator": "ppo", "samples_per_prompt": "ppo", "dpo_config": "dpo"}
