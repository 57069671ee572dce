"""Deep Poisoning's Table 4 and Figure 7: a shared DeepObfuscator against private DPMs, on CelebA faces.

    python -m sim.reproduce table4 figure7 --config table4

Sec. 4.2.4: the first 20 CelebA attributes are the utility task, the last 20 the private attributes,
on a VGG split where DeepObfuscator splits it. CelebA-10k's 8,000 train faces are cut into a public
set Q and the shards of E1 (the victim: every column is scored on its held-out faces) and E2 (a
collaborator that attacks). Φ is pretrained on the utility attributes of all three, ψ on Q's clean
features; the obfuscator (:mod:`entities.obfuscator`) is trained by its designer on all three and
then shared; each entity trains its own DPM on its shard, against ψ, multi-label.

Columns, each beside the paper's figure, each naming its attacker:
utility mAP (the task decider on the protected test features), privacy mAP (a classifier of φ2's
architecture trained afresh on E1's protected train features with their true private attributes:
an attacker with labels), privacy reconstruction (the defence's own adversarial reconstructor:
ψ for the DPM, the obfuscator's adversary for DeepObfuscator), and image-sharing reconstruction (E2
trains a decoder on (protected φ1 feature, image) pairs of its own faces: through the shared
obfuscator, which reverses it; through its own DPM for the DPM row, since E1's DPM is private).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from entities.attacks.decoder import build_decoder, train_decoder
from entities.backbone import build_backbone
from entities.config import Config, TrainConfig
from entities.data import AttributeSplit, load_celeba, split_attributes
from entities.entity import Entity
from entities.files import artefact_key, load_torch, module_digest, save_torch
from entities.metrics import mean_average_precision, reconstruction_scores
from entities.obfuscator import DeepObfuscator, Obfuscator, ObfuscatorSettings, train_obfuscator
from entities.pipeline import ArtefactStore, SharedModules
from entities.reconstructors import build_reconstructor
from entities.report import image_grid, write_table
from entities.runtime import key_part
from entities.train import (
    evaluate_reconstruction,
    extract_features,
    infer,
    pretrain,
    to_float,
    train_decider,
    train_reconstructor,
)

log = logging.getLogger("poisonpool")

PARTS = ("Q", "E1", "E2", "test")
ROWS = ("w/o protection", "DeepObfuscator", "DPM")
# Table 4 (VGG on CelebA): utility mAP, privacy mAP, privacy reconstruction L1, SSIM, image-sharing L1, SSIM.
PAPER_TABLE4: dict[str, tuple[float | str, ...]] = {
    "w/o protection": (81.08, 80.54, 0.0200, 0.9177, 0.0200, 0.9177),
    "DeepObfuscator": (73.71, 65.07, 0.2614, 0.3997, 0.0359, 0.8232),
    "DPM": (79.53, 65.95, 0.2573, 0.0064, "Denied", "Denied"),
}


@dataclass
class FaceTask:
    """CelebA-10k faces of each part (``Q``, ``E1``, ``E2``, ``test``) with their attributes split 20/20."""

    images: dict[str, np.ndarray]
    attributes: dict[str, AttributeSplit]

    def size(self, part: str) -> int:
        return len(self.images[part])


def load_faces(cfg: Config) -> FaceTask:
    """The seeded cut of CelebA-10k's train split into Q, E1 and E2, and E1's held-out test faces."""
    t = cfg.table4
    ds = load_celeba(cfg.data.data_root or None, t.image_size, cfg.data.seed)
    need = t.public_images + 2 * t.entity_images
    if need > len(ds.train_images):
        raise ValueError(f"table4.public_images + 2 x table4.entity_images = {need} faces, but CelebA-10k's "
                         f"train split has {len(ds.train_images)}")
    rng = np.random.default_rng(cfg.data.seed)
    perm = rng.permutation(len(ds.train_images))
    bounds = np.cumsum([0, t.public_images, t.entity_images, t.entity_images])
    rows = {p: np.sort(perm[a:b]) for p, a, b in zip(PARTS, bounds[:-1], bounds[1:])}
    test = np.arange(len(ds.test_images))
    if t.test_images and t.test_images < len(test):
        test = np.sort(rng.choice(test, t.test_images, replace=False))
    images = {p: ds.train_images[r] for p, r in rows.items()} | {"test": ds.test_images[test]}
    attrs = {p: ds.train_attributes[r] for p, r in rows.items()} | {"test": ds.test_attributes[test]}
    return FaceTask(images, {p: split_attributes(a, ds.attribute_names, t.utility_attributes)
                             for p, a in attrs.items()})


@dataclass
class FacesRun:
    """What Table 4 and Figure 7 read: the faces, Step 1 on them, the shared DeepObfuscator, the DPMs of
    E1 and E2 and every part's φ1 features. ``figures`` collects what Table 4 measured."""

    cfg: Config
    task: FaceTask
    store: ArtefactStore
    shared: SharedModules
    deep: DeepObfuscator
    dpms: dict[str, nn.Module]
    feats: dict[str, torch.Tensor]
    setting: str
    out_dir: Path
    figures: dict[str, Any] = field(default_factory=dict)

    def key(self, *sections: str, **extra: Any) -> str:
        """The key of an artefact made from these settings sections and the shared modules (φ1, φ2, ψ, O)."""
        d = self.cfg.to_dict()
        return artefact_key({**{s: d[s] for s in sections}, "seed": self.cfg.data.seed, **extra,
                             "shared": module_digest(self.shared.phi1, self.shared.phi2, self.shared.psi,
                                                     self.deep.obfuscator),
                             **key_part(self.cfg.device, self.cfg.precision)})

    def protection(self, row: str, entity: str = "E1") -> nn.Module:
        """The operation on φ1 features that ``entity`` applies before sharing, in Table 4's row ``row``."""
        return {"w/o protection": nn.Identity(), "DeepObfuscator": self.deep.obfuscator,
                "DPM": self.dpms[entity]}[row]

    def protected(self, row: str, part: str, entity: str = "E1") -> torch.Tensor:
        return infer(self.protection(row, entity), self.feats[part])


