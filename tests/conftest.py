"""Shared test setup: an offline, CPU-only, quiet environment and tiny models built once per session.

Environment (set at import, before any test module imports torch/deepspeed/transformers):
  DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1, HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1,
  TRANSFORMERS_OFFLINE=1, TOKENIZERS_PARALLELISM=false, PYTHONUNBUFFERED=1 and a fixed
  TORCH_EXTENSIONS_DIR (~/.cache/dschat-test/torch_extensions, so DeepSpeed's JIT-built ops such as
  shm_comm are built once per machine) are defaults the caller may override. HF_HOME is always a
  fresh temp dir (removed at exit), so no test reads or writes the user's hub/datasets cache.
  Subprocesses started by tests (torchrun, deepspeed) inherit all of this; the checkout is put on
  sys.path and PYTHONPATH so plain `pytest` and child processes import it without pip install.

Slow tests (`@pytest.mark.slow`) run by default; `make test-fast` passes `-m "not slow"`.

Fixtures (session-scoped unless noted):
  tiny_tokenizer_dir    Path of the demo-corpus local tokenizer, saved once.
  tiny_tokenizer        (function scope) a fresh AutoTokenizer loaded from it; safe to mutate.
  tiny_model_dir        factory: tiny_model_dir(family, **build_kw) -> Path of a saved tiny model
                        (+ tokenizer), built once per distinct arguments.
  tiny_opt, tiny_llama, tiny_gpt2, tiny_neox
                        Paths of the saved default tiny models of each family.
  tiny_any              parametrised over all families: a test using it runs once per family.
  pairs_dir             a local/jsonfile folder (train.json 256 pairs, eval.json 64 pairs).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# --- environment: must run before torch / deepspeed / transformers are imported -------------------
_ENV_DEFAULTS = {
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    "TORCH_EXTENSIONS_DIR": os.path.expanduser("~/.cache/dschat-test/torch_extensions"),
}
for _k, _v in _ENV_DEFAULTS.items():
    os.environ.setdefault(_k, _v)

_HF_HOME = tempfile.mkdtemp(prefix="dschat-test-hf-")
os.environ["HF_HOME"] = _HF_HOME
# Variables that would take precedence over HF_HOME for one of the caches.
for _k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE"):
    os.environ.pop(_k, None)
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)

# Make the checkout importable under plain `pytest` too (when dschat is not pip-installed).
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)
# ... and in subprocesses the tests start (torchrun, deepspeed launcher, `python -m dschat_cli...`).
_pp = os.environ.get("PYTHONPATH", "")
if _REPO_ROOT not in _pp.split(os.pathsep):
    os.environ["PYTHONPATH"] = _REPO_ROOT + (os.pathsep + _pp if _pp else "")

import pytest  # noqa: E402

FAMILIES = ("opt", "llama", "gpt2", "gpt_neox")


@pytest.fixture(autouse=True)
def _unset_hf_deepspeed_config():
    """A live HfDeepSpeedConfig (ZeRO-3) changes how later from_pretrained/generate calls behave;
    drop it after every test. Cheap: only looks if transformers' deepspeed module was imported."""
    yield
    mod = sys.modules.get("transformers.integrations.deepspeed")
    if mod is not None:
        try:
            mod.unset_hf_deepspeed_config()
        except Exception:  # noqa: BLE001 - teardown must never fail a test
            pass


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from dschat_cli.demo.synthetic import demo_corpus
    from dschat_cli.models.local_tokenizer import build_local_tokenizer

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    build_local_tokenizer(texts=demo_corpus(), model_max_length=512).save_pretrained(out)
    return out


@pytest.fixture
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """Factory: tiny_model_dir("llama", hidden=32) -> Path of a saved model + tokenizer folder."""
    from transformers import AutoTokenizer

    from dschat_cli.models.tiny import save_tiny_model

    cache: dict[tuple, Path] = {}
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)

    def make(family: str, **kw) -> Path:
        key = (family, tuple(sorted(kw.items())))
        if key not in cache:
            suffix = "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
            out = tmp_path_factory.mktemp(f"tiny_{family}{'-' + suffix if suffix else ''}")
            cache[key] = save_tiny_model(family, out, tokenizer=tokenizer, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_opt(tiny_model_dir) -> Path:
    return tiny_model_dir("opt")


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_model_dir) -> Path:
    return tiny_model_dir("gpt2")


@pytest.fixture(scope="session")
def tiny_neox(tiny_model_dir) -> Path:
    return tiny_model_dir("gpt_neox")


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_any(request, tiny_model_dir) -> Path:
    """The saved tiny model of each family in turn (test ids: [opt], [llama], [gpt2], [gpt_neox])."""
    return tiny_model_dir(request.param)


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory) -> Path:
    from dschat_cli.demo.synthetic import write_jsonfile_dir

    # the easy task (good vs plain rude answers): the demo's hard negatives need a bigger model
    return write_jsonfile_dir(tmp_path_factory.mktemp("pairs"), n_train=256, n_eval=64, seed=0,
                              hard_negatives=False)


@pytest.fixture
def one_rank(monkeypatch):
    """A world of one in this process (DeepSpeed engines in unit tests); the env Dist.init()
    reads is restored afterwards."""
    from dschat_cli.dist import Dist, free_port

    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    return Dist.init()
