"""What a sharing mode is: the one interface every mode implements.

A mode answers, for the Flower app, the Table 5 grid, MDP's comparison and the attack suite alike:
what an entity contributes (:meth:`SharingMode.contribute`), what its pools hold on the wire
(:attr:`SharingMode.sends`, which is also their record key), how a receiver checks one
(:meth:`SharingMode.validate`) and what a receiver trains on (:meth:`SharingMode.training_pool`).
Two families share those answers: :class:`FeatureMode` (pools of φ1-shaped features, bounded in
magnitude, trained on as they are) and :class:`ImageMode` (pools of images in [0, 1], which every
receiver passes through φ1: the one place where that happens).

The sender measures its own visual disclosure, because only it holds the real images: the mean
SSIM between what it shares and the real image that the shared item shows (see each mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from entities.config import Config
from entities.data import TaskSplit
from entities.entity import Entity
from entities.pipeline import ArtefactStore, SharedModules
from entities.pools import Pool, PoolSpec, validate_features, validate_images
from entities.train import extract_features

FEATURES, IMAGES = "features", "images"


@dataclass
class Contribution:
    """What one entity sends: its mode's data (features or images in [0, 1]) with labels.

    ``disclosure`` is the sender's report of the mean SSIM between each shared item and the real
    image it shows; ``label_disclosure`` the same against the real image whose label the item
    carries, which differs only for MDP (there, the target). ``shows`` and ``carries`` are those
    real images' rows in the sender's shard, item by item: the sender keeps them (they never
    travel), and an attack is scored against them.
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

    def pool(self) -> Pool:
        """The part that travels."""
        return Pool(self.data, np.asarray(self.labels))


class SharingMode:
    """One way for entities to share; subclasses set the class attributes and :meth:`contribute`."""

    name: ClassVar[str]
    sends: ClassVar[str]  # FEATURES or IMAGES: what a pool holds, and the key it travels under
    disclosure_by: ClassVar[str]  # what the reported disclosure_ssim measures, as the summaries say it

    def title(self, rounds: int) -> str:
        """The mode as tables name it (``rounds``: AugMDP's T)."""
        raise NotImplementedError

    def explain(self, cfg: Config) -> str:
        """What the entities share, as one clause of a table's notes ("Entities share ...")."""
        raise NotImplementedError

    def shared_text(self, sender: str, rounds: int) -> str:
        """What sender ``E2`` shares, as Table 5 writes it, e.g. P2(φ1(S2)) or MDP(S2)."""
        raise NotImplementedError

    def received_text(self, sender: str, rounds: int) -> str:
        """What a receiver trains on from sender ``E2``: :meth:`shared_text` as it enters φ2."""
        raise NotImplementedError

    def contribute(self, entity: Entity, shared: SharedModules, cfg: Config, seed: int) -> Contribution:
        """The entity's contribution, built from its own shard."""
        raise NotImplementedError

    def publish(self, cfg: Config, split: TaskSplit, store: ArtefactStore, shared: SharedModules) -> SharedModules:
        """What Step 1's party hands every entity in this mode: φ1, φ2 and ψ by default; a mode whose
        entities share one more module (DeepObfuscator's obfuscator) trains and adds it here."""
        return shared

    def key_settings(self, settings: dict) -> dict:
        """The sections of ``cfg.key_dict()`` a contribution depends on beyond Step 1 (part of its key)."""
        return {}

    def items_per_image(self, cfg: Config) -> int:
        """Items a sender may share per image of its shard (AugMDP(T) shares T)."""
        return 1

    def metrics(self, entity: Entity, shared: SharedModules, test_features: torch.Tensor,
                test_labels: np.ndarray) -> dict[str, float]:
        """Mode-specific figures a sender reports beside its disclosure (none by default)."""
        return {}

    def curves(self, entity: Entity, shared: SharedModules, cfg: Config, seed: int) -> dict[str, list[dict]]:
        """Training curves of what the contribution trained, by name (none by default)."""
        return {}

    def validate(self, name: str, pool: Pool, spec: PoolSpec) -> None:
        """Refuse a malformed pool with a PoolError naming ``name``."""
        raise NotImplementedError

    def training_pool(self, pool: Pool, phi1: torch.nn.Module) -> Pool:
        """The φ1-space features and labels a receiver's decider trains on."""
        raise NotImplementedError


class FeatureMode(SharingMode):
    """Pools of features shaped like φ1's output, bounded in magnitude and trained on as sent."""

    sends = FEATURES

    def received_text(self, sender: str, rounds: int) -> str:
        return self.shared_text(sender, rounds)

    def validate(self, name: str, pool: Pool, spec: PoolSpec) -> None:
        validate_features(name, pool, spec)

    def training_pool(self, pool: Pool, phi1: torch.nn.Module) -> Pool:
        return pool


class ImageMode(SharingMode):
    """Pools of images in [0, 1]; a receiver featurizes them with φ1 before training its decider."""

    sends = IMAGES
    disclosure_by = "the shared image"

    def received_text(self, sender: str, rounds: int) -> str:
        return f"φ1({self.shared_text(sender, rounds)})"

    def validate(self, name: str, pool: Pool, spec: PoolSpec) -> None:
        validate_images(name, pool, spec)

    def training_pool(self, pool: Pool, phi1: torch.nn.Module) -> Pool:
        return Pool(extract_features(phi1, pool.data), np.asarray(pool.labels))
