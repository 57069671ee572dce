"""Reproduce Deep Poisoning's Table 5, the E1-E4 collaboration grid, with each row a Ray task.

    python -m sim.table5 [--rows 1 7 12 fedavg] [--seeds 3] [--config collab] [--set decider.epochs=10]
                         [--sequential | --address auto] [--from-flower results/flower/<run>]
                         [--partition dirichlet --alpha 0.3] [--share dpm mdp augmdp raw] [--run-name NAME]

Step 1 (Φ pretrained on E1's shard, ψ on Q) and the four private DPMs are made once by one task and
stored under ``results/artefacts/<key>/``; φ1 features and pools then reach the decider rows through
Ray's object store. Rows on raw images (1-5) train whole backbones and run beside Step 1. Each
finished row is written to ``results/table5/<run>/rows/`` under a key of its settings, so a killed
run started again skips it, and a changed setting computes it anew.

``--share`` runs the grid once per sharing mode: what an entity contributes to rows 7-12 is its
poisoned pool (dpm, the paper), φ1 of its MDP or AugMDP images, or φ1 of its raw images. Rows that
use no contribution are computed once and reused by every mode, and ``sharing.md`` sets utility
(top-1) beside visual disclosure (SSIM between what was shared and the real images) per mode.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from entities.attacks.base import LABEL_ONLY_MODES
from entities.attacks.card import find_worst
from entities.config import Config
from entities.files import results_lock
from entities.metrics import utility_retained
from entities.pipeline import entity_shards, load_task
from entities.provenance import command_line, write_provenance
from entities.report import write_curves, write_json, write_table
from entities.sharing import DPM, SHARING_MODES, check_mode, get_mode, mode_name
from sim.cli import add_config_args, command_parser, config_from_args, run_main, run_name
from sim.executors import RayPool, Sequential, start_ray
from sim.grid import (
    FEDAVG,
    RAW,
    ROW_IDS,
    ROWS,
    GridInputs,
    Row,
    RowStore,
    check_entities,
    contributions_key,
    feature_row,
    feature_shape,
    fedavg_row,
    load_flower_pools,
    phi_row,
    prepare,
    raw_epochs,
    raw_row,
    reuses_phi,
    row_key,
    select_rows,
)

log = logging.getLogger("poisonpool")


@dataclass(frozen=True)
class Job:
    """One row to compute at a seed, under the key its result is stored by."""

    row: Row
    seed: int
    key: str

    @property
    def label(self) -> str:
        return f"row {self.row.id}"


class GridError(ValueError):
    """Some rows failed; the message names them. Rows that finished are kept for the next run."""


@dataclass
class GridRun:
    """What one invocation produced: every row's figures per seed, and which it computed or reused."""

    results: dict[tuple[str, int], dict] = field(default_factory=dict)
    computed: list[tuple[str, int]] = field(default_factory=list)
    reused: list[tuple[str, int]] = field(default_factory=list)
    pool_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # when this run made Step 1's inputs
    seconds: float = 0.0


