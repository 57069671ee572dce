"""The privacy-utility frontier: every sharing mode and defence setting, its worst case over the whole
attack suite against what it costs the collaboration.

    python -m sim.attack frontier [--config collab] [--points NAME ...] [--seeds 3] [--attack-seeds 3] [--plan]
                                  [--run-name NAME] [--set threads=1 ...]

A point is a sharing mode with the settings of one defence (:data:`POINTS`, data like Table 5's
rows): the paper's DPM, Table 3's perturbations in front of it, MDP, AugMDP, raw images and clean φ1
features as references, and the DPM objectives of :mod:`entities.defences` and :mod:`entities.dpm`.
For each point:

- privacy: every attacker of the suite against the victims' pools in the point's mode, the worst
  case per victim (disclosure SSIM and identification rate, each with the attacker that reached
  it), and ψ's figure beside it, which is only a lower bound;
- utility: Φ's φ2 on the poisoned test features (the shared φ2 reading the pools of E1-E4's DPMs;
  per entity in the csv, their mean in the table),
  and Table 5's rows 7 (E1 on E2's pool) and 12 (E4 on E1-E3's pools) on the very pools attacked
  (each entity's DPM with the Flower app's seed), as gains over rows 1 and 4 (own raw images).

Cells and rows are stored as they finish (the attack suite's cell store, Table 5's row store), so an
interrupted frontier resumes and the references reuse the cells of ``python -m sim.attack``. Output:
``<results-root>/attack/<run-name>/frontier.md|csv|png``. A defence's default changes only if it is better on
this frontier, not on ψ alone.
"""

from __future__ import annotations

import io
import json
import logging
import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from torch import nn

from entities import runtime
from entities.attacks import ATTACKS
from entities.attacks.base import CLEAN, FEATURE_MODES, OBFUSCATOR, PERTURBED, attack_mode_name, recipe, uses_dpm
from entities.attacks.card import CellStore, worst_cases
from entities.attacks.suite import check_parties, entity_seed, plan_cells, run_suite
from entities.config import Config, parse_overrides
from entities.entity import Entity, Pool
from entities.files import write_bytes, write_text
from entities.metrics import excess_disclosure, utility_retained
from entities.pipeline import ArtefactStore, cached_features, entity_shards, load_task
from entities.presets import load_config
from entities.provenance import command_line, write_provenance
from entities.report import markdown_table, write_json
from entities.sharing import AUGMDP, DPM, MDP, RAW, SHARING_MODES, contribute, get_mode, step1
from entities.sharing.dpm import k_anonymous
from entities.train import evaluate_classifier, infer
from sim.cli import add_config_args, command_parser, config_from_args, run_name
from sim.executors import add_executor_args, executor_from_args, planned_slots, run_all
from sim.grid import RAW as RAW_ROW
from sim.grid import ROWS, RowStore, feature_row, phi_row, raw_row, reuses_phi, row_key

log = logging.getLogger("poisonpool")


@dataclass(frozen=True)
class Point:
    """One point of the frontier: the pools of ``mode`` made with ``settings`` over the run's own."""

    name: str
    mode: str
    settings: dict[str, str] = field(default_factory=dict)
    reference: bool = False  # a mode the frontier compares against, not a defence of this issue


ADVERSARIAL = {"dpm.privacy": '["psi", "decoder"]', "dpm.lam": "5", "dpm.adversary_steps": "3"}
# the head and the prototypes start from nothing: a higher rate and more epochs than the paper's blocks need
LOGITS = {"dpm.bottleneck": "logits", "dpm.utility": "distill", "dpm.privacy": "[]", "dpm.lr": "0.01",
          "dpm.epochs": "60"}
