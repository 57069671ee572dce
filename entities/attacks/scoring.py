"""How an attack is scored: on the victim's real images, which no attacker ever sees.

Per reconstruction: L1, SSIM in both polarities and PSNR (:func:`entities.metrics.reconstruction_scores`),
and the disclosure, the larger of the two mean SSIMs (a photographic negative shows the image too).
A low mean SSIM can hide a leak that picks an image out of a crowd, so each reconstruction is also
put to an identification test: is the real image it shows the nearest, by SSIM either way round,
among a gallery of that image and ``gallery - 1`` other images of the victim's shard? Chance is one
in the gallery's size.

An item may show one real image and carry the label of another (MDP: the selected image and the
target). The attack is scored against whichever of its references it discloses more.
"""

from __future__ import annotations

import numpy as np
import torch

from entities.metrics import DATA_RANGE, disclosure, reconstruction_scores, window_matrix
from entities.train import to_float


def gallery_rows(n: int, truth: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Per item a row of ``min(size, n)`` image indices of the shard: its true image first, then others
    drawn without replacement (seeded, so every attacker faces the same galleries)."""
    size = min(size, n)
    rng = np.random.default_rng(seed)
    out = np.empty((len(truth), size), dtype=np.int64)
    for i, t in enumerate(np.asarray(truth)):
        others = rng.choice(n - 1, size - 1, replace=False)
        out[i, 0] = t
        out[i, 1:] = others + (others >= t)
    return out


def _stats(x: torch.Tensor, wh: torch.Tensor, ww: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Windowed mean and variance of every image and channel."""
    mu = wh @ x @ ww.T
    return mu, wh @ (x * x) @ ww.T - mu * mu


@torch.no_grad()
def gallery_ssim(recon: torch.Tensor, images: torch.Tensor, galleries: np.ndarray, chunk: int = 1) -> torch.Tensor:
    """SSIM of each reconstruction with each image of its gallery, the larger of SSIM(x̂, g) and
    SSIM(1 − x̂, g): shape (items, gallery). The same SSIM as :func:`entities.metrics.ssim_per_image`
    (window, constants, per-channel mean), with each image's windowed statistics computed once.

    ``chunk`` items at a time, one by default: an item's temporaries (its 100 CIFAR gallery images, 1.2 MB)
    stay small, and the same figures come up to 1.7 times faster than 25 at a time in a fresh process, no
    slower in one that already freed larger blocks (``benchmarks/attack_kernels.py``). This test is most of
    scoring, about a fifth of the attack suite's cell time."""
    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    wh, ww = window_matrix(images.shape[-2]), window_matrix(images.shape[-1])
    mu_g, var_g = _stats(images.float(), wh, ww)
    out = []
    for i in range(0, len(recon), chunk):
        r = recon[i:i + chunk].float()
        rows = torch.as_tensor(galleries[i:i + chunk])
        mu_r, var_r = _stats(r, wh, ww)
        mg, vg = mu_g[rows], var_g[rows]
        cov = wh @ (r[:, None] * images[rows].float()) @ ww.T - mu_r[:, None] * mg
        structure = (2 * cov + c2) / (var_r[:, None] + vg + c2)
        inverted = (c2 - 2 * cov) / (var_r[:, None] + vg + c2)  # 1 − x̂: same variance, covariance negated
        out.append(torch.maximum(_mean_map(_light(mu_r[:, None], mg, c1) * structure),
                                 _mean_map(_light(1 - mu_r[:, None], mg, c1) * inverted)))
    return torch.cat(out) if out else torch.zeros(0, galleries.shape[1])


def _light(mu: torch.Tensor, mg: torch.Tensor, c1: float) -> torch.Tensor:
    return (2 * mu * mg + c1) / (mu * mu + mg * mg + c1)


def _mean_map(ssim_map: torch.Tensor) -> torch.Tensor:
    """Per pair: the mean over the map, then over channels, as pytorch-msssim averages."""
    return ssim_map.flatten(3).mean(-1).mean(-1)


def identified(recon: torch.Tensor, images: torch.Tensor, galleries: np.ndarray) -> np.ndarray:
    """Per reconstruction: is column 0 of its gallery strictly the nearest image, by SSIM either way round?"""
    s = gallery_ssim(recon, images, galleries)
    if s.shape[1] == 1:
        return np.ones(len(s), dtype=bool)
    return (s[:, 0] > s[:, 1:].max(1).values).numpy()


@torch.no_grad()
def score(recon: torch.Tensor, shard_images: np.ndarray, references: dict[str, np.ndarray], gallery: int,
          seed: int) -> dict:
    """Mean scores of ``recon`` against the reference it discloses most, with its identification rate.

    ``references`` maps a name (``shown``, ``label``) to the shard row of each item's real image.
    """
    x = to_float(shard_images)
    best: tuple[str, dict[str, float]] | None = None
    for name, rows in references.items():
        means = {k: float(v.mean()) for k, v in reconstruction_scores(recon.float(), x[rows]).items()}
        if best is None or disclosure(means) > disclosure(best[1]):
            best = (name, means)
    if best is None:
        raise ValueError("an attack needs at least one reference image per item to be scored against")
    name, means = best
    hits = identified(recon, x, gallery_rows(len(x), references[name], gallery, seed))
    return {**means, "disclosure": disclosure(means), "identification": float(hits.mean()),
            "chance": 1.0 / min(gallery, len(x)), "n": len(recon), "reference": name}
