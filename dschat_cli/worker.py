"""The rank's side of the process boundary.

    python -m dschat_cli.worker STEP RUN_CONFIG.yaml

Started by deepspeed.launcher on every rank (or called in-process with --launcher none). Builds
the Dist handle, reads the resolved run config, and calls one step's run(). Exit codes: 0 done,
2 a user mistake found at run time (one line), 1 a run stopped by the health monitor (one line,
steps/health.py) or anything else (traceback, prefixed by rank).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
import warnings

# step name -> (config class, run function)
STEPS = {
    "sft": ("dschat_cli.config.sft:SFTConfig", "dschat_cli.steps.sft:run"),
    "reward": ("dschat_cli.config.reward:RewardConfig", "dschat_cli.steps.reward:run"),
    "ppo": ("dschat_cli.config.ppo:PPOConfig", "dschat_cli.steps.ppo:run"),
    "bench": ("dschat_cli.config.bench:BenchConfig", "dschat_cli.steps.bench:run"),
}


def _import(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def config_class(step: str):
    if step not in STEPS:
        raise SystemExit(f"unknown step {step!r}; one of {', '.join(STEPS)}")
    return _import(STEPS[step][0])


def _quiet_libraries(rank: int) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    from dschat_cli.ui.console import quiet_libraries

    quiet_libraries()
    # deprecation chatter from torch.distributed/transformers inside DeepSpeed is not actionable here
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", message=".*embeddings are no longer tied after merging.*")
    if rank != 0:
        warnings.filterwarnings("ignore")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one 'warning: ...' line (no source excerpt)."""
    from dschat_cli.ui.console import warn_line

    warn_line(str(message))


def _shutdown_distributed() -> None:
    try:
        import torch.distributed as tdist

        # a launched worker ends here; in-process runs (--launcher none) keep the group for reuse
        if os.environ.get("DSCHAT_IN_PROCESS") != "1" and tdist.is_available() \
                and tdist.is_initialized():
            tdist.destroy_process_group()
    except Exception:  # pragma: no cover - best effort at exit
        pass


def run_step(step: str, cfg) -> int:
    """Run one step on this rank; returns the exit code."""
    from dschat_cli.config.schema import ConfigError
    from dschat_cli.steps.health import TrainingAnomaly
    from dschat_cli.ui.console import error_line, set_rank

    rank = int(os.environ.get("RANK", "0"))
    set_rank(rank)
    _quiet_libraries(rank)
    try:
        from dschat_cli.dist import Dist

        dist = Dist.init()
        _import(STEPS[step][1])(cfg, dist)
        return 0
    except ConfigError as e:
        if rank == 0:
            error_line(e.where, e.message)
        return 2
    except TrainingAnomaly as e:  # the health monitor stopped the run: a training failure
        if rank == 0:
            kept = f"; last checkpoint, intact: {e.last_checkpoint}" if e.last_checkpoint else ""
            if kept and e.anomaly.lr_flag:  # the one fix a resume accepts (config/checkpoints.py)
                kept += (f"; to continue from it, run the same command with --resume auto and a "
                         f"lower {e.anomaly.lr_flag}")
            error_line(e.anomaly.where, f"{e.anomaly.detail}; stopped without saving{kept} "
                       "(--on-anomaly warn keeps training)")
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # show which rank failed and why; the launcher stops the others
        tb = traceback.format_exc()
        prefix = f"[rank {rank}] "
        sys.stderr.write("".join(prefix + line + "\n" for line in tb.rstrip().splitlines()))
        sys.stderr.write(f"{prefix}error: {type(e).__name__}: {e}\n")
        sys.stderr.flush()
        return 1
    finally:
        _shutdown_distributed()


def main(argv: list[str] | None = None) -> int:
    import yaml

    from dschat_cli.config.schema import from_dict

    args = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in args if not a.startswith("--local_rank")]
    if len(args) != 2:
        print("usage: python -m dschat_cli.worker STEP RUN_CONFIG.yaml", file=sys.stderr)
        return 2
    step, path = args
    with open(path, encoding="utf-8") as fh:
        cfg = from_dict(config_class(step), yaml.safe_load(fh) or {})
    return run_step(step, cfg)


if __name__ == "__main__":
    sys.exit(main())