FLOOR_POINTS = ("prototypes (floor)", "class-stats (floor)")  # label-only: what a pool must teach beyond
CLEAN_POINT = "clean φ1"  # everything clean features teach: the gain a defence keeps a share of
POINTS: tuple[Point, ...] = (
    Point("paper DPM", DPM, reference=True),
    *(Point(attack_mode_name(m, 2), m, reference=True) for m in PERTURBED),
    Point("DeepObfuscator", OBFUSCATOR, reference=True),
    Point("MDP", MDP, reference=True),
    Point("AugMDP", AUGMDP, reference=True),
    Point("raw images", RAW, reference=True),
    Point(CLEAN_POINT, CLEAN, reference=True),
    Point("adversarial decoder", DPM, ADVERSARIAL),
    Point("distance correlation", DPM, {"dpm.privacy": '["psi", "dcor"]', "dpm.lam": "10"}),
    Point("distillation", DPM, {"dpm.utility": "distill"}),
    Point("spatial bottleneck", DPM, {"dpm.bottleneck": "spatial"}),
    Point("logits bottleneck", DPM, LOGITS),
    Point("prototypes (floor)", "prototypes", reference=True),
    Point("class-stats (floor)", "class-stats", reference=True),
    Point("k-anonymous DPM (k 4)", DPM, {"dpm.anonymity": "4"}),
    Point("k-anonymous DPM (k 16)", DPM, {"dpm.anonymity": "16"}),
    Point("atoms bottleneck (M 32)", DPM, {**LOGITS, "dpm.atoms": "32"}),
    Point("atoms bottleneck (M 128)", DPM, {**LOGITS, "dpm.atoms": "128"}),
)
POINT_NAMES = tuple(p.name for p in POINTS)
SENDERS = ("E1", "E2", "E3")  # whose pools rows 7 and 12 train on
FRONTIER_ROWS = ("1", "4", "7", "12")
FLOOR_MARGIN = 0.02  # a worst case this close to the prior's figure: the pool adds next to nothing to its label
TARGETS = {"disclosure": 0.10, "identification": 0.05, "top1_drop": 1.0, "E4 gain": 15.0}


def point_config(preset: str, overrides: dict[str, str], point: Point) -> Config:
    """The run's settings with the point's defence settings over them. ``collab.share`` stays the run's:
    the suite names its modes itself and keys its cells by every setting, so the references reuse the
    cells of ``python -m sim.attack``; only Table 5's rows share in the point's mode (:func:`shared_in`)."""
    return load_config(preset, {**overrides, **point.settings})


def shared_in(cfg: Config, point: Point) -> Config:
    """``cfg`` with the point's mode as the collaboration's (DPM for Table 3's X+DPM and the control), so
    Step 1 publishes what the mode needs (DeepObfuscator's obfuscator)."""
    share = point.mode if point.mode in SHARING_MODES else DPM
    return replace(cfg, collab=replace(cfg.collab, share=share))


def privacy(cfg: Config, point: Point, store: CellStore, families: list[str], attack_seeds: int = 1) -> dict:
    """The worst case over the suite per victim, and ψ's figure (a lower bound) beside it, from the attacker
    with ``attack.seed``; with ``attack_seeds`` > 1, each victim's worst case also at the attacker's seeds
    ``attack.seed + 1, ...`` (its models' weights, the pairs they train on, the items it attacks), for the spread."""
    out: dict = {"attack seeds": attack_seeds}
    for i in range(attack_seeds):
        seed = cfg.attack.seed + i
        run = run_suite(replace(cfg, attack=replace(cfg.attack, seed=seed)), families, [point.mode], store)
        cells = pd.DataFrame(run.records)
        for w in worst_cases(cells).to_dict("records"):
            v = w["victim"]
            figures = {}
            for attacker, column in (("psi", "ψ"), ("prior", "prior")):
                hit = cells[(cells["victim"] == v) & (cells["attacker"] == attacker) & (cells["status"] == "ok")]
                figures[column] = float(hit["disclosure"].iloc[0]) if len(hit) else np.nan
            # the attacker's seed picks the items attacked, so the prior's figure is per seed too
            out |= {f"{v} disclosure attack seed {seed}": w["disclosure"],
                    f"{v} identification attack seed {seed}": w["identification"],
                    f"{v} prior attack seed {seed}": figures["prior"]}
            if not i:
                out |= {f"{v} disclosure": w["disclosure"], f"{v} by": w["attacker"],
                        f"{v} identification": w["identification"], f"{v} identified by": w["identification attacker"],
                        **{f"{v} {column}": f for column, f in figures.items()}}
    return out


