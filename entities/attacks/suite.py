"""Run the attack suite: every asked-for attacker against every victim's pool in every asked-for mode.

The victims' side is the collaboration's own (Step 1, their private DPMs, their MDP sets, all from
the artefact store, or the DPM pools of a Flower run); the attacker's side is one collaborator's
:class:`~entities.attacks.base.Knowledge`. Each finished cell is stored at once
(:class:`~entities.attacks.card.CellStore`), so a killed run resumes with the next cell, and a
victim's mode whose cells are all stored is not even rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from entities.attacks import ATTACKS
from entities.attacks.base import (
    CLEAN,
    FEATURE_MODES,
    OBFUSCATOR,
    Knowledge,
    Target,
    check_attack_mode,
    recipe,
    uses_dpm,
)
from entities.attacks.card import NOT_APPLICABLE, POOL_SECTIONS, CellStore, cell_key, settings_key
from entities.attacks.scoring import score
from entities.config import Config
from entities.entity import Entity, Pool
from entities.pipeline import (
    ArtefactStore,
    SharedModules,
    cached_features,
    entity_names,
    entity_shards,
    load_task,
)
from entities.sharing import DPM, RAW, contribute, get_mode, step1
from entities.train import infer

log = logging.getLogger("poisonpool")

FIGURE_CANDIDATES = 16  # scored images whose reconstructions every cell keeps for the report's figure


@dataclass
class SuiteRun:
    """One invocation: every cell's record in order, which were computed or reused, and the victims'
    images the figure shows."""

    records: list[dict] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    figure_images: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0


def check_parties(cfg: Config) -> list[str]:
    """The victims, once the attacker and they are known entities and the attacker is not among them."""
    names = entity_names(cfg)
    a = cfg.attack
    unknown = [n for n in [a.attacker, *a.victims] if n not in names]
    if unknown:
        raise ValueError(f"attack.attacker / attack.victims name unknown entities {unknown}; valid: {', '.join(names)}")
    if a.attacker in a.victims:
        raise ValueError(f"attack.attacker {a.attacker} is also a victim: an entity holds its own images anyway")
    if not a.victims:
        raise ValueError("attack.victims is empty: name at least one entity to attack")
    return list(dict.fromkeys(a.victims))


def entity_seed(cfg: Config, name: str) -> int:
    """Each entity's seed as the Flower app gives it (data.seed + its index)."""
    return cfg.data.seed + entity_names(cfg).index(name)


def scored_rows(n: int, cfg: Config) -> np.ndarray:
    """The victim images the attack is scored on: ``attack.images`` of them, seeded, or all."""
    k = cfg.attack.images
    if not k or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(cfg.attack.seed).choice(n, k, replace=False))


def victim_target(victim: Entity, mode: str, shared: SharedModules, cfg: Config, rows: np.ndarray,
                  flower_pool: Pool | None) -> tuple[Target, dict[str, np.ndarray]]:
    """The victim's pool in ``mode`` as it arrives, and each scored item's real image(s) in its shard.

    MDP and AugMDP are crafted for the scored images only (PGD-100 per image is the costliest step
    of the suite), as the MDP set of a shard of those images; the other modes share the whole shard.
    """
    seed = entity_seed(cfg, victim.name)
    if mode in FEATURE_MODES:
        own = victim.featurize(shared).features
        if mode == CLEAN:
            features = own
        elif mode == DPM:
            features = flower_pool.features if flower_pool is not None else contribute(
                victim, shared, cfg, seed, DPM).data
        else:
            if uses_dpm(mode):
                victim.train_dpm(shared, cfg, seed)
            features = infer(recipe(mode, victim.dpm, obfuscator=shared.obfuscator), own)
        return Target(victim.name, mode, features, victim.labels, rows), {"shown": rows}
    if mode == RAW:
        sent = contribute(victim, shared, cfg, seed, RAW)
        return (Target(victim.name, mode, victim.featurize(shared).features, sent.labels, rows, sent.data),
                {"shown": rows})
    part = victim
    if len(rows) < len(victim.labels):
        tag = hashlib.sha1(rows.tobytes()).hexdigest()[:8]
        part = Entity(f"{victim.name}-scored-{tag}", victim.images[rows], victim.labels[rows], victim.store)
    sent = contribute(part, shared, cfg, seed, mode)
    features = get_mode(mode).training_pool(sent.pool(), shared.phi1).features
    return (Target(victim.name, mode, features, sent.labels, np.arange(len(sent)), sent.data),
            {"shown": rows[sent.shows], "label": rows[sent.carries]})


