"""`dschat pipeline`: steps 1, 2 and 3 in order, each as its own launch, then a time breakdown.

    dschat pipeline --actor opt-13b --reward opt-350m --deployment-type single_node
    dschat pipeline --demo
    dschat pipeline --demo --method dpo     # step 1, then DPO as step 2; no reward model, no PPO

User side only (it launches workers through launch/, like the step commands). The steps of each
--method, their folders and models are rows of the table in config/steps.py. Layout:
OUT/actor-models/NAME, OUT/reward-models/NAME, OUT/step3-models/NAME (--method dpo:
OUT/actor-models/NAME and OUT/dpo-models/NAME), each with its own train.log, run config,
DeepSpeed JSON and metrics, then OUT/summary.md and OUT/summary.json.
A finished step leaves a `.dschat_done.json` marker and is skipped when the pipeline runs again;
a step that failed or was killed has no marker and runs again: from its latest checkpoint (with
--save-interval; `--resume auto`), else from its start (and always from its start with --rerun).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dschat_cli.config import schema
from dschat_cli.config.pipeline import PipelineConfig, SizePreset, size_preset
from dschat_cli.config.schema import ConfigError
from dschat_cli.config.steps import Step, pipeline_steps, step as step_spec
from dschat_cli.ui.console import console, error_line

# The demo's step settings, by each step's own flag names (`dschat sft --num-train-epochs 3 ...`):
# tiny models on 2 CPU cores, a few minutes in all. They sit where the size presets do: under the
# step YAML and the pipeline's flags.
DEMO_STEPS: dict[str, dict[str, Any]] = {
    "sft": {"num_train_epochs": 5, "learning_rate": 2e-3, "per_device_train_batch_size": 16,
            "num_warmup_steps": 0, "max_seq_len": 96, "dtype": "fp32"},
    "reward": {"num_train_epochs": 2, "learning_rate": 1e-3, "per_device_train_batch_size": 16,
               "max_seq_len": 96, "dtype": "fp32"},
    "ppo": {"actor_learning_rate": 1e-4, "num_warmup_steps": 0,
            "per_device_generation_batch_size": 16, "per_device_training_batch_size": 16,
            "num_train_epochs": 2, "max_answer_seq_len": 48, "max_prompt_seq_len": 32,
            "max_eval_samples": 128, "dtype": "fp32", "true_reward": "demo"},
    # --method dpo's step 2: one pass over the 1,200 step-2 pairs, judged on all 256 eval pairs'
    # 106 held-out questions. Measured on 2 CPU cores (~30 s): true reward of sampled answers
    # 0.70 -> 0.76 (lr 2e-4, beta 0.2); lr 5e-4, or beta 0.1 at 2e-4, lowers the chosen answers'
    # log-probability further and gains less; a second epoch gains nothing. On another CPU
    # (2026-12-06, seeds 1234, 1, 2, 3) the sampled answers moved -0.01 .. +0.04 while the
    # greedy ones rose on every seed (32 questions: 0.88-0.91 -> 0.93-0.95).
    "dpo": {"num_train_epochs": 1, "learning_rate": 2e-4, "beta": 0.2,
            "per_device_train_batch_size": 16, "per_device_eval_batch_size": 16,
            "gradient_accumulation_steps": 1, "num_warmup_steps": 0, "max_seq_len": 96,
            "dtype": "fp32", "true_reward": "demo", "max_answer_seq_len": 48},
}
# ... and step 3's by estimator (over DEMO_STEPS["ppo"]): PPO's critic; the critic-free
# estimators answer 8 prompts 4 times per rollout, one pass over the prompts (measured on the
# demo, 2 CPU cores: ~40 s, held-out true reward 0.71 -> 0.80 with grpo, 0.77 with rloo; a second
# pass adds < 0.01; on another CPU, seeds 1234, 1, 2, 3: grpo +0.04 .. +0.08, to 0.78-0.82).
DEMO_ESTIMATOR_STEPS: dict[str, dict[str, Any]] = {
    # PPO's actor at 5e-5 rather than 1e-4: over seeds 1234, 1, 2, 3 (2 CPU cores, 2026-12-06)
    # its greedy answers to 32 held-out questions beat SFT's on every seed (+0.030 .. +0.060;
    # at 1e-4 they were worse on two: -0.056, -0.017) and its sampled answers gained
    # +0.055 .. +0.087 (at 1e-4: +0.041 .. +0.079)
    "gae": {"critic_learning_rate": 5e-4, "kl_ctl": 0.3, "actor_learning_rate": 5e-5},
    **{name: {"samples_per_prompt": 4, "per_device_generation_batch_size": 8,
              "per_device_training_batch_size": 16, "num_train_epochs": 1, "kl_ctl": 0.3}
       for name in ("grpo", "dr-grpo", "rloo", "reinforce++", "reinforce++-baseline")},
}


@dataclass
class StepPlan:
    spec: Step  # the step's row in the table
    out: Path
    cfg: Any  # SFTConfig / RewardConfig / PPOConfig / DPOConfig
    preset: SizePreset | None
    inputs: tuple[Path, ...] = ()  # the folders of earlier steps it reads (step 1's actor, ...)

    @property
    def number(self) -> int:
        return self.spec.number

    @property
    def name(self) -> str:  # sft / reward / ppo / dpo
        return self.spec.name

    @property
    def label(self) -> str:  # "step 2 (dpo)"
        return f"step {self.number} ({self.name})"


def model_name(model: str) -> str:
    """Folder name for a model argument: 'opt-13b' / 'facebook/opt-13b' -> 'opt-13b'."""
    from dschat_cli.models.presets import resolve_preset

    p = Path(model).expanduser()
    if p.is_dir():
        return p.resolve().name
    return resolve_preset(model) or model.rstrip("/").split("/")[-1]


def model_params(model: str) -> int | None:
    """Parameter count from the architecture alone (preset or a config.json that is at hand);
    None when it cannot be known without the network."""
    from dschat_cli.models.presets import param_count, preset_config, resolve_preset

    cfg = None
    p = Path(model).expanduser()
    if (p / "config.json").is_file():
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    elif resolve_preset(model):
        cfg = preset_config(resolve_preset(model))
    if cfg is None:
        return None
    try:
        return param_count(cfg)
    except (ValueError, KeyError):
        return _meta_param_count(cfg)


def _meta_param_count(cfg: dict) -> int | None:
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        raw = dict(cfg)
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def _step_config(cfg: PipelineConfig, spec: Step, preset: dict[str, Any],
                 flags: dict[str, Any], check: bool = True) -> Any:
    """One step's config: size preset < step YAML (--sft-config, ...) < pipeline flags. The
    preset and flag layers are keyed by the step's own flag names and go through the resolver of
    the step's command (config/schema.py), with its type, choice and range checks (and its
    cross-field checks unless `check` is False)."""
    cls = spec.config_class()
    step_cfg = schema.resolve(cls, getattr(cfg, f"{spec.name}_config"),
                              schema.flag_values(cls, flags), base=schema.flag_values(cls, preset),
                              yaml_flag=f"--{spec.name}-config")
    if check:
        step_cfg.check()
    return step_cfg


def step_dir(cfg: PipelineConfig, spec: Step, estimator: str = "gae") -> Path:
    """OUT/PIPELINE_DIR/NAME, named after the model the step trains (the table's pipeline_model:
    --reward for step 2, --actor for the others); step 3 with another estimator than PPO's gae
    gets its own folder, NAME-ESTIMATOR, so that runs of several estimators over the same steps 1
    and 2 sit side by side."""
    root = Path(cfg.output_dir).expanduser().resolve()
    name = model_name(getattr(cfg, spec.pipeline_model))
    if spec.name == "ppo" and estimator != "gae":
        name = f"{name}-{estimator}"
    return root / spec.pipeline_dir / name


def plan_pipeline(cfg: PipelineConfig) -> list[StepPlan]:
    """The step configs of --method, resolved, and of those the ones --steps selects (nothing
    runs, nothing is read from the network). Every step of the method is resolved, so that a
    mistake in any step YAML is found before the first step starts."""
    dep = cfg.launch.deployment_type
    sft, reward, ppo = (step_spec(name) for name in ("sft", "reward", "ppo"))
    actor_preset = size_preset(model_params(cfg.actor))
    actor_dir = step_dir(cfg, sft)
    actor = str(actor_dir / sft.models[0])  # what the steps after step 1 start from
    # the pipeline's --data-*, launch and reporting options are the steps' options of the same
    # names (the reporting ones when given)
    common = {**{f.name: getattr(cfg.data, f.name) for f in fields(cfg.data)},
              **{f.name: getattr(cfg.launch, f.name) for f in fields(cfg.launch)},
              **{f.name: getattr(cfg.report, f.name) for f in fields(cfg.report)
                 if getattr(cfg.report, f.name) not in (None, ())},
              "seed": cfg.seed, "overwrite": True,
              **{k: getattr(cfg, k) for k in ("save_interval", "keep_last")
                 if getattr(cfg, k) is not None}}
    from dschat_cli.models.presets import resolve_preset

    def random(model: str) -> bool:
        return cfg.random_init and resolve_preset(model) is not None \
            and not Path(model).expanduser().exists()

    def zero(p: SizePreset, stage: int | None) -> int:
        return stage if stage is not None else p.zero_stage[dep]

    def single_model(p: SizePreset, stage: int | None) -> dict[str, Any]:
        return {"zero_stage": zero(p, stage), "per_device_train_batch_size": p.train_batch,
                "gradient_accumulation_steps":
                    p.grad_accum_single_gpu if dep == "single_gpu" else 1,
                "gradient_checkpointing": p.gradient_checkpointing}

    demo = DEMO_STEPS if cfg.demo else {}

    def plan_sft() -> StepPlan:
        return StepPlan(sft, actor_dir, _step_config(cfg, sft, {
            **single_model(actor_preset, cfg.actor_zero_stage), **demo.get("sft", {})}, {
            **common, "model": cfg.actor, "random_init": random(cfg.actor),
            "output_dir": str(actor_dir)}), actor_preset)

    def plan_reward() -> StepPlan:
        reward_preset = size_preset(model_params(cfg.reward))
        out = step_dir(cfg, reward)
        return StepPlan(reward, out, _step_config(cfg, reward, {
            **single_model(reward_preset, cfg.reward_zero_stage),
            "gradient_accumulation_steps": 1, **demo.get("reward", {})}, {
            **common, "model": cfg.reward, "random_init": random(cfg.reward),
            "output_dir": str(out)}), reward_preset)

    def plan_ppo() -> StepPlan:
        reward_preset = size_preset(model_params(cfg.reward))
        reward_dir = step_dir(cfg, reward)
        ppo_preset = {
            "actor_zero_stage": zero(actor_preset, cfg.actor_zero_stage),
            "critic_zero_stage": zero(reward_preset, cfg.reward_zero_stage),
            "per_device_generation_batch_size": actor_preset.ppo_batch,
            "per_device_training_batch_size": actor_preset.ppo_batch,
            "actor_gradient_checkpointing": actor_preset.gradient_checkpointing,
            **demo.get("ppo", {})}
        ppo_flags = {
            **common, "actor_model": actor, "critic_model": str(reward_dir / reward.models[0]),
            **{k: getattr(cfg, k) for k in ("advantage_estimator", "samples_per_prompt")
               if getattr(cfg, k) is not None}}
        # the estimator the run ends up with (flag < step YAML < pipeline flag) names step 3's
        # folder and, in the demo, picks its settings
        estimator = _step_config(cfg, ppo, ppo_preset, ppo_flags, check=False) \
            .ppo.advantage_estimator
        out = step_dir(cfg, ppo, estimator)
        ppo_flags["output_dir"] = str(out)
        if cfg.demo:
            ppo_preset.update(DEMO_ESTIMATOR_STEPS[estimator])
        return StepPlan(ppo, out, _step_config(cfg, ppo, ppo_preset, ppo_flags), actor_preset,
                        inputs=(actor_dir, reward_dir))

    def plan_dpo() -> StepPlan:
        spec = step_spec("dpo")
        out = step_dir(cfg, spec)
        # a pair is two sequences and the reference adds a forward pass: half step 1's
        # micro-batch, twice its accumulation (the same global batch, counted in pairs)
        preset = single_model(actor_preset, cfg.actor_zero_stage)
        micro = max(1, actor_preset.train_batch // 2)
        preset.update(per_device_train_batch_size=micro, per_device_eval_batch_size=micro,
                      gradient_accumulation_steps=preset["gradient_accumulation_steps"]
                      * (actor_preset.train_batch // micro))
        return StepPlan(spec, out, _step_config(cfg, spec, {**preset, **demo.get("dpo", {})}, {
            **common, "model": actor, "output_dir": str(out)}), actor_preset,
            inputs=(actor_dir,))

    build = {"sft": plan_sft, "reward": plan_reward, "ppo": plan_ppo, "dpo": plan_dpo}
    plans = [build[s.name]() for s in pipeline_steps(cfg.method)]
    return [p for p in plans if p.number in cfg.step_numbers]


def plan_memory(cfg: PipelineConfig, target) -> list:
    """`dschat plan pipeline`: each step's plan (plan/planner.py's StepPlan) as the pipeline sets
    it up, resolved as its launch would be. The steps after step 1 read the models earlier steps
    will write; until they exist, their architectures are the pipeline's --actor and --reward. A
    step the planner has no memory model for is said so and left out."""
    from dschat_cli.launch.step import plan_run
    from dschat_cli.plan.arch import PlanUnavailable

    if cfg.demo:
        raise ConfigError("--demo", "the demo trains tiny models on CPU; plan a GPU run with "
                          "--actor and --reward instead")
    plans = []
    for p in plan_pipeline(cfg):
        if p.spec.memory is None:
            console.print(Text(f"{p.label}: no memory estimate (`dschat plan` has no memory "
                               f"model for dschat {p.name} yet); the other steps are planned",
                               style="warn"))
            continue
        try:
            archs = _pipeline_archs(cfg, p)
        except PlanUnavailable as e:
            raise ConfigError(e.flag, f"cannot estimate memory: {e}") from None
        title = f"step {p.number}: dschat {p.name}" + (f" (size preset {p.preset.name})"
                                                       if p.preset is not None else "")
        try:
            sp = plan_run(p.name, p.cfg, target, archs=archs, title=title)
        except ConfigError as e:
            raise _pipeline_error(e, p.name) from None
        if sp.unavailable:  # the steps read the pipeline's --actor and --reward
            raise ConfigError("--reward" if p.spec.pipeline_model == "reward" else "--actor",
                              f"cannot estimate memory: {sp.unavailable}")
        plans.append(sp)
    return plans


def _pipeline_archs(cfg: PipelineConfig, p: StepPlan) -> dict | None:
    """The architectures of a step's models when it starts from earlier steps' outputs: those
    folders once written, before that (a dry run, a plan) the pipeline's --actor and --reward
    they are trained from. None: the step reads its own models (steps 1 and 2)."""
    if not p.inputs:
        return None
    if p.spec.memory == "ppo":
        from dschat_cli.plan.planner import pipeline_ppo_archs

        return pipeline_ppo_archs(p.cfg, cfg.actor, cfg.reward)
    from dschat_cli.plan.arch import load_arch

    model = p.cfg.model.model  # one trained model (DPO: its reference has the same architecture)
    where = model if (Path(model) / "config.json").is_file() else cfg.actor
    return {"model": load_arch(where, p.cfg.model.dropout, flag="--actor")}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


# what the pipeline reads of a step's train_summary.json, and how the time table describes it
_HELDOUT_KEYS = ("true_reward_heldout_start", "true_reward_heldout_end",
                 "true_reward_heldout_start_stderr", "true_reward_heldout_end_stderr",
                 "heldout_end_n", "greedy_true_reward_start", "greedy_true_reward_end",
                 "samples_start", "samples_end")


def step_metrics(plan: StepPlan) -> dict:
    """The key figures of a finished step, from its train_summary.json."""
    s = _read_json(plan.out / "train_summary.json")
    if not s:
        return {}
    if plan.name == "sft":
        return {"eval_ppl_start": s.get("eval_ppl_start"), "eval_ppl_end": s.get("eval_ppl_end")}
    if plan.name == "reward":
        start, end = s.get("eval_start") or {}, s.get("eval_end") or {}
        return {"accuracy_start": start.get("accuracy"), "accuracy_end": end.get("accuracy"),
                "chosen_end": end.get("chosen"), "rejected_end": end.get("rejected")}
    if plan.name == "dpo":
        keys = ("eval_accuracy_start", "eval_accuracy_end", "eval_margin_end",
                "eval_chosen_logprob_start", "eval_chosen_logprob_end", "eval_pairs", "steps")
        return {k: s.get(k) for k in keys + _HELDOUT_KEYS}
    last = s.get("last") or {}
    keys = ("reward_heldout_start", "reward_heldout_end", "reward_heldout_start_stderr",
            "reward_heldout_end_stderr", "steps")
    return {**{k: s.get(k) for k in keys + _HELDOUT_KEYS}, "kl_last": last.get("kl"),
            "repetition_last": last.get("repetition")}


def _curves(plans: list[StepPlan], rows: list[dict]) -> list[tuple[str, str, str]]:
    """(step, figure, sparkline with first -> last) of the steps that finished or ran, from their
    metrics.jsonl (report/sparkline.py's CURVES: step 3's reward, true reward and KL)."""
    from dschat_cli.report.sparkline import step_curves

    by_number = {p.number: p for p in plans}
    out = []
    for r in rows:
        p = by_number[r["step"]]
        if r["status"] == "not run":  # its folder may hold an older run's metrics
            continue
        for figure, line in step_curves(p.name, p.out):
            out.append((f"step {p.number} ({p.name})", figure, line))
    return out


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def _describe(plan: StepPlan, m: dict) -> str:
    if not m:
        return ""
    if plan.name == "sft":
        return f"perplexity {_fmt(m['eval_ppl_start'], '.2f')} -> {_fmt(m['eval_ppl_end'], '.2f')}"
    if plan.name == "reward":
        return (f"accuracy {_fmt(m['accuracy_start'])} -> {_fmt(m['accuracy_end'])} "
                f"(chosen {_fmt(m['chosen_end'])}, rejected {_fmt(m['rejected_end'])})")
    if plan.name == "dpo":
        text = (f"accuracy {_fmt(m.get('eval_accuracy_start'))} -> "
                f"{_fmt(m.get('eval_accuracy_end'))}, margin {_fmt(m.get('eval_margin_end'))}, "
                f"chosen logprob/token {_fmt(m.get('eval_chosen_logprob_start'))} -> "
                f"{_fmt(m.get('eval_chosen_logprob_end'))} ({m.get('eval_pairs') or '-'} pairs)")
        true = _true_reward_text(m)
        return text + (f"; {true} ({m.get('heldout_end_n') or '-'} prompts)" if true else "")
    text = (f"held-out reward {_pm(m, 'reward_heldout_start')} -> "
            f"{_pm(m, 'reward_heldout_end')}")
    true = _true_reward_text(m)
    return text + (f"; {true}" if true else "") + \
        f" (n={m.get('heldout_end_n') or '-'}); KL {_fmt(m['kl_last'], '.4f')}"


def _true_reward_text(m: dict) -> str:
    """'true reward a ± e -> b ± e (greedy answers x -> y)' when the step had a --true-reward."""
    if not _finite(m.get("true_reward_heldout_end")):
        return ""
    text = (f"true reward {_pm(m, 'true_reward_heldout_start')} -> "
            f"{_pm(m, 'true_reward_heldout_end')}")
    if _finite(m.get("greedy_true_reward_end")):
        text += (f" (greedy answers {_fmt(m.get('greedy_true_reward_start'))} -> "
                 f"{_fmt(m['greedy_true_reward_end'])})")
    return text


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and v == v


def _pm(m: dict, key: str) -> str:
    """mean ± standard error of a held-out figure (older summaries have no error)."""
    err = m.get(key + "_stderr")
    return _fmt(m.get(key)) + (f" ± {err:.3f}" if _finite(err) else "")


def _answered(rows: list[dict]) -> dict | None:
    """The last step's row that reports greedy held-out answers before and after it (step 3, or
    DPO with --true-reward)."""
    return next((r for r in reversed(rows) if (r["metrics"] or {}).get("samples_end")), None)


def _answers_table(rows: list[dict]):
    """That step's greedy answers to the first held-out prompts, before and after, side by side."""
    row = _answered(rows)
    if row is None:
        return None
    m, step = row["metrics"], f"step {row['step']} ({row['name']})"
    table = Table(title=f"held-out answers (greedy), before and after {step}", show_lines=True,
                  title_justify="left")
    for col in ("prompt", "before (step-1 model)", f"after {step}"):
        table.add_column(col, ratio=1 if col == "prompt" else 2)
    for before, after in list(zip(m.get("samples_start") or [], m["samples_end"]))[:4]:
        table.add_row(Text(after["prompt"]), Text(before["answer"] or "(empty)"),
                      Text(after["answer"] or "(empty)"))
    return table


