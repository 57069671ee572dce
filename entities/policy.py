"""What an entity agrees to disclose, decided by its own operator and never by whoever submits a run.

An entity's policy comes from its SuperNode: the node config (``flower-supernode --node-config``) and
an optional policy file it names (``policy=/etc/poisonpool/policy.toml``, else ``$POISONPOOL_POLICY`` in
the SuperNode's environment), keys in the node config winning. It says which sharing modes the entity
allows (default ``dpm`` only: a run config asking for ``raw`` images is refused, not obeyed), where its
data and its private store are (so a run config cannot point the entity's private DPMs at a folder of
the submitter's choosing), and its disclosure ceiling: the most SSIM between what it sends and its real
images that it accepts. It also says what the entity accepts: with ``screen-margin`` set, it keeps a
sender's pool only if its labels agree with the shared decider about as often as the others' do
(:mod:`entities.screening`), so a collaborator that lies in its labels is left out by each receiver; with
``screen-repair`` it keeps what passes of such a pool (relabelled, its failing classes split by φ2 between
them and the classes it lacks, or without the classes that fail).
A run whose decider is refined on several views of each image (``decider.views``) makes each entity share
one poisoned item per view: ``max-views`` (default 1) is the most it accepts.

Before sending a DPM pool the entity measures it with the strongest attack it can run locally: ψ
from the server, and a decoder (:mod:`entities.attacks.decoder`, the attack suite's) trained on half
of its own (pool, image) pairs and scored on the other half. Pairs are what no attacker holds, so this
decoder bounds what one could learn, and a weak or forged ψ cannot make a pool look safe. In the image
modes the disclosure is exact (the SSIM of the shared images themselves). Above the ceiling it refuses.
The default ceiling, 1, only measures and reports: at test scale that decoder recovers SSIM 0.69 from
pools that ψ scores at 0.02-0.13, so any real ceiling is its operator's decision to make.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from entities.attacks.decoder import train_decoder  # the attack suite's decoder, not a second one
from entities.config import AttackConfig
from entities.decoders import build_decoder
from entities.entity import Entity
from entities.metrics import disclosure, reconstruction_scores
from entities.sharing import DPM, FEATURES, SHARING_MODES, Contribution, get_mode
from entities.train import infer, to_float

POLICY_KEYS = {"allow-share": "allow", "data-root": "data_root", "private-store": "store",
               "disclosure-ceiling": "ceiling", "attack-epochs": "attack_epochs", "attack-pairs": "attack_pairs",
               "screen-margin": "screen_margin", "screen-repair": "screen_repair", "max-views": "max_views"}


class PolicyRefusal(RuntimeError):
    """The entity's policy forbids what the run asks; the message says which rule and what was asked."""


@dataclass(frozen=True)
class EntityPolicy:
    """One entity's rules (see the module docstring); ``source`` says where they were read."""

    allow: tuple[str, ...] = (DPM,)
    data_root: str = ""  # empty: $POISONPOOL_DATA, then ../shared/data
    store: str = ""  # empty: $POISONPOOL_STORE, then results/ in the SuperNode's working directory
    ceiling: float = 1.0  # the most disclosure SSIM the entity accepts to send (1: measure and report only)
    attack_epochs: int = 20  # the local decoder's training budget
    attack_pairs: int = 2000  # at most this many (pool, image) pairs train it
    # Receiving: refuse a sender's pool whose labels agree with φ2 more than this many nats below the median in
    # some class (entities/screening.py); None keeps every pool that passes the shape checks.
    screen_margin: float | None = None
    # With screening: keep what passes of a pool it would refuse, its labels relabelled where they are a permutation
    # of what φ2 sees, else its failing classes split by φ2 between them and the classes it lacks, else without the
    # classes that fail (entities/screening.py).
    screen_repair: bool = False
    # Sending: the most views of each image (itself and augmented copies, decider.views) it contributes on.
    # Each view is one more poisoned item of the same image, so more for an attacker to combine: 1 unless allowed.
    max_views: int = 1
    source: str = "defaults"

    def store_root(self) -> Path:
        return Path(self.store or os.environ.get("POISONPOOL_STORE") or Path.cwd() / "results")

    def check_mode(self, entity: str, mode: str) -> None:
        if mode not in self.allow:
            raise PolicyRefusal(f"{entity} refuses sharing mode {mode!r}: its policy ({self.source}) allows only "
                                f"{', '.join(self.allow)}; nothing was sent")

    def check_views(self, entity: str, views: int) -> None:
        if views > self.max_views:
            raise PolicyRefusal(f"{entity} refuses to share {views} views of each image (decider.views): its policy "
                                f"({self.source}) allows at most max-views = {self.max_views}; nothing was sent")

    def check_disclosure(self, entity: str, mode: str, measured: dict[str, float]) -> None:
        worst = max(measured, key=measured.get)
        if measured[worst] > self.ceiling:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in measured.items())
            raise PolicyRefusal(f"{entity} refuses to send its {mode} pool: measured disclosure SSIM "
                                f"{measured[worst]:.3f} ({worst}) is above its ceiling {self.ceiling:g} "
                                f"(policy {self.source}; {shown}); nothing was sent")


