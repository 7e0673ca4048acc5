"""PPO learns: the InstructGPT recipe on a synthetic task raises the reward on held-out prompts.

    1. SFT      tiny Llama, 5 epochs (lr 3e-3) on the demo pairs where the trained answer is the
                polite one for half of the prompts and the rude one for the other half: the actor
                answers politely or rudely at random (and in broken English).
    2. reward   tiny Llama, 1 epoch on the real pairs (polite preferred): held-out accuracy 1.0,
                chosen ~ +2.4, rejected ~ -3.7.
    3. PPO      --reward-model: that reward model; --critic-model: the SFT backbone with a zero
                value head (saved as a reward folder), so the only source of reward is the
                reward model's score on the finished answer. 32 steps of 16 prompts (512 train
                prompts, one epoch), actor lr 3e-4, critic lr 1e-3, answers of up to 16 tokens,
                default KL coefficient 0.1; the held-out reward is measured on 256 prompts in
                question phrasings never seen in training.

Why not the usual critic (initialised from the reward model)? It also raises the reward, by more
(+2.3 .. +3.4), but a critic that already scores prefixes feeds the reward model's preferences
into the advantages through V(t+1) - V(t): with the score zeroed in the per-token rewards the
held-out reward still rose by +1.6. With the zero-head critic the same mutation gives +0.28 (the
sampling noise of the held-out mean, measured once), placing the score on the first answer token
instead of the last gives +0.59, and flipping the sign of the policy loss gives -1.8: each of
these mutations (tried by monkeypatching, seed 1234) fails this test.

Observed on CPU with seeds 1234 and 1..20 (21 runs):
    held-out reward gain (end - start)     1.64 .. 2.71  (mean 2.28; seed 1234: 2.23)
    mean KL to the reference, last 8 steps 2.1 .. 6.3
    largest KL of any step                 2.6 .. 8.5
    batch reward, last 8 minus first 8     0.94 .. 2.27

The asserted bounds keep a safety factor of about 1.6-2 over the worst observed run. With only 64
held-out prompts and 16 steps the gain was much noisier (0.76 .. 2.63 with the reward-model
critic): hence the larger prompt set. The same seed twice gives the same run exactly.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

MIN_HELDOUT_GAIN = 1.0     # observed >= 1.64 (21 seeds); held-out noise ~0.3
MAX_LATE_KL = 12.0         # mean KL of the last 8 steps; observed <= 6.3
MAX_STEP_KL = 25.0         # any single step; observed <= 8.5
MIN_BATCH_GAIN = 0.5       # batch reward, mean of last 8 steps - first 8; observed >= 0.94
STEPS = 32
TIMING_KEYS = {"time", "seconds", "generation_share", "samples_per_s", "tokens_per_s"}


def _mixed_sft_dir(pairs_dir: Path, out: Path) -> Path:
    """The pairs with the trained answer ("chosen") polite or rude at random (seeded, 50/50)."""
    rng = random.Random(0)
    out.mkdir(parents=True)
    for part in ("train", "eval"):
        rows = json.loads((pairs_dir / f"{part}.json").read_text())
        mixed = []
        for r in rows:
            polite = rng.random() < 0.5
            mixed.append({"prompt": r["prompt"],
                          "chosen": r["chosen"] if polite else r["rejected"],
                          "rejected": r["rejected"] if polite else r["chosen"]})
        (out / f"{part}.json").write_text(json.dumps(mixed))
    return out


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_model_dir, pairs_dir, invoke_dschat) -> dict:
    """Steps 1 and 2 (in process) and a larger prompt set for step 3."""
    from dschat_cli.demo.synthetic import write_jsonfile_dir

    root = tmp_path_factory.mktemp("ppo_learning")
    llama = tiny_model_dir("llama")
    mixed = _mixed_sft_dir(pairs_dir, root / "mixed")
    sft = invoke_dschat("sft", "--model", llama, "--data-path", "local/jsonfile", "--data-dir",
                        mixed, "--data-split", "10,0,0", "--output-dir", root / "sft",
                        "--data-cache-dir", root / "cache", "--num-train-epochs", "5",
                        "--per-device-train-batch-size", "8", "--learning-rate", "3e-3",
                        "--max-seq-len", "128", "--launcher", "none")
    assert sft.code == 0, sft.explain()
    rm = invoke_dschat("reward", "--model", llama, "--data-path", "local/jsonfile", "--data-dir",
                       pairs_dir, "--data-split", "0,10,0", "--output-dir", root / "reward",
                       "--data-cache-dir", root / "cache", "--num-train-epochs", "1",
                       "--per-device-train-batch-size", "16", "--learning-rate", "1e-3",
                       "--max-seq-len", "128", "--launcher", "none")
    assert rm.code == 0, rm.explain()
    end = json.loads((root / "reward" / "train_summary.json").read_text())["eval_end"]
    assert end["accuracy"] >= 0.95, end
    # 512 train prompts (32 steps of 16), 256 held-out prompts in unseen phrasings
    prompts = write_jsonfile_dir(root / "prompts", n_train=STEPS * 16, n_eval=256, seed=1,
                                 hard_negatives=False)
    return {"root": root, "actor": root / "sft", "reward": root / "reward", "prompts": prompts,
            "critic": _zero_head_critic(root / "sft", root / "critic")}


def _zero_head_critic(sft: Path, out: Path) -> Path:
    """A reward folder holding the SFT model's backbone and a value head of zeros."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from dschat_cli.models.reward import RewardModel, save_reward_model

    model = RewardModel(AutoModel.from_pretrained(sft))
    with torch.no_grad():
        model.v_head.weight.zero_()
    save_reward_model(model, AutoTokenizer.from_pretrained(sft), out, zero_stage=0, is_main=True)
    return out


