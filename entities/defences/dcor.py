"""``dcor``: distance correlation between the images and P's output (NoPeek, Vepakomma et al. 2020).

SSIM against one reconstructor asks "can this model draw x?"; distance correlation asks whether
the pool's geometry follows the images' at all: dCor(x, P(φ1(x))) is 0 only when the two are
independent (Székely et al. 2007), whatever decoder an attacker would later train. It is taken on
each batch (flattened images against flattened features), in fp32, bias-corrected, and clipped at 0
as a loss (a negative estimate is independence within the estimator's noise).
"""

from __future__ import annotations

import torch
from torch import nn

from entities.config import DPMConfig
from entities.defences.base import Defence, Term


def _u_centred(x: torch.Tensor) -> torch.Tensor:
    n = len(x)
    d = torch.cdist(x, x)
    u = d - d.sum(0, keepdim=True) / (n - 2) - d.sum(1, keepdim=True) / (n - 2) + d.sum() / ((n - 1) * (n - 2))
    return u.fill_diagonal_(0)


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bias-corrected squared distance correlation of two batches (rows are samples), near 0 when they
    are independent and 1 when one is a similarity transform of the other.

    The plain (V-statistic) estimate is biased toward 1 when the dimension is large beside the batch,
    as images and feature maps are: two independent 3072- and 4096-dimensional batches of 128 score
    about 0.8, so minimising it would chase the bias. The U-centred estimate (Székely and Rizzo 2014)
    is unbiased for the squared distance covariance and stays near 0 for independent batches.
    """
    n = len(x)
    if n < 4:
        raise ValueError(f"distance correlation needs at least 4 samples per batch, got {n}")
    with torch.autocast(x.device.type, enabled=False):
        a, b = _u_centred(x.flatten(1).float()), _u_centred(y.flatten(1).float())
        cov, var_a, var_b = (a * b).sum(), (a * a).sum(), (b * b).sum()
        return cov / (var_a * var_b).sqrt().clamp_min(1e-12)


class DcorTerm(Term):
    name = "dcor"

    def loss(self, poisoned: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return distance_correlation(images, poisoned).clamp_min(0)


def _build(cfg: DPMConfig, psi: nn.Module, seed: int) -> Term:
    return DcorTerm()


DEFENCE = Defence("dcor", "distance correlation between the images and the poisoned features (NoPeek)", _build)
