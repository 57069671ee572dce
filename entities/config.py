"""Run settings as dataclasses, built from a dict of sections and checked for range and choice.

Every setting is declared once here, with its default; a preset (``configs/<preset>.toml``) or a
``--set section.key=value`` override can only name a setting declared here, in the type declared here.
Loading a preset by name, and checking the names that live in registries (sharing modes, defences), is
:mod:`entities.presets`: it sits above those registries, which themselves build on these dataclasses,
so this module imports none of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entities.backbone import BACKBONES
from entities.files import artefact_key
from entities.reconstructors import RECONSTRUCTORS
from entities.runtime import DEVICES, PRECISIONS, key_part


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    data_root: str = ""  # empty: $POISONPOOL_DATA, then ../shared/data
    allow_download: bool = False  # torchvision's CIFAR-10 download, for connected machines only
    task_classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    public_classes: list[int] = field(default_factory=lambda: [5, 6, 7, 8, 9])
    max_task_train: int = 0  # cap on |S| train images (0 = all), for CPU-scale runs
    max_public_train: int = 0  # cap on |Q| train images
    public_holdout: int = 0  # > 0: Q is this many training images held out of S's own classes (no public classes)
    max_test: int = 0  # cap on the common held-out test split of S
    shard_fractions: list[float] = field(default_factory=lambda: [0.1, 0.1, 0.1, 0.01])
    partition: str = "iid"  # or "dirichlet"
    alpha: float = 0.5  # Dirichlet concentration for non-IID shards
    seed: int = 0


@dataclass
class BackboneConfig:
    name: str = "resnet20"
    hook: str = "conv4_1"
    pretrain_on: str = "S"  # "S" (Tables 1-2) or an entity id like "E1" (the collaboration)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    augment: bool = True


@dataclass
class DeciderConfig(TrainConfig):
    """Step 3's recipe: refining Φ's φ2 on φ1 features (own and shared) for ``epochs``.

    ``views``: each image enters as itself and ``views`` − 1 augmented copies (random crop and flip):
    a receiver featurizes augmented views of its own images, and a sender shares its contribution made
    on each view of its shard (its private DPM is the one trained on the shard itself). Features are
    cached, so without views the decider sees each image once per epoch exactly as it was, while the
    raw-image rows train with augmentation; views close that gap.
    """

    epochs: int = 15
    lr: float = 0.05
    augment: bool = False
    views: int = 1


@dataclass
class ReconstructorConfig:
    name: str = "px2s2"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3


DPM_INITS = ("random", "identity")
DPM_UTILITIES = ("labels", "distill")
DPM_BOTTLENECKS = ("none", "spatial", "logits")


@dataclass
class DPMConfig:
    blocks: int = 4
    init: str = "random"  # or "identity": P starts as the identity map (see entities/dpm.py)
    lam: float = 1.0  # weight of the privacy terms beside the utility term
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    # The objective (entities/defences/, entities/dpm.py). privacy: terms of the registry, summed: "psi" is the
    # paper's ψ, "decoder" a decoder retrained on the entity's own current pairs, "dcor" distance correlation.
    # utility: "labels" (cross-entropy, the paper) or "distill" (match φ2's logits on the original features).
    privacy: list[str] = field(default_factory=lambda: ["psi"])
    utility: str = "labels"
    bottleneck: str = "none"  # or "spatial" / "logits": what P's output can carry at most (entities/dpm.py)
    adversary_steps: int = 1  # "decoder": its optimiser steps per DPM step
    adversary_lr: float = 1e-3
    atoms: int = 0  # the logits bottleneck's learned atoms (0: one per class, K); more atoms carry more per item
    anonymity: int = 1  # k: each shared item the mean of k same-class items' P(φ1(x)) (1: the item itself)

    def __post_init__(self) -> None:
        if self.init not in DPM_INITS:  # before Step 1, not after minutes of pretraining
            raise ValueError(f"unknown dpm.init {self.init!r}; valid: {', '.join(DPM_INITS)}")


@dataclass
class Table5Config:
    """The Table 5 grid's own budget: raw-image rows train full backbones, the costly part on a CPU."""

    all_epochs: int = 3  # row 5 (all of S); rows 1-4 use [pretrain], the recipe E1 pretrained Φ with
    fedavg_rounds: int = 5  # the extra FedAvg row: rounds x local epochs ≈ [decider] epochs
    fedavg_local_epochs: int = 3


