"""What an entity shares with the others in each sharing mode, and what a receiver learns from it.

Deep Poisoning shares poisoned features P_k(φ1(S_k)) (:mod:`entities.sharing.dpm`). Mapping
Distortion Protection (the second paper) shares images instead: each looks like another image of
the shard but carries a target's features and label; AugMDP(T) shares T such sets
(:mod:`entities.sharing.mdp`). Raw sharing, the images themselves, is the no-privacy baseline
(:mod:`entities.sharing.raw`). Two label-only floors, class prototypes and class statistics
(:mod:`entities.sharing.prototypes`, :mod:`entities.sharing.class_stats`), carry nothing per item
beyond its label: what a defence's pools teach is measured against them. Every mode implements
:class:`entities.sharing.base.SharingMode`: how it contributes, what its pools hold and how they
are checked and turned into training data.
The Flower app, the Table 5 grid, MDP's comparison and the attack suite all go through it, so a
mode means the same thing in each and one table can compare them.

Adding a mode is one module with a ``SharingMode`` subclass and one line in :data:`SHARING_MODES`.
"""

from __future__ import annotations

from entities.config import Config
from entities.data import TaskSplit
from entities.entity import Entity
from entities.pipeline import ArtefactStore, SharedModules, pretrained_backbone, shared_reconstructor
from entities.sharing.base import FEATURES, IMAGES, Contribution, SharingMode
from entities.sharing.class_stats import ClassStatsMode
from entities.sharing.dpm import DpmMode
from entities.sharing.mdp import AugMdpMode, MdpMode
from entities.sharing.obfuscator import ObfuscatorMode
from entities.sharing.prototypes import PrototypesMode
from entities.sharing.raw import RawMode

SHARING_MODES: dict[str, SharingMode] = {mode.name: mode for mode in (
    DpmMode(),
    MdpMode(),
    AugMdpMode(),
    RawMode(),
    ObfuscatorMode(),
    PrototypesMode(),
    ClassStatsMode(),
)}
DPM, MDP, AUGMDP, RAW = DpmMode.name, MdpMode.name, AugMdpMode.name, RawMode.name

__all__ = ["AUGMDP", "DPM", "FEATURES", "IMAGES", "MDP", "RAW", "SHARING_MODES", "Contribution",
           "SharingMode", "check_mode", "contribute", "get_mode", "mode_name", "step1"]


def get_mode(name: str) -> SharingMode:
    """The registered mode called ``name``; an unknown one stops with the list of valid ones."""
    if name not in SHARING_MODES:
        raise ValueError(f"unknown sharing mode {name!r} (collab.share); valid: {', '.join(SHARING_MODES)}")
    return SHARING_MODES[name]


def check_mode(name: str) -> str:
    """``name`` if it is a registered mode (see :func:`get_mode`)."""
    return get_mode(name).name


def mode_name(name: str, rounds: int) -> str:
    """The mode as tables name it."""
    return get_mode(name).title(rounds)


def contribute(entity: Entity, shared: SharedModules, cfg: Config, seed: int, mode: str | None = None
               ) -> Contribution:
    """The entity's contribution in ``mode`` (default ``cfg.collab.share``), built from its own shard."""
    return get_mode(mode or cfg.collab.share).contribute(entity, shared, cfg, seed)


def step1(cfg: Config, split: TaskSplit, store: ArtefactStore) -> SharedModules:
    """Pretrain (or load) Φ, split it at the hook point, train (or load) ψ, and whatever else the
    sharing mode has Step 1's party publish (:meth:`entities.sharing.base.SharingMode.publish`)."""
    model = pretrained_backbone(cfg, split, store)
    phi1, phi2 = model.split(cfg.backbone.hook)
    psi = shared_reconstructor(cfg, split, store, phi1)
    return get_mode(cfg.collab.share).publish(cfg, split, store, SharedModules(model, phi1, phi2, psi))
