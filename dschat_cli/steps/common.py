"""Small building blocks the three steps share (no trainer hierarchy: each step reads top to
bottom and calls these)."""

from __future__ import annotations

import math
import random

import torch

from dschat_cli.dist import Dist
from dschat_cli.ui.console import console


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical initialisation of LoRA adapters and heads everywhere."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass


def move_batch(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def count_params(model) -> int:
    """Parameters of the model, counted once when tied; right under ZeRO-3 partitioning too."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += getattr(p, "ds_numel", p.numel())
    return total


def flops_per_token(model, n_params: int, seq_len: int, gradient_checkpointing: bool) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward 2N + backward 4N) plus attention
    scores 12 * layers * hidden * seq_len; x 4/3 with activation recomputation."""
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0) or 0
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0) or 0
    flops = 6 * n_params + 12 * layers * hidden * seq_len
    return flops * (4 / 3 if gradient_checkpointing else 1.0)


@torch.no_grad()
def eval_loss(engine, loader, dist: Dist) -> dict:
    """Token-weighted mean loss and perplexity over the eval loader, summed over ranks."""
    engine.eval()
    total, count = 0.0, 0
    for batch in loader:
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        out = engine(**batch, use_cache=False)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(out.loss) * n
        count += n
    engine.train()
    total = dist.all_reduce_sum(total)
    count = dist.all_reduce_sum(count)
    loss = total / count if count else float("nan")
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)) if count else float("nan")}


def print_summary(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