def prepare_demo(cfg: PipelineConfig) -> PipelineConfig:
    """Build the demo's tiny model, tokenizer and data under OUT (once) and point the pipeline at
    them."""
    import dataclasses

    from dschat_cli.demo.assets import DEMO_SPLIT, build_demo_inputs

    base, data = build_demo_inputs(Path(cfg.output_dir).expanduser().resolve())
    return dataclasses.replace(
        cfg, actor=str(base), reward=str(base), random_init=False,
        data=dataclasses.replace(cfg.data, data_path=("local/jsonfile",), data_dir=str(data),
                                 data_split=DEMO_SPLIT))


def _plan_archs(cfg: PipelineConfig, p: StepPlan):
    """The memory estimate of a step that reads earlier steps' models; before they exist (a dry
    run) it uses the architectures of the pipeline's --actor and --reward."""
    if not p.inputs or p.spec.memory is None:
        return None
    return lambda: _pipeline_archs(cfg, p)


def run_pipeline(cfg: PipelineConfig, *, dry_run: bool) -> int:
    from dschat_cli.launch.step import launch_training

    if not dry_run:  # a file in the way fails here, not mid-pipeline
        from dschat_cli.launch.step import check_output_dir

        check_output_dir(cfg.output_dir, True)
    if cfg.demo and not dry_run:
        cfg = prepare_demo(cfg)
    plans = plan_pipeline(cfg)
    root = Path(cfg.output_dir).expanduser().resolve()
    if dry_run:
        for p in plans:
            console.rule(f"[bold]step {p.number}: dschat {p.name} -> {escape(str(p.out))}")
            if p.preset is not None:
                console.print(f"size preset: {p.preset.name}")
            try:
                launch_training(p.name, p.cfg, dry_run=True, plan_archs=_plan_archs(cfg, p))
            except ConfigError as e:
                raise _pipeline_error(e, p.name) from None
        return 0

    checked = _validate_up_front(cfg, plans)
    rows: list[dict] = []
    rc = 0
    for p in plans:
        marker = p.out / p.spec.done
        if marker.is_file() and not cfg.rerun:
            done = _read_json(marker)
            console.print(Text(f"{p.label} finished earlier in {p.out}: skipping (--rerun to "
                               "run it again)"))
            rows.append({"step": p.number, "name": p.name, "status": "done earlier",
                         "seconds": done.get("seconds"), "metrics": step_metrics(p)})
        else:
            if p.name == "ppo":
                gate = _reward_gate(cfg, plans)
                if gate is not None:
                    rows.append({"step": p.number, "name": p.name, "status": "not run",
                                 "seconds": None, "metrics": {}})
                    error_line("--min-reward-accuracy", gate)
                    rc = 3
                    break
            console.rule(f"[bold]step {p.number}: dschat {p.name}")
            marker.unlink(missing_ok=True)
            t0 = time.perf_counter()
            try:
                rc = launch_training(p.name, _resuming(p.cfg, cfg.rerun), dry_run=False,
                                     checked=p.number in checked,
                                     restart_hint="pass --rerun (with --steps "
                                                  f"{p.number}) to run the step from its start",
                                     plan_archs=_plan_archs(cfg, p))
            except ConfigError as e:
                raise _pipeline_error(e, p.name) from None
            seconds = time.perf_counter() - t0
            if rc != 0:
                rows.append({"step": p.number, "name": p.name, "status": f"failed ({rc})",
                             "seconds": seconds, "metrics": {}})
                break
            marker.write_text(json.dumps({"seconds": seconds, "finished": time.time()}) + "\n")
            rows.append({"step": p.number, "name": p.name, "status": "ran", "seconds": seconds,
                         "metrics": step_metrics(p)})
    # total of the steps' own times (a skipped step counts with the time it took when it ran)
    total = sum(r["seconds"] or 0.0 for r in rows)
    _summarise(cfg, plans, rows, total, root)
    _write_report(root, {p.name: p.out for p in plans})
    last = plans[-1]
    if rc == 0 and last.spec == pipeline_steps(cfg.method)[-1]:
        model = last.out / last.spec.models[0]
        console.print(Text(f"\nChat with the trained actor:\n  dschat chat --path {model}"))
    return rc


