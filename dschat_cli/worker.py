"""The rank's side of the process boundary.

    python -m dschat_cli.worker STEP RUN_CONFIG.yaml

Started by deepspeed.launcher on every rank (or called in-process with --launcher none). Reads the
run config and, next to it, the run record the launch resolved (resolved.json:
config/resolved.py), builds the Dist handle, checks this rank's hardware against the record, and
calls the step's run() named in the table of steps (config/steps.py). Exit codes: 0 done, 2 a user
mistake found at run time (one line), 1 a run stopped by the health monitor (one line,
steps/health.py) or anything else (traceback, prefixed by rank).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from pathlib import Path


def _quiet_libraries(rank: int) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    from dschat_cli.ui.console import quiet_libraries

    quiet_libraries()
    # deprecation chatter from torch.distributed/transformers inside DeepSpeed is not actionable here
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", message=".*embeddings are no longer tied after merging.*")
    # Inductor's note on how it compiles the sampling softmax (--compile-decode): three lines per
    # run about its code generation, nothing for the user to do (its text starts with a newline)
    warnings.filterwarnings("ignore", message=r"\s*Online softmax is disabled on the fly")
    if rank != 0:
        warnings.filterwarnings("ignore")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one 'warning: ...' line (no source excerpt). A warning raised with no text
    (some libraries warn with an empty message) names its category and origin instead of
    printing a bare 'warning:'."""
    from dschat_cli.ui.console import warn_line

    text = str(message).strip()
    if not text:
        text = f"{getattr(category, '__name__', 'Warning')} with no message, from {filename}:{lineno}"
    warn_line(text)


def _shutdown_distributed() -> None:
    try:
        import torch.distributed as tdist

        # a launched worker ends here; in-process runs (--launcher none) keep the group for reuse
        if os.environ.get("DSCHAT_IN_PROCESS") != "1" and tdist.is_available() \
                and tdist.is_initialized():
            tdist.destroy_process_group()
    except Exception:  # pragma: no cover - best effort at exit
        pass


def check_hardware(record, dist) -> None:
    """This rank's hardware against the run record (ConfigError on a mismatch)."""
    on_gpu = dist.device != "cpu"
    bf16 = False
    if on_gpu:
        import torch

        bf16 = torch.cuda.is_bf16_supported()
    record.check_rank(world_size=dist.world_size, device="cuda" if on_gpu else "cpu",
                      bf16_supported=bf16)


def run_step(step: str, cfg, record) -> int:
    """Run one step on this rank with its run record (config/resolved.py); returns the exit
    code."""
    from dschat_cli import hub
    from dschat_cli.config.schema import ConfigError
    from dschat_cli.config.steps import load, step as step_spec
    from dschat_cli.steps.health import TrainingAnomaly
    from dschat_cli.ui.console import error_line, set_rank

    rank = int(os.environ.get("RANK", "0"))
    set_rank(rank)
    _quiet_libraries(rank)
    try:
        from dschat_cli.dist import Dist

        dist = Dist.init()
        try:
            check_hardware(record, dist)
        except ConfigError as e:  # every rank that disagrees says so (it may not be rank 0)
            error_line(e.where, f"rank {rank}: {e.message}")
            return 2
        hub.assume(record.hub_reachable)  # the user side probed; the ranks do not again
        run = load(step_spec(step).run)
        run(cfg, dist, resolved=record)
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

    from dschat_cli.config.resolved import ResolvedRun
    from dschat_cli.config.schema import ConfigError, from_dict
    from dschat_cli.config.steps import step as step_spec
    from dschat_cli.ui.console import error_line

    args = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in args if not a.startswith("--local_rank")]
    if len(args) != 2:
        print("usage: python -m dschat_cli.worker STEP RUN_CONFIG.yaml", file=sys.stderr)
        return 2
    step, path = args
    try:
        spec = step_spec(step)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = from_dict(spec.config_class(), yaml.safe_load(fh) or {})
        record = ResolvedRun.read(Path(path).parent)
        if record.step != step:
            raise ConfigError(str(Path(path).parent / "resolved.json"),
                              f"is the record of a {record.step} run, not {step}")
    except ConfigError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            error_line(e.where, e.message)
        return 2
    return run_step(step, cfg, record)


if __name__ == "__main__":
    sys.exit(main())
