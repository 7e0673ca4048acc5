"""Exact resume after SIGKILL, for each training step (CPU, fp32, tiny models).

    dschat sft ... --save-interval 2 --output-dir OUT     # killed: SIGKILL
    dschat sft ... --save-interval 2 --output-dir OUT --resume auto

For each of sft, reward and ppo: an uninterrupted run (in process) is the reference; a second run
with the same seed (a `python -m dschat_cli` subprocess) is killed with SIGKILL, then resumed in
process with --resume auto (no --overwrite). The resumed run must end with the reference's final
weights and metrics EXACTLY: same bits in fp32 on CPU, since batches, dropout masks, sampled
answers, optimizer and scheduler state all continue from the checkpoint. Only wall-clock and
memory figures (time, throughput, peak memory) are left out of the comparison.

The kill is SIGKILL sent by the process to itself at a chosen point (a one-line patch in the
subprocess), so where it lands is deterministic, not a race with a polling test:
  sft     during the write of checkpoint 6: its files are there, its complete.json is not. The
          resume must take checkpoint 4 (the previous one) and rewrite 6.
  reward  right after step 3's metrics row (checkpoint 2 complete), ZeRO-2 with gradient
          accumulation 2: rows past the checkpoint are dropped and logged again.
  ppo     right after PPO step 3's row (checkpoint 2), with EMA and unsupervised data (their state
          and the unsupervised data position are part of the checkpoint).

Each killed subprocess (~10 s, mostly imports) runs while its reference trains in this process.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Dies with SIGKILL at a point given on its command line, else runs `dschat ARGS` as the CLI does.
#   commit N: while writing checkpoint N, after every file but complete.json
#   row N:    right after the metrics.jsonl row of training step N is written
KILLER = """
import os, signal, sys
where, at = sys.argv[1], int(sys.argv[2])
if where == "commit":
    from dschat_cli.steps import checkpoint as ck
    commit = ck.CheckpointManager._commit
    def _commit(self, folder, step):
        if step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return commit(self, folder, step)
    ck.CheckpointManager._commit = _commit
else:
    from dschat_cli.ui import metrics
    log = metrics.MetricsLog.log
    def _log(self, step, **values):
        log(self, step, **values)
        if step == at and ("loss" in values or "actor_loss" in values):
            os.kill(os.getpid(), signal.SIGKILL)
    metrics.MetricsLog.log = _log
