"""Tiny models of every family: build, save, reload with Auto classes, forward, generate."""

from __future__ import annotations

import json

import pytest
import torch

from dschat_cli.models.tiny import TINY_FAMILIES, build_tiny_model, save_tiny_model

FAMILY_CLASSES = {"opt": "OPTForCausalLM", "llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel",
                  "gpt_neox": "GPTNeoXForCausalLM"}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_build_save_reload_generate(family, tok, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = build_tiny_model(family, tok)
    assert type(model).__name__ == FAMILY_CLASSES[family]
    assert model.config.vocab_size % 8 == 0 and model.config.vocab_size >= len(tok)
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size
    assert sum(p.numel() for p in model.parameters()) < 500_000

    out = save_tiny_model(family, tmp_path / family, tokenizer=tok)
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == family

    tok2 = AutoTokenizer.from_pretrained(out)
    assert (tok2.pad_token_id, tok2.eos_token_id, tok2.bos_token_id) == (0, 1, 2)
    assert (tok2.pad_token, tok2.eos_token, tok2.bos_token) == ("<pad>", "</s>", "<s>")
    assert len(tok2) == len(tok)

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    reloaded.eval()
    cfg = reloaded.config
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (0, 1, 2)
    gen_cfg = reloaded.generation_config
    assert (gen_cfg.pad_token_id, gen_cfg.eos_token_id) == (0, 1)
    # Same seed -> same weights as the in-memory build; saving preserved them.
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name

    enc = tok2([" Human: How do I bake bread? Assistant:", " Human: Hi? Assistant:"],
               return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = reloaded(**enc, labels=labels).loss
    assert torch.isfinite(loss)
    assert 4.0 < loss.item() < 9.0  # about ln(vocab) at random init

    tok2.padding_side = "left"
    enc = tok2([" Human: How do I bake bread? Assistant:", " Human: Hi? Assistant:"],
               return_tensors="pt", padding=True)
    with torch.no_grad():
        gen = reloaded.generate(**enc, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert gen.shape == (2, enc["input_ids"].shape[1] + 5)
    assert isinstance(tok2.batch_decode(gen[:, -5:]), list)


def test_seed_controls_init_and_keeps_global_rng(tok):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model("llama", tok, seed=0)
    after = torch.rand(3)
    b = build_tiny_model("llama", tok, seed=0)
    c = build_tiny_model("llama", tok, seed=1)
    assert torch.equal(expected, after)  # global RNG untouched
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_sizes_and_family_specifics(tok):
    opt = build_tiny_model("opt", tok, hidden=32, layers=3, heads=2, max_positions=128)
    assert opt.config.word_embed_proj_dim == 32 and opt.config.ffn_dim == 64
    assert opt.config.num_hidden_layers == 3 and opt.config.max_position_embeddings == 128
    llama = build_tiny_model("llama", tok)
    assert llama.config.intermediate_size == 128 and llama.config.num_key_value_heads == 4
    gpt2 = build_tiny_model("gpt2", tok)
    assert (gpt2.config.n_embd, gpt2.config.n_layer, gpt2.config.n_head) == (64, 2, 4)
    neox = build_tiny_model("neox", tok)  # alias
    assert neox.config.model_type == "gpt_neox"
    assert build_tiny_model("opt", tok, dropout=0.0).config.dropout == 0.0
    with pytest.raises(ValueError, match="unknown tiny model family"):
        build_tiny_model("bert", tok)
    with pytest.raises(ValueError, match="multiple of heads"):
        build_tiny_model("llama", tok, hidden=30, heads=4)


def test_save_without_tokenizer_builds_a_local_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    out = save_tiny_model("gpt2", tmp_path / "m", hidden=32, max_positions=256)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id == 0 and tok.model_max_length == 256
    assert "ĠAssistant" in tok.get_vocab()


def test_session_fixtures(tiny_opt, tiny_any, tiny_model_dir):
    assert (tiny_opt / "config.json").is_file() and (tiny_any / "tokenizer.json").is_file()
    assert tiny_model_dir("opt") == tiny_opt  # built once
