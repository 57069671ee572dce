"""The shared steps every command needs, each stored once under a key of the settings it used.

Step 1's parts (pretrain Φ, split it, train ψ on Q) are done by one party and reused by all commands
that agree on those settings (:func:`entities.sharing.step1` puts them together with what the sharing
mode publishes, since modes build on this module); φ1 features are cached too. A changed setting
changes the key, so a run is never served an artefact made with other settings. Private DPMs live
under ``private/<entity>``, a sibling of ``shared/``, never beside the shared modules.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from entities.backbone import Backbone, build_backbone
from entities.config import Config
from entities.data import ImageSet, TaskSplit, load_dataset, make_shards, task_public_split
from entities.files import ArtefactError, load_torch, make_dir, save_torch, write_json
from entities.reconstructors import Reconstructor, build_reconstructor
from entities.train import extract_features, pretrain, train_reconstructor

log = logging.getLogger("poisonpool")

ENTITY_NAMES = ("E1", "E2", "E3", "E4")


def entity_names(cfg: Config) -> list[str]:
    """E1..En, one per shard fraction."""
    return [f"E{i + 1}" for i in range(len(cfg.data.shard_fractions))]


def _cap(ds: ImageSet, max_train: int, max_test: int, seed: int) -> ImageSet:
    """A seeded random subset, so CPU-scale runs stay class-balanced in expectation."""
    rng = np.random.default_rng(seed)
    tr = np.arange(len(ds.train_labels))
    te = np.arange(len(ds.test_labels))
    if max_train and max_train < len(tr):
        tr = np.sort(rng.choice(tr, max_train, replace=False))
    if max_test and max_test < len(te):
        te = np.sort(rng.choice(te, max_test, replace=False))
    return ds.subset(tr, te)


def load_task(cfg: Config) -> TaskSplit:
    """S and Q for the configured data set, capped to the configured CPU-scale sizes."""
    d = cfg.data
    ds = load_dataset(d.dataset, d.data_root or None, d.allow_download)
    split = task_public_split(ds, d.task_classes, d.public_classes, d.public_holdout, d.seed + 2)
    split.S = _cap(split.S, d.max_task_train, d.max_test, d.seed)
    split.Q = _cap(split.Q, d.max_public_train, d.max_test, d.seed + 1)
    return split


def entity_shards(cfg: Config, split: TaskSplit) -> dict[str, np.ndarray]:
    """Disjoint row indices of S's train part for E1..En."""
    d = cfg.data
    shards = make_shards(split.S.train_labels, d.shard_fractions, d.seed, d.partition, d.alpha)
    return dict(zip(entity_names(cfg), shards))


class ArtefactStore:
    """Files of one setting of Step 1: ``<root>/artefacts/<key>/{shared,private/<entity>}``.

    ``root`` defaults to the settings' results folder; an entity of the Flower app passes the store
    its operator's policy names instead (:mod:`entities.policy`), so whoever submits a run never
    decides where an entity keeps its private files. ``private/`` and everything in it is 0700.
    """

    def __init__(self, cfg: Config, root: Path | None = None,
                 sections: tuple[str, ...] = ("data", "backbone", "pretrain"), prefix: str = "") -> None:
        self.key = cfg.digest(*sections)  # Table 4's faces add their own section, under their own prefix
        self.root = (root or cfg.results_dir()) / "artefacts" / f"{prefix}{self.key}"

    def shared(self, name: str) -> Path:
        path = self.root / "shared" / name
        make_dir(path.parent)
        return path

    def private(self, entity: str, name: str) -> Path:
        path = self.root / "private" / entity / name
        folder = self.root / "private"
        for part in (entity, *Path(name).parent.parts):
            make_dir(folder, private=True)
            folder = folder / part
        make_dir(folder, private=True)
        return path


def history_path(checkpoint: Path) -> Path:
    """Where the per-epoch figures of the training that made ``checkpoint`` are kept: beside it, so a
    run that loads the checkpoint can still plot the curve that produced it."""
    return checkpoint.with_suffix(".history.json")


def read_history(checkpoint: Path) -> list[dict[str, float]]:
    """The training curve stored with ``checkpoint``; empty for checkpoints older than these files."""
    path = history_path(checkpoint)
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtefactError(f"training history {path} is unreadable ({err}); delete it") from err


