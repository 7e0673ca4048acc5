"""`dschat plan sft|reward|dpo|ppo|pipeline`: estimate GPU memory and explain batch sizes and step
counts before running. Each subcommand takes the flags of the training command of the same name, so
`dschat plan` can be put in front of a command line (no torch import here)."""

from __future__ import annotations

import inspect
from typing import Optional

import typer

from dschat_cli.cli.options import config_command
from dschat_cli.config.pipeline import PipelineConfig
from dschat_cli.config.steps import STEPS

HELP = ("Estimate GPU memory per GPU (weights, gradients, optimizer states, activations, KV cache; "
        "for each model and each phase) against the GPUs here or --gpu-memory, explain the batch "
        "sizes and step counts, and suggest changes when it does not fit. Put `plan` in front of "
        "a training command: it takes the same flags (those that change neither memory nor step "
        "counts, such as --output-dir, are accepted and have no effect). Exit code 0: fits, or no "
        "GPU to compare with; 1: does not fit; 2: usage error.")

_EXTRA = [
    inspect.Parameter("gpu_memory", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[float],
                      default=typer.Option(None, "--gpu-memory", min=0.1, rich_help_panel="Plan",
                                           help="Memory of one GPU in GiB to check against "
                                                "(default: the smallest GPU here, from "
                                                "nvidia-smi).")),
    inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                      default=typer.Option(False, "--json", rich_help_panel="Plan",
                                           help="Print the plan as JSON (for scripts).")),
]

# `dschat plan STEP` for every step of the table with a memory model (config/steps.py), and the
# pipeline's three steps together
_EXAMPLES = {
    "sft": "dschat plan sft --model opt-1.3b --zero-stage 2 --per-device-train-batch-size 32",
    "reward": "dschat plan reward --model opt-350m --gpu-memory 80",
    "ppo": "dschat plan ppo --actor-model opt-1.3b --critic-model opt-350m --actor-zero-stage 2 "
           "--critic-zero-stage 2. Critic-free, 8 answers per prompt: dschat plan ppo "
           "--actor-model opt-1.3b --critic-model opt-350m --advantage-estimator grpo "
           "--samples-per-prompt 8",
    "dpo": "dschat plan dpo --model opt-1.3b --zero-stage 0 --per-device-train-batch-size 8 "
           "--max-seq-len 512 --gpu-memory 80 (add --precompute-ref-logprobs: no reference copy "
           "while the policy trains)",
    "pipeline": "dschat plan pipeline --actor opt-13b --deployment-type single_node",
}
_NOTES = {
    "dpo": "Each pair is two sequences (chosen + rejected) of up to --max-seq-len tokens; the "
           "reference is a frozen copy in memory (offloaded with --offload-reference-model), or "
           "none while training with --precompute-ref-logprobs (the copy scores the pairs first, "
           "then is freed) or with LoRA and --only-optimize-lora (the policy with its adapters "
           "off). ",
    "ppo": "With a critic-free --advantage-estimator (grpo, dr-grpo, rloo, reinforce++, "
           "reinforce++-baseline) the plan has no critic (no weights, optimizer states or "
           "training phases); --samples-per-prompt N sizes generation and scoring for "
           "--per-device-generation-batch-size prompts x N answers. ",
}
PIPELINE_HELP = "Plan all three steps as `dschat pipeline` sets them up (size presets included)."


def _handler(step: str):
    def handle(cfg, *, gpu_memory: float | None, as_json: bool) -> int:
        from dschat_cli.launch import runner
        from dschat_cli.plan.command import checked, report
        from dschat_cli.plan.planner import detect_target

        cfg = checked(cfg)
        target = detect_target(gpu_memory, gpus=runner.query_gpus())
        if step == "pipeline":
            from dschat_cli.pipeline import plan_memory

            plans = plan_memory(cfg, target)
        else:
            from dschat_cli.launch.step import plan_run

            plans = [plan_run(step, cfg, target)]
        return report(plans, target, as_json=as_json, pipeline=step == "pipeline")
    return handle


def register(app: typer.Typer) -> None:
    plan_app = typer.Typer(name="plan", help=HELP, no_args_is_help=True, rich_markup_mode="rich",
                           context_settings={"help_option_names": ["-h", "--help"]})
    commands = [(s.name, s.config_class(), f"Plan `dschat {s.name}` ({s.summary.rstrip('.')}): "
                 "memory and step counts.") for s in STEPS if s.memory]
    commands.append(("pipeline", PipelineConfig, PIPELINE_HELP))
    for name, cls, help_text in commands:
        example = _EXAMPLES.get(name)
        config_command(plan_app, name, cls, handler=_handler(name),
                       help=help_text + f" Takes the flags of `dschat {name}`, plus --gpu-memory "
                       "and --json. " + _NOTES.get(name, "") + "Exit code 0: fits (or no GPU to "
                       "compare with); 1: does not fit.",
                       extra=list(_EXTRA), epilog=f"Example: {example}" if example else None,
                       with_dry_run=False, check=False)
    app.add_typer(plan_app, name="plan")
