"""Architecture counts of `dschat plan` (dschat_cli/plan/arch.py) against the models transformers
and peft really build: parameters, backbone parameters, LoRA adapters, and the activation bytes
autograd saves per token and layer."""

from __future__ import annotations

import pytest
import torch

from dschat_cli.models.presets import PRESETS, param_count, preset_config
from dschat_cli.plan.arch import PlanUnavailable, arch_from_config, load_arch, model_config

# Small configs that exercise each family's options; keys left out take transformers' defaults,
# which the parser must reproduce.
CONFIGS = {
    "opt-projected": ("opt", dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, ffn_dim=128, max_position_embeddings=128,
                                  word_embed_proj_dim=32)),
    "opt-post-ln-untied": ("opt", dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, ffn_dim=128, do_layer_norm_before=False,
                                       tie_word_embeddings=False)),
    "llama-gqa-bias": ("llama", dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=96, attention_bias=True, mlp_bias=True)),
    "llama-tied": ("llama", dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=96,
                                 tie_word_embeddings=True)),
    "mistral": ("mistral", dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                head_dim=32)),
    "qwen2": ("qwen2", dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)),
    "qwen3": ("qwen3", dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                            head_dim=16, tie_word_embeddings=True)),
    "gpt2": ("gpt2", dict(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                          bos_token_id=0, eos_token_id=0)),
    "gpt2-inner-untied": ("gpt2", dict(vocab_size=1000, n_embd=64, n_layer=2, n_head=4,
                                       n_positions=128, n_inner=100, tie_word_embeddings=False,
                                       bos_token_id=0, eos_token_id=0)),
    "neox": ("gpt_neox", dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=96)),
    "neox-nobias-tied": ("gpt_neox", dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=96,
                                          attention_bias=False, tie_word_embeddings=True)),
}


def _build(model_type, kw, backbone=False, **extra):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **kw, **extra)
    return (AutoModel if backbone else AutoModelForCausalLM).from_config(cfg), cfg


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_counts_match_transformers(name):
    model_type, kw = CONFIGS[name]
    with torch.device("meta"):
        lm, cfg = _build(model_type, kw)
        backbone, _ = _build(model_type, kw, backbone=True)
    # the sparse dict (defaults left out) and transformers' full to_dict() give the same numbers
    for arch in (arch_from_config(dict(kw, model_type=model_type)), arch_from_config(cfg.to_dict())):
        assert arch.params == sum(p.numel() for p in lm.parameters())
        assert arch.backbone_params == sum(p.numel() for p in backbone.parameters())
        assert arch.largest_tensor == max(p.numel() for p in lm.parameters())
        # every Linear/Conv1D of the backbone, by its qualified name (what LoRA filters match)
        linears = {n for n, m in backbone.named_modules() if type(m).__name__ in ("Linear", "Conv1D")}
        assert {x.name for x in arch.linears} == linears


def test_presets_agree_with_presets_param_count():
    for name in PRESETS:
        cfg = preset_config(name)
        assert arch_from_config(cfg).params == param_count(cfg)
    assert load_arch("opt-1.3b").params == 1_315_758_080  # facebook/opt-1.3b


@pytest.mark.parametrize("family,lora_filter,backbone", [
    ("opt", "", False), ("opt", "self_attn", True), ("gpt2", "", False), ("llama", "layers.1.", False),
    ("gpt_neox", "mlp", True)])
def test_lora_params_match_peft(tiny_model_dir, family, lora_filter, backbone):
    from transformers import AutoModel, AutoModelForCausalLM

    from dschat_cli.config.sections import LoraOptions
    from dschat_cli.models.loading import apply_lora

    path = tiny_model_dir(family)
    model = (AutoModel if backbone else AutoModelForCausalLM).from_pretrained(path)
    wrapped = apply_lora(model, LoraOptions(lora_dim=4, lora_module_name=lora_filter))
    adapters = sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)
    arch = load_arch(str(path))
    assert adapters > 0
    assert arch.lora_params(4, lora_filter, backbone_only=backbone) == adapters


def _saved_bytes_per_layer(model_type, kw, tokens_shape, dropout):
    """Bytes autograd saves for one decoder layer (4-layer minus 2-layer model, halved), parameters
    excluded, for a bf16 training forward with SDPA attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def saved(layers):
        key = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
        cfg = AutoConfig.for_model(model_type, **{**kw, key: layers}, **dropout)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        store: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                store[ptr] = max(store.get(ptr, 0), t.untyped_storage().nbytes())
            return t

        ids = torch.randint(0, 1000, tokens_shape)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        return sum(store.values())

    return (saved(4) - saved(2)) / 2


@pytest.mark.parametrize("name,dropout", [
    ("opt-projected", {"dropout": 0.1}), ("opt-projected", {"dropout": 0.0}),
    ("llama-tied", {}), ("gpt2", {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
    ("neox", {"hidden_dropout": 0.1})])
def test_activation_bytes_match_what_autograd_saves(name, dropout):
    model_type, kw = CONFIGS[name]
    kw = dict(kw, **{k: 256 for k in ("hidden_size", "n_embd") if k in kw})
    for k in ("ffn_dim", "intermediate_size"):
        if k in kw:
            kw[k] = 704  # not a multiple of the hidden size: the two widths are told apart
    kw.pop("word_embed_proj_dim", None)
    arch = arch_from_config(dict(kw, model_type=model_type, **dropout))
    shape = (2, 64)
    measured = _saved_bytes_per_layer(model_type, kw, shape, dropout)
    # on CPU, dropout is not the fused kernel: its mask is kept in bf16 (2 bytes), not as bool
    expected = shape[0] * shape[1] * arch.activation_bytes(2, mask_bytes=2)
    # within 2%: the rest is SDPA's per-head logsumexp and RoPE's cos/sin tables
    assert expected == pytest.approx(measured, rel=0.02)


def test_unknown_models_say_what_to_pass(tmp_path):
    with pytest.raises(PlanUnavailable, match="neither a local model folder, an architecture preset"):
        model_config("someone/not-cached-model")
    (tmp_path / "config.json").write_text('{"model_type": "mamba"}')
    with pytest.raises(PlanUnavailable, match="model_type opt, llama.*this model is 'mamba'") as e:
        load_arch(str(tmp_path), flag="--critic-model")
    assert e.value.flag == "--critic-model"
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(PlanUnavailable, match="no 'hidden_size'"):
        load_arch(str(tmp_path))
