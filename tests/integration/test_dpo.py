"""`dschat dpo` end to end on CPU, and `dschat chat` on its output.

    dschat dpo --model TINY --data-path local/jsonfile --data-dir PAIRS --data-split 0,10,0 \
        --output-dir out                        # through deepspeed.launcher, as users run it
    dschat chat --path out --prompt ...         # loads the saved model

The synthetic pairs (`pairs_dir`: 256 train, 64 eval pairs whose questions use phrasings never
seen in training) prefer a polite answer to a rude one. One epoch (16 steps of 16 pairs at lr
1e-3) takes the tiny model's held-out implicit-reward accuracy from 0.5 (policy = reference: every
reward is 0, a tie counts one half) to 1.0 (>= 0.9 is asserted), with loss 0.693 -> ~0.14.

--precompute-ref-logprobs scores the pairs once before training: the same losses as the per-batch
reference (a copy; and the LoRA policy with its adapters off, at ZeRO-3), to float32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DPO_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
             "tokenizer_config.json", "run_config.yaml", "resolved.json", "ds_config.json",
             "ds_config_ref.json", "metrics.jsonl", "train_summary.json", "launch.sh",
             "train.log")
EVAL_KEYS = ("loss", "accuracy", "chosen_reward", "rejected_reward", "margin", "chosen_logprob")


def dpo_args(model: Path, out: Path, cache: Path, data_dir: Path, *extra) -> list:
    """One epoch on the 256 synthetic train pairs (batch 16 -> 16 steps), all in step 2's share."""
    return ["dpo", "--model", model, "--data-path", "local/jsonfile", "--data-dir", data_dir,
            "--data-split", "0,10,0", "--output-dir", out, "--data-cache-dir", cache,
            "--learning-rate", "1e-3", "--per-device-train-batch-size", "16",
            "--per-device-eval-batch-size", "16", "--max-seq-len", "128", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


@pytest.mark.slow
def test_dpo_through_the_launcher_raises_heldout_accuracy_and_chat_loads_it(
        tiny_opt, pairs_dir, tmp_path, run_dschat, invoke_dschat):
    out = tmp_path / "out"
    r = run_dschat(*dpo_args(tiny_opt, out, tmp_path / "cache", pairs_dir))
    assert r.code == 0, r.explain()
    files = {p.name for p in out.iterdir()}
    assert set(DPO_FILES) <= files, f"missing {sorted(set(DPO_FILES) - files)}"

    s = json.loads((out / "train_summary.json").read_text())
    assert s["world_size"] == 1 and s["steps"] == 16 and s["eval_pairs"] == 64, s
    assert s["reference"] == "copy"
    # before any update the policy is the reference: rewards 0, loss ln 2, accuracy chance
    assert s["eval_loss_start"] == pytest.approx(0.6931472, abs=1e-6)
    assert s["eval_accuracy_start"] == 0.5 and s["eval_margin_start"] == 0.0
    # learned on held-out phrasings
    assert s["eval_accuracy_end"] >= 0.9, s
    assert s["eval_margin_end"] > 1.0 and s["eval_loss_end"] < 0.4, s
    assert s["eval_chosen_reward_end"] > s["eval_rejected_reward_end"]
    assert s["eval_margin_end"] == pytest.approx(
        s["eval_chosen_reward_end"] - s["eval_rejected_reward_end"])
    assert s["eval_chosen_logprob_start"] < 0 and s["eval_chosen_logprob_end"] < 0
    assert s["train_loss_last"] < s["train_loss_first"]

    rows = read_jsonl(out / "metrics.jsonl")
    steps = [m for m in rows if "loss" in m]
    assert len(steps) == 16
    assert {"train_accuracy", "chosen_reward", "rejected_reward", "margin", "lr",
            "tokens_per_s", "pairs_per_s"} <= set(steps[0])
    evals = [m for m in rows if "eval_loss" in m]
    assert len(evals) == 2  # before training and after the epoch
    assert evals[-1]["eval_accuracy"] == pytest.approx(s["eval_accuracy_end"])
    assert {f"eval_{k}" for k in EVAL_KEYS} <= set(evals[0])

    assert "dpo summary" in r.output and "eval accuracy (n=64)" in r.output
    assert f"0.500 -> {s['eval_accuracy_end']:.3f}" in r.output
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["optimizer"]["params"]["lr"] == 1e-3 and ds["train_batch_size"] == 16
    ref = json.loads((out / "ds_config_ref.json").read_text())
    assert "optimizer" not in ref and ref["zero_optimization"]["stage"] == 0
    assert "dschat_cli.worker dpo" in (out / "launch.sh").read_text()

    # the saved folder is a plain causal LM that `dschat chat` answers with
    c = invoke_dschat("chat", "--path", out, "--prompt", "How do I bake bread?",
                      "--max-new-tokens", "8", "--device", "cpu")
    assert c.code == 0 and "Traceback" not in c.output and c.output.strip(), c.explain()


@pytest.mark.parametrize("extra, reference", [
    ((), "copy"),
    (("--zero-stage", "3", "--lora-dim", "8", "--only-optimize-lora", "--lora-learning-rate",
      "1e-2"), "adapters-off"),
], ids=["copy", "lora-adapters-off-zero3"])
def test_precomputed_reference_gives_the_same_losses(extra, reference, tiny_opt, pairs_dir,
                                                     tmp_path, invoke_dschat):
    small = ("--launcher", "none", "--max-steps", "4", "--max-train-samples", "64",
             "--max-eval-samples", "16", *extra)
    runs = {}
    for name, flags in (("per_batch", ()), ("precomputed", ("--precompute-ref-logprobs",))):
        out = tmp_path / name
        r = invoke_dschat(*dpo_args(tiny_opt, out, tmp_path / "cache", pairs_dir, *small,
                                    *flags))
        assert r.code == 0, r.explain()
        runs[name] = (json.loads((out / "train_summary.json").read_text()),
                      [m["loss"] for m in read_jsonl(out / "metrics.jsonl") if "loss" in m])
    (a, a_losses), (b, b_losses) = runs["per_batch"], runs["precomputed"]
    assert a["reference"] == reference and b["reference"] == "precomputed"
    assert len(a_losses) == len(b_losses) == 4
    # the same updates: the references differ only in how their batches were padded
    assert b_losses == pytest.approx(a_losses, abs=1e-5)
    assert a_losses[-1] < a_losses[0]
    for key in EVAL_KEYS:
        for end in ("start", "end"):
            assert b[f"eval_{key}_{end}"] == pytest.approx(a[f"eval_{key}_{end}"], abs=1e-5), key
    assert a["eval_pairs"] == b["eval_pairs"] == 16