def attacker_knowledge(cfg: Config, split, shared: SharedModules, store: ArtefactStore,
                       shards: dict[str, np.ndarray]) -> Knowledge:
    """The collaborator's holdings: its shard and its private DPM (trained or loaded as in the
    collaboration), Q and its φ1 features, and the shared modules."""
    name = cfg.attack.attacker
    own = Entity(name, split.S.train_images[shards[name]], split.S.train_labels[shards[name]], store)
    own.featurize(shared)
    own.train_dpm(shared, cfg, entity_seed(cfg, name))
    public = cached_features(store, "Q-train", shared.phi1, split.Q.train_images)
    return Knowledge(cfg, shared, split.Q.train_images, public, own, settings_key(cfg),
                     settings_key(cfg, without=POOL_SECTIONS))


def with_obfuscator(shared: SharedModules, cfg: Config, split, store: ArtefactStore, modes: list[str]) -> SharedModules:
    """Step 1's modules with DeepObfuscator's published obfuscator when the suite attacks that mode: Step 1
    publishes it only when the collaboration shares in it, and every party (the attacker too) holds it."""
    if OBFUSCATOR in modes and shared.obfuscator is None:
        return get_mode(OBFUSCATOR).publish(cfg, split, store, shared)
    return shared


def _thumbnails(recon: torch.Tensor, truth: np.ndarray, candidates: np.ndarray) -> dict[str, torch.Tensor]:
    """For each candidate image, the first item that shows it (zeros and ``False`` where none does)."""
    images = torch.zeros(len(candidates), *recon.shape[1:], dtype=torch.float16)
    present = torch.zeros(len(candidates), dtype=torch.bool)
    for j, row in enumerate(candidates):
        hits = np.flatnonzero(truth == row)
        if len(hits):
            images[j] = recon[hits[0]].half()
            present[j] = True
    return {"images": images, "present": present}


def run_suite(cfg: Config, families: list[str], modes: list[str], store: CellStore,
              flower_pools: dict[str, Pool] | None = None, pool_source: str = "own") -> SuiteRun:
    """Compute every cell not yet stored for these settings, storing each as soon as it is scored."""
    t0 = time.time()
    victims = check_parties(cfg)
    unknown = [f for f in families if f not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; valid: {', '.join(ATTACKS)}")
    modes = [check_attack_mode(m) for m in modes]
    split = load_task(cfg)
    shards = entity_shards(cfg, split)
    art = ArtefactStore(cfg)
    names = [(f, name) for f in families for name in ATTACKS[f].attackers(cfg)]
    total = len(victims) * len(modes) * len(names)
    run = SuiteRun()
    shared: SharedModules | None = None
    know: Knowledge | None = None
    for victim_name in victims:
        images, labels = split.S.train_images[shards[victim_name]], split.S.train_labels[shards[victim_name]]
        rows = scored_rows(len(labels), cfg)
        candidates = rows[:FIGURE_CANDIDATES]
        run.figure_images[victim_name] = torch.as_tensor(images[candidates]).float() / 255.0
        victim = Entity(victim_name, images, labels, art)
        for mode in modes:
            cells = [(f, name, cell_key(cfg, name, victim_name, mode, pool_source)) for f, name in names]
            target = refs = None
            for family, name, key in cells:
                stored = store.get(key)
                if stored is not None:
                    run.records.append(stored)
                    run.reused.append(key)
                    continue
                if shared is None:
                    shared = with_obfuscator(step1(cfg, split, art), cfg, split, art, modes)
                if target is None:
                    pool = (flower_pools or {}).get(victim_name)
                    target, refs = victim_target(victim, mode, shared, cfg, rows, pool)
                if know is None:
                    know = attacker_knowledge(cfg, split, shared, art, shards)
                t1 = time.time()
                recon = ATTACKS[family].reconstruct(know, target, name)
                record = {"victim": victim_name, "mode": mode, "attacker": name, "family": family,
                          "attacked_by": cfg.attack.attacker, "shard": len(labels), "scored": len(rows)}
                if recon is None:
                    record |= {"status": NOT_APPLICABLE, "seconds": time.time() - t1}
                    run.records.append(store.put(key, record))
                else:
                    scores = score(recon, images, refs, cfg.attack.gallery, cfg.attack.seed)
                    record |= {"status": "ok", **scores, "seconds": time.time() - t1}
                    thumbs = _thumbnails(recon, refs[scores["reference"]], candidates)
                    run.records.append(store.put(key, record, thumbs))
                run.computed.append(key)
                done = len(run.computed) + len(run.reused)
                shown = (f"disclosure {record['disclosure']:.3f}, identified {record['identification']:.1%} "
                         f"(chance {record['chance']:.1%})" if recon is not None else "does not apply")
                log.info("[%d/%d] %s attacks %s, %s, %s: %s (%.0fs)", done, total, cfg.attack.attacker, victim_name,
                         mode, name, shown, record["seconds"])
    run.seconds = time.time() - t0
    log.info("attack suite: %d cells computed, %d reused, %.0fs", len(run.computed), len(run.reused), run.seconds)
    return run
