"""Reconstructors ψ: networks that invert φ1, i.e. the attacker's (and the DPM's adversary's) model.

Deep Poisoning Sec. 4.2.1: inverse bottleneck blocks (CONV1x1-BN-CONV3x3-BN-CONV1x1-ReLU) before
each upscaling, then CONV1x1-BN-ReLU-CONV1x1 to the image. Sec. 4.2.2 names six variants:
``p``/``r`` plain or residual blocks, ``xN`` N blocks per stage, ``sK`` upscaling factor K per
stage, ``_c`` clamping the output to [0, 1] instead of min-max normalising each image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


class InverseBottleneck(nn.Module):
    """CONV1x1-BN-CONV3x3-BN-CONV1x1-ReLU; the residual variant adds the input before the ReLU."""

    def __init__(self, channels: int, residual: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.Conv2d(channels, channels, 1),
        )
        self.residual = residual
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return self.relu(out + x if self.residual else out)


@dataclass(frozen=True)
class ReconstructorSpec:
    residual: bool
    blocks: int
    scale: int
    clamp: bool


RECONSTRUCTORS: dict[str, ReconstructorSpec] = {
    "px2s2": ReconstructorSpec(residual=False, blocks=2, scale=2, clamp=False),
    "px4s2": ReconstructorSpec(residual=False, blocks=4, scale=2, clamp=False),
    "rx2s2": ReconstructorSpec(residual=True, blocks=2, scale=2, clamp=False),
    "rx4s2": ReconstructorSpec(residual=True, blocks=4, scale=2, clamp=False),
    "rx4s4": ReconstructorSpec(residual=True, blocks=4, scale=4, clamp=False),
    "rx2s2_c": ReconstructorSpec(residual=True, blocks=2, scale=2, clamp=True),
}


class Reconstructor(nn.Module):
    """ψ: features of shape (C, h, w) to images of shape (out_channels, H, W) in [0, 1]."""

    def __init__(
        self, spec: ReconstructorSpec, in_channels: int, in_size: int, out_size: int, out_channels: int = 3
    ) -> None:
        super().__init__()
        stages = math.log(out_size / in_size, spec.scale) if out_size > in_size else 0.0
        if abs(stages - round(stages)) > 1e-6:
            raise ValueError(
                f"cannot upscale {in_size} to {out_size} pixels by factors of {spec.scale}; "
                f"pick a reconstructor with another scale or another hook point"
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(round(stages)):
            layers += [InverseBottleneck(channels, spec.residual) for _ in range(spec.blocks)]
            out = max(16, channels // spec.scale)
            layers += [
                nn.ConvTranspose2d(channels, out, spec.scale, stride=spec.scale, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
        layers += [
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, out_channels, 1),
        ]
        self.net = nn.Sequential(*layers)
        self.clamp = spec.clamp

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.net(features).float()  # the image in fp32 even under bf16 autocast
        if self.clamp:
            return out.clamp(0, 1)
        flat = out.flatten(1)
        lo = flat.min(1).values.view(-1, 1, 1, 1)
        hi = flat.max(1).values.view(-1, 1, 1, 1)
        return (out - lo) / (hi - lo + 1e-8)


def build_reconstructor(
    name: str, feature_shape: tuple[int, int, int], image_shape: tuple[int, int, int]
) -> Reconstructor:
    """ψ by registry name for features (C, h, w) and images (c, H, W)."""
    if name not in RECONSTRUCTORS:
        raise ValueError(f"unknown reconstructor {name!r}; valid: {', '.join(RECONSTRUCTORS)}")
    c, h, _ = feature_shape
    return Reconstructor(RECONSTRUCTORS[name], c, h, image_shape[1], image_shape[0])
