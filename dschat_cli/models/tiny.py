"""Tiny randomly initialised causal LMs for tests and the offline demo.

Nothing is downloaded: the model is built from a config sized for a CPU (2 layers, hidden 64 by
default, about 0.1 M parameters) and a tokenizer trained locally
(`dschat_cli.models.local_tokenizer`). Several families are offered so that code paths that depend
on the architecture (OPT's projected embeddings, Llama's RMSNorm/rotary/GQA, GPT-2's Conv1D,
GPT-NeoX's fused QKV and partial rotary) are exercised.

    tok = build_local_tokenizer()
    model = build_tiny_model("llama", tok)
    path = save_tiny_model("opt", tmp_path / "opt", tokenizer=tok)   # reload with Auto* classes
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_FAMILIES: tuple[str, ...] = ("opt", "llama", "gpt2", "gpt_neox")

_ALIASES = {"neox": "gpt_neox", "gpt-neox": "gpt_neox", "gptneox": "gpt_neox"}


def _family(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny model family {name!r}; choose one of {', '.join(TINY_FAMILIES)}")
    return key


def _round_up(n: int, multiple: int = 8) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def _special_ids(tokenizer) -> dict[str, int]:
    """pad/bos/eos ids of the tokenizer; a missing pad falls back to eos, a missing bos to eos."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    return {"pad_token_id": int(pad), "bos_token_id": int(bos), "eos_token_id": int(eos)}


def tiny_config(family: str, tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                max_positions: int = 512, dropout: float | None = None, ffn_mult: int = 2):
    """The `PretrainedConfig` of a tiny model of `family` (see `build_tiny_model`).

    `dropout=None` keeps the family's usual dropout (OPT and GPT-2: 0.1, Llama and NeoX: 0.0), so
    that `--disable-dropout` style code has something to switch off. The MLP is `ffn_mult` x
    `hidden` wide."""
    fam = _family(family)
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    vocab = _round_up(len(tokenizer), 8)
    ids = _special_ids(tokenizer)
    if fam == "opt":
        from transformers import OPTConfig
        kw: dict[str, Any] = {} if dropout is None else {"dropout": dropout}
        return OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, ffn_dim=ffn_mult * hidden,
                         max_position_embeddings=max_positions, word_embed_proj_dim=hidden,
                         **ids, **kw)
    if fam == "llama":
        from transformers import LlamaConfig
        kw = {} if dropout is None else {"attention_dropout": dropout}
        return LlamaConfig(vocab_size=vocab, hidden_size=hidden,
                           intermediate_size=ffn_mult * hidden,
                           num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=heads, max_position_embeddings=max_positions,
                           tie_word_embeddings=False, **ids, **kw)
    if fam == "gpt2":
        from transformers import GPT2Config
        kw = {} if dropout is None else {"resid_pdrop": dropout, "embd_pdrop": dropout,
                                         "attn_pdrop": dropout}
        return GPT2Config(vocab_size=vocab, n_positions=max_positions, n_embd=hidden, n_layer=layers,
                          n_head=heads, n_inner=ffn_mult * hidden, **ids, **kw)
    from transformers import GPTNeoXConfig
    kw = {} if dropout is None else {"attention_dropout": dropout, "hidden_dropout": dropout}
    # NeoX uses partial rotary embeddings (default rotary fraction 0.25 of each head's dims).
    return GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=ffn_mult * hidden,
                         max_position_embeddings=max_positions, **ids, **kw)


def build_tiny_model(family: str, tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                     max_positions: int = 512, seed: int = 0, dropout: float | None = None,
                     ffn_mult: int = 2):
    """A randomly initialised `*ForCausalLM` of `family` ("opt", "llama", "gpt2", "gpt_neox"; "neox"
    is accepted) whose vocabulary is `len(tokenizer)` rounded up to a multiple of 8 and whose
    pad/bos/eos ids are the tokenizer's. Initialisation is seeded and does not disturb the global
    torch RNG."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = tiny_config(family, tokenizer, hidden=hidden, layers=layers, heads=heads,
                         max_positions=max_positions, dropout=dropout, ffn_mult=ffn_mult)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    ids = _special_ids(tokenizer)
    model.generation_config = GenerationConfig(**ids)
    return model


def save_tiny_model(family: str, out_dir, tokenizer=None, **kw) -> Path:
    """Build a tiny model (keyword arguments as `build_tiny_model`) and save it with its tokenizer
    into `out_dir` (safetensors), so that `AutoModelForCausalLM.from_pretrained(out_dir)` and
    `AutoTokenizer.from_pretrained(out_dir)` reload both. Without `tokenizer`, a local tokenizer is
    trained on local_tokenizer's built-in corpus (the demo's model is built by
    `dschat_cli.demo.assets`, with a tokenizer trained on the demo's own texts). Returns the
    folder."""
    if tokenizer is None:
        from dschat_cli.models.local_tokenizer import build_local_tokenizer
        tokenizer = build_local_tokenizer(model_max_length=kw.get("max_positions", 512))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(family, tokenizer, **kw)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
