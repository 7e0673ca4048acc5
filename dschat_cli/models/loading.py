"""Load tokenizers and causal LMs (hub id, local folder, or architecture preset), add LoRA, save.

Rank side: called by the steps inside workers. `check_model_source` is also called on the user's
side before launch so a wrong --model fails in a second with a one-line error.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from dschat_cli import hub
from dschat_cli.config.schema import ConfigError
from dschat_cli.config.sections import LoraOptions, ModelOptions

# Module-name fragments of output heads and value heads: never LoRA targets.
_HEAD_NAMES = ("lm_head", "embed_out", "score", "v_head", "value_head")


def resolve_model_name(opts: ModelOptions) -> tuple[str, str | None]:
    """-> (what to load from: a folder or a hub id, preset name or None)."""
    from dschat_cli.models.presets import PRESETS, resolve_preset

    name = str(opts.model)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser()), None
    preset = resolve_preset(name)
    if preset is not None:
        return PRESETS[preset], preset
    return name, None


def trust_flag_for(flag: str) -> str:
    """The flag that allows a model's own code: --actor-model -> --actor-trust-remote-code,
    --critic-model and --reward-model -> --critic-trust-remote-code, others --trust-remote-code."""
    if flag == "--reward-model":
        return "--critic-trust-remote-code"
    if flag.endswith("-model") and flag != "--model":
        return flag[:-len("model")] + "trust-remote-code"
    return "--trust-remote-code"


def check_remote_code(config: dict, name: str, *, trust: bool, flag: str) -> None:
    """Refuse, before anything loads, a model whose config.json needs the folder's (or hub repo's)
    own Python ("auto_map" for an architecture transformers does not ship) unless its
    trust-remote-code flag was given: that code runs with the user's permissions. Without the flag
    transformers would fail deep in a worker, or stop to ask on stdin."""
    if trust or not config.get("auto_map"):
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if config.get("model_type") in CONFIG_MAPPING:
        return  # transformers uses its own implementation and ignores the folder's code
    raise ConfigError(flag, f"{name} needs its own model code (auto_map in config.json; model type "
                      f"'{config.get('model_type')}' is not part of transformers); pass "
                      f"{trust_flag_for(flag)} to run it, only for a model you trust (the code "
                      "runs with your permissions)")


def read_config_json(path: Path, flag: str) -> dict:
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(flag, f"{path / 'config.json'} is not valid JSON ({e}); re-save the "
                          "model with save_pretrained") from None
    if not isinstance(raw, dict):
        raise ConfigError(flag, f"{path / 'config.json'} is not a model config (a JSON object)")
    return raw


def check_model_source(opts: ModelOptions, flag: str = "--model") -> None:
    """Fail fast, before launch, when the model cannot be loaded (user side)."""
    name = str(opts.model)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(flag, f"{name} is a folder without config.json; give a Hugging Face "
                              "model folder (saved with save_pretrained)")
        check_remote_code(read_config_json(path, flag), name, trust=opts.trust_remote_code,
                          flag=flag)
        return
    if path.exists():
        raise ConfigError(flag, f"{name} is a file; give a model folder, hub id or preset")
    source, preset = resolve_model_name(opts)
    if preset is not None and opts.random_init:
        return  # built from the shipped architecture config
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(flag, f"folder {name} not found")
    try:  # a hub id: fine if it is in the local cache, else it needs the network
        from transformers import PretrainedConfig

        raw, _ = PretrainedConfig.get_config_dict(source, local_files_only=True)
    except Exception:
        raw = None
    if raw is not None:
        check_remote_code(raw, name, trust=opts.trust_remote_code, flag=flag)
        return
    if not hub.reachable():
        hint = f", or `{flag} {preset} --random-init` for an untrained model of that architecture" \
            if preset else ""
        raise ConfigError(flag, f"'{name}' is not a local folder, and hub model '{source}' cannot be "
                          f"downloaded (no network) nor found in the local cache; pass a local model "
                          f"folder{hint}")


def load_tokenizer(opts: ModelOptions):
    """The model's tokenizer with a pad token (eos when the tokenizer has none; masks always come
    from attention masks, so pad == eos is safe) and right padding for training."""
    from transformers import AutoTokenizer

    source, preset = resolve_model_name(opts)
    name = opts.tokenizer or source
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=opts.trust_remote_code,
                                            local_files_only=not hub.reachable())
    except Exception as e:
        if preset is None or opts.tokenizer:
            raise ConfigError("--tokenizer" if opts.tokenizer else "--model",
                              f"cannot load a tokenizer from '{name}' ({_first_line(e)}); give a "
                              "folder saved with save_pretrained or a hub id") from None
        from dschat_cli.models.local_tokenizer import build_local_tokenizer

        warnings.warn(f"no tokenizer for {source} is available offline: using a locally built "
                      "byte-level tokenizer (pass --tokenizer to use a real one)", stacklevel=2)
        tok = build_local_tokenizer(vocab_size=4096)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    return tok


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def check_tokenizer_source(opts: ModelOptions, flag: str = "--tokenizer") -> None:
    """User side, before launch: a --tokenizer given explicitly must exist and load (the model's
    own tokenizer is the model folder's, checked with it)."""
    if not opts.tokenizer:
        return
    name = str(opts.tokenizer)
    p = Path(name).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(flag, f"{name} is a file; give a tokenizer folder (saved with "
                          "save_pretrained) or a hub id")
    if not p.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ConfigError(flag, f"folder {name} not found")
    try:
        load_tokenizer(opts)
    except ConfigError as e:
        raise ConfigError(flag, e.message) from None


def _apply_dropout(config: Any, p: float) -> list[str]:
    changed = []
    for key, value in list(vars(config).items()):
        if isinstance(value, float) and (key.endswith("dropout") or key.endswith("pdrop")
                                         or key.endswith("dropout_prob")):
            setattr(config, key, p)
            changed.append(key)
    return changed


@contextlib.contextmanager
def zero3_init_disabled():
    """Build a model normally even while an HfDeepSpeedConfig for ZeRO-3 is alive."""
    from transformers.integrations import deepspeed as hf_ds

    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def load_causal_lm(opts: ModelOptions, tokenizer, *, dtype: str, ds_config: dict | None = None,
                   device: str | None = None, backbone_only: bool = False):
    """Load (or, with --random-init, build) the causal LM.

    With ZeRO-3, `ds_config` is registered through HfDeepSpeedConfig before from_pretrained so the
    weights load already partitioned; the returned model keeps a reference to it (it must stay
    alive). Embeddings grow to len(tokenizer) rounded up to a multiple of 8. With backbone_only,
    the transformer without its LM head (AutoModel), for reward models and critics."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    auto_class = AutoModel if backbone_only else AutoModelForCausalLM

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    source, preset = resolve_model_name(opts)
    if opts.random_init:
        if preset is not None:
            from dschat_cli.models.presets import preset_config

            raw = dict(preset_config(preset))
            model_type = raw.pop("model_type")
            config = AutoConfig.for_model(model_type, **raw)
        else:
            config = AutoConfig.from_pretrained(source, trust_remote_code=opts.trust_remote_code)
    else:
        config = AutoConfig.from_pretrained(source, trust_remote_code=opts.trust_remote_code)
    if opts.dropout is not None:
        _apply_dropout(config, opts.dropout)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        tid = getattr(tokenizer, key, None)
        if tid is not None and tid < getattr(config, "vocab_size", 1 << 30):
            setattr(config, key, tid)

    hf_ds_config = None
    if ds_config and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)
    if opts.random_init:
        warnings.warn(f"{opts.model}: randomly initialised weights; the model is untrained "
                      "(benchmarks and smoke runs only)", stacklevel=2)
        # Random init of billions of weights is minutes on CPU, seconds on the GPU. Under ZeRO-3
        # transformers builds the model inside deepspeed.zero.Init (the HfDeepSpeedConfig above):
        # each weight is partitioned over the ranks as it is created, so a model that does not fit
        # one GPU (or one host's memory, once per rank) still builds.
        if hf_ds_config is not None:
            model = auto_class.from_config(config, dtype=torch_dtype,
                                           trust_remote_code=opts.trust_remote_code)
        else:
            with zero3_init_disabled(), torch.device(device or "cpu"):
                model = auto_class.from_config(config, dtype=torch_dtype,
                                               trust_remote_code=opts.trust_remote_code)
    else:
        # Another model's ZeRO-3 config may be alive (PPO loads four models): load this one
        # partitioned only if it is itself ZeRO-3.
        ctx = contextlib.nullcontext() if hf_ds_config is not None else zero3_init_disabled()
        with ctx:
            model = auto_class.from_pretrained(source, config=config, dtype=torch_dtype,
                                               trust_remote_code=opts.trust_remote_code)
    model._dschat_hf_ds_config = hf_ds_config  # keep alive with the model

    vocab = model.get_input_embeddings().weight.shape[0]
    if hf_ds_config is not None:  # partitioned: the true size is in ds_shape
        vocab = getattr(model.get_input_embeddings().weight, "ds_shape", (vocab,))[0]
    if len(tokenizer) > vocab:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)
    if opts.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def lora_target_modules(model, module_filter: str) -> list[str]:
    """Qualified names of the Linear/Conv1D layers that get LoRA: every one outside the heads, or
    those whose name contains `module_filter`."""
    import torch.nn as nn

    try:
        from transformers.pytorch_utils import Conv1D
        kinds: tuple = (nn.Linear, Conv1D)
    except ImportError:  # pragma: no cover
        kinds = (nn.Linear,)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        if any(part in _HEAD_NAMES for part in name.split(".")):
            continue
        if module_filter and module_filter not in name:
            continue
        names.append(name)
    return names


def _no_lora_target_error(lora: LoraOptions, flag_prefix: str) -> ConfigError:
    return ConfigError(f"--{flag_prefix}lora-module-name",
                       f"'{lora.lora_module_name}' matches no Linear layer of this model; use a "
                       "fragment of a layer name such as 'layers.' or leave it empty")


def check_lora_targets(opts: ModelOptions, lora: LoraOptions, *, backbone_only: bool = False,
                       flag_prefix: str = "") -> None:
    """User side, before launch: build the architecture on the meta device (no memory, no
    weights) and check that --lora-module-name selects some layer."""
    if lora.lora_dim <= 0:
        return
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    source, preset = resolve_model_name(opts)
    try:
        if preset is not None and opts.random_init:
            from dschat_cli.models.presets import preset_config

            raw = dict(preset_config(preset))
            config = AutoConfig.for_model(raw.pop("model_type"), **raw)
        else:
            config = AutoConfig.from_pretrained(source, trust_remote_code=opts.trust_remote_code)
        with torch.device("meta"):
            auto = AutoModel if backbone_only else AutoModelForCausalLM
            model = auto.from_config(config, trust_remote_code=opts.trust_remote_code)
    except Exception:  # unknown here (e.g. remote code): the worker checks again
        return
    if not lora_target_modules(model, lora.lora_module_name):
        raise _no_lora_target_error(lora, flag_prefix)


def apply_lora(model, lora: LoraOptions, flag_prefix: str = ""):
    """Wrap with peft LoRA (rank lora_dim). Without --only-optimize-lora the base weights stay
    trainable too (DeepSpeed-Chat's behaviour); with it only the adapters train."""
    if lora.lora_dim <= 0:
        return model
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = lora_target_modules(model, lora.lora_module_name)
    if not targets:
        raise _no_lora_target_error(lora, flag_prefix)
    fan_in_fan_out = isinstance(model.get_submodule(targets[0]), Conv1D)
    cfg = LoraConfig(r=lora.lora_dim, lora_alpha=lora.lora_alpha or lora.lora_dim,
                     target_modules=targets, lora_dropout=0.0, bias="none",
                     fan_in_fan_out=fan_in_fan_out)
    model = get_peft_model(model, cfg)
    if not lora.only_optimize_lora:
        for p in model.parameters():
            p.requires_grad_(True)
    elif getattr(model.base_model.model, "is_gradient_checkpointing", False):
        # frozen inputs + checkpointing would give "element 0 ... does not require grad"
        model.enable_input_require_grads()
    return model


def optimizer_groups(model, *, weight_decay: float, lora_lr: float) -> list[dict]:
    """AdamW groups: decayed weights; biases and norm weights without decay; LoRA adapters at
    their own lr. Only trainable parameters."""
    decay, no_decay, lora = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lname = name.lower()
        if "lora_" in lname:
            lora.append(p)
        elif lname.endswith("bias") or "norm" in lname or ".ln_" in lname or "layernorm" in lname:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0},
              {"params": lora, "weight_decay": 0.0, "lr": lora_lr}]
    return [g for g in groups if g["params"]]


