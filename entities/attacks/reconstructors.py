"""``reconstructors``: the six reconstructors of Sec. 4.2.2 (the paper's Figure 5), trained by the attacker.

Each is trained as ψ was, with L1 on clean φ1(Q) pairs (at most ``attack.max_pairs`` of them) and the
``reconstructor`` settings, but with the attacker's own seed: its ``px2s2`` is ψ's architecture with
other weights, which shows whether a DPM defeats the architecture it was trained against or only ψ's
weights. An architecture that
cannot upscale φ1's maps to the image (``rx4s4`` from 16 to 32 pixels) does not apply.
"""

from __future__ import annotations

import torch
from torch import nn

from entities.attacks.base import Family, Knowledge, Model, Target
from entities.attacks.decoder import capped
from entities.config import Config
from entities.reconstructors import RECONSTRUCTORS, build_reconstructor
from entities.train import infer, train_reconstructor


def fits(name: str, feature_shape: tuple[int, ...], image_shape: tuple[int, ...]) -> bool:
    try:
        build_reconstructor(name, feature_shape, image_shape)
    except ValueError:
        return False
    return True


def reconstructor(know: Knowledge, arch: str) -> nn.Module | None:
    """The attacker's ``arch`` trained on clean public pairs; None where it cannot reach the image size."""
    if not fits(arch, know.feature_shape, know.image_shape):
        return None
    rows = capped(len(know.public_features), know.cfg.attack.max_pairs, know.seed)
    return know.trained(
        f"reconstructor-{arch}", lambda: build_reconstructor(arch, know.feature_shape, know.image_shape),
        lambda m: train_reconstructor(m, know.public_features[rows], know.public_images[rows],
                                      know.cfg.reconstructor, seed=know.seed), clean=True)


def _reconstruct(know: Knowledge, target: Target, name: str) -> torch.Tensor | None:
    model = reconstructor(know, name.split("/", 1)[1])
    return None if model is None else infer(model, target.features[target.rows])


def _attackers(cfg: Config) -> list[str]:
    return [f"reconstructors/{name}" for name in RECONSTRUCTORS]


def _models(cfg: Config, victim: str, mode: str, name: str) -> list[Model]:
    arch = name.split("/", 1)[1]
    return [Model(f"reconstructor-{arch}", lambda know, target: reconstructor(know, arch))]


FAMILY = Family("reconstructors", "the six reconstructors of Sec. 4.2.2, trained with L1 on clean φ1(Q)",
                _attackers, _reconstruct, _models)
