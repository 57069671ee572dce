"""``decoder``: a fresh decoder of a stronger family than ψ's, trained on clean φ1(Q) pairs.

The architecture and its L1 + (1 − SSIM) loss are :mod:`entities.decoders`'; the transfer,
dpm-agnostic and substitute attacks train the same architecture on other pairs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from entities import runtime
from entities.attacks.base import Family, Knowledge, Model, Target
from entities.config import AttackConfig, Config
from entities.decoders import build_decoder, decoder_loss
from entities.train import batch, fit, infer


def train_decoder(decoder: nn.Module, features: torch.Tensor, images: np.ndarray | torch.Tensor, cfg: AttackConfig,
                  seed: int, what: str, epochs: int | None = None) -> list[dict[str, float]]:
    """Fit ``decoder`` to (features, image) pairs with :func:`decoder_loss`."""
    runtime.current().module(decoder)
    decoder.train()

    def step(idx):
        loss, l1, ssim = decoder_loss(decoder(batch(features[idx])).float(), batch(images[idx]), cfg.ssim_weight)
        return loss, {"l1": l1, "ssim": ssim}

    torch.manual_seed(seed)
    history = fit(decoder.parameters(), step, len(features), cfg.epochs if epochs is None else epochs,
                  cfg.batch_size, cfg.lr, what, seed=seed)
    decoder.eval()
    return history


def capped(n: int, cap: int, seed: int) -> np.ndarray:
    """At most ``cap`` of n rows, seeded and sorted (all of them when cap is 0 or n ≤ cap)."""
    if not cap or n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


def clean_decoder(know: Knowledge) -> nn.Module:
    """The decoder trained on clean public pairs (φ1(q), q), at most ``attack.max_pairs`` of them."""
    def train(model: nn.Module) -> None:
        rows = capped(len(know.public_features), know.cfg.attack.max_pairs, know.seed)
        train_decoder(model, know.public_features[rows], know.public_images[rows], know.cfg.attack, know.seed,
                      "attack decoder")

    return know.trained("decoder", lambda: build_decoder(know.feature_shape, know.image_shape), train, clean=True)


def _reconstruct(know: Knowledge, target: Target, name: str) -> torch.Tensor:
    return infer(clean_decoder(know), target.features[target.rows])


def _attackers(cfg: Config) -> list[str]:
    return ["decoder"]


def _models(cfg: Config, victim: str, mode: str, name: str) -> list[Model]:
    return [Model("decoder", lambda know, target: clean_decoder(know))]


FAMILY = Family("decoder", "a residual U-Net-like decoder, L1 + SSIM loss, trained on clean φ1(Q) pairs",
                _attackers, _reconstruct, _models)
