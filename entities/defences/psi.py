"""``psi``: the paper's term, SSIM of the shared reconstructor ψ (frozen) on P's output (Eq. 6)."""

from __future__ import annotations

import torch
from torch import nn

from entities.config import DPMConfig
from entities.defences.base import Defence, Term
from entities.dpm import ssim_privacy_loss


class PsiTerm(Term):
    name = "ssim_loss"

    def __init__(self, psi: nn.Module) -> None:
        self.psi = psi

    def loss(self, poisoned: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return ssim_privacy_loss(self.psi(poisoned).float(), images)


def _build(cfg: DPMConfig, psi: nn.Module, seed: int) -> Term:
    return PsiTerm(psi)


DEFENCE = Defence("psi", "the paper's: SSIM of the shared ψ (frozen) on the poisoned features", _build)
