"""`dschat bench` on CPU with tiny local architectures (random weights): the real PPO trainer and
SFT step run, every phase is timed, and the report's arithmetic holds."""

from __future__ import annotations

import json
import re

import pytest


def test_bench_ppo_both_engines(tmp_path, tiny_opt, invoke_dschat):
    out_json = tmp_path / "bench.json"
    r = invoke_dschat("bench", "--actor", tiny_opt, "--critic", tiny_opt, "--batch-size", "4",
                      "--max-prompt-seq-len", "6", "--max-answer-seq-len", "5", "--steps", "2", "--warmup", "1",
                      "--actor-zero-stage", "0", "--critic-zero-stage", "0",
                      "--launcher", "none", "--output-dir", tmp_path / "run", "--json", out_json)
    assert r.code == 0, r.explain()
    assert "step 3 summary" in r.output and "Traceback" not in r.output
    res = json.loads(out_json.read_text())
    assert json.loads((tmp_path / "run" / "bench.json").read_text()) == res
    assert set(res["engines"]) == {"fast", "hf"}
    for name, e in res["engines"].items():
        phases = e["phases"]
        assert {"generation", "ref_forward", "critic_forward", "reward_forward", "actor_train",
                "critic_train"} <= set(phases), (name, phases)
        # --old-logprobs auto (the default): the warm-up rollout's check agreed (fp32), so the
        # measured steps take the fast engine's logprobs and skip the actor's scoring forward;
        # transformers' generate has none: the forward pass
        assert ("actor_forward" in phases) == (name == "hf"), (name, phases)
        assert len(e["step_seconds_all"]) == 2
        # phases + the untimed rest make up the step
        total = sum(p["seconds"] for p in phases.values()) + e["other_seconds"]
        assert total == pytest.approx(e["step_seconds"], rel=1e-6)
        assert 0 <= e["other_seconds"] < 0.5 * e["step_seconds"]
        # 4 prompts x (6 + 5) tokens per step
        assert e["tokens_per_s"] == pytest.approx(44 / e["step_seconds"])
        assert e["decode_x_floor"] > 1 and e["step_x_floor"] > 1
    # the fast engine's timing splits prefill and decode steps; hf's is per generated token
    assert res["engines"]["fast"]["decode_kind"] == "decode step"
    assert res["engines"]["hf"]["decode_kind"].startswith("generated token")
    # the fast engine's logprobs were checked against the actor's forward (fp32: equal)
    assert res["engines"]["fast"]["logprob_gap"] < 1e-4
    assert res["engines"]["hf"]["logprob_gap"] is None
    assert res["engines"]["fast"]["old_logprobs"] == "fast engine's sampling pass (from rollout 2)"
    assert res["engines"]["hf"]["old_logprobs"].startswith("actor forward pass")
    assert res["engines"]["fast"]["decode_step"] == "uncompiled (--compile-decode auto: on CPU)"
    assert res["engines"]["hf"]["decode_step"] is None


