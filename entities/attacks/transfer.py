"""``transfer``: the collaborator's own decoder for poisoned features, applied to the others' pools.

The attacker poisons what it holds (its shard and Q) with the recipe of the mode, using its own
private DPM in place of the victim's, and trains the decoder on those (P_own(φ1(x)), x) pairs. It
wins where DPMs trained by one recipe on similar data poison alike. In the modes without a DPM the
recipe is the identity and the decoder learns from clean pairs of its own shard and Q.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from entities.attacks.base import Family, Knowledge, Model, Target, recipe, recipe_tag
from entities.attacks.decoder import capped, train_decoder
from entities.config import Config
from entities.decoders import build_decoder
from entities.train import infer


def own_pairs(know: Knowledge) -> tuple[torch.Tensor, np.ndarray]:
    """φ1 of everything the attacker holds images of (its shard, then Q) with those images."""
    own = know.own
    return torch.cat([own.features, know.public_features]), np.concatenate([own.images, know.public_images])


def transfer_decoder(know: Knowledge, mode: str) -> nn.Module:
    """The decoder for ``mode``'s recipe with the attacker's own DPM, on at most ``attack.max_pairs`` pairs."""
    tag = recipe_tag(mode)

    def train(model: nn.Module) -> None:
        features, images = own_pairs(know)
        rows = capped(len(features), know.cfg.attack.max_pairs, know.seed)
        shared = infer(recipe(mode, know.own.dpm, know.seed, know.shared.obfuscator), features[rows])
        train_decoder(model, shared, images[rows], know.cfg.attack, know.seed, f"attack transfer {tag}")

    return know.trained(f"transfer-{tag}", lambda: build_decoder(know.feature_shape, know.image_shape), train)


def _reconstruct(know: Knowledge, target: Target, name: str) -> torch.Tensor:
    return infer(transfer_decoder(know, target.mode), target.features[target.rows])


def _attackers(cfg: Config) -> list[str]:
    return ["transfer"]


def transfer_model(mode: str) -> Model:
    """The transfer decoder of ``mode``'s recipe as a task: one per recipe, whatever the victim."""
    return Model(f"transfer-{recipe_tag(mode)}", lambda know, target: transfer_decoder(know, mode))


def _models(cfg: Config, victim: str, mode: str, name: str) -> list[Model]:
    return [transfer_model(mode)]


FAMILY = Family("transfer", "a decoder trained on the attacker's own pairs, poisoned with its own DPM",
                _attackers, _reconstruct, _models)
