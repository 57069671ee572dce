"""The residual U-Net-like decoder: the strongest image decoder of the project, and its loss.

ψ and the other reconstructors of Sec. 4.2.2 are inverse-bottleneck stacks trained with L1 and
squeezed into [0, 1] by per-image min-max normalisation. This decoder is residual and U-Net-like:
3x3 residual blocks at every scale, and a skip that feeds the input features, projected and
upsampled, into every scale, so fine spatial detail of the features need not survive the whole
stack. It is trained with L1 + (1 − SSIM), the measure disclosure is scored by, and ends in a
sigmoid. The attack suite trains it on many kinds of pairs (:mod:`entities.attacks`), the
entity's local disclosure check on its own pairs (:mod:`entities.policy`), and the adversarial
defence trains one against the DPM while the DPM learns (:mod:`entities.defences`): it lives
here, below all three, so none of them imports another's module to reach it.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from entities.metrics import ssim_per_image

FULL_RES_WIDTH = 16  # channels at the image's resolution; doubled at every coarser scale


@functools.cache
def _resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """Bilinear resizing along one axis (``align_corners=False``, edges clamped) as a (size_in, size_out)
    matrix, with torch's source-index rule, so ``x @ M`` is ``F.interpolate``'s result along that axis."""
    m = torch.zeros(size_in, size_out)
    for j in range(size_out):
        src = max((j + 0.5) * size_in / size_out - 0.5, 0.0)
        i0 = int(src)
        weight = src - i0
        m[i0, j] += 1 - weight
        m[min(i0 + 1, size_in - 1), j] += weight
    return m


def bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` as two matrix products on the
    channels-last view (equal to 1e-6 in fp32). On the CPU, ``F.interpolate`` forward and backward took
    about a tenth of a decoder's training step, about twice what these products take."""
    n, c, h, w = x.shape
    mh = _resize_matrix(h, size[0]).to(x.device)
    mw = _resize_matrix(w, size[1]).to(x.device)
    y = mw.T @ x.permute(0, 2, 3, 1)  # (n, h, W, c): every row resized
    y = mh.T @ y.reshape(n, h, -1)  # (n, H, W·c): every column resized
    return y.reshape(n, size[0], size[1], c).permute(0, 3, 1, 2)


class ResidualBlock(nn.Module):
    """CONV3x3-BN-ReLU-CONV3x3-BN plus the input, then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + x)


class Decoder(nn.Module):
    """Features (C, h, w) to images (c, H, W) in [0, 1], H = h · 2^k."""

    def __init__(self, in_channels: int, in_size: int, out_size: int, out_channels: int = 3) -> None:
        super().__init__()
        stages = math.log2(out_size / in_size) if out_size >= in_size else -1.0
        if stages < 0 or stages != round(stages):
            raise ValueError(f"the decoder upsamples by factors of 2 and cannot turn {in_size} into {out_size} pixels")
        width = FULL_RES_WIDTH * 2 ** round(stages)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), ResidualBlock(width))
        self.ups = nn.ModuleList()
        self.skips = nn.ModuleList()
        for _ in range(round(stages)):
            self.ups.append(nn.Sequential(nn.Conv2d(width, width // 2, 3, padding=1, bias=False),
                                          nn.BatchNorm2d(width // 2), nn.ReLU(inplace=True)))
            self.skips.append(nn.Conv2d(in_channels, width // 2, 1))
            width //= 2
        self.refine = nn.ModuleList(ResidualBlock(m[0].out_channels) for m in self.ups)
        self.head = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.stem(features)
        for up, skip, refine in zip(self.ups, self.skips, self.refine):
            x = bilinear(x, (2 * x.shape[-2], 2 * x.shape[-1]))
            f = bilinear(features, x.shape[-2:])
            x = refine(up(x) + skip(f))
        return torch.sigmoid(self.head(x))


def build_decoder(feature_shape: tuple[int, ...], image_shape: tuple[int, ...]) -> Decoder:
    return Decoder(feature_shape[0], feature_shape[1], image_shape[1], image_shape[0])


def decoder_loss(recon: torch.Tensor, images: torch.Tensor, ssim_weight: float) -> tuple[torch.Tensor, float, float]:
    """L1 + w · (1 − mean SSIM): the pixel error and the structure the attack is scored by."""
    l1 = (recon - images).abs().mean()
    ssim = ssim_per_image(recon, images).mean()
    return l1 + ssim_weight * (1 - ssim), l1.item(), ssim.item()
