"""`dschat sft` end to end on CPU: tiny models of four families, ZeRO 0-3, with and without LoRA.

    dschat sft --model TINY --data-path local/jsonfile --data-dir PAIRS --zero-stage 3 \
        --lora-dim 8 --output-dir out

Every run must train (eval loss and train loss fall), print the summary table, record itself
(run_config.yaml, ds_config.json, launch.sh, metrics.jsonl, train_summary.json) and save a folder
that AutoModelForCausalLM loads and generates with, holding the trained weights.

Launcher runs (the user's real path through deepspeed.launcher, ~30 s each on 2 cores) cover
two worker processes at ZeRO 2 (full) and ZeRO 3 (LoRA). The in-process runs (`--launcher none`,
the same worker code without the spawn) fill in the family x stage x LoRA matrix so that every
family and every stage is trained both with and without LoRA somewhere. The ZeRO-1 run trains in
bf16, so its gradients accumulate in fp32 (DeepSpeed's BF16_Optimizer, --fp32-grad-accum auto):

                 launcher                           in process
    opt                                             z0 + LoRA, z1 full (bf16), z3 + LoRA
    llama        z2 full, 2 workers                 z0 + LoRA, z3 full
    gpt2                                            z0 full, z2 + LoRA, z3 LoRA only
    gpt_neox     z3 + LoRA, 2 workers (done-when)   z2 full
"""

from __future__ import annotations

import json

import pytest

# (family, zero stage, lora dim, extra flags)
IN_PROCESS = [
    ("opt", 0, 8, ()),
    # bf16 on CPU: ZeRO-1 accumulates the gradients in fp32 (--fp32-grad-accum auto)
    ("opt", 1, 0, ("--dtype", "bf16")),
    ("opt", 3, 8, ()),
    ("llama", 0, 8, ()),
    ("llama", 3, 0, ()),
    ("gpt2", 0, 0, ()),
    ("gpt2", 2, 8, ()),
    # only the adapters train (frozen base under ZeRO-3, Conv1D layers): give them a real rate
    ("gpt2", 3, 8, ("--only-optimize-lora", "--lora-learning-rate", "1e-2")),
    ("gpt_neox", 2, 0, ()),
]


def _id(p) -> str:
    fam, stage, lora, extra = p
    suffix = {"--only-optimize-lora": "-only", "--dtype": "-bf16"}.get(extra[0], "") if extra else ""
    return f"{fam}-z{stage}-{'lora' if lora else 'full'}{suffix}"


@pytest.mark.parametrize("family, zero_stage, lora_dim, extra", IN_PROCESS,
                         ids=[_id(p) for p in IN_PROCESS])
def test_sft_in_process(family, zero_stage, lora_dim, extra, sft_run, check_sft_output,
                        tiny_model_dir, pairs_dir):
    result, out = sft_run(family, zero_stage, lora_dim, extra)
    assert result.code == 0, result.explain()
    assert "Traceback" not in result.output
    assert "sft summary" in result.output and "eval loss (start -> end)" in result.output
    check_sft_output(out, zero_stage=zero_stage, lora_dim=lora_dim,
                     base_model=tiny_model_dir(family), data_dir=pairs_dir)
    ds = json.loads((out / "ds_config.json").read_text())
    if "--dtype" in extra:  # bf16 at ZeRO-1: fp32 accumulation, said in the run's header
        assert ds["bf16"] == {"enabled": True, "immediate_grad_update": True}
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
        assert "bf16, ZeRO-1, fp32 gradients, global batch" in result.output, result.output
        # DeepSpeed's unasked memory report of its BF16_Optimizer stays out of the log
        assert "bf16_optimizer" not in result.output and "CPU Virtual Memory" not in result.output
    else:
        assert "data_types" not in ds


def test_sft_only_optimize_lora_keeps_base_frozen(sft_run, tiny_gpt2):
    """With --only-optimize-lora the saved weights differ from the base model's only in the layers
    that had adapters (merged in): embeddings, norms and biases are untouched."""
    from safetensors.torch import load_file

    result, out = sft_run("gpt2", 3, 8, ("--only-optimize-lora", "--lora-learning-rate", "1e-2"))
    assert result.code == 0, result.explain()
    base, saved = load_file(tiny_gpt2 / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(saved) <= set(base) | {"lm_head.weight"}
    changed = {k for k in saved if k in base and not (saved[k] == base[k]).all()}
    assert changed, "nothing trained"
    assert all(k.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                           "mlp.c_proj.weight")) for k in changed), sorted(changed)


