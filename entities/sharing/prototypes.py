"""``prototypes``: a label-only floor, each shared item its class's mean φ1 feature over the sender's shard.

What crosses per item is its label and nothing else: the feature an item carries is the same for every
item of its class (FedProto's class prototypes, Tan et al., AAAI 2022), so a receiver or an attacker
learns from it what the labels and the sender's per-class averages say, never what one image shows.
The mode is the utility floor a privacy defence has to beat: a pool worth its disclosure teaches a
receiver more than this (Table 5's row 7 in this mode against the defence's row 7).

The sender reports ψ's disclosure on the prototypes, scored against each item's real image.
"""

from __future__ import annotations

import numpy as np
import torch

from entities.config import Config
from entities.entity import Entity
from entities.metrics import disclosure
from entities.pipeline import SharedModules
from entities.pools import Pool, PoolError, PoolSpec, validate_features
from entities.sharing.base import Contribution, FeatureMode
from entities.train import evaluate_reconstruction


def class_means(features: torch.Tensor, labels: np.ndarray) -> dict[int, torch.Tensor]:
    """Each class's mean feature over the items that carry it (only the classes present)."""
    y = torch.as_tensor(np.asarray(labels))
    return {int(c): features[y == c].mean(0) for c in torch.unique(y)}


def check_per_class(name: str, data: torch.Tensor, labels: np.ndarray, what: str) -> None:
    """Every item of a class carries the same ``data``: else a label-only pool would carry per-item content."""
    labels = np.asarray(labels)
    for c in np.unique(labels):
        rows = data[torch.as_tensor(labels == c)]
        if not torch.equal(rows, rows[:1].expand_as(rows)):
            raise PoolError(f"pool {name}: items of class {int(c)} carry different {what}; this mode shares one "
                            f"per class")


class PrototypesMode(FeatureMode):
    name = "prototypes"
    disclosure_by = "ψ only"

    def title(self, rounds: int) -> str:
        return "class prototypes (label-only floor)"

    def explain(self, cfg: Config) -> str:
        return "each item as its class's mean φ1 feature over the sender's shard (a label-only floor)"

    def shared_text(self, sender: str, rounds: int) -> str:
        return f"μ(φ1(S{sender[1:]}))"

    def contribute(self, entity: Entity, shared: SharedModules, cfg: Config, seed: int) -> Contribution:
        own = entity.featurize(shared)
        means = class_means(own.features, own.labels)
        data = torch.stack([means[int(c)] for c in own.labels])
        shown = disclosure(evaluate_reconstruction(shared.psi, data, entity.images))
        rows = np.arange(len(own))
        return Contribution(self.name, data, np.asarray(own.labels), shown, shown, rows, rows)

    def validate(self, name: str, pool: Pool, spec: PoolSpec) -> None:
        validate_features(name, pool, spec)
        check_per_class(name, pool.data, pool.labels, "prototypes")
