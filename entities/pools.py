"""Shared feature pools: the checks every receiver runs, and their on-disk form.

A pool is what crosses between entities: poisoned features P_k(φ1(S_k)) and their labels. The
Flower strategy and the Table 5 grid both refuse a pool that fails :func:`validate_pool`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from entities.entity import Pool


class PoolError(ValueError):
    """A pool is malformed; the message names the pool and what is wrong."""


def validate_pool(name: str, pool: Pool, feature_shape: tuple[int, ...], num_classes: int) -> None:
    """Shape, dtype, finite values, label range and matching lengths, or a PoolError."""
    f, y = pool.features, np.asarray(pool.labels)
    if tuple(f.shape[1:]) != tuple(feature_shape):
        raise PoolError(f"pool {name}: features of shape {tuple(f.shape[1:])}, expected {tuple(feature_shape)} "
                        f"(made with another φ1 or hook point?)")
    if f.dtype != torch.float32:
        raise PoolError(f"pool {name}: features are {f.dtype}, expected torch.float32")
    if len(f) != len(y) or len(f) == 0:
        raise PoolError(f"pool {name}: {len(f)} feature maps but {len(y)} labels")
    if not torch.isfinite(f).all():
        raise PoolError(f"pool {name}: {int((~torch.isfinite(f)).sum())} non-finite feature values")
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
        d = torch.load(path, weights_only=True)
        return Pool(d["features"], d["labels"].numpy()), d["meta"]
    except (KeyError, RuntimeError, EOFError) as err:
        raise PoolError(f"pool file {path} is unreadable: {err}") from err
