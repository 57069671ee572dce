"""``psi``: the shared reconstructor ψ, the one every DPM was trained to defeat (today's figure)."""

from __future__ import annotations

import torch

from entities.attacks.base import Family, Knowledge, Target
from entities.config import Config
from entities.train import infer


def _reconstruct(know: Knowledge, target: Target, name: str) -> torch.Tensor:
    return infer(know.shared.psi, target.features[target.rows])


def _attackers(cfg: Config) -> list[str]:
    return ["psi"]


FAMILY = Family("psi", "the shared ψ, which every DPM was trained against", _attackers, _reconstruct)