def pools_of(cfg: Config, point: Point, split, entities: dict[str, Entity], shared, art
             ) -> tuple[dict[str, Pool], dict[str, float]]:
    """What E1-E3 send in the point's mode, as a receiver trains on it (the attacked pools: each entity
    with the Flower app's seed), and the shared φ2's top-1 on test features mapped as E1-E4's pools are."""
    test = cached_features(art, "S-test", shared.phi1, split.S.test_images)
    pools, top1 = {}, {}
    for name, entity in entities.items():
        seed = entity_seed(cfg, name)
        if point.mode in FEATURE_MODES:
            if uses_dpm(point.mode):
                entity.train_dpm(shared, cfg, seed)
            mapping = recipe(point.mode, entity.dpm, obfuscator=shared.obfuscator)
            top1[name] = evaluate_classifier(nn.Sequential(mapping, shared.phi2), test, split.S.test_labels)["top1"]
            if name in SENDERS:
                parts = []
                for view in entity.views(cfg.decider.views, cfg.data.seed):
                    features = infer(mapping, view.featurize(shared).features)
                    if point.mode == DPM and cfg.dpm.anonymity > 1:
                        features = k_anonymous(features, entity.labels, cfg.dpm.anonymity, seed)
                    parts.append(Pool(features, entity.labels))
                pools[name] = Pool.union(parts)
        elif name in SENDERS:
            mode = get_mode(point.mode)
            pools[name] = Pool.union([mode.training_pool(contribute(view, shared, cfg, seed, point.mode).pool(),
                                                         shared.phi1)
                                      for view in entity.views(cfg.decider.views, cfg.data.seed)])
    return pools, top1



def utility(cfg: Config, point: Point, rows: RowStore, seeds: int = 1) -> dict:
    """Poisoned top-1 of the shared φ2 and Table 5's rows 1, 4, 7 and 12 on the point's pools, at ``seeds``
    seeds (Table 5's: data.seed, data.seed + 1, ...; the pools are the same, each row retrained): the first
    seed's rows under their own names, every seed's as ``row R seed S``, the gains from their means."""
    split = load_task(cfg)
    shards = entity_shards(cfg, split)
    art = ArtefactStore(cfg)
    shared = step1(cfg, split, art)
    test = cached_features(art, "S-test", shared.phi1, split.S.test_images)
    original = evaluate_classifier(shared.phi2, test, split.S.test_labels)["top1"]
    source = f"frontier:{point.mode}"
    out: dict = {"original top-1": original}
    todo = [r for r in ROWS if r.id in FRONTIER_ROWS]
    entities = {n: Entity(n, split.S.train_images[i], split.S.train_labels[i], art) for n, i in shards.items()}
    results: dict[str, list[float]] = {r.id: [] for r in todo}
    pools, top1, own = None, {}, None
    for seed in range(cfg.data.seed, cfg.data.seed + seeds):
        for row in todo:
            key = row_key(row, seed, cfg, source)
            stored = rows.get(row, seed, key)
            if stored is None:
                if reuses_phi(row, seed, cfg):  # Φ itself is E1's model on its own images
                    result = phi_row(cfg, shared.backbone, split.S.test_images, split.S.test_labels,
                                     len(shards["E1"]))
                elif row.kind == RAW_ROW:
                    who = row.uses("raw")[0]
                    result = raw_row(row, seed, cfg, split.S.train_images, split.S.train_labels, shards[who],
                                     split.S.test_images, split.S.test_labels, len(split.S.classes))
                else:
                    if pools is None:
                        pools, top1 = pools_of(cfg, point, split, entities, shared, art)
                        own = {n: Pool.union([v.featurize(shared) for v in e.views(cfg.decider.views, cfg.data.seed)])
                               for n, e in entities.items()}
                    parts = {f"phi1:{n}": p for n, p in own.items()} | {f"pool:{n}": p for n, p in pools.items()}
                    result = feature_row(row, seed, cfg, shared.backbone, test, split.S.test_labels,
                                         *(parts[p] for p in row.parts))
                stored = rows.put(row, seed, key, result)
            results[row.id].append(stored["top1"])
            out[f"row {row.id} seed {seed}"] = stored["top1"]
    if point.mode in FEATURE_MODES:
        if not top1:
            _, top1 = pools_of(cfg, point, split, entities, shared, art)
        out |= {f"{n} poisoned top-1": t for n, t in top1.items()}
        out["poisoned top-1"] = float(np.mean(list(top1.values())))
    else:  # receivers featurize shared images with φ1: the shared φ2 reads the test set as it is
        out["poisoned top-1"] = original
    out |= {f"row {r}": float(np.mean(results[r])) for r in FRONTIER_ROWS}
    out["seeds"] = seeds
    out["E1 gain"] = out["row 7"] - out["row 1"]
    out["E4 gain"] = out["row 12"] - out["row 4"]
    return out


