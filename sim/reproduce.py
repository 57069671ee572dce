"""Reproduce Deep Poisoning's Tables 1-4 and Figures 4-7 at CPU scale.

    python -m sim.reproduce table1 table2 figure4 [table3 figure5 figure6] [--config default] [--set dpm.lam=0.5]
    python -m sim.reproduce table4 figure7 --config table4

Pretrains Φ on S, splits it at the hook point, trains ψ on Q and one DPM on S, then scores the
decider and ψ on the held-out test split of S, from original and from poisoned features.
``table3`` adds the stationary perturbation baselines (GN, GF, MF, alone and before the DPM);
``figure5`` trains the five other reconstructors of Sec. 4.2.2 as attackers the DPM never saw;
``figure6`` shows ψ's reconstructions under each of Table 3's operations. ``table4`` and ``figure7``
(:mod:`sim.table4`) compare a shared DeepObfuscator with private DPMs on CelebA faces, on their own
run. Experiments are data (:data:`EXPERIMENTS`): each is a function of the run its ``prepare`` makes
(:class:`Run` for Tables 1-3), made once per invocation, so adding one is a function and a registry line.
Files go to ``results/reproduce/<config>/``; shared artefacts are reused from ``results/artefacts/``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from entities.config import Config
from entities.data import TaskSplit
from entities.dpm import build_dpm
from entities.entity import Entity
from entities.files import load_torch, save_torch
from entities.perturbations import PERTURBATIONS, build_perturbation
from entities.pipeline import (
    ArtefactStore,
    SharedModules,
    cached_features,
    load_task,
    shared_reconstructor,
    step1_curves,
)
from entities.provenance import command_line, write_provenance
from entities.reconstructors import RECONSTRUCTORS
from entities.report import image_grid, write_curves, write_json, write_table
from entities.sharing import step1
from entities.train import evaluate_classifier, evaluate_reconstruction, infer, poison, to_float, train_dpm
from sim.cli import add_config_args, command_parser, config_from_args, run_main, run_name
from sim.table4 import figure7, prepare_faces, table4

log = logging.getLogger("poisonpool")


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


@dataclass
class Run:
    """What every experiment reads, made once per invocation: settings, data, Step 1, the DPM trained
    on S, and the test split's features with the decider's and ψ's scores on them."""

    cfg: Config
    split: TaskSplit
    store: ArtefactStore
    shared: SharedModules
    entity: Entity  # S as one entity: its φ1 features and its private DPM
    dpm: nn.Module
    feats: torch.Tensor
    poisoned: torch.Tensor
    figures: dict[str, float]
    setting: str
    out_dir: Path

    @property
    def test_x(self) -> np.ndarray:
        return self.split.S.test_images

    @property
    def test_y(self) -> np.ndarray:
        return self.split.S.test_labels

    def class_names(self, rows: list[int]) -> list[str]:
        return [self.split.S.classes[c] for c in self.test_y[rows]]

    def scores(self, key: str) -> dict[str, float]:
        """The original (``key = "original"``) or poisoned figures of Tables 1-2."""
        return {k[: -len(key) - 1]: v for k, v in self.figures.items() if k.endswith(f"_{key}")}


def prepare(cfg: Config) -> Run:
    """Step 1, the DPM on S and the test split scored from original and from poisoned features."""
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
    out_dir = cfg.results_dir() / "reproduce" / cfg.name
    return Run(cfg, split, store, shared, entity, dpm, feats, poisoned, figures, setting, out_dir)


def table1(run: Run) -> None:
    o, p = run.scores("original"), run.scores("poisoned")
    ours = {m: (o[m], p[m]) for m in ("top1", "top5")}
    md = write_table(_side_by_side(ours, PAPER_TABLE1, ["top1", "top5"]), run.out_dir, "table1",
                     "Table 1: classification from original vs poisoned features (%)",
                     f"Ours: {run.setting} With {len(run.split.S.classes)} classes top-5 is 100% by definition. "
                     "Paper: ImageNet, 500 classes, 224-pixel images.")
    log.info("wrote %s", md)


def table2(run: Run) -> None:
    o, p = run.scores("original"), run.scores("poisoned")
    ours = {m: (o[m], p[m]) for m in ("l1", "ssim", "ssim_inverted", "psnr")}
    md = write_table(_side_by_side(ours, PAPER_TABLE2, ["l1", "ssim", "ssim_inverted", "psnr"]), run.out_dir,
                     "table2", "Table 2: reconstruction by ψ from original vs poisoned features",
                     f"Ours: {run.setting} L1 = mean absolute pixel error, images in [0, 1]; SSIM with an "
                     "11-pixel Gaussian window (σ = 1.5), data range 1; ssim_inverted = SSIM(1 − ψ(·), x), "
                     "which exposes a photographic-negative reconstruction; PSNR in dB for data range 1.")
    log.info("wrote %s", md)


