"""Shared pools: the checks every receiver runs, and their on-disk form.

A pool is what crosses between entities with its labels: poisoned features P_k(φ1(S_k)) in the
DPM sharing mode, images in [0, 1] in the MDP, AugMDP and raw modes (``Pool.features`` then holds
the images; see :mod:`entities.sharing`). The Flower strategy and its entities refuse a pool
that fails :func:`validate_shared`; the Table 5 grid, which reuses DPM pools, :func:`validate_pool`.

A pool may come from a hostile participant, so finite is not enough: a pool of 1e30 values sends
every honest decider to NaN. Feature values are bounded by ``collab.feature_bound`` times the largest
|φ1 feature| (:func:`feature_scale`, which the pretrainer publishes and each receiver measures on its
own shard); labels must be one integer per item; a pool holds at most ``max_items`` items (what its
sender declared, and the configured cap ``collab.max_pool``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from entities.entity import Pool
from entities.files import save_torch
from entities.sharing import shares_images


class PoolError(ValueError):
    """A pool is malformed; the message names the pool and what is wrong."""


def feature_scale(features: torch.Tensor) -> float:
    """The largest |φ1 feature| in a set of features: the scale against which pools are bounded."""
    return float(features.abs().max()) if len(features) else 0.0


def validate_pool(name: str, pool: Pool, feature_shape: tuple[int, ...], num_classes: int,
                  max_items: int | None = None, bound: float | None = None) -> None:
    """Shape, dtype, finite values within ``bound``, label shape and range, matching lengths and at
    most ``max_items`` items, or a PoolError."""
    _check(name, pool, feature_shape, num_classes, "features", "feature maps", " (made with another φ1 or hook point?)",
           max_items)
    if bound is not None:
        top = float(pool.features.abs().max())
        if top > bound:
            raise PoolError(f"pool {name}: feature values up to {top:.4g} in magnitude, above the bound {bound:.4g} "
                            f"(collab.feature_bound times the largest |φ1 feature| of honest data)")


def validate_images(name: str, pool: Pool, image_shape: tuple[int, ...], num_classes: int,
                    max_items: int | None = None) -> None:
    """The checks of :func:`validate_pool` for a pool of images, and pixel values in [0, 1].

    The range matters beyond tidiness: receivers feed the images to φ1, which was trained on
    [0, 1] inputs, and an out-of-range pool would train the decider on features φ1 never produces.
    """
    _check(name, pool, image_shape, num_classes, "images", "images", "", max_items)
    low, high = pool.features.min().item(), pool.features.max().item()
    if low < 0 or high > 1:
        raise PoolError(f"pool {name}: pixel values must lie in [0, 1], got {low:.4g} .. {high:.4g}")


def validate_shared(name: str, pool: Pool, mode: str, feature_shape: tuple[int, ...], image_shape: tuple[int, ...],
                    num_classes: int, max_items: int | None = None, bound: float | None = None) -> None:
    """The check that fits what sharing mode ``mode`` sends: images or φ1 features."""
    if shares_images(mode):
        validate_images(name, pool, image_shape, num_classes, max_items)
    else:
        validate_pool(name, pool, feature_shape, num_classes, max_items, bound)


def _check(name: str, pool: Pool, shape: tuple[int, ...], num_classes: int, what: str, items: str,
           hint: str, max_items: int | None) -> None:
    f, y = pool.features, np.asarray(pool.labels)
    if not isinstance(f, torch.Tensor) or f.ndim != len(shape) + 1 or tuple(f.shape[1:]) != tuple(shape):
        got = tuple(f.shape[1:]) if hasattr(f, "shape") else type(f).__name__
        raise PoolError(f"pool {name}: {what} of shape {got}, expected {tuple(shape)}{hint}")
    if f.dtype != torch.float32:
        raise PoolError(f"pool {name}: {what} are {f.dtype}, expected torch.float32")
    if y.ndim != 1:
        raise PoolError(f"pool {name}: labels of shape {y.shape}, expected one label per item ({len(f)},)")
    if len(f) != len(y) or len(f) == 0:
        raise PoolError(f"pool {name}: {len(f)} {items} but {len(y)} labels")
    if max_items is not None and len(f) > max_items:
        raise PoolError(f"pool {name}: {len(f)} {items}, more than the {max_items} allowed (what the sender "
                        f"declared, at most collab.max_pool)")
    if not torch.isfinite(f).all():
        raise PoolError(f"pool {name}: {int((~torch.isfinite(f)).sum())} non-finite {what} values")
    if y.dtype.kind not in "iu":
        raise PoolError(f"pool {name}: labels must be integers in [0, {num_classes}), got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= num_classes:
        raise PoolError(f"pool {name}: labels must be integers in [0, {num_classes}), got {y.dtype} "
                        f"in [{y.min()}, {y.max()}]")


def save_pool(pool: Pool, path: Path, meta: dict) -> None:
    """Features, labels and the settings digest that made them (so a mismatched φ1 is caught), written whole."""
    save_torch({"features": pool.features, "labels": torch.as_tensor(pool.labels), "meta": meta}, path)


def load_pool(path: Path) -> tuple[Pool, dict]:
    if not path.is_file():
        raise PoolError(f"pool file {path} does not exist")
    try:
        d = torch.load(path, weights_only=True, map_location="cpu")
        return Pool(d["features"], d["labels"].numpy()), d["meta"]
    except (KeyError, RuntimeError, EOFError, TypeError, AttributeError) as err:
        raise PoolError(f"pool file {path} is unreadable: {err}") from err
