"""Small building blocks the three steps share (no trainer hierarchy: each step reads top to
bottom and calls these)."""

from __future__ import annotations

import contextlib
import io
import math
import random
import re
import sys

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


@contextlib.contextmanager
def same_draws(seed: int, rank: int, batch: int):
    """Held-out answers sampled from random numbers fixed by (seed, rank, batch): the answers
    before and after training are drawn with the same noise (as are those of another run with
    this seed and the same held-out batches), so the change between the two measures the policy
    rather than the luck of the draw. The training's own random streams (CPU and the current
    GPU) go on afterwards as if nothing had been drawn."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((seed * 1_000_003 + rank * 10_007 + batch) % 2 ** 63)
        yield


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


def real_samples(dist: Dist, n_total: int, start: int, count: int) -> torch.Tensor:
    """(count,) bool: which of this rank's eval samples start..start+count-1 are real. The eval
    DistributedSampler repeats samples so every rank runs the same number of batches (ZeRO-3
    needs all ranks in every forward); rank r's k-th sample is padded position r + k * world, a
    repeat when that is >= n_total. Repeats get zero weight in eval sums."""
    k = torch.arange(start, start + count)
    return (dist.rank + k * dist.world_size) < n_total


@torch.no_grad()
def eval_loss(engine, loader, dist: Dist) -> dict:
    """Token-weighted mean loss and perplexity over the eval set, summed over ranks, each sample
    counted once."""
    import torch.nn.functional as F

    engine.eval()
    total, count, seen = 0.0, 0, 0
    n_total = len(loader.dataset)
    for batch in loader:
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                              reduction="none").view(labels.shape)
        keep = real_samples(dist, n_total, seen, labels.shape[0]).to(labels.device)
        seen += labels.shape[0]
        total += float(nll.sum(-1)[keep].sum())
        count += int((labels != -100).sum(-1)[keep].sum())
    engine.train()
    total = dist.all_reduce_sum(total)
    count = dist.all_reduce_sum(count)
    loss = total / count if count else float("nan")
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)) if count else float("nan")}


def print_summary(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, Text(v))  # values hold paths: never markup
    console.print(table)


def make_loaders(train_data, eval_data, collate, optim, dist: Dist, seed: int):
    """-> (train loader, its DistributedSampler (call set_epoch), eval loader). Every rank sees
    the same number of batches (ZeRO-3 needs all ranks in every forward)."""
    from torch.utils.data import DataLoader, DistributedSampler

    from dschat_cli.steps.checkpoint import own_generator

    sampler = DistributedSampler(train_data, num_replicas=dist.world_size, rank=dist.rank,
                                 shuffle=True, seed=seed)
    loader = DataLoader(train_data, batch_size=optim.per_device_train_batch_size, sampler=sampler,
                        collate_fn=collate, generator=own_generator())
    eval_loader = DataLoader(eval_data, batch_size=optim.per_device_eval_batch_size,
                             sampler=DistributedSampler(eval_data, num_replicas=dist.world_size,
                                                        rank=dist.rank, shuffle=False),
                             collate_fn=collate, generator=own_generator())
    return loader, sampler, eval_loader


def total_optimizer_steps(n_batches: int, optim) -> int:
    from dschat_cli.config.schedule import optimizer_steps  # shared with `dschat plan`

    return optimizer_steps(n_batches, optim)


def init_engine(model, groups: list[dict], ds_config: dict, optim, total_steps: int):
    """deepspeed.initialize with the optimizer from the DS config and transformers' scheduler."""
    from transformers import get_scheduler

    def scheduler(optimizer):
        return get_scheduler(optim.lr_scheduler_type, optimizer,
                             num_warmup_steps=optim.num_warmup_steps,
                             num_training_steps=total_steps)

    return ds_initialize(model=model, model_parameters=groups, config=ds_config,
                         lr_scheduler=scheduler)


# The memory report DeepSpeed prints to stdout, unasked, each time it builds a bf16 engine (its
# BF16_Optimizer calls see_memory_usage(..., force=True)): a label line, then allocator and host
# memory figures. The run log keeps every other line DeepSpeed prints.
_DS_MEMORY_REPORT = re.compile(r"^(begin bf16_optimizer|end bf16_ optimizer|"
                               r"(before|after) initializing group \d+|MA [\d.]+ GB\s.*|"
                               r"CPU Virtual Memory:.*)\s*$")


def ds_initialize(**kwargs):
    """deepspeed.initialize(**kwargs) -> the engine, without DeepSpeed's memory report lines."""
    import deepspeed

    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            engine, *_ = deepspeed.initialize(**kwargs)
    finally:
        kept = [ln for ln in captured.getvalue().splitlines() if not _DS_MEMORY_REPORT.match(ln)]
        if kept:
            print("\n".join(kept), file=sys.stdout, flush=True)
    return engine


def peak_memory_gib(dist: Dist) -> float | None:
    """The largest torch.cuda.max_memory_allocated() over the ranks, in GiB; None on CPU. Every
    rank must call it. `dschat plan` estimates this figure (benchmarks/plan_vs_peak.py compares)."""
    if not str(dist.device).startswith("cuda"):
        return None
    return dist.all_reduce_max(torch.cuda.max_memory_allocated(dist.device) / 2**30)


def write_summary_json(out, result: dict) -> None:
    """Rank 0, at the end of a run: OUT/train_summary.json, then the run's report (report.html
    and its plots, dschat_cli/report/). NaN (no eval set) is written as null: the file stays
    valid JSON. Both are replaced atomically; a report that fails warns in one line and the run
    goes on."""
    import json
    from pathlib import Path

    from dschat_cli.report import write_report_quietly
    from dschat_cli.report.records import write_atomic

    clean = json.loads(json.dumps(result), parse_constant=lambda _: None)
    write_atomic(Path(out) / "train_summary.json", json.dumps(clean, indent=2) + "\n")
    write_report_quietly(out)


class PhaseTimer:
    """Wall seconds per named phase: `with timer("generation"): ...`. Enabled, it synchronises the
    GPU at both ends of a phase (the cost of honest numbers: it stops overlap between phases);
    disabled, it does nothing. `dschat bench` turns it on."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        import contextlib
        import time

        if not self.enabled:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def phase():
            _sync()
            t0 = time.perf_counter()
            try:
                yield
            finally:
                _sync()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return phase()

    def reset(self) -> None:
        self.seconds = {}


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