def run_grid(cfg: Config, rows: list[Row], seeds: list[int], executor, run_dir: Path,
             flower_dir: Path | None = None) -> GridRun:
    """Compute the rows not yet stored for these settings, storing each as soon as it finishes.

    The steps: the pools' source (the entities' own DPMs or a Flower run's), the rows already stored,
    then the work: Step 1 and the raw-image rows submitted at once (Step 1 first, so it has a core while
    raw rows fill the others), and each feature row as soon as Step 1 has made its inputs."""
    t0 = time.time()
    check_entities(cfg)
    split = load_task(cfg)
    shards = entity_shards(cfg, split)
    store = RowStore(run_dir)
    pools, pool_source = flower_pools(cfg, rows, split, shards, flower_dir)
    run = GridRun()
    contributions = contributions_key(cfg, pool_source)
    run.pool_metrics = store.get_contributions(contributions) or {}
    todo = reuse_stored(run, store, rows, seeds, cfg, pool_source)
    log.info("Table 5: %d row runs to compute, %d already stored in %s", len(todo), len(run.reused), store.dir)

    feature_jobs = [job for job in todo if job.row.kind != RAW or reuses_phi(job.row, job.seed, cfg)]
    raw_jobs = [job for job in todo if job not in feature_jobs]
    step1 = executor.submit("prepare", prepare, cfg, pools) if feature_jobs else None
    pending = submit_raw_rows(executor, raw_jobs, cfg, split, shards)
    failures = []

    def finish(job: Job, result: dict | None, err: BaseException | None) -> None:
        if err is not None:
            failures.append((f"row {job.row.id} seed {job.seed}", err))
            log.error("row %s seed %d failed: %s", job.row.id, job.seed, err)
            return
        run.results[(job.row.id, job.seed)] = store.put(job.row, job.seed, job.key, result)
        run.computed.append((job.row.id, job.seed))
        log.info("row %s seed %d: top-1 %.1f top-5 %.1f (%.0fs) [%d/%d done]", job.row.id, job.seed,
                 result["top1"], result["top5"], result["seconds"], len(run.computed), len(todo))

    while pending or step1 is not None:
        handle, result, err = executor.next_done({**pending, **({step1: None} if step1 is not None else {})})
        if step1 is not None and handle == step1:
            step1 = None
            if err is not None:
                failures.append((f"Step 1 (needed by rows {', '.join(sorted({j.row.id for j in feature_jobs}))})",
                                 err))
                continue
            run.pool_metrics = store.put_contributions(contributions, result.pool_metrics)
            run.curves = result.curves
            pending |= submit_feature_rows(executor, result, feature_jobs, cfg, split, shards)
        else:
            finish(pending.pop(handle), result, err)
    run.seconds = time.time() - t0
    if failures:
        raise GridError("; ".join(f"{what} failed: {err}" for what, err in failures)
                        + f" ({len(run.results)} finished rows are kept in {store.dir})")
    return run


def flower_pools(cfg: Config, rows: list[Row], split, shards: dict[str, np.ndarray], flower_dir: Path | None
                 ) -> tuple[dict | None, str]:
    """The pools a Flower run stored, checked, when ``flower_dir`` is given and a row uses pools, and the
    pools' source as row keys name it ("own": the entities' own DPMs, made by Step 1)."""
    pool_names = sorted({e for r in rows for e in r.uses("pool")})
    if flower_dir is None or not pool_names:
        return None, "own"
    if cfg.collab.share != DPM:
        raise ValueError(f"--from-flower takes DPM pools; it cannot stand in for collab.share = {cfg.collab.share!r}")
    num_classes = len(split.S.classes)
    labels = {n: split.S.train_labels[idx] for n, idx in shards.items()}
    shape = feature_shape(cfg, split.S.image_shape, num_classes)
    pools, digest = load_flower_pools(flower_dir, cfg, pool_names, labels, shape, num_classes)
    return pools, f"flower:{digest}"


def reuse_stored(run: GridRun, store: RowStore, rows: list[Row], seeds: list[int], cfg: Config, pool_source: str
                 ) -> list[Job]:
    """Take every row already stored under its current key into ``run``; return the ones left to compute."""
    todo = []
    for row in rows:
        for seed in seeds:
            key = row_key(row, seed, cfg, pool_source)
            stored = store.get(row, seed, key)
            if stored is None:
                todo.append(Job(row, seed, key))
            else:
                run.results[(row.id, seed)] = stored
                run.reused.append((row.id, seed))
    return todo


def submit_raw_rows(executor, jobs: list[Job], cfg: Config, split, shards: dict[str, np.ndarray]) -> dict[object, Job]:
    """The rows that train a backbone on raw images, costliest first; S's images go into the store once."""
    if not jobs:
        return {}
    images, labels = executor.put(split.S.train_images), executor.put(split.S.train_labels)
    test_x, test_y = executor.put(split.S.test_images), executor.put(split.S.test_labels)
    pending = {}
    for job in sorted(jobs, key=lambda j: -_raw_cost(j.row, cfg, shards)):
        who = job.row.uses("raw")[0]
        pending[executor.submit(job.label, raw_row, job.row, job.seed, cfg, images, labels,
                                None if who == "S" else shards[who], test_x, test_y, len(split.S.classes))] = job
    return pending