from dschat_cli.cli.app import main
sys.argv = ["dschat", *sys.argv[3:]]
main()
"""

# wall-clock and memory figures: not part of the run's state
UNTIMED = {"time", "seconds", "tokens_per_s", "tflops_per_gpu", "pairs_per_s", "samples_per_s",
           "generation_share", "generation_seconds", "train_seconds", "output_dir",
           "peak_memory_gib"}


def _env() -> dict:
    import os

    # in-process runs set these (Dist.init); a subprocess must start its own world of one
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
            "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "COLUMNS": "200"}


def killed_run(kill: tuple[str, int], args: list) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", KILLER, kill[0], str(kill[1]),
                             *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(),
                            stdin=subprocess.DEVNULL)


def finish_killed(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"exit code {proc.returncode}:\n{out}"
    return out


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in UNTIMED}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def assert_same_run(ref: Path, resumed: Path, weight_files: list[str],
                    summary_differs: dict | None = None) -> None:
    """Bit-identical weights, metrics rows and summary (wall-clock figures aside, and the
    summary's `summary_differs` keys: key -> (ref's value, the resumed run's))."""
    import torch
    from safetensors.torch import load_file

    def rows(out: Path) -> list[dict]:
        return [_strip(json.loads(x)) for x in (out / "metrics.jsonl").read_text().splitlines()]

    assert rows(resumed) == rows(ref)
    summary = [_strip(json.loads((o / "train_summary.json").read_text())) for o in (ref, resumed)]
    for key, values in (summary_differs or {}).items():
        assert (summary[0].pop(key), summary[1].pop(key)) == values, key
    assert summary[1] == summary[0]
    for name in weight_files:
        a, b = load_file(str(ref / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys(), name
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{name}: {differ[:5]} differ"


def checkpoints(out: Path) -> tuple[list[str], str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.is_dir()), (root / "latest").read_text()


def resumed_from(output: str) -> str:
    m = re.search(r"resumed from (\S+step_\d+)", output)
    assert m, output
    return Path(m.group(1)).name


# --- step 1 ---------------------------------------------------------------------------------------

def sft_args(model: Path, data: Path, out: Path, cache: Path) -> list:
    """40 samples, batch 8: 5 optimizer steps an epoch, 2 epochs; OPT keeps its dropout 0.1 (the
    RNG must be restored for the masks to match)."""
    return ["sft", "--model", model, "--data-path", "local/jsonfile", "--data-dir", data,
            "--data-split", "10,0,0", "--max-train-samples", "40", "--max-eval-samples", "16",
            "--per-device-train-batch-size", "8", "--num-train-epochs", "2",
            "--learning-rate", "1e-3", "--max-seq-len", "64", "--launcher", "none",
            "--save-interval", "2", "--output-dir", out, "--data-cache-dir", cache]


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, tiny_opt, pairs_dir, invoke_dschat):
    """(reference output, resumed output, the killed run's console, the resumed run's)."""
    root = tmp_path_factory.mktemp("resume_sft")
    ref, out = root / "ref", root / "out"
    proc = killed_run(("commit", 6), sft_args(tiny_opt, pairs_dir, out, root / "cache-k"))
    r = invoke_dschat(*sft_args(tiny_opt, pairs_dir, ref, root / "cache-r"))
    assert r.code == 0, r.explain()
    killed = finish_killed(proc)
    # checkpoint 6 was being written: files there, no complete.json; latest still names 4
    assert (out / "checkpoints" / "step_000006" / "model").is_dir(), killed
    assert not (out / "checkpoints" / "step_000006" / "complete.json").exists()
    assert checkpoints(out)[1] == "step_000004"
    resumed = invoke_dschat(*sft_args(tiny_opt, pairs_dir, out, root / "cache-k"),
                            "--resume", "auto")
    assert resumed.code == 0, resumed.explain()
    return ref, out, killed, resumed.output


def test_sft_killed_while_writing_a_checkpoint_resumes_exactly_from_the_previous(sft_runs):
    ref, out, _, output = sft_runs
    assert resumed_from(output) == "step_000004"
    assert_same_run(ref, out, ["model.safetensors"])
    # --keep-last 2 (the default): the two newest, complete; the interrupted 6 rewritten, then
    # pruned with the others; the final checkpoint is the last step's
    assert checkpoints(out) == (["step_000008", "step_000010"], "step_000010")
    assert checkpoints(ref) == checkpoints(out)


def test_resume_with_half_the_learning_rate_continues_at_half_the_schedule(sft_runs, tmp_path,
                                                                          tiny_opt, pairs_dir,
                                                                          invoke_dschat):
    """The health monitor's advice after a divergence: resume the last good checkpoint with a
    lower learning rate. Checkpoint 8 of the sft run (lr 1e-3, cosine over 10 steps), resumed
    into another folder with --learning-rate 5e-4: steps 9 and 10 log exactly half the
    uninterrupted run's lr, and the change is printed and recorded."""
    ref, out, _, _ = sft_runs
    new = tmp_path / "half"
    r = invoke_dschat(*sft_args(tiny_opt, pairs_dir, new, tmp_path / "cache"), "--resume",
                      out / "checkpoints" / "step_000008", "--learning-rate", "5e-4")
    assert r.code == 0, r.explain()
    assert "--learning-rate changed from 0.001 to 0.0005 on resume" in r.output, r.explain()

    def lrs(folder: Path) -> dict[int, float]:
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: row["lr"] for row in rows if "lr" in row}

    want = {s: lr / 2 for s, lr in lrs(ref).items() if s > 8}
    assert lrs(new) == want and want[9] > 0, (lrs(new), lrs(ref))
    change = {"flag": "--learning-rate", "from": 0.001, "to": 0.0005}
    rows = [json.loads(x) for x in (new / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["lr_change"]) for row in rows if "lr_change" in row] == \
        [(8, change)]
    summary = json.loads((new / "train_summary.json").read_text())
    assert summary["status"] == "completed" and summary["lr_changes"] == [{**change, "step": 8}]


# --- step 2 ---------------------------------------------------------------------------------------

def reward_args(model: Path, data: Path, out: Path, cache: Path) -> list:
    """48 pairs, batch 8, gradient accumulation 2: 3 optimizer steps an epoch, 2 epochs; ZeRO-2
    (partitioned optimizer state in the checkpoint)."""
    return ["reward", "--model", model, "--data-path", "local/jsonfile", "--data-dir", data,
            "--data-split", "0,10,0", "--max-train-samples", "48", "--max-eval-samples", "16",
            "--per-device-train-batch-size", "8", "--gradient-accumulation-steps", "2",
            "--zero-stage", "2", "--num-train-epochs", "2", "--learning-rate", "1e-3",
            "--max-seq-len", "64", "--launcher", "none", "--save-interval", "2",
            "--output-dir", out, "--data-cache-dir", cache]


def test_reward_killed_mid_run_resumes_exactly(tmp_path, tiny_opt, pairs_dir, invoke_dschat):
    ref, out = tmp_path / "ref", tmp_path / "out"
    proc = killed_run(("row", 3), reward_args(tiny_opt, pairs_dir, out, tmp_path / "cache-k"))
    r = invoke_dschat(*reward_args(tiny_opt, pairs_dir, ref, tmp_path / "cache-r"))
    assert r.code == 0, r.explain()
    finish_killed(proc)
    assert checkpoints(out)[1] == "step_000002"
    assert not (out / "train_summary.json").exists()  # killed before the end
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert 3 in logged  # a row past the checkpoint: dropped on resume, logged again
    resumed = invoke_dschat(*reward_args(tiny_opt, pairs_dir, out, tmp_path / "cache-k"),
                            "--resume", "auto")
    assert resumed.code == 0, resumed.explain()
    assert resumed_from(resumed.output) == "step_000002"
    assert_same_run(ref, out, ["model.safetensors", "value_head.safetensors"])


# --- step 3 ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def critic_dir(tiny_opt, tmp_path_factory) -> Path:
    """A reward folder (tiny OPT backbone, untrained head): training quality is not the point."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from dschat_cli.models.reward import RewardModel, save_reward_model

    out = tmp_path_factory.mktemp("resume_critic")
    torch.manual_seed(0)
    save_reward_model(RewardModel(AutoModel.from_pretrained(tiny_opt)),
                      AutoTokenizer.from_pretrained(tiny_opt), out, zero_stage=0, is_main=True)
    return out


def ppo_args(actor: Path, critic: Path, data: Path, unsup: Path, out: Path, cache: Path) -> list:
    """5 PPO steps of 4 prompts, 8-token sampled answers, EMA, unsupervised LM loss."""
    return ["ppo", "--actor-model", actor, "--critic-model", critic, "--data-path",
            "local/jsonfile", "--data-dir", data, "--data-split", "0,0,10",
            "--per-device-generation-batch-size", "4", "--per-device-training-batch-size", "2",
            "--max-answer-seq-len", "8", "--max-prompt-seq-len", "32", "--test-stop-step", "5",
            "--max-eval-samples", "4", "--num-warmup-steps", "0", "--actor-learning-rate", "1e-4",
            "--critic-learning-rate", "1e-4", "--enable-ema", "--unsupervised-dataset-name",
            unsup, "--unsup-coef", "1.0", "--launcher", "none", "--save-interval", "2",
            "--output-dir", out, "--data-cache-dir", cache]


def test_ppo_killed_mid_run_resumes_exactly(tmp_path, tiny_opt, critic_dir, pairs_dir,
                                            invoke_dschat):
    from dschat_cli.models.local_tokenizer import default_corpus

    unsup = tmp_path / "corpus.txt"
    unsup.write_text("\n".join(default_corpus(n=100, seed=3)) + "\n", encoding="utf-8")
    ref, out = tmp_path / "ref", tmp_path / "out"
    proc = killed_run(("row", 3), ppo_args(tiny_opt, critic_dir, pairs_dir, unsup, out,
                                           tmp_path / "cache-k"))
    r = invoke_dschat(*ppo_args(tiny_opt, critic_dir, pairs_dir, unsup, ref,
                                tmp_path / "cache-r"))
    assert r.code == 0, r.explain()
    finish_killed(proc)
    assert checkpoints(out)[1] == "step_000002"
    # --compile-decode is free on resume (how fast the decode step runs, not what it computes)
    resumed = invoke_dschat(*ppo_args(tiny_opt, critic_dir, pairs_dir, unsup, out,
                                      tmp_path / "cache-k"), "--resume", "auto",
                            "--compile-decode", "off")
    assert resumed.code == 0, resumed.explain()
    assert resumed_from(resumed.output) == "step_000002"
    assert_same_run(ref, out, ["actor/model.safetensors", "critic/model.safetensors",
                               "critic/value_head.safetensors", "actor_ema/model.safetensors"],
                    summary_differs={"decode_step": ("uncompiled (--compile-decode auto: on CPU)",
                                                     "uncompiled (--compile-decode off)")})
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["unsup_loss"] > 0
    # interval 2, 5 steps: 2, 4 and the final 5; the newest two kept
    assert checkpoints(out) == (["step_000004", "step_000005"], "step_000005")


def test_grpo_killed_mid_run_resumes_exactly(tmp_path, tiny_opt, critic_dir, pairs_dir,
                                             invoke_dschat):
    """A critic-free estimator resumes as PPO does: the checkpoints hold the actor only (no critic
    engine state), the groups of answers continue from the same RNG streams, and the adaptive KL
    coefficient of the loss term continues from its saved value."""
    def args(out: Path, cache: Path) -> list:
        return ["ppo", "--actor-model", tiny_opt, "--reward-model", critic_dir, "--data-path",
                "local/jsonfile", "--data-dir", pairs_dir, "--data-split", "0,0,10",
                "--advantage-estimator", "grpo", "--samples-per-prompt", "2",
                "--kl-target", "0.5", "--kl-horizon", "20",
                "--per-device-generation-batch-size", "2", "--per-device-training-batch-size", "2",
                "--max-answer-seq-len", "8", "--max-prompt-seq-len", "32", "--test-stop-step", "5",
                "--max-eval-samples", "4", "--num-warmup-steps", "0",
                "--actor-learning-rate", "1e-4", "--launcher", "none", "--save-interval", "2",
                "--output-dir", out, "--data-cache-dir", cache]

    ref, out = tmp_path / "ref", tmp_path / "out"
    proc = killed_run(("row", 3), args(out, tmp_path / "cache-k"))
    r = invoke_dschat(*args(ref, tmp_path / "cache-r"))
    assert r.code == 0, r.explain()
    finish_killed(proc)
    assert checkpoints(out)[1] == "step_000002"
    assert not any((out / "checkpoints" / "step_000002").glob("critic*")), \
        sorted(p.name for p in (out / "checkpoints" / "step_000002").iterdir())
    resumed = invoke_dschat(*args(out, tmp_path / "cache-k"), "--resume", "auto")
    assert resumed.code == 0, resumed.explain()
    assert resumed_from(resumed.output) == "step_000002"
    assert_same_run(ref, out, ["actor/model.safetensors"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert len({r["kl_coef"] for r in rows}) > 1, rows  # the adaptive coefficient moved
    assert not (out / "critic").exists()


# --- refusals -------------------------------------------------------------------------------------

def one_error_line(result) -> str:
    assert result.code == 2, result.explain()
    assert "Traceback" not in result.output, result.explain()
    lines = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, result.explain()
    return lines[0]


def test_resume_refuses_damaged_incomplete_or_mismatched_checkpoints(sft_runs, tmp_path,
                                                                     tiny_opt, pairs_dir,
                                                                     invoke_dschat):
    """Exit 2 and one line naming the checkpoint (or the differing flag) and the fix, before
    anything is launched or written: the run's outputs stay as they were."""
    import shutil

    _, out, _, _ = sft_runs
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    args = sft_args(tiny_opt, pairs_dir, out, tmp_path / "cache")

    # a damaged file (truncated: its size is not the one complete.json recorded)
    damaged = tmp_path / "step_000010"
    shutil.copytree(out / "checkpoints" / "step_000010", damaged)
    states = damaged / "model" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:100])
    line = one_error_line(invoke_dschat(*args, "--resume", damaged))
    assert line.startswith("error: --resume: ") and str(damaged) in line and "damaged" in line
    assert "mp_rank_00_model_states.pt" in line and "start over" in line

    # incomplete: no complete.json (a write that was interrupted)
    (damaged / "complete.json").unlink()
    line = one_error_line(invoke_dschat(*args, "--resume", damaged))
    assert "incomplete" in line and str(damaged) in line

    # the run's own latest checkpoint, resumed with another weight decay (a learning rate may
    # change: test_resume_with_half_the_learning_rate...)
    line = one_error_line(invoke_dschat(*args, "--resume", "auto", "--weight-decay", "0.1"))
    assert line.startswith("error: --weight-decay: is 0.1 but checkpoint "), line
    assert "step_000010" in line

    # a path that does not exist
    line = one_error_line(invoke_dschat(*args, "--resume", tmp_path / "nope"))
    assert "does not exist" in line

    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_bf16_zero1_fp32_gradients_resume_exactly(tmp_path, tiny_opt, pairs_dir, invoke_dschat):
    """DeepSpeed's BF16_Optimizer (bf16 at ZeRO-1: fp32 gradient accumulation, the bench's
    one-GPU choice) keeps its fp32 master partition and Adam states in its own checkpoint files:
    a run resumed from its checkpoint 8 (--keep-last 2 kept 8 and 10) into another folder ends
    with the uninterrupted run's weights and metrics, bit for bit."""
    flags = ("--dtype", "bf16", "--zero-stage", "1")
    ref, out = tmp_path / "ref", tmp_path / "out"
    r = invoke_dschat(*sft_args(tiny_opt, pairs_dir, ref, tmp_path / "cache"), *flags)
    assert r.code == 0, r.explain()
    assert "ZeRO-1, fp32 gradients" in r.output
    step8 = ref / "checkpoints" / "step_000008"
    assert any(p.name.startswith("bf16_zero_pp_rank_0") for p in (step8 / "model").rglob("*"))
    resumed = invoke_dschat(*sft_args(tiny_opt, pairs_dir, out, tmp_path / "cache"), *flags,
                            "--resume", step8)
    assert resumed.code == 0, resumed.explain()
    assert resumed_from(resumed.output) == "step_000008"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    # the new folder logs what it trained, steps 9 and 10: as the uninterrupted run did
    assert [_strip(x) for x in rows] == [_strip(x) for x in ref_rows if x["step"] > 8]
    assert [x["step"] for x in rows if "loss" in x] == [9, 10]
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
