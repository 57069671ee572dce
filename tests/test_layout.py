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
    from entities.config import PRESETS, load_config, preset_names

    names = preset_names()
    assert {"default", "collab", "tiny", "table5-tiny", "collab-tiny"} <= set(names)
    # the top-level configs/ the layout fixes, a package so that `pip install .` carries them
    assert Path(str(PRESETS)) == LIBRARY.parent / "configs" and (Path(str(PRESETS)) / "__init__.py").is_file()
    for name in names:
        assert load_config(name).name == name


def test_results_default_to_the_current_directory(tmp_path, monkeypatch):
    from entities.config import load_config
    from entities.policy import load_policy

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("POISONPOOL_STORE", raising=False)
    assert load_config("tiny").results_dir() == tmp_path / "results"
    assert load_policy({}).store_root() == tmp_path / "results"