def _raw_cost(row: Row, cfg: Config, shards: dict[str, np.ndarray]) -> float:
    who = row.uses("raw")[0]
    n = sum(len(s) for s in shards.values()) if who == "S" else len(shards[who])
    return n * raw_epochs(row, cfg)


def _feature_cost(row: Row, cfg: Config, sizes: dict[str, int]) -> float:
    """Feature vectors a row's decider passes over; rows are submitted longest first, so the longest
    one does not start last and leave the other cores idle at the end of the grid."""
    n = sum(sizes.get(part, 0) for part in row.parts)
    if row.kind == FEDAVG:
        return n * cfg.table5.fedavg_rounds * cfg.table5.fedavg_local_epochs
    return 0.0 if row.kind == RAW else n * cfg.decider.epochs


def submit_feature_rows(executor, inputs: GridInputs, jobs: list[Job], cfg: Config, split, shards
                        ) -> dict[object, Job]:
    """Once Step 1 is done: each pool, feature set and Φ put into the object store once, then the rows."""
    parts = {f"phi1:{n}": p for n, p in inputs.own.items()} | {f"pool:{n}": p for n, p in inputs.pools.items()}
    needed = {part for job in jobs for part in job.row.parts if part in parts}
    refs = {part: executor.put(parts[part]) for part in needed}
    backbone = executor.put(inputs.backbone)
    test_f, test_y = executor.put(inputs.test_features), executor.put(split.S.test_labels)
    sizes = {part: len(data) for part, data in parts.items()}
    pending = {}
    for job in sorted(jobs, key=lambda job: -_feature_cost(job.row, cfg, sizes)):
        row = job.row
        if row.kind == RAW:  # row 1 at the first seed: Φ itself
            handle = executor.submit(job.label, phi_row, cfg, backbone, executor.put(split.S.test_images), test_y,
                                     len(shards[row.uses("raw")[0]]))
        else:
            fn = fedavg_row if row.kind == FEDAVG else feature_row
            handle = executor.submit(job.label, fn, row, job.seed, cfg, backbone, test_f, test_y,
                                     *(refs[p] for p in row.parts))
        pending[handle] = job
    return pending


# --- the table, its checks and its chart ----------------------------------------------------------


def summarise(rows: list[Row], seeds: list[int], run: GridRun, share: str = DPM, rounds: int = 2) -> pd.DataFrame:
    """Mean (and spread over seeds) of top-1 and top-5 per row, beside the paper's figures."""
    out = []
    for row in rows:
        got = [run.results[(row.id, s)] for s in seeds if (row.id, s) in run.results]
        if not got:
            continue
        top1, top5 = np.array([g["top1"] for g in got]), np.array([g["top5"] for g in got])
        line = {"row": row.id, "entity": row.entity or "–", "image data": row.describe(share, rounds),
                "train size": got[0]["n_train"], "top-1": top1.mean(), "top-5": top5.mean()}
        if len(seeds) > 1:
            line |= {"top-1 sd": top1.std(ddof=1) if len(got) > 1 else float("nan"),
                     "top-5 sd": top5.std(ddof=1) if len(got) > 1 else float("nan"), "seeds": len(got)}
        paper = row.paper or (float("nan"), float("nan"))
        line |= {"paper top-1": paper[0], "paper top-5": paper[1],
                 "seconds": float(np.mean([g["seconds"] for g in got]))}
        out.append(line)
    return pd.DataFrame(out)


# The rows the checks and the comparison name, read from ROWS: each entity's row on its own raw images,
# the rows that train on what others shared, and the unpoisoned union that the first shared row poisons.
OWN_ROW = {r.entity: r.id for r in ROWS if r.kind == RAW and r.entity}
SHARED_ROWS = tuple(r.id for r in ROWS if r.uses("pool"))


