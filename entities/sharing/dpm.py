"""``dpm``: Deep Poisoning's mode, poisoned features P_k(φ1(S_k)) from the entity's private DPM.

The disclosure a sender reports is ψ's: the larger of SSIM(ψ(pool), x) and SSIM(1 − ψ(pool), x), so
that an inverted reconstruction does not pass for a hidden one. No image crosses in this mode.
"""

from __future__ import annotations

import numpy as np
import torch

from entities.config import Config
from entities.entity import Entity
from entities.metrics import disclosure
from entities.pipeline import SharedModules
from entities.sharing.base import Contribution, FeatureMode
from entities.train import evaluate_reconstruction


def k_anonymous(features: torch.Tensor, labels: np.ndarray, k: int, seed: int) -> torch.Tensor:
    """Each item replaced by the mean of itself and k − 1 other items of its class (drawn with ``seed``; all of
    the class when it has fewer than k), so no shared item is one image's: what it shows of its own image is
    blended with k − 1 others, as k-anonymity asks of a released record."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    out = torch.empty_like(features)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        for i in rows:
            others = rng.choice(rows[rows != i], min(k - 1, len(rows) - 1), replace=False)
            out[i] = features[np.concatenate([[i], others])].mean(0)
    return out


class DpmMode(FeatureMode):
    name = "dpm"
    disclosure_by = "ψ only"

    def title(self, rounds: int) -> str:
        return "DPM pools"

    def explain(self, cfg: Config) -> str:
        k = f", each item the mean of {cfg.dpm.anonymity} of its class" if cfg.dpm.anonymity > 1 else ""
        return f"poisoned pools of private DPMs ({cfg.dpm.blocks} blocks, λ = {cfg.dpm.lam}{k})"

    def shared_text(self, sender: str, rounds: int) -> str:
        k = sender[1:]
        return f"P{k}(φ1(S{k}))"

    def contribute(self, entity: Entity, shared: SharedModules, cfg: Config, seed: int) -> Contribution:
        """Train (or load) the entity's private DPM and poison its own φ1 features (k-anonymous with
        ``dpm.anonymity`` = k > 1)."""
        entity.train_dpm(shared, cfg, seed=seed)
        pool = entity.poisoned_pool()
        rows = np.arange(len(pool))
        if cfg.dpm.anonymity > 1:
            features = k_anonymous(pool.features, pool.labels, cfg.dpm.anonymity, seed)
            shown = disclosure(evaluate_reconstruction(shared.psi, features, entity.images))
            return Contribution(self.name, features, pool.labels, shown, shown, rows, rows)
        shown = disclosure(entity.pool_reconstruction(shared))
        return Contribution(self.name, pool.features, pool.labels, shown, shown, rows, rows)

    def curves(self, entity: Entity, shared: SharedModules, cfg: Config, seed: int) -> dict[str, list[dict]]:
        return {f"DPM {entity.name}": entity.dpm_curve(cfg, shared, seed)}

    def key_settings(self, settings: dict) -> dict:
        return {"reconstructor": settings["reconstructor"], "dpm": settings["dpm"]}

    def metrics(self, entity: Entity, shared: SharedModules, test_features: torch.Tensor,
                test_labels: np.ndarray) -> dict[str, float]:
        """The decider on original vs poisoned test features and ψ on the pool (Entity.pool_metrics)."""
        return entity.pool_metrics(shared, test_features, test_labels)
