"""The private Deep Poisoning Module P and its loss (Deep Poisoning Sec. 3.3, Eq. 6).

P maps φ1 features to features of the same shape. It is trained so that φ2 still classifies
P(φ1(x)) (cross-entropy) while the shared reconstructor ψ no longer recovers x from it (SSIM),
with φ1, φ2 and ψ frozen. Both halves of that objective are settings: the privacy half is a list of
terms from :mod:`entities.defences` (``dpm.privacy``, the paper's ψ by default), the utility half
:func:`utility_loss` (``dpm.utility``). Each entity keeps its P private: without it, nobody has the pairs
(poisoned feature, image) needed to train a reconstructor for the poisoned features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from entities.backbone import BasicBlock
from entities.config import DPM_BOTTLENECKS, DPM_INITS, DPMConfig
from entities.metrics import ssim_per_image


class DeepPoisoningModule(nn.Module):
    """A stack of shape-preserving residual blocks (the paper uses 4 ResNet blocks).

    ``init="random"`` is PyTorch's default initialisation, as a fresh ResNet block has it.
    ``init="identity"`` zeroes each block's last BatchNorm scale, so every block starts as the
    identity on φ1's non-negative (post-ReLU) features. The pool then moves away from φ1(x) only as
    far as training pushes it, and a DPM's epochs trace a privacy-utility curve from "no poisoning".

    ``bottleneck`` limits what P's output can carry about x, whatever an attacker later trains:
    ``none`` (the paper) keeps the blocks' whole output; ``spatial`` averages it over the positions
    and repeats it at each, so the pool keeps ``channels`` numbers per image and no spatial layout;
    ``logits`` keeps only a distribution over the ``classes`` (a softmax head on the pooled blocks)
    and shares that mixture of learned class prototypes, so at most what a K-way posterior says of
    x crosses the wire, which is all a decider needs of a pool item and far less than an image.
    ``atoms`` > K widens that to a softmax over M learned atoms: a rate knob between K numbers and ``none``.
    """

    def __init__(self, channels: int, blocks: int = 4, init: str = "random", bottleneck: str = "none",
                 shape: tuple[int, int] = (1, 1), classes: int = 0, atoms: int = 0) -> None:
        super().__init__()
        if init not in DPM_INITS:
            raise ValueError(f"unknown DPM init {init!r}; valid: {', '.join(DPM_INITS)}")
        if bottleneck not in DPM_BOTTLENECKS:
            raise ValueError(f"unknown DPM bottleneck {bottleneck!r}; valid: {', '.join(DPM_BOTTLENECKS)}")
        if bottleneck == "logits" and classes < 2:
            raise ValueError("a DPM with the logits bottleneck needs the number of classes (at least 2)")
        self.channels = channels
        self.bottleneck = bottleneck
        self.blocks = nn.Sequential(*[BasicBlock(channels, channels) for _ in range(blocks)])
        if init == "identity":
            for block in self.blocks:
                nn.init.zeros_(block.bn2.weight)
        if bottleneck == "logits":  # ``atoms`` > K: a mixture of more learned atoms than classes, a higher rate
            n = atoms or classes
            self.head = nn.Linear(channels, n)
            self.prototypes = nn.Parameter(0.1 * torch.randn(n, channels, *shape))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[1] != self.channels:
            raise ValueError(
                f"DPM expects {self.channels}-channel features, got shape {tuple(features.shape)}: "
                f"was it trained for another hook point?"
            )
        out = self.blocks(features)
        if self.bottleneck == "spatial":
            return out.mean((2, 3), keepdim=True).expand_as(out).contiguous()
        if self.bottleneck == "logits":
            posterior = torch.softmax(self.head(out.mean((2, 3))).float(), 1)
            return torch.einsum("nk,kchw->nchw", posterior, self.prototypes.float())
        return out


def build_dpm(cfg: DPMConfig, feature_shape: tuple[int, ...], phi2: nn.Module) -> DeepPoisoningModule:
    """The DPM the settings describe, for φ1 features of ``feature_shape`` and the classes of ``phi2``."""
    classes = [m for m in phi2.modules() if isinstance(m, nn.Linear)][-1].out_features
    return DeepPoisoningModule(feature_shape[0], cfg.blocks, cfg.init, cfg.bottleneck, tuple(feature_shape[1:]),
                               classes, cfg.atoms)


def ssim_privacy_loss(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The paper's L_SSIM with SSIM taken in [0, 1], also for the inverted reconstruction.

    Raw SSIM as a loss keeps falling below zero, which produces a photographic negative of x
    (1 - ψ then looks like x again). Clipping each image's SSIM at zero, for ψ and for 1 - ψ,
    drives reconstructions to *unrelated* structure instead of inverted structure.
    """
    direct = ssim_per_image(recon, images).clamp_min(0)
    inverted = ssim_per_image(1 - recon, images).clamp_min(0)
    return (direct + inverted).mean()


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_C: cross-entropy for class labels of shape (N,); binary cross-entropy for {0, 1} attribute
    targets of shape (N, A), the multi-label task of Table 4, so one DPM recipe serves both."""
    if labels.ndim == 2:
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    return F.cross_entropy(logits, labels)


def task_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy for class labels; the fraction of attributes predicted right for (N, A) targets."""
    if labels.ndim == 2:
        return ((logits > 0) == labels.bool()).float().mean().item()
    return (logits.argmax(1) == labels).float().mean().item()


def utility_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor, original: torch.Tensor | None) -> torch.Tensor:
    """What keeps P's output useful: ``labels``, the paper's L_C, cross-entropy of φ2(P(f)) on the
    labels (binary cross-entropy on (N, A) attribute targets, :func:`task_loss`); or ``distill``,
    KL(φ2(f) ‖ φ2(P(f))) on φ2's logits for the original features.

    Cross-entropy rewards P for pushing every item deep into its class (the paper's pools are classified
    better than the features they came from, i.e. collapsed toward class prototypes); distillation asks
    P to keep φ2's whole output, mistakes and uncertainty included, which is what a receiver's decider
    would learn from the original features.
    """
    if kind == "labels":
        return task_loss(logits, labels)
    if kind == "distill":
        if original is None:
            raise ValueError("dpm.utility = distill needs φ2's logits on the original features")
        return F.kl_div(F.log_softmax(logits, 1), F.log_softmax(original, 1), log_target=True, reduction="batchmean")
    raise ValueError(f"unknown dpm.utility {kind!r}; valid: labels, distill")
