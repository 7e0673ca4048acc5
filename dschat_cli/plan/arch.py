"""The shape of a model, from its config.json alone (no torch, no weights, no network):

    arch = load_arch("opt-1.3b")            # a preset, a local folder, or a hub id in the local cache
    arch.params, arch.backbone_params       # exact parameter counts (tied weights counted once)
    arch.lora_params(16, "decoder.layers.") # what peft adds with --lora-dim 16

Families: OPT, Llama-like (llama, mistral, qwen2, qwen3), GPT-2 and GPT-NeoX. Every count is the
number transformers' own classes give for the same config (tests build the models and compare).
`activation_bytes` is the memory autograd keeps per token and layer for the backward pass; its
per-family constants were read off the tensors autograd saves (see the function).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED = ("opt", "llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox")
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


class PlanUnavailable(Exception):
    """The estimate cannot be made (model architecture unknown here); `str()` says why and what to
    pass instead, `flag` which option named the model (when known)."""

    def __init__(self, message: str, flag: str = "--model"):
        super().__init__(message)
        self.flag = flag


@dataclass(frozen=True)
class Linear:
    """One Linear (or GPT-2 Conv1D) layer outside the output heads: a LoRA candidate."""
    name: str  # qualified name inside the backbone (AutoModel), e.g. "decoder.layers.0.fc1"
    fan_in: int
    fan_out: int


@dataclass(frozen=True)
class Arch:
    model_type: str
    family: str  # opt, llama (llama-like), gpt2, gpt_neox
    hidden: int
    layers: int
    heads: int
    kv_dim: int  # width of the keys (and values) per token: kv heads x head dim
    intermediate: int  # MLP width
    vocab: int
    head_in: int  # width the output head and a value head read (OPT-350M: 512)
    params: int  # the causal LM's parameters, tied weights once
    head_params: int  # the untied output head's parameters (0 when tied to the embedding)
    largest_tensor: int  # elements of the largest single parameter (what ZeRO-3 gathers at once)
    dropout: float  # residual dropout probability of the config
    prefix: str  # the causal LM's name for its backbone module ("model.", "transformer.", ...)
    linears: tuple[Linear, ...]

    @property
    def backbone_params(self) -> int:
        """Parameters without the LM head: what AutoModel builds (reward models, critics)."""
        return self.params - self.head_params

    def lora_params(self, rank: int, module_filter: str = "", *, backbone_only: bool = False) -> int:
        """Parameters peft adds: rank x (fan_in + fan_out) per Linear whose qualified name contains
        `module_filter` (empty: every Linear but the heads), as models/loading.py picks them."""
        if rank <= 0:
            return 0
        prefix = "" if backbone_only else self.prefix
        return sum(rank * (lin.fan_in + lin.fan_out) for lin in self.linears
                   if not module_filter or module_filter in prefix + lin.name)

    def residual_dropout(self, dropout: float | None = None) -> float:
        """The residual dropout probability in training (`dropout`: a --dropout override).
        Llama-like layers have none: their only dropout is SDPA's, which keeps no mask."""
        if self.family == "llama":
            return 0.0
        return self.dropout if dropout is None else float(dropout)

    def activation_bytes(self, elem: int, dropout: float | None = None,
                         mask_bytes: int = 1) -> float:
        """Bytes autograd saves per token and decoder layer in a training forward pass.

        Measured on transformers' own layers (saved-tensor hooks, parameters excluded, SDPA
        attention) and written as a function of the widths, with e = `elem` bytes per element:
          OPT       8e*h + e*ffn      (LayerNorm, q/k/v/out projections' inputs, SDPA's q, k, v and
                                       output, ReLU output shared with fc2)
          Llama     12e*h + 4e*i      (RMSNorm keeps an fp32 copy; SwiGLU keeps gate, up, silu and
                                       their product)
          GPT-2     8e*h + 5e*i       (gelu_new's tanh formula keeps four intermediates)
          GPT-NeoX  10e*h + 2e*i      (parallel attention and MLP, exact GELU)
        plus, when dropout > 0, the two residual dropout masks: `mask_bytes` per element, 1 on
        the GPU (a bool mask from the fused kernel; CPU's unfused dropout keeps it in the compute
        dtype). Flash / memory-efficient SDPA keeps no attention-dropout mask, only RNG state.
        The constants were read in bf16; fp32 (e = 4) doubles them, a slight overestimate for
        Llama whose norm keeps an fp32 copy anyway."""
        h, i = self.hidden, self.intermediate
        p = self.residual_dropout(dropout)
        if self.family == "opt":
            per = 8 * elem * h + elem * i
        elif self.family == "llama":
            per = 12 * elem * h + 4 * elem * i
        elif self.family == "gpt2":
            per = 8 * elem * h + 5 * elem * i
        else:  # gpt_neox
            per = 10 * elem * h + 2 * elem * i
        return per + (2 * h * mask_bytes if p > 0 else 0)


