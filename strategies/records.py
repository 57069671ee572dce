"""How the collaboration's objects travel as Flower records.

Only two kinds of payload ever cross between an entity and the server: the shared modules φ1, φ2
and ψ of Step 1 (one ``ArrayRecord`` whose keys are prefixed ``phi1.``, ``phi2.`` and ``psi.``) and
feature pools (an ``ArrayRecord`` with exactly ``features`` and ``labels``). Keeping the codec in
one module makes that list easy to audit: a DPM or an image has no encoding here.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from entities.backbone import build_backbone
from entities.config import Config
from entities.entity import Pool
from entities.pipeline import SharedModules
from entities.reconstructors import build_reconstructor

SHARED_PARTS = ("phi1", "phi2", "psi")
POOL_KEYS = ("features", "labels")


def pack_shared(shared: SharedModules) -> ArrayRecord:
    """φ1, φ2 and ψ weights in one record, keys prefixed by the part they belong to."""
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for part in SHARED_PARTS:
        for key, value in getattr(shared, part).state_dict().items():
            state[f"{part}.{key}"] = value
    return ArrayRecord(state)


def unpack_shared(record: ArrayRecord, cfg: Config, image_shape: tuple[int, int, int]) -> SharedModules:
    """Rebuild the shared modules from their weights; the architecture comes from the settings.

    A record made with other settings (another backbone, hook point or reconstructor) fails
    here with PyTorch's missing/unexpected-keys message instead of training on garbage.
    """
    state = record.to_torch_state_dict()
    parts = {p: OrderedDict((k[len(p) + 1:], v) for k, v in state.items() if k.startswith(f"{p}."))
             for p in SHARED_PARTS}
    unknown = [k for k in state if k.split(".", 1)[0] not in SHARED_PARTS]
    if unknown:
        raise ValueError(f"shared-module record has keys outside {SHARED_PARTS}: {unknown[:5]}")
    backbone = build_backbone(cfg.backbone.name, len(cfg.data.task_classes), image_shape[0])
    phi1, phi2 = backbone.split(cfg.backbone.hook)
    phi1.load_state_dict(parts["phi1"])
    phi2.load_state_dict(parts["phi2"])
    backbone.eval()
    with torch.no_grad():
        feature_shape = tuple(phi1(torch.zeros(1, *image_shape)).shape[1:])
    psi = build_reconstructor(cfg.reconstructor.name, feature_shape, image_shape)
    psi.load_state_dict(parts["psi"])
    psi.eval()
    return SharedModules(backbone, phi1, phi2, psi)


def pack_pool(pool: Pool) -> ArrayRecord:
    """Features as float32 and labels as int64, nothing else."""
    return ArrayRecord({
        "features": Array(pool.features.detach().cpu().contiguous().numpy()),
        "labels": Array(np.asarray(pool.labels, dtype=np.int64)),
    })


def unpack_pool(record: ArrayRecord) -> Pool:
    """The pool in a record, as sent (dtype and shape are checked by ``validate_pool``, not here)."""
    if set(record) != set(POOL_KEYS):
        raise ValueError(f"a pool record holds exactly {POOL_KEYS}, got {sorted(record)}")
    return Pool(torch.from_numpy(record["features"].numpy()), record["labels"].numpy())
