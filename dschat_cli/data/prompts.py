"""Step-3 data: prompts for PPO's generation, and the optional unsupervised (pre-training) blocks.

Prompts. One stored sample (no padding):
    prompt_input_ids  [L]  tokens of the prompt (L <= max_prompt_seq_len)
    source                 the --data-path value the row came from

Choices, with the reason:
- The prompt is tokenised as in steps 1 and 2 (sft.py): special tokens as the tokenizer adds them
  (e.g. Llama's BOS), no eos appended; an eos the tokenizer itself appends is removed, since the
  actor must continue the prompt, not see it end.
- Prompts longer than max_prompt_seq_len tokens are dropped, never truncated: a truncated prompt loses
  its " Assistant:" ending, so the actor would continue the question instead of answering it
  (DeepSpeed-Chat drops them too, PR #782). How many were dropped is recorded with the dataset
  (prompt_drop_counts), also when it comes from the cache.

Batches (collate_prompts) are left-padded to the longest prompt of the batch, so every prompt
ends at the last column and generation continues all of them from the same position (the
reference stores the tokens reversed, right-pads, then flips: the same layout, but to a fixed
max_prompt_seq_len). The attention mask comes from the lengths, never from comparing ids with
pad_token_id (pad may equal eos or bos). Mask convention of this project: 1 = real token.

Unsupervised data (PPO's optional mixed LM loss, `--unsupervised-dataset-name`): the train split's
"text" column, each document tokenised as the tokenizer does (special tokens it adds kept), the
documents joined with one eos between them, then cut into blocks of exactly block_size tokens
(the reference's group_texts; block_size = max_prompt_seq_len + max_answer_seq_len there). The
tail shorter than a block is dropped. Empty and whitespace-only documents are skipped (wikitext
has many blank lines; each would add a stray eos). A .txt file holds one document per line, as
datasets' "text" loader reads it. With max_samples, reading stops as soon as that many blocks are
filled (no need to tokenise all of a large corpus for a smoke run). The blocks are then put in a
seeded random order (split.permutation), so a sequential reader does not get one document's
consecutive blocks. Batches (collate_lm_blocks) need no padding: labels = input_ids (the model
shifts them).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from dschat_cli import hub
from dschat_cli.config.schema import ConfigError
from dschat_cli.config.sections import DataOptions, parse_split
from dschat_cli.data import sources as _src
from dschat_cli.data._quiet import quiet_datasets
from dschat_cli.data.cache import cached_dataset, tokenizer_fingerprint
from dschat_cli.data.prepare import load_phase_rows
from dschat_cli.data.sft import FORMAT_VERSION
from dschat_cli.data.sources import source_fingerprint
from dschat_cli.data.split import permutation

__all__ = ["tokenize_prompts", "collate_prompts", "prompt_datasets", "prompt_cache_key",
           "prompt_drop_counts", "unsupervised_dataset", "unsupervised_cache_key",
           "unsupervised_counts", "collate_lm_blocks", "UNSUPERVISED_EXTENSIONS",
           "check_unsupervised_source"]

_COUNTS_TAG = "dschat-prompt-counts:"
_UNSUP_TAG = "dschat-unsupervised-counts:"
_UNSUP_FLAG = "--unsupervised-dataset-name"
UNSUPERVISED_EXTENSIONS = (".txt", ".json", ".jsonl", ".parquet")
_TEXT = "text"
_BATCH = 1000


# ---------------------------------------------------------------- prompts

def _prompt_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt: special tokens as the tokenizer adds them, minus a trailing eos."""
    eos = tokenizer.eos_token_id
    out = []
    for ids in tokenizer(list(prompts), verbose=False)["input_ids"]:
        ids = list(ids)
        if eos is not None and len(ids) > 1 and ids[-1] == eos:
            ids.pop()
        out.append(ids)
    return out