def gathered_state_dict(module, *, zero_stage: int, is_main: bool) -> dict | None:
    """Full state dict on rank 0 (None elsewhere). Under ZeRO-3 each parameter is gathered in turn
    (every rank must call this)."""
    if zero_stage != 3:
        if not is_main:
            return None
        return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}
    import deepspeed

    sd: dict = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if is_main:
                sd[name] = p.data.detach().to("cpu").clone()
    if is_main:
        param_names = {n for n, _ in module.named_parameters(remove_duplicate=False)}
        for name, buf in module.state_dict().items():
            if name not in param_names and name not in sd:
                sd[name] = buf.detach().to("cpu").clone()
    return sd


def materialize(live, sd: dict):
    """A plain (un-partitioned, LoRA-merged) copy of `live` holding the gathered weights `sd`.

    Built on the meta device and filled by assignment, so no memory or time goes into a random
    initialisation; LoRA merging is peft's own merge_and_unload."""
    import copy

    import torch

    is_peft = hasattr(live, "peft_config")
    base = live.get_base_model() if is_peft else live
    with zero3_init_disabled(), torch.device("meta"):
        fresh = base.__class__(copy.deepcopy(base.config))
    if is_peft:
        from peft import get_peft_model

        fresh = get_peft_model(fresh, live.peft_config["default"])
    _, unexpected = fresh.load_state_dict(sd, strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"saving: unexpected keys {unexpected[:5]}")
    if is_peft:
        fresh = fresh.merge_and_unload()
    # A tied output head is one parameter in training, so the gathered state has only the input
    # embedding: tie it again explicitly (what the meta model held there is not data).
    live_out = base.get_output_embeddings()
    tied = live_out is not None and live_out.weight is base.get_input_embeddings().weight
    if tied:
        fresh.get_output_embeddings().weight = fresh.get_input_embeddings().weight
    # peft's merge can leave tie_word_embeddings False in the config; the file must say what the
    # weights are, or a reload would start the head from random values.
    if live_out is not None:
        fresh.config.tie_word_embeddings = tied
        if hasattr(fresh.config, "get_text_config"):
            fresh.config.get_text_config().tie_word_embeddings = tied
    still_meta = [n for n, p in fresh.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"saving: weights missing from the gathered state: {still_meta[:5]}")
    if hasattr(fresh.config, "use_cache"):
        fresh.config.use_cache = True
    return fresh


def save_hf_model(module, tokenizer, out_dir: str | Path, *, zero_stage: int, is_main: bool) -> None:
    """Save a Hugging Face folder (safetensors, config, generation config, tokenizer) that loads
    with from_pretrained; LoRA adapters are merged into the weights. Every rank must call it."""
    sd = gathered_state_dict(module, zero_stage=zero_stage, is_main=is_main)
    if not is_main:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    materialize(module, sd).save_pretrained(out)  # safetensors (the only format in transformers 5)
    tokenizer.save_pretrained(out)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
