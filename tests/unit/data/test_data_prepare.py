"""Phase rows from several sources, and the cached step-1 datasets end to end."""

import json

import pytest

from dschat_cli.config.schema import ConfigError
from dschat_cli.config.sections import DataOptions
from dschat_cli.data.prepare import describe, load_phase_rows
from dschat_cli.data.sft import sft_datasets


@pytest.fixture
def two_files(tmp_path, make_rows):
    a, b = tmp_path / "a.json", tmp_path / "b.jsonl"
    a.write_text(json.dumps(make_rows(100, "A")))
    b.write_text("\n".join(json.dumps(r) for r in make_rows(50, "B")))
    return str(a), str(b)


def test_phases_are_disjoint_across_steps(two_files):
    opts = DataOptions(data_path=two_files)
    parts = [load_phase_rows(opts, p, seed=1234) for p in (1, 2, 3)]
    train_prompts = [set(tr["prompt"]) for tr, _ in parts]
    assert not (train_prompts[0] & train_prompts[1]) and not (train_prompts[1] & train_prompts[2])
    # 90 + 45 training rows (after the 9:1 eval carve), split 2,4,4
    assert [len(tr) for tr, _ in parts] == [18 + 9, 36 + 18, 36 + 18]
    assert sorted(describe(*parts[0])) == sorted([(two_files[0], 18, 2), (two_files[1], 9, 1)])
    again = load_phase_rows(opts, 2, seed=1234)
    assert again[0]["prompt"] == parts[1][0]["prompt"]  # deterministic order too


def test_sft_only_sources_and_caps(two_files, tmp_path, make_rows):
    extra = tmp_path / "sft.json"
    extra.write_text(json.dumps([{"prompt": f"p{i}", "chosen": f"c{i}"} for i in range(30)]))
    opts = DataOptions(data_path=two_files[:1], sft_only_data_path=(str(extra),))
    tr, ev = load_phase_rows(opts, 1, seed=1)
    counts = {s: (t, e) for s, t, e in describe(tr, ev)}
    assert counts[str(extra)] == (27, 3)  # whole, not split
    assert counts[two_files[0]] == (18, 2)
    tr2, _ = load_phase_rows(opts, 2, seed=1)
    assert str(extra) not in set(tr2["source"])  # step 1 only
    capped = DataOptions(data_path=two_files, max_train_samples=5, max_eval_samples=2)
    tr, ev = load_phase_rows(capped, 1, seed=1)
    assert (len(tr), len(ev)) == (5, 2)


def test_empty_phase_names_the_source(tmp_path):
    f = tmp_path / "tiny.json"
    f.write_text(json.dumps([{"prompt": "p", "chosen": "c"}] * 3))
    with pytest.raises(ConfigError) as e:
        load_phase_rows(DataOptions(data_path=(str(f),)), 1, seed=1)
    assert e.value.where == "--data-split" and str(f) in e.value.message


def test_sft_datasets_cached_and_keyed(jsonfile_dir, tmp_path, data_tokenizer, monkeypatch):
    import dschat_cli.data.sft as sft

    calls = []
    real = sft.load_phase_rows
    monkeypatch.setattr(sft, "load_phase_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    opts = DataOptions(data_path=("local/jsonfile",), data_dir=str(jsonfile_dir),
                       data_cache_dir=str(tmp_path / "cache"), max_seq_len=64)
    train, ev = sft_datasets(opts, data_tokenizer, mask_prompt=True, seed=1234)
    assert (len(train), len(ev)) == (8, 2)
    assert set(train.column_names) == {"input_ids", "labels", "source"}
    row = train[0]
    assert row["labels"][-1] == data_tokenizer.eos_token_id and row["labels"][0] == -100
    train2, _ = sft_datasets(opts, data_tokenizer, mask_prompt=True, seed=1234)
    assert len(calls) == 1 and train2["input_ids"] == train["input_ids"]
    # each of these changes the key, so the data is rebuilt
    sft_datasets(opts, data_tokenizer, mask_prompt=False, seed=1234)
    sft_datasets(opts, data_tokenizer, mask_prompt=True, seed=7)
    (jsonfile_dir / "train.json").write_text((jsonfile_dir / "train.json").read_text() + "\n")
    sft_datasets(opts, data_tokenizer, mask_prompt=True, seed=1234)
    assert len(calls) == 4


def test_sft_datasets_all_prompts_too_long(jsonfile_dir, tmp_path, data_tokenizer):
    opts = DataOptions(data_path=("local/jsonfile",), data_dir=str(jsonfile_dir),
                       data_cache_dir=str(tmp_path / "cache"), max_seq_len=8)
    with pytest.raises(ConfigError) as e:
        sft_datasets(opts, data_tokenizer, mask_prompt=True, seed=1234)
    assert e.value.where == "--max-seq-len"


def test_sft_datasets_on_the_demo_pairs(pairs_dir, tiny_tokenizer, tmp_path):
    """The shared demo data (conftest's pairs_dir) through the whole step-1 path, as the SFT step
    uses it: cached datasets -> collate."""
    from dschat_cli.data.sft import collate_sft

    opts = DataOptions(data_path=("local/jsonfile",), data_dir=str(pairs_dir),
                       data_cache_dir=str(tmp_path / "cache"), max_seq_len=128)
    train, ev = sft_datasets(opts, tiny_tokenizer, mask_prompt=True, seed=1234)
    assert len(train) == round(256 * 0.2) and len(ev) == round(64 * 0.2)
    batch = collate_sft([train[i] for i in range(4)], tiny_tokenizer.pad_token_id)
    lengths = batch["attention_mask"].sum(1)
    for i in range(4):
        n = int(lengths[i])
        assert batch["labels"][i, n - 1] == tiny_tokenizer.eos_token_id  # learns to stop
        assert (batch["labels"][i, n:] == -100).all()
