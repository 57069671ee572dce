"""Why Table 5's row 7 does not beat row 1 at CPU scale: Φ's decider refined on other unions.

    python benchmarks/decider_unions.py [--config collab] [--results-root DIR] [--out results/table5/collab]

Row 1 is Φ itself (E1 pretrained it on S1 with augmentation), and rows 6-12 refine its decider φ2
on φ1 features with φ1 frozen. This refines φ2 with the grid's own recipe on unions that separate
the candidate causes (more data, poisoned data, E1's own features), at two learning rates, and
writes ``decider-unions.md``. It reuses the stored Step 1 and DPMs of the config (run
``python -m sim.table5`` first, or it trains them).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import pandas as pd

from entities.pipeline import load_task
from entities.provenance import write_provenance
from entities.report import write_table
from entities.train import evaluate_classifier
from sim.cli import add_config_args, config_from_args, setup_logging
from sim.grid import FEATURES, Row, feature_row, prepare

UNIONS = {
    "φ1(S1) ∪ φ1(S2) (row 6)": ("phi1:E1", "phi1:E2"),
    "φ1(S1) ∪ P2(φ1(S2)) (row 7)": ("phi1:E1", "pool:E2"),
    "φ1(S2)": ("phi1:E2",),
    "φ1(S2) ∪ φ1(S3)": ("phi1:E2", "phi1:E3"),
    "P2(φ1(S2)) ∪ P3(φ1(S3))": ("pool:E2", "pool:E3"),
    "φ1(S1) ∪ … ∪ φ1(S4) (all4)": ("phi1:E1", "phi1:E2", "phi1:E3", "phi1:E4"),
}


def main() -> None:
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser, run_name=False)  # its report goes to --out
    parser.set_defaults(config="collab")
    parser.add_argument("--lr", type=float, nargs="+", default=[0.05, 0.01], help="decider learning rates")
    parser.add_argument("--out", type=Path, default=Path("results/table5/collab"))
    args = parser.parse_args()
    setup_logging()
    cfg = config_from_args(args)
    inputs = prepare(cfg)
    labels = load_task(cfg).S.test_labels
    parts = {f"phi1:{n}": p for n, p in inputs.own.items()} | {f"pool:{n}": p for n, p in inputs.pools.items()}
    phi2 = inputs.backbone.split(cfg.backbone.hook)[1]
    lines = [{"decider trained on": "nothing: Φ's own φ2 (row 1)", "images": 0,
              **{f"top-1, lr {lr}": evaluate_classifier(phi2, inputs.test_features, labels)["top1"]
                 for lr in args.lr}}]
    train_acc = {name: evaluate_classifier(phi2, p.features, p.labels)["top1"] for name, p in parts.items()}
    for name, union in UNIONS.items():
        line = {"decider trained on": name, "images": sum(len(parts[p]) for p in union)}
        for lr in args.lr:
            run_cfg = dataclasses.replace(cfg, decider=dataclasses.replace(cfg.decider, lr=lr))
            row = Row(name, "", FEATURES, union)
            result = feature_row(row, cfg.data.seed, run_cfg, inputs.backbone, inputs.test_features, labels,
                                 *(parts[p] for p in union))
            line[f"top-1, lr {lr}"] = result["top1"]
        lines.append(line)
    fit = ", ".join(f"{k} {v:.1f}" for k, v in train_acc.items())
    md = write_table(pd.DataFrame(lines), args.out, "decider-unions", "Φ's decider refined on other unions (%)",
                     f"{cfg.name}: Φ's φ2 refined for {cfg.decider.epochs} epochs with the grid's recipe (SGD, "
                     "cosine schedule, no augmentation on cached features) from the same start; top-1 on S's "
                     f"test features. Φ's own φ2 on each entity's training features (phi1:Ek, i.e. φ1(Sk)) "
                     f"and poisoned pool (pool:Ek), top-1: {fit}.")
    write_provenance(args.out, started, name="provenance-decider-unions.json")  # the folder is Table 5's
    print(md.read_text())


if __name__ == "__main__":
    main()
