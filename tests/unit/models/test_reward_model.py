"""RewardModel, its saved folder, and the tokenizer check of step 3.

    model = RewardModel(AutoModel.from_pretrained(tiny))          # backbone + v_head
    save_reward_model(model, tok, out, zero_stage=0, is_main=True)
    load_reward_model(out)                                        # the same function again

In process, no DeepSpeed engine: a tiny backbone (optionally with peft LoRA adapters, merged when
saving) trains a few plain-torch AdamW steps on the pairwise loss, then the reloaded folder must
give the live module's per-token values (max abs difference < 1e-5), twice in a row, and must be a
plain backbone without LoRA leftovers. OPT ties its embeddings and may project its last hidden
state to word_embed_proj_dim; the value head reads that width.
"""

from __future__ import annotations

import json

import pytest

from dschat_cli.config.schema import ConfigError

TEXTS = [" Human: How do I bake bread? Assistant: Sure! Knead the dough well. Thank you!",
         " Human: How do I bake bread? Assistant: Go away, that is a stupid question.",
         " Human: hello? Assistant: fine thanks.",
         " Human: hello? Assistant: no."]


def _batch(tok, texts=TEXTS):
    enc = tok(texts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _backbone(model_dir):
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_dir)


def _values(model, batch):
    import torch

    model.eval()
    with torch.no_grad():
        return model(**batch)


def _train(model, batch, steps: int = 3) -> None:
    """A few AdamW steps on the last-token pairwise loss (rows 0, 2 chosen; 1, 3 rejected)."""
    import torch

    from dschat_cli.rlhf.reward import pairwise_last_token_loss, sequence_scores

    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        scores = sequence_scores(model(**batch), batch["attention_mask"])
        loss = pairwise_last_token_loss(scores[0::2], scores[1::2])
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()


# --- the value head -------------------------------------------------------------------------------

def test_opt_head_reads_the_projected_width(tiny_tokenizer):
    """OPT with word_embed_proj_dim != hidden_size projects its last hidden state down: the head
    must take word_embed_proj_dim inputs, and a forward pass must work."""
    import torch
    from transformers import OPTConfig, OPTModel

    from dschat_cli.models.reward import RewardModel, head_input_dim

    cfg = OPTConfig(vocab_size=len(tiny_tokenizer), hidden_size=64,
                    word_embed_proj_dim=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                    max_position_embeddings=128, pad_token_id=tiny_tokenizer.pad_token_id,
                    bos_token_id=tiny_tokenizer.bos_token_id,
                    eos_token_id=tiny_tokenizer.eos_token_id)
    assert head_input_dim(cfg) == 32
    model = RewardModel(OPTModel(cfg))
    assert model.v_head.in_features == 32 and model.v_head.out_features == 1
    assert model.v_head.bias is None
    batch = _batch(tiny_tokenizer)
    values = _values(model, batch)
    assert values.shape == batch["input_ids"].shape and values.dtype == torch.float32
    assert torch.isfinite(values).all()


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_head_width_is_hidden_size(family, tiny_model_dir, tiny_tokenizer):
    from dschat_cli.models.reward import RewardModel

    backbone = _backbone(tiny_model_dir(family))
    model = RewardModel(backbone)
    assert model.v_head.in_features == backbone.config.hidden_size
    assert model.config is backbone.config
    batch = _batch(tiny_tokenizer)
    assert _values(model, batch).shape == batch["input_ids"].shape


def test_padding_does_not_change_scores(tiny_llama, tiny_tokenizer):
    """A sequence's score (value at its last real token) is the same alone and right-padded in a
    batch with a longer one."""
    import torch

    from dschat_cli.models.reward import RewardModel
    from dschat_cli.rlhf.reward import sequence_scores

    torch.manual_seed(0)
    model = RewardModel(_backbone(tiny_llama))
    batch = _batch(tiny_tokenizer)
    together = sequence_scores(_values(model, batch), batch["attention_mask"])
    for i, text in enumerate(TEXTS):
        one = _batch(tiny_tokenizer, [text])
        alone = sequence_scores(_values(model, one), one["attention_mask"])
        assert float((alone[0] - together[i]).abs()) < 1e-5


