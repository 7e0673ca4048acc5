"""Step-3 prompts (tokenise, drop the too long, left-pad, cache) and the unsupervised LM blocks."""

import json
import time
from dataclasses import replace

import datasets
import huggingface_hub
import numpy as np
import pytest
import torch

from dschat_cli import hub
from dschat_cli.config.schema import ConfigError
from dschat_cli.config.sections import DataOptions
from dschat_cli.data import sources as S
from dschat_cli.data.cache import cache_path
from dschat_cli.data.prompts import (collate_lm_blocks, collate_prompts, prompt_cache_key,
                                     prompt_datasets, prompt_drop_counts, tokenize_prompts,
                                     unsupervised_counts, unsupervised_dataset)
from dschat_cli.data.reward import reward_cache_key
from dschat_cli.data.split import permutation

SHORT = " Human: hi? Assistant:"
LONG = " Human: " + "please tell me about the water of the world " * 6 + "? Assistant:"


def _tok_len(tok, text):
    return len(tok(text)["input_ids"])


def test_long_prompts_dropped_not_truncated(data_tokenizer):
    tok = data_tokenizer
    limit = _tok_len(tok, SHORT) + 3
    assert _tok_len(tok, LONG) > limit
    batch = {"prompt": [SHORT, LONG, SHORT + " ok", LONG], "source": ["a", "b", "c", "d"],
             "chosen": [" x"] * 4, "rejected": [None] * 4}
    out = tokenize_prompts(batch, tok, limit)
    assert set(out) == {"prompt_input_ids", "source"}
    assert out["source"] == ["a", "c"]
    assert out["prompt_input_ids"][0] == tok(SHORT)["input_ids"]  # as the tokenizer gives, no eos
    assert tok.eos_token_id not in out["prompt_input_ids"][1]
    # exactly max_prompt_seq_len tokens is kept
    n = _tok_len(tok, SHORT)
    assert tokenize_prompts({"prompt": [SHORT]}, tok, n)["prompt_input_ids"] == [
        tok(SHORT)["input_ids"]]
    assert tokenize_prompts({"prompt": [SHORT]}, tok, n - 1)["prompt_input_ids"] == []


def test_bos_kept_tokenizer_eos_removed(data_tokenizer):
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(data_tokenizer)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 1)])
    ids = tokenize_prompts({"prompt": [SHORT]}, tok, 64)["prompt_input_ids"][0]
    assert ids == [2] + data_tokenizer(SHORT)["input_ids"]  # <s> + prompt, the </s> removed