def test_bench_critic_free_has_no_critic_phases(tmp_path, tiny_opt, invoke_dschat):
    """`dschat bench --advantage-estimator grpo`: no critic built, run or timed; --batch-size 4
    with 2 answers per prompt is 2 prompts, 4 sequences, the tokens of gae's batch of 4."""
    out_json = tmp_path / "bench.json"
    r = invoke_dschat("bench", "--actor", tiny_opt, "--critic", tiny_opt,
                      "--advantage-estimator", "grpo", "--samples-per-prompt", "2",
                      "--batch-size", "4", "--max-prompt-seq-len", "6", "--max-answer-seq-len", "5",
                      "--steps", "2", "--warmup", "1", "--generation-engine", "fast",
                      "--actor-zero-stage", "0", "--critic-zero-stage", "0",
                      "--launcher", "none", "--output-dir", tmp_path / "run", "--json", out_json)
    assert r.code == 0, r.explain()
    assert "step 3 summary" in r.output and "tokens/s" in r.output
    assert "critic forward" not in r.output and "critic train" not in r.output
    assert "no critic (grpo)" in " ".join(r.output.split())
    res = json.loads(out_json.read_text())
    assert (res["advantage_estimator"], res["samples_per_prompt"], res["prompts_per_gpu"],
            res["batch_size"]) == ("grpo", 2, 2, 4)
    assert res["critic"] is None and res["critic_params"] is None and res["reward_params"] > 0
    e = res["engines"]["fast"]
    phases = e["phases"]
    assert {"generation", "ref_forward", "reward_forward", "actor_train"} <= set(phases), phases
    assert "actor_forward" not in phases  # --old-logprobs auto switched in the warm-up
    assert not any("critic" in p for p in phases), phases
    # 2 prompts x 2 answers = 4 sequences of 6 + 5 tokens per step
    assert e["tokens_per_s"] == pytest.approx(44 / e["step_seconds"])
    assert e["samples_per_s"] == pytest.approx(4 / e["step_seconds"])
    # the step's floor is the sum of its measured phases' floors: no critic in it
    assert e["floor_seconds"] == pytest.approx(sum(p["floor_seconds"] for p in phases.values()))


def test_bench_sft_and_generation_logprobs(tmp_path, tiny_llama, invoke_dschat):
    r = invoke_dschat("bench", "--step", "sft", "--actor", tiny_llama, "--batch-size", "2",
                      "--max-prompt-seq-len", "8", "--max-answer-seq-len", "8", "--steps", "2", "--warmup", "0",
                      "--launcher", "none", "--output-dir", tmp_path / "sft")
    assert r.code == 0, r.explain()
    res = json.loads((tmp_path / "sft" / "bench.json").read_text())
    assert res["seq_len"] == 16 and res["tokens_per_s"] == pytest.approx(32 / res["step_seconds"])
    assert res["tflops_per_gpu"] > 0
    # forward, backward and optimizer step timed between synchronisations: they add up to the step
    assert set(res["phases"]) == {"forward", "backward", "optimizer_step"}
    assert all(v > 0 for v in res["phases"].values())
    assert sum(res["phases"].values()) == pytest.approx(res["step_seconds"], rel=1e-6)
    assert "optimizer step s" in r.output
    # --old-logprobs generation: the actor's scoring forward only on checked rollouts (the first)
    r = invoke_dschat("bench", "--actor", tiny_llama, "--critic", tiny_llama, "--batch-size", "2",
                      "--max-prompt-seq-len", "4", "--max-answer-seq-len", "3", "--steps", "1", "--warmup", "1",
                      "--generation-engine", "fast", "--old-logprobs", "generation",
                      "--launcher", "none", "--output-dir", tmp_path / "ppo")
    assert r.code == 0, r.explain()
    res = json.loads((tmp_path / "ppo" / "bench.json").read_text())
    assert "actor_forward" not in res["engines"]["fast"]["phases"]