def _cached_module(module: nn.Module, path: Path, what: str, train, private: bool = False) -> nn.Module:
    """``module`` loaded from ``path``, or trained by ``train(module)`` and saved there (whole or absent)."""
    if path.is_file():
        module.load_state_dict(load_torch(path, what))
    else:
        train(module)
        save_torch(module.state_dict(), path, private=private)
    return module.eval()


def _backbone(cfg: Config, task: FaceTask, store: ArtefactStore) -> nn.Module:
    """Φ pretrained multi-label (BCE) on the utility attributes of Q, S1 and S2; resumable."""
    torch.manual_seed(cfg.data.seed)
    k = task.attributes["Q"].utility.shape[1]
    model = build_backbone(cfg.backbone.name, k, 3)
    model.split(cfg.backbone.hook)  # an unknown hook point fails before any training
    images = np.concatenate([task.images[p] for p in PARTS[:3]])
    labels = np.concatenate([task.attributes[p].utility for p in PARTS[:3]])
    partial = store.shared("backbone.partial.pt")

    def train(m: nn.Module) -> None:
        log.info("table4: pretraining %s on %d faces (%d utility attributes)", cfg.backbone.name, len(images), k)
        pretrain(m, images, labels, cfg.pretrain, seed=cfg.data.seed, checkpoint=partial)
        partial.unlink(missing_ok=True)

    return _cached_module(model, store.shared("backbone.pt"), "Table 4's pretrained backbone", train)


