"""Does MDP's transfer hinge on the fresh model sharing the crafting model's initial weights?

    python benchmarks/mdp_init_probe.py [--config mdp-full] [--results-root DIR] [--size 2000]

Every model ``sim.mdp`` trains starts from ``data.seed``'s weights, the crafting model f too. This
trains fresh ResNet-20s from two other seeds on a D of ``--size`` images and on its MDP set (one
draw), for f = the model of D and f = the model of every training image, under both readings, and
writes ``init-probe.md`` beside the scale table. It reuses the sets and f that ``python -m sim.mdp
scale`` stored (run it first, or this builds them); its own models are not stored.
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

from entities.backbone import build_backbone
from entities.presets import load_config
from entities.report import write_table
from entities.train import pretrain
from sim.mdp import prepare, retained

SEEDS = (1, 2)  # offsets from data.seed: never the seed f started from


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="mdp-full")
    parser.add_argument("--results-root", default="")
    parser.add_argument("--size", type=int, default=2000)
    args = parser.parse_args()
    rows = []
    for who in ("D", "all"):
        for norm in ("l2", "linf"):
            cfg = load_config(args.config, {"data.max_task_train": args.size, "mdp.crafter": who, "mdp.rounds": 1,
                                            "mdp.transfer": [], "mdp.readings": [norm],
                                            "results_root": args.results_root})
            run = prepare(cfg)
            S, mset = run.split.S, run.sets[norm][1].of_draw(0)
            for offset in SEEDS:
                top1 = {}
                for tag, (x, y) in (("original", (S.train_images, S.train_labels)),
                                    ("MDP", (mset.images.numpy(), mset.labels))):
                    torch.manual_seed(cfg.data.seed + offset)
                    model = build_backbone(cfg.backbone.name, len(S.classes), x.shape[1])
                    pretrain(model, x, y, cfg.pretrain, seed=cfg.data.seed + offset)
                    top1[tag] = run.test_top1(model)
                rows.append({"crafting model": run.crafter.describe(), "PGD": norm, "seed": cfg.data.seed + offset,
                             "original": top1["original"], "MDP": top1["MDP"],
                             "retained (%)": retained(top1["MDP"], top1["original"])})
                print(rows[-1], flush=True)
    out = cfg.results_dir() / "mdp" / cfg.name
    write_table(pd.DataFrame(rows), out, "init-probe", "MDP with fresh models from other initial weights", (
        f"D = {args.size} seeded CIFAR-10 images; fresh models start from seeds other than f's ({cfg.data.seed}) and "
        "shuffle with them; same [pretrain] recipe and test images as the scale table."))


if __name__ == "__main__":
    main()
