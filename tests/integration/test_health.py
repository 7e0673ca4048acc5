"""The health monitor in real runs (in process, --launcher none, tiny models on CPU): a NaN
injected into the model's forward at a chosen training step.

    dschat sft ... --launcher none                      # NaN at step 3: exit 1, one error line
    dschat sft ... --zero-stage 2 --on-anomaly warn     # warned, DeepSpeed skips the step, done
    dschat ppo ... --launcher none                      # NaN in the actor at PPO step 2: exit 1
    dschat sft ... --save-interval 2                    # NaN at step 4: step_000002 intact, resumes

A stopped run records the anomaly (metrics.jsonl, train_summary.json "status": "stopped") and
saves no model. The in-process launcher runs the step in the pytest process, so monkeypatching
the step module's model loader reaches the model being trained.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

GEN_BATCH, TRAIN_BATCH = 4, 2  # PPO: two actor mini-batches (training forwards) per step


def inject_nan(monkeypatch, module, at: int, only_once: bool = True) -> None:
    """The `at`-th training-mode forward (1-based) of every model `module.load_causal_lm` loads
    returns NaN logits and loss (eval-mode forwards, e.g. evaluation and PPO scoring, don't
    count). PPO's reference model is loaded the same way but never trains."""
    real = module.load_causal_lm
    calls = {"n": 0}

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        forward = model.forward

        def patched(*a, **kw):
            out = forward(*a, **kw)
            if model.training:
                calls["n"] += 1
                if calls["n"] == at or (not only_once and calls["n"] > at):
                    out.logits = out.logits * float("nan")
                    if getattr(out, "loss", None) is not None:
                        out.loss = out.loss * float("nan")
            return out

        model.forward = patched
        return model

    monkeypatch.setattr(module, "load_causal_lm", load)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def error_lines(output: str) -> list[str]:
    return [ln.strip() for ln in output.splitlines() if "error:" in ln]


def check_stopped(out: Path, *, step_name: str, step: int, figure: str) -> dict:
    """What a stopped run leaves: the anomaly as the last metrics row and in the summary."""
    rows = read_jsonl(out / "metrics.jsonl")
    anomalies = [r for r in rows if "anomaly" in r]
    assert anomalies and anomalies[0]["step"] == step, rows
    assert anomalies[0]["anomaly"]["figure"] == figure and \
        anomalies[0]["anomaly"]["action"] == "stop", anomalies
    assert all(r["step"] <= step for r in rows), rows  # nothing ran after it
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["status"] == "stopped" and summary["step"] == step_name, summary
    assert summary["steps"] == step and summary["model_saved"] is False, summary
    assert summary["anomaly"]["figure"] == figure
    return summary


def test_sft_nan_stops_the_run_without_saving(monkeypatch, tmp_path, tiny_opt, pairs_dir,
                                              invoke_dschat, sft_args):
    import dschat_cli.steps.sft as sft

    inject_nan(monkeypatch, sft, at=3)
    out = tmp_path / "out"
    r = invoke_dschat(*sft_args(tiny_opt, out, tmp_path / "cache", pairs_dir, zero_stage=0,
                                extra=("--launcher", "none")))
    assert r.code == 1, r.explain()
    assert "Traceback" not in r.output, r.explain()
    assert error_lines(r.output) == [
        "error: sft step 3: loss is nan (must be finite); lower --learning-rate (and keep "
        "--gradient-clipping on); stopped without saving (--on-anomaly warn keeps training)"], \
        r.explain()
    check_stopped(out, step_name="sft", step=3, figure="loss")
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert not list(out.glob("*.safetensors")) and not (out / "config.json").exists()


def test_nan_after_a_checkpoint_leaves_it_intact_and_resumable(monkeypatch, tmp_path, tiny_opt,
                                                                pairs_dir, invoke_dschat,
                                                                sft_args):
    """The issue's acceptance test: a checkpoint at step 2, a NaN at step 4, itself a checkpoint
    step. The run stops with the message naming the step-2 checkpoint, which is still `latest`
    and complete (no step-4 one, nor a final one), and following its advice (`--resume auto` and
    a lower --learning-rate) continues from it to a finished, finite model. At ZeRO-0 the NaN
    gradient of step 4 is applied to the weights in memory: only the checkpoint holds good ones."""
    from dschat_cli.config.checkpoints import checkpoint_problem, latest_name
    import dschat_cli.steps.sft as sft

    out = tmp_path / "out"
    args = sft_args(tiny_opt, out, tmp_path / "cache", pairs_dir, zero_stage=0,
                    extra=("--launcher", "none", "--max-steps", "5", "--save-interval", "2"))
    with monkeypatch.context() as mp:
        inject_nan(mp, sft, at=4)
        r = invoke_dschat(*args)
    assert r.code == 1, r.explain()
    kept = out / "checkpoints" / "step_000002"
    assert error_lines(r.output) == [
        "error: sft step 4: loss is nan (must be finite); lower --learning-rate (and keep "
        f"--gradient-clipping on); stopped without saving; last checkpoint, intact: {kept}; to "
        "continue from it, run the same command with --resume auto and a lower --learning-rate "
        "(--on-anomaly warn keeps training)"], r.explain()
    summary = check_stopped(out, step_name="sft", step=4, figure="loss")
    assert summary["last_checkpoint"] == str(kept)
    assert latest_name(out / "checkpoints") == "step_000002"
    assert checkpoint_problem(kept) is None
    assert sorted(p.name for p in (out / "checkpoints").iterdir()
                  if p.name.startswith("step_")) == ["step_000002"]
    assert not (out / "model.safetensors").exists()

    again = invoke_dschat(*args, "--resume", "auto", "--learning-rate", "5e-4")
    assert again.code == 0, again.explain()
    assert f"resumed from {kept}: step 2" in again.output, again.explain()
    assert "--learning-rate changed from 0.001 to 0.0005 on resume" in again.output
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 5, summary
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) for r in rows), rows
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert all(bool(w.float().isfinite().all()) for w in weights.values())


