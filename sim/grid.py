"""Table 5 of Deep Poisoning as data, and the work behind each of its rows.

A row is one classifier and the images or features it learns from. Rows 1-5 train a whole
backbone on raw images; rows 6-12 and the two extra rows refine the decider φ2 of the shared Φ
on unions of φ1 features and poisoned pools. The functions here compute one row from plain
arguments (arrays, pools, a state dict), so the same code runs in a Ray task or in-process, and
each finished row is kept under a key of exactly the settings it depends on.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from entities import runtime
from entities.backbone import Backbone, build_backbone
from entities.config import Config
from entities.entity import Entity, Pool
from entities.files import ArtefactError, artefact_key, write_json
from entities.pipeline import ArtefactStore, cached_features, entity_shards, load_task, step1_curves
from entities.pools import PoolError, PoolSpec, load_pool
from entities.sharing import DPM, get_mode, step1
from entities.train import evaluate_classifier, pretrain, train_decider

RAW, FEATURES, FEDAVG = "raw", "features", "fedavg"
# Part of every row's key: raise it when the way a row is computed changes, so that rows stored by
# an older version are computed anew instead of being served as if they were current.
ROW_FORMAT = 2


@dataclass(frozen=True)
class Row:
    """One line of the table. ``parts`` name the training data: ``raw:E1`` (S1's images),
    ``raw:S`` (all of S), ``phi1:E1`` (φ1(S1)) and ``pool:E2`` (what E2 shares: P2(φ1(S2)) in the
    paper, or E2's MDP, AugMDP or raw images in the other sharing modes)."""

    id: str
    entity: str  # whose classifier it is; empty for the reference rows 5, 6 and the extras
    kind: str
    parts: tuple[str, ...]
    paper: tuple[float, float] | None = None  # the paper's top-1 / top-5 (ImageNet, 500 classes)

    def uses(self, what: str) -> list[str]:
        """Entities whose ``what`` (raw, phi1, pool) this row trains on."""
        return [p.split(":")[1] for p in self.parts if p.startswith(what + ":")]

    def describe(self, share: str = DPM, rounds: int = 2) -> str:
        def one(part: str) -> str:
            what, who = part.split(":")
            k = who[1:]
            if what == "raw":
                return "raw images S" if who == "S" else f"raw images S{k}"
            if what == "phi1":
                return f"φ1(S{k})"
            return get_mode(share).received_text(who, rounds)

        text = " ∪ ".join(one(p) for p in self.parts)
        return f"FedAvg of φ2 over {', '.join(self.uses('phi1'))} on own φ1 features" if self.kind == FEDAVG else text


ROWS: tuple[Row, ...] = (
    Row("1", "E1", RAW, ("raw:E1",), (52.9, 77.7)),
    Row("2", "E2", RAW, ("raw:E2",), (52.7, 77.8)),
    Row("3", "E3", RAW, ("raw:E3",), (53.2, 77.9)),
    Row("4", "E4", RAW, ("raw:E4",), (13.5, 30.3)),
    Row("5", "", RAW, ("raw:S",), (81.1, 95.0)),
    Row("6", "", FEATURES, ("phi1:E1", "phi1:E2"), (61.2, 83.8)),
    Row("7", "E1", FEATURES, ("phi1:E1", "pool:E2"), (59.4, 82.6)),
    Row("8", "E2", FEATURES, ("pool:E1", "phi1:E2"), (59.8, 83.0)),
    Row("9", "E3", FEATURES, ("pool:E1", "pool:E2", "phi1:E3"), (62.3, 84.5)),
    Row("10", "E3", FEATURES, ("pool:E1", "pool:E2", "pool:E3", "phi1:E3"), (62.7, 84.7)),
    Row("11", "E4", FEATURES, ("pool:E1", "pool:E2", "phi1:E4"), (58.4, 82.1)),
    Row("12", "E4", FEATURES, ("pool:E1", "pool:E2", "pool:E3", "phi1:E4"), (61.6, 84.4)),
    # Beyond the paper: federated averaging of the decider (the alternative it argues against)
    # and all four entities' unpoisoned features (the most that sharing could give).
    Row("fedavg", "", FEDAVG, ("phi1:E1", "phi1:E2", "phi1:E3", "phi1:E4")),
    Row("all4", "", FEATURES, ("phi1:E1", "phi1:E2", "phi1:E3", "phi1:E4")),
)
ROW_IDS = tuple(r.id for r in ROWS)


def select_rows(ids: list[str] | None) -> list[Row]:
    """The rows asked for, in table order; an unknown id stops before any work is done."""
    if not ids:
        return list(ROWS)
    unknown = [i for i in ids if i not in ROW_IDS]
    if unknown:
        raise ValueError(f"unknown Table 5 row id(s) {unknown}; valid: {', '.join(ROW_IDS)}")
    return [r for r in ROWS if r.id in ids]


def check_entities(cfg: Config) -> None:
    """Table 5 names E1..E4, so the configuration must have exactly four shards."""
    if len(cfg.data.shard_fractions) != 4:
        raise ValueError(f"Table 5 needs four entities E1..E4, but data.shard_fractions has "
                         f"{len(cfg.data.shard_fractions)} entries: {cfg.data.shard_fractions}")


def reuses_phi(row: Row, seed: int, cfg: Config) -> bool:
    """Row 1 at the first seed is Φ itself: E1 pretrained it on S1 with the same recipe and seed."""
    return row.kind == RAW and row.parts == (f"raw:{cfg.backbone.pretrain_on}",) and seed == cfg.data.seed


def raw_epochs(row: Row, cfg: Config) -> int:
    """Entities' own rows use the recipe Φ was pretrained with; row 5 (all of S) its own budget."""
    return cfg.table5.all_epochs if row.uses("raw") == ["S"] else cfg.pretrain.epochs


def contributions_key(cfg: Config, pool_source: str) -> str:
    """A hash of what the entities' contributions depend on: Step 1, the sharing mode and its settings."""
    d = cfg.key_dict()
    share = cfg.collab.share
    settings = {"format": ROW_FORMAT, "data": d["data"], "backbone": d["backbone"], "pretrain": d["pretrain"],
                "pools": pool_source, "share": share}
    settings |= get_mode(share).key_settings(d)
    if cfg.decider.views > 1:
        settings["views"] = cfg.decider.views
    return artefact_key(settings | runtime.key_part(cfg.device, cfg.precision))


def row_key(row: Row, seed: int, cfg: Config, pool_source: str) -> str:
    """A hash of exactly what the row's figure depends on: other settings may change freely."""
    d = cfg.key_dict()
    settings = {"format": ROW_FORMAT, "row": dataclasses.astuple(row)[:4], "seed": seed, "data": d["data"],
                "backbone": d["backbone"], "pretrain": d["pretrain"]}
    if row.kind == RAW:
        settings["epochs"] = raw_epochs(row, cfg)
    else:
        settings["decider"] = d["decider"]
    if row.uses("pool"):
        settings["contributions"] = contributions_key(cfg, pool_source)
    if row.kind == FEDAVG:
        settings["fedavg"] = [cfg.table5.fedavg_rounds, cfg.table5.fedavg_local_epochs]
    return artefact_key(settings | runtime.key_part(cfg.device, cfg.precision))


class RowStore:
    """Finished rows of one run, one JSON file per (row, seed, settings key): the run's resume state.

    The entities' contribution metrics (disclosure, size) are kept the same way, under their own key.
    """

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / "rows"

    def path(self, row: Row, seed: int, key: str) -> Path:
        return self.dir / f"row{row.id}-seed{seed}-{key}.json"

    def get(self, row: Row, seed: int, key: str) -> dict | None:
        return self._read(self.path(row, seed, key))

    def put(self, row: Row, seed: int, key: str, result: dict) -> dict:
        """Write atomically (a kill never leaves half a row) and return the record as stored."""
        return self._write(self.path(row, seed, key), {**result, "row": row.id, "seed": seed, "key": key})

    def get_contributions(self, key: str) -> dict | None:
        return self._read(self.dir / f"contributions-{key}.json")

    def put_contributions(self, key: str, metrics: dict) -> dict:
        return self._write(self.dir / f"contributions-{key}.json", metrics)

    @staticmethod
    def _read(path: Path) -> dict | None:
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ArtefactError(f"stored row {path} is unreadable ({err}); delete it to recompute the row") from err

    @staticmethod
    def _write(path: Path, record: dict) -> dict:
        """Atomically, under a temp name no concurrent writer shares: a kill never leaves half a row."""
        write_json(record, path)
        return record


# --- the inputs every feature row shares, produced once --------------------------------------------


@dataclass
class GridInputs:
    """Step 1 and Step 2 of the collaboration: Φ (pretrained on the configured shard), each
    entity's φ1 features, the features a receiver gets from what it shares (its poisoned pool, or
    φ1 of its MDP, AugMDP or raw images), and the φ1 features of S's test split."""

    backbone: Backbone
    own: dict[str, Pool]
    pools: dict[str, Pool]
    test_features: torch.Tensor
    pool_metrics: dict[str, dict[str, float]]
    curves: dict[str, list[dict[str, float]]]  # training curves of Φ, ψ and what the contributions trained


def prepare(cfg: Config, pools: dict[str, Pool] | None = None, threads: int = 0) -> GridInputs:
    """Pretrain Φ, train ψ, featurize every shard and build each entity's contribution in the
    sharing mode ``cfg.collab.share`` (private DPMs or MDP sets, each stored once).

    ``pools`` given (DPM pools of a Flower run) replaces the DPMs: those pools are shared as they are.
    """
    runtime.configure(cfg, threads)
    split = load_task(cfg)
    store = ArtefactStore(cfg)
    shared = step1(cfg, split, store)
    test_features = cached_features(store, "S-test", shared.phi1, split.S.test_images)
    own, made, metrics = {}, {}, {}
    curves = step1_curves(cfg, store)
    mode = get_mode(cfg.collab.share)
    for name, idx in entity_shards(cfg, split).items():
        images, labels = split.S.train_images[idx], split.S.train_labels[idx]
        entity = Entity(name, images, labels, store)
        own[name] = entity.featurize(shared)
        if pools is None:
            sent = mode.contribute(entity, shared, cfg, seed=cfg.data.seed)
            made[name] = mode.training_pool(sent.pool(), shared.phi1)
            metrics[name] = {"items_shared": len(sent), "bytes_per_image": sent.data[0].numel() * 4 * len(sent)
                             // len(entity.labels), "disclosure_ssim": sent.disclosure,
                             "label_ssim": sent.label_disclosure}
            metrics[name] |= mode.metrics(entity, shared, test_features, split.S.test_labels)
            curves |= mode.curves(entity, shared, cfg, cfg.data.seed)
        if cfg.decider.views > 1:
            own[name], made[name] = with_views(cfg, entity, shared, own[name], made.get(name), mode)
    return GridInputs(shared.backbone, own, made if pools is None else pools, test_features, metrics, curves)


def with_views(cfg: Config, entity: Entity, shared, own: Pool, sent: Pool | None, mode) -> tuple[Pool, Pool | None]:
    """``own`` and ``sent`` (what the entity's contribution gives a receiver) with ``decider.views`` − 1
    augmented views of its shard added: the receiver featurizes its views itself, the sender contributes
    on each view with what it made on the shard (its stored DPM)."""
    copies = entity.views(cfg.decider.views, cfg.data.seed)[1:]
    own = Pool.union([own, *(c.featurize(shared) for c in copies)])
    if sent is not None:
        sent = Pool.union([sent, *(mode.training_pool(mode.contribute(c, shared, cfg, seed=cfg.data.seed).pool(),
                                                      shared.phi1) for c in copies)])
    return own, sent


def feature_shape(cfg: Config, image_shape: tuple[int, ...], num_classes: int) -> tuple[int, ...]:
    """φ1's output shape for this config, from one blank image: pools are checked before any training."""
    phi1, _ = build_backbone(cfg.backbone.name, num_classes, image_shape[0]).split(cfg.backbone.hook)
    with torch.no_grad():
        return tuple(phi1.eval()(torch.zeros(1, *image_shape)).shape[1:])


def load_flower_pools(run_dir: Path, cfg: Config, names: list[str], labels: dict[str, np.ndarray],
                      shape: tuple[int, ...], num_classes: int) -> tuple[dict[str, Pool], str]:
    """Validated pools of a ``flwr run sim/`` results directory, and a digest of their contents.

    The directory must come from this config's Step 1 (same ArtefactStore key, hence the same φ1
    and shards): a pool made with another φ1 would train the decider on meaningless features.
    """
    if not (run_dir / "config.json").is_file():
        raise PoolError(f"{run_dir} is not a Flower results directory (no config.json)")
    key = ArtefactStore(cfg).key
    dpm = get_mode(DPM)  # a Flower run's stored pools are read for DPM runs only (their features are trained on)
    pools, digest = {}, hashlib.sha1()
    for name in names:
        path = run_dir / "artefacts" / "pools" / f"{name}.pt"
        pool, meta = load_pool(path)
        theirs = meta.get("store_key")
        if theirs != key:
            raise PoolError(f"{run_dir} was made with other Step 1 settings (store key {theirs}, this config "
                            f"has {key}): its pool {path.name} comes from another φ1; rerun with its config")
        dpm.validate(str(path), pool, PoolSpec(shape, num_classes))
        if len(pool) != len(labels[name]) or not np.array_equal(pool.labels, labels[name]):
            raise PoolError(f"pool {path}: its {len(pool)} labels do not match shard {name} "
                            f"({len(labels[name])} images) of this config")
        digest.update(path.read_bytes())
        pools[name] = dpm.training_pool(pool, phi1=None)
    return pools, digest.hexdigest()[:10]


# --- one row -----------------------------------------------------------------------------------------


def _finish(scores: dict[str, float], n_train: int, t0: float) -> dict:
    return {**scores, "n_train": n_train, "seconds": time.time() - t0}


def raw_row(row: Row, seed: int, cfg: Config, images: np.ndarray, labels: np.ndarray, idx: np.ndarray | None,
            test_images: np.ndarray, test_labels: np.ndarray, num_classes: int, threads: int = 0) -> dict:
    """Rows 1-5: a backbone trained from scratch on raw images (``idx`` picks a shard of S)."""
    t0 = time.time()
    runtime.configure(cfg, threads)
    x, y = (images, labels) if idx is None else (images[idx], labels[idx])
    torch.manual_seed(seed)
    model = build_backbone(cfg.backbone.name, num_classes, x.shape[1])
    recipe = dataclasses.replace(cfg.pretrain, epochs=raw_epochs(row, cfg))
    pretrain(model, x, y, recipe, seed=seed)
    return _finish(evaluate_classifier(model, test_images, test_labels), len(y), t0)


def phi_row(cfg: Config, backbone: Backbone, test_images: np.ndarray, test_labels: np.ndarray, n_train: int,
            threads: int = 0) -> dict:
    """Row 1 at the first seed: Φ is already E1's model on its own raw images, so only evaluate it."""
    t0 = time.time()
    runtime.configure(cfg, threads)
    return _finish(evaluate_classifier(backbone, test_images, test_labels), n_train, t0)


def _phi2(cfg: Config, backbone: Backbone) -> nn.Module:
    """A trainable copy of Φ's decider: every row starts from the same φ2."""
    return copy.deepcopy(backbone).split(cfg.backbone.hook)[1]


def feature_row(row: Row, seed: int, cfg: Config, backbone: Backbone,
                test_features: torch.Tensor, test_labels: np.ndarray, *parts: Pool, threads: int = 0) -> dict:
    """Rows 6-12 and ``all4``: refine Φ's φ2 on the union of the row's features and pools."""
    t0 = time.time()
    runtime.configure(cfg, threads)
    data = Pool.union(list(parts))
    phi2 = _phi2(cfg, backbone)
    train_decider(phi2, data.features, data.labels, cfg.decider, seed=seed, what=f"row {row.id} decider")
    return _finish(evaluate_classifier(phi2, test_features, test_labels), len(data), t0)


class InProcessGrid(Grid):
    """A Flower Grid whose nodes answer in this process: subclasses implement ``get_node_ids`` and
    ``send_and_receive``, all a strategy's ``start`` calls. Every other method of Flower's abstract
    Grid raises, so a code path that reaches one learns it at once (the tests' fault-injecting grids
    build on it too)."""

    @property
    def run(self):
        raise NotImplementedError

    def set_run(self, run) -> None:
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError


class _LocalClients(InProcessGrid):
    """Flower's FedAvg in-process: node k + 1 is client k, and "sending" a train message runs that
    client's local training here and returns its reply (no SuperLink, no network). Replies come back
    in node order, so the weighted sum is taken in the same order every run."""

    def __init__(self, train: Callable[[int, Message], Message], clients: int) -> None:
        self.train = train
        self.clients = clients

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.clients + 1))

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        ordered = sorted(messages, key=lambda m: m.metadata.dst_node_id)
        return [self.train(m.metadata.dst_node_id - 1, m) for m in ordered]


