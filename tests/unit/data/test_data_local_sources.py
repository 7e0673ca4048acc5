"""Local sources (local/jsonfile, save_to_disk folders, json/jsonl/parquet) and their errors."""

import json
import os

import datasets
import pytest

from dschat_cli.config.schema import ConfigError
from dschat_cli.data.sources import load_source, source_fingerprint


def _err(fn, *args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        fn(*args, **kwargs)
    assert "\n" not in e.value.message  # one line, not a traceback
    return e.value


def test_local_jsonfile(jsonfile_dir):
    out = load_source("local/jsonfile", str(jsonfile_dir))
    assert (len(out["train"]), len(out["eval"])) == (40, 10)
    assert out["train"][0] == {"prompt": " Human: train question 0? Assistant:",
                               "chosen": " good answer 0.", "rejected": " bad answer 0."}
    assert out["eval"][0]["prompt"].startswith(" Human: eval question 0")


def test_local_jsonfile_without_eval_json_carves(jsonfile_dir, make_rows):
    (jsonfile_dir / "eval.json").unlink()
    out = load_source("local/jsonfile", str(jsonfile_dir))
    assert (len(out["train"]), len(out["eval"])) == (36, 4)


def test_local_jsonfile_errors(tmp_path):
    assert _err(load_source, "local/jsonfile", None).where == "--data-dir"
    assert _err(load_source, "local/jsonfile", str(tmp_path / "nope")).where == "--data-dir"
    e = _err(load_source, "local/jsonfile", str(tmp_path))
    assert e.where == "--data-dir" and "train.json" in e.message


def test_save_to_disk_dataset_and_dict(tmp_path, make_rows):
    ds = datasets.Dataset.from_list(make_rows(30))
    ds.save_to_disk(str(tmp_path / "one"))
    out = load_source(str(tmp_path / "one"), None)
    assert (len(out["train"]), len(out["eval"])) == (27, 3)

    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(make_rows(5, "t"))})
    dd.save_to_disk(str(tmp_path / "dict"))
    before = sorted(os.listdir(tmp_path / "dict" / "train"))
    out = load_source(str(tmp_path / "dict"), None)
    assert (len(out["train"]), len(out["eval"])) == (30, 5)
    assert out["eval"][0]["prompt"] == " Human: t question 0? Assistant:"
    assert sorted(os.listdir(tmp_path / "dict" / "train")) == before  # no cache files written there


def test_save_to_disk_copy_of_a_hub_source_uses_its_mapping(tmp_path):
    """A folder named after a hub source (as the reference's substring match) gets its mapping."""
    rows = [{"post_id": str(i), "history": f"h{i}", "human_ref_A": f"A{i}", "human_ref_B": f"B{i}",
             "labels": i % 2} for i in range(6)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                               "validation": datasets.Dataset.from_list(rows[:2])})
    path = tmp_path / "stanfordnlp" / "SHP"
    dd.save_to_disk(str(path))
    out = load_source(str(path), None)
    assert (len(out["train"]), len(out["eval"])) == (6, 2)
    assert out["train"][1] == {"prompt": " Human: h1 Assistant:", "chosen": " A1", "rejected": " B1"}


def test_json_jsonl_parquet_files(tmp_path, make_rows):
    rows = make_rows(20)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))  # JSONL in .json
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    outs = [load_source(str(tmp_path / f), None, seed=9)
            for f in ("d.json", "d.jsonl", "lines.json", "d.parquet")]
    for out in outs:
        assert (len(out["train"]), len(out["eval"])) == (18, 2)
        assert out["eval"]["prompt"] == outs[0]["eval"]["prompt"]  # same seeded carve
    # rejected is optional
    (tmp_path / "sft.json").write_text(json.dumps([{"prompt": "p", "chosen": "c"}] * 3))
    assert load_source(str(tmp_path / "sft.json"), None)["train"][0]["rejected"] is None


@pytest.mark.parametrize("content,where_is_file,needle", [
    (b'[{"prompt": "p"}]', True, "row 0 has no 'chosen' field"),
    (b'[{"chosen": "c"}]', True, "no 'prompt' field"),
    (b'[]', True, "has no rows"),
    (b'[{"prompt": "p", "chosen": ', True, "is not valid JSON"),
    (b'[{"prompt": "caf\xe9", "chosen": "c"}]', True, "not UTF-8"),
    (b'{"prompt": "p", "chosen": "c"}', True, "must hold a JSON list"),
    (b'[{"prompt": ["a"], "chosen": "c"}]', True, "must be text"),
])
def test_bad_json_files(tmp_path, content, where_is_file, needle):
    f = tmp_path / "bad.json"
    f.write_bytes(content)
    e = _err(load_source, str(f), None)
    assert e.where == str(f)
    assert needle in e.message


def test_bad_jsonl_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "p", "chosen": "c"}\n{oops\n')
    e = _err(load_source, str(f), None)
    assert e.where == str(f) and "line 2" in e.message


def test_parquet_missing_column(tmp_path):
    f = tmp_path / "x.parquet"
    datasets.Dataset.from_list([{"question": "q", "answer": "a"}]).to_parquet(str(f))
    e = _err(load_source, str(f), None)
    assert e.where == str(f) and "no 'prompt' column" in e.message


def test_path_errors(tmp_path):
    e = _err(load_source, str(tmp_path / "missing.json"), None)
    assert e.where == "--data-path" and "no such file" in e.message
    (tmp_path / "data.csv").write_text("prompt,chosen\n")
    e = _err(load_source, str(tmp_path / "data.csv"), None)
    assert e.where == "--data-path" and "unsupported file type '.csv'" in e.message
    (tmp_path / "empty_folder").mkdir()
    e = _err(load_source, str(tmp_path / "empty_folder"), None)
    assert "save_to_disk" in e.message
    e = _err(load_source, "someone/unknown-dataset", None)
    assert e.where == "--data-path" and "unknown data source" in e.message
    assert "Dahoas/rm-static" in e.message
    e = _err(load_source, "someone/unknown-dataset", None, flag="--sft-only-data-path")
    assert e.where == "--sft-only-data-path"


def test_all_rows_unusable(tmp_path):
    f = tmp_path / "nulls.json"
    f.write_text(json.dumps([{"prompt": None, "chosen": "c"}, {"prompt": "p", "chosen": ""}]))
    e = _err(load_source, str(f), None)
    assert "no usable rows" in e.message


def test_fingerprint_tracks_file_changes(jsonfile_dir, tmp_path, make_rows):
    a = source_fingerprint("local/jsonfile", str(jsonfile_dir))
    assert a == source_fingerprint("local/jsonfile", str(jsonfile_dir))
    f = jsonfile_dir / "eval.json"
    f.write_text(json.dumps(make_rows(11, "eval")))
    assert source_fingerprint("local/jsonfile", str(jsonfile_dir)) != a
    ds = datasets.Dataset.from_list(make_rows(4))
    ds.save_to_disk(str(tmp_path / "saved"))
    b = source_fingerprint(str(tmp_path / "saved"), None)
    assert b.startswith("local:folder:") and b != a
    with pytest.raises(ConfigError):
        source_fingerprint(str(tmp_path / "gone.json"), None)