def prepare_faces(cfg: Config) -> FacesRun:
    """Step 1 on the faces, the shared DeepObfuscator and the DPMs of E1 and E2, each trained once and stored."""
    task = load_faces(cfg)
    store = ArtefactStore(cfg, sections=("data", "backbone", "pretrain", "table4"), prefix="table4-")
    log.info("table4: CelebA-10k at %d px, Q %d, S1 %d, S2 %d, test %d faces", cfg.table4.image_size,
             task.size("Q"), task.size("E1"), task.size("E2"), task.size("test"))
    backbone = _backbone(cfg, task, store)
    phi1, phi2 = backbone.split(cfg.backbone.hook)
    feats = {p: extract_features(phi1, task.images[p]) for p in PARTS}
    shape = tuple(feats["Q"].shape[1:])
    image_shape = task.images["Q"].shape[1:]
    seed = cfg.data.seed

    torch.manual_seed(seed)
    psi = _cached_module(
        build_reconstructor(cfg.reconstructor.name, shape, image_shape),
        store.shared(f"psi-{cfg.reconstructor.name}-{cfg.digest('reconstructor')}.pt"), "Table 4's ψ",
        lambda m: train_reconstructor(m, feats["Q"], task.images["Q"], cfg.reconstructor, seed=seed))
    shared = SharedModules(backbone, phi1, phi2, psi)

    deep = _deep_obfuscator(cfg, task, store, shared, feats, shape, image_shape)
    dpms = {}
    for k, name in enumerate(("E1", "E2")):
        entity = Entity(name, task.images[name], task.attributes[name].utility, store)
        entity.features = feats[name]
        dpms[name] = entity.train_dpm(shared, cfg, seed=seed + k)
    t = cfg.table4
    setting = (f"CelebA-10k (Liu et al., 2015; 10,000 aligned faces, the first 20,000 rows' attributes) centre-"
               f"cropped and resized to {t.image_size}x{t.image_size} px; utility = the first "
               f"{t.utility_attributes} attributes, private = the other {40 - t.utility_attributes}; |Q| = "
               f"{task.size('Q')}, |S1| = |S2| = {task.size('E1')}, {task.size('test')} test faces of E1. "
               f"{cfg.backbone.name} split at {cfg.backbone.hook} (feature maps {shape[0]}x{shape[1]}x{shape[2]}), "
               f"pretrained with BCE on the utility attributes for {cfg.pretrain.epochs} epochs; ψ = "
               f"{cfg.reconstructor.name} on Q; obfuscator of {t.obfuscator_blocks} residual blocks "
               f"({t.obfuscator_init} start), "
               f"α = {t.privacy_weight}, β = {t.reconstruction_weight}, {t.obfuscator_epochs} epochs; DPMs of "
               f"{cfg.dpm.blocks} blocks, λ = {cfg.dpm.lam}, {cfg.dpm.epochs} epochs.")
    return FacesRun(cfg, task, store, shared, deep, dpms, feats, setting, cfg.results_dir() / "reproduce" / cfg.name)


def _deep_obfuscator(cfg: Config, task: FaceTask, store: ArtefactStore, shared: SharedModules,
                     feats: dict[str, torch.Tensor], shape: tuple[int, ...], image_shape) -> DeepObfuscator:
    """The designer's obfuscator, trained on Q, S1 and S2 against its two adversaries, stored as one file."""
    t, seed = cfg.table4, cfg.data.seed
    k_priv = task.attributes["Q"].private.shape[1]
    torch.manual_seed(seed)
    deep = DeepObfuscator(
        Obfuscator(shape[0], t.obfuscator_blocks, t.obfuscator_init), copy.deepcopy(shared.phi2),
        build_backbone(cfg.backbone.name, k_priv, 3).split(cfg.backbone.hook)[1],
        build_reconstructor(cfg.reconstructor.name, shape, image_shape))
    key = artefact_key({"table4": cfg.to_dict()["table4"], "reconstructor": cfg.to_dict()["reconstructor"],
                        "seed": seed, "shared": module_digest(shared.phi1, shared.phi2),
                        **key_part(cfg.device, cfg.precision)})
    path = store.shared(f"deep-obfuscator-{key}.pt")
    if path.is_file():
        state = load_torch(path, "the shared DeepObfuscator")
        for name, m in deep.modules().items():
            m.load_state_dict(state[name])
            m.eval()
        return deep
    parts = PARTS[:3]
    train_obfuscator(deep, torch.cat([feats[p] for p in parts]), np.concatenate([task.images[p] for p in parts]),
                     np.concatenate([task.attributes[p].utility for p in parts]),
                     np.concatenate([task.attributes[p].private for p in parts]),
                     ObfuscatorSettings(t.obfuscator_epochs, cfg.dpm.batch_size, t.obfuscator_lr, t.privacy_weight,
                                        t.reconstruction_weight), seed=seed)
    save_torch({name: m.state_dict() for name, m in deep.modules().items()}, path)
    return deep


