"""Reproduce Deep Poisoning's Tables 1-3 and Figures 4-5 at CPU scale.

    python -m sim.reproduce table1 table2 figure4 [table3 figure5] [--config default] [--set dpm.lam=0.5]

Pretrains Φ on S, splits it at the hook point, trains ψ on Q and one DPM on S, then scores the
decider and ψ on the held-out test split of S, from original and from poisoned features.
``table3`` adds the stationary perturbation baselines (GN, GF, MF, alone and before the DPM);
``figure5`` trains the five other reconstructors of Sec. 4.2.2 as attackers the DPM never saw.
Files go to ``results/reproduce/<config>/``; shared artefacts are reused from ``results/artefacts/``.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import pandas as pd
import torch
from torch import nn

from entities.config import Config
from entities.entity import Entity
from entities.perturbations import PERTURBATIONS, build_perturbation
from entities.pipeline import ArtefactStore, SharedModules, cached_features, load_task, shared_reconstructor, step1
from entities.reconstructors import RECONSTRUCTORS
from entities.report import image_grid, write_json, write_table
from entities.train import evaluate_classifier, evaluate_reconstruction, infer, poison, to_float
from sim.cli import add_config_args, config_from_args, run_main

log = logging.getLogger("poisonpool")

EXPERIMENTS = ("table1", "table2", "figure4", "table3", "figure5")
DEFAULT_EXPERIMENTS = ("table1", "table2", "figure4")

# The paper's figures (ImageNet, 500 classes, 224 px, split at conv4_1).
PAPER_TABLE1 = {
    "top1": {"ResNet50": (79.39, 78.88), "ResNet101": (81.13, 80.78)},
    "top5": {"ResNet50": (94.18, 94.11), "ResNet101": (95.03, 94.86)},
}
# Table 3 (ResNet101): top-1, top-5, L1, SSIM.
PAPER_TABLE3 = {
    "w/o": (81.13, 95.03, 0.0406, 0.7009), "GN": (25.47, 45.99, 0.1905, 0.2635),
    "GF": (15.60, 30.24, 0.1055, 0.4699), "MF": (4.44, 10.78, 0.1169, 0.4334),
    "DPM": (80.78, 94.86, 0.2886, 0.0069), "GN+DPM": (78.10, 93.64, 0.3339, 0.0047),
    "GF+DPM": (78.77, 93.78, 0.3450, 0.0041), "MF+DPM": (71.23, 89.96, 0.3564, 0.0186),
}
PAPER_TABLE2 = {
    "l1": {"ResNet50": (0.0443, 0.2928), "ResNet101": (0.0406, 0.2886)},
    "ssim": {"ResNet50": (0.6730, 0.0070), "ResNet101": (0.7009, 0.0069)},
}


def _side_by_side(ours: dict[str, tuple[float, float]], paper: dict, metrics: list[str]) -> pd.DataFrame:
    rows = []
    for m in metrics:
        row = {"metric": m, "ours original": ours[m][0], "ours poisoned": ours[m][1]}
        for net, (o, p) in paper.get(m, {}).items():
            row[f"paper {net} original"] = o
            row[f"paper {net} poisoned"] = p
        rows.append(row)
    return pd.DataFrame(rows)


def spread_rows(labels, n: int) -> list[int]:
    """Up to n test rows cycling through the classes, so a figure shows every class, not n airplanes."""
    by_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    rows: list[int] = []
    while len(rows) < min(n, len(labels)):
        for idx in by_class:
            if idx and len(rows) < n:
                rows.append(idx.pop(0))
    return rows


def table3(shared: SharedModules, dpm: nn.Module, feats: torch.Tensor, test_x, test_y) -> pd.DataFrame:
    """Each poisoning operation scored for classification and reconstruction on the test split."""
    ops = {"w/o": nn.Identity(), "DPM": dpm}
    for name in PERTURBATIONS:
        pert = build_perturbation(name)
        ops[name] = pert
        ops[f"{name}+DPM"] = nn.Sequential(pert, dpm)
    rows = []
    for name in PAPER_TABLE3:
        with torch.no_grad():
            altered = torch.cat([ops[name](feats[i:i + 500]) for i in range(0, len(feats), 500)])
        c = evaluate_classifier(shared.phi2, altered, test_y)
        r = evaluate_reconstruction(shared.psi, altered, test_x)
        p = PAPER_TABLE3[name]
        rows.append({"poisoning": name, "top1": c["top1"], "top5": c["top5"], "l1": r["l1"], "ssim": r["ssim"],
                     "ssim_inverted": r["ssim_inverted"], "paper top1": p[0], "paper top5": p[1],
                     "paper l1": p[2], "paper ssim": p[3]})
    return pd.DataFrame(rows)


def figure5(cfg: Config, split, store: ArtefactStore, shared: SharedModules, dpm: nn.Module, feats: torch.Tensor,
            test_x, test_y) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """All six reconstructors of Sec. 4.2.2 on original and poisoned test features."""
    poisoned = poison(dpm, feats)
    show = spread_rows(test_y, 6)
    rows, columns = [], {"raw": to_float(test_x[show])}
    for name in RECONSTRUCTORS:
        psi = shared_reconstructor(cfg, split, store, shared.phi1, name)
        r_o = evaluate_reconstruction(psi, feats, test_x)
        r_p = evaluate_reconstruction(psi, poisoned, test_x)
        rows.append({"reconstructor": name, "trained against": name == cfg.reconstructor.name,
                     "l1 original": r_o["l1"], "l1 poisoned": r_p["l1"], "ssim original": r_o["ssim"],
                     "ssim poisoned": r_p["ssim"], "ssim inverted poisoned": r_p["ssim_inverted"]})
        columns[f"{name} w/o"] = infer(psi, feats[show])
        columns[f"{name} w/"] = infer(psi, poisoned[show])
    return pd.DataFrame(rows), columns


def reproduce(cfg: Config, experiments: list[str]) -> dict[str, float]:
    t0 = time.time()
    out_dir = cfg.results_dir() / "reproduce" / cfg.name
    write_json(cfg.to_dict(), out_dir / "config.json")
    split = load_task(cfg)
    store = ArtefactStore(cfg)
    log.info("S: %d train / %d test images of classes %s; Q: %d train images of classes %s",
             len(split.S.train_labels), len(split.S.test_labels), split.S.classes,
             len(split.Q.train_labels), split.Q.classes)
    shared = step1(cfg, split, store)
    entity = Entity("S", split.S.train_images, split.S.train_labels, store)
    dpm = entity.train_dpm(shared, cfg, seed=cfg.data.seed)

    test_x, test_y = split.S.test_images, split.S.test_labels
    feats = cached_features(store, "S-test", shared.phi1, test_x)
    poisoned = poison(dpm, feats)
    c_orig = evaluate_classifier(shared.phi2, feats, test_y)
    c_pois = evaluate_classifier(nn.Sequential(dpm, shared.phi2), feats, test_y)
    r_orig = evaluate_reconstruction(shared.psi, feats, test_x)
    r_pois = evaluate_reconstruction(shared.psi, poisoned, test_x)
    figures = {f"{k}_original": v for k, v in {**c_orig, **r_orig}.items()}
    figures |= {f"{k}_poisoned": v for k, v in {**c_pois, **r_pois}.items()}
    setting = (f"{cfg.data.dataset}, S = classes {cfg.data.task_classes} ({len(split.S.train_labels)} train, "
               f"{len(test_y)} test images), {cfg.backbone.name} split at {cfg.backbone.hook}, "
               f"ψ = {cfg.reconstructor.name} trained on Q ({len(split.Q.train_labels)} images), "
               f"DPM of {cfg.dpm.blocks} residual blocks, λ = {cfg.dpm.lam}.")

    if "table1" in experiments:
        ours = {m: (c_orig[m], c_pois[m]) for m in ("top1", "top5")}
        md = write_table(_side_by_side(ours, PAPER_TABLE1, ["top1", "top5"]), out_dir, "table1",
                         "Table 1: classification from original vs poisoned features (%)",
                         f"Ours: {setting} With {len(split.S.classes)} classes top-5 is 100% by definition. "
                         "Paper: ImageNet, 500 classes, 224-pixel images.")
        log.info("wrote %s", md)
    if "table2" in experiments:
        ours = {m: (r_orig[m], r_pois[m]) for m in ("l1", "ssim", "ssim_inverted", "psnr")}
        md = write_table(_side_by_side(ours, PAPER_TABLE2, ["l1", "ssim", "ssim_inverted", "psnr"]), out_dir,
                         "table2", "Table 2: reconstruction by ψ from original vs poisoned features",
                         f"Ours: {setting} L1 = mean absolute pixel error, images in [0, 1]; SSIM with an "
                         "11-pixel Gaussian window (σ = 1.5), data range 1; ssim_inverted = SSIM(1 − ψ(·), x), "
                         "which exposes a photographic-negative reconstruction; PSNR in dB for data range 1.")
        log.info("wrote %s", md)
    if "figure4" in experiments:
        show = spread_rows(test_y, 8)
        rec_o, rec_p = infer(shared.psi, feats[show]), infer(shared.psi, poisoned[show])
        png = image_grid(
            {"raw": to_float(test_x[show]), "ψ(φ1(x)) w/o poisoning": rec_o,
             "ψ(P(φ1(x))) w/ poisoning": rec_p, "1 − ψ(P(φ1(x)))": 1 - rec_p},
            out_dir / "figure4.png", [split.S.classes[c] for c in test_y[show]])
        log.info("wrote %s", png)
    if "table3" in experiments:
        df = table3(shared, dpm, feats, test_x, test_y)
        md = write_table(df, out_dir, "table3", "Table 3: stationary perturbations vs the DPM",
                         f"Ours: {setting} GN adds Gaussian noise of one feature standard deviation, GF blurs each "
                         "feature map with a 5x5 Gaussian (σ = 1.5), MF with a 5x5 mean filter; X+DPM applies X "
                         "before the DPM (trained on unperturbed features). Paper: ResNet101 on ImageNet.")
        log.info("wrote %s", md)
    if "figure5" in experiments:
        df, columns = figure5(cfg, split, store, shared, dpm, feats, test_x, test_y)
        md = write_table(df, out_dir, "figure5", "Figure 5: the DPM against reconstructors it was not trained against",
                         f"Ours: {setting} Every ψ is trained with L1 on Q only; the DPM was trained against "
                         f"{cfg.reconstructor.name} alone.")
        image_grid(columns, out_dir / "figure5.png", [split.S.classes[c] for c in test_y[spread_rows(test_y, 6)]])
        log.info("wrote %s and figure5.png", md)
    figures["seconds"] = time.time() - t0
    write_json(figures, out_dir / "figures.json")
    log.info("done in %.0fs: %s", figures["seconds"],
             ", ".join(f"{k}={v:.4f}" for k, v in figures.items() if k != "seconds"))
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sim.reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("experiments", nargs="*", default=list(DEFAULT_EXPERIMENTS),
                        help=f"any of {EXPERIMENTS} (default: {' '.join(DEFAULT_EXPERIMENTS)})")
    add_config_args(parser)
    args = parser.parse_args(argv)
    unknown = set(args.experiments) - set(EXPERIMENTS)
    if unknown:
        parser.error(f"unknown experiment(s) {sorted(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    reproduce(config_from_args(args), args.experiments)


if __name__ == "__main__":
    run_main(main)