def test_collate_left_pads_with_masks_from_lengths():
    eos = pad = 1  # pad == eos, as for models without a pad token
    feats = [{"prompt_input_ids": [5, 6, 7]}, {"prompt_input_ids": [eos, 8]},
             {"prompt_input_ids": [9, 9, 9, 9, 4]}]
    b = collate_prompts(feats, pad_token_id=pad)
    assert set(b) == {"input_ids", "attention_mask"}
    assert b["input_ids"].tolist() == [[1, 1, 5, 6, 7], [1, 1, 1, 1, 8], [9, 9, 9, 9, 4]]
    # the leading real token equal to pad counts (mask from lengths, not from ids)
    assert b["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    assert all(t.dtype == torch.long for t in b.values())
    wide = collate_prompts(feats, pad_token_id=0, pad_to_multiple_of=8)
    assert wide["input_ids"].shape == (3, 8) and wide["input_ids"][:, -1].tolist() == [7, 8, 4]
    with pytest.raises(ValueError):
        collate_prompts(feats, pad_token_id=None)


def _write_dir(d, rows, n_eval=10):
    d.mkdir()
    (d / "train.json").write_text(json.dumps(rows))
    (d / "eval.json").write_text(json.dumps(rows[:n_eval]))
    return d


def _rows(n):
    return [{"prompt": LONG if i % 4 == 0 else f"Human: q {i}? Assistant:", "chosen": f"a {i}."}
            for i in range(n)]


def test_prompt_datasets_cached_keyed_and_counted(tmp_path, data_tokenizer, monkeypatch):
    import dschat_cli.data.prompts as P

    tok = data_tokenizer
    d = _write_dir(tmp_path / "prompts", _rows(40), n_eval=8)
    calls = []
    real = P.load_phase_rows
    monkeypatch.setattr(P, "load_phase_rows", lambda *a, **k: calls.append(a) or real(*a, **k))
    opts = DataOptions(data_path=("local/jsonfile",), data_dir=str(d), data_split="0,0,10",
                       data_cache_dir=str(tmp_path / "cache"))
    limit = 16
    assert _tok_len(tok, LONG) > limit >= _tok_len(tok, " Human: q 39? Assistant:")
    train, ev = prompt_datasets(opts, tok, max_prompt_seq_len=limit, seed=1234)
    assert calls[0][1] == 3  # phase 3 rows
    assert set(train.column_names) == {"prompt_input_ids", "source"}
    assert train.features["prompt_input_ids"].feature.dtype == "int32"
    assert prompt_drop_counts(train) == {"rows": 40, "too_long": 10, "kept": 30}
    assert prompt_drop_counts(ev) == {"rows": 8, "too_long": 2, "kept": 6}
    assert all(len(ids) <= limit for ids in train["prompt_input_ids"])
    texts = {tok.decode(ids) for ids in train["prompt_input_ids"]}
    assert texts == {f" Human: q {i}? Assistant:" for i in range(40) if i % 4}

    train2, _ = prompt_datasets(opts, tok, max_prompt_seq_len=limit, seed=1234)
    assert len(calls) == 1 and train2["prompt_input_ids"] == train["prompt_input_ids"]
    assert prompt_drop_counts(train2)["too_long"] == 10  # counts survive the cache
    key = prompt_cache_key(opts, tok, max_prompt_seq_len=limit, seed=1234)
    assert key["kind"] == "prompts" and key["phase"] == 3
    assert cache_path(opts.data_cache_dir, key) != cache_path(
        opts.data_cache_dir, reward_cache_key(opts, tok, seed=1234))
    # each of these changes the key, so the data is rebuilt
    prompt_datasets(opts, tok, max_prompt_seq_len=limit + 1, seed=1234)
    prompt_datasets(opts, tok, max_prompt_seq_len=limit, seed=7)
    prompt_datasets(replace(opts, max_train_samples=5), tok, max_prompt_seq_len=limit, seed=1234)
    assert len(calls) == 4


def test_every_prompt_too_long(tmp_path, data_tokenizer):
    d = _write_dir(tmp_path / "long", [{"prompt": LONG, "chosen": "x"} for _ in range(20)])
    opts = DataOptions(data_path=("local/jsonfile",), data_dir=str(d), data_split="0,0,1",
                       data_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as e:
        prompt_datasets(opts, data_tokenizer, max_prompt_seq_len=8, seed=1234)
    assert e.value.where == "--max-prompt-seq-len"
    assert "all 20 step-3 prompts are longer than 8 tokens" in e.value.message
    assert f"the shortest has {_tok_len(data_tokenizer, LONG)}" in e.value.message


def test_no_step3_rows(tmp_path, data_tokenizer, make_rows):
    d = _write_dir(tmp_path / "d", make_rows(20))
    opts = DataOptions(data_path=("local/jsonfile",), data_dir=str(d), data_split="1,1,0",
                       data_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as e:
        prompt_datasets(opts, data_tokenizer, max_prompt_seq_len=64, seed=1234)
    assert e.value.where == "--data-split"


# ---------------------------------------------------------------- unsupervised blocks

DOCS = ["the cat is on the house", "", "   ", "hello world, my friend", "a dog"]


def _expected_blocks(tok, docs, block_size, seed):
    eos = tok.eos_token_id
    stream = []
    for t in docs:
        if t.strip():
            stream += tok(t)["input_ids"] + [eos]
    stream = stream[:-1]  # eos between documents only
    n = len(stream) // block_size
    blocks = [stream[i * block_size:(i + 1) * block_size] for i in range(n)]
    return [blocks[i] for i in permutation(n, seed)], stream


def test_blocks_from_txt_exact(tmp_path, data_tokenizer):
    tok = data_tokenizer
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(DOCS) + "\n")
    blocks, stream = _expected_blocks(tok, DOCS, 4, seed=3)
    assert len(blocks) >= 3 and stream.count(tok.eos_token_id) == 2
    ds = unsupervised_dataset(str(f), None, tok, block_size=4, seed=3,
                              cache_dir=str(tmp_path / "cache"))
    assert ds.column_names == ["input_ids"]
    assert ds["input_ids"] == blocks
    assert unsupervised_counts(ds) == {"documents": 3, "tokens": len(stream),
                                       "blocks": len(blocks)}
    b = collate_lm_blocks([ds[i] for i in range(len(ds))])
    assert b["input_ids"].tolist() == blocks and b["labels"].tolist() == blocks
    assert b["attention_mask"].shape == (len(blocks), 4) and bool(b["attention_mask"].all())
    assert b["labels"].data_ptr() != b["input_ids"].data_ptr()
    with pytest.raises(ValueError):
        collate_lm_blocks([{"input_ids": [1, 2]}, {"input_ids": [1]}])


def test_blocks_from_jsonl_cached_and_capped(tmp_path, data_tokenizer, monkeypatch):
    import dschat_cli.data.prompts as P

    tok = data_tokenizer
    f = tmp_path / "corpus.jsonl"
    f.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(DOCS)))
    blocks, _ = _expected_blocks(tok, DOCS, 3, seed=1)
    reads = []
    real = P._text_batches
    monkeypatch.setattr(P, "_text_batches", lambda *a: reads.append(a) or real(*a))
    kw = dict(block_size=3, seed=1, cache_dir=str(tmp_path / "cache"))
    ds = unsupervised_dataset(str(f), None, tok, **kw)
    assert ds["input_ids"] == blocks and ds.features["input_ids"].feature.dtype == "int32"
    assert unsupervised_dataset(str(f), None, tok, **kw)["input_ids"] == blocks
    assert len(reads) == 1  # the second call came from the cache
    capped = unsupervised_dataset(str(f), None, tok, max_samples=2, **kw)
    _, stream = _expected_blocks(tok, DOCS, 3, seed=1)
    first = [stream[0:3], stream[3:6]]
    assert sorted(capped["input_ids"]) == sorted(first) and len(reads) == 2
    # a .json list of objects reads the same
    j = tmp_path / "corpus.json"
    j.write_text(json.dumps([{"text": t} for t in DOCS]))
    assert unsupervised_dataset(str(j), None, tok, **kw)["input_ids"] == blocks