@dataclass
class MDPConfig:
    """Mapping Distortion Protection (entities/mdp.py): PGD settings and the AugMDP size T.

    Under ℓ∞ step size and ε are in 8-bit intensity levels (1/255 of the [0, 1] range), under ℓ2
    they are ℓ2 lengths in the [0, 1] range; see entities/mdp.py for why the paper's "step size 0.1"
    is read that way and what the authors' code does.
    """

    steps: int = 100  # PGD iterations: the paper uses 100 for CIFAR-10 and 40 for faces
    step_size: float = 0.1  # step per iteration (ℓ∞: 8-bit levels; ℓ2: length in [0, 1] units)
    norm: str = "linf"  # "linf" (the paper's text) or "l2" (the authors' released code)
    p: float = 2.0  # norm of the feature distance ||f(x_m) - f(x_t)||_p
    layer: str = "penultimate"  # "penultimate", "logits" or a hook point such as "conv4_1"
    epsilon: float = 0.0  # ball around x_s in the units of step_size; 0 = no projection (the paper)
    rounds: int = 2  # T of AugMDP(T)
    batch_size: int = 128
    image_size: int = 0  # resize images to this many pixels (0 = the loader's size), for CPU scale
    transfer: list[str] = field(default_factory=list)  # Table 2: backbones trained on the MDP set
    crafter: str = "D"  # the images f is trained on: "D" (the set protected) or "all" ([crafter] section)
    readings: list[str] = field(default_factory=list)  # `reproduce` under each of these norms (empty: `norm`)


@dataclass
class CrafterConfig(TrainConfig):
    """The recipe of MDP's crafting model f when ``mdp.crafter = "all"``: trained on every training
    image of the task classes, not only on D, because MDP transfers what f has learned and a model
    that has seen 2,000 images has little to transfer. Stored once per data set and recipe, whatever
    D is, so every later run and subset reuses it."""

    epochs: int = 60
    images: int = 0  # a seeded subset of that many of those images (0 = all of them), for small-scale tests


@dataclass
class CollabConfig:
    """How the entities collaborate (Flower app and Table 5 grid alike)."""

    share: str = "dpm"  # what each entity shares: dpm, mdp, augmdp or raw (see entities/sharing/)
    # Hostile pools (entities/pools.py): the most items one pool may hold, beside what its entity declared,
    # and how many times the largest |φ1 feature| the pretrainer published a pool value may reach.
    max_pool: int = 100_000
    feature_bound: float = 10.0


@dataclass
class AttackConfig:
    """The attack suite (``python -m sim.attack``, :mod:`entities.attacks`): who attacks whom, on how many
    of the victim's images it is scored, and the attackers' own training budget.

    The victims' side (Step 1, DPMs, MDP) keeps its own settings: an attack never changes the defence.
    """

    attacker: str = "E2"  # the collaborator that attacks: it holds its own shard and its own private DPM
    victims: list[str] = field(default_factory=lambda: ["E1", "E4"])
    images: int = 300  # victim images scored per victim (0 = its whole shard); MDP/AugMDP are crafted for these
    gallery: int = 100  # identification: the true image among this many images of the victim's shard
    seed: int = 1  # the attacker's seed, other than data.seed, so its px2s2 is not a copy of ψ
    epochs: int = 8  # every decoder the attacker trains (decoder, transfer, dpm-agnostic)
    batch_size: int = 128
    lr: float = 1e-3
    ssim_weight: float = 1.0  # decoder loss L1 + ssim_weight * (1 - SSIM)
    max_pairs: int = 2500  # cap on the (features, image) pairs one attacker model trains on, for CPU scale
    agnostic_lams: list[float] = field(default_factory=lambda: [0.5, 2.0])  # dpm-agnostic: one extra DPM each,
    agnostic_inits: list[str] = field(default_factory=lambda: ["identity", "random"])  # with these inits
    substitute_epochs: int = 2  # substitute: epochs of the class-conditional alignment and of the decoder
    mmd_weight: float = 10.0  # substitute: weight of the MMD term beside φ2's cross-entropy


