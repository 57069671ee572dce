"""DeepObfuscator (Li et al., 2019): one obfuscator on φ1 features, trained adversarially, shared by everyone.

Deep Poisoning Sec. 4.2.4 compares its private DPMs with this privacy-preserving design. The
obfuscator O maps φ1 features to features of the same shape (here a stack of residual blocks, the
DPM's architecture, so the two differ in how they are trained and kept, not in capacity). It is
trained jointly with a utility classifier on O(φ1(x)) and against two adversaries that train on
O(φ1(x)) at the same time: a privacy classifier for the private attributes and a reconstructor of x.

Each step minimises, in one backward pass,

    BCE(utility) + [BCE(privacy | O(f) detached) + L1(recon | O(f) detached)]      (the adversaries learn)
                 + α · confusion(privacy | adversary frozen) + β · L_SSIM(recon | adversary frozen)

so the adversaries' parameters get gradients only from their own losses and O's only from the
utility and the adversarial terms. ``confusion`` is the privacy classifier's BCE against 1/2 for
every private attribute: it pulls the adversary to chance instead of maximising its BCE, which is
unbounded and lets O merely flip the adversary's answers (which the next adversary flips back).
L_SSIM is the DPM's privacy loss (:func:`entities.dpm.ssim_privacy_loss`).

Unlike a DPM, O is the same for every collaborator: whoever holds it can make (O(φ1(x)), x) pairs from
its own images and train a decoder that reverses it (Table 4's "image sharing reconstruction").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from entities import runtime
from entities.backbone import BasicBlock
from entities.config import DPM_INITS
from entities.dpm import ssim_privacy_loss, task_loss
from entities.train import batch, fit


class Obfuscator(nn.Module):
    """Shape-preserving residual blocks on φ1 features.

    ``init="random"`` (PyTorch's default, as DeepObfuscator trains its obfuscator from scratch with the
    classifier) or ``"identity"`` (each block's last BatchNorm scale zero, so training begins from the
    unprotected features). The identity start moves slowly: its convolutions get no gradient until
    those scales have grown, so in a short run it barely fights its adversaries.
    """

    def __init__(self, channels: int, blocks: int = 2, init: str = "random") -> None:
        super().__init__()
        if init not in DPM_INITS:
            raise ValueError(f"unknown obfuscator init {init!r} (table4.obfuscator_init); "
                             f"valid: {', '.join(DPM_INITS)}")
        self.channels = channels
        self.blocks = nn.Sequential(*[BasicBlock(channels, channels) for _ in range(blocks)])
        if init == "identity":
            for block in self.blocks:
                nn.init.zeros_(block.bn2.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[1] != self.channels:
            raise ValueError(f"obfuscator expects {self.channels}-channel features, got shape "
                             f"{tuple(features.shape)}: was it trained for another hook point?")
        return self.blocks(features)


@dataclass
class DeepObfuscator:
    """The shared obfuscator with the utility classifier it was trained with, and its two adversaries."""

    obfuscator: Obfuscator
    classifier: nn.Module  # the utility task from O(φ1(x)), trained jointly (shared too)
    privacy: nn.Module | None  # the adversarial privacy-attribute classifier; None where no attribute is private
    reconstructor: nn.Module  # the adversarial reconstructor of x

    def modules(self) -> dict[str, nn.Module]:
        parts = {"obfuscator": self.obfuscator, "classifier": self.classifier, "privacy": self.privacy,
                 "reconstructor": self.reconstructor}
        return {name: m for name, m in parts.items() if m is not None}


@dataclass(frozen=True)
class ObfuscatorSettings:
    epochs: int
    batch_size: int
    lr: float
    privacy_weight: float  # α
    reconstruction_weight: float  # β


def confusion_loss(logits: torch.Tensor) -> torch.Tensor:
    """BCE of the privacy classifier's outputs against 1/2: zero gradient exactly at chance, bounded."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 0.5))


def frozen_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with its parameters detached: the gradient reaches x, never the module."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return functional_call(module, params, (x,))


def train_obfuscator(model: DeepObfuscator, features: torch.Tensor, images: np.ndarray, utility: np.ndarray,
                     private: np.ndarray | None, settings: ObfuscatorSettings, seed: int = 0,
                     what: str = "deep obfuscator") -> list[dict[str, float]]:
    """The min-max training of the module docstring on cached φ1 ``features`` of ``images``.

    ``utility``: {0, 1} attributes (N, A) for BCE, or class labels (N,) for cross-entropy (a sharing
    mode on a classification task, :func:`entities.dpm.task_loss`); ``private``: {0, 1} attributes, or
    None where no attribute is private (then ``model.privacy`` is None and only the reconstructor
    fights). α = β = 0 is the non-adversarial control: the same modules and steps, the adversaries
    learning, O not fighting them. Returns :func:`fit`'s history (``utility``, ``privacy`` = the
    adversary's BCE on the true private attributes, ``recon_l1``)."""
    if (private is None) != (model.privacy is None):
        raise ValueError("train_obfuscator: give private attributes exactly when the model has a privacy adversary")
    rt = runtime.current()
    for m in model.modules().values():
        rt.module(m).train()
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    a, b = settings.privacy_weight, settings.reconstruction_weight

    def step(idx):
        z = model.obfuscator(batch(features[idx]))
        x = batch(images[idx])
        util = task_loss(model.classifier(z).float(), rt.tensor(torch.as_tensor(utility[idx])))
        recon_l1 = (model.reconstructor(z.detach()).float() - x).abs().mean()
        loss = util + recon_l1
        figures = {"utility": util.item(), "recon_l1": recon_l1.item()}
        if model.privacy is not None:
            y_p = rt.tensor(torch.as_tensor(private[idx]).float())
            priv = F.binary_cross_entropy_with_logits(model.privacy(z.detach()).float(), y_p)
            loss = loss + priv
            figures["privacy"] = priv.item()
        if a and model.privacy is not None:
            fool = confusion_loss(frozen_call(model.privacy, z).float())
            loss = loss + a * fool
            figures["confusion"] = fool.item()
        if b:
            hide = ssim_privacy_loss(frozen_call(model.reconstructor, z).float(), x)
            loss = loss + b * hide
            figures["ssim_loss"] = hide.item()
        return loss, figures

    torch.manual_seed(seed)
    params = [p for m in model.modules().values() for p in m.parameters()]
    history = fit(params, step, len(features), settings.epochs, settings.batch_size, settings.lr, what, seed=seed)
    for m in model.modules().values():
        m.eval()
    return history