def unpoisoned(row_id: str) -> str | None:
    """The row that trains on the same entities' data with every pool replaced by clean φ1 features."""
    row = next(r for r in ROWS if r.id == row_id)
    clean = {p.replace("pool:", "phi1:") for p in row.parts}
    return next((r.id for r in ROWS if r.kind == row.kind and set(r.parts) == clean), None)


# The margins this project holds the paper's two quantitative claims to: the data-poor entity gains at least
# this many top-1 points from all the pools (its last shared row against its own images), and poisoning costs at
# most this many points against the same union unpoisoned (the first shared row against its clean twin).
POOR_ENTITY, GAIN_TARGET, POISON_COST = "E4", 20.0, 3.0


def paper_checks(table: pd.DataFrame) -> list[str]:
    """The paper's claims about Table 5, each stated with our figures and whether it holds."""
    top1 = dict(zip(table["row"], table["top-1"], strict=True))
    entity = dict(zip(table["row"], table["entity"], strict=True))
    lines = []
    for r in SHARED_ROWS:
        own = OWN_ROW[entity[r]] if r in entity else None
        if own in top1:
            ok = top1[r] > top1[own]
            lines.append(f"row {r} ({entity[r]}, shared) {top1[r]:.1f} > row {own} (own images) {top1[own]:.1f}: "
                         f"{'yes' if ok else 'NO'}")
    fullest = [r.id for r in ROWS if r.entity == POOR_ENTITY and r.uses("pool")][-1]
    poor = OWN_ROW[POOR_ENTITY]
    if fullest in top1 and poor in top1:
        gain = top1[fullest] - top1[poor]
        lines.append(f"row {fullest} − row {poor} = {gain:+.1f} points top-1 (target ≥ +{GAIN_TARGET:g}): "
                     f"{'yes' if gain >= GAIN_TARGET else 'NO'}")
    first = next(r for r in SHARED_ROWS if unpoisoned(r))
    twin = unpoisoned(first)
    if first in top1 and twin in top1:
        gap = top1[twin] - top1[first]
        lines.append(f"row {twin} − row {first} = {gap:+.1f} points top-1 (target within {POISON_COST:g}): "
                     f"{'yes' if abs(gap) <= POISON_COST else 'NO'}")
    return lines


def bar_chart(table: pd.DataFrame, path: Path) -> Path:
    x = np.arange(len(table))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(table) + 2), 3.6))
    err = table["top-1 sd"].fillna(0) if "top-1 sd" in table else None
    ax.bar(x - 0.2, table["top-1"], 0.4, yerr=err, capsize=2, label="ours")
    ax.bar(x + 0.2, table["paper top-1"].fillna(0), 0.4, label="paper (ImageNet-500)", alpha=0.6)
    ax.set_xticks(x, table["row"])
    ax.set_xlabel("Table 5 row")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def row5_pace(table: pd.DataFrame, cfg: Config) -> str:
    """Row 5's measured pace when this table has it: what its budget cost here, not a remembered figure."""
    got = table[table["row"] == "5"]
    if got.empty or not got["seconds"].iloc[0] > 0:
        return ""
    seconds = float(got["seconds"].iloc[0])
    rate = got["train size"].iloc[0] * cfg.table5.all_epochs / seconds
    return f" ({seconds:.0f} s when it was computed, {rate:,.0f} training images/s with its evaluation)"


