"""`dschat plan sft|reward|dpo|ppo|pipeline ...`: how the plans are reported, and the exit code.

    plans = [launch.step.plan_run("sft", checked(cfg), target)]    # the command (cli/plan.py)
    rc = report(plans, target, as_json=False, pipeline=False)

The plans themselves come from the launch's resolver (launch/step.py: the same world size,
precision and DeepSpeed configs a launch would use) and, for `dschat plan pipeline`, from the
pipeline's step configs (pipeline.py). Exit codes: 0 when the run fits (or there is no GPU to
compare with), 1 when a step does not fit; a usage error is a ConfigError (exit 2, printed by the
CLI).
"""

from __future__ import annotations

import dataclasses
import json

from dschat_cli.config.schema import ConfigError
from dschat_cli.plan.planner import StepPlan, Target


def checked(cfg):
    """The training command's cross-field checks; --output-dir is not needed to plan (a plan
    without one resolves the run as if it wrote to ./plan)."""
    if hasattr(cfg, "output_dir") and not cfg.output_dir:
        cfg = dataclasses.replace(cfg, output_dir="plan")
    cfg.check()
    return cfg


def report(plans: list[StepPlan], target: Target, *, as_json: bool, pipeline: bool) -> int:
    from dschat_cli.plan.report import STYLE, render, to_json
    from dschat_cli.ui.console import console

    for p in plans:  # a plan without its memory estimate is not what was asked for
        if p.unavailable:
            raise ConfigError(p.unavailable_flag, f"cannot estimate memory: {p.unavailable}")
    verdicts = [p.verdict for p in plans]
    worst = next((v for v in ("does not fit", "tight", "unknown", "fits") if v in verdicts), "unknown")
    if as_json:
        doc = to_json(plans[0]) if not pipeline else \
            {"verdict": worst, "steps": [to_json(p) for p in plans]}
        print(json.dumps(doc, indent=2))
    else:
        for p in plans:
            render(p, console)
        if target.gpu_bytes is None:
            console.print("[dim]No GPU here: the estimates are for a GPU run in "
                          f"{plans[0].dtype}; pass --gpu-memory GiB to check them against a GPU "
                          "of that size.[/dim]")
        elif pipeline:
            console.print(f"pipeline: [{STYLE[worst]}]{worst}[/]")
    return 1 if "does not fit" in verdicts else 0
