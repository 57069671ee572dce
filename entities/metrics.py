"""Classification and reconstruction metrics, in one place so every table scores the same way.

Images are floats in [0, 1] (data range 1.0) for L1, SSIM and PSNR. SSIM is pytorch-msssim's with
its standard Gaussian window (11 pixels, sigma 1.5, valid convolution), which fits images of 11
pixels and more, so CIFAR's 32-pixel images are fine. It is computed here with the window as a matrix
(:func:`window_matrix`) rather than pytorch-msssim's grouped convolutions: the same sums in another
order (equal to 1e-6, ``tests/test_core.py``), forward and backward 1.5 times faster on the CPU for
channels-last inputs and 2.7 times for contiguous ones. SSIM was about a tenth of a decoder's training step.
"""

from __future__ import annotations

import functools

import torch

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
DATA_RANGE = 1.0


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sample bool: is the label among the k highest logits (k capped at the class count)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


def ssim_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM of each image pair, shape (N,); can be negative (anti-correlated structure).

    Always in fp32, also inside a bf16 autocast region (the DPM's loss): SSIM divides small
    variances, which bf16's 8-bit mantissa would turn into noise.
    """
    if x.shape != y.shape:
        raise ValueError(f"SSIM compares images of one shape, not {tuple(x.shape)} and {tuple(y.shape)}")
    with torch.autocast(x.device.type, enabled=False):
        x, y = x.float(), y.float()
        wh, ww = window_matrix(x.shape[-2], x.device), window_matrix(x.shape[-1], x.device)
        # the five windowed moments in one pair of matrix products
        mu_x, mu_y, xx, yy, xy = wh @ torch.stack([x, y, x * x, y * y, x * y]) @ ww.T
        c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
        mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
        structure = (2 * (xy - mu_xy) + c2) / ((xx - mu_xx) + (yy - mu_yy) + c2)
        ssim_map = ((2 * mu_xy + c1) / (mu_xx + mu_yy + c1)) * structure
        return ssim_map.flatten(2).mean(-1).mean(1)


@functools.cache
def window_matrix(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """pytorch-msssim's valid Gaussian filter along one axis of ``size`` pixels as a matrix ``W``:
    ``W @ x @ W.T`` filters images as its two 1-d convolutions do. An axis shorter than the window is
    left unfiltered (the identity), as pytorch-msssim skips it. Cached: callers must not write to it."""
    if size < SSIM_WINDOW:
        return torch.eye(size, device=device)
    taps = torch.arange(SSIM_WINDOW, dtype=torch.float32) - SSIM_WINDOW // 2
    g = torch.exp(-(taps**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    w = torch.zeros(size - SSIM_WINDOW + 1, size)
    for i in range(len(w)):
        w[i, i:i + SSIM_WINDOW] = g
    return w.to(device)


def l1_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute pixel difference of each pair (the paper's L1 distance)."""
    return (x - y).abs().flatten(1).mean(1)


def psnr_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB for data range 1.0; identical images are capped at 100 dB."""
    mse = (x - y).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(DATA_RANGE**2 / mse.clamp_min(1e-10))).clamp(max=100.0)


def reconstruction_scores(recon: torch.Tensor, original: torch.Tensor) -> dict[str, torch.Tensor]:
    """L1, SSIM, PSNR of ψ's output and SSIM of its inversion 1 - ψ, per image.

    The inverted score matters: a reconstruction pushed to negative SSIM is a photographic negative,
    and ``1 - ψ`` shows the image again. Poisoning only counts if both SSIMs are near zero.
    """
    return {
        "l1": l1_per_image(recon, original),
        "ssim": ssim_per_image(recon, original),
        "ssim_inverted": ssim_per_image(1 - recon, original),
        "psnr": psnr_per_image(recon, original),
    }


def disclosure(scores: dict[str, float]) -> float:
    """How much of the image a reconstruction shows: the larger of SSIM(ψ, x) and SSIM(1 − ψ, x),
    since a photographic negative discloses the image as well as a positive does."""
    return max(scores["ssim"], scores["ssim_inverted"])


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Average precision of each column (attribute), shape (A,), in [0, 1]; NaN where a column has no positive.

    AP = mean over the positives of the precision among the items ranked at or above them, items
    ranked by descending score (ties in the order given: a stable sort, so a result is reproducible).
    This is the non-interpolated AP of scikit-learn's ``average_precision_score`` for tie-free scores.
    """
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} must both be (N, A)")
    order = scores.float().argsort(dim=0, descending=True, stable=True)
    hits = targets.float().gather(0, order)  # (N, A): 1 where the item at rank r is a positive
    precision_at = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float32)[:, None]
    positives = hits.sum(0)
    ap = (precision_at * hits).sum(0) / positives
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """mAP in percent over the attributes that have a positive (Table 4's utility and privacy mAPs)."""
    ap = average_precision(scores, targets)
    if torch.isnan(ap).all():
        raise ValueError("mean average precision: no attribute has a positive item in these targets")
    return 100.0 * float(ap.nanmean())


def utility_retained(mode: float, floor: float, clean: float) -> float:
    """The share of clean sharing's gain over the label-only floor that a mode keeps:
    (mode − floor) / (clean − floor), from the same row trained on each mode's pools. 1 keeps all of
    it, 0 teaches nothing beyond labels, below 0 harms. NaN where clean sharing gains nothing over the
    floor: in such a regime no defence can be judged on utility."""
    gain = clean - floor
    return (mode - floor) / gain if gain > 0 else float("nan")


def excess_disclosure(worst: float, prior: float) -> float:
    """What a pool discloses beyond its labels: the worst case over the attack suite minus the ``prior``
    attacker's figure (the mean image of each item's label), the floor any label-sharing mode reads."""
    return worst - prior
