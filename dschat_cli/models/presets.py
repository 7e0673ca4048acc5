"""Architecture presets: the config.json of well-known hub models, shipped without weights.

A preset lets `--model opt-1.3b --random-init` build the real architecture offline (benchmarks
and smoke runs: the architecture, not the weights, sets the cost), and lets --dry-run estimate
sizes without downloading anything. `resolve_preset` also accepts the forms DeepSpeed-Chat's
e2e driver took for --actor-model ("1.3b") and the hub ids ("facebook/opt-1.3b").

The files in presets/ are the hub repos' config.json, byte for byte where the file itself or
a verbatim copy could be read: facebook's own pages for opt-1.3b and opt-2.7b; unmodified
copies (same fields, same byte size) for opt-125m, opt-350m, opt-13b and the three Llama-2
models. For opt-6.7b, opt-30b and opt-66b every architecture field is the hub's, but metadata
keys that could not be confirmed are left out (transformers_version; _name_or_path for
opt-66b). None of the left-out keys affects the model.

No torch import here.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

# preset name -> hub id. The name is also the file name under presets/.
PRESETS: dict[str, str] = {
    "opt-125m": "facebook/opt-125m",
    "opt-350m": "facebook/opt-350m",
    "opt-1.3b": "facebook/opt-1.3b",
    "opt-2.7b": "facebook/opt-2.7b",
    "opt-6.7b": "facebook/opt-6.7b",
    "opt-13b": "facebook/opt-13b",
    "opt-30b": "facebook/opt-30b",
    "opt-66b": "facebook/opt-66b",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
}

_BY_HUB_ID = {hub.lower(): name for name, hub in PRESETS.items()}


def resolve_preset(name: str) -> str | None:
    """The preset a model argument names, or None when it names none.

    Accepts, case-insensitively: a preset name ("opt-1.3b", "llama-2-7b"); a bare OPT size
    ("1.3b", "350m", as DeepSpeed-Chat's --actor-model); the hub id of a preset
    ("facebook/opt-1.3b", "meta-llama/Llama-2-7b-hf"). Anything else, another hub id included,
    gives None. Callers check for a local folder of that name first.
    """
    key = str(name).strip().lower()
    if key in PRESETS:
        return key
    if f"opt-{key}" in PRESETS:
        return f"opt-{key}"
    return _BY_HUB_ID.get(key)


def preset_config(name: str) -> dict:
    """The preset's config.json as a fresh dict (callers may change it)."""
    preset = resolve_preset(name)
    if preset is None:
        raise KeyError(f"unknown architecture preset {name!r}; known: {', '.join(PRESETS)}")
    return json.loads(_read(preset))


@lru_cache(maxsize=None)
def _read(preset: str) -> str:
    return (resources.files(__package__) / "presets" / f"{preset}.json").read_text(encoding="utf-8")


def param_count(cfg: dict) -> int:
    """Number of parameters of the causal LM a config builds, from the config alone (no torch).

    Exact for transformers' OPTForCausalLM and LlamaForCausalLM (tied weights counted once);
    tests check it against models built on the meta device. Other model types raise ValueError.
    """
    model_type = cfg.get("model_type")
    if model_type == "opt":
        return _opt_params(cfg)
    if model_type == "llama":
        return _llama_params(cfg)
    raise ValueError(f"param_count supports model_type opt and llama, not {model_type!r}")


def _opt_params(cfg: dict) -> int:
    h = cfg["hidden_size"]
    ffn = cfg["ffn_dim"]
    vocab = cfg["vocab_size"]
    proj = cfg.get("word_embed_proj_dim", h)
    bias = cfg.get("enable_bias", True)
    affine = cfg.get("layer_norm_elementwise_affine", True)
    ln = 2 * h if affine else 0  # LayerNorm weight + bias

    n = vocab * proj                                    # embed_tokens
    n += (cfg["max_position_embeddings"] + 2) * h       # learned positions, offset 2
    if proj != h:
        n += 2 * proj * h                               # project_in, project_out (no bias)
    per_layer = (4 * h * h + (4 * h if bias else 0)     # q, k, v, out_proj
                 + 2 * h * ffn + ((ffn + h) if bias else 0)  # fc1, fc2
                 + 2 * ln)                              # self_attn_layer_norm, final_layer_norm
    n += cfg["num_hidden_layers"] * per_layer
    if cfg.get("do_layer_norm_before", True) and not cfg.get("_remove_final_layer_norm", False):
        n += ln                                         # decoder.final_layer_norm
    if not cfg.get("tie_word_embeddings", True):
        n += vocab * proj                               # lm_head
    return n


def _llama_params(cfg: dict) -> int:
    h = cfg["hidden_size"]
    inter = cfg["intermediate_size"]
    vocab = cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim

    attn = h * q + 2 * h * kv + q * h                   # q, k, v, o
    if cfg.get("attention_bias", False):
        attn += q + 2 * kv + h
    mlp = 3 * h * inter + ((2 * inter + h) if cfg.get("mlp_bias", False) else 0)
    per_layer = attn + mlp + 2 * h                      # + input / post-attention RMSNorm
    n = vocab * h + cfg["num_hidden_layers"] * per_layer + h  # embed, layers, final norm
    if not cfg.get("tie_word_embeddings", False):
        n += vocab * h                                  # lm_head
    return n
