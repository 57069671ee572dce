"""``prior``: the floor, an attacker that ignores the features and draws the mean image of the label.

Labels travel with every pool, so any attacker can show, for each item, the mean of its own
shard's images of that class. That image discloses nothing about the victim's x beyond its
label, yet SSIM scores a smooth mean image well above zero against real photographs. Every
defence's disclosure is read against this row: a decoder that finds nothing in a pool converges
to it, so a worst case at the prior's figure means the pool told the attacker no more than the
label did, and no defence that shares labels can go below it.
"""

from __future__ import annotations

import numpy as np
import torch

from entities.attacks.base import Family, Knowledge, Target
from entities.config import Config
from entities.train import to_float


def _reconstruct(know: Knowledge, target: Target, name: str) -> torch.Tensor:
    own = know.own
    images = to_float(own.images)
    overall = images.mean(0)
    means = {int(c): images[own.labels == c].mean(0) for c in np.unique(own.labels)}
    labels = np.asarray(target.labels)[target.rows]
    return torch.stack([means.get(int(c), overall) for c in labels])


def _attackers(cfg: Config) -> list[str]:
    return ["prior"]


FAMILY = Family("prior", "no features at all: the mean image of the attacker's own shard for the item's label "
                "(the floor of the disclosure scale)", _attackers, _reconstruct)
