"""Launch one step from the user's side: resolve, check, record, launch.

    launch_training("sft", cfg, dry_run=False)

The step's row in the table (config/steps.py) says what to check and how to build its DeepSpeed
configs. Everything the run derives from its config and this machine is resolved here, once, into
the run record (config/resolved.py) that the ranks read. Order matters for "nothing written on a
user mistake": every check runs before the output folder is created; only then are
run_config.yaml, resolved.json, the ds_config*.json files and launch.sh written and the workers
started.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Callable

from rich.markup import escape

from dschat_cli.config.resolved import RECORD, ResolvedRun, resolve_run
from dschat_cli.config.schema import ConfigError, to_yaml
from dschat_cli.config.steps import load, step as step_spec
from dschat_cli.launch import runner
from dschat_cli.launch.runner import Hardware, LaunchPlan, detect_hardware, plan_launch, run_launch
from dschat_cli.ui.console import console, warn_line


def check_output_dir(path: str, overwrite: bool, flag: str = "--output-dir") -> Path:
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(flag, f"{out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(flag, f"{out} is not empty; choose a new folder or pass --overwrite")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    import os

    if not parent.is_dir():
        raise ConfigError(flag, f"{parent} is a file, so {out} cannot be created; give a folder")
    if not os.access(parent, os.W_OK):
        raise ConfigError(flag, f"{parent} is not writable")
    return out.resolve()


def _check_resume(cfg, world_size: int, restart_hint: str | None):
    """-> (cfg with an absolute --resume path, the checkpoint it resumes or None), checked before
    any worker starts: complete, same options, same world size (ConfigError otherwise)."""
    import dataclasses

    from dschat_cli.config.checkpoints import RESTART, resolve_resume

    ck = getattr(cfg, "checkpoint", None)  # dschat bench has none
    if ck is None or not ck.resume:
        return cfg, None
    if ck.resume != "auto":  # the workers may start elsewhere (launch.sh, other nodes)
        path = str(Path(ck.resume).expanduser().resolve())
        cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(ck, resume=path))
    return cfg, resolve_resume(cfg, world_size, restart_hint or RESTART)


def resolve(step: str, cfg, *, hw: Hardware, restart_hint: str | None = None
            ) -> tuple[object, LaunchPlan, ResolvedRun, Path | None]:
    """Everything decided before a launch, checked: -> (cfg with an absolute --resume path, how
    the workers start, the run record, the checkpoint it resumes or None)."""
    from dschat_cli import hub

    spec = step_spec(step)
    out = Path(cfg.output_dir).expanduser().resolve()
    plan = plan_launch(cfg.launch, step, out / "run_config.yaml", hw=hw)
    cfg, resume_from = _check_resume(cfg, plan.world_size, restart_hint)
    if spec.validate_world:
        load(spec.validate_world)(cfg, plan.world_size)
    record = resolve_run(step, cfg, world_size=plan.world_size, device=plan.device,
                         bf16_supported=hw.bf16, hub_reachable=hub.reachable())
    return cfg, plan, record, resume_from


def plan_run(step: str, cfg, target, *, archs=None, title: str = ""):
    """`dschat plan STEP`: the plan of `cfg` run on `target`'s GPUs (plan/planner.py's Target),
    resolved as a launch on such a GPU machine would resolve it (world size from the launch
    options, precision for its GPUs, the same DeepSpeed configs, the same refusals)."""
    import os

    from dschat_cli.plan.planner import plan_step

    hw = Hardware(gpus=target.gpus_here, bf16=target.bf16, cpu_cores=os.cpu_count() or 1)
    world = plan_launch(cfg.launch, step, "run_config.yaml", hw=hw).world_size
    spec = step_spec(step)
    if spec.validate_world:  # a plan of a run the launcher would refuse is no plan
        load(spec.validate_world)(cfg, world)
    record = resolve_run(step, cfg, world_size=world, device="cuda", bf16_supported=target.bf16,
                         hub_reachable=False)  # a plan reads no hub
    return plan_step(cfg, record, target, archs=archs, title=title)


def _memory_estimate(cfg, record: ResolvedRun, *, dry_run: bool,
                     plan_archs: Callable[[], dict] | None = None) -> None:
    """Before a GPU run: `dschat plan`'s estimate in a few lines, with a warning when it clearly
    does not fit (the run still starts). CPU runs get a pointer in --dry-run only."""
    step = record.step
    if step_spec(step).memory is None:
        return
    if record.device != "cuda":
        if dry_run:
            console.print(f"[dim]memory estimate: this run is on CPU; `dschat plan {step}` with "
                          "the same flags and --gpu-memory GiB estimates a GPU run[/dim]")
        return
    from dschat_cli.plan.planner import detect_target
    from dschat_cli.plan.report import launch_estimate

    launch_estimate(cfg, record, detect_target(gpus=runner.query_gpus()), console=console,
                    archs=plan_archs)


def _show_record(record: ResolvedRun) -> None:
    console.rule(f"[bold]run record: {RECORD}")
    shown = {k: v for k, v in record.to_dict().items() if k != "ds_configs"}
    shown["ds_configs"] = sorted(record.ds_files())
    console.print_json(json.dumps(shown))
    for name, ds_config in record.ds_files().items():
        console.rule(f"[bold]DeepSpeed config: {name}")
        console.print_json(json.dumps(ds_config))


def launch_training(step: str, cfg, *, dry_run: bool, checked: bool = False,
                    restart_hint: str | None = None,
                    plan_archs: Callable[[], dict] | None = None) -> int:
    """Resolve and check `cfg` for step `step`, then either print the plan (dry run) or record it
    and launch the workers. The step's `validate` checks (files, data, models; skipped by
    --dry-run) run here unless `checked` says they already ran (`dschat pipeline` checks every
    step up front). `restart_hint` says how to start over when --resume cannot continue (the
    caller's flags). `plan_archs()` gives the models' architectures for the memory estimate when
    the step's model paths do not exist yet (the pipeline's step 3 before steps 1 and 2 wrote
    them)."""
    spec = step_spec(step)
    hw = detect_hardware()
    cfg, plan, record, resume_from = resolve(step, cfg, hw=hw, restart_hint=restart_hint)
    out = Path(record.output_dir)
    if dry_run:
        from rich.syntax import Syntax

        console.rule(f"[bold]dschat {step}: resolved config")
        console.print(Syntax(to_yaml(cfg), "yaml", background_color="default"))
        _show_record(record)
        console.rule("[bold]launch command")
        console.print(plan.command(), soft_wrap=True)
        console.print(f"world size {plan.world_size} ({plan.nodes} node(s), {plan.device})")
        if getattr(cfg, "checkpoint", None) and cfg.checkpoint.resume:
            console.print(f"resume from: {resume_from or 'no checkpoint yet (starts fresh)'}",
                          markup=False)
        if plan.warning:
            warn_line(plan.warning)
        _memory_estimate(cfg, record, dry_run=True, plan_archs=plan_archs)
        return 0

    # resuming continues the outputs already there (it never deletes them): no --overwrite needed
    check_output_dir(cfg.output_dir, cfg.overwrite or resume_from is not None)
    cache_dir = getattr(getattr(cfg, "data", None), "data_cache_dir", None)
    if cache_dir:  # the workers write there first; a file in the way would fail them mid-start
        check_output_dir(cache_dir, True, flag="--data-cache-dir")
    from dschat_cli.doctor import preflight  # `dschat doctor`'s fast checks

    # GPU workers share /dev/shm (NCCL); CPU workers talk over gloo's TCP and need none
    procs_per_node = plan.world_size // max(plan.nodes, 1) if plan.device == "cuda" else 1
    preflight(procs_per_node, cfg.output_dir, cache_dir)
    if not checked:
        load(spec.validate)(cfg)
    if plan.warning:
        warn_line(plan.warning)
    _memory_estimate(cfg, record, dry_run=False, plan_archs=plan_archs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    record.write(out)
    (out / "launch.sh").write_text(
        "#!/usr/bin/env bash\n# the command dschat ran; re-run with: bash launch.sh\n"
        f"# invoked as: {shlex.join(['dschat', step] + sys.argv[2:])}\n{plan.command()}\n",
        encoding="utf-8")
    if not plan.argv:  # --launcher none: this process is the only rank
        import os

        from dschat_cli.worker import run_step

        os.environ.update(plan.env)
        os.environ["DSCHAT_IN_PROCESS"] = "1"
        return run_step(step, cfg, record)
    console.print(f"[dim]launching {plan.world_size} worker(s); log: "
                  f"{escape(str(out / 'train.log'))}[/dim]")
    rc = run_launch(plan, log_path=out / "train.log")
    if rc not in (0, 2):  # 2: a worker already printed the one-line error
        from dschat_cli.ui.console import error_line

        error_line(f"dschat {step}", f"workers exited with code {rc}; see the error above and "
                   f"{out / 'train.log'}")
    return rc
