"""Each named source's row mapping, on synthetic rows in the source's real hub schema."""

import datasets
import pytest

from dschat_cli.data import sources as S


def test_rm_static_and_full_hh_are_verbatim():
    row = {"prompt": "\n\nHuman: What is a cat?\n\nAssistant:", "response": " A small feline.",
           "chosen": " A small feline.", "rejected": " No idea."}
    for name in ("Dahoas/rm-static", "Dahoas/full-hh-rlhf"):
        src = S.NAMED_SOURCES[name]
        assert src.eval_split == "test"
        assert src.map_row(row) == {"prompt": row["prompt"], "chosen": " A small feline.",
                                    "rejected": " No idea."}
    assert S.map_verbatim({**row, "chosen": ""}) is None  # unusable rows are skipped


def test_synthetic_instruct_gptj_pairwise_wraps_prompt():
    row = {"prompt": "Give me a fruit", "chosen": "An apple.", "rejected": "Rocks."}
    assert S.NAMED_SOURCES["Dahoas/synthetic-instruct-gptj-pairwise"].map_row(row) == {
        "prompt": " Human: Give me a fruit Assistant:", "chosen": " An apple.", "rejected": " Rocks."}
    assert S.NAMED_SOURCES["Dahoas/synthetic-instruct-gptj-pairwise"].eval_split is None  # 9:1 carve


def test_yitingxie_splits_on_assistant():
    row = {"prompt": "\n\nHuman: Why turkeys?\n\n",
           "chosen": "Assistant: Tradition.", "rejected": "Assistant: Because."}
    assert S.map_yitingxie(row) == {"prompt": "\n\nHuman: Why turkeys?\n\nAssistant:",
                                    "chosen": " Tradition.", "rejected": " Because."}


def _webgpt(score_0, score_1):
    return {"question": {"id": "q1", "full_text": "Why is the sky blue?", "dataset": "eli5"},
            "quotes_0": {"title": ["t"], "extract": ["e"]},
            "answer_0": "Rayleigh scattering [1] makes it blue (2).", "tokens_0": [1, 2],
            "score_0": score_0,
            "quotes_1": {"title": [], "extract": []}, "answer_1": "Because of the ocean.",
            "tokens_1": [3], "score_1": score_1}


def test_webgpt_picks_higher_score_and_strips_citations():
    r = S.map_webgpt(_webgpt(1.0, -1.0))
    assert r == {"prompt": " Human: Why is the sky blue? Assistant:",
                 "chosen": " Rayleigh scattering makes it blue.",
                 "rejected": " Because of the ocean."}
    r = S.map_webgpt(_webgpt(-0.5, 0.5))
    assert r["chosen"] == " Because of the ocean."
    assert r["rejected"] == " Rayleigh scattering makes it blue."
    tie = S.map_webgpt(_webgpt(0.0, 0.0))  # no preference: answer_0 kept, no pair
    assert tie["chosen"] == " Rayleigh scattering makes it blue." and tie["rejected"] is None


def _shp(labels):
    return {"post_id": "p", "domain": "askscience_train", "upvote_ratio": 0.9,
            "history": "How do magnets work?", "c_root_id_A": "a", "c_root_id_B": "b",
            "created_at_utc_A": 1, "created_at_utc_B": 2, "score_A": 10, "score_B": 3,
            "human_ref_A": "Electron spins align.", "human_ref_B": "Magic.", "labels": labels,
            "seconds_difference": 1.0, "score_ratio": 3.3}


def test_shp_labels_pick_the_preferred_reference():
    assert S.map_shp(_shp(1)) == {"prompt": " Human: How do magnets work? Assistant:",
                                  "chosen": " Electron spins align.", "rejected": " Magic."}
    assert S.map_shp(_shp(0))["chosen"] == " Magic."
    assert S.NAMED_SOURCES["stanfordnlp/SHP"].eval_split == "validation"


