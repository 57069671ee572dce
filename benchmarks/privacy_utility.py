"""What a DPM's privacy costs the collaboration: Table 5 rows on pools from ever longer-trained DPMs.

    python benchmarks/privacy_utility.py [--config collab] [--results-root DIR] [--epochs 0 2 4 8 16]
                                         [--rows 7 10 12] [--attacker rx2s2] [--out results/table5/collab]

Every entity's DPM starts as the identity map (``dpm.init = identity``), so at 0 epochs its pool is
φ1(x) itself, and is trained for each number of epochs in ``--epochs`` (each from the start, stored
like any DPM, so ``--set dpm.init=identity dpm.epochs=N`` in ``sim.table5`` reuses it). For each,
the pools of E1-E3 are scored for

- privacy: the SSIM of ψ's reconstruction (the reconstructor the DPM trains against) and of an
  attacker's reconstructor the DPM never saw (``--attacker``, trained on Q like ψ), each the larger
  of SSIM(·, x) and SSIM(1 − ·, x);
- utility: Φ's φ2 on poisoned test features, and the Table 5 rows that refine φ2 on the pools
  (the grid's own ``feature_row``: top-1 on S's clean test features).

Writes ``privacy-utility.md``/``.csv``/``.png``. Compare the rows with rows 1-4 of ``table5.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from entities.config import Config
from entities.metrics import disclosure
from entities.pipeline import ArtefactStore, entity_shards, load_task, shared_reconstructor
from entities.provenance import write_provenance
from entities.reconstructors import RECONSTRUCTORS
from entities.report import write_table
from entities.sharing import step1
from entities.train import evaluate_classifier, evaluate_reconstruction
from sim.cli import add_config_args, config_from_args, setup_logging
from sim.grid import feature_row, prepare, select_rows

SENDERS = ("E1", "E2", "E3")  # the entities whose pools Table 5's rows 7-12 use


def with_dpm_epochs(cfg: Config, epochs: int) -> Config:
    return dataclasses.replace(cfg, dpm=dataclasses.replace(cfg.dpm, init="identity", epochs=epochs))


def measure(cfg: Config, epochs: int, rows: list, attacker, split, shards) -> dict:
    """One line of the curve: DPMs trained ``epochs`` epochs from the identity, their pools scored."""
    t0 = time.time()
    inputs = prepare(with_dpm_epochs(cfg, epochs))
    line = {"DPM epochs": epochs}
    line["SSIM ψ"] = np.mean([inputs.pool_metrics[n]["disclosure_ssim"] for n in SENDERS])
    line["SSIM attacker"] = np.mean([
        disclosure(evaluate_reconstruction(attacker, inputs.pools[n].features, split.S.train_images[shards[n]]))
        for n in SENDERS])
    line["φ2 on poisoned test"] = np.mean([inputs.pool_metrics[n]["top1_poisoned"] for n in SENDERS])
    parts = {f"phi1:{n}": p for n, p in inputs.own.items()} | {f"pool:{n}": p for n, p in inputs.pools.items()}
    for row in rows:
        result = feature_row(row, cfg.data.seed, cfg, inputs.backbone, inputs.test_features, split.S.test_labels,
                             *(parts[p] for p in row.parts))
        line[f"row {row.id} ({row.entity})"] = result["top1"]
    line["seconds"] = time.time() - t0
    return line


def curve(table: pd.DataFrame, path: Path, baseline: float) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for column in [c for c in table if c.startswith("row ")]:
        ax.plot(table["SSIM attacker"], table[column], "o-", label=column)
    for x, epochs in zip(table["SSIM attacker"], table["DPM epochs"], strict=True):
        ax.annotate(f"{epochs} ep", (x, table.filter(like="row ").max(axis=1).max()), fontsize=7, ha="center")
    ax.axhline(baseline, color="grey", ls="--", lw=1, label="row 1 (Φ, E1 alone)")
    ax.set_xlabel("SSIM of the unseen attacker's reconstruction from the pools (→ less private)")
    ax.set_ylabel("top-1 on clean test features (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser, run_name=False)  # its report goes to --out
    parser.set_defaults(config="collab")
    parser.add_argument("--epochs", type=int, nargs="+", default=[0, 2, 4, 8, 16], help="DPM epochs, one line each")
    parser.add_argument("--rows", nargs="+", default=["7", "10", "12"], help="Table 5 rows that use the pools")
    parser.add_argument("--attacker", default="rx2s2", choices=sorted(RECONSTRUCTORS),
                        help="reconstructor the DPMs are not trained against")
    parser.add_argument("--out", type=Path, default=None, help="default: results/table5/<preset>")
    args = parser.parse_args()
    setup_logging()
    cfg = config_from_args(args)
    if args.attacker == cfg.reconstructor.name:
        parser.error(f"--attacker must differ from ψ ({cfg.reconstructor.name}), the DPM's own adversary")
    rows = [row for row in select_rows(args.rows) if row.uses("pool")]
    if not rows:
        parser.error("--rows: name at least one row that uses the pools (7-12)")
    split = load_task(cfg)
    store = ArtefactStore(cfg)
    shared = step1(cfg, split, store)
    attacker = shared_reconstructor(cfg, split, store, shared.phi1, args.attacker)
    shards = entity_shards(cfg, split)
    row1 = evaluate_classifier(shared.backbone, split.S.test_images, split.S.test_labels)["top1"]
    table = pd.DataFrame([measure(cfg, e, rows, attacker, split, shards) for e in sorted(set(args.epochs))])
    out = args.out or cfg.results_dir() / "table5" / cfg.name
    notes = (f"{cfg.name}: every entity's DPM ({cfg.dpm.blocks} blocks, λ = {cfg.dpm.lam}, lr {cfg.dpm.lr}) "
             f"starts as the identity and is trained for the given epochs; 0 epochs means the pools are φ1's "
             f"clean features. SSIM columns: mean over {', '.join(SENDERS)}'s pools of the larger of SSIM(·, x) "
             f"and SSIM(1 − ·, x), for ψ = {cfg.reconstructor.name} (the DPM's adversary) and for an attacker "
             f"{args.attacker} trained on Q the same way, which the DPM never saw. φ2 on poisoned test: Φ's own "
             f"decider on P(φ1(test)), mean over the three DPMs. Rows: Φ's φ2 refined with the Table 5 recipe "
             f"({cfg.decider.epochs} epochs), top-1 on S's clean test features; row 1 (Φ itself, E1 alone) "
             f"is {row1:.1f}. Compare with rows 1-4 of table5.md for the same preset.")
    md = write_table(table, out, "privacy-utility", "Privacy against utility along DPM training", notes)
    curve(table, out / "privacy-utility.png", row1)
    write_provenance(out, started, name="provenance-privacy-utility.json")  # the folder is Table 5's
    print(md.read_text())


if __name__ == "__main__":
    main()
