"""The library's boundary: ``entities/`` is the science (data, models, sharing modes, attacks) and knows
neither Flower nor Ray nor any experiment; those live in ``sim/`` and ``strategies/``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import entities

LIBRARY = Path(entities.__file__).parent
FORBIDDEN = ("flwr", "ray", "sim", "strategies", "benchmarks")


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in the file names, lazy ones inside functions too."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_library_source_imports_no_framework_or_experiment():
    offending = {str(p.relative_to(LIBRARY.parent)): sorted(m for m in imported_modules(p)
                                                           if m.split(".")[0] in FORBIDDEN)
                 for p in sorted(LIBRARY.rglob("*.py"))}
    assert not {k: v for k, v in offending.items() if v}


def test_importing_every_library_module_loads_neither_flower_nor_ray():
    """The same at run time, so an indirect import (a dependency pulling Flower in) is caught too."""
    code = ("import pkgutil, sys, importlib, entities\n"
            "for m in pkgutil.walk_packages(entities.__path__, 'entities.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'flwr', 'ray', 'sim', 'strategies'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=LIBRARY.parent, check=True).stdout
    assert out.strip() == "[]"


def test_every_preset_ships_as_package_data_and_loads():
    from entities.presets import PRESETS, load_config, preset_names

    names = preset_names()
    assert {"default", "collab", "tiny", "table5-tiny", "collab-tiny"} <= set(names)
    # the top-level configs/ the layout fixes, a package so that `pip install .` carries them
    assert Path(str(PRESETS)) == LIBRARY.parent / "configs" and (Path(str(PRESETS)) / "__init__.py").is_file()
    for name in names:
        assert load_config(name).name == name


def test_results_default_to_the_current_directory(tmp_path, monkeypatch):
    from entities.policy import load_policy
    from entities.presets import load_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("POISONPOOL_STORE", raising=False)
    assert load_config("tiny").results_dir() == tmp_path / "results"
    assert load_policy({}).store_root() == tmp_path / "results"


def library_imports() -> dict[str, set[str]]:
    """Each ``entities`` module and the ``entities`` modules it imports, lazy ones inside functions too: a
    lazy import hides a circle at run time but not from a reader. ``from package import name`` counts as an
    import of the submodule where ``name`` is one, else of the package (its ``__init__``)."""
    modules = {".".join(p.relative_to(LIBRARY.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in LIBRARY.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                edges |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
        graph[name] = {m for m in edges if m in modules and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``: its strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_library_modules_import_in_one_direction():
    """No import circle inside ``entities/``: every module can be read from the bottom up (config below the
    registries that check its names, the registries below the presets that load it)."""
    found = circles(library_imports())
    assert not found, f"import circles inside entities/: {found}"


def test_the_circle_finder_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_results_readme_is_what_the_results_files_give(tmp_path):
    """results/README.md is written from the results' own files (``python -m sim.results_readme``), so it
    cannot drift from them: a stale one fails here. A section with no file yet says so and the rest is kept."""
    from sim.results_readme import ROOT, render

    text, missing = render()
    assert missing == [] and (ROOT / "README.md").read_text() == text
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "t.md").write_text("# T\n\n| x |\n|---|\n| 1 |\n")
    text, missing = render(tmp_path, (("One", "a/*.md"), ("One", "b/reading.md"), ("Two", "c.md")))
    assert missing == ["b/reading.md", "c.md"] and "#### T" in text and "`c.md` matches no file" in text