def figure4(run: Run) -> None:
    show = spread_rows(run.test_y, 8)
    rec_o, rec_p = infer(run.shared.psi, run.feats[show]), infer(run.shared.psi, run.poisoned[show])
    png = image_grid(
        {"raw": to_float(run.test_x[show]), "ψ(φ1(x)) w/o poisoning": rec_o,
         "ψ(P(φ1(x))) w/ poisoning": rec_p, "1 − ψ(P(φ1(x)))": 1 - rec_p},
        run.out_dir / "figure4.png", run.class_names(show))
    log.info("wrote %s", png)


def perturbed_dpm(run: Run, name: str) -> nn.Module:
    """A DPM trained, like the paper's X+DPM reading, on X(φ1(x)) of S: the perturbation is in front of
    it from its first step. Stored beside the entity's own DPM, under the same settings key."""
    cfg, S = run.cfg, run.split.S
    pert = build_perturbation(name)
    train_feats = run.entity.featurize(run.shared).features
    torch.manual_seed(cfg.data.seed)
    dpm = build_dpm(cfg.dpm, tuple(train_feats.shape[1:]), run.shared.phi2)
    path = run.entity.dpm_path(cfg, run.shared, cfg.data.seed, after=name)
    if path.is_file():
        dpm.load_state_dict(load_torch(path, f"the DPM trained after {name}"))
    else:
        train_dpm(dpm, copy.deepcopy(run.shared.phi2), run.shared.psi, infer(pert, train_feats), S.train_images,
                  S.train_labels, cfg.dpm, seed=cfg.data.seed, what=f"DPM after {name}")
        save_torch(dpm.state_dict(), path, private=True)
    return nn.Sequential(pert, dpm.eval())


def table3_ops(run: Run) -> dict[str, nn.Module]:
    """Table 3's operations on φ1 features. ``X+DPM`` puts X in front of the DPM trained on unperturbed
    features; ``X+DPM (trained after X)`` in front of a DPM trained with X in front (see table3)."""
    ops: dict[str, nn.Module] = {"w/o": nn.Identity(), "DPM": run.dpm}
    for name in PERTURBATIONS:
        pert = build_perturbation(name)
        ops[name] = pert
        ops[f"{name}+DPM"] = nn.Sequential(pert, run.dpm)
        ops[f"{name}+DPM (trained after {name})"] = perturbed_dpm(run, name)
    return ops


def table3(run: Run) -> None:
    """Each poisoning operation scored for classification and reconstruction on the test split."""
    rows = []
    for name, op in table3_ops(run).items():
        altered = infer(op, run.feats)
        c = evaluate_classifier(run.shared.phi2, altered, run.test_y)
        r = evaluate_reconstruction(run.shared.psi, altered, run.test_x)
        p = PAPER_TABLE3.get(name.split(" ")[0], (None,) * 4)
        rows.append({"poisoning": name, "top1": c["top1"], "top5": c["top5"], "l1": r["l1"], "ssim": r["ssim"],
                     "ssim_inverted": r["ssim_inverted"], "paper top1": p[0], "paper top5": p[1],
                     "paper l1": p[2], "paper ssim": p[3]})
    md = write_table(pd.DataFrame(rows), run.out_dir, "table3", "Table 3: stationary perturbations vs the DPM",
                     f"Ours: {run.setting} GN adds Gaussian noise of one feature standard deviation, GF blurs each "
                     "feature map with a 5x5 Gaussian (σ = 1.5), MF with a 5x5 mean filter. Two readings of "
                     "the paper's X+DPM: `X+DPM` applies X before the DPM trained on unperturbed features; "
                     "`X+DPM (trained after X)` before a DPM trained with X in front, on X(φ1(x)) of S. The "
                     "paper's figures sit beside both. Paper: ResNet101 on ImageNet.")
    log.info("wrote %s", md)


