"""`dschat ppo --advantage-estimator grpo|dr-grpo|rloo|reinforce++|reinforce++-baseline` end to end
on CPU: no critic is built, trained, checkpointed or saved; rollouts hold --samples-per-prompt
answers per prompt; the metrics have the group figures and (GRPO style) the KL loss term.

    dschat ppo --actor-model SFT_DIR --reward-model REWARD_DIR --advantage-estimator grpo \
        --samples-per-prompt 2 ...

The estimators' arithmetic is tested on hand-computed tensors in tests/unit/rlhf; here each runs
in the real loop (DeepSpeed on CPU, in process).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tests.integration.test_ppo import (actor_dir, check_one_line_error, ppo_args,  # noqa: F401
                                        read_jsonl, reward_dir)

GEN, SAMPLES, TRAIN, STEPS = 4, 2, 4, 2


def critic_free_args(actor: Path, reward: Path, out: Path, cache: Path, data: Path,
                     estimator: str, *extra: str, steps: int = STEPS) -> list:
    """ppo_args without the critic's options (a critic-free run refuses them)."""
    args = ppo_args(actor, reward, out, cache, data, actor_stage=0, critic_stage=0, steps=steps,
                    gen_batch=GEN, train_batch=TRAIN)
    drop = {"--critic-lora-dim", "--critic-learning-rate"}
    kept = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a in drop:
            skip = True
            continue
        kept.append(a)
    return [*kept, "--advantage-estimator", estimator, "--samples-per-prompt", str(SAMPLES),
            "--launcher", "none", *extra]


def test_grpo_never_builds_a_critic(tmp_path, actor_dir, reward_dir, pairs_dir,  # noqa: F811
                                    invoke_dschat, monkeypatch):
    import dschat_cli.models.reward as reward_module

    built = []
    original = reward_module.build_reward_model

    def recording(opts, *args, **kwargs):
        built.append(kwargs.get("flag", "--critic-model"))
        return original(opts, *args, **kwargs)

    monkeypatch.setattr(reward_module, "build_reward_model", recording)
    out = tmp_path / "out"
    r = invoke_dschat(*critic_free_args(actor_dir("opt"), reward_dir("opt"), out,
                                        tmp_path / "cache", pairs_dir, "grpo"))
    assert r.code == 0, r.explain()
    assert built == ["--reward-model"], built  # the frozen reward model only: no critic
    assert "no critic" in r.output and "critic 0" not in r.output, r.explain()
    assert f"PPO steps of {GEN} prompts x {SAMPLES} answers" in r.output, r.explain()
    assert "reward spread within a group" in r.output, r.explain()

    files = {p.name for p in out.iterdir()}
    assert "critic" not in files and "ds_config_critic.json" not in files, sorted(files)
    assert {"actor", "ds_config_actor.json", "ds_config_ref.json",
            "ds_config_reward.json"} <= files, sorted(files)
    resolved = json.loads((out / "resolved.json").read_text())
    assert set(resolved["ds_configs"]) == {"actor", "ref", "reward"}
    # the frozen models score whole rollouts: prompts x answers per prompt
    assert resolved["ds_configs"]["reward"]["train_micro_batch_size_per_gpu"] == GEN * SAMPLES

    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert "critic_loss" not in row and "value_clipfrac" not in row, row
        assert "critic_grad_norm" not in row, row
        assert math.isfinite(row["actor_loss"]) and math.isfinite(row["kl_loss"]), row
        assert row["group_reward_std"] >= 0 and 0.0 <= row["zero_std_groups"] <= 1.0, row
        assert row["kl_coef"] == pytest.approx(0.04)  # GRPO's default, in the loss
        assert row["kl_loss"] >= 0.0, row  # k3 is never negative
    # step 1 starts from the reference: only dropout and the first mini-batch's step move it
    assert rows[0]["kl_loss"] < 0.05, rows[0]

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["advantage_estimator"] == "grpo" and summary["samples_per_prompt"] == SAMPLES
    steps = summary["optimizer_steps"]
    assert "critic" not in steps, steps
    # each rollout: 4 prompts x 2 answers = 8 rows, mini-batches of 4 -> 2 actor steps
    assert steps["actor"] == steps["planned_actor"] == STEPS * GEN * SAMPLES // TRAIN, steps
    # the held-out figures answer each prompt once
    assert summary["heldout_end_n"] <= 4, summary


# estimator -> whether its KL goes in the loss by default (else in the reward)
OTHERS = {"dr-grpo": False, "rloo": False, "reinforce++": False, "reinforce++-baseline": False}


@pytest.mark.parametrize("estimator", list(OTHERS))
def test_every_critic_free_estimator_trains(estimator, tmp_path, actor_dir, reward_dir,  # noqa: F811
                                             pairs_dir, invoke_dschat):
    out = tmp_path / "out"
    r = invoke_dschat(*critic_free_args(actor_dir("opt"), reward_dir("opt"), out,
                                        tmp_path / "cache", pairs_dir, estimator))
    assert r.code == 0, r.explain()
    assert not (out / "critic").exists()
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows) == STEPS
    for row in rows:
        assert math.isfinite(row["actor_loss"]) and math.isfinite(row["advantage_mean"]), row
        assert ("kl_loss" in row) == OTHERS[estimator], row
        if estimator.startswith("reinforce++"):  # whitened over the experience: mean 0
            assert row["advantage_mean"] == pytest.approx(0.0, abs=1e-5), row
        if estimator != "reinforce++":
            assert "group_reward_std" in row, row


def test_critic_free_refusals(tmp_path, actor_dir, reward_dir, pairs_dir,  # noqa: F811
                              invoke_dschat):
    actor, reward = actor_dir("opt"), reward_dir("opt")

    def run(*extra, estimator="grpo"):
        out = tmp_path / "refused"
        args = critic_free_args(actor, reward, out, tmp_path / "cache", pairs_dir, estimator,
                                *extra)
        result = invoke_dschat(*args)
        assert not out.exists() or not any(out.iterdir()), "a refused run wrote files"
        return result

    check_one_line_error(run("--critic-learning-rate", "1e-3"), "--critic-learning-rate")
    check_one_line_error(run("--critic-lora-dim", "4"), "--critic-lora-dim")
    check_one_line_error(run("--samples-per-prompt", "1"), "--samples-per-prompt")
    check_one_line_error(run("--gamma", "0.9"), "--gamma")
    check_one_line_error(run("--reward-model", str(actor)), "--critic-model")
    check_one_line_error(run("--whiten-advantages", estimator="reinforce++"),
                         "--whiten-advantages")
