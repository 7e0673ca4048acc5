"""save_hf_model: a folder saved from a live DeepSpeed engine reloads to the same function.

    save_hf_model(engine.module, tokenizer, out, zero_stage=stage, is_main=True)
    AutoModelForCausalLM.from_pretrained(out)   # logits == the live (unmerged LoRA) model's

In process, one rank (Dist.init() sets up a gloo group of one): the tiny model gets LoRA adapters,
trains three steps under ZeRO-0 or ZeRO-3 (partitioned parameters, gathered when saving), and the
saved folder, with the adapters merged into the weights, must give the live model's logits
(max abs difference < 1e-4). OPT ties its output head to the input embedding (one parameter in
training, so the gathered state holds only the embedding); Llama's head is its own weight.
"""

from __future__ import annotations

import pytest

TEXTS = [" Human: How do I bake bread? Assistant: Sure! Knead the dough well.",
         " Human: hello? Assistant: fine thanks."]


def _ds_config(zero_stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            # persistence threshold 0: even the tiny model's parameters are really partitioned
            "zero_optimization": {"stage": zero_stage, "stage3_max_live_parameters": 0,
                                  "stage3_max_reuse_distance": 0,
                                  "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}


def _logits(model, batch):
    import torch

    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("zero_stage, lora_dim", [(0, 8), (3, 8), (3, 0)],
                         ids=["z0-lora", "z3-lora", "z3-full"])
def test_saved_model_reloads_to_live_logits(family, zero_stage, lora_dim, tiny_model_dir, tmp_path,
                                            one_rank):
    import deepspeed
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from dschat_cli.config.sections import LoraOptions, ModelOptions
    from dschat_cli.models.loading import (apply_lora, load_causal_lm, load_tokenizer,
                                           optimizer_groups, save_hf_model)

    base_dir = tiny_model_dir(family)
    cfg = _ds_config(zero_stage)
    opts = ModelOptions(model=str(base_dir))
    tok = load_tokenizer(opts)
    model = apply_lora(load_causal_lm(opts, tok, dtype="fp32", ds_config=cfg),
                       LoraOptions(lora_dim=lora_dim))
    assert hasattr(model, "peft_config") == bool(lora_dim)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=optimizer_groups(model, weight_decay=0.0, lora_lr=1e-2),
        config=cfg)
    batch = dict(tok(TEXTS, return_tensors="pt", padding=True))
    for _ in range(3):
        loss = engine(**batch, labels=batch["input_ids"]).loss
        engine.backward(loss)
        engine.step()
    engine.eval()
    live = _logits(engine, batch)

    out = tmp_path / "saved"
    save_hf_model(engine.module, tok, out, zero_stage=zero_stage, is_main=one_rank.is_main)
    unset_hf_deepspeed_config()  # reload as a plain model, not a ZeRO-3 partitioned one

    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "lora_" in k or "base_layer" in k or "base_model" in k], keys

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    got = _logits(reloaded, batch)
    assert got.shape == live.shape
    diff = float((got - live).abs().max())
    assert diff < 1e-4, f"reloaded logits differ from the live model's by {diff}"

    # Not vacuous: training (and for LoRA the merge) changed the function.
    before = _logits(AutoModelForCausalLM.from_pretrained(base_dir).eval(), batch)
    assert float((before - live).abs().max()) > 1e-3

    head, emb = reloaded.get_output_embeddings().weight, reloaded.get_input_embeddings().weight
    if family == "opt":  # tied: one tensor, and the config says so
        assert reloaded.config.tie_word_embeddings and head.data_ptr() == emb.data_ptr()
    else:
        assert not reloaded.config.tie_word_embeddings and head.data_ptr() != emb.data_ptr()
