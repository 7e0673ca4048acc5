"""Step 3's data on each rank: the prompt loaders (training, held-out) and, when mixing the
unsupervised LM loss, an endless iterator over its blocks."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from dschat_cli.config.ppo import PPOConfig
from dschat_cli.dist import Dist
from dschat_cli.ui.console import console


@dataclass
class PromptLoaders:
    train: object  # DataLoader of left-padded prompt batches of --per-device-generation-batch-size
    sampler: object  # its DistributedSampler (set_epoch each epoch)
    heldout: object | None  # DataLoader over the held-out prompts (None: no held-out split)
    n_train: int
    n_heldout: int


def prompt_loaders(cfg: PPOConfig, dist: Dist, tokenizer) -> PromptLoaders:
    from torch.utils.data import DataLoader, DistributedSampler

    from dschat_cli.config.schema import ConfigError
    from dschat_cli.data.prompts import collate_prompts, prompt_datasets, prompt_drop_counts
    from dschat_cli.steps.checkpoint import own_generator

    with console.status("tokenising prompts"):
        train, heldout = prompt_datasets(cfg.data.as_data_options(), tokenizer,
                                         max_prompt_seq_len=cfg.data.max_prompt_seq_len,
                                         seed=cfg.seed)
    dropped = prompt_drop_counts(train).get("too_long", 0)
    if dropped:
        console.print(f"[warn]{dropped} training prompt(s) longer than --max-prompt-seq-len "
                      f"{cfg.data.max_prompt_seq_len} tokens dropped")
    batch = cfg.train.per_device_generation_batch_size
    collate = partial(collate_prompts, pad_token_id=tokenizer.pad_token_id)
    sampler = DistributedSampler(train, num_replicas=dist.world_size, rank=dist.rank,
                                 shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(train, batch_size=batch, sampler=sampler, collate_fn=collate,
                        drop_last=True, generator=own_generator())
    if len(loader) == 0:
        raise ConfigError("--per-device-generation-batch-size",
                          f"{batch} x {dist.world_size} GPU(s) is more than the {len(train)} "
                          "step-3 prompts; use a smaller batch")
    heldout_loader = DataLoader(
        heldout, batch_size=batch, collate_fn=collate, generator=own_generator(),
        sampler=DistributedSampler(heldout, num_replicas=dist.world_size, rank=dist.rank,
                                   shuffle=False)) if len(heldout) else None
    return PromptLoaders(train=loader, sampler=sampler, heldout=heldout_loader,
                         n_train=len(train), n_heldout=len(heldout))


def unsupervised_batches(cfg: PPOConfig, dist: Dist, tokenizer, block_size: int):
    """A Cycle (steps/checkpoint.py) over the unsupervised dataset's LM blocks (set its
    epoch and index to a checkpoint's position before the first batch); None without
    --unsupervised-dataset-name. Blocks of `block_size` tokens: the longest sequence step 3
    trains on, prompt + answer."""
    if not cfg.data.unsupervised_dataset_name:
        return None
    from torch.utils.data import DataLoader, DistributedSampler

    from dschat_cli.data.prompts import collate_lm_blocks, unsupervised_dataset
    from dschat_cli.steps.checkpoint import Cycle, own_generator

    blocks = unsupervised_dataset(cfg.data.unsupervised_dataset_name,
                                  cfg.data.unsupervised_dataset_config_name, tokenizer,
                                  block_size=block_size,
                                  seed=cfg.seed, cache_dir=cfg.data.data_cache_dir)
    loader = DataLoader(blocks, batch_size=cfg.train.per_device_training_batch_size,
                        sampler=DistributedSampler(blocks, num_replicas=dist.world_size,
                                                   rank=dist.rank, shuffle=True, seed=cfg.seed),
                        collate_fn=collate_lm_blocks, drop_last=True, generator=own_generator())
    return Cycle(loader)