def pretrain_set(cfg: Config, split: TaskSplit) -> tuple[np.ndarray, np.ndarray]:
    """The images Φ is pretrained on: all of S, or one entity's shard (the collaboration)."""
    who = cfg.backbone.pretrain_on
    if who == "S":
        return split.S.train_images, split.S.train_labels
    shards = entity_shards(cfg, split)
    if who not in shards:
        raise ValueError(f"backbone.pretrain_on={who!r}: use 'S' or one of {', '.join(shards)}")
    idx = shards[who]
    return split.S.train_images[idx], split.S.train_labels[idx]


def pretrained_backbone(cfg: Config, split: TaskSplit, store: ArtefactStore) -> Backbone:
    """Step 1: Φ pretrained with cross-entropy, loaded from the store when it exists."""
    torch.manual_seed(cfg.data.seed)  # the initial weights too, so a rerun reproduces Φ
    model = build_backbone(cfg.backbone.name, len(split.S.classes), split.S.image_shape[0])
    model.split(cfg.backbone.hook)  # an unknown hook point fails before any training
    path = store.shared("backbone.pt")
    if path.is_file():
        model.load_state_dict(load_torch(path, "pretrained backbone"))
        model.eval()
        return model
    images, labels = pretrain_set(cfg, split)
    t0 = time.time()
    log.info("pretraining %s on %d images (%s)", cfg.backbone.name, len(labels), cfg.backbone.pretrain_on)
    partial = store.shared("backbone.partial.pt")  # same settings key: a killed run resumes from it
    history = pretrain(model, images, labels, cfg.pretrain, seed=cfg.data.seed, checkpoint=partial)
    log.info("pretraining done in %.0fs", time.time() - t0)
    save_torch(model.state_dict(), path)
    write_json(history, history_path(path))
    partial.unlink(missing_ok=True)  # absent when pretrain.epochs = 0
    return model


def cached_features(store: ArtefactStore, tag: str, phi1: nn.Module, images: np.ndarray) -> torch.Tensor:
    """φ1(images), computed once and kept in the store under ``tag``."""
    path = store.shared(f"features-{tag}.pt")
    if path.is_file():
        feats = load_torch(path, "cached features")
        if len(feats) == len(images):
            return feats
    feats = extract_features(phi1, images)
    save_torch(feats, path)
    return feats


def shared_reconstructor(
    cfg: Config, split: TaskSplit, store: ArtefactStore, phi1: nn.Module, name: str | None = None
) -> Reconstructor:
    """ψ (by default the one DPMs defend against) trained with L1 on Q only."""
    name = name or cfg.reconstructor.name
    q_feats = cached_features(store, "Q-train", phi1, split.Q.train_images)
    torch.manual_seed(cfg.data.seed)
    psi = build_reconstructor(name, tuple(q_feats.shape[1:]), split.Q.image_shape)
    path = reconstructor_path(cfg, store, name)
    if path.is_file():
        psi.load_state_dict(load_torch(path, "reconstructor"))
        psi.eval()
        return psi
    t0 = time.time()
    log.info("training reconstructor %s on %d public images", name, len(q_feats))
    history = train_reconstructor(psi, q_feats, split.Q.train_images, cfg.reconstructor, seed=cfg.data.seed)
    log.info("reconstructor %s done in %.0fs", name, time.time() - t0)
    save_torch(psi.state_dict(), path)
    write_json(history, history_path(path))
    return psi


def reconstructor_path(cfg: Config, store: ArtefactStore, name: str) -> Path:
    return store.shared(f"psi-{name}-{cfg.digest('reconstructor')}.pt")


@dataclass
class SharedModules:
    """What Step 1 hands every entity: φ1, φ2 and ψ (fixed), and the full Φ they came from, plus
    ``obfuscator``, the one DeepObfuscator every entity applies in the ``obfuscator`` sharing mode
    (None in every other mode)."""

    backbone: Backbone
    phi1: nn.Sequential
    phi2: nn.Sequential
    psi: Reconstructor
    obfuscator: nn.Module | None = None


def step1_curves(cfg: Config, store: ArtefactStore) -> dict[str, list[dict[str, float]]]:
    """The training curves of Step 1's Φ and ψ, by name (empty where an older run kept none)."""
    return {f"Φ pretrain ({cfg.backbone.name})": read_history(store.shared("backbone.pt")),
            f"ψ ({cfg.reconstructor.name})": read_history(reconstructor_path(cfg, store, cfg.reconstructor.name))}