def test_bench_dpo_phases_tokens_and_precomputed_reference(tmp_path, tiny_opt, invoke_dschat):
    """`dschat bench --step dpo`: the reference's forward, the policy's forward and backward and
    the optimizer step are timed; 2 pairs of 2 x (6 + 5) tokens are 44 tokens per step. With
    --precompute-ref-logprobs the step has no reference forward."""
    import math

    from dschat_cli.steps.bench import DPO_PHASES

    common = ("bench", "--step", "dpo", "--actor", tiny_opt, "--batch-size", "2",
              "--max-prompt-seq-len", "6", "--max-answer-seq-len", "5", "--steps", "2",
              "--warmup", "1", "--actor-zero-stage", "0", "--launcher", "none")
    out_json = tmp_path / "dpo.json"
    r = invoke_dschat(*common, "--output-dir", tmp_path / "copy", "--json", out_json)
    assert r.code == 0, r.explain()
    text = " ".join(r.output.split())
    assert "DPO summary" in text and "Traceback" not in text
    assert "2 pairs per GPU = 4 sequences of 6 + 5 tokens" in text and "2 x 11 tokens" in text
    res = json.loads(out_json.read_text())
    assert json.loads((tmp_path / "copy" / "bench.json").read_text()) == res
    assert (res["step"], res["reference"], res["batch_size"], res["sequences_per_gpu"],
            res["tokens_per_pair"]) == ("dpo", "copy", 2, 4, 22)
    assert set(res["phases"]) == set(DPO_PHASES)
    assert len(res["step_seconds_all"]) == 2
    # phases + the untimed rest make up the step
    total = sum(p["seconds"] for p in res["phases"].values()) + res["other_seconds"]
    assert total == pytest.approx(res["step_seconds"], rel=1e-6)
    assert 0 <= res["other_seconds"] < 0.5 * res["step_seconds"]
    assert res["tokens_per_s"] == pytest.approx(44 / res["step_seconds"])
    assert res["pairs_per_s"] == pytest.approx(2 / res["step_seconds"])
    assert res["floor_seconds"] == pytest.approx(
        sum(p["floor_seconds"] for p in res["phases"].values()))
    assert res["tflops_per_gpu"] > 0 and res["step_x_floor"] > 1
    # the reference is a copy of the policy's start: the first step's loss is -log sigmoid(0)
    assert res["loss_first"] == pytest.approx(math.log(2), abs=1e-5)

    r = invoke_dschat(*common, "--precompute-ref-logprobs", "--output-dir", tmp_path / "pre")
    assert r.code == 0, r.explain()
    pre = json.loads((tmp_path / "pre" / "bench.json").read_text())
    assert pre["reference"] == "precomputed"
    assert set(pre["phases"]) == set(DPO_PHASES) - {"ref_forward"}
    assert pre["loss_first"] == pytest.approx(math.log(2), abs=1e-5)
    assert "reference precomputed (no reference forward)" in " ".join(r.output.split())


def test_bench_bad_input(tmp_path, invoke_dschat):
    r = invoke_dschat("bench", "--actor", tmp_path / "nope", "--launcher", "none")
    assert r.code == 2 and "--actor" in r.output and "Traceback" not in r.output
    r = invoke_dschat("bench", "--generation-engine", "hf", "--old-logprobs", "generation")
    assert r.code == 2 and "--old-logprobs generation" in r.output
    r = invoke_dschat("bench", "--generation-engine", "hf", "--compile-decode", "on")
    assert r.code == 2 and "--compile-decode on" in r.output and "Traceback" not in r.output
    r = invoke_dschat("bench", "--step", "sft", "--compile-decode", "on")
    assert r.code == 2 and "--compile-decode" in r.output and "--step ppo only" in r.output
    # --batch-size counts answers: grpo's default 8 answers per prompt do not divide 12
    r = invoke_dschat("bench", "--advantage-estimator", "grpo", "--batch-size", "12")
    assert r.code == 2 and "--batch-size" in r.output and "Traceback" not in r.output
    r = invoke_dschat("bench", "--advantage-estimator", "rloo", "--samples-per-prompt", "1")
    assert r.code == 2 and "--samples-per-prompt" in r.output
    r = invoke_dschat("bench", "--advantage-estimator", "ppo")
    assert r.code == 2 and "--advantage-estimator" in r.output
    # DPO's options belong to --step dpo, step 3's to --step ppo
    r = invoke_dschat("bench", "--precompute-ref-logprobs")
    assert r.code == 2 and "--precompute-ref-logprobs" in r.output and "--step dpo" in r.output
    r = invoke_dschat("bench", "--step", "dpo", "--advantage-estimator", "grpo")
    assert r.code == 2 and "--advantage-estimator" in r.output
    # --json is written at the end of the run: a path that cannot be written is refused first,
    # before any output folder or worker
    out = tmp_path / "out"
    (tmp_path / "afile").write_text("x")
    for path, says in ((tmp_path / "afile" / "b.json", "is a file, so"),
                       (tmp_path, "is a folder")):
        r = invoke_dschat("bench", "--json", path, "--output-dir", out, "--launcher", "none")
        assert r.code == 2 and "--json" in r.output and says in r.output, r.explain()
        assert "Traceback" not in r.output and not out.exists()
    # --gpu-memory plans the batch; a given --batch-size leaves nothing to plan
    r = invoke_dschat("bench", "--gpu-memory", "80", "--batch-size", "64")
    assert r.code == 2 and "--gpu-memory" in r.output and "drop one" in r.output


