"""Step-2 data: chosen/rejected pairs, tokenised once and cached; a collate that stacks the pairs.

One stored sample (no padding):
    chosen_input_ids    [Lc]  tokens of prompt + chosen, then eos     (Lc <= max_seq_len)
    rejected_input_ids  [Lr]  tokens of prompt + rejected, then eos   (Lr <= max_seq_len)
    source                    the --data-path value the row came from

Choices, with the reason:
- Each side is tokenised as one string (prompt + answer), exactly as step 1 does (sft.py): special
  tokens as the tokenizer adds them, the eos appended as an id unless the tokenizer already ends
  with it (the reference appended the text "<|endoftext|>", which most tokenizers split).
- Truncation keeps the beginning; a truncated side keeps no eos (as in step 1).
- Rows without a rejected answer (None or "") are dropped: they teach a reward model nothing. If
  no training row of step 2 has one, the source is SFT-only and reward_datasets says so.
- Pairs whose two token sequences are identical (after truncation) are dropped too: the pairwise
  loss has nothing to compare. How many rows were dropped, and why, is recorded with the dataset
  (pair_drop_counts), also when it comes from the cache.

Batches (collate_pairs) are [chosen rows; rejected rows], all right-padded to one width, as
DeepSpeed-Chat's DataCollatorReward stacks them, so the reward model runs one forward pass per
batch. The attention mask comes from the lengths, never from comparing ids with pad_token_id (pad
may equal eos or bos). Mask convention of this project: 1 = real token.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Sequence

from dschat_cli.config.schema import ConfigError
from dschat_cli.config.sections import DataOptions, parse_split
from dschat_cli.data.cache import cached_dataset, tokenizer_fingerprint
from dschat_cli.data.prepare import load_phase_rows
from dschat_cli.data.sft import FORMAT_VERSION
from dschat_cli.data.sources import source_fingerprint

__all__ = ["tokenize_pairs", "collate_pairs", "reward_datasets", "reward_cache_key",
           "pair_drop_counts"]

_COUNTS_TAG = "dschat-reward-counts:"


def _has_rejected(text: str | None) -> bool:
    return text is not None and text != ""


def _with_eos(ids: Sequence[int], eos: int, max_seq_len: int) -> list[int]:
    ids = list(ids)
    if not ids or ids[-1] != eos:
        ids.append(eos)
    return ids[:max_seq_len]


def tokenize_pairs(batch: dict[str, list], tokenizer, max_seq_len: int) -> dict[str, list]:
    """Batched map function: {prompt, chosen, rejected, source?} ->
    {chosen_input_ids, rejected_input_ids, source?}. Drops rows without a rejected answer and rows
    whose two token sequences are identical."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("--tokenizer", f"the tokenizer of {tokenizer.name_or_path!r} has no eos "
                          "token; step 2 appends one to mark where each answer ends")
    prompts, chosen = batch["prompt"], batch["chosen"]
    rejected = batch.get("rejected") or [None] * len(prompts)
    sources = batch.get("source")
    keep = [i for i, r in enumerate(rejected) if _has_rejected(r)]
    texts = ([prompts[i] + chosen[i] for i in keep] + [prompts[i] + rejected[i] for i in keep])
    enc = tokenizer(texts)["input_ids"] if texts else []
    out: dict[str, list] = {"chosen_input_ids": [], "rejected_input_ids": []}
    if sources is not None:
        out["source"] = []
    n = len(keep)
    for j, i in enumerate(keep):
        c = _with_eos(enc[j], eos, max_seq_len)
        r = _with_eos(enc[n + j], eos, max_seq_len)
        if c == r:  # nothing to learn from this pair
            continue
        out["chosen_input_ids"].append(c)
        out["rejected_input_ids"].append(r)
        if sources is not None:
            out["source"].append(sources[i])
    return out


