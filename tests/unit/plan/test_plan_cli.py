"""`dschat plan sft|reward|ppo|pipeline` (dschat_cli/cli/plan.py): tables, --json, exit codes,
suggestions when it does not fit, step counts from local data, and the estimate training commands
print before launch."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dschat_cli.cli.app import app
from dschat_cli.launch import runner as runner_mod

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_gpu_here(monkeypatch):
    """Tests see no GPU unless they say so (nvidia-smi is not asked)."""
    monkeypatch.setattr(runner_mod, "query_gpus", lambda: [])


def plan(*args):
    return runner.invoke(app, ["plan", *args], terminal_width=200)


def test_sft_fits_table_and_exit_0():
    r = plan("sft", "--model", "opt-1.3b", "--zero-stage", "2", "--gpu-memory", "80")
    assert r.exit_code == 0, r.output
    for text in ("memory per GPU", "optimizer states", "training forward + backward",
                 "global batch", "fits"):
        assert text in r.output
    assert "does not fit" not in r.output


def test_does_not_fit_exit_1_with_suggestions_that_fit():
    args = ["sft", "--model", "opt-1.3b", "--per-device-train-batch-size", "32", "--gpu-memory", "24"]
    r = plan(*args, "--json")
    assert r.exit_code == 1
    doc = json.loads(r.output)
    assert doc["verdict"] == "does not fit" and doc["peak_gib"] > 24
    assert doc["suggestions"], doc
    for s in doc["suggestions"]:
        assert s["verdict"] in ("fits", "tight") and s["peak_gib"] < 24
        # each suggestion's flags, added to the command, really give that estimate
        again = json.loads(plan(*args, *" ".join(s["flags"]).split(), "--json").output)
        assert again["peak_gib"] == pytest.approx(s["peak_gib"])
    r = plan(*args)
    assert r.exit_code == 1 and "to make it fit" in r.output


def test_json_has_every_component_per_model():
    r = plan("ppo", "--actor-model", "opt-1.3b", "--critic-model", "opt-350m", "--actor-zero-stage",
             "2", "--critic-zero-stage", "2", "--gpu-memory", "140", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert [m["role"] for m in doc["models"]] == ["actor", "critic", "ref", "reward"]
    actor, critic, ref, reward = doc["models"]
    assert actor["params"] == 1_315_758_080 and actor["kv_cache_gib"] > 0
    assert critic["params"] == 331_196_416 + 512  # OPT-350M backbone + value head (512-d)
    assert ref["trainable"] == 0 and ref["optimizer_gib"] == 0 and ref["grads_gib"] == 0
    assert set(doc["phases_gib"]) >= {"generation", "scoring", "actor training", "critic training"}
    assert doc["peak_gib"] == max(doc["phases_gib"].values())
    assert doc["world_size"] == 1 and doc["dtype"] == "bf16"


def test_no_gpu_and_no_gpu_memory_says_how_to_check():
    r = plan("reward", "--model", "opt-350m")
    assert r.exit_code == 0, r.output
    assert "no GPU here" in r.output and "--gpu-memory" in r.output
    doc = json.loads(plan("reward", "--model", "opt-350m", "--json").output)
    assert doc["verdict"] == "unknown" and doc["gpu_memory_gib"] is None


def test_detected_gpus_set_world_size_and_capacity(monkeypatch):
    monkeypatch.setattr(runner_mod, "query_gpus", lambda: [(81559, 8.0)] * 8)
    doc = json.loads(plan("sft", "--model", "opt-13b", "--zero-stage", "3", "--deployment-type",
                          "single_node", "--json").output)
    assert doc["world_size"] == 8 and doc["gpu_memory_gib"] == pytest.approx(81559 / 1024, rel=1e-3)
    assert doc["models"][0]["zero_stage"] == 3


def test_unknown_model_is_a_one_line_usage_error():
    r = plan("sft", "--model", "nobody/not-cached")
    assert r.exit_code == 2
    assert "--model" in r.output and "cannot estimate memory" in r.output
    assert "Traceback" not in r.output


def test_step_counts_from_local_data(pairs_dir):
    # pairs_dir: 256 train pairs; --data-split 2,4,4 gives step 1 round(256 * 2/10) = 51 rows
    r = plan("sft", "--model", "opt-125m", "--data-path", "local/jsonfile", "--data-dir",
             str(pairs_dir), "--per-device-train-batch-size", "4", "--gradient-accumulation-steps",
             "2", "--num-train-epochs", "3", "--json")
    doc = json.loads(r.output)
    lines = {x["what"]: x for x in doc["schedule"]}
    assert lines["training samples"]["value"] == "51 sequences"
    assert lines["global batch"]["value"] == "8 sequences"  # 4 x 1 GPU x 2
    # ceil(51 / 4) = 13 batches per epoch; ceil(13 / 2) = 7 optimizer steps; x 3 epochs = 21
    assert lines["batches per epoch"]["value"] == "13 per GPU"
    assert lines["optimizer steps per epoch"]["value"] == "7"
    assert lines["total optimizer steps"]["value"] == "21"


def test_ppo_step_counts_from_local_data(pairs_dir):
    # step 3's part of 2,4,4: 256 - round(256 * 6/10) = 102 prompts; 2 GPUs of 8 prompts:
    # floor(floor(102 / 2) / 8) = 6 PPO steps per epoch; 2 mini-batches of 4 each
    doc = json.loads(plan("ppo", "--actor-model", "opt-125m", "--critic-model", "opt-125m",
                          "--data-path", "local/jsonfile", "--data-dir", str(pairs_dir),
                          "--deployment-type", "single_node", "--num-gpus", "2",
                          "--per-device-generation-batch-size", "8",
                          "--per-device-training-batch-size", "4", "--num-train-epochs", "2",
                          "--gpu-memory", "80", "--json").output)
    lines = {x["what"]: x["value"] for x in doc["schedule"]}
    assert lines["prompts per PPO step"] == "16"
    assert lines["PPO steps per epoch"] == "6" and lines["total PPO steps"] == "12"
    # 12 PPO steps x 1 PPO epoch x 2 mini-batches = 24 updates, accumulation 1
    assert lines["optimizer steps"] == "actor 24, critic 24"


def test_pipeline_plans_three_steps_with_presets():
    r = plan("pipeline", "--actor", "opt-13b", "--deployment-type", "single_node", "--num-gpus",
             "8", "--gpu-memory", "80", "--json")
    assert r.exit_code in (0, 1), r.output
    doc = json.loads(r.output)
    steps = doc["steps"]
    assert [s["step"] for s in steps] == ["sft", "reward", "ppo"]
    assert all(s["world_size"] == 8 for s in steps)
    # the 13B preset: ZeRO-3 for the actor (steps 1 and 3); step 3's actor is step 1's model
    assert steps[0]["models"][0]["zero_stage"] == 3 and steps[0]["models"][0]["params"] > 12e9
    assert steps[2]["models"][0]["params"] == steps[0]["models"][0]["params"]
    assert doc["verdict"] in ("fits", "tight", "does not fit")


def test_launch_prints_the_estimate_and_warns_when_it_does_not_fit(monkeypatch, tmp_path):
    from dschat_cli.launch import step as launch_step
    from dschat_cli.launch.runner import Hardware

    monkeypatch.setattr(launch_step, "detect_hardware", lambda: Hardware(gpus=1, bf16=True,
                                                                         cpu_cores=2))
    monkeypatch.setattr(runner_mod, "query_gpus", lambda: [(24576, 8.9)])  # one 24 GiB GPU
    base = ["sft", "--model", "opt-1.3b", "--output-dir", str(tmp_path / "o"), "--dry-run"]
    r = runner.invoke(app, base + ["--per-device-train-batch-size", "1", "--lora-dim", "8",
                                   "--only-optimize-lora"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "memory estimate per GPU" in r.output and "fits" in r.output
    r = runner.invoke(app, base + ["--per-device-train-batch-size", "32"], terminal_width=200)
    assert r.exit_code == 0  # a warning, not a refusal: the estimate can be wrong
    assert "does not fit this GPU" in r.output and "to fit, try" in r.output


def test_pipeline_dry_run_estimates_step3_before_steps_1_and_2_exist(monkeypatch, tmp_path):
    """`dschat pipeline --actor opt-13b --dry-run` on a 4-GPU node shows step 3's memory from the
    presets (its models are written by steps 1 and 2 later), the same peak as `dschat plan`."""
    from dschat_cli.launch import step as launch_step
    from dschat_cli.launch.runner import Hardware

    monkeypatch.setattr(launch_step, "detect_hardware", lambda: Hardware(gpus=4, bf16=True,
                                                                         cpu_cores=2))
    monkeypatch.setattr(runner_mod, "query_gpus", lambda: [(143771, 9.0)] * 4)
    common = ["--actor", "opt-13b", "--deployment-type", "single_node"]
    r = runner.invoke(app, ["pipeline", *common, "--output-dir", str(tmp_path / "o"),
                            "--dry-run"], terminal_width=200)
    assert r.exit_code == 0, r.output
    step3 = r.output.split("step 3: dschat ppo")[1]
    assert "not available" not in step3, step3[-2000:]
    peaks = [line for line in step3.splitlines() if line.strip().startswith("peak ")]
    assert len(peaks) == 1 and "each): fits" in step3, step3[-2000:]
    assert "actor" in step3 and "12.85B" in step3  # the 13B actor's memory line
    doc = json.loads(plan("pipeline", *common, "--json").output)
    ppo_peak = doc["steps"][2]["peak_gib"]
    assert f"peak {ppo_peak:.1f} GiB per GPU" in peaks[0]
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_ppo_plan_counts_the_tensor_parallel_copy_and_refuses_what_the_launcher_would():
    common = ("ppo", "--actor-model", "opt-13b", "--actor-random-init", "--critic-model",
              "opt-350m", "--critic-random-init", "--actor-zero-stage", "3",
              "--deployment-type", "single_node", "--num-gpus", "4", "--gpu-memory", "140",
              "--json")
    plain = json.loads(plan(*common).output)
    tp = json.loads(plan(*common, "--generation-tensor-parallel", "4").output)
    # no whole-actor gather at generation; a quarter-size copy of the layers stays allocated
    assert tp["phases_gib"]["generation"] < plain["phases_gib"]["generation"]
    copy = tp["phases_gib"]["critic step"] - plain["phases_gib"]["critic step"]
    # OPT-13B: 0.27B whole + 12.58B / 4 split, bf16 = 6.4 GiB, and the replica's q/k/v fused
    # into one matrix per layer (40 x 3 x 5120^2 / 4, bf16 = 1.47 GiB); the ZeRO-3 actor fuses none
    assert 7.4 < copy < 8.4, copy
    assert any("--generation-tensor-parallel 4" in n for n in tp["notes"])
    r = plan(*common, "--generation-tensor-parallel", "3")
    assert r.exit_code == 2 and "--generation-tensor-parallel" in r.output


def test_critic_free_plan_has_no_critic_and_sizes_the_rollout_for_every_answer(pairs_dir):
    """`dschat plan ppo --advantage-estimator grpo --samples-per-prompt 8`: no critic anywhere
    (models, phases, step counts), generation and scoring for 8 x the sequences of gae's rollout."""
    common = ("ppo", "--actor-model", "opt-1.3b", "--critic-model", "opt-350m",
              "--per-device-generation-batch-size", "4", "--per-device-training-batch-size", "4",
              "--data-path", "local/jsonfile", "--data-dir", str(pairs_dir),
              "--gpu-memory", "140", "--json")
    gae = json.loads(plan(*common).output)
    grpo1 = json.loads(plan(*common, "--advantage-estimator", "reinforce++").output)
    r = plan(*common, "--advantage-estimator", "grpo", "--samples-per-prompt", "8")
    assert r.exit_code == 0, r.output
    grpo = json.loads(r.output)
    assert [m["role"] for m in grpo["models"]] == ["actor", "ref", "reward"]
    assert not any("critic" in phase for phase in grpo["phases_gib"])
    # the reward model is --critic-model's OPT-350M with its value head
    assert grpo["models"][2]["params"] == 331_196_416 + 512
    # 4 prompts x 8 answers = 32 sequences per GPU: 8 x gae's KV cache (the fast engine's)
    actor, actor_gae = grpo["models"][0], gae["models"][0]
    assert actor["kv_cache_gib"] == pytest.approx(8 * actor_gae["kv_cache_gib"], rel=1e-3)
    # scoring: the bf16 logits of the 257 answer positions (logits_to_keep) of 32 sequences,
    # 2 x 32 x 257 x 50,272 = 0.77 GiB (0.10 GiB for 4), the layer's working set over 32 x 512
    # tokens 0.88 GiB (0.11 GiB for 4), and the cache grows from 0.4 to 3.0 GiB
    assert grpo["phases_gib"]["scoring"] > grpo1["phases_gib"]["scoring"] + 3.9
    assert grpo["phases_gib"]["generation"] > grpo1["phases_gib"]["generation"]
    # without a critic (same 4 sequences per rollout) every phase needs less than gae's
    for phase, gib in grpo1["phases_gib"].items():
        assert gib < gae["phases_gib"][phase], phase
    lines = {x["what"]: x["value"] for x in grpo["schedule"]}
    # 102 prompts (step 3's part of pairs_dir), 4 per step: 25 PPO steps; 32 answers per rollout
    # in mini-batches of 4: 8 updates per step, 200 optimizer steps
    assert lines["prompts per PPO step"] == "4" and lines["answers per PPO step"] == "32"
    assert lines["experience per update"] == "32 answers"
    assert lines["total PPO steps"] == "25"
    assert lines["optimizer steps"] == "actor 200, no critic (grpo)"
    assert "global batch (actor)" in lines
    assert "answers per PPO step" not in {x["what"] for x in gae["schedule"]}
    assert {x["what"]: x["value"] for x in gae["schedule"]}["optimizer steps"] == \
        "actor 25, critic 25"
    text = plan(*common[:-1], "--advantage-estimator", "grpo", "--samples-per-prompt", "8").output
    text = " ".join(text.split())  # the notes wrap
    assert "no critic: the advantage estimator needs none" in text
    assert "a rollout holds 4 prompts x 8 answers = 32 sequences per GPU" in text