def write_outputs(cfg: Config, rows: list[Row], seeds: list[int], run: GridRun, run_dir: Path, how: str,
                  suffix: str = "") -> pd.DataFrame:
    """table5{suffix}.md/.csv/.png and the contributions' table pools{suffix}; returns the table."""
    share, rounds = cfg.collab.share, cfg.mdp.rounds
    table = summarise(rows, seeds, run, share, rounds)
    checks = paper_checks(table)
    d = cfg.data
    top5 = ", top-5 is 100% by definition" if len(d.task_classes) <= 5 else ""
    sizes = ", ".join(f"E{i + 1} {f:.0%}" for i, f in enumerate(d.shard_fractions))
    partition = f"Dirichlet α = {d.alpha}" if d.partition == "dirichlet" else "iid"
    shared = get_mode(share).explain(cfg)
    notes = " ".join([
        f"Ours: {d.dataset}, S = classes {d.task_classes} split into {partition} shards {sizes};",
        f"{cfg.backbone.name} pretrained on {cfg.backbone.pretrain_on}'s shard, split at {cfg.backbone.hook};",
        f"ψ = {cfg.reconstructor.name} on Q. Entities share {shared}.",
        f"Accuracy on S's held-out test split, mean over {len(seeds)} seed(s) {seeds}.",
        f"Rows 1-4 train {cfg.backbone.name} from scratch on the entity's raw images with the recipe Φ was",
        f"pretrained with ({cfg.pretrain.epochs} epochs), so row 1 at the first seed is Φ itself (evaluated,",
        f"not retrained). Row 5 trains on all of S for only {cfg.table5.all_epochs} epoch(s){row5_pace(table, cfg)},",
        "a budget that keeps the grid short, so row 5 is under-trained compared with the paper's.",
        f"Rows 6-12 and all4 refine Φ's φ2 for {cfg.decider.epochs} epochs on cached φ1 features"
        + (f" of {cfg.decider.views} views of each image (itself and augmented copies, own and shared)"
           if cfg.decider.views > 1 else "") + "; fedavg is",
        f"Flower's FedAvg of φ2 over E1-E4 on their own features ({cfg.table5.fedavg_rounds} rounds x",
        f"{cfg.table5.fedavg_local_epochs} local epochs).",
        f"With {len(d.task_classes)} classes{top5}. Paper: ImageNet, 500 classes, ResNet-50. Run: {how};",
        f"this invocation computed {len(run.computed)} rows and reused {len(run.reused)} in {run.seconds:.0f} s",
        "(the seconds column is each row's own wall time when it was computed).",
    ])
    notes += "\n\nThe paper's claims, with our figures:\n\n" + "\n".join(f"- {c}" for c in checks)
    title = "Table 5: classifiers trained on raw images vs shared features (%)"
    md = write_table(table, run_dir, f"table5{suffix}", title + (f", sharing {mode_name(share, rounds)}"
                                                                 if suffix else ""), notes)
    if len(table):
        bar_chart(table, run_dir / f"table5{suffix}.png")
    write_curves(run.curves, run_dir, f"curves{suffix}")
    if run.pool_metrics:
        pools = pd.DataFrame([{"entity": k, **v} for k, v in run.pool_metrics.items()])
        pools[["items_shared", "bytes_per_image"]] = pools[["items_shared", "bytes_per_image"]].round().astype(int)
        write_table(pools, run_dir, f"pools{suffix}", f"What each entity shares: {mode_name(share, rounds)}",
                    "disclosure_ssim: mean SSIM between each shared item and the sender's real image it shows "
                    "(for DPM ψ's reconstruction from the pool, the larger of SSIM(ψ, x) and SSIM(1 − ψ, x); for "
                    "MDP the selected image; 1 for raw images); label_ssim: against the real image whose label it "
                    "carries. bytes_per_image: float32 bytes shared per own image. DPM only: top1_original / "
                    "top1_poisoned are Φ's φ2 on S's test features without / with this DPM.")
    write_json(cfg.to_dict(), run_dir / "config.json")
    log.info("wrote %s", md)
    for c in checks:
        log.info("check: %s", c)
    return table