def privacy_classifier(run: FacesRun, row: str) -> nn.Module:
    """The privacy attacker of Table 4: φ2's architecture, fresh, trained with BCE on E1's protected train
    features and their true private attributes (it has labels, so it is an upper bound on such attackers)."""
    cfg = run.cfg
    d = cfg.decider
    settings = TrainConfig(cfg.table4.attacker_epochs, d.batch_size, d.lr, d.weight_decay, augment=False)
    torch.manual_seed(cfg.data.seed)
    k = run.task.attributes["E1"].private.shape[1]
    model = build_backbone(cfg.backbone.name, k, 3).split(cfg.backbone.hook)[1]
    path = run.store.private("attacker", f"privacy-{row.replace(' ', '-').replace('/', '')}-"
                                         f"{run.key('dpm', 'decider', 'table4', row=row)}.pt")
    return _cached_module(model, path, f"Table 4's privacy classifier ({row})", lambda m: train_decider(
        m, run.protected(row, "E1"), run.task.attributes["E1"].private, settings, seed=cfg.data.seed,
        what=f"privacy classifier ({row})"), private=True)


def sharing_decoder(run: FacesRun, row: str) -> nn.Module:
    """E2's decoder trained on its own faces' (protection(φ1(x)), x) pairs: the shared obfuscator's for
    DeepObfuscator, E2's own DPM for the DPM row (E1's is private), φ1 alone without protection."""
    cfg = run.cfg
    pairs = run.protected(row, "E2", entity="E2")
    model = build_decoder(tuple(pairs.shape[1:]), run.task.images["E2"].shape[1:])
    path = run.store.private("E2", f"decoder-{row.replace(' ', '-').replace('/', '')}-"
                                   f"{run.key('dpm', 'attack', 'table4', row=row)}.pt")
    return _cached_module(model, path, f"E2's decoder ({row})", lambda m: train_decoder(
        m, pairs, run.task.images["E2"], cfg.attack, cfg.attack.seed, f"E2 decoder ({row})",
        epochs=cfg.table4.attacker_epochs), private=True)


def task_decider(run: FacesRun, row: str) -> nn.Module:
    """The utility classifier each row's features are scored by: the obfuscator's jointly trained one, else φ2."""
    return run.deep.classifier if row == "DeepObfuscator" else run.shared.phi2


def adversarial_reconstructor(run: FacesRun, row: str) -> nn.Module:
    """The reconstructor the defence was trained against: the obfuscator's adversary, else ψ."""
    return run.deep.reconstructor if row == "DeepObfuscator" else run.shared.psi


