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


class DpmMode(FeatureMode):
    name = "dpm"
    disclosure_by = "ψ only"

    def title(self, rounds: int) -> str:
        return "DPM pools"

    def explain(self, cfg: Config) -> str:
        return f"poisoned pools of private DPMs ({cfg.dpm.blocks} blocks, λ = {cfg.dpm.lam})"

    def shared_text(self, sender: str, rounds: int) -> str:
        k = sender[1:]
        return f"P{k}(φ1(S{k}))"

    def contribute(self, entity: Entity, shared: SharedModules, cfg: Config, seed: int) -> Contribution:
        """Train (or load) the entity's private DPM and poison its own φ1 features."""
        entity.train_dpm(shared, cfg, seed=seed)
        pool = entity.poisoned_pool()
        shown = disclosure(entity.pool_reconstruction(shared))
        rows = np.arange(len(pool))
        return Contribution(self.name, pool.features, pool.labels, shown, shown, rows, rows)

    def curves(self, entity: Entity, shared: SharedModules, cfg: Config, seed: int) -> dict[str, list[dict]]:
        return {f"DPM {entity.name}": entity.dpm_curve(cfg, shared, seed)}

    def key_settings(self, settings: dict) -> dict:
        return {"reconstructor": settings["reconstructor"], "dpm": settings["dpm"]}

    def metrics(self, entity: Entity, shared: SharedModules, test_features: torch.Tensor,
                test_labels: np.ndarray) -> dict[str, float]:
        """The decider on original vs poisoned test features and ψ on the pool (Entity.pool_metrics)."""
        return entity.pool_metrics(shared, test_features, test_labels)