def test_sft_only_sources_have_no_rejected():
    assert S.map_sharegpt_vicuna({"prompt": "USER: hi ASSISTANT:", "label": "Hello!"}) == {
        "prompt": "Human: hi Assistant:", "chosen": " Hello!", "rejected": None}
    assert S.map_sharegpt_vicuna({"prompt": "", "label": "x"}) is None
    assert S.map_zhihu({"INSTRUCTION": "问题", "RESPONSE": "回答", "SOURCE": "Zhihu",
                        "METADATA": "{}"}) == {"prompt": " Human: 问题 Assistant:",
                                               "chosen": " 回答", "rejected": None}
    assert S.map_hc3_chinese({"id": "1", "question": "问", "human_answers": ["答"],
                              "chatgpt_answers": ["x"]})["chosen"] == " 答"
    assert S.map_hc3_chinese({"id": "1", "question": "问", "human_answers": [],
                              "chatgpt_answers": []}) is None
    mk = {"example_id": 1, "query": "who?", "queries": {"zh_cn": "谁", "ja": "誰"},
          "answers": {"zh_cn": [{"type": 1, "entity": "", "text": "他", "aliases": []}],
                      "ja": [{"type": 1, "entity": "", "text": "彼", "aliases": []}]}}
    assert S.NAMED_SOURCES["mkqa-Chinese"].map_row(mk) == {
        "prompt": " Human: 谁 Assistant:", "chosen": " 他", "rejected": None}
    assert S.NAMED_SOURCES["mkqa-Japanese"].map_row(mk)["chosen"] == " 彼"
    assert S.map_qg_jaquad({"answer": "a", "question": "質問", "sentence": "文。",
                            "paragraph": "p"}) == {"prompt": " Human: 質問 Assistant:",
                                                   "chosen": " 文。", "rejected": None}
    assert S.map_qag_jaquad({"answers": ["a"], "questions": ["問1", "問2"], "paragraph": "段落",
                             "questions_answers": "x"})["prompt"] == " Human: 問1 Assistant:"
    for name in ("pvduy/sharegpt_alpaca_oa_vicuna_format", "wangrui6/Zhihu-KOL", "lmqg/qg_jaquad",
                 "Hello-SimpleAI/HC3-Chinese", "mkqa-Chinese", "mkqa-Japanese", "lmqg/qag_jaquad"):
        assert not S.NAMED_SOURCES[name].pairwise


def test_miracl_passages():
    row = {"query_id": "1", "query": "什么?", "positive_passages": [
        {"docid": "d1", "text": "好", "title": "t"}], "negative_passages": [
        {"docid": "d2", "text": "坏", "title": "t"}]}
    assert S.map_miracl(row) == {"prompt": " Human: 什么? Assistant:", "chosen": " 好",
                                 "rejected": " 坏"}
    assert S.map_miracl({**row, "negative_passages": []})["rejected"] is None
    assert S.map_miracl({**row, "positive_passages": []}) is None
    assert S.NAMED_SOURCES["Cohere/miracl-ja-queries-22-12"].eval_split == "dev"


def test_local_rows_get_a_leading_space():
    assert S.map_local({"prompt": "Human: hi Assistant:", "chosen": "yo", "rejected": None}) == {
        "prompt": " Human: hi Assistant:", "chosen": " yo", "rejected": None}
    canon = {"prompt": " Human: hi Assistant:", "chosen": " yo", "rejected": " no"}
    assert S.map_local(canon) == canon  # canonical rows are unchanged


def _hub_dict(train_rows, **eval_sets):
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(train_rows),
                                 **{k: datasets.Dataset.from_list(v) for k, v in eval_sets.items()}})


def test_hub_source_end_to_end_uses_test_split(monkeypatch):
    rows = [{"prompt": f"\n\nHuman: q{i}\n\nAssistant:", "response": f" a{i}",
             "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(12)]
    monkeypatch.setattr(S, "_load_hub", lambda src, flag: _hub_dict(rows, test=rows[:3]))
    out = S.load_source("Dahoas/rm-static", None)
    assert len(out["train"]) == 12 and len(out["eval"]) == 3
    assert out["train"].column_names == ["prompt", "chosen", "rejected"]
    assert out["train"][0] == {"prompt": "\n\nHuman: q0\n\nAssistant:", "chosen": " a0",
                               "rejected": " b0"}
    assert S.source_fingerprint("dahoas/RM-static", None).startswith("hub:Dahoas/rm-static")


def test_hub_source_without_eval_split_is_carved(monkeypatch):
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(20)]
    monkeypatch.setattr(S, "_load_hub", lambda src, flag: _hub_dict(rows))
    out = S.load_source("Dahoas/synthetic-instruct-gptj-pairwise", None, seed=5)
    assert (len(out["train"]), len(out["eval"])) == (18, 2)
    both = set(out["train"]["prompt"]) | set(out["eval"]["prompt"])
    assert len(both) == 20  # disjoint
    again = S.load_source("Dahoas/synthetic-instruct-gptj-pairwise", None, seed=5)
    assert again["eval"]["prompt"] == out["eval"]["prompt"]


def test_hub_source_with_wrong_schema_names_columns(monkeypatch):
    from dschat_cli.config.schema import ConfigError

    monkeypatch.setattr(S, "_load_hub", lambda src, flag: _hub_dict([{"text": "x"}]))
    with pytest.raises(ConfigError) as e:
        S.load_source("stanfordnlp/SHP", None)
    assert e.value.where == "--data-path" and "history" in e.value.message
