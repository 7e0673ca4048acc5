"""Launch one training step from the user's side: validate, record, launch.

    launch_training("sft", cfg, dry_run=False)

Order matters for "nothing written on a user mistake": every check runs before the output folder
is created; only then are run_config.yaml, ds_config.json and launch.sh written and the workers
started.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Callable

from rich.markup import escape

from dschat_cli.config.schema import ConfigError, to_yaml
from dschat_cli.launch.runner import LaunchPlan, detect_hardware, plan_launch, run_launch
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


def planned_ds_config(cfg, plan: LaunchPlan, hw, job_name: str) -> dict:
    """The DeepSpeed JSON the workers will build (same builder, same inputs), for --dry-run and the
    record written before launch. cfg has .deepspeed, .optim and .output_dir."""
    from dschat_cli.config.ds_config import resolve_dtype, train_ds_config

    dtype = resolve_dtype(cfg.deepspeed.dtype, has_gpu=hw.gpus > 0, bf16_supported=hw.bf16)
    tb = f"{cfg.output_dir}/tensorboard" if cfg.deepspeed.enable_tensorboard else None
    return train_ds_config(cfg.deepspeed, cfg.optim, world_size=plan.world_size, dtype=dtype,
                           torch_adam=cfg.optim.torch_adam or hw.gpus == 0, tensorboard_dir=tb,
                           job_name=job_name)


def _memory_estimate(step: str, cfg, configs: dict[str, dict], plan: LaunchPlan, *,
                     dry_run: bool, plan_archs: Callable[[], dict] | None = None) -> None:
    """Before a GPU run: `dschat plan`'s estimate in a few lines, with a warning when it clearly
    does not fit (the run still starts). CPU runs get a pointer in --dry-run only."""
    if step not in ("sft", "reward", "ppo"):
        return
    if plan.device != "cuda":
        if dry_run:
            console.print(f"[dim]memory estimate: this run is on CPU; `dschat plan {step}` with "
                          "the same flags and --gpu-memory GiB estimates a GPU run[/dim]")
        return
    from dschat_cli.plan.report import launch_estimate

    launch_estimate(step, cfg, configs, world_size=plan.world_size, console=console,
                    archs=plan_archs)


def launch_training(step: str, cfg, *, dry_run: bool, validate: Callable[[object], None],
                    ds_configs: Callable[[object, LaunchPlan, object], dict[str, dict]] | None = None,
                    restart_hint: str | None = None,
                    plan_archs: Callable[[], dict] | None = None) -> int:
    """Validate `cfg`, then either print the plan (dry run) or record it and launch the workers.
    `validate(cfg)` runs the checks that touch files, data and models (skipped by --dry-run);
    `ds_configs(cfg, plan, hw)` gives {file name: DeepSpeed JSON} (default: one training config).
    `restart_hint` says how to start over when --resume cannot continue (the caller's flags).
    `plan_archs()` gives the models' architectures for the memory estimate when the step's model
    paths do not exist yet (the pipeline's step 3 before steps 1 and 2 wrote them)."""
    hw = detect_hardware()
    out = Path(cfg.output_dir).expanduser().resolve()
    config_path = out / "run_config.yaml"
    plan = plan_launch(cfg.launch, step, config_path, hw=hw)
    cfg, resume_from = _check_resume(cfg, plan.world_size, restart_hint)
    configs = (ds_configs(cfg, plan, hw) if ds_configs is not None
               else {"ds_config.json": planned_ds_config(cfg, plan, hw, step)})
    if dry_run:
        from rich.syntax import Syntax

        console.rule(f"[bold]dschat {step}: resolved config")
        console.print(Syntax(to_yaml(cfg), "yaml", background_color="default"))
        for name, ds_config in configs.items():
            console.rule(f"[bold]DeepSpeed config: {name}")
            console.print_json(json.dumps(ds_config))
        console.rule("[bold]launch command")
        console.print(plan.command(), soft_wrap=True)
        console.print(f"world size {plan.world_size} ({plan.nodes} node(s), {plan.device})")
        if getattr(cfg, "checkpoint", None) and cfg.checkpoint.resume:
            console.print(f"resume from: {resume_from or 'no checkpoint yet (starts fresh)'}",
                          markup=False)
        if plan.warning:
            warn_line(plan.warning)
        _memory_estimate(step, cfg, configs, plan, dry_run=True, plan_archs=plan_archs)
        return 0

    # resuming continues the outputs already there (it never deletes them): no --overwrite needed
    check_output_dir(cfg.output_dir, cfg.overwrite or resume_from is not None)
    cache_dir = getattr(getattr(cfg, "data", None), "data_cache_dir", None)
    if cache_dir:  # the workers write there first; a file in the way would fail them mid-start
        check_output_dir(cache_dir, True, flag="--data-cache-dir")
    from dschat_cli.doctor import preflight  # `dschat doctor`'s fast checks

    # GPU workers share /dev/shm (NCCL); CPU workers talk over gloo's TCP and need none
    procs_per_node = plan.world_size // max(plan.nodes, 1) if plan.device == "cuda" else 1
    preflight(procs_per_node, cfg.output_dir, getattr(getattr(cfg, "data", None), "data_cache_dir", None))
    validate(cfg)
    if plan.warning:
        warn_line(plan.warning)
    _memory_estimate(step, cfg, configs, plan, dry_run=False, plan_archs=plan_archs)
    out.mkdir(parents=True, exist_ok=True)
    config_path.write_text(to_yaml(cfg), encoding="utf-8")
    for name, ds_config in configs.items():
        (out / name).write_text(json.dumps(ds_config, indent=2) + "\n", encoding="utf-8")
    (out / "launch.sh").write_text(
        "#!/usr/bin/env bash\n# the command dschat ran; re-run with: bash launch.sh\n"
        f"# invoked as: {shlex.join(['dschat', step] + sys.argv[2:])}\n{plan.command()}\n",
        encoding="utf-8")
    if not plan.argv:  # --launcher none: this process is the only rank
        import os

        from dschat_cli.worker import run_step

        os.environ.update(plan.env)
        os.environ["DSCHAT_IN_PROCESS"] = "1"
        return run_step(step, cfg)
    console.print(f"[dim]launching {plan.world_size} worker(s); log: "
                  f"{escape(str(out / 'train.log'))}[/dim]")
    rc = run_launch(plan, log_path=out / "train.log")
    if rc not in (0, 2):  # 2: a worker already printed the one-line error
        from dschat_cli.ui.console import error_line

        error_line(f"dschat {step}", f"workers exited with code {rc}; see the error above and "
                   f"{out / 'train.log'}")
    return rc