def measure(preset: str, overrides: dict[str, str], point: Point, store: CellStore, rows: RowStore,
            families: list[str], seeds: int = 1, attack_seeds: int = 1) -> dict:
    t0 = time.time()
    cfg = point_config(preset, overrides, point)
    runtime.configure(cfg)
    line = {"point": point.name, "mode": point.mode, "reference": point.reference,
            "settings": " ".join(f"{k}={v}" for k, v in point.settings.items())}
    line |= privacy(cfg, point, store, families, attack_seeds)
    line |= utility(shared_in(cfg, point), point, rows, seeds)
    line["seconds"] = time.time() - t0
    log.info("frontier point %s: %s (%.0fs)", point.name,
             ", ".join(f"{k} {v:.3f}" for k, v in line.items() if isinstance(v, float)), line["seconds"])
    return line


def measure_chain(preset: str, overrides: dict[str, str], points: list[Point], store: CellStore, rows: RowStore,
                  families: list[str], seeds: int = 1, attack_seeds: int = 1) -> list[dict]:
    """:func:`measure` of each point in turn, in one task."""
    return [measure(preset, overrides, p, store, rows, families, seeds, attack_seeds) for p in points]


def chains(points: list[Point]) -> list[list[Point]]:
    """The points grouped into tasks: AugMDP in MDP's task, after it, where both run, since AugMDP's sets start
    with MDP's own (its first draw): as two tasks at once, both would craft MDP's sets, into the same store."""
    out = [[p] for p in points if p.mode != AUGMDP]
    for p in (p for p in points if p.mode == AUGMDP):
        host = next((c for c in out if c[0].mode == MDP), None)
        if host is None:
            out.append([p])
        else:
            host.append(p)
    return out


def plan(preset: str, overrides: dict[str, str], points: list[Point], store: CellStore, rows: RowStore,
         families: list[str], seeds: int, attack_seeds: int, slots: int, results_dir: Path) -> pd.DataFrame:
    """Per point, its attack cells (at every attacker seed) and its Table 5 rows (at every seed), how many of
    each are stored, and the time the missing ones should take from the mean seconds of those stored (a DPM
    trained or an MDP set crafted for the first time is not in it); computes nothing."""
    from sim.attack import cell_seconds  # the frontier is a subcommand of sim.attack, which imports it lazily

    means = cell_seconds(results_dir)
    stored_rows = [json.loads(f.read_text()).get("seconds", np.nan) for f in rows.dir.glob("row*.json")]
    row_seconds = float(np.nanmean(stored_rows)) if stored_rows else 0.0
    lines = []
    for point in points:
        cfg = point_config(preset, overrides, point)
        cells = [c for i in range(attack_seeds)
                 for c in plan_cells(replace(cfg, attack=replace(cfg.attack, seed=cfg.attack.seed + i)), families,
                                     [point.mode])]
        missing = [c for c in cells if store.get(c.key) is None]
        rcfg = shared_in(cfg, point)
        todo = [f"{r.id}@{s}" for s in range(rcfg.data.seed, rcfg.data.seed + seeds) for r in ROWS
                if r.id in FRONTIER_ROWS and rows.get(r, s, row_key(r, s, rcfg, f"frontier:{point.mode}")) is None]
        lines.append({"point": point.name, "cells": len(cells), "cells to run": len(missing),
                      "rows": seeds * len(FRONTIER_ROWS), "rows to run": len(todo), "rows missing": " ".join(todo),
                      "seconds": float(np.nansum([means.get(c.attacker, np.nan) for c in missing]))
                      + len(todo) * row_seconds})
        ln = lines[-1]
        state = "stored" if not missing and not todo else "to run"
        print(f"{state:<7} {point.name:<26} cells {len(cells) - len(missing)}/{len(cells)} stored, rows "
              f"{ln['rows'] - len(todo)}/{ln['rows']} stored" + (f" (missing row@seed {ln['rows missing']})"
                                                                  if todo else ""))
    table = pd.DataFrame(lines)
    work = float(table["seconds"].sum())
    done = (table["cells to run"] == 0) & (table["rows to run"] == 0)
    print(f"{len(table)} points: {int(done.sum())} with nothing to run; "
          f"{int(table['cells to run'].sum())} cells and {int(table['rows to run'].sum())} rows to run, about "
          f"{work / 60:.0f} min of work, {work / 60 / slots:.0f} min on {slots} task slot(s), from the mean seconds "
          "of the cells and rows stored under this results root", flush=True)
    return table


def worst_over(table: pd.DataFrame, victims: list[str], what: str) -> pd.Series:
    return table[[f"{v} {what}" for v in victims]].max(axis=1)


