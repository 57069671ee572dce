"""The threat model as types: what an attacker holds, what it attacks, and what an attacker family is.

The attacker is a collaborator (another entity). By Kerckhoffs's principle it holds everything
but the victim's DPM weights and images: whatever crosses the wire (φ1, φ2, ψ, every pool with its
labels), the public set Q, this code and the published DPM recipe (the settings), and its own
shard with labels and its own private DPM (:class:`Knowledge`). A :class:`Target` is one victim's
pool as it arrives. The victim's real images are in neither, so no attacker can read them; the
suite scores what an attacker returns against them afterwards.

Sharing modes under attack: those of :mod:`entities.sharing` (DeepObfuscator's shared obfuscator
is published, so its recipe is the real map; the label-only floors, whose pools should score at the
``prior`` attacker's figure), Table 3's stationary
perturbations in front of the DPM (``GN+dpm``, ``GF+dpm``, ``MF+dpm``: the sender perturbs φ1(x)
before its DPM), and ``clean``, unpoisoned φ1 features: the positive control, on which an attacker
that fails proves nothing about the defence.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from entities.config import Config
from entities.entity import Entity
from entities.files import save_torch
from entities.perturbations import PERTURBATIONS, build_perturbation
from entities.pipeline import SharedModules
from entities.sharing import AUGMDP, DPM, MDP, RAW, mode_name
from entities.sharing.class_stats import ClassStatsMode
from entities.sharing.obfuscator import ObfuscatorMode
from entities.sharing.prototypes import PrototypesMode

log = logging.getLogger("poisonpool")

CLEAN = "clean"
OBFUSCATOR = ObfuscatorMode.name
PERTURBED = tuple(f"{p}+{DPM}" for p in PERTURBATIONS)
FEATURE_MODES = (CLEAN, DPM, *PERTURBED, OBFUSCATOR)
IMAGE_MODES = (MDP, AUGMDP, RAW)
# The label-only floors: feature pools whose items depend on the sender's shard only through their class, so no
# map of φ1(x) describes them; the suite attacks what a receiver gets (the prototypes, the draws).
LABEL_ONLY_MODES = (PrototypesMode.name, ClassStatsMode.name)
ATTACK_MODES = (*FEATURE_MODES, *LABEL_ONLY_MODES, *IMAGE_MODES)
CONTROLS = (CLEAN, RAW)  # modes without any protection: every report has them


def check_attack_mode(mode: str) -> str:
    if mode not in ATTACK_MODES:
        raise ValueError(f"unknown sharing mode {mode!r} to attack; valid: {', '.join(ATTACK_MODES)}")
    return mode


def perturbation_of(mode: str) -> str | None:
    """``GN`` for ``GN+dpm``; None for the modes without a stationary perturbation."""
    return mode.split("+")[0] if check_attack_mode(mode) in PERTURBED else None


def uses_dpm(mode: str) -> bool:
    """Whether the sender's private DPM is part of what it shares in this mode."""
    return mode == DPM or perturbation_of(mode) is not None


def attack_mode_name(mode: str, rounds: int) -> str:
    """The mode as the report card names its column."""
    if mode == CLEAN:
        return "clean φ1 (control)"
    if mode == RAW:
        return "raw images (control)"
    pert = perturbation_of(mode)
    return f"{pert}+DPM" if pert else mode_name(mode, rounds)


def recipe(mode: str, dpm: nn.Module | None, seed: int = 0, obfuscator: nn.Module | None = None) -> nn.Module:
    """The published map from φ1(x) to the features a receiver gets in ``mode``, with ``dpm`` standing
    in for the sender's private one: perturbation then DPM, the DPM alone, or the identity (clean
    features, and φ1 of the shared image in the image modes). An attacker rebuilds it with DPMs of
    its own; only the victim can build it with the victim's DPM.

    ``seed`` seeds Gaussian noise: the victim's is Table 3's (0), an attacker draws its own noise,
    since knowing the recipe is not knowing the victim's random draws. ``obfuscator``: the one Step 1
    published, which every party holds, the whole map in the ``obfuscator`` mode.
    """
    if mode == OBFUSCATOR:
        if obfuscator is None:
            raise ValueError("sharing mode 'obfuscator' needs the published obfuscator (SharedModules.obfuscator)")
        return obfuscator
    if not uses_dpm(mode):
        return nn.Identity()
    if dpm is None:
        raise ValueError(f"sharing mode {mode!r} needs a DPM")
    pert = perturbation_of(mode)
    if pert is None:
        return dpm
    stationary = build_perturbation(pert)
    if hasattr(stationary, "seed"):
        stationary.seed = seed
    return nn.Sequential(stationary, dpm)


