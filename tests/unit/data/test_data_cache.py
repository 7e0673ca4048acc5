"""The tokenised-data cache: built once per key, atomic, safe for concurrent ranks."""

import multiprocessing as mp
import os
import time

import datasets
import pytest

from dschat_cli.data.cache import cache_path, cached_dataset, tokenizer_fingerprint


def _build_counted(counter_file, n=5, delay=0.0):
    def build():
        with open(counter_file, "a") as f:
            f.write("built\n")
        time.sleep(delay)
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": list(range(n))})})
    return build


def _builds(counter_file) -> int:
    return len(open(counter_file).read().split()) if os.path.exists(counter_file) else 0


def test_second_call_does_not_rebuild(tmp_path):
    counter = tmp_path / "count"
    key = {"a": 1, "split": [2, 4, 4]}
    first = cached_dataset(tmp_path / "cache", key, _build_counted(counter))
    second = cached_dataset(tmp_path / "cache", {"split": (2, 4, 4), "a": 1}, _build_counted(counter))
    assert _builds(counter) == 1
    assert first["train"]["x"] == second["train"]["x"] == list(range(5))
    assert (cache_path(tmp_path / "cache", key) / "dschat_key.json").is_file()


def test_different_key_different_dir(tmp_path):
    counter = tmp_path / "count"
    cached_dataset(tmp_path / "c", {"seed": 1}, _build_counted(counter, n=3))
    other = cached_dataset(tmp_path / "c", {"seed": 2}, _build_counted(counter, n=4))
    assert _builds(counter) == 2 and len(other["train"]) == 4
    assert cache_path(tmp_path / "c", {"seed": 1}) != cache_path(tmp_path / "c", {"seed": 2})


def test_failed_build_leaves_nothing(tmp_path):
    def boom():
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        cached_dataset(tmp_path / "c", {"k": 1}, boom)
    assert not cache_path(tmp_path / "c", {"k": 1}).exists()
    assert [p for p in os.listdir(tmp_path / "c") if ".tmp-" in p] == []
    assert len(cached_dataset(tmp_path / "c", {"k": 1}, _build_counted(tmp_path / "n"))["train"]) == 5


def test_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cached_dataset("~/cache", {"k": 2}, _build_counted(tmp_path / "n"))
    assert cache_path("~/cache", {"k": 2}).is_relative_to(tmp_path)
    assert cache_path("~/cache", {"k": 2}).is_dir()


def _race_worker(cache_dir, counter_file, barrier, out_file):
    # spawn: a fresh interpreter, as a second rank would be; both call at the same moment
    barrier.wait(timeout=60)
    ds = cached_dataset(cache_dir, {"race": True}, _build_counted(counter_file, n=7, delay=0.5))
    with open(out_file, "w") as f:
        f.write(",".join(map(str, ds["train"]["x"])))


def test_concurrent_processes_build_once(tmp_path):
    ctx = mp.get_context("spawn")
    counter = str(tmp_path / "count")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_race_worker,
                         args=(str(tmp_path / "cache"), counter, barrier, str(tmp_path / f"out{i}")))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert _builds(counter) == 1
    outs = [(tmp_path / f"out{i}").read_text() for i in range(2)]
    assert outs[0] == outs[1] == ",".join(map(str, range(7)))


def test_tokenizer_fingerprint(data_tokenizer):
    from dschat_cli.models.local_tokenizer import build_local_tokenizer

    fp = tokenizer_fingerprint(data_tokenizer)
    assert fp == tokenizer_fingerprint(data_tokenizer)
    data_tokenizer("x " * 50, truncation=True, max_length=4)  # call-time settings don't count
    assert fp == tokenizer_fingerprint(data_tokenizer)
    other = build_local_tokenizer(vocab_size=300)
    assert tokenizer_fingerprint(other) != fp
    other2 = build_local_tokenizer()
    other2.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(other2) != fp


def test_lost_rename_race_keeps_the_winner(tmp_path):
    """Another node (shared storage, flock not shared) finished first: ours is discarded."""
    key = {"k": "race"}
    target = cache_path(tmp_path / "c", key)

    def build():
        winner = datasets.Dataset.from_dict({"x": [42]})
        winner.save_to_disk(str(target))
        (target / "dschat_key.json").write_text("{}")
        return datasets.Dataset.from_dict({"x": [1, 2]})

    ds = cached_dataset(tmp_path / "c", key, build)
    assert ds["x"] == [42]
    assert [p for p in os.listdir(tmp_path / "c") if ".tmp-" in p] == []
