"""The README's Python-API example (examples/custom_ppo_loop.py) runs as documented."""

import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_custom_ppo_loop_example(tiny_model_dir, pairs_dir, tmp_path, invoke_dschat):
    actor = tiny_model_dir("opt", dropout=0.0)  # any causal LM folder works as the actor
    reward = tmp_path / "reward"
    r = invoke_dschat("reward", "--model", actor, "--data-path", "local/jsonfile", "--data-dir",
                      pairs_dir, "--data-split", "0,10,0", "--output-dir", reward,
                      "--data-cache-dir", tmp_path / "cache", "--launcher", "none",
                      "--num-train-epochs", "1", "--learning-rate", "1e-3",
                      "--max-seq-len", "128", "--max-train-samples", "64")
    assert r.code == 0, r.output
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_ppo_loop.py"),
                           str(actor), str(reward), str(pairs_dir), "2"],
                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2, proc.stdout
    assert all("reward" in line for line in lines)
