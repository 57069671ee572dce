"""Loading the presets ``configs/<preset>.toml``: the one way every command gets its settings.

``python -m sim.*`` commands and the Flower app both call :func:`load_config` with a preset name and
dotted overrides (``pretrain.epochs=3``), so a setting means the same thing whichever way the run was
started. A preset may ``extends = "other"`` to change a few values. The presets are package data, read
through :mod:`importlib.resources`, so an installed copy (not only a source checkout) finds them.

This module sits above the registries: :mod:`entities.config` checks what it declares itself (types,
ranges, fixed choices), and here the names that only a registry knows (``collab.share``, ``dpm.privacy``)
are checked against it, before any work is done rather than after minutes of Step 1.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from entities.config import Config, build
from entities.defences import DEFENCES
from entities.sharing import check_mode

PRESETS = resources.files("configs")


def preset_names() -> list[str]:
    """The presets shipped with the package, by name."""
    return sorted(p.name.removesuffix(".toml") for p in PRESETS.iterdir() if p.name.endswith(".toml"))


def load_config(preset: str = "default", overrides: dict[str, Any] | None = None) -> Config:
    """The preset's settings with dotted overrides applied, e.g. ``{"dpm.lam": 0.5}``."""
    raw = _read_preset(preset)
    raw.setdefault("name", Path(preset).stem)
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key}: {'.'.join(parents[:i + 1])} is a setting, not a section")
        node[leaf] = value
    return check_names(build(raw))


def check_names(cfg: Config) -> Config:
    """The settings that name a registry's entries: a sharing mode and the DPM's privacy terms."""
    check_mode(cfg.collab.share)
    unknown = [n for n in cfg.dpm.privacy if n not in DEFENCES]
    if unknown or len(set(cfg.dpm.privacy)) < len(cfg.dpm.privacy):
        raise ValueError(f"setting dpm.privacy = {cfg.dpm.privacy}: each term once, from: {', '.join(DEFENCES)}")
    return cfg


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_preset(name: str, seen: tuple[str, ...] = ()) -> dict:
    path = Path(name) if name.endswith(".toml") else PRESETS / f"{name}.toml"
    if not path.is_file():
        raise ValueError(f"config preset {name!r} not found at {path}; known presets: {', '.join(preset_names())}")
    if name in seen:
        raise ValueError(f"config presets extend each other in a loop: {' -> '.join((*seen, name))}")
    raw = tomllib.loads(path.read_text())
    parent = raw.pop("extends", None)
    return _merge(_read_preset(parent, (*seen, name)), raw) if parent else raw