def arch_from_config(cfg: dict) -> Arch:
    """Arch of a config.json dict; PlanUnavailable for a family not covered."""
    model_type = cfg.get("model_type")
    build = {"opt": _opt, "gpt2": _gpt2, "gpt_neox": _neox, **dict.fromkeys(_LLAMA_LIKE, _llama)}
    if model_type in build:
        try:
            return build[model_type](cfg)
        except KeyError as e:
            raise PlanUnavailable(f"its config.json has no {e.args[0]!r}") from None
    raise PlanUnavailable(f"memory estimates cover model_type {', '.join(SUPPORTED)}; this model "
                          f"is '{model_type}'")


def _linear_params(lin: Linear, bias: bool) -> int:
    return lin.fan_in * lin.fan_out + (lin.fan_out if bias else 0)


def _opt(cfg: dict) -> Arch:
    h, ffn, vocab, L = cfg["hidden_size"], cfg["ffn_dim"], cfg["vocab_size"], cfg["num_hidden_layers"]
    proj = cfg.get("word_embed_proj_dim") or h
    bias = cfg.get("enable_bias", True)
    ln = 2 * h if cfg.get("layer_norm_elementwise_affine", True) else 0  # LayerNorm weight + bias
    linears: list[Linear] = []
    if proj != h:  # OPT-350M: 512-d embeddings projected in and out (no bias)
        linears += [Linear("decoder.project_out", h, proj), Linear("decoder.project_in", proj, h)]
    for n in range(L):
        pre = f"decoder.layers.{n}."
        linears += [Linear(pre + "self_attn.k_proj", h, h), Linear(pre + "self_attn.v_proj", h, h),
                    Linear(pre + "self_attn.q_proj", h, h), Linear(pre + "self_attn.out_proj", h, h),
                    Linear(pre + "fc1", h, ffn), Linear(pre + "fc2", ffn, h)]
    positions = (cfg.get("max_position_embeddings", 2048) + 2) * h  # learned positions, offset 2
    n = vocab * proj + positions + L * 2 * ln
    n += sum(_linear_params(x, bias and not x.name.startswith("decoder.project")) for x in linears)
    if cfg.get("do_layer_norm_before", True) and not cfg.get("_remove_final_layer_norm", False):
        n += ln  # decoder.final_layer_norm (absent in post-LN OPT-350M)
    head = 0 if cfg.get("tie_word_embeddings", True) else vocab * proj
    return Arch(model_type="opt", family="opt", hidden=h, layers=L,
                heads=cfg["num_attention_heads"], kv_dim=h, intermediate=ffn, vocab=vocab,
                head_in=proj, params=n + head, head_params=head,
                largest_tensor=max(vocab * proj, positions, h * ffn),
                dropout=float(cfg.get("dropout", 0.1) or 0.0), prefix="model.",
                linears=tuple(linears))


def _llama(cfg: dict) -> Arch:
    """Llama and the models built like it: mistral (no biases), qwen2 (q/k/v biases), qwen3
    (per-head RMSNorm of q and k)."""
    mt = cfg["model_type"]
    h, inter, vocab, L = (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"],
                          cfg["num_hidden_layers"])
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    if mt == "qwen2":
        attn_bias = {"q_proj": True, "k_proj": True, "v_proj": True, "o_proj": False}
    else:
        b = bool(cfg.get("attention_bias", False)) and mt != "mistral"
        attn_bias = dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj"), b)
    mlp_bias = bool(cfg.get("mlp_bias", False)) and mt == "llama"
    linears: list[Linear] = []
    n = vocab * h + h  # embedding, final RMSNorm
    for layer in range(L):
        pre = f"layers.{layer}."
        attn = [Linear(pre + "self_attn.q_proj", h, q), Linear(pre + "self_attn.k_proj", h, kv),
                Linear(pre + "self_attn.v_proj", h, kv), Linear(pre + "self_attn.o_proj", q, h)]
        mlp = [Linear(pre + "mlp.gate_proj", h, inter), Linear(pre + "mlp.up_proj", h, inter),
               Linear(pre + "mlp.down_proj", inter, h)]
        n += sum(_linear_params(x, attn_bias[x.name.rsplit(".", 1)[1]]) for x in attn)
        n += sum(_linear_params(x, mlp_bias) for x in mlp)
        n += 2 * h + (2 * head_dim if mt == "qwen3" else 0)  # input/post-attention norms (+ q/k norms)
        linears += attn + mlp
    head = 0 if cfg.get("tie_word_embeddings", False) else vocab * h
    return Arch(model_type=mt, family="llama", hidden=h, layers=L, heads=heads, kv_dim=kv,
                intermediate=inter, vocab=vocab, head_in=h, params=n + head, head_params=head,
                largest_tensor=max(vocab * h, h * inter), dropout=0.0, prefix="model.",
                linears=tuple(linears))


