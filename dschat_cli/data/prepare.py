"""The canonical rows one step uses: every `--data-path` source split by `--data-split`, concatenated.

As DeepSpeed-Chat (data_utils.create_prompt_dataset): each source's train and eval sets are split
separately with the same seeded permutation (split.phase_indices); step p takes part p of each.
Several sources are concatenated, then reshuffled with the seed; for step 1 the
`--sft-only-data-path` sources are appended whole and the result reshuffled again. The sample caps
(`--max-train-samples`, `--max-eval-samples`) take the first rows after the shuffle.

Every row carries a `source` column (the --data-path value) so a step can log rows per source.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from dschat_cli.config.schema import ConfigError
from dschat_cli.config.sections import DataOptions, parse_split
from dschat_cli.data._quiet import quiet_datasets
from dschat_cli.data.sources import load_source
from dschat_cli.data.split import permutation, phase_indices

__all__ = ["load_phase_rows", "describe"]


def _with_source(ds, name: str):
    return ds.add_column("source", [name] * len(ds))


def _concat_shuffled(parts: list, seed: int):
    from datasets import concatenate_datasets

    ds = concatenate_datasets(parts)
    return ds.select(permutation(len(ds), seed))


@quiet_datasets()
def load_phase_rows(data: DataOptions, phase: int, seed: int) -> tuple[Any, Any]:
    """(train, eval) canonical rows (prompt, chosen, rejected, source) of step `phase`."""
    split = parse_split(data.data_split)
    if not data.data_path and not (phase == 1 and data.sft_only_data_path):
        raise ConfigError("--data-path", "no data source given; pass at least one --data-path")
    trains, evals = [], []
    for name in data.data_path:
        sets = load_source(name, data.data_dir, seed=seed)
        tr, ev = sets["train"], sets["eval"]
        tr = tr.select(phase_indices(len(tr), split, phase, seed, source=name))
        ev = ev.select(phase_indices(len(ev), split, phase, seed, source=name, allow_empty=True))
        trains.append(_with_source(tr, name))
        evals.append(_with_source(ev, name))
    if phase == 1 and data.sft_only_data_path:
        sft_train, sft_eval = [], []
        for name in data.sft_only_data_path:
            sets = load_source(name, data.data_dir, seed=seed, flag="--sft-only-data-path")
            sft_train.append(_with_source(sets["train"], name))
            sft_eval.append(_with_source(sets["eval"], name))
        # The reference first shuffles the blend of --data-path sources, then appends the
        # sft-only ones and shuffles again; reproduce both shuffles.
        if len(trains) > 1:
            trains, evals = [_concat_shuffled(trains, seed)], [_concat_shuffled(evals, seed)]
        trains, evals = trains + sft_train, evals + sft_eval
        train, eval_ = _concat_shuffled(trains, seed), _concat_shuffled(evals, seed)
    elif len(trains) > 1:
        train, eval_ = _concat_shuffled(trains, seed), _concat_shuffled(evals, seed)
    else:
        train, eval_ = trains[0], evals[0]
    if data.max_train_samples:
        train = train.select(range(min(len(train), data.max_train_samples)))
    if data.max_eval_samples:
        eval_ = eval_.select(range(min(len(eval_), data.max_eval_samples)))
    return train, eval_


def describe(train, eval_) -> list[tuple[str, int, int]]:
    """[(source, train rows, eval rows)] in first-seen order, for a log table."""
    tc = Counter(train["source"]) if "source" in train.column_names else Counter()
    ec = Counter(eval_["source"]) if "source" in eval_.column_names else Counter()
    names = list(dict.fromkeys(list(tc) + list(ec)))
    return [(n, tc.get(n, 0), ec.get(n, 0)) for n in names]