@contextmanager
def _server_task() -> Iterator[None]:
    """The run identity a ServerApp process has, which Flower's messages are stamped with; restored after."""
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    if saved[0] is None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0, 0, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def fedavg(phi2: nn.Module, clients: list[Pool], cfg: Config, seed: int) -> nn.Module:
    """Flower's FedAvg of φ2 on the Message API: each client refines it on its own features, the server averages.

    Flower's own strategy (``flwr.serverapp.strategy.FedAvg``, its ``start`` loop) runs in-process over
    :class:`_LocalClients`: weights by example count, exactly as a ``flwr run`` would, so the row
    measures FedAvg and not our rewrite of it.
    """
    local_cfg = dataclasses.replace(cfg.decider, epochs=cfg.table5.fedavg_local_epochs)
    dtypes = {k: v.dtype for k, v in phi2.state_dict().items()}

    def train(k: int, msg: Message) -> Message:
        rnd = int(msg.content["config"]["server-round"])
        local = copy.deepcopy(phi2)
        state = msg.content["arrays"].to_torch_state_dict()
        local.load_state_dict({name: value.to(dtypes[name]) for name, value in state.items()})
        pool = clients[k]
        train_decider(local, pool.features, pool.labels, local_cfg, seed=seed + 1000 * rnd + k,
                      what=f"fedavg round {rnd} client {k + 1}")
        arrays = ArrayRecord({name: v.detach().cpu().contiguous() for name, v in local.state_dict().items()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": len(pool)})}),
                       reply_to=msg)

    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=len(clients), min_available_nodes=len(clients))
    initial = ArrayRecord({name: v.detach().cpu().contiguous() for name, v in phi2.state_dict().items()})
    with _server_task():
        result = strategy.start(_LocalClients(train, len(clients)), initial, num_rounds=cfg.table5.fedavg_rounds)
    averaged = result.arrays.to_torch_state_dict()
    phi2.load_state_dict({name: value.to(dtypes[name]) for name, value in averaged.items()})
    return phi2


def fedavg_row(row: Row, seed: int, cfg: Config, backbone: Backbone,
               test_features: torch.Tensor, test_labels: np.ndarray, *clients: Pool, threads: int = 0) -> dict:
    """The extra FedAvg row: E1..E4 federate φ2 on their own unpoisoned features."""
    t0 = time.time()
    runtime.configure(cfg, threads)
    phi2 = fedavg(_phi2(cfg, backbone), list(clients), cfg, seed)
    return _finish(evaluate_classifier(phi2, test_features, test_labels), sum(len(c) for c in clients), t0)
