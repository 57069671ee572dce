"""``raw``: the entities' own images, the no-privacy baseline (disclosure 1 by definition)."""

from __future__ import annotations

import numpy as np

from entities.config import Config
from entities.entity import Entity
from entities.pipeline import SharedModules
from entities.sharing.base import Contribution, ImageMode
from entities.train import to_float


class RawMode(ImageMode):
    name = "raw"

    def title(self, rounds: int) -> str:
        return "raw images"

    def explain(self, cfg: Config) -> str:
        return "raw images, which the receiver featurizes with φ1 (no privacy: the baseline)"

    def shared_text(self, sender: str, rounds: int) -> str:
        return f"S{sender[1:]}"

    def contribute(self, entity: Entity, shared: SharedModules, cfg: Config, seed: int) -> Contribution:
        rows = np.arange(len(entity.labels))
        return Contribution(self.name, to_float(entity.images), np.asarray(entity.labels), 1.0, 1.0, rows, rows)