def _write_report(root: Path, step_dirs: dict) -> None:
    """OUT/report.html: the steps' curves and the answers before and after (dschat_cli/report/).
    A report that cannot be written is one warning line, never a failed pipeline."""
    from dschat_cli.report import write_pipeline_report
    from dschat_cli.ui.console import warn_line

    try:
        path = write_pipeline_report(root, step_dirs)
    except Exception as e:  # noqa: BLE001 - matplotlib missing, a full disk, a bug: all the same
        warn_line(f"pipeline report not written ({type(e).__name__}: {str(e)[:200]}); rebuild it "
                  f"with: dschat report {root}")
        return
    console.print(Text(f"report: {path}"))


def _resuming(step_cfg, rerun: bool):
    """A step that runs again without --rerun was interrupted (or never ran): it continues from
    its latest checkpoint, if it wrote one (`--resume auto`; a --resume of the step's YAML wins)."""
    import dataclasses

    if rerun or step_cfg.checkpoint.resume:
        return step_cfg
    return dataclasses.replace(step_cfg, checkpoint=dataclasses.replace(step_cfg.checkpoint,
                                                                        resume="auto"))


# The pipeline's flag for a step's flag named in an error: steps 1 and 3 and DPO train --actor,
# step 2 --reward (--random-init is the same flag in both).
_PIPELINE_FLAGS = {"sft": {"--model": "--actor"}, "reward": {"--model": "--reward"},
                   "ppo": {"--actor-model": "--actor"}, "dpo": {"--model": "--actor"}}