def _ppo(recipe: dict, name: str, invoke_dschat, seed: int = 1234, actor_lr: str = "3e-4",
         steps: int = STEPS) -> tuple[dict, list[dict]]:
    out = recipe["root"] / name
    r = invoke_dschat("ppo", "--actor-model", recipe["actor"], "--critic-model", recipe["critic"],
                      "--reward-model", recipe["reward"],
                      "--data-path", "local/jsonfile", "--data-dir", recipe["prompts"],
                      "--data-split", "0,0,10", "--output-dir", out,
                      "--data-cache-dir", recipe["root"] / "cache", "--launcher", "none",
                      "--seed", str(seed), "--per-device-generation-batch-size", "16",
                      "--per-device-training-batch-size", "8", "--max-answer-seq-len", "16",
                      "--actor-learning-rate", actor_lr, "--critic-learning-rate", "1e-3",
                      "--num-warmup-steps", "0", "--test-stop-step", str(steps),
                      "--max-eval-samples", "256")
    assert r.code == 0, r.explain()
    summary = json.loads((out / "train_summary.json").read_text())
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    return summary, rows


def _no_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


@pytest.mark.slow
def test_ppo_raises_heldout_reward_with_bounded_kl(recipe, invoke_dschat):
    summary, rows = _ppo(recipe, "ppo", invoke_dschat)
    assert summary["steps"] == STEPS and len(rows) == STEPS
    start, end = summary["reward_heldout_start"], summary["reward_heldout_end"]
    assert math.isfinite(start) and math.isfinite(end)
    # the margin: +1.0 on held-out prompts (observed +1.64 .. +2.71 over 21 seeds, noise ~0.3;
    # the reward model's polite/rude gap is ~6, the SFT actor starts near -0.6)
    assert end - start >= MIN_HELDOUT_GAIN, (start, end)
    # ... also visible in the training batches
    first8 = sum(r["reward"] for r in rows[:8]) / 8
    last8 = sum(r["reward"] for r in rows[-8:]) / 8
    assert last8 - first8 >= MIN_BATCH_GAIN, (first8, last8)
    # the KL penalty keeps the actor near the reference
    kls = [r["kl"] for r in rows]
    assert sum(kls[-8:]) / 8 < MAX_LATE_KL, kls
    assert max(abs(k) for k in kls) < MAX_STEP_KL, kls
    # no collapse to empty answers, nothing diverged
    assert all(r["answer_length"] > 8 for r in rows), [r["answer_length"] for r in rows]
    assert all(math.isfinite(r["actor_loss"]) and math.isfinite(r["critic_loss"]) for r in rows)

    # deterministic: the same seed again (same process, fresh models) gives the same run exactly
    again, rows_again = _ppo(recipe, "ppo_again", invoke_dschat)
    assert [_no_timing(r) for r in rows_again] == [_no_timing(r) for r in rows]
    assert again["reward_heldout_start"] == start and again["reward_heldout_end"] == end


