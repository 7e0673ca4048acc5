"""`dschat bench` from the user's side: fill in what the user left unset, measure, then measure
again at the largest batch that fits, and keep one record of both.

    rc = launch_bench(cfg, dry_run=False)

plan/choose.py decides (ZeRO stages, the batch sizes) and says why; each measurement is a launch
of its own (a fresh process: the second run's memory is not the first's leftovers), the first in
OUT, the larger batch in OUT/batch-N (OUT/batch-N-zero0 when it runs again at ZeRO-0 after running
out of memory at ZeRO-1: plan/choose.py's `attempts`). OUT/bench.json (and --json) is the first
run's record plus `choices` (the lines printed), `largest_batch` (the larger run's record, or null)
and `larger_batches_tried` ([{batch_size, status, actor_zero_stage, micro_batch_size}]: ok,
out_of_memory, failed). Step 3's larger batch is trained in mini-batches (plan/choose.py says why).
A larger batch that runs out of memory is not an error: the next attempt the plan allows runs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rich.markup import escape

from dschat_cli.config.bench import BenchConfig
from dschat_cli.launch.runner import detect_hardware, plan_launch, query_gpus
from dschat_cli.launch.step import launch_training
from dschat_cli.plan.choose import choose_bench
from dschat_cli.plan.planner import detect_target
from dschat_cli.ui.console import console, error_line


def launch_bench(cfg: BenchConfig, *, dry_run: bool) -> int:
    from dschat_cli.checks import check_output_file

    check_output_file(cfg.json, "--json", "bench.json")  # written at the end: checked now
    hw = detect_hardware()
    world = plan_launch(cfg.launch, "bench", "run_config.yaml", hw=hw).world_size
    target = detect_target(cfg.gpu_memory, query_gpus() if hw.gpus else [])
    choice = choose_bench(cfg, world_size=world, target=target, on_gpu=hw.gpus > 0)
    for line in choice.lines:
        console.print(f"[bold]chosen:[/bold] {escape(line)}")
    first = dataclasses.replace(choice.cfg, json=None)  # the combined record is written here
    rc = launch_training("bench", first, dry_run=dry_run)
    out = Path(first.output_dir).expanduser().resolve()
    if dry_run:
        if choice.attempts:
            b, stages = choice.attempts[0]
            then = choice.config_for(b, stages)
            minis = (f", mini-batches of {then.micro} (gradient accumulation)"
                     if then.micro != b else "")
            console.print(f"then: batch {b} at ZeRO-{then.actor_zero_stage}{minis} in "
                          f"{escape(str(out))}/batch-{b} (fast engine only)", soft_wrap=True)
        return rc
    result = _read(out / "bench.json")
    if rc != 0 or result is None:
        return rc or 1
    record = {**result, "choices": choice.lines, "largest_batch": None,
              "larger_batches_tried": []}
    _write(record, out, cfg.json)
    if result.get("status") != "ok":
        error_line("--batch-size", f"batch {first.batch} ran out of GPU memory; give a smaller "
                   "--batch-size (`dschat plan` estimates what fits)")
        return 1
    failed = 0
    for i, (batch, stages) in enumerate(choice.attempts):
        again = i > 0 and choice.attempts[i - 1][0] == batch  # the same batch, now at ZeRO-0
        folder = out / (f"batch-{batch}" + ("-zero0" if again else ""))
        sub = dataclasses.replace(
            choice.config_for(batch, stages), json=None, output_dir=str(folder),
            generation_engine="fast" if first.generation_engine == "both"
            else first.generation_engine)
        console.rule(f"[bold]batch {batch}: " + (
            "again at ZeRO-0" if again else "the largest the memory plan says fits" if i == 0
            else "the next smaller one"))
        rc = launch_training("bench", sub, dry_run=False)
        larger = _read(folder / "bench.json")
        status = "failed" if rc != 0 or larger is None else larger.get("status", "failed")
        record["larger_batches_tried"].append({"batch_size": batch, "status": status,
                                               "actor_zero_stage": sub.actor_zero_stage,
                                               "micro_batch_size": sub.micro_batch_size})
        if status == "ok":
            record["largest_batch"] = larger
        _write(record, out, cfg.json)
        if status == "failed":
            failed = rc or 1
            error_line(f"dschat bench (batch {batch})", f"the run at the larger batch failed; see "
                       f"{folder / 'train.log'} (batch {first.batch}'s figures are in "
                       f"{out / 'bench.json'})")
        if status != "out_of_memory":
            break
    _print_batches(record)
    return failed


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write(record: dict, out: Path, json_path: str | None) -> None:
    from dschat_cli.report.records import write_atomic

    text = json.dumps(record, indent=2) + "\n"
    write_atomic(out / "bench.json", text)
    if json_path:
        path = Path(json_path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)


def _headline(result: dict) -> dict:
    """The figures a run record is compared by: step 3's fast engine (else its only engine),
    or the record itself (sft, dpo)."""
    engines = result.get("engines")
    return (engines.get("fast") or next(iter(engines.values()))) if engines else result


def _print_batches(record: dict) -> None:
    """The batches measured, side by side (only when a larger one was tried)."""
    if not record["larger_batches_tried"]:
        return
    from rich.table import Table

    what = record["step"] + (f" ({record['advantage_estimator']})" if record["step"] == "ppo"
                             else "")
    t = Table(title=f"{what}: tokens/s by batch per GPU", title_justify="left")
    for col in ("batch", "mini-batch", "ZeRO", "tokens/s", "peak GiB", "status"):
        t.add_column(col, justify="right")
    rows = [(record["batch_size"], record.get("micro_batch_size"),
             record.get("actor_zero_stage", record.get("zero_stage")), record, "ok")]
    larger = record["largest_batch"]
    for tried in record["larger_batches_tried"]:  # only the last one tried can have run
        r = larger if larger is not None and tried["status"] == "ok" else {}
        rows.append((tried["batch_size"], tried.get("micro_batch_size"),
                     tried.get("actor_zero_stage"), r, tried["status"]))
    for batch, micro, zero, r, status in rows:
        h = _headline(r) if r and status == "ok" else {}
        tps, peak = h.get("tokens_per_s"), h.get("peak_memory_gib")
        t.add_row(str(batch), str(micro or batch), "-" if zero is None else str(zero),
                  f"{tps:,.0f}" if tps is not None else "-",
                  f"{peak:.1f}" if peak is not None else "-", status.replace("_", " "))
    console.print(t)
