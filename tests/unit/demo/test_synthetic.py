"""The synthetic preference data set: format, determinism, disjoint held-out questions."""

from __future__ import annotations

import json

from dschat_cli.demo.judge import judge, true_reward
from dschat_cli.demo.synthetic import (POLITE_OPENERS, RUDE_OPENERS, demo_corpus, make_pairs,
                                       write_jsonfile_dir)

POLITE = tuple(POLITE_OPENERS)
RUDE = tuple(RUDE_OPENERS)


def test_rows_format_and_determinism():
    rows = make_pairs(200, seed=3)
    assert rows == make_pairs(200, seed=3)
    assert rows != make_pairs(200, seed=4)
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected"}
        assert r["prompt"].startswith(" Human: ") and r["prompt"].endswith(" Assistant:")
        assert r["chosen"].startswith(" ") and r["rejected"].startswith(" ")
        assert r["chosen"] != r["rejected"]
        assert not r["chosen"].lstrip().startswith(RUDE)
        assert not any(w in r["chosen"] for w in ("stupid", "idiot", "dumb", "Go away"))
        # the data and the true reward agree on every pair
        assert true_reward(r["prompt"], r["chosen"]) > true_reward(r["prompt"], r["rejected"])
    assert len({r["prompt"] for r in rows}) > 100  # varied wording
    assert len({r["chosen"] for r in rows}) > 150
    # most chosen answers are polite; the rejected ones are mostly hard negatives, not plain rude
    assert sum(r["chosen"].lstrip().startswith(POLITE) for r in rows) > 120
    assert sum(r["rejected"].lstrip().startswith(RUDE) for r in rows) < 60
    assert sum(r["rejected"].lstrip().startswith(POLITE) for r in rows) > 100


def test_true_reward_ranks_answers():
    p = " Human: How do I bake bread? Assistant:"
    good = " Sure! Knead the dough well and let it rise before baking. Thank you for asking."
    assert true_reward(p, good) == 1.0
    generic = " Sure! Start slowly and practice a little every day. Thank you for asking."
    assert true_reward(p, generic) == 0.85  # names no topic: half the topic credit
    for worse in (" Sure! Grind the beans just before brewing. Thank you for asking.",  # off topic
                  " Of course!", " Of course!!!!!!!!!!!", " Sure Sure Sure Sure Sure",
                  " Sure! Knead the dough knead the dough knead the dough",
                  " Sure! Knead the dough well and", " Sure! Knead the dough well. Thank you for "
                  "asking. Thank you for asking."):
        assert true_reward(p, worse) < true_reward(p, generic), worse
    rude = " Sure! Knead the dough well, idiot. Thank you for asking."
    assert true_reward(p, rude) == 0.0
    parts = judge(p, " Of course!!!!!!")
    assert (parts.opener, parts.closing, parts.well_formed, parts.complete) == (1, 0, 0, 0)


def test_jsonfile_dir_disjoint_questions(tmp_path):
    out = write_jsonfile_dir(tmp_path / "d", n_train=300, n_eval=80, seed=0)
    train = json.loads((out / "train.json").read_text())
    ev = json.loads((out / "eval.json").read_text())
    assert len(train) == 300 and len(ev) == 80
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}
    # Whatever the seeds, eval questions never appear in train.
    other = make_pairs(2000, seed=7, split="train")
    assert not {r["prompt"] for r in other} & {r["prompt"] for r in ev}


def test_jsonfile_loads_with_datasets(pairs_dir):
    from datasets import load_dataset

    ds = load_dataset("json", data_files={"train": str(pairs_dir / "train.json"),
                                          "eval": str(pairs_dir / "eval.json")})
    assert ds["train"].num_rows == 256 and ds["eval"].num_rows == 64
    assert set(ds["train"].column_names) == {"prompt", "chosen", "rejected"}


def test_demo_corpus_tokenizer_covers_words():
    from dschat_cli.models.local_tokenizer import build_local_tokenizer

    tok = build_local_tokenizer(texts=demo_corpus())
    vocab = tok.get_vocab()
    for word in ("ĠHuman", "ĠAssistant", "ĠSure", "ĠThank", "Ġhelp"):
        assert word in vocab, word
    row = make_pairs(1, seed=0, split="eval")[0]
    assert len(tok(row["prompt"] + row["chosen"])["input_ids"]) < 100


def test_word_tokenizer_round_trips_demo_text(tmp_path):
    from transformers import AutoTokenizer

    from dschat_cli.models.local_tokenizer import build_word_tokenizer

    build_word_tokenizer(texts=demo_corpus()).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) < 1500
    for row in make_pairs(50, seed=0, split="eval"):
        for text in (row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]):
            ids = tok(text)["input_ids"]
            # every pair fits the demo's --max-seq-len (96) whole: nothing trains on a cut answer
            assert tok.unk_token_id not in ids and len(ids) <= 96
            assert tok.decode(ids) == text
    ids = tok(" Sure!!!")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["ĠSure", "!", "!", "!"]