def sharing_table(tables: dict[str, pd.DataFrame], metrics: dict[str, dict], rounds: int, run_dir: Path,
                  worst: dict[str, dict[str, dict]] | None = None) -> Path:
    """One line per sharing mode: what it discloses and what it is worth, for the same entities and data.

    The senders' disclosure of DPM pools is ψ's, and says so; ``worst`` (the worst cases of attack
    reports for the same settings, :func:`entities.attacks.card.find_worst`) goes beside it.
    """
    lines = []
    for mode, table in tables.items():
        top1 = dict(zip(table["row"], table["top-1"], strict=True))
        sent = list(metrics.get(mode, {}).values())
        mean = {k: float(np.mean([m[k] for m in sent])) if sent else float("nan")
                for k in ("bytes_per_image", "disclosure_ssim", "label_ssim")}
        line = {"shared": mode_name(mode, rounds), "bytes per image": round(mean["bytes_per_image"]),
                "SSIM(shared, real image it shows)": mean["disclosure_ssim"],
                "measured by": get_mode(mode).disclosure_by,
                "SSIM(shared, real image of its label)": mean["label_ssim"]}
        if worst:
            top = max((w for w in worst.get(mode, {}).values()), key=lambda w: w["disclosure"], default=None)
            line |= {"worst attack SSIM": top["disclosure"] if top else float("nan"),
                     "worst attack": f"{top['attacker']} on {top['victim']}" if top else "–"}
        line |= {f"row {r} top-1": top1.get(r, float("nan")) for r in SHARED_ROWS}
        lines.append(line)
    own = tables[next(iter(tables))]
    own_top1 = dict(zip(own["row"], own["top-1"], strict=True))
    floors = [line for mode, line in zip(tables, lines, strict=True) if mode in LABEL_ONLY_MODES]
    retained = ""
    if len(floors) == len(LABEL_ONLY_MODES):  # utility against the better label-only floor, where both ran
        for r in SHARED_ROWS:
            floor = max(f[f"row {r} top-1"] for f in floors)
            if np.isnan(floor) or unpoisoned(r) not in own_top1:
                continue
            for line in lines:
                line[f"row {r} retained"] = utility_retained(line[f"row {r} top-1"], floor, own_top1[unpoisoned(r)])
            retained = (" Retained: (row(mode) − row(better label-only floor)) / (row(clean φ1) − that floor), the "
                        "clean row being the same entities' data with every pool replaced by clean φ1 features "
                        "(row 6 for row 7, all4 for row 12), from the mean top-1 over seeds.")
    alone = ", ".join(f"row {r} {own_top1[r]:.1f}" for r in (*OWN_ROW.values(), unpoisoned(SHARED_ROWS[0]))
                      if r in own_top1)
    reports = sorted({w["report"] for by_victim in (worst or {}).values() for w in by_victim.values()})
    attacked = (f"Worst attack: the most any attacker of `python -m sim.attack` recovered from one victim's pool in "
                f"that mode (report(s) {', '.join(reports)})." if reports else
                "No `python -m sim.attack` report for these settings: ψ's figure is the only measure of the DPM "
                "pools here, and ψ is the one reconstructor every DPM was trained against.")
    shared = f"{SHARED_ROWS[0]}-{SHARED_ROWS[-1]}"
    return write_table(pd.DataFrame(lines), run_dir, "sharing", "Table 5 by sharing mode: utility and visual "
                       "disclosure", f"Top-1 (%) of rows {shared} when the pools P_k(φ1(S_k)) are replaced by what "
                       "each mode shares; the rows without shared data do not depend on the mode (" + alone + "). "
                       "SSIM columns: mean over the entities of the sender's own measurement (see pools-<mode>.md); "
                       "for DPM pools that is ψ's reconstruction (ψ only). " + attacked + retained)


