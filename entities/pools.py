"""Pools: what crosses between entities, the checks every receiver runs, and their on-disk form.

A :class:`Pool` is items with their labels: what one sharing mode sends (poisoned features
P_k(φ1(S_k)) in the DPM mode, images in [0, 1] in the MDP, AugMDP and raw modes) and what a decider
trains on (φ1 features). One type serves both, so nothing is converted on the way; what a pool holds
is said by the mode that made it, never guessed from the pool: a mode of :mod:`entities.sharing`
checks its pools with :func:`validate_features` or :func:`validate_images` and turns a received pool
into φ1 features (:meth:`entities.sharing.base.SharingMode.training_pool`), so images never pass for
features.

A pool may come from a hostile participant, so finite is not enough: a pool of 1e30 values sends
every honest decider to NaN. Feature values are bounded by ``collab.feature_bound`` times the largest
|φ1 feature| (:func:`feature_scale`, which the pretrainer publishes and each receiver measures on its
own shard); labels must be one integer per item; a pool holds at most ``max_items`` items (what its
sender declared, and the configured cap ``collab.max_pool``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from entities.files import save_torch


class PoolError(ValueError):
    """A pool is malformed; the message names the pool and what is wrong."""


@dataclass
class Pool:
    """``data`` (φ1 features, poisoned or not, or images in [0, 1], as its mode says) with one label each."""

    data: torch.Tensor
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def features(self) -> torch.Tensor:
        """``data``, named for what a decider trains on: a pool in φ1's space (an entity's own features,
        a training pool), where the name says which side of φ1 the tensor is on."""
        return self.data

    @staticmethod
    def union(pools: list[Pool]) -> Pool:
        return Pool(torch.cat([p.data for p in pools]), np.concatenate([p.labels for p in pools]))


@dataclass(frozen=True)
class PoolSpec:
    """What a receiver checks a pool against. ``image_shape`` matters to image modes only, ``bound``
    (the most |feature| allowed; None: no bound) to feature modes only."""

    feature_shape: tuple[int, ...]
    num_classes: int
    image_shape: tuple[int, ...] = ()
    max_items: int | None = None
    bound: float | None = None


def feature_scale(features: torch.Tensor) -> float:
    """The largest |φ1 feature| in a set of features: the scale against which pools are bounded."""
    return float(features.abs().max()) if len(features) else 0.0


def validate_features(name: str, pool: Pool, spec: PoolSpec) -> None:
    """Shape, dtype, finite values within ``spec.bound``, label shape and range, matching lengths and
    at most ``spec.max_items`` items, or a PoolError."""
    _check(name, pool, spec.feature_shape, spec, "features", "feature maps", " (made with another φ1 or hook point?)")
    if spec.bound is not None:
        top = float(pool.data.abs().max())
        if top > spec.bound:
            raise PoolError(f"pool {name}: feature values up to {top:.4g} in magnitude, above the bound "
                            f"{spec.bound:.4g} (collab.feature_bound times the largest |φ1 feature| of honest data)")


def validate_images(name: str, pool: Pool, spec: PoolSpec) -> None:
    """The checks of :func:`validate_features` for a pool of images, and pixel values in [0, 1].

    The range matters beyond tidiness: receivers feed the images to φ1, which was trained on
    [0, 1] inputs, and an out-of-range pool would train the decider on features φ1 never produces.
    """
    _check(name, pool, spec.image_shape, spec, "images", "images", "")
    low, high = pool.data.min().item(), pool.data.max().item()
    if low < 0 or high > 1:
        raise PoolError(f"pool {name}: pixel values must lie in [0, 1], got {low:.4g} .. {high:.4g}")


def _check(name: str, pool: Pool, shape: tuple[int, ...], spec: PoolSpec, what: str, items: str,
           hint: str) -> None:
    f, y = pool.data, np.asarray(pool.labels)
    num_classes, max_items = spec.num_classes, spec.max_items
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
    """The pool's data, labels and the settings digest that made them (so a mismatched φ1 is caught),
    written whole. The data stay under the key ``features`` whatever the mode, so pools stored by
    earlier releases load unchanged; ``meta["share"]`` says what they hold."""
    save_torch({"features": pool.data, "labels": torch.as_tensor(pool.labels), "meta": meta}, path)


def load_pool(path: Path) -> tuple[Pool, dict]:
    if not path.is_file():
        raise PoolError(f"pool file {path} does not exist")
    try:
        d = torch.load(path, weights_only=True, map_location="cpu")
        return Pool(d["features"], d["labels"].numpy()), d["meta"]
    except (KeyError, RuntimeError, EOFError, TypeError, AttributeError) as err:
        raise PoolError(f"pool file {path} is unreadable: {err}") from err
