"""The one table of steps: what `dschat STEP`, `dschat pipeline`, `dschat plan`, the launcher and
the worker need to know about each step.

    spec = step("sft")
    cfg_cls = spec.config_class()              # SFTConfig
    run = load(spec.run)                       # dschat_cli.steps.sft:run, imported now

Code is named by lazy "module:function" references, imported only when used, so that this module
(and config/, which reads it) imports nothing above itself: the user's side reads the table
without importing torch, the rank's side without importing the pre-launch checks.

A new step is one new row here plus its modules (config, step, checks). Options a row names by a
dotted path ("deepspeed.dtype") are fields of the step's run config.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

DONE_MARKER = ".dschat_done.json"  # written by `dschat pipeline` when a step finished
METHODS = ("rlhf", "dpo")  # `dschat pipeline --method`: the first is the default


@dataclass(frozen=True)
class Step:
    name: str  # the command (`dschat sft`) and the worker's STEP argument
    summary: str  # one line: what the step does (the command's --help starts with it)
    config: str  # "module:Class" of its run config
    run: str  # "module:function" each rank calls: run(cfg, dist, resolved) -> dict
    validate: str  # "module:function(cfg)": pre-launch checks that read files, models, data
    # (skipped by --dry-run); ConfigError naming the flag on a mistake
    ds_configs: str  # "module:function(cfg, *, world_size, dtype, torch_adam, tensorboard_dir,
    # job_name) -> {role: DeepSpeed config}": the one builder per role (role "model" for a step
    # that trains one model)
    precision: str  # dotted path of its --dtype option
    torch_adam: str  # dotted path of its --torch-adam option
    seq_len: tuple[str, ...]  # dotted paths whose sum is the longest sequence a model sees
    tensorboard: str | None = None  # dotted path of its --enable-tensorboard option, if any
    report: str | None = None  # dotted path of its ReportOptions section (--report-to), if any
    validate_world: str | None = None  # "module:function(cfg, world_size)": checks that need the
    # run's world size; run before anything is resolved (dry runs and `dschat plan` too)
    data_phase: int | None = None  # which part of --data-split it trains on (1, 2, 3)
    memory: str | None = None  # how `dschat plan` estimates it: "single" (one trained model),
    # "ppo" (actor, critic, ref, reward); None: no `dschat plan STEP`
    number: int | None = None  # its place in `dschat pipeline --method` of its methods (1, 2, 3);
    # None: not in the pipeline
    methods: tuple[str, ...] = ()  # the `dschat pipeline --method`s it is a step of: rlhf (steps
    # 1, 2, 3) and dpo (step 1, then DPO as step 2: DeepSpeed-Chat's step2_dpo_finetuning)
    pipeline_dir: str | None = None  # the pipeline's folder: OUT/PIPELINE_DIR/MODEL_NAME
    pipeline_model: str = "actor"  # the `dschat pipeline` flag (--actor, --reward) that names the
    # model it trains: the base of its folder name, and what the pipeline's errors call the step's
    # model flag
    models: tuple[str, ...] = (".",)  # model folders it saves under --output-dir ("." is the
    # folder itself), the one the next step or `dschat chat` reads first
    done: str = DONE_MARKER

    def config_class(self) -> type:
        return load(self.config)

    def get(self, cfg: Any, path: str) -> Any:
        """The value of a dotted option path of this step's config: get(cfg, "deepspeed.dtype")."""
        value = cfg
        for part in path.split("."):
            value = getattr(value, part)
        return value


def load(ref: str):
    """Import "package.module:name" and return the name."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


STEPS: tuple[Step, ...] = (
    Step("sft", "Step 1: supervised fine-tuning of the actor on prompt + chosen answers.",
         config="dschat_cli.config.sft:SFTConfig", run="dschat_cli.steps.sft:run",
         validate="dschat_cli.checks:validate_sft",
         ds_configs="dschat_cli.config.ds_config:model_ds_configs",
         precision="deepspeed.dtype", torch_adam="optim.torch_adam",
         tensorboard="deepspeed.enable_tensorboard", report="report",
         seq_len=("data.max_seq_len",),
         data_phase=1, memory="single", number=1, methods=("rlhf", "dpo"),
         pipeline_dir="actor-models"),
    Step("reward", "Step 2: train a reward model (backbone + scalar value head) on "
         "chosen/rejected pairs.",
         config="dschat_cli.config.reward:RewardConfig", run="dschat_cli.steps.reward:run",
         validate="dschat_cli.checks:validate_reward",
         ds_configs="dschat_cli.config.ds_config:model_ds_configs",
         precision="deepspeed.dtype", torch_adam="optim.torch_adam",
         tensorboard="deepspeed.enable_tensorboard", report="report",
         seq_len=("data.max_seq_len",),
         data_phase=2, memory="single", number=2, methods=("rlhf",),
         pipeline_dir="reward-models", pipeline_model="reward"),
    Step("ppo", "Step 3: RLHF with PPO (actor, critic from the reward model, frozen reference and "
         "reward models).",
         config="dschat_cli.config.ppo:PPOConfig", run="dschat_cli.steps.ppo:run",
         validate="dschat_cli.checks:validate_ppo",
         validate_world="dschat_cli.checks:check_generation_tp",
         ds_configs="dschat_cli.config.ppo_ds:ppo_ds_configs",
         precision="deepspeed.dtype", torch_adam="train.torch_adam",
         tensorboard="deepspeed.enable_tensorboard", report="report",
         seq_len=("data.max_prompt_seq_len", "generation.max_answer_seq_len"),
         data_phase=3, memory="ppo", number=3, methods=("rlhf",), pipeline_dir="step3-models",
         models=("actor", "critic")),
    Step("dpo", "DPO: train the policy straight on chosen/rejected pairs against a frozen "
         "reference (no reward model, no PPO).",
         config="dschat_cli.config.dpo:DPOConfig", run="dschat_cli.steps.dpo:run",
         validate="dschat_cli.checks:validate_dpo",
         ds_configs="dschat_cli.config.dpo:dpo_ds_configs",
         precision="deepspeed.dtype", torch_adam="optim.torch_adam",
         tensorboard="deepspeed.enable_tensorboard", report="report",
         seq_len=("data.max_seq_len",),
         data_phase=2, number=2, methods=("dpo",), pipeline_dir="dpo-models",
         memory="dpo"),  # policy + reference: plan/memory.py estimate_dpo
    Step("bench", "Measure step 3 (or step 1) in DeepSpeed-Chat's benchmark setting on random "
         "weights.",
         config="dschat_cli.config.bench:BenchConfig", run="dschat_cli.steps.bench:run",
         validate="dschat_cli.checks:validate_bench",
         validate_world="dschat_cli.checks:check_bench_generation_tp",
         ds_configs="dschat_cli.config.bench:bench_ds_configs",
         precision="dtype", torch_adam="torch_adam", seq_len=("max_prompt_seq_len", "max_answer_seq_len"),
         models=()),
)

_BY_NAME = {s.name: s for s in STEPS}


def step(name: str) -> Step:
    """The row of step `name` (KeyError naming the known steps otherwise)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown step {name!r}; one of {', '.join(_BY_NAME)}") from None


def pipeline_steps(method: str = METHODS[0]) -> list[Step]:
    """The steps of `dschat pipeline --method METHOD`, in order."""
    if method not in METHODS:
        raise KeyError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    return sorted((s for s in STEPS if method in s.methods), key=lambda s: s.number)


def by_number(number: int, method: str = METHODS[0]) -> Step:
    return next(s for s in pipeline_steps(method) if s.number == number)
