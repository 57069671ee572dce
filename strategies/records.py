"""How the collaboration's objects travel as Flower records.

Only two kinds of payload ever cross between an entity and the server: the shared modules φ1, φ2
and ψ of Step 1 (one ``ArrayRecord`` whose keys are prefixed ``phi1.``, ``phi2.`` and ``psi.``) and
pools, whose content depends on the sharing mode (``collab.share``, :mod:`entities.sharing`):

an ``ArrayRecord`` with exactly two arrays, named by what the mode sends
(:attr:`entities.sharing.base.SharingMode.sends`) and ``labels`` (int64):

- ``dpm``: ``features`` (poisoned features P_k(φ1(S_k)), float32). No image crosses in this mode.
- ``mdp``, ``augmdp``, ``raw``: ``images`` (float32 N x C x H x W in [0, 1]). These modes share
  images by design: MDP's modified images, which look like real images of the sender's shard, or
  the real images themselves (raw, the no-privacy baseline).

In step 3 the pools a receiver gets from the other entities travel as one such record, their union, with
a ``ConfigRecord`` of who sent which items (:func:`pack_senders`): names and item counts, in the order
of the union, so a receiver can judge each sender's pool on its own (:mod:`entities.screening`).

Keeping the codec in one module makes that list easy to audit: a DPM has no encoding here, and
the key names say which kind of pool crossed.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from entities.backbone import build_backbone
from entities.config import Config
from entities.pipeline import SharedModules
from entities.pools import Pool
from entities.reconstructors import build_reconstructor
from entities.sharing import get_mode
from entities.sharing.obfuscator import ObfuscatorMode, build_obfuscator

SHARED_PARTS = ("phi1", "phi2", "psi")
OBFUSCATOR_PART = "obfuscator"  # the shared DeepObfuscator, only in the ``obfuscator`` sharing mode


def pool_keys(mode: str) -> tuple[str, str]:
    """The two arrays of a pool record in this sharing mode: what is shared, and its labels."""
    return (get_mode(mode).sends, "labels")


def pack_shared(shared: SharedModules) -> ArrayRecord:
    """φ1, φ2 and ψ weights (and the obfuscator's, where Step 1 published one) in one record, keys
    prefixed by the part they belong to."""
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for part in SHARED_PARTS + ((OBFUSCATOR_PART,) if shared.obfuscator is not None else ()):
        for key, value in getattr(shared, part).state_dict().items():
            state[f"{part}.{key}"] = value.detach().cpu().contiguous()  # a GPU's or channels_last weights
    return ArrayRecord(state)


def unpack_shared(record: ArrayRecord, cfg: Config, image_shape: tuple[int, int, int]) -> SharedModules:
    """Rebuild the shared modules from their weights; the architecture comes from the settings.

    A record made with other settings (another backbone, hook point or reconstructor) fails
    here with PyTorch's missing/unexpected-keys message instead of training on garbage.
    """
    state = record.to_torch_state_dict()
    obfuscated = cfg.collab.share == ObfuscatorMode.name
    expected = SHARED_PARTS + ((OBFUSCATOR_PART,) if obfuscated else ())
    parts = {p: OrderedDict((k[len(p) + 1:], v) for k, v in state.items() if k.startswith(f"{p}."))
             for p in expected}
    unknown = [k for k in state if k.split(".", 1)[0] not in expected]
    if unknown:
        raise ValueError(f"shared-module record has keys outside {expected} (collab.share = {cfg.collab.share}): "
                         f"{unknown[:5]}")
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
    obfuscator = None
    if obfuscated:
        obfuscator = build_obfuscator(cfg, feature_shape[0])
        obfuscator.load_state_dict(parts[OBFUSCATOR_PART])  # absent: PyTorch names the missing keys
        obfuscator.eval()
    return SharedModules(backbone, phi1, phi2, psi, obfuscator)


def pack_pool(pool: Pool, mode: str) -> ArrayRecord:
    """Features (dpm) or images (other modes) as float32 and labels as int64, nothing else."""
    data, labels = pool_keys(mode)
    return ArrayRecord({
        data: Array(pool.data.detach().cpu().contiguous().numpy()),
        labels: Array(np.asarray(pool.labels, dtype=np.int64)),
    })


def unpack_pool(record: ArrayRecord, mode: str) -> Pool:
    """The pool in a record, as sent (dtype, shape and range are checked by ``entities.pools``, not here)."""
    keys = pool_keys(mode)
    if set(record) != set(keys):
        raise ValueError(f"a pool record in sharing mode {mode!r} holds exactly {keys}, got {sorted(record)}")
    return Pool(torch.from_numpy(record[keys[0]].numpy()), record[keys[1]].numpy())


def pack_senders(pools: dict[str, Pool]) -> ConfigRecord:
    """Who sent which items of the union of ``pools`` (in their order): names and item counts."""
    return ConfigRecord({"names": list(pools), "items": [len(p) for p in pools.values()]})


def unpack_senders(pool: Pool, record: ConfigRecord) -> dict[str, Pool]:
    """The union ``pool`` cut back into each sender's pool; counts that do not add up are refused."""
    names, items = [str(n) for n in record["names"]], [int(i) for i in record["items"]]
    bad = len(names) != len(items) or len(set(names)) != len(names) or min(items, default=1) < 1
    if bad or sum(items) != len(pool):
        raise ValueError(f"the senders record ({dict(zip(names, items))}) does not describe a pool of "
                         f"{len(pool)} items")
    bounds = np.cumsum([0, *items])
    return {n: Pool(pool.data[a:b], np.asarray(pool.labels)[a:b])
            for n, a, b in zip(names, bounds[:-1], bounds[1:])}