def _pipeline_error(e: ConfigError, step: str) -> ConfigError:
    """A step's error in the pipeline's words: 'error: --actor: ...', not the step's --model."""
    import re

    where, message = e.where, e.message
    for old, new in _PIPELINE_FLAGS.get(step, {}).items():
        flag = re.compile(re.escape(old) + r"(?![\w-])")
        where, message = flag.sub(new, where), flag.sub(new, message)
    return ConfigError(where, message)


def _validate_up_front(cfg: PipelineConfig, plans: list[StepPlan]) -> set[int]:
    """Check every step that will run before the first starts, so that a mistake in step 2's or
    3's inputs (say, data without rejected answers) costs seconds, not a finished step 1. A step
    that starts from an earlier step's output that runs now is checked in part here, the rest when
    it launches: DPO's policy as the model step 1 starts from (same architecture and tokenizer,
    so its checks of LoRA targets and of its pairs run now), step 3 (actor and critic from steps
    1 and 2) its data only. Returns the steps checked in full."""
    import dataclasses

    from dschat_cli.config.steps import load
    from dschat_cli.data.prepare import load_phase_rows

    todo = [p for p in plans if cfg.rerun or not (p.out / p.spec.done).is_file()]
    full: set[int] = set()
    for p in todo:
        try:
            before = [q for q in todo if q.out in p.inputs]
            if before and hasattr(p.cfg, "model"):  # one model, trained from step 1's
                start = before[0].cfg.model
                load(p.spec.validate)(dataclasses.replace(p.cfg, model=dataclasses.replace(
                    p.cfg.model, **{k: getattr(start, k) for k in (
                        "model", "tokenizer", "random_init", "trust_remote_code")})))
                continue
            if before:
                data = p.cfg.data  # step 3's prompt options hold the shared DataOptions
                data = data.as_data_options() if hasattr(data, "as_data_options") else data
                load_phase_rows(data, phase=p.spec.data_phase, seed=p.cfg.seed)
                continue
            load(p.spec.validate)(p.cfg)
        except ConfigError as e:
            raise _pipeline_error(e, p.name) from None
        full.add(p.number)
    return full


