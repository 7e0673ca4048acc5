"""Hub names without network fail fast with a ConfigError, never hang."""

import socket
import time
from pathlib import Path

import datasets
import huggingface_hub
import pytest

from dschat_cli import hub
from dschat_cli.config.schema import ConfigError
from dschat_cli.data import sources as S


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_hub"))


def test_offline_env_fails_fast(monkeypatch, empty_hf_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def no_probe(*a, **k):
        raise AssertionError("offline env: the hub must not even be probed")

    monkeypatch.setattr(hub, "reachable", no_probe)
    flags = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    t = time.monotonic()
    with pytest.raises(ConfigError) as e:
        S.load_source("Dahoas/rm-static", None)
    assert time.monotonic() - t < 5
    assert e.value.where == "--data-path"
    assert "cannot load hub dataset 'Dahoas/rm-static': no network and not in the local cache" \
        in e.value.message
    assert "save_to_disk" in e.value.message and "local/jsonfile" in e.value.message
    # the forced offline mode is undone afterwards
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == flags


def test_unreachable_hub_fails_fast(monkeypatch, empty_hf_cache):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    probed = []
    monkeypatch.setattr(hub, "reachable", lambda: probed.append(1) or False)
    t = time.monotonic()
    with pytest.raises(ConfigError) as e:
        S.load_source("stanfordnlp/SHP", None)
    assert time.monotonic() - t < 5
    assert probed == [1]
    assert e.value.where == "--data-path" and "no network" in e.value.message


def test_reachability_probe(monkeypatch):
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{port}")
        assert hub.probe(timeout=2.0)
    finally:
        server.close()
    # the port is closed now: refused at once
    t = time.monotonic()
    assert not hub.probe(timeout=2.0)
    assert time.monotonic() - t < 3


def test_offline_loads_from_the_local_hf_cache(tmp_path, monkeypatch, empty_hf_cache):
    """A hub dataset downloaded earlier loads offline. The cache entry is faked in datasets' own
    layout (<cache>/<ns>___<name>/<config>/<version>/<hash>/<name>-<split>.arrow)."""
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [{"prompt": f"\n\nHuman: q{i}\n\nAssistant:", "response": " a", "chosen": " a",
             "rejected": " b"} for i in range(10)]
    for split, part in (("train", rows), ("test", rows[:3])):
        datasets.Dataset.from_list(part).to_parquet(str(tmp_path / f"{split}.parquet"))
    build_cache = tmp_path / "build_cache"
    datasets.load_dataset("parquet", cache_dir=str(build_cache), data_files={
        "train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")})
    built = next(p for p in build_cache.glob("parquet/*/*/*") if p.is_dir())
    entry = Path(datasets.config.HF_DATASETS_CACHE) / "Dahoas___rm-static/default/0.0.0/abc"
    shutil.copytree(built, entry)
    for split in ("train", "test"):
        (entry / f"parquet-{split}.arrow").rename(entry / f"rm-static-{split}.arrow")

    out = S.load_source("Dahoas/rm-static", None)
    assert (len(out["train"]), len(out["eval"])) == (10, 3)
    assert out["train"][0]["prompt"] == "\n\nHuman: q0\n\nAssistant:"
