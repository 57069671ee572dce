"""What an entity shares with the others in each sharing mode, and what a receiver learns from it.

Deep Poisoning shares poisoned features P_k(φ1(S_k)). Mapping Distortion Protection (the second
paper) shares images instead: each looks like another image of the shard but carries a target's
features and label; AugMDP(T) shares T such sets. Raw sharing, the images themselves, is the
no-privacy baseline. The Flower app and the Table 5 grid both go through :func:`contribute` and
:func:`received_pool`, so a mode means the same thing in both and one table can compare them.

The sender measures its own visual disclosure, because only it holds the real images: the mean
SSIM between what it shares and the real image that the shared item shows. For raw images that is
the image itself (1 by definition); for MDP the selected image x_s, which the modified image is
built to resemble; for DPM ψ's reconstruction of the poisoned features (the larger of SSIM(ψ, x)
and SSIM(1 − ψ, x), so that an inverted reconstruction does not pass for a hidden one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from entities.config import Config
from entities.entity import Entity, Pool
from entities.mdp import build_augmented_set, sets_folder, ssim_to
from entities.metrics import disclosure
from entities.pipeline import SharedModules
from entities.train import extract_features, to_float

DPM, MDP, AUGMDP, RAW = "dpm", "mdp", "augmdp", "raw"
SHARE_MODES = (DPM, MDP, AUGMDP, RAW)


def check_mode(mode: str) -> str:
    if mode not in SHARE_MODES:
        raise ValueError(f"unknown sharing mode {mode!r} (collab.share); valid: {', '.join(SHARE_MODES)}")
    return mode


def shares_images(mode: str) -> bool:
    """MDP, AugMDP and raw sharing send images; only DPM sends features."""
    return check_mode(mode) != DPM


def mode_name(mode: str, rounds: int) -> str:
    """The mode as tables name it."""
    return {DPM: "DPM pools", MDP: "MDP", AUGMDP: f"AugMDP({rounds})", RAW: "raw images"}[check_mode(mode)]


def describe(mode: str, sender: str, rounds: int) -> str:
    """How Table 5 names sender ``E2``'s contribution in this mode, e.g. P2(φ1(S2)) or MDP(S2)."""
    k = sender[1:]
    return {DPM: f"P{k}(φ1(S{k}))", MDP: f"MDP(S{k})", AUGMDP: f"AugMDP{rounds}(S{k})",
            RAW: f"S{k}"}[check_mode(mode)]


@dataclass
class Contribution:
    """What one entity sends: features (DPM) or images in [0, 1] (the other modes), with labels.

    ``disclosure`` is the sender's report of the mean SSIM between each shared item and the real
    image it shows (see the module docstring); ``label_disclosure`` the same against the real image
    whose label the item carries, which differs only for MDP (there, the target). ``shows`` and
    ``carries`` are those real images' rows in the sender's shard, item by item: the sender keeps
    them (they never travel), and an attack is scored against them.
    """

    mode: str
    data: torch.Tensor
    labels: np.ndarray
    disclosure: float
    label_disclosure: float
    shows: np.ndarray
    carries: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def contribute(entity: Entity, shared: SharedModules, cfg: Config, seed: int, mode: str | None = None
               ) -> Contribution:
    """The entity's contribution in ``mode`` (default ``cfg.collab.share``), built from its own shard.

    DPM trains (or loads) the entity's private DPM; MDP and AugMDP craft modified images with the
    shared Φ, resumable under the entity's private store (draw 0 of AugMDP is the MDP set, so
    building both costs T draws, not T + 1).
    """
    mode = check_mode(mode or cfg.collab.share)
    if mode == DPM:
        entity.train_dpm(shared, cfg, seed=seed)
        pool = entity.poisoned_pool()
        shown = disclosure(entity.pool_reconstruction(shared))
        rows = np.arange(len(pool))
        return Contribution(mode, pool.features, pool.labels, shown, shown, rows, rows)
    if mode == RAW:
        rows = np.arange(len(entity.labels))
        return Contribution(mode, to_float(entity.images), np.asarray(entity.labels), 1.0, 1.0, rows, rows)
    rounds = 1 if mode == MDP else cfg.mdp.rounds
    mset = build_augmented_set(shared.backbone, entity.images, entity.labels, cfg.mdp, seed=seed, rounds=rounds,
                               out_dir=entity.store.private(entity.name, sets_folder(cfg.mdp, seed)))
    return Contribution(mode, mset.images.float(), mset.labels, float(ssim_to(mset, entity.images).mean()),
                        float(ssim_to(mset, entity.images, "target").mean()), mset.selected_index,
                        mset.target_index)


def received_pool(data: torch.Tensor, labels: np.ndarray, mode: str, phi1: torch.nn.Module) -> Pool:
    """What a receiver trains its decider on: the features as sent, or φ1 of the images it got."""
    return Pool(extract_features(phi1, data) if shares_images(mode) else data, np.asarray(labels))
