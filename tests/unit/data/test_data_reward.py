"""Step-2 tokenisation of chosen/rejected pairs, the pair collate, the cached step-2 datasets."""

import json
from dataclasses import replace

import pytest
import torch

from dschat_cli.config.schema import ConfigError
from dschat_cli.config.sections import DataOptions
from dschat_cli.data.cache import cache_path
from dschat_cli.data.reward import (collate_pairs, pair_drop_counts, reward_cache_key,
                                    reward_datasets, tokenize_pairs)
from dschat_cli.data.sft import sft_cache_key

PROMPT = " Human: What is a cat? Assistant:"
CHOSEN = " A small animal."
REJECTED = " A kind of car."


def _pairs(tok, rows, max_seq_len=512):
    batch = {k: [r.get(k) for r in rows] for k in ("prompt", "chosen", "rejected", "source")}
    return tokenize_pairs(batch, tok, max_seq_len)


def test_each_side_is_prompt_answer_eos(data_tokenizer):
    tok = data_tokenizer
    out = _pairs(tok, [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED, "source": "s"}])
    assert out["chosen_input_ids"] == [tok(PROMPT + CHOSEN)["input_ids"] + [tok.eos_token_id]]
    assert out["rejected_input_ids"] == [tok(PROMPT + REJECTED)["input_ids"] + [tok.eos_token_id]]
    assert out["source"] == ["s"]


