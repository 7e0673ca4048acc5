"""Which actors --generation-tensor-parallel can split, and how: the layouts of the supported model
families and the check that an actor divides N ways. No torch import, so that `dschat plan` and
the pre-launch checks read it without loading torch (generation/tensor_parallel.py builds the
sharded copy)."""

from __future__ import annotations

from dataclasses import dataclass

FLAG = "--generation-tensor-parallel"


@dataclass(frozen=True)
class Layout:
    column: tuple[str, ...]  # Linear layers split by output rows (their bias too)
    row: tuple[str, ...]  # Linear layers split by input columns, all-reduced, bias added once
    head_attrs: tuple[str, ...]  # attention attributes that count heads (divided by N)
    ffn_key: str  # config key of the MLP width


_LLAMA = Layout(column=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),
                row=("o_proj", "down_proj"),
                head_attrs=("num_heads", "num_key_value_heads"), ffn_key="intermediate_size")
LAYOUTS = {
    "opt": Layout(column=("q_proj", "k_proj", "v_proj", "fc1"), row=("out_proj", "fc2"),
                  head_attrs=("num_heads",), ffn_key="ffn_dim"),
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
}


def check_supported(config: dict | object, size: int) -> None:
    """ValueError with the reason when an actor of this config cannot be split `size` ways."""
    get = (config.get if isinstance(config, dict) else
           lambda k, d=None: getattr(config, k, d))
    model_type = get("model_type")
    if model_type not in LAYOUTS:
        raise ValueError(f"tensor-parallel generation supports model types "
                         f"{', '.join(sorted(LAYOUTS))}; the actor is {model_type!r}")
    layout = LAYOUTS[model_type]
    heads = get("num_attention_heads")
    counts = {"attention heads": heads, "key/value heads": get("num_key_value_heads") or heads,
              layout.ffn_key: get(layout.ffn_key)}
    for what, n in counts.items():
        if not n or int(n) % size:
            raise ValueError(f"the actor's {what} ({n}) do not divide into {size} equal parts")