def test_bench_tensor_parallel_bad_input(tmp_path, tiny_opt, tiny_gpt2, invoke_dschat):
    common = ("--batch-size", "2", "--max-prompt-seq-len", "4", "--max-answer-seq-len", "3",
              "--output-dir", tmp_path / "run")
    r = invoke_dschat("bench", "--generation-engine", "hf", "--generation-tensor-parallel", "2")
    assert r.code == 2 and "--generation-tensor-parallel" in r.output
    # 3 does not divide the 2 ranks; a GPT-2 actor does not split: refused before any worker
    r = invoke_dschat("bench", "--actor", tiny_opt, "--critic", tiny_opt, *common,
                      "--generation-tensor-parallel", "3", "--deployment-type", "single_node",
                      "--num-gpus", "2")
    assert r.code == 2 and "--generation-tensor-parallel" in r.output \
        and "2 rank(s)" in r.output and "launching" not in r.output, r.explain()
    r = invoke_dschat("bench", "--actor", tiny_gpt2, "--critic", tiny_gpt2, *common,
                      "--generation-tensor-parallel", "2", "--deployment-type", "single_node",
                      "--num-gpus", "2")
    assert r.code == 2 and "gpt2" in r.output and "launching" not in r.output, r.explain()
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_bench_measures_the_largest_batch_that_fits_and_falls_back_on_out_of_memory(
        tmp_path, tiny_opt, invoke_dschat, monkeypatch):
    """No --batch-size: batch 64, then the largest the memory plan allows on --gpu-memory (here
    128, with 96 next), trained in mini-batches of 32 (one optimizer step per batch), each a
    launch of its own; 128 runs out of memory (simulated: CPU has no GPU memory to run out of),
    so 96 is measured; bench.json keeps all of it."""
    import torch

    from dschat_cli.config.bench import BenchConfig
    from dschat_cli.plan.choose import _peak_fn
    from dschat_cli.plan.memory import GiB, overhead_bytes
    from dschat_cli.plan.planner import detect_target
    from dschat_cli.steps import bench

    shape = dict(actor=str(tiny_opt), critic=str(tiny_opt), max_prompt_seq_len=6,
                 max_answer_seq_len=5, actor_zero_stage=0, critic_zero_stage=0, batch_size=32,
                 micro_batch_size=32)
    peak = _peak_fn(BenchConfig(**shape), 1, detect_target(100.0))
    need = {b: peak(b) + overhead_bytes(peak(b), 1) for b in (128, 160)}  # without the margin
    gpu_gib = (need[128] + need[160]) / 2 / GiB  # 128 fits (tight at most), 160 does not

    real = bench.bench_ppo

    def oom_at_128(cfg, dist, resolved):
        if cfg.batch == 128:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(cfg, dist, resolved)

    monkeypatch.setattr(bench, "bench_ppo", oom_at_128)
    out, out_json = tmp_path / "run", tmp_path / "new" / "bench.json"  # its folder is created
    r = invoke_dschat("bench", "--actor", tiny_opt, "--critic", tiny_opt,
                      "--max-prompt-seq-len", "6", "--max-answer-seq-len", "5", "--steps", "1",
                      "--warmup", "1", "--gpu-memory", f"{gpu_gib:.6f}", "--launcher", "none",
                      "--output-dir", out, "--json", out_json)
    assert r.code == 0, r.explain()
    text = " ".join(r.output.split())
    assert "chosen: --actor-zero-stage and --critic-zero-stage 0: one CPU rank" in text
    assert "--batch-size 64 (the reference's largest), then 128 (trained in mini-batches of 32, " \
        "one optimizer step per batch): the largest batch that fits" in text
    assert "on out of memory the bench tries 96" in text
    assert "batch 128: out of GPU memory" in text and "ppo (gae): tokens/s by batch" in text
    res = json.loads(out_json.read_text())
    assert json.loads((out / "bench.json").read_text()) == res
    assert res["batch_size"] == 64 and res["status"] == "ok" and set(res["engines"]) == \
        {"fast", "hf"}
    assert res["larger_batches_tried"] == [
        {"batch_size": 128, "status": "out_of_memory", "actor_zero_stage": 0,
         "micro_batch_size": 32},
        {"batch_size": 96, "status": "ok", "actor_zero_stage": 0, "micro_batch_size": 32}]
    assert res["micro_batch_size"] == 64  # the first batch: one mini-batch
    assert json.loads((out / "batch-128" / "bench.json").read_text())["status"] == \
        "out_of_memory"
    big = res["largest_batch"]
    assert big["batch_size"] == 96 and set(big["engines"]) == {"fast"}  # no hf at the big batch
    # three mini-batches of 32, one optimizer step: what the actor's DeepSpeed engine was given
    assert big["micro_batch_size"] == 32
    ds = json.loads((out / "batch-96" / "ds_config_actor.json").read_text())
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 3)
    assert "trained in 3 mini-batches of 32 (one optimizer step)" in text
    e = big["engines"]["fast"]
    assert e["tokens_per_s"] == pytest.approx(96 * 11 / e["step_seconds"])
    assert res["choices"][0].startswith("--actor-zero-stage and --critic-zero-stage 0")