def test_missing_text_column_names_the_file(tmp_path, data_tokenizer):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(ConfigError) as e:
        unsupervised_dataset(str(f), None, data_tokenizer, block_size=4, seed=1,
                             cache_dir=str(tmp_path / "cache"))
    assert e.value.where == str(f) and "no 'text' column" in e.value.message
    assert "content" in e.value.message
    p = tmp_path / "bad.parquet"
    datasets.Dataset.from_dict({"body": ["a b c d e f"]}).to_parquet(str(p))
    with pytest.raises(ConfigError) as e:
        unsupervised_dataset(str(p), None, data_tokenizer, block_size=4, seed=1,
                             cache_dir=str(tmp_path / "cache"))
    assert e.value.where == str(p) and "no 'text' column (found: body)" in e.value.message


def test_too_little_text_and_bad_paths(tmp_path, data_tokenizer):
    f = tmp_path / "tiny.txt"
    f.write_text("hi\n")
    with pytest.raises(ConfigError) as e:
        unsupervised_dataset(str(f), None, data_tokenizer, block_size=64, seed=1,
                             cache_dir=str(tmp_path / "cache"))
    assert e.value.where == "--unsupervised-dataset-name"
    assert "fewer than one block" in e.value.message
    for name in (str(tmp_path / "missing.txt"), "./nowhere"):
        with pytest.raises(ConfigError) as e:
            unsupervised_dataset(name, None, data_tokenizer, block_size=4, seed=1,
                                 cache_dir=str(tmp_path / "cache"))
        assert e.value.where == "--unsupervised-dataset-name" and "no such file" in e.value.message


def test_saved_folder(tmp_path, data_tokenizer):
    tok = data_tokenizer
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS}),
                          "test": datasets.Dataset.from_dict({"text": ["x"]})}
                         ).save_to_disk(str(folder))
    ds = unsupervised_dataset(str(folder), None, tok, block_size=4, seed=3,
                              cache_dir=str(tmp_path / "cache"))
    assert ds["input_ids"] == _expected_blocks(tok, DOCS, 4, seed=3)[0]


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_hub"))


def test_offline_hub_name_fails_fast(tmp_path, monkeypatch, data_tokenizer, empty_hf_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_probe(*a, **k):
        raise AssertionError("offline env: the hub must not even be probed")

    monkeypatch.setattr(hub, "reachable", no_probe)
    flags = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    t = time.monotonic()
    with pytest.raises(ConfigError) as e:
        unsupervised_dataset("wikitext", "wikitext-2-raw-v1", data_tokenizer, block_size=8,
                             seed=1, cache_dir=str(tmp_path / "cache"))
    assert time.monotonic() - t < 5
    assert e.value.where == "--unsupervised-dataset-name"
    assert "'wikitext' (config 'wikitext-2-raw-v1'): no network" in e.value.message
    assert "save_to_disk" in e.value.message
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == flags


def test_unreachable_hub_fails_fast(tmp_path, monkeypatch, data_tokenizer, empty_hf_cache):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    probed = []
    monkeypatch.setattr(hub, "reachable", lambda: probed.append(1) or False)
    t = time.monotonic()
    with pytest.raises(ConfigError) as e:
        unsupervised_dataset("openwebtext", None, data_tokenizer, block_size=8, seed=1,
                             cache_dir=str(tmp_path / "cache"))
    assert time.monotonic() - t < 5 and probed == [1]
    assert e.value.where == "--unsupervised-dataset-name" and "no network" in e.value.message


def test_blocks_order_is_seeded(tmp_path, data_tokenizer):
    f = tmp_path / "c.txt"
    f.write_text("\n".join(DOCS))
    kw = dict(block_size=2, cache_dir=str(tmp_path / "cache"))
    a = unsupervised_dataset(str(f), None, data_tokenizer, seed=1, **kw)["input_ids"]
    b = unsupervised_dataset(str(f), None, data_tokenizer, seed=2, **kw)["input_ids"]
    assert a != b and sorted(a) == sorted(b)
    assert np.array(a).shape[1] == 2
