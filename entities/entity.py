"""One collaborating entity: its shard, its private DPM, the pool it shares and its refined decider.

The Flower ClientApp and the Table 5 grid both drive entities through this class, so the
collaboration means the same thing whichever runner executes it.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from entities.config import Config
from entities.dpm import DeepPoisoningModule, build_dpm
from entities.files import artefact_key, load_torch, module_digest, save_torch, write_json
from entities.metrics import disclosure
from entities.pipeline import ArtefactStore, SharedModules, history_path, read_history
from entities.pools import Pool
from entities.runtime import key_part
from entities.train import (
    augmented_views,
    evaluate_classifier,
    evaluate_reconstruction,
    extract_features,
    poison,
    train_decider,
    train_dpm,
)

log = logging.getLogger("poisonpool")


class Entity:
    """An organisation with a few sensitive images that may not leave it."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, store: ArtefactStore, view: str = "") -> None:
        self.name = name
        self.view = view  # "" for its own shard; an augmented copy's tag, for files derived from its images
        self.images = images
        self.labels = labels
        self.store = store
        self.features: torch.Tensor | None = None
        self.dpm: DeepPoisoningModule | None = None
        self._pool_scores: dict[str, float] | None = None

    def views(self, views: int, seed: int) -> list[Entity]:
        """Itself, then ``views`` − 1 augmented copies of its shard under its name (so each copy uses its
        stored DPM): the decider's ``views`` recipe, the same in Table 5, the frontier and Flower."""
        copies = augmented_views(self.images, views, seed)[1:]
        return [self, *(Entity(self.name, v, self.labels, self.store, f"view{k}-seed{seed}")
                        for k, v in enumerate(copies, start=1))]

    def featurize(self, shared: SharedModules) -> Pool:
        """φ1 of its own images, once: DPM training and refinement both reuse them."""
        if self.features is None:
            self.features = extract_features(shared.phi1, self.images)
        return Pool(self.features, self.labels)

    def dpm_path(self, cfg: Config, shared: SharedModules, seed: int, after: str = "") -> Path:
        """Keyed by everything the DPM depends on: its settings and seed, and the φ1, φ2 and ψ it was
        trained against (as received), so no run is served a DPM trained for another. ``after`` names
        a perturbation the DPM was trained behind (Table 3's second X+DPM reading)."""
        d = cfg.key_dict()
        key = artefact_key({"dpm": d["dpm"], "reconstructor": d["reconstructor"], "seed": seed,
                            "shared": module_digest(shared.phi1, shared.phi2, shared.psi),
                            **key_part(cfg.device, cfg.precision), **({"after": after} if after else {})})
        return self.store.private(self.name, f"dpm-after-{after}-{key}.pt" if after else f"dpm-{key}.pt")

    def train_dpm(self, shared: SharedModules, cfg: Config, seed: int) -> DeepPoisoningModule:
        """Step 2 on its own shard; the DPM is saved only under this entity's private store (0600)."""
        own = self.featurize(shared)
        torch.manual_seed(seed)
        dpm = build_dpm(cfg.dpm, tuple(own.features.shape[1:]), shared.phi2)
        path = self.dpm_path(cfg, shared, seed)
        if path.is_file():
            dpm.load_state_dict(load_torch(path, f"{self.name}'s DPM"))
        else:
            history = train_dpm(dpm, copy.deepcopy(shared.phi2), shared.psi, own.features, self.images, self.labels,
                                cfg.dpm, seed=seed, what=f"{self.name} dpm")
            save_torch(dpm.state_dict(), path, private=True)
            write_json(history, history_path(path), private=True)
        dpm.eval()
        self.dpm = dpm
        self._pool_scores = None
        return dpm

    def dpm_curve(self, cfg: Config, shared: SharedModules, seed: int) -> list[dict[str, float]]:
        """The training curve of its DPM for these settings (empty before it is trained)."""
        return read_history(self.dpm_path(cfg, shared, seed))

    def poisoned_pool(self) -> Pool:
        """P(φ1(S_k)) with labels: the only thing derived from its images that it shares."""
        if self.dpm is None or self.features is None:
            raise RuntimeError(f"{self.name}: train the DPM before sharing a pool")
        return Pool(poison(self.dpm, self.features), self.labels)

    def pool_reconstruction(self, shared: SharedModules) -> dict[str, float]:
        """ψ's scores (L1, SSIM, inverted SSIM, PSNR) on its own pool, computed once per DPM: the
        disclosure it reports when sharing and its pool metrics read the same figures."""
        if self._pool_scores is None:
            self._pool_scores = evaluate_reconstruction(shared.psi, self.poisoned_pool().features, self.images)
        return self._pool_scores

    def pool_metrics(self, shared: SharedModules, test_features: torch.Tensor, test_labels: np.ndarray
                     ) -> dict[str, float]:
        """Decider accuracy on original vs poisoned test features, ψ's SSIM on its own pool and, as the
        control that makes it mean something, ψ's disclosure on its own clean φ1 features."""
        orig = evaluate_classifier(shared.phi2, test_features, test_labels)
        pois = evaluate_classifier(nn.Sequential(self.dpm, shared.phi2), test_features, test_labels)
        recon = self.pool_reconstruction(shared)
        clean = evaluate_reconstruction(shared.psi, self.featurize(shared).features, self.images)
        return {
            "top1_original": orig["top1"],
            "top1_poisoned": pois["top1"],
            "ssim_pool": recon["ssim"],
            "ssim_pool_inverted": recon["ssim_inverted"],
            "l1_pool": recon["l1"],
            "ssim_clean": disclosure(clean),
        }

    def refine(self, shared: SharedModules, received: list[Pool], cfg: Config, test_features: torch.Tensor,
               test_labels: np.ndarray, seed: int) -> tuple[nn.Module, dict[str, float]]:
        """Step 3: refine φ2 on its own original features plus the pools it received."""
        data = Pool.union([self.featurize(shared), *received])
        phi2 = copy.deepcopy(shared.phi2)
        train_decider(phi2, data.features, data.labels, cfg.decider, seed=seed, what=f"{self.name} decider")
        return phi2, evaluate_classifier(phi2, test_features, test_labels)
