"""Reward model (and PPO critic): a causal-LM backbone without its LM head plus a scalar value head.

    values = RewardModel(backbone)(input_ids, attention_mask)      # (B, T), one value per token
    scores = sequence_scores(values, attention_mask)               # (B,), value at the last real token

A saved reward folder is a Hugging Face folder of the backbone (model.safetensors, config.json
with "dschat_role": "reward", tokenizer) plus value_head.safetensors; `load_reward_model` turns it
back into the same module, and step 3 builds both its frozen reward model and its trainable critic
from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from dschat_cli.config.schema import ConfigError
from dschat_cli.models.loading import gathered_state_dict, materialize

ROLE_KEY = "dschat_role"
HEAD_FILE = "value_head.safetensors"


def head_input_dim(config) -> int:
    """Width of the backbone's last hidden state: OPT projects to word_embed_proj_dim."""
    proj = getattr(config, "word_embed_proj_dim", None)
    return int(proj) if proj else int(config.hidden_size)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B, T) position ids: 0 at each row's first real token (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.v_head = nn.Linear(head_input_dim(backbone.config), 1, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, **_) -> torch.Tensor:
        """(B, T) ids and mask -> (B, T) float values. Positions count real tokens only, so a
        left-padded sequence (PPO) is scored like the right-padded one it was trained on."""
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False).last_hidden_state
        return self.v_head(hidden).squeeze(-1).float()

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)


def is_reward_dir(path: str | Path) -> bool:
    p = Path(path).expanduser()
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return cfg.get(ROLE_KEY) == "reward" and (p / HEAD_FILE).is_file()


def check_reward_dir(path: str, flag: str) -> None:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(flag, f"folder {path} not found")
    if not is_reward_dir(p):
        raise ConfigError(flag, f"{path} is not a dschat reward model (no \"{ROLE_KEY}\": \"reward\" "
                          f"in config.json or no {HEAD_FILE}); train one with `dschat reward`")


def save_reward_model(model: RewardModel, tokenizer, out_dir: str | Path, *, zero_stage: int,
                      is_main: bool) -> None:
    """Every rank must call it (ZeRO-3 gathers); rank 0 writes."""
    from safetensors.torch import save_file

    sd = gathered_state_dict(model, zero_stage=zero_stage, is_main=is_main)
    if not is_main:
        return
    head = sd.pop("v_head.weight").contiguous()
    backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    fresh = materialize(model.backbone, backbone_sd)
    setattr(fresh.config, ROLE_KEY, "reward")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out)
    save_file({"v_head.weight": head}, str(out / HEAD_FILE))
    tokenizer.save_pretrained(out)


def load_reward_model(path: str | Path, *, dtype=None, flag: str = "--path",
                      trust_remote_code: bool = False) -> RewardModel:
    """Rebuild the module saved by save_reward_model (plain, unpartitioned)."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    check_reward_dir(str(path), flag)
    backbone = AutoModel.from_pretrained(str(path), dtype=dtype,
                                         trust_remote_code=trust_remote_code)
    model = RewardModel(backbone)
    head = load_file(str(Path(path) / HEAD_FILE))["v_head.weight"]
    with torch.no_grad():
        model.v_head.weight.copy_(head.to(model.v_head.weight.dtype))
    if dtype is not None:
        model.to(dtype)
    return model


def build_reward_model(opts, tokenizer, *, dtype: str, ds_config: dict | None, device: str,
                       lora=None, flag: str = "--critic-model") -> RewardModel:
    """Reward model or critic for step 3 from a step-2 folder: the backbone loads through the same
    path as every model (ZeRO-3 partitioned when ds_config says so), the head from its file."""
    from safetensors.torch import load_file

    from dschat_cli.models.loading import apply_lora, load_causal_lm

    untrained = is_random_architecture(opts)  # benchmarks: random weights and head
    if not untrained:
        check_reward_dir(str(opts.model), flag)
    backbone = load_causal_lm(opts, tokenizer, dtype=dtype, ds_config=ds_config, device=device,
                              backbone_only=True)
    if lora is not None:
        backbone = apply_lora(backbone, lora, flag_prefix="critic-")
    model = RewardModel(backbone)
    if not untrained:
        head = load_file(str(Path(opts.model).expanduser() / HEAD_FILE))["v_head.weight"]
        with torch.no_grad():
            model.v_head.weight.copy_(head)
    model.v_head.to(device=next(backbone.parameters()).device, dtype=backbone.dtype)
    return model


def is_random_architecture(opts) -> bool:
    """--critic-model opt-350m --critic-random-init: an architecture with random weights (and a
    random value head): a preset, or any model folder's config.json (benchmarks, tests)."""
    from dschat_cli.models.presets import resolve_preset

    if not opts.random_init:
        return False
    path = Path(str(opts.model)).expanduser()
    if path.exists():
        return (path / "config.json").is_file()
    return bool(resolve_preset(str(opts.model)))


def check_same_tokenizer(actor_tokenizer, other_tokenizer, *, flag: str, other_path: str) -> None:
    """Step 3 feeds the actor's token ids to the reward model and critic: their vocabularies must
    be the same mapping and agree on eos (which ends answers), or scores are computed on garbage.
    Pad ids may differ: dschat never reads meaning into pad ids (masks say what is real)."""
    a, b = actor_tokenizer.get_vocab(), other_tokenizer.get_vocab()
    if a != b:
        only_a = len(set(a) - set(b))
        only_b = len(set(b) - set(a))
        moved = sum(1 for t, i in a.items() if t in b and b[t] != i)
        raise ConfigError(flag, f"{other_path} uses a different tokenizer than the actor (vocab "
                          f"{len(b)} vs {len(a)}; {only_a} tokens only in the actor's, {only_b} "
                          f"only in its, {moved} with other ids); train the reward model from a "
                          "model with the actor's tokenizer (e.g. pass the actor's --tokenizer)")
    if actor_tokenizer.eos_token_id != other_tokenizer.eos_token_id:
        raise ConfigError(flag, f"{other_path}: eos id {other_tokenizer.eos_token_id} differs from "
                          f"the actor's {actor_tokenizer.eos_token_id}")
