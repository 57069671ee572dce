"""``image``: attacker 0 of the image-sharing modes, the shared image itself.

MDP and AugMDP share images built to look like real images of the sender's shard, raw sharing the
images themselves; nothing needs to be learned to look at them. No image crosses in the feature modes.
"""

from __future__ import annotations

import torch

from entities.attacks.base import Family, Knowledge, Target
from entities.config import Config


def _reconstruct(know: Knowledge, target: Target, name: str) -> torch.Tensor | None:
    return None if target.images is None else target.images[target.rows]


def _attackers(cfg: Config) -> list[str]:
    return ["image"]


FAMILY = Family("image", "the shared image itself (image modes only)", _attackers, _reconstruct)
