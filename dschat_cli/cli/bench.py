"""`dschat bench`: throughput of step 3 (or step 1, or DPO) in the reference's benchmark setting,
per phase, against the device's measured ceilings (options -> BenchConfig -> launch)."""

from __future__ import annotations

import dataclasses

import typer

from dschat_cli.cli.options import config_command
from dschat_cli.config.bench import BenchConfig
from dschat_cli.config.steps import step


def _run(cfg: BenchConfig, *, dry_run: bool) -> int:
    from dschat_cli.launch.bench import launch_bench

    if cfg.output_dir is None:
        import tempfile

        cfg = dataclasses.replace(cfg, output_dir=tempfile.mkdtemp(prefix="dschat-bench-"))
    return launch_bench(cfg, dry_run=dry_run)


def register(app: typer.Typer) -> None:
    config_command(app, "bench", BenchConfig, handler=_run,
                   help=step("bench").summary[:-1] + ": per-phase seconds, tokens/s, TFLOP/s, "
                        "decode speed against the memory-bandwidth floor; the fast engine beside "
                        "transformers' generate. --advantage-estimator picks step 3's estimator "
                        "(a critic-free one has no critic phases); --batch-size counts answers, "
                        "--batch-size / --samples-per-prompt prompts per GPU, so tokens/s compare "
                        "like for like. --step dpo measures `dschat dpo`'s step: --batch-size "
                        "pairs per GPU, each a shared prompt of --max-prompt-seq-len tokens with a "
                        "chosen and a rejected answer of --max-answer-seq-len tokens (256 + 256: "
                        "pairs of 2 x 512 tokens); phases reference forward (none with "
                        "--precompute-ref-logprobs), policy forward, policy backward, optimizer "
                        "step; tokens/s counts chosen + rejected tokens.",
                   epilog="Example: dschat bench --actor opt-1.3b --critic opt-350m --batch-size 64 "
                          "--json bench.json. Without a critic, 8 prompts x 8 answers per GPU: "
                          "dschat bench --advantage-estimator grpo --samples-per-prompt 8 "
                          "--batch-size 64. DPO, 8 pairs of 2 x 512 tokens per GPU: dschat bench "
                          "--step dpo --actor-zero-stage 0 --batch-size 8")