@dataclass
class Table4Config:
    """Table 4 and Figure 7 (DeepObfuscator against private DPMs on CelebA faces): their own data and budget.

    CelebA-10k's train split (8,000 faces) is cut into the public set Q and the shards of E1 (the victim,
    whose held-out faces are scored) and E2 (the collaborator who attacks); Φ and the shared obfuscator
    are trained on all three, ψ and the attackers' models on the parts their owner holds.
    """

    image_size: int = 32  # faces centre-cropped and resized to this many pixels (CPU scale)
    utility_attributes: int = 20  # the first k of the 40 attributes are the task, the rest are private
    public_images: int = 2000  # |Q|
    entity_images: int = 3000  # |S1| = |S2|
    test_images: int = 2000  # E1's held-out faces every column is scored on (0 = the whole test split)
    obfuscator_blocks: int = 2  # residual blocks of the obfuscator (a DPM-shaped module)
    obfuscator_init: str = "random"  # or "identity" (see entities/obfuscator.py)
    obfuscator_epochs: int = 6
    obfuscator_lr: float = 1e-3
    privacy_weight: float = 1.0  # α: the obfuscator's pull of the privacy classifier towards chance
    reconstruction_weight: float = 1.0  # β: the obfuscator's SSIM term against its adversarial reconstructor
    attacker_epochs: int = 6  # the fresh privacy classifier and the collaborators' decoders