def main(argv: list[str] | None = None) -> dict[str, GridRun]:
    started, command = time.time(), command_line("python -m sim.table5", argv)
    parser = command_parser("python -m sim.table5", __doc__)
    parser.add_argument("--rows", nargs="*", default=None, metavar="ID", help=f"rows to run (default all): {ROW_IDS}")
    parser.add_argument("--seeds", type=int, default=1, help="repeats with seeds data.seed, data.seed+1, ...")
    parser.add_argument("--sequential", action="store_true", help="run the grid in this process, without Ray")
    parser.add_argument("--address", default=None, help="Ray cluster to join, e.g. 'auto' (default: start one)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    parser.add_argument("--cpus-per-row", type=int, default=1, help="CPUs (and torch threads) each Ray task reserves")
    parser.add_argument("--no-dashboard", action="store_true", help="start the local Ray instance without dashboard")
    parser.add_argument("--from-flower", type=Path, default=None, metavar="DIR",
                        help="take the poisoned pools from this `flwr run sim/` results directory (default: the "
                             "entities' own DPMs)")
    parser.add_argument("--partition", choices=("iid", "dirichlet"), default=None,
                        help="how S is sharded (default: data.partition)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="Dirichlet concentration, small = skewed (default: data.alpha)")
    parser.add_argument("--share", nargs="+", default=None, metavar="MODE",
                        help=f"what entities share in rows 7-12, one grid per mode: {', '.join(SHARING_MODES)} "
                             "(default: collab.share of the config, i.e. dpm, the paper)")
    add_config_args(parser)
    parser.set_defaults(config="collab")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    args.set += [f"data.partition={args.partition}"] * bool(args.partition)
    args.set += [f"data.alpha={args.alpha}"] * (args.alpha is not None)
    cfg = config_from_args(args)
    rows = select_rows(args.rows)
    check_entities(cfg)
    if args.from_flower is not None and not args.from_flower.is_dir():
        raise ValueError(f"--from-flower {args.from_flower}: no such directory")
    seeds = [cfg.data.seed + i for i in range(args.seeds)]
    name = cfg.name + (f"-dirichlet{cfg.data.alpha:g}" if cfg.data.partition == "dirichlet" else "")
    run_dir = cfg.results_dir() / "table5" / run_name(args, name)

    modes = [check_mode(m) for m in dict.fromkeys(args.share or [cfg.collab.share])]
    with results_lock(cfg.results_dir()):  # one run per results root: rows and tables are never written twice
        if args.sequential:
            return run_modes(cfg, modes, rows, seeds, Sequential(cfg.threads), "sequential, in one process", run_dir,
                             args.from_flower, (started, command))
        import ray

        url = start_ray(args.address, args.num_cpus, dashboard=not args.no_dashboard)
        if url:
            print(f"Ray dashboard: http://{url}", flush=True)
        how = f"Ray, {int(ray.cluster_resources().get('CPU', 0))} CPUs, {args.cpus_per_row} per row"
        try:
            return run_modes(cfg, modes, rows, seeds, RayPool(args.cpus_per_row), how, run_dir, args.from_flower,
                             (started, command))
        finally:
            ray.shutdown()


def run_modes(cfg: Config, modes: list[str], rows: list[Row], seeds: list[int], executor, how: str, run_dir: Path,
              flower_dir: Path | None, invocation: tuple[float, list[str]]) -> dict[str, GridRun]:
    """The grid once per sharing mode (rows that share nothing are stored once and reused), the
    tables of each, with several modes the table that compares them, and the run's provenance
    (``invocation``: when the command started, and its command line)."""
    runs, tables, metrics = {}, {}, {}
    for mode in modes:
        cfg_mode = dataclasses.replace(cfg, collab=dataclasses.replace(cfg.collab, share=mode))
        suffix = f"-{mode}" if len(modes) > 1 else ""
        runs[mode] = run = run_grid(cfg_mode, rows, seeds, executor, run_dir, flower_dir)
        tables[mode] = write_outputs(cfg_mode, rows, seeds, run, run_dir, how, suffix)
        metrics[mode] = run.pool_metrics
        log.info("Table 5, sharing %s: %d rows computed, %d reused, %.0fs", mode, len(run.computed),
                 len(run.reused), run.seconds)
        print((run_dir / f"table5{suffix}.md").read_text())
    if len(modes) > 1:
        md = sharing_table(tables, metrics, cfg.mdp.rounds, run_dir, find_worst(cfg, cfg.results_dir()))
        print(md.read_text())
    write_provenance(run_dir, *invocation)
    return runs


if __name__ == "__main__":
    run_main(main)
