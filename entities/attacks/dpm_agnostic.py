"""``dpm-agnostic``: one decoder for any DPM of the published recipe.

The attacker trains several DPMs on its own shard as the recipe says, with other seeds, starts
(``random``/``identity``) and λ values (``attack.agnostic_lams``, ``attack.agnostic_inits``), beside
its own private one; poisons its shard and Q with each, with and without each of Table 3's
perturbations in front, and adds clean pairs; then trains one decoder on all those pairs. If DPMs
of one recipe poison alike, that decoder inverts a DPM it never saw, the victim's included.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch import nn

from entities.attacks.base import CLEAN, FEATURE_MODES, Family, Knowledge, Model, Target, recipe, uses_dpm
from entities.attacks.decoder import capped, train_decoder
from entities.attacks.transfer import own_pairs
from entities.config import Config
from entities.decoders import build_decoder
from entities.dpm import build_dpm
from entities.train import infer, train_dpm


def recipe_dpms(know: Knowledge) -> list[nn.Module]:
    """The attacker's own DPM and one more per (λ, start) of the attack settings, each with its own seed."""
    a, own = know.cfg.attack, know.own
    if len(a.agnostic_lams) != len(a.agnostic_inits):
        raise ValueError(f"attack.agnostic_lams {a.agnostic_lams} and attack.agnostic_inits {a.agnostic_inits} "
                         "must have one entry per extra DPM")
    dpms = [own.dpm]
    for k, (lam, init) in enumerate(zip(a.agnostic_lams, a.agnostic_inits)):
        dpms.append(_extra_dpm(know, k, dataclasses.replace(know.cfg.dpm, lam=lam, init=init)))
    return dpms


def _extra_dpm(know: Knowledge, k: int, settings) -> nn.Module:
    own, seed = know.own, know.seed + 1 + k

    def train(dpm: nn.Module) -> None:
        train_dpm(dpm, copy.deepcopy(know.shared.phi2), know.shared.psi, own.features, own.images, own.labels,
                  settings, seed=seed, what=f"attack dpm-agnostic DPM {k + 1} (λ = {settings.lam}, {settings.init})")

    return know.trained(f"agnostic-dpm{k}", lambda: build_dpm(settings, know.feature_shape, know.shared.phi2), train)


def agnostic_decoder(know: Knowledge) -> nn.Module:
    """One decoder on pairs from every (DPM, perturbation) recipe and clean pairs, equal shares of
    ``attack.max_pairs``."""
    def train(model: nn.Module) -> None:
        features, images = own_pairs(know)
        maps = [recipe(CLEAN, None)] + [recipe(m, d, know.seed) for d in recipe_dpms(know) for m in FEATURE_MODES
                                        if uses_dpm(m)]
        share = max(1, (know.cfg.attack.max_pairs or len(features) * len(maps)) // len(maps))
        parts, rows_all = [], []
        for j, m in enumerate(maps):
            rows = capped(len(features), share, know.seed + j)
            parts.append(infer(m, features[rows]))
            rows_all.append(rows)
        train_decoder(model, torch.cat(parts), images[np.concatenate(rows_all)], know.cfg.attack, know.seed,
                      "attack dpm-agnostic")

    return know.trained("agnostic-decoder", lambda: build_decoder(know.feature_shape, know.image_shape), train)


def _reconstruct(know: Knowledge, target: Target, name: str) -> torch.Tensor:
    return infer(agnostic_decoder(know), target.features[target.rows])


def _attackers(cfg: Config) -> list[str]:
    return ["dpm-agnostic"]


def _models(cfg: Config, victim: str, mode: str, name: str) -> list[Model]:
    return [Model("agnostic-decoder", lambda know, target: agnostic_decoder(know))]


FAMILY = Family("dpm-agnostic", "one decoder on pairs poisoned by several DPMs of the published recipe",
                _attackers, _reconstruct, _models)