# --- save / load ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("lora_dim", [0, 8], ids=["full", "lora"])
def test_saved_reward_model_reloads_to_live_values(family, lora_dim, tiny_model_dir,
                                                   tiny_tokenizer, tmp_path):
    import torch
    from safetensors import safe_open

    from dschat_cli.config.sections import LoraOptions
    from dschat_cli.models.loading import apply_lora
    from dschat_cli.models.reward import (HEAD_FILE, ROLE_KEY, RewardModel, is_reward_dir,
                                          load_reward_model, save_reward_model)

    torch.manual_seed(0)
    backbone = apply_lora(_backbone(tiny_model_dir(family)), LoraOptions(lora_dim=lora_dim))
    assert hasattr(backbone, "peft_config") == bool(lora_dim)
    model = RewardModel(backbone)
    batch = _batch(tiny_tokenizer)
    untrained = _values(model, batch)
    _train(model, batch)
    live = _values(model, batch)
    assert float((live - untrained).abs().max()) > 1e-3  # training changed the function

    out = tmp_path / "reward"
    save_reward_model(model, tiny_tokenizer, out, zero_stage=0, is_main=True)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", HEAD_FILE, "tokenizer.json",
            "tokenizer_config.json"} <= names, sorted(names)
    assert json.loads((out / "config.json").read_text())[ROLE_KEY] == "reward"
    assert is_reward_dir(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "lora_" in k or "base_layer" in k
                         or "base_model" in k or "v_head" in k or "lm_head" in k], keys
    with safe_open(str(out / HEAD_FILE), "pt") as f:
        assert list(f.keys()) == ["v_head.weight"]
        assert tuple(f.get_tensor("v_head.weight").shape) == (1, model.v_head.in_features)

    first = load_reward_model(out).eval()
    assert not hasattr(first.backbone, "peft_config")  # LoRA merged: a plain backbone
    assert type(first.backbone).__name__ == type(_backbone(tiny_model_dir(family))).__name__
    got = _values(first, batch)
    assert got.shape == live.shape
    diff = float((got - live).abs().max())
    assert diff < 1e-5, f"reloaded values differ from the live module's by {diff}"
    again = _values(load_reward_model(out).eval(), batch)
    assert torch.equal(again, got)  # loading is deterministic: nothing random left in the folder


def test_load_reward_model_with_dtype(tiny_opt, tiny_tokenizer, tmp_path):
    import torch

    from dschat_cli.models.reward import RewardModel, load_reward_model, save_reward_model

    torch.manual_seed(0)
    model = RewardModel(_backbone(tiny_opt))
    save_reward_model(model, tiny_tokenizer, tmp_path, zero_stage=0, is_main=True)
    half = load_reward_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    batch = _batch(tiny_tokenizer)
    values = _values(half, batch)
    assert values.dtype == torch.float32  # forward returns float values whatever the weights
    full = _values(model, batch)
    assert float((values - full).abs().max()) < 0.1


def test_check_reward_dir(tmp_path, tiny_opt):
    from dschat_cli.models.reward import check_reward_dir, is_reward_dir

    with pytest.raises(ConfigError) as e:
        check_reward_dir(str(tmp_path / "missing"), "--reward-model")
    assert e.value.where == "--reward-model" and "not found" in e.value.message

    assert not is_reward_dir(tiny_opt)  # a causal LM folder
    with pytest.raises(ConfigError) as e:
        check_reward_dir(str(tiny_opt), "--path")
    assert e.value.where == "--path" and "dschat reward" in e.value.message

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert not is_reward_dir(tmp_path / "bad")
    # the role without the head file is not enough
    (tmp_path / "nohead").mkdir()
    (tmp_path / "nohead" / "config.json").write_text(json.dumps({"dschat_role": "reward"}))
    assert not is_reward_dir(tmp_path / "nohead")
    with pytest.raises(ConfigError):
        check_reward_dir(str(tmp_path / "nohead"), "--path")


def test_load_reward_model_rejects_a_causal_lm_folder(tiny_llama):
    from dschat_cli.models.reward import load_reward_model

    with pytest.raises(ConfigError) as e:
        load_reward_model(tiny_llama, flag="--critic-model")
    assert e.value.where == "--critic-model"


# --- the tokenizer check of step 3 ----------------------------------------------------------------

def test_same_tokenizer_passes(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from dschat_cli.models.reward import check_same_tokenizer

    a = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    b = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    check_same_tokenizer(a, b, flag="--reward-model", other_path="rm")  # no error


def test_different_vocab_is_a_config_error(tiny_tokenizer):
    from dschat_cli.demo.synthetic import demo_corpus
    from dschat_cli.models.local_tokenizer import build_local_tokenizer
    from dschat_cli.models.reward import check_same_tokenizer

    other = build_local_tokenizer(texts=demo_corpus(n=200), vocab_size=300)
    assert other.get_vocab() != tiny_tokenizer.get_vocab()
    with pytest.raises(ConfigError) as e:
        check_same_tokenizer(tiny_tokenizer, other, flag="--critic-model", other_path="/x/critic")
    assert e.value.where == "--critic-model"
    msg = e.value.message
    assert "/x/critic" in msg and "different tokenizer" in msg
    assert f"vocab {len(other.get_vocab())} vs {len(tiny_tokenizer.get_vocab())}" in msg
    assert str(e.value).startswith("--critic-model: ")


def test_different_eos_is_a_config_error(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from dschat_cli.models.reward import check_same_tokenizer

    a = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    b = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    b.eos_token = "<s>"  # same vocabulary, another end-of-sequence id
    assert a.get_vocab() == b.get_vocab() and a.eos_token_id != b.eos_token_id
    with pytest.raises(ConfigError) as e:
        check_same_tokenizer(a, b, flag="--reward-model", other_path="rm")
    assert e.value.where == "--reward-model" and "eos" in e.value.message