def _gpt2(cfg: dict) -> Arch:
    h, vocab, L = cfg["n_embd"], cfg["vocab_size"], cfg["n_layer"]
    inner = cfg.get("n_inner") or 4 * h
    positions = cfg.get("n_positions", 1024) * h
    linears: list[Linear] = []
    for layer in range(L):
        pre = f"h.{layer}."
        linears += [Linear(pre + "attn.c_attn", h, 3 * h), Linear(pre + "attn.c_proj", h, h),
                    Linear(pre + "mlp.c_fc", h, inner), Linear(pre + "mlp.c_proj", inner, h)]
    n = vocab * h + positions + L * 2 * (2 * h) + 2 * h  # wte, wpe, ln_1/ln_2 per layer, ln_f
    n += sum(_linear_params(x, True) for x in linears)
    head = 0 if cfg.get("tie_word_embeddings", True) else vocab * h
    return Arch(model_type="gpt2", family="gpt2", hidden=h, layers=L, heads=cfg["n_head"],
                kv_dim=h, intermediate=inner, vocab=vocab, head_in=h, params=n + head,
                head_params=head, largest_tensor=max(vocab * h, positions, h * inner),
                dropout=float(cfg.get("resid_pdrop", 0.1) or 0.0), prefix="transformer.",
                linears=tuple(linears))


def _neox(cfg: dict) -> Arch:
    h, inter, vocab, L = (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"],
                          cfg["num_hidden_layers"])
    bias = cfg.get("attention_bias", True)
    linears: list[Linear] = []
    n = vocab * h + 2 * h  # embed_in, final_layer_norm
    for layer in range(L):
        pre = f"layers.{layer}."
        attn = [Linear(pre + "attention.query_key_value", h, 3 * h),
                Linear(pre + "attention.dense", h, h)]
        mlp = [Linear(pre + "mlp.dense_h_to_4h", h, inter), Linear(pre + "mlp.dense_4h_to_h", inter, h)]
        n += sum(_linear_params(x, bias) for x in attn) + sum(_linear_params(x, True) for x in mlp)
        n += 2 * (2 * h)  # input and post-attention LayerNorms
        linears += attn + mlp
    head = 0 if cfg.get("tie_word_embeddings", False) else vocab * h
    return Arch(model_type="gpt_neox", family="gpt_neox", hidden=h, layers=L,
                heads=cfg["num_attention_heads"], kv_dim=h, intermediate=inter, vocab=vocab,
                head_in=h, params=n + head, head_params=head, largest_tensor=max(vocab * h, h * inter),
                dropout=float(cfg.get("hidden_dropout", 0.0) or 0.0), prefix="gpt_neox.",
                linears=tuple(linears))


def model_config(model: str) -> dict:
    """config.json of a local folder, a preset, or a hub model already in the local cache (never
    the network). PlanUnavailable otherwise."""
    from dschat_cli.models.presets import PRESETS, preset_config, resolve_preset

    path = Path(str(model)).expanduser()
    if (path / "config.json").is_file():
        try:
            return json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PlanUnavailable(f"{path / 'config.json'} cannot be read ({e})") from None
    if path.is_dir():
        raise PlanUnavailable(f"{model} is a folder without config.json")
    preset = resolve_preset(str(model))
    if preset is not None:
        return preset_config(preset)
    cached = _cached_hub_config(str(model))
    if cached is not None:
        return cached
    raise PlanUnavailable(f"'{model}' is neither a local model folder, an architecture preset "
                          f"({', '.join(PRESETS)}) nor a hub model in the local cache; give one of "
                          "those to estimate its memory")


def _cached_hub_config(repo_id: str) -> dict | None:
    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub library rejects: not cached
        return None
    if not isinstance(found, str):
        return None
    try:
        return json.loads(Path(found).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def load_arch(model: str, dropout: float | None = None, flag: str = "--model") -> Arch:
    """The Arch of a model argument (preset, folder or cached hub id); `dropout` as --dropout;
    `flag` names the option in a PlanUnavailable."""
    try:
        arch = arch_from_config(model_config(model))
    except PlanUnavailable as e:
        raise PlanUnavailable(str(e), flag) from None
    if dropout is not None:
        import dataclasses

        arch = dataclasses.replace(arch, dropout=float(dropout))
    return arch