def plot(table: pd.DataFrame, victims: list[str], path: Path) -> None:
    """Worst-case disclosure against E4's gain, worst-case identification against the poisoned top-1."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    panels = ((worst_over(table, victims, "disclosure"), table["E4 gain"], "worst-case disclosure SSIM",
               "E4's gain, row 12 − row 4 (points)", TARGETS["disclosure"], TARGETS["E4 gain"]),
              (worst_over(table, victims, "identification") * 100, table["poisoned top-1"],
               "worst-case identification rate (%)", "shared φ2 on the poisoned test features, top-1 (%)",
               TARGETS["identification"] * 100, None))
    for ax, (x, y, xlabel, ylabel, xt, yt) in zip(axes, panels):
        ref = table["reference"].astype(bool)
        ax.scatter(x[ref], y[ref], marker="s", c="grey", label="references")
        ax.scatter(x[~ref], y[~ref], marker="o", c="tab:red", label="defences")
        for name, xi, yi in zip(table["point"], x, y):
            ax.annotate(name, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvline(xt, color="tab:green", ls="--", lw=1, label="target")
        if yt is not None:
            ax.axhline(yt, color="tab:green", ls="--", lw=1)
        ax.set_xlabel(xlabel + " (→ less private)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    priors = table.filter(regex=r" prior$")
    if priors.shape[1]:
        axes[0].axvline(float(priors.max().max()), color="black", ls=":", lw=1, label="floor (label only, `prior`)")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())  # whole or absent, as every results file


def checks(table: pd.DataFrame, victims: list[str]) -> list[str]:
    """The issue's targets, point by point, for the defences."""
    lines = []
    for _, r in table[~table["reference"].astype(bool)].iterrows():
        d, i = max(r[f"{v} disclosure"] for v in victims), max(r[f"{v} identification"] for v in victims)
        drop = r["original top-1"] - r["poisoned top-1"]
        floor = max(r.get(f"{v} prior", np.nan) for v in victims)
        ok = {"disclosure ≤ 0.10": d <= TARGETS["disclosure"],
              f"disclosure within {FLOOR_MARGIN} of the floor": d <= floor + FLOOR_MARGIN,
              "identification ≤ 5%": i <= TARGETS["identification"],
              "top-1 within 1 point": drop <= TARGETS["top1_drop"], "E4 gain ≥ +15": r["E4 gain"] >= TARGETS["E4 gain"]}
        shown = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in ok.items())
        lines.append(f"- {r['point']}: worst disclosure {d:.3f}, identification {i:.0%}, top-1 drop {drop:+.2f}, "
                     f"E4 gain {r['E4 gain']:+.1f}: {shown}")
    return lines


EXCESS_TARGETS = {"excess disclosure": 0.02, "identification": 0.05, "retained": 0.75}
RETAINED_ROWS = {"7": "E1", "12": "E4"}


def retained_by_seed(table: pd.DataFrame, row: str) -> pd.DataFrame:
    """Per point and seed, the share of clean sharing's gain over the better label-only floor that the point's
    pools keep in Table 5's ``row`` (:func:`entities.metrics.utility_retained`); NaN without both floors and
    the clean point among the points measured."""
    seeds = sorted(int(c.rsplit(" ", 1)[1]) for c in table.columns if c.startswith(f"row {row} seed "))
    by_name = table.set_index("point")
    out = pd.DataFrame(index=table["point"], columns=seeds, dtype=float)
    if not set(FLOOR_POINTS) | {CLEAN_POINT} <= set(by_name.index):
        return out
    for seed in seeds:
        column = f"row {row} seed {seed}"
        floor = float(by_name.loc[list(FLOOR_POINTS), column].max())
        clean = float(by_name.loc[CLEAN_POINT, column])
        out[seed] = [utility_retained(v, floor, clean) for v in by_name[column]]
    return out


def by_attack_seed(table: pd.DataFrame, victim: str, what: str) -> pd.DataFrame:
    """Per point, ``victim``'s ``what`` (worst-case disclosure, identification, the prior's figure) at each attacker
    seed measured, in seed order; a table written before attacker seeds were columns has its one figure."""
    columns = [c for c in table.columns if c.startswith(f"{victim} {what} attack seed ")]
    return table[columns or [f"{victim} {what}"]]