@dataclass
class Config:
    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    reconstructor: ReconstructorConfig = field(default_factory=ReconstructorConfig)
    dpm: DPMConfig = field(default_factory=DPMConfig)
    decider: DeciderConfig = field(default_factory=DeciderConfig)
    mdp: MDPConfig = field(default_factory=MDPConfig)
    table5: Table5Config = field(default_factory=Table5Config)
    collab: CollabConfig = field(default_factory=CollabConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    table4: Table4Config = field(default_factory=Table4Config)
    crafter: CrafterConfig = field(default_factory=CrafterConfig)
    results_root: str = ""  # empty: results/ in the current directory
    threads: int = 0  # torch threads per process (0 = torch's default)
    device: str = "auto"  # auto (CUDA when present), cpu or cuda: see entities/runtime.py
    precision: str = "auto"  # auto (bf16 where the hardware runs it fast), bf16 or fp32

    def __post_init__(self) -> None:
        for key, value, valid in (("device", self.device, DEVICES), ("precision", self.precision, PRECISIONS)):
            if value not in valid:
                raise ValueError(f"unknown {key} {value!r}; valid: {', '.join(valid)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` for artefact keys: settings added after artefacts were first stored are left
        out while they hold the value that reproduces the earlier behaviour (:data:`KEY_NEUTRAL`), so
        those stores keep their keys; any other value is in the key. A section added later
        (:data:`NEW_SECTIONS`) is left out whole while every value in it is its default."""
        d = self.to_dict()
        for section, neutral in KEY_NEUTRAL.items():
            d[section] = {k: v for k, v in d[section].items() if neutral.get(k, _ABSENT) != v}
        for section, default in NEW_SECTIONS.items():
            kept = {k: v for k, v in d[section].items() if dataclasses.asdict(default())[k] != v}
            if kept:
                d[section] = kept
            else:
                del d[section]
        return d

    def digest(self, *sections: str) -> str:
        """A short hash of some sections: the key under which their artefacts are stored."""
        d = self.key_dict()
        picked = {s: d[s] for s in sections if s in d} if sections else d  # a new section at its defaults is absent
        picked |= key_part(self.device, self.precision)  # bf16 trains other weights than fp32
        return artefact_key(picked)

    def results_dir(self) -> Path:
        """``results_root``, else ``results/`` in the current directory (never inside the installed package)."""
        return Path(self.results_root) if self.results_root else Path.cwd() / "results"


_ABSENT = object()
# The paper's DPM objective: these values train exactly the DPM that was trained before the settings existed.
# Sections added after artefacts were first stored (Table 4's faces, DeepObfuscator's recipe): at their defaults
# they shape nothing the earlier commands stored.
NEW_SECTIONS: dict[str, type] = {"table4": Table4Config, "crafter": CrafterConfig}
KEY_NEUTRAL: dict[str, dict[str, Any]] = {
    "dpm": {"privacy": ["psi"], "utility": "labels", "bottleneck": "none", "adversary_steps": 1, "adversary_lr": 1e-3,
            "atoms": 0, "anonymity": 1},
    "mdp": {"crafter": "D", "readings": []},  # f trained on D under the one configured norm, as before
    "decider": {"views": 1},  # each image once, as it is
    "data": {"public_holdout": 0},  # Q of other classes
}


def _kind(annotation: str) -> tuple[type, type | None]:
    """``int``, ``float``, ``bool``, ``str`` or ``list`` (with its element type) from a field's annotation."""
    base = {"int": int, "float": float, "bool": bool, "str": str}
    if annotation.startswith("list["):
        return list, base[annotation[5:-1]]
    return base[annotation], None


def _typed(value: Any, kind: type, key: str) -> Any:
    """``value`` as ``kind``: an override string parsed, a TOML value checked; never a silent cast."""
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return text.lower() in ("true", "1")
            value = json.loads(text) if kind is list else kind(text)
        except ValueError:
            raise ValueError(f"setting {key}: expected {names[kind]}, got {value!r}") from None
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok or (kind is float and not math.isfinite(value)):
        raise ValueError(f"setting {key}: expected {names[kind]}, got {value!r} ({type(value).__name__})")
    return value


def _coerce(value: Any, annotation: str, key: str) -> Any:
    """An override string or a TOML value as the type the field declares; errors name the key."""
    kind, item = _kind(annotation)
    value = _typed(value, kind, key)
    if item is not None:
        value = [_typed(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def _build(cls, values: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)} in [{where}]; known: {sorted(known)}")
    kwargs = {}
    default = cls()
    for k, v in values.items():
        key = f"{where}.{k}" if where else k
        current = getattr(default, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ValueError(f"setting {key} is a section ([{key}]), not a value: got {v!r}")
            kwargs[k] = _build(type(current), v, key)
        else:
            kwargs[k] = _coerce(v, known[k].type, key)
    return cls(**kwargs)


# Ranges, by field name wherever it appears (so a new section's epochs are checked too), then by key.
_BY_NAME: dict[str, tuple[str, float]] = {"batch_size": (">=", 1), "lr": (">", 0), "lam": (">=", 0),
                                           "weight_decay": (">=", 0), "threads": (">=", 0), "seed": (">=", 0)}
_BY_KEY: dict[str, tuple[str, float]] = {
    "data.alpha": (">", 0), "data.max_task_train": (">=", 0), "data.max_public_train": (">=", 0),
    "data.max_test": (">=", 0), "dpm.blocks": (">=", 1), "mdp.steps": (">=", 0), "mdp.step_size": (">", 0),
    "mdp.p": (">", 0), "mdp.epsilon": (">=", 0), "mdp.rounds": (">=", 1), "mdp.image_size": (">=", 0),
    "table5.fedavg_rounds": (">=", 1), "dpm.adversary_steps": (">=", 1), "dpm.adversary_lr": (">", 0),
    "data.public_holdout": (">=", 0), "decider.views": (">=", 1), "dpm.atoms": (">=", 0), "dpm.anonymity": (">=", 1),
    "table4.image_size": (">=", 16), "table4.utility_attributes": (">=", 1), "table4.public_images": (">=", 1),
    "table4.entity_images": (">=", 1), "table4.test_images": (">=", 0), "table4.obfuscator_blocks": (">=", 1),
    "table4.privacy_weight": (">=", 0), "table4.reconstruction_weight": (">=", 0),
    "collab.max_pool": (">=", 1), "collab.feature_bound": (">", 0),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "data.partition": ("iid", "dirichlet"), "dpm.init": DPM_INITS, "dpm.utility": DPM_UTILITIES,
    "dpm.bottleneck": DPM_BOTTLENECKS,    "mdp.norm": ("linf", "l2"),
    "mdp.crafter": ("D", "all"),
    "device": DEVICES, "precision": PRECISIONS, "table4.obfuscator_init": DPM_INITS,
    "backbone.name": tuple(BACKBONES), "reconstructor.name": tuple(RECONSTRUCTORS),
}


def _range_error(key: str, value: Any) -> str | None:
    name = key.rsplit(".", 1)[-1]
    rule = _BY_KEY.get(key) or _BY_NAME.get(name) or ((">=", 0) if name.endswith("epochs") else None)
    if rule is None or isinstance(value, (str, list)):
        return None
    op, bound = rule
    if (op == ">=" and value >= bound) or (op == ">" and value > bound):
        return None
    return f"setting {key} = {value!r} is out of range: it must be {op} {bound:g}"


def validate(cfg: Config) -> Config:
    """Every setting's range and choices, each error naming its key: before any work is done."""
    def walk(obj, where: str):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{where}.{f.name}" if where else f.name
            if dataclasses.is_dataclass(value):
                yield from walk(value, key)
            else:
                yield key, value

    for key, value in walk(cfg, ""):
        if err := _range_error(key, value):
            raise ValueError(err)
        choices = _CHOICES.get(key)
        if choices and value not in choices:
            raise ValueError(f"setting {key} = {value!r} is not one of: {', '.join(choices)}")
    if bad := [r for r in cfg.mdp.readings if r not in _CHOICES["mdp.norm"]] or len(set(cfg.mdp.readings)) < len(
            cfg.mdp.readings):
        raise ValueError(f"setting mdp.readings = {cfg.mdp.readings}: each norm once, from: linf, l2 (got {bad})")
    d = cfg.data
    if not d.shard_fractions or any(not 0 < f <= 1 for f in d.shard_fractions) or sum(d.shard_fractions) > 1:
        raise ValueError(f"setting data.shard_fractions = {d.shard_fractions}: each must lie in (0, 1] and "
                         f"their sum in (0, 1]")
    who = cfg.backbone.pretrain_on
    if who != "S" and not (who.startswith("E") and who[1:].isdigit() and 1 <= int(who[1:]) <= len(d.shard_fractions)):
        raise ValueError(f"setting backbone.pretrain_on = {who!r}: use 'S' or one of "
                         f"{', '.join(f'E{i + 1}' for i in range(len(d.shard_fractions)))}")
    return cfg


def build(raw: dict[str, Any]) -> Config:
    """The settings of ``raw`` (sections of values, as a preset's TOML holds them), typed and checked
    (:func:`validate`); what is not named keeps its default."""
    return validate(_build(Config, raw, ""))


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["dpm.lam=0.5", ...]`` from the command line into an overrides dict."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        k, v = item.split("=", 1)
        if not k.strip():
            raise ValueError(f"override {item!r} names no setting")
        out[k.strip()] = v.strip()
    return out