def test_bench_whose_first_batch_runs_out_of_memory_says_so_and_tries_nothing_larger(
        tmp_path, tiny_opt, invoke_dschat, monkeypatch):
    """Batch 64 itself out of GPU memory (simulated): a one-line error naming --batch-size, exit
    1, the record kept with its status, no larger batch launched."""
    import torch

    from dschat_cli.steps import bench

    def oom(cfg, dist, resolved):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(bench, "bench_ppo", oom)
    out = tmp_path / "run"
    r = invoke_dschat("bench", "--actor", tiny_opt, "--critic", tiny_opt,
                      "--max-prompt-seq-len", "6", "--max-answer-seq-len", "5", "--steps", "1",
                      "--warmup", "0", "--gpu-memory", "80", "--launcher", "none",
                      "--output-dir", out)
    assert r.code == 1, r.explain()
    assert "Traceback" not in r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: --batch-size: batch 64 ran out of GPU memory"), last
    res = json.loads((out / "bench.json").read_text())
    assert res["status"] == "out_of_memory" and res["batch_size"] == 64
    assert res["larger_batches_tried"] == [] and res["largest_batch"] is None
    assert not any(p.name.startswith("batch-") for p in out.iterdir())


def test_bench_dry_run_on_a_bf16_h200_chooses_zero_1_and_a_larger_batch_in_mini_batches(
        tmp_path, invoke_dschat):
    """The defaults on one 139.8 GiB GPU in bf16, planned from here: ZeRO-1 (fp32 gradients) at
    batch 64; then the largest generation batch that fits, trained at ZeRO-1 in mini-batches of
    32 (one optimizer step per batch), its KV cache what bounds it."""
    r = invoke_dschat("bench", "--gpu-memory", "139.8", "--dtype", "bf16", "--dry-run",
                      "--output-dir", tmp_path / "b")
    assert r.code == 0, r.explain()
    text = " ".join(r.output.split())
    assert "chosen: --actor-zero-stage and --critic-zero-stage 1: one CPU rank in bf16" in text
    assert "(trained in mini-batches of 32, one optimizer step per batch): the largest batch " \
        "that fits one GPU (--gpu-memory 139.8)" in text
    then = re.search(r"then: batch (\d+) at ZeRO-1, mini-batches of 32 \(gradient "
                     r"accumulation\) in \S+/batch-(\d+) \(fast engine only\)", text)
    assert then and then[1] == then[2] and int(then[1]) % 32 == 0 and int(then[1]) > 128, text
    assert '"grad_accum_dtype": "fp32"' in text  # the actor's and critic's DeepSpeed configs


