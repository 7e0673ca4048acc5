"""Data sources -> canonical rows {prompt, chosen, rejected}.

Canonical text format (DeepSpeed-Chat's): prompt = " Human: {q} Assistant:", chosen/rejected =
" {answer}"; `rejected` is None where a source has no rejected answer (SFT-only sources, or a row
without a usable pair). prompt + chosen is the text the actor learns in step 1.

A `--data-path` value is one of:
- a named hub source of the reference (NAMED_SOURCES), mapped with its exact column mapping;
- `local/jsonfile` with `--data-dir DIR` holding train.json (and eval.json; without it, eval is
  carved out of train);
- a folder saved with `datasets.save_to_disk` (a Dataset, or a DatasetDict with train and
  test/eval/validation), or a folder holding train.json/train.jsonl (+ eval.json/eval.jsonl);
- a .json (list of objects, or one object per line), .jsonl or .parquet file (-> train; eval
  carved out, seeded).
Local rows need `prompt` and `chosen` (`rejected` optional) and are used as written, except that a
leading space is added where missing (the reference's local/jsonfile prepends " " to each field,
so its files, written as "Human: ... Assistant:", keep working). A local path that contains a named
source's name (e.g. /data/Dahoas/synthetic-instruct-gptj-pairwise, saved from the hub) and has that
source's columns gets that source's mapping, as in the reference (which matched names by
substring).

Where a source has no eval split, eval is carved out of train with the reference's seeded 9:1
split (see split.carve_indices).

Hub names never hang without network: with HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set, or when a 3 s
socket probe of the hub fails (dschat_cli/hub.py: once per run, on the user's side), only the local
Hugging Face cache is tried (offline mode), and a miss raises ConfigError at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from dschat_cli import hub
from dschat_cli.config.schema import ConfigError
from dschat_cli.data._quiet import quiet_datasets
from dschat_cli.data.split import carve_indices

__all__ = ["NAMED_SOURCES", "NamedSource", "load_source", "source_fingerprint", "format_prompt",
           "CANONICAL_COLUMNS", "canonical_features", "LOCAL_EXTENSIONS"]

CANONICAL_COLUMNS = ("prompt", "chosen", "rejected")
LOCAL_EXTENSIONS = (".json", ".jsonl", ".parquet")
_EVAL_SPLITS = ("eval", "test", "validation", "dev")

Row = dict[str, Any]
RowFn = Callable[[Row], "Row | None"]


def canonical_features():
    from datasets import Features, Value

    return Features({c: Value("string") for c in CANONICAL_COLUMNS})


# ---------------------------------------------------------------- row mappings (pure functions)
# Each takes one raw row in the source's hub schema and returns a canonical row, or None to skip
# it (the reference's getters return None for unusable rows).

def format_prompt(question: str) -> str:
    return f" Human: {question} Assistant:"


def _row(prompt: str | None, chosen: str | None, rejected: str | None = None) -> Row | None:
    if not prompt or not chosen or not chosen.strip():
        return None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected or None}


def _lead_space(text: str | None) -> str | None:
    if text is None or text == "":
        return None
    return text if text[:1].isspace() else " " + text


def map_verbatim(row: Row) -> Row | None:
    """Dahoas/rm-static, Dahoas/full-hh-rlhf: already in the format ("\\n\\nHuman: ... Assistant:")."""
    return _row(row.get("prompt"), row.get("chosen"), row.get("rejected"))


def map_synthetic_gptj(row: Row) -> Row | None:
    """Dahoas/synthetic-instruct-gptj-pairwise: bare prompt/chosen/rejected."""
    if not row.get("prompt") or row.get("chosen") is None:
        return None
    rej = row.get("rejected")
    return _row(format_prompt(row["prompt"]), " " + row["chosen"],
                " " + rej if rej is not None else None)


def map_yitingxie(row: Row) -> Row | None:
    """yitingxie/rlhf-reward-datasets: prompt ends before "Assistant:", answers start with it."""
    if row.get("prompt") is None or row.get("chosen") is None:
        return None
    rej = row.get("rejected")
    return _row(row["prompt"] + "Assistant:", row["chosen"].split("Assistant:")[-1],
                rej.split("Assistant:")[-1] if rej is not None else None)


_CITATION_SPACED = re.compile(r" [\(\[].*?[\)\]]")
_CITATION = re.compile(r"[\(\[].*?[\)\]]")


def _strip_citations(text: str) -> str:
    # WebGPT answers cite their browsing results ("[1]", "(2)"); without browsing they only
    # confuse the model, so the reference removes them, with these two regexes.
    return _CITATION.sub("", _CITATION_SPACED.sub("", text))


def map_webgpt(row: Row) -> Row | None:
    """openai/webgpt_comparisons: question.full_text; the answer with the higher score is chosen.

    A tie carries no preference: the reference keeps it as a pair (answer_0 chosen); here the row
    keeps answer_0 as its answer (for steps 1 and 3) but has no rejected answer, so the reward
    model does not train on a coin flip.
    """
    question = (row.get("question") or {}).get("full_text")
    a0, a1 = row.get("answer_0"), row.get("answer_1")
    if not question or a0 is None or a1 is None:
        return None
    s0, s1 = float(row.get("score_0") or 0.0), float(row.get("score_1") or 0.0)
    chosen, rejected = (a0, a1) if s0 >= s1 else (a1, a0)
    return _row(format_prompt(question), " " + _strip_citations(chosen),
                " " + _strip_citations(rejected) if s0 != s1 else None)


def map_shp(row: Row) -> Row | None:
    """stanfordnlp/SHP: history; labels == 1 means human_ref_A is preferred."""
    if not row.get("history") or row.get("labels") is None:
        return None
    a, b = row.get("human_ref_A"), row.get("human_ref_B")
    if a is None or b is None:
        return None
    chosen, rejected = (a, b) if int(row["labels"]) == 1 else (b, a)
    return _row(format_prompt(row["history"]), " " + chosen, " " + rejected)


def map_sharegpt_vicuna(row: Row) -> Row | None:
    """pvduy/sharegpt_alpaca_oa_vicuna_format (SFT only): "USER: ... ASSISTANT:" prompt, label."""
    prompt, label = row.get("prompt"), row.get("label")
    if not prompt or not label:
        return None
    return _row(prompt.replace("USER", "Human").replace("ASSISTANT", "Assistant"), " " + label)


def map_zhihu(row: Row) -> Row | None:
    """wangrui6/Zhihu-KOL (SFT only): INSTRUCTION, RESPONSE."""
    if row.get("INSTRUCTION") is None or row.get("RESPONSE") is None:
        return None
    return _row(format_prompt(row["INSTRUCTION"]), " " + row["RESPONSE"])


def map_miracl(row: Row) -> Row | None:
    """Cohere/miracl-{zh,ja}-queries-22-12: query; first positive passage chosen, first negative
    rejected (None when a query has no negative passage, as the reference's ja variant)."""
    pos, neg = row.get("positive_passages") or [], row.get("negative_passages") or []
    if not row.get("query") or not pos:
        return None
    return _row(format_prompt(row["query"]), " " + pos[0]["text"],
                " " + neg[0]["text"] if neg else None)


def map_hc3_chinese(row: Row) -> Row | None:
    """Hello-SimpleAI/HC3-Chinese (SFT only): question, first human answer."""
    answers = row.get("human_answers") or []
    if row.get("question") is None or not answers or answers[0] is None:
        return None
    return _row(format_prompt(row["question"]), " " + answers[0])


def _map_mkqa(lang: str) -> RowFn:
    def map_mkqa(row: Row) -> Row | None:
        """mkqa (SFT only): queries[lang], answers[lang][0].text."""
        query = (row.get("queries") or {}).get(lang)
        answers = (row.get("answers") or {}).get(lang) or []
        if query is None or not answers or answers[0].get("text") is None:
            return None
        return _row(format_prompt(query), " " + answers[0]["text"])
    map_mkqa.__name__ = f"map_mkqa_{lang}"
    return map_mkqa


map_mkqa_zh_cn = _map_mkqa("zh_cn")
map_mkqa_ja = _map_mkqa("ja")


def map_qg_jaquad(row: Row) -> Row | None:
    """lmqg/qg_jaquad (SFT only): question, sentence."""
    if row.get("question") is None or row.get("sentence") is None:
        return None
    return _row(format_prompt(row["question"]), " " + row["sentence"])


def map_qag_jaquad(row: Row) -> Row | None:
    """lmqg/qag_jaquad (SFT only): first question, paragraph."""
    questions = row.get("questions") or []
    if not questions or row.get("paragraph") is None:
        return None
    return _row(format_prompt(questions[0]), " " + row["paragraph"])


def map_local(row: Row) -> Row | None:
    """Local files and folders: prompt/chosen/rejected as written, with a leading space added where
    missing (the reference's local/jsonfile rule)."""
    return _row(_lead_space(row.get("prompt")), _lead_space(row.get("chosen")),
                _lead_space(row.get("rejected")))


@dataclass(frozen=True)
class NamedSource:
    name: str  # what --data-path takes
    hub_id: str  # what load_dataset gets
    map_row: RowFn
    columns: tuple[str, ...]  # raw columns the mapping reads
    eval_split: str | None  # None: eval carved out of train, seeded 9:1
    pairwise: bool = True  # False: SFT-only, no rejected answers
    config: str | None = None


_PAIR = ("prompt", "chosen", "rejected")
NAMED_SOURCES: dict[str, NamedSource] = {s.name: s for s in (
    NamedSource("Dahoas/rm-static", "Dahoas/rm-static", map_verbatim, _PAIR, "test"),
    NamedSource("Dahoas/full-hh-rlhf", "Dahoas/full-hh-rlhf", map_verbatim, _PAIR, "test"),
    NamedSource("Dahoas/synthetic-instruct-gptj-pairwise", "Dahoas/synthetic-instruct-gptj-pairwise",
                map_synthetic_gptj, _PAIR, None),
    NamedSource("yitingxie/rlhf-reward-datasets", "yitingxie/rlhf-reward-datasets", map_yitingxie,
                _PAIR, "test"),
    NamedSource("openai/webgpt_comparisons", "openai/webgpt_comparisons", map_webgpt,
                ("question", "answer_0", "answer_1", "score_0", "score_1"), None),
    NamedSource("stanfordnlp/SHP", "stanfordnlp/SHP", map_shp,
                ("history", "human_ref_A", "human_ref_B", "labels"), "validation"),
    NamedSource("Cohere/miracl-zh-queries-22-12", "Cohere/miracl-zh-queries-22-12", map_miracl,
                ("query", "positive_passages", "negative_passages"), "dev"),
    NamedSource("Cohere/miracl-ja-queries-22-12", "Cohere/miracl-ja-queries-22-12", map_miracl,
                ("query", "positive_passages", "negative_passages"), "dev"),
    NamedSource("pvduy/sharegpt_alpaca_oa_vicuna_format", "pvduy/sharegpt_alpaca_oa_vicuna_format",
                map_sharegpt_vicuna, ("prompt", "label"), "test", pairwise=False),
    NamedSource("wangrui6/Zhihu-KOL", "wangrui6/Zhihu-KOL", map_zhihu, ("INSTRUCTION", "RESPONSE"),
                None, pairwise=False),
    NamedSource("Hello-SimpleAI/HC3-Chinese", "Hello-SimpleAI/HC3-Chinese", map_hc3_chinese,
                ("question", "human_answers"), None, pairwise=False),
    # The reference loads both from the hub dataset "mkqa" and picks a language.
    NamedSource("mkqa-Chinese", "mkqa", map_mkqa_zh_cn, ("queries", "answers"), None, pairwise=False),
    NamedSource("mkqa-Japanese", "mkqa", map_mkqa_ja, ("queries", "answers"), None, pairwise=False),
    NamedSource("lmqg/qg_jaquad", "lmqg/qg_jaquad", map_qg_jaquad, ("question", "sentence"),
                "validation", pairwise=False),
    NamedSource("lmqg/qag_jaquad", "lmqg/qag_jaquad", map_qag_jaquad, ("questions", "paragraph"),
                "validation", pairwise=False),
)}
_BY_LOWER = {k.lower(): v for k, v in NAMED_SOURCES.items()}


# ---------------------------------------------------------------- resolving a --data-path value

@dataclass(frozen=True)
class _Resolved:
    kind: str  # "hub" | "jsonfile" | "folder" | "file"
    name: str
    path: Path | None = None  # file or folder; for jsonfile the data dir
    named: NamedSource | None = None  # hub source, or a local path named after one


def _looks_like_path(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~", "."))
            or Path(name).suffix.lower() in LOCAL_EXTENSIONS + (".csv", ".tsv", ".txt", ".arrow"))


def _named_in_path(path: str) -> NamedSource | None:
    # Longest name first, so "mkqa-Chinese" never shadows a longer name.
    for key in sorted(NAMED_SOURCES, key=len, reverse=True):
        if key in path:
            return NAMED_SOURCES[key]
    return None


def _resolve(name: str, data_dir: str | None, flag: str) -> _Resolved:
    if not name or not name.strip():
        raise ConfigError(flag, "empty data source; give a hub name, local/jsonfile or a path")
    if name == "local/jsonfile":
        if not data_dir:
            raise ConfigError("--data-dir", "local/jsonfile needs --data-dir DIR, a folder with "
                              "train.json and eval.json (lists of {prompt, chosen, rejected})")
        d = Path(data_dir).expanduser()
        if not d.is_dir():
            raise ConfigError("--data-dir", f"no such folder: {d}; it should hold train.json and "
                              "eval.json for local/jsonfile")
        if _jsonfile_part(d, "train") is None:
            raise ConfigError("--data-dir", f"{d} has no train.json (nor train.jsonl); local/jsonfile "
                              "needs train.json and eval.json, lists of {prompt, chosen, rejected}")
        return _Resolved("jsonfile", name, d)
    p = Path(name).expanduser()
    if p.exists():
        named = _named_in_path(str(p.resolve()))
        if p.is_dir():
            return _Resolved("folder", name, p, named)
        if p.suffix.lower() not in LOCAL_EXTENSIONS:
            raise ConfigError(flag, f"{p}: unsupported file type '{p.suffix}'; use a .json, .jsonl "
                              "or .parquet file, or a folder saved with save_to_disk")
        return _Resolved("file", name, p, named)
    src = _BY_LOWER.get(name.lower())
    if src is not None:
        return _Resolved("hub", src.name, None, src)
    if _looks_like_path(name):
        raise ConfigError(flag, f"no such file or folder: {p}")
    known = ", ".join(NAMED_SOURCES)
    raise ConfigError(flag, f"unknown data source '{name}': not a file or folder here and not a "
                      f"supported hub dataset ({known}); pass a folder saved with save_to_disk, a "
                      ".json/.jsonl/.parquet file, or local/jsonfile with --data-dir")


def _jsonfile_part(folder: Path, part: str) -> Path | None:
    for ext in (".json", ".jsonl"):
        f = folder / f"{part}{ext}"
        if f.is_file():
            return f
    return None


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _files_read(r: _Resolved) -> list[Path]:
    if r.kind == "jsonfile" or (r.kind == "folder" and not _is_saved_dataset(r.path)):
        return [f for f in (_jsonfile_part(r.path, "train"), _jsonfile_part(r.path, "eval")) if f]
    if r.kind == "folder":
        return sorted(f for f in r.path.rglob("*") if f.is_file())
    return [r.path]


def source_fingerprint(name: str, data_dir: str | None = None, *, flag: str = "--data-path") -> str:
    """What identifies a source's content, for the tokenised-data cache key.

    Local sources: resolved path, size and mtime_ns of every file read (editing a file changes
    it). Hub names: the name alone (hub datasets of the reference are frozen; delete the cache
    folder to force a rebuild after a hub update)."""
    r = _resolve(name, data_dir, flag)
    if r.kind == "hub":
        return f"hub:{r.named.hub_id}:{r.named.config or ''}:{r.name}"
    h = hashlib.sha256()
    for f in _files_read(r):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return f"local:{r.kind}:{r.named.name if r.named else ''}:{h.hexdigest()}"


# ---------------------------------------------------------------- loading

@quiet_datasets()
def load_source(name: str, data_dir: str | None = None, *, seed: int = 1234,
                flag: str = "--data-path") -> dict[str, Any]:
    """Load one source as canonical rows: {"train": Dataset, "eval": Dataset}.

    `seed` seeds the 9:1 eval carve of sources without an eval split. User mistakes raise
    ConfigError naming `flag` (or the file) and the fix."""
    r = _resolve(name, data_dir, flag)
    if r.kind == "hub":
        return _finish(_map_splits(_load_hub(r.named, flag), r.named, seed, flag), flag)
    if r.kind == "jsonfile" or (r.kind == "folder" and not _is_saved_dataset(r.path)):
        train_file = _jsonfile_part(r.path, "train")
        if train_file is None:
            raise ConfigError(flag, f"{r.path} is a folder but neither saved with save_to_disk nor "
                              "holding train.json; save it with Dataset.save_to_disk or add "
                              "train.json (and eval.json)")
        eval_file = _jsonfile_part(r.path, "eval")
        train = _read_json_file(train_file)
        if eval_file is None:
            return _finish(_carve(train, seed), str(train_file))
        return _finish({"train": train, "eval": _read_json_file(eval_file, allow_empty=True)},
                       str(train_file))
    if r.kind == "folder":
        return _finish(_load_saved_folder(r, seed), str(r.path))
    # single file
    if r.path.suffix.lower() == ".parquet":
        ds = _read_parquet(r.path)
        if r.named is not None and set(r.named.columns) <= set(ds.column_names):
            ds = _apply(ds, r.named.map_row, str(r.path), r.named.columns)
            return _finish(_carve(ds, seed), str(r.path))
        return _finish(_carve(_canonical_from_table(ds, str(r.path)), seed), str(r.path))
    return _finish(_carve(_read_json_file(r.path, named=r.named), seed), str(r.path))


def _finish(splits: dict[str, Any], where: str) -> dict[str, Any]:
    if len(splits["train"]) == 0:
        raise ConfigError(where, "has no usable rows (each row needs a non-empty 'prompt' and "
                          "'chosen'); check the file or pick another source")
    return splits


def _carve(ds, seed: int) -> dict[str, Any]:
    train_idx, eval_idx = carve_indices(len(ds), seed)
    return {"train": ds.select(train_idx), "eval": ds.select(eval_idx)}


def _apply(ds, fn: RowFn, where: str, needed: tuple[str, ...] = CANONICAL_COLUMNS):
    """Map raw rows to canonical rows, dropping rows the mapping rejects. In memory: nothing is
    written next to the user's (or the hub cache's) files."""
    cols = list(ds.column_names)

    def batch_fn(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {c: [] for c in CANONICAL_COLUMNS}
        n = len(batch[cols[0]]) if cols else 0
        for i in range(n):
            row = fn({c: batch[c][i] for c in cols})
            if row is not None:
                for c in CANONICAL_COLUMNS:
                    out[c].append(row[c])
        return out

    try:
        return ds.map(batch_fn, batched=True, remove_columns=cols, features=canonical_features(),
                      keep_in_memory=True, load_from_cache_file=False, desc="Formatting rows")
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        raise ConfigError(where, f"rows do not fit the expected columns ({type(e).__name__}: {e}); "
                          f"needed: {', '.join(needed)}") from None


def _map_splits(dd, src: NamedSource, seed: int, where: str) -> dict[str, Any]:
    """Named source: pick train/eval as the reference did, then map rows."""
    if "train" not in dd:
        raise ConfigError(where, f"{src.name} has no 'train' split (found: {', '.join(dd)})")
    train = dd["train"]
    missing = [c for c in src.columns if c not in train.column_names]
    if missing:
        raise ConfigError(where, f"{src.name}: rows lack the column(s) {', '.join(missing)} of its "
                          f"hub schema (found: {', '.join(train.column_names)})")
    eval_name = None
    if src.eval_split is not None:  # hub name, or a local copy saved under another split name
        eval_name = src.eval_split if src.eval_split in dd else next(
            (s for s in _EVAL_SPLITS if s in dd), None)
    if eval_name is None:
        train_idx, eval_idx = carve_indices(len(train), seed)
        train, evalset = train.select(train_idx), train.select(eval_idx)
    else:
        evalset = dd[eval_name]
    return {"train": _apply(train, src.map_row, where, src.columns),
            "eval": _apply(evalset, src.map_row, where, src.columns)}


def _load_saved_folder(r: _Resolved, seed: int) -> dict[str, Any]:
    import datasets

    where = str(r.path)
    try:
        obj = datasets.load_from_disk(str(r.path))
    except Exception as e:  # corrupt or foreign folder
        raise ConfigError(where, f"cannot be read with load_from_disk ({_one_line(e)}); save it "
                          "again with Dataset.save_to_disk") from None
    if isinstance(obj, datasets.DatasetDict):
        if "train" not in obj:
            raise ConfigError(where, f"holds splits {', '.join(obj)} but no 'train'; save a "
                              "DatasetDict with 'train' (and 'test' or 'eval')")
        cols = obj["train"].column_names
        if r.named is not None and set(r.named.columns) <= set(cols):
            return _map_splits(obj, r.named, seed, where)
        eval_name = next((s for s in _EVAL_SPLITS if s in obj), None)
        train = _canonical_from_table(obj["train"], where)
        if eval_name is None:
            return _carve(train, seed)
        evalset = _canonical_from_table(obj[eval_name], where, allow_empty=True)
        return {"train": train, "eval": evalset}
    if r.named is not None and set(r.named.columns) <= set(obj.column_names):
        return _carve(_apply(obj, r.named.map_row, where, r.named.columns), seed)
    return _carve(_canonical_from_table(obj, where), seed)


def _canonical_from_table(ds, where: str, allow_empty: bool = False):
    """A Dataset with prompt/chosen(/rejected) text columns -> canonical rows."""
    for col in ("prompt", "chosen"):
        if col not in ds.column_names:
            hint = ""
            named = _named_in_path(where)
            if named is None:
                hint = ("; for a copy of a hub dataset, name its folder after the source (e.g. "
                        ".../stanfordnlp/SHP) to use that source's column mapping")
            raise ConfigError(where, f"has no '{col}' column (found: {', '.join(ds.column_names)}); "
                              f"rows need 'prompt' and 'chosen' ('rejected' optional){hint}")
    for col in CANONICAL_COLUMNS:
        if col in ds.column_names:
            dtype = getattr(ds.features[col], "dtype", None)
            if dtype not in ("string", "large_string", "null"):
                raise ConfigError(where, f"column '{col}' must hold text, not {ds.features[col]}")
    if len(ds) == 0 and not allow_empty:
        raise ConfigError(where, "has no rows")
    return _apply(ds, map_local, where)


def _read_parquet(path: Path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(str(path))
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(str(path), f"is not a readable parquet file ({_one_line(e)})") from None
    return datasets.Dataset(table)


def _read_json_file(path: Path, allow_empty: bool = False, named: NamedSource | None = None):
    """Parse .json (a list of objects, or JSON Lines) / .jsonl ourselves, for one-line errors.
    With `named` (the path carries a named source's name) and rows in that source's schema, its
    mapping is used; otherwise rows must be canonical."""
    import datasets

    where = str(path)
    rows = read_json_rows(path)
    if not rows and not allow_empty:
        raise ConfigError(where, "has no rows; it should be a list of {prompt, chosen, rejected}")
    if (named is not None and rows and all(isinstance(r, dict) for r in rows)
            and set(named.columns) <= set(rows[0])):
        return _apply(datasets.Dataset.from_list(rows), named.map_row, where, named.columns)
    out: dict[str, list] = {c: [] for c in CANONICAL_COLUMNS}
    for i, item in enumerate(rows):
        if not isinstance(item, dict):
            raise ConfigError(where, f"row {i} is a {type(item).__name__}, not an object with "
                              "'prompt' and 'chosen'")
        for col in ("prompt", "chosen"):
            if col not in item:
                raise ConfigError(where, f"row {i} has no '{col}' field; every row needs 'prompt' "
                                  "and 'chosen' ('rejected' optional)")
        for col in CANONICAL_COLUMNS:
            v = item.get(col)
            if v is not None and not isinstance(v, str):
                raise ConfigError(where, f"row {i}: '{col}' must be text, got {type(v).__name__}")
        row = map_local(item)
        if row is not None:
            for c in CANONICAL_COLUMNS:
                out[c].append(row[c])
    return datasets.Dataset.from_dict(out, features=canonical_features())


def read_json_rows(path: Path, expected: str = "'prompt' and 'chosen'") -> list:
    """Rows of a .json file (a list, or JSON Lines) or a .jsonl file, with one-line errors for
    non-UTF-8 and invalid JSON. `expected` names the fields in the error for a non-list."""
    where = str(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(where, f"is not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset "
                          f"{e.start}); save it as UTF-8") from None
    return _parse_json_rows(text, where, jsonl=path.suffix.lower() == ".jsonl", expected=expected)


def _parse_json_rows(text: str, where: str, jsonl: bool,
                     expected: str = "'prompt' and 'chosen'") -> list:
    if not jsonl:
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data": JSON Lines in a .json file
                raise ConfigError(where, f"is not valid JSON ({e.msg} at line {e.lineno}, column "
                                  f"{e.colno})") from None
        else:
            if not isinstance(data, list):
                raise ConfigError(where, "must hold a JSON list of objects (or one object per "
                                  f"line), each with {expected}")
            return data
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(where, f"line {lineno} is not valid JSON ({e.msg}, column "
                                  f"{e.colno}); a .jsonl file holds one object per line") from None
    return rows


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


# ---------------------------------------------------------------- the hub, without hanging

@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    """Force datasets/huggingface_hub into offline mode for one call. Both read their flag once at
    import, so setting the environment variable now would not be seen."""
    import datasets.config as dcfg
    import huggingface_hub.constants as hcfg

    saved = (dcfg.HF_HUB_OFFLINE, getattr(dcfg, "HF_DATASETS_OFFLINE", None), hcfg.HF_HUB_OFFLINE)
    dcfg.HF_HUB_OFFLINE = True
    dcfg.HF_DATASETS_OFFLINE = True
    hcfg.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dcfg.HF_HUB_OFFLINE, dcfg.HF_DATASETS_OFFLINE, hcfg.HF_HUB_OFFLINE = saved


def _load_hub(src: NamedSource, flag: str):
    import datasets

    args = (src.hub_id, src.config) if src.config else (src.hub_id,)
    env_offline = hub.offline_variable() is not None
    if not env_offline and hub.reachable():
        try:
            return datasets.load_dataset(*args)
        except Exception as e:
            raise ConfigError(flag, f"cannot load hub dataset '{src.name}' ({_one_line(e)})") from None
    try:
        with _offline_mode():
            return datasets.load_dataset(*args)
    except Exception:
        why = "HF_HUB_OFFLINE is set" if env_offline else "huggingface.co unreachable"
        raise ConfigError(flag, f"cannot load hub dataset '{src.name}': no network and not in the "
                          f"local cache ({why}); pass a local folder saved with save_to_disk, a "
                          ".json/.jsonl/.parquet file, or local/jsonfile with --data-dir (on a "
                          "machine with network: datasets.load_dataset("
                          f"'{src.hub_id}').save_to_disk('DIR/{src.name}'))") from None