def recipe_tag(mode: str) -> str:
    """Modes whose recipe is the same map share what an attacker trains for them."""
    return mode if uses_dpm(mode) or mode == OBFUSCATOR else "identity"


@dataclass
class Target:
    """One victim's pool in one sharing mode, as every receiver gets it.

    ``features`` is what a receiver trains on: the pool's features, or φ1 of the shared images in
    the image modes (``images`` then holds the images themselves). ``rows`` are the items the suite
    scores; an attacker may look at the whole pool (the substitute attack fits its distribution).
    """

    victim: str
    mode: str
    features: torch.Tensor
    labels: np.ndarray
    rows: np.ndarray
    images: torch.Tensor | None = None


@dataclass
class Knowledge:
    """Everything the attacking collaborator holds, and the models it has trained so far.

    ``key`` digests every setting the attack depends on: a model stored under it is never served to
    a run with other settings. ``clean_key`` leaves out what the victims share
    (:data:`~entities.attacks.card.POOL_SECTIONS`), for models trained on clean public pairs only.
    Trained models go to the attacker's own private store.
    """

    cfg: Config
    shared: SharedModules
    public_images: np.ndarray
    public_features: torch.Tensor
    own: Entity
    key: str
    clean_key: str
    memo: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.cfg.attack.seed

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.public_images.shape[1:])

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return tuple(self.public_features.shape[1:])

    def model_path(self, tag: str, clean: bool = False) -> Path:
        return self.own.store.private(self.own.name, f"attack/{tag}-{self.clean_key if clean else self.key}.pt")

    def trained(self, tag: str, build: Callable[[], nn.Module], train: Callable[[nn.Module], object],
                clean: bool = False) -> nn.Module:
        """The model ``tag`` from this run, from the attacker's store, or built, trained and stored now;
        ``clean``: trained on clean public pairs only, so stored under :attr:`clean_key`.

        The initial weights are drawn from the attacker's seed and the model's tag, not from whatever the
        random state was when this model's turn came: a model trained in a task of its own, in any order,
        is the same, and no two models start from the same draw.
        """
        if tag in self.memo:
            return self.memo[tag]
        torch.manual_seed(self.seed * 2**32 + zlib.crc32(tag.encode()))
        model = build()
        path = self.model_path(tag, clean)
        if path.is_file():
            model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
        else:
            train(model)
            save_torch(model.state_dict(), path, private=True)
            log.info("attacker %s: trained %s", self.own.name, tag)
        model.eval()
        self.memo[tag] = model
        return model


@dataclass(frozen=True)
class Model:
    """A model several cells use, trained once as its own task before them (:mod:`entities.attacks.suite`).

    ``train`` builds it through :meth:`Knowledge.trained`, so it lands in the attacker's store and in
    ``Knowledge.memo`` under the tags the family's ``reconstruct`` looks up. ``tag`` names the task:
    cells naming the same tag share one. ``pool``: fitted to the victim's pool, so it needs the
    :class:`Target` (tags of such models name the victim and mode). ``after``: tags of models it
    starts from, trained first and handed to it.
    """

    tag: str
    train: Callable[[Knowledge, Target | None], object]
    pool: bool = False
    after: tuple[str, ...] = ()


def no_models(cfg: Config, victim: str, mode: str, name: str) -> list[Model]:
    return []


@dataclass(frozen=True)
class Family:
    """One family of attackers: its name (``--attacks``), the attackers it fields (report rows), how
    each turns a :class:`Target` into one image per scored item (None where it does not apply), and
    the models the attacker ``name`` needs against ``victim`` in ``mode``, which the suite trains
    once for every cell that names them."""

    name: str
    summary: str
    attackers: Callable[[Config], list[str]]
    reconstruct: Callable[[Knowledge, Target, str], torch.Tensor | None]
    models: Callable[[Config, str, str, str], list[Model]] = no_models
    # Rough cost of one cell against a cell that only scores a trained model's output. The suite submits the
    # costliest ready cells first, so that no long cell is left running alone on one core at the end.
    cost: float = 1.0