def test_bench_tries_a_larger_batch_at_zero_1_first_then_again_at_zero_0(
        tmp_path, tiny_opt, invoke_dschat, monkeypatch):
    """bf16 on one rank (CPU here), `--step sft` (one mini-batch per step, so a larger batch
    needs more memory for its training), no --batch-size: on a --gpu-memory where batch 128 fits by
    the plan only at ZeRO-0, though its ZeRO-1 estimate is below the memory before the
    fragmentation allowance, 128 runs at ZeRO-1 first; out of memory there (simulated), the same
    batch runs again at ZeRO-0, in a folder of its own, and that is the record kept."""
    import torch

    from dschat_cli.config.bench import BenchConfig
    from dschat_cli.plan.choose import _peak_fn
    from dschat_cli.plan.memory import CONTEXT_BYTES, GiB, overhead_bytes
    from dschat_cli.plan.planner import detect_target
    from dschat_cli.steps import bench

    shape = dict(step="sft", actor=str(tiny_opt), max_prompt_seq_len=6, max_answer_seq_len=5,
                 batch_size=64, dtype="bf16")
    z1 = _peak_fn(BenchConfig(**shape, actor_zero_stage=1, critic_zero_stage=1), 1,
                  detect_target(100.0))
    z0 = _peak_fn(BenchConfig(**shape, actor_zero_stage=0, critic_zero_stage=0), 1,
                  detect_target(100.0))
    low = max(z1(128) + CONTEXT_BYTES, z0(128) + overhead_bytes(z0(128), 1))
    high = min(z1(128) + overhead_bytes(z1(128), 1), z0(160) + overhead_bytes(z0(160), 1))
    assert low < high, (low, high)  # a GPU size where the case arises
    gpu_gib = (low + high) / 2 / GiB

    real = bench.bench_sft

    def oom_at_128_zero_1(cfg, dist, resolved):
        if cfg.batch == 128 and cfg.actor_zero_stage == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(cfg, dist, resolved)

    monkeypatch.setattr(bench, "bench_sft", oom_at_128_zero_1)
    out = tmp_path / "run"
    r = invoke_dschat("bench", "--step", "sft", "--actor", tiny_opt, "--dtype", "bf16",
                      "--max-prompt-seq-len", "6", "--max-answer-seq-len", "5", "--steps", "1",
                      "--warmup", "1", "--gpu-memory", f"{gpu_gib:.9f}", "--launcher", "none",
                      "--output-dir", out)
    assert r.code == 0, r.explain()
    text = " ".join(r.output.split())
    assert "it runs at ZeRO-1 first" in text and "tries 128 at ZeRO-0" in text, text
    res = json.loads((out / "bench.json").read_text())
    assert res["zero_stage"] == 1 and res["zero"] == "ZeRO-1, fp32 gradients"
    assert res["larger_batches_tried"] == [
        {"batch_size": 128, "status": "out_of_memory", "actor_zero_stage": 1,
         "micro_batch_size": None},
        {"batch_size": 128, "status": "ok", "actor_zero_stage": 0, "micro_batch_size": None}]
    assert json.loads((out / "batch-128" / "bench.json").read_text())["status"] == \
        "out_of_memory"
    big = json.loads((out / "batch-128-zero0" / "bench.json").read_text())
    assert big == res["largest_batch"] and big["zero"] == "ZeRO-0"
    assert "batch 128: again at ZeRO-0" in text