def _reward_gate(cfg: PipelineConfig, plans: list[StepPlan]) -> str | None:
    reward_dir = next((p.out for p in plans if p.name == "reward"), None) or \
        step_dir(cfg, step_spec("reward"))
    acc = ((_read_json(reward_dir / "train_summary.json").get("eval_end")) or {}).get("accuracy")
    if acc is None:
        return None  # no eval figure (e.g. a reward model from elsewhere): nothing to gate on
    if acc < cfg.min_reward_accuracy:
        return (f"the reward model's held-out accuracy is {acc:.3f}, below "
                f"{cfg.min_reward_accuracy}; improve step 2 (more data or epochs) or pass a lower "
                "--min-reward-accuracy to run step 3 anyway")
    return None


def _summarise(cfg: PipelineConfig, plans: list[StepPlan], rows: list[dict], total: float,
               root: Path) -> None:
    table = Table(title="dschat pipeline: time breakdown", title_justify="left")
    for col in ("step", "status", "time", "key figures", "output"):
        table.add_column(col, justify="right" if col == "time" else "left")
    by_number = {p.number: p for p in plans}
    for r in rows:
        p = by_number[r["step"]]
        secs = r["seconds"]
        table.add_row(f"step {r['step']} ({r['name']})", r["status"],
                      "-" if secs is None else f"{secs / 60:.1f} min" if secs >= 120 else f"{secs:.1f} s",
                      Text(_describe(p, r["metrics"])), Text(str(p.out)))
    table.add_row("total", "", f"{total / 60:.1f} min" if total >= 120 else f"{total:.1f} s", "", "")
    console.print(table)
    curves = _curves(plans, rows)
    if curves:
        ct = Table(title="curves over training (first -> last value)", title_justify="left")
        for col in ("step", "figure", "curve"):
            ct.add_column(col)
        for label, figure, line in curves:
            ct.add_row(label, figure, Text(line))
        console.print(ct)
    answers = _answers_table(rows)
    if answers is not None:
        console.print(answers)
    root.mkdir(parents=True, exist_ok=True)
    trained = {s.pipeline_model for s in pipeline_steps(cfg.method)}
    summary = {"method": cfg.method, **{k: getattr(cfg, k) for k in ("actor", "reward")
                                        if k in trained},
               "total_seconds": total, "steps": rows}
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    lines = ["# dschat pipeline summary", "", "| step | status | time (s) | key figures | output |",
             "|---|---|---|---|---|"]
    for r in rows:
        p = by_number[r["step"]]
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['step']} ({r['name']}) | {r['status']} | {secs} | "
                     f"{_describe(p, r['metrics'])} | {p.out} |")
    lines.append(f"| total | | {total:.1f} | | |")
    if curves:
        lines += ["", "## Curves over training (first -> last value)", "", "```"]
        lines += [f"{label:<14} {figure:<22} {line}" for label, figure, line in curves]
        lines.append("```")
    row = _answered(rows)
    if row is not None:
        m, step = row["metrics"], f"step {row['step']} ({row['name']})"
        lines += ["", f"## Held-out answers (greedy), before and after {step}", "",
                  f"| prompt | before (step-1 model) | after {step} |", "|---|---|---|"]
        for before, after in zip(m.get("samples_start") or [], m["samples_end"]):
            cells = (after["prompt"], before["answer"], after["answer"])
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    (root / "summary.md").write_text("\n".join(lines) + "\n")
    console.print(Text(f"summary written to {root / 'summary.md'} and summary.json"))