def figure5(run: Run) -> None:
    """All six reconstructors of Sec. 4.2.2 on original and poisoned test features."""
    show = spread_rows(run.test_y, 6)
    rows, columns = [], {"raw": to_float(run.test_x[show])}
    for name in RECONSTRUCTORS:
        psi = shared_reconstructor(run.cfg, run.split, run.store, run.shared.phi1, name)
        r_o = evaluate_reconstruction(psi, run.feats, run.test_x)
        r_p = evaluate_reconstruction(psi, run.poisoned, run.test_x)
        rows.append({"reconstructor": name, "trained against": name == run.cfg.reconstructor.name,
                     "l1 original": r_o["l1"], "l1 poisoned": r_p["l1"], "ssim original": r_o["ssim"],
                     "ssim poisoned": r_p["ssim"], "ssim inverted poisoned": r_p["ssim_inverted"]})
        columns[f"{name} w/o"] = infer(psi, run.feats[show])
        columns[f"{name} w/"] = infer(psi, run.poisoned[show])
    md = write_table(pd.DataFrame(rows), run.out_dir, "figure5",
                     "Figure 5: the DPM against reconstructors it was not trained against",
                     f"Ours: {run.setting} Every ψ is trained with L1 on Q only; the DPM was trained against "
                     f"{run.cfg.reconstructor.name} alone.")
    image_grid(columns, run.out_dir / "figure5.png", run.class_names(show))
    log.info("wrote %s and figure5.png", md)


def figure6(run: Run) -> None:
    """ψ's reconstructions under every operation of Table 3 (the paper's Figure 6), both X+DPM readings."""
    show = spread_rows(run.test_y, 6)
    columns = {"raw": to_float(run.test_x[show])}
    for name, op in table3_ops(run).items():
        columns[name] = infer(run.shared.psi, infer(op, run.feats[show]))
    png = image_grid(columns, run.out_dir / "figure6.png", run.class_names(show))
    log.info("wrote %s", png)


@dataclass(frozen=True)
class Experiment:
    """One table or figure: the run it reads (made once per invocation by ``prepare``, shared by every
    experiment with the same ``prepare``) and the function that writes it from that run."""

    prepare: Callable[[Config], Any]
    write: Callable[[Any], None]


EXPERIMENTS: dict[str, Experiment] = {
    "table1": Experiment(prepare, table1), "table2": Experiment(prepare, table2),
    "figure4": Experiment(prepare, figure4), "table3": Experiment(prepare, table3),
    "figure5": Experiment(prepare, figure5), "figure6": Experiment(prepare, figure6),
    "table4": Experiment(prepare_faces, table4), "figure7": Experiment(prepare_faces, figure7),
}
DEFAULT_EXPERIMENTS = ("table1", "table2", "figure4")


def reproduce(cfg: Config, experiments: list[str], name: str | None = None, argv: list[str] | None = None
              ) -> dict[str, Any]:
    """Prepare each run the named experiments of :data:`EXPERIMENTS` need once, then run them on it;
    results go to ``results/reproduce/<name>/`` (default: the preset's name), ``argv`` (the command
    line) to its provenance."""
    t0 = time.time()
    out_dir = cfg.results_dir() / "reproduce" / (name or cfg.name)
    runs: dict[Callable[[Config], Any], Any] = {}
    for experiment in experiments:
        exp = EXPERIMENTS[experiment]
        if exp.prepare not in runs:
            runs[exp.prepare] = exp.prepare(cfg)
            runs[exp.prepare].out_dir = out_dir
            write_json(cfg.to_dict(), out_dir / "config.json")
        exp.write(runs[exp.prepare])
    figures: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    for run in runs.values():
        figures |= run.figures
        if isinstance(run, Run):  # Step 1's and the DPM's training curves; Table 4's modules keep none
            curves |= step1_curves(cfg, run.store) | {"DPM": run.entity.dpm_curve(cfg, run.shared, cfg.data.seed)}
    figures["seconds"] = time.time() - t0
    write_json(figures, out_dir / "figures.json")
    if curves:
        write_curves(curves, out_dir)
    write_provenance(out_dir, t0, command_line("python -m sim.reproduce", argv))
    log.info("done in %.0fs: %s", figures["seconds"],
             ", ".join(f"{k}={v:.4f}" for k, v in figures.items() if isinstance(v, float) and k != "seconds"))
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = command_parser("python -m sim.reproduce", __doc__)
    parser.add_argument("experiments", nargs="*", default=list(DEFAULT_EXPERIMENTS),
                        help=f"any of {', '.join(EXPERIMENTS)} (default: {' '.join(DEFAULT_EXPERIMENTS)})")
    add_config_args(parser)
    args = parser.parse_args(argv)
    unknown = set(args.experiments) - set(EXPERIMENTS)
    if unknown:
        parser.error(f"unknown experiment(s) {sorted(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    cfg = config_from_args(args)
    reproduce(cfg, args.experiments, run_name(args, cfg.name), argv)


if __name__ == "__main__":
    run_main(main)
