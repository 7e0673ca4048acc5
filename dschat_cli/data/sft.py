"""Step-1 data: prompt + chosen + eos, tokenised once and cached; a collate that pads per batch.

One stored sample (no padding):
    input_ids  [L]   tokens of prompt + chosen, then eos          (L <= max_seq_len)
    labels     [L]   = input_ids, with -100 on the prompt tokens when mask_prompt
The model shifts labels itself (HF causal LMs), so labels align with input_ids.

Choices, with the reason:
- The text is tokenised as one string (prompt + chosen, special tokens as the tokenizer adds them,
  e.g. Llama's BOS) and the prompt/answer boundary found from the character offsets, so the tokens
  are exactly those the model sees at generation time. A token that straddles the boundary counts
  as answer. Tokenizers without offsets (slow ones) count the tokens of the prompt alone.
- The eos is appended as an id (not as text, which the reference did with "<|endoftext|>", a
  string most tokenizers split into pieces), unless the tokenizer already ends with it.
- Truncation keeps the beginning. A truncated sample loses its eos: an answer cut mid-way must not
  teach the model to stop there.
- A sample with no answer token left after truncation is dropped, masked or not (it would teach
  nothing but the prompt).
- mask_prompt=False is DeepSpeed-Chat's behaviour (loss on prompt and answer).

Batches (collate_sft) are right-padded to the longest sample; the attention mask comes from the
lengths, never from comparing ids with pad_token_id (pad may equal eos). Mask convention of this
project: 1/True = real token.
"""

from __future__ import annotations

from typing import Any, Sequence

from dschat_cli.config.schema import ConfigError
from dschat_cli.config.sections import DataOptions, parse_split
from dschat_cli.data.cache import cached_dataset, tokenizer_fingerprint
from dschat_cli.data.prepare import load_phase_rows
from dschat_cli.data.sources import source_fingerprint

__all__ = ["FORMAT_VERSION", "IGNORE_INDEX", "tokenize_sft", "collate_sft", "sft_datasets",
           "sft_cache_key"]

# Bump when the stored format or anything that produces it (mappings, split, tokenisation)
# changes, so old cache folders are not reused.
FORMAT_VERSION = 1
IGNORE_INDEX = -100


def _prompt_token_count(offsets: Sequence[tuple[int, int]], prompt_chars: int) -> int:
    """Tokens before the first token that reaches into the answer. Special tokens have the empty
    span (0, 0) and never end the prompt (a leading BOS belongs to it)."""
    for i, (start, end) in enumerate(offsets):
        if end > start and end > prompt_chars:
            return i
    return len(offsets)


def tokenize_sft(batch: dict[str, list], tokenizer, max_seq_len: int,
                 mask_prompt: bool) -> dict[str, list]:
    """Batched map function: {prompt, chosen, source?} -> {input_ids, labels, source?}."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("--tokenizer", f"the tokenizer of {tokenizer.name_or_path!r} has no eos "
                          "token; SFT appends one so the model learns to stop")
    prompts, chosen = batch["prompt"], batch["chosen"]
    texts = [p + c for p, c in zip(prompts, chosen)]
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, return_offsets_mapping=True)
        n_prompts = [_prompt_token_count(offs, len(p)) for offs, p in zip(enc["offset_mapping"], prompts)]
    else:
        enc = tokenizer(texts)
        n_prompts = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    out: dict[str, list] = {"input_ids": [], "labels": []}
    sources = batch.get("source")
    if sources is not None:
        out["source"] = []
    for i, (ids, n_prompt) in enumerate(zip(enc["input_ids"], n_prompts)):
        ids = list(ids)
        if not ids or ids[-1] != eos:
            ids.append(eos)
        ids = ids[:max_seq_len]
        if n_prompt >= len(ids):  # no answer token left
            continue
        labels = ([IGNORE_INDEX] * n_prompt + ids[n_prompt:]) if mask_prompt else list(ids)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        if sources is not None:
            out["source"].append(sources[i])
    return out


def collate_sft(features: Sequence[dict[str, Any]], pad_token_id: int,
                pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """Right-pad a list of samples: input_ids [B, T] (pad_token_id), attention_mask [B, T]
    (1 real, 0 pad), labels [B, T] (-100 on pads). T = longest sample, rounded up to
    pad_to_multiple_of if given."""
    import torch

    if pad_token_id is None:
        raise ValueError("collate_sft needs a pad_token_id (use eos when the tokenizer has no pad)")
    lengths = [len(f["input_ids"]) for f in features]
    width = max(lengths, default=0)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    b = len(features)
    input_ids = torch.full((b, width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    for i, (f, n) in enumerate(zip(features, lengths)):
        input_ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sft_cache_key(data: DataOptions, tokenizer, *, mask_prompt: bool, seed: int) -> dict:
    """Everything that changes step 1's tokenised data."""
    return {
        "format": FORMAT_VERSION,
        "kind": "sft",
        "phase": 1,
        "sources": [[n, source_fingerprint(n, data.data_dir)] for n in data.data_path],
        "sft_only": [[n, source_fingerprint(n, data.data_dir, flag="--sft-only-data-path")]
                     for n in data.sft_only_data_path],
        "split": list(parse_split(data.data_split)),
        "seed": seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_seq_len": data.max_seq_len,
        "mask_prompt": mask_prompt,
        "max_train_samples": data.max_train_samples,
        "max_eval_samples": data.max_eval_samples,
    }


def _tokenize_set(rows, tokenizer, max_seq_len: int, mask_prompt: bool):
    from datasets import Features, Sequence as Seq, Value

    features = Features({"input_ids": Seq(Value("int32")), "labels": Seq(Value("int32"))})
    if "source" in rows.column_names:
        features["source"] = Value("string")
    return rows.map(tokenize_sft, batched=True, batch_size=1000, remove_columns=rows.column_names,
                    features=features, keep_in_memory=True, load_from_cache_file=False,
                    fn_kwargs={"tokenizer": tokenizer, "max_seq_len": max_seq_len,
                               "mask_prompt": mask_prompt},
                    desc="Tokenising (step 1)")


def sft_datasets(data: DataOptions, tokenizer, *, mask_prompt: bool, seed: int) -> tuple[Any, Any]:
    """Step 1's (train, eval) datasets of {input_ids, labels, source}, tokenised and cached under
    data.data_cache_dir. Safe to call from every rank at once (see cache.py)."""
    from datasets import DatasetDict

    def build():
        train, eval_ = load_phase_rows(data, 1, seed)
        train = _tokenize_set(train, tokenizer, data.max_seq_len, mask_prompt)
        if len(train) == 0:
            raise ConfigError("--max-seq-len", f"every training sample's prompt fills "
                              f"--max-seq-len {data.max_seq_len} tokens; raise it")
        return DatasetDict({"train": train,
                            "eval": _tokenize_set(eval_, tokenizer, data.max_seq_len, mask_prompt)})

    key = sft_cache_key(data, tokenizer, mask_prompt=mask_prompt, seed=seed)
    dd = cached_dataset(data.data_cache_dir, key, build)
    return dd["train"], dd["eval"]
