"""Architecture presets (dschat_cli/models/presets.py): names, files, parameter counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dschat_cli.models import presets
from dschat_cli.models.presets import PRESETS, param_count, preset_config, resolve_preset

PRESET_DIR = Path(presets.__file__).parent / "presets"

# Layers, hidden size, heads (and KV heads) as published: OPT paper (Zhang et al. 2022) table 1,
# Llama 2 paper (Touvron et al. 2023) table 1 / section 2.2 (GQA with 8 KV heads for 70B).
# An independent check of the shipped config.json files.
PUBLISHED = {
    "opt-125m": (12, 768, 12), "opt-350m": (24, 1024, 16), "opt-1.3b": (24, 2048, 32),
    "opt-2.7b": (32, 2560, 32), "opt-6.7b": (32, 4096, 32), "opt-13b": (40, 5120, 40),
    "opt-30b": (48, 7168, 56), "opt-66b": (64, 9216, 72),
    "llama-2-7b": (32, 4096, 32), "llama-2-13b": (40, 5120, 40), "llama-2-70b": (80, 8192, 64),
}


def test_every_preset_has_a_file_and_back():
    assert {p.stem for p in PRESET_DIR.glob("*.json")} == set(PRESETS)
    assert set(PUBLISHED) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_file_matches_published_shape(name):
    cfg = json.loads((PRESET_DIR / f"{name}.json").read_text())
    layers, hidden, heads = PUBLISHED[name]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == \
        (layers, hidden, heads)
    if name.startswith("opt-"):
        assert cfg["model_type"] == "opt" and cfg["architectures"] == ["OPTForCausalLM"]
        assert cfg["ffn_dim"] == 4 * hidden and cfg["vocab_size"] == 50272
        assert cfg["max_position_embeddings"] == 2048
        # opt-350m alone projects 512-d embeddings and normalises after each block.
        assert cfg["word_embed_proj_dim"] == (512 if name == "opt-350m" else hidden)
        assert cfg["do_layer_norm_before"] is (name != "opt-350m")
        assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 2, 1)
    else:
        assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
        assert cfg["num_key_value_heads"] == (8 if name == "llama-2-70b" else heads)
        assert cfg["vocab_size"] == 32000 and cfg["max_position_embeddings"] == 4096
        assert cfg["tie_word_embeddings"] is False
    # Written as transformers writes config.json: sorted keys, 2-space indent, final newline.
    text = (PRESET_DIR / f"{name}.json").read_text()
    assert text == json.dumps(cfg, indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize("arg,expected", [
    ("opt-1.3b", "opt-1.3b"), ("OPT-1.3B", "opt-1.3b"), ("  opt-13b ", "opt-13b"),
    ("1.3b", "opt-1.3b"), ("350m", "opt-350m"), ("66B", "opt-66b"), ("125m", "opt-125m"),
    ("facebook/opt-1.3b", "opt-1.3b"), ("Facebook/OPT-6.7b", "opt-6.7b"),
    ("llama-2-7b", "llama-2-7b"), ("meta-llama/Llama-2-7b-hf", "llama-2-7b"),
    ("META-LLAMA/llama-2-70b-hf", "llama-2-70b"),
    ("facebook/opt-175b", None), ("opt-175b", None), ("7b", None),  # 7b is no OPT size
    ("meta-llama/Llama-2-7b-chat-hf", None), ("gpt2", None), ("facebook/1.3b", None),
    ("./opt-1.3b/", None), ("", None),
])
def test_resolve_preset(arg, expected):
    assert resolve_preset(arg) == expected


def test_preset_config_is_a_fresh_copy():
    a = preset_config("opt-125m")
    a["hidden_size"] = 1
    assert preset_config("opt-125m")["hidden_size"] == 768
    assert preset_config("facebook/opt-125m") == preset_config("125m") == preset_config("opt-125m")


def test_preset_config_unknown():
    with pytest.raises(KeyError, match="opt-125m"):
        preset_config("opt-175b")


@pytest.mark.parametrize("name,published", [
    ("opt-125m", 125e6), ("opt-350m", 350e6), ("opt-1.3b", 1.3e9), ("opt-2.7b", 2.7e9),
    ("opt-6.7b", 6.7e9), ("opt-13b", 1.3e10), ("opt-30b", 3.0e10), ("opt-66b", 6.6e10),
    ("llama-2-7b", 6.7e9), ("llama-2-13b", 1.3e10), ("llama-2-70b", 7.0e10),
])
def test_param_count_near_published_size(name, published):
    # opt-350m is the outlier (331M: its 512-d embeddings make the name generous).
    assert abs(param_count(preset_config(name)) / published - 1) < 0.06


def test_param_count_pinned():
    # Well-known exact counts: Llama-2-7B's 6,738,415,616 (Meta's model card rounds it to 7B).
    assert param_count(preset_config("llama-2-7b")) == 6_738_415_616
    assert param_count(preset_config("opt-1.3b")) == 1_315_758_080
    assert param_count(preset_config("opt-125m")) == 125_239_296


def test_param_count_variants():
    # Options the presets don't use: untied head, no biases, no affine norms, GQA, head_dim.
    opt = dict(preset_config("opt-125m"), tie_word_embeddings=False)
    assert param_count(opt) == 125_239_296 + 50272 * 768
    llama = dict(preset_config("llama-2-7b"), tie_word_embeddings=True)
    assert param_count(llama) == 6_738_415_616 - 32000 * 4096
    with pytest.raises(ValueError, match="gpt2"):
        param_count({"model_type": "gpt2"})


@pytest.fixture(scope="module")
def meta_count():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    def count(cfg: dict) -> int:
        with torch.device("meta"):  # shapes only: no memory, no init
            model = transformers.AutoModelForCausalLM.from_config(
                transformers.AutoConfig.for_model(**cfg))
        return sum(p.numel() for p in model.parameters())  # tied weights once

    return count


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_equals_transformers(name, meta_count):
    cfg = preset_config(name)
    assert param_count(cfg) == meta_count(cfg)


@pytest.mark.parametrize("overrides", [
    {"enable_bias": False}, {"layer_norm_elementwise_affine": False},
    {"tie_word_embeddings": False}, {"_remove_final_layer_norm": True},
    {"do_layer_norm_before": False, "word_embed_proj_dim": 256},
])
def test_param_count_opt_variants_equal_transformers(overrides, meta_count):
    cfg = {**preset_config("opt-125m"), "num_hidden_layers": 2, **overrides}
    assert param_count(cfg) == meta_count(cfg)


@pytest.mark.parametrize("overrides", [
    {"attention_bias": True}, {"mlp_bias": True}, {"tie_word_embeddings": True},
    {"num_key_value_heads": 4}, {"head_dim": 64},
])
def test_param_count_llama_variants_equal_transformers(overrides, meta_count):
    cfg = {**preset_config("llama-2-7b"), "num_hidden_layers": 2, **overrides}
    assert param_count(cfg) == meta_count(cfg)


def test_module_imports_no_torch():
    code = ("import sys, dschat_cli.models.presets as p; p.preset_config('opt-1.3b'); "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[3])
