"""`dschat bench`: the reference's benchmark setting on random weights of real architectures.

    dschat bench                          # step 3: opt-1.3b actor, opt-350m critic/reward, 256+256
    dschat bench --advantage-estimator grpo   # no critic; 64 answers = 8 prompts x 8 per GPU
    dschat bench --step sft --actor opt-1.3b --batch-size 32
    dschat bench --step dpo --actor-zero-stage 0 --batch-size 8   # 8 pairs of 2 x (256 + 256)

Step 3 runs the real PPOTrainer (the code `dschat ppo` runs) on synthetic prompts of exactly
--max-prompt-seq-len tokens, answers of exactly --max-answer-seq-len tokens (eos suppressed), warm-up steps, then
--steps measured steps, with every phase timed between GPU synchronisations. --batch-size counts
answers (sequences): --batch-size / --samples-per-prompt prompts per GPU, each answered
--samples-per-prompt times, so the tokens per step, and tokens/s, compare like for like across
estimators; a critic-free estimator (grpo, ...) has no critic phases. Each phase is set
against its floor: the FLOPs it must do at the device's measured matmul speed, or the bytes it
must move at its measured copy bandwidth, whichever is larger. FLOPs counted per token of a
forward pass: 2 x (matmul parameters) + 4 x layers x hidden x sequence length (attention scores
and values), the output head only on the positions whose logits the step needs (step 3's answer
tokens, a prefill's last position, DPO's answers); backward is 2x forward. A decode step must read every weight once and the KV cache
written so far.

DPO runs `dschat dpo`'s own pieces (steps/dpo.py's reference, forward and logprobs, rlhf/dpo.py's
loss, its DeepSpeed configs) on --batch-size random pairs per GPU: a shared prompt of exactly
--max-prompt-seq-len tokens, then a chosen and a rejected answer of --max-answer-seq-len tokens
each that differ from their first token. Its phases: the reference's forward (none with
--precompute-ref-logprobs), the policy's forward (logits, logprobs, loss) and backward, and the
optimizer step. tokens/s counts the tokens of both sequences of every pair.

Here: run() (one benchmark, its record written; out of GPU memory on one GPU is a result, status
out_of_memory, for the launch's batch search); floors.py (the device's ceilings, the models'
shapes, each phase's floor); ppo.py, sft.py, dpo.py (one benchmark each); report.py (the tables).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dschat_cli.config.bench import BenchConfig
from dschat_cli.config.resolved import ResolvedRun
from dschat_cli.dist import Dist
from dschat_cli.report.records import write_atomic
from dschat_cli.steps.bench.dpo import bench_dpo
from dschat_cli.steps.bench.floors import (DPO_PHASES, Shape, device_name, dpo_floors,
                                          measure_ceilings, model_shape, ppo_floors)
from dschat_cli.steps.bench.ppo import PPO_PHASES, bench_ppo
from dschat_cli.steps.bench.report import print_result
from dschat_cli.steps.bench.sft import bench_sft
from dschat_cli.steps.common import seed_everything
from dschat_cli.ui.console import console

__all__ = ["DPO_PHASES", "PPO_PHASES", "Shape", "dpo_floors", "measure_ceilings", "model_shape",
           "ppo_floors", "run"]


def run(cfg: BenchConfig, dist: Dist, resolved: ResolvedRun) -> dict:
    seed_everything(cfg.seed)
    bench = {"sft": bench_sft, "dpo": bench_dpo, "ppo": bench_ppo}[cfg.step]
    try:
        result = {**bench(cfg, dist, resolved), "status": "ok"}
    except torch.OutOfMemoryError as e:
        if dist.world_size > 1:  # the other ranks wait in a collective: no clean way on
            raise
        # one GPU: a result in its own right (the launch's batch search tries a smaller one)
        result = {"step": cfg.step, "device": device_name(dist), "world_size": 1,
                  "batch_size": cfg.batch, "status": "out_of_memory",
                  "error": str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"}
        console.print(f"[warn]batch {cfg.batch}: out of GPU memory[/warn] ({result['error']})")
        if dist.is_main:
            Path(resolved.output_dir).mkdir(parents=True, exist_ok=True)
            write_atomic(Path(resolved.output_dir) / "bench.json",
                         json.dumps(result, indent=2) + "\n")
        return result
    if dist.is_main:
        out = Path(resolved.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(result, indent=2) + "\n"
        write_atomic(out / "bench.json", text)
        if cfg.json:
            write_atomic(Path(cfg.json).expanduser(), text)
        print_result(result)
    dist.barrier()
    return result
