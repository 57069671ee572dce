"""The attack suite's records: one stored cell per (attacker, victim, mode), the report card built from
them, and the index other commands read to show the worst case beside ψ's figure.

A cell is stored atomically (a temporary file, then a rename) under a key of every input it
depends on: all settings (whatever the section: a changed setting must never serve a stale cell),
the attacker, the attacking entity, the victim, the mode, the attacker's seed, the source of the
pools and a format version. Only the run's name, paths, thread count and the list of victims are
left out of the key, since they change no cell.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from entities import runtime
from entities.attacks.base import attack_mode_name
from entities.config import Config
from entities.files import artefact_key, save_torch, write_json

FORMAT = 1  # raise when the way a cell is computed changes, so older cells are recomputed
NOT_APPLICABLE = "n/a"


def _hash(settings: dict) -> str:
    return artefact_key(settings, length=12)


def _data(cfg: Config) -> dict:
    """The data settings without where the archives live, which changes no image."""
    return {k: v for k, v in cfg.to_dict()["data"].items() if k not in ("data_root", "allow_download")}


# What the victims share and the collaboration's own training: models an attacker trains on clean public
# pairs alone depend on none of it, so they are keyed without it and one is reused by every defence.
POOL_SECTIONS = ("dpm", "mdp", "collab", "decider", "table5")


def settings_key(cfg: Config, without: tuple[str, ...] = ()) -> str:
    """Every setting an attack may depend on (less the sections ``without`` names)."""
    d = cfg.key_dict()
    picked = {k: v for k, v in d.items() if k not in ("name", "results_root", "threads", *without)}
    picked["data"] = _data(cfg)
    picked["attack"] = {k: v for k, v in d["attack"].items() if k != "victims"}
    return _hash(picked | runtime.key_part(cfg.device, cfg.precision))


def cell_key(cfg: Config, attacker: str, victim: str, mode: str, pool_source: str) -> str:
    return _hash({"format": FORMAT, "settings": settings_key(cfg), "attacker": attacker, "by": cfg.attack.attacker,
                  "victim": victim, "mode": mode, "seed": cfg.attack.seed, "pools": pool_source})


def defence_key(cfg: Config) -> str:
    """What the shared pools themselves depend on (Step 1, ψ, the DPMs, MDP): the Flower app and the
    Table 5 grid look attack reports up by it, whatever their own decider or grid settings."""
    d = cfg.key_dict()
    picked = {"data": _data(cfg), **{s: d[s] for s in ("backbone", "pretrain", "reconstructor", "dpm", "mdp")}}
    return _hash(picked | runtime.key_part(cfg.device, cfg.precision))


class CellStore:
    """Finished cells of one report: ``<key>.json`` (the scores) and ``<key>.pt`` (figure thumbnails).

    The JSON is written last, so its presence means the cell is complete.
    """

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / "artefacts" / "cells"

    def get(self, key: str) -> dict | None:
        path = self.dir / f"{key}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def thumbnails(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.dir / f"{key}.pt"
        return torch.load(path, weights_only=True) if path.is_file() else None

    def put(self, key: str, record: dict, thumbnails: dict[str, torch.Tensor] | None = None) -> dict:
        """Thumbnails first, then the record: a kill between the two leaves a cell to recompute, never
        a record without its pictures; each file is written whole (entities.files)."""
        if thumbnails is not None:
            save_torch(thumbnails, self.dir / f"{key}.pt", private=True)
        record = {**record, "key": key}
        write_json(record, self.dir / f"{key}.json")
        return record


def worst_cases(cells: pd.DataFrame) -> pd.DataFrame:
    """Per victim and mode: the attacker that discloses most and its disclosure, and the highest
    identification rate with its attacker (not necessarily the same one)."""
    ok = cells[cells["status"] == "ok"]
    rows = []
    for (victim, mode), group in ok.groupby(["victim", "mode"], sort=False):
        top = group.loc[group["disclosure"].idxmax()]
        ident = group.loc[group["identification"].idxmax()]
        rows.append({"victim": victim, "mode": mode, "attacker": top["attacker"], "disclosure": top["disclosure"],
                     "identification attacker": ident["attacker"], "identification": ident["identification"],
                     "chance": top["chance"]})
    return pd.DataFrame(rows)


def card_table(cells: pd.DataFrame, victim: str, modes: list[str], rounds: int) -> pd.DataFrame:
    """Rows: attackers; columns: modes; cells: disclosure SSIM · identification rate, the worst case of
    each mode in bold, and a last row with each mode's worst case and who reached it."""
    mine = cells[cells["victim"] == victim]
    worst = worst_cases(mine).set_index("mode")
    attackers = list(dict.fromkeys(mine["attacker"]))
    out = []
    for attacker in attackers:
        line = {"attacker": attacker}
        for mode in modes:
            hit = mine[(mine["attacker"] == attacker) & (mine["mode"] == mode)]
            if hit.empty or hit.iloc[0]["status"] != "ok":
                line[attack_mode_name(mode, rounds)] = "–"
                continue
            r = hit.iloc[0]
            text = f"{r['disclosure']:.3f} · {r['identification']:.0%}"
            bold = mode in worst.index and worst.loc[mode, "attacker"] == attacker
            line[attack_mode_name(mode, rounds)] = f"**{text}**" if bold else text
        out.append(line)
    line = {"attacker": "**worst case**"}
    for mode in modes:
        if mode in worst.index:
            w = worst.loc[mode]
            line[attack_mode_name(mode, rounds)] = (f"**{w['disclosure']:.3f}** ({w['attacker']}) · "
                                                    f"**{w['identification']:.0%}** ({w['identification attacker']})")
        else:
            line[attack_mode_name(mode, rounds)] = "–"
    out.append(line)
    return pd.DataFrame(out)


REPORT_INDEX = "report.json"


def find_worst(cfg: Config, results_dir: Path) -> dict[str, dict[str, dict]]:
    """The worst case per mode and victim over every attack report under ``results_dir/attack/`` made
    for the same defence (:func:`defence_key`); empty when there is none. Each entry names its report."""
    key = defence_key(cfg)
    found: dict[str, dict[str, dict]] = {}
    for index in sorted((results_dir / "attack").glob(f"*/{REPORT_INDEX}")):
        report = json.loads(index.read_text())
        if report.get("defence_key") != key:
            continue
        for w in report["worst"]:
            best = found.setdefault(w["mode"], {}).get(w["victim"])
            if best is None or w["disclosure"] > best["disclosure"]:
                found[w["mode"]][w["victim"]] = {**w, "report": str(index.parent)}
    return found