def table4(run: FacesRun) -> None:
    """Table 4: each row's six figures beside the paper's, with the attacker of every privacy column."""
    test = run.task.attributes["test"]
    x = run.task.images["test"]
    records = []
    for row in ROWS:
        feats = run.protected(row, "test")
        utility = mean_average_precision(infer(task_decider(run, row), feats), torch.as_tensor(test.utility))
        privacy = mean_average_precision(infer(privacy_classifier(run, row), feats), torch.as_tensor(test.private))
        adv = evaluate_reconstruction(adversarial_reconstructor(run, row), feats, x)
        share = evaluate_reconstruction(sharing_decoder(run, row), feats, x)
        paper = PAPER_TABLE4[row]
        records.append({
            "protection": row, "utility mAP": utility, "paper utility mAP": paper[0],
            "privacy mAP": privacy, "paper privacy mAP": paper[1],
            "privacy recon L1": adv["l1"], "paper privacy recon L1": paper[2],
            "privacy recon SSIM": adv["ssim"], "paper privacy recon SSIM": paper[3],
            "privacy recon SSIM inverted": adv["ssim_inverted"],
            "sharing recon L1": share["l1"], "paper sharing recon L1": paper[4],
            "sharing recon SSIM": share["ssim"], "paper sharing recon SSIM": paper[5],
            "sharing recon SSIM inverted": share["ssim_inverted"],
        })
    df = pd.DataFrame(records)
    run.figures["table4"] = records
    mean_face = to_float(run.task.images["E2"]).mean(0, keepdim=True)
    blind = {k: float(v.mean()) for k, v in reconstruction_scores(mean_face.expand(len(x), -1, -1, -1),
                                                                   to_float(x)).items()}
    run.figures["table4_mean_face"] = blind
    # a random ranking's AP is the attribute's base rate: the floor every mAP is read against
    chance = {k: 100.0 * float(m.mean(0)[m.any(0)].mean()) for k, m in (("utility", test.utility),
                                                                      ("private", test.private))}
    run.figures["table4_chance_map"] = chance
    notes = (
        f"Ours: {run.setting}\n\n"
        f"A random ranking scores mAP {chance['utility']:.2f} on the utility and {chance['private']:.2f} on the "
        "private attributes of these faces (the mean base rate): read every mAP against that floor. "
        "Attackers. Utility mAP: the task decider on E1's protected test features (φ2, frozen for the DPM; the "
        "classifier trained jointly with the obfuscator for DeepObfuscator). Privacy mAP: a classifier of φ2's "
        f"architecture trained afresh for {run.cfg.table4.attacker_epochs} epochs with BCE on E1's protected "
        "train features and their true private attributes (an attacker with labels, the strongest of this kind). "
        "Privacy reconstruction: the defence's own adversarial reconstructor (ψ for the DPM, the obfuscator's "
        "adversary for DeepObfuscator, ψ for no protection). Image-sharing reconstruction: E2, a collaborator, "
        "trains a decoder (the attack suite's residual U-Net, L1 + (1 − SSIM)) on its own faces' pairs: "
        "(φ1(x), x) without protection, (O(φ1(x)), x) through the shared obfuscator for DeepObfuscator, and "
        "(P2(φ1(x)), x) through its own DPM for the DPM row, then decodes E1's protected test features. The "
        "paper writes 'Denied' for the DPM there (E1's DPM is private, so nobody has its pairs); our cell is "
        "this transfer attacker, a lower bound on what a stronger attack (the attack suite's dpm-agnostic, "
        "substitute or optimize families) could reach. For scale, a 'decoder' that knows nothing and answers "
        f"E2's mean face for every input scores L1 {blind['l1']:.4f}, SSIM {blind['ssim']:.4f}. "
        "SSIM inverted = SSIM(1 − recon, x), which exposes a "
        "photographic-negative reconstruction. mAPs in %, images in [0, 1], SSIM with an 11-pixel Gaussian "
        "window. Paper: VGG on full CelebA (Deep Poisoning Table 4).")
    md = write_table(df, run.out_dir, "table4", "Table 4: DeepObfuscator vs the DPM on CelebA attributes", notes)
    log.info("wrote %s", md)


def figure7(run: FacesRun) -> None:
    """Figure 7 (and the DPM beside it): original, unprotected reconstruction, each defence against its own
    adversary, and each defence under E2's decoder (reversing the shared obfuscator; E2's own DPM pairs)."""
    show = np.arange(min(6, run.task.size("test")))
    feats = run.feats["test"][show]
    obf, dpm = infer(run.deep.obfuscator, feats), infer(run.dpms["E1"], feats)
    columns = {
        "(a) original": to_float(run.task.images["test"][show]),
        "(b) ψ, unprotected": infer(run.shared.psi, feats),
        "(c) DeepObf., adversary": infer(run.deep.reconstructor, obf),
        "(d) DeepObf., reversed": infer(sharing_decoder(run, "DeepObfuscator"), obf),
        "DPM, ψ": infer(run.shared.psi, dpm),
        "DPM, E2's decoder": infer(sharing_decoder(run, "DPM"), dpm),
    }
    png = image_grid(columns, run.out_dir / "figure7.png")
    log.info("wrote %s", png)