def test_sft_warn_continues_and_deepspeed_skips_the_nan_step(monkeypatch, tmp_path, tiny_opt,
                                                              pairs_dir, invoke_dschat, sft_args):
    """ZeRO-2 skips an optimizer step whose gradient is NaN (and reports its norm as inf): with
    --on-anomaly warn both are warned once, training goes on and the saved model is sound."""
    import dschat_cli.steps.sft as sft

    inject_nan(monkeypatch, sft, at=2)
    out = tmp_path / "out"
    args = sft_args(tiny_opt, out, tmp_path / "cache", pairs_dir, zero_stage=2,
                    extra=("--launcher", "none", "--max-steps", "5", "--on-anomaly", "warn",
                           "--save-interval", "4"))
    r = invoke_dschat(*args)
    assert r.code == 0, r.explain()
    warnings = [ln.strip() for ln in r.output.splitlines() if "warning: sft step" in ln]
    assert [re.sub(r" is .*", "", w) for w in warnings] == [
        "warning: sft step 2: loss", "warning: sft step 2: gradient norm"], r.explain()
    assert all(w.endswith("(--on-anomaly warn: training continues)") for w in warnings)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 5
    assert [(a["figure"], a["global_step"]) for a in summary["anomalies"]] == [
        ("loss", 2), ("gradient norm", 2)]
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) for r in rows if r["step"] != 2), rows
    assert all(math.isfinite(r["grad_norm"]) for r in rows if r["step"] != 2), rows
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert all(bool(w.float().isfinite().all()) for w in weights.values())

    # resumed from checkpoint 4 (in another folder), the monitor remembers step 2's anomalies:
    # the same summary as the uninterrupted run's, warned anomalies and monitor state included
    again = invoke_dschat(*args, "--resume", out / "checkpoints" / "step_000004",
                          "--output-dir", tmp_path / "again")
    assert again.code == 0, again.explain()
    resumed = json.loads((tmp_path / "again" / "train_summary.json").read_text())
    assert resumed["anomalies"] == summary["anomalies"]
    assert resumed["health"] == summary["health"]


@pytest.fixture(scope="module")
def reward_opt(tiny_opt, pairs_dir, tmp_path_factory, invoke_dschat) -> Path:
    """A briefly trained step-2 folder (critic and reward model of the PPO runs)."""
    root = tmp_path_factory.mktemp("health_reward")
    r = invoke_dschat("reward", "--model", tiny_opt, "--data-path", "local/jsonfile",
                      "--data-dir", pairs_dir, "--data-split", "0,10,0",
                      "--output-dir", root / "out", "--data-cache-dir", root / "cache",
                      "--max-steps", "4", "--per-device-train-batch-size", "8",
                      "--max-seq-len", "128", "--max-eval-samples", "8", "--launcher", "none")
    assert r.code == 0, r.explain()
    return root / "out"


def ppo_args(actor: Path, critic: Path, out: Path, cache: Path, data_dir: Path, *extra) -> list:
    return ["ppo", "--actor-model", actor, "--critic-model", critic,
            "--data-path", "local/jsonfile", "--data-dir", data_dir, "--data-split", "0,0,10",
            "--output-dir", out, "--data-cache-dir", cache,
            "--per-device-generation-batch-size", str(GEN_BATCH),
            "--per-device-training-batch-size", str(TRAIN_BATCH),
            "--max-answer-seq-len", "6", "--max-eval-samples", "4", "--num-warmup-steps", "0",
            "--actor-learning-rate", "1e-4", "--critic-learning-rate", "1e-4",
            "--launcher", "none", *extra]


def test_ppo_nan_stops_the_run_without_saving(monkeypatch, tmp_path, tiny_opt, reward_opt,
                                              pairs_dir, invoke_dschat):
    import dschat_cli.steps.rl.engines as engines

    inject_nan(monkeypatch, engines, at=TRAIN_BATCH + 1)  # the first actor forward of PPO step 2
    out = tmp_path / "out"
    r = invoke_dschat(*ppo_args(tiny_opt, reward_opt, out, tmp_path / "cache", pairs_dir,
                                "--test-stop-step", "4"))
    assert r.code == 1, r.explain()
    assert "Traceback" not in r.output, r.explain()
    assert error_lines(r.output) == [
        "error: ppo step 2: actor loss is nan (must be finite); lower --actor-learning-rate (and "
        "keep --gradient-clipping on); stopped without saving (--on-anomaly warn keeps "
        "training)"], r.explain()
    summary = check_stopped(out, step_name="ppo", step=2, figure="actor loss")
    # the NaN gradient (measured by dschat at ZeRO-0, where DeepSpeed keeps no norm) too
    assert [a["figure"] for a in summary["anomalies"]] == ["actor loss", "actor gradient norm"]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "actor_loss" in r] == [1, 2]
    assert not (out / "actor").exists() and not (out / "critic").exists()
    assert "ppo summary" not in r.output