@pytest.fixture
def bos_eos_tokenizer(data_tokenizer):
    """Like Llama's: the tokenizer itself adds <s> in front (and here also </s> at the end)."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(data_tokenizer)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 1)])
    return tok


def test_eos_not_doubled(bos_eos_tokenizer, data_tokenizer):
    row = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}
    with_eos = _pairs(bos_eos_tokenizer, [row])
    plain = _pairs(data_tokenizer, [row])
    for side in ("chosen_input_ids", "rejected_input_ids"):
        assert with_eos[side][0] == [2] + plain[side][0]  # <s> + text + a single </s>
        assert with_eos[side][0].count(data_tokenizer.eos_token_id) == 1


def test_truncation_keeps_the_beginning_and_drops_eos(data_tokenizer):
    tok = data_tokenizer
    row = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}
    full = _pairs(tok, [row])
    n = len(tok(PROMPT)["input_ids"]) + 2
    cut = _pairs(tok, [row], max_seq_len=n)
    for side in ("chosen_input_ids", "rejected_input_ids"):
        assert cut[side][0] == full[side][0][:n]
        assert tok.eos_token_id not in cut[side][0]  # a cut answer has no end


def test_missing_rejected_and_identical_pairs_dropped(data_tokenizer):
    tok = data_tokenizer
    rows = [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": None, "source": "a"},
            {"prompt": PROMPT, "chosen": CHOSEN, "rejected": "", "source": "b"},
            {"prompt": PROMPT, "chosen": CHOSEN, "rejected": CHOSEN, "source": "c"},
            {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED, "source": "d"},
            {"prompt": " Human: hi Assistant:", "chosen": " yo", "rejected": " no", "source": "e"}]
    out = _pairs(tok, rows)
    assert out["source"] == ["d", "e"] and len(out["chosen_input_ids"]) == 2
    # answers that differ only past max_seq_len give identical sequences: dropped too
    n_prompt = len(tok(PROMPT)["input_ids"])
    assert _pairs(tok, rows[3:4], max_seq_len=n_prompt)["chosen_input_ids"] == []


def test_collate_stacks_chosen_then_rejected_with_masks_from_lengths():
    eos = pad = 1  # pad == eos, as for models without a pad token
    feats = [{"chosen_input_ids": [5, 6, 7, eos], "rejected_input_ids": [5, 6, eos]},
             {"chosen_input_ids": [8, eos], "rejected_input_ids": [8, 9, 9, 9, eos]}]
    b = collate_pairs(feats, pad_token_id=pad)
    assert set(b) == {"input_ids", "attention_mask"}
    assert b["input_ids"].tolist() == [[5, 6, 7, 1, 1], [8, 1, 1, 1, 1],        # chosen
                                       [5, 6, 1, 1, 1], [8, 9, 9, 9, 1]]        # rejected
    # the eos is real (mask 1); the pads after it, equal to it, are not
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0],
                                            [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert all(t.dtype == torch.long for t in b.values())
    assert collate_pairs(feats, pad_token_id=0, pad_to_multiple_of=8)["input_ids"].shape == (4, 8)
    with pytest.raises(ValueError):
        collate_pairs(feats, pad_token_id=None)


def _write_dir(d, rows):
    d.mkdir()
    (d / "train.json").write_text(json.dumps(rows))
    (d / "eval.json").write_text(json.dumps(rows[:10]))
    return d


def test_reward_datasets_cached_keyed_and_counted(tmp_path, data_tokenizer, make_rows, monkeypatch):
    import dschat_cli.data.reward as reward

    rows = make_rows(50)
    for i, r in enumerate(rows):
        if i % 5 == 0:
            del r["rejected"]
        elif i % 5 == 1:
            r["rejected"] = r["chosen"]
    d = _write_dir(tmp_path / "pairs", rows)
    calls = []
    real = reward.load_phase_rows
    monkeypatch.setattr(reward, "load_phase_rows",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    opts = DataOptions(data_path=("local/jsonfile",), data_dir=str(d), data_split="0,10,0",
                       data_cache_dir=str(tmp_path / "cache"), max_seq_len=64)
    train, ev = reward_datasets(opts, data_tokenizer, seed=1234)
    assert calls[0][1] == 2  # phase 2 rows
    assert set(train.column_names) == {"chosen_input_ids", "rejected_input_ids", "source"}
    assert pair_drop_counts(train) == {"rows": 50, "no_rejected": 10, "identical": 10, "kept": 30}
    assert pair_drop_counts(ev) == {"rows": 10, "no_rejected": 2, "identical": 2, "kept": 6}
    row = train[0]
    eos = data_tokenizer.eos_token_id
    assert row["chosen_input_ids"][-1] == row["rejected_input_ids"][-1] == eos
    assert row["chosen_input_ids"] != row["rejected_input_ids"]

    train2, _ = reward_datasets(opts, data_tokenizer, seed=1234)
    assert len(calls) == 1 and train2["chosen_input_ids"] == train["chosen_input_ids"]
    assert pair_drop_counts(train2)["identical"] == 10  # counts survive the cache
    # the step-1 data of the same options lives elsewhere
    key = reward_cache_key(opts, data_tokenizer, seed=1234)
    sft_key = sft_cache_key(opts, data_tokenizer, mask_prompt=False, seed=1234)
    assert key["kind"] == "reward" and key["phase"] == 2
    assert cache_path(opts.data_cache_dir, key) != cache_path(opts.data_cache_dir, sft_key)
    # each of these changes the key, so the data is rebuilt
    reward_datasets(opts, data_tokenizer, seed=7)
    reward_datasets(replace(opts, max_seq_len=48), data_tokenizer, seed=1234)
    assert len(calls) == 3


def test_sft_only_source_is_a_clear_error(tmp_path, data_tokenizer):
    rows = [{"prompt": f"Human: q{i}? Assistant:", "chosen": f"a{i}."} for i in range(40)]
    d = _write_dir(tmp_path / "sftonly", rows)
    opts = DataOptions(data_path=("local/jsonfile",), data_dir=str(d),
                       data_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as e:
        reward_datasets(opts, data_tokenizer, seed=1234)
    assert e.value.where == "--data-path" and "no chosen/rejected pairs" in e.value.message


def test_every_pair_identical_within_max_seq_len(jsonfile_dir, tmp_path, data_tokenizer):
    opts = DataOptions(data_path=("local/jsonfile",), data_dir=str(jsonfile_dir),
                       data_cache_dir=str(tmp_path / "cache"), max_seq_len=8)
    with pytest.raises(ConfigError) as e:
        reward_datasets(opts, data_tokenizer, seed=1234)
    assert e.value.where == "--max-seq-len"


def test_reward_datasets_on_the_demo_pairs(pairs_dir, tiny_tokenizer, tmp_path):
    """The shared demo data (conftest's pairs_dir) through the whole step-2 path."""
    opts = DataOptions(data_path=("local/jsonfile",), data_dir=str(pairs_dir),
                       data_cache_dir=str(tmp_path / "cache"), max_seq_len=128)
    train, ev = reward_datasets(opts, tiny_tokenizer, seed=1234)
    # split 2,4,4: boundaries round(0.2 N), round(0.6 N); every demo row is a usable pair
    assert len(train) == round(256 * 0.6) - round(256 * 0.2)
    assert len(ev) == round(64 * 0.6) - round(64 * 0.2)
    assert pair_drop_counts(train) == {"rows": len(train), "no_rejected": 0, "identical": 0,
                                       "kept": len(train)}
    b = collate_pairs([train[i] for i in range(4)], tiny_tokenizer.pad_token_id)
    assert b["input_ids"].shape[0] == 8
    lengths = b["attention_mask"].sum(1)
    for i in range(4):
        for row, side in ((i, "chosen_input_ids"), (4 + i, "rejected_input_ids")):
            n = int(lengths[row])
            assert b["input_ids"][row, :n].tolist() == train[i][side]
            assert b["input_ids"][row, n - 1] == tiny_tokenizer.eos_token_id