def _value(key: str, value: Any, where: str) -> Any:
    """A policy value as its field's type; errors name the key and where it was read."""
    field = POLICY_KEYS[key]
    try:
        if field == "allow":
            modes = tuple(value) if isinstance(value, list) else tuple(m for m in str(value).replace(",", " ").split())
            bad = [m for m in modes if m not in SHARING_MODES]
            if bad or not modes:
                raise ValueError(f"unknown sharing mode(s) {bad}; valid: {', '.join(SHARING_MODES)}")
            return modes
        if field == "ceiling":
            if isinstance(value, bool):
                raise ValueError("expected a number")
            ceiling = float(value)
            if not 0 <= ceiling <= 1:
                raise ValueError("must lie in [0, 1]")
            return ceiling
        if field == "screen_margin":
            if isinstance(value, bool):
                raise ValueError("expected a number of nats")
            margin = float(value)
            if not 0 <= margin < float("inf"):
                raise ValueError("must be a finite number of nats, at least 0")
            return margin
        if field == "screen_repair":
            if not isinstance(value, bool) and str(value).lower() not in ("true", "false"):
                raise ValueError("expected true or false")
            return value if isinstance(value, bool) else str(value).lower() == "true"
        if field in ("attack_epochs", "attack_pairs", "max_views"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            number = int(value)
            if number < 1:
                raise ValueError("must be >= 1")
            return number
        return str(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"entity policy {key} = {value!r} ({where}): {err}") from None


def load_policy(node_config: Mapping[str, Any]) -> EntityPolicy:
    """The policy of this SuperNode: defaults, then the file named by ``policy`` (or, where the node config
    cannot say, as for simulated SuperNodes, by ``$POISONPOOL_POLICY``), then node-config keys."""
    values: dict[str, Any] = {}
    sources = []
    if file := node_config.get("policy") or os.environ.get("POISONPOOL_POLICY"):
        path = Path(str(file)).expanduser()
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"entity policy file {path} is unreadable: {err}") from err
        unknown = sorted(set(raw) - set(POLICY_KEYS))
        if unknown:
            raise ValueError(f"entity policy file {path}: unknown key(s) {unknown}; known: {sorted(POLICY_KEYS)}")
        values |= {POLICY_KEYS[k]: _value(k, v, str(path)) for k, v in raw.items()}
        sources.append(str(path))
    given = {k: v for k, v in node_config.items() if k in POLICY_KEYS}
    values |= {POLICY_KEYS[k]: _value(k, v, "node config") for k, v in given.items()}
    if given:
        sources.append("node config " + ", ".join(sorted(given)))
    return dataclasses.replace(EntityPolicy(**values), source="; ".join(sources) or "defaults")


def local_disclosure(entity: Entity, sent: Contribution, policy: EntityPolicy, attack_cfg: AttackConfig,
                     seed: int) -> dict[str, float]:
    """What the entity's pool discloses by its own measure: the figure it reports for the mode
    (``sent.disclosure``: ψ's for DPM, exact for images) and, for feature pools (DPM), a decoder trained
    on half of its own (pool item, the image it shows) pairs and scored on the other half."""
    mode = get_mode(sent.mode)
    features = mode.sends == FEATURES
    measured = {"psi" if features else "images": float(sent.disclosure)}
    if not features or len(sent) < 4:
        return measured
    data = mode.training_pool(sent.pool(), phi1=None).features  # what a receiver gets (class-stats: its draws)
    rng = np.random.default_rng(seed)
    rows = rng.permutation(len(sent))[: 2 * policy.attack_pairs]
    fit, score = np.sort(rows[: len(rows) // 2]), np.sort(rows[len(rows) // 2:])
    decoder = build_decoder(tuple(data.shape[1:]), tuple(entity.images.shape[1:]))
    # At least four steps an epoch, so a small shard still gets a trained decoder.
    budget = dataclasses.replace(attack_cfg, epochs=policy.attack_epochs,
                                 batch_size=min(attack_cfg.batch_size, max(8, len(fit) // 4)))
    shown = entity.images[sent.shows]
    train_decoder(decoder, data[fit], shown[fit], budget, seed, f"{entity.name} local disclosure decoder")
    scores = reconstruction_scores(infer(decoder, data[score]), to_float(shown[score]))
    measured["decoder on own pairs"] = disclosure({k: float(v.mean()) for k, v in scores.items()})
    return measured
