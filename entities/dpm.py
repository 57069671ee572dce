"""The private Deep Poisoning Module P and its loss (Deep Poisoning Sec. 3.3, Eq. 6).

P maps φ1 features to features of the same shape. It is trained so that φ2 still classifies
P(φ1(x)) (cross-entropy) while the shared reconstructor ψ no longer recovers x from it (SSIM),
with φ1, φ2 and ψ frozen. Each entity keeps its P private: without it, nobody has the pairs
(poisoned feature, image) needed to train a reconstructor for the poisoned features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from entities.backbone import BasicBlock
from entities.config import DPM_INITS
from entities.metrics import ssim_per_image


class DeepPoisoningModule(nn.Module):
    """A stack of shape-preserving residual blocks (the paper uses 4 ResNet blocks).

    ``init="random"`` is PyTorch's default initialisation, as a fresh ResNet block has it.
    ``init="identity"`` zeroes each block's last BatchNorm scale, so every block starts as the
    identity on φ1's non-negative (post-ReLU) features. The pool then moves away from φ1(x) only as
    far as training pushes it, and a DPM's epochs trace a privacy-utility curve from "no poisoning".
    """

    def __init__(self, channels: int, blocks: int = 4, init: str = "random") -> None:
        super().__init__()
        if init not in DPM_INITS:
            raise ValueError(f"unknown DPM init {init!r}; valid: {', '.join(DPM_INITS)}")
        self.channels = channels
        self.blocks = nn.Sequential(*[BasicBlock(channels, channels) for _ in range(blocks)])
        if init == "identity":
            for block in self.blocks:
                nn.init.zeros_(block.bn2.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[1] != self.channels:
            raise ValueError(
                f"DPM expects {self.channels}-channel features, got shape {tuple(features.shape)}: "
                f"was it trained for another hook point?"
            )
        return self.blocks(features)


def ssim_privacy_loss(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The paper's L_SSIM with SSIM taken in [0, 1], also for the inverted reconstruction.

    Raw SSIM as a loss keeps falling below zero, which produces a photographic negative of x
    (1 - ψ then looks like x again). Clipping each image's SSIM at zero, for ψ and for 1 - ψ,
    drives reconstructions to *unrelated* structure instead of inverted structure.
    """
    direct = ssim_per_image(recon, images).clamp_min(0)
    inverted = ssim_per_image(1 - recon, images).clamp_min(0)
    return (direct + inverted).mean()


def dpm_loss(
    logits: torch.Tensor, labels: torch.Tensor, recon: torch.Tensor, images: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_C + λ·L_SSIM; returns (total, classification part, SSIM part)."""
    ce = F.cross_entropy(logits, labels)
    priv = ssim_privacy_loss(recon, images)
    return ce + lam * priv, ce, priv
