"""Stationary feature perturbations, the baselines of Deep Poisoning's Table 3.

Each maps φ1 features to perturbed features of the same shape, with no training: Gaussian noise
(GN), a Gaussian filter (GF) and a mean filter (MF) over each feature map. The noise is scaled by
the features' own standard deviation so one setting means the same at any hook point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GaussianNoise(nn.Module):
    """Add N(0, (sigma · std of the features)²) noise, seeded so tables are repeatable."""

    def __init__(self, sigma: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        self.sigma = sigma
        self.seed = seed

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return f + self.sigma * f.std() * torch.randn(f.shape, generator=g).to(f.device)


class FeatureFilter(nn.Module):
    """Convolve every feature map with one fixed normalised kernel (replicate padding)."""

    def __init__(self, kernel: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("kernel", kernel / kernel.sum())

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        c, k = f.shape[1], self.kernel.shape[-1]
        weight = self.kernel[None, None].repeat(c, 1, 1, 1)
        return F.conv2d(F.pad(f, [k // 2] * 4, mode="replicate"), weight, groups=c)


def gaussian_filter(size: int = 5, sigma: float = 1.5) -> FeatureFilter:
    x = (torch.arange(size) - size // 2).float()
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return FeatureFilter(torch.outer(g, g))


def mean_filter(size: int = 5) -> FeatureFilter:
    return FeatureFilter(torch.ones(size, size))


PERTURBATIONS = {"GN": GaussianNoise, "GF": gaussian_filter, "MF": mean_filter}


def build_perturbation(name: str) -> nn.Module:
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; valid: {', '.join(PERTURBATIONS)}")
    return PERTURBATIONS[name]()
