"""Compare `dschat plan`'s memory estimate with the peak GPU memory runs measured.

    python benchmarks/plan_vs_peak.py OUT_DIR [OUT_DIR ...] [--json FILE]

Each OUT_DIR is a finished run's output folder: its run_config.yaml, its run record
(resolved.json: world size, precision and DeepSpeed configs; runs older than the record have only
the DeepSpeed JSON(s)) and train_summary.json, whose peak_memory_gib every step records on CUDA
(the largest torch.cuda.max_memory_allocated() over the ranks). The estimate is rebuilt from those
exact files (same configs, same world size), so the comparison tests the memory model alone.
Prints one row per run: estimate, measured peak, error (estimate / measured - 1) and the phase the
estimate puts the peak in.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def step_of(out: Path, data: dict) -> str:
    if (out / "resolved.json").is_file():
        return json.loads((out / "resolved.json").read_text())["step"]
    if (out / "ds_config_actor.json").is_file():
        return "ppo"
    return "reward" if "loss" in data else "sft"


def record_of(out: Path, step: str, summary: dict):
    """The run record; for a run older than the record, one rebuilt from the DeepSpeed JSON(s)
    it wrote (what the estimate reads: roles' configs and the world size)."""
    from dschat_cli.config.resolved import ResolvedRun, ds_config_file

    if (out / "resolved.json").is_file():
        return ResolvedRun.read(out)
    roles = ["actor", "critic", "ref", "reward"] if step == "ppo" else ["model"]
    configs = {r: json.loads((out / ds_config_file(r)).read_text()) for r in roles}
    first = next(iter(configs.values()))
    dtype = "bf16" if first["bf16"]["enabled"] else "fp16" if first["fp16"]["enabled"] else "fp32"
    return ResolvedRun(step=step, output_dir=str(out.resolve()), device="cuda",
                       world_size=int(summary.get("world_size", 1)), dtype=dtype,
                       torch_adam=False, tensorboard_dir=None, max_seq_len=0,
                       hub_reachable=False, ds_configs=configs)


def compare(out: Path) -> dict:
    import yaml

    from dschat_cli.config.schema import from_dict
    from dschat_cli.config.steps import step as step_spec
    from dschat_cli.plan.memory import GiB
    from dschat_cli.plan.planner import estimate_step

    data = yaml.safe_load((out / "run_config.yaml").read_text())
    step = step_of(out, data)
    cfg = from_dict(step_spec(step).config_class(), data)
    summary = json.loads((out / "train_summary.json").read_text())
    est = estimate_step(cfg, record_of(out, step, summary))
    measured = summary.get("peak_memory_gib")
    return {"run": str(out), "step": step, "estimate_gib": round(est.peak / GiB, 2),
            "measured_gib": measured, "peak_phase": est.peak_phase,
            "error": None if not measured else round(est.peak / GiB / measured - 1, 4),
            "phases_gib": {k: round(v / GiB, 2) for k, v in est.phases.items()}}


def main(argv: list[str]) -> int:
    json_out = None
    if "--json" in argv:
        i = argv.index("--json")
        json_out = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    if not argv:
        print(__doc__)
        return 2
    rows = [compare(Path(a)) for a in argv]
    print(f"{'run':40s} {'step':6s} {'estimate':>9s} {'measured':>9s} {'error':>7s}  peak phase")
    for r in rows:
        err = "-" if r["error"] is None else f"{r['error']:+.1%}"
        meas = "-" if r["measured_gib"] is None else f"{r['measured_gib']:.2f}"
        print(f"{Path(r['run']).name:40s} {r['step']:6s} {r['estimate_gib']:9.2f} {meas:>9s} "
              f"{err:>7s}  {r['peak_phase']}")
    errors = [abs(r["error"]) for r in rows if r["error"] is not None]
    if errors:
        print(f"largest error {max(errors):.1%}, mean absolute error "
              f"{sum(errors) / len(errors):.1%} over {len(errors)} run(s)")
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