def _launch(run_dschat, sft_args, model, tmp_path, pairs_dir, **kw):
    out = tmp_path / "out"
    cache = tmp_path / "data-cache"
    extra = kw.pop("extra", ())
    result = run_dschat(*sft_args(model, out, cache, pairs_dir, extra=extra, **kw), timeout=300)
    assert result.code == 0, result.explain()
    assert "Traceback" not in result.output, result.explain()
    return result, out, cache


# Credentials the launcher hands to the workers with the rest of the environment (they need
# HF_TOKEN for gated models) but that no record of the run may hold.
SECRETS = {"HF_TOKEN": "hf_secretXyz0123456789", "HUGGING_FACE_HUB_TOKEN": "hf_secretAbc98765",
           "WANDB_API_KEY": "wandb-secret-4242", "MLFLOW_TRACKING_PASSWORD": "mlflow-secret-77"}


@pytest.mark.slow
def test_sft_launcher_llama_zero2_two_workers(tmp_path, tiny_llama, pairs_dir, run_dschat,
                                              sft_args, check_sft_output, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    result, out, _ = _launch(run_dschat, sft_args, tiny_llama, tmp_path, pairs_dir, zero_stage=2,
                             extra=("--deployment-type", "single_node", "--num-gpus", "2"))
    assert "2 rank(s)" in result.output
    summary = check_sft_output(out, zero_stage=2, lora_dim=0, world_size=2, launcher=True,
                               base_model=tiny_llama, data_dir=pairs_dir)
    assert summary["steps"] == 16  # 256 rows / (8 per rank x 2 ranks)
    assert "--num_gpus 2" in (out / "launch.sh").read_text()
    # no credential in train.log, launch.sh, run_config.yaml, metrics.jsonl, ... nor on screen
    leaks = [f"{p.name}: {name}" for p in out.rglob("*") if p.is_file()
             for name, value in SECRETS.items() if value.encode() in p.read_bytes()]
    assert leaks == [] and not [n for n, v in SECRETS.items() if v in result.output], leaks


@pytest.mark.slow
def test_sft_launcher_neox_zero3_lora_two_workers(tmp_path, tiny_neox, pairs_dir, run_dschat,
                                                  sft_args, check_sft_output):
    """The step-1 done-when command through deepspeed.launcher, on two ranks: partitioned
    parameters gathered from both when saving (ZeRO-3 + LoRA), the summary table at the end, a
    plain-text log, the tokenised data cached. (Launcher runs cost ~30 s each on 2 cores: ZeRO 0
    and 2 and the other families run in process above; two-rank ZeRO-2 below.)"""
    result, out, cache = _launch(run_dschat, sft_args, tiny_neox, tmp_path, pairs_dir,
                                 zero_stage=3, lora_dim=8,
                                 extra=("--deployment-type", "single_node", "--num-gpus", "2"))
    tail = result.output[result.output.index("sft summary"):]
    for row in ("optimizer steps", "train loss (first -> last step)", "eval loss (start -> end)",
                "eval perplexity (start -> end)", "throughput", "saved"):
        assert row in tail, result.explain()
    assert str(out) in tail
    check_sft_output(out, zero_stage=3, lora_dim=8, world_size=2, launcher=True,
                     base_model=tiny_neox, data_dir=pairs_dir)
    log = (out / "train.log").read_text()
    assert "sft summary" in log and "\x1b[" not in log
    assert any(cache.iterdir()), "tokenised data was not cached in --data-cache-dir"


def test_sft_overwrite_reuses_output_dir_and_data_cache(tmp_path, tiny_llama, pairs_dir,
                                                        invoke_dschat, sft_args):
    """A second run into the same folder needs --overwrite, and then reuses the tokenised cache."""
    out, cache = tmp_path / "out", tmp_path / "data-cache"
    args = sft_args(tiny_llama, out, cache, pairs_dir, zero_stage=0,
                    extra=("--launcher", "none", "--max-steps", "2"))
    first = invoke_dschat(*args)
    assert first.code == 0, first.explain()
    entries = sorted(p.name for p in cache.iterdir())
    again = invoke_dschat(*args)
    assert again.code == 2 and "error: --output-dir: " in again.output, again.explain()
    second = invoke_dschat(*args, "--overwrite")
    assert second.code == 0, second.explain()
    assert sorted(p.name for p in cache.iterdir()) == entries  # same key: nothing rebuilt
