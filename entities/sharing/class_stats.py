"""``class-stats``: a label-only floor, per-class feature statistics from which the receiver draws.

The sender computes, per class of its shard, the mean and the per-dimension standard deviation of its
φ1 features (a diagonal covariance: a full one over C·H·W dimensions would outnumber the items), and
the receiver draws one virtual feature per item from N(mean, diag(std²)) of its class, clamped at 0
where φ1 ends in a ReLU, as CCVR calibrates classifiers on virtual features (Luo et al., NeurIPS 2021).

On the wire each item is its class's (mean, std) pair, shape (2, C, H, W): every item of a class
carries the same pair, so the records, the union of pools and the hostile-input checks stay item-aligned
and the counts travel as the labels do. The content is K pairs and K counts; nothing per item crosses
beyond its label. The draws are seeded from the pool's labels, so a receiver's virtual features, and a
row trained on them, are the same every run.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from entities.config import Config
from entities.entity import Entity
from entities.metrics import disclosure
from entities.pipeline import SharedModules
from entities.pools import Pool, PoolError, PoolSpec, validate_features
from entities.sharing.base import Contribution, FeatureMode
from entities.sharing.prototypes import check_per_class
from entities.train import evaluate_reconstruction


def virtual_features(pool: Pool) -> torch.Tensor:
    """One draw per item from its class's diagonal Gaussian, clamped at 0 where every mean is non-negative."""
    mean, std = pool.data[:, 0], pool.data[:, 1]
    seed = zlib.crc32(np.ascontiguousarray(np.asarray(pool.labels, dtype=np.int64)).tobytes())
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
    draws = mean + std * noise
    return draws.clamp_min(0) if bool((mean >= 0).all()) else draws


class ClassStatsMode(FeatureMode):
    name = "class-stats"
    disclosure_by = "ψ only"

    def title(self, rounds: int) -> str:
        return "class statistics (label-only floor)"

    def explain(self, cfg: Config) -> str:
        return ("per-class mean and diagonal standard deviation of φ1 features, from which the receiver draws one "
                "virtual feature per item (a label-only floor)")

    def shared_text(self, sender: str, rounds: int) -> str:
        return f"N(φ1(S{sender[1:]}))"

    def received_text(self, sender: str, rounds: int) -> str:
        return f"draws of {self.shared_text(sender, rounds)}"

    def contribute(self, entity: Entity, shared: SharedModules, cfg: Config, seed: int) -> Contribution:
        own = entity.featurize(shared)
        y = torch.as_tensor(np.asarray(own.labels))
        stats = {}
        for c in torch.unique(y):
            f = own.features[y == c]
            stats[int(c)] = torch.stack([f.mean(0), f.std(0, unbiased=len(f) > 1)])
        data = torch.stack([stats[int(c)] for c in own.labels])
        sent = Pool(data, np.asarray(own.labels))
        shown = disclosure(evaluate_reconstruction(shared.psi, virtual_features(sent), entity.images))
        rows = np.arange(len(own))
        return Contribution(self.name, data, sent.labels, shown, shown, rows, rows)

    def validate(self, name: str, pool: Pool, spec: PoolSpec) -> None:
        """Pairs of φ1-shaped (mean, std) within the feature bound, a non-negative std, and every item of a
        class carrying the same pair (else the pool would smuggle per-item content under a class label)."""
        if pool.data.ndim != 5 or pool.data.shape[1] != 2:
            raise PoolError(f"pool {name}: class statistics of shape {tuple(pool.data.shape[1:])}, expected "
                            f"(2, {', '.join(map(str, spec.feature_shape))}) (mean, std) per item")
        validate_features(name, Pool(pool.data[:, 0], pool.labels), spec)
        validate_features(name, Pool(pool.data[:, 1], pool.labels), spec)
        if float(pool.data[:, 1].min()) < 0:
            raise PoolError(f"pool {name}: negative standard deviations")
        check_per_class(name, pool.data, pool.labels, "statistics")

    def training_pool(self, pool: Pool, phi1: torch.nn.Module) -> Pool:
        return Pool(virtual_features(pool), np.asarray(pool.labels))
