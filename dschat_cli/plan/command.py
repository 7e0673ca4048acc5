"""`dschat plan sft|reward|ppo|pipeline ...`: what the command-line handler runs.

    rc = run_plan("sft", cfg, gpu_memory=None, as_json=False)

Exit codes: 0 when the run fits (or there is no GPU to compare with), 1 when a step does not
fit, 2 for a usage error (raised as ConfigError, printed by the CLI).
"""

from __future__ import annotations

import dataclasses
import json

from dschat_cli.config.schema import ConfigError
from dschat_cli.plan.arch import PlanUnavailable
from dschat_cli.plan.planner import StepPlan, detect_target, pipeline_ppo_archs, plan_step


def _checked(cfg):
    """The training command's cross-field checks; --output-dir is not needed to plan."""
    if hasattr(cfg, "output_dir") and not cfg.output_dir:
        dataclasses.replace(cfg, output_dir="plan").check()
    else:
        cfg.check()
    return cfg


def _pipeline_plans(cfg, target) -> list[StepPlan]:
    """Steps 1-3 as `dschat pipeline` would configure them. Step 3 reads the models steps 1 and 2
    will write; until they exist, their architectures are the pipeline's --actor and --reward."""
    from dschat_cli.pipeline import plan_pipeline

    if cfg.demo:
        raise ConfigError("--demo", "the demo trains tiny models on CPU; plan a GPU run with "
                          "--actor and --reward instead")
    plans = []
    for p in plan_pipeline(cfg):
        archs = None
        if p.number == 3:
            try:
                archs = pipeline_ppo_archs(p.cfg, cfg.actor, cfg.reward)
            except PlanUnavailable as e:
                raise ConfigError(e.flag, f"cannot estimate memory: {e}") from None
        title = f"step {p.number}: dschat {p.name}" + (f" (size preset {p.preset.name})"
                                                       if p.preset is not None else "")
        sp = plan_step(p.name, p.cfg, target, archs=archs, title=title)
        if sp.unavailable:  # steps 1 and 2 read the pipeline's --actor and --reward
            raise ConfigError("--actor" if p.number == 1 else "--reward",
                              f"cannot estimate memory: {sp.unavailable}")
        plans.append(sp)
    return plans


def run_plan(step: str, cfg, *, gpu_memory: float | None, as_json: bool) -> int:
    from dschat_cli.plan.report import STYLE, render, to_json
    from dschat_cli.ui.console import console

    target = detect_target(gpu_memory)
    if step == "pipeline":
        plans = _pipeline_plans(_checked(cfg), target)
    else:
        plans = [plan_step(step, _checked(cfg), target)]
    for p in plans:  # a plan without its memory estimate is not what was asked for
        if p.unavailable:
            raise ConfigError(p.unavailable_flag, f"cannot estimate memory: {p.unavailable}")
    verdicts = [p.verdict for p in plans]
    worst = next((v for v in ("does not fit", "tight", "unknown", "fits") if v in verdicts), "unknown")
    if as_json:
        doc = to_json(plans[0]) if step != "pipeline" else \
            {"verdict": worst, "steps": [to_json(p) for p in plans]}
        print(json.dumps(doc, indent=2))
    else:
        for p in plans:
            render(p, console)
        if target.gpu_bytes is None:
            console.print("[dim]No GPU here: the estimates are for a GPU run in "
                          f"{plans[0].dtype}; pass --gpu-memory GiB to check them against a GPU "
                          "of that size.[/dim]")
        elif step == "pipeline":
            console.print(f"pipeline: [{STYLE[worst]}]{worst}[/]")
    return 1 if "does not fit" in verdicts else 0
