"""Imports flow one way between dschat_cli's sub-packages (DESIGN.md): cli -> pipeline -> launch on
the user's side; worker -> steps -> generation / rlhf / data / models -> config / dist / ui on the
rank's side. Every import counts, the lazy ones inside functions too: a function-level import is
still a dependency, only a later one.

A sub-package is a folder under dschat_cli/ (config, launch, plan, ...) or a top-level module
(pipeline.py, worker.py, doctor.py, dist.py, ...)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "dschat_cli"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dschat_cli module named by an import anywhere in the tree (module level, inside
    functions and classes, under `if TYPE_CHECKING`), relative imports resolved."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            # `from dschat_cli import worker` imports the module dschat_cli.worker
            names.update(f"{target}.{a.name}" for a in node.names if a.name != "*")
    return {n for n in names if n == "dschat_cli" or n.startswith("dschat_cli.")}


def subpackage(module: str) -> str | None:
    """dschat_cli.launch.step -> launch; dschat_cli.pipeline -> pipeline; dschat_cli -> None."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    name = parts[1]
    if (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file():
        return name
    return None  # a name imported from the package root (`from dschat_cli import __version__`)


def module_edges() -> dict[tuple[str, str], list[str]]:
    """{(from sub-package, to sub-package): ["file.py imports dschat_cli.x.y", ...]}."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        src = subpackage(module)
        if src is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for target in sorted(_imported(tree, module, path.name == "__init__.py")):
            dst = subpackage(target)
            if dst is None or dst == src:
                continue
            edges.setdefault((src, dst), []).append(
                f"{path.relative_to(PACKAGE.parent)} imports {target}")
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of the directed graph, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """(group, one cycle in it) for each group of sub-packages that import each other (each
    strongly connected component of more than one node), so that every tangle is reported at
    once."""
    nodes = sorted(set(graph) | {n for targets in graph.values() for n in targets})

    def reach(start: str) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = {n: reach(n) for n in nodes}
    found, done = [], set()
    for n in nodes:
        if n in done:
            continue
        group = {m for m in reachable[n] if n in reachable[m]}
        done |= group
        if len(group) > 1:
            found.append((sorted(group),
                          find_cycle({a: graph.get(a, set()) & group for a in group})))
    return found


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}) == ["y", "y2", "y"]
    assert cycles({"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c"}, "e": {"a"}}) == \
        [(["a", "b"], ["a", "b", "a"]), (["c", "d"], ["c", "d", "c"])]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "b"}})[0][0] == ["a", "b", "c"]
    assert cycles({"a": {"b"}, "b": {"c"}}) == []


def test_imports_are_parsed_at_every_level(tmp_path):
    tree = ast.parse("import dschat_cli.dist\n"
                     "from dschat_cli import worker\n"
                     "def f():\n    from dschat_cli.plan.arch import load_arch\n"
                     "class C:\n    def g(self):\n        from ..ui import console\n"
                     "        from .common import x\n")
    found = _imported(tree, "dschat_cli.steps.sft", is_package=False)
    assert {"dschat_cli.dist", "dschat_cli.worker", "dschat_cli.plan.arch", "dschat_cli.ui",
            "dschat_cli.ui.console", "dschat_cli.steps.common"} <= found
    assert {subpackage(m) for m in found} >= {"dist", "worker", "plan", "ui", "steps"}


def test_no_import_cycle_between_subpackages():
    edges = module_edges()
    graph: dict[str, set[str]] = {}
    for src, dst in edges:
        graph.setdefault(src, set()).add(dst)
    lines = []
    for group, cycle in cycles(graph):
        lines.append(f"sub-packages {', '.join(group)} import each other; one cycle: "
                     f"{' -> '.join(cycle)}")
        for a, b in zip(cycle, cycle[1:]):
            lines += [f"  {a} -> {b}:"] + [f"    {why}" for why in edges[(a, b)]]
    assert not lines, "\n".join(lines)


def test_plan_arithmetic_imports_without_torch():
    """`dschat plan` answers on a laptop: its arithmetic loads no torch (nor anything that does)."""
    code = ("import sys\n"
            "import dschat_cli.plan.memory, dschat_cli.plan.arch, dschat_cli.config.schedule\n"
            "import dschat_cli.plan.planner, dschat_cli.config.steps, dschat_cli.config.resolved\n"
            "import dschat_cli.generation.tp_layouts  # plan and checks with tensor-parallel generation\n"
            "bad = sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules)\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
