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
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from entities import runtime
from entities.attacks import ATTACKS
from entities.attacks.base import (
    CLEAN,
    FEATURE_MODES,
    LABEL_ONLY_MODES,
    OBFUSCATOR,
    Knowledge,
    Model,
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
from entities.sharing import AUGMDP, DPM, MDP, RAW, contribute, get_mode, step1
from entities.tasks import Sequential
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
    if mode in LABEL_ONLY_MODES:
        sent = contribute(victim, shared, cfg, seed, mode)
        features = get_mode(mode).training_pool(sent.pool(), shared.phi1).features
        return Target(victim.name, mode, features, sent.labels, rows), {"shown": rows}
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


@dataclass(frozen=True)
class Cell:
    """One cell of the card: ``attacker`` (of ``family``) against ``victim``'s pool in ``mode``, under ``key``."""

    victim: str
    mode: str
    family: str
    attacker: str
    key: str


def plan_cells(cfg: Config, families: list[str], modes: list[str], pool_source: str = "own") -> list[Cell]:
    """Every cell of the report, in the card's order (victim, mode, attacker); nothing is loaded or built."""
    victims = check_parties(cfg)
    unknown = [f for f in families if f not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; valid: {', '.join(ATTACKS)}")
    modes = [check_attack_mode(m) for m in modes]
    names = [(f, name) for f in families for name in ATTACKS[f].attackers(cfg)]
    return [Cell(v, m, f, name, cell_key(cfg, name, v, m, pool_source)) for v in victims for m in modes
            for f, name in names]


_configured: tuple | None = None


def _task_runtime(cfg: Config, threads: int) -> None:
    """Configure this process's runtime once (a Ray worker runs many tasks; the driver already has one)."""
    global _configured
    want = (cfg.device, cfg.precision, threads)
    if _configured != want:
        runtime.configure(cfg, threads)
        _configured = want


def _build_target(cfg: Config, shared: SharedModules, victim: Entity, mode: str, rows: np.ndarray,
                  flower_pool: Pool | None, threads: int = 0) -> tuple[Target, dict[str, np.ndarray], float]:
    """Task: the victim's pool in ``mode`` (:func:`victim_target`) and how long it took."""
    _task_runtime(cfg, threads)
    t0 = time.time()
    return (*victim_target(victim, mode, shared, cfg, rows, flower_pool), time.time() - t0)


def _train_model(model: Model, know: Knowledge, pool: tuple | None, *after: tuple[dict, float],
                 threads: int = 0) -> tuple[dict[str, nn.Module], float]:
    """Task: train (or load from the attacker's store) one shared model, starting from the ``after``
    models it names (``pool``: what :func:`_build_target` returned, for a model fitted to the pool);
    returns every model it added to the memo, on the CPU, and its seconds."""
    _task_runtime(know.cfg, threads)
    target = pool[0] if pool is not None else None
    for models, _ in after:
        know.memo.update(models)
    before = set(know.memo)
    t0 = time.time()
    model.train(know, target)
    return {tag: m.cpu() for tag, m in know.memo.items() if tag not in before}, time.time() - t0


def _attack_cell(cell: Cell, know: Knowledge, pool: tuple, images: np.ndarray, candidates: np.ndarray,
                 *models: tuple[dict, float], threads: int = 0) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Task: one cell's reconstruction of the pool (what :func:`_build_target` returned), scored, with
    its figure thumbnails (None where it does not apply)."""
    _task_runtime(know.cfg, threads)
    target, refs, _ = pool
    for trained, _ in models:
        know.memo.update(trained)
    t0 = time.time()
    recon = ATTACKS[cell.family].reconstruct(know, target, cell.attacker)
    record = {"victim": cell.victim, "mode": cell.mode, "attacker": cell.attacker, "family": cell.family,
              "attacked_by": know.cfg.attack.attacker, "shard": len(images), "scored": len(refs["shown"])}
    if recon is None:
        return record | {"status": NOT_APPLICABLE, "seconds": time.time() - t0}, None
    scores = score(recon, images, refs, know.cfg.attack.gallery, know.cfg.attack.seed)
    thumbs = _thumbnails(recon, refs[scores["reference"]], candidates)
    return record | {"status": "ok", **scores, "seconds": time.time() - t0}, thumbs


@dataclass
class _Job:
    """A task the driver waits on: a pool (``target``), a shared model or a cell."""

    kind: str
    label: str
    what: object  # (victim, mode), a Model, or a Cell


def run_suite(cfg: Config, families: list[str], modes: list[str], store: CellStore,
              flower_pools: dict[str, Pool] | None = None, pool_source: str = "own", executor=None) -> SuiteRun:
    """Compute every cell not yet stored for these settings, each as a task of ``executor`` (default:
    in this process), storing each here, on the driver, as soon as it is scored.

    The tasks: each victim's pool per mode with missing cells (AugMDP after MDP, whose set is its
    first draw; at most ``executor.slots + 1`` pools held at once), each model the missing cells
    share (:class:`~entities.attacks.base.Model`: trained once, then passed to every cell naming
    it), and the cells, each submitted once its pool and models are done. Step 1, the attacker's
    knowledge and the victims' DPMs are made here first, so no two tasks train the same artefact.
    """
    t0 = time.time()
    executor = executor or Sequential(cfg.threads)
    modes = [check_attack_mode(m) for m in modes]
    cells = plan_cells(cfg, families, modes, pool_source)
    split = load_task(cfg)
    shards = entity_shards(cfg, split)
    run = SuiteRun()
    found: dict[str, dict] = {}
    todo = []
    for cell in cells:
        stored = store.get(cell.key)
        if stored is None:
            todo.append(cell)
        else:
            found[cell.key] = stored
            run.reused.append(cell.key)
    victims = list(dict.fromkeys(c.victim for c in cells))
    rows = {v: scored_rows(len(shards[v]), cfg) for v in victims}
    for v in victims:
        run.figure_images[v] = torch.as_tensor(split.S.train_images[shards[v][rows[v][:FIGURE_CANDIDATES]]]
                                               ).float() / 255.0
    log.info("attack suite: %d cells to compute, %d already stored in %s", len(todo), len(run.reused), store.dir)
    twins = raw_twins(cells, todo)
    computed = [c for c in todo if c.key not in twins]
    if computed:
        _compute(cfg, split, shards, rows, computed, flower_pools or {}, modes, executor, store, found, run,
                 len(cells))
    copied = 0
    for c in todo:
        if c.key in twins and twins[c.key] in found:
            twin = found[twins[c.key]]
            found[c.key] = store.put(c.key, {**twin, "mode": RAW, "seconds": 0.0}, store.thumbnails(twin["key"]))
            run.computed.append(c.key)
            copied += 1
    if copied:
        log.info("attack suite: %d raw-image cells copied from their clean twins", copied)
    lost = [c for c in todo if c.key not in found]
    if lost:
        raise SuiteError(f"{len(lost)} of {len(todo)} cells failed; the {len(run.computed)} finished are stored in "
                         f"{store.dir}, a rerun computes only the rest")
    run.records = [found[c.key] for c in cells if c.key in found]
    run.seconds = time.time() - t0
    log.info("attack suite: %d cells computed, %d reused, %.0fs", len(run.computed), len(run.reused), run.seconds)
    return run


def raw_twins(cells: list[Cell], todo: list[Cell]) -> dict[str, str]:
    """Raw-image cells whose figures are the clean control's: every attacker but ``image`` reads a raw
    pool through φ1 of the very images, rows and labels of the clean control (the recipe of both is the
    identity), so it returns the same reconstruction. Missing cell's key -> its clean twin's key."""
    key_of = {(c.victim, c.mode, c.attacker): c.key for c in cells}
    return {c.key: key_of[(c.victim, CLEAN, c.attacker)] for c in todo
            if c.mode == RAW and c.family != "image" and (c.victim, CLEAN, c.attacker) in key_of}


def _compute(cfg: Config, split, shards: dict[str, np.ndarray], rows: dict[str, np.ndarray], todo: list[Cell],
             flower_pools: dict[str, Pool], modes: list[str], executor, store: CellStore, found: dict[str, dict],
             run: SuiteRun, total: int) -> None:
    """The driver of :func:`run_suite`: submits each task once what it needs is done, stores each cell."""
    t0 = time.time()
    art = ArtefactStore(cfg)
    shared = with_obfuscator(step1(cfg, split, art), cfg, split, art, modes)
    know = attacker_knowledge(cfg, split, shared, art, shards)
    victims: dict[str, Entity] = {}
    for name in dict.fromkeys(c.victim for c in todo):
        victims[name] = Entity(name, split.S.train_images[shards[name]], split.S.train_labels[shards[name]], art)
        victims[name].featurize(shared)
        if any(uses_dpm(c.mode) for c in todo if c.victim == name):
            victims[name].train_dpm(shared, cfg, entity_seed(cfg, name))  # once, before the pools that use it
    refs_of = {"know": executor.put(know), "shared": executor.put(shared)}
    for name, victim in victims.items():
        refs_of[f"victim:{name}"] = executor.put(victim)
        refs_of[f"images:{name}"] = executor.put(victim.images)

    needs = {c.key: ATTACKS[c.family].models(cfg, c.victim, c.mode, c.attacker) for c in todo}
    models = {m.tag: m for ms in needs.values() for m in ms}
    users = {tag: sum(tag in {m.tag for m in ms} for ms in needs.values()) for tag in models}
    # A model's priority is that of the costliest cell waiting for it (see Family.cost).
    unblocks = {tag: max(ATTACKS[c.family].cost for c in todo if tag in {m.tag for m in needs[c.key]})
                for tag in models}
    pools = list(dict.fromkeys((c.victim, c.mode) for c in todo))
    pool_of = {m.tag: (c.victim, c.mode) for c in todo for m in needs[c.key] if m.pool}
    cells_of = {p: [c for c in todo if (c.victim, c.mode) == p] for p in pools}
    pool_cost = {p: max(ATTACKS[c.family].cost for c in cells_of[p]) for p in pools}
    done: dict[str, object] = {}  # label -> what later tasks take (executor.ref)
    seconds: dict[str, float] = {}
    pending: dict[object, _Job] = {}
    submitted: set[str] = set()
    failed: dict[str, str] = {}  # label -> why
    open_pools: set[tuple[str, str]] = set()
    built: set[str] = set()  # pools built, whether still held or already let go
    bar = tqdm(total=len(todo), desc="attack cells", unit="cell", disable=None)

    def submit(job: _Job, fn, *args) -> None:
        submitted.add(job.what.key if job.kind == "cell" else job.label)
        pending[executor.submit(job.label, fn, *args)] = job

    def pool_label(p: tuple[str, str]) -> str:
        return f"pool {p[0]} {p[1]}"

    def schedule() -> None:
        """Submit the tasks whose inputs are now done, costliest first, only as many as run at once: a task
        queued early would run before a costlier one that became ready later, and the longest cells would be
        left for the end, each alone on a core (priority: the costliest cell a task unblocks)."""
        ready: list[tuple[float, Callable[[], None]]] = []
        for p in pools:
            label = pool_label(p)
            victim, mode = p
            if label in submitted or (mode == AUGMDP and (victim, MDP) in cells_of
                                      and pool_label((victim, MDP)) not in built):
                continue
            ready.append((pool_cost[p], lambda p=p: submit_pool(p)))
        for tag, m in models.items():
            if tag in submitted:
                continue
            wait = [pool_label(pool_of[tag])] if m.pool else []
            wait += list(m.after)
            if any(w in failed for w in wait):
                failed[tag] = f"needs {', '.join(w for w in wait if w in failed)}"
                submitted.add(tag)
            elif all(w in done for w in wait):
                target = done[wait[0]] if m.pool else None
                ready.append((unblocks[tag], lambda tag=tag, m=m, target=target: submit(
                    _Job("model", tag, m), _train_model, m, refs_of["know"], target, *(done[a] for a in m.after))))
        for c in (c for p in pools if pool_label(p) in done for c in cells_of[p] if c.key not in submitted):
            p = (c.victim, c.mode)
            wait = [m.tag for m in needs[c.key]]
            if any(w in failed for w in wait):
                failed[c.key] = f"needs {', '.join(w for w in wait if w in failed)}"
                submitted.add(c.key)
                bar.update(1)
                close(p)
            elif all(w in done for w in wait):
                ready.append((ATTACKS[c.family].cost, lambda c=c, p=p, wait=wait: submit(
                    _Job("cell", f"{c.attacker} vs {c.victim} {c.mode}", c), _attack_cell, c, refs_of["know"],
                    done[pool_label(p)], refs_of[f"images:{c.victim}"], rows[c.victim][:FIGURE_CANDIDATES],
                    *(done[w] for w in wait))))
        for _, start in sorted(ready, key=lambda r: -r[0]):  # stable: the card's order among equals
            if len(pending) >= executor.slots:
                break
            start()

    def submit_pool(p: tuple[str, str]) -> None:
        """Build a victim's pool, if fewer than ``executor.slots + 1`` are held (each is kept until its last cell)."""
        if len(open_pools) > executor.slots:
            return
        open_pools.add(p)
        submit(_Job("pool", pool_label(p), p), _build_target, cfg, refs_of["shared"], refs_of[f"victim:{p[0]}"], p[1],
               rows[p[0]], flower_pools.get(p[0]) if p[1] == DPM else None)

    left = {p: len(cells_of[p]) for p in pools}

    def close(p: tuple[str, str]) -> None:
        """A pool's cells are all finished: forget it, so a later pool may be built."""
        left[p] -= 1
        if left[p] == 0:
            open_pools.discard(p)
            done.pop(pool_label(p), None)

    schedule()
    while pending:
        handle, result, err = executor.next_done(pending)
        job = pending.pop(handle)
        if err is not None:
            failed[job.label if job.kind != "cell" else job.what.key] = str(err)
            log.error("attack suite: %s failed: %s", job.label, err)
            if job.kind == "pool":
                built.add(job.label)
                for c in cells_of[job.what]:
                    failed.setdefault(c.key, f"needs {job.label}")
                    submitted.add(c.key)
                    bar.update(1)
                    close(job.what)
            elif job.kind == "cell":
                bar.update(1)
                close((job.what.victim, job.what.mode))
        elif job.kind == "pool":
            built.add(job.label)
            done[job.label] = executor.ref(handle, result)
            seconds[job.label] = result[2]
        elif job.kind == "model":
            done[job.label] = executor.ref(handle, result)
            seconds[job.label] = result[1]
        else:
            cell: Cell = job.what
            record, thumbs = result
            p = (cell.victim, cell.mode)
            # the cell's share of the pool and models it used, so stored seconds add up to the work done
            record["seconds"] += (seconds[pool_label(p)] / len(cells_of[p])
                                  + sum(seconds[m.tag] / users[m.tag] for m in needs[cell.key]))
            found[cell.key] = store.put(cell.key, record, thumbs)
            run.computed.append(cell.key)
            bar.update(1)
            close(p)
            shown = (f"disclosure {record['disclosure']:.3f}, identified {record['identification']:.1%} "
                     f"(chance {record['chance']:.1%})" if thumbs is not None else "does not apply")
            elapsed, n = time.time() - t0, len(run.computed)
            log.info("[%d/%d] %s attacks %s, %s, %s: %s (%.0fs; ETA %.0fs)", n + len(run.reused), total,
                     cfg.attack.attacker, cell.victim, cell.mode, cell.attacker, shown, record["seconds"],
                     elapsed / n * (len(todo) - n))
        schedule()
    bar.close()
    lost = [c for c in todo if c.key not in found]
    if lost:
        why = "; ".join(f"{c.attacker} vs {c.victim} {c.mode}: {failed.get(c.key, 'not run')}" for c in lost[:5])
        raise SuiteError(f"{len(lost)} of {len(todo)} cells failed ({why}{'; ...' if len(lost) > 5 else ''}); the "
                         f"{len(run.computed)} finished are stored in {store.dir}, a rerun computes only the rest")


class SuiteError(RuntimeError):
    """Some cells failed; the others are stored."""