def test_critic_free_suggestions_never_touch_the_critic():
    args = ("ppo", "--actor-model", "opt-1.3b", "--critic-model", "opt-350m",
            "--advantage-estimator", "grpo", "--samples-per-prompt", "8",
            "--per-device-generation-batch-size", "16", "--per-device-training-batch-size", "16",
            "--gpu-memory", "40", "--json")
    r = plan(*args)
    assert r.exit_code == 1, r.output
    doc = json.loads(r.output)
    assert doc["suggestions"], doc
    for s in doc["suggestions"]:
        assert not any("critic" in f for f in s["flags"]), s
        # each suggestion, added to the command, is accepted and gives that estimate
        again = plan(*args, *" ".join(s["flags"]).split())
        assert again.exit_code in (0, 1), again.output
        assert json.loads(again.output)["peak_gib"] == pytest.approx(s["peak_gib"])


def test_critic_free_plan_bad_input_names_the_flag():
    r = plan("ppo", "--actor-model", "opt-125m", "--critic-model", "opt-125m",
             "--advantage-estimator", "grpo")
    assert r.exit_code == 2 and "--samples-per-prompt" in r.output and "Traceback" not in r.output
    r = plan("ppo", "--actor-model", "opt-125m", "--critic-model", "opt-125m",
             "--advantage-estimator", "rloo", "--samples-per-prompt", "4",
             "--critic-zero-stage", "2", "--critic-gradient-checkpointing")
    assert r.exit_code == 2 and "--critic-gradient-checkpointing" in r.output


