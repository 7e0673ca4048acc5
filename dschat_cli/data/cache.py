"""Tokenised-data cache: one folder per key, written once, read by every rank.

    <cache_dir>/<sha256 of the key's canonical JSON>/      datasets.save_to_disk output + key.json
    <cache_dir>/<sha256>.lock                              fcntl.flock taken while building

The key holds everything that changes the data (source fingerprints, split, phase, seed,
tokenizer fingerprint, lengths, mask flags, sample caps, a format version). The first process to
take the lock builds and writes to a temporary folder in the same parent, then renames it into
place (atomic), so a reader never sees a half-written folder; the others block on the lock, then
load what it wrote. Every rank may call this at once, with no barrier: on a node-local cache each
node builds its own copy; on shared storage the rename keeps a race (e.g. NFS without working
flock) harmless, the loser discards its copy. Data is arrow + JSON, never pickle, so a cache
folder from elsewhere cannot run code.

Leftover `.<sha>.tmp-*` folders can only come from a killed build and may be deleted.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from dschat_cli.data._quiet import quiet_datasets

__all__ = ["cached_dataset", "cache_path", "key_digest", "tokenizer_fingerprint"]

_KEY_FILE = "dschat_key.json"


def _canonical_json(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def key_digest(key: dict) -> str:
    return hashlib.sha256(_canonical_json(key).encode()).hexdigest()


def cache_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    """The folder the dataset of `key` lives in (whether or not it exists yet)."""
    return Path(os.path.expanduser(str(cache_dir))) / key_digest(key)


def _complete(path: Path) -> bool:
    return (path / _KEY_FILE).is_file()


def _load(path: Path):
    import datasets

    return datasets.load_from_disk(str(path))


@quiet_datasets()
def cached_dataset(cache_dir: str | os.PathLike, key: dict, build: Callable[[], Any]):
    """Return the Dataset/DatasetDict of `key`, calling `build()` only if no process built it yet."""
    target = cache_path(cache_dir, key)
    if _complete(target):  # fast path, no lock: a complete folder never changes
        return _load(target)
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{target.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also on a crash
        if _complete(target):  # another process built it while we waited
            return _load(target)
        ds = build()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        try:
            ds.save_to_disk(str(tmp))
            (tmp / _KEY_FILE).write_text(json.dumps(key, indent=1, sort_keys=True, default=str))
            try:
                os.rename(tmp, target)
            except OSError:
                if not _complete(target):  # not a lost race: a real error
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return _load(target)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides how a tokenizer encodes: class, name, vocabulary and merges (the
    fast tokenizer's full JSON), special tokens and their ids, and the chat template."""
    h = hashlib.sha256()
    meta = {
        "class": type(tokenizer).__name__,
        "name_or_path": getattr(tokenizer, "name_or_path", ""),
        "special": {k: str(v) for k, v in (tokenizer.special_tokens_map or {}).items()},
        "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                tokenizer.unk_token_id],
        "chat_template": getattr(tokenizer, "chat_template", None),
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
        "added": sorted((str(k), int(v)) for k, v in tokenizer.get_added_vocab().items()),
    }
    h.update(_canonical_json(meta).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Truncation/padding are call-time settings transformers leaves on the backend.
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(_canonical_json(state).encode())
    else:
        h.update(_canonical_json(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()