def excess(table: pd.DataFrame, victims: list[str]) -> pd.DataFrame:
    """The frontier in excess terms: per victim the worst case over the suite minus the prior floor and the
    identification rate, each the mean over the attacker's seeds with its sd; per row, the utility retained (mean
    and sd over seeds) and the floor beside it."""
    out = pd.DataFrame({"point": table["point"]})

    def spread(values: pd.DataFrame) -> np.ndarray:
        return values.std(axis=1, ddof=1).to_numpy() if values.shape[1] > 1 else np.full(len(values), np.nan)

    for v in victims:
        disclosed, priors = by_attack_seed(table, v, "disclosure"), by_attack_seed(table, v, "prior")
        over = pd.DataFrame({c: [excess_disclosure(w, p) for w, p in zip(disclosed[c], priors[f])]
                             for c, f in zip(disclosed, priors)})  # each seed against its own prior
        identified = by_attack_seed(table, v, "identification")
        out[f"{v} excess disclosure"] = over.mean(axis=1).to_numpy()
        out[f"{v} excess sd"] = spread(over)
        out[f"{v} identification"] = identified.mean(axis=1).to_numpy()
        out[f"{v} identification sd"] = spread(identified)
    for row, entity in RETAINED_ROWS.items():
        per_seed = retained_by_seed(table, row)
        out[f"{entity} retained (row {row})"] = per_seed.mean(axis=1).to_numpy()
        out[f"{entity} retained sd"] = per_seed.std(axis=1, ddof=1).to_numpy() if per_seed.shape[1] > 1 else np.nan
        out[f"row {row}"] = table[f"row {row}"].to_numpy()
    return out


def excess_checks(ex: pd.DataFrame, victims: list[str], points: pd.DataFrame) -> list[str]:
    """The utility issue's target per defence: excess ≤ 0.02, identification ≤ 5% and retained ≥ 75% for
    every entity (E1 by row 7, E4 by row 12)."""
    t, lines = EXCESS_TARGETS, []
    for (_, r), ref in zip(ex.iterrows(), points["reference"].astype(bool)):
        if ref:
            continue
        worst = max(r[f"{v} excess disclosure"] for v in victims)
        ident = max(r[f"{v} identification"] for v in victims)
        kept = min(r[f"{e} retained (row {row})"] for row, e in RETAINED_ROWS.items())
        ok = worst <= t["excess disclosure"] and ident <= t["identification"] and kept >= t["retained"]
        lines.append(f"- {r['point']}: excess {worst:+.3f}, identification {ident:.0%}, lowest retained {kept:.0%}: "
                     f"{'meets the target' if ok else 'misses it'}")
    return lines


