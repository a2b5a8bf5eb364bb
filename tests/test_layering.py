"""The architecture as the README draws it: every module imports only from modules listed below
its own entry in the README's architecture section (or from its own package), and the import
graph has no cycle. Imports inside functions count too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("amortjax", "experiments")


def _entries() -> list[str]:
    """The README architecture block's entries, top to bottom: "experiments/", "evaluation/",
    "engine.py", ... (the amortjax entries are the indented ones)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Architecture") :]
    block = section[section.index("```") + 3 :]
    block = block[: block.index("```")]
    entries = []
    for line in block.splitlines():
        match = re.match(r"^(?:  )?([A-Za-z_]+(?:/|\.py))(?:\s{2,}|$)", line)
        if match and match.group(1) != "amortjax/":
            entries.append(match.group(1))
    return entries


def _entry_of(module: str) -> str:
    """The README entry of a module: amortjax.inference.local -> "inference/",
    amortjax.engine -> "engine.py", experiments.runner -> "experiments/"."""
    parts = module.split(".")
    if parts[0] == "experiments":
        return "experiments/"
    if len(parts) == 1:
        return "amortjax"
    return parts[1] + ("/" if (ROOT / "amortjax" / parts[1]).is_dir() else ".py")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _imports(path: Path) -> set[str]:
    """The project modules that the file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{alias.name}"
                if _is_module(f"{node.module}.{alias.name}")
                else node.module
                for alias in node.names
            ]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def _graph() -> dict[str, set[str]]:
    return {
        _module_name(path): _imports(path)
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def test_every_module_has_an_entry_and_every_entry_exists():
    entries = _entries()
    assert len(entries) == len(set(entries)), f"an entry is listed twice: {entries}"
    modules = {_entry_of(m) for m in _graph()} - {"amortjax"}
    assert modules <= set(entries), f"modules missing from the README: {modules - set(entries)}"
    for entry in entries:
        exists = (ROOT / entry).exists() or (ROOT / "amortjax" / entry).exists()
        assert exists, f"the README lists {entry}, which does not exist"


def test_every_module_imports_only_from_modules_listed_below_it():
    rank = {entry: i for i, entry in enumerate(_entries())}
    upward = []
    for module, imported in _graph().items():
        if module == "amortjax":  # the package's facade re-exports the public API
            continue
        source = _entry_of(module)
        for target in imported:
            target_entry = _entry_of(target)
            if target_entry == "amortjax" and not module.startswith("experiments"):
                upward.append(f"{module} imports the amortjax facade (import the module itself)")
            elif target_entry != "amortjax" and target_entry != source:
                if rank[target_entry] <= rank[source]:
                    upward.append(f"{module} ({source}) imports {target} ({target_entry})")
    assert not upward, "imports that go up the architecture:\n" + "\n".join(sorted(upward))


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] if target in path else path
                raise AssertionError("import cycle: " + " -> ".join([*cycle, target]))
            if target in graph and not state.get(target):
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module, [module])


def test_the_checker_sees_an_upward_import(tmp_path):
    """The parser finds imports inside functions and `from package import module` forms."""
    source = tmp_path / "m.py"
    source.write_text(
        "def f():\n    from amortjax.evaluation import ais\n    import amortjax.engine\n"
        "from amortjax.inference import hmc\n"
    )
    assert _imports(source) == {
        "amortjax.evaluation.ais",
        "amortjax.engine",
        "amortjax.inference.hmc",
    }
    assert _entry_of("amortjax.evaluation.ais") == "evaluation/"
    assert _entry_of("amortjax.engine") == "engine.py"