@pytest.mark.slow
def test_a_policy_that_does_not_move_keeps_its_heldout_figures(recipe, invoke_dschat):
    """The held-out answers before and after training are drawn with the same noise
    (steps/common.same_draws): with the actor frozen (learning rate 0; the critic still trains
    and the run draws its rollouts as usual) the end figures equal the start ones exactly, where
    two independent draws differ by the sampling noise (~0.3 here)."""
    summary, rows = _ppo(recipe, "frozen", invoke_dschat, actor_lr="0", steps=2)
    assert len(rows) == 2 and summary["heldout_end_n"] >= 200, summary
    assert summary["reward_heldout_end"] == summary["reward_heldout_start"], summary


@pytest.mark.slow
def test_a_reward_that_pays_for_repetition_is_caught(recipe, invoke_dschat, monkeypatch):
    """Reward hacking, made certain: the reward model is replaced by a proxy that pays for
    repeated words (5 x the share of each answer's tokens it already used). PPO
    raises that proxy by making the answers repeat, and the health monitor stops the run with
    the figures that show why: the repeated-trigram share above --max-repetition for 3 steps,
    while the proxy reward rose."""
    import torch

    from dschat_cli.rlhf.quality import repeated_ngram_fraction
    from dschat_cli.steps.rl.experience import ExperienceMaker

    real_make = ExperienceMaker.make

    def hacked(self, batch, generator=None, samples=None):
        r = real_make(self, batch, generator, samples)
        P = r.prompts.shape[1]
        pays = repeated_ngram_fraction(r.seq[:, P:], r.action_mask, n=1)
        return r._replace(scores=(5.0 * pays).to(r.scores.device, torch.float32))

    monkeypatch.setattr(ExperienceMaker, "make", hacked)
    out = recipe["root"] / "hacked"
    r = invoke_dschat("ppo", "--actor-model", recipe["actor"], "--critic-model", recipe["critic"],
                      "--reward-model", recipe["reward"],
                      "--data-path", "local/jsonfile", "--data-dir", recipe["prompts"],
                      "--data-split", "0,0,10", "--output-dir", out,
                      "--data-cache-dir", recipe["root"] / "cache", "--launcher", "none",
                      "--per-device-generation-batch-size", "16",
                      "--per-device-training-batch-size", "8", "--max-answer-seq-len", "16",
                      "--actor-learning-rate", "1e-3", "--critic-learning-rate", "1e-3",
                      "--num-warmup-steps", "0", "--num-train-epochs", "2",
                      "--max-eval-samples", "32", "--kl-ctl", "0.01")
    assert r.code == 1, r.explain()
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: ppo step ") and "exploiting the reward model" in last, r.output
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["status"] == "stopped", summary
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    steps = [row for row in rows if "reward" in row]
    anomalies = [row["anomaly"] for row in rows if "anomaly" in row]
    # seed 1234 (old logprobs from the engine from rollout 2, --old-logprobs auto): distinct-2
    # 0.86 -> 0.14 and repeated trigrams 0 -> 0.68 by step 33, when both the repetition rule (3
    # steps above 0.5) and the diversity rule (3 steps below 0.3 x baseline) stop it; either may
    # come first on another trajectory (seed 1234 with old logprobs from the forward pass: the
    # diversity rule alone at step 27)
    assert 1 <= len(anomalies) <= 2 and len({a["global_step"] for a in anomalies}) == 1, anomalies
    assert {a["kind"] for a in anomalies} <= {"diversity", "repetition"}, anomalies
    assert all(a["action"] == "stop" for a in anomalies), anomalies
    assert any(a["figure"] in last for a in anomalies), last
    assert steps[-1]["repetition"] > 0.2 > steps[0]["repetition"], [s["repetition"] for s in steps]
    assert steps[-1]["distinct"] < 0.5 * steps[0]["distinct"], [s["distinct"] for s in steps]
    # while the proxy said the run was going well: its reward rose with the repetition
    assert steps[-1]["reward"] > steps[0]["reward"] + 1.0, [s["reward"] for s in steps]
    assert not (out / "actor").exists()  # nothing saved after the anomaly
