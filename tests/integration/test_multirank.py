"""Several ranks through the real launcher (two CPU workers, gloo): when one rank dies mid-run, the
launcher stops every rank and dschat reports it (no hang, no orphaned worker)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# rank 1 dies once rank 0 has logged a training step (the hook explains itself)
HOOK = Path(__file__).resolve().parents[1] / "hooks" / "rank_dies"


@pytest.mark.slow
def test_one_rank_dying_stops_all_ranks(tmp_path, tiny_opt, pairs_dir):
    out = tmp_path / "out"
    env = dict(os.environ, COLUMNS="200", DSCHAT_TEST_DIE_WHEN=str(out / "metrics.jsonl"),
               PYTHONPATH=f"{HOOK}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    args = ["sft", "--model", tiny_opt, "--data-path", "local/jsonfile", "--data-dir", pairs_dir,
            "--data-split", "10,0,0", "--output-dir", out, "--data-cache-dir", tmp_path / "cache",
            "--num-train-epochs", "50", "--per-device-train-batch-size", "8",
            "--max-seq-len", "64", "--deployment-type", "single_node", "--num-gpus", "2"]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dschat_cli", *map(str, args)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=240, stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert (out / "metrics.jsonl").exists()  # rank 1 died during training, not before
    assert not (out / "model.safetensors").exists()  # 50 epochs never finished
    assert "workers exited with code" in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout.split("workers exited")[-1]
    assert elapsed < 200, elapsed  # rank 0 did not wait forever in a collective
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", f"dschat_cli.worker sft {out}"], capture_output=True,
                          text=True).stdout.split()
    assert not left, f"worker processes left running: {left}"
