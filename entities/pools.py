"""Shared pools: the checks every receiver runs, and their on-disk form.

A pool is what crosses between entities with its labels: poisoned features P_k(φ1(S_k)) in the
DPM sharing mode, images in [0, 1] in the MDP, AugMDP and raw modes (``Pool.features`` then holds
the images; see :mod:`entities.sharing`). The Flower strategy and its entities refuse a pool
that fails :func:`validate_shared`; the Table 5 grid, which reuses DPM pools, :func:`validate_pool`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from entities.entity import Pool
from entities.sharing import shares_images


class PoolError(ValueError):
    """A pool is malformed; the message names the pool and what is wrong."""


def validate_pool(name: str, pool: Pool, feature_shape: tuple[int, ...], num_classes: int) -> None:
    """Shape, dtype, finite values, label range and matching lengths, or a PoolError."""
    _check(name, pool, feature_shape, num_classes, "features", "feature maps", " (made with another φ1 or hook point?)")


def validate_images(name: str, pool: Pool, image_shape: tuple[int, ...], num_classes: int) -> None:
    """The checks of :func:`validate_pool` for a pool of images, and pixel values in [0, 1].

    The range matters beyond tidiness: receivers feed the images to φ1, which was trained on
    [0, 1] inputs, and an out-of-range pool would train the decider on features φ1 never produces.
    """
    _check(name, pool, image_shape, num_classes, "images", "images", "")
    low, high = pool.features.min().item(), pool.features.max().item()
    if low < 0 or high > 1:
        raise PoolError(f"pool {name}: pixel values must lie in [0, 1], got {low:.4g} .. {high:.4g}")


def validate_shared(name: str, pool: Pool, mode: str, feature_shape: tuple[int, ...], image_shape: tuple[int, ...],
                    num_classes: int) -> None:
    """The check that fits what sharing mode ``mode`` sends: images or φ1 features."""
    if shares_images(mode):
        validate_images(name, pool, image_shape, num_classes)
    else:
        validate_pool(name, pool, feature_shape, num_classes)


def _check(name: str, pool: Pool, shape: tuple[int, ...], num_classes: int, what: str, items: str,
           hint: str) -> None:
    f, y = pool.features, np.asarray(pool.labels)
    if tuple(f.shape[1:]) != tuple(shape):
        raise PoolError(f"pool {name}: {what} of shape {tuple(f.shape[1:])}, expected {tuple(shape)}{hint}")
    if f.dtype != torch.float32:
        raise PoolError(f"pool {name}: {what} are {f.dtype}, expected torch.float32")
    if len(f) != len(y) or len(f) == 0:
        raise PoolError(f"pool {name}: {len(f)} {items} but {len(y)} labels")
    if not torch.isfinite(f).all():
        raise PoolError(f"pool {name}: {int((~torch.isfinite(f)).sum())} non-finite {what} values")
    if y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= num_classes:
        raise PoolError(f"pool {name}: labels must be integers in [0, {num_classes}), got {y.dtype} "
                        f"in [{y.min()}, {y.max()}]")


def save_pool(pool: Pool, path: Path, meta: dict) -> None:
    """Features, labels and the settings digest that made them (so a mismatched φ1 is caught)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"features": pool.features, "labels": torch.as_tensor(pool.labels), "meta": meta}, path)


def load_pool(path: Path) -> tuple[Pool, dict]:
    if not path.is_file():
        raise PoolError(f"pool file {path} does not exist")
    try:
        d = torch.load(path, weights_only=True, map_location="cpu")
        return Pool(d["features"], d["labels"].numpy()), d["meta"]
    except (KeyError, RuntimeError, EOFError) as err:
        raise PoolError(f"pool file {path} is unreadable: {err}") from err