def tokenize_prompts(batch: dict[str, list], tokenizer, max_prompt_seq_len: int) -> dict[str, list]:
    """Batched map function: {prompt, source?, ...} -> {prompt_input_ids, source?}. Drops prompts
    longer than max_prompt_seq_len tokens (the number dropped is the rows in minus the rows out)."""
    out: dict[str, list] = {"prompt_input_ids": []}
    sources = batch.get("source")
    if sources is not None:
        out["source"] = []
    for i, ids in enumerate(_prompt_ids(tokenizer, batch["prompt"])):
        if len(ids) > max_prompt_seq_len:
            continue
        out["prompt_input_ids"].append(ids)
        if sources is not None:
            out["source"].append(sources[i])
    return out


def collate_prompts(features: Sequence[dict[str, Any]], pad_token_id: int,
                    pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """Left-pad a list of prompts: input_ids [B, P] (pad_token_id in front, each prompt's last
    token in column P-1), attention_mask [B, P] (1 real, 0 pad). P = longest prompt, rounded up
    to pad_to_multiple_of if given."""
    import torch

    if pad_token_id is None:
        raise ValueError("collate_prompts needs a pad_token_id (use eos when the tokenizer has "
                         "no pad)")
    seqs = [f["prompt_input_ids"] if "prompt_input_ids" in f else f["input_ids"] for f in features]
    lengths = [len(s) for s in seqs]
    width = max(lengths, default=0)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(seqs), width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        if n:
            input_ids[i, width - n:] = torch.as_tensor(s, dtype=torch.long)
            attention_mask[i, width - n:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def prompt_cache_key(data: DataOptions, tokenizer, *, max_prompt_seq_len: int, seed: int) -> dict:
    """Everything that changes step 3's tokenised prompts (--sft-only-data-path and --max-seq-len
    do not: the first feeds step 1 only, the second is replaced by max_prompt_seq_len)."""
    return {
        "format": FORMAT_VERSION,
        "kind": "prompts",
        "phase": 3,
        "sources": [[n, source_fingerprint(n, data.data_dir)] for n in data.data_path],
        "split": list(parse_split(data.data_split)),
        "seed": seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_prompt_seq_len": max_prompt_seq_len,
        "max_train_samples": data.max_train_samples,
        "max_eval_samples": data.max_eval_samples,
    }


def _read_counts(ds, tag: str) -> dict[str, int]:
    desc = getattr(getattr(ds, "info", None), "description", None) or ""
    if not desc.startswith(tag):
        return {}
    return json.loads(desc[len(tag):])


def prompt_drop_counts(ds) -> dict[str, int]:
    """What prompt_datasets dropped from this set: {"rows": phase rows read, "too_long": prompts
    longer than max_prompt_seq_len tokens, "kept": len}. Empty for a dataset it did not build."""
    return _read_counts(ds, _COUNTS_TAG)


def _tokenize_set(rows, tokenizer, max_prompt_seq_len: int):
    from datasets import Features, Sequence as Seq, Value

    features = Features({"prompt_input_ids": Seq(Value("int32"))})
    if "source" in rows.column_names:
        features["source"] = Value("string")
    ds = rows.map(tokenize_prompts, batched=True, batch_size=_BATCH,
                  remove_columns=rows.column_names, features=features, keep_in_memory=True,
                  load_from_cache_file=False,
                  fn_kwargs={"tokenizer": tokenizer, "max_prompt_seq_len": max_prompt_seq_len},
                  desc="Tokenising (step 3)")
    counts = {"rows": len(rows), "too_long": len(rows) - len(ds), "kept": len(ds)}
    ds.info.description = _COUNTS_TAG + json.dumps(counts, sort_keys=True)
    return ds


def _shortest_prompt(rows, tokenizer) -> int:
    shortest = None
    for start in range(0, len(rows), _BATCH):
        part = rows.select(range(start, min(start + _BATCH, len(rows))))["prompt"]
        n = min(len(ids) for ids in _prompt_ids(tokenizer, part))
        shortest = n if shortest is None else min(shortest, n)
    return shortest or 0


def prompt_datasets(data: DataOptions, tokenizer, *, max_prompt_seq_len: int,
                    seed: int) -> tuple[Any, Any]:
    """Step 3's (train, eval) datasets of {prompt_input_ids, source}, tokenised and cached under
    data.data_cache_dir. Safe to call from every rank at once (see cache.py).
    prompt_drop_counts(train) tells how many prompts were too long."""
    from datasets import DatasetDict

    if max_prompt_seq_len < 1:
        raise ConfigError("--max-prompt-seq-len", f"must be >= 1, got {max_prompt_seq_len}")

    def build():
        train, eval_ = load_phase_rows(data, 3, seed)  # raises --data-split if step 3 has no rows
        train_t = _tokenize_set(train, tokenizer, max_prompt_seq_len)
        if len(train_t) == 0:
            raise ConfigError("--max-prompt-seq-len", f"all {len(train)} step-3 prompts are longer "
                              f"than {max_prompt_seq_len} tokens (the shortest has "
                              f"{_shortest_prompt(train, tokenizer)}); raise --max-prompt-seq-len "
                              "or use a source with shorter prompts")
        return DatasetDict({"train": train_t,
                            "eval": _tokenize_set(eval_, tokenizer, max_prompt_seq_len)})

    key = prompt_cache_key(data, tokenizer, max_prompt_seq_len=max_prompt_seq_len, seed=seed)
    dd = cached_dataset(data.data_cache_dir, key, build)
    return dd["train"], dd["eval"]


# ---------------------------------------------------------------- unsupervised data

def _resolve_unsup(name: str) -> tuple[str, Path | None]:
    """("hub", None) | ("folder", path) | ("file", path)."""
    if not name or not name.strip():
        raise ConfigError(_UNSUP_FLAG, "empty name; give a hub dataset name or a local file or "
                          "folder")
    p = Path(name).expanduser()
    if p.exists():
        if p.is_dir():
            return "folder", p
        if p.suffix.lower() not in UNSUPERVISED_EXTENSIONS:
            raise ConfigError(_UNSUP_FLAG, f"{p}: unsupported file type '{p.suffix}'; use a .txt "
                              "(one document per line), .json, .jsonl or .parquet file (with a "
                              "'text' column), or a folder saved with save_to_disk")
        return "file", p
    if _src._looks_like_path(name):
        raise ConfigError(_UNSUP_FLAG, f"no such file or folder: {p}")
    return "hub", None


def _local_fingerprint(path: Path) -> str:
    """Resolved path, size and mtime_ns of every file read (editing a file changes it)."""
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def unsupervised_cache_key(name: str, config_name: str | None, tokenizer, *, block_size: int,
                           seed: int, max_samples: int = 0) -> dict:
    """Everything that changes the unsupervised blocks. Hub datasets are keyed by name and config
    alone (delete the cache folder to force a rebuild after a hub update)."""
    kind, path = _resolve_unsup(name)
    if kind == "hub":
        source = f"hub:{name}:{config_name or ''}"
    else:
        source = f"local:{kind}:{_local_fingerprint(path)}"
    return {
        "format": FORMAT_VERSION,
        "kind": "unsupervised",
        "source": source,
        "seed": seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "block_size": block_size,
        "max_samples": max_samples,
    }


def unsupervised_counts(ds) -> dict[str, int]:
    """What unsupervised_dataset read: {"documents": non-empty documents tokenised, "tokens": in
    the joined stream, "blocks": len}. Empty for a dataset it did not build."""
    return _read_counts(ds, _UNSUP_TAG)


def _load_hub_train(name: str, config_name: str | None):
    """The train split of a hub dataset; without network only the local HF cache is tried and a
    miss fails at once (sources.py's offline logic)."""
    import datasets

    args = (name, config_name) if config_name else (name,)
    label = f"'{name}'" + (f" (config '{config_name}')" if config_name else "")
    env_offline = hub.offline_variable() is not None
    if not env_offline and hub.reachable():
        try:
            return datasets.load_dataset(*args, split="train")
        except Exception as e:
            raise ConfigError(_UNSUP_FLAG, f"cannot load the train split of hub dataset {label} "
                              f"({_src._one_line(e)})") from None
    try:
        with _src._offline_mode():
            return datasets.load_dataset(*args, split="train")
    except Exception:
        why = "HF_HUB_OFFLINE is set" if env_offline else "huggingface.co unreachable"
        call = ", ".join(repr(a) for a in args)
        raise ConfigError(_UNSUP_FLAG, f"cannot load hub dataset {label}: no network and not in "
                          f"the local cache ({why}); pass a local .txt/.json/.jsonl/.parquet file "
                          "or a folder saved with save_to_disk (on a machine with network: "
                          f"datasets.load_dataset({call}, split='train').save_to_disk('DIR'))"
                          ) from None


def _text_column(ds, where: str):
    if _TEXT not in ds.column_names:
        raise ConfigError(where, f"has no '{_TEXT}' column (found: {', '.join(ds.column_names)}); "
                          "unsupervised data needs one document per row in a 'text' column")
    dtype = getattr(ds.features[_TEXT], "dtype", None)
    if dtype not in ("string", "large_string", "null"):
        raise ConfigError(where, f"column '{_TEXT}' must hold text, not {ds.features[_TEXT]}")
    return ds.select_columns([_TEXT])


def _dataset_batches(ds) -> Iterator[list]:
    for batch in ds.iter(batch_size=_BATCH):
        yield batch[_TEXT]


def _list_batches(texts: list) -> Iterator[list]:
    for start in range(0, len(texts), _BATCH):
        yield texts[start:start + _BATCH]


def _json_texts(path: Path) -> list:
    where = str(path)
    rows = _src.read_json_rows(path, expected=f"a '{_TEXT}' field")
    if rows and isinstance(rows[0], dict) and not any(
            isinstance(r, dict) and _TEXT in r for r in rows):
        raise ConfigError(where, f"has no '{_TEXT}' column (found: {', '.join(rows[0])}); "
                          "unsupervised data needs one document per row in a 'text' field")
    texts = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or _TEXT not in r:
            raise ConfigError(where, f"row {i} has no '{_TEXT}' field; every row needs one")
        v = r[_TEXT]
        if v is not None and not isinstance(v, str):
            raise ConfigError(where, f"row {i}: '{_TEXT}' must be text, got {type(v).__name__}")
        texts.append(v)
    return texts


def _load_saved_train(path: Path):
    import datasets

    where = str(path)
    try:
        obj = datasets.load_from_disk(where)
    except Exception as e:  # not a save_to_disk folder, or corrupt
        raise ConfigError(where, f"cannot be read with load_from_disk ({_src._one_line(e)}); "
                          "save it with Dataset.save_to_disk, or pass a .txt/.json/.jsonl/.parquet "
                          "file") from None
    if isinstance(obj, datasets.DatasetDict):
        if "train" not in obj:
            raise ConfigError(where, f"holds splits {', '.join(obj)} but no 'train'")
        obj = obj["train"]
    return obj


def _text_batches(name: str, config_name: str | None) -> Iterable[list]:
    kind, path = _resolve_unsup(name)
    if kind == "hub":
        return _dataset_batches(_text_column(_load_hub_train(name, config_name), _UNSUP_FLAG))
    if kind == "folder":
        return _dataset_batches(_text_column(_load_saved_train(path), str(path)))
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _dataset_batches(_text_column(_src._read_parquet(path), str(path)))
    if suffix == ".txt":
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise ConfigError(str(path), f"is not UTF-8 text (invalid byte at offset {e.start}); "
                              "save it as UTF-8") from None
        return _list_batches(lines)
    return _list_batches(_json_texts(path))


def check_unsupervised_source(name: str, config_name: str | None) -> None:
    """User side, before launch: the unsupervised source exists, reads as text and has a document
    (stops at the first one; the workers tokenise it)."""
    if not any(t and t.strip() for batch in _text_batches(name, config_name) for t in batch):
        raise ConfigError(_UNSUP_FLAG, f"'{name}' holds no text; unsupervised data needs "
                          "documents in a 'text' column (or lines of a .txt file)")


def _token_stream(batches: Iterable[list], tokenizer, need: int) -> tuple[Any, int]:
    """(int32 tokens of the documents joined by eos, documents read). Stops once `need` tokens
    are read (need=0: read all)."""
    import numpy as np

    eos = tokenizer.eos_token_id
    parts, total, docs, complete = [], 0, 0, True
    for texts in batches:
        texts = [t for t in texts if t is not None and t.strip()]
        if not texts:
            continue
        for ids in tokenizer(texts, verbose=False)["input_ids"]:
            if not ids:
                continue
            ids = list(ids)
            if ids[-1] != eos:
                ids.append(eos)
            parts.append(np.asarray(ids, dtype=np.int32))
            total += len(ids)
            docs += 1
        if need and total >= need:
            complete = False
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    if complete and stream.size:  # eos goes between documents, not after the last
        stream = stream[:-1]
    return stream, docs


@quiet_datasets()
def unsupervised_dataset(name: str, config_name: str | None, tokenizer, *, block_size: int,
                         seed: int, cache_dir: str, max_samples: int = 0):
    """A Dataset of {input_ids: block_size int32 tokens} from the train split's 'text' column of
    `name`: a hub dataset (with `config_name`), or a local .txt/.json/.jsonl/.parquet file or
    save_to_disk folder (config_name unused). Cached under cache_dir; safe to call from every rank
    at once. With max_samples > 0, at most that many blocks (the first of the stream)."""
    import datasets
    import numpy as np
    import pyarrow as pa

    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if tokenizer.eos_token_id is None:
        raise ConfigError("--tokenizer", f"the tokenizer of {tokenizer.name_or_path!r} has no eos "
                          "token; unsupervised data puts one between documents")

    def build():
        need = max_samples * block_size if max_samples else 0
        stream, docs = _token_stream(_text_batches(name, config_name), tokenizer, need)
        n = len(stream) // block_size
        if max_samples:
            n = min(n, max_samples)
        if n == 0:
            raise ConfigError(_UNSUP_FLAG, f"'{name}' gives {len(stream)} tokens ({docs} non-empty "
                              f"documents), fewer than one block of {block_size} (= "
                              "--max-prompt-seq-len + --max-answer-seq-len); use more text")
        blocks = stream[:n * block_size].reshape(n, block_size)[permutation(n, seed)]
        arr = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(blocks).ravel()),
                                                block_size)
        ds = datasets.Dataset(pa.table({"input_ids": arr}))
        counts = {"documents": docs, "tokens": int(len(stream)), "blocks": n}
        ds.info.description = _UNSUP_TAG + json.dumps(counts, sort_keys=True)
        return ds

    key = unsupervised_cache_key(name, config_name, tokenizer, block_size=block_size, seed=seed,
                                 max_samples=max_samples)
    return cached_dataset(cache_dir, key, build)


def collate_lm_blocks(features: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack equal-length blocks: input_ids [B, T], attention_mask [B, T] (all 1), labels [B, T]
    (= input_ids; the model shifts them)."""
    import torch

    lengths = {len(f["input_ids"]) for f in features}
    if len(lengths) > 1:
        raise ValueError(f"collate_lm_blocks needs blocks of one length, got {sorted(lengths)}")
    input_ids = torch.as_tensor([list(f["input_ids"]) for f in features], dtype=torch.long)
    if input_ids.dim() != 2:
        input_ids = input_ids.reshape(len(features), 0)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "labels": input_ids.clone()}
