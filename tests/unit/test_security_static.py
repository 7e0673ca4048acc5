"""Static checks of the package source (read with `ast`, nothing imported):

- no unpickling: no pickle/dill/joblib/marshal/shelve, every torch.load passes weights_only=True,
  no numpy load with allow_pickle=True. Weights are safetensors, data caches arrow + JSON. The
  one pickle reader left is DeepSpeed's own engine.load_checkpoint (torch.load with
  weights_only=False inside DeepSpeed) for resuming a run's checkpoints; it may be called from
  steps/checkpoint.py only, so a new call site cannot appear unnoticed.
- model code runs only with the user's consent: every from_pretrained passes trust_remote_code
  explicitly (left out, transformers asks on stdin when a model ships code).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("dschat_cli", "benchmarks", "examples") if (ROOT / d).is_dir()
                 for p in (ROOT / d).rglob("*.py"))
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}
CHECKPOINT_LOADERS = {"dschat_cli/steps/checkpoint.py"}


def _dotted(node: ast.AST) -> str:
    """'torch.load' for the call target torch.load; '' when not a plain name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


@functools.lru_cache(maxsize=1)
def _nodes() -> tuple:
    out = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        out += [(path, node) for node in ast.walk(tree)]
    return tuple(out)


def _walk():
    return iter(_nodes())


def test_sources_found():
    assert any(p.name == "loading.py" for p in SOURCES) and len(SOURCES) > 20


def test_nothing_unpickles():
    bad = []
    for path, node in _walk():
        if isinstance(node, ast.Import):
            bad += [f"{_where(path, node)} import {a.name}" for a in node.names
                    if a.name.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
            bad.append(f"{_where(path, node)} from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and \
                any(a.name == "load" for a in node.names):
            bad.append(f"{_where(path, node)} from torch import load (call torch.load)")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name == "torch.load" and not _is_true(_kw(node, "weights_only")):
                bad.append(f"{_where(path, node)} torch.load without weights_only=True")
            if name.split(".")[-1] == "load" and name.split(".")[0] in ("np", "numpy") and \
                    _is_true(_kw(node, "allow_pickle")):
                bad.append(f"{_where(path, node)} {name}(allow_pickle=True)")
            if name.endswith(".load_checkpoint") and \
                    str(path.relative_to(ROOT)) not in CHECKPOINT_LOADERS:
                bad.append(f"{_where(path, node)} {name}: DeepSpeed checkpoints are pickles; "
                           "load them only through steps/checkpoint.py")
    assert bad == []


def test_every_from_pretrained_says_whether_to_trust_remote_code():
    missing = [f"{_where(path, node)} {_dotted(node.func)}" for path, node in _walk()
               if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
               and node.func.attr == "from_pretrained" and _kw(node, "trust_remote_code") is None]
    assert missing == []


def test_the_checks_see_what_they_look_for():
    """The walkers above flag the patterns they are meant to (so a pass means something)."""
    tree = ast.parse("import pickle\nimport torch\ntorch.load(f)\n"
                     "torch.load(f, weights_only=True)\nAutoModel.from_pretrained(p)\n"
                     "AutoModel.from_pretrained(p, trust_remote_code=False)\n")
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    loads = [c for c in calls if _dotted(c.func) == "torch.load"]
    assert [_is_true(_kw(c, "weights_only")) for c in loads] == [False, True]
    pretrained = [c for c in calls if getattr(c.func, "attr", "") == "from_pretrained"]
    assert [_kw(c, "trust_remote_code") is None for c in pretrained] == [True, False]
    assert [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
            if a.name in UNPICKLERS] == ["pickle"]