def plot_excess(ex: pd.DataFrame, points: pd.DataFrame, path: Path) -> None:
    """Per entity, utility retained (± sd over seeds) against excess disclosure, the target as a shaded box."""
    fig, axes = plt.subplots(1, len(RETAINED_ROWS), figsize=(12, 4.8))
    ref = points["reference"].astype(bool).to_numpy()
    for ax, (row, entity) in zip(axes, RETAINED_ROWS.items()):
        x, y = ex[f"{entity} excess disclosure"], ex[f"{entity} retained (row {row})"] * 100
        err, xerr = ex[f"{entity} retained sd"].fillna(0) * 100, ex[f"{entity} excess sd"].fillna(0)
        for mask, style in ((ref, {"marker": "s", "color": "grey", "label": "references"}),
                            (~ref, {"marker": "o", "color": "tab:red", "label": "defences"})):
            ax.errorbar(x[mask], y[mask], yerr=err[mask], xerr=xerr[mask], ls="none", capsize=2, **style)
        for name, xi, yi in zip(ex["point"], x, y):
            if np.isfinite(xi) and np.isfinite(yi):
                ax.annotate(name, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvspan(-1, EXCESS_TARGETS["excess disclosure"], ymin=0, ymax=1, color="tab:green", alpha=0.05)
        ax.axhline(EXCESS_TARGETS["retained"] * 100, color="tab:green", ls="--", lw=1, label="target")
        ax.axvline(EXCESS_TARGETS["excess disclosure"], color="tab:green", ls="--", lw=1)
        ax.axhline(0, color="black", ls=":", lw=1, label="label-only floor")
        ax.set_xlim(left=min(-0.02, float(np.nanmin(x)) - 0.02))
        ax.set_xlabel(f"{entity}'s excess disclosure over the prior (worst case − prior; → less private)")
        ax.set_ylabel(f"utility retained, row {row} (% of clean sharing's gain over the floor)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def write_excess(table: pd.DataFrame, cfg: Config, victims: list[str], run_dir: Path, command: str) -> None:
    ex = excess(table, victims)
    write_text(run_dir / "frontier-excess.csv", ex.to_csv(index=False))
    plot_excess(ex, table, run_dir / "frontier-excess.png")

    def pm(m: float, sd: float, form: str = ".0%") -> str:
        spread = f" ± {sd:{form.lstrip('+')}}" if np.isfinite(sd) else ""
        return "n/a" if not np.isfinite(m) else f"{m:{form}}{spread}"

    shown = pd.DataFrame({
        "point": ex["point"],
        **{f"{v} excess · identification": [f"{pm(e, esd, '+.3f')} · {pm(i, isd)}" for e, esd, i, isd in
                                             zip(ex[f"{v} excess disclosure"], ex[f"{v} excess sd"],
                                                 ex[f"{v} identification"], ex[f"{v} identification sd"])]
           for v in victims},
        **{f"{e} retained (row {row})": [pm(m, sd) for m, sd in zip(ex[f"{e} retained (row {row})"],
                                                                     ex[f"{e} retained sd"])]
           for row, e in RETAINED_ROWS.items()},
        **{f"row {row}": ex[f"row {row}"].round(2) for row in RETAINED_ROWS},
    })
    seeds = int(table["seeds"].max()) if "seeds" in table else 1
    attack_seeds = int(table["attack seeds"].max()) if "attack seeds" in table else 1
    attackers = (f"mean ± sd over the attacker's {attack_seeds} seeds (attack.seed and the next; the pools are "
                 "the first seed's)" if attack_seeds > 1 else "one attacker seed, on the first seed's pools")
    priors = ", ".join(f"{v} {table[f'{v} prior'].max():.3f}" for v in victims)
    text = (f"# The frontier in excess terms: {cfg.name}\n\n{markdown_table(shown)}\n\n"
            f"Excess disclosure: the worst case over the attack suite minus the `prior` attacker's figure (the mean "
            f"image of each item's label: {priors}), so 0 is a pool that shows no more than its label. "
            f"Identification: the worst case over the suite (chance 1%). Both: {attackers}. Retained: "
            "(row(point) − row(floor)) / (row(clean φ1) − row(floor)) for Table 5's row 7 (E1 on E2's pool) and "
            "row 12 (E4 on E1-E3's pools), "
            f"floor the better of the two label-only points, per seed, then mean ± sd over {seeds} seed(s) (each row "
            "retrained with Table 5's seed on the first seed's pools). Rows: mean top-1.\n\n"
            "![frontier in excess terms](frontier-excess.png)\n\n"
            "Target (excess ≤ 0.02, identification ≤ 5%, retained ≥ 75% for E1 and E4), per defence:\n\n"
            + "\n".join(excess_checks(ex, victims, table)) + f"\n\nCommand: `{command}`.\n")
    write_text(run_dir / "frontier-excess.md", text)


def write(table: pd.DataFrame, cfg: Config, victims: list[str], run_dir: Path, command: str, seconds: float) -> None:
    write_text(run_dir / "frontier.csv", table.to_csv(index=False))
    shown = pd.DataFrame({
        "point": table["point"],
        "kind": np.where(table["reference"].astype(bool), "reference", "defence"),
        **{f"{v} worst": [f"{d:.3f} · {i:.0%} ({a}; {b})" for d, i, a, b in
                          zip(table[f"{v} disclosure"], table[f"{v} identification"], table[f"{v} by"],
                              table[f"{v} identified by"])] for v in victims},
        **{f"{v} ψ only": table[f"{v} ψ"].round(3) for v in victims},
        "poisoned top-1 (mean; lowest entity)": [
            f"{m:.2f}; {lo:.2f}" if np.isfinite(lo) else f"{m:.2f}" for m, lo in
            zip(table["poisoned top-1"], table.filter(regex=r"^E\d poisoned top-1$").min(axis=1, skipna=True)
                if table.filter(regex=r"^E\d poisoned top-1$").shape[1] else [np.nan] * len(table))],
        "E1 gain (7 − 1)": table["E1 gain"].round(2),
        "E4 gain (12 − 4)": table["E4 gain"].round(2),
        "settings": table["settings"].replace("", "–"),
    })
    rows = table.iloc[0]
    floor = ", ".join(f"{v} {table[f'{v} prior'].max():.3f}" for v in victims if f"{v} prior" in table)
    notes = (
        f"Worst case over the attack suite ({', '.join(ATTACKS)}) by collaborator {cfg.attack.attacker}: disclosure "
        "SSIM · identification rate (chance 1%), with the attacker that reached each. ψ only: the reconstructor the "
        "paper's DPM trains against, a lower bound on disclosure. The floor: the `prior` attacker, the mean image of "
        f"each item's label, scores {floor or 'n/a'} without looking at a pool, so no defence that shares labels "
        "reads lower, and a worst case at the floor means the pool told the attacker no more than its label. "
        "Poisoned top-1: the shared φ2 on the test features "
        f"mapped as E1-E4's pools are (original features: {rows['original top-1']:.2f}; image modes: the receiver "
        f"featurizes images, so the original). Gains: Table 5's rows on the attacked pools, row 7 (E1) over row 1 "
        f"({rows['row 1']:.2f}) and row 12 (E4) over row 4 ({rows['row 4']:.2f}). Setting: {cfg.name}, "
        f"{cfg.data.dataset}, {cfg.backbone.name} at {cfg.backbone.hook}, DPMs of {cfg.dpm.blocks} blocks and "
        f"{cfg.dpm.epochs} epochs unless the point's settings say otherwise."
    )
    figure_line = "![frontier](frontier.png)"
    text = (f"# Privacy-utility frontier: {cfg.name}\n\n{markdown_table(shown)}\n\n{notes}\n\n{figure_line}\n\n"
            "Targets (issue 13), per defence:\n\n" + "\n".join(checks(table, victims)) +
            f"\n\nCommand: `{command}`, {seconds:.0f} s for this invocation.\n")
    write_text(run_dir / "frontier.md", text)
    write_json({"points": table.to_dict("records")}, run_dir / "frontier.json")
    plot(table, victims, run_dir / "frontier.png")
    write_excess(table, cfg, victims, run_dir, command)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    started = time.time()
    parser = command_parser("python -m sim.attack frontier", __doc__)
    parser.add_argument("--points", nargs="+", default=None, metavar="NAME",
                        help=f"points to measure (default all): {', '.join(repr(n) for n in POINT_NAMES)}")
    parser.add_argument("--attacks", nargs="+", default=None, metavar="FAMILY",
                        help=f"attacker families (default all: the worst case is over them): {', '.join(ATTACKS)}")
    parser.add_argument("--seeds", type=int, default=1, help="Table 5's rows at seeds data.seed, data.seed+1, ...")
    parser.add_argument("--plan", action="store_true",
                        help="print each point's stored and missing cells and rows, and a time estimate; run nothing")
    parser.add_argument("--attack-seeds", type=int, default=1,
                        help="the attack suite at the attacker's seeds attack.seed, attack.seed+1, ...: excess "
                             "disclosure and identification as mean ± sd over them")
    add_executor_args(parser, "point")
    add_config_args(parser)
    parser.set_defaults(config="collab")
    args = parser.parse_args(argv)
    unknown = [p for p in args.points or () if p not in POINT_NAMES]
    if unknown:
        parser.error(f"unknown point(s) {unknown}; choose from {', '.join(POINT_NAMES)}")
    families = list(dict.fromkeys(args.attacks or ATTACKS))
    if bad := [f for f in families if f not in ATTACKS]:
        parser.error(f"unknown attack(s) {bad}; choose from {', '.join(ATTACKS)}")
    base = config_from_args(args)  # every point's settings go over the run's own, as resolved here
    overrides = {**parse_overrides(args.set), "results_root": str(base.results_dir()),
                 "data.data_root": base.data.data_root, "data.allow_download": str(base.data.allow_download)}
    victims = check_parties(base)
    run_dir = base.results_dir() / "attack" / run_name(args, base.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    store, rows = CellStore(run_dir), RowStore(run_dir / "frontier")
    chosen = [p for p in POINTS if args.points is None or p.name in args.points]
    if args.plan:
        slots = planned_slots(args)
        return plan(args.config, overrides, chosen, store, rows, families, args.seeds, args.attack_seeds, slots,
                    base.results_dir())
    tasks = chains(chosen)
    with executor_from_args(args, base.threads) as executor:  # each chain of points a task (Ray, or --sequential)
        lines = run_all(executor, [(f"point {', '.join(p.name for p in c)}", measure_chain,
                                    (args.config, overrides, c, store, rows, families, args.seeds, args.attack_seeds))
                                   for c in tasks])
    by_name = {line["point"]: line for chain in lines for line in chain}
    table = pd.DataFrame([by_name[p.name] for p in chosen])
    prog, *given = command_line("python -m sim.attack frontier", argv)
    command = f"{prog} {shlex.join(given)}".strip()
    write(table, base, victims, run_dir, command, time.time() - started)
    write_provenance(run_dir, started, command_line("python -m sim.attack frontier", argv),
                     name="provenance-frontier.json")
    print((run_dir / "frontier.md").read_text())
    return table