def collate_pairs(features: Sequence[dict[str, Any]], pad_token_id: int,
                  pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """B pairs -> input_ids [2B, T] (rows 0..B-1 chosen, B..2B-1 rejected of the same pairs),
    attention_mask [2B, T] (1 real, 0 pad), all right-padded with pad_token_id to the longest of
    both sides (rounded up to pad_to_multiple_of if given)."""
    import torch

    if pad_token_id is None:
        raise ValueError("collate_pairs needs a pad_token_id (use eos when the tokenizer has "
                         "no pad)")
    seqs = ([f["chosen_input_ids"] for f in features]
            + [f["rejected_input_ids"] for f in features])
    lengths = [len(s) for s in seqs]
    width = max(lengths, default=0)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(seqs), width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        input_ids[i, :n] = torch.as_tensor(s, dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def reward_cache_key(data: DataOptions, tokenizer, *, seed: int) -> dict:
    """Everything that changes step 2's tokenised data (--sft-only-data-path does not: it feeds
    step 1 only)."""
    return {
        "format": FORMAT_VERSION,
        "kind": "reward",
        "phase": 2,
        "sources": [[n, source_fingerprint(n, data.data_dir)] for n in data.data_path],
        "split": list(parse_split(data.data_split)),
        "seed": seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_seq_len": data.max_seq_len,
        "max_train_samples": data.max_train_samples,
        "max_eval_samples": data.max_eval_samples,
    }


def pair_drop_counts(ds) -> dict[str, int]:
    """What reward_datasets dropped from this set: {"rows": phase rows read, "no_rejected": rows
    without a rejected answer, "identical": pairs with identical token sequences, "kept": len}.
    Empty for a dataset that reward_datasets did not build."""
    desc = getattr(getattr(ds, "info", None), "description", None) or ""
    if not desc.startswith(_COUNTS_TAG):
        return {}
    return json.loads(desc[len(_COUNTS_TAG):])


def _tokenize_set(rows, tokenizer, max_seq_len: int, n_no_rejected: int):
    from datasets import Features, Sequence as Seq, Value

    features = Features({"chosen_input_ids": Seq(Value("int32")),
                         "rejected_input_ids": Seq(Value("int32"))})
    if "source" in rows.column_names:
        features["source"] = Value("string")
    ds = rows.map(tokenize_pairs, batched=True, batch_size=1000, remove_columns=rows.column_names,
                  features=features, keep_in_memory=True, load_from_cache_file=False,
                  fn_kwargs={"tokenizer": tokenizer, "max_seq_len": max_seq_len},
                  desc="Tokenising (step 2)")
    counts = {"rows": len(rows), "no_rejected": n_no_rejected,
              "identical": len(rows) - n_no_rejected - len(ds), "kept": len(ds)}
    ds.info.description = _COUNTS_TAG + json.dumps(counts, sort_keys=True)
    return ds


def _no_rejected(rows) -> tuple[int, Counter, Counter]:
    """(rows without a rejected answer, rows per source, pairs per source)."""
    rejected = rows["rejected"] if "rejected" in rows.column_names else [None] * len(rows)
    sources = rows["source"] if "source" in rows.column_names else [""] * len(rows)
    per_source, pairs = Counter(sources), Counter()
    missing = 0
    for r, s in zip(rejected, sources):
        if _has_rejected(r):
            pairs[s] += 1
        else:
            missing += 1
    return missing, per_source, pairs


def reward_datasets(data: DataOptions, tokenizer, *, seed: int) -> tuple[Any, Any]:
    """Step 2's (train, eval) datasets of {chosen_input_ids, rejected_input_ids, source},
    tokenised and cached under data.data_cache_dir. Safe to call from every rank at once (see
    cache.py). pair_drop_counts(train) tells what was dropped."""
    from datasets import DatasetDict

    def build():
        train, eval_ = load_phase_rows(data, 2, seed)
        missing, per_source, pairs = _no_rejected(train)
        if missing == len(train):
            without = [s for s in per_source if pairs[s] == 0]
            raise ConfigError("--data-path", f"{', '.join(without) or ', '.join(data.data_path)} "
                              "has no chosen/rejected pairs for step 2 (SFT-only source?): no "
                              "step-2 training row has a 'rejected' answer. Pass a pairwise "
                              "source (e.g. Dahoas/rm-static), or rows with 'rejected'")
        train_t = _tokenize_set(train, tokenizer, data.max_seq_len, missing)
        if len(train_t) == 0:
            raise ConfigError("--max-seq-len", "every chosen/rejected pair of step 2 is "
                              f"identical in its first --max-seq-len {data.max_seq_len} tokens "
                              "(long prompts, or identical answers); raise it or check the data")
        eval_t = _tokenize_set(eval_, tokenizer, data.max_seq_len, _no_rejected(eval_)[0])
        return DatasetDict({"train": train_t, "eval": eval_t})

    key = reward_cache_key(data, tokenizer, seed=seed)
    dd = cached_dataset(data.data_cache_dir, key, build)
    return dd["train"], dd["eval"]


def encode_answer(tokenizer, prompt: str, answer: str, max_seq_len: int) -> list[int]:
    """One side of a pair, tokenised exactly as for training (for scoring single answers)."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("--path", "the reward model's tokenizer has no eos token")
    return _with_eos(tokenizer(prompt + answer)["input_ids"], tokenizer.eos_token_id, max_seq_len)
