"""Fixtures of the data-layer tests: a locally trained tokenizer, tiny local data files."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def data_tokenizer():
    from dschat_cli.models.local_tokenizer import build_local_tokenizer

    return build_local_tokenizer()  # pad=0, eos=1, bos=2


def make_rows(n: int, tag: str = "q") -> list[dict]:
    return [{"prompt": f"Human: {tag} question {i}? Assistant:", "chosen": f"good answer {i}.",
             "rejected": f"bad answer {i}."} for i in range(n)]


@pytest.fixture(name="make_rows")
def make_rows_fixture():
    return make_rows


@pytest.fixture
def jsonfile_dir(tmp_path):
    """A local/jsonfile folder: train.json (40 rows) and eval.json (10 rows)."""
    d = tmp_path / "jsonfile"
    d.mkdir()
    (d / "train.json").write_text(json.dumps(make_rows(40, "train")))
    (d / "eval.json").write_text(json.dumps(make_rows(10, "eval")))
    return d