def test_dpo_plan_of_a_preset_by_hand():
    """`dschat plan dpo` for OPT-1.3B (1,315,758,080 parameters, hidden 2048, ffn 8192, 24
    layers, vocab 50,272), ZeRO-0 bf16, 8 pairs of up to 512 tokens, DPO's dropout 0."""
    from dschat_cli.plan.memory import GiB

    N = 1_315_758_080
    r = plan("dpo", "--model", "opt-1.3b", "--zero-stage", "0", "--per-device-train-batch-size",
             "8", "--max-seq-len", "512", "--gpu-memory", "139.8", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["step"] == "dpo" and doc["verdict"] == "fits"
    policy, ref = doc["models"]
    assert (policy["role"], ref["role"]) == ("policy", "ref")
    assert policy["params"] == ref["params"] == N and ref["trainable"] == 0
    # 8 pairs = 16 sequences x 512 = 8192 tokens. Activations per token and layer 8e*h + e*ffn =
    # 49,152 B: 24 layers + one layer's gradients = 25 x 8192 x 49,152 = 10,066,329,600, + the
    # final norm and head inputs 8192 x 2 x 2 x 2048 = 67,108,864 -> 10,133,438,464.
    # Logits (rlhf/logprobs.py, fp32 chunks of 16,777,216 // 50,272 = 333 positions): the bf16
    # logits and their bf16 gradient, 2 x 2 x 8192 x 50,272 = 1,647,362,048, + one backward chunk
    # 4 x 333 x 50,272 = 66,962,304. Resident: policy 14N + copy 2N = 16N.
    train = 16 * N + 10_133_438_464 + 1_647_362_048 + 66_962_304  # 32,899,892,096 B = 30.64 GiB
    assert doc["phases_gib"]["policy forward + backward"] == pytest.approx(train / GiB, abs=1e-3)
    # (before chunked logprobs the fp32 copy and its backward counted 16 x 8192 x 50,272 =
    # 6,589,448,192: 35.18 GiB, measured 34.88 GiB on one H200; docs/benchmarks.md)
    # the step (16N resident + 2N grads + 8N fp32 copies = 31.86 GiB) is now the peak
    assert doc["phases_gib"]["optimizer step"] == pytest.approx(26 * N / GiB, abs=1e-3)
    assert doc["peak_gib"] == pytest.approx(26 * N / GiB, abs=1e-3)
    # the reference's no-grad forward: bf16 logits 2 x 8192 x 50,272 = 823,681,024, one forward
    # chunk 8 x 333 x 50,272 = 133,924,608, and a layer's working set 8192 x 57,344
    ref_fwd = 16 * N + 823_681_024 + 133_924_608 + 469_762_048
    assert doc["phases_gib"]["reference forward"] == pytest.approx(ref_fwd / GiB, abs=1e-3)
    lines = {x["what"]: x["value"] for x in doc["schedule"]}
    assert lines["micro-batch per GPU"] == "8 pairs"
    # --precompute-ref-logprobs: no copy while training (2N = 2.45 GiB less), a precompute phase
    pre = json.loads(plan("dpo", "--model", "opt-1.3b", "--zero-stage", "0",
                          "--per-device-train-batch-size", "8", "--max-seq-len", "512",
                          "--precompute-ref-logprobs", "--json").output)
    assert pre["phases_gib"]["policy forward + backward"] == pytest.approx(
        (train - 2 * N) / GiB, abs=1e-3)
    assert "reference precompute" in pre["phases_gib"]
    assert "reference forward" not in pre["phases_gib"]
    # LoRA with --only-optimize-lora: the reference is the policy with adapters off, no copy
    lora = json.loads(plan("dpo", "--model", "opt-1.3b", "--lora-dim", "8", "--only-optimize-lora",
                           "--json").output)
    assert [m["role"] for m in lora["models"]] == ["policy"]


def test_dpo_plan_suggests_dropping_the_reference_copy():
    args = ["dpo", "--model", "opt-1.3b", "--zero-stage", "0", "--per-device-train-batch-size",
            "8", "--max-seq-len", "512", "--gpu-memory", "39", "--json"]
    r = plan(*args)
    assert r.exit_code == 0, r.output  # 35.2 GiB + 3.1 GiB overhead: fits, not with the margin
    doc = json.loads(r.output)
    assert doc["verdict"] == "tight"
    flags = [" ".join(s["flags"]) for s in doc["suggestions"]]
    assert "--precompute-ref-logprobs" in flags, flags
    for s in doc["suggestions"]:  # each, added to the command, gives that estimate
        again = json.loads(plan(*args, *" ".join(s["flags"]).split()).output)
        assert again["peak_gib"] == pytest.approx(s["peak_gib"])


def test_dpo_help_and_dry_runs_behave_like_sft(monkeypatch, tmp_path):
    r = plan("dpo", "--help")
    assert r.exit_code == 0 and "--precompute-ref-logprobs" in r.output
    assert "--gpu-memory" in r.output
    # no GPU here: a dry run points at `dschat plan dpo`
    base = ["dpo", "--model", "opt-1.3b", "--output-dir", str(tmp_path / "o"), "--dry-run"]
    r = runner.invoke(app, base, terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "`dschat plan dpo` with the same flags" in " ".join(r.output.split())
    # on a GPU machine it prints the estimate, as sft's
    from dschat_cli.launch import step as launch_step
    from dschat_cli.launch.runner import Hardware

    monkeypatch.setattr(launch_step, "detect_hardware", lambda: Hardware(gpus=1, bf16=True,
                                                                         cpu_cores=2))
    monkeypatch.setattr(runner_mod, "query_gpus", lambda: [(143771, 9.0)])
    r = runner.invoke(app, base, terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "memory estimate per GPU" in r.output and "policy" in r.output and "ref" in r.output
    assert "fits" in r.output
    assert not (tmp_path / "o").exists()
